/* test_rdzv_forged.c — what another process can write into the rendezvous
 * store (it has no authentication yet: DESIGN.md, "Coming later") must not
 * crash, freeze or mislead a daemon. Through an in-memory store:
 *
 * - a forged gen/<g>/assignment (a layout whose product wraps, ranks past
 *   the world, gaps, a member holding part of a model slot) is refused by
 *   mt_rdzv_assignment, not handed to the engine that sizes arrays by it;
 * - a join descriptor that is not JSON is refused and the joins after it
 *   are read; one numbered but not written holds nothing up: the joins
 *   after it are decided, it when it lands, and never after 30 s;
 * - a heartbeat counter that is not a number makes its node silent, not
 *   every node's heartbeats unread;
 * - a request that is not JSON is answered (501), and the next one too;
 * - a control URL a dashboard would link that is not http(s) is refused;
 * - a daemon of the same name on the same host (systemd's restart after a
 *   crash) is turned away for now; on another host it is refused for good.
 */
#include <stdio.h>
#include <string.h>

#include "coord_opts.h"
#include "err.h"
#include "mt_check.h"
#include "rdzv.h"
#include "store.h"

static mt_store *store;

static int set(const char *key, const char *value) {
  REQUIRE(!mt_store_set(store, key, value, strlen(value)), "set %s: %s", key, mt_errmsg());
  return 0;
}

static int test_forged_assignments_are_refused(void) {
  static const char *const forged[] = {
      /* tp x dp wraps to 0 in 32 bits */
      "{\"gen\":1,\"tp\":65536,\"pp\":1,\"dp\":65536,\"world\":0,\"restart\":0,"
      "\"members\":[{\"name\":\"n0\",\"rank_begin\":0,\"rank_end\":1}],\"spares\":[]}",
      /* ranks past the world */
      "{\"gen\":1,\"tp\":1,\"pp\":1,\"dp\":2,\"world\":2,\"restart\":0,"
      "\"members\":[{\"name\":\"n0\",\"rank_begin\":0,\"rank_end\":5000}],\"spares\":[]}",
      /* a gap: ranks [1, 2) held by nobody */
      "{\"gen\":1,\"tp\":1,\"pp\":1,\"dp\":2,\"world\":2,\"restart\":0,"
      "\"members\":[{\"name\":\"n0\",\"rank_begin\":1,\"rank_end\":2}],\"spares\":[]}",
      /* a member with part of a model slot of tp 2 */
      "{\"gen\":1,\"tp\":2,\"pp\":1,\"dp\":2,\"world\":4,\"restart\":0,"
      "\"members\":[{\"name\":\"n0\",\"rank_begin\":0,\"rank_end\":3},"
      "{\"name\":\"n1\",\"rank_begin\":3,\"rank_end\":4}],\"spares\":[]}",
      /* an empty range */
      "{\"gen\":1,\"tp\":1,\"pp\":1,\"dp\":1,\"world\":1,\"restart\":0,"
      "\"members\":[{\"name\":\"n0\",\"rank_begin\":0,\"rank_end\":0},"
      "{\"name\":\"n1\",\"rank_begin\":0,\"rank_end\":1}],\"spares\":[]}",
      /* a layout given as text */
      "{\"gen\":1,\"tp\":\"1\",\"pp\":1,\"dp\":1,\"world\":1,\"restart\":0,"
      "\"members\":[{\"name\":\"n0\",\"rank_begin\":0,\"rank_end\":1}],\"spares\":[]}",
      /* negative sizes whose product is right */
      "{\"gen\":1,\"tp\":-1,\"pp\":-1,\"dp\":1,\"world\":1,\"restart\":0,"
      "\"members\":[{\"name\":\"n0\",\"rank_begin\":0,\"rank_end\":1}],\"spares\":[]}",
      /* a resized width of 0, and one given as text */
      "{\"gen\":1,\"tp\":1,\"pp\":1,\"dp\":1,\"world\":1,\"restart\":0,\"dp_resized\":0,"
      "\"members\":[{\"name\":\"n0\",\"rank_begin\":0,\"rank_end\":1}],\"spares\":[]}",
      "{\"gen\":1,\"tp\":1,\"pp\":1,\"dp\":1,\"world\":1,\"restart\":0,\"dp_resized\":\"1\","
      "\"members\":[{\"name\":\"n0\",\"rank_begin\":0,\"rank_end\":1}],\"spares\":[]}",
  };
  set("gen/1/job", "{}");
  for (size_t i = 0; i < sizeof forged / sizeof *forged; i++) {
    set("gen/1/assignment", forged[i]);
    mt_assignment a;
    char *job = NULL;
    int rc = mt_rdzv_assignment(store, 1, &a, &job);
    CHECK(rc == MT_ECORRUPT, "forged assignment %zu: rc %d (%s)", i, rc,
          rc ? mt_errmsg() : "taken");
    if (rc == 1) mt_assignment_free(&a), free(job);
  }
  /* and the layout the coordinator writes is taken */
  set("gen/1/assignment",
      "{\"gen\":1,\"tp\":2,\"pp\":1,\"dp\":2,\"world\":4,\"restart\":0,\"job_hash\":\"x\","
      "\"dp_resized\":2,\"coordinator\":\"n0\",\"members\":[{\"name\":\"n0\",\"rank_begin\":0,"
      "\"rank_end\":2},"
      "{\"name\":\"n1\",\"rank_begin\":2,\"rank_end\":4}],\"spares\":[\"n2\"]}");
  mt_assignment a;
  char *job = NULL;
  int rc = mt_rdzv_assignment(store, 1, &a, &job);
  CHECK(rc == 1 && a.n_members == 2 && a.members[1].rank_begin == 2 && a.n_spares == 1 &&
            a.dp_resized == 2,
        "a well-formed assignment: rc %d (%s)", rc, rc == 1 ? "" : mt_errmsg());
  if (rc == 1) mt_assignment_free(&a), free(job);
  return 0;
}

