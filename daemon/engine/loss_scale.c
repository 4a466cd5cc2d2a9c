/* loss_scale.c — Megatron's DynamicGradScaler.update() as a state machine. */
#include "loss_scale.h"

#include <math.h>
#include <string.h>

#include "err.h"

mt_loss_scale_opts mt_loss_scale_defaults(void) {
  mt_loss_scale_opts o = {65536.0f, 1.0f, 2.0f, 0.5f, 1000, 2, 0};
  return o;
}

static int positive(float x) { return isfinite(x) && x > 0.0f; }

int mt_loss_scale_init(mt_loss_scale *s, const mt_loss_scale_opts *o) {
  memset(s, 0, sizeof *s);
  mt_loss_scale_opts d = o ? *o : mt_loss_scale_defaults();
  if (!positive(d.initial)) return mt_seterr(MT_EINVAL, "loss scale: initial %g", d.initial);
  if (!positive(d.min) || d.min > d.initial)
    return mt_seterr(MT_EINVAL, "loss scale: min %g (want 0 < min <= initial %g)", d.min,
                     d.initial);
  if (!positive(d.growth_factor) || d.growth_factor <= 1.0f)
    return mt_seterr(MT_EINVAL, "loss scale: growth_factor %g (want > 1)", d.growth_factor);
  if (!positive(d.backoff_factor) || d.backoff_factor >= 1.0f)
    return mt_seterr(MT_EINVAL, "loss scale: backoff_factor %g (want in (0, 1))", d.backoff_factor);
  if (d.growth_interval < 1)
    return mt_seterr(MT_EINVAL, "loss scale: growth_interval %d (want >= 1)", d.growth_interval);
  if (d.hysteresis < 1)
    return mt_seterr(MT_EINVAL, "loss scale: hysteresis %d (want >= 1)", d.hysteresis);
  s->o = d;
  s->scale = d.initial;
  s->hysteresis_tracker = d.hysteresis;
  return 0;
}

/* Megatron: an overflow zeroes the growth tracker and uses up one unit of
 * hysteresis; once none is left (the tracker stays <= 0 until the next
 * growth), every overflow backs off, down to min. A clean step counts
 * towards growth; `interval` of them in a row grow the scale and restore the
 * hysteresis. The optimizer skips every overflowed step whatever the scale
 * did. */
int mt_loss_scale_update(mt_loss_scale *s, int found_inf) {
  s->steps++;
  if (s->o.fixed) { /* the scale never moves: only the skips are counted */
    s->skipped += found_inf;
    s->skipped_in_row = found_inf ? s->skipped_in_row + 1 : 0;
    return found_inf;
  }
  if (found_inf) {
    s->growth_tracker = 0;
    s->hysteresis_tracker--;
    if (s->hysteresis_tracker <= 0) {
      float next = s->scale * s->o.backoff_factor;
      s->scale = next > s->o.min ? next : s->o.min;
    }
    s->skipped++;
    s->skipped_in_row++;
    return 1;
  }
  s->skipped_in_row = 0;
  s->growth_tracker++;
  if (s->growth_tracker == s->o.growth_interval) {
    s->growth_tracker = 0;
    s->hysteresis_tracker = s->o.hysteresis;
    s->scale *= s->o.growth_factor;
  }
  return 0;
}

/* An IEEE float is inf or NaN exactly when its exponent bits are all ones.
 * Or-ing a flag per element (integer ops, no branch) lets GCC vectorise. */
int mt_loss_scale_check_finite(const float *g, size_t n) {
  uint32_t bad = 0;
  for (size_t i = 0; i < n; i++) {
    uint32_t u;
    memcpy(&u, &g[i], sizeof u);
    bad |= (u & 0x7F800000u) == 0x7F800000u;
  }
  return !bad;
}
