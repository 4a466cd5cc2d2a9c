/* gpt.h — a GPT-2 style decoder on one device: parameters, forward, backward.
 *
 * Pre-LayerNorm blocks (ln_1 -> attention -> residual, ln_2 -> MLP(4C, GeLU)
 * -> residual), learned positions, final LayerNorm, LM head tied to the token
 * embedding (or with untie_embeddings an output weight of its own,
 * lm_head, Megatron's output_layer). Parameters, gradients and activations
 * each live in one large device buffer laid out from the parameter table
 * and the activation plan.
 * Parameter names are Hugging Face GPT-2's ("h.3.attn.c_attn.weight"); the
 * layouts are ours: linear weights are (out, in) and the embedding has the
 * padded vocabulary (safetensors.c converts on the way in and out).
 * Mixed precision (Megatron's): params are the fp32 master weights, the ones
 * the optimizer updates and checkpoints save; with a bf16 or fp16 config the
 * forward and backward read `weights` instead, the master rounded to 16 bits
 * by mt_gpt_round_weights(). The ops compute in fp32; the activations a
 * block keeps for its backward pass are stored in 16 bits (rounded where
 * they are made, so forward and backward see the same values), and
 * gradients are accumulated in fp32.
 * This module knows nothing of the optimizer, the data or parallelism.
 */
#ifndef MT_GPT_H
#define MT_GPT_H

#include <stddef.h>
#include <stdint.h>

#include "device.h"
#include "ops.h"
#include "timers.h"

/* What the forward and backward read the weights in. */
typedef enum { MT_PREC_FP32 = 0, MT_PREC_BF16 = 1, MT_PREC_FP16 = 2 } mt_precision;

typedef struct mt_gpt_config {
  int n_layer, n_embd, n_head;
  int vocab_size;   /* V: real tokens */
  int padded_vocab; /* Vp >= V: rows of wte, columns of the logits */
  int max_seq;      /* rows of wpe */
  float ln_eps;
  float init_std;
  float hidden_dropout, attention_dropout;
  int recompute;        /* keep only each block's input; recompute in backward */
  int recompute_layers; /* with recompute: only the stage's first this many blocks
                           (Megatron's --recompute-method block); 0: every block */
  int zero_shards;      /* params and grads padded to split into this many equal
                           slices (ZeRO-1 over dp); 0 or 1: no padding */
  /* Pipeline stage: blocks [layer_begin, layer_end) (0, 0: the whole model).
   * The stage holding layer 0 has the embeddings, the one holding the last
   * layer the final LayerNorm and the LM head tied to its own copy of wte. */
  int layer_begin, layer_end;
  /* Interleaved pipeline (Megatron's virtual pipeline): with
   * virtual_stages v > 1 the layers split into pp_size * v chunks
   * (mt_stage_layers) and stage pp_rank holds chunks pp_rank, pp_rank +
   * pp_size, ...: such a model holds their parameters, in one table in
   * layer order (its own chunks' ends decide first and last), and no
   * activations; each chunk runs as a view of it (mt_gpt_create_chunk).
   * layer_begin and layer_end are then 0. */
  int virtual_stages, pp_size, pp_rank;
  int micro_slots; /* micro-batches whose activations are kept at once (1F1B in-flight); 0: 1 */
  /* Tensor parallelism (Megatron): this rank holds shard tp_rank of tp_size
   * of every matrix: heads and the MLP's inner dimension split (QKV and c_fc
   * by output rows, the projections by input columns), the vocabulary split
   * over the embedding rows; LayerNorms, positions and the projections'
   * biases are replicated. 0: 1. */
  int tp_size, tp_rank;
  /* Sequence parallelism (Korthikanti et al. 2022, Megatron's
   * --sequence-parallel), with tp_size > 1: where the ops are row by row
   * and tensor parallelism would repeat them on every rank (the LayerNorms,
   * dropout, the residual stream between and through the blocks, what
   * travels between pipeline stages) each rank holds and computes only rows
   * [tp_rank R, (tp_rank + 1) R) of the micro-batch's B T, R = B T / tp. The
   * sums over tp after the row-parallel projections become reduce-scatters
   * into those rows, and the column-parallel GEMMs' inputs are all-gathered
   * first: the same bytes moved, the stream's memory and work divided by tp.
   * Gradients of the replicated LayerNorms are summed over tp per
   * micro-batch. B T must be divisible by tp. */
  int sequence_parallel;
  mt_precision precision; /* 0: fp32 */
  /* Documents inside a sample (Megatron's --reset-position-ids and
   * --reset-attention-mask): with reset_position_ids the position of an
   * input after one equal to eod_token is 0 again, and counts on from
   * there; with reset_attention_mask a row attends only to the rows of its
   * own document (and causally). The end-of-document token itself belongs
   * to the document it ends. Both come from the input tokens a forward is
   * given, which every stage then needs for reset_attention_mask. */
  int eod_token;
  int reset_position_ids;
  int reset_attention_mask;
  /* Megatron's --untie-embeddings-and-output-weights: the head is
   * lm_head.weight (Vp, C), vocabulary-split over tp as wte is, the last
   * entry of the last stage's table (after ln_f), initialised as wte is
   * from its own name; wte is then the first stage's only. 0: the head
   * reads wte (the last stage's own copy of it when pp > 1). */
  int untie_embeddings;
} mt_gpt_config;

