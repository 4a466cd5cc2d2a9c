/* rdzv.c — joins, verdicts, generations, heartbeats and the end of a job. */
#include "rdzv.h"

#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "err.h"
#include "log.h"
#include "monotime.h"

/* ---- small store helpers ---- */

/* The value of key when it exists: 1 (*out malloc'd, NUL-terminated), 0 when
 * absent, < 0 when the store failed. Never waits for the key. */
static int get_now(mt_store *s, const char *key, char **out) {
  *out = NULL;
  int rc = mt_store_check(s, key);
  if (rc <= 0) return rc;
  void *v;
  size_t n;
  rc = mt_store_get(s, key, &v, &n, 1000);
  if (rc == MT_ENOENT) return 0;
  if (rc) return rc;
  *out = v;
  return 1;
}

static int set_json(mt_store *s, const char *key, json_t *j) {
  char *text = j ? json_dumps(j, JSON_COMPACT) : NULL;
  json_decref(j);
  if (!text) return mt_seterr(MT_ENOMEM, "rdzv: cannot encode %s", key);
  int rc = mt_store_set(s, key, text, strlen(text));
  free(text);
  return rc;
}

/* How long a numbered join or request may stay unwritten (its node died
 * between numbering and writing it, or lost the numbering's reply and took
 * another number) before the coordinator passes over it. */
#define UNWRITTEN_GAP_MS 30000

/* Numbered joins or requests not written yet, read again each tick while the
 * ones after them are taken, so a gap holds nothing up: a request is
 * answered only once taken, so one that depends on another was numbered
 * after that one was written, and taking them out of number order reorders
 * only requests that raced. Bounded: with MAX_UNWRITTEN of them, reading
 * waits at the next one. */
#define MAX_UNWRITTEN 64
typedef struct unwritten {
  int count;
  int64_t n[MAX_UNWRITTEN], since_ms[MAX_UNWRITTEN];
} unwritten;

static json_t *get_json_now(mt_store *s, const char *key, int *rc) {
  char *text;
  *rc = get_now(s, key, &text);
  if (*rc <= 0) return NULL;
  json_error_t e;
  json_t *j = json_loads(text, 0, &e);
  free(text);
  if (!j) *rc = mt_seterr(MT_ECORRUPT, "rdzv: %s: bad JSON: %s", key, e.text);
  return j;
}

static void copy_str(char *dst, size_t size, json_t *obj, const char *key) {
  const char *v = json_string_value(json_object_get(obj, key));
  snprintf(dst, size, "%s", v ? v : "");
}

/* ---- descriptors and assignments ---- */

static json_t *desc_to_json(const mt_node_desc *d) {
  json_t *devs = json_array();
  for (int i = 0; i < d->n_devices; i++) json_array_append_new(devs, json_string(d->devices[i]));
  return json_pack("{s:s, s:s, s:o, s:s, s:s, s:s, s:i, s:s}", "name", d->name, "host", d->host,
                   "devices", devs, "version", d->version, "job_hash", d->job_hash, "control_url",
                   d->control_url, "pid", d->pid, "instance", d->instance);
}

static int desc_from_json(json_t *j, mt_node_desc *d) {
  memset(d, 0, sizeof *d);
  copy_str(d->name, sizeof d->name, j, "name");
  copy_str(d->host, sizeof d->host, j, "host");
  copy_str(d->version, sizeof d->version, j, "version");
  copy_str(d->job_hash, sizeof d->job_hash, j, "job_hash");
  copy_str(d->control_url, sizeof d->control_url, j, "control_url");
  d->pid = (int)json_integer_value(json_object_get(j, "pid"));
  copy_str(d->instance, sizeof d->instance, j, "instance");
  json_t *devs = json_object_get(j, "devices");
  size_t i;
  json_t *v;
  json_array_foreach(devs, i, v) {
    if (d->n_devices == MT_RDZV_MAX_DEVICES) break;
    snprintf(d->devices[d->n_devices++], 16, "%s",
             json_string_value(v) ? json_string_value(v) : "");
  }
  return d->name[0] ? 0 : MT_EINVAL;
}

void mt_assignment_free(mt_assignment *a) {
  if (!a) return;
  free(a->members);
  free(a->spares);
  memset(a, 0, sizeof *a);
}

const mt_member *mt_assignment_find(const mt_assignment *a, const char *name) {
  for (int i = 0; i < a->n_members; i++)
    if (!strcmp(a->members[i].name, name)) return &a->members[i];
  return NULL;
}

static json_t *assignment_to_json(const mt_assignment *a) {
  json_t *members = json_array(), *spares = json_array();
  for (int i = 0; i < a->n_members; i++)
    json_array_append_new(members,
                          json_pack("{s:s, s:i, s:i}", "name", a->members[i].name, "rank_begin",
                                    a->members[i].rank_begin, "rank_end", a->members[i].rank_end));
  for (int i = 0; i < a->n_spares; i++) json_array_append_new(spares, json_string(a->spares[i]));
  json_t *j =
      json_pack("{s:i, s:i, s:i, s:i, s:i, s:s, s:s, s:i, s:o, s:o}", "gen", a->gen, "tp", a->tp,
                "pp", a->pp, "dp", a->dp, "world", a->world, "job_hash", a->job_hash, "coordinator",
                a->coordinator, "restart", a->restart, "members", members, "spares", spares);
  if (j && a->dp_resized) json_object_set_new(j, "dp_resized", json_integer(a->dp_resized));
  return j;
}

/* An integer field of a store value within [lo, hi], else -1 (lo >= 0):
 * what another process wrote is checked before it sizes or indexes anything. */
static long long int_in(json_t *j, const char *key, long long lo, long long hi) {
  json_t *v = json_object_get(j, key);
  if (!json_is_integer(v)) return -1;
  long long x = json_integer_value(v);
  return x >= lo && x <= hi ? x : -1;
}

/* The most ranks, and of each of tp, pp and dp, an assignment may name
 * (the job's own bounds are far below). */
#define ASSIGNMENT_MAX_WORLD (1 << 24)
#define ASSIGNMENT_MAX_DIM (1 << 16)

static int assignment_from_json(json_t *j, mt_assignment *a) {
  memset(a, 0, sizeof *a);
  long long gen = int_in(j, "gen", 1, INT_MAX), tp = int_in(j, "tp", 1, ASSIGNMENT_MAX_DIM),
            pp = int_in(j, "pp", 1, ASSIGNMENT_MAX_DIM),
            dp = int_in(j, "dp", 1, ASSIGNMENT_MAX_DIM),
            world = int_in(j, "world", 1, ASSIGNMENT_MAX_WORLD),
            restart = int_in(j, "restart", 0, INT_MAX);
  if (gen < 0 || tp < 0 || pp < 0 || dp < 0 || world < 0 || restart < 0 || world != tp * pp * dp)
    return mt_seterr(MT_ECORRUPT,
                     "rdzv: assignment with an impossible layout (gen %lld, tp %lld x pp %lld x "
                     "dp %lld = world %lld, restart %lld)",
                     gen, tp, pp, dp, world, restart);
  a->gen = (int)gen, a->tp = (int)tp, a->pp = (int)pp, a->dp = (int)dp, a->world = (int)world;
  a->restart = (int)restart;
  if (json_object_get(j, "dp_resized")) { /* optional: written only after a resize */
    long long resized = int_in(j, "dp_resized", 1, ASSIGNMENT_MAX_DIM);
    if (resized < 0)
      return mt_seterr(MT_ECORRUPT,
                       "rdzv: assignment of generation %lld with a dp_resized that "
                       "is not a width from 1 to %d",
                       gen, ASSIGNMENT_MAX_DIM);
    a->dp_resized = (int)resized;
  }
  copy_str(a->job_hash, sizeof a->job_hash, j, "job_hash");
  copy_str(a->coordinator, sizeof a->coordinator, j, "coordinator");
  json_t *members = json_object_get(j, "members"), *spares = json_object_get(j, "spares");
  size_t nm = json_array_size(members), ns = json_array_size(spares);
  a->members = calloc(nm ? nm : 1, sizeof *a->members);
  a->spares = calloc(ns ? ns : 1, sizeof *a->spares);
  if (!a->members || !a->spares) {
    mt_assignment_free(a);
    return mt_seterr(MT_ENOMEM, "rdzv: assignment of %zu nodes", nm + ns);
  }
  size_t i;
  json_t *v;
  /* members in rank order, each whole model slots (multiples of tp), one
   * after another from rank 0 to the world's end */
  long long next = 0;
  json_array_foreach(members, i, v) {
    copy_str(a->members[i].name, sizeof a->members[i].name, v, "name");
    long long b = int_in(v, "rank_begin", 0, world), e = int_in(v, "rank_end", 0, world);
    if (!a->members[i].name[0] || b != next || e <= b || b % tp || e % tp) {
      int rc = mt_seterr(MT_ECORRUPT,
                         "rdzv: assignment member %zu (%s) holds ranks [%lld, %lld): want whole "
                         "model slots of tp %lld from rank %lld on",
                         i, a->members[i].name[0] ? a->members[i].name : "no name", b, e, tp, next);
      mt_assignment_free(a);
      return rc;
    }
    a->members[i].rank_begin = (int)b, a->members[i].rank_end = (int)e;
    next = e;
  }
  json_array_foreach(spares, i, v) snprintf(a->spares[i], MT_RDZV_NAME_MAX, "%s",
                                            json_string_value(v) ? json_string_value(v) : "");
  a->n_members = (int)nm, a->n_spares = (int)ns;
  if (next != world) {
    mt_assignment_free(a);
    return mt_seterr(MT_ECORRUPT, "rdzv: assignment members hold ranks [0, %lld) of world %lld",
                     next, world);
  }
  return 0;
}

/* ---- every node ---- */

int mt_rdzv_join(mt_store *s, const mt_node_desc *d, int64_t *seq) {
  int rc = 0;
  if (*seq <= 0) {
    int64_t drawn = 0;
    if ((rc = mt_store_add(s, "nodes/seq", 1, &drawn))) return mt_wraperr(rc, "rdzv: join");
    *seq = drawn;
  }
  char key[64];
  snprintf(key, sizeof key, "nodes/%lld", (long long)*seq);
  rc = set_json(s, key, desc_to_json(d));
  return rc ? mt_wraperr(rc, "rdzv: join") : 0;
}

int mt_rdzv_verdict(mt_store *s, int64_t seq, int *watch_gen) {
  char key[64];
  snprintf(key, sizeof key, "nodes/%lld/verdict", (long long)seq);
  int rc;
  json_t *j = get_json_now(s, key, &rc);
  if (rc <= 0) return rc;
  const char *status = json_string_value(json_object_get(j, "status"));
  if (status && !strcmp(status, "accepted")) {
    *watch_gen = (int)json_integer_value(json_object_get(j, "watch_gen"));
    json_decref(j);
    return 1;
  }
  const char *reason = json_string_value(json_object_get(j, "reason"));
  rc = mt_seterr(MT_EINVAL, "%s", reason ? reason : "refused without a reason");
  if (status && !strcmp(status, "wait")) {
    rc = 2;
    *watch_gen = (int)json_integer_value(json_object_get(j, "retry_ms"));
  }
  json_decref(j);
  return rc;
}

int mt_rdzv_assignment(mt_store *s, int gen, mt_assignment *a, char **job_json) {
  char key[64];
  snprintf(key, sizeof key, "gen/%d/assignment", gen);
  int rc;
  json_t *j = get_json_now(s, key, &rc);
  if (rc <= 0) return rc;
  rc = assignment_from_json(j, a);
  json_decref(j);
  if (rc) return rc;
  snprintf(key, sizeof key, "gen/%d/job", gen);
  rc = get_now(s, key, job_json); /* written before the assignment */
  if (rc <= 0) {
    mt_assignment_free(a);
    return rc ? rc : mt_seterr(MT_ECORRUPT, "rdzv: %s missing beside its assignment", key);
  }
  return 1;
}

int mt_rdzv_heartbeat(mt_store *s, const char *name) {
  char key[96];
  snprintf(key, sizeof key, "hb/%s", name);
  return mt_store_add(s, key, 1, NULL);
}

int mt_rdzv_ended(mt_store *s, int gen, int *final, int *ok, int *job_failed, char *reason,
                  int reason_size) {
  char key[64];
  snprintf(key, sizeof key, "gen/%d/end", gen);
  /* the end and the coordinator's prune mark in one round trip: a node back
   * from a stall through two re-forms finds its generation's keys gone (see
   * prune_generations), and takes the generation as ended, not final (a
   * later one formed), instead of waiting for an end that is not there */
  const char *keys[2] = {key, MT_RDZV_PRUNED_KEY};
  void *v[2] = {NULL, NULL};
  size_t bytes[2];
  int rc = mt_store_get_many(s, keys, 2, v, bytes);
  if (rc) return rc;
  long long pruned = v[1] ? strtoll(v[1], NULL, 10) : 0;
  free(v[1]);
  if (!v[0] && pruned >= gen) {
    *final = *ok = 0;
    if (job_failed) *job_failed = 0;
    snprintf(reason, (size_t)reason_size,
             "generation %d ended while this node was away, and its keys are gone (the "
             "coordinator keeps the last two generations'; %d and older are pruned)",
             gen, (int)pruned);
    return 1;
  }
  if (!v[0]) return 0;
  json_error_t err;
  json_t *j = json_loadb(v[0], bytes[0], 0, &err);
  free(v[0]);
  if (!j) return mt_seterr(MT_ECORRUPT, "rdzv: %s: bad JSON: %s", key, err.text);
  *final = json_is_true(json_object_get(j, "final"));
  *ok = json_is_true(json_object_get(j, "ok"));
  if (job_failed) *job_failed = json_is_true(json_object_get(j, "job_failed"));
  copy_str(reason, (size_t)reason_size, j, "reason");
  json_decref(j);
  return 1;
}

/* The report keys under gen/<g>/, by MT_REPORT_*. */
static const char *const report_kinds[] = {"done", "failed", "peer_failed"};

