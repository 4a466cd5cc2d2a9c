/* attention_cuda.cu — causal self-attention on the GPU, memory-efficient:
 * batched cuBLASLt GEMMs over chunks of (sample, heads, query rows) around
 * fused row kernels for the causal softmax, its backward and the dropout of
 * the probabilities. Only each row's log-sum-exp is kept (ops.h); the
 * backward recomputes a chunk's scores and probabilities from it.
 *
 * A chunk is heads h0..h0+hn-1 and query rows r0..r1-1 of one sample; its
 * rows need key columns 0..r1-1 only (causal), so chunking the rows also
 * skips most of the masked upper triangle. Chunk tensors in the scratch are
 * (hn, rn, r1) row-major: row (hh, i) is query t = r0 + i of head h0 + hh.
 * Head h of sample b is, in qkv, the (T, HS) view at column h·HS with row
 * stride 3C — a column-major (HS, T) matrix with ld 3C, which is how the
 * GEMMs below take it (shapes in comments are row-major).
 *
 * This is the attention of an fp32 qkv; a 16-bit one (a bf16 or fp16 job's)
 * goes to the fused kernels of flash_cuda.cu.
 */
#include <float.h>
#include <math.h>
#include <stdio.h>

#include "cuda_impl.h"
#include "mtmath.h"
#include "ops.h"
#include "reduce.cuh"

#define ATT_THREADS 256

/* Query rows per chunk: a quarter of T = 2048, which skips 3/8 of the score
 * and value GEMMs' work against whole T×T blocks. The emulator test shrinks
 * both this and the budget to reach every chunking path. */
#ifndef MT_CUDA_ATT_ROWS
#define MT_CUDA_ATT_ROWS 512
#endif
/* Scratch floats a chunk aims at (two chunk tensors): 256 MiB. */
#ifndef MT_CUDA_ATT_FLOATS
#define MT_CUDA_ATT_FLOATS ((size_t)64 << 20)
#endif

/* At most this many samples a flash backward launch (mt_flash_bwd_samples);
 * the emulator test lowers it to reach the loop over groups of samples. */
#ifndef MT_CUDA_FLASH_SAMPLES
#define MT_CUDA_FLASH_SAMPLES 8
#endif

/* The chunk shape for (T, NH): rows rc, heads hc, as many heads as fit the
 * budget once rc rows of one head do, and at most 65535 rows in all (a grid
 * dimension of k_att_dropout). */
static void att_chunk(int T, int NH, int *rc, int *hc) {
  size_t budget = MT_CUDA_ATT_FLOATS;
  int r = T < MT_CUDA_ATT_ROWS ? T : MT_CUDA_ATT_ROWS;
  if (2 * (size_t)r * T > budget) r = (int)(budget / (2 * (size_t)T));
  if (r < 1) r = 1;
  size_t h = budget / (2 * (size_t)r * T);
  if (h > 65535 / (size_t)r) h = 65535 / (size_t)r;
  *rc = r;
  *hc = h < 1 ? 1 : h > (size_t)NH ? NH : (int)h;
}

/* An fp32 qkv's chunks, two tensors; a 16-bit one's flash backward
 * (flash_cuda.cu) one sample's rows, as many samples at a time as fit. */
size_t mt__cuda_attention_scratch(mt_device *d, int T, int C, int NH, mt_dtype qt) {
  (void)d, (void)C;
  int rc, hc;
  if (T < 1 || NH < 1) return 1;
  if (qt != MT_F32) {
    int n = mt_flash_bwd_samples(T, NH);
    return (size_t)(n < MT_CUDA_FLASH_SAMPLES ? n : MT_CUDA_FLASH_SAMPLES) * NH * T;
  }
  att_chunk(T, NH, &rc, &hc);
  return 2 * (size_t)hc * rc * T;
}

/* Row (hh, i) of a chunk: the softmax over columns s0..t of the scaled
 * scores in place, zero before s0 and beyond to r1, and lse of (head h0 +
 * hh, row t) — lse_b is the sample's (NH, T), ds_b its document starts
 * (NULL: s0 = 0). The CPU backend's three passes. Zero probabilities stay
 * zero through the dropout and the softmax backward, so only this kernel
 * and k_att_probs see the documents. */
