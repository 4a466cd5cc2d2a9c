/* device_cuda.cu — "cuda:N" devices: streams, memory, errors, and the GEMM
 * every op uses (cuBLASLt, with cuBLAS as the fallback).
 *
 * Never links libcuda: the runtime (cudart) loads the driver itself, so a
 * machine without one gets 0 devices, not a program that fails to start.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_backend.h"
#include "cuda_impl.h"
#include "half.h"
#ifndef MT_CUDA_EMU /* the emulator defines cuBLAS itself */
#include "blas_lazy.h"
#endif

extern "C" {
#include "err.h"
#include "log.h"
}

int mt__cuda_count(char *why, size_t why_len) {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (why && why_len) why[0] = 0;
  if (e != cudaSuccess) { /* no driver (35), no device (100), ...: 0 devices, with the reason */
    if (why && why_len)
      snprintf(why, why_len, "%s (%s)", cudaGetErrorString(e), cudaGetErrorName(e));
    cudaGetLastError();
    return 0;
  }
  return n;
}

int mt__cuda_memory(int index, size_t *total, size_t *free_bytes) {
  cudaError_t e = cudaSetDevice(index);
  if (e == cudaSuccess) e = cudaMemGetInfo(free_bytes, total);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return mt_seterr(MT_EIO, "device cuda:%d: memory: %s", index, cudaGetErrorString(e));
  }
  return 0;
}

/* A fault that corrupts the context (an illegal address, a faulting
 * kernel, an uncorrectable ECC error) makes every later call answer it,
 * where any other error is told once: two queries in a row that fail mean
 * the device is lost to this process. A query, not a sync: the caller (the
 * daemon's event loop) must not wait on a kernel that never ends. */
int mt__cuda_lost(int index, char *why, size_t why_len) {
  cudaError_t e = cudaSetDevice(index);
  if (e == cudaSuccess && (e = cudaStreamQuery(0)) != cudaSuccess) {
    cudaGetLastError();
    e = cudaStreamQuery(0);
  }
  if (e == cudaSuccess || e == cudaErrorNotReady) return 0;
  cudaGetLastError();
  snprintf(why, why_len, "%s (%s)", cudaGetErrorString(e), cudaGetErrorName(e));
  return 1;
}

mt__cuda *mt__cuda_enter(mt_device *d) {
  mt__cuda *c = mt__cuda_of(d);
  cudaSetDevice(c->index); /* per host thread; a failure shows in the call that follows */
  return c;
}

void mt__cuda_fail(mt_device *d, const char *what, const char *detail) {
  mt__cuda *c = mt__cuda_of(d);
  if (c->err) return;
  c->err = MT_EIO;
  snprintf(c->errmsg, sizeof c->errmsg, "device %s: %s: %s", d->name, what, detail);
}

void mt__cuda_check(mt_device *d, const char *what) {
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) mt__cuda_fail(d, what, cudaGetErrorString(e));
}

void mt__cuda_close(mt_device *d) {
  mt__cuda *c = mt__cuda_of(d);
  if (!c) return;
  cudaSetDevice(c->index);
  if (c->stream) cudaStreamSynchronize(c->stream);
  if (c->lt) cublasLtDestroy(c->lt);
  if (c->blas) cublasDestroy(c->blas);
  cudaFree(c->ws);
  cudaFree(c->red);
  cudaFree(c->red_multi);
  cudaFree(c->cols);
  cudaFree(c->att16_buf);
  if (c->stream) cudaStreamDestroy(c->stream);
  cudaGetLastError();
  free(c);
  d->impl = NULL;
  d->stream = NULL;
}

/* Blocking streams (not cudaStreamNonBlocking): work that other code queues
 * on the legacy default stream (cudaMemcpy, a library's memset) stays
 * ordered with ours. */

/* One of flash_cuda.cu's layout probes on d, when it opens: *layout 1
 * where no element is misplaced, -1 where some are. A probe that cannot
 * run closes d and returns MT_EIO, the reason set. */
static int layout_at_open(mt_device *d, int (*check)(mt_device *, int *), int *layout) {
  int misplaced = 0;
  if (check(d, &misplaced)) {
    char why[256];
    snprintf(why, sizeof why, "%s", mt_errmsg());
    mt__cuda_close(d);
    return mt_seterr(MT_EIO, "%s (the first kernels a GPU runs when it opens)", why);
  }
  *layout = misplaced ? -1 : 1;
  return 0;
}
/* The attention paths by the names MTNLG_ATTENTION and the job's
 * model.attention_backend give them (-1: none), and how the log says them */
