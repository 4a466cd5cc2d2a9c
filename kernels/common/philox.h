/* philox.h — counter-based random numbers (Philox4x32-10, Salmon et al. 2011).
 *
 * The determinism rule of DESIGN.md rests on this: a random value is a pure
 * function of (key, counter), so any shard, rank, layout or backend computes
 * the same value for the same tensor element without sharing state. Header
 * only, static inline, callable from host and device code.
 */
#ifndef MT_PHILOX_H
#define MT_PHILOX_H

#include <stdint.h>

#include "hostdev.h"

typedef struct {
  uint32_t v[4];
} mt_philox_out;

static inline MT_HD mt_philox_out mt_philox4x32(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                                uint64_t key) {
  uint32_t k0 = (uint32_t)key, k1 = (uint32_t)(key >> 32);
  for (int r = 0; r < 10; r++) {
    uint64_t p0 = (uint64_t)0xD2511F53u * c0;
    uint64_t p1 = (uint64_t)0xCD9E8D57u * c2;
    uint32_t hi0 = (uint32_t)(p0 >> 32), lo0 = (uint32_t)p0;
    uint32_t hi1 = (uint32_t)(p1 >> 32), lo1 = (uint32_t)p1;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  mt_philox_out o = {{c0, c1, c2, c3}};
  return o;
}

/* splitmix64 finaliser: a well-mixed 64-bit hash step. */
static inline MT_HD uint64_t mt_mix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

/* Key of a named stream under a seed: FNV-1a of the name, mixed with the seed.
 * Parameter "h.3.attn.c_attn.weight" under seed 1234 has one key everywhere. */
static inline uint64_t mt_philox_key(uint64_t seed, const char *name) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (const unsigned char *p = (const unsigned char *)name; *p; p++) {
    h ^= *p;
    h *= 0x100000001b3ull;
  }
  return mt_mix64(h ^ mt_mix64(seed));
}

/* One 32-bit Philox output as a uniform in [0, 1) with 24 random bits. */
static inline MT_HD float mt_philox_u01(uint32_t r) {
  return (float)(r >> 8) * (1.0f / 16777216.0f);
}

/* The Philox block of elements 4·blk .. 4·blk+3 of sample s. */
static inline MT_HD mt_philox_out mt_philox_block(uint64_t key, uint64_t sample, uint64_t blk) {
  return mt_philox4x32((uint32_t)blk, (uint32_t)(blk >> 32), (uint32_t)sample,
                       (uint32_t)(sample >> 32), key);
}

/* Uniform in [0, 1) with 24 random bits, for element e of sample s. Four
 * consecutive elements share one Philox block. */
static inline MT_HD float mt_philox_uniform(uint64_t key, uint64_t sample, uint64_t e) {
  mt_philox_out o = mt_philox_block(key, sample, e >> 2);
  return mt_philox_u01(o.v[e & 3]);
}

/* Standard normal for element e of a tensor (Box-Muller over one Philox
 * block; elements 2j and 2j+1 are the pair's two outputs). Double precision so
 * every backend and shard agrees to the last bit after rounding to float. */
static inline double mt_philox_normal(uint64_t key, uint64_t e) {
  uint64_t blk = e >> 1;
  mt_philox_out o = mt_philox4x32((uint32_t)blk, (uint32_t)(blk >> 32), 0, 0, key);
  /* two 53-bit uniforms; u1 in (0, 1] so log is finite */
  uint64_t a = ((uint64_t)o.v[0] << 21) ^ (o.v[1] >> 11);
  uint64_t b = ((uint64_t)o.v[2] << 21) ^ (o.v[3] >> 11);
  double u1 = ((double)(a & ((1ull << 53) - 1)) + 1.0) * (1.0 / 9007199254740992.0);
  double u2 = (double)(b & ((1ull << 53) - 1)) * (1.0 / 9007199254740992.0);
  double r = __builtin_sqrt(-2.0 * __builtin_log(u1));
  double th = 6.283185307179586476925286766559 * u2;
  return (e & 1) ? r * __builtin_sin(th) : r * __builtin_cos(th);
}

#endif
