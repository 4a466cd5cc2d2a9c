#!/usr/bin/env python3
"""mtnlgctl's control verbs without a daemon: usage errors (exit 2), help for
every verb, an endpoint nobody listens on (exit 3, with what to do), token
files (exit 2 when missing), and each verb against a stand-in HTTP server that
answers as the control contract says (/v1 JSON, problem+json errors, 202
operations polled to their end): the requests it sends and what it prints.
With OPENAPI_CHECK and SPEC (tests/common/openapi_check.py and
proto/control-v1.yaml), every answer of the stand-in and every request of
mtnlgctl is also checked against the OpenAPI document.

Usage: test_mtnlgctl_cli.py MTNLGCTL [OPENAPI_CHECK SPEC]
"""
import importlib.util
import http.server
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading

failures = 0

VERBS = ["status", "nodes", "watch", "pause", "resume", "stop", "checkpoint", "resize", "ops",
         "checkpoints", "plan", "help"]
NETWORK_VERBS = [["status"], ["nodes"], ["watch", "--count", "1"], ["pause"], ["resume"],
                 ["stop"], ["checkpoint"], ["resize", "--dp", "2"], ["ops"], ["ops", "op-1"],
                 ["checkpoints"]]


def check(cond, what, proc=None):
    global failures
    if cond:
        return
    failures += 1
    print(f"check failed: {what}", file=sys.stderr)
    if proc is not None:
        print(f"  exit {proc.returncode}\n  stdout: {proc.stdout[:3000]}\n"
              f"  stderr: {proc.stderr[:3000]}", file=sys.stderr)


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MTNLG_") and k.lower() not in
           ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}
    env.update(extra)
    return env


def run(*args, env=None, timeout=60):
    return subprocess.run([ctl, *args], capture_output=True, text=True, timeout=timeout,
                          env=env if env is not None else clean_env())


