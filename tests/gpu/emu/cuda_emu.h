/* cuda_emu.h — the CUDA runtime, cuBLAS and cuBLASLt, as far as kernels/cuda
 * and daemon/comm/nccl.c use them, on the CPU: no GPU in CI, yet its kernels
 * get run (and, with nccl_emu.h, its collectives).
 *
 * The sources of kernels/cuda build as plain C++ with this header (MT_CUDA_EMU, see
 * kernels/cuda/cuda_impl.h); the runtime part is C too, for nccl.c. A launch
 * runs its blocks one after another;
 * the threads of a block are fibers (ucontext) that switch at __syncthreads
 * and at warp exchanges (shuffles, ballots), so barriers, shared memory
 * (static storage: one block at a time), shuffles and ballots behave as on a
 * GPU for code that keeps CUDA's rules, and a deadlock is reported. Memory is
 * host memory, tracked per device, so copies in the wrong direction are
 * caught; fresh allocations are filled with NaN bytes. GEMMs run
 * in double from inputs rounded to the compute type (tf32, bf16), after the
 * layouts are checked against m, n, k as cuBLASLt checks them, and the
 * alignment a heuristic was promised is checked against the pointers. A and
 * B are fp32, or both bf16 or both binary16 (read as the exact floats they
 * hold, computed in CUBLAS_COMPUTE_32F only: cuBLAS(Lt) pairs the FAST_*
 * types with fp32 operands); C and D of one type, fp32, or with 16-bit A
 * and B their type too (the fp32 result rounded to nearest even into it).
 * Other type combinations get the status real cuBLAS(Lt) answers,
 * CUBLAS_STATUS_NOT_SUPPORTED. cuBLASLt's epilogues: bias, GeLU with its
 * input kept in the aux matrix (GELU_AUX, GELU_AUX_BIAS) and the GeLU
 * gradient with that input read from it (DGELU, D = gelu'(aux) ⊙ result;
 * beta must be 0, as its documentation does not say where beta · C joins),
 * the aux ld rules checked, the math kernels/common's mt_gelu and
 * mt_gelu_grad on the fp32 result. The bias vector and the aux matrix are
 * in D's type, as cuBLASLt documents outside its fp8 and IMMA kernels: a
 * BIAS_DATA_TYPE or EPILOGUE_AUX_DATA_TYPE of another type is
 * CUBLAS_STATUS_NOT_SUPPORTED. Any other epilogue or attribute aborts.
 *
 * Streams and threads. Several host threads may each drive their own
 * emulated device (MT_CUDA_EMU_DEVICES of them, default 1): the current
 * device and the last error are per thread, as in CUDA, and one kernel runs
 * at a time in the process (its blocks share the emulator's globals).
 * Kernels, copies, memsets and GEMMs run on the calling thread when issued,
 * after the work queued on their stream before them has completed. Only two
 * things queue: NCCL operations (nccl_emu.cc, completing when every rank has
 * posted them) and cudaStreamWaitEvent on an event that has not completed.
 * So cudaStreamQuery answers cudaErrorNotReady while a collective waits for
 * its peers, an event recorded behind it completes with it, and a stream
 * made to wait for that event holds what is issued on it after the wait.
 * Where CUDA would return at once and the GPU wait, the emulator blocks the
 * issuing host thread instead (a kernel issued behind a pending collective,
 * cudaFree while the device has queued work): a program that needs the host
 * to run ahead of such work can deadlock here and not on a GPU. A wait that
 * lasts prints a line every 30 s naming what it waits for.
 *
 * Dynamic shared memory (MT_LAUNCH_SMEM, MT_DYN_SMEM in cuda_impl.h) is a
 * buffer per launch, NaN bytes at each block's start; over 48 KiB needs the
 * kernel's cudaFuncAttributeMaxDynamicSharedMemorySize first, and 227 KiB
 * (an H100's limit) is the most. Warp matrix multiplies (mma.h's
 * nvcuda::wmma, 16×16×16 tiles of bf16 or binary16 into fp32) are
 * warp-collective here as there: each lane holds 8 of a tile's elements,
 * mma_sync gathers the warp's fragments at a warp barrier, products summed
 * in fp32 in k order; loads and stores check the 256-bit alignment and the
 * ldm multiple that CUDA requires. An accumulator's elements are where an
 * sm_80 or later GPU has them (mma.m16n8k16's C layout for columns 0-7,
 * then for 8-15: element i of lane l at row l/4 + 8·(i/2 % 2), column
 * 2·(l%4) + i%2 + 8·(i/4)), which the flash kernels read in registers
 * (flash_cuda.cu: acc_row, acc_col; test_cuda_ops checks the GPU's).
 * A matrix_a fragment's elements are at those places too (mma.m16n8k16's A
 * layout, the k index as the column), where the flash kernels write P and
 * dS in registers on a GPU whose probe finds them so; mt_emu_set_a_layout(0)
 * gives it the emulator's own order (element i of lane l at l·8 + i,
 * row-major), as a GPU that places them otherwise would. A matrix_b
 * fragment's mapping is the emulator's own, which kernels must not read.
 *
 * Between barriers a thread runs alone, so a kernel that reads what another
 * thread wrote without a barrier between them sees the write only when the
 * writer's turn comes first: threads take turns in index order, or in
 * reverse with MT_CUDA_EMU_ORDER=reverse, and a test run both ways (a read
 * before the write finds the NaN of fresh memory) catches such a missing
 * barrier either way round. A turn ends at a barrier (a shuffle, a ballot
 * and mma_sync are one warp barrier each, as on a GPU); a thread waiting
 * for one that has not completed is passed over. So warps keep in step,
 * one warp barrier at a time, and one warp's write to a buffer another
 * still reads (a block barrier missing between them) goes unseen when both
 * do the same work: MT_CUDA_EMU_ORDER=warps (or warps-reverse) lets a warp
 * run alone until it waits at a block barrier, as far ahead of the others
 * as CUDA allows. cp.async copies land at
 * once, or with MT_CUDA_EMU_CP_ASYNC=late at the wait that completes them:
 * a read of the copy's destination before that wait (and the barrier after
 * it, for other threads) finds the old contents one way, and a copy into a
 * buffer other threads still read shows in one of the two orders the other.
 *
 * What this cannot find: races between blocks (and within one beyond what the
 * two orders show), timing,
 * tensor-core rounding details, limits beyond block and grid sizes, work
 * on two streams racing (each op runs whole, when issued).
 * Test code: it aborts on a misuse of the API, with a message.
 */
