"""mtnlgctl ckpt export: a checkpoint's weights as GPT-2 safetensors, offline.

usage: test_ckpt_export.py MTNLGD MTNLGCTL

A tiny byte-level model as tp 2 x pp 2 device threads (bf16, so the master
weights are not what the forward pass reads) trains 6 steps, checkpointing
at steps 3 and 6, and --export's its weights at the end.
- test_export_of_the_last_checkpoint_is_the_runs_export: `ckpt export` of
  the job directory writes the run's own --export byte for byte, and says
  which step it took (-o json);
- test_export_of_a_named_step: `ckpt export` of step_00000003 writes a
  file that differs from the end's, and loads as model.init_from of a
  tp 1 job and of a tp 2 x pp 2 job to the same first loss (bf16, 1e-3);
- test_damaged_checkpoint_is_refused_and_nothing_written: a flipped byte
  in a shard is named (file and chunk) and no output file appears;
- test_output_in_a_missing_directory_is_named: the path is in the error.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
from local_cluster import check, license_tokens  # noqa: E402


def write_job(path, tokens, ckpt, tp=2, pp=2, steps=6, init_from=None):
    job = {"name": "export-test", "model": {"preset": "tiny", "n_layer": 4},
           "parallel": {"tp": tp, "pp": pp, "micro_batch": 2},
           "train": {"global_batch": 4, "steps": steps, "seed": 5, "precision": "bf16",
                     "lr": {"schedule": "constant", "peak": 3e-3}},
           "checkpoint": {"dir": ckpt, "interval": 3},
           "data": {"path": tokens}}
    if init_from:
        job["model"]["init_from"] = init_from
        del job["checkpoint"]
    with open(path, "w") as f:
        json.dump(job, f)
    return path


def losses(out):
    got = []
    for line in out.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "loss" in rec and "step" in rec:
            got.append((rec["step"], rec["loss"]))
    return got


def run(cmd, **kw):
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300, **kw)


def main():
    mtnlgd, ctl = sys.argv[1], sys.argv[2]
    failures = 0
    tmp = tempfile.mkdtemp(prefix="mtnlg-ckpt-export-")
    try:
        tokens = license_tokens(os.path.join(tmp, "tokens.u16"))
        ckpt = os.path.join(tmp, "ckpt")
        job = write_job(os.path.join(tmp, "job.json"), tokens, ckpt)
        final = os.path.join(tmp, "final.safetensors")
        r = run([mtnlgd, "--standalone", job, "--log-format", "json", "--export", final])
        if r.returncode:
            print(r.stdout[-3000:])
            return check("training run", False, f"mtnlgd exited {r.returncode}")
        job_dir = os.path.join(ckpt, "export-test")

        out = os.path.join(tmp, "from-ckpt.safetensors")
        r = run([ctl, "-o", "json", "ckpt", "export", job_dir, out])
        info = json.loads(r.stdout) if r.returncode == 0 else {}
        same = r.returncode == 0 and open(out, "rb").read() == open(final, "rb").read()
        failures += check("test_export_of_the_last_checkpoint_is_the_runs_export",
                          same and info.get("step") == 6 and
                          info.get("bytes") == os.path.getsize(final),
                          f"exit {r.returncode}, {r.stdout.strip()[-500:]}")

        step3 = os.path.join(tmp, "step3.safetensors")
        r = run([ctl, "ckpt", "export", os.path.join(job_dir, "step_00000003"), step3])
        ok = r.returncode == 0 and "exported step 3" in r.stdout
        detail = r.stdout.strip()[-500:]
        if ok:
            differs = open(step3, "rb").read() != open(final, "rb").read()
            one = write_job(os.path.join(tmp, "one.json"), tokens, None, tp=1, pp=1, steps=1,
                            init_from=step3)
            a = run([mtnlgd, "--standalone", one, "--log-format", "json"])
            two = write_job(os.path.join(tmp, "two.json"), tokens, None, tp=2, pp=2, steps=1,
                            init_from=step3)
            b = run([mtnlgd, "--standalone", two, "--log-format", "json"])
            la, lb = losses(a.stdout), losses(b.stdout)
            ok = differs and a.returncode == 0 and b.returncode == 0 and la and lb and \
                abs(la[0][1] - lb[0][1]) < 1e-3 * abs(la[0][1])
            detail = f"differs from the end's {differs}, tp 1 loss {la[:1]}, tp 2 x pp 2 {lb[:1]}"
        failures += check("test_export_of_a_named_step", ok, detail)

        bad = os.path.join(tmp, "bad")
        shutil.copytree(job_dir, bad)
        shard = os.path.join(bad, "step_00000006", "shard_tp01_pp001.bin")
        with open(shard, "r+b") as f:
            f.seek(200)
            byte = f.read(1)
            f.seek(200)
            f.write(bytes([byte[0] ^ 0x40]))
        out_bad = os.path.join(tmp, "bad.safetensors")
        r = run([ctl, "ckpt", "export", os.path.join(bad, "step_00000006"), out_bad])
        leftovers = [n for n in os.listdir(tmp) if n.startswith("bad.safetensors")]
        failures += check("test_damaged_checkpoint_is_refused_and_nothing_written",
                          r.returncode == 1 and "shard_tp01_pp001.bin chunk" in r.stdout and
                          not leftovers, f"exit {r.returncode}: {r.stdout.strip()[-500:]}")

        missing = os.path.join(tmp, "no-such-dir", "x.safetensors")
        r = run([ctl, "ckpt", "export", job_dir, missing])
        failures += check("test_output_in_a_missing_directory_is_named",
                          r.returncode == 1 and missing in r.stdout,
                          f"exit {r.returncode}: {r.stdout.strip()[-500:]}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
