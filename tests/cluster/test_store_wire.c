/* test_store_wire — the store protocol's codec (proto/store_wire.c): every op's
 * request and reply round trips and re-encodes to the same bytes; truncated
 * frames, lengths over the limits, bad magic, version, op, status, reserved
 * byte, bools, NUL in keys and trailing bytes are refused with the status the
 * server answers with; the encoder refuses what the decoder would. Frames sit
 * in buffers of exactly their size, so a read past the end shows under ASan. */
#include "err.h"
#include "store_wire.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mt_check.h"

static mt_store_str keys_out[MT_STORE_MAX_WAIT_KEYS];

/* Encodes m into a buffer of exactly its size (free() it). */
static uint8_t *encode(const mt_store_msg *m, size_t *n) {
  if (mt_store_encode(m, NULL, 0, n)) return NULL;
  uint8_t *buf = malloc(*n);
  if (mt_store_encode(m, buf, *n, n)) {
    free(buf);
    return NULL;
  }
  return buf;
}

/* Decodes a copy of bytes[0..n) in an exactly sized buffer: 0 or the error. */
static int decode_copy(const uint8_t *bytes, size_t n, uint8_t *why) {
  uint8_t *copy = malloc(n ? n : 1);
  memcpy(copy, bytes, n);
  mt_store_msg m;
  *why = 255;
  int rc = mt_store_decode(copy, n, &m, keys_out, MT_STORE_MAX_WAIT_KEYS, why);
  free(copy);
  return rc;
}

static int str_eq(mt_store_str a, mt_store_str b) {
  return a.bytes == b.bytes && (!a.bytes || !memcmp(a.p, b.p, a.bytes));
}

/* m encodes, decodes to the same fields, and re-encodes to the same bytes. */
static void round_trip(const char *what, const mt_store_msg *m) {
  size_t n = 0, n2 = 0;
  uint8_t *f = encode(m, &n);
  CHECK(f, "%s: encode: %s", what, mt_errmsg());
  if (!f) return;
  mt_store_msg d;
  uint8_t why;
  int rc = mt_store_decode(f, n, &d, keys_out, MT_STORE_MAX_WAIT_KEYS, &why);
  CHECK(!rc, "%s: decode: %s", what, mt_errmsg());
  if (!rc) {
    int same = d.op == m->op && d.status == m->status && d.id == m->id && str_eq(d.key, m->key) &&
               str_eq(d.value, m->value) && str_eq(d.expected, m->expected) && d.num == m->num &&
               d.timeout_ms == m->timeout_ms && d.flag == m->flag && d.present == m->present &&
               d.nkeys == m->nkeys;
    for (uint32_t i = 0; same && i < d.nkeys; i++) same = str_eq(d.keys[i], m->keys[i]);
    CHECK(same, "%s: decoded fields differ", what);
    uint8_t *g = encode(&d, &n2);
    CHECK(g && n2 == n && !memcmp(f, g, n), "%s: re-encoding differs", what);
    free(g);
  }
  /* Every proper prefix is refused, as is the frame with a byte more. */
  int accepted = 0;
  for (size_t cut = 0; cut < n; cut++) accepted += decode_copy(f, cut, &why) == 0;
  CHECK(!accepted, "%s: %d truncated frames accepted", what, accepted);
  uint8_t *longer = calloc(1, n + 1);
  memcpy(longer, f, n);
  CHECK(decode_copy(longer, n + 1, &why) == MT_ECORRUPT && why == MT_STORE_MALFORMED,
        "%s: a byte after the frame", what);
  /* And so is every shorter body the header claims: a field runs past its end. */
  for (size_t body = 0; body + MT_STORE_HDR_BYTES < n; body++) {
    memcpy(longer, f, n);
    longer[12] = (uint8_t)body, longer[13] = (uint8_t)(body >> 8);
    longer[14] = (uint8_t)(body >> 16), longer[15] = (uint8_t)(body >> 24);
    accepted += decode_copy(longer, MT_STORE_HDR_BYTES + body, &why) == 0;
  }
  CHECK(!accepted, "%s: %d shortened bodies accepted", what, accepted);
  free(longer);
  free(f);
}

