/* gpt.c — parameter table, initialisation, activation plan, forward and
 * backward of the GPT on one device. Each block's forward and backward sit
 * side by side; shapes in comments use B (batch), T (time), C (channels),
 * NH (heads), Vp (padded vocab), L (layers). */
#include "gpt.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "err.h"
#include "half.h"
#include "philox.h"
#include "range.h"

#define ALIGN_FLOATS 16 /* every tensor starts on a 64-byte boundary */

/* Under AddressSanitizer, each activation tensor a CPU device's arena holds
 * is followed by a poisoned gap (its rounding up, then ALIGN_FLOATS more),
 * so an op that reads or writes past the end of its tensor is stopped there
 * rather than reaching the next one, as a tensor of its own allocation
 * would be. Other builds, and GPUs' arenas, have no gap. */
#include "sanitizer.h"
#ifdef MT_ASAN
#include <sanitizer/asan_interface.h>
#endif

/* Activations a block keeps for its backward pass (its input is the
 * stream's resid[l]). What is cheap to recompute is not kept: both
 * LayerNorms' outputs (from the block's input and resid2), GeLU's output
 * (from fch) and attention's probabilities (from qkv and lse); the backward
 * recomputes them into the shared buffers of act_plan. With full
 * recomputation only one set exists, for every slot, refilled from the
 * block's input; with recompute_layers k the stage's first k blocks share
 * that set and the others keep their own (recomputes, acts_of).
 * A bf16 or fp16 job keeps them in 16 bits, as Megatron's activations are
 * (act_type): qkv, atty and fch are written so by the ops that make them
 * and read so, forward and backward. resid2, the residual stream, is made
 * in fp32 and rounded in place when kept (keep), so the forward goes on
 * with the value the backward unpacks into one shared fp32 work buffer. */
typedef struct block_acts {
  void *qkv;          /* (B,T,3C) act_type */
  float *lse;         /* (B,NH,T) attention's log-sum-exp per row (always fp32) */
  void *atty;         /* (B,T,C) attention output before c_proj, act_type */
  float *resid2;      /* (R,C) stream after the attention branch */
  void *fch;          /* (B,T,4C) before GeLU, act_type */
  uint16_t *resid2_h; /* 16-bit jobs: resid2 as kept */
} block_acts;

/* Activations of one micro-batch in flight (a slot), plus pointers to the
 * backward scratch, which all slots share: one backward runs at a time.
 * R is the stream's rows (mt_gpt_stream_rows): B·T, or with sequence
 * parallelism this rank's B·T/tp; (B,T,…) buffers hold all rows. */
typedef struct act_plan {
  int32_t *inputs, *targets; /* (B,T) device copies of the micro-batch */
  int32_t *pos_ids;          /* (B,T) reset_position_ids, first stage: each input's position
                                in its document (mt_gpt_documents) */
  int32_t *doc_start;        /* (B,T) reset_attention_mask: each row's first key, the first
                                position of its document (mt_gpt_documents); NULL: causal */
  uint64_t sample0;          /* global sample of row 0: dropout masks */
  int has_targets;           /* forward computed losses; backward may run */
  int loss_tokens;           /* targets in the loss: not MT_TARGET_IGNORE (the loss mask) */
  float **resid;             /* L+1 of (R,C): resid[0] stage input, resid[l+1] block l out */
  uint16_t **resid_h; /* 16-bit jobs: resid[1..L-1] kept in 16 bits here instead (resid[l] NULL) */
  uint16_t *out_h;    /* 16-bit jobs, a non-last stage: resid[L] as it travels on */
  block_acts *blocks; /* L, or L - k + 1 with k blocks recomputing (acts_of) */
  int n_blocks;
  void *lnf;                  /* (B,T,C) the LM head's input, in act_type */
  float *lnf_mean, *lnf_rstd; /* (R) (R) */
  float *logits;              /* (B,T,Vp/tp); turned into dlogits in place by backward */
  float *losses;              /* (B,T) */
  float *rowmax;              /* (B,T) tp: max logit over the whole vocabulary */
  float *rowsum; /* (2,B,T) tp: Σ exp(x - max) over the vocabulary, then the target's logit */
  /* one set for every slot and layer: what a block computes and uses at
   * once, in the forward and again in the backward */
  /* a LayerNorm's output (B,T,C) and GeLU's (B,T,4C), the inputs of the
   * GEMMs after them: in act_type */
  void *ln, *gelu;
  float *ln_mean, *ln_rstd; /* (R) (R) */
  float *stream[2];         /* 16-bit jobs: (R,C) the stream between blocks */
  /* backward scratch, one set; att_scratch serves the forward too */
  float *dres;        /* (R,C) gradient of the residual stream */
  float *dbtc;        /* (B,T,C) */
  float *dbtc2;       /* (B,T,C) */
  void *dqkv;         /* (B,T,3C), in act_type */
  float *dfch;        /* (B,T,4C) linear_bwd_dgelu's scratch */
  void *dfch2;        /* (B,T,4C) d(fch), in act_type */
  float *att_scratch; /* ops->attention_scratch floats */
  float *branch;      /* (B,T,C) a branch output before dropout + residual */
  float *lngrad;      /* sequence parallelism: (4,C) a block's LayerNorm gradients of this
                         micro-batch's rows, summed over tp before they join the grads */
} act_plan;

static size_t align_up(size_t n) { return (n + ALIGN_FLOATS - 1) / ALIGN_FLOATS * ALIGN_FLOATS; }

/* Adds a tensor whose full shape is (d0, d1) (d1 == 0: a vector) and of
 * which this rank holds the shard `shard` of t parts, part r. */
static void add_param(mt_param *t, int *n, size_t *off, const char *name, int layer, size_t d0,
                      size_t d1, mt_shard shard, int tp, int r) {
  mt_param *p = &t[(*n)++];
  snprintf(p->name, sizeof p->name, "%s", name);
  p->ndim = d1 ? 2 : 1;
  p->full[0] = d0;
  p->full[1] = d1;
  p->shape[0] = d0;
  p->shape[1] = d1;
  p->shard = tp > 1 ? shard : MT_SHARD_NONE;
  if (p->shard == MT_SHARD_ROWS || p->shard == MT_SHARD_QKV) {
    p->shape[0] = d0 / (size_t)tp;
    p->shard_off = (p->shard == MT_SHARD_QKV ? d0 / 3 : d0) / (size_t)tp * (size_t)r;
  } else if (p->shard == MT_SHARD_COLS) {
    p->shape[1] = d1 / (size_t)tp;
    p->shard_off = p->shape[1] * (size_t)r;
  }
  p->numel = p->ndim == 2 ? p->shape[0] * p->shape[1] : p->shape[0];
  p->offset = *off;
  p->decay = p->ndim == 2;
  p->layer = layer;
  *off += align_up(p->numel);
}

size_t mt_param_global_index(const mt_param *p, size_t e) {
  size_t cols = p->ndim == 2 ? p->shape[1] : 1, row = e / cols, col = e % cols;
  switch (p->shard) {
  case MT_SHARD_ROWS: return (p->shard_off + row) * cols + col;
  case MT_SHARD_QKV: {
    size_t part_rows = p->shape[0] / 3, part = row / part_rows;
    return (part * (p->full[0] / 3) + p->shard_off + row % part_rows) * cols + col;
  }
  case MT_SHARD_COLS: return row * p->full[1] + p->shard_off + col;
  default: return e;
  }
}

void mt_stage_layers(int n_layer, int pp, int s, int *begin, int *end) {
  int base = n_layer / pp, extra = n_layer % pp;
  *begin = s * base + (s < extra ? s : extra);
  *end = *begin + base + (s < extra ? 1 : 0);
}

void mt_gpt_set_stage(mt_gpt_config *c, int pp, int s, int v) {
  c->layer_begin = c->layer_end = c->virtual_stages = 0;
  c->pp_size = pp, c->pp_rank = s;
  if (pp > 1 && v > 1)
    c->virtual_stages = v;
  else if (pp > 1)
    mt_stage_layers(c->n_layer, pp, s, &c->layer_begin, &c->layer_end);
}

/* Chunks of blocks cfg's model holds: its virtual stages, else one. */
static int n_chunks(const mt_gpt_config *c) {
  return c->virtual_stages > 1 ? c->virtual_stages : 1;
}

/* Blocks [*lb, *le) of chunk k of cfg's model. */
static void chunk_range(const mt_gpt_config *c, int k, int *lb, int *le) {
  if (c->virtual_stages > 1) {
    mt_stage_layers(c->n_layer, c->pp_size * c->virtual_stages, k * c->pp_size + c->pp_rank, lb,
                    le);
    return;
  }
  *lb = c->layer_begin;
  *le = c->layer_end > 0 ? c->layer_end : c->n_layer;
}

/* Whether cfg's model holds the first block / the last. */
static void model_ends(const mt_gpt_config *c, int *first, int *last, int *n_blocks) {
  int lb, le;
  *n_blocks = 0;
  for (int k = 0; k < n_chunks(c); k++) {
    chunk_range(c, k, &lb, &le);
    if (k == 0) *first = lb == 0;
    *last = le == c->n_layer;
    *n_blocks += le - lb;
  }
}

void mt_gpt_ends(const mt_gpt_config *cfg, int *first, int *last) {
  int n_blocks;
  model_ends(cfg, first, last, &n_blocks);
}

