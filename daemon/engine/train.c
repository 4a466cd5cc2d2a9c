/* train.c — one optimizer step on one device. */
#include "train.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "err.h"
#include "log.h"
#include "lr.h"
#include "safetensors.h"

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

int mt_trainer_create(mt_trainer *tr, const mt_job *job, mt_device *dev, mt_comm *dp) {
  memset(tr, 0, sizeof *tr);
  tr->job = job;
  tr->dev = dev;
  const mt_model_spec *ms = &job->model;
  const mt_parallel_spec *ps = &job->parallel;
  int G = job->train.global_batch, B = ps->micro_batch, T = ms->seq_len;
  tr->dp = dp;
  tr->dp_rank = dp ? mt_comm_rank(dp) : 0;
  tr->dp_size = dp ? mt_comm_size(dp) : 1;
  if (ps->tp != 1 || ps->pp != 1)
    return mt_seterr(MT_ENOTSUP, "parallel: tp %d x pp %d: tensor and pipeline parallelism "
                                 "arrive with the 3D engine; data parallelism (dp_min) works",
                     ps->tp, ps->pp);
  if (tr->dp_size != ps->dp_min)
    return mt_seterr(MT_EINVAL, "parallel.dp_min: %d, but the data-parallel group has %d ranks",
                     ps->dp_min, tr->dp_size);
  if (B < 1 || G % (B * tr->dp_size))
    return mt_seterr(MT_EINVAL, "train.global_batch: %d is not divisible by micro_batch %d * dp %d",
                     G, B, tr->dp_size);
  tr->micro_batches = G / (B * tr->dp_size);

  mt_gpt_config cfg = {
      .n_layer = ms->n_layer,
      .n_embd = ms->n_embd,
      .n_head = ms->n_head,
      .vocab_size = ms->vocab_size,
      .padded_vocab = ms->padded_vocab,
      .max_seq = ms->seq_len,
      .ln_eps = ms->ln_eps,
      .init_std = ms->init_std,
      .hidden_dropout = ms->hidden_dropout,
      .attention_dropout = ms->attention_dropout,
      .recompute = ps->recompute,
      .zero_shards = tr->dp_size,
  };
  int rc = mt_gpt_create(&tr->model, &cfg, dev, B, T);
  if (rc) return rc;
  rc = mt_gpt_init_weights(&tr->model, job->train.seed);
  if (!rc && ms->init_from[0]) {
    rc = mt_gpt_load_safetensors(&tr->model, ms->init_from);
    if (rc) mt_wraperr(rc, "model.init_from");
  }
  tr->shard_n = tr->model.alloc_params / (size_t)tr->dp_size;
  tr->shard_lo = (size_t)tr->dp_rank * tr->shard_n;
  if (!rc && dp) {
    tr->shard_grad = mt_device_alloc(dev, tr->shard_n * sizeof(float));
    if (!tr->shard_grad) rc = mt_wraperr(MT_ENOMEM, "train: ZeRO-1 gradient slice");
  }
  if (!rc)
    rc = mt_adamw_create(&tr->opt, &tr->model, tr->shard_lo, tr->shard_n, job->train.beta1,
                         job->train.beta2, job->train.adam_eps, job->train.weight_decay);
  if (!rc) {
    uint64_t n_train = (uint64_t)job->train.steps * (uint64_t)G;
    uint64_t n_valid = job->eval.interval > 0 ? (uint64_t)job->eval.iters * (uint64_t)G : 0;
    rc = mt_data_source_open(&tr->data, &job->data, T, ms->vocab_size, job->train.seed, n_train,
                             n_valid);
  }
  if (!rc) {
    tr->inputs = malloc(2 * (size_t)B * T * sizeof(int32_t));
    if (!tr->inputs) rc = mt_seterr(MT_ENOMEM, "train: batch buffers");
    else tr->targets = tr->inputs + (size_t)B * T;
  }
  if (rc) {
    mt_trainer_destroy(tr);
    return rc;
  }
  tr->flops_per_step = mt_gpt_flops_per_step(&cfg, B, T) * tr->micro_batches;
  return 0;
}

void mt_trainer_destroy(mt_trainer *tr) {
  if (tr->shard_grad) mt_device_free(tr->dev, tr->shard_grad);
  mt_gpt_destroy(&tr->model);
  mt_adamw_destroy(&tr->opt);
  mt_data_source_free(tr->data);
  free(tr->inputs);
  memset(tr, 0, sizeof *tr);
}

