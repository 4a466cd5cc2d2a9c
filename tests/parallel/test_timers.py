"""train.timing_log_level (Megatron's --timing-log-level): where a step's time
goes, as (min, max) across ranks with each step line.

usage: test_timers.py MTNLGD JOB.json
The tiny model trains a few steps on real text. Checked (on what the timers
must be, never on how long anything took):
  - level 2 on one device: every step's JSON line has the level-1 phases and
    the model's pieces that ran (GEMMs, attention, LayerNorm, head, loss),
    min equal to max (one rank), and the pieces, laps inside the
    forward-backward phase, sum to no more than it;
  - the timers change nothing: the losses and norms of level 2 are those of
    a run without timers, bit for bit, at one device and at tp 2 x pp 2 x
    dp 2 with sequence parallelism and recomputation;
  - at tp 2 x pp 2 x dp 2 the timers of one stage's pieces (the head, the
    embedding) have min 0 and max above it, the tensor- and
    pipeline-parallel ones are there, recomputation is timed, and min <= max
    everywhere;
  - level 1 prints the phases only; a job without the key prints no timers
    (JSON nor text);
  - the text log has Megatron's "(min, max) time across ranks (ms):" block
    in its format after each step line;
  - a level past 2, or not an integer, is refused naming the key;
  - train.timing_log_option (Megatron's --timing-log-option): all gives
    every rank's own timers, in JSON ("timers_by_rank") whose least and
    most are the line's min and max, at tp 2 x pp 2 x dp 2 in Megatron's
    rank order (the head's and the loss's pieces on ranks 4-7, the last
    stage's, and nowhere else; the embedding's on ranks 0-3), with the
    losses of a run without timers; in text Megatron's "times across ranks
    (ms):" block, a rank's line under each timer; max Megatron's "max time
    across ranks (ms):" block; another name, or max or all without a
    level, refused naming the key;
  - train.log_timers_to_tensorboard (Megatron's --log-timers-to-tensorboard)
    writes each step's "<timer>-time" tags, the JSON line's max in seconds,
    every timer the line has and no other; without it, none; without a
    level or a tensorboard_dir it is refused naming what it needs;
  - turning it on for a resume is no change to the run;
  - train.log_memory_to_tensorboard (Megatron's --log-memory-to-tensorboard)
    writes mem-reserved-bytes, mem-allocated-bytes, mem-max-allocated-bytes
    and mem-allocated-count on every step: on one CPU device the allocated
    bytes hold the plan's activations, the weights, their gradients and
    Adam's two moments (fp32: two times the moments the plan line gives),
    and not a third more; they do not grow from step to step; reserved
    equals allocated (a CPU device reserves nothing more); without it,
    none; without a tensorboard_dir it is refused;
  - after its first step a run logs its memory once (Megatron's
    report_memory): the RAM this process holds, now and at most, and what
    the engine's allocations on its first rank's device hold.
"""
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "cluster"))
from local_cluster import check, license_tokens  # noqa: E402

PHASES = {"weights-round", "forward-backward", "pipeline-wait", "all-grads-sync",
          "embedding-grads-all-reduce", "grad-norm", "optimizer-count-zeros", "step-all-reduce",
          "optimizer-inner-step", "params-all-gather"}
# the pieces one device runs on every step of the tiny model
PIECES_ONE = {"forward-embedding", "forward-layernorm", "forward-linear", "forward-attention",
              "forward-elementwise", "forward-head", "forward-loss", "backward-loss",
              "backward-head", "backward-layernorm", "backward-linear", "backward-attention",
              "backward-elementwise", "backward-embedding"}


def nbytes(text):
    """ "12.3 MB" as bytes (the memory line's decimal units)."""
    number, unit = text.split()
    return float(number) * {"kB": 1e3, "MB": 1e6, "GB": 1e9}[unit]


def run(mtnlgd, job, tokens, level=None, log_format="json", layout=(1, 1, 1), steps=3,
        extra=(), full=False):
    tp, pp, dp = layout
    cmd = [mtnlgd, "--standalone", job, "--log-format", log_format,
           "--set", f"data.path={tokens}", "--set", f"train.steps={steps}",
           "--set", "train.lr.warmup_steps=1", "--set", "model.n_layer=4",
           "--set", "parallel.micro_batch=2", "--set", "train.global_batch=8",
           "--set", f"parallel.tp={tp}", "--set", f"parallel.pp={pp}",
           "--set", f"parallel.dp_min={dp}"]
    if level is not None:
        cmd += ["--set", f"train.timing_log_level={level}"]
    for s in extra:
        cmd += ["--set", s]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if full:
        return out
    if out.returncode != 0:
        print(out.stderr)
        raise SystemExit(f"level {level} {layout}: mtnlgd exited {out.returncode}")
    return out.stdout


