/* test_nccl_emu — the NCCL backend of the comm layer (daemon/comm/nccl.c) in
 * CI, on the emulated CUDA runtime and NCCL (emu/): ranks are threads of this
 * process, rank r on emulated device cuda:r, groups bootstrapped through the
 * in-process store.
 *
 * Checks: the collective checks of tests/parallel/comm_check.c (compiled for
 * this test with their collectives renamed to the staged_* functions of
 * staged_comm.c, which carry host buffers through device memory: NCCL takes
 * only that), for 1 to 4 ranks; the one-rank checks test_nccl_gpu runs on a
 * GPU (nccl_one_rank.c); kernels and collectives on four devices at once, started
 * reduces overlapping kernels; a rank missing from create (from the store's
 * join, and from NCCL's init) and from an all-reduce, each failing by the
 * deadline with the timeout named; abort from another thread, and a peer's
 * abort, ending blocked operations promptly; two ranks that both send first
 * (rendezvous: only the deadline ends it). Then the emulator itself, through
 * the raw API: a collective keeps its stream and the events behind it
 * pending until the last rank posts, a stream made to wait for such an event
 * too; groups of send and receive in either order; ncclReduce. One line per
 * check; exits 1 if any failed. */
#include "comm.h"
#include "comm_check.h"
#include "device.h"
#include "err.h"
#include "mt_check.h"
#include "nccl_one_rank.h"
#include "ops.h"
#include "staged_comm.h"
#include "store.h"

#include "cuda_emu.h"
#include "nccl_emu.h"

#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* Under ThreadSanitizer (build-tsan): race_child's child starts threads
 * after forking a process that has some, which the sanitizer refuses unless
 * told; TSAN_OPTIONS given still override it. */
#ifdef MT_TSAN
const char *__tsan_default_options(void);
const char *__tsan_default_options(void) { return "die_after_fork=0"; }
#endif

#define NDEV 4

static mt_store *store; /* failures: mt_check.h's */
static mt_device devs[NDEV];
#define check(...) check_line(&failures, __VA_ARGS__)

static void sleep_ms(int ms) { usleep((useconds_t)ms * 1000); }

/* ------------------------------------------------------------ rank threads */

typedef struct rank_ctx {
  int rank, size;
  const char *prefix;
  int timeout_ms;
  int (*body)(struct rank_ctx *x, mt_comm *c);
  void *arg;
  int rc;               /* 0 or the failing MT_E* code */
  char err[2048];       /* its message */
  double elapsed_s;     /* from start to the end of body (or of a failed create) */
  mt_comm *comm;        /* while body runs, for threads that abort it */
  volatile int *cancel; /* mt_comm_opts.cancel, or NULL */
} rank_ctx;

static void *rank_main(void *p) {
  rank_ctx *x = p;
  staged_use_device(&devs[x->rank]);
  double t0 = now_s();
  mt_comm_opts o = {.store = store,
                    .name = "dp.pp0.tp0",
                    .prefix = x->prefix,
                    .rank = x->rank,
                    .size = x->size,
                    .timeout_ms = x->timeout_ms,
                    .backend = MT_COMM_NCCL,
                    .device = &devs[x->rank],
                    .cancel = x->cancel};
  mt_comm *c = NULL;
  x->rc = mt_comm_create(&c, &o);
  if (x->rc) {
    snprintf(x->err, sizeof x->err, "%s", mt_errmsg());
  } else {
    x->comm = c;
    x->rc = x->body(x, c);
    if (x->rc && !x->err[0]) snprintf(x->err, sizeof x->err, "%s", mt_errmsg());
    if (x->rc) mt_comm_abort(c); /* a failed check: the peers fail now, not at their deadline */
  }
  x->elapsed_s = now_s() - t0;
  mt_comm_destroy(c);
  return NULL;
}

/* Runs body on ranks [0, started) of a group of size, each on its thread. */
static void run_ranks(rank_ctx *ctx, int size, int started, const char *prefix, int timeout_ms,
                      int (*body)(rank_ctx *, mt_comm *), void *arg) {
  pthread_t th[NDEV];
  for (int r = 0; r < started; r++) {
    memset(&ctx[r], 0, sizeof ctx[r]);
    ctx[r].rank = r, ctx[r].size = size, ctx[r].prefix = prefix;
    ctx[r].timeout_ms = timeout_ms, ctx[r].body = body, ctx[r].arg = arg;
    pthread_create(&th[r], NULL, rank_main, &ctx[r]);
  }
  for (int r = 0; r < started; r++) pthread_join(th[r], NULL);
}

/* ------------------------------------------------------------ collectives */

static int body_collectives(rank_ctx *x, mt_comm *c) {
  if (check_collectives(c, x->err, sizeof x->err)) return -1;
  return check_ring(c, x->err, sizeof x->err);
}

static void test_collectives_match_serial_reference_1_to_4_ranks(void) {
  for (int n = 1; n <= NDEV; n++) {
    rank_ctx ctx[NDEV];
    char prefix[64];
    snprintf(prefix, sizeof prefix, "test/collectives/%d", n);
    double t0 = now_s();
    run_ranks(ctx, n, n, prefix, 20000, body_collectives, NULL);
    int ok = 1;
    for (int r = 0; r < n; r++)
      if (ctx[r].rc) {
        ok = 0;
        printf("     rank %d: %s\n", r, ctx[r].err);
      }
    check(ok, "comm_check collectives and rings over NCCL, %d rank%s (%.2f s)", n,
          n == 1 ? "" : "s", now_s() - t0);
  }
}

static int body_large(rank_ctx *x, mt_comm *c) {
  return check_large(c, 4u << 20, x->err, sizeof x->err);
}

static void test_large_reductions_match_reference(void) {
  rank_ctx ctx[NDEV];
  double t0 = now_s();
  run_ranks(ctx, NDEV, NDEV, "test/large", 20000, body_large, NULL);
  int ok = 1;
  for (int r = 0; r < NDEV; r++)
    if (ctx[r].rc) ok = 0, printf("     rank %d: %s\n", r, ctx[r].err);
  check(ok, "4 MB all-reduce, reduce-scatter and reduce, %d ranks (%.2f s)", NDEV, now_s() - t0);
}

/* Each rank runs kernels on its device, then all-reduces their output in
 * place: the collective must read what the kernels wrote (nccl.c orders its
 * stream after the compute stream). Then two buckets are reduced to rank 0
 * as started reduces while more kernels run, and waited for. */
