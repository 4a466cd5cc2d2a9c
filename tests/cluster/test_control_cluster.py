"""The control plane of live daemons: every endpoint, every error, mutations
sent to any node acting on the whole cluster, and mtnlgctl against it.

usage: test_control_cluster.py MTNLGD MTNLGCTL SOURCE_ROOT

Two clusters of 4 mtnlgd on loopback (tools/local_cluster.py), cpu:2 each,
tp 2 x pp 2 x dp 2 of a 4-layer tiny model, with a control token:
- A runs a long job: the reads (checked against proto/control-v1.yaml with
  tests/common/openapi_check.py), the error answers, pause (with an
  Idempotency-Key, retried through two other nodes) and resume by HTTP,
  /v1/metrics (promtool), then mtnlgctl's verbs (history's rows against
  /v1/history's points), ending with stop --wait.
- B runs a 120-step job: paused through member n3 near step 5 for 1.5 s,
  resumed through member n2, stopped through member n1 past step 25; its
  losses are those of `mtnlgd --standalone` of the same job.
- C, 2 nodes running tp 2 x pp 2 with train.exit_duration_mins of 18 s,
  paused at its second step: /v1/status and mtnlgctl status on both nodes
  say when it exits (and after which step its train.exit_interval of 50000
  would stop it); the deadline passes while it is paused, and it stops
  there by itself with that step's checkpoint, naming the reason.
Each check prints `ok NAME` or `FAIL NAME: detail`; the exit status is 1 when
any failed.
"""
import http.client
import importlib.util
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
import local_cluster  # noqa: E402
from local_cluster import LocalCluster, last_step, grep, license_tokens  # noqa: E402

TOKEN = "live-control-token"
HB_MS, TIMEOUT_MS = 200, 2000
failures = 0


def check(name, ok, detail=""):
    """local_cluster.check, counted: the exit status is 1 when any failed."""
    global failures
    failures += local_cluster.check(name, ok, detail)




def write_job(path, tokens, steps, name):
    job = {
        "name": name,
        "model": {"preset": "tiny", "n_layer": 4},
        "parallel": {"tp": 2, "pp": 2, "dp_min": 2, "dp_max": 2, "micro_batch": 2},
        "train": {"global_batch": 8, "steps": steps, "seed": 7,
                  "lr": {"schedule": "cosine", "peak": 3e-3, "min": 3e-4, "warmup_steps": 3}},
        "data": {"path": tokens},
    }
    with open(path, "w") as f:
        json.dump(job, f)
    return path


