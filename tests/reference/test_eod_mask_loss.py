#!/usr/bin/python3
"""data.eod_mask_loss (Megatron's --eod-mask-loss) in mtnlgd against PyTorch.

usage: test_eod_mask_loss.py MTNLGD JOB.json MTNLG-PREPROCESS
The tiny model starts from random weights (torch_gpt.random_weights, given
as model.init_from) and trains 4 steps of 4 micro-batches of 2 samples on a
flat token file where the end-of-document id (255) is about 5% of the
tokens, about half the input tokens of one micro-batch and every input
token of another (that micro-batch has no target left). torch_gpt.py does the same in float64 with Megatron's
loss: each micro-batch's loss is sum(loss * mask) / sum(mask), the mask 0
where the input token is the end-of-document id (0 for a micro-batch with
nothing left, where Megatron would divide by zero), averaged over the
micro-batches; torch.optim.AdamW with mtnlgd's settings (constant lr, no
clipping, weight decay on the matrices). Checked under (tp, pp, dp) =
(1,1,1), (2,1,1) (the vocabulary-parallel cross-entropy), (1,2,1) (the last
stage's loss) and (2,2,2):
  - test_..._losses_match_torch: every step's loss within 1e-5 relative;
  - test_..._weights_match_torch: the exported weights' update (trained minus
    initial) within 1e-3 of torch's, relative over the whole model;
  - test_tp2_pp2_fp16_follows_the_masked_run: in fp16 under a static loss
    scale of 1024, no step skipped and the losses within 1e-4 of torch's;
  - test_the_mask_changes_the_run: without the mask the losses differ from
    the masked run's by far more than the tolerance (the test can see it);
  - test_a_resume_that_turns_the_mask_on_departs: a checkpoint saved
    without it, resumed with it, is warned of naming data.eod_mask_loss;
  - a resume under another parallel.micro_batch is warned of as a departure
    with the mask (each micro-batch's masked mean is over its own tokens)
    and only noted without it;
  - test_..._dataset_train_and_validation_losses_are_masked: on an indexed
    dataset from mtnlg-preprocess --tokenizer bytes (EOD 256), a step's loss
    and the validation loss are torch's masked ones (dataset_checks).
Adam's eps is 1e-3, not far below the gradients' elements, so an update
follows the gradient's size as well as its sign: a normalization by all
B*T tokens instead of the unmasked ones moves the weights 25% of the update
away from torch's (seen by breaking it), far past the tolerance.
Exit 77 (skip) without torch.
"""
import array
import json
import math
import os
import random
import subprocess
import sys
import tempfile

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
try:
    import torch
except ImportError as e:
    print(f"SKIP: PyTorch not importable ({e})")
    sys.exit(77)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
import torch_gpt  # noqa: E402
from local_cluster import check, output_losses  # noqa: E402


def losses_of(out):
    """The losses of a run's JSON step records, in step order."""
    return [loss for _, loss in output_losses(out)]


EOD = 255
N_LAYER, N_EMBD, N_HEAD, VOCAB, SEQ = 2, 64, 4, 256, 64
G, B, STEPS = 8, 2, 4
LR, BETAS, EPS, WD = 2e-3, (0.9, 0.95), 1e-3, 0.1
LOSS_TOL, WEIGHT_TOL = 1e-5, 1e-3


def make_tokens():
    """STEPS * G samples of SEQ + 1 tokens overlapping by one: random ids
    below EOD with 5% EOD; the inputs of samples 4-5 (step 1's third
    micro-batch) about half EOD, those of samples 10-11 (step 2's second)
    EOD throughout."""
    r = random.Random(7)
    n = STEPS * G * SEQ + 1
    t = [EOD if r.random() < 0.05 else r.randrange(EOD) for _ in range(n)]
    for i in range(4 * SEQ, 6 * SEQ):
        if r.random() < 0.5:
            t[i] = EOD
    for i in range(10 * SEQ, 12 * SEQ + 1):
        t[i] = EOD
    return t


