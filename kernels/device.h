/* device.h — one compute device: its memory and its backend's op table.
 *
 * A device is "cpu:N" (a virtual CPU device; N only names it) or "cuda:N".
 * Everything above kernels/ reaches compute through d->ops, never by calling a
 * backend directly, so the model and engine run unchanged on either backend.
 * This module knows nothing of parallelism and never exits: failures return a
 * negative MT_E* code with mt_errmsg() set.
 */
#ifndef MT_DEVICE_H
#define MT_DEVICE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct mt_ops mt_ops;
struct CUstream_st; /* cudaStream_t, without the CUDA headers */

typedef enum { MT_DEVICE_CPU = 0, MT_DEVICE_CUDA = 1 } mt_device_kind;

/* What GEMMs (linear layers, attention) compute in; tensors stay fp32 either
 * way. TF32 and BF16 round the GEMM inputs to 10- and 7-bit mantissas inside
 * the GEMM (tensor cores) and accumulate in fp32. A request: the CPU backend
 * always computes in fp32. */
typedef enum { MT_MATMUL_FP32 = 0, MT_MATMUL_TF32 = 1, MT_MATMUL_BF16 = 2 } mt_matmul_precision;

typedef struct mt_device {
  mt_device_kind kind;
  int index;                  /* N of cpu:N / cuda:N */
  int threads;                /* CPU: threads its ops use */
  const mt_ops *ops;          /* the backend's op table */
  char name[32];              /* "cpu:0" */
  void *impl;                 /* backend state (streams, handles) */
  mt_matmul_precision matmul; /* MT_MATMUL_FP32 after open */
  /* CUDA: 1 lets linear_gelu_fwd and linear_bwd_dgelu apply GeLU and its
   * gradient in cuBLASLt's epilogues where it takes the shape (ops.h); 0
   * runs them as their own kernels. 1 after open unless the environment
   * says MTNLG_GELU_EPILOGUE=0: which is faster depends on the GPU and the
   * cuBLASLt release (tests/gpu/run measures both). Unused on the CPU. */
  int gelu_epilogue;
  /* CUDA (NULL on CPU): every op, copy and memset of this device runs in
   * order on `stream`. Collectives do not: each NCCL group of the device has
   * a stream of its own (daemon/comm/nccl.c), which waits for this one
   * through an event before each operation, so a dp reduction, a pipeline
   * send and a receive on different links overlap compute and each other,
   * where one shared communication stream would queue them in turn. */
  struct CUstream_st *stream;
  struct mt_device_ledger *ledger; /* what mt_device_alloc holds (mt_device_mem_stats) */
} mt_device;

/* Opens "cpu:N" or "cuda:N". cuda is refused with a clear message when this
 * build has no CUDA backend or the machine no usable GPU ("no CUDA device:
 * cudaGetDeviceCount: ..."). */
int mt_device_open(mt_device *d, const char *spec);
void mt_device_close(mt_device *d);

/* Devices of a kind usable here: "cuda" counts GPUs (0 without a GPU, a
 * driver or a CUDA build: never an error); "cpu" is 1 (cpu:N are virtual
 * names over the host). MT_EINVAL for another kind. */
int mt_device_count(const char *kind);

/* Resolves node.devices = "auto": writes "cuda:0-K" for the first `want`
 * GPUs (all of them when want <= 0), or, with no GPU, "cpu:W" (W = want, at
 * least 1) and logs the fallback with the reason. Returns the number of
 * devices, or MT_EINVAL when out (len bytes) is too small. */
int mt_device_resolve_auto(char *out, size_t len, int want);

/* 1 when this process has lost the device: a CUDA fault that corrupts the
 * GPU's context (an illegal address, a faulting kernel, an uncorrectable
 * ECC error) makes every later call on it fail until the process exits;
 * the runtime's reason goes to why. 0 for a GPU that answers, a CPU device
 * or a spec naming neither. Never waits for the GPU. */
int mt_device_lost(const char *spec, char *why, size_t why_len);

/* Device memory: 64-byte aligned (CUDA: 256) and zeroed. NULL with
 * mt_errmsg() on failure. Copies from and to the host are complete when they
 * return (the host buffer may be reused); device-to-device copies and memsets
 * are ordered with the ops on the device's stream. */
