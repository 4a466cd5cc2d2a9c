"""train.tensorboard_dir (Megatron's --tensorboard-dir): TensorBoard event
files of the run's scalars, read back here with Google's protobuf runtime.

usage: test_tensorboard.py MTNLGD MTNLG_PREPROCESS JOB.json
The event files are parsed with python3-protobuf against message types
declared here from tensorboard's event.proto and summary.proto (field
numbers and types as published), and every record's framing is checked
with a CRC-32C computed bit by bit here (itself checked on the standard
check value). Checked:
  - standalone, fp16 with validation and params norm, 8 steps: one file
    per process, its first event the file version, then one event per step
    whose learning-rate, lm loss, grad-norm, params-norm, loss-scale,
    batch-size and iteration-time equal the step's JSON line (float32
    rounding), with "lm loss validation" and its perplexity where the line
    has val_loss (or only the end of training's, final_val_loss), and "lm
    loss test" where it has test_loss;
  - a rollback to an earlier checkpoint (checkpoint.resume_step 3) that
    stops at step 5 (train.exit_interval) writes a second file that starts a
    session at step 4, named to sort after the first even when that one's
    name is 1000 s ahead (another node's clock): read as TensorBoard reads a directory (files in name
    order, a session start dropping the points at and past its step), the
    curve is the first run's to step 3, then the second run's, and the first
    run's steps 6 to 8 are gone;
  - a local cluster of 2 node daemons (tp 2 x pp 2 x dp 2 over their 8
    ranks) writes exactly one file, from n0 (world rank 0), whose losses
    are n0's step lines;
  - a tensorboard_dir that cannot be made is warned of and the run trains
    on to the end (exit 0); an empty tensorboard_dir is refused naming the
    key; a job without it writes nothing.
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


def scalars(events):
    """{step: {tag: value}} of the events' summaries."""
    out = {}
    for e in events:
        if e.HasField("summary"):
            out.setdefault(e.step, {}).update({v.tag: v.simple_value for v in e.summary.value})
    return out


def as_tensorboard(files):
    """The directory as TensorBoard shows it: files in name order, and a
    SessionLog START at step s purges the points at s and past it."""
    curve = {}
    for path in sorted(files):
        for e in read_events(path):
            if e.HasField("session_log") and e.session_log.status == 1:
                curve = {s: v for s, v in curve.items() if s < e.step}
            elif e.HasField("summary"):
                curve.setdefault(e.step, {}).update(
                    {v.tag: v.simple_value for v in e.summary.value})
    return curve


def close(a, b, rel=2e-7):
    return abs(a - b) <= rel * max(abs(a), abs(b)) + 1e-30


def f32(x):
    return struct.unpack("<f", struct.pack("<f", x))[0]


def json_steps(stdout):
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def mismatches(curve, lines, global_batch):
    """Where curve's scalars differ from the JSON step lines (log_interval 1)."""
    bad = []
    for s in lines:
        got = curve.get(s["step"])
        if got is None:
            bad.append(f"step {s['step']}: no event")
            continue
        want = {"learning-rate": s["lr"], "lm loss": s["loss"], "grad-norm": s["grad_norm"],
                "batch-size": global_batch, "iteration-time": s["step_ms"] / 1e3,
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
    bad = mismatches(scalars(events), lines, gb)
    failures += check("test_scalars_equal_the_step_lines",
                      not bad and len(lines) == 8 and any("val_loss" in s for s in lines)
                      and "test_loss" in lines[-1] and any("loss_scale" in s for s in lines),
                      "; ".join(bad[:6]))
    failures += check("test_steps_in_order_one_event_each",
                      [e.step for e in events if e.HasField("summary")] == list(range(1, 9)))

    # a rollback to step 3 (interval 3) that stops after step 5
    # (train.exit_interval): the second file starts a session at 4, and steps
    # 6 to 8 of the first run are no longer part of the curve
    # the first file as another node with its clock 1000 s ahead would have
    # named it: the second must still sort after it, read last
    ahead = os.path.join(tb, "events.out.tfevents.%d.ahead.1.0" % (int(time.time()) + 1000))
    os.rename(files[0], ahead)
    second = run(base + ["--set", "checkpoint.resume_step=3", "--set", "train.exit_interval=5"])
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
        bad = mismatches(curve, merged, gb)
        failures += check("test_directory_reads_as_the_run_rolled_back",
                          not bad and sorted(curve) == list(range(1, 6))
                          and [s["step"] for s in again] == [4, 5],
                          "; ".join(bad[:6]) + f" steps {sorted(curve)}")
    return failures


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
    return failures


def main():
    mtnlgd, prep, job = sys.argv[1:4]
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        try:
            failures += standalone(mtnlgd, prep, job, os.path.join(tmp, "standalone"))
            failures += refusals(mtnlgd, job, os.path.join(tmp, "refusals"))
            failures += cluster(mtnlgd, os.path.join(tmp, "cluster"))
        except ValueError as e:  # an events file that does not read back
            failures += check("test_events_files_read_back", False, str(e))
    print("FAILED" if failures else "all passed", failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
