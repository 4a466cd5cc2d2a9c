"""A lost node: the coordinator re-forms the cluster from the last checkpoint.

usage: test_recovery_cluster.py MTNLGD SOURCE_ROOT

Daemons on loopback (tools/local_cluster.py), cpu:2 each, tp 2 x pp 2 of a
4-layer tiny model, heartbeat timeout 2 s:
- test_sigkill_of_a_member_reforms_onto_the_spare_from_the_last_checkpoint:
  5 daemons, dp 2 (n0..n3) and the spare n4, a checkpoint every 4 steps;
  n2 is SIGKILLed past step 6. The survivors do not exit: generation 1 ends
  on every node naming n2 and "restart 1 of 3", generation 2 forms with n4
  in n2's place, its ranks resume from the newest committed checkpoint (the
  first step of generation 2 is that checkpoint's step + 1), /v1/status
  shows generation 2 and restarts 1 (checked against proto/control-v1.yaml),
  and the job completes its 24 steps: every survivor exits 0, and every loss
  printed, before and after the restart, is that of an uninterrupted
  `mtnlgd --standalone` run of the same job.
- test_restarted_node_rejoins_and_the_job_starts_again_from_step_0: 2
  daemons (the whole dp 1), no checkpoint.dir; n1 is SIGKILLed and started
  again under its name: it rejoins while the coordinator waits for enough
  nodes, generation 2 forms with it, world rank 0's node says training
  restarts from step 0, and the job completes with the same losses for the
  steps trained twice; both exit 0.
- test_too_few_nodes_left_ends_the_job_after_reform_timeout: 2 daemons
  (the whole dp 1), no checkpoint.dir, rendezvous.reform_timeout_s = 1; n1
  is SIGKILLed: generation 1 ends "re-forming from step 0", and about a
  second later the job ends failed, naming what was missing; n0 exits 1.
"""
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tools"))
from local_cluster import LocalCluster, last_step, grep, check, license_tokens, tiny_job  # noqa: E402

HB_MS, TIMEOUT_MS = 200, 2000
STEPS, INTERVAL = 24, 4


def status(node):
    with urllib.request.urlopen(node.url() + "/v1/status", timeout=5) as r:
        return json.loads(r.read())


def contract(source_root):
    spec = importlib.util.spec_from_file_location(
        "openapi_check", os.path.join(source_root, "tests", "common", "openapi_check.py"))
    oc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(oc)
    doc = oc.load(os.path.join(source_root, "proto", "control-v1.yaml"))
    return lambda st: oc.validate(doc, {"$ref": "#/components/schemas/Status"}, st)


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
        # the spare last, so that n0..n3 are the members of generation 1
        for n in c.nodes[:4]:
            c.node_start(n)
        c.wait_for(lambda: grep(n0, r"generation 1 formed"), 60, "generation 1")
        c.node_start(spare)
        c.wait_for(lambda: last_step(n0) >= 6, 120, "step 6")
        killed_after = last_step(n0)
        victim.signal(signal.SIGKILL)
        victim.wait(10)
        c.wait_for(lambda: last_step(spare) > 0, 60, "a step of generation 2")
        st = status(spare)
        st_errors = validate(st)
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
        said = grep(n0, r"generation 2 \(restart 1\): resuming from the newest committed "
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
              and st["generation"] == 2 and st["restarts"] == 1 and not st_errors and exact)
        return check("test_sigkill_of_a_member_reforms_onto_the_spare_from_the_last_checkpoint",
                     ok, "killed n2 after step %d; survivors alive after the kill %s, exit codes %s; "
                     "end logged %s, generation 2 formed %s; resumed from step %s (newest "
                     "checkpoint then %s), n0 ran steps 1..%d then %s..%s, the spare from %s; "
                     "status generation %s restarts %s %s; losses equal the standalone run's: %s%s"
                     % (killed_after, alive, codes, ended, formed, resumed, newest, last,
                        after[:1], after[-1:], spare_first, st.get("generation"),
                        st.get("restarts"), st_errors, exact, "" if ok else "\n" + c.logs(30)))
    finally:
        c.kill_all()


def two_nodes(mtnlgd, tmp, tokens, name, steps, extra=None):
    """The tiny model as one replica over two daemons (pp 2, tp 2), no
    checkpoints and no spare: losing either leaves too few slots."""
    job = tiny_job(os.path.join(tmp, name + ".json"), tokens, name, steps,
                   parallel={"tp": 2, "pp": 2, "dp_min": 1, "dp_max": 1, "micro_batch": 2})
    return LocalCluster(mtnlgd, os.path.join(tmp, name), job, nodes=2, heartbeat_ms=HB_MS,
                        timeout_ms=TIMEOUT_MS, extra=extra)


def test_restarted_node_rejoins(mtnlgd, tmp, tokens):
    c = two_nodes(mtnlgd, tmp, tokens, "rejoin", 12)
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
              and [s for s, _ in again] == list(range(1, 13)) and first == again[:len(first)])
        return check("test_restarted_node_rejoins_and_the_job_starts_again_from_step_0", ok,
                     "exit codes %s, end logged %s, step 0 logged %s; steps 1..%d, then %s..%s%s"
                     % (codes, ended, said, len(first), again[:1], again[-1:],
                        "" if ok else "\n" + c.logs(15)))
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
        ok = code == 1 and ended and failed and waited is not None and 0.9 <= waited <= 3
        return check("test_too_few_nodes_left_ends_the_job_after_reform_timeout", ok,
                     "exit %s, end logged %s, failure logged %s, %s s after the end%s" % (
                         code, ended, failed, waited, "" if ok else "\n" + c.logs(15)))
    finally:
        c.kill_all()


def main():
    mtnlgd, source_root = sys.argv[1], sys.argv[2]
    validate = contract(source_root)
    fails = 0
    with tempfile.TemporaryDirectory() as tmp:
        tokens = license_tokens(os.path.join(tmp, "tokens.u16"))
        t0 = time.time()
        fails += test_sigkill_of_a_member_reforms_onto_the_spare(mtnlgd, tmp, tokens, validate)
        t1 = time.time()
        fails += test_restarted_node_rejoins(mtnlgd, tmp, tokens)
        t2 = time.time()
        fails += test_too_few_nodes_left_ends_the_job(mtnlgd, tmp, tokens)
        print("# %.1f s, %.1f s and %.1f s" % (t1 - t0, t2 - t1, time.time() - t2))
    print("%d failure(s)" % fails)
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
