"""checkpoint.load: a job started from another job's native checkpoint
(Megatron's --load with --finetune, --no-load-optim by default).

usage: test_finetune.py MTNLGD MTNLGCTL

Job A (a tiny byte-level model, tp 2 x pp 2, bf16) trains 6 steps and
checkpoints at 3 and 6. Jobs B, with checkpoint.load naming A's job
directory, start from it:
- test_load_is_export_and_init_from_bit_for_bit: under tp 1, tp 2 x pp 2
  and pp 2 x dp 2, B trains 6 steps from step 1, each loss the loss the
  export-then-model.init_from route gives, bit for bit (the independent
  reference: A's weights through a safetensors file), and not the loss
  of B's own initialisation; it says what it loaded;
- test_load_optimizer_against_torch_adamw: B's first update, read from
  B's step 1 checkpoint, is torch.optim.AdamW's from A's weights (A
  resharded to tp 1 by `mtnlgctl ckpt reshard`) with A's moments and
  Adam's count (load_optimizer true) or with zero moments and count
  (false), the gradient taken from the false run's first moment, each
  within 1e-5; at dp 2 the same with dp 2's own gradient (its reduction
  sums in another order, and OpenBLAS's threads, as many as the process
  is given, in another again: against dp 1's gradient the update moved
  up to 7e-6 where no OMP_NUM_THREADS was set);
- test_restart_resumes_from_its_own_checkpoint: B stopped after step 3
  (train.exit_interval) and started again resumes from its own step 3,
  saying checkpoint.load is ignored, and steps 4..6 are the
  uninterrupted run's bit for bit;
- test_refusals: another model (n_layer 2), a flipped byte in a shard, a
  truncated shard of the newest checkpoint (not passed over for the
  older one), a path with no checkpoint and model.init_from together with
  checkpoint.load are refused, naming the field, the file or the key;
- test_source_is_never_written: A's directory is the same, file for file
  and byte for byte (and mtime), after every run above.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
from local_cluster import check, license_tokens, output_losses as losses  # noqa: E402

BETA1, BETA2, EPS, LR = 0.9, 0.95, 1e-8, 3e-3


def write_job(path, tokens, ckpt, name, tp=1, pp=1, dp=1, steps=6, interval=3, load=None,
              load_optimizer=None, init_from=None, n_layer=4, exit_interval=None, wd=None):
    job = {"name": name, "model": {"preset": "tiny", "n_layer": n_layer},
           "parallel": {"tp": tp, "pp": pp, "dp_min": dp, "dp_max": dp, "micro_batch": 2},
           "train": {"global_batch": 4, "steps": steps, "seed": 5, "precision": "bf16",
                     "lr": {"schedule": "constant", "peak": LR},
                     "adam": {"beta1": BETA1, "beta2": BETA2, "eps": EPS}},
           "checkpoint": {"dir": ckpt, "interval": interval},
           "data": {"path": tokens}}
    if not ckpt:
        job["checkpoint"] = {}
    if load is not None:
        job["checkpoint"]["load"] = load
    if load_optimizer is not None:
        job["checkpoint"]["load_optimizer"] = load_optimizer
    if init_from:
        job["model"]["init_from"] = init_from
    if exit_interval:
        job["train"]["exit_interval"] = exit_interval
    if wd is not None:
        job["train"]["weight_decay"] = wd
    with open(path, "w") as f:
        json.dump(job, f)
    return path


def run(cmd):
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300)


def shard_arrays(path, names=("master", "adam_m", "adam_v")):
    """The arrays of a shard file (proto/ckpt-v1.md), as float32 tensors."""
    import torch
    blob = open(path, "rb").read()
    n = int.from_bytes(blob[24:32], "little")
    flat = torch.frombuffer(bytearray(blob[64:]), dtype=torch.float32)
    return {a: flat[i * n:(i + 1) * n].clone() for i, a in enumerate(names)}


def manifest(step_dir):
    with open(os.path.join(step_dir, "manifest.json")) as f:
        return json.load(f)


def snapshot(root):
    """path -> (size, mtime, sha256) of every file under root."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            st = os.stat(p)
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns,
                                             hashlib.sha256(open(p, "rb").read()).hexdigest())
    return out


def adamw_reference(p0, g, m0, v0, t0):
    """torch.optim.AdamW's first update from (m0, v0, Adam's count t0)."""
    import torch
    p = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([p], lr=LR, betas=(BETA1, BETA2), eps=EPS, weight_decay=0.0)
    if t0:
        opt.state[p] = {"step": torch.tensor(float(t0)), "exp_avg": m0.clone(),
                        "exp_avg_sq": v0.clone()}
    p.grad = g.clone()
    opt.step()
    st = opt.state[p]
    return p.detach(), st["exp_avg"], st["exp_avg_sq"]


def close(a, b, rtol, atol):
    import torch
    err = (a.double() - b.double()).abs() - rtol * b.double().abs()
    return bool((err <= atol).all()), float((a.double() - b.double()).abs().max())


