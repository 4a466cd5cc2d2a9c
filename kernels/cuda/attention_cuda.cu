/* attention_cuda.cu — causal self-attention on the GPU: batched cuBLASLt
 * GEMMs per sample (all heads of a sample in one strided-batch call) around
 * fused row kernels for the causal softmax, its backward and the dropout of
 * the probabilities.
 *
 * The op contract (ops.h) keeps the probabilities att(B,NH,T,T) for the
 * backward pass, so this is the materialising algorithm, not flash
 * attention; the GEMMs compute whole T×T blocks and the softmax zeroes the
 * upper triangle. Head h of sample b is, in qkv, the (T, HS) view at column
 * h·HS with row stride 3C — a column-major (HS, T) matrix with ld 3C, which
 * is how the GEMMs below take it (shapes in comments are row-major).
 */
#include <float.h>
#include <math.h>

#include "cuda_impl.h"
#include "mtmath.h"
#include "ops.h"
#include "reduce.cuh"

#define ATT_THREADS 256

/* Row (b,h,t) of att (rows = B·NH·T): softmax over columns 0..t, zero
 * beyond, in place on the scaled scores (the CPU backend's three passes). */
static __global__ void k_att_softmax(float *att, int T) {
  size_t row = blockIdx.x;
  int t = (int)(row % (size_t)T);
  float *r = att + row * T;
  float mx = -FLT_MAX;
  for (int j = threadIdx.x; j <= t; j += blockDim.x) mx = r[j] > mx ? r[j] : mx;
  mx = mt__block_max(mx);
  float s = 0.0f;
  for (int j = threadIdx.x; j <= t; j += blockDim.x) {
    float e = expf(r[j] - mx);
    r[j] = e;
    s += e;
  }
  float inv = 1.0f / mt__block_sum(s);
  for (int j = threadIdx.x; j <= t; j += blockDim.x) r[j] *= inv;
  for (int j = t + 1 + threadIdx.x; j < T; j += blockDim.x) r[j] = 0.0f;
}

/* The dropped probabilities of rows r0 .. r0+rc-1 of heads h0 .. h0+hc-1 of
 * one sample: dst(hc, rc, r1) = att_b[h0+hh, r0+i, j] · keep, zero past the
 * diagonal; keep of element ((head0 + h)·T + t)·T + j of the sample (ops.h).
 * Grid (column blocks, rc, hc). */
static __global__ void k_att_dropout(float *dst, const float *att_b, int T, int h0, int r0, int rc,
                                     int r1, float p, uint64_t key, uint64_t sample,
                                     uint32_t head0) {
  int hh = blockIdx.z, i = blockIdx.y, t = r0 + i, h = h0 + hh;
  const float *src = att_b + ((size_t)h * T + t) * T;
  float *o = dst + ((size_t)hh * rc + i) * r1;
  uint64_t e0 = ((uint64_t)(head0 + h) * T + t) * T;
  for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < r1; j += gridDim.x * blockDim.x)
    o[j] = j <= t ? src[j] * mt_dropout_scale(p, key, sample, e0 + j) : 0.0f;
}

/* Softmax backward of row (b,h,t), in place in S (rows as att): on entry S =
 * dout·Vᵀ; G = S ∘ Pd (Pd the dropped probabilities, P without dropout);
 * leaves dS = (G - P·ΣG)·scale on columns 0..t and zero beyond. */
static __global__ void k_att_softmax_bwd(float *S, const float *att, int T, int NH, float scale,
                                         int drop, float p, uint64_t key, uint64_t sample0,
                                         uint32_t head0) {
  size_t row = blockIdx.x, bh = row / (size_t)T;
  int t = (int)(row % (size_t)T), h = (int)(bh % (size_t)NH);
  uint64_t sample = sample0 + bh / (size_t)NH;
  uint64_t e0 = ((uint64_t)(head0 + h) * T + t) * T;
  float *s = S + row * T;
  const float *a = att + row * T;
  float acc = 0.0f;
  for (int j = threadIdx.x; j <= t; j += blockDim.x) {
    float pd = drop ? a[j] * mt_dropout_scale(p, key, sample, e0 + j) : a[j];
    float g = s[j] * pd;
    s[j] = g;
    acc += g;
  }
  float rs = mt__block_sum(acc);
  for (int j = threadIdx.x; j <= t; j += blockDim.x) s[j] = (s[j] - a[j] * rs) * scale;
  for (int j = t + 1 + threadIdx.x; j < T; j += blockDim.x) s[j] = 0.0f;
}