def torch_run(weights, cfg, tokens, mask):
    """Losses of STEPS steps and the final weights, in float64."""
    p, opt = torch_gpt.adamw64(weights, LR, WD, BETAS, EPS)
    tok = torch.tensor(tokens, dtype=torch.long)
    losses = []
    for s in range(STEPS):
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for m in range(G // B):
            k0 = s * G + m * B
            rows = torch.stack([tok[k * SEQ:k * SEQ + SEQ + 1] for k in range(k0, k0 + B)])
            idx, tgt = rows[:, :-1], rows[:, 1:]
            logits, _ = torch_gpt.forward(p, cfg, idx)
            ce = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tgt.reshape(-1),
                                                   reduction="none")
            keep = (idx.reshape(-1) != EOD).to(ce.dtype) if mask else torch.ones_like(ce)
            n = keep.sum()
            loss = (ce * keep).sum() / n if n > 0 else (ce * 0.0).sum()
            total = total + loss / (G // B)
        total.backward()
        opt.step()
        losses.append(total.item())
    return losses, {k: v.detach() for k, v in p.items()}


def run(mtnlgd, job, tokens, init, tp, pp, dp, *sets):
    cmd = [mtnlgd, "--standalone", job, "--log-format", "json",
           "--set", f"data.path={tokens}", "--set", f"model.init_from={init}",
           "--set", f"train.steps={STEPS}", "--set", f"train.global_batch={G}",
           "--set", f"parallel.micro_batch={B}", "--set", f"parallel.tp={tp}",
           "--set", f"parallel.pp={pp}", "--set", f"parallel.dp_min={dp}",
           "--set", "train.lr.schedule=constant", "--set", f"train.lr.peak={LR}",
           "--set", "train.lr.warmup_steps=0", "--set", f"train.adam.eps={EPS}",
           "--set", f"train.adam.beta1={BETAS[0]}", "--set", f"train.adam.beta2={BETAS[1]}",
           "--set", f"train.weight_decay={WD}", "--set", "train.clip_grad=0"]
    for s in sets:
        cmd += ["--set", s]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def masked_mean_loss(weights, cfg, stream, eod, mask):
    """Megatron's loss of one global batch of G samples from a token stream
    (sample k: tokens [k * SEQ, k * SEQ + SEQ + 1)), in float64: the mean
    over the micro-batches of each one's masked mean."""
    p = {k: v.to(torch.float64) for k, v in weights.items()}
    tok = torch.tensor(stream, dtype=torch.long)
    total = 0.0
    with torch.no_grad():
        for k0 in range(0, G, B):
            rows = torch.stack([tok[k * SEQ:k * SEQ + SEQ + 1] for k in range(k0, k0 + B)])
            idx, tgt = rows[:, :-1], rows[:, 1:]
            logits, _ = torch_gpt.forward(p, cfg, idx)
            ce = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size),
                                                   tgt.reshape(-1), reduction="none")
            keep = (idx.reshape(-1) != eod).to(ce.dtype) if mask else torch.ones_like(ce)
            total += float((ce * keep).sum() / keep.sum()) / (G // B)
    return total


def dataset_checks(mtnlgd, job, preprocess):
    """An indexed dataset made by mtnlg-preprocess --tokenizer bytes (EOD
    256 closing each document; model.vocab_size 257), 20 documents split
    50,50,0 unshuffled, so the train split is documents 0-9 and the valid
    split documents 10-19, each read in order. One step at lr 0 (the first
    under a warmup), then validation: the step's loss and the validation
    loss are Megatron's masked ones on the initial weights, at tp 1 and at
    tp 2 x pp 2."""
    failures = 0
    cfg = torch_gpt.Config(N_LAYER, N_EMBD, N_HEAD, 257, SEQ)
    weights = torch_gpt.random_weights(cfg, 99)
    # a large end-of-document embedding: after it the model predicts another
    # one with confidence, so the positions the mask leaves out have losses
    # far from the others' (random weights give every position about log V)
    weights["wte.weight"][256] *= 10.0
    r = random.Random(3)
    words = ["the", "a", "model", "loss", "mask", "of", "end", "document", "token", "and"]
    docs = [" ".join(r.choice(words) for _ in range(r.randrange(12, 20))) for _ in range(20)]
    ids = [list(d.encode()) + [256] for d in docs]
    train = [t for d in ids[:10] for t in d]
    valid = [t for d in ids[10:] for t in d]
    assert len(train) > G * SEQ + 1 and len(valid) > G * SEQ + 1, "documents too short"
    want_train = masked_mean_loss(weights, cfg, train, 256, True)
    want_valid = masked_mean_loss(weights, cfg, valid, 256, True)
    plain_valid = masked_mean_loss(weights, cfg, valid, 256, False)
    with tempfile.TemporaryDirectory(prefix="mtnlg-eod-ds-") as tmp:
        src = os.path.join(tmp, "docs.jsonl")
        with open(src, "w") as f:
            for d in docs:
                f.write(json.dumps({"text": d}) + "\n")
        prefix = os.path.join(tmp, "docs")
        pre = subprocess.run([preprocess, "--input", src, "--output-prefix", prefix,
                              "--tokenizer", "bytes", "--quiet"], capture_output=True, text=True)
        if pre.returncode != 0:
            return check("test_dataset_built", False, pre.stderr[-400:])
        init = os.path.join(tmp, "init.safetensors")
        torch_gpt.st_save(init, weights, cfg.metadata())
        for tp, pp in ((1, 1), (2, 2)):
            cmd = [mtnlgd, "--standalone", job, "--log-format", "json",
                   "--set", f"data={json.dumps({'prefix': prefix})}",
                   "--set", "data.split=50,50,0", "--set", "data.shuffle=false",
                   "--set", "data.eod_mask_loss=true", "--set", "data.eod_token=256",
                   "--set", "model.vocab_size=257", "--set", f"model.init_from={init}",
                   "--set", "train.steps=1", "--set", f"train.global_batch={G}",
                   "--set", f"parallel.micro_batch={B}", "--set", f"parallel.tp={tp}",
                   "--set", f"parallel.pp={pp}", "--set", "train.lr.schedule=constant",
                   "--set", "train.lr.warmup_steps=1", "--set", "eval.interval=1",
                   "--set", "eval.iters=1"]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            recs = [json.loads(l) for l in out.stdout.splitlines() if l.startswith("{")]
            rec = next((x for x in recs if "loss" in x), {})
            val = next((x["val_loss"] for x in recs if "val_loss" in x), None)
            loss = rec.get("loss")
            ok = (out.returncode == 0 and loss is not None and val is not None
                  and abs(plain_valid - want_valid) / want_valid > 100 * LOSS_TOL
                  and abs(loss - want_train) / want_train <= LOSS_TOL
                  and abs(val - want_valid) / want_valid <= LOSS_TOL)
            failures += check(f"test_tp{tp}_pp{pp}_dataset_train_and_validation_losses_are_masked",
                              ok, f"exit {out.returncode}: train {loss} vs torch {want_train:.9g}, "
                              f"validation {val} vs torch {want_valid:.9g} (unmasked "
                              f"{plain_valid:.9g}){out.stderr[-600:] if out.returncode else ''}")
    return failures


def update_rel(ours, ref, init):
    """||ours - ref|| / ||ref - init|| over every tensor: the error relative
    to the update, so a small update cannot hide it."""
    num = den = 0.0
    for k, w0 in init.items():
        a = ours[k].to(torch.float64).reshape(-1)
        b = ref[k].reshape(-1)
        num += float(((a - b) ** 2).sum())
        den += float(((b - w0.to(torch.float64).reshape(-1)) ** 2).sum())
    return math.sqrt(num / den) if den > 0 else float("inf")


def main():
    mtnlgd, job, preprocess = sys.argv[1], sys.argv[2], sys.argv[3]
    failures = 0
    cfg = torch_gpt.Config(N_LAYER, N_EMBD, N_HEAD, VOCAB, SEQ)
    weights = torch_gpt.random_weights(cfg, 2024)
    tokens = make_tokens()
    ref_losses, ref_w = torch_run(weights, cfg, tokens, True)
    plain_losses, _ = torch_run(weights, cfg, tokens, False)
    print(f"torch, masked: {ref_losses}\ntorch, unmasked: {plain_losses}")
    with tempfile.TemporaryDirectory(prefix="mtnlg-eod-") as tmp:
        tpath = os.path.join(tmp, "tokens.u16")
        with open(tpath, "wb") as f:
            f.write(array.array("H", tokens).tobytes())
        init = os.path.join(tmp, "init.safetensors")
        torch_gpt.st_save(init, weights, cfg.metadata())
        mask = ["data.eod_mask_loss=true", f"data.eod_token={EOD}"]
        masked_losses = None
        for tp, pp, dp in ((1, 1, 1), (2, 1, 1), (1, 2, 1), (2, 2, 2)):
            export = os.path.join(tmp, f"eod-{tp}-{pp}-{dp}.safetensors")
            out = run(mtnlgd, job, tpath, init, tp, pp, dp, *mask, f"checkpoint.export={export}")
            losses = losses_of(out.stdout)
            if out.returncode != 0:
                print(out.stderr[-2000:])
            if (tp, pp, dp) == (1, 1, 1):
                masked_losses = losses
            worst = max((abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)),
                        default=float("inf"))
            name = f"test_tp{tp}_pp{pp}_dp{dp}"
            failures += check(f"{name}_losses_match_torch",
                              out.returncode == 0 and len(losses) == STEPS and worst <= LOSS_TOL,
                              f"exit {out.returncode}, worst step {worst:.2e}: {losses}")
            w = torch_gpt.st_load(export)[0] if os.path.exists(export) else {}
            rel = update_rel(w, ref_w, weights) if set(w) >= set(weights) else float("inf")
            failures += check(f"{name}_weights_match_torch", rel <= WEIGHT_TOL,
                              f"update off by {rel:.2e} relative")
        # fp16 under a static loss scale: each unmasked token's gradient is
        # the scale over the unmasked count, unscaled once, so the run
        # follows fp32's to fp16's rounding, nothing skipped (the micro-batch
        # with no target left adds nothing, not NaN)
        out = run(mtnlgd, job, tpath, init, 2, 2, 1, *mask, "train.precision=fp16",
                  "train.loss_scale.dynamic=false", "train.loss_scale.initial=1024")
        recs = [json.loads(l) for l in out.stdout.splitlines() if l.startswith("{")]
        half = [x["loss"] for x in recs if "loss" in x]
        worst = max((abs(a - b) / abs(b) for a, b in zip(half, ref_losses)), default=float("inf"))
        failures += check("test_tp2_pp2_fp16_follows_the_masked_run",
                          out.returncode == 0 and len(half) == STEPS and worst <= 1e-4
                          and not any(x.get("skipped") for x in recs),
                          f"exit {out.returncode}, worst step {worst:.2e} from torch's: {half}")
        out = run(mtnlgd, job, tpath, init, 1, 1, 1)
        plain = losses_of(out.stdout)
        gap = max((abs(a - b) / abs(b) for a, b in zip(plain, masked_losses or [])), default=0.0)
        worst_plain = max((abs(a - b) / abs(b) for a, b in zip(plain, plain_losses)),
                          default=float("inf"))
        failures += check("test_the_mask_changes_the_run",
                          out.returncode == 0 and gap > 100 * LOSS_TOL
                          and worst_plain <= LOSS_TOL,
                          f"unmasked vs masked {gap:.2e}; unmasked vs torch's unmasked "
                          f"{worst_plain:.2e}")
        ck = os.path.join(tmp, "ck")
        first = run(mtnlgd, job, tpath, init, 1, 1, 1, f"checkpoint.dir={ck}",
                    "train.steps=2")
        second = run(mtnlgd, job, tpath, init, 1, 1, 1, f"checkpoint.dir={ck}", *mask)
        warned = [l for l in second.stderr.splitlines() if "departs from the saved" in l]
        failures += check("test_a_resume_that_turns_the_mask_on_departs",
                          first.returncode == 0 and second.returncode == 0
                          and len(losses_of(second.stdout)) == STEPS - 2
                          and any("data.eod_mask_loss" in l for l in warned),
                          f"exits {first.returncode} {second.returncode}; warned: {warned} "
                          f"{second.stderr[-600:] if second.returncode else ''}")
        # with the mask each micro-batch's mean is over its own tokens, so the
        # micro-batch size is part of the trajectory: a resume under another
        # is warned of, naming it; without the mask it stays a note
        for masked in (True, False):
            ck2 = os.path.join(tmp, "ck-micro-%d" % masked)
            extra = list(mask) if masked else []
            # stopped after step 2 by exit_interval: the length stays the job's
            a = run(mtnlgd, job, tpath, init, 1, 1, 1, f"checkpoint.dir={ck2}",
                    "train.exit_interval=2", *extra)
            b = run(mtnlgd, job, tpath, init, 1, 1, 1, f"checkpoint.dir={ck2}",
                    "parallel.micro_batch=4", *extra)
            warned = [l for l in b.stderr.splitlines() if "departs from the saved" in l]
            noted = [l for l in b.stderr.splitlines() if "its trajectory does not" in l]
            name = ("test_a_resume_under_another_micro_batch_departs_with_the_mask" if masked
                    else "test_a_resume_under_another_micro_batch_is_a_note_without_it")
            failures += check(name, a.returncode == 0 and b.returncode == 0 and (
                any("parallel.micro_batch" in l for l in warned) if masked
                else not warned and any("parallel.micro_batch" in l for l in noted)),
                f"exits {a.returncode} {b.returncode}; warned {warned}; noted {noted}")
    failures += dataset_checks(mtnlgd, job, preprocess)
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
