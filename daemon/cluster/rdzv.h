/* rdzv.h — membership and generations over the rendezvous store.
 *
 * Nodes join with a descriptor; the coordinator (the node hosting the store)
 * accepts or refuses each (another version, another job, too few devices, a
 * name taken), forms generation g once pp * dp_min model slots have joined and
 * a last call for more (up to dp_max) has passed, assigns world ranks in a
 * stable order (node name), and publishes under gen/<g>/: the job, its hash and
 * the assignment. Nodes beyond dp_max wait as spares. Every node heartbeats;
 * the coordinator declares a node silent past the timeout lost and ends the
 * generation with the reason. A lost member (or a member whose ranks failed
 * on a peer, not on the job) ends its generation without ending the job: the
 * next one forms from the nodes left and the spares, and its ranks resume
 * from the newest committed checkpoint, up to max_restarts times; when too
 * few nodes are left, the coordinator waits reform_timeout_ms for more to
 * join, then ends the job. A lost node whose heartbeat moves again was only
 * slow: it is taken back as a spare, for the next generation formed to place.
 * Every key a generation uses carries its number, so nothing of an old
 * generation is read by a new one. The keys are listed in proto/store-v1.md,
 * "Rendezvous keys".
 *
 * Nothing here blocks for long: the node's event loop polls with these
 * functions (store calls with no wait), so a dead coordinator costs one
 * request timeout, never a hang. Nothing here exits.
 */
#ifndef MT_RDZV_H
#define MT_RDZV_H

#include <jansson.h>
#include <stdint.h>

#include "store.h"

#define MT_RDZV_NAME_MAX 64
#define MT_RDZV_MAX_DEVICES 64
/* 16 hex digits the hosting daemon draws at each start and writes first: a
 * node whose client reconnected reads it to tell a restarted coordinator
 * (a new, empty store) from a blip */
#define MT_RDZV_COORD_INSTANCE_KEY "coord/instance"
/* The newest generation whose gen/<g>/ keys the coordinator deleted (text):
 * those generations ended, and were not final. */
#define MT_RDZV_PRUNED_KEY "cluster/pruned_gen"

/* What a node tells the coordinator when it joins. */
typedef struct mt_node_desc {
  char name[MT_RDZV_NAME_MAX];
  char host[256];
  int n_devices;
  char devices[MT_RDZV_MAX_DEVICES][16]; /* "cpu:0", "cuda:3" */
  char version[32];
  char job_hash[17];     /* "" when this node has no job file of its own */
  char control_url[300]; /* where its control plane listens, or "" */
  int pid;
  char instance[17]; /* 16 random hex digits drawn at each start: tells a restarted daemon
                        from its predecessor where pids repeat (a container's pid 1) */
} mt_node_desc;

typedef struct mt_member {
  char name[MT_RDZV_NAME_MAX];
  int rank_begin, rank_end; /* world ranks [begin, end), tp * slots of them */
} mt_member;

/* gen/<g>/assignment. */
typedef struct mt_assignment {
  int gen;
  int tp, pp, dp, world;
  char job_hash[17];
  char coordinator[MT_RDZV_NAME_MAX];
  int restart;    /* formed after a failure: which restart of the job (1, 2, …), else 0 */
  int dp_resized; /* the width an operator's resize set, which the coordinator's own
                     formings keep (mt_coord_opts.dp_resized); 0: none */
  int n_members, n_spares;
  mt_member *members; /* in rank order */
  char (*spares)[MT_RDZV_NAME_MAX];
} mt_assignment;

void mt_assignment_free(mt_assignment *a);
/* The member entry of name, or NULL (a spare). */
const mt_member *mt_assignment_find(const mt_assignment *a, const char *name);

/* ---- every node ---- */

/* Registers d: *seq is its join number (nodes/<seq>). With *seq > 0 on
 * entry (a join numbered whose write failed: no reply in time) it writes
 * nodes/<*seq> again, the same entry, rather than numbering another; *seq
 * is set as soon as the number is drawn, so a caller that tries again after
 * a failure passes it back. 0 for a fresh join. */
int mt_rdzv_join(mt_store *s, const mt_node_desc *d, int64_t *seq);
/* The coordinator's verdict on join seq: 1 accepted (*watch_gen: the
 * generation to wait for or watch), 0 not yet, MT_EINVAL refused (mt_errmsg()
 * is the coordinator's reason), 2 turned away for now (mt_errmsg() says why:
 * the entry of a daemon this one replaces on its host is still counted; join
 * again, without heartbeating, once the coordinator's heartbeat timeout,
 * which *watch_gen then holds in ms, passed), < 0 store failure. */
