/* fuzz_store_wire — the store protocol's decoder (proto/store_wire.c) under
 * random and mutated frames.
 *
 * Properties, for every input: the decoder returns (never crashes, never
 * reads outside the frame: each input sits in a buffer of exactly its size,
 * so ASan sees an overrun); a frame it accepts re-encodes to exactly the same
 * bytes and has every field within the protocol's limits; a frame with a bad
 * magic, version, reserved byte or a body length that is not the frame's is
 * refused.
 *
 * Built two ways from this file:
 *   - a plain executable (suites 'fuzz' and 'unit'): 100000 inputs from a
 *     fixed seed, mutations of a valid frame of every op (bit flips, lengths
 *     set to the limits and past them, cuts, splices), deterministic and fast;
 *     `fuzz_store_wire N SEED` for another count or seed;
 *   - with clang, a libFuzzer target (-DMT_LIBFUZZER -fsanitize=fuzzer) for
 *     open-ended runs: fuzz_store_wire_libfuzzer -max_total_time=60.
 */
#include "err.h"
#include "store_wire.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static mt_store_str keys[MT_STORE_MAX_WAIT_KEYS];

static uint32_t rd32(const uint8_t *p) {
  return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* 1 accepted, 0 refused, -1 a property broken (said on stderr). */
static int check_one(const uint8_t *data, size_t size) {
  uint8_t *f = malloc(size ? size : 1);
  if (!f) return 0;
  if (size) memcpy(f, data, size);
  mt_store_msg m;
  uint8_t why = 255;
  int rc = mt_store_decode(size ? f : NULL, size, &m, keys, MT_STORE_MAX_WAIT_KEYS, &why);
  int result = rc == 0;
  if (size >= MT_STORE_HDR_BYTES) {
    mt_store_hdr h;
    int prc = mt_store_peek(f, size, &h, NULL);
    int must_refuse = rd32(f) != MT_STORE_MAGIC || f[4] != MT_STORE_VERSION || f[7] != 0 ||
                      (uint64_t)rd32(f + 12) + MT_STORE_HDR_BYTES != size;
    if (must_refuse && !rc) {
      fprintf(stderr, "fuzz_store_wire: accepted a frame with a bad header\n");
      result = -1;
    }
    if (prc == 0 && rc == 0 && h.frame_bytes != size) result = -1;
  }
  if (rc && (why < MT_STORE_MALFORMED || why > MT_STORE_UNSUPPORTED)) {
    fprintf(stderr, "fuzz_store_wire: refused with status %u\n", why);
    result = -1;
  }
  if (rc == 0) {
    int in_limits = m.key.bytes <= MT_STORE_MAX_KEY && m.value.bytes <= MT_STORE_MAX_VALUE &&
                    m.expected.bytes <= MT_STORE_MAX_VALUE && m.nkeys <= MT_STORE_MAX_WAIT_KEYS;
    for (uint32_t i = 0; i < m.nkeys; i++)
      in_limits &= keys[i].bytes >= 1 && keys[i].bytes <= MT_STORE_MAX_KEY &&
                   keys[i].p >= (const char *)f &&
                   keys[i].p + keys[i].bytes <= (const char *)f + size;
    size_t n = 0;
    uint8_t *g = malloc(size);
    int same = g && !mt_store_encode(&m, g, size, &n) && n == size && !memcmp(f, g, size);
    free(g);
    if (!in_limits || !same) {
      fprintf(stderr, "fuzz_store_wire: accepted %s frame of %zu bytes %s\n",
              mt_store_op_name(m.op), size,
              !in_limits ? "with a field over a limit" : "that does not re-encode to itself");
      result = -1;
    }
  }
  free(f);
  return result;
}

#ifdef MT_LIBFUZZER
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (check_one(data, size) < 0) __builtin_trap();
  return 0;
}
#else

static uint64_t rng_state;