#ifndef MT_CUDA_EMU_H
#define MT_CUDA_EMU_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* MT_ASAN: built under AddressSanitizer, where the fibers tell it of every
 * switch of stacks; MT_TSAN: under ThreadSanitizer (cuda_emu.cc) */
#include "sanitizer.h"

/* ---- runtime (C and C++) ------------------------------------------------ */

#ifdef __cplusplus
extern "C" {
#endif

struct CUstream_st;
typedef struct CUstream_st *cudaStream_t;
struct CUevent_st;
typedef struct CUevent_st *cudaEvent_t;

typedef enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInsufficientDriver = 35,
  cudaErrorNoDevice = 100,
  cudaErrorInvalidDevice = 101,
  cudaErrorInvalidResourceHandle = 400,
  cudaErrorNotReady = 600,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchFailure = 719,
} cudaError_t;

typedef enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
} cudaMemcpyKind;

typedef enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97
} cudaDeviceAttr;
typedef enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9 /* a hint: accepted, no effect here */
} cudaFuncAttribute;
#define cudaSharedmemCarveoutMaxShared 100

#define cudaStreamDefault 0x00
#define cudaStreamNonBlocking 0x01 /* does not wait for the legacy default stream */
#define cudaEventDefault 0x00
#define cudaEventBlockingSync 0x01
#define cudaEventDisableTiming 0x02

