/* ops_cpu.c — the CPU backend: every op of ops.h in C11 + OpenMP, GEMMs through OpenBLAS.
 *
 * Threading: row-wise and element-wise loops are OpenMP loops on the device's
 * threads. The large GEMMs of linear layers are called outside any parallel
 * region so that OpenBLAS (its OpenMP build) uses every thread; attention runs
 * one (batch, head) pair per thread with small GEMMs, which OpenBLAS then runs
 * single-threaded inside our region. Ops never allocate: attention keeps its
 * row blocks (and a 16-bit qkv's head, unpacked) in the caller's scratch, one
 * set per thread, and with dropout one small tile on the stack.
 */
#include <float.h>
#include <math.h>
#include <omp.h>
#include <string.h>

#include "blas.h"
#include "half.h"
#include "mtmath.h"
#include "ops.h"

/* glibc's libmvec has AVX2 and AVX-512 variants of expf and tanhf (tanhf since
 * 2.35) and libm's linker script pulls it in as needed. Declaring them lets
 * GCC vectorise softmax, cross-entropy and GeLU: scalar tanhf made GeLU ten
 * times slower. A vector variant may differ from the scalar one by an ulp, so
 * loops that use them cut their work at fixed offsets, never by thread count. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__)
#if __GLIBC_PREREQ(2, 35)
float expf(float) __attribute__((__simd__("notinbranch")));
float tanhf(float) __attribute__((__simd__("notinbranch")));
#endif
#endif

/* Below this many elements a loop stays on the calling thread: a parallel
 * region costs a few microseconds. */
#define PAR_MIN 32768

/* A 16-bit output (LayerNorm's, GeLU's) is computed into a stack tile of
 * this many floats, then packed (pack_row). */
#define PACK_TILE 1024

/* Attention works on blocks of ATT_RB query rows: a block only needs the key
 * columns up to its last row, which skips most of the masked upper triangle.
 * With dropout the dropped probabilities go through a stack tile of ATT_RB
 * rows by at most ATT_CB columns (32 KiB). */
#define ATT_RB 64
#define ATT_CB 128

static inline int nthreads(const mt_device *d) {
  return d && d->threads > 0 ? d->threads : omp_get_max_threads();
}

/* [lo, hi) of 0..n for the calling thread of a parallel region, cut at
 * multiples of align so threads never share a cache line of output. */
static void thread_range(size_t n, size_t align, size_t *lo, size_t *hi) {
  size_t nth = (size_t)omp_get_num_threads(), id = (size_t)omp_get_thread_num();
  size_t units = (n + align - 1) / align, per = units / nth, rem = units % nth;
  size_t u0 = id * per + (id < rem ? id : rem), u1 = u0 + per + (id < rem);
  *lo = u0 * align < n ? u0 * align : n;
  *hi = u1 * align < n ? u1 * align : n;
}

/* ---- embedding ---------------------------------------------------------- */

/* o(n) = the floats of a 16-bit row h(n) */
static inline void unpack_row(float *o, const uint16_t *h, size_t n, mt_dtype t) {
  if (t == MT_BF16) {
#pragma omp simd
    for (size_t i = 0; i < n; i++) o[i] = mt_half_unpack(h[i], 0);
  } else {
    for (size_t i = 0; i < n; i++) o[i] = mt_half_unpack(h[i], 1);
  }
}

/* h(n) = the bits of o(n) rounded to bf16 (fp16 != 0: binary16). The bf16
 * loop is written alone so that GCC vectorises it (half.h's fp16 rounding
 * has branches it does not). */
static inline void pack_row(uint16_t *h, const float *o, size_t n, int fp16) {
  if (!fp16) {
#pragma omp simd
    for (size_t i = 0; i < n; i++) h[i] = mt_f32_to_bf16(o[i]).bits;
  } else {
    for (size_t i = 0; i < n; i++) h[i] = mt_f32_to_fp16(o[i]).bits;
  }
}

/* o(n), values of a 16-bit job's stream, rounded in place to bf16 (fp16 !=
 * 0: binary16) with their bits in h, unless h is NULL: pack_half's result. */
static inline void keep_row(float *o, uint16_t *h, size_t n, int fp16) {
  if (h) {
    pack_row(h, o, n, fp16);
    unpack_row(o, h, n, fp16 ? MT_F16 : MT_BF16);
  } else {
    for (size_t i = 0; i < n; i++) o[i] = mt_round_half(o[i], fp16);
  }
}

/* Row r (C wide) of a matrix stored as wt, as floats: the row itself when
 * fp32, else unpacked into tmp. */
static inline const float *row_of(const void *w, mt_dtype wt, size_t r, int C, float *tmp) {
  if (wt == MT_F32) return (const float *)w + r * C;
  unpack_row(tmp, (const uint16_t *)w + r * C, (size_t)C, wt);
  return tmp;
}

static void embedding_fwd(mt_device *d, float *out, const int32_t *tokens, const void *wte,
                          mt_dtype wt, const float *wpe, int B, int T, int C) {
  int N = B * T;
#pragma omp parallel for num_threads(nthreads(d)) if ((size_t)N * C >= PAR_MIN) schedule(static)
  for (int n = 0; n < N; n++) {
    float *o = out + (size_t)n * C; // (C)
    /* a 16-bit row is unpacked into o, then the position added in place */
    const float *we = row_of(wte, wt, (size_t)tokens[n], C, o); // (C)
    const float *wp = wpe + (size_t)(n % T) * C;                // (C)
#pragma omp simd
    for (int c = 0; c < C; c++) o[c] = we[c] + wp[c];
  }
}

/* Each thread owns a slice of the channels and walks every row: a repeated
 * token never races, and the sum order does not depend on the thread count. */
static void embedding_bwd(mt_device *d, float *dwte, float *dwpe, const float *dout,
                          const int32_t *tokens, int B, int T, int C) {
#pragma omp parallel num_threads(nthreads(d)) if ((size_t)B * T * C >= PAR_MIN)
  {
    size_t c0, c1;
    thread_range((size_t)C, 16, &c0, &c1);
    for (int b = 0; b < B; b++) {
      for (int t = 0; t < T; t++) {
        const float *g = dout + ((size_t)b * T + t) * C;
        float *dw = dwte + (size_t)tokens[b * T + t] * C;
        float *dp = dwpe + (size_t)t * C;
#pragma omp simd
        for (size_t c = c0; c < c1; c++) {
          dw[c] += g[c];
          dp[c] += g[c];
        }
      }
    }
  }
}

/* ---- layernorm ---------------------------------------------------------- */

/* One pass over memory per row: the row stays in L1 for the statistics
 * (the mean, then the centred variance) and the normalised write. */
