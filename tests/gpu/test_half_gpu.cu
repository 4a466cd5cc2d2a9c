/* test_half_gpu.cu — kernels/common/half.h in device code: the same bits as
 * on the host and as CUDA's own round-to-nearest conversions.
 *
 * Inputs: the value of every bf16 and fp16 pattern, the exact midpoints
 * between neighbours (ties) and the floats either side, and a million random
 * float bit patterns (every exponent, NaNs, subnormals). On the GPU each goes
 * through mt_f32_to_bf16/fp16 and through __float2bfloat16_rn/__float2half_rn;
 * every 16-bit pattern also decodes through both. Checks: device half.h ==
 * host half.h, bit for bit; device half.h == the intrinsics (a NaN only has
 * to stay a NaN). One PASS/FAIL line per check; exit 1 on any failure.
 */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "half.h"

__global__ void k_encode(const float *x, uint16_t *ob, uint16_t *oh, uint16_t *ib, uint16_t *ih,
                         size_t n) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x) {
    ob[i] = mt_f32_to_bf16(x[i]).bits;
    oh[i] = mt_f32_to_fp16(x[i]).bits;
    ib[i] = __bfloat16_as_ushort(__float2bfloat16_rn(x[i]));
    ih[i] = __half_as_ushort(__float2half_rn(x[i]));
  }
}

/* pattern p -> float through half.h and through the intrinsics */
__global__ void k_decode(float *ob, float *oh, float *ib, float *ih) {
  unsigned p = blockIdx.x * blockDim.x + threadIdx.x;
  if (p >= 65536) return;
  mt_bf16 b = {(uint16_t)p};
  mt_fp16 h = {(uint16_t)p};
  ob[p] = mt_bf16_to_f32(b);
  oh[p] = mt_fp16_to_f32(h);
  ib[p] = __bfloat162float(__ushort_as_bfloat16((unsigned short)p));
  ih[p] = __half2float(__ushort_as_half((unsigned short)p));
}

static int failed;

