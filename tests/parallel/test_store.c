/* test_store — the bootstrap stores (in-process and file-backed): values round
 * trip, a get waits for a later set and times out naming the key, add is
 * atomic across threads (and processes, for the file store), readers never see
 * a partial value. */
#include "err.h"
#include "fileio.h"
#include "store.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "mt_check.h"
#include "store_prefix_check.h"

static void test_values_round_trip(mt_store *s) {
  const char bin[] = {'a', 0, 'b', (char)0xff, 0};
  CHECK(!mt_store_set(s, "gen/0/comm/tp0/gloo/0", bin, sizeof bin), "%s", mt_errmsg());
  void *v = NULL;
  size_t n = 0;
  CHECK(!mt_store_get(s, "gen/0/comm/tp0/gloo/0", &v, &n, 0), "%s", mt_errmsg());
  CHECK(v && n == sizeof bin && !memcmp(v, bin, n), "%s: binary value did not round trip", s->kind);
  free(v);
  CHECK(!mt_store_set(s, "gen/0/comm/tp0/gloo/0", "x", 1), "%s", mt_errmsg());
  v = NULL;
  CHECK(!mt_store_get(s, "gen/0/comm/tp0/gloo/0", &v, &n, 0) && n == 1 && !strcmp(v, "x"),
        "%s: overwrite", s->kind);
  free(v);
  CHECK(mt_store_check(s, "gen/0/comm/tp0/gloo/0") == 1, "%s: check of a set key", s->kind);
  CHECK(mt_store_check(s, "no/such/key") == 0, "%s: check of a missing key", s->kind);
  CHECK(!mt_store_del(s, "gen/0/comm/tp0/gloo/0"), "%s", mt_errmsg());
  CHECK(mt_store_check(s, "gen/0/comm/tp0/gloo/0") == 0, "%s: check after delete", s->kind);
  CHECK(mt_store_del(s, "gen/0/comm/tp0/gloo/0") == MT_ENOENT, "%s: delete twice", s->kind);
  CHECK(!mt_store_set(s, "empty", "", 0), "%s", mt_errmsg());
  v = NULL;
  CHECK(!mt_store_get(s, "empty", &v, &n, 0) && n == 0 && v, "%s: empty value", s->kind);
  free(v);
}

typedef struct {
  mt_store *s;
  const char *key;
  int delay_ms, adds;
} job;

static void *set_later(void *p) {
  job *j = p;
  usleep((useconds_t)j->delay_ms * 1000);
  mt_store_set(j->s, j->key, "late", 4);
  return NULL;
}

static void test_get_waits_for_a_later_set(mt_store *s) {
  job j = {s, "gen/0/later", 100, 0};
  pthread_t th;
  pthread_create(&th, NULL, set_later, &j);
  double t0 = now_s();
  void *v = NULL;
  int rc = mt_store_get(s, j.key, &v, NULL, 5000);
  double took = now_s() - t0;
  pthread_join(th, NULL);
  CHECK(rc == 0 && v && !strcmp(v, "late"), "%s: get of a later set: %s", s->kind, mt_errmsg());
  CHECK(took >= 0.09 && took < 3.0, "%s: get waited %.3f s for a set after 0.1 s", s->kind, took);
  free(v);
}

static void test_get_times_out_naming_key(mt_store *s) {
  double t0 = now_s();
  void *v = NULL;
  int rc = mt_store_get(s, "gen/0/never", &v, NULL, 200);
  double took = now_s() - t0;
  CHECK(rc == MT_ETIMEDOUT, "%s: rc %s", s->kind, mt_strerror(rc));
  CHECK(strstr(mt_errmsg(), "gen/0/never") && strstr(mt_errmsg(), "200 ms"),
        "%s: message names no key or timeout: %s", s->kind, mt_errmsg());
  CHECK(took >= 0.19 && took < 3.0, "%s: a 200 ms get took %.3f s", s->kind, took);
  CHECK(mt_store_get(s, "gen/0/never", &v, NULL, 0) == MT_ETIMEDOUT, "%s: get without wait",
        s->kind);
}

static void *adder(void *p) {
  job *j = p;
  for (int i = 0; i < j->adds; i++)
    if (mt_store_add(j->s, j->key, 1, NULL)) fprintf(stderr, "add: %s\n", mt_errmsg());
  return NULL;
}

