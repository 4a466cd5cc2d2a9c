"""train.loss_scale.dynamic = false (Megatron's static --loss-scale) in a
real fp16 run of mtnlgd.

usage: test_static_loss_scale.py MTNLGD JOB.json
Checked, on the tiny model at tp 2 x dp 2 (ranks as threads):
  - a static scale of 2^100 overflows every step: each is skipped and
    counted on every line, and the scale stays 2^100 (a dynamic scale would
    have halved it);
  - a static scale of 1024 trains (no step skipped), the scale 1024 on every
    line, and with a growth interval of 2 it never grows;
  - a run saved by a dynamic scaler and resumed with a static scale goes on
    at the job's static scale, not at the saving run's.
"""
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
from local_cluster import check, license_tokens  # noqa: E402


def run(mtnlgd, job, tokens, steps, *sets):
    cmd = [mtnlgd, "--standalone", job, "--log-format", "json",
           "--set", f"data.path={tokens}", "--set", f"train.steps={steps}",
           "--set", "model.n_layer=2", "--set", "parallel.micro_batch=2",
           "--set", "train.global_batch=8", "--set", "train.lr.warmup_steps=1",
           "--set", "parallel.tp=2",
           "--set", "parallel.dp_min=2", "--set", "train.precision=fp16"]
    for s in sets:
        cmd += ["--set", s]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    lines = [json.loads(l) for l in out.stdout.splitlines() if l.startswith("{")]
    return out, lines


def main():
    mtnlgd, job = sys.argv[1], sys.argv[2]
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        tokens = license_tokens(os.path.join(tmp, "tokens.u16"), 100000)
        static = "train.loss_scale.dynamic=false"

        out, lines = run(mtnlgd, job, tokens, 4, static, "train.loss_scale.initial=1.2676506e30")
        failures += check(
            "test_a_static_scale_that_overflows_skips_every_step_and_stays",
            out.returncode == 0 and len(lines) == 4
            and [l.get("skipped") for l in lines] == [True] * 4
            and [l.get("skipped_total") for l in lines] == [1, 2, 3, 4]
            and all(l.get("loss_scale") == 1.2676506e30 for l in lines),
            "exit %d, (skipped, total, scale) %s %s" % (
                out.returncode, [(l.get("skipped"), l.get("skipped_total"), l.get("loss_scale"))
                                 for l in lines], out.stderr[-400:] if out.returncode else ""))

        out, lines = run(mtnlgd, job, tokens, 5, static, "train.loss_scale.initial=1024",
                         "train.loss_scale.growth_interval=2")
        failures += check(
            "test_a_static_scale_trains_and_never_grows",
            out.returncode == 0 and len(lines) == 5
            and not any(l.get("skipped") for l in lines)
            and all(l.get("loss_scale") == 1024 for l in lines)
            and "growth_interval and hysteresis move a dynamic scale" in out.stderr,
            "exit %d, scales %s; the unused keys told: %s" % (
                out.returncode, [l.get("loss_scale") for l in lines],
                "growth_interval and hysteresis move a dynamic scale" in out.stderr))

        ck = os.path.join(tmp, "ck")
        out, lines = run(mtnlgd, job, tokens, 3, f"checkpoint.dir={ck}",
                         "train.loss_scale.initial=4096", "train.loss_scale.growth_interval=1")
        grown = lines[-1].get("loss_scale") if lines else None
        out2, lines2 = run(mtnlgd, job, tokens, 5, f"checkpoint.dir={ck}", static,
                           "train.loss_scale.initial=256")
        failures += check(
            "test_a_resume_with_a_static_scale_takes_the_jobs_scale",
            out.returncode == 0 and out2.returncode == 0 and grown not in (None, 256)
            and [l.get("step") for l in lines2] == [4, 5]
            and all(l.get("loss_scale") == 256 for l in lines2),
            "the saving run's last scale %s; resumed steps %s at scales %s%s" % (
                grown, [l.get("step") for l in lines2], [l.get("loss_scale") for l in lines2],
                "" if out2.returncode == 0 else "\n" + out2.stderr[-600:]))
    print("%d failure(s)" % failures)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