int mt_rdzv_verdict(mt_store *s, int64_t seq, int *watch_gen);
/* gen/<g>/assignment and gen/<g>/job when published: 1 and filled in (*job_json
 * malloc'd), 0 not yet, < 0 failure. */
int mt_rdzv_assignment(mt_store *s, int gen, mt_assignment *a, char **job_json);
/* Bumps hb/<name>. */
int mt_rdzv_heartbeat(mt_store *s, const char *name);
/* gen/<g>/end: 1 when the generation ended (*final: no generation follows, *ok:
 * the job ended well, *job_failed (may be NULL): it failed on its own, so
 * running it again would fail the same way; reason filled in), 0 while it
 * runs, < 0 failure. A generation the coordinator pruned (MT_RDZV_PRUNED_KEY)
 * reads as ended, not final and not ok. */
int mt_rdzv_ended(mt_store *s, int gen, int *final, int *ok, int *job_failed, char *reason,
                  int reason_size);
/* How a member's part of a generation ended. */
enum {
  MT_REPORT_DONE = 0,   /* its ranks ran to the end or to an agreed stop */
  MT_REPORT_FAILED = 1, /* on the job itself (it cannot run): restarting would not help */
  MT_REPORT_PEER = 2,   /* on a peer or the network (a collective failed, timed out or was
                           aborted): a new generation may succeed */
};
/* A member reports how its part ended (MT_REPORT_*), with the reason
 * ("completed 20 steps", the error). */
int mt_rdzv_report(mt_store *s, int gen, const char *name, int how, const char *reason);
/* The coordinator's latest order for generation g (gen/<g>/order): 1 and
 * *seq, kind ("stop", "pause", …) when there is one, 0 when none. */
int mt_rdzv_order(mt_store *s, int gen, int64_t *seq, char *kind, int kind_size);
/* This node leaves (a spare, or any node once the job ended): nodes/<name>/left. */
int mt_rdzv_leave(mt_store *s, const char *name);
/* A member was told to stop by a signal (SIGTERM, SIGINT) in generation gen:
 * gen/<g>/stop_signal holds its name. The stop rides the step's all-reduce;
 * this tells the coordinator, so that a generation that fails meanwhile
 * (a node lost) ends the job as a stop would, not re-forms. */
int mt_rdzv_stop_signalled(mt_store *s, int gen, const char *name);

/* ---- operations and status (the control plane's cluster side) ---- */

/* The longest Idempotency-Key a request may carry (1 to this many printable
 * ASCII characters), and how many keys the coordinator remembers: the
 * newest, the oldest forgotten first, for its own process's life (a
 * restarted coordinator starts with none). A retry comes within seconds or
 * minutes of the request it repeats; refusals take a slot too (a retried
 * 409 must stay a 409), so a script retrying a refused order every minute
 * fills the ring in ~17 h. One ring all the same, at most ~2 MB: a
 * separate one for refusals would forget a refusal sooner, and a retried
 * refusal that became an order is what the key is there to prevent. */
#define MT_RDZV_IDEM_KEY_MAX 255
#define MT_RDZV_IDEM_KEYS 1024

/* Hands a mutation (kind "pause", "resume", "stop", "checkpoint", "resize";
 * args {} or {"dp": N}) to the coordinator through the store and waits up to
 * timeout_ms for its answer: *http_status 202 with *op (new reference), or
 * an error status with detail. < 0 when the store failed or no answer came.
 * key: the request's Idempotency-Key, or NULL. A key the coordinator
 * answered before is answered again as it was then (the same operation,
 * as it stands now or, once the coordinator's table dropped it, as it
 * ended; or the same refusal) and orders nothing, *replayed (may be NULL)
 * set to 1; the same key with another kind or args is
 * refused, 422. Whichever node the retry reaches: the key travels with the
 * request (ops/req/<n>, "idempotency_key"). */
int mt_rdzv_submit_op(mt_store *s, const char *kind, json_t *args, const char *key, int timeout_ms,
                      int *http_status, json_t **op, int *replayed, char *detail, int detail_size);
/* World rank 0's node: order seq took effect after step (ok), or failed there
 * (a checkpoint that could not be written: reason). */
int mt_rdzv_acted(mt_store *s, int gen, int64_t seq, int64_t step, int ok, const char *reason);
/* What a node tells about itself (state, memory, step), under node/<name>/status. */
int mt_rdzv_publish_node_status(mt_store *s, const char *name, json_t *status);
/* The coordinator's view (cluster/status): generation, state, reason, nodes,
 * operations. A new reference, or NULL with *rc 0 (not yet) or < 0. */
