/* test_rdzv_faults.c — the coordinator (daemon/cluster/rdzv.c) over a store
 * that fails one write once, as a TCP store does when a request gets no
 * reply under load, and over nodes that do not divide evenly. A failed
 * write must leave the coordinator where it was,
 * so that the next tick does the step again; it must not leave it believing
 * the step was done:
 *
 * - the assignment of generation 1 fails: generation 1 is ended and 2 forms
 *   (before, the nodes kept roles of a generation never published, and no
 *   generation ever formed; forming 1 again could publish a second layout
 *   under its number if the failed write landed late);
 * - a join's verdict fails: the node is accepted next tick (before, it was
 *   refused as a duplicate of itself and yet placed);
 * - the end of a generation that lost a member fails: the generation ends
 *   next tick and re-forms, with one restart counted (before, the loss was
 *   forgotten and the cluster said "running" with its only member lost);
 * - two nodes of 2 slots each under dp_max 3: generation 1 forms with dp 2
 *   (before, dp 3 was chosen from the 4 slots, whole nodes could not fill
 *   its 3, and no generation ever formed);
 * - a resize refused by the run it would have ended (its stop step): the
 *   operation fails with the run's reason and the job ends as the members
 *   report, with no generation formed at the new width;
 * - too few slots for any dp: the status's reason says how many joined of
 *   how many, until enough have.
 *
 * And how it answers orders while another is in flight or the cluster
 * re-forms (409s that name the right state):
 * - a pause right after a resume is told the resume has not acted yet (it
 *   was told "the job is paused"), and a resize while paused to resume first;
 * - an order while a resize re-forms the cluster names the resize (it was
 *   told "no generation is running yet");
 * - an order while the cluster re-forms after a failure says so and why,
 *   and cluster/status's last_restart keeps why, when, and the step the
 *   new generation resumed from once it runs (the reason went null);
 * - a resize while the first generation waits for slots names dp_min.
 *
 * And a resize that holds: the generations formed after it (a failure, a
 * coordinator elected in its place) keep the operator's width.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "coord_opts.h"
#include "err.h"
#include "mt_check.h"
#include "rdzv.h"
#include "store.h"

typedef struct flaky_store {
  mt_store base;
  mt_store *inner;
  char fail_key[64]; /* its next SET fails, once */
  int failed;        /* how many SETs were failed */
  int reads;         /* GETs and CHECKs of members' reports and departures */
  int ticking;       /* a coordinator tick is under way */
  int tick_requests; /* requests (a batched read is one) made by ticks */
} flaky_store;

static void count_read(flaky_store *f, const char *key) {
  const char *tail = strrchr(key, '/');
  if ((tail && !strcmp(tail, "/left")) || strstr(key, "/done/") || strstr(key, "/failed/") ||
      strstr(key, "/peer_failed/"))
    f->reads++;
}

static void count_request(mt_store *s) {
  ((flaky_store *)s)->tick_requests += ((flaky_store *)s)->ticking;
}

static int f_set(mt_store *s, const char *key, const void *value, size_t bytes) {
  flaky_store *f = (flaky_store *)s;
  count_request(s);
  if (f->fail_key[0] && !strcmp(key, f->fail_key)) {
    f->fail_key[0] = 0;
    f->failed++;
    return mt_seterr(MT_EIO, "store(flaky): set %s: no reply (injected)", key);
  }
  return mt_store_set(f->inner, key, value, bytes);
}
static int f_get(mt_store *s, const char *key, void **value, size_t *bytes, int timeout_ms) {
  count_request(s);
  count_read((flaky_store *)s, key);
  return mt_store_get(((flaky_store *)s)->inner, key, value, bytes, timeout_ms);
}
static int f_add(mt_store *s, const char *key, int64_t delta, int64_t *result) {
  count_request(s);
  return mt_store_add(((flaky_store *)s)->inner, key, delta, result);
}
static int f_check(mt_store *s, const char *key) {
  count_request(s);
  count_read((flaky_store *)s, key);
  return mt_store_check(((flaky_store *)s)->inner, key);
}
static int f_del(mt_store *s, const char *key) {
  count_request(s);
  return mt_store_del(((flaky_store *)s)->inner, key);
}
/* one request, as the TCP store's pipelined GETs are one round trip */
static int f_get_many(mt_store *s, const char *const *keys, size_t n, void **values,
                      size_t *bytes) {
  count_request(s);
  for (size_t i = 0; i < n; i++) count_read((flaky_store *)s, keys[i]);
  return mt_store_get_many(((flaky_store *)s)->inner, keys, n, values, bytes);
}
static int f_del_prefix(mt_store *s, const char *prefix, int64_t *deleted) {
  count_request(s);
  return mt_store_del_prefix(((flaky_store *)s)->inner, prefix, deleted);
}
static void f_free(mt_store *s) { mt_store_free(((flaky_store *)s)->inner); }

static int resizable; /* open_cluster: a job with a checkpoint.dir and a batch dp 2 divides */

typedef struct cluster {
  flaky_store store;
  mt_coord *coord;
  int64_t now_ms;
  int64_t seq[16];
} cluster;

