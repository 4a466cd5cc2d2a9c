/* train.c — one optimizer step of one rank: 1F1B over the micro-batches of
 * its replica on its pipeline stage, then ZeRO-1 over the replicas. */
#include "train.h"

#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "err.h"
#include "log.h"
#include "lr.h"
#include "monotime.h"
#include "range.h"
#include "safetensors.h"

static double wall_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

double mt_trainer_stop_vote(mt_trainer *tr) {
  if (!tr->stop_request && tr->stop_at_ms > 0 && 1e3 * mt_mono_s() >= (double)tr->stop_at_ms)
    tr->stop_request = MT_STOP_TIME;
  return tr->stop_request == MT_STOP_TIME ? 0.5 : tr->stop_request ? 1.0 : 0.0;
}

int mt_stop_vote_timed(double sum) { return fmod(sum, 1.0) != 0.0; }

void mt_trainer_poll(mt_trainer *tr) {
  if (tr->stop_flag && !tr->stop_request && __atomic_load_n(tr->stop_flag, __ATOMIC_ACQUIRE))
    tr->stop_request = MT_STOP_ASKED;
  if (tr->order_src) tr->order_word = __atomic_load_n(tr->order_src, __ATOMIC_ACQUIRE);
}

/* The model's hook for Megatron's f and g operators. */
static int tp_allreduce(void *ctx, float *buf, size_t n, int max) {
  return mt_comm_allreduce(ctx, buf, buf, n, MT_COMM_F32, max ? MT_COMM_MAX : MT_COMM_SUM);
}

/* and for sequence parallelism, their all-gather (send where the model has
 * this rank's rows) and reduce-scatter (in place: this rank's part at its
 * offset) forms */
static int tp_allgather(void *ctx, const void *send, void *recv, size_t bytes) {
  return mt_comm_allgather(ctx, send, recv, bytes, MT_COMM_U8);
}
static int tp_reduce_scatter(void *ctx, float *buf, size_t n) {
  mt_comm *c = ctx;
  size_t chunk = n / (size_t)mt_comm_size(c);
  return mt_comm_reduce_scatter(c, buf, buf + (size_t)mt_comm_rank(c) * chunk, chunk, MT_COMM_F32,
                                MT_COMM_SUM);
}

static mt_precision precision_of(const mt_job *job) {
  const char *p = job->train.precision;
  return !strcmp(p, "bf16") ? MT_PREC_BF16 : !strcmp(p, "fp16") ? MT_PREC_FP16 : MT_PREC_FP32;
}

mt_gpt_config mt_trainer_model_shape(const mt_job *job) {
  const mt_model_spec *ms = &job->model;
  return (mt_gpt_config){
      .n_layer = ms->n_layer,
      .n_embd = ms->n_embd,
      .n_head = ms->n_head,
      .vocab_size = ms->vocab_size,
      .padded_vocab = ms->padded_vocab,
      .max_seq = ms->max_positions,
      .ln_eps = ms->ln_eps,
      .init_std = ms->init_std,
      .hidden_dropout = ms->hidden_dropout,
      .attention_dropout = ms->attention_dropout,
      .untie_embeddings = ms->untie_embeddings,
  };
}

static mt_gpt_config model_config(const mt_job *job, const mt_groups *g, int slots) {
  mt_gpt_config cfg = mt_trainer_model_shape(job);
  cfg.recompute = job->parallel.recompute;
  cfg.recompute_layers = job->parallel.recompute_layers;
  cfg.sequence_parallel = job->parallel.sequence_parallel;
  cfg.zero_shards = g->dp_size;
  cfg.micro_slots = slots;
  cfg.tp_size = g->tp_size;
  cfg.tp_rank = g->tp_rank;
  cfg.precision = precision_of(job);
  cfg.eod_token = job->data.eod_token;
  cfg.reset_position_ids = job->data.reset_position_ids;
  cfg.reset_attention_mask = job->data.reset_attention_mask;
  mt_gpt_set_stage(&cfg, g->pp_size, g->pp_rank, job->parallel.virtual_stages);
  return cfg;
}

/* Whether this rank holds a copy of the tied embedding that a stage at the
 * other end of the pipeline holds too: its gradient is reduced over dp
 * whole, not in the buckets (mt_trainer_step). Untied, the first stage's
 * wte and the last's lm_head are two parameters, reduced as any other. */
static int tied_copy(const mt_trainer *tr) {
  return tr->g.embed && !tr->model.cfg.untie_embeddings && (tr->model.first || tr->model.last);
}

/* The dp buckets: each rank's slice cut into pieces of at most cap
 * elements, each ready once the block holding its first element is; a tied
 * embedding's elements are left out. */
static int make_buckets(mt_trainer *tr, int cap_elems) {
  mt_gpt *m = &tr->model;
  size_t cap = cap_elems > 0 ? (size_t)cap_elems : tr->shard_n;
  size_t per = (tr->shard_n + cap - 1) / cap + 1; /* + 1: a slice the left-out range splits */
  size_t ex_lo = 0, ex_hi = 0;                    /* the elements left out */
  if (tied_copy(tr)) {
    ex_lo = m->params_table[m->i_wte].offset;
    ex_hi = ex_lo + m->params_table[m->i_wte].numel;
  }
  tr->buckets = calloc(per * (size_t)tr->g.dp_size, sizeof *tr->buckets);
  if (!tr->buckets) return mt_seterr(MT_ENOMEM, "train: %zu gradient buckets", per * tr->g.dp_size);
  int n = 0;
  for (int k = 0; k < tr->g.dp_size; k++) {
    size_t k_lo = (size_t)k * tr->shard_n, k_hi = k_lo + tr->shard_n;
    /* the slice less the left-out range: what lies before it, then after it */
    size_t part[2][2] = {{k_lo, k_hi < ex_lo ? k_hi : ex_lo}, {k_lo > ex_hi ? k_lo : ex_hi, k_hi}};
    if (ex_lo == ex_hi) part[0][1] = k_hi, part[1][0] = k_hi;
    for (int q = 0; q < 2; q++) {
      size_t end = part[q][1];
      for (size_t lo = part[q][0]; lo < end; lo += cap) {
        mt_grad_bucket *b = &tr->buckets[n++];
        b->lo = lo, b->hi = lo + cap < end ? lo + cap : end, b->owner = k, b->ready = -1;
        for (int l = m->n_layers - 1; l >= 0; l--)
          if (m->params_table[m->i_block0 + l * MT_P_PER_LAYER].offset <= lo) {
            b->ready = l;
            break;
          }
      }
    }
  }
  tr->n_buckets = n;
  return 0;
}

/* The spans of this rank's gradient slice that its Σ g² counts, a tensor
 * (or the part of one in the slice) each: the slice less the last stage's
 * copy of the tied embedding (the first stage counts it) and, on tp ranks
 * but the first, the replicated tensors, so every parameter counts once.
 * None (norm_spans NULL) where nothing is left out: the slice is summed
 * whole. Made once: the slice and the gradients' buffer stay. */
static int make_norm_spans(mt_trainer *tr) {
  mt_gpt *m = &tr->model;
  size_t lo = tr->shard_lo, hi = lo + tr->shard_n;
  int skip = m->last && !m->first ? m->i_wte : -1;
  int skip_replicated = tr->g.tp_rank > 0;
  if (skip < 0 && !skip_replicated) return 0;
  tr->norm_spans = calloc((size_t)m->n_tensors, sizeof *tr->norm_spans);
  if (!tr->norm_spans) return mt_seterr(MT_ENOMEM, "train: %d gradient norm spans", m->n_tensors);
  for (int i = 0; i < m->n_tensors; i++) {
    if (i == skip || (skip_replicated && m->params_table[i].shard == MT_SHARD_NONE)) continue;
    size_t a, b;
    if (mt_param_overlap(&m->params_table[i], lo, hi, &a, &b))
      tr->norm_spans[tr->n_norm_spans++] = (mt_sumsq_span){m->grads + a, b - a};
  }
  if (!tr->job->train.log_params_norm) return 0;
  tr->pnorm_spans = calloc((size_t)tr->n_norm_spans + 1, sizeof *tr->pnorm_spans);
  if (!tr->pnorm_spans) return mt_seterr(MT_ENOMEM, "train: %d params norm spans", m->n_tensors);
  for (int i = 0; i < tr->n_norm_spans; i++)
    tr->pnorm_spans[i] =
        (mt_sumsq_span){m->params + (tr->norm_spans[i].x - m->grads), tr->norm_spans[i].n};
  return 0;
}

/* Σ x² over this rank's slice of the gradients or the master weights
 * (slice), every parameter counted once (spans: make_norm_spans's over
 * that array; NULL where the slice counts whole): one read-back on a GPU,
 * where a sumsq a tensor took hundreds a step. */
static double slice_sumsq(mt_trainer *tr, const mt_sumsq_span *spans, const float *slice) {
  mt_device *d = tr->dev;
  if (!spans) return d->ops->sumsq(d, slice, tr->shard_n);
  return d->ops->sumsq_multi(d, spans, tr->n_norm_spans);
}

/* The spans of this rank's gradient slice the zero count reads
 * (train.log_num_zeros_in_grad), so that every real parameter counts once
 * over the world, whatever the layout, as Megatron's count_zeros_fp32 over
 * its parameters: a tensor (or its part in the slice) each, never the whole
 * slice, so the 16-float alignment gaps between tensors and the ZeRO tail
 * are not counted; the norm's tensors (the tied embedding's second copy and
 * tp-replicated tensors left out), and of the vocabulary tensors (wte, an
 * untied lm_head) only the rows of real tokens: the softmax runs over the
 * vocabulary's V tokens, so the padded rows' gradient is always 0, and
 * their number depends on tp (Vp a multiple of vocab_pad_to x tp). Each tp
 * rank holds rows [shard_off, shard_off + Vp / tp), a prefix of which is
 * real. Made once, as the norm's. */
