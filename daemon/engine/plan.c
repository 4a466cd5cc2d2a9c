/* plan.c — per-device memory and per-step FLOPs of a job (see plan.h).
 *
 * Notation as in the papers: h hidden, a heads, l layers, s sequence length,
 * b micro-batch, B global batch, V vocabulary (Vp padded), t = tp, p = pp,
 * m micro-batches per dp rank per step. Every count is per device.
 *
 * Choices, each with its reason:
 * - Gradients are fp32 (4 bytes per parameter) whatever the precision:
 *   Megatron accumulates into fp32 "main grads" under bf16/fp16, since a step
 *   sums up to m micro-batches and a 16-bit sum loses them. The upper figure.
 * - Mixed precision keeps a 16-bit model copy (2 bytes); its fp32 master is
 *   part of the ZeRO-1 slice: (4 master + 4 m + 4 v) / dp bytes per parameter.
 *   fp32 runs the optimizer on the weights themselves: (4 + 4) / dp.
 * - Activations, as this engine keeps them (Korthikanti et al. 2022,
 *   "Reducing Activation Recomputation in Large Transformer Models", count
 *   what Megatron keeps, tensor parallel without sequence parallelism:
 *   s b h (10 + 24/t + 5 a s/(h t)) bytes with 16-bit activations). Per layer
 *   and micro-batch this engine keeps, replicated over tp, the layer's input
 *   and the stream after attention (the LayerNorms' inputs, 2 sbh values),
 *   and split over tp Q, K, V, the attention-projection input and the GeLU
 *   input (8 sbh/t values): s b h (4 + 16/t) bytes in 16 bits, (8 + 32/t) in
 *   fp32. What Megatron also keeps is recomputed in the backward pass from
 *   these: the LayerNorms' outputs (the QKV and MLP inputs), the GeLU output,
 *   and the softmax with its dropout (5 a s² b / t, from each row's
 *   log-sum-exp, 4 a s b / t bytes in fp32, which is kept); dropout masks are
 *   redrawn from Philox, not stored.
 * - Working set: one set per device, whatever the layers and micro-batches:
 *   the buffers a block computes in, forward and backward (a LayerNorm
 *   output, GeLU's output, the backward's gradients of the stream, of QKV and
 *   of the MLP: s b h (5 + 15/t) values; in a 16-bit job the two outputs
 *   and the gradients of QKV and of the MLP's inner activation, s b h (1 +
 *   11/t), are 16-bit and the rest fp32, with the stream between blocks
 *   (two) and the stream after attention unpacked from 16 bits beside
 *   them, s b h (7 + 4/t) fp32
 *   values in all, as model/gpt.c lays them out), and attention's scratch: in fp32 2 (a/t) s min(s,
 * 512) values (the chunk of query rows a GPU works on, scores and their gradient; the CPU's is
 * smaller), in a 16-bit job the (a/t) s of the flash backward's row sums, for
 * up to 8 samples (mt_flash_bwd_samples), and, where the job may take the chunked
 * path (model.attention_backend chunked or auto, or a head over MT_FLASH_MAX_HS), the
 * chunked 16-bit GEMMs' tensors beside them (mt_att16_chunk: about 3 (a/t) s min(s, 512)
 * values, with dK and dV's sums, about 236 MiB at GPT-3 1.3B's shapes), which a GPU
 * makes when that path first runs. Counted with the activations.
 * - Full per-layer recomputation keeps only each layer's input, 2 s b h bytes
 *   (4 in fp32; replicated over tp), plus one layer's whole working set for
 *   one micro-batch while it is recomputed and run backward. With
 *   recompute_layers k only a stage's first k layers do (Megatron's block
 *   method); the others keep what they keep without recomputation.
 * - Sequence parallelism (tp > 1) splits the stream's rows over tp: what a
 *   layer keeps replicated (its input and the stream after attention, or
 *   with recomputation its input) is divided by t, as is what travels
 *   between stages. In the working set the stream's gradient, and in a
 *   16-bit job the two unpacked streams and the stream after attention, are
 *   divided by t; the LayerNorm output, the gradients of the GEMMs' inputs
 *   and a branch's output stay whole (all rows are gathered for the GEMMs),
 *   and a block's four LayerNorm gradient vectors are added (4 h fp32).
 * - 1F1B: stage s holds min(p - s, m) micro-batches in flight at its peak
 *   (p - s - 1 warm-up forwards and the one in steady state).
 * - Logits: the last stage holds s b Vp/t fp32 values for the vocab-parallel
 *   cross-entropy (one micro-batch: it runs backward right after forward).
 * - Comm buffers: a pipeline stage receives s b h activations from the stage
 *   before and their gradients from the stage after, into two buffers of
 *   each, so the next micro-batch's receive is posted while it computes
 *   (sends go out of the activations' own buffers): 2 buffers at an end
 *   stage, 4 in the middle; with dp > 1
 *   one gradient bucket of MT_PLAN_DP_BUCKET_ELEMS fp32 elements is being
 *   reduce-scattered and one of model weights all-gathered after the update.
 *   tp all-reduces and the tied-embedding all-reduce work in place.
 * - Untied embeddings (model.untie_embeddings): the last stage's head is
 *   lm_head (Vp/t rows of h) at any pp, in place of wte's copy; the model
 *   has Vp h parameters more. The FLOPs are the same: eq. 3 counts the
 *   head's GEMM either way.
 * - FLOPs are Megatron's eq. 3 (Narayanan et al. 2021). The attention
 *   scores this engine's backward recomputes, 2 b s² h per layer, are not
 *   counted: s/36h of the whole, 0.3% at 530B's shapes.
 */
