#!/usr/bin/env python3
"""mtnlgctl plan end to end: JSON output and its fields, the refusal of a job
that does not fit (exit 1), usage errors (exit 2), help for the verb.

Usage: test_mtnlgctl_plan.py MTNLGCTL JOB_DIR
"""
import json
import subprocess
import sys

failures = 0


def check(cond, what, proc=None):
    global failures
    if cond:
        return
    failures += 1
    print(f"check failed: {what}", file=sys.stderr)
    if proc is not None:
        print(f"  exit {proc.returncode}\n  stdout: {proc.stdout[:2000]}\n"
              f"  stderr: {proc.stderr[:2000]}", file=sys.stderr)


def run(*args):
    return subprocess.run([ctl, *args], capture_output=True, text=True, timeout=60)


def test_530b_json_has_the_fields():
    p = run("plan", f"{jobs}/mtnlg-530b.json", "-o", "json")
    check(p.returncode == 0, "plan mtnlg-530b -o json exits 0", p)
    d = json.loads(p.stdout)
    check(d["job"] == "mtnlg-530b" and len(d["hash"]) == 16, "job and hash")
    lay = d["layout"]
    check((lay["tp"], lay["pp"], lay["dp"], lay["devices"]) == (8, 35, 16, 4480), "layout")
    check(lay["precision"] == "bf16" and lay["recompute"] is True, "precision and recompute")
    check(d["model"]["padded_vocab"] == 51200 and abs(d["model"]["params"] / 530e9 - 1) < 0.002,
          "model")
    stages = d["memory"]["stages"]
    check(len(stages) == 35 and d["memory"]["fits"] is True, "35 stages that fit")
    keys = {"stage", "first_layer", "layers", "params", "optimizer_params",
            "inflight_micro_batches", "weights_bytes", "grads_bytes", "optimizer_bytes",
            "activations_bytes", "logits_bytes", "comm_bytes", "total_bytes"}
    check(keys <= set(stages[0]), f"stage fields {keys - set(stages[0])} missing")
    for s in stages:
        parts = sum(s[k] for k in ("weights_bytes", "grads_bytes", "optimizer_bytes",
                                   "activations_bytes", "logits_bytes", "comm_bytes"))
        check(parts == s["total_bytes"], f"stage {s['stage']} total is the sum of its parts")
    worst = stages[d["memory"]["worst_stage"]]
    check(worst["total_bytes"] == max(s["total_bytes"] for s in stages), "worst stage")
    check(worst["total_bytes"] <= d["device"]["usable_bytes"], "worst fits usable memory")
    check(abs(d["flops"]["executed_per_step"] / 1.69e19 - 1) < 0.002, "eq. 3 FLOPs")
    check(d["flops"]["model_per_step"] < d["flops"]["executed_per_step"], "model < executed")
    check(abs(d["bubble_fraction"] - 34 / 154) < 1e-9, "bubble")
    check(d["refusal"] is None, "no refusal")
    # the run's length: train.tokens 270e9 resolved to whole batches (Megatron's
    # --train-samples rule; test_job checks the count against its loop)
    check(d["run"] == {"steps": 80086, "samples": 131834240, "tokens": 131834240 * 2048,
                       "given_as": "tokens", "given": 270000000000}, f"run {d.get('run')}")
    for k in ("step_time_s", "step_time_with_bubble_s", "tokens_per_s",
              "model_tflops_per_device"):
        check(d[k] > 0, f"{k} > 0")

    # the paper's 2240 GPUs at 126 TFLOP/s: about 60 s per step
    p = run("-o", "json", "plan", f"{jobs}/mtnlg-530b.json", "--devices", "2240",
            "--device-tflops", "126")
    check(p.returncode == 0, "plan --devices 2240", p)
    d = json.loads(p.stdout)
    check(d["layout"]["dp"] == 8 and abs(d["step_time_s"] / 60.1 - 1) < 0.05, "60 s on 2240")


