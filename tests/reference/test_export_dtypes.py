#!/usr/bin/python3
"""Exports in bf16 and fp16, and the config.json beside them, read by PyTorch.

usage: test_export_dtypes.py MTNLGD MTNLGCTL

A tiny byte-level model (4 layers, dropouts 0.1 and 0.05, epsilon 1e-6,
init std 0.03) trains 3 steps as tp 2 x pp 2 in bf16 with a checkpoint, its
job saying checkpoint.export_dtype bf16 and --export DIR/ (each stage's
writer writing its files).
- test_runs_bf16_export_is_ckpt_exports: `mtnlgctl ckpt export --dtype
  bf16` of the last checkpoint to a directory writes the run's files byte for
  byte, config.json included;
- test_bf16_and_fp16_are_the_fp32_export_rounded: every tensor of the bf16
  export (its files found through the index) and of an fp16 single file is
  the fp32 export's tensor converted by torch (.to(torch.bfloat16),
  .to(torch.float16): round to nearest even) bit for bit, dtypes BF16 and
  F16, in half the bytes;
- test_config_json_is_the_jobs_model: config.json's GPT2Config fields are
  the model the checkpoint's manifest records (sizes, epsilon, init std,
  dropouts), model_type gpt2, GPT2LMHeadModel, gelu_new (our GeLU is the
  tanh one: torch's gelu(approximate="tanh") of a few values is checked
  against the same formula), tied embeddings, torch_dtype bfloat16;
- test_bf16_export_round_trips_through_init_from: a tp 1 job initialised
  from the bf16 directory (model.init_from) trains one step at lr 0 (a
  warmup's first) and --export's fp32 weights that are the bf16
  ones exactly.
Safetensors files are read here with json and torch.frombuffer, not the
safetensors package. Exit 77 (skip) without torch.
"""
import json
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
try:
    import torch
except ImportError as e:
    print(f"SKIP: PyTorch not importable ({e})")
    sys.exit(77)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools"))
from local_cluster import license_tokens  # noqa: E402

failures = 0
DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def check(cond, what, detail=""):
    global failures
    print(("ok   " if cond else "FAIL ") + what + ("" if cond or not detail else f": {detail}"))
    failures += not cond


def run(cmd):
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300)


def st_load(path):
    """name -> (dtype string, tensor) of one safetensors file, or of a
    directory's files through model.safetensors.index.json."""
    if os.path.isdir(path):
        with open(os.path.join(path, "model.safetensors.index.json")) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        out = {}
        for name in files:
            out.update(st_load(os.path.join(path, name)))
        return out
    with open(path, "rb") as f:
        blob = f.read()
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    header.pop("__metadata__", None)
    data = bytearray(blob[8 + n:])
    out = {}
    for k, v in header.items():
        a, b = v["data_offsets"]
        t = torch.frombuffer(data[a:b], dtype=DTYPES[v["dtype"]]) if b > a else \
            torch.empty(0, dtype=DTYPES[v["dtype"]])
        out[k] = (v["dtype"], t.reshape(v["shape"]).clone())
    return out


def bits(t):
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def files_of(d):
    return {n: open(os.path.join(d, n), "rb").read() for n in sorted(os.listdir(d))}


def write_job(path, tokens, ckpt, tp, pp, steps, **extra):
    job = {"name": "dtype-test",
           "model": {"preset": "tiny", "n_layer": 4, "ln_eps": 1e-6, "init_std": 0.03,
                     "hidden_dropout": 0.1, "attention_dropout": 0.05},
           "parallel": {"tp": tp, "pp": pp, "micro_batch": 2},
           "train": {"global_batch": 4, "steps": steps, "seed": 7, "precision": "bf16",
                     "lr": {"schedule": "constant", "peak": 3e-3}},
           "data": {"path": tokens}}
    if ckpt:
        job["checkpoint"] = {"dir": ckpt, "interval": 3, "export_dtype": "bf16"}
    for k, v in extra.items():
        job["model" if k == "init_from" else "train"][k] = v
    with open(path, "w") as f:
        json.dump(job, f)
    return path


