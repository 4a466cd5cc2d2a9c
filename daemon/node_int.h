/* node_int.h — the node daemon's state, shared by its lifecycle (node.c),
 * its control-plane provider (node_control.c) and its election through etcd
 * (node_etcd.c). Private to mtnlgd. */
#ifndef MT_NODE_INT_H
#define MT_NODE_INT_H

#include <jansson.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <uv.h>

#include "config.h"
#include "control.h"
#include "job.h"
#include "local.h"
#include "node.h"
#include "notify.h"
#include "rdzv.h"
#include "steplog.h"
#include "store.h"
#include "store_server.h"
#include "store_wire.h"
#include "tboard.h"
#include "train.h"

extern const char *const mt_node_state_names[];

/* One point of /v1/history. */
typedef struct node_point {
  int64_t step, consumed_tokens;
  double time, loss, lr, grad_norm, step_ms, tokens_per_s, tflops, bubble, comm_ms;
  double val_loss;  /* the step's newest validation; NAN when none */
  double test_loss; /* the test pass after a completed run's last step; NAN when none */
  int global_batch; /* the step's samples; 0 when not known */
  /* train.log_num_zeros_in_grad's count; -1 when none */
  int64_t num_zeros;
} node_point;

#define NODE_HISTORY 10000

typedef enum {
  N_JOINING,  /* registered, waiting for the verdict */
  N_WAITING,  /* accepted, waiting for generation watch_gen to form */
  N_SPARE,    /* not a member of the running generation */
  N_RUNNING,  /* this node's ranks train */
  N_ENDING,   /* the ranks ended; waiting for the coordinator's word on the job */
  N_DRAINING, /* the job ended; the coordinator waits for every node to leave */
  N_EXITING,
} node_state;

static const char *const state_names[] = {"joining", "waiting",  "spare",  "running",
                                          "ending",  "draining", "exiting"};

