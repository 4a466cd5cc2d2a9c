#!/usr/bin/env python3
"""mtnlgctl's control verbs without a daemon: usage errors (exit 2), help for
every verb, an endpoint nobody listens on (exit 3, with what to do), and token
files (exit 2 when missing or malformed, by the rule mtnlgd and tools/local-cluster
share, read for mutations and not for reads), `ckpt verify` of a directory that
is not there; integer options (decimal digits alone, at most INT_MAX), the
`resize 3` hint, getopt's messages named "mtnlgctl:", and `ckpt export` into a
missing directory; and it does not load cuBLAS. The verbs against real daemons
are tests/cluster/test_control_cluster.py's and test_mtnlgctl_refusals.py's (no
stand-in daemon here: a mock would test our idea of the daemon, not the daemon);
the one socket server here only records the request line mtnlgctl sends (an
endpoint given as .../v1) or answers what no mtnlgd does (a proxy's 502 page,
a connection closed before its answer, after which mtnlgctl sends the POST
again with the same Idempotency-Key).

Usage: test_mtnlgctl_cli.py MTNLGCTL
"""
import json
import os
import socket
import subprocess
import sys
import tempfile

failures = 0

VERBS = ["status", "nodes", "watch", "history", "pause", "resume", "stop", "checkpoint", "resize",
         "ops", "checkpoints", "ckpt", "plan", "help"]
COMPLETION = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "ctl",
                          "mtnlgctl.bash-completion")
LOCAL_CLUSTER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools",
                             "local-cluster")
NETWORK_VERBS = [["status"], ["nodes"], ["watch", "--count", "1"], ["history"], ["pause"],
                 ["resume"], ["stop"], ["checkpoint"], ["resize", "--dp", "2"], ["ops"],
                 ["ops", "op-1"], ["checkpoints"]]


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


_held = []  # the sockets behind free_port()'s ports, bound until the test exits