/* Node n<i> (host<i>, version "test", cpu:0..) joins with that many devices. */
static int join_node(cluster *k, int i, int devices) {
  mt_node_desc d = {.n_devices = devices};
  snprintf(d.name, sizeof d.name, "n%d", i);
  snprintf(d.host, sizeof d.host, "host%d", i);
  snprintf(d.version, sizeof d.version, "test");
  for (int j = 0; j < devices; j++) snprintf(d.devices[j], sizeof d.devices[j], "cpu:%d", j);
  return mt_rdzv_join(&k->store.base, &d, &k->seq[i]);
}

/* A cluster's store, empty: the flaky wrapper (failing nothing yet) over
 * an in-process store; its coordinator is the test's to make. */
static int empty_cluster(cluster *k) {
  memset(k, 0, sizeof *k);
  k->store.base =
      (mt_store){f_set, f_get, f_add, f_check, f_del, f_free, "flaky", f_get_many, f_del_prefix};
  return mt_store_mem_new(&k->store.inner);
}

static int open_cluster(cluster *k, const char *fail_key, int nodes) {
  if (empty_cluster(k)) return -1;
  snprintf(k->store.fail_key, sizeof k->store.fail_key, "%s", fail_key);
  mt_coord_opts o = test_coord_opts(&k->store.base);
  o.last_call_ms = 0, o.max_restarts = 3, o.reform_timeout_ms = 600000;
  if (resizable) o.has_checkpoint_dir = 1, o.global_batch = 2;
  if (mt_coord_new(&o, &k->coord)) return -1;
  for (int i = 0; i < nodes; i++)
    if (join_node(k, i, 1)) return -1;
  return 0;
}

static void close_cluster(cluster *k) {
  mt_coord_free(k->coord);
  mt_store_free(&k->store.base);
}

/* Ticks 100 ms apart; the nodes in beating[] heartbeat after each tick.
 * Returns how many ticks failed. */
static int run(cluster *k, int ticks, const int *beating, int nodes) {
  int errors = 0;
  for (int t = 0; t < ticks; t++) {
    k->store.ticking = 1;
    if (mt_coord_tick(k->coord, k->now_ms += 100)) errors++;
    k->store.ticking = 0;
    for (int i = 0; i < nodes; i++)
      if (beating[i]) {
        char name[16];
        snprintf(name, sizeof name, "n%d", i);
        mt_rdzv_heartbeat(&k->store.base, name);
      }
  }
  return errors;
}

static const char *role_of(cluster *k, const char *name, int *gen, const char **state) {
  mt_coord_node_info info[4];
  int n = mt_coord_snapshot(k->coord, k->now_ms, gen, state, info, 4);
  for (int i = 0; i < n && i < 4; i++)
    if (!strcmp(info[i].name, name)) return info[i].role;
  return "absent";
}

static int test_a_failed_assignment_forms_next_tick(void) {
  cluster k;
  REQUIRE(!open_cluster(&k, "gen/1/assignment", 1), "open: %s", mt_errmsg());
  int beating[] = {1};
  int errors = run(&k, 20, beating, 1);
  int gen;
  const char *state;
  const char *role = role_of(&k, "n0", &gen, &state);
  CHECK(k.store.failed == 1 && errors == 1, "%d injected failure(s), %d tick(s) failed",
        k.store.failed, errors);
  CHECK(gen == 2 && !strcmp(state, "running") && !strcmp(role, "member"),
        "after a failed assignment: generation %d %s, n0 %s", gen, state, role);
  int final = -1, ok = -1;
  char reason[200] = "";
  CHECK(mt_rdzv_ended(&k.store.base, 1, &final, &ok, NULL, reason, sizeof reason) == 1 && !final &&
            strstr(reason, "not published whole"),
        "generation 1 not ended for the next: final %d, %s", final, reason);
  mt_assignment a = {0};
  char *job = NULL;
  CHECK(mt_rdzv_assignment(&k.store.base, 2, &a, &job) == 1 && a.restart == 0,
        "generation 2's assignment: restart %d (%s)", a.restart, mt_errmsg());
  mt_assignment_free(&a);
  free(job);
  close_cluster(&k);
  return 0;
}

static int test_a_failed_verdict_accepts_next_tick(void) {
  cluster k;
  REQUIRE(!open_cluster(&k, "nodes/1/verdict", 1), "open: %s", mt_errmsg());
  int beating[] = {1};
  run(&k, 20, beating, 1);
  int watch = -1;
  int verdict = mt_rdzv_verdict(&k.store.base, k.seq[0], &watch);
  CHECK(verdict == 1, "n0's verdict after a failed write: %d (%s)", verdict,
        verdict == MT_EINVAL ? mt_errmsg() : "");
  int gen;
  const char *state;
  const char *role = role_of(&k, "n0", &gen, &state);
  CHECK(gen == 1 && !strcmp(state, "running") && !strcmp(role, "member"),
        "after a failed verdict: generation %d %s, n0 %s", gen, state, role);
  close_cluster(&k);
  return 0;
}

/* n0 and n1 join and beat; generation 1 runs with n0, n1 its spare. 0 when
 * so. */