static void test_every_op_round_trips(void) {
  mt_store_str k = mt_store_cstr("gen/3/comm/tp0/gloo/1");
  mt_store_str v = {"a\0b\xff", 4}, e = mt_store_cstr("old");
  mt_store_str keys[3] = {mt_store_cstr("a"), mt_store_cstr("gen/0/b"), mt_store_cstr("c")};
  const mt_store_msg reqs[] = {
      {.op = MT_STORE_OP_SET, .id = 1, .key = k, .value = v},
      {.op = MT_STORE_OP_SET, .id = 2, .key = k},
      {.op = MT_STORE_OP_GET, .id = 3, .key = k, .timeout_ms = 5000},
      {.op = MT_STORE_OP_GET, .id = 4, .key = k, .timeout_ms = -1},
      {.op = MT_STORE_OP_ADD, .id = 5, .key = k, .num = -9223372036854775807LL - 1},
      {.op = MT_STORE_OP_CAS, .id = 6, .key = k, .expected = e, .value = v},
      {.op = MT_STORE_OP_CAS, .id = 7, .key = k, .flag = 1, .value = v},
      {.op = MT_STORE_OP_WAIT, .id = 8, .timeout_ms = 100, .nkeys = 3, .keys = keys},
      {.op = MT_STORE_OP_CHECK, .id = 9, .key = k},
      {.op = MT_STORE_OP_DELETE, .id = 10, .key = k},
      {.op = MT_STORE_OP_PING, .id = 0xffffffffu},
      {.op = MT_STORE_OP_AUTH, .id = 0, .value = v},
      {.op = MT_STORE_OP_DELETE_PREFIX, .id = 12, .key = mt_store_cstr("gen/1/")},
  };
  for (size_t i = 0; i < sizeof reqs / sizeof *reqs; i++) {
    char what[64];
    snprintf(what, sizeof what, "request %s #%zu", mt_store_op_name(reqs[i].op), i);
    round_trip(what, &reqs[i]);
  }
  const uint8_t R = MT_STORE_REPLY;
  const mt_store_msg replies[] = {
      {.op = MT_STORE_OP_SET | R, .id = 1},
      {.op = MT_STORE_OP_GET | R, .id = 3, .value = v},
      {.op = MT_STORE_OP_GET | R, .id = 3, .status = MT_STORE_TIMEOUT},
      {.op = MT_STORE_OP_ADD | R, .id = 5, .num = 42},
      {.op = MT_STORE_OP_CAS | R, .id = 6, .flag = 1, .present = 1, .value = v},
      {.op = MT_STORE_OP_CAS | R, .id = 6, .flag = 0, .present = 0},
      {.op = MT_STORE_OP_WAIT | R, .id = 8},
      {.op = MT_STORE_OP_WAIT | R, .id = 8, .status = MT_STORE_TIMEOUT, .key = keys[1]},
      {.op = MT_STORE_OP_CHECK | R, .id = 9, .flag = 1},
      {.op = MT_STORE_OP_DELETE | R, .id = 10, .status = MT_STORE_NOT_FOUND},
      {.op = MT_STORE_OP_PING | R, .id = 11},
      {.op = MT_STORE_OP_AUTH | R, .id = 0},
      {.op = MT_STORE_OP_DELETE_PREFIX | R, .id = 12, .num = 39},
      {.op = MT_STORE_OP_DELETE_PREFIX | R,
       .id = 12,
       .status = MT_STORE_UNSUPPORTED,
       .value = mt_store_cstr("op 10 is unknown")},
      {.op = MT_STORE_OP_AUTH | R,
       .status = MT_STORE_UNAUTHORIZED,
       .value = mt_store_cstr("wrong cluster key")},
      {.op = MT_STORE_OP_ADD | R,
       .id = 5,
       .status = MT_STORE_BAD_VALUE,
       .value = mt_store_cstr("add to key k: its value \"x\" is not an integer")},
      {.op = MT_STORE_OP_ERROR | R, .status = MT_STORE_MALFORMED, .value = mt_store_cstr("bad")},
  };
  for (size_t i = 0; i < sizeof replies / sizeof *replies; i++) {
    char what[64];
    snprintf(what, sizeof what, "reply %s #%zu", mt_store_op_name(replies[i].op), i);
    round_trip(what, &replies[i]);
  }
}

/* A SET frame to break in one place at a time. */
static uint8_t *set_frame(size_t *n) {
  mt_store_msg m = {.op = MT_STORE_OP_SET,
                    .id = 77,
                    .key = mt_store_cstr("gen/0/k"),
                    .value = mt_store_cstr("value")};
  return encode(&m, n);
}

static void put32(uint8_t *p, uint32_t v) {
  p[0] = (uint8_t)v, p[1] = (uint8_t)(v >> 8), p[2] = (uint8_t)(v >> 16), p[3] = (uint8_t)(v >> 24);
}