def free_port():
    """A loopback port nobody listens on: bound and never listened on, and
    held for the whole test, so a connection to it is refused every time
    (a port released again could be taken by another test's listener)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    _held.append(s)
    return s.getsockname()[1]


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
            (["history", "--last", "0"], "history --last 0", "not a positive integer"),
            (["history", "--since", "x"], "history --since x",
             '--since: "x" is not a step number (0 or more'),
            (["history", "--since", "-1"], "history --since -1",
             '--since: "-1" is not a step number (0 or more'),
            (["history", "extra"], "history with an argument", "at most 0"),
            (["status", "--frobnicate"], "unknown verb option", "See 'mtnlgctl status --help'"),
            (["-o", "yaml", "status"], "bad global format", "not one of table, json"),
            (["status", "-o", "yaml"], "bad verb format", "not one of table, json"),
            (["-e"], "-e without a URL", ""),
            (["-e", "ftp://127.0.0.1:1", "status"], "ftp endpoint",
             "-e/--endpoint: \"ftp://127.0.0.1:1\" is not an http:// or https:// URL"),
            (["-e", "127.0.0.1:8470", "status"], "endpoint without scheme", "not an http://"),
            (["-e", "http://127.0.0.1:1, 127.0.0.1:2", "status"], "a list's second endpoint "
             "without scheme", '"127.0.0.1:2" (endpoint 2 of 2) is not an http://'),
            (["-e", "http://127.0.0.1:1,", "status"], "a list with an empty endpoint",
             '"" (endpoint 2 of 2) is not an http://'),
            (["-e", ",".join(["http://127.0.0.1:1"] * 17), "status"], "17 endpoints",
             "17 endpoints; at most 16, comma-separated"),
            (["--nope"], "unknown global option", ""),
            ([], "no verb", "no verb given"),
            (["frobnicate"], "unknown verb", 'unknown verb "frobnicate"'),
            (["ckpt", "export", "d", "o", "--dtype", "f16"], "ckpt export --dtype f16",
             '--dtype: dtype "f16" is not one of fp32, bf16, fp16'),
            (["ckpt", "export", "d", "o", "--dtype"], "ckpt export --dtype without a name",
             "--dtype needs one of fp32, bf16, fp16"),
            (["ckpt", "verify", "d", "--dtype", "bf16"], "--dtype on verify",
             "--dtype goes with export"),
            (["ckpt", "reshard", "d", "o", "--tp", "1", "--pp", "1", "--dtype=bf16"],
             "--dtype on reshard", "--dtype goes with export")):
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


def test_integer_options_take_decimal_digits_up_to_int_max():
    """Every integer option of mtnlgctl reads decimal digits alone: "0x2" and
    "2e0" are not read as 2 (strtod took them), and a number over INT_MAX is
    said to be too large, not "not a positive integer"."""
    options = ((["resize", "--dp"], []), (["watch", "--count"], []),
               (["plan", "--devices"], ["job.json"]),
               (["ckpt", "reshard", "d", "o", "--tp"], ["--pp", "1"]),
               (["ckpt", "reshard", "d", "o", "--pp"], ["--tp", "1"]),
               (["ckpt", "reshard", "d", "o", "--tp", "1", "--pp", "1", "--virtual-stages"], []))
    for before, after in options:
        opt = before[-1]
        for value in ("0x2", "2e0", "+2", " 2", "2.0", "0", "-1", "", "2 "):
            p = run(*before, value, *after)
            check(p.returncode == 2 and f'{opt}: "{value}" is not a positive integer' in p.stderr,
                  f"{before[0]} {opt} {value!r} is refused as not a positive integer", p)
        for value in ("2147483648", "99999999999", "99999999999999999999999"):
            p = run(*before, value, *after)
            check(p.returncode == 2 and f'{opt}: "{value}" is larger than the maximum, 2147483647'
                  in p.stderr, f"{before[0]} {opt} {value} is said to be over the maximum", p)
    # the largest one is taken: resize goes on to the daemon (none here: exit 3)
    p = run("-e", f"http://127.0.0.1:{free_port()}", "resize", "--dp", "2147483647")
    check(p.returncode == 3, "resize --dp 2147483647 is taken", p)


def test_resize_with_a_bare_number_suggests_dp():
    p = run("resize", "3")
    check(p.returncode == 2 and "did you mean `mtnlgctl resize --dp 3`?" in p.stderr,
          "resize 3 suggests --dp 3", p)
    p = run("resize", "x")
    check(p.returncode == 2 and "did you mean" not in p.stderr and "at most 0" in p.stderr,
          "resize x does not suggest --dp x", p)


def test_unknown_global_option_names_mtnlgctl_not_its_path():
    """getopt's message names argv[0]: the path mtnlgctl was run by (here the
    build directory's), where every other message starts "mtnlgctl:"."""
    for args, says in ((["--bogus"], "mtnlgctl: unrecognized option '--bogus'"),
                       (["-o"], "mtnlgctl: option requires an argument -- 'o'")):
        p = run(*args)
        check(p.returncode == 2 and p.stderr.startswith(says) and ctl not in p.stderr,
              f"{args} starts {says!r}", p)


def test_ckpt_export_into_a_missing_directory_names_the_directory():
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "nonexistent-dir", "out.safetensors")
        p = run("ckpt", "export", d, out)
        check(p.returncode == 1 and p.stderr == f"mtnlgctl ckpt: export to {out}: its directory "
              f"{os.path.dirname(out)}: No such file or directory\n" and ".tmp" not in p.stderr,
              "ckpt export names OUT's missing directory, not a temporary file", p)
        afile = os.path.join(d, "afile")
        open(afile, "w").close()
        p = run("ckpt", "export", d, os.path.join(afile, "out.safetensors"))
        check(p.returncode == 1 and f"{afile} is not a directory" in p.stderr,
              "ckpt export under a file says it is not a directory", p)


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
                    ("ops", ["ID"]), ("checkpoints", ["--output"]),
                    ("history", ["--since", "--last"])):
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
    other = f"http://127.0.0.1:{free_port()}"
    p = run("-e", f"{url},{other}", "status")
    check(p.returncode == 3 and f"mtnlgctl: cannot reach the daemon at any of 2 endpoints ({url}: "
          f"connection refused; {other}: connection refused)" in p.stderr,
          "a list of endpoints none of which answers names each", p)
    p = run("-e", "http://host.invalid:8470", "status")
    check(p.returncode == 3 and "cannot reach the daemon at http://host.invalid:8470" in p.stderr,
          "an unknown host exits 3", p)


