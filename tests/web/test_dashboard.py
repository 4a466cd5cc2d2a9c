"""The dashboard in a real browser against a live cluster of 4 daemons.

usage: test_dashboard.py MTNLGD [OUT_DIR [ETCD]]

Starts 4 mtnlgd daemons on loopback (tools/local_cluster.py; cpu:2 each,
tp 2 x pp 2 x dp 2, the tiny model with 4 layers, a control token) and
headless Chromium, which it drives over the DevTools protocol with the small
websocket client below (standard library only). Checks, in the page's DOM:
- test_dashboard_renders_the_clusters_values: #state, #generation,
  #job-name and one #nodes row per node (data-node n0..n3) while it trains;
  then, with the cluster paused through the API so the values hold still,
  #state "paused", #step and #skipped-steps as /v1/status says, no rate
  (#tflops and #tokens-per-s "–", the status's null), #val-loss empty
  without validation;
- test_eta_card_shows_the_duration_and_when_the_run_ends: #eta, and
  #eta-at "about <time>" whose moment (its data-t) is /v1/status's eta_s
  from now, within a quarter of it (the pace moves between the polls);
- test_step_time_card_shows_the_longest_timers: the job sets
  train.timing_log_level 2; paused, #step-timers names the three longest
  timers of /v1/status's step_time.timers (forward-backward, which holds
  most of them, aside) and its title lists every one of them;
- test_pause_button_pauses_the_cluster: a mouse click on #btn-pause, the
  token answered in the prompt(), makes /v1/status report paused and
  #op-status name the pause operation and its success;
- test_resume_button_resumes_without_asking_again: #btn-resume resumes
  (the token is kept in sessionStorage: no second prompt) and steps advance;
- test_buttons_while_running_are_all_but_resume, _while_paused_are_resume_
  checkpoint_and_stop: the buttons are enabled by the state, as the
  coordinator takes the orders;
- test_resize_prompt_takes_a_positive_decimal_integer_only: "0x3", "1e1",
  "2.0" and "0" are refused on the page, nothing sent;
- a screenshot of the page (Page.captureScreenshot), written to OUT_DIR
  (default: the working directory), its path printed;
- test_stop_button_stops_the_cluster_cleanly (confirmed; every daemon exits
  0) and test_page_keeps_the_stopped_state_once_its_daemons_exit: #state
  "stopped", #reason "stopped at step N ...", not greyed out, no button;
- test_heartbeats_are_coloured_against_the_clusters_interval: a daemon
  heartbeating every 6 s (cluster.heartbeat_interval_ms, which /v1/status
  publishes with the timeout) shows a heartbeat age past 2 s uncoloured:
  late is past two intervals, lost past the timeout; there, while forming,
  test_buttons_while_forming_are_only_stop;
- test_page_says_when_its_daemon_is_gone: once its daemon is killed, the
  page shows #state "unreachable", #conn "no answer since ...", the values
  greyed out (main.stale), no button, and links to the other node's
  control plane.
- test_the_header_says_the_coordinator_was_elected_through_etcd: one
  daemon whose rendezvous is in a one-member etcd (ETCD, Debian's
  etcd-server; skipped without it): the header says "elected through etcd
  (term T, here, lease N s)" after the coordinator, its title the store's
  endpoint and etcd's, as /v1/status's election says, and once etcd is
  stopped that it does not answer (the title why); the others' header
  says nothing of it (their election is null).
Exits 77 (skipped) when no Chromium is installed.
"""
import base64
import json
import os
import shutil
import signal
import re
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
from local_cluster import (Etcd, LocalCluster, free_port, check, license_tokens,  # noqa: E402
                           tiny_job)

TOKEN = "dashboard-test-token"
NODES = ["n0", "n1", "n2", "n3"]


# --------------------------------------------------------------- websocket