def lines(stdout):
    return [json.loads(l) for l in stdout.splitlines() if l.startswith("{")]


def trajectory(ls):
    return [(l["loss"], l["grad_norm"]) for l in ls]


def tensorboard(mtnlgd, job, tokens, tmp):
    """train.log_timers_to_tensorboard: the events against the step lines."""
    try:
        import test_tensorboard as tb
    except ImportError as e:  # tools/test installs python3-protobuf
        print(f"SKIP the TensorBoard checks: the events reader needs python3-protobuf ({e})")
        return 0
    failures = 0
    runs = {}
    for on in (True, False):
        d = os.path.join(tmp, "tb-%s" % on)
        extra = ["train.tensorboard_dir=" + d]
        if on:
            extra += ["train.log_timers_to_tensorboard=true",
                      "train.log_memory_to_tensorboard=true"]
        out = run(mtnlgd, job, tokens, level=2, extra=extra, full=True)
        if out.returncode != 0:
            print(out.stderr)
            raise SystemExit(f"tensorboard run {on}: mtnlgd exited {out.returncode}")
        runs[on] = (lines(out.stdout),
                    tb.scalars([e for f in sorted(os.listdir(d))
                                for e in tb.read_events(os.path.join(d, f))]))
        if on:
            plan = re.search(r"Adam moments (\d+) bytes per rank .*activations (\d+) bytes per rank",
                             out.stderr)
    ls, events = runs[True]
    bad = []
    for l in ls:
        got = {k[:-5]: v for k, v in events.get(l["step"], {}).items()
               if k.endswith("-time") and k != "iteration-time"}
        want = {k: hi / 1e3 for k, (lo, hi) in l.get("timers", {}).items()}
        # the line prints ms to 0.001; the event holds seconds as float32
        if set(got) != set(want) or any(abs(got[k] - want[k]) > 6e-7 + 1e-7 * want[k]
                                        for k in want):
            bad.append((l["step"], sorted(set(got) ^ set(want)),
                        [(k, got.get(k), want[k]) for k in want
                         if k in got and abs(got[k] - want[k]) > 6e-7 + 1e-7 * want[k]][:3]))
    failures += check("test_timers_to_tensorboard_are_the_lines_max_in_seconds",
                      len(ls) == 3 and len(events) == 3 and not bad, str(bad[:2]))
    _, quiet = runs[False]
    extra_tags = sorted({k for v in quiet.values() for k in v
                         if k.endswith("-time") and k != "iteration-time"})
    failures += check("test_no_timers_in_tensorboard_unless_asked",
                      len(quiet) == 3 and not extra_tags, str(extra_tags))
    failures += memory_in_tensorboard(events, quiet, plan)
    for sets, words in ((["train.log_memory_to_tensorboard=true"],
                         "train.log_memory_to_tensorboard: needs train.tensorboard_dir"),
                        (["train.log_timers_to_tensorboard=true",
                          "train.tensorboard_dir=" + os.path.join(tmp, "tb-x")],
                         "train.log_timers_to_tensorboard: needs train.timing_log_level 1 or 2"),
                        (["train.log_timers_to_tensorboard=true", "train.timing_log_level=1"],
                         "train.log_timers_to_tensorboard: needs train.tensorboard_dir")):
        out = run(mtnlgd, job, tokens, extra=sets, full=True)
        failures += check("test_log_%s_to_tensorboard_refused_%s" %
                          ("memory" if "memory" in sets[0] else "timers",
                           "without_a_level" if "dir" in sets[-1] else "without_a_dir"),
                          out.returncode != 0 and words in out.stderr,
                          "exit %d: %s" % (out.returncode, out.stderr[-300:]))
    return failures


