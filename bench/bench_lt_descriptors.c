/* bench_lt_descriptors — the host cost of building a GEMM's cuBLASLt
 * descriptors on every call, as kernels/cuda/device_cuda.cu's gemm_lt does
 * (only the algorithm is cached): a matmul descriptor with its transposes,
 * epilogue and bias pointer, and the three matrix layouts, created and
 * destroyed. These calls run on the host alone, so this runs on a machine
 * without a GPU. Beside it, the same number of 64-byte malloc/free pairs
 * (the peer: what the descriptors are, at the least), and the figure per
 * step of etc/jobs/gpt3-1.3b-bench.json against that step's GEMM time at
 * the bf16 rate given (790 TFLOP/s: an H200's, measured by PyTorch).
 *
 *   bench_lt_descriptors [--iters N] [--tflops R]
 */
#include <cublasLt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* One GEMM's descriptors, as gemm_lt builds them; 0 on success. */
static int build_and_free(void *bias) {
  cublasLtMatmulDesc_t op = NULL;
  cublasLtMatrixLayout_t l[3] = {NULL, NULL, NULL};
  cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  cublasLtEpilogue_t ep = CUBLASLT_EPILOGUE_BIAS;
  int bad = cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F) != CUBLAS_STATUS_SUCCESS;
  bad |= !op || cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta);
  bad |= !op || cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb);
  bad |= !op || cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE, &ep, sizeof ep);
  bad |= !op ||
         cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias);
  for (int i = 0; i < 3; i++)
    bad |=
        cublasLtMatrixLayoutCreate(&l[i], CUDA_R_16BF, 2048, 8192, 2048) != CUBLAS_STATUS_SUCCESS;
  for (int i = 0; i < 3; i++)
    if (l[i]) cublasLtMatrixLayoutDestroy(l[i]);
  if (op) cublasLtMatmulDescDestroy(op);
  return bad;
}

int main(int argc, char **argv) {
  long iters = 200000;
  double tflops = 790.0;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--iters") && i + 1 < argc)
      iters = atol(argv[++i]);
    else if (!strcmp(argv[i], "--tflops") && i + 1 < argc)
      tflops = atof(argv[++i]);
    else {
      fprintf(stderr, "usage: bench_lt_descriptors [--iters N] [--tflops R]\n");
      return 2;
    }
  }
  if (iters < 1 || tflops <= 0) {
    fprintf(stderr, "bench_lt_descriptors: --iters and --tflops must be positive\n");
    return 2;
  }
  float bias_storage[1];
  for (int i = 0; i < 1000; i++) /* warm-up: the library's first allocations */
    if (build_and_free(bias_storage)) {
      fprintf(stderr, "bench_lt_descriptors: cuBLASLt refused a descriptor\n");
      return 1;
    }
  double best_lt = 1e30, best_peer = 1e30;
  for (int rep = 0; rep < 3; rep++) { /* best of 3: a shared machine */
    double t0 = now_s();
    for (long i = 0; i < iters; i++) build_and_free(bias_storage);
    double lt = (now_s() - t0) / (double)iters;
    t0 = now_s();
    for (long i = 0; i < iters; i++) {
      void *p[4];
      for (int k = 0; k < 4; k++) p[k] = malloc(64);
      for (int k = 0; k < 4; k++) {
        __asm__ volatile("" : : "r"(p[k]) : "memory"); /* kept: the compiler may not drop them */
        free(p[k]);
      }
    }
    double peer = (now_s() - t0) / (double)iters;
    if (lt < best_lt) best_lt = lt;
    if (peer < best_peer) best_peer = peer;
  }
  /* gpt3-1.3b-bench: 24 layers, h 2048, s 2048, 4 micro-batches of 4;
   * a layer's 4 GEMMs forward and 8 backward, the LM head's 3 */
  const double L = 24, h = 2048, V = 50304, tokens = 4.0 * 2048, mbs = 4;
  double gemms = mbs * (L * 12 + 3);
  double flop = 3 * 2 * tokens * (L * 12 * h * h + h * V) * mbs; /* fwd + 2x bwd */
  double gemm_s = flop / (tflops * 1e12);
  printf("cuBLASLt descriptors per GEMM: %.3f us (best of 3 x %ld); 4 malloc/free pairs: %.3f us; "
         "ratio %.2f\n",
         best_lt * 1e6, iters, best_peer * 1e6, best_lt / best_peer);
  printf("gpt3-1.3b-bench step: %.0f GEMMs, %.3f ms of descriptors against %.1f ms of GEMMs at "
         "%.0f TFLOP/s: %.4f%%\n",
         gemms, gemms * best_lt * 1e3, gemm_s * 1e3, tflops, 100 * gemms * best_lt / gemm_s);
  return 0;
}
