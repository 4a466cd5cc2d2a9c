"""The control plane over HTTPS (control.tls_cert, control.tls_key).

usage: test_control_tls.py MTNLGD MTNLGCTL

One mtnlgd (cpu:1, the tiny model, a long job, a control token) serving
HTTPS with tests/cluster/tls/server.pem (127.0.0.1 and localhost, signed by
tests/cluster/tls/ca.pem; test keys, committed):
- test_https_status_with_the_ca: mtnlgctl --cacert ca.pem reads the status
  over https://, the daemon logs its https:// URL and the dashboard page
  comes over HTTPS to a client that checks the certificate;
- test_another_ca_or_none_is_refused: --cacert of another CA, and the
  system's CAs, fail with exit 3 saying the daemon did not prove who it is
  and naming --cacert; an unreadable --cacert is a usage error (exit 2);
- test_plain_http_gets_nothing: http:// to the HTTPS port is connected and
  closed without an answer (exit 3): nothing travels in clear;
- test_token_over_https_stops_the_job: stop --token-file over HTTPS ends
  the job; the daemon exits 0 (waited for by its pid);
- test_tls_misconfigurations_are_named: a certificate without its key (exit
  2, naming control.tls_key), a key that is not PEM and a key that is not
  the certificate's (exit 2, naming HTTPS and the address), an empty key
  file (naming control.tls_key) and a missing certificate file (naming the
  file).
Each check prints `ok NAME` or `FAIL NAME: detail`.
"""
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
TLS = os.path.join(HERE, "tls")
sys.path.insert(0, os.path.join(HERE, "..", "..", "tools"))
from local_cluster import LocalCluster, check, license_tokens, free_port  # noqa: E402


