"""Checkpoints of mtnlgd --standalone: resume, other dp widths, damage, full
disks, and SIGKILL in the middle of writing.

usage: test_checkpoints.py MTNLGD MTNLGCTL FAULT_PRELOAD

The job is the tiny byte-level model as tp 2 x pp 2 x dp 2 device threads
(the same code path as a cluster), checkpointing into a temp dir. Runs that
stop part-way stop by train.exit_interval, at a step known in advance (a
SIGTERM sent on reading a step lands some steps later, or after the last),
except the first, which tests the stop by SIGTERM and takes the step it
lands on.
- test_resume_continues_bit_for_bit: a run stopped by SIGTERM after step 3
  (it saves on the way out) and started again prints, for every later step,
  exactly the loss of an uninterrupted run;
- test_exit_duration_saves_and_stops_and_resumes: train.exit_duration_mins
  stops a long run at a step every rank agrees on, with that step's
  checkpoint, and the resumed run goes on bit for bit;
- test_unreadable_{manifest,header,chunk}_is_read_again: with a read of the
  newest checkpoint failing once with EIO (FAULT_PRELOAD, an LD_PRELOAD
  library), of its manifest or a shard's header (rank 0's choice) or a chunk
  (the rank that checksums it), the resume reads it again a second later and
  loads it, where a manifest that could not be read was taken for damaged;
  test_unreadable_{header,chunk}_is_refused_not_passed_over: failing every
  time, the resume fails after three tries naming the error, and neither
  falls back to the older checkpoint nor moves anything;
  test_unreadable_load_fails_every_rank_at_once: checked whole, then one
  rank's read of its slice fails: every rank fails alike, in seconds (a
  failure every rank agreed on leaves no rank in a collective);
- test_async_checkpoint_resumes_bit_for_bit: checkpoints written in the
  background (checkpoint.async) while training goes on hold the state of
  their step: resuming from step 9 gives the uninterrupted losses exactly;
- test_fp16_resume_keeps_loss_scale_and_adam_count: an fp16 run whose
  first steps overflow and are skipped resumes to the same losses exactly;
- test_resume_under_dp_2_1_4: the dp 2 checkpoint resumed with dp 1, that
  one's resumed with dp 4: losses within 1e-5 of the uninterrupted run;
- test_flipped_byte_is_named_and_the_previous_checkpoint_used: resume falls
  back from a checkpoint with a flipped byte;
- test_damaged_checkpoint_is_set_aside_and_its_step_saved_again: that run
  renamed the damaged one to step_NNNNNNNN.damaged (kept, byte and all),
  pointed `latest` at what it loaded, and saved the step again, which
  verifies; test_restart_after_set_aside_does_not_fall_back: the next resume
  takes the new checkpoint without passing over anything;
- test_named_damaged_step_is_refused: the new checkpoint damaged in turn and
  named is refused, and nothing is moved;
- test_damaged_shard_is_found_by_one_rank_only: at resume each shard file's
  checksums are checked by one rank (the replicas take the files in turn:
  file tp + pp * 2 goes to dp rank (tp + pp * 2) % 2), so the flipped byte is
  reported once, by the rank of tp 1, pp 1, dp 1;
- test_file_size_limit_fails_the_checkpoint_not_the_run: under RLIMIT_FSIZE
  the checkpoint fails with the file named, training goes on to the end, and
  the earlier checkpoint still verifies; the last step's checkpoint failed
  too, which the run says and its exit code (1) tells: it used to exit 0;
- test_sigkill_during_checkpoints_never_breaks_latest: 20 runs checkpointing
  every step, each SIGKILLed at a random moment; after each, `latest` names a
  checkpoint that verifies (mtnlgctl ckpt verify) and resumes.
"""
import glob
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
from local_cluster import check, license_tokens  # noqa: E402


