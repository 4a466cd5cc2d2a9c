/* nccl.c — the NCCL backend of the comm layer (CUDA devices; built when
 * have_cuda).
 *
 * Rank 0 makes the ncclUniqueId and publishes it under <prefix>/nccl/id; all
 * ranks then init a non-blocking communicator (config.blocking = 0). Every
 * call is enqueued on the group's own stream and then watched: the thread
 * polls ncclCommGetAsyncError and the stream until the work is done, the
 * deadline passes or the group is aborted, and in the last two cases calls
 * ncclCommAbort, so a dead peer never hangs the rank. Every operation first
 * makes the group's stream wait (an event) for what is queued on the
 * device's compute stream, so it reads what the kernels before it wrote;
 * kernels queued after a blocking operation run after it, since the host
 * saw it complete. Started reduces (mt_comm_reduce_start) return once NCCL
 * has queued them and are watched by wait; started sends and receives
 * (mt_comm_sendrecv_start) likewise, each request watched through an event
 * recorded behind it on the group's stream.
 *
 * Buffers are device memory of opts->device. Never links libcuda directly:
 * only the runtime (cudart) and NCCL.
 */
#include "comm_impl.h"
#include "err.h"
#include "monotime.h"

#ifdef MT_CUDA_EMU /* tests: the CUDA runtime and NCCL emulated on the CPU (tests/gpu/emu) */
#include "cuda_emu.h"
#include "nccl_emu.h"
#else
#include <cuda_runtime_api.h>
#include <nccl.h>
#endif
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef struct nccl_group {
  int rank, size, device;
  ncclComm_t comm;
  cudaStream_t stream;
  cudaStream_t compute;                  /* the device's: what operations wait for */
  cudaEvent_t ready;                     /* recorded on compute before each operation */
  float *scratch;                        /* one float on the device, for barrier */
  cudaEvent_t p2p_done[MT_COMM_P2P_MAX]; /* per started point-to-point slot: recorded
                                            on stream behind its send/recv */
  atomic_int aborted;                    /* mt_comm_abort was called */
  pthread_mutex_t mu;                    /* guards in_op, failed and comm_aborted */
  pthread_cond_t idle;                   /* signalled when in_op drops to 0 */
  int in_op;                             /* the owner thread is inside an operation */
  int failed;         /* an operation failed: the communicator is to be aborted */
  int comm_aborted;   /* ncclCommAbort has been called */
  atomic_int reaping; /* the reaper: 0 not yet, 1 starting, 2 a thread to join, 3 done */
  pthread_t reaper;
} nccl_group;

static ncclDataType_t nccl_type(mt_comm_dtype dt) {
  switch (dt) {
  case MT_COMM_F32: return ncclFloat32;
  case MT_COMM_F64: return ncclFloat64;
  case MT_COMM_BF16: return ncclBfloat16;
  case MT_COMM_F16: return ncclFloat16;
  case MT_COMM_I32: return ncclInt32;
  case MT_COMM_I64: return ncclInt64;
  default: return ncclUint8;
  }
}

static ncclRedOp_t nccl_op(mt_comm_op op) { return op == MT_COMM_MAX ? ncclMax : ncclSum; }

/* Aborts the communicator once; caller holds g->mu. */
static void abort_locked(nccl_group *g) {
  if (g->comm && !g->comm_aborted) {
    ncclCommAbort(g->comm);
    g->comm_aborted = 1;
  }
}

/* Marks the communicator to be aborted (leave() has the reaper do it) and
 * reports what (with NCCL's last error, when it has one);
 * MT_ECANCELED when the group was aborted. Inside an operation only. */
static int nccl_fail(nccl_group *g, int code, const char *what) {
  pthread_mutex_lock(&g->mu);
  const char *last = g->comm && !g->comm_aborted ? ncclGetLastError(g->comm) : NULL;
  char extra[512] = "";
  if (last && *last) snprintf(extra, sizeof extra, " (%s)", last);
  g->failed = 1;
  pthread_mutex_unlock(&g->mu);
  if (atomic_load(&g->aborted)) return mt_seterr(MT_ECANCELED, "aborted");
  return mt_seterr(code, "%s%s", what, extra);
}