int mt_trainer_step(mt_trainer *tr, mt_step_stats *st) {
  const mt_job *job = tr->job;
  mt_gpt *m = &tr->model;
  mt_device *d = tr->dev;
  int B = m->B, G = job->train.global_batch;
  int total_micro = G / B; /* over every dp rank */
  double t0 = now_ms();
  memset(st, 0, sizeof *st);

  mt_gpt_zero_grad(m);
  double loss_sum = 0.0;
  float loss_scale = 1.0f / (float)total_micro; /* objective: mean over the global batch */
  uint64_t first = (uint64_t)tr->step * (uint64_t)G + (uint64_t)tr->dp_rank * (uint64_t)(G / tr->dp_size);
  for (int mb = 0; mb < tr->micro_batches; mb++) {
    uint64_t sample0 = first + (uint64_t)mb * (uint64_t)B;
    int rc = mt_data_source_read(tr->data, MT_SPLIT_TRAIN, sample0, B, tr->inputs, tr->targets);
    if (!rc) rc = mt_gpt_forward(m, tr->inputs, tr->targets, sample0);
    if (!rc) rc = mt_gpt_backward(m, loss_scale);
    if (rc) return mt_wraperr(rc, "step %lld, micro-batch %d", (long long)tr->step + 1, mb);
    loss_sum += m->last_loss;
  }

  /* ZeRO-1: each rank keeps the sum over ranks of its slice of the gradients */
  const float *grad = m->grads + tr->shard_lo;
  if (tr->dp) {
    int rc = mt_comm_reduce_scatter(tr->dp, m->grads, tr->shard_grad, tr->shard_n, MT_COMM_F32,
                                    MT_COMM_SUM);
    if (rc) return mt_wraperr(rc, "step %lld: gradient reduce-scatter", (long long)tr->step + 1);
    grad = tr->shard_grad;
  }
  /* one all-reduce carries the loss, the squared norm and the stop order */
  double agreed[3] = {loss_sum, d->ops->sumsq(d, grad, tr->shard_n), tr->stop_request ? 1.0 : 0.0};
  if (tr->dp) {
    int rc = mt_comm_allreduce(tr->dp, agreed, agreed, 3, MT_COMM_F64, MT_COMM_SUM);
    if (rc) return mt_wraperr(rc, "step %lld: loss and norm all-reduce", (long long)tr->step + 1);
  }
  double norm = sqrt(agreed[1]);
  double lr = mt_lr_at(&job->train.lr, tr->step);
  if (isfinite(norm)) {
    mt_adamw_step(&tr->opt, m, grad, lr, mt_clip_scale(norm, job->train.clip_grad));
  } else {
    st->skipped = 1;
    mt_log_warn("step %lld: gradient norm is %g; update skipped", (long long)tr->step + 1, norm);
  }
  if (tr->dp) {
    int rc = mt_comm_allgather(tr->dp, m->params + tr->shard_lo, m->params, tr->shard_n,
                               MT_COMM_F32);
    if (rc) return mt_wraperr(rc, "step %lld: parameter all-gather", (long long)tr->step + 1);
  }
  mt_device_sync(d);
  tr->step++;

  st->step = tr->step;
  st->consumed_tokens = tr->step * mt_job_tokens_per_step(job);
  st->loss = agreed[0] / total_micro;
  st->lr = lr;
  st->grad_norm = norm;
  st->stop = agreed[2] > 0;
  st->step_ms = now_ms() - t0;
  st->tokens_per_s = (double)mt_job_tokens_per_step(job) / (st->step_ms / 1e3);
  st->tflops = tr->flops_per_step / (st->step_ms / 1e3) / 1e12;
  return 0;
}

int mt_trainer_eval(mt_trainer *tr, double *loss) {
  const mt_job *job = tr->job;
  mt_gpt *m = &tr->model;
  int B = m->B;
  uint64_t n = (uint64_t)job->eval.iters * (uint64_t)job->train.global_batch;
  double sum = 0.0;
  int batches = 0;
  m->training = 0;
  int rc = 0;
  for (uint64_t first = 0; first < n && !rc; first += (uint64_t)B, batches++) {
    rc = mt_data_source_read(tr->data, MT_SPLIT_VALID, first, B, tr->inputs, tr->targets);
    if (!rc) rc = mt_gpt_forward(m, tr->inputs, tr->targets, first);
    sum += m->last_loss;
  }
  m->training = 1;
  if (rc) return mt_wraperr(rc, "validation");
  *loss = sum / batches;
  return 0;
}
