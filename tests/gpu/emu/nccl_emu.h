/* nccl_emu.h — NCCL, as far as daemon/comm/nccl.c (and the engine) use it,
 * emulated on the CPU on top of cuda_emu.h: ranks are threads of one process,
 * device memory is host memory, so the collectives of CUDA builds run in CI.
 *
 * What it keeps of NCCL, so the code above meets the same cases:
 * - Communicators of one unique id meet in the process. A non-blocking one
 *   (config.blocking = 0) answers ncclInProgress from init and
 *   ncclCommGetAsyncError says so until every rank has joined; its calls
 *   answer ncclInProgress and the next ncclCommGetAsyncError says
 *   ncclInProgress once more before ncclSuccess. A call before that success
 *   is refused (ncclInvalidUsage), as NCCL requires.
 * - Operations queue on their stream in order and complete asynchronously:
 *   a collective once every rank has posted it and it heads each rank's
 *   stream (the last rank to get there moves the data for all), a send and
 *   its receive once both have (rendezvous: two ranks that both send first
 *   wait for each other, as with NCCL; within ncclGroupStart/End the order
 *   does not matter). Until then cudaStreamQuery answers cudaErrorNotReady.
 *   A rank that never posts keeps its peers waiting: only their deadline
 *   ends it.
 * - ncclCommAbort drops the rank's queued work (its stream drains) and is a
 *   remote error to its peers: their ncclCommGetAsyncError answers
 *   ncclRemoteError from then on, so they fail instead of hanging.
 * - Reductions go over ranks in order 0, 1, ... in the element type (f16 and
 *   bf16 round after every step); max and min are fmax and fmin, which drop
 *   a NaN as NCCL's kernels do; avg is the sum divided by the rank count.
 * - From when a part heads its stream until its data moves its buffers are
 *   NCCL's: the receive buffer is poisoned (0xFF bytes, NaN in every float
 *   type) so early readers see it, and a write to it or a change to the
 *   send buffer in that window (on a GPU: a race) aborts the test, naming
 *   the operation and the byte. See mt_emu_nccl_late for a wide window.
 * Misuse a GPU would punish with a hang, garbage or a fault (host memory or
 * another device's as a buffer, ranks disagreeing on a collective's count,
 * type, op or root, a send and its receive of different sizes, a
 * communicator used after destroy) aborts the test with a message.
 *
 * Not emulated: communicator splitting, user-defined reductions, the legacy
 * default stream, CUDA graphs.
 */
#ifndef MT_NCCL_EMU_H
#define MT_NCCL_EMU_H

#include <limits.h>
#include <stddef.h>

#include "cuda_emu.h"

#ifdef __cplusplus
extern "C" {
#endif

#define NCCL_MAJOR 2
#define NCCL_MINOR 19
#define NCCL_PATCH 0
#define NCCL_VERSION(X, Y, Z) ((X)*10000 + (Y)*100 + (Z))
#define NCCL_VERSION_CODE NCCL_VERSION(NCCL_MAJOR, NCCL_MINOR, NCCL_PATCH)

#define NCCL_UNIQUE_ID_BYTES 128
typedef struct {
  char internal[NCCL_UNIQUE_ID_BYTES];
} ncclUniqueId;

typedef struct ncclComm *ncclComm_t;

typedef enum {
  ncclSuccess = 0,
  ncclUnhandledCudaError = 1,
  ncclSystemError = 2,
  ncclInternalError = 3,
  ncclInvalidArgument = 4,
  ncclInvalidUsage = 5,
  ncclRemoteError = 6,
  ncclInProgress = 7,
  ncclNumResults = 8
} ncclResult_t;

typedef enum {
  ncclInt8 = 0,
  ncclChar = 0,
  ncclUint8 = 1,
  ncclInt32 = 2,
  ncclInt = 2,
  ncclUint32 = 3,
  ncclInt64 = 4,
  ncclUint64 = 5,
  ncclFloat16 = 6,
  ncclHalf = 6,
  ncclFloat32 = 7,
  ncclFloat = 7,
  ncclFloat64 = 8,
  ncclDouble = 8,
  ncclBfloat16 = 9,
  ncclNumTypes = 10
} ncclDataType_t;

typedef enum {
  ncclSum = 0,
  ncclProd = 1,
  ncclMax = 2,
  ncclMin = 3,
  ncclAvg = 4,
  ncclNumOps = 5
} ncclRedOp_t;

#define NCCL_CONFIG_UNDEF_INT INT_MIN
#define NCCL_CONFIG_UNDEF_PTR NULL
#define NCCL_CONFIG_MAGIC 0xcafebeef

typedef struct {
  size_t size;
  unsigned int magic;
  unsigned int version;
  int blocking; /* 1 (the default): calls block until queued; 0: may answer ncclInProgress */
  int cgaClusterSize, minCTAs, maxCTAs;
  const char *netName;
  int splitShare;
} ncclConfig_t;

#define NCCL_CONFIG_INITIALIZER                                                                    \
  {                                                                                                \
    sizeof(ncclConfig_t), NCCL_CONFIG_MAGIC, NCCL_VERSION_CODE, NCCL_CONFIG_UNDEF_INT,             \
        NCCL_CONFIG_UNDEF_INT, NCCL_CONFIG_UNDEF_INT, NCCL_CONFIG_UNDEF_INT,                       \
        NCCL_CONFIG_UNDEF_PTR, NCCL_CONFIG_UNDEF_INT                                               \
  }

const char *ncclGetErrorString(ncclResult_t result);
/* The last error of comm (NULL: of the calling thread), "" when none. */
const char *ncclGetLastError(ncclComm_t comm);
ncclResult_t ncclGetVersion(int *version);

ncclResult_t ncclGetUniqueId(ncclUniqueId *id);
/* On the calling thread's current device (cudaSetDevice). */
ncclResult_t ncclCommInitRankConfig(ncclComm_t *comm, int nranks, ncclUniqueId id, int rank,
                                    ncclConfig_t *config);
ncclResult_t ncclCommInitRank(ncclComm_t *comm, int nranks, ncclUniqueId id, int rank);
ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t *async_error);
ncclResult_t ncclCommFinalize(ncclComm_t comm);
ncclResult_t ncclCommDestroy(ncclComm_t comm);
ncclResult_t ncclCommAbort(ncclComm_t comm);
ncclResult_t ncclCommCount(ncclComm_t comm, int *count);
ncclResult_t ncclCommUserRank(ncclComm_t comm, int *rank);