static int make_zero_spans(mt_trainer *tr) {
  mt_gpt *m = &tr->model;
  size_t lo = tr->shard_lo, hi = lo + tr->shard_n;
  int skip = m->last && !m->first ? m->i_wte : -1;
  int skip_replicated = tr->g.tp_rank > 0;
  size_t V = (size_t)m->cfg.vocab_size;
  tr->zero_spans = calloc((size_t)m->n_tensors + 1, sizeof *tr->zero_spans);
  if (!tr->zero_spans) return mt_seterr(MT_ENOMEM, "train: %d gradient zero spans", m->n_tensors);
  for (int i = 0; i < m->n_tensors; i++) {
    const mt_param *p = &m->params_table[i];
    if (i == skip || (skip_replicated && p->shard == MT_SHARD_NONE)) continue;
    mt_param real = *p;
    if (i == m->i_wte || i == m->i_head) {
      size_t rows = V > p->shard_off ? V - p->shard_off : 0;
      if (rows < p->shape[0]) real.numel = rows * p->shape[1];
    }
    size_t a, b;
    if (mt_param_overlap(&real, lo, hi, &a, &b))
      tr->zero_spans[tr->n_zero_spans++] = (mt_sumsq_span){m->grads + a, b - a};
  }
  return 0;
}

/* The zeros of this rank's gradient slice (train.log_num_zeros_in_grad)
 * over make_zero_spans' spans. A count in double, exact below 2^53, so it
 * rides in the step's all-reduce; a failed device's -1 is told by its
 * sync. */
static double slice_zeros(mt_trainer *tr) {
  mt_device *d = tr->dev;
  if (!tr->n_zero_spans) return 0.0;
  return (double)d->ops->count_zeros(d, tr->zero_spans, tr->n_zero_spans);
}

/* The norm of the master weights after an update (Megatron's
 * --log-params-norm), summed as the gradient norm is: this rank's slice
 * less what another rank counts, then over the world. */
static int params_norm(mt_trainer *tr, double *norm) {
  double sumsq = slice_sumsq(tr, tr->pnorm_spans, tr->model.params + tr->shard_lo);
  if (tr->g.world) {
    int rc = mt_comm_allreduce(tr->g.world, &sumsq, &sumsq, 1, MT_COMM_F64, MT_COMM_SUM);
    if (rc) return rc;
  }
  *norm = sqrt(sumsq);
  return 0;
}

/* Starts the reduce of every bucket whose gradients are final once block l
 * of the chunk in its backward has its own (the model's on_block_grads; l =
 * -1: all that are left). */
static int start_buckets(void *ctx, int l) {
  mt_trainer *tr = ctx;
  if (l >= 0) l += tr->grads_block0;
  for (; tr->next_bucket >= 0 && tr->buckets[tr->next_bucket].ready >= l; tr->next_bucket--) {
    const mt_grad_bucket *b = &tr->buckets[tr->next_bucket];
    float *p = tr->model.grads + b->lo;
    int rc =
        mt_comm_reduce_start(tr->g.dp, p, p, b->hi - b->lo, MT_COMM_F32, MT_COMM_SUM, b->owner);
    if (rc) return rc;
  }
  return 0;
}

int mt_trainer_data_reach(mt_trainer *tr, uint64_t n_train) {
  if (tr->data && n_train <= tr->data_train_samples) return 0;
  if (!tr->reads_tokens) return 0; /* a middle stage reads no tokens without the mask key */
  const mt_job *job = tr->job;
  uint64_t G = (uint64_t)job->train.global_batch;
  /* Megatron's sizes: eval.iters batches for each validation in the run
   * (steps / interval of them) and the one at its end, and for the test pass */
  uint64_t n_valid = 0, n_test = 0;
  if (job->eval.interval > 0) {
    n_valid = mt_eval_first_batch(job, job->train.steps, 1) * G + (uint64_t)job->eval.iters * G;
    if (job->eval.test) n_test = (uint64_t)job->eval.iters * G;
  }
  mt_data_source *d = NULL;
  int rc = mt_data_source_open(&d, &job->data, job->model.seq_len, job->model.vocab_size,
                               job->train.seed, n_train, n_valid, n_test);
  /* data that cannot be read fails the job, not a peer (node.c report_kind):
   * a new generation would fail on it again */
  if (rc == MT_EIO || rc == MT_ENOENT) rc = MT_EINVAL;
  if (rc && tr->reads_for_documents) { /* why a middle stage opened it at all */
    char why[512];
    snprintf(why, sizeof why, "%s", mt_errmsg());
    return mt_seterr(rc, "%s (every pipeline stage reads the data with data.reset_attention_mask)",
                     why);
  }
  if (rc) return rc;
  mt_data_source_free(tr->data);
  tr->data = d;
  tr->data_train_samples = n_train;
  return 0;
}

int mt_trainer_create(mt_trainer *tr, const mt_job *job, mt_device *dev, const mt_groups *g) {
  memset(tr, 0, sizeof *tr);
  tr->job = job;
  tr->dev = dev;
  tr->rolled_back_to = -1;
  const mt_model_spec *ms = &job->model;
  const mt_parallel_spec *ps = &job->parallel;
  int G = job->train.global_batch, B = ps->micro_batch, T = ms->seq_len;
  if (g)
    tr->g = *g;
  else
    tr->g = (mt_groups){.dp_size = 1, .pp_size = 1, .tp_size = 1};
  if (tr->g.dp_size != mt_job_dp(job) || tr->g.pp_size != ps->pp || tr->g.tp_size != ps->tp)
    return mt_seterr(MT_EINVAL,
                     "parallel: the job wants tp %d x pp %d x dp %d, the groups are %d x %d x %d",
                     ps->tp, ps->pp, mt_job_dp(job), tr->g.tp_size, tr->g.pp_size, tr->g.dp_size);
  if (B < 1 || G % (B * tr->g.dp_size))
    return mt_seterr(MT_EINVAL, "train.global_batch: %d is not divisible by micro_batch %d * dp %d",
                     G, B, tr->g.dp_size);
  int quantum = mt_job_batch_quantum(job);
  if (quantum % (B * tr->g.dp_size))
    return mt_seterr(MT_EINVAL,
                     "train.rampup_batch: start %d and increment %d are not both divisible by "
                     "micro_batch %d * dp %d",
                     job->train.rampup.start, job->train.rampup.increment, B, tr->g.dp_size);
  if (ms->n_layer < tr->g.pp_size)
    return mt_seterr(MT_EINVAL, "parallel.pp: %d stages for %d layers", tr->g.pp_size, ms->n_layer);
  tr->micro_batches = G / (B * tr->g.dp_size);
  /* (the job's parse refused virtual stages without a pipeline or a layer
   * for each chunk; dp is the groups') */
  int v = ps->virtual_stages > 1 ? ps->virtual_stages : 1, pp = tr->g.pp_size;
  /* the interleaved schedule takes micro-batches pp at a time (Megatron's rule) */
  if (v > 1 && quantum % (B * tr->g.dp_size * pp)) /* the quantum divides every batch */
    return mt_seterr(MT_EINVAL,
                     "parallel.virtual_stages: the interleaved schedule needs every step's "
                     "micro-batches a replica (global_batch %d%s / micro_batch %d / dp %d) to be "
                     "a multiple of pp %d",
                     G, job->train.rampup.start ? " and the ramp-up's sizes" : "", B, tr->g.dp_size,
                     pp);
  /* the most micro-batches each chunk keeps activations of: 1F1B keeps at
   * most pp - stage */
  int inflight[v];
  int rc = mt_pipe_inflight(pp, tr->g.pp_rank, v, tr->micro_batches, inflight);
  if (rc) return rc;

  mt_gpt_config cfg = model_config(job, &tr->g, inflight[0]);
  tr->precision = cfg.precision;
  /* GEMMs on tensor cores as autocast runs them: bf16 jobs round both
   * inputs to bf16; fp16 jobs multiply their 16-bit operands natively (the
   * linear ops and attention take them as they are) and any fp32 pair in
   * TF32; fp32 jobs stay fp32 (the CPU backend always is) */
  dev->matmul = cfg.precision == MT_PREC_BF16   ? MT_MATMUL_BF16
                : cfg.precision == MT_PREC_FP16 ? MT_MATMUL_TF32
                                                : MT_MATMUL_FP32;
  if (tr->precision == MT_PREC_FP16) {
    const mt_loss_scale_spec *ls = &job->train.loss_scale;
    mt_loss_scale_opts o = mt_loss_scale_defaults();
    o.initial = (float)ls->initial;
    o.min = (float)(ls->dynamic ? ls->min : ls->initial); /* a static scale never backs off */
    o.growth_interval = ls->growth_interval;
    o.hysteresis = ls->hysteresis;
    o.fixed = !ls->dynamic;
    if ((rc = mt_loss_scale_init(&tr->scaler, &o))) return mt_wraperr(rc, "train.loss_scale");
  }
  /* the data before the model: data that cannot serve the job (a wrong
   * path, too few tokens for a sample) fails it at once, not after every
   * rank made (and init_from read) its weights, minutes at scale */
  int first, last;
  mt_gpt_ends(&cfg, &first, &last);
  /* with documents in the attention every stage needs its micro-batches'
   * tokens (see stage_forward) */
  tr->reads_tokens = first || last || job->data.reset_attention_mask;
  tr->reads_for_documents = !first && !last && job->data.reset_attention_mask;
  rc = mt_trainer_data_reach(tr, (uint64_t)mt_job_samples_of(job, 0, job->train.steps));
  if (!rc) rc = mt_gpt_create(&tr->model, &cfg, dev, B, T);
  if (rc) {
    mt_trainer_destroy(tr);
    return rc;
  }
  if (tr->g.tp) {
    tr->model.tp_allreduce = tp_allreduce;
    tr->model.tp_allgather = tp_allgather;
    tr->model.tp_reduce_scatter = tp_reduce_scatter;
    tr->model.tp_ctx = tr->g.tp;
  }
  rc = mt_gpt_init_weights(&tr->model, job->train.seed);
  if (!rc && ms->init_from[0]) {
    rc = mt_gpt_load_safetensors(&tr->model, ms->init_from);
    /* a file that cannot be read fails the job, not a peer: not re-formed */
    if (rc) rc = mt_wraperr(rc == MT_EIO || rc == MT_ENOENT ? MT_EINVAL : rc, "model.init_from");
  }
  /* the chunks run as views of the model's parameters, each with the
   * activations its schedule keeps */
  tr->chunks = &tr->model, tr->n_chunks = 1;
  if (!rc && v > 1) {
    tr->n_chunks = 0; /* those made, for mt_trainer_destroy */
    tr->chunks = calloc((size_t)v, sizeof *tr->chunks);
    if (!tr->chunks) rc = mt_seterr(MT_ENOMEM, "train: %d model chunks", v);
    for (int c = 0; !rc && c < v; c++) {
      /* the chunks run in turn: chunk 0's working buffers serve them all
       * (the input gradient, its backward scratch, is sent before the next
       * backward: stage_backward waits for it) */
      rc = mt_gpt_create_chunk(&tr->chunks[c], &tr->model, c, inflight[c],
                               c ? &tr->chunks[0] : NULL);
      if (!rc) tr->n_chunks = c + 1;
    }
  }
  /* model.attention_backend: how the GPU computes a 16-bit job's attention */
  if (!rc) rc = mt_device_set_attention(dev, ms->attention_backend);
  tr->timers.level = job->train.timing_log_level;
  tr->timers.dev = dev;
  if (!rc && tr->timers.level > 0 && job->train.timing_log_option == MT_TIMING_ALL) {
    int world = tr->g.world ? mt_comm_size(tr->g.world) : 1;
    tr->timer_ranks = calloc((size_t)world * MT_TM_COUNT, sizeof *tr->timer_ranks);
    if (!tr->timer_ranks) rc = mt_seterr(MT_ENOMEM, "train: every rank's timers (%d ranks)", world);
  }
  tr->model.timers = &tr->timers;
  for (int c = 0; c < tr->n_chunks; c++) tr->chunks[c].timers = &tr->timers;
  tr->shard_n = tr->model.alloc_params / (size_t)tr->g.dp_size;
  tr->shard_lo = (size_t)tr->g.dp_rank * tr->shard_n;
  size_t act = mt_gpt_stream_rows(&tr->model) * ms->n_embd;
  if (!rc && tr->g.dp) rc = make_buckets(tr, ps->bucket_size);
  if (!rc && tr->g.pp_size > 1) {
    /* two of what it receives: gradients from the next stage (fp32), the
     * previous one's output as it travels (16-bit in a bf16 or fp16 job);
     * with virtual stages every stage receives both (the ring) */
    size_t grad = tr->model.last && v == 1 ? 0 : act * sizeof(float);
    size_t wire = tr->model.first && v == 1 ? 0 : mt_gpt_wire_bytes(&tr->model);
    char *buf = mt_device_alloc(dev, 2 * (grad + wire));
    if (!buf) rc = mt_wraperr(MT_ENOMEM, "train: pipeline buffers");
    tr->recv_buf = buf;
    for (int i = 0; i < 2 && buf; i++) {
      tr->recv_dy[i] = grad ? (float *)(buf + i * grad) : NULL;
      tr->recv_wire[i] = wire ? buf + 2 * grad + i * wire : NULL;
    }
  }
  if (!rc)
    rc = mt_adamw_create(&tr->opt, &tr->model, tr->shard_lo, tr->shard_n, job->train.beta1,
                         job->train.beta2, job->train.adam_eps, job->train.weight_decay);
  if (!rc) rc = make_norm_spans(tr);
  if (!rc && job->train.log_num_zeros_in_grad) rc = make_zero_spans(tr);
  if (!rc) {
    tr->inputs = malloc(2 * (size_t)B * T * sizeof(int32_t));
    if (!tr->inputs)
      rc = mt_seterr(MT_ENOMEM, "train: batch buffers");
    else
      tr->targets = tr->inputs + (size_t)B * T;
  }
  if (rc) {
    mt_trainer_destroy(tr);
    return rc;
  }
  /* model FLOPs of this stage: blocks pro rata, the LM head on the last */
  mt_gpt_config whole = cfg;
  mt_gpt_set_stage(&whole, 1, 0, 1);
  double per_mb = mt_gpt_flops_per_step(&whole, B, T);
  double head = 3.0 * 2.0 * B * T * (double)ms->n_embd * ms->padded_vocab;
  per_mb = (per_mb - head) * tr->model.n_layers / ms->n_layer + (tr->model.last ? head : 0.0);
  tr->flops_per_micro = per_mb / tr->g.tp_size;
  tr->flops_per_step = tr->flops_per_micro * tr->micro_batches;
  return 0;
}