json_t *mt_rdzv_cluster_status(mt_store *s, int *rc);

/* ---- the coordinator ---- */

typedef struct mt_coord mt_coord;

/* Order kinds as the coordinator names them in gen/<g>/order (the engine's
 * order word uses the same numbers, train.h). */
enum {
  MT_ORDER_KIND_PAUSE = 1,
  MT_ORDER_KIND_RESUME = 2,
  MT_ORDER_KIND_STOP = 3,
  MT_ORDER_KIND_CHECKPOINT = 4,
  MT_ORDER_KIND_RESIZE = 5
};
/* The kind named ("pause", "resume", "stop", "checkpoint", "resize"), or 0. */
int mt_order_kind_code(const char *name);

typedef struct mt_coord_opts {
  mt_store *store;
  const char *job_json; /* the resolved job (mt_job_to_json) */
  const char *job_hash;
  const char *version;
  const char *coordinator_name; /* this node's name */
  int tp, pp, dp_min, dp_max, micro_batch, global_batch;
  int batch_quantum; /* divides every global batch the job runs (mt_job_batch_quantum: under a
                        ramp-up less than global_batch); micro_batch * dp must divide it. 0:
                        global_batch */
  int interleaved;   /* parallel.virtual_stages > 1: micro_batch * dp * pp must divide it (the
                        interleaved schedule takes micro-batches pp at a time) */
  int last_call_ms;
  int heartbeat_timeout_ms;
  int has_checkpoint_dir; /* checkpoint and resize orders need somewhere to save */
  int max_restarts;       /* generations re-formed after failures, at most */
  int reform_timeout_ms;  /* after a failure, how long to wait for enough nodes */
  /* A coordinator elected after another was lost (rendezvous.etcd): the
   * restarts spent so far, the predecessor's loss counted among them, and
   * what it was. Past max_restarts the job ends failed at the first tick, as
   * a failure with the budget spent does. 0/NULL: none. */
  int restarts_spent;
  const char *restart_reason;
  int paused; /* the job was paused under the predecessor: its first generation starts paused */
  /* The width the operator's last resize set (under the predecessor):
   * the generations the coordinator forms by itself (at its start, after
   * a failure) take it in place of dp_max, and of dp_min where it is
   * below, until the next resize; a resize holds as a pause does. 0:
   * none, the job's bounds. */
  int dp_resized;
} mt_coord_opts;

int mt_coord_new(const mt_coord_opts *o, mt_coord **out);
void mt_coord_free(mt_coord *c);
/* One round of the coordinator's work at time now_ms (monotonic): new joins,
 * heartbeats, forming, reports, the end. Call every ~100 ms from the loop.
 * < 0 only when the store failed. */
int mt_coord_tick(mt_coord *c, int64_t now_ms);
/* Publishes an order for the running generation (stop, pause, resume, …).
 * MT_EINVAL when no generation runs. */
int mt_coord_order(mt_coord *c, const char *kind);
/* Ends the job without a generation (the coordinator stops while none runs,
 * or gives up): a final gen/<g>/end every waiting node sees. */
int mt_coord_finish(mt_coord *c, int ok, const char *reason);
/* The restarts spent in this job so far (its predecessors' included). */
int mt_coord_restarts(const mt_coord *c);
/* 1 while the job is paused (a pause acted on, no resume since). */
int mt_coord_paused(const mt_coord *c);
/* The width the last resize that formed set (0: none): see
 * mt_coord_opts.dp_resized. */
int mt_coord_dp_resized(const mt_coord *c);
/* 1 once the job ended and every node still alive has left (or timeout_ms
 * passed since the end), and, after a stop operation, 2 s have passed for
 * its pollers: the store may go. */
int mt_coord_drained(mt_coord *c, int64_t now_ms, int timeout_ms);

/* A snapshot for status: the generation, its state and the nodes. */
typedef struct mt_coord_node_info {
  char name[MT_RDZV_NAME_MAX];
  char host[256];
  char control_url[300];
  const char *role; /* "member", "spare", "lost", "left" */
  int rank_begin, rank_end, n_devices;
  double heartbeat_age_s;
} mt_coord_node_info;

/* Copies up to max nodes; returns how many there are. *gen, *state ("forming",
 * "running", "ended"). */
int mt_coord_snapshot(mt_coord *c, int64_t now_ms, int *gen, const char **state,
                      mt_coord_node_info *nodes, int max);

#endif
