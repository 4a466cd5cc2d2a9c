/* nccl_one_rank.c — see nccl_one_rank.h. The checks go through the comm
 * layer's API (mt_comm_*), as the daemon does: the non-blocking init and its
 * polling, operations ordered after the device's compute stream, the
 * collectives of tests/parallel/comm_check.c (through staged_comm.c),
 * started reduces, the barrier, an abort (its reaper thread, ncclCommAbort)
 * beside a live group, and finalize and destroy; all but the exchange with
 * itself, which mt_comm refuses and nccl.c's backend table makes (see
 * sendrecv_to_self). */
#include "nccl_one_rank.h"

#include "comm.h"
#include "comm_check.h"
#include "comm_impl.h"
#include "err.h"
#include "mt_check.h"
#include "ops.h"
#include "staged_comm.h"

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int failed;
#define check(...) check_line(&failed, __VA_ARGS__)

static int create(mt_comm **c, mt_device *d, mt_store *store, const char *prefix,
                  const char *name) {
  char key[256];
  snprintf(key, sizeof key, "%s/%s", prefix, name);
  mt_comm_opts o = {.store = store,
                    .name = name,
                    .prefix = key,
                    .rank = 0,
                    .size = 1,
                    .timeout_ms = 20000,
                    .backend = MT_COMM_NCCL,
                    .device = d};
  double t0 = now_s();
  int rc = mt_comm_create(c, &o);
  check(!rc, "create group %s (NCCL, 1 rank on %s): %s (%.3f s)", name, d->name,
        rc ? mt_errmsg() : "ok", now_s() - t0);
  return rc;
}

/* Kernels write a buffer, then an in-place all-reduce (the identity for one
 * rank) reads it: the group's stream must wait for the compute stream. */
static void kernels_then_allreduce(mt_device *d, mt_comm *c) {
  const size_t n = 1 << 20;
  float *h = malloc(n * sizeof *h), *g = mt_device_alloc(d, n * sizeof *g);
  int rc = -1, bad = -1;
  if (h && g) {
    for (size_t i = 0; i < n; i++) h[i] = (float)(i % 13);
    rc = mt_device_memcpy_htod(d, g, h, n * sizeof *h);
    if (!rc) {
      d->ops->scale(d, g, 3.0f, n);
      rc = mt_comm_allreduce(c, g, g, n, MT_COMM_F32, MT_COMM_SUM);
    }
    if (!rc) rc = mt_device_memcpy_dtoh(d, h, g, n * sizeof *h);
    for (size_t i = 0; !rc && i < n && bad < 0; i++)
      if (h[i] != 3.0f * (float)(i % 13)) bad = (int)i;
  }
  check(!rc && bad < 0, "a kernel's output all-reduced in place on device memory (4 MB): %s",
        rc         ? mt_errmsg()
        : bad >= 0 ? "wrong element"
                   : "the kernel's values");
  mt_device_free(d, g);
  free(h);
}

/* Sends to itself. The comm layer refuses a peer that is the caller's own
 * rank (Gloo has no pair to itself; a pipeline never sends to its own
 * stage), and the refusal leaves the group usable. NCCL takes a send and a
 * receive to itself in one group, the only exchange one GPU can make, so
 * nccl.c's point-to-point path (the group of send and receive, the events
 * behind them, the waits for each request) runs through its backend table
 * (comm_impl.h), past that check: started with both requests waited for,
 * receive first, then blocking; odd sizes. */