typedef struct node {
  const mt_node_opts *o;
  const mt_node_config *cfg;
  char specs[MT_RDZV_MAX_DEVICES][16];
  int memory_logged; /* mt_log_memory, after this process's first step */
  int n_devices;
  char store_host[256];
  int store_port;
  char store_name[300]; /* the coordinator's store, for messages: "host:port" */
  int is_host;
  /* rendezvous.etcd: the coordinator is elected through etcd (coord/leader
   * under etcd_prefix); the generations' keys stay in its store */
  mt_store *etcd_root;
  int64_t lease;                /* this coordinator's lease on coord/leader; 0: none */
  char term[17];                /* the coordinator's term this node works in */
  char leader_value[320];       /* coord/leader's value for that term */
  struct mt_election *election; /* its etcd work, on a thread of its own */
  int etcd_failing;             /* etcd did not answer at the election's last round */
  int restarts_spent;           /* elected after a coordinator was lost: the budget spent */
  char restart_reason[300];     /* and why */
  int start_paused;             /* and the job was paused then */
  int start_dp_resized;         /* and the width an operator's resize had set (0: none) */
  int completed_before;         /* coord/state says the job completed (this node elected for it, or
                                 * following with no coordinator): nothing to run, exit 0 */
  char completed_said[320];     /* when, and how many steps */
  char etcd_password[256];
  char cluster_key[MT_STORE_MAX_KEY + 1]; /* rendezvous.key_file's contents (no NUL) */
  size_t cluster_key_bytes;
  const char *version;

  mt_steplog_acc steplog; /* the steps since the last printed line (the reporting rank's) */
  mt_tboard *tboard;      /* train.tensorboard_dir's writer (world rank 0's node), or NULL */
  mt_notify *notify;      /* systemd's notifications, sent by a thread of their own */

  uv_loop_t loop;
  uv_signal_t sigint, sigterm;
  uv_timer_t tick, heartbeat, watchdog;
  uv_async_t engine_done;

  mt_store_server_thread *server;
  mt_store *store; /* the loop's client: short timeouts */
  mt_coord *coord;
  mt_job job; /* the coordinator's, or this node's own copy when it has the file */
  int have_job;
  char *job_json;

  node_state state;
  int64_t seq;
  int ranks_ended;      /* the waiter saw them end (atomic): what is left is closing their comms */
  mt_node_desc desc;    /* what it joins with */
  int64_t rejoin_at_ms; /* turned away for now: join again then, silent until */
  int turned_away;      /* times in a row */
  int gen;              /* watched or running */
  int64_t store_failing_since_ms;
  char coord_instance[17]; /* the coordinator's coord/instance this node works under ("": not
                              read yet) */
  uint64_t coord_connects; /* the store client's connections when it was last read */
  int store_failed;        /* a store call failed since it was last read */
  int coord_lost;          /* the coordinator is gone (unreachable or restarted): nothing more
                              is written to the store (under mu: rank threads read it) */
  int64_t order_seq;
  int signals;
  int exit_code;
  char end_reason[512];
  int end_seen, end_final, end_ok, end_job_failed;
  int store_unreachable; /* the rendezvous never answered within join_timeout_s */
  int report_pending;    /* this node's report on the generation is not written yet */
  int report_kind;
  char report_reason[1200];
  /* world rank 0's node: where orders acted, not yet taken by the store
   * (a rank thread adds, the loop sends again each round; under mu) */
  struct node_acted {
    int gen, ok;
    int64_t seq, step;
    char reason[256];
  } acted[8];
  int n_acted;

  /* the running generation */
  mt_assignment asg;
  mt_job run_job;
  mt_store *engine_store;
  mt_local *local;
  mt_local_opts lo;
  const char *dev_ptrs[MT_RDZV_MAX_DEVICES];
  char comm_prefix[64];
  pthread_t waiter;
  int engine_running;
  int engine_rc;
  char engine_err[1024];
  volatile sig_atomic_t stop_flag;

  volatile int64_t order_word; /* world rank 0's node: the latest order, for the engine */
  int holds_rank0;
  int64_t aborted_ms;      /* when the generation's end aborted the ranks */
  int quiet;               /* the cluster re-forms while those ranks stop: no heartbeats */
  int said_slow;           /* their slow stop was logged */
  int was_silent;          /* its ranks ran while this node was silent past the timeout */
  int64_t last_hb_ms;      /* the previous heartbeat round, to notice this node was silent */
  int64_t drain_until_ms;  /* a follower that is done answers until then */
  int abandoned;           /* the ranks did not stop: exit without them */
  int have_run_job;        /* run_job and asg describe the generation (member or spare) */
  int ran;                 /* this node's ranks ran in some generation of the job */
  int last_gen;            /* the generation of the newest step in the history */
  char ckpt_job_dir[1200]; /* where this job's checkpoints live, or "" */
  int ckpt_writing;
  int64_t ckpt_step;
  uint64_t ckpt_bytes;
  double ckpt_seconds;
  int ckpt_failed;       /* the newest save (ckpt_step) failed: ckpt_error says why */
  int64_t ckpt_failures; /* saves that failed since the daemon started */
  char ckpt_error[512];
  int paused; /* orders as they took effect here */
  /* a validation or test pass this node's ranks are in (under mu) */
  int evaluating;
  mt_eval_progress eval;
  int64_t eval_started_ms; /* monotonic */
  int64_t eval_told_ms;    /* the pass's last STATUS= and (world rank 0's node) store write */
  double eval_batch_ms;    /* a pass's time per batch as last seen, for the ETA; 0: none */
  mt_evallog evallog;      /* its progress lines in the log (the engine's thread) */

  pthread_mutex_t mu; /* guards last, the history ring, cluster and the caches below */
  mt_step_stats last;
  int have_last;
  int64_t resumed_step;      /* of this generation's ranks; -1: they did not resume */
  int64_t stopped_step;      /* the step they agreed to stop after; -1: none (yet) */
  int stopped_why;           /* ... and why (MT_STOPPED_*) */
  char stop_unsaved[256];    /* why the stop's checkpoint failed (its steps are lost), or "" */
  int64_t stop_saved;        /* ... the newest checkpoint then; -1: none */
  double exit_at;            /* train.exit_duration_mins' deadline as of the last step
                                (mt_step_stats.exit_at), unix seconds; 0: none */
  node_point *history;       /* ring of NODE_HISTORY */
  int64_t history_n;         /* points ever added, less those a resume took back */
  int64_t history_first;     /* the oldest point still in the ring */
  json_t *cluster;           /* the coordinator's cluster/status (want_cluster_status) */
  int64_t viewed_ms;         /* when an HTTP read last used the cluster's status (atomic) */
  int cluster_skips;         /* heartbeats since the loop last fetched it */
  int64_t cluster_ms;        /* when it was fetched (mu) */
  int cluster_wanted;        /* an HTTP read waits for a fresher one (mu) */
  pthread_cond_t cluster_cv; /* signalled with mu when it is fetched */
  json_t *extra_ops;         /* ops this node submitted, until cluster/status lists them */
  double peak_flops;         /* sgemm rate measured at start-up per device (MFU), 0 unknown */
  int64_t last_hb_status_ms;

  struct node_ckpt_scan *ckpt_scan; /* the status's newest checkpoint (node_control.c) */
  json_t *status_cache;             /* the last /v1/status, shared read-only (node_control.c) */
  int64_t status_cache_ms;
  pthread_mutex_t status_cache_mu; /* one rebuild at a time (HTTP threads) */
  int64_t params;                  /* the job's parameter count, for params_job_hash */
  char params_job_hash[17];
  mt_control *control;
  char control_url[300];
  char *tls_cert, *tls_key;             /* control.tls_cert and _key, PEM; NULL: plain HTTP */
  char token[MT_CONTROL_TOKEN_MAX + 2]; /* one more: a longer file is refused */
} node;

