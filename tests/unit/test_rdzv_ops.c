/* test_rdzv_ops.c — how a control plane's request reaches the coordinator
 * (daemon/cluster/rdzv.c: mt_rdzv_submit_op and the coordinator's
 * read_op_requests) through an in-memory store, the coordinator ticked by
 * hand or by a thread.
 *
 * - a request the coordinator does not take in time is given up by its node
 *   (an error saying it will not be acted on), and the coordinator, which
 *   sees it later, passes over it instead of acting on it;
 * - a request numbered but not written yet (its node is slow, died in
 *   between, or lost the numbering's reply and took another number) holds
 *   nothing up: the ones after it are answered at once, it when it lands,
 *   and after 30 s unwritten it is passed over (claimed: never acted on).
 * - a request's keys (req, claim, resp) are removed by its node once it has
 *   read the answer.
 * The coordinator is still forming, so a pause is refused (409) and a stop
 * ends the job: either answer shows the request was decided.
 *
 * Then, with a generation running, requests with an Idempotency-Key (a
 * retry whose first answer was lost):
 * - the same key with the same request answers the same operation again,
 *   marked replayed, and orders nothing: one operation, one order;
 * - the same key with another request is refused, 422, naming the key;
 * - a refusal (409) is answered again as it was, though the request would
 *   now be taken, and a new key is decided afresh;
 * - the coordinator keeps the newest MT_RDZV_IDEM_KEYS keys, the oldest
 *   forgotten first: a retry of a forgotten key is decided afresh;
 * - a key that is not 1 to 255 printable ASCII characters (another process
 *   wrote it into the store) is refused, 400;
 * - a retry of a key whose operation ended and left the coordinator's table
 *   (the newest 256 finished ones) is told how it ended, not the "running"
 *   it was told at acceptance;
 * - a keyed request its node gave up on is not kept: its resend orders,
 *   once; one numbered but written only after its resend was decided is
 *   answered the resend's operation, replayed, and orders nothing.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "coord_opts.h"
#include "err.h"
#include "mt_check.h"
#include "rdzv.h"
#include "store.h"

static mt_coord *coord;
static mt_store *store;
static atomic_int ticking;
static atomic_llong clock_ms; /* the coordinator's "now" */

static void *ticker(void *arg) {
  (void)arg;
  while (atomic_load(&ticking)) {
    mt_coord_tick(coord, atomic_load(&clock_ms));
    usleep(5000);
  }
  return NULL;
}

static int submit(const char *kind, int timeout_ms, int *status, char *detail, size_t cap) {
  json_t *op = NULL;
  int rc =
      mt_rdzv_submit_op(store, kind, NULL, NULL, timeout_ms, status, &op, NULL, detail, (int)cap);
  json_decref(op);
  return rc;
}

/* The coordinator's answer for request n, or -1 when it wrote none. */
static int answered(int64_t n) {
  char key[64];
  snprintf(key, sizeof key, "ops/resp/%lld", (long long)n);
  void *v;
  size_t bytes;
  if (mt_store_get(store, key, &v, &bytes, 0)) return -1;
  json_t *j = json_loadb(v, bytes, 0, NULL);
  free(v);
  int status = (int)json_integer_value(json_object_get(j, "status"));
  json_decref(j);
  return status;
}

/* Whether the store holds the key fmt % n. */
static int has_key(const char *fmt, int n) {
  char key[64];
  snprintf(key, sizeof key, fmt, n);
  void *v;
  size_t bytes;
  if (mt_store_get(store, key, &v, &bytes, 0)) return 0;
  free(v);
  return 1;
}

static const char pause_req[] = "{\"kind\":\"pause\",\"args\":{}}";