/* How a tensor-parallel shard maps onto the full tensor. */
typedef enum {
  MT_SHARD_NONE = 0, /* replicated: the full tensor on every tp rank */
  MT_SHARD_ROWS,     /* rows [shard_off, shard_off + shape[0]) of the full tensor */
  MT_SHARD_QKV,      /* in each of q, k, v: rows [shard_off, shard_off + shape[0] / 3) */
  MT_SHARD_COLS,     /* columns [shard_off, shard_off + shape[1]) */
} mt_shard;

typedef struct mt_param {
  char name[48]; /* "h.3.mlp.c_fc.weight" */
  int ndim;
  size_t shape[2]; /* this shard, our layout: (out, in) for linear weights */
  size_t full[2];  /* the whole tensor */
  mt_shard shard;
  size_t shard_off;
  size_t numel;
  size_t offset; /* in floats, into params / grads */
  int decay;     /* weight decay applies (matrices and embeddings) */
  int layer;     /* block index, -1 outside blocks */
} mt_param;

/* The part [*a, *b) of tensor p inside the flat slice [lo, hi) of the
 * parameter buffer (a ZeRO-1 slice); 0 when they do not meet. */
static inline int mt_param_overlap(const mt_param *p, size_t lo, size_t hi, size_t *a, size_t *b) {
  *a = p->offset > lo ? p->offset : lo;
  *b = p->offset + p->numel < hi ? p->offset + p->numel : hi;
  return *a < *b;
}

/* Index in the full tensor (row-major) of element e of p's shard. */
size_t mt_param_global_index(const mt_param *p, size_t e);

/* The 16 tensors of a block, in table order. */
enum {
  MT_P_LN1_W,
  MT_P_LN1_B,
  MT_P_QKV_W,
  MT_P_QKV_B,
  MT_P_ATTPROJ_W,
  MT_P_ATTPROJ_B,
  MT_P_LN2_W,
  MT_P_LN2_B,
  MT_P_FC_W,
  MT_P_FC_B,
  MT_P_FCPROJ_W,
  MT_P_FCPROJ_B,
  MT_P_PER_LAYER
};

