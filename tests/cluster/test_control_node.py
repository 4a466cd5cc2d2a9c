"""The control plane of one live daemon: what its reads cost and say, and the
control configs it refuses.

usage: test_control_node.py MTNLGD FAULT_PRELOAD [MTNLGCTL]

One mtnlgd on loopback (tools/local_cluster.py, cpu:1, the tiny model at
tp 1 x pp 1 x dp 1, checkpoint.dir set, no periodic checkpoint):
- test_tokens_per_s_is_null_before_the_first_step: /v1/status says null
  for it and the step_time phases (they said 0), and /v1/metrics has no
  mtnlg_tokens_per_second or mtnlg_step_time_seconds sample, until a step
  ran;
- test_consumed_tokens_and_skipped_steps_are_gauges: they go back when a
  run resumes from an earlier checkpoint, so no counter type;
- test_health_answers_while_the_checkpoint_directory_hangs: with the job
  directory's `latest` a FIFO nobody writes (opening it blocks, as on a
  hung NFS mount), /v1/health (a status rebuild each 100 ms) and
  /v1/status answer for 12 s, past a rescan, where each rebuild used to
  scan the directory on the HTTP thread and hang; GET /v1/checkpoints (a
  full scan, on the same thread) answers 503 after its 2 s, and at once
  while that scan hangs, and /v1/health answers after it;
- test_status_last_checkpoint_sees_another_writers_commit_within_the_rescan:
  a checkpoint committed by someone else shows within 10 s (plus slack);
- test_checkpoint_progress_has_no_byte_figures_before_any_save: null, not
  0 (and while a save writes, null too: the writers do not count bytes);
- test_status_and_metrics_show_the_steps_timers_when_asked: under
  train.timing_log_level 2, /v1/status's step_time.timers has the last
  step's [min, max] (equal on one rank), the status still conforms to
  proto/control-v1.yaml, and /v1/metrics has a mtnlg_step_timer_max_seconds
  sample for each; test_mtnlgctl_status_lists_the_timers: and
  `mtnlgctl status` prints them.
A second daemon, its shard writes held by FAULT_PRELOAD (an LD_PRELOAD
library) until the test lets them go:
- test_status_says_checkpointing_while_a_save_writes: an ordered save shows
  as "checkpointing" in the status, the health, the cluster's view of the
  node and the state metric while it is held, and "running" once it commits;
- test_a_failed_save_is_told_as_one_until_a_save_commits: a save that cannot
  write shows as "failed" with its error, no byte figures, a failure count
  and metric, until the next save commits;
- test_a_spare_shows_the_clusters_last_save: a spare beside it (dp 1), which
  saves nothing, shows the member's failed save (of "cluster", its error
  and count) and then the good one, while its own failure metrics stay 0:
  it showed "idle", 0 failures, while every save of the job failed.
A member and a spare (cpu:1 each; 81 steps, validating after step 80 and
at the end on 600 batches of a data.valid, about 2 s each; paused after
its first step until the spare is in):
- test_status_shows_a_validation_under_way_until_its_step_is_reported:
  the member's /v1/status's evaluation names each pass (valid, after step
  80, then the end of training's after step 81) with its batches counting
  up while the status's step is still the one before, its eta_s counts
  the batches left in this pass and the next at the pass's pace, `mtnlgctl
  history` shows step 80's validation loss during the end's pass, systemd's
  STATUS= tells the passes' batches before the step's line, conforms to
  proto/control-v1.yaml, `mtnlgctl status` prints its "evaluating" line,
  the steps come with their losses once the passes end, and the spare's
  status shows the validation after step 80 too (from the store).
Then two daemons that must not start (exit 2, naming both keys):
- test_reads_need_token_without_token_file_is_refused_at_start;
- test_reads_need_token_with_an_empty_token_file_is_refused_at_start;
- test_token_file_of_two_lines_is_refused_at_start: mtnlgctl refuses to send
  such a token (more than one word), so the daemon does not start
  with it (exit 2, naming control.token_file and the byte);
- test_token_file_not_ascii_is_refused_at_start_naming_the_byte: so with a
  byte that is not printable ASCII (UTF-8 text), named as that, not as a
  second word.
- test_mtnlgctl_reads_of_a_daemon_that_wants_the_token_send_it_after_the_401:
  with control.reads_need_token, mtnlgctl status without a token file exits 1
  with the 401, and with one it reads the file on the 401 and asks again.
Each check prints `ok NAME` or `FAIL NAME: detail`; exit 1 when any failed.
"""
import array
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tools"))
sys.path.insert(0, os.path.join(HERE, "..", "common"))
from local_cluster import (LocalCluster, NotifySocket, check, indexed_dataset,  # noqa: E402
                           license_tokens, tiny_job)
