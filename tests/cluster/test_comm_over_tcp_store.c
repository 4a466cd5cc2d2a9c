/* test_comm_over_tcp_store — the comm layer bootstraps through the TCP store
 * as it does through the in-process one: 4 ranks (threads, each with a store
 * client of its own, as daemons would have) join a Gloo group under a
 * generation-scoped prefix, all-reduce and pass a barrier; a second group of
 * the next generation forms on the same store. */
#include "comm.h"
#include "err.h"
#include "store_client.h"
#include "store_server.h"

#include "gloo_rank_check.h"

#include <pthread.h>
#include <stdio.h>
#include <string.h>

#define RANKS 4

static int port;

typedef struct rank_job {
  int rank, gen;
  char err[1024];
} rank_job;

static void *run_rank(void *p) {
  rank_job *j = p;
  mt_store *s = NULL;
  char prefix[64];
  snprintf(prefix, sizeof prefix, "gen/%d/comm/dp.pp0.tp0", j->gen);
  if (mt_store_tcp_new("127.0.0.1", port, NULL, &s))
    snprintf(j->err, sizeof j->err, "rank %d: %s", j->rank, mt_errmsg());
  else
    gloo_rank_check(s, prefix, j->rank, RANKS, j->err, sizeof j->err);
  mt_store_free(s);
  return NULL;
}

int main(void) {
  mt_store_server_thread *t;
  if (mt_store_server_run_thread("127.0.0.1", 0, NULL, &t)) {
    fprintf(stderr, "%s\n", mt_errmsg());
    return 1;
  }
  port = mt_store_server_thread_port(t);
  int failures = 0;
  for (int gen = 0; gen < 2; gen++) {
    rank_job jobs[RANKS];
    pthread_t th[RANKS];
    for (int r = 0; r < RANKS; r++) {
      jobs[r] = (rank_job){.rank = r, .gen = gen};
      pthread_create(&th[r], NULL, run_rank, &jobs[r]);
    }
    for (int r = 0; r < RANKS; r++) {
      pthread_join(th[r], NULL);
      if (jobs[r].err[0]) {
        fprintf(stderr, "FAIL: generation %d: %s\n", gen, jobs[r].err);
        failures++;
      }
    }
  }
  mt_store_server_thread_stop(t);
  return failures ? 1 : 0;
}