int mt_rdzv_report(mt_store *s, int gen, const char *name, int how, const char *reason) {
  if (how < MT_REPORT_DONE || how > MT_REPORT_PEER)
    return mt_seterr(MT_EINVAL, "rdzv: report of kind %d", how);
  char key[160];
  snprintf(key, sizeof key, "gen/%d/%s/%s", gen, report_kinds[how], name);
  int rc = mt_store_set(s, key, reason, strlen(reason));
  /* counted after it is there: the coordinator reads the reports when the
   * count moves, not every member's keys every tick */
  snprintf(key, sizeof key, "gen/%d/reports", gen);
  int64_t count;
  return rc ? rc : mt_store_add(s, key, 1, &count);
}

int mt_rdzv_order(mt_store *s, int gen, int64_t *seq, char *kind, int kind_size) {
  char key[64];
  snprintf(key, sizeof key, "gen/%d/order", gen);
  int rc;
  json_t *j = get_json_now(s, key, &rc);
  if (rc <= 0) return rc;
  *seq = json_integer_value(json_object_get(j, "seq"));
  copy_str(kind, (size_t)kind_size, j, "kind");
  json_decref(j);
  return 1;
}

int mt_rdzv_leave(mt_store *s, const char *name) {
  char key[160];
  snprintf(key, sizeof key, "nodes/%s/left", name);
  int rc = mt_store_set(s, key, "1", 1);
  int64_t count; /* as for reports: the coordinator looks when the count moves */
  return rc ? rc : mt_store_add(s, "nodes/left_count", 1, &count);
}

int mt_rdzv_stop_signalled(mt_store *s, int gen, const char *name) {
  char key[64];
  snprintf(key, sizeof key, "gen/%d/stop_signal", gen);
  return mt_store_set(s, key, name, strlen(name));
}

/* ---- operations and status ---- */

int mt_rdzv_submit_op(mt_store *s, const char *kind, json_t *args, const char *key, int timeout_ms,
                      int *http_status, json_t **op, int *replayed, char *detail, int detail_size) {
  *op = NULL;
  if (replayed) *replayed = 0;
  /* what a caller may do when the answer is lost: with a key, ask again */
  const char *retry = key ? "retry with the same Idempotency-Key, which orders it at most once "
                            "while the coordinator runs (a restarted one forgets its keys)"
                          : "see GET /v1/operations before retrying";
  int64_t n, claims;
  int rc = mt_store_add(s, "ops/seq", 1, &n);
  if (rc) return mt_wraperr(rc, "cannot reach the coordinator");
  char req_key[64], resp_key[64], claim_key[64];
  snprintf(req_key, sizeof req_key, "ops/req/%lld", (long long)n);
  snprintf(resp_key, sizeof resp_key, "ops/resp/%lld", (long long)n);
  snprintf(claim_key, sizeof claim_key, "ops/claim/%lld", (long long)n);
  /* "o" takes the reference: args borrowed (incref), or a new {} */
  json_t *req =
      json_pack("{s:s, s:o}", "kind", kind, "args", args ? json_incref(args) : json_object());
  if (req && key) json_object_set_new(req, "idempotency_key", json_string(key));
  rc = set_json(s, req_key, req);
  void *v;
  size_t bytes;
  if (!rc) rc = mt_store_get(s, resp_key, &v, &bytes, timeout_ms);
  if (rc) {
    /* give up on it, unless the coordinator took it first (read_op_requests) */
    if (mt_store_add(s, claim_key, 1, &claims))
      return mt_wraperr(rc, "cannot reach the coordinator (the request may still be acted on: %s)",
                        retry);
    if (claims == 1)
      return mt_wraperr(rc,
                        "the coordinator did not take the request within %d ms; it will "
                        "not be acted on",
                        timeout_ms);
    if ((rc = mt_store_get(s, resp_key, &v, &bytes, timeout_ms)))
      return mt_wraperr(rc,
                        "the coordinator took the request but did not answer within %d ms "
                        "more: %s",
                        timeout_ms, retry);
  }
  /* answered: the coordinator is done with the request's keys (it reads
   * each number once), so they go rather than pile up in the store with
   * every order, refusals included (best effort) */
  const char *done_keys[3] = {req_key, claim_key, resp_key};
  for (int i = 0; i < 3; i++)
    if (mt_store_del(s, done_keys[i]))
      mt_log_debug("operation request %lld: remove %s: %s", (long long)n, done_keys[i],
                   mt_errmsg());
  json_error_t e;
  json_t *j = json_loads(v, 0, &e);
  free(v);
  if (!j) return mt_seterr(MT_ECORRUPT, "the coordinator's answer is not JSON: %s", e.text);
  *http_status = (int)json_integer_value(json_object_get(j, "status"));
  const char *d = json_string_value(json_object_get(j, "detail"));
  snprintf(detail, (size_t)detail_size, "%s", d ? d : "");
  json_t *o = json_object_get(j, "op");
  if (o) *op = json_incref(o);
  if (replayed) *replayed = json_is_true(json_object_get(j, "replayed"));
  json_decref(j);
  return 0;
}

int mt_rdzv_acted(mt_store *s, int gen, int64_t seq, int64_t step, int ok, const char *reason) {
  char key[64];
  snprintf(key, sizeof key, "gen/%d/acted/%lld", gen, (long long)seq);
  return set_json(s, key,
                  json_pack("{s:I, s:b, s:s}", "step", (json_int_t)step, "ok", ok, "reason",
                            reason ? reason : ""));
}

int mt_rdzv_publish_node_status(mt_store *s, const char *name, json_t *status) {
  char key[128];
  snprintf(key, sizeof key, "node/%s/status", name);
  return set_json(s, key, status);
}

json_t *mt_rdzv_cluster_status(mt_store *s, int *rc) {
  return get_json_now(s, "cluster/status", rc);
}

/* ---- the coordinator ---- */

enum { ROLE_NONE, ROLE_MEMBER, ROLE_SPARE, ROLE_LOST, ROLE_LEFT };
int mt_order_kind_code(const char *name) {
  return !strcmp(name, "pause")        ? MT_ORDER_KIND_PAUSE
         : !strcmp(name, "resume")     ? MT_ORDER_KIND_RESUME
         : !strcmp(name, "stop")       ? MT_ORDER_KIND_STOP
         : !strcmp(name, "checkpoint") ? MT_ORDER_KIND_CHECKPOINT
         : !strcmp(name, "resize")     ? MT_ORDER_KIND_RESIZE
                                       : 0;
}

static const char *const role_names[] = {"joined", "member", "spare", "lost", "left"};

typedef struct coord_node {
  mt_node_desc d;
  int role;
  int slots;
  int rank_begin, rank_end;
  int64_t hb_value, hb_changed_ms;
  int hb_bad;     /* its counter is not a number: said once */
  int status_bad; /* its node/<name>/status is not JSON: said once */
  int reported;   /* for the running generation: 1 + MT_REPORT_* once it reported, else 0 */
  char report[512];
  int left; /* nodes/<name>/left, as of the last look (look_again) */
} coord_node;

typedef enum { G_FORMING, G_RUNNING, G_ENDED } gen_state;

/* How long the coordinator stays up after a stop operation ended the job: a
 * few polls of its operation (mtnlgctl polls every 0.5 s). */
#define STOP_LINGER_MS 2000

typedef struct coord_op {
  int64_t id;
  char kind[16];
  const char *state; /* "queued", "running", "succeeded", "failed" */
  char reason[800];
  double created, updated; /* unix s */
  int64_t step;            /* where it acted, -1 before */
  int64_t order_seq;       /* its order (0: none) */
  int dp;                  /* resize */
} coord_op;

/* A request's Idempotency-Key the coordinator answered: what was asked
 * with it and what it was told, so that a retry of that request (its answer
 * lost on the way back) is told the same and orders nothing. */
typedef struct op_key {
  char *key; /* malloc'd; NULL: an empty slot */
  char kind[16];
  json_t *args;  /* as asked ({} when none) */
  json_t *resp;  /* the answer: {"status": 202, "op"} or {"status": 4xx, "detail"} */
  int64_t op_id; /* 202: its operation (0: a refusal) */
} op_key;

/* Queued or running: not finished yet. */
static int op_pending(const coord_op *o) {
  return !strcmp(o->state, "running") || !strcmp(o->state, "queued");
}

struct mt_coord {
  mt_coord_opts o;
  char *job_json;
  int64_t next_seq; /* the next join number to read */
  coord_node *nodes;
  int n_nodes, cap;
  int gen; /* the generation forming or running (1-based) */
  gen_state state;
  int64_t formable_since_ms;
  int64_t first_failure_ms;
  /* the counts behind nodes/<name>/left and the running generation's
   * reports at the last look, and when that was (look_again) */
  int64_t left_seen, left_look_ms, reports_seen, reports_look_ms;
  int reports_gen;    /* the generation reports_seen counts */
  int64_t hb_read_ms; /* when the heartbeats were last read */
  int64_t order_seq;
  int final_written;
  int64_t ended_ms;
  int end_ok;
  char end_reason[1200];
  int paused;
  int dp;                          /* of the running generation */
  int resize_to;                   /* a resize under way: the next generation's dp (0: none) */
  int dp_resized;                  /* the width the last resize that formed set: the bounds
                                      of the formings that follow (dp_bounds); 0: none */
  int64_t resize_op;               /* its operation's id */
  int resize_saved;                /* its checkpoint is committed: the generation may end */
  int64_t resize_forming_since_ms; /* its generation began forming (bounded by
                                      reform_timeout_ms, then the usual dp, or
                                      the job ends when none is left) */
  int restarts;                    /* generations ended by a failure and re-formed */
  int reforming;                   /* forming after a failure: bounded by reform_timeout_ms */
  int first_restart; /* the first generation re-forms the job after the predecessor was lost */
  int64_t reform_since_ms;
  char failure[600]; /* what ended the last generation that failed */
  /* the last re-form after a failure, for cluster/status's last_restart
   * (the reason is gone from the status once the generation runs) */
  int restart_gen;          /* the generation it formed; 0: none yet */
  double restart_time;      /* when the failed generation ended, unix s */
  int64_t restart_step;     /* the step the ranks resumed from; -1 not known (yet) */
  char restart_reason[600]; /* what ended the generation before it */
  char loss[512];    /* a member of the running generation was lost or left: why (until acted on) */
  char waiting[400]; /* forming with too few slots for any dp: what it waits for ("" once formable)
                      */
  int unpublished;   /* publishing generation gen failed part way: ended, not formed again */
  int pruned_through;    /* gen/<g>/ keys of every g up to this one are deleted */
  int prune_warned_gen;  /* the generation a failed prune was last logged in */
  int prune_unsupported; /* the store has no prefix delete: not tried again */
  int64_t next_op_req;   /* the next ops/req/<n> to read */
  unwritten reqs_gaps;   /* ops/req/<n> below next_op_req numbered but not written */
  unwritten joins_gaps;  /* likewise nodes/<n> below next_seq */
  coord_op *ops;
  int n_ops, cap_ops;
  int64_t op_ids;      /* ids given so far (the table keeps only the newest) */
  op_key *keys;        /* MT_RDZV_IDEM_KEYS slots, a ring (NULL until a key came) */
  int next_key;        /* the slot the next key takes: the oldest's, once full */
  int64_t status_ms;   /* when cluster/status was last written */
  uint64_t status_sig; /* of what it said then that a change must publish at once */
  json_t *node_status; /* name -> the node's own status, refreshed each heartbeat */
  int64_t node_status_ms;
};

static double wall_s(void);

int mt_coord_new(const mt_coord_opts *o, mt_coord **out) {
  mt_coord *c = calloc(1, sizeof *c);
  if (!c || !(c->job_json = strdup(o->job_json))) {
    free(c);
    return mt_seterr(MT_ENOMEM, "coordinator");
  }
  c->o = *o;
  c->o.job_json = c->job_json;
  c->next_seq = 1;
  c->gen = 1;
  c->state = G_FORMING;
  c->next_op_req = 1;
  c->node_status = json_object();
  if (o->restarts_spent > 0) { /* the predecessor's loss ended its generation */
    c->restarts = o->restarts_spent;
    c->first_restart = 1;
    c->restart_gen = c->gen, c->restart_time = wall_s(), c->restart_step = -1;
    snprintf(c->restart_reason, sizeof c->restart_reason, "%s",
             o->restart_reason ? o->restart_reason : "the coordinator was lost");
    mt_msg_cut_whole(c->restart_reason, sizeof c->restart_reason);
    snprintf(c->failure, sizeof c->failure, "%s", c->restart_reason);
  }
  c->o.restart_reason = NULL; /* kept in restart_reason */
  c->paused = o->paused;      /* published with the first generation (form) */
  c->dp_resized = o->dp_resized > 0 ? o->dp_resized : 0;
  *out = c;
  return 0;
}

int mt_coord_restarts(const mt_coord *c) { return c->restarts; }
int mt_coord_paused(const mt_coord *c) { return c->paused; }
int mt_coord_dp_resized(const mt_coord *c) { return c->dp_resized; }

void mt_coord_free(mt_coord *c) {
  if (!c) return;
  free(c->nodes);
  free(c->ops);
  for (int i = 0; c->keys && i < MT_RDZV_IDEM_KEYS; i++) {
    free(c->keys[i].key);
    json_decref(c->keys[i].args);
    json_decref(c->keys[i].resp);
  }
  free(c->keys);
  json_decref(c->node_status);
  free(c->job_json);
  free(c);
}

static coord_node *find_node(mt_coord *c, const char *name) {
  for (int i = 0; i < c->n_nodes; i++)
    if (!strcmp(c->nodes[i].d.name, name)) return &c->nodes[i];
  return NULL;
}

/* A control URL the dashboards may link: http(s)://, then no space, quote,
 * angle bracket or backslash. */