int mt_gpt_table(const mt_gpt_config *c, mt_param **table, int *count, size_t *num_params) {
  size_t C = (size_t)c->n_embd;
  int lb, le, n = 0, first, last, n_blocks;
  model_ends(c, &first, &last, &n_blocks);
  int tp = c->tp_size > 1 ? c->tp_size : 1, r = c->tp_rank;
  size_t off = 0;
  int max = 2 + n_blocks * MT_P_PER_LAYER + 3;
  mt_param *t = calloc((size_t)max, sizeof(mt_param));
  if (!t) return mt_seterr(MT_ENOMEM, "gpt: parameter table");
  char name[48];
  /* the last stage holds its own copy of the tied embedding for the head */
  int untie = c->untie_embeddings;
  if (first || (last && !untie))
    add_param(t, &n, &off, "wte.weight", -1, (size_t)c->padded_vocab, C, MT_SHARD_ROWS, tp, r);
  if (first) add_param(t, &n, &off, "wpe.weight", -1, (size_t)c->max_seq, C, MT_SHARD_NONE, tp, r);
  for (int k = 0; k < n_chunks(c); k++) {
    chunk_range(c, k, &lb, &le);
    for (int l = lb; l < le; l++) {
      /* Megatron: QKV and c_fc column-parallel (output rows split), the two
       * projections row-parallel (input columns split, bias replicated) */
      static const struct {
        const char *suffix;
        int d0, d1; /* multiples of C; d1 == 0: vector */
        mt_shard shard;
      } blk[MT_P_PER_LAYER] = {
          {"ln_1.weight", 1, 0, MT_SHARD_NONE},        {"ln_1.bias", 1, 0, MT_SHARD_NONE},
          {"attn.c_attn.weight", 3, 1, MT_SHARD_QKV},  {"attn.c_attn.bias", 3, 0, MT_SHARD_QKV},
          {"attn.c_proj.weight", 1, 1, MT_SHARD_COLS}, {"attn.c_proj.bias", 1, 0, MT_SHARD_NONE},
          {"ln_2.weight", 1, 0, MT_SHARD_NONE},        {"ln_2.bias", 1, 0, MT_SHARD_NONE},
          {"mlp.c_fc.weight", 4, 1, MT_SHARD_ROWS},    {"mlp.c_fc.bias", 4, 0, MT_SHARD_ROWS},
          {"mlp.c_proj.weight", 1, 4, MT_SHARD_COLS},  {"mlp.c_proj.bias", 1, 0, MT_SHARD_NONE},
      };
      for (int i = 0; i < MT_P_PER_LAYER; i++) {
        snprintf(name, sizeof name, "h.%d.%s", l, blk[i].suffix);
        add_param(t, &n, &off, name, l, blk[i].d0 * C, blk[i].d1 * C, blk[i].shard, tp, r);
      }
    }
  }
  if (last) {
    add_param(t, &n, &off, "ln_f.weight", -1, C, 0, MT_SHARD_NONE, tp, r);
    add_param(t, &n, &off, "ln_f.bias", -1, C, 0, MT_SHARD_NONE, tp, r);
  }
  /* untied: the head's own weight, last, so a tied table keeps its layout */
  if (last && untie)
    add_param(t, &n, &off, "lm_head.weight", -1, (size_t)c->padded_vocab, C, MT_SHARD_ROWS, tp, r);
  *table = t;
  *count = n;
  *num_params = off;
  return 0;
}

static int build_table(mt_gpt *m) {
  int rc = mt_gpt_table(&m->cfg, &m->params_table, &m->n_tensors, &m->num_params);
  if (rc) return rc;
  model_ends(&m->cfg, &m->first, &m->last, &m->n_layers);
  int untie = m->cfg.untie_embeddings;
  m->i_wte = m->first || (m->last && !untie) ? 0 : -1;
  m->i_wpe = m->first ? 1 : -1;
  m->i_block0 = m->first ? 2 : m->i_wte + 1;
  m->i_lnf = m->last ? m->i_block0 + m->n_layers * MT_P_PER_LAYER : -1;
  m->i_head = !m->last ? -1 : untie ? m->i_lnf + 2 : m->i_wte;
  return 0;
}

int mt_param_is_vocab(const char *name) {
  return !strcmp(name, "wte.weight") || !strcmp(name, "lm_head.weight");
}

int mt_param_find(const mt_param *table, int n, const char *name) {
  for (int i = 0; i < n; i++)
    if (!strcmp(table[i].name, name)) return i;
  return -1;
}

int mt_gpt_find(const mt_gpt *m, const char *name) {
  return mt_param_find(m->params_table, m->n_tensors, name);
}

static int check_config(const mt_gpt_config *c, int B, int T) {
  if (c->n_layer < 1 || c->n_embd < 1 || c->n_head < 1 || c->vocab_size < 1 || c->max_seq < 1)
    return mt_seterr(MT_EINVAL,
                     "gpt: sizes must be positive (layers %d, hidden %d, heads %d, "
                     "vocab %d, seq %d)",
                     c->n_layer, c->n_embd, c->n_head, c->vocab_size, c->max_seq);
  if (c->n_embd % c->n_head)
    return mt_seterr(MT_EINVAL, "gpt: hidden %d is not divisible by heads %d", c->n_embd,
                     c->n_head);
  if (c->padded_vocab < c->vocab_size)
    return mt_seterr(MT_EINVAL, "gpt: padded vocab %d < vocab %d", c->padded_vocab, c->vocab_size);
  if (B < 1 || T < 1 || T > c->max_seq)
    return mt_seterr(MT_EINVAL, "gpt: micro-batch %dx%d does not fit (seq limit %d)", B, T,
                     c->max_seq);
  int tp = c->tp_size > 1 ? c->tp_size : 1;
  if (c->tp_rank < 0 || c->tp_rank >= tp || c->n_head % tp || c->padded_vocab % tp)
    return mt_seterr(MT_EINVAL, "gpt: tp rank %d of %d: heads %d and padded vocab %d must divide",
                     c->tp_rank, tp, c->n_head, c->padded_vocab);
  if (c->sequence_parallel && tp > 1 && ((size_t)B * T) % (size_t)tp)
    return mt_seterr(MT_EINVAL,
                     "gpt: sequence parallelism splits the micro-batch's %d x %d = %zu rows over "
                     "tp %d, which does not divide them",
                     B, T, (size_t)B * T, tp);
  if (c->layer_begin < 0 || c->layer_end < 0 || c->layer_end > c->n_layer ||
      (c->layer_end > 0 && c->layer_begin >= c->layer_end))
    return mt_seterr(MT_EINVAL, "gpt: stage layers [%d, %d) outside [0, %d) or empty",
                     c->layer_begin, c->layer_end, c->n_layer);
  if (c->virtual_stages > 1 &&
      (c->pp_size < 2 || c->pp_rank < 0 || c->pp_rank >= c->pp_size ||
       c->n_layer < c->pp_size * c->virtual_stages || c->layer_begin || c->layer_end))
    return mt_seterr(MT_EINVAL,
                     "gpt: %d virtual stages on stage %d of %d: needs 2 or more stages and a "
                     "layer for each of their %d chunks (%d layers), without a layer range",
                     c->virtual_stages, c->pp_rank, c->pp_size, c->pp_size * c->virtual_stages,
                     c->n_layer);
  if (c->hidden_dropout < 0 || c->hidden_dropout >= 1 || c->attention_dropout < 0 ||
      c->attention_dropout >= 1)
    return mt_seterr(MT_EINVAL, "gpt: dropout must be in [0, 1)");
  if (c->precision < MT_PREC_FP32 || c->precision > MT_PREC_FP16)
    return mt_seterr(MT_EINVAL, "gpt: precision %d is not fp32, bf16 or fp16", (int)c->precision);
  return 0;
}

/* n floats of m's activations at *off of base (NULL: planning, sizes only) */
static void carve(const mt_gpt *m, float **dst, float *base, size_t *off, size_t n) {
  if (base) *dst = base + *off;
  size_t gap = align_up(n) - n;
#ifdef MT_ASAN
  if (m->dev->kind == MT_DEVICE_CPU) {
    gap += ALIGN_FLOATS;
    if (base) ASAN_POISON_MEMORY_REGION(base + *off + n, gap * sizeof(float));
  }
#else
  (void)m;
#endif
  *off += n + gap;
}

/* n 16-bit values, in the float-aligned layout */
static void carve_half(const mt_gpt *m, uint16_t **dst, float *base, size_t *off, size_t n) {
  float *f = NULL;
  carve(m, &f, base, off, (n + 1) / 2);
  if (base) *dst = (uint16_t *)f;
}

static int half_acts(const mt_gpt *m) { return m->cfg.precision != MT_PREC_FP32; }

static size_t elt_bytes(mt_dtype t) { return t == MT_F32 ? sizeof(float) : sizeof(uint16_t); }

/* What the GEMMs' activation inputs are stored as: a 16-bit job's are 16-bit,
 * as autocast makes them, in the weights' format. */
static mt_dtype act_type(const mt_gpt *m) {
  return m->cfg.precision == MT_PREC_FP16   ? MT_F16
         : m->cfg.precision == MT_PREC_BF16 ? MT_BF16
                                            : MT_F32;
}

/* Blocks of this stage that recompute in the backward pass: every one, the
 * first recompute_layers (Megatron's block method), or none. */
static int n_recomputed(const mt_gpt *m) {
  const mt_gpt_config *c = &m->cfg;
  if (!c->recompute) return 0;
  return c->recompute_layers > 0 && c->recompute_layers < m->n_layers ? c->recompute_layers
                                                                      : m->n_layers;
}
static int recomputes(const mt_gpt *m, int l) { return l < n_recomputed(m); }

/* The kept activations of block l: one set shared by the recomputing
 * blocks, then one each. */
static block_acts *acts_of(const mt_gpt *m, void *plan, int l) {
  int k = n_recomputed(m);
  return &((act_plan *)plan)->blocks[l < k ? 0 : l - k + (k > 0)];
}

/* Sequence parallelism on (tp > 1): the stream is this rank's rows only. */
static int seq_par(const mt_gpt *m) { return m->cfg.sequence_parallel && m->cfg.tp_size > 1; }

size_t mt_gpt_stream_rows(const mt_gpt *m) {
  size_t N = (size_t)m->B * m->T;
  return seq_par(m) ? N / (size_t)m->cfg.tp_size : N;
}

/* The first of this rank's rows of the stream. */
static size_t stream_row0(const mt_gpt *m) {
  return seq_par(m) ? (size_t)m->cfg.tp_rank * mt_gpt_stream_rows(m) : 0;
}

/* n values stored as act_type */
static void carve_act(const mt_gpt *m, void **dst, float *base, size_t *off, size_t n) {
  float *f = NULL;
  carve(m, &f, base, off, act_type(m) == MT_F32 ? n : (n + 1) / 2);
  if (base) *dst = f;
}

/* Points dst's working buffers (what a block computes and uses at once,
 * the backward's scratch, the stream's fp32 pair, and with recomputation
 * the recomputing blocks' one set) at src's. */
static void share_working_set(act_plan *dst, const act_plan *src, int recomputing) {
  dst->ln = src->ln, dst->ln_mean = src->ln_mean, dst->ln_rstd = src->ln_rstd;
  dst->gelu = src->gelu;
  dst->dres = src->dres, dst->dbtc = src->dbtc, dst->dbtc2 = src->dbtc2;
  dst->dqkv = src->dqkv, dst->dfch = src->dfch, dst->dfch2 = src->dfch2;
  dst->att_scratch = src->att_scratch, dst->branch = src->branch;
  dst->lngrad = src->lngrad;
  dst->stream[0] = src->stream[0], dst->stream[1] = src->stream[1];
  if (recomputing) dst->blocks[0] = src->blocks[0];
}

/* Lays out every activation of n slots in one buffer, the backward scratch
 * once after them (or, with shared, shared's: another chunk's slot 0); with
 * base == NULL only counts. */
