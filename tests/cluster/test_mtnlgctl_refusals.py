"""mtnlgctl against live daemons that refuse: what it prints where.

usage: test_mtnlgctl_refusals.py MTNLGD MTNLGCTL

Two daemons, each one node of a 4-node job (so each waits forming and
trains nothing; cheap), with a checkpoint.dir:
- one with a control token and control.reads_need_token:
  - test_json_output_of_a_refusal_is_the_daemons_problem_on_stdout: under
    -o json every verb the daemon refuses (a 409 for pause, resume,
    checkpoint and resize while forming, a 404 for an unknown operation,
    a 401 for status, nodes, watch, history, ops and checkpoints without
    the token)
    prints the daemon's problem+json object on stdout, the one line on
    stderr and exits 1; in a table nothing goes to stdout;
  - test_a_wrong_token_is_said_not_accepted: a 401 with a token says the
    daemon did not accept it and names the file it came from, once;
  - test_history_before_any_step_says_there_is_none_yet: `mtnlgctl history`,
    with and without --since;
  - test_checkpoints_while_forming_does_not_offer_mtnlgctl_checkpoint: no
    checkpoint yet, and `mtnlgctl checkpoint` is refused until a
    generation runs, so the hint says so rather than offering it;
  - test_endpoint_given_as_the_api_root_reaches_the_daemon: -e URL/v1;
  - test_a_list_of_endpoints_goes_on_to_one_that_answers: -e DEAD,URL:
    status answers and a pause is refused (409) by the daemon, and a list
    of two that do not answer names both, exit 3;
  - test_a_refusal_whose_answer_was_lost_is_answered_again: through a
    proxy that drops the first POST's answer, mtnlgctl checkpoint (refused,
    409, while forming) sends the POST again with the same Idempotency-Key
    and is answered the refusal the coordinator kept (its log says the key
    repeats), and the key with another request (a stop) is a 422 naming the
    checkpoint: the key went through the real daemon and store. (A refusal,
    not a stop: the daemon leaves 2 s after a stop, and a resend on a
    loaded machine could come later; nothing here depends on time.)
- one without a control token (mutations off):
  - test_a_daemon_without_a_token_is_told_to_get_one: the 401 of a pause,
    with or without --token-file, says to set control.token_file on the
    daemon and restart it, not to give a token no daemon would accept.
Each check prints `ok NAME` or `FAIL NAME: detail`; exit 1 when any failed.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tools"))
from local_cluster import (LocalCluster, check, free_port, license_tokens,  # noqa: E402
                           tiny_job)

failures = 0


def clean_env():
    return {k: v for k, v in os.environ.items() if not k.startswith("MTNLG_")
            and k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}


def ctl(mtnlgctl, node, *args, endpoint=None):
    return subprocess.run([mtnlgctl, "-e", endpoint or node.url(), *args], capture_output=True,
                          text=True, timeout=60, env=clean_env())


def wait_health(c, node):
    deadline = time.time() + 60
    while time.time() < deadline:
        if node.proc.poll() is not None:
            raise AssertionError("the daemon exited %s\n%s" % (node.proc.returncode, c.logs()))
        try:
            with urllib.request.urlopen(node.url() + "/v1/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError("no /v1/health in 60 s\n" + c.logs())


def refused_as_json(mtnlgctl, node, args, status, token_file=None):
    """'' when -o json ARGS exits 1 with the daemon's problem (of status) on
    stdout and its line on stderr, and ARGS in a table prints nothing on
    stdout; else what was wrong."""
    tok = ["--token-file", token_file] if token_file else []
    p = ctl(mtnlgctl, node, *tok, "-o", "json", *args)
    t = ctl(mtnlgctl, node, *tok, *args)
    try:
        obj = json.loads(p.stdout)
    except ValueError:
        obj = None
    lines = p.stderr.splitlines()
    ok = (p.returncode == 1 and isinstance(obj, dict) and obj.get("status") == status
          and obj.get("detail") and len(lines) == 1
          and lines[0].startswith("mtnlgctl: the daemon refused: %d " % status)
          and obj["detail"].split("\n")[0] in lines[0]
          and t.returncode == 1 and t.stdout == "" and t.stderr == p.stderr)
    return "" if ok else "%s: -o json exit %d stdout %r stderr %r; table exit %d stdout %r" % (
        " ".join(args), p.returncode, p.stdout[:400], p.stderr[:400], t.returncode, t.stdout[:200])


def test_with_token(mtnlgd, mtnlgctl, tmp, job):
    global failures
    c = LocalCluster(mtnlgd, os.path.join(tmp, "token"), job, nodes=1, devices="cpu:2",
                     extra={"control": {"reads_need_token": "yes"}}, token="refusal-token")
    n = c.nodes[0]
    try:
        c.start()
        wait_health(c, n)
        bad = []
        for args in (["pause"], ["resume"], ["checkpoint"], ["resize", "--dp", "1"],
                     ["pause", "--wait"]):
            bad.append(refused_as_json(mtnlgctl, n, args, 409, c.token_file))
        bad.append(refused_as_json(mtnlgctl, n, ["ops", "op-999"], 404, c.token_file))
        for args in (["status"], ["nodes"], ["watch", "--count", "1"], ["history"], ["ops"],
                     ["checkpoints"]):
            bad.append(refused_as_json(mtnlgctl, n, args, 401))
        bad = [b for b in bad if b]
        failures += check("test_json_output_of_a_refusal_is_the_daemons_problem_on_stdout",
                          not bad, "\n".join(bad))

        wrong = os.path.join(tmp, "wrong-token")
        with open(wrong, "w") as f:
            f.write("not-the-token\n")
        p = ctl(mtnlgctl, n, "--token-file", wrong, "pause")
        failures += check("test_a_wrong_token_is_said_not_accepted",
                          p.returncode == 1 and "401" in p.stderr
                          and "the bearer token sent was not accepted" in p.stderr
                          and "(the token sent is the one in %s)" % wrong in p.stderr
                          and "restart it" not in p.stderr, p.stderr)

        p = ctl(mtnlgctl, n, "--token-file", c.token_file, "history")
        p2 = ctl(mtnlgctl, n, "--token-file", c.token_file, "history", "--since", "5")
        failures += check("test_history_before_any_step_says_there_is_none_yet",
                          p.returncode == 0 and p.stdout == "no steps yet\n"
                          and p2.returncode == 0 and p2.stdout == "no steps after step 5 yet\n",
                          p.stdout + p.stderr + p2.stdout + p2.stderr)

        p = ctl(mtnlgctl, n, "--token-file", c.token_file, "checkpoints")
        failures += check("test_checkpoints_while_forming_does_not_offer_mtnlgctl_checkpoint",
                          p.returncode == 0 and "no checkpoints yet in" in p.stdout
                          and "the cluster is forming, and `mtnlgctl checkpoint` is refused "
                          "until a generation runs" in p.stdout
                          and "writes one" not in p.stdout, p.stdout + p.stderr)

        outs = [ctl(mtnlgctl, n, "--token-file", c.token_file, "-o", "json", "status",
                    endpoint=n.url() + suffix) for suffix in ("/v1", "/v1/")]
        failures += check("test_endpoint_given_as_the_api_root_reaches_the_daemon",
                          all(p.returncode == 0 and json.loads(p.stdout)["state"] == "forming"
                              for p in outs),
                          "; ".join("exit %d %r" % (p.returncode, p.stderr) for p in outs))

        # -e with several endpoints (any node answers for the cluster): one
        # that cannot be reached is passed over, for reads and mutations
        dead = ["http://127.0.0.1:%d" % free_port() for _ in range(2)]
        listed = "%s, %s/v1" % (dead[0], n.url())
        st = ctl(mtnlgctl, n, "--token-file", c.token_file, "-o", "json", "status",
                 endpoint=listed)
        pz = ctl(mtnlgctl, n, "--token-file", c.token_file, "pause", endpoint=listed)
        none = ctl(mtnlgctl, n, "--token-file", c.token_file, "status", endpoint=",".join(dead))
        failures += check(
            "test_a_list_of_endpoints_goes_on_to_one_that_answers",
            st.returncode == 0 and json.loads(st.stdout or "{}").get("state") == "forming"
            and pz.returncode == 1 and "409" in pz.stderr
            and none.returncode == 3
            and "cannot reach the daemon at any of 2 endpoints (%s: connection refused; %s: "
                "connection refused)" % tuple(dead) in none.stderr,
            "status exit %d %r; pause exit %d %r; none answering: exit %d %r" % (
                st.returncode, st.stderr, pz.returncode, pz.stderr, none.returncode,
                none.stderr))

        failures += check("test_a_refusal_whose_answer_was_lost_is_answered_again",
                          *refusal_through_a_proxy_that_loses_the_answer(mtnlgctl, c, n))
    except (AssertionError, OSError, ValueError, KeyError) as e:
        failures += check("test_with_token_runs", False, "%s\n%s" % (e, c.logs()))
    finally:
        c.kill_all()


def lossy_proxy(upstream_port):
    """A loopback port in front of the daemon that passes each request on
    and its answer back, but the first POST's answer it drops: it closes the
    client's connection once the daemon has answered, as a proxy losing its
    client, or a reset connection, would. (url, the request heads, close)."""
    import socket
    import threading
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    heads = []

    def handle(client):
        with client:
            req = b""
            while b"\r\n\r\n" not in req:
                chunk = client.recv(65536)
                if not chunk:
                    return
                req += chunk
            head, body = req.split(b"\r\n\r\n", 1)
            lines = head.decode("latin-1").split("\r\n")
            length = next((int(l.split(":", 1)[1]) for l in lines
                           if l.lower().startswith("content-length:")), 0)
            while len(body) < length:
                body += client.recv(65536)
            lines = [l for l in lines if not l.lower().startswith("connection:")]
            heads.append("\r\n".join(lines))
            with socket.create_connection(("127.0.0.1", upstream_port), timeout=10) as up:
                up.sendall(("\r\n".join(lines + ["Connection: close"]) + "\r\n\r\n")
                           .encode("latin-1") + body)
                answer = b""
                while True:
                    chunk = up.recv(65536)
                    if not chunk:
                        break
                    answer += chunk
            posts = [h for h in heads if h.startswith("POST ")]
            if lines[0].startswith("POST ") and len(posts) == 1:
                return  # the order reached the daemon; its answer is lost
            client.sendall(answer)

    def serve():
        while True:
            try:
                client, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(client,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()

    def close():
        try:
            srv.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        srv.close()
    return "http://127.0.0.1:%d" % srv.getsockname()[1], heads, close


def refusal_through_a_proxy_that_loses_the_answer(mtnlgctl, c, n):
    """mtnlgctl checkpoint --idempotency-key K through lossy_proxy: the
    coordinator refuses it (409: the job is forming) and keeps K with the
    refusal; the answer is lost; mtnlgctl, the daemon saying it honours
    keys, sends the POST again with K and is answered the kept refusal
    (exit 1, the 409's detail), the coordinator's log saying K repeats,
    once, and nothing accepted. Then a stop with K, straight to the daemon,
    is a 422 naming the checkpoint. (ok, detail) for check()."""
    port = int(n.url().rsplit(":", 1)[1])
    key = "refusals-lost-%d" % os.getpid()
    url, heads, close = lossy_proxy(port)
    try:
        p = ctl(mtnlgctl, n, "--token-file", c.token_file, "checkpoint", "--idempotency-key", key,
                endpoint=url)
    finally:
        close()
    posts = [h for h in heads if h.startswith("POST /v1/checkpoint ")]
    keys = [l.split(":", 1)[1].strip() for h in posts for l in h.split("\r\n")
            if l.lower().startswith("idempotency-key:")]
    other = ctl(mtnlgctl, n, "--token-file", c.token_file, "stop", "--idempotency-key", key)
    logs = n.stderr()
    ok = (p.returncode == 1 and "cannot checkpoint" in p.stderr and len(posts) == 2
          and keys == [key, key]
          and p.stderr.count("sending the same request again (Idempotency-Key %s)" % key) == 1
          and logs.count('repeats Idempotency-Key "%s": answered as before' % key) == 1
          and " accepted" not in logs
          and other.returncode == 1 and "422" in other.stderr
          and "was used for another request (checkpoint {})" in other.stderr)
    return ok, "exit %d, %d POSTs, keys %s\nstderr %r\nthe stop: exit %d %r\n%s" % (
        p.returncode, len(posts), keys, p.stderr, other.returncode, other.stderr,
        "" if ok else logs[-3000:])


def test_without_token(mtnlgd, mtnlgctl, tmp, job):
    global failures
    c = LocalCluster(mtnlgd, os.path.join(tmp, "notoken"), job, nodes=1, devices="cpu:2")
    n = c.nodes[0]
    tok = os.path.join(tmp, "some-token")
    with open(tok, "w") as f:
        f.write("some-token\n")
    try:
        c.start()
        wait_health(c, n)
        ps = [ctl(mtnlgctl, n, "pause"), ctl(mtnlgctl, n, "--token-file", tok, "pause")]
        says = "set control.token_file in the daemon's config"
        ok = all(p.returncode == 1 and "401 Unauthorized" in p.stderr and "mutations are off"
                 in p.stderr and says in p.stderr and "restart it" in p.stderr
                 and "--token-file PATH" not in p.stderr and "was not accepted" not in p.stderr
                 for p in ps)
        bad = refused_as_json(mtnlgctl, n, ["pause"], 401)
        failures += check("test_a_daemon_without_a_token_is_told_to_get_one", ok and not bad,
                          " | ".join(p.stderr for p in ps) + bad)
    except (AssertionError, OSError, ValueError, KeyError) as e:
        failures += check("test_without_token_runs", False, "%s\n%s" % (e, c.logs()))
    finally:
        c.kill_all()


def main():
    mtnlgd, mtnlgctl = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
    tmp = tempfile.mkdtemp(prefix="mt_ctlrefuse_")
    try:
        tokens = license_tokens(os.path.join(tmp, "tokens.u16"))
        job = tiny_job(os.path.join(tmp, "job.json"), tokens, "refusals", 1000,
                       checkpoint={"dir": os.path.join(tmp, "ckpt"), "interval": 0})
        test_with_token(mtnlgd, mtnlgctl, tmp, job)
        test_without_token(mtnlgd, mtnlgctl, tmp, job)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
