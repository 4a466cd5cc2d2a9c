"""Eight rank threads of one mtnlgd through every thread the engine starts:
the run `tools/test tsan` makes under ThreadSanitizer (build-tsan/), and a
quick one in the release build.

usage: test_rank_threads.py MTNLGD JOB.json
The tiny model (4 layers) trains on random bytes at tp 2 x pp 2 x dp 2 over
8 CPU devices, with interleaved 1F1B (2 virtual stages), sequence
parallelism, recomputation, dropout, bf16, the step timers and asynchronous
checkpoints (the background writer), then resumes from its checkpoint for
two steps more. Checked: both runs exit 0 with every step's loss finite,
the first commits checkpoints of steps 2 and 4 and the resume starts at
step 5; under ThreadSanitizer (halt_on_error) a race ends the run with its
report, which is printed.
"""
import json
import math
import os
import random
import subprocess
import sys
import tempfile

failures = 0


def check(ok, what):
    global failures
    print(("ok " if ok else "FAIL: ") + what)
    if not ok:
        failures += 1


def run(mtnlgd, job, tmp, steps):
    args = [mtnlgd, "--standalone", job, "--devices", "cpu:8", "--log-format", "json"]
    sets = {
        "data.path": os.path.join(tmp, "tokens.u16"),
        "model.n_layer": 4,
        "model.hidden_dropout": 0.1,
        "model.attention_dropout": 0.1,
        "parallel.tp": 2,
        "parallel.pp": 2,
        "parallel.dp_min": 2,
        "parallel.micro_batch": 2,
        "parallel.virtual_stages": 2,
        "parallel.sequence_parallel": "true",
        "parallel.recompute": "true",
        "train.steps": steps,
        "train.lr.warmup_steps": 1,
        "train.precision": "bf16",
        "train.timing_log_level": 2,
        "checkpoint.dir": os.path.join(tmp, "ckpt"),
        "checkpoint.interval": 2,
        "checkpoint.async": "true",
    }
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    # one OpenMP thread a rank: libgomp is not instrumented, and its teams'
    # handoffs would read as races under ThreadSanitizer
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(args, env=env, capture_output=True, text=True, timeout=1200)
    out = p.stdout + p.stderr
    if p.returncode != 0:
        tail = "\n".join(out.splitlines()[-60:])
        print(f"mtnlgd ({steps} steps) exited {p.returncode}:\n{tail}")
    steps_seen = []
    for line in out.splitlines():
        if line.startswith('{"step"'):
            steps_seen.append(json.loads(line))
    return p.returncode, steps_seen, out


def main():
    mtnlgd, job = sys.argv[1], sys.argv[2]
    with tempfile.TemporaryDirectory(prefix="mtnlg-rank-threads-") as tmp:
        rng = random.Random(7)
        with open(os.path.join(tmp, "tokens.u16"), "wb") as f:
            f.write(bytes(b for _ in range(40000) for b in (rng.randrange(256), 0)))

        rc, lines, out = run(mtnlgd, job, tmp, 4)
        check(rc == 0, f"8 rank threads, 4 steps: exit {rc}")
        check("ThreadSanitizer" not in out, "no ThreadSanitizer report")
        check([s["step"] for s in lines] == [1, 2, 3, 4],
              f"step lines 1-4: {[s['step'] for s in lines]}")
        check(all(math.isfinite(s["loss"]) for s in lines), "every loss finite")
        saved = sorted(os.listdir(os.path.join(tmp, "ckpt", "tiny-demo"))) \
            if os.path.isdir(os.path.join(tmp, "ckpt", "tiny-demo")) else []
        check({"step_00000002", "step_00000004", "latest"} <= set(saved),
              f"checkpoints of steps 2 and 4 committed: {saved}")

        rc, lines, out = run(mtnlgd, job, tmp, 6)
        check(rc == 0, f"the resume, 2 steps more: exit {rc}")
        check("ThreadSanitizer" not in out, "no ThreadSanitizer report in the resume")
        check([s["step"] for s in lines] == [5, 6],
              f"the resume runs steps 5-6: {[s['step'] for s in lines]}")
        check(all(math.isfinite(s["loss"]) for s in lines), "every loss finite")
    print("test_rank_threads:", "FAILED" if failures else "ok")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