def megatron_blocks(text, head, row, least):
    """Megatron's timers blocks in a text log: after every step line its
    head, then at least `least` rows matching row, each timer's name padded
    with dots to 48 columns after a 4-space indent. The blocks found and
    what was wrong."""
    row = re.compile(row)
    blocks, bad = 0, []
    for i, l in enumerate(text):
        if not l.startswith("step "):
            continue
        if i + 1 >= len(text) or text[i + 1] != head:
            bad.append(l)
            continue
        blocks += 1
        j = i + 2
        while j < len(text) and text[j].startswith("    "):
            if not row.match(text[j]) or len(text[j].split(": ")[0]) != 4 + 48:
                bad.append(text[j])
            j += 1
        if j - (i + 2) < least:
            bad.append("%d rows after %r" % (j - i - 2, l))
    return blocks, bad


def timing_log_option(mtnlgd, job, tokens, layout, extra, plain8):
    """train.timing_log_option: max and all against minmax's numbers."""
    failures = 0
    all8 = lines(run(mtnlgd, job, tokens, level=2, layout=layout,
                     extra=extra + ["train.timing_log_option=all"]))
    bad = []
    last, first = {4, 5, 6, 7}, {0, 1, 2, 3}  # world rank = tp + 2 (dp + 2 pp)
    for l in all8:
        t, by = l.get("timers", {}), l.get("timers_by_rank", {})
        if set(t) != set(by) or not t:
            bad.append(("names", sorted(set(t) ^ set(by))))
            continue
        for k, v in by.items():
            # each printed to 0.001 ms, min and max summed over the same step
            if len(v) != 8 or abs(min(v) - t[k][0]) > 0.0015 or abs(max(v) - t[k][1]) > 0.0015:
                bad.append((l["step"], k, t[k], v))
        for k, ranks in (("forward-head", last), ("forward-loss", last),
                         ("backward-head", last), ("backward-loss", last),
                         ("forward-embedding", first), ("backward-embedding", first)):
            ran = {r for r, ms in enumerate(by.get(k, [])) if ms > 0}
            if ran != ranks:
                bad.append((l["step"], k, sorted(ran)))
    failures += check("test_option_all_gives_every_ranks_timers_in_megatrons_rank_order",
                      len(all8) == 3 and not bad, str(bad[:3]))
    failures += check("test_option_all_changes_nothing_tp2_pp2_dp2",
                      trajectory(plain8) == trajectory(all8),
                      "%s against %s" % (trajectory(all8), trajectory(plain8)))

    two = (1, 1, 2)
    text = run(mtnlgd, job, tokens, level=1, layout=two, log_format="text",
               extra=["train.timing_log_option=all"]).splitlines()
    heads = [i for i, l in enumerate(text) if l == "times across ranks (ms):"]
    steps = [i for i, l in enumerate(text) if l.startswith("step ")]
    bad = [] if [i - 1 for i in heads] == steps and len(steps) == 3 else ["heads %s, steps %s" %
                                                                          (heads, steps)]
    for h in heads:
        j, timer, ranks = h + 1, None, {}
        while j < len(text) and text[j].startswith("  "):
            m = re.match(r"^  ([a-z-]+):$", text[j])
            r = re.match(r"^     rank ([ \d]\d): (\d+\.\d\d)$", text[j])
            if m:
                timer = m.group(1)
            elif r and timer:
                ranks.setdefault(timer, []).append(int(r.group(1)))
            else:
                bad.append(text[j])
            j += 1
        if ranks.get("forward-backward") != [0, 1] or ranks.get("all-grads-sync") != [0, 1]:
            bad.append(ranks)
    failures += check("test_option_all_prints_megatrons_block_a_rank_a_line",
                      not bad, str(bad[:3]))

    text = run(mtnlgd, job, tokens, level=1, layout=two, log_format="text",
               extra=["train.timing_log_option=max"]).splitlines()
    blocks, bad = megatron_blocks(text, "max time across ranks (ms):",
                                  r"^    ([a-z-]+) \.+: (\d+\.\d\d)$", 1)
    failures += check("test_option_max_prints_megatrons_max_block",
                      blocks == 3 and not bad, str(bad[:3]))

    for sets, words in ((["train.timing_log_option=most", "train.timing_log_level=1"],
                         'train.timing_log_option: "most" is not one of minmax'),
                        (["train.timing_log_option=all"],
                         "train.timing_log_option: all needs train.timing_log_level 1 or 2")):
        out = run(mtnlgd, job, tokens, extra=sets, full=True)
        failures += check("test_option_%s_is_refused" %
                          ("most" if "most" in sets[0] else "all_without_a_level"),
                          out.returncode != 0 and words in out.stderr,
                          "exit %d: %s" % (out.returncode, out.stderr[-300:]))
    return failures