static int url_ok(const char *u) {
  const char *rest = !strncmp(u, "http://", 7) ? u + 7 : !strncmp(u, "https://", 8) ? u + 8 : NULL;
  if (!rest || !*rest) return 0;
  for (; *rest; rest++)
    if ((unsigned char)*rest <= ' ' || strchr("\"'<>\\", *rest)) return 0;
  return 1;
}

/* wait: the refusal is for now only (refusal()'s *wait). */
static int write_verdict(mt_coord *c, int64_t seq, const char *refusal, int wait) {
  char key[64];
  snprintf(key, sizeof key, "nodes/%lld/verdict", (long long)seq);
  json_t *v = wait ? json_pack("{s:s, s:s, s:i}", "status", "wait", "reason", refusal, "retry_ms",
                               c->o.heartbeat_timeout_ms)
              : refusal ? json_pack("{s:s, s:s}", "status", "refused", "reason", refusal)
                        : json_pack("{s:s, s:i}", "status", "accepted", "watch_gen", c->gen);
  return set_json(c->o.store, key, v);
}

/* Why a node cannot take part, or NULL. *wait is set when it may later: a
 * daemon started again on the same host under its name (systemd's restart
 * after a crash; another pid, or in a container the same pid 1 with another
 * instance) while its predecessor is not yet declared lost, which its
 * silence will bring within the heartbeat timeout. A second daemon of the
 * name on another host is a configuration mistake, refused for good. */
static const char *refusal(mt_coord *c, const mt_node_desc *d, char *why, size_t size,
                           int64_t now_ms, int *wait) {
  coord_node *same = find_node(c, d->name);
  int counted = same && same->role != ROLE_LOST && same->role != ROLE_LEFT;
  *wait = 0;
  if (strcmp(d->version, c->o.version))
    snprintf(why, size,
             "node %s runs mtnlgd %s, the coordinator %s: every node must run the same version",
             d->name, d->version, c->o.version);
  else if (d->job_hash[0] && strcmp(d->job_hash, c->o.job_hash))
    snprintf(why, size,
             "node %s was configured with job %s, the coordinator runs job %s: give every node the "
             "same job file and --job-set overrides, or none",
             d->name, d->job_hash, c->o.job_hash);
  else if (counted && !strcmp(same->d.host, d->host) &&
           (same->d.pid != d->pid || strcmp(same->d.instance, d->instance))) {
    *wait = 1;
    snprintf(why, size,
             "node %s is still counted as the daemon of pid %d on %s (last heartbeat %.1f s ago): "
             "this one started before the coordinator declared it lost "
             "(cluster.heartbeat_timeout_ms %d)",
             d->name, same->d.pid, d->host, (now_ms - same->hb_changed_ms) / 1000.0,
             c->o.heartbeat_timeout_ms);
  } else if (counted)
    snprintf(why, size,
             "a node named %s already joined (from %s, pid %d): node names must be unique", d->name,
             same->d.host, same->d.pid);
  else if (d->control_url[0] && !url_ok(d->control_url))
    snprintf(why, size,
             "node %s gives \"%.80s\" as its control URL: want http(s)://HOST:PORT (the "
             "dashboards link it)",
             d->name, d->control_url);
  else if (d->n_devices < c->o.tp)
    snprintf(why, size,
             "node %s has %d device(s); one model slot of this job needs parallel.tp = %d devices",
             d->name, d->n_devices, c->o.tp);
  else
    return NULL;
  return why;
}

/* The role of a node that arrives now (a join, or a lost node back): a spare
 * while a generation runs, placed when the next one forms; otherwise one for
 * the generation forming to place. */
static int newcomer_role(const mt_coord *c) {
  return c->state == G_RUNNING ? ROLE_SPARE : ROLE_NONE;
}

/* A daemon of this name that ran before (and exited without its ranks, or
 * at the end of a job) may have left nodes/<name>/left behind: that was its
 * word, not the word of the daemon joining now under the name. */
static int forget_left(mt_coord *c, const char *name) {
  char key[128];
  snprintf(key, sizeof key, "nodes/%s/left", name);
  int rc = mt_store_del(c->o.store, key);
  return rc == MT_ENOENT ? 0 : rc;
}

static int cmp_nodes(const void *a, const void *b) {
  return strcmp(((const coord_node *)a)->d.name, ((const coord_node *)b)->d.name);
}

/* One numbered join: 1 when it was decided (or passed over, unwritten
 * since since_ms for UNWRITTEN_GAP_MS), 0 while it is not written, < 0 when
 * the store failed (it is read again next tick). */
static int take_join(mt_coord *c, int64_t seq, int64_t now_ms, int64_t since_ms) {
  char key[64];
  int rc;
  snprintf(key, sizeof key, "nodes/%lld", (long long)seq);
  json_t *j = get_json_now(c->o.store, key, &rc);
  char why[512];
  int corrupt = rc == MT_ECORRUPT; /* not JSON: refused below, not a stop */
  if (corrupt) snprintf(why, sizeof why, "the join descriptor is not JSON: %s", mt_errmsg());
  if (rc < 0 && !corrupt) return rc;
  if (rc == 0) { /* counted but not written yet: later, unless its node died meanwhile */
    if (now_ms - since_ms < UNWRITTEN_GAP_MS) return 0;
    mt_log_warn("coordinator: join %lld was numbered but never written in %d s; passed over",
                (long long)seq, UNWRITTEN_GAP_MS / 1000);
    return 1;
  }
  mt_node_desc d;
  int bad = corrupt || desc_from_json(j, &d);
  json_decref(j);
  int wait = 0;
  const char *no = corrupt ? why
                   : bad   ? "the join descriptor has no node name"
                           : refusal(c, &d, why, sizeof why, now_ms, &wait);
  /* nothing about the node is kept until its verdict is written: a verdict
   * that fails is read again next tick, and must not find the node already
   * there and refuse it as a duplicate of itself */
  coord_node *n = NULL;
  if (no) {
    mt_log_warn("coordinator: join %lld %s: %s", (long long)seq,
                wait ? "turned away for now" : "refused", no);
  } else if (!(n = find_node(c, d.name)) && c->n_nodes == c->cap) {
    int cap = c->cap ? 2 * c->cap : 16;
    coord_node *m = realloc(c->nodes, (size_t)cap * sizeof *m);
    if (!m) return mt_seterr(MT_ENOMEM, "coordinator: %d nodes", cap);
    c->nodes = m, c->cap = cap;
  }
  if (!no && (rc = forget_left(c, d.name))) return rc;
  if ((rc = write_verdict(c, seq, no, wait))) return rc;
  if (!no) {
    if (!n) n = &c->nodes[c->n_nodes++];
    memset(n, 0, sizeof *n);
    n->d = d;
    n->slots = d.n_devices / c->o.tp;
    n->hb_changed_ms = now_ms;
    n->hb_value = -1;
    n->role = newcomer_role(c);
    mt_log_info("coordinator: node %s joined from %s with %d device(s) (%d slot(s)) as join %lld",
                d.name, d.host, d.n_devices, n->slots, (long long)seq);
    /* a model slot is tp devices of one node: the rest of its devices idle */
    if (d.n_devices % c->o.tp)
      mt_log_warn("coordinator: node %s: %d of its %d device(s) are left idle: a model slot is "
                  "parallel.tp = %d devices of one node",
                  d.name, d.n_devices % c->o.tp, d.n_devices, c->o.tp);
    /* kept in name order, as form() takes them: the status lists nodes in
     * one order from the first join on, not in the order they happened to
     * join until the generation forms */
    qsort(c->nodes, (size_t)c->n_nodes, sizeof *c->nodes, cmp_nodes);
  }
  return 1;
}

typedef int (*take_fn)(mt_coord *c, int64_t n, int64_t now_ms, int64_t since_ms);

/* The gaps first, each taken whenever its write lands; then the numbers up
 * to last from *next, a gap noted and passed by. */
static int take_numbered(mt_coord *c, unwritten *gaps, int64_t *next, int64_t last, take_fn take,
                         int64_t now_ms) {
  for (int i = 0; i < gaps->count;) {
    int rc = take(c, gaps->n[i], now_ms, gaps->since_ms[i]);
    if (rc < 0) return rc;
    if (!rc) {
      i++;
      continue;
    }
    gaps->count--;
    memmove(gaps->n + i, gaps->n + i + 1, (size_t)(gaps->count - i) * sizeof *gaps->n);
    memmove(gaps->since_ms + i, gaps->since_ms + i + 1,
            (size_t)(gaps->count - i) * sizeof *gaps->since_ms);
  }
  for (; *next <= last; ++*next) {
    int rc = take(c, *next, now_ms, now_ms);
    if (rc < 0) return rc;
    if (rc) continue;
    if (gaps->count == MAX_UNWRITTEN) break; /* wait here, as for one gap before */
    gaps->n[gaps->count] = *next, gaps->since_ms[gaps->count] = now_ms;
    gaps->count++;
  }
  return 0;
}

static int read_joins(mt_coord *c, int64_t now_ms) {
  int64_t last;
  int rc = mt_store_add(c->o.store, "nodes/seq", 0, &last);
  if (rc) return rc;
  return take_numbered(c, &c->joins_gaps, &c->next_seq, last, take_join, now_ms);
}

/* A node's heartbeat counter from the value of hb/<name> (NULL: no beat
 * yet, 0). One that is not a number (another process wrote it) reads as
 * -1, still: that node goes silent and is declared lost, rather than every
 * node's heartbeats going unread. */
static int64_t hb_parse(coord_node *n, const char *value) {
  if (!value) return 0;
  char *end;
  errno = 0;
  long long v = strtoll(value, &end, 10);
  if (end != value && !*end && !errno) return v;
  if (!n->hb_bad++)
    mt_log_warn("coordinator: hb/%s holds \"%.40s\", not a heartbeat count", n->d.name, value);
  return -1;
}

/* A node declared lost whose heartbeat counter moves again was only slow
 * (stopped, swapping, cut off a while), not dead: it comes back as a node
 * that just joined and was not placed, so that the next generation formed (a
 * later failure, a resize, or the wait for enough nodes after one) can use
 * it, as torchrun's next rendezvous round would. Nothing it still says about
 * the generation it lost can touch the current one: its reports, steps and
 * acts are keyed gen/<its g>/, and only gen/<c->gen>/ is read. One that left
 * (nodes/<name>/left: it gave up its ranks and exits) stays left. */
/* Whether to read the keys a count stands for: 1 when the count moved
 * since the last look, or a while passed (a key written while its count's
 * ADD failed); 0 not, < 0 a store failure. A tick at MT-NLG's 560 nodes
 * made about 2800 store round trips reading every node's left and report
 * keys; with the counts it makes one a node (its heartbeat) and two more. */
#define LOOK_ANYWAY_MS 5000
static int look_again(mt_coord *c, const char *count_key, int64_t *seen, int64_t *look_ms,
                      int64_t now_ms) {
  int64_t count;
  int rc = mt_store_add(c->o.store, count_key, 0, &count);
  if (rc == MT_EINVAL)
    count = -1; /* not a counter (another process wrote it): look */
  else if (rc)
    return rc;
  if (count >= 0 && count == *seen && now_ms - *look_ms < LOOK_ANYWAY_MS) return 0;
  *seen = count, *look_ms = now_ms;
  return 1;
}

static int read_lost(mt_coord *c, coord_node *n, int64_t now_ms, int left, int64_t v) {
  if (left) {
    n->role = ROLE_LEFT;
    mt_log_info("coordinator: node %s left (it was lost)", n->d.name);
    return 0;
  }
  if (v == n->hb_value) return 0;
  /* a daemon started again under the name bumps the same counter, but only
   * after its join was counted: while a join is unread, read_joins goes
   * first (next round), so that one replaces this entry instead of being
   * refused as a second node of the name */
  int64_t joins;
  int rc = mt_store_add(c->o.store, "nodes/seq", 0, &joins);
  if (rc) return rc;
  if (joins >= c->next_seq) return 0; /* a gap is no daemon's: none beats before its verdict */
  mt_log_info("coordinator: node %s is back after %.1f s: a spare", n->d.name,
              (now_ms - n->hb_changed_ms) / 1000.0);
  n->hb_value = v, n->hb_changed_ms = now_ms;
  n->role = newcomer_role(c);
  n->rank_begin = n->rank_end = 0;
  n->reported = 0, n->report[0] = 0;
  return 0;
}

/* Keys of the nodes read in one batched request (mt_store_get_many: one
 * round trip to the TCP store, where a request a node made 560 at MT-NLG's
 * scale): add them, read, find each value in got[k] (NULL: absent) with
 * who[k] the caller's tag of it. */
#define BATCH_KEY_MAX 160
typedef struct key_batch {
  char *names;       /* cap keys of BATCH_KEY_MAX bytes */
  const char **keys; /* into names */
  char **got;        /* after batch_read; a caller may take one (and NULL it) */
  int *who;
  size_t n, cap;
} key_batch;

static int batch_init(key_batch *b, size_t cap, const char *what) {
  memset(b, 0, sizeof *b);
  b->cap = cap + 1;
  b->names = malloc(b->cap * BATCH_KEY_MAX);
  b->keys = malloc(b->cap * sizeof *b->keys);
  b->got = calloc(b->cap, sizeof *b->got);
  b->who = malloc(b->cap * sizeof *b->who);
  if (b->names && b->keys && b->got && b->who) return 0;
  return mt_seterr(MT_ENOMEM, "coordinator: %s of %zu keys", what, cap);
}

__attribute__((format(printf, 3, 4))) static void batch_add(key_batch *b, int who, const char *fmt,
                                                            ...) {
  char *key = b->names + b->n * BATCH_KEY_MAX;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(key, BATCH_KEY_MAX, fmt, ap);
  va_end(ap);
  b->keys[b->n] = key;
  b->who[b->n++] = who;
}

static int batch_read(mt_coord *c, key_batch *b) {
  return b->n ? mt_store_get_many(c->o.store, b->keys, b->n, (void **)b->got, NULL) : 0;
}

static void batch_free(key_batch *b) {
  for (size_t k = 0; b->got && k < b->n; k++) free(b->got[k]);
  free(b->names), free(b->keys), free(b->got), free(b->who);
}

