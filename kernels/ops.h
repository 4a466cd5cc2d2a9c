/* ops.h — the forward and backward ops of a GPT, on one device.
 *
 * Conventions every backend keeps:
 * - Tensors are fp32, contiguous, row-major, in the device's memory. N = B*T
 *   rows of activations; C channels; OC output channels; NH heads; Vp padded
 *   vocabulary of which the first V entries are real tokens.
 * - The matrices a GEMM or a lookup reads (linear layers' w, the embedding
 *   wte: const void *, with an mt_dtype) are fp32 or a 16-bit job's working
 *   copy in bf16 or binary16; what an op computes with them is the float
 *   each one holds, so a 16-bit copy gives the bits of an fp32 one holding
 *   the same rounded values (on the CPU; on GPUs within the GEMMs' own
 *   rounding). Vectors (biases, LayerNorm's w and b) and wpe are fp32: they
 *   are a tiny part of a model, and the row kernels that read them stay one
 *   code path. Gradients and Adam's tensors are always fp32.
 * - A 16-bit job's activations are 16-bit tensors too, as autocast makes
 *   them: layernorm_fwd, gelu_fwd and the forward linear ops can write
 *   their output as bf16 or binary16 (`ot`: each value rounded to nearest
 *   even from the float the fp32 op would write); the linear ops take their
 *   activation input `inp` as fp32 or in the weights' 16-bit type (`it`),
 *   GeLU and its gradient their input as fp32 or 16-bit, reading the float
 *   each element holds; attention takes qkv and writes its output as the
 *   job keeps them (`qt`). The residual stream, LayerNorm's input, the
 *   logits and every gradient stay fp32 but the MLP's inner one
 *   (linear_bwd_dgelu's dpre), which a 16-bit job keeps in 16 bits.
 * - Weights of a linear layer are (OC, C): out = inp · wᵀ + bias (Megatron's
 *   and torch.nn.Linear's layout; Hugging Face's Conv1D is converted on I/O).
 * - Backward ops ACCUMULATE (+=) into every gradient they produce: the caller
 *   zeroes gradients once per step; residual branches sum for free. Two
 *   exceptions WRITE one output: crossentropy's dlogits and
 *   linear_bwd_dgelu's dpre (see there).
 * - Any pointer documented "may be NULL" skips that output.
 * - Ops know nothing of parallelism and cannot fail on valid shapes; shapes
 *   are the caller's contract (checked once, by the model's plan).
 */
#ifndef MT_OPS_H
#define MT_OPS_H

#include <stddef.h>
#include <stdint.h>

#include "device.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Dropout mask source. Deterministic per DESIGN: the mask of element e of
 * global sample s is drawn from Philox(key, s, e), so it depends on neither
 * the batch split nor the backend. p == 0 (or a NULL pointer) means none. */
typedef struct mt_dropout {
  float p;          /* drop probability in [0, 1) */
  uint64_t key;     /* from (seed, layer, site): mt_philox_key() */
  uint64_t sample0; /* global sample index of batch row 0 */
  uint32_t head0;   /* attention: global index of local head 0 (tensor parallelism) */
  uint64_t elem0;   /* row ops: index in its sample of each row's element 0 (a piece of
                       a sample, as sequence parallelism gives a rank); 0: whole samples */
} mt_dropout;

/* A cross-entropy target that is no token: the row is left out of the loss
 * (loss 0, gradient 0). Any negative target is; this is the one callers
 * write. */
#define MT_TARGET_IGNORE (-1)

/* How a weight tensor is stored. */
typedef enum mt_dtype { MT_F32 = 0, MT_BF16 = 1, MT_F16 = 2 } mt_dtype;

/* The largest head size GPUs' flash kernels take a 16-bit qkv's attention
 * at (they pad it to 64, 128, 160 or 256 columns); wider heads take the
 * chunked 16-bit GEMMs (mt_att16_chunk). */
#define MT_FLASH_MAX_HS 256

/* Samples a GPU's flash backward takes in one launch: their row sums (NH·T
 * floats a sample) share the scratch attention_scratch asks for, which holds
 * this many. Up to 8, so a launch's grid spans several samples' triangular
 * (key tile, head) work, not one sample's few waves; fewer where 8 samples'
 * rows would pass 16M floats (64 MiB). */