static int open_running(cluster *k) {
  REQUIRE(!open_cluster(k, "", 2), "open: %s", mt_errmsg());
  int both[] = {1, 1};
  run(k, 5, both, 2);
  int gen;
  const char *state;
  const char *n0 = role_of(k, "n0", &gen, &state), *n1 = role_of(k, "n1", &gen, &state);
  REQUIRE(gen == 1 && !strcmp(state, "running") && !strcmp(n0, "member") && !strcmp(n1, "spare"),
          "generation %d %s, n0 %s, n1 %s", gen, state, n0, n1);
  return 0;
}

/* open_running, its coordinator taking resizes (a checkpoint dir) */
static int open_running_resizable(cluster *k) {
  resizable = 1;
  int rc = open_running(k);
  resizable = 0;
  return rc;
}

static int test_a_failed_end_is_written_next_tick(void) {
  cluster k;
  if (open_running(&k)) return 1;
  int gen;
  const char *state, *role;
  /* n1 is the spare; n0 stops beating and its generation's end fails once */
  snprintf(k.store.fail_key, sizeof k.store.fail_key, "gen/1/end");
  int beat_n1[] = {0, 1};
  run(&k, 30, beat_n1, 2);
  role = role_of(&k, "n1", &gen, &state);
  CHECK(k.store.failed == 1, "the end was not written while failing (%d)", k.store.failed);
  CHECK(mt_store_check(&k.store.base, "gen/1/end") == 1, "generation 1 never ended");
  CHECK(gen == 2 && !strcmp(state, "running") && !strcmp(role, "member"),
        "after n0 was lost: generation %d %s, n1 %s", gen, state, role);
  mt_assignment a = {0};
  char *job = NULL;
  CHECK(mt_rdzv_assignment(&k.store.base, 2, &a, &job) == 1 && a.restart == 1,
        "generation 2 is restart %d, not 1 (%s)", a.restart, mt_errmsg());
  mt_assignment_free(&a);
  free(job);
  close_cluster(&k);
  return 0;
}

/* After three re-forms (generations 1 to 4) the store holds the gen/ keys of
 * the last two generations only: each formed generation deletes the keys of
 * the one two back (before, every generation's stayed for the job's life).
 * A node still on a pruned generation reads it as ended, not final, so it
 * walks on rather than waiting for an end that is gone. */
static int test_reforms_leave_only_the_last_two_generations_keys(void) {
  cluster k;
  if (open_running(&k)) return 1;
  int gen = 1, member = 0;
  const char *state;
  for (int g = 1; g <= 4; g++) {
    if (g > 1) { /* the member stops beating: the spare forms generation g */
      int beat[2] = {member != 0, member != 1};
      run(&k, 30, beat, 2);
      member = !member;
      int both[] = {1, 1};
      run(&k, 30, both, 2); /* the lost node is back, as the spare */
    }
    const char *role = role_of(&k, member ? "n1" : "n0", &gen, &state);
    REQUIRE(gen == g && !strcmp(state, "running") && !strcmp(role, "member"),
            "re-form %d: generation %d %s, member %s", g - 1, gen, state, role);
    char key[64];
    snprintf(key, sizeof key, "gen/%d/comm/tp0/join/0", g); /* as a rank writes */
    REQUIRE(!mt_store_set(&k.store.base, key, "x", 1), "set %s: %s", key, mt_errmsg());
  }
  static const char *kinds[] = {"job", "assignment", "end", "comm/tp0/join/0"};
  for (int g = 1; g <= 4; g++)
    for (int i = 0; i < 4; i++) {
      if (g == 4 && !strcmp(kinds[i], "end")) continue; /* running */
      char key[64];
      snprintf(key, sizeof key, "gen/%d/%s", g, kinds[i]);
      int has = mt_store_check(&k.store.base, key);
      CHECK(has == (g >= 3), "after generation 4 formed, %s is %s", key,
            has ? "still there" : "gone");
    }
  int final = -1, ok = -1;
  char reason[300] = "";
  CHECK(mt_rdzv_ended(&k.store.base, 2, &final, &ok, NULL, reason, sizeof reason) == 1 && !final &&
            !ok && strstr(reason, "keys are gone"),
        "a node on pruned generation 2: ended final %d ok %d (%s)", final, ok, reason);
  CHECK(mt_rdzv_ended(&k.store.base, 4, &final, &ok, NULL, reason, sizeof reason) == 0,
        "the running generation reads as ended");
  close_cluster(&k);
  return 0;
}

/* A running generation's tick reads no member's report or departure keys
 * until a count says one was written (2800 store round trips a tick at
 * MT-NLG's 560 nodes, reading them all), and still sees a report and a
 * departure at the next tick. */
static int test_a_steady_tick_reads_only_counts(void) {
  cluster k;
  if (open_running(&k)) return 1;
  int both[] = {1, 1}, gen;
  const char *state, *role;
  k.store.reads = 0;
  run(&k, 10, both, 2);
  CHECK(k.store.reads == 0, "10 steady ticks read report or departure keys %d times",
        k.store.reads);
  REQUIRE(!mt_rdzv_leave(&k.store.base, "n1"), "n1 leaves: %s", mt_errmsg());
  run(&k, 1, both, 2);
  role = role_of(&k, "n1", &gen, &state);
  CHECK(!strcmp(role, "left"), "a tick after n1 left: %s", role);
  REQUIRE(!mt_rdzv_report(&k.store.base, 1, "n0", MT_REPORT_DONE, "completed 1 step"),
          "n0 reports: %s", mt_errmsg());
  run(&k, 1, both, 2);
  int final = -1, ok = -1;
  char reason[200] = "";
  CHECK(mt_rdzv_ended(&k.store.base, 1, &final, &ok, NULL, reason, sizeof reason) == 1 && ok,
        "a tick after n0 reported: generation 1 ended %d, ok %d (%s)", final, ok, reason);
  close_cluster(&k);
  return 0;
}

