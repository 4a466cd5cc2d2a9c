"""mtnlgctl ckpt export and reshard: checkpoints converted offline.

usage: test_ckpt_convert.py MTNLGD MTNLGCTL

A tiny byte-level model as tp 2 x pp 2 device threads (bf16, so the master
weights are not what the forward pass reads) trains 6 steps, checkpointing
at steps 3 and 6, and --export's its weights at the end.
- test_export_of_the_last_checkpoint_is_the_runs_export: `ckpt export` of
  the job directory writes the run's own --export byte for byte, and says
  which step it took (-o json);
- test_export_of_a_named_step: `ckpt export` of step_00000003/ writes a
  file that differs from the end's, and loads as model.init_from of a
  tp 1 job and of a tp 2 x pp 2 job to the same first loss (bf16, 1e-3);
- test_export_to_a_directory_is_hugging_face_sharded: `ckpt export` to
  DIR/ writes model-0000k-of-0000n.safetensors and
  model.safetensors.index.json, whose tensors (read here with a reader of
  this file's own) are the single file's bytes, and which loads as
  model.init_from to the single file's first loss;
- test_damaged_checkpoint_is_refused_and_nothing_written: a flipped byte
  in a shard is named (file and chunk) and no output file appears;
- test_output_in_a_missing_directory_is_named: the path is in the error;
- test_export_that_cannot_be_written_fails_every_rank_at_once: under a
  64 KB file-size limit the run's --export fails naming the file, with
  nothing under its name, and the other ranks (whose pieces world rank 0
  still takes) end with it rather than at their deadline;
- test_export_to_a_directory_is_written_by_every_stage: the resumed run
  below exports to DIR/, each stage's tp rank 0 writing its stage's
  files; they, config.json and the index are `ckpt export`'s of the same
  checkpoint to a directory, byte for byte, and no file holds two stages'
  tensors;
- test_stage_that_cannot_write_fails_the_export_without_an_index: with
  stage 1's file name taken by a directory, the run's export to DIR/
  fails naming stage 1 and the file, every rank ends with it rather than
  at its deadline, and the old index is gone, not left naming a mix;
- test_reshard_keeps_every_weight: `ckpt reshard` to tp 1 x pp 1, tp 4 x
  pp 1 (a vocabulary padded to 512 rows instead of 256) and tp 1 x pp 4;
  the export of each is the run's --export byte for byte;
- test_reshard_of_unaligned_tensors: hidden 40 (biases and LayerNorms of
  20, 40 and 60 floats, laid out 16-aligned with gaps), tp 2 to tp 1: the
  export is the run's byte for byte;
- test_reshard_and_back_is_the_same_files: tp 1 x pp 1 resharded back to
  tp 2 x pp 2 gives shard files identical to the originals, byte for byte
  (master weights and both Adam moments, padding rows included);
- test_resharded_checkpoint_resumes: a tp 1 job resumes from the tp 1
  checkpoint at step 6 and trains steps 7 and 8 to the losses the tp 2 x
  pp 2 job resumed from its own checkpoint reports (bf16, within 1e-3);
- the interleaved tests: a pp 2 job of 2 virtual stages (two one-layer
  chunks a stage) checkpoints; `ckpt export` of it is the run's --export
  byte for byte; it reshards to pp 1 and to plain 1F1B at pp 2
  (--virtual-stages 1) with the same weights; resumed interleaved and from
  that reshard, the next two steps agree within 1e-3 (bf16); the resumed
  run's export to DIR/ is `ckpt export`'s byte for byte, one file a chunk;
  and a plain 1F1B job is refused the interleaved checkpoint, the message
  naming the virtual stages and the reshard that converts it;
- test_reshard_refusals: tp 3 (4 heads), the checkpoint's own job
  directory and a step that exists are refused, naming why, and the
  source still verifies.
"""
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
from local_cluster import check, license_tokens, output_losses as losses  # noqa: E402