/* What a heartbeat read asks the store: of every node not gone, hb/<name>
 * and, when look, nodes/<name>/left, in one batch. vals[2 * i] and
 * vals[2 * i + 1] are node i's (NULL: absent or not read; the caller's). */
static int read_node_keys(mt_coord *c, int look, char **vals) {
  key_batch b;
  int rc = batch_init(&b, 2 * (size_t)c->n_nodes, "heartbeats");
  for (int i = 0; i < c->n_nodes && !rc; i++) {
    const coord_node *nd = &c->nodes[i];
    if (nd->role == ROLE_LEFT) continue;
    batch_add(&b, 2 * i, "hb/%s", nd->d.name);
    if (look) batch_add(&b, 2 * i + 1, "nodes/%s/left", nd->d.name);
  }
  if (!rc) rc = batch_read(c, &b);
  for (size_t k = 0; k < b.n && !rc; k++) vals[b.who[k]] = b.got[k], b.got[k] = NULL;
  batch_free(&b);
  return rc;
}

static int read_member_reports(mt_coord *c);

/* Heartbeats and departures: marks nodes lost or left, and lost nodes that
 * heartbeat again back. The first member of the running generation lost (or
 * gone) before its ranks reported done is written down in c->loss, which
 * stays until the generation's end is written: a store error on the way
 * cannot make the coordinator forget a node it has already marked lost. */
static int read_heartbeats(mt_coord *c, int64_t now_ms) {
  char *why = c->loss;
  size_t size = sizeof c->loss;
  int look = look_again(c, "nodes/left_count", &c->left_seen, &c->left_look_ms, now_ms);
  if (look < 0) return look;
  char **vals = calloc(2 * (size_t)c->n_nodes + 1, sizeof *vals);
  if (!vals) return mt_seterr(MT_ENOMEM, "coordinator: heartbeats of %d nodes", c->n_nodes);
  int rc = read_node_keys(c, look, vals), reports_read = 0;
  for (int i = 0; i < c->n_nodes && !rc; i++) {
    coord_node *n = &c->nodes[i];
    if (n->role == ROLE_LEFT) continue;
    int left = look ? vals[2 * i + 1] != NULL : n->left;
    int64_t v = hb_parse(n, vals[2 * i]);
    n->left = left;
    if (n->role == ROLE_LOST) {
      rc = read_lost(c, n, now_ms, left, v);
      continue;
    }
    /* a member whose ranks reported done finished everything they do in
     * this generation (the export included: world rank 0 may write it alone
     * for hours); losing it now loses nothing, and the generation waits for
     * the other members' reports. Its report may have landed since the last
     * look, just before its departure: the reports are read again first. */
    int member = n->role == ROLE_MEMBER && c->state == G_RUNNING;
    int gone = left || (v == n->hb_value && now_ms - n->hb_changed_ms > c->o.heartbeat_timeout_ms);
    if (member && gone && !n->reported && !reports_read) {
      if ((rc = read_member_reports(c))) break;
      reports_read = 1;
    }
    int finished = member && n->reported == 1 + MT_REPORT_DONE;
    if (left && finished) {
      n->role = ROLE_LEFT;
      mt_log_info("coordinator: node %s left after its ranks finished generation %d; waiting for "
                  "the other members",
                  n->d.name, c->gen);
      continue;
    }
    if (left && n->role == ROLE_MEMBER && c->state == G_RUNNING) {
      /* a member leaves only once the job ended, or when it gave up its
       * ranks: the generation cannot go on without them */
      n->role = ROLE_LEFT;
      mt_log_warn("coordinator: node %s left while a member of generation %d", n->d.name, c->gen);
      if (!why[0])
        snprintf(why, size, "node %s left (ranks [%d, %d))", n->d.name, n->rank_begin, n->rank_end);
      continue;
    }
    if (left && n->role != ROLE_MEMBER) {
      n->role = ROLE_LEFT;
      mt_log_info("coordinator: node %s left", n->d.name);
      continue;
    }
    if (v != n->hb_value) n->hb_value = v, n->hb_changed_ms = now_ms;
    if (now_ms - n->hb_changed_ms > c->o.heartbeat_timeout_ms && !left) {
      int was_member = n->role == ROLE_MEMBER;
      n->role = ROLE_LOST;
      mt_log_warn("coordinator: node %s lost: no heartbeat for %.1f s", n->d.name,
                  (now_ms - n->hb_changed_ms) / 1000.0);
      if (finished)
        mt_log_info("coordinator: node %s was lost after its ranks finished generation %d: not a "
                    "failure; waiting for the other members",
                    n->d.name, c->gen);
      else if (was_member && c->state == G_RUNNING && !why[0]) {
        snprintf(why, size, "node %s lost (no heartbeat for %.1f s, ranks [%d, %d))", n->d.name,
                 (now_ms - n->hb_changed_ms) / 1000.0, n->rank_begin, n->rank_end);
      }
    }
  }
  for (int i = 0; i < 2 * c->n_nodes; i++) free(vals[i]);
  free(vals);
  return rc;
}

/* A member of the running generation lost or gone after its ranks reported
 * done (read_heartbeats): still counted as done, not as a loss. Its report
 * is cleared when the next generation begins forming, or when it is back. */
static int finished_and_gone(const coord_node *n) {
  return (n->role == ROLE_LOST || n->role == ROLE_LEFT) && n->reported == 1 + MT_REPORT_DONE;
}

/* What micro_batch * dp must divide: the global batch, or the quantum of
 * every batch of a ramp-up. */
static int batch_quantum(const mt_coord *c) {
  return c->o.batch_quantum > 0 ? c->o.batch_quantum : c->o.global_batch;
}

/* Whether the nodes present (not lost or gone), whole and in name order as
 * form() takes them (one that would overfill is passed over), fill exactly
 * `need` model slots: nodes of unequal sizes may add up to more slots than
 * need and still not make it. */
static int fills(mt_coord *c, int need) {
  qsort(c->nodes, (size_t)c->n_nodes, sizeof *c->nodes, cmp_nodes);
  int have = 0;
  for (int i = 0; i < c->n_nodes && have < need; i++) {
    const coord_node *n = &c->nodes[i];
    if (n->role != ROLE_LOST && n->role != ROLE_LEFT && have + n->slots <= need) have += n->slots;
  }
  return have == need;
}

/* Whether every global batch splits into micro-batches over dp replicas
 * (under interleaved 1F1B, a multiple of pp of them each). */
static int batch_splits(const mt_coord *c, int dp) {
  return batch_quantum(c) % (c->o.micro_batch * dp * (c->o.interleaved ? c->o.pp : 1)) == 0;
}

/* The widths the generation being formed may take: a resize under way's
 * N alone; else the coordinator forms by itself (at its start, after a
 * failure) in the job's [dp_min, dp_max], or after an operator's resize to N
 * at most N, and down to N where N is under dp_min: the operator's width
 * holds until the next resize, rather than the first failure widening the
 * job onto nodes taken out of it (or narrowing one grown past dp_max). */
static void dp_bounds(const mt_coord *c, int *lo, int *hi) {
  if (c->resize_to) {
    *lo = *hi = c->resize_to;
    return;
  }
  *lo = c->o.dp_min, *hi = c->o.dp_max;
  if (c->dp_resized) {
    *hi = c->dp_resized;
    if (*lo > *hi) *lo = *hi;
  }
}

/* Says (once, and in the status's reason) what a generation that cannot
 * form yet waits for: the slots for the narrowest dp it may take, or a
 * width they fill in whole nodes and that splits every global batch. */
static void note_waiting(mt_coord *c, int slots) {
  int lo, hi;
  dp_bounds(c, &lo, &hi);
  int dp = lo, need = c->o.pp * dp;
  char why[sizeof c->waiting];
  if (slots < need)
    snprintf(why, sizeof why,
             "waiting for nodes: %d model slot(s) joined of the %d that dp %d needs (pp %d x dp "
             "%d; a slot is parallel.tp = %d devices of one node)",
             slots, need, dp, c->o.pp, dp, c->o.tp);
  else
    snprintf(why, sizeof why,
             "waiting for nodes: the %d model slot(s) joined make no dp from %d to %d that whole "
             "nodes fill (pp x dp slots) and that splits every global batch into micro-batches",
             slots, dp, hi);
  if (strcmp(why, c->waiting)) mt_log_info("coordinator: %s", why);
  snprintf(c->waiting, sizeof c->waiting, "%s", why);
}

/* The widest dp in [dp_min, dp_max] (dp_bounds) the slots allow with every
 * global batch divisible by micro_batch * dp (batch_splits: a resize's N was
 * checked when it was accepted) and whole nodes filling its pp * dp slots;
 * 0 when none. */
static int pick_dp(mt_coord *c, int slots) {
  int lo, hi;
  dp_bounds(c, &lo, &hi);
  int most = slots / c->o.pp;
  if (most > hi) most = hi;
  for (int dp = most; dp >= lo; dp--)
    if (batch_splits(c, dp) && fills(c, c->o.pp * dp)) return dp;
  return 0;
}

static void op_done(coord_op *o, int ok, const char *reason);
static double wall_s(void);

/* gen/<g>/order of generation c->gen, the next order seq. */
static int publish_order(mt_coord *c, const char *kind) {
  char key[64];
  snprintf(key, sizeof key, "gen/%d/order", c->gen);
  return set_json(c->o.store, key,
                  json_pack("{s:I, s:s}", "seq", (json_int_t)++c->order_seq, "kind", kind));
}

/* Deletes the gen/<g>/ keys of every generation before the previous one,
 * once generation c->gen is published: without it the store keeps every
 * generation's keys (tens of thousands at thousands of ranks) for the life
 * of the job. Safe because nothing reads them any more: the coordinator
 * reads the running generation's keys only; members and spares of c->gen
 * read c->gen's; a node still on c->gen - 1 (its ranks stopping, or back
 * from a stall) reads that generation's end, order and assignment, which
 * are kept. A node on an older one was away through two re-forms: its
 * generation's end is gone, and mt_rdzv_ended takes MT_RDZV_PRUNED_KEY,
 * written before the keys go, as that end (not final: later ones formed),
 * so it walks on to the running generation. "gen/<g>/" with its slash, so
 * generation 1's prune leaves gen/10/. A prune that fails is tried again at
 * the next generation and never fails the coordinator. */
static void prune_generations(mt_coord *c) {
  int upto = c->gen - 2;
  if (c->pruned_through >= upto || c->prune_unsupported) return;
  char mark[24], prefix[32];
  int rc = 0;
  int64_t total = 0, deleted = 0;
  int first = c->pruned_through + 1;
  snprintf(mark, sizeof mark, "%d", upto);
  rc = mt_store_set(c->o.store, MT_RDZV_PRUNED_KEY, mark, strlen(mark));
  for (int g = first; !rc && g <= upto; g++) {
    snprintf(prefix, sizeof prefix, "gen/%d/", g);
    if (!(rc = mt_store_del_prefix(c->o.store, prefix, &deleted)))
      c->pruned_through = g, total += deleted;
  }
  if (c->pruned_through >= first)
    mt_log_debug("coordinator: generation %d formed: deleted %lld key(s) of generation(s) %d..%d",
                 c->gen, (long long)total, first, c->pruned_through);
  if (rc == MT_ENOTSUP) {
    c->prune_unsupported = 1;
    mt_log_warn("coordinator: the store keeps every generation's keys: %s", mt_errmsg());
  } else if (rc && c->prune_warned_gen != c->gen) {
    c->prune_warned_gen = c->gen;
    mt_log_warn("coordinator: cannot delete the keys of generation %d (the store keeps them; "
                "tried again at the next generation): %s",
                c->pruned_through + 1, mt_errmsg());
  }
}

/* Forms generation c->gen from the nodes present: members in name order,
 * whole nodes, until pp * dp slots; the rest spares. Publishes job, hash and
 * assignment (the assignment last: members wait for it). */
