/* gpu_bench.c — what the CUDA backend achieves on one GPU. Figures, never
 * pass or fail on time (tests/gpu/run tabulates them).
 *
 * 1. The GEMM ceiling it measures itself: cuBLASLt on large squares
 *    (M = N = K = 8192), bf16 in and out with fp32 accumulation (the MFU
 *    denominator), and fp32 in and out computed in bf16 (what fp32 operands
 *    get with MT_MATMUL_BF16: attention's GEMMs, and linear layers whose
 *    weights are fp32).
 * 2. One GPT-3 1.3B transformer layer (hidden 2048, 16 heads, sequence 2048)
 *    forward and backward through d->ops, as model/gpt.c calls them, at
 *    micro-batch 4 and 8; in bf16 with a bf16 working copy of the weight
 *    matrices (to_half from the fp32 master, as a bf16 job keeps them) and
 *    bf16 GEMM inputs (LayerNorm's and GeLU's outputs, the attention output
 *    kept by pack_half), so the linear layers run native bf16 GEMMs and the
 *    forward ones convert nothing; in tf32 with fp32 weights and inputs.
 *    Milliseconds, TFLOP/s by the layer's model FLOPs
 *    72·B·s·h²·(1 + s/6h) (Narayanan et al. without recomputation; causal
 *    attention counted in full, as everyone does), and MFU against the
 *    measured bf16 ceiling. The bf16 layer keeps qkv in bf16, so its
 *    attention runs the flash kernels (flash_cuda.cu).
 * 3. Attention alone, forward and backward: an fp32 qkv (chunked GEMMs)
 *    against a bf16 one (flash kernels); and the flash kernels at MT-NLG
 *    530B's head width (160: one tp rank's 16 heads) against 128.
 * 4. The bf16 layer again at micro-batch 4 with the GeLU epilogues switched
 *    the other way (dev.gelu_epilogue; MTNLG_GELU_EPILOGUE=0 sets it off
 *    for a job): GeLU and its gradient as kernels of their own against
 *    cuBLASLt's GELU_AUX_BIAS and DGELU epilogues.
 * 5. The bf16 layer at micro-batch 4 op by op (an event after each op of
 *    its timed steps in 2.): each op's milliseconds and share of the layer.
 * 6. The layer's MLP backward in a bf16 job with its inner gradient in bf16
 *    (as the model keeps it: the DGELU epilogue, 16-bit operands) beside
 *    fp32 (the unfused path before it), last, after the layer figures.
 * Each figure is also printed as "RESULT key value" for the script.
 *
 * Usage: gpu_bench [--quick]   (--quick: fewer iterations)
 */
#include <cublasLt.h>
#include <cuda_runtime_api.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cuda/cuda_backend.h"
#include "device.h"
#include "err.h"
#include "ops.h"

static mt_device dev;
static int iters = 10;

#define CK(call)                                                                                   \
  do {                                                                                             \
    cudaError_t e_ = (call);                                                                       \
    if (e_ != cudaSuccess) {                                                                       \
      fprintf(stderr, "gpu_bench: %s: %s\n", #call, cudaGetErrorString(e_));                       \
      exit(1);                                                                                     \
    }                                                                                              \
  } while (0)

#define LT(call)                                                                                   \
  do {                                                                                             \
    cublasStatus_t s_ = (call);                                                                    \
    if (s_ != CUBLAS_STATUS_SUCCESS) {                                                             \
      fprintf(stderr, "gpu_bench: %s: %s\n", #call, cublasGetStatusString(s_));                    \
      exit(1);                                                                                     \
    }                                                                                              \
  } while (0)

static void *dmalloc(size_t bytes) {
  void *p = mt_device_alloc(&dev, bytes);
  if (!p) {
    fprintf(stderr, "gpu_bench: %s\n", mt_errmsg());
    exit(1);
  }
  return p;
}

static void sync_or_die(const char *what) {
  if (mt_device_sync(&dev)) {
    fprintf(stderr, "gpu_bench: %s: %s\n", what, mt_errmsg());
    exit(1);
  }
}

/* ---- the GEMM ceiling ----------------------------------------------------- */

static float *rnd(size_t n, float scale, uint64_t *state);
static void *working_copy(const float *w, size_t n, mt_dtype wt);

static double now_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* TFLOP/s of D = Aᵀ·B on n×n matrices of `type` (the TN layout cuBLAS is
 * fastest in), fp32 accumulation in `compute`. The operands are random, as
 * a model's are: constant bits switch less, draw less power and let the
 * clocks run higher, which would make this rate, MFU's denominator, read
 * high. The GPU runs the GEMM for a second first (0.3 s with --quick), so
 * its clocks have settled, and the timed run lasts about half a second. */
static double gemm_rate(int n, cudaDataType_t type, cublasComputeType_t compute) {
  size_t el = type == CUDA_R_16BF ? 2 : 4, bytes = (size_t)n * n * el;
  uint64_t st = 11;
  float *Af = rnd((size_t)n * n, 2.0f, &st), *Bf = rnd((size_t)n * n, 2.0f, &st);
  void *A = Af, *B = Bf, *D = dmalloc(bytes);
  if (type == CUDA_R_16BF) {
    A = working_copy(Af, (size_t)n * n, MT_BF16), B = working_copy(Bf, (size_t)n * n, MT_BF16);
    sync_or_die("GEMM operands");
    mt_device_free(&dev, Af), mt_device_free(&dev, Bf);
  }
  size_t ws_bytes = (size_t)32 << 20;
  void *ws = dmalloc(ws_bytes);
  cublasLtHandle_t lt;
  LT(cublasLtCreate(&lt));
  cublasLtMatmulDesc_t op;
  LT(cublasLtMatmulDescCreate(&op, compute, CUDA_R_32F));
  cublasOperation_t t = CUBLAS_OP_T, nn = CUBLAS_OP_N;
  LT(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &t, sizeof t));
  LT(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &nn, sizeof nn));
  cublasLtMatrixLayout_t l;
  LT(cublasLtMatrixLayoutCreate(&l, type, n, n, n));
  cublasLtMatmulPreference_t pref;
  LT(cublasLtMatmulPreferenceCreate(&pref));
  uint64_t wsb = ws_bytes;
  LT(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsb,
                                          sizeof wsb));
  cublasLtMatmulHeuristicResult_t res;
  int found = 0;
  LT(cublasLtMatmulAlgoGetHeuristic(lt, op, l, l, l, l, pref, 1, &res, &found));
  if (!found) {
    fprintf(stderr, "gpu_bench: no cuBLASLt algorithm for the %d³ GEMM\n", n);
    exit(1);
  }
  float alpha = 1.0f, beta = 0.0f;
  cudaStream_t s = dev.stream;
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  double warm_s = iters >= 10 ? 1.0 : 0.3, t0 = now_s(), per = 0.0;
  int warm = 0;
  do { /* batches of 8, until the clocks have had warm_s */
    for (int i = 0; i < 8; i++, warm++)
      LT(cublasLtMatmul(lt, op, &alpha, A, l, B, l, &beta, D, l, D, l, &res.algo, ws, ws_bytes, s));
    CK(cudaStreamSynchronize(s));
    per = (now_s() - t0) / warm;
  } while (now_s() - t0 < warm_s);
  int reps = (int)(0.5 / per); /* about half a second */
  if (reps < 4 * iters) reps = 4 * iters;
  CK(cudaEventRecord(e0, s));
  for (int i = 0; i < reps; i++)
    LT(cublasLtMatmul(lt, op, &alpha, A, l, B, l, &beta, D, l, D, l, &res.algo, ws, ws_bytes, s));
  CK(cudaEventRecord(e1, s));
  CK(cudaEventSynchronize(e1));
  float ms = 0.0f;
  CK(cudaEventElapsedTime(&ms, e0, e1));
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  cublasLtMatmulPreferenceDestroy(pref);
  cublasLtMatrixLayoutDestroy(l);
  cublasLtMatmulDescDestroy(op);
  cublasLtDestroy(lt);
  mt_device_free(&dev, A), mt_device_free(&dev, B), mt_device_free(&dev, D),
      mt_device_free(&dev, ws);
  return 2.0 * n * (double)n * n * reps / (ms * 1e-3) / 1e12;
}