static size_t plan_acts(const mt_gpt *m, act_plan *slots, int n, float *base,
                        const act_plan *shared) {
  const mt_gpt_config *c = &m->cfg;
  size_t tp = c->tp_size > 1 ? (size_t)c->tp_size : 1;
  size_t BT = (size_t)m->B * m->T, C = (size_t)c->n_embd, Cl = C / tp;
  size_t T = (size_t)m->T, Vl = (size_t)c->padded_vocab / tp;
  size_t R = mt_gpt_stream_rows(m); /* the stream's rows: BT, or BT/tp sequence-parallel */
  size_t NHl = (size_t)c->n_head / tp, BHT = (size_t)m->B * NHl * T;
  size_t att_scratch =
      m->dev->ops->attention_scratch(m->dev, (int)T, (int)Cl, (int)NHl, act_type(m));
  int half = half_acts(m);
  size_t off = 0;
  for (int k = 0; k < n; k++) {
    act_plan *p = &slots[k];
    float *ids = NULL;
    carve(m, &ids, base, &off, 2 * BT); /* int32 tokens, same size as floats */
    if (base) {
      p->inputs = (int32_t *)ids;
      p->targets = p->inputs + BT;
    }
    if (c->reset_position_ids && m->first) {
      float *pos = NULL;
      carve(m, &pos, base, &off, BT); /* int32, as the tokens */
      if (base) p->pos_ids = (int32_t *)pos;
    }
    if (c->reset_attention_mask) {
      float *start = NULL;
      carve(m, &start, base, &off, BT); /* int32 */
      if (base) p->doc_start = (int32_t *)start;
    }
    for (int l = 0; l <= m->n_layers; l++) {
      if (half && l > 0 && l < m->n_layers)
        carve_half(m, &p->resid_h[l], base, &off, R * C);
      else
        carve(m, &p->resid[l], base, &off, R * C);
    }
    if (half && !m->last) carve_half(m, &p->out_h, base, &off, R * C);
    /* the recomputing blocks' set (blocks[0]) holds nothing between a
     * block's forward and its own backward: one set serves every slot */
    for (int b = (k > 0 || shared) && n_recomputed(m) > 0; b < p->n_blocks; b++) {
      block_acts *a = &p->blocks[b];
      carve(m, &a->lse, base, &off, BHT);
      carve_act(m, &a->qkv, base, &off, BT * 3 * Cl);
      carve_act(m, &a->atty, base, &off, BT * Cl);
      if (half)
        carve_half(m, &a->resid2_h, base, &off, R * C);
      else
        carve(m, &a->resid2, base, &off, R * C);
      carve_act(m, &a->fch, base, &off, BT * 4 * Cl);
    }
    if (m->last) {
      carve_act(m, &p->lnf, base, &off, BT * C); /* all rows: the LM head's input */
      carve(m, &p->lnf_mean, base, &off, R);
      carve(m, &p->lnf_rstd, base, &off, R);
      carve(m, &p->logits, base, &off, BT * Vl);
      carve(m, &p->losses, base, &off, BT);
      if (tp > 1) {
        carve(m, &p->rowmax, base, &off, BT);
        carve(m, &p->rowsum, base, &off, 2 * BT);
      }
    }
  }
  act_plan *p = &slots[0];
  float *resid2 = NULL; /* 16-bit jobs: the fp32 resid2 every block unpacks into */
  if (shared) {         /* another chunk's: the same sizes, as the chunks' shapes are */
    if (base) share_working_set(p, shared, n_recomputed(m) > 0);
    if (base && half) resid2 = shared->blocks[0].resid2;
  } else {
    carve_act(m, &p->ln, base, &off, BT * C); /* all rows: a GEMM's input */
    carve(m, &p->ln_mean, base, &off, R);
    carve(m, &p->ln_rstd, base, &off, R);
    carve_act(m, &p->gelu, base, &off, BT * 4 * Cl);
    carve(m, &p->dres, base, &off, R * C);
    carve(m, &p->dbtc, base, &off, BT * C);
    carve(m, &p->dbtc2, base, &off, BT * C);
    carve_act(m, &p->dqkv, base, &off, BT * 3 * Cl);
    carve(m, &p->dfch, base, &off, BT * 4 * Cl);
    carve_act(m, &p->dfch2, base, &off, BT * 4 * Cl);
    carve(m, &p->att_scratch, base, &off, att_scratch);
    carve(m, &p->branch, base, &off, BT * C);
    if (seq_par(m)) carve(m, &p->lngrad, base, &off, 4 * C);
    if (half) { /* the stream and resid2 in fp32, unpacked from 16 bits */
      carve(m, &p->stream[0], base, &off, R * C);
      carve(m, &p->stream[1], base, &off, R * C);
      carve(m, &resid2, base, &off, R * C);
    }
  }
  for (int k = 1; k < n && base; k++) share_working_set(&slots[k], p, n_recomputed(m) > 0);
  for (int k = 0; k < n && base && half; k++)
    for (int b = 0; b < slots[k].n_blocks; b++) slots[k].blocks[b].resid2 = resid2;
  return off;
}

/* Tensor-parallel sizes of this rank: local channels of the attention and
 * MLP (C/tp), local heads, and whether it adds the replicated biases of the
 * row-parallel projections (only one rank may, before the sum). */
typedef struct tp_dims {
  int Cl, NHl, owns_bias;
} tp_dims;

static tp_dims dims_of(const mt_gpt *m) {
  int tp = m->cfg.tp_size > 1 ? m->cfg.tp_size : 1;
  tp_dims t = {m->cfg.n_embd / tp, m->cfg.n_head / tp, m->cfg.tp_rank == 0};
  return t;
}

/* The linear ops' conversion scratch: the largest any of this stage's GEMMs
 * asks (the blocks' four, and the LM head on the last stage). */
static size_t cvt_bytes(const mt_gpt *m) {
  const mt_gpt_config *c = &m->cfg;
  mt_device *d = m->dev;
  int N = m->B * m->T, C = c->n_embd, Cl = dims_of(m).Cl;
  int tp = c->tp_size > 1 ? c->tp_size : 1;
  int shapes[5][2] = {{C, 3 * Cl}, {Cl, C}, {C, 4 * Cl}, {4 * Cl, C}, {C, c->padded_vocab / tp}};
  size_t most = 0;
  for (int k = 0; k < (m->last ? 5 : 4); k++) {
    if (k < 4 && !m->n_layers) continue;
    size_t b = d->ops->linear_scratch(d, N, shapes[k][0], shapes[k][1], act_type(m), m->wtype);
    most = b > most ? b : most;
  }
  return most;
}

/* The slot whose working buffers m uses: its lender's first (NULL: its own). */
static const act_plan *lent(const mt_gpt *m) {
  return m->work_lender ? (const act_plan *)m->work_lender->act_plan : NULL;
}

/* The activation plan of m's micro_slots slots and its one buffer (none
 * for a model of virtual stages: its chunks have theirs). */
static int plan_slots(mt_gpt *m) {
  if (m->cfg.virtual_stages > 1) return 0;
  m->n_slots = m->cfg.micro_slots > 1 ? m->cfg.micro_slots : 1;
  act_plan *slots = calloc((size_t)m->n_slots, sizeof *slots);
  m->act_plan = slots;
  if (!slots) return mt_seterr(MT_ENOMEM, "gpt: activation plan");
  for (int k = 0; k < m->n_slots; k++) {
    act_plan *p = &slots[k];
    p->n_blocks = m->n_layers - n_recomputed(m) + (n_recomputed(m) > 0);
    p->resid = calloc((size_t)m->n_layers + 1, sizeof(float *));
    p->resid_h = calloc((size_t)m->n_layers + 1, sizeof(uint16_t *));
    p->blocks = calloc((size_t)p->n_blocks, sizeof(block_acts));
    if (!p->resid || !p->resid_h || !p->blocks) return mt_seterr(MT_ENOMEM, "gpt: activation plan");
  }
  m->acts_floats = plan_acts(m, slots, m->n_slots, NULL, lent(m));
  return 0;
}

/* Allocates the planned activations and the host copies of the losses (or
 * of the tp max, sum and target logit). */
static int alloc_acts(mt_gpt *m) {
  if (!m->n_slots) return 0;
  if (!(m->acts = mt_device_alloc(m->dev, m->acts_floats * sizeof(float))))
    return mt_wraperr(MT_ENOMEM, "gpt: the activations (%zu parameters, %zu activation floats)",
                      m->num_params, m->acts_floats);
  m->host_losses = malloc(3 * (size_t)m->B * m->T * sizeof(float));
  if (!m->host_losses)
    return mt_seterr(MT_ENOMEM, "gpt: host copies of %zu losses", 3 * (size_t)m->B * m->T);
  if (m->cfg.reset_attention_mask || (m->cfg.reset_position_ids && m->first)) {
    m->host_docs = malloc(2 * (size_t)m->B * m->T * sizeof *m->host_docs);
    if (!m->host_docs)
      return mt_seterr(MT_ENOMEM, "gpt: host copies of %zu document positions",
                       2 * (size_t)m->B * m->T);
  }
  plan_acts(m, m->act_plan, m->n_slots, m->acts, lent(m));
  return 0;
}

int mt_gpt_create(mt_gpt *m, const mt_gpt_config *cfg, mt_device *dev, int B, int T) {
  memset(m, 0, sizeof *m);
  int rc = check_config(cfg, B, T);
  if (rc) return rc;
  m->cfg = *cfg;
  m->dev = dev;
  m->B = B;
  m->T = T;
  m->training = 1;
  if ((rc = build_table(m)) || (rc = plan_slots(m))) goto fail;

  size_t shards = cfg->zero_shards > 1 ? (size_t)cfg->zero_shards : 1;
  size_t slice =
      (m->num_params + shards * ALIGN_FLOATS - 1) / (shards * ALIGN_FLOATS) * ALIGN_FLOATS;
  m->alloc_params = slice * shards;
  /* what failed to allocate, named in the message: the device says how much */
  const char *what = NULL;
  m->weights = m->params = mt_device_alloc(dev, m->alloc_params * sizeof(float));
  if (!m->params)
    what = "the fp32 master weights";
  else if (!(m->grads = mt_device_alloc(dev, m->alloc_params * sizeof(float))))
    what = "the gradients";
  m->wtype = MT_F32;
  if (!what && cfg->precision != MT_PREC_FP32) {
    m->wtype = act_type(m); /* the GEMMs' two operands, one 16-bit format */
    m->vec_offset = malloc((size_t)m->n_tensors * sizeof *m->vec_offset);
    if (!m->vec_offset) {
      rc = mt_seterr(MT_ENOMEM, "gpt: working copy table");
      goto fail;
    }
    /* each vector on a 64-byte boundary, as in params: a bias is handed to
     * cuBLASLt's BIAS epilogue, which wants it aligned (packed end to end, a
     * width that is not a multiple of 4 left the next only 4-byte aligned) */
    for (int i = 0; i < m->n_tensors; i++) {
      m->vec_offset[i] = mt_gpt_is_matrix(m, i) ? SIZE_MAX : m->vec_floats;
      if (!mt_gpt_is_matrix(m, i)) m->vec_floats += align_up(m->params_table[i].numel);
    }
    m->weights = NULL;
    if (!(m->half = mt_device_alloc(dev, m->alloc_params * sizeof(uint16_t))))
      what = "the 16-bit working copy of the weights";
    else if (!(m->weights = mt_device_alloc(dev, m->vec_floats * sizeof(float))))
      what = "the working copy's fp32 vectors";
  }
  /* a model of virtual stages holds its chunks' scratch: they run in turn */
  m->cvt_bytes = cvt_bytes(m);
  if (!what && m->cvt_bytes && !(m->cvt = mt_device_alloc(dev, m->cvt_bytes)))
    what = "the GEMMs' conversion scratch";
  if (what) {
    rc = mt_wraperr(MT_ENOMEM, "gpt: %s (%zu parameters, %zu activation floats)", what,
                    m->num_params, m->acts_floats);
    goto fail;
  }
  if ((rc = alloc_acts(m))) goto fail;
  return 0;
fail:
  mt_gpt_destroy(m);
  return rc;
}

