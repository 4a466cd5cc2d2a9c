/* ops_cuda.cu — the CUDA backend: every op of ops.h but attention
 * (attention_cuda.cu), fp32 tensors, fp32 accumulation (double where the CPU
 * backend uses double). Weight matrices may be a 16-bit working copy, and
 * GEMM inputs (LayerNorm's and GeLU's outputs) 16-bit tensors: lookups read
 * weights through wload.h, and the linear ops multiply 16-bit operands
 * natively or convert them first (lin_plan).
 *
 * The element-wise formulas (GeLU, dropout masks, AdamW) come from
 * kernels/common, so both backends compute the same expressions. Row-wise
 * ops run one block per row; reductions over rows (LayerNorm weights, bias
 * gradients, embedding scatter) walk rows in order in a fixed tree, never with
 * atomics, so every result is the same from run to run. Each op queues its
 * work on the device's stream and returns; failures surface in
 * mt_device_sync().
 */
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "cuda_impl.h"
#include "half.h"
#include "mtmath.h"
#include "ops.h"
#include "reduce.cuh"
#include "wload.h"

#define EW 256          /* threads per block, element-wise kernels */
#define ROW 256         /* per-row kernels: LayerNorm, embedding scatter */
#define CE 512          /* cross-entropy rows (tens of thousands of columns) */
#define COLS_Y 16       /* column reductions: blocks of 32 columns x COLS_Y row lanes */
#define ADAM_MAX 32     /* slices per multi-tensor AdamW launch (kernel parameters < 4 KiB) */
#define ADAM_CHUNK 4096 /* elements per AdamW block */

#define GRID_STRIDE(i, n)                                                                          \
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (size_t)(n);                  \
       i += (size_t)gridDim.x * blockDim.x)

/* Queues kernel k for n items (grid-stride) and records a launch failure. */
#define LAUNCH_EW(d, name, k, n, ...)                                                              \
  do {                                                                                             \
    mt__cuda *c_ = mt__cuda_enter(d);                                                              \
    MT_LAUNCH(k, mt__cuda_blocks((n), EW), EW, c_->stream)(__VA_ARGS__);                           \
    mt__cuda_check(d, name);                                                                       \
  } while (0)

/* ---- embedding ---------------------------------------------------------- */

static __global__ void k_embedding_fwd(float *out, const int32_t *tokens, const void *wte,
                                       mt_dtype wt, const float *wpe, int T, int C, size_t n) {
  GRID_STRIDE(i, n) {
    size_t row = i / (size_t)C, col = i % (size_t)C;
    out[i] = mt_load_w(wte, wt, (size_t)tokens[row] * C + col) + wpe[(row % (size_t)T) * C + col];
  }
}

/* dwpe(T,C) += Σ_b dout[b] in order of b, as the CPU backend adds them */
static __global__ void k_embedding_dwpe(float *dwpe, const float *dout, int B, size_t TC) {
  GRID_STRIDE(i, TC) {
    float a = dwpe[i];
    for (int b = 0; b < B; b++) a += dout[(size_t)b * TC + i];
    dwpe[i] = a;
  }
}

/* dwte row of token (tok - v0) += the dout rows of every position holding
 * tok, in order of position. One block per position n (256 threads); only
 * the block of a token's first position does the work, so a repeated token
 * never races and the sum order is the CPU backend's. */
static __global__ void k_embedding_scatter(float *dwte, const float *dout, const int32_t *tokens,
                                           int v0, int Vl, int N, int C) {
  __shared__ int list[ROW];
  __shared__ int wcount[ROW / 32];
  int n = blockIdx.x, tok = tokens[n], k = tok - v0;
  if (k < 0 || k >= Vl) return; /* not in this shard: the whole block leaves */
  for (int s = 0; s < n; s += blockDim.x) {
    int j = s + (int)threadIdx.x;
    if (__syncthreads_or(j < n && tokens[j] == tok)) return; /* an earlier position owns it */
  }
  float *dw = dwte + (size_t)k * C;
  unsigned lane = threadIdx.x & 31u, w = threadIdx.x >> 5;
  for (int s = n; s < N; s += blockDim.x) {
    int j = s + (int)threadIdx.x;
    int hit = j < N && tokens[j] == tok;
    unsigned ballot = __ballot_sync(0xffffffffu, hit);
    if (lane == 0) wcount[w] = __popc(ballot);
    __syncthreads();
    int off = 0, total = 0;
    for (unsigned q = 0; q < blockDim.x / 32u; q++) {
      off += q < w ? wcount[q] : 0;
      total += wcount[q];
    }
    if (hit) list[off + __popc(ballot & ((1u << lane) - 1u))] = j; /* positions, in order */
    __syncthreads();
    if (total) {
      for (int col = threadIdx.x; col < C; col += blockDim.x) {
        float a = dw[col];
        for (int q = 0; q < total; q++) a += dout[(size_t)list[q] * C + col];
        dw[col] = a;
      }
    }
    __syncthreads(); /* list and wcount are rewritten next round */
  }
}

static void embedding_fwd(mt_device *d, float *out, const int32_t *tokens, const void *wte,
                          mt_dtype wt, const float *wpe, int B, int T, int C) {
  size_t n = (size_t)B * T * C;
  if (n) LAUNCH_EW(d, "embedding_fwd", k_embedding_fwd, n, out, tokens, wte, wt, wpe, T, C, n);
}

static void embedding_bwd(mt_device *d, float *dwte, float *dwpe, const float *dout,
                          const int32_t *tokens, int B, int T, int C) {
  if (!B || !T || !C) return;
  size_t TC = (size_t)T * C;
  LAUNCH_EW(d, "embedding_bwd", k_embedding_dwpe, TC, dwpe, dout, B, TC);
  mt__cuda *c = mt__cuda_enter(d);
  MT_LAUNCH(k_embedding_scatter, B * T, ROW, c->stream)(dwte, dout, tokens, 0, INT_MAX, B * T, C);
  mt__cuda_check(d, "embedding_bwd");
}

static __global__ void k_embedding_shard_fwd(float *out, const int32_t *tokens, const void *wte,
                                             mt_dtype wt, int v0, int Vl, int C, size_t n) {
  GRID_STRIDE(i, n) {
    size_t row = i / (size_t)C, col = i % (size_t)C;
    int k = tokens[row] - v0;
    out[i] = k >= 0 && k < Vl ? mt_load_w(wte, wt, (size_t)k * C + col) : 0.0f;
  }
}

static void embedding_shard_fwd(mt_device *d, float *out, const int32_t *tokens, const void *wte,
                                mt_dtype wt, int v0, int Vl, int N, int C) {
  size_t n = (size_t)N * C;
  if (n)
    LAUNCH_EW(d, "embedding_shard_fwd", k_embedding_shard_fwd, n, out, tokens, wte, wt, v0, Vl, C,
              n);
}

static void embedding_shard_bwd(mt_device *d, float *dwte, const float *dout, const int32_t *tokens,
                                int v0, int Vl, int N, int C) {
  if (!N || !C) return;
  mt__cuda *c = mt__cuda_enter(d);
  MT_LAUNCH(k_embedding_scatter, N, ROW, c->stream)(dwte, dout, tokens, v0, Vl, N, C);
  mt__cuda_check(d, "embedding_shard_bwd");
}

/* ---- layernorm ---------------------------------------------------------- */

/* Element i of an activation stored as ot: the float, or its 16 bits
 * rounded to nearest even (half.h), so a typed output holds what packing
 * the fp32 op's output would give. ot is uniform over a launch. */
static __device__ inline void store_act(void *out, mt_dtype ot, size_t i, float v) {
  if (ot == MT_F32)
    ((float *)out)[i] = v;
  else
    ((uint16_t *)out)[i] = mt_half_pack(v, ot == MT_F16);
}

/* Element i of an activation stored as it, as the float it holds */
static __device__ inline float load_act(const void *inp, mt_dtype it, size_t i) {
  if (it == MT_F32) return ((const float *)inp)[i];
  return mt_half_unpack(((const uint16_t *)inp)[i], it == MT_F16);
}

/* One block per row: the mean, then the centred variance (two passes, as the
 * CPU backend), then the normalised write. */
