/* rank_runs.h — a job's ranks as threads of the test, each its own mt_local
 * of one rank (rank_begin/rank_count) over a shared in-process store, so
 * every rank reports its own step stats. Shared by the layout tests that
 * compare per-rank losses, skipped steps and loss scales. Header-only (static). */
#ifndef MT_RANK_RUNS_H
#define MT_RANK_RUNS_H

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "err.h"
#include "job.h"
#include "local.h"
#include "store.h"

enum { RANK_RUNS_MAX_STEPS = 64, RANK_RUNS_MAX_RANKS = 8 };

typedef struct rank_log {
  int n; /* steps reported (may exceed RANK_RUNS_MAX_STEPS; the first ones are kept) */
  int skipped[RANK_RUNS_MAX_STEPS];
  double scale[RANK_RUNS_MAX_STEPS], loss[RANK_RUNS_MAX_STEPS];
  double grad_norm[RANK_RUNS_MAX_STEPS];
  char err[512];                 /* the rank's own error, "" when it ended well */
  int timing_level;              /* train.timing_log_level of the last step reported */
  double timer_max[MT_TM_COUNT]; /* and its timers' maxima across ranks */
} rank_log;

static void rank_runs_on_step(const mt_step_stats *st, void *arg) {
  rank_log *r = arg;
  if (r->n < RANK_RUNS_MAX_STEPS) {
    r->skipped[r->n] = st->skipped;
    r->scale[r->n] = st->loss_scale;
    r->loss[r->n] = st->loss;
    r->grad_norm[r->n] = st->grad_norm;
  }
  r->timing_level = st->timing_level;
  memcpy(r->timer_max, st->timer_max, sizeof r->timer_max);
  r->n++;
}

enum { RANK_RUNS_GRACE_MS = 3000 };

/* run_ranks' ranks while it runs, by world rank (NULL otherwise): a test's
 * hook may end one's generation (mt_local_abort) as its node would. */
static mt_local *rank_runs_live[RANK_RUNS_MAX_RANKS] __attribute__((unused));

typedef struct rank_join {
  mt_local *l;
  rank_log *log;
  int rc, done;
  pthread_mutex_t *mu;
  pthread_cond_t *cv;
} rank_join;

static void *rank_runs_wait(void *arg) {
  rank_join *j = arg;
  int r = mt_local_wait(j->l);
  if (r) snprintf(j->log->err, sizeof j->log->err, "%s", mt_errmsg());
  pthread_mutex_lock(j->mu);
  j->rc = r, j->done = 1;
  pthread_cond_signal(j->cv);
  pthread_mutex_unlock(j->mu);
  return NULL;
}

/* Waits for the started ranks, each on a thread of its own; once one has
 * failed, aborts those still running RANK_RUNS_GRACE_MS later. *rc gets the
 * first failure in rank order, unless it holds one already. */
static void rank_runs_join(mt_local **ranks, int world, rank_log *logs, int *rc) {
  pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
  pthread_cond_t cv;
  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_cond_init(&cv, &ca);
  pthread_condattr_destroy(&ca);
  rank_join j[RANK_RUNS_MAX_RANKS] = {0};
  pthread_t th[RANK_RUNS_MAX_RANKS];
  int started[RANK_RUNS_MAX_RANKS] = {0};
  for (int w = 0; w < world; w++) {
    j[w] = (rank_join){.l = ranks[w], .log = &logs[w], .mu = &mu, .cv = &cv};
    if (!ranks[w])
      j[w].done = 1;
    else if (pthread_create(&th[w], NULL, rank_runs_wait, &j[w]) == 0)
      started[w] = 1;
    else
      rank_runs_wait(&j[w]); /* no thread: wait here, as before */
  }
  struct timespec deadline = {0};
  int graced = 0, aborted = 0; /* the grace started; the rest aborted */
  pthread_mutex_lock(&mu);
  for (;;) {
    int running = 0, failed = 0;
    for (int w = 0; w < world; w++) running += !j[w].done, failed |= j[w].done && j[w].rc;
    if (!running) break;
    if (failed && !graced) {
      graced = 1;
      clock_gettime(CLOCK_MONOTONIC, &deadline);
      deadline.tv_sec += RANK_RUNS_GRACE_MS / 1000;
      deadline.tv_nsec += (RANK_RUNS_GRACE_MS % 1000) * 1000000L;
      if (deadline.tv_nsec >= 1000000000L) deadline.tv_sec++, deadline.tv_nsec -= 1000000000L;
    }
    if (graced && !aborted) {
      if (pthread_cond_timedwait(&cv, &mu, &deadline) == ETIMEDOUT) {
        aborted = 1; /* mt_local_abort: any thread, any time */
        for (int w = 0; w < world; w++)
          if (!j[w].done) mt_local_abort(j[w].l);
      }
    } else {
      pthread_cond_wait(&cv, &mu);
    }
  }
  pthread_mutex_unlock(&mu);
  for (int w = 0; w < world; w++) {
    if (started[w]) pthread_join(th[w], NULL);
    if (!*rc) *rc = j[w].rc;
  }
  pthread_cond_destroy(&cv);
}