def write_job(path, tokens, ckpt, tp=2, pp=2, steps=6, init_from=None, name="export-test",
              n_embd=None, virtual_stages=None):
    job = {"name": name, "model": {"preset": "tiny", "n_layer": 4},
           "parallel": {"tp": tp, "pp": pp, "micro_batch": 2},
           "train": {"global_batch": 4, "steps": steps, "seed": 5, "precision": "bf16",
                     "lr": {"schedule": "constant", "peak": 3e-3}},
           "checkpoint": {"dir": ckpt, "interval": 3},
           "data": {"path": tokens}}
    if n_embd:
        job["model"]["n_embd"] = n_embd
    if virtual_stages:
        job["parallel"]["virtual_stages"] = virtual_stages
    if init_from:
        job["model"]["init_from"] = init_from
    if init_from or not ckpt:
        del job["checkpoint"]
    with open(path, "w") as f:
        json.dump(job, f)
    return path


def st_tensors(path):
    """name -> (dtype, shape, raw bytes) of a safetensors file, read by hand."""
    with open(path, "rb") as f:
        blob = f.read()
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    header.pop("__metadata__", None)
    data = blob[8 + n:]
    return {k: (v["dtype"], v["shape"], data[v["data_offsets"][0]:v["data_offsets"][1]])
            for k, v in header.items()}


def limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


def run(cmd, **kw):
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300, **kw)


