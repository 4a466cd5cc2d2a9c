"""Every (tp, pp, dp) layout trains the trajectory of one device (DESIGN's
determinism).

usage: test_layouts.py MTNLGD JOB.json MTNLGCTL
A 4-layer tiny model trains 10 steps on real text, global batch 8 in
micro-batches of 2 (4 micro-batches per replica at dp 1), under (tp, pp, dp) =
(1,1,1), (2,1,1), (4,1,1), (1,2,1), (1,4,1), (1,1,2), (1,1,4), (2,2,2), (2,2,1):
ranks are device threads of one mtnlgd; tensor-parallel ranks hold shards of
every matrix (Megatron's column/row split, vocabulary-parallel embedding and
cross-entropy); pipeline stages run 1F1B and pass activations over Gloo;
replicas reduce-scatter gradients, update their 1/dp slice (ZeRO-1) and
all-gather it; the tied embedding's two copies (first and last stage) sum
their gradients. At every step the loss must equal (1,1,1)'s within 1e-5
relative and the exported (gathered) weights within 1e-4, also with dropout on
and with recomputation on, and with sequence parallelism (tp 2 and
tp 2 x pp 2 x dp 2; with dropout and recomputation at tp 4 and tp 2 x pp 2);
the Adam moments per rank must be 1/dp of the
whole model's at tp = pp = 1 and agree with `mtnlgctl plan`'s optimizer
bytes. (1,3,1) splits the 4 layers unevenly (2, 1, 1). With pipeline stages,
the run with started (overlapped) sends must equal the run whose every send
blocks (parallel.overlap_p2p = false) bit for bit. Without dropout or
recomputation, (2,1,1), (1,4,1) and (2,2,2) export to a directory (Hugging
Face's sharded layout, each stage's first rank writing its stage's files),
read back through its index. Interleaved 1F1B (parallel.virtual_stages = 2:
each of 2 stages holds 2 one-layer chunks, the last stage's chunk 0 feeding
the first stage's chunk 1) trains the same trajectory at (1,2,1) and
(2,2,2), where dp 2 leaves 2 micro-batches a replica, pp of them (every
forward before any backward), also with dropout and recomputation; its
started sends match its blocking receives bit for bit, and (2,2,2) exports
to a directory, each stage writing its chunks' files. The tied embedding's
two copies (the first stage's wte and the last stage's) hold the same master
weights and Adam moments, bit for bit, after 30 steps at pp 2 x dp 6, where
the two stages' ZeRO slices start at other elements.
"""
import array
import glob
import json
import math
import os
import re
import struct
import subprocess
import sys
import tempfile


def st_load(path):
    if path.endswith("/"):  # Hugging Face's sharded layout: every file its index names
        index = json.load(open(os.path.join(path, "model.safetensors.index.json")))
        out = {}
        for file in sorted(set(index["weight_map"].values())):
            out.update(st_load(os.path.join(path, file)))
        if set(out) != set(index["weight_map"]):
            raise SystemExit(f"{path}: the index names {sorted(index['weight_map'])}, "
                             f"the files hold {sorted(out)}")
        return out
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    header.pop("__metadata__", None)
    out = {}
    for name, e in header.items():
        a, b = e["data_offsets"]
        out[name] = array.array("f", blob[8 + n + a: 8 + n + b])
    return out


def run(mtnlgd, job, tokens, export, tp, pp, dp, extra):
    cmd = [mtnlgd, "--standalone", job, "--log-format", "json", "--set", f"data.path={tokens}",
           "--set", "train.steps=10", "--set", "train.lr.warmup_steps=2",
           "--set", "model.n_layer=4", "--set", "parallel.micro_batch=2",
           "--set", "train.global_batch=8", "--set", f"parallel.tp={tp}",
           "--set", f"parallel.pp={pp}", "--set", f"parallel.dp_min={dp}",
           "--export", export] + extra
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        print(out.stderr)
        raise SystemExit(f"tp {tp} pp {pp} dp {dp}: mtnlgd exited {out.returncode}")
    losses = [json.loads(l)["loss"] for l in out.stdout.splitlines() if l.startswith("{")]
    m = re.search(r"Adam moments (\d+) bytes per rank", out.stderr)
    a = re.search(r"activations (\d+) bytes per rank", out.stderr)
    run.acts[(tp, pp, dp, " ".join(extra))] = int(a.group(1)) if a else None
    return losses, int(m.group(1)) if m else None


run.acts = {}  # activation bytes stage 0's rank 0 laid out, by layout and options