#include "plan.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "err.h"
#include "ops.h"
#include "train.h"

#define GB 1e9

static int64_t ceil_div64(int64_t a, int64_t b) { return a / b + (a % b != 0); }

static int64_t padded_vocab_of(const mt_model_spec *m, int tp) {
  int64_t mult = (int64_t)(m->vocab_pad_to > 0 ? m->vocab_pad_to : 128) * tp;
  return ceil_div64(m->vocab_size, mult) * mult;
}

double mt_plan_flops(const mt_model_spec *m, int padded_vocab, int64_t batch, double recomputed) {
  double B = (double)batch, s = m->seq_len, l = m->n_layer, h = m->n_embd, V = padded_vocab;
  /* recomputed 1: eq. 3 as the paper writes it, 96 B s l h² (1 + s/6h + V/16lh) */
  return 72.0 * (1.0 + recomputed / 3.0) * B * s * l * h * h * (1.0 + s / (6.0 * h)) +
         6.0 * B * s * h * V;
}

/* Parameters of one transformer layer on one tp rank: 12 h²/t matrix
 * elements, the column-parallel biases (3h + 4h)/t, and replicated the two
 * row-parallel biases (2h) and the two LayerNorms (4h). */
static int64_t layer_params(int64_t h, int64_t t) { return 12 * h * h / t + 7 * h / t + 6 * h; }

/* Activation bytes one layer keeps for one micro-batch (see the top). */
static int64_t layer_act_bytes(const mt_model_spec *m, int b, int t, int mixed, int sp) {
  int64_t s = m->seq_len, h = m->n_embd, a = m->n_head, sbh = s * b * h;
  return (mixed ? 2 : 4) * (sbh * 2 / (sp ? t : 1) + sbh * 8 / t) + 4 * a * s * b / t;
}

/* Once per device: a block's working buffers and attention's scratch (see
 * the top). */
static int64_t working_set_bytes(const mt_model_spec *m, int b, int t, int mixed, int sp) {
  int64_t s = m->seq_len, h = m->n_embd, sbh = s * b * h,
          rows = s < MT_GPU_ATT_ROWS ? s : MT_GPU_ATT_ROWS;
  int64_t lng = sp ? 4 * h * 4 : 0;
  if (!mixed) {
    int64_t whole = sp ? 4 * sbh + 16 * sbh / t : 5 * sbh + 15 * sbh / t;
    return 4 * whole + lng + 2 * ((int64_t)m->n_head / t) * s * rows * 4;
  }
  int64_t nh = m->n_head / t, f32 = sp ? 3 * sbh + 8 * sbh / t : 7 * sbh + 4 * sbh / t;
  int rc, hc, hs = (int)(h / m->n_head);
  int64_t att = mt_flash_bwd_samples((int)s, (int)nh) * nh * s;
  /* the chunked path's own scratch, where the job may take it: a head too
   * wide for the flash kernels, or the job's chunked or auto (a job that
   * leaves it to the devices gets flash, unless MTNLG_ATTENTION, a
   * developer's switch, says otherwise: not counted) */
  if (hs > MT_FLASH_MAX_HS || !strcmp(m->attention_backend, "chunked") ||
      !strcmp(m->attention_backend, "auto"))
    att += mt_att16_chunk((int)s, (int)nh, hs, MT_GPU_ATT_ROWS, MT_GPU_ATT_FLOATS, &rc, &hc);
  return 2 * (sbh + sbh * 11 / t) + 4 * f32 + lng + 4 * att;
}