static int body_kernels(rank_ctx *x, mt_comm *c) {
  mt_device *d = &devs[x->rank];
  const size_t n = 4096;
  const int r = x->rank, size = x->size;
  float *h = malloc(n * sizeof *h), *g = mt_device_alloc(d, 3 * n * sizeof *g);
  int rc = -1;
  if (!h || !g) goto done;
  float *b0 = g + n, *b1 = g + 2 * n;
  for (size_t i = 0; i < n; i++) h[i] = (float)(i % 13);
  if (mt_device_memcpy_htod(d, g, h, n * sizeof *h)) goto done;
  d->ops->scale(d, g, (float)(r + 1), n); /* (r+1)·v */
  d->ops->add_inplace(d, g, g, n);        /* 2(r+1)·v */
  if ((rc = mt_comm_allreduce(c, g, g, n, MT_COMM_F32, MT_COMM_SUM))) goto done;
  rc = -1;
  if (mt_device_memcpy_dtoh(d, h, g, n * sizeof *h)) goto done;
  const float k = (float)(size * (size + 1)); /* Σ 2(r+1) */
  for (size_t i = 0; i < n; i++)
    if (h[i] != k * (float)(i % 13)) {
      snprintf(x->err, sizeof x->err, "kernels then all-reduce: element %zu is %g, want %g", i,
               h[i], k * (float)(i % 13));
      goto done;
    }
  double sq = d->ops->sumsq(d, g, n), want = 0;
  for (size_t i = 0; i < n; i++) want += (double)h[i] * h[i];
  if (sq != want) {
    snprintf(x->err, sizeof x->err, "sumsq after the all-reduce: %.17g, want %.17g", sq, want);
    goto done;
  }
  /* buckets: b0 = r+1, b1 = 10(r+1); started, then kernels on g meanwhile */
  for (size_t i = 0; i < n; i++) h[i] = (float)(r + 1);
  if (mt_device_memcpy_htod(d, b0, h, n * sizeof *h)) goto done;
  mt_device_memcpy_dtod(d, b1, b0, n * sizeof *g);
  d->ops->scale(d, b1, 10.0f, n);
  if ((rc = mt_comm_reduce_start(c, b0, b0, n, MT_COMM_F32, MT_COMM_SUM, 0)) ||
      (rc = mt_comm_reduce_start(c, b1, b1, n, MT_COMM_F32, MT_COMM_SUM, 0)))
    goto done;
  d->ops->scale(d, g, 0.5f, n); /* compute overlapping the reduces */
  if ((rc = mt_comm_wait(c))) goto done;
  rc = -1;
  float s = (float)(size * (size + 1) / 2);
  for (int bucket = 0; bucket < 2; bucket++) {
    float want_b = r == 0 ? s : (float)(r + 1);
    if (bucket) want_b *= 10.0f;
    if (mt_device_memcpy_dtoh(d, h, bucket ? b1 : b0, n * sizeof *h)) goto done;
    for (size_t i = 0; i < n; i++)
      if (h[i] != want_b) {
        snprintf(x->err, sizeof x->err, "started reduce, bucket %d: element %zu is %g, want %g",
                 bucket, i, h[i], want_b);
        goto done;
      }
  }
  rc = 0;
done:
  if (rc && !x->err[0]) snprintf(x->err, sizeof x->err, "%s", mt_errmsg());
  free(h);
  mt_device_free(d, g);
  return rc;
}

static void test_kernels_and_collectives_on_four_devices(void) {
  rank_ctx ctx[NDEV];
  run_ranks(ctx, NDEV, NDEV, "test/kernels", 20000, body_kernels, NULL);
  int ok = 1;
  for (int r = 0; r < NDEV; r++)
    if (ctx[r].rc) ok = 0, printf("     rank %d: %s\n", r, ctx[r].err);
  check(ok, "kernels on 4 devices at once, all-reduce of their output, started reduces "
            "overlapping kernels");
}

/* ------------------------------------------------------------ failures */

static int body_never(rank_ctx *x, mt_comm *c) {
  (void)x, (void)c;
  return 0;
}

static void test_missing_rank_fails_create_naming_it(void) {
  rank_ctx ctx[NDEV];
  double t0 = now_s();
  run_ranks(ctx, NDEV, NDEV - 1, "test/missing", 300, body_never, NULL);
  double took = now_s() - t0;
  for (int r = 0; r < NDEV - 1; r++)
    check(ctx[r].rc == MT_ETIMEDOUT && strstr(ctx[r].err, "rank 3 did not join"),
          "create without rank 3, rank %d: %s: %s", r, mt_strerror(ctx[r].rc), ctx[r].err);
  check(took < 2.0, "create without rank 3 failed after %.2f s (deadline 0.3 s)", took);
}

/* What the comm layer's join writes for rank (comm.c join()): its key, and
 * its arrival counted; the last of the others to arrive writes <prefix>/all. */
static void join_as(const char *prefix, int rank) {
  char key[128];
  int64_t arrived;
  snprintf(key, sizeof key, "%s/join/%d", prefix, rank);
  mt_store_set(store, key, "test", 4);
  snprintf(key, sizeof key, "%s/joined", prefix);
  mt_store_add(store, key, 1, &arrived);
}

/* Rank 3 is in the store's join (the test does its part of it) but never
 * inits NCCL: the others' init must time out, not hang. */
static void test_rank_missing_from_nccl_init_times_out(void) {
  const char *prefix = "test/noinit";
  join_as(prefix, 3);
  rank_ctx ctx[NDEV];
  double t0 = now_s();
  run_ranks(ctx, NDEV, NDEV - 1, prefix, 300, body_never, NULL);
  double took = now_s() - t0;
  int timed_out = 0;
  for (int r = 0; r < NDEV - 1; r++) {
    check((ctx[r].rc == MT_ETIMEDOUT || ctx[r].rc == MT_EIO) && strstr(ctx[r].err, "nccl: init"),
          "NCCL init without rank 3, rank %d: %s: %s", r, mt_strerror(ctx[r].rc), ctx[r].err);
    timed_out += strstr(ctx[r].err, "timed out after") != NULL;
  }
  check(timed_out >= 1, "NCCL init without rank 3: %d rank(s) say they timed out", timed_out);
  check(took < 2.0, "NCCL init without rank 3 failed after %.2f s (deadline 0.3 s)", took);
}

/* The same, with a deadline of 20 s and the create cancelled after 0.3 s (as
 * mt_local_abort does when a rank of the process fails or the node loses
 * its peers): every rank gives up its NCCL init at once. */
static volatile int init_cancel;

static void *cancel_later(void *arg) {
  (void)arg;
  sleep_ms(300);
  __atomic_store_n(&init_cancel, 1, __ATOMIC_SEQ_CST);
  return NULL;
}