static __global__ void k_att_softmax(float *P, float *lse_b, int T, int h0, int r0, int rn, int r1,
                                     const int32_t *ds_b) {
  int row = blockIdx.x, hh = row / rn, t = r0 + row % rn, s0 = ds_b ? ds_b[t] : 0;
  float *r = P + (size_t)row * r1;
  float mx = -FLT_MAX;
  for (int j = s0 + threadIdx.x; j <= t; j += blockDim.x) mx = r[j] > mx ? r[j] : mx;
  mx = mt__block_max(mx);
  float s = 0.0f;
  for (int j = s0 + threadIdx.x; j <= t; j += blockDim.x) {
    float e = expf(r[j] - mx);
    r[j] = e;
    s += e;
  }
  float sum = mt__block_sum(s), inv = 1.0f / sum;
  for (int j = s0 + threadIdx.x; j <= t; j += blockDim.x) r[j] *= inv;
  for (int j = threadIdx.x; j < s0; j += blockDim.x) r[j] = 0.0f;
  for (int j = t + 1 + threadIdx.x; j < r1; j += blockDim.x) r[j] = 0.0f;
  if (threadIdx.x == 0) lse_b[(size_t)(h0 + hh) * T + t] = mx + logf(sum);
}

/* Row (hh, i) of a chunk in the backward pass: the probabilities again,
 * exp(s - lse) on columns s0..t of the scaled scores, zero before s0 and
 * beyond to r1. */
static __global__ void k_att_probs(float *P, const float *lse_b, int T, int h0, int r0, int rn,
                                   int r1, const int32_t *ds_b) {
  int row = blockIdx.x, hh = row / rn, t = r0 + row % rn, s0 = ds_b ? ds_b[t] : 0;
  float *r = P + (size_t)row * r1;
  float l = lse_b[(size_t)(h0 + hh) * T + t];
  for (int j = s0 + threadIdx.x; j <= t; j += blockDim.x) r[j] = expf(r[j] - l);
  for (int j = threadIdx.x; j < s0; j += blockDim.x) r[j] = 0.0f;
  for (int j = t + 1 + threadIdx.x; j < r1; j += blockDim.x) r[j] = 0.0f;
}

/* A chunk's dropped probabilities: dst = P · keep, zero past the diagonal;
 * keep of element ((head0 + h)·T + t)·T + j of the sample (ops.h). Grid
 * (column blocks, chunk rows). */
static __global__ void k_att_dropout(float *dst, const float *P, int T, int h0, int r0, int rn,
                                     int r1, float p, uint64_t key, uint64_t sample,
                                     uint32_t head0) {
  int row = blockIdx.y, hh = row / rn, t = r0 + row % rn;
  const float *src = P + (size_t)row * r1;
  float *o = dst + (size_t)row * r1;
  uint64_t e0 = ((uint64_t)(head0 + h0 + hh) * T + t) * T;
  for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < r1; j += gridDim.x * blockDim.x)
    o[j] = j <= t ? src[j] * mt_dropout_scale(p, key, sample, e0 + j) : 0.0f;
}

/* Softmax backward of a chunk row, in place in S: on entry S = dout·Vᵀ;
 * G = S ∘ Pd (Pd the dropped probabilities, P without dropout); leaves
 * dS = (G - P·ΣG)·scale on columns 0..t and zero beyond to r1. */
static __global__ void k_att_softmax_bwd(float *S, const float *P, int T, int h0, int r0, int rn,
                                         int r1, float scale, int drop, float p, uint64_t key,
                                         uint64_t sample, uint32_t head0) {
  int row = blockIdx.x, hh = row / rn, t = r0 + row % rn;
  uint64_t e0 = ((uint64_t)(head0 + h0 + hh) * T + t) * T;
  float *s = S + (size_t)row * r1;
  const float *a = P + (size_t)row * r1;
  float acc = 0.0f;
  for (int j = threadIdx.x; j <= t; j += blockDim.x) {
    float pd = drop ? a[j] * mt_dropout_scale(p, key, sample, e0 + j) : a[j];
    float g = s[j] * pd;
    s[j] = g;
    acc += g;
  }
  float rs = mt__block_sum(acc);
  for (int j = threadIdx.x; j <= t; j += blockDim.x) s[j] = (s[j] - a[j] * rs) * scale;
  for (int j = t + 1 + threadIdx.x; j < r1; j += blockDim.x) s[j] = 0.0f;
}

static unsigned col_blocks(int cols) { return (unsigned)((cols + ATT_THREADS - 1) / ATT_THREADS); }

/* Chunk i of B samples × ceil(NH / hc) head groups × ceil(T / rc) row
 * blocks, in that order: where it sits and what its GEMMs read. */