cudaError_t cudaGetDeviceCount(int *n);
cudaError_t cudaSetDevice(int dev);
cudaError_t cudaGetDevice(int *dev);
cudaError_t cudaDeviceGetAttribute(int *v, cudaDeviceAttr attr, int dev);
/* MT_CUDA_EMU_MEM_BYTES per device (default 16 GiB); cudaMalloc beyond it fails. */
cudaError_t cudaMemGetInfo(size_t *free_bytes, size_t *total);
cudaError_t cudaStreamCreate(cudaStream_t *s);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned flags);
cudaError_t cudaStreamDestroy(cudaStream_t s);
cudaError_t cudaStreamSynchronize(cudaStream_t s);
cudaError_t cudaStreamQuery(cudaStream_t s);
cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned flags);
cudaError_t cudaEventCreate(cudaEvent_t *e);
cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned flags);
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s);
cudaError_t cudaEventQuery(cudaEvent_t e);
cudaError_t cudaEventSynchronize(cudaEvent_t e);
cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t start, cudaEvent_t end);
cudaError_t cudaEventDestroy(cudaEvent_t e);
cudaError_t cudaMalloc(void **p, size_t bytes);
cudaError_t cudaFree(void *p);
cudaError_t cudaMemsetAsync(void *p, int v, size_t bytes, cudaStream_t s);
cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind,
                            cudaStream_t s);
cudaError_t cudaGetLastError(void);
const char *cudaGetErrorString(cudaError_t e);
const char *cudaGetErrorName(cudaError_t e);

/* The CUDA profiler's capture (cuda_profiler_api.h): the emulator keeps,
 * per device, whether it is on and the kernel launches made while it was
 * (mt_emu_profiled_launches). */
cudaError_t cudaProfilerStart(void);
cudaError_t cudaProfilerStop(void);

/* Test hooks (C too): GEMMs run so far, process-wide: by cuBLASLt (lt), of
 * those with the GeLU epilogue (lt_gelu) and with the DGELU one (lt_dgelu),
 * and by cuBLAS (blas); and of all of those, the ones whose A and B were
 * 16-bit (bf16 or binary16). */
void mt_emu_gemm_counts(long *lt, long *lt_gelu, long *lt_dgelu, long *blas);
long mt_emu_gemm16_count(void);
/* cublasLtMatmulAlgoGetHeuristic's calls so far, process-wide */
long mt_emu_heuristic_count(void);
/* Launches on device dev so far while its profiler capture was on
 * (cudaProfilerStart to cudaProfilerStop), and whether it is on now. */
long mt_emu_profiled_launches(int dev);
int mt_emu_profiler_on(int dev);
/* Launches so far, process-wide, of the kernel of that name (as MT_LAUNCH
 * spells it: "k_to_half"), whether or not they ran. */
long mt_emu_launch_count(const char *kernel);
/* Threads a block of that kernel's last launch, 0 before any */
long mt_emu_launch_threads(const char *kernel);
/* Places a wmma accumulator's elements from now on as an sm_80+ GPU does
 * (sm80 nonzero, the default) or otherwise (0: element i of lane l at
 * l·8 + i in row-major order), as a GPU whose layout the flash kernels do
 * not assume would: process-wide, for a test of their refusal. */
void mt_emu_set_acc_layout(int sm80);
/* Places a bf16 or binary16 matrix_a fragment's elements from now on as
 * mma.m16n8k16's A operand (mma nonzero, the default: the accumulator's
 * places) or in the emulator's own order (0), process-wide. */
void mt_emu_set_a_layout(int mma);
/* Lands cp.async copies from now on at the wait that completes them (late
 * nonzero) or at once (0), process-wide: MT_CUDA_EMU_CP_ASYNC=late sets it
 * at start. */
void mt_emu_set_cp_async_late(int late);
/* The order threads take their turns in from now on (MT_CUDA_EMU_ORDER's,
 * process-wide): reverse nonzero, in reverse; warps nonzero, each warp
 * alone until it waits at a block barrier or ends. */
void mt_emu_set_order(int reverse, int warps);
/* Arms a fault: the nth launch from now (1: the next) of that kernel, on
 * whichever device and thread, fails as a faulting kernel would: it does not
 * run, and the launching thread's cudaGetLastError says
 * cudaErrorLaunchFailure. One fault armed at a time; n 0 disarms. */
