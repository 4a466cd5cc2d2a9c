/* train.h — the training step on one device: micro-batches with gradient
 * accumulation, global-norm clipping, AdamW, the LR schedule.
 *
 * Step s consumes global samples [s*G, (s+1)*G) (DESIGN's determinism); the
 * loss is the mean over the global batch whatever the micro-batch split.
 */
#ifndef MT_TRAIN_H
#define MT_TRAIN_H

#include "gpt.h"
#include "job.h"
#include "optim.h"
#include "source.h"

typedef struct mt_step_stats {
  int64_t step;             /* 1-based number of the step just taken */
  int64_t consumed_tokens;  /* after this step */
  double loss;              /* mean over the global batch */
  double lr;
  double grad_norm;         /* before clipping */
  double step_ms;
  double tokens_per_s;
  double tflops;            /* model TFLOP/s on this device */
  int skipped;              /* non-finite gradients: update skipped */
  int has_val;              /* validation ran after this step */
  double val_loss;          /* mean over eval.iters global batches of the valid split */
} mt_step_stats;

typedef struct mt_trainer {
  const mt_job *job;
  mt_device *dev;
  mt_gpt model;
  mt_adamw opt;
  mt_data_source *data;
  int64_t step;             /* steps taken */
  int micro_batches;        /* per step on this device */
  int32_t *inputs, *targets; /* host, (micro_batch, seq) */
  double flops_per_step;
} mt_trainer;

/* Builds model (initialised from seed or model.init_from), optimizer and
 * data reader for a standalone single-device job. */
int mt_trainer_create(mt_trainer *tr, const mt_job *job, mt_device *dev);
void mt_trainer_destroy(mt_trainer *tr);

/* One optimizer step. */
int mt_trainer_step(mt_trainer *tr, mt_step_stats *st);

/* Mean loss over the first eval.iters global batches of the valid split,
 * without dropout; the same batches every time, so runs compare. */
int mt_trainer_eval(mt_trainer *tr, double *loss);

#endif