static inline int mt_flash_bwd_samples(int T, int NH) {
  long long per = (long long)T * NH, n = per > 0 ? (16LL << 20) / per : 1;
  return n < 1 ? 1 : n > 8 ? 8 : (int)n;
}

/* A GPU's other way with a 16-bit qkv: chunked GEMMs, as the fp32 one
 * (kernels/cuda/attention_cuda.cu), over chunks of `*heads` heads and
 * `*rows` query rows of one sample. Rows up to max_rows, heads as many as
 * fit `budget` floats of the chunk's three score-sized tensors (fp32
 * scores, fp32 gradient of the probabilities, and the 16-bit probabilities
 * and scores' gradient), at least one; returns the floats of scratch the
 * chunks take: those tensors, dout rounded to 16 bits, and fp32 sums of dK
 * and dV for the chunk's heads, each region rounded up to 64 floats. GPUs
 * ask MT_GPU_ATT_ROWS and MT_GPU_ATT_FLOATS (an fp32 qkv's chunks too) and
 * keep this scratch of their own, made when the path first runs (not in
 * attention_scratch); mtnlgctl plan counts it where a job may take the
 * path (engine/plan.c). */
#define MT_GPU_ATT_ROWS 512            /* a GPU's chunks of query rows, at most */
#define MT_GPU_ATT_FLOATS (64LL << 20) /* and the scratch floats they aim at: 256 MiB */
static inline long long mt_att16_chunk(int T, int NH, int HS, int max_rows, long long budget,
                                       int *rows, int *heads) {
  long long r = T < max_rows ? T : max_rows, h;
  if (r > 0 && 3 * r * T > budget) r = budget / (3LL * T);
  if (r < 1) r = 1;
  h = budget / (3 * r * (T > 0 ? T : 1));
  h = h < 1 ? 1 : h > NH ? NH : h;
  *rows = (int)r, *heads = (int)h;
#define MT_ATT16_UP(n) (((n) + 63) / 64 * 64)
  return 2 * MT_ATT16_UP(h * r * T) + 2 * MT_ATT16_UP((h * r * T + 1) / 2) +
         MT_ATT16_UP((h * r * HS + 1) / 2) + 2 * MT_ATT16_UP(h * T * HS);
#undef MT_ATT16_UP
}

/* One tensor, or slice of one, for a multi-tensor AdamW step. */
typedef struct mt_adamw_slice {
  float *param;
  const float *grad;
  float *m, *v; /* Adam moments, laid out like param */
  size_t n;
  float wd; /* weight decay of this tensor (0 for biases and LayerNorm) */
} mt_adamw_slice;

/* n contiguous floats, one of the spans of a multi-span sumsq. */
typedef struct mt_sumsq_span {
  const float *x;
  size_t n;
} mt_sumsq_span;

struct mt_ops {
  const char *name;

  /* out(B,T,C) = wte[tokens[b,t]] + wpe[t] */
  void (*embedding_fwd)(mt_device *d, float *out, const int32_t *tokens, const void *wte,
                        mt_dtype wt, const float *wpe, int B, int T, int C);
  /* dwte(Vp,C) += scatter of dout by token; dwpe(T,C) += sum over b */
  void (*embedding_bwd)(mt_device *d, float *dwte, float *dwpe, const float *dout,
                        const int32_t *tokens, int B, int T, int C);

  /* out(N,C) = (inp - mean) * rstd * w + b, stored as ot; mean(N), rstd(N)
   * saved for backward */
  void (*layernorm_fwd)(mt_device *d, void *out, mt_dtype ot, float *mean, float *rstd,
                        const float *inp, const float *w, const float *b, int N, int C, float eps);
  void (*layernorm_bwd)(mt_device *d, float *dinp, float *dw, float *db, const float *dout,
                        const float *inp, const float *w, const float *mean, const float *rstd,
                        int N, int C);