def write_job(path, tokens, steps=20, ckpt=None, interval=0, name="ckpt-test"):
    job = {"name": name, "model": {"preset": "tiny", "n_layer": 4},
           "parallel": {"tp": 2, "pp": 2, "dp_min": 2, "dp_max": 4, "micro_batch": 2},
           "train": {"global_batch": 8, "steps": steps, "seed": 11,
                     "lr": {"schedule": "cosine", "peak": 3e-3, "min": 3e-4, "warmup_steps": 3}},
           "data": {"path": tokens}}
    if ckpt:
        job["checkpoint"] = {"dir": ckpt, "interval": interval}
    with open(path, "w") as f:
        json.dump(job, f)
    return path


def run(mtnlgd, job, *sets, timeout=300, preexec=None, env=None):
    args = [mtnlgd, "--standalone", job, "--log-format", "json"]
    for s in sets:
        args += ["--set", s]
    p = subprocess.run(args, capture_output=True, text=True, timeout=timeout, preexec_fn=preexec,
                       env=env)
    steps = {}
    for line in p.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            steps[r["step"]] = r["loss"]
    return p, steps


def step_lrs(stdout):
    """{step: lr} of a run's step lines."""
    return {r["step"]: r["lr"] for r in map(json.loads, (l for l in stdout.splitlines()
                                                          if l.startswith("{")))}


def skipped_total(stdout):
    """The skipped_total of the last step line: steps skipped in the run so far."""
    lines = [json.loads(l) for l in stdout.splitlines() if l.startswith("{")]
    return lines[-1].get("skipped_total") if lines else None


def commit_traces(job_dir):
    """What a commit cut short leaves in a job's checkpoint directory: step
    directories without a manifest, and temp files (the names)."""
    out = set()
    for name in os.listdir(job_dir) if os.path.isdir(job_dir) else []:
        path = os.path.join(job_dir, name)
        if ".tmp." in name:
            out.add(name)
        elif name.startswith("step_") and os.path.isdir(path):
            if not os.path.exists(os.path.join(path, "manifest.json")):
                out.add(name)
            out.update(name + "/" + f for f in os.listdir(path) if ".tmp." in f)
    return out


def run_until(mtnlgd, job, step, *sets):
    """Starts a run and SIGTERMs it once it printed `step`; returns (proc, steps)."""
    args = [mtnlgd, "--standalone", job, "--log-format", "json"]
    for s in sets:
        args += ["--set", s]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    steps = {}
    for line in p.stdout:
        if line.startswith("{"):
            r = json.loads(line)
            steps[r["step"]] = r["loss"]
            if r["step"] == step:
                p.send_signal(signal.SIGTERM)
    err = p.stderr.read()
    p.wait(timeout=120)
    return p, steps, err