def wait_until(pred, timeout, step_s=0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(step_s)
    return pred()


# ---------------------------------------------------------------- HTTP


class Answer:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body
        self.content_type = headers.get("content-type", "")

    def json(self):
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    def __repr__(self):
        return "%d %s %s" % (self.status, self.content_type, self.body[:300])


def request(node, method, path, body=None, token=None, timeout=15, extra=None):
    """One request on a fresh connection (extra: more headers); the answer
    with lower-cased headers."""
    conn = http.client.HTTPConnection("127.0.0.1", node.control_port, timeout=timeout)
    headers = dict(extra or {})
    if token is not None:
        headers["Authorization"] = "Bearer " + token
    if body is not None:
        headers["Content-Type"] = "application/json"
        if isinstance(body, str):
            body = body.encode()
    try:
        try:
            conn.request(method, path, body=body, headers=headers)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon answered before taking the whole body (413)
        r = conn.getresponse()
        return Answer(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


def get(node, path, token=None):
    return request(node, "GET", path, token=token)


def post(node, path, body=None, token=TOKEN, extra=None):
    return request(node, "POST", path, body=body, token=token, extra=extra)


class Contract:
    """openapi_check against proto/control-v1.yaml, for answers as they come."""

    def __init__(self, source_root):
        spec = importlib.util.spec_from_file_location(
            "openapi_check", os.path.join(source_root, "tests", "common", "openapi_check.py"))
        self.oc = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.oc)
        self.spec = self.oc.load(os.path.join(source_root, "proto", "control-v1.yaml"))

    def errors(self, method, path, a):
        return self.oc.check_response(self.spec, method, path, a.status, a.body, a.content_type,
                                      a.headers)

    def problem_errors(self, a):
        """For answers the document has no entry for (a path it lacks): a Problem body."""
        errs = []
        if not a.content_type.startswith("application/problem+json"):
            errs.append("content type %s" % a.content_type)
        body = a.json()
        errs += self.oc.validate(self.spec, {"$ref": "#/components/schemas/Problem"}, body)
        if isinstance(body, dict) and body.get("status") != a.status:
            errs.append("problem status %s in a %d answer" % (body.get("status"), a.status))
        return errs


def op_of(node, location, token=None):
    a = get(node, location, token)
    return a.json() if a.status == 200 else None


def wait_op(node, location, timeout=15):
    """The operation once it succeeded or failed (or its last state at the deadline)."""
    last = [None]

    def done():
        last[0] = op_of(node, location)
        return bool(last[0]) and last[0].get("state") in ("succeeded", "failed")

    wait_until(done, timeout, 0.1)
    return last[0]


def states(cluster):
    out = []
    for n in cluster.nodes:
        a = get(n, "/v1/status")
        out.append(a.json().get("state") if a.status == 200 else a.status)
    return out


def printed_steps(node):
    return {s["step"]: s for s in node.steps() if "loss" in s}


# ---------------------------------------------------------- cluster A


def test_every_read_answers_200_per_the_yaml_on_every_node(c, doc):
    errs = []
    for n in c.nodes:
        for path in ("/v1/health", "/v1/status", "/v1/history", "/v1/history?since=2",
                     "/v1/checkpoints", "/v1/operations", "/v1/metrics", "/"):
            a = get(n, path)
            if a.status != 200:
                errs.append("%s GET %s: %r" % (n.name, path, a))
                continue
            errs += ["%s: %s" % (n.name, e) for e in doc.errors("GET", path, a)]
            if path == "/" and b"<!DOCTYPE html>" not in a.body[:200]:
                errs.append("%s GET /: not the dashboard page" % n.name)
            if path == "/v1/health":
                h = a.json()
                if h.get("node") != n.name or h.get("state") != "running":
                    errs.append("%s health: %s" % (n.name, h))
    check("test_every_read_answers_200_per_the_yaml_on_every_node", not errs, "; ".join(errs[:6]))


def test_status_step_and_loss_match_the_printed_step_lines(c):
    errs = []
    for n in c.nodes:
        time.sleep(0.11)  # past the 100 ms an answered snapshot is served again
        before = last_step(n)
        st = get(n, "/v1/status").json()
        printed = printed_steps(n)
        after = max(printed) if printed else 0
        step = st.get("step")
        # between the steps printed before and after the request (how many
        # steps the request took is the machine's speed, not the daemon's)
        if not (before - 1 <= step <= after):
            errs.append("%s: status step %s, printed %d..%d" % (n.name, step, before, after))
        elif step not in printed or abs(printed[step]["loss"] - st["loss"]) > 1e-8:
            errs.append("%s: status loss %s at step %s, printed %s" % (
                n.name, st.get("loss"), step, printed.get(step, {}).get("loss")))
        if st.get("node") != n.name or st.get("coordinator") != "n0" or \
                st.get("state") != "running" or (st.get("job") or {}).get("dp") != 2:
            errs.append("%s: node %s coordinator %s state %s job %s" % (
                n.name, st.get("node"), st.get("coordinator"), st.get("state"), st.get("job")))
        names = [x.get("name") for x in st.get("nodes", [])]
        if names != ["n0", "n1", "n2", "n3"]:
            errs.append("%s: nodes %s" % (n.name, names))
        mine = [(d["node"], d["device"]) for d in st.get("devices", [])]
        if mine != [(n.name, "cpu:0"), (n.name, "cpu:1")]:
            errs.append("%s: devices %s" % (n.name, mine))
    check("test_status_step_and_loss_match_the_printed_step_lines", not errs, "; ".join(errs))


def test_history_holds_the_printed_losses_and_since_filters(c):
    errs = []
    n = c.nodes[0]
    h = get(n, "/v1/history").json()
    printed = printed_steps(n)
    steps = [p["step"] for p in h["steps"]]
    if steps != list(range(1, len(steps) + 1)) or h["last_step"] != steps[-1]:
        errs.append("steps %s, last_step %s" % (steps, h["last_step"]))
    for p in h["steps"]:
        if p["step"] in printed and abs(p["loss"] - printed[p["step"]]["loss"]) > 1e-8:
            errs.append("step %d: history loss %s, printed %s" % (
                p["step"], p["loss"], printed[p["step"]]["loss"]))
    since = steps[-1] - 2
    h2 = get(n, "/v1/history?since=%d" % since).json()
    got = [p["step"] for p in h2["steps"]]
    if not got or got[0] != since + 1 or any(s <= since for s in got):
        errs.append("since=%d gave steps %s" % (since, got))
    h3 = get(n, "/v1/history?since=%d" % (10 ** 9)).json()
    if h3["steps"] or h3["last_step"] < steps[-1]:
        errs.append("since=1e9 gave %s" % h3)
    check("test_history_holds_the_printed_losses_and_since_filters", not errs, "; ".join(errs[:5]))


def test_error_answers(c, doc):
    n0, n2 = c.nodes[0], c.nodes[2]

    def expect(name, a, status, method, path, headers=()):
        errs = [] if a.status == status else ["status %d, want %d: %r" % (a.status, status, a)]
        if doc.oc.find_operation(doc.spec, method, path)[1] is not None:
            errs += doc.errors(method, path, a)
        else:
            errs += doc.problem_errors(a)
        for h in headers:
            if h.lower() not in a.headers:
                errs.append("no %s header" % h)
        return ["%s: %s" % (name, e) for e in errs]

    errs = []
    errs += expect("malformed JSON", post(n2, "/v1/pause", "{"), 400, "POST", "/v1/pause")
    errs += expect("body not an object", post(n2, "/v1/pause", "[1]"), 400, "POST", "/v1/pause")
    errs += expect("unknown field", post(n2, "/v1/pause", '{"now": true}'), 400, "POST",
                   "/v1/pause")
    for body in ('{"dp": 0}', '{"dp": "2"}', '{"dp": 1.5}', '{}', '{"dp": 2, "tp": 1}'):
        errs += expect("resize " + body, post(n2, "/v1/resize", body), 400, "POST", "/v1/resize")
    for q in ("-1", "abc", "", "1.5"):
        errs += expect("since=" + q, get(n2, "/v1/history?since=" + q), 400, "GET", "/v1/history")
    check("test_malformed_json_unknown_field_bad_dp_and_bad_since_answer_400", not errs,
          "; ".join(errs[:6]))

    errs = []
    for kind in ("pause", "resume", "stop", "checkpoint", "resize"):
        body = '{"dp": 2}' if kind == "resize" else None
        for token in (None, "wrong-token", TOKEN + "x", TOKEN[:-1]):
            a = post(n2, "/v1/" + kind, body, token=token)
            errs += expect("%s with token %s" % (kind, token), a, 401, "POST", "/v1/" + kind,
                           ["WWW-Authenticate"])
            if a.headers.get("www-authenticate") != 'Bearer realm="mtnlg"':
                errs.append("%s: WWW-Authenticate %s" % (kind, a.headers.get("www-authenticate")))
    check("test_missing_or_wrong_token_answers_401_with_www_authenticate", not errs,
          "; ".join(errs[:6]))

    errs = []
    errs += expect("unknown path", get(n2, "/v1/nope"), 404, "GET", "/v1/nope")
    errs += expect("unknown path POST", post(n2, "/v1/pauses"), 404, "POST", "/v1/pauses")
    errs += expect("unknown op", get(n2, "/v1/operations/op-999"), 404, "GET",
                   "/v1/operations/op-999")
    check("test_unknown_path_and_unknown_op_answer_404", not errs, "; ".join(errs[:6]))

    errs = []
    for method, path, doc_method, allow in (("POST", "/v1/status", "GET", "GET"),
                                            ("DELETE", "/v1/operations", "GET", "GET"),
                                            ("PUT", "/", "GET", "GET"),
                                            ("GET", "/v1/pause", "POST", "POST"),
                                            ("DELETE", "/v1/resize", "POST", "POST")):
        a = request(n2, method, path, token=TOKEN)
        errs += expect("%s %s" % (method, path), a, 405, doc_method, path, ["Allow"])
        if allow not in a.headers.get("allow", ""):
            errs.append("%s %s: Allow %s" % (method, path, a.headers.get("allow")))
    check("test_wrong_method_answers_405_with_allow", not errs, "; ".join(errs[:6]))

    errs = []
    big = '{"pad": "%s"}' % ("x" * 70000)
    errs += expect("70000-byte pause", post(n2, "/v1/pause", big), 413, "POST", "/v1/pause")
    errs += expect("70000-byte resize", post(n0, "/v1/resize", big), 413, "POST", "/v1/resize")
    still = get(n2, "/v1/health").status == 200 and states(c) == ["running"] * 4
    check("test_body_over_64k_answers_413_and_changes_nothing", not errs and still,
          "; ".join(errs[:6]) or "states %s" % states(c))

    a = post(n2, "/v1/resume")
    errs = expect("resume while running", a, 409, "POST", "/v1/resume")
    detail = (a.json() or {}).get("detail", "")
    check("test_resume_while_running_answers_409", not errs and "not paused" in detail,
          "; ".join(errs) or detail)

    # being implemented: the coordinator answered 501 (which the document does
    # not list) before checkpoints and resize; now 409 (this job has no
    # checkpoint.dir, and dp 2 is the width it runs) or 202. The note says which.
    notes, errs = [], []
    for kind, body in (("checkpoint", None), ("resize", '{"dp": 2}')):
        a = post(n2, "/v1/" + kind, body)
        notes.append("%s %d" % (kind, a.status))
        if a.status == 501:
            errs += ["%s 501: %s" % (kind, e) for e in doc.problem_errors(a)]
        elif a.status in (202, 409):
            errs += ["%s: %s" % (kind, e) for e in doc.errors("POST", "/v1/" + kind, a)]
            if a.status == 202:
                wait_op(n2, a.headers.get("location", "/v1/operations/none"), 30)
        else:
            errs.append("%s: %r" % (kind, a))
    wait_until(lambda: states(c) == ["running"] * 4, 30)
    print("  note: %s" % ", ".join(notes))
    check("test_checkpoint_and_resize_answer_per_the_yaml_or_501", not errs, "; ".join(errs))


def test_pause_and_resume_answer_202_with_location_and_their_ops_succeed(c, doc):
    """Leaves the cluster paused (pause through n1) for what follows, then resume() resumes it."""
    errs = []
    n1 = c.nodes[1]
    a = post(n1, "/v1/pause", "{}", extra={"Idempotency-Key": PAUSE_KEY})
    loc = a.headers.get("location", "")
    errs += ["pause: %s" % e for e in doc.errors("POST", "/v1/pause", a)]
    op = a.json() or {}
    if a.status != 202 or loc != "/v1/operations/%s" % op.get("id") or op.get("kind") != "pause":
        errs.append("pause: %r, Location %s" % (a, loc))
    final = wait_op(n1, loc) if loc else None
    if not final or final.get("state") != "succeeded" or not isinstance(final.get("step"), int):
        errs.append("pause op ended as %s" % final)
    if not wait_until(lambda: states(c) == ["paused"] * 4, 10):
        errs.append("states after pause: %s" % states(c))
    for n in c.nodes:  # every node lists it, and answers for it
        ops = get(n, "/v1/operations")
        errs += ["%s: %s" % (n.name, e) for e in doc.errors("GET", "/v1/operations", ops)]
        one = get(n, loc)
        errs += ["%s: %s" % (n.name, e) for e in doc.errors("GET", loc, one)]
        if op.get("id") not in [o.get("id") for o in (ops.json() or {}).get("operations", [])] \
                or (one.json() or {}).get("id") != op.get("id"):
            errs.append("%s does not know %s: %s" % (n.name, op.get("id"), ops.body[:200]))
    check("test_pause_through_n1_answers_202_with_location_and_pauses_every_node", not errs,
          "; ".join(errs[:6]))
    return final


PAUSE_KEY = "live-pause-1"


def test_the_pause_retried_with_its_key_through_other_nodes_is_answered_again(c, doc, op):
    """The pause went through n1 with an Idempotency-Key; its answer lost,
    a client sends it again, here to n2 and n3 (the key rides through the
    store to the coordinator): each answers 202 with the same operation as
    it stands (succeeded), Idempotent-Replayed: true and the key echoed,
    and orders nothing: the job stays paused, each node lists it once."""
    errs = []
    for n in (c.nodes[2], c.nodes[3], c.nodes[2]):
        a = post(n, "/v1/pause", "{}", extra={"Idempotency-Key": PAUSE_KEY})
        errs += ["%s: %s" % (n.name, e) for e in doc.errors("POST", "/v1/pause", a)]
        got = a.json() or {}
        if (a.status != 202 or got.get("id") != (op or {}).get("id")
                or got.get("state") != "succeeded"
                or a.headers.get("idempotent-replayed") != "true"
                or a.headers.get("idempotency-key") != PAUSE_KEY):
            errs.append("%s: %r, headers %s" % (n.name, a, a.headers))
        ids = [o.get("id") for o in (get(n, "/v1/operations").json() or {}).get("operations", [])]
        if ids.count((op or {}).get("id")) != 1:
            errs.append("%s lists %s %d times" % (n.name, (op or {}).get("id"),
                                                  ids.count((op or {}).get("id"))))
    if states(c) != ["paused"] * 4:
        errs.append("states after the retries: %s" % states(c))
    health = get(c.nodes[0], "/v1/health").json() or {}
    if health.get("idempotency_keys") is not True:
        errs.append("health: %s" % health)
    check("test_the_pause_retried_with_its_key_through_other_nodes_is_answered_again", not errs,
          "; ".join(errs[:6]))


def test_pause_while_paused_answers_409(c, doc):
    a = post(c.nodes[3], "/v1/pause")
    errs = doc.errors("POST", "/v1/pause", a)
    check("test_pause_while_paused_answers_409", a.status == 409 and not errs,
          "%r %s" % (a, errs))


def test_resume_answers_202_with_location_and_every_node_runs_again(c, doc, paused_at):
    errs = []
    n0 = c.nodes[0]
    a = post(n0, "/v1/resume")
    loc = a.headers.get("location", "")
    errs += ["resume: %s" % e for e in doc.errors("POST", "/v1/resume", a)]
    if a.status != 202 or (a.json() or {}).get("kind") != "resume":
        errs.append("resume: %r" % a)
    final = wait_op(n0, loc) if loc else None
    if not final or final.get("state") != "succeeded":
        errs.append("resume op ended as %s" % final)
    if not wait_until(lambda: states(c) == ["running"] * 4, 10):
        errs.append("states after resume: %s" % states(c))
    if not wait_until(lambda: all(last_step(n) >= paused_at + 2 for n in c.nodes), 20):
        errs.append("steps after resume: %s" % [last_step(n) for n in c.nodes])
    check("test_resume_through_n0_answers_202_with_location_and_every_node_runs_again", not errs,
          "; ".join(errs[:6]))


def test_metrics(c):
    """While paused: the step cannot move between the two reads."""
    promtool = shutil.which("promtool") or ("/usr/bin/promtool"
                                            if os.path.exists("/usr/bin/promtool") else None)
    errs, lint = [], []
    for n in c.nodes:
        text = get(n, "/v1/metrics").body.decode()
        st = get(n, "/v1/status").json()
        m = re.search(r"^mtnlg_step (\S+)$", text, re.M)
        if not m or float(m.group(1)) != st["step"]:
            errs.append("%s: mtnlg_step %s, status step %s" % (n.name, m and m.group(1),
                                                               st["step"]))
        if not re.search(r'^mtnlg_state\{state="paused"\} 1$', text, re.M):
            errs.append("%s: mtnlg_state paused is not 1" % n.name)
        # paused: no rate of the last step, in the status or as a sample
        rates = [l for l in text.splitlines() if l.startswith(
            ("mtnlg_tokens_per_second", "mtnlg_device_flops_per_second", "mtnlg_device_mfu_ratio"))]
        if st["tokens_per_s"] is not None or rates or any(
                d["tflops"] is not None or d["mfu"] is not None for d in st["devices"]):
            errs.append("%s paused: tokens_per_s %s, devices %s, samples %s"
                        % (n.name, st["tokens_per_s"], st["devices"], rates))
        nodes = re.findall(r'^mtnlg_node_info\{node="([^"]*)"', text, re.M)
        if nodes != ["n0", "n1", "n2", "n3"]:
            errs.append("%s: node series %s" % (n.name, nodes))
        # the store: on the node that hosts it only, with what it holds
        store, keys = st.get("store"), re.search(r"^mtnlg_store_keys (\S+)$", text, re.M)
        if n.name == st["coordinator"]:
            if not store or store["keys"] < 4 or store["clients"] < 4 or not keys \
                    or store["bytes"] > store["max_bytes"] or int(float(keys.group(1))) < 4:
                errs.append("%s hosts the store: status %s, mtnlg_store_keys %s" % (
                    n.name, store, keys and keys.group(1)))
        elif store is not None or keys:
            errs.append("%s does not host the store: status %s" % (n.name, store))
        if promtool:
            p = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                               text=True, timeout=30)
            if p.returncode != 0:
                lint.append("%s: exit %d: %s" % (n.name, p.returncode, (p.stdout + p.stderr)[:400]))
    if promtool:
        check("test_promtool_check_metrics_accepts_live_metrics_of_every_node", not lint,
              "; ".join(lint))
    else:
        print("  skip test_promtool_check_metrics_accepts_live_metrics_of_every_node: no promtool")
    check("test_metrics_step_equals_status_step_and_a_paused_job_has_no_rates"
          "_and_the_store_is_on_its_host_only",
          not errs, "; ".join(errs[:6]))


