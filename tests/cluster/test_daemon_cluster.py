"""Node daemons on loopback form generations, train, and end together.

usage: test_daemon_cluster.py MTNLGD JOB_DIR

Each test starts real mtnlgd processes (tools/local_cluster.py) with node
configs in a temp dir and stops them by pid:
- test_four_daemons_train_like_one_process_and_fifth_is_spare
- test_interleaved_daemons_train_like_one_process: 4 daemons of a job of
  2 virtual stages (parallel.virtual_stages), each node a (stage, replica)
  slot of tp 2, the last stage's chunks feeding the first stage's next
  ones across nodes: the losses of the plain 1F1B job run standalone,
  within 1e-6, and of the interleaved job run standalone, exactly; with a
  global batch of 12 micro-batches of 2, dp 2 would leave each replica 3,
  not a multiple of pp: the 4 daemons form dp 1 (2 spares) rather than 2,
  and train the standalone run's losses
- test_sigkill_of_a_member_with_no_restarts_left_ends_the_job_naming_it
  (rendezvous.max_restarts = 0; re-forming after a loss is
  test_recovery_cluster.py's)
- test_other_job_and_other_version_are_refused
- test_sigterm_to_a_member_stops_every_node_at_one_step
- test_ready_and_status_reach_notify_socket
- test_exit_interval_stops_and_the_next_run_completes (train.exit_interval);
  test_a_checkpoint_past_the_end_says_nothing_to_train
- test_unreadable_data_ends_the_job_without_restarts (exit 2)
- test_cluster_key: a coordinator with rendezvous.key_file refuses a node
  without the key and one with another (each exits 2 at once, naming the
  refusal), and trains with the one that holds it
"""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
from local_cluster import (LocalCluster, NotifySocket, step_losses, last_step, grep, check,  # noqa: E402
                           license_tokens)

HB_MS, TIMEOUT_MS = 200, 2000


def write_job(path, tokens, steps, name="cluster-test", dp_max=2, virtual_stages=None,
              dp_min=2, global_batch=8):
    job = {
        "name": name,
        "model": {"preset": "tiny", "n_layer": 4},
        "parallel": {"tp": 2, "pp": 2, "dp_min": dp_min, "dp_max": dp_max, "micro_batch": 2},
        "train": {"global_batch": global_batch, "steps": steps, "seed": 7,
                  "lr": {"schedule": "cosine", "peak": 3e-3, "min": 3e-4, "warmup_steps": 3}},
        "data": {"path": tokens},
    }
    if virtual_stages:
        job["parallel"]["virtual_stages"] = virtual_stages
    with open(path, "w") as f:
        json.dump(job, f)
    return path






def test_four_daemons_train_like_one_process_and_fifth_is_spare(mtnlgd, tmp, tokens):
    job = write_job(os.path.join(tmp, "job20.json"), tokens, 20)
    one = subprocess.run([mtnlgd, "--standalone", job, "--log-format", "json"],
                         capture_output=True, text=True, timeout=300)
    ref = [json.loads(l)["loss"] for l in one.stdout.splitlines() if l.startswith("{")]
    c = LocalCluster(mtnlgd, os.path.join(tmp, "c1"), job, nodes=5,
                     heartbeat_ms=HB_MS, timeout_ms=TIMEOUT_MS)
    try:
        c.start()
        codes = c.wait_all(300)
        # whichever node joined last (start order races under load) waits as the spare
        spares = [n for n in c.nodes if grep(n, r"formed without this node: waiting as a spare")]
        members = [n for n in c.nodes if n not in spares]
        got = [[l for _, l in step_losses(n)] for n in members]
        ok = (one.returncode == 0 and codes == [0] * 5 and len(ref) == 20 and len(members) == 4
              and all(g == ref for g in got))
        ok_spare = len(spares) == 1 and not spares[0].steps()
        return (check("test_four_daemons_train_like_one_process",
                      ok, "exit codes %s, standalone %s..., cluster %s..." % (
                          codes, ref[:3], got[0][:3] if got and got[0] else None))
                + check("test_fifth_daemon_is_a_spare_and_exits_with_the_job", ok_spare,
                        ("spare %s" % spares[0].name) if ok_spare else c.logs()))
    finally:
        c.kill_all()


