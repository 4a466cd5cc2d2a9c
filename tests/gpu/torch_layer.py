#!/usr/bin/env python3
"""torch_layer.py — one GPT-3 1.3B transformer layer in PyTorch eager, forward
and backward on the GPU: the reference point for bench/gpu_bench.c.

The layer is model/gpt.c's: pre-LayerNorm, one fused qkv projection, causal
softmax attention, output projection, residual; LayerNorm, 4h MLP with GeLU
(tanh), residual. fp32 parameters and inputs under bf16 autocast, the usual
mixed-precision setup. Two forms of the attention: written out, with the
probabilities materialised as mtnlg's backend does ("eager"), and
F.scaled_dot_product_attention (flash kernels, "sdpa") where this torch has it,
which is also timed alone (the first shape's B) beside gpu_bench's flash row.
TFLOP/s count the same model FLOPs as gpu_bench, 72·B·s·h²·(1 + s/6h).

Prints "RESULT key value" lines for tests/gpu/run; "RESULT torch n/a" (exit 0)
when no torch with CUDA is importable here.

Usage: torch_layer.py [--quick] [--device cuda|cpu] [--shape B,T,C,NH ...]
"""
import argparse
import math
import sys
import time

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    print("torch_layer: torch is not importable by", sys.executable)
    print('RESULT torch "n/a: no torch"')
    sys.exit(0)


def make_layer(C, device, gen):
    def p(*shape, scale):
        return (torch.randn(*shape, generator=gen) * scale).to(device).requires_grad_()

    return {
        "ln1w": p(C, scale=0.1), "ln1b": p(C, scale=0.1),
        "qkvw": p(3 * C, C, scale=0.02), "qkvb": p(3 * C, scale=0.02),
        "projw": p(C, C, scale=0.02), "projb": p(C, scale=0.02),
        "ln2w": p(C, scale=0.1), "ln2b": p(C, scale=0.1),
        "fcw": p(4 * C, C, scale=0.02), "fcb": p(4 * C, scale=0.02),
        "fcpw": p(C, 4 * C, scale=0.02), "fcpb": p(C, scale=0.02),
    }


def attention(qkv, B, T, C, NH, sdpa):
    HS = C // NH
    q, k, v = qkv.split(C, dim=2)
    q, k, v = (t.view(B, T, NH, HS).transpose(1, 2) for t in (q, k, v))  # (B, NH, T, HS)
    if sdpa:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(HS))
        mask = torch.ones(T, T, dtype=torch.bool, device=qkv.device).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        y = att @ v
    return y.transpose(1, 2).reshape(B, T, C)


def layer_fwd(P, x, NH, sdpa):
    B, T, C = x.shape
    h = F.layer_norm(x, (C,), P["ln1w"], P["ln1b"], 1e-5)
    h = F.linear(h, P["qkvw"], P["qkvb"])
    h = F.linear(attention(h, B, T, C, NH, sdpa), P["projw"], P["projb"])
    x = x + h
    h = F.layer_norm(x, (C,), P["ln2w"], P["ln2b"], 1e-5)
    h = F.gelu(F.linear(h, P["fcw"], P["fcb"]), approximate="tanh")
    return x + F.linear(h, P["fcpw"], P["fcpb"])


def timed_ms(fn, iters, cuda):
    """Milliseconds of one fn(), the mean of iters calls after two warm-up
    ones: CUDA events on the GPU, the wall clock on the CPU."""
    for _ in range(2):
        fn()
    if cuda:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if cuda:
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / iters
    return (time.perf_counter() - t0) * 1e3 / iters


def bench(B, T, C, NH, sdpa, iters, device):
    gen = torch.Generator().manual_seed(42)
    P = make_layer(C, device, gen)
    x = torch.randn(B, T, C, generator=gen).to(device).requires_grad_()
    dout = torch.randn(B, T, C, generator=gen).to(device)
    cuda = device == "cuda"

    def step():
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            out = layer_fwd(P, x, NH, sdpa)
        out.backward(dout)

    ms = timed_ms(step, iters, cuda)
    flops = 72.0 * B * T * C * C * (1.0 + T / (6.0 * C))
    return ms, flops / (ms * 1e-3) / 1e12


