/* half.h — bf16 and fp16 storage types and their conversions to and from float.
 *
 * Storage only: arithmetic happens in float. float -> half rounds to nearest,
 * ties to even, keeps subnormals (no flush to zero), keeps a NaN a NaN
 * (quieted, sign kept) and sends fp16 overflow to infinity: what PyTorch,
 * NumPy and the CUDA intrinsics do, so a tensor converted on the host or on a
 * GPU has the same bits. Integer arithmetic only, so results never depend on
 * the FPU's modes (flush-to-zero, denormals-are-zero).
 */
#ifndef MT_HALF_H
#define MT_HALF_H

#include <stdint.h>

#include "hostdev.h"

/* Structs, not bare uint16_t: the compiler refuses to mix them with integers
 * or with each other. */
typedef struct {
  uint16_t bits;
} mt_bf16; /* 1 sign, 8 exponent, 7 mantissa */
typedef struct {
  uint16_t bits;
} mt_fp16; /* 1 sign, 5 exponent, 10 mantissa (IEEE binary16) */

static inline MT_HD uint32_t mt_f32_bits(float f) {
  union {
    float f;
    uint32_t u;
  } v;
  v.f = f;
  return v.u;
}

static inline MT_HD float mt_f32_from_bits(uint32_t u) {
  union {
    float f;
    uint32_t u;
  } v;
  v.u = u;
  return v.f;
}

/* bf16 is the upper half of a float: round the lower 16 bits away, ties to
 * even. A carry out of the mantissa bumps the exponent, which is the right
 * answer, up to infinity for values at or past max + half an ulp. */
static inline MT_HD mt_bf16 mt_f32_to_bf16(float f) {
  uint32_t u = mt_f32_bits(f);
  mt_bf16 h;
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) { /* NaN: rounding could carry it into inf */
    h.bits = (uint16_t)((u >> 16) | 0x0040u);
    return h;
  }
  u += 0x7FFFu + ((u >> 16) & 1u);
  h.bits = (uint16_t)(u >> 16);
  return h;
}

static inline MT_HD float mt_bf16_to_f32(mt_bf16 h) {
  return mt_f32_from_bits((uint32_t)h.bits << 16);
}

/* float -> binary16. Normal results rebias the exponent and round 13
 * mantissa bits away; results below 2^-14 are multiples of 2^-24 rounded from
 * the float's full 24-bit significand. */
static inline MT_HD mt_fp16 mt_f32_to_fp16(float f) {
  uint32_t u = mt_f32_bits(f);
  uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7FFFFFFFu;
  mt_fp16 h;
  if (a > 0x7F800000u) { /* NaN: quiet, keep the top of the payload */
    h.bits = (uint16_t)(sign | 0x7E00u | ((a >> 13) & 0x3FFu));
  } else if (a >= 0x477FF000u) { /* >= 65520 = 65504 + half an ulp (a tie that goes to even: inf) */
    h.bits = (uint16_t)(sign | 0x7C00u);
  } else if (a >= 0x38800000u) {  /* normal: >= 2^-14 */
    uint32_t r = a - 0x38000000u; /* exponent bias 127 -> 15 */
    r += 0xFFFu + ((r >> 13) & 1u);
    h.bits = (uint16_t)(sign | (r >> 13));
  } else if (a > 0x33000000u) { /* subnormal: (2^-25, 2^-14) */
    uint32_t e = a >> 23, man = (a & 0x7FFFFFu) | 0x800000u;
    uint32_t s = 126u - e; /* value / 2^-24 = man >> s, 14 <= s <= 24 */
    uint32_t q = man >> s, rem = man & ((1u << s) - 1u), half = 1u << (s - 1u);
    if (rem > half || (rem == half && (q & 1u))) q++; /* q = 0x400 is 2^-14: still right */
    h.bits = (uint16_t)(sign | q);
  } else { /* at most 2^-25 (a tie with 0 at exactly 2^-25): zero */
    h.bits = (uint16_t)sign;
  }
  return h;
}

static inline MT_HD float mt_fp16_to_f32(mt_fp16 h) {
  uint32_t sign = (uint32_t)(h.bits & 0x8000u) << 16;
  uint32_t exp = (h.bits >> 10) & 0x1Fu, man = h.bits & 0x3FFu;
  uint32_t u;
  if (exp == 0x1Fu) { /* inf, NaN (payload kept, so a NaN stays a NaN) */
    u = sign | 0x7F800000u | (man << 13);
  } else if (exp) {
    u = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man) { /* subnormal: normalise, man * 2^-24 */
    uint32_t e = 113u;
    while (!(man & 0x400u)) {
      man <<= 1;
      e--;
    }
    u = sign | (e << 23) | ((man & 0x3FFu) << 13);
  } else {
    u = sign;
  }
  return mt_f32_from_bits(u);
}

/* f rounded to nearest even into bf16 (fp16 != 0: binary16) and back: the
 * value a 16-bit copy of f holds, as a float. */
static inline MT_HD float mt_round_half(float f, int fp16) {
  return fp16 ? mt_fp16_to_f32(mt_f32_to_fp16(f)) : mt_bf16_to_f32(mt_f32_to_bf16(f));
}

/* The 16 bits of f rounded to nearest even into bf16 (fp16 != 0:
 * binary16): how a kept activation is stored. */
static inline MT_HD uint16_t mt_half_pack(float f, int fp16) {
  return fp16 ? mt_f32_to_fp16(f).bits : mt_f32_to_bf16(f).bits;
}

/* The float 16 stored bits hold (bf16, or binary16 when fp16 != 0). */
static inline MT_HD float mt_half_unpack(uint16_t bits, int fp16) {
  if (fp16) {
    mt_fp16 h = {bits};
    return mt_fp16_to_f32(h);
  }
  mt_bf16 h = {bits};
  return mt_bf16_to_f32(h);
}

/* A value of a 16-bit job's residual stream: f rounded to bf16 (fp16 1:
 * binary16), its 16 bits stored in *h unless h is NULL, and the rounded
 * value returned as a float; fp16 < 0: f as it is (an fp32 job). What
 * pack_half (or round_half without h) makes of f. */
static inline MT_HD float mt_half_keep(float f, uint16_t *h, int fp16) {
  if (fp16 < 0) return f;
  uint16_t bits = mt_half_pack(f, fp16);
  if (h) *h = bits;
  return mt_half_unpack(bits, fp16);
}

/* 1 when f does not survive fp16: NaN, infinite, or at least 65520 in
 * magnitude (which rounds to infinity). A scaled gradient like that is an
 * overflow in the loss scaler's terms. */
static inline MT_HD int mt_fp16_overflows(float f) {
  return (mt_f32_bits(f) & 0x7FFFFFFFu) >= 0x477FF000u;
}

#endif