void mt_emu_fail_launch(const char *kernel, long n);
/* Calls fn(dev, arg) once, on the thread whose launch the armed fault
 * failed, at its first cudaStreamSynchronize of that launch's stream after
 * the fault, dev being the stream's device: a test's way to end a
 * generation under that rank right there. A copy to the host syncs too, so
 * the test picks a kernel whose next sync is the one it means (the
 * gradient norm's: its copy, then the step's own sync and vote). Set
 * before mt_emu_fail_launch; fn NULL clears. */
void mt_emu_on_fault_sync(void (*fn)(int dev, void *arg), void *arg);
/* Loses device dev as a GPU's context is lost to a fault that corrupts it
 * (an illegal address): from now on cudaStreamQuery and
 * cudaStreamSynchronize of its streams and of the legacy one answer e,
 * every time (cudaSuccess: the device is found again, for the next test).
 * Only those calls are emulated so: what mt_device_lost,
 * mt_device_fault_pending and mt_device_sync ask. */
void mt_emu_lose_device(int dev, cudaError_t e);

#ifdef __cplusplus
}
#endif

#ifdef __cplusplus /* the rest: kernels/cuda (C++) and nccl_emu.cc */

#include <atomic>
#include <functional>
#include <mutex>
#include <string>
#include <type_traits>

#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __forceinline__ inline
#define __restrict__ __restrict

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};

/* ---- kernels ------------------------------------------------------------ */

namespace mt_emu {
extern uint3 *cur_tid;
extern uint3 block_idx;
extern dim3 block_dim, grid_dim;
void run(const char *name, dim3 grid, dim3 block, cudaStream_t s, const std::function<void()> &body,
         const void *kernel = nullptr, size_t smem = 0);
/* The launch's dynamic shared memory (MT_DYN_SMEM). */
unsigned char *dyn_smem();
/* A vector access's address p (MT_VEC_AT): a GPU faults on one not
 * aligned to the vector's size, align bytes; the emulator stops the test,
 * naming the type and the address. */
const void *vec_at(const void *p, size_t align, const char *type);
/* cudaFuncSetAttribute's record: the dynamic shared memory allowed to k;
 * false (cudaErrorInvalidValue) over the device's opt-in limit. */
bool set_smem_limit(const void *k, int bytes);
/* The opt-in limit of dynamic shared memory per block: 227 KiB (sm_90), or
 * MT_CUDA_EMU_SMEM_OPTIN bytes (101376: an sm_86/sm_89 part) when set. */
int smem_optin();
/* Warp-collective helpers for wmma: the calling lane's index in its warp;
 * a barrier of the warp; a barrier at which each lane gives 16 floats and
 * gets the warp's 32 x 16 (lane l's at l * 16), valid until its next
 * barrier but one (the same buffer is written for that one). */
unsigned lane();
void warp_barrier();
const float *warp_gather(const float *mine);
void syncthreads();
int syncthreads_count(int pred);
unsigned ballot(int pred);
uint64_t shfl_xor(uint64_t bits, int lane_mask);
uint64_t shfl_idx(uint64_t bits, int src_lane);
void check_mask(unsigned mask);
/* cp.async (sm_80+), a thread's copies of 16 bytes from global to shared
 * memory (src NULL: zeros), gathered into groups by cp_async_commit and
 * waited for by cp_async_wait(n) (all but the n newest groups, as
 * cp.async.wait_group n); copies not yet committed are in no group, and no
 * wait completes them. When a copy lands is MT_CUDA_EMU_CP_ASYNC's: at
 * once (the default), or "late", at the wait that completes it, the latest
 * a GPU may land it. A thread that ends with copies not waited for stops
 * the test, naming the kernel. */
void cp_async(void *dst, const void *src);
void cp_async_commit();
void cp_async_wait(int n);

template <class... P> struct launcher {
  const char *name;
  void (*k)(P...);
  dim3 grid, block;
  cudaStream_t stream;
  size_t smem;
  /* arguments by value, as a kernel launch takes them */
  template <class... A> void operator()(A... a) {
    void (*kf)(P...) = k;
    std::function<void()> body = [=]() { kf(a...); };
    run(name, grid, block, stream, body, (const void *)kf, smem);
  }
};

template <class... P>
launcher<P...> launch(const char *name, void (*k)(P...), dim3 grid, dim3 block, cudaStream_t s,
                      size_t smem = 0) {
  return launcher<P...>{name, k, grid, block, s, smem};
}
} // namespace mt_emu

