/* lr.c — Megatron's schedules (OptimizerParamScheduler): get_lr, linear
 * warmup from warmup_init (0) to peak over warmup steps, then cosine (or
 * linear) decay from peak to min over the rest of the decay steps, then min;
 * inverse-square-root (peak * sqrt(warmup / step), not below min); WSD
 * (warmup, stable at peak, then its own decay over the last wsd_decay_steps
 * of the decay). get_wd: the weight decay from start to end over the run. */
#include "lr.h"

#include <math.h>

double mt_lr_at(const mt_lr_spec *s, double done) {
  if (s->warmup_steps > 0 && done <= (double)s->warmup_steps)
    return s->warmup_init + (s->peak - s->warmup_init) * done / (double)s->warmup_steps;
  if (s->kind == MT_LR_CONSTANT) return s->peak;
  if (done > (double)s->decay_steps && s->kind != MT_LR_COSINE && s->kind != MT_LR_LINEAR)
    return s->min;
  if (s->kind == MT_LR_INVERSE_SQRT) {
    double w = s->warmup_steps > 1 ? (double)s->warmup_steps : 1.0, n = done > 1.0 ? done : 1.0;
    double lr = s->peak * sqrt(w) / sqrt(n);
    return lr > s->min ? lr : s->min;
  }
  if (s->kind == MT_LR_WSD) {
    double anneal = (double)(s->decay_steps - s->wsd_decay_steps), coeff = 1.0;
    if (done > anneal) {
      double r = (done - anneal) / (double)s->wsd_decay_steps;
      coeff = s->wsd_style == MT_WSD_COSINE        ? 0.5 * (cos(M_PI * r) + 1.0)
              : s->wsd_style == MT_WSD_EXPONENTIAL ? 2.0 * pow(0.5, r) - 1.0
              : s->wsd_style == MT_WSD_MINUS_SQRT  ? 1.0 - sqrt(r)
                                                   : 1.0 - r;
    }
    return s->min + coeff * (s->peak - s->min);
  }
  int64_t span = s->decay_steps - s->warmup_steps;
  if (span <= 0 || done >= (double)s->decay_steps) return s->min;
  double ratio = (done - (double)s->warmup_steps) / (double)span;
  double coeff = s->kind == MT_LR_COSINE ? 0.5 * (cos(M_PI * ratio) + 1.0) : 1.0 - ratio;
  return s->min + coeff * (s->peak - s->min);
}

double mt_wd_at(const mt_wd_spec *w, double done) {
  if (w->style == MT_WD_CONSTANT || w->incr_steps <= 0 || done > (double)w->incr_steps)
    return w->end;
  double ratio = done / (double)w->incr_steps;
  double coeff = w->style == MT_WD_COSINE ? 0.5 * (cos(M_PI * (1.0 - ratio)) + 1.0) : ratio;
  return w->start + coeff * (w->end - w->start);
}