/* ---- one transformer layer ------------------------------------------------ */

typedef struct {
  int B, T, C, NH;
  /* parameters and their gradients */
  float *ln1w, *ln1b, *qkvw, *qkvb, *projw, *projb, *ln2w, *ln2b, *fcw, *fcb, *fcpw, *fcpb;
  float *g[12];
  /* the weight matrices the linear ops read: the fp32 ones above, or a
   * 16-bit working copy (wt), and the conversion scratch they need */
  mt_dtype wt;
  void *qkvw_h, *projw_h, *fcw_h, *fcpw_h, *cvt;
  void *qkvb_h, *fcb_h; /* the biases of the GEMMs writing wt, stored so */
  /* activations; the linear layers' inputs and outputs (but the branch,
   * joining the fp32 stream) stored as wt, as model/gpt.c keeps them: ln1,
   * qkv, atty, ln2, fch, fchg (fp32-sized, to hold either) */
  float *inp, *m1, *r1, *lse, *branch, *resid2, *m2, *r2, *out;
  void *ln1, *ln2, *fchg, *qkv, *atty, *fch;
  uint16_t *resid2_h, *out_h; /* 16-bit layer: the stream kept, rounded, in wt */
  /* backward */
  float *dres, *dfch, *dfch2, *dbtc, *dbtc2, *dqkv, *att_scratch;
} layer;

static float *rnd(size_t n, float scale, uint64_t *state) {
  float *h = malloc(n * sizeof(float));
  if (!h) exit(1);
  for (size_t i = 0; i < n; i++) {
    *state = *state * 6364136223846793005ull + 1442695040888963407ull;
    h[i] = scale * ((float)(*state >> 40) * (1.0f / 16777216.0f) - 0.5f);
  }
  float *d = dmalloc(n * sizeof(float));
  if (mt_device_memcpy_htod(&dev, d, h, n * sizeof(float))) exit(1);
  free(h);
  return d;
}

/* the working copy of n fp32 weights as stored in wt (the weights themselves for fp32) */
static void *working_copy(const float *w, size_t n, mt_dtype wt) {
  if (wt == MT_F32) return (void *)w;
  uint16_t *h = dmalloc(n * sizeof(uint16_t));
  dev.ops->to_half(&dev, h, w, n, wt == MT_F16);
  return h;
}

/* the largest conversion scratch of the layer's four linear ops, inputs
 * stored as their weights are */
static size_t layer_scratch(int N, int C, mt_dtype wt) {
  const int shapes[4][2] = {{C, 3 * C}, {C, C}, {C, 4 * C}, {4 * C, C}};
  size_t most = 0;
  for (int i = 0; i < 4; i++) {
    size_t b = dev.ops->linear_scratch(&dev, N, shapes[i][0], shapes[i][1], wt, wt);
    if (b > most) most = b;
  }
  return most;
}

/* dev.matmul set first: the conversion scratch depends on it */
static void layer_make(layer *L, int B, int T, int C, int NH, mt_dtype wt) {
  memset(L, 0, sizeof *L);
  L->B = B, L->T = T, L->C = C, L->NH = NH;
  size_t N = (size_t)B * T, NC = N * C, CC = (size_t)C * C;
  uint64_t st = 42;
  L->ln1w = rnd(C, 0.2f, &st), L->ln1b = rnd(C, 0.2f, &st);
  L->qkvw = rnd(3 * CC, 0.04f, &st), L->qkvb = rnd(3 * (size_t)C, 0.02f, &st);
  L->projw = rnd(CC, 0.04f, &st), L->projb = rnd(C, 0.02f, &st);
  L->ln2w = rnd(C, 0.2f, &st), L->ln2b = rnd(C, 0.2f, &st);
  L->fcw = rnd(4 * CC, 0.04f, &st), L->fcb = rnd(4 * (size_t)C, 0.02f, &st);
  L->fcpw = rnd(4 * CC, 0.02f, &st), L->fcpb = rnd(C, 0.02f, &st);
  size_t sizes[12] = {C, C, 3 * CC, 3 * (size_t)C, CC, C, C, C, 4 * CC, 4 * (size_t)C, 4 * CC, C};
  for (int i = 0; i < 12; i++) L->g[i] = dmalloc(sizes[i] * sizeof(float));
  L->inp = rnd(NC, 2.0f, &st);
  L->ln1 = dmalloc(NC * 4), L->m1 = dmalloc(N * 4), L->r1 = dmalloc(N * 4);
  L->qkv = dmalloc(3 * NC * 4), L->atty = dmalloc(NC * 4);
  L->lse = dmalloc((size_t)B * NH * T * 4);
  L->branch = dmalloc(NC * 4), L->resid2 = dmalloc(NC * 4), L->ln2 = dmalloc(NC * 4);
  L->m2 = dmalloc(N * 4), L->r2 = dmalloc(N * 4);
  L->fch = dmalloc(4 * NC * 4), L->fchg = dmalloc(4 * NC * 4), L->out = dmalloc(NC * 4);
  L->dres = dmalloc(NC * 4), L->dfch = dmalloc(4 * NC * 4), L->dfch2 = dmalloc(4 * NC * 4);
  L->dbtc = dmalloc(NC * 4), L->dbtc2 = dmalloc(NC * 4), L->dqkv = dmalloc(3 * NC * 4);
  L->att_scratch = dmalloc(dev.ops->attention_scratch(&dev, T, C, NH, wt) * 4);
  L->wt = wt;
  L->qkvb_h = working_copy(L->qkvb, 3 * (size_t)C, wt),
  L->fcb_h = working_copy(L->fcb, 4 * (size_t)C, wt);
  L->qkvw_h = working_copy(L->qkvw, 3 * CC, wt), L->projw_h = working_copy(L->projw, CC, wt);
  L->fcw_h = working_copy(L->fcw, 4 * CC, wt), L->fcpw_h = working_copy(L->fcpw, 4 * CC, wt);
  if (wt != MT_F32) L->resid2_h = dmalloc(NC * 2), L->out_h = dmalloc(NC * 2);
  size_t cvt = layer_scratch((int)N, C, wt);
  L->cvt = cvt ? dmalloc(cvt) : NULL;
}