static void layernorm_fwd(mt_device *d, void *out, mt_dtype ot, float *mean, float *rstd,
                          const float *inp, const float *w, const float *b, int N, int C,
                          float eps) {
#pragma omp parallel for num_threads(nthreads(d)) if ((size_t)N * C >= PAR_MIN) schedule(static)
  for (int n = 0; n < N; n++) {
    const float *x = inp + (size_t)n * C;
    double s = 0.0; /* double: the mean of a wide row with a large offset */
#pragma omp simd reduction(+ : s)
    for (int c = 0; c < C; c++) s += x[c];
    float m = (float)(s / C);
    float v = 0.0f;
#pragma omp simd reduction(+ : v)
    for (int c = 0; c < C; c++) {
      float dx = x[c] - m;
      v += dx * dx;
    }
    float r = 1.0f / sqrtf(v / (float)C + eps);
    /* in tiles, each written to the output or, for 16 bits, to the stack
     * and packed: one loop computes either, so a 16-bit value is the
     * rounding of the fp32 one */
    for (int c0 = 0; c0 < C; c0 += PACK_TILE) {
      float tile[PACK_TILE];
      float *o = ot == MT_F32 ? (float *)out + (size_t)n * C + c0 : tile;
      int k = C - c0 < PACK_TILE ? C - c0 : PACK_TILE;
#pragma omp simd
      for (int c = 0; c < k; c++) o[c] = (x[c0 + c] - m) * r * w[c0 + c] + b[c0 + c];
      if (ot != MT_F32)
        pack_row((uint16_t *)out + (size_t)n * C + c0, tile, (size_t)k, ot == MT_F16);
    }
    mean[n] = m;
    rstd[n] = r;
  }
}

/* dinp by rows (it needs two row reductions), dw and db by channel slices
 * (they reduce over rows); the two loops are independent. */
static void layernorm_bwd(mt_device *d, float *dinp, float *dw, float *db, const float *dout,
                          const float *inp, const float *w, const float *mean, const float *rstd,
                          int N, int C) {
#pragma omp parallel num_threads(nthreads(d)) if ((size_t)N * C >= PAR_MIN)
  {
#pragma omp for schedule(static) nowait
    for (int n = 0; n < N; n++) {
      const float *x = inp + (size_t)n * C, *g = dout + (size_t)n * C;
      float *dx = dinp + (size_t)n * C;
      float m = mean[n], r = rstd[n];
      float sum_dn = 0.0f, sum_dn_xh = 0.0f;
#pragma omp simd reduction(+ : sum_dn, sum_dn_xh)
      for (int c = 0; c < C; c++) {
        float dn = g[c] * w[c];
        sum_dn += dn;
        sum_dn_xh += dn * (x[c] - m) * r;
      }
      float a = sum_dn / (float)C, bb = sum_dn_xh / (float)C;
#pragma omp simd
      for (int c = 0; c < C; c++) {
        float xh = (x[c] - m) * r;
        dx[c] += (g[c] * w[c] - a - xh * bb) * r;
      }
    }
    size_t c0, c1;
    thread_range((size_t)C, 16, &c0, &c1);
    for (int n = 0; n < N; n++) {
      const float *x = inp + (size_t)n * C, *g = dout + (size_t)n * C;
      float m = mean[n], r = rstd[n];
#pragma omp simd
      for (size_t c = c0; c < c1; c++) {
        dw[c] += g[c] * (x[c] - m) * r;
        db[c] += g[c];
      }
    }
  }
}

/* ---- linear ------------------------------------------------------------- */

/* sgemm takes fp32: a 16-bit weight matrix and a 16-bit input are unpacked
 * whole into cvt (the weights first, the input after them), and the GEMM is
 * then the one fp32 copies of the same values get, bit for bit. A 16-bit
 * output (only with a 16-bit input) is summed after them in fp32 and then
 * rounded: the bits of an fp32 output rounded by to_half. */
static size_t linear_scratch(mt_device *d, int N, int C, int OC, mt_dtype it, mt_dtype wt) {
  (void)d;
  size_t floats = (wt == MT_F32 ? 0 : (size_t)OC * C) + (it == MT_F32 ? 0 : (size_t)N * C);
  if (it != MT_F32) floats += (size_t)N * OC;
  return floats * sizeof(float);
}

/* The (rows, C) matrix m stored as t, as floats: m itself, or unpacked into
 * dst. */
static const float *as_f32(mt_device *d, const void *m, mt_dtype t, int rows, int C, float *dst) {
  if (t == MT_F32) return (const float *)m;
  size_t n = (size_t)rows * C;
#pragma omp parallel for num_threads(nthreads(d)) if (n >= PAR_MIN) schedule(static)
  for (int r = 0; r < rows; r++)
    unpack_row(dst + (size_t)r * C, (const uint16_t *)m + (size_t)r * C, (size_t)C, t);
  return dst;
}

static const float *weights_f32(mt_device *d, const void *w, mt_dtype wt, void *cvt, int C,
                                int OC) {
  return as_f32(d, w, wt, OC, C, (float *)cvt);
}

static const float *input_f32(mt_device *d, const void *inp, mt_dtype it, mt_dtype wt, void *cvt,
                              int N, int C, int OC) {
  return as_f32(d, inp, it, N, C, (float *)cvt + (wt == MT_F32 ? 0 : (size_t)OC * C));
}

/* The bias is written first and the GEMM accumulates onto it (beta = 1 also
 * spares OpenBLAS its own pass that zeroes C for beta = 0). A 16-bit output
 * is summed in cvt after the unpacked operands, then rounded row by row. */
static void linear_fwd(mt_device *d, void *outv, mt_dtype ot, const void *xv, mt_dtype it,
                       const void *wv, mt_dtype wt, const void *biasv, void *cvt, int N, int C,
                       int OC) {
  const float *w = weights_f32(d, wv, wt, cvt, C, OC);
  const float *inp = input_f32(d, xv, it, wt, cvt, N, C, OC);
  float *out = ot == MT_F32 ? (float *)outv
                            : (float *)cvt + (wt == MT_F32 ? 0 : (size_t)OC * C) + (size_t)N * C;
  float beta = 0.0f;
  if (biasv) {
    float bias16[PACK_TILE];
    const float *bias = (const float *)biasv;
    if (ot != MT_F32) /* the 16-bit copy of an fp32 vector that holds the same values */
      for (int o0 = 0; o0 < OC; o0 += PACK_TILE) {
        int k = OC - o0 < PACK_TILE ? OC - o0 : PACK_TILE;
        unpack_row(bias16, (const uint16_t *)biasv + o0, (size_t)k, ot);
        for (int n = 0; n < N; n++) memcpy(out + (size_t)n * OC + o0, bias16, k * sizeof(float));
      }
    else
#pragma omp parallel for num_threads(nthreads(d)) if ((size_t)N * OC >= PAR_MIN) schedule(static)
      for (int n = 0; n < N; n++) memcpy(out + (size_t)n * OC, bias, (size_t)OC * sizeof(float));
    beta = 1.0f;
  }
  mt_sgemm(MT_BLAS_ROW_MAJOR, MT_BLAS_NO_TRANS, MT_BLAS_TRANS, N, OC, C, 1.0f, inp, C, w, C, beta,
           out, OC);
  if (ot == MT_F32) return;
#pragma omp parallel for num_threads(nthreads(d)) if ((size_t)N * OC >= PAR_MIN) schedule(static)
  for (int n = 0; n < N; n++)
    pack_row((uint16_t *)outv + (size_t)n * OC, out + (size_t)n * OC, (size_t)OC, ot == MT_F16);
}

/* dbias(OC) += column sums of dout(N,OC): channel slices per thread, summed
 * through a stack tile so dbias is read and written once. */