static int test_requests_given_up_or_never_written_are_passed_over(void) {
  int status = 0;
  char detail[256];
  /* 1: nobody ticks; the node gives up after 50 ms */
  int rc = submit("pause", 50, &status, detail, sizeof detail);
  CHECK(rc != 0 && strstr(mt_errmsg(), "will not be acted on"), "a request not taken: rc %d, %s",
        rc, mt_errmsg());
  mt_coord_tick(coord, 0);
  CHECK(answered(1) == -1, "the coordinator acted on request 1 after its node gave up (%d)",
        answered(1));

  /* 2: numbered and not written yet (a slow node, one that died, or one
   * whose numbering's reply was lost and that took another number) */
  int64_t n;
  REQUIRE(!mt_store_add(store, "ops/seq", 1, &n) && n == 2, "numbering: %s", mt_errmsg());
  mt_coord_tick(coord, 1000);

  /* 3: sent while 2 is unwritten: answered at once, nothing waits on the gap */
  atomic_store(&clock_ms, 1000);
  atomic_store(&ticking, 1);
  pthread_t th;
  pthread_create(&th, NULL, ticker, NULL);
  rc = submit("pause", 2000, &status, detail, sizeof detail);
  CHECK(rc == 0 && status == 409 && strstr(detail, "no generation is running"),
        "request 3 behind the unwritten 2: rc %d (%s), status %d: %s", rc, rc ? mt_errmsg() : "",
        status, detail);
  /* 2 lands later: answered then */
  REQUIRE(!mt_store_set(store, "ops/req/2", pause_req, strlen(pause_req)), "write 2");
  for (int i = 0; i < 400 && answered(2) == -1; i++) usleep(5000);
  CHECK(answered(2) == 409, "request 2, written after 3 was answered: %d", answered(2));

  /* 4: numbered and never written: passed over after 30 s, while 5 is answered */
  REQUIRE(!mt_store_add(store, "ops/seq", 1, &n) && n == 4, "numbering: %s", mt_errmsg());
  rc = submit("stop", 2000, &status, detail, sizeof detail);
  CHECK(rc == 0 && status == 202, "request 5, a stop: rc %d, status %d: %s", rc, status, detail);
  atomic_store(&clock_ms, 40000); /* past the gap: 4 is passed over */
  int64_t claims = 0;
  for (int i = 0; i < 400 && !claims; i++) {
    usleep(5000);
    if (mt_store_add(store, "ops/claim/4", 0, &claims)) break;
  }
  REQUIRE(!mt_store_set(store, "ops/req/4", pause_req, strlen(pause_req)), "write 4");
  usleep(50000);
  atomic_store(&ticking, 0);
  pthread_join(th, NULL);
  CHECK(claims == 1 && answered(4) == -1, "request 4 after 30 s unwritten: claims %lld, answer %d",
        (long long)claims, answered(4));
  /* 3 and 5 were answered to their nodes, which removed their keys: the
   * store does not grow with every order; 2's node was not there to */
  for (int k = 3; k <= 5; k += 2)
    CHECK(!has_key("ops/req/%d", k) && !has_key("ops/claim/%d", k) && !has_key("ops/resp/%d", k),
          "request %d's keys left in the store: req %d, claim %d, resp %d", k,
          has_key("ops/req/%d", k), has_key("ops/claim/%d", k), has_key("ops/resp/%d", k));
  CHECK(answered(2) == 409, "request 2's answer, which its node never read: %d", answered(2));
  return 0;
}

/* ---- Idempotency-Key ---- */

/* One request with key through mt_rdzv_submit_op, the ticker answering.
 * What it was answered: the status, the operation's id ("" when none),
 * whether replayed, and the detail. */
typedef struct answer {
  int rc, status, replayed;
  char id[32], detail[512];
} answer;

static answer ask(const char *kind, json_t *args, const char *key) {
  answer a = {0};
  json_t *op = NULL;
  a.rc = mt_rdzv_submit_op(store, kind, args, key, 2000, &a.status, &op, &a.replayed, a.detail,
                           sizeof a.detail);
  const char *id = json_string_value(json_object_get(op, "id"));
  snprintf(a.id, sizeof a.id, "%s", id ? id : "");
  json_decref(op);
  return a;
}

/* Writes request n (numbered here) as another process would, unanswered. */
static int64_t put_request(const char *json) {
  int64_t n;
  if (mt_store_add(store, "ops/seq", 1, &n)) return -1;
  char key[64];
  snprintf(key, sizeof key, "ops/req/%lld", (long long)n);
  return mt_store_set(store, key, json, strlen(json)) ? -1 : n;
}

