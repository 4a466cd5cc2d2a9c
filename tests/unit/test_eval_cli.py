#!/usr/bin/python3
"""mtnlg-eval's command line without torch (test_eval.py, which needs it,
checks the tasks).

usage: test_eval_cli.py MTNLG_EVAL MTNLGD JOB.json
- test_unusable_device_refused_before_the_export: with a checkpoint as the
  model, --device gpu (no such kind), cpu:x (no index) and cuda:4095 (no
  such GPU, or no CUDA in this build) exit 2 naming --device, and no export
  was made ($TMPDIR stays empty, no "exported to" line): the export came
  first and takes minutes at 530B.
- test_generate_without_a_prompt_says_so: generate with a model and no
  --prompt exits 2 saying --prompt is needed.
"""
import array
import os
import subprocess
import sys
import tempfile


def main():
    evaluator, mtnlgd, job = sys.argv[1:4]
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        tokens = os.path.join(tmp, "tokens.u16")
        with open(tokens, "wb") as f:
            f.write(array.array("H", [i % 200 for i in range(40000)]).tobytes())
        ckpt = os.path.join(tmp, "ckpt")
        t = subprocess.run([mtnlgd, "--standalone", job, "--set", f"data.path={tokens}",
                            "--set", "train.steps=2", "--set", "train.lr.warmup_steps=1",
                            "--set", f"checkpoint.dir={ckpt}"],
                           capture_output=True, text=True, timeout=120)
        if t.returncode:
            print(t.stderr[-2000:])
            print(f"FAIL training the checkpoint: mtnlgd exited {t.returncode}")
            return 1
        doc = os.path.join(tmp, "doc.txt")
        with open(doc, "w") as f:
            f.write("the quick brown fox jumps over the lazy dog\n" * 20)
        scratch = os.path.join(tmp, "scratch")
        os.makedirs(scratch)
        env = dict(os.environ, TMPDIR=scratch)
        for device in ("gpu", "cpu:x", "cuda:4095"):
            p = subprocess.run([evaluator, "perplexity", os.path.join(ckpt, "tiny-demo"), doc,
                                "--device", device], capture_output=True, text=True,
                               timeout=120, env=env)
            ok = (p.returncode == 2 and f"mtnlg-eval: --device {device}: " in p.stderr
                  and "exported to" not in p.stderr and not os.listdir(scratch))
            print(f"{'ok' if ok else 'FAIL'} test_unusable_device_refused_before_the_export "
                  f"({device}): exit {p.returncode}: {p.stderr.strip()[-400:]}")
            failures += not ok
        # generate without --prompt is told what is missing, not "no file"
        p = subprocess.run([evaluator, "generate", os.path.join(ckpt, "tiny-demo")],
                           capture_output=True, text=True, timeout=60, env=env)
        ok = (p.returncode == 2 and "mtnlg-eval: generate needs --prompt TEXT" in p.stderr
              and not os.listdir(scratch))
        print(f"{'ok' if ok else 'FAIL'} test_generate_without_a_prompt_says_so: "
              f"exit {p.returncode}: {p.stderr.strip()[-400:]}")
        failures += not ok
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
