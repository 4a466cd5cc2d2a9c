"""tools/local-cluster's hold on its --dir: one cluster to a directory.

usage: test_local_cluster.py MTNLGD [ETCD MTNLGCTL]

One daemon (cpu:1, the tiny model, a long job) started by tools/local-cluster
in a temporary --dir:
- test_second_cluster_in_a_dir_is_refused: a second local-cluster in the
  same --dir exits 1 with one line naming the first's pid and its daemon's
  and how to stop it, and touches nothing of it: every file the first wrote
  (configs, logs, its step log, the lock) keeps its inode and its bytes, no
  file is added, and the first trains on; a SIGTERM to the first's pid
  stops it (exit 0);
- test_lock_of_a_dead_run_does_not_block: a cluster starts in the same
  --dir after that (the lock file still names the dead run's pids);
- test_daemons_outliving_their_local_cluster_keep_the_dir: with its daemon
  stopped (SIGSTOP) and local-cluster SIGKILLed, a second start is refused
  naming the daemon that still writes there and that local-cluster is gone;
  once the daemon is continued, it stops (its launcher's death SIGTERMed
  it) and the directory is free.
- test_local_cluster_with_etcd_restarts_the_daemons_and_the_job_goes_on:
  `--etcd 1 --nodes 2` (dp 1), the node elected coordinator SIGKILLed:
  local-cluster starts it again and the other, which exits 1, as systemd
  would; another term is elected, the job resumes from its newest
  checkpoint (local-cluster says so) and goes on until a SIGTERM to
  local-cluster stops every daemon, exit 0, no etcd left
  (skipped without ETCD, Debian's etcd-server); `mtnlgctl -e ELECTED,OTHER
  watch`, started before the kill, is answered by the other node after it
  and sees the job go on.
Each check prints `ok NAME` or `FAIL NAME: detail`.
"""
import fcntl
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
LOCAL_CLUSTER = os.path.join(HERE, "..", "..", "tools", "local-cluster")
sys.path.insert(0, os.path.join(HERE, "..", "..", "tools"))
from local_cluster import check, license_tokens, tiny_job  # noqa: E402


def expect(name, ok, detail):
    """check(), with the detail printed only for a failure."""
    return check(name, ok, "" if ok else detail)


class Run:
    """One tools/local-cluster process, its output in a file."""

    def __init__(self, tmp, name, mtnlgd, run_dir, job, token_file):
        self.log = os.path.join(tmp, name + ".log")
        self.steps = os.path.join(run_dir, "steps.jsonl")
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, LOCAL_CLUSTER, "--nodes", "1", "--devices", "cpu:1",
                 "--job", job, "--dir", run_dir, "--mtnlgd", mtnlgd,
                 "--token-file", token_file, "--steps-log", self.steps],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def output(self):
        with open(self.log, errors="replace") as f:
            return f.read()

    def daemon_pid(self):
        m = re.search(r"^  n0\s+pid (\d+)", self.output(), re.M)
        return int(m.group(1)) if m else None

    def steps_taken(self):
        return len(self.output().split("\nstep ")) - 1

    def wait_for_steps(self, count, timeout=180):
        deadline = time.time() + timeout
        while time.time() < deadline and self.proc.poll() is None:
            if self.steps_taken() >= count:
                return True
            time.sleep(0.1)
        return False