/* The coordinator's published state and number of operations. */
static const char *cluster_state_now(int *n_ops) {
  static char state[32];
  int rc;
  json_t *st = mt_rdzv_cluster_status(store, &rc);
  snprintf(state, sizeof state, "%s",
           st && json_string_value(json_object_get(st, "state"))
               ? json_string_value(json_object_get(st, "state"))
               : "");
  if (n_ops) *n_ops = (int)json_array_size(json_object_get(st, "operations"));
  json_decref(st);
  return state;
}

static void start_ticking(pthread_t *th) {
  atomic_store(&ticking, 1);
  pthread_create(th, NULL, ticker, NULL);
}

static void stop_ticking(pthread_t th) {
  atomic_store(&ticking, 0);
  pthread_join(th, NULL);
}

/* A coordinator of its own store whose generation 1 runs on n0 (one
 * device), with a checkpoint dir; the globals point at it. 0 when so. */
static int open_running(void) {
  REQUIRE(!mt_store_mem_new(&store), "store: %s", mt_errmsg());
  mt_coord_opts o = test_coord_opts(store);
  o.last_call_ms = 0, o.has_checkpoint_dir = 1;
  REQUIRE(!mt_coord_new(&o, &coord), "coordinator: %s", mt_errmsg());
  mt_node_desc d = {.n_devices = 1, .name = "n0", .host = "host0", .version = "test"};
  snprintf(d.devices[0], sizeof d.devices[0], "cpu:0");
  int64_t seq = 0;
  REQUIRE(!mt_rdzv_join(store, &d, &seq), "join: %s", mt_errmsg());
  for (int t = 1; t <= 5; t++) {
    mt_coord_tick(coord, t * 100);
    mt_rdzv_heartbeat(store, "n0");
  }
  atomic_store(&clock_ms, 500); /* from here the clock stands: n0 is never late */
  mt_coord_tick(coord, 500);
  const char *state = cluster_state_now(NULL);
  REQUIRE(!strcmp(state, "running"), "generation 1 is %s, not running", state);
  return 0;
}

static int test_a_retried_request_with_its_key_orders_once(void) {
  pthread_t th;
  start_ticking(&th);
  answer first = ask("pause", NULL, "key-pause");
  CHECK(!first.rc && first.status == 202 && !first.replayed && first.id[0],
        "pause with a key: rc %d, status %d, replayed %d, id %s: %s", first.rc, first.status,
        first.replayed, first.id, first.detail);
  /* its answer lost: the retry, the same request with the same key (from
   * any node: the key rides in the request through the store) */
  answer again = ask("pause", NULL, "key-pause");
  CHECK(!again.rc && again.status == 202 && again.replayed && !strcmp(again.id, first.id),
        "the retry: rc %d, status %d, replayed %d, id %s (first %s): %s", again.rc, again.status,
        again.replayed, again.id, first.id, again.detail);
  int64_t seq = 0;
  char kind[16] = "";
  int ordered = mt_rdzv_order(store, 1, &seq, kind, sizeof kind);
  usleep(20000);
  int n_ops = 0;
  cluster_state_now(&n_ops);
  CHECK(ordered == 1 && seq == 1 && !strcmp(kind, "pause") && n_ops == 1,
        "after a pause and its retry: order %d seq %lld (%s), %d operation(s); want 1 of each",
        ordered, (long long)seq, kind, n_ops);

  /* the key again, with another request: refused, naming the key */
  answer other = ask("resume", NULL, "key-pause");
  CHECK(!other.rc && other.status == 422 && strstr(other.detail, "Idempotency-Key \"key-pause\"") &&
            strstr(other.detail, "another request (pause {})"),
        "a resume with the pause's key: rc %d, status %d: %s", other.rc, other.status,
        other.detail);
  json_t *dp2 = json_pack("{s:i}", "dp", 2), *dp3 = json_pack("{s:i}", "dp", 3);
  answer resize = ask("resize", dp2, "key-resize");
  answer resize_other = ask("resize", dp3, "key-resize");
  CHECK(resize.status == 409 && resize_other.status == 422 &&
            strstr(resize_other.detail, "(resize {\"dp\":2})"),
        "a resize to dp 3 with the key of one to dp 2: %d then %d: %s", resize.status,
        resize_other.status, resize_other.detail);
  json_decref(dp2), json_decref(dp3);

  /* a refusal (the pause has not acted yet) is answered again as it was */
  answer refused = ask("resume", NULL, "key-resume");
  CHECK(refused.status == 409 && strstr(refused.detail, "has not taken effect yet"),
        "a resume before the pause acted: %d: %s", refused.status, refused.detail);
  REQUIRE(!mt_rdzv_acted(store, 1, seq, 7, 1, ""), "acted: %s", mt_errmsg());
  const char *state = "";
  for (int i = 0; i < 400 && strcmp(state = cluster_state_now(NULL), "paused"); i++) usleep(5000);
  CHECK(!strcmp(state, "paused"), "after the pause acted the job is %s", state);
  answer replayed = ask("resume", NULL, "key-resume");
  CHECK(replayed.status == 409 && replayed.replayed && !strcmp(replayed.detail, refused.detail),
        "the resume's retry, now the job is paused: %d (replayed %d): %s", replayed.status,
        replayed.replayed, replayed.detail);
  answer fresh = ask("resume", NULL, "key-resume-2");
  CHECK(fresh.status == 202 && !fresh.replayed && strcmp(fresh.id, first.id),
        "a resume with a new key: %d (replayed %d), id %s: %s", fresh.status, fresh.replayed,
        fresh.id, fresh.detail);
  stop_ticking(th);
  return 0;
}