static int form(mt_coord *c, int dp) {
  qsort(c->nodes, (size_t)c->n_nodes, sizeof *c->nodes, cmp_nodes);
  int need = c->o.pp * dp, have = 0;
  mt_assignment a = {.gen = c->gen,
                     .tp = c->o.tp,
                     .pp = c->o.pp,
                     .dp = dp,
                     .world = c->o.tp * c->o.pp * dp,
                     .restart = c->reforming || c->first_restart ? c->restarts : 0,
                     .dp_resized = c->resize_to ? c->resize_to : c->dp_resized};
  snprintf(a.job_hash, sizeof a.job_hash, "%s", c->o.job_hash);
  a.members = calloc((size_t)c->n_nodes + 1, sizeof *a.members);
  a.spares = calloc((size_t)c->n_nodes + 1, sizeof *a.spares);
  if (!a.members || !a.spares) {
    mt_assignment_free(&a);
    return mt_seterr(MT_ENOMEM, "coordinator: assignment");
  }
  for (int i = 0; i < c->n_nodes; i++) {
    coord_node *n = &c->nodes[i];
    if (n->role == ROLE_LOST || n->role == ROLE_LEFT) continue;
    n->reported = 0;
    if (have + n->slots <= need) {
      n->role = ROLE_MEMBER;
      n->rank_begin = have * c->o.tp;
      have += n->slots;
      n->rank_end = have * c->o.tp;
      mt_member *m = &a.members[a.n_members++];
      snprintf(m->name, sizeof m->name, "%s", n->d.name);
      m->rank_begin = n->rank_begin, m->rank_end = n->rank_end;
    } else {
      n->role = ROLE_SPARE;
      snprintf(a.spares[a.n_spares++], MT_RDZV_NAME_MAX, "%s", n->d.name);
    }
  }
  if (have != need) { /* whole nodes could not fill the slots exactly */
    mt_assignment_free(&a);
    for (int i = 0; i < c->n_nodes; i++)
      if (c->nodes[i].role == ROLE_MEMBER || c->nodes[i].role == ROLE_SPARE)
        c->nodes[i].role = ROLE_NONE;
    return 0;
  }
  char key[64];
  snprintf(key, sizeof key, "gen/%d/job", c->gen);
  int rc = mt_store_set(c->o.store, key, c->job_json, strlen(c->job_json));
  /* a job paused when its generation ended starts the next paused: the order
   * is there before the assignment, so the ranks see it before step one */
  if (!rc && c->paused) rc = publish_order(c, "pause");
  snprintf(key, sizeof key, "gen/%d/job_hash", c->gen);
  if (!rc) rc = mt_store_set(c->o.store, key, c->o.job_hash, strlen(c->o.job_hash));
  snprintf(key, sizeof key, "gen/%d/assignment", c->gen);
  if (!rc) rc = set_json(c->o.store, key, assignment_to_json(&a));
  if (!rc) {
    char members[1024] = "";
    size_t len = 0;
    for (int i = 0; i < a.n_members && len < sizeof members - 80; i++)
      len += (size_t)snprintf(members + len, sizeof members - len, "%s%s [%d,%d)", i ? ", " : "",
                              a.members[i].name, a.members[i].rank_begin, a.members[i].rank_end);
    char restart[64] = "";
    if (c->reforming || c->first_restart)
      snprintf(restart, sizeof restart, " (restart %d of %d)", c->restarts, c->o.max_restarts);
    mt_log_info("coordinator: generation %d formed%s: tp %d x pp %d x dp %d = %d ranks on %d "
                "node(s): %s; %d spare(s)",
                c->gen, restart, a.tp, a.pp, a.dp, a.world, a.n_members, members, a.n_spares);
    c->state = G_RUNNING;
    c->reforming = c->first_restart = 0;
    if (c->paused)
      mt_log_info("coordinator: generation %d starts paused, as the job was: mtnlgctl resume "
                  "goes on",
                  c->gen);
    if (c->resize_to) {
      for (int i = 0; i < c->n_ops; i++)
        if (c->ops[i].id == c->resize_op) op_done(&c->ops[i], 1, NULL);
      c->resize_to = 0;
      c->resize_saved = 0;
      c->dp_resized = dp; /* the operator's width, from now on (dp_bounds) */
    }
    c->dp = dp;
    c->first_failure_ms = 0;
    prune_generations(c);
  }
  mt_assignment_free(&a);
  if (rc) {
    /* not formed. A write without a reply may still land (a loaded store),
     * and the nodes present next tick may differ: forming this generation
     * again could publish a second layout under its number. It is ended
     * instead (the next tick), and the next one formed. */
    for (int i = 0; i < c->n_nodes; i++)
      if (c->nodes[i].role == ROLE_MEMBER || c->nodes[i].role == ROLE_SPARE)
        c->nodes[i].role = ROLE_NONE;
    c->unpublished = 1;
    return mt_wraperr(rc, "coordinator: publish generation %d", c->gen);
  }
  return 0;
}

/* After a generation ended without ending the job: the next one forms from
 * every node present (members, spares and new joiners alike). */
static void begin_forming(mt_coord *c) {
  c->gen++;
  c->state = G_FORMING;
  c->formable_since_ms = 0;
  c->loss[0] = 0;
  /* paused stays: a paused job that lost a node re-forms paused (form) */
  for (int i = 0; i < c->n_nodes; i++) {
    c->nodes[i].reported = 0; /* the lost and gone too (finished_and_gone) */
    if (c->nodes[i].role == ROLE_MEMBER || c->nodes[i].role == ROLE_SPARE)
      c->nodes[i].role = ROLE_NONE;
  }
}

/* job_failed: the job itself failed on a member (its data unreadable, a
 * checkpoint of another model...): a restart would fail the same way, and
 * the nodes exit 2 so that systemd does not start them again. A stop that
 * ends failed ends so too (restart_or_end). */
static int end_generation_as(mt_coord *c, int64_t now_ms, int final, int ok, int job_failed,
                             const char *reason) {
  char key[64];
  snprintf(key, sizeof key, "gen/%d/end", c->gen);
  int rc = set_json(c->o.store, key,
                    json_pack("{s:s, s:b, s:b, s:b}", "reason", reason, "final", final, "ok", ok,
                              "job_failed", job_failed));
  if (rc) return rc;
  mt_log(ok ? MT_LOG_INFO : MT_LOG_WARN, "coordinator: generation %d ended: %s", c->gen, reason);
  c->state = G_ENDED;
  c->end_ok = ok;
  snprintf(c->end_reason, sizeof c->end_reason, "%s", reason);
  c->ended_ms = now_ms;
  c->final_written = final;
  return 0;
}

static int end_generation(mt_coord *c, int64_t now_ms, int final, int ok, const char *reason) {
  return end_generation_as(c, now_ms, final, ok, 0, reason);
}

/* A member was lost, or its ranks failed on a peer (what says which): while
 * restarts are left, ends the generation without ending the job and forms
 * the next from the nodes left and the spares, whose ranks resume from the
 * newest committed checkpoint (torchrun's --max-restarts); otherwise, or when
 * an operator was stopping the job anyway, the job ends failed. A stop that
 * meets a lost node ends it as job_failed: the nodes exit 2, so that systemd
 * does not start them again and undo the stop (an operator stops a job
 * precisely when a node hangs). */
static int restart_or_end(mt_coord *c, int64_t now_ms, const char *what) {
  char why[900];
  /* a member stopped by a signal (systemctl stop, ^C) is a stop too */
  char key[64], *who = NULL;
  snprintf(key, sizeof key, "gen/%d/stop_signal", c->gen);
  if (get_now(c->o.store, key, &who) > 0) {
    snprintf(why, sizeof why,
             "%.600s; node %.100s had been told to stop by a signal, so the job ends here (exit "
             "2, not restarted: a new start resumes from the last committed checkpoint)",
             what, who);
    free(who);
    return end_generation_as(c, now_ms, 1, 0, 1, why);
  }
  for (int i = 0; i < c->n_ops; i++)
    if (!strcmp(c->ops[i].kind, "stop") && !strcmp(c->ops[i].state, "running")) {
      snprintf(why, sizeof why,
               "%.600s; the job was stopping, so it ends here (exit 2, not restarted: a new "
               "start resumes from the last committed checkpoint)",
               what);
      return end_generation_as(c, now_ms, 1, 0, 1, why);
    }
  /* the budget spent ends the job as job_failed too: its count lives in
   * this coordinator's memory, so nodes exiting 1 would be started again
   * by systemd into a new budget, and the job would fail round for ever */
  if (c->restarts >= c->o.max_restarts) {
    snprintf(why, sizeof why,
             "%.600s; not re-forming: the restart budget is spent (%d of %d restart(s) used, "
             "rendezvous.max_restarts); exit 2, not restarted: a new start resumes from the last "
             "committed checkpoint",
             what, c->restarts, c->o.max_restarts);
    return end_generation_as(c, now_ms, 1, 0, 1, why);
  }
  snprintf(why, sizeof why, "%.600s; re-forming from %s, restart %d of %d", what,
           c->o.has_checkpoint_dir ? "the last checkpoint"
                                   : "step 0 (the job has no checkpoint.dir)",
           c->restarts + 1, c->o.max_restarts);
  /* counted once the end is written: an end that fails is tried again */
  int rc = end_generation(c, now_ms, 0, 0, why);
  if (rc) return rc;
  c->restarts++;
  /* the orders of the ended generation cannot act any more */
  char failed[1000];
  snprintf(failed, sizeof failed, "the generation ended first: %s", why);
  for (int i = 0; i < c->n_ops; i++)
    if (op_pending(&c->ops[i])) op_done(&c->ops[i], 0, failed);
  c->resize_to = 0;
  c->resize_saved = 0;
  snprintf(c->failure, sizeof c->failure, "%s", what);
  begin_forming(c);
  c->restart_gen = c->gen, c->restart_time = wall_s(), c->restart_step = -1;
  snprintf(c->restart_reason, sizeof c->restart_reason, "%s", what);
  mt_msg_cut_whole(c->restart_reason, sizeof c->restart_reason); /* else no last_restart */
  c->reforming = 1;
  c->reform_since_ms = now_ms;
  mt_log_info("coordinator: forming generation %d from the nodes left and the spares", c->gen);
  return 0;
}

/* Re-forming after a failure found too few nodes for reform_timeout_ms. */
static int give_up_reforming(mt_coord *c, int64_t now_ms) {
  char names[400] = "";
  size_t len = 0;
  int n = 0, slots = 0;
  for (int i = 0; i < c->n_nodes; i++) {
    if (c->nodes[i].role != ROLE_NONE) continue;
    slots += c->nodes[i].slots;
    if (len < sizeof names - 80)
      len += (size_t)snprintf(names + len, sizeof names - len, "%s%s", n ? ", " : "",
                              c->nodes[i].d.name);
    n++;
  }
  char why[1200];
  int lo, hi;
  dp_bounds(c, &lo, &hi);
  snprintf(why, sizeof why,
           "cannot re-form after %.500s: pp %d x %s %d needs %d model slot(s) in whole nodes, "
           "the %d node(s) left (%s) hold %d, and no node joined within "
           "rendezvous.reform_timeout_s (%d s)",
           c->failure, c->o.pp, lo < c->o.dp_min ? "dp (as resized)" : "dp_min", lo, c->o.pp * lo,
           n, n ? names : "none", slots, c->o.reform_timeout_ms / 1000);
  c->reforming = 0;
  return end_generation(c, now_ms, 1, 0, why);
}

/* The reports of members that had none: gen/<g>/{done,failed,peer_failed}/
 * <name> of each in one batched read; a member's first kind present (in
 * that order) is its report. */
static int read_member_reports(mt_coord *c) {
  key_batch b;
  int rc = batch_init(&b, 3 * (size_t)c->n_nodes, "reports");
  for (int i = 0; i < c->n_nodes && !rc; i++) {
    const coord_node *nd = &c->nodes[i];
    if (nd->role != ROLE_MEMBER || nd->reported) continue;
    for (int f = MT_REPORT_DONE; f <= MT_REPORT_PEER; f++)
      batch_add(&b, i, "gen/%d/%s/%s", c->gen, report_kinds[f], nd->d.name);
  }
  if (!rc) rc = batch_read(c, &b);
  for (size_t k = 0; k < b.n && !rc; k++) { /* a member's three keys in kind order */
    coord_node *nd = &c->nodes[b.who[k]];
    if (!b.got[k] || nd->reported) continue;
    nd->reported = 1 + MT_REPORT_DONE + (int)(k % 3);
    snprintf(nd->report, sizeof nd->report, "%s", b.got[k]);
  }
  batch_free(&b);
  return rc;
}

/* Members' reports: all done ends the job well (a member lost or gone after
 * it reported done counts as done); a failure not explained by a
 * lost node within the heartbeat timeout (twice that while a silent member
 * may yet be found lost) ends the generation: a failure on a peer re-forms
 * it (restart_or_end), one on the job ends the job. */
static int read_reports(mt_coord *c, int64_t now_ms) {
  int members = 0, done = 0;
  coord_node *failed = NULL;
  char count_key[64];
  snprintf(count_key, sizeof count_key, "gen/%d/reports", c->gen);
  if (c->reports_gen != c->gen) /* a new generation's count: look at its first reading */
    c->reports_seen = -1, c->reports_gen = c->gen;
  int look = look_again(c, count_key, &c->reports_seen, &c->reports_look_ms, now_ms);
  if (look < 0) return look;
  if (look) {
    int rc = read_member_reports(c);
    if (rc) return rc;
  }
  for (int i = 0; i < c->n_nodes; i++) {
    coord_node *n = &c->nodes[i];
    if (finished_and_gone(n)) members++, done++;
    if (n->role != ROLE_MEMBER) continue;
    members++;
    if (n->reported == 1 + MT_REPORT_DONE) done++;
    /* the first failure on the job itself, else the first on a peer */
    if (n->reported == 1 + MT_REPORT_FAILED && (!failed || failed->reported != n->reported))
      failed = n;
    if (n->reported == 1 + MT_REPORT_PEER && !failed) failed = n;
  }
  if (members && done == members && c->resize_to && !c->resize_saved) {
    /* stopped for the resize: its checkpoint's word comes next (read_acted) */
    if (!c->first_failure_ms) c->first_failure_ms = now_ms;
    if (now_ms - c->first_failure_ms <= c->o.heartbeat_timeout_ms) return 0;
    return end_generation(c, now_ms, 1, 0,
                          "the members stopped for a resize, but its checkpoint "
                          "was never reported committed");
  }
  if (members && done == members && c->resize_to && c->resize_saved) {
    /* the members saved and stopped: the next generation resumes with the new width */
    char why[200];
    snprintf(why, sizeof why, "resize from dp %d to dp %d", c->dp, c->resize_to);
    int rc = end_generation(c, now_ms, 0, 1, why);
    if (rc) return rc;
    begin_forming(c);
    c->resize_forming_since_ms = now_ms;
    return 0;
  }
  if (members && done == members) {
    char why[600] = "";
    for (int i = 0; i < c->n_nodes; i++)
      if (c->nodes[i].role == ROLE_MEMBER || finished_and_gone(&c->nodes[i])) {
        snprintf(why, sizeof why, "%s", c->nodes[i].report);
        break;
      }
    return end_generation(c, now_ms, 1, 1, why);
  }
  if (failed) {
    if (!c->first_failure_ms) {
      /* the heartbeats as of now first: read at a cadence, a beat from
       * before the failure would otherwise be seen after it, and the dead
       * member it was the last of pass for alive */
      int rc = read_heartbeats(c, now_ms);
      if (rc) return rc;
      c->hb_read_ms = c->first_failure_ms = now_ms;
    }
    /* a member that neither reported nor heartbeat since the failure is
     * likely its cause, dead a moment before it: its loss, due within a
     * tick or two of this deadline, explains the failure and keeps it out of
     * the next generation (which would otherwise count it, wait for it and
     * spend a second restart on it) */
    int suspect = 0;
    for (int i = 0; i < c->n_nodes; i++)
      if (c->nodes[i].role == ROLE_MEMBER && !c->nodes[i].reported &&
          c->nodes[i].hb_changed_ms <= c->first_failure_ms)
        suspect = 1;
    int64_t waited = now_ms - c->first_failure_ms;
    if (waited > c->o.heartbeat_timeout_ms &&
        (!suspect || waited > 2 * (int64_t)c->o.heartbeat_timeout_ms)) {
      char why[800];
      snprintf(why, sizeof why, "node %s failed: %.600s", failed->d.name, failed->report);
      if (failed->reported == 1 + MT_REPORT_PEER) return restart_or_end(c, now_ms, why);
      return end_generation_as(c, now_ms, 1, 0, 1, why);
    }
  }
  return 0;
}

