"""checkpoint.resume_step on a live daemon: a rollback is done once, and
whatever generation gets to do it.

usage: test_rollback_cluster.py MTNLGD FAULT_PRELOAD

One mtnlgd on loopback (tools/local_cluster.py, cpu:1, the tiny model at
tp 1 x pp 1 x dp 1, a checkpoint every 5 steps). A first run trains 10 steps
(checkpoints 5 and 10); then:
- test_rollback_survives_a_failed_first_generation: the operator rolls
  back to step 5 (resume_step 5, 20 steps), and the first generation cannot
  read step 5 (FAULT_PRELOAD fails its shard's reads three times, one
  generation's tries), so it fails before it set anything aside. The next
  generation must still roll back: it resumes from step 5, sets step 10
  aside as rolled back, and prints steps 6 to 20. mtnlgd used to drop
  resume_step after the first generation, and the job trained on from the
  abandoned step 10;
- test_restart_after_a_rollback_does_not_roll_back_again: that job,
  resume_step 5 still in it, started again with more steps (25: a change of
  length, not of trajectory; as systemd restarts a daemon) goes on from its
  own newest checkpoint, step 20, which records the rollback (rolled_back_to
  in its manifest), and keeps the checkpoints trained since: it used to roll
  back to step 5 again and set them aside. (A job that changed its
  trajectory and names the step again rolls back again: test_checkpoints'
  test_resume_names_what_changed_in_the_job.)
Each check prints `ok NAME` or `FAIL NAME: detail`; exit 1 when any failed.
"""
import json
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tools"))
from local_cluster import LocalCluster, check, license_tokens, tiny_job  # noqa: E402


def job(tmp, tokens, ckdir, steps, resume_step):
    return tiny_job(os.path.join(tmp, "job_%d_%d.json" % (steps, resume_step)), tokens,
                    "rollback", steps,
                    parallel={"tp": 1, "pp": 1, "dp_min": 1, "dp_max": 1, "micro_batch": 2},
                    checkpoint={"dir": ckdir, "interval": 5, "resume_step": resume_step})


def run(mtnlgd, tmp, name, job_path, env=None):
    """Runs the one-node cluster to its end: (exit code, node)."""
    c = LocalCluster(mtnlgd, os.path.join(tmp, name), job_path, nodes=1, devices="cpu:1")
    try:
        c.start(env=env)
        code = c.wait_all(180)[0]
        return code, c.nodes[0]
    finally:
        c.kill_all()


def main():
    mtnlgd, preload = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
    tmp = tempfile.mkdtemp(prefix="mt_rollback_")
    failures = 0
    try:
        tokens = license_tokens(os.path.join(tmp, "tokens.u16"))
        ckdir = os.path.join(tmp, "ckpt")
        job_dir = os.path.join(ckdir, "rollback")
        code, n = run(mtnlgd, tmp, "first", job(tmp, tokens, ckdir, 10, -1))
        if code != 0 or "step_00000010" not in os.listdir(job_dir):
            print(n.stderr()[-3000:])
            return check("test_rollback_first_run", False, "exit %s, %s" % (
                code, sorted(os.listdir(job_dir)) if os.path.isdir(job_dir) else "no job dir"))

        rolled = job(tmp, tokens, ckdir, 20, 5)
        env = {"LD_PRELOAD": preload, "MTNLG_FAULT_EIO_FILE": "step_00000005/shard_tp00_pp000.bin",
               "MTNLG_FAULT_EIO_COUNT": "3"}
        code, n = run(mtnlgd, tmp, "rolled", rolled, env)
        steps = [s["step"] for s in n.steps()]
        err = n.stderr()
        listing = sorted(os.listdir(job_dir))
        ok = (code == 0 and steps and steps[0] == 6 and steps[-1] == 20
              and "fault_preload: EIO" in err and "generation 2" in err
              and "step_00000010.rolled-back" in listing
              and open(os.path.join(job_dir, "latest")).read().strip() == "step_00000020")
        failures += check("test_rollback_survives_a_failed_first_generation", ok,
                          "exit %s, steps %s..%s, %s%s" % (
                              code, steps[:1], steps[-1:], listing,
                              "" if ok else "\n" + err[-3000:]))

        code, n = run(mtnlgd, tmp, "restarted", job(tmp, tokens, ckdir, 25, 5))
        steps = [s["step"] for s in n.steps()]
        listing = sorted(os.listdir(job_dir))
        manifest = json.load(open(os.path.join(job_dir, "step_00000020", "manifest.json")))
        ok = (code == 0 and steps and steps[0] == 21 and steps[-1] == 25
              and "step_00000015" in listing and "step_00000020" in listing
              and not any(x.startswith("step_00000015.") or x.startswith("step_00000020.")
                          for x in listing)
              and manifest["extra"].get("rolled_back_to") == 5)
        failures += check("test_restart_after_a_rollback_does_not_roll_back_again", ok,
                          "exit %s, steps %s..%s, %s, step 20's rolled_back_to %s%s" % (
                              code, steps[:1], steps[-1:], listing,
                              manifest["extra"].get("rolled_back_to"),
                              "" if ok else "\n" + n.stderr()[-3000:]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
