#!/usr/bin/env python3
"""torch_step.py — whole training steps of GPT-3 1.3B in PyTorch eager on the
GPU: the reference point for mtnlgd on etc/jobs/gpt3-1.3b-bench.json.

The model is model/gpt.c's, built from the same preset (etc/models/): learned
positions, pre-LayerNorm blocks (one fused qkv projection, causal softmax
attention, output projection, residual; LayerNorm, 4h MLP with GeLU (tanh),
residual), final LayerNorm, LM head tied to the token embedding over the
padded vocabulary (vocab_size rounded up to vocab_pad_to, 128) with the
padding columns cut before the loss; dropout as the preset sets it (none
unless it says so). Written the way a PyTorch user trains: fp32 parameters
(the master weights) under bf16 autocast, gradient accumulation over the
micro-batches of a step, clip_grad_norm_(1.0), torch.optim.AdamW with
fused=False and foreach left to its default, decay on matrices only.
The batch matches the job's: global batch 16 as 4 micro-batches of 4 at
sequence 2048 (-B, --global-batch to change).

Two forms of the attention, as tests/gpu/torch_layer.py has them: written
out, the probabilities materialised as mtnlg's backend does ("eager", the
reference the run script's targets name), and F.scaled_dot_product_attention
(flash kernels, "sdpa") where this torch has it.

A step is timed from zero_grad to the end of the optimizer's update (CUDA
synchronised), after warm-up steps; ms/step is the mean of the timed steps.
TFLOP/s count the model FLOPs mtnlg counts (mt_gpt_flops_per_step in
daemon/model/gpt.c, Narayanan et al. eq. 3 without recomputation):
3 · tokens · (L (24 h² + 4 s h) + 2 h Vp).

Prints "RESULT key value" lines for tests/gpu/run: torch_step_ms,
torch_step_tokens_per_s, torch_step_tflops (eager attention) and
torch_step_sdpa_* (flash); "RESULT torch_step n/a" (exit 0) when no torch
with CUDA is importable here or the model does not fit.

Usage: torch_step.py [--quick] [--attention eager|sdpa|both] [-B N] [--global-batch N]
       torch_step.py --cpu --tiny        (tiny shapes on the CPU: checks the script)
"""
import argparse
import gc
import json
import math
import os
import sys
import time

try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except ImportError:
    print("torch_step: torch is not importable by", sys.executable)
    print('RESULT torch_step "n/a: no torch"')
    sys.exit(0)

PRESETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "etc", "models")


class Block(nn.Module):
    def __init__(self, C, NH, eps, hidden_dropout, attention_dropout, sdpa, device):
        super().__init__()
        self.NH, self.sdpa = NH, sdpa
        self.hidden_dropout, self.attention_dropout = hidden_dropout, attention_dropout
        self.ln_1 = nn.LayerNorm(C, eps=eps, device=device)
        self.c_attn = nn.Linear(C, 3 * C, device=device)
        self.c_proj = nn.Linear(C, C, device=device)
        self.ln_2 = nn.LayerNorm(C, eps=eps, device=device)
        self.c_fc = nn.Linear(C, 4 * C, device=device)
        self.mlp_proj = nn.Linear(4 * C, C, device=device)

    def attention(self, x, mask):
        B, T, C = x.shape
        hs = C // self.NH
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.NH, hs).transpose(1, 2) for t in (q, k, v))  # (B,NH,T,hs)
        p = self.attention_dropout if self.training else 0.0
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B,NH,T,T)
            att = att.masked_fill(mask[:T, :T], float("-inf")).softmax(dim=-1)
            if p > 0:
                att = F.dropout(att, p)
            y = att @ v
        return y.transpose(1, 2).reshape(B, T, C)

    def forward(self, x, mask):
        h = self.c_proj(self.attention(self.ln_1(x), mask))
        x = x + F.dropout(h, self.hidden_dropout, self.training)
        h = self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))
        return x + F.dropout(h, self.hidden_dropout, self.training)