static void column_sum_acc(mt_device *d, float *dst, const float *src, int N, int OC) {
#pragma omp parallel num_threads(nthreads(d)) if ((size_t)N * OC >= PAR_MIN)
  {
    size_t c0, c1;
    thread_range((size_t)OC, 16, &c0, &c1);
    for (size_t t0 = c0; t0 < c1; t0 += 512) {
      size_t tw = c1 - t0 < 512 ? c1 - t0 : 512;
      float acc[512];
      memset(acc, 0, tw * sizeof(float));
      for (int n = 0; n < N; n++) {
        const float *g = src + (size_t)n * OC + t0;
#pragma omp simd
        for (size_t j = 0; j < tw; j++) acc[j] += g[j];
      }
      for (size_t j = 0; j < tw; j++) dst[t0 + j] += acc[j];
    }
  }
}

/* A 16-bit dout (only with a 16-bit input) is unpacked whole into the
 * room linear_fwd sums a 16-bit output in, after the unpacked operands. */
static void linear_bwd(mt_device *d, float *dinp, float *dw, float *dbias, const void *dv,
                       mt_dtype dt, const void *xv, mt_dtype it, const void *wv, mt_dtype wt,
                       void *cvt, int N, int C, int OC) {
  const float *dout = (const float *)dv;
  if (dt != MT_F32) {
    float *room = (float *)cvt + (wt == MT_F32 ? 0 : (size_t)OC * C) + (size_t)N * C;
    dout = as_f32(d, dv, dt, N, OC, room);
  }
  if (dinp) { // (N,C) += (N,OC) · (OC,C)
    const float *w = weights_f32(d, wv, wt, cvt, C, OC);
    mt_sgemm(MT_BLAS_ROW_MAJOR, MT_BLAS_NO_TRANS, MT_BLAS_NO_TRANS, N, C, OC, 1.0f, dout, OC, w, C,
             1.0f, dinp, C);
  }
  // (OC,C) += (N,OC)ᵀ · (N,C)
  const float *inp = input_f32(d, xv, it, wt, cvt, N, C, OC);
  mt_sgemm(MT_BLAS_ROW_MAJOR, MT_BLAS_TRANS, MT_BLAS_NO_TRANS, OC, C, N, 1.0f, dout, OC, inp, C,
           1.0f, dw, C);
  if (dbias) column_sum_acc(d, dbias, dout, N, OC);
}

/* ---- dropout mask ------------------------------------------------------- */

/* y[j] (+)= x[j] * keep-scale of element e0 + j, j < n, of one sample. Four
 * consecutive elements share one Philox block: writing the element index as
 * (block << 2 | k) lets the compiler see it and compute each block once (3x
 * faster than element by element). accumulate is a constant at every call. */
static inline void dropout_apply(float *y, const float *x, size_t n, uint64_t e0, uint64_t sample,
                                 const mt_dropout *drop, int accumulate) {
  float p = drop->p;
  uint64_t key = drop->key;
  size_t j = 0;
  for (; j < n && ((e0 + j) & 3); j++) {
    float v = x[j] * mt_dropout_scale(p, key, sample, e0 + j);
    y[j] = accumulate ? y[j] + v : v;
  }
  for (; j + 4 <= n; j += 4) {
    uint64_t blk = (e0 + j) >> 2;
#pragma GCC unroll 4
    for (unsigned k = 0; k < 4; k++) {
      float v = x[j + k] * mt_dropout_scale(p, key, sample, blk << 2 | k);
      y[j + k] = accumulate ? y[j + k] + v : v;
    }
  }
  for (; j < n; j++) {
    float v = x[j] * mt_dropout_scale(p, key, sample, e0 + j);
    y[j] = accumulate ? y[j] + v : v;
  }
}

/* ---- attention ---------------------------------------------------------- */

/* tile(rb, cw) = p(rb rows, ld T, columns c0..) * dropout mask, zero where the
 * column is past the row's position (t0 + i). */
static void dropout_tile(float *tile, const float *p, int T, int rb, int c0, int cw, int t0, int h,
                         uint64_t sample, const mt_dropout *drop) {
  for (int i = 0; i < rb; i++) {
    int t = t0 + i;
    int live = t + 1 - c0 < cw ? t + 1 - c0 : cw; /* columns c0 .. t */
    if (live < 0) live = 0;
    const float *pr = p + (size_t)i * T + c0;
    float *tr = tile + (size_t)i * cw;
    dropout_apply(tr, pr, (size_t)live, ((uint64_t)(drop->head0 + h) * T + t) * T + (uint64_t)c0,
                  sample, drop, 0);
    for (int j = live; j < cw; j++) tr[j] = 0.0f;
  }
}

/* Per thread, attention keeps two blocks of ATT_RB rows by T columns in the
 * caller's scratch: the scores and probabilities of a block of query rows,
 * and in the backward pass their gradient beside them. After them, for a
 * 16-bit qkv, the thread's head unpacked to fp32 and its output before it
 * is rounded (att_head_floats). */
static size_t att_block_floats(int T) { return (size_t)(T < ATT_RB ? T : ATT_RB) * (size_t)T; }

/* A 16-bit qkv's head as fp32: T rows of q, k, v side by side (row stride
 * 3 HS), then the head's output (T rows of HS), then, for a 16-bit dqkv,
 * the head's gradient before rounding (T rows of 3 HS, as q, k, v). */
static size_t att_head_floats(int T, int C, int NH, mt_dtype qt) {
  return qt == MT_F32 ? 0 : (size_t)T * 7 * (size_t)(C / NH);
}

/* A thread's part of the scratch: two blocks, then the unpacked head. */
static size_t att_slot_floats(int T, int C, int NH, mt_dtype qt) {
  return 2 * att_block_floats(T) + att_head_floats(T, C, NH, qt);
}

static size_t attention_scratch(mt_device *d, int T, int C, int NH, mt_dtype qt) {
  return (size_t)nthreads(d) * att_slot_floats(T, C, NH, qt);
}

/* Q, K, V of one (b, h) pair as fp32, each at its row 0, row stride ld. */
typedef struct att_head {
  const float *q, *k, *v;
  int ld;
} att_head;

/* Head h of sample b of qkv(B,T,3C) stored as qt: the fp32 tensor itself
 * (ld 3C), or for a 16-bit qkv its values unpacked into buf (T rows of 3 HS,
 * ld 3 HS), the floats the 16 bits hold, so the head code sees the same
 * values either way. */
static att_head att_head_of(float *buf, const void *qkv, mt_dtype qt, int b, int h, int T, int C,
                            int HS) {
  size_t off = (size_t)b * T * 3 * C + (size_t)h * HS;
  att_head a;
  if (qt == MT_F32) {
    const float *q = (const float *)qkv + off;
    a.q = q, a.k = q + C, a.v = q + 2 * C, a.ld = 3 * C;
    return a;
  }
  const uint16_t *src = (const uint16_t *)qkv + off;
  for (int t = 0; t < T; t++) {
    const uint16_t *r = src + (size_t)t * 3 * C;
    float *o = buf + (size_t)t * 3 * HS;
    unpack_row(o, r, (size_t)HS, qt);
    unpack_row(o + HS, r + C, (size_t)HS, qt);
    unpack_row(o + 2 * HS, r + 2 * C, (size_t)HS, qt);
  }
  a.q = buf, a.k = buf + HS, a.v = buf + 2 * HS, a.ld = 3 * HS;
  return a;
}

