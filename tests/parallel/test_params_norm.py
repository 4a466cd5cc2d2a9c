"""train.log_params_norm (Megatron's --log-params-norm): the norm of the fp32
master weights after each update, on the step line.

usage: test_params_norm.py MTNLGD JOB.json
The tiny model trains 4 steps on real text at (tp, pp, dp) = (1, 1, 1) and
(2, 2, 2), exporting its weights at the end. Checked:
  - the last step's params norm equals the norm of the exported weights,
    summed here in double precision (the tied embedding counted once, as
    the export holds it once), within 1e-6 relative;
  - at tp 2 x pp 2 x dp 2 every step's params norm equals one device's
    within 1e-5 relative (the trajectory's own tolerance in test_layouts):
    each rank sums its ZeRO slice less the tied embedding's second copy and,
    on tp ranks but the first, the replicated tensors, so no parameter is
    counted twice or left out;
  - the text step line says "params norm X" after the grad norm;
  - a job without the key prints no params norm (JSON nor text);
  - turning it on for a resume is no change to the run (the resume's log
    does not say the run departs from the saved one's trajectory).
"""
import json
import math
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
from local_cluster import check, license_tokens  # noqa: E402
from test_layouts import st_load  # noqa: E402


def run(mtnlgd, job, tokens, export, tp, pp, dp, log_format="json", norm=True, extra=(),
        full=False):
    cmd = [mtnlgd, "--standalone", job, "--log-format", log_format,
           "--set", f"data.path={tokens}", "--set", "train.steps=4",
           "--set", "train.lr.warmup_steps=1", "--set", "model.n_layer=4",
           "--set", "parallel.micro_batch=2", "--set", "train.global_batch=8",
           "--set", f"parallel.tp={tp}", "--set", f"parallel.pp={pp}",
           "--set", f"parallel.dp_min={dp}", "--export", export]
    if norm:
        cmd += ["--set", "train.log_params_norm=true"]
    for s in extra:
        cmd += ["--set", s]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        print(out.stderr)
        raise SystemExit(f"tp {tp} pp {pp} dp {dp}: mtnlgd exited {out.returncode}")
    return out if full else out.stdout


def main():
    mtnlgd, job = sys.argv[1], sys.argv[2]
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        tokens = license_tokens(os.path.join(tmp, "tokens.u16"))
        norms = {}
        for layout in ((1, 1, 1), (2, 2, 2)):
            export = os.path.join(tmp, "w-%d-%d-%d.safetensors" % layout)
            lines = [json.loads(l) for l in run(mtnlgd, job, tokens, export, *layout).splitlines()
                     if l.startswith("{")]
            norms[layout] = [l.get("params_norm") for l in lines]
            w = st_load(export)
            truth = math.sqrt(sum(float(x) ** 2 for t in w.values() for x in t))
            got = norms[layout][-1] if norms[layout] else None
            rel = abs(got - truth) / truth if isinstance(got, float) else None
            failures += check("test_params_norm_is_the_norm_of_the_exported_weights_tp%d_pp%d_dp%d"
                              % layout, len(lines) == 4 and rel is not None and rel < 1e-6,
                              "last step %s, the export's (%d tensors, float64) %.9g, relative %s"
                              % (got, len(w), truth, rel))
        one, many = norms[(1, 1, 1)], norms[(2, 2, 2)]
        worst = max((abs(a - b) / b for a, b in zip(many, one)), default=None) \
            if all(isinstance(x, float) for x in one + many) else None
        failures += check("test_params_norm_at_tp2_pp2_dp2_is_one_devices",
                          len(one) == len(many) == 4 and worst is not None and worst < 1e-5,
                          "one device %s, tp2 x pp2 x dp2 %s, worst relative %s"
                          % (one, many, worst))
        text = run(mtnlgd, job, tokens, os.path.join(tmp, "t.safetensors"), 1, 1, 1, "text")
        steps = [l for l in text.splitlines() if l.startswith("step ")]
        failures += check("test_text_line_says_params_norm_after_the_grad_norm",
                          len(steps) == 4 and all(re.search(
                              r"\| grad norm [\d.]+ \| params norm [\d.]+ \| +[\d.]+ ms \|", l)
                              for l in steps), str(steps[-1:]))
        plain = run(mtnlgd, job, tokens, os.path.join(tmp, "p.safetensors"), 1, 1, 1, norm=False)
        text = run(mtnlgd, job, tokens, os.path.join(tmp, "q.safetensors"), 1, 1, 1, "text",
                   norm=False)
        failures += check("test_no_params_norm_unless_asked",
                          "params_norm" not in plain and "params norm" not in text
                          and plain.count('"step"') == 4, "json %r, text %r"
                          % (plain.splitlines()[-1:], text.splitlines()[-1:]))
        # (the decay given: by default it follows train.steps, which the resume lengthens)
        ck = ["checkpoint.dir=" + os.path.join(tmp, "ck"), "train.lr.decay_steps=6"]
        run(mtnlgd, job, tokens, os.path.join(tmp, "r1.safetensors"), 1, 1, 1, norm=False,
            extra=ck)
        resumed = run(mtnlgd, job, tokens, os.path.join(tmp, "r2.safetensors"), 1, 1, 1,
                      extra=ck + ["train.steps=6"], full=True)
        said = [l for l in resumed.stderr.splitlines() if "resume: the job changed" in l]
        failures += check("test_turning_it_on_for_a_resume_is_no_change_to_the_run",
                          len(said) == 1 and "its trajectory does not" in said[0]
                          and "log_params_norm" in said[0] and '"params_norm"' in resumed.stdout,
                          str(said))
    print("%d failure(s)" % failures)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
