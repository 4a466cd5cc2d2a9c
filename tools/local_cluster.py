"""A cluster of mtnlgd node daemons on this machine, on loopback.

tools/local-cluster (the command) and the cluster tests use this: it writes one
node config per daemon into a run directory, starts the daemons as processes
(each with its own log files), and stops them by pid. Ports are probed free,
never fixed. Standard library only.
"""

import base64
import fcntl
import json
import os
import random
import re
import signal
import socket
import subprocess
import time
import urllib.request


_handed_out = set()
_rng = random.SystemRandom()  # a test seeding random must not make two tests pick alike


def _below_ephemeral():
    """The ports from 10000 up to the kernel's ephemeral range
    (ip_local_port_range), or None where that range is unknown or low."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return (10000, low - 1) if low > 11000 else None


def free_port():
    """A TCP port nobody listens on right now, that this process has not
    handed out before (a cluster's daemons get their ports before any of
    them binds, and the kernel may offer a port it just gave back again: two
    daemons of one cluster were seen with one), and below the kernel's
    ephemeral range: a port from that range (bind to port 0) could go to an
    outgoing connection, the daemons' own Gloo meshes and store clients
    among them, before the daemon it was meant for binds it (a spare was
    seen failing so)."""
    span = _below_ephemeral()
    for _ in range(1000):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", _rng.randint(*span) if span else 0))
            except OSError:
                continue  # taken: another
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no free TCP port on 127.0.0.1 that was not handed out already")


def _step_records(lines):
    """The JSON step records among a daemon's stdout lines."""
    out = []
    for line in lines:
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def output_losses(out):
    """(step, loss) of each JSON step record in a process's output text
    (--log-format json), other lines (stderr's, when merged) passed over."""
    return [(r["step"], r["loss"]) for r in _step_records(out.splitlines())
            if isinstance(r, dict) and "loss" in r and "step" in r]


def _die_with_parent():
    """In the child before exec: SIGTERM when the process that started it dies
    (prctl PR_SET_PDEATHSIG), so a daemon in a session of its own is not left
    training when its launcher is killed."""
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)


def systemd_restarts(code):
    """Whether systemd's Restart=on-failure with RestartPreventExitStatus=2
    (mtnlgd.service) starts a daemon that ended so (a Popen return code)
    again: an exit other than 0 and 2, or a signal other than the clean ones
    (SIGHUP, SIGINT, SIGTERM, SIGPIPE)."""
    if code >= 0:
        return code not in (0, 2)
    return -code not in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE)


def describe_exit(code):
    """A Popen return code in words: "0", "1", "killed by SIGKILL"."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            return "killed by %s" % signal.Signals(-code).name
        except ValueError:
            return "killed by signal %d" % -code
    return str(code)


# ---- one cluster to a run directory ----

LOCK_NAME = "lock"


class DirInUse(Exception):
    """lock_run_dir: a cluster started in the directory still runs. holders
    are the (name, pid) pairs its lock file names that are still alive;
    gone_tool is the pid of the tool that started it when that one is gone."""

    def __init__(self, run_dir, holders, gone_tool=None):
        super().__init__(run_dir)
        self.run_dir, self.holders, self.gone_tool = run_dir, holders, gone_tool

    def stop_pids(self):
        """The pids to SIGTERM to stop that cluster at a step boundary: the
        tool's (it stops every daemon), else the daemons left."""
        tool = [pid for name, pid in self.holders if name == "local-cluster"]
        return tool or [pid for _, pid in self.holders]

    def __str__(self):
        daemons = ", ".join("%s %d" % h for h in self.holders if h[0] != "local-cluster")
        tool = [pid for name, pid in self.holders if name == "local-cluster"]
        if tool:
            who = "local-cluster pid %d%s" % (tool[0], "; daemons " + daemons if daemons else "")
        elif daemons:
            who = "daemons %s%s" % (daemons, "; local-cluster pid %d is gone" % self.gone_tool
                                    if self.gone_tool else "")
        else:
            who = "its lock file names no live process yet: it is starting"
        stop = " ".join(map(str, self.stop_pids()))
        how = ("Ctrl-C in its terminal, or kill %s: every daemon stops at its next step "
               "boundary" % stop if tool else
               "kill %s: they stop at their next step boundary" % stop if stop else
               "Ctrl-C in its terminal")
        return ("%s is in use by a cluster tools/local-cluster started there, still running "
                "(%s): stop it first (%s), or give another --dir" % (self.run_dir, who, how))