def bench_attention(B, T, C, NH, iters, device):
    """Milliseconds of SDPA attention alone on a bf16 qkv (B,T,3C), forward +
    backward and forward alone: the peer of gpu_bench's flash row (its qkv
    16-bit, its output gradient fp32 as mtnlg's is, its D = rowsum(dO ∘ O)
    pass counted)."""
    gen = torch.Generator().manual_seed(7)
    qkv = (torch.randn(B, T, 3 * C, generator=gen) * 2.0).to(device, torch.bfloat16)
    qkv.requires_grad_()
    dout = (torch.randn(B, T, C, generator=gen) * 0.02).to(device)
    cuda = device == "cuda"

    def fwd():
        return attention(qkv, B, T, C, NH, True)

    def step():
        qkv.grad = None  # written afresh, as mtnlg's dqkv is, not added to
        fwd().backward(dout.to(torch.bfloat16))

    ms = timed_ms(step, iters, cuda)
    with torch.no_grad():
        fwd_ms = timed_ms(fwd, iters, cuda)
    flops = 3.0 * 2.0 * B * T * T * C  # gpu_bench's attention_flops: causal half, bwd 2x fwd
    return ms, fwd_ms, flops / (ms * 1e-3) / 1e12


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", action="append", help="B,T,C,NH (default: 1.3B at B=4 and 8)")
    a = ap.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        print(f"torch_layer: torch {torch.__version__} at {sys.executable} has no usable CUDA")
        print(f'RESULT torch "n/a: torch {torch.__version__} without CUDA"')
        return 0
    shapes = [tuple(int(v) for v in s.split(",")) for s in a.shape] if a.shape else \
        [(4, 2048, 2048, 16), (8, 2048, 2048, 16)]
    iters = 3 if a.quick else 10
    name = torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu"
    print(f"torch_layer: torch {torch.__version__} on {name}")
    print(f'RESULT torch "{torch.__version__}"')
    forms = [("eager", False)]
    if hasattr(F, "scaled_dot_product_attention"):
        forms.append(("sdpa", True))
    for B, T, C, NH in shapes:
        for tag, sdpa in forms:
            try:
                ms, tflops = bench(B, T, C, NH, sdpa, iters, a.device)
            except RuntimeError as e:  # out of memory, a kernel missing for this GPU
                print(f"torch_layer: {tag} B={B}: {str(e).splitlines()[0]}")
                if a.device == "cuda":
                    torch.cuda.empty_cache()
                continue
            print(f"torch {tag:5} B={B}: {ms:.2f} ms fwd+bwd, {tflops:.1f} TFLOP/s")
            print(f"RESULT torch_{tag}_b{B}_ms {ms:.3f}")
            print(f"RESULT torch_{tag}_b{B}_tflops {tflops:.2f}")
            sys.stdout.flush()
    if hasattr(F, "scaled_dot_product_attention"):
        B, T, C, NH = shapes[0]
        try:
            ms, fwd_ms, tflops = bench_attention(B, T, C, NH, iters, a.device)
        except RuntimeError as e:
            print(f"torch_layer: sdpa attention B={B}: {str(e).splitlines()[0]}")
        else:
            print(f"torch sdpa attention alone B={B}: {ms:.2f} ms fwd+bwd ({tflops:.1f} TFLOP/s), "
                  f"forward {fwd_ms:.2f} ms")
            print(f"RESULT torch_sdpa_attention_b{B}_ms {ms:.3f}")
            print(f"RESULT torch_sdpa_attention_fwd_b{B}_ms {fwd_ms:.3f}")
            print(f"RESULT torch_sdpa_attention_b{B}_tflops {tflops:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