class WebSocket:
    """A client websocket (RFC 6455) over one TCP socket: text frames out,
    masked; frames in, reassembled; pings answered. Enough for DevTools."""

    def __init__(self, url, timeout=10):
        assert url.startswith("ws://"), url
        hostport, _, path = url[5:].partition("/")
        host, _, port = hostport.rpartition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(("GET /%s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\n"
                           "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
                           "Sec-WebSocket-Version: 13\r\n\r\n" % (path, hostport, key)).encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("websocket %s: closed during the handshake" % url)
            head += chunk
        head, _, self.buf = head.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError("websocket %s: %s" % (url, head.split(b"\r\n")[0].decode()))

    def send(self, text):
        data = text.encode()
        n = len(data)
        hdr = bytes([0x81])
        if n < 126:
            hdr += bytes([0x80 | n])
        elif n < 65536:
            hdr += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            hdr += bytes([0x80 | 127]) + struct.pack(">Q", n)
        mask = os.urandom(4)
        body = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        self.sock.sendall(hdr + mask + body)

    def _read(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(max(65536, n - len(self.buf)))
            if not chunk:
                raise ConnectionError("websocket closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv(self, timeout):
        """The next whole text message; socket.timeout when none came in time."""
        self.sock.settimeout(max(0.01, timeout))
        parts = []
        while True:
            b0, b1 = self._read(2)
            op, n = b0 & 0x0F, b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            mask = self._read(4) if b1 & 0x80 else None
            payload = self._read(n)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if op == 0x8:
                raise ConnectionError("websocket closed by the browser")
            if op == 0x9:  # ping: pong with the same payload
                self.sock.sendall(bytes([0x8A, 0x80 | len(payload)]) + b"\0\0\0\0" + payload)
                continue
            if op in (0x0, 0x1, 0x2):
                parts.append(payload)
                if b0 & 0x80:
                    return b"".join(parts).decode()

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


class DevTools:
    """One page target. call() waits for its answer; events seen meanwhile
    are kept (self.events) and passed to on_event first."""

    def __init__(self, ws_url, on_event=None):
        self.ws = WebSocket(ws_url)
        self.next_id = 0
        self.events = []
        self.on_event = on_event

    def _dispatch(self, msg):
        if self.on_event:
            self.on_event(self, msg)
        self.events.append(msg)

    def send(self, method, params=None):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params or {}}))
        return self.next_id

    def call(self, method, params=None, timeout=15):
        mid = self.send(method, params)
        deadline = time.time() + timeout
        while True:
            left = deadline - time.time()
            if left <= 0:
                raise TimeoutError("DevTools %s: no answer in %.0f s" % (method, timeout))
            try:
                msg = json.loads(self.ws.recv(left))
            except socket.timeout:
                continue
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError("DevTools %s: %s" % (method, msg["error"]))
                return msg.get("result", {})
            if "method" in msg:
                self._dispatch(msg)

    def pump(self, seconds):
        """Reads events for a while (dialogs are answered by on_event)."""
        deadline = time.time() + seconds
        while time.time() < deadline:
            try:
                msg = json.loads(self.ws.recv(deadline - time.time()))
            except socket.timeout:
                return
            if "method" in msg:
                self._dispatch(msg)

    def wait_event(self, name, timeout):
        deadline = time.time() + timeout
        while time.time() < deadline:
            for m in self.events:
                if m.get("method") == name:
                    self.events.remove(m)
                    return m
            self.pump(min(0.2, deadline - time.time()))
        raise TimeoutError("DevTools: no %s in %.0f s" % (name, timeout))

    def eval(self, expr):
        r = self.call("Runtime.evaluate", {"expression": expr, "returnByValue": True})
        if "exceptionDetails" in r:
            raise RuntimeError("page: %s: %s" % (expr, r["exceptionDetails"].get("text")))
        return r["result"].get("value")


# ------------------------------------------------------------------ helpers

def find_chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        p = shutil.which(name)
        if p:
            return p
    return None


def http(url, method="GET", token=None, body=None, timeout=5):
    req = urllib.request.Request(url, method=method, data=body)
    if token:
        req.add_header("Authorization", "Bearer " + token)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, None


def status(node):
    code, s = http(node.url() + "/v1/status")
    assert code == 200, "GET /v1/status: %s" % code
    return s