/* The scaled scores of query rows r0..r1-1 against keys 0..r1-1 into p
 * (rb rows, ld T); Q and K of row stride ld. */
static void att_scores(float *p, const float *Q, const float *K, int ld, int r0, int rb, int HS,
                       int T) {
  int r1 = r0 + rb;
  mt_sgemm(MT_BLAS_ROW_MAJOR, MT_BLAS_NO_TRANS, MT_BLAS_TRANS, rb, r1, HS, 1.0f / sqrtf((float)HS),
           Q + (size_t)r0 * ld, ld, K, ld, 0.0f, p, T);
}

/* One (b, h) pair. qkv holds its head (see att_head), o points at row 0 of
 * the head's output (row stride ldo), lse at the pair's T entries; blk
 * holds one block (ATT_RB rows, ld T); ds the sample's T document starts
 * (NULL: 0), before which a row's probabilities are 0, so the products
 * over columns 0.. and the dropout of those zeros leave them out. */
static void attention_fwd_head(float *o, int ldo, float *lse, float *blk, att_head qkv, int T,
                               int HS, int h, uint64_t sample, const mt_dropout *drop,
                               const int32_t *ds) {
  int ld = qkv.ld;
  for (int r0 = 0; r0 < T; r0 += ATT_RB) {
    int rb = T - r0 < ATT_RB ? T - r0 : ATT_RB, r1 = r0 + rb;
    att_scores(blk, qkv.q, qkv.k, ld, r0, rb, HS, T);
    for (int i = 0; i < rb; i++) {
      int t = r0 + i;
      float *row = blk + (size_t)i * T;
      int s0 = ds ? ds[t] : 0;
      float mx = -FLT_MAX;
#pragma omp simd reduction(max : mx)
      for (int j = s0; j <= t; j++) mx = row[j] > mx ? row[j] : mx;
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int j = s0; j <= t; j++) {
        float e = expf(row[j] - mx);
        row[j] = e;
        sum += e;
      }
      float inv = 1.0f / sum;
#pragma omp simd
      for (int j = s0; j <= t; j++) row[j] *= inv;
      memset(row, 0, (size_t)s0 * sizeof(float));
      memset(row + t + 1, 0, (size_t)(r1 - t - 1) * sizeof(float));
      lse[t] = mx + logf(sum);
    }
    float *ob = o + (size_t)r0 * ldo;
    if (!drop) { // out[r0:r1] = P[r0:r1, 0:r1] · V[0:r1]
      mt_sgemm(MT_BLAS_ROW_MAJOR, MT_BLAS_NO_TRANS, MT_BLAS_NO_TRANS, rb, HS, r1, 1.0f, blk, T,
               qkv.v, ld, 0.0f, ob, ldo);
      continue;
    }
    float tile[ATT_RB * ATT_CB];
    for (int c0 = 0; c0 < r1; c0 += ATT_CB) {
      int cw = r1 - c0 < ATT_CB ? r1 - c0 : ATT_CB;
      dropout_tile(tile, blk, T, rb, c0, cw, r0, h, sample, drop);
      mt_sgemm(MT_BLAS_ROW_MAJOR, MT_BLAS_NO_TRANS, MT_BLAS_NO_TRANS, rb, HS, cw, 1.0f, tile, cw,
               qkv.v + (size_t)c0 * ld, ld, c0 ? 1.0f : 0.0f, ob, ldo);
    }
  }
}

/* A 16-bit qkv's head writes its output in fp32 after the unpacked head,
 * then rounds it into out row by row. */
static void attention_fwd(mt_device *d, void *out, float *lse, float *scratch, const void *qkv,
                          mt_dtype qt, int B, int T, int C, int NH, const mt_dropout *drop,
                          const int32_t *doc_start) {
  if (drop && drop->p == 0.0f) drop = NULL;
  int HS = C / NH;
  size_t blk = att_block_floats(T), slot = att_slot_floats(T, C, NH, qt);
#pragma omp parallel for collapse(2) num_threads(nthreads(d)) schedule(static)
  for (int b = 0; b < B; b++) {
    for (int h = 0; h < NH; h++) {
      float *mine = scratch + slot * omp_get_thread_num();
      size_t off = (size_t)b * T * C + (size_t)h * HS;
      att_head a = att_head_of(mine + 2 * blk, qkv, qt, b, h, T, C, HS);
      float *o = qt == MT_F32 ? (float *)out + off : mine + 2 * blk + (size_t)T * 3 * HS;
      attention_fwd_head(o, qt == MT_F32 ? C : HS, lse + ((size_t)b * NH + h) * T, mine, a, T, HS,
                         h, drop ? drop->sample0 + (uint64_t)b : 0, drop,
                         doc_start ? doc_start + (size_t)b * T : NULL);
      if (qt == MT_F32) continue;
      for (int t = 0; t < T; t++)
        pack_row((uint16_t *)out + off + (size_t)t * C, o + (size_t)t * HS, (size_t)HS,
                 qt == MT_F16);
    }
  }
}

/* Backward of one (b, h) pair, by blocks of query rows. Each block's
 * probabilities P are recomputed into blk from the scores and lse (the
 * forward's exp(s - max) / sum, to an ulp or two). With Pd the dropped
 * probabilities (P itself without dropout) and G = (dout · Vᵀ) ∘ Pd, the
 * softmax backward is dS = G - P ∘ rowsum(G), scaled by 1/sqrt(HS); the
 * block's dS lives in s (ATT_RB rows, ld T, like blk). qkv holds the head
 * (see att_head); dq, dk, dv have row stride ld3 (3C in dqkv, 3 HS in a
 * head's own room), g (dout) row stride C. */
