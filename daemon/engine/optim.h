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
  double beta1, beta2, eps;
  double weight_decay; /* of the next update: the trainer sets it from the schedule each step */
  int64_t t;           /* steps taken */
  size_t lo, n;        /* the slice [lo, lo + n) of the flat parameters it updates */
  float *m, *v;        /* device, n floats each: 1/dp of the model under ZeRO-1 */
  mt_device *dev;
  mt_adamw_slice *slices; /* host: one per tensor the slice meets, for adamw_multi */
  int n_slices;
} mt_adamw;

/* Moments for parameters [lo, lo + n) of model's flat buffer (0 and
 * model->num_params for the whole model). */
int mt_adamw_create(mt_adamw *o, const mt_gpt *model, size_t lo, size_t n, double beta1,
                    double beta2, double eps, double weight_decay);
void mt_adamw_destroy(mt_adamw *o);

/* One update of the slice at learning rate lr, in one multi-tensor op (a few
 * launches on a GPU). grad holds the n gradients of
 * the slice (model->grads + lo when not sharded); they are multiplied by
 * grad_scale first (1 for none, clip/norm when clipping, divided by the loss
 * scale when the gradients are those of a scaled loss). Weight decay
 * follows each tensor's `decay` flag, also where a slice cuts a tensor.
 * Increments t. */
int mt_adamw_step(mt_adamw *o, mt_gpt *model, const float *grad, double lr, double grad_scale);

/* Scale that clips a gradient of norm `norm` to `max_norm` (1 if within or
 * max_norm <= 0), as torch.nn.utils.clip_grad_norm_ does: max/(norm+1e-6). */
double mt_clip_scale(double norm, double max_norm);

#endif