/* Watches what was just enqueued (enq: the call's result) until the stream
 * has run it (with done: until that event, recorded on the stream, has
 * passed), the communicator reports an error, the deadline passes or the
 * group is aborted. Polls hard for 2 ms, then every 100 us. */
static int watch_until(nccl_group *g, ncclResult_t enq, cudaEvent_t done, int timeout_ms) {
  if (enq != ncclSuccess && enq != ncclInProgress)
    return nccl_fail(g, MT_EIO, ncclGetErrorString(enq));
  int64_t start = mt_mono_us(), deadline = start + (int64_t)timeout_ms * 1000;
  for (;;) {
    if (atomic_load(&g->aborted)) return nccl_fail(g, MT_ECANCELED, "aborted");
    ncclResult_t st = ncclSuccess;
    ncclResult_t rc = ncclCommGetAsyncError(g->comm, &st);
    if (rc != ncclSuccess) st = rc;
    if (st != ncclSuccess && st != ncclInProgress)
      return nccl_fail(g, MT_EIO, ncclGetErrorString(st));
    if (st == ncclSuccess) {
      cudaError_t q = done ? cudaEventQuery(done) : cudaStreamQuery(g->stream);
      if (q == cudaSuccess) return 0;
      if (q != cudaErrorNotReady) return nccl_fail(g, MT_EIO, cudaGetErrorString(q));
    }
    int64_t t = mt_mono_us();
    if (t > deadline) {
      char what[64];
      snprintf(what, sizeof what, "timed out after %d ms", timeout_ms);
      return nccl_fail(g, MT_ETIMEDOUT, what);
    }
    if (t - start < 2000)
      sched_yield();
    else
      usleep(100);
  }
}

static int watch(nccl_group *g, ncclResult_t enq, int timeout_ms) {
  return watch_until(g, enq, NULL, timeout_ms);
}

/* Enters an operation: makes the device current and refuses an aborted group;
 * with order, the group's stream first waits for the work queued so far on
 * the compute stream. leave() must follow. */
static void start_reaper(nccl_group *g);
static int leave(nccl_group *g, int rc);

static int enter_ordered(nccl_group *g, int order) {
  pthread_mutex_lock(&g->mu);
  int refused = atomic_load(&g->aborted) || g->failed || g->comm_aborted;
  if (!refused) g->in_op = 1;
  pthread_mutex_unlock(&g->mu);
  if (refused) return mt_seterr(MT_ECANCELED, "aborted");
  cudaError_t e = cudaSetDevice(g->device);
  if (e == cudaSuccess && order && g->compute) e = cudaEventRecord(g->ready, g->compute);
  if (e == cudaSuccess && order && g->compute) e = cudaStreamWaitEvent(g->stream, g->ready, 0);
  if (e != cudaSuccess) {
    cudaGetLastError(); /* told here: not the next launch's error */
    return leave(g, mt_seterr(MT_EIO, "cuda: device %d: ordering after the compute stream: %s",
                              g->device, cudaGetErrorString(e)));
  }
  return 0;
}

static int enter(nccl_group *g) { return enter_ordered(g, 1); }

/* Ends an operation. A communicator that failed or was aborted meanwhile is
 * aborted now, so peers learn of it at once, not at destroy: by the reaper,
 * which waited for this (nccl_abort), or one started here. */
static int leave(nccl_group *g, int rc) {
  pthread_mutex_lock(&g->mu);
  g->in_op = 0;
  int abort_now = (atomic_load(&g->aborted) || g->failed) && !g->comm_aborted;
  pthread_cond_broadcast(&g->idle);
  pthread_mutex_unlock(&g->mu);
  if (abort_now) start_reaper(g);
  return rc;
}