import openapi_check as oc  # noqa: E402

SPEC = os.path.join(HERE, "..", "..", "proto", "control-v1.yaml")

failures = 0


def get(node, path, timeout=15):
    c = http.client.HTTPConnection("127.0.0.1", node.control_port, timeout=timeout)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read().decode("utf-8", "replace")
    finally:
        c.close()


def status_step(node):
    """The status's step; -1 while the control port does not answer yet."""
    try:
        return json.loads(get(node, "/v1/status", timeout=2)[1])["step"]
    except OSError:
        return -1


def fake_checkpoints(job_dir, steps, shards):
    """Committed-looking step directories (a manifest and shard files), with
    latest naming the newest; nothing reads their contents here."""
    os.makedirs(job_dir, exist_ok=True)
    for step in steps:
        d = os.path.join(job_dir, "step_%08d" % step)
        os.makedirs(d, exist_ok=True)
        for s in range(shards):
            with open(os.path.join(d, "shard_%04d.bin" % s), "wb") as f:
                f.write(b"x" * 16)
        with open(os.path.join(d, "manifest.json"), "w") as f:
            f.write("{}")
    with open(os.path.join(job_dir, "latest.tmp"), "w") as f:
        f.write("step_%08d\n" % steps[-1])
    os.rename(os.path.join(job_dir, "latest.tmp"), os.path.join(job_dir, "latest"))


