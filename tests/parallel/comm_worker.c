/* comm_worker — one rank of a group as its own process, for
 * test_comm_processes and bench_allreduce-style runs: joins the group
 * "dp.pp0.tp0" through a file store in DIR and then
 *   check  runs every collective against the serial reference (exit 0 or 1);
 *   loop   all-reduces 4 MB over and over, announcing ready/<rank> after the
 *          first; on the first failure writes the message to DIR/err.<rank>
 *          and exits 3 (4 if nothing failed within 60 s).
 *
 * usage: comm_worker DIR RANK SIZE check|loop TIMEOUT_MS
 */
#include "comm.h"
#include "comm_check.h"
#include "err.h"
#include "store.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int fail_to_file(const char *dir, int rank, const char *msg) {
  char path[4096];
  snprintf(path, sizeof path, "%s/err.%d", dir, rank);
  FILE *f = fopen(path, "w");
  if (f) fprintf(f, "%s\n", msg), fclose(f);
  fprintf(stderr, "comm_worker rank %d: %s\n", rank, msg);
  return 3;
}

static int loop(mt_comm *c, mt_store *s, const char *dir) {
  const size_t count = 1 << 20; /* 4 MB of f32 */
  float *x = malloc(count * sizeof *x);
  if (!x) return 1;
  for (size_t i = 0; i < count; i++) x[i] = 1.0f;
  time_t start = time(NULL);
  for (long it = 0; time(NULL) - start < 60; it++) {
    if (mt_comm_allreduce(c, x, x, count, MT_COMM_F32, MT_COMM_MAX)) {
      free(x);
      return fail_to_file(dir, mt_comm_rank(c), mt_errmsg());
    }
    if (it == 0) {
      char key[64];
      snprintf(key, sizeof key, "ready/%d", mt_comm_rank(c));
      mt_store_set(s, key, "1", 1);
    }
  }
  free(x);
  return 4;
}

int main(int argc, char **argv) {
  if (argc != 6) {
    fprintf(stderr, "usage: comm_worker DIR RANK SIZE check|loop TIMEOUT_MS\n");
    return 2;
  }
  const char *dir = argv[1], *mode = argv[4];
  int rank = atoi(argv[2]), size = atoi(argv[3]), timeout_ms = atoi(argv[5]);
  mt_store *s;
  if (mt_store_file_new(dir, &s)) return fprintf(stderr, "%s\n", mt_errmsg()), 1;
  mt_comm_opts o = {.store = s,
                    .name = "dp.pp0.tp0",
                    .prefix = mode,
                    .rank = rank,
                    .size = size,
                    .timeout_ms = timeout_ms,
                    .backend = MT_COMM_GLOO};
  mt_comm *c;
  if (mt_comm_create(&c, &o)) return fail_to_file(dir, rank, mt_errmsg());
  int rc = 0;
  char err[2048];
  if (!strcmp(mode, "check")) {
    if (check_collectives(c, err, sizeof err) || check_large(c, 16u << 20, err, sizeof err) ||
        check_ring(c, err, sizeof err)) {
      fprintf(stderr, "comm_worker rank %d: %s\n", rank, err);
      rc = 1;
    }
  } else {
    rc = loop(c, s, dir);
  }
  mt_comm_destroy(c);
  mt_store_free(s);
  return rc;
}
