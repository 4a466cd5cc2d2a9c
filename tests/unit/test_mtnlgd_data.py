"""mtnlgd --standalone on Megatron indexed datasets: blend, split, validation.

usage: test_mtnlgd_data.py MTNLGD MTNLG_PREPROCESS JOB.json
Two byte-level datasets (license texts, fortunes-like generated text) are
built with mtnlg-preprocess; a 70/30 blend trains 40 steps with validation
every 10 and must: log val_loss at steps 10, 20, 30, 40 (each on the next
batches of the valid split, test_eval_splits checks which), report per-dataset
consumption within one sample of 70/30, refuse a blend weight of 0 with the
key named, and give the same losses when run twice (cached indices reused);
run with train.log_interval=4, each line's loss is the mean of the steps
since the line before.
An export path or a checkpoint.dir that cannot be written is refused before
the first step; so are a --presets directory that is not there, a
--procs of 0 and a --devices cpu:N whose N is not the job's ranks, naming
the option. Data too short for one sample is refused before the model's
weights are made (a model.init_from that is not there goes unread).
"""
import glob
import json
import os
import re
import subprocess
import sys
import tempfile


def run(cmd, ok=True):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if ok and out.returncode != 0:
        print(out.stdout, out.stderr)
        raise SystemExit(f"{cmd[0]} exited {out.returncode}")
    return out


