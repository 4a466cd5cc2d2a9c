#!/usr/bin/python3
"""test_tboard.py — TensorBoard's file work is off the step thread.

usage: test_tboard.py path/to/tboard_stuck
tboard_stuck (tests/unit/tboard_stuck.c) points a writer at a pipe whose
buffer is full, so the writer thread's first write(2) blocks in the kernel
as one to a hung network mount does, steps it MT_TBOARD_QUEUE (4096) + 1000
times, frees it, starts a second writer for the same directory, and only
then drains the pipe. Checked here, from what it prints and the bytes the
pipe carried (read with tests/cluster/test_tensorboard.py's reader, every
record's CRCs checked):
  - test_steps_return_while_the_disk_holds_the_writer: no mt_tboard_step
    call took 100 ms (a blocking one would never return: SIGALRM at 60 s);
  - test_the_newest_points_past_the_queue_are_dropped_and_counted: 1000
    dropped (1001 when the writer had not yet taken the first point), the
    process-wide count the same;
  - test_the_drop_is_said_once: one line for 1000 drops in well under a
    minute, one total at the free;
  - test_free_returns_within_its_bound: mt_tboard_free waited its 2 s, not
    more, and said what the left writer still held;
  - test_a_new_writer_opens_nothing_while_an_older_one_is_held: the second
    writer for the directory made no file while the first was held, then
    its file (steps 1 to 3) once the first had ended;
  - test_the_left_writer_writes_its_points_in_order_once_released: the pipe
    carried the file version, then for each step kept, in order, its event
    (lm loss the step's, as float32) and its vs-samples event at 8 samples a
    step, and no session start; the steps kept are 1..4096 and, when the
    writer took step 1 off the queue before it filled, one step after them
    (the newest are dropped, never the oldest), 5096 - dropped in all.
"""
import os
import struct
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "cluster"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
try:
    import test_tensorboard as tb  # noqa: E402
except ImportError as e:
    print(f"SKIP: the events reader needs python3-protobuf ({e})")
    sys.exit(77)

QUEUE = 4096


def f32(x):
    return struct.unpack("<f", struct.pack("<f", x))[0]


def main():
    failures = 0

    def check(name, ok, detail=""):
        nonlocal failures
        print(("ok " if ok else "FAIL ") + name + (": " + str(detail) if detail else ""))
        failures += not ok

    with tempfile.TemporaryDirectory() as tmp:
        d = os.path.join(tmp, "tb")
        p = subprocess.run([sys.argv[1], d], capture_output=True, text=True, timeout=90)
        if p.returncode:
            print(f"FAIL tboard_stuck exited {p.returncode}\n{p.stdout}\n{p.stderr}")
            return 1
        r = dict(line.split("=", 1) for line in p.stdout.splitlines())
        steps, dropped = int(r["steps"]), int(r["dropped"])
        print(p.stdout.strip())
        check("test_steps_return_while_the_disk_holds_the_writer",
              float(r["max_step_us"]) < 100e3,
              f"slowest of {steps} steps {r['max_step_us']} us, all {r['all_steps_ms']} ms")
        check("test_the_newest_points_past_the_queue_are_dropped_and_counted",
              steps - QUEUE - 1 <= dropped <= steps - QUEUE
              and int(r["dropped_total"]) == dropped, f"{dropped} of {steps}")
        log = p.stderr.splitlines()
        behind = [x for x in log if "steps behind" in x or "still behind" in x]
        total = [x for x in log if "were dropped in all" in x]
        check("test_the_drop_is_said_once", len(behind) == 1 and len(total) == 1
              and f"{dropped} steps' points" in total[0], behind + total)
        left = [x for x in log if "did not finish within 2000 ms" in x]
        check("test_free_returns_within_its_bound",
              2000 <= float(r["free_ms"]) < 2500 and len(left) == 1
              and f"{steps - dropped} steps' points from step 1 on" in left[0],
              f"{r['free_ms']} ms; {left}")
        files = sorted(f for f in os.listdir(d) if f.startswith("events.out.tfevents."))
        ev2 = tb.read_events(os.path.join(d, files[0])) if len(files) == 1 else []
        check("test_a_new_writer_opens_nothing_while_an_older_one_is_held",
              r["files_while_held"] == "0" and
              [e.step for e in ev2 if e.HasField("summary") and not tb.is_vs(e)] == [1, 2, 3],
              f"{r['files_while_held']} files while held, then {files}")
        ev = tb.read_events(r["stuck_file"])
        got, bad = [], []
        for e in ev:
            if e.file_version:
                got.append(("version", e.step))
            elif e.HasField("session_log"):
                got.append(("session", e.step))
            elif tb.is_vs(e):
                got.append(("vs", e.step))
            else:
                got.append(("step", e.step))
                loss = {v.tag: v.simple_value for v in e.summary.value}.get("lm loss")
                if loss != f32(10.0 - 1e-3 * e.step):
                    bad.append((e.step, loss))
        # the newest dropped: steps 1..QUEUE, and one step past them when the
        # writer took step 1 off the queue before the steps ran past it
        kept = [s for kind, s in got if kind == "step"]
        k = steps - dropped
        want_kept = list(range(1, QUEUE + 1)) + (kept[QUEUE:] if k == QUEUE + 1 and len(kept) == k
                                                 and QUEUE < kept[QUEUE] <= steps else [])
        want = [("version", 0)]
        for s in want_kept:
            want += [("step", s), ("vs", 8 * s)]
        check("test_the_left_writer_writes_its_points_in_order_once_released",
              got == want and len(want_kept) == k and not bad
              and ev[0].file_version == "brain.Event:2",
              f"{len(got)} events, {k} steps, the last {kept[-1:]}; first differing "
              f"{next((i, g, w) for i, (g, w) in enumerate(zip(got + [None], want + [None])) if g != w) if got != want else None}; "
              f"bad losses {bad[:3]}; drained in {r['drain_ms']} ms")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