static int mt_coord_tick_membership(mt_coord *c, int64_t now_ms);

static double wall_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static const char *cluster_state(const mt_coord *c) {
  if (c->state == G_FORMING) return c->resize_to ? "resizing" : "forming";
  if (c->state == G_ENDED) return c->end_ok ? "stopped" : "failed";
  int pausing = 0;
  for (int i = 0; i < c->n_ops; i++) {
    const coord_op *o = &c->ops[i];
    if (!op_pending(o)) continue;
    if (!strcmp(o->kind, "stop")) return "stopping";
    if (!strcmp(o->kind, "resize")) return "resizing";
    if (!strcmp(o->kind, "pause")) pausing = 1;
  }
  for (int i = 0; i < c->n_nodes; i++)
    if ((c->nodes[i].role == ROLE_MEMBER && c->nodes[i].reported) ||
        finished_and_gone(&c->nodes[i]))
      return "stopping";
  if (c->paused) return "paused";
  return pausing ? "pausing" : "running";
}

/* The state the cluster shows: cluster_state's, but "checkpointing" for a
 * running job while a checkpoint order waits or a member node says it is
 * writing one (its own status, read at the status cadence). Orders are
 * decided on cluster_state's word: a save in progress is a running job. */
static const char *shown_state(const mt_coord *c) {
  const char *st = cluster_state(c);
  if (strcmp(st, "running")) return st;
  for (int i = 0; i < c->n_ops; i++)
    if (op_pending(&c->ops[i]) && !strcmp(c->ops[i].kind, "checkpoint")) return "checkpointing";
  for (int i = 0; i < c->n_nodes; i++) {
    if (c->nodes[i].role != ROLE_MEMBER) continue;
    json_t *own = json_object_get(c->node_status, c->nodes[i].d.name);
    const char *ns = own ? json_string_value(json_object_get(own, "state")) : NULL;
    if (ns && !strcmp(ns, "checkpointing")) return "checkpointing";
  }
  return st;
}

static json_t *op_to_json(const coord_op *o) {
  char id[32];
  snprintf(id, sizeof id, "op-%lld", (long long)o->id);
  json_t *args = json_object();
  if (!strcmp(o->kind, "resize")) json_object_set_new(args, "dp", json_integer(o->dp));
  return json_pack("{s:s, s:s, s:s, s:o, s:f, s:f, s:o, s:o, s:n}", "id", id, "kind", o->kind,
                   "state", o->state, "reason", o->reason[0] ? json_string(o->reason) : json_null(),
                   "created", o->created, "updated", o->updated, "step",
                   o->step >= 0 ? json_integer(o->step) : json_null(), "args", args, "progress");
}

/* The operations the coordinator keeps: every one still queued or running,
 * and of the finished ones the newest (cluster/status lists 200), so that
 * weeks of operations do not grow the table every tick scans. */
#define OPS_KEPT 256

/* A finished operation leaves the table: a key kept for it keeps its
 * final state, so that a retry of its request is told how it ended (not
 * the "running" it was told at acceptance). */
static void keep_final_op(mt_coord *c, const coord_op *o) {
  for (int k = 0; c->keys && k < MT_RDZV_IDEM_KEYS; k++) {
    json_t *op;
    if (!c->keys[k].key || c->keys[k].op_id != o->id || !(op = op_to_json(o))) continue;
    json_object_set_new(c->keys[k].resp, "op", op);
  }
}

static void drop_old_ops(mt_coord *c) {
  int finished = 0, out = 0;
  for (int i = 0; i < c->n_ops; i++) finished += !op_pending(&c->ops[i]);
  for (int i = 0; i < c->n_ops; i++) {
    if (!op_pending(&c->ops[i]) && finished > OPS_KEPT) {
      keep_final_op(c, &c->ops[i]);
      finished--;
      continue;
    }
    c->ops[out++] = c->ops[i];
  }
  c->n_ops = out;
}

static coord_op *new_op(mt_coord *c, const char *kind) {
  if (c->n_ops >= 2 * OPS_KEPT) drop_old_ops(c);
  if (c->n_ops == c->cap_ops) {
    int cap = c->cap_ops ? 2 * c->cap_ops : 16;
    coord_op *m = realloc(c->ops, (size_t)cap * sizeof *m);
    if (!m) return NULL;
    c->ops = m, c->cap_ops = cap;
  }
  coord_op *o = &c->ops[c->n_ops++];
  memset(o, 0, sizeof *o);
  o->id = ++c->op_ids;
  snprintf(o->kind, sizeof o->kind, "%s", kind);
  o->state = "queued";
  o->created = o->updated = wall_s();
  o->step = -1;
  return o;
}

static void op_done(coord_op *o, int ok, const char *reason) {
  o->state = ok ? "succeeded" : "failed";
  snprintf(o->reason, sizeof o->reason, "%.799s", reason ? reason : "");
  o->updated = wall_s();
}

/* The resize under way is over, failed (why): its operation says so, and
 * the coordinator forms generations by the job's bounds again. */
static void fail_resize(mt_coord *c, const char *why) {
  for (int i = 0; i < c->n_ops; i++)
    if (c->ops[i].id == c->resize_op && !strcmp(c->ops[i].state, "running"))
      op_done(&c->ops[i], 0, why);
  c->resize_to = 0;
  c->resize_saved = 0;
}

/* A stop came while a resize was under way: the stop wins. Before the
 * members acted on the resize its order is replaced by the stop's (the
 * ranks see only the newest order); after they acted, they are stopping
 * with its checkpoint committed, and the generation ends as a stop instead
 * of re-forming. Either way the resize is over, failed. */
static void supersede_resize(mt_coord *c) {
  fail_resize(c, "superseded by a stop: the job stops instead of re-forming");
}

/* The order that has not acted yet, if any: one at a time, each must act
 * before the next. A resize stays pending until its generation forms. A
 * stop is left out: the job's state, stopping, says more. */
static const coord_op *pending_order(const mt_coord *c) {
  for (int i = 0; i < c->n_ops; i++) {
    const coord_op *o = &c->ops[i];
    if (strcmp(o->state, "running") || !strcmp(o->kind, "stop")) continue;
    if (o->order_seq || (!strcmp(o->kind, "resize") && o->id == c->resize_op && c->resize_to))
      return o;
  }
  return NULL;
}

/* Decides one request: why it cannot be done now (409), or NULL and the
 * order is issued. */
static const char *decide(mt_coord *c, const char *kind, json_t *args, coord_op **op, char *why,
                          size_t size) {
  const char *st = cluster_state(c);
  const coord_op *pending;
  int kind_code = mt_order_kind_code(kind);
  /* 64-bit: a dp of 2^30 or 2^32 + 2 is refused as too wide, not wrapped */
  json_int_t want = json_integer_value(json_object_get(args, "dp"));
  if (!kind_code) {
    snprintf(why, size,
             "%s is not available in this version: checkpoints and resize arrive with "
             "the checkpoint issue",
             kind);
    return why;
  }
  if (c->state == G_ENDED) {
    snprintf(why, size, "cannot %s: the job has ended (%.500s)", kind, c->end_reason);
    return why;
  }
  if (kind_code == MT_ORDER_KIND_STOP) {
    if (!strcmp(st, "stopping")) {
      snprintf(why, size, "cannot stop: the job is already stopping");
      return why;
    }
    if (c->resize_to) supersede_resize(c);
    if (c->state == G_FORMING) { /* nothing runs: the job ends here */
      int rc = mt_coord_finish(c, 1, "stopped by an operator before a generation formed");
      if (rc) {
        snprintf(why, size, "cannot stop: writing the job's end failed: %.400s", mt_errmsg());
        return why;
      }
      if (!(*op = new_op(c, kind))) return "out of memory";
      op_done(*op, 1, NULL);
      return NULL;
    }
  } else if ((pending = pending_order(c))) {
    /* before the state: a pause just after a resume is told the resume has
     * not acted yet, not that the job is paused */
    char forming[160] = "";
    if (c->state == G_FORMING && c->resize_to)
      snprintf(forming, sizeof forming, " (the cluster is re-forming as generation %d with dp %d)",
               c->gen, c->resize_to);
    snprintf(why, size, "cannot %s: op-%lld (%s) has not taken effect yet%s; retry when it has",
             kind, (long long)pending->id, pending->kind, forming);
    return why;
  } else if (c->state == G_FORMING) {
    /* a resize is what an operator reaches for when too few nodes came:
     * say what would let the cluster form instead */
    char hint[200] = "";
    if (kind_code == MT_ORDER_KIND_RESIZE && c->waiting[0])
      snprintf(hint, sizeof hint,
               "; a resize acts on a running job: to form with fewer replicas lower "
               "parallel.dp_min in the job file and restart the coordinator, or start more nodes");
    /* (a control plane's detail holds 511 bytes: what the status's reason
     * says at length is cut here) */
    if (c->gen > 1)
      snprintf(why, size,
               "cannot %s: the cluster is re-forming as generation %d after %.240s; retry once it "
               "runs%s",
               kind, c->gen, c->reforming ? c->failure : c->end_reason, hint);
    else
      snprintf(why, size,
               "cannot %s: no generation is running yet (the cluster is forming%s%.200s)%s", kind,
               c->waiting[0] ? ": " : "", c->waiting, hint);
    return why;
  } else if (kind_code == MT_ORDER_KIND_PAUSE && strcmp(st, "running")) {
    snprintf(why, size, "cannot pause: the job is %s, not running", st);
    return why;
  } else if (kind_code == MT_ORDER_KIND_RESUME && strcmp(st, "paused")) {
    snprintf(why, size, "cannot resume: the job is %s, not paused", st);
    return why;
  } else if (kind_code == MT_ORDER_KIND_RESIZE) {
    int slots = 0;
    for (int i = 0; i < c->n_nodes; i++)
      if (c->nodes[i].role == ROLE_MEMBER || c->nodes[i].role == ROLE_SPARE ||
          c->nodes[i].role == ROLE_NONE)
        slots += c->nodes[i].slots;
    long long w = (long long)want;
    if (!strcmp(st, "paused"))
      snprintf(why, size,
               "cannot resize: the job is paused; resume it first (mtnlgctl resume), then resize");
    else if (strcmp(st, "running"))
      snprintf(why, size, "cannot resize: the job is %s, not running", st);
    else if (want < 1)
      snprintf(why, size, "cannot resize: dp must be at least 1");
    else if (want == c->dp)
      snprintf(why, size, "cannot resize: the job already runs with dp %lld", w);
    else if (want <= slots && !batch_splits(c, (int)want) && c->o.interleaved &&
             batch_quantum(c) % (c->o.micro_batch * (int)want) == 0)
      snprintf(why, size,
               "cannot resize to dp %lld: the interleaved schedule (parallel.virtual_stages) "
               "needs each replica's micro-batches, %d / (%d x %lld), to be a multiple of pp %d",
               w, batch_quantum(c), c->o.micro_batch, w, c->o.pp);
    else if (want <= slots && batch_quantum(c) % (c->o.micro_batch * (int)want))
      snprintf(why, size,
               batch_quantum(c) != c->o.global_batch
                   ? "cannot resize to dp %lld: the batches of its ramp-up, multiples of %d, do "
                     "not divide into micro-batches of %d over %lld replicas"
                   : "cannot resize to dp %lld: the global batch %d does not divide into "
                     "micro-batches of %d over %lld replicas",
               w, batch_quantum(c), c->o.micro_batch, w);
    else if (slots / c->o.pp < want)
      snprintf(why, size,
               "cannot resize to dp %lld: the %d model slot(s) present (members and spares) make "
               "at most %d replica(s) of %d stage(s)",
               w, slots, slots / c->o.pp, c->o.pp);
    else if (!fills(c, c->o.pp * (int)want))
      snprintf(why, size,
               "cannot resize to dp %lld: the nodes present (members and spares), whole, do not "
               "make exactly %lld slot(s)",
               w, (long long)c->o.pp * w);
    else if (!c->o.has_checkpoint_dir)
      snprintf(why, size, "cannot resize: the job has no checkpoint.dir to carry its state over");
    else
      goto ok;
    return why;
  ok:;
  } else if (kind_code == MT_ORDER_KIND_CHECKPOINT && !c->o.has_checkpoint_dir) {
    snprintf(why, size,
             "cannot checkpoint: the job has no checkpoint.dir (and no node sets "
             "paths.checkpoint_dir)");
    return why;
  } else if (kind_code == MT_ORDER_KIND_CHECKPOINT && strcmp(st, "running") &&
             strcmp(st, "paused")) {
    snprintf(why, size, "cannot checkpoint: the job is %s", st);
    return why;
  }
  if (!(*op = new_op(c, kind))) return "out of memory";
  if (mt_coord_order(c, kind)) {
    op_done(*op, 0, mt_errmsg());
    return NULL;
  }
  (*op)->order_seq = c->order_seq;
  (*op)->state = "running";
  if (kind_code == MT_ORDER_KIND_RESIZE) {
    (*op)->dp = (int)want; /* at most the slots present */
    c->resize_to = (int)want;
    c->resize_op = (*op)->id;
    c->resize_saved = 0;
  }
  return NULL;
}

