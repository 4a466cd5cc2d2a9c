/* wload.h — one element of a weight matrix, as the float it holds, from
 * fp32, bf16 or binary16 storage (ops.h's mt_dtype).
 *
 * A 16-bit job's working copy of the weights is stored in 16 bits, and an op
 * computes with the float each element holds: every backend reads them
 * through this one definition, so a lookup gives the same bits on all of
 * them. The type is uniform over a launch, so the branch never diverges.
 */
#ifndef MT_WLOAD_H
#define MT_WLOAD_H

#include <stddef.h>
#include <stdint.h>

#include "half.h"
#include "hostdev.h"
#include "ops.h"

static inline MT_HD float mt_load_w(const void *w, mt_dtype t, size_t i) {
  if (t == MT_F32) return ((const float *)w)[i];
  return mt_half_unpack(((const uint16_t *)w)[i], t == MT_F16);
}

#endif