static void test_cancel_ends_a_waiting_nccl_init(void) {
  const char *prefix = "test/cancelinit";
  join_as(prefix, 3);
  rank_ctx ctx[NDEV];
  pthread_t th[NDEV - 1], canceller;
  init_cancel = 0;
  double t0 = now_s();
  for (int r = 0; r < NDEV - 1; r++) {
    memset(&ctx[r], 0, sizeof ctx[r]);
    ctx[r].rank = r, ctx[r].size = NDEV, ctx[r].prefix = prefix, ctx[r].timeout_ms = 20000;
    ctx[r].body = body_never, ctx[r].cancel = &init_cancel;
    pthread_create(&th[r], NULL, rank_main, &ctx[r]);
  }
  pthread_create(&canceller, NULL, cancel_later, NULL);
  for (int r = 0; r < NDEV - 1; r++) pthread_join(th[r], NULL);
  pthread_join(canceller, NULL);
  double took = now_s() - t0;
  int cancelled = 0;
  for (int r = 0; r < NDEV - 1; r++) {
    /* the first to see the flag aborts its half-made communicator, which
     * the emulator tells the others at once (a real NCCL, at its bootstrap
     * timeout, unless they see the flag first, as they do here) */
    check((ctx[r].rc == MT_ECANCELED || ctx[r].rc == MT_EIO) && strstr(ctx[r].err, "nccl: init"),
          "NCCL init cancelled, rank %d: %s: %s", r, mt_strerror(ctx[r].rc), ctx[r].err);
    cancelled += ctx[r].rc == MT_ECANCELED && strstr(ctx[r].err, "cancelled") != NULL;
  }
  check(cancelled >= 1, "NCCL init cancelled: %d rank(s) say so", cancelled);
  check(took < 3.0, "cancelled NCCL init ended after %.2f s (cancel at 0.3 s, deadline 20 s)",
        took);
}

/* Two groups, A and B, of ranks 0 and 1 (devices 0 and 1); rank 0 waits in
 * an all-reduce on B that rank 1 never joins, a kernel that spins on the
 * device. Another thread then aborts rank 0's groups in turn, A (idle) then
 * B, as mt_local_abort does from the daemon's event loop. With aborts that
 * wait as a GPU's do (mt_emu_nccl_abort_waits: A's cannot return while B's
 * kernel runs), an abort that called ncclCommAbort itself would block the
 * caller until B's deadline; each abort must instead return at once, and
 * the all-reduce end cancelled. */
static mt_comm *tg_comm[2][2]; /* [rank][group A, B] */
static atomic_int tg_made;
static int tg_rc = -100;
static double tg_op_s;
static char tg_err[1024];

/* Rank r (device r) joins groups A and B of two ranks under prefix/A and
 * prefix/B into comm[0..1], then adds 1 to *made (10 on a failure, the
 * message in err). 0 when both were made. */
static int join_two_groups(int r, const char *prefix, mt_comm *comm[2], atomic_int *made, char *err,
                           size_t err_len) {
  staged_use_device(&devs[r]);
  for (int k = 0; k < 2; k++) {
    char pre[96];
    snprintf(pre, sizeof pre, "%s/%c", prefix, k ? 'B' : 'A');
    mt_comm_opts o = {.store = store,
                      .name = k ? "B" : "A",
                      .prefix = pre,
                      .rank = r,
                      .size = 2,
                      .timeout_ms = 20000,
                      .backend = MT_COMM_NCCL,
                      .device = &devs[r]};
    if (mt_comm_create(&comm[k], &o)) {
      snprintf(err, err_len, "rank %d, group %c: %s", r, k ? 'B' : 'A', mt_errmsg());
      atomic_fetch_add(made, 10);
      return -1;
    }
  }
  atomic_fetch_add(made, 1);
  return 0;
}

static void *tg_rank(void *arg) {
  int r = (int)(intptr_t)arg;
  if (join_two_groups(r, "test/twogroups", tg_comm[r], &tg_made, tg_err, sizeof tg_err))
    return NULL;
  if (r == 0) {
    float *buf = mt_device_alloc(&devs[0], 256 * sizeof(float));
    double t0 = now_s();
    tg_rc = mt_comm_allreduce(tg_comm[0][1], buf, buf, 256, MT_COMM_F32, MT_COMM_SUM);
    tg_op_s = now_s() - t0;
    snprintf(tg_err, sizeof tg_err, "%s", mt_errmsg());
    mt_device_free(&devs[0], buf);
  }
  return NULL;
}

static void test_aborts_of_groups_sharing_a_device_do_not_wait_on_each_other(void) {
  mt_emu_nccl_abort_waits(1);
  pthread_t th[2];
  for (int r = 0; r < 2; r++) pthread_create(&th[r], NULL, tg_rank, (void *)(intptr_t)r);
  while (atomic_load(&tg_made) < 2) sleep_ms(1);
  double took = -1.0;
  if (atomic_load(&tg_made) == 2) {
    sleep_ms(200); /* rank 0 is in its all-reduce on B */
    double t0 = now_s();
    mt_comm_abort(tg_comm[0][0]);
    mt_comm_abort(tg_comm[0][1]);
    took = now_s() - t0;
  }
  for (int r = 0; r < 2; r++) pthread_join(th[r], NULL);
  check(took >= 0.0 && took < 0.1, "aborting A then B (B in an all-reduce) took %.3f s", took);
  check(tg_rc == MT_ECANCELED && tg_op_s < 2.0,
        "the all-reduce on B: %s after %.2f s (deadline 20 s): %s", mt_strerror(tg_rc), tg_op_s,
        tg_err);
  for (int r = 0; r < 2; r++)
    for (int k = 0; k < 2; k++) mt_comm_destroy(tg_comm[r][k]);
  mt_emu_nccl_abort_waits(0);
}

/* The same hazard met by the owner: rank 0 starts a reduce on A that rank 1
 * never joins (a gradient bucket in flight), then an all-reduce on B, which
 * rank 1 never joins either, passes its 0.3 s deadline. B's failure aborts
 * B, which (aborts waiting as a GPU's) cannot finish while A's reduce runs;
 * the owner must still get its error at the deadline, free to abort A as a
 * failing rank does, and both aborts then complete. */
static mt_comm *fo_comm[2][2];
static atomic_int fo_made;
static int fo_rc = -100;
static double fo_op_s;
static char fo_err[1024];