static void layer_free(layer *L) {
  float **p[] = {&L->ln1w, &L->ln1b, &L->qkvw,   &L->qkvb,   &L->projw, &L->projb, &L->ln2w,
                 &L->ln2b, &L->fcw,  &L->fcb,    &L->fcpw,   &L->fcpb,  &L->inp,   &L->m1,
                 &L->r1,   &L->lse,  &L->branch, &L->resid2, &L->m2,    &L->r2,    &L->out,
                 &L->dres, &L->dfch, &L->dfch2,  &L->dbtc,   &L->dbtc2, &L->dqkv,  &L->att_scratch};
  if (L->wt != MT_F32) {
    void *h[] = {L->qkvw_h, L->projw_h, L->fcw_h,    L->fcpw_h,
                 L->qkvb_h, L->fcb_h,   L->resid2_h, L->out_h};
    for (int i = 0; i < 8; i++) mt_device_free(&dev, h[i]);
  }
  void *acts[] = {L->ln1, L->ln2, L->fchg, L->atty, L->qkv, L->fch};
  for (int i = 0; i < 6; i++) mt_device_free(&dev, acts[i]);
  mt_device_free(&dev, L->cvt);
  for (size_t i = 0; i < sizeof p / sizeof p[0]; i++) mt_device_free(&dev, *p[i]);
  for (int i = 0; i < 12; i++) mt_device_free(&dev, L->g[i]);
}

/* When set, layer_fwd and layer_bwd record an event on the device's
 * stream after each op (bench_layer's by_op): where a layer's time goes. */
#define LAYER_OPS 24
typedef struct op_marks {
  cudaEvent_t ev[LAYER_OPS + 1]; /* ev[0] before the first op */
  const char *name[LAYER_OPS + 1];
  int n; /* events recorded this run, ev[0] included */
} op_marks;
static op_marks *marks;

static void mark(const char *name) {
  if (!marks || marks->n > LAYER_OPS) return;
  CK(cudaEventRecord(marks->ev[marks->n], dev.stream));
  marks->name[marks->n++] = name;
}

/* model/gpt.c's layer: pre-LN attention block, then the MLP block. In a
 * 16-bit layer the GEMMs' inputs are 16-bit (at = wt), and so are the
 * outputs of all but the two projections, which join the fp32 stream; the
 * branch joins rounding the stream and keeping it in 16 bits, in one pass
 * (no dropout: it is a benchmark of speed). */
static void layer_fwd(layer *L) {
  const mt_ops *o = dev.ops;
  int B = L->B, T = L->T, C = L->C, N = B * T;
  mt_dtype wt = L->wt, at = wt;
  o->layernorm_fwd(&dev, L->ln1, at, L->m1, L->r1, L->inp, L->ln1w, L->ln1b, N, C, 1e-5f);
  mark("fwd layernorm 1");
  o->linear_fwd(&dev, L->qkv, at, L->ln1, at, L->qkvw_h, wt, L->qkvb_h, L->cvt, N, C, 3 * C);
  mark("fwd qkv GEMM");
  o->attention_fwd(&dev, L->atty, L->lse, L->att_scratch, L->qkv, at, B, T, C, L->NH, NULL, NULL);
  mark("fwd attention");
  o->linear_fwd(&dev, L->branch, MT_F32, L->atty, at, L->projw_h, wt, L->projb, L->cvt, N, C, C);
  mark("fwd projection GEMM");
  mt_dtype st = wt == MT_F32 ? MT_F32 : at; /* how the stream is kept */
  o->dropout_residual_fwd(&dev, L->resid2, L->resid2_h, st, L->inp, L->branch, B, T * C, NULL);
  mark("fwd residual 1");
  o->layernorm_fwd(&dev, L->ln2, at, L->m2, L->r2, L->resid2, L->ln2w, L->ln2b, N, C, 1e-5f);
  mark("fwd layernorm 2");
  o->linear_gelu_fwd(&dev, L->fchg, L->fch, at, L->ln2, at, L->fcw_h, wt, L->fcb_h, L->cvt, N, C,
                     4 * C);
  mark("fwd fc GEMM + GeLU");
  o->linear_fwd(&dev, L->branch, MT_F32, L->fchg, at, L->fcpw_h, wt, L->fcpb, L->cvt, N, 4 * C, C);
  mark("fwd fc proj GEMM");
  o->dropout_residual_fwd(&dev, L->out, L->out_h, st, L->resid2, L->branch, B, T * C, NULL);
  mark("fwd residual 2");
}

/* dres holds d(out) on entry and d(inp) on return, as in model/gpt.c */
static void layer_bwd(layer *L) {
  const mt_ops *o = dev.ops;
  int B = L->B, T = L->T, C = L->C, N = B * T;
  size_t NC = (size_t)N * C;
  float **g = L->g;
  mt_dtype wt = L->wt, at = wt;
  o->linear_bwd_dgelu(&dev, L->dfch2, at, L->dfch, g[10], g[11], L->dres, L->fchg, at, L->fch,
                      L->fcpw_h, wt, L->cvt, N, 4 * C, C);
  mark("bwd fc proj GEMMs + dGeLU");
  mt_device_memset0(&dev, L->dbtc2, NC * 4);
  o->linear_bwd(&dev, L->dbtc2, g[8], g[9], L->dfch2, at, L->ln2, at, L->fcw_h, wt, L->cvt, N, C,
                4 * C);
  mark("bwd fc GEMMs (+ zeroing)");
  o->layernorm_bwd(&dev, L->dres, g[6], g[7], L->dbtc2, L->resid2, L->ln2w, L->m2, L->r2, N, C);
  mark("bwd layernorm 2");
  mt_device_memset0(&dev, L->dbtc2, NC * 4);
  o->linear_bwd(&dev, L->dbtc2, g[4], g[5], L->dres, MT_F32, L->atty, at, L->projw_h, wt, L->cvt, N,
                C, C);
  mark("bwd projection GEMMs (+ zeroing)");
  if (at == MT_F32) mt_device_memset0(&dev, L->dqkv, 3 * NC * 4); /* 16-bit: written */
  o->attention_bwd(&dev, L->dqkv, at, L->att_scratch, L->dbtc2, L->atty, L->qkv, at, L->lse, B, T,
                   C, L->NH, NULL, NULL);
  mark("bwd attention");
  mt_device_memset0(&dev, L->dbtc, NC * 4);
  o->linear_bwd(&dev, L->dbtc, g[2], g[3], L->dqkv, at, L->ln1, at, L->qkvw_h, wt, L->cvt, N, C,
                3 * C);
  mark("bwd qkv GEMMs (+ zeroing)");
  o->layernorm_bwd(&dev, L->dres, g[0], g[1], L->dbtc, L->inp, L->ln1w, L->m1, L->r1, N, C);
  mark("bwd layernorm 1");
}

static float elapsed_ms(cudaEvent_t a, cudaEvent_t b) {
  float ms = 0.0f;
  CK(cudaEventElapsedTime(&ms, a, b));
  return ms;
}

/* Milliseconds of one run(arg), the mean of `iters` runs after two warm-up
 * ones, timed by events on the device's stream; what names it if the device
 * fails. */
static double time_ms(void (*run)(void *), void *arg, const char *what) {
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  for (int i = -2; i < iters; i++) {
    if (!i) CK(cudaEventRecord(e0, dev.stream));
    run(arg);
  }
  CK(cudaEventRecord(e1, dev.stream));
  CK(cudaEventSynchronize(e1));
  sync_or_die(what);
  double ms = elapsed_ms(e0, e1) / iters;
  cudaEventDestroy(e0), cudaEventDestroy(e1);
  return ms;
}