int mt_gpt_create_chunk(mt_gpt *m, const mt_gpt *owner, int chunk, int slots,
                        const mt_gpt *lender) {
  memset(m, 0, sizeof *m);
  const mt_gpt_config *oc = &owner->cfg;
  if (oc->virtual_stages < 2 || chunk < 0 || chunk >= oc->virtual_stages)
    return mt_seterr(MT_EINVAL, "gpt: chunk %d of a model of %d virtual stages", chunk,
                     oc->virtual_stages);
  mt_gpt_config cfg = *oc; /* virtual stage chunk * pp + pp_rank of pp * v */
  mt_gpt_set_stage(&cfg, oc->pp_size * oc->virtual_stages, chunk * oc->pp_size + oc->pp_rank, 1);
  cfg.micro_slots = slots;
  m->cfg = cfg;
  m->dev = owner->dev;
  m->B = owner->B;
  m->T = owner->T;
  m->is_chunk = 1;
  m->work_lender = lender;
  m->training = owner->training;
  m->seed = owner->seed;
  m->tp_allreduce = owner->tp_allreduce, m->tp_allgather = owner->tp_allgather;
  m->tp_reduce_scatter = owner->tp_reduce_scatter, m->tp_ctx = owner->tp_ctx;
  int rc = build_table(m);
  if (!rc && oc->precision != MT_PREC_FP32 &&
      !(m->vec_offset = malloc((size_t)m->n_tensors * sizeof *m->vec_offset)))
    rc = mt_seterr(MT_ENOMEM, "gpt: working copy table");
  /* the owner's tensors, by name: its offsets, into its buffers */
  for (int i = 0; !rc && i < m->n_tensors; i++) {
    int k = mt_gpt_find(owner, m->params_table[i].name);
    if (k < 0) {
      rc = mt_seterr(MT_EINVAL, "gpt: chunk %d: tensor %s is not its model's", chunk,
                     m->params_table[i].name);
      break;
    }
    m->params_table[i].offset = owner->params_table[k].offset;
    if (m->vec_offset) m->vec_offset[i] = owner->vec_offset[k];
  }
  m->num_params = owner->num_params;
  m->alloc_params = owner->alloc_params;
  m->params = owner->params;
  m->grads = owner->grads;
  m->weights = owner->weights;
  m->half = owner->half;
  m->wtype = owner->wtype;
  m->vec_floats = owner->vec_floats;
  m->cvt = owner->cvt;
  m->cvt_bytes = owner->cvt_bytes;
  if (!rc && cvt_bytes(m) > owner->cvt_bytes)
    rc = mt_seterr(MT_EINVAL, "gpt: chunk %d needs %zu bytes of GEMM scratch, its model has %zu",
                   chunk, cvt_bytes(m), owner->cvt_bytes);
  if (!rc) rc = plan_slots(m);
  if (!rc) rc = alloc_acts(m);
  if (rc) mt_gpt_destroy(m);
  return rc;
}

void mt_gpt_destroy(mt_gpt *m) {
  if (m->dev) {
    if (!m->is_chunk) {
      if (m->weights != m->params) mt_device_free(m->dev, m->weights);
      mt_device_free(m->dev, m->half);
      mt_device_free(m->dev, m->cvt);
      mt_device_free(m->dev, m->params);
      mt_device_free(m->dev, m->grads);
    }
    mt_device_free(m->dev, m->acts);
  }
  free(m->host_losses);
  free(m->host_docs);
  free(m->vec_offset);
  act_plan *slots = m->act_plan;
  for (int k = 0; slots && k < m->n_slots; k++) {
    free(slots[k].resid);
    free(slots[k].resid_h);
    free(slots[k].blocks);
  }
  free(slots);
  free(m->params_table);
  memset(m, 0, sizeof *m);
}

int mt_gpt_init_weights(mt_gpt *m, uint64_t seed) {
  const mt_gpt_config *c = &m->cfg;
  double proj_std = c->init_std / sqrt(2.0 * c->n_layer);
  float *host = NULL;
  size_t cap = 0;
  for (int i = 0; i < m->n_tensors; i++) {
    const mt_param *t = &m->params_table[i];
    if (t->numel > cap) {
      free(host);
      cap = t->numel;
      host = malloc(cap * sizeof(float));
      if (!host) return mt_seterr(MT_ENOMEM, "gpt: init buffer of %zu floats", cap);
    }
    const char *dot = strrchr(t->name, '.');
    int is_bias = !strcmp(dot, ".bias");
    int is_ln = strstr(t->name, "ln_") != NULL;
    if (is_bias) {
      memset(host, 0, t->numel * sizeof(float));
    } else if (is_ln) {
      for (size_t e = 0; e < t->numel; e++) host[e] = 1.0f;
    } else {
      int is_proj = strstr(t->name, "c_proj.weight") != NULL;
      double std = is_proj ? proj_std : c->init_std;
      uint64_t key = mt_philox_key(seed, t->name);
      /* each shard draws its own elements of the full tensor; the padding
       * rows of the vocabulary stay zero */
      size_t real = mt_param_is_vocab(t->name) ? (size_t)c->vocab_size * c->n_embd : SIZE_MAX;
      /* every element is a pure function of (key, index): any split is fine */
#pragma omp parallel for schedule(static) if (t->numel >= 65536)
      for (size_t e = 0; e < t->numel; e++) {
        size_t g = mt_param_global_index(t, e);
        host[e] = g < real ? (float)(std * mt_philox_normal(key, g)) : 0.0f;
      }
    }
    int rc = mt_device_memcpy_htod(m->dev, m->params + t->offset, host, t->numel * sizeof(float));
    if (rc) {
      free(host);
      return rc;
    }
  }
  free(host);
  m->seed = seed;
  return mt_gpt_round_weights(m);
}

/* The 16-bit copy is made in one pass over every parameter (of the vectors'
 * places in it, the biases of the GEMMs with 16-bit outputs are read), the
 * vectors' fp32 copies one tensor each. */
int mt_gpt_round_weights(mt_gpt *m) {
  if (m->wtype == MT_F32) return 0;
  int fp16 = m->wtype == MT_F16;
  m->dev->ops->to_half(m->dev, m->half, m->params, m->alloc_params, fp16);
  for (int i = 0; i < m->n_tensors; i++)
    if (m->vec_offset[i] != SIZE_MAX)
      m->dev->ops->round_half(m->dev, m->weights + m->vec_offset[i], mt_gpt_param(m, i),
                              m->params_table[i].numel, fp16);
  return 0;
}

int mt_gpt_is_matrix(const mt_gpt *m, int i) {
  if (i == m->i_wte || i == m->i_head) return 1;
  if (i < m->i_block0 || i >= m->i_block0 + m->n_layers * MT_P_PER_LAYER) return 0;
  int which = (i - m->i_block0) % MT_P_PER_LAYER;
  return which == MT_P_QKV_W || which == MT_P_ATTPROJ_W || which == MT_P_FC_W ||
         which == MT_P_FCPROJ_W;
}

const void *mt_gpt_matrix(const mt_gpt *m, int i) {
  size_t off = m->params_table[i].offset;
  return m->wtype == MT_F32 ? (const void *)(m->params + off) : (const void *)(m->half + off);
}

const float *mt_gpt_weight(const mt_gpt *m, int i) {
  if (m->wtype == MT_F32) return m->params + m->params_table[i].offset;
  return m->weights + m->vec_offset[i];
}

void mt_gpt_zero_grad(mt_gpt *m) {
  mt_device_memset0(m->dev, m->grads, m->alloc_params * sizeof(float));
}

/* Dropout stream of (layer, site); NULL when off. */
static const mt_dropout *dropout_of(const mt_gpt *m, mt_dropout *d, float p, int layer,
                                    const char *site, uint64_t sample0) {
  if (!m->training || p <= 0.0f) return NULL;
  char name[64];
  snprintf(name, sizeof name, "dropout.%d.%s", layer, site);
  *d = (mt_dropout){.p = p, .key = mt_philox_key(m->seed, name), .sample0 = sample0};
  return d;
}

/* The forward and backward read weights through W and P: the working copy
 * (the master itself in fp32). Tensor `which` of this stage's block l
 * (0-based on the stage). */
static const float *W(const mt_gpt *m, int i) { return mt_gpt_weight(m, i); }
static const float *P(const mt_gpt *m, int l, int which) {
  return W(m, m->i_block0 + l * MT_P_PER_LAYER + which);
}
/* A matrix of block l, in m->wtype */
static const void *M(const mt_gpt *m, int l, int which) {
  return mt_gpt_matrix(m, m->i_block0 + l * MT_P_PER_LAYER + which);
}
static float *G(const mt_gpt *m, int l, int which) {
  return mt_gpt_grad(m, m->i_block0 + l * MT_P_PER_LAYER + which);
}

/* train.timing_log_level 2: the time since the last lap to timer id
 * (timers.h). The helpers both passes call lap under the forward's id,
 * which the backward's timers take as their own. */
static void lap(const mt_gpt *m, mt_timer_id id) { mt_timers_lap(m->timers, id); }

/* The g and f operators of Megatron: a sum over the tp group (identity
 * without tensor parallelism). */
static int tp_sum(mt_gpt *m, float *buf, size_t n) {
  if (m->cfg.tp_size <= 1) return 0;
  if (!m->tp_allreduce) return mt_seterr(MT_EINVAL, "gpt: tensor parallel without a tp group");
  int rc = m->tp_allreduce(m->tp_ctx, buf, n, 0);
  lap(m, MT_TM_FWD_TP_COMM);
  return rc;
}

