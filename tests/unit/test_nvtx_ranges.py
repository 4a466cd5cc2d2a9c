"""mtnlgd's NVTX ranges as a profiler sees them: the NVTX tool
libmtnlg_nvtx_record.so (tests/unit/nvtx_record.c), loaded through
NVTX_INJECTION64_PATH as Nsight Systems' is, records every push and pop
with its thread. A standalone job of 4 rank threads (pp 2 x dp 2, 2
micro-batches each, 3 steps, a validation after step 2, checkpoints at
steps 2 and 3) on CPU devices:
- test_every_threads_ranges_nest_and_close: no thread pops a range it did
  not push, and every thread ends with none open;
- test_each_rank_thread_marks_its_steps_and_their_phases: 4 threads hold
  "step 1", "step 2", "step 3" in turn, each step the timers' phases in
  the engine's order (weights-round, forward-backward, all-grads-sync,
  embedding-grads-all-reduce (the tied embedding's two copies at pp 2),
  grad-norm, step-all-reduce, optimizer-inner-step, params-all-gather), and the
  forward-backward each micro-batch's "forward J" and "backward J" in its
  stage's 1F1B order, each holding its stage's "layer L" (the model's
  number: 0 on the first stage, 1 on the last);
- test_validation_and_checkpoints_have_ranges: "validation after step 2"
  holds "validation batch 0" and "validation batch 1", each with its
  forwards, and "checkpoint step 2" and "checkpoint step 3" on every rank
  thread, after their steps.
Without the tool nothing is recorded and the run's losses are the same.

usage: test_nvtx_ranges.py MTNLGD NVTX_RECORD_SO
"""
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools"))
from local_cluster import indexed_dataset, license_tokens  # noqa: E402

PHASES = ["weights-round", "forward-backward", "all-grads-sync", "embedding-grads-all-reduce",
          "grad-norm", "step-all-reduce", "optimizer-inner-step", "params-all-gather"]


def check(name, ok, detail):
    print(f"{'ok' if ok else 'FAIL'} {name}: {detail}")
    return 0 if ok else 1


def trees(path):
    """Each thread's ranges as [name, children] trees, and the problems
    found reading them (a pop with none open, ranges left open)."""
    roots, stacks, problems = {}, {}, []
    with open(path) as f:
        for line in f:
            tid, kind, *name = line.rstrip("\n").split(" ", 2)
            stack = stacks.setdefault(tid, [])
            if kind == "push":
                node = [name[0] if name else "", []]
                (stack[-1][1] if stack else roots.setdefault(tid, [])).append(node)
                stack.append(node)
            elif not stack:
                problems.append("thread %s pops with no range open" % tid)
            else:
                stack.pop()
    problems += ["thread %s ends with %s open" % (t, [n[0] for n in s]) for t, s in stacks.items()
                 if s]
    return roots, problems


def names(nodes):
    return [n[0] for n in nodes]


