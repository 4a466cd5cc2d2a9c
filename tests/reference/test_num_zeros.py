#!/usr/bin/python3
"""train.log_num_zeros_in_grad (Megatron's --log-num-zeros-in-grad) against
zeros counted in PyTorch's gradients.

usage: test_num_zeros.py MTNLGD JOB.json
The tiny model (2 layers, 64 wide, 64 tokens a sample, model.max_positions
72) starts from torch_gpt.random_weights with zeros planted so that known
gradient elements are exactly zero:
  - wpe's 8 rows past the sample's 64 tokens are never read: 512 zeros at
    every step, in a tensor every tp rank holds whole (counted once);
  - ln_f's weight and bias 0 at 3 columns: the tied head's gradient is 0
    there, so wte's rows of the ids no input of step 1 holds (200 to 255,
    which the token file never holds, in one vocabulary shard at tp 2, and
    a few below 200 it happens to miss) are zero at those columns at step
    1: 219 zeros in the tensor the last stage holds a second copy of;
  - layer 0's ln_1 weight and bias 0 at 2 columns: c_attn's weight gets 2
    zero rows at step 1, 384 zeros split over the tp shards.
torch_gpt.py trains 3 steps in float64 (AdamW, constant lr, no clipping, as
the runs are set) and counts each step's zero gradient elements. Checked:
  - test_torch_counts_the_planted_zeros: step 1's count is 512 + 219 + 384
    (the construction does what it says), later steps' at least wpe's 512;
  - test_tp1_..., test_tp2_pp2_dp2_num_zeros_are_torchs: every step's
    num_zeros on the JSON line equals torch's count exactly; a tp-replicated
    tensor counted on every tp rank, the tied embedding's second copy, a
    ZeRO slice counted twice or left out would each move it;
  - test_text_line_says_num_zeros_after_the_grad_norm;
  - test_no_num_zeros_unless_asked;
  - test_fp16_skipped_steps_have_no_num_zeros: with an fp16 loss scale of
    2^24 the first steps overflow and are skipped; as Megatron (whose
    optimizer returns no count for a skipped step) their lines say nothing,
    the applied steps' do;
  - test_turning_it_on_for_a_resume_is_no_change_to_the_run.
A second model has what the tiny one lacks, a padded vocabulary (250 real
tokens, 256 rows of wte at tp 1 and at tp 2) and alignment gaps (n_embd
40: every vector of 40 or 120 floats is followed by a gap to the next 16,
and the ZeRO slices end in a tail): the padded rows' gradient is always 0
(the softmax is over the 250 real tokens) and torch's model has no such
rows or gaps, so a count that read them would differ with the layout:
  - test_padded_tp1_..., test_padded_tp2_pp2_dp2_..., test_padded_tp1_pp1_dp3_
    num_zeros_are_torchs: every step's count equals torch's float64 count
    over the real parameters;
  - test_padded_untied_tp2_pp2_dp1_num_zeros_are_torchs: with
    model.untie_embeddings lm_head's padded rows (on the last stage) too.
Exit 77 (skip) without torch.
"""
import array
import json
import os
import random
import re
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
from local_cluster import check  # noqa: E402

N_LAYER, N_EMBD, N_HEAD, VOCAB, SEQ, MAXPOS = 2, 64, 4, 256, 64, 72
G, B, STEPS = 8, 2, 3
LR, WD = 1e-3, 0.1
USED = 200  # token ids below it appear in the file; wte rows from it on are never an input
LNF_COLS, LN1_COLS = (5, 17, 40), (3, 33)


def planted_weights():
    cfg = torch_gpt.Config(N_LAYER, N_EMBD, N_HEAD, VOCAB, SEQ)
    w = torch_gpt.random_weights(cfg, 99)
    g = torch.Generator().manual_seed(5)
    extra = (0.02 * torch.randn(MAXPOS - SEQ, N_EMBD, generator=g)).to(torch.float32)
    w["wpe.weight"] = torch.cat([w["wpe.weight"], extra])
    for c in LNF_COLS:
        w["ln_f.weight"][c] = 0.0
        w["ln_f.bias"][c] = 0.0
    for c in LN1_COLS:
        w["h.0.ln_1.weight"][c] = 0.0
        w["h.0.ln_1.bias"][c] = 0.0
    return cfg, w


def planted_count(tokens):
    """Step 1's zeros by construction: wte's rows of the ids none of its
    inputs holds (those from USED on, and the few below it that step 1's
    512 inputs happen to miss) at the LNF_COLS columns, and the rest."""
    inputs = {tokens[k * SEQ + i] for k in range(G) for i in range(SEQ)}
    return ((MAXPOS - SEQ) * N_EMBD + (VOCAB - len(inputs)) * len(LNF_COLS)
            + len(LN1_COLS) * 3 * N_EMBD)


