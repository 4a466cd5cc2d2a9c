"""Checkpoints and live resize on a running local cluster, through mtnlgctl.

usage: test_resize_cluster.py MTNLGD MTNLGCTL

4 daemons with cpu:2 each run tp 2 x pp 2 x dp 2 with a checkpoint dir:
- test_checkpoint_operation_commits_and_is_listed: `mtnlgctl checkpoint
  --wait` succeeds at a step, `mtnlgctl checkpoints` lists it as latest, and
  `mtnlgctl ckpt verify` passes on it;
- test_resize_2_1_2_keeps_global_batch_and_trajectory: `resize --dp 1 --wait`
  re-forms the cluster as generation 2 with two spares, `resize --dp 2 --wait`
  as generation 3 with all four members; the status keeps the global batch;
  every step's loss stays within 1e-5 (relative) of an uninterrupted
  single-process run of the same job, and no step is lost or repeated;
- test_tensorboard_file_per_generation_reads_as_one_curve: the job's
  train.tensorboard_dir gets a file from n0 (world rank 0) for each of the
  three generations, none starting a session (each resize goes on where
  the files end: no rollback, so no session start and no point written
  again), and the directory read as TensorBoard reads it holds every step
  once with the losses the nodes printed, and "lm loss vs samples" at 8
  samples a step the same, each point once (one writer for the daemon's
  life appended to its first file, which sorts before what another node
  would have written);
- test_impossible_resize_is_refused: dp 3 (the global batch does not divide)
  exits 1 with the coordinator's reason, and so does dp 2^30 (a product
  with the micro-batch that wrapped to 0 once killed the coordinator);
- test_stop_right_after_a_resize_stops_the_job: a second cluster is sent
  `resize --dp 1` and at once `stop --wait`: the stop supersedes the
  resize, succeeds, and every daemon exits 0 (a stop that replaced a
  pending resize's order used to fail the job, or hang once the resize had
  saved).
- test_resize_whose_nodes_went_away_ends_the_job_after_reform_timeout: 3
  daemons with cpu:1 (tp 1 x pp 1, dp_min 2), n2 a spare,
  rendezvous.reform_timeout_s 8; `resize --dp 3` is accepted, the spare
  leaves (SIGTERM), generation 1 ends for the resize, and n1 is SIGKILLed
  while generation 2 waits for its nodes: past the timeout the resize
  fails, no dp the job allows is left, and the job ends failed as a re-form
  after a failure does, naming the resize and what was missing; n0 exits 1.
  It used to stay forming for good;
- test_checkpoint_saved_past_dp_max_records_the_job_as_given_and_exports:
  3 daemons with cpu:1 (dp_min = dp_max = 2, n2 a spare) are resized to
  dp 3, past dp_max, as an operator may, and stopped: the status says dp 3
  of dp_min 2 and dp_max 2, the stop's checkpoint records the job as given
  (dp_min 2), and `mtnlgctl ckpt export` writes its weights. The
  generation's width was recorded as dp_min, above dp_max, a job that
  export, reshard and mtnlg-eval refused;
- test_stop_whose_checkpoint_fails_ends_failed: a third cluster is saved
  by `checkpoint --wait` at step M and paused after step P > M; step P's
  directory is made a link to itself (which root cannot follow either, so
  the save surely fails), then `stop --wait`: the job still stops, but
  the stop fails (exit 1) saying its checkpoint failed and that the
  newest checkpoint is step M, every node logs that end, and every node
  exits 2, which systemd's RestartPreventExitStatus does not restart
  into the stopped training. A failed stop's save was reported as a clean
  stop (succeeded, exit 0) and the steps since M were silently lost;
- test_stop_by_sigterm_whose_checkpoint_fails_ends_failed: the same, stopped
  by SIGTERM to a member instead: every node logs the end naming the failed
  save and exits 2.
"""
import glob
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
from local_cluster import LocalCluster, last_step, check, grep, license_tokens  # noqa: E402
try:  # the events reader, which needs python3-protobuf (tools/test installs it)
    import test_tensorboard as tensorboard  # noqa: E402
except (ImportError, SystemExit) as e:
    tensorboard, tensorboard_missing = None, str(e)


