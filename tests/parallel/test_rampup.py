"""A global-batch ramp-up (train.rampup_batch: Megatron's --rampup-batch-size,
which MT-NLG trained with) under mtnlgd --standalone.

usage: test_rampup.py MTNLGD

The job ramps from 2 samples a step to 8 in increments of 2 over 24 samples
(an increment every 8), micro-batches of 1, 12 steps.
- test_batches_and_lr_follow_megatron: every step's batch (global_batch),
  consumed tokens and lr equal a transcription, written here from Megatron's
  description, of RampupBatchsizeNumMicroBatches.update(consumed_samples) and
  of its OptimizerParamScheduler stepped by each applied update's samples
  (warmup and decay in samples: warmup_steps and the run-long default decay
  times the final batch);
- test_layouts_agree_during_the_ramp: (tp, pp, dp) = (1,1,2), (1,2,2) and
  (2,2,2) train (1,1,1)'s losses within 1e-5 relative, so every rank agrees
  on each step's micro-batch count;
- test_resume_mid_ramp_is_bit_for_bit: a run stopped during the ramp (after
  step 5, by train.exit_interval: a SIGTERM on seeing step 5 raced the run's
  end, 12 steps of a 2-layer model) resumes on the batch its samples call
  for, with the same later losses, batches and lrs exactly (and the resume
  says the changed exit_interval does not change the trajectory); the
  stopped run leaves checkpoint.export to the run that ends the job;
- test_rampup_refusals: a start that does not split over micro_batch * dp, an
  increment that does not divide the ramp, a start at the final batch, and
  both samples and tokens, each refused naming the key.
"""
import json
import math
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
from local_cluster import check, license_tokens  # noqa: E402

START, INCREMENT, SAMPLES, FINAL, STEPS = 2, 2, 24, 8, 12
PEAK, MIN, WARMUP = 3e-3, 3e-4, 3


def write_job(path, data, ckpt=None, **rampup):
    ramp = {"start": START, "increment": INCREMENT, "samples": SAMPLES}
    ramp.update(rampup)
    job = {"name": "rampup-test", "model": {"preset": "tiny", "n_layer": 2},
           "parallel": {"micro_batch": 1},
           "train": {"global_batch": FINAL, "steps": STEPS, "seed": 5, "rampup_batch": ramp,
                     "lr": {"schedule": "cosine", "peak": PEAK, "min": MIN,
                            "warmup_steps": WARMUP}},
           "data": {"path": data}}
    if ckpt:
        job["checkpoint"] = {"dir": ckpt}
    with open(path, "w") as f:
        json.dump(job, f)
    return path


def args(mtnlgd, job, sets):
    out = [mtnlgd, "--standalone", job, "--log-format", "json"]
    for s in sets:
        out += ["--set", s]
    return out


def lines_of(text):
    return {r["step"]: r for r in (json.loads(l) for l in text.splitlines() if l.startswith("{"))}


def run(mtnlgd, job, *sets):
    p = subprocess.run(args(mtnlgd, job, sets), capture_output=True, text=True, timeout=300)
    return p, lines_of(p.stdout)




# ---- the reference: Megatron's calculator and scheduler, as documented ----

def megatron_batch(consumed):
    """RampupBatchsizeNumMicroBatches.update: past the ramp-up samples the
    final batch, else start plus one increment per (samples / increments)
    samples consumed, the division in floating point."""
    increments = (FINAL - START) // INCREMENT
    per_increment = SAMPLES / increments
    if consumed > SAMPLES:
        return FINAL
    return START + int(consumed / per_increment) * INCREMENT


def megatron_lr(num_samples, warmup_samples, decay_samples):
    """OptimizerParamScheduler.get_lr with lengths in samples, from 0."""
    if warmup_samples > 0 and num_samples <= warmup_samples:
        return PEAK * num_samples / warmup_samples
    if num_samples > decay_samples:
        return MIN
    ratio = (num_samples - warmup_samples) / (decay_samples - warmup_samples)
    return MIN + 0.5 * (math.cos(math.pi * ratio) + 1.0) * (PEAK - MIN)


def reference():
    """(batch, consumed samples after, lr) of each step, 1-based."""
    consumed, batches = 0, []
    for _ in range(STEPS):
        batches.append(megatron_batch(consumed))
        consumed += batches[-1]
    # Megatron's lr_decay_samples defaults to the run's samples; the job's
    # lengths are steps of the final batch, so that rounds up to whole ones
    decay = -(-consumed // FINAL) * FINAL
    out, done = {}, 0
    for i, b in enumerate(batches):
        out[i + 1] = (b, done + b, megatron_lr(done, WARMUP * FINAL, decay))
        done += b
    return out


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-30)