def started_step(c):
    """n0's step once its control plane answers (-1 before); fails if a daemon died."""
    dead = [n.name for n in c.nodes if not n.running()]
    if dead:
        raise AssertionError("daemon(s) %s exited" % dead)
    try:
        return status(c.nodes[0])["step"]
    except OSError:
        return -1


def wait_until(pred, timeout, what):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError("timed out after %.0f s waiting for %s" % (timeout, what))


DOM_SNAPSHOT = """(function () {
  var t = function (id) { var e = document.getElementById(id); return e ? e.textContent : null; };
  var rows = Array.prototype.map.call(document.querySelectorAll('#nodes tr[data-node]'),
    function (r) { return r.getAttribute('data-node'); });
  return {state: t('state'), generation: t('generation'), step: t('step'), job: t('job-name'),
          loss: t('loss'), tps: t('tokens-per-s'), op: t('op-status'), conn: t('conn'),
          election: t('election'), electionTitle: document.getElementById('election').title,
          skipped: t('skipped-steps'), rows: rows, others: t('others'), tflops: t('tflops'),
          val: t('val-loss'), store: t('store'), timers: t('step-timers'),
          eta: t('eta'), etaAt: t('eta-at'), etaT: document.getElementById('eta-at').getAttribute('data-t'),
          timersTitle: document.getElementById('step-timers').title,
          storeShown: !document.getElementById('store-card').hidden,
          beats: Array.prototype.map.call(document.querySelectorAll('#nodes tr[data-node]'),
            function (r) { var c = r.cells[8]; return [c.textContent, c.className]; }),
          stale: document.getElementById('main').className, reason: t('reason'),
          enabled: ['pause', 'resume', 'checkpoint', 'resize', 'stop'].filter(function (k) {
            return !document.getElementById('btn-' + k).disabled; })};
})()"""


def dom(dt):
    return dt.eval(DOM_SNAPSHOT)


def click(dt, element_id, tries=5):
    """A real mouse click (press and release) at the middle of the element.
    The page's layout can move between measuring the element and the click
    (a status poll that wraps a card's text to another line moves the
    controls down), so the page notes which element each click landed on
    and a click that landed elsewhere is made again at the new place. A
    disabled button is an error, not a miss."""
    for attempt in range(tries):
        r = dt.eval(
            "(function () {"
            " if (!window.__mtClicks) { window.__mtClicks = [];"
            "  document.addEventListener('click', function (e) {"
            "   window.__mtClicks.push(e.target.id || e.target.tagName); }, true); }"
            " var e = document.getElementById('%s'), b = e.getBoundingClientRect();"
            " return [b.left + b.width / 2, b.top + b.height / 2, e.disabled === true,"
            "  window.__mtClicks.length]; })()" % element_id)
        if r[2]:
            raise AssertionError("#%s is disabled: %r" % (element_id, dom(dt)))
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            p = {"type": kind, "x": r[0], "y": r[1]}
            if kind != "mouseMoved":
                p.update(button="left", clickCount=1)
            dt.call("Input.dispatchMouseEvent", p)
        landed = dt.eval("window.__mtClicks.slice(%d)" % r[3])
        if element_id in landed:
            return
        print("note: the click meant for #%s at (%.0f, %.0f) landed on %s; clicking again"
              % (element_id, r[0], r[1], landed or "nothing"))
    raise AssertionError("#%s: no click of %d landed on it" % (element_id, tries))


def write_job(tmp):
    tokens = license_tokens(os.path.join(tmp, "tokens.u16"))
    job = tiny_job(os.path.join(tmp, "job.json"), tokens, "dashboard-test", 100000)
    with open(job) as f:
        j = json.load(f)
    j["train"]["timing_log_level"] = 2  # the step-time card's timers
    with open(job, "w") as f:
        json.dump(j, f)
    return job


