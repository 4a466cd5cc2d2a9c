/* staged_comm.c — the comm layer's collectives on host buffers, carried
 * through device memory: each staged_* copies its buffers to the device of
 * the calling thread (staged_use_device), calls the mt_comm_* function of the
 * same name on the copies and copies them back. tests/parallel/comm_check.c,
 * written for host buffers (Gloo), is built with its collectives renamed to
 * these (tests/gpu/meson.build) to check the NCCL backend, which takes device
 * memory only: on the emulator (test_nccl_emu) and on a GPU (test_nccl_gpu).
 */
#include "staged_comm.h"

#include "err.h"

#include <stddef.h>
#include <stdint.h>

/* The device this thread's rank runs on: where staged calls put buffers. */
static __thread mt_device *stage_dev;

void staged_use_device(mt_device *d) { stage_dev = d; }

/* A device copy of host bytes [host, host + bytes). */
typedef struct mirror {
  char *host, *dev;
  size_t bytes;
} mirror;

typedef struct staging {
  mirror m[2];
  int n;
} staging;

/* Device buffers for host ranges a and b (either may be NULL or empty),
 * filled from them; ranges that overlap share one buffer, so a call in place
 * stays in place. */
static int stage(staging *st, const void *a, size_t ab, const void *b, size_t bb) {
  const char *lo[2], *hi[2];
  int k = 0;
  if (a && ab) lo[k] = a, hi[k] = (const char *)a + ab, k++;
  if (b && bb) lo[k] = b, hi[k] = (const char *)b + bb, k++;
  if (k == 2 && lo[0] < hi[1] && lo[1] < hi[0]) {
    lo[0] = lo[0] < lo[1] ? lo[0] : lo[1];
    hi[0] = hi[0] > hi[1] ? hi[0] : hi[1];
    k = 1;
  }
  st->n = 0;
  for (int i = 0; i < k; i++) {
    mirror *m = &st->m[st->n];
    m->host = (char *)lo[i];
    m->bytes = (size_t)(hi[i] - lo[i]);
    m->dev = mt_device_alloc(stage_dev, m->bytes);
    if (!m->dev) return MT_ENOMEM;
    st->n++;
    int rc = mt_device_memcpy_htod(stage_dev, m->dev, m->host, m->bytes);
    if (rc) return rc;
  }
  return 0;
}

/* Where host pointer p lives on the device (p itself when not staged: an
 * empty range, which the comm layer never touches). */
static void *dptr(const staging *st, const void *p) {
  for (int i = 0; i < st->n; i++)
    if ((const char *)p >= st->m[i].host && (const char *)p < st->m[i].host + st->m[i].bytes)
      return st->m[i].dev + ((const char *)p - st->m[i].host);
  return (void *)p;
}

/* Copies the device buffers back to the host and frees them; rc passes
 * through (the first failure wins). */
static int unstage(staging *st, int rc) {
  for (int i = 0; i < st->n; i++) {
    mirror *m = &st->m[i];
    if (!rc) rc = mt_device_memcpy_dtoh(stage_dev, m->host, m->dev, m->bytes);
    mt_device_free(stage_dev, m->dev);
  }
  st->n = 0;
  return rc;
}

int staged_allreduce(mt_comm *c, const void *send, void *recv, size_t count, mt_comm_dtype dt,
                     mt_comm_op op) {
  size_t b = count * mt_comm_dtype_size(dt);
  staging st;
  int rc = stage(&st, send, b, recv, b);
  if (!rc) rc = mt_comm_allreduce(c, dptr(&st, send), dptr(&st, recv), count, dt, op);
  return unstage(&st, rc);
}

int staged_reduce_scatter(mt_comm *c, const void *send, void *recv, size_t count, mt_comm_dtype dt,
                          mt_comm_op op) {
  size_t b = count * mt_comm_dtype_size(dt);
  staging st;
  int rc = stage(&st, send, b * (size_t)mt_comm_size(c), recv, b);
  if (!rc) rc = mt_comm_reduce_scatter(c, dptr(&st, send), dptr(&st, recv), count, dt, op);
  return unstage(&st, rc);
}

int staged_allgather(mt_comm *c, const void *send, void *recv, size_t count, mt_comm_dtype dt) {
  size_t b = count * mt_comm_dtype_size(dt);
  staging st;
  int rc = stage(&st, send, b, recv, b * (size_t)mt_comm_size(c));
  if (!rc) rc = mt_comm_allgather(c, dptr(&st, send), dptr(&st, recv), count, dt);
  return unstage(&st, rc);
}

int staged_broadcast(mt_comm *c, void *buf, size_t count, mt_comm_dtype dt, int root) {
  staging st;
  int rc = stage(&st, buf, count * mt_comm_dtype_size(dt), NULL, 0);
  if (!rc) rc = mt_comm_broadcast(c, dptr(&st, buf), count, dt, root);
  return unstage(&st, rc);
}

