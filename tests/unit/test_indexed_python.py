#!/usr/bin/python3
"""test_indexed_python.py — Megatron .bin/.idx files from an independent writer.

The files are written here with struct.pack from the format as Megatron-LM
documents and writes it (megatron/core/datasets/indexed_dataset.py):

  .idx, little-endian, no padding:
    b"MMIDIDX\\x00\\x00"   9-byte magic
    <Q version = 1
    <B dtype code (1 u8, 2 i8, 3 i16, 4 i32, 5 i64, 6 f64, 7 f32, 8 u16)
    <Q sequence count N
    <Q document index length D+1
    <i32 x N  sequence lengths in tokens
    <i64 x N  byte offsets of the sequences in .bin (contiguous from 0)
    <i64 x D+1 document boundaries over sequence indices (0 first, N last)
  .bin: the tokens of every sequence back to back.

and read back through libmtnlg by tests/unit/indexed_dump (argv[1]), whose JSON
must equal what was written. Run: test_indexed_python.py path/to/indexed_dump
"""
import json
import os
import random
import struct
import subprocess
import sys
import tempfile

DUMP = sys.argv[1]
DTYPES = {  # code: (struct format, lo, hi)
    1: ("B", 0, 255),
    2: ("b", -128, 127),
    3: ("h", -32768, 32767),
    4: ("i", -(2**31), 2**31 - 1),
    5: ("q", -(2**31), 2**31 - 1),  # the reader hands out int32 ids
    8: ("H", 0, 65535),
}


def write_dataset(prefix, code, docs, extra_idx=b"", bin_edit=None):
    """docs: list of documents, each a list of sequences (lists of ints)."""
    fmt = DTYPES[code][0] if code in DTYPES else "i"
    elem = struct.calcsize("<" + fmt)
    sizes, pointers, doc_idx, body = [], [], [0], bytearray()
    for doc in docs:
        for seq in doc:
            pointers.append(len(body))
            sizes.append(len(seq))
            body += struct.pack("<%d%s" % (len(seq), fmt), *seq)
        doc_idx.append(len(sizes))
    idx = bytearray(b"MMIDIDX\x00\x00")
    idx += struct.pack("<Q", 1)
    idx += struct.pack("<B", code)
    idx += struct.pack("<Q", len(sizes))
    idx += struct.pack("<Q", len(doc_idx))
    idx += struct.pack("<%di" % len(sizes), *sizes)
    idx += struct.pack("<%dq" % len(pointers), *pointers)
    idx += struct.pack("<%dq" % len(doc_idx), *doc_idx)
    idx += extra_idx
    if bin_edit:
        body = bin_edit(body)
    with open(prefix + ".idx", "wb") as f:
        f.write(idx)
    with open(prefix + ".bin", "wb") as f:
        f.write(body)
    return {"sizes": sizes, "pointers": pointers, "doc_idx": doc_idx, "elem": elem}


