/* store_prefix_check.h — one property of every mt_store with a prefix
 * delete (the in-process, file and TCP stores), checked by test_store and
 * test_store_tcp alike. Include after mt_check.h. */
#ifndef MT_STORE_PREFIX_CHECK_H
#define MT_STORE_PREFIX_CHECK_H

#include <inttypes.h>
#include <stdint.h>

#include "store.h"

/* del_prefix removes exactly the keys that start with the prefix: "gen/1/"
 * takes gen/1/... and nothing of gen/10/, of a key "gen/1" or of another
 * prefix, and says how many it took. */
static void test_del_prefix_removes_exactly_the_keys_under_it(mt_store *s) {
  static const char *gone[] = {"gen/1/job", "gen/1/comm/tp0/join/3", "gen/1/acted/2"};
  static const char *kept[] = {"gen/10/job", "gen/1", "gen/2/job", "xgen/1/job", "gen/11/x"};
  for (size_t i = 0; i < 3; i++) CHECK(!mt_store_set(s, gone[i], "v", 1), "set %s", gone[i]);
  for (size_t i = 0; i < 5; i++) CHECK(!mt_store_set(s, kept[i], "v", 1), "set %s", kept[i]);
  int64_t n = -1;
  int rc = mt_store_del_prefix(s, "gen/1/", &n);
  CHECK(!rc && n == 3, "%s: del_prefix gen/1/: %s, %" PRId64 " deleted (want 3): %s", s->kind,
        mt_strerror(rc), n, mt_errmsg());
  for (size_t i = 0; i < 3; i++)
    CHECK(mt_store_check(s, gone[i]) == 0, "%s: %s survived", s->kind, gone[i]);
  for (size_t i = 0; i < 5; i++)
    CHECK(mt_store_check(s, kept[i]) == 1, "%s: %s was deleted", s->kind, kept[i]);
  rc = mt_store_del_prefix(s, "gen/1/", &n);
  CHECK(!rc && n == 0, "%s: del_prefix again: %s, %" PRId64 " deleted", s->kind, mt_strerror(rc),
        n);
  for (size_t i = 0; i < 5; i++) mt_store_del(s, kept[i]);
}

#endif