/* A steady tick's requests to the store do not grow with the nodes: the
 * heartbeats (and statuses) of all of them are one batched read, where a
 * node each made 560 round trips at MT-NLG's scale. */
static int test_a_tick_asks_the_store_as_often_at_16_nodes_as_at_2(void) {
  int requests[2];
  const int sizes[2] = {2, 16};
  int beating[16];
  for (int i = 0; i < 16; i++) beating[i] = 1;
  for (int s = 0; s < 2; s++) {
    cluster k;
    REQUIRE(!open_cluster(&k, "", sizes[s]), "open %d nodes: %s", sizes[s], mt_errmsg());
    run(&k, 5, beating, sizes[s]);
    int gen;
    const char *state;
    role_of(&k, "n0", &gen, &state);
    REQUIRE(gen == 1 && !strcmp(state, "running"), "%d nodes: generation %d %s", sizes[s], gen,
            state);
    k.store.tick_requests = 0;
    CHECK(run(&k, 50, beating, sizes[s]) == 0, "%d nodes: a tick failed", sizes[s]);
    requests[s] = k.store.tick_requests;
    close_cluster(&k);
  }
  printf("requests in 50 steady ticks: %d at 2 nodes, %d at 16\n", requests[0], requests[1]);
  CHECK(requests[1] == requests[0], "50 ticks made %d requests at 16 nodes, %d at 2", requests[1],
        requests[0]);
  return 0;
}

static int test_nodes_that_cannot_fill_the_widest_dp_form_a_narrower_one(void) {
  cluster k;
  REQUIRE(!empty_cluster(&k), "store: %s", mt_errmsg());
  mt_coord_opts o = test_coord_opts(&k.store.base);
  o.last_call_ms = 0, o.dp_max = 3, o.global_batch = 6;
  REQUIRE(!mt_coord_new(&o, &k.coord), "coordinator: %s", mt_errmsg());
  for (int i = 0; i < 2; i++) REQUIRE(!join_node(&k, i, 2), "join: %s", mt_errmsg());
  int both[] = {1, 1};
  run(&k, 10, both, 2);
  int gen;
  const char *state;
  const char *n0 = role_of(&k, "n0", &gen, &state), *n1 = role_of(&k, "n1", &gen, &state);
  mt_assignment a = {0};
  char *job = NULL;
  int formed = mt_rdzv_assignment(&k.store.base, 1, &a, &job);
  CHECK(gen == 1 && !strcmp(state, "running") && formed == 1 && a.dp == 2 &&
            !strcmp(n0, "member") && !strcmp(n1, "spare"),
        "generation %d %s, assignment %d with dp %d, n0 %s, n1 %s", gen, state, formed, a.dp, n0,
        n1);
  mt_assignment_free(&a);
  free(job);
  close_cluster(&k);
  return 0;
}

/* cluster/status's reason, as its JSON text ("null" when null). */
static char *status_reason(cluster *k) {
  void *v = NULL;
  size_t n = 0;
  if (mt_store_get(&k->store.base, "cluster/status", &v, &n, 0)) return NULL;
  char *r = NULL, *at = strstr(v, "\"reason\":");
  if (at) r = strndup(at + 9, strcspn(at + 9, ",}"));
  free(v);
  return r;
}

/* The status's reason while a generation cannot form: how many model
 * slots joined of how many (a node of 3 devices at tp 2 gives one slot),
 * gone once enough have joined. Before, the reason was null and the
 * cluster waited without a word. */
static int test_a_generation_that_cannot_form_says_what_it_waits_for(void) {
  cluster k;
  REQUIRE(!empty_cluster(&k), "store: %s", mt_errmsg());
  mt_coord_opts o = test_coord_opts(&k.store.base);
  o.last_call_ms = 0, o.tp = 2, o.pp = 2, o.dp_min = o.dp_max = 1;
  REQUIRE(!mt_coord_new(&o, &k.coord), "coordinator: %s", mt_errmsg());
  REQUIRE(!join_node(&k, 0, 3), "join: %s", mt_errmsg());
  int one[] = {1, 0};
  run(&k, 5, one, 1);
  char *r = status_reason(&k);
  CHECK(r && !strcmp(r, "\"waiting for nodes: 1 model slot(s) joined of the 2 that dp 1 needs "
                        "(pp 2 x dp 1; a slot is parallel.tp = 2 devices of one node)\""),
        "reason while one slot of two joined: %s", r ? r : "(no status)");
  free(r);
  REQUIRE(!join_node(&k, 1, 2), "join: %s", mt_errmsg());
  int both[] = {1, 1};
  run(&k, 5, both, 2);
  int gen;
  const char *state;
  role_of(&k, "n0", &gen, &state);
  r = status_reason(&k);
  CHECK(!strcmp(state, "running") && r && !strcmp(r, "null"),
        "formed once two slots joined: state %s, reason %s", state, r ? r : "(no status)");
  free(r);
  close_cluster(&k);
  return 0;
}