static void attention_bwd_head(float *dq, float *dk, float *dv, int ld3, float *blk, float *s,
                               const float *g, att_head qkv, const float *lse, int T, int C, int HS,
                               int h, uint64_t sample, const mt_dropout *drop, const int32_t *ds) {
  int ld = qkv.ld;
  float scale = 1.0f / sqrtf((float)HS);
  float tile[ATT_RB * ATT_CB];
  for (int r0 = 0; r0 < T; r0 += ATT_RB) {
    int rb = T - r0 < ATT_RB ? T - r0 : ATT_RB, r1 = r0 + rb;
    const float *gb = g + (size_t)r0 * C;
    att_scores(blk, qkv.q, qkv.k, ld, r0, rb, HS, T);
    for (int i = 0; i < rb; i++) {
      int t = r0 + i;
      float *row = blk + (size_t)i * T, l = lse[t];
      int s0 = ds ? ds[t] : 0; /* as the forward: 0 before the document */
#pragma omp simd
      for (int j = s0; j <= t; j++) row[j] = expf(row[j] - l);
      memset(row, 0, (size_t)s0 * sizeof(float));
      memset(row + t + 1, 0, (size_t)(r1 - t - 1) * sizeof(float));
    }
    float rowsum[ATT_RB] = {0};
    int cmax = drop ? ATT_CB : r1;
    for (int c0 = 0; c0 < r1; c0 += cmax) {
      int cw = r1 - c0 < cmax ? r1 - c0 : cmax;
      const float *pd = blk + c0;
      int ldp = T;
      if (drop) {
        dropout_tile(tile, blk, T, rb, c0, cw, r0, h, sample, drop);
        pd = tile;
        ldp = cw;
      }
      // dV[c0:c0+cw] += Pdᵀ · dout[r0:r1]
      mt_sgemm(MT_BLAS_ROW_MAJOR, MT_BLAS_TRANS, MT_BLAS_NO_TRANS, cw, HS, rb, 1.0f, pd, ldp, gb, C,
               1.0f, dv + (size_t)c0 * ld3, ld3);
      // S[r0:r1, c0:c0+cw] = dout[r0:r1] · V[c0:c0+cw]ᵀ
      mt_sgemm(MT_BLAS_ROW_MAJOR, MT_BLAS_NO_TRANS, MT_BLAS_TRANS, rb, cw, HS, 1.0f, gb, C,
               qkv.v + (size_t)c0 * ld, ld, 0.0f, s + c0, T);
      for (int i = 0; i < rb; i++) {
        int t = r0 + i;
        int live = t + 1 - c0 < cw ? t + 1 - c0 : cw;
        if (live < 0) live = 0;
        float *sr = s + (size_t)i * T + c0;
        const float *pr = pd + (size_t)i * ldp;
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int j = 0; j < live; j++) {
          float gg = sr[j] * pr[j];
          sr[j] = gg;
          acc += gg;
        }
        for (int j = live; j < cw; j++) sr[j] = 0.0f;
        rowsum[i] += acc;
      }
    }
    for (int i = 0; i < rb; i++) {
      int t = r0 + i;
      float *sr = s + (size_t)i * T;
      const float *pr = blk + (size_t)i * T;
      float rs = rowsum[i];
#pragma omp simd
      for (int j = 0; j <= t; j++) sr[j] = (sr[j] - pr[j] * rs) * scale;
    }
    // dQ[r0:r1] += dS · K[0:r1];  dK[0:r1] += dSᵀ · Q[r0:r1]
    mt_sgemm(MT_BLAS_ROW_MAJOR, MT_BLAS_NO_TRANS, MT_BLAS_NO_TRANS, rb, HS, r1, 1.0f, s, T, qkv.k,
             ld, 1.0f, dq + (size_t)r0 * ld3, ld3);
    mt_sgemm(MT_BLAS_ROW_MAJOR, MT_BLAS_TRANS, MT_BLAS_NO_TRANS, r1, HS, rb, 1.0f, s, T,
             qkv.q + (size_t)r0 * ld, ld, 1.0f, dk, ld3);
  }
}

/* out is the GPU flash kernel's (see ops.h); the CPU recomputes from qkv
 * and lse alone. A 16-bit dqkv (a 16-bit qkv's scratch has the room): each
 * head's gradient summed from zero in fp32, then rounded into place. */
static void attention_bwd(mt_device *d, void *dqkv, mt_dtype gt, float *scratch, const float *dout,
                          const void *out, const void *qkv, mt_dtype qt, const float *lse, int B,
                          int T, int C, int NH, const mt_dropout *drop, const int32_t *doc_start) {
  (void)out;
  if (drop && drop->p == 0.0f) drop = NULL;
  if (gt != MT_F32 && qt == MT_F32) return; /* no room: ops.h allows it with a 16-bit qkv only */
  int HS = C / NH;
  size_t blk = att_block_floats(T), slot = att_slot_floats(T, C, NH, qt);
#pragma omp parallel for collapse(2) num_threads(nthreads(d)) schedule(static)
  for (int b = 0; b < B; b++) {
    for (int h = 0; h < NH; h++) {
      size_t off = (size_t)b * T * 3 * C + (size_t)h * HS;
      float *mine = scratch + slot * omp_get_thread_num();
      att_head a = att_head_of(mine + 2 * blk, qkv, qt, b, h, T, C, HS);
      float *dq = (float *)dqkv + off, *room = mine + 2 * blk + (size_t)T * 4 * HS;
      int ldd = 3 * C, step = C;
      if (gt != MT_F32) {
        dq = room, ldd = 3 * HS, step = HS;
        memset(room, 0, (size_t)T * 3 * HS * sizeof(float));
      }
      attention_bwd_head(dq, dq + step, dq + 2 * step, ldd, mine, mine + blk,
                         dout + (size_t)b * T * C + (size_t)h * HS, a,
                         lse + ((size_t)b * NH + h) * T, T, C, HS, h,
                         drop ? drop->sample0 + (uint64_t)b : 0, drop,
                         doc_start ? doc_start + (size_t)b * T : NULL);
      if (gt == MT_F32) continue;
      for (int t = 0; t < T; t++) {
        uint16_t *r = (uint16_t *)dqkv + off + (size_t)t * 3 * C;
        const float *g = room + (size_t)t * 3 * HS;
        pack_row(r, g, (size_t)HS, gt == MT_F16);
        pack_row(r + C, g + HS, (size_t)HS, gt == MT_F16);
        pack_row(r + 2 * C, g + 2 * HS, (size_t)HS, gt == MT_F16);
      }
    }
  }
}

/* ---- element-wise ------------------------------------------------------- */

/* Fixed chunks: an element's result must not depend on the thread count
 * (see the libmvec note at the top). */
#define EW_CHUNK 8192

/* As LayerNorm's output: tiles written to the output or packed from the
 * stack, one loop for both (packing inside the GeLU loop kept GCC from
 * vectorising tanhf: twice the time). Tiles start at fixed offsets, so the
 * vector tanhf covers the same elements whatever the thread count. */
static void gelu_fwd(mt_device *d, void *out, mt_dtype ot, const void *inp, mt_dtype it, size_t n) {
#pragma omp parallel for num_threads(nthreads(d)) if (n >= PAR_MIN) schedule(static)
  for (size_t i0 = 0; i0 < n; i0 += PACK_TILE) {
    float tile[PACK_TILE], in[PACK_TILE];
    float *o = ot == MT_F32 ? (float *)out + i0 : tile;
    size_t m = n - i0 < PACK_TILE ? n - i0 : PACK_TILE;
    const float *x = (const float *)inp + i0;
    if (it != MT_F32) {
      unpack_row(in, (const uint16_t *)inp + i0, m, it);
      x = in;
    }
#pragma omp simd
    for (size_t i = 0; i < m; i++) o[i] = mt_gelu(x[i]);
    if (ot != MT_F32) pack_row((uint16_t *)out + i0, tile, m, ot == MT_F16);
  }
}

/* By fixed chunks, one loop for either input type: a 16-bit input is
 * unpacked a chunk at a time onto the stack, and each element takes the
 * same vector lane of the same code as an fp32 one holding its value. */
static void gelu_bwd(mt_device *d, float *dinp, const void *inp, mt_dtype it, const float *dout,
                     size_t n) {
#pragma omp parallel for num_threads(nthreads(d)) if (n >= PAR_MIN) schedule(static)
  for (size_t i0 = 0; i0 < n; i0 += EW_CHUNK) {
    float tile[EW_CHUNK];
    size_t m = n - i0 < EW_CHUNK ? n - i0 : EW_CHUNK;
    const float *x = (const float *)inp + i0;
    if (it != MT_F32) {
      unpack_row(tile, (const uint16_t *)inp + i0, m, it);
      x = tile;
    }
    float *g = dinp + i0;
    const float *y = dout + i0;
#pragma omp simd
    for (size_t i = 0; i < m; i++) g[i] += mt_gelu_grad(x[i]) * y[i];
  }
}

