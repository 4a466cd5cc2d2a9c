"""Megatron-LM's validation and test passes against PyTorch (torch_gpt.py,
float64) on the samples each must read.

usage: test_eval_splits.py MTNLGD MTNLGCTL
A byte-level indexed dataset of 100 sequences is written here (split
"60,30,10", data.shuffle false, so sample i of a split is tokens
[i*seq, i*seq + seq + 1) of its sequences laid end to end, epoch after
epoch: the valid and test splits are smaller than the runs ask for and
wrap around). A tiny model trains 6 steps, validating every 3 with 2
batches of 4 samples, a checkpoint at every step; each loss is checked
against torch_gpt's on the step's exported checkpoint:
- test_validation_reads_on: the validation after step 3 reads the valid
  split's batches 0-1, the one after step 6 batches 2-3 (Megatron's valid
  iterator moving on, not the same batches each time);
- test_end_of_training_validation: at the last step (a multiple of the
  interval) the validation at the end of training reads on, batches 4-5;
- test_test_pass: the test split's batches 0-1, after the last step;
- test_nothing_to_train_still_runs_the_end_passes: run again after its
  last step, the job resumes with nothing to train and, as Megatron's,
  still logs the validation at the end of training and the test pass,
  with the losses the run had;
- test_failed_test_pass_keeps_the_last_checkpoint: a data.test holding a
  token past the vocabulary fails the run at the test pass (exit 2, naming
  the dataset and the split), after the last step's checkpoint committed
  (it used to run before that save, losing every step since the last
  interval checkpoint), the last step still reported on its step line;
- test_failed_validation_keeps_its_steps_checkpoint: a data.valid holding
  a token past the vocabulary fails the run at the first validation (step
  3, exit 2, naming the dataset and the split), after step 3's checkpoint
  committed, with checkpoint.async false and true (a save on a validation
  step is made whole before it; Megatron validates, then saves, and the
  step's work was lost), step 3 still reported without a validation loss;
- test_resumed_run_reads_the_same: a run stopped by train.exit_interval
  after step 4 validates batches 2-3 (what the next interval's will), with
  no end-of-training validation or test pass, and resumed to the end logs
  bit for bit the uninterrupted run's losses;
- test_layouts_read_the_same_samples: pp 3 (a middle stage, which opens no
  data, agrees on the test pass) x dp 2 logs the validations and the test
  pass of pp 1 x dp 1 (3 layers);
- test_data_valid_and_test_read_whole: data.valid (a prefix) and data.test
  (a blend of one) are Megatron's --valid-data-path and --test-data-path:
  each dataset read whole, on from sample 0, in place of data.split's
  shares;
- test_flat_file_validates_on_data_valid: data.path with data.valid
  validates, and has no test pass;
- test_eval_test_false: eval.test false runs no test pass, and the text
  log has Megatron's "at the end of training for val data" line but not
  the test data one; a split without a test share runs none either.
"""
import json
import math
import os
import random
import re
import struct
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools"))
import torch_gpt  # noqa: E402
from local_cluster import indexed_dataset  # noqa: E402

SEQ, G, MICRO, ITERS, INTERVAL, STEPS = 64, 4, 2, 2, 3, 6
REL = 2e-5  # fp32 engine against float64 torch


def split_range(split, n, which):
    """Megatron's get_train_valid_test_split_."""
    w = [float(x) for x in split.split(",")]
    w += [0.0] * (3 - len(w))
    w = [x / sum(w) for x in w]
    idx = [0]
    for x in w:
        idx.append(idx[-1] + int(round(x * float(n))))
    diff = idx[-1] - n
    idx = [idx[0]] + [i - diff for i in idx[1:]]
    return idx[which], idx[which + 1]