static void expect_refused(const char *what, const uint8_t *f, size_t n, int want_rc,
                           uint8_t want_why) {
  uint8_t why;
  int rc = decode_copy(f, n, &why);
  CHECK(rc == want_rc && why == want_why, "%s: rc %s why %s (want %s, %s): %s", what,
        mt_strerror(rc), mt_store_status_name(why), mt_strerror(want_rc),
        mt_store_status_name(want_why), mt_errmsg());
}

static void test_bad_headers_are_refused(void) {
  size_t n;
  uint8_t *f = set_frame(&n), *g = malloc(n);
  mt_store_hdr h;
  uint8_t why;
  CHECK(!mt_store_peek(f, MT_STORE_HDR_BYTES, &h, &why) && h.frame_bytes == n && h.id == 77,
        "peek of a good header");
  memcpy(g, f, n), g[0] = 'X';
  expect_refused("bad magic", g, n, MT_ECORRUPT, MT_STORE_MALFORMED);
  CHECK(strstr(mt_errmsg(), "magic"), "message: %s", mt_errmsg());
  memcpy(g, f, n), g[4] = 2;
  expect_refused("version 2", g, n, MT_ENOTSUP, MT_STORE_UNSUPPORTED);
  memcpy(g, f, n), g[4] = 0;
  expect_refused("version 0", g, n, MT_ENOTSUP, MT_STORE_UNSUPPORTED);
  memcpy(g, f, n), g[5] = 0;
  expect_refused("op 0", g, n, MT_ENOTSUP, MT_STORE_UNSUPPORTED);
  memcpy(g, f, n), g[5] = 11;
  expect_refused("op 11", g, n, MT_ENOTSUP, MT_STORE_UNSUPPORTED);
  memcpy(g, f, n), g[5] = MT_STORE_OP_ERROR;
  expect_refused("ERROR as a request", g, n, MT_ENOTSUP, MT_STORE_UNSUPPORTED);
  memcpy(g, f, n), g[6] = 1;
  expect_refused("a request with a status", g, n, MT_ECORRUPT, MT_STORE_MALFORMED);
  memcpy(g, f, n), g[5] |= MT_STORE_REPLY, g[6] = 8;
  expect_refused("unknown status", g, n, MT_ECORRUPT, MT_STORE_MALFORMED);
  memcpy(g, f, n), g[7] = 1;
  expect_refused("reserved byte", g, n, MT_ECORRUPT, MT_STORE_MALFORMED);
  memcpy(g, f, n), put32(g + 12, MT_STORE_MAX_FRAME - MT_STORE_HDR_BYTES + 1);
  expect_refused("body over 64 MiB", g, n, MT_EINVAL, MT_STORE_TOO_LARGE);
  CHECK(mt_store_peek(g, MT_STORE_HDR_BYTES, &h, &why) == MT_EINVAL && why == MT_STORE_TOO_LARGE,
        "peek refuses an oversized body before it is read");
  memcpy(g, f, n), put32(g + 12, 0xffffffffu);
  expect_refused("body of 4 GiB", g, n, MT_EINVAL, MT_STORE_TOO_LARGE);
  CHECK(mt_store_peek(f, MT_STORE_HDR_BYTES - 1, &h, &why) == MT_ECORRUPT, "peek of 15 bytes");
  CHECK(mt_store_decode(NULL, 0, &(mt_store_msg){0}, NULL, 0, &why) == MT_ECORRUPT,
        "decode of nothing");
  free(f), free(g);
}

/* Builds a frame from a header and raw body bytes. */
static uint8_t *frame(uint8_t op, uint8_t status, const void *body, size_t body_bytes, size_t *n) {
  *n = MT_STORE_HDR_BYTES + body_bytes;
  uint8_t *f = malloc(*n);
  put32(f, MT_STORE_MAGIC);
  f[4] = MT_STORE_VERSION, f[5] = op, f[6] = status, f[7] = 0;
  put32(f + 8, 1);
  put32(f + 12, (uint32_t)body_bytes);
  memcpy(f + MT_STORE_HDR_BYTES, body, body_bytes);
  return f;
}

static void expect_body_refused(const char *what, uint8_t op, uint8_t status, const void *body,
                                size_t bytes, int want_rc, uint8_t want_why) {
  size_t n;
  uint8_t *f = frame(op, status, body, bytes, &n);
  expect_refused(what, f, n, want_rc, want_why);
  free(f);
}