static int att_path_named(const char *name) {
  return !strcmp(name, "flash")     ? MT__CUDA_ATT_FLASH
         : !strcmp(name, "chunked") ? MT__CUDA_ATT_CHUNKED
         : !strcmp(name, "auto")    ? MT__CUDA_ATT_AUTO
                                    : -1;
}

static const char *att_path_words(int path) {
  return path == MT__CUDA_ATT_FLASH     ? "by the flash kernels"
         : path == MT__CUDA_ATT_CHUNKED ? "by chunked 16-bit GEMMs"
                                        : "by the flash kernels or chunked 16-bit GEMMs, each "
                                          "shape's first call timing both";
}

int mt__cuda_open(mt_device *d, int index) {
  const char *ge = getenv("MTNLG_GELU_EPILOGUE");
  if (ge && strcmp(ge, "0") && strcmp(ge, "1"))
    return mt_seterr(MT_EINVAL,
                     "device %s: MTNLG_GELU_EPILOGUE=\"%s\": 0 (GeLU and its gradient as "
                     "kernels of their own) or 1 (in cuBLASLt's epilogues, the default)",
                     d->name, ge);
  const char *fr = getenv("MTNLG_FLASH_FWD_ROWS");
  int flash_rows = !fr || !strcmp(fr, "auto") ? 0
                   : !strcmp(fr, "16")        ? 16
                   : !strcmp(fr, "32")        ? 32
                                              : -1;
  if (flash_rows < 0)
    return mt_seterr(MT_EINVAL,
                     "device %s: MTNLG_FLASH_FWD_ROWS=\"%s\": 16 or 32 (query rows a warp of the "
                     "flash forward), or auto (each shape's first call times both, the default)",
                     d->name, fr);
  const char *ap = getenv("MTNLG_ATTENTION");
  int att_path = att_path_named(ap ? ap : "flash");
  if (att_path < 0)
    return mt_seterr(MT_EINVAL,
                     "device %s: MTNLG_ATTENTION=\"%s\": flash (the fused kernels, the "
                     "default), chunked (16-bit GEMMs around row kernels) or auto (each shape's "
                     "first call times both and keeps the faster), for a bf16 or fp16 job's "
                     "attention",
                     d->name, ap);
  /* the chunked path's chunks at most ROWSxHEADS (mt__cuda_attention_chunk) */
  const char *ac = getenv("MTNLG_ATTENTION_CHUNK");
  int chunk_rows = 0, chunk_heads = 0, chunk_end = 0;
  if (ac && (sscanf(ac, "%dx%d%n", &chunk_rows, &chunk_heads, &chunk_end) != 2 || ac[chunk_end] ||
             chunk_rows < 1 || chunk_heads < 1))
    return mt_seterr(MT_EINVAL,
                     "device %s: MTNLG_ATTENTION_CHUNK=\"%s\": ROWSxHEADS, two positive counts "
                     "(e.g. 256x8): the most query rows and heads a chunk of the chunked "
                     "attention path takes",
                     d->name, ac);
#ifndef MT_CUDA_EMU
  if (mt__cuda_blas_load()) return mt_wraperr(MT_EIO, "device %s", d->name); /* before any call */
#endif
  mt__cuda *c = (mt__cuda *)calloc(1, sizeof *c);
  if (!c) return mt_seterr(MT_ENOMEM, "device %s: out of memory", d->name);
  c->index = index;
  d->impl = c;
  const char *step = NULL, *detail = NULL;
  cudaError_t e;
  cublasStatus_t st;
#define TRY_CUDA(call, what)                                                                       \
  if ((e = (call)) != cudaSuccess) {                                                               \
    step = what, detail = cudaGetErrorString(e);                                                   \
    goto fail;                                                                                     \
  }
#define TRY_BLAS(call, what)                                                                       \
  if ((st = (call)) != CUBLAS_STATUS_SUCCESS) {                                                    \
    step = what, detail = cublasGetStatusString(st);                                               \
    goto fail;                                                                                     \
  }
  TRY_CUDA(cudaSetDevice(index), "cudaSetDevice");
  TRY_CUDA(cudaStreamCreate(&c->stream), "create the compute stream");
  TRY_CUDA(cudaMalloc(&c->ws, MT_CUDA_GEMM_WS_BYTES), "allocate the GEMM workspace");
  TRY_CUDA(cudaMalloc((void **)&c->red, (MT_CUDA_RED_BLOCKS + 1) * sizeof(double)),
           "allocate the reduction buffer");
  TRY_CUDA(cudaMalloc((void **)&c->red_multi, (MT_CUDA_RED_PARTS + 1) * sizeof(double)),
           "allocate the multi-span reduction buffer");
  TRY_CUDA(cudaMalloc((void **)&c->cols, MT_CUDA_COL_FLOATS * sizeof(float)),
           "allocate the column reductions' buffer");
  TRY_BLAS(cublasLtCreate(&c->lt), "cublasLtCreate");
  TRY_BLAS(cublasCreate(&c->blas), "cublasCreate");
  TRY_BLAS(cublasSetStream(c->blas, c->stream), "cublasSetStream");
  TRY_BLAS(cublasSetWorkspace(c->blas, c->ws, MT_CUDA_GEMM_WS_BYTES), "cublasSetWorkspace");
  d->stream = c->stream;
  d->matmul = MT_MATMUL_FP32;
  d->ops = &mt_cuda_ops;
  d->gelu_epilogue = !ge || ge[0] == '1';
  c->flash_fwd_rows = flash_rows;
  c->att_path = att_path;
  mt__cuda_attention_chunk(d, chunk_rows, chunk_heads); /* both checked positive above */
  if (ac)
    mt_log_info("device %s: chunked attention in chunks of at most %d rows and %d heads "
                "(MTNLG_ATTENTION_CHUNK)",
                d->name, chunk_rows, chunk_heads);
  if (att_path != MT__CUDA_ATT_FLASH)
    mt_log_info("device %s: a 16-bit qkv's attention %s (MTNLG_ATTENTION=%s)", d->name,
                att_path_words(att_path), ap);
  if (cudaDeviceGetAttribute(&c->sms, cudaDevAttrMultiProcessorCount, index) != cudaSuccess ||
      c->sms < 1)
    c->sms = 1;
  if (cudaDeviceGetAttribute(&c->smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, index) !=
          cudaSuccess ||
      c->smem_optin < 48 * 1024)
    c->smem_optin = 48 * 1024;
  /* the flash kernels' fragment layouts (flash_cuda.cu), read now rather
   * than at the first attention, mid-step: the accumulator's, which they
   * assume, and a bf16 A fragment's, which decides whether P and dS pass
   * to their products in registers; a GPU that cannot run these kernels
   * runs none of them */
  if (layout_at_open(d, mt__cuda_acc_layout_check, &c->acc_layout) ||
      layout_at_open(d, mt__cuda_a_layout_check, &c->a_layout))
    return MT_EIO;
  c->flash_p_regs = c->a_layout > 0;
  mt_log_debug("device %s: bf16 matrix_a fragment %s the accumulator: the flash kernels' P and "
               "dS through %s",
               d->name, c->a_layout > 0 ? "laid out as" : "not laid out as",
               c->a_layout > 0 ? "registers" : "shared memory");
  mt_log_debug("device %s: %d SMs, compute stream %p", d->name, c->sms, (void *)c->stream);
  return 0;
fail:
  mt__cuda_close(d);
  return mt_seterr(MT_EIO, "device %s: %s: %s", d->name, step, detail);
#undef TRY_CUDA
#undef TRY_BLAS
}