def dp2_job(tmp, tag, name, tokens):
    """A long tiny job at dp_min = dp_max = 2 (tp 1 x pp 1), its checkpoints
    under tmp/<tag>-ckpt, written to tmp/<tag>.json: the path."""
    job = {"name": name, "model": {"preset": "tiny", "n_layer": 2},
           "parallel": {"tp": 1, "pp": 1, "dp_min": 2, "dp_max": 2, "micro_batch": 1},
           "train": {"global_batch": 6, "steps": 100000, "seed": 7,
                     "lr": {"schedule": "constant", "peak": 1e-3}},
           "data": {"path": tokens},
           "checkpoint": {"dir": os.path.join(tmp, tag + "-ckpt"), "interval": 0}}
    job_path = os.path.join(tmp, tag + ".json")
    with open(job_path, "w") as f:
        json.dump(job, f)
    return job_path


def test_resize_whose_nodes_went_away(mtnlgd, mtnlgctl, tmp, tokens):
    name = "test_resize_whose_nodes_went_away_ends_the_job_after_reform_timeout"
    job_path = dp2_job(tmp, "gone", "resize-gone", tokens)
    # n1's loss (3 s without a heartbeat) comes well inside the 8 s the
    # resize's generation waits for its nodes; a 1 s timeout could lose a
    # node of a loaded 2-core machine before the resize
    c = LocalCluster(mtnlgd, os.path.join(tmp, "gone"), job_path, nodes=3, devices="cpu:1",
                     token="s3cret", heartbeat_ms=200, timeout_ms=3000,
                     extra={"rendezvous": {"reform_timeout_s": 8}})
    n0, n1, n2 = c.nodes
    ctl = [mtnlgctl, "-e", n0.url(), "--token-file", c.token_file]
    try:
        c.node_start(n0)
        c.node_start(n1)
        c.wait_for(lambda: grep(n0, r"generation 1 formed"), 60, "generation 1")
        c.node_start(n2)
        c.wait_for(lambda: grep(n0, r"node n2 joined") and last_step(n0) >= 3, 120,
                   "step 3 and the spare n2")
        rz = subprocess.run(ctl + ["resize", "--dp", "3"], capture_output=True, text=True,
                            timeout=60)
        n2.signal(signal.SIGTERM)  # the spare leaves right after the resize was accepted
        c.wait_for(lambda: grep(n0, r"generation 1 ended: resize from dp 2 to dp 3"), 120,
                   "generation 1 ended for the resize")
        n1.signal(signal.SIGKILL)  # a member of the old generation dies while the new one forms
        try:
            code = n0.wait(90)
        except subprocess.TimeoutExpired:
            code = None
        lost = n0.log_time(r"coordinator: node n1 lost")
        fell_back = n0.log_time(r"coordinator: resize: no dp 3 could be formed")
        failed = grep(n0, r"generation 2 ended: cannot re-form after a resize from dp 2 to dp 3 "
                          r"whose nodes went away before its generation formed: pp 1 x dp_min 2 "
                          r"needs 2 model slot\(s\) in whole nodes, the 1 node\(s\) left "
                          r"\(n0\) hold 1, and no node joined within "
                          r"rendezvous.reform_timeout_s \(8 s\)")
        ok = (rz.returncode == 0 and code == 1 and failed and lost is not None
              and fell_back is not None and lost < fell_back)
        return check(name, ok,
                     "resize exit %d; n0 exit %s; n1 lost logged %s, the resize given up %s; "
                     "the job's end names the resize and what was missing: %s%s" % (
                         rz.returncode, code, lost, fell_back, failed,
                         "" if ok else "\n" + c.logs(12)))
    except AssertionError as e:
        return check(name, False, str(e))
    finally:
        c.kill_all()


