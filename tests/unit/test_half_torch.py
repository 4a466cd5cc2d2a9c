#!/usr/bin/python3
"""test_half_torch.py — half.h's float -> bf16 / fp16 rounding against PyTorch's.

A sample of float32 values (random bit patterns over every exponent, values in
each format's range, the exact ties between neighbouring half values and the
floats next to them, subnormals, overflow, infinities, NaNs) goes through the
C helper (argv[1], tests/unit/test_half_helper) and through
tensor.to(torch.bfloat16 / torch.float16). The bit patterns must be equal,
except that a NaN only has to stay a NaN (PyTorch makes every NaN its one
canonical NaN; half.h keeps sign and payload). Skips (77) without torch.
"""
import os
import subprocess
import sys
import tempfile

# torch's OpenMP threads sleep when idle: spinning, they take the 2 cores
# from the mtnlgd this test runs and from the suite's other test
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
try:
    import torch
except ImportError:
    print("torch not importable: skipped")
    sys.exit(77)

HELPER = sys.argv[1]


def sample():
    g = torch.Generator().manual_seed(20240611)
    parts = [
        # uniform bit patterns: every exponent, NaNs and float subnormals
        torch.randint(-(2**31), 2**31 - 1, (200000,), generator=g, dtype=torch.int64)
        .to(torch.int32)
        .view(torch.float32),
        torch.randn(100000, generator=g) * 1000.0,
        torch.randn(100000, generator=g) * 1e-6,  # fp16 subnormals
        torch.tensor([0.0, -0.0, 1.0, 65504.0, 65519.996, 65520.0, 70000.0, 3.4e38,
                      float("inf"), float("-inf"), float("nan"), 2**-24, 2**-25, 1.5 * 2**-25,
                      2**-126, 2**-149, 2**-133, 3 * 2**-134]),
    ]
    # every tie between neighbouring half values, and the floats either side
    for dtype, width in ((torch.bfloat16, 7), (torch.float16, 10)):
        bits = torch.arange(0, 0x7C00 if dtype == torch.float16 else 0x7F80, dtype=torch.int32)
        bits = bits[torch.randperm(len(bits), generator=g)[:20000]]
        lo = bits.to(torch.int16).view(dtype).double()
        hi = (bits + 1).to(torch.int16).view(dtype).double()
        # past the largest finite value the next step is the overflow point
        top = 65536.0 if dtype == torch.float16 else 2.0**128
        hi = torch.where(torch.isinf(hi), torch.full_like(hi, top), hi)
        mid = ((lo + hi) / 2).float()  # exact: one more bit than the format has
        up = torch.nextafter(mid, torch.full_like(mid, float("inf")))
        down = torch.nextafter(mid, torch.zeros_like(mid))
        parts += [mid, -mid, up, down, -up]
    return torch.cat(parts).contiguous()


def main():
    x = sample()
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "in.f32"), os.path.join(tmp, "out.u16")
        with open(src, "wb") as f:
            f.write(x.numpy().tobytes())
        subprocess.run([HELPER, src, dst], check=True)
        with open(dst, "rb") as f:
            raw = bytearray(f.read())
    n = len(x)
    ours = torch.frombuffer(raw, dtype=torch.int16)
    failed = 0
    for k, dtype in enumerate((torch.bfloat16, torch.float16)):
        got = ours[k * n:(k + 1) * n]
        ref = x.to(dtype).view(torch.int16)
        got_nan = torch.isnan(got.view(dtype).float())
        ref_nan = torch.isnan(ref.view(dtype).float())
        bad = (got != ref) & ~(got_nan & ref_nan)
        nbad = int(bad.sum())
        print(f"{dtype}: {n} values, {nbad} differ from torch")
        for i in torch.nonzero(bad).flatten()[:5].tolist():
            print(f"  {x[i].item()!r} (0x{x[i:i+1].view(torch.int32).item() & 0xffffffff:08x}): "
                  f"ours 0x{got[i].item() & 0xffff:04x}, torch 0x{ref[i].item() & 0xffff:04x}")
        failed += nbad
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