def main():
    mtnlgd, ctl = sys.argv[1], sys.argv[2]
    failures = 0
    tmp = tempfile.mkdtemp(prefix="mtnlg-tls-")
    cluster = None
    try:
        key = os.path.join(tmp, "server.key")  # git keeps no modes: a key others cannot read
        shutil.copy(os.path.join(TLS, "server.key"), key)
        os.chmod(key, 0o600)
        cert, ca, other = (os.path.join(TLS, n) for n in ("server.pem", "ca.pem", "other-ca.pem"))
        tokens = license_tokens(os.path.join(tmp, "tokens.u16"))
        job = os.path.join(tmp, "job.json")
        with open(job, "w") as f:
            f.write('{"name": "tls", "model": {"preset": "tiny"}, "parallel": {"micro_batch": 2},'
                    '"train": {"global_batch": 2, "steps": 100000, "seed": 3,'
                    '"lr": {"schedule": "constant", "peak": 1e-3}},'
                    f'"data": {{"path": "{tokens}"}}}}')
        cluster = LocalCluster(mtnlgd, os.path.join(tmp, "run"), job, nodes=1, devices="cpu:1",
                               token="tls-token",
                               extra={"control": {"tls_cert": cert, "tls_key": key}})
        node = cluster.nodes[0]
        cluster.start()
        url = "https://127.0.0.1:%d" % node.control_port

        def ctl_run(*args):
            return subprocess.run([ctl, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, timeout=60)

        deadline, r = time.time() + 60, None
        while time.time() < deadline and node.running():
            r = ctl_run("--cacert", ca, "-e", url, "-o", "json", "status")
            if r.returncode == 0:
                break
            time.sleep(0.2)
        ok = r is not None and r.returncode == 0 and '"job"' in r.stdout
        detail = "" if ok else f"exit {r and r.returncode}: {r and r.stderr.strip()[-300:]}"
        if ok:
            ctx = ssl.create_default_context(cafile=ca)
            with urllib.request.urlopen(url + "/", context=ctx, timeout=10) as page:
                body = page.read().decode(errors="replace")
            logged = ("control plane and dashboard on %s/" % url) in node.stderr()
            ok = "<html" in body.lower() and logged
            detail = f"dashboard page {len(body)} bytes, https URL logged {logged}"
        failures += check("test_https_status_with_the_ca", ok, detail)

        wrong = ctl_run("--cacert", other, "-e", url, "status")
        system = subprocess.run([ctl, "-e", url, "status"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, timeout=60,
                                env={k: v for k, v in os.environ.items() if k != "MTNLG_CACERT"})
        unreadable = ctl_run("--cacert", os.path.join(tmp, "no-such-ca.pem"), "-e", url, "status")
        failures += check("test_another_ca_or_none_is_refused",
                          wrong.returncode == 3 and "did not prove" in wrong.stderr and
                          "--cacert" in wrong.stderr and system.returncode == 3 and
                          "did not prove" in system.stderr and unreadable.returncode == 2 and
                          "no-such-ca.pem" in unreadable.stderr,
                          f"other CA: {wrong.returncode} {wrong.stderr.strip()[-200:]} | system: "
                          f"{system.returncode} {system.stderr.strip()[-200:]} | unreadable: "
                          f"{unreadable.returncode} {unreadable.stderr.strip()[-200:]}")

        plain = ctl_run("-e", "http://127.0.0.1:%d" % node.control_port, "status")
        failures += check("test_plain_http_gets_nothing",
                          plain.returncode == 3 and "refused" not in plain.stderr and
                          "without answering" in plain.stderr,
                          f"exit {plain.returncode}: {plain.stdout.strip()[-200:]} "
                          f"{plain.stderr.strip()[-200:]}")

        stop = ctl_run("--cacert", ca, "--token-file", cluster.token_file, "-e", url, "stop")
        try:
            code = node.wait(60)
        except subprocess.TimeoutExpired:
            code = None
        failures += check("test_token_over_https_stops_the_job",
                          stop.returncode == 0 and code == 0,
                          f"stop exit {stop.returncode} {stop.stderr.strip()[-200:]}; daemon exit "
                          f"{code}")

        def bad_node(name, control):
            conf = os.path.join(tmp, name + ".conf")
            with open(conf, "w") as f:
                f.write("[node]\nname = %s\ndevices = cpu:1\n[rendezvous]\nendpoint = "
                        "127.0.0.1:%d\nhost = yes\n[control]\nlisten = 127.0.0.1:%d\n%s"
                        "[paths]\nstate_dir = %s\n[job]\npath = %s\n"
                        % (name, free_port(), free_port(), control,
                           os.path.join(tmp, name + ".state"), job))
            p = subprocess.Popen([mtnlgd, "--config", conf], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
            try:
                out, err = p.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                out, err = p.communicate()
            return p.returncode, err

        garbage = os.path.join(tmp, "garbage.key")
        with open(garbage, "w") as f:
            f.write("not a key\n")
        os.chmod(garbage, 0o600)
        c1, e1 = bad_node("nokey", "tls_cert = %s\n" % cert)
        c2, e2 = bad_node("garbage", "tls_cert = %s\ntls_key = %s\n" % (cert, garbage))
        c3, e3 = bad_node("nocert", "tls_cert = %s\ntls_key = %s\n"
                          % (os.path.join(tmp, "missing.pem"), key))
        unrelated = os.path.join(tmp, "unrelated.key")
        shutil.copy(os.path.join(TLS, "unrelated.key"), unrelated)
        os.chmod(unrelated, 0o600)
        c4, e4 = bad_node("unrelated", "tls_cert = %s\ntls_key = %s\n" % (cert, unrelated))
        empty = os.path.join(tmp, "empty.key")
        open(empty, "w").close()
        os.chmod(empty, 0o600)
        c5, e5 = bad_node("empty", "tls_cert = %s\ntls_key = %s\n" % (cert, empty))
        failures += check("test_tls_misconfigurations_are_named",
                          c1 == 2 and "control.tls_key" in e1 and c2 == 2 and "HTTPS" in e2 and
                          c3 == 2 and "missing.pem" in e3 and c4 == 2 and "HTTPS" in e4 and
                          c5 == 2 and "control.tls_key" in e5 and "empty" in e5,
                          f"no key: {c1} {e1.strip()[-200:]} | garbage key: {c2} "
                          f"{e2.strip()[-200:]} | no certificate: {c3} {e3.strip()[-200:]} | "
                          f"another key: {c4} {e4.strip()[-200:]} | empty key: {c5} "
                          f"{e5.strip()[-200:]}")
    finally:
        if cluster:
            cluster.kill_all()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