static __global__ void k_layernorm_fwd(void *out, mt_dtype ot, float *mean, float *rstd,
                                       const float *inp, const float *w, const float *b, int C,
                                       float eps) {
  size_t n = blockIdx.x;
  const float *x = inp + n * C;
  float s = 0.0f;
  for (int c = threadIdx.x; c < C; c += blockDim.x) s += x[c];
  float m = mt__block_sum(s) / (float)C;
  float v = 0.0f;
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    float dx = x[c] - m;
    v += dx * dx;
  }
  float r = 1.0f / sqrtf(mt__block_sum(v) / (float)C + eps);
  for (int c = threadIdx.x; c < C; c += blockDim.x)
    store_act(out, ot, n * C + c, (x[c] - m) * r * w[c] + b[c]);
  if (threadIdx.x == 0) {
    mean[n] = m;
    rstd[n] = r;
  }
}

static __global__ void k_layernorm_bwd_dx(float *dinp, const float *dout, const float *inp,
                                          const float *w, const float *mean, const float *rstd,
                                          int C) {
  size_t n = blockIdx.x;
  const float *x = inp + n * C, *g = dout + n * C;
  float *dx = dinp + n * C;
  float m = mean[n], r = rstd[n];
  float s1 = 0.0f, s2 = 0.0f;
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    float dn = g[c] * w[c];
    s1 += dn;
    s2 += dn * (x[c] - m) * r;
  }
  float a = mt__block_sum(s1) / (float)C, bb = mt__block_sum(s2) / (float)C;
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    float xh = (x[c] - m) * r;
    dx[c] += (g[c] * w[c] - a - xh * bb) * r;
  }
}

/* Column reductions (LayerNorm's dw and db, a linear layer's bias
 * gradient) take a block per 32 columns (coalesced rows) and COLS_Y lanes
 * over the rows. At GPT widths that is fewer blocks than the GPU has SMs
 * (64 for h = 2048, on an H200's 132), each streaming all N rows with few
 * loads in flight. So the rows are cut into groups, a block per (32
 * columns, group), aiming at two blocks an SM: with one group a block adds
 * its sums to the output; with more each writes its partial sums to
 * c->cols and k_cols_add adds the groups' partials to the output in group
 * order. Deterministic either way (no atomics), and one group gives the
 * one-pass order bit for bit. */
#ifndef MT_CUDA_COL_MIN_ROWS
#define MT_CUDA_COL_MIN_ROWS 128 /* rows a group takes at least (the emulator test: fewer) */
#endif
#define COL_MAX_GROUPS 32

/* Groups for a reduction of N rows over `blocks` column blocks writing
 * `sums` rows of `cols` partials a group */
static int col_groups(const mt__cuda *c, int N, int blocks, int sums, int cols) {
  int g = (2 * c->sms + blocks - 1) / blocks, by_rows = N / MT_CUDA_COL_MIN_ROWS;
  size_t room = MT_CUDA_COL_FLOATS / ((size_t)sums * cols);
  if (g > by_rows) g = by_rows;
  if (g > COL_MAX_GROUPS) g = COL_MAX_GROUPS;
  if ((size_t)g > room) g = (int)room;
  return g < 1 ? 1 : g;
}

/* The rows [*n0, *n1) of this block's group (blockIdx.y of gridDim.y) */
static __device__ __forceinline__ void group_rows(int N, int *n0, int *n1) {
  int per = (N + (int)gridDim.y - 1) / (int)gridDim.y;
  *n0 = (int)blockIdx.y * per;
  *n1 = *n0 + per < N ? *n0 + per : N;
}

/* dst_v[c] += Σ_g part[(g·nv + v)·C + c], groups in order, for v < nv (2 at
 * most: dst1 may be NULL when nv is 1) */
static __global__ void k_cols_add(float *dst0, float *dst1, const float *part, int G, int nv,
                                  int C) {
  int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  for (int v = 0; v < nv; v++) {
    float t = 0.0f;
    for (int g = 0; g < G; g++) t += part[((size_t)g * nv + v) * C + c];
    (v ? dst1 : dst0)[c] += t;
  }
}

/* dw(C) += Σ_n dout·x̂, db(C) += Σ_n dout over this block's group of rows,
 * the lanes summed in order; with part (more than one group) written there
 * instead, as k_cols_add reads them. */
static __global__ void k_layernorm_dwdb(float *dw, float *db, float *part, const float *dout,
                                        const float *inp, const float *mean, const float *rstd,
                                        int N, int C) {
  __shared__ float sw[COLS_Y][33], sb[COLS_Y][33];
  int c = blockIdx.x * 32 + threadIdx.x, n0, n1;
  group_rows(N, &n0, &n1);
  float aw = 0.0f, ab = 0.0f;
  if (c < C) {
    for (int n = n0 + threadIdx.y; n < n1; n += blockDim.y) {
      size_t i = (size_t)n * C + c;
      float g = dout[i];
      aw += g * (inp[i] - mean[n]) * rstd[n];
      ab += g;
    }
  }
  sw[threadIdx.y][threadIdx.x] = aw;
  sb[threadIdx.y][threadIdx.x] = ab;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    float tw = 0.0f, tb = 0.0f;
    for (unsigned y = 0; y < blockDim.y; y++) {
      tw += sw[y][threadIdx.x];
      tb += sb[y][threadIdx.x];
    }
    if (part) {
      part[(size_t)blockIdx.y * 2 * C + c] = tw;
      part[((size_t)blockIdx.y * 2 + 1) * C + c] = tb;
    } else {
      dw[c] += tw;
      db[c] += tb;
    }
  }
}

static void layernorm_fwd(mt_device *d, void *out, mt_dtype ot, float *mean, float *rstd,
                          const float *inp, const float *w, const float *b, int N, int C,
                          float eps) {
  if (!N || !C) return;
  mt__cuda *c = mt__cuda_enter(d);
  MT_LAUNCH(k_layernorm_fwd, N, ROW, c->stream)(out, ot, mean, rstd, inp, w, b, C, eps);
  mt__cuda_check(d, "layernorm_fwd");
}

static void layernorm_bwd(mt_device *d, float *dinp, float *dw, float *db, const float *dout,
                          const float *inp, const float *w, const float *mean, const float *rstd,
                          int N, int C) {
  if (!N || !C) return;
  mt__cuda *c = mt__cuda_enter(d);
  MT_LAUNCH(k_layernorm_bwd_dx, N, ROW, c->stream)(dinp, dout, inp, w, mean, rstd, C);
  int blocks = (C + 31) / 32, G = col_groups(c, N, blocks, 2, C);
  float *part = G > 1 ? c->cols : NULL;
  MT_LAUNCH(k_layernorm_dwdb, dim3((unsigned)blocks, (unsigned)G), dim3(32, COLS_Y), c->stream)
  (dw, db, part, dout, inp, mean, rstd, N, C);
  if (part) MT_LAUNCH(k_cols_add, (C + 255) / 256, 256, c->stream)(dw, db, part, G, 2, C);
  mt__cuda_check(d, "layernorm_bwd");
}

/* ---- element-wise ------------------------------------------------------- */

static __global__ void k_gelu_fwd(void *out, mt_dtype ot, const void *inp, mt_dtype it, size_t n) {
  GRID_STRIDE(i, n) store_act(out, ot, i, mt_gelu(load_act(inp, it, i)));
}

static __global__ void k_gelu_bwd(float *dinp, const void *inp, mt_dtype it, const float *dout,
                                  size_t n) {
  GRID_STRIDE(i, n) dinp[i] += mt_gelu_grad(load_act(inp, it, i)) * dout[i];
}

/* gelu_bwd into zeroed floats, stored as dt: written, each value 0 + the
 * product as there (-0 gives +0), without the zeroing pass */
static __global__ void k_gelu_bwd_to(void *dinp, mt_dtype dt, const void *inp, mt_dtype it,
                                     const float *dout, size_t n) {
  GRID_STRIDE(i, n) {
    float g = 0.0f;
    g += mt_gelu_grad(load_act(inp, it, i)) * dout[i];
    store_act(dinp, dt, i, g);
  }
}

static __global__ void k_residual(float *out, const float *a, const float *b, size_t n) {
  GRID_STRIDE(i, n) out[i] = a[i] + b[i];
}

/* out = a + b, rounded as a 16-bit stream keeps it (mt_half_keep; fp16 < 0:
 * not rounded) */
static __global__ void k_residual_keep(float *out, uint16_t *h, int fp16, const float *a,
                                       const float *b, size_t n) {
  GRID_STRIDE(i, n) out[i] = mt_half_keep(a[i] + b[i], h ? h + i : NULL, fp16);
}

static __global__ void k_add(float *dst, const float *src, size_t n) {
  GRID_STRIDE(i, n) dst[i] += src[i];
}

