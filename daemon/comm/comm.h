/* comm.h — communicator groups and their collectives: the one API every rank
 * uses to talk to others, whether they are threads of this process, processes
 * on this machine or daemons on other nodes.
 *
 * A group (mt_comm) is size ranks that bootstrap through an mt_store under a
 * key prefix, then move typed buffers: Gloo over TCP for CPU devices (host
 * memory), NCCL for CUDA devices (device memory), and for the world group's
 * host values Gloo between processes with each process's threads meeting
 * in its memory (MT_COMM_GLOO_PROCS). Every operation is blocking
 * and has a deadline: a dead, stuck or missing peer makes it fail with an
 * error naming the group, the operation and the peer when known — it never
 * hangs. After any failure but a bad argument the group is broken: every later
 * operation fails at once and the caller destroys it and builds a new one
 * (with a new key prefix, typically the next generation).
 *
 * One thread drives a group; only mt_comm_abort may be called from another.
 * Nothing here exits or aborts the process. Gloo writes to sockets with
 * writev(2), so the first Gloo group sets SIGPIPE to SIG_IGN when the program
 * left it at its default: a dead peer is then an error, not a kill.
 */
#ifndef MT_COMM_H
#define MT_COMM_H

#include <stddef.h>

#include "device.h"
#include "store.h"

typedef struct mt_comm mt_comm;

/* GLOO_PROCS: host buffers, as GLOO, for a group whose ranks are threads of
 * a few processes (the world group): the threads of a process meet in its
 * memory and one of them (its lowest rank) talks to the other processes
 * over a Gloo group of the processes (daemon/comm/procs.c); sendrecv and
 * started point to point are not carried. */
typedef enum { MT_COMM_GLOO = 0, MT_COMM_NCCL = 1, MT_COMM_GLOO_PROCS = 2 } mt_comm_backend;

typedef enum {
  MT_COMM_F32 = 0,
  MT_COMM_F64,
  MT_COMM_BF16,
  MT_COMM_F16,
  MT_COMM_I32,
  MT_COMM_I64,
  MT_COMM_U8,
  MT_COMM_NDTYPES
} mt_comm_dtype;

typedef enum { MT_COMM_SUM = 0, MT_COMM_MAX = 1 } mt_comm_op;

typedef struct mt_comm_opts {
  mt_store *store;         /* bootstrap store, shared by all ranks; not owned */
  const char *name;        /* group name for messages, e.g. "dp.pp1.tp0" */
  const char *prefix;      /* store key prefix, unique per group and generation,
                              e.g. "gen/0/comm/dp.pp1.tp0" */
  int rank, size;          /* 0 <= rank < size */
  int timeout_ms;          /* deadline of create and of every operation; 0: 30000 */
  mt_comm_backend backend; /* GLOO (host buffers) or NCCL (device buffers) */
  mt_device *device;       /* NCCL: this rank's CUDA device; Gloo: unused */
  const char *addr;        /* Gloo: address to listen on; NULL: "127.0.0.1" */
  int local_begin;         /* GLOO_PROCS: this process's ranks of the group are [local_begin,
                              local_begin + local_count), each a thread of it that joins;
                              local_count 0: this rank alone */
  int local_count;
  volatile int *cancel; /* NCCL: non-zero (another thread sets it) gives up an init still
                           waiting for its peers, with MT_ECANCELED; NULL: none. (The
                           store waits before it are the store's to cancel.) */
} mt_comm_opts;

/* Joins the group: waits (until the deadline) for every rank to join under
 * prefix, then connects. A rank that never comes is named in the error. */
int mt_comm_create(mt_comm **out, const mt_comm_opts *opts);

/* Releases the group; no operation may be running on it. */
void mt_comm_destroy(mt_comm *c);

/* Makes the operation in flight (if any) and every later one fail with
 * MT_ECANCELED, promptly; peers see the connection go. Any thread may call it,
 * any number of times, until mt_comm_destroy. */
void mt_comm_abort(mt_comm *c);

/* The deadline of each later operation, from when it starts (> 0). */
void mt_comm_set_timeout(mt_comm *c, int timeout_ms);
int mt_comm_timeout(const mt_comm *c);

int mt_comm_rank(const mt_comm *c);
int mt_comm_size(const mt_comm *c);
const char *mt_comm_name(const mt_comm *c);

/* Collectives. Every rank of the group calls the same ones in the same order
 * with the same counts. send may equal recv (in place) where noted. */

