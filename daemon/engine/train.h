/* train.h — the training step of one data-parallel rank: micro-batches with
 * gradient accumulation, ZeRO-1 over dp, global-norm clipping, AdamW, the LR
 * schedule.
 *
 * Step s consumes global samples [s*G, (s+1)*G) (DESIGN's determinism): dp
 * rank r takes [s*G + r*G/dp, s*G + (r+1)*G/dp) in micro-batches. The loss is
 * the mean over the global batch whatever dp and the micro-batch size. With
 * dp > 1 gradients are reduce-scattered, each rank updates only its 1/dp slice
 * of the flat parameters with its slice of the Adam moments, and the slices
 * are all-gathered. Loss, squared gradient norm and the stop order ride in one
 * all-reduce per step, so every rank acts on the same step boundary.
 */
#ifndef MT_TRAIN_H
#define MT_TRAIN_H

#include "comm.h"
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
  int stop;                 /* some rank asked to stop: all stop after this step */
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
  int micro_batches;        /* per step on this rank */
  mt_comm *dp;              /* data-parallel group, NULL when dp = 1 */
  int dp_rank, dp_size;
  size_t shard_lo, shard_n; /* this rank's ZeRO-1 slice of the flat parameters */
  float *shard_grad;        /* reduced gradients of the slice (dp > 1) */
  volatile int stop_request; /* set by the owner thread; agreed on in the step */
  int32_t *inputs, *targets; /* host, (micro_batch, seq) */
  double flops_per_step;
} mt_trainer;

/* Builds model (initialised from seed or model.init_from), optimizer slice
 * and data reader for one rank. dp: the data-parallel group (its size must be
 * parallel.dp_min), or NULL for a single device. */
int mt_trainer_create(mt_trainer *tr, const mt_job *job, mt_device *dev, mt_comm *dp);
void mt_trainer_destroy(mt_trainer *tr);

/* One optimizer step. */
int mt_trainer_step(mt_trainer *tr, mt_step_stats *st);

/* Mean loss over the first eval.iters global batches of the valid split,
 * without dropout; the same batches every time, so runs compare. */
int mt_trainer_eval(mt_trainer *tr, double *loss);

#endif