static void *fo_rank(void *arg) {
  int r = (int)(intptr_t)arg;
  if (join_two_groups(r, "test/ownerfail", fo_comm[r], &fo_made, fo_err, sizeof fo_err))
    return NULL;
  if (r == 0) {
    while (atomic_load(&fo_made) < 2) sleep_ms(1);
    float *a = mt_device_alloc(&devs[0], 256 * sizeof(float));
    float *b = mt_device_alloc(&devs[0], 256 * sizeof(float));
    int rc = mt_comm_reduce_start(fo_comm[0][0], a, a, 256, MT_COMM_F32, MT_COMM_SUM, 0);
    mt_comm_set_timeout(fo_comm[0][1], 300);
    double t0 = now_s();
    fo_rc = rc ? rc : mt_comm_allreduce(fo_comm[0][1], b, b, 256, MT_COMM_F32, MT_COMM_SUM);
    fo_op_s = now_s() - t0;
    snprintf(fo_err, sizeof fo_err, "%s", mt_errmsg());
    mt_comm_abort(fo_comm[0][0]); /* as a failing rank aborts its groups */
    mt_comm_abort(fo_comm[0][1]);
    mt_device_free(&devs[0], b);
    mt_device_free(&devs[0], a);
  }
  return NULL;
}

static void test_a_failed_op_does_not_block_its_owner_in_the_abort(void) {
  mt_emu_nccl_abort_waits(1);
  pthread_t th[2];
  for (int r = 0; r < 2; r++) pthread_create(&th[r], NULL, fo_rank, (void *)(intptr_t)r);
  for (int r = 0; r < 2; r++) pthread_join(th[r], NULL);
  check((fo_rc == MT_ETIMEDOUT || fo_rc == MT_EIO) && fo_op_s < 1.0,
        "the all-reduce on B (deadline 0.3 s) while A's reduce runs: %s after %.2f s: %s",
        mt_strerror(fo_rc), fo_op_s, fo_err);
  double t0 = now_s();
  for (int r = 0; r < 2; r++)
    for (int k = 0; k < 2; k++) mt_comm_destroy(fo_comm[r][k]);
  check(now_s() - t0 < 2.0, "destroying the four groups took %.2f s", now_s() - t0);
  mt_emu_nccl_abort_waits(0);
}

/* Rank 3 joins but does not enter the all-reduce until the others have
 * failed and one of them has aborted the group (a failed group is aborted
 * on a thread of its own: before that, the peers' timed-out all-reduce is
 * still queued, and rank 3 joining completes it, as on a GPU); they must
 * fail by their deadline naming it, and rank 3's late all-reduce must then
 * fail at once (its peers aborted), not at its own. */
static atomic_int stuck_failed;
static int stuck_aborts0; /* mt_emu_nccl_abort_count() before the test */

static int body_stuck(rank_ctx *x, mt_comm *c) {
  float *buf = mt_device_alloc(&devs[x->rank], 1000 * sizeof(float));
  if (!buf) return MT_ENOMEM;
  int rc;
  if (x->rank == 3) {
    while (atomic_load(&stuck_failed) < 3 || mt_emu_nccl_abort_count() == stuck_aborts0)
      sleep_ms(1);
    mt_comm_set_timeout(c, 10000);
    double t0 = now_s();
    rc = mt_comm_allreduce(c, buf, buf, 1000, MT_COMM_F32, MT_COMM_SUM);
    snprintf(x->err, sizeof x->err, "%s", mt_errmsg());
    *(double *)x->arg = now_s() - t0;
  } else {
    rc = mt_comm_allreduce(c, buf, buf, 1000, MT_COMM_F32, MT_COMM_SUM);
    snprintf(x->err, sizeof x->err, "%s", mt_errmsg());
    atomic_fetch_add(&stuck_failed, 1);
    int again = mt_comm_allreduce(c, buf, buf, 1000, MT_COMM_F32, MT_COMM_SUM);
    if (rc && again != rc) {
      snprintf(x->err, sizeof x->err, "an op after a failure: %s", mt_errmsg());
      rc = -1;
    }
  }
  mt_device_free(&devs[x->rank], buf);
  return rc;
}

static void test_stuck_peer_fails_allreduce_by_deadline(void) {
  rank_ctx ctx[NDEV];
  double late_s = -1;
  atomic_store(&stuck_failed, 0);
  stuck_aborts0 = mt_emu_nccl_abort_count();
  double t0 = now_s();
  run_ranks(ctx, NDEV, NDEV, "test/stuck", 300, body_stuck, &late_s);
  double took = now_s() - t0;
  int timed_out = 0;
  for (int r = 0; r < NDEV - 1; r++) {
    check((ctx[r].rc == MT_ETIMEDOUT || ctx[r].rc == MT_EIO) &&
              strstr(ctx[r].err, "comm dp.pp0.tp0: allreduce of 4000 bytes"),
          "all-reduce without rank 3, rank %d: %s: %s", r, mt_strerror(ctx[r].rc), ctx[r].err);
    timed_out += strstr(ctx[r].err, "timed out after 300 ms") != NULL;
  }
  check(timed_out >= 1, "all-reduce without rank 3: %d rank(s) say \"timed out after 300 ms\"",
        timed_out);
  check(took < 3.0, "all-reduce without rank 3: the group failed within %.2f s (deadline 0.3 s)",
        took);
  check(ctx[3].rc == MT_EIO && late_s >= 0 && late_s < 1.0,
        "rank 3's late all-reduce after its peers aborted: %s after %.3f s (deadline 10 s): %s",
        mt_strerror(ctx[3].rc), late_s, ctx[3].err);
}

/* Rank 0 blocks in a recv (or an all-reduce) that rank 1 never serves while
 * rank 1 waits in a recv from rank 0; a third thread aborts rank 0's group
 * after 200 ms. */
typedef struct abort_arg {
  int collective;
  atomic_int blocked;
  double aborted_at, failed_at;
  int later_rc;
  pthread_t aborter;
} abort_arg;

static void *aborter_main(void *p) {
  rank_ctx *x = p;
  abort_arg *a = x->arg;
  while (!atomic_load(&a->blocked)) sleep_ms(1);
  sleep_ms(200);
  a->aborted_at = now_s();
  mt_comm_abort(x->comm);
  return NULL;
}

static int body_abort(rank_ctx *x, mt_comm *c) {
  abort_arg *a = x->arg;
  const size_t n = 1 << 16;
  float *buf = mt_device_alloc(&devs[x->rank], n * sizeof(float));
  if (!buf) return MT_ENOMEM;
  int rc;
  if (x->rank == 0) {
    pthread_create(&a->aborter, NULL, aborter_main, x);
    atomic_store(&a->blocked, 1);
    rc = a->collective ? mt_comm_allreduce(c, buf, buf, n, MT_COMM_F32, MT_COMM_SUM)
                       : mt_comm_recv(c, buf, n, MT_COMM_F32, 1);
    a->failed_at = now_s();
    snprintf(x->err, sizeof x->err, "%s", mt_errmsg());
    pthread_join(a->aborter, NULL);
    a->later_rc = mt_comm_barrier(c);
  } else {
    rc = mt_comm_recv(c, buf, 16, MT_COMM_F32, 0);
  }
  mt_device_free(&devs[x->rank], buf);
  return rc;
}