class GPT(nn.Module):
    def __init__(self, m, sdpa, device):
        super().__init__()
        L, C, NH, S = m["n_layer"], m["n_embd"], m["n_head"], m["seq_len"]
        self.V = m["vocab_size"]
        eps = m.get("ln_eps", 1e-5)
        self.hidden_dropout = m.get("hidden_dropout", 0.0)
        self.wte = nn.Embedding(m["padded_vocab"], C, device=device)
        self.wpe = nn.Embedding(S, C, device=device)
        self.h = nn.ModuleList([
            Block(C, NH, eps, self.hidden_dropout, m.get("attention_dropout", 0.0), sdpa, device)
            for _ in range(L)])
        self.ln_f = nn.LayerNorm(C, eps=eps, device=device)
        self.register_buffer("mask", torch.ones(S, S, dtype=torch.bool, device=device).triu(1))
        self.register_buffer("pos", torch.arange(S, device=device))
        # mt_gpt_init_weights: N(0, std) matrices and embeddings, the two
        # output projections std / sqrt(2 L), biases 0, LayerNorms 1 and 0
        std = m.get("init_std", 0.02)
        with torch.no_grad():
            for p in self.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, std)
            for blk in self.h:
                for lin in (blk.c_attn, blk.c_proj, blk.c_fc, blk.mlp_proj):
                    lin.bias.zero_()
                for lin in (blk.c_proj, blk.mlp_proj):
                    lin.weight.normal_(0.0, std / math.sqrt(2.0 * L))

    def forward(self, idx, targets):
        B, T = idx.shape
        x = F.dropout(self.wte(idx) + self.wpe(self.pos[:T]), self.hidden_dropout, self.training)
        for blk in self.h:
            x = blk(x, self.mask)
        logits = F.linear(self.ln_f(x), self.wte.weight)[:, :, : self.V]  # tied LM head
        return F.cross_entropy(logits.reshape(B * T, -1), targets.reshape(-1))


def load_preset(name):
    with open(os.path.join(PRESETS, name + ".json")) as f:
        m = json.load(f)
    pad = m.get("vocab_pad_to", 128)  # the job's default, tp 1
    m["padded_vocab"] = (m["vocab_size"] + pad - 1) // pad * pad
    return m


def flops_per_step(m, tokens, T):
    """mt_gpt_flops_per_step: 3 · tokens · (L (24 C² + 4 T C) + 2 C Vp)."""
    C, L, Vp = m["n_embd"], m["n_layer"], m["padded_vocab"]
    return 3.0 * tokens * (L * (24.0 * C * C + 4.0 * T * C) + 2.0 * C * Vp)


def make_optimizer(model):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    kw = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
    try:
        return torch.optim.AdamW(groups, fused=False, **kw)
    except TypeError:  # a torch before fused=
        return torch.optim.AdamW(groups, **kw)