/* Frees the device buffers of bufs[0, n) that are not NULL. */
static void free_all(void **bufs, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (bufs[i]) mt_device_free(&dev, bufs[i]);
}

/* Each op's mean milliseconds over the timed runs of bench_layer's by_op
 * (the gap before an op falls to it), printed with its share of the
 * layer, and as RESULT layer_op_<i> "name" ms for the table */
static void print_layer_ops(const op_marks *m, const double *ms, int B) {
  double total = 0.0;
  for (int k = 1; k < m->n; k++) total += ms[k];
  printf("layer bf16 B=%d op by op (%.2f ms in all):\n", B, total);
  for (int k = 1; k < m->n; k++) {
    printf("  %-34s %7.3f ms %5.1f%%\n", m->name[k], ms[k], 100.0 * ms[k] / total);
    printf("RESULT layer_op_%02d \"%s\" %.3f\n", k, m->name[k], ms[k]);
  }
}

/* Times `iters` forward+backward steps after two warm-up ones; prints and
 * returns TFLOP/s. by_op: an event after each op of the timed steps too
 * (17 records, microseconds of a 12 ms layer), and each op's time printed
 * (print_layer_ops). */
static double bench_layer(int B, mt_matmul_precision prec, mt_dtype wt, const char *tag,
                          double ceiling, int by_op) {
  int T = 2048, C = 2048, NH = 16;
  layer L;
  dev.matmul = prec;
  layer_make(&L, B, T, C, NH, wt);
  cudaStream_t s = dev.stream;
  cudaEvent_t e0, e1, e2;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  CK(cudaEventCreate(&e2));
  size_t NC = (size_t)B * T * C;
  for (int i = 0; i < 2; i++) {
    mt_device_memcpy_dtod(&dev, L.dres, L.inp, NC * 4); /* some d(out) */
    layer_fwd(&L);
    layer_bwd(&L);
  }
  sync_or_die("warm-up");
  float fwd = 0.0f, bwd = 0.0f;
  static op_marks m;
  double op_ms[LAYER_OPS + 1] = {0.0};
  for (int i = 0; by_op && i <= LAYER_OPS; i++) CK(cudaEventCreate(&m.ev[i]));
  for (int i = 0; i < iters; i++) {
    mt_device_memcpy_dtod(&dev, L.dres, L.inp, NC * 4);
    CK(cudaEventRecord(e0, s));
    marks = by_op ? &m : NULL, m.n = 0;
    mark("start");
    layer_fwd(&L);
    CK(cudaEventRecord(e1, s));
    layer_bwd(&L);
    marks = NULL;
    CK(cudaEventRecord(e2, s));
    CK(cudaEventSynchronize(e2));
    fwd += elapsed_ms(e0, e1);
    bwd += elapsed_ms(e1, e2);
    for (int k = 1; by_op && k < m.n; k++) op_ms[k] += elapsed_ms(m.ev[k - 1], m.ev[k]) / iters;
  }
  sync_or_die("layer");
  if (by_op) {
    print_layer_ops(&m, op_ms, B);
    for (int i = 0; i <= LAYER_OPS; i++) cudaEventDestroy(m.ev[i]);
  }
  fwd /= iters, bwd /= iters;
  double flops = 72.0 * B * T * (double)C * C * (1.0 + T / (6.0 * C));
  double tflops = flops / ((fwd + bwd) * 1e-3) / 1e12;
  printf("layer %-5s B=%d: fwd %.2f ms, bwd %.2f ms, %.1f TFLOP/s, MFU %.1f%% of the measured "
         "bf16 GEMM\n",
         tag, B, fwd, bwd, tflops, 100.0 * tflops / ceiling);
  printf("RESULT layer_%s_b%d_ms %.3f\n", tag, B, fwd + bwd);
  printf("RESULT layer_%s_b%d_tflops %.2f\n", tag, B, tflops);
  printf("RESULT layer_%s_b%d_mfu %.4f\n", tag, B, tflops / ceiling);
  fflush(stdout);
  cudaEventDestroy(e0), cudaEventDestroy(e1), cudaEventDestroy(e2);
  layer_free(&L);
  dev.matmul = MT_MATMUL_FP32;
  return tflops;
}

/* Milliseconds of one attention forward + backward of a qkv (B,T,3C) of
 * random values stored as qt, NH heads, in bf16 matmul mode: an fp32 qkv
 * takes the chunked cuBLASLt GEMMs around row kernels, a bf16 one the flash
 * kernels (flash_cuda.cu). */
typedef struct attn_run {
  int B, T, C, NH;
  mt_dtype qt;
  void *out, *in, *dqkv;
  float *lse, *scratch, *dout;
  const mt_dropout *drop; /* NULL: none */
} attn_run;

static void attn_step(void *arg) {
  attn_run *a = arg;
  dev.ops->attention_fwd(&dev, a->out, a->lse, a->scratch, a->in, a->qt, a->B, a->T, a->C, a->NH,
                         a->drop, NULL);
  dev.ops->attention_bwd(&dev, a->dqkv, a->qt, a->scratch, a->dout, a->out, a->in, a->qt, a->lse,
                         a->B, a->T, a->C, a->NH, a->drop, NULL);
}

static void attn_fwd_step(void *arg) {
  attn_run *a = arg;
  dev.ops->attention_fwd(&dev, a->out, a->lse, a->scratch, a->in, a->qt, a->B, a->T, a->C, a->NH,
                         a->drop, NULL);
}

/* The flash backward's kernels, timed by the events it records
 * (mt__cuda_flash_bwd_timing) over `iters` forward+backward runs after two
 * warm-up ones: ms[0] k_flash_dot (D, and dO rounded), ms[1] dK/dV, ms[2]
 * dQ, each the mean of a run. */
static void flash_bwd_parts(attn_run *a, double ms[3]) {
  cudaEvent_t ev[4];
  void *evp[4];
  for (int i = 0; i < 4; i++) {
    CK(cudaEventCreate(&ev[i]));
    evp[i] = ev[i];
  }
  ms[0] = ms[1] = ms[2] = 0.0;
  mt__cuda_flash_bwd_timing(&dev, evp);
  for (int i = -2; i < iters; i++) {
    attn_step(a);
    CK(cudaEventSynchronize(ev[3]));
    if (i < 0) continue;
    for (int k = 0; k < 3; k++) ms[k] += elapsed_ms(ev[k], ev[k + 1]) / iters;
  }
  mt__cuda_flash_bwd_timing(&dev, NULL);
  sync_or_die("attention backward, by kernel");
  for (int i = 0; i < 4; i++) cudaEventDestroy(ev[i]);
}

/* The flash forward at 16 and 32 query rows a warp (ms[0], ms[1]), each
 * set for its timing; then back to each shape's timed choice, which
 * *chosen gets (mt__cuda_flash_fwd_rows_of) */
static void flash_fwd_rows_ms(attn_run *a, double ms[2], int *chosen) {
  for (int i = 0; i < 2; i++) {
    mt__cuda_flash_fwd_rows(&dev, i ? 32 : 16);
    ms[i] = time_ms(attn_fwd_step, a,
                    i ? "attention forward, 32 rows a warp" : "attention forward, 16 rows a warp");
  }
  mt__cuda_flash_fwd_rows(&dev, 0);
  *chosen = mt__cuda_flash_fwd_rows_of(&dev, a->C / a->NH, a->qt == MT_F16, a->B, a->T, a->NH,
                                       a->drop != NULL, 0);
}