def main():
    mtnlgd, mtnlgctl, preload = sys.argv[1], sys.argv[2], os.path.abspath(sys.argv[3])
    fails = 0
    with tempfile.TemporaryDirectory() as tmp:
        tokens = license_tokens(os.path.join(tmp, "tokens.u16"))
        plain = write_job(os.path.join(tmp, "plain.json"), tokens)
        p, ref = run(mtnlgd, plain)
        assert p.returncode == 0 and len(ref) == 20, p.stderr

        # 1. bit-exact resume on the same layout
        ck = os.path.join(tmp, "ck1")
        job = write_job(os.path.join(tmp, "job1.json"), tokens, ckpt=ck)
        p1, a, err1 = run_until(mtnlgd, job, 3)  # lands some steps later, before the 20th
        p2, b = run(mtnlgd, job)
        first = min(b) if b else None
        same = (a and first == max(a) + 1 and all(b[s] == ref[s] for s in b)
                and max(b) == 20 and all(a[s] == ref[s] for s in a))
        fails += check("test_resume_continues_bit_for_bit",
                       p1.returncode == 0 and p2.returncode == 0 and same
                       and "resumed from" in p2.stderr,
                       "stopped at %s, resumed at %s, %d later losses equal exactly" % (
                           max(a) if a else None, first, sum(b[s] == ref[s] for s in b)))

        # 1a. a checkpoint that cannot be read is read again, and never passed
        # over for an older one (which would train the steps between again)
        jobdir = os.path.join(ck, "ckpt-test")
        steps_saved = sorted(glob.glob(os.path.join(jobdir, "step_*")))
        newest, latest0 = steps_saved[-1], open(os.path.join(jobdir, "latest")).read()
        n_new = int(os.path.basename(newest)[5:])

        def faulty(count, offset, skip=0, name="shard_tp01_pp001.bin"):
            env = dict(os.environ, LD_PRELOAD=preload, MTNLG_FAULT_EIO_COUNT=str(count),
                       MTNLG_FAULT_EIO_FROM=str(offset), MTNLG_FAULT_EIO_SKIP=str(skip),
                       MTNLG_FAULT_EIO_FILE=os.path.join(os.path.basename(newest), name))
            return run(mtnlgd, job, "train.steps=%d" % n_new, env=env)[0]
        resumed = "resumed from %s:" % newest
        # once: the manifest and a shard's header (rank 0's choice), then a
        # chunk (the rank that checksums the file)
        for what, offset in (("manifest", 0), ("header", 0), ("chunk", 64)):
            q = faulty(1, offset, name="manifest.json" if what == "manifest"
                       else "shard_tp01_pp001.bin")
            fails += check("test_unreadable_%s_is_read_again" % what,
                           len(steps_saved) >= 2 and q.returncode == 0
                           and "fault_preload: EIO" in q.stderr
                           and "trying again in 1 s (try 2 of 3)" in q.stderr
                           and resumed in q.stderr and "falling back" not in q.stderr,
                           "%d checkpoints; exit %d: %s" % (
                               len(steps_saved), q.returncode,
                               [ln[-160:] for ln in q.stderr.splitlines()
                                if "EIO" in ln or "resum" in ln or "fall" in ln][:6]))
        for what, offset in (("header", 0), ("chunk", 64)):
            q = faulty(-1, offset)
            said = {"header": "could not be read, so no older checkpoint is taken in its place",
                    "chunk": "could not be read on 1 rank(s) in 3 tries"}[what]
            fails += check("test_unreadable_%s_is_refused_not_passed_over" % what,
                           q.returncode != 0 and said in q.stderr
                           and "Input/output error" in q.stderr and "resumed from" not in q.stderr
                           and "falling back" not in q.stderr
                           and open(os.path.join(jobdir, "latest")).read() == latest0
                           and sorted(glob.glob(os.path.join(jobdir, "step_*"))) == steps_saved,
                           "exit %d: %s" % (q.returncode, q.stderr.strip().splitlines()[-1][-300:]
                                            if q.stderr.strip() else ""))
        # checked whole, then a read of the load fails: every rank fails alike, at once
        with open(os.path.join(newest, "manifest.json")) as f:
            chunks = [fl for fl in json.load(f)["files"]
                      if fl["name"] == "shard_tp01_pp001.bin"][0]["chunks"]
        checked = sum((c["bytes"] + (4 << 20) - 1) // (4 << 20) for c in chunks
                      if c["offset"] >= 64)  # the checking rank's reads, 4 MiB at most each
        t0 = time.time()
        q = faulty(1, 64, skip=checked)
        took = time.time() - t0
        fails += check("test_unreadable_load_fails_every_rank_at_once",
                       q.returncode != 0 and "fault_preload: EIO" in q.stderr
                       and "shard_tp01_pp001.bin at offset" in q.stderr
                       and "checked step" not in q.stderr and "resumed from" not in q.stderr
                       and "falling back" not in q.stderr and took < 60,
                       "exit %d in %.1f s: %s" % (q.returncode, took,
                                                  q.stderr.strip().splitlines()[-1][-300:]
                                                  if q.stderr.strip() else ""))

        # 1b. asynchronous saves hold the state of their step boundary
        ck = os.path.join(tmp, "ck1b")
        job = write_job(os.path.join(tmp, "job1b.json"), tokens, ckpt=ck, interval=3)
        pa, full = run(mtnlgd, job, "checkpoint.async=true")
        pb, tail = run(mtnlgd, job, "checkpoint.async=true", "checkpoint.resume_step=9")
        fails += check("test_async_checkpoint_resumes_bit_for_bit",
                       pa.returncode == 0 and full == ref and min(tail) == 10 and max(tail) == 20
                       and all(tail[s] == ref[s] for s in tail)
                       and "checkpoint of step 9 committed" in pa.stderr,
                       "resumed at %s from the async checkpoint of step 9; %d later losses equal"
                       % (min(tail) if tail else None, sum(tail[s] == ref[s] for s in tail)))

        # 1b'. a resume names what changed in the job since the save: a note
        # for how the run is carried out, a warning for what it computes
        pc, _ = run(mtnlgd, job, "checkpoint.async=true", "checkpoint.resume_step=9",
                    "train.lr.peak=2e-3", "train.steps=12")
        note = "(its trajectory does not): checkpoint.resume_step -1 -> 9"
        # what moves the trajectory apart, then the rest on its own
        warn = ("departs from the saved run's trajectory: train.lr.decay_steps 20 -> 12, "
                "train.lr.peak 0.003 -> 0.002 (also changed, the trajectory not with them: "
                "checkpoint.resume_step -1 -> 9, train.steps 20 -> 12)")
        said_b = [l for l in pb.stderr.splitlines() if "the job changed" in l]
        said_c = [l for l in pc.stderr.splitlines() if "the job changed" in l]
        fails += check("test_resume_names_what_changed_in_the_job",
                       pb.returncode == 0 and len(said_b) == 1 and note in said_b[0]
                       and " info " in said_b[0]
                       and pc.returncode == 0 and len(said_c) == 1 and warn in said_c[0]
                       and " warn " in said_c[0]
                       and "train.lr.peak 0.003 -> 0.002" in pc.stderr
                       and "train.steps 20 -> 12" in pc.stderr
                       and "the job changed" not in p2.stderr,
                       "resume_step only: %r; lr and steps too: %r" % (said_b, said_c))

        # 1b''. train.exit_duration_mins (Megatron's --exit-duration-in-mins):
        # a run of 100000 steps given 1.2 s stops at a step every rank
        # agrees on, exit 0, with that step's checkpoint; resumed without the
        # limit, the next steps are a straight run's bit for bit (the LR
        # decays over 100000 steps in every run, whatever train.steps)
        ck = os.path.join(tmp, "ck1t")
        job = write_job(os.path.join(tmp, "job1t.json"), tokens, steps=100000, ckpt=ck)
        decay = "train.lr.decay_steps=100000"
        pt, timed = run(mtnlgd, job, decay, "train.exit_duration_mins=0.02")
        last = max(timed) if timed else 0
        pr, rest = run(mtnlgd, job, decay, "train.steps=%d" % (last + 2))
        pf, straight = run(mtnlgd, job, decay, "train.steps=%d" % (last + 2),
                           "checkpoint.dir=" + os.path.join(tmp, "ck1t-straight"))
        fails += check("test_exit_duration_saves_and_stops_and_resumes",
                       pt.returncode == 0 and 0 < last < 100000
                       and "train.exit_duration_mins (0.02) has passed" in pt.stderr
                       and ("checkpoint of step %d committed" % last) in pt.stderr
                       and pr.returncode == 0 and sorted(rest) == [last + 1, last + 2]
                       and all(rest[s] == straight[s] for s in rest)
                       and all(timed[s] == straight[s] for s in timed),
                       "stopped at step %d (exit %d); resumed steps %s, equal to a straight run: "
                       "%s" % (last, pt.returncode, sorted(rest),
                               all(rest.get(s) == straight.get(s) for s in rest)))

        # 1c. fp16: the loss scaler's state and Adam's count survive a resume
        ck = os.path.join(tmp, "ck1c")
        job = write_job(os.path.join(tmp, "job1c.json"), tokens, steps=30, ckpt=ck)
        with open(job) as f:
            j = json.load(f)
        j["train"]["precision"] = "fp16"
        j["train"]["loss_scale"] = {"initial": 2 ** 24, "growth_interval": 4}
        with open(job, "w") as f:
            json.dump(j, f)
        p0, ref16 = run(mtnlgd, job, "checkpoint.dir=" + os.path.join(tmp, "ck1c-ref"))
        p1, a = run(mtnlgd, job, "train.exit_interval=9")
        p2, b = run(mtnlgd, job)
        skipped = p0.stdout.count('"skipped":true')
        # the count of skipped steps is checkpointed: the resumed run ends on the same total
        totals = [skipped_total(p.stdout) for p in (p0, p2)]
        fails += check("test_fp16_resume_keeps_loss_scale_and_adam_count",
                       p0.returncode == 0 and skipped > 0 and b and min(b) == max(a) + 1
                       and all(b[s] == ref16[s] for s in b) and max(b) == 30
                       and totals == [skipped, skipped],
                       "%d overflow steps skipped; stopped at %s, resumed at %s, later losses %s; "
                       "skipped in all at step 30 (whole run, resumed run): %s" % (
                           skipped, max(a) if a else None, min(b) if b else None,
                           "equal" if b and all(b[s] == ref16[s] for s in b) else "DIFFER", totals))

        # 2. dp 2 -> 1 -> 4 (the checkpoint holds whole shards: any dp loads it)
        ck = os.path.join(tmp, "ck2")
        job = write_job(os.path.join(tmp, "job2.json"), tokens, ckpt=ck)
        p1, a = run(mtnlgd, job, "train.exit_interval=6")
        p2, b = run(mtnlgd, job, "train.exit_interval=12", "parallel.dp_min=1", "parallel.dp_max=1")
        err2 = p2.stderr
        p3, c = run(mtnlgd, job, "parallel.dp_min=4", "parallel.dp_max=4")
        got = {**a, **b, **c}
        worst = max(abs(got[s] - ref[s]) / abs(ref[s]) for s in ref if s in got) if got else 1
        fails += check("test_resume_under_dp_2_1_4",
                       len(got) == 20 and worst < 1e-5 and min(b) == max(a) + 1
                       and min(c) == max(b) + 1
                       and "saved with dp 2, running with dp 1" in err2
                       and "saved with dp 1, running with dp 4" in p3.stderr,
                       "steps %s..%s on dp 2, %s..%s on dp 1, %s..%s on dp 4; worst relative "
                       "difference %.2e" % (min(a), max(a), min(b), max(b), min(c), max(c), worst))

        # 2b. the LR schedule's position is the samples trained, in steps of
        # the global batch now (Megatron counts samples): resumed after 4
        # steps of 8 with a global batch of 16, step 5 is at 2 steps of 16,
        # as a straight run's step 3 is, where counting updates put it at 4
        # (its own names: section 3 goes on with section 2's ck and job)
        lr_job = write_job(os.path.join(tmp, "job2lr.json"), tokens,
                           ckpt=os.path.join(tmp, "ck2lr"))
        sched = ("train.lr.warmup_steps=3", "train.lr.decay_steps=12")
        lr_a, _ = run(mtnlgd, lr_job, *sched, "train.exit_interval=4")
        lr_b, _ = run(mtnlgd, lr_job, *sched, "train.global_batch=16", "train.steps=6")
        lr_s, _ = run(mtnlgd, lr_job, *sched, "train.global_batch=16", "train.steps=4",
                      "checkpoint.dir=" + os.path.join(tmp, "ck2lr-straight"))
        resumed_lr, straight_lr = step_lrs(lr_b.stdout), step_lrs(lr_s.stdout)
        fails += check("test_lr_position_counts_samples_across_a_global_batch_change",
                       lr_a.returncode == 0 and lr_b.returncode == 0 and lr_s.returncode == 0
                       and sorted(resumed_lr) == [5, 6]
                       and resumed_lr[5] == straight_lr.get(3)
                       and resumed_lr[6] == straight_lr.get(4),
                       "resumed at batch 16: lr %s; a straight run at batch 16: lr %s"
                       % (resumed_lr, straight_lr))

        # 3. damage: a flipped byte in the newest checkpoint
        jobdir = os.path.join(ck, "ckpt-test")
        newest = sorted(glob.glob(os.path.join(jobdir, "step_*")))[-1]
        shard = os.path.join(newest, "shard_tp01_pp001.bin")
        with open(shard, "r+b") as f:
            f.seek(5000)
            byte = f.read(1)
            f.seek(5000)
            f.write(bytes([byte[0] ^ 0xFF]))
        v = subprocess.run([mtnlgctl, "ckpt", "verify", newest], capture_output=True, text=True)
        p4, d = run(mtnlgd, job, "checkpoint.resume_step=-1", "train.steps=20")
        named = "shard_tp01_pp001.bin chunk" in p4.stderr and "falling back" in p4.stderr
        fails += check("test_flipped_byte_is_named_and_the_previous_checkpoint_used",
                       v.returncode == 1 and "shard_tp01_pp001.bin chunk 1" in v.stdout and named
                       and p4.returncode == 0 and min(d) == max(b) + 1,
                       "verify exit %d; resumed at step %s" % (v.returncode, min(d) if d else None))
        # the damaged one was set aside, flipped byte and all, and its step saved anew
        step_n = int(os.path.basename(newest)[5:])
        aside = newest + ".damaged"
        kept = None
        if os.path.exists(os.path.join(aside, "shard_tp01_pp001.bin")):
            with open(os.path.join(aside, "shard_tp01_pp001.bin"), "rb") as f:
                f.seek(5000)
                kept = f.read(1)
        latest = open(os.path.join(jobdir, "latest")).read()
        v2 = subprocess.run([mtnlgctl, "ckpt", "verify", jobdir], capture_output=True, text=True)
        fails += check("test_damaged_checkpoint_is_set_aside_and_its_step_saved_again",
                       kept == bytes([byte[0] ^ 0xFF]) and latest == os.path.basename(newest) + "\n"
                       and "set aside the damaged checkpoint of step %d as %s" % (step_n, aside)
                       in p4.stderr
                       and "checkpoint of step %d committed" % step_n in p4.stderr
                       and v2.returncode == 0 and newest + "\n" in v2.stdout
                       and ".damaged" not in v2.stdout,
                       "kept byte %s (flipped %s); latest %r; verify of the job exit %d" % (
                           kept, bytes([byte[0] ^ 0xFF]), latest, v2.returncode))
        # the next resume reads the new checkpoint and never the one set aside
        p4b, _ = run(mtnlgd, job, "checkpoint.resume_step=-1", "train.steps=%d" % step_n)
        fails += check("test_restart_after_set_aside_does_not_fall_back",
                       p4b.returncode == 0 and "resumed from %s:" % newest in p4b.stderr
                       and "falling back" not in p4b.stderr and ".damaged" not in p4b.stderr,
                       "exit %d: %s" % (p4b.returncode, [ln for ln in p4b.stderr.splitlines()
                                                          if "resum" in ln or "skipping" in ln]))
        # damaged again and named: refused, and nothing is moved
        with open(os.path.join(newest, "shard_tp01_pp001.bin"), "r+b") as f:
            f.seek(5000)
            byte2 = f.read(1)
            f.seek(5000)
            f.write(bytes([byte2[0] ^ 0xFF]))
        p5, e = run(mtnlgd, job, "checkpoint.resume_step=%d" % step_n)
        fails += check("test_named_damaged_step_is_refused",
                       p5.returncode != 0 and "checksum" in p5.stderr and not e
                       and os.path.exists(os.path.join(newest, "manifest.json"))
                       and not os.path.exists(aside + ".2"),
                       "exit %d: %s" % (p5.returncode, p5.stderr.strip().splitlines()[-1][:200]
                                        if p5.stderr.strip() else ""))
        # each shard file is hashed by one rank, its (tp, pp)'s dp rank 0, not all by rank 0
        finders = [[ln for ln in q.stderr.splitlines()
                    if "checked step %d:" % step_n in ln and "shard_tp01_pp001.bin chunk" in ln]
                   for q in (p4, p5)]
        fails += check("test_damaged_shard_is_found_by_one_rank_only",
                       all(len(f) == 1 and "(tp 1, pp 1, dp 1)" in f[0] for f in finders),
                       "found by %s" % [[ln[ln.find("resume: rank"):][:40] for ln in f]
                                        for f in finders])

        # 4. a file-size limit (a full disk, as far as the writer can tell)
        ck = os.path.join(tmp, "ck4")
        job = write_job(os.path.join(tmp, "job4.json"), tokens, ckpt=ck, steps=30)
        p6, s6 = run(mtnlgd, job, "train.exit_interval=5")
        before = subprocess.run([mtnlgctl, "ckpt", "verify", os.path.join(ck, "ckpt-test")],
                                capture_output=True, text=True)

        def limit():
            resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
        p7, f7 = run(mtnlgd, job, "checkpoint.interval=10", preexec=limit)
        after = subprocess.run([mtnlgctl, "ckpt", "verify", os.path.join(ck, "ckpt-test")],
                               capture_output=True, text=True)
        # exit 2, the job's fault, as on a node: a restart would not bring the steps back
        ok = (p7.returncode == 2 and max(f7) == 30 and "checkpoint of step 10 failed" in p7.stderr
              and "completed 30 steps, but the last step's checkpoint failed" in p7.stderr
              and ".bin" in p7.stderr and "File too large" in p7.stderr
              and before.returncode == 0 and after.returncode == 0
              and open(os.path.join(ck, "ckpt-test", "latest")).read().strip()
              == "step_%08d" % max(s6))
        fails += check("test_file_size_limit_fails_the_checkpoint_not_the_run", ok,
                       "exit %d, trained to %s; latest %s" % (
                           p7.returncode, max(f7) if f7 else None,
                           open(os.path.join(ck, "ckpt-test", "latest")).read().strip()))

        # 5. SIGKILL at random moments while checkpointing every step
        ck = os.path.join(tmp, "ck5")
        job = write_job(os.path.join(tmp, "job5.json"), tokens, ckpt=ck, interval=1, steps=100000)
        rng = random.Random(1234)
        bad, trials, last_latest, mid_commit, seen_traces = [], 20, None, 0, set()
        for t in range(trials):
            p = subprocess.Popen([mtnlgd, "--standalone", job, "--log-format", "json"],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            # from its first step on (a loaded machine may take seconds to
            # get there), it checkpoints every step: kill it at a moment
            for line in p.stdout:
                if line.startswith("{"):
                    break
            # a step's line comes before its save: the first trial waits for
            # the first commit, which a loaded machine may take a second for
            deadline = time.time() + 60
            while t == 0 and time.time() < deadline and not os.path.exists(
                    os.path.join(ck, "ckpt-test", "latest")):
                time.sleep(0.01)
            time.sleep(rng.random() * 0.8)
            p.kill()
            p.wait()
            latest = open(os.path.join(ck, "ckpt-test", "latest")).read().strip() \
                if os.path.exists(os.path.join(ck, "ckpt-test", "latest")) else None
            if latest is None:
                bad.append((t, "no checkpoint after the first step"))
                continue
            traces = commit_traces(os.path.join(ck, "ckpt-test"))
            if traces - seen_traces:
                mid_commit += 1  # this kill left a checkpoint half written
            seen_traces |= traces
            if latest in traces:
                bad.append((t, "latest names an uncommitted", latest))
            v = subprocess.run([mtnlgctl, "ckpt", "verify", os.path.join(ck, "ckpt-test", latest)],
                               capture_output=True, text=True)
            if v.returncode != 0 or not os.path.exists(os.path.join(ck, "ckpt-test", latest,
                                                                    "manifest.json")):
                bad.append((t, latest, v.stdout[-300:]))
            if last_latest and latest < last_latest:
                bad.append((t, "latest went back", latest, last_latest))
            last_latest = latest
        p8, g = run(mtnlgd, job, "train.steps=%d" % (int(last_latest[5:]) + 1))
        # a test whose kills all fell between commits would test nothing
        fails += check("test_sigkill_during_checkpoints_never_breaks_latest",
                       not bad and mid_commit > 0 and p8.returncode == 0
                       and min(g) == int(last_latest[5:]) + 1,
                       "%d kills, %d of them in a commit; latest %s, problems %s" % (
                           trials, mid_commit, last_latest, bad[:3]))
    print("%d failure(s)" % fails)
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