static void test_abort_from_another_thread_fails_blocked_op_promptly(void) {
  for (int collective = 0; collective < 2; collective++) {
    rank_ctx ctx[2];
    abort_arg a;
    memset(&a, 0, sizeof a);
    a.collective = collective;
    const char *what = collective ? "allreduce" : "recv";
    char prefix[64];
    snprintf(prefix, sizeof prefix, "test/abort/%d", collective);
    run_ranks(ctx, 2, 2, prefix, 20000, body_abort, &a);
    double late = a.failed_at - a.aborted_at;
    check(ctx[0].rc == MT_ECANCELED && strstr(ctx[0].err, what) && late >= 0 && late < 1.0,
          "abort of a blocked %s: %s %.3f s after the abort: %s", what, mt_strerror(ctx[0].rc),
          late, ctx[0].err);
    check(a.later_rc == MT_ECANCELED, "an operation after the abort: %s", mt_strerror(a.later_rc));
    check(ctx[1].rc == MT_EIO && ctx[1].elapsed_s < 5.0 && strstr(ctx[1].err, "rank 0"),
          "the aborted rank's peer (deadline 20 s): %s after %.2f s: %s", mt_strerror(ctx[1].rc),
          ctx[1].elapsed_s, ctx[1].err);
  }
}

/* Rank 2 aborts its own group instead of joining an all-reduce the others
 * are blocked in: they must fail with NCCL's remote error, promptly. */
static int body_peer_abort(rank_ctx *x, mt_comm *c) {
  float *buf = mt_device_alloc(&devs[x->rank], 256 * sizeof(float));
  if (!buf) return MT_ENOMEM;
  int rc;
  if (x->rank == 2) {
    sleep_ms(100);
    mt_comm_abort(c);
    rc = mt_comm_allreduce(c, buf, buf, 256, MT_COMM_F32, MT_COMM_SUM);
    snprintf(x->err, sizeof x->err, "%s", mt_errmsg());
  } else {
    rc = mt_comm_allreduce(c, buf, buf, 256, MT_COMM_F32, MT_COMM_SUM);
  }
  mt_device_free(&devs[x->rank], buf);
  return rc;
}

static void test_peer_abort_fails_the_others_instead_of_hanging(void) {
  rank_ctx ctx[NDEV];
  run_ranks(ctx, NDEV, NDEV, "test/peer-abort", 20000, body_peer_abort, NULL);
  for (int r = 0; r < NDEV; r++) {
    if (r == 2) {
      check(ctx[r].rc == MT_ECANCELED, "the aborting rank's next all-reduce: %s: %s",
            mt_strerror(ctx[r].rc), ctx[r].err);
      continue;
    }
    check(ctx[r].rc == MT_EIO && ctx[r].elapsed_s < 5.0 && strstr(ctx[r].err, "rank 2"),
          "rank %d, blocked while rank 2 aborted (deadline 20 s): %s after %.2f s: %s", r,
          mt_strerror(ctx[r].rc), ctx[r].elapsed_s, ctx[r].err);
  }
}

/* comm.h: a send completes once the peer has posted its recv, so two ranks
 * that both send first wait for each other until the deadline. */
static int body_both_send(rank_ctx *x, mt_comm *c) {
  float *buf = mt_device_alloc(&devs[x->rank], 64 * sizeof(float));
  if (!buf) return MT_ENOMEM;
  int rc = mt_comm_send(c, buf, 64, MT_COMM_F32, 1 - x->rank);
  if (!rc) rc = mt_comm_recv(c, buf, 64, MT_COMM_F32, 1 - x->rank);
  mt_device_free(&devs[x->rank], buf);
  return rc;
}

static void test_two_ranks_sending_first_wait_until_deadline(void) {
  rank_ctx ctx[2];
  double t0 = now_s();
  run_ranks(ctx, 2, 2, "test/both-send", 300, body_both_send, NULL);
  double took = now_s() - t0;
  int timed_out = 0;
  for (int r = 0; r < 2; r++) timed_out += strstr(ctx[r].err, "timed out after 300 ms") != NULL;
  check(ctx[0].rc && ctx[1].rc && timed_out >= 1 && took < 2.0,
        "two ranks that both send first: %s / %s after %.2f s: %s", mt_strerror(ctx[0].rc),
        mt_strerror(ctx[1].rc), took, ctx[0].err);
}

/* NCCL's max is fmax (a NaN on one rank is dropped); Gloo's carries it, and
 * tests/parallel/test_comm.c holds the comm layer to that. Reported, not
 * counted, until nccl.c deals with it. */
static int body_nan(rank_ctx *x, mt_comm *c) {
  float f[2] = {1, 2};
  if (x->rank == 1) f[0] = NAN;
  int rc = staged_allreduce(c, f, f, 2, MT_COMM_F32, MT_COMM_MAX);
  if (!rc && !isnan(f[0]))
    snprintf(x->err, sizeof x->err, "max over ranks of {1, NaN} is %g", (double)f[0]);
  return rc;
}

static void test_max_with_a_nan(void) {
  rank_ctx ctx[2];
  run_ranks(ctx, 2, 2, "test/nan", 20000, body_nan, NULL);
  check(ctx[0].rc == 0 && ctx[1].rc == 0, "max all-reduce with a NaN on rank 1 runs");
  if (ctx[0].err[0])
    printf("note (not counted): NCCL drops the NaN, unlike Gloo (test_comm's "
           "test_max_propagates_nan_from_any_rank): %s\n",
           ctx[0].err);
  else
    printf("ok   max over NCCL carries the NaN\n");
}

/* ------------------------------------------------------------ the emulator */

/* Two ranks through the raw API: rank 0 on device 0 checks what is pending
 * before rank 1 (device 1) posts, which it does once rank 0 says so. */
typedef struct raw_arg {
  ncclUniqueId id;
  atomic_int phase;
  int rank;
} raw_arg;

static raw_arg raw[2];

static void wait_phase(atomic_int *p, int want) {
  while (atomic_load(p) < want) sleep_ms(1);
}

/* Polls until the comm reports ncclSuccess (after ncclInProgress), as
 * NCCL's non-blocking mode asks. */
static ncclResult_t settle(ncclComm_t comm, ncclResult_t r) {
  while (r == ncclInProgress) {
    if (ncclCommGetAsyncError(comm, &r) != ncclSuccess) return ncclInternalError;
    if (r == ncclInProgress) sched_yield();
  }
  return r;
}

