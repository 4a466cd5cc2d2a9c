"""train.tensorboard_dir (Megatron's --tensorboard-dir): TensorBoard event
files of the run's scalars, read back here with Google's protobuf runtime.

usage: test_tensorboard.py MTNLGD MTNLG_PREPROCESS JOB.json [FAULT_PRELOAD]
The event files are parsed with python3-protobuf against message types
declared here from tensorboard's event.proto and summary.proto (field
numbers and types as published), and every record's framing is checked
with a CRC-32C computed bit by bit here (itself checked on the standard
check value). Checked:
  - standalone, fp16 with validation, params norm and num zeros, 8 steps
    (the first 4 overflowing): one file per process, its first event the
    file version, then for each step one event whose learning-rate, lm
    loss, grad-norm, num-zeros, params-norm, loss-scale, batch-size,
    world-size (2) and iteration-time equal the step's JSON line (float32
    rounding; grad-norm and num-zeros only where the line has them), with
    "lm loss validation" and its perplexity where the line has val_loss (or
    only the end of training's, final_val_loss), and "lm loss test" where
    it has test_loss; and after it one event at the samples read so far
    (the lines' batches added up) holding Megatron's "<tag> vs samples" of
    each of those tags but iteration-time (ours, tokens-per-second and
    skipped-iterations, have none either), with the same values;
  - under a batch ramp-up (4, 4, 8, 12, 16) the batch-size tag follows the
    lines and the "vs samples" events are at 4, 8, 16, 28, 44;
  - a rollback to an earlier checkpoint (checkpoint.resume_step 3) that
    stops at step 5 (train.exit_interval) writes a second file that starts a
    session at step 4, named to sort after the first even when that one's
    name is 1000 s ahead (another node's clock): read as TensorBoard's
    Python loader reads a directory (files in name order, a session start
    dropping every tag's points at and past its step), the per-step curve
    is the first run's to step 3, then the second run's, and the first
    run's steps 6 to 8 are gone; the "vs samples" series read as the Rust
    data server reads them (a tag's point below its last dropping its
    points past it) are the first run's to step 3, then the second run's,
    the first run's later points staying only under tags the second run
    wrote nothing under; read as the Python loader reads them (whose
    session start at step 4 drops the first run's points at 4 samples and
    past, all of them), the same, each point once: the second file writes
    steps 1 to 3's points again after its start, and none of a foreign
    file's 40 other "vs samples" tags (planted in the directory for it);
  - the job finished by a third run resuming at step 6 (where the files
    end, as a resize goes on) writes neither a session start nor an old
    "vs samples" point: its file holds steps 6 to 8 and their samples only,
    and the directory reads as steps 1 to 8, each "vs samples" point once
    (a FIFO named as an events file in the directory meanwhile, not read);
  - a local cluster of 2 node daemons (tp 2 x pp 2 x dp 2 over their 8
    ranks) writes exactly one file, from n0 (world rank 0), whose losses
    are n0's step lines and whose world-size is 8;
  - a tensorboard_dir that cannot be made is warned of and the run trains
    on to the end (exit 0); an empty tensorboard_dir is refused naming the
    key; a job without it writes nothing;
  - with FAULT_PRELOAD holding every write(2) to the events file (a hung
    mount), a standalone run still logs all its steps, and its end says it
    left the writer with every step's points from step 1 on; the disk
    released then, the exit waits for the writer: the file holds steps 1
    to 6 and the daemon exits 0, all in under 25 s.
"""
import glob
import json
import math
import os
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
from local_cluster import LocalCluster, check, license_tokens, tiny_job  # noqa: E402

try:
    from google.protobuf import descriptor_pb2, descriptor_pool
    from google.protobuf import message_factory
except ImportError as e:
    if __name__ != "__main__":  # imported for its reader: the importer decides
        raise
    print(f"SKIP: python3-protobuf not importable ({e}); tools/test installs it")
    sys.exit(77)


# ---- tensorboard's messages, declared from their published .proto ----

