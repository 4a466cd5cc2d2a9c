/* mtmath.h — element-wise math shared by every backend.
 *
 * One definition of each formula, static inline and host+device, so the CPU
 * tests cover exactly what the CUDA kernels compute.
 */
#ifndef MT_KMATH_H
#define MT_KMATH_H

#include <math.h>

#include "philox.h"

#define MT_GELU_SCALE 0.7978845608028654f /* sqrt(2/pi) */

/* GeLU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x³))) */
static inline MT_HD float mt_gelu(float x) {
  float u = MT_GELU_SCALE * (x + 0.044715f * x * x * x);
  return 0.5f * x * (1.0f + tanhf(u));
}

/* d gelu / dx */
static inline MT_HD float mt_gelu_grad(float x) {
  float x2 = x * x;
  float u = MT_GELU_SCALE * (x + 0.044715f * x2 * x);
  float th = tanhf(u);
  float sech2 = 1.0f - th * th;
  return 0.5f * (1.0f + th) + 0.5f * x * sech2 * MT_GELU_SCALE * (1.0f + 3.0f * 0.044715f * x2);
}

/* A cross-entropy row whose target is negative (MT_TARGET_IGNORE, ops.h)
 * is left out of the loss: its loss and its whole gradient row are 0
 * (Megatron's loss mask, --eod-mask-loss). */
static inline MT_HD int mt_target_ignored(int target) { return target < 0; }

/* Dropout keep-scale of one element: 0 or 1/(1-p). */
static inline MT_HD float mt_dropout_scale(float p, uint64_t key, uint64_t sample, uint64_t e) {
  return mt_philox_uniform(key, sample, e) >= p ? 1.0f / (1.0f - p) : 0.0f;
}

/* Keep-scale of an element whose Philox output (one lane of its block) is r:
 * mt_dropout_scale(p, key, s, e) == mt_dropout_keep(p, mt_philox_block(key, s,
 * e >> 2).v[e & 3]). Kernels that walk four consecutive elements draw the
 * block once. */
static inline MT_HD float mt_dropout_keep(float p, uint32_t r) {
  return mt_philox_u01(r) >= p ? 1.0f / (1.0f - p) : 0.0f;
}

/* AdamW's bias correction 1 - beta^t, computed on the host in double and
 * rounded once, so every backend passes the kernels the same float. */
static inline float mt_adamw_bias_correction(float beta, int t) {
  return (float)(1.0 - pow((double)beta, (double)t));
}

/* One AdamW update of one element; returns the new parameter value. */
static inline MT_HD float mt_adamw_update(float p, float g, float *m, float *v, float lr,
                                          float beta1, float beta2, float eps, float wd, float bc1,
                                          float bc2) {
  float mm = beta1 * *m + (1.0f - beta1) * g;
  float vv = beta2 * *v + (1.0f - beta2) * g * g;
  *m = mm;
  *v = vv;
  float mhat = mm / bc1, vhat = vv / bc2;
  return p - lr * (mhat / (sqrtf(vhat) + eps) + wd * p);
}

#endif