#define CK(call)                                                                                   \
  do {                                                                                             \
    cudaError_t e_ = (call);                                                                       \
    if (e_ != cudaSuccess) {                                                                       \
      printf("FAIL %s: %s\n", #call, cudaGetErrorString(e_));                                      \
      exit(1);                                                                                     \
    }                                                                                              \
  } while (0)

static int is_nan_bits(uint16_t b, int fp16) {
  return fp16 ? (b & 0x7C00) == 0x7C00 && (b & 0x3FF) : (b & 0x7F80) == 0x7F80 && (b & 0x7F);
}

static void report(const char *what, size_t bad, size_t n, uint32_t in, uint16_t a, uint16_t b) {
  printf("%s %-52s %zu of %zu differ", bad ? "FAIL" : "PASS", what, bad, n);
  if (bad) printf(" (first: input 0x%08x -> 0x%04x vs 0x%04x)", in, a, b);
  printf("\n");
  failed += bad != 0;
}

static void compare16(const char *what, const float *x, const uint16_t *a, const uint16_t *b,
                      size_t n, int fp16, int nan_as_nan) {
  size_t bad = 0, first = 0;
  for (size_t i = 0; i < n; i++) {
    int same = a[i] == b[i] || (nan_as_nan && is_nan_bits(a[i], fp16) && is_nan_bits(b[i], fp16));
    if (!same && !bad++) first = i;
  }
  report(what, bad, n, bad ? mt_f32_bits(x[first]) : 0, bad ? a[first] : 0, bad ? b[first] : 0);
}

static void compare32(const char *what, const float *a, const float *b, int nan_as_nan) {
  size_t bad = 0, first = 0;
  for (size_t i = 0; i < 65536; i++) {
    int same = mt_f32_bits(a[i]) == mt_f32_bits(b[i]) || (nan_as_nan && isnan(a[i]) && isnan(b[i]));
    if (!same && !bad++) first = i;
  }
  report(what, bad, 65536, (uint32_t)first, 0, 0); /* the input is the pattern */
}

int main(void) {
  int devs = 0;
  if (cudaGetDeviceCount(&devs) != cudaSuccess || !devs) {
    printf("FAIL test_half_gpu: no CUDA device\n");
    return 1;
  }
  /* inputs */
  size_t n = 0, cap = 4 * 65536 * 5 + (1 << 20);
  float *x = (float *)malloc(cap * sizeof(float));
  for (int fp16 = 0; fp16 < 2; fp16++) {
    for (uint32_t p = 0; p < 65536; p++) {
      float v = fp16 ? mt_fp16_to_f32(mt_fp16{(uint16_t)p}) : mt_bf16_to_f32(mt_bf16{(uint16_t)p});
      float w = fp16 ? mt_fp16_to_f32(mt_fp16{(uint16_t)(p + 1)})
                     : mt_bf16_to_f32(mt_bf16{(uint16_t)(p + 1)});
      x[n++] = v;
      if (isfinite(v) && isfinite(w) && (p & 0x7FFF) != 0x7FFF) {
        float m = (float)(((double)v + (double)w) / 2);
        x[n++] = m;
        x[n++] = nextafterf(m, INFINITY);
        x[n++] = nextafterf(m, -INFINITY);
      }
    }
  }
  uint64_t s = 0x9E3779B97F4A7C15ull;
  for (int i = 0; i < (1 << 20) && n < cap; i++) {
    s ^= s << 13, s ^= s >> 7, s ^= s << 17;
    x[n++] = mt_f32_from_bits((uint32_t)s);
  }

  float *dx;
  uint16_t *d16;
  CK(cudaMalloc((void **)&dx, n * sizeof(float)));
  CK(cudaMalloc((void **)&d16, 4 * n * sizeof(uint16_t)));
  CK(cudaMemcpy(dx, x, n * sizeof(float), cudaMemcpyHostToDevice));
  k_encode<<<1024, 256>>>(dx, d16, d16 + n, d16 + 2 * n, d16 + 3 * n, n);
  CK(cudaGetLastError());
  uint16_t *h16 = (uint16_t *)malloc(4 * n * sizeof(uint16_t));
  CK(cudaMemcpy(h16, d16, 4 * n * sizeof(uint16_t), cudaMemcpyDeviceToHost));
  uint16_t *hb = (uint16_t *)malloc(n * sizeof(uint16_t)), *hh = (uint16_t *)malloc(n * 2);
  for (size_t i = 0; i < n; i++) {
    hb[i] = mt_f32_to_bf16(x[i]).bits;
    hh[i] = mt_f32_to_fp16(x[i]).bits;
  }
  printf("test_half_gpu: %zu floats\n", n);
  compare16("float->bf16: device half.h == host half.h", x, h16, hb, n, 0, 0);
  compare16("float->fp16: device half.h == host half.h", x, h16 + n, hh, n, 1, 0);
  compare16("float->bf16: half.h == __float2bfloat16_rn", x, h16, h16 + 2 * n, n, 0, 1);
  compare16("float->fp16: half.h == __float2half_rn", x, h16 + n, h16 + 3 * n, n, 1, 1);

  float *df, *hf = (float *)malloc(4 * 65536 * sizeof(float));
  CK(cudaMalloc((void **)&df, 4 * 65536 * sizeof(float)));
  k_decode<<<256, 256>>>(df, df + 65536, df + 2 * 65536, df + 3 * 65536);
  CK(cudaGetLastError());
  CK(cudaMemcpy(hf, df, 4 * 65536 * sizeof(float), cudaMemcpyDeviceToHost));
  float *host_b = (float *)malloc(65536 * sizeof(float)), *host_h = (float *)malloc(65536 * 4);
  for (uint32_t p = 0; p < 65536; p++) {
    host_b[p] = mt_bf16_to_f32(mt_bf16{(uint16_t)p});
    host_h[p] = mt_fp16_to_f32(mt_fp16{(uint16_t)p});
  }
  compare32("bf16->float: device half.h == host half.h", hf, host_b, 0);
  compare32("fp16->float: device half.h == host half.h", hf + 65536, host_h, 0);
  compare32("bf16->float: half.h == __bfloat162float", hf, hf + 2 * 65536, 1);
  compare32("fp16->float: half.h == __half2float", hf + 65536, hf + 3 * 65536, 1);
  printf("test_half_gpu: %s\n", failed ? "FAILED" : "ok");
  return failed ? 1 : 0;
}
