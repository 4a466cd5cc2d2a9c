/* optim.c — AdamW with decoupled weight decay and global-norm clipping. */
#include "optim.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "err.h"

int mt_adamw_create(mt_adamw *o, const mt_gpt *model, size_t lo, size_t n, double beta1,
                    double beta2, double eps, double weight_decay) {
  memset(o, 0, sizeof *o);
  o->beta1 = beta1;
  o->beta2 = beta2;
  o->eps = eps;
  o->weight_decay = weight_decay;
  o->dev = model->dev;
  o->lo = lo;
  o->n = n;
  o->m = mt_device_alloc(o->dev, o->n * sizeof(float));
  o->v = o->m ? mt_device_alloc(o->dev, o->n * sizeof(float)) : NULL;
  o->slices = calloc((size_t)model->n_tensors + 1, sizeof *o->slices);
  if (!o->v || !o->slices) {
    mt_adamw_destroy(o);
    return mt_wraperr(MT_ENOMEM, "adamw: moments for %zu parameters", n);
  }
  return 0;
}

void mt_adamw_destroy(mt_adamw *o) {
  if (o->dev) {
    mt_device_free(o->dev, o->m);
    mt_device_free(o->dev, o->v);
  }
  free(o->slices);
  memset(o, 0, sizeof *o);
}

double mt_clip_scale(double norm, double max_norm) {
  if (max_norm <= 0.0 || !(norm > max_norm)) return 1.0;
  return max_norm / (norm + 1e-6);
}

int mt_adamw_step(mt_adamw *o, mt_gpt *model, const float *grad, double lr, double grad_scale) {
  mt_device *d = o->dev;
  size_t lo = o->lo, hi = o->lo + o->n;
  o->t++;
  int n = 0;
  for (int i = 0; i < model->n_tensors; i++) {
    const mt_param *t = &model->params_table[i];
    size_t a, b;
    if (!mt_param_overlap(t, lo, hi, &a, &b)) continue; /* tensor outside this slice */
    o->slices[n++] = (mt_adamw_slice){.param = model->params + a,
                                      .grad = grad + (a - lo),
                                      .m = o->m + (a - lo),
                                      .v = o->v + (a - lo),
                                      .n = b - a,
                                      .wd = t->decay ? (float)o->weight_decay : 0.0f};
  }
  o->n_slices = n;
  if (n)
    d->ops->adamw_multi(d, o->slices, n, (float)lr, (float)o->beta1, (float)o->beta2, (float)o->eps,
                        (float)grad_scale, (int)o->t);
  return 0;
}