def close_server(srv):
    """Closes a listening socket whose thread waits in accept(): a close alone
    leaves that accept() holding it, still listening, and a port number used
    again later reaches it (a later test's connection answered by this one)."""
    try:
        srv.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    srv.close()


def test_a_port_that_answers_no_http_exits_3():
    """An endpoint copied from the wrong line (the rendezvous store's port):
    a server that answers in another protocol is a daemon not reached, exit 3
    naming the control port, not a usage error about the URL."""
    url, _, close = answering_server(b"\x00\x00\x00\x05store")
    try:
        p = run("-e", url, "status")
        check(p.returncode == 3 and f"{url} answered, but not in HTTP" in p.stderr
              and "control port (control.listen)" in p.stderr,
              "a port that answers no HTTP exits 3 naming the control port", p)
    finally:
        close()


def answering_server(answer):
    """A loopback port that answers every request with the bytes answer (or
    answer(request line) when it is a function) and keeps each request's
    first line; (url, request lines, close)."""
    import threading
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    lines = []

    def serve():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            with c:
                req = b""
                while b"\r\n\r\n" not in req:
                    chunk = c.recv(4096)
                    if not chunk:
                        break
                    req += chunk
                lines.append(req.split(b"\r\n")[0].decode())
                c.sendall(answer(lines[-1]) if callable(answer) else answer)

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{srv.getsockname()[1]}", lines, lambda: close_server(srv)