void mt_trainer_destroy(mt_trainer *tr) {
  free(tr->buckets);
  free(tr->norm_spans);
  free(tr->pnorm_spans);
  free(tr->zero_spans);
  free(tr->timer_ranks);
  if (tr->chunks != &tr->model) {
    for (int c = 0; c < tr->n_chunks; c++) mt_gpt_destroy(&tr->chunks[c]);
    free(tr->chunks);
  }
  if (tr->recv_buf) mt_device_free(tr->dev, tr->recv_buf);
  mt_gpt_destroy(&tr->model);
  mt_adamw_destroy(&tr->opt);
  mt_data_source_free(tr->data);
  free(tr->inputs);
  memset(tr, 0, sizeof *tr);
}

/* ---- the pipeline ---- */

/* Started sends of stage outputs not yet waited for, oldest first. */
#define ACT_SENDS (MT_COMM_P2P_MAX / 2)

typedef struct pipe_run {
  mt_trainer *tr;
  mt_split split;
  uint64_t first;        /* global sample of this replica's micro-batch 0 */
  int micro;             /* micro-batches of this run on this replica */
  float loss_scale;      /* 0: forward only */
  int overlap;           /* parallel.overlap_p2p */
  double loss_sum;       /* last stage: Σ micro-batch mean losses */
  mt_pipe_op *ops;       /* the schedule (mt_pipe_schedule) */
  int n_ops;             /* its length */
  double wait_ms;        /* blocked in point-to-point with the neighbours */
  int act_rx, grad_rx;   /* the receive in flight of each kind, -1 when none */
  int act_rxs, grad_rxs; /* receives of each kind posted: the n-th goes to buffer n % 2 */
  struct {
    int req, chunk, micro; /* request, and the operation whose output it sends */
  } act[ACT_SENDS];
  int n_act;     /* act[0..n_act) pending, oldest first */
  int grad_send; /* the input gradient's send, -1 when none is pending */
} pipe_run;

int mt_pipe_schedule(int pp, int s, int v, int micro, int forward_only, mt_pipe_op *ops) {
  int total = micro * v, warm;
  if (forward_only)
    warm = total;
  else if (v == 1)
    warm = pp - s - 1;
  else /* Megatron: all forwards first when there are only pp micro-batches */
    warm = micro == pp ? total : 2 * (pp - s - 1) + (v - 1) * pp;
  if (warm > total) warm = total;
  int fwd = 0, bwd = 0, n = 0, group = pp * v;
  while (fwd < total || (!forward_only && bwd < total)) {
    int f = fwd < total && (fwd < warm || fwd - warm == bwd || forward_only);
    int k = f ? fwd++ : bwd++;
    /* k-th of its kind: micro-batches taken pp at a time per chunk */
    int chunk = v == 1 ? 0 : k % group / pp;
    ops[n++] = (mt_pipe_op){.kind = f ? MT_PIPE_FWD : MT_PIPE_BWD,
                            .chunk = f ? chunk : v - 1 - chunk,
                            .micro = v == 1 ? k : k / group * pp + k % pp};
  }
  return n;
}

int mt_pipe_inflight(int pp, int s, int v, int micro, int *inflight) {
  if (v == 1) { /* 1F1B: the warm-up's forwards and one */
    inflight[0] = pp - s < micro ? pp - s : micro;
    return 0;
  }
  for (int c = 0; c < v; c++) inflight[c] = 0;
  mt_pipe_op *ops = malloc(2 * (size_t)micro * v * sizeof *ops);
  int *held = calloc((size_t)v, sizeof *held);
  if (!ops || !held) {
    free(ops);
    free(held);
    return mt_seterr(MT_ENOMEM, "pipeline: the schedule of %d micro-batches", micro);
  }
  /* steps of fewer micro-batches (a batch ramp-up) may hold more at once in
   * the interleaved schedule: every count up to micro, past where the
   * pattern repeats, and micro itself */
  int upto = micro;
  if (upto > 4 * pp * v + 2 * pp) upto = (4 * v + 2) * pp;
  for (int m = upto; m >= pp; m -= pp) {
    int count = m == upto ? micro : m; /* the first pass: the step's own */
    int n = mt_pipe_schedule(pp, s, v, count, 0, ops);
    memset(held, 0, (size_t)v * sizeof *held);
    for (int i = 0; i < n; i++) {
      int c = ops[i].chunk;
      held[c] += ops[i].kind == MT_PIPE_FWD ? 1 : -1;
      if (held[c] > inflight[c]) inflight[c] = held[c];
    }
  }
  free(ops);
  free(held);
  return 0;
}

/* Bytes of an activation gradient between stages (fp32) and of an
 * activation (mt_gpt_wire_bytes: 16-bit in a bf16 or fp16 job). */
static size_t grad_bytes(const mt_trainer *tr) {
  return mt_gpt_stream_rows(&tr->model) * tr->job->model.n_embd * sizeof(float);
}
static size_t act_bytes(const mt_trainer *tr) { return mt_gpt_wire_bytes(&tr->model); }

/* Time spent here is the pipeline's wait: the bubble plus transfers. */
static int p2p_wait(pipe_run *r, mt_comm *c, int req) {
  double t0 = 1e3 * mt_mono_s();
  int rc = mt_comm_p2p_wait(c, req);
  r->wait_ms += 1e3 * mt_mono_s() - t0;
  return rc;
}

/* Waits for the oldest started sends of outputs while more than keep are
 * pending, and for every send up to the newest of chunk's outputs of
 * micro-batches <= upto (chunk -1: any chunk's). A link delivers in order,
 * so the older ones arrive first anyway. */