static void sendrecv_to_self(mt_device *d, mt_comm *c, mt_store *store, const char *prefix) {
  int32_t x[3] = {1, 2, 3}, y[3];
  int rc = staged_sendrecv(c, x, 3, 0, y, 3, 0, MT_COMM_I32);
  check(rc == MT_EINVAL && strstr(mt_errmsg(), "bad peer"),
        "mt_comm_sendrecv to its own rank is refused: %s", rc ? mt_errmsg() : "it was not");
  rc = staged_allreduce(c, x, y, 3, MT_COMM_I32, MT_COMM_SUM);
  check(!rc && y[2] == 3, "the group goes on after the refusal: %s", rc ? mt_errmsg() : "ok");

  const size_t n = 100003, bytes = n * sizeof(int32_t);
  char key[256];
  snprintf(key, sizeof key, "%s/p2p", prefix);
  mt_comm_opts o = {
      .store = store, .name = "p2p", .prefix = key, .rank = 0, .size = 1, .device = d};
  void *g = NULL;
  int32_t *h = malloc(bytes), *back = malloc(bytes);
  int32_t *out = mt_device_alloc(d, bytes), *in = mt_device_alloc(d, bytes);
  rc = h && back && out && in ? 0 : MT_ENOMEM;
  if (rc) mt_seterr(rc, "out of memory");
  if (!rc) rc = mt__comm_nccl.create(&o, 20000, &g);
  for (int pass = 0; pass < 2; pass++) {
    size_t count = pass ? n - 2 : n, bad = count;
    for (size_t i = 0; i < count; i++) h[i] = (int32_t)(i * 7 + (size_t)pass);
    int e = rc;
    if (!e) e = mt_device_memcpy_htod(d, out, h, count * sizeof *h);
    if (!e) e = mt_device_memset0(d, in, bytes);
    if (!e && pass == 0) {
      e = mt__comm_nccl.sendrecv_start(g, 0, out, count * sizeof *h, 0, 1, in, count * sizeof *h, 0,
                                       20000);
      if (!e) e = mt__comm_nccl.p2p_wait(g, 1, 20000);
      if (!e) e = mt__comm_nccl.p2p_wait(g, 0, 20000);
    } else if (!e) {
      e = mt__comm_nccl.sendrecv(g, out, count * sizeof *h, 0, in, count * sizeof *h, 0, 20000);
    }
    if (!e) e = mt_device_memcpy_dtoh(d, back, in, count * sizeof *h);
    for (size_t i = 0; !e && i < count && bad == count; i++)
      if (back[i] != h[i]) bad = i;
    check(!e && bad == count, "nccl.c: %s to itself, %zu int32: %s",
          pass ? "sendrecv" : "sendrecv_start + p2p_wait of both requests", count,
          e             ? mt_errmsg()
          : bad < count ? "wrong element"
                        : "received what was sent");
  }
  if (g) mt__comm_nccl.destroy(g);
  mt_device_free(d, out);
  mt_device_free(d, in);
  free(h), free(back);
}

int nccl_one_rank_checks(mt_device *d, mt_store *store, const char *prefix) {
  failed = 0;
  staged_use_device(d);
  mt_comm *a = NULL, *b = NULL;
  if (create(&a, d, store, prefix, "one")) return failed;

  char err[2048] = "";
  double t0 = now_s();
  int rc = check_collectives(a, err, sizeof err);
  check(!rc,
        "comm_check collectives: all-reduce, reduce-scatter, all-gather, broadcast, reduce, "
        "started reduce + wait, every dtype, then a barrier (%.3f s)%s%s",
        now_s() - t0, rc ? ": " : "", err);
  kernels_then_allreduce(d, a);
  sendrecv_to_self(d, a, store, prefix);
  t0 = now_s();
  rc = mt_comm_barrier(a);
  check(!rc, "barrier: %s (%.3f s)", rc ? mt_errmsg() : "ok", now_s() - t0);

  /* a second group on the same device, aborted: its operations fail at once,
   * and the first group goes on */
  if (!create(&b, d, store, prefix, "two")) {
    float x[4] = {1, 2, 3, 4};
    rc = staged_allreduce(b, x, x, 4, MT_COMM_F32, MT_COMM_SUM);
    check(!rc && x[3] == 4.0f, "group two: an all-reduce before the abort: %s",
          rc ? mt_errmsg() : "ok");
    t0 = now_s();
    mt_comm_abort(b);
    rc = staged_allreduce(b, x, x, 4, MT_COMM_F32, MT_COMM_SUM);
    double took = now_s() - t0;
    check(rc == MT_ECANCELED && took < 5.0,
          "group two aborted: its next all-reduce fails with MT_ECANCELED at once: %s (%.3f s)",
          rc ? mt_errmsg() : "it succeeded", took);
    t0 = now_s();
    mt_comm_destroy(b);
    double destroyed = now_s() - t0; /* within the backend's 10 s bound on finalize */
    check(destroyed < 10.0, "group two destroyed after its abort (%.3f s)", destroyed);
  }
  float y[3] = {5, 6, 7};
  rc = staged_allreduce(a, y, y, 3, MT_COMM_F32, MT_COMM_MAX);
  check(!rc && y[0] == 5.0f && y[2] == 7.0f, "group one after group two's abort: an all-reduce: %s",
        rc ? mt_errmsg() : "ok");

  t0 = now_s();
  mt_comm_destroy(a); /* ncclCommFinalize, polled, then ncclCommDestroy */
  double took = now_s() - t0;
  check(took < 10.0,
        "group one finalized and destroyed (%.3f s; 10 s would mean the abort "
        "fallback)",
        took);
  return failed;
}