def free_port():
    """A loopback port nobody listens on (bound, then released)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_usage_errors_exit_2():
    for args, what, says in (
            (["status", "extra"], "status with an argument", "at most 0"),
            (["nodes", "x"], "nodes with an argument", "at most 0"),
            (["ops", "op-1", "op-2"], "ops with two ids", "at most 1"),
            (["ops", "op/../x"], "ops with a bad id", "not an operation id"),
            (["resize"], "resize without --dp", "--dp N is required"),
            (["resize", "--dp", "0"], "resize --dp 0", "not a positive integer"),
            (["resize", "--dp", "1.5"], "resize --dp 1.5", "not a positive integer"),
            (["resize", "--dp", "x"], "resize --dp x", "not a positive integer"),
            (["pause", "--dp", "2"], "--dp on pause", "--dp is an option of resize"),
            (["watch", "--interval", "0"], "watch --interval 0", "not a positive number"),
            (["watch", "--interval", "0.01"], "watch --interval 0.01", "under 0.1 s"),
            (["watch", "--count", "-1"], "watch --count -1", "not a positive integer"),
            (["status", "--frobnicate"], "unknown verb option", "See 'mtnlgctl status --help'"),
            (["-o", "yaml", "status"], "bad global format", "not one of table, json"),
            (["status", "-o", "yaml"], "bad verb format", "not one of table, json"),
            (["-e"], "-e without a URL", ""),
            (["-e", "ftp://127.0.0.1:1", "status"], "ftp endpoint",
             "-e/--endpoint: \"ftp://127.0.0.1:1\" is not an http:// or https:// URL"),
            (["-e", "127.0.0.1:8470", "status"], "endpoint without scheme", "not an http://"),
            (["--nope"], "unknown global option", ""),
            ([], "no verb", "no verb given"),
            (["frobnicate"], "unknown verb", 'unknown verb "frobnicate"')):
        p = run(*args)
        check(p.returncode == 2, f"{what} exits 2", p)
        check(says in p.stderr, f"{what} says {says!r}", p)
        check(p.stdout == "" or not args, f"{what} prints nothing on stdout", p)
    p = run("status", env=clean_env(MTNLG_ENDPOINT="localhost:8470"))
    check(p.returncode == 2 and "MTNLG_ENDPOINT: \"localhost:8470\"" in p.stderr,
          "a bad MTNLG_ENDPOINT is named", p)
    # offline verbs never look at the endpoint or the token file
    p = run("help", env=clean_env(MTNLG_ENDPOINT="nonsense", MTNLG_TOKEN_FILE="/nonexistent"))
    check(p.returncode == 0, "help ignores a bad MTNLG_ENDPOINT and MTNLG_TOKEN_FILE", p)


def test_help_for_every_verb():
    p = run("--help")
    check(p.returncode == 0, "--help exits 0", p)
    for v in VERBS:
        check(f"\n  {v} " in p.stdout, f"--help lists {v}", p)
    for opt in ("--endpoint", "--token-file", "MTNLG_ENDPOINT", "MTNLG_TOKEN_FILE",
                "3 the daemon cannot be reached"):
        check(opt in p.stdout, f"--help mentions {opt}", p)
    for v in VERBS:
        outs = []
        for args in (["help", v], [v, "--help"], [v, "-h"]):
            p = run(*args)
            check(p.returncode == 0 and p.stdout.startswith(f"Usage: mtnlgctl {v} "),
                  f"{args} shows {v}'s usage", p)
            outs.append(p.stdout)
        check(outs[0] == outs[1] == outs[2], f"help {v}, {v} --help and {v} -h agree")
    for v, opts in (("status", ["--devices", "--output"]), ("watch", ["--interval", "--count"]),
                    ("resize", ["--dp", "--wait", "token"]), ("pause", ["--wait", "token"]),
                    ("ops", ["ID"]), ("checkpoints", ["--output"])):
        p = run("help", v)
        for o in opts:
            check(o in p.stdout, f"help {v} mentions {o}", p)
    # --help wins over bad arguments, like plan's
    p = run("resize", "--dp", "x", "--help")
    check(p.returncode == 0 and "--dp N" in p.stdout, "resize --dp x --help shows help", p)


def test_unreachable_endpoint_exits_3():
    url = f"http://127.0.0.1:{free_port()}"
    for args in NETWORK_VERBS:
        for out in ("table", "json"):
            p = run("-e", url, "-o", out, *args)
            what = f"{' '.join(args)} -o {out} on {url}"
            check(p.returncode == 3, f"{what} exits 3", p)
            check(f"mtnlgctl: cannot reach the daemon at {url} (connection refused); is mtnlgd "
                  "running? set -e/--endpoint or MTNLG_ENDPOINT" in p.stderr,
                  f"{what} says what to do", p)
            check(p.stdout == "", f"{what} prints nothing on stdout", p)
    p = run("status", env=clean_env(MTNLG_ENDPOINT=url + "/"))
    check(p.returncode == 3 and f"at {url}/ (connection refused)" in p.stderr,
          "MTNLG_ENDPOINT is used", p)
    p = run("-e", url, "status", env=clean_env(MTNLG_ENDPOINT="http://127.0.0.1:1"))
    check(p.returncode == 3 and url in p.stderr, "-e wins over MTNLG_ENDPOINT", p)
    p = run("-e", "http://host.invalid:8470", "status")
    check(p.returncode == 3 and "cannot reach the daemon at http://host.invalid:8470" in p.stderr,
          "an unknown host exits 3", p)


def test_token_file():
    url = f"http://127.0.0.1:{free_port()}"
    with tempfile.TemporaryDirectory() as d:
        missing = os.path.join(d, "missing-token")
        for args in (["--token-file", missing, "pause"], ["--token-file", missing, "status"]):
            p = run("-e", url, *args)
            check(p.returncode == 2, f"{args} with a missing token file exits 2", p)
            check(f"--token-file: cannot read the token file {missing}: No such file or "
                  "directory" in p.stderr, "the message names the file and why", p)
        p = run("-e", url, "-o", "json", "pause", env=clean_env(MTNLG_TOKEN_FILE=missing))
        check(p.returncode == 2 and f"MTNLG_TOKEN_FILE: cannot read the token file {missing}"
              in p.stderr, "a missing MTNLG_TOKEN_FILE exits 2 and is named", p)
        empty = os.path.join(d, "empty")
        with open(empty, "w") as f:
            f.write("\n")
        p = run("-e", url, "--token-file", empty, "pause")
        check(p.returncode == 2 and f"the token file {empty} is empty" in p.stderr,
              "an empty token file exits 2", p)
        two = os.path.join(d, "two-words")
        with open(two, "w") as f:
            f.write("abc def\n")
        p = run("-e", url, "--token-file", two, "pause")
        check(p.returncode == 2 and "more than one printable word" in p.stderr,
              "a token with a space exits 2", p)
        good = os.path.join(d, "token")
        with open(good, "w") as f:
            f.write("s3cret\n")
        p = run("-e", url, "--token-file", good, "pause")
        check(p.returncode == 3, "a readable token file gets as far as the daemon", p)
        check("s3cret" not in p.stderr + p.stdout, "the token is never printed", p)


# --- a stand-in daemon answering as the control contract says ---------------

STATUS = {
    "node": "n0", "coordinator": "n0", "version": "0.1.0",
    "job": {"name": "tiny-demo", "hash": "0123456789abcdef", "steps": 1000,
            "global_batch": 32, "seq_len": 128, "micro_batch": 4, "params": 1234567,
            "tp": 2, "pp": 2, "dp": 2, "dp_min": 1, "dp_max": 4},
    "generation": 2, "state": "running", "reason": None,
    "step": 12, "consumed_tokens": 49152, "loss": 3.21, "lr": 1e-3, "grad_norm": 0.8,
    "val_loss": None, "tokens_per_s": 2830.0, "skipped_steps": 0,
    "step_time": {"total_ms": 45.3, "compute_ms": 38.0, "bubble_ms": 4.1, "comm_ms": 3.2},
    "eta_s": 120.5,
    "devices": [{"node": "n0", "device": f"cpu:{i}", "rank": i, "stage": i // 4,
                 "replica": (i // 2) % 2, "tflops": 0.2 + 0.01 * i, "mfu": None}
                for i in range(8)],
    "nodes": [{"name": "n0", "host": "127.0.0.1", "role": "coordinator", "state": "running",
               "devices": ["cpu:0", "cpu:1", "cpu:2", "cpu:3"], "ranks": [0, 1, 2, 3],
               "stages": [0], "replicas": [0, 1], "heartbeat_age_s": 0.4,
               "memory_bytes": 123456789, "control_url": "http://127.0.0.1:8471"},
              {"name": "n1", "host": "127.0.0.2", "role": "member", "state": "running",
               "devices": ["cpu:0", "cpu:1", "cpu:2", "cpu:3"], "ranks": [4, 5, 6, 7],
               "stages": [1], "replicas": [0, 1], "heartbeat_age_s": 1.5,
               "memory_bytes": 2500000000, "control_url": "http://127.0.0.2:8471"}],
    "last_checkpoint": {"step": 10, "path": "/ckpt/tiny-demo/step_00000010",
                        "time": 1700000000.0, "bytes": 12345},
    "checkpoint_progress": {"state": "writing", "step": 12, "bytes_done": 5000,
                            "bytes_total": 12345, "bytes_per_s": 1e6},
    "operations_pending": 1,
}
CHECKPOINTS = {"checkpoints": [
    {"step": 5, "path": "/ckpt/tiny-demo/step_00000005", "bytes": 12345, "time": 1700000000.0,
     "latest": False},
    {"step": 10, "path": "/ckpt/tiny-demo/step_00000010", "bytes": 2500000000, "time": 1700000100.0,
     "latest": True}]}
TOKEN = "s3cret-token"


class Daemon(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    requests = []  # (method, path, authorization, body)
    ops = {}  # id -> list of OP states still to show; the last one stays
    next_op = 1
    spec = None  # the OpenAPI document, when given
    contract_errors = []

    def log_message(self, *args):
        pass

    def answer(self, status, body, ctype="application/json", headers=()):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
        if Daemon.spec is not None:
            Daemon.contract_errors += oc.check_response(
                Daemon.spec, self.command, self.path, status, data, ctype,
                {"Content-Type": ctype, **dict(headers)})

    def problem(self, status, title, detail, headers=()):
        self.answer(status, {"type": "about:blank", "title": title, "status": status,
                             "detail": detail}, "application/problem+json", headers)

    def record(self, body=None):
        Daemon.requests.append((self.command, self.path, self.headers.get("Authorization"),
                                body))

    def do_GET(self):
        self.record()
        if self.path == "/v1/status":
            self.answer(200, STATUS)
        elif self.path == "/v1/checkpoints":
            self.answer(200, CHECKPOINTS)
        elif self.path == "/v1/operations":
            self.answer(200, {"operations": [states[-1] for states in Daemon.ops.values()]})
        elif self.path.startswith("/v1/operations/"):
            states = Daemon.ops.get(self.path.rsplit("/", 1)[1])
            if not states:
                self.problem(404, "Not Found", "no operation " + self.path.rsplit("/", 1)[1])
                return
            self.answer(200, states.pop(0) if len(states) > 1 else states[0])
        else:
            self.problem(404, "Not Found", "no such path")

    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        raw = self.rfile.read(n) if n else b""
        body = json.loads(raw) if raw else None
        self.record(body)
        if Daemon.spec is not None:
            Daemon.contract_errors += oc.check_request(
                Daemon.spec, "POST", self.path, raw, self.headers.get("Content-Type"))
        kind = self.path.rsplit("/", 1)[1]
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            self.problem(401, "Unauthorized", "a bearer token is needed",
                         [("WWW-Authenticate", 'Bearer realm="mtnlg"')])
            return
        if kind == "resume":
            self.problem(409, "Conflict", "cannot resume: the job is running, not paused")
            return
        if kind == "stop":
            self.problem(503, "Service Unavailable", "cannot reach the coordinator n3")
            return
        op_id = f"op-{Daemon.next_op}"
        Daemon.next_op += 1
        base = {"id": op_id, "kind": kind, "state": "queued", "reason": None,
                "created": 1700000000.0, "updated": 1700000000.0, "step": None,
                "args": body if kind == "resize" else {}, "progress": None}
        if kind == "resize":
            final = dict(base, state="failed", step=13,
                         reason="cannot form dp 2: 1 spare node, 2 needed")
        else:
            final = dict(base, state="succeeded", step=13)
        Daemon.ops[op_id] = [dict(base, state="running", progress="writing 5 of 12 MB"),
                             dict(base, state="running", progress="writing 12 of 12 MB"), final]
        self.answer(202, base, headers=[("Location", f"/v1/operations/{op_id}")])


def test_verbs_against_the_contract():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Daemon)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    with tempfile.TemporaryDirectory() as d:
        token = os.path.join(d, "token")
        with open(token, "w") as f:
            f.write(TOKEN + "\n")
        env = clean_env(MTNLG_ENDPOINT=url, MTNLG_TOKEN_FILE=token)
        try:
            contract_checks(env, url)
        finally:
            server.shutdown()


def contract_checks(env, url):
    p = run("status", env=env)
    check(p.returncode == 0, "status exits 0", p)
    for s in ("job tiny-demo (hash 0123456789abcdef): tp 2 x pp 2 x dp 2", "generation  2",
              "coordinator n0", "state       running", "12 / 1000 (1.2%)", "loss        3.2100",
              "1.000e-03", "grad norm   0.800", "tokens/s    2830", "0.24 per device (mean of 8; min 0.20, max 0.27)",
              "45.3 ms: compute 38.0, bubble 4.1, comm 3.2 ms", "step 10, 12.3 KB",
              "/ckpt/tiny-demo/step_00000010", "ETA         2 min 1 s", "writing     step 12"):
        check(s in p.stdout, f"status shows {s!r}", p)
    p = run("status", "--devices", env=env)
    check(p.returncode == 0 and "TFLOP/S" in p.stdout and "cpu:7" in p.stdout,
          "status --devices lists the devices", p)
    p = run("-o", "json", "status", env=env)
    check(p.returncode == 0 and json.loads(p.stdout) == STATUS, "status -o json is /v1/status", p)
    check(all(r[2] == f"Bearer {TOKEN}" for r in Daemon.requests), "reads carry the token")

    p = run("nodes", env=env)
    check(p.returncode == 0, "nodes exits 0", p)
    lines = p.stdout.splitlines()
    check(lines and lines[0].split() == ["NAME", "ROLE", "STATE", "HOST", "RANKS", "STAGES",
                                         "REPLICAS", "DEVICES", "HEARTBEAT", "MEMORY"],
          "nodes header", p)
    check(any(l.split()[:8] == ["n0", "coordinator", "running", "127.0.0.1", "0-3", "0", "0,1",
                                "cpu:0-3"] for l in lines[1:3]), "nodes row for n0", p)
    check("2.50 GB" in p.stdout and "2 nodes in generation 2." in p.stdout, "nodes memory", p)
    p = run("nodes", "-o", "json", env=env)
    d = json.loads(p.stdout) if p.returncode == 0 else {}
    check(d.get("nodes") == STATUS["nodes"] and d.get("generation") == 2, "nodes -o json", p)

    p = run("watch", "--count", "2", "--interval", "0.1", env=env)
    lines = p.stdout.splitlines()
    check(p.returncode == 0 and len(lines) == 2, "watch --count 2 prints two lines", p)
    check(all("step 12/1000 loss 3.2100 tokens/s 2830 state running nodes n0=running/0.4s "
              "n1=running/1.5s" in l for l in lines), "watch line", p)
    p = run("-o", "json", "watch", "--count", "2", "--interval", "0.1", env=env)
    check(p.returncode == 0 and [json.loads(l) for l in p.stdout.splitlines()] == [STATUS] * 2,
          "watch -o json prints JSON Lines", p)

    p = run("checkpoints", env=env)
    check(p.returncode == 0 and "/ckpt/tiny-demo/step_00000005" in p.stdout and
          "2.50 GB" in p.stdout and "2 checkpoints; latest is step 10." in p.stdout,
          "checkpoints table", p)
    p = run("checkpoints", "-o", "json", env=env)
    check(p.returncode == 0 and json.loads(p.stdout) == CHECKPOINTS, "checkpoints -o json", p)

    # mutations
    Daemon.requests.clear()
    p = run("pause", env=clean_env(MTNLG_ENDPOINT=url))
    check(p.returncode == 1, "pause without a token exits 1", p)
    check("mtnlgctl: the daemon refused: 401 Unauthorized: a bearer token is needed; give the "
          "daemon's control token with --token-file PATH or MTNLG_TOKEN_FILE" in p.stderr,
          "401 says how to give the token", p)
    check(Daemon.requests[-1][:3] == ("POST", "/v1/pause", None), "no token, no header")

    p = run("pause", env=env)
    check(p.returncode == 0 and p.stdout.startswith("op-1 pause: queued\n"),
          "pause prints the operation id and state", p)
    check(Daemon.requests[-1] == ("POST", "/v1/pause", f"Bearer {TOKEN}", {}),
          "pause POSTs {} with the bearer token")

    p = run("checkpoint", "--wait", env=env)
    check(p.returncode == 0, "checkpoint --wait exits 0 when it succeeded", p)
    check(p.stdout.splitlines() == ["op-2 checkpoint: queued",
                                    "op-2 checkpoint: running (writing 5 of 12 MB)",
                                    "op-2 checkpoint: running (writing 12 of 12 MB)",
                                    "op-2 checkpoint: succeeded at step 13"],
          "checkpoint --wait shows the progress", p)
    check(("GET", "/v1/operations/op-2") in [r[:2] for r in Daemon.requests],
          "--wait polls /v1/operations/{id}")

    p = run("-o", "json", "resize", "--dp", "2", "--wait", env=env)
    check(p.returncode == 1, "resize --wait exits 1 when it failed", p)
    check("mtnlgctl: operation op-3 (resize) failed: cannot form dp 2: 1 spare node, 2 needed"
          in p.stderr, "the failure's reason", p)
    d = json.loads(p.stdout) if p.stdout else {}
    check(d.get("state") == "failed" and d.get("args") == {"dp": 2},
          "resize -o json --wait prints the final operation", p)
    check(("POST", "/v1/resize", f"Bearer {TOKEN}", {"dp": 2}) in Daemon.requests,
          "resize POSTs {\"dp\": 2}")

    p = run("resume", env=env)
    check(p.returncode == 1 and "mtnlgctl: the daemon refused: 409 Conflict: cannot resume: the "
          "job is running, not paused\n" in p.stderr, "409 with its detail", p)
    p = run("stop", env=env)
    check(p.returncode == 1 and "503 Service Unavailable: cannot reach the coordinator n3"
          in p.stderr, "503 with its detail", p)

    p = run("ops", env=env)
    check(p.returncode == 0 and p.stdout.splitlines()[0].split() ==
          ["ID", "KIND", "ARGS", "STATE", "STEP", "AGE", "DETAIL"], "ops header", p)
    check(any(l.split()[:4] == ["op-3", "resize", "dp=2", "failed"]
              for l in p.stdout.splitlines()), "ops shows resize's args and state", p)
    check("cannot form dp 2" in p.stdout and "3 operations." in p.stdout, "ops rows", p)
    p = run("ops", "op-2", env=env)
    check(p.returncode == 0 and p.stdout.startswith("op-2 checkpoint: succeeded at step 13\n"),
          "ops ID", p)
    p = run("ops", "op-99", env=env)
    check(p.returncode == 1 and "404 Not Found: no operation op-99" in p.stderr,
          "ops with an unknown id", p)
    p = run("-o", "json", "ops", env=env)
    check(p.returncode == 0 and len(json.loads(p.stdout)["operations"]) == 3, "ops -o json", p)

    if Daemon.spec is not None:
        check(not Daemon.contract_errors,
              "requests and answers follow proto/control-v1.yaml: "
              + "; ".join(Daemon.contract_errors[:5]))


if __name__ == "__main__":
    if len(sys.argv) not in (2, 4):
        sys.exit(__doc__)
    ctl = sys.argv[1]
    oc = None
    if len(sys.argv) == 4 and os.path.exists(sys.argv[2]) and os.path.exists(sys.argv[3]):
        loader = importlib.util.spec_from_file_location("openapi_check", sys.argv[2])
        oc = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(oc)
        Daemon.spec = oc.load(sys.argv[3])
    else:
        print("  (no OpenAPI document given: answers are not checked against it)")
    for t in (test_usage_errors_exit_2, test_help_for_every_verb,
              test_unreachable_endpoint_exits_3, test_token_file,
              test_verbs_against_the_contract):
        before = failures
        t()
        print(f"  {'ok' if failures == before else 'FAILED'} {t.__name__}")
    print("test_mtnlgctl_cli: " + ("all passed" if not failures else f"{failures} failure(s)"))
    sys.exit(1 if failures else 0)
