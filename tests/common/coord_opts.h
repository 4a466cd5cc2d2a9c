/* coord_opts.h — the coordinator options the rendezvous unit tests start
 * from: a one-slot job (tp, pp, dp 1, batch 1) over store, whose version is
 * "test"; each test changes the fields its case needs. */
#ifndef MT_TEST_COORD_OPTS_H
#define MT_TEST_COORD_OPTS_H

#include "rdzv.h"

static inline mt_coord_opts test_coord_opts(mt_store *store) {
  return (mt_coord_opts){.store = store,
                         .job_json = "{}",
                         .job_hash = "0123456789abcdef",
                         .version = "test",
                         .coordinator_name = "n0",
                         .tp = 1,
                         .pp = 1,
                         .dp_min = 1,
                         .dp_max = 1,
                         .micro_batch = 1,
                         .global_batch = 1,
                         .last_call_ms = 100,
                         .heartbeat_timeout_ms = 1000,
                         .max_restarts = 0,
                         .reform_timeout_ms = 1000};
}

#endif