/* README and proto/control-v1.yaml give the number */
_Static_assert(MT_RDZV_IDEM_KEYS == 1024, "the documented number of keys kept");

/* Keys so far: key-pause (oldest), key-resize, key-resume, key-resume-2. */
static int test_the_oldest_key_is_forgotten_first(void) {
  char req[128];
  int64_t last = 0;
  /* fill the table: key-pause is still the oldest kept */
  for (int i = 0; i < MT_RDZV_IDEM_KEYS - 4; i++) {
    snprintf(req, sizeof req,
             "{\"kind\":\"checkpoint\",\"args\":{},\"idempotency_key\":\"bulk-%d\"}", i);
    last = put_request(req);
  }
  mt_coord_tick(coord, atomic_load(&clock_ms));
  CHECK(answered(last) == 409, "bulk request %lld (while the resume has not acted): %d",
        (long long)last, answered(last));
  pthread_t th;
  start_ticking(&th);
  answer kept = ask("pause", NULL, "key-pause");
  CHECK(kept.status == 202 && kept.replayed && !strcmp(kept.id, "op-1"),
        "key-pause with %d newer keys: %d (replayed %d) %s: %s", MT_RDZV_IDEM_KEYS - 1, kept.status,
        kept.replayed, kept.id, kept.detail);
  stop_ticking(th);
  /* one more key: key-pause, the oldest, goes; key-resize, the next, stays */
  last = put_request("{\"kind\":\"checkpoint\",\"args\":{},\"idempotency_key\":\"bulk-last\"}");
  mt_coord_tick(coord, atomic_load(&clock_ms));
  start_ticking(&th);
  /* (key-resize first: key-pause, decided afresh, is then kept again, in
   * the oldest slot, key-resize's) */
  answer next = ask("resize", NULL, "key-resize");
  answer forgotten = ask("pause", NULL, "key-pause");
  stop_ticking(th);
  CHECK(forgotten.status == 409 && !forgotten.replayed &&
            strstr(forgotten.detail, "has not taken effect yet"),
        "key-pause once %d newer keys came: %d (replayed %d): %s", MT_RDZV_IDEM_KEYS,
        forgotten.status, forgotten.replayed, forgotten.detail);
  CHECK(next.status == 422 && strstr(next.detail, "\"key-resize\""),
        "key-resize, the next oldest, with another request: %d: %s", next.status, next.detail);
  return 0;
}