/* The flash kernels with P and dS in registers (the device's choice where
 * its matrix_a probe allows) and through shared memory, the forward at 16
 * rows a warp (the kernel that changes): ms[0] the forward, ms[1]
 * forward + backward, in registers; ms[2], ms[3] the same through shared
 * memory. All 0 where the registers are not allowed. */
static void flash_p_regs_ms(attn_run *a, double ms[4]) {
  ms[0] = ms[1] = ms[2] = ms[3] = 0.0;
  if (!mt__cuda_flash_p_regs_of(&dev)) return;
  mt__cuda_flash_fwd_rows(&dev, 16);
  for (int smem = 0; smem < 2; smem++) {
    mt__cuda_flash_p_regs(&dev, !smem);
    ms[2 * smem] = time_ms(attn_fwd_step, a,
                           smem ? "attention forward, P through shared memory"
                                : "attention forward, P in registers");
    ms[2 * smem + 1] = time_ms(attn_step, a,
                               smem ? "attention, P and dS through shared memory"
                                    : "attention, P and dS in registers");
  }
  mt__cuda_flash_p_regs(&dev, 1);
  mt__cuda_flash_fwd_rows(&dev, 0);
}

/* fwd_ms: the forward alone, timed apart (NULL: not timed); parts: the
 * flash backward's kernels (a 16-bit qkv; NULL: not timed); rows_ms: the
 * flash forward at 16 and 32 rows a warp, rows_ms[2] the rows its first
 * call timed faster and rows_ms[3] 1 where that kept P in registers (NULL:
 * not timed); regs_ms: flash_p_regs_ms's
 * (NULL: not timed); p_drop: the attention dropout's probability (0:
 * none) */
static double attention_ms(int B, int T, int C, int NH, mt_dtype qt, double *fwd_ms,
                           double parts[3], double rows_ms[4], double regs_ms[4], float p_drop) {
  size_t nq = (size_t)B * T * 3 * C, no = (size_t)B * T * C;
  uint64_t st = 7;
  float *qkv = rnd(nq, 2.0f, &st), *dout = rnd(no, 0.02f, &st);
  float *lse = dmalloc((size_t)B * NH * T * 4), *dqkv = dmalloc(nq * 4);
  void *in = qkv, *out = dmalloc(no * (qt == MT_F32 ? 4 : 2)), *qkv_h = NULL;
  float *scratch = dmalloc(dev.ops->attention_scratch(&dev, T, C, NH, qt) * 4);
  dev.matmul = MT_MATMUL_BF16;
  if (qt != MT_F32) {
    in = qkv_h = dmalloc(nq * 2);
    dev.ops->to_half(&dev, qkv_h, qkv, nq, qt == MT_F16);
  }
  mt_dropout drop = {p_drop, 0x6d746e6c67ULL, 0, 0, 0};
  attn_run a = {B, T, C, NH, qt, out, in, dqkv, lse, scratch, dout, p_drop > 0.0f ? &drop : NULL};
  double ms = time_ms(attn_step, &a, "attention");
  if (fwd_ms) *fwd_ms = time_ms(attn_fwd_step, &a, "attention forward");
  if (parts && qt != MT_F32) flash_bwd_parts(&a, parts);
  if (rows_ms && qt != MT_F32) {
    int chosen = 0;
    flash_fwd_rows_ms(&a, rows_ms, &chosen);
    rows_ms[2] = chosen;
    /* (read before flash_p_regs_ms, whose switching times the shape anew) */
    rows_ms[3] =
        mt__cuda_flash_fwd_p_regs_of(&dev, C / NH, qt == MT_F16, B, T, NH, p_drop > 0.0f, 0);
  }
  if (regs_ms && qt != MT_F32) flash_p_regs_ms(&a, regs_ms);
  void *bufs[] = {qkv, dout, lse, dqkv, out, scratch, qkv_h};
  free_all(bufs, sizeof bufs / sizeof *bufs);
  dev.matmul = MT_MATMUL_FP32;
  return ms;
}

/* causal attention's model FLOPs, forward + backward: half of the 4·B·T²·C
 * of Q·Kᵀ and P·V, forward 1×, backward 2× */
static double attention_flops(int B, int T, int C) { return 3.0 * 2.0 * B * (double)T * T * C; }

/* flash_p_regs_ms's figures, as RESULT <key>_flash_fwd16_regs_ms and the like */
static void print_p_regs(const char *key, const double ms[4]) {
  printf("%s: P and dS in registers %s", key,
         mt__cuda_flash_p_regs_of(&dev) ? "(this GPU's choice)" : "not allowed here");
  if (ms[0] > 0.0)
    printf(": forward at 16 rows %.3f ms against %.3f through shared memory (%.2fx), fwd+bwd "
           "%.3f against %.3f (%.2fx)",
           ms[0], ms[2], ms[2] / ms[0], ms[1], ms[3], ms[3] / ms[1]);
  printf("\n");
  printf("RESULT %s_flash_p_regs %d\n", key, mt__cuda_flash_p_regs_of(&dev));
  printf("RESULT %s_flash_fwd16_regs_ms %.3f\n", key, ms[0]);
  printf("RESULT %s_flash_regs_ms %.3f\n", key, ms[1]);
  printf("RESULT %s_flash_fwd16_smem_ms %.3f\n", key, ms[2]);
  printf("RESULT %s_flash_smem_ms %.3f\n", key, ms[3]);
}

/* A 16-bit qkv's attention path, as MTNLG_ATTENTION names it */
static const char *path_name(int path) {
  return path == MT__CUDA_ATT_CHUNKED ? "chunked" : path == MT__CUDA_ATT_AUTO ? "auto" : "flash";
}

/* The chunked bf16 GEMMs (the path set) in smaller chunks than the
 * scratch budget's (mt__cuda_attention_chunk): their score tensors (at
 * 512 rows × 16 heads of T 2048, 64 MB of fp32 scores, and as much again
 * of their gradient in the backward; 8 to 32 MB each here) may stay in
 * the GPU's L2 cache (50 MB on an H100/H200, 40 MB on an A100) between
 * the GEMM that writes them and the kernels that read them, at the cost
 * of more, smaller launches. Each variant's ms as RESULT
 * attention_chunked16_<rows>x<heads>_ms; the fastest of them and of the
 * budget's (ms_budget) as attention_chunked16_fastest. */
