/* loss_scale.h — dynamic loss scaling for fp16 training, as Megatron's
 * DynamicGradScaler (megatron/core/optimizer/grad_scaler.py).
 *
 * A pure state machine: the engine multiplies the loss by `scale`, checks the
 * gradients for a value out of fp16's range (ops fits_fp16; agreeing on the
 * answer across ranks), then calls mt_loss_scale_update() once per step. A
 * step whose gradients overflowed is skipped, always; the scale backs off only
 * once `hysteresis` overflows have been seen since the last growth, and grows
 * after `growth_interval` clean steps in a row. No device, no allocation.
 */
#ifndef MT_LOSS_SCALE_H
#define MT_LOSS_SCALE_H

#include <stddef.h>
#include <stdint.h>

typedef struct mt_loss_scale_opts {
  float initial;        /* first scale: 2^16 by default (Megatron's flag default is 2^32) */
  float min;            /* backoff never goes below this: 1 */
  float growth_factor;  /* 2 */
  float backoff_factor; /* 0.5 */
  int growth_interval;  /* clean steps in a row before growing: 1000 (--loss-scale-window) */
  int hysteresis;       /* overflows tolerated before backing off: 2 */
  int fixed;            /* a static scale (Megatron's --loss-scale, its ConstantGradScaler):
                           it stays at initial; an overflowed step is still skipped */
} mt_loss_scale_opts;

typedef struct mt_loss_scale {
  mt_loss_scale_opts o;
  float scale;
  int growth_tracker;     /* clean steps since the last overflow or growth */
  int hysteresis_tracker; /* starts at hysteresis; <= 0 means every overflow backs off */
  int64_t steps;          /* updates seen */
  int64_t skipped;        /* steps skipped for overflow, in all */
  int64_t skipped_in_row; /* overflows since the last clean step */
} mt_loss_scale;

/* Megatron's defaults, except initial = 2^16. */
mt_loss_scale_opts mt_loss_scale_defaults(void);

/* Starts at o->initial (o NULL: the defaults). MT_EINVAL, naming the field,
 * for a scale or factor that is not positive and finite, min above initial,
 * growth_factor <= 1, backoff_factor outside (0, 1), interval or hysteresis < 1. */
int mt_loss_scale_init(mt_loss_scale *s, const mt_loss_scale_opts *o);

/* Takes one step's verdict (found_inf: any rank saw inf or NaN in its
 * gradients) and returns 1 when the step must be skipped, else 0. */
int mt_loss_scale_update(mt_loss_scale *s, int found_inf);

/* 1 when all n values are finite (no inf, no NaN). Reads every value, no
 * early exit, so the loop vectorises. */
int mt_loss_scale_check_finite(const float *g, size_t n);

#endif