static void nccl_destroy(void *impl) {
  nccl_group *g = impl;
  if (!g) return;
  while (atomic_load(&g->reaping) == 1) sched_yield(); /* an abort starting its reaper */
  if (atomic_load(&g->reaping) == 2) pthread_join(g->reaper, NULL);
  cudaSetDevice(g->device);
  pthread_mutex_lock(&g->mu);
  if (g->comm && !g->comm_aborted) {
    /* A clean finalize flushes outstanding work; bounded, then abort. */
    int64_t deadline = mt_mono_us() + 10 * 1000000;
    ncclResult_t st = ncclCommFinalize(g->comm);
    while (st == ncclInProgress && mt_mono_us() < deadline) {
      usleep(100);
      if (ncclCommGetAsyncError(g->comm, &st) != ncclSuccess) break;
    }
    if (st == ncclSuccess)
      ncclCommDestroy(g->comm);
    else
      ncclCommAbort(g->comm);
  }
  pthread_mutex_unlock(&g->mu);
  if (g->stream) cudaStreamDestroy(g->stream);
  if (g->ready) cudaEventDestroy(g->ready);
  if (g->scratch) cudaFree(g->scratch);
  for (int i = 0; i < MT_COMM_P2P_MAX; i++)
    if (g->p2p_done[i]) cudaEventDestroy(g->p2p_done[i]);
  pthread_cond_destroy(&g->idle);
  pthread_mutex_destroy(&g->mu);
  free(g);
}

/* The abort itself, on a thread of its own, once the owner is out of any
 * operation (NCCL calls on one communicator must not overlap); the owner's
 * watch sees the abort within 100 us and leaves. */
static void *reap(void *arg) {
  nccl_group *g = arg;
  cudaSetDevice(g->device);
  pthread_mutex_lock(&g->mu);
  while (g->in_op) pthread_cond_wait(&g->idle, &g->mu);
  abort_locked(g);
  pthread_mutex_unlock(&g->mu);
  return NULL;
}

/* Starts the reaper, once: on a thread of its own, or here when no thread
 * can be had. */
static void start_reaper(nccl_group *g) {
  int none = 0;
  if (!atomic_compare_exchange_strong(&g->reaping, &none, 1)) return; /* started before */
  if (pthread_create(&g->reaper, NULL, reap, g) == 0) {
    atomic_store(&g->reaping, 2);
    return;
  }
  reap(g);
  atomic_store(&g->reaping, 3);
}

/* Marks the group aborted, which the owner's watch sees within 100 us, and
 * calls ncclCommAbort on a thread of its own: the caller (the daemon's event
 * loop, or a failing rank aborting every group of the process) never waits
 * for it. ncclCommAbort frees device memory, and a free waits for the
 * device's kernels, so one abort can wait on another group's kernel that
 * spins on a dead peer until that group is aborted too (NCCL issues 549,
 * 1013): called in turn on one thread, the aborts could wait for each other
 * forever; each on its own, they all proceed. */
static void nccl_abort(void *impl) {
  nccl_group *g = impl;
  atomic_store(&g->aborted, 1);
  start_reaper(g);
}