def test_checkpoint_past_dp_max_exports(mtnlgd, mtnlgctl, tmp, tokens):
    name = "test_checkpoint_saved_past_dp_max_records_the_job_as_given_and_exports"
    job_path = dp2_job(tmp, "past", "past-max", tokens)
    c = LocalCluster(mtnlgd, os.path.join(tmp, "past"), job_path, nodes=3, devices="cpu:1",
                     token="s3cret", heartbeat_ms=200, timeout_ms=3000)
    ctl = [mtnlgctl, "-e", c.nodes[1].url(), "--token-file", c.token_file]

    def run(*args):
        return subprocess.run(ctl + list(args), capture_output=True, text=True, timeout=120)
    try:
        c.start()
        c.wait_for(lambda: grep(c.nodes[0], r"node n2 joined") and last_step(c.nodes[0]) >= 2,
                   120, "step 2 and the spare n2")
        rz = run("resize", "--dp", "3", "--wait")  # the operator's width, past dp_max
        st = {}

        def at_dp3():  # this node's status may take a heartbeat to show the new generation
            st.update(json.loads(run("-o", "json", "status").stdout or "{}").get("job") or {})
            return st.get("dp") == 3
        c.wait_for(at_dp3, 30, "the status at dp 3")
        stop = run("stop", "--wait")
        codes = c.wait_all(60)
        cks = sorted(glob.glob(os.path.join(tmp, "past-ckpt", "past-max", "step_*")))
        with open(os.path.join(cks[-1], "manifest.json") if cks else os.devnull) as f:
            saved = (json.load(f) if cks else {}).get("extra", {}).get("job", {})
        out = os.path.join(tmp, "past.safetensors")
        ex = subprocess.run([mtnlgctl, "ckpt", "export", cks[-1] if cks else "-", out],
                            capture_output=True, text=True, timeout=120)
        par = saved.get("parallel", {})
        ok = (rz.returncode == 0 and st.get("dp") == 3 and st.get("dp_min") == 2
              and st.get("dp_max") == 2 and st.get("dp_resized") == 3 and stop.returncode == 0 and codes == [0] * 3
              and par.get("dp_min") == 2 and par.get("dp_max") == 2 and ex.returncode == 0
              and os.path.getsize(out) > 0)
        return check(name, ok,
                     "resize exit %d; status dp %s (dp_min %s, dp_max %s, dp_resized %s); stop exit %d, "
                     "exit codes %s; the last checkpoint's job: dp_min %s dp_max %s; "
                     "export exit %d %s" % (
                         rz.returncode, st.get("dp"), st.get("dp_min"), st.get("dp_max"),
                         st.get("dp_resized"), stop.returncode, codes, par.get("dp_min"), par.get("dp_max"),
                         ex.returncode, (ex.stdout + ex.stderr).strip()[-300:])
                     + ("" if ok else "\n" + c.logs(8)))
    except AssertionError as e:
        return check(name, False, str(e))
    finally:
        c.kill_all()


def stop_whose_checkpoint_fails(mtnlgd, mtnlgctl, tmp, job, job_path, ck, by_signal=False):
    """Stopped by `stop --wait`, or by SIGTERM to member n2 (by_signal)."""
    name = "unsaved-signal" if by_signal else "unsaved-test"
    fail_job = dict(job, name=name, train=dict(job["train"], steps=400))
    with open(job_path, "w") as f:
        json.dump(fail_job, f)
    c = LocalCluster(mtnlgd, os.path.join(tmp, name), job_path, nodes=4, token="s3cret",
                     heartbeat_ms=200, timeout_ms=3000)
    ctl = [mtnlgctl, "-e", c.nodes[1].url(), "--token-file", c.token_file]

    def run(*args):
        return subprocess.run(ctl + list(args), capture_output=True, text=True, timeout=120)

    def op_step(kind):  # where the newest operation of kind acted
        ops = json.loads(run("-o", "json", "ops").stdout)["operations"]
        return [o["step"] for o in ops if o["kind"] == kind][-1]
    try:
        c.start()
        c.wait_for(lambda: last_step(c.nodes[0]) >= 2, 120, "step 2")
        ck_run = run("checkpoint", "--wait")
        saved = op_step("checkpoint")
        pause = run("pause", "--wait")
        paused = op_step("pause")
        # the save the stop makes at step P cannot make its directory
        os.symlink("step_%08d" % paused, os.path.join(ck, name, "step_%08d" % paused))
        if by_signal:
            c.nodes[2].signal(signal.SIGTERM)
            st = subprocess.CompletedProcess([], "-", "", "")  # no operation to wait on
        else:
            st = run("stop", "--wait")
        codes = c.wait_all(60)
        said = st.stdout + st.stderr
        want = ("stopped at step %d of 400 on request; its checkpoint failed: " % paused,
                "cannot be followed", "the newest checkpoint is step %d" % saved)
        ended = re.compile(r"generation 1 ended: .*%s.*%s.*%s" % tuple(map(re.escape, want)))
        logged = [n.name for n in c.nodes if ended.search(n.stderr())]
        ok = (ck_run.returncode == 0 and pause.returncode == 0 and paused > saved
              and len(logged) == 4 and codes == [2] * 4
              and (by_signal or st.returncode == 1 and "failed" in st.stderr
                   and all(w in said for w in want)))
        return check("test_stop_by_sigterm_whose_checkpoint_fails_ends_failed" if by_signal
                     else "test_stop_whose_checkpoint_fails_ends_failed", ok,
                     "checkpoint exit %d at step %s, pause exit %d at step %s, stop exit %s "
                     "(%s), the end logged on %s, exit codes %s" % (
                         ck_run.returncode, saved, pause.returncode, paused, st.returncode,
                         said.strip()[-400:], logged, codes)
                     + ("" if ok else "\n" + c.logs(8)))
    finally:
        c.kill_all()