/* No epilogue to fuse into here: the two ops, so the values are theirs bit
 * for bit. */
static void linear_gelu_fwd(mt_device *d, void *out, void *pre, mt_dtype ot, const void *inp,
                            mt_dtype it, const void *w, mt_dtype wt, const void *bias, void *cvt,
                            int N, int C, int OC) {
  linear_fwd(d, pre, ot, inp, it, w, wt, bias, cvt, N, C, OC);
  gelu_fwd(d, out, ot, pre, ot, (size_t)N * OC);
}

/* gelu_bwd into zeroed floats, rounded to 16 bits (pt) by fixed chunks:
 * each value is 0 + gelu'(x)·y, so -0 gives +0 as it does there. */
static void gelu_bwd_packed(mt_device *d, uint16_t *dinp, mt_dtype pt, const void *inp, mt_dtype it,
                            const float *dout, size_t n) {
#pragma omp parallel for num_threads(nthreads(d)) if (n >= PAR_MIN) schedule(static)
  for (size_t i0 = 0; i0 < n; i0 += EW_CHUNK) {
    float tile[EW_CHUNK], in[EW_CHUNK];
    size_t m = n - i0 < EW_CHUNK ? n - i0 : EW_CHUNK;
    const float *x = (const float *)inp + i0;
    if (it != MT_F32) {
      unpack_row(in, (const uint16_t *)inp + i0, m, it);
      x = in;
    }
    const float *y = dout + i0;
#pragma omp simd
    for (size_t i = 0; i < m; i++) {
      float g = 0.0f;
      g += mt_gelu_grad(x[i]) * y[i];
      tile[i] = g;
    }
    pack_row(dinp + i0, tile, m, pt == MT_F16);
  }
}

/* The two ops, each into a zeroed buffer as the model called them before
 * this op existed, so the values are theirs bit for bit; a 16-bit dpre
 * holds them rounded. */
static void linear_bwd_dgelu(mt_device *d, void *dpre, mt_dtype pt, float *scratch, float *dw,
                             float *dbias, const float *dout, const void *inp, mt_dtype it,
                             const void *pre, const void *w, mt_dtype wt, void *cvt, int N, int C,
                             int OC) {
  size_t n = (size_t)N * C;
  memset(scratch, 0, n * sizeof(float));
  linear_bwd(d, scratch, dw, dbias, dout, MT_F32, inp, it, w, wt, cvt, N, C, OC);
  if (pt != MT_F32) {
    gelu_bwd_packed(d, (uint16_t *)dpre, pt, pre, it, scratch, n);
    return;
  }
  memset(dpre, 0, n * sizeof(float));
  gelu_bwd(d, (float *)dpre, pre, it, scratch, n);
}