/* Runs the job (JSON text; presets from preset_dirs) with every world rank on
 * device "<kind>:<rank>"; logs[w] receives world rank w's steps. The first
 * failure aborts the others still running RANK_RUNS_GRACE_MS after it, as a
 * node aborts its ranks once one fails, but not inside the collective that
 * would tell them why: a rank whose device faulted fails its step right
 * after the vote that tells the others, and aborted at once, a rank still
 * in that vote said only "aborted" under load (what the tests check is
 * what every rank says, not how fast a node gives up on them). export_path:
 * the weights at the end, or NULL. */
static int run_ranks(const char *json, const char *const *preset_dirs, const char *kind,
                     const char *export_path, rank_log *logs) {
  mt_job job;
  int rc = mt_job_parse(&job, json, NULL, preset_dirs, NULL);
  if (rc) return rc;
  int world = job.parallel.tp * job.parallel.pp * job.parallel.dp_min;
  if (world > RANK_RUNS_MAX_RANKS)
    return mt_seterr(MT_EINVAL, "run_ranks: %d ranks, at most %d", world, RANK_RUNS_MAX_RANKS);
  mt_store *store = NULL;
  if (world > 1 && (rc = mt_store_mem_new(&store))) return rc;
  char specs[RANK_RUNS_MAX_RANKS][16];
  const char *dev[RANK_RUNS_MAX_RANKS][1];
  mt_local_opts opts[RANK_RUNS_MAX_RANKS];
  mt_local *ranks[RANK_RUNS_MAX_RANKS] = {0};
  memset(logs, 0, (size_t)world * sizeof *logs);
  for (int w = 0; w < world && !rc; w++) {
    snprintf(specs[w], sizeof specs[w], "%s:%d", kind, w);
    dev[w][0] = specs[w];
    opts[w] = (mt_local_opts){.job = &job,
                              .store = store,
                              .rank_begin = w,
                              .rank_count = 1,
                              .devices = dev[w],
                              .omp_threads = 1,
                              .device_kind = kind,
                              .comm_timeout_ms = 120000,
                              .export_path = export_path,
                              .on_step = rank_runs_on_step,
                              .arg = &logs[w]};
    rc = mt_local_start(&opts[w], &ranks[w]);
    __atomic_store_n(&rank_runs_live[w], ranks[w], __ATOMIC_RELEASE);
  }
  if (rc) /* a rank that did not start: the others wait for it in vain */
    for (int w = 0; w < world; w++)
      if (ranks[w]) mt_local_abort(ranks[w]);
  rank_runs_join(ranks, world, logs, &rc);
  for (int w = 0; w < world; w++) __atomic_store_n(&rank_runs_live[w], NULL, __ATOMIC_RELEASE);
  for (int w = 0; w < world; w++) mt_local_free(ranks[w]);
  mt_store_free(store);
  return rc;
}

/* Writes 20000 byte-valued tokens of a fixed, learnable pattern to a new
 * file named from tmpl ("/tmp/name-XXXXXX", at most 63 characters) into path.
 * 0, or -1 with a message on stderr. */
static int rank_runs_token_file(char path[64], const char *tmpl) {
  uint16_t t[20000];
  for (int i = 0; i < 20000; i++) t[i] = (uint16_t)((i * 7 + i / 13 + (i / 101) * 3) % 256);
  snprintf(path, 64, "%s", tmpl);
  int fd = mkstemp(path);
  int ok = fd >= 0 && write(fd, t, sizeof t) == (ssize_t)sizeof t;
  if (fd >= 0) close(fd);
  if (!ok) fprintf(stderr, "cannot write %s\n", path);
  return ok ? 0 : -1;
}

/* The worst relative difference of a[s] from b[s] over steps [from, to); a
 * NaN is the worst. */
static double rank_runs_worst_rel_of(const double *a, const double *b, int from, int to) {
  double worst = 0.0;
  for (int s = from; s < to; s++) {
    double r = (a[s] - b[s]) / b[s];
    r = r < 0 ? -r : r;
    worst = r > worst || r != r ? r : worst;
  }
  return worst;
}

/* ... of a's losses from b's */
__attribute__((unused)) static double rank_runs_worst_rel(const rank_log *a, const rank_log *b,
                                                          int from, int to) {
  return rank_runs_worst_rel_of(a->loss, b->loss, from, to);
}

/* ... of the gradient norms (before clipping) */
__attribute__((unused)) static double rank_runs_worst_norm_rel(const rank_log *a, const rank_log *b,
                                                               int from, int to) {
  return rank_runs_worst_rel_of(a->grad_norm, b->grad_norm, from, to);
}

#endif