static void chunk_sizes_ms(int B, int T, int C, int NH, double ms_budget) {
  static const int sizes[][2] = {{512, 8}, {512, 4}, {256, 8}, {256, 4}, {128, 4}};
  enum { N = sizeof sizes / sizeof sizes[0] };
  int r0, h0, rows[N], heads[N], best = -1;
  double ms[N], best_ms = ms_budget;
  mt__cuda_attention_chunk_of(&dev, T, NH, C / NH, &r0, &h0);
  for (int i = 0; i < N; i++) {
    mt__cuda_attention_chunk(&dev, sizes[i][0], sizes[i][1]);
    mt__cuda_attention_chunk_of(&dev, T, NH, C / NH, &rows[i], &heads[i]);
    ms[i] = attention_ms(B, T, C, NH, MT_BF16, NULL, NULL, NULL, NULL, 0.0f);
    if (ms[i] < best_ms) best_ms = ms[i], best = i;
  }
  mt__cuda_attention_chunk(&dev, 0, 0);
  printf("attention B=%d, chunked bf16 GEMMs by chunk (rows x heads): %dx%d %.3f ms (the "
         "budget's)",
         B, r0, h0, ms_budget);
  for (int i = 0; i < N; i++) printf(", %dx%d %.3f ms", rows[i], heads[i], ms[i]);
  printf("; fastest %dx%d\n", best < 0 ? r0 : rows[best], best < 0 ? h0 : heads[best]);
  for (int i = 0; i < N; i++)
    printf("RESULT attention_chunked16_%dx%d_ms %.3f\n", rows[i], heads[i], ms[i]);
  printf("RESULT attention_chunked16_budget_chunk %dx%d\n", r0, h0);
  printf("RESULT attention_chunked16_fastest %dx%d\n", best < 0 ? r0 : rows[best],
         best < 0 ? h0 : heads[best]);
  printf("RESULT attention_chunked16_fastest_ms %.3f\n", best_ms);
}

/* Attention alone at the layer's shapes: the fp32 qkv of an fp32 job beside
 * the bf16 qkv of a bf16 job. */
static void bench_attention(int B) {
  int T = 2048, C = 2048, NH = 16;
  double fwd = 0.0, parts[3] = {0.0, 0.0, 0.0}, rows[4] = {0.0, 0.0, 0.0, 0.0}, regs[4],
         chunked = attention_ms(B, T, C, NH, MT_F32, NULL, NULL, NULL, NULL, 0.0f);
  double flash = attention_ms(B, T, C, NH, MT_BF16, &fwd, parts, rows, regs, 0.0f);
  /* with attention dropout 0.1 (GPT-3's and Megatron's default): the
   * Philox draws and the kept-or-dropped products */
  double dropped = attention_ms(B, T, C, NH, MT_BF16, NULL, NULL, NULL, NULL, 0.1f);
  /* the other path of a 16-bit qkv: the same chunks as fp32's with bf16
   * GEMMs (Megatron's unfused attention); then auto (MTNLG_ATTENTION=auto):
   * each pass's first call times both and keeps the faster */
  double g16_fwd = 0.0, auto_fwd = 0.0;
  mt__cuda_attention_path(&dev, MT__CUDA_ATT_CHUNKED);
  double g16 = attention_ms(B, T, C, NH, MT_BF16, &g16_fwd, NULL, NULL, NULL, 0.0f);
  double g16_dropped = attention_ms(B, T, C, NH, MT_BF16, NULL, NULL, NULL, NULL, 0.1f);
  chunk_sizes_ms(B, T, C, NH, g16);
  mt__cuda_attention_path(&dev, MT__CUDA_ATT_AUTO);
  double autom = attention_ms(B, T, C, NH, MT_BF16, &auto_fwd, NULL, NULL, NULL, 0.0f);
  int fwd_path = mt__cuda_attention_path_of(&dev, 0, C / NH, 0, B, T, NH, 0, 0);
  int bwd_path = mt__cuda_attention_path_of(&dev, 1, C / NH, 0, B, T, NH, 0, 0);
  mt__cuda_attention_path(&dev, MT__CUDA_ATT_FLASH);
  printf("attention B=%d, bf16 qkv by chunked bf16 GEMMs: %.2f ms (%.1f TFLOP/s; forward %.2f "
         "ms), %.2fx flash's time; auto %.2f ms (forward %.2f ms), keeping %s forward, %s "
         "backward\n",
         B, g16, attention_flops(B, T, C) / (g16 * 1e-3) / 1e12, g16_fwd, g16 / flash, autom,
         auto_fwd, path_name(fwd_path), path_name(bwd_path));
  printf("RESULT attention_chunked16_ms %.3f\n", g16);
  printf("RESULT attention_chunked16_tflops %.2f\n",
         attention_flops(B, T, C) / (g16 * 1e-3) / 1e12);
  printf("RESULT attention_chunked16_fwd_ms %.3f\n", g16_fwd);
  printf("attention B=%d, chunked bf16 GEMMs with dropout 0.1: %.2f ms, %.2fx the time without\n",
         B, g16_dropped, g16_dropped / g16);
  printf("RESULT attention_chunked16_dropout_ms %.3f\n", g16_dropped);
  printf("RESULT attention_auto_ms %.3f\n", autom);
  printf("RESULT attention_auto_fwd_path %s\n", path_name(fwd_path));
  printf("RESULT attention_auto_bwd_path %s\n", path_name(bwd_path));
  double tflops = attention_flops(B, T, C) / (flash * 1e-3) / 1e12;
  printf("attention B=%d T=%d, fwd+bwd: fp32 qkv (chunked GEMMs) %.2f ms, bf16 qkv (flash) %.2f "
         "ms (%.1f TFLOP/s; forward %.2f ms, %.1f TFLOP/s), %.2fx\n",
         B, T, chunked, flash, tflops, fwd, attention_flops(B, T, C) / 3.0 / (fwd * 1e-3) / 1e12,
         chunked / flash);
  printf("RESULT attention_chunked_ms %.3f\n", chunked);
  printf("RESULT attention_flash_ms %.3f\n", flash);
  printf("RESULT attention_flash_fwd_ms %.3f\n", fwd);
  printf("RESULT attention_flash_tflops %.2f\n", tflops);
  printf("attention B=%d, bf16 qkv (flash) with dropout 0.1: %.2f ms, %.2fx the time without\n", B,
         dropped, dropped / flash);
  printf("RESULT attention_flash_dropout_ms %.3f\n", dropped);
  printf("attention B=%d, flash forward by query rows a warp: 16 %.3f ms, 32 %.3f ms (%.2fx); "
         "the first call's timing chose %d\n",
         B, rows[0], rows[1], rows[0] / rows[1], (int)rows[2]);
  printf("RESULT attention_flash_fwd_rows16_ms %.3f\n", rows[0]);
  printf("RESULT attention_flash_fwd_rows32_ms %.3f\n", rows[1]);
  printf("RESULT attention_flash_fwd_rows_chosen %d\n", (int)rows[2]);
  printf("RESULT attention_flash_fwd_p_regs_chosen %d\n", (int)rows[3]);
  print_p_regs("attention", regs);
  /* the backward's kernels, in the FLOPs they run: over the causal half,
   * dK/dV four products (S, dP, dV, dK), dQ three (S, dP, dQ), each B·T²·C */
  double prod = (double)B * T * T * C, kv_tflops = 4.0 * prod / (parts[1] * 1e-3) / 1e12,
         q_tflops = 3.0 * prod / (parts[2] * 1e-3) / 1e12;
  printf("attention B=%d backward by kernel: D rows and dO in 16 bits %.3f ms, dK/dV %.3f ms "
         "(%.1f TFLOP/s run), dQ %.3f ms (%.1f TFLOP/s run)\n",
         B, parts[0], parts[1], kv_tflops, parts[2], q_tflops);
  printf("RESULT attention_flash_bwd_dot_ms %.3f\n", parts[0]);
  printf("RESULT attention_flash_bwd_kv_ms %.3f\n", parts[1]);
  printf("RESULT attention_flash_bwd_kv_tflops %.2f\n", kv_tflops);
  printf("RESULT attention_flash_bwd_q_ms %.3f\n", parts[2]);
  printf("RESULT attention_flash_bwd_q_tflops %.2f\n", q_tflops);
  fflush(stdout);
}

