#!/usr/bin/env python3
"""openapi_check.py — checks control API answers against proto/control-v1.yaml.

Live-cluster tests import it:

    import openapi_check as oc
    spec = oc.load("proto/control-v1.yaml")
    errors = oc.check_response(spec, "GET", "/v1/status", 200, body_bytes,
                               content_type="application/json", headers={...})
    assert not errors, errors

and requests the same way with check_request(spec, method, path, body).

The schema subset checked: $ref, type, nullable, enum, required, properties,
additionalProperties (bool or schema), items, minimum, maximum. Documented
response headers must be present when headers are given.

The document is read with PyYAML when it is installed, else with the small
block-style reader below (the subset proto/control-v1.yaml keeps to).

Command line:
    openapi_check.py SPEC --self-test
    openapi_check.py SPEC --batch ANSWERS.jsonl   (one {method, path, status,
        content_type, headers, body} a line, as test_control_http writes them)
    openapi_check.py SPEC METHOD PATH STATUS [BODY_FILE|-] [--content-type T]
"""
import json
import re
import sys

# ---------------------------------------------------------------- YAML subset


class YamlSubsetError(ValueError):
    pass


def _strip_comment(line):
    """The line without a trailing '# comment' outside quotes."""
    quote = None
    i = 0
    while i < len(line):
        ch = line[i]
        if quote:
            if ch == "\\" and quote == '"':
                i += 2
                continue
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i].rstrip()
        i += 1
    return line.rstrip()


def _split_flow(text):
    """Items of a one-level flow list body 'a, "b, c", d'."""
    items, cur, quote, i = [], "", None, 0
    while i < len(text):
        ch = text[i]
        if quote:
            cur += ch
            if ch == "\\" and quote == '"' and i + 1 < len(text):
                cur += text[i + 1]
                i += 1
            elif ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
            cur += ch
        elif ch == ",":
            items.append(cur.strip())
            cur = ""
        elif ch in "[]{}":
            raise YamlSubsetError("nested flow collections are outside the subset: [%s]" % text)
        else:
            cur += ch
        i += 1
    if cur.strip():
        items.append(cur.strip())
    return items


_INT = re.compile(r"^[-+]?(0|[1-9][0-9]*)$")
_FLOAT = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$")


def _scalar(text):
    t = text.strip()
    if t == "":
        return None
    if t[0] == '"':
        if len(t) < 2 or t[-1] != '"':
            raise YamlSubsetError("unterminated string: %s" % t)
        return json.loads(t)
    if t[0] == "'":
        if len(t) < 2 or t[-1] != "'":
            raise YamlSubsetError("unterminated string: %s" % t)
        return t[1:-1].replace("''", "'")
    if t[0] == "[":
        if t[-1] != "]":
            raise YamlSubsetError("unterminated flow list: %s" % t)
        return [_scalar(x) for x in _split_flow(t[1:-1])]
    if t[0] == "{":
        if t.replace(" ", "") != "{}":
            raise YamlSubsetError("only {} of flow mappings is in the subset: %s" % t)
        return {}
    if t[0] in "&*!|>%@`":
        raise YamlSubsetError("outside the subset: %s" % t)
    if t in ("null", "Null", "NULL", "~"):
        return None
    if t in ("true", "True", "TRUE"):
        return True
    if t in ("false", "False", "FALSE"):
        return False
    if _INT.match(t):
        return int(t)
    if _FLOAT.match(t) and any(c.isdigit() for c in t):
        return float(t)
    return t


def _split_key(text):
    """(key, rest) for 'key: rest' / 'key:'; None when text is not a mapping entry."""
    if text[0] in "\"'":
        q = text[0]
        i = 1
        while i < len(text):
            if text[i] == "\\" and q == '"':
                i += 2
                continue
            if text[i] == q:
                break
            i += 1
        key = _scalar(text[: i + 1])
        rest = text[i + 1:]
        if rest.startswith(":") and (len(rest) == 1 or rest[1] == " "):
            return key, rest[1:].strip()
        return None
    m = re.match(r"^([^\s\"'\[\]{},#][^#]*?)\s*:(?:\s+(.*)|)$", text)
    if not m:
        return None
    return m.group(1), (m.group(2) or "").strip()