  /* Bytes of conversion scratch (`cvt` below) the linear ops need on d for
   * a GEMM of (N, C, OC) with its input stored as it and its weights as wt;
   * 0 when both are MT_F32 (cvt may then be NULL). it is MT_F32 or wt.
   * Bounded on GPUs, which convert in blocks of rows. One scratch of the
   * largest size serves every linear op; contents undefined. The CPU
   * unpacks 16-bit weights and inputs to fp32 for sgemm, and sums a 16-bit
   * output in fp32 before rounding it (room it keeps whenever it is
   * 16-bit, the case in which ot may be); GPUs write a 16-bit output from
   * the GEMM's epilogue, and multiply
   * 16-bit operands natively where both are, and convert (the fp32 output
   * gradient to the weights' type, or bf16 weights to fp32 under a
   * non-bf16 matmul mode) in blocks where they are not. */
  size_t (*linear_scratch)(mt_device *d, int N, int C, int OC, mt_dtype it, mt_dtype wt);

  /* out(N,OC) = inp(N,C) · w(OC,C)ᵀ + bias(OC), stored as ot; bias may be
   * NULL. ot is MT_F32, or, for a 16-bit input (it == wt), wt: the sums
   * are fp32 and rounded once, as a 16-bit GEMM's epilogue writes them.
   * The bias is stored as ot too (cuBLASLt's rule: a vector of D's type;
   * a 16-bit job's working copy, whose values its fp32 vectors hold). */
  void (*linear_fwd)(mt_device *d, void *out, mt_dtype ot, const void *inp, mt_dtype it,
                     const void *w, mt_dtype wt, const void *bias, void *cvt, int N, int C, int OC);
  /* dinp(N,C) += dout·w; dw(OC,C) += doutᵀ·inp; dbias(OC) += Σ_rows dout.
   * dinp and dbias may be NULL. dout is stored as dt: MT_F32, or, for a
   * 16-bit input (it == wt), wt, the gradient linear_bwd_dgelu writes in
   * 16 bits (what an fp32 dout holding the same values gives: the bits on
   * the CPU; on GPUs, where every operand is then 16-bit, one GEMM each for
   * dinp and dw of the operands as stored, cvt unused). */
  void (*linear_bwd)(mt_device *d, float *dinp, float *dw, float *dbias, const void *dout,
                     mt_dtype dt, const void *inp, mt_dtype it, const void *w, mt_dtype wt,
                     void *cvt, int N, int C, int OC);
  /* out(N,OC) = gelu(pre) and pre(N,OC) = inp·wᵀ + bias, the input gelu_bwd
   * takes, both stored as ot (and the bias, as for linear_fwd): linear_fwd
   * into pre then gelu_fwd of pre into out, on the CPU exactly that. On
   * GPUs one GEMM with cuBLASLt's GeLU epilogue (GELU_AUX_BIAS, its own
   * tanh of the unrounded sum: not gelu_fwd's bits) where cuBLASLt takes
   * the shape, else those two ops. bias may be NULL. */
  void (*linear_gelu_fwd)(mt_device *d, void *out, void *pre, mt_dtype ot, const void *inp,
                          mt_dtype it, const void *w, mt_dtype wt, const void *bias, void *cvt,
                          int N, int C, int OC);
  /* linear_bwd of the layer after linear_gelu_fwd, its dinp taken through
   * GeLU's gradient: dpre(N,C) = gelu'(pre) ⊙ (dout·w) is WRITTEN, not
   * accumulated (cuBLASLt documents no way to add to it); dw(OC,C) +=
   * doutᵀ·inp and dbias(OC) += Σ_rows dout as linear_bwd; dbias may be
   * NULL. pre(N,C) is the GeLU's input that linear_gelu_fwd saved, stored
   * as it like inp = gelu(pre). dpre is stored as pt: MT_F32, or for a
   * 16-bit input it (= wt), each value rounded once from the float an fp32
   * dpre gets, as autocast's backward keeps a 16-bit activation's gradient
   * in 16 bits (the next linear_bwd takes it as its dout). scratch holds
   * N*C floats, contents undefined. On the CPU exactly linear_bwd into
   * zeroed scratch then gelu_bwd into zeroed floats (their bits), rounded
   * for a 16-bit dpre. On GPUs the dinp GEMM applies gelu' in its cuBLASLt
   * epilogue (DGELU, aux = pre: its own tanh, not gelu_bwd's bits) where
   * cuBLASLt takes the shape and pre is stored as dpre (its aux has D's
   * type), else those two ops. */
  void (*linear_bwd_dgelu)(mt_device *d, void *dpre, mt_dtype pt, float *scratch, float *dw,
                           float *dbias, const float *dout, const void *inp, mt_dtype it,
                           const void *pre, const void *w, mt_dtype wt, void *cvt, int N, int C,
                           int OC);