def tensorboard_check(tensorboard, files, c, got):
    """n0's events files of the three generations, read as TensorBoard reads
    the directory: no session start (no generation rolls back), every step
    once, with the losses the nodes printed."""
    curve = tensorboard.as_tensorboard(files)
    starts = [[e.step for e in tensorboard.read_events(f)
               if e.HasField("session_log") and e.session_log.status == 1] for f in files]
    # "lm loss vs samples", at 8 samples a step (the global batch), each
    # once: no generation wrote an earlier point again
    vs = tensorboard.as_tensorboard(files, vs=True)
    pts = tensorboard.python_points(files)
    tb_ok = (len(files) == 3 and all(f.split(".")[-2] == str(c.nodes[0].pid) for f in files)
             and starts == [[], [], []]
             and sorted(curve) == sorted(got)
             and all(tensorboard.close(curve[s]["lm loss"], tensorboard.f32(got[s]), 1e-6)
                     for s in got)
             and sorted(vs) == [8 * s for s in sorted(got)] and len(pts) == len(set(pts))
             and all(tensorboard.close(vs[8 * s]["lm loss vs samples"],
                                       tensorboard.f32(got[s]), 1e-6) for s in got))
    return check("test_tensorboard_file_per_generation_reads_as_one_curve", tb_ok,
                 "%d file(s) %s, session starts %s, %d step(s) in the curve, %d vs samples "
                 "point(s) at %d samples (%d kept, %d distinct)" % (
                     len(files), [os.path.basename(f) for f in files], starts, len(curve),
                     len(vs), len(set(s for s, _ in pts)), len(pts), len(set(pts))))