def main():
    mtnlgd, ctl = sys.argv[1], sys.argv[2]
    with tempfile.TemporaryDirectory() as tmp:
        tokens = license_tokens(os.path.join(tmp, "tokens.u16"), 40000)
        ckpt = os.path.join(tmp, "ck")
        run_dir = os.path.join(tmp, "run-bf16") + "/"
        r = run([mtnlgd, "--standalone",
                 write_job(os.path.join(tmp, "job.json"), tokens, ckpt, 2, 2, 3),
                 "--log-format", "json", "--export", run_dir])
        if r.returncode:
            check(False, "the tp 2 x pp 2 run", r.stdout[-2000:])
            return 1
        job_dir = os.path.join(ckpt, "dtype-test")
        f32 = os.path.join(tmp, "f32.safetensors")
        f16 = os.path.join(tmp, "f16.safetensors")
        bf16_dir = os.path.join(tmp, "bf16-offline") + "/"
        for out, extra in ((f32, []), (f16, ["--dtype", "fp16"]), (bf16_dir, ["--dtype", "bf16"])):
            r = run([ctl, "ckpt", "export", job_dir, out, *extra])
            name = os.path.basename(out.rstrip("/"))
            check(r.returncode == 0, f"ckpt export {' '.join(extra)} to {name}", r.stdout)
            if r.returncode:
                return 1

        # the run's bf16 export is ckpt export's
        ran, off = files_of(run_dir), files_of(bf16_dir)
        check(ran == off and "config.json" in off and len(off) >= 4,
              "test_runs_bf16_export_is_ckpt_exports",
              f"{sorted(ran)} vs {sorted(off)}, differing: "
              f"{[n for n in off if ran.get(n) != off[n]]}")

        # bf16 and fp16: the fp32 export rounded by torch, bit for bit
        w32, wbf, w16 = st_load(f32), st_load(bf16_dir), st_load(f16)
        bad = []
        for name, (dt, t) in w32.items():
            for got, want_dt, torch_dt in ((wbf, "BF16", torch.bfloat16),
                                           (w16, "F16", torch.float16)):
                g = got.get(name)
                if dt != "F32" or not g or g[0] != want_dt or \
                        not torch.equal(bits(g[1]), bits(t.to(torch_dt))):
                    bad.append(f"{name} ({want_dt})")
        check(set(w32) == set(wbf) == set(w16) and not bad and len(w32) > 10,
              "test_bf16_and_fp16_are_the_fp32_export_rounded", f"differ: {bad[:6]}")
        size32 = os.path.getsize(f32)
        size16 = os.path.getsize(f16)
        check(size16 < size32 * 0.52, "the fp16 file is half the fp32 one",
              f"{size16} vs {size32}")

        # config.json: the model the checkpoint recorded
        steps = sorted(d for d in os.listdir(job_dir) if d.startswith("step_"))
        with open(os.path.join(job_dir, steps[-1], "manifest.json")) as f:
            model = json.load(f)["extra"]["job"]["model"]
        with open(os.path.join(bf16_dir, "config.json")) as f:
            cfg = json.load(f)
        want = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                "vocab_size": model["vocab_size"], "n_positions": model["seq_len"],
                "n_ctx": model["seq_len"], "n_embd": model["n_embd"],
                "n_layer": model["n_layer"], "n_head": model["n_head"], "n_inner": None,
                "activation_function": "gelu_new", "layer_norm_epsilon": 1e-6,
                "initializer_range": 0.03, "resid_pdrop": 0.1, "embd_pdrop": 0.1,
                "attn_pdrop": 0.05, "tie_word_embeddings": True, "torch_dtype": "bfloat16"}
        wrong = {k: (cfg.get(k), v) for k, v in want.items() if cfg.get(k) != v}
        check(not wrong and wbf["wte.weight"][1].shape[0] == cfg["vocab_size"] and
              abs(model["ln_eps"] - cfg["layer_norm_epsilon"]) < 1e-12,
              "test_config_json_is_the_jobs_model", f"(got, want): {wrong}")
        # gelu_new is GeLU's tanh form, the one kernels/common/mtmath.h computes
        x = torch.linspace(-4, 4, 17, dtype=torch.float64)
        tanh_form = 0.5 * x * (1 + torch.tanh(0.7978845608028654 * (x + 0.044715 * x ** 3)))
        check(torch.allclose(torch.nn.functional.gelu(x, approximate="tanh"), tanh_form),
              "gelu_new (torch's tanh GeLU) is mt_gelu's formula")

        # init_from of the bf16 directory: the same weights come back out
        back = os.path.join(tmp, "back.safetensors")
        r = run([mtnlgd, "--standalone",
                 write_job(os.path.join(tmp, "job2.json"), tokens, None, 1, 1, 1,
                           init_from=bf16_dir,
                           lr={"schedule": "constant", "peak": 3e-3, "warmup_steps": 1}),
                 "--log-format", "json", "--export", back])
        lr0 = [json.loads(l).get("lr") for l in r.stdout.splitlines() if l.startswith('{"step"')]
        if r.returncode or lr0 != [0]:
            check(False, "test_bf16_export_round_trips_through_init_from",
                  f"exit {r.returncode}, lr {lr0}: {r.stdout[-2000:]}")
        else:
            wb = st_load(back)
            bad = [n for n, (dt, t) in wbf.items()
                   if n not in wb or wb[n][0] != "F32" or not torch.equal(wb[n][1], t.float())]
            check(set(wb) == set(wbf) and not bad,
                  "test_bf16_export_round_trips_through_init_from", f"differ: {bad[:6]}")
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