def samples(seqs, split, which, first, count):
    """Samples first..first+count-1 of a split read in file order, in epochs."""
    lo, hi = split_range(split, len(seqs), which)
    epoch = [t for s in seqs[lo:hi] for t in s]
    need = (first + count) * SEQ + 1
    stream = epoch * (need // len(epoch) + 1)
    return [stream[i * SEQ:i * SEQ + SEQ + 1] for i in range(first, first + count)]


def ref_loss(weights, cfg, batch):
    """Mean over the samples of each's mean token loss, as the engine's."""
    t = torch.tensor(batch, dtype=torch.int64)
    with torch.no_grad():
        _, loss = torch_gpt.forward(weights, cfg, t[:, :-1], t[:, 1:])
    return loss.item()


def run(cmd, ok=True):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if ok and out.returncode != 0:
        print(out.stdout[-3000:], out.stderr[-3000:])
        raise SystemExit(f"{cmd[0]} exited {out.returncode}")
    return out


def lines(out):
    return [json.loads(l) for l in out.stdout.splitlines() if l.startswith("{")]


failures = 0


def check(name, ok, detail):
    global failures
    print(("ok " if ok else "FAIL ") + name + ": " + detail)
    if not ok:
        failures += 1


def close(a, b):
    return a is not None and b is not None and abs(a - b) <= REL * abs(b)


def main():
    mtnlgd, ctl = sys.argv[1:3]
    rng = random.Random(5)
    # text-like bytes: a few words in random order, so training moves the loss
    words = [w.encode() for w in "the quick brown fox jumps over a lazy dog and cat".split()]
    seqs = []
    for _ in range(100):
        s = b" ".join(rng.choice(words) for _ in range(rng.randint(4, 12)))
        seqs.append(list(s))
    split = "60,30,10"
    with tempfile.TemporaryDirectory(prefix="mt_eval_splits.") as tmp:
        prefix = os.path.join(tmp, "words")
        indexed_dataset(prefix, seqs)
        job = {
            "name": "evals",
            "model": {"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 256,
                      "seq_len": SEQ},
            "parallel": {"micro_batch": MICRO},
            "train": {"global_batch": G, "steps": STEPS, "seed": 7,
                      "lr": {"schedule": "constant", "peak": 3e-3, "warmup_steps": 0}},
            "data": {"prefix": prefix, "split": split, "shuffle": False,
                     "cache_dir": os.path.join(tmp, "cache")},
            "eval": {"interval": INTERVAL, "iters": ITERS},
        }
        path = os.path.join(tmp, "job.json")
        with open(path, "w") as f:
            json.dump(job, f)

        def mtnlgd_run(ckpt, *sets, ok=True, fmt="json"):
            args = [mtnlgd, "--standalone", path, "--log-format", fmt,
                    "--set", f"checkpoint.dir={ckpt}", "--set", "checkpoint.interval=1"]
            for s in sets:
                args += s.split(" ", 1) if s.startswith("-") else ["--set", s]
            return run(args, ok)

        def weights_at(ckpt, step):
            out = os.path.join(tmp, f"w{step}.safetensors")
            run([ctl, "ckpt", "export", os.path.join(ckpt, "evals", "step_%08d" % step), out])
            w, _ = torch_gpt.st_load(out)
            os.remove(out)
            return {k: v.double() for k, v in w.items()}

        cfg = torch_gpt.Config(2, 64, 4, 256, SEQ)

        def ref(ckpt, step, which, first_batch):
            batch = samples(seqs, split, which, first_batch * G, ITERS * G)
            return ref_loss(weights_at(ckpt, step), cfg, batch)

        a_dir = os.path.join(tmp, "a")
        a = {l["step"]: l for l in lines(mtnlgd_run(a_dir))}
        val3, val6 = a[3].get("val_loss"), a[6].get("val_loss")
        want3, want6 = ref(a_dir, 3, 1, 0), ref(a_dir, 6, 1, 2)
        same6 = ref(a_dir, 6, 1, 0)  # what reading the same batches again would give
        check("test_validation_reads_on",
              close(val3, want3) and close(val6, want6) and not close(val6, same6),
              f"step 3 {val3} (torch {want3}), step 6 {val6} (torch batches 2-3 {want6}, "
              f"batches 0-1 {same6})")
        final, want_final = a[6].get("final_val_loss"), ref(a_dir, 6, 1, 4)
        check("test_end_of_training_validation",
              close(final, want_final) and
              [s for s, l in sorted(a.items()) if "final_val_loss" in l] == [STEPS],
              f"{final} (torch batches 4-5 {want_final})")
        test, want_test = a[6].get("test_loss"), ref(a_dir, 6, 2, 0)
        check("test_test_pass",
              close(test, want_test) and
              [s for s, l in sorted(a.items()) if "test_loss" in l] == [STEPS],
              f"{test} (torch, test split batches 0-1: {want_test})")

        # run again with nothing to train (resumed at step 6 of 6): the passes
        # at the end of training still run, as Megatron's, and give the same
        # losses from the same checkpoint
        again = mtnlgd_run(a_dir)
        said = {}
        for which in ("val", "test"):
            m = re.search(r"at the end of training for %s data \| lm loss value: (\S+) \|" % which,
                          again.stderr)
            said[which] = float(m.group(1)) if m else None
        check("test_nothing_to_train_still_runs_the_end_passes",
              "nothing to train" in again.stderr and lines(again) == []
              and said["val"] is not None and abs(said["val"] - final) <= 1e-6 * abs(final)
              and said["test"] is not None and abs(said["test"] - test) <= 1e-6 * abs(test),
              f"val {said['val']} (the run's {final}), test {said['test']} (the run's {test})")

        # a test split with a token past the vocabulary, which nothing read
        # before the test pass: the run fails there naming it, but only after
        # the last step's checkpoint (checkpoints every 4 steps: step 6's is
        # the end's) was committed, so no trained step is lost
        bad = os.path.join(tmp, "bad-test")
        indexed_dataset(bad, [s[:20] + [300] + s[20:] for s in seqs[:10]])
        bad_dir = os.path.join(tmp, "bad")
        out = mtnlgd_run(bad_dir, "checkpoint.interval=4", "data.test=" + json.dumps(bad),
                         ok=False)
        latest = os.path.join(bad_dir, "evals", "latest")
        held = open(latest).read().strip() if os.path.exists(latest) else None
        check("test_failed_test_pass_keeps_the_last_checkpoint",
              out.returncode == 2 and bad in out.stderr and "test split" in out.stderr
              and "outside vocab" in out.stderr and held == "step_%08d" % STEPS
              and [l["step"] for l in lines(out)] == list(range(1, STEPS + 1))
              and "test_loss" not in lines(out)[-1],
              f"exit {out.returncode}, latest {held}: " + out.stderr.strip().splitlines()[-1][:300]
              if out.stderr.strip() else f"exit {out.returncode}, latest {held}")

        # a data.valid holding a token past the vocabulary in its first
        # sample: the first validation (after step 3, a checkpoint interval)
        # fails the run, after step 3's checkpoint committed, in the
        # background mode too (a save before a validation is made whole)
        bad_valid = os.path.join(tmp, "bad-valid")
        indexed_dataset(bad_valid, [s[:5] + [300] + s[5:] for s in seqs[:10]])
        for mode in ("false", "true"):
            v_dir = os.path.join(tmp, "bad-valid-" + mode)
            out = mtnlgd_run(v_dir, "checkpoint.interval=3", "checkpoint.async=" + mode,
                             "data.valid=" + bad_valid, ok=False)
            latest = os.path.join(v_dir, "evals", "latest")
            held = open(latest).read().strip() if os.path.exists(latest) else None
            said = lines(out)
            check("test_failed_validation_keeps_its_steps_checkpoint (async %s)" % mode,
                  out.returncode == 2 and bad_valid in out.stderr and "valid split" in out.stderr
                  and "outside vocab" in out.stderr and held == "step_%08d" % INTERVAL
                  and [l["step"] for l in said] == list(range(1, INTERVAL + 1))
                  and "val_loss" not in said[-1],
                  f"exit {out.returncode}, latest {held}: " +
                  out.stderr.strip().splitlines()[-1][:300]
                  if out.stderr.strip() else f"exit {out.returncode}, latest {held}")

        # stopped after step 4 by exit_interval, then resumed to the end
        b_dir = os.path.join(tmp, "b")
        first = {l["step"]: l for l in lines(mtnlgd_run(b_dir, "train.exit_interval=4"))}
        second = {l["step"]: l for l in lines(mtnlgd_run(b_dir))}
        val4, want4 = first[4].get("val_loss"), ref(b_dir, 4, 1, 2)
        keys = ("loss", "val_loss", "final_val_loss", "test_loss")
        got = [(s, [second[s].get(k) for k in keys]) for s in (5, 6)]
        want = [(s, [a[s].get(k) for k in keys]) for s in (5, 6)]
        check("test_resumed_run_reads_the_same",
              max(first) == 4 and close(val4, want4) and "final_val_loss" not in first[4] and
              "test_loss" not in first[4] and got == want,
              f"stop's validation {val4} (torch batches 2-3 {want4}); resumed {got}, "
              f"uninterrupted {want}")

        # the same samples under pp 3 (a middle stage opens no data) x dp 2
        e = {l["step"]: l for l in lines(mtnlgd_run(
            os.path.join(tmp, "e"), "parallel={\"pp\": 3, \"dp_min\": 2, \"dp_max\": 2, "
            "\"micro_batch\": 1}", "model.n_layer=3", "--devices cpu:6"))}
        f = {l["step"]: l for l in lines(mtnlgd_run(os.path.join(tmp, "f"), "model.n_layer=3"))}
        keys = ("val_loss", "final_val_loss", "test_loss")
        got = [(s, k, e[s].get(k)) for s in (3, 6) for k in keys]
        want = [(s, k, f[s].get(k)) for s in (3, 6) for k in keys]
        check("test_layouts_read_the_same_samples",
              all((g is None and w is None) or close(g, w) for (_, _, g), (_, _, w) in
                  zip(got, want)) and e[6].get("test_loss") is not None,
              f"pp 3 x dp 2 {got}, pp 1 x dp 1 {want}")

        # data.valid and data.test: other datasets, read whole
        held = [list(b" ".join(rng.choice(words[:5]) for _ in range(rng.randint(3, 9))))
                for _ in range(20)]
        other = [list(b" ".join(rng.choice(words[5:]) for _ in range(rng.randint(3, 9))))
                 for _ in range(15)]
        indexed_dataset(os.path.join(tmp, "held"), held)
        indexed_dataset(os.path.join(tmp, "other"), other)
        g_dir = os.path.join(tmp, "g")
        g = {l["step"]: l for l in lines(mtnlgd_run(
            g_dir, "data.valid=" + os.path.join(tmp, "held"),
            "data.test=" + json.dumps([{"prefix": os.path.join(tmp, "other"), "weight": 1}])))}
        whole = "1"  # all of a dataset's sequences
        got = [g[3].get("val_loss"), g[6].get("val_loss"), g[6].get("final_val_loss"),
               g[6].get("test_loss")]
        want = [ref_loss(weights_at(g_dir, 3), cfg, samples(held, whole, 0, 0, ITERS * G)),
                ref_loss(weights_at(g_dir, 6), cfg, samples(held, whole, 0, 2 * G, ITERS * G)),
                ref_loss(weights_at(g_dir, 6), cfg, samples(held, whole, 0, 4 * G, ITERS * G)),
                ref_loss(weights_at(g_dir, 6), cfg, samples(other, whole, 0, 0, ITERS * G))]
        check("test_data_valid_and_test_read_whole",
              all(close(x, y) for x, y in zip(got, want)),
              f"valid at 3, 6, the end and test {got}, torch on data.valid, data.test {want}")
        # a flat token file validates on data.valid, and has no test pass
        flat = os.path.join(tmp, "tokens.u16")
        with open(flat, "wb") as fh:
            toks = [t for q in seqs for t in q]
            fh.write(struct.pack("<%dH" % len(toks), *toks))
        hout = mtnlgd_run(os.path.join(tmp, "h"), "data=" + json.dumps(
            {"path": flat, "valid": os.path.join(tmp, "held")}))
        h = lines(hout)
        check("test_flat_file_validates_on_data_valid",
              [l["step"] for l in h if "val_loss" in l] == [3, 6] and "final_val_loss" in h[-1]
              and "test_loss" not in h[-1] and "has no test split (data.test names one)" in
              hout.stderr, f"last line {h[-1]}")

        # eval.test false; a split without a test share
        c_dir = os.path.join(tmp, "c")
        c = mtnlgd_run(c_dir, "eval.test=false", "train.steps=3", fmt="text")
        d = lines(mtnlgd_run(os.path.join(tmp, "d"), "data.split=70,30", "train.steps=3"))
        check("test_eval_test_false",
              "at the end of training for val data | lm loss value:" in c.stdout and
              "for test data" not in c.stdout and
              "test_loss" not in d[-1] and "final_val_loss" in d[-1],
              f"text log's end lines {[l for l in c.stdout.splitlines() if 'end of' in l]}; "
              f"split 70,30's last line {d[-1]}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