static __global__ void k_scale(float *x, float s, size_t n) { GRID_STRIDE(i, n) x[i] *= s; }

static void gelu_fwd(mt_device *d, void *out, mt_dtype ot, const void *inp, mt_dtype it, size_t n) {
  if (n) LAUNCH_EW(d, "gelu_fwd", k_gelu_fwd, n, out, ot, inp, it, n);
}

static void gelu_bwd(mt_device *d, float *dinp, const void *inp, mt_dtype it, const float *dout,
                     size_t n) {
  if (n) LAUNCH_EW(d, "gelu_bwd", k_gelu_bwd, n, dinp, inp, it, dout, n);
}

static void gelu_bwd_to(mt_device *d, void *dinp, mt_dtype dt, const void *inp, mt_dtype it,
                        const float *dout, size_t n) {
  if (n) LAUNCH_EW(d, "linear_bwd_dgelu: gelu_bwd", k_gelu_bwd_to, n, dinp, dt, inp, it, dout, n);
}

/* n floats of p zeroed on d's stream; a failure becomes the device's error */
static void zero_floats(mt_device *d, float *p, size_t n, const char *what) {
  mt__cuda *c = mt__cuda_enter(d);
  cudaError_t e = n ? cudaMemsetAsync(p, 0, n * sizeof(float), c->stream) : cudaSuccess;
  if (e != cudaSuccess) mt__cuda_fail(d, what, cudaGetErrorString(e));
}

/* ---- 16-bit conversions (mixed precision, and the linear ops' operands) -- */

static __global__ void k_to_half(uint16_t *dst, const float *src, size_t n, int fp16) {
  GRID_STRIDE(i, n) dst[i] = mt_half_pack(src[i], fp16);
}

static void to_half(mt_device *d, uint16_t *dst, const float *src, size_t n, int fp16) {
  if (n) LAUNCH_EW(d, "to_half", k_to_half, n, dst, src, n, fp16);
}

static __global__ void k_unpack_half(float *dst, const uint16_t *src, size_t n, int fp16) {
  GRID_STRIDE(i, n) dst[i] = mt_half_unpack(src[i], fp16);
}

static void unpack_half(mt_device *d, float *dst, const uint16_t *src, size_t n, int fp16) {
  if (n) LAUNCH_EW(d, "unpack_half", k_unpack_half, n, dst, src, n, fp16);
}

/* ---- linear ------------------------------------------------------------- */

/* The most a linear op converts into cvt at once; larger operands go in
 * blocks, a GEMM each. A -D overrides it: the emulator's test shrinks it to
 * reach the blocked paths with small shapes. */
#ifndef MT_CUDA_CVT_BYTES
#define MT_CUDA_CVT_BYTES ((size_t)128 << 20)
#endif

/* dst(OC) += column sums of src(N,OC) stored as st over this block's group
 * of rows, in a fixed tree; with part (more than one group) written there,
 * as k_cols_add reads them (see k_layernorm_dwdb) */
static __global__ void k_colsum_acc(float *dst, float *part, const void *src, mt_dtype st, int N,
                                    int OC) {
  __shared__ float sh[COLS_Y][33];
  int c = blockIdx.x * 32 + threadIdx.x, n0, n1;
  group_rows(N, &n0, &n1);
  float a = 0.0f;
  if (c < OC)
    for (int n = n0 + threadIdx.y; n < n1; n += blockDim.y)
      a += load_act(src, st, (size_t)n * OC + c);
  sh[threadIdx.y][threadIdx.x] = a;
  __syncthreads();
  if (threadIdx.y == 0 && c < OC) {
    float t = 0.0f;
    for (unsigned y = 0; y < blockDim.y; y++) t += sh[y][threadIdx.x];
    if (part)
      part[(size_t)blockIdx.y * OC + c] = t;
    else
      dst[c] += t;
  }
}

/* How a linear op runs with its input stored as it and its weights as wt
 * (it is MT_F32 or wt, ops.h):
 * - LIN_F32 (both fp32): fp32 GEMMs in d->matmul; cvt unused.
 * - LIN_NATIVE (fp16 weights; bf16 ones when d->matmul is bf16): GEMMs of
 *   two 16-bit operands of wt's type, fp32 results. A 16-bit input is an
 *   operand as it is: dw reads its rows in place. An fp32 one is rounded to
 *   wt in blocks, `fwd_rows` rows at cvt for the forward and `rows` for dw:
 *   for bf16, the operands FAST_16BF makes of fp32 ones holding the same
 *   values, so the same sums, up to their order (dw over several blocks adds
 *   block by block). An fp32 dout is rounded to wt in blocks of `rows`
 *   rows at grad_off for dinp and dw: an fp16 job's backward multiplies its
 *   loss-scaled gradient in fp16, as Megatron's does, where it overflows to
 *   inf rather than past the loss scaler's check.
 * - LIN_UNPACK (bf16 weights under another d->matmul): blocks of `w_rows`
 *   weight rows unpacked to fp32 at cvt, then fp32 GEMMs in d->matmul, as
 *   for fp32 weights; for dw (fp32 dout times inp), a 16-bit input's rows
 *   unpacked to fp32 at cvt in blocks of `x_rows`.
 * On either 16-bit path the forward of a 16-bit input is one GEMM of w and
 * inp as they are, cvt unused: products of 16-bit values are exact and sum
 * in fp32, which is what fp32, TF32 or FAST_16BF GEMMs of the unpacked
 * values compute too (none of those rounds a 16-bit value), up to the
 * order of the sum. An input of another type than fp32 or wt has no path:
 * the op records an error and leaves its outputs alone.
 * bf16 weights size cvt for both of their paths, so a d->matmul that
 * changes after linear_scratch never overruns it. */
enum { LIN_F32, LIN_NATIVE, LIN_UNPACK };

typedef struct {
  int path;
  int rows;        /* LIN_NATIVE: rows of dout (and of an fp32 inp) per backward block */
  int fwd_rows;    /* LIN_NATIVE, fp32 inp: rows of inp per forward block */
  size_t grad_off; /* LIN_NATIVE: bytes into cvt of dout's block */
  int w_rows;      /* LIN_UNPACK: weight rows per block */
  int x_rows;      /* LIN_UNPACK, 16-bit inp: input rows per dw block */
  size_t bytes;    /* cvt for this shape, it and wt: linear_scratch */
} lin_plan;

static size_t up256(size_t b) { return (b + 255) & ~(size_t)255; }

static size_t max_size(size_t a, size_t b) { return a > b ? a : b; }

/* Rows of row_bytes that fit in `bytes`: all of them, or a multiple of 8
 * (at least 1), so that every block of an fp32 matrix a GEMM writes starts
 * 32-byte aligned, as cuBLASLt's fast kernels want. */
static int rows_in(size_t bytes, size_t row_bytes, int all) {
  size_t r = row_bytes ? bytes / row_bytes : (size_t)all;
  if (r >= (size_t)all) return all;
  if (r > 8) r &= ~(size_t)7;
  return r ? (int)r : 1;
}

static int lin_types_valid(mt_dtype it, mt_dtype wt) { return it == MT_F32 || it == wt; }

static lin_plan lin_plan_of(const mt_device *d, int N, int C, int OC, mt_dtype it, mt_dtype wt) {
  lin_plan p;
  memset(&p, 0, sizeof p);
  p.path = wt == MT_F32                                                     ? LIN_F32
           : wt == MT_F16 || (wt == MT_BF16 && d->matmul == MT_MATMUL_BF16) ? LIN_NATIVE
                                                                            : LIN_UNPACK;
  if (wt == MT_F32 || !lin_types_valid(it, wt)) return p;
  size_t x2 = it == MT_F32 ? (size_t)C * 2 : 0, oc2 = (size_t)OC * 2;
  p.rows = rows_in(MT_CUDA_CVT_BYTES, x2 + oc2, N);
  p.grad_off = up256((size_t)p.rows * x2);
  size_t native = p.grad_off + up256((size_t)p.rows * oc2), unpack = 0;
  if (x2) p.fwd_rows = rows_in(native, x2, N);
  if (wt == MT_BF16) {
    p.w_rows = rows_in(MT_CUDA_CVT_BYTES, (size_t)C * 4, OC);
    unpack = up256((size_t)p.w_rows * C * 4);
    if (it != MT_F32) {
      p.x_rows = rows_in(MT_CUDA_CVT_BYTES, (size_t)C * 4, N);
      unpack = max_size(unpack, up256((size_t)p.x_rows * C * 4));
    }
  }
  p.bytes = max_size(native, unpack);
  return p;
}