int staged_reduce(mt_comm *c, const void *send, void *recv, size_t count, mt_comm_dtype dt,
                  mt_comm_op op, int root) {
  size_t b = count * mt_comm_dtype_size(dt);
  staging st;
  int rc = stage(&st, send, b, recv, b);
  if (!rc) rc = mt_comm_reduce(c, dptr(&st, send), dptr(&st, recv), count, dt, op, root);
  return unstage(&st, rc);
}

/* Started reduces keep their device buffers until the wait. */
static __thread staging started[16];
static __thread int nstarted;

int staged_reduce_start(mt_comm *c, const void *send, void *recv, size_t count, mt_comm_dtype dt,
                        mt_comm_op op, int root) {
  if (nstarted == 16) return mt_seterr(MT_EINVAL, "staged_reduce_start: 16 started already");
  size_t b = count * mt_comm_dtype_size(dt);
  staging *st = &started[nstarted];
  int rc = stage(st, send, b, recv, b);
  if (!rc) rc = mt_comm_reduce_start(c, dptr(st, send), dptr(st, recv), count, dt, op, root);
  if (rc) return unstage(st, rc);
  nstarted++;
  return 0;
}

int staged_wait(mt_comm *c) {
  int rc = mt_comm_wait(c);
  for (int i = 0; i < nstarted; i++) rc = unstage(&started[i], rc);
  nstarted = 0;
  return rc;
}

int staged_send(mt_comm *c, const void *buf, size_t count, mt_comm_dtype dt, int peer) {
  staging st;
  int rc = stage(&st, buf, count * mt_comm_dtype_size(dt), NULL, 0);
  if (!rc) rc = mt_comm_send(c, dptr(&st, buf), count, dt, peer);
  return unstage(&st, rc);
}

int staged_recv(mt_comm *c, void *buf, size_t count, mt_comm_dtype dt, int peer) {
  staging st;
  int rc = stage(&st, buf, count * mt_comm_dtype_size(dt), NULL, 0);
  if (!rc) rc = mt_comm_recv(c, dptr(&st, buf), count, dt, peer);
  return unstage(&st, rc);
}

int staged_sendrecv(mt_comm *c, const void *send, size_t send_count, int dst, void *recv,
                    size_t recv_count, int src, mt_comm_dtype dt) {
  size_t esz = mt_comm_dtype_size(dt);
  staging st;
  int rc = stage(&st, send, send_count * esz, recv, recv_count * esz);
  if (!rc)
    rc =
        mt_comm_sendrecv(c, dptr(&st, send), send_count, dst, dptr(&st, recv), recv_count, src, dt);
  return unstage(&st, rc);
}

/* Started exchanges keep their device buffers until the last of their
 * requests is waited for (with NCCL both complete together). */
static __thread struct {
  staging st;
  int reqs; /* requests of this exchange not yet waited for */
} p2p_staged[MT_COMM_P2P_MAX];
static __thread int p2p_owner[MT_COMM_P2P_MAX]; /* request -> index in p2p_staged, +1 */

int staged_sendrecv_start(mt_comm *c, const void *send, size_t send_count, int dst, void *recv,
                          size_t recv_count, int src, mt_comm_dtype dt, int *send_req,
                          int *recv_req) {
  size_t esz = mt_comm_dtype_size(dt);
  int k = 0;
  while (k < MT_COMM_P2P_MAX && p2p_staged[k].reqs) k++;
  if (k == MT_COMM_P2P_MAX)
    return mt_seterr(MT_EINVAL, "staged_sendrecv_start: %d started already", k);
  staging *st = &p2p_staged[k].st;
  int rc = stage(st, send, send_count * esz, recv, recv_count * esz);
  if (!rc)
    rc = mt_comm_sendrecv_start(c, dptr(st, send), send_count, dst, dptr(st, recv), recv_count, src,
                                dt, send_req, recv_req);
  if (rc) return unstage(st, rc);
  int reqs = 0;
  if (send_req && *send_req >= 0) p2p_owner[*send_req] = k + 1, reqs++;
  if (recv_req && *recv_req >= 0) p2p_owner[*recv_req] = k + 1, reqs++;
  if (!reqs) return unstage(st, 0);
  p2p_staged[k].reqs = reqs;
  return 0;
}

int staged_p2p_wait(mt_comm *c, int req) {
  int rc = mt_comm_p2p_wait(c, req);
  if (req < 0 || req >= MT_COMM_P2P_MAX || !p2p_owner[req]) return rc;
  int k = p2p_owner[req] - 1;
  p2p_owner[req] = 0;
  if (--p2p_staged[k].reqs == 0) rc = unstage(&p2p_staged[k].st, rc);
  return rc;
}