#define threadIdx (*mt_emu::cur_tid)
#define blockIdx (mt_emu::block_idx)
#define blockDim (mt_emu::block_dim)
#define gridDim (mt_emu::grid_dim)

inline void __syncthreads() { mt_emu::syncthreads(); }
inline int __syncthreads_count(int p) { return mt_emu::syncthreads_count(p != 0); }
inline int __syncthreads_or(int p) { return mt_emu::syncthreads_count(p != 0) != 0; }
inline unsigned __ballot_sync(unsigned mask, int p) {
  mt_emu::check_mask(mask);
  return mt_emu::ballot(p != 0);
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  mt_emu::check_mask(mask);
  mt_emu::warp_barrier();
}

template <class F> inline cudaError_t cudaFuncSetAttribute(F *k, cudaFuncAttribute a, int v) {
  if (a == cudaFuncAttributePreferredSharedMemoryCarveout)
    return v >= -1 && v <= 100 ? cudaSuccess : cudaErrorInvalidValue;
  if (a != cudaFuncAttributeMaxDynamicSharedMemorySize || v < 0) return cudaErrorInvalidValue;
  return mt_emu::set_smem_limit((const void *)k, v) ? cudaSuccess : cudaErrorInvalidValue;
}

/* v's bits (at most 8 bytes) moved between lanes by move(bits) */
template <class T, class F> inline T shfl_bits(unsigned mask, T v, F move) {
  static_assert(sizeof(T) <= 8, "shuffle of more than 8 bytes");
  mt_emu::check_mask(mask);
  uint64_t bits = 0;
  memcpy(&bits, &v, sizeof v);
  bits = move(bits);
  T r;
  memcpy(&r, &bits, sizeof r);
  return r;
}
template <class T> inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  return shfl_bits(mask, v, [&](uint64_t b) { return mt_emu::shfl_xor(b, lane_mask); });
}
template <class T> inline T __shfl_sync(unsigned mask, T v, int src_lane) {
  return shfl_bits(mask, v, [&](uint64_t b) { return mt_emu::shfl_idx(b, src_lane); });
}

/* ---- 16-bit types and warp matrix multiplies (mma.h) --------------------- */

/* cuda_bf16.h's and cuda_fp16.h's storage types; kernels move their bits
 * and convert with kernels/common/half.h. */
struct __nv_bfloat16 {
  uint16_t x;
};
struct __half {
  uint16_t x;
};

namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

/* Element i of lane l of the accumulator (m×n) is element (acc_row,
 * acc_col) below, as on an sm_80 GPU, and so of A (m×k, a_row and a_col);
 * of B (k×n), element l·8 + i of the tile in row-major order. All 16×16. */
template <class Use, int M, int N, int K, class T, class Layout = void> struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "only 16x16x16 tiles are emulated");
  enum { num_elements = 8 };
  float x[8];
};