def load_subset(text):
    """Parses the block-style YAML subset into dicts, lists and scalars."""
    lines = []
    for no, raw in enumerate(text.splitlines(), 1):
        if "\t" in raw[: len(raw) - len(raw.lstrip())]:
            raise YamlSubsetError("line %d: tabs in indentation" % no)
        s = _strip_comment(raw)
        if not s.strip() or s.strip() in ("---", "..."):
            continue
        lines.append((no, len(s) - len(s.lstrip(" ")), s.strip()))
    pos = [0]

    def block(indent):
        no, ind, s = lines[pos[0]]
        if s == "-" or s.startswith("- "):
            return seq(ind)
        return mapping(ind)

    def value_after(ind, rest, no):
        """The value of 'key: rest' at indent ind: inline, or the block below."""
        if rest != "":
            return _scalar(rest)
        if pos[0] < len(lines):
            nno, nind, ns = lines[pos[0]]
            if nind > ind or (nind == ind and (ns == "-" or ns.startswith("- "))):
                return block(nind)
        return None

    def mapping(ind):
        out = {}
        while pos[0] < len(lines):
            no, i, s = lines[pos[0]]
            if i < ind:
                break
            if i > ind:
                raise YamlSubsetError("line %d: unexpected indent" % no)
            if s == "-" or s.startswith("- "):
                break
            kv = _split_key(s)
            if kv is None:
                raise YamlSubsetError("line %d: expected 'key: value': %s" % (no, s))
            key, rest = kv
            if key in out:
                raise YamlSubsetError("line %d: duplicate key %s" % (no, key))
            pos[0] += 1
            out[key] = value_after(ind, rest, no)
        return out

    def seq(ind):
        out = []
        while pos[0] < len(lines):
            no, i, s = lines[pos[0]]
            if i < ind or not (s == "-" or s.startswith("- ")):
                if i > ind:
                    raise YamlSubsetError("line %d: unexpected indent" % no)
                break
            if i > ind:
                raise YamlSubsetError("line %d: unexpected indent" % no)
            item = s[1:].strip()
            if item == "":
                pos[0] += 1
                out.append(block(lines[pos[0]][1]) if pos[0] < len(lines) and
                           lines[pos[0]][1] > ind else None)
                continue
            kv = _split_key(item) if item[0] not in "[{" else None
            if kv is None:
                pos[0] += 1
                out.append(_scalar(item))
                continue
            # "- key: value" opens a mapping whose other keys sit at ind + 2 + …
            item_ind = i + (len(s) - len(item))
            lines[pos[0]] = (no, item_ind, item)
            out.append(mapping(item_ind))
        return out

    if not lines:
        return None
    result = block(lines[0][1])
    if pos[0] != len(lines):
        raise YamlSubsetError("line %d: unexpected content" % lines[pos[0]][0])
    return result


def load(path, use_yaml=True):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if use_yaml:
        try:
            import yaml  # noqa: PLC0415 (optional)
        except ImportError:
            yaml = None
        if yaml is not None:
            return yaml.safe_load(text)
    return load_subset(text)


# ----------------------------------------------------------------- validation


def resolve(spec, node):
    seen = 0
    while isinstance(node, dict) and "$ref" in node:
        ref = node["$ref"]
        if not ref.startswith("#/"):
            raise KeyError("only local $ref: %s" % ref)
        node = spec
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or part not in node:
                raise KeyError("unresolved $ref %s" % ref)
            node = node[part]
        seen += 1
        if seen > 32:
            raise KeyError("$ref loop at %s" % ref)
    return node


def _type_ok(t, v):
    if t == "object":
        return isinstance(v, dict)
    if t == "array":
        return isinstance(v, list)
    if t == "string":
        return isinstance(v, str)
    if t == "integer":
        return isinstance(v, int) and not isinstance(v, bool)
    if t == "number":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if t == "boolean":
        return isinstance(v, bool)
    raise KeyError("unknown type %s" % t)