static int wait_act_sends(pipe_run *r, int chunk, int upto, int keep) {
  int last = -1;
  for (int i = 0; i < r->n_act; i++)
    if ((chunk < 0 || r->act[i].chunk == chunk) && r->act[i].micro <= upto) last = i;
  int rc = 0;
  while (!rc && r->n_act > 0 && (last >= 0 || r->n_act > keep)) {
    rc = p2p_wait(r, r->tr->g.act_out, r->act[0].req);
    memmove(r->act, r->act + 1, (size_t)--r->n_act * sizeof *r->act);
    last--;
  }
  return rc;
}

static int wait_grad_send(pipe_run *r) {
  int req = r->grad_send;
  r->grad_send = -1;
  return req >= 0 ? p2p_wait(r, r->tr->g.grad_out, req) : 0;
}

/* Whether operation o's input comes over a link: a forward's from the
 * stage before unless o is the model's first chunk, a backward's from the
 * stage after unless its last. */
static int receives(const mt_trainer *tr, const mt_pipe_op *o) {
  const mt_gpt *m = &tr->chunks[o->chunk];
  return o->kind == MT_PIPE_FWD ? !m->first : !m->last;
}

/* Posts the receive that operation o needs (o NULL or an end of the
 * model: nothing) into the buffer its kind's receives take next: the other
 * may still be read. At most one of each kind is in flight. */
static int post_recv(pipe_run *r, const mt_pipe_op *o) {
  mt_trainer *tr = r->tr;
  if (!o || !receives(tr, o)) return 0;
  int fwd = o->kind == MT_PIPE_FWD;
  mt_comm *c = fwd ? tr->g.act_in : tr->g.grad_in;
  int n = fwd ? r->act_rxs++ : r->grad_rxs++;
  void *buf = fwd ? tr->recv_wire[n % 2] : (void *)tr->recv_dy[n % 2];
  return mt_comm_sendrecv_start(c, NULL, 0, -1, buf, fwd ? act_bytes(tr) : grad_bytes(tr),
                                1 - mt_comm_rank(c), MT_COMM_U8, NULL,
                                fwd ? &r->act_rx : &r->grad_rx);
}

/* Waits for the receive o needs (posted by post_recv). */
static int wait_recv(pipe_run *r, const mt_pipe_op *o) {
  if (!o || !receives(r->tr, o)) return 0;
  int fwd = o->kind == MT_PIPE_FWD;
  mt_comm *c = fwd ? r->tr->g.act_in : r->tr->g.grad_in;
  int *req = fwd ? &r->act_rx : &r->grad_rx;
  if (*req < 0) return 0;
  int rc = p2p_wait(r, c, *req);
  *req = -1;
  return rc;
}

/* The buffer the receive of o's kind now waited for landed in. */
static const void *received(const pipe_run *r, const mt_pipe_op *o) {
  const mt_trainer *tr = r->tr;
  if (o->kind == MT_PIPE_FWD) return tr->recv_wire[(r->act_rxs - 1) % 2];
  return tr->recv_dy[(r->grad_rxs - 1) % 2];
}

/* Starts the send of what o just made: the chunk's output of its
 * micro-batch to the next stage, or its input gradient to the one before
 * (the ends of the model send nothing). */
static int start_send(pipe_run *r, const mt_pipe_op *o) {
  mt_trainer *tr = r->tr;
  const mt_gpt *m = &tr->chunks[o->chunk];
  if (o->kind == MT_PIPE_FWD) {
    if (m->last) return 0;
    mt_comm *c = tr->g.act_out;
    int rc = wait_act_sends(r, -1, INT_MIN, ACT_SENDS - 1); /* room for one more */
    size_t bytes;
    const void *out = mt_gpt_stage_output_wire(m, o->micro % m->n_slots, &bytes);
    int req = -1;
    if (!rc) rc = mt_comm_sendrecv_start(c, out, bytes, 1, NULL, 0, -1, MT_COMM_U8, &req, NULL);
    if (!rc) {
      r->act[r->n_act].req = req, r->act[r->n_act].chunk = o->chunk;
      r->act[r->n_act++].micro = o->micro;
    }
    return rc;
  }
  if (m->first) return 0;
  return mt_comm_sendrecv_start(tr->g.grad_out, mt_gpt_stage_input_grad(m), grad_bytes(tr), 0, NULL,
                                0, -1, MT_COMM_U8, &r->grad_send, NULL);
}

/* Megatron's --eod-mask-loss (data.eod_mask_loss): a position whose input
 * token ends a document does not predict the next document's first token,
 * so its target leaves the loss (the model takes the mean over the rest).
 * Every tensor-parallel rank reads the same tokens, so masks alike. */
static void mask_eod_targets(const mt_trainer *tr, size_t n) {
  const mt_data_spec *ds = &tr->job->data;
  if (!ds->eod_mask_loss) return;
  for (size_t i = 0; i < n; i++)
    if (tr->inputs[i] == ds->eod_token) tr->targets[i] = MT_TARGET_IGNORE;
}

/* Forward of o's micro-batch through its chunk, from tokens or the
 * received input (x). */
static int stage_forward(pipe_run *r, const mt_pipe_op *o, const void *x_wire) {
  mt_trainer *tr = r->tr;
  mt_gpt *m = &tr->chunks[o->chunk];
  int j = o->micro;
  uint64_t sample0 = r->first + (uint64_t)j * (uint64_t)m->B;
  /* its output slot may still be on its way to the next stage */
  int rc = wait_act_sends(r, o->chunk, j - m->n_slots, ACT_SENDS);
  /* data.reset_attention_mask: every stage's attention needs the documents
   * of its micro-batch, and each stage reads its tokens itself, as every
   * stage of Megatron's pipeline built its own attention mask from them
   * (get_batch) in MT-NLG's time; current Megatron-LM's get_batch passes no
   * mask to middle pipeline stages (the key is silently lost there), while
   * mtnlg masks on every stage. Which samples a micro-batch holds is a function of the
   * step alone, so nothing more travels with the activations (whose wire
   * format, 16-bit or not, sequence-parallel or not, stays as it is) */
  int docs = m->cfg.reset_attention_mask;
  if (!rc && (m->first || m->last || docs))
    rc = mt_data_source_read(tr->data, r->split, sample0, m->B, tr->inputs, tr->targets);
  if (!rc && m->last) mask_eod_targets(tr, (size_t)m->B * m->T);
  const float *x = NULL;
  if (!rc && !m->first && !(x = mt_gpt_stage_input_from_wire(m, j % m->n_slots, x_wire)))
    rc = MT_EIO; /* a device copy failed: the message is set */
  if (!rc)
    rc = mt_gpt_forward_stage(m, j % m->n_slots, m->first || docs ? tr->inputs : NULL, x,
                              m->last ? tr->targets : NULL, sample0);
  if (!rc && m->last) r->loss_sum += m->last_loss;
  if (rc && tr->n_chunks > 1)
    return mt_wraperr(rc, "chunk %d, micro-batch %d forward", o->chunk, j);
  if (rc) return mt_wraperr(rc, "micro-batch %d forward", j);
  return 0;
}

static int stage_backward(pipe_run *r, const mt_pipe_op *o, const float *dy) {
  mt_trainer *tr = r->tr;
  mt_gpt *m = &tr->chunks[o->chunk];
  int j = o->micro;
  /* the input gradient buffer may still be on its way to the previous
   * stage; and with recomputation the backward writes j's activations again,
   * which j's started send may still name (done in fact, since the next
   * stage needed all of it for the gradient this backward received, but a
   * send's buffer is the transport's until its wait) */
  int rc = wait_grad_send(r);
  if (!rc) rc = wait_act_sends(r, o->chunk, j, ACT_SENDS);
  /* a chunk's last micro-batch's backward leaves its final gradients,
   * block by block (the chunks end in reverse order: the buckets' order) */
  if (!rc && tr->g.dp && j == r->micro - 1) {
    m->on_block_grads = start_buckets;
    m->grads_ctx = tr;
    tr->grads_block0 = 0;
    for (int c = 0; c < o->chunk; c++) tr->grads_block0 += tr->chunks[c].n_layers;
  }
  if (!rc) rc = mt_gpt_backward_stage(m, j % m->n_slots, m->last ? NULL : dy, r->loss_scale);
  m->on_block_grads = NULL;
  if (rc && tr->n_chunks > 1)
    return mt_wraperr(rc, "chunk %d, micro-batch %d backward", o->chunk, j);
  if (rc) return mt_wraperr(rc, "micro-batch %d backward", j);
  return 0;
}

/* Runs this stage's operations in schedule order. Each operation's input
 * comes on a link from a neighbour and its output leaves on another (with
 * virtual stages the links close a ring: the last stage's chunk c feeds
 * the first stage's chunk c + 1). With overlap (parallel.overlap_p2p) the
 * receive of the next operation is posted before this one computes, into
 * the other of its kind's two buffers, and waited for only when that
 * operation starts; sends are waited for only before their buffer is
 * written again (the slot's next micro-batch, the next backward) and at
 * the end. Without, every exchange completes before the next compute: this
 * operation's send and the next one's receive, posted together, as
 * Megatron's blocking schedule does (with virtual stages the receive
 * only, see below). Each link carries one kind in one
 * direction, and every stage numbers a kind's operations alike (the k-th
 * forward of every stage is the same chunk's same micro-batch; across the
 * ring's wrap, k and k + pp), so both ends post a link's messages in the
 * same order and posting ahead never reorders what a link carries: no
 * new deadlock on NCCL's in-order streams. Both ways give the same bits. */