void *mt__cuda_alloc(mt_device *d, size_t bytes) {
  mt__cuda *c = mt__cuda_enter(d);
  void *p = NULL;
  cudaError_t e = cudaMalloc(&p, bytes ? bytes : 256);
  if (e != cudaSuccess) {
    cudaGetLastError();
    mt_seterr(MT_ENOMEM, "device %s: cannot allocate %zu bytes: %s", d->name, bytes,
              cudaGetErrorString(e));
    return NULL;
  }
  if (bytes && (e = cudaMemsetAsync(p, 0, bytes, c->stream)) != cudaSuccess) {
    cudaGetLastError(); /* handled here: not the next launch's error */
    cudaFree(p);
    mt_seterr(MT_EIO, "device %s: zero %zu new bytes: %s", d->name, bytes, cudaGetErrorString(e));
    return NULL;
  }
  return p;
}

void mt__cuda_free(mt_device *d, void *p) {
  if (!p) return;
  mt__cuda_enter(d);
  cudaFree(p); /* waits for work in flight on the device */
}

/* The host buffer is free when a copy returns, as on the CPU backend.
 * Copies to the host wait for the stream. Copies from it queue: nothing
 * here pins host memory, and from pageable memory cudaMemcpyAsync returns
 * once the driver has staged the bytes (CUDA's "API synchronization
 * behavior"), so the host may go on writing the buffer while the copy
 * waits for the kernels before it. Waiting for the stream there stopped
 * the host before every micro-batch's token upload until the GPU had
 * finished the last one's work, and the first kernels of the next then
 * ran at the pace the host launched them. Device-to-device copies queue. */