static unsigned col_blocks(int cols) { return (unsigned)((cols + ATT_THREADS - 1) / ATT_THREADS); }

/* Writes the dropped probabilities of heads h0.. (hc) and rows r0.. (rc),
 * columns 0..r1-1, of sample b into dst. */
static void att_dropout(mt_device *d, float *dst, const float *att, int b, int NH, int T, int h0,
                        int hc, int r0, int rc, int r1, const mt_dropout *drop) {
  mt__cuda *c = mt__cuda_enter(d);
  const float *att_b = att + (size_t)b * NH * T * T;
  MT_LAUNCH(k_att_dropout, dim3(col_blocks(r1), (unsigned)rc, (unsigned)hc), ATT_THREADS, c->stream)
  (dst, att_b, T, h0, r0, rc, r1, drop->p, drop->key, drop->sample0 + (uint64_t)b, drop->head0);
  mt__cuda_check(d, "attention dropout");
}

void mt__cuda_attention_fwd(mt_device *d, float *out, float *att, const float *qkv, int B, int T,
                            int C, int NH, const mt_dropout *drop) {
  if (drop && drop->p == 0.0f) drop = NULL;
  if (!B || !T || !C) return;
  if (T > 65535) {
    mt__cuda_fail(d, "attention_fwd", "T > 65535 rows (a grid dimension)");
    return;
  }
  mt__cuda *c = mt__cuda_enter(d);
  int HS = C / NH, ld3 = 3 * C;
  long long TT = (long long)T * T;
  float scale = 1.0f / sqrtf((float)HS);
  for (int b = 0; b < B; b++) {
    // att[b,h](T,T) = scale · Q Kᵀ; column-major attᵀ = K·Qᵀ: A = K (HS,T) transposed, B = Q (HS,T)
    const float *q = qkv + (size_t)b * T * ld3;
    mt__gemm g = {
        1, 0,  T,     T,    HS,  NH, q + C, ld3, HS, q, ld3, HS, att + (size_t)b * NH * TT,
        T, TT, scale, 0.0f, NULL};
    mt__cuda_gemm(d, "attention_fwd scores", &g);
  }
  MT_LAUNCH(k_att_softmax, (unsigned)((size_t)B * NH * T), ATT_THREADS, c->stream)(att, T);
  mt__cuda_check(d, "attention_fwd softmax");
  for (int b = 0; b < B; b++) {
    const float *v = qkv + (size_t)b * T * ld3 + 2 * C;
    float *o = out + (size_t)b * T * C;
    if (!drop) {
      // out[b,:,h](T,HS) = P · V; column-major outᵀ(HS,T) = Vᵀ(HS,T) · Pᵀ, with Pᵀ att's own layout
      mt__gemm g = {0, 0,  HS, T, T,  NH,   v,    ld3, HS, att + (size_t)b * NH * TT,
                    T, TT, o,  C, HS, 1.0f, 0.0f, NULL};
      mt__cuda_gemm(d, "attention_fwd out", &g);
      continue;
    }
    /* With dropout the dropped probabilities go through the device's scratch
     * in pieces: as many heads as fit, or as many rows of one head. Rows
     * r0..r1-1 only need columns up to r1 (causal). */
    size_t cap = MT_CUDA_SCRATCH_FLOATS;
    int hc = (size_t)TT <= cap ? (int)(cap / (size_t)TT) : 1;
    int rc = (size_t)TT <= cap ? T : (int)(cap / (size_t)T);
    if (hc > NH) hc = NH;
    if (rc < 1) {
      mt__cuda_fail(d, "attention_fwd", "a row of T floats exceeds the scratch buffer");
      return;
    }
    for (int h0 = 0; h0 < NH; h0 += hc) {
      int hn = NH - h0 < hc ? NH - h0 : hc;
      for (int r0 = 0; r0 < T; r0 += rc) {
        int rn = T - r0 < rc ? T - r0 : rc, r1 = r0 + rn;
        att_dropout(d, c->scratch, att, b, NH, T, h0, hn, r0, rn, r1, drop);
        // out rows r0..r1 = Pd(rn, r1) · V[0:r1]; column-major (HS,rn) = V(HS,r1) · Pdᵀ(r1,rn)
        mt__gemm g = {0,
                      0,
                      HS,
                      rn,
                      r1,
                      hn,
                      v + (size_t)h0 * HS,
                      ld3,
                      HS,
                      c->scratch,
                      r1,
                      (long long)rn * r1,
                      o + (size_t)r0 * C + (size_t)h0 * HS,
                      C,
                      HS,
                      1.0f,
                      0.0f,
                      NULL};
        mt__cuda_gemm(d, "attention_fwd out (dropout)", &g);
      }
    }
  }
}

