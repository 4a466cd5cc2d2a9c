#!/usr/bin/python3
"""data.reset_position_ids and data.reset_attention_mask (Megatron's
--reset-position-ids and --reset-attention-mask) in mtnlgd against PyTorch.

usage: test_reset_documents.py MTNLGD JOB.json
A 4-layer tiny model starts from random weights (torch_gpt.random_weights,
given as model.init_from; wpe and the attention's matrices scaled up so
that positions and what a row attends to weigh) and trains
3 steps of 4 micro-batches of 2 samples on a flat token file where the
end-of-document id (255) is about 6% of the tokens (several in most
samples, two adjacent ones, one at a sample's first and last position).
torch_gpt.py does the same in float64 with Megatron's
get_ltor_masks_and_position_ids (torch_gpt.documents_of): the positions
start again after each end-of-document token, and a row attends to no
position before its document's first; each key alone and both together
(modes positions, mask, both). torch.optim.AdamW with mtnlgd's settings
(constant lr, no clipping, weight decay on the matrices). Checked under
(tp, pp, dp) = (1,1,1), (2,3,1) with sequence parallelism (a middle stage)
and (2,2,2) for each key alone; for both at (2,3,1) with sequence
parallelism and one sample a micro-batch (b1: the second rank's rows start
mid-sample), validating as it trains, and at (1,2,1) with 2 interleaved
virtual stages and recomputation (v2_recompute) (bf16: each alone):
  - test_<mode>_..._losses_match_torch: every step's loss within 1e-5
    relative;
  - test_<mode>_..._weights_match_torch: the exported weights' update
    (trained minus initial) within 1e-3 of torch's, relative over the
    whole model;
  - test_<mode>_tp2_pp2_bf16_follows_torch: bf16, every step's loss within
    1e-4 of torch's float64;
  - test_both_tp2_pp3_dp1_b1_validation_matches_torch: eval.interval 3 on
    a data.valid dataset of its own (read in order): the validation after
    step 3 (valid samples 0-7) and the one at the end of training (8-15)
    within 2e-5 relative of torch's forward with the documents on the run's
    exported weights, and more than 10 times that from torch's without them;
  - test_<mode>_torch_runs_differ: torch's run without the keys is far from
    the mode's: its losses more than 5 times the bf16 tolerance apart and
    its trained weights more than 100 times the weights' tolerance, so the
    checks above see a key dropped;
and:
  - test_without_the_keys_the_run_is_torchs_plain_one;
  - test_mask_with_attention_dropout_agrees_across_layouts: with attention
    dropout 0.1 and the document mask, the losses at tp 2 x pp 3 and
    tp 2 x pp 2 x dp 2 are tp 1's within 1e-5 (the dropout masks are drawn
    per (seed, step, sample, layer, element) whatever the layout, and the
    documents cut the same rows), and more than 5 times the bf16 tolerance
    from an mtnlgd run with the same dropout and no mask (torch's plain run
    has no dropout: dropout alone would set it apart);
  - test_middle_stage_says_why_it_opens_the_data: at pp 3 with the mask
    key and a missing data path the error reported (the first rank's to
    fail) names the key exactly when it is the middle stage's (rank 1).
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
from local_cluster import check, indexed_dataset, output_losses  # noqa: E402

EOD = 255
N_LAYER, N_EMBD, N_HEAD, VOCAB, SEQ = 4, 32, 4, 256, 32
G, B, STEPS = 8, 2, 3
LR, BETAS, EPS, WD = 2e-3, (0.9, 0.95), 1e-3, 0.1
LOSS_TOL, WEIGHT_TOL, HALF_TOL = 1e-5, 1e-3, 1e-4
VAL_TOL = 2e-5  # the engine's fp32 forward on its weights against float64 torch's
# each mode: the job's settings and what torch applies
MODES = {"positions": (["data.reset_position_ids=true"], True, False),
         "mask": (["data.reset_attention_mask=true"], False, True),
         "both": (["data.reset_position_ids=true", "data.reset_attention_mask=true"], True, True)}


def losses_of(out):
    return [loss for _, loss in output_losses(out)]


def make_tokens(seed=11, n=STEPS * G * SEQ + 1):
    """n tokens (STEPS * G samples of SEQ + 1 overlapping by one): random ids
    below EOD with 6% EOD, and in sample 0 an EOD first, two adjacent ones
    and one last."""
    r = random.Random(seed)
    t = [EOD if r.random() < 0.06 else r.randrange(EOD) for _ in range(n)]
    for i in (0, 9, 10, SEQ - 1):
        t[i] = EOD
    return t


def valid_loss(weights, cfg, tokens, first, reset_pos, reset_mask):
    """Torch's loss over G validation samples from sample first (a dataset
    read whole, in order: sample i is tokens [i*SEQ, i*SEQ + SEQ + 1))."""
    rows = torch.tensor([tokens[i * SEQ:i * SEQ + SEQ + 1] for i in range(first, first + G)],
                        dtype=torch.long)
    idx, tgt = rows[:, :-1], rows[:, 1:]
    pos, mask = torch_gpt.documents_of(idx, EOD)
    p = {k: v.to(torch.float64) for k, v in weights.items()}
    with torch.no_grad():
        _, loss = torch_gpt.forward(p, cfg, idx, tgt, position_ids=pos if reset_pos else None,
                                    attn_mask=mask if reset_mask else None)
    return loss.item()


def json_lines(out):
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def torch_run(weights, cfg, tokens, reset_pos, reset_mask):
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
            pos, mask = torch_gpt.documents_of(idx, EOD)
            _, loss = torch_gpt.forward(p, cfg, idx, tgt, position_ids=pos if reset_pos else None,
                                        attn_mask=mask if reset_mask else None)
            total = total + loss / (G // B)
        total.backward()
        opt.step()
        losses.append(total.item())
    return losses, {k: v.detach() for k, v in p.items()}


def run(mtnlgd, job, tokens, init, tp, pp, dp, *sets):
    cmd = [mtnlgd, "--standalone", job, "--log-format", "json",
           "--set", f"data.path={tokens}", "--set", f"model.init_from={init}",
           "--set", f"model.n_layer={N_LAYER}", "--set", f"model.n_embd={N_EMBD}",
           "--set", f"model.n_head={N_HEAD}", "--set", f"model.seq_len={SEQ}",
           "--set", f"model.max_positions={SEQ}",
           "--set", f"train.steps={STEPS}", "--set", f"train.global_batch={G}",
           "--set", f"parallel.micro_batch={B}", "--set", f"parallel.tp={tp}",
           "--set", f"parallel.pp={pp}", "--set", f"parallel.dp_min={dp}",
           "--set", "train.lr.schedule=constant", "--set", f"train.lr.peak={LR}",
           "--set", "train.lr.warmup_steps=0", "--set", f"train.adam.eps={EPS}",
           "--set", f"train.adam.beta1={BETAS[0]}", "--set", f"train.adam.beta2={BETAS[1]}",
           "--set", f"train.weight_decay={WD}", "--set", "train.clip_grad=0",
           "--set", f"data.eod_token={EOD}"]
    for s in sets:
        cmd += ["--set", s]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def update_rel(ours, ref, init):
    """||ours - ref|| / ||ref - init|| over every tensor."""
    num = den = 0.0
    for k, w0 in init.items():
        a = ours[k].to(torch.float64).reshape(-1)
        b = ref[k].reshape(-1)
        num += float(((a - b) ** 2).sum())
        den += float(((b - w0.to(torch.float64).reshape(-1)) ** 2).sum())
    return math.sqrt(num / den) if den > 0 else float("inf")


def worst_of(losses, ref):
    return max((abs(a - b) / abs(b) for a, b in zip(losses, ref)), default=float("inf"))


def main():
    mtnlgd, job = sys.argv[1], sys.argv[2]
    failures = 0
    cfg = torch_gpt.Config(N_LAYER, N_EMBD, N_HEAD, VOCAB, SEQ)
    weights = torch_gpt.random_weights(cfg, 5)
    # positions far apart, so a wrong position shows in the loss
    weights["wpe.weight"] = weights["wpe.weight"] * 50.0
    # and sharp attention with a large branch, so what a row sees weighs
    for k in weights:
        if k.endswith("attn.c_attn.weight") or k.endswith("attn.c_proj.weight"):
            weights[k] = weights[k] * 10.0
    tokens = make_tokens()
    plain_losses, plain_w = torch_run(weights, cfg, tokens, False, False)
    with tempfile.TemporaryDirectory(prefix="mtnlg-docs-") as tmp:
        tpath = os.path.join(tmp, "tokens.u16")
        with open(tpath, "wb") as f:
            f.write(array.array("H", tokens).tobytes())
        init = os.path.join(tmp, "init.safetensors")
        torch_gpt.st_save(init, weights, cfg.metadata())
        # data.valid: a dataset of its own, read whole in order (shuffle off)
        vtokens = make_tokens(12, 3 * G * SEQ + 1)
        vprefix = os.path.join(tmp, "valid")
        indexed_dataset(vprefix, [vtokens])
        validate = ["eval.interval=3", "eval.iters=1", f"data.valid={vprefix}",
                    "data.shuffle=false"]
        for mode, (sets, reset_pos, reset_mask) in MODES.items():
            ref_losses, ref_w = torch_run(weights, cfg, tokens, reset_pos, reset_mask)
            gap = worst_of(plain_losses, ref_losses)
            wgap = update_rel(plain_w, ref_w, weights)
            print(f"torch, {mode}: {ref_losses}; plain {plain_losses}")
            failures += check(f"test_{mode}_torch_runs_differ",
                              gap > 5 * HALF_TOL and wgap > 100 * WEIGHT_TOL,
                              f"losses {gap:.2e} apart, weights {wgap:.2e}")
            layouts = ((1, 1, 1, [], ""), (2, 3, 1, ["parallel.sequence_parallel=true"], ""),
                       (2, 2, 2, [], ""))
            if mode == "both":  # each key is checked alone at every layout
                # one sample a micro-batch, so the second sequence-parallel
                # rank's rows start mid-sample, validating as it trains; and
                # interleaved virtual stages with recomputation
                layouts = ((2, 3, 1, ["parallel.sequence_parallel=true", "parallel.micro_batch=1",
                                      *validate], "_b1"),
                           (1, 2, 1, ["parallel.virtual_stages=2", "parallel.recompute=true"],
                            "_v2_recompute"))
            for tp, pp, dp, extra, label in layouts:
                export = os.path.join(tmp, f"{mode}-{tp}-{pp}-{dp}{label}.safetensors")
                out = run(mtnlgd, job, tpath, init, tp, pp, dp, *sets, *extra,
                          f"checkpoint.export={export}")
                losses = losses_of(out.stdout)
                if out.returncode != 0:
                    print(out.stderr[-2000:])
                worst = worst_of(losses, ref_losses)
                name = f"test_{mode}_tp{tp}_pp{pp}_dp{dp}{label}"
                failures += check(f"{name}_losses_match_torch",
                                  out.returncode == 0 and len(losses) == STEPS
                                  and worst <= LOSS_TOL,
                                  f"exit {out.returncode}, worst step {worst:.2e}: {losses}")
                w = torch_gpt.st_load(export)[0] if os.path.exists(export) else {}
                rel = update_rel(w, ref_w, weights) if set(w) >= set(weights) else float("inf")
                failures += check(f"{name}_weights_match_torch", rel <= WEIGHT_TOL,
                                  f"update off by {rel:.2e} relative")
                if validate[0] not in extra:
                    continue
                # the validation after step 3 reads valid samples 0..G-1, the
                # one at the end of training G..2G-1: torch's forward with the
                # documents on the run's own weights, and without them (the
                # check must see the keys dropped from the validation)
                last = (json_lines(out.stdout) or [{}])[-1]
                got = [last.get("val_loss"), last.get("final_val_loss")]
                want = [valid_loss(w, cfg, vtokens, k * G, True, True) if w else None
                        for k in (0, 1)]
                bare = [valid_loss(w, cfg, vtokens, k * G, False, False) if w else None
                        for k in (0, 1)]
                ok = None not in got and None not in want and all(
                    abs(a - b) <= VAL_TOL * abs(b) and abs(c - b) > 10 * VAL_TOL * abs(b)
                    for a, b, c in zip(got, want, bare))
                failures += check(f"{name}_validation_matches_torch", ok,
                                  f"val {got}, torch {want}, without the keys {bare}")
            if mode == "both":
                continue
            out = run(mtnlgd, job, tpath, init, 2, 2, 1, *sets, "train.precision=bf16")
            half = losses_of(out.stdout)
            worst = worst_of(half, ref_losses)
            failures += check(f"test_{mode}_tp2_pp2_bf16_follows_torch",
                              out.returncode == 0 and len(half) == STEPS and worst <= HALF_TOL,
                              f"exit {out.returncode}, worst step {worst:.2e}: {half}")
        out = run(mtnlgd, job, tpath, init, 1, 1, 1)
        plain = losses_of(out.stdout)
        failures += check("test_without_the_keys_the_run_is_torchs_plain_one",
                          out.returncode == 0 and worst_of(plain, plain_losses) <= LOSS_TOL,
                          f"{plain} vs {plain_losses}")
        drop = ["data.reset_attention_mask=true", "model.attention_dropout=0.1"]
        runs = [losses_of(run(mtnlgd, job, tpath, init, tp, pp, dp, *drop, *extra).stdout)
                for tp, pp, dp, extra in ((1, 1, 1, []),
                                          (2, 3, 1, ["parallel.sequence_parallel=true"]),
                                          (2, 2, 2, []))]
        # the same dropout without the mask: the runs above must differ
        # from it (torch's plain run has no dropout, so would differ anyway)
        unmasked = losses_of(run(mtnlgd, job, tpath, init, 1, 1, 1, drop[1]).stdout)
        worst = max(worst_of(r, runs[0]) for r in runs[1:])
        gap = worst_of(runs[0], unmasked) if len(unmasked) == STEPS else 0.0
        failures += check("test_mask_with_attention_dropout_agrees_across_layouts",
                          all(len(r) == STEPS for r in runs) and worst <= LOSS_TOL
                          and gap > 5 * HALF_TOL,
                          f"worst {worst:.2e}, {gap:.2e} from the unmasked dropout run "
                          f"{unmasked}: {runs}")
        # data a middle stage cannot open: its message says why it opened
        # it (the first rank to fail is the one reported: whichever, only
        # the middle stage's, rank 1 at pp 3, names the key)
        out = run(mtnlgd, job, os.path.join(tmp, "missing.u16"), init, 1, 3, 1,
                  "data.reset_attention_mask=true")
        err = [line for line in out.stderr.splitlines() if " error " in line]
        why = "(every pipeline stage reads the data with data.reset_attention_mask)"
        failures += check("test_middle_stage_says_why_it_opens_the_data",
                          out.returncode == 2 and len(err) == 1 and "No such file" in err[0]
                          and (why in err[0]) == ("error rank 1 " in err[0]), f"{err}")
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
