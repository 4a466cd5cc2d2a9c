"""What a failed checkpoint tells: which rank failed, where and why, on every
rank.

usage: test_checkpoint_failures.py MTNLGD FAULT_PRELOAD

mtnlgd --standalone runs the tiny model as tp 2 x pp 2 x dp 2 device threads
(world rank = tp + 2 * (dp + 2 * pp), on cpu:<rank>), saving every 2 steps;
FAULT_PRELOAD (tests/common/fault_preload.c, LD_PRELOAD) makes the reads of
one shard file fail.
- test_unreadable_resume_names_the_ranks: the newest checkpoint's shard that
  world rank 7 checksums cannot be read: the resume's refusal names world
  rank 7 and its device, not only how many ranks could not read it.
"""
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
from local_cluster import check, license_tokens  # noqa: E402


def write_job(path, tokens, ckpt, steps=4):
    job = {"name": "fail-test", "model": {"preset": "tiny", "n_layer": 4},
           "parallel": {"tp": 2, "pp": 2, "dp_min": 2, "dp_max": 2, "micro_batch": 2},
           "train": {"global_batch": 8, "steps": steps, "seed": 11,
                     "lr": {"schedule": "cosine", "peak": 3e-3, "min": 3e-4, "warmup_steps": 1}},
           "data": {"path": tokens},
           "checkpoint": {"dir": ckpt, "interval": 2}}
    with open(path, "w") as f:
        json.dump(job, f)
    return path


def run(mtnlgd, job, env=None, *args, timeout=300):
    return subprocess.run([mtnlgd, "--standalone", job, *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, **(env or {})))


def main():
    mtnlgd, preload = sys.argv[1], os.path.abspath(sys.argv[2])
    fails = 0
    with tempfile.TemporaryDirectory() as tmp:
        tokens = license_tokens(os.path.join(tmp, "tokens.u16"))

        # a resume that a rank cannot read names that rank
        ck = os.path.join(tmp, "ck3")
        job = write_job(os.path.join(tmp, "job3.json"), tokens, ck, steps=2)
        p0 = run(mtnlgd, job)
        # shard (tp 1, pp 1) is checksummed by dp rank (1 + 1 * 2) % 2 = 1: world rank 7
        p = run(mtnlgd, job, {"LD_PRELOAD": preload, "MTNLG_FAULT_EIO_COUNT": "-1",
                              "MTNLG_FAULT_EIO_FROM": "64",
                              "MTNLG_FAULT_EIO_FILE": "step_00000002/shard_tp01_pp001.bin"},
                "--set", "train.steps=4")
        fails += check("test_unreadable_resume_names_the_ranks",
                       p0.returncode == 0 and p.returncode != 0
                       and "could not be read on 1 rank(s) in 3 tries, world rank 7; first, "
                       "world rank 7 (tp 1, pp 1, dp 1; cpu:7): " in p.stderr
                       and "Input/output error" in p.stderr,
                       "exit %d: %s" % (p.returncode, p.stderr.strip().splitlines()[-1][-400:]
                                        if p.stderr.strip() else ""))
    print("%d failure(s)" % fails)
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