int mt_plan_stage_of(const mt_job *job, const mt_plan *plan, int s, mt_plan_stage *out) {
  memset(out, 0, sizeof *out);
  if (!plan->computed) return mt_seterr(MT_EINVAL, "plan: not computed");
  if (s < 0 || s >= plan->pp)
    return mt_seterr(MT_EINVAL, "plan: stage %d is not in [0, %d)", s, plan->pp);
  const mt_model_spec *m = &job->model;
  int64_t h = m->n_embd, t = plan->tp, p = plan->pp, L = m->n_layer, Vp = plan->padded_vocab;
  int64_t sbh = (int64_t)m->seq_len * plan->micro_batch * h;
  int mixed = plan->mixed, sp = plan->sequence_parallel;
  int64_t stream = sp ? sbh / t : sbh; /* the stream's values a rank holds */

  /* layers: the first L mod p stages hold one more; with virtual stages the
   * stage holds chunks s, s + p, ... of p v, split alike */
  int v = plan->virtual_stages > 1 ? plan->virtual_stages : 1;
  out->stage = s;
  for (int c = 0, b, e; c < v; c++) {
    mt_stage_layers((int)L, (int)p * v, c * (int)p + s, &b, &e);
    if (c == 0) out->first_layer = b;
    out->n_layers += e - b;
    out->has_head = e == L;
  }
  out->has_embedding = s == 0;

  int64_t params = out->n_layers * layer_params(h, t);
  if (out->has_embedding) params += Vp * h / t + (int64_t)m->max_positions * h;
  /* the head's weight: the tied embedding's copy when pp > 1, or untied
   * (model.untie_embeddings) lm_head, at any pp */
  if (out->has_head) params += 2 * h + (p > 1 || m->untie_embeddings ? Vp * h / t : 0);
  out->params = params;
  out->optimizer_params = ceil_div64(params, plan->dp);

  out->weight_bytes = params * (mixed ? 2 : 4);
  out->grad_bytes = params * 4;
  out->optimizer_bytes = out->optimizer_params * (mixed ? 12 : 8);

  /* each chunk (one without virtual stages) keeps its in-flight
   * micro-batches' activations; the block working buffers and the
   * recomputing layers' one set serve every chunk (they run in turn) */
  int inflight[v];
  if (mt_pipe_inflight((int)p, s, v, plan->micro_batches, inflight)) return MT_ENOMEM;
  int64_t full = layer_act_bytes(m, plan->micro_batch, plan->tp, mixed, sp);
  out->inflight = inflight[0];
  for (int c = 0; c < v; c++) {
    int b, e;
    mt_stage_layers((int)L, (int)p * v, c * (int)p + s, &b, &e);
    int64_t n = e - b;
    int64_t rl = plan->recompute ? n : 0; /* the layers that recompute */
    if (rl && plan->recompute_layers > 0 && plan->recompute_layers < rl)
      rl = plan->recompute_layers;
    out->recomputed_layers += (int)rl;
    out->activation_bytes += inflight[c] * (rl * stream * (mixed ? 2 : 4) + (n - rl) * full);
  }
  if (out->recomputed_layers) out->activation_bytes += full;
  if (out->n_layers)
    out->activation_bytes += working_set_bytes(m, plan->micro_batch, plan->tp, mixed, sp);
  if (out->has_head) out->logits_bytes = (int64_t)m->seq_len * plan->micro_batch * Vp / t * 4;

  /* two receive buffers of each kind a stage receives: an end stage one
   * kind, unless the stages close a ring */
  if (p > 1)
    out->comm_bytes += (v == 1 && (s == 0 || s == p - 1) ? 2 : 4) * stream * (mixed ? 2 : 4);
  if (plan->dp > 1) out->comm_bytes += MT_PLAN_DP_BUCKET_ELEMS * (4 + (mixed ? 2 : 4));

  out->total_bytes = out->weight_bytes + out->grad_bytes + out->optimizer_bytes +
                     out->activation_bytes + out->logits_bytes + out->comm_bytes;
  return MT_OK;
}

/* Appends one problem line to buf. */
static void add_problem(char *buf, size_t cap, int *n, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static void add_problem(char *buf, size_t cap, int *n, const char *fmt, ...) {
  size_t len = strlen(buf);
  if (len + 2 >= cap) return;
  if (*n) buf[len++] = '\n';
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf + len, cap - len, fmt, ap);
  va_end(ap);
  (*n)++;
}