int mt__cuda_memcpy(mt_device *d, void *dst, const void *src, size_t bytes, mt__cuda_copy kind) {
  mt__cuda *c = mt__cuda_enter(d);
  if (!bytes) return 0;
  static const char *names[] = {"host to device", "device to host", "device to device"};
  cudaMemcpyKind k = kind == MT__CUDA_HTOD   ? cudaMemcpyHostToDevice
                     : kind == MT__CUDA_DTOH ? cudaMemcpyDeviceToHost
                                             : cudaMemcpyDeviceToDevice;
  cudaError_t e = cudaMemcpyAsync(dst, src, bytes, k, c->stream);
  if (e == cudaSuccess && kind == MT__CUDA_DTOH) e = cudaStreamSynchronize(c->stream);
  if (e != cudaSuccess) {
    cudaGetLastError(); /* the caller is told: not the next launch's error */
    return mt_seterr(MT_EIO, "device %s: copy %zu bytes %s: %s", d->name, bytes, names[kind],
                     cudaGetErrorString(e));
  }
  return 0;
}

int mt__cuda_memset0(mt_device *d, void *p, size_t bytes) {
  mt__cuda *c = mt__cuda_enter(d);
  if (!bytes) return 0;
  cudaError_t e = cudaMemsetAsync(p, 0, bytes, c->stream);
  if (e != cudaSuccess) {
    /* recorded as an op's failure is: callers that zero as ops do (the
     * model's gradients) may leave the result to the step's sync */
    cudaGetLastError();
    char what[48];
    snprintf(what, sizeof what, "zero %zu bytes", bytes);
    mt__cuda_fail(d, what, cudaGetErrorString(e));
    return mt_seterr(MT_EIO, "device %s: zero %zu bytes: %s", d->name, bytes,
                     cudaGetErrorString(e));
  }
  return 0;
}

int mt__cuda_sync(mt_device *d) {
  mt__cuda *c = mt__cuda_enter(d);
  cudaError_t e = cudaStreamSynchronize(c->stream);
  if (e != cudaSuccess) {
    mt__cuda_fail(d, "synchronize", cudaGetErrorString(e));
    c->told = e; /* a lost context answers it again: mt__cuda_fault_pending passes it over */
  }
  if (!c->err) return 0;
  c->err = 0; /* reported once; a fault of the context itself keeps failing every call */
  return mt_seterr(MT_EIO, "%s", c->errmsg);
}

int mt__cuda_attention_backend(mt_device *d, const char *name) {
  int path = att_path_named(name);
  if (path < 0)
    return mt_seterr(MT_EINVAL, "device %s: attention backend \"%s\": flash, chunked or auto",
                     d->name, name);
  if (mt__cuda_attention_path_mode(d) == path) return 0;
  mt_log_info("device %s: a 16-bit qkv's attention %s (model.attention_backend)", d->name,
              att_path_words(path));
  return mt__cuda_attention_path(d, path);
}

int mt__cuda_profiler(mt_device *d, int on) {
  mt__cuda_enter(d); /* the capture is the context's: this device's */
  cudaError_t e = on ? cudaProfilerStart() : cudaProfilerStop();
  if (e != cudaSuccess)
    return mt_seterr(MT_EIO, "device %s: %s: %s", d->name,
                     on ? "cudaProfilerStart" : "cudaProfilerStop", cudaGetErrorString(e));
  return 0;
}

void mt__cuda_wait(mt_device *d) {
  mt__cuda *c = mt__cuda_enter(d);
  cudaError_t e = cudaStreamSynchronize(c->stream);
  if (e != cudaSuccess) mt__cuda_fail(d, "synchronize", cudaGetErrorString(e));
}