def _messages():
    F = descriptor_pb2.FieldDescriptorProto
    fd = descriptor_pb2.FileDescriptorProto(name="tb_event_check.proto",
                                            package="tbcheck", syntax="proto3")

    def msg(name, fields):
        m = fd.message_type.add(name=name)
        for fname, num, ftype, label, tname in fields:
            f = m.field.add(name=fname, number=num, type=ftype, label=label)
            if tname:
                f.type_name = tname
        return m

    opt, rep = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    msg("Value", [("node_name", 7, F.TYPE_STRING, opt, None),
                  ("tag", 1, F.TYPE_STRING, opt, None),
                  ("simple_value", 2, F.TYPE_FLOAT, opt, None)])
    msg("Summary", [("value", 1, F.TYPE_MESSAGE, rep, ".tbcheck.Value")])
    msg("SessionLog", [("status", 1, F.TYPE_INT32, opt, None),
                       ("checkpoint_path", 2, F.TYPE_STRING, opt, None),
                       ("msg", 3, F.TYPE_STRING, opt, None)])
    msg("Event", [("wall_time", 1, F.TYPE_DOUBLE, opt, None),
                  ("step", 2, F.TYPE_INT64, opt, None),
                  ("file_version", 3, F.TYPE_STRING, opt, None),
                  ("graph_def", 4, F.TYPE_BYTES, opt, None),
                  ("summary", 5, F.TYPE_MESSAGE, opt, ".tbcheck.Summary"),
                  ("session_log", 7, F.TYPE_MESSAGE, opt, ".tbcheck.SessionLog")])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    desc = pool.FindMessageTypeByName("tbcheck.Event")
    if hasattr(message_factory, "GetMessageClass"):
        return message_factory.GetMessageClass(desc)
    return message_factory.MessageFactory(pool).GetPrototype(desc)


Event = _messages()


def crc32c(data):
    """CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bit by bit."""
    c = 0xFFFFFFFF
    for b in data:
        c ^= b
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    return c ^ 0xFFFFFFFF