def make_tokens():
    r = random.Random(11)
    return [r.randrange(USED) for _ in range(STEPS * G * SEQ + 1)]


def noisy_zeros(cfg):
    """The elements whose gradient is 0 in exact arithmetic but rounding
    noise in any float: the key bias (softmax is the same when every score
    of a query moves by q.b), C a layer. Whether such an element comes out
    exactly 0 is decided by the rounding, so neither side's count of them is
    the other's: torch's leaves them out, and mtnlgd's may count up to this
    many more (a count that read padding or gaps is off by more: 68 to 400
    at these shapes)."""
    return cfg.n_layer * cfg.n_embd


def matches(got, want, cfg):
    return len(got) == len(want) and all(
        isinstance(x, int) and w <= x <= w + noisy_zeros(cfg) for x, w in zip(got, want))


def torch_zeros(weights, cfg, tokens, g=G, untie=False):
    """Each step's zero gradient elements, in float64 (AdamW as the runs),
    but the key bias's (noisy_zeros)."""
    p, opt = torch_gpt.adamw64(weights, LR, WD, (0.9, 0.95), 1e-8)
    tok = torch.tensor(tokens, dtype=torch.long)
    counts = []
    for s in range(STEPS):
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for m in range(g // B):
            k0 = s * g + m * B
            rows = torch.stack([tok[k * SEQ:k * SEQ + SEQ + 1] for k in range(k0, k0 + B)])
            _, loss = torch_gpt.forward(p, cfg, rows[:, :-1], rows[:, 1:], untie=untie)
            total = total + loss / (g // B)
        total.backward()
        C = cfg.n_embd
        counts.append(sum(int((t.grad == 0).sum()) - (int((t.grad[C:2 * C] == 0).sum())
                                                      if k.endswith("attn.c_attn.bias") else 0)
                          for k, t in p.items()))
        opt.step()
    return counts


def run(mtnlgd, job, tokens, init, tp, pp, dp, *sets, fmt="json", zeros=True, g=G):
    cmd = [mtnlgd, "--standalone", job, "--log-format", fmt,
           "--set", f"data.path={tokens}", "--set", f"model.init_from={init}",
           "--set", f"model.max_positions={MAXPOS}",
           "--set", f"train.steps={STEPS}", "--set", f"train.global_batch={g}",
           "--set", f"parallel.micro_batch={B}", "--set", f"parallel.tp={tp}",
           "--set", f"parallel.pp={pp}", "--set", f"parallel.dp_min={dp}",
           "--set", "train.lr.schedule=constant", "--set", f"train.lr.peak={LR}",
           "--set", "train.lr.warmup_steps=0", "--set", "train.adam.eps=1e-8",
           "--set", "train.adam.beta1=0.9", "--set", "train.adam.beta2=0.95",
           "--set", f"train.weight_decay={WD}", "--set", "train.clip_grad=0",
           "--set", "train.log_interval=1"]
    if zeros:
        cmd += ["--set", "train.log_num_zeros_in_grad=true"]
    for s in sets:
        cmd += ["--set", s]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        print(out.stderr[-2000:])
    return out


def records(out):
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


PAD_EMBD, PAD_VOCAB, PAD_G = 40, 250, 12  # 250 pads to 256; 40-float vectors leave gaps


def padded_case(mtnlgd, job, tmp):
    """The padded vocabulary and alignment gaps at three layouts (tp, dp
    and the ZeRO slices differ), and the untied head once."""
    failures = 0
    cfg = torch_gpt.Config(N_LAYER, PAD_EMBD, N_HEAD, PAD_VOCAB, SEQ)
    r = random.Random(12)
    tokens = [r.randrange(PAD_VOCAB) for _ in range(STEPS * PAD_G * SEQ + 1)]
    tpath = os.path.join(tmp, "tokens-250.u16")
    with open(tpath, "wb") as f:
        f.write(array.array("H", tokens).tobytes())
    sets = (f"model.n_embd={PAD_EMBD}", f"model.vocab_size={PAD_VOCAB}")
    for untie, layouts in ((False, ((1, 1, 1), (2, 2, 2), (1, 1, 3))), (True, ((2, 2, 1),))):
        w = torch_gpt.random_weights(cfg, 98, untie=untie)
        g = torch.Generator().manual_seed(6)
        extra = (0.02 * torch.randn(MAXPOS - SEQ, PAD_EMBD, generator=g)).to(torch.float32)
        w["wpe.weight"] = torch.cat([w["wpe.weight"], extra])
        want = torch_zeros(w, cfg, tokens, PAD_G, untie)
        init = os.path.join(tmp, f"init-250-{int(untie)}.safetensors")
        torch_gpt.st_save(init, w, {**cfg.metadata(), **({"tie_word_embeddings": "false"}
                                                         if untie else {})})
        name = "padded_untied" if untie else "padded"
        more = sets + (("model.untie_embeddings=true",) if untie else ())
        for tp, pp, dp in layouts:
            out = run(mtnlgd, job, tpath, init, tp, pp, dp, *more, g=PAD_G)
            got = [r.get("num_zeros") for r in records(out)]
            failures += check(f"test_{name}_tp{tp}_pp{pp}_dp{dp}_num_zeros_are_torchs",
                              out.returncode == 0 and matches(got, want, cfg),
                              f"exit {out.returncode}: mtnlgd {got}, torch {want} "
                              f"(+{noisy_zeros(cfg)} at most)")
    return failures


def main():
    mtnlgd, job = sys.argv[1], sys.argv[2]
    failures = 0
    cfg, weights = planted_weights()
    tokens = make_tokens()
    want = torch_zeros(weights, cfg, tokens)
    planted = planted_count(tokens)
    print(f"torch's zero gradient elements by step: {want}; planted at step 1: {planted}")
    failures += check("test_torch_counts_the_planted_zeros",
                      want[0] == planted and all(c >= 512 for c in want), str(want))
    with tempfile.TemporaryDirectory(prefix="mtnlg-zeros-") as tmp:
        tpath = os.path.join(tmp, "tokens.u16")
        with open(tpath, "wb") as f:
            f.write(array.array("H", tokens).tobytes())
        init = os.path.join(tmp, "init.safetensors")
        torch_gpt.st_save(init, weights, cfg.metadata())
        for tp, pp, dp in ((1, 1, 1), (2, 2, 2)):
            out = run(mtnlgd, job, tpath, init, tp, pp, dp)
            got = [r.get("num_zeros") for r in records(out)]
            failures += check(f"test_tp{tp}_pp{pp}_dp{dp}_num_zeros_are_torchs",
                              out.returncode == 0 and matches(got, want, cfg),
                              f"exit {out.returncode}: mtnlgd {got}, torch {want} "
                              f"(+{noisy_zeros(cfg)} at most)")
        out = run(mtnlgd, job, tpath, init, 1, 1, 1, fmt="text")
        steps = [line for line in out.stdout.splitlines() if line.startswith("step ")]
        failures += check("test_text_line_says_num_zeros_after_the_grad_norm",
                          len(steps) == STEPS and matches(
                              [int(m.group(1)) if m else None for m in
                               (re.search(r"\| grad norm [\d.]+ \| num zeros (\d+) \| ", line)
                                for line in steps)], want, cfg), str(steps[:1]))
        out = run(mtnlgd, job, tpath, init, 1, 1, 1, zeros=False)
        failures += check("test_no_num_zeros_unless_asked",
                          out.returncode == 0 and len(records(out)) == STEPS
                          and "num_zeros" not in out.stdout, out.stdout[-300:])
        out = run(mtnlgd, job, tpath, init, 1, 1, 1, "train.precision=fp16",
                  f"train.loss_scale.initial={2 ** 24}", "train.loss_scale.hysteresis=1",
                  "train.steps=6")
        recs = records(out)
        skipped = [r["step"] for r in recs if r["skipped"]]
        bad = [r["step"] for r in recs if ("num_zeros" in r) == r["skipped"]]
        failures += check("test_fp16_skipped_steps_have_no_num_zeros",
                          out.returncode == 0 and len(recs) == 6 and skipped
                          and len(skipped) < 6 and not bad
                          and all(r["num_zeros"] >= 512 for r in recs if not r["skipped"]),
                          f"skipped {skipped}, wrong {bad}: "
                          f"{[(r['step'], r.get('num_zeros')) for r in recs]}")
        # (the decay given: by default it follows train.steps, which the resume lengthens)
        ck = f"checkpoint.dir={os.path.join(tmp, 'ck')}", f"train.lr.decay_steps={STEPS}"
        first = run(mtnlgd, job, tpath, init, 1, 1, 1, *ck, "train.steps=2", zeros=False)
        second = run(mtnlgd, job, tpath, init, 1, 1, 1, *ck)
        said = [line for line in second.stderr.splitlines() if "resume: the job changed" in line]
        failures += check("test_turning_it_on_for_a_resume_is_no_change_to_the_run",
                          first.returncode == 0 and second.returncode == 0 and len(said) == 1
                          and "its trajectory does not" in said[0]
                          and "log_num_zeros_in_grad" in said[0]
                          and matches([r.get("num_zeros") for r in records(second)], want[2:], cfg),
                          f"{said} {[r.get('num_zeros') for r in records(second)]}")
        failures += padded_case(mtnlgd, job, tmp)
    print("%d failure(s)" % failures)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