static mt_node_desc desc(const char *name, const char *host, int pid, const char *url) {
  mt_node_desc d = {.n_devices = 1, .pid = pid};
  snprintf(d.name, sizeof d.name, "%s", name);
  snprintf(d.host, sizeof d.host, "%s", host);
  snprintf(d.version, sizeof d.version, "test");
  snprintf(d.control_url, sizeof d.control_url, "%s", url);
  snprintf(d.devices[0], sizeof d.devices[0], "cpu:0");
  return d;
}

/* The verdict on join seq after a tick: 1 accepted, 2 for now, MT_EINVAL
 * refused (mt_errmsg() says why), 0 none. */
static int verdict(mt_coord *c, int64_t now_ms, int64_t seq) {
  CHECK(mt_coord_tick(c, now_ms) == 0, "tick at %lld: %s", (long long)now_ms, mt_errmsg());
  int watch = 0;
  return mt_rdzv_verdict(store, seq, &watch);
}

/* A join of its own number, as a daemon's first join draws one. */
static int fresh_join(const mt_node_desc *d, int64_t *seq) {
  *seq = 0;
  return mt_rdzv_join(store, d, seq);
}

static int test_coordinator_passes_over_what_it_cannot_read(mt_coord *c) {
  int64_t seq;
  /* a join that is not JSON */
  REQUIRE(!mt_store_add(store, "nodes/seq", 1, &seq) && seq == 1, "numbering");
  set("nodes/1", "}garbage");
  mt_node_desc a = desc("a", "host-a", 100, "http://127.0.0.1:8470");
  REQUIRE(!fresh_join(&a, &seq) && seq == 2, "join a: %s", mt_errmsg());
  int v1 = verdict(c, 0, 1);
  char why1[512]; /* the next tick may set another message on its way */
  snprintf(why1, sizeof why1, "%s", mt_errmsg());
  int v2 = verdict(c, 10, 2);
  CHECK(v1 == MT_EINVAL && strstr(why1, "not JSON"), "join 1: %d (%s)", v1, why1);
  CHECK(v2 == 1, "join 2 after the bad one: %d (%s)", v2, v2 < 0 ? mt_errmsg() : "");

  /* a control URL that is not http(s) */
  mt_node_desc evil = desc("evil", "host-e", 101, "javascript:alert(document.domain)");
  REQUIRE(!fresh_join(&evil, &seq), "join evil: %s", mt_errmsg());
  int ve = verdict(c, 20, seq);
  CHECK(ve == MT_EINVAL && strstr(mt_errmsg(), "control URL"), "javascript: URL: %d", ve);

  /* a and another daemon named a: on its host, for now; elsewhere, for good */
  mt_node_desc again = desc("a", "host-a", 200, "http://127.0.0.1:8470");
  REQUIRE(!fresh_join(&again, &seq), "join a again: %s", mt_errmsg());
  int va = verdict(c, 30, seq);
  CHECK(va == 2 && strstr(mt_errmsg(), "still counted as the daemon of pid 100 on host-a"),
        "a restarted on its host: %d (%s)", va, mt_errmsg());
  /* in a container the daemon is pid 1 at every start: its instance tells */
  mt_node_desc pid1 = desc("a", "host-a", 100, "http://127.0.0.1:8470");
  snprintf(pid1.instance, sizeof pid1.instance, "0123456789abcdef");
  REQUIRE(!fresh_join(&pid1, &seq), "join a under its pid: %s", mt_errmsg());
  int vp = verdict(c, 35, seq);
  CHECK(vp == 2 && strstr(mt_errmsg(), "still counted as the daemon of pid 100 on host-a"),
        "a restarted under the same pid: %d (%s)", vp, mt_errmsg());
  mt_node_desc same = desc("a", "host-a", 100, "http://127.0.0.1:8470");
  REQUIRE(!fresh_join(&same, &seq), "join a twice: %s", mt_errmsg());
  int vs = verdict(c, 38, seq);
  CHECK(vs == MT_EINVAL && strstr(mt_errmsg(), "already joined"), "the same daemon twice: %d", vs);
  mt_node_desc other = desc("a", "host-b", 300, "");
  REQUIRE(!fresh_join(&other, &seq), "join a elsewhere: %s", mt_errmsg());
  int vo = verdict(c, 40, seq);
  CHECK(vo == MT_EINVAL && strstr(mt_errmsg(), "already joined"), "a on another host: %d", vo);

  /* a heartbeat counter that is not a number, then a join numbered and not
   * written yet (its node is slow, died, or lost the numbering's reply and
   * took another): the joins after it are decided at once, it when it is
   * written, and one never written is passed over after 30 s */
  set("hb/a", "many");
  REQUIRE(!mt_store_add(store, "nodes/seq", 1, &seq), "numbering");
  int64_t gap = seq;
  mt_node_desc b = desc("b", "host-b", 400, "");
  REQUIRE(!fresh_join(&b, &seq) && seq == gap + 1, "join b: %s", mt_errmsg());
  int vb = verdict(c, 1000, seq);
  CHECK(vb == 1, "b behind an unwritten join: %d (%s)", vb, vb < 0 ? mt_errmsg() : "");
  static const char late_join[] =
      "{\"name\":\"late\",\"host\":\"host-l\",\"devices\":[\"cpu:0\"],\"version\":\"test\","
      "\"job_hash\":\"\",\"control_url\":\"\",\"pid\":500,\"instance\":\"\"}";
  char gap_key[64];
  snprintf(gap_key, sizeof gap_key, "nodes/%lld", (long long)gap);
  set(gap_key, late_join);
  int vl = verdict(c, 2000, gap);
  CHECK(vl == 1, "the join written after b's: %d (%s)", vl, vl < 0 ? mt_errmsg() : "");
  REQUIRE(!mt_store_add(store, "nodes/seq", 1, &seq), "numbering");
  int64_t never = seq;
  mt_node_desc e = desc("e", "host-e2", 600, "");
  REQUIRE(!fresh_join(&e, &seq), "join e: %s", mt_errmsg());
  int ve2 = verdict(c, 3000, seq);
  CHECK(ve2 == 1, "e behind a join never written: %d", ve2);
  CHECK(verdict(c, 40000, never) == 0, "a verdict on the join never written");
  snprintf(gap_key, sizeof gap_key, "nodes/%lld", (long long)never);
  set(gap_key, "{\"name\":\"f\",\"host\":\"host-f\",\"devices\":[\"cpu:0\"],\"version\":\"test\"}");
  int vf = verdict(c, 41000, never);
  CHECK(vf == 0, "a join written after 30 s unwritten was decided: %d", vf);

  /* a node's own status that is not JSON: the cluster's is still written */
  set("node/a/status", "}garbage");
  REQUIRE(!mt_store_del(store, "cluster/status"), "del: %s", mt_errmsg());
  CHECK(mt_coord_tick(c, 60000) == 0, "tick with a bad node status: %s", mt_errmsg());
  CHECK(mt_store_check(store, "cluster/status") == 1, "cluster/status not written");

  /* a request that is not JSON, then a real one */
  REQUIRE(!mt_store_add(store, "ops/seq", 1, &seq), "numbering");
  char key[64];
  snprintf(key, sizeof key, "ops/req/%lld", (long long)seq);
  set(key, "not json");
  CHECK(mt_coord_tick(c, 60010) == 0, "tick after a bad request: %s", mt_errmsg());
  snprintf(key, sizeof key, "ops/resp/%lld", (long long)seq);
  void *resp = NULL;
  size_t bytes = 0;
  char text[512] = "";
  if (!mt_store_get(store, key, &resp, &bytes, 0))
    snprintf(text, sizeof text, "%.*s", (int)bytes, (char *)resp);
  free(resp);
  CHECK(strstr(text, "\"status\":501"), "the bad request's answer: \"%s\"", text);
  return 0;
}

int main(void) {
  REQUIRE(!mt_store_mem_new(&store), "store: %s", mt_errmsg());
  test_forged_assignments_are_refused();
  mt_coord_opts o = test_coord_opts(store);
  o.pp = 2, o.last_call_ms = o.heartbeat_timeout_ms = o.reform_timeout_ms = 100000;
  mt_coord *c;
  REQUIRE(!mt_coord_new(&o, &c), "coordinator: %s", mt_errmsg());
  test_coordinator_passes_over_what_it_cannot_read(c);
  mt_coord_free(c);
  mt_store_free(store);
  printf("test_rdzv_forged: %s\n", failures ? "FAILED" : "ok");
  return failures ? 1 : 0;
}