/* Sequence parallelism's all-gather (Megatron's g in the forward, the
 * backward of its reduce-scatter): x, all B T rows of `width` values of
 * type t, gets every rank's rows, this rank's from mine (NULL: they are in
 * their place in x already). */
static int sp_gather(mt_gpt *m, const void *mine, void *x, mt_dtype t, size_t width) {
  if (!m->tp_allgather) return mt_seterr(MT_EINVAL, "gpt: sequence parallel without a tp group");
  size_t bytes = mt_gpt_stream_rows(m) * width * elt_bytes(t);
  if (!mine) mine = (char *)x + (size_t)m->cfg.tp_rank * bytes;
  int rc = m->tp_allgather(m->tp_ctx, mine, x, bytes);
  lap(m, MT_TM_FWD_TP_COMM);
  return rc;
}

/* The sum over tp of a row-parallel GEMM's output buf (B T rows of C): in
 * place over all rows, or with sequence parallelism reduce-scattered into
 * this rank's rows (buf + stream_row0 C). */
static int tp_sum_rows(mt_gpt *m, float *buf) {
  size_t n = (size_t)m->B * m->T * m->cfg.n_embd;
  if (!seq_par(m)) return tp_sum(m, buf, n);
  if (!m->tp_reduce_scatter)
    return mt_seterr(MT_EINVAL, "gpt: sequence parallel without a tp group");
  int rc = m->tp_reduce_scatter(m->tp_ctx, buf, n);
  lap(m, MT_TM_FWD_TP_COMM);
  return rc;
}

/* The piece of one sample that starts at row `row` of the stream's rows
 * ending before row `end`: its first position (*t0) and its rows. */
static size_t sample_piece(const mt_gpt *m, size_t row, size_t end, size_t *t0) {
  size_t T = (size_t)m->T;
  *t0 = row % T;
  return T - *t0 < end - row ? T - *t0 : end - row;
}

/* Row ops on this rank's rows of the stream with the masks whole samples
 * would give them: dropout_fwd, dropout_residual_fwd or dropout_bwd. Without
 * sequence parallelism the rows are the B samples; with it, each sample's
 * piece among them is a call with its sample and its first element. */
typedef enum { ROWS_DROPOUT, ROWS_DROPOUT_RESIDUAL, ROWS_DROPOUT_BWD } rows_op;

static void rows_call(mt_gpt *m, rows_op op, float *out, uint16_t *out_h, mt_dtype ht,
                      const float *resid, const float *x, int n_samples, size_t per,
                      const mt_dropout *drop) {
  mt_device *d = m->dev;
  if (op == ROWS_DROPOUT)
    d->ops->dropout_fwd(d, out, x, n_samples, per, drop);
  else if (op == ROWS_DROPOUT_RESIDUAL)
    d->ops->dropout_residual_fwd(d, out, out_h, ht, resid, x, n_samples, per, drop);
  else
    d->ops->dropout_bwd(d, out, x, n_samples, per, drop);
}

static void rows_dropout(mt_gpt *m, rows_op op, float *out, uint16_t *out_h, mt_dtype ht,
                         const float *resid, const float *x, const mt_dropout *drop) {
  size_t C = (size_t)m->cfg.n_embd, T = (size_t)m->T, R = mt_gpt_stream_rows(m);
  size_t r0 = stream_row0(m);
  if (!seq_par(m)) { /* whole samples */
    rows_call(m, op, out, out_h, ht, resid, x, m->B, T * C, drop);
    lap(m, MT_TM_FWD_ELEMENTWISE);
    return;
  }
  if (!drop) { /* no masks: all rows at once */
    rows_call(m, op, out, out_h, ht, resid, x, 1, R * C, NULL);
    lap(m, MT_TM_FWD_ELEMENTWISE);
    return;
  }
  for (size_t row = r0, t0, rows; row < r0 + R; row += rows) {
    rows = sample_piece(m, row, r0 + R, &t0);
    size_t o = (row - r0) * C;
    mt_dropout piece = *drop;
    piece.sample0 = drop->sample0 + row / T, piece.elem0 = t0 * C;
    rows_call(m, op, out + o, out_h ? out_h + o : NULL, ht, resid ? resid + o : NULL, x + o, 1,
              rows * C, &piece);
  }
  lap(m, MT_TM_FWD_ELEMENTWISE);
}

/* LayerNorm (weights w, bias b) over x (the stream's rows) into out (all
 * B T rows, act_type), mean and rstd (the stream's rows); with sequence
 * parallelism into this rank's rows of out, then gathered, so out holds all
 * rows. */
static int ln_rows(mt_gpt *m, void *out, float *mean, float *rstd, const float *x, const float *w,
                   const float *b) {
  size_t C = (size_t)m->cfg.n_embd;
  void *mine = (char *)out + stream_row0(m) * C * elt_bytes(act_type(m));
  m->dev->ops->layernorm_fwd(m->dev, mine, act_type(m), mean, rstd, x, w, b,
                             (int)mt_gpt_stream_rows(m), (int)C, m->cfg.ln_eps);
  lap(m, MT_TM_FWD_LAYERNORM);
  return seq_par(m) ? sp_gather(m, NULL, out, act_type(m), C) : 0;
}

/* LayerNorm w_index (MT_P_LN1_W or MT_P_LN2_W, its bias next) of block l
 * over x into p->ln, p->ln_mean, p->ln_rstd. The backward calls it again
 * instead of keeping the output: the same op on the same input, the same
 * bits. */
static int layernorm(mt_gpt *m, act_plan *p, int l, int w_index, const float *x) {
  return ln_rows(m, p->ln, p->ln_mean, p->ln_rstd, x, P(m, l, w_index), P(m, l, w_index + 1));
}

/* Where the LayerNorm gradients of n vectors go: straight into the grads
 * lng, or with sequence parallelism this rank's part into p->lngrad
 * (zeroed), for lngrad_join. */
static void lngrad_dst(mt_gpt *m, act_plan *p, float *const *lng, float **dst, int n) {
  size_t C = (size_t)m->cfg.n_embd;
  for (int k = 0; k < n; k++) dst[k] = seq_par(m) ? p->lngrad + (size_t)k * C : lng[k];
  if (seq_par(m)) mt_device_memset0(m->dev, p->lngrad, (size_t)n * C * sizeof(float));
  lap(m, MT_TM_FWD_ELEMENTWISE);
}

/* With sequence parallelism the LayerNorm gradients of this rank's rows,
 * in p->lngrad (n vectors of C), are a part: summed over tp, then added to
 * the gradients at dst[0..n). */
static int lngrad_join(mt_gpt *m, act_plan *p, float *const *dst, int n) {
  size_t C = (size_t)m->cfg.n_embd;
  int rc = tp_sum(m, p->lngrad, (size_t)n * C);
  for (int k = 0; k < n && !rc; k++) m->dev->ops->add_inplace(m->dev, dst[k], p->lngrad + k * C, C);
  lap(m, MT_TM_FWD_ELEMENTWISE);
  return rc;
}

/* The bias of block l at `which`, as a GEMM writing `ot` adds it: the fp32
 * vector, or for a 16-bit output its place in the 16-bit working copy,
 * which holds the same values (mt_gpt_round_weights). */
static const void *bias_for(const mt_gpt *m, int l, int which, mt_dtype ot) {
  return ot == MT_F32 ? (const void *)P(m, l, which) : M(m, l, which);
}

/* In a 16-bit job: x (n floats) = the kept activation the forward stored in h. */
static void unkeep(mt_gpt *m, float *x, const uint16_t *h, size_t n) {
  if (half_acts(m)) m->dev->ops->unpack_half(m->dev, x, h, n, m->cfg.precision == MT_PREC_FP16);
  lap(m, MT_TM_FWD_ELEMENTWISE);
}

/* Block l of the stage forward: out(R,C) = block(in(R,C)) (the stream's rows), activations
 * into a; dropout masks by the global layer and head index. out_t MT_BF16
 * or MT_F16: out is rounded to it, its bits in out_h unless NULL
 * (stream_keep); MT_F32: not rounded. */
static int block_forward(mt_gpt *m, act_plan *p, int l, block_acts *a, const float *in, float *out,
                         uint16_t *out_h, mt_dtype out_t) {
  mt_device *d = m->dev;
  const mt_ops *ops = d->ops;
  const mt_gpt_config *c = &m->cfg;
  int lg = c->layer_begin + l;
  int B = m->B, T = m->T, C = c->n_embd, N = B * T;
  tp_dims t = dims_of(m);
  mt_dtype wt = m->wtype, at = act_type(m);
  float *mine = p->branch + stream_row0(m) * C; /* the branch's sum at the stream's rows */
  mt_dropout da, dh1, dh2;
  const mt_dropout *attn_drop = dropout_of(m, &da, c->attention_dropout, lg, "attn", p->sample0);
  const mt_dropout *drop1 = dropout_of(m, &dh1, c->hidden_dropout, lg, "attn_out", p->sample0);
  const mt_dropout *drop2 = dropout_of(m, &dh2, c->hidden_dropout, lg, "mlp_out", p->sample0);
  if (attn_drop) da.head0 = (uint32_t)(c->tp_rank * t.NHl);

  /* attention branch: resid2 = in + drop(c_proj(attn(c_attn(ln_1(in))))); this
   * rank's heads: qkv (B,T,3C/tp), atty (B,T,C/tp); c_proj sums over tp */
  int rc = layernorm(m, p, l, MT_P_LN1_W, in);
  if (rc) return rc;
  ops->linear_fwd(d, a->qkv, at, p->ln, at, M(m, l, MT_P_QKV_W), wt, bias_for(m, l, MT_P_QKV_B, at),
                  m->cvt, N, C, 3 * t.Cl);
  lap(m, MT_TM_FWD_LINEAR);
  ops->attention_fwd(d, a->atty, a->lse, p->att_scratch, a->qkv, at, B, T, t.Cl, t.NHl, attn_drop,
                     p->doc_start);
  lap(m, MT_TM_FWD_ATTENTION);
  ops->linear_fwd(d, p->branch, MT_F32, a->atty, at, M(m, l, MT_P_ATTPROJ_W), wt,
                  t.owns_bias ? P(m, l, MT_P_ATTPROJ_B) : NULL, m->cvt, N, t.Cl, C);
  lap(m, MT_TM_FWD_LINEAR);
  if ((rc = tp_sum_rows(m, p->branch))) return rc;
  /* in a 16-bit job resid2 is kept, rounded, in resid2_h */
  rows_dropout(m, ROWS_DROPOUT_RESIDUAL, a->resid2, a->resid2_h, half_acts(m) ? at : MT_F32, in,
               mine, drop1);

  /* MLP branch: out = resid2 + drop(c_proj(gelu(c_fc(ln_2(resid2))))); fch (B,T,4C/tp),
   * c_fc's output, kept for GeLU's gradient; on GPUs the GeLU is c_fc's GEMM
   * epilogue (of the unrounded sum in a 16-bit job) */
  if ((rc = layernorm(m, p, l, MT_P_LN2_W, a->resid2))) return rc;
  ops->linear_gelu_fwd(d, p->gelu, a->fch, at, p->ln, at, M(m, l, MT_P_FC_W), wt,
                       bias_for(m, l, MT_P_FC_B, at), m->cvt, N, C, 4 * t.Cl);
  ops->linear_fwd(d, p->branch, MT_F32, p->gelu, at, M(m, l, MT_P_FCPROJ_W), wt,
                  t.owns_bias ? P(m, l, MT_P_FCPROJ_B) : NULL, m->cvt, N, 4 * t.Cl, C);
  lap(m, MT_TM_FWD_LINEAR);
  if ((rc = tp_sum_rows(m, p->branch))) return rc;
  rows_dropout(m, ROWS_DROPOUT_RESIDUAL, out, out_h, out_t, a->resid2, mine, drop2);
  return 0;
}