def dump(prefix):
    p = subprocess.run([DUMP, prefix], capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


failures = 0


def check(name, cond, detail=""):
    global failures
    print("%s %s%s" % ("ok  " if cond else "FAIL", name, "" if cond else ": " + detail))
    if not cond:
        failures += 1


def expect_read(name, prefix, code, docs):
    written = write_dataset(prefix, code, docs)
    rc, out, err = dump(prefix)
    if rc != 0:
        check(name, False, "indexed_dump refused it: " + err.strip())
        return
    got = json.loads(out)
    seqs = [seq for doc in docs for seq in doc]
    want = {
        "dtype": code,
        "n_seqs": len(seqs),
        "n_docs": len(docs),
        "n_tokens": sum(len(s) for s in seqs),
        "doc_idx": written["doc_idx"],
        "sizes": written["sizes"],
        "pointers": written["pointers"],
        "seqs": seqs,
    }
    diffs = [k for k in want if got.get(k) != want[k]]
    check(name, not diffs, "fields differ: %s (got %s)" % (diffs, {k: got.get(k) for k in diffs}))


def expect_refused(name, prefix, needles):
    rc, out, err = dump(prefix)
    missing = [n for n in needles if n not in err]
    check(name, rc == 1 and not missing,
          "rc %d, stderr %r lacks %s" % (rc, err.strip(), missing))


def random_docs(rng, code, n_docs, max_seqs, max_len):
    _, lo, hi = DTYPES[code]
    docs = []
    for _ in range(n_docs):
        doc = []
        for _ in range(rng.randint(0, max_seqs)):
            n = rng.randint(0, max_len)
            # the extremes of the dtype, then anything in range
            doc.append([rng.choice((lo, hi, 0, rng.randint(lo, hi))) for _ in range(n)])
        docs.append(doc)
    return docs


def main():
    rng = random.Random(7)
    with tempfile.TemporaryDirectory(prefix="mt_test_indexed_py.") as tmp:
        def p(name):
            return os.path.join(tmp, name)

        # A GPT-2-like u16 file: EOD 50256 closing each document; one document
        # split in three sequences (Megatron's --split-sentences), one empty.
        eod = 50256
        docs = [[[15496, 11, 995, eod]],
                [[464, 2068], [7586, 21831, 13], [eod]],
                [],
                [[65535, 0, eod]]]
        expect_read("u16_documents_with_several_sequences_and_an_empty_one", p("gpt"), 8, docs)

        # Every dtype, with N both odd and even so the int32 and int64 arrays
        # land at every alignment the 34-byte header allows.
        for code, label in ((8, "u16"), (4, "i32"), (5, "i64"), (1, "u8"), (2, "i8"), (3, "i16")):
            for n_docs in (1, 2, 3, 5, 8):
                docs = random_docs(rng, code, n_docs, 3, 40)
                name = "%s_%d_docs_%d_seqs" % (label, n_docs, sum(len(d) for d in docs))
                expect_read("%s_reads_as_written" % name, p(name), code, docs)

        # Larger: many sequences, lengths past 2^16 tokens in one sequence.
        docs = random_docs(rng, 4, 300, 4, 200)
        docs.append([[rng.randint(-(2**31), 2**31 - 1) for _ in range(70000)]])
        expect_read("i32_300_docs_and_a_70000_token_sequence", p("i32_big"), 4, docs)

        expect_read("empty_dataset_no_sequences_no_documents", p("empty"), 8, [])
        expect_read("documents_of_empty_sequences", p("empties"), 8, [[[]], [[], []], [[3]]])

        # i64 ids outside int32 are refused when read, naming where.
        write_dataset(p("i64_wide"), 5, [[[1, 2]], [[3, 2**40]]])
        expect_refused("i64_token_outside_int32_refused", p("i64_wide"),
                       ["i64_wide.bin", "token 1 of sequence 1", str(2**40)])

        # Damage, from this writer too.
        write_dataset(p("short_bin"), 8, [[[1, 2, 3]], [[4, 5]]], bin_edit=lambda b: b[:-1])
        expect_refused("bin_one_byte_short_refused", p("short_bin"),
                       ["ECORRUPT", "short_bin.bin: 9 bytes", "ends at 10"])
        write_dataset(p("long_bin"), 8, [[[1, 2, 3]], [[4, 5]]], bin_edit=lambda b: b + b"\0\0")
        expect_refused("bin_with_trailing_tokens_refused", p("long_bin"),
                       ["long_bin.bin: 12 bytes", "last sequence (1)", "ends at 10"])
        write_dataset(p("trailing_idx"), 8, [[[1, 2, 3]]], extra_idx=b"\0" * 8)
        expect_refused("idx_with_trailing_bytes_refused", p("trailing_idx"),
                       ["trailing_idx.idx", "need exactly"])
        write_dataset(p("multimodal"), 8, [[[1, 2, 3]], [[4]]], extra_idx=b"\0\0")
        expect_refused("multimodal_sequence_modes_named", p("multimodal"),
                       ["ENOTSUP", "multimodal.idx", "sequence modes"])
        write_dataset(p("dtype11"), 11, [[[1]]])
        expect_refused("dtype_11_refused", p("dtype11"), ["dtype11.idx", "dtype code 11"])

    print("%d failed" % failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
