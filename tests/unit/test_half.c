/* test_half.c — kernels/common/half.h against references written here.
 *
 * The references work in double precision and share no code or bit tricks
 * with half.h: a binary format with p significant bits is decoded as
 * (1 + m/2^(p-1))·2^(e-bias) (or m·2^(emin-p+1) for subnormals), and a float
 * is rounded by dividing by the ulp of its binade and rint() (ties to even).
 * - every one of the 65536 bf16 and fp16 patterns decodes to the reference
 *   value and encodes back to itself (a NaN stays a NaN);
 * - around every pattern, the exact tie with the next one and the floats
 *   next to it round as the reference does, ties to the even pattern;
 * - a few million random float bit patterns round as the reference does;
 * - known values (1, pi, max, overflow, the smallest subnormals).
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "half.h"
#include "mt_check.h"

/* A 16-bit binary format: bf16 (8 exponent bits, 7 mantissa) or fp16 (5, 10). */
typedef struct {
  const char *name;
  int ebits, mbits;
} format;

static const format BF16 = {"bf16", 8, 7}, FP16 = {"fp16", 5, 10};

static int bias(const format *f) { return (1 << (f->ebits - 1)) - 1; }

static double ref_decode(const format *f, uint16_t bits) {
  int sign = bits >> 15, e = (bits >> f->mbits) & ((1 << f->ebits) - 1);
  int m = bits & ((1 << f->mbits) - 1);
  double v;
  if (e == (1 << f->ebits) - 1)
    v = m ? NAN : INFINITY;
  else if (e == 0)
    v = ldexp((double)m, 1 - bias(f) - f->mbits);
  else
    v = ldexp(1.0 + ldexp((double)m, -f->mbits), e - bias(f));
  return sign ? -v : v;
}

/* x rounded to the format, ties to even, overflow to infinity. */
static double ref_round(const format *f, double x) {
  if (isnan(x) || isinf(x) || x == 0.0) return x;
  int emin = 1 - bias(f), emax = bias(f), e;
  frexp(fabs(x), &e);
  int lead = e - 1 < emin ? emin : e - 1; /* exponent of the result's leading bit */
  double ulp = ldexp(1.0, lead - f->mbits);
  double v = rint(fabs(x) / ulp) * ulp; /* exact division by a power of two */
  if (v >= ldexp(1.0, emax + 1)) v = INFINITY;
  return copysign(v, x);
}

static uint16_t encode(const format *f, float x) {
  return f == &BF16 ? mt_f32_to_bf16(x).bits : mt_f32_to_fp16(x).bits;
}

static float decode(const format *f, uint16_t bits) {
  if (f == &BF16) {
    mt_bf16 h = {bits};
    return mt_bf16_to_f32(h);
  }
  mt_fp16 h = {bits};
  return mt_fp16_to_f32(h);
}

/* Same value and sign (so -0 != +0), or both NaN. */
static int same(double a, double b) {
  if (isnan(a) || isnan(b)) return isnan(a) && isnan(b);
  return a == b && signbit(a) == signbit(b);
}

static int test_all_patterns_decode_to_reference_and_round_trip(const format *f) {
  int bad = 0;
  for (uint32_t b = 0; b < 65536; b++) {
    float x = decode(f, (uint16_t)b);
    double ref = ref_decode(f, (uint16_t)b);
    if (!same(x, ref) && bad++ < 5)
      CHECK(0, "%s 0x%04x decodes to %.9g, reference %.9g", f->name, b, x, ref);
    uint16_t back = encode(f, x);
    int ok = isnan(ref) ? isnan(decode(f, back)) : back == b;
    if (!ok && bad++ < 5) CHECK(0, "%s 0x%04x -> %.9g -> 0x%04x", f->name, b, x, back);
  }
  CHECK(!bad, "%s: %d of 65536 patterns wrong", f->name, bad);
  return bad;
}