def masked(data):
    c = crc32c(data)
    return ((((c >> 15) | (c << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def write_events(path, events):
    """events framed as TFRecords."""
    with open(path, "wb") as f:
        for e in events:
            data = e.SerializeToString()
            head = struct.pack("<Q", len(data))
            f.write(head + struct.pack("<I", masked(head)) + data + struct.pack("<I", masked(data)))


def read_events(path):
    """Every record of a TFRecord file as an Event; raises on a bad frame."""
    events = []
    with open(path, "rb") as f:
        blob = f.read()
    off = 0
    while off < len(blob):
        head = blob[off:off + 12]
        if len(head) < 12:
            raise ValueError(f"{path}: torn record head at {off}")
        n, hcrc = struct.unpack("<QI", head)
        if hcrc != masked(head[:8]):
            raise ValueError(f"{path}: length crc wrong at {off}")
        data = blob[off + 12:off + 12 + n]
        (dcrc,) = struct.unpack("<I", blob[off + 12 + n:off + 16 + n])
        if dcrc != masked(data):
            raise ValueError(f"{path}: data crc wrong at {off}")
        e = Event()
        e.ParseFromString(data)
        events.append(e)
        off += 16 + n
    return events


VS = " vs samples"
# Megatron's training_log and evaluate_and_print_results write these beside
# their per-step tag as "<tag> vs samples", at the samples consumed so far
VS_TAGS = {"learning-rate", "batch-size", "lm loss", "loss-scale", "world-size", "grad-norm",
           "num-zeros", "params-norm", "lm loss validation", "lm loss validation ppl",
           "lm loss test", "lm loss test ppl"}


def is_vs(e):
    return any(v.tag.endswith(VS) for v in e.summary.value)


def scalars(events, vs=False):
    """{step: {tag: value}} of the events' summaries: the per-step tags', or
    with vs the "vs samples" ones' (step: the samples)."""
    out = {}
    for e in events:
        if e.HasField("summary") and is_vs(e) == vs:
            out.setdefault(e.step, {}).update({v.tag: v.simple_value for v in e.summary.value})
    return out


def as_tensorboard(files, vs=False):
    """The directory as TensorBoard's Python loader shows it: files in name
    order, and a SessionLog START at step s purges every tag's points at s
    and past it (the "vs samples" tags' too, at samples s)."""
    curve = {}
    for path in sorted(files):
        for e in read_events(path):
            if e.HasField("session_log") and e.session_log.status == 1:
                curve = {s: v for s, v in curve.items() if s < e.step}
            elif e.HasField("summary") and is_vs(e) == vs:
                curve.setdefault(e.step, {}).update(
                    {v.tag: v.simple_value for v in e.summary.value})
    return curve


def python_points(files):
    """The (step, tag) of every "vs samples" point the Python loader keeps,
    duplicates kept as its reservoirs keep them."""
    pts = []
    for path in sorted(files):
        for e in read_events(path):
            if e.HasField("session_log") and e.session_log.status == 1:
                pts = [p for p in pts if p[0] < e.step]
            elif e.HasField("summary") and is_vs(e):
                pts += [(e.step, v.tag) for v in e.summary.value]
    return pts


def per_tag(files, vs=True):
    """The directory as TensorBoard's Rust data server shows it: session
    starts skipped, and a tag's point at or below the tag's last step drops
    that tag's points at and past it."""
    tags = {}
    for path in sorted(files):
        for e in read_events(path):
            if e.HasField("summary") and is_vs(e) == vs:
                for v in e.summary.value:
                    pts = tags.setdefault(v.tag, {})
                    if pts and e.step <= max(pts):
                        pts = tags[v.tag] = {s: x for s, x in pts.items() if s < e.step}
                    pts[e.step] = v.simple_value
    curve = {}
    for tag, pts in tags.items():
        for s, x in pts.items():
            curve.setdefault(s, {})[tag] = x
    return curve


def close(a, b, rel=2e-7):
    return abs(a - b) <= rel * max(abs(a), abs(b)) + 1e-30


def f32(x):
    return struct.unpack("<f", struct.pack("<f", x))[0]


def json_steps(stdout):
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def mismatches(curve, lines, global_batch, world, vs_curve=None):
    """Where curve's scalars differ from the JSON step lines (log_interval 1,
    from step 1); with vs_curve, also where its "vs samples" points differ
    from the lines' at the samples read by the end of each line's step (the
    lines' batches added up), one is missing, or one is at no line's
    samples."""
    bad = []
    samples, at = 0, set()
    for s in lines:
        samples += s.get("global_batch", global_batch)
        at.add(samples)
        got = curve.get(s["step"])
        if got is None:
            bad.append(f"step {s['step']}: no event")
            continue
        want = {"learning-rate": s["lr"], "lm loss": s["loss"], "grad-norm": s["grad_norm"],
                "batch-size": s.get("global_batch", global_batch), "world-size": world,
                "iteration-time": s["step_ms"] / 1e3,
                "throughput": s["tflops"], "tokens-per-second": s["tokens_per_s"],
                "skipped-iterations": 1.0 if s["skipped"] else 0.0}
        if "params_norm" in s:
            want["params-norm"] = s["params_norm"]
        if "num_zeros" in s:
            want["num-zeros"] = s["num_zeros"]
        if "loss_scale" in s:
            want["loss-scale"] = s["loss_scale"]
        val = s.get("val_loss", s.get("final_val_loss"))  # the step's own first
        if val is not None:
            want["lm loss validation"] = val
            want["lm loss validation ppl"] = math.exp(min(val, 20.0))
        if "test_loss" in s:
            want["lm loss test"] = s["test_loss"]
            want["lm loss test ppl"] = math.exp(min(s["test_loss"], 20.0))
        if s["grad_norm"] is None:
            del want["grad-norm"]
        if vs_curve is not None:
            vs_want = {t + VS: v for t, v in want.items() if t in VS_TAGS}
            vs_got = vs_curve.get(samples, {})
            if set(vs_got) != set(vs_want):
                bad.append(f"step {s['step']} at {samples} samples: vs samples tags "
                           f"{sorted(vs_got)}, want {sorted(vs_want)}")
            for tag, v in vs_want.items():
                if tag in vs_got and not close(vs_got[tag], f32(v), 1e-6):
                    bad.append(f"{tag} at {samples}: event {vs_got[tag]} line {v}")
        for tag, v in want.items():
            # the step line prints 9 significant digits (step_ms 3 decimals,
            # tflops 6, tokens_per_s 3), the event holds a float32
            printed = {"iteration-time": 5e-7, "throughput": 5e-7, "tokens-per-second": 5e-4}
            if tag not in got or not (close(got[tag], f32(v), 1e-6) or
                                      abs(got[tag] - v) <= printed.get(tag, 0) + 1e-6 * abs(v)):
                bad.append(f"step {s['step']} {tag}: event {got.get(tag)} line {v}")
        extra = set(got) - set(want)
        if extra:
            bad.append(f"step {s['step']}: tags not on the line {sorted(extra)}")
    if vs_curve is not None and set(vs_curve) - at:
        bad.append(f"vs samples points at {sorted(set(vs_curve) - at)}, no step's samples")
    return bad


def run(cmd, ok=True):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if ok and out.returncode != 0:
        print(out.stdout[-2000:], out.stderr[-4000:])
        raise SystemExit(f"{cmd[0]} exited {out.returncode}")
    return out


def standalone(mtnlgd, prep, job, tmp):
    os.makedirs(tmp)
    failures = 0
    failures += check("test_crc32c_check_value", crc32c(b"123456789") == 0xE3069283)
    lic = [f for f in sorted(glob.glob("/usr/share/common-licenses/*"))
           if os.path.isfile(f) and not os.path.islink(f)]
    prefix = os.path.join(tmp, "licenses")
    run([prep, "--quiet", "--tokenizer", "bytes", "--format", "text", "--text-docs",
         "paragraph", "--input", *lic, "--output-prefix", prefix])
    tb = os.path.join(tmp, "tb", "run")  # two levels made
    data = {"prefix": prefix, "split": "90,8,2", "cache_dir": os.path.join(tmp, "cache")}
    base = [mtnlgd, "--standalone", job, "--log-format", "json",
            "--set", "data=" + json.dumps(data), "--set", "model.vocab_size=257",
            "--set", "train.steps=8", "--set", "train.lr.warmup_steps=2",
            "--set", "train.log_interval=1", "--set", "train.precision=fp16",
            "--set", "train.log_params_norm=true", "--set", "parallel.tp=2",
            "--set", "train.log_num_zeros_in_grad=true",
            # steps 1 to 4 overflow (no grad-norm or num-zeros), 5 to 8 apply
            "--set", "train.loss_scale.initial=1048576",
            "--set", 'eval={"interval": 4, "iters": 1}',
            "--set", f"checkpoint.dir={tmp}/ckpt", "--set", "checkpoint.interval=3",
            "--set", f"train.tensorboard_dir={tb}"]
    first = run(base)
    with open(job) as f:
        gb = json.load(f)["train"]["global_batch"]
    lines = json_steps(first.stdout)
    files = sorted(glob.glob(os.path.join(tb, "events.out.tfevents.*")))
    failures += check("test_one_events_file_per_run", len(files) == 1, str(files))
    if not files:
        return failures + 1
    events = read_events(files[0])
    failures += check("test_first_event_is_the_file_version",
                      events[0].file_version == "brain.Event:2", str(events[0]))
    bad = mismatches(scalars(events), lines, gb, 2, scalars(events, vs=True))
    failures += check("test_scalars_and_vs_samples_equal_the_step_lines",
                      not bad and len(lines) == 8 and any("val_loss" in s for s in lines)
                      and any(s["skipped"] for s in lines) and any("num_zeros" in s for s in lines)
                      and "test_loss" in lines[-1] and any("loss_scale" in s for s in lines),
                      "; ".join(bad[:6]))
    failures += check("test_steps_in_order_one_event_each_then_its_vs_samples",
                      [e.step for e in events if e.HasField("summary")] ==
                      [x for k in range(1, 9) for x in (k, k * gb)])

    # a rollback to step 3 (interval 3) that stops after step 5
    # (train.exit_interval): the second file starts a session at 4, and steps
    # 6 to 8 of the first run are no longer part of the curve
    # the first file as another node with its clock 1000 s ahead would have
    # named it: the second must still sort after it, read last
    ahead = os.path.join(tb, "events.out.tfevents.%d.ahead.1.0" % (int(time.time()) + 1000))
    os.rename(files[0], ahead)
    # a foreign file (sorting first) whose 40 "vs samples" tags are none of
    # ours, at samples the rollback carries: none of them is written again
    foreign = os.path.join(tb, "events.out.tfevents.0.foreign.1.0")
    e = Event(step=2 * gb)
    for k in range(40):
        e.summary.value.add(tag=f"foreign-{k}" + VS, simple_value=float(k))
    write_events(foreign, [Event(file_version="brain.Event:2"), e])
    second = run(base + ["--set", "checkpoint.resume_step=3", "--set", "train.exit_interval=5"])
    os.unlink(foreign)
    files = sorted(glob.glob(os.path.join(tb, "events.out.tfevents.*")))
    failures += check("test_resume_writes_a_second_file_sorting_after_the_first",
                      len(files) == 2 and files[0] == ahead, str(files))
    again = json_steps(second.stdout)
    if len(files) == 2:
        starts = [e.step for e in read_events(files[1])
                  if e.HasField("session_log") and e.session_log.status == 1]
        failures += check("test_resume_starts_a_session_at_its_first_step", starts == [4],
                          str(starts))
        curve = as_tensorboard(files)
        merged = [s for s in lines if s["step"] <= 3] + again
        # the "vs samples" tags as the Rust data server reads them: each
        # tag's first point below its last drops its points past it, so the
        # first run's points past the rollback stay only for tags the second
        # run wrote nothing under (its test pass at step 8; grad-norm and
        # num-zeros, when the second run's steps overflowed), as the
        # per-step tags' do there (README)
        vs = per_tag(files)
        past = {t for s, v in vs.items() if s > 5 * gb for t in v}
        second = set(t for v in scalars(read_events(files[1]), vs=True).values() for t in v)
        vs = {s: v for s, v in vs.items() if s <= 5 * gb}
        bad = mismatches(curve, merged, gb, 2, vs)
        failures += check("test_directory_reads_as_the_run_rolled_back",
                          not bad and sorted(curve) == list(range(1, 6))
                          and sorted(vs) == [k * gb for k in range(1, 6)]
                          and {"lm loss test" + VS, "lm loss test ppl" + VS} <= past
                          and not past & second
                          and [s["step"] for s in again] == [4, 5],
                          "; ".join(bad[:6]) + f" steps {sorted(curve)}, samples {sorted(vs)}, "
                          f"past the rollback {sorted(past)}")
        # the Python loader's session start at step 4 drops every tag's
        # points at 4 and past, the "vs samples" ones at 4 samples and past
        # too (all the first run's): the second file writes those of steps 1
        # to 3 again after it, so they read as the run rolled back there too
        py = as_tensorboard(files, vs=True)
        bad = mismatches(curve, merged, gb, 2, py)
        again_vs = [e.step for e in read_events(files[1]) if e.HasField("summary") and is_vs(e)]
        pts = python_points(files)
        tags2 = {v.tag for e in read_events(files[1]) if e.HasField("summary") and is_vs(e)
                 for v in e.summary.value}
        failures += check("test_python_loader_reads_vs_samples_as_the_run_rolled_back",
                          not bad and sorted(py) == [k * gb for k in range(1, 6)]
                          and len(pts) == len(set(pts))
                          and tags2 <= {t + VS for t in VS_TAGS}
                          and again_vs == [gb, 2 * gb, 3 * gb, 4 * gb, 5 * gb],
                          "; ".join(bad[:6]) + f" samples {sorted(py)}, the second file's "
                          f"{again_vs}")
        # the job finished from the second run's step 5: a resume that goes
        # on where the files end (as a resize does) is no rollback, and
        # writes no session start and no "vs samples" point again
        # a FIFO of an events file's name, which a blocking open would wait
        # on for ever, is passed over
        fifo = os.path.join(tb, "events.out.tfevents.0.fifo.1.0")
        os.mkfifo(fifo)
        third = run(base)
        os.unlink(fifo)
        files = sorted(glob.glob(os.path.join(tb, "events.out.tfevents.*")))
        rest = json_steps(third.stdout)
        if len(files) == 3:
            ev = read_events(files[2])
            starts = [e.step for e in ev if e.HasField("session_log")]
            steps = [e.step for e in ev if e.HasField("summary")]
            merged = merged + rest
            curve = as_tensorboard(files)
            py = as_tensorboard(files, vs=True)
            bad = mismatches(curve, merged, gb, 2, py)
            pts = python_points(files)
        failures += check("test_a_continuing_run_writes_no_session_start_nor_old_points",
                          len(files) == 3 and not starts
                          and steps == [x for k in (6, 7, 8) for x in (k, k * gb)]
                          and [s["step"] for s in rest] == [6, 7, 8]
                          and not bad and sorted(curve) == list(range(1, 9))
                          and sorted(py) == [k * gb for k in range(1, 9)]
                          and len(pts) == len(set(pts)),
                          f"{len(files)} files; third: starts {starts if len(files) == 3 else ''} "
                          f"steps {steps if len(files) == 3 else ''} lines "
                          f"{[s['step'] for s in rest]}; " + "; ".join(bad[:6]))
    return failures


def rampup(mtnlgd, job, tmp):
    """A batch ramped up (train.rampup_batch, Megatron's --rampup-batch-size
    4 4 24 to the job's 16): the batch-size tag follows the lines' global
    batch and every "vs samples" point is at the samples read so far."""
    os.makedirs(tmp)
    tokens = license_tokens(os.path.join(tmp, "tokens.u16"))
    tb = os.path.join(tmp, "tb")
    out = run([mtnlgd, "--standalone", job, "--log-format", "json",
               "--set", f"data.path={tokens}", "--set", "train.steps=5",
               "--set", "train.lr.warmup_steps=1", "--set", "train.log_interval=1",
               "--set", "parallel.micro_batch=4",
               "--set", 'train.rampup_batch={"start": 4, "increment": 4, "samples": 24}',
               "--set", f"train.tensorboard_dir={tb}"])
    lines = json_steps(out.stdout)
    files = sorted(glob.glob(os.path.join(tb, "events.out.tfevents.*")))
    events = read_events(files[0]) if len(files) == 1 else []
    with open(job) as f:
        gb = json.load(f)["train"]["global_batch"]
    bad = mismatches(scalars(events), lines, gb, 1, scalars(events, vs=True))
    batches = [s.get("global_batch") for s in lines]
    return check("test_rampup_vs_samples_at_the_samples_read",
                 len(files) == 1 and not bad and len(set(batches)) > 2,
                 "; ".join(bad[:6]) + f" batches {batches}")


def refusals(mtnlgd, job, tmp):
    os.makedirs(tmp)
    failures = 0
    tokens = license_tokens(os.path.join(tmp, "tokens.u16"))
    blocker = os.path.join(tmp, "a-file")
    with open(blocker, "w") as f:
        f.write("not a directory\n")
    cmd = [mtnlgd, "--standalone", job, "--set", f"data.path={tokens}",
           "--set", "train.steps=3", "--set", "train.lr.warmup_steps=1",
           "--set", "train.log_interval=1"]
    out = run(cmd + ["--set", f"train.tensorboard_dir={blocker}/tb"], ok=False)
    failures += check("test_unwritable_dir_warns_and_trains_on",
                      out.returncode == 0 and "tensorboard:" in out.stderr
                      and "training goes on without TensorBoard" in out.stderr
                      and "step      3/3" in out.stdout, out.stderr[-800:])
    out = run(cmd + ["--set", "train.tensorboard_dir="], ok=False)
    failures += check("test_empty_dir_is_refused_naming_the_key",
                      out.returncode == 2 and "train.tensorboard_dir: must not be empty" in
                      out.stderr, out.stderr[-800:])
    before = set(os.listdir(tmp))
    out = run(cmd + ["--set", "checkpoint.dir=" + os.path.join(tmp, "plain")], ok=False)
    made = glob.glob(os.path.join(tmp, "**", "events.out.tfevents.*"), recursive=True)
    failures += check("test_no_dir_no_events", out.returncode == 0 and not made,
                      f"{out.returncode} {made} {sorted(set(os.listdir(tmp)) - before)}")
    return failures


def cluster(mtnlgd, tmp):
    os.makedirs(tmp)
    failures = 0
    tokens = license_tokens(os.path.join(tmp, "ctokens.u16"))
    tb = os.path.join(tmp, "ctb")
    job = tiny_job(os.path.join(tmp, "cjob.json"), tokens, "tb-cluster", 6,
                   train={"global_batch": 8, "steps": 6, "seed": 7, "log_interval": 1,
                          "tensorboard_dir": tb,
                          "lr": {"schedule": "cosine", "peak": 3e-3, "min": 3e-4,
                                 "warmup_steps": 3}})
    c = LocalCluster(mtnlgd, os.path.join(tmp, "nodes"), job, nodes=2, devices="cpu:4")
    try:
        c.start()
        codes = c.wait_all(120)  # under meson's 180 s, so a hang shows the logs
    finally:
        c.stop()
    ran = all(code == 0 for code in codes)
    failures += check("test_cluster_ran", ran, "" if ran else c.logs())
    files = sorted(glob.glob(os.path.join(tb, "events.out.tfevents.*")))
    failures += check("test_cluster_writes_one_file", len(files) == 1, str(files))
    if len(files) == 1:
        n0 = c.nodes[0]
        failures += check("test_the_file_is_world_rank_0s",
                          files[0].split(".")[-2] == str(n0.pid), f"{files[0]} n0 pid {n0.pid}")
        lines = json_steps(n0.stdout())
        curve = scalars(read_events(files[0]))
        want = {s["step"]: s["loss"] for s in lines}
        got = {s: v.get("lm loss") for s, v in curve.items()}
        failures += check("test_cluster_losses_are_n0s_lines",
                          sorted(got) == list(range(1, 7)) and
                          all(close(got[s], f32(want[s]), 1e-6) for s in want),
                          f"{got} {want}")
        worlds = {v.get("world-size") for v in curve.values()}
        failures += check("test_cluster_world_size_is_its_8_ranks", worlds == {8.0}, str(worlds))
    return failures


def held_disk(mtnlgd, job, tmp, preload):
    """The events file's write(2) held by fault_preload until the run has
    left its writer: the steps go on (before the writer thread, step 1's
    write held the run), the run's end leaves the writer after 2 s, and
    the exit then waits for it: once the disk is released, the file gets
    every step and the daemon exits 0."""
    os.makedirs(tmp)
    tokens = license_tokens(os.path.join(tmp, "tokens.u16"))
    tb = os.path.join(tmp, "tb")
    release = os.path.join(tmp, "release")
    env = dict(os.environ, LD_PRELOAD=preload, MTNLG_FAULT_HOLD_WRITE_FILE="events.out.tfevents.",
               MTNLG_FAULT_HOLD_UNTIL=release)
    cmd = [mtnlgd, "--standalone", job, "--log-format", "json", "--set", f"data.path={tokens}",
           "--set", "train.steps=6", "--set", "train.lr.warmup_steps=1",
           "--set", "train.log_interval=1", "--set", f"train.tensorboard_dir={tb}"]
    t0 = time.monotonic()
    with open(os.path.join(tmp, "out"), "w+") as out, open(os.path.join(tmp, "err"), "w+") as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        left = []
        while not left and p.poll() is None and time.monotonic() - t0 < 30:
            time.sleep(0.05)
            err.seek(0)
            left = [x for x in err.read().splitlines() if "did not finish within 2000 ms" in x]
        open(release, "w").close()
        try:
            rc = p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = p.wait()
        took = time.monotonic() - t0
        out.seek(0), err.seek(0)
        so, se = out.read(), err.read()
    steps = [s["step"] for s in json_steps(so)]
    files = glob.glob(os.path.join(tb, "events.out.tfevents.*"))
    written = [e.step for e in read_events(files[0]) if not e.file_version and not is_vs(e)
               ] if len(files) == 1 else []
    return check("test_a_held_events_write_holds_no_step",
                 rc == 0 and steps == list(range(1, 7)) and took < 25
                 and "fault_preload: holding write(2) to" in se
                 and len(left) == 1 and "6 steps' points from step 1 on" in left[0]
                 and "writer caught up after its run ended" in se and written == list(range(1, 7)),
                 f"exit {rc} in {took:.1f} s, steps {steps}, {left}, written {written}"
                 + se[-600:] * (not left))


def main():
    mtnlgd, prep, job = sys.argv[1:4]
    preload = sys.argv[4] if len(sys.argv) > 4 else None
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        try:
            failures += standalone(mtnlgd, prep, job, os.path.join(tmp, "standalone"))
            failures += rampup(mtnlgd, job, os.path.join(tmp, "rampup"))
            failures += refusals(mtnlgd, job, os.path.join(tmp, "refusals"))
            failures += cluster(mtnlgd, os.path.join(tmp, "cluster"))
            if preload:
                failures += held_disk(mtnlgd, job, os.path.join(tmp, "held"), preload)
        except ValueError as e:  # an events file that does not read back
            failures += check("test_events_files_read_back", False, str(e))
    print("FAILED" if failures else "all passed", failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