static void test_bad_bodies_are_refused(void) {
  const int C = MT_ECORRUPT;
  const uint8_t M = MT_STORE_MALFORMED, T = MT_STORE_TOO_LARGE;
  expect_body_refused("empty key", MT_STORE_OP_CHECK, 0, "\0\0\0\0", 4, C, M);
  expect_body_refused("NUL in a key", MT_STORE_OP_CHECK, 0, "\3\0\0\0a\0b", 7, C, M);
  expect_body_refused("key length past the body", MT_STORE_OP_CHECK, 0, "\5\0\0\0abc", 7, C, M);
  expect_body_refused("key length cut", MT_STORE_OP_CHECK, 0, "\1\0", 2, C, M);
  expect_body_refused("trailing byte", MT_STORE_OP_CHECK, 0, "\1\0\0\0ab", 6, C, M);
  expect_body_refused("key of 4097 bytes", MT_STORE_OP_CHECK, 0, "\1\x10\0\0", 4, MT_EINVAL, T);
  expect_body_refused("value over 16 MiB", MT_STORE_OP_SET, 0, "\1\0\0\0k\1\0\0\1", 9, MT_EINVAL,
                      T);
  expect_body_refused("value length 4 GiB", MT_STORE_OP_SET, 0, "\1\0\0\0k\xff\xff\xff\xff", 9,
                      MT_EINVAL, T);
  expect_body_refused("GET without a timeout", MT_STORE_OP_GET, 0, "\1\0\0\0k", 5, C, M);
  expect_body_refused("ADD with a short delta", MT_STORE_OP_ADD, 0, "\1\0\0\0k\1\0\0\0", 9, C, M);
  expect_body_refused("CAS bool 2", MT_STORE_OP_CAS, 0, "\1\0\0\0k\2\0\0\0\0\0\0\0\0", 14, C, M);
  expect_body_refused("CAS absent with expected", MT_STORE_OP_CAS, 0,
                      "\1\0\0\0k\1\1\0\0\0x\0\0\0\0", 15, C, M);
  expect_body_refused("WAIT for 0 keys", MT_STORE_OP_WAIT, 0, "\0\0\0\0\0\0\0\0", 8, C, M);
  expect_body_refused("WAIT for 1025 keys", MT_STORE_OP_WAIT, 0, "\0\0\0\0\1\4\0\0", 8, MT_EINVAL,
                      T);
  expect_body_refused("WAIT count past the keys", MT_STORE_OP_WAIT, 0, "\0\0\0\0\2\0\0\0\1\0\0\0k",
                      13, C, M);
  expect_body_refused("PING with a body", MT_STORE_OP_PING, 0, "x", 1, C, M);
  expect_body_refused("DELETE_PREFIX of an empty prefix", MT_STORE_OP_DELETE_PREFIX, 0, "\0\0\0\0",
                      4, C, M);
  const uint8_t R = MT_STORE_REPLY;
  expect_body_refused("DELETE_PREFIX reply of -1 keys", MT_STORE_OP_DELETE_PREFIX | R, 0,
                      "\xff\xff\xff\xff\xff\xff\xff\xff", 8, C, M);
  expect_body_refused("CHECK reply bool 7", MT_STORE_OP_CHECK | R, 0, "\7", 1, C, M);
  expect_body_refused("CAS reply swapped, absent", MT_STORE_OP_CAS | R, 0, "\1\0\0\0\0\0", 6, C, M);
  expect_body_refused("CAS reply absent with a value", MT_STORE_OP_CAS | R, 0, "\0\0\1\0\0\0x", 7,
                      C, M);
  expect_body_refused("error text over 1 KiB", MT_STORE_OP_SET | R, MT_STORE_BAD_VALUE, "\1\4\0\0",
                      4, MT_EINVAL, T);
  expect_body_refused("ERROR reply with status OK", MT_STORE_OP_ERROR | R, 0, "", 0, C, M);
  expect_body_refused("WAIT TIMEOUT without the key", MT_STORE_OP_WAIT | R, MT_STORE_TIMEOUT, "", 0,
                      C, M);
  /* A WAIT decoded with too little room for its keys is refused, not overrun. */
  size_t n;
  uint8_t *f = frame(MT_STORE_OP_WAIT, 0, "\0\0\0\0\2\0\0\0\1\0\0\0a\1\0\0\0b", 18, &n);
  mt_store_msg m;
  mt_store_str two[2];
  uint8_t why;
  CHECK(mt_store_decode(f, n, &m, two, 1, &why) == MT_EINVAL && why == T, "WAIT with room for 1");
  CHECK(!mt_store_decode(f, n, &m, two, 2, &why) && m.nkeys == 2 && m.keys[1].p[0] == 'b',
        "WAIT with room for 2: %s", mt_errmsg());
  CHECK(mt_store_decode(f, n, &m, NULL, 0, &why) == MT_EINVAL, "WAIT decoded with no room");
  free(f);
}