/* A query, not a wait: cudaStreamQuery answers at once, with the context's
 * fault when a kernel has corrupted it (cudaErrorNotReady is work still
 * queued, not a fault). What it finds is recorded as a sync's would be,
 * unless a sync told it already: a corrupted context answers every call
 * with the same fault. */
int mt__cuda_fault_pending(mt_device *d, char *msg, size_t len) {
  mt__cuda *c = mt__cuda_enter(d);
  cudaError_t e = cudaStreamQuery(c->stream);
  if (e != cudaSuccess && e != cudaErrorNotReady && e != c->told) {
    cudaGetLastError(); /* recorded here: not the next launch's error too */
    mt__cuda_fail(d, "stream", cudaGetErrorString(e));
  }
  if (!c->err) return 0;
  if (msg && len) snprintf(msg, len, "%s", c->errmsg);
  return 1;
}

/* ---- GEMM --------------------------------------------------------------- */

/* 16-bit operands compute in fp32 from the values they hold: cuBLAS(Lt)
 * pairs the FAST_* compute types with fp32 operands only. */
static cublasComputeType_t compute_type(mt_matmul_precision p, const mt__gemm *g) {
  if (g->at != MT_F32) return CUBLAS_COMPUTE_32F;
  switch (p) {
  case MT_MATMUL_TF32: return CUBLAS_COMPUTE_32F_FAST_TF32;
  case MT_MATMUL_BF16: return CUBLAS_COMPUTE_32F_FAST_16BF;
  default: return CUBLAS_COMPUTE_32F;
  }
}

static cudaDataType_t data_type(mt_dtype t) {
  return t == MT_BF16 ? CUDA_R_16BF : t == MT_F16 ? CUDA_R_16F : CUDA_R_32F;
}

static uint32_t type_bytes(mt_dtype t) { return t == MT_F32 ? 4 : 2; }

/* The alignment in bytes (a power of two, from the element size to 256)
 * that every matrix of a batch keeps, rows included. cuBLASLt's heuristic
 * assumes 256 unless told, and a kernel picked for that would fault on a
 * less aligned view, such as an attention head's slice of qkv when the head
 * size is odd. */
static uint32_t alignment(const void *p, int ld, long long stride, int batch, uint32_t el) {
  uint64_t bits = (uint64_t)(uintptr_t)p | ((uint64_t)ld * el);
  if (batch > 1) bits |= (uint64_t)stride * el;
  uint32_t a = 256;
  while (a > el && (bits & (a - 1))) a >>= 1;
  return a;
}

/* The last shapes' algorithms: a layer repeats the same dozen GEMMs, and
 * the heuristic query costs more than creating the descriptors. A 16-bit
 * job's chunked attention adds 28 more at T 2048 (7 GEMMs of each of 4
 * row blocks' widths), and a step visits its shapes in a cycle, which an
 * LRU cache smaller than the cycle misses on every call: 128 keeps a step's
 * shapes with room to spare (a look-up scans them, about a microsecond). */
#define ALGO_CACHE 128

/* The GeLU epilogues gemm_lt runs: the forward's writes aux = the result
 * (bias included) and D = gelu(aux); the backward's reads aux, the forward's
 * GeLU input, and writes D = gelu'(aux) ⊙ result. */
enum { GELU_NONE, GELU_FWD, GELU_BWD };

typedef struct {
  int dev, transa, transb, m, n, k, batch, lda, ldb, ldd, bias, gelu, ct, at, bt, dt;
  long long sA, sB, sD;
  uint32_t align[5]; /* A, B, D, bias, GeLU aux */
} gemm_key;

typedef struct {
  gemm_key key;
  cublasLtMatmulAlgo_t algo;
  uint64_t used; /* the clock of its last use; 0: empty */
} algo_entry;

static thread_local algo_entry algo_cache[ALGO_CACHE]; /* per host thread: one device thread each */
static thread_local uint64_t algo_clock;               /* 64 bits: never wraps */

static int key_equal(const gemm_key *a, const gemm_key *b) { return !memcmp(a, b, sizeof *a); }

/* cuBLASLt; 0 when it has no algorithm for this shape or fails. gelu: one
 * of the GeLU epilogues above, aux its matrix, laid out and stored as D;
 * the bias is stored as D too (the types cuBLASLt's epilogues default to,
 * and outside fp8 the only ones it takes). */