/* Nodes joining out of name order (n2, n0, n1) are listed in name order
 * while the generation still forms, as they are once it has formed. Before,
 * the listing was in join order until the generation formed, and a
 * dashboard test that took the first row for n0 failed in CI. */
static int test_nodes_are_listed_in_name_order_while_forming(void) {
  cluster k;
  REQUIRE(!empty_cluster(&k), "store: %s", mt_errmsg());
  mt_coord_opts o = test_coord_opts(&k.store.base);
  o.last_call_ms = 0, o.dp_min = o.dp_max = 4, o.global_batch = 4; /* 3 slots: never forms */
  REQUIRE(!mt_coord_new(&o, &k.coord), "coordinator: %s", mt_errmsg());
  int beating[] = {1, 1, 1};
  const int order[] = {2, 0, 1};
  for (int i = 0; i < 3; i++) {
    REQUIRE(!join_node(&k, order[i], 1), "join: %s", mt_errmsg());
    run(&k, 2, beating, 3);
  }
  int gen;
  const char *state;
  mt_coord_node_info info[4];
  int n = mt_coord_snapshot(k.coord, k.now_ms, &gen, &state, info, 4);
  CHECK(n == 3 && !strcmp(info[0].name, "n0") && !strcmp(info[1].name, "n1") &&
            !strcmp(info[2].name, "n2") && !strcmp(state, "forming"),
        "listed while %s: %d node(s): %s %s %s", state, n, n > 0 ? info[0].name : "-",
        n > 1 ? info[1].name : "-", n > 2 ? info[2].name : "-");
  close_cluster(&k);
  return 0;
}

/* A join whose write got no reply (its store's host stopped a moment) is
 * written again under the number it drew, not numbered anew: the
 * coordinator takes it as that join, with no gap to pass over after 30 s
 * and no second entry under the name. */
static int test_a_join_written_again_keeps_its_number(void) {
  cluster k;
  REQUIRE(!open_cluster(&k, "nodes/1", 0), "cluster: %s", mt_errmsg());
  int rc = join_node(&k, 0, 1);
  CHECK(rc == MT_EIO && k.seq[0] == 1, "the failed write: rc %d, seq %lld", rc,
        (long long)k.seq[0]);
  rc = join_node(&k, 0, 1);
  int64_t numbered = 0;
  mt_store_add(&k.store.base, "nodes/seq", 0, &numbered);
  CHECK(rc == 0 && k.seq[0] == 1 && numbered == 1, "written again: rc %d, seq %lld, numbered %lld",
        rc, (long long)k.seq[0], (long long)numbered);
  int one[] = {1};
  run(&k, 3, one, 1);
  int watch = 0;
  CHECK(mt_rdzv_verdict(&k.store.base, 1, &watch) == 1, "join 1 accepted: %s", mt_errmsg());
  close_cluster(&k);
  return 0;
}

/* World rank 0's node refuses a resize that took effect in the step its
 * run stops after (train.exit_interval; the engine's word, test_train):
 * the operation fails with that reason, and when the members report done
 * the job ends as they say, instead of re-forming with the new width. */
static int test_a_resize_refused_by_the_run_ends_the_job_as_reported(void) {
  cluster k;
  int rc = open_running_resizable(&k);
  if (rc) return 1;
  int both[] = {1, 1};
  const char req[] = "{\"kind\":\"resize\",\"args\":{\"dp\":2}}";
  int64_t n = 0;
  REQUIRE(!mt_store_add(&k.store.base, "ops/seq", 1, &n) &&
              !mt_store_set(&k.store.base, "ops/req/1", req, sizeof req - 1),
          "request: %s", mt_errmsg());
  run(&k, 3, both, 2);
  int64_t seq = 0;
  char kind[32] = "";
  REQUIRE(mt_rdzv_order(&k.store.base, 1, &seq, kind, sizeof kind) == 1 && !strcmp(kind, "resize"),
          "no resize order published: %s (%s)", kind, mt_errmsg());
  const char *why = "the run stopped at step 4 of 40: a multiple of train.exit_interval (4): no "
                    "resize; the next run forms at the width its nodes give";
  REQUIRE(!mt_rdzv_acted(&k.store.base, 1, seq, 4, 0, why) &&
              !mt_rdzv_report(&k.store.base, 1, "n0", MT_REPORT_DONE,
                              "stopped at step 4 of 40: a multiple of train.exit_interval (4)"),
          "acted and report: %s", mt_errmsg());
  run(&k, 10, both, 2);
  int final = -1, ok = -1;
  char reason[300] = "";
  CHECK(mt_rdzv_ended(&k.store.base, 1, &final, &ok, NULL, reason, sizeof reason) == 1 && final &&
            ok && strstr(reason, "train.exit_interval (4)"),
        "generation 1's end: final %d, ok %d, %s", final, ok, reason);
  int gen;
  const char *state;
  role_of(&k, "n1", &gen, &state);
  CHECK(gen == 1, "a generation %d formed after the refused resize (%s)", gen, state);
  json_t *st = mt_rdzv_cluster_status(&k.store.base, &rc);
  json_t *op = json_array_get(json_object_get(st, "operations"), 0);
  const char *op_state = json_string_value(json_object_get(op, "state"));
  const char *op_reason = json_string_value(json_object_get(op, "reason"));
  CHECK(op_state && !strcmp(op_state, "failed") && op_reason && strstr(op_reason, "no resize"),
        "the resize operation: %s, %s", op_state ? op_state : "(none)",
        op_reason ? op_reason : "(none)");
  json_decref(st);
  close_cluster(&k);
  return 0;
}

