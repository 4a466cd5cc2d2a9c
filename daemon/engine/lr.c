/* lr.c — Megatron's schedule (OptimizerParamScheduler.get_lr): linear warmup
 * from 0 to peak over warmup steps, then cosine (or linear) decay from peak
 * to min over the rest of the decay steps, then min. */
#include "lr.h"

#include <math.h>

double mt_lr_at(const mt_lr_spec *s, double done) {
  if (s->warmup_steps > 0 && done <= (double)s->warmup_steps)
    return s->peak * done / (double)s->warmup_steps;
  if (s->kind == MT_LR_CONSTANT) return s->peak;
  int64_t span = s->decay_steps - s->warmup_steps;
  if (span <= 0 || done >= (double)s->decay_steps) return s->min;
  double ratio = (done - (double)s->warmup_steps) / (double)span;
  double coeff = s->kind == MT_LR_COSINE ? 0.5 * (cos(M_PI * ratio) + 1.0) : 1.0 - ratio;
  return s->min + coeff * (s->peak - s->min);
}