static int gemm_lt(mt__cuda *c, cublasComputeType_t ct, const mt__gemm *g, int gelu,
                   const void *aux, const char **why) {
  cublasLtMatmulDesc_t op = NULL;
  cublasLtMatrixLayout_t la = NULL, lb = NULL, ld = NULL;
  cublasLtMatmulPreference_t pref = NULL;
  cublasOperation_t ta = g->transa ? CUBLAS_OP_T : CUBLAS_OP_N;
  cublasOperation_t tb = g->transb ? CUBLAS_OP_T : CUBLAS_OP_N;
  cublasStatus_t st = CUBLAS_STATUS_SUCCESS;
  int ok = 0;
  /* cuBLASLt's rule for a GeLU input matrix: ld a multiple of 8 (and one
   * matrix here: its batch stride is not set) */
  if (gelu && (g->batch != 1 || g->ldd % 8)) {
    *why = g->batch != 1 ? "GeLU epilogue on a batch" : "GeLU epilogue: ld not a multiple of 8";
    return 0;
  }
  /* DGELU's bias variant (DGELU_BGRAD) writes a bias gradient instead, and
   * where beta · C joins gelu' is not documented */
  if (gelu == GELU_BWD && (g->bias || g->beta != 0.0f)) {
    *why = g->bias ? "DGELU epilogue with a bias" : "DGELU epilogue with beta != 0";
    return 0;
  }
  gemm_key key;
  memset(&key, 0, sizeof key); /* padding too: keys are compared with memcmp */
  key.dev = c->index;
  key.transa = g->transa, key.transb = g->transb, key.m = g->m, key.n = g->n, key.k = g->k;
  key.batch = g->batch, key.lda = g->lda, key.ldb = g->ldb, key.ldd = g->ldd;
  key.bias = g->bias != NULL, key.gelu = gelu, key.ct = (int)ct;
  key.at = (int)g->at, key.bt = (int)g->bt, key.dt = (int)g->dt;
  key.sA = g->batch > 1 ? g->sA : 0, key.sB = g->batch > 1 ? g->sB : 0;
  key.sD = g->batch > 1 ? g->sD : 0;
  key.align[0] = alignment(g->A, g->lda, g->sA, g->batch, type_bytes(g->at));
  key.align[1] = alignment(g->B, g->ldb, g->sB, g->batch, type_bytes(g->bt));
  key.align[2] = alignment(g->D, g->ldd, g->sD, g->batch, type_bytes(g->dt));
  key.align[3] = g->bias ? alignment(g->bias, 0, 0, 1, type_bytes(g->dt)) : 0;
  key.align[4] = gelu ? alignment(aux, 0, 0, 1, type_bytes(g->dt)) : 0; /* ldd is in the key */
  /* cuBLASLt's heuristic takes no alignment for the bias or the GeLU aux (it
   * has preferences for A-D only), and epilogue kernels are reported to
   * fault on a bias under 16 bytes aligned (a sticky fault: the context is
   * lost). No caller passes one today (gpt.c packs tensors 16 elements
   * apart); a sliced one takes cuBLAS and our bias and GeLU kernels. */
  if ((g->bias && key.align[3] < 16) || (gelu && key.align[4] < 16)) {
    *why = key.align[4] && key.align[4] < 16 ? "GeLU aux under 16-byte aligned"
                                             : "bias under 16-byte aligned";
    return 0;
  }
  algo_entry *hit = NULL;
  for (int i = 0; i < ALGO_CACHE; i++)
    if (algo_cache[i].used && key_equal(&algo_cache[i].key, &key)) hit = &algo_cache[i];

#define LT(call, what)                                                                             \
  if ((st = (call)) != CUBLAS_STATUS_SUCCESS) {                                                    \
    *why = what;                                                                                   \
    goto done;                                                                                     \
  }
  LT(cublasLtMatmulDescCreate(&op, ct, CUDA_R_32F), "cublasLtMatmulDescCreate");
  LT(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta), "TRANSA");
  LT(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb), "TRANSB");
  if (g->bias || gelu) {
    cublasLtEpilogue_t ep = gelu == GELU_BWD ? CUBLASLT_EPILOGUE_DGELU
                            : !gelu          ? CUBLASLT_EPILOGUE_BIAS
                            : g->bias        ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS
                                             : CUBLASLT_EPILOGUE_GELU_AUX;
    LT(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE, &ep, sizeof ep),
       "EPILOGUE");
  }
  if (g->bias)
    LT(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g->bias,
                                      sizeof g->bias),
       "BIAS_POINTER");
  if (gelu) { /* the heuristic reads the pointer too, for its alignment */
    int64_t ld_aux = g->ldd;
    LT(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &aux,
                                      sizeof aux),
       "EPILOGUE_AUX_POINTER");
    LT(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &ld_aux,
                                      sizeof ld_aux),
       "EPILOGUE_AUX_LD");
  }
  /* layouts describe the matrices as stored, before op() */
  LT(cublasLtMatrixLayoutCreate(&la, data_type(g->at), g->transa ? g->k : g->m,
                                g->transa ? g->m : g->k, g->lda),
     "layout A");
  LT(cublasLtMatrixLayoutCreate(&lb, data_type(g->bt), g->transb ? g->n : g->k,
                                g->transb ? g->k : g->n, g->ldb),
     "layout B");
  LT(cublasLtMatrixLayoutCreate(&ld, data_type(g->dt), g->m, g->n, g->ldd), "layout D");
  if (g->batch > 1) {
    int32_t bc = g->batch;
    int64_t s[3] = {g->sA, g->sB, g->sD};
    cublasLtMatrixLayout_t l[3] = {la, lb, ld};
    for (int i = 0; i < 3; i++) {
      LT(cublasLtMatrixLayoutSetAttribute(l[i], CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &bc, sizeof bc),
         "BATCH_COUNT");
      LT(cublasLtMatrixLayoutSetAttribute(l[i], CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &s[i],
                                          sizeof s[i]),
         "STRIDED_BATCH_OFFSET");
    }
  }
  if (!hit) {
    cublasLtMatmulHeuristicResult_t res;
    int found = 0;
    uint64_t wsb = MT_CUDA_GEMM_WS_BYTES;
    LT(cublasLtMatmulPreferenceCreate(&pref), "cublasLtMatmulPreferenceCreate");
    LT(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsb,
                                            sizeof wsb),
       "MAX_WORKSPACE_BYTES");
    static const cublasLtMatmulPreferenceAttributes_t attr[3] = {
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
    for (int i = 0; i < 3; i++)
      LT(cublasLtMatmulPreferenceSetAttribute(pref, attr[i], &key.align[i], sizeof key.align[i]),
         "MIN_ALIGNMENT");
    LT(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                                            &key.align[2], sizeof key.align[2]),
       "MIN_ALIGNMENT_C");
    LT(cublasLtMatmulAlgoGetHeuristic(c->lt, op, la, lb, ld, ld, pref, 1, &res, &found),
       "cublasLtMatmulAlgoGetHeuristic");
    if (!found) {
      *why = "no cuBLASLt algorithm";
      goto done;
    }
    int victim = 0; /* least recently used */
    for (int i = 1; i < ALGO_CACHE; i++)
      if (algo_cache[i].used < algo_cache[victim].used) victim = i;
    hit = &algo_cache[victim];
    hit->key = key;
    hit->algo = res.algo;
  }
  hit->used = ++algo_clock;
  LT(cublasLtMatmul(c->lt, op, &g->alpha, g->A, la, g->B, lb, &g->beta, g->D, ld, g->D, ld,
                    &hit->algo, c->ws, MT_CUDA_GEMM_WS_BYTES, c->stream),
     "cublasLtMatmul");
  ok = 1;
