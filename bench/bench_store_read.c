/* bench_store_read.c — reading every node's heartbeat key through the TCP
 * store: a GET each (the coordinator before) beside one batched read
 * (mt_store_get_many: the GETs pipelined on the connection), in the same
 * invocation, against a store server on a thread of this process.
 *
 * usage: bench_store_read [NODES...]   (default 16 64 560)
 * Prints one line of figures per node count; never fails on time. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "err.h"
#include "store.h"
#include "store_client.h"
#include "store_server.h"

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

#define REPEATS 21

int main(int argc, char **argv) {
  int sizes[16], n_sizes = 0;
  for (int i = 1; i < argc && n_sizes < 16; i++) sizes[n_sizes++] = atoi(argv[i]);
  if (!n_sizes) sizes[0] = 16, sizes[1] = 64, sizes[2] = 560, n_sizes = 3;
  mt_store_server_thread *t;
  mt_store *s = NULL;
  if (mt_store_server_run_thread("127.0.0.1", 0, NULL, &t) ||
      mt_store_tcp_new("127.0.0.1", mt_store_server_thread_port(t), NULL, &s)) {
    fprintf(stderr, "bench_store_read: %s\n", mt_errmsg());
    return 1;
  }
  int rc = 0;
  for (int z = 0; z < n_sizes && !rc; z++) {
    int n = sizes[z];
    char(*names)[32] = malloc((size_t)n * sizeof *names);
    const char **keys = malloc((size_t)n * sizeof *keys);
    void **vals = malloc((size_t)n * sizeof *vals);
    if (!names || !keys || !vals) return 1;
    for (int i = 0; i < n && !rc; i++) {
      snprintf(names[i], sizeof names[i], "hb/node%04d", i);
      keys[i] = names[i];
      rc = mt_store_add(s, keys[i], 1 + i, NULL);
    }
    double one[REPEATS], many[REPEATS];
    for (int r = 0; r < REPEATS && !rc; r++) {
      double t0 = now_s();
      for (int i = 0; i < n && !rc; i++) {
        void *v = NULL;
        rc = mt_store_get(s, keys[i], &v, NULL, 0);
        free(v);
      }
      double t1 = now_s();
      if (!rc) rc = mt_store_get_many(s, keys, (size_t)n, vals, NULL);
      double t2 = now_s();
      for (int i = 0; i < n && !rc; i++) free(vals[i]);
      one[r] = t1 - t0, many[r] = t2 - t1;
    }
    if (rc) break;
    qsort(one, REPEATS, sizeof *one, cmp_double);
    qsort(many, REPEATS, sizeof *many, cmp_double);
    double a = one[REPEATS / 2], b = many[REPEATS / 2];
    printf("%4d heartbeat keys: a GET each %.2f ms, batched %.2f ms (%.1fx faster); median of %d\n",
           n, a * 1e3, b * 1e3, a / b, REPEATS);
    free(names), free(keys), free(vals);
  }
  if (rc) fprintf(stderr, "bench_store_read: %s\n", mt_errmsg());
  mt_store_free(s);
  mt_store_server_thread_stop(t);
  return rc ? 1 : 0;
}