def main():
    mtnlgd, tool = sys.argv[1], os.path.abspath(sys.argv[2])
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        tokens = license_tokens(os.path.join(tmp, "tokens.u16"))
        valid = indexed_dataset(os.path.join(tmp, "valid"),
                                [list(range(i, i + 200)) for i in range(0, 50)])
        job = {"name": "nvtx", "model": {"preset": "tiny", "n_layer": 2},
               "parallel": {"pp": 2, "dp_min": 2, "dp_max": 2, "micro_batch": 2},
               "train": {"global_batch": 8, "steps": 3, "seed": 7,
                         "lr": {"schedule": "constant", "peak": 1e-3, "warmup_steps": 0}},
               "data": {"path": tokens, "valid": valid},
               "eval": {"interval": 2, "iters": 2, "test": False},
               "checkpoint": {"dir": os.path.join(tmp, "ckpt"), "interval": 2}}
        path = os.path.join(tmp, "job.json")
        with open(path, "w") as f:
            json.dump(job, f)
        record = os.path.join(tmp, "ranges.txt")

        def run(env, ckpt):
            return subprocess.run([mtnlgd, "--standalone", path, "--log-format", "json", "--set",
                                   "checkpoint.dir=" + os.path.join(tmp, ckpt)],
                                  capture_output=True, text=True, timeout=300,
                                  env=dict(os.environ, **env))

        p = run({"NVTX_INJECTION64_PATH": tool, "MT_NVTX_RECORD": record}, "a")
        if p.returncode != 0 or not os.path.exists(record):
            print("FAIL the run: exit %d, %s" % (p.returncode, p.stderr[-2000:]))
            return 1
        roots, problems = trees(record)
        failures += check("test_every_threads_ranges_nest_and_close", not problems,
                          "%d threads; %s" % (len(roots), problems[:5]))

        ranks = {t: r for t, r in roots.items() if "step 1" in names(r)}
        bad = []
        for t, r in ranks.items():
            steps = [n for n in r if n[0].startswith("step ")]
            if names(steps) != ["step 1", "step 2", "step 3"]:
                bad.append("%s: steps %s" % (t, names(steps)))
                continue
            for s in steps:
                if names(s[1]) != PHASES:
                    bad.append("%s %s: phases %s" % (t, s[0], names(s[1])))
                    continue
                fb = names(s[1][1][1])
                # stage 0 of pp 2, 2 micro-batches: both forwards, then both
                # backwards; stage 1: forward and backward in turn
                if fb not in (["forward 0", "forward 1", "backward 0", "backward 1"],
                              ["forward 0", "backward 0", "forward 1", "backward 1"]):
                    bad.append("%s %s: forward-backward %s" % (t, s[0], fb))
                    continue
                # each micro-batch's pass through the stage's one layer, by
                # the model's number: 0 on the first stage, 1 on the last
                layer = "layer %d" % (fb[1] == "backward 0")
                inner = [names(mb[1]) for mb in s[1][1][1]]
                if inner != [[layer]] * 4:
                    bad.append("%s %s: the micro-batches hold %s, not %s" % (t, s[0], inner, layer))
        orders = sorted(names(s[1][1][1]) == ["forward 0", "backward 0", "forward 1", "backward 1"]
                        for r in ranks.values() for s in r if s[0] == "step 1")
        failures += check("test_each_rank_thread_marks_its_steps_and_their_phases",
                          len(ranks) == 4 and not bad and orders == [False, False, True, True],
                          "%d rank threads; %s; 1F1B orders (last stage's) %s" % (
                              len(ranks), bad[:4], orders))

        bad = []
        for t, r in ranks.items():
            top = names(r)
            want = ["step 1", "step 2", "checkpoint step 2", "validation after step 2", "step 3",
                    "checkpoint step 3"]
            if [n for n in top if n in want] != want:
                bad.append("%s: %s" % (t, top))
                continue
            v = next(n for n in r if n[0] == "validation after step 2")
            if names(v[1]) != ["validation batch 0", "validation batch 1"] or \
                    any(not [c for c in b[1] if c[0].startswith("forward ")] for b in v[1]):
                bad.append("%s: validation %s" % (t, v))
        failures += check("test_validation_and_checkpoints_have_ranges", len(ranks) == 4 and not bad,
                          bad[:3])

        # no tool: nothing recorded, and the same losses
        os.remove(record)
        q = run({"MT_NVTX_RECORD": record}, "b")
        losses = [[json.loads(l).get("loss") for l in x.stdout.splitlines() if l.startswith("{")]
                  for x in (p, q)]
        failures += check("test_without_a_tool_nothing_is_recorded_and_the_run_is_the_same",
                          q.returncode == 0 and not os.path.exists(record) and losses[0] == losses[1]
                          and len(losses[0]) >= 3,
                          "exit %d; losses %s" % (q.returncode, losses))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
