/* test_store_fence — a TCP store client fenced to a store (mt_store_tcp_fence:
 * a key that must read a value on every new connection before anything is
 * sent on it), against servers on threads of this process restarted on one
 * loopback port:
 * - the same instance again (coord/instance reads the fence's value): the
 *   requests made while the client was reconnecting go through;
 * - another instance, or a store without the key: the write the client was
 *   asked for fails with MT_ECANCELED naming both values, never reaches the
 *   new store, and every later request fails at once; stats say fenced;
 * - a fence given in mt_store_tcp_opts holds from the first connection, and
 *   one set while connected checks that connection before what follows. */
#include "err.h"
#include "mt_check.h"
#include "store.h"
#include "store_client.h"
#include "store_server.h"

#include <stdio.h>
#include <string.h>

#define FENCE_KEY "coord/instance"

/* A server on port (0: any) holding FENCE_KEY = instance (NULL: none). */
static mt_store_server_thread *serve(int port, const char *instance) {
  mt_store_server_thread *t = NULL;
  if (mt_store_server_run_thread("127.0.0.1", port, NULL, &t)) {
    fprintf(stderr, "server on port %d: %s\n", port, mt_errmsg());
    return NULL;
  }
  if (!instance) return t;
  mt_store *s = NULL;
  int rc = mt_store_tcp_new("127.0.0.1", mt_store_server_thread_port(t), NULL, &s);
  if (!rc) rc = mt_store_set(s, FENCE_KEY, instance, strlen(instance));
  if (rc) fprintf(stderr, "instance %s: %s\n", instance, mt_errmsg());
  mt_store_free(s);
  if (rc) {
    mt_store_server_thread_stop(t);
    return NULL;
  }
  return t;
}

/* Whether key exists on the server at port (a client of its own). */
static int holds(int port, const char *key) {
  mt_store *s = NULL;
  if (mt_store_tcp_new("127.0.0.1", port, NULL, &s)) return -1;
  int rc = mt_store_check(s, key);
  mt_store_free(s);
  return rc;
}

/* The first redial comes 1.25 to 2.5 s after a drop: time for serve() to
 * write the instance of the server started again before the client looks,
 * on a loaded machine too. */
static mt_store_tcp_opts quick(void) {
  return (mt_store_tcp_opts){
      .connect_timeout_ms = 15000, .backoff_min_ms = 2500, .backoff_max_ms = 2500};
}

static int test_same_instance_goes_on_another_is_refused(const char *other) {
  mt_store_server_thread *a = serve(0, "aaaa");
  REQUIRE(a, "server a");
  int port = mt_store_server_thread_port(a);
  mt_store_tcp_opts o = quick();
  mt_store *c = NULL;
  REQUIRE(!mt_store_tcp_new("127.0.0.1", port, &o, &c), "client: %s", mt_errmsg());
  CHECK(!mt_store_set(c, "before", "1", 1), "set before the fence: %s", mt_errmsg());
  REQUIRE(!mt_store_tcp_fence(c, FENCE_KEY, "aaaa", 4), "fence: %s", mt_errmsg());
  CHECK(!mt_store_set(c, "fenced", "1", 1), "set on the connection made before: %s", mt_errmsg());

  /* the same instance on the same port: the write made meanwhile goes through */
  mt_store_server_thread_stop(a);
  a = serve(port, "aaaa");
  REQUIRE(a, "server a again on port %d", port);
  CHECK(!mt_store_set(c, "again", "1", 1), "set after a reconnect to aaaa: %s", mt_errmsg());
  CHECK(holds(port, "again") == 1, "the write did not reach the same instance");
  mt_store_tcp_stats st;
  CHECK(!mt_store_tcp_get_stats(c, &st) && !st.fenced && st.connects >= 2,
        "fenced %d, %llu connects", st.fenced, (unsigned long long)st.connects);

  /* another instance (or none): nothing this client writes lands there */
  mt_store_server_thread_stop(a);
  mt_store_server_thread *b = serve(port, other);
  REQUIRE(b, "server b on port %d", port);
  int rc = mt_store_set(c, "late", "1", 1);
  CHECK(rc == MT_ECANCELED && strstr(mt_errmsg(), "not the one this client was fenced to") &&
            strstr(mt_errmsg(), "aaaa") && (!other || strstr(mt_errmsg(), other)),
        "set to instance %s: rc %d, %s", other ? other : "(none)", rc, mt_errmsg());
  CHECK(holds(port, "late") == 0, "the write reached the other instance");
  rc = mt_store_add(c, "count", 1, NULL);
  CHECK(rc == MT_ECANCELED, "a later add: rc %d (%s)", rc, mt_errmsg());
  CHECK(holds(port, "count") == 0, "a later write reached the other instance");
  CHECK(!mt_store_tcp_get_stats(c, &st) && st.fenced, "stats do not say fenced");
  mt_store_free(c);
  mt_store_server_thread_stop(b);
  return 0;
}

static int test_fence_from_the_first_connection(void) {
  mt_store_server_thread *b = serve(0, "bbbb");
  REQUIRE(b, "server b");
  int port = mt_store_server_thread_port(b);
  mt_store_tcp_opts o = quick();
  o.fence_key = FENCE_KEY, o.fence_value = "aaaa", o.fence_bytes = 4;
  mt_store *c = NULL;
  int rc = mt_store_tcp_new("127.0.0.1", port, &o, &c);
  CHECK(rc == MT_ECANCELED && strstr(mt_errmsg(), "bbbb"),
        "a client fenced to aaaa at bbbb: %d, %s", rc, mt_errmsg());
  mt_store_free(c);
  o.fence_value = "bbbb";
  c = NULL;
  rc = mt_store_tcp_new("127.0.0.1", port, &o, &c);
  CHECK(!rc && !mt_store_set(c, "x", "1", 1) && holds(port, "x") == 1,
        "a client fenced to bbbb at bbbb: %d, %s", rc, mt_errmsg());
  mt_store_free(c);
  /* a fence set while connected checks the connection up now too */
  c = NULL;
  mt_store_tcp_opts plain = quick();
  REQUIRE(!mt_store_tcp_new("127.0.0.1", port, &plain, &c), "client: %s", mt_errmsg());
  REQUIRE(!mt_store_tcp_fence(c, FENCE_KEY, "aaaa", 4), "fence: %s", mt_errmsg());
  rc = mt_store_set(c, "y", "1", 1);
  CHECK(rc == MT_ECANCELED && holds(port, "y") == 0,
        "a set after fencing a live connection to another instance: %d, %s", rc, mt_errmsg());
  mt_store_free(c);
  mt_store_server_thread_stop(b);
  return 0;
}

int main(void) {
  test_same_instance_goes_on_another_is_refused("bbbb");
  test_same_instance_goes_on_another_is_refused(NULL);
  test_fence_from_the_first_connection();
  printf("test_store_fence: %s\n", failures ? "FAILED" : "ok");
  return failures ? 1 : 0;
}