static int run_pipeline(pipe_run *r) {
  mt_trainer *tr = r->tr;
  r->act_rx = r->grad_rx = r->grad_send = -1;
  r->ops = malloc(2 * (size_t)r->micro * tr->n_chunks * sizeof *r->ops);
  if (!r->ops) return mt_seterr(MT_ENOMEM, "pipeline: the schedule of %d micro-batches", r->micro);
  r->n_ops = mt_pipe_schedule(tr->g.pp_size, tr->g.pp_rank, tr->n_chunks, r->micro,
                              r->loss_scale == 0.0f, r->ops);
  const mt_pipe_op *o = r->n_ops ? &r->ops[0] : NULL;
  int rc = post_recv(r, o);
  if (!r->overlap && !rc) rc = wait_recv(r, o);
  for (int i = 0; !rc && i < r->n_ops; i++) {
    o = &r->ops[i];
    const mt_pipe_op *next = i + 1 < r->n_ops ? &r->ops[i + 1] : NULL;
    if (r->overlap) rc = wait_recv(r, o);
    const void *in = !rc && receives(tr, o) ? received(r, o) : NULL;
    if (!rc && r->overlap) rc = post_recv(r, next);
    if (!rc) {
      /* "forward 3", "backward 3" (with virtual stages "forward 3, chunk 1") */
      if (tr->n_chunks > 1)
        mt_range_push("%s %d, chunk %d", o->kind == MT_PIPE_FWD ? "forward" : "backward", o->micro,
                      o->chunk);
      else
        mt_range_push("%s %d", o->kind == MT_PIPE_FWD ? "forward" : "backward", o->micro);
      rc = o->kind == MT_PIPE_FWD ? stage_forward(r, o, in) : stage_backward(r, o, in);
      mt_range_pop();
    }
    if (!rc) rc = start_send(r, o);
    if (!rc && !r->overlap) {
      rc = post_recv(r, next);
      /* the ring of virtual stages would deadlock on a send waited for at
       * once (its receiver posts the receive for its own next operation,
       * which may wait for this stage; Megatron batches both directions'
       * exchanges there): its sends are waited for when their buffers are
       * needed again, and only the receives complete before the next compute */
      if (!rc && tr->n_chunks == 1)
        rc = o->kind == MT_PIPE_FWD ? wait_act_sends(r, -1, INT_MAX, 0) : wait_grad_send(r);
      if (!rc) rc = wait_recv(r, next);
    }
  }
  if (!rc) rc = wait_act_sends(r, -1, INT_MAX, 0);
  if (!rc) rc = wait_grad_send(r);
  free(r->ops);
  r->ops = NULL;
  return rc;
}

/* A rank's vote on whether its device failed (dev_rc), for a world
 * all-reduce (sum): 1 and its world rank when it did, else 0 and 0. Summed,
 * vote[0] counts the failed devices and vote[1] sums their world ranks (the
 * rank itself when one failed). */
static void device_vote(double vote[2], const mt_trainer *tr, int dev_rc) {
  int world_rank = tr->g.world ? mt_comm_rank(tr->g.world) : 0;
  vote[0] = dev_rc ? 1.0 : 0.0;
  vote[1] = dev_rc ? (double)world_rank : 0.0;
}

/* The error of a rank whose step failed because another rank's device did,
 * from the summed votes; what follows says where. */
static int other_device_failed(long long step, const char *what, const double vote[2]) {
  if (vote[0] == 1.0)
    return mt_seterr(MT_EIO, "step %lld: the device of world rank %.0f failed%s", step, vote[1],
                     what);
  return mt_seterr(MT_EIO, "step %lld: the devices of %.0f other ranks failed%s", step, vote[0],
                   what);
}

/* The error of a rank whose own device failed in a step and whose vote on
 * it then failed too: its fault is the step's cause and stays first in the
 * message. The vote fails so when a rank that had the sum already failed
 * its step and the generation was ended under this one (a node aborts its
 * ranks' groups once one fails): "aborted" alone would hide which device
 * failed. dev_msg is the device's message, kept from before the vote. */
static int own_fault_first(int dev_rc, long long step, const char *where, const char *dev_msg,
                           const char *vote) {
  char comm[512];
  mt_errmsg_keep(comm, sizeof comm);
  return mt_seterr(dev_rc, "step %lld: %s%s; then %s: %s", step, where, dev_msg, vote, comm);
}

/* train.timing_log_level: this step's timers, the least and the most of
 * any rank, into st: one all-reduce of the maxima of ms and -ms, or under
 * train.timing_log_option all one all-gather of every rank's ms, which st
 * then points at too */
static int timers_across_ranks(mt_trainer *tr, mt_step_stats *st) {
  st->timing_level = tr->timers.level;
  st->timing_option = tr->job->train.timing_log_option;
  if (tr->timer_ranks) {
    int n = tr->g.world ? mt_comm_size(tr->g.world) : 1;
    int rc = 0;
    if (tr->g.world)
      rc = mt_comm_allgather(tr->g.world, tr->timers.ms, tr->timer_ranks, MT_TM_COUNT, MT_COMM_F64);
    else
      memcpy(tr->timer_ranks, tr->timers.ms, sizeof tr->timers.ms);
    if (rc) return rc;
    for (int i = 0; i < MT_TM_COUNT; i++) {
      st->timer_min[i] = st->timer_max[i] = tr->timer_ranks[i];
      for (int r = 1; r < n; r++) {
        double v = tr->timer_ranks[(size_t)r * MT_TM_COUNT + i];
        st->timer_min[i] = v < st->timer_min[i] ? v : st->timer_min[i];
        st->timer_max[i] = v > st->timer_max[i] ? v : st->timer_max[i];
      }
    }
    st->timer_ranks = tr->timer_ranks, st->timer_ranks_n = n;
    return 0;
  }
  double mm[2 * MT_TM_COUNT];
  for (int i = 0; i < MT_TM_COUNT; i++) mm[i] = tr->timers.ms[i], mm[MT_TM_COUNT + i] = -mm[i];
  if (tr->g.world) {
    int rc = mt_comm_allreduce(tr->g.world, mm, mm, 2 * MT_TM_COUNT, MT_COMM_F64, MT_COMM_MAX);
    if (rc) return rc;
  }
  for (int i = 0; i < MT_TM_COUNT; i++)
    st->timer_max[i] = mm[i], st->timer_min[i] = -mm[MT_TM_COUNT + i];
  return 0;
}

/* A phase of the step: its timer (train.timing_log_level) and its range on
 * a profiler's timeline (range.h), both by the timer's name. */
static double phase_begin(mt_timers *tm, int id) {
  mt_range_push("%s", mt_timer_name(id));
  return mt_timers_now(tm);
}

static void phase_end(mt_timers *tm, int id, double since) {
  mt_timers_add(tm, id, since);
  mt_range_pop();
}

static int trainer_step(mt_trainer *tr, mt_step_stats *st);

/* The step in a range of its own ("step N"); a phase that failed is closed
 * with it. */
int mt_trainer_step(mt_trainer *tr, mt_step_stats *st) {
  int depth = mt_range_depth();
  mt_range_push("step %lld", (long long)tr->step + 1);
  int rc = trainer_step(tr, st);
  mt_range_pop_to(depth);
  return rc;
}