def main():
    mtnlgd = sys.argv[1]
    fails = 0
    with tempfile.TemporaryDirectory() as tmp:
        tokens = license_tokens(os.path.join(tmp, "tokens.u16"))
        seq = None
        job = write_job(os.path.join(tmp, "job.json"), tokens)
        p, one = run(mtnlgd, job)
        want = reference()
        if one:
            seq = one[1]["consumed_tokens"] // want[1][0]
        bad = [s for s in want
               if s not in one or one[s].get("global_batch") != want[s][0]
               or one[s]["consumed_tokens"] != want[s][1] * seq
               or rel(one[s]["lr"], want[s][2]) > 1e-8]  # printed to 9 digits
        fails += check("test_batches_and_lr_follow_megatron",
                       p.returncode == 0 and len(one) == STEPS and not bad,
                       "exit %d; batches %s (want %s); steps that differ: %s%s" % (
                           p.returncode, [one[s].get("global_batch") for s in sorted(one)],
                           [want[s][0] for s in sorted(want)], bad,
                           "" if p.returncode == 0 else "\n" + p.stderr[-2000:]))

        worst, detail = 0.0, []
        for tp, pp, dp in ((1, 1, 2), (1, 2, 2), (2, 2, 2)):
            q, other = run(mtnlgd, job, "parallel.tp=%d" % tp, "parallel.pp=%d" % pp,
                           "parallel.dp_min=%d" % dp)
            ok = q.returncode == 0 and sorted(other) == sorted(one)
            w = max((rel(other[s]["loss"], one[s]["loss"]) for s in one if s in other),
                    default=math.inf)
            worst = max(worst, w if ok else math.inf)
            detail.append("(%d,%d,%d) %s" % (tp, pp, dp, "%.1e" % w if ok else
                                             "exit %d: %s" % (q.returncode, q.stderr[-800:])))
        fails += check("test_layouts_agree_during_the_ramp", worst <= 1e-5,
                       "worst relative loss difference: " + ", ".join(detail))

        ck = os.path.join(tmp, "ck")
        job = write_job(os.path.join(tmp, "ck.json"), tokens, ckpt=ck)
        export = os.path.join(tmp, "rampup.safetensors")
        p1, a = run(mtnlgd, job, "train.exit_interval=5", "checkpoint.export=" + export)
        exported_early = os.path.exists(export)
        p2, b = run(mtnlgd, job, "checkpoint.export=" + export)
        first = min(b) if b else None
        same = (a and b and first == max(a) + 1 and max(b) == STEPS
                and all(b[s]["loss"] == one[s]["loss"] and b[s]["lr"] == one[s]["lr"]
                        and b[s].get("global_batch") == one[s]["global_batch"] for s in b))
        fails += check("test_resume_mid_ramp_is_bit_for_bit",
                       p1.returncode == 0 and p2.returncode == 0 and same and max(a) == 5
                       and "stopped at step 5 of 12: a multiple of train.exit_interval (5)"
                       in p1.stderr
                       and "(its trajectory does not): train.exit_interval 5 -> " in p2.stderr
                       and not exported_early and os.path.exists(export)
                       and "export to %s skipped: the run stopped for train.exit_interval" % export
                       in p1.stderr
                       and "resumed from" in p2.stderr and first is not None
                       and want[first][0] < FINAL,
                       "stopped at %s, resumed at %s (batch %s), later steps equal: %s%s" % (
                           max(a) if a else None, first,
                           b[first].get("global_batch") if first else None, same,
                           "" if p1.returncode == 0 and p2.returncode == 0
                           else "\n" + p1.stderr[-1500:] + p2.stderr[-1500:]))

        refusals = [
            ({"start": 3, "increment": 5}, ["parallel.dp_min=2"], "train.rampup_batch"),
            ({"start": 2}, ["parallel.dp_min=4"], "train.rampup_batch"),
            ({"increment": 4}, [], "train.rampup_batch.increment"),
            ({"start": 8}, [], "train.rampup_batch.start"),
            ({"tokens": 1000}, [], "train.rampup_batch"),
        ]
        said = []
        for i, (ramp, sets, key) in enumerate(refusals):
            j = write_job(os.path.join(tmp, "bad%d.json" % i), tokens, **ramp)
            q, _ = run(mtnlgd, j, *sets)
            said.append((q.returncode, key in q.stderr))
            if q.returncode != 2 or key not in q.stderr:
                print("refusal %d (%s %s): exit %d\n%s" % (i, ramp, sets, q.returncode,
                                                          q.stderr[-1500:]))
        fails += check("test_rampup_refusals", all(rc == 2 and named for rc, named in said),
                       "(exit, key named): %s" % said)
    print("%d passed, %d failed" % (4 - fails, fails))
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