/* Gradient of a branch that ends in dropout and joins the residual stream,
 * in *g: the stream's gradient itself, or its dropped-out copy in dbtc;
 * with sequence parallelism gathered into dbtc, all rows. */
static int branch_grad(mt_gpt *m, act_plan *p, const mt_dropout *drop, const float **g) {
  *g = p->dres;
  if (!drop && !seq_par(m)) return 0;
  size_t C = (size_t)m->cfg.n_embd, n = mt_gpt_stream_rows(m) * C;
  float *mine = p->dbtc + stream_row0(m) * C;
  *g = p->dbtc;
  if (!drop) /* gathered straight from the stream's gradient */
    return sp_gather(m, p->dres, p->dbtc, MT_F32, C);
  mt_device_memset0(m->dev, mine, n * sizeof(float));
  rows_dropout(m, ROWS_DROPOUT_BWD, mine, NULL, MT_F32, NULL, p->dres, drop); /* lapped there */
  return seq_par(m) ? sp_gather(m, NULL, p->dbtc, MT_F32, C) : 0;
}

/* Block l of the stage backward. p->dres holds d(out) on entry and d(in) on
 * return; parameter gradients accumulate. The inputs of the column-parallel
 * layers get their gradient summed over tp before LayerNorm's backward. */
static int block_backward(mt_gpt *m, act_plan *p, int l, const block_acts *a, const float *in) {
  mt_device *d = m->dev;
  const mt_ops *ops = d->ops;
  const mt_gpt_config *c = &m->cfg;
  int lg = c->layer_begin + l;
  int B = m->B, T = m->T, C = c->n_embd, N = B * T, R = (int)mt_gpt_stream_rows(m);
  tp_dims t = dims_of(m);
  mt_dtype wt = m->wtype, at = act_type(m);
  size_t NC = (size_t)N * C, NCl = (size_t)N * t.Cl, r0C = stream_row0(m) * C;
  mt_dropout da, dh1, dh2;
  const mt_dropout *attn_drop = dropout_of(m, &da, c->attention_dropout, lg, "attn", p->sample0);
  const mt_dropout *drop1 = dropout_of(m, &dh1, c->hidden_dropout, lg, "attn_out", p->sample0);
  const mt_dropout *drop2 = dropout_of(m, &dh2, c->hidden_dropout, lg, "mlp_out", p->sample0);
  if (attn_drop) da.head0 = (uint32_t)(c->tp_rank * t.NHl);
  float *lng[4] = {G(m, l, MT_P_LN2_W), G(m, l, MT_P_LN2_B), G(m, l, MT_P_LN1_W),
                   G(m, l, MT_P_LN1_B)},
        *lnd[4];
  lngrad_dst(m, p, lng, lnd, 4);

  if (!recomputes(m, l)) unkeep(m, a->resid2, a->resid2_h, (size_t)R * C); /* else there */

  /* MLP branch; d(resid2) = dres (identity path) + LayerNorm path below.
   * dfch2 = gelu'(fch) ⊙ (dbranch · W_proj), written, not accumulated, and
   * kept in act_type as autocast keeps fch's gradient; on GPUs the GeLU
   * gradient is c_proj's GEMM epilogue */
  const float *dbranch = NULL;
  int rc = branch_grad(m, p, drop2, &dbranch);
  if (rc) return rc;
  ops->gelu_fwd(d, p->gelu, at, a->fch, at, (size_t)N * 4 * t.Cl);
  lap(m, MT_TM_BWD_ELEMENTWISE);
  ops->linear_bwd_dgelu(d, p->dfch2, at, p->dfch, G(m, l, MT_P_FCPROJ_W), G(m, l, MT_P_FCPROJ_B),
                        dbranch, p->gelu, at, a->fch, M(m, l, MT_P_FCPROJ_W), wt, m->cvt, N,
                        4 * t.Cl, C);
  lap(m, MT_TM_BWD_LINEAR);
  mt_device_memset0(d, p->dbtc2, NC * sizeof(float));
  lap(m, MT_TM_BWD_ELEMENTWISE);
  if ((rc = layernorm(m, p, l, MT_P_LN2_W, a->resid2))) return rc;
  ops->linear_bwd(d, p->dbtc2, G(m, l, MT_P_FC_W), G(m, l, MT_P_FC_B), p->dfch2, at, p->ln, at,
                  M(m, l, MT_P_FC_W), wt, m->cvt, N, C, 4 * t.Cl);
  lap(m, MT_TM_BWD_LINEAR);
  if ((rc = tp_sum_rows(m, p->dbtc2))) return rc;
  ops->layernorm_bwd(d, p->dres, lnd[0], lnd[1], p->dbtc2 + r0C, a->resid2, P(m, l, MT_P_LN2_W),
                     p->ln_mean, p->ln_rstd, R, C);
  lap(m, MT_TM_BWD_LAYERNORM);

  /* attention branch; d(in) = dres + LayerNorm path */
  if ((rc = branch_grad(m, p, drop1, &dbranch))) return rc;
  mt_device_memset0(d, p->dbtc2, NCl * sizeof(float));
  lap(m, MT_TM_BWD_ELEMENTWISE);
  ops->linear_bwd(d, p->dbtc2, G(m, l, MT_P_ATTPROJ_W), G(m, l, MT_P_ATTPROJ_B), dbranch, MT_F32,
                  a->atty, at, M(m, l, MT_P_ATTPROJ_W), wt, m->cvt, N, t.Cl, C);
  lap(m, MT_TM_BWD_LINEAR);
  /* in a 16-bit job written in act_type, as autocast's attention backward
   * returns it: the QKV GEMMs multiply it as it is */
  if (at == MT_F32) mt_device_memset0(d, p->dqkv, 3 * NCl * sizeof(float));
  lap(m, MT_TM_BWD_ELEMENTWISE);
  ops->attention_bwd(d, p->dqkv, at, p->att_scratch, p->dbtc2, a->atty, a->qkv, at, a->lse, B, T,
                     t.Cl, t.NHl, attn_drop, p->doc_start);
  lap(m, MT_TM_BWD_ATTENTION);
  mt_device_memset0(d, p->dbtc, NC * sizeof(float));
  lap(m, MT_TM_BWD_ELEMENTWISE);
  if ((rc = layernorm(m, p, l, MT_P_LN1_W, in))) return rc;
  ops->linear_bwd(d, p->dbtc, G(m, l, MT_P_QKV_W), G(m, l, MT_P_QKV_B), p->dqkv, at, p->ln, at,
                  M(m, l, MT_P_QKV_W), wt, m->cvt, N, C, 3 * t.Cl);
  lap(m, MT_TM_BWD_LINEAR);
  if ((rc = tp_sum_rows(m, p->dbtc))) return rc;
  ops->layernorm_bwd(d, p->dres, lnd[2], lnd[3], p->dbtc + r0C, in, P(m, l, MT_P_LN1_W), p->ln_mean,
                     p->ln_rstd, R, C);
  lap(m, MT_TM_BWD_LAYERNORM);
  return seq_par(m) ? lngrad_join(m, p, lng, 4) : 0;
}

/* In a 16-bit job the stream is rounded after every block but the model's
 * last (a pipeline's stage boundaries included, so every layout rounds the
 * same values) and kept in 16 bits between the stage's blocks; the last
 * block of a stage that is not the model's last writes the bits that
 * travel to the next stage. How block l's output is kept: rounded to *t
 * (MT_F32: not rounded) with its bits where the result points (NULL: none). */
static uint16_t *stream_keep(const mt_gpt *m, const act_plan *p, int l, mt_dtype *t) {
  *t = MT_F32;
  if (!half_acts(m) || (m->last && l == m->n_layers - 1)) return NULL;
  *t = act_type(m);
  return l == m->n_layers - 1 ? p->out_h : p->resid_h[l + 1];
}

void mt_gpt_documents(const int32_t *tokens, int T, int32_t eod, int32_t *pos, int32_t *start) {
  int32_t s = 0;
  for (int t = 0; t < T; t++) {
    if (pos) pos[t] = t - s;
    if (start) start[t] = s;
    if (tokens[t] == eod) s = t + 1; /* Megatron's: the rows after an eod at t */
  }
}

/* The documents of the micro-batch's B samples of inputs (host), into those
 * of p's device buffers it has: the position ids (the first stage) and the
 * rows' starts (every stage), through the model's host buffer. */
static int upload_documents(mt_gpt *m, act_plan *p, const int32_t *inputs) {
  size_t BT = (size_t)m->B * m->T;
  int32_t *pos = p->pos_ids ? m->host_docs : NULL, *start = p->doc_start ? m->host_docs + BT : NULL;
  for (size_t o = 0; o < BT; o += (size_t)m->T)
    mt_gpt_documents(inputs + o, m->T, m->cfg.eod_token, pos ? pos + o : NULL,
                     start ? start + o : NULL);
  int rc = 0;
  if (pos) rc = mt_device_memcpy_htod(m->dev, p->pos_ids, pos, BT * sizeof *pos);
  if (!rc && start) rc = mt_device_memcpy_htod(m->dev, p->doc_start, start, BT * sizeof *start);
  return rc;
}