def tied_copies(mtnlgd, job, tokens, tmp):
    """The tied embedding's two copies (the first stage's wte and the last
    stage's) after 30 steps at pp 2 x dp 6, where the ZeRO slices of the two
    stages start at other elements: their master weights and Adam moments,
    read from the end-of-run checkpoint's two shard files, must be equal bit
    for bit. Returns 0 when they are."""
    ckpt = os.path.join(tmp, "tied-ckpt")
    cmd = [mtnlgd, "--standalone", job, "--log-format", "json", "--set", f"data.path={tokens}",
           "--set", "train.steps=30", "--set", "model.n_layer=2", "--set", "parallel.micro_batch=1",
           "--set", "train.global_batch=12", "--set", "parallel.pp=2",
           "--set", "parallel.dp_min=6", "--set", "parallel.dp_max=6",
           "--set", f"checkpoint.dir={ckpt}", "--set", "checkpoint.interval=30"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        print(out.stderr)
        print(f"FAIL test_tied_embedding_copies_stay_equal_at_pp2_dp6: mtnlgd exited "
              f"{out.returncode}")
        return 1
    job_dir = os.path.join(ckpt, json.load(open(job))["name"])
    step_dir = os.path.join(job_dir, open(os.path.join(job_dir, "latest")).read().strip())
    manifest = json.load(open(os.path.join(step_dir, "manifest.json")))
    model = json.load(open(os.path.join(os.path.dirname(job), "..", "models", "tiny.json")))
    wte = model["vocab_size"] * model["n_embd"]  # the first tensor of both end stages

    def wte_of(name, a):
        with open(os.path.join(step_dir, name), "rb") as f:
            head = f.read(64)
            (n,) = struct.unpack("<Q", head[24:32])
            f.seek(64 + 4 * n * a)
            return f.read(4 * wte)

    differ = {}
    arrays = next(f["arrays"] for f in manifest["files"] if f["name"] == "shard_tp00_pp000.bin")
    for a, array_name in enumerate(arrays):
        first, last = wte_of("shard_tp00_pp000.bin", a), wte_of("shard_tp00_pp001.bin", a)
        x, y = array.array("f", first), array.array("f", last)
        if len(x) != wte or len(y) != wte:
            differ[array_name] = "short"
        else:
            n = sum(1 for i in range(wte) if x[i] != y[i])
            if n:
                differ[array_name] = f"{n} of {wte} elements"
    ok = not differ
    print(f"{'ok' if ok else 'FAIL'} test_tied_embedding_copies_stay_equal_at_pp2_dp6: "
          f"{differ or 'master and Adam moments equal bit for bit'}")
    return 0 if ok else 1


def main():
    mtnlgd, job, mtnlgctl = sys.argv[1], sys.argv[2], sys.argv[3]
    data = b""
    for f in sorted(glob.glob("/usr/share/common-licenses/*")):
        if os.path.isfile(f) and not os.path.islink(f):
            data += open(f, "rb").read()
    failures = 0
    every = ((1, 1, 1), (2, 1, 1), (4, 1, 1), (1, 2, 1), (1, 4, 1), (1, 1, 2), (1, 1, 4),
             (2, 2, 2), (2, 2, 1), (1, 3, 1))
    dropout = ["--set", "model.hidden_dropout=0.1", "--set", "model.attention_dropout=0.1"]
    sp = ["--set", "parallel.sequence_parallel=true"]
    interleaved = ["--set", "parallel.virtual_stages=2"]
    # sequence parallelism only splits something at tp > 1: its reference is
    # the (1,1,1) run of the variant without it (recomputation changes no
    # bit, so dropout's serves with it too); at tp 4 a rank's rows are half
    # a sample, so the dropout masks start inside one
    variants = [("plain", [], every, None),
                ("dropout", dropout, every, None),
                ("recompute", ["--set", "parallel.recompute=true"], every, None),
                ("sequence_parallel", sp, ((2, 1, 1), (2, 2, 2)), "plain"),
                ("sequence_parallel_dropout_recompute",
                 sp + dropout + ["--set", "parallel.recompute=true"], ((4, 1, 1), (2, 2, 1)),
                 "dropout"),
                ("interleaved", interleaved, ((1, 2, 1), (2, 2, 2)), "plain"),
                ("interleaved_dropout_recompute",
                 interleaved + dropout + ["--set", "parallel.recompute=true"], ((1, 2, 1),),
                 "dropout")]
    refs = {}
    with tempfile.TemporaryDirectory() as tmp:
        tokens = os.path.join(tmp, "tokens.u16")
        with open(tokens, "wb") as fh:
            fh.write(array.array("H", list(data[:200000])).tobytes())
        failures += tied_copies(mtnlgd, job, tokens, tmp)
        for name, extra, layouts, ref_of in variants:
            ref_loss, ref_w, ref_mb = refs.get(ref_of, (None, None, None))
            for tp, pp, dp in layouts:
                export = os.path.join(tmp, f"{name}-{tp}-{pp}-{dp}.safetensors")
                if name in ("plain", "interleaved") and (tp, pp, dp) in ((2, 1, 1), (1, 4, 1),
                                                                         (2, 2, 2)):
                    # a directory: each stage's writer writes its stage's files
                    export = os.path.join(tmp, f"{name}-{tp}-{pp}-{dp}") + "/"
                losses, moments_mb = run(mtnlgd, job, tokens, export, tp, pp, dp, extra)
                w = st_load(export)
                if (tp, pp, dp) == (1, 1, 1):
                    ref_loss, ref_w, ref_mb = losses, w, moments_mb
                    refs[name] = (losses, w, moments_mb)
                    continue
                if name in ("plain", "interleaved") and pp > 1 and (tp, dp) in ((1, 1), (2, 2)):
                    # started sends only change when a stage waits: the same
                    # run with every send and receive blocking is identical
                    export_b = export.rstrip("/") + "-blocking" + ("/" if export[-1] == "/" else "")
                    losses_b, _ = run(mtnlgd, job, tokens, export_b, tp, pp, dp,
                                      extra + ["--set", "parallel.overlap_p2p=false"])
                    w_b = st_load(export_b)
                    ok = losses_b == losses and all(w_b[k] == w[k] for k in w)
                    print(f"{'ok' if ok else 'FAIL'} test_tp{tp}_pp{pp}_dp{dp}_overlapped_p2p_"
                          f"matches_blocking_bit_for_bit{'' if name == 'plain' else '_' + name}: "
                          f"losses {losses[-1]} vs {losses_b[-1]}")
                    failures += not ok
                worst = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_loss))
                num = sum((x - y) ** 2 for k in w for x, y in zip(w[k], ref_w[k]))
                den = sum(y ** 2 for k in ref_w for y in ref_w[k])
                wrel = math.sqrt(num / den)
                ok = len(losses) == 10 and worst < 1e-5 and wrel < 1e-4 and set(w) == set(ref_w)
                print(f"{'ok' if ok else 'FAIL'} test_tp{tp}_pp{pp}_dp{dp}_matches_single_device_"
                      f"{name}: "
                      f"worst step loss {worst:.2e}, weights {wrel:.2e}")
                failures += not ok
                if name == "sequence_parallel" and tp > 1:
                    # the stream really is split: fewer activations than the
                    # plain run of this layout laid out
                    with_sp, without = run.acts[(tp, pp, dp, " ".join(sp))], run.acts[(tp, pp, dp, "")]
                    ok_sp = with_sp is not None and without is not None and with_sp < without
                    print(f"{'ok' if ok_sp else 'FAIL'} test_tp{tp}_pp{pp}_dp{dp}_sequence_parallel_"
                          f"lays_out_fewer_activations: {with_sp} bytes vs {without}")
                    failures += not ok_sp
                if pp == 1 and tp == 1:  # the whole model: its moments are 1/dp of (1,1,1)'s
                    # (the flat buffer is padded to dp equal slices of 16-float blocks)
                    ok_mem = moments_mb is not None and abs(moments_mb * dp - ref_mb) <= 128 * dp
                    print(f"{'ok' if ok_mem else 'FAIL'} test_zero1_moments_are_1/{dp}_{name}: "
                          f"{moments_mb} bytes vs {ref_mb} bytes at dp 1")
                    failures += not ok_mem
                    plan = json.loads(subprocess.run(
                        [mtnlgctl, "plan", job, "-o", "json", "--devices", str(dp),
                         "--set", "model.n_layer=4", "--set", "parallel.micro_batch=2",
                         "--set", "train.global_batch=8", "--set", f"parallel.dp_min={dp}",
                         "--set", f"data.path={tokens}"],
                        capture_output=True, text=True, check=True).stdout)
                    planned = plan["memory"]["stages"][0]["optimizer_bytes"]
                    ok_plan = abs(planned - moments_mb) <= 128 * dp
                    print(f"{'ok' if ok_plan else 'FAIL'} test_zero1_plan_agrees_with_allocation_"
                          f"dp{dp}_{name}: plan {planned} bytes, allocated {moments_mb}")
                    failures += not ok_plan
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