def test_table_names_its_unit():
    p = run("plan", f"{jobs}/mtnlg-530b.json")
    check(p.returncode == 0, "plan mtnlg-530b exits 0", p)
    check("1 GB = 10^9 bytes" in p.stdout and "step time" in p.stdout, "table header", p)
    check("\n  run        80086 steps (train.tokens = 270000000000 in whole batches): "
          "131834240 samples, 269996523520 tokens\n" in p.stdout, "the resolved steps", p)
    p = run("plan", f"{jobs}/mtnlg-530b.json", "--set", "train.steps=100")
    check(p.returncode == 0 and "\n  run        100 steps: 3200 samples, 6553600 tokens\n"
          in p.stdout, "--set train.steps replaces train.tokens", p)
    p = run("plan", f"{jobs}/mtnlg-530b.json", "--stages")
    check(p.stdout.count("\n  3 ") == 1 and "34 head" in p.stdout, "--stages lists all", p)


def test_job_that_does_not_fit_exits_1_with_refusal():
    for out in ("table", "json"):
        p = run("plan", f"{jobs}/mtnlg-530b.json", "--set", "parallel.recompute=false",
                "--set", "train.precision=fp32", "--set", "parallel.micro_batch=2", "-o", out)
        check(p.returncode == 1, f"non-fitting job exits 1 (-o {out})", p)
        check("plan: stage 0 needs 126.6 GB per device (weights 8.2, grads 8.2" in p.stderr
              and "but the devices have 80.0 GB" in p.stderr, "refusal line", p)
        if out == "json":
            d = json.loads(p.stdout)
            check(d["memory"]["fits"] is False and d["refusal"].startswith("plan: stage 0"),
                  "json carries the refusal", p)
        else:
            check("DOES NOT FIT" in p.stdout, "table printed with the refusal", p)
    # the same job on 141 GB devices fits
    p = run("plan", f"{jobs}/mtnlg-530b.json", "--set", "parallel.recompute=false",
            "--device-memory", "141")
    check(p.returncode == 0, "fits on 141 GB", p)


def test_usage_errors_exit_2():
    for args, what in ((["frobnicate"], "unknown verb"),
                       ([], "no verb"),
                       (["plan"], "missing job"),
                       (["plan", "a.json", "b.json"], "two jobs"),
                       (["plan", f"{jobs}/mtnlg-530b.json", "--devices", "x"], "bad number"),
                       (["plan", f"{jobs}/mtnlg-530b.json", "--set", "train.steps"],
                        "--set without ="),
                       (["plan", f"{jobs}/mtnlg-530b.json", "--efficiency", "1.5"],
                        "efficiency > 1"),
                       (["plan", f"{jobs}/mtnlg-530b.json", "-o", "yaml"], "bad format"),
                       (["--nope"], "unknown option")):
        p = run(*args)
        check(p.returncode == 2, f"{what} exits 2", p)
    p = run("frobnicate")
    check('unknown verb "frobnicate"' in p.stderr and "plan" in p.stderr,
          "unknown verb lists the verbs", p)
    # a job that cannot be planned is a failure, not a usage error
    p = run("plan", f"{jobs}/mtnlg-530b.json", "--devices", "281")
    check(p.returncode == 1 and "not a positive multiple of tp * pp" in p.stderr, "281 devices", p)
    p = run("plan", f"{jobs}/does-not-exist.json")
    check(p.returncode == 1 and "does-not-exist.json" in p.stderr, "missing file", p)


def test_help():
    for args in (["--help"], ["help"]):
        p = run(*args)
        check(p.returncode == 0 and "plan" in p.stdout and "Usage: mtnlgctl" in p.stdout,
              f"{args} lists the verbs", p)
    for args in (["plan", "--help"], ["help", "plan"], ["plan", "-h"]):
        p = run(*args)
        check(p.returncode == 0 and "--device-tflops" in p.stdout, f"{args} shows plan's help", p)
    p = run("help", "frobnicate")
    check(p.returncode == 2, "help for an unknown verb exits 2", p)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    ctl, jobs = sys.argv[1], sys.argv[2]
    for t in (test_530b_json_has_the_fields, test_table_names_its_unit,
              test_job_that_does_not_fit_exits_1_with_refusal, test_usage_errors_exit_2,
              test_help):
        before = failures
        t()
        print(f"  {'ok' if failures == before else 'FAILED'} {t.__name__}")
    print("test_mtnlgctl_plan: " + ("all passed" if not failures else f"{failures} failure(s)"))
    sys.exit(1 if failures else 0)