int mt_gpt_forward_stage(mt_gpt *m, int slot, const int32_t *inputs, const float *x_in,
                         const int32_t *targets, uint64_t sample0) {
  mt_device *d = m->dev;
  const mt_ops *ops = d->ops;
  const mt_gpt_config *c = &m->cfg;
  int B = m->B, T = m->T, C = c->n_embd, N = B * T, L = m->n_layers;
  size_t BT = (size_t)N;
  if (slot < 0 || slot >= m->n_slots)
    return mt_seterr(MT_EINVAL, "gpt: activation slot %d of %d", slot, m->n_slots);
  if (m->first ? !inputs : !x_in)
    return mt_seterr(MT_EINVAL, "gpt: the %s stage needs %s", m->first ? "first" : "middle",
                     m->first ? "input tokens" : "the previous stage's activations");
  act_plan *p = &((act_plan *)m->act_plan)[slot];
  if (p->doc_start && !inputs)
    return mt_seterr(MT_EINVAL, "gpt: attention within documents (reset_attention_mask) needs "
                                "the input tokens on every stage");
  for (size_t i = 0; i < BT; i++) {
    if (inputs && (inputs[i] < 0 || inputs[i] >= c->vocab_size))
      return mt_seterr(MT_EINVAL, "gpt: input token %d at position %zu outside vocab %d", inputs[i],
                       i, c->vocab_size);
    if (targets && targets[i] != MT_TARGET_IGNORE &&
        (targets[i] < 0 || targets[i] >= c->vocab_size))
      return mt_seterr(MT_EINVAL, "gpt: target token %d at position %zu outside vocab %d",
                       targets[i], i, c->vocab_size);
  }
  size_t n_loss = 0; /* the loss is the mean over the targets not masked out */
  for (size_t i = 0; targets && i < BT; i++) n_loss += targets[i] != MT_TARGET_IGNORE;
  int rc = 0;
  if (m->timers) m->timers->backward = 0;
  mt_timers_mark(m->timers);
  /* only the first stage reads the tokens on the device; a stage after it is
   * given them (reset_attention_mask) for the starts alone */
  if (m->first) rc = mt_device_memcpy_htod(d, p->inputs, inputs, BT * sizeof(int32_t));
  if (!rc && targets) rc = mt_device_memcpy_htod(d, p->targets, targets, BT * sizeof(int32_t));
  if (rc) return rc;
  if (inputs && (p->pos_ids || p->doc_start) && (rc = upload_documents(m, p, inputs))) return rc;
  p->sample0 = sample0;
  p->has_targets = m->last && targets;
  p->loss_tokens = (int)n_loss;

  int tp = c->tp_size > 1 ? c->tp_size : 1, Vl = c->padded_vocab / tp, v0 = c->tp_rank * Vl;
  size_t R = mt_gpt_stream_rows(m), r0 = stream_row0(m);
  if (m->first && tp == 1 && !p->pos_ids) {
    ops->embedding_fwd(d, p->resid[0], p->inputs, mt_gpt_matrix(m, m->i_wte), m->wtype,
                       W(m, m->i_wpe), B, T, C);
  } else if (m->first) {
    /* vocabulary-parallel: each rank looks up the tokens in its rows, the sum
     * over tp is the embedding (with sequence parallelism reduce-scattered
     * to the stream's rows); positions are replicated and added after, each
     * sample's piece of the rows from its first position */
    float *e = seq_par(m) ? p->branch : p->resid[0];
    ops->embedding_shard_fwd(d, e, p->inputs, mt_gpt_matrix(m, m->i_wte), m->wtype, v0, Vl, N, C);
    if ((rc = tp_sum_rows(m, e))) return rc;
    e += r0 * C;
    /* positions in their documents (reset_position_ids): the lookup of the
     * stream's rows' position ids in wpe, into the backward's scratch, then
     * added as the rows of positions 0..T-1 are (the same sums) */
    if (p->pos_ids) {
      ops->embedding_shard_fwd(d, p->dbtc, p->pos_ids + r0, W(m, m->i_wpe), MT_F32, 0, c->max_seq,
                               (int)R, C);
      ops->residual_fwd(d, p->resid[0], e, p->dbtc, R * C);
    }
    for (size_t row = r0, t0, rows; !p->pos_ids && row < r0 + R; row += rows) {
      rows = sample_piece(m, row, r0 + R, &t0);
      size_t o = (row - r0) * C;
      ops->residual_fwd(d, p->resid[0] + o, e + o, W(m, m->i_wpe) + t0 * C, rows * C);
    }
  }
  if (m->first) {
    mt_dropout de;
    const mt_dropout *edrop = dropout_of(m, &de, c->hidden_dropout, -1, "embedding", sample0);
    if (edrop) rows_dropout(m, ROWS_DROPOUT, p->resid[0], NULL, MT_F32, NULL, p->resid[0], edrop);
    lap(m, MT_TM_FWD_EMBEDDING); /* the uploads, lookups and dropout since the mark */
  } else {
    if (x_in != p->resid[0]) /* mt_gpt_stage_input_from_wire decoded it there */
      rc = mt_device_memcpy_dtod(d, p->resid[0], x_in, R * C * sizeof(float));
    if (rc) return rc;
    lap(m, MT_TM_FWD_ELEMENTWISE);
  }

  const float *in = p->resid[0];
  for (int l = 0; l < L && !rc; l++) {
    float *out = p->resid[l + 1] ? p->resid[l + 1] : p->stream[l % 2];
    mt_dtype kt;
    uint16_t *kh = stream_keep(m, p, l, &kt);
    mt_range_push("layer %d", m->cfg.layer_begin + l); /* the model's number */
    rc = block_forward(m, p, l, acts_of(m, p, l), in, out, kh, kt);
    mt_range_pop();
    in = out;
  }
  if (rc || !m->last) return rc;

  rc =
      ln_rows(m, p->lnf, p->lnf_mean, p->lnf_rstd, p->resid[L], W(m, m->i_lnf), W(m, m->i_lnf + 1));
  if (rc) return rc;
  /* LM head: logits(B,T,Vp) = lnf · headᵀ, head wte (tied) or lm_head */
  ops->linear_fwd(d, p->logits, MT_F32, p->lnf, act_type(m), mt_gpt_matrix(m, m->i_head), m->wtype,
                  NULL, m->cvt, N, C, Vl);
  lap(m, MT_TM_FWD_HEAD);
  m->last_loss = 0.0f;
  if (targets && tp > 1) {
    /* vocabulary-parallel cross-entropy: the max, the sum of exponentials
     * and the target's logit reduced over tp; the logits never gathered */
    int real = c->vocab_size - v0 < 0 ? 0 : c->vocab_size - v0 > Vl ? Vl : c->vocab_size - v0;
    ops->crossentropy_shard_max(d, p->rowmax, p->logits, N, real, Vl);
    lap(m, MT_TM_FWD_LOSS);
    if (!m->tp_allreduce) return mt_seterr(MT_EINVAL, "gpt: tensor parallel without a tp group");
    if ((rc = m->tp_allreduce(m->tp_ctx, p->rowmax, BT, 1))) return rc;
    lap(m, MT_TM_FWD_TP_COMM);
    ops->crossentropy_shard_sum(d, p->rowsum, p->rowsum + BT, p->logits, p->targets, p->rowmax, N,
                                real, Vl, v0);
    lap(m, MT_TM_FWD_LOSS);
    if ((rc = tp_sum(m, p->rowsum, 2 * BT))) return rc;
    float *host = m->host_losses;
    rc = mt_device_memcpy_dtoh(d, host, p->rowmax, BT * sizeof(float));
    if (!rc) rc = mt_device_memcpy_dtoh(d, host + BT, p->rowsum, 2 * BT * sizeof(float));
    if (rc) return rc;
    double sum = 0.0;
    for (size_t i = 0; i < BT; i++)
      if (targets[i] != MT_TARGET_IGNORE)
        sum += (double)host[i] + log((double)host[BT + i]) - (double)host[2 * BT + i];
    /* every target masked: a loss of 0, not 0/0 (Megatron's would be NaN) */
    m->last_loss = n_loss ? (float)(sum / (double)n_loss) : 0.0f;
    lap(m, MT_TM_FWD_LOSS);
  } else if (targets) {
    ops->crossentropy(d, p->losses, NULL, p->logits, p->targets, 0.0f, N, c->vocab_size,
                      c->padded_vocab);
    rc = mt_device_memcpy_dtoh(d, m->host_losses, p->losses, BT * sizeof(float));
    if (rc) return rc;
    double sum = 0.0; /* a masked target's loss is 0 */
    for (size_t i = 0; i < BT; i++) sum += m->host_losses[i];
    m->last_loss = n_loss ? (float)(sum / (double)n_loss) : 0.0f;
    lap(m, MT_TM_FWD_LOSS);
  }
  return 0;
}