/* Request kind with args (JSON text) through the store, a tick to decide
 * it: its answer's status, detail copied into detail. */
static int ask(cluster *k, const char *kind, const char *args, char *detail, size_t cap) {
  char req[256], key[64];
  int64_t n = 0;
  snprintf(req, sizeof req, "{\"kind\":\"%s\",\"args\":%s}", kind, args ? args : "{}");
  if (mt_store_add(&k->store.base, "ops/seq", 1, &n)) return -1;
  snprintf(key, sizeof key, "ops/req/%lld", (long long)n);
  if (mt_store_set(&k->store.base, key, req, strlen(req))) return -1;
  mt_coord_tick(k->coord, k->now_ms += 100);
  snprintf(key, sizeof key, "ops/resp/%lld", (long long)n);
  void *v = NULL;
  size_t bytes = 0;
  if (mt_store_get(&k->store.base, key, &v, &bytes, 0)) return -1;
  json_t *j = json_loadb(v, bytes, 0, NULL);
  free(v);
  snprintf(detail, cap, "%s", json_string_value(json_object_get(j, "detail")) ?: "");
  int status = (int)json_integer_value(json_object_get(j, "status"));
  json_decref(j);
  return status;
}

/* The newest order of generation gen has acted (ok) after step. */
static int act(cluster *k, int gen, int64_t step) {
  int64_t seq = 0;
  char kind[32];
  if (mt_rdzv_order(&k->store.base, gen, &seq, kind, sizeof kind) != 1) return -1;
  return mt_rdzv_acted(&k->store.base, gen, seq, step, 1, NULL);
}

static int test_a_pause_after_a_resume_is_told_the_resume_has_not_acted(void) {
  cluster k;
  int rc = open_running_resizable(&k);
  if (rc) return 1;
  int both[] = {1, 1};
  char d[600];
  REQUIRE(ask(&k, "pause", NULL, d, sizeof d) == 202, "pause: %s", d);
  REQUIRE(!act(&k, 1, 5), "pause acts: %s", mt_errmsg());
  run(&k, 2, both, 2);
  int st = ask(&k, "resize", "{\"dp\":2}", d, sizeof d);
  CHECK(st == 409 && strstr(d, "resume it first (mtnlgctl resume), then resize"),
        "a resize while paused: %d %s", st, d);
  REQUIRE(ask(&k, "resume", NULL, d, sizeof d) == 202, "resume: %s", d);
  st = ask(&k, "pause", NULL, d, sizeof d);
  CHECK(st == 409 && strstr(d, "cannot pause: op-2 (resume) has not taken effect yet; retry when "
                               "it has"),
        "a pause right after the resume: %d %s", st, d);
  close_cluster(&k);
  return 0;
}

static int test_an_order_during_a_resize_names_the_resize(void) {
  cluster k;
  REQUIRE(!empty_cluster(&k), "store: %s", mt_errmsg());
  mt_coord_opts o = test_coord_opts(&k.store.base);
  /* dp 2 (dp_max) forms at once; the resize's dp 1 (no last call: it is
   * the width asked for) waits for nodes, as both leave after its stop */
  o.dp_max = 2, o.global_batch = 2, o.has_checkpoint_dir = 1, o.last_call_ms = 100000;
  REQUIRE(!mt_coord_new(&o, &k.coord), "coordinator: %s", mt_errmsg());
  for (int i = 0; i < 2; i++) REQUIRE(!join_node(&k, i, 1), "join: %s", mt_errmsg());
  int both[] = {1, 1};
  run(&k, 5, both, 2);
  char d[600];
  REQUIRE(ask(&k, "resize", "{\"dp\":1}", d, sizeof d) == 202, "resize: %s", d);
  REQUIRE(!act(&k, 1, 8), "resize acts: %s", mt_errmsg());
  run(&k, 1, both, 2);
  int st = ask(&k, "pause", NULL, d, sizeof d);
  CHECK(st == 409 && strstr(d, "op-1 (resize) has not taken effect yet"),
        "a pause after the resize saved: %d %s", st, d);
  for (int i = 0; i < 2; i++) {
    char name[8];
    snprintf(name, sizeof name, "n%d", i);
    REQUIRE(!mt_rdzv_report(&k.store.base, 1, name, MT_REPORT_DONE, "stopped for a resize") &&
                !mt_rdzv_leave(&k.store.base, name),
            "report: %s", mt_errmsg());
  }
  run(&k, 3, both, 2);
  int gen;
  const char *state;
  role_of(&k, "n0", &gen, &state);
  REQUIRE(gen == 2 && !strcmp(state, "forming"), "after the resize's stop: generation %d %s", gen,
          state);
  st = ask(&k, "checkpoint", NULL, d, sizeof d);
  CHECK(st == 409 && strstr(d, "cannot checkpoint: op-1 (resize) has not taken effect yet (the "
                               "cluster is re-forming as generation 2 with dp 1)"),
        "a checkpoint while the resize re-forms: %d %s", st, d);
  close_cluster(&k);
  return 0;
}