def run(m, a, sdpa, device):
    """Mean ms of a.steps timed steps after a.warmup ones."""
    torch.manual_seed(1234)
    cuda = device == "cuda"
    model = GPT(m, sdpa, device).train()
    opt = make_optimizer(model)
    T, B, G = a.T, a.B, a.global_batch
    micro = G // B
    V = m["vocab_size"]
    # the data is random tokens, made before the clock starts
    data = torch.randint(0, V, (a.warmup + a.steps, micro, B, T + 1), device=device)
    times = []
    for s in range(a.warmup + a.steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        for k in range(micro):
            x, y = data[s, k, :, :T], data[s, k, :, 1:]
            with torch.autocast(device_type=device, dtype=torch.bfloat16):
                loss = model(x, y) / micro
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if s >= a.warmup:
            times.append(dt)
        if a.verbose:
            print(f"  step {s + 1}: loss {total.item():.4f}, {dt * 1e3:.1f} ms"
                  f"{'' if s >= a.warmup else ' (warm-up)'}")
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    del model, opt, data
    return sum(times) / len(times) * 1e3, peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="1 warm-up and 2 timed steps per form")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (with --tiny: a check)")
    ap.add_argument("--tiny", action="store_true",
                    help="the tiny preset, 2 x 8 sequences of 64 (etc/jobs/tiny-demo.json)")
    ap.add_argument("--preset", default=None, help="a model in etc/models (default gpt3-1.3b)")
    ap.add_argument("--attention", choices=("eager", "sdpa", "both"), default="both")
    ap.add_argument("-B", type=int, default=None, help="micro-batch (default 4; --tiny 8)")
    ap.add_argument("--global-batch", type=int, default=None, help="default 16")
    ap.add_argument("-T", type=int, default=None, help="sequence (default the preset's)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (default 2)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 4)")
    ap.add_argument("-v", "--verbose", action="store_true", help="a line per step")
    a = ap.parse_args()
    device = "cpu" if a.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print(f"torch_step: torch {torch.__version__} at {sys.executable} has no usable CUDA")
        print(f'RESULT torch_step "n/a: torch {torch.__version__} without CUDA"')
        return 0
    preset = a.preset or ("tiny" if a.tiny else "gpt3-1.3b")
    m = load_preset(preset)
    a.T = a.T or m["seq_len"]
    a.B = a.B or (8 if a.tiny else 4)
    a.global_batch = a.global_batch or 16
    a.warmup = a.warmup if a.warmup is not None else 1 if a.quick else 2
    a.steps = a.steps or (2 if a.quick else 4)
    wrong = [msg for bad, msg in (
        (a.T > m["seq_len"], f"-T {a.T} is longer than the preset's sequence, {m['seq_len']}"),
        (a.B < 1 or a.global_batch % a.B,
         f"--global-batch {a.global_batch} is not a multiple of -B {a.B}"),
        (a.steps < 1, "--steps must be at least 1"),
        (a.warmup < 0, "--warmup must be at least 0")) if bad]
    if wrong:
        ap.error("; ".join(wrong))
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
    else:
        name = f"cpu, {torch.get_num_threads()} threads"
    print(f"torch_step: torch {torch.__version__} on {name}: {preset} "
          f"({m['n_layer']} layers, h {m['n_embd']}, {m['n_head']} heads, vocab {m['vocab_size']} "
          f"padded {m['padded_vocab']}, seq {a.T}), {a.global_batch // a.B} micro-batches of "
          f"{a.B} per step, bf16 autocast, AdamW (fused=False)")
    print(f'RESULT torch_step_torch "{torch.__version__}"')
    forms = [("eager", False), ("sdpa", True)]
    if a.attention != "both":
        forms = [f for f in forms if f[0] == a.attention]
    tokens = a.global_batch * a.T
    flops = flops_per_step(m, tokens, a.T)
    for tag, sdpa in forms:
        key = "torch_step" if tag == "eager" else f"torch_step_{tag}"
        if sdpa and not hasattr(F, "scaled_dot_product_attention"):
            print(f"torch_step: {tag}: torch {torch.__version__} has no "
                  "scaled_dot_product_attention")
            continue
        gc.collect()  # the previous form's model, optimizer and any failure's frames
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            ms, peak = run(m, a, sdpa, device)
        except RuntimeError as e:  # out of memory, a kernel missing for this GPU
            print(f"torch_step: {tag}: {str(e).splitlines()[0]}")
            print(f'RESULT {key} "n/a: {type(e).__name__}"')
            continue
        tps, tflops = tokens / (ms * 1e-3), flops / (ms * 1e-3) / 1e12
        mem = f", peak memory {peak:.1f} GiB" if device == "cuda" else ""
        print(f"torch {tag:5}: {ms:.1f} ms/step, {tps:.0f} tokens/s, {tflops:.1f} TFLOP/s "
              f"({a.steps} steps after {a.warmup} warm-up{mem})")
        print(f"RESULT {key}_ms {ms:.3f}")
        print(f"RESULT {key}_tokens_per_s {tps:.1f}")
        print(f"RESULT {key}_tflops {tflops:.3f}")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