def snapshot(run_dir):
    """Every plain file in run_dir: its inode and bytes."""
    out = {}
    for name in sorted(os.listdir(run_dir)):
        path = os.path.join(run_dir, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[name] = (os.stat(path).st_ino, f.read())
    return out


def lock_free(run_dir):
    fd = os.open(os.path.join(run_dir, "lock"), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def second_start(mtnlgd, run_dir, job, token_file, refused_within_s=30):
    """A second local-cluster in run_dir: (exit code, stdout, stderr), the
    code None when it was not refused within refused_within_s but started
    (then stopped, its daemons with it)."""
    p = subprocess.Popen([sys.executable, LOCAL_CLUSTER, "--nodes", "1", "--devices", "cpu:1",
                          "--job", job, "--dir", run_dir, "--mtnlgd", mtnlgd,
                          "--token-file", token_file], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        out, err = p.communicate(timeout=refused_within_s)
        return p.returncode, out, err
    except subprocess.TimeoutExpired:
        p.terminate()
        try:
            out, err = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        return None, out[-2000:], err[-2000:]


def test_etcd_failover(mtnlgd, mtnlgctl, tmp, tokens, etcd_bin):
    """tools/local-cluster --etcd 1 with two daemons (dp 1: one trains, one
    waits as a spare) and a checkpoint every 10 steps: the node elected
    coordinator is SIGKILLed. local-cluster starts it again, as systemd
    would; the other exits 1 (its coordinator lost) and is started again;
    one of them is elected (another term, counting the loss), the job
    resumes from its newest checkpoint and completes; local-cluster says
    each step of it, exits 0, and leaves no etcd member running."""
    name = "test_local_cluster_with_etcd_restarts_the_daemons_and_the_job_goes_on"
    if not etcd_bin or not os.access(etcd_bin, os.X_OK) or not mtnlgctl:
        print("skipped %s: no etcd at %s (Debian's etcd-server)" % (name, etcd_bin))
        return 0
    # long enough not to end before the kill (a step is a few ms), and
    # stopped by a SIGTERM to local-cluster once it went on after it
    steps = 100000
    job = tiny_job(os.path.join(tmp, "etcd-job.json"), tokens, "lc-etcd", steps,
                   parallel={"tp": 1, "pp": 1, "dp_min": 1, "dp_max": 1, "micro_batch": 2},
                   checkpoint={"dir": os.path.join(tmp, "etcd-ck"), "interval": 10})
    run_dir = os.path.join(tmp, "etcd-run")
    log, steps_log = os.path.join(tmp, "etcd-run.log"), os.path.join(tmp, "etcd-steps.jsonl")
    with open(log, "w") as out:
        p = subprocess.Popen([sys.executable, LOCAL_CLUSTER, "--etcd", "1", "--etcd-bin", etcd_bin,
                              "--nodes", "2", "--devices", "cpu:1", "--job", job, "--dir", run_dir,
                              "--mtnlgd", mtnlgd, "--steps-log", steps_log],
                             stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def output():
        with open(log, errors="replace") as f:
            return f.read()
    try:
        deadline, m = time.time() + 120, None
        while time.time() < deadline and p.poll() is None:
            m = re.search(r"^local-cluster: (n[01]) elected coordinator \(term ([0-9a-f]{16})\)$",
                          output(), re.M)
            if m and len(output().split("\nstep ")) > 15:
                break
            time.sleep(0.1)
        if not m:
            raise AssertionError("no node was said elected:\n" + output()[-3000:])
        first, term = m.group(1), m.group(2)
        other = "n1" if first == "n0" else "n0"
        pid = int(re.search(r"^  %s\s+pid (\d+)" % first, output(), re.M).group(1))
        urls = {n: re.search(r"^  %s\s+pid \d+\s+control (\S+)" % n, output(), re.M).group(1)
                for n in (first, other)}
        # an operator's watch of the elected node, given the other's too
        watch_out = os.path.join(tmp, "etcd-watch.jsonl")
        with open(watch_out, "w") as out:
            watch = subprocess.Popen([mtnlgctl, "-e", "%s,%s" % (urls[first], urls[other]), "-o",
                                      "json", "watch", "--interval", "0.3"], stdout=out,
                                     stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        time.sleep(1.0)
        os.kill(pid, signal.SIGKILL)
        # another coordinator elected, and the job 20 steps on under it:
        # local-cluster stops every daemon at a step boundary (exit 0)
        elected_again = re.compile(r"^local-cluster: n[01] elected coordinator \(term (?!%s)"
                                   % term, re.M)
        def watched_on():
            """The watch answered by the other node after the kill, and from
            then on (whichever node answered) saw the job go past it."""
            with open(watch_out) as f:
                seen = [json.loads(line) for line in f if line.startswith("{")]
            answered = [st.get("node") for st in seen]
            at = answered.index(other) if other in answered else 0
            return (answered[:1] == [first] and at > 0
                    and max(st.get("step") or 0 for st in seen[at:])
                    > max(st.get("step") or 0 for st in seen[:at]))

        t_wait, deadline, went_on = time.time(), time.time() + 120, False
        while time.time() < deadline and p.poll() is None and not went_on:
            m = elected_again.search(output())
            went_on = (m is not None and output()[m.end():].count("\nstep ") >= 20
                       and watched_on() and re.search(
                           r"^local-cluster: %s started again" % other, output(), re.M)
                       and "joined the rendezvous" in open(os.path.join(
                           run_dir, other + ".err"), errors="replace").read())
            time.sleep(0.2)
        waited = time.time() - t_wait
        p.send_signal(signal.SIGTERM)
        try:
            code = p.wait(timeout=120)
        except subprocess.TimeoutExpired:
            code = None
        watch.terminate()
        watch.wait(30)
        with open(watch_out) as f:
            answered = [json.loads(line).get("node") for line in f if line.startswith("{")]
        watched = watched_on()
        said = output()
        with open(steps_log) as f:
            recs = [json.loads(line) for line in f if line.strip()]
        m2 = re.search(r"^local-cluster: (n[01]) elected coordinator \(term ([0-9a-f]{16})\): the "
                       r"coordinator %s was lost \(its lease on coord/leader in etcd lapsed\)$"
                       % first, said, re.M)
        # the steps since the checkpoint it resumed from, trained again (none
        # when the kill came as the checkpoint was committed, a likely
        # moment where a save takes longer than the steps between)
        m3 = re.search(r"^local-cluster: the job resumed from its step (\d+) checkpoint: steps "
                       r"(\d+) to (\d+) run again$", said, re.M)
        daemon_said = re.search(r"resumed from \S+: step (\d+)", "".join(
            open(os.path.join(run_dir, n + ".err"), errors="replace").read()
            for n in ("n0", "n1")))
        etcd_left = [d for d in os.listdir("/proc") if d.isdigit() and run_dir in _cmdline(d)]
        ok = (code == 0 and m2 and m2.group(2) != term
              and "local-cluster: %s exited killed by SIGKILL; starting it again in 1 s" % first
              in said
              and re.search(r"^local-cluster: %s started again: pid \d+$" % first, said, re.M)
              and re.search(r"^local-cluster: %s exited with 1: node %s exits \(1\): coordinator "
                            r"lost: .*; starting it again in 1 s$" % (other, other), said, re.M)
              and daemon_said and int(daemon_said.group(1)) % 10 == 0
              and (m3 is None or m3.group(1) == daemon_said.group(1))
              and went_on and recs and recs[-1]["step"] >= int(daemon_said.group(1)) + 20
              # each daemon's last word: stopped, or its restart called off by the stop
              and all(re.findall(r"^local-cluster: %s (exited with \d+|is not started again)"
                                 % n, said, re.M)[-1:] in (["exited with 0"],
                                                            ["is not started again"])
                      for n in ("n0", "n1"))
              and not etcd_left and watched)
        return check(name, ok, "exit %s; %s elected first (term %s), SIGKILLed; then %s; "
                     "resumed: %s (%s); last step %s; processes left in its dir %s; mtnlgctl watch "
                     "-e %s,%s answered by %s; waited %.1f s for it all%s" % (
                         code, first, term, m2.group(0) if m2 else None,
                         m3.group(0) if m3 else None,
                         daemon_said.group(0) if daemon_said else None,
                         recs[-1]["step"] if recs else None,
                         etcd_left, first, other,
                         [(k, len(list(g))) for k, g in itertools.groupby(answered)], waited,
                         "" if ok else "\n" + said[-3000:]))
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def _cmdline(pid):
    try:
        with open("/proc/%s/cmdline" % pid, "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def main():
    mtnlgd = sys.argv[1]
    etcd_bin = sys.argv[2] if len(sys.argv) > 2 else None
    mtnlgctl = sys.argv[3] if len(sys.argv) > 3 else None
    failures = 0
    tmp = tempfile.mkdtemp(prefix="mtnlg-lc-")
    runs, daemons = [], []
    try:
        tokens = license_tokens(os.path.join(tmp, "tokens.u16"))
        # one rank (tp, pp, dp 1), trained for longer than the test runs
        job = tiny_job(os.path.join(tmp, "job.json"), tokens, "lock", 100000,
                       model={"preset": "tiny"}, parallel={"micro_batch": 2},
                       train={"global_batch": 2, "steps": 100000, "seed": 3,
                              "lr": {"schedule": "constant", "peak": 1e-3}})
        token_a, token_b = os.path.join(tmp, "token-a"), os.path.join(tmp, "token-b")
        for path, word in ((token_a, "first-token"), (token_b, "second-token")):
            with open(path, "w") as f:
                f.write(word + "\n")
            os.chmod(path, 0o600)
        run_dir = os.path.join(tmp, "run")

        # --- a second cluster in the directory of a running one ---
        a = Run(tmp, "a", mtnlgd, run_dir, job, token_a)
        runs.append(a)
        if not a.wait_for_steps(2):
            raise AssertionError("the first cluster took no step:\n" + a.output())
        n0 = a.daemon_pid()
        daemons.append(n0)
        before = snapshot(run_dir)
        code, out, err = second_start(mtnlgd, run_dir, job, token_b)
        after = snapshot(run_dir)
        line = err.strip()
        failures += expect(
            "test_second_cluster_in_a_dir_is_refused",
            code == 1 and "\n" not in line and
            "%s is in use by a cluster tools/local-cluster started there, still running" % run_dir
            in line and "local-cluster pid %d; daemons n0 %d" % (a.proc.pid, n0) in line and
            "kill %d" % a.proc.pid in line and not out,
            "exit %s (None: started)\nstdout: %s\nstderr: %s" % (code, out, err))
        touched = [name for name, (ino, data) in before.items()
                   if name not in after or after[name][0] != ino or
                   not after[name][1].startswith(data) or
                   (name.endswith(".conf") or name in ("lock", "token")) and
                   after[name][1] != data]
        failures += expect("test_second_cluster_leaves_the_first_ones_files",
                           not touched and set(after) == set(before),
                           "changed: %s; files before %s, after %s" % (
                               touched, sorted(before), sorted(after)))
        steps = a.steps_taken()
        failures += expect("test_first_cluster_trains_on_after_the_refusal",
                          a.wait_for_steps(steps + 2, timeout=60), a.output()[-2000:])
        a.proc.send_signal(signal.SIGTERM)
        try:
            code = a.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            code = None
        failures += expect("test_sigterm_to_local_cluster_stops_it", code == 0,
                          "exit %s\n%s" % (code, a.output()[-2000:]))

        # --- the lock file of that dead run, its pids in it, blocks nothing ---
        c = Run(tmp, "c", mtnlgd, run_dir, job, token_a)
        runs.append(c)
        failures += expect("test_lock_of_a_dead_run_does_not_block", c.wait_for_steps(1),
                          c.output()[-2000:])
        n0 = c.daemon_pid()
        if n0:
            daemons.append(n0)
            # --- a daemon outliving its local-cluster still holds the directory ---
            os.kill(n0, signal.SIGSTOP)
            c.proc.kill()
            c.proc.wait()
            code, out, err = second_start(mtnlgd, run_dir, job, token_b)
            line = err.strip()
            refused = (code == 1 and "daemons n0 %d; local-cluster pid %d is gone"
                       % (n0, c.proc.pid) in line and "kill %d" % n0 in line)
            os.kill(n0, signal.SIGCONT)
            deadline = time.time() + 120
            while time.time() < deadline and not lock_free(run_dir):
                time.sleep(0.1)
            failures += expect("test_daemons_outliving_their_local_cluster_keep_the_dir",
                              refused and lock_free(run_dir),
                              "exit %s (None: started)\nstderr: %s" % (code, err))
        failures += test_etcd_failover(mtnlgd, mtnlgctl, tmp, tokens, etcd_bin)
    except Exception as e:  # noqa: BLE001 - a harness error is a failure
        failures += expect("harness", False, "%s: %s" % (type(e).__name__, e))
    finally:
        for r in runs:
            if r.proc.poll() is None:
                r.proc.kill()
                r.proc.wait()
        for pid in daemons:
            try:
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, TypeError):
                pass
        if failures:
            for r in runs:
                print("--- %s\n%s" % (r.log, r.output()[-3000:]))
        shutil.rmtree(tmp, ignore_errors=True)
    print("%d failed" % failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