static void test_encoder_refuses_what_decoder_would(void) {
  size_t n;
  char big_key[MT_STORE_MAX_KEY + 1];
  memset(big_key, 'k', sizeof big_key);
  mt_store_msg m = {.op = MT_STORE_OP_GET, .key = {big_key, MT_STORE_MAX_KEY + 1}};
  CHECK(mt_store_encode(&m, NULL, 0, &n) == MT_EINVAL, "a key of 4097 bytes");
  m.key.bytes = MT_STORE_MAX_KEY;
  CHECK(!mt_store_encode(&m, NULL, 0, &n) && n == MT_STORE_HDR_BYTES + 4 + MT_STORE_MAX_KEY + 4,
        "a key of 4096 bytes: %s", mt_errmsg());
  m.key = (mt_store_str){"a\0b", 3};
  CHECK(mt_store_encode(&m, NULL, 0, &n) == MT_EINVAL, "a key with a NUL byte");
  m.key = (mt_store_str){"", 0};
  CHECK(mt_store_encode(&m, NULL, 0, &n) == MT_EINVAL, "an empty key");
  m = (mt_store_msg){
      .op = MT_STORE_OP_SET, .key = mt_store_cstr("k"), .value = {big_key, MT_STORE_MAX_VALUE + 1}};
  CHECK(mt_store_encode(&m, NULL, 0, &n) == MT_EINVAL, "a value over 16 MiB");
  m = (mt_store_msg){
      .op = MT_STORE_OP_CAS, .key = mt_store_cstr("k"), .flag = 1, .expected = mt_store_cstr("x")};
  CHECK(mt_store_encode(&m, NULL, 0, &n) == MT_EINVAL, "CAS absent with an expected value");
  m = (mt_store_msg){.op = MT_STORE_OP_WAIT, .nkeys = 0};
  CHECK(mt_store_encode(&m, NULL, 0, &n) == MT_EINVAL, "WAIT for no keys");
  m = (mt_store_msg){.op = 42};
  CHECK(mt_store_encode(&m, NULL, 0, &n) == MT_EINVAL, "op 42");
  m = (mt_store_msg){.op = MT_STORE_OP_PING, .status = 1};
  CHECK(mt_store_encode(&m, NULL, 0, &n) == MT_EINVAL, "a request with a status");
  m = (mt_store_msg){.op = MT_STORE_OP_PING};
  uint8_t small[MT_STORE_HDR_BYTES - 1];
  CHECK(mt_store_encode(&m, small, sizeof small, &n) == MT_EINVAL && n == MT_STORE_HDR_BYTES,
        "a buffer too small");
  /* An error text over the limit is cut, not refused: it is for a person. */
  char text[2000];
  memset(text, 'x', sizeof text);
  m = (mt_store_msg){.op = MT_STORE_OP_ERROR | MT_STORE_REPLY,
                     .status = MT_STORE_MALFORMED,
                     .value = {text, sizeof text}};
  CHECK(!mt_store_encode(&m, NULL, 0, &n) && n == MT_STORE_HDR_BYTES + 4 + MT_STORE_MAX_TEXT,
        "a long error text is cut to 1 KiB");
}

/* The largest valid frame, a CAS of two 16 MiB values and a 4 KiB key, is
 * well under the frame limit. */
static void test_largest_frame_fits(void) {
  char *big = calloc(1, MT_STORE_MAX_VALUE);
  char key[MT_STORE_MAX_KEY];
  memset(key, 'k', sizeof key);
  mt_store_msg m = {.op = MT_STORE_OP_CAS,
                    .key = {key, sizeof key},
                    .expected = {big, MT_STORE_MAX_VALUE},
                    .value = {big, MT_STORE_MAX_VALUE}};
  size_t n = 0;
  CHECK(!mt_store_encode(&m, NULL, 0, &n) && n < MT_STORE_MAX_FRAME, "largest CAS: %zu bytes", n);
  uint8_t *f = malloc(n);
  mt_store_msg d;
  uint8_t why;
  CHECK(f && !mt_store_encode(&m, f, n, &n) && !mt_store_decode(f, n, &d, NULL, 0, &why) &&
            d.value.bytes == MT_STORE_MAX_VALUE,
        "largest CAS round trip: %s", mt_errmsg());
  free(f);
  free(big);
}

int main(void) {
  test_every_op_round_trips();
  test_bad_headers_are_refused();
  test_bad_bodies_are_refused();
  test_encoder_refuses_what_decoder_would();
  test_largest_frame_fits();
  if (failures) fprintf(stderr, "%d check(s) failed\n", failures);
  return failures ? 1 : 0;
}