def test_endpoint_given_as_the_api_root_is_taken_as_its_base():
    """-e http://host:port/v1 (the API's root, as its paths read) asks for
    /v1/status, not /v1/v1/status; the same with a trailing slash."""
    url, lines, close = answering_server(
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    try:
        for suffix in ("/v1", "/v1/", "/", ""):
            del lines[:]
            p = run("-e", url + suffix, "status")
            check(p.returncode == 1 and lines == ["GET /v1/status HTTP/1.1"],
                  f"-e URL{suffix} asks for /v1/status (asked: {lines})", p)
        del lines[:]
        p = run("-e", url + "/prefix/v1", "status")
        check(lines == ["GET /prefix/v1/status HTTP/1.1"],
              f"-e URL/prefix/v1 keeps the prefix (asked: {lines})", p)
    finally:
        close()


def test_json_output_of_an_answer_without_a_problem_object_is_one_made_of_its_status():
    """Under -o json an error answer that is no problem+json (a proxy's HTML
    page, say) still prints a JSON object on stdout: its status, title and
    the line said on stderr, so a script's jq reads the same shape as the
    daemon's refusals; in a table, nothing on stdout."""
    url, _, close = answering_server(
        b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/html\r\nContent-Length: 6\r\n"
        b"Connection: close\r\n\r\n<html>")
    try:
        for args in (["status"], ["nodes"], ["ops"], ["ops", "op-1"], ["checkpoints"],
                     ["watch", "--count", "1"], ["pause"], ["resize", "--dp", "2"]):
            with tempfile.NamedTemporaryFile("w") as tok:
                tok.write("t0ken\n")
                tok.flush()
                p = run("-e", url, "--token-file", tok.name, "-o", "json", *args)
                t = run("-e", url, "--token-file", tok.name, *args)
            try:
                obj = json.loads(p.stdout)
            except ValueError:
                obj = None
            line = p.stderr.strip().splitlines()[0] if p.stderr.strip() else ""
            check(p.returncode == 1 and isinstance(obj, dict) and obj.get("status") == 502
                  and obj.get("title") == "Bad Gateway"
                  and "mtnlgctl: " + obj.get("detail", "") == line,
                  f"-o json {' '.join(args)} prints a problem object made of the 502", p)
            check(t.returncode == 1 and t.stdout == "",
                  f"{' '.join(args)} in a table prints nothing on stdout", t)
    finally:
        close()
    # a reason phrase that is not UTF-8 (a proxy's Latin-1): still an object
    url, _, close = answering_server(
        b"HTTP/1.1 502 Mauvaise passerelle \xe9\r\nContent-Length: 0\r\n"
        b"Connection: close\r\n\r\n")
    try:
        p = run("-e", url, "-o", "json", "status")
        try:
            obj = json.loads(p.stdout)
        except ValueError:
            obj = None
        check(p.returncode == 1 and isinstance(obj, dict) and obj.get("status") == 502
              and obj.get("title") == "Mauvaise passerelle ?"
              and "502 Mauvaise passerelle ?" in p.stderr,
              "-o json status prints an object for a 502 whose reason is not UTF-8", p)
    finally:
        close()


def json_answer(code, obj):
    body = json.dumps(obj).encode()
    return (b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n" % (code, len(body))) + body


def test_resize_wait_returns_once_the_daemon_shows_the_new_width():
    """The coordinator marks a resize done in the tick that forms its
    generation; the node asked takes the new assignment a tick later. So
    `resize --wait` returns only once that node's /v1/status shows the new
    dp (here on the third read), and a `status` right after it never shows
    the old width."""
    reads = []

    def answer(line):
        if line.startswith("POST /v1/resize"):
            return json_answer(202, {"id": "op-1", "kind": "resize", "state": "succeeded",
                                     "reason": None, "step": 8, "args": {"dp": 1}})
        reads.append(line)
        return json_answer(200, {"generation": 1 if len(reads) < 3 else 2,
                                 "job": {"dp": 2 if len(reads) < 3 else 1}})
    url, lines, close = answering_server(answer)
    try:
        with tempfile.NamedTemporaryFile("w") as tok:
            tok.write("t0ken\n")
            tok.flush()
            p = run("-e", url, "--token-file", tok.name, "resize", "--dp", "1", "--wait")
        check(p.returncode == 0 and lines == ["POST /v1/resize HTTP/1.1"]
              + ["GET /v1/status HTTP/1.1"] * 3 and "op-1 resize dp=1: succeeded at step 8" in p.stdout,
              f"resize --wait reads the status until it shows dp 1 (asked: {lines})", p)
    finally:
        close()


def test_wait_notices_an_operation_id_another_coordinator_reused():
    """Operation ids are the coordinator's: one elected in its place (or
    restarted) numbers from op-1 again. `checkpoint --wait` polling op-2
    that comes back as another operation (a resume, created later) says
    the coordinator changed and exits 1, rather than reporting the resume's
    success as its checkpoint's."""
    mine = {"id": "op-2", "kind": "checkpoint", "state": "running", "reason": None,
            "step": None, "args": {}, "created": 1796580000.25}
    other = {"id": "op-2", "kind": "resume", "state": "succeeded", "reason": None, "step": 40,
             "args": {}, "created": 1796580060.5}
    polls = []

    def answer(line):
        if line.startswith("POST /v1/checkpoint"):
            return json_answer(202, mine)
        polls.append(line)
        return json_answer(200, mine if len(polls) < 2 else other)
    url, lines, close = answering_server(answer)
    try:
        with tempfile.NamedTemporaryFile("w") as tok:
            tok.write("t0ken\n")
            tok.flush()
            p = run("-e", url, "--token-file", tok.name, "checkpoint", "--wait")
        check(p.returncode == 1 and "succeeded" not in p.stdout
              and "operation op-2 is no longer known: the coordinator changed since, and its op-2 "
                  "is another operation (resume, created " in p.stderr
              and polls == ["GET /v1/operations/op-2 HTTP/1.1"] * 2,
              f"checkpoint --wait whose op-2 became a resume (polled {polls})", p)
    finally:
        close()


HEALTH_KEYS = {"status": "ok", "node": "n0", "state": "running", "version": "0.1.0",
               "mutations": True, "idempotency_keys": True}


def scripted_server(answers, health=None):
    """A loopback port whose i-th POST reads one request and answers
    answers[i] (the last one again past the end), or, where answers[i] is
    None, closes without a word (the answer lost on the way, as a reset
    connection or a proxy's lost upstream); a GET /v1/health is answered
    health (a JSON object), or closed when None; (url, request heads, close).
    The heads are the POSTs'; heads.gets counts the health reads."""
    import threading
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)

    class Heads(list):
        gets = 0
    heads = Heads()

    def serve():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            with c:
                req = b""
                while b"\r\n\r\n" not in req:
                    chunk = c.recv(4096)
                    if not chunk:
                        break
                    req += chunk
                if req.startswith(b"GET /v1/health "):
                    heads.gets += 1
                    if health is not None:
                        c.sendall(json_answer(200, health))
                    continue
                heads.append(req.split(b"\r\n\r\n")[0].decode())
                a = answers[min(len(heads), len(answers)) - 1]
                if a is not None:
                    c.sendall(a)

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{srv.getsockname()[1]}", heads, lambda: close_server(srv)


def idem_keys(heads):
    return [l.split(":", 1)[1].strip() for h in heads for l in h.split("\r\n")
            if l.lower().startswith("idempotency-key:")]


def test_a_lost_answer_is_asked_again_with_the_same_idempotency_key():
    """Every mutation carries an Idempotency-Key, 32 hex digits drawn per
    command; an answer lost after the request went out (the connection
    closed without one, then a 503) is asked again with the same key, said
    once on stderr, and the answer that comes is taken; --idempotency-key
    sends the key given; a refusal (409) is not asked again."""
    op = {"id": "op-4", "kind": "checkpoint", "state": "running", "reason": None, "step": None,
          "args": {}}
    unavailable = json.dumps({"type": "about:blank", "title": "Service Unavailable", "status": 503,
                              "detail": "cannot reach the coordinator"}).encode()
    answers = [None, (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/problem+json"
                      b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(unavailable))
               + unavailable, json_answer(202, op)]
    with tempfile.NamedTemporaryFile("w") as tok:
        tok.write("t0ken\n")
        tok.flush()
        url, heads, close = scripted_server(answers, HEALTH_KEYS)
        try:
            p = run("-e", url, "--token-file", tok.name, "checkpoint")
            keys = idem_keys(heads)
            check(p.returncode == 0 and "op-4" in p.stdout and len(heads) == 3 and heads.gets == 1
                  and all(h.startswith("POST /v1/checkpoint ") for h in heads)
                  and len(keys) == 3 and len(set(keys)) == 1
                  and len(keys[0]) == 32 and all(c in "0123456789abcdef" for c in keys[0])
                  and p.stderr.count("sending the same request again (Idempotency-Key "
                                     f"{keys[0]})") == 1,
                  f"a checkpoint whose answer was lost twice is asked again with its key "
                  f"(keys {keys})", p)
        finally:
            close()
        url, heads, close = scripted_server([json_answer(202, op)])
        try:
            run("-e", url, "--token-file", tok.name, "checkpoint")
            run("-e", url, "--token-file", tok.name, "checkpoint")
            p = run("-e", url, "--token-file", tok.name, "resize", "--dp", "2",
                    "--idempotency-key", "nightly-resize-2026-12-04")
            keys = idem_keys(heads)
            check(p.returncode == 0 and len(keys) == 3 and keys[0] != keys[1]
                  and keys[2] == "nightly-resize-2026-12-04",
                  f"a key per command, and --idempotency-key's (keys {keys})", p)
        finally:
            close()
        conflict = json.dumps({"type": "about:blank", "title": "Conflict", "status": 409,
                               "detail": "cannot pause: the job is paused, not running"}).encode()
        url, heads, close = scripted_server([
            (b"HTTP/1.1 409 Conflict\r\nContent-Type: application/problem+json\r\n"
             b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(conflict)) + conflict])
        try:
            p = run("-e", url, "--token-file", tok.name, "pause")
            check(p.returncode == 1 and len(heads) == 1 and "again" not in p.stderr,
                  f"a 409 is not asked again ({len(heads)} requests)", p)
        finally:
            close()
    for key, says in (("", "it is empty"), ("k" * 256, "256 characters, over 255"),
                      ("a b", "byte 0x20 at offset 1"), ("caf\u00e9", "byte 0xc3 at offset 3")):
        p = run("pause", "--idempotency-key", key)
        check(p.returncode == 2 and f"mtnlgctl pause: --idempotency-key: {says}" in p.stderr,
              f"--idempotency-key {key[:20]!r} is a usage error saying {says!r}", p)


def test_a_lost_answer_is_not_asked_again_of_a_daemon_that_ignores_the_key():
    """An older mtnlgd ignores Idempotency-Key: a resend would order again.
    So mtnlgctl resends only when the daemon honours the key: a 503 that
    echoes it is enough (no health read); otherwise one GET /v1/health
    before the first resend must say "idempotency_keys": true. A daemon
    whose health says nothing of keys, after a lost answer or a 503 without
    the echo, is sent the order once, and mtnlgctl says what to check. (One
    whose health does not answer is asked again for 30 s, then the same:
    not tested here, for the time.)"""
    op = {"id": "op-4", "kind": "checkpoint", "state": "running", "reason": None, "step": None,
          "args": {}}
    old_health = {k: v for k, v in HEALTH_KEYS.items() if k != "idempotency_keys"}
    unavailable = json.dumps({"type": "about:blank", "title": "Service Unavailable", "status": 503,
                              "detail": "cannot reach the coordinator"}).encode()

    def answer_503(echo):
        return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/problem+json\r\n"
                + (b"Idempotency-Key: k-echo\r\n" if echo else b"")
                + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(unavailable)
                + unavailable)
    with tempfile.NamedTemporaryFile("w") as tok:
        tok.write("t0ken\n")
        tok.flush()
        for first, health, why in ((None, old_health, "a lost answer, health without the key"),
                                   (answer_503(False), old_health, "a 503 without the echo")):
            url, heads, close = scripted_server([first, json_answer(202, op)], health)
            try:
                p = run("-e", url, "--token-file", tok.name, "checkpoint", "--idempotency-key",
                        "k-echo")
                check(p.returncode != 0 and len(heads) == 1 and heads.gets >= 1
                      and "not sent again" in p.stderr and "mtnlgctl ops" in p.stderr
                      and "sending the same request again" not in p.stderr,
                      f"{why}: sent once ({len(heads)} POSTs, {heads.gets} health reads)", p)
            finally:
                close()
        url, heads, close = scripted_server([answer_503(True), json_answer(202, op)], None)
        try:
            p = run("-e", url, "--token-file", tok.name, "checkpoint", "--idempotency-key",
                    "k-echo")
            check(p.returncode == 0 and len(heads) == 2 and heads.gets == 0 and "op-4" in p.stdout,
                  f"a 503 echoing the key is sent again, no health read ({len(heads)} POSTs, "
                  f"{heads.gets} health reads)", p)
        finally:
            close()


