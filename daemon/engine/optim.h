/* optim.h — AdamW over a model's parameter table, with global-norm clipping.
 *
 * fp32 moments live in one device buffer each, laid out like the parameters.
 * Weight decay applies only to tensors the table marks `decay` (matrices and
 * embeddings; never biases or LayerNorm), as Megatron and GPT-2 do.
 */
#ifndef MT_OPTIM_H
#define MT_OPTIM_H

#include "gpt.h"

typedef struct mt_adamw {
  double beta1, beta2, eps, weight_decay;
  int64_t t;          /* steps taken */
  float *m, *v;       /* device, num_params floats each */
  size_t n;
  mt_device *dev;
} mt_adamw;

int mt_adamw_create(mt_adamw *o, const mt_gpt *model, double beta1, double beta2, double eps,
                    double weight_decay);
void mt_adamw_destroy(mt_adamw *o);

/* Global L2 norm of the model's gradients (double accumulation). */
double mt_grad_norm(const mt_gpt *model);

/* One update at learning rate lr; gradients are multiplied by grad_scale
 * first (1 for none, clip/norm when clipping). Increments t. */
int mt_adamw_step(mt_adamw *o, mt_gpt *model, double lr, double grad_scale);

/* Scale that clips a gradient of norm `norm` to `max_norm` (1 if within or
 * max_norm <= 0), as torch.nn.utils.clip_grad_norm_ does: max/(norm+1e-6). */
double mt_clip_scale(double norm, double max_norm);

#endif