/* An Idempotency-Key as the control plane takes it: 1 to
 * MT_RDZV_IDEM_KEY_MAX printable ASCII characters (another process may
 * write any JSON into the store). */
static int idem_key_ok(const char *key) {
  size_t n = key ? strlen(key) : 0;
  if (n < 1 || n > MT_RDZV_IDEM_KEY_MAX) return 0;
  for (; *key; key++)
    if ((unsigned char)*key < 0x20 || (unsigned char)*key > 0x7e) return 0;
  return 1;
}

static op_key *find_key(mt_coord *c, const char *key) {
  for (int i = 0; c->keys && i < MT_RDZV_IDEM_KEYS; i++)
    if (c->keys[i].key && !strcmp(c->keys[i].key, key)) return &c->keys[i];
  return NULL;
}

/* Keeps key (malloc'd) with args and resp (references), all taken, in the
 * oldest slot once all are taken. The copies are made before the request
 * is decided (take_op_request), so that once it orders, keeping its key
 * cannot fail: nothing is allocated here but the ring, made then too. */
static void remember_key(mt_coord *c, char *key, const char *kind, json_t *args, json_t *resp,
                         const coord_op *op) {
  op_key *k = &c->keys[c->next_key];
  free(k->key), json_decref(k->args), json_decref(k->resp);
  k->key = key, k->args = args, k->resp = resp;
  snprintf(k->kind, sizeof k->kind, "%s", kind);
  k->op_id = op ? op->id : 0;
  c->next_key = (c->next_key + 1) % MT_RDZV_IDEM_KEYS;
}

/* The answer to a request whose key k was answered before: the same
 * answer, marked replayed (an operation as it stands now while the table
 * keeps it, as it ended once it left: keep_final_op), or 422 when the key
 * came with another request. */
static json_t *replay_key(mt_coord *c, const op_key *k, const char *kind, json_t *args) {
  if (!kind || strcmp(kind, k->kind) || !json_equal(args, k->args)) {
    char *was = json_dumps(k->args, JSON_COMPACT | JSON_SORT_KEYS);
    char detail[512];
    snprintf(detail, sizeof detail,
             "Idempotency-Key \"%.200s\" was used for another request (%s %s); send this one "
             "with a new key",
             k->key, k->kind, was ? was : "{}");
    free(was);
    return json_pack("{s:i, s:s}", "status", 422, "detail", detail);
  }
  json_t *resp = json_deep_copy(k->resp);
  for (int i = 0; resp && k->op_id && i < c->n_ops; i++)
    if (c->ops[i].id == k->op_id) json_object_set_new(resp, "op", op_to_json(&c->ops[i]));
  if (resp) json_object_set_new(resp, "replayed", json_true());
  return resp;
}

/* New requests from any node's control plane, answered through the store.
 * Each is claimed first (ops/claim/<n>, an atomic add): a node that gave up
 * waiting claims it too, and whoever comes first decides whether it is
 * acted on, so a node never answers 503 for an order that is then carried
 * out, and a request whose node gave up never blocks the ones after it.
 * As take_join: 1 decided or passed over, 0 not written yet, < 0 failed. */
static int take_op_request(mt_coord *c, int64_t n, int64_t now_ms, int64_t since_ms) {
  char key[64], claim_key[64];
  int64_t claims;
  int rc;
  snprintf(key, sizeof key, "ops/req/%lld", (long long)n);
  snprintf(claim_key, sizeof claim_key, "ops/claim/%lld", (long long)n);
  json_t *req = get_json_now(c->o.store, key, &rc);
  if (rc == MT_ECORRUPT) { /* not JSON: answered as a request naming nothing */
    mt_log_warn("coordinator: request %lld: %s", (long long)n, mt_errmsg());
    req = json_object(), rc = 1;
  }
  if (rc < 0) return rc;
  if (rc == 0) { /* numbered, not written yet: later, unless its node gave up on it */
    if ((rc = mt_store_add(c->o.store, claim_key, 0, &claims))) return rc;
    if (claims) return 1;
    if (now_ms - since_ms < UNWRITTEN_GAP_MS) return 0;
    if ((rc = mt_store_add(c->o.store, claim_key, 1, &claims))) return rc;
    mt_log_warn("coordinator: request %lld was numbered but never written in %d s; passed over",
                (long long)n, UNWRITTEN_GAP_MS / 1000);
    return 1;
  }
  if ((rc = mt_store_add(c->o.store, claim_key, 1, &claims))) {
    json_decref(req);
    return rc;
  }
  if (claims > 1) { /* its node stopped waiting first and answered 503 */
    json_decref(req);
    return 1;
  }
  const char *kind = json_string_value(json_object_get(req, "kind"));
  json_t *args = json_object_get(req, "args"), *none = json_object();
  if (!json_is_object(args)) args = none;
  json_t *key_value = json_object_get(req, "idempotency_key");
  const char *idem = json_string_value(key_value);
  const op_key *seen = idem_key_ok(idem) ? find_key(c, idem) : NULL;
  coord_op *op = NULL;
  char why[600];
  const char *no = NULL;
  json_t *resp;
  if (key_value && !idem_key_ok(idem)) {
    char bad[96];
    snprintf(bad, sizeof bad,
             "the request's Idempotency-Key is not 1 to %d printable ASCII characters",
             MT_RDZV_IDEM_KEY_MAX);
    resp = json_pack("{s:i, s:s}", "status", 400, "detail", bad);
  } else if (seen) { /* a retry: told what it was told, nothing ordered */
    resp = replay_key(c, seen, kind, args);
    mt_log_info("coordinator: request %lld repeats Idempotency-Key \"%.64s\": answered %s",
                (long long)n, idem,
                json_integer_value(json_object_get(resp, "status")) == 422 ? "422 (another request)"
                                                                           : "as before");
  } else {
    /* what keeping the key takes, had before deciding: once the request
     * orders, its key must be kept, or a retry would order again */
    char *key_copy = NULL;
    json_t *args_copy = NULL;
    if (idem && !c->keys) c->keys = calloc(MT_RDZV_IDEM_KEYS, sizeof *c->keys);
    if (idem && c->keys) key_copy = strdup(idem), args_copy = json_deep_copy(args);
    if (idem && (!key_copy || !args_copy)) { /* ordered nothing: a 500, not kept */
      mt_log_warn("coordinator: request %lld (Idempotency-Key \"%.64s\"): out of memory to keep "
                  "its key; answered 500",
                  (long long)n, idem);
      no = "out of memory";
    } else
      no = kind ? decide(c, kind, args, &op, why, sizeof why) : "the request names no operation";
    resp = no ? json_pack("{s:i, s:s}", "status",
                          !strncmp(no, "cannot", 6)      ? 409
                          : !strcmp(no, "out of memory") ? 500
                                                         : 501,
                          "detail", no)
              : json_pack("{s:i, s:o}", "status", 202, "op", op_to_json(op));
    if (!no) mt_log_info("coordinator: operation op-%lld (%s) accepted", (long long)op->id, kind);
    /* answers and refusals alike; not a 5xx, which ordered nothing and
     * that a retry may get past */
    if (idem && resp && json_integer_value(json_object_get(resp, "status")) < 500) {
      remember_key(c, key_copy, kind, args_copy, json_incref(resp), op);
      key_copy = NULL, args_copy = NULL; /* kept */
    } else if (idem && !resp)
      mt_log_warn("coordinator: request %lld (%s, Idempotency-Key \"%.64s\"): out of memory "
                  "for its answer; the key is not kept, and a retry is decided again",
                  (long long)n, kind ? kind : "?", idem);
    free(key_copy), json_decref(args_copy);
  }
  json_decref(none);
  json_decref(req);
  snprintf(key, sizeof key, "ops/resp/%lld", (long long)n);
  if ((rc = set_json(c->o.store, key, resp))) return rc;
  return 1;
}

static int read_op_requests(mt_coord *c, int64_t now_ms) {
  int64_t last;
  int rc = mt_store_add(c->o.store, "ops/seq", 0, &last);
  if (rc) return rc;
  return take_numbered(c, &c->reqs_gaps, &c->next_op_req, last, take_op_request, now_ms);
}

/* Running orders: succeeded once world rank 0's node says where they acted. */
static int read_acted(mt_coord *c) {
  for (int i = 0; i < c->n_ops; i++) {
    coord_op *o = &c->ops[i];
    if (strcmp(o->state, "running") || !o->order_seq) continue;
    if (c->state == G_ENDED) {
      /* its word may have come just before the end: say where it acted */
      char key[64];
      int rc;
      snprintf(key, sizeof key, "gen/%d/acted/%lld", c->gen, (long long)o->order_seq);
      json_t *acted = get_json_now(c->o.store, key, &rc);
      if (acted) o->step = json_integer_value(json_object_get(acted, "step"));
      json_decref(acted);
      if (!strcmp(o->kind, "stop") && c->end_ok) {
        op_done(o, 1, NULL);
      } else {
        char why[900];
        snprintf(why, sizeof why, "the generation ended first: %.800s", c->end_reason);
        op_done(o, 0, why);
      }
      continue;
    }
    char key[64];
    snprintf(key, sizeof key, "gen/%d/acted/%lld", c->gen, (long long)o->order_seq);
    int rc;
    json_t *acted = get_json_now(c->o.store, key, &rc);
    if (rc == MT_ECORRUPT) /* not JSON: a word that says nothing, failed */
      acted = json_pack("{s:b, s:s}", "ok", 0, "reason", mt_errmsg()), rc = 1;
    if (rc < 0) return rc;
    if (!acted) continue;
    o->step = json_integer_value(json_object_get(acted, "step"));
    int ok = json_is_true(json_object_get(acted, "ok"));
    char why[800];
    snprintf(why, sizeof why, "%s", json_string_value(json_object_get(acted, "reason")) ?: "");
    json_decref(acted);
    if (!ok) {
      if (!strcmp(o->kind, "resize")) c->resize_to = 0;
      op_done(o, 0, why);
      mt_log_warn("coordinator: operation op-%lld (%s) failed after step %lld: %s",
                  (long long)o->id, o->kind, (long long)o->step, why);
      continue;
    }
    if (!strcmp(o->kind, "pause")) c->paused = 1;
    if (!strcmp(o->kind, "resume")) c->paused = 0;
    if (!strcmp(o->kind, "resize")) { /* done when the next generation forms */
      c->resize_saved = 1;
      o->order_seq = 0;
      o->updated = wall_s();
      mt_log_info("coordinator: resize op-%lld: checkpoint of step %lld committed; re-forming "
                  "with dp %d",
                  (long long)o->id, (long long)o->step, c->resize_to);
      continue;
    }
    if (!strcmp(o->kind, "stop")) { /* done when the members report */
      o->updated = wall_s();
      o->order_seq = 0;
      o->state = "running";
      continue;
    }
    op_done(o, 1, NULL);
    mt_log_info("coordinator: operation op-%lld (%s) took effect after step %lld", (long long)o->id,
                o->kind, (long long)o->step);
  }
  /* a stop that acted succeeds when the job ends */
  if (c->state == G_ENDED)
    for (int i = 0; i < c->n_ops; i++)
      if (!strcmp(c->ops[i].state, "running") && !strcmp(c->ops[i].kind, "stop"))
        op_done(&c->ops[i], c->end_ok, c->end_ok ? NULL : c->end_reason);
  return 0;
}

/* node/<name>/status of every node not lost or gone into c->node_status,
 * in one batched read. */
static int read_node_status(mt_coord *c) {
  key_batch b;
  int rc = batch_init(&b, (size_t)c->n_nodes, "statuses");
  for (int i = 0; i < c->n_nodes && !rc; i++) {
    const coord_node *nd = &c->nodes[i];
    if (nd->role != ROLE_LOST && nd->role != ROLE_LEFT)
      batch_add(&b, i, "node/%s/status", nd->d.name);
  }
  if (!rc) rc = batch_read(c, &b);
  for (size_t k = 0; k < b.n && !rc; k++) {
    coord_node *nd = &c->nodes[b.who[k]];
    if (!b.got[k]) continue;
    json_error_t e;
    json_t *j = json_loads(b.got[k], 0, &e);
    if (!j) { /* not JSON (another process wrote it): that node's line only */
      if (!nd->status_bad++) mt_log_warn("coordinator: %s: bad JSON: %s", b.keys[k], e.text);
      continue;
    }
    json_object_set_new(c->node_status, nd->d.name, j);
  }
  batch_free(&b);
  return rc;
}

/* The cluster's last save, from what the nodes say of their own: the
 * newest step any node saved, failed if a node's save of it failed (the
 * ranks agree on a save's outcome and its error), with the most failures a
 * node counted; null before any. A spare's status shows it. */
static json_t *last_save(const mt_coord *c) {
  json_t *best = NULL;
  int64_t step = 0, failures = 0;
  for (int i = 0; i < c->n_nodes; i++) {
    json_t *own = json_object_get(json_object_get(c->node_status, c->nodes[i].d.name), "last_save");
    json_t *s = json_object_get(own, "step"), *f = json_object_get(own, "failures");
    if (!json_is_integer(s) || !json_is_integer(f)) continue;
    if (json_integer_value(f) > failures) failures = json_integer_value(f);
    int newer = json_integer_value(s) > step;
    if (newer || (json_integer_value(s) == step && json_is_true(json_object_get(own, "failed"))))
      best = own, step = json_integer_value(s);
  }
  if (!best) return json_null();
  const json_t *err = json_object_get(best, "error");
  int failed = json_is_true(json_object_get(best, "failed"));
  return json_pack("{s:I, s:b, s:I, s:o}", "step", (json_int_t)step, "failed", failed, "failures",
                   (json_int_t)failures, "error",
                   failed && json_is_string(err) ? json_string(json_string_value(err))
                                                 : json_null());
}