static int test_an_order_during_a_reform_after_a_failure_says_why_and_status_keeps_it(void) {
  cluster k;
  int rc = open_running_resizable(&k);
  if (rc) return 1;
  int none[] = {0, 0}, both[] = {1, 1};
  run(&k, 15, none, 2); /* n0, the member, and n1 lost: nothing left to form from */
  int gen;
  const char *state;
  role_of(&k, "n0", &gen, &state);
  REQUIRE(gen == 2 && !strcmp(state, "forming"), "after n0 was lost: generation %d %s", gen, state);
  char d[600];
  int st = ask(&k, "checkpoint", NULL, d, sizeof d);
  CHECK(st == 409 &&
            strstr(d, "cannot checkpoint: the cluster is re-forming as generation 2 "
                      "after node n0 lost (no heartbeat for") &&
            strstr(d, "retry once it runs") && !strstr(d, "yet"),
        "a checkpoint while re-forming: %d %s", st, d);
  /* n1 comes back; generation 2 forms and its ranks resume from step 12 */
  run(&k, 3, both, 2);
  role_of(&k, "n1", &gen, &state);
  REQUIRE(gen == 2 && !strcmp(state, "running"), "n1 back: generation %d %s", gen, state);
  json_t *me =
      json_pack("{s:s, s:i, s:i}", "state", "running", "generation", 2, "resumed_step", 12);
  REQUIRE(!mt_rdzv_publish_node_status(&k.store.base, "n0", json_deep_copy(me)) &&
              !mt_rdzv_publish_node_status(&k.store.base, "n1", me),
          "node status: %s", mt_errmsg());
  run(&k, 5, both, 2);
  json_t *cs = mt_rdzv_cluster_status(&k.store.base, &rc);
  json_t *lr = json_object_get(cs, "last_restart");
  const char *why = json_string_value(json_object_get(lr, "reason"));
  CHECK(json_integer_value(json_object_get(lr, "generation")) == 2 && why &&
            !strncmp(why, "node n0 lost (no heartbeat for", 30) &&
            json_integer_value(json_object_get(lr, "resumed_from_step")) == 12 &&
            json_number_value(json_object_get(lr, "time")) > 1e9 &&
            json_is_null(json_object_get(cs, "reason")),
        "cluster/status once generation 2 runs: %s", cs ? json_dumps(cs, JSON_COMPACT) : "(none)");
  json_decref(cs);
  close_cluster(&k);
  return 0;
}

static int test_a_resize_while_short_of_slots_names_dp_min(void) {
  cluster k;
  REQUIRE(!empty_cluster(&k), "store: %s", mt_errmsg());
  mt_coord_opts o = test_coord_opts(&k.store.base);
  o.dp_min = o.dp_max = 2, o.global_batch = 2, o.has_checkpoint_dir = 1;
  REQUIRE(!mt_coord_new(&o, &k.coord), "coordinator: %s", mt_errmsg());
  REQUIRE(!join_node(&k, 0, 1), "join: %s", mt_errmsg());
  int one[] = {1};
  run(&k, 3, one, 1);
  char d[600];
  int st = ask(&k, "resize", "{\"dp\":1}", d, sizeof d);
  CHECK(st == 409 &&
            strstr(d, "no generation is running yet (the cluster is forming: waiting for "
                      "nodes: 1 model slot(s) joined of the 2") &&
            strstr(d, "lower parallel.dp_min") && strstr(d, "start more nodes"),
        "a resize while forming short of slots: %d %s", st, d);
  close_cluster(&k);
  return 0;
}

/* gen's assignment: its dp and dp_resized (-1 each when unreadable). */
static void assignment_widths(cluster *k, int gen, int *dp, int *resized) {
  mt_assignment a = {0};
  char *job = NULL;
  *dp = *resized = -1;
  if (mt_rdzv_assignment(&k->store.base, gen, &a, &job) == 1) *dp = a.dp, *resized = a.dp_resized;
  mt_assignment_free(&a);
  free(job);
}

/* An operator's resize holds: three one-slot nodes form dp 3 (the job's
 * dp_min 2 .. dp_max 3); resized to 1, generation 2 runs on n0 with n1
 * and n2 spare; n0 lost, generation 3 forms at dp 1 again (before: dp 2
 * from the two spares, the job widened onto nodes the operator had taken
 * out, and past dp_min's floor the resize had set). The assignments say
 * so (dp_resized 1), and a coordinator made with dp_resized 1 (elected in
 * this one's place: coord/state in etcd carries it) forms dp 1 from the
 * three nodes at its start. */