void *mt_device_alloc(mt_device *d, size_t bytes);
void mt_device_free(mt_device *d, void *p);
/* What a device's allocations hold, Megatron's memory scalars
 * (--log-memory-to-tensorboard, from torch.cuda.memory_stats): allocated,
 * the bytes mt_device_alloc handed out and mt_device_free has not taken
 * back, as asked (before alignment); max_allocated, the most of that since
 * the device opened; count, those allocations; reserved, what the device
 * has in use: a GPU's memory less its free memory (cudaMemGetInfo: the
 * CUDA context, cuBLAS's workspaces and NCCL's buffers beside ours, and
 * any other process's), on a CPU device allocated again (it reserves
 * nothing beyond what it hands out). MT_EIO when a GPU cannot say. */
typedef struct mt_device_mem {
  size_t allocated, max_allocated, reserved;
  int64_t count;
} mt_device_mem;
int mt_device_mem_stats(mt_device *d, mt_device_mem *m);
int mt_device_memcpy_htod(mt_device *d, void *dst, const void *src, size_t bytes);
int mt_device_memcpy_dtoh(mt_device *d, void *dst, const void *src, size_t bytes);
int mt_device_memcpy_dtod(mt_device *d, void *dst, const void *src, size_t bytes);
int mt_device_memset0(mt_device *d, void *p, size_t bytes);
/* Waits for everything queued on the device. Ops cannot return errors (see
 * ops.h), so the first error one met on a CUDA device (a failed launch or
 * GEMM, a fault) is reported here, once, with MT_EIO. */
int mt_device_sync(mt_device *d);
/* How a GPU computes a 16-bit job's attention from now on (the job's
 * model.attention_backend): "flash", "chunked" or "auto"
 * (mt__cuda_attention_path, kernels/cuda/cuda_backend.h); NULL or "": as
 * it is. A CPU device has one way and takes any of them as it is. MT_EINVAL
 * for another name. */
int mt_device_set_attention(mt_device *d, const char *backend);

/* Starts (on nonzero) or stops the CUDA profiler's capture on a GPU
 * (cudaProfilerStart, cudaProfilerStop: `nsys profile
 * --capture-range=cudaProfilerApi` records what runs between; without a
 * profiler attached nothing happens). MT_ENOTSUP on a CPU device, MT_EIO
 * when the runtime refuses. */
int mt_device_profiler(mt_device *d, int on);

/* Waits for everything queued on the device, as mt_device_sync, but reports
 * nothing: an error it meets is kept for the next mt_device_sync, which
 * still tells it once. For timers (train.timing_log_level), whose waits
 * must not take a step's fault from the step's own sync. */
void mt_device_wait(mt_device *d);

/* Whether a fault waits to be told by the next mt_device_sync (a failed
 * launch or GEMM recorded on a CUDA device, or a fault its stream has met
 * by now that no sync reported yet), without waiting for the device: 1,
 * with the fault's message in msg (len bytes; may be NULL), or 0. The
 * fault stays for mt_device_sync. For a rank that fails before its step's
 * sync, which has a fault of its own device to name first. A CPU device
 * has none: 0. */
int mt_device_fault_pending(mt_device *d, char *msg, size_t len);

/* Memory of the device `spec` names ("cpu:N": the machine's RAM, shared by
 * every cpu device; "cuda:N": the GPU's, total and free now), in bytes,
 * without opening it. MT_ENOTSUP for a GPU this build or machine lacks. */
int mt_device_memory(const char *spec, size_t *total, size_t *free_bytes);

/* CUDA loads a kernel's module at its first launch by default (lazy
 * loading, CUDA 12.2 on), and that load waits for the device's queued work
 * to drain while it holds a lock of the driver's. Beside an NCCL kernel that
 * waits for its peers (a receive posted ahead, a started send or bucket
 * reduce) a rank's first launch of a kernel then stalls until the peers
 * move, and can deadlock with another rank thread of the process that needs
 * the lock to launch what those peers wait for (XLA meets it at its first
 * collective and NVIDIA's torchcomms reproduces it). A process whose GPU
 * ranks run collectives calls this before its first CUDA call: unless
 * CUDA_MODULE_LOADING is set, every module then loads when CUDA starts
 * (some seconds, and device memory out of the tenth the memory check
 * leaves for the CUDA context, the allocator and NCCL).
 * mt_device_cuda_loading() says how modules load, for a log line. */
void mt_device_eager_modules(void);
const char *mt_device_cuda_loading(void);

/* Number of CUDA devices usable here (0 without a GPU or driver);
 * mt_device_count("cuda"). */
int mt_cuda_device_count(void);

#ifdef __cplusplus
}
#endif

#endif