def main():
    mtnlgd, mtnlgctl = sys.argv[1], sys.argv[2]
    fails = 0
    with tempfile.TemporaryDirectory() as tmp:
        tokens = license_tokens(os.path.join(tmp, "tokens.u16"))
        ck = os.path.join(tmp, "ckpt")
        # long enough that a checkpoint, two resizes and four steps between
        # them land before the end however fast the steps go (at 45 steps a
        # quick machine ended the job first)
        job = {"name": "resize-test", "model": {"preset": "tiny", "n_layer": 4},
               "parallel": {"tp": 2, "pp": 2, "dp_min": 2, "dp_max": 2, "micro_batch": 2},
               "train": {"global_batch": 8, "steps": 110, "seed": 5,
                         # at a peak of 3e-3 this model's loss spiked at step 37
                         # (gradient norm 35), which turned reduction order's
                         # 1e-8 into 1e-4..6e-4 at single steps, more or less
                         # as the resizes landed; at 1e-3 dp 1 and dp 2 stay
                         # within 3e-7 over the 110 steps
                         "lr": {"schedule": "cosine", "peak": 1e-3, "min": 1e-4,
                                "warmup_steps": 3}},
               "data": {"path": tokens}, "checkpoint": {"dir": ck}}
        tb = os.path.join(tmp, "tb")
        job["train"]["tensorboard_dir"] = tb
        job_path = os.path.join(tmp, "job.json")
        with open(job_path, "w") as f:
            json.dump(job, f)
        ref_run = subprocess.run([mtnlgd, "--standalone", job_path, "--log-format", "json",
                                  "--set", "checkpoint.dir=" + os.path.join(tmp, "refck"),
                                  "--set", "train.tensorboard_dir=" + os.path.join(tmp, "reftb")],
                                 capture_output=True, text=True, timeout=300)
        ref = {json.loads(l)["step"]: json.loads(l)["loss"]
               for l in ref_run.stdout.splitlines() if l.startswith("{")}

        c = LocalCluster(mtnlgd, os.path.join(tmp, "c"), job_path, nodes=4, token="s3cret",
                         heartbeat_ms=200, timeout_ms=3000)
        ctl = [mtnlgctl, "-e", c.nodes[2].url(), "--token-file", c.token_file]

        def run(*args):
            return subprocess.run(ctl + list(args), capture_output=True, text=True, timeout=120)

        def status():
            return json.loads(run("-o", "json", "status").stdout)

        def status_at(gen):
            """n2's status once it shows generation gen (for up to 10 s; the
            last one read after that): a resize succeeds in the coordinator's
            tick that forms the generation, and n2 reads its new assignment in
            its own next tick; `resize --wait` waits for that up to 5 s, which
            a loaded machine may exceed"""
            deadline = time.time() + 10
            while True:
                s = status()
                if s.get("generation") == gen or time.time() > deadline:
                    return s
                time.sleep(0.1)
        try:
            c.start()
            c.wait_for(lambda: last_step(c.nodes[0]) >= 4, 120, "step 4")
            r = run("checkpoint", "--wait")
            listing = run("checkpoints")
            cks = sorted(glob.glob(os.path.join(ck, "resize-test", "step_*")))
            v = subprocess.run([mtnlgctl, "ckpt", "verify", cks[-1]] if cks else ["false"],
                               capture_output=True, text=True)
            fails += check("test_checkpoint_operation_commits_and_is_listed",
                           r.returncode == 0 and "succeeded" in r.stdout and cks
                           and os.path.basename(cks[-1])[5:].lstrip("0") in listing.stdout
                           and v.returncode == 0,
                           "checkpoint exit %d (%s), %d checkpoint(s), verify exit %d" % (
                               r.returncode, r.stdout.strip().splitlines()[-1:] if r.stdout else "",
                               len(cks), v.returncode))

            # the resize first, while generation 1 surely runs: on a loaded
            # machine the calls before it let the job reach its end
            t0 = time.time()
            r1 = run("resize", "--dp", "1", "--wait")
            took1 = time.time() - t0
            s1 = status_at(2)
            members1 = sorted(n["name"] for n in s1["nodes"] if n.get("member"))
            # refused while the job surely runs (generation 2 at dp 1 has most
            # of its 110 steps ahead): a job that has ended refuses every
            # resize for that reason instead
            with urllib.request.urlopen(c.nodes[0].url() + "/v1/metrics", timeout=30) as r:
                metrics1 = r.read().decode()
            r3 = run("resize", "--dp", "3")
            r4 = run("resize", "--dp", str(2 ** 30))
            alive = run("status")
            c.wait_for(lambda: last_step(c.nodes[0]) >= s1["step"] + 4, 120, "steps on dp 1")
            r2 = run("resize", "--dp", "2", "--wait")
            s2 = status_at(3)
            codes = c.wait_all(240)
            got = {}
            for n in c.nodes:
                for s in n.steps():
                    got.setdefault(s["step"], s["loss"])
            steps0 = [s["step"] for s in c.nodes[0].steps()]
            worst = max(abs(got[s] - ref[s]) / abs(ref[s]) for s in ref) if len(got) >= len(ref) else 1
            # the operator's width is shown as held (job.dp_resized, and
            # mtnlgctl status's layout)
            held = (s1["job"].get("dp_resized") == 1 and s2["job"].get("dp_resized") == 2
                    and "(dp 2..2, resized to 1)" in alive.stdout
                    and 'mtnlg_job_parallelism{dim="dp_resized"} 1\n' in metrics1)
            ok = (r1.returncode == 0 and r2.returncode == 0 and s1["generation"] == 2
                  and s1["job"]["dp"] == 1 and len(members1) == 2 and held
                  and s2["generation"] == 3 and s2["job"]["dp"] == 2
                  and s1["job"]["global_batch"] == 8 and s2["job"]["global_batch"] == 8
                  and codes == [0] * 4 and sorted(got) == list(range(1, job["train"]["steps"] + 1))
                  and worst < 1e-5
                  and steps0 == sorted(set(steps0)))
            fails += check("test_resize_2_1_2_keeps_global_batch_and_trajectory", ok,
                           "resize 2->1 took %.1f s; generations %s/%s, dp %s/%s, members on dp 1 %s, "
                           "shown as resized %s (%s/%s); exit codes %s, %d steps, worst relative "
                           "loss difference %.2e" % (
                               took1, s1["generation"], s2["generation"], s1["job"]["dp"],
                               s2["job"]["dp"], members1, held, s1["job"].get("dp_resized"),
                               s2["job"].get("dp_resized"), codes, len(got), worst)
                           + ("" if ok else "\n" + r1.stdout + r1.stderr + r2.stdout + r2.stderr
                              + c.logs(8)))
            # TensorBoard: n0 holds world rank 0 in all three generations and
            # writes a file for each, every later one sorting after the one
            # before and starting a session at its generation's first step;
            # read as TensorBoard reads the directory, the curve is every step
            # once, with the losses the nodes printed
            files = sorted(glob.glob(os.path.join(tb, "events.out.tfevents.*")))
            if tensorboard is None:
                print("skip test_tensorboard_file_per_generation_reads_as_one_curve: "
                      + tensorboard_missing)
            else:
                fails += tensorboard_check(tensorboard, files, c, got)
            fails += check("test_impossible_resize_is_refused",
                           r3.returncode == 1 and "does not divide" in r3.stderr + r3.stdout
                           and r4.returncode == 1 and "model slot(s)" in r4.stderr + r4.stdout
                           and alive.returncode == 0,
                           "exit %d: %s; dp 2^30: exit %d: %s; status after: exit %d" % (
                               r3.returncode, (r3.stderr + r3.stdout).strip()[:200],
                               r4.returncode, (r4.stderr + r4.stdout).strip()[:200],
                               alive.returncode))
        finally:
            c.kill_all()

        long_job = dict(job, name="stop-test", train=dict(job["train"], steps=400))
        with open(job_path, "w") as f:
            json.dump(long_job, f)
        c = LocalCluster(mtnlgd, os.path.join(tmp, "s"), job_path, nodes=4, token="s3cret",
                         heartbeat_ms=200, timeout_ms=3000)
        ctl = [mtnlgctl, "-e", c.nodes[1].url(), "--token-file", c.token_file]
        try:
            c.start()
            c.wait_for(lambda: last_step(c.nodes[0]) >= 3, 120, "step 3")
            rz = run("resize", "--dp", "1")
            st = run("stop", "--wait")
            codes = c.wait_all(60)
            ok = (rz.returncode == 0 and st.returncode == 0 and "succeeded" in st.stdout
                  and codes == [0] * 4 and last_step(c.nodes[0]) < 400)
            fails += check("test_stop_right_after_a_resize_stops_the_job", ok,
                           "resize exit %d (%s), stop exit %d (%s), exit codes %s, last step %d" % (
                               rz.returncode, rz.stdout.strip()[:120], st.returncode,
                               (st.stdout + st.stderr).strip()[:200], codes,
                               last_step(c.nodes[0]))
                           + ("" if ok else "\n" + c.logs(8)))
        finally:
            c.kill_all()

        fails += test_resize_whose_nodes_went_away(mtnlgd, mtnlgctl, tmp, tokens)
        fails += test_checkpoint_past_dp_max_exports(mtnlgd, mtnlgctl, tmp, tokens)
        fails += stop_whose_checkpoint_fails(mtnlgd, mtnlgctl, tmp, job, job_path, ck)
        fails += stop_whose_checkpoint_fails(mtnlgd, mtnlgctl, tmp, job, job_path, ck,
                                             by_signal=True)
    print("%d failure(s)" % fails)
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