static int test_a_resize_holds_through_a_failure_and_a_new_coordinator(void) {
  cluster k;
  REQUIRE(!empty_cluster(&k), "store: %s", mt_errmsg());
  mt_coord_opts o = test_coord_opts(&k.store.base);
  o.last_call_ms = 0, o.max_restarts = 3, o.reform_timeout_ms = 600000;
  o.dp_min = 2, o.dp_max = 3, o.global_batch = 6, o.has_checkpoint_dir = 1;
  REQUIRE(!mt_coord_new(&o, &k.coord), "coordinator: %s", mt_errmsg());
  for (int i = 0; i < 3; i++) REQUIRE(!join_node(&k, i, 1), "join: %s", mt_errmsg());
  int all[] = {1, 1, 1}, gen, dp, resized;
  const char *state;
  run(&k, 5, all, 3);
  assignment_widths(&k, 1, &dp, &resized);
  REQUIRE(dp == 3 && resized == 0, "generation 1: dp %d, dp_resized %d", dp, resized);
  char d[300];
  int st = ask(&k, "resize", "{\"dp\":1}", d, sizeof d);
  REQUIRE(st == 202, "resize to 1: %d %s", st, d);
  int64_t seq = 0;
  char kind[32] = "";
  REQUIRE(mt_rdzv_order(&k.store.base, 1, &seq, kind, sizeof kind) == 1 && !strcmp(kind, "resize"),
          "no resize order: %s", mt_errmsg());
  REQUIRE(!mt_rdzv_acted(&k.store.base, 1, seq, 10, 1, NULL), "acted: %s", mt_errmsg());
  for (int i = 0; i < 3; i++) {
    char name[8];
    snprintf(name, sizeof name, "n%d", i);
    REQUIRE(!mt_rdzv_report(&k.store.base, 1, name, MT_REPORT_DONE, "stopped for a resize"),
            "report: %s", mt_errmsg());
  }
  run(&k, 10, all, 3);
  const char *n0 = role_of(&k, "n0", &gen, &state);
  assignment_widths(&k, 2, &dp, &resized);
  REQUIRE(gen == 2 && !strcmp(state, "running") && !strcmp(n0, "member") && dp == 1 && resized == 1,
          "after the resize: generation %d %s, n0 %s, dp %d, dp_resized %d", gen, state, n0, dp,
          resized);
  CHECK(mt_coord_dp_resized(k.coord) == 1, "the coordinator's resized width: %d",
        mt_coord_dp_resized(k.coord));
  int without_n0[] = {0, 1, 1};
  run(&k, 30, without_n0, 3);
  const char *n1 = role_of(&k, "n1", &gen, &state), *n2 = role_of(&k, "n2", &gen, &state);
  assignment_widths(&k, 3, &dp, &resized);
  CHECK(gen == 3 && !strcmp(state, "running") && dp == 1 && resized == 1 && !strcmp(n1, "member") &&
            !strcmp(n2, "spare"),
        "n0 lost after the resize to 1: generation %d %s at dp %d (dp_resized %d), n1 %s, n2 %s",
        gen, state, dp, resized, n1, n2);
  close_cluster(&k);

  REQUIRE(!empty_cluster(&k), "store: %s", mt_errmsg());
  o = test_coord_opts(&k.store.base);
  o.last_call_ms = 0, o.dp_min = 2, o.dp_max = 3, o.global_batch = 6, o.has_checkpoint_dir = 1;
  o.max_restarts = 3, o.restarts_spent = 1, o.restart_reason = "the coordinator n9 was lost";
  o.dp_resized = 1;
  REQUIRE(!mt_coord_new(&o, &k.coord), "coordinator: %s", mt_errmsg());
  for (int i = 0; i < 3; i++) REQUIRE(!join_node(&k, i, 1), "join: %s", mt_errmsg());
  run(&k, 5, all, 3);
  role_of(&k, "n0", &gen, &state);
  assignment_widths(&k, 1, &dp, &resized);
  CHECK(gen == 1 && !strcmp(state, "running") && dp == 1 && resized == 1,
        "a coordinator elected after one that resized to 1: generation %d %s at dp %d "
        "(dp_resized %d)",
        gen, state, dp, resized);
  close_cluster(&k);
  return 0;
}

int main(void) {
  /* REQUIRE returns 1 without counting; CHECK counts as it goes */
  if (test_a_failed_assignment_forms_next_tick()) failures++;
  if (test_a_failed_verdict_accepts_next_tick()) failures++;
  if (test_a_failed_end_is_written_next_tick()) failures++;
  if (test_a_steady_tick_reads_only_counts()) failures++;
  if (test_reforms_leave_only_the_last_two_generations_keys()) failures++;
  if (test_a_tick_asks_the_store_as_often_at_16_nodes_as_at_2()) failures++;
  if (test_nodes_that_cannot_fill_the_widest_dp_form_a_narrower_one()) failures++;
  if (test_a_resize_refused_by_the_run_ends_the_job_as_reported()) failures++;
  if (test_a_generation_that_cannot_form_says_what_it_waits_for()) failures++;
  if (test_a_join_written_again_keeps_its_number()) failures++;
  if (test_nodes_are_listed_in_name_order_while_forming()) failures++;
  if (test_a_pause_after_a_resume_is_told_the_resume_has_not_acted()) failures++;
  if (test_an_order_during_a_resize_names_the_resize()) failures++;
  if (test_an_order_during_a_reform_after_a_failure_says_why_and_status_keeps_it()) failures++;
  if (test_a_resize_while_short_of_slots_names_dp_min()) failures++;
  if (test_a_resize_holds_through_a_failure_and_a_new_coordinator()) failures++;
  if (failures) fprintf(stderr, "%d check(s) failed\n", failures);
  return failures ? 1 : 0;
}