static size_t linear_scratch(mt_device *d, int N, int C, int OC, mt_dtype it, mt_dtype wt) {
  return lin_plan_of(d, N, C, OC, it, wt).bytes;
}

static const char *dtype_name(mt_dtype t) {
  return t == MT_BF16 ? "bf16" : t == MT_F16 ? "fp16" : "fp32";
}

/* 1 when ops.h allows the types (ot MT_F32, or wt's from an input of
 * wt's type); else the device's error, and 0 */
static int lin_types_ok(mt_device *d, const char *what, mt_dtype ot, mt_dtype it, mt_dtype wt) {
  if (lin_types_valid(it, wt) && (ot == MT_F32 || (ot == wt && it == wt))) return 1;
  char detail[192];
  if (!lin_types_valid(it, wt))
    snprintf(detail, sizeof detail,
             "a %s input with %s weights (ops.h: fp32, or the weights' type)", dtype_name(it),
             dtype_name(wt));
  else
    snprintf(detail, sizeof detail,
             "a %s output from a %s input with %s weights (ops.h: fp32, or the weights' type "
             "from an input of that type)",
             dtype_name(ot), dtype_name(it), dtype_name(wt));
  mt__cuda_fail(d, what, detail);
  return 0;
}

/* Element off of a tensor stored as t */
static const void *at_elem(const void *p, mt_dtype t, size_t off) {
  return (const char *)p + off * (t == MT_F32 ? 4 : 2);
}

static int min_int(int a, int b) { return a < b ? a : b; }

/* g as it is; or, with gelu_out, through cuBLASLt's GeLU epilogue: gelu_out
 * = gelu(result) and g->D = the result (its aux matrix, laid out and stored
 * as D). 1 when the epilogue ran, 0 when the caller still owes the GeLU. */
static int fwd_gemm(mt_device *d, const char *what, const mt__gemm *g, void *gelu_out) {
  if (gelu_out && d->gelu_epilogue) {
    mt__gemm e = *g;
    e.D = gelu_out;
    if (mt__cuda_gemm_gelu(d, what, &e, g->D)) return 1;
  }
  mt__cuda_gemm(d, what, g);
  return 0;
}

/* linear_fwd into out; with gelu_out, linear_gelu_fwd (out is then pre).
 * Row-major (N,C)·(OC,C)ᵀ is column-major outᵀ(OC,N) = w(C,OC)ᵀ · inpᵀ(C,N):
 * A = w transposed, B = inp, the bias as the epilogue's. A block of inp's
 * rows is a block of outᵀ's columns; a block of w's rows, of outᵀ's rows.
 * A 16-bit output (ot, from a 16-bit input: the one-GEMM case) is the
 * GEMM's D, rounded by its epilogue, the GeLU's aux too. The GeLU
 * epilogue's aux ld is OC, which must be a multiple of 8 (its rule); where
 * cuBLASLt cannot, a plain GEMM and then gelu_fwd over all of out.
 * cuBLASLt's GeLU is the tanh form, mt_gelu's formula, evaluated by its own
 * code on the unrounded sum: close to k_gelu_fwd, not bit for bit
 * (test_cuda_ops allows for it). */
static void linear_forward(mt_device *d, const char *what, void *out, void *gelu_out, mt_dtype ot,
                           const void *inp, mt_dtype it, const void *w, mt_dtype wt,
                           const void *bias, void *cvt, int N, int C, int OC) {
  if (!lin_types_ok(d, what, ot, it, wt)) return;
  lin_plan p = lin_plan_of(d, N, C, OC, it, wt);
  int fused = 1;
  if (it == wt) { /* both fp32, or both 16-bit: one GEMM of the operands as stored */
    mt__gemm g = {1, 0, OC, N, C, 1, w, C, 0, inp, C, 0, out, OC, 0, 1.0f, 0.0f, bias};
    g.at = wt, g.bt = it, g.dt = ot;
    fused = fwd_gemm(d, what, &g, gelu_out);
  } else if (p.path == LIN_NATIVE) {
    uint16_t *x = (uint16_t *)cvt;
    for (int r0 = 0; r0 < N; r0 += p.fwd_rows) {
      int rn = min_int(p.fwd_rows, N - r0);
      to_half(d, x, (const float *)inp + (size_t)r0 * C, (size_t)rn * C, wt == MT_F16);
      float *o = (float *)out + (size_t)r0 * OC;
      mt__gemm g = {1, 0, OC, rn, C, 1, w, C, 0, x, C, 0, o, OC, 0, 1.0f, 0.0f, bias};
      g.at = g.bt = wt;
      fused &= fwd_gemm(d, what, &g, gelu_out ? (float *)gelu_out + (size_t)r0 * OC : NULL);
    }
  } else {
    float *wf = (float *)cvt;
    for (int o0 = 0; o0 < OC; o0 += p.w_rows) {
      int on = min_int(p.w_rows, OC - o0);
      unpack_half(d, wf, (const uint16_t *)w + (size_t)o0 * C, (size_t)on * C, wt == MT_F16);
      const float *b = bias ? (const float *)bias + o0 : NULL;
      float *o = (float *)out + o0;
      mt__gemm g = {1, 0, on, N, C, 1, wf, C, 0, inp, C, 0, o, OC, 0, 1.0f, 0.0f, b};
      fused &= fwd_gemm(d, what, &g, gelu_out ? (float *)gelu_out + o0 : NULL);
    }
  }
  if (gelu_out && !fused) gelu_fwd(d, gelu_out, ot, out, ot, (size_t)N * OC);
}

/* The dinp GEMM g, added to g->D (beta 1); or, with pre, linear_bwd_dgelu's:
 * g->D = dpre = gelu'(pre) ⊙ the result, stored as g->dt, through
 * cuBLASLt's DGELU epilogue (beta 0, pre its aux matrix: ld C, which must
 * be a multiple of 8, and stored as D, its rule), or where it cannot, the
 * fp32 result into scratch and gelu' from it into dpre, as on the CPU.
 * pre (stored as pt), scratch and g->D: n values laid out alike.
 * cuBLASLt's gelu' is its own code: close to k_gelu_bwd, not bit for bit
 * (test_cuda_ops allows for it). */
static void dinp_gemm(mt_device *d, const char *what, mt__gemm *g, const void *pre, mt_dtype pt,
                      float *scratch, size_t n) {
  if (!pre) {
    mt__cuda_gemm(d, what, g);
    return;
  }
  void *dpre = g->D;
  mt_dtype dpt = g->dt;
  g->beta = 0.0f;
  if (pt == dpt && d->gelu_epilogue && mt__cuda_gemm_dgelu(d, what, g, pre)) return;
  zero_floats(d, scratch, n, "linear_bwd_dgelu: zero scratch");
  g->D = scratch;
  g->dt = MT_F32;
  g->beta = 1.0f;
  mt__cuda_gemm(d, what, g);
  gelu_bwd_to(d, dpre, dpt, pre, pt, scratch, n);
}

/* 1 when ops.h allows the gradients' types (dout as dt: fp32, or wt's
 * 16 bits with a 16-bit input; dinp as dit: fp32, or, as linear_bwd_dgelu's
 * dpre, the 16-bit input's type); else the device's error, and 0 */
static int grad_types_ok(mt_device *d, const char *what, mt_dtype dit, mt_dtype dt, mt_dtype it,
                         mt_dtype wt, int dgelu) {
  int half_in = it != MT_F32 && it == wt;
  if ((dt == MT_F32 || (dt == wt && half_in)) && (dit == MT_F32 || (dgelu && dit == it && half_in)))
    return 1;
  char detail[192];
  snprintf(detail, sizeof detail,
           "a %s %s with a %s input and %s weights (ops.h: fp32, or the 16-bit input's type)",
           dtype_name(dt != MT_F32 ? dt : dit), dt != MT_F32 ? "dout" : "dpre", dtype_name(it),
           dtype_name(wt));
  mt__cuda_fail(d, what, detail);
  return 0;
}

/* linear_bwd; with pre, linear_bwd_dgelu (dinp is then dpre, stored as
 * dit). Column-major: dinpᵀ(C,N) += w(C,OC) · doutᵀ(OC,N) and dwᵀ(C,OC) +=
 * inpᵀ(C,N) · dout(N,OC). A 16-bit dout (dt) comes with a 16-bit input of
 * the weights' type: every operand is 16-bit, and one GEMM of each pair as
 * stored computes what an fp32 one of their values would (exact products,
 * fp32 sums), cvt unused. Else, by lin_plan: a block of rows is a block of
 * dinpᵀ's columns and a part of dw's sum; a block of w's rows is a part of
 * dinp's sum, so GeLU's gradient waits for the last of them. dbias sums
 * dout as stored. */