/* node_control.c: the control plane of this node. */
int node_control_start(node *n);
void node_control_stop(node *n);
/* Appends a step (from on_step, or polled for a non-member). */
void node_history_add(node *n, const mt_step_stats *st);
/* train.timing_log_level's timers of st as {"name": [min, max]} (ms), every
 * timer of its level that some rank ran; null when it has none. And back,
 * from that object (and the level beside it) as the store carries them. */
json_t *node_timers_json(const mt_step_stats *st);
void node_timers_from_json(mt_step_stats *st, int level, const json_t *timers);
/* A pass under way as the status's evaluation object (elapsed_s since it
 * began), and back (0, or -1 when ev is not one), as the store carries it
 * to the nodes without ranks. */
json_t *node_eval_json(const mt_eval_progress *p, double elapsed_s);
int node_eval_from_json(const json_t *ev, mt_eval_progress *p, double *elapsed_s);
/* The loop's round of status work: publish this node's status, fetch the
 * coordinator's cluster view, follow the steps when not a member. */
void node_control_round(node *n, int heartbeat);
/* A member's report of a run that trained its train.steps begins so: the
 * generation's end says it, and through etcd the job is closed on it */
#define NODE_COMPLETED "completed "

/* node.c: the coordinator this node works under is gone (why: for the log
 * and the exit); the generation ends and the node exits 1. */
void node_coordinator_lost(node *n, const char *why);

/* node_etcd.c: a coordinator elected through etcd (rendezvous.etcd).
 * Elects (campaigns with the job, else follows) and fills in the store's
 * endpoint and is_host; 0, or an error (completed_before set when the job
 * completed: an end, not a failure). */
int node_etcd_elect(node *n);
/* The election's thread, once this node coordinates or follows. */
int node_etcd_start_election(node *n);
/* The loop's look at what the election's thread found: 1 when the
 * coordinator is lost (node_coordinator_lost called). */
int node_etcd_check_term(node *n);
/* The coordinator's coord/state (restarts, paused, the resized width)
 * handed to the thread. */
void node_etcd_publish_state(node *n);
/* The job ended under this coordinator: closed in etcd if it completed,
 * its state deleted otherwise. */
void node_etcd_close_job(node *n);
/* coord/leader still the value this node read? 1 yes (or etcd cannot
 * say), 0 when another leads or none does. */
int node_etcd_leader_stays(node *n);

/* The coordinator's lease on coord/leader through etcd: the heartbeat
 * timeout, rounded up to etcd's whole seconds. */
static inline int node_lease_ttl_s(const mt_node_config *c) {
  return (c->heartbeat_timeout_ms + 999) / 1000;
}

#endif