static int nccl_create(const mt_comm_opts *o, int timeout_ms, void **impl) {
  if (!o->device || o->device->kind != MT_DEVICE_CUDA)
    return mt_seterr(MT_EINVAL, "nccl: the group needs a CUDA device (got %s)",
                     o->device ? o->device->name : "none");
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) count = 0; /* no driver: no devices */
  if (o->device->index < 0 || o->device->index >= count)
    return mt_seterr(MT_ENOTSUP, "nccl: %s: %d CUDA device(s) usable here", o->device->name, count);

  int64_t deadline = mt_mono_us() + (int64_t)timeout_ms * 1000;
  nccl_group *g = calloc(1, sizeof *g);
  if (!g) return mt_seterr(MT_ENOMEM, "nccl: out of memory");
  g->rank = o->rank;
  g->size = o->size;
  g->device = o->device->index;
  atomic_init(&g->aborted, 0);
  atomic_init(&g->reaping, 0);
  pthread_mutex_init(&g->mu, NULL);
  pthread_cond_init(&g->idle, NULL);

  int rc = 0;
  cudaError_t ce = cudaSetDevice(g->device);
  if (ce == cudaSuccess) ce = cudaStreamCreate(&g->stream);
  if (ce == cudaSuccess) ce = cudaEventCreateWithFlags(&g->ready, cudaEventDisableTiming);
  if (ce == cudaSuccess) ce = cudaMalloc((void **)&g->scratch, sizeof(float));
  /* the barrier's all-reduce sums it: a finite 0, not whatever the allocation held */
  if (ce == cudaSuccess) ce = cudaMemsetAsync(g->scratch, 0, sizeof(float), g->stream);
  for (int i = 0; i < MT_COMM_P2P_MAX && ce == cudaSuccess; i++)
    ce = cudaEventCreateWithFlags(&g->p2p_done[i], cudaEventDisableTiming);
  g->compute = o->device->stream;
  if (ce != cudaSuccess) {
    rc = mt_seterr(MT_EIO, "cuda: %s: %s", o->device->name, cudaGetErrorString(ce));
    goto fail;
  }

  /* The unique id: made by rank 0, read by the others through the store. */
  char key[512];
  ncclUniqueId id;
  if ((rc = mt__comm_key(key, sizeof key, o->prefix, "nccl/id"))) goto fail;
  if (o->rank == 0) {
    ncclResult_t r = ncclGetUniqueId(&id);
    if (r != ncclSuccess) {
      rc = mt_seterr(MT_EIO, "nccl: get unique id: %s", ncclGetErrorString(r));
      goto fail;
    }
    if ((rc = mt_store_set(o->store, key, &id, sizeof id))) goto fail;
  } else {
    void *value = NULL;
    size_t bytes = 0;
    int64_t left_ms = (deadline - mt_mono_us()) / 1000;
    rc = mt_store_get(o->store, key, &value, &bytes, left_ms > 0 ? (int)left_ms : 0);
    if (!rc && bytes != sizeof id)
      rc = mt_seterr(MT_ECORRUPT, "nccl: key %s holds %zu bytes, not an ncclUniqueId (%zu)", key,
                     bytes, sizeof id);
    if (!rc) memcpy(&id, value, sizeof id);
    free(value);
    if (rc) goto fail;
  }

  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  ncclResult_t r = ncclCommInitRankConfig(&g->comm, o->size, id, o->rank, &config);
  if (r != ncclSuccess && r != ncclInProgress) {
    rc = mt_seterr(MT_EIO, "nccl: init rank %d of %d: %s", o->rank, o->size, ncclGetErrorString(r));
    g->comm = NULL;
    goto fail;
  }
  for (;;) {
    ncclResult_t st = ncclSuccess;
    if (ncclCommGetAsyncError(g->comm, &st) != ncclSuccess) st = ncclInternalError;
    if (st == ncclSuccess) break;
    if (st != ncclInProgress) {
      rc = mt_seterr(MT_EIO, "nccl: init rank %d of %d: %s (%s)", o->rank, o->size,
                     ncclGetErrorString(st), ncclGetLastError(g->comm));
      goto fail;
    }
    if (mt_mono_us() > deadline) {
      rc = mt_seterr(MT_ETIMEDOUT, "nccl: init rank %d of %d: timed out after %d ms", o->rank,
                     o->size, timeout_ms);
      goto fail;
    }
    if (o->cancel && __atomic_load_n(o->cancel, __ATOMIC_SEQ_CST)) {
      rc = mt_seterr(MT_ECANCELED, "nccl: init rank %d of %d: cancelled", o->rank, o->size);
      goto fail;
    }
    usleep(200);
  }
  *impl = g;
  return 0;

fail:
  if (g->comm) {
    ncclCommAbort(g->comm);
    g->comm_aborted = 1;
  }
  nccl_destroy(g);
  return rc;
}

static int nccl_allreduce(void *impl, const void *send, void *recv, size_t count, mt_comm_dtype dt,
                          mt_comm_op op, int timeout_ms) {
  nccl_group *g = impl;
  int rc = enter(g);
  if (rc) return rc;
  ncclResult_t r = ncclAllReduce(send, recv, count, nccl_type(dt), nccl_op(op), g->comm, g->stream);
  return leave(g, watch(g, r, timeout_ms));
}