typedef struct mt_gpt {
  mt_gpt_config cfg;
  mt_device *dev;
  int B, T; /* micro-batch shape the activations are planned for */

  mt_param *params_table; /* wte, wpe, then per block MT_P_PER_LAYER, then ln_f w, b
                             (untied: then lm_head) */
  int n_tensors;
  size_t num_params;   /* floats in params (== grads), table layout */
  size_t alloc_params; /* num_params padded to zero_shards equal slices */
  float *params;       /* device: fp32 master weights */
  float *grads;        /* device: fp32, accumulated over micro-batches */
  /* device: the working copy the forward and backward read, params rounded
   * to nearest even into the job's format (mt_gpt_round_weights). fp32:
   * params itself, wtype MT_F32. bf16 / fp16: the matrices GEMMs and the
   * embedding lookup read (wte and the blocks' four weights, nearly every
   * parameter) in 16 bits, `half`, at their params offsets (alloc_params
   * uint16s); the vectors (biases, LayerNorms) and wpe, which the row
   * kernels read as fp32, as floats holding the rounded values, packed in
   * `weights` at vec_offset[i] (vec_floats of them). */
  float *weights;
  uint16_t *half;
  mt_dtype wtype;
  size_t *vec_offset; /* per tensor; SIZE_MAX for the matrices in `half` */
  size_t vec_floats;
  /* device: the conversion scratch the linear ops share (linear_scratch:
   * the largest of this stage's GEMMs); NULL when none is needed */
  void *cvt;
  size_t cvt_bytes;

  float *acts; /* device: every activation, one buffer */
  size_t acts_floats;
  void *act_plan; /* internal: n_slots plans of pointers into acts */
  int n_slots;
  float last_loss;                   /* mean loss of the last forward (last stage) over
                                        its unmasked targets */
  float *host_losses;                /* host, 3 * B * T: the losses read back each forward */
  int32_t *host_docs;                /* host, 2 * B * T: the position ids, then the
                                        starts, a forward uploads (NULL: no reset key) */
  uint64_t seed;                     /* dropout masks derive from it (set by init_weights) */
  int training;                      /* 1: dropout on (default); 0: evaluation */
  int first, last;                   /* this stage holds the embeddings / the head */
  int is_chunk;                      /* a view of another model's parameters
                                        (mt_gpt_create_chunk): frees none of them */
  const struct mt_gpt *work_lender;  /* a chunk: the chunk whose block working buffers
                                        and backward scratch it uses (NULL: its own) */
  int n_layers;                      /* blocks on this stage */
  int i_wte, i_wpe, i_block0, i_lnf; /* table indices, -1 when absent here */
  int i_head;                        /* the LM head's weight: i_wte, or untied lm_head */
  /* tensor parallelism: sum (or max) of buf over the tp group, set by the
   * engine when cfg.tp_size > 1; the model never knows the comm layer */
  int (*tp_allreduce)(void *ctx, float *buf, size_t n, int max);
  /* and for sequence parallelism: recv (tp * bytes) = every rank's send
   * (bytes) in rank order, send being recv + tp_rank * bytes; buf (n floats,
   * tp equal chunks) summed over tp into this rank's chunk */
  int (*tp_allgather)(void *ctx, const void *send, void *recv, size_t bytes);
  int (*tp_reduce_scatter)(void *ctx, float *buf, size_t n);
  void *tp_ctx;
  /* when set, called once the backward has queued block l's gradients (l
   * 0-based on this stage, from the last block down): the engine starts
   * reducing what is final while the blocks below compute. Nonzero fails
   * the backward with that code. */
  int (*on_block_grads)(void *ctx, int l);
  void *grads_ctx;
  /* train.timing_log_level's timers, set by the engine (NULL: none): at
   * level 2 the forward and backward time their pieces into it */
  mt_timers *timers;
} mt_gpt;

/* Builds the parameter table and allocates params, grads and activations for
 * micro-batches of (B, T), T <= max_seq. Fails on an impossible shape. */
int mt_gpt_create(mt_gpt *m, const mt_gpt_config *cfg, mt_device *dev, int B, int T);
void mt_gpt_destroy(mt_gpt *m);

/* Chunk `chunk` of an interleaved model (cfg.virtual_stages > 1): a model
 * of that chunk's blocks, and of the embeddings or head where the chunk
 * is the model's first or last, whose parameters, gradients, working copy
 * and conversion scratch are owner's (the same offsets), with activations
 * of its own for `slots` micro-batches. It runs forward_stage and
 * backward_stage as a stage does; owner rounds, zeroes and initialises
 * for it, and must outlive it. With lender (another chunk of owner), the
 * block working buffers and the backward's scratch are lender's, not its
 * own: the chunks run one at a time, and what such a buffer holds does
 * not outlive the operation, except the input gradient (the backward
 * scratch), which the caller must have sent before any chunk's next
 * backward. Copies owner's seed, training flag and tp
 * hooks: set them on owner first (the training flag on both after). */