static void linear_backward(mt_device *d, const char *what, void *dinp, mt_dtype dit,
                            const void *pre, float *scratch, float *dw, float *dbias,
                            const void *dout, mt_dtype dt, const void *inp, mt_dtype it,
                            const void *w, mt_dtype wt, void *cvt, int N, int C, int OC) {
  const char *name = pre ? "linear_bwd_dgelu" : "linear_bwd";
  if (!lin_types_ok(d, name, MT_F32, it, wt) || !grad_types_ok(d, name, dit, dt, it, wt, !!pre))
    return;
  lin_plan p = lin_plan_of(d, N, C, OC, it, wt);
  if (dt != MT_F32) {
    if (dinp) {
      mt__gemm g = {0, 0, C, N, OC, 1, w, C, 0, dout, OC, 0, dinp, C, 0, 1.0f, 1.0f, NULL};
      g.at = g.bt = wt, g.dt = dit;
      dinp_gemm(d, what, &g, pre, it, scratch, (size_t)N * C);
    }
    mt__gemm g = {0, 1, C, OC, N, 1, inp, C, 0, dout, OC, 0, dw, C, 0, 1.0f, 1.0f, NULL};
    g.at = g.bt = wt;
    mt__cuda_gemm(d, "linear_bwd dw", &g);
  } else if (p.path == LIN_NATIVE) {
    uint16_t *x = (uint16_t *)cvt, *dy = (uint16_t *)((char *)cvt + p.grad_off);
    int fp16 = wt == MT_F16;
    for (int r0 = 0; r0 < N; r0 += p.rows) {
      int rn = min_int(p.rows, N - r0);
      size_t off = (size_t)r0 * C, n = (size_t)rn * C;
      to_half(d, dy, (const float *)dout + (size_t)r0 * OC, (size_t)rn * OC, fp16);
      const void *xb = x;
      if (it == wt)
        xb = (const uint16_t *)inp + off;
      else
        to_half(d, x, (const float *)inp + off, n, fp16);
      if (dinp) {
        void *db = (void *)at_elem(dinp, dit, off);
        mt__gemm g = {0, 0, C, rn, OC, 1, w, C, 0, dy, OC, 0, db, C, 0, 1.0f, 1.0f, NULL};
        g.at = g.bt = wt, g.dt = dit;
        dinp_gemm(d, what, &g, pre ? at_elem(pre, it, off) : NULL, it,
                  scratch ? scratch + off : NULL, n);
      }
      mt__gemm g = {0, 1, C, OC, rn, 1, xb, C, 0, dy, OC, 0, dw, C, 0, 1.0f, 1.0f, NULL};
      g.at = g.bt = wt;
      mt__cuda_gemm(d, "linear_bwd dw", &g);
    }
  } else {
    size_t n = (size_t)N * C;
    const float *dy = (const float *)dout;
    if (dinp && dit == MT_F32 && (p.path == LIN_F32 || p.w_rows >= OC)) {
      const void *wa = w;
      if (p.path == LIN_UNPACK) {
        unpack_half(d, (float *)cvt, (const uint16_t *)w, (size_t)OC * C, wt == MT_F16);
        wa = cvt;
      }
      mt__gemm g = {0, 0, C, N, OC, 1, wa, C, 0, dy, OC, 0, dinp, C, 0, 1.0f, 1.0f, NULL};
      dinp_gemm(d, what, &g, pre, it, scratch, n);
    } else if (dinp) { /* blocks of unpacked weights (all at once for a 16-bit dpre), then gelu' */
      float *acc = pre ? scratch : (float *)dinp, *wf = (float *)cvt;
      if (pre) zero_floats(d, scratch, n, "linear_bwd_dgelu: zero scratch");
      for (int o0 = 0; o0 < OC; o0 += p.w_rows) {
        int on = min_int(p.w_rows, OC - o0);
        unpack_half(d, wf, (const uint16_t *)w + (size_t)o0 * C, (size_t)on * C, wt == MT_F16);
        mt__gemm g = {0, 0, C, N, on, 1, wf, C, 0, dy + o0, OC, 0, acc, C, 0, 1.0f, 1.0f, NULL};
        mt__cuda_gemm(d, what, &g);
      }
      if (pre) gelu_bwd_to(d, dinp, dit, pre, it, scratch, n);
    }
    if (it == MT_F32) {
      mt__gemm g = {0, 1, C, OC, N, 1, inp, C, 0, dy, OC, 0, dw, C, 0, 1.0f, 1.0f, NULL};
      mt__cuda_gemm(d, "linear_bwd dw", &g);
    } else { /* dout is fp32, and a GEMM takes no mix of fp32 and 16-bit operands */
      float *xf = (float *)cvt;
      for (int r0 = 0; r0 < N; r0 += p.x_rows) {
        int rn = min_int(p.x_rows, N - r0);
        unpack_half(d, xf, (const uint16_t *)inp + (size_t)r0 * C, (size_t)rn * C, it == MT_F16);
        const float *dyb = dy + (size_t)r0 * OC;
        mt__gemm g = {0, 1, C, OC, rn, 1, xf, C, 0, dyb, OC, 0, dw, C, 0, 1.0f, 1.0f, NULL};
        mt__cuda_gemm(d, "linear_bwd dw", &g);
      }
    }
  }
  if (dbias && N && OC) {
    mt__cuda *c = mt__cuda_enter(d);
    int blocks = (OC + 31) / 32, G = col_groups(c, N, blocks, 1, OC);
    float *part = G > 1 ? c->cols : NULL;
    MT_LAUNCH(k_colsum_acc, dim3((unsigned)blocks, (unsigned)G), dim3(32, COLS_Y), c->stream)
    (dbias, part, dout, dt, N, OC);
    if (part)
      MT_LAUNCH(k_cols_add, (OC + 255) / 256, 256, c->stream)(dbias, (float *)NULL, part, G, 1, OC);
    mt__cuda_check(d, "linear_bwd dbias");
  }
}

static void linear_fwd(mt_device *d, void *out, mt_dtype ot, const void *inp, mt_dtype it,
                       const void *w, mt_dtype wt, const void *bias, void *cvt, int N, int C,
                       int OC) {
  linear_forward(d, "linear_fwd", out, NULL, ot, inp, it, w, wt, bias, cvt, N, C, OC);
}

static void linear_gelu_fwd(mt_device *d, void *out, void *pre, mt_dtype ot, const void *inp,
                            mt_dtype it, const void *w, mt_dtype wt, const void *bias, void *cvt,
                            int N, int C, int OC) {
  linear_forward(d, "linear_gelu_fwd", pre, out, ot, inp, it, w, wt, bias, cvt, N, C, OC);
}

static void linear_bwd(mt_device *d, float *dinp, float *dw, float *dbias, const void *dout,
                       mt_dtype dt, const void *inp, mt_dtype it, const void *w, mt_dtype wt,
                       void *cvt, int N, int C, int OC) {
  linear_backward(d, "linear_bwd dinp", dinp, MT_F32, NULL, NULL, dw, dbias, dout, dt, inp, it, w,
                  wt, cvt, N, C, OC);
}

static void linear_bwd_dgelu(mt_device *d, void *dpre, mt_dtype pt, float *scratch, float *dw,
                             float *dbias, const float *dout, const void *inp, mt_dtype it,
                             const void *pre, const void *w, mt_dtype wt, void *cvt, int N, int C,
                             int OC) {
  linear_backward(d, "linear_bwd_dgelu", dpre, pt, pre, scratch, dw, dbias, dout, MT_F32, inp, it,
                  w, wt, cvt, N, C, OC);
}

static void residual_fwd(mt_device *d, float *out, const float *a, const float *b, size_t n) {
  if (n) LAUNCH_EW(d, "residual_fwd", k_residual, n, out, a, b, n);
}

static void add_inplace(mt_device *d, float *dst, const float *src, size_t n) {
  if (n) LAUNCH_EW(d, "add_inplace", k_add, n, dst, src, n);
}

static void scale(mt_device *d, float *x, float s, size_t n) {
  if (n) LAUNCH_EW(d, "scale", k_scale, n, x, s, n);
}