/* Everything that makes a layout impossible to plan, one line each. */
static int check_layout(const mt_job *job, const mt_plan_device *dev, int devices) {
  const mt_model_spec *m = &job->model;
  const mt_parallel_spec *p = &job->parallel;
  char msg[2048] = "";
  int n = 0;
  const struct {
    const char *key;
    int v;
  } pos[] = {
      {"model.n_layer", m->n_layer},
      {"model.n_embd", m->n_embd},
      {"model.n_head", m->n_head},
      {"model.vocab_size", m->vocab_size},
      {"model.seq_len", m->seq_len},
      {"parallel.tp", p->tp},
      {"parallel.pp", p->pp},
      {"parallel.micro_batch", p->micro_batch},
      {"train.global_batch", job->train.global_batch},
  };
  for (size_t i = 0; i < sizeof pos / sizeof *pos; i++)
    if (pos[i].v < 1)
      add_problem(msg, sizeof msg, &n, "plan: %s: %d must be at least 1", pos[i].key, pos[i].v);
  if (n) return mt_seterr(MT_EINVAL, "%s", msg);

  if (m->n_embd % m->n_head)
    add_problem(msg, sizeof msg, &n, "plan: model.n_embd: %d is not divisible by n_head = %d",
                m->n_embd, m->n_head);
  if (m->n_head % p->tp)
    add_problem(msg, sizeof msg, &n, "plan: model.n_head: %d is not divisible by tp = %d",
                m->n_head, p->tp);
  if (m->n_layer < p->pp)
    add_problem(msg, sizeof msg, &n, "plan: model.n_layer: %d layers cannot fill pp = %d stages",
                m->n_layer, p->pp);
  if (!(dev->memory_bytes > 0))
    add_problem(msg, sizeof msg, &n, "plan: device memory %g bytes must be > 0", dev->memory_bytes);
  if (!(dev->tflops > 0))
    add_problem(msg, sizeof msg, &n, "plan: device TFLOP/s %g must be > 0", dev->tflops);
  if (!(dev->efficiency > 0 && dev->efficiency <= 1))
    add_problem(msg, sizeof msg, &n, "plan: efficiency %g is not in (0, 1]", dev->efficiency);
  if (!(dev->usable_fraction > 0 && dev->usable_fraction <= 1))
    add_problem(msg, sizeof msg, &n, "plan: usable memory fraction %g is not in (0, 1]",
                dev->usable_fraction);
  int64_t slots = (int64_t)p->tp * p->pp;
  if (devices < 1 || devices % slots)
    add_problem(msg, sizeof msg, &n,
                "plan: %d devices are not a positive multiple of tp * pp = %d * %d = %lld", devices,
                p->tp, p->pp, (long long)slots);
  else if (job->train.global_batch % ((int64_t)p->micro_batch * (devices / slots)))
    add_problem(msg, sizeof msg, &n,
                "plan: train.global_batch: %d is not divisible by micro_batch * dp = %d * %lld",
                job->train.global_batch, p->micro_batch, (long long)(devices / slots));
  else if (p->virtual_stages > 1 &&
           job->train.global_batch % ((int64_t)p->micro_batch * (devices / slots) * p->pp))
    add_problem(msg, sizeof msg, &n,
                "plan: parallel.virtual_stages: the interleaved schedule takes micro-batches pp "
                "at a time: train.global_batch %d is not divisible by micro_batch * dp * pp = "
                "%d * %lld * %d",
                job->train.global_batch, p->micro_batch, (long long)(devices / slots), p->pp);
  else if (mt_job_batch_quantum(job) % ((int64_t)p->micro_batch * (devices / slots)))
    add_problem(msg, sizeof msg, &n,
                "plan: train.rampup_batch: start %d and increment %d are not both divisible by "
                "micro_batch * dp = %d * %lld",
                job->train.rampup.start, job->train.rampup.increment, p->micro_batch,
                (long long)(devices / slots));
  else if (p->virtual_stages > 1 &&
           mt_job_batch_quantum(job) % ((int64_t)p->micro_batch * (devices / slots) * p->pp))
    add_problem(msg, sizeof msg, &n,
                "plan: parallel.virtual_stages: the interleaved schedule takes micro-batches pp "
                "at a time: train.rampup_batch start %d and increment %d are not both divisible "
                "by micro_batch * dp * pp = %d * %lld * %d",
                job->train.rampup.start, job->train.rampup.increment, p->micro_batch,
                (long long)(devices / slots), p->pp);
  return n ? mt_seterr(MT_EINVAL, "%s", msg) : MT_OK;
}