static int test_a_key_that_is_not_printable_ascii_is_refused(void) {
  char longkey[300], req[400];
  memset(longkey, 'k', 256);
  longkey[256] = '\0';
  const char *bad[] = {"\"\"", "\"a\\u0001b\"", "\"caf\\u00e9\"", "42", NULL};
  int64_t n[5];
  for (int i = 0; bad[i]; i++) {
    snprintf(req, sizeof req, "{\"kind\":\"pause\",\"args\":{},\"idempotency_key\":%s}", bad[i]);
    n[i] = put_request(req);
  }
  snprintf(req, sizeof req, "{\"kind\":\"pause\",\"args\":{},\"idempotency_key\":\"%s\"}", longkey);
  n[4] = put_request(req);
  mt_coord_tick(coord, atomic_load(&clock_ms));
  for (int i = 0; i < 5; i++)
    CHECK(answered(n[i]) == 400, "request %d with a bad key: %d", i, answered(n[i]));
  return 0;
}

/* The running order (the newest) acted: its operation succeeds. */
static int act_on_order(void) {
  int64_t seq = 0;
  char kind[16];
  REQUIRE(mt_rdzv_order(store, 1, &seq, kind, sizeof kind) == 1, "no order: %s", mt_errmsg());
  REQUIRE(!mt_rdzv_acted(store, 1, seq, 7, 1, ""), "acted: %s", mt_errmsg());
  mt_coord_tick(coord, atomic_load(&clock_ms));
  return 0;
}

/* A key whose operation ended and left the table (the coordinator keeps
 * the newest OPS_KEPT finished ones, 256, and lists 200): a retry is told
 * how it ended, not the "running" it was told at acceptance, which a node
 * would show, and mtnlgctl --wait follow, for good. The resume ordered
 * before (key-resume-2) still runs. */
static int test_a_retry_after_its_operation_left_the_table(void) {
  if (act_on_order()) return 1;
  pthread_t th;
  start_ticking(&th);
  answer first = ask("checkpoint", NULL, "key-old");
  stop_ticking(th);
  REQUIRE(first.status == 202, "a checkpoint: %d: %s", first.status, first.detail);
  if (act_on_order()) return 1;
  /* 511 more operations, each ended before the next: the table's drop
   * (at 512) leaves the newest 256, key-old's gone */
  for (int i = 0; i < 511; i++) {
    int64_t n = put_request("{\"kind\":\"checkpoint\",\"args\":{}}");
    mt_coord_tick(coord, atomic_load(&clock_ms));
    REQUIRE(answered(n) == 202, "checkpoint %d: %d", i, answered(n));
    if (act_on_order()) return 1;
  }
  /* the coordinator lists the newest 200: key-old's is not among them */
  int rc;
  json_t *st = mt_rdzv_cluster_status(store, &rc);
  json_t *ops = json_object_get(st, "operations"), *op;
  size_t i, n_listed = json_array_size(ops);
  int listed = 0;
  json_array_foreach(ops, i, op) listed |=
      !strcmp(json_string_value(json_object_get(op, "id")), first.id);
  json_decref(st);
  REQUIRE(!listed && n_listed > 0, "%s is still listed after 511 newer operations (%zu listed)",
          first.id, n_listed);
  start_ticking(&th);
  json_t *got = NULL;
  int status = 0, replayed = 0;
  char detail[512];
  rc = mt_rdzv_submit_op(store, "checkpoint", NULL, "key-old", 2000, &status, &got, &replayed,
                         detail, sizeof detail);
  stop_ticking(th);
  const char *id = json_string_value(json_object_get(got, "id"));
  const char *state = json_string_value(json_object_get(got, "state"));
  CHECK(!rc && status == 202 && replayed && id && !strcmp(id, first.id) && state &&
            !strcmp(state, "succeeded") && json_integer_value(json_object_get(got, "step")) == 7,
        "key-old's retry once %s left the table: rc %d, status %d, replayed %d, %s %s: %s",
        first.id, rc, status, replayed, id ? id : "(no id)", state ? state : "(no state)", detail);
  json_decref(got);
  return 0;
}

/* The coordinator's answer to request n, whole (NULL when none). */
static json_t *answer_of(int64_t n) {
  char key[64];
  snprintf(key, sizeof key, "ops/resp/%lld", (long long)n);
  void *v;
  size_t bytes;
  if (mt_store_get(store, key, &v, &bytes, 0)) return NULL;
  json_t *j = json_loadb(v, bytes, 0, NULL);
  free(v);
  return j;
}