/* With Pd the dropped probabilities (P without dropout): dV += Pdᵀ·dout,
 * S = dout·Vᵀ, dS = softmax backward of S, dQ += dS·K·scale, dK += dSᵀ·Q·scale
 * (the scale is folded into dS). scratch holds Pd, then S/dS, of all samples. */
void mt__cuda_attention_bwd(mt_device *d, float *dqkv, float *scratch, const float *dout,
                            const float *qkv, const float *att, int B, int T, int C, int NH,
                            const mt_dropout *drop) {
  if (drop && drop->p == 0.0f) drop = NULL;
  if (!B || !T || !C) return;
  if (T > 65535) {
    mt__cuda_fail(d, "attention_bwd", "T > 65535 rows (a grid dimension)");
    return;
  }
  mt__cuda *c = mt__cuda_enter(d);
  int HS = C / NH, ld3 = 3 * C;
  long long TT = (long long)T * T;
  float scale = 1.0f / sqrtf((float)HS);
  for (int b = 0; b < B; b++) {
    size_t qo = (size_t)b * T * ld3;
    const float *pd = att + (size_t)b * NH * TT, *g = dout + (size_t)b * T * C;
    if (drop) {
      float *sb = scratch + (size_t)b * NH * TT;
      att_dropout(d, sb, att, b, NH, T, 0, NH, 0, T, T, drop);
      pd = sb;
    }
    // dV[b,:,h](T,HS) += Pdᵀ · dout; column-major dVᵀ(HS,T) += doutᵀ(HS,T) · Pd, Pd = (att layout)ᵀ
    mt__gemm gv = {0,   1,  HS,   T,    T,   NH, g, C, HS, pd, T, TT, dqkv + qo + 2 * C,
                   ld3, HS, 1.0f, 1.0f, NULL};
    mt__cuda_gemm(d, "attention_bwd dv", &gv);
  }
  for (int b = 0; b < B; b++) {
    // S[b,h](T,T) = dout · Vᵀ; column-major Sᵀ = V·doutᵀ: A = V (HS,T) transposed, B = dout (HS,T)
    mt__gemm gs = {1,
                   0,
                   T,
                   T,
                   HS,
                   NH,
                   qkv + (size_t)b * T * ld3 + 2 * C,
                   ld3,
                   HS,
                   dout + (size_t)b * T * C,
                   C,
                   HS,
                   scratch + (size_t)b * NH * TT,
                   T,
                   TT,
                   1.0f,
                   0.0f,
                   NULL};
    mt__cuda_gemm(d, "attention_bwd scores", &gs);
  }
  MT_LAUNCH(k_att_softmax_bwd, (unsigned)((size_t)B * NH * T), ATT_THREADS, c->stream)
  (scratch, att, T, NH, scale, drop != NULL, drop ? drop->p : 0.0f, drop ? drop->key : 0,
   drop ? drop->sample0 : 0, drop ? drop->head0 : 0);
  mt__cuda_check(d, "attention_bwd softmax");
  for (int b = 0; b < B; b++) {
    size_t qo = (size_t)b * T * ld3;
    const float *ds = scratch + (size_t)b * NH * TT;
    // dQ(T,HS) += dS · K; column-major dQᵀ(HS,T) += Kᵀ(HS,T) · dSᵀ, dSᵀ = dS's own layout
    mt__gemm gq = {0,  0, HS, T,         T,   NH, qkv + qo + C, ld3,  HS,
                   ds, T, TT, dqkv + qo, ld3, HS, 1.0f,         1.0f, NULL};
    mt__cuda_gemm(d, "attention_bwd dq", &gq);
    // dK(T,HS) += dSᵀ · Q; column-major dKᵀ(HS,T) += Qᵀ(HS,T) · dS
    mt__gemm gk = {0,   1,  HS,   T,    T,   NH, qkv + qo, ld3, HS, ds, T, TT, dqkv + qo + C,
                   ld3, HS, 1.0f, 1.0f, NULL};
    mt__cuda_gemm(d, "attention_bwd dk", &gk);
  }
}
