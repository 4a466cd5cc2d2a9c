"""A lost node: the coordinator re-forms the cluster from the last checkpoint.

usage: test_recovery_cluster.py MTNLGD SOURCE_ROOT FAULT_PRELOAD

Daemons on loopback (tools/local_cluster.py), cpu:2 each, tp 2 x pp 2 of a
4-layer tiny model, heartbeat timeout 2 s:
- test_sigkill_of_a_member_reforms_onto_the_spare_from_the_last_checkpoint:
  5 daemons, dp 2 (n0..n3) and the spare n4, a checkpoint every 4 steps;
  n2 is SIGKILLed past step 6. The survivors do not exit: generation 1 ends
  on every node naming n2 and "restart 1 of 3", generation 2 forms with n4
  in n2's place, its ranks resume from the newest committed checkpoint (the
  first step of generation 2 is that checkpoint's step + 1), /v1/status
  shows generation 2 and restarts 1 (checked against proto/control-v1.yaml)
  and last_restart names n2's loss (and the step resumed from, once known),
  and the job completes its 24 steps: every survivor exits 0, and every loss
  printed, before and after the restart, is that of an uninterrupted
  `mtnlgd --standalone` run of the same job.
- test_restarted_node_rejoins_and_the_job_starts_again_from_step_0: 2
  daemons (the whole dp 1), no checkpoint.dir; n1 is SIGKILLed and started
  again under its name: it rejoins while the coordinator waits for enough
  nodes, generation 2 forms with it, world rank 0's node says training
  restarts from step 0, and the job completes with the same losses for the
  steps trained twice; both exit 0.
- test_node_restarted_at_once_waits_for_its_old_entry: as the previous, but n1
  is started again at once, while the coordinator still counts the dead one:
  it is turned away for now, keeps silent until the old entry is declared
  lost (generation 1 ends naming n1, one restart spent), joins again, and
  both exit 0.
- test_coordinator_restarted_at_once_is_noticed: 2 daemons, heartbeat
  timeout 6 s; n0, which hosts the store and coordinates, is SIGKILLed and
  started again at once: n1's store client reconnects to the new, empty
  store without an error, and n1 finds coord/instance changed, says the
  coordinator restarted, and exits 1 (systemd would start it again, to join
  the new coordinator). Before, it waited with no deadline for the end of a
  generation the new store never had.
- test_too_few_nodes_left_ends_the_job_after_reform_timeout: 2 daemons
  (the whole dp 1), no checkpoint.dir, rendezvous.reform_timeout_s = 1; n1
  is SIGKILLed: generation 1 ends "re-forming from step 0", and about a
  second later the job ends failed, naming what was missing; n0 exits 1.
- test_stalled_member_comes_back_as_a_spare_and_is_placed_after_the_next_failure:
  5 daemons as in the first case (a job of many steps), cluster.comm_timeout_ms
  10 s; n2 is SIGSTOPped past step 6: generation 2 forms with the spare n4 and
  resumes from the checkpoint; n2 is SIGCONTed: the coordinator logs it back,
  its nodes list (on n0 and n1) shows it role spare, state spare, and training
  goes on; n3 is then SIGKILLed: generation 3 forms with n2 in n3's place
  (restart 2 of 3), resuming from the newest checkpoint, and n2 trains in it.
  SIGTERM to n0 stops the job: every survivor exits 0, and every step's loss
  is the same each time it was trained. The wait for n2's ranks stuck in a
  collective of the ended generation (comm_timeout_ms) may add up to 10 s.
- test_stalled_node_coming_back_lets_the_cluster_waiting_for_nodes_reform:
  2 daemons (the whole dp 1), no checkpoint.dir; n1 is SIGSTOPped until
  generation 1 ends, then SIGCONTed while the coordinator waits for enough
  nodes: generation 2 forms with it and the job completes; both exit 0.
- test_node_that_lost_a_device_exits_to_be_restarted_and_the_job_goes_on:
  6 daemons, n0..n3 the members and n4, n5 spares; n3 runs with
  MTNLG_TEST_DEVICE_LOST=cpu:1 (it takes that device for one a fault took
  from its process, as mt_device_lost finds a GPU's lost context). n2 is
  SIGKILLed past step 6: n3's ranks fail on their peer, n3 finds its device
  lost, says so, and exits 1 (systemd would start it again); the others
  re-form without n2 and n3 and finish the job, exiting 0.
- test_paused_job_lost_a_node_and_reformed_paused: 2 daemons (the whole dp
  1), no checkpoint.dir, a control token; paused through n0, then n1 is
  SIGKILLed and started again: generation 2 forms paused (its ranks are
  held before their first step: for 2 s no step is printed and the status
  says paused), and a resume lets the job finish; both exit 0. A re-formed
  generation used to train on, the operator's pause forgotten.
- test_stop_that_meets_a_stalled_node_is_not_restarted: 2 daemons, a control
  token; n1 is SIGSTOPped and a stop is posted to n0 at once: the job ends
  failed and n0 (the coordinator) exits 2, so systemd does not start it
  again; it exited 1 and was restarted, the stop undone. n1, back after
  SIGCONT, exits too.
- test_sigterm_stop_that_meets_a_lost_node_ends_the_job: 3 daemons with
  cpu:1 at dp 3 (dp_min 3); n2 gets SIGTERM (systemctl stop) and its stop's
  save is held in its shard write (fault_preload) while n1 is SIGKILLed: the
  generation fails, and the job ends, as a stop that meets a lost node
  does (n0 exits 2, naming n2's signal), where the coordinator knew only of
  stops ordered through it and re-formed without n2 to train on;
- test_coordinator_whose_ranks_are_stuck_stays_and_the_cluster_reforms: 4
  daemons with cpu:1 (dp 3 and a spare); n0, which hosts the store and
  coordinates, has its rank's checkpoint writes held (fault_preload) when
  another member is SIGKILLed, so its rank cannot stop: it stays, quiet, is declared lost
  and the others re-form and train; once the writes go on, its rank stops
  and it is back in the cluster. It used to exit "without them" past the
  grace, taking the store down and every node with it;
- test_member_lost_after_it_finished_does_not_end_the_generation: 2 daemons,
  tp 2 x pp 1 x dp 2 (n0 replica 0, n1 replica 1), checkpoint.export to one
  file, which world rank 0 writes alone after the last step; n0 runs with
  tests/common/fault_preload.c holding the export's fsync until the test
  lets it go. n1 finishes and reports done (the status says stopping), is
  SIGKILLed and declared lost: the coordinator logs it as lost after it
  finished, not a failure, the nodes list shows n1 lost and the state stays
  stopping in generation 1 with no restart; let go, the export completes,
  the job ends "completed" and n0 exits 0. A finished member's loss used to
  end the generation, abort the export and, with too few nodes left, fail
  the job.
"""
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tools"))
from local_cluster import (LocalCluster, last_step, grep, check, license_tokens,  # noqa: E402
                           post, status, status_contract, tiny_job)