typedef struct chunk {
  int b, h0, hn, r0, rn, r1;
  const float *q, *k, *v; /* sample b, head h0: Q from row r0, K and V from row 0 */
  long long sP;           /* elements between heads of a chunk tensor: rn·r1 */
} chunk;

static int chunk_count(int B, int T, int NH, int rc, int hc) {
  return B * ((NH + hc - 1) / hc) * ((T + rc - 1) / rc);
}

static chunk chunk_of(int i, const float *qkv, int T, int C, int NH, int rc, int hc) {
  int nr = (T + rc - 1) / rc, nh = (NH + hc - 1) / hc, HS = C / NH, ld3 = 3 * C;
  chunk k;
  k.b = i / (nr * nh);
  k.h0 = i / nr % nh * hc;
  k.r0 = i % nr * rc;
  k.hn = NH - k.h0 < hc ? NH - k.h0 : hc;
  k.rn = T - k.r0 < rc ? T - k.r0 : rc;
  k.r1 = k.r0 + k.rn;
  const float *head = qkv + (size_t)k.b * T * ld3 + (size_t)k.h0 * HS;
  k.q = head + (size_t)k.r0 * ld3;
  k.k = head + C;
  k.v = head + 2 * C;
  k.sP = (long long)k.rn * k.r1;
  return k;
}

/* P(hn, rn, r1) = scale · Q[r0:r1] · K[0:r1]ᵀ per head; column-major Pᵀ =
 * K·Qᵀ: A = K (HS, r1) transposed, B = Q (HS, rn). */
static void chunk_scores(mt_device *d, const char *what, float *P, const chunk *k, int C, int HS) {
  int ld3 = 3 * C;
  mt__gemm g = {1,    0,    k->r1, k->rn, HS, k->hn, k->k,  ld3,
                HS,   k->q, ld3,   HS,    P,  k->r1, k->sP, 1.0f / sqrtf((float)HS),
                0.0f, NULL};
  mt__cuda_gemm(d, what, &g);
}

static void chunk_dropout(mt_device *d, float *dst, const float *P, const chunk *k, int T,
                          const mt_dropout *drop, uint64_t sample) {
  mt__cuda *c = mt__cuda_enter(d);
  MT_LAUNCH(k_att_dropout, dim3(col_blocks(k->r1), (unsigned)(k->hn * k->rn)), ATT_THREADS,
            c->stream)
  (dst, P, T, k->h0, k->r0, k->rn, k->r1, drop->p, drop->key, sample, drop->head0);
  mt__cuda_check(d, "attention dropout");
}

void mt__cuda_attention_fwd(mt_device *d, void *out_, float *lse, float *scratch, const void *qkv_,
                            mt_dtype qt, int B, int T, int C, int NH, const mt_dropout *drop,
                            const int32_t *doc_start) {
  if (qt != MT_F32) {
    mt__cuda_flash_fwd(d, (uint16_t *)out_, lse, (const uint16_t *)qkv_, qt, B, T, C, NH, drop,
                       doc_start);
    return;
  }
  float *out = (float *)out_;
  const float *qkv = (const float *)qkv_;
  if (drop && drop->p == 0.0f) drop = NULL;
  if (B < 1 || T < 1 || C < 1 || NH < 1) return;
  mt__cuda *c = mt__cuda_enter(d);
  int HS = C / NH, rc, hc;
  att_chunk(T, NH, &rc, &hc);
  float *P = scratch, *Pd = scratch + (size_t)hc * rc * T;
  for (int i = 0, n = chunk_count(B, T, NH, rc, hc); i < n; i++) {
    chunk k = chunk_of(i, qkv, T, C, NH, rc, hc);
    chunk_scores(d, "attention_fwd scores", P, &k, C, HS);
    MT_LAUNCH(k_att_softmax, (unsigned)(k.hn * k.rn), ATT_THREADS, c->stream)
    (P, lse + (size_t)k.b * NH * T, T, k.h0, k.r0, k.rn, k.r1,
     doc_start ? doc_start + (size_t)k.b * T : NULL);
    mt__cuda_check(d, "attention_fwd softmax");
    const float *pv = P;
    if (drop) {
      chunk_dropout(d, Pd, P, &k, T, drop, drop->sample0 + (uint64_t)k.b);
      pv = Pd;
    }
    // out rows r0..r1 = Pd(rn, r1) · V[0:r1]; column-major (HS, rn) = V(HS, r1) · Pdᵀ(r1, rn)
    float *o = out + ((size_t)k.b * T + k.r0) * C + (size_t)k.h0 * HS;
    mt__gemm g = {0,  0,    HS,   k.rn, k.r1, k.hn, k.v,  3 * C, HS,
                  pv, k.r1, k.sP, o,    C,    HS,   1.0f, 0.0f,  NULL};
    mt__cuda_gemm(d, "attention_fwd out", &g);
  }
}