/* MT-NLG 530B's attention on one tensor rank of 8 (16 of its 128 heads of
 * 160, T 2048, micro-batch 1), which the 160-wide flash kernels take,
 * beside the same heads at 128 wide (GPT-3's width, the 128-wide kernels)
 * in the same run: the head width's cost per FLOP. */
static void bench_flash_widths(void) {
  int T = 2048, NH = 16;
  double rows[4] = {0.0, 0.0, 0.0, 0.0}, regs[4];
  double w160 = attention_flops(1, T, NH * 160) /
                (attention_ms(1, T, NH * 160, NH, MT_BF16, NULL, NULL, rows, regs, 0.0f) * 1e-3) /
                1e12;
  double w128 = attention_flops(1, T, NH * 128) /
                (attention_ms(1, T, NH * 128, NH, MT_BF16, NULL, NULL, NULL, NULL, 0.0f) * 1e-3) /
                1e12;
  mt__cuda_attention_path(&dev, MT__CUDA_ATT_CHUNKED);
  double g160 = attention_flops(1, T, NH * 160) /
                (attention_ms(1, T, NH * 160, NH, MT_BF16, NULL, NULL, NULL, NULL, 0.0f) * 1e-3) /
                1e12;
  mt__cuda_attention_path(&dev, MT__CUDA_ATT_FLASH);
  printf("chunked bf16 GEMMs at head 160, B=1: %.1f TFLOP/s (%.2fx flash's rate)\n", g160,
         g160 / w160);
  printf("RESULT chunked16_hs160_tflops %.2f\n", g160);
  printf("flash attention, 16 heads, T=2048, B=1, fwd+bwd: head 160 (MT-NLG) %.1f TFLOP/s, head "
         "128 %.1f TFLOP/s, %.2fx\n",
         w160, w128, w160 / w128);
  printf("RESULT flash_hs160_tflops %.2f\n", w160);
  printf("RESULT flash_hs128_tflops %.2f\n", w128);
  printf("flash forward at head 160, B=1, by query rows a warp: 16 %.3f ms, 32 %.3f ms (%.2fx); "
         "the first call's timing chose %d\n",
         rows[0], rows[1], rows[0] / rows[1], (int)rows[2]);
  printf("RESULT flash_hs160_fwd_rows16_ms %.3f\n", rows[0]);
  printf("RESULT flash_hs160_fwd_rows32_ms %.3f\n", rows[1]);
  printf("RESULT flash_hs160_fwd_rows_chosen %d\n", (int)rows[2]);
  printf("RESULT flash_hs160_fwd_p_regs_chosen %d\n", (int)rows[3]);
  print_p_regs("hs160", regs);
  /* the blocks an SM holds: the backward at 160 is sized for two on an
   * H100/H200 (kernels/cuda/flash_cuda.cu, bwd_smem) */
  for (int hs = 160; hs >= 128; hs -= 32) {
    int b[4];
    if (mt__cuda_flash_blocks_per_sm(&dev, hs, 0, b)) {
      printf("flash blocks per SM, head %d: %s\n", hs, mt_errmsg());
      continue;
    }
    printf("flash blocks per SM, head %d, bf16: forward %d (32 rows a warp: %d), dK/dV %d, dQ %d\n",
           hs, b[0], b[3], b[1], b[2]);
    printf("RESULT flash_hs%d_blocks_per_sm %d/%d/%d\n", hs, b[0], b[1], b[2]);
    printf("RESULT flash_hs%d_fwd32_blocks_per_sm %d\n", hs, b[3]);
  }
  fflush(stdout);
}

/* Milliseconds of the MLP's backward at the layer's shapes in a bf16 job
 * (c_proj's linear_bwd_dgelu, then c_fc's linear_bwd reading its dpre),
 * dpre stored as gt: bf16, as the model keeps it (the DGELU epilogue, two
 * 16-bit GEMMs for c_fc), or fp32, the unfused path it took before (fp32
 * scratch, GeLU-gradient kernel, dpre rounded again for c_fc's GEMMs). */
typedef struct mlp_run {
  int N, C;
  mt_dtype gt;
  void *dpre;
  float *scratch, *dwp, *dbp, *dout;
  void *gelu_h, *pre_h, *fcpw_h;
  float *dx, *dwf, *dbf;
  void *x_h, *fcw_h, *cvt;
} mlp_run;

static void mlp_step(void *arg) {
  mlp_run *m = arg;
  mt_dtype wt = MT_BF16;
  int N = m->N, C = m->C;
  dev.ops->linear_bwd_dgelu(&dev, m->dpre, m->gt, m->scratch, m->dwp, m->dbp, m->dout, m->gelu_h,
                            wt, m->pre_h, m->fcpw_h, wt, m->cvt, N, 4 * C, C);
  dev.ops->linear_bwd(&dev, m->dx, m->dwf, m->dbf, m->dpre, m->gt, m->x_h, wt, m->fcw_h, wt, m->cvt,
                      N, C, 4 * C);
}

static double mlp_bwd_ms(int B, mt_dtype gt) {
  int T = 2048, C = 2048, N = B * T;
  size_t NC = (size_t)N * C, NF = 4 * NC, CC4 = 4 * (size_t)C * C;
  mt_dtype wt = MT_BF16;
  uint64_t st = 11;
  dev.matmul = MT_MATMUL_BF16;
  float *fcw = rnd(CC4, 0.04f, &st), *fcpw = rnd(CC4, 0.02f, &st), *x = rnd(NC, 2.0f, &st);
  float *pre = rnd(NF, 4.0f, &st), *dout = rnd(NC, 0.02f, &st);
  void *fcw_h = working_copy(fcw, CC4, wt), *fcpw_h = working_copy(fcpw, CC4, wt);
  void *x_h = working_copy(x, NC, wt), *pre_h = working_copy(pre, NF, wt);
  void *gelu_h = dmalloc(NF * 2), *dpre = dmalloc(NF * 4);
  dev.ops->gelu_fwd(&dev, gelu_h, wt, pre_h, wt, NF);
  float *dwp = dmalloc(CC4 * 4), *dbp = dmalloc(C * 4), *dwf = dmalloc(CC4 * 4);
  float *dbf = dmalloc(4 * (size_t)C * 4), *dx = dmalloc(NC * 4), *scratch = dmalloc(NF * 4);
  size_t cb = dev.ops->linear_scratch(&dev, N, C, 4 * C, wt, wt);
  size_t cb2 = dev.ops->linear_scratch(&dev, N, 4 * C, C, wt, wt);
  void *cvt = dmalloc(cb > cb2 ? cb : cb2);
  mlp_run m = {N,     C,      gt, dpre, scratch, dwp, dbp,   dout, gelu_h,
               pre_h, fcpw_h, dx, dwf,  dbf,     x_h, fcw_h, cvt};
  double ms = time_ms(mlp_step, &m, "mlp backward");
  void *bufs[] = {fcw,    fcpw, x,   pre, dout, fcw_h, fcpw_h, x_h,     pre_h,
                  gelu_h, dpre, dwp, dbp, dwf,  dbf,   dx,     scratch, cvt};
  free_all(bufs, sizeof bufs / sizeof *bufs);
  dev.matmul = MT_MATMUL_FP32;
  return ms;
}