HB_MS, TIMEOUT_MS = 200, 2000
STEPS, INTERVAL = 24, 4


def members_then_spare(c, n0, spare):
    """Starts the first four nodes, then the spare (so that n0..n3 are the
    members of generation 1), and waits for step 6."""
    for n in c.nodes[:4]:
        c.node_start(n)
    c.wait_for(lambda: grep(n0, r"generation 1 formed"), 60, "generation 1")
    c.node_start(spare)
    c.wait_for(lambda: last_step(n0) >= 6, 120, "step 6")


def test_sigkill_of_a_member_reforms_onto_the_spare(mtnlgd, tmp, tokens, validate):
    ck = os.path.join(tmp, "ckpt")
    job = tiny_job(os.path.join(tmp, "recover.json"), tokens, "recover", STEPS,
                   checkpoint={"dir": ck, "interval": INTERVAL})
    one = subprocess.run([mtnlgd, "--standalone", job, "--log-format", "json",
                          "--set", "checkpoint.dir=" + os.path.join(tmp, "refck")],
                         capture_output=True, text=True, timeout=300)
    ref = {json.loads(l)["step"]: json.loads(l)["loss"]
           for l in one.stdout.splitlines() if l.startswith("{")}
    c = LocalCluster(mtnlgd, os.path.join(tmp, "c1"), job, nodes=5,
                     heartbeat_ms=HB_MS, timeout_ms=TIMEOUT_MS)
    n0, victim, spare = c.nodes[0], c.nodes[2], c.nodes[4]
    survivors = [n for n in c.nodes if n is not victim]
    try:
        members_then_spare(c, n0, spare)
        killed_after = last_step(n0)
        victim.signal(signal.SIGKILL)
        victim.wait(10)
        c.wait_for(lambda: last_step(spare) > 0, 60, "a step of generation 2")
        st = status(spare)
        st_errors = validate(st)
        # last_restart keeps why once generation 2 runs; the step it resumed
        # from comes with a member's next status (the job may end first)
        lr = st.get("last_restart") or {}
        for _ in range(40):
            if lr.get("resumed_from_step") is not None:
                break
            time.sleep(0.1)
            try:
                lr = status(spare).get("last_restart") or {}
            except OSError:
                break
        alive = [n.running() for n in survivors]
        codes = c.wait_all(240, survivors)

        ended = [bool(grep(n, r"generation 1 ended: node n2 lost \(no heartbeat for [0-9.]+ s, "
                              r"ranks \[4, 6\)\); re-forming from the last checkpoint, "
                              r"restart 1 of 3")) for n in survivors]
        formed = grep(n0, r"coordinator: generation 2 formed \(restart 1 of 3\): tp 2 x pp 2 x "
                          r"dp 2 = 8 ranks on 4 node\(s\): n0 \[0,2\), n1 \[2,4\), n3 \[4,6\), "
                          r"n4 \[6,8\); 0 spare\(s\)")
        m = re.search(r"resumed from \S+: step (\d+)", n0.stderr())
        resumed = int(m.group(1)) if m else None
        said = grep(n0, r"generation 2 \(restart 1\): resuming from the latest "
                        r"checkpoint in \S+ \(step %s\)" % resumed)
        steps0 = [s["step"] for s in n0.steps()]
        k = next((i for i in range(1, len(steps0)) if steps0[i] <= steps0[i - 1]), None)
        before, after = (steps0[:k], steps0[k:]) if k else (steps0, [])
        # the newest checkpoint committed when n2 died: the last multiple of the
        # interval n0 got past, or the one before when it died saving that one
        last = before[-1] if before else 0
        newest = [last // INTERVAL * INTERVAL] + ([last - INTERVAL] if last % INTERVAL == 0 else [])
        spare_first = spare.steps()[0]["step"] if spare.steps() else None
        got = [(s["step"], s["loss"]) for n in survivors for s in n.steps()]
        exact = len(ref) == STEPS and all(ref.get(s) == l for s, l in got)
        ok = (alive == [True] * 4 and codes == [0] * 4 and all(ended) and formed
              and resumed is not None and resumed >= INTERVAL and resumed in newest and said
              and before == list(range(1, last + 1)) and last >= killed_after
              and after == list(range(resumed + 1, STEPS + 1)) and spare_first == resumed + 1
              and st["generation"] == 2 and st["restarts"] == 1 and not st_errors and exact
              and lr.get("generation") == 2
              and (lr.get("reason") or "").startswith("node n2 lost (no heartbeat for")
              and lr.get("resumed_from_step") in (None, resumed))
        return check("test_sigkill_of_a_member_reforms_onto_the_spare_from_the_last_checkpoint",
                     ok, "killed n2 after step %d; survivors alive after the kill %s, exit codes %s; "
                     "end logged %s, generation 2 formed %s; resumed from step %s (newest "
                     "checkpoint then %s), n0 ran steps 1..%d then %s..%s, the spare from %s; "
                     "status generation %s restarts %s %s, last_restart %s; losses equal the "
                     "standalone run's: %s%s"
                     % (killed_after, alive, codes, ended, formed, resumed, newest, last,
                        after[:1], after[-1:], spare_first, st.get("generation"),
                        st.get("restarts"), st_errors, lr, exact,
                        "" if ok else "\n" + c.logs(30)))
    finally:
        c.kill_all()


def test_node_that_lost_a_device_exits_to_restart(mtnlgd, tmp, tokens):
    ck = os.path.join(tmp, "ckpt-lost")
    job = tiny_job(os.path.join(tmp, "lost.json"), tokens, "lost", STEPS,
                   checkpoint={"dir": ck, "interval": INTERVAL})
    c = LocalCluster(mtnlgd, os.path.join(tmp, "c-lost"), job, nodes=6,
                     heartbeat_ms=HB_MS, timeout_ms=TIMEOUT_MS)
    n0, victim, loser = c.nodes[0], c.nodes[2], c.nodes[3]
    others = [n0, c.nodes[1], c.nodes[4], c.nodes[5]]
    try:
        for n in c.nodes[:4]:
            c.node_start(n, {"MTNLG_TEST_DEVICE_LOST": "cpu:1"} if n is loser else None)
        c.wait_for(lambda: grep(n0, r"generation 1 formed"), 60, "generation 1")
        for n in c.nodes[4:]:
            c.node_start(n)
        c.wait_for(lambda: last_step(n0) >= 6, 120, "step 6")
        victim.signal(signal.SIGKILL)
        victim.wait(10)
        try:
            loser_code = loser.wait(60)
        except subprocess.TimeoutExpired:
            loser_code = None
        codes = c.wait_all(240, others)
        said = grep(loser, r"this process has lost cpu:1: lost for a test "
                           r"\(MTNLG_TEST_DEVICE_LOST\); reporting the failure, leaving the "
                           r"cluster and exiting 1")
        last = [last_step(n) for n in others]
        ok = loser_code == 1 and said and codes == [0] * 4 and STEPS in last
        return check("test_node_that_lost_a_device_exits_to_be_restarted_and_the_job_goes_on", ok,
                     "n2 killed; n3 (its cpu:1 taken for lost) exited %s, said so %s; n0, n1, "
                     "n4, n5 exited %s at steps %s%s"
                     % (loser_code, said, codes, last, "" if ok else "\n" + c.logs(30)))
    finally:
        c.kill_all()


def roles(node):
    """name -> (role, state) in the nodes list of the node's /v1/status."""
    return {n["name"]: (n["role"], n["state"]) for n in status(node)["nodes"]}


def losses_agree(nodes):
    """Every step's loss is the same each time and wherever it was printed
    (a step trained again after a restart, on the same layout, gives the
    same bits); the steps seen."""
    seen = {}
    for n in nodes:
        for s in n.steps():
            if seen.setdefault(s["step"], s["loss"]) != s["loss"]:
                return False, sorted(seen)
    return True, sorted(seen)


def runs(steps):
    """A node's printed steps cut where they go back (a restart): the runs."""
    out = []
    for s in steps:
        if not out or s <= out[-1][-1]:
            out.append([])
        out[-1].append(s)
    return out


def test_stalled_member_comes_back(mtnlgd, tmp, tokens, validate):
    name = "test_stalled_member_comes_back_as_a_spare_and_is_placed_after_the_next_failure"
    job = tiny_job(os.path.join(tmp, "stall.json"), tokens, "stall", 100000,
                   checkpoint={"dir": os.path.join(tmp, "stallck"), "interval": INTERVAL})
    # comm_timeout_ms bounds how long the stalled node waits for a rank of its
    # own left in a collective of the ended generation before it is back
    c = LocalCluster(mtnlgd, os.path.join(tmp, "stall"), job, nodes=5, heartbeat_ms=HB_MS,
                     timeout_ms=TIMEOUT_MS, extra={"cluster": {"comm_timeout_ms": 10000},
                                                   "rendezvous": {"reform_timeout_s": 20}})
    n0, n1, stalled, victim, spare = c.nodes
    survivors = [n0, n1, stalled, spare]
    try:
        members_then_spare(c, n0, spare)
        stalled.signal(signal.SIGSTOP)
        c.wait_for(lambda: grep(n0, r"coordinator: generation 2 formed") and last_step(spare) > 0,
                   60, "a step of generation 2 without the stalled node")
        stalled.signal(signal.SIGCONT)
        # every control plane shows the coordinator's list, each a fetch behind
        views = (n0, n1, stalled)
        c.wait_for(lambda: all(roles(n).get("n2") == ("spare", "spare") for n in views), 20,
                   "n2 listed as a spare after SIGCONT")
        st = status(stalled)
        st_errors = validate(st)
        listed = [roles(n).get("n2") for n in views]
        at = last_step(n0)
        c.wait_for(lambda: last_step(n0) >= at + 2, 60, "two more steps with n2 back as a spare")
        before = len(stalled.steps())  # its steps of generation 1: a spare prints none
        victim.signal(signal.SIGKILL)
        victim.wait(10)
        c.wait_for(lambda: len(stalled.steps()) >= before + 2, 60, "n2's steps in generation 3")
        # a lost node is listed lost, not in the state it last reported (running)
        victim_listed = roles(n0).get("n3")
        n0.signal(signal.SIGTERM)  # the job stops at a step boundary; every survivor exits 0
        codes = c.wait_all(60, survivors)

        back = grep(n0, r"coordinator: node n2 is back after [0-9.]+ s: a spare")
        said = grep(stalled, r"generation 2 formed without this node: waiting as a spare")
        ended2 = grep(n0, r"coordinator: generation 2 ended: node n3 lost")
        formed3 = grep(n0, r"coordinator: generation 3 formed \(restart 2 of 3\): tp 2 x pp 2 x "
                           r"dp 2 = 8 ranks on 4 node\(s\): n0 \[0,2\), n1 \[2,4\), n2 \[4,6\), "
                           r"n4 \[6,8\); 0 spare\(s\)")
        # the generations n0 ran after its first, from its log: a generation
        # that resumes from the step the last one reached prints no step twice
        resumed = [int(x) for x in re.findall(r"resumed from \S+: step (\d+)", n0.stderr())]
        n_gens = 1 + len(resumed)
        again = [s["step"] for s in stalled.steps()[before:]]
        same, steps = losses_agree(survivors)
        ok = (listed == [("spare", "spare")] * 3 and st["generation"] == 2 and not st_errors
              and victim_listed == ("lost", "lost")
              and back and said and ended2 and formed3 and codes == [0] * 4
              and n_gens == 3 and all(r >= INTERVAL and r % INTERVAL == 0 for r in resumed)
              and again == list(range(resumed[-1] + 1, resumed[-1] + 1 + len(again)))
              and steps == list(range(1, steps[-1] + 1)) and same)
        return check(name, ok, "n2 listed %s after SIGCONT (status generation %s %s), back logged "
                     "%s, spare logged %s at step %d; n3 killed: listed %s, generation 2 end %s, "
                     "generation 3 with n2 %s; n0 ran %d generation(s) resuming from %s, n2 "
                     "steps %s..%s in the last; exit codes after SIGTERM %s; losses agree %s "
                     "over steps %s..%s%s"
                     % (listed, st.get("generation"), st_errors, back, said, at, victim_listed, ended2, formed3,
                        n_gens, resumed, again[:1], again[-1:], codes, same, steps[:1],
                        steps[-1:], "" if ok else "\n" + c.logs(30)))
    except AssertionError as e:  # a wait that ran out
        return check(name, False, str(e))
    finally:
        c.kill_all()


# The jobs that lose a node after step 3 and are then trained whole: long
# enough that the loss (the test's poll after step 3, then a signal) lands
# before the job's end on a machine of any speed (12 steps left 9 to spare)
SHORT_STEPS = 30


def two_nodes(mtnlgd, tmp, tokens, name, steps, extra=None, timeout_ms=TIMEOUT_MS):
    """The tiny model as one replica over two daemons (pp 2, tp 2), no
    checkpoints and no spare: losing either leaves too few slots."""
    job = tiny_job(os.path.join(tmp, name + ".json"), tokens, name, steps,
                   parallel={"tp": 2, "pp": 2, "dp_min": 1, "dp_max": 1, "micro_batch": 2})
    return LocalCluster(mtnlgd, os.path.join(tmp, name), job, nodes=2, heartbeat_ms=HB_MS,
                        timeout_ms=timeout_ms, extra=extra)


def test_restarted_node_rejoins(mtnlgd, tmp, tokens):
    c = two_nodes(mtnlgd, tmp, tokens, "rejoin", SHORT_STEPS)
    n0, n1 = c.nodes
    try:
        c.start()
        c.wait_for(lambda: last_step(n0) >= 3, 120, "step 3")
        n1.signal(signal.SIGKILL)
        n1.wait(10)
        c.wait_for(lambda: grep(n0, r"coordinator: generation 1 ended"), 30, "the end")
        c.node_start(n1)
        codes = c.wait_all(120)
        ended = grep(n0, r"generation 1 ended: node n1 lost \(.*\); re-forming from step 0 "
                         r"\(the job has no checkpoint.dir\), restart 1 of 3")
        said = grep(n0, r"generation 2 \(restart 1\): the job has no checkpoint.dir: training "
                        r"restarts from step 0")
        steps = [(s["step"], s["loss"]) for s in n0.steps()]
        k = next((i for i in range(1, len(steps)) if steps[i][0] <= steps[i - 1][0]), None)
        first, again = (steps[:k], steps[k:]) if k else (steps, [])
        ok = (codes == [0, 0] and ended and said and len(first) >= 3
              and [s for s, _ in again] == list(range(1, SHORT_STEPS + 1))
              and first == again[:len(first)])
        return check("test_restarted_node_rejoins_and_the_job_starts_again_from_step_0", ok,
                     "exit codes %s, end logged %s, step 0 logged %s; steps 1..%d, then %s..%s%s"
                     % (codes, ended, said, len(first), again[:1], again[-1:],
                        "" if ok else "\n" + c.logs(15)))
    finally:
        c.kill_all()


def test_node_restarted_at_once_waits_for_its_old_entry(mtnlgd, tmp, tokens):
    """systemd starts a crashed daemon again after RestartSec, which may come
    before the coordinator declared the dead one lost (a heartbeat timeout
    tuned longer). The new daemon, same name and host, is turned away for
    now, stays silent so that the old entry is declared lost, and joins
    again; before, it was refused as a duplicate and exited 2, which the
    unit does not restart."""
    # a timeout a loaded machine's daemon start (a second or two) stays well within
    c = two_nodes(mtnlgd, tmp, tokens, "restart-at-once", SHORT_STEPS, timeout_ms=6000)
    n0, n1 = c.nodes
    try:
        c.start()
        c.wait_for(lambda: last_step(n0) >= 3, 120, "step 3")
        n1.signal(signal.SIGKILL)
        n1.wait(10)
        c.node_start(n1)  # at once: the coordinator still counts the dead one
        codes = c.wait_all(120)
        away = grep(n1, r"the coordinator turned this node away for now: node n1 is still "
                        r"counted as the daemon of pid \d+ on .*; joining again in")
        again = grep(n1, r"joined 127\.0\.0\.1:\d+ again as join \d+")
        ended = grep(n0, r"generation 1 ended: node n1 lost")
        steps = [s["step"] for s in n0.steps()]
        ok = codes == [0, 0] and away and again and ended and steps[-1:] == [SHORT_STEPS]
        return check("test_node_restarted_at_once_waits_for_its_old_entry", ok,
                     "exit codes %s; turned away %s, joined again %s, generation 1 ended %s, "
                     "last step %s%s" % (codes, bool(away), bool(again), bool(ended), steps[-1:],
                                         "" if ok else "\n" + c.logs(15)))
    finally:
        c.kill_all()


def test_paused_job_reforms_paused(mtnlgd, tmp, tokens):
    token = "pause-token"
    # 40 steps: the pause lands some steps after step 3 (the poll, the
    # coordinator's tick), and must land before the job ends
    job = tiny_job(os.path.join(tmp, "paused.json"), tokens, "paused", 40,
                   parallel={"tp": 2, "pp": 2, "dp_min": 1, "dp_max": 1, "micro_batch": 2})
    c = LocalCluster(mtnlgd, os.path.join(tmp, "paused"), job, nodes=2, heartbeat_ms=HB_MS,
                     timeout_ms=TIMEOUT_MS, token=token)
    n0, n1 = c.nodes
    try:
        c.start()
        c.wait_for(lambda: last_step(n0) >= 3, 120, "step 3")
        paused = post(n0, "/v1/pause", token)
        c.wait_for(lambda: status(n0)["state"] == "paused", 30, "paused")
        n1.signal(signal.SIGKILL)
        n1.wait(10)
        c.wait_for(lambda: grep(n0, r"coordinator: generation 1 ended"), 30, "the end")
        c.node_start(n1)
        c.wait_for(lambda: grep(n0, r"generation 2 starts paused"), 60, "generation 2")
        before = len(n0.steps())
        time.sleep(2.0)
        held = len(n0.steps()) == before
        st = status(n0)
        resumed = post(n0, "/v1/resume", token)
        codes = c.wait_all(120)
        steps = [s["step"] for s in n0.steps()]
        ok = (paused == 202 and held and st["state"] == "paused" and st["generation"] == 2
              and resumed == 202 and codes == [0, 0] and steps[-40:] == list(range(1, 41)))
        return check("test_paused_job_lost_a_node_and_reformed_paused", ok,
                     "pause %s; generation %s state %s, no step in 2 s: %s; resume %s; exit codes "
                     "%s; steps %s%s" % (paused, st["generation"], st["state"], held, resumed,
                                         codes, steps, "" if ok else "\n" + c.logs(15)))
    finally:
        c.kill_all()


def test_stop_that_meets_a_stalled_node_is_not_restarted(mtnlgd, tmp, tokens):
    """An operator stops the job while a node hangs: the job ends failed (the
    stop could not finish) but the nodes exit 2, which the unit's
    RestartPreventExitStatus keeps down; exit 1 had systemd start them again
    and the job resume, undoing the stop. The hung node, back once the
    coordinator has gone, exits as a node that lost its coordinator does
    (1, or 2 if it still read the end): with no coordinator it resumes
    nothing."""
    token = "stop-token"
    job = tiny_job(os.path.join(tmp, "stopstall.json"), tokens, "stopstall", 100000,
                   parallel={"tp": 2, "pp": 2, "dp_min": 1, "dp_max": 1, "micro_batch": 2})
    c = LocalCluster(mtnlgd, os.path.join(tmp, "stopstall"), job, nodes=2, heartbeat_ms=HB_MS,
                     timeout_ms=TIMEOUT_MS, token=token)
    n0, n1 = c.nodes
    try:
        c.start()
        c.wait_for(lambda: last_step(n0) >= 3, 120, "step 3")
        n1.signal(signal.SIGSTOP)
        stopped = post(n0, "/v1/stop", token)
        code0 = c.wait_all(60, [n0])[0]
        n1.signal(signal.SIGCONT)
        code1 = c.wait_all(60, [n1])[0]
        said = grep(n0, r"generation 1 ended: node n1 lost .*; the job was stopping, so it ends "
                        r"here \(exit 2, not restarted")
        ok = stopped == 202 and code0 == 2 and code1 in (1, 2) and said
        return check("test_stop_that_meets_a_stalled_node_is_not_restarted", ok,
                     "stop %s; exit codes n0 %s, n1 %s; reason logged %s%s"
                     % (stopped, code0, code1, said, "" if ok else "\n" + c.logs(15)))
    finally:
        c.kill_all()


def test_stalled_node_lets_the_waiting_cluster_reform(mtnlgd, tmp, tokens):
    name = "test_stalled_node_coming_back_lets_the_cluster_waiting_for_nodes_reform"
    c = two_nodes(mtnlgd, tmp, tokens, "comeback", SHORT_STEPS,
                  extra={"cluster": {"comm_timeout_ms": 10000},
                         "rendezvous": {"reform_timeout_s": 30}})
    n0, n1 = c.nodes
    try:
        c.start()
        c.wait_for(lambda: last_step(n0) >= 3, 120, "step 3")
        n1.signal(signal.SIGSTOP)
        c.wait_for(lambda: grep(n0, r"coordinator: generation 1 ended"), 30, "the end")
        n1.signal(signal.SIGCONT)
        codes = c.wait_all(90)
        back = grep(n0, r"coordinator: node n1 is back after [0-9.]+ s: a spare")
        formed = grep(n0, r"coordinator: generation 2 formed \(restart 1 of 3\): tp 2 x pp 2 x "
                          r"dp 1 = 4 ranks on 2 node\(s\): n0 \[0,2\), n1 \[2,4\)")
        runs0 = runs([s["step"] for s in n0.steps()])
        ok = codes == [0, 0] and back and formed and len(runs0) == 2 and runs0[1] == list(
            range(1, SHORT_STEPS + 1))
        return check(name, ok, "exit codes %s, back logged %s, generation 2 formed with n1 %s; "
                     "n0 ran steps %s%s" % (codes, back, formed,
                                            ["%d..%d" % (r[0], r[-1]) for r in runs0],
                                            "" if ok else "\n" + c.logs(15)))
    except AssertionError as e:
        return check(name, False, str(e))
    finally:
        c.kill_all()


def test_too_few_nodes_left_ends_the_job(mtnlgd, tmp, tokens):
    c = two_nodes(mtnlgd, tmp, tokens, "few", 100000,
                  extra={"rendezvous": {"reform_timeout_s": 1}})
    n0, victim = c.nodes
    try:
        c.start()
        c.wait_for(lambda: last_step(n0) >= 2, 120, "step 2")
        victim.signal(signal.SIGKILL)
        code = c.wait_all(30, [n0])[0]
        ended = grep(n0, r"generation 1 ended: node n1 lost \(.*\); re-forming from step 0 "
                         r"\(the job has no checkpoint.dir\), restart 1 of 3")
        failed = grep(n0, r"generation 2 ended: cannot re-form after node n1 lost \(.*\): pp 2 x "
                          r"dp_min 1 needs 2 model slot\(s\) in whole nodes, the 1 node\(s\) left "
                          r"\(n0\) hold 1, and no node joined within rendezvous.reform_timeout_s "
                          r"\(1 s\)")
        t_end, t_fail = (n0.log_time(r"generation 1 ended: node n1 lost"),
                         n0.log_time(r"generation 2 ended: cannot re-form"))
        waited = t_fail - t_end if t_end and t_fail else None
        # at least the timeout; the upper bound only says it did not wait for
        # something else, with room for a loaded machine
        ok = code == 1 and ended and failed and waited is not None and 0.9 <= waited <= 10
        return check("test_too_few_nodes_left_ends_the_job_after_reform_timeout", ok,
                     "exit %s, end logged %s, failure logged %s, %s s after the end%s" % (
                         code, ended, failed, waited, "" if ok else "\n" + c.logs(15)))
    finally:
        c.kill_all()


def test_coordinator_restarted_at_once_is_noticed(mtnlgd, tmp, tokens):
    c = two_nodes(mtnlgd, tmp, tokens, "coord-restart", 100000, timeout_ms=6000)
    n0, n1 = c.nodes
    try:
        c.start()
        c.wait_for(lambda: last_step(n0) >= 3, 120, "step 3")
        n0.signal(signal.SIGKILL)
        n0.wait(10)
        t0 = time.time()
        c.node_start(n0)  # at once: well inside n1's heartbeat timeout
        try:
            code = n1.wait(30)
        except subprocess.TimeoutExpired:
            code = None
        took = time.time() - t0
        # found by the fence on a new connection, or by the read between rounds
        said = grep(n1, r"coordinator lost: the coordinator at 127\.0\.0\.1:\d+ restarted "
                        r"\((instance [0-9a-f]{16}, not [0-9a-f]{16}|its store is not instance "
                        r"[0-9a-f]{16})\): generation 1 is gone")
        ok = code == 1 and said
        return check("test_coordinator_restarted_at_once_is_noticed", ok,
                     "n1 exit %s after %.1f s, reason logged %s%s" % (
                         code, took, bool(said), "" if ok else "\n" + c.logs(15)))
    finally:
        c.kill_all()


def release_and_kill(c, release):
    """A test's end however it went: held writes let go, the daemons killed."""
    if not os.path.exists(release):
        open(release, "w").close()
    c.kill_all()


def replicas_job(tmp, tokens, name, interval, dp_min):
    """The tiny model as up to 3 replicas of one rank each (at least dp_min),
    a long run checkpointing every interval steps (0: only on request and
    stop)."""
    return tiny_job(os.path.join(tmp, name + ".json"), tokens, name, 100000,
                    parallel={"tp": 1, "pp": 1, "dp_min": dp_min, "dp_max": 3, "micro_batch": 2},
                    train={"global_batch": 12, "steps": 100000, "seed": 7,
                           "lr": {"schedule": "constant", "peak": 1e-3}},
                    checkpoint={"dir": os.path.join(tmp, name + "-ckpt"), "interval": interval})


def start_coordinator_first(c, env0, envs):
    """Starts n0 (which hosts the store) and, once it has joined, the
    others; the members of generation 1, from the coordinator's line."""
    n0 = c.nodes[0]
    c.node_start(n0, env0)
    c.wait_for(lambda: grep(n0, r"joined the rendezvous at \S+ as n0"), 60, "n0 joined")
    for n in c.nodes[1:]:
        c.node_start(n, envs.get(n.name))
    c.wait_for(lambda: grep(n0, r"coordinator: generation 1 formed"), 120, "generation 1")
    line = [ln for ln in n0.stderr().splitlines() if "coordinator: generation 1 formed" in ln][0]
    return re.findall(r"(n\d+) \[", line)


def test_sigterm_stop_that_meets_a_lost_node(mtnlgd, tmp, tokens, preload):
    name = "test_sigterm_stop_that_meets_a_lost_node_ends_the_job"
    release = os.path.join(tmp, "release-sigstop")
    job = replicas_job(tmp, tokens, "sigstop", 0, 3)  # all three are members
    c = LocalCluster(mtnlgd, os.path.join(tmp, "sigstop"), job, nodes=3, devices="cpu:1",
                     heartbeat_ms=HB_MS, timeout_ms=TIMEOUT_MS,
                     extra={"rendezvous": {"reform_timeout_s": 5}})
    n0, n1, n2 = c.nodes
    try:
        start_coordinator_first(c, None, {"n2": {
            "LD_PRELOAD": preload, "MTNLG_FAULT_HOLD_FILE": "shard_tp00_pp000.bin",
            "MTNLG_FAULT_HOLD_UNTIL": release}})
        c.wait_for(lambda: last_step(n0) >= 3, 120, "step 3")
        # systemctl stop on n2: the stop's save holds in n2's shard write,
        # and n1 is lost before it is done
        n2.signal(signal.SIGTERM)
        c.wait_for(lambda: grep(n2, r"the coordinator knows of the stop")
                   and grep(n2, r"fault_preload: holding writes to"), 60,
                   "n2's stop known and its save held")
        n1.signal(signal.SIGKILL)
        n1.wait(10)
        code0 = c.wait_all(60, [n0])[0]
        open(release, "w").close()
        code2 = c.wait_all(60, [n2])[0]
        said = grep(n0, r"generation 1 ended: .*node n2 had been told to stop by a signal, so the "
                        r"job ends here \(exit 2, not restarted")
        reformed = grep(n0, r"re-forming from")
        ok = code0 == 2 and said and not reformed and code2 is not None
        return check(name, ok, "exit codes n0 %s, n2 %s; reason logged %s; re-formed %s%s"
                     % (code0, code2, said, reformed, "" if ok else "\n" + c.logs(15)))
    except AssertionError as e:
        return check(name, False, "%s\n%s" % (e, c.logs(15)))
    finally:
        release_and_kill(c, release)


def test_coordinator_with_stuck_ranks_stays(mtnlgd, tmp, tokens, preload):
    name = "test_coordinator_whose_ranks_are_stuck_stays_and_the_cluster_reforms"
    release = os.path.join(tmp, "release-coordstuck")
    job = replicas_job(tmp, tokens, "coordstuck", 5, 2)
    c = LocalCluster(mtnlgd, os.path.join(tmp, "coordstuck"), job, nodes=4, devices="cpu:1",
                     heartbeat_ms=HB_MS, timeout_ms=TIMEOUT_MS)
    n0 = c.nodes[0]
    try:
        # n0 hosts the store and coordinates; its rank's writes of the step-5
        # checkpoint are held, so when another member is lost its rank cannot
        # stop
        members = start_coordinator_first(
            c, {"LD_PRELOAD": preload, "MTNLG_FAULT_HOLD_FILE": "shard_tp00_pp000.bin",
                "MTNLG_FAULT_HOLD_UNTIL": release}, {})
        if "n0" not in members or len(members) < 2:
            raise AssertionError("generation 1 formed of %s: n0 and another member needed"
                                 % members)
        victim = [n for n in c.nodes if n.name == [m for m in members if m != "n0"][0]][0]
        left = [n for n in c.nodes if n not in (n0, victim)]
        c.wait_for(lambda: grep(n0, r"fault_preload: holding writes to"), 120,
                   "n0's checkpoint writes held")
        victim.signal(signal.SIGKILL)
        victim.wait(10)
        c.wait_for(lambda: grep(n0, r"it coordinates, so it stays"), 60, "n0 staying")
        # the others form a generation without n0 (declared lost) and train
        def without_n0():
            return [ln for ln in n0.stderr().splitlines()
                    if re.search(r"coordinator: generation \d+ formed", ln) and "n0 [" not in ln]
        c.wait_for(lambda: without_n0(), 120, "a generation formed without n0")
        trainer = [n for n in left if n.name + " [" in without_n0()[0]][0]
        base = len(trainer.steps())
        c.wait_for(lambda: len(trainer.steps()) >= base + 3, 120, "steps without n0")
        alive = n0.running()
        st = status(n0)
        formed = without_n0()[0].split("coordinator: ")[-1]
        open(release, "w").close()
        # its ranks let go, it heartbeats again and the coordinator places it
        c.wait_for(lambda: grep(n0, r"this node's ranks stopped .* after the abort; heartbeating "
                                    r"again"), 120, "n0's ranks stopped")
        c.wait_for(lambda: roles(n0).get("n0", ("",))[0] in ("coordinator", "spare"), 60,
                   "n0 back in the cluster")
        ok = alive and all(n.running() for n in left) and not grep(n0, r"exiting without them")
        return check(name, ok, "n0 alive while its ranks were stuck %s (%s; status generation "
                     "%s); roles now %s%s" % (alive, formed, st["generation"], roles(n0),
                                              "" if ok else "\n" + c.logs(15)))
    except AssertionError as e:
        return check(name, False, "%s\n%s" % (e, c.logs(15)))
    finally:
        release_and_kill(c, release)


def test_member_lost_after_it_finished(mtnlgd, tmp, tokens, preload):
    name = "test_member_lost_after_it_finished_does_not_end_the_generation"
    steps = 6
    out = os.path.join(tmp, "finished-export")
    os.makedirs(out)
    export, release = os.path.join(out, "final.safetensors"), os.path.join(tmp, "release-export")
    job = tiny_job(os.path.join(tmp, "finished.json"), tokens, "finished", steps,
                   parallel={"tp": 2, "pp": 1, "dp_min": 2, "dp_max": 2, "micro_batch": 2},
                   checkpoint={"export": export})
    # without the fix the job failed once reform_timeout_s passed: soon
    c = LocalCluster(mtnlgd, os.path.join(tmp, "finished"), job, nodes=2, heartbeat_ms=HB_MS,
                     timeout_ms=TIMEOUT_MS, extra={"rendezvous": {"reform_timeout_s": 5}})
    n0, n1 = c.nodes
    try:
        c.node_start(n0, {"LD_PRELOAD": preload, "MTNLG_FAULT_HOLD_FILE": "final.safetensors",
                          "MTNLG_FAULT_HOLD_UNTIL": release})
        c.node_start(n1)
        # world rank 0 holds in the export; n1 (replica 1) has nothing to
        # export, ends and reports done, which the coordinator has read once
        # the status says stopping
        c.wait_for(lambda: grep(n0, r"fault_preload: holding writes to \S*final\.safetensors")
                   and grep(n1, r"generation 1: this node's ranks ended: completed %d steps"
                            % steps)
                   and status(n0)["state"] == "stopping", 120,
                   "the export held and n1 done")
        n1.signal(signal.SIGKILL)
        n1.wait(10)
        c.wait_for(lambda: grep(n0, r"coordinator: node n1 lost") and
                   roles(n0).get("n1", ("",))[0] == "lost", 30, "n1 lost")
        st = status(n0)
        listed = {n["name"]: (n["role"], n["member"]) for n in st["nodes"]}
        open(release, "w").close()
        try:
            code = n0.wait(120)
        except subprocess.TimeoutExpired:
            code = None
        said = grep(n0, r"coordinator: node n1 was lost after its ranks finished generation 1: "
                        r"not a failure; waiting for the other members")
        ended = grep(n0, r"coordinator: generation 1 ended: completed %d steps" % steps)
        failed = grep(n0, r"generation 1 ended: node n1 lost")
        exported = grep(n0, r"exported weights to \S*final\.safetensors") and os.path.isfile(export)
        ok = (code == 0 and said and ended and not failed and exported
              and listed.get("n1") == ("lost", False) and st["state"] == "stopping"
              and st["generation"] == 1 and st["restarts"] == 0)
        return check(name, ok, "n0 exit %s; loss logged as after its end %s; generation 1 ended "
                     "completed %s, as a failure %s; exported %s; status while held: state %s, "
                     "generation %s, restarts %s, n1 %s%s" % (
                         code, said, ended, failed, exported, st["state"], st["generation"],
                         st["restarts"], listed.get("n1"), "" if ok else "\n" + c.logs(15)))
    except AssertionError as e:
        return check(name, False, str(e))
    finally:
        release_and_kill(c, release)


def main():
    mtnlgd, source_root, preload = sys.argv[1], sys.argv[2], sys.argv[3]
    validate = status_contract(source_root)
    cases = [
        (test_sigkill_of_a_member_reforms_onto_the_spare, validate),
        (test_restarted_node_rejoins,),
        (test_node_restarted_at_once_waits_for_its_old_entry,),
        (test_coordinator_restarted_at_once_is_noticed,),
        (test_too_few_nodes_left_ends_the_job,),
        (test_stalled_member_comes_back, validate),
        (test_stalled_node_lets_the_waiting_cluster_reform,),
        (test_node_that_lost_a_device_exits_to_restart,),
        (test_paused_job_reforms_paused,),
        (test_stop_that_meets_a_stalled_node_is_not_restarted,),
        (test_member_lost_after_it_finished, preload),
        (test_sigterm_stop_that_meets_a_lost_node, preload),
        (test_coordinator_with_stuck_ranks_stays, preload),
    ]
    fails, took = 0, []
    with tempfile.TemporaryDirectory() as tmp:
        tokens = license_tokens(os.path.join(tmp, "tokens.u16"))
        for fn, *extra in cases:
            t0 = time.time()
            try:
                fails += fn(mtnlgd, tmp, tokens, *extra)
            except Exception:  # a wait that ran out, a status that did not answer
                fails += check(fn.__name__, False, traceback.format_exc())
            took.append("%s %.1f" % (fn.__name__[len("test_"):], time.time() - t0))
    # where the time went: a wait that ran out shows as a long case
    print("# seconds: %s" % ", ".join(took))
    print("%d failure(s)" % fails)
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