/* ---- dropout ------------------------------------------------------------ */

/* One thread per Philox block: the elements 4·blk .. 4·blk+3 of sample
 * blockIdx.y that lie in [elem0, elem0 + per_sample), the lanes of one draw
 * (mt_dropout_keep); row element i is the sample's element elem0 + i. */
/* out = inp * mask, or add + inp * mask (add may be out: accumulate);
 * fp16 >= 0: out rounded as a 16-bit stream keeps it, its bits in h unless
 * h is NULL (mt_half_keep). */
static __global__ void k_dropout(float *out, uint16_t *h, int fp16, const float *inp,
                                 const float *add, size_t per_sample, size_t elem0, float p,
                                 uint64_t key, uint64_t sample0) {
  size_t blk = (elem0 >> 2) + blockIdx.x * (size_t)blockDim.x + threadIdx.x;
  size_t lo = blk * 4 < elem0 ? elem0 : blk * 4, hi = blk * 4 + 4;
  if (hi > elem0 + per_sample) hi = elem0 + per_sample;
  if (lo >= hi) return;
  mt_philox_out o = mt_philox_block(key, sample0 + blockIdx.y, blk);
  size_t row = (size_t)blockIdx.y * per_sample - elem0; /* wraps: row + e is the index */
  for (int k = 0; k < 4; k++) { /* constant lanes: o stays in registers */
    size_t e = blk * 4 + k;
    if (e < lo || e >= hi) continue;
    float v = inp[row + e] * mt_dropout_keep(p, o.v[k]);
    out[row + e] = mt_half_keep(add ? add[row + e] + v : v, h ? h + (row + e) : NULL, fp16);
  }
}

static void dropout_rows(mt_device *d, const char *name, float *out, uint16_t *h, int fp16,
                         const float *inp, int B, size_t per_sample, const mt_dropout *drop,
                         const float *add) {
  if (!B || !per_sample) return;
  mt__cuda *c = mt__cuda_enter(d);
  size_t draws = ((drop->elem0 + per_sample + 3) >> 2) - (drop->elem0 >> 2);
  size_t blocks = (draws + EW - 1) / EW;
  if (B > 65535 || blocks > 0x7FFFFFFF) {
    mt__cuda_fail(d, name, "more than 65535 samples or 2^31 blocks of a sample");
    return;
  }
  MT_LAUNCH(k_dropout, dim3((unsigned)blocks, (unsigned)B), EW, c->stream)
  (out, h, fp16, inp, add, per_sample, drop->elem0, drop->p, drop->key, drop->sample0);
  mt__cuda_check(d, name);
}

static void dropout_fwd(mt_device *d, float *out, const float *inp, int B, size_t per_sample,
                        const mt_dropout *drop) {
  if (!drop || drop->p == 0.0f) {
    if (out != inp && B && per_sample) {
      mt__cuda *c = mt__cuda_enter(d);
      cudaError_t e = cudaMemcpyAsync(out, inp, (size_t)B * per_sample * sizeof(float),
                                      cudaMemcpyDeviceToDevice, c->stream);
      if (e != cudaSuccess) mt__cuda_fail(d, "dropout_fwd copy", cudaGetErrorString(e));
    }
    return;
  }
  dropout_rows(d, "dropout_fwd", out, NULL, -1, inp, B, per_sample, drop, NULL);
}

static void dropout_residual_fwd(mt_device *d, float *out, uint16_t *out_h, mt_dtype ht,
                                 const float *resid, const float *branch, int B, size_t per_sample,
                                 const mt_dropout *drop) {
  int fp16 = ht == MT_F32 ? -1 : ht == MT_F16;
  size_t n = (size_t)B * per_sample;
  if (drop && drop->p != 0.0f)
    dropout_rows(d, "dropout_residual_fwd", out, out_h, fp16, branch, B, per_sample, drop, resid);
  else if (n) /* a residual add (rounded in a 16-bit job) */
    LAUNCH_EW(d, "dropout_residual_fwd", k_residual_keep, n, out, out_h, fp16, resid, branch, n);
}

static void dropout_bwd(mt_device *d, float *dinp, const float *dout, int B, size_t per_sample,
                        const mt_dropout *drop) {
  if (!drop || drop->p == 0.0f) {
    add_inplace(d, dinp, dout, (size_t)B * per_sample);
    return;
  }
  dropout_rows(d, "dropout_bwd", dinp, NULL, -1, dout, B, per_sample, drop, dinp);
}

/* ---- cross-entropy ------------------------------------------------------ */

/* One block per row: max, then exp (written into dlogits) summed in double,
 * then one scaling pass, as the CPU backend. The target's logit is read
 * before any write, since dlogits may alias logits; each element is read and
 * written by the same thread. */
static __global__ void k_crossentropy(float *losses, float *dlogits, const float *logits,
                                      const int32_t *targets, float dloss, int V, int Vp) {
  size_t n = blockIdx.x;
  const float *x = logits + n * Vp;
  float *dx = dlogits ? dlogits + n * Vp : NULL;
  int tg = targets[n];
  if (mt_target_ignored(tg)) { /* masked out, the whole block alike: no loss, no gradient */
    if (losses && threadIdx.x == 0) losses[n] = 0.0f;
    if (dx)
      for (int j = threadIdx.x; j < Vp; j += blockDim.x) dx[j] = 0.0f;
    return;
  }
  float xt = x[tg];
  float mx = -FLT_MAX;
  for (int j = threadIdx.x; j < V; j += blockDim.x) mx = x[j] > mx ? x[j] : mx;
  mx = mt__block_max(mx); /* its barriers also end every read of xt before a write */
  double sum = 0.0;
  for (int j = threadIdx.x; j < V; j += blockDim.x) {
    float e = expf(x[j] - mx);
    if (dx) dx[j] = e;
    sum += e;
  }
  sum = mt__block_sum_d(sum);
  if (losses && threadIdx.x == 0) losses[n] = (float)((double)mx + log(sum) - (double)xt);
  if (!dx) return;
  float f = (float)((double)dloss / sum);
  for (int j = threadIdx.x; j < V; j += blockDim.x) {
    float v = dx[j] * f;
    dx[j] = j == tg ? v - dloss : v;
  }
  for (int j = V + threadIdx.x; j < Vp; j += blockDim.x) dx[j] = 0.0f;
}

static void crossentropy(mt_device *d, float *losses, float *dlogits, const float *logits,
                         const int32_t *targets, float dloss, int N, int V, int Vp) {
  if (!N) return;
  mt__cuda *c = mt__cuda_enter(d);
  MT_LAUNCH(k_crossentropy, N, CE, c->stream)(losses, dlogits, logits, targets, dloss, V, Vp);
  mt__cuda_check(d, "crossentropy");
}

static __global__ void k_ce_shard_max(float *rowmax, const float *logits, int real, int Vl) {
  const float *x = logits + (size_t)blockIdx.x * Vl;
  float mx = -FLT_MAX;
  for (int j = threadIdx.x; j < real; j += blockDim.x) mx = x[j] > mx ? x[j] : mx;
  mx = mt__block_max(mx);
  if (threadIdx.x == 0) rowmax[blockIdx.x] = mx;
}

static __global__ void k_ce_shard_sum(float *rowsum, float *xt, const float *logits,
                                      const int32_t *targets, const float *gmax, int real, int Vl,
                                      int v0) {
  size_t n = blockIdx.x;
  const float *x = logits + n * Vl;
  float mx = gmax[n];
  double sum = 0.0;
  for (int j = threadIdx.x; j < real; j += blockDim.x) sum += expf(x[j] - mx);
  sum = mt__block_sum_d(sum);
  if (threadIdx.x == 0) {
    rowsum[n] = (float)sum;
    int k = targets[n] - v0;
    xt[n] = !mt_target_ignored(targets[n]) && k >= 0 && k < real ? x[k] : 0.0f;
  }
}

static __global__ void k_ce_shard_grad(float *dlogits, const float *logits, const int32_t *targets,
                                       const float *gmax, const float *gsum, float dloss, int real,
                                       int Vl, int v0) {
  size_t n = blockIdx.x;
  const float *x = logits + n * Vl;
  float *dx = dlogits + n * Vl;
  if (mt_target_ignored(targets[n])) { /* the whole block alike */
    for (int j = threadIdx.x; j < Vl; j += blockDim.x) dx[j] = 0.0f;
    return;
  }
  float mx = gmax[n], f = (float)((double)dloss / (double)gsum[n]);
  int k = targets[n] - v0;
  for (int j = threadIdx.x; j < real; j += blockDim.x) {
    float v = expf(x[j] - mx) * f;
    dx[j] = j == k ? v - dloss : v;
  }
  for (int j = real + threadIdx.x; j < Vl; j += blockDim.x) dx[j] = 0.0f;
}