static int nccl_reduce_scatter(void *impl, const void *send, void *recv, size_t count,
                               mt_comm_dtype dt, mt_comm_op op, int timeout_ms) {
  nccl_group *g = impl;
  int rc = enter(g);
  if (rc) return rc;
  ncclResult_t r =
      ncclReduceScatter(send, recv, count, nccl_type(dt), nccl_op(op), g->comm, g->stream);
  return leave(g, watch(g, r, timeout_ms));
}

static int nccl_reduce(void *impl, const void *send, void *recv, size_t count, mt_comm_dtype dt,
                       mt_comm_op op, int root, int timeout_ms) {
  nccl_group *g = impl;
  int rc = enter(g);
  if (rc) return rc;
  ncclResult_t r =
      ncclReduce(send, recv, count, nccl_type(dt), nccl_op(op), root, g->comm, g->stream);
  return leave(g, watch(g, r, timeout_ms));
}

/* Waits until NCCL has taken a call (enq: its result) onto the stream: a
 * non-blocking communicator may answer ncclInProgress until the call is
 * enqueued, and takes no other call before. */
static int queued(nccl_group *g, ncclResult_t r, int timeout_ms) {
  if (r != ncclSuccess && r != ncclInProgress) return nccl_fail(g, MT_EIO, ncclGetErrorString(r));
  int64_t deadline = mt_mono_us() + (int64_t)timeout_ms * 1000;
  while (r == ncclInProgress) {
    if (atomic_load(&g->aborted)) return nccl_fail(g, MT_ECANCELED, "aborted");
    ncclResult_t q = ncclCommGetAsyncError(g->comm, &r);
    if (q != ncclSuccess) r = q;
    if (r != ncclSuccess && r != ncclInProgress) return nccl_fail(g, MT_EIO, ncclGetErrorString(r));
    if (r == ncclInProgress && mt_mono_us() > deadline) {
      char what[64];
      snprintf(what, sizeof what, "queueing timed out after %d ms", timeout_ms);
      return nccl_fail(g, MT_ETIMEDOUT, what);
    }
    if (r == ncclInProgress) sched_yield();
  }
  return 0;
}

/* Queues the reduce and returns once NCCL has taken it; the work itself is
 * watched by nccl_wait. */
static int nccl_reduce_start(void *impl, const void *send, void *recv, size_t count,
                             mt_comm_dtype dt, mt_comm_op op, int root, int timeout_ms) {
  nccl_group *g = impl;
  int rc = enter(g);
  if (rc) return rc;
  ncclResult_t r =
      ncclReduce(send, recv, count, nccl_type(dt), nccl_op(op), root, g->comm, g->stream);
  return leave(g, queued(g, r, timeout_ms));
}

static int nccl_wait(void *impl, int timeout_ms) {
  nccl_group *g = impl;
  int rc = enter_ordered(g, 0);
  if (rc) return rc;
  return leave(g, watch(g, ncclSuccess, timeout_ms));
}

static int nccl_allgather(void *impl, const void *send, void *recv, size_t bytes, int timeout_ms) {
  nccl_group *g = impl;
  int rc = enter(g);
  if (rc) return rc;
  ncclResult_t r = ncclAllGather(send, recv, bytes, ncclUint8, g->comm, g->stream);
  return leave(g, watch(g, r, timeout_ms));
}

static int nccl_broadcast(void *impl, void *buf, size_t bytes, int root, int timeout_ms) {
  nccl_group *g = impl;
  int rc = enter(g);
  if (rc) return rc;
  ncclResult_t r = ncclBroadcast(buf, buf, bytes, ncclUint8, root, g->comm, g->stream);
  return leave(g, watch(g, r, timeout_ms));
}

static int nccl_send(void *impl, const void *buf, size_t bytes, int peer, int timeout_ms) {
  nccl_group *g = impl;
  int rc = enter(g);
  if (rc) return rc;
  ncclResult_t r = ncclSend(buf, bytes, ncclUint8, peer, g->comm, g->stream);
  return leave(g, watch(g, r, timeout_ms));
}

