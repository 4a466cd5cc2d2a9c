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
 * An fp32 qkv's GEMMs run in the device's fp32 matmul mode. A 16-bit one
 * (a bf16 or fp16 job's) goes either to the fused kernels of flash_cuda.cu
 * or to the same chunks with 16-bit GEMMs (fp32 scores and products of
 * dout, 16-bit probabilities and scores' gradient, as Megatron's unfused
 * attention with its fused softmax), whichever each shape's first call
 * timed faster (mt__cuda_attention_path).
 */
#include <float.h>
#include <math.h>
#include <stdio.h>

#include "cuda_backend.h"
#include "cuda_impl.h"
#include "half.h"
#include "mtmath.h"
#include "ops.h"
#include "reduce.cuh"

extern "C" {
#include "err.h"
#include "log.h"
}

#define ATT_THREADS 256

/* Query rows per chunk: a quarter of T = 2048, which skips 3/8 of the score
 * and value GEMMs' work against whole T×T blocks. The emulator test shrinks
 * both this and the budget to reach every chunking path. */
#ifndef MT_CUDA_ATT_ROWS
#define MT_CUDA_ATT_ROWS MT_GPU_ATT_ROWS
#endif
/* Scratch floats a chunk aims at (two chunk tensors): 256 MiB. */
#ifndef MT_CUDA_ATT_FLOATS
#define MT_CUDA_ATT_FLOATS ((size_t)MT_GPU_ATT_FLOATS)
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

/* The flash backward's share: its D rows (NH·T floats a sample) of up to
 * MT_CUDA_FLASH_SAMPLES samples, which sets how many a launch takes */
static size_t flash_scratch(int T, int NH) {
  int n = mt_flash_bwd_samples(T, NH);
  return (size_t)(n < MT_CUDA_FLASH_SAMPLES ? n : MT_CUDA_FLASH_SAMPLES) * NH * T;
}

/* An fp32 qkv's chunks, two tensors; a 16-bit one's flash backward
 * (flash_cuda.cu) one sample's rows, as many samples at a time as fit. A
 * 16-bit qkv's chunked path keeps its tensors in the device's own scratch
 * (att16_layout_of), made the first time that path runs: a job on the flash
 * kernels, the default, holds none of its 256 MiB. */
size_t mt__cuda_attention_scratch(mt_device *d, int T, int C, int NH, mt_dtype qt) {
  (void)d, (void)C;
  int rc, hc;
  if (T < 1 || NH < 1) return 1;
  if (qt != MT_F32) return flash_scratch(T, NH);
  att_chunk(T, NH, &rc, &hc);
  return 2 * (size_t)hc * rc * T;
}

/* The row kernels' columns. A thread takes quads of 4 adjacent columns,
 * quad q = threadIdx.x + i·blockDim.x, and keeps its first ATT_QUADS of
 * them in registers between a row's passes (8 columns a thread, read from
 * memory once); a longer row's further columns, from 4·ATT_QUADS·blockDim.x
 * on, go one at a time and are read again where a second pass needs them.
 * A quad is one Philox block of the dropout's element indices where they
 * are 4-aligned (T a multiple of 4): drawn once for four columns. The fp32
 * path's kernels run ATT_ROW_THREADS a block (rows up to 2048 kept); the
 * 16-bit path's as many as keep the whole row, up to ATT_ROW_THREADS_MAX
 * (rows up to 8192 kept; row_threads). The emulator test runs them in
 * blocks of fewer threads, to reach every kind of column at its shapes. */
#ifndef MT_CUDA_ATT_ROW_THREADS
#define MT_CUDA_ATT_ROW_THREADS 256
#endif
#ifndef MT_CUDA_ATT_ROW_THREADS_MAX
#define MT_CUDA_ATT_ROW_THREADS_MAX 1024
#endif
#define ATT_ROW_THREADS MT_CUDA_ATT_ROW_THREADS
#define ATT_ROW_THREADS_MAX MT_CUDA_ATT_ROW_THREADS_MAX
#define ATT_QUADS 2
#define ATT_KEPT (4 * ATT_QUADS)

/* A 16-bit row kernel's threads for rows of up to r1 columns: whole warps
 * enough to keep every column, at least ATT_ROW_THREADS, at most
 * ATT_ROW_THREADS_MAX */
static unsigned row_threads(int r1) {
  int n = ((r1 + ATT_KEPT - 1) / ATT_KEPT + 31) / 32 * 32;
  return (unsigned)(n < ATT_ROW_THREADS       ? ATT_ROW_THREADS
                    : n > ATT_ROW_THREADS_MAX ? ATT_ROW_THREADS_MAX
                                              : n);
}

/* The first column of a thread's kept quad i < ATT_QUADS */
static __device__ __forceinline__ int quad_col(int i) {
  return 4 * ((int)threadIdx.x + i * (int)blockDim.x);
}

/* A quad moves as one load or store of its four elements (16 bytes of
 * fp32, 8 of 16-bit values), a warp's 32 quads then contiguous, where all
 * four of its columns are in the row's range lo..hi and the address is
 * aligned (a row of r1 columns, r1 a multiple of 4, from an aligned
 * start); otherwise column by column. */
template <class E> struct alignas(4 * sizeof(E)) att_quad { E v[4]; };

static __device__ __forceinline__ int quad_whole(const void *at, int j0, int lo, int hi,
                                                 unsigned align) {
  return j0 >= lo && j0 + 3 <= hi && ((uintptr_t)at & (align - 1)) == 0;
}

/* q[k] = r[j0 + k] for the columns in lo..hi, `fill` for the others */
static __device__ __forceinline__ void quad_load(float (&q)[4], const float *r, int j0, int lo,
                                                 int hi, float fill) {
  if (quad_whole(r + j0, j0, lo, hi, sizeof(att_quad<float>))) {
    att_quad<float> x = *MT_VEC_AT(const att_quad<float>, r + j0);
#pragma unroll
    for (int k = 0; k < 4; k++) q[k] = x.v[k];
  } else {
#pragma unroll
    for (int k = 0; k < 4; k++) q[k] = j0 + k >= lo && j0 + k <= hi ? r[j0 + k] : fill;
  }
}

/* A value as a row's element: fp32 as it is, 16-bit rounded (fp16: binary16) */
static __device__ __forceinline__ void att_put(float *o, float x, int) { *o = x; }
static __device__ __forceinline__ void att_put(uint16_t *o, float x, int fp16) {
  *o = mt_half_pack(x, fp16);
}

/* o[j0 + k] = q[k] for the columns in lo..hi, fp32 or rounded to 16 bits */
template <class E>
static __device__ __forceinline__ void quad_store(E *o, int j0, int lo, int hi, const float (&q)[4],
                                                  int fp16) {
  if (quad_whole(o + j0, j0, lo, hi, sizeof(att_quad<E>))) {
    att_quad<E> x;
#pragma unroll
    for (int k = 0; k < 4; k++) att_put(&x.v[k], q[k], fp16);
    *MT_VEC_AT(att_quad<E>, o + j0) = x;
  } else {
#pragma unroll
    for (int k = 0; k < 4; k++)
      if (j0 + k >= lo && j0 + k <= hi) att_put(&o[j0 + k], q[k], fp16);
  }
}

/* Whether column u % 4 of kept quad u / 4 lies in lo..hi */
static __device__ __forceinline__ int kept_in(int u, int lo, int hi) {
  int j = quad_col(u >> 2) + (u & 3);
  return j >= lo && j <= hi;
}

/* A thread's first column past those kept */
static __device__ __forceinline__ int rest_col(void) {
  return ATT_KEPT * (int)blockDim.x + (int)threadIdx.x;
}

/* The dropout keep-scales of elements e..e+3: one Philox block where e is
 * 4-aligned, else each its own draw (the same values: mt_dropout_keep) */
static __device__ __forceinline__ void quad_keeps(float (&kq)[4], float p, uint64_t key,
                                                  uint64_t sample, uint64_t e) {
  if ((e & 3) == 0) {
    mt_philox_out o = mt_philox_block(key, sample, e >> 2);
#pragma unroll
    for (int k = 0; k < 4; k++) kq[k] = mt_dropout_keep(p, o.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < 4; k++) kq[k] = mt_dropout_scale(p, key, sample, e + k);
  }
}

/* The softmax statistics of a row's scores r[s0..t], a block a row: its
 * max *m and 1 / the sum of exp(r - m), *inv, in one read of the row. A
 * thread's kept scores go into v (-FLT_MAX outside s0..t; the
 * probabilities' pass takes them from there), their max and sum taken in
 * registers; any further ones fold in with a running max and sum, the sum
 * rescaled as the max grows (FlashAttention's online softmax), and are
 * read again to write the probabilities exp(r - m) · inv. Every row has
 * t >= s0, so m is finite; a NaN never wins a comparison. */
static __device__ void row_softmax_stats(const float *r, int s0, int t, float (&v)[ATT_KEPT],
                                         float *m, float *inv) {
  float mx = -FLT_MAX, s = 0.0f;
#pragma unroll
  for (int i = 0; i < ATT_QUADS; i++) {
    float q[4];
    quad_load(q, r, quad_col(i), s0, t, -FLT_MAX);
#pragma unroll
    for (int k = 0; k < 4; k++) {
      v[4 * i + k] = q[k];
      mx = q[k] > mx ? q[k] : mx;
    }
  }
#pragma unroll
  for (int u = 0; u < ATT_KEPT; u++)
    if (kept_in(u, s0, t)) s += expf(v[u] - mx);
  for (int j = rest_col(); j <= t; j += blockDim.x) {
    if (j < s0) continue;
    float x = r[j];
    if (x > mx) {
      s = s * expf(mx - x) + 1.0f;
      mx = x;
    } else {
      s += expf(x - mx);
    }
  }
  float M = mt__block_max(mx);
  float sum = mt__block_sum(s == 0.0f ? 0.0f : s * expf(mx - M));
  *m = M, *inv = 1.0f / sum;
}

/* Row (hh, i) of a chunk: the softmax over columns s0..t of the scaled
 * scores in place, zero before s0 and beyond to r1, and lse of (head h0 +
 * hh, row t) — lse_b is the sample's (NH, T), ds_b its document starts
 * (NULL: s0 = 0). Zero probabilities stay zero through the dropout and
 * the softmax backward, so only this kernel and k_att_probs see the
 * documents. */
static __global__ void k_att_softmax(float *P, float *lse_b, int T, int h0, int r0, int rn, int r1,
                                     const int32_t *ds_b) {
  int row = blockIdx.x, hh = row / rn, t = r0 + row % rn, s0 = ds_b ? ds_b[t] : 0;
  float *r = P + (size_t)row * r1, mx, inv, v[ATT_KEPT];
  row_softmax_stats(r, s0, t, v, &mx, &inv);
#pragma unroll
  for (int i = 0; i < ATT_QUADS; i++) {
    float q[4];
#pragma unroll
    for (int k = 0; k < 4; k++) q[k] = expf(v[4 * i + k] - mx) * inv;
    quad_store(r, quad_col(i), s0, t, q, 0);
  }
  for (int j = rest_col(); j <= t; j += blockDim.x)
    if (j >= s0) r[j] = expf(r[j] - mx) * inv;
  for (int j = threadIdx.x; j < s0; j += blockDim.x) r[j] = 0.0f;
  for (int j = t + 1 + threadIdx.x; j < r1; j += blockDim.x) r[j] = 0.0f;
  if (threadIdx.x == 0) lse_b[(size_t)(h0 + hh) * T + t] = mx - logf(inv);
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
 * dS = (G - P·ΣG)·scale on columns 0..t and zero beyond to r1. A
 * thread's kept G and P stay in registers between the two passes; only a
 * longer row's further G goes through S. Registers for 3 blocks an SM
 * (76 a thread; held to 64 for 4, it spilled). */
static __global__ void MT_LAUNCH_BOUNDS(ATT_ROW_THREADS, 3)
    k_att_softmax_bwd(float *S, const float *P, int T, int h0, int r0, int rn, int r1, float scale,
                      int drop, float p, uint64_t key, uint64_t sample, uint32_t head0) {
  int row = blockIdx.x, hh = row / rn, t = r0 + row % rn;
  uint64_t e0 = ((uint64_t)(head0 + h0 + hh) * T + t) * T;
  float *s = S + (size_t)row * r1;
  const float *a = P + (size_t)row * r1;
  float acc = 0.0f, gk[ATT_KEPT], ak[ATT_KEPT]; /* a thread's kept g and P, 0 past t */
#pragma unroll
  for (int i = 0; i < ATT_QUADS; i++) {
    int j0 = quad_col(i);
    float kq[4] = {1.0f, 1.0f, 1.0f, 1.0f}, aq[4], sq[4];
    if (drop && j0 <= t) quad_keeps(kq, p, key, sample, e0 + j0);
    quad_load(aq, a, j0, 0, t, 0.0f);
    quad_load(sq, s, j0, 0, t, 0.0f);
#pragma unroll
    for (int k = 0; k < 4; k++) {
      ak[4 * i + k] = aq[k];
      acc += gk[4 * i + k] = sq[k] * (aq[k] * kq[k]);
    }
  }
  for (int j = rest_col(); j <= t; j += blockDim.x) {
    float pd = drop ? a[j] * mt_dropout_scale(p, key, sample, e0 + j) : a[j];
    float g = s[j] * pd;
    s[j] = g;
    acc += g;
  }
  float rs = mt__block_sum(acc);
#pragma unroll
  for (int i = 0; i < ATT_QUADS; i++) {
    float q[4];
#pragma unroll
    for (int k = 0; k < 4; k++) q[k] = (gk[4 * i + k] - ak[4 * i + k] * rs) * scale;
    quad_store(s, quad_col(i), 0, t, q, 0);
  }
  for (int j = rest_col(); j <= t; j += blockDim.x) s[j] = (s[j] - a[j] * rs) * scale;
  for (int j = t + 1 + threadIdx.x; j < r1; j += blockDim.x) s[j] = 0.0f;
}

static unsigned col_blocks(int cols) { return (unsigned)((cols + ATT_THREADS - 1) / ATT_THREADS); }

/* Chunk i of B samples × ceil(NH / hc) head groups × ceil(T / rc) row
 * blocks, in that order: where it sits and what its GEMMs read. */
typedef struct chunk {
  int b, h0, hn, r0, rn, r1;
  size_t q, k, v; /* elements into qkv: sample b, head h0; Q from row r0, K and V from row 0 */
  long long sP;   /* elements between heads of a chunk tensor: rn·r1 */
} chunk;

static int chunk_count(int B, int T, int NH, int rc, int hc) {
  return B * ((NH + hc - 1) / hc) * ((T + rc - 1) / rc);
}

static chunk chunk_of(int i, int T, int C, int NH, int rc, int hc) {
  int nr = (T + rc - 1) / rc, nh = (NH + hc - 1) / hc, HS = C / NH, ld3 = 3 * C;
  chunk k;
  k.b = i / (nr * nh);
  k.h0 = i / nr % nh * hc;
  k.r0 = i % nr * rc;
  k.hn = NH - k.h0 < hc ? NH - k.h0 : hc;
  k.rn = T - k.r0 < rc ? T - k.r0 : rc;
  k.r1 = k.r0 + k.rn;
  size_t head = (size_t)k.b * T * ld3 + (size_t)k.h0 * HS;
  k.q = head + (size_t)k.r0 * ld3;
  k.k = head + C;
  k.v = head + 2 * C;
  k.sP = (long long)k.rn * k.r1;
  return k;
}

/* P(hn, rn, r1) = scale · Q[r0:r1] · K[0:r1]ᵀ per head; column-major Pᵀ =
 * K·Qᵀ: A = K (HS, r1) transposed, B = Q (HS, rn). */
static void chunk_scores(mt_device *d, const char *what, float *P, const void *qkv, mt_dtype qt,
                         const chunk *k, int C, int HS) {
  int ld3 = 3 * C, es = qt == MT_F32 ? 4 : 2;
  const char *K = (const char *)qkv + k->k * es, *Q = (const char *)qkv + k->q * es;
  float scale = 1.0f / sqrtf((float)HS);
  mt__gemm g = {1, 0,   k->r1, k->rn, HS,    k->hn, K,     ld3,  HS,
                Q, ld3, HS,    P,     k->r1, k->sP, scale, 0.0f, NULL};
  g.at = g.bt = qt; /* D fp32 */
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

/* ---- a 16-bit qkv by chunked GEMMs -------------------------------------- */

/* The chunks of a 16-bit qkv and where their tensors sit in the scratch
 * (mt_att16_chunk's regions, in its order): S the fp32 scores, G the fp32
 * dout·Vᵀ, P and dS the 16-bit (dropped) probabilities
 * and scores' gradient, all (hn, rn, r1); dO a chunk's dout rows in 16
 * bits (rn, hn·HS); acc fp32 sums of dK then dV over the row blocks of
 * one group of heads, (hn, T, HS) each, for a 16-bit dqkv. */
typedef struct att16_layout {
  int rc, hc;
  float *S, *G, *acc;
  uint16_t *P, *dS, *dO;
} att16_layout;

static size_t up64(size_t n) { return (n + 63) / 64 * 64; }

/* The chunks' rows *rc and heads *hc on c: the budget's, then any smaller
 * ones asked (mt__cuda_attention_chunk). No region of the layout grows: a
 * chunk of fewer rows must not take more heads, whose dK and dV sums
 * would outgrow the scratch. */
static void att16_chunk_of(const mt__cuda *c, int T, int NH, int HS, int *rc, int *hc) {
  mt_att16_chunk(T, NH, HS, MT_CUDA_ATT_ROWS, MT_CUDA_ATT_FLOATS, rc, hc);
  if (c->att_chunk_rows && c->att_chunk_rows < *rc) *rc = c->att_chunk_rows;
  if (c->att_chunk_heads && c->att_chunk_heads < *hc) *hc = c->att_chunk_heads;
}

/* The layout in scratch (NULL: only counted); returns its floats */
static size_t att16_lay(att16_layout *l, float *scratch, int T, int HS) {
  size_t e = (size_t)l->hc * l->rc * T, o = 0;
  l->S = scratch + o, o += up64(e);
  l->G = scratch + o, o += up64(e);
  l->P = (uint16_t *)(scratch + o), o += up64((e + 1) / 2);
  l->dS = (uint16_t *)(scratch + o), o += up64((e + 1) / 2);
  l->dO = (uint16_t *)(scratch + o), o += up64(((size_t)l->hc * l->rc * HS + 1) / 2);
  l->acc = scratch + o, o += 2 * (size_t)l->hc * T * HS;
  return o;
}

/* The chunks of a 16-bit qkv of this shape on d, laid out in d's chunked
 * scratch, which grows to hold them (freeing the smaller one waits for the
 * work in flight on it). The flash kernels never touch it, so a device
 * that never takes this path never makes it. -1, with d failed, when
 * the GPU has no room for it. */
static int att16_layout_of(mt_device *d, mt__cuda *c, int T, int NH, int HS, att16_layout *l) {
  att16_chunk_of(c, T, NH, HS, &l->rc, &l->hc);
  size_t need = att16_lay(l, NULL, T, HS);
  if (need > c->att16_floats) {
    cudaFree(c->att16_buf);
    c->att16_buf = NULL, c->att16_floats = 0;
    if (cudaMalloc((void **)&c->att16_buf, need * sizeof(float)) != cudaSuccess) {
      cudaGetLastError();
      char msg[160];
      snprintf(msg, sizeof msg,
               "no room for the chunked path's scratch, %.1f MiB (MTNLG_ATTENTION_CHUNK makes "
               "smaller chunks; model.attention_backend flash needs none)",
               (double)need * sizeof(float) / (1 << 20));
      mt__cuda_fail(d, "attention (16-bit GEMMs)", msg);
      return -1;
    }
    c->att16_floats = need;
  }
  att16_lay(l, c->att16_buf, T, HS);
  return 0;
}

/* Row (hh, i) of a chunk, forward: the softmax over columns s0..t of the
 * scaled scores in S, lse of (head h0 + hh, row t), and into P the
 * probabilities times the dropout's keep/(1 - p), rounded to the 16-bit
 * type, zero before s0 and beyond to r1. Blocks of up to
 * ATT_ROW_THREADS_MAX threads (row_threads), so registers held to 64 a
 * thread, as the backward's. */
static __global__ void MT_LAUNCH_BOUNDS(ATT_ROW_THREADS_MAX, 1)
    k_att16_softmax(const float *S, uint16_t *P, float *lse_b, int T, int h0, int r0, int rn,
                    int r1, const int32_t *ds_b, int fp16, int drop, float p, uint64_t key,
                    uint64_t sample, uint32_t head0) {
  int row = blockIdx.x, hh = row / rn, t = r0 + row % rn, s0 = ds_b ? ds_b[t] : 0;
  const float *r = S + (size_t)row * r1;
  uint16_t *o = P + (size_t)row * r1;
  uint64_t e0 = ((uint64_t)(head0 + h0 + hh) * T + t) * T;
  float mx, inv, v[ATT_KEPT];
  row_softmax_stats(r, s0, t, v, &mx, &inv);
#pragma unroll
  for (int i = 0; i < ATT_QUADS; i++) {
    int j0 = quad_col(i);
    if (j0 > t || j0 + 3 < s0) continue;
    float kq[4] = {1.0f, 1.0f, 1.0f, 1.0f}, q[4];
    if (drop) quad_keeps(kq, p, key, sample, e0 + j0);
#pragma unroll
    for (int k = 0; k < 4; k++) q[k] = expf(v[4 * i + k] - mx) * inv * kq[k];
    quad_store(o, j0, s0, t, q, fp16);
  }
  for (int j = rest_col(); j <= t; j += blockDim.x) {
    if (j < s0) continue;
    float x = expf(r[j] - mx) * inv;
    if (drop) x *= mt_dropout_scale(p, key, sample, e0 + j);
    o[j] = mt_half_pack(x, fp16);
  }
  for (int j = threadIdx.x; j < s0; j += blockDim.x) o[j] = 0;
  for (int j = t + 1 + threadIdx.x; j < r1; j += blockDim.x) o[j] = 0;
  if (threadIdx.x == 0) lse_b[(size_t)(h0 + hh) * T + t] = mx - logf(inv);
}

/* Row (hh, i) of a chunk, backward: S the scaled scores, G = dout·Vᵀ.
 * The probabilities again, p = exp(s - lse), and pd = p · keep/(1 - p)
 * into P (16 bits); with g = G ∘ pd, dS = (g - p·Σg)·scale into dS (16
 * bits); both zero before s0 and beyond t to r1. S and G are read once,
 * a thread's kept p and g staying in registers for dS (each dropout keep
 * drawn once, a Philox block a quad); a longer row's further columns are
 * read again, making pd again (its dropout draw too) rather than storing
 * g. */
static __global__ void MT_LAUNCH_BOUNDS(ATT_ROW_THREADS_MAX, 1)
    k_att16_softmax_bwd(const float *S, const float *G, uint16_t *P, uint16_t *dS,
                        const float *lse_b, int T, int h0, int r0, int rn, int r1,
                        const int32_t *ds_b, float scale, int fp16, int drop, float p, uint64_t key,
                        uint64_t sample, uint32_t head0) {
  int row = blockIdx.x, hh = row / rn, t = r0 + row % rn, s0 = ds_b ? ds_b[t] : 0;
  size_t at = (size_t)row * r1;
  const float *s = S + at, *g = G + at;
  uint16_t *pd16 = P + at, *ds16 = dS + at;
  float l = lse_b[(size_t)(h0 + hh) * T + t], acc = 0.0f;
  float pk[ATT_KEPT], gk[ATT_KEPT]; /* a thread's kept p and g ∘ pd */
  uint64_t e0 = ((uint64_t)(head0 + h0 + hh) * T + t) * T;
#pragma unroll
  for (int i = 0; i < ATT_QUADS; i++) {
    int j0 = quad_col(i);
    float kq[4] = {1.0f, 1.0f, 1.0f, 1.0f}, sq[4], gq[4], pdq[4];
    if (drop && j0 <= t && j0 + 3 >= s0) quad_keeps(kq, p, key, sample, e0 + j0);
    quad_load(sq, s, j0, s0, t, 0.0f);
    quad_load(gq, g, j0, s0, t, 0.0f);
#pragma unroll
    for (int k = 0; k < 4; k++) {
      int u = 4 * i + k;
      pk[u] = kept_in(u, s0, t) ? expf(sq[k] - l) : 0.0f;
      pdq[k] = pk[u] * kq[k];
      acc += gk[u] = gq[k] * pdq[k];
    }
    quad_store(pd16, j0, s0, t, pdq, fp16);
  }
  for (int j = rest_col(); j <= t; j += blockDim.x) {
    if (j < s0) continue;
    float pd = expf(s[j] - l);
    if (drop) pd *= mt_dropout_scale(p, key, sample, e0 + j);
    pd16[j] = mt_half_pack(pd, fp16);
    acc += g[j] * pd;
  }
  float rs = mt__block_sum(acc);
#pragma unroll
  for (int i = 0; i < ATT_QUADS; i++) {
    float q[4];
#pragma unroll
    for (int k = 0; k < 4; k++) q[k] = (gk[4 * i + k] - pk[4 * i + k] * rs) * scale;
    quad_store(ds16, quad_col(i), s0, t, q, fp16);
  }
  for (int j = rest_col(); j <= t; j += blockDim.x) {
    if (j < s0) continue;
    float pv = expf(s[j] - l), pd = drop ? pv * mt_dropout_scale(p, key, sample, e0 + j) : pv;
    ds16[j] = mt_half_pack((g[j] * pd - pv * rs) * scale, fp16);
  }
  for (int j = threadIdx.x; j < s0; j += blockDim.x) pd16[j] = ds16[j] = 0;
  for (int j = t + 1 + threadIdx.x; j < r1; j += blockDim.x) pd16[j] = ds16[j] = 0;
}

/* A chunk's dout rows in 16 bits: dO(rn, w) = dout rows (ld C), w = hn·HS
 * columns from the chunk's first head. A block a row at a time. */
static __global__ void k_att16_dout(uint16_t *dO, const float *dout, int rn, int w, int C,
                                    int fp16) {
  for (int i = blockIdx.x; i < rn; i += gridDim.x)
    for (int c = threadIdx.x; c < w; c += blockDim.x)
      dO[(size_t)i * w + c] = mt_half_pack(dout[(size_t)i * C + c], fp16);
}

/* A group of heads' dK and dV, summed over its row blocks in acc ((hn, T,
 * HS) each), into a 16-bit dqkv: dst is dK's row 0 of the group's first
 * head (ld 3C), dV C columns on. A block a row (of dK or dV, of one head)
 * at a time. */
static __global__ void k_att16_kv_store(uint16_t *dst, const float *acc, int T, int hn, int HS,
                                        int C, int fp16) {
  for (int r = blockIdx.x; r < 2 * hn * T; r += gridDim.x) {
    int kv = r / (hn * T), hh = r / T % hn, t = r % T;
    const float *a = acc + (size_t)r * HS;
    uint16_t *o = dst + (size_t)t * 3 * C + (size_t)kv * C + (size_t)hh * HS;
    for (int c = threadIdx.x; c < HS; c += blockDim.x) o[c] = mt_half_pack(a[c], fp16);
  }
}

static void att16_gemm(mt_device *d, const char *what, mt__gemm g, mt_dtype ab, mt_dtype dt) {
  g.at = g.bt = ab, g.dt = dt;
  mt__cuda_gemm(d, what, &g);
}

static void chunked16_fwd(mt_device *d, uint16_t *out, float *lse, const uint16_t *qkv, mt_dtype qt,
                          int B, int T, int C, int NH, const mt_dropout *drop,
                          const int32_t *doc_start) {
  mt__cuda *c = mt__cuda_enter(d);
  int HS = C / NH, fp16 = qt == MT_F16;
  att16_layout l;
  if (att16_layout_of(d, c, T, NH, HS, &l)) return;
  for (int i = 0, n = chunk_count(B, T, NH, l.rc, l.hc); i < n; i++) {
    chunk k = chunk_of(i, T, C, NH, l.rc, l.hc);
    chunk_scores(d, "attention_fwd scores (16-bit GEMMs)", l.S, qkv, qt, &k, C, HS);
    MT_LAUNCH(k_att16_softmax, (unsigned)(k.hn * k.rn), row_threads(k.r1), c->stream)
    (l.S, l.P, lse + (size_t)k.b * NH * T, T, k.h0, k.r0, k.rn, k.r1,
     doc_start ? doc_start + (size_t)k.b * T : NULL, fp16, drop != NULL, drop ? drop->p : 0.0f,
     drop ? drop->key : 0, drop ? drop->sample0 + (uint64_t)k.b : 0, drop ? drop->head0 : 0);
    mt__cuda_check(d, "attention_fwd softmax (16-bit GEMMs)");
    // out rows r0..r1 = P(rn, r1) · V[0:r1]; column-major (HS, rn) = V(HS, r1) · Pᵀ(r1, rn)
    uint16_t *o = out + ((size_t)k.b * T + k.r0) * C + (size_t)k.h0 * HS;
    att16_gemm(d, "attention_fwd out (16-bit GEMMs)",
               {0, 0, HS, k.rn, k.r1, k.hn, qkv + k.v, 3 * C, HS, l.P, k.r1, k.sP, o, C, HS, 1.0f,
                0.0f, NULL},
               qt, qt);
  }
}

/* Per chunk, as the fp32 backward: dout's rows rounded; S and P again; G =
 * dout·Vᵀ; the softmax backward; dV += Pᵀ·dout, dQ = dS·K, dK += dSᵀ·Q. An
 * fp32 dqkv is added into; a 16-bit one gets dQ written by its GEMM (a
 * chunk holds every key of its rows) and dK, dV summed in acc over the
 * group's row blocks (the chunks' innermost order), then rounded once. */
static void chunked16_bwd(mt_device *d, void *dqkv, mt_dtype gt, const float *dout,
                          const uint16_t *qkv, mt_dtype qt, const float *lse, int B, int T, int C,
                          int NH, const mt_dropout *drop, const int32_t *doc_start) {
  mt__cuda *c = mt__cuda_enter(d);
  int HS = C / NH, ld3 = 3 * C, fp16 = qt == MT_F16, half = gt != MT_F32;
  float scale = 1.0f / sqrtf((float)HS);
  att16_layout l;
  if (att16_layout_of(d, c, T, NH, HS, &l)) return;
  for (int i = 0, n = chunk_count(B, T, NH, l.rc, l.hc); i < n; i++) {
    chunk k = chunk_of(i, T, C, NH, l.rc, l.hc);
    int hn = k.hn, rn = k.rn, r1 = k.r1, w = hn * HS;
    size_t head = (size_t)k.b * T * ld3 + (size_t)k.h0 * HS; /* this group's row 0 in dqkv */
    MT_LAUNCH(k_att16_dout, mt__cuda_blocks((size_t)rn, 1), ATT_THREADS, c->stream)
    (l.dO, dout + ((size_t)k.b * T + k.r0) * C + (size_t)k.h0 * HS, rn, w, C, fp16);
    mt__cuda_check(d, "attention_bwd dout (16-bit GEMMs)");
    chunk_scores(d, "attention_bwd scores (16-bit GEMMs)", l.S, qkv, qt, &k, C, HS);
    // G(hn, rn, r1) = dout[r0:r1] · V[0:r1]ᵀ; column-major Gᵀ = V·doutᵀ
    att16_gemm(
        d, "attention_bwd scores of dout (16-bit GEMMs)",
        {1, 0, r1, rn, HS, hn, qkv + k.v, ld3, HS, l.dO, w, HS, l.G, r1, k.sP, 1.0f, 0.0f, NULL},
        qt, MT_F32);
    MT_LAUNCH(k_att16_softmax_bwd, (unsigned)(hn * rn), row_threads(r1), c->stream)
    (l.S, l.G, l.P, l.dS, lse + (size_t)k.b * NH * T, T, k.h0, k.r0, rn, r1,
     doc_start ? doc_start + (size_t)k.b * T : NULL, scale, fp16, drop != NULL,
     drop ? drop->p : 0.0f, drop ? drop->key : 0, drop ? drop->sample0 + (uint64_t)k.b : 0,
     drop ? drop->head0 : 0);
    mt__cuda_check(d, "attention_bwd softmax (16-bit GEMMs)");
    /* dK and dV: into an fp32 dqkv (ld 3C), or acc (ld HS, a head T·HS) */
    float *dk = half ? l.acc : (float *)dqkv + head + C;
    float *dv = half ? l.acc + (size_t)hn * T * HS : dk + C;
    int ldkv = half ? HS : ld3;
    long long skv = half ? (long long)T * HS : HS;
    if (half && k.r0 == 0 &&
        cudaMemsetAsync(l.acc, 0, 2 * (size_t)hn * T * HS * sizeof(float), c->stream) !=
            cudaSuccess)
      mt__cuda_fail(d, "attention_bwd (16-bit GEMMs)", "cudaMemsetAsync of dK and dV's sums");
    // dV[0:r1] += Pᵀ · dout[r0:r1]; column-major dVᵀ(HS, r1) += doutᵀ(HS, rn) · P(rn, r1)
    att16_gemm(d, "attention_bwd dv (16-bit GEMMs)",
               {0, 1, HS, r1, rn, hn, l.dO, w, HS, l.P, r1, k.sP, dv, ldkv, skv, 1.0f, 1.0f, NULL},
               qt, MT_F32);
    // dQ[r0:r1] (+)= dS · K[0:r1]; column-major dQᵀ(HS, rn) = Kᵀ(HS, r1) · dSᵀ
    mt__gemm gq = {0,    0,  HS,   rn,   r1,  hn, qkv + k.k, ld3,  HS,
                   l.dS, r1, k.sP, NULL, ld3, HS, 1.0f,      0.0f, NULL};
    if (half)
      gq.D = (uint16_t *)dqkv + head + (size_t)k.r0 * ld3;
    else
      gq.D = (float *)dqkv + head + (size_t)k.r0 * ld3, gq.beta = 1.0f;
    att16_gemm(d, "attention_bwd dq (16-bit GEMMs)", gq, qt, gt);
    // dK[0:r1] += dSᵀ · Q[r0:r1]; column-major dKᵀ(HS, r1) += Qᵀ(HS, rn) · dS(rn, r1)
    att16_gemm(
        d, "attention_bwd dk (16-bit GEMMs)",
        {0, 1, HS, r1, rn, hn, qkv + k.q, ld3, HS, l.dS, r1, k.sP, dk, ldkv, skv, 1.0f, 1.0f, NULL},
        qt, MT_F32);
    if (half && r1 == T) {
      MT_LAUNCH(k_att16_kv_store, mt__cuda_blocks(2 * (size_t)hn * T, 1), 128, c->stream)
      ((uint16_t *)dqkv + head + C, l.acc, T, hn, HS, C, fp16);
      mt__cuda_check(d, "attention_bwd dK and dV (16-bit GEMMs)");
    }
  }
}

/* ---- which way a 16-bit qkv goes ----------------------------------------- */

int mt__cuda_attention_path(mt_device *d, int path) {
  if (path != MT__CUDA_ATT_AUTO && path != MT__CUDA_ATT_FLASH && path != MT__CUDA_ATT_CHUNKED)
    return mt_seterr(MT_EINVAL,
                     "device %s: attention path %d: auto (%d), flash (%d) or chunked (%d)", d->name,
                     path, MT__CUDA_ATT_AUTO, MT__CUDA_ATT_FLASH, MT__CUDA_ATT_CHUNKED);
  mt__cuda *c = mt__cuda_of(d);
  if (c->att_path != path) c->att_tuned.n = 0;
  c->att_path = path;
  return 0;
}

int mt__cuda_attention_path_mode(mt_device *d) { return mt__cuda_of(d)->att_path; }

int mt__cuda_attention_chunk(mt_device *d, int rows, int heads) {
  if (rows < 0 || heads < 0)
    return mt_seterr(MT_EINVAL, "device %s: attention chunks of %d rows and %d heads: counts, or 0",
                     d->name, rows, heads);
  mt__cuda *c = mt__cuda_of(d);
  c->att_chunk_rows = rows, c->att_chunk_heads = heads;
  return 0;
}

size_t mt__cuda_attention_chunked_bytes(mt_device *d) {
  return mt__cuda_of(d)->att16_floats * sizeof(float);
}

void mt__cuda_attention_chunk_of(mt_device *d, int T, int NH, int HS, int *rows, int *heads) {
  att16_chunk_of(mt__cuda_of(d), T, NH, HS, rows, heads);
}

/* The path of a pass (bwd 0 or 1) of shape k: set, or forced (a head size
 * the flash kernels do not take; an fp32 dqkv's backward, which adds, in
 * auto: flash), or as timed (MT__CUDA_ATT_AUTO while not) */
static int att_path_of(mt__cuda *c, const mt__att_shape &k, int bwd, int adds) {
  if (k.HS > MT_FLASH_MAX_HS) return MT__CUDA_ATT_CHUNKED;
  if (c->att_path != MT__CUDA_ATT_AUTO) return c->att_path;
  if (adds) return MT__CUDA_ATT_FLASH;
  mt__att_choice *t = c->att_tuned.find(k);
  return t ? t->path[bwd] : MT__CUDA_ATT_AUTO;
}

int mt__cuda_attention_path_of(mt_device *d, int bwd, int head_size, int fp16, int B, int T, int NH,
                               int dropout, int docs) {
  return att_path_of(mt__cuda_of(d), {head_size, !!fp16, B, T, NH, !!dropout, !!docs}, !!bwd, 0);
}

/* Runs a pass (bwd 0 or 1) of shape k by its path: run(path) queues it.
 * Auto, the pass's first call of the shape: runs the flash kernels once
 * (so that their own first-call timing, flash_cuda.cu's, is not counted),
 * then times both paths (mt__cuda_time_variants, chunked last: both write
 * every output, so the last run leaves valid ones) and keeps the faster.
 * A timing that fails keeps flash and runs it once more. */
template <class F>
static void att_run(mt_device *d, const mt__att_shape &k, int bwd, int adds, F run) {
  mt__cuda *c = mt__cuda_enter(d);
  int path = att_path_of(c, k, bwd, adds);
  if (path != MT__CUDA_ATT_AUTO) {
    run(path);
    return;
  }
  run(MT__CUDA_ATT_FLASH);
  float best[2];
  int ok = mt__cuda_time_variants(
      c, 2, best, [&](int v) { run(v ? MT__CUDA_ATT_CHUNKED : MT__CUDA_ATT_FLASH); });
  path = ok && best[1] < best[0] ? MT__CUDA_ATT_CHUNKED : MT__CUDA_ATT_FLASH;
  if (!ok) {
    cudaGetLastError();
    run(MT__CUDA_ATT_FLASH);
  }
  c->att_tuned.get(k)->path[bwd] = path;
  mt_log_info("device %s: attention %s of a %s qkv, head size %d, B %d, T %d, %d heads: flash "
              "%.3f ms, chunked 16-bit GEMMs %.3f ms: %s kept",
              d->name, bwd ? "backward" : "forward", k.fp16 ? "binary16" : "bf16", k.HS, k.B, k.T,
              k.NH, best[0], best[1], path == MT__CUDA_ATT_FLASH ? "flash" : "chunked");
}

static void att16_fwd(mt_device *d, uint16_t *out, float *lse, const uint16_t *qkv, mt_dtype qt,
                      int B, int T, int C, int NH, const mt_dropout *drop,
                      const int32_t *doc_start) {
  if (drop && drop->p == 0.0f) drop = NULL;
  if (B < 1 || T < 1 || C < 1 || NH < 1) return;
  mt__att_shape k = {C / NH, qt == MT_F16, B, T, NH, drop != NULL, doc_start != NULL};
  att_run(d, k, 0, 0, [&](int path) {
    if (path == MT__CUDA_ATT_CHUNKED)
      chunked16_fwd(d, out, lse, qkv, qt, B, T, C, NH, drop, doc_start);
    else
      mt__cuda_flash_fwd(d, out, lse, qkv, qt, B, T, C, NH, drop, doc_start);
  });
}

static void att16_bwd(mt_device *d, void *dqkv, mt_dtype gt, float *scratch, const float *dout,
                      const uint16_t *out, const uint16_t *qkv, mt_dtype qt, const float *lse,
                      int B, int T, int C, int NH, const mt_dropout *drop,
                      const int32_t *doc_start) {
  if (drop && drop->p == 0.0f) drop = NULL;
  if (B < 1 || T < 1 || C < 1 || NH < 1) return;
  if (gt != MT_F32 && gt != qt) {
    char msg[128];
    snprintf(msg, sizeof msg, "a %s dqkv with a %s qkv (ops.h: fp32, or qkv's own type)",
             gt == MT_F16 ? "binary16" : "bf16", qt == MT_F16 ? "binary16" : "bf16");
    mt__cuda_fail(d, "attention_bwd", msg);
    return;
  }
  mt__att_shape k = {C / NH, qt == MT_F16, B, T, NH, drop != NULL, doc_start != NULL};
  att_run(d, k, 1, gt == MT_F32, [&](int path) {
    if (path == MT__CUDA_ATT_CHUNKED)
      chunked16_bwd(d, dqkv, gt, dout, qkv, qt, lse, B, T, C, NH, drop, doc_start);
    else
      mt__cuda_flash_bwd(d, dqkv, gt, scratch, flash_scratch(T, NH), dout, out, qkv, qt, lse, B, T,
                         C, NH, drop, doc_start);
  });
}

void mt__cuda_attention_fwd(mt_device *d, void *out_, float *lse, float *scratch, const void *qkv_,
                            mt_dtype qt, int B, int T, int C, int NH, const mt_dropout *drop,
                            const int32_t *doc_start) {
  if (qt != MT_F32) {
    att16_fwd(d, (uint16_t *)out_, lse, (const uint16_t *)qkv_, qt, B, T, C, NH, drop, doc_start);
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
    chunk k = chunk_of(i, T, C, NH, rc, hc);
    chunk_scores(d, "attention_fwd scores", P, qkv, MT_F32, &k, C, HS);
    MT_LAUNCH(k_att_softmax, (unsigned)(k.hn * k.rn), ATT_ROW_THREADS, c->stream)
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
    mt__gemm g = {0,  0,    HS,   k.rn, k.r1, k.hn, qkv + k.v, 3 * C, HS,
                  pv, k.r1, k.sP, o,    C,    HS,   1.0f,      0.0f,  NULL};
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
    att16_bwd(d, dqkv_, gt, scratch, dout, (const uint16_t *)out, (const uint16_t *)qkv_, qt, lse,
              B, T, C, NH, drop, doc_start);
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
    chunk k = chunk_of(i, T, C, NH, rc, hc);
    int hn = k.hn, rn = k.rn, r1 = k.r1;
    float *dq = dqkv + (size_t)k.b * T * ld3 + (size_t)k.h0 * HS; /* this head's row 0 */
    const float *g = dout + ((size_t)k.b * T + k.r0) * C + (size_t)k.h0 * HS;
    uint64_t sample = drop ? drop->sample0 + (uint64_t)k.b : 0;
    chunk_scores(d, "attention_bwd scores", P, qkv, MT_F32, &k, C, HS);
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
    mt__gemm gs = {1, 0, r1, rn, HS, hn,   qkv + k.v, ld3,  HS,
                   g, C, HS, S,  r1, k.sP, 1.0f,      0.0f, NULL};
    mt__cuda_gemm(d, "attention_bwd scores of dout", &gs);
    MT_LAUNCH(k_att_softmax_bwd, (unsigned)(hn * rn), ATT_ROW_THREADS, c->stream)
    (S, P, T, k.h0, k.r0, rn, r1, scale, drop != NULL, drop ? drop->p : 0.0f, drop ? drop->key : 0,
     sample, drop ? drop->head0 : 0);
    mt__cuda_check(d, "attention_bwd softmax");
    // dQ[r0:r1] += dS · K[0:r1]; column-major dQᵀ(HS, rn) += Kᵀ(HS, r1) · dSᵀ, dSᵀ = S's layout
    mt__gemm gq = {
        0,   0,  HS,   rn,   r1,  hn, qkv + k.k, ld3, HS, S, r1, k.sP, dq + (size_t)k.r0 * ld3,
        ld3, HS, 1.0f, 1.0f, NULL};
    mt__cuda_gemm(d, "attention_bwd dq", &gq);
    // dK[0:r1] += dSᵀ · Q[r0:r1]; column-major dKᵀ(HS, r1) += Qᵀ(HS, rn) · dS(rn, r1)
    mt__gemm gk = {0, 1,  HS,   r1,     rn,  hn, qkv + k.q, ld3,  HS,
                   S, r1, k.sP, dq + C, ld3, HS, 1.0f,      1.0f, NULL};
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