static void crossentropy_shard_max(mt_device *d, float *rowmax, const float *logits, int N,
                                   int real, int Vl) {
  if (!N) return;
  mt__cuda *c = mt__cuda_enter(d);
  MT_LAUNCH(k_ce_shard_max, N, CE, c->stream)(rowmax, logits, real, Vl);
  mt__cuda_check(d, "crossentropy_shard_max");
}

static void crossentropy_shard_sum(mt_device *d, float *rowsum, float *xt, const float *logits,
                                   const int32_t *targets, const float *gmax, int N, int real,
                                   int Vl, int v0) {
  if (!N) return;
  mt__cuda *c = mt__cuda_enter(d);
  MT_LAUNCH(k_ce_shard_sum, N, CE, c->stream)(rowsum, xt, logits, targets, gmax, real, Vl, v0);
  mt__cuda_check(d, "crossentropy_shard_sum");
}

static void crossentropy_shard_grad(mt_device *d, float *dlogits, const float *logits,
                                    const int32_t *targets, const float *gmax, const float *gsum,
                                    float dloss, int N, int real, int Vl, int v0) {
  if (!N) return;
  mt__cuda *c = mt__cuda_enter(d);
  MT_LAUNCH(k_ce_shard_grad, N, CE, c->stream)
  (dlogits, logits, targets, gmax, gsum, dloss, real, Vl, v0);
  mt__cuda_check(d, "crossentropy_shard_grad");
}

/* ---- optimizer ---------------------------------------------------------- */

static __global__ void k_adamw(float *param, const float *grad, float *m, float *v, size_t n,
                               float lr, float beta1, float beta2, float eps, float wd,
                               float grad_scale, float bc1, float bc2) {
  GRID_STRIDE(i, n)
  param[i] = mt_adamw_update(param[i], grad[i] * grad_scale, &m[i], &v[i], lr, beta1, beta2, eps,
                             wd, bc1, bc2);
}

static void adamw(mt_device *d, float *param, const float *grad, float *m, float *v, size_t n,
                  float lr, float beta1, float beta2, float eps, float wd, float grad_scale,
                  int t) {
  float bc1 = mt_adamw_bias_correction(beta1, t), bc2 = mt_adamw_bias_correction(beta2, t);
  if (n)
    LAUNCH_EW(d, "adamw", k_adamw, n, param, grad, m, v, n, lr, beta1, beta2, eps, wd, grad_scale,
              bc1, bc2);
}

/* Up to ADAM_MAX slices, passed by value as the kernel's parameters; block b
 * works on chunk b - first[i] of the slice i with first[i] <= b < first[i+1]. */
typedef struct {
  int count;
  unsigned first[ADAM_MAX + 1];
  mt_adamw_slice s[ADAM_MAX];
} adam_pack;

static __global__ void k_adamw_multi(adam_pack pk, float lr, float beta1, float beta2, float eps,
                                     float grad_scale, float bc1, float bc2) {
  int i = 0;
  while (i + 1 < pk.count && blockIdx.x >= pk.first[i + 1]) i++;
  const mt_adamw_slice *s = &pk.s[i];
  size_t lo = (size_t)(blockIdx.x - pk.first[i]) * ADAM_CHUNK;
  size_t hi = lo + ADAM_CHUNK < s->n ? lo + ADAM_CHUNK : s->n;
  for (size_t j = lo + threadIdx.x; j < hi; j += blockDim.x)
    s->param[j] = mt_adamw_update(s->param[j], s->grad[j] * grad_scale, &s->m[j], &s->v[j], lr,
                                  beta1, beta2, eps, s->wd, bc1, bc2);
}

static void adamw_multi(mt_device *d, const mt_adamw_slice *s, int count, float lr, float beta1,
                        float beta2, float eps, float grad_scale, int t) {
  mt__cuda *c = mt__cuda_enter(d);
  float bc1 = mt_adamw_bias_correction(beta1, t), bc2 = mt_adamw_bias_correction(beta2, t);
  adam_pack pk;
  memset(&pk, 0, sizeof pk);
  for (int i = 0; i <= count; i++) {
    /* flush a full pack, or the last one */
    if (i == count || pk.count == ADAM_MAX) {
      unsigned blocks = pk.first[pk.count];
      if (blocks) {
        MT_LAUNCH(k_adamw_multi, blocks, EW, c->stream)
        (pk, lr, beta1, beta2, eps, grad_scale, bc1, bc2);
        mt__cuda_check(d, "adamw_multi");
      }
      memset(&pk, 0, sizeof pk);
      if (i == count) break;
    }
    if (!s[i].n) continue;
    size_t chunks = (s[i].n + ADAM_CHUNK - 1) / ADAM_CHUNK;
    if (chunks > 0x7FFFFFFFu - pk.first[pk.count]) { /* a slice of 2^43 elements: on its own */
      adamw(d, s[i].param, s[i].grad, s[i].m, s[i].v, s[i].n, lr, beta1, beta2, eps, s[i].wd,
            grad_scale, t);
      continue;
    }
    pk.s[pk.count] = s[i];
    pk.first[pk.count + 1] = pk.first[pk.count] + (unsigned)chunks;
    pk.count++;
  }
}

/* ---- reductions --------------------------------------------------------- */

/* Σ x² in double: MT_CUDA_RED_BLOCKS fixed partials (each a fixed stride
 * pattern and tree), then one block adds them in order. */
static __global__ void k_sumsq_part(double *part, const float *x, size_t n) {
  double a = 0.0;
  GRID_STRIDE(i, n) a += (double)x[i] * (double)x[i];
  a = mt__block_sum_d(a);
  if (threadIdx.x == 0) part[blockIdx.x] = a;
}

static __global__ void k_sumsq_total(double *out, const double *part, int parts) {
  double a = 0.0;
  for (int i = threadIdx.x; i < parts; i += blockDim.x) a += part[i];
  a = mt__block_sum_d(a);
  if (threadIdx.x == 0) *out = a;
}

/* The total of the MT_CUDA_RED_BLOCKS partials in c->red, read back (the
 * stream synchronised); on a failure, recorded as op `what`, `failed`. */
static double red_total(mt_device *d, mt__cuda *c, const char *what, double failed) {
  MT_LAUNCH(k_sumsq_total, 1, EW, c->stream)
  (c->red + MT_CUDA_RED_BLOCKS, c->red, MT_CUDA_RED_BLOCKS);
  mt__cuda_check(d, what);
  double r = failed;
  cudaError_t e =
      cudaMemcpyAsync(&r, c->red + MT_CUDA_RED_BLOCKS, sizeof r, cudaMemcpyDeviceToHost, c->stream);
  if (e == cudaSuccess) e = cudaStreamSynchronize(c->stream);
  if (e != cudaSuccess) {
    mt__cuda_fail(d, what, cudaGetErrorString(e));
    return failed;
  }
  return r;
}

static double sumsq(mt_device *d, const float *x, size_t n) {
  if (!n) return 0.0;
  mt__cuda *c = mt__cuda_enter(d);
  MT_LAUNCH(k_sumsq_part, MT_CUDA_RED_BLOCKS, EW, c->stream)(c->red, x, n);
  return red_total(d, c, "sumsq", NAN); /* NaN: no clipping scale can hide a failure */
}

/* Σ x² over many spans. A span of n elements has min(ceil(n / SUMSQ_CHUNK),
 * SUMSQ_SPAN_BLOCKS) blocks, each a fixed stride pattern and tree, so its
 * partials depend on n alone; spans go by value in packs of up to SUMSQ_MAX
 * (or as many as fill MT_CUDA_RED_PARTS partials), and after each pack's
 * launch one block adds its partials in order into one total in device
 * memory, read back once at the end. */
#define SUMSQ_CHUNK 4096
#define SUMSQ_SPAN_BLOCKS (MT_CUDA_RED_PARTS / 16) /* at least 16 long spans a launch */
#define SUMSQ_MAX 128 /* spans a launch: kernel parameters 2.6 KiB, under 4 KiB */

/* block b works on span i with first[i] <= b < first[i+1] */
typedef struct {
  int count;
  unsigned first[SUMSQ_MAX + 1];
  mt_sumsq_span s[SUMSQ_MAX];
} sumsq_pack;