static int nccl_recv(void *impl, void *buf, size_t bytes, int peer, int timeout_ms) {
  nccl_group *g = impl;
  int rc = enter(g);
  if (rc) return rc;
  ncclResult_t r = ncclRecv(buf, bytes, ncclUint8, peer, g->comm, g->stream);
  return leave(g, watch(g, r, timeout_ms));
}

/* A send and a receive (either count may be 0) as one NCCL group on the
 * group's stream; the result of queueing them. */
static ncclResult_t post_sendrecv(nccl_group *g, const void *send, size_t send_bytes, int dst,
                                  void *recv, size_t recv_bytes, int src) {
  ncclResult_t r = ncclGroupStart();
  if (r == ncclSuccess && send_bytes)
    r = ncclSend(send, send_bytes, ncclUint8, dst, g->comm, g->stream);
  if ((r == ncclSuccess || r == ncclInProgress) && recv_bytes)
    r = ncclRecv(recv, recv_bytes, ncclUint8, src, g->comm, g->stream);
  ncclResult_t end = ncclGroupEnd();
  return r == ncclSuccess || r == ncclInProgress ? end : r;
}

static int nccl_sendrecv(void *impl, const void *send, size_t send_bytes, int dst, void *recv,
                         size_t recv_bytes, int src, int timeout_ms) {
  nccl_group *g = impl;
  int rc = enter(g);
  if (rc) return rc;
  ncclResult_t r = post_sendrecv(g, send, send_bytes, dst, recv, recv_bytes, src);
  return leave(g, watch(g, r, timeout_ms));
}

/* Queues the send and the receive as one NCCL group behind the compute
 * stream's work, and records each slot's event behind them; the host goes on
 * at once. */
static int nccl_sendrecv_start(void *impl, int send_slot, const void *send, size_t send_bytes,
                               int dst, int recv_slot, void *recv, size_t recv_bytes, int src,
                               int timeout_ms) {
  nccl_group *g = impl;
  int rc = enter(g);
  if (rc) return rc;
  ncclResult_t r = post_sendrecv(g, send, send_slot >= 0 ? send_bytes : 0, dst, recv,
                                 recv_slot >= 0 ? recv_bytes : 0, src);
  if ((rc = queued(g, r, timeout_ms))) return leave(g, rc);
  cudaError_t e = cudaSuccess;
  if (send_slot >= 0) e = cudaEventRecord(g->p2p_done[send_slot], g->stream);
  if (e == cudaSuccess && recv_slot >= 0) e = cudaEventRecord(g->p2p_done[recv_slot], g->stream);
  if (e != cudaSuccess) return leave(g, nccl_fail(g, MT_EIO, cudaGetErrorString(e)));
  return leave(g, 0);
}

/* Watches one started request's event; what was queued behind it on the
 * group's stream may still run. */
static int nccl_p2p_wait(void *impl, int slot, int timeout_ms) {
  nccl_group *g = impl;
  int rc = enter_ordered(g, 0);
  if (rc) return rc;
  return leave(g, watch_until(g, ncclSuccess, g->p2p_done[slot], timeout_ms));
}

static int nccl_barrier(void *impl, int timeout_ms) {
  nccl_group *g = impl;
  int rc = enter(g);
  if (rc) return rc;
  ncclResult_t r =
      ncclAllReduce(g->scratch, g->scratch, 1, ncclFloat32, ncclSum, g->comm, g->stream);
  return leave(g, watch(g, r, timeout_ms));
}

const mt__comm_backend mt__comm_nccl = {
    .name = "nccl",
    .create = nccl_create,
    .destroy = nccl_destroy,
    .abort = nccl_abort,
    .allreduce = nccl_allreduce,
    .reduce_scatter = nccl_reduce_scatter,
    .allgather = nccl_allgather,
    .broadcast = nccl_broadcast,
    .reduce = nccl_reduce,
    .reduce_start = nccl_reduce_start,
    .wait = nccl_wait,
    .send = nccl_send,
    .recv = nccl_recv,
    .sendrecv = nccl_sendrecv,
    .sendrecv_start = nccl_sendrecv_start,
    .p2p_wait = nccl_p2p_wait,
    .barrier = nccl_barrier,
};