done:
  if (!ok && *why && st != CUBLAS_STATUS_SUCCESS) {
    static thread_local char buf[160];
    snprintf(buf, sizeof buf, "%s: %s", *why, cublasGetStatusString(st));
    *why = buf;
  }
  if (!ok && hit) hit->used = 0; /* do not keep an algorithm that failed */
  if (pref) cublasLtMatmulPreferenceDestroy(pref);
  if (la) cublasLtMatrixLayoutDestroy(la);
  if (lb) cublasLtMatrixLayoutDestroy(lb);
  if (ld) cublasLtMatrixLayoutDestroy(ld);
  if (op) cublasLtMatmulDescDestroy(op);
  return ok;
#undef LT
}

/* Each of the batch's D(m,n) column-major (sD apart) = beta·D + bias
 * broadcast along columns, D and the bias stored as dt: the bias that
 * cuBLAS's fallback cannot fuse, written before a GEMM with beta = 1 (a
 * 16-bit D then rounds twice, where cuBLASLt's epilogue rounds once). */
static __global__ void k_bias_fill(void *D, const void *bias, mt_dtype dt, int m, int n, int ldd,
                                   long long sD, int batch, float beta) {
  size_t per = (size_t)m * n, total = per * (size_t)batch;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
       i += (size_t)gridDim.x * blockDim.x) {
    size_t b = i / per, col = i % per / (size_t)m, row = i % (size_t)m;
    size_t at = b * (size_t)sD + col * (size_t)ldd + row;
    if (dt == MT_F32) {
      float *p = (float *)D + at;
      *p = (beta == 0.0f ? 0.0f : beta * *p) + ((const float *)bias)[row];
    } else {
      int fp16 = dt == MT_F16;
      uint16_t *p = (uint16_t *)D + at;
      float b = mt_half_unpack(((const uint16_t *)bias)[row], fp16);
      *p = mt_half_pack((beta == 0.0f ? 0.0f : beta * mt_half_unpack(*p, fp16)) + b, fp16);
    }
  }
}