int mt_gpt_create_chunk(mt_gpt *m, const mt_gpt *owner, int chunk, int slots, const mt_gpt *lender);

/* Layers [*begin, *end) of stage s of pp: the first n_layer % pp stages hold
 * one layer more. */
void mt_stage_layers(int n_layer, int pp, int s, int *begin, int *end);

/* Makes c the model of pipeline stage s of pp with v chunks a stage
 * (parallel.virtual_stages; 1: its one range of layers); pp 1: the whole
 * model. */
void mt_gpt_set_stage(mt_gpt_config *c, int pp, int s, int v);

/* Whether cfg's model (its stage, all its chunks) holds the first block,
 * which reads the tokens, or the last, which reads the targets. */
void mt_gpt_ends(const mt_gpt_config *cfg, int *first, int *last);

/* Rounds the master weights into the working copy the forward and backward
 * read (round to nearest even, elementwise, so every tp shard and pipeline
 * stage rounds its part of a tensor as the whole tensor would be rounded).
 * A no-op for fp32. Call it whenever params changed before the next forward:
 * the engine does at the start of every step and evaluation. */
int mt_gpt_round_weights(mt_gpt *m);

/* Whether tensor `name` is (Vp, C) with a row per token: wte.weight or an
 * untied lm_head.weight, whose rows past the real vocabulary are padding
 * (zero, and not in an export). */
int mt_param_is_vocab(const char *name);

/* Index of a named tensor in the table, or -1. */
int mt_gpt_find(const mt_gpt *m, const char *name);
/* Index of tensor `name` in a table of n (mt_gpt_table's), or -1. */
int mt_param_find(const mt_param *table, int n, const char *name);

/* DESIGN's initialisation: every element from Philox(key(seed, name), index
 * in the full tensor); weights N(0, init_std), output projections
 * (attn.c_proj, mlp.c_proj) N(0, init_std / sqrt(2 n_layer)), biases 0,
 * LayerNorm weight 1 and bias 0. Rounds the working copy too. */
int mt_gpt_init_weights(mt_gpt *m, uint64_t seed);

/* The documents of one sample of T input tokens (host): pos[t] = t -
 * start[t], start[t] the first position of the document row t belongs to
 * (one past the last eod token before t, 0 when none; an eod token belongs
 * to the document it ends). Either may be NULL. */
void mt_gpt_documents(const int32_t *tokens, int T, int32_t eod, int32_t *pos, int32_t *start);

/* Forward over one micro-batch; inputs/targets are host (B,T) token ids.
 * targets may be NULL (logits only); a target of MT_TARGET_IGNORE (ops.h)
 * is masked out of the loss (Megatron's loss mask). sample0 is the global
 * index of row 0 (dropout masks) and step is unused by the math but kept
 * for logs. Returns 0; the mean loss over the targets not masked out (all
 * B*T without a mask; 0 when every one is) lands in m->last_loss. */
int mt_gpt_forward(mt_gpt *m, const int32_t *inputs, const int32_t *targets, uint64_t sample0);

/* Backward of the last forward; ACCUMULATES into m->grads. loss_scale is
 * d(objective)/d(mean loss of this micro-batch), e.g. 1/micro_batches for an
 * objective that is the mean over the global batch. Each unmasked token's
 * loss counts loss_scale / (unmasked tokens); a micro-batch whose targets
 * are all masked adds no gradient. */
int mt_gpt_backward(mt_gpt *m, float loss_scale);

/* Pipeline stages. Forward of the micro-batch in activation slot `slot`:
 * the first stage embeds inputs (host tokens; with reset_attention_mask
 * every stage needs them, for the documents), any other stage starts from
 * x_in (mt_gpt_stream_rows, C) received from the previous stage; the last stage needs targets
 * (host) and sets last_loss. mt_gpt_stage_output() is what a non-last stage
 * sends on. Backward: the last stage starts from its loss (loss_scale), any
 * other from dout (mt_gpt_stream_rows, C) received from the next stage; afterwards
 * mt_gpt_stage_input_grad() is what a non-first stage sends back. */