def validate(spec, schema, value, where="$"):
    """Errors (strings naming where) of value against schema; [] when valid."""
    schema = resolve(spec, schema)
    errs = []
    if value is None:
        if schema.get("nullable") or "type" not in schema:
            return errs
        return ["%s: null where %s is required" % (where, schema.get("type"))]
    t = schema.get("type")
    if t and not _type_ok(t, value):
        return ["%s: %s is not %s" % (where, json.dumps(value)[:80], t)]
    if "enum" in schema and value not in schema["enum"]:
        errs.append("%s: %s is not one of %s" % (where, json.dumps(value)[:80], schema["enum"]))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errs.append("%s: %s < minimum %s" % (where, value, schema["minimum"]))
        if "maximum" in schema and value > schema["maximum"]:
            errs.append("%s: %s > maximum %s" % (where, value, schema["maximum"]))
    if isinstance(value, dict):
        props = schema.get("properties", {}) or {}
        for k in schema.get("required", []) or []:
            if k not in value:
                errs.append("%s: missing required field %s" % (where, k))
        extra = schema.get("additionalProperties", True)
        for k, v in value.items():
            if k in props:
                errs += validate(spec, props[k], v, "%s.%s" % (where, k))
            elif extra is False:
                errs.append("%s: unknown field %s" % (where, k))
            elif isinstance(extra, dict):
                errs += validate(spec, extra, v, "%s.%s" % (where, k))
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            errs += validate(spec, schema["items"], v, "%s[%d]" % (where, i))
    return errs


def find_operation(spec, method, path):
    """(template, operation) for METHOD path (query ignored), or (template, None)
    when the path exists without that method, or (None, None)."""
    path = path.split("?", 1)[0]
    for template, item in (spec.get("paths") or {}).items():
        pattern = "^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, path):
            return template, (item or {}).get(method.lower())
    return None, None


def _media(content, content_type):
    if not content:
        return None, None
    if content_type:
        base = content_type.split(";", 1)[0].strip().lower()
        if base in content:
            return base, content[base]
        return base, None
    if len(content) == 1:
        return next(iter(content.items()))
    return None, None


def _decode(body, media):
    if isinstance(body, (bytes, bytearray)):
        body = body.decode("utf-8")
    if media and (media.endswith("json")) and isinstance(body, str):
        return json.loads(body) if body.strip() else None
    return body


def check_response(spec, method, path, status, body, content_type=None, headers=None):
    """Errors of one answer against the document; [] when it conforms."""
    template, op = find_operation(spec, method, path)
    if template is None:
        return ["%s %s: path not in the document" % (method, path)]
    if op is None:
        return ["%s %s: method not in the document" % (method, template)]
    responses = op.get("responses") or {}
    resp = responses.get(str(status), responses.get(status, responses.get("default")))
    if resp is None:
        return ["%s %s: status %s not documented" % (method, template, status)]
    resp = resolve(spec, resp)
    errs = []
    where = "%s %s %s" % (method, template, status)
    if headers is not None:
        have = {k.lower() for k in headers}
        for h, hd in (resp.get("headers") or {}).items():
            # a header the document marks "required: false" may be absent
            if resolve(spec, hd).get("required") is False:
                continue
            if h.lower() not in have:
                errs.append("%s: missing header %s" % (where, h))
    media, m = _media(resp.get("content"), content_type)
    if resp.get("content") and m is None:
        return errs + ["%s: content type %s not documented (%s)" %
                       (where, content_type, ", ".join(resp["content"]))]
    if m is None:
        return errs
    try:
        value = _decode(body, media)
    except ValueError as e:
        return errs + ["%s: body is not JSON: %s" % (where, e)]
    schema = m.get("schema")
    if schema is not None:
        errs += validate(spec, schema, value, where)
    return errs


def check_request(spec, method, path, body, content_type="application/json"):
    """Errors of a request body against the document; [] when it conforms."""
    template, op = find_operation(spec, method, path)
    if op is None:
        return ["%s %s: not in the document" % (method, path)]
    rb = op.get("requestBody")
    if rb is None:
        return [] if not body else ["%s %s: takes no body" % (method, template)]
    rb = resolve(spec, rb)
    if not body:
        return [] if not rb.get("required") else ["%s %s: body required" % (method, template)]
    media, m = _media(rb.get("content"), content_type)
    if m is None:
        return ["%s %s: content type %s not documented" % (method, template, content_type)]
    try:
        value = _decode(body, media)
    except ValueError as e:
        return ["%s %s: body is not JSON: %s" % (method, template, e)]
    return validate(spec, m.get("schema", {}), value, "%s %s body" % (method, template))