MEMORY_TAGS = ("mem-reserved-bytes", "mem-allocated-bytes", "mem-max-allocated-bytes",
               "mem-allocated-count")


def memory_in_tensorboard(events, quiet, plan):
    """train.log_memory_to_tensorboard's tags against the plan line."""
    failures = 0
    steps = sorted(events)
    mem = [{k: events[s].get(k) for k in MEMORY_TAGS} for s in steps]
    ok = plan is not None and len(mem) == 3 and all(None not in m.values() for m in mem)
    why = "plan line %s; tags %s" % (plan and plan.groups(), mem)
    if ok:
        adam, acts = int(plan.group(1)), int(plan.group(2))
        # weights and gradients are as large as the two moments in an fp32 job
        floor = acts + 2 * adam
        a = [m["mem-allocated-bytes"] for m in mem]
        ok = (all(floor <= x <= 1.34 * floor for x in a)
              and all(m["mem-max-allocated-bytes"] >= m["mem-allocated-bytes"] for m in mem)
              and all(m["mem-reserved-bytes"] == m["mem-allocated-bytes"] for m in mem)
              and all(m["mem-allocated-count"] >= 1 for m in mem))
        why = "allocated %s against at least %d; %s" % (a, floor, mem)
        failures += check("test_memory_to_tensorboard_holds_the_plan", ok, why)
        grow = [(steps[i], a[i]) for i in range(1, len(a)) if a[i] != a[1]]
        failures += check("test_memory_to_tensorboard_does_not_grow_step_to_step", not grow,
                          str(grow))
    else:
        failures += check("test_memory_to_tensorboard_holds_the_plan", False, why)
    stray = sorted({k for v in quiet.values() for k in v if k.startswith("mem-")})
    failures += check("test_no_memory_in_tensorboard_unless_asked", len(quiet) == 3 and not stray,
                      str(stray))
    return failures