def test_metrics_running_have_rates_with_node_and_device_labels(c):
    errs = []
    for n in c.nodes:
        text = get(n, "/v1/metrics").body.decode()
        st = get(n, "/v1/status").json()
        devs = re.findall(r'^mtnlg_device_flops_per_second\{node="([^"]*)",device="([^"]*)"',
                          text, re.M)
        if st["state"] != "running" or sorted(devs) != [(n.name, "cpu:0"), (n.name, "cpu:1")]:
            errs.append("%s (%s): device series %s" % (n.name, st["state"], devs))
        if not re.search(r"^mtnlg_tokens_per_second \S+$", text, re.M) \
                or not isinstance(st["tokens_per_s"], (int, float)):
            errs.append("%s: tokens_per_s %s" % (n.name, st["tokens_per_s"]))
    check("test_metrics_running_have_rates_and_devices_carry_node_and_device_labels", not errs,
          "; ".join(errs[:6]))


def ctl_env():
    return {k: v for k, v in os.environ.items()
            if not k.startswith("MTNLG_") and k.lower() not in
            ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}


def watch_on_a_terminal(argv):
    """What argv writes to a pseudo-terminal (mtnlgctl watch draws its full
    view only on one), and its exit status."""
    import pty
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdout=slave, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=ctl_env())
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: every writer closed its end
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    return out.decode(errors="replace"), proc.wait(60)