namespace detail {
extern int acc_sm80; /* mt_emu_set_acc_layout's */
extern int a_mma;    /* mt_emu_set_a_layout's */
inline unsigned mma_row(unsigned lane, int i) { return (lane >> 2) + 8u * ((i >> 1) & 1); }
inline unsigned mma_col(unsigned lane, int i) { return 2u * (lane & 3) + (i & 1) + 8u * (i >> 2); }
inline unsigned acc_row(unsigned lane, int i) {
  return acc_sm80 ? mma_row(lane, i) : (lane * 8 + i) / 16;
}
inline unsigned acc_col(unsigned lane, int i) {
  return acc_sm80 ? mma_col(lane, i) : (lane * 8 + i) % 16;
}
/* element i of lane l of a matrix_a fragment: row a_row, column (k) a_col */
inline unsigned a_row(unsigned lane, int i) {
  return a_mma ? mma_row(lane, i) : (lane * 8 + i) / 16;
}
inline unsigned a_col(unsigned lane, int i) {
  return a_mma ? mma_col(lane, i) : (lane * 8 + i) % 16;
}
/* the lane·8 + element holding A's (r, k): a_row and a_col inverted */
inline unsigned a_slot(unsigned r, unsigned k) {
  if (!a_mma) return r * 16 + k;
  return ((r & 7) * 4 + (k & 7) / 2) * 8 + (k & 1) + 2 * (r >> 3) + 4 * (k >> 3);
}
inline float to_float(const __nv_bfloat16 &h) {
  uint32_t u = (uint32_t)h.x << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline float to_float(const __half &h) { /* binary16, exactly */
  unsigned e = (h.x >> 10) & 31u, m = h.x & 1023u;
  float v = e == 0    ? ldexpf((float)m, -24)
            : e == 31 ? (m ? NAN : INFINITY)
                      : ldexpf((float)(m | 1024u), (int)e - 25);
  return (h.x & 0x8000u) ? -v : v;
}
inline float to_float(const float &f) { return f; }
void check(const void *p, unsigned ldm, unsigned multiple, const char *what);
} // namespace detail

template <class Use, class T, class L>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, L> &f, const T *p, unsigned ldm) {
  static_assert(!std::is_same<Use, accumulator>::value, "an accumulator load takes a layout");
  detail::check(p, ldm, 8, "load_matrix_sync");
  unsigned lane = mt_emu::lane(), base = lane * 8;
  const bool a = std::is_same<Use, matrix_a>::value;
  for (int i = 0; i < 8; i++) {
    unsigned r = a ? detail::a_row(lane, i) : (base + i) / 16;
    unsigned c = a ? detail::a_col(lane, i) : (base + i) % 16;
    f.x[i] = detail::to_float(std::is_same<L, row_major>::value ? p[r * ldm + c] : p[c * ldm + r]);
  }
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float> &f, const float *p,
                             unsigned ldm, layout_t l) {
  detail::check(p, ldm, 4, "load_matrix_sync");
  unsigned lane = mt_emu::lane();
  for (int i = 0; i < 8; i++) {
    unsigned r = detail::acc_row(lane, i), c = detail::acc_col(lane, i);
    f.x[i] = l == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
  }
}

inline void store_matrix_sync(float *p, const fragment<accumulator, 16, 16, 16, float> &f,
                              unsigned ldm, layout_t l) {
  detail::check(p, ldm, 4, "store_matrix_sync");
  unsigned lane = mt_emu::lane();
  for (int i = 0; i < 8; i++) {
    unsigned r = detail::acc_row(lane, i), c = detail::acc_col(lane, i);
    (l == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[i];
  }
}

template <class Use, class T, class L>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, L> &f, float v) {
  for (int i = 0; i < 8; i++) f.x[i] = v;
}

/* d = a·b + c over the warp: every lane's fragments gathered at one warp
 * barrier, each lane computing its own 8 elements (fp32, k in order; a's,
 * c's and d's elements at the GPU's places, b's at the emulator's); d may
 * be c (element i of c is read before element i of d is written). */
template <class T, class LA, class LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float> &d,
                     const fragment<matrix_a, 16, 16, 16, T, LA> &a,
                     const fragment<matrix_b, 16, 16, 16, T, LB> &b,
                     const fragment<accumulator, 16, 16, 16, float> &c) {
  static_assert(!std::is_same<T, float>::value, "16-bit operands only");
  float mine[16]; /* lane l's a, then its b: elements l·8.. of each tile */
  memcpy(mine, a.x, sizeof a.x);
  memcpy(mine + 8, b.x, sizeof b.x);
  const float *all = mt_emu::warp_gather(mine);
  unsigned lane = mt_emu::lane();
  for (int i = 0; i < 8; i++) {
    unsigned r = detail::acc_row(lane, i), n = detail::acc_col(lane, i);
    float s = c.x[i];
    for (unsigned k = 0; k < 16; k++) {
      unsigned ia = detail::a_slot(r, k), ib = k * 16 + n;
      s += all[ia / 8 * 16 + ia % 8] * all[ib / 8 * 16 + 8 + ib % 8];
    }
    d.x[i] = s;
  }
}
} // namespace wmma
} // namespace nvcuda

/* ---- cuBLAS and cuBLASLt ------------------------------------------------ */