def test_sigkill_of_a_member_with_no_restarts_left_ends_the_job_naming_it(mtnlgd, tmp, tokens):
    job = write_job(os.path.join(tmp, "joblong.json"), tokens, 100000)
    c = LocalCluster(mtnlgd, os.path.join(tmp, "c2"), job, nodes=4,
                     heartbeat_ms=HB_MS, timeout_ms=TIMEOUT_MS,
                     extra={"rendezvous": {"max_restarts": 0}})
    try:
        c.start()
        c.wait_for(lambda: last_step(c.nodes[0]) >= 3, 120, "step 3")
        victim = c.nodes[2]
        t0 = time.time()
        victim.signal(signal.SIGKILL)
        others = [n for n in c.nodes if n is not victim]
        codes = c.wait_all(30, others)
        # when each node logged the end of the job, naming the lost node and
        # the spent restart budget
        took = [n.log_time(r"generation 1 ended: node n2 lost \(.*\); not re-forming: the "
                           r"restart budget is spent \(0 of 0 restart\(s\) used, "
                           r"rendezvous.max_restarts\); exit 2, not restarted") for n in others]
        took = [t - t0 if t else None for t in took]
        named = all(t is not None for t in took)
        # within the heartbeat timeout and a few ticks (a loaded machine's
        # scheduling given room): the job did not wait for anything else
        # exit 2: systemd does not start them again into a fresh budget
        ok = codes == [2, 2, 2] and named and max(took) <= TIMEOUT_MS / 1000 + 10
        return check("test_sigkill_of_a_member_with_no_restarts_left_ends_the_job_naming_it", ok,
                     "exit codes %s; the end logged %s s after the kill (timeout %.1f s)%s" % (
                         codes, ["%.1f" % t if t is not None else None for t in took],
                         TIMEOUT_MS / 1000, "" if ok else "\n" + c.logs()))
    finally:
        c.kill_all()


def test_other_job_and_other_version_are_refused(mtnlgd, tmp, tokens):
    job = write_job(os.path.join(tmp, "jobA.json"), tokens, 20)
    other = write_job(os.path.join(tmp, "jobB.json"), tokens, 21)  # another job: other hash
    c = LocalCluster(mtnlgd, os.path.join(tmp, "c3"), job, nodes=1,
                     heartbeat_ms=HB_MS, timeout_ms=TIMEOUT_MS)
    try:
        c.start()
        a = c.add_node("other-job", job=other)
        c.node_start(a)
        b = c.add_node("other-version")
        c.node_start(b, env={"MTNLG_TEST_ADVERTISE_VERSION": "0.0.0-other"})
        codes = c.wait_all(60, [a, b])
        ok_job = codes[0] == 2 and grep(a, r"refused this node: node other-job was configured with job")
        ok_ver = codes[1] == 2 and grep(b, r"refused this node: node other-version runs mtnlgd 0\.0\.0-other")
        coord_alive = c.nodes[0].running()
        c.nodes[0].signal(signal.SIGTERM)  # stopped before any generation: exits 0
        code0 = c.wait_all(30, [c.nodes[0]])[0]
        return (check("test_node_with_another_job_is_refused", ok_job, "" if ok_job else c.logs() + a.stderr())
                + check("test_node_with_another_version_is_refused", ok_ver, "" if ok_ver else b.stderr())
                + check("test_coordinator_survives_refusals_and_stops_cleanly",
                        coord_alive and code0 == 0, "exit %s" % code0))
    finally:
        c.kill_all()
        for n in ("other-job", "other-version"):
            pass


def test_sigterm_and_notify(mtnlgd, tmp, tokens):
    job = write_job(os.path.join(tmp, "joblong2.json"), tokens, 100000)
    c = LocalCluster(mtnlgd, os.path.join(tmp, "c4"), job, nodes=4,
                     heartbeat_ms=HB_MS, timeout_ms=TIMEOUT_MS)
    notify = NotifySocket(os.path.join(tmp, "notify.sock"))
    messages = notify.messages
    try:
        for i, n in enumerate(c.nodes):
            c.node_start(n, env={"NOTIFY_SOCKET": notify.path} if i == 1 else None)
        c.wait_for(lambda: last_step(c.nodes[0]) >= 3, 120, "step 3")
        c.nodes[3].signal(signal.SIGTERM)
        codes = c.wait_all(60)
        lasts = [last_step(n) for n in c.nodes]
        ok = codes == [0] * 4 and len(set(lasts)) == 1 and grep(c.nodes[0], r"stopped at step")
        fails = check("test_sigterm_to_a_member_stops_every_node_at_one_step", ok,
                      "exit codes %s, last steps %s%s" % (codes, lasts, "" if ok else "\n" + c.logs()))
        notify.close()
        ready = any("READY=1" in m for m in messages)
        status = any("STATUS=running generation 1: step" in m for m in messages)
        fails += check("test_ready_and_status_reach_notify_socket", ready and status,
                       "%d messages, e.g. %s" % (len(messages), messages[:3]))
        return fails
    finally:
        notify.close()
        c.kill_all()