def test_token_file():
    url = f"http://127.0.0.1:{free_port()}"
    with tempfile.TemporaryDirectory() as d:
        missing = os.path.join(d, "missing-token")
        p = run("-e", url, "--token-file", missing, "pause")
        check(p.returncode == 2, "pause with a missing token file exits 2", p)
        check(f"--token-file: cannot read the token file {missing}: No such file or "
              "directory" in p.stderr, "the message names the file and why", p)
        # a read reads the token file only when the daemon answers 401: here none answers
        p = run("-e", url, "--token-file", missing, "status")
        check(p.returncode == 3 and "cannot read the token file" not in p.stderr,
              "status with a missing token file goes to the daemon (exit 3 with none)", p)
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
        check(p.returncode == 2 and "a space (0x20) at byte 3 between two words: the file holds "
              "more than one word or line" in p.stderr, "a token with a space exits 2", p)
        # mtnlgd's rule for control.token_file (mt_token_word), and tools/local-cluster's
        lines = os.path.join(d, "two-lines")
        with open(lines, "w") as f:
            f.write("secret-token\nline2\n")
        p = run("-e", url, "--token-file", lines, "pause")
        check(p.returncode == 2 and f"the token file {lines}: a line break (0x0a) at byte 12 "
              "between two words" in p.stderr, "a token of two lines exits 2", p)
        lc = subprocess.run([sys.executable, LOCAL_CLUSTER, "--token-file", lines,
                             "--mtnlgd", "/nonexistent"], capture_output=True, text=True,
                            timeout=60, env=clean_env())
        check(lc.returncode == 2 and f"--token-file {lines}: a line break (0x0a) at byte 12 "
              "between two words" in lc.stderr,
              "tools/local-cluster refuses the token file mtnlgctl refuses", lc)
        # a byte that is not printable ASCII is named as such, not as a second word
        for name, raw, says in (
                ("utf8", "s\u00e9cret\n".encode(), "byte 0xc3 at offset 1 is not printable ASCII "
                 "(0x21..0x7e): a non-ASCII character"),
                ("bel", b"abc\x07def\n", "byte 0x07 at offset 3 is not printable ASCII "
                 "(0x21..0x7e): a control character")):
            odd = os.path.join(d, name)
            with open(odd, "wb") as f:
                f.write(raw)
            p = run("-e", url, "--token-file", odd, "pause")
            lc = subprocess.run([sys.executable, LOCAL_CLUSTER, "--token-file", odd,
                                 "--mtnlgd", "/nonexistent"], capture_output=True, text=True,
                                timeout=60, env=clean_env())
            check(p.returncode == 2 and f"the token file {odd}: {says}" in p.stderr
                  and "more than one" not in p.stderr
                  and lc.returncode == 2 and f"--token-file {odd}: {says}" in lc.stderr,
                  f"a token with a {name} byte is refused naming the byte", p)
        spaced = os.path.join(d, "spaced")
        with open(spaced, "w") as f:
            f.write("  s3cret \n\n")
        p = run("-e", url, "--token-file", spaced, "pause")
        check(p.returncode == 3, "whitespace around the one word is allowed", p)
        good = os.path.join(d, "token")
        with open(good, "w") as f:
            f.write("s3cret\n")
        p = run("-e", url, "--token-file", good, "pause")
        check(p.returncode == 3, "a readable token file gets as far as the daemon", p)
        check("s3cret" not in p.stderr + p.stdout, "the token is never printed", p)
        # the address and the token after the verb, as the help and hints spell them
        for args in (["pause", "--token-file", missing, "-e", url],
                     ["pause", f"--token-file={missing}", f"--endpoint={url}"]):
            p = run(*args)
            check(p.returncode == 2 and f"--token-file: cannot read the token file {missing}"
                  in p.stderr, f"{args}: the token file after the verb is read", p)
        p = run("status", "-e", url)
        check(p.returncode == 3 and f"cannot reach the daemon at {url}" in p.stderr,
              "status -e URL: the endpoint after the verb is used", p)
        p = run("pause", "--token-file")
        check(p.returncode == 2 and "--token-file needs a value" in p.stderr,
              "pause --token-file without a value is a usage error", p)
        p = run("status", "--bogus")
        check(p.returncode == 2 and "mtnlgctl status: unrecognized option" in p.stderr,
              "an unknown option names the tool and the verb", p)