def interleaved(mtnlgd, ctl, tmp, tokens, reshard):
    """A pp 2 job of 2 virtual stages (each stage two one-layer chunks):
    its checkpoints export offline as the run exports, to a file and to a
    directory (split at the chunks); they reshard to pp 1 and to pp 2 of
    plain 1F1B with the same weights; resumed as they were saved and from
    the plain 1F1B reshard, the next two steps agree; and a plain 1F1B job
    is refused the interleaved checkpoint, pointed at reshard."""
    failures = 0
    ckpt = os.path.join(tmp, "vs")
    job = write_job(os.path.join(tmp, "vs.json"), tokens, ckpt, tp=1, pp=2, name="vs-test",
                    virtual_stages=2)
    final = os.path.join(tmp, "vs-final.safetensors")
    r = run([mtnlgd, "--standalone", job, "--log-format", "json", "--export", final])
    if r.returncode:
        return check("test_interleaved_run", False, r.stdout[-2000:])
    job_dir = os.path.join(ckpt, "vs-test")
    out = os.path.join(tmp, "vs-offline.safetensors")
    e = run([ctl, "ckpt", "export", job_dir, out])
    failures += check("test_interleaved_checkpoint_exports_as_the_run",
                      e.returncode == 0 and open(out, "rb").read() == open(final, "rb").read(),
                      e.stdout[-400:])
    ok, detail = True, ""
    for pp, v in ((1, None), (2, 1)):
        out_dir = os.path.join(tmp, f"vs-re-{pp}", "vs-test")
        extra = ["--virtual-stages", str(v)] if v else []
        rr = run([ctl, "ckpt", "reshard", job_dir, out_dir, "--tp", "1", "--pp", str(pp), *extra])
        exp = os.path.join(tmp, f"vs-re-{pp}.safetensors")
        e = run([ctl, "ckpt", "export", out_dir, exp]) if rr.returncode == 0 else rr
        if e.returncode or open(exp, "rb").read() != open(final, "rb").read():
            ok, detail = False, f"pp {pp}: {rr.stdout[-300:]} {e.stdout[-300:]}"
    failures += check("test_interleaved_checkpoint_reshards_to_plain_1f1b", ok, detail)

    # two more steps: resumed interleaved (a copy), and as plain 1F1B from the reshard
    ref_ckpt = os.path.join(tmp, "vs-ref")
    shutil.copytree(ckpt, ref_ckpt)
    ref_export = os.path.join(tmp, "vs-ref-export")
    ref = run([mtnlgd, "--standalone", write_job(os.path.join(tmp, "vs-ref.json"), tokens,
                                                 ref_ckpt, tp=1, pp=2, steps=8, name="vs-test",
                                                 virtual_stages=2),
               "--log-format", "json", "--export", ref_export + "/"])
    plain = run([mtnlgd, "--standalone", write_job(os.path.join(tmp, "vs-plain.json"), tokens,
                                                   os.path.join(tmp, "vs-re-2"), tp=1, pp=2,
                                                   steps=8, name="vs-test"),
                 "--log-format", "json"])
    lr, lp = losses(ref.stdout), losses(plain.stdout)
    ok = ref.returncode == 0 and plain.returncode == 0 and [s for s, _ in lr] == [7, 8] and \
        [s for s, _ in lp] == [7, 8] and \
        all(abs(a - b) <= 1e-3 * abs(a) for (_, a), (_, b) in zip(lr, lp))
    failures += check("test_interleaved_checkpoint_resumes", ok,
                      f"interleaved {lr}, plain 1F1B {lp} {ref.stdout[-600:] if ref.returncode else ''}"
                      f"{plain.stdout[-600:] if plain.returncode else ''}")

    offline = os.path.join(tmp, "vs-ref-offline")
    r = run([ctl, "ckpt", "export", os.path.join(ref_ckpt, "vs-test"), offline + "/"])
    names = sorted(os.listdir(ref_export)) if os.path.isdir(ref_export) else []
    ok = ref.returncode == 0 and r.returncode == 0 and names == sorted(os.listdir(offline)) and \
        all(open(os.path.join(ref_export, n), "rb").read() ==
            open(os.path.join(offline, n), "rb").read() for n in names)
    detail = f"run's files {names}, offline {r.stdout.strip()[-300:]}"
    if ok:  # the chunks' files: layer 0 with the embeddings, 1, 2, 3 with ln_f
        where = json.load(open(os.path.join(ref_export,
                                            "model.safetensors.index.json")))["weight_map"]
        parts = [{where[n] for n in where if n.startswith(p)}
                 for p in (("wte", "wpe", "h.0."), ("h.1.",), ("h.2.",), ("h.3.", "ln_f"))]
        ok = all(len(p) == 1 for p in parts) and len(set().union(*parts)) == 4
        detail += f"; chunks in {parts}"
    failures += check("test_interleaved_export_to_a_directory_splits_at_the_chunks", ok, detail)

    # the interleaved checkpoint under a plain 1F1B job: refused, naming why
    wrong_ckpt = os.path.join(tmp, "vs-wrong")
    shutil.copytree(ckpt, wrong_ckpt)
    w = run([mtnlgd, "--standalone", write_job(os.path.join(tmp, "vs-wrong.json"), tokens,
                                               wrong_ckpt, tp=1, pp=2, steps=8, name="vs-test"),
             "--log-format", "json"])
    failures += check("test_plain_1f1b_job_is_refused_an_interleaved_checkpoint",
                      w.returncode != 0 and "saved with 2 virtual stages" in w.stdout and
                      "--virtual-stages 1" in w.stdout and not losses(w.stdout),
                      f"exit {w.returncode}: {w.stdout[-600:]}")
    return failures


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
        r = run([ctl, "ckpt", "export", os.path.join(job_dir, "step_00000003") + "/", step3])
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

        sharded = os.path.join(tmp, "hf-sharded")
        r = run([ctl, "ckpt", "export", job_dir, sharded + "/"])
        ok, detail = r.returncode == 0, r.stdout.strip()[-500:]
        if ok:
            index = json.load(open(os.path.join(sharded, "model.safetensors.index.json")))
            single = st_tensors(final)
            got = {}
            for name, file in index["weight_map"].items():
                got[name] = st_tensors(os.path.join(sharded, file))[name]
            total = sum(len(v[2]) for v in got.values())
            ok = got == single and index["metadata"]["total_size"] == total
            detail = f"{len(got)} tensors in {len(set(index['weight_map'].values()))} file(s), " \
                f"same as the single file: {got == single}, total_size {index['metadata']}"
            a = run([mtnlgd, "--standalone", write_job(os.path.join(tmp, "hf1.json"), tokens, None,
                                                       tp=2, pp=1, steps=1, init_from=sharded),
                     "--log-format", "json"])
            b = run([mtnlgd, "--standalone", write_job(os.path.join(tmp, "hf2.json"), tokens, None,
                                                       tp=2, pp=1, steps=1, init_from=final),
                     "--log-format", "json"])
            la, lb = losses(a.stdout), losses(b.stdout)
            ok = ok and la and la == lb
            detail += f"; first loss from the directory {la[:1]}, from the file {lb[:1]}"
        failures += check("test_export_to_a_directory_is_hugging_face_sharded", ok, detail)

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

        # the world group's deadline is 2 s: a sender left waiting on rank 0
        # would fail on it, not end with the export's own error
        capped = os.path.join(tmp, "capped.safetensors")
        r = run([mtnlgd, "--standalone", write_job(os.path.join(tmp, "capped.json"), tokens, None,
                                                   steps=1, init_from=None),
                 "--log-format", "json", "--comm-timeout-ms", "2000", "--export", capped],
                preexec_fn=limit_file_size)
        left = [n for n in os.listdir(tmp) if n.startswith("capped.safetensors")]
        failures += check("test_export_that_cannot_be_written_fails_every_rank_at_once",
                          r.returncode != 0 and "capped.safetensors" in r.stdout and
                          "File too large" in r.stdout and "timed out" not in r.stdout and
                          not left, f"exit {r.returncode}, left {left}: {r.stdout[-800:]}")

        def reshard(src, out, tp, pp, *extra):
            return run([ctl, *extra, "ckpt", "reshard", src, out, "--tp", str(tp), "--pp", str(pp)])

        ok, detail = True, ""
        for tp, pp in ((1, 1), (4, 1), (1, 4)):
            out_dir = os.path.join(tmp, f"re-{tp}-{pp}", "export-test")
            r = reshard(job_dir, out_dir, tp, pp)
            exp = os.path.join(tmp, f"re-{tp}-{pp}.safetensors")
            e = run([ctl, "ckpt", "export", out_dir, exp]) if r.returncode == 0 else r
            same = e.returncode == 0 and open(exp, "rb").read() == open(final, "rb").read()
            if not same:
                ok, detail = False, f"tp {tp} pp {pp}: {r.stdout.strip()[-300:]} {e.stdout[-300:]}"
        failures += check("test_reshard_keeps_every_weight", ok, detail)

        odd_ckpt = os.path.join(tmp, "odd")
        odd_job = write_job(os.path.join(tmp, "odd.json"), tokens, odd_ckpt, tp=2, pp=1, steps=2,
                            name="odd-test", n_embd=40)
        odd_final = os.path.join(tmp, "odd.safetensors")
        r = run([mtnlgd, "--standalone", odd_job, "--log-format", "json", "--export", odd_final])
        odd_out = os.path.join(tmp, "odd-1", "odd-test")
        rr = reshard(os.path.join(odd_ckpt, "odd-test"), odd_out, 1, 1) if r.returncode == 0 else r
        oe = os.path.join(tmp, "odd-1.safetensors")
        e = run([ctl, "ckpt", "export", odd_out, oe]) if rr.returncode == 0 else rr
        failures += check("test_reshard_of_unaligned_tensors",
                          e.returncode == 0 and open(oe, "rb").read() == open(odd_final, "rb").read(),
                          f"{r.stdout[-300:]} {rr.stdout[-300:]} {e.stdout[-300:]}")

        back = os.path.join(tmp, "back", "export-test")
        r = reshard(os.path.join(tmp, "re-1-1", "export-test"), back, 2, 2, "-o", "json")
        info = json.loads(r.stdout) if r.returncode == 0 else {}
        ok = r.returncode == 0 and info.get("tp") == 2 and info.get("step") == 6
        detail = r.stdout.strip()[-400:]
        for name in sorted(os.listdir(os.path.join(job_dir, "step_00000006"))):
            if ok and name.startswith("shard_"):
                a = open(os.path.join(job_dir, "step_00000006", name), "rb").read()
                b = open(os.path.join(back, "step_00000006", name), "rb").read()
                ok = a == b
                detail = "" if ok else f"{name} differs after tp 1 and back"
        failures += check("test_reshard_and_back_is_the_same_files", ok, detail)

        # the same two steps past step 6, resumed as tp 2 x pp 2 (a copy of
        # the run's checkpoints) and as tp 1 from the resharded one
        ref_ckpt = os.path.join(tmp, "ref")
        shutil.copytree(ckpt, ref_ckpt)
        ref_job = write_job(os.path.join(tmp, "ref.json"), tokens, ref_ckpt, steps=8)
        ref_export = os.path.join(tmp, "ref-export")
        ref = run([mtnlgd, "--standalone", ref_job, "--log-format", "json",
                   "--export", ref_export + "/"])
        one_job = write_job(os.path.join(tmp, "re1.json"), tokens, os.path.join(tmp, "re-1-1"),
                            tp=1, pp=1, steps=8)
        one = run([mtnlgd, "--standalone", one_job, "--log-format", "json"])
        lr, lo = losses(ref.stdout), losses(one.stdout)
        ok = ref.returncode == 0 and one.returncode == 0 and [s for s, _ in lr] == [7, 8] and \
            [s for s, _ in lo] == [7, 8] and \
            all(abs(a - b) <= 1e-3 * abs(a) for (_, a), (_, b) in zip(lr, lo))
        failures += check("test_resharded_checkpoint_resumes", ok,
                          f"tp 2 x pp 2 {lr}, tp 1 {lo} {one.stdout[-600:] if one.returncode else ''}")

        offline = os.path.join(tmp, "ref-offline")
        r = run([ctl, "ckpt", "export", os.path.join(ref_ckpt, "export-test"), offline + "/"])
        names = sorted(os.listdir(ref_export)) if os.path.isdir(ref_export) else []
        ok = ref.returncode == 0 and r.returncode == 0 and \
            names == sorted(os.listdir(offline)) and len(names) == 4 and \
            "config.json" in names and \
            all(open(os.path.join(ref_export, n), "rb").read() ==
                open(os.path.join(offline, n), "rb").read() for n in names)
        detail = f"run's files {names}, offline {r.stdout.strip()[-300:]}"
        if ok:
            where = json.load(open(os.path.join(ref_export,
                                                "model.safetensors.index.json")))["weight_map"]
            stage0 = {where[n] for n in where if n.startswith(("wte", "wpe", "h.0.", "h.1."))}
            stage1 = {where[n] for n in where if n.startswith(("h.2.", "h.3.", "ln_f"))}
            ok = len(stage0) == 1 and len(stage1) == 1 and stage0 != stage1
            detail += f"; stage 0 in {stage0}, stage 1 in {stage1}"
        failures += check("test_export_to_a_directory_is_written_by_every_stage", ok, detail)

        blocked = os.path.join(tmp, "blocked")
        os.makedirs(os.path.join(blocked, "model-00002-of-00002.safetensors"))
        with open(os.path.join(blocked, "model.safetensors.index.json"), "w") as f:
            f.write('{"weight_map": {}}')
        r = run([mtnlgd, "--standalone", write_job(os.path.join(tmp, "blocked.json"), tokens, None,
                                                   steps=1, init_from=None),
                 "--log-format", "json", "--comm-timeout-ms", "2000", "--export", blocked])
        left = sorted(os.listdir(blocked))
        failures += check("test_stage_that_cannot_write_fails_the_export_without_an_index",
                          r.returncode != 0 and "stage 1" in r.stdout and
                          "model-00002-of-00002.safetensors" in r.stdout and
                          "timed out" not in r.stdout and
                          "model.safetensors.index.json" not in left,
                          f"exit {r.returncode}, left {left}: {r.stdout[-800:]}")

        failures += interleaved(mtnlgd, ctl, tmp, tokens, reshard)

        r3 = reshard(job_dir, os.path.join(tmp, "re-3"), 3, 1)
        own = reshard(job_dir, job_dir, 1, 1)
        again = reshard(job_dir, os.path.join(tmp, "re-1-1", "export-test"), 1, 1)
        v = run([ctl, "ckpt", "verify", job_dir])
        failures += check("test_reshard_refusals",
                          r3.returncode == 1 and "tp" in r3.stdout and "n_head" in r3.stdout and
                          own.returncode == 1 and "own job directory" in own.stdout and
                          again.returncode == 1 and "exists" in again.stdout and
                          v.returncode == 0,
                          f"tp 3: {r3.stdout.strip()[-300:]} | own: {own.stdout.strip()[-200:]} | "
                          f"again: {again.stdout.strip()[-200:]} | verify {v.returncode}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
