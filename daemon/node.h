/* node.h — the node daemon: one mtnlgd per node, under systemd.
 *
 * The main thread runs a libuv loop: signals, the heartbeat, the
 * coordinator's rounds (on the node hosting the store), the node's own
 * progress through a generation (join, wait, run, end), sd_notify. The
 * engine runs on device threads (engine/local.h); the store server on its
 * own thread. The loop never waits on anything slower than one store round
 * trip. Exit codes: 0 the job finished or was stopped, 1 it failed (a lost
 * node, a failing rank, the coordinator gone), 2 this node cannot take part
 * (bad config or job, refused by the coordinator).
 */
#ifndef MT_NODE_H
#define MT_NODE_H

#include "config.h"

typedef struct mt_node_opts {
  const mt_node_config *config;
  const char *const *job_overrides; /* --job-set: applied to the job file */
  const char *config_path;          /* for messages */
  int *abandoned; /* set when ranks were left blocked: the caller must _exit, not return */
} mt_node_opts;

/* Runs the daemon until the job ends or a signal stops it; returns the exit code. */
int mt_node_main(const mt_node_opts *o);

#endif