/* A pack's partials: each block's Σ x² over its part of its span, or with
 * zeros the zeros (+0 or -0) it holds, counted in double (exact below
 * 2^53) so that k_sumsq_multi_total adds either. */
static __global__ void k_sumsq_multi_part(double *part, sumsq_pack pk, int zeros) {
  int i = 0;
  while (i + 1 < pk.count && blockIdx.x >= pk.first[i + 1]) i++;
  const float *x = pk.s[i].x;
  size_t n = pk.s[i].n, blocks = pk.first[i + 1] - pk.first[i];
  double a = 0.0;
  for (size_t j = (size_t)(blockIdx.x - pk.first[i]) * blockDim.x + threadIdx.x; j < n;
       j += blocks * blockDim.x)
    a += zeros ? (x[j] == 0.0f ? 1.0 : 0.0) : (double)x[j] * (double)x[j];
  a = mt__block_sum_d(a);
  if (threadIdx.x == 0) part[blockIdx.x] = a;
}

/* *total = (add ? *total : 0) + the parts partials, added in a fixed pattern */
static __global__ void k_sumsq_multi_total(double *total, const double *part, int parts, int add) {
  double a = 0.0;
  for (int i = threadIdx.x; i < parts; i += blockDim.x) a += part[i];
  a = mt__block_sum_d(a);
  if (threadIdx.x == 0) *total = add ? *total + a : a;
}

/* Launches a pack's partials (Σ x², or with zeros the zeros counted) and
 * adds them to the total (add 0: the first pack, which writes it); the
 * pack is emptied. */
static void sumsq_flush(mt_device *d, mt__cuda *c, sumsq_pack *pk, int add, int zeros) {
  const char *what = zeros ? "count_zeros" : "sumsq_multi";
  unsigned parts = pk->first[pk->count];
  MT_LAUNCH(k_sumsq_multi_part, parts, EW, c->stream)(c->red_multi, *pk, zeros);
  mt__cuda_check(d, what);
  MT_LAUNCH(k_sumsq_multi_total, 1, EW, c->stream)
  (c->red_multi + MT_CUDA_RED_PARTS, c->red_multi, (int)parts, add);
  mt__cuda_check(d, what);
  memset(pk, 0, sizeof *pk);
}

/* sumsq_multi's Σ x² (zeros 0) or count_zeros' count (zeros 1) */
static double spans_total(mt_device *d, const mt_sumsq_span *s, int count, int zeros) {
  const char *what = zeros ? "count_zeros" : "sumsq_multi";
  mt__cuda *c = mt__cuda_enter(d);
  sumsq_pack pk;
  memset(&pk, 0, sizeof pk);
  int packs = 0;
  for (int i = 0; i < count; i++) {
    if (!s[i].n) continue; /* adds nothing; its pointer is never read */
    size_t chunks = (s[i].n + SUMSQ_CHUNK - 1) / SUMSQ_CHUNK;
    unsigned blocks = chunks < SUMSQ_SPAN_BLOCKS ? (unsigned)chunks : SUMSQ_SPAN_BLOCKS;
    if (pk.count == SUMSQ_MAX || pk.first[pk.count] + blocks > MT_CUDA_RED_PARTS)
      sumsq_flush(d, c, &pk, packs++, zeros);
    pk.s[pk.count] = s[i];
    pk.first[pk.count + 1] = pk.first[pk.count] + blocks;
    pk.count++;
  }
  if (pk.count) sumsq_flush(d, c, &pk, packs++, zeros);
  if (!packs) return 0.0;
  double r = NAN;
  cudaError_t e = cudaMemcpyAsync(&r, c->red_multi + MT_CUDA_RED_PARTS, sizeof r,
                                  cudaMemcpyDeviceToHost, c->stream);
  if (e == cudaSuccess) e = cudaStreamSynchronize(c->stream);
  if (e != cudaSuccess) {
    mt__cuda_fail(d, what, cudaGetErrorString(e));
    return NAN;
  }
  /* a launch that failed left the total of an earlier call: NaN, which no
   * clipping scale can hide (the fault itself the device's sync reports) */
  return c->err ? NAN : r;
}

static double sumsq_multi(mt_device *d, const mt_sumsq_span *s, int count) {
  return spans_total(d, s, count, 0);
}

/* -1 when the device failed (the total's NaN) */
static int64_t count_zeros(mt_device *d, const mt_sumsq_span *s, int count) {
  double n = spans_total(d, s, count, 1);
  return isnan(n) ? -1 : (int64_t)n;
}

/* ---- mixed precision ---------------------------------------------------- */

static __global__ void k_round_half(float *dst, const float *src, size_t n, int fp16) {
  GRID_STRIDE(i, n) dst[i] = mt_round_half(src[i], fp16);
}

static void round_half(mt_device *d, float *dst, const float *src, size_t n, int fp16) {
  if (n) LAUNCH_EW(d, "round_half", k_round_half, n, dst, src, n, fp16);
}

static __global__ void k_pack_half(uint16_t *dst, float *src, size_t n, int fp16) {
  GRID_STRIDE(i, n) {
    uint16_t h = mt_half_pack(src[i], fp16);
    dst[i] = h;
    src[i] = mt_half_unpack(h, fp16);
  }
}

static void pack_half(mt_device *d, uint16_t *dst, float *src, size_t n, int fp16) {
  if (n) LAUNCH_EW(d, "pack_half", k_pack_half, n, dst, src, n, fp16);
}

/* Elements that overflow fp16, counted per block (in double, so the block
 * sum and the total reuse the sumsq reduction), then added up. */
static __global__ void k_fp16_bad_part(double *part, const float *x, size_t n) {
  double a = 0.0;
  GRID_STRIDE(i, n) a += mt_fp16_overflows(x[i]) ? 1.0 : 0.0;
  a = mt__block_sum_d(a);
  if (threadIdx.x == 0) part[blockIdx.x] = a;
}

static int fits_fp16(mt_device *d, const float *x, size_t n) {
  if (!n) return 1;
  mt__cuda *c = mt__cuda_enter(d);
  MT_LAUNCH(k_fp16_bad_part, MT_CUDA_RED_BLOCKS, EW, c->stream)(c->red, x, n);
  /* a failure reads as an overflow: the step is skipped, not corrupted */
  return red_total(d, c, "fits_fp16", 1.0) == 0.0;
}

static mt_ops make_ops(void) {
  mt_ops o;
  memset(&o, 0, sizeof o);
  o.name = "cuda";
  o.embedding_fwd = embedding_fwd;
  o.embedding_bwd = embedding_bwd;
  o.layernorm_fwd = layernorm_fwd;
  o.layernorm_bwd = layernorm_bwd;
  o.linear_scratch = linear_scratch;
  o.linear_fwd = linear_fwd;
  o.linear_bwd = linear_bwd;
  o.linear_gelu_fwd = linear_gelu_fwd;
  o.linear_bwd_dgelu = linear_bwd_dgelu;
  o.attention_fwd = mt__cuda_attention_fwd;
  o.attention_bwd = mt__cuda_attention_bwd;
  o.attention_scratch = mt__cuda_attention_scratch;
  o.attention_decode = mt__cuda_attention_decode;
  o.gelu_fwd = gelu_fwd;
  o.gelu_bwd = gelu_bwd;
  o.residual_fwd = residual_fwd;
  o.add_inplace = add_inplace;
  o.dropout_fwd = dropout_fwd;
  o.dropout_bwd = dropout_bwd;
  o.dropout_residual_fwd = dropout_residual_fwd;
  o.crossentropy = crossentropy;
  o.embedding_shard_fwd = embedding_shard_fwd;
  o.embedding_shard_bwd = embedding_shard_bwd;
  o.crossentropy_shard_max = crossentropy_shard_max;
  o.crossentropy_shard_sum = crossentropy_shard_sum;
  o.crossentropy_shard_grad = crossentropy_shard_grad;
  o.adamw = adamw;
  o.adamw_multi = adamw_multi;
  o.sumsq = sumsq;
  o.sumsq_multi = sumsq_multi;
  o.scale = scale;
  o.round_half = round_half;
  o.pack_half = pack_half;
  o.to_half = to_half;
  o.unpack_half = unpack_half;
  o.fits_fp16 = fits_fp16;
  o.count_zeros = count_zeros;
  return o;
}

/* C++ has no designated initialisers before C++20: filled once at load. */
const mt_ops mt_cuda_ops = make_ops();