def test_mtnlgctl(c, mtnlgctl):
    n0, n1, n2, n3 = c.nodes

    def ctl(node, *args, timeout=60):
        return subprocess.run([mtnlgctl, "-e", node.url(), "--token-file", c.token_file, *args],
                              capture_output=True, text=True, timeout=timeout, env=ctl_env())

    def show(p):
        return "exit %d, stdout %r, stderr %r" % (p.returncode, p.stdout[-1500:], p.stderr[-600:])

    time.sleep(0.11)  # past the 100 ms an answered snapshot is served again
    before = last_step(n1)
    p = ctl(n1, "status")
    after = last_step(n1)
    m = re.search(r"^  step +(\d+) / 100000 ", p.stdout, re.M)
    ok = (p.returncode == 0 and m and before - 1 <= int(m.group(1)) <= after
          and "job ctl-live (hash " in p.stdout and ": tp 2 x pp 2 x dp 2" in p.stdout
          and "coordinator n0 (answered by n1, mtnlgd " in p.stdout
          and re.search(r"^  state +running$", p.stdout, re.M) is not None
          and re.search(r"^  loss +\d+\.\d{4}$", p.stdout, re.M) is not None)
    check("test_mtnlgctl_status_names_job_state_step_and_coordinator", ok, show(p))
    # an ETA of hours (100000 steps) says when too, on this machine's clock
    eta = get(n1, "/v1/status").json().get("eta_s")
    m = re.search(r"^  ETA +\d.* \(about (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\)$", p.stdout,
                  re.M)
    at = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) - time.time() if m else None
    ok = (isinstance(eta, (int, float)) and eta > 3600 and at is not None
          and 0.5 * eta - 60 < at < 2 * eta + 60)
    check("test_mtnlgctl_status_says_when_the_run_ends", ok,
          "eta_s %s, ETA line's time %s s from now; %s" % (eta, at, show(p)))
    p0 = ctl(n0, "status")
    ok = (p0.returncode == 0 and "  store " not in p.stdout
          and re.search(r"^  store +\d+ keys, \S+ \S+ of 17\.\d GB \(\d+\.\d%\); \d+ clients, "
                        r"\d+ waiting$", p0.stdout, re.M) is not None)
    check("test_mtnlgctl_status_shows_the_store_on_the_node_that_hosts_it", ok,
          show(p0) + "; n1: " + show(p))

    p = ctl(n3, "status", "--devices")
    rows = [l.split() for l in p.stdout.splitlines() if l.startswith("  n3 ")]
    ok = p.returncode == 0 and [r[:5] for r in rows] == [["n3", "cpu:0", "6", "1", "1"],
                                                         ["n3", "cpu:1", "7", "1", "1"]]
    check("test_mtnlgctl_status_devices_lists_the_answering_nodes_ranks", ok, show(p))

    # each node's own state reaches the coordinator's view a heartbeat or two later
    wait_until(lambda: [x.get("state") for x in get(n0, "/v1/status").json()["nodes"]]
               == ["running"] * 4, 5)
    p = ctl(n0, "nodes")
    rows = {l.split()[0]: l.split() for l in p.stdout.splitlines()[1:] if l.strip()}
    want = {"n0": ["coordinator", "running", "0,1", "0", "0", "cpu:0-1"],
            "n1": ["member", "running", "2,3", "0", "1", "cpu:0-1"],
            "n2": ["member", "running", "4,5", "1", "0", "cpu:0-1"],
            "n3": ["member", "running", "6,7", "1", "1", "cpu:0-1"]}
    got = {k: v[1:3] + v[4:8] for k, v in rows.items() if k in want}
    ok = (p.returncode == 0 and p.stdout.split()[:3] == ["NAME", "ROLE", "STATE"]
          and got == want and "4 nodes in generation 1." in p.stdout)
    check("test_mtnlgctl_nodes_lists_four_nodes_with_roles_ranks_stages_replicas", ok,
          "%s; got %s" % (show(p), got))

    p = ctl(n1, "-o", "json", "nodes")
    d = json.loads(p.stdout) if p.returncode == 0 else {}
    ok = d.get("generation") == 1 and [x["name"] for x in d.get("nodes", [])] == \
        ["n0", "n1", "n2", "n3"] and [x["ranks"] for x in d["nodes"]] == \
        [[0, 1], [2, 3], [4, 5], [6, 7]]
    check("test_mtnlgctl_nodes_json_is_generation_and_nodes", ok, show(p))

    p = ctl(n3, "ops")
    ops = get(n3, "/v1/operations").json()["operations"]
    rows = [l.split() for l in p.stdout.splitlines()[1:] if l.startswith("op-")]
    want = [[o["id"], o["kind"], "-", o["state"], str(o["step"])] for o in ops]
    ok = (p.returncode == 0 and p.stdout.split()[:7] ==
          ["ID", "KIND", "ARGS", "STATE", "STEP", "AGE", "DETAIL"]
          and [r[:5] for r in rows] == want and len(ops) >= 2
          and "%d operations." % len(ops) in p.stdout)
    check("test_mtnlgctl_ops_lists_the_pause_and_resume_done_by_http", ok,
          "%s; want %s" % (show(p), want))
    p = ctl(n3, "ops", ops[0]["id"])
    ok = p.returncode == 0 and p.stdout.startswith(
        "%s pause: succeeded at step %d\n" % (ops[0]["id"], ops[0]["step"]))
    p2 = ctl(n3, "ops", "op-999")
    ok2 = p2.returncode == 1 and "404 Not Found: no operation op-999" in p2.stderr
    check("test_mtnlgctl_ops_id_shows_one_and_an_unknown_id_exits_1", ok and ok2,
          show(p) + " / " + show(p2))

    # the steps as /v1/history has them, the newest N of those after a step
    p = ctl(n2, "history", "--since", "3", "--last", "4")
    pts = {x["step"]: x for x in get(n2, "/v1/history").json()["steps"]}
    rows = [l.split() for l in p.stdout.splitlines()[1:] if l[:1] == " " or l[:1].isdigit()]
    rows = [r for r in rows if len(r) == 9 and r[0].isdigit()]

    def cells(x):
        f = lambda k, fmt: fmt % x[k] if x.get(k) is not None else "-"  # noqa: E731
        return [str(x["step"]), f("loss", "%.4f"), f("val_loss", "%.4f"), f("lr", "%.3e"),
                f("grad_norm", "%.3f"), f("step_ms", "%.1f"), f("tokens_per_s", "%.0f"),
                *time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(x["time"])).split()]
    steps_shown = [int(r[0]) for r in rows]
    ok = (p.returncode == 0 and p.stdout.split()[:8] ==
          ["STEP", "LOSS", "VAL", "LOSS", "LR", "GRAD", "NORM", "STEP"] and len(rows) == 4
          and steps_shown[0] > 3 and steps_shown == list(range(steps_shown[0], steps_shown[0] + 4))
          and all(r == cells(pts[int(r[0])]) for r in rows)
          and "4 steps, %d to %d." % (steps_shown[0], steps_shown[-1]) in p.stdout)
    p2 = ctl(n2, "-o", "json", "history", "--last", "2")
    h = json.loads(p2.stdout) if p2.returncode == 0 else {}
    ok2 = (len(h.get("steps", [])) == 2 and isinstance(h.get("last_step"), int)
           and h["steps"][1]["step"] == h["steps"][0]["step"] + 1
           and all(pts.get(x["step"], x) == x for x in h["steps"]))
    p3 = ctl(n2, "history", "--since", "-1")
    ok3 = p3.returncode == 2 and '--since: "-1" is not a step number' in p3.stderr
    check("test_mtnlgctl_history_prints_the_daemons_steps_the_newest_after_a_step", ok and ok2
          and ok3, "%s; json %s; since -1 %s" % (show(p), show(p2), show(p3)))

    # this job has no checkpoint.dir: not "none yet", which mtnlgctl checkpoint cannot change
    p = ctl(n0, "checkpoints")
    a = get(n0, "/v1/checkpoints").json() or {}
    ok = (p.returncode == 0 and a.get("dir", "absent") is None and p.stdout ==
          "no checkpoints: the job has no checkpoint.dir (nor has this node's config), so none "
          "is saved and mtnlgctl checkpoint is refused\n")
    check("test_mtnlgctl_checkpoints_says_the_job_has_no_checkpoint_dir", ok,
          "%s; /v1/checkpoints %s" % (show(p), a))

    # a read needs no token file: one that is not there is not read
    env = dict(ctl_env(), MTNLG_TOKEN_FILE="/nonexistent")
    p = subprocess.run([mtnlgctl, "-e", n1.url(), "status"], capture_output=True, text=True,
                       timeout=60, env=env)
    p2 = subprocess.run([mtnlgctl, "-e", n1.url(), "pause"], capture_output=True, text=True,
                        timeout=60, env=env)
    ok = (p.returncode == 0 and "job ctl-live" in p.stdout and p2.returncode == 2
          and "MTNLG_TOKEN_FILE: cannot read the token file /nonexistent" in p2.stderr)
    check("test_mtnlgctl_status_reads_without_the_token_file_a_mutation_needs", ok,
          show(p) + " / " + show(p2))

    p = ctl(n1, "watch", "--count", "2", "--interval", "0.2")
    lines = p.stdout.splitlines()
    ok = p.returncode == 0 and len(lines) == 2 and all(
        re.search(r" step \d+/100000 loss \d+\.\d{4} tokens/s \d+ state running nodes "
                  r"n0=running/\S+ n1=running/\S+ n2=running/\S+ n3=running/\S+$", l)
        for l in lines)
    check("test_mtnlgctl_watch_prints_two_refreshes_naming_every_node", ok, show(p))
    p = ctl(n1, "-o", "json", "watch", "--count", "2", "--interval", "0.2")
    js = [json.loads(l) for l in p.stdout.splitlines()] if p.returncode == 0 else []
    ok = len(js) == 2 and all(j["node"] == "n1" and j["state"] == "running" for j in js)
    check("test_mtnlgctl_watch_json_prints_two_status_lines", ok, show(p))
    # on a terminal, the full view, whose ETA of hours says when too
    screen, code = watch_on_a_terminal(
        [mtnlgctl, "-e", n1.url(), "--token-file", c.token_file, "watch", "--count", "1"])
    m = re.search(r"  step \S+ ms  ETA \d[^\n]* \(about (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\)(\x1b\[K)?\r?\n",
                  screen)
    at = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) - time.time() if m else None
    eta = get(n1, "/v1/status").json().get("eta_s")
    ok = (code == 0 and "mtnlgctl watch: " in screen and at is not None
          and isinstance(eta, (int, float)) and 0.5 * eta - 60 < at < 2 * eta + 60)
    check("test_mtnlgctl_watch_on_a_terminal_says_when_the_run_ends", ok,
          "exit %s, ETA %s s from now (eta_s %s); screen %r" % (code, at, eta, screen[-1500:]))

    p = ctl(n0, "-o", "json", "status")
    st = json.loads(p.stdout) if p.returncode == 0 else {}
    ok = (st.get("node") == "n0" and st.get("state") == "running"
          and isinstance(st.get("step"), int) and st["step"] <= last_step(n0)
          and st.get("job", {}).get("name") == "ctl-live")
    check("test_mtnlgctl_json_status_parses_as_the_daemons_status", ok, show(p))

    p = subprocess.run([mtnlgctl, "-e", n2.url(), "pause"], capture_output=True, text=True,
                       timeout=60, env=ctl_env())
    wrong = os.path.join(os.path.dirname(c.token_file), "wrong-token")
    with open(wrong, "w") as f:
        f.write("not-the-token\n")
    p2 = subprocess.run([mtnlgctl, "-e", n2.url(), "--token-file", wrong, "pause"],
                        capture_output=True, text=True, timeout=60, env=ctl_env())
    ok = (p.returncode == 1 and "mtnlgctl: the daemon refused: 401 Unauthorized: " in p.stderr
          and "give the daemon's control token with --token-file PATH" in p.stderr
          and p2.returncode == 1 and "the bearer token sent was not accepted" in p2.stderr
          and "(the token sent is the one in %s)" % wrong in p2.stderr
          and "not-the-token" not in p2.stderr and states(c) == ["running"] * 4)
    check("test_mtnlgctl_pause_without_or_with_a_wrong_token_exits_1_with_the_401", ok,
          show(p) + " / " + show(p2))

    p = ctl(n1, "resume")
    ok = (p.returncode == 1 and p.stdout == "" and
          "mtnlgctl: the daemon refused: 409 Conflict: cannot resume: the job is running, "
          "not paused\n" in p.stderr)
    check("test_mtnlgctl_resume_while_running_exits_1_with_the_409", ok, show(p))

    p = ctl(n3, "pause", "--wait")
    m = re.search(r"^(op-\d+) pause: succeeded at step (\d+)$", p.stdout, re.M)
    ok = p.returncode == 0 and m is not None and p.stdout.startswith(m.group(1) + " pause: ")
    paused = ok and wait_until(lambda: states(c) == ["paused"] * 4, 10)
    at = int(m.group(2)) if m else -1
    # every member's line for step `at` printed (a loaded machine may take a
    # moment), then no step past it
    wait_until(lambda: [last_step(n) for n in c.nodes] == [at] * 4, 5)
    time.sleep(0.5)
    lasts = [last_step(n) for n in c.nodes]
    check("test_mtnlgctl_pause_wait_exits_0_and_every_node_pauses",
          ok and paused and lasts == [at] * 4, "%s; states %s, last steps %s, op step %d" % (
              show(p), states(c), lasts, at))
    p = ctl(n2, "status")
    ok = (p.returncode == 0 and re.search(r"^  state +paused$", p.stdout, re.M)
          and re.search(r"^  tokens/s +-$", p.stdout, re.M) and re.search(r"^  TFLOP/s +-$", p.stdout, re.M))
    check("test_mtnlgctl_status_of_a_paused_job_shows_no_throughput", bool(ok), show(p))

    p = ctl(n3, "resume", "--wait")
    ok = p.returncode == 0 and re.search(r"^op-\d+ resume: succeeded at step %d$" % at,
                                         p.stdout, re.M)
    moving = ok and wait_until(lambda: all(last_step(n) > at + 1 for n in c.nodes), 20)
    check("test_mtnlgctl_resume_wait_exits_0_and_every_node_steps_again", bool(ok and moving),
          "%s; last steps %s" % (show(p), [last_step(n) for n in c.nodes]))

    p = ctl(n0, "stop", "--wait")
    ok = p.returncode == 0 and re.search(r"^op-\d+ stop: succeeded at step \d+$", p.stdout, re.M)
    codes = c.wait_all(30)
    lasts = [last_step(n) for n in c.nodes]
    check("test_mtnlgctl_stop_wait_exits_0_and_every_daemon_exits_0_at_one_step",
          bool(ok) and codes == [0] * 4 and len(set(lasts)) == 1,
          "%s; exit codes %s, last steps %s\n%s" % (show(p), codes, lasts, c.logs(8)))

    p = ctl(n0, "status")
    ok = p.returncode == 3 and ("cannot reach the daemon at %s" % n0.url()) in p.stderr
    check("test_mtnlgctl_status_exits_3_once_the_daemon_stopped", ok, show(p))