static int check_point(const format *f, float x, int *bad) {
  uint16_t h = encode(f, x);
  double got = decode(f, h), ref = ref_round(f, x);
  if (!same(got, ref)) {
    if ((*bad)++ < 5)
      CHECK(0, "%s: %.9g (0x%08x) -> 0x%04x = %.9g, reference %.9g", f->name, x, mt_f32_bits(x), h,
            got, ref);
    return 0;
  }
  return 1;
}

/* Around each finite pattern v with successor w: v, the exact midpoint (a tie,
 * which must land on the even pattern), the floats either side of it, and w
 * itself; negative patterns too. */
static int test_ties_round_to_even(const format *f) {
  int bad = 0, ties = 0;
  uint16_t inf = (uint16_t)(((1 << f->ebits) - 1) << f->mbits);
  for (uint32_t b = 0; b < inf; b++) {
    for (int neg = 0; neg < 2; neg++) {
      uint16_t lo = (uint16_t)(b | (neg ? 0x8000u : 0u));
      double v = ref_decode(f, lo);
      /* past the largest finite value the next step is 2^(emax+1), the overflow point */
      double w =
          b + 1 == inf ? copysign(ldexp(1.0, bias(f) + 1), v) : ref_decode(f, (uint16_t)(lo + 1));
      double mid = (v + w) / 2;
      float m = (float)mid;
      if ((double)m != mid) {
        CHECK(0, "%s: midpoint %.17g not a float", f->name, mid);
        bad++;
        continue;
      }
      check_point(f, (float)v, &bad);
      check_point(f, m, &bad);
      check_point(f, nextafterf(m, 0.0f), &bad);
      check_point(f, nextafterf(m, neg ? -INFINITY : INFINITY), &bad);
      if (!isinf(w)) check_point(f, (float)w, &bad);
      uint16_t t = encode(f, m);
      if ((t & 1u) && (t & 0x7FFFu) != inf && bad++ < 5)
        CHECK(0, "%s: tie %.9g went to odd pattern 0x%04x", f->name, m, t);
      ties++;
    }
  }
  CHECK(!bad, "%s: %d of %d neighbourhoods wrong", f->name, bad, ties);
  return bad;
}