static int stream_done(cudaStream_t s) {
  for (int i = 0; i < 5000; i++) {
    if (cudaStreamQuery(s) == cudaSuccess) return 1;
    sleep_ms(1);
  }
  return 0;
}

static void *raw_main(void *p) {
  raw_arg *a = p;
  const int me = a->rank, other = 1 - me;
  atomic_int *phase = &raw[0].phase;
  cudaSetDevice(me);
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  ncclComm_t comm;
  cudaStream_t s, waiter;
  cudaEvent_t done_ev, t0, t1;
  float *buf, *out, host[8];
  cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
  cudaStreamCreate(&waiter);
  cudaEventCreateWithFlags(&done_ev, cudaEventDisableTiming);
  cudaEventCreate(&t0);
  cudaEventCreate(&t1);
  size_t free0, free1, total;
  cudaMemGetInfo(&free0, &total);
  cudaMalloc((void **)&buf, 8 * sizeof(float));
  cudaMalloc((void **)&out, 8 * sizeof(float));
  cudaMemGetInfo(&free1, &total);
  if (me == 0)
    check(free0 - free1 >= 64 && free1 < total, "cudaMemGetInfo: %zu bytes free of %zu, %zu after",
          free0, total, free1);
  if (me == 1) wait_phase(phase, 1); /* joins once rank 0 has seen init pending */
  ncclResult_t r = ncclCommInitRankConfig(&comm, 2, raw[0].id, me, &config);
  if (me == 0) {
    ncclResult_t st;
    ncclCommGetAsyncError(comm, &st);
    check(r == ncclInProgress && st == ncclInProgress,
          "non-blocking init: %s, then %s until the peer joins", ncclGetErrorString(r),
          ncclGetErrorString(st));
    atomic_store(phase, 1);
  }
  r = settle(comm, r);
  if (me == 0) check(r == ncclSuccess, "non-blocking init completes: %s", ncclGetErrorString(r));

  /* phase 2: rank 0 posts an all-reduce; rank 1 waits to post it */
  for (int i = 0; i < 8; i++) host[i] = (float)(me + 1) * (float)i;
  cudaMemcpyAsync(buf, host, sizeof host, cudaMemcpyHostToDevice, s);
  cudaStreamSynchronize(s);
  if (me == 0) {
    cudaEventRecord(t0, s);
    r = ncclAllReduce(buf, out, 8, ncclFloat32, ncclSum, comm, s);
    ncclResult_t again = ncclAllReduce(buf, out, 8, ncclFloat32, ncclSum, comm, s);
    check(r == ncclInProgress && again == ncclInvalidUsage,
          "a call before GetAsyncError reported the last one done is refused: %s",
          ncclGetLastError(comm));
    r = settle(comm, r);
    cudaEventRecord(done_ev, s);
    cudaEventRecord(t1, s);
    cudaStreamWaitEvent(waiter, done_ev, 0);
    sleep_ms(20);
    check(r == ncclSuccess && cudaStreamQuery(s) == cudaErrorNotReady &&
              cudaEventQuery(done_ev) == cudaErrorNotReady &&
              cudaStreamQuery(waiter) == cudaErrorNotReady,
          "an all-reduce the peer has not posted: its stream, an event behind it and a stream "
          "waiting for that event are all pending");
    atomic_store(phase, 2);
  } else {
    wait_phase(phase, 2);
    r = settle(comm, ncclAllReduce(buf, out, 8, ncclFloat32, ncclSum, comm, s));
  }
  int drained = stream_done(s);
  cudaMemcpyAsync(host, out, sizeof host, cudaMemcpyDeviceToHost, s);
  cudaStreamSynchronize(s);
  int right = 1;
  for (int i = 0; i < 8; i++) right &= host[i] == 3.0f * (float)i;
  if (me == 0) {
    float ms = -1;
    cudaError_t te = cudaEventElapsedTime(&ms, t0, t1);
    check(r == ncclSuccess && drained && right && cudaEventQuery(done_ev) == cudaSuccess &&
              stream_done(waiter),
          "once the peer posts: the sum is right, the stream, the event and the waiting stream "
          "complete");
    check(te == cudaSuccess && ms >= 0, "cudaEventElapsedTime across the all-reduce: %.3f ms",
          (double)ms);
    atomic_store(phase, 3);
  } else {
    wait_phase(phase, 3);
  }

  /* a group of send and receive, in opposite orders on the two ranks */
  for (int i = 0; i < 8; i++) host[i] = (float)(100 * me + i);
  cudaMemcpyAsync(buf, host, sizeof host, cudaMemcpyHostToDevice, s);
  ncclGroupStart();
  if (me == 0) {
    ncclSend(buf, 8, ncclFloat32, other, comm, s);
    ncclRecv(out, 8, ncclFloat32, other, comm, s);
  } else {
    ncclRecv(out, 8, ncclFloat32, other, comm, s);
    ncclSend(buf, 8, ncclFloat32, other, comm, s);
  }
  r = settle(comm, ncclGroupEnd());
  drained = stream_done(s);
  cudaMemcpyAsync(host, out, sizeof host, cudaMemcpyDeviceToHost, s);
  cudaStreamSynchronize(s);
  right = 1;
  for (int i = 0; i < 8; i++) right &= host[i] == (float)(100 * other + i);
  check(r == ncclSuccess && drained && right,
        "rank %d: a group of send and receive (%s first) exchanges the buffers", me,
        me == 0 ? "send" : "receive");

  /* ncclReduce to rank 1: only the root's recv is written */
  for (int i = 0; i < 8; i++) host[i] = (float)(me + 1);
  cudaMemcpyAsync(buf, host, sizeof host, cudaMemcpyHostToDevice, s);
  for (int i = 0; i < 8; i++) host[i] = -7.0f;
  cudaMemcpyAsync(out, host, sizeof host, cudaMemcpyHostToDevice, s);
  r = settle(comm, ncclReduce(buf, out, 8, ncclFloat32, ncclMax, 1, comm, s));
  drained = stream_done(s);
  cudaMemcpyAsync(host, out, sizeof host, cudaMemcpyDeviceToHost, s);
  cudaStreamSynchronize(s);
  float want = me == 1 ? 2.0f : -7.0f;
  right = 1;
  for (int i = 0; i < 8; i++) right &= host[i] == want;
  check(r == ncclSuccess && drained && right, "rank %d: ncclReduce max to rank 1: recv holds %g",
        me, (double)host[0]);

  r = ncclCommFinalize(comm);
  r = settle(comm, r);
  ncclCommDestroy(comm);
  check(r == ncclSuccess, "rank %d: finalize and destroy", me);
  cudaFree(buf);
  cudaFree(out);
  cudaEventDestroy(done_ev);
  cudaEventDestroy(t0);
  cudaEventDestroy(t1);
  cudaStreamDestroy(s);
  cudaStreamDestroy(waiter);
  return NULL;
}