/* The MLP's backward with its inner gradient in bf16 beside fp32, in the
 * same run: what keeping it in 16 bits saves. */
static void bench_mlp_grad(int B) {
  double f32 = mlp_bwd_ms(B, MT_F32), b16 = mlp_bwd_ms(B, MT_BF16);
  double tflops = 4 * 2.0 * B * 2048.0 * 2048.0 * 8192.0 / (b16 * 1e-3) / 1e12;
  printf("MLP backward B=%d (bf16 job): inner gradient fp32 %.2f ms, bf16 %.2f ms (%.1f TFLOP/s), "
         "%.2fx\n",
         B, f32, b16, tflops, f32 / b16);
  printf("RESULT mlp_bwd_f32grad_ms %.3f\n", f32);
  printf("RESULT mlp_bwd_bf16grad_ms %.3f\n", b16);
  printf("RESULT mlp_bwd_bf16grad_tflops %.2f\n", tflops);
  fflush(stdout);
}

/* LayerNorm's backward at the layer's shapes (fp32 stream, as the model
 * runs it): the bytes it moves (dinp read and written, dout and the input
 * read twice: 24 a value) against a device-to-device copy of as many bytes
 * in the same run, the memory-bound ceiling; its dw/db pass is the column
 * reduction cut into groups of rows. */
typedef struct ln_run {
  int N, C;
  float *x, *dout, *dx, *w, *dw, *db, *mean, *rstd;
  void *src, *dst;
  size_t half;
} ln_run;

static void ln_step(void *arg) {
  ln_run *r = arg;
  dev.ops->layernorm_bwd(&dev, r->dx, r->dw, r->db, r->dout, r->x, r->w, r->mean, r->rstd, r->N,
                         r->C);
}

static void copy_step(void *arg) {
  ln_run *r = arg;
  CK(cudaMemcpyAsync(r->dst, r->src, r->half, cudaMemcpyDeviceToDevice, dev.stream));
}

static void bench_layernorm_bwd(int B) {
  int N = B * 2048, C = 2048;
  size_t NC = (size_t)N * C;
  uint64_t st = 13;
  float *x = rnd(NC, 2.0f, &st), *dout = rnd(NC, 0.02f, &st), *dx = rnd(NC, 0.02f, &st);
  float *w = rnd(C, 1.0f, &st), *b = rnd(C, 0.1f, &st), *dw = dmalloc(C * 4), *db = dmalloc(C * 4);
  float *mean = dmalloc(N * 4), *rstd = dmalloc(N * 4), *ln = dmalloc(NC * 4);
  dev.ops->layernorm_fwd(&dev, ln, MT_F32, mean, rstd, x, w, b, N, C, 1e-5f);
  size_t bytes = 24 * NC, half = bytes / 2; /* the copy reads half, writes half */
  ln_run r = {N, C, x, dout, dx, w, dw, db, mean, rstd, dmalloc(half), dmalloc(half), half};
  double ln_ms = time_ms(ln_step, &r, "layernorm backward");
  double copy_ms = time_ms(copy_step, &r, "device copy");
  double gbs = bytes / (ln_ms * 1e-3) / 1e9, copy_gbs = bytes / (copy_ms * 1e-3) / 1e9;
  printf("LayerNorm backward B=%d (N %d, C %d): %.3f ms, %.0f GB/s; a copy of the same bytes "
         "%.3f ms, %.0f GB/s; %.2f of it\n",
         B, N, C, ln_ms, gbs, copy_ms, copy_gbs, gbs / copy_gbs);
  printf("RESULT layernorm_bwd_ms %.3f\n", ln_ms);
  printf("RESULT layernorm_bwd_gbs %.0f\n", gbs);
  printf("RESULT copy_gbs %.0f\n", copy_gbs);
  fflush(stdout);
  void *bufs[] = {x, dout, dx, w, b, dw, db, mean, rstd, ln, r.src, r.dst};
  free_all(bufs, sizeof bufs / sizeof *bufs);
}

int main(int argc, char **argv) {
  if (argc > 1 && !strcmp(argv[1], "--quick")) iters = 3;
  if (mt_device_open(&dev, "cuda:0")) {
    fprintf(stderr, "gpu_bench: %s\n", mt_errmsg());
    return 1;
  }
  struct cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  printf("gpu_bench: %s, %d SMs, %.0f GiB\n", prop.name, prop.multiProcessorCount,
         prop.totalGlobalMem / 1073741824.0);
  printf("RESULT gpu \"%s\"\n", prop.name);

  double bf16 = gemm_rate(8192, CUDA_R_16BF, CUBLAS_COMPUTE_32F);
  printf("GEMM 8192³ bf16 in/out, fp32 accumulation: %.1f TFLOP/s (the MFU denominator)\n", bf16);
  printf("RESULT gemm_bf16_tflops %.2f\n", bf16);
  double f32 = gemm_rate(8192, CUDA_R_32F, CUBLAS_COMPUTE_32F_FAST_16BF);
  printf("GEMM 8192³ fp32 in/out, bf16 compute: %.1f TFLOP/s (the ops' GEMMs in bf16 mode)\n", f32);
  printf("RESULT gemm_f32io_bf16_tflops %.2f\n", f32);
  /* whether P and dS go from their score fragments to their products in
   * registers (a bf16 matrix_a fragment laid out as the accumulator: the
   * device's probe when it opened decides) */
  int a_misplaced = -1;
  if (mt__cuda_a_layout_check(&dev, &a_misplaced))
    printf("wmma bf16 matrix_a layout: %s\n", mt_errmsg());
  else
    printf("wmma bf16 matrix_a fragment: %d of 256 elements away from mma.m16n8k16's A places\n",
           a_misplaced);
  printf("RESULT wmma_a_bf16_misplaced %d\n", a_misplaced);
  fflush(stdout);

  /* the flash kernels' figures with the flash path set; the layers as
   * mtnlgd runs them (MTNLG_ATTENTION, by default flash) */
  int att_path = mt__cuda_attention_path_mode(&dev);
  mt__cuda_attention_path(&dev, MT__CUDA_ATT_FLASH);
  bench_attention(4);
  bench_flash_widths();
  mt__cuda_attention_path(&dev, att_path);
  bench_layer(4, MT_MATMUL_BF16, MT_BF16, "bf16", bf16, 1);
  bench_layer(8, MT_MATMUL_BF16, MT_BF16, "bf16", bf16, 0);
  bench_layer(4, MT_MATMUL_TF32, MT_F32, "tf32", bf16, 0);
  /* GeLU and its gradient as kernels of their own (MTNLG_GELU_EPILOGUE=0)
   * beside cuBLASLt's epilogues above: which is faster depends on the GPU */
  int epilogue = dev.gelu_epilogue;
  dev.gelu_epilogue = !epilogue;
  bench_layer(4, MT_MATMUL_BF16, MT_BF16, epilogue ? "bf16_gelu_kernels" : "bf16_gelu_epilogue",
              bf16, 0);
  dev.gelu_epilogue = epilogue;
  bench_mlp_grad(4);
  bench_layernorm_bwd(4);
  mt_device_close(&dev);
  return 0;
}