int mt_plan_compute(const mt_job *job, const mt_plan_device *dev_in, mt_plan *out) {
  memset(out, 0, sizeof *out);
  const mt_model_spec *m = &job->model;
  const mt_parallel_spec *ps = &job->parallel;
  mt_plan_device dev = *dev_in;
  if (dev.efficiency == 0) dev.efficiency = 1.0;
  if (dev.usable_fraction == 0) dev.usable_fraction = MT_PLAN_USABLE_FRACTION;
  int64_t devices = dev.devices ? dev.devices : (int64_t)ps->tp * ps->pp * mt_job_dp(job);
  if (devices > 0x7fffffff) return mt_seterr(MT_EINVAL, "plan: %lld devices", (long long)devices);
  dev.devices = (int)devices;
  int rc = check_layout(job, &dev, dev.devices);
  if (rc) return rc;

  out->dev = dev;
  out->tp = ps->tp;
  out->pp = ps->pp;
  out->virtual_stages = ps->virtual_stages > 1 ? ps->virtual_stages : 1;
  out->devices = dev.devices;
  out->dp = dev.devices / (ps->tp * ps->pp);
  out->micro_batch = ps->micro_batch;
  out->micro_batches = job->train.global_batch / (ps->micro_batch * out->dp);
  out->recompute = ps->recompute;
  out->recompute_layers = ps->recompute ? ps->recompute_layers : 0;
  out->sequence_parallel = ps->sequence_parallel && ps->tp > 1;
  out->mixed = !strcmp(job->train.precision, "bf16") || !strcmp(job->train.precision, "fp16");
  out->padded_vocab = (int)padded_vocab_of(m, ps->tp);
  int64_t h = m->n_embd, Vp = out->padded_vocab;
  out->model_params = Vp * h * (m->untie_embeddings ? 2 : 1) + (int64_t)m->max_positions * h +
                      m->n_layer * layer_params(h, 1) + 2 * h;
  out->usable_bytes = dev.memory_bytes * dev.usable_fraction;
  out->computed = 1;

  int64_t layers_recomputed = 0; /* the share of the layers run twice, for the FLOPs */
  for (int s = 0; s < out->pp; s++) {
    mt_plan_stage st;
    if ((rc = mt_plan_stage_of(job, out, s, &st))) {
      out->computed = 0;
      return rc;
    }
    layers_recomputed += st.recomputed_layers;
    if (s == 0) out->first = st;
    if (s == out->pp - 1) out->last = st;
    if (s == 0 || st.total_bytes > out->worst.total_bytes) out->worst = st;
  }
  out->recomputed = (double)layers_recomputed / m->n_layer;

  out->tokens_per_step = mt_job_tokens_per_step(job);
  out->model_flops = mt_plan_flops(m, out->padded_vocab, job->train.global_batch, 0);
  out->executed_flops =
      mt_plan_flops(m, out->padded_vocab, job->train.global_batch, out->recomputed);
  /* interleaving divides the bubble by v (Narayanan et al. 2021, sec. 2.2) */
  out->bubble_fraction =
      (double)(out->pp - 1) / ((double)out->virtual_stages * out->micro_batches + out->pp - 1);
  double rate = (double)out->devices * dev.tflops * 1e12 * dev.efficiency; /* FLOP/s */
  out->step_s = out->executed_flops / rate;
  out->step_with_bubble_s = out->step_s / (1.0 - out->bubble_fraction);
  out->tokens_per_s = (double)out->tokens_per_step / out->step_s;
  out->model_tflops_per_device = out->model_flops / out->step_s / out->devices / 1e12;

  const mt_plan_stage *w = &out->worst;
  out->fits = (double)w->total_bytes <= out->usable_bytes;
  if (out->fits) return MT_OK;
  return mt_seterr(MT_EINVAL,
                   "plan: stage %d needs %.1f GB per device (weights %.1f, grads %.1f, optimizer "
                   "%.1f, activations %.1f, logits %.1f, comm %.1f) but the devices have %.1f GB, "
                   "%.1f GB usable (%.0f%%)%s",
                   w->stage, w->total_bytes / GB, w->weight_bytes / GB, w->grad_bytes / GB,
                   w->optimizer_bytes / GB, w->activation_bytes / GB, w->logits_bytes / GB,
                   w->comm_bytes / GB, dev.memory_bytes / GB, out->usable_bytes / GB,
                   100 * dev.usable_fraction,
                   out->recompute ? "; try a larger tp or pp, or a smaller micro_batch"
                                  : "; try parallel.recompute=true, a larger tp or pp, or a "
                                    "smaller micro_batch");
}
