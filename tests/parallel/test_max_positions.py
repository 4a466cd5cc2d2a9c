"""model.max_positions (Megatron's --max-position-embeddings): more learned
positions than a sample's tokens, so a model trained at one context length
can be fine-tuned at a shorter one (GPT-2's 1024 positions at 512 tokens).

usage: test_max_positions.py MTNLGD JOB.json
The tiny model (seq_len 64) trains 3 steps as A and is exported (wpe: 64
rows) with its checkpoint. Then, at seq_len 32:
  - B: model.max_positions 64, model.init_from A's export;
  - C: max_positions left at seq_len, init_from A's export with wpe cut to
    its first 32 rows (written here);
  - D: max_positions 64, checkpoint.load A's checkpoint.
Checked: B, C and D train the same losses bit for bit (positions past the
sample's tokens are never read, so they change nothing), B's export keeps 64
positions (config.json's n_positions 64) whose first 32 rows are C's bit for
bit; max_positions below seq_len is refused naming the key, and C's job
given A's 64-row export is refused naming wpe.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "reference"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
import torch_gpt  # noqa: E402
from local_cluster import check, license_tokens, output_losses  # noqa: E402
from test_layouts import st_load  # noqa: E402


def run(mtnlgd, job, tokens, steps, *sets):
    cmd = [mtnlgd, "--standalone", job, "--log-format", "json",
           "--set", f"data.path={tokens}", "--set", f"train.steps={steps}",
           "--set", "train.lr.warmup_steps=1", "--set", "parallel.micro_batch=2",
           "--set", "train.global_batch=4"]
    for s in sets:
        cmd += ["--set", s]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def cut_wpe(src, dst, rows):
    """src's safetensors with wpe.weight cut to its first `rows` rows."""
    tensors, meta = torch_gpt.st_load(src)
    tensors["wpe.weight"] = tensors["wpe.weight"][:rows]
    torch_gpt.st_save(dst, tensors, meta)


def main():
    mtnlgd, job = sys.argv[1], sys.argv[2]
    failures = 0
    tmp = tempfile.mkdtemp(prefix="mtnlg-maxpos-")
    try:
        tokens = license_tokens(os.path.join(tmp, "tokens.u16"))
        a_dir, c_dir, ck = (os.path.join(tmp, d) for d in ("a", "c", "ck"))
        os.makedirs(a_dir)
        os.makedirs(c_dir)
        a_export = os.path.join(a_dir, "a.safetensors")
        a = run(mtnlgd, job, tokens, 3, "checkpoint.export=" + a_export, "checkpoint.dir=" + ck)
        if a.returncode != 0:
            print(a.stderr[-2000:])
            raise SystemExit("A did not train")
        c_init = os.path.join(c_dir, "a32.safetensors")
        cut_wpe(a_export, c_init, 32)
        short = ["model.seq_len=32", "train.lr.decay_steps=4"]
        b_export, c_export = (os.path.join(tmp, x + ".safetensors") for x in "bc")
        b = run(mtnlgd, job, tokens, 4, *short, "model.max_positions=64",
                "model.init_from=" + a_export, "checkpoint.export=" + b_export)
        c = run(mtnlgd, job, tokens, 4, *short, "model.init_from=" + c_init,
                "checkpoint.export=" + c_export)
        d = run(mtnlgd, job, tokens, 4, *short, "model.max_positions=64",
                "checkpoint.load=" + os.path.join(ck, json.load(open(job))["name"]))
        lb, lc, ld = (output_losses(r.stdout) for r in (b, c, d))
        failures += check("test_positions_past_the_samples_tokens_change_no_loss",
                          all(r.returncode == 0 for r in (b, c, d)) and len(lb) == 4
                          and lb == lc == ld,
                          "exit %s; B %s, C %s, D %s%s" % (
                              [r.returncode for r in (b, c, d)], lb, lc, ld,
                              "".join("\n" + r.stderr[-600:] for r in (b, c, d) if r.returncode)))
        wb, wc = (st_load(p) if os.path.exists(p) else {} for p in (b_export, c_export))
        cfg_path = os.path.join(tmp, "config.json")
        cfg = json.load(open(cfg_path)) if os.path.exists(cfg_path) else {}
        rows_b = len(wb.get("wpe.weight", [])) // 64
        first = wb.get("wpe.weight", [])[:32 * 64]
        failures += check("test_the_export_keeps_every_position",
                          rows_b == 64 and first == wc.get("wpe.weight")
                          and cfg.get("n_positions") == 64
                          and all(wb[k] == wc[k] for k in wc if k != "wpe.weight"),
                          "B's wpe %d rows, its first 32 C's: %s; config.json n_positions %s" % (
                              rows_b, first == wc.get("wpe.weight"), cfg.get("n_positions")))
        low = run(mtnlgd, job, tokens, 4, *short, "model.max_positions=16")
        mismatch = run(mtnlgd, job, tokens, 4, *short, "model.init_from=" + a_export)
        failures += check("test_refusals_name_the_key_and_the_tensor",
                          low.returncode == 2 and "model.max_positions: 16 is below model.seq_len "
                          "32" in low.stderr and mismatch.returncode != 0
                          and "wpe.weight" in mismatch.stderr,
                          "max_positions 16: exit %d %r; a 64-row wpe into 32 positions: exit %d %r"
                          % (low.returncode, low.stderr.strip()[-200:], mismatch.returncode,
                             mismatch.stderr.strip()[-300:]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("%d failure(s)" % failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