def cluster_a(mtnlgd, mtnlgctl, tmp, tokens, doc):
    job = write_job(os.path.join(tmp, "job-live.json"), tokens, 100000, "ctl-live")
    c = LocalCluster(mtnlgd, os.path.join(tmp, "a"), job, nodes=4, heartbeat_ms=HB_MS,
                     timeout_ms=TIMEOUT_MS, token=TOKEN)
    try:
        c.start()
        c.wait_for(lambda: all(last_step(n) >= 3 for n in c.nodes), 120, "step 3 on every node")
        test_every_read_answers_200_per_the_yaml_on_every_node(c, doc)
        test_status_step_and_loss_match_the_printed_step_lines(c)
        test_history_holds_the_printed_losses_and_since_filters(c)
        test_error_answers(c, doc)
        op = test_pause_and_resume_answer_202_with_location_and_their_ops_succeed(c, doc)
        test_the_pause_retried_with_its_key_through_other_nodes_is_answered_again(c, doc, op)
        test_pause_while_paused_answers_409(c, doc)
        test_metrics(c)
        test_resume_answers_202_with_location_and_every_node_runs_again(
            c, doc, (op or {}).get("step") or 0)
        test_metrics_running_have_rates_with_node_and_device_labels(c)
        test_mtnlgctl(c, mtnlgctl)
    finally:
        c.kill_all()


