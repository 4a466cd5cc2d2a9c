// bpe_reference.js — the reference side of test_bpe.py: the npm package
// gpt-3-encoder's own encode() on files read as node reads text
// (Buffer.toString('utf8'): WHATWG replacement of invalid UTF-8).
//
//   node bpe_reference.js PACKAGE_DIR FILE...     one JSON line per FILE:
//       {"file": NAME, "ids": [...], "replacements": U+FFFD count after decoding}
//   node bpe_reference.js --classes               the pre-tokeniser's class of
//       every code point (0 other, 1 \p{L}, 2 \p{N}, 3 \s) as 0x110000 raw bytes,
//       the same test tools/gen_unicode_tables.py runs
//   node bpe_reference.js --unicode               node's Unicode version
'use strict';
const fs = require('fs');
const path = require('path');

const args = process.argv.slice(2);
if (args[0] === '--unicode') {
  console.log(process.versions.unicode);
} else if (args[0] === '--classes') {
  const L = /\p{L}/u, N = /\p{N}/u, S = /\s/u;
  const out = Buffer.alloc(0x110000);
  for (let c = 0; c < 0x110000; c++) {
    if (c >= 0xD800 && c <= 0xDFFF) continue;
    const s = String.fromCodePoint(c);
    out[c] = L.test(s) ? 1 : N.test(s) ? 2 : S.test(s) ? 3 : 0;
  }
  process.stdout.write(out);
} else {
  const { encode } = require(path.resolve(args[0]));
  for (const file of args.slice(1)) {
    const text = fs.readFileSync(file).toString('utf8');
    const replacements = (text.match(/\uFFFD/g) || []).length;
    process.stdout.write(JSON.stringify({ file, ids: encode(text), replacements }) + '\n');
  }
}
