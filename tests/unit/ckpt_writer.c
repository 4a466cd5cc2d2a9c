/* ckpt_writer.c — test_ckpt_crash's victim: resumes from the job's latest
 * checkpoint and writes COUNT more (two shards, two dp writer threads each,
 * ckpt_testdata.h values), pruning to the last 3, until it is killed.
 *
 *   ckpt_writer JOB_DIR COUNT FLOATS_PER_ARRAY
 */
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#include "ckpt.h"
#include "ckpt_testdata.h"
#include "err.h"
#include "log.h"

typedef struct slice {
  const mt_ckpt_txn *t;
  const mt_ckpt_shard_desc *d;
  uint64_t lo, n;
  mt_ckpt_chunks chunks;
  int rc;
} slice;

static void *write_slice(void *p) {
  slice *s = p;
  float *v[3];
  const float *src[3];
  for (int a = 0; a < 3; a++)
    src[a] = v[a] = ckpt_test_slice(s->t->step, s->d->tp, s->d->pp, a, s->lo, s->n);
  s->rc = mt_ckpt_shard_write(s->t, s->d, s->lo, s->n, src, 1u << 20, &s->chunks);
  if (s->rc) fprintf(stderr, "ckpt_writer: %s\n", mt_errmsg());
  for (int a = 0; a < 3; a++) free(v[a]);
  return NULL;
}

/* One checkpoint as two dp ranks per shard would write it. */
static int write_one(const char *job, int64_t step, uint64_t n) {
  mt_ckpt_shard_desc d[2] = {{0, 0, n, 3, ckpt_test_arrays}, {1, 0, n, 3, ckpt_test_arrays}};
  mt_ckpt_txn t;
  mt_ckpt_chunks all = {0};
  int rc = mt_ckpt_begin(&t, job, step);
  for (int s = 0; s < 2 && !rc; s++) {
    rc = mt_ckpt_shard_create(&t, &d[s], &all);
    slice w[2] = {{&t, &d[s], 0, n / 3, {0}, 0}, {&t, &d[s], n / 3, n - n / 3, {0}, 0}};
    pthread_t th[2];
    for (int r = 0; r < 2 && !rc; r++) pthread_create(&th[r], NULL, write_slice, &w[r]);
    for (int r = 0; r < 2 && !rc; r++) pthread_join(th[r], NULL);
    for (int r = 0; r < 2 && !rc; r++) {
      rc = w[r].rc ? w[r].rc : mt_ckpt_chunks_add(&all, w[r].chunks.v, w[r].chunks.n);
      mt_ckpt_chunks_free(&w[r].chunks);
    }
    if (!rc) rc = mt_ckpt_shard_commit(&t, &d[s]);
  }
  mt_ckpt_meta m = {.job = "crash",
                    .job_hash = "00000000deadbeef",
                    .step = step,
                    .consumed_samples = step * 8,
                    .seed = 7,
                    .tp = 2,
                    .pp = 1,
                    .dp = 2};
  if (!rc) rc = mt_ckpt_commit(&t, &m, d, 2, &all);
  mt_ckpt_chunks_free(&all);
  if (rc) {
    fprintf(stderr, "ckpt_writer: step %" PRId64 ": %s\n", step, mt_errmsg());
    mt_ckpt_abort(&t);
  }
  return rc;
}

int main(int argc, char **argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: ckpt_writer JOB_DIR COUNT FLOATS_PER_ARRAY\n");
    return 2;
  }
  mt_log_set_level(MT_LOG_WARN);
  const char *job = argv[1];
  long count = atol(argv[2]);
  uint64_t n = strtoull(argv[3], NULL, 10);
  mt_ckpt c;
  int64_t step = 1;
  int rc = mt_ckpt_find(job, -1, MT_CKPT_VERIFY_SIZES, &c);
  if (rc == 0) {
    step = c.step + 1;
    mt_ckpt_close(&c);
  } else if (rc != MT_ENOENT) {
    fprintf(stderr, "ckpt_writer: %s\n", mt_errmsg());
    return 1;
  }
  for (long i = 0; i < count; i++, step++) {
    if (write_one(job, step, n)) return 1;
    if (mt_ckpt_prune(job, 3, 0, NULL)) {
      fprintf(stderr, "ckpt_writer: %s\n", mt_errmsg());
      return 1;
    }
  }
  return 0;
}