def main():
    mtnlgd, prep, job = sys.argv[1:4]
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        lic = [f for f in sorted(glob.glob("/usr/share/common-licenses/*"))
               if os.path.isfile(f) and not os.path.islink(f)]
        gen = os.path.join(tmp, "gen.txt")
        with open(gen, "w") as fh:
            for i in range(3000):
                fh.write(f"Item {i}: the quick brown fox jumps over {i % 7} lazy dogs.\n\n")
        a, b = os.path.join(tmp, "licenses"), os.path.join(tmp, "generated")
        run([prep, "--quiet", "--tokenizer", "bytes", "--format", "text", "--text-docs",
             "paragraph", "--input", *lic, "--output-prefix", a])
        run([prep, "--quiet", "--tokenizer", "bytes", "--format", "text", "--text-docs",
             "paragraph", "--input", gen, "--output-prefix", b])
        data = {"blend": [{"prefix": a, "weight": 0.7}, {"prefix": b, "weight": 0.3}],
                "split": "90,10,0", "cache_dir": os.path.join(tmp, "cache")}
        args = [mtnlgd, "--standalone", job, "--log-format", "json",
                "--set", "data=" + json.dumps(data), "--set", "model.vocab_size=257",
                "--set", "train.steps=40", "--set", "train.lr.warmup_steps=4",
                "--set", 'eval={"interval": 10, "iters": 2}']
        first = run(args)
        steps = [json.loads(l) for l in first.stdout.splitlines() if l.startswith("{")]
        evals = [s["step"] for s in steps if "val_loss" in s]
        if evals != [10, 20, 30, 40]:
            print(f"FAIL test_validation_every_interval: val_loss at steps {evals}")
            failures += 1
        else:
            print("ok test_validation_every_interval:",
                  [round(s["val_loss"], 4) for s in steps if "val_loss" in s])
        m = re.search(r"data consumed: licenses ([0-9.]+)%, generated ([0-9.]+)% of (\d+) samples",
                      first.stderr)
        if not m:
            print("FAIL test_blend_consumption_reported: no consumption line\n" + first.stderr)
            failures += 1
        else:
            share_a, n = float(m.group(1)), int(m.group(3))
            if n != 40 * 16 or abs(share_a / 100 * n - 0.7 * n) > 1.0:
                print(f"FAIL test_blend_consumption_reported: {m.group(0)}")
                failures += 1
            else:
                print(f"ok test_blend_consumption_reported: {m.group(0)}")
        second = run(args)
        again = [json.loads(l) for l in second.stdout.splitlines() if l.startswith("{")]
        if [s["loss"] for s in again] != [s["loss"] for s in steps]:
            print("FAIL test_rerun_with_cached_indices_is_identical")
            failures += 1
        else:
            print("ok test_rerun_with_cached_indices_is_identical")
        # a line every 4 steps gives the mean loss of the steps since the
        # last line, as Megatron's log does (the run is the same one)
        every4 = run(args + ["--set", "train.log_interval=4"])
        lines = [json.loads(l) for l in every4.stdout.splitlines() if l.startswith("{")]
        loss_at = {s["step"]: s["loss"] for s in steps}
        prev, bad_lines = 0, []
        for line in lines:
            covered = range(prev + 1, line["step"] + 1)
            want = sum(loss_at[k] for k in covered) / len(covered)
            if (abs(line["loss"] - want) > 1e-6 * abs(want)
                    or line.get("interval_steps", 1) != len(covered)):
                bad_lines.append((line["step"], line["loss"], want, line.get("interval_steps")))
            prev = line["step"]
        printed = [line["step"] for line in lines]
        if bad_lines or printed != [1, 4, 8, 10, 12, 16, 20, 24, 28, 30, 32, 36, 40]:
            print(f"FAIL test_log_interval_prints_the_mean_loss: steps {printed}, "
                  f"(step, loss, mean, interval_steps) off: {bad_lines}")
            failures += 1
        else:
            print(f"ok test_log_interval_prints_the_mean_loss: {len(lines)} lines")
        bad = dict(data, blend=[{"prefix": a, "weight": 0}])
        out = run([mtnlgd, "--standalone", job, "--set", "data=" + json.dumps(bad)], ok=False)
        if out.returncode != 2 or "data.blend[0].weight: 0 must be > 0" not in out.stderr:
            print(f"FAIL test_zero_weight_refused: exit {out.returncode}\n{out.stderr}")
            failures += 1
        else:
            print("ok test_zero_weight_refused")
        # an export that cannot be written is refused before the first step,
        # not after the run (which lost the model of a job without checkpoints)
        # (a directory is Hugging Face's sharded layout: test_ckpt_convert)
        for target, says in ((os.path.join(gen, "m.safetensors"), gen + " is not a directory"),
                             (os.path.join(tmp, "no-such-dir", "m.safetensors"), "does not exist")):
            out = run([mtnlgd, "--standalone", job, "--set", "data=" + json.dumps(data),
                       "--set", "train.steps=3", "--set", "train.lr.warmup_steps=1",
                       "--export", target], ok=False)
            if out.returncode == 0 or says not in out.stderr or '"step"' in out.stdout:
                print(f"FAIL test_bad_export_refused_before_training ({says}): exit "
                      f"{out.returncode}\n{out.stderr[-2000:]}")
                failures += 1
            else:
                print(f"ok test_bad_export_refused_before_training ({says})")
        # so is a checkpoint directory that cannot be made or written: every
        # save of the run failed, and the run went on to its end, exit 0.
        # It is the job's fault, exit 2 as on a node (1 would have a
        # supervisor start it again to fail the same way)
        blocked = os.path.join(gen, "ckpt")  # gen is a file: no directory under it
        out = run([mtnlgd, "--standalone", job, "--set", "data=" + json.dumps(data),
                   "--set", "train.steps=3", "--set", "train.lr.warmup_steps=1",
                   "--set", "checkpoint.dir=" + blocked, "--set", "checkpoint.interval=1"],
                  ok=False)
        if (out.returncode != 2 or "checkpoint.dir " + blocked not in out.stderr
                or "Not a directory" not in out.stderr or '"step"' in out.stdout):
            print(f"FAIL test_unwritable_checkpoint_dir_refused_before_training: exit "
                  f"{out.returncode}\n{out.stderr[-2000:]}")
            failures += 1
        else:
            print("ok test_unwritable_checkpoint_dir_refused_before_training")
        # data that cannot serve the job is found before the weights are
        # made and model.init_from is read (minutes at scale): with both
        # wrong, the data is named
        few = os.path.join(tmp, "few.u16")
        with open(few, "wb") as fh:
            fh.write(bytes(20))  # 10 tokens: not one sample of 64 + 1
        out = run([mtnlgd, "--standalone", job, "--set", "data.path=" + few,
                   "--set", "model.init_from=" + os.path.join(tmp, "no-such.safetensors")],
                  ok=False)
        if (out.returncode != 2 or "fewer than one sample" not in out.stderr
                or "init_from" in out.stderr):
            print(f"FAIL test_data_checked_before_the_model: exit {out.returncode}\n"
                  f"{out.stderr[-1500:]}")
            failures += 1
        else:
            print("ok test_data_checked_before_the_model")
        # options that cannot be right are refused, naming the option
        for opts, says in ((["--presets", os.path.join(tmp, "no-presets")],
                            "--presets %s: No such file or directory"
                            % os.path.join(tmp, "no-presets")),
                           (["--procs", "0", "--store", tmp],
                            '--procs "0": want a whole number from 1'),
                           # cpu:N counts the devices, one per rank: an N that is
                           # not the job's ranks was taken and ignored (1 rank ran)
                           (["--devices", "cpu:3"],
                            "--devices cpu:3 names 3 CPU devices; this process runs 1 rank"),
                           (["--devices", "cpu:0"],
                            "--devices cpu:0 names 0 CPU devices; this process runs 1 rank")):
            out = run([mtnlgd, "--standalone", job, "--log-format", "json",
                       "--set", "data=" + json.dumps(data), "--set", "model.vocab_size=257",
                       "--set", "train.steps=2", "--set", "train.lr.warmup_steps=1"] + opts,
                      ok=False)
            if out.returncode != 2 or says not in out.stderr or '"step"' in out.stdout:
                print(f"FAIL test_bad_option_refused_naming_it ({' '.join(opts[:2])}): exit "
                      f"{out.returncode}\n{out.stderr[-1000:]}")
                failures += 1
            else:
                print(f"ok test_bad_option_refused_naming_it ({' '.join(opts[:2])})")
        # the count of the job's ranks is cpu:N's one meaning: dp 2 on cpu:2
        out = run([mtnlgd, "--standalone", job, "--log-format", "json",
                   "--set", "data=" + json.dumps(data), "--set", "model.vocab_size=257",
                   "--set", "train.steps=2", "--set", "train.lr.warmup_steps=1",
                   "--set", "parallel.dp_min=2", "--devices", "cpu:2"], ok=False)
        if out.returncode != 0 or out.stdout.count('"step"') != 2:
            print(f"FAIL test_devices_cpu_n_of_the_jobs_ranks_runs: exit {out.returncode}\n"
                  f"{out.stderr[-1000:]}")
            failures += 1
        else:
            print("ok test_devices_cpu_n_of_the_jobs_ranks_runs")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
