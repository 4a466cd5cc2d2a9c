/* comm_impl.h — what comm.c asks of a backend (Gloo: gloo_shim.cc, NCCL:
 * nccl.c). Internal to daemon/comm.
 *
 * comm.c checks arguments, handles count 0 and the broken/aborted states, and
 * prefixes every message with the group and the operation; a backend moves
 * bytes and, on failure, returns a negative MT_E* code with a message that
 * says what went wrong with whom ("rank 2 (peer 127.0.0.1:4711) closed the
 * connection", "timed out after 5000 ms"), or MT_ECANCELED once aborted.
 * Backend functions other than abort are called from the group's one thread.
 */
#ifndef MT_COMM_IMPL_H
#define MT_COMM_IMPL_H

#include "comm.h"
#include "mt_config.h"

#ifdef __cplusplus
extern "C" {
#endif

/* out[i] = a[i] op b[i]; out may alias a or b. */
typedef void (*mt__reduce_fn)(void *out, const void *a, const void *b, size_t n);
mt__reduce_fn mt__comm_reduce_fn(mt_comm_dtype dt, mt_comm_op op);

/* The store key "<prefix>/<suffix>". */
int mt__comm_key(char *key, size_t cap, const char *prefix, const char *suffix);

typedef struct mt__comm_backend {
  const char *name;
  /* Connects; every rank has already joined under opts->prefix. */
  int (*create)(const mt_comm_opts *opts, int timeout_ms, void **impl);
  void (*destroy)(void *impl);
  void (*abort)(void *impl); /* any thread */
  /* Byte counts below are whole buffers of one rank (> 0). */
  int (*allreduce)(void *impl, const void *send, void *recv, size_t count, mt_comm_dtype dt,
                   mt_comm_op op, int timeout_ms);
  int (*reduce_scatter)(void *impl, const void *send, void *recv, size_t count, mt_comm_dtype dt,
                        mt_comm_op op, int timeout_ms);
  int (*allgather)(void *impl, const void *send, void *recv, size_t bytes, int timeout_ms);
  int (*broadcast)(void *impl, void *buf, size_t bytes, int root, int timeout_ms);
  int (*reduce)(void *impl, const void *send, void *recv, size_t count, mt_comm_dtype dt,
                mt_comm_op op, int root, int timeout_ms);
  /* Optional (NULL: comm.c runs reduce at once): queues a reduce and
   * returns; wait completes everything queued. */
  int (*reduce_start)(void *impl, const void *send, void *recv, size_t count, mt_comm_dtype dt,
                      mt_comm_op op, int root, int timeout_ms);
  int (*wait)(void *impl, int timeout_ms);
  int (*send)(void *impl, const void *buf, size_t bytes, int peer, int timeout_ms);
  int (*recv)(void *impl, void *buf, size_t bytes, int peer, int timeout_ms);
  /* Either byte count may be 0 (not both). */
  int (*sendrecv)(void *impl, const void *send, size_t send_bytes, int dst, void *recv,
                  size_t recv_bytes, int src, int timeout_ms);
  /* Posts a send (send_slot >= 0) and/or a receive (recv_slot >= 0) and
   * returns; slots (< MT_COMM_P2P_MAX) are free until p2p_wait(slot) returns
   * or fails. destroy releases slots never waited for. */
  int (*sendrecv_start)(void *impl, int send_slot, const void *send, size_t send_bytes, int dst,
                        int recv_slot, void *recv, size_t recv_bytes, int src, int timeout_ms);
  int (*p2p_wait)(void *impl, int slot, int timeout_ms);
  int (*barrier)(void *impl, int timeout_ms);
} mt__comm_backend;

extern const mt__comm_backend mt__comm_gloo;
extern const mt__comm_backend mt__comm_gloo_procs;
#if MT_HAVE_NCCL || defined(MT_CUDA_EMU)
extern const mt__comm_backend mt__comm_nccl;
#endif

#ifdef __cplusplus
}
#endif

#endif