static int trainer_step(mt_trainer *tr, mt_step_stats *st) {
  const mt_job *job = tr->job;
  mt_gpt *m = &tr->model;
  mt_device *d = tr->dev;
  /* the batch of this step: the job's, or under a ramp-up the one its
   * samples read so far call for; every rank agrees, having read as many */
  int G = mt_job_batch_at(job, tr->consumed_samples);
  int total_micro = G / m->B; /* over every replica */
  tr->micro_batches = total_micro / tr->g.dp_size;
  tr->flops_per_step = tr->flops_per_micro * tr->micro_batches;
  long long sn = (long long)tr->step + 1;
  double t0 = 1e3 * mt_mono_s();
  memset(st, 0, sizeof *st);
  /* train.timing_log_level: each phase from ph (mt_timers_now, after the
   * device's queued work) to its end */
  mt_timers *tm = &tr->timers;
  memset(tm->ms, 0, sizeof tm->ms);
  double ph = phase_begin(tm, MT_TM_WEIGHTS_ROUND);

  /* the weights this step computes with: the master's, rounded (mixed precision) */
  int rc = mt_gpt_round_weights(m);
  if (rc) return mt_wraperr(rc, "step %lld: rounding the weights", sn);
  phase_end(tm, MT_TM_WEIGHTS_ROUND, ph);
  ph = phase_begin(tm, MT_TM_FORWARD_BACKWARD);
  mt_gpt_zero_grad(m);
  /* objective: the mean loss over the global batch, times the loss scale
   * (fp16; 1 otherwise, which leaves every product exact) */
  int fp16 = tr->precision == MT_PREC_FP16;
  float scale = fp16 ? tr->scaler.scale : 1.0f;
  tr->next_bucket = tr->n_buckets - 1;
  pipe_run r = {.tr = tr,
                .split = MT_SPLIT_TRAIN,
                .first = (uint64_t)tr->consumed_samples +
                         (uint64_t)tr->g.dp_rank * (uint64_t)(G / tr->g.dp_size),
                .micro = tr->micro_batches,
                .loss_scale = scale / (float)total_micro,
                .overlap = job->parallel.overlap_p2p};
  rc = run_pipeline(&r);
  if (rc) return mt_wraperr(rc, "step %lld, pipeline stage %d", sn, tr->g.pp_rank);
  phase_end(tm, MT_TM_FORWARD_BACKWARD, ph);
  if (tm->level >= 1) tm->ms[MT_TM_PIPELINE_WAIT] = r.wait_ms;

  double comm_t0 = 1e3 * mt_mono_s();
  /* ZeRO-1: each rank's slice holds the sum over replicas of its gradients
   * once the buckets the backward did not start yet are reduced too */
  const float *grad = m->grads + tr->shard_lo;
  if (tr->g.dp) {
    ph = phase_begin(tm, MT_TM_ALL_GRADS_SYNC);
    rc = start_buckets(tr, -1);
    if (!rc) rc = mt_comm_wait(tr->g.dp);
    if (rc) return mt_wraperr(rc, "step %lld: gradient reduction over dp", sn);
    phase_end(tm, MT_TM_ALL_GRADS_SYNC, ph);
  }
  /* the two copies of the tied embedding get the sum of both gradients, in
   * Megatron's order: over dp first, whole (every replica of a stage then
   * holds the same sum, whichever rank owns an element), then between the
   * two stages, a sum of two that is the same both ways round. So the copies
   * stay equal bit for bit. Reduced in the buckets, each element was summed
   * over dp in an order that depends on its owner (a chain reduce starts
   * after its root), and the owners differ between the stages: the copies
   * drifted apart by rounding at dp >= 3. */
  if (tied_copy(tr)) {
    ph = phase_begin(tm, MT_TM_EMBEDDING_GRADS);
    const mt_param *wte = &m->params_table[m->i_wte];
    float *g = m->grads + wte->offset;
    if (tr->g.dp) {
      rc = mt_comm_allreduce(tr->g.dp, g, g, wte->numel, MT_COMM_F32, MT_COMM_SUM);
      if (rc) return mt_wraperr(rc, "step %lld: tied embedding all-reduce over dp", sn);
    }
    rc = mt_comm_allreduce(tr->g.embed, g, g, wte->numel, MT_COMM_F32, MT_COMM_SUM);
    if (rc) return mt_wraperr(rc, "step %lld: tied embedding all-reduce", sn);
    phase_end(tm, MT_TM_EMBEDDING_GRADS, ph);
  }
  /* one all-reduce carries the loss, the squared norm, the stop request,
   * the pipeline's wait (for the bubble), the devices' faults, and the
   * coordinator's order word and train.exit_duration_mins' deadline on its
   * wall clock (0: none), which only world rank 0 contributes (so the sum
   * is its value, exactly) */
  double pipe_ms = 1e3 * mt_mono_s() - t0;
  double comm_ms = pipe_ms - (comm_t0 - t0);
  /* fp16: a scaled gradient out of fp16's range is an overflow, as it would
   * be inf in an fp16 backward; an infinite norm carries it to every rank */
  ph = phase_begin(tm, MT_TM_GRAD_NORM);
  double sumsq = slice_sumsq(tr, tr->norm_spans, grad);
  if (fp16 && !d->ops->fits_fp16(d, grad, tr->shard_n)) sumsq = INFINITY;
  phase_end(tm, MT_TM_GRAD_NORM, ph);
  double zeros = 0.0;
  if (job->train.log_num_zeros_in_grad) {
    ph = phase_begin(tm, MT_TM_COUNT_ZEROS);
    zeros = slice_zeros(tr);
    phase_end(tm, MT_TM_COUNT_ZEROS, ph);
  }
  /* ops cannot fail, so a fault one of this step's kernels met (a failed
   * launch or GEMM) is recorded on the device and told here; counted in the
   * all-reduce, it fails the step on every rank alike, before any update */
  int dev_rc = mt_device_sync(d);
  char dev_msg[1024] = "";
  if (dev_rc) mt_errmsg_keep(dev_msg, sizeof dev_msg);
  mt_trainer_poll(tr);
  double agreed[10] = {
      tr->g.tp_rank == 0 ? r.loss_sum : 0.0,
      sumsq,
      mt_trainer_stop_vote(tr),
      r.wait_ms,
      pipe_ms,
      (double)tr->order_word,
      0.0,
      0.0,
      tr->stop_at_ms > 0 ? wall_s() + ((double)tr->stop_at_ms - 1e3 * mt_mono_s()) / 1e3 : 0.0,
      zeros};
  device_vote(agreed + 6, tr, dev_rc);
  if (tr->g.world) {
    double c0 = 1e3 * mt_mono_s();
    mt_range_push("%s", mt_timer_name(MT_TM_STEP_ALL_REDUCE));
    rc = mt_comm_allreduce(tr->g.world, agreed, agreed, 10, MT_COMM_F64, MT_COMM_SUM);
    if (rc && dev_rc)
      return own_fault_first(dev_rc, sn, "", dev_msg, "the loss and norm all-reduce");
    if (rc) return mt_wraperr(rc, "step %lld: loss and norm all-reduce", sn);
    comm_ms += 1e3 * mt_mono_s() - c0;
    phase_end(tm, MT_TM_STEP_ALL_REDUCE, c0);
  }
  if (dev_rc) return mt_wraperr(dev_rc, "step %lld", sn); /* names the device */
  if (agreed[6] > 0) return other_device_failed(sn, "; no update applied", agreed + 6);
  /* the norm of the unscaled gradients: clipping and the log see it */
  double norm = sqrt(agreed[1]) / scale;
  /* the schedule counts the samples of applied updates, not steps: a
   * skipped step leaves the lr where it was, as Megatron's does, and the
   * position is in steps of the job's global batch now, as its lengths are
   * (under a ramp-up, or resumed with another global batch, that is not
   * Adam's t) */
  double done = (double)tr->lr_samples / job->train.global_batch;
  double lr = mt_lr_at(&job->train.lr, done);
  /* and the weight decay the same way: a resume recomputes it from there */
  tr->opt.weight_decay = mt_wd_at(&job->train.wd, done);
  if (fp16) {
    /* every rank holds the same scaler and sees the same norm: all skip alike */
    st->skipped = mt_loss_scale_update(&tr->scaler, !isfinite(norm));
    if (st->skipped && (!tr->g.world || mt_comm_rank(tr->g.world) == 0))
      mt_log_debug("step %lld: gradients overflowed at loss scale %g; update skipped, scale now %g",
                   sn, (double)scale, (double)tr->scaler.scale);
  } else if (!isfinite(norm)) {
    st->skipped = 1;
    tr->scaler.skipped++; /* the count a checkpoint keeps, loss scaling or not */
    mt_log_warn("step %lld: gradient norm is %g; update skipped", sn, norm);
  }
  if (!st->skipped) {
    ph = phase_begin(tm, MT_TM_OPTIMIZER);
    mt_adamw_step(&tr->opt, m, grad, lr, mt_clip_scale(norm, job->train.clip_grad) / scale);
    tr->lr_samples += G;
    phase_end(tm, MT_TM_OPTIMIZER, ph);
  }
  if (tr->g.dp) {
    double c0 = 1e3 * mt_mono_s();
    ph = phase_begin(tm, MT_TM_PARAMS_ALL_GATHER);
    rc = mt_comm_allgather(tr->g.dp, m->params + tr->shard_lo, m->params, tr->shard_n, MT_COMM_F32);
    if (rc) return mt_wraperr(rc, "step %lld: parameter all-gather", sn);
    comm_ms += 1e3 * mt_mono_s() - c0;
    phase_end(tm, MT_TM_PARAMS_ALL_GATHER, ph);
  }
  /* the update's own faults (AdamW, the all-gather's copies) are agreed on
   * too: a rank whose update failed may have sent the others a stale slice,
   * so no rank goes on, checkpoints or exports from this step. A CPU
   * device's sync cannot fail, and a job's devices are all of one kind (its
   * groups are NCCL or Gloo by it): CPU jobs skip this all-reduce (0.2 ms
   * with 2 ranks, 3 ms with 8 rank threads on 2 cores, bench_allreduce). */
  int upd_rc = mt_device_sync(d);
  if (tr->g.world && d->kind != MT_DEVICE_CPU) {
    double c0 = 1e3 * mt_mono_s(), bad[2];
    if (upd_rc) mt_errmsg_keep(dev_msg, sizeof dev_msg);
    device_vote(bad, tr, upd_rc);
    rc = mt_comm_allreduce(tr->g.world, bad, bad, 2, MT_COMM_F64, MT_COMM_SUM);
    if (rc && upd_rc)
      return own_fault_first(upd_rc, sn, "the update: ", dev_msg, "agreeing on the update");
    if (rc) return mt_wraperr(rc, "step %lld: agreeing on the update", sn);
    comm_ms += 1e3 * mt_mono_s() - c0;
    if (!upd_rc && bad[0] > 0) return other_device_failed(sn, " in the update", bad);
  }
  if (upd_rc) return mt_wraperr(upd_rc, "step %lld: the update", sn);
  if ((st->has_params_norm = job->train.log_params_norm)) {
    double c0 = 1e3 * mt_mono_s();
    if ((rc = params_norm(tr, &st->params_norm)))
      return mt_wraperr(rc, "step %lld: params norm all-reduce", sn);
    comm_ms += 1e3 * mt_mono_s() - c0;
  }
  if (tm->level > 0 && (rc = timers_across_ranks(tr, st)))
    return mt_wraperr(rc, "step %lld: the timers across ranks", sn);
  tr->step++;
  tr->consumed_samples += G;

  st->step = tr->step;
  st->consumed_samples = tr->consumed_samples;
  st->world_size = tr->g.world ? mt_comm_size(tr->g.world) : 1;
  st->consumed_tokens = tr->consumed_samples * job->model.seq_len;
  st->global_batch = G;
  st->rampup = job->train.rampup.start > 0;
  st->loss = agreed[0] / total_micro;
  st->lr = lr;
  st->grad_norm = norm;
  st->loss_scaling = fp16;
  st->loss_scale = fp16 ? tr->scaler.scale : 1.0;
  st->skipped_total = tr->scaler.skipped;
  st->stop = agreed[2] > 0;
  st->timed = mt_stop_vote_timed(agreed[2]);
  st->order = (int64_t)agreed[5];
  st->exit_at = agreed[8];
  /* as Megatron's, none for a skipped step (its optimizer returns no count) */
  st->has_num_zeros = job->train.log_num_zeros_in_grad && !st->skipped;
  st->num_zeros = (int64_t)agreed[9];
  st->bubble = tr->g.pp_size > 1 && agreed[4] > 0 ? agreed[3] / agreed[4] : 0.0;
  /* what this rank's device holds after the update, where it is read: the
   * memory line (a trainer's first step) and train.log_memory_to_tensorboard
   * (every step); none when the device cannot say (a figure, not the step's) */
  if (job->train.log_memory_to_tensorboard || !tr->memory_taken)
    st->has_memory = !mt_device_mem_stats(d, &st->memory);
  tr->memory_taken = 1;
  st->step_ms = 1e3 * mt_mono_s() - t0;
  st->comm_ms = comm_ms;
  st->tokens_per_s = (double)G * job->model.seq_len / (st->step_ms / 1e3);
  st->tflops = tr->flops_per_step / (st->step_ms / 1e3) / 1e12;
  return 0;
}

double mt_ppl(double loss) { return exp(fmin(loss, 20.0)); }

void mt_end_of_training_line(char *buf, size_t cap, const char *data, double loss) {
  snprintf(buf, cap,
           "validation loss at the end of training for %s data | lm loss value: %.6E | lm loss "
           "PPL: %.6E |",
           data, loss, mt_ppl(loss));
}

