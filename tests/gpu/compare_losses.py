#!/usr/bin/env python3
"""compare_losses.py — do two mtnlgd runs of one job follow the same loss
trajectory, step by step? tests/gpu/run compares the tiny job on cuda:0 with
the same job on a CPU device; it runs as well on two CPU logs.

Reads the per-step lines `mtnlgd --standalone` prints on stdout, text
("step     12/300 | tokens ... | loss 3.456789 | ...") or --log-format json
({"step": 12, "steps": 300, ..., "loss": 3.456789, ...}); every other line
(log messages, validation lines) is ignored. Checks that:
  - both logs have every step 1..N (N: --steps, else the total the lines
    name, which must agree), none twice with two values;
  - every loss is finite (NaN or inf, "null" in JSON, fails);
  - |test - ref| / |ref| <= --rtol at every step.
Prints a table of the steps, the worst relative difference and where, and
"RESULT loss_<label>_worst_rel X" for the run script's table. Exits 0 when
the trajectories agree, 1 when they do not (or a log has no steps), 2 on a
usage error or an unreadable file. Standard library only.

Usage: compare_losses.py [--rtol R] [--steps N] [--label L] [--names A,B] REF TEST
"""
import argparse
import json
import math
import re
import sys

TEXT = re.compile(r"^step\s+(\d+)/(\d+)\s+\|\s+tokens\s+\d+\s+\|\s+loss\s+(\S+)\s+\|")


def parse_loss(s):
    """A loss as printed: a number, nan/-nan/inf (text) or None (JSON null)."""
    if s is None:
        return math.nan
    try:
        return float(s)
    except ValueError:
        return math.nan


def read_steps(path):
    """{step: loss} and the set of totals ("/300") the lines name."""
    losses, totals, clashes = {}, set(), []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            step = total = None
            if line.startswith("{"):
                try:
                    o = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(o, dict) or "step" not in o or "loss" not in o:
                    continue
                step, total, loss = int(o["step"]), o.get("steps"), parse_loss(o["loss"])
            else:
                m = TEXT.match(line)
                if not m:
                    continue
                step, total, loss = int(m.group(1)), m.group(2), parse_loss(m.group(3))
            if total is not None:
                totals.add(int(total))
            if step in losses and not same(losses[step], loss):
                clashes.append(step)
            losses.setdefault(step, loss)
    return losses, totals, clashes


def same(a, b):
    return a == b or (math.isnan(a) and math.isnan(b))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ref", help="the reference run's stdout (e.g. cpu)")
    ap.add_argument("test", help="the run under test's stdout (e.g. cuda:0)")
    ap.add_argument("--rtol", type=float, default=1e-3,
                    help="largest |test - ref| / |ref| allowed at any step (default 1e-3)")
    ap.add_argument("--steps", type=int, default=0,
                    help="steps 1..N must all be there (default: the total the lines name)")
    ap.add_argument("--label", default="", help="names the comparison in the output: fp32, bf16")
    ap.add_argument("--names", default="ref,test", help="column names of the two runs")
    a = ap.parse_args()
    label = a.label or "losses"
    names = (a.names.split(",") + ["ref", "test"])[:2]
    tag = f"compare_losses: {label}"
    key = f"loss_{a.label}_worst_rel" if a.label else "loss_worst_rel"

    runs = []
    for path in (a.ref, a.test):
        try:
            runs.append(read_steps(path))
        except OSError as e:
            print(f"{tag}: cannot read {path}: {e.strerror}", file=sys.stderr)
            return 2
    problems = []
    for path, (losses, _, clashes) in zip((a.ref, a.test), runs):
        if not losses:
            problems.append(f"{path} has no step lines")
        if clashes:
            problems.append(f"{path} gives two losses for step(s) {clashes[:5]}")
    n = a.steps
    if n <= 0:
        totals = runs[0][1] | runs[1][1]
        if len(totals) == 1:
            n = totals.pop()
        elif totals:
            problems.append(f"the logs name different totals of steps: {sorted(totals)}")
        n = n if n > 0 else max([0] + list(runs[0][0]) + list(runs[1][0]))

    ref, test = runs[0][0], runs[1][0]
    worst, worst_step, compared = -1.0, 0, 0
    bad, missing = [], {names[0]: [], names[1]: []}
    print(f"{'step':>5} {names[0]:>14} {names[1]:>14} {'rel diff':>10}")
    for s in range(1, n + 1):
        r, t = ref.get(s), test.get(s)
        if r is None or t is None:
            for name, v in ((names[0], r), (names[1], t)):
                if v is None:
                    missing[name].append(s)
            print(f"{s:>5} {fmt(r):>14} {fmt(t):>14} {'missing':>10}")
            continue
        if not (math.isfinite(r) and math.isfinite(t)):
            bad.append(f"step {s}: loss {fmt(r)} ({names[0]}), {fmt(t)} ({names[1]})")
            print(f"{s:>5} {fmt(r):>14} {fmt(t):>14} {'not finite':>10}")
            continue
        rel = abs(t - r) / max(abs(r), 1e-12)
        compared += 1
        if rel > worst:
            worst, worst_step = rel, s
        flag = "" if rel <= a.rtol else "  > rtol"
        if flag:
            bad.append(f"step {s}: {names[0]} {r:.6f}, {names[1]} {t:.6f}, relative difference "
                       f"{rel:.2e} > {a.rtol:.0e}")
        print(f"{s:>5} {r:>14.6f} {t:>14.6f} {rel:>10.2e}{flag}")
    extra = sorted(s for s in set(ref) | set(test) if s > n)
    if extra:
        problems.append(f"steps past {n} in the logs: {extra[:5]}")
    problems += [f"step(s) {ranges(v)} missing from {k}" for k, v in missing.items() if v]
    problems += bad

    if compared:
        print(f"{tag}: {compared} of {n} steps compared, worst relative difference "
              f"{worst:.2e} at step {worst_step} ({names[0]} {ref[worst_step]:.6f}, "
              f"{names[1]} {test[worst_step]:.6f}); tolerance {a.rtol:.0e}")
        print(f"RESULT {key} {worst:.3e}")
    else:
        print(f"{tag}: no step to compare")
        print(f'RESULT {key} "n/a"')
    if problems:
        for p in problems[:10]:
            print(f"{tag}: {p}")
        if len(problems) > 10:
            print(f"{tag}: ... and {len(problems) - 10} more")
        print(f"{tag}: FAIL")
        return 1
    print(f"{tag}: ok")
    return 0


def ranges(steps):
    """[1, 2, 3, 7] -> "1-3, 7" """
    out, i = [], 0
    while i < len(steps):
        j = i
        while j + 1 < len(steps) and steps[j + 1] == steps[j] + 1:
            j += 1
        out.append(str(steps[i]) if i == j else f"{steps[i]}-{steps[j]}")
        i = j + 1
    return ", ".join(out)


def fmt(v):
    return "-" if v is None else f"{v:.6f}" if math.isfinite(v) else str(v)


if __name__ == "__main__":
    sys.exit(main())
