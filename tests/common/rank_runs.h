/* rank_runs.h — a job's ranks as threads of the test, each its own mt_local
 * of one rank (rank_begin/rank_count) over a shared in-process store, so
 * every rank reports its own step stats. Shared by the layout tests that
 * compare per-rank losses, skipped steps and loss scales. Header-only (static). */
#ifndef MT_RANK_RUNS_H
#define MT_RANK_RUNS_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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

/* Runs the job (JSON text; presets from preset_dirs) with every world rank on
 * device "<kind>:<rank>"; logs[w] receives world rank w's steps. The first
 * failure aborts the others. export_path: the weights at the end, or NULL. */
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
  }
  for (int w = 0; w < world; w++) {
    if (!ranks[w]) continue;
    if (rc) mt_local_abort(ranks[w]);
    int r = mt_local_wait(ranks[w]);
    if (r) snprintf(logs[w].err, sizeof logs[w].err, "%s", mt_errmsg());
    if (!rc) rc = r;
  }
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