  /* Causal self-attention, memory-efficient: the probabilities are not
   * kept for the backward pass, which recomputes them from qkv and lse (as
   * flash attention does; the memory Megatron's selective recomputation
   * saves). qkv(B,T,3C) holds q, k, v each as (T, NH, HS), HS = C/NH,
   * stored as qt: fp32, or a 16-bit job's kept copy in bf16 or binary16
   * (read as the floats it holds); out(B,T,C) stored as qt (rounded to
   * nearest even from the fp32 result); lse(B,NH,T) receives each
   * row's log-sum-exp of its scaled scores s = q·k/sqrt(HS) over columns
   * 0..t, so that the probabilities are exp(s - lse). drop (may be NULL)
   * applies to the probabilities; the element index of its mask within a
   * sample is ((head0 + h)*T + t1)*T + t2, so a tensor-parallel shard of
   * the heads draws the same masks. scratch holds attention_scratch(d, T,
   * C, NH) floats, contents undefined; one scratch serves every layer.
   * The CPU computes in fp32 whatever qt is. GPUs compute an fp32 qkv in
   * their fp32 matmul mode; a 16-bit qkv (HS <= MT_FLASH_MAX_HS) by a fused flash
   * kernel on the tensor cores in qt's type, or by chunked GEMMs in qt's
   * type (mt_att16_chunk), whichever each shape's first call timed faster,
   * both of which round the (dropped) probabilities, dout and the scores'
   * gradient to it as well, as FlashAttention does, accumulating in fp32.
   * doc_start (B,T) int32 (may be NULL: plain causal) masks attention
   * across documents (Megatron's --reset-attention-mask): row t of sample
   * b sees columns doc_start[b,t]..t only, doc_start[b,t] in [0, t] and
   * never decreasing along t (the first position of the row's document,
   * mt_gpt_documents); lse and the dropout's element indices are as above,
   * over those columns. */
  void (*attention_fwd)(mt_device *d, void *out, float *lse, float *scratch, const void *qkv,
                        mt_dtype qt, int B, int T, int C, int NH, const mt_dropout *drop,
                        const int32_t *doc_start);
  /* dqkv(B,T,3C) stored as gt: fp32, += the gradient; or qkv's own 16-bit
   * type (GPUs refuse any other 16-bit gt, the CPU leaves dqkv as it was),
   * the gradient written, not accumulated, rounded to
   * nearest even from the fp32 sums (as a 16-bit job keeps it, and
   * autocast's attention backward returns it). lse as attention_fwd left
   * it; out(B,T,C) the forward's output as it stored it, read only by the
   * flash kernel (rowsum(dout ∘ out), FlashAttention's D); scratch as
   * there; doc_start as the forward was given it */
  void (*attention_bwd)(mt_device *d, void *dqkv, mt_dtype gt, float *scratch, const float *dout,
                        const void *out, const void *qkv, mt_dtype qt, const float *lse, int B,
                        int T, int C, int NH, const mt_dropout *drop, const int32_t *doc_start);
  /* Floats of scratch the attention pair needs on d for (T, C, NH) and qkv
   * stored as qt, any B: blocks of query rows (and, on GPUs, of heads) with
   * their scores and probabilities, far below one sample's NH·T² when T is
   * large; on the CPU, per thread, and for a 16-bit qkv with its head
   * unpacked, its output before rounding and its gradient before rounding
   * (for a 16-bit dqkv); on GPUs, for a 16-bit qkv, the flash backward's D
   * (NH·T a sample) of mt_flash_bwd_samples samples (the chunked GEMMs'
   * tensors, mt_att16_chunk, are the device's own, made if that path
   * runs). */
  size_t (*attention_scratch)(mt_device *d, int T, int C, int NH, mt_dtype qt);
  /* Attention for one new position (inference with a key-value cache):
   * out(C) = attention_fwd's output row n - 1 of an fp32 qkv(n,3C) (laid
   * out as there, one sample), computed from that row's q and the n rows'
   * k and v only: each head's softmax(q·kᵀ/sqrt(HS)) · v, no dropout. The
   * other rows' outputs are not computed (O(n) work, not O(n²)). */
  void (*attention_decode)(mt_device *d, float *out, const float *qkv, int n, int C, int NH);