def lint(spec):
    """Errors in the document itself: dangling $refs, operations without
    responses, schemas with unknown types."""
    errs = []

    def walk(node, where):
        if isinstance(node, dict):
            if "$ref" in node:
                try:
                    resolve(spec, node)
                except KeyError as e:
                    errs.append("%s: %s" % (where, e))
            for k, v in node.items():
                walk(v, "%s/%s" % (where, k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, "%s[%d]" % (where, i))

    walk(spec, "#")
    for name, s in (spec.get("components", {}).get("schemas") or {}).items():
        t = s.get("type")
        if t and t not in ("object", "array", "string", "integer", "number", "boolean"):
            errs.append("schema %s: unknown type %s" % (name, t))
    for template, item in (spec.get("paths") or {}).items():
        for method, op in (item or {}).items():
            if not op.get("responses"):
                errs.append("%s %s: no responses" % (method, template))
    return errs


# ------------------------------------------------------------------ self-test

SAMPLE_STATUS = {
    "node": "n0", "coordinator": "n0", "version": "0.1.0",
    "job": {"name": "tiny-demo", "hash": "abc", "steps": 1000, "global_batch": 8, "seq_len": 128,
            "micro_batch": 2, "params": 1234567, "tp": 1, "pp": 2, "dp": 1, "dp_min": 1,
            "dp_max": 4},
    "generation": 2, "restarts": 0, "last_restart": None, "state": "running", "reason": None,
    "step": 12, "consumed_tokens": 12288, "global_batch": 8, "loss": 3.21, "lr": 1e-3, "grad_norm": 0.8,
    "val_loss": None, "evaluation": None, "tokens_per_s": 2830.0, "skipped_steps": 0, "loss_scale": None,
    "step_time": {"total_ms": 45.3, "compute_ms": 38.0, "bubble_ms": 4.1, "comm_ms": 3.2,
                  "timers": {"forward-backward": [40.5, 41.25]}},
    "eta_s": 120.5, "exit_at": None, "exit_step": None,
    "devices": [{"node": "n0", "device": "cpu:0", "rank": 0, "stage": 0, "replica": 0,
                 "tflops": 0.21, "mfu": None}],
    "nodes": [{"name": "n0", "host": "127.0.0.1", "role": "coordinator", "state": "running",
               "devices": ["cpu:0", "cpu:1"], "ranks": [0, 2], "stages": [0], "replicas": [0],
               "heartbeat_age_s": 0.4, "memory_bytes": 123456789,
               "control_url": "http://127.0.0.1:8471"}],
    "heartbeat_interval_ms": 1000, "heartbeat_timeout_ms": 6000,
    "last_checkpoint": {"step": 10, "path": "/ckpt/job/step_00000010", "time": 1700000000.0,
                        "bytes": 12345},
    "checkpoint_progress": {"of": "node", "state": "idle"},
    "operations_pending": 0,
    "store": {"keys": 120, "bytes": 40960, "max_bytes": 17179869184, "transient_bytes": 131072,
              "max_transient_bytes": 4294967296, "clients": 2, "max_clients": 65536,
              "waiters": 3, "refused_clients": 0, "dropped_clients": 0},
    "election": {"etcd": "http://10.0.0.1:2379,http://10.0.0.2:2379", "term": "0123456789abcdef",
                 "coordinator_endpoint": "10.0.0.7:29400", "elected_here": True, "lease_s": 6,
                 "etcd_answers": True, "etcd_error": None},
}
SAMPLE_EVALUATION = {"split": "valid", "end_of_training": False, "after_step": 12,
                     "batches_done": 40, "batches": 100, "elapsed_s": 12.5}
SAMPLE_OP = {"id": "op-7", "kind": "resize", "state": "queued", "reason": None,
             "created": 1700000000.0, "updated": 1700000000.5, "step": None, "args": {"dp": 2},
             "progress": None}
SAMPLE_POINT = {"step": 3, "time": 1700000000.25, "loss": 3.5, "lr": 1e-3, "grad_norm": 1.1,
                "step_ms": 44.0, "tokens_per_s": 2800.0, "tflops": 0.2, "bubble": 0.09,
                "consumed_tokens": 3072}
SAMPLE_PROBLEM = {"type": "https://mtnlg.dev/problems/conflict", "title": "Conflict",
                  "status": 409, "detail": "cannot resume: the job is running, not paused"}


def self_test(spec_path):
    import copy

    failures = []

    def expect(name, errs, ok):
        if bool(errs) == ok:
            failures.append("%s: %s" % (name, errs if errs else "accepted, should be refused"))

    spec = load(spec_path)
    subset = load(spec_path, use_yaml=False)
    try:
        import yaml  # noqa: F401,PLC0415
        if subset != spec:
            failures.append("the subset reader and PyYAML disagree on %s" % spec_path)
    except ImportError:
        print("PyYAML absent: checked with the subset reader only")
    failures += ["lint: " + e for e in lint(spec)]

    j = json.dumps
    good = [
        ("GET", "/v1/status", 200, j(SAMPLE_STATUS), "application/json", {}),
        ("GET", "/v1/status", 200, j(dict(SAMPLE_STATUS, evaluation=SAMPLE_EVALUATION)),
         "application/json", {}),
        ("GET", "/v1/health", 200, j({"status": "ok", "node": "n0", "state": "running",
                                      "version": "0.1.0", "mutations": True}), "application/json", {}),
        ("GET", "/v1/history?since=2", 200, j({"steps": [SAMPLE_POINT, dict(SAMPLE_POINT,
                                                                            step=4, val_loss=3.4)],
                                               "last_step": 4}), "application/json", {}),
        ("GET", "/v1/checkpoints", 200, j({"checkpoints": [{"step": 10, "path": "/c/step_10",
                                                            "bytes": 5, "time": 1.5,
                                                            "latest": True}],
                                            "dir": "/c"}),
         "application/json", {}),
        ("GET", "/v1/operations", 200, j({"operations": [SAMPLE_OP]}), "application/json", {}),
        ("GET", "/v1/operations/op-7", 200, j(SAMPLE_OP), "application/json", {}),
        ("GET", "/v1/operations/op-9", 404, j(dict(SAMPLE_PROBLEM, status=404, title="Not Found")),
         "application/problem+json", {}),
        ("POST", "/v1/resize", 202, j(SAMPLE_OP), "application/json",
         {"Location": "/v1/operations/op-7"}),
        ("POST", "/v1/resume", 409, j(SAMPLE_PROBLEM), "application/problem+json", {}),
        ("POST", "/v1/pause", 401, j(dict(SAMPLE_PROBLEM, status=401)), "application/problem+json",
         {"WWW-Authenticate": 'Bearer realm="mtnlg"'}),
        ("GET", "/v1/metrics", 200, "mtnlg_step 12\n", "text/plain; version=0.0.4", {}),
        ("GET", "/", 200, "<!DOCTYPE html>", "text/html; charset=utf-8", {}),
    ]
    for method, path, status, body, ct, hdrs in good:
        expect("%s %s %d" % (method, path, status),
               check_response(spec, method, path, status, body, ct, hdrs), ok=True)

    def status_with(mutate):
        s = copy.deepcopy(SAMPLE_STATUS)
        mutate(s)
        return j(s)

    bad = [
        ("missing field", status_with(lambda s: s.pop("generation"))),
        ("unknown field", status_with(lambda s: s.update(extra=1))),
        ("wrong state", status_with(lambda s: s.update(state="dancing"))),
        ("string step", status_with(lambda s: s.update(step="12"))),
        ("float step", status_with(lambda s: s.update(step=12.0))),
        ("bool step", status_with(lambda s: s.update(step=True))),
        ("null node", status_with(lambda s: s.update(node=None))),
        ("bad role", status_with(lambda s: s["nodes"][0].update(role="boss"))),
        ("rank not int", status_with(lambda s: s["nodes"][0]["ranks"].append("3"))),
        ("negative rank", status_with(lambda s: s["devices"][0].update(rank=-1))),
        ("job not object", status_with(lambda s: s.update(job=[]))),
        ("ckpt missing bytes", status_with(lambda s: s["last_checkpoint"].pop("bytes"))),
        ("progress bad state", status_with(lambda s: s["checkpoint_progress"].update(state="x"))),
        ("evaluation of the train split",
         status_with(lambda s: s.update(evaluation=dict(SAMPLE_EVALUATION, split="train")))),
        ("evaluation without its batches",
         status_with(lambda s: s.update(evaluation={"split": "test"}))),
        ("not JSON", "{"),
    ]
    for name, body in bad:
        expect("status " + name, check_response(spec, "GET", "/v1/status", 200, body,
                                                "application/json"), ok=False)
    expect("op bad kind", check_response(spec, "GET", "/v1/operations/x", 200,
                                         j(dict(SAMPLE_OP, kind="explode")), "application/json"),
           ok=False)
    expect("op args dp 0", check_response(spec, "GET", "/v1/operations/x", 200,
                                          j(dict(SAMPLE_OP, args={"dp": 0})), "application/json"),
           ok=False)
    expect("problem without detail",
           check_response(spec, "POST", "/v1/resume", 409,
                          j({k: v for k, v in SAMPLE_PROBLEM.items() if k != "detail"}),
                          "application/problem+json"), ok=False)
    expect("problem as application/json",
           check_response(spec, "POST", "/v1/resume", 409, j(SAMPLE_PROBLEM), "application/json"),
           ok=False)
    expect("202 without Location",
           check_response(spec, "POST", "/v1/pause", 202, j(SAMPLE_OP), "application/json", {}),
           ok=False)
    expect("undocumented status",
           check_response(spec, "GET", "/v1/status", 418, "", "text/plain"), ok=False)
    expect("unknown path", check_response(spec, "GET", "/v1/nope", 200, "{}"), ok=False)
    expect("wrong method", check_response(spec, "DELETE", "/v1/status", 200, "{}"), ok=False)
    expect("point missing loss",
           check_response(spec, "GET", "/v1/history", 200,
                          j({"steps": [{k: v for k, v in SAMPLE_POINT.items() if k != "loss"}],
                             "last_step": 3}), "application/json"), ok=False)

    expect("resize body", check_request(spec, "POST", "/v1/resize", '{"dp": 2}'), ok=True)
    expect("pause empty body", check_request(spec, "POST", "/v1/pause", ""), ok=True)
    expect("pause {}", check_request(spec, "POST", "/v1/pause", "{}"), ok=True)
    expect("pause with a field", check_request(spec, "POST", "/v1/pause", '{"x":1}'), ok=False)
    expect("resize dp 0", check_request(spec, "POST", "/v1/resize", '{"dp": 0}'), ok=False)
    expect("resize dp float", check_request(spec, "POST", "/v1/resize", '{"dp": 2.0}'), ok=False)
    expect("resize without body", check_request(spec, "POST", "/v1/resize", ""), ok=False)

    # The subset reader on the forms it promises, and refusals outside them.
    sample = ('a: 1\nb: "x: y # z"  # c\nc:\n  - 1\n  - k: v\n    j: [a, "b, c", 3]\n'
              'd: []\ne: {}\nf: ~\n"/p/{id}":\n  g: 1.5e3\nh:\n- x\n- y\n')
    want = {"a": 1, "b": "x: y # z", "c": [1, {"k": "v", "j": ["a", "b, c", 3]}], "d": [],
            "e": {}, "f": None, "/p/{id}": {"g": 1500.0}, "h": ["x", "y"]}
    got = load_subset(sample)
    if got != want:
        failures.append("subset reader: %r != %r" % (got, want))
    for text in ("a: &x 1\n", "a: [[1]]\n", "a: |\n  x\n", "a: 1\n  b: 2\n", "a: 1\na: 2\n"):
        try:
            load_subset(text)
            failures.append("subset reader accepted %r" % text)
        except YamlSubsetError:
            pass

    for f in failures:
        print("FAIL", f)
    print("%d failed" % len(failures))
    return 1 if failures else 0


def check_batch(spec_path, batch_path):
    """Checks every answer in a JSON-lines file of {method, path, status,
    content_type, headers, body}; prints each error."""
    spec = load(spec_path)
    n = bad = 0
    with open(batch_path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            n += 1
            errs = check_response(spec, r["method"], r["path"], r["status"], r.get("body", ""),
                                  r.get("content_type"), r.get("headers"))
            for e in errs:
                print(e)
            bad += bool(errs)
    print("%d of %d answers do not conform to %s" % (bad, n, spec_path))
    return 1 if bad or n == 0 else 0


def main(argv):
    if len(argv) == 3 and argv[2] == "--self-test":
        return self_test(argv[1])
    if len(argv) == 4 and argv[2] == "--batch":
        return check_batch(argv[1], argv[3])
    args = [a for a in argv[1:]]
    ct = None
    if "--content-type" in args:
        i = args.index("--content-type")
        ct = args[i + 1]
        del args[i:i + 2]
    if len(args) not in (4, 5):
        sys.stderr.write(__doc__)
        return 2
    spec_path, method, path, status = args[:4]
    src = args[4] if len(args) == 5 else "-"
    body = sys.stdin.read() if src == "-" else open(src, encoding="utf-8").read()
    errs = check_response(load(spec_path), method, path, int(status), body, ct)
    for e in errs:
        print(e)
    return 1 if errs else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
