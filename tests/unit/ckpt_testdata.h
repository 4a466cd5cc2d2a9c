/* ckpt_testdata.h — the checkpoint tests' data: every float a pure function
 * of (step, shard, array, index), so a reader checks what it got without the
 * writer's buffers (test_ckpt, ckpt_writer, test_ckpt_crash). */
#ifndef CKPT_TESTDATA_H
#define CKPT_TESTDATA_H

#include <stdint.h>
#include <stdlib.h>

static const char *const ckpt_test_arrays[3] = {"master", "adam_m", "adam_v"};

/* A float in [-0.5, 0.5) with 24 significant bits, so fp32 holds it exactly. */
static inline float ckpt_test_value(int64_t step, int tp, int pp, int a, uint64_t i) {
  uint64_t x = (uint64_t)step * 0x9e3779b97f4a7c15ull ^ (uint64_t)tp << 52 ^ (uint64_t)pp << 40 ^
               (uint64_t)a << 36 ^ i;
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ull;
  x ^= x >> 33;
  return (float)(x >> 40) / 16777216.0f - 0.5f;
}

/* floats [lo, lo+n) of array a of shard (tp, pp) at step; caller frees. */
static inline float *ckpt_test_slice(int64_t step, int tp, int pp, int a, uint64_t lo, uint64_t n) {
  float *v = malloc((n ? n : 1) * sizeof *v);
  if (!v) return NULL;
  for (uint64_t i = 0; i < n; i++) v[i] = ckpt_test_value(step, tp, pp, a, lo + i);
  return v;
}

#endif
