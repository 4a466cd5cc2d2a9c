/* gloo_rank_check.h — one rank of a Gloo group bootstrapped through a store
 * (store.h's contract as the comm layer uses it): it joins the group under
 * prefix, all-reduces a vector every rank fills from its rank, checks the
 * sum and passes a barrier. The store tests' ranks are threads, each with a
 * store client of its own, as daemons would have. */
#ifndef MT_GLOO_RANK_CHECK_H
#define MT_GLOO_RANK_CHECK_H

#include <stdio.h>

#include "comm.h"
#include "err.h"

/* 0, or -1 with what went wrong in err (naming the rank). */
static int gloo_rank_check(mt_store *s, const char *prefix, int rank, int size, char *err,
                           size_t cap) {
  mt_comm *c = NULL;
  mt_comm_opts o = {.store = s,
                    .name = "dp.pp0.tp0",
                    .prefix = prefix,
                    .rank = rank,
                    .size = size,
                    .timeout_ms = 30000,
                    .backend = MT_COMM_GLOO};
  float x[1031];
  for (int i = 0; i < 1031; i++) x[i] = (float)(rank + 1) * (float)(i % 7);
  if (mt_comm_create(&c, &o) || mt_comm_allreduce(c, x, x, 1031, MT_COMM_F32, MT_COMM_SUM)) {
    snprintf(err, cap, "rank %d: %s", rank, mt_errmsg());
    if (c) mt_comm_destroy(c);
    return -1;
  }
  float ranks_sum = (float)(size * (size + 1) / 2);
  for (int i = 0; i < 1031; i++)
    if (x[i] != ranks_sum * (float)(i % 7)) {
      snprintf(err, cap, "rank %d: element %d is %g, not %g", rank, i, x[i], ranks_sum * (i % 7));
      mt_comm_destroy(c);
      return -1;
    }
  int rc = mt_comm_barrier(c);
  if (rc) snprintf(err, cap, "rank %d: barrier: %s", rank, mt_errmsg());
  mt_comm_destroy(c);
  return rc ? -1 : 0;
}

#endif