def test_checkpoint_past_the_end(mtnlgd, tmp, tokens):
    """A job of 4 steps with train.exit_interval 2 stops after step 2 saying
    why, exiting 0; started again it trains steps 3 and 4 (the last is no
    interval's stop); started again over that checkpoint of its last step it
    has nothing to train: it says so and exits 0, not "stopped at step 0 ...
    on request"."""
    path = os.path.join(tmp, "done.json")
    with open(path, "w") as f:
        json.dump({"name": "done", "model": {"preset": "tiny", "n_layer": 2},
                   "parallel": {"tp": 1, "pp": 1, "dp_min": 1, "dp_max": 1, "micro_batch": 2},
                   "train": {"global_batch": 4, "steps": 4, "seed": 7, "lr": {"peak": 1e-3},
                             "exit_interval": 2},
                   "data": {"path": tokens},
                   "checkpoint": {"dir": os.path.join(tmp, "done-ckpt"), "interval": 2}}, f)
    runs = []
    for _ in range(3):
        c = LocalCluster(mtnlgd, os.path.join(tmp, "c5"), path, nodes=1, devices="cpu:1",
                         heartbeat_ms=HB_MS, timeout_ms=TIMEOUT_MS)
        try:
            c.start()
            runs.append((c.wait_all(120)[0], c.nodes[0].stderr()))
        finally:
            c.kill_all()
    (first, log1), (second, log2), (third, log) = runs
    stopped = "ended: stopped at step 2 of 4: a multiple of train.exit_interval (2)" in log1
    completed = "resumed from" in log2 and "ended: completed 4 steps" in log2
    said = "nothing to train: the checkpoint at step 4 is at or past train.steps = 4" in log
    fails = check("test_exit_interval_stops_and_the_next_run_completes",
          first == 0 and second == 0 and stopped and completed,
          "exit codes %s, %s; stop said %s, completion said %s; the logs:\n%s\n%s" % (
              first, second, stopped, completed, log1[-1500:], log2[-1500:]))
    return fails + check("test_a_checkpoint_past_the_end_says_nothing_to_train",
                         third == 0 and said and "on request" not in log,
                         "exit code %s; the third run's log:\n%s" % (third, log[-3000:]))


def test_unreadable_data(mtnlgd, tmp, tokens):
    """Data that cannot be read fails the job, not a peer: no generation is
    re-formed to fail the same way (it spent the restart budget, then exited
    1, and systemd started it again, forever); the node exits 2."""
    path = os.path.join(tmp, "nodata.json")
    with open(path, "w") as f:
        json.dump({"name": "nodata", "model": {"preset": "tiny", "n_layer": 2},
                   "parallel": {"tp": 1, "pp": 1, "dp_min": 1, "dp_max": 1, "micro_batch": 2},
                   "train": {"global_batch": 4, "steps": 4, "seed": 7, "lr": {"peak": 1e-3}},
                   "data": {"path": os.path.join(tmp, "no-such-tokens.u16")}}, f)
    c = LocalCluster(mtnlgd, os.path.join(tmp, "c6"), path, nodes=1, devices="cpu:1",
                     heartbeat_ms=HB_MS, timeout_ms=TIMEOUT_MS)
    try:
        c.start()
        code = c.wait_all(120)[0]
        log = c.nodes[0].stderr()
    finally:
        c.kill_all()
    ok = (code == 2 and "no-such-tokens.u16" in log and "re-forming" not in log
          and "generation 2" not in log)
    return check("test_unreadable_data_ends_the_job_without_restarts", ok,
                 "exit code %s; log:\n%s" % (code, log[-3000:]))