static uint64_t next(void) { /* splitmix64 */
  uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

static size_t below(size_t n) { return n ? (size_t)(next() % n) : 0; }

typedef struct seed {
  uint8_t *p;
  size_t n;
} seed;

static int add_seed(seed *s, int *count, const mt_store_msg *m) {
  size_t n;
  if (mt_store_encode(m, NULL, 0, &n)) return -1;
  s[*count].p = malloc(n);
  s[*count].n = n;
  if (mt_store_encode(m, s[*count].p, n, &n)) return -1;
  (*count)++;
  return 0;
}

/* A valid frame of every op, requests and replies. */
static int make_seeds(seed *s, int *count) {
  mt_store_str k = mt_store_cstr("gen/0/comm/tp0/gloo/1"), v = {"va\0ue", 5};
  mt_store_str ks[3] = {mt_store_cstr("a"), mt_store_cstr("gen/1/b"), mt_store_cstr("c")};
  const uint8_t R = MT_STORE_REPLY;
  const mt_store_msg msgs[] = {
      {.op = MT_STORE_OP_SET, .id = 1, .key = k, .value = v},
      {.op = MT_STORE_OP_GET, .id = 2, .key = k, .timeout_ms = 1000},
      {.op = MT_STORE_OP_ADD, .id = 3, .key = k, .num = -5},
      {.op = MT_STORE_OP_CAS, .id = 4, .key = k, .expected = v, .value = v},
      {.op = MT_STORE_OP_CAS, .id = 5, .key = k, .flag = 1, .value = v},
      {.op = MT_STORE_OP_WAIT, .id = 6, .timeout_ms = -1, .nkeys = 3, .keys = ks},
      {.op = MT_STORE_OP_CHECK, .id = 7, .key = k},
      {.op = MT_STORE_OP_DELETE, .id = 8, .key = k},
      {.op = MT_STORE_OP_PING, .id = 9},
      {.op = MT_STORE_OP_DELETE_PREFIX, .id = 10, .key = mt_store_cstr("gen/1/")},
      {.op = MT_STORE_OP_SET | R, .id = 1},
      {.op = MT_STORE_OP_GET | R, .id = 2, .value = v},
      {.op = MT_STORE_OP_GET | R, .id = 2, .status = MT_STORE_TIMEOUT},
      {.op = MT_STORE_OP_ADD | R, .id = 3, .num = 7},
      {.op = MT_STORE_OP_CAS | R, .id = 4, .flag = 1, .present = 1, .value = v},
      {.op = MT_STORE_OP_WAIT | R, .id = 6, .status = MT_STORE_TIMEOUT, .key = ks[1]},
      {.op = MT_STORE_OP_CHECK | R, .id = 7, .flag = 1},
      {.op = MT_STORE_OP_DELETE | R, .id = 8, .status = MT_STORE_NOT_FOUND},
      {.op = MT_STORE_OP_PING | R, .id = 9},
      {.op = MT_STORE_OP_DELETE_PREFIX | R, .id = 10, .num = 21},
      {.op = MT_STORE_OP_ERROR | R, .status = MT_STORE_MALFORMED, .value = mt_store_cstr("bad")},
  };
  for (size_t i = 0; i < sizeof msgs / sizeof *msgs; i++)
    if (add_seed(s, count, &msgs[i])) return -1;
  return 0;
}

static const uint32_t lengths[] = {0,
                                   1,
                                   2,
                                   3,
                                   4,
                                   5,
                                   15,
                                   16,
                                   17,
                                   255,
                                   4095,
                                   4096,
                                   4097,
                                   1024,
                                   1025,
                                   MT_STORE_MAX_VALUE,
                                   MT_STORE_MAX_VALUE + 1,
                                   MT_STORE_MAX_FRAME - 16,
                                   MT_STORE_MAX_FRAME,
                                   0x7fffffffu,
                                   0x80000000u,
                                   0xfffffffcu,
                                   0xffffffffu};

/* One mutation of buf[0..*n) (room for cap bytes). */
static void mutate(uint8_t *buf, size_t *n, size_t cap, const seed *seeds, int nseeds) {
  size_t at = below(*n);
  switch (below(8)) {
  case 0:
    if (*n) buf[at] ^= (uint8_t)(1u << below(8));
    break;
  case 1:
    if (*n) buf[at] = (uint8_t)next();
    break;
  case 2: {
    static const uint8_t special[] = {0, 1, 2, 0x7f, 0x80, 0xff};
    if (*n) buf[at] = special[below(sizeof special)];
    break;
  }
  case 3: /* a length field set to a limit, or just past one */
    if (*n >= 4) {
      uint32_t v = lengths[below(sizeof lengths / sizeof *lengths)];
      at = below(*n - 3);
      buf[at] = (uint8_t)v, buf[at + 1] = (uint8_t)(v >> 8);
      buf[at + 2] = (uint8_t)(v >> 16), buf[at + 3] = (uint8_t)(v >> 24);
    }
    break;
  case 4: *n = below(*n + 1); break; /* cut */
  case 5: {                          /* insert bytes */
    size_t k = 1 + below(8);
    if (*n + k > cap) break;
    memmove(buf + at + k, buf + at, *n - at);
    for (size_t i = 0; i < k; i++) buf[at + i] = (uint8_t)next();
    *n += k;
    break;
  }
  case 6: { /* delete bytes */
    size_t k = 1 + below(8);
    if (at + k > *n) k = *n - at;
    memmove(buf + at, buf + at + k, *n - at - k);
    *n -= k;
    break;
  }
  default: { /* splice: the tail of another frame */
    const seed *o = &seeds[below((size_t)nseeds)];
    size_t from = below(o->n), k = o->n - from;
    if (at + k > cap) k = cap - at;
    memcpy(buf + at, o->p + from, k);
    *n = at + k;
  }
  }
}

int main(int argc, char **argv) {
  long iterations = argc > 1 ? atol(argv[1]) : 100000;
  rng_state = argc > 2 ? strtoull(argv[2], NULL, 0) : 0x5eed5707e;
  seed seeds[32];
  int nseeds = 0, problems = 0;
  if (make_seeds(seeds, &nseeds)) {
    fprintf(stderr, "fuzz_store_wire: a seed frame does not encode: %s\n", mt_errmsg());
    return 1;
  }
  for (int i = 0; i < nseeds; i++)
    if (check_one(seeds[i].p, seeds[i].n) != 1) {
      fprintf(stderr, "fuzz_store_wire: seed %d (%s) refused: %s\n", i,
              mt_store_op_name(seeds[i].p[5]), mt_errmsg());
      problems++;
    }
  enum { CAP = 512 };
  uint8_t buf[CAP];
  long accepted = 0, refused = 0;
  for (long it = 0; it < iterations; it++) {
    size_t n;
    if (it % 10 == 0) { /* noise, sometimes behind a good header */
      n = below(CAP);
      for (size_t i = 0; i < n; i++) buf[i] = (uint8_t)next();
      if (n >= MT_STORE_HDR_BYTES && below(2)) memcpy(buf, seeds[below((size_t)nseeds)].p, 12);
    } else {
      const seed *s = &seeds[below((size_t)nseeds)];
      memcpy(buf, s->p, s->n);
      n = s->n;
      for (size_t k = 1 + below(4); k; k--) mutate(buf, &n, CAP, seeds, nseeds);
    }
    /* Most of the time make the header's body length true, so the mutations
     * reach the body decoder rather than stopping at the length check. */
    if (n >= MT_STORE_HDR_BYTES && below(4)) {
      uint32_t body = (uint32_t)(n - MT_STORE_HDR_BYTES);
      buf[12] = (uint8_t)body, buf[13] = (uint8_t)(body >> 8);
      buf[14] = (uint8_t)(body >> 16), buf[15] = (uint8_t)(body >> 24);
    }
    int r = check_one(buf, n);
    if (r < 0 && ++problems <= 5) {
      fprintf(stderr, "  input %ld:", it);
      for (size_t i = 0; i < n && i < 64; i++) fprintf(stderr, " %02x", buf[i]);
      fprintf(stderr, "\n");
    }
    accepted += r == 1;
    refused += r == 0;
  }
  for (int i = 0; i < nseeds; i++) free(seeds[i].p);
  printf("fuzz_store_wire: %ld inputs, %ld accepted, %ld refused, %d problems\n", iterations,
         accepted, refused, problems);
  /* Both outcomes must be common, or the mutations test nothing. */
  if (iterations >= 10000 && (accepted < iterations / 50 || refused < iterations / 10)) {
    fprintf(stderr, "fuzz_store_wire: too few accepted or refused inputs\n");
    return 1;
  }
  return problems ? 1 : 0;
}
#endif