static void test_emulated_streams_events_and_groups(void) {
  ncclGetUniqueId(&raw[0].id);
  atomic_store(&raw[0].phase, 0);
  pthread_t th[2];
  for (int r = 0; r < 2; r++) {
    raw[r].rank = r;
    pthread_create(&th[r], NULL, raw_main, &raw[r]);
  }
  for (int r = 0; r < 2; r++) pthread_join(th[r], NULL);
}

/* ------------------------------------------------ late mode and the guard */

/* Ranks as threads on the raw API: comm a spans all three, comm b ranks 1
 * and 2 (bootstrapped by rank 1). */
typedef struct late_arg {
  int rank;
  ncclUniqueId *id_a, *id_b;
  pthread_barrier_t *bar;
  int early_nan, held, summed, chained; /* rank 0's findings */
} late_arg;

static int all_poison(const float *v, int n) {
  for (int i = 0; i < n; i++) {
    uint32_t bits;
    memcpy(&bits, &v[i], sizeof bits);
    if (bits != 0xFFFFFFFFu) return 0;
  }
  return 1;
}

static void *late_main(void *p) {
  late_arg *a = p;
  const int me = a->rank;
  cudaSetDevice(me);
  ncclComm_t ca, cb = NULL;
  cudaStream_t s, side;
  cudaStreamCreate(&s);
  cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking);
  float *buf, *out, host[8];
  cudaMalloc((void **)&buf, sizeof host);
  cudaMalloc((void **)&out, sizeof host);
  ncclCommInitRank(&ca, 3, *a->id_a, me);
  if (me > 0) ncclCommInitRank(&cb, 2, *a->id_b, me - 1);
  for (int i = 0; i < 8; i++) host[i] = (float)(me + 1) * (float)i;
  cudaMemcpyAsync(buf, host, sizeof host, cudaMemcpyHostToDevice, s);
  cudaStreamSynchronize(s);

  /* 1: every rank posts; no host waits yet */
  ncclAllReduce(buf, out, 8, ncclFloat32, ncclSum, ca, s);
  pthread_barrier_wait(a->bar);
  if (me == 0) {
    sleep_ms(20);
    /* a copy on a stream not ordered after the all-reduce: a racing read */
    cudaMemcpyAsync(host, out, sizeof host, cudaMemcpyDeviceToHost, side);
    cudaStreamSynchronize(side);
    a->early_nan = all_poison(host, 8);
    a->held = cudaStreamQuery(s) == cudaSuccess; /* the query is a wait: it runs now */
    cudaMemcpyAsync(host, out, sizeof host, cudaMemcpyDeviceToHost, s);
    cudaStreamSynchronize(s);
    a->summed = 1;
    for (int i = 0; i < 8; i++) a->summed &= host[i] == 6.0f * (float)i;
  }
  pthread_barrier_wait(a->bar);
  cudaStreamSynchronize(s);

  /* 2: rank 1's send to rank 0 queues behind an all-reduce of ranks 1 and
   * 2 on the same stream; only rank 0's host waits, while 1 and 2 sit in
   * a barrier: its wait must reach through the send to that all-reduce */
  if (me == 1) {
    ncclAllReduce(buf, out, 8, ncclFloat32, ncclSum, cb, s);
    ncclSend(buf, 8, ncclFloat32, 0, ca, s);
  } else if (me == 2) {
    ncclAllReduce(buf, out, 8, ncclFloat32, ncclSum, cb, s);
  } else {
    ncclRecv(out, 8, ncclFloat32, 1, ca, s);
  }
  pthread_barrier_wait(a->bar);
  if (me == 0) {
    a->chained = 0;
    for (int i = 0; i < 5000 && !a->chained; i++) {
      a->chained = cudaStreamQuery(s) == cudaSuccess;
      if (!a->chained) sleep_ms(1);
    }
  }
  pthread_barrier_wait(a->bar); /* then every host waits: no hang either way */
  cudaStreamSynchronize(s);
  if (me == 0) {
    cudaMemcpyAsync(host, out, sizeof host, cudaMemcpyDeviceToHost, s);
    cudaStreamSynchronize(s);
    for (int i = 0; i < 8; i++) a->chained &= host[i] == 2.0f * (float)i;
  }
  if (cb) ncclCommDestroy(cb);
  ncclCommDestroy(ca);
  cudaFree(buf);
  cudaFree(out);
  cudaStreamDestroy(side);
  cudaStreamDestroy(s);
  return NULL;
}

/* Late mode: an operation all ranks posted moves no data until a host waits
 * for it, and a racing reader meanwhile sees the guard's poison; one host's
 * wait reaches every operation its own needs, on other ranks and behind
 * other communicators, though no other host waits. */
static void test_late_mode_moves_data_when_a_host_waits(void) {
  ncclUniqueId ia, ib;
  ncclGetUniqueId(&ia);
  ncclGetUniqueId(&ib);
  pthread_barrier_t bar;
  pthread_barrier_init(&bar, NULL, 3);
  late_arg args[3];
  pthread_t th[3];
  int was_late = mt_emu_nccl_late(1);
  for (int r = 0; r < 3; r++) {
    args[r] = (late_arg){.rank = r, .id_a = &ia, .id_b = &ib, .bar = &bar};
    pthread_create(&th[r], NULL, late_main, &args[r]);
  }
  for (int r = 0; r < 3; r++) pthread_join(th[r], NULL);
  mt_emu_nccl_late(was_late);
  pthread_barrier_destroy(&bar);
  check(args[0].early_nan, "late: a read racing a posted all-reduce sees the guard's poison (NaN)");
  check(args[0].held && args[0].summed,
        "late: the all-reduce runs when rank 0's host waits, though ranks 1 and 2 never did");
  check(args[0].chained, "late: rank 0's wait reaches through rank 1's send to the all-reduce of "
                         "ranks 1 and 2 before it on that stream");
}

/* A child that races an operation: two ranks post an all-reduce, one
 * writes its send (or receive) buffer from a stream not ordered after it,
 * then waits. */
typedef struct race_arg {
  int rank, target_recv;
  ncclUniqueId *id;
  pthread_barrier_t *bar; /* no host waits before the racing write */
} race_arg;

