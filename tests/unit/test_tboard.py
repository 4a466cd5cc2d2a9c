#!/usr/bin/python3
"""test_tboard.py — TensorBoard's file work is off the step thread.

usage: test_tboard.py path/to/tboard_stuck path/to/fault_preload.so
tboard_stuck (tests/unit/tboard_stuck.c) runs under fault_preload, which
holds every write(2) to the first writer's events file (named for unix time
4000000001, past a file planted here for 4000000000) until a release file
exists, as a hung network mount holds an append. It steps that writer
MT_TBOARD_QUEUE (4096) + 1000 times, frees it, starts a second writer for
the same directory with steps 5 to 7 of a run rolled back to step 4, frees
that one too, and only then releases the disk. Then, in a second run, a
slow disk (each write 100 us late) under steps faster than it. Checked
here, from what it prints and the files it leaves (read with
tests/cluster/test_tensorboard.py's reader, every record's CRCs checked):
  - test_steps_return_while_the_disk_holds_the_writer: no mt_tboard_step
    call took 1 s (a blocking one would never return: SIGALRM at 60 s);
  - test_the_newest_points_past_the_queue_are_dropped_and_counted: 1000
    dropped (999 when the writer had taken the first point off the queue
    before it filled), the process-wide count the same;
  - test_the_drop_is_said_once: one line for 1000 drops in well under a
    minute, one total at the free;
  - test_free_returns_within_its_bound: mt_tboard_free waited its 2 s, not
    much more (under 4 s), and said what the left writer still held;
    mt_tboard_wait_left(200) then found it still live and said so;
  - test_a_writer_behind_an_older_one_is_left_at_once: the second writer's
    free, while it still waited for the held one, returned at once (under
    1 s, not after 2 s) saying so and what it held;
  - test_a_new_writer_opens_nothing_while_an_older_one_is_held: the second
    writer made no file while the first was held, and its own once the
    first had ended; mt_tboard_wait_left(30000) then found none left;
  - test_the_left_writer_writes_its_points_in_order_once_released: the
    first file holds the file version, then for each step kept, in order,
    its event (lm loss the step's, as float32) and its vs-samples event at
    8 samples a step, and no session start; the steps kept are 1..4096 and,
    when the writer took step 1 off the queue before it filled, one step
    after them (the newest are dropped, never the oldest), 5096 - dropped;
    and the log says both left writers caught up;
  - test_the_new_writers_rollback_reads_the_left_writers_points: the
    second file starts a session at step 5 (the directory, once the first
    writer has ended, shows steps past it), writes again the first run's
    "vs samples" points at 8 to 32 samples (steps 1 to 4), then steps 5 to
    7; read as TensorBoard's Python loader reads the directory, steps 1 to 4
    are the first run's, 5 to 7 the second's, and nothing past 7;
  - test_a_slow_disk_drops_whole_runs_and_reads_the_directory_once: some
    steps dropped, every run of kept steps but the last at least 2048 long
    (a full queue drops until half of it is written), the file's events
    those steps' in order with no session start, the first step and the
    last (let in once the writer was down to half) kept, one directory
    read over the writer's life, no writer left at the end.
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


def kinds(events, loss0, bad):
    """[(kind, step)] of a file's events; a per-step event's lm loss not
    f32(loss0 - 1e-3 * step) goes to bad."""
    got = []
    for e in events:
        if e.file_version:
            got.append(("version", e.step))
        elif e.HasField("session_log"):
            got.append(("session", e.step))
        elif tb.is_vs(e):
            got.append(("vs", e.step))
        else:
            got.append(("step", e.step))
            loss = {v.tag: v.simple_value for v in e.summary.value}.get("lm loss")
            if loss != f32(loss0 - 1e-3 * e.step):
                bad.append((e.step, loss))
    return got


def first_difference(got, want):
    for i, (g, w) in enumerate(zip(got + [None], want + [None])):
        if g != w:
            return i, g, w
    return None


def preload_list(exe, preload):
    """LD_PRELOAD for exe under fault_preload: in an ASan build (tools/test's
    build-asan) exe links libasan, whose runtime must come first in the
    library list or it refuses to start, so it goes ahead of the preload."""
    try:
        ldd = subprocess.run(["ldd", exe], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        ldd = ""
    asan = [f.split("=>")[1].split()[0] for f in ldd.splitlines()
            if "libasan.so" in f and "=>" in f]
    return ":".join(asan[:1] + [preload])


def main():
    failures = 0

    def check(name, ok, detail=""):
        nonlocal failures
        print(("ok " if ok else "FAIL ") + name + (": " + str(detail) if detail else ""))
        failures += not ok

    with tempfile.TemporaryDirectory() as tmp:
        d = os.path.join(tmp, "tb")
        os.makedirs(d)
        open(os.path.join(d, "events.out.tfevents.4000000000.planted.0.0"), "wb").close()
        env = dict(os.environ, LD_PRELOAD=preload_list(sys.argv[1], sys.argv[2]),
                   MTNLG_FAULT_HOLD_WRITE_FILE="tfevents.4000000001.",
                   MTNLG_FAULT_HOLD_UNTIL=os.path.join(tmp, "release"))
        p = subprocess.run([sys.argv[1], d, os.path.join(tmp, "release")], capture_output=True,
                           text=True, timeout=90, env=env)
        if p.returncode:
            print(f"FAIL tboard_stuck exited {p.returncode}\n{p.stdout}\n{p.stderr}")
            return 1
        r = dict(line.split("=", 1) for line in p.stdout.splitlines())
        steps, dropped = int(r["steps"]), int(r["dropped"])
        print(p.stdout.strip())
        log = p.stderr.splitlines()
        # a step that blocked would never return (SIGALRM at 60 s); the bound
        # only catches one that waits out a timeout, not a loaded machine
        check("test_steps_return_while_the_disk_holds_the_writer",
              float(r["max_step_us"]) < 1e6
              and any("fault_preload: holding write(2) to" in x for x in log),
              f"slowest of {steps} steps {r['max_step_us']} us, all {r['all_steps_ms']} ms")
        check("test_the_newest_points_past_the_queue_are_dropped_and_counted",
              steps - QUEUE - 1 <= dropped <= steps - QUEUE
              and int(r["dropped_total"]) == dropped, f"{dropped} of {steps}")
        behind = [x for x in log if "steps behind" in x or "still behind" in x]
        total = [x for x in log if "were dropped in all" in x]
        check("test_the_drop_is_said_once", len(behind) == 1 and len(total) == 1
              and f"{dropped} steps' points" in total[0], behind + total)
        left = [x for x in log if "did not finish within 2000 ms" in x]
        still = [x for x in log if "1 writer is still held by the file system after 200 ms" in x]
        check("test_free_returns_within_its_bound",
              2000 <= float(r["free_ms"]) < 4000 and len(left) == 1
              and f"{steps - dropped} steps' points from step 1 on" in left[0]
              and r["left_held"] == "1" and len(still) == 1,
              f"{r['free_ms']} ms; {left}; wait_left(200) found {r['left_held']} left, {still}")
        waits = [x for x in log if "writer waits for an older writer of the directory" in x]
        check("test_a_writer_behind_an_older_one_is_left_at_once",
              float(r["free2_ms"]) < 1000 and len(waits) == 1
              and "3 steps' points from step 5 on" in waits[0],
              f"the second free {r['free2_ms']} ms; {waits}")
        files = sorted(os.path.join(d, f) for f in os.listdir(d)
                       if f.startswith("events.out.tfevents."))
        old = [f for f in files if ".4000000001." in f]
        new = [f for f in files if ".4000000002." in f]
        check("test_a_new_writer_opens_nothing_while_an_older_one_is_held",
              r["files_while_held"] == "2" and r["files_after"] == "3" and len(old) == 1
              and len(new) == 1 and r["left_end"] == "0",
              f"{r['files_while_held']} files while held (the planted and the held one), "
              f"then {[os.path.basename(f) for f in files]} ({r['second_wrote_ms']} ms after the "
              f"release); writers left at the end: {r['left_end']}")
        if len(old) != 1 or len(new) != 1:
            return 1

        bad = []
        got = kinds(tb.read_events(old[0]), 10.0, bad)
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
              and sum("writer caught up after its run ended" in x for x in log) == 2,
              f"{len(got)} events, {k} steps, the last {kept[-1:]}; first differing "
              f"{first_difference(got, want)}; bad losses {bad[:3]}")

        bad2 = []
        ev2 = tb.read_events(new[0])
        got2 = kinds(ev2, 20.0, bad2)
        want2 = [("version", 0), ("session", 5)] + [("vs", 8 * s) for s in range(1, 5)]
        for s in range(5, 8):
            want2 += [("step", s), ("vs", 8 * s)]
        carried = tb.scalars(ev2, vs=True)
        carried_ok = all(carried.get(8 * s, {}).get("lm loss vs samples") == f32(10.0 - 1e-3 * s)
                         for s in range(1, 5))
        curve = tb.as_tensorboard(files)
        losses = {s: v.get("lm loss") for s, v in curve.items()}
        want_losses = {s: f32((10.0 if s < 5 else 20.0) - 1e-3 * s) for s in range(1, 8)}
        check("test_the_new_writers_rollback_reads_the_left_writers_points",
              got2 == want2 and not bad2 and carried_ok and losses == want_losses,
              f"first differing {first_difference(got2, want2)}; bad losses {bad2[:3]}; "
              f"carried {carried_ok}; the directory's steps {sorted(losses)[:10]}"
              f"{'...' if len(losses) > 10 else ''}")
        slow_disk(sys.argv[1], sys.argv[2], os.path.join(tmp, "slow"), check)
    return 1 if failures else 0


def slow_disk(stuck, preload, d, check):
    """A slow disk, not a stuck one: each write(2) to the events file sleeps
    100 us, the steps come faster than the writer writes them. The queue
    fills once; the drops then last until half of it is written, so each
    run of kept steps but the last is at least half the queue long (no comb
    of single steps let in as single slots free), and the writer reads the
    directory once, for its first step, not again past each gap."""
    os.makedirs(d)
    open(os.path.join(d, "events.out.tfevents.4000000000.planted.0.0"), "wb").close()
    env = dict(os.environ, LD_PRELOAD=preload_list(stuck, preload),
               MTNLG_FAULT_HOLD_WRITE_FILE="tfevents.4000000001.",
               MTNLG_FAULT_WRITE_DELAY_US="100")
    env.pop("MTNLG_FAULT_HOLD_UNTIL", None)
    p = subprocess.run([stuck, "slow", d], capture_output=True, text=True, timeout=90, env=env)
    if p.returncode:
        check("tboard_stuck_slow", False, f"exited {p.returncode}\n{p.stdout}\n{p.stderr}")
        return
    r = dict(line.split("=", 1) for line in p.stdout.splitlines())
    print(p.stdout.strip())
    steps, dropped = int(r["steps"]), int(r["dropped"])
    files = [os.path.join(d, f) for f in os.listdir(d) if ".4000000001." in f]
    bad = []
    got = kinds(tb.read_events(files[0]), 10.0, bad) if len(files) == 1 else []
    kept = [s for kind, s in got if kind == "step"]
    runs = []
    for s in kept:
        if runs and s == runs[-1][1] + 1:
            runs[-1][1] = s
        else:
            runs.append([s, s])
    lens = [b - a + 1 for a, b in runs]
    want = [("version", 0)]
    for s in kept:
        want += [("step", s), ("vs", 8 * s)]
    ok = (len(files) == 1 and got == want and not bad and dropped > 0
          and len(kept) == steps - dropped and kept[:1] == [1] and kept[-1:] == [steps]
          and len(runs) >= 2 and all(n >= QUEUE // 2 for n in lens[:-1])
          and r["dir_reads"] == "1" and r["left"] == "0")
    check("test_a_slow_disk_drops_whole_runs_and_reads_the_directory_once", ok,
          f"{steps} steps, {dropped} dropped, kept runs {runs[:6]}"
          f"{'...' if len(runs) > 6 else ''}, {r['dir_reads']} directory reads, "
          f"{r['left']} left; first differing {first_difference(got, want)}")


if __name__ == "__main__":
    sys.exit(main())