def main():
    mtnlgd, job = sys.argv[1], sys.argv[2]
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        tokens = license_tokens(os.path.join(tmp, "tokens.u16"))

        plain = lines(run(mtnlgd, job, tokens))
        timed = lines(run(mtnlgd, job, tokens, level=2))
        timers = [l.get("timers", {}) for l in timed]
        names = set().union(*timers) if timers else set()
        failures += check("test_level2_times_the_phases_and_the_pieces_one_device_runs",
                          len(timed) == 3 and all({"forward-backward", "weights-round",
                                                   "grad-norm", "optimizer-inner-step"} |
                                                  PIECES_ONE <= set(t) for t in timers)
                          and names <= PHASES | PIECES_ONE,
                          "names %s" % sorted(names))
        worst = None
        for t in timers:
            for lo, hi in t.values():
                if lo != hi or lo < 0:
                    worst = (lo, hi)
        failures += check("test_one_rank_has_min_equal_to_max", timers and worst is None,
                          str(worst))
        over = []
        for t in timers:
            pieces = sum(t[k][1] for k in t if k not in PHASES)
            # laps inside the phase: each printed to 0.001 ms, so up to that much apiece
            if not 0 < pieces <= t["forward-backward"][1] + 0.001 * len(t):
                over.append((pieces, t["forward-backward"][1]))
        failures += check("test_the_pieces_are_laps_inside_forward_backward",
                          timers and not over, str(over))
        failures += check("test_timers_change_nothing_one_device",
                          trajectory(plain) == trajectory(timed) and len(plain) == 3,
                          "%s against %s" % (trajectory(timed), trajectory(plain)))

        layout = (2, 2, 2)
        extra = ["parallel.recompute=true", "parallel.sequence_parallel=true"]
        plain8 = lines(run(mtnlgd, job, tokens, layout=layout, extra=extra))
        timed8 = lines(run(mtnlgd, job, tokens, level=2, layout=layout, extra=extra))
        t8 = timed8[-1].get("timers", {}) if timed8 else {}
        want = {"forward-tp-comm", "backward-tp-comm", "backward-recompute", "pipeline-wait",
                "params-all-gather", "all-grads-sync", "embedding-grads-all-reduce",
                "step-all-reduce"}
        failures += check("test_tp2_pp2_dp2_times_the_parallel_phases",
                          want <= set(t8) and all(t8[k][1] > 0 for k in want),
                          "missing %s of %s" % (sorted(want - set(t8)), sorted(t8)))
        one_stage = ["forward-head", "forward-loss", "backward-head", "forward-embedding",
                     "backward-embedding"]
        failures += check("test_a_stages_own_pieces_have_min_0_across_ranks",
                          all(k in t8 and t8[k][0] == 0 and t8[k][1] > 0 for k in one_stage),
                          str({k: t8.get(k) for k in one_stage}))
        failures += check("test_min_is_at_most_max",
                          t8 and all(0 <= lo <= hi for t in timed8
                                     for lo, hi in t.get("timers", {}).values()), str(t8))
        failures += check("test_timers_change_nothing_tp2_pp2_dp2",
                          trajectory(plain8) == trajectory(timed8) and len(plain8) == 3,
                          "%s against %s" % (trajectory(timed8), trajectory(plain8)))

        failures += timing_log_option(mtnlgd, job, tokens, layout, extra, plain8)

        level1 = lines(run(mtnlgd, job, tokens, level=1))
        n1 = set().union(*(l.get("timers", {}) for l in level1)) if level1 else set()
        failures += check("test_level1_times_the_phases_only",
                          len(level1) == 3 and "forward-backward" in n1 and n1 <= PHASES,
                          str(sorted(n1)))
        text_plain = run(mtnlgd, job, tokens, log_format="text")
        failures += check("test_no_timers_unless_asked",
                          all("timers" not in l for l in plain)
                          and "time across ranks" not in text_plain,
                          str(plain[-1:]))

        text = run(mtnlgd, job, tokens, level=2, log_format="text").splitlines()
        blocks, bad = megatron_blocks(
            text, "(min, max) time across ranks (ms):",
            r"^    ([a-z-]+) \.+: \((\d+\.\d\d), (\d+\.\d\d)\)$", len(PIECES_ONE))
        failures += check("test_text_has_megatrons_block_after_each_step_line",
                          blocks == 3 and not bad, str(bad[:3]))

        for value, words in (("3", "train.timing_log_level: 3 must be 0"),
                             ("-1", "train.timing_log_level: -1 must be 0"),
                             ('"2"', "train.timing_log_level: expected an integer")):
            out = run(mtnlgd, job, tokens, level=value, full=True)
            failures += check("test_level_%s_is_refused" % value.strip('"').replace("-", "minus"),
                              out.returncode != 0 and words in out.stderr,
                              "exit %d: %s" % (out.returncode, out.stderr[-300:]))

        failures += tensorboard(mtnlgd, job, tokens, tmp)

        out = run(mtnlgd, job, tokens, full=True)
        size = r"([\d.]+ [kMG]B)"
        said = re.findall(r"memory after step (\d+): this process holds " + size + " of RAM "
                          r"\(" + size + r" at most\); its first rank's device holds " + size +
                          r" of the engine's allocations \(" + size + r" at most, (\d+) of them\)",
                          out.stderr)
        b = [[nbytes(x) for x in s[1:5]] for s in said]
        failures += check("test_memory_is_logged_once_after_the_first_step",
                          out.returncode == 0 and len(said) == 1 and said[0][0] == "1"
                          and 0 < b[0][0] <= b[0][1] and 0 < b[0][2] <= b[0][3]
                          # a tiny model's kB, not "0.00 GB"
                          and not said[0][3].endswith(" GB") and int(said[0][5]) >= 1,
                          str(said) + out.stderr[-300:])

        # (the decay given: by default it follows train.steps, which the resume lengthens)
        ck = ["checkpoint.dir=" + os.path.join(tmp, "ck"), "train.lr.decay_steps=6"]
        run(mtnlgd, job, tokens, steps=3, extra=ck)
        resumed = run(mtnlgd, job, tokens, level=1, steps=5, extra=ck, full=True)
        said = [l for l in resumed.stderr.splitlines() if "resume: the job changed" in l]
        failures += check("test_turning_it_on_for_a_resume_is_no_change_to_the_run",
                          resumed.returncode == 0 and len(said) == 1
                          and "its trajectory does not" in said[0]
                          and "timing_log_level" in said[0] and '"timers"' in resumed.stdout,
                          str(said) + resumed.stderr[-300:])
    print("%d failure(s)" % failures)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
