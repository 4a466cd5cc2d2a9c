/* cuda_impl.h — what the CUDA backend's files share (CUDA C++, kernels/cuda only).
 *
 * Ops cannot return errors (ops.h), so a failed launch or GEMM is recorded in
 * the device's state, first error wins, and mt_device_sync() reports it.
 * The same sources also build as plain C++ against tests/gpu/emu, which runs
 * the kernels on the CPU (MT_CUDA_EMU): launches go through MT_LAUNCH, and
 * kernels use only what the emulator provides (no atomics, whole warps in
 * every block; dynamic shared memory through MT_LAUNCH_SMEM and MT_DYN_SMEM;
 * of mma.h, 16×16×16 wmma fragments of 16-bit types).
 */
#ifndef MT_CUDA_IMPL_H
#define MT_CUDA_IMPL_H

#ifdef MT_CUDA_EMU
#include "cuda_emu.h"
#define MT_LAUNCH(k, grid, block, stream) mt_emu::launch(#k, k, (grid), (block), (stream))
#define MT_LAUNCH_SMEM(k, grid, block, smem, stream)                                               \
  mt_emu::launch(#k, k, (grid), (block), (stream), (smem))
#define MT_DYN_SMEM(name) unsigned char *name = mt_emu::dyn_smem()
#define MT_LAUNCH_BOUNDS(threads, blocks)
#define MT_VEC_AT(type, p) ((type *)mt_emu::vec_at((p), alignof(type), #type))
#else
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_profiler_api.h>
#include <cuda_runtime.h>
#include <mma.h>
#define MT_LAUNCH(k, grid, block, stream) k<<<(grid), (block), 0, (stream)>>>
/* A launch with smem bytes of dynamic shared memory, which the kernel
 * names with MT_DYN_SMEM(name) (128-byte aligned). */
#define MT_LAUNCH_SMEM(k, grid, block, smem, stream) k<<<(grid), (block), (smem), (stream)>>>
#define MT_DYN_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
/* registers enough for that many blocks an SM */
#define MT_LAUNCH_BOUNDS(threads, blocks) __launch_bounds__(threads, blocks)
/* p as a pointer to a vector type (a 16-byte float quad, say): one load or
 * store instruction, which faults where p is not aligned to the type (the
 * emulator stops the test there, naming it) */
#define MT_VEC_AT(type, p) ((type *)(p))
#endif

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "device.h"
#include "ops.h"

/* Workspace sizes, allocated once at open so ops never allocate. */
#define MT_CUDA_GEMM_WS_BYTES                                                                      \
  ((size_t)32 << 20)            /* cuBLASLt/cuBLAS: 32 MiB is what Hopper kernels ask */
#define MT_CUDA_RED_BLOCKS 1024 /* sumsq partials: a fixed count, a fixed order */
/* sumsq_multi's partials of one launch: 128 KiB a device. A -D overrides it:
 * the emulator's test shrinks it to fill a launch with small spans. */
#ifndef MT_CUDA_RED_PARTS
#define MT_CUDA_RED_PARTS 16384
#endif
/* Column reductions' partial sums, one row of columns per group of rows
 * (ops_cuda.cu, col_groups): 4 MiB a device */
#define MT_CUDA_COL_FLOATS ((size_t)1 << 20)

/* The flash forward's shapes whose rows a warp were timed, kept a device */
#define MT_CUDA_FLASH_TUNED 16

/* A 16-bit qkv's attention shape, as a timed choice is kept for it */
typedef struct mt__att_shape {
  int HS, fp16, B, T, NH, drop, docs;
} mt__att_shape;

/* The flash forward's variant a shape's timing kept: 16 or 32 query rows a
 * warp; p_smem, the 16-row forward faster with P through shared memory */
typedef struct mt__flash_choice {
  int rows, p_smem;
} mt__flash_choice;

/* The attention path (MT__CUDA_ATT_FLASH or _CHUNKED) a shape's timing
 * kept for its forward (path[0]) and backward (path[1]); 0 not yet */
typedef struct mt__att_choice {
  int path[2];
} mt__att_choice;

/* The shapes a device timed a choice for, the last MT_CUDA_FLASH_TUNED
 * of them (round robin); zeroed, empty */
template <class V> struct mt__tuned {
  struct {
    mt__att_shape shape;
    V v;
  } e[MT_CUDA_FLASH_TUNED];
  int n;
  /* the choice kept for s, or NULL */
  V *find(const mt__att_shape &s) {
    for (int i = 0; i < (n < MT_CUDA_FLASH_TUNED ? n : MT_CUDA_FLASH_TUNED); i++)
      if (!memcmp(&e[i].shape, &s, sizeof s)) return &e[i].v;
    return NULL;
  }
  /* s's choice, a zeroed one taking the oldest place where s has none */
  V *get(const mt__att_shape &s) {
    V *v = find(s);
    if (v) return v;
    auto &x = e[n++ % MT_CUDA_FLASH_TUNED];
    x.shape = s, x.v = V();
    return &x.v;
  }
};

typedef struct mt__cuda {
  int index;
  cudaStream_t stream;
  cublasLtHandle_t lt;
  cublasHandle_t blas;         /* fallback when cuBLASLt has no algorithm for a shape */
  void *ws;                    /* GEMM workspace, MT_CUDA_GEMM_WS_BYTES */
  double *red;                 /* MT_CUDA_RED_BLOCKS + 1 */
  double *red_multi;           /* MT_CUDA_RED_PARTS + 1: sumsq_multi's partials, then its total */
  float *cols;                 /* MT_CUDA_COL_FLOATS */
  int sms;                     /* streaming multiprocessors */
  int smem_optin;              /* dynamic shared memory a block may opt in to, bytes */
  int acc_layout;              /* the flash kernels' fragment layout on this GPU, read when it
                                  opens: 1 as they assume, -1 not (flash_cuda.cu) */
  int a_layout;                /* a bf16 matrix_a fragment's, read when it opens: 1 laid out as
                                  the accumulator (mma.m16n8k16's A), -1 not */
  int flash_p_regs;            /* the flash kernels' P and dS pass to their products in
                                  registers (bf16; a_layout 1), or 0 through shared memory
                                  (mt__cuda_flash_p_regs) */
  cudaEvent_t flash_events[4]; /* mt__cuda_flash_bwd_timing's, or NULL */
  int flash_fwd_rows;          /* query rows a warp of the flash forward: 16 or 32, 0 timed per
                                  shape (MTNLG_FLASH_FWD_ROWS, mt__cuda_flash_fwd_rows) */
  mt__tuned<mt__flash_choice> flash_tuned; /* the forward's variant each shape timed */
  int att_path; /* a 16-bit qkv's attention: MT__CUDA_ATT_AUTO, _FLASH or _CHUNKED
                   (MTNLG_ATTENTION, mt__cuda_attention_path) */
  mt__tuned<mt__att_choice> att_tuned; /* auto: each shape's faster path, per pass */
  int att_chunk_rows, att_chunk_heads; /* the chunked 16-bit path's chunks at most, 0 the
                                          scratch budget's (mt__cuda_attention_chunk) */
  float *att16_buf;    /* the chunked 16-bit path's scratch, made when it first runs */
  size_t att16_floats; /* and its floats */
  int err;             /* first error an op met: MT_EIO, 0 when none */
  char errmsg[384];
  cudaError_t told; /* the stream's fault a sync last reported (a context's stays) */
} mt__cuda;

static inline mt__cuda *mt__cuda_of(mt_device *d) { return (mt__cuda *)d->impl; }

/* Times n variants of one op on c's stream, as cuDNN's benchmark mode
 * does: run(v) queues variant v; each runs twice, in turn, and best[v]
 * gets the faster of its two runs in ms (FLT_MAX when not timed). 1, or 0
 * when an event failed, which leaves the rest untimed. */
template <class F> static int mt__cuda_time_variants(mt__cuda *c, int n, float *best, F run) {
  cudaEvent_t ev[2] = {NULL, NULL};
  for (int v = 0; v < n; v++) best[v] = 3.4e38f;
  int ok = cudaEventCreate(&ev[0]) == cudaSuccess && cudaEventCreate(&ev[1]) == cudaSuccess;
  for (int round = 0; ok && round < 2; round++)
    for (int v = 0; ok && v < n; v++) {
      float ms = 0.0f;
      ok = cudaEventRecord(ev[0], c->stream) == cudaSuccess;
      run(v);
      ok = ok && cudaEventRecord(ev[1], c->stream) == cudaSuccess &&
           cudaEventSynchronize(ev[1]) == cudaSuccess &&
           cudaEventElapsedTime(&ms, ev[0], ev[1]) == cudaSuccess;
      if (ok && ms < best[v]) best[v] = ms;
    }
  for (int i = 0; i < 2; i++)
    if (ev[i]) cudaEventDestroy(ev[i]);
  return ok;
}

/* Makes d's GPU current on the calling thread and returns its state. */
mt__cuda *mt__cuda_enter(mt_device *d);
/* Records the first failure of an op: "what: detail". */
void mt__cuda_fail(mt_device *d, const char *what, const char *detail);
/* After a launch: records a launch failure (bad configuration, no kernel image). */
void mt__cuda_check(mt_device *d, const char *what);

/* D = alpha · op(A) · op(B) + beta · D (+ bias broadcast along columns), in
 * cuBLAS's column-major terms: op(A) is m×k, op(B) k×n, D m×n; transposes
 * when trans*. batch > 1 repeats it at the given element strides (lds and
 * strides in elements of each matrix's own type). D and the bias are fp32.
 * A and B are both fp32, computed in d->matmul; or both 16-bit (at = bt =
 * MT_BF16 or MT_F16), computed in fp32 from the floats they hold whatever
 * d->matmul says: cuBLAS(Lt) pairs its FAST_* compute types with fp32
 * operands only. at and bt default to fp32, so an initialiser may leave
 * them out. */
typedef struct mt__gemm {
  int transa, transb, m, n, k, batch;
  const void *A;
  int lda;
  long long sA;
  const void *B;
  int ldb;
  long long sB;
  void *D;
  int ldd;
  long long sD;
  float alpha, beta;
  const void *bias; /* (m) or NULL, stored as dt (cuBLASLt's rule) */
  mt_dtype at = MT_F32, bt = MT_F32;
  mt_dtype dt = MT_F32; /* D's type: fp32, or at's 16-bit type when at == bt */
} mt__gemm;
void mt__cuda_gemm(mt_device *d, const char *what, const mt__gemm *g);
/* The same GEMM through cuBLASLt alone, with its GeLU epilogue: D =
 * gelu(result) and aux = result (bias included), aux laid out and stored as
 * D (m×n, ld ldd, type dt). 1 when queued; 0 when cuBLASLt cannot (ldd not
 * a multiple of 8, batch > 1, no algorithm, or empty): then nothing was
 * queued or recorded and the caller runs the GEMM and the GeLU itself. */
int mt__cuda_gemm_gelu(mt_device *d, const char *what, const mt__gemm *g, void *aux);
/* The same GEMM through cuBLASLt alone, with its GeLU-gradient epilogue
 * (DGELU): D = gelu'(aux) ⊙ (alpha · op(A) · op(B)), aux the GeLU's input as
 * mt__cuda_gemm_gelu kept it, laid out and stored as D. beta must be 0 (cuBLASLt does
 * not document whether beta · D joins before or after gelu') and bias NULL.
 * 1 when queued; 0 when cuBLASLt cannot, as there. */
int mt__cuda_gemm_dgelu(mt_device *d, const char *what, const mt__gemm *g, const void *aux);

/* attention_cuda.cu: the ops.h attention ops */
void mt__cuda_attention_fwd(mt_device *d, void *out, float *lse, float *scratch, const void *qkv,
                            mt_dtype qt, int B, int T, int C, int NH, const mt_dropout *drop,
                            const int32_t *doc_start);
void mt__cuda_attention_bwd(mt_device *d, void *dqkv, mt_dtype gt, float *scratch,
                            const float *dout, const void *out, const void *qkv, mt_dtype qt,
                            const float *lse, int B, int T, int C, int NH, const mt_dropout *drop,
                            const int32_t *doc_start);
size_t mt__cuda_attention_scratch(mt_device *d, int T, int C, int NH, mt_dtype qt);
void mt__cuda_attention_decode(mt_device *d, float *out, const float *qkv, int n, int C, int NH);

/* flash_cuda.cu: the attention of a 16-bit qkv (qt MT_BF16 or MT_F16), one
 * fused kernel per pass on the tensor cores. The backward needs B·NH·T
 * floats of scratch at most (it goes by groups of samples otherwise). A
 * head size over MT_FLASH_MAX_HS (ops.h) records an error on d. Called
 * by attention_cuda.cu's ops, which check dqkv's type first. */
void mt__cuda_flash_fwd(mt_device *d, uint16_t *out, float *lse, const uint16_t *qkv, mt_dtype qt,
                        int B, int T, int C, int NH, const mt_dropout *drop,
                        const int32_t *doc_start);
void mt__cuda_flash_bwd(mt_device *d, void *dqkv, mt_dtype gt, float *scratch,
                        size_t scratch_floats, const float *dout, const uint16_t *out,
                        const uint16_t *qkv, mt_dtype qt, const float *lse, int B, int T, int C,
                        int NH, const mt_dropout *drop, const int32_t *doc_start);

/* Launch helpers: blocks for n items at `threads` per block; grid-stride
 * loops take care of the rest past the cap. */
static inline unsigned mt__cuda_blocks(size_t n, unsigned threads) {
  size_t b = (n + threads - 1) / threads;
  return b > (1u << 20) ? (1u << 20) : (b ? (unsigned)b : 1u);
}

#endif