static void residual_fwd(mt_device *d, float *out, const float *a, const float *b, size_t n) {
#pragma omp parallel for simd num_threads(nthreads(d)) if (n >= PAR_MIN) schedule(static)
  for (size_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

static void add_inplace(mt_device *d, float *dst, const float *src, size_t n) {
#pragma omp parallel for simd num_threads(nthreads(d)) if (n >= PAR_MIN) schedule(static)
  for (size_t i = 0; i < n; i++) dst[i] += src[i];
}

static void scale(mt_device *d, float *x, float s, size_t n) {
#pragma omp parallel for simd num_threads(nthreads(d)) if (n >= PAR_MIN) schedule(static)
  for (size_t i = 0; i < n; i++) x[i] *= s;
}

static void round_half(mt_device *d, float *dst, const float *src, size_t n, int fp16) {
#pragma omp parallel for num_threads(nthreads(d)) if (n >= PAR_MIN) schedule(static)
  for (size_t i = 0; i < n; i++) dst[i] = mt_round_half(src[i], fp16);
}

/* Both in blocks of EW_CHUNK so that each thread runs pack_row's loops */
static void to_half(mt_device *d, uint16_t *dst, const float *src, size_t n, int fp16) {
#pragma omp parallel for num_threads(nthreads(d)) if (n >= PAR_MIN) schedule(static)
  for (size_t i0 = 0; i0 < n; i0 += EW_CHUNK)
    pack_row(dst + i0, src + i0, n - i0 < EW_CHUNK ? n - i0 : EW_CHUNK, fp16);
}

static void pack_half(mt_device *d, uint16_t *dst, float *src, size_t n, int fp16) {
#pragma omp parallel for num_threads(nthreads(d)) if (n >= PAR_MIN) schedule(static)
  for (size_t i0 = 0; i0 < n; i0 += EW_CHUNK) {
    size_t m = n - i0 < EW_CHUNK ? n - i0 : EW_CHUNK;
    pack_row(dst + i0, src + i0, m, fp16);
    unpack_row(src + i0, dst + i0, m, fp16 ? MT_F16 : MT_BF16);
  }
}

static void unpack_half(mt_device *d, float *dst, const uint16_t *src, size_t n, int fp16) {
#pragma omp parallel for num_threads(nthreads(d)) if (n >= PAR_MIN) schedule(static)
  for (size_t i = 0; i < n; i++) dst[i] = mt_half_unpack(src[i], fp16);
}

static int fits_fp16(mt_device *d, const float *x, size_t n) {
  int bad = 0;
#pragma omp parallel for simd num_threads(nthreads(d)) if (n >= PAR_MIN) reduction(| : bad)
  for (size_t i = 0; i < n; i++) bad |= mt_fp16_overflows(x[i]);
  return !bad;
}

/* Partial sums over SUMSQ_PARTS fixed segments, added in order: the result
 * does not depend on the thread count. Sixteen running sums per segment (four
 * AVX2 registers) hide the latency of the additions; one sum would make this
 * latency-bound at half the memory bandwidth. */
#define SUMSQ_PARTS 64
#define SUMSQ_LANES 16

static double sumsq_range(const float *x, size_t n) {
  double lane[SUMSQ_LANES] = {0};
  size_t i = 0;
  for (; i + SUMSQ_LANES <= n; i += SUMSQ_LANES) {
#pragma omp simd
    for (int j = 0; j < SUMSQ_LANES; j++) lane[j] += (double)x[i + j] * (double)x[i + j];
  }
  for (; i < n; i++) lane[0] += (double)x[i] * (double)x[i];
  double acc = 0.0;
  for (int j = 0; j < SUMSQ_LANES; j++) acc += lane[j];
  return acc;
}

static double sumsq(mt_device *d, const float *x, size_t n) {
  double part[SUMSQ_PARTS];
  size_t seg = (n + SUMSQ_PARTS - 1) / SUMSQ_PARTS;
#pragma omp parallel for num_threads(nthreads(d)) if (n >= PAR_MIN) schedule(static)
  for (int k = 0; k < SUMSQ_PARTS; k++) {
    size_t i0 = (size_t)k * seg < n ? (size_t)k * seg : n, i1 = i0 + seg < n ? i0 + seg : n;
    part[k] = sumsq_range(x + i0, i1 - i0);
  }
  double acc = 0.0;
  for (int k = 0; k < SUMSQ_PARTS; k++) acc += part[k];
  return acc;
}

/* sumsq span by span, added in span order: the same bits as the caller's
 * own loop over sumsq (an empty span adds 0 to a sum of squares, so it is
 * passed by, and its pointer never read) */
static double sumsq_multi(mt_device *d, const mt_sumsq_span *s, int count) {
  double acc = 0.0;
  for (int i = 0; i < count; i++)
    if (s[i].n) acc += sumsq(d, s[i].x, s[i].n);
  return acc;
}

/* zeros span by span; a count, so no order to keep */
static int64_t count_zeros(mt_device *d, const mt_sumsq_span *s, int count) {
  int64_t zeros = 0;
  for (int i = 0; i < count; i++) {
    const float *x = s[i].x;
    size_t n = s[i].n;
    int64_t z = 0;
#pragma omp parallel for simd num_threads(nthreads(d)) if (n >= PAR_MIN) reduction(+ : z)
    for (size_t j = 0; j < n; j++) z += x[j] == 0.0f;
    zeros += z;
  }
  return zeros;
}

/* ---- dropout ------------------------------------------------------------ */

#define DROP_CHUNK 4096 /* elements of one sample per loop iteration, a multiple of 4 */

/* out = inp * mask (add NULL) or add + inp * mask (add may be out:
 * accumulate; drop NULL: add + inp) over (B, per_sample), parallel over
 * fixed chunks; with add another array, each chunk of it is copied into out
 * first, while the chunk is in L1. ht MT_BF16 or MT_F16: each chunk of out
 * is then rounded (keep_row), its bits in h unless h is NULL. */
static void dropout_rows(mt_device *d, float *out, uint16_t *h, mt_dtype ht, const float *inp,
                         int B, size_t per_sample, const mt_dropout *drop, const float *add) {
  size_t chunks = (per_sample + DROP_CHUNK - 1) / DROP_CHUNK;
#pragma omp parallel for collapse(2)                                                               \
    num_threads(nthreads(d)) if ((size_t)B * per_sample >= PAR_MIN / 8) schedule(static)
  for (int b = 0; b < B; b++) {
    for (size_t k = 0; k < chunks; k++) {
      size_t e0 = k * DROP_CHUNK, n = per_sample - e0 < DROP_CHUNK ? per_sample - e0 : DROP_CHUNK;
      size_t off = (size_t)b * per_sample + e0;
      if (add && add != out) memcpy(out + off, add + off, n * sizeof(float));
      if (!drop)
        for (size_t j = 0; j < n; j++) out[off + j] += inp[off + j];
      else if (add)
        dropout_apply(out + off, inp + off, n, drop->elem0 + e0, drop->sample0 + (uint64_t)b, drop,
                      1);
      else
        dropout_apply(out + off, inp + off, n, drop->elem0 + e0, drop->sample0 + (uint64_t)b, drop,
                      0);
      if (ht != MT_F32) keep_row(out + off, h ? h + off : NULL, n, ht == MT_F16);
    }
  }
}

static void dropout_fwd(mt_device *d, float *out, const float *inp, int B, size_t per_sample,
                        const mt_dropout *drop) {
  if (!drop || drop->p == 0.0f) {
    if (out != inp) memmove(out, inp, (size_t)B * per_sample * sizeof(float));
    return;
  }
  dropout_rows(d, out, NULL, MT_F32, inp, B, per_sample, drop, NULL);
}

static void dropout_residual_fwd(mt_device *d, float *out, uint16_t *out_h, mt_dtype ht,
                                 const float *resid, const float *branch, int B, size_t per_sample,
                                 const mt_dropout *drop) {
  dropout_rows(d, out, out_h, ht, branch, B, per_sample, drop && drop->p != 0.0f ? drop : NULL,
               resid);
}

static void dropout_bwd(mt_device *d, float *dinp, const float *dout, int B, size_t per_sample,
                        const mt_dropout *drop) {
  if (!drop || drop->p == 0.0f) {
    add_inplace(d, dinp, dout, (size_t)B * per_sample);
    return;
  }
  dropout_rows(d, dinp, NULL, MT_F32, dout, B, per_sample, drop, dinp);
}

/* ---- cross-entropy ------------------------------------------------------ */

/* Forward and backward in one visit of each row (it stays in L2): max, then
 * exp written into dlogits while summing in double, then one scaling pass. */
static void crossentropy(mt_device *d, float *losses, float *dlogits, const float *logits,
                         const int32_t *targets, float dloss, int N, int V, int Vp) {
#pragma omp parallel for num_threads(nthreads(d)) if ((size_t)N * Vp >= PAR_MIN) schedule(static)
  for (int n = 0; n < N; n++) {
    const float *x = logits + (size_t)n * Vp;
    float *dx = dlogits ? dlogits + (size_t)n * Vp : NULL;
    int tg = targets[n];
    if (mt_target_ignored(tg)) { /* masked out: no loss, no gradient */
      if (losses) losses[n] = 0.0f;
      if (dx) memset(dx, 0, (size_t)Vp * sizeof(float));
      continue;
    }
    float xt = x[tg]; /* before dlogits, which may alias logits, overwrites it */
    float mx = -FLT_MAX;
#pragma omp simd reduction(max : mx)
    for (int j = 0; j < V; j++) mx = x[j] > mx ? x[j] : mx;
    double sum = 0.0;
    if (dx) {
#pragma omp simd reduction(+ : sum)
      for (int j = 0; j < V; j++) {
        float e = expf(x[j] - mx);
        dx[j] = e;
        sum += e;
      }
    } else {
#pragma omp simd reduction(+ : sum)
      for (int j = 0; j < V; j++) sum += expf(x[j] - mx);
    }
    if (losses) losses[n] = (float)((double)mx + log(sum) - (double)xt);
    if (dx) {
      float f = (float)((double)dloss / sum);
#pragma omp simd
      for (int j = 0; j < V; j++) dx[j] *= f;
      dx[tg] -= dloss;
      if (Vp > V) memset(dx + V, 0, (size_t)(Vp - V) * sizeof(float));
    }
  }
}

/* ---- optimizer ---------------------------------------------------------- */

static void adamw(mt_device *d, float *param, const float *grad, float *m, float *v, size_t n,
                  float lr, float beta1, float beta2, float eps, float wd, float grad_scale,
                  int t) {
  float bc1 = mt_adamw_bias_correction(beta1, t), bc2 = mt_adamw_bias_correction(beta2, t);
#pragma omp parallel for simd num_threads(nthreads(d)) if (n >= PAR_MIN) schedule(static)
  for (size_t i = 0; i < n; i++)
    param[i] = mt_adamw_update(param[i], grad[i] * grad_scale, &m[i], &v[i], lr, beta1, beta2, eps,
                               wd, bc1, bc2);
}

static void adamw_multi(mt_device *d, const mt_adamw_slice *s, int count, float lr, float beta1,
                        float beta2, float eps, float grad_scale, int t) {
  for (int i = 0; i < count; i++)
    adamw(d, s[i].param, s[i].grad, s[i].m, s[i].v, s[i].n, lr, beta1, beta2, eps, s[i].wd,
          grad_scale, t);
}

/* ---- vocabulary-parallel pieces (tensor parallelism) ---- */

static void embedding_shard_fwd(mt_device *d, float *out, const int32_t *tokens, const void *wte,
                                mt_dtype wt, int v0, int Vl, int N, int C) {
#pragma omp parallel for num_threads(nthreads(d)) if ((size_t)N * C >= PAR_MIN) schedule(static)
  for (int n = 0; n < N; n++) {
    float *o = out + (size_t)n * C; // (C)
    int k = tokens[n] - v0;
    if (k < 0 || k >= Vl) {
      memset(o, 0, (size_t)C * sizeof(float));
      continue;
    }
    if (wt == MT_F32)
      memcpy(o, (const float *)wte + (size_t)k * C, (size_t)C * sizeof(float));
    else
      unpack_row(o, (const uint16_t *)wte + (size_t)k * C, (size_t)C, wt);
  }
}

static void embedding_shard_bwd(mt_device *d, float *dwte, const float *dout, const int32_t *tokens,
                                int v0, int Vl, int N, int C) {
#pragma omp parallel num_threads(nthreads(d)) if ((size_t)N * C >= PAR_MIN)
  {
    size_t c0, c1;
    thread_range((size_t)C, 16, &c0, &c1);
    for (int n = 0; n < N; n++) {
      int k = tokens[n] - v0;
      if (k < 0 || k >= Vl) continue;
      const float *g = dout + (size_t)n * C;
      float *dw = dwte + (size_t)k * C;
#pragma omp simd
      for (size_t c = c0; c < c1; c++) dw[c] += g[c];
    }
  }
}

static void crossentropy_shard_max(mt_device *d, float *rowmax, const float *logits, int N,
                                   int real, int Vl) {
#pragma omp parallel for num_threads(nthreads(d)) if ((size_t)N * Vl >= PAR_MIN) schedule(static)
  for (int n = 0; n < N; n++) {
    const float *x = logits + (size_t)n * Vl;
    float mx = -FLT_MAX;
#pragma omp simd reduction(max : mx)
    for (int j = 0; j < real; j++) mx = x[j] > mx ? x[j] : mx;
    rowmax[n] = mx;
  }
}

static void crossentropy_shard_sum(mt_device *d, float *rowsum, float *xt, const float *logits,
                                   const int32_t *targets, const float *gmax, int N, int real,
                                   int Vl, int v0) {
#pragma omp parallel for num_threads(nthreads(d)) if ((size_t)N * Vl >= PAR_MIN) schedule(static)
  for (int n = 0; n < N; n++) {
    const float *x = logits + (size_t)n * Vl;
    float mx = gmax[n];
    double sum = 0.0;
#pragma omp simd reduction(+ : sum)
    for (int j = 0; j < real; j++) sum += expf(x[j] - mx);
    rowsum[n] = (float)sum;
    int k = targets[n] - v0;
    xt[n] = !mt_target_ignored(targets[n]) && k >= 0 && k < real ? x[k] : 0.0f;
  }
}

static void crossentropy_shard_grad(mt_device *d, float *dlogits, const float *logits,
                                    const int32_t *targets, const float *gmax, const float *gsum,
                                    float dloss, int N, int real, int Vl, int v0) {
#pragma omp parallel for num_threads(nthreads(d)) if ((size_t)N * Vl >= PAR_MIN) schedule(static)
  for (int n = 0; n < N; n++) {
    const float *x = logits + (size_t)n * Vl;
    float *dx = dlogits + (size_t)n * Vl;
    if (mt_target_ignored(targets[n])) {
      memset(dx, 0, (size_t)Vl * sizeof(float));
      continue;
    }
    float mx = gmax[n], f = (float)((double)dloss / (double)gsum[n]);
#pragma omp simd
    for (int j = 0; j < real; j++) dx[j] = expf(x[j] - mx) * f;
    if (Vl > real) memset(dx + real, 0, (size_t)(Vl - real) * sizeof(float));
    int k = targets[n] - v0;
    if (k >= 0 && k < real) dx[k] -= dloss;
  }
}

/* ---- attention of one new position ------------------------------------ */

/* Per head, one pass of the online softmax (FlashAttention's): the running
 * maximum m, the sum l of exp(s - m) and the weighted sum of v in out,
 * rescaled when m grows; out / l at the end. Heads in parallel. */
static void attention_decode(mt_device *d, float *out, const float *qkv, int n, int C, int NH) {
  int HS = C / NH;
  float scale = 1.0f / sqrtf((float)HS);
  const float *q = qkv + (size_t)(n - 1) * 3 * C;
#pragma omp parallel for num_threads(nthreads(d)) if ((size_t)n * C >= PAR_MIN) schedule(static)
  for (int h = 0; h < NH; h++) {
    const float *qh = q + (size_t)h * HS;
    float *o = out + (size_t)h * HS, m = -INFINITY, l = 0.0f;
    for (int i = 0; i < HS; i++) o[i] = 0.0f;
    for (int r = 0; r < n; r++) {
      const float *k = qkv + (size_t)r * 3 * C + C + (size_t)h * HS, *v = k + C;
      float s = 0.0f;
#pragma omp simd reduction(+ : s)
      for (int i = 0; i < HS; i++) s += qh[i] * k[i];
      s *= scale;
      if (s > m) { /* rescale what was summed under the old maximum */
        float f = expf(m - s);
        l *= f;
        for (int i = 0; i < HS; i++) o[i] *= f;
        m = s;
      }
      float p = expf(s - m);
      l += p;
#pragma omp simd
      for (int i = 0; i < HS; i++) o[i] += p * v[i];
    }
    for (int i = 0; i < HS; i++) o[i] /= l;
  }
}

const mt_ops mt_cpu_ops = {
    .name = "cpu",
    .embedding_fwd = embedding_fwd,
    .embedding_bwd = embedding_bwd,
    .layernorm_fwd = layernorm_fwd,
    .layernorm_bwd = layernorm_bwd,
    .linear_scratch = linear_scratch,
    .linear_fwd = linear_fwd,
    .linear_bwd = linear_bwd,
    .linear_gelu_fwd = linear_gelu_fwd,
    .linear_bwd_dgelu = linear_bwd_dgelu,
    .attention_fwd = attention_fwd,
    .attention_bwd = attention_bwd,
    .attention_scratch = attention_scratch,
    .attention_decode = attention_decode,
    .gelu_fwd = gelu_fwd,
    .gelu_bwd = gelu_bwd,
    .residual_fwd = residual_fwd,
    .add_inplace = add_inplace,
    .dropout_fwd = dropout_fwd,
    .dropout_bwd = dropout_bwd,
    .dropout_residual_fwd = dropout_residual_fwd,
    .crossentropy = crossentropy,
    .embedding_shard_fwd = embedding_shard_fwd,
    .embedding_shard_bwd = embedding_shard_bwd,
    .crossentropy_shard_max = crossentropy_shard_max,
    .crossentropy_shard_sum = crossentropy_shard_sum,
    .crossentropy_shard_grad = crossentropy_shard_grad,
    .adamw = adamw,
    .adamw_multi = adamw_multi,
    .sumsq = sumsq,
    .sumsq_multi = sumsq_multi,
    .scale = scale,
    .round_half = round_half,
    .to_half = to_half,
    .pack_half = pack_half,
    .unpack_half = unpack_half,
    .fits_fp16 = fits_fp16,
    .count_zeros = count_zeros,
};