def stop_browser(proc):
    """Chromium and its helpers: they run in a session of their own."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def start_browser(chromium, tmp):
    port = free_port()
    log = open(os.path.join(tmp, "chromium.log"), "w")
    # its singleton socket's directory (org.chromium.Chromium.*) goes under
    # TMPDIR and outlives a stopped browser: kept in tmp, it goes with it
    proc = subprocess.Popen(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage",
         "--user-data-dir=" + os.path.join(tmp, "profile"), "--window-size=1280,1000",
         "--remote-debugging-port=%d" % port, "about:blank"],
        stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
        env=dict(os.environ, TMPDIR=tmp))
    page, targets = None, "no answer"
    # a loaded 2-core machine (four daemons training beside it) can take
    # Chromium long to start; one that does not start is stopped, with its
    # processes, not left to slow the next run
    deadline = time.time() + 60
    while time.time() < deadline and page is None:
        if proc.poll() is not None:
            raise RuntimeError("chromium exited %s:\n%s" % (
                proc.returncode, open(os.path.join(tmp, "chromium.log")).read()[-2000:]))
        try:
            with urllib.request.urlopen("http://127.0.0.1:%d/json/list" % port, timeout=2) as r:
                listed = json.load(r)
            targets = [t.get("type") for t in listed]
            page = next((t for t in listed if t.get("type") == "page"), None)
        except (OSError, ValueError) as e:
            targets = str(e)
        if page is None:
            time.sleep(0.2)
    if page is None:
        stop_browser(proc)
        raise RuntimeError("chromium: no page target on DevTools port %d in 60 s (targets: %s):\n%s"
                           % (port, targets,
                              open(os.path.join(tmp, "chromium.log")).read()[-1500:]))
    return proc, page["webSocketDebuggerUrl"]


# -------------------------------------------------------------------- tests

def run(mtnlgd, out_dir, chromium, tmp, etcd_bin):
    failures = 0
    # the daemons train at niceness 10: on 2 cores their 8 ranks would
    # otherwise starve Chromium (its DevTools once gave no answer in 15 s)
    c = LocalCluster(mtnlgd, os.path.join(tmp, "cluster"), write_job(tmp), nodes=4,
                     heartbeat_ms=200, timeout_ms=5000, token=TOKEN, nice=10)
    browser = None
    dialogs = []
    answers = {"confirm": False, "resize": None}

    def on_event(dt, msg):
        if msg["method"] == "Page.javascriptDialogOpening":
            p = msg["params"]
            dialogs.append((p["type"], p["message"]))
            # a confirm() (that is Stop) only once the test stops the cluster;
            # the prompts: the token, or the resize's replicas
            resize = p["message"].startswith("Data-parallel")
            dt.send("Page.handleJavaScriptDialog",
                    {"accept": p["type"] == "prompt" or answers["confirm"],
                     "promptText": answers["resize"] if resize else TOKEN})

    def page_shows(state):
        return wait_until(lambda: (lambda d: d if d["state"] == state else None)(dom(dt)), 10,
                          "the page to show %s" % state)

    try:
        c.start()
        n0 = c.nodes[0]
        wait_until(lambda: started_step(c) >= 2, 60, "step 2 on n0")
        browser, ws_url = start_browser(chromium, tmp)
        dt = DevTools(ws_url, on_event)
        dt.call("Page.enable")
        dt.call("Runtime.enable")
        dt.call("Page.navigate", {"url": n0.url() + "/"})
        dt.wait_event("Page.loadEventFired", 15)

        # (a) while it trains: identity, state, nodes
        want = status(n0)
        d = wait_until(lambda: (lambda d: d if d["conn"] == "live" and d["rows"] else None)(dom(dt)),
                       10, "the page's first status poll")
        ok = (d["state"] == "running" and d["job"] == want["job"]["name"] == "dashboard-test"
              and d["generation"] == str(want["generation"])
              and d["rows"] == [n["name"] for n in want["nodes"]]  # in /v1/status's order
              and sorted(d["rows"]) == NODES
              and d["step"].isdigit() and int(d["step"]) <= status(n0)["step"]
              # a rate while it trains: two decimals, or three significant digits below 1e-3
              and re.match(r"^(\d+\.\d\d|\d\.\d\de-\d+)$", d["tflops"] or "") is not None
              and d["tps"] != "–"
              and d["election"] == "" and want["election"] is None)  # its own store: no etcd
        failures += check("test_dashboard_renders_the_clusters_values_while_training", ok,
                          "page %s, /v1/status state %s generation %s step %s" % (
                              d, want["state"], want["generation"], want["step"]))
        # the ETA, and when the run ends on the browser's clock (100000 steps:
        # past a minute); the page's end against /v1/status's ETA from now
        want = status(n0)
        end = time.time() + want["eta_s"] if want.get("eta_s") is not None else None
        page_end = int(d["etaT"]) if (d["etaT"] or "").isdigit() else None
        failures += check("test_eta_card_shows_the_duration_and_when_the_run_ends",
                          end is not None and want["eta_s"] >= 60 and page_end is not None
                          and abs(page_end - end) <= 0.25 * want["eta_s"] + 30
                          and re.match(r"^(\d+d \d+h|\d+h \d\dm|\d+m \d\ds)$",
                                       d["eta"] or "") is not None
                          and (d["etaAt"] or "").startswith("about ")
                          and any(ch.isdigit() for ch in d["etaAt"]),
                          "#eta %r, #eta-at %r (data-t %s); /v1/status eta_s %s (ends %s)"
                          % (d["eta"], d["etaAt"], d["etaT"], want.get("eta_s"), end))
        failures += check("test_buttons_while_running_are_all_but_resume",
                          d["enabled"] == ["pause", "checkpoint", "resize", "stop"],
                          "enabled: %s" % d["enabled"])

        # the resize prompt takes decimal digits alone: Number() read 0x3 as 3, 1e1 as 10
        said = []
        for value in ("0x3", "1e1", "2.0", "0"):
            answers["resize"] = value
            click(dt, "btn-resize")
            said.append(wait_until(lambda: (lambda d: d["op"] if '"%s"' % value in d["op"]
                                            else None)(
                dom(dt)), 10, "#op-status to answer the resize prompt %s" % value))
        failures += check("test_resize_prompt_takes_a_positive_decimal_integer_only",
                          all(x.startswith('resize: "') and "is not a positive whole number" in x
                              for x in said) and dialogs.count(("prompt", "Control token "
                                                                "(sent as Authorization: Bearer …)")) == 0,
                          "#op-status: %s; dialogs %s" % (said, dialogs))
        del dialogs[:]

        # (a) paused through the API: #step equals /v1/status's step
        code, op = http(n0.url() + "/v1/pause", "POST", TOKEN, b"{}")
        assert code == 202, "POST /v1/pause: %s" % code
        wait_until(lambda: status(n0)["state"] == "paused", 20, "paused (API)")
        want = status(n0)
        d = wait_until(lambda: (lambda d: d if d["state"] == "paused" and d["step"] == str(want["step"])
                                else None)(dom(dt)), 10, "the page to show the paused step")
        steps = [status(n)["step"] for n in c.nodes]
        rates = [x["tflops"] for x in want["devices"]]
        ok = (d["step"] == str(want["step"]) and len(set(steps)) == 1
              and d["job"] == want["job"]["name"] and d["skipped"] == str(want["skipped_steps"])
              # a paused job has no rate: the status's are null, the page shows none
              and want["tokens_per_s"] is None and rates and rates == [None] * len(rates)
              and d["tflops"] == "–" and d["tps"] == "–"
              and d["val"] == "–"
              # n0 hosts the rendezvous store: its card shows what it holds of 16 GiB
              and d["storeShown"] and want.get("store") is not None
              and re.match(r"^\d+ keys, [\d.]+ [kMG]?B of 17\.2 GB \(\d+\.\d%\)$",
                           d["store"] or "") is not None)
        failures += check("test_buttons_while_paused_are_resume_checkpoint_and_stop",
                          d["enabled"] == ["resume", "checkpoint", "stop"],
                          "enabled: %s" % d["enabled"])
        failures += check("test_dashboard_shows_the_paused_step_of_v1_status", ok,
                          "#step %s, /v1/status step %s on n0..n3 %s; #skipped-steps %s, /v1/status "
                          "%s; #tflops %s, #tokens-per-s %s, the devices' %s, tokens_per_s %s; "
                          "#val-loss %s (no eval); #store %r (shown %s)"
                          % (d["step"], want["step"], steps, d["skipped"], want["skipped_steps"],
                             d["tflops"], d["tps"], rates, want["tokens_per_s"], d["val"],
                             d["store"], d["storeShown"]))
        timers = (want.get("step_time") or {}).get("timers") or {}
        longest = sorted((k for k in timers if k != "forward-backward"),
                         key=lambda k: -timers[k][1])[:3]
        title_rows = (d["timersTitle"] or "").split("\n")
        failures += check("test_step_time_card_shows_the_longest_timers",
                          len(timers) > 10 and d["timers"] and
                          [x.rsplit(" ", 1)[0] for x in d["timers"].split(" · ")] == longest
                          and title_rows[0] == "(min, max) time across ranks (ms):"
                          and {r.split(":")[0] for r in title_rows[1:]} == set(timers),
                          "#step-timers %r (title %d rows), /v1/status timers %s"
                          % (d["timers"], len(title_rows), sorted(timers)))
        code, _ = http(n0.url() + "/v1/resume", "POST", TOKEN, b"{}")
        assert code == 202, "POST /v1/resume: %s" % code
        wait_until(lambda: status(n0)["state"] == "running", 20, "running again (API)")
        page_shows("running")

        # (b) the Pause button, token answered in the prompt
        click(dt, "btn-pause")
        deadline = time.time() + 20
        while time.time() < deadline and status(n0)["state"] != "paused":
            dt.pump(0.2)
        st = status(n0)
        d = wait_until(lambda: (lambda d: d if "succeeded" in d["op"] else None)(dom(dt)), 10,
                       "#op-status to report the pause succeeded")
        ok = (st["state"] == "paused" and [t for t, _ in dialogs] == ["prompt"]
              and "pause: succeeded" in d["op"] and d["op"].startswith("op-"))
        failures += check("test_pause_button_pauses_the_cluster", ok,
                          "/v1/status %s, #op-status %r, dialogs %s" % (st["state"], d["op"], dialogs))
        time.sleep(0.6)
        held = status(n0)["step"] == st["step"]

        # (b) the Resume button: no second prompt, steps advance
        page_shows("paused")
        click(dt, "btn-resume")
        deadline = time.time() + 20
        while time.time() < deadline and status(n0)["state"] != "running":
            dt.pump(0.2)
        d = wait_until(lambda: (lambda d: d if "resume: succeeded" in d["op"] else None)(dom(dt)), 10,
                       "#op-status to report the resume succeeded")
        s1 = status(n0)
        wait_until(lambda: status(n0)["step"] > s1["step"], 20, "a step after resume")
        ok = s1["state"] == "running" and len(dialogs) == 1 and held
        failures += check("test_resume_button_resumes_without_asking_again", ok,
                          "/v1/status %s, #op-status %r, dialogs %d, step held while paused %s" % (
                              s1["state"], d["op"], len(dialogs), held))

        # (c) a screenshot of the live page
        time.sleep(1.6)  # one more poll: the charts and the step move on
        png = base64.b64decode(dt.call("Page.captureScreenshot", {"format": "png"})["data"])
        shot = os.path.abspath(os.path.join(out_dir, "dashboard.png"))
        with open(shot, "wb") as f:
            f.write(png)
        failures += check("test_screenshot_written", png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10000,
                          "%s (%d bytes)" % (shot, len(png)))

        # (d) the Stop button (confirmed) stops the cluster; every daemon exits 0
        # about 2 s later, and the page keeps the state the job ended in
        # rather than greying it out as a lost daemon
        alive = [n.running() for n in c.nodes]
        page_shows("running")
        answers["confirm"] = True
        click(dt, "btn-stop")
        codes = c.wait_all(60)
        failures += check("test_stop_button_stops_the_cluster_cleanly",
                          all(alive) and codes == [0] * 4 and ("confirm", "Stop the job on every "
                          "node? It can be started again from its last checkpoint.") in dialogs,
                          "alive %s, exit codes %s, dialogs %s" % (alive, codes, dialogs))
        d = wait_until(lambda: (lambda d: d if d["conn"].startswith("the daemon exited")
                                else None)(dom(dt)), 20, "the page to notice its daemon exited")
        ok = (d["state"] == "stopped" and re.match(r"^stopped at step \d+", d["reason"] or "")
              and d["stale"] != "stale" and d["enabled"] == [] and not d["others"])
        failures += check("test_page_keeps_the_stopped_state_once_its_daemons_exit", ok,
                          "#state %r, #reason %r, #conn %r, main class %r, enabled %s, #others %r"
                          % (d["state"], d["reason"], d["conn"], d["stale"], d["enabled"],
                             d["others"]))
        failures += test_heartbeats_are_coloured_against_the_clusters_interval(mtnlgd, dt, tmp)
        failures += test_the_header_says_the_coordinator_was_elected_through_etcd(
            mtnlgd, dt, tmp, etcd_bin)
        dt.ws.close()
    except (AssertionError, RuntimeError, TimeoutError, ConnectionError, OSError) as e:
        failures += check("test_dashboard", False, "%s: %s\n%s" % (type(e).__name__, e, c.logs()))
    finally:
        if browser:
            stop_browser(browser)
        c.kill_all()
    return failures


def test_heartbeats_are_coloured_against_the_clusters_interval(mtnlgd, dt, tmp):
    """Two daemons of the 4-node job (so they wait, forming, and train nothing)
    heartbeating every 6 s: n0's heartbeat age runs up to about 6 s, healthy,
    and the page must not colour it late (past 2 intervals, 12 s) nor lost
    (past the 60 s timeout), as fixed 2 s and 5 s thresholds did. While
    forming only Stop is enabled. Then n0 is killed (SIGKILL, while
    forming: no end of the job): the page says so, greys its values out and
    links n1's control plane (returns the failures)."""
    c = LocalCluster(mtnlgd, os.path.join(tmp, "slow-heartbeat"), write_job(tmp), nodes=2,
                     heartbeat_ms=6000, timeout_ms=60000, token=TOKEN)
    failures = 0
    try:
        c.start()
        n0 = c.nodes[0]
        st = wait_until(lambda: started_step(c) >= 0 and status(n0), 30, "n0's control plane")
        dt.call("Page.navigate", {"url": n0.url() + "/"})
        dt.wait_event("Page.loadEventFired", 15)

        def n0_beat(d):  # n0's heartbeat cell (text, class), found by name
            return dict(zip(d["rows"], d["beats"])).get("n0", ["", ""])

        def aged():  # the page showing an age past the fixed thresholds' 2 s
            d = dom(dt)
            age = n0_beat(d)[0]
            return d if age.endswith(" s") and float(age[:-2]) > 2.0 else None

        d = wait_until(aged, 90, "the page to show n0's heartbeat older than 2 s")
        ok = (st.get("heartbeat_interval_ms") == 6000 and st.get("heartbeat_timeout_ms") == 60000
              and n0_beat(d)[1] == "")
        failures += check("test_heartbeats_are_coloured_against_the_clusters_interval", ok,
                          "/v1/status heartbeat_interval_ms %s, heartbeat_timeout_ms %s; page rows "
                          "%s, heartbeat cells (text, class) %s" % (
                              st.get("heartbeat_interval_ms"), st.get("heartbeat_timeout_ms"),
                              d["rows"], d["beats"]))
        d = wait_until(lambda: (lambda d: d if sorted(d["rows"]) == ["n0", "n1"] else None)(
            dom(dt)), 30, "the page to list n0 and n1")
        failures += check("test_buttons_while_forming_are_only_stop", d["enabled"] == ["stop"],
                          "#state %r, enabled %s" % (d["state"], d["enabled"]))

        # its daemon killed: the page says so instead of showing the last values as live
        c.nodes[0].signal(signal.SIGKILL)
        d = wait_until(lambda: (lambda d: d if d["state"] == "unreachable" else None)(dom(dt)), 15,
                       "the page to notice its daemon is gone")
        ok = (d["conn"].startswith("no answer since") and d["stale"] == "stale"
              and "n1" in (d["others"] or "") and "n0" not in (d["others"] or "")
              and d["enabled"] == [])
        failures += check("test_page_says_when_its_daemon_is_gone", ok,
                          "#state %r, #conn %r, main class %r, #others %r, enabled %s"
                          % (d["state"], d["conn"], d["stale"], d["others"], d["enabled"]))
        return failures
    finally:
        c.kill_all()