ncclResult_t ncclAllReduce(const void *sendbuff, void *recvbuff, size_t count,
                           ncclDataType_t datatype, ncclRedOp_t op, ncclComm_t comm,
                           cudaStream_t stream);
/* sendbuff: nranks * recvcount elements */
ncclResult_t ncclReduceScatter(const void *sendbuff, void *recvbuff, size_t recvcount,
                               ncclDataType_t datatype, ncclRedOp_t op, ncclComm_t comm,
                               cudaStream_t stream);
/* recvbuff: nranks * sendcount elements */
ncclResult_t ncclAllGather(const void *sendbuff, void *recvbuff, size_t sendcount,
                           ncclDataType_t datatype, ncclComm_t comm, cudaStream_t stream);
ncclResult_t ncclBroadcast(const void *sendbuff, void *recvbuff, size_t count,
                           ncclDataType_t datatype, int root, ncclComm_t comm, cudaStream_t stream);
/* recvbuff is only written (and only needed) on root */
ncclResult_t ncclReduce(const void *sendbuff, void *recvbuff, size_t count, ncclDataType_t datatype,
                        ncclRedOp_t op, int root, ncclComm_t comm, cudaStream_t stream);
ncclResult_t ncclSend(const void *sendbuff, size_t count, ncclDataType_t datatype, int peer,
                      ncclComm_t comm, cudaStream_t stream);
ncclResult_t ncclRecv(void *recvbuff, size_t count, ncclDataType_t datatype, int peer,
                      ncclComm_t comm, cudaStream_t stream);
ncclResult_t ncclGroupStart(void);
ncclResult_t ncclGroupEnd(void);

/* Test hook: with on, ncclCommAbort waits as a GPU's makes it wait. A real
 * abort frees device memory, and cudaFree waits for every kernel of the
 * device, so it cannot return while another communicator of its device has
 * a kernel in flight (spinning on a peer that is gone) until that one is
 * aborted too. Here it waits until no other live communicator of its device
 * has work queued and not dropped; past 5 s it dies, naming the deadlock
 * the real one would be. Off by default. */
void mt_emu_nccl_abort_waits(int on);

/* Test hook: how many times ncclCommAbort has marked a communicator aborted
 * (its peers' operations fail from then on). mtnlg aborts a failed group on
 * a thread of its own, so a test that needs the abort to have happened
 * waits for this to move rather than for the failed operation to return. */
int mt_emu_nccl_abort_count(void);

/* Test hook: with on (or MT_NCCL_EMU_LATE=1 in the environment), an
 * operation moves its data as late as a GPU may: once every rank has
 * posted it and it heads their streams, and only when some host thread
 * waits for it (a query, synchronize or blocking call on its stream or on
 * an event behind it, or on something that needs it: the other end of a
 * message, work queued behind it, a stream made to wait for it). With the
 * guard (every part poisons its receive buffer when it heads its stream
 * and checks its buffers when its data moves) this holds each operation's
 * window open as long as the program allows, so work that touches its
 * buffers without being ordered around it is found every run, not only
 * when a peer happened to be slow. Off by default; returns the setting
 * before. */
int mt_emu_nccl_late(int on);

#ifdef __cplusplus
}
#endif

#endif