int mt_gpt_forward_stage(mt_gpt *m, int slot, const int32_t *inputs, const float *x_in,
                         const int32_t *targets, uint64_t sample0);
int mt_gpt_backward_stage(mt_gpt *m, int slot, const float *dout, float loss_scale);
const float *mt_gpt_stage_output(const mt_gpt *m, int slot);
const float *mt_gpt_stage_input_grad(const mt_gpt *m);
/* The last stage's logits of slot's last forward, on the device: (B, T,
 * padded_vocab / tp) floats, this rank's vocabulary rows (all of them at
 * tp 1); a backward turns them into their gradient. NULL on other stages. */
const float *mt_gpt_logits(const mt_gpt *m, int slot);
/* The stage output as it travels to the next stage (*bytes of it, on the
 * device): in a bf16 or fp16 job its 16 bits, which lose nothing since the
 * stream is rounded at every block's output but the model's last; fp32
 * otherwise (mt_gpt_stage_output itself). mt_gpt_wire_bytes: that size. */
const void *mt_gpt_stage_output_wire(const mt_gpt *m, int slot, size_t *bytes);
size_t mt_gpt_wire_bytes(const mt_gpt *m);
/* Rows of the (B T, C) residual stream this rank holds: B T, or with
 * sequence parallelism B T / tp (its rows from tp_rank times that). Stage
 * outputs, inputs and their gradients are this many rows. */
size_t mt_gpt_stream_rows(const mt_gpt *m);
/* Decodes what the previous stage's mt_gpt_stage_output_wire sent (wire, on
 * the device) straight into slot's stage input and returns it: the x_in to
 * give mt_gpt_forward_stage for that slot, which then copies nothing; NULL
 * on failure. */
const float *mt_gpt_stage_input_from_wire(mt_gpt *m, int slot, const void *wire);

/* Inference with a key-value cache: the forward of one more position.
 * Slot 0's row 0 holds positions [0, pos) of a sequence, from a forward
 * whose row 0 began with them (training off) or from earlier calls: every
 * layer's q, k and v and the stream there. This runs position pos (< T)
 * for `token`: each layer's one new row, its attention over positions
 * 0..pos (ops->attention_decode), keeping its k and v for the next call,
 * and the LM head of that row, whose logits land at row 0's position pos
 * of mt_gpt_logits (padded_vocab floats). A forward does the work of T
 * positions, so a token costs 1/T of one, and the logits are
 * attention_fwd's up to fp32 rounding. The whole model on one device (no
 * tp or pp), fp32, without recomputation. */
int mt_gpt_decode(mt_gpt *m, int pos, int32_t token);

/* The parameter table a config gives (its stage only), without allocating
 * anything else; free *table. */
int mt_gpt_table(const mt_gpt_config *cfg, mt_param **table, int *n, size_t *num_params);

void mt_gpt_zero_grad(mt_gpt *m);

/* FLOPs of one forward+backward over a (B,T) micro-batch, counting matrix
 * multiplies (2 per multiply-add) including attention scores and the LM head.
 * Recomputation is not counted (model FLOPs, as MFU is defined). */
double mt_gpt_flops_per_step(const mt_gpt_config *cfg, int B, int T);

/* Pointer to tensor i's master values / gradients. */
static inline float *mt_gpt_param(const mt_gpt *m, int i) {
  return m->params + m->params_table[i].offset;
}
/* The working copy of tensor i the forward reads: a matrix in m->wtype
 * (mt_gpt_is_matrix), any other tensor as floats. */
int mt_gpt_is_matrix(const mt_gpt *m, int i);
const void *mt_gpt_matrix(const mt_gpt *m, int i);
const float *mt_gpt_weight(const mt_gpt *m, int i);
static inline float *mt_gpt_grad(const mt_gpt *m, int i) {
  return m->grads + m->params_table[i].offset;
}

#endif