# ---------------------------------------------------------- cluster B


def cluster_b(mtnlgd, tmp, tokens, doc):
    steps = 120  # room for a pause or a stop that a loaded machine delays by 50 steps
    job = write_job(os.path.join(tmp, "job-120.json"), tokens, steps, "ctl-pause")
    one = subprocess.run([mtnlgd, "--standalone", job, "--log-format", "json"],
                         capture_output=True, text=True, timeout=300)
    ref = [json.loads(l)["loss"] for l in one.stdout.splitlines() if l.startswith("{")]
    if one.returncode != 0 or len(ref) != steps:
        check("test_standalone_reference_runs", False, "exit %d, %d steps: %s" % (
            one.returncode, len(ref), one.stderr[-800:]))
        return
    c = LocalCluster(mtnlgd, os.path.join(tmp, "b"), job, nodes=4, heartbeat_ms=HB_MS,
                     timeout_ms=TIMEOUT_MS, token=TOKEN)
    n0, n1, n2, n3 = c.nodes
    try:
        c.start()
        c.wait_for(lambda: last_step(n0) >= 4, 120, "step 4")
        a = post(n3, "/v1/pause")
        loc = a.headers.get("location", "")
        op = wait_op(n3, loc) if a.status == 202 else None
        at = (op or {}).get("step")
        time.sleep(0.3)
        first = [last_step(n) for n in c.nodes]
        time.sleep(1.5)
        second = [last_step(n) for n in c.nodes]
        # the pause lands some steps after step 4 (the poll, a member's
        # request through the store, the coordinator's tick); it must land
        # early enough for the resume and the stop after it
        ok = (a.status == 202 and op and op["state"] == "succeeded" and 5 <= at <= steps // 2
              and first == second == [at] * 4 and states(c) == ["paused"] * 4)
        check("test_pause_sent_to_member_n3_stops_all_four_nodes_at_one_step", ok,
              "%r, op %s, last steps %s then %s, states %s" % (a, op, first, second, states(c)))

        a = post(n2, "/v1/resume")
        op = wait_op(n2, a.headers.get("location", "")) if a.status == 202 else None
        moving = wait_until(lambda: all(last_step(n) >= (at or 0) + 3 for n in c.nodes), 30)
        check("test_resume_sent_to_member_n2_continues_all_four_nodes",
              a.status == 202 and op and op["state"] == "succeeded" and op["step"] == at
              and moving, "%r, op %s, last steps %s" % (a, op, [last_step(n) for n in c.nodes]))

        c.wait_for(lambda: last_step(n0) >= max(25, (at or 0) + 4), 120, "step 25")
        a = post(n1, "/v1/stop")
        errs = doc.errors("POST", "/v1/stop", a)
        op = a.json() or {}
        ok = (a.status == 202 and not errs and op.get("kind") == "stop"
              and a.headers.get("location") == "/v1/operations/%s" % op.get("id"))
        codes = c.wait_all(60)
        lasts = [last_step(n) for n in c.nodes]
        check("test_stop_sent_to_member_n1_answers_202_with_location_and_ends_all_at_one_step",
              ok and codes == [0] * 4 and len(set(lasts)) == 1 and 25 <= lasts[0] < steps,
              "%r %s; exit codes %s, last steps %s" % (a, errs, codes, lasts))

        got = [[s["loss"] for s in n.steps() if "loss" in s] for n in c.nodes]
        k = len(got[0])
        ok = k >= 25 and all(g == ref[:k] for g in got)
        bad = [(i + 1, g, r) for i, (g, r) in enumerate(zip(got[0], ref)) if g != r][:3]
        check("test_paused_and_resumed_run_has_the_losses_of_an_unpaused_run", ok,
              "%d steps; first differences (step, cluster, standalone): %s" % (k, bad))
    finally:
        c.kill_all()