/* recv[i] = op over ranks of send[i], i < count. In place allowed.
 * MT_COMM_MAX of floats over NCCL is fmax: a NaN meeting a number yields the
 * number (Gloo carries the NaN); only MT_COMM_SUM carries NaN and inf on every
 * backend, so overflow and NaN checks go through sums. */
int mt_comm_allreduce(mt_comm *c, const void *send, void *recv, size_t count, mt_comm_dtype dt,
                      mt_comm_op op);

/* send holds size equal chunks of count elements; rank r gets in recv the
 * reduction over ranks of chunk r. recv may be send + rank * count. */
int mt_comm_reduce_scatter(mt_comm *c, const void *send, void *recv, size_t count, mt_comm_dtype dt,
                           mt_comm_op op);

/* recv (size * count elements) gets every rank's send (count elements) at
 * offset rank * count. send may be recv + rank * count. */
int mt_comm_allgather(mt_comm *c, const void *send, void *recv, size_t count, mt_comm_dtype dt);

/* buf on every rank gets root's buf. */
int mt_comm_broadcast(mt_comm *c, void *buf, size_t count, mt_comm_dtype dt, int root);

/* Point to point between two ranks of the group: a send is matched by the
 * peer's next recv from this rank, in order; both name the same count. A
 * send completes only once the peer has posted its recv (rendezvous, as in
 * NCCL), so two ranks that both send first wait for each other until the
 * deadline: exchanges between neighbours go through mt_comm_sendrecv. */
int mt_comm_send(mt_comm *c, const void *buf, size_t count, mt_comm_dtype dt, int peer);
int mt_comm_recv(mt_comm *c, void *buf, size_t count, mt_comm_dtype dt, int peer);

/* Sends send_count elements to dst while receiving recv_count from src (dst
 * may equal src; either count may be 0): one pipeline step's "send forward,
 * receive backward" without ordering the two. */
int mt_comm_sendrecv(mt_comm *c, const void *send, size_t send_count, int dst, void *recv,
                     size_t recv_count, int src, mt_comm_dtype dt);

/* Started point to point (torch.distributed's batch_isend_irecv): the
 * exchange mt_comm_sendrecv makes, posted and not waited for, so the caller
 * computes while it moves. *send_req and *recv_req (either may be NULL when
 * its count is 0) receive a request id for mt_comm_p2p_wait, or -1 for a
 * count of 0. With Gloo the send and the receive move on gloo's own thread
 * and complete independently; with NCCL both are queued on the group's
 * stream behind everything already queued on the device's compute stream,
 * and complete together. Messages match in the order they were posted, as
 * with the blocking calls, which may be mixed with started ones. Each
 * request is waited for exactly once; at most MT_COMM_P2P_MAX are pending on
 * a group; buffers stay untouched until their request's wait. */
#define MT_COMM_P2P_MAX 16
int mt_comm_sendrecv_start(mt_comm *c, const void *send, size_t send_count, int dst, void *recv,
                           size_t recv_count, int src, mt_comm_dtype dt, int *send_req,
                           int *recv_req);
/* Waits for one started send or receive (req -1: nothing to wait for), within
 * the deadline counted from the wait. A failure breaks the group as any
 * operation's does. */
int mt_comm_p2p_wait(mt_comm *c, int req);

/* recv on root gets the reduction over ranks of send (count elements); recv
 * is only written on root and may equal send there. */
int mt_comm_reduce(mt_comm *c, const void *send, void *recv, size_t count, mt_comm_dtype dt,
                   mt_comm_op op, int root);

/* The same reduce, started: with NCCL it is queued on the group's stream
 * behind everything already queued on the device's compute stream, and runs
 * while the caller queues more compute (gradient buckets reduced during the
 * backward pass); with Gloo (host memory, nothing to overlap) it is carried
 * out before this returns. Started reduces complete in order; mt_comm_wait
 * waits for all of them, within the deadline counted from the wait. Between
 * the first start and the wait nothing else may run on the group, and the
 * buffers must stay untouched. */
int mt_comm_reduce_start(mt_comm *c, const void *send, void *recv, size_t count, mt_comm_dtype dt,
                         mt_comm_op op, int root);
int mt_comm_wait(mt_comm *c);

/* Returns once every rank has entered the barrier. */
int mt_comm_barrier(mt_comm *c);

size_t mt_comm_dtype_size(mt_comm_dtype dt);
const char *mt_comm_dtype_name(mt_comm_dtype dt);
const char *mt_comm_backend_name(mt_comm_backend b);

#endif