  /* GeLU, tanh approximation (GPT-2's). n elements; inp stored as it, out
   * as ot. */
  void (*gelu_fwd)(mt_device *d, void *out, mt_dtype ot, const void *inp, mt_dtype it, size_t n);
  /* dinp += gelu'(inp) ⊙ dout, inp stored as it */
  void (*gelu_bwd)(mt_device *d, float *dinp, const void *inp, mt_dtype it, const float *dout,
                   size_t n);

  /* out = a + b (residual add); out may alias a or b. Its backward is two
   * accumulations, which callers express with add_inplace. */
  void (*residual_fwd)(mt_device *d, float *out, const float *a, const float *b, size_t n);
  /* dst += src */
  void (*add_inplace)(mt_device *d, float *dst, const float *src, size_t n);

  /* Dropout on (B, per_sample) rows: out = inp * keep / (1 - p). out may alias inp. */
  void (*dropout_fwd)(mt_device *d, float *out, const float *inp, int B, size_t per_sample,
                      const mt_dropout *drop);
  /* out = resid + dropout(branch), same masks as dropout_fwd: a branch
   * joining the residual stream after its last GEMM, whose bias the GEMM's
   * epilogue added (Megatron's fused bias-dropout-add), in one pass. drop
   * NULL: resid + branch. out may alias resid; branch is left as it was.
   * ht MT_BF16 or MT_F16 (a 16-bit job's stream): the sum is rounded to ht
   * in the same pass, out holds the rounded values and out_h, unless NULL,
   * their 16 bits: what pack_half (round_half without out_h) makes of the
   * MT_F32 op's out, without a pass of its own. */
  void (*dropout_residual_fwd)(mt_device *d, float *out, uint16_t *out_h, mt_dtype ht,
                               const float *resid, const float *branch, int B, size_t per_sample,
                               const mt_dropout *drop);
  /* dinp += dout * keep / (1 - p), same mask as the forward */
  void (*dropout_bwd)(mt_device *d, float *dinp, const float *dout, int B, size_t per_sample,
                      const mt_dropout *drop);

  /* Softmax cross-entropy over the first V of Vp logits (padded columns are
   * not part of the softmax). losses(N) = -log softmax(logits)[target].
   * If dlogits is non-NULL it is WRITTEN (not accumulated) with
   * dloss * (softmax - onehot), zero in padded columns; dlogits may alias
   * logits. dloss is d(total loss)/d(loss of one token). losses may be NULL.
   * A row whose target is MT_TARGET_IGNORE (any negative id) is masked out:
   * its loss is 0 and its dlogits row all 0 (the caller normalises by the
   * rows it did not mask). */
  void (*crossentropy)(mt_device *d, float *losses, float *dlogits, const float *logits,
                       const int32_t *targets, float dloss, int N, int V, int Vp);

  /* Vocabulary-parallel pieces (tensor parallelism; the shard holds columns
   * / rows [v0, v0 + Vl) of the padded vocabulary, the first `real` of them
   * real tokens, real = clamp(V - v0, 0, Vl)).
   * out(B,T,C) = wte_shard[tok - v0] for tokens in the shard, else 0. */
  void (*embedding_shard_fwd)(mt_device *d, float *out, const int32_t *tokens, const void *wte,
                              mt_dtype wt, int v0, int Vl, int N, int C);
  /* dwte_shard += scatter of dout by the tokens in the shard */
  void (*embedding_shard_bwd)(mt_device *d, float *dwte, const float *dout, const int32_t *tokens,
                              int v0, int Vl, int N, int C);
  /* rowmax(N) = max over the shard's real columns (-FLT_MAX when none) */
  void (*crossentropy_shard_max)(mt_device *d, float *rowmax, const float *logits, int N, int real,
                                 int Vl);
  /* rowsum(N) = Σ exp(x - gmax) over the shard's real columns; xt(N) = the
   * target's logit when the target is in the shard, else 0 (and 0 for an
   * ignored target: the caller leaves that row out of the loss) */
  void (*crossentropy_shard_sum)(mt_device *d, float *rowsum, float *xt, const float *logits,
                                 const int32_t *targets, const float *gmax, int N, int real, int Vl,
                                 int v0);
  /* dlogits (may alias logits) = dloss * (exp(x - gmax) / gsum - onehot), 0 in
   * padded columns and in the whole row of an ignored target; WRITTEN, not
   * accumulated */
  void (*crossentropy_shard_grad)(mt_device *d, float *dlogits, const float *logits,
                                  const int32_t *targets, const float *gmax, const float *gsum,
                                  float dloss, int N, int real, int Vl, int v0);