static uint64_t rng = 0x1234abcd9876ull;
static uint32_t rand32(void) {
  uint64_t z = (rng += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return (uint32_t)(z ^ (z >> 31));
}

/* Uniform bit patterns cover every exponent, NaNs and float subnormals
 * included; a second sweep keeps to the format's own range, where most
 * rounding happens. */
static int test_random_floats_match_reference(const format *f) {
  int bad = 0;
  for (int i = 0; i < 2000000; i++) {
    float x = mt_f32_from_bits(rand32());
    if (isnan(x)) {
      if (!isnan(decode(f, encode(f, x))) && bad++ < 5)
        CHECK(0, "%s: NaN 0x%08x lost", f->name, mt_f32_bits(x));
      continue;
    }
    check_point(f, x, &bad);
  }
  for (int i = 0; i < 2000000; i++) {
    int e = f == &FP16 ? (int)(rand32() % 44) - 27 : (int)(rand32() % 270) - 140;
    float x = ldexpf(1.0f + (float)(rand32() >> 9) * 0x1p-23f, e) * (rand32() & 1 ? -1.0f : 1.0f);
    check_point(f, x, &bad);
  }
  CHECK(!bad, "%s: %d random floats wrong", f->name, bad);
  return bad;
}

static int test_known_values(void) {
  static const struct {
    float x;
    uint16_t bf16, fp16;
  } k[] = {
      {1.0f, 0x3F80, 0x3C00},           {-2.0f, 0xC000, 0xC000},       {0.0f, 0x0000, 0x0000},
      {-0.0f, 0x8000, 0x8000},          {3.14159274f, 0x4049, 0x4248}, {0.1f, 0x3DCD, 0x2E66},
      {1.0f / 3.0f, 0x3EAB, 0x3555},    {1.00390625f, 0x3F80, 0x3C04}, /* 1 + 2^-8: a bf16 tie, down
                                                                          to even */
      {1.01171875f, 0x3F82, 0x3C0C},    /* 1 + 3·2^-8: a bf16 tie, up to even */
      {1.00048828125f, 0x3F80, 0x3C00}, /* 1 + 2^-11: an fp16 tie, down to even */
      {1.00146484375f, 0x3F80, 0x3C02}, /* 1 + 3·2^-11: an fp16 tie, up to even */
      {65504.0f, 0x4780, 0x7BFF},       /* fp16 max */
      {65519.996f, 0x4780, 0x7BFF},     /* just under max + half an ulp */
      {65520.0f, 0x4780, 0x7C00},       /* the tie at max + half an ulp goes to inf */
      {1e10f, 0x5015, 0x7C00},          {FLT_MAX, 0x7F80, 0x7C00},  /* bf16 overflows to inf too */
      {3.38953139e38f, 0x7F7F, 0x7C00},                             /* bf16 max */
      {-INFINITY, 0xFF80, 0xFC00},      {0x1p-14f, 0x3880, 0x0400}, /* fp16 min normal */
      {0x1p-24f, 0x3380, 0x0001},                                   /* fp16 min subnormal */
      {0x1p-25f, 0x3300, 0x0000},                                   /* a tie with zero: even */
      {0x1.8p-25f, 0x3340, 0x0001},     {0x3p-25f, 0x33C0, 0x0002}, /* 1.5 subnormal ulps: a tie, up
                                                                       to even */
      {0x1p-126f, 0x0080, 0x0000},                                  /* float min normal */
      {0x1p-149f, 0x0000, 0x0000}, /* float min subnormal: rounds to bf16 zero */
      {0x1p-133f, 0x0001, 0x0000}, /* bf16 min subnormal */
      {0x3p-134f, 0x0002, 0x0000}, /* 1.5 bf16 subnormal ulps: up to even */
  };
  int bad = 0;
  for (size_t i = 0; i < sizeof k / sizeof k[0]; i++) {
    uint16_t b = mt_f32_to_bf16(k[i].x).bits, h = mt_f32_to_fp16(k[i].x).bits;
    if (b != k[i].bf16 || h != k[i].fp16) {
      CHECK(0, "%.9g: bf16 0x%04x (want 0x%04x), fp16 0x%04x (want 0x%04x)", k[i].x, b, k[i].bf16,
            h, k[i].fp16);
      bad++;
    }
  }
  /* NaN payloads that sit only in the bits rounding removes must stay NaN */
  static const uint32_t nans[] = {0x7F800001u, 0xFF800001u, 0x7F801000u, 0x7FC00000u, 0x7FFFFFFFu};
  for (size_t i = 0; i < sizeof nans / sizeof nans[0]; i++) {
    float x = mt_f32_from_bits(nans[i]);
    mt_bf16 b = mt_f32_to_bf16(x);
    mt_fp16 h = mt_f32_to_fp16(x);
    if (!isnan(mt_bf16_to_f32(b)) || !isnan(mt_fp16_to_f32(h)) ||
        (b.bits >> 15) != (nans[i] >> 31)) {
      CHECK(0, "NaN 0x%08x -> bf16 0x%04x, fp16 0x%04x", nans[i], b.bits, h.bits);
      bad++;
    }
  }
  return bad;
}

int main(void) {
  const format *fs[] = {&BF16, &FP16};
  for (int i = 0; i < 2; i++) {
    test_all_patterns_decode_to_reference_and_round_trip(fs[i]);
    test_ties_round_to_even(fs[i]);
    test_random_floats_match_reference(fs[i]);
  }
  test_known_values();
  printf("test_half: %s\n", failures ? "FAILED" : "ok");
  return failures ? 1 : 0;
}
