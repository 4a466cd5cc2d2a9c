#!/usr/bin/env python3
"""Node daemons whose rendezvous is kept in etcd (rendezvous.etcd), on
loopback: a three-member etcd cluster (Debian's etcd-server, started here)
and three mtnlgd, every one with the job and rendezvous.host auto, so each
may be elected to coordinate.

- test_losing_the_coordinators_node_does_not_end_the_job: n0 is elected
  coordinator (started first); generation 1 trains on n0 and n1 (dp 2), n2
  waits as a spare. /v1/status (against proto/control-v1.yaml) and
  mtnlgctl status say which term and store, and whether it was elected there.
  etcd's leader is SIGKILLed, and later two of its three members for longer
  than the coordinator's lease: training goes on through both, in
  generation 1 (meanwhile the status's election says etcd does not
  answer, as do mtnlg_etcd_up 0 and mtnlgctl status, and after it that it
  answers again). The etcd member that leads is SIGKILLed: training goes
  on in generation 1, nobody notices beyond a warning. Then n0, the
  coordinator's node, is SIGKILLed: its lease on coord/leader lapses, n1
  and n2 end their generation ("coordinator lost: no coordinator held
  coord/leader …") and exit 1; started again, as systemd would, one of them
  is elected, deletes the old term's keys, forms a generation on n1 and n2
  that resumes from the newest checkpoint, and the job completes. Every
  loss printed, before the kill and after the resume, equals a standalone
  run's, and the steps after the resume follow the checkpoint's.
  The new coordinator counts n0's loss as restart 1 of the job's budget,
  and the job, paused before n0 was killed, forms paused under it (no step
  in 2 s) until resumed.
- test_a_node_started_after_the_job_completed_does_not_run_it_again: the
  job completed, etcd's coord/state says so (its hash, steps, when); n1
  started again (as systemd would a node that lost contact just then) is
  elected, finds it closed, and exits 0 training nothing;
  test_the_completed_job_given_more_steps_runs: with train.steps 2 more
  (another job, by its hash) n1 and n2 run it, steps 151 and 152.
  test_followers_started_after_the_job_completed_exit_0: a node with
  rendezvous.host = no and the job, started after the end, reads that the
  job completed and exits 0 at once; one without a job (a spare) waits its
  rendezvous.join_timeout_s for another job's coordinator, saying why, and
  exits 0.
- test_a_lost_coordinator_spends_the_restart_budget: with
  rendezvous.max_restarts = 0, the node elected after the coordinator's
  node was lost ends the job instead of re-forming it, and exits 2 (it
  coordinated the job that failed).
- test_a_coordinator_whose_lease_lapsed_takes_the_key_again: one node
  cut off from etcd (through forwarders the test cuts) past its lease,
  etcd keeping its quorum: coord/leader goes; reached again, the node takes
  it again with the same value and trains on in generation 1 to the end.
- test_a_node_reaches_etcd_over_tls_with_its_client_certificate: one
  etcd member over https:// asking for a client certificate: a node given
  etcd_cacert, etcd_cert and etcd_key is elected and runs a job; one
  without a certificate exits 2 at once, naming TLS.
- test_a_coordinator_restarted_at_once_does_not_wait_out_its_old_lease:
  the coordinator's daemon SIGKILLed and started again 0.5 s later finds
  its old term on its own endpoint where nothing listens, deletes the key
  and is elected again within 3 s (its lease is 4 s); the job resumes.
- test_a_resize_holds_under_the_next_coordinator: a job of dp 2 resized to
  dp 1 (coord/state in etcd says dp_resized 1); its coordinator's node
  SIGKILLed and both daemons started again, the node elected forms dp 1, as
  the operator left it, not the job's dp_min 2.
- test_a_config_that_cannot_use_etcd_is_refused: a wildcard endpoint (the
  others could not dial it), an etcd_prefix without its '/', a user without
  a password file: one line each, exit 2.
- test_no_etcd_is_waited_for_then_exit_1: endpoints where no etcd listens:
  the daemon waits, saying so, and exits 1 (worth a restart) after
  rendezvous.join_timeout_s.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tools"))
from local_cluster import (Etcd, check, elected_cluster, free_port, grep,  # noqa: E402
                           last_step, license_tokens, post, status, status_contract, tiny_job)

HB_MS, TIMEOUT_MS = 200, 4000
STEPS, INTERVAL = 150, 6


class Cut:
    """TCP forwarders to etcd's members on ports of their own, which the
    test cuts (the connections closed, none taken) and mends: a node cut
    off from etcd alone, while etcd keeps its quorum."""

    def __init__(self, etcd):
        import threading
        self.targets = list(etcd.client)
        self.ports = [free_port() for _ in self.targets]
        self.endpoints = ",".join("http://127.0.0.1:%d" % p for p in self.ports)
        self._lock, self._conns, self._listeners = threading.Lock(), [], []
        self.mend()

    def _serve(self, listener, target):
        import socket
        import threading
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(("127.0.0.1", target), timeout=2)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a, b):
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(2)
            except OSError:
                pass

    def cut(self):
        import socket
        with self._lock:
            for s in self._listeners + self._conns:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            self._listeners, self._conns = [], []

    def mend(self):
        import socket
        import threading
        for port, target in zip(self.ports, self.targets):
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", port))
            listener.listen(64)
            self._listeners.append(listener)
            threading.Thread(target=self._serve, args=(listener, target), daemon=True).start()


TOKEN = "etcd-cluster-token"


def etcd_cluster(mtnlgd, tmp, name, job, etcd, nodes=3, endpoints=None):
    """elected_cluster's nodes under the prefix /mtnlg/NAME/, reaching etcd
    at endpoints (default: its members)."""
    return elected_cluster(mtnlgd, os.path.join(tmp, name), job, endpoints or etcd.endpoints,
                           nodes=nodes, prefix="/mtnlg/%s/" % name, heartbeat_ms=HB_MS,
                           timeout_ms=TIMEOUT_MS, token=TOKEN)


def two_node_job(mtnlgd, tmp, tokens, etcd, name, steps, dp):
    """A job NAME of tp 2 x pp 1 x dp `dp` (dp_min = dp_max), steps long
    with a checkpoint every 5, on two one-slot nodes elected through etcd
    under /mtnlg/NAME/: the cluster (its nodes n0, n1)."""
    job = tiny_job(os.path.join(tmp, name + ".json"), tokens, name, steps,
                   parallel={"tp": 2, "pp": 1, "dp_min": dp, "dp_max": dp, "micro_batch": 2},
                   checkpoint={"dir": os.path.join(tmp, name + "-ck"), "interval": 5})
    return etcd_cluster(mtnlgd, tmp, name, job, etcd, nodes=2)


def test_losing_the_coordinators_node(mtnlgd, tmp, tokens, etcd, mtnlgctl, validate):
    name = "test_losing_the_coordinators_node_does_not_end_the_job"
    ck = os.path.join(tmp, "etcd-ckpt")
    job = tiny_job(os.path.join(tmp, "etcd.json"), tokens, "etcd-job", STEPS,
                   parallel={"tp": 2, "pp": 1, "dp_min": 2, "dp_max": 2, "micro_batch": 2},
                   checkpoint={"dir": ck, "interval": INTERVAL})
    one = subprocess.run([mtnlgd, "--standalone", job, "--log-format", "json", "--devices",
                          "cpu:4", "--set", "checkpoint.dir=" + os.path.join(tmp, "etcd-refck")],
                         capture_output=True, text=True, timeout=300)
    ref = {json.loads(ln)["step"]: json.loads(ln)["loss"]
           for ln in one.stdout.splitlines() if ln.startswith("{")}
    c = etcd_cluster(mtnlgd, tmp, "etcd-c1", job, etcd)
    n0, n1, n2 = c.nodes
    try:
        c.node_start(n0)  # elected first: it coordinates, and holds world rank 0
        c.wait_for(lambda: grep(n0, r"elected coordinator of job etcd-job"), 60, "n0 elected")
        c.node_start(n1)
        c.node_start(n2)
        c.wait_for(lambda: grep(n0, r"coordinator: generation 1 formed"), 60, "generation 1")
        c.wait_for(lambda: last_step(n0) >= 4, 120, "step 4")
        endpoint0 = "127.0.0.1:%d" % n0.endpoint_port
        followed = [bool(grep(n, r"following the coordinator of term [0-9a-f]{16} at %s"
                                 % re.escape(endpoint0))) for n in (n1, n2)]
        # /v1/status and mtnlgctl status say how the coordinator was chosen
        elections = [status(n).get("election") for n in (n0, n1)]
        schema_errors = [e for n in (n0, n1) for e in validate(status(n))]
        term0 = (elections[0] or {}).get("term")
        shown = (elections[0] == {"etcd": etcd.endpoints, "term": term0,
                                  "coordinator_endpoint": endpoint0, "elected_here": True,
                                  "lease_s": 4, "etcd_answers": True, "etcd_error": None}
                 and elections[1] == dict(elections[0], elected_here=False)
                 and term0 and grep(n0, r"elected coordinator of job etcd-job \(term %s," % term0))
        ctl = subprocess.run([mtnlgctl, "--endpoint", n1.url(), "status"], capture_output=True,
                             text=True, timeout=30)
        ctl_says = re.search(r"elected\s+through etcd: term %s, store at %s, lease 4 s\n"
                             % (term0, re.escape(endpoint0)), ctl.stdout)

        # etcd's leader lost: nothing of mtnlg notices beyond a slow request
        lead = etcd.leader()
        etcd.kill(lead)
        at_kill = last_step(n0)
        c.wait_for(lambda: last_step(n0) >= at_kill + 6, 120, "6 steps after etcd's leader died")
        etcd.start(lead)
        same_gen = not any(grep(n, r"coordinator lost|generation 1 ended") for n in c.nodes)
        # etcd without a quorum for longer than the lease: training goes on
        # meanwhile (nothing of a step needs etcd), and after it too
        c.wait_for(lambda: etcd.leader() is not None, 30, "etcd's leader after the restart")
        lost = [i for i in range(3) if i != etcd.leader()]
        for i in lost:
            etcd.kill(i)
        at_outage = last_step(n0)
        # meanwhile the status, the metrics and mtnlgctl say etcd does not
        # answer (its election thread's next round), and training goes on
        t_out, down = time.time(), None
        while time.time() < t_out + TIMEOUT_MS / 1000 + 2:
            el = (status(n0) or {}).get("election") or {}
            if down is None and el.get("etcd_answers") is False:
                with urllib.request.urlopen(n0.url() + "/v1/metrics", timeout=5) as r:
                    metrics = r.read().decode()
                ctl_down = subprocess.run([mtnlgctl, "--endpoint", n0.url(), "status"],
                                          capture_output=True, text=True, timeout=30).stdout
                down = (el, time.time() - t_out, metrics, ctl_down)
            time.sleep(0.2)
        during = last_step(n0) - at_outage
        for i in lost:
            etcd.start(i)
        c.wait_for(lambda: etcd.leader() is not None, 30, "etcd's quorum back")
        c.wait_for(lambda: ((status(n0) or {}).get("election") or {}).get("etcd_answers"), 30,
                   "the status to say etcd answers again")
        with urllib.request.urlopen(n0.url() + "/v1/metrics", timeout=5) as r:
            metrics_back = r.read().decode()
        said_down = (down is not None and (down[0].get("etcd_error") or "").startswith(
            "keeping the coordinator's lease: store(etcd ")
            and "\nmtnlg_etcd_up 0\n" in down[2] and "\nmtnlg_elected_here 1\n" in down[2]
            and re.search(r"^  etcd +does not answer: keeping the coordinator's lease: .*; "
                          r"training goes on, but no coordinator can be elected until it does$",
                          down[3], re.M)
            and "\nmtnlg_etcd_up 1\n" in metrics_back)
        at_back = last_step(n0)
        c.wait_for(lambda: last_step(n0) >= at_back + 3, 120, "3 steps after etcd came back")
        outlived = during > 0 and said_down and not any(
            grep(n, r"coordinator lost|generation 1 ended") for n in c.nodes)

        # the coordinator's node lost: the job goes on under another
        c.wait_for(lambda: last_step(n0) >= 2 * INTERVAL + 2, 120, "two checkpoints")
        # paused by the operator: the pause outlives the coordinator
        paused = post(n1, "/v1/pause", TOKEN)
        c.wait_for(lambda: status(n0)["state"] == "paused", 30, "paused")
        # and etcd holds it (the coordinator writes it within a tick)
        state_key = "/mtnlg/etcd-c1/coord/state"
        c.wait_for(lambda: json.loads(etcd.get(state_key) or "{}").get("paused") is True, 10,
                   "the pause in etcd's coord/state")
        state = json.loads(etcd.get(state_key))
        killed_after = last_step(n0)
        port3 = free_port()
        t0 = time.time()
        n0.signal(signal.SIGKILL)
        n0.wait(10)
        # a node started at once reads n0's lease, not lapsed yet: it finds
        # n0's store gone, waits for the key to go, and campaigns
        n3 = c.add_node("n3", extra={"rendezvous": {"endpoint": "127.0.0.1:%d" % port3}})
        n3.endpoint_port = port3
        c.nodes.append(n3)
        c.node_start(n3)
        codes1 = c.wait_all(60, [n1, n2])
        took = time.time() - t0
        # its store went with it, its lease lapsed, and n3 may have been
        # elected by then: whichever they found first
        why = [re.findall(r"coordinator lost: .*", n.stderr())[:1] for n in (n1, n2)]
        lost = [bool(grep(n, r"coordinator lost: (the store at %s did not answer for [0-9.]+ s"
                             r"|no coordinator held coord/leader in etcd for [0-9.]+ s \(term "
                             r"[0-9a-f]{16}'s lease lapsed\): generation 1 is gone with it"
                             r"|another coordinator was elected in etcd \([0-9a-f]{16} \S+, not "
                             r"term [0-9a-f]{16} at %s\): generation 1 is gone with the old one)"
                          % (re.escape(endpoint0), re.escape(endpoint0)))) for n in (n1, n2)]
        for n in (n1, n2):  # systemd's Restart=on-failure
            c.node_start(n)
        c.wait_for(lambda: any(grep(n, r"coordinator: generation 1 starts paused")
                               for n in (n1, n2, n3)), 120, "the new coordinator's generation")
        printed = sum(len(n.steps()) for n in (n1, n2, n3))
        time.sleep(2.0)
        held = sum(len(n.steps()) for n in (n1, n2, n3)) == printed
        head = next(n for n in (n1, n2, n3) if grep(n, r"generation 1 starts paused"))
        st = status(head)
        resume_code = post(head, "/v1/resume", TOKEN)
        codes2 = c.wait_all(240, [n1, n2, n3])
        stale = grep(n3, r"following the coordinator of term [0-9a-f]{16} at %s" % re.escape(
            endpoint0)) and grep(n3, r"etcd: the coordinator of term [0-9a-f]{16} at %s is gone "
                                     r"before its store answered: electing again"
                                 % re.escape(endpoint0))
        elected = [n for n in (n1, n2, n3) if grep(n, r"elected coordinator of job etcd-job")]
        coord = elected[0] if len(elected) == 1 else None
        hosted = coord and grep(coord, r"hosting the rendezvous store on 127\.0\.0\.1:%d and "
                                       r"coordinating job etcd-job" % coord.endpoint_port)
        # the budget spans coordinators: n0's loss is restart 1
        counted = coord and grep(coord, r"elected coordinator of job etcd-job \(term [0-9a-f]{16}, "
                                        r"lease 4 s\): the coordinator n0 was lost \(its lease on "
                                        r"coord/leader in etcd lapsed\)") and grep(
            coord, r"coordinator: generation 1 formed \(restart 1 of 3\)")
        # world rank 0's node says where it resumed
        m = re.search(r"resumed from \S+: step (\d+)", n1.stderr() + n2.stderr() + n3.stderr())
        resumed = int(m.group(1)) if m else None
        before = n0.steps()
        # every node of a generation prints its steps: one node's are the run's
        after = next((n.steps() for n in (n1, n2, n3) if n.steps()), [])
        got = [(s["step"], s["loss"]) for s in before + after]
        exact = len(ref) == STEPS and got and all(ref.get(s) == loss for s, loss in got)
        ok = (all(followed) and shown and not schema_errors and ctl_says and same_gen and outlived and codes1 == [1, 1] and all(lost)
              and paused == 202 and state == {"restarts": 0, "paused": True, "coordinator": "n0"}
              and held and st["state"] == "paused" and st["restarts"] == 1
              and (st.get("last_restart") or {}).get("reason", "").startswith(
                  "the coordinator n0 was lost") and resume_code == 202
              and codes2 == [0, 0, 0] and stale and coord is not None and coord is head
              and hosted and counted
              and resumed is not None and resumed >= INTERVAL and resumed % INTERVAL == 0
              and resumed <= killed_after
              and [s["step"] for s in after] == list(range(resumed + 1, STEPS + 1)) and exact)
        failures = check(name, ok,
                     "followers said so %s; status's election %s (schema errors %s), mtnlgctl "
                     "status says it %s%s; etcd leader m%s killed after step %d, generation 1 "
                     "went on %s; etcd without a quorum for %.1f s: %s steps meanwhile, said so %s "
                     "(status %s after %s s), generation 1 went on %s; n0 killed after step %d: n1, n2 exit %s after %.1f s, coordinator "
                     "lost logged %s %s; paused before %s (coord/state %s), after: no step in 2 s %s, status %s restarts %s "
                     "last_restart %s, resume %s; n3 started at once left n0's stale lease %s; n1, n2 started again: "
                     "exit %s, elected %s (hosting its store: %s, n0's loss counted as restart 1: "
                     "%s), resumed from step %s, rank 0 then ran %s..%s; losses equal "
                     "the standalone run's: %s (%d compared)%s"
                     % (followed, elections, schema_errors, bool(ctl_says),
                        "" if ctl_says else " (%s%s)" % (ctl.stdout[-600:], ctl.stderr[-300:]),
                        lead, at_kill, same_gen, TIMEOUT_MS / 1000 + 2, during, bool(said_down),
                        down and down[0], down and "%.1f" % down[1], outlived, killed_after, codes1,
                        took, lost, why,
                        paused, state, held, st.get("state"), st.get("restarts"), st.get("last_restart"),
                        resume_code,
                        bool(stale), codes2, [n.name for n in elected], bool(hosted),
                        bool(counted), resumed,
                        after[:1] and after[0]["step"], after[-1:] and after[-1]["step"], exact,
                        len(got), "" if ok else "\nsteps after by node: %s\n%s" % (
                            [(n.name, [x["step"] for x in n.steps()][:3]) for n in (n1, n2, n3)],
                            c.logs(40))))
        failures += test_a_node_started_after_the_job_completed(c, etcd, coord, state_key)
        return failures
    finally:
        c.kill_all()


def test_a_node_started_after_the_job_completed(c, etcd, coord, state_key):
    """The job of test_losing_the_coordinators_node completed: its
    coordinator closed it in etcd (coord/state says which job, and that it
    completed its steps). A node started again then (one that lost contact
    just as the job ended, restarted by systemd) is elected, finds the job
    closed and exits 0 at once, training nothing."""
    name = "test_a_node_started_after_the_job_completed_does_not_run_it_again"
    m = coord and re.search(r"coordinating job etcd-job \(([0-9a-f]{16})\)", coord.stderr())
    job_hash = m.group(1) if m else None
    closed = json.loads(etcd.get(state_key) or "{}")
    straggler = c.nodes[1]  # n1
    t0 = time.time()
    c.node_start(straggler)
    codes = c.wait_all(60, [straggler])
    took = time.time() - t0
    said = grep(
        straggler, r"elected to coordinate, but job etcd-job \(%s\) completed its %d steps at "
                   r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC \(coord/state in etcd says so\): not "
                   r"running it again \(to run the same job again, delete "
                   r"/mtnlg/etcd-c1/coord/state in etcd, or give it another "
                   r"rendezvous.etcd_prefix\)" % (job_hash, STEPS))
    completed = closed.get("completed") or {}
    ok = (job_hash and completed.get("job") == job_hash and completed.get("name") == "etcd-job"
          and completed.get("step") == STEPS and abs(completed.get("at", 0) - time.time()) < 600
          and closed.get("paused") is False and closed.get("restarts") == 1
          and closed.get("coordinator") == coord.name and codes == [0] and said
          and not straggler.steps() and etcd.get(state_key) == json.dumps(closed, separators=(",", ":"))
          and etcd.get("/mtnlg/etcd-c1/coord/leader") is None)
    fails = check(name, ok, "coord/state after the job %r (job %s); n1 started again: exit %s "
                  "after %.1f s, said so %s, printed %d steps%s"
                  % (closed, job_hash, codes, took, bool(said), len(straggler.steps()),
                     "" if ok else "\n" + straggler.stderr()[-2000:]))
    # nodes that only follow (rendezvous.host = no), started again after
    # the end, find no coordinator: one with the job reads that it
    # completed and exits 0 at once; one without a job (a spare) waits its
    # join_timeout_s for another job's coordinator, saying why, then exits
    # 0: the rendezvous is over, not failed (exit 2 had the unit failed)
    name = "test_followers_started_after_the_job_completed_exit_0"
    follow = {"host": "no", "join_timeout_s": 3}
    with_job = c.add_node("f-job", extra={"rendezvous": dict(follow, endpoint="127.0.0.1:%d" % free_port())})
    spare = c.add_node("f-spare", job_in_config=False,
                       extra={"rendezvous": dict(follow, endpoint="127.0.0.1:%d" % free_port())})
    t0 = time.time()
    c.node_start(with_job)
    c.node_start(spare)
    codes = c.wait_all(60, [with_job, spare])
    took = time.time() - t0
    done = (r"job etcd-job \(%s\) completed its %d steps at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC "
            r"\(coord/state in etcd says so\)" % (job_hash, STEPS))
    said_job = grep(with_job, r"following, but %s and no coordinator holds "
                              r"/mtnlg/etcd-c1/coord/leader: nothing to follow" % done)
    waited = grep(spare, r"no coordinator, and %s: waiting up to 3 s for another job's "
                         r"coordinator to be elected" % done)
    said_spare = grep(spare, r"%s, and no coordinator was elected in the 3 s since: nothing to "
                             r"follow \(started again, this node joins the next job under "
                             r"rendezvous.etcd_prefix /mtnlg/etcd-c1/\)" % done)
    ok = (codes == [0, 0] and said_job and waited and said_spare
          and not grep(with_job, r"another job's coordinator")
          and etcd.get("/mtnlg/etcd-c1/coord/leader") is None)
    fails += check(name, ok, "exit %s after %.1f s; the follower with the job said so %s, the "
                   "spare waited %s and said so %s%s"
                   % (codes, took, bool(said_job), bool(waited), bool(said_spare),
                      "" if ok else "\n" + with_job.stderr()[-1500:] + spare.stderr()[-1500:]))
    # the job given more steps is another job (its hash): it runs, from
    # the completed one's last checkpoint
    name = "test_the_completed_job_given_more_steps_runs"
    c.job_sets = ["train.steps=%d" % (STEPS + 2)]
    pair = c.nodes[1:3]
    for n in pair:
        c.node_start(n)
    codes = c.wait_all(120, pair)
    another = [re.search(r"etcd: coord/state says job etcd-job \(%s\) completed under this "
                         r"prefix at [^;]*; this is job etcd-job \(([0-9a-f]{16})\), another: it "
                         r"runs, with a restart budget of its own" % job_hash, n.stderr())
               for n in pair]
    elected = [m for m in another if m]
    new_hash = elected[0].group(1) if len(elected) == 1 else None
    ran = next((n.steps() for n in pair if n.steps()), [])
    after = json.loads(etcd.get(state_key) or "{}").get("completed") or {}
    ok = (codes == [0, 0] and new_hash and new_hash != job_hash
          and [s["step"] for s in ran] == [STEPS + 1, STEPS + 2]
          and after.get("job") == new_hash and after.get("step") == STEPS + 2)
    return fails + check(name, ok, "exit %s; the elected node said so: %s (job %s); steps %s; "
                         "coord/state then %r%s" % (
                             codes, [bool(m) for m in another], new_hash,
                             [s["step"] for s in ran], after, "" if ok else "\n" + c.logs(20)))


def kill_the_elected_after(c, job_name, step):
    """Starts n0 (elected: it is first) and then n1 of a two-node cluster,
    and SIGKILLs n0 once it trained step."""
    n0, n1 = c.nodes
    c.node_start(n0)
    c.wait_for(lambda: grep(n0, r"elected coordinator of job %s" % job_name), 60, "n0 elected")
    c.node_start(n1)
    c.wait_for(lambda: last_step(n0) >= step, 120, "step %d" % step)
    n0.signal(signal.SIGKILL)
    n0.wait(10)


def test_budget_spans_coordinators(mtnlgd, tmp, tokens, etcd):
    """rendezvous.max_restarts = 0: the coordinator's node lost, the node
    elected in its place ends the job rather than re-forming it on a budget
    of its own."""
    name = "test_a_lost_coordinator_spends_the_restart_budget"
    c = two_node_job(mtnlgd, tmp, tokens, etcd, "etcd-budget", 100000, 1)
    for n in c.nodes:
        add_conf(n, "rendezvous", "max_restarts", 0)
    n0, n1 = c.nodes
    try:
        kill_the_elected_after(c, "etcd-budget", 3)
        first = c.wait_all(60, [n1])
        c.node_start(n1)  # systemd's restart: n1 is elected
        second = c.wait_all(60, [n1])
        said = grep(n1, r"coordinator: generation 1 ended: the coordinator n0 was lost \(its lease "
                        r"on coord/leader in etcd lapsed\); not re-forming: the restart budget is "
                        r"spent \(0 of 0 restart\(s\) used, rendezvous\.max_restarts\); exit 2")
        # it trained nothing in this start, but it ended the job as its
        # coordinator: exit 2, so its systemd unit says the job failed (and
        # is not started again)
        ok = first == [1] and second == [2] and said
        return check(name, ok, "n1 exit %s after n0's loss, %s once elected; budget named %s%s"
                     % (first, second, bool(said), "" if ok else "\n" + c.logs(20)))
    finally:
        c.kill_all()


def test_a_lapsed_lease_is_taken_again(mtnlgd, tmp, tokens, etcd):
    """One node (dp 1) elected coordinator is cut off from etcd (its
    members reached through forwarders the test cuts) for 2 s past its
    lease, while etcd keeps its quorum: etcd lets the lease lapse and
    deletes coord/leader. Reached again, the node finds its lease gone and
    nobody else holding the key, takes it again under a new lease with the
    same term and endpoint, and the job goes on in generation 1 to its
    end."""
    name = "test_a_coordinator_whose_lease_lapsed_takes_the_key_again"
    job = tiny_job(os.path.join(tmp, "etcd-lapse.json"), tokens, "etcd-lapse", 300,
                   parallel={"tp": 2, "pp": 1, "dp_min": 1, "dp_max": 1, "micro_batch": 2})
    cut = Cut(etcd)
    c = etcd_cluster(mtnlgd, tmp, "etcd-lapse", job, etcd, nodes=1, endpoints=cut.endpoints)
    n0 = c.nodes[0]
    key = "/mtnlg/etcd-lapse/coord/leader"
    try:
        c.node_start(n0)
        c.wait_for(lambda: last_step(n0) >= 3, 120, "step 3")
        held = etcd.get(key)
        cut.cut()
        at_cut = last_step(n0)
        time.sleep(TIMEOUT_MS / 1000 + 2)
        gone = etcd.get(key)
        during = last_step(n0) - at_cut
        cut.mend()
        c.wait_for(lambda: etcd.get(key) is not None, 30, "coord/leader again")
        again = etcd.get(key)
        codes = c.wait_all(120, [n0])
        said = grep(n0, r"etcd: this node's lease on coord/leader lapsed \(etcd did not answer "
                        r"for longer than it\): no other node took the key, so the term goes on "
                        r"under a new lease")
        warned = grep(n0, r"etcd does not answer \(.*\): the generation goes on") and grep(
            n0, r"etcd answers again")
        steps = [s["step"] for s in n0.steps()]
        ok = (held and gone is None and again == held and codes == [0] and said and warned
              and during > 0 and steps == list(range(1, 301))
              and not grep(n0, r"generation 2|coordinator lost"))
        return check(name, ok, "coord/leader %r, after %.0f s cut off %r, then %r; %d steps "
                     "meanwhile; exit %s; the retake logged %s, the outage %s; steps %s..%s "
                     "(%d)%s" % (held, TIMEOUT_MS / 1000 + 2, gone, again, during, codes,
                                 bool(said), bool(warned), steps[:1], steps[-1:], len(steps),
                                 "" if ok else "\n" + c.logs(30)))
    finally:
        cut.cut()
        c.kill_all()


def test_a_coordinator_restarted_at_once(mtnlgd, tmp, tokens, etcd):
    """The coordinator's daemon SIGKILLed and started again at once (as
    systemd does a crashed daemon, its node still up): its old term's lease
    still holds coord/leader for up to 4 s, but the key names this node's
    own endpoint where nothing listens, so the new daemon deletes it and is
    elected again at once, counting the loss as a restart; the other node
    finds another coordinator elected, exits 1, is started again and the job
    resumes from its checkpoint to the end."""
    name = "test_a_coordinator_restarted_at_once_does_not_wait_out_its_old_lease"
    c = two_node_job(mtnlgd, tmp, tokens, etcd, "etcd-again", 40, 1)
    n0, n1 = c.nodes
    try:
        kill_the_elected_after(c, "etcd-again", 7)
        time.sleep(0.5)
        t_start = time.time()
        c.node_start(n0)  # systemd's restart
        c.wait_for(lambda: grep(n0, r"elected coordinator of job etcd-again"), 60,
                   "n0 elected again")
        elected_after = n0.log_time(r"elected coordinator of job etcd-again") - t_start
        first = c.wait_all(60, [n1])
        c.node_start(n1)  # systemd's restart
        codes = c.wait_all(120, [n0, n1])
        deposed = grep(n0, r"etcd: coord/leader names term [0-9a-f]{16} on this node's endpoint "
                           r"127\.0\.0\.1:%d, where nothing listens: an earlier start of this "
                           r"daemon, gone; its key deleted rather than waiting out its lease"
                       % n0.endpoint_port)
        counted = grep(n0, r"elected coordinator of job etcd-again \(term [0-9a-f]{16}, lease 4 "
                           r"s\): the coordinator n0 was lost")
        m = re.search(r"resumed from \S+: step (\d+)", n0.stderr() + n1.stderr())
        ran = next((n.steps() for n in (n0, n1) if n.steps()), [])
        ok = (deposed and counted and elected_after < 3.0 and first == [1]
              and codes == [0, 0] and m and ran and ran[-1]["step"] == 40)
        return check(name, ok, "deposed its old term %s, elected %.2f s after its start (the "
                     "lease is 4 s), the loss counted %s; n1 exit %s, then %s; resumed from "
                     "step %s, last step %s%s" % (
                         bool(deposed), elected_after, bool(counted), first, codes,
                         m.group(1) if m else None, ran[-1]["step"] if ran else None,
                         "" if ok else "\n" + c.logs(20)))
    finally:
        c.kill_all()


def test_a_resize_holds_under_the_next_coordinator(mtnlgd, tmp, tokens, etcd, mtnlgctl):
    """A job of dp_min = dp_max = 2 on two one-slot nodes, resized to dp 1
    by the operator: coord/state in etcd says so (dp_resized 1); the
    coordinator's node SIGKILLed and both daemons started again, the node
    elected (either) forms dp 1 with the other a spare, as the operator left it
    (before: dp 2, the job's bounds, undoing the resize), and says why."""
    name = "test_a_resize_holds_under_the_next_coordinator"
    c = two_node_job(mtnlgd, tmp, tokens, etcd, "etcd-resized", 100000, 2)
    n0, n1 = c.nodes
    state_key = "/mtnlg/etcd-resized/coord/state"

    def ctl(*args):
        return subprocess.run([mtnlgctl, "-e", "%s,%s" % (n1.url(), n0.url()), "--token-file",
                               c.token_file] + list(args), capture_output=True, text=True,
                              timeout=120)
    try:
        c.node_start(n0)
        c.wait_for(lambda: grep(n0, r"elected coordinator of job etcd-resized"), 60, "n0 elected")
        c.node_start(n1)
        c.wait_for(lambda: last_step(n0) >= 2, 120, "step 2 at dp 2")
        rz = ctl("resize", "--dp", "1", "--wait")
        c.wait_for(lambda: json.loads(etcd.get(state_key) or "{}").get("dp_resized") == 1, 30,
                   "dp_resized 1 in coord/state")
        saved = json.loads(etcd.get(state_key) or "{}")
        n0.signal(signal.SIGKILL)
        n0.wait(10)
        lost = c.wait_all(60, [n1])
        c.node_start(n0)  # systemd's restarts
        c.node_start(n1)
        # either is elected (n0 deposes its old term's key, n1 may campaign first)
        c.wait_for(lambda: any(grep(n, r"coordinator: generation 1 formed \(restart")
                               for n in (n0, n1)), 60, "a generation under the next coordinator")
        st = {}

        def shown():
            st.update(json.loads(ctl("-o", "json", "status").stdout or "{}").get("job") or {})
            return st.get("dp") == 1
        c.wait_for(shown, 30, "the status at dp 1")
        stop = ctl("stop", "--wait")
        codes = c.wait_all(60, [n0, n1])
        said = any(grep(n, r"etcd: the job was resized to dp 1 under the coordinator before: "
                           r"that width holds") for n in (n0, n1))
        formed = re.search(r"generation 1 formed \(restart 1 of \d+\): tp 2 x pp 1 x dp (\d+)",
                           n0.stderr() + n1.stderr())
        ok = (rz.returncode == 0 and saved.get("dp_resized") == 1 and lost == [1] and said
              and formed and formed.group(1) == "1" and st.get("dp_resized") == 1
              and stop.returncode == 0 and codes == [0, 0])
        return check(name, ok, "resize exit %d; coord/state %r; n1 exit %s; the new coordinator "
                     "said so %s, formed dp %s; status dp %s (dp_resized %s); stop exit %d, "
                     "exit %s%s" % (rz.returncode, saved, lost, bool(said),
                                    formed and formed.group(1), st.get("dp"),
                                    st.get("dp_resized"), stop.returncode, codes,
                                    "" if ok else "\n" + rz.stdout + rz.stderr + c.logs(20)))
    finally:
        c.kill_all()


def test_etcd_over_tls(mtnlgd, tmp, tokens, etcd):
    """One etcd member serving https:// that asks for a client certificate
    (--client-cert-auth; tests/cluster/tls/etcd-*): a node given the CA,
    its certificate and key (rendezvous.etcd_cacert, etcd_cert, etcd_key)
    is elected and runs the job to its end; one without a certificate exits
    2 at once, naming TLS and the keys to set."""
    name = "test_a_node_reaches_etcd_over_tls_with_its_client_certificate"
    tls = os.path.join(HERE, "tls")
    ca, cert, key = (os.path.join(tls, f) for f in ("etcd-ca.pem", "etcd-client.pem",
                                                     "etcd-client.key"))
    d = os.path.join(tmp, "etcd-tls")
    os.makedirs(d)
    client, peer = free_port(), free_port()
    url, peer_url = "https://127.0.0.1:%d" % client, "http://127.0.0.1:%d" % peer
    with open(os.path.join(d, "etcd.log"), "w") as log:
        member = subprocess.Popen(
            [etcd.binary, "--name", "tls", "--data-dir", os.path.join(d, "data"),
             "--listen-client-urls", url, "--advertise-client-urls", url,
             "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
             "--initial-cluster", "tls=" + peer_url, "--cert-file",
             os.path.join(tls, "etcd-server.pem"), "--key-file",
             os.path.join(tls, "etcd-server.key"), "--trusted-ca-file", ca,
             "--client-cert-auth", "--logger", "zap", "--log-outputs", "stderr",
             "--log-level", "error"], stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    job = tiny_job(os.path.join(tmp, "etcd-tls.json"), tokens, "etcd-tls", 8,
                   parallel={"tp": 2, "pp": 1, "dp_min": 1, "dp_max": 1, "micro_batch": 2})
    c = elected_cluster(mtnlgd, os.path.join(d, "cluster"), job, url, nodes=1,
                        heartbeat_ms=HB_MS, timeout_ms=TIMEOUT_MS, extra={"rendezvous": {
                            "etcd_cacert": ca, "etcd_cert": cert, "etcd_key": key}})
    n0 = c.nodes[0]
    try:
        c.node_start(n0)
        codes = c.wait_all(120, [n0])
        elected = grep(n0, r"etcd\(%s\): elected coordinator of job etcd-tls" % re.escape(url))
        steps = [s["step"] for s in n0.steps()]
        t0 = time.time()
        p = run_refused(mtnlgd, ["rendezvous.etcd=" + url, "rendezvous.etcd_cacert=" + ca,
                                 "rendezvous.endpoint=127.0.0.1:%d" % free_port()], d, job)
        took = time.time() - t0
        refused = (p.returncode == 2 and "TLS refused" in p.stderr
                   and "rendezvous.etcd_cert and etcd_key" in p.stderr and took < 10)
        ok = codes == [0] and elected and steps == list(range(1, 9)) and refused
        return check(name, ok, "with its certificate: exit %s, elected %s, steps %s; without: "
                     "exit %d after %.1f s: %s%s" % (
                         codes, bool(elected), steps, p.returncode, took,
                         p.stderr.strip().splitlines()[-1:] if p.stderr else "",
                         "" if ok else "\n" + c.logs(20)))
    finally:
        c.kill_all()
        member.kill()
        member.wait()


def add_conf(node, section, key, value):
    """Sets one more key in a node's config file (before it starts)."""
    with open(node.conf) as f:
        text = f.read()
    text = text.replace("[%s]\n" % section, "[%s]\n%s = %s\n" % (section, key, value), 1)
    with open(node.conf, "w") as f:
        f.write(text)


def run_refused(mtnlgd, conf_sets, tmp, job):
    conf = os.path.join(tmp, "refused.conf")
    with open(conf, "w") as f:
        f.write("[node]\nname = r0\ndevices = cpu:1\n[job]\npath = %s\n[paths]\nstate_dir = %s\n"
                "[control]\nlisten = 127.0.0.1:%d\n"
                % (job, os.path.join(tmp, "refused.state"), free_port()))
    args = [mtnlgd, "--config", conf]
    for s in conf_sets:
        args += ["--set", s]
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def test_a_config_that_cannot_use_etcd_is_refused(mtnlgd, tmp, tokens, etcd):
    job = tiny_job(os.path.join(tmp, "refused.json"), tokens, "refused", 4)
    r = run_refused(mtnlgd, ["rendezvous.etcd=" + etcd.endpoints, "rendezvous.endpoint=0.0.0.0:4",
                             "rendezvous.etcd_prefix=/mtnlg", "rendezvous.etcd_user=trainer"],
                    tmp, job)
    said = [bool(re.search(p, r.stderr)) for p in (
        r"rendezvous\.endpoint: \"0\.0\.0\.0:4\": with rendezvous\.etcd, the address this node "
        r"hosts the store on when it is elected, which the others dial",
        r"rendezvous\.etcd_prefix: \"/mtnlg\": must end with '/'",
        r"rendezvous\.etcd_user is set but rendezvous\.etcd_password_file is not")]
    ok = r.returncode == 2 and all(said)
    return check(name="test_a_config_that_cannot_use_etcd_is_refused", ok=ok,
                 detail="exit %s, named %s\n%s" % (r.returncode, said, r.stderr[-1500:]))


def test_no_etcd_is_waited_for(mtnlgd, tmp, tokens, etcd):
    job = tiny_job(os.path.join(tmp, "noetcd.json"), tokens, "noetcd", 4)
    eps = "http://127.0.0.1:%d,127.0.0.1:%d" % (free_port(), free_port())
    t0 = time.time()
    r = run_refused(mtnlgd, ["rendezvous.etcd=" + eps, "rendezvous.join_timeout_s=3",
                             "cluster.heartbeat_interval_ms=200"], tmp, job)
    took = time.time() - t0
    waiting = re.search(r"etcd\(%s\): waiting for etcd: store\(etcd [^)]*\): reach the cluster: "
                        r"no member answered" % re.escape(eps), r.stderr)
    gave_up = re.search(r"the rendezvous in etcd\(\S+\): still waiting for etcd: .* after 3 s",
                        r.stderr)
    ok = r.returncode == 1 and waiting and gave_up and 3 <= took < 20
    return check("test_no_etcd_is_waited_for_then_exit_1", ok,
                 "exit %s after %.1f s, waiting logged %s, gave up logged %s\n%s"
                 % (r.returncode, took, bool(waiting), bool(gave_up), r.stderr[-1500:]))


def main():
    mtnlgd, etcd_bin, source_root, mtnlgctl = sys.argv[1:5]
    validate = status_contract(source_root)
    if not shutil.which(etcd_bin) and not os.access(etcd_bin, os.X_OK):
        print("no etcd at %s: install Debian's etcd-server (tools/test does)" % etcd_bin)
        sys.exit(1)
    fails, took = 0, []
    with tempfile.TemporaryDirectory() as tmp:
        tokens = license_tokens(os.path.join(tmp, "tokens.u16"))
        etcd = Etcd(etcd_bin, tmp)
        try:
            etcd.start_all()
            for fn, *extra in ((test_a_config_that_cannot_use_etcd_is_refused,),
                               (test_etcd_over_tls,),
                               (test_no_etcd_is_waited_for,),
                               (test_losing_the_coordinators_node, mtnlgctl, validate),
                               (test_budget_spans_coordinators,),
                               (test_a_lapsed_lease_is_taken_again,),
                               (test_a_coordinator_restarted_at_once,),
                               (test_a_resize_holds_under_the_next_coordinator, mtnlgctl)):
                t0 = time.time()
                try:
                    fails += fn(mtnlgd, tmp, tokens, etcd, *extra)
                except Exception:
                    fails += check(fn.__name__, False, traceback.format_exc())
                took.append("%s %.1f" % (fn.__name__[len("test_"):], time.time() - t0))
        finally:
            etcd.stop()
    print("# seconds: %s" % ", ".join(took))
    print("%d failure(s)" % fails)
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