/* The newest order's seq (0: none yet). */
static int64_t order_seq(void) {
  int64_t seq = 0;
  char kind[16];
  return mt_rdzv_order(store, 1, &seq, kind, sizeof kind) == 1 ? seq : 0;
}

/* A keyed request its node gave up on (the coordinator did not take it in
 * time: claims 1, a 503 saying it will not be acted on) is not kept: its
 * resend is decided, once, one order. A keyed request numbered but not
 * written yet while its resend (another node's) is decided is answered,
 * when it lands, the resend's operation, replayed: one order. The job
 * runs, nothing pending (the checkpoints before all acted). */
static int test_a_given_up_or_late_keyed_request_orders_once(void) {
  int64_t seq0 = order_seq();
  json_t *op = NULL;
  int status = 0, replayed = 0;
  char detail[512];
  int rc = mt_rdzv_submit_op(store, "checkpoint", NULL, "key-given-up", 50, &status, &op, &replayed,
                             detail, sizeof detail);
  json_decref(op);
  CHECK(rc != 0 && strstr(mt_errmsg(), "will not be acted on"),
        "a keyed request nobody took: rc %d, %s", rc, mt_errmsg());
  mt_coord_tick(coord, atomic_load(&clock_ms)); /* sees it claimed: passes over */
  pthread_t th;
  start_ticking(&th);
  answer resent = ask("checkpoint", NULL, "key-given-up");
  stop_ticking(th);
  CHECK(resent.status == 202 && !resent.replayed && order_seq() == seq0 + 1,
        "its resend: %d (replayed %d), orders %lld after %lld: %s", resent.status, resent.replayed,
        (long long)order_seq(), (long long)seq0, resent.detail);
  if (act_on_order()) return 1;

  int64_t late;
  REQUIRE(!mt_store_add(store, "ops/seq", 1, &late), "numbering: %s", mt_errmsg());
  start_ticking(&th);
  answer first = ask("pause", NULL, "key-late"); /* the resend, through another node */
  stop_ticking(th);
  CHECK(first.status == 202 && !first.replayed, "the resend of the late one: %d: %s", first.status,
        first.detail);
  int64_t seq1 = order_seq();
  char req[128], key[64];
  snprintf(req, sizeof req, "{\"kind\":\"pause\",\"args\":{},\"idempotency_key\":\"key-late\"}");
  snprintf(key, sizeof key, "ops/req/%lld", (long long)late);
  REQUIRE(!mt_store_set(store, key, req, strlen(req)), "write %lld", (long long)late);
  mt_coord_tick(coord, atomic_load(&clock_ms));
  json_t *a = answer_of(late);
  const char *id = json_string_value(json_object_get(json_object_get(a, "op"), "id"));
  CHECK(json_integer_value(json_object_get(a, "status")) == 202 &&
            json_is_true(json_object_get(a, "replayed")) && id && !strcmp(id, first.id) &&
            order_seq() == seq1,
        "the late request, landed after its resend was decided: %s (resend %s); orders %lld, "
        "was %lld",
        a ? json_dumps(a, JSON_COMPACT) : "(no answer)", first.id, (long long)order_seq(),
        (long long)seq1);
  json_decref(a);
  return 0;
}

int main(void) {
  REQUIRE(!mt_store_mem_new(&store), "store: %s", mt_errmsg());
  mt_coord_opts o = test_coord_opts(store);
  REQUIRE(!mt_coord_new(&o, &coord), "coordinator: %s", mt_errmsg());
  failures += test_requests_given_up_or_never_written_are_passed_over();
  mt_coord_free(coord);
  mt_store_free(store);
  if (!open_running()) {
    failures += test_a_retried_request_with_its_key_orders_once();
    failures += test_the_oldest_key_is_forgotten_first();
    failures += test_a_key_that_is_not_printable_ascii_is_refused();
    failures += test_a_retry_after_its_operation_left_the_table();
    failures += test_a_given_up_or_late_keyed_request_orders_once();
  }
  mt_coord_free(coord);
  mt_store_free(store);
  printf("test_rdzv_ops: %s\n", failures ? "FAILED" : "ok");
  return failures ? 1 : 0;
}
