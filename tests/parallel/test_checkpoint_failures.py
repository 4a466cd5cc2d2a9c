"""What a failed checkpoint tells: which rank failed, where and why, on every
rank, and a stalled disk taken for one, not for a lost peer.

usage: test_checkpoint_failures.py MTNLGD FAULT_PRELOAD

mtnlgd --standalone runs the tiny model as tp 2 x pp 2 x dp 2 device threads
(world rank = tp + 2 * (dp + 2 * pp), on cpu:<rank>), saving every 2 steps;
FAULT_PRELOAD (tests/common/fault_preload.c, LD_PRELOAD) fills the disk for
one shard file or holds its writes.
- test_full_disk_on_later_ranks_is_named: fallocate of shard_tp01_* of step
  2 fails with ENOSPC (world ranks 1 and 5, the first ranks of the process
  being rank 0): the failure every rank reports names world rank 1, its
  place, its file and the error, and rank 5 logs its own (its file) where
  before only "another rank's device or shard file failed (its log says
  which)" was logged, by rank 0, and no log said which; training goes on and
  step 4 commits;
- test_stalled_shard_create_is_waited_for_then_named: the shard of world
  rank 5 held in its creation past --comm-timeout-ms: every rank waits for
  it (short all-reduces, not one that times out) and, past the comm deadline
  plus the largest shard file at 100 MB/s, gives up naming world rank 5, the
  file and what it was doing, not "allreduce ... timed out" (and rank 5 says
  it waits for its storage);
- test_stalled_manifest_is_waited_for_then_named: the same for world rank
  0's manifest;
- test_unreadable_resume_names_the_ranks: the newest checkpoint's shard that
  world rank 7 checksums cannot be read: the resume's refusal names world
  rank 7 and its device, not only how many ranks could not read it.
"""
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
from local_cluster import check, license_tokens  # noqa: E402

COMM_TIMEOUT_MS = 2000  # short, for the stalls; a loaded machine's step stays well under it


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


def run_held(mtnlgd, job, preload, hold, release, *args):
    """A run with writes to paths containing `hold` held until the run gives
    up on them or says a collective timed out (or 60 s pass); returns (proc,
    stderr, seconds from the first held write to the give-up line)."""
    env = dict(os.environ, LD_PRELOAD=preload, MTNLG_FAULT_HOLD_FILE=hold,
               MTNLG_FAULT_HOLD_UNTIL=release)
    p = subprocess.Popen([mtnlgd, "--standalone", job, *args], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, env=env)
    lines, t = [], {}
    timer = threading.Timer(60, lambda: open(release, "w").close())
    timer.start()
    for line in p.stderr:
        lines.append(line)
        if "fault_preload: holding" in line:
            t["held"] = time.time()
        if "given up" in line or "timed out" in line:
            t.setdefault("over", time.time())
            open(release, "w").close()  # the stuck writer returns, the run ends
    p.wait(timeout=120)
    timer.cancel()
    took = t["over"] - t["held"] if "over" in t and "held" in t else None
    return p, "".join(lines), took


def main():
    mtnlgd, preload = sys.argv[1], os.path.abspath(sys.argv[2])
    fails = 0
    with tempfile.TemporaryDirectory() as tmp:
        tokens = license_tokens(os.path.join(tmp, "tokens.u16"))

        # 1. a full disk for the shards of tp 1 (world ranks 1 and 5)
        ck = os.path.join(tmp, "ck1")
        job = write_job(os.path.join(tmp, "job1.json"), tokens, ck)
        p = run(mtnlgd, job, {"LD_PRELOAD": preload,
                              "MTNLG_FAULT_NOSPACE_FILE": "step_00000002/shard_tp01_"})
        failed = [ln for ln in p.stderr.splitlines() if "checkpoint of step 2 failed" in ln]
        agreed = [ln for ln in failed if "world rank 1 (tp 1, pp 0, dp 0; cpu:1) failed "
                  "(and 1 other rank(s)): ckpt: allocate " in ln
                  and "shard_tp01_pp000.bin" in ln and "No space left on device" in ln]
        own5 = [ln for ln in failed if "world rank 5 (tp 1, pp 1, dp 0; cpu:5) failed" in ln
                and "shard_tp01_pp001.bin" in ln and "No space left on device" in ln]
        fails += check("test_full_disk_on_later_ranks_is_named",
                       p.returncode == 0 and "fault_preload: ENOSPC" in p.stderr
                       and len(agreed) == 1 and len(own5) == 1
                       and "its log says" not in p.stderr
                       and "checkpoint of step 4 committed" in p.stderr
                       and open(os.path.join(ck, "fail-test", "latest")).read().strip()
                       == "step_00000004",
                       "exit %d; step 2's failure lines: %s" % (p.returncode, failed))

        # 2. a disk that stalls past the comm deadline: waited for, then named
        for what, hold, place, doing in (
                ("shard_create", "step_00000002/shard_tp01_pp001.bin",
                 "world rank 5 (tp 1, pp 1, dp 0; cpu:5)", "creating its shard file "),
                ("manifest", "step_00000002/manifest.json",
                 "world rank 0 (tp 0, pp 0, dp 0; cpu:0)", "committing the manifest")):
            ck = os.path.join(tmp, "ck2" + what)
            job = write_job(os.path.join(tmp, "job2%s.json" % what), tokens, ck)
            release = os.path.join(tmp, "release-" + what)
            p, err, took = run_held(mtnlgd, job, preload, hold, release,
                                    "--comm-timeout-ms", str(COMM_TIMEOUT_MS))
            # every rank's message, and the stuck rank's own line
            gave_up = [ln for ln in err.splitlines() if ": given up (its storage" in ln]
            own = [ln for ln in err.splitlines() if "given up on %s, still %s" % (place, doing)
                   in ln and "it waits for its storage to return" in ln]
            fails += check("test_stalled_%s_is_waited_for_then_named" % what,
                           p.returncode != 0 and "fault_preload: holding" in err
                           and gave_up and len(own) == 1
                           and all("%s still %s" % (place, doing) in ln for ln in gave_up)
                           and "step_00000002" in gave_up[0]
                           and "past the comm deadline (%d ms)" % COMM_TIMEOUT_MS in gave_up[0]
                           and "timed out" not in err
                           # (less 10%: the two lines are timed as this
                           # process reads them, the first perhaps late)
                           and took is not None and took >= 0.9 * COMM_TIMEOUT_MS / 1e3,
                           "exit %d, given up %s s after the hold: %s" % (
                               p.returncode, "%.1f" % took if took is not None else None,
                               (gave_up or err.strip().splitlines() or [""])[-1][-400:]))

        # 3. a resume that a rank cannot read names that rank
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