/* Per chunk: P recomputed; dV += Pdᵀ·dout; S = dout·Vᵀ; dS = softmax
 * backward of S; dQ += dS·K, dK += dSᵀ·Q (the scale folded into dS). The
 * chunk's P and S/dS (Pd before it) fill the scratch. */
void mt__cuda_attention_bwd(mt_device *d, void *dqkv_, mt_dtype gt, float *scratch,
                            const float *dout, const void *out, const void *qkv_, mt_dtype qt,
                            const float *lse, int B, int T, int C, int NH, const mt_dropout *drop,
                            const int32_t *doc_start) {
  if (qt != MT_F32) {
    mt__cuda_flash_bwd(d, dqkv_, gt, scratch, mt__cuda_attention_scratch(d, T, C, NH, qt), dout,
                       (const uint16_t *)out, (const uint16_t *)qkv_, qt, lse, B, T, C, NH, drop,
                       doc_start);
    return;
  }
  if (gt != MT_F32) {
    mt__cuda_fail(d, "attention_bwd",
                  "a 16-bit dqkv with an fp32 qkv (ops.h: fp32, or qkv's own type)");
    return;
  }
  const float *qkv = (const float *)qkv_;
  float *dqkv = (float *)dqkv_;
  if (drop && drop->p == 0.0f) drop = NULL;
  if (B < 1 || T < 1 || C < 1 || NH < 1) return;
  mt__cuda *c = mt__cuda_enter(d);
  int HS = C / NH, ld3 = 3 * C, rc, hc;
  att_chunk(T, NH, &rc, &hc);
  float scale = 1.0f / sqrtf((float)HS);
  float *P = scratch, *S = scratch + (size_t)hc * rc * T;
  for (int i = 0, n = chunk_count(B, T, NH, rc, hc); i < n; i++) {
    chunk k = chunk_of(i, qkv, T, C, NH, rc, hc);
    int hn = k.hn, rn = k.rn, r1 = k.r1;
    float *dq = dqkv + (size_t)k.b * T * ld3 + (size_t)k.h0 * HS; /* this head's row 0 */
    const float *g = dout + ((size_t)k.b * T + k.r0) * C + (size_t)k.h0 * HS;
    uint64_t sample = drop ? drop->sample0 + (uint64_t)k.b : 0;
    chunk_scores(d, "attention_bwd scores", P, &k, C, HS);
    MT_LAUNCH(k_att_probs, (unsigned)(hn * rn), ATT_THREADS, c->stream)
    (P, lse + (size_t)k.b * NH * T, T, k.h0, k.r0, rn, r1,
     doc_start ? doc_start + (size_t)k.b * T : NULL);
    mt__cuda_check(d, "attention_bwd probabilities");
    const float *pd = P;
    if (drop) {
      chunk_dropout(d, S, P, &k, T, drop, sample);
      pd = S;
    }
    // dV[0:r1] += Pdᵀ · dout[r0:r1]; column-major dVᵀ(HS, r1) += doutᵀ(HS, rn) · Pd(rn, r1)
    mt__gemm gv = {0,  1,  HS,   r1,         rn,  hn, g,    C,    HS,
                   pd, r1, k.sP, dq + 2 * C, ld3, HS, 1.0f, 1.0f, NULL};
    mt__cuda_gemm(d, "attention_bwd dv", &gv);
    // S(hn, rn, r1) = dout[r0:r1] · V[0:r1]ᵀ; column-major Sᵀ = V·doutᵀ
    mt__gemm gs = {1, 0, r1, rn, HS, hn, k.v, ld3, HS, g, C, HS, S, r1, k.sP, 1.0f, 0.0f, NULL};
    mt__cuda_gemm(d, "attention_bwd scores of dout", &gs);
    MT_LAUNCH(k_att_softmax_bwd, (unsigned)(hn * rn), ATT_THREADS, c->stream)
    (S, P, T, k.h0, k.r0, rn, r1, scale, drop != NULL, drop ? drop->p : 0.0f, drop ? drop->key : 0,
     sample, drop ? drop->head0 : 0);
    mt__cuda_check(d, "attention_bwd softmax");
    // dQ[r0:r1] += dS · K[0:r1]; column-major dQᵀ(HS, rn) += Kᵀ(HS, r1) · dSᵀ, dSᵀ = S's layout
    mt__gemm gq = {0,   0,  HS,   rn,   r1,  hn, k.k, ld3, HS, S, r1, k.sP, dq + (size_t)k.r0 * ld3,
                   ld3, HS, 1.0f, 1.0f, NULL};
    mt__cuda_gemm(d, "attention_bwd dq", &gq);
    // dK[0:r1] += dSᵀ · Q[r0:r1]; column-major dKᵀ(HS, r1) += Qᵀ(HS, rn) · dS(rn, r1)
    mt__gemm gk = {0, 1,  HS,   r1,     rn,  hn, k.q,  ld3,  HS,
                   S, r1, k.sP, dq + C, ld3, HS, 1.0f, 1.0f, NULL};
    mt__cuda_gemm(d, "attention_bwd dk", &gk);
  }
}