uint64_t mt_eval_first_batch(const mt_job *job, int64_t step, int end_of_training) {
  uint64_t I = job->eval.interval > 0 ? (uint64_t)job->eval.interval : 1;
  uint64_t iters = (uint64_t)job->eval.iters, s = step > 0 ? (uint64_t)step : 0;
  /* Megatron's valid iterator after step s has read s / interval runs; a
   * run between them (a stop's) reads what the next one will */
  if (end_of_training) return s / I * iters;
  return s > 0 ? (s - 1) / I * iters : 0;
}

int mt_trainer_has_test(mt_trainer *tr, int *has) {
  /* only the stages that read tokens open the data (the first and the last,
   * every stage with data.reset_attention_mask); they open it alike */
  double v[2] = {tr->data && mt_data_source_has_test(tr->data), tr->data != NULL};
  int rc = 0;
  if (tr->g.world) rc = mt_comm_allreduce(tr->g.world, v, v, 2, MT_COMM_F64, MT_COMM_SUM);
  if (rc) return mt_wraperr(rc, "test split");
  *has = v[1] > 0 && v[0] == v[1];
  return 0;
}

int mt_trainer_eval(mt_trainer *tr, mt_split which, int end_of_training, uint64_t first_batch,
                    double *loss) {
  const mt_job *job = tr->job;
  mt_gpt *m = &tr->model;
  int G = job->train.global_batch; /* validation batches are full ones, ramp-up or not */
  int micro = G / (m->B * tr->g.dp_size);
  const char *what = which == MT_SPLIT_TEST ? "test" : "validation";
  double sum = 0.0;
  int rc = mt_gpt_round_weights(m);
  if (rc) return mt_wraperr(rc, "%s: rounding the weights", what);
  for (int c = 0; c < tr->n_chunks; c++) tr->chunks[c].training = 0;
  m->training = 0;
  int timing = tr->timers.level; /* the timers time training steps */
  tr->timers.level = 0;
  mt_eval_progress pr = {.split = which,
                         .end_of_training = end_of_training,
                         .step = tr->step,
                         .total = job->eval.iters};
  /* the pass in a range of its own, each batch in one inside it */
  int depth = mt_range_depth();
  mt_range_push("%s after step %lld", which == MT_SPLIT_TEST ? "test" : "validation",
                (long long)tr->step);
  if (tr->on_eval) tr->on_eval(&pr, tr->eval_arg);
  for (int e = 0; e < job->eval.iters && !rc; e++) {
    pipe_run r = {.tr = tr,
                  .split = which,
                  .first = (first_batch + (uint64_t)e) * (uint64_t)G +
                           (uint64_t)tr->g.dp_rank * (uint64_t)(G / tr->g.dp_size),
                  .micro = micro,
                  .overlap = tr->job->parallel.overlap_p2p};
    mt_range_push("%s batch %d", what, e);
    rc = run_pipeline(&r);
    mt_range_pop();
    if (tr->g.tp_rank == 0) sum += r.loss_sum;
    pr.done = e + 1;
    if (!rc && tr->on_eval) tr->on_eval(&pr, tr->eval_arg);
  }
  for (int c = 0; c < tr->n_chunks; c++) tr->chunks[c].training = 1;
  m->training = 1;
  tr->timers.level = timing;
  /* a device fault in the forwards fails validation on every rank alike */
  int dev_rc = rc ? 0 : mt_device_sync(tr->dev);
  char dev_msg[1024] = "";
  if (dev_rc) mt_errmsg_keep(dev_msg, sizeof dev_msg);
  double agreed[3] = {sum};
  device_vote(agreed + 1, tr, dev_rc);
  if (!rc && tr->g.world) {
    rc = mt_comm_allreduce(tr->g.world, agreed, agreed, 3, MT_COMM_F64, MT_COMM_SUM);
    char vote[64];
    snprintf(vote, sizeof vote, "the %s all-reduce", what);
    if (rc && dev_rc) rc = own_fault_first(dev_rc, (long long)tr->step, "", dev_msg, vote);
  }
  if (!rc && dev_rc) rc = dev_rc; /* its message names the device */
  if (!rc && agreed[1] > 0)
    rc = other_device_failed((long long)tr->step,
                             which == MT_SPLIT_TEST ? " in the test pass" : " in validation",
                             agreed + 1);
  mt_range_pop_to(depth);
  if (rc) return mt_wraperr(rc, "%s", what);
  sum = agreed[0];
  *loss = sum / ((double)job->eval.iters * (G / m->B));
  return 0;
}

/* Tensor p of this rank's model as host floats: the master weights
 * themselves on a CPU device, else copied into piece. */
static int export_piece(const mt_gpt *m, const mt_param *p, float *piece, const float **out) {
  if (m->dev->kind == MT_DEVICE_CPU) {
    *out = m->params + p->offset;
    return 0;
  }
  *out = piece;
  return mt_device_memcpy_dtoh(m->dev, piece, m->params + p->offset, p->numel * sizeof(float));
}

/* Whether a (stage, tp shard) of replica 0 sends tensor p for the export:
 * a replicated tensor comes from shard 0, the tied embedding from the
 * first stage. */
static int export_sends(const mt_gpt *m, const mt_param *p) {
  if (m->cfg.tp_rank > 0 && p->shard == MT_SHARD_NONE) return 0;
  return m->first || strcmp(p->name, "wte.weight");
}

/* Replica 0's ranks that do not write: every tensor they hold for the
 * export, one at a time, in table order (the order the writer takes them),
 * to world rank `to`. */
static int export_send(const mt_trainer *tr, float *piece, int to) {
  const mt_gpt *m = &tr->model;
  int rc = 0;
  for (int j = 0; j < m->n_tensors && !rc; j++) {
    const mt_param *p = &m->params_table[j];
    const float *data;
    if (!export_sends(m, p)) continue;
    rc = export_piece(m, p, piece, &data);
    if (!rc) rc = mt_comm_send(tr->g.world, data, p->numel, MT_COMM_F32, to);
    if (rc) mt_wraperr(rc, "export: tensor %s to world rank %d", p->name, to);
  }
  return rc;
}

/* What an export needs to know of the job's layout, the same on every rank
 * of replica 0. */
typedef struct {
  mt_param **tables; /* replica 0's shard tables, [s * tp + q] */
  int *counts;
  mt_param *whole; /* the whole model's tensors, in the file's order */
  int n_whole;
  int parts;               /* what a directory's files split into: the stages, or with
                              virtual stages their chunks (pp * v) */
  int *stage_begin;        /* each part's first block */
  size_t max_numel;        /* the largest piece or tensor a rank holds */
  uint64_t bytes, stage_b; /* the file's bytes; the most of one stage's */
} export_layout;

static void export_layout_free(export_layout *x, int n_tables) {
  for (int k = 0; x->tables && k < n_tables; k++) free(x->tables[k]);
  free(x->tables);
  free(x->counts);
  free(x->whole);
  free(x->stage_begin);
}

/* The part whose files hold whole tensor t: wte and wpe the first, ln_f
 * (and an untied lm_head) the last, a block's tensors the part holding its
 * layer. */
static int export_part_of(const export_layout *x, const mt_param *t) {
  if (t->layer < 0)
    return strncmp(t->name, "ln_f.", 5) && strcmp(t->name, "lm_head.weight") ? 0 : x->parts - 1;
  int s = 0;
  while (s + 1 < x->parts && x->stage_begin[s + 1] <= t->layer) s++;
  return s;
}

/* The first stage holding whole tensor t (the tied wte: the first). */
static int export_stage_of(const mt_trainer *tr, const export_layout *x, const mt_param *t) {
  int s = 0, tp = tr->g.tp_size;
  while (s < tr->g.pp_size && mt_param_find(x->tables[s * tp], x->counts[s * tp], t->name) < 0) s++;
  return s;
}

static int export_layout_make(const mt_trainer *tr, export_layout *x) {
  const mt_gpt *m = &tr->model;
  int pp = tr->g.pp_size, tp = tr->g.tp_size, rc = 0;
  x->parts = pp * tr->n_chunks;
  x->tables = calloc((size_t)(pp * tp), sizeof *x->tables);
  x->counts = calloc((size_t)(pp * tp), sizeof *x->counts);
  x->stage_begin = calloc((size_t)x->parts, sizeof *x->stage_begin);
  if (!x->tables || !x->counts || !x->stage_begin)
    return mt_seterr(MT_ENOMEM, "export: shard tables");
  for (int s = 0, end; s < x->parts; s++)
    mt_stage_layers(m->cfg.n_layer, x->parts, s, &x->stage_begin[s], &end);
  for (int k = 0; k < pp * tp && !rc; k++) {
    mt_gpt_config sc = m->cfg;
    sc.tp_rank = k % tp;
    mt_gpt_set_stage(&sc, pp, k / tp, tr->n_chunks);
    size_t count;
    rc = mt_gpt_table(&sc, &x->tables[k], &x->counts[k], &count);
    for (int i = 0; !rc && i < x->counts[k]; i++)
      if (x->tables[k][i].numel > x->max_numel) x->max_numel = x->tables[k][i].numel;
  }
  mt_gpt_config wc = m->cfg;
  mt_gpt_set_stage(&wc, 1, 0, 1);
  wc.tp_size = 1, wc.tp_rank = 0;
  size_t whole_count = 0;
  if (!rc) rc = mt_gpt_table(&wc, &x->whole, &x->n_whole, &whole_count);
  uint64_t *per_stage = rc ? NULL : calloc((size_t)pp, sizeof *per_stage);
  if (!rc && !per_stage) rc = mt_seterr(MT_ENOMEM, "export: shard tables");
  for (int i = 0; !rc && i < x->n_whole; i++) {
    int s = export_stage_of(tr, x, &x->whole[i]);
    if (s == pp)
      rc = mt_seterr(MT_EINVAL, "export: no stage holds tensor %s", x->whole[i].name);
    else
      per_stage[s] += x->whole[i].numel * sizeof(float);
  }
  for (int s = 0; !rc && s < pp; s++)
    if (per_stage[s] > x->stage_b) x->stage_b = per_stage[s];
  x->bytes = (uint64_t)whole_count * sizeof(float);
  free(per_stage);
  return rc;
}