def cluster_c(mtnlgd, mtnlgctl, tmp, tokens):
    ckpt = os.path.join(tmp, "c-ckpt")
    job = os.path.join(tmp, "job-deadline.json")
    with open(write_job(job, tokens, 100000, "ctl-deadline")) as f:
        j = json.load(f)
    j["parallel"].update(dp_min=1, dp_max=1)
    j["train"]["exit_duration_mins"] = 0.3  # 18 s: room to start and pause on a loaded machine
    j["train"]["exit_interval"] = 50000  # never reached: shown in the status as the step it stops after
    j["checkpoint"] = {"dir": ckpt}
    with open(job, "w") as f:
        json.dump(j, f)
    c = LocalCluster(mtnlgd, os.path.join(tmp, "c"), job, nodes=2, heartbeat_ms=HB_MS,
                     timeout_ms=TIMEOUT_MS, token=TOKEN)
    n0, n1 = c.nodes
    try:
        c.start()
        c.wait_for(lambda: last_step(n0) >= 2, 120, "step 2")
        a = post(n1, "/v1/pause")
        op = wait_op(n1, a.headers.get("location", "")) if a.status == 202 else None
        at = (op or {}).get("step")
        paused = wait_until(lambda: states(c) == ["paused"] * 2, 10)
        now = time.time()
        sts = [get(n, "/v1/status").json() or {} for n in c.nodes]
        exits = [s.get("exit_at") for s in sts]
        exit_steps = [s.get("exit_step") for s in sts]
        shown = [subprocess.run([mtnlgctl, "-e", n.url(), "status"], capture_output=True,
                                text=True, timeout=30, env=ctl_env()).stdout for n in c.nodes]
        m = re.search(r"^mtnlg_exit_time_seconds(\{[^}]*\})? (\S+)$", get(n0, "/v1/metrics").body
                      .decode(), re.M)
        check("test_status_says_when_train_exit_duration_mins_stops_the_run",
              all(isinstance(e, float) and now < e < now + 19 for e in exits)
              and m and abs(float(m.group(2)) - exits[0]) < 1
              and all(re.search(r"exits at +\S+ \S+ \(in .*, train.exit_duration_mins\)", t)
                      for t in shown),
              "exit_at %s at %.1f; metric %s; mtnlgctl status %s" % (
                  exits, now, m and m.group(0),
                  [l for t in shown for l in t.splitlines() if "exit" in l]))
        ms = re.search(r"^mtnlg_exit_step(\{[^}]*\})? (\S+)$", get(n1, "/v1/metrics").body
                       .decode(), re.M)
        check("test_status_says_after_which_step_train_exit_interval_stops_the_run",
              exit_steps == [50000, 50000] and ms and float(ms.group(2)) == 50000
              and all(re.search(r"exits +after step 50000 \(train.exit_interval\)", t)
                      for t in shown),
              "exit_step %s; metric %s; mtnlgctl status %s" % (
                  exit_steps, ms and ms.group(0),
                  [l for t in shown for l in t.splitlines() if "exit" in l]))
        codes = c.wait_all(60)
        lasts = [last_step(n) for n in c.nodes]
        manifest = os.path.join(ckpt, "ctl-deadline", "step_%08d" % (at or 0), "manifest.json")
        said = all(grep(n, r"train.exit_duration_mins \(0.3\) has passed") for n in c.nodes)
        check("test_deadline_passing_while_paused_stops_with_the_paused_steps_checkpoint",
              a.status == 202 and op and op["state"] == "succeeded" and paused
              and codes == [0, 0] and lasts == [at, at] and os.path.exists(manifest) and said,
              "%r, op %s, paused %s, exit codes %s, last steps %s, %s %s, reason logged %s" % (
                  a, op, paused, codes, lasts, manifest,
                  "exists" if os.path.exists(manifest) else "missing", said))
    finally:
        c.kill_all()


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    mtnlgd, mtnlgctl, source_root = sys.argv[1:4]
    doc = Contract(source_root)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tokens = license_tokens(os.path.join(tmp, "tokens.u16"))
        try:
            cluster_a(mtnlgd, mtnlgctl, tmp, tokens, doc)
        except AssertionError as e:
            check("test_cluster_a_runs", False, str(e))
        try:
            cluster_b(mtnlgd, tmp, tokens, doc)
        except AssertionError as e:
            check("test_cluster_b_runs", False, str(e))
        try:
            cluster_c(mtnlgd, mtnlgctl, tmp, tokens)
        except AssertionError as e:
            check("test_cluster_c_runs", False, str(e))
    print("%d failure(s) in %.0f s" % (failures, time.time() - t0))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