static void *race_main(void *p) {
  race_arg *a = p;
  cudaSetDevice(a->rank);
  ncclComm_t c;
  cudaStream_t s, side;
  cudaStreamCreate(&s);
  cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking);
  float *buf, *out;
  cudaMalloc((void **)&buf, 64 * sizeof(float));
  cudaMalloc((void **)&out, 64 * sizeof(float));
  cudaMemsetAsync(buf, 0, 64 * sizeof(float), s);
  ncclCommInitRank(&c, 2, *a->id, a->rank);
  ncclAllReduce(buf, out, 64, ncclFloat32, ncclSum, c, s);
  if (a->rank == 1) cudaMemsetAsync(a->target_recv ? out + 5 : buf + 5, 0x42, 4, side);
  pthread_barrier_wait(a->bar);
  cudaStreamSynchronize(s);
  return NULL;
}

/* Runs the race in a child (the guard aborts the process) and returns its
 * stderr in err; the child's wait status in *status. */
static void race_child(int target_recv, int *status, char *err, size_t cap) {
  char path[] = "/tmp/mtnlg-nccl-emu-race-XXXXXX";
  int fd = mkstemp(path);
  err[0] = 0;
  *status = -1;
  if (fd < 0) return;
  fflush(stdout);
  pid_t pid = fork();
  if (pid == 0) {
    dup2(fd, 2);
    alarm(20); /* a hang fails the check instead of the suite */
    mt_emu_nccl_late(1);
    ncclUniqueId id;
    ncclGetUniqueId(&id);
    pthread_barrier_t bar;
    pthread_barrier_init(&bar, NULL, 2);
    race_arg args[2];
    pthread_t th[2];
    for (int r = 0; r < 2; r++) {
      args[r] = (race_arg){.rank = r, .target_recv = target_recv, .id = &id, .bar = &bar};
      pthread_create(&th[r], NULL, race_main, &args[r]);
    }
    for (int r = 0; r < 2; r++) pthread_join(th[r], NULL);
    _exit(0);
  }
  if (pid > 0) waitpid(pid, status, 0);
  ssize_t n = pread(fd, err, cap - 1, 0);
  err[n > 0 ? n : 0] = 0;
  close(fd);
  unlink(path);
}

/* The guard stops a program whose work touches an operation's buffers while
 * it is in flight, naming the operation and the byte: a write to the send
 * buffer (NCCL might send either value) and a write to the receive buffer
 * (lost, or overwriting the result). */
static void test_guard_stops_work_racing_an_operation(void) {
  static const struct {
    const char *buffer, *found;
  } cases[] = {{"send", "changed while"}, {"receive", "was written while"}};
  for (int recv = 0; recv < 2; recv++) {
    char err[2048], at[64];
    int st;
    race_child(recv, &st, err, sizeof err);
    snprintf(at, sizeof at, "byte 20 of its %s buffer", cases[recv].buffer);
    check(st != -1 && WIFSIGNALED(st) && WTERMSIG(st) == SIGABRT &&
              strstr(err, "ncclAllReduce #0 of rank 1 of 2") && strstr(err, at) &&
              strstr(err, cases[recv].found),
          "a write racing an all-reduce's %s buffer stops the test: %s", cases[recv].buffer,
          err[0] ? err : "(nothing on stderr)");
  }
}

/* What test_nccl_gpu checks on a GPU, here on emulated cuda:0. */
static void test_one_rank_checks_as_on_a_gpu(void) {
  failures += nccl_one_rank_checks(&devs[0], store, "test/one_rank");
}

static const struct {
  const char *name;
  void (*fn)(void);
} tests[] = {
    {"one_rank_checks_as_on_a_gpu", test_one_rank_checks_as_on_a_gpu},
    {"emulated_streams_events_and_groups", test_emulated_streams_events_and_groups},
    {"collectives_match_serial_reference_1_to_4_ranks",
     test_collectives_match_serial_reference_1_to_4_ranks},
    {"large_reductions_match_reference", test_large_reductions_match_reference},
    {"kernels_and_collectives_on_four_devices", test_kernels_and_collectives_on_four_devices},
    {"missing_rank_fails_create_naming_it", test_missing_rank_fails_create_naming_it},
    {"rank_missing_from_nccl_init_times_out", test_rank_missing_from_nccl_init_times_out},
    {"cancel_ends_a_waiting_nccl_init", test_cancel_ends_a_waiting_nccl_init},
    {"aborts_of_groups_sharing_a_device_do_not_wait_on_each_other",
     test_aborts_of_groups_sharing_a_device_do_not_wait_on_each_other},
    {"a_failed_op_does_not_block_its_owner_in_the_abort",
     test_a_failed_op_does_not_block_its_owner_in_the_abort},
    {"stuck_peer_fails_allreduce_by_deadline", test_stuck_peer_fails_allreduce_by_deadline},
    {"abort_from_another_thread_fails_blocked_op_promptly",
     test_abort_from_another_thread_fails_blocked_op_promptly},
    {"peer_abort_fails_the_others_instead_of_hanging",
     test_peer_abort_fails_the_others_instead_of_hanging},
    {"two_ranks_sending_first_wait_until_deadline",
     test_two_ranks_sending_first_wait_until_deadline},
    {"max_with_a_nan", test_max_with_a_nan},
    {"late_mode_moves_data_when_a_host_waits", test_late_mode_moves_data_when_a_host_waits},
    {"guard_stops_work_racing_an_operation", test_guard_stops_work_racing_an_operation},
};

/* Arguments, if any, pick the tests whose names contain one of them. */
int main(int argc, char **argv) {
  double t0 = now_s();
  setenv("MT_CUDA_EMU_DEVICES", "4", 1);
  if (mt_store_mem_new(&store)) {
    fprintf(stderr, "store: %s\n", mt_errmsg());
    return 1;
  }
  for (int r = 0; r < NDEV; r++) {
    char spec[16];
    snprintf(spec, sizeof spec, "cuda:%d", r);
    if (mt_device_open(&devs[r], spec)) {
      fprintf(stderr, "%s: %s\n", spec, mt_errmsg());
      return 1;
    }
  }
  for (size_t t = 0; t < sizeof tests / sizeof *tests; t++) {
    int run = argc < 2;
    for (int a = 1; a < argc; a++) run |= strstr(tests[t].name, argv[a]) != NULL;
    if (!run) continue;
    printf("-- %s\n", tests[t].name);
    tests[t].fn();
  }
  for (int r = 0; r < NDEV; r++) mt_device_close(&devs[r]);
  mt_store_free(store);
  printf("%s: %d check(s) failed, %.2f s\n", failures ? "FAIL" : "ok", failures, now_s() - t0);
  return failures ? 1 : 0;
}