def test_cluster_key(mtnlgd, tmp, tokens):
    path = os.path.join(tmp, "jobkey.json")
    with open(path, "w") as f:
        json.dump({"name": "key-test", "model": {"preset": "tiny", "n_layer": 2},
                   "parallel": {"tp": 1, "pp": 1, "dp_min": 2, "dp_max": 2, "micro_batch": 2},
                   "train": {"global_batch": 4, "steps": 3, "seed": 7, "lr": {"peak": 1e-3}},
                   "data": {"path": tokens}}, f)
    key, other = os.path.join(tmp, "cluster.key"), os.path.join(tmp, "other.key")
    for p, text in ((key, "7c1d9e2f-cluster-key\n"), (other, "7c1d9e2f-cluster-kez\n")):
        with open(p, "w") as f:
            f.write(text)
        os.chmod(p, 0o600)
    c = LocalCluster(mtnlgd, os.path.join(tmp, "c7"), path, nodes=1, devices="cpu:1",
                     heartbeat_ms=HB_MS, timeout_ms=TIMEOUT_MS,
                     extra={"rendezvous": {"key_file": key}})
    try:
        c.start()
        a = c.add_node("keyless", extra={"rendezvous": {"key_file": ""}})
        b = c.add_node("wrong-key", extra={"rendezvous": {"key_file": other}})
        c.node_start(a)
        c.node_start(b)
        t0 = time.time()
        codes = c.wait_all(30, [a, b])
        took = time.time() - t0
        ok_refused = codes == [2, 2] and grep(a, r"refused this client: .*needs the cluster key") \
            and grep(b, r"refused this client: the cluster key does not match")
        keyed = c.add_node("keyed")
        c.node_start(keyed)
        done = c.wait_all(120, [c.nodes[0], keyed])
        ok_keyed = done == [0, 0] and last_step(c.nodes[0]) == 3
        return (check("test_nodes_without_the_cluster_key_are_refused", ok_refused,
                      "exits %s after %.1f s\n%s\n%s" % (codes, took, a.stderr(), b.stderr()))
                + check("test_a_keyed_cluster_trains", ok_keyed,
                        "exits %s\n%s" % (done, c.logs())))
    finally:
        c.kill_all()


def test_interleaved_daemons_train_like_one_process(mtnlgd, tmp, tokens):
    def standalone(job):
        r = subprocess.run([mtnlgd, "--standalone", job, "--log-format", "json"],
                           capture_output=True, text=True, timeout=300)
        return [json.loads(l)["loss"] for l in r.stdout.splitlines() if l.startswith("{")]

    def cluster(job, name):  # 4 daemons to the job's end; their logs stay readable
        c = LocalCluster(mtnlgd, os.path.join(tmp, name), job, nodes=4,
                         heartbeat_ms=HB_MS, timeout_ms=TIMEOUT_MS)
        try:
            c.start()
            return c, c.wait_all(300)
        finally:
            c.kill_all()

    plain = standalone(write_job(os.path.join(tmp, "plain10.json"), tokens, 10))
    job = write_job(os.path.join(tmp, "vs10.json"), tokens, 10, name="vs-cluster",
                    virtual_stages=2)
    ref = standalone(job)
    c, codes = cluster(job, "vs")
    got = [[l for _, l in step_losses(n)] for n in c.nodes]
    ok = (codes == [0] * 4 and len(ref) == 10 and all(g == ref for g in got) and
          len(plain) == 10 and all(abs(a - b) <= 1e-6 * abs(b) for a, b in zip(ref, plain)))
    failures = check("test_interleaved_daemons_train_like_one_process", ok,
                     "exit codes %s, plain %s..., interleaved %s..., cluster %s...%s" % (
                         codes, plain[:2], ref[:2], got[0][:2] if got and got[0] else None,
                         "" if ok else c.logs()))
    job = write_job(os.path.join(tmp, "vs12.json"), tokens, 6, name="vs-twelve", virtual_stages=2,
                    dp_min=1, global_batch=12)
    ref = standalone(job)
    c, codes = cluster(job, "vs12")
    formed = [n for n in c.nodes if grep(n, r"generation 1 formed.*x dp 1 ")]
    members = [n for n in c.nodes if step_losses(n)]
    got = [[l for _, l in step_losses(n)] for n in members]
    ok = (codes == [0] * 4 and len(formed) == 1 and len(members) == 2 and len(ref) == 6 and
          all(g == ref for g in got))
    failures += check("test_interleaved_cluster_forms_the_dp_whose_replicas_take_pp_"
                      "micro_batches", ok,
                      "exit codes %s, formed dp 1 %s, members %d, standalone %s, cluster "
                      "%s%s" % (codes, [n.name for n in formed], len(members), ref[:2],
                                got[0][:2] if got else None, "" if ok else c.logs()))
    return failures


def main():
    mtnlgd = sys.argv[1]
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        tokens = license_tokens(os.path.join(tmp, "tokens.u16"))
        failures += test_four_daemons_train_like_one_process_and_fifth_is_spare(mtnlgd, tmp, tokens)
        failures += test_interleaved_daemons_train_like_one_process(mtnlgd, tmp, tokens)
        failures += test_sigkill_of_a_member_with_no_restarts_left_ends_the_job_naming_it(
            mtnlgd, tmp, tokens)
        failures += test_other_job_and_other_version_are_refused(mtnlgd, tmp, tokens)
        failures += test_sigterm_and_notify(mtnlgd, tmp, tokens)
        failures += test_checkpoint_past_the_end(mtnlgd, tmp, tokens)
        failures += test_unreadable_data(mtnlgd, tmp, tokens)
        failures += test_cluster_key(mtnlgd, tmp, tokens)
    print("%d failure(s)" % failures)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