def test_ckpt_verify_of_a_missing_dir_says_it_does_not_exist():
    with tempfile.TemporaryDirectory() as d:
        missing = os.path.join(d, "nonexistent")
        p = run("ckpt", "verify", missing)
        check(p.returncode == 1 and p.stderr == f"mtnlgctl ckpt: {missing}: No such file or "
              "directory\n", "ckpt verify of a missing directory says it does not exist", p)
        p = run("ckpt", "verify", d)
        check(p.returncode == 1 and f"{d} holds no committed checkpoint" in p.stderr,
              "ckpt verify of an empty directory says it holds no checkpoint", p)


def test_completion_knows_every_verb():
    with open(COMPLETION) as f:
        text = f.read()
    line = [l for l in text.splitlines() if l.strip().startswith("local verbs=")]
    listed = line[0].split("'")[1].split() if line else []
    check(sorted(listed) == sorted(VERBS), f"the completion's verbs {listed} are not {VERBS}")
    # and the completion runs: 'mtnlgctl ck<TAB>' offers ckpt and checkpoint(s)
    script = (f"source {COMPLETION}; COMP_WORDS=(mtnlgctl ck); COMP_CWORD=1; _mtnlgctl; "
              "echo \"${COMPREPLY[*]}\"; COMP_WORDS=(mtnlgctl ckpt ''); COMP_CWORD=2; "
              "_mtnlgctl; echo \"${COMPREPLY[*]}\"; "
              "COMP_WORDS=(mtnlgctl ckpt export d o --dtype ''); COMP_CWORD=6; "
              "_mtnlgctl; echo \"${COMPREPLY[*]}\"")
    p = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
    lines = p.stdout.splitlines()
    check(p.returncode == 0 and len(lines) == 3 and "ckpt" in lines[0].split()
          and lines[1].split() == ["verify", "export", "reshard"]
          and lines[2].split() == ["fp32", "bf16", "fp16"], "completing ck, ckpt and --dtype", p)