def test_live_node(mtnlgd, tmp, mtnlgctl=None):
    global failures
    tokens = license_tokens(os.path.join(tmp, "tokens.u16"))
    ckdir = os.path.join(tmp, "ckpt")
    job = tiny_job(os.path.join(tmp, "job.json"), tokens, "ctlnode", 1000000,
                   parallel={"tp": 1, "pp": 1, "dp_min": 1, "dp_max": 1, "micro_batch": 2},
                   checkpoint={"dir": ckdir, "interval": 0})
    with open(job) as f:
        j = json.load(f)
    j["train"]["log_params_norm"] = True
    j["train"]["log_num_zeros_in_grad"] = True
    j["train"]["timing_log_level"] = 2
    with open(job, "w") as f:
        json.dump(j, f)
    c = LocalCluster(mtnlgd, os.path.join(tmp, "cluster"), job, nodes=1, devices="cpu:1")
    n = c.nodes[0]
    try:
        c.start()
        # before the first step: poll from the moment the port answers
        early, bad, deadline = 0, [], time.time() + 120
        while time.time() < deadline:
            try:
                status, body = get(n, "/v1/status", timeout=2)
            except OSError:
                if n.proc.poll() is not None:
                    break
                time.sleep(0.02)
                continue
            s = json.loads(body)
            if s["step"] > 0:
                break
            early += 1
            if s["tokens_per_s"] is not None:
                bad.append("status tokens_per_s %r at step 0" % s["tokens_per_s"])
            if s["step"] == 0 and any(v is not None for v in s["step_time"].values()):
                bad.append("status step_time %r before any step" % s["step_time"])
            _, m = get(n, "/v1/metrics")  # read on its own: a step may have run since
            if "mtnlg_step 0" in m.splitlines() and any(
                    line.startswith(("mtnlg_tokens_per_second ", "mtnlg_step_time_seconds"))
                    for line in m.splitlines()):
                bad.append("a mtnlg_tokens_per_second or step_time sample at step 0")
            time.sleep(0.02)
        failures += check("test_tokens_per_s_is_null_before_the_first_step",
                          early > 0 and not bad,
                          "; ".join(bad[:3]) or "%d statuses before the first step" % early)
        c.wait_for(lambda: status_step(n) > 0, 120, "a step")
        st = json.loads(get(n, "/v1/status")[1])
        _, m = get(n, "/v1/metrics")
        norm = [x for x in m.splitlines() if x.startswith("mtnlg_params_norm ")]
        failures += check("test_status_and_metrics_show_the_params_norm_when_asked",
                          isinstance(st.get("params_norm"), float) and st["params_norm"] > 0
                          and len(norm) == 1 and float(norm[0].split()[1]) > 0,
                          "status params_norm %r, metric %s" % (st.get("params_norm"), norm))
        hist = json.loads(get(n, "/v1/history")[1])["steps"]
        zeros = [x for x in m.splitlines() if x.startswith("mtnlg_grad_num_zeros ")]
        failures += check("test_status_history_and_metrics_show_num_zeros_when_asked",
                          isinstance(st.get("num_zeros"), int) and st["num_zeros"] >= 0
                          and len(zeros) == 1 and hist
                          and all(isinstance(p.get("num_zeros"), int) for p in hist),
                          "status num_zeros %r, metric %s, history %s"
                          % (st.get("num_zeros"), zeros, hist[-1:]))
        timers = (st.get("step_time") or {}).get("timers")
        fb = (timers or {}).get("forward-backward")
        tmax = {x.split('"')[1]: float(x.split()[-1]) for x in m.splitlines()
                if x.startswith("mtnlg_step_timer_max_seconds{timer=")}
        errs = oc.check_response(oc.load(SPEC), "GET", "/v1/status", 200, json.dumps(st),
                                 "application/json")
        failures += check("test_status_and_metrics_show_the_steps_timers_when_asked",
                          isinstance(fb, list) and len(fb) == 2 and 0 < fb[0] == fb[1]
                          and "backward-attention" in timers and not errs
                          and set(tmax) == set(timers) and tmax["forward-backward"] > 0
                          and "mtnlg_step_timer_min_seconds" in m,
                          "status timers %r, metrics %s, spec %s" % (timers, tmax, errs[:3]))
        if mtnlgctl:
            out = subprocess.run([mtnlgctl, "-e", n.url(), "status"], capture_output=True,
                                 text=True, timeout=30)
            failures += check("test_mtnlgctl_status_lists_the_timers",
                              out.returncode == 0 and "(min, max) across ranks, ms" in out.stdout
                              and re.search(r"\n    forward-backward +\([\d.]+, [\d.]+\)\n",
                                            out.stdout) is not None, out.stdout[-900:])
        lines = m.splitlines()
        ok = ("# TYPE mtnlg_consumed_tokens gauge" in lines
              and "# TYPE mtnlg_skipped_steps gauge" in lines
              and not any("_total" in line and ("consumed" in line or "skipped" in line)
                          for line in lines)
              and json.loads(get(n, "/v1/status")[1])["tokens_per_s"] > 0)
        failures += check("test_consumed_tokens_and_skipped_steps_are_gauges", ok,
                          "\n".join(x for x in lines if "consumed" in x or "skipped" in x))

        cp = json.loads(get(n, "/v1/status")[1])["checkpoint_progress"]
        failures += check("test_checkpoint_progress_has_no_byte_figures_before_any_save",
                          cp["state"] == "idle" and cp["bytes_done"] is None
                          and cp["bytes_total"] is None and cp["bytes_per_s"] is None, str(cp))

        # a hung filesystem: `latest` a FIFO that nobody writes, so opening
        # it blocks; the scan behind the status blocks on it, the probes
        # must not (they hung for good when each rebuild scanned)
        job_dir = os.path.join(ckdir, "ctlnode")
        fake_checkpoints(job_dir, [1000000, 1000001], 2)
        latest = os.path.join(job_dir, "latest")
        os.remove(latest)
        os.mkfifo(latest)
        answered, t0 = [], time.monotonic()
        try:
            while time.monotonic() - t0 < 12:  # past a rescan (10 s)
                answered.append(get(n, "/v1/health", timeout=5)[0])
                time.sleep(0.15)  # past the status's 100 ms cache: each one rebuilds
            answered.append(get(n, "/v1/status", timeout=5)[0])
        except OSError as e:
            answered.append(repr(e))
        # a full listing reads latest too: 503 once its wait (2 s) is over,
        # and at once while that scan still hangs; health answers after it
        try:
            checkpoints = [get(n, "/v1/checkpoints", timeout=10) for _ in range(2)]
            checkpoints = [(st, "did not answer in time" in body) for st, body in checkpoints]
            after = get(n, "/v1/health", timeout=5)[0]
        except OSError as e:
            checkpoints, after = repr(e), None
        # let the blocked readers go: write latest to them, then replace it
        for _ in range(4):
            try:
                fd = os.open(latest, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # no reader left
                break
            try:
                os.write(fd, b"step_01000001\n")
            except OSError:  # the reader went between the open and the write
                pass
            finally:
                os.close(fd)
            time.sleep(0.2)
        os.remove(latest)
        fake_checkpoints(job_dir, [1000001], 2)
        failures += check("test_health_answers_while_the_checkpoint_directory_hangs",
                          len(answered) > 10 and all(a == 200 for a in answered)
                          and checkpoints == [(503, True), (503, True)] and after == 200,
                          "%d answers: %s; GET /v1/checkpoints %s, then health %s"
                          % (len(answered), sorted(set(map(str, answered))), checkpoints, after))

        # another writer's commit: no step or phase of this node's changed
        fake_checkpoints(job_dir, [2000000], 1)
        t0 = time.time()
        seen = None
        while time.time() - t0 < 14:
            lc = json.loads(get(n, "/v1/status")[1])["last_checkpoint"]
            if lc and lc["step"] == 2000000:
                seen = time.time() - t0
                break
            time.sleep(0.2)
        failures += check(
            "test_status_last_checkpoint_sees_another_writers_commit_within_the_rescan",
            seen is not None, "seen after %.1f s" % seen if seen is not None else "not seen in 14 s")
    except (AssertionError, OSError, ValueError, KeyError) as e:
        failures += check("test_live_node_runs", False, "%s\n%s" % (e, c.logs()))
    finally:
        c.kill_all()


def post(node, path, token, body=b"{}"):
    c = http.client.HTTPConnection("127.0.0.1", node.control_port, timeout=15)
    try:
        c.request("POST", path, body=body, headers={"Authorization": "Bearer " + token,
                                                    "Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, r.read().decode("utf-8", "replace")
    finally:
        c.close()


def test_checkpointing_state(mtnlgd, preload, tmp):
    """A save held in its first shard write (fault_preload) shows as
    "checkpointing" in the node's status and health, in the cluster's view
    of the node and in the state metric, and as "running" again once the
    write goes on and the checkpoint commits."""
    global failures
    tokens = license_tokens(os.path.join(tmp, "tokens.u16"))
    ckdir = os.path.join(tmp, "ckpt_held")
    job = tiny_job(os.path.join(tmp, "job_held.json"), tokens, "ctlheld", 1000000,
                   parallel={"tp": 1, "pp": 1, "dp_min": 1, "dp_max": 1, "micro_batch": 2},
                   checkpoint={"dir": ckdir, "interval": 0})
    token = "held-save-token"
    c = LocalCluster(mtnlgd, os.path.join(tmp, "held"), job, nodes=2, devices="cpu:1",
                     token=token)
    n, spare = c.nodes  # dp 1: the second waits as a spare
    release = os.path.join(tmp, "release_writes")
    env = {"LD_PRELOAD": preload, "MTNLG_FAULT_HOLD_FILE": "shard_tp00_pp000.bin",
           "MTNLG_FAULT_HOLD_UNTIL": release}
    try:
        c.node_start(n, env)
        c.wait_for(lambda: status_step(n) > 0, 120, "a step")
        c.node_start(spare, env)
        code, body = post(n, "/v1/checkpoint", token)
        if code != 202:
            raise AssertionError("POST /v1/checkpoint: %d %s" % (code, body))

        def seen():
            st = json.loads(get(n, "/v1/status")[1])
            health = json.loads(get(n, "/v1/health")[1])
            metrics = get(n, "/v1/metrics")[1].splitlines()
            return (st["state"], health["state"], [x["state"] for x in st["nodes"] if x["member"]],
                    'mtnlg_state{state="checkpointing"} 1' in metrics,
                    st["checkpoint_progress"]["state"])
        want = ("checkpointing", "checkpointing", ["checkpointing"], True, "writing")
        held, deadline = None, time.time() + 60
        while time.time() < deadline and held != want:
            held = seen()
            time.sleep(0.2)
        held_log = "fault_preload: holding writes to" in n.stderr()
        open(release, "w").close()
        after, deadline = None, time.time() + 60
        while time.time() < deadline:
            st = json.loads(get(n, "/v1/status")[1])
            lc = st["last_checkpoint"]
            after = (st["state"], [x["state"] for x in st["nodes"] if x["member"]],
                     st["checkpoint_progress"]["state"], lc and lc["step"])
            if after[:3] == ("running", ["running"], "idle") and after[3]:
                break
            time.sleep(0.2)
        failures += check("test_status_says_checkpointing_while_a_save_writes",
                          held == want and held_log
                          and after[:3] == ("running", ["running"], "idle") and after[3],
                          "held: %s (status, health, nodes, metric, progress; writes held: %s); "
                          "released: %s" % (held, held_log, after))

        # a save that cannot write (the job's directory a file) is told as a
        # failure, with its error, not as the last good save's figures; the
        # next good save clears it and the count stays
        job_dir = os.path.join(ckdir, "ctlheld")
        os.rename(job_dir, job_dir + ".away")
        open(job_dir, "w").close()

        def save_and_wait(want_state):
            step0 = status_step(n)
            code, body = post(n, "/v1/checkpoint", token)
            if code != 202:
                raise AssertionError("POST /v1/checkpoint: %d %s" % (code, body))
            deadline = time.time() + 60
            while time.time() < deadline:
                st = json.loads(get(n, "/v1/status")[1])
                cp = st["checkpoint_progress"]
                if cp["state"] == want_state and (cp["step"] or 0) > step0:
                    return cp, get(n, "/v1/metrics")[1].splitlines()
                time.sleep(0.2)
            return cp, []
        bad, metrics = save_and_wait("failed")
        failed_ok = (bad["failures"] == 1 and bad["error"] and job_dir in bad["error"]
                     and bad["of"] == "node"
                     and bad["bytes_done"] is None and bad["bytes_per_s"] is None
                     and "mtnlg_checkpoint_failures_total 1" in metrics
                     and "mtnlg_checkpoint_last_save_failed 1" in metrics)

        def spare_shows(state, step):  # the cluster's last save, as the member reported it
            deadline = time.time() + 20
            while time.time() < deadline:
                cp = json.loads(get(spare, "/v1/status")[1])["checkpoint_progress"]
                if cp["state"] == state and cp["step"] == step:
                    return cp, get(spare, "/v1/metrics")[1].splitlines()
                time.sleep(0.2)
            return cp, []
        spare_bad, spare_metrics = spare_shows("failed", bad["step"])
        spare_ok = (spare_bad["of"] == "cluster" and spare_bad["error"] == bad["error"]
                    and spare_bad["failures"] == 1
                    and "mtnlg_checkpoint_last_save_failed 0" in spare_metrics
                    and "mtnlg_checkpoint_failures_total 0" in spare_metrics)
        os.remove(job_dir)
        os.rename(job_dir + ".away", job_dir)
        good, metrics = save_and_wait("idle")
        failures += check("test_a_failed_save_is_told_as_one_until_a_save_commits",
                          failed_ok and good["failures"] == 1 and good["error"] is None
                          and good["bytes_done"] and "mtnlg_checkpoint_last_save_failed 0" in metrics,
                          "failed save: %s; next save: %s" % (bad, good))
        spare_good, _ = spare_shows("idle", good["step"])
        failures += check("test_a_spare_shows_the_clusters_last_save",
                          spare_ok and spare_good["of"] == "cluster" and spare_good["error"] is None,
                          "the spare during the failed save: %s (metrics: %s); after the next: %s"
                          % (spare_bad, [m for m in spare_metrics if "last_save_failed" in m
                                         or "failures_total" in m], spare_good))
    except (AssertionError, OSError, ValueError, KeyError) as e:
        failures += check("test_checkpointing_state_runs", False, "%s\n%s" % (e, c.logs()))
    finally:
        if not os.path.exists(release):
            open(release, "w").close()
        c.kill_all()


def refused(mtnlgd, tmp, name, token_file, job, reads_need_token=True,
            says=("control.reads_need_token", "control.token_file")):
    extra = {"control": {"reads_need_token": "yes"} if reads_need_token else {}}
    if token_file is not None:
        extra["control"]["token_file"] = token_file
    c = LocalCluster(mtnlgd, os.path.join(tmp, name), job, nodes=0, devices="cpu:1")
    n = c.add_node("r0", host=True, extra=extra)
    c.nodes = [n]
    try:
        c.node_start(n)
        code = c.wait_all(30)[0]
        err = n.stderr()
        return code == 2 and all(w in err for w in says), \
            "exit %s: %s" % (code, err[-600:])
    finally:
        c.kill_all()


def test_reads_with_the_token(mtnlgd, mtnlgctl, tmp):
    """One daemon of a 4-node job, so it waits forming and trains nothing."""
    job = tiny_job(os.path.join(tmp, "job_forming.json"), os.path.join(tmp, "tokens.u16"),
                   "forming", 1000)
    c = LocalCluster(mtnlgd, os.path.join(tmp, "readtoken"), job, nodes=1, devices="cpu:2",
                     extra={"control": {"reads_need_token": "yes"}}, token="read-token")
    n = c.nodes[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTNLG_")
           and k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}

    def ctl(*args):
        return subprocess.run([mtnlgctl, "-e", n.url(), *args], capture_output=True, text=True,
                              timeout=60, env=env)
    try:
        c.start()
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if get(n, "/v1/health")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        p0 = ctl("status")
        # forming, and (once the coordinator has seen the join) saying for what
        waiting = r"^  state +forming: waiting for nodes: 1 model slot\(s\) joined of the 4 "
        deadline = time.time() + 30
        while True:
            p1 = ctl("--token-file", c.token_file, "status")
            if re.search(waiting, p1.stdout, re.M) or time.time() > deadline:
                break
            time.sleep(0.2)
        # and a job with no checkpoint.dir is said to have none, not "none yet"
        ok = (p0.returncode == 1 and "401 Unauthorized" in p0.stderr
              and p1.returncode == 0 and re.search(waiting, p1.stdout, re.M)
              and re.search(r"^  checkpoint +none: the job has no checkpoint.dir$", p1.stdout,
                            re.M))
        return check("test_mtnlgctl_reads_of_a_daemon_that_wants_the_token_send_it_after_the_401",
                     bool(ok), "without: exit %d %r; with: exit %d %r %r" % (
                         p0.returncode, p0.stderr[-300:], p1.returncode, p1.stdout[-300:],
                         p1.stderr[-300:]))
    finally:
        c.kill_all()


def test_evaluation_shows_while_it_runs(mtnlgd, mtnlgctl, tmp):
    """A member and a spare (cpu:1 each), 81 steps validating after step 80
    (600 batches of data.valid, about 2 s here) and at the end; paused
    after its first step until the spare is in (the pause acted at step 13
    here)."""
    tokens = os.path.join(tmp, "tokens.u16")
    toks = array.array("H")
    with open(tokens, "rb") as f:
        toks.frombytes(f.read())
    valid = indexed_dataset(os.path.join(tmp, "valid"),
                            [list(toks[i:i + 400]) for i in range(0, 40000, 400)])
    steps, every = 81, 80
    job = tiny_job(os.path.join(tmp, "job_eval.json"), tokens, "ctleval", steps,
                   parallel={"tp": 1, "pp": 1, "dp_min": 1, "dp_max": 1, "micro_batch": 2},
                   data={"path": tokens, "valid": valid},
                   eval={"interval": every, "iters": 600, "test": False})
    token = "eval-token"
    c = LocalCluster(mtnlgd, os.path.join(tmp, "evaluation"), job, nodes=2, devices="cpu:1",
                     token=token)
    n, spare = c.nodes  # dp 1: the second waits as a spare
    doc = oc.load(SPEC)

    def status(node):
        try:
            return json.loads(get(node, "/v1/status", timeout=2)[1])
        except (OSError, ValueError):
            return None

    # the member's systemd notifications (sd_notify), read all along
    notify = NotifySocket(os.path.join(tmp, "eval-notify.sock"))
    notes = notify.messages

    try:
        c.node_start(n, env={"NOTIFY_SOCKET": notify.path})
        c.wait_for(lambda: status_step(n) > 0, 120, "a step")
        code, body = post(n, "/v1/pause", token)
        if code != 202:
            raise AssertionError("POST /v1/pause: %d %s" % (code, body))
        c.node_start(spare)
        c.wait_for(lambda: [x["role"] for x in (status(n) or {}).get("nodes", [])
                            if x["name"] == spare.name] == ["spare"], 60, "the spare")
        c.wait_for(lambda: (status(n) or {}).get("state") == "paused", 60, "the pause")
        paused_at = status_step(n)
        code, body = post(n, "/v1/resume", token)
        if code != 202:
            raise AssertionError("POST /v1/resume: %d %s" % (code, body))
        seen, at_spare, during, printed, history = [], [], None, None, None
        deadline = time.time() + 120
        while time.time() < deadline and n.running():
            for node, into in ((n, seen), (spare, at_spare)):
                st = status(node)
                ev = st.get("evaluation") if st else None
                if ev is None:
                    continue
                into.append((st["step"], ev["split"], ev["end_of_training"], ev["after_step"],
                             ev["batches_done"], ev["batches"], st.get("eta_s"),
                             ev["elapsed_s"]))
                if node is n and history is None and ev["end_of_training"] and mtnlgctl:
                    history = subprocess.run([mtnlgctl, "-e", n.url(), "history", "--last", "2"],
                                             capture_output=True, text=True, timeout=30)
                if node is n and during is None and ev["batches_done"] < 300:
                    during = st
                    if mtnlgctl:
                        printed = subprocess.run([mtnlgctl, "-e", n.url(), "status"],
                                                 capture_output=True, text=True, timeout=30)
            time.sleep(0.02)
        codes = c.wait_all(60)
        time.sleep(0.2)  # the last datagrams in
        notify.close()
        done = n.steps()
        errors = oc.check_response(doc, "GET", "/v1/status", 200, json.dumps(during),
                                   "application/json") if during else ["never seen"]
        # the interval's validation after step 80 (step 79 the last reported
        # meanwhile), then the end of training's after step 81 (step 80)
        mid = [s for s in seen if not s[2]]
        end = [s for s in seen if s[2]]
        counts = [s[4] for s in mid]
        # the ETA counts the batches left, the end's pass's too, at the
        # pass's pace: at least a tenth of it (the pace the status shows runs
        # to the read, the ETA's to the last batch, so a stalled engine's
        # reads it lower; a pace taken over 50 batches or more); it used to
        # count the steps alone, 2 and then 1, some 0.03 s against 3 s here
        slow = [s for s in seen if s[4] >= 50 and not (
            s[6] is not None and s[6] >= 0.1 * s[7] / s[4] * (600 - s[4] + (0 if s[2] else 600)))]
        paced = [s for s in seen if s[4] >= 50]
        line = re.search(r"^  evaluating +validation after step %d: batch \d+ of 600, .* so far$"
                         % every, printed.stdout, re.M) if printed else True
        # mtnlgctl history during the end's pass: step 80 with its validation
        rows = [l.split()[:3] for l in history.stdout.splitlines()[1:3]] if history else []
        shown = (rows == [[str(every - 1), "%.4f" % done[every - 2]["loss"], "-"],
                          [str(every), "%.4f" % done[every - 1]["loss"],
                           "%.4f" % done[every - 1]["val_loss"]]]
                 if history and len(done) == steps and "val_loss" in done[every - 1] else
                 not mtnlgctl)
        # systemctl status says the pass, then the step its line reports; the
        # notifier sends the newest status when its thread comes round (as
        # systemd shows only the newest), so under load a status a newer one
        # follows at once (the pass's "batch 600 of 600", then step 80's
        # line) may never go out: the batches it told only go forward
        told = [m for m in notes if m.startswith("STATUS=")]
        passes = [m for m in told if "validation after step %d: batch" % every in m]
        batches = [int(re.search(r"batch (\d+) of 600$", m).group(1)) for m in passes
                   if re.search(r"batch (\d+) of 600$", m)]
        step_told = [i for i, m in enumerate(told)
                     if m.startswith("STATUS=running generation 1: step %d/" % every)]
        notified = (passes and len(batches) == len(passes) and batches == sorted(batches)
                    and any("validation at the end of training after step %d" % steps in m
                            for m in told)
                    and step_told and told.index(passes[-1]) < step_told[0])
        conditions = {
            "both exit 0": codes == [0, 0],
            "paused before the pass": paused_at < every,
            "a pass after step 80 seen": bool(mid),
            "the end's pass seen": bool(end),
            "the pass after step 80 told at step 79": all(
                s[:4] == (every - 1, "valid", False, every) for s in mid),
            "the end's pass told at step 80": all(
                s[:4] == (every, "valid", True, steps) for s in end),
            "batches within 0..600": all(s[5] == 600 and 0 <= s[4] <= 600
                                         for s in seen + at_spare),
            "batches done never go back": counts == sorted(counts) and len(set(counts)) > 1,
            "the status conforms": not errors,
            "mtnlgctl status prints the pass": bool(line),
            "mtnlgctl history shows the validation": bool(shown),
            "systemd told the passes": bool(notified),
            "the ETA counts the batches left": bool(paced) and not slow,
            "every step reported": [s["step"] for s in done] == list(range(1, steps + 1)),
            "the losses carry val_loss": ("val_loss" in done[every - 1]
                                          and "final_val_loss" in done[steps - 1])
            if len(done) == steps else False,
            "the spare saw the pass": (every - 1, "valid", False, every) in [
                s[:4] for s in at_spare],
            "the spare's step before the pass's": all(s[0] < s[3] for s in at_spare),
        }
        failed = [k for k, v in conditions.items() if not v]
        ok = not failed
        return check("test_status_shows_a_validation_under_way_until_its_step_is_reported", bool(ok),
                     "%sexit %s; paused at step %s; the member saw %d statuses in a pass: first "
                     "%s, last %s; ETA short of the batches left in %d of %d: %s; the spare "
                     "%d: first %s, last %s; contract %s; systemd told %d passes' "
                     "statuses of %d: %s; mtnlgctl history %r; mtnlgctl status: %r" % (
                         "not true: %s; " % failed if failed else "", codes, paused_at, len(seen),
                         seen[:1], seen[-1:], len(slow),
                         len(paced), slow[:3], len(at_spare),
                         at_spare[:1], at_spare[-1:], errors[:3], len(passes), len(told),
                         passes[:1] + passes[-1:], history.stdout if history else None,
                         printed.stdout[-600:] if printed else None))
    finally:
        notify.close()
        c.kill_all()


def main():
    global failures
    mtnlgd, preload = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
    mtnlgctl = os.path.abspath(sys.argv[3]) if len(sys.argv) > 3 else None
    tmp = tempfile.mkdtemp(prefix="mt_ctlnode_")
    try:
        test_live_node(mtnlgd, tmp, mtnlgctl)
        test_checkpointing_state(mtnlgd, preload, tmp)
        failures += test_evaluation_shows_while_it_runs(mtnlgd, mtnlgctl, tmp)
        job = tiny_job(os.path.join(tmp, "job_nockpt.json"), os.path.join(tmp, "tokens.u16"),
                       "refused", 10)
        ok, why = refused(mtnlgd, tmp, "nofile", None, job)
        failures += check("test_reads_need_token_without_token_file_is_refused_at_start", ok, why)
        empty = os.path.join(tmp, "empty_token")
        open(empty, "w").close()
        os.chmod(empty, 0o600)
        ok, why = refused(mtnlgd, tmp, "empty", empty, job)
        failures += check("test_reads_need_token_with_an_empty_token_file_is_refused_at_start",
                          ok, why)
        two = os.path.join(tmp, "two_line_token")
        with open(two, "w") as f:
            f.write("secret-token\nline2\n")
        os.chmod(two, 0o600)
        ok, why = refused(mtnlgd, tmp, "two", two, job, reads_need_token=False,
                          says=("control.token_file %s: a line break (0x0a) at byte 12 between "
                                "two words" % two, "mtnlgctl refuses to send"))
        failures += check("test_token_file_of_two_lines_is_refused_at_start", ok, why)
        utf8 = os.path.join(tmp, "utf8_token")
        with open(utf8, "wb") as f:
            f.write("s\u00e9cret\n".encode())
        os.chmod(utf8, 0o600)
        ok, why = refused(mtnlgd, tmp, "utf8", utf8, job, reads_need_token=False,
                          says=("control.token_file %s: byte 0xc3 at offset 1 is not printable "
                                "ASCII" % utf8, "a non-ASCII character"))
        failures += check("test_token_file_not_ascii_is_refused_at_start_naming_the_byte", ok,
                          why)
        if mtnlgctl:
            failures += test_reads_with_the_token(mtnlgd, mtnlgctl, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