enum cublasStatus_t {
  CUBLAS_STATUS_SUCCESS = 0,
  CUBLAS_STATUS_NOT_INITIALIZED = 1,
  CUBLAS_STATUS_ALLOC_FAILED = 3,
  CUBLAS_STATUS_INVALID_VALUE = 7,
  CUBLAS_STATUS_NOT_SUPPORTED = 15,
};
enum cublasOperation_t { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 };
enum cublasComputeType_t {
  CUBLAS_COMPUTE_32F = 68,
  CUBLAS_COMPUTE_32F_FAST_16BF = 75,
  CUBLAS_COMPUTE_32F_FAST_TF32 = 77,
};
enum cudaDataType_t { CUDA_R_32F = 0, CUDA_R_16F = 2, CUDA_R_16BF = 14 };
enum cublasGemmAlgo_t { CUBLAS_GEMM_DEFAULT = -1 };
enum cublasLtEpilogue_t {
  CUBLASLT_EPILOGUE_DEFAULT = 1,
  CUBLASLT_EPILOGUE_BIAS = 4,
  CUBLASLT_EPILOGUE_GELU_AUX = 160,
  CUBLASLT_EPILOGUE_GELU_AUX_BIAS = 164,
  CUBLASLT_EPILOGUE_DGELU = 192,
};
enum cublasLtMatmulDescAttributes_t {
  CUBLASLT_MATMUL_DESC_TRANSA = 3,
  CUBLASLT_MATMUL_DESC_TRANSB = 4,
  CUBLASLT_MATMUL_DESC_EPILOGUE = 7,
  CUBLASLT_MATMUL_DESC_BIAS_POINTER = 8,
  CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER = 11,
  CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD = 12,
  CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE = 22, /* int32_t cudaDataType, -1: D's */
  CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE = 26,         /* int32_t cudaDataType, -1: D's */
};
enum cublasLtMatrixLayoutAttribute_t {
  CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT = 5,
  CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET = 6,
};
enum cublasLtMatmulPreferenceAttributes_t {
  CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES = 1,
  CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES = 5,
  CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES = 6,
  CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES = 7,
  CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES = 8,
};

typedef struct emu_blas *cublasHandle_t;
typedef struct emu_lt *cublasLtHandle_t;
typedef struct emu_desc *cublasLtMatmulDesc_t;
typedef struct emu_layout *cublasLtMatrixLayout_t;
typedef struct emu_pref *cublasLtMatmulPreference_t;
typedef struct {
  uint64_t data[8];
} cublasLtMatmulAlgo_t;
typedef struct {
  cublasLtMatmulAlgo_t algo;
  size_t workspaceSize;
  cublasStatus_t state;
  float wavesCount;
  int reserved[4];
} cublasLtMatmulHeuristicResult_t;

const char *cublasGetStatusString(cublasStatus_t st);
cublasStatus_t cublasCreate(cublasHandle_t *h);
cublasStatus_t cublasDestroy(cublasHandle_t h);
cublasStatus_t cublasSetStream(cublasHandle_t h, cudaStream_t s);
cublasStatus_t cublasSetWorkspace(cublasHandle_t h, void *ws, size_t bytes);
cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t h, cublasOperation_t ta,
                                          cublasOperation_t tb, int m, int n, int k,
                                          const void *alpha, const void *A, cudaDataType_t at,
                                          int lda, long long sA, const void *B, cudaDataType_t bt,
                                          int ldb, long long sB, const void *beta, void *C,
                                          cudaDataType_t ct, int ldc, long long sC, int batch,
                                          cublasComputeType_t compute, cublasGemmAlgo_t algo);

cublasStatus_t cublasLtCreate(cublasLtHandle_t *h);
cublasStatus_t cublasLtDestroy(cublasLtHandle_t h);
cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t *d, cublasComputeType_t compute,
                                        cudaDataType_t scale);
cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t d);
cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t d,
                                              cublasLtMatmulDescAttributes_t a, const void *buf,
                                              size_t bytes);
cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t *l, cudaDataType_t type,
                                          uint64_t rows, uint64_t cols, int64_t ld);
cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t l);
cublasStatus_t cublasLtMatrixLayoutSetAttribute(cublasLtMatrixLayout_t l,
                                                cublasLtMatrixLayoutAttribute_t a, const void *buf,
                                                size_t bytes);
cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t *p);
cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t p);
cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t p,
                                                    cublasLtMatmulPreferenceAttributes_t a,
                                                    const void *buf, size_t bytes);
cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t h, cublasLtMatmulDesc_t op,
                                              cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b,
                                              cublasLtMatrixLayout_t c, cublasLtMatrixLayout_t d,
                                              cublasLtMatmulPreference_t pref, int requested,
                                              cublasLtMatmulHeuristicResult_t *res, int *returned);
cublasStatus_t cublasLtMatmul(cublasLtHandle_t h, cublasLtMatmulDesc_t op, const void *alpha,
                              const void *A, cublasLtMatrixLayout_t a, const void *B,
                              cublasLtMatrixLayout_t b, const void *beta, const void *C,
                              cublasLtMatrixLayout_t c, void *D, cublasLtMatrixLayout_t d,
                              const cublasLtMatmulAlgo_t *algo, void *ws, size_t ws_bytes,
                              cudaStream_t s);

/* Test hooks: the number of GEMMs each path ran (mt_emu_gemm_counts for
 * C), and a switch that makes the cuBLASLt heuristic find nothing (so the
 * cuBLAS fallback runs). */
namespace mt_emu {
extern std::atomic<long> gemms_lt, gemms_lt_gelu, gemms_lt_dgelu, gemms_blas, gemms_16bit;
extern int lt_disabled;
} // namespace mt_emu

/* ---- work that completes later (for nccl_emu.cc) ------------------------ */

namespace mt_emu {

/* An entry of a stream's queue that completes after it was issued: an NCCL
 * operation, or a wait for an event. Streams run their queue in order: an
 * item is started once everything before it on its stream has completed.
 * Everything here is called with async_mutex() held. */
struct async_item {
  cudaStream_t stream = nullptr; /* set by async_enqueue */
  uint64_t seq = 0;              /* its place on the stream */
  std::string desc;              /* for messages: "ncclAllReduce #3 of rank 1 of 4" */
  bool demanded = false;         /* a host thread waits for it, or for work that needs it */
  virtual ~async_item() {}
  /* Called once it heads its stream; may call async_complete on itself or others. */
  virtual void start() = 0;
  /* Called once, when it is first demanded (demanded is set): marks what it
   * needs in turn (mark_demanded). Moves no data and completes nothing. */
  virtual void on_demand() {}
};

std::mutex &async_mutex();
/* Appends it to s (a stream, not the legacy default one), which must belong
 * to the device of the work. */
void async_enqueue(cudaStream_t s, async_item *it);
/* Takes it off its stream, done or dropped (an abort), wherever it stands;
 * the caller still owns it. Starts the next item. */
void async_complete(async_item *it);
/* Blocks the calling thread (lk holds async_mutex()) until done(), which is
 * checked whenever queued work moves or async_notify() is called. */
void async_wait(std::unique_lock<std::mutex> &lk, const char *what,
                const std::function<bool()> &done);
void async_notify();
/* A host thread needs the items of s (NULL: of every stream of the current
 * device) queued before `before` (their seq; UINT64_MAX: all): marks them
 * demanded, with what they need (on_demand). nccl_emu's late mode runs an
 * operation only once it is demanded; marking moves nothing. */
void mark_demanded(cudaStream_t s, uint64_t before);
/* mark_demanded, then runs what is demanded and ready (set_demand_runner's
 * function), as every wait, query and synchronize of the runtime does
 * before it looks. */
void demand(cudaStream_t s, uint64_t before);
void set_demand_runner(void (*run)(void));
/* The device s belongs to; dies on a handle that is not a live stream. */
int stream_device(cudaStream_t s);
/* The device whose memory holds [p, p + bytes), or -1 for host memory; dies
 * when the range starts in an allocation and runs past its end. */
int device_of(const void *p, size_t bytes);
/* The calling thread's current device. */
int current_device();

} // namespace mt_emu

#endif /* __cplusplus */

#endif