def lock_holders(text):
    """The (name, pid) pairs a lock file's NAME=PID words name, in order."""
    out = []
    for word in text.split():
        name, _, pid = word.partition("=")
        if pid.isdigit():
            out.append((name, int(pid)))
    return out


def _alive(pid):
    """Whether pid runs: a zombie (dead, not yet waited for) does not."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def lock_run_dir(run_dir):
    """Locks run_dir for one cluster (flock on run_dir/lock, exclusive, not
    waiting) before anything in it is written, or raises DirInUse naming the
    processes of the cluster that holds it. Returns the locked fd: keep it
    open for the cluster's life and give it to LocalCluster(lock_fd=...),
    which hands it to every daemon. A second cluster in one directory would
    truncate the running one's logs (n*.out, n*.err: reopened with "w"),
    rewrite its configs and token, and follow its step lines as its own.

    The lock is the open file, not a pid written down: the kernel drops it
    with the last process that holds the fd, however that ended (SIGKILL
    included), so a dead run leaves nothing stale. The daemons hold it too,
    by choice: when local-cluster is killed its daemons live on until they
    reach a step boundary (its death SIGTERMs them, and a stop may write a
    checkpoint), or longer if they hang, and they still write in the
    directory meanwhile, so it stays refused until the last of them exits.
    The file's words (NAME=PID) only say whom a refusal names."""
    os.makedirs(run_dir, exist_ok=True)
    fd = os.open(os.path.join(run_dir, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        named = lock_holders(os.pread(fd, 4096, 0).decode("ascii", "replace"))
        os.close(fd)
        gone = [pid for name, pid in named if name == "local-cluster" and not _alive(pid)]
        raise DirInUse(run_dir, [(n, p) for n, p in named if _alive(p)],
                       gone[0] if gone else None) from None
    write_lock_holders(fd, [("local-cluster", os.getpid())])
    return fd


def write_lock_holders(fd, holders):
    """Says in the locked file who holds it: NAME=PID words on one line."""
    line = " ".join("%s=%d" % h for h in holders) + "\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, line.encode("ascii"), 0)


class Node:
    def __init__(self, cluster, name, conf, out, err):
        self.cluster, self.name, self.conf = cluster, name, conf
        self.out_path, self.err_path = out, err
        self.proc = None
        self.control_port = None
        self._out_offset = 0  # new_steps(): how far stdout was read
        self._partial = ""

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def stdout(self):
        with open(self.out_path, errors="replace") as f:
            return f.read()

    def stderr(self):
        with open(self.err_path, errors="replace") as f:
            return f.read()

    def steps(self):
        """The step records this node printed (JSON step lines)."""
        return _step_records(self.stdout().splitlines())

    def new_steps(self):
        """The step records printed since the last call: reads only what was
        appended, so following a long run costs the same at step 100000 as at
        step 10."""
        with open(self.out_path, errors="replace") as f:
            f.seek(self._out_offset)
            chunk = f.read()
            self._out_offset = f.tell()
        lines = (self._partial + chunk).split("\n")
        self._partial = lines.pop()  # a line still being written
        return _step_records(lines)

    def log_time(self, pattern):
        """Unix time of this node's first log line matching pattern (mtnlgd
        starts each line with an ISO UTC time), or None."""
        import calendar
        for line in self.stderr().splitlines():
            if re.search(pattern, line):
                m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)Z", line)
                if m:
                    return (calendar.timegm(time.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S"))
                            + float(m.group(2)))
        return None

    def signal(self, sig):
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def wait(self, timeout):
        return self.proc.wait(timeout=timeout)

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def url(self):
        return "http://127.0.0.1:%d" % self.control_port


class LocalCluster:
    """n daemons named n0..n{n-1}; n0 hosts the rendezvous and coordinates."""

    def __init__(self, mtnlgd, run_dir, job, nodes=4, devices="cpu:2", job_sets=(),
                 heartbeat_ms=200, timeout_ms=2000, last_call_ms=500, cpu_threads=1,
                 log_format="json", extra=None, token=None, token_file=None,
                 own_session=False, lock_fd=None, nice=0):
        self.mtnlgd, self.dir, self.job = mtnlgd, run_dir, job
        # nice: the daemons' niceness, so that a test's own processes (a
        # browser driven beside them) are not starved by their training
        self.nice = nice
        self.job_sets = list(job_sets)
        self.port = free_port()
        self.endpoint = "127.0.0.1:%d" % self.port
        self.heartbeat_ms, self.timeout_ms = heartbeat_ms, timeout_ms
        self.last_call_ms, self.cpu_threads = last_call_ms, cpu_threads
        self.devices, self.log_format = devices, log_format
        self.extra = extra or {}
        # own_session: each daemon in a session of its own, so that a
        # terminal's Ctrl-C reaches only the caller, which stops them once
        # (tools/local-cluster); they still get SIGTERM if the caller dies.
        self.own_session = own_session
        # lock_fd: lock_run_dir's; every daemon inherits it (see there)
        self.lock_fd = lock_fd
        # token_file: the daemons read the caller's file, which is then the
        # one file a person is told of (token= writes run_dir/token)
        self.token_file = token_file
        os.makedirs(run_dir, exist_ok=True)
        if token and not token_file:
            self.token_file = os.path.join(run_dir, "token")
            with open(self.token_file, "w") as f:
                f.write(token + "\n")
            os.chmod(self.token_file, 0o600)
        self.nodes = [self.add_node("n%d" % i, host=(i == 0)) for i in range(nodes)]

    def add_node(self, name, host=False, devices=None, job=None, job_in_config=True, extra=None):
        """Writes the node's config; start() or node_start() runs it."""
        conf = os.path.join(self.dir, name + ".conf")
        sections = {
            "node": {"name": name, "devices": devices or self.devices,
                     "cpu_threads": self.cpu_threads},
            "rendezvous": {"endpoint": self.endpoint, "host": "yes" if host else "no",
                           "last_call_ms": self.last_call_ms, "join_timeout_s": 60},
            "cluster": {"heartbeat_interval_ms": self.heartbeat_ms,
                        "heartbeat_timeout_ms": self.timeout_ms,
                        "comm_timeout_ms": 60000},
            "control": {"listen": "127.0.0.1:%d" % free_port()},
            "paths": {"state_dir": os.path.join(self.dir, name + ".state")},
            "log": {"level": "info", "format": self.log_format},
        }
        if self.token_file:
            sections["control"]["token_file"] = self.token_file
        if job_in_config and (job or self.job):
            sections["job"] = {"path": job or self.job}
        for sec, kv in list(self.extra.items()) + list((extra or {}).items()):
            sections.setdefault(sec, {}).update(kv)
        with open(conf, "w") as f:
            f.write("# written by tools/local_cluster.py\n")
            for sec, kv in sections.items():
                f.write("[%s]\n" % sec)
                for k, v in kv.items():
                    f.write("%s = %s\n" % (k, v))
        node = Node(self, name, conf, os.path.join(self.dir, name + ".out"),
                    os.path.join(self.dir, name + ".err"))
        node.control_port = int(sections["control"]["listen"].rsplit(":", 1)[1])
        return node

    def node_start(self, node, env=None):
        args = [self.mtnlgd, "--config", node.conf]
        for s in self.job_sets:
            args += ["--job-set", s]
        e = dict(os.environ)
        e.update(env or {})
        node._out_offset, node._partial = 0, ""  # new_steps() reads the new file
        with open(node.out_path, "w") as out, open(node.err_path, "w") as err:
            node.proc = subprocess.Popen(args, stdout=out, stderr=err, env=e,
                                         stdin=subprocess.DEVNULL,
                                         start_new_session=self.own_session,
                                         pass_fds=() if self.lock_fd is None else (self.lock_fd,),
                                         preexec_fn=self._preexec())
        return node

    def _preexec(self):
        """What a daemon's child runs before exec, or None."""
        if not self.own_session and not self.nice:
            return None

        def run():
            if self.nice:
                os.nice(self.nice)
            if self.own_session:
                _die_with_parent()
        return run

    def start(self, env=None):
        for n in self.nodes:
            self.node_start(n, env)
        return self

    def wait_all(self, timeout, nodes=None):
        """Exit codes of the nodes (None for those still running at the deadline)."""
        nodes = nodes or self.nodes
        deadline = time.time() + timeout
        codes = []
        for n in nodes:
            try:
                codes.append(n.proc.wait(timeout=max(0.1, deadline - time.time())))
            except subprocess.TimeoutExpired:
                codes.append(None)
        return codes

    def wait_for(self, predicate, timeout, what):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        raise AssertionError("timed out after %.0f s waiting for %s\n%s" % (timeout, what, self.logs()))

    def stop(self, timeout=30):
        """SIGTERM every daemon still running, then SIGKILL what outlives timeout."""
        for n in self.nodes:
            n.signal(signal.SIGTERM)
        deadline = time.time() + timeout
        for n in self.nodes:
            if not n.proc:
                continue
            try:
                n.proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                n.signal(signal.SIGKILL)
                n.proc.wait()

    def kill_all(self):
        for n in self.nodes:
            n.signal(signal.SIGKILL)
            if n.proc:
                n.proc.wait()

    def logs(self, tail=25):
        parts = []
        for n in self.nodes:
            if not os.path.exists(n.err_path):
                continue
            lines = n.stderr().splitlines()[-tail:]
            parts.append("--- %s (pid %s, exit %s) ---\n%s" % (
                n.name, n.pid, n.proc.poll() if n.proc else None, "\n".join(lines)))
        return "\n".join(parts)


class Etcd:
    """An etcd cluster of members (three by default) on loopback (Debian's
    etcd-server), its data and logs in dir; stopped by their pids."""

    def __init__(self, binary, dir, members=3, die_with_parent=False):
        self.binary, self.dir, self.members = binary, dir, members
        # die_with_parent: each member SIGTERMed when its launcher dies
        # (tools/local-cluster's), as the daemons are
        self.die_with_parent = die_with_parent
        self.client = [free_port() for _ in range(members)]
        self.peer = [free_port() for _ in range(members)]
        self.procs = [None] * members
        self.urls = ["http://127.0.0.1:%d" % p for p in self.client]
        self.endpoints = ",".join(self.urls)

    def start(self, i):
        cluster = ",".join("m%d=http://127.0.0.1:%d" % (k, p) for k, p in enumerate(self.peer))
        log = open(os.path.join(self.dir, "m%d.log" % i), "a")
        self.procs[i] = subprocess.Popen(
            [self.binary, "--name", "m%d" % i, "--data-dir", os.path.join(self.dir, "m%d" % i),
             "--listen-client-urls", self.urls[i], "--advertise-client-urls", self.urls[i],
             "--listen-peer-urls", "http://127.0.0.1:%d" % self.peer[i],
             "--initial-advertise-peer-urls", "http://127.0.0.1:%d" % self.peer[i],
             "--initial-cluster", cluster, "--initial-cluster-token", "mtnlg-etcd-cluster",
             "--initial-cluster-state", "new", "--heartbeat-interval", "50",
             "--election-timeout", "500", "--logger", "zap", "--log-outputs", "stderr",
             "--log-level", "error"],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if self.die_with_parent else None)
        log.close()

    def start_all(self):
        for i in range(self.members):
            self.start(i)
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.leader() is not None:
                return
            time.sleep(0.2)
        raise RuntimeError("the etcd cluster elected no leader in 30 s (logs in %s)" % self.dir)

    def _status(self, i):
        req = urllib.request.Request(self.urls[i] + "/v3/maintenance/status", data=b"{}",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=2) as r:
            return json.loads(r.read())

    def leader(self):
        """The index of the member that leads, or None."""
        ids, lead = {}, None
        for i, p in enumerate(self.procs):
            if p is None or p.poll() is not None:
                continue
            try:
                st = self._status(i)
            except OSError:
                continue
            ids[st["header"]["member_id"]] = i
            lead = st.get("leader", lead)
        return ids.get(lead)

    def get(self, key):
        """key's value (text) as etcd holds it now, or None."""
        body = json.dumps({"key": base64.b64encode(key.encode()).decode()}).encode()
        for url in self.urls:
            req = urllib.request.Request(url + "/v3/kv/range", data=body,
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=2) as r:
                    kvs = json.loads(r.read()).get("kvs") or []
            except OSError:
                continue
            return base64.b64decode(kvs[0].get("value", "")).decode() if kvs else None
        return None

    def kill(self, i):
        p = self.procs[i]
        if p and p.poll() is None:
            p.kill()
            p.wait(10)

    def stop(self):
        for i in range(self.members):
            self.kill(i)


def elected_cluster(mtnlgd, run_dir, job, endpoints, nodes=3, prefix=None, **kw):
    """nodes daemons whose rendezvous is in etcd at endpoints
    (rendezvous.etcd): each has the job, rendezvous.host auto (so each may
    be elected) and an endpoint of its own (where it hosts the store when
    elected: node.endpoint_port). kw: LocalCluster's."""
    rdzv = {"etcd": endpoints, "host": "auto"}
    if prefix:
        rdzv["etcd_prefix"] = prefix
    extra = dict(kw.pop("extra", None) or {})
    extra["rendezvous"] = dict(extra.get("rendezvous", {}), **rdzv)
    c = LocalCluster(mtnlgd, run_dir, job, nodes=0, extra=extra, **kw)
    for i in range(nodes):
        port = free_port()
        c.nodes.append(c.add_node("n%d" % i, extra={"rendezvous": {
            "endpoint": "127.0.0.1:%d" % port}}))
        c.nodes[-1].endpoint_port = port
    return c


def step_losses(node):
    return [(s["step"], s["loss"]) for s in node.steps() if "loss" in s]


def last_step(node):
    st = node.steps()
    return st[-1]["step"] if st else 0


def grep(node, pattern):
    return re.search(pattern, node.stderr()) is not None


# ---- what the tests of a local cluster share ----

class NotifySocket:
    """A systemd notification socket for daemons started with
    NOTIFY_SOCKET=path: a thread reads every datagram as it comes (as
    systemd does; sd_notify blocks its sender once the socket's queue, 10
    datagrams by default, is full) into messages, until close()."""

    def __init__(self, path):
        import threading
        self.path, self.messages = path, []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(path)
        self._sock.settimeout(0.1)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._read)
        self._thread.start()

    def _read(self):
        while not self._done.is_set():
            try:
                self.messages.append(self._sock.recv(4096).decode())
            except socket.timeout:
                pass

    def close(self):
        """Stops reading (what came by then is in messages); idempotent."""
        if not self._done.is_set():
            self._done.set()
            self._thread.join()
            self._sock.close()


def license_tokens(path, count=200000):
    """Byte-level tokens of the licence texts every Debian has, as the flat
    uint16 file a job's data.path names; the same file on every machine."""
    import array
    import glob
    data = b"".join(open(f, "rb").read()
                    for f in sorted(glob.glob("/usr/share/common-licenses/*"))
                    if os.path.isfile(f) and not os.path.islink(f))
    with open(path, "wb") as f:
        f.write(array.array("H", list(data[:count])).tobytes())
    return path


def indexed_dataset(prefix, seqs):
    """Megatron's MMIDIDX dataset (prefix.bin, prefix.idx) of uint16 tokens,
    one document per sequence of seqs."""
    import struct
    body, sizes, pointers = bytearray(), [], []
    for s in seqs:
        pointers.append(len(body))
        sizes.append(len(s))
        body += struct.pack("<%dH" % len(s), *s)
    doc_idx = list(range(len(seqs) + 1))
    idx = bytearray(b"MMIDIDX\x00\x00") + struct.pack("<QBQQ", 1, 8, len(sizes), len(doc_idx))
    idx += struct.pack("<%di" % len(sizes), *sizes)
    idx += struct.pack("<%dq" % len(pointers), *pointers)
    idx += struct.pack("<%dq" % len(doc_idx), *doc_idx)
    with open(prefix + ".idx", "wb") as f:
        f.write(idx)
    with open(prefix + ".bin", "wb") as f:
        f.write(body)
    return prefix


def tiny_job(path, tokens, name, steps, **sections):
    """The tiny byte-level model as tp 2 x pp 2 x dp 2 (4 layers, global batch
    8 in micro-batches of 2): the layout the cluster tests run. sections
    replace or add top-level keys (e.g. checkpoint={...})."""
    job = {"name": name, "model": {"preset": "tiny", "n_layer": 4},
           "parallel": {"tp": 2, "pp": 2, "dp_min": 2, "dp_max": 2, "micro_batch": 2},
           "train": {"global_batch": 8, "steps": steps, "seed": 7,
                     "lr": {"schedule": "cosine", "peak": 3e-3, "min": 3e-4, "warmup_steps": 3}},
           "data": {"path": tokens}}
    job.update(sections)
    with open(path, "w") as f:
        json.dump(job, f)
    return path


def status(node):
    """A node's /v1/status, parsed."""
    with urllib.request.urlopen(node.url() + "/v1/status", timeout=5) as r:
        return json.loads(r.read())


def post(node, path, token):
    """POSTs {} to a node's control plane with the token: the HTTP status."""
    req = urllib.request.Request(node.url() + path, data=b"{}", method="POST",
                                 headers={"Authorization": "Bearer " + token,
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status


def status_contract(source_root):
    """A function that lists how a /v1/status answer departs from
    proto/control-v1.yaml's Status schema (tests/common/openapi_check.py)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "openapi_check", os.path.join(source_root, "tests", "common", "openapi_check.py"))
    oc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(oc)
    doc = oc.load(os.path.join(source_root, "proto", "control-v1.yaml"))
    return lambda st: oc.validate(doc, {"$ref": "#/components/schemas/Status"}, st)


def check(name, ok, detail=""):
    """Prints `ok NAME` or `FAIL NAME: detail`; returns the failure count (0 or 1)."""
    print("%s %s%s" % ("ok" if ok else "FAIL", name, (": " + detail) if detail else ""), flush=True)
    return 0 if ok else 1