  /* AdamW on n contiguous parameters, step t >= 1, bias-corrected moments,
   * decoupled weight decay: p -= lr * (mhat / (sqrt(vhat) + eps) + wd * p).
   * grad is multiplied by grad_scale first (clipping, loss-scale undo). */
  void (*adamw)(mt_device *d, float *param, const float *grad, float *m, float *v, size_t n,
                float lr, float beta1, float beta2, float eps, float wd, float grad_scale, int t);

  /* adamw on each of count slices, in few launches on a GPU (one per few
   * dozen slices); the same result as calling adamw slice by slice. */
  void (*adamw_multi)(mt_device *d, const mt_adamw_slice *s, int count, float lr, float beta1,
                      float beta2, float eps, float grad_scale, int t);

  /* Σ x², accumulated in double. */
  double (*sumsq)(mt_device *d, const float *x, size_t n);
  /* Σ x² over every one of count spans (empty ones too, whose x is never
   * read), accumulated in double in a fixed order, so the result does not
   * depend on the thread count or on timing: on the CPU the sum, in span
   * order, of sumsq over each span (the same bits); on a GPU few launches
   * (a pack of up to a hundred-odd spans each) and one read-back, where
   * sumsq span by span reads back each. NaN when the device failed. */
  double (*sumsq_multi)(mt_device *d, const mt_sumsq_span *s, int count);
  /* x *= s */
  void (*scale)(mt_device *d, float *x, float s, size_t n);

  /* Mixed precision. dst[i] = src[i] rounded to nearest even into bf16
   * (fp16 != 0: binary16), kept as a float (mt_round_half); dst may alias
   * src. The working copy of the weights the forward reads. */
  void (*round_half)(mt_device *d, float *dst, const float *src, size_t n, int fp16);
  /* dst[i] = the bits of src[i] rounded to nearest even into bf16 (fp16 !=
   * 0: binary16); src is left as it is. A 16-bit working copy of the
   * weights from the fp32 master. */
  void (*to_half)(mt_device *d, uint16_t *dst, const float *src, size_t n, int fp16);
  /* The 16-bit storage of a kept activation: dst[i] = the bits of src[i]
   * rounded to nearest even into bf16 (fp16 != 0: binary16), and src[i]
   * replaced by that value as a float, so that the forward computes on with
   * what the backward will unpack. */
  void (*pack_half)(mt_device *d, uint16_t *dst, float *src, size_t n, int fp16);
  /* dst[i] = the float src[i] holds (bf16, or binary16 when fp16 != 0) */
  void (*unpack_half)(mt_device *d, float *dst, const uint16_t *src, size_t n, int fp16);
  /* 1 when every x[i] stays finite in fp16 (no NaN, inf or |x| >= 65520:
   * mt_fp16_overflows), else 0: the loss scaler's overflow test. */
  int (*fits_fp16)(mt_device *d, const float *x, size_t n);

  /* The elements equal to zero (+0 or -0; NaN is not) over every one of
   * count spans (empty ones too, whose x is never read): Megatron's
   * count_zeros_fp32 of the gradients, for train.log_num_zeros_in_grad. An
   * exact count whatever the thread count; on a GPU few launches and one
   * read-back. -1 when the device failed. */
  int64_t (*count_zeros)(mt_device *d, const mt_sumsq_span *s, int count);
};

/* The CPU backend's table (kernels/cpu). */
extern const mt_ops mt_cpu_ops;
/* The CUDA backend's table (kernels/cuda; only in builds with CUDA). */
extern const mt_ops mt_cuda_ops;

#ifdef __cplusplus
}
#endif

#endif