static void test_add_is_atomic_across_threads(mt_store *s) {
  job j = {s, "gen/0/count", 0, 300};
  pthread_t th[4];
  for (int i = 0; i < 4; i++) pthread_create(&th[i], NULL, adder, &j);
  for (int i = 0; i < 4; i++) pthread_join(th[i], NULL);
  int64_t v = 0;
  CHECK(!mt_store_add(s, j.key, 0, &v) && v == 1200, "%s: 4 threads x 300 adds gave %" PRId64,
        s->kind, v);
  CHECK(!mt_store_add(s, j.key, -200, &v) && v == 1000, "%s: add -200 gave %" PRId64, s->kind, v);
  mt_store_set(s, "gen/0/text", "abc", 3);
  CHECK(mt_store_add(s, "gen/0/text", 1, &v) == MT_EINVAL, "%s: add to a non-integer", s->kind);
  /* past 64 bits: refused, the count kept (as the TCP server refuses it) */
  CHECK(!mt_store_add(s, "gen/0/big", INT64_MAX - 1, &v), "%s: %s", s->kind, mt_errmsg());
  CHECK(mt_store_add(s, "gen/0/big", 2, &v) == MT_EINVAL && strstr(mt_errmsg(), "overflow"),
        "%s: an add past INT64_MAX: %s", s->kind, mt_errmsg());
  CHECK(!mt_store_add(s, "gen/0/big", 0, &v) && v == INT64_MAX - 1,
        "%s: after the refused add: %" PRId64, s->kind, v);
}

static void test_file_add_is_atomic_across_processes(const char *dir) {
  pid_t pid[3];
  for (int i = 0; i < 3; i++) {
    pid[i] = fork();
    if (pid[i] == 0) {
      mt_store *s;
      if (mt_store_file_new(dir, &s)) _exit(2);
      for (int k = 0; k < 200; k++)
        if (mt_store_add(s, "gen/0/procs", 1, NULL)) _exit(3);
      mt_store_free(s);
      _exit(0);
    }
  }
  int ok = 1;
  for (int i = 0; i < 3; i++) {
    int st = 0;
    waitpid(pid[i], &st, 0);
    ok &= WIFEXITED(st) && WEXITSTATUS(st) == 0;
  }
  mt_store *s;
  int64_t v = 0;
  CHECK(ok, "a child process failed its adds");
  CHECK(!mt_store_file_new(dir, &s) && !mt_store_add(s, "gen/0/procs", 0, &v) && v == 600,
        "file: 3 processes x 200 adds gave %" PRId64, v);
  mt_store_free(s);
}

/* A writer alternates two 256 KB values; a reader must only ever see one of
 * them whole. */
static void *writer(void *p) {
  job *j = p;
  char *a = malloc(256 << 10);
  for (int i = 0; i < j->adds; i++) {
    memset(a, i % 2 ? 'b' : 'a', 256 << 10);
    mt_store_set(j->s, j->key, a, 256 << 10);
  }
  free(a);
  return NULL;
}

static void test_readers_never_see_partial_values(mt_store *s) {
  job j = {s, "gen/0/big", 0, 100};
  mt_store_set(s, j.key, "", 0);
  pthread_t th;
  pthread_create(&th, NULL, writer, &j);
  int partial = 0, reads = 0;
  for (int i = 0; i < 200; i++) {
    void *v = NULL;
    size_t n = 0;
    if (mt_store_get(s, j.key, &v, &n, 1000)) continue;
    reads++;
    const char *c = v;
    if (n && n != 256u << 10) partial++;
    for (size_t k = 1; k < n && !partial; k++) partial += c[k] != c[0];
    free(v);
  }
  pthread_join(th, NULL);
  CHECK(!partial && reads == 200, "%s: %d of %d reads saw a partial value", s->kind, partial,
        reads);
}

static void run_all(mt_store *s) {
  test_values_round_trip(s);
  test_get_waits_for_a_later_set(s);
  test_get_times_out_naming_key(s);
  test_add_is_atomic_across_threads(s);
  test_readers_never_see_partial_values(s);
  test_del_prefix_removes_exactly_the_keys_under_it(s);
}

int main(void) {
  mt_store *s;
  if (mt_store_mem_new(&s)) return fprintf(stderr, "%s\n", mt_errmsg()), 1;
  run_all(s);
  mt_store_free(s);

  char dir[] = "/tmp/mtnlg-store-XXXXXX";
  if (!mkdtemp(dir)) return perror("mkdtemp"), 1;
  if (mt_store_file_new(dir, &s)) return fprintf(stderr, "%s\n", mt_errmsg()), 1;
  run_all(s);
  mt_store_free(s);
  test_file_add_is_atomic_across_processes(dir);
  mt_remove_dir(dir);

  if (failures) fprintf(stderr, "%d check(s) failed\n", failures);
  return failures ? 1 : 0;
}