/* The first error of an export's writes, kept while its pieces are still
 * taken: a file that cannot be written (a full disk) does not stop the
 * receives, so every sender finishes and the write's error is the result. */
typedef struct {
  int rc;
  char msg[1024];
} export_err;

static void export_failed(export_err *w, int rc) {
  if (rc && !w->rc) {
    w->rc = rc;
    snprintf(w->msg, sizeof w->msg, "%s", mt_errmsg());
  }
}

/* A writer: each tensor of the whole model (part -1) or of part `part`
 * (export_part_of), in the file's order, its shards from the (stage, tp rank) of replica 0
 * that holds them, put to e (NULL: its open failed; the pieces are still
 * taken). */
static int export_gather(const mt_trainer *tr, const export_layout *x, int part, mt_gpt_export *e,
                         float *piece, export_err *w) {
  const mt_gpt *m = &tr->model;
  int tp = tr->g.tp_size, rc = 0, me = mt_comm_rank(tr->g.world);
  for (int i = 0; i < x->n_whole && !rc; i++) {
    const mt_param *t = &x->whole[i];
    if (part >= 0 && export_part_of(x, t) != part) continue;
    int s = export_stage_of(tr, x, t);
    for (int q = 0; q < tp && !rc; q++) {
      int k = mt_param_find(x->tables[s * tp + q], x->counts[s * tp + q], t->name);
      const mt_param *sp = k < 0 ? NULL : &x->tables[s * tp + q][k];
      if (!sp || (q > 0 && sp->shard == MT_SHARD_NONE)) continue;
      int from = q + tp * tr->g.dp_size * s; /* world rank of (s, dp 0, q) */
      const float *data = piece;
      if (from == me) /* this rank's own table: its entry's offset is into m->params */
        rc =
            export_piece(m, &m->params_table[mt_param_find(m->params_table, m->n_tensors, t->name)],
                         piece, &data);
      else if ((rc = mt_comm_recv(tr->g.world, piece, sp->numel, MT_COMM_F32, from)))
        mt_wraperr(rc, "export: tensor %s from world rank %d", t->name, from);
      if (!rc && e && !w->rc) export_failed(w, mt_gpt_export_put(e, sp, data));
    }
    if (!rc && e && !w->rc) export_failed(w, mt_gpt_export_next(e));
  }
  if (!rc && e && !w->rc) export_failed(w, mt_gpt_export_commit(e));
  return rc;
}

/* One file: world rank 0 writes it all. */
static int export_one_file(const mt_trainer *tr, const export_layout *x, const char *path,
                           mt_st_dtype dtype, float *piece) {
  export_err w = {0};
  mt_gpt_export *e = NULL;
  mt_gpt_export_plan plan = {.part = -1, .dtype = dtype};
  export_failed(&w, mt_gpt_export_open_sharded(&e, &tr->model.cfg, path, &plan));
  int rc = export_gather(tr, x, -1, e, piece, &w);
  mt_gpt_export_free(e);
  if (!rc && w.rc) rc = mt_seterr(w.rc, "%s", w.msg);
  return rc;
}

/* Hugging Face's sharded layout in dir (prepared by world rank 0): each
 * stage's tp rank 0 of replica 0 writes that stage's files (with virtual
 * stages, its chunks' parts in turn), its tp peers' pieces sent to it, all
 * stages at once, and tells world rank 0 how it went; world rank 0 writes
 * the index once every stage's files are in. */
static int export_stage(const mt_trainer *tr, const export_layout *x, const char *dir,
                        mt_st_dtype dtype, float *piece) {
  int pp = tr->g.pp_size, s = tr->g.pp_rank, me = mt_comm_rank(tr->g.world);
  export_err w = {0};
  mt_gpt_export *e = NULL; /* its first part's: world rank 0 writes the index with it */
  int rc = 0;
  for (int c = 0; c < x->parts / pp && !rc; c++) {
    mt_gpt_export_plan plan = {.dir = dir,
                               .pp = x->parts,
                               .stage_begin = x->stage_begin,
                               .part = c * pp + s,
                               .dtype = dtype};
    mt_gpt_export *part = NULL;
    export_failed(&w, mt_gpt_export_open_sharded(&part, &tr->model.cfg, NULL, &plan));
    rc = export_gather(tr, x, plan.part, part, piece, &w);
    if (c == 0)
      e = part;
    else
      mt_gpt_export_free(part);
  }
  if (rc) export_failed(&w, rc);
  if (me != 0) {
    int64_t code = w.rc;
    mt_comm *world = tr->g.world;
    int src = mt_comm_send(world, &code, 1, MT_COMM_I64, 0);
    if (!src) src = mt_comm_send(world, w.msg, sizeof w.msg, MT_COMM_U8, 0);
    if (src) mt_wraperr(src, "export: stage %d's outcome to world rank 0", s);
    mt_gpt_export_free(e);
    if (!rc && w.rc)
      rc = mt_seterr(w.rc, "stage %d (world rank %d) did not write its files: %s", s, me, w.msg);
    return rc ? rc : src;
  }
  for (int t = 1; t < pp && !rc; t++) {
    int from = t * tr->g.tp_size * tr->g.dp_size;
    int64_t code = 0;
    char msg[sizeof w.msg];
    rc = mt_comm_recv(tr->g.world, &code, 1, MT_COMM_I64, from);
    if (!rc) rc = mt_comm_recv(tr->g.world, msg, sizeof msg, MT_COMM_U8, from);
    if (rc)
      mt_wraperr(rc, "export: stage %d's outcome from world rank %d", t, from);
    else if (code && !w.rc) {
      msg[sizeof msg - 1] = 0;
      w.rc = (int)code;
      snprintf(w.msg, sizeof w.msg, "stage %d (world rank %d) did not write its files: %.900s", t,
               from, msg);
    }
  }
  if (!rc && !w.rc) export_failed(&w, mt_gpt_export_write_index(e));
  mt_gpt_export_free(e);
  if (!rc && w.rc) rc = mt_seterr(w.rc, "%s", w.msg);
  return rc;
}

int mt_trainer_export(mt_trainer *tr, const char *path) {
  mt_gpt *m = &tr->model;
  int world_rank = tr->g.world ? mt_comm_rank(tr->g.world) : 0;
  mt_st_dtype dtype = MT_ST_FP32; /* checkpoint.export_dtype, checked with the job */
  const char *dt = tr->job ? tr->job->checkpoint.export_dtype : "";
  if (dt[0] && mt_st_dtype_parse(dt, &dtype))
    return mt_wraperr(MT_EINVAL, "checkpoint.export_dtype");
  if (tr->g.pp_size == 1 && tr->g.tp_size == 1)
    return world_rank == 0 ? mt_gpt_save_safetensors_as(m, path, dtype) : 0;
  /* Replica 0's stages and shards stream their tensors to the writers,
   * which write each as it completes: no rank holds more than its own
   * weights and one tensor. One file is world rank 0's to write; a
   * directory's files are written a stage at a time by each stage's tp
   * rank 0, all at once. The world group moves host memory (Gloo). */
  if (tr->g.dp_rank != 0) return 0;
  int pp = tr->g.pp_size, tp = tr->g.tp_size, rc = mt_device_sync(m->dev);
  export_layout x = {0};
  if (!rc) rc = export_layout_make(tr, &x);
  for (int j = 0; j < m->n_tensors; j++)
    if (m->params_table[j].numel > x.max_numel) x.max_numel = m->params_table[j].numel;
  float *piece = NULL;
  if (!rc && !(piece = malloc((x.max_numel ? x.max_numel : 1) * sizeof *piece)))
    rc = mt_seterr(MT_ENOMEM, "export: a buffer of %zu floats", x.max_numel);
  /* a sender's first piece waits until its writer has written everything
   * before it: the world's deadline grows by what one writer writes at
   * 100 MB/s (as a resume's checks do), the same on every rank */
  int base_ms = mt_comm_timeout(tr->g.world);
  uint64_t ms = (uint64_t)base_ms + x.bytes / 100000;
  mt_comm_set_timeout(tr->g.world, ms > INT32_MAX ? INT32_MAX : (int)ms);
  /* world rank 0 says which it is, the directory made and its old index
   * removed before any stage writes into it: [a directory, go on] */
  int64_t how[2] = {0, 1};
  char dir[4096];
  int prep = 0, is_dir = mt_st_export_dir(path, dir, sizeof dir); /* rank 0's counts */
  if (!rc && world_rank == 0 && (how[0] = is_dir))
    how[1] = !(prep = mt_gpt_export_prepare_dir(dir));
  for (int k = 1; k < pp * tp && !rc && world_rank == 0; k++) {
    int to = k % tp + tp * tr->g.dp_size * (k / tp);
    if ((rc = mt_comm_send(tr->g.world, how, 2, MT_COMM_I64, to)))
      mt_wraperr(rc, "export: the layout to world rank %d", to);
  }
  if (!rc && world_rank != 0 && (rc = mt_comm_recv(tr->g.world, how, 2, MT_COMM_I64, 0)))
    mt_wraperr(rc, "export: the layout from world rank 0");
  if (!rc && how[0]) {
    ms = (uint64_t)base_ms + x.stage_b / 100000;
    mt_comm_set_timeout(tr->g.world, ms > INT32_MAX ? INT32_MAX : (int)ms);
  }
  int writer = tr->g.pp_rank * tp * tr->g.dp_size; /* of this stage's files */
  if (!rc && !how[1])
    rc = world_rank == 0 ? prep : 0; /* the directory's error is rank 0's */
  else if (!rc && !how[0])
    rc = world_rank == 0 ? export_one_file(tr, &x, path, dtype, piece) : export_send(tr, piece, 0);
  else if (!rc)
    rc = tr->g.tp_rank ? export_send(tr, piece, writer) : export_stage(tr, &x, dir, dtype, piece);
  mt_comm_set_timeout(tr->g.world, base_ms);
  export_layout_free(&x, pp * tp);
  free(piece);
  return rc;
}