void mt__cuda_gemm(mt_device *d, const char *what, const mt__gemm *g) {
  if (g->m <= 0 || g->n <= 0 || g->k <= 0 || g->batch <= 0) return; /* no op has k = 0 */
  mt__cuda *c = mt__cuda_enter(d);
  cublasComputeType_t ct = compute_type(d->matmul, g);
  const char *why = NULL;
  if (gemm_lt(c, ct, g, GELU_NONE, NULL, &why)) return;
  /* cuBLAS takes any shape cuBLASLt refuses */
  float beta = g->beta;
  if (g->bias) {
    MT_LAUNCH(k_bias_fill, mt__cuda_blocks((size_t)g->m * g->n * g->batch, 256), 256, c->stream)
    (g->D, g->bias, g->dt, g->m, g->n, g->ldd, g->batch > 1 ? g->sD : 0, g->batch, beta);
    mt__cuda_check(d, what);
    beta = 1.0f;
  }
  cublasStatus_t st = cublasGemmStridedBatchedEx(
      c->blas, g->transa ? CUBLAS_OP_T : CUBLAS_OP_N, g->transb ? CUBLAS_OP_T : CUBLAS_OP_N, g->m,
      g->n, g->k, &g->alpha, g->A, data_type(g->at), g->lda, g->sA, g->B, data_type(g->bt), g->ldb,
      g->sB, &beta, g->D, data_type(g->dt), g->ldd, g->sD, g->batch, ct, CUBLAS_GEMM_DEFAULT);
  if (st != CUBLAS_STATUS_SUCCESS) {
    char detail[320];
    snprintf(detail, sizeof detail, "m=%d n=%d k=%d batch=%d: cuBLASLt: %s; cuBLAS: %s", g->m, g->n,
             g->k, g->batch, why ? why : "-", cublasGetStatusString(st));
    mt__cuda_fail(d, what, detail);
  }
}

/* Either GeLU epilogue; 0 (and a debug line, once per device thread: it is
 * the same every layer) when cuBLASLt cannot. */
static int gemm_gelu_epilogue(mt_device *d, const char *what, const mt__gemm *g, int gelu,
                              const void *aux) {
  if (g->m <= 0 || g->n <= 0 || g->k <= 0 || g->batch <= 0) return 0;
  mt__cuda *c = mt__cuda_enter(d);
  const char *why = NULL;
  if (gemm_lt(c, compute_type(d->matmul, g), g, gelu, aux, &why)) return 1;
  static thread_local int said[GELU_BWD + 1];
  if (!said[gelu]) {
    said[gelu] = 1;
    mt_log_debug("device %s: %s m=%d n=%d k=%d: no cuBLASLt %s epilogue (%s); %s runs as its "
                 "own kernel",
                 d->name, what, g->m, g->n, g->k, gelu == GELU_BWD ? "DGELU" : "GeLU",
                 why ? why : "-", gelu == GELU_BWD ? "the GeLU gradient" : "GeLU");
  }
  return 0;
}

int mt__cuda_gemm_gelu(mt_device *d, const char *what, const mt__gemm *g, void *aux) {
  return gemm_gelu_epilogue(d, what, g, GELU_FWD, aux);
}

int mt__cuda_gemm_dgelu(mt_device *d, const char *what, const mt__gemm *g, const void *aux) {
  return gemm_gelu_epilogue(d, what, g, GELU_BWD, aux);
}