def test_no_cublas_loaded():
    """A CUDA build's mtnlgctl loads neither cuBLAS nor cuBLASLt (600 MB,
    half a second of every command's start): kernels/cuda dlopens them when
    a GPU opens, which mtnlgctl never does."""
    p = subprocess.run(["ldd", ctl], capture_output=True, text=True, timeout=30)
    check(p.returncode == 0 and "libcublas" not in p.stdout,
          "mtnlgctl loads cuBLAS: " + " ".join(l.split()[0] for l in p.stdout.splitlines()
                                               if "cublas" in l), p)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    ctl = sys.argv[1]
    for t in (test_usage_errors_exit_2, test_integer_options_take_decimal_digits_up_to_int_max,
              test_resize_with_a_bare_number_suggests_dp,
              test_unknown_global_option_names_mtnlgctl_not_its_path,
              test_ckpt_export_into_a_missing_directory_names_the_directory,
              test_help_for_every_verb,
              test_unreachable_endpoint_exits_3, test_a_port_that_answers_no_http_exits_3,
              test_endpoint_given_as_the_api_root_is_taken_as_its_base,
              test_json_output_of_an_answer_without_a_problem_object_is_one_made_of_its_status,
              test_resize_wait_returns_once_the_daemon_shows_the_new_width,
              test_wait_notices_an_operation_id_another_coordinator_reused,
              test_a_lost_answer_is_asked_again_with_the_same_idempotency_key,
              test_a_lost_answer_is_not_asked_again_of_a_daemon_that_ignores_the_key,
              test_token_file,
              test_ckpt_verify_of_a_missing_dir_says_it_does_not_exist,
              test_completion_knows_every_verb, test_no_cublas_loaded):
        before = failures
        t()
        print(f"  {'ok' if failures == before else 'FAILED'} {t.__name__}")
    print("test_mtnlgctl_cli: " + ("all passed" if not failures else f"{failures} failure(s)"))
    sys.exit(1 if failures else 0)