def test_the_header_says_the_coordinator_was_elected_through_etcd(mtnlgd, dt, tmp, etcd_bin):
    """One daemon of the 4-node job (it waits, forming) whose rendezvous is
    in a one-member etcd (rendezvous.etcd): elected, it coordinates, and the
    header says so after the coordinator's name: the term, "here", the
    lease; its title the store's endpoint and etcd's (returns the
    failures)."""
    name = "test_the_header_says_the_coordinator_was_elected_through_etcd"
    if not etcd_bin:
        print("skipped %s: no etcd (Debian's etcd-server; tools/test installs it)" % name)
        return 0
    etcd = Etcd(etcd_bin, os.path.join(tmp, "etcd"), members=1)
    os.makedirs(etcd.dir, exist_ok=True)
    c = LocalCluster(mtnlgd, os.path.join(tmp, "elected"), write_job(tmp), nodes=1, token=TOKEN,
                     extra={"rendezvous": {"etcd": etcd.endpoints, "host": "auto"}})
    try:
        etcd.start_all()
        c.start()
        n0 = c.nodes[0]
        st = wait_until(lambda: started_step(c) >= 0 and status(n0).get("election") and status(n0),
                        30, "n0's control plane and election")
        el = st["election"]
        dt.call("Page.navigate", {"url": n0.url() + "/"})
        dt.wait_event("Page.loadEventFired", 15)
        d = wait_until(lambda: (lambda d: d if d["election"] else None)(dom(dt)), 15,
                       "the header's election")
        ok = (d["election"] == ", elected through etcd (term %s, here, lease %d s)"
              % (el["term"], el["lease_s"])
              and d["electionTitle"] == "store at %s\netcd %s" % (c.endpoint, etcd.endpoints)
              and el["coordinator_endpoint"] == c.endpoint and el["elected_here"] is True)
        # etcd gone: the header says no coordinator can be elected, the
        # title why (the daemon's election thread finds it within seconds)
        etcd.stop()
        gone = wait_until(lambda: (lambda d: d if "etcd does not answer" in d["election"]
                                   else None)(dom(dt)), 30, "the header to say etcd is gone")
        ok = ok and (gone["election"].endswith(
            "; etcd does not answer: no coordinator can be elected until it does")
            and etcd.urls[0] in gone["electionTitle"].split("\n", 2)[-1])
        return check(name, ok, "header %r, its title %r; /v1/status election %s; etcd stopped: "
                     "%r (%r)" % (d["election"], d["electionTitle"], el, gone["election"],
                                  gone["electionTitle"]))
    finally:
        c.kill_all()
        etcd.stop()


def main():
    mtnlgd = sys.argv[1]
    out_dir = sys.argv[2] if len(sys.argv) > 2 else os.getcwd()
    etcd_bin = sys.argv[3] if len(sys.argv) > 3 and os.access(sys.argv[3], os.X_OK) else None
    chromium = find_chromium()
    if not chromium:
        print("skipped: no chromium (or chromium-browser, google-chrome) on PATH")
        sys.exit(77)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        failures = run(mtnlgd, out_dir, chromium, tmp, etcd_bin)
    print("%d failure(s) in %.1f s" % (failures, time.time() - t0))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