/* cluster/status: what every node's control plane shows of the cluster. */
static int publish_status(mt_coord *c, int64_t now_ms) {
  /* at the rate of the nodes' status (every node reads it at its heartbeats,
   * and it holds a line per node: hundreds of nodes reading it every tick
   * moved megabytes a second through the store) */
  const char *state = cluster_state(c);
  uint64_t sig = 1469598103934665603ull; /* what a change publishes at once */
  int64_t parts[] = {c->gen,
                     c->dp,
                     c->restarts,
                     c->op_ids,
                     c->n_nodes,
                     c->restart_step,
                     (int64_t)(uintptr_t)state};
  for (size_t k = 0; k < sizeof parts / sizeof *parts; k++)
    sig = (sig ^ (uint64_t)parts[k]) * 1099511628211ull;
  for (int i = 0; i < c->n_ops; i++)
    sig = (sig ^ (uint64_t)(uintptr_t)c->ops[i].state) * 1099511628211ull;
  for (int i = 0; i < c->n_nodes; i++) sig = (sig ^ (uint64_t)c->nodes[i].role) * 1099511628211ull;
  if (c->status_ms && sig == c->status_sig && now_ms - c->status_ms < c->o.heartbeat_timeout_ms / 6)
    return 0;
  if (now_ms - c->node_status_ms >= c->o.heartbeat_timeout_ms / 6 || !c->node_status_ms) {
    c->node_status_ms = now_ms;
    int rc = read_node_status(c);
    if (rc) return rc;
  }
  int tp = c->o.tp, dp = c->dp ? c->dp : c->o.dp_min;
  json_t *nodes = json_array();
  /* the step the restarted generation resumed from, as a member's own
   * status says once its ranks loaded the checkpoint */
  for (int i = 0; i < c->n_nodes && c->restart_gen == c->gen && c->restart_step < 0; i++) {
    json_t *own = json_object_get(c->node_status, c->nodes[i].d.name);
    json_t *step = json_object_get(own, "resumed_step");
    if (c->nodes[i].role == ROLE_MEMBER && json_is_integer(step) &&
        json_integer_value(json_object_get(own, "generation")) == c->gen)
      c->restart_step = json_integer_value(step);
  }
  for (int i = 0; i < c->n_nodes; i++) {
    const coord_node *n = &c->nodes[i];
    json_t *devs = json_array(), *stages = json_array(), *replicas = json_array();
    for (int k = 0; k < n->d.n_devices; k++)
      json_array_append_new(devs, json_string(n->d.devices[k]));
    json_t *ranks = json_array(); /* every rank the node holds; [] when it holds none */
    if (n->role == ROLE_MEMBER) {
      for (int r = n->rank_begin; r < n->rank_end; r++)
        json_array_append_new(ranks, json_integer(r));
      int last_stage = -1, seen[4096] = {0};
      for (int r = n->rank_begin; r < n->rank_end; r += tp) {
        int stage = r / (tp * dp), replica = r / tp % dp;
        if (stage != last_stage)
          json_array_append_new(stages, json_integer(stage)), last_stage = stage;
        if (replica < 4096 && !seen[replica]++)
          json_array_append_new(replicas, json_integer(replica));
      }
    }
    /* what a lost or departed node last said of itself is stale: its state is its role */
    json_t *own = n->role == ROLE_LOST || n->role == ROLE_LEFT
                      ? NULL
                      : json_object_get(c->node_status, n->d.name);
    json_t *node = json_pack(
        "{s:s, s:s, s:s, s:o, s:o, s:o, s:o, s:f, s:s}", "name", n->d.name, "host", n->d.host,
        "role",
        !strcmp(n->d.name, c->o.coordinator_name) && n->role != ROLE_LOST ? "coordinator"
        : n->role == ROLE_NONE                                            ? "spare"
                                                                          : role_names[n->role],
        "devices", devs, "ranks", ranks, "stages", stages, "replicas", replicas, "heartbeat_age_s",
        (now_ms - n->hb_changed_ms) / 1000.0, "control_url", n->d.control_url);
    json_object_set_new(node, "member", json_boolean(n->role == ROLE_MEMBER));
    json_object_set_new(node, "state",
                        own && json_object_get(own, "state")
                            ? json_incref(json_object_get(own, "state"))
                            : json_string(role_names[n->role]));
    json_t *mem = json_object_get(c->node_status, n->d.name);
    mem = mem ? json_object_get(mem, "memory_bytes") : NULL; /* the last known, even when lost */
    json_object_set(node, "memory_bytes", mem ? mem : json_null());
    json_array_append_new(nodes, node);
  }
  /* the newest 200 operations (and any still running) */
  json_t *ops = json_array();
  for (int i = 0; i < c->n_ops; i++)
    if (i >= c->n_ops - 200 || !strcmp(c->ops[i].state, "running"))
      json_array_append_new(ops, op_to_json(&c->ops[i]));
  /* the reason: why the job ended, or why the cluster re-forms, and what
   * a generation forming waits for (re-forming: until when) */
  int why = c->end_reason[0] && (c->state == G_ENDED || c->reforming);
  int waits = c->state == G_FORMING && c->waiting[0];
  char both[sizeof c->end_reason + sizeof c->waiting + 80];
  if (why && waits && c->reforming)
    snprintf(both, sizeof both, "%s; %s, for up to %lld s more (rendezvous.reform_timeout_s)",
             c->end_reason, c->waiting,
             (long long)(c->reform_since_ms + c->o.reform_timeout_ms > now_ms
                             ? (c->reform_since_ms + c->o.reform_timeout_ms - now_ms + 999) / 1000
                             : 0));
  const char *reason = why && waits && c->reforming ? both
                       : why                        ? c->end_reason
                       : waits                      ? c->waiting
                                                    : NULL;
  json_t *st = json_pack("{s:i, s:s, s:o, s:s, s:o, s:o, s:i, s:i}", "generation", c->gen, "state",
                         shown_state(c), "reason", reason ? json_string(reason) : json_null(),
                         "coordinator", c->o.coordinator_name, "nodes", nodes, "operations", ops,
                         "dp", dp, "restarts", c->restarts);
  json_object_set_new(
      st, "last_restart",
      c->restart_gen ? json_pack("{s:i, s:s, s:o, s:f}", "generation", c->restart_gen, "reason",
                                 c->restart_reason, "resumed_from_step",
                                 c->restart_step >= 0 ? json_integer(c->restart_step) : json_null(),
                                 "time", c->restart_time)
                     : json_null());
  json_object_set_new(st, "last_save", last_save(c));
  int rc = set_json(c->o.store, "cluster/status", st);
  if (!rc) c->status_ms = now_ms, c->status_sig = sig; /* a failed write is tried next tick */
  return rc;
}

int mt_coord_tick(mt_coord *c, int64_t now_ms) {
  /* elected after a coordinator was lost, with the budget spent: the job
   * ends here, as restart_or_end ends it (exit 2: a new start resumes) */
  if (c->first_restart && c->restarts > c->o.max_restarts && c->state != G_ENDED) {
    char why[900];
    snprintf(why, sizeof why,
             "%.600s; not re-forming: the restart budget is spent (%d of %d restart(s) used, "
             "rendezvous.max_restarts); exit 2, not restarted: a new start resumes from the last "
             "committed checkpoint",
             c->restart_reason, c->restarts - 1, c->o.max_restarts);
    c->first_restart = 0;
    int rc = end_generation_as(c, now_ms, 1, 0, 1, why);
    if (rc) c->first_restart = 1; /* tried again next tick */
    return rc;
  }
  int rc = mt_coord_tick_membership(c, now_ms);
  if (!rc) rc = read_op_requests(c, now_ms);
  if (!rc) rc = read_acted(c);
  if (!rc) rc = publish_status(c, now_ms);
  return rc;
}

static int mt_coord_tick_membership(mt_coord *c, int64_t now_ms) {
  int rc = read_joins(c, now_ms);
  if (rc || c->state == G_ENDED) return rc; /* late joiners get a verdict, and see the end */
  /* every node's counter is a store round trip: while a generation runs
   * with no failure reported, read them at a tenth of the timeout (600 ms
   * by default), not every tick, which at 560 nodes would keep the
   * coordinator's loop busy with them alone. Otherwise every tick: after a
   * failure report, read_reports waits for a silent member's loss by the
   * tick, and forming waits for nodes. */
  int steady = c->state == G_RUNNING && !c->first_failure_ms;
  int cadence = c->o.heartbeat_timeout_ms / 10 > 100 ? c->o.heartbeat_timeout_ms / 10 : 100;
  if (!steady || !c->hb_read_ms || now_ms - c->hb_read_ms >= cadence) {
    if ((rc = read_heartbeats(c, now_ms))) return rc;
    c->hb_read_ms = now_ms;
  }
  if (c->state == G_RUNNING) {
    if (c->loss[0]) {
      char why[sizeof c->loss];
      snprintf(why, sizeof why, "%s", c->loss);
      return restart_or_end(c, now_ms, why); /* clears c->loss once the end is written */
    }
    return read_reports(c, now_ms);
  }
  /* forming */
  if (c->unpublished) { /* see form: end it, form the next (not a restart) */
    char why[200];
    snprintf(why, sizeof why, "generation %d was not published whole (a store write failed)",
             c->gen);
    if ((rc = end_generation(c, now_ms, 0, 0, why))) return rc;
    c->unpublished = 0;
    int reforming = c->reforming;
    int64_t since = c->reform_since_ms;
    begin_forming(c);
    c->reforming = reforming, c->reform_since_ms = since;
    mt_log_info("coordinator: forming generation %d instead", c->gen);
  }
  int slots = 0;
  for (int i = 0; i < c->n_nodes; i++)
    if (c->nodes[i].role == ROLE_NONE) slots += c->nodes[i].slots;
  int dp = pick_dp(c, slots);
  if (!dp && c->resize_to && now_ms - c->resize_forming_since_ms > c->o.reform_timeout_ms) {
    /* the nodes for the new width went away after the resize was accepted */
    char why[300];
    int to = c->resize_to;
    c->resize_to = 0; /* what the job allows without the resize */
    int fallback = pick_dp(c, slots);
    c->resize_to = to;
    snprintf(why, sizeof why, "no dp %d could be formed from the nodes present within %d s; %s", to,
             c->o.reform_timeout_ms / 1000,
             fallback ? "forming the widest dp they allow instead"
                      : "nor any dp the job allows: the job ends");
    mt_log_warn("coordinator: resize: %s", why);
    fail_resize(c, why);
    dp = pick_dp(c, slots);
    if (!dp) {
      /* too few for any width the job allows: bounded as a re-form after a
       * failure is, from when this generation began forming (its deadline
       * has passed: give_up_reforming below ends the job) */
      snprintf(c->failure, sizeof c->failure,
               "a resize from dp %d to dp %d whose nodes went away before its generation formed",
               c->dp, to);
      c->reforming = 1;
      c->reform_since_ms = c->resize_forming_since_ms;
    }
  }
  if (!dp) {
    c->formable_since_ms = 0;
    note_waiting(c, slots);
  } else {
    c->waiting[0] = 0;
    int lo, hi;
    dp_bounds(c, &lo, &hi);
    if (!c->formable_since_ms) {
      c->formable_since_ms = now_ms;
      mt_log_info("coordinator: %d slot(s) joined, enough for dp %d; last call for more (up to "
                  "dp %d%s) for %d ms",
                  slots, dp, hi, !c->resize_to && c->dp_resized ? ", as resized" : "",
                  c->o.last_call_ms);
    }
    if (dp < hi && now_ms - c->formable_since_ms < c->o.last_call_ms) return 0;
    if ((rc = form(c, dp)) || c->state != G_FORMING) return rc;
  }
  /* too few nodes after a failure: wait a bounded time for more to join */
  if (c->reforming && now_ms - c->reform_since_ms > c->o.reform_timeout_ms)
    return give_up_reforming(c, now_ms);
  return 0;
}

int mt_coord_order(mt_coord *c, const char *kind) {
  if (c->state != G_RUNNING)
    return mt_seterr(MT_EINVAL, "coordinator: no generation is running to %s", kind);
  return publish_order(c, kind);
}

int mt_coord_finish(mt_coord *c, int ok, const char *reason) {
  if (c->final_written) return 0;
  return end_generation(c, mt_mono_ms(), 1, ok, reason);
}

int mt_coord_drained(mt_coord *c, int64_t now_ms, int timeout_ms) {
  if (!c->final_written) return 0;
  if (now_ms - c->ended_ms > timeout_ms) return 1;
  /* a job stopped through the control plane: its stop operation ends with the
   * job, so keep answering a while for whoever polls it (mtnlgctl stop --wait) */
  for (int i = 0; i < c->n_ops; i++)
    if (!strcmp(c->ops[i].kind, "stop") && now_ms - c->ended_ms < STOP_LINGER_MS) return 0;
  for (int i = 0; i < c->n_nodes; i++) {
    coord_node *n = &c->nodes[i];
    if (n->role == ROLE_LOST || n->role == ROLE_LEFT) continue;
    char key[128];
    snprintf(key, sizeof key, "nodes/%s/left", n->d.name);
    int left = mt_store_check(c->o.store, key);
    if (left == 0) return 0;
    if (left > 0) n->role = ROLE_LEFT;
  }
  return 1;
}

int mt_coord_snapshot(mt_coord *c, int64_t now_ms, int *gen, const char **state,
                      mt_coord_node_info *nodes, int max) {
  static const char *const states[] = {"forming", "running", "ended"};
  *gen = c->gen;
  *state = states[c->state];
  for (int i = 0; i < c->n_nodes && i < max; i++) {
    const coord_node *n = &c->nodes[i];
    mt_coord_node_info *o = &nodes[i];
    memset(o, 0, sizeof *o);
    snprintf(o->name, sizeof o->name, "%s", n->d.name);
    snprintf(o->host, sizeof o->host, "%s", n->d.host);
    snprintf(o->control_url, sizeof o->control_url, "%s", n->d.control_url);
    o->role = role_names[n->role];
    o->rank_begin = n->rank_begin, o->rank_end = n->rank_end;
    o->n_devices = n->d.n_devices;
    o->heartbeat_age_s = (now_ms - n->hb_changed_ms) / 1000.0;
  }
  return c->n_nodes;
}
