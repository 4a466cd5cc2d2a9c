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
  int rc = mt_rdzv_submit_op(store, kind, NULL, timeout_ms, status, &op, detail, (int)cap);
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

int main(void) {
  REQUIRE(!mt_store_mem_new(&store), "store: %s", mt_errmsg());
  mt_coord_opts o = test_coord_opts(store);
  REQUIRE(!mt_coord_new(&o, &coord), "coordinator: %s", mt_errmsg());
  test_requests_given_up_or_never_written_are_passed_over();
  mt_coord_free(coord);
  mt_store_free(store);
  printf("test_rdzv_ops: %s\n", failures ? "FAILED" : "ok");
  return failures ? 1 : 0;
}