/* ---- attention of one new position ------------------------------------ */

/* Keys scored per pass of k_att_decode: their scores share the block's
 * shared memory with the head's output row. */
#define DECODE_TILE 1024

/* A block per head, sweeping the keys a tile at a time with the online
 * softmax (FlashAttention's; the CPU's, a tile at a time): each thread
 * scores keys r = tid, tid + blockDim, … of the tile into shared memory,
 * the block finds their maximum, rescales what it summed under the old
 * maximum, and each thread adds the tile's weighted values into the output
 * columns it owns (tid, tid + blockDim, …; kept in shared memory, as
 * HS varies). Shared memory is a tile's scores and one row, whatever n. */
static __global__ void k_att_decode(float *out, const float *qkv, int n, int C, int HS,
                                    float scale) {
  MT_DYN_SMEM(smem);
  float *sc = (float *)smem, *o = sc + DECODE_TILE;
  int h = blockIdx.x;
  const float *q = qkv + (size_t)(n - 1) * 3 * C + (size_t)h * HS;
  const float *v0 = qkv + 2 * (size_t)C + (size_t)h * HS;
  for (int i = threadIdx.x; i < HS; i += blockDim.x) o[i] = 0.0f;
  float m = -FLT_MAX, l = 0.0f;
  for (int t0 = 0; t0 < n; t0 += DECODE_TILE) {
    int tn = n - t0 < DECODE_TILE ? n - t0 : DECODE_TILE;
    float mx = -FLT_MAX;
    for (int r = threadIdx.x; r < tn; r += blockDim.x) {
      const float *k = qkv + (size_t)(t0 + r) * 3 * C + C + (size_t)h * HS;
      float s = 0.0f;
      for (int i = 0; i < HS; i++) s += q[i] * k[i];
      sc[r] = s * scale;
      mx = fmaxf(mx, sc[r]);
    }
    float m_new = fmaxf(m, mt__block_max(mx)), f = expf(m - m_new);
    float sum = 0.0f;
    for (int r = threadIdx.x; r < tn; r += blockDim.x) {
      sc[r] = expf(sc[r] - m_new);
      sum += sc[r];
    }
    l = l * f + mt__block_sum(sum); /* its barriers also make every sc[r] visible */
    m = m_new;
    for (int i = threadIdx.x; i < HS; i += blockDim.x) {
      const float *v = v0 + (size_t)t0 * 3 * C + i;
      float acc = 0.0f;
      for (int r = 0; r < tn; r++) acc += sc[r] * v[(size_t)r * 3 * C];
      o[i] = o[i] * f + acc;
    }
    __syncthreads(); /* every thread is done with sc before the next tile */
  }
  for (int i = threadIdx.x; i < HS; i += blockDim.x) out[(size_t)h * HS + i] = o[i] / l;
}

void mt__cuda_attention_decode(mt_device *d, float *out, const float *qkv, int n, int C, int NH) {
  if (n < 1 || C < 1 || NH < 1) return;
  mt__cuda *c = mt__cuda_enter(d);
  int HS = C / NH;
  MT_LAUNCH_SMEM(k_att_decode, (unsigned)NH, 128, (size_t)(DECODE_TILE + HS) * sizeof(float),
                 c->stream)
  (out, qkv, n, C, HS, 1.0f / sqrtf((float)HS));
  mt__cuda_check(d, "attention_decode");
}