def main():
    mtnlgd, ctl = sys.argv[1], sys.argv[2]
    tmp = tempfile.mkdtemp(prefix="mtnlg-finetune-")
    failures = 0
    try:
        tokens = license_tokens(os.path.join(tmp, "tokens.u16"))
        ck = os.path.join(tmp, "ck")
        a_job = write_job(os.path.join(tmp, "a.json"), tokens, ck, "A", tp=2, pp=2)
        r = run([mtnlgd, "--standalone", a_job, "--log-format", "json"])
        if r.returncode:
            return check("job_A_trains", False, r.stdout[-2000:])
        a_dir = os.path.join(ck, "A")
        before = snapshot(a_dir)

        # (a) checkpoint.load against export + model.init_from, three layouts
        export = os.path.join(tmp, "a6.safetensors")
        e = run([ctl, "ckpt", "export", a_dir, export])
        if e.returncode:
            return check("export_of_A", False, e.stdout[-2000:])
        ok, detail, ref_losses = e.returncode == 0, "", None
        for tp, pp, dp in ((1, 1, 1), (2, 2, 1), (1, 2, 2)):
            tag = f"tp{tp}pp{pp}dp{dp}"
            lj = write_job(os.path.join(tmp, f"load-{tag}.json"), tokens, ck, f"B-{tag}", tp, pp,
                           dp, interval=2, load=a_dir)
            ij = write_job(os.path.join(tmp, f"init-{tag}.json"), tokens, None, f"I-{tag}", tp, pp,
                           dp, interval=0, init_from=export)
            fj = write_job(os.path.join(tmp, f"fresh-{tag}.json"), tokens, None, f"F-{tag}", tp,
                           pp, dp, interval=0)
            rl = run([mtnlgd, "--standalone", lj, "--log-format", "json"])
            ri = run([mtnlgd, "--standalone", ij, "--log-format", "json"])
            rf = run([mtnlgd, "--standalone", fj, "--log-format", "json"])
            ll, li, lf = losses(rl.stdout), losses(ri.stdout), losses(rf.stdout)
            said = "checkpoint.load: starting from %s" % os.path.join(a_dir, "step_00000006")
            good = rl.returncode == 0 and ri.returncode == 0 and rf.returncode == 0 and \
                [s for s, _ in ll] == [1, 2, 3, 4, 5, 6] and ll == li and \
                lf and lf[0][1] != ll[0][1] and said in rl.stdout and \
                "Adam's moments at zero" in rl.stdout
            if not good:
                ok = False
                detail += f"{tag}: load {ll} init_from {li} fresh {lf[:1]} " \
                          f"{rl.stdout[-800:] if rl.returncode or said not in rl.stdout else ''}; "
            if tag == "tp1pp1dp1":
                ref_losses = ll
        failures += check("test_load_is_export_and_init_from_bit_for_bit", ok, detail)

        # (b) load_optimizer against torch.optim.AdamW from A's moments
        re_dir = os.path.join(tmp, "re", "A")
        rr = run([ctl, "ckpt", "reshard", a_dir, re_dir, "--tp", "1", "--pp", "1"])
        runs, detail = {}, ""
        for opt, dp in ((True, 1), (False, 1), (True, 2), (False, 2)):
            tag = f"opt{int(opt)}dp{dp}"
            j = write_job(os.path.join(tmp, f"{tag}.json"), tokens, ck, f"O-{tag}", dp=dp,
                          steps=2, interval=1, load=a_dir, load_optimizer=opt, wd=0.0)
            r = run([mtnlgd, "--standalone", j, "--log-format", "json"])
            runs[tag] = r
            if r.returncode:
                detail += f"{tag}: {r.stdout[-800:]}; "
        ok = rr.returncode == 0 and not detail
        if not ok:
            detail += f"reshard: {rr.stdout[-400:]}"
        if ok:
            src = shard_arrays(os.path.join(re_dir, "step_00000006", "shard_tp00_pp000.bin"))
            adam_t = manifest(os.path.join(a_dir, "step_00000006"))["extra"]["adam_t"]
            step1 = {t: os.path.join(ck, f"O-{t}", "step_00000001") for t in runs}
            got = {t: shard_arrays(os.path.join(d, "shard_tp00_pp000.bin"))
                   for t, d in step1.items()}
            counts = {t: manifest(d)["extra"]["adam_t"] for t, d in step1.items()}
            # the runs of a layout took the same gradient (same weights, same
            # batch), which its fresh-moments run's first moment gives; dp 2
            # sums it in another order (and OpenBLAS's threads, as many as
            # the process is given, in another again), so each layout's own
            grad = {dp: (got[f"opt0dp{dp}"]["adam_m"].double() / (1.0 - BETA1)).float()
                    for dp in (1, 2)}
            zero = 0 * src["adam_m"]
            for tag, (m0, v0, t0) in (("opt1dp1", (src["adam_m"], src["adam_v"], adam_t)),
                                      ("opt0dp1", (zero, zero, 0)),
                                      ("opt1dp2", (src["adam_m"], src["adam_v"], adam_t)),
                                      ("opt0dp2", (zero, zero, 0))):
                p, m, v = adamw_reference(src["master"], grad[int(tag[-1])], m0, v0, t0)
                rtol = 1e-5
                for name, want, have in (("master", p, got[tag]["master"]),
                                         ("adam_m", m, got[tag]["adam_m"]),
                                         ("adam_v", v, got[tag]["adam_v"])):
                    good, worst = close(have, want, rtol, 1e-7 if name == "master" else 1e-9)
                    if not good:
                        ok = False
                        detail += f"{tag} {name}: max |diff| {worst:.3g} from torch's AdamW; "
                if counts[tag] != t0 + 1:
                    ok = False
                    detail += f"{tag}: Adam's count {counts[tag]} at step 1, want {t0 + 1}; "
            l1, l0 = losses(runs["opt1dp1"].stdout), losses(runs["opt0dp1"].stdout)
            moved = float((got["opt1dp1"]["adam_m"] - got["opt0dp1"]["adam_m"]).abs().max())
            if not (l1[0] == l0[0] and l1[1] != l0[1] and moved > 1e-6):
                ok = False
                detail += f"losses with moments {l1}, without {l0}, moments differ by {moved}; "
            detail += f"Adam's count in A: {adam_t}"
        failures += check("test_load_optimizer_against_torch_adamw", ok, detail)

        # (c) a restarted fine-tuning job resumes from its own checkpoint
        rj = write_job(os.path.join(tmp, "restart.json"), tokens, ck, "R", interval=2, load=a_dir,
                       exit_interval=3)
        r1 = run([mtnlgd, "--standalone", rj, "--log-format", "json"])
        r2 = run([mtnlgd, "--standalone", rj, "--log-format", "json"])
        l1, l2 = losses(r1.stdout), losses(r2.stdout)
        said = "checkpoint.load %s ignored: the job resumed from its own checkpoint of step 3" % a_dir
        failures += check("test_restart_resumes_from_its_own_checkpoint",
                          r1.returncode == 0 and r2.returncode == 0 and said in r2.stdout and
                          "checkpoint.load: starting from" not in r2.stdout and
                          l1 == ref_losses[:3] and l2 == ref_losses[3:],
                          f"first {l1}, restarted {l2}, uninterrupted {ref_losses}: "
                          f"{r2.stdout[-1200:]}")

        # (d) refusals
        detail, ok = "", True

        def refused(name, job, *want):
            nonlocal ok, detail
            r = run([mtnlgd, "--standalone", job, "--log-format", "json"])
            # (and no "falling back" to an older checkpoint told before the refusal)
            if r.returncode == 0 or losses(r.stdout) or not all(w in r.stdout for w in want) \
                    or "falling back" in r.stdout or "instead of a newer" in r.stdout:
                ok = False
                detail += f"{name}: exit {r.returncode}, want {want}: {r.stdout[-1000:]}; "

        refused("another model", write_job(os.path.join(tmp, "arch.json"), tokens, ck, "X1",
                                           n_layer=2, load=a_dir),
                "model.n_layer: the checkpoint's model has 4, the job's 2")
        flipped = os.path.join(tmp, "flipped", "A")
        shutil.copytree(a_dir, flipped)
        shard = os.path.join(flipped, "step_00000006", "shard_tp01_pp001.bin")
        with open(shard, "r+b") as f:
            f.seek(64 + 1000)
            b = f.read(1)
            f.seek(64 + 1000)
            f.write(bytes([b[0] ^ 0x40]))
        flipped_before = snapshot(flipped)
        refused("flipped byte", write_job(os.path.join(tmp, "flip.json"), tokens, ck, "X2",
                                          load=flipped),
                "step_00000006/shard_tp01_pp001.bin", "checksum")
        if snapshot(flipped) != flipped_before:
            ok = False
            detail += "the damaged source was changed (set aside?); "
        cut = os.path.join(tmp, "cut", "A")
        shutil.copytree(a_dir, cut)
        os.truncate(os.path.join(cut, "step_00000006", "shard_tp00_pp001.bin"), 1000)
        refused("truncated shard", write_job(os.path.join(tmp, "cut.json"), tokens, ck, "X3",
                                             load=cut),
                "shard_tp00_pp001.bin", "step_00000006")
        refused("no checkpoint", write_job(os.path.join(tmp, "none.json"), tokens, ck, "X4",
                                           load=os.path.join(tmp, "nothing")),
                "checkpoint.load", os.path.join(tmp, "nothing"))
        refused("init_from and load", write_job(os.path.join(tmp, "both.json"), tokens, ck, "X5",
                                                load=a_dir, init_from=export),
                "checkpoint.load:", "model.init_from")
        failures += check("test_refusals", ok, detail)

        after = snapshot(a_dir)
        failures += check("test_source_is_never_written", after == before,
                          "" if after == before else
                          f"A's directory changed: {sorted(set(before.items()) ^ set(after.items()))}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