int mt_gpt_backward_stage(mt_gpt *m, int slot, const float *dout, float loss_scale) {
  mt_device *d = m->dev;
  const mt_ops *ops = d->ops;
  const mt_gpt_config *c = &m->cfg;
  int B = m->B, T = m->T, C = c->n_embd, N = B * T, L = m->n_layers;
  int R = (int)mt_gpt_stream_rows(m);
  size_t NC = (size_t)N * C, RC = (size_t)R * C;
  if (slot < 0 || slot >= m->n_slots)
    return mt_seterr(MT_EINVAL, "gpt: activation slot %d of %d", slot, m->n_slots);
  act_plan *p = &((act_plan *)m->act_plan)[slot];
  int tp = c->tp_size > 1 ? c->tp_size : 1, Vl = c->padded_vocab / tp, v0 = c->tp_rank * Vl;
  if (m->timers) m->timers->backward = 1;
  mt_timers_mark(m->timers);
  if (m->last) {
    if (!p->has_targets)
      return mt_seterr(MT_EINVAL, "gpt: backward needs a forward with targets first");
    p->has_targets = 0; /* logits become dlogits below */
    /* loss = mean over the tokens not masked out (all B*T without a loss
     * mask), times loss_scale; none left: no gradient at all */
    float dloss = p->loss_tokens ? loss_scale / (float)p->loss_tokens : 0.0f;
    if (tp > 1) {
      int real = c->vocab_size - v0 < 0 ? 0 : c->vocab_size - v0 > Vl ? Vl : c->vocab_size - v0;
      ops->crossentropy_shard_grad(d, p->logits, p->logits, p->targets, p->rowmax, p->rowsum, dloss,
                                   N, real, Vl, v0);
    } else {
      ops->crossentropy(d, NULL, p->logits, p->logits, p->targets, dloss, N, c->vocab_size,
                        c->padded_vocab);
    }
    lap(m, MT_TM_BWD_LOSS);
    mt_device_memset0(d, p->dbtc, NC * sizeof(float));
    ops->linear_bwd(d, p->dbtc, mt_gpt_grad(m, m->i_head), NULL, p->logits, MT_F32, p->lnf,
                    act_type(m), mt_gpt_matrix(m, m->i_head), m->wtype, m->cvt, N, C, Vl);
    lap(m, MT_TM_BWD_HEAD);
    int rc = tp_sum_rows(m, p->dbtc);
    if (rc) return rc;
    mt_device_memset0(d, p->dres, RC * sizeof(float));
    float *lng[2] = {mt_gpt_grad(m, m->i_lnf), mt_gpt_grad(m, m->i_lnf + 1)}, *lnd[2];
    lngrad_dst(m, p, lng, lnd, 2);
    ops->layernorm_bwd(d, p->dres, lnd[0], lnd[1], p->dbtc + stream_row0(m) * C, p->resid[L],
                       W(m, m->i_lnf), p->lnf_mean, p->lnf_rstd, R, C);
    lap(m, MT_TM_BWD_LAYERNORM);
    if (seq_par(m) && (rc = lngrad_join(m, p, lng, 2))) return rc;
  } else {
    if (!dout) return mt_seterr(MT_EINVAL, "gpt: a non-last stage needs the next stage's gradient");
    int rc = mt_device_memcpy_dtod(d, p->dres, dout, RC * sizeof(float));
    if (rc) return rc;
    lap(m, MT_TM_BWD_ELEMENTWISE);
  }

  for (int l = L - 1; l >= 0; l--) {
    block_acts *a = acts_of(m, p, l);
    const float *in = p->resid[l];
    if (!in) { /* a 16-bit job's stream */
      unkeep(m, p->stream[0], p->resid_h[l], RC);
      in = p->stream[0];
    }
    /* the recomputed output is not needed, and in a 16-bit job is not rounded */
    float *out = half_acts(m) || !p->resid[l + 1] ? p->stream[1] : p->resid[l + 1];
    int rc = 0;
    mt_range_push("layer %d", m->cfg.layer_begin + l);
    if (recomputes(m, l)) {
      if (m->timers) m->timers->recompute = 1;
      mt_range_push("recompute");
      rc = block_forward(m, p, l, a, in, out, NULL, MT_F32);
      mt_range_pop();
      if (m->timers) m->timers->recompute = 0;
    }
    if (!rc) rc = block_backward(m, p, l, a, in);
    mt_range_pop();
    if (!rc && m->on_block_grads) {
      rc = m->on_block_grads(m->grads_ctx, l);
      lap(m, MT_TM_BWD_DP_COMM);
    }
    if (rc) return rc;
  }
  if (!m->first) return 0; /* p->dres is d(stage input): mt_gpt_stage_input_grad */

  mt_dropout de;
  const mt_dropout *edrop = dropout_of(m, &de, c->hidden_dropout, -1, "embedding", p->sample0);
  const float *demb = NULL; /* all rows */
  int rc = branch_grad(m, p, edrop, &demb);
  if (rc) return rc;
  if (tp == 1 && !p->pos_ids) {
    ops->embedding_bwd(d, mt_gpt_grad(m, m->i_wte), mt_gpt_grad(m, m->i_wpe), demb, p->inputs, B, T,
                       C);
    lap(m, MT_TM_BWD_EMBEDDING);
    return 0;
  }
  ops->embedding_shard_bwd(d, mt_gpt_grad(m, m->i_wte), demb, p->inputs, v0, Vl, N, C);
  /* positions in their documents: wpe's gradient scattered by position id,
   * in order of the rows as embedding_bwd sums it */
  if (p->pos_ids)
    ops->embedding_shard_bwd(d, mt_gpt_grad(m, m->i_wpe), demb, p->pos_ids, 0, c->max_seq, N, C);
  for (int b = 0; b < B && !p->pos_ids; b++)
    ops->add_inplace(d, mt_gpt_grad(m, m->i_wpe), demb + (size_t)b * T * C, (size_t)T * C);
  lap(m, MT_TM_BWD_EMBEDDING);
  return 0;
}

int mt_gpt_decode(mt_gpt *m, int pos, int32_t token) {
  const mt_gpt_config *c = &m->cfg;
  mt_device *d = m->dev;
  const mt_ops *ops = d->ops;
  if (!m->first || !m->last || c->tp_size > 1 || c->recompute || half_acts(m) || m->training)
    return mt_seterr(MT_EINVAL, "gpt: decoding with a key-value cache needs the whole model on one "
                                "device, in fp32, without recomputation, training off");
  if (!ops->attention_decode)
    return mt_seterr(MT_EINVAL, "gpt: the %s backend has no attention_decode", ops->name);
  if (pos < 0 || pos >= m->T)
    return mt_seterr(MT_EINVAL, "gpt: position %d is outside the %d the model was planned for", pos,
                     m->T);
  if (token < 0 || token >= c->vocab_size)
    return mt_seterr(MT_EINVAL, "gpt: token %d is outside vocab %d", token, c->vocab_size);
  act_plan *p = &((act_plan *)m->act_plan)[0];
  size_t C = (size_t)c->n_embd, at = (size_t)pos * C;
  int rc = mt_device_memcpy_htod(d, p->inputs + pos, &token, sizeof token);
  if (rc) return rc;
  ops->embedding_fwd(d, p->resid[0] + at, p->inputs + pos, mt_gpt_matrix(m, m->i_wte), m->wtype,
                     W(m, m->i_wpe) + at, 1, 1, (int)C);
  /* one row of every buffer the forward uses: the row of position pos */
  float *ln = (float *)p->ln + at, *branch = p->branch + at, *gelu = (float *)p->gelu + 4 * at;
  for (int l = 0; l < m->n_layers; l++) {
    block_acts *a = &p->blocks[l];
    const float *in = p->resid[l] + at;
    float *qkv = a->qkv, *atty = (float *)a->atty + at, *resid2 = a->resid2 + at;
    ops->layernorm_fwd(d, ln, MT_F32, p->ln_mean + pos, p->ln_rstd + pos, in, P(m, l, MT_P_LN1_W),
                       P(m, l, MT_P_LN1_B), 1, (int)C, c->ln_eps);
    ops->linear_fwd(d, qkv + 3 * at, MT_F32, ln, MT_F32, M(m, l, MT_P_QKV_W), m->wtype,
                    P(m, l, MT_P_QKV_B), m->cvt, 1, (int)C, 3 * (int)C);
    ops->attention_decode(d, atty, qkv, pos + 1, (int)C, c->n_head);
    ops->linear_fwd(d, branch, MT_F32, atty, MT_F32, M(m, l, MT_P_ATTPROJ_W), m->wtype,
                    P(m, l, MT_P_ATTPROJ_B), m->cvt, 1, (int)C, (int)C);
    ops->dropout_residual_fwd(d, resid2, NULL, MT_F32, in, branch, 1, C, NULL);
    ops->layernorm_fwd(d, ln, MT_F32, p->ln_mean + pos, p->ln_rstd + pos, resid2,
                       P(m, l, MT_P_LN2_W), P(m, l, MT_P_LN2_B), 1, (int)C, c->ln_eps);
    ops->linear_gelu_fwd(d, gelu, (float *)a->fch + 4 * at, MT_F32, ln, MT_F32, M(m, l, MT_P_FC_W),
                         m->wtype, P(m, l, MT_P_FC_B), m->cvt, 1, (int)C, 4 * (int)C);
    ops->linear_fwd(d, branch, MT_F32, gelu, MT_F32, M(m, l, MT_P_FCPROJ_W), m->wtype,
                    P(m, l, MT_P_FCPROJ_B), m->cvt, 1, 4 * (int)C, (int)C);
    ops->dropout_residual_fwd(d, p->resid[l + 1] + at, NULL, MT_F32, resid2, branch, 1, C, NULL);
  }
  float *lnf = (float *)p->lnf + at;
  ops->layernorm_fwd(d, lnf, MT_F32, p->lnf_mean + pos, p->lnf_rstd + pos,
                     p->resid[m->n_layers] + at, W(m, m->i_lnf), W(m, m->i_lnf + 1), 1, (int)C,
                     c->ln_eps);
  ops->linear_fwd(d, p->logits + (size_t)pos * c->padded_vocab, MT_F32, lnf, MT_F32,
                  mt_gpt_matrix(m, m->i_head), m->wtype, NULL, m->cvt, 1, (int)C, c->padded_vocab);
  return mt_device_sync(d); /* a GPU op that failed says so here, not in a later token */
}

const float *mt_gpt_stage_output(const mt_gpt *m, int slot) {
  const act_plan *p = &((const act_plan *)m->act_plan)[slot];
  return p->resid[m->n_layers];
}

const float *mt_gpt_logits(const mt_gpt *m, int slot) {
  return m->last ? ((const act_plan *)m->act_plan)[slot].logits : NULL;
}

const float *mt_gpt_stage_input_grad(const mt_gpt *m) {
  return ((const act_plan *)m->act_plan)[0].dres;
}

size_t mt_gpt_wire_bytes(const mt_gpt *m) {
  return mt_gpt_stream_rows(m) * m->cfg.n_embd * elt_bytes(act_type(m));
}

const void *mt_gpt_stage_output_wire(const mt_gpt *m, int slot, size_t *bytes) {
  const act_plan *p = &((const act_plan *)m->act_plan)[slot];
  *bytes = mt_gpt_wire_bytes(m);
  if (p->out_h) return p->out_h;
  return p->resid[m->n_layers];
}

const float *mt_gpt_stage_input_from_wire(mt_gpt *m, int slot, const void *wire) {
  float *x = ((act_plan *)m->act_plan)[slot].resid[0];
  size_t n = mt_gpt_stream_rows(m) * m->cfg.n_embd;
  if (half_acts(m))
    m->dev->ops->unpack_half(m->dev, x, wire, n, m->cfg.precision == MT_PREC_FP16);
  else if (mt_device_memcpy_dtod(m->dev, x, wire, n * sizeof(float)))
    return NULL;
  return x;
}

int mt_gpt_forward(mt_gpt *m, const int32_t *inputs, const int32_t *targets, uint64_t sample0) {
  return mt_gpt_forward_stage(m, 0, inputs, NULL, targets, sample0);
}

int mt_gpt_backward(mt_gpt *m, float loss_scale) {
  return mt_gpt_backward_stage(m, 0, NULL, loss_scale);
}

double mt_gpt_flops_per_step(const mt_gpt_config *c, int B, int T) {
  /* Narayanan et al. eq. 3 without recomputation: per token and layer
   * 24 C² (four GEMMs) + 4 T C (scores and values), plus 2 C Vp for the LM
   * head; backward costs twice the forward. */
  double C = c->n_embd, L = c->n_layer, Vp = c->padded_vocab, tokens = (double)B * T;
  return 3.0 * tokens * (L * (24.0 * C * C + 4.0 * T * C) + 2.0 * C * Vp);
}
