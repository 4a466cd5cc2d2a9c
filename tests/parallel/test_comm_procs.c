/* test_comm_procs — the world group's backend, MT_COMM_GLOO_PROCS
 * (daemon/comm/procs.c): ranks that are threads of a few processes, which
 * meet in their process's memory and cross between processes through one
 * Gloo group of the processes. Checked:
 *   - every collective, every dtype, against the serial reference
 *     (comm_check.c), and 16 MB all-reduces and reduce-scatters: with every
 *     rank a thread of this process (no Gloo at all), and over 3 processes
 *     of 2, 3 and 1 threads (uneven: the gathers' blocks are padded);
 *   - point to point between every ordered pair of ranks, inside a process
 *     and across, in order, with odd sizes; a size the receiver does not
 *     expect is refused naming both;
 *   - a process SIGKILLed in a loop of all-reduces makes every thread of
 *     every other process fail within the deadline, none hanging;
 *   - a thread that never comes to a collective fails its process's others
 *     within the deadline naming how many did not come; an abort from
 *     another thread fails them at once;
 *   - a thread slow from the store's join to its process's share finds the
 *     group formed, though the others made it and would have left it;
 *   - forming the group of 2 processes of 8 threads asks the store a
 *     fraction of what a Gloo mesh of the same 16 ranks asks.
 * Children are forked before any thread starts, stopped by pid, reaped, and
 * die with this process (PR_SET_PDEATHSIG).
 */
#include "comm.h"
#include "comm_check.h"
#include "err.h"
#include "store.h"

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "counting_store.h"
#include "mt_check.h"

#define MAX_THREADS 16

/* ------------------------------------------------------------ rank threads */

typedef struct rank_ctx {
  mt_store *store;
  const char *prefix;
  mt_comm_backend backend;
  int rank, size, begin, count, timeout_ms;
  int (*body)(struct rank_ctx *x, mt_comm *c);
  int rc;
  char err[2048];
  double elapsed_s;
} rank_ctx;

/* The rank whose thread is slow (late_ms) from the store's join to its
 * share: late_get, a store's get that returns late for that thread's read
 * of the join's "all" key */
static int late_rank = -1, late_ms;
static __thread int thread_rank = -1;

static int late_get(mt_store *s, const char *key, void **value, size_t *bytes, int timeout_ms) {
  mt_counting_store *c = (mt_counting_store *)s;
  int rc = c->inner->get(c->inner, key, value, bytes, timeout_ms);
  size_t n = strlen(key);
  if (thread_rank == late_rank && n > 4 && !strcmp(key + n - 4, "/all"))
    usleep((useconds_t)late_ms * 1000);
  return rc;
}

/* The rank a test's aborter aborts (set before its thread starts), and its
 * comm while its body runs: run_threads writes the whole rank_ctx, so the
 * aborter does not read it there */
static rank_ctx *abort_target;
static _Atomic(mt_comm *) abort_comm;

static void *rank_main(void *p) {
  rank_ctx *x = p;
  double t0 = now_s();
  thread_rank = x->rank;
  mt_comm_opts o = {.store = x->store,
                    .name = "world",
                    .prefix = x->prefix,
                    .rank = x->rank,
                    .size = x->size,
                    .timeout_ms = x->timeout_ms,
                    .backend = x->backend,
                    .local_begin = x->begin,
                    .local_count = x->count};
  mt_comm *c = NULL;
  x->rc = mt_comm_create(&c, &o);
  if (x->rc) {
    snprintf(x->err, sizeof x->err, "%s", mt_errmsg());
  } else {
    if (x == abort_target) atomic_store(&abort_comm, c);
    x->rc = x->body(x, c);
    if (x->rc && !x->err[0]) snprintf(x->err, sizeof x->err, "%s", mt_errmsg());
  }
  x->elapsed_s = now_s() - t0;
  if (x == abort_target) atomic_store(&abort_comm, NULL);
  mt_comm_destroy(c);
  return NULL;
}

/* Runs body on this process's ranks [begin, begin + count) of size; with
 * started < count only the first started come. */
static void run_threads(rank_ctx *x, mt_store *store, const char *prefix, mt_comm_backend be,
                        int begin, int count, int started, int size, int timeout_ms,
                        int (*body)(rank_ctx *, mt_comm *)) {
  pthread_t th[MAX_THREADS];
  for (int i = 0; i < started; i++) {
    x[i] = (rank_ctx){.store = store,
                      .prefix = prefix,
                      .backend = be,
                      .rank = begin + i,
                      .size = size,
                      .begin = begin,
                      .count = count,
                      .timeout_ms = timeout_ms,
                      .body = body};
    pthread_create(&th[i], NULL, rank_main, &x[i]);
  }
  for (int i = 0; i < started; i++) pthread_join(th[i], NULL);
}

/* ------------------------------------------------------------ bodies */

/* Every ordered pair (a, b) in one order all ranks follow: a sends b three
 * messages of odd sizes, which b checks, value by value */
static int check_pairs(mt_comm *c, char *err, size_t cap) {
  int me = mt_comm_rank(c), n = mt_comm_size(c);
  static const size_t sizes[] = {1, 13, 4099};
  int32_t *buf = malloc(4099 * sizeof *buf);
  if (!buf) return snprintf(err, cap, "out of memory"), -1;
  for (int a = 0; a < n; a++)
    for (int b = 0; b < n; b++) {
      if (a == b || (me != a && me != b)) continue;
      for (int k = 0; k < 3; k++) {
        size_t m = sizes[k];
        int rc;
        if (me == a) {
          for (size_t i = 0; i < m; i++) buf[i] = (int32_t)(a * 100000 + b * 1000 + k * 10 + i);
          rc = mt_comm_send(c, buf, m, MT_COMM_I32, b);
        } else {
          memset(buf, 0xff, m * sizeof *buf);
          rc = mt_comm_recv(c, buf, m, MT_COMM_I32, a);
          for (size_t i = 0; !rc && i < m; i++)
            if (buf[i] != (int32_t)(a * 100000 + b * 1000 + k * 10 + i)) {
              snprintf(err, cap, "message %d from %d to %d: element %zu is %d", k, a, b, i, buf[i]);
              free(buf);
              return -1;
            }
        }
        if (rc) {
          snprintf(err, cap, "message %d from %d to %d: %s", k, a, b, mt_errmsg());
          free(buf);
          return -1;
        }
      }
    }
  free(buf);
  return 0;
}

static int body_all(rank_ctx *x, mt_comm *c) {
  if (check_collectives(c, x->err, sizeof x->err)) return -1;
  if (check_large(c, 16u << 20, x->err, sizeof x->err)) return -1;
  if (check_pairs(c, x->err, sizeof x->err)) return -1;
  return 0;
}

/* all-reduces until one fails (a peer process killed): announces its first */
static int body_loop(rank_ctx *x, mt_comm *c) {
  double v[4] = {1, 2, 3, 4};
  double until = now_s() + 60;
  for (long it = 0; now_s() < until; it++) {
    int rc = mt_comm_allreduce(c, v, v, 4, MT_COMM_F64, MT_COMM_MAX);
    if (rc) return rc;
    if (it == 0) {
      char key[64];
      snprintf(key, sizeof key, "ready/%d", x->rank);
      x->store->set(x->store, key, "1", 1);
    }
  }
  snprintf(x->err, sizeof x->err, "nothing failed within 60 s");
  return -1;
}

static int body_mismatch(rank_ctx *x, mt_comm *c) {
  int32_t v[8] = {0};
  if (x->rank == 0) return mt_comm_send(c, v, 8, MT_COMM_I32, 1);
  if (x->rank == 1) return mt_comm_recv(c, v, 4, MT_COMM_I32, 0);
  return 0;
}

static int body_allreduce_once(rank_ctx *x, mt_comm *c) {
  (void)x;
  double v = 1;
  return mt_comm_allreduce(c, &v, &v, 1, MT_COMM_F64, MT_COMM_SUM);
}

/* ------------------------------------------------------------ processes */

typedef struct child {
  pid_t pid;
  int status;
} child;

/* Forks a process running ranks [begin, begin + count) of size with body;
 * it exits 0 when every thread's body returned 0, else 1 (messages on
 * stderr, and in dir/err.<rank>) */
static pid_t spawn(const char *dir, const char *prefix, int begin, int count, int size,
                   int timeout_ms, int (*body)(rank_ctx *, mt_comm *)) {
  pid_t parent = getpid();
  pid_t pid = fork();
  if (pid != 0) return pid;
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (getppid() != parent) _exit(127);
  mt_store *s;
  if (mt_store_file_new(dir, &s)) _exit(126);
  rank_ctx x[MAX_THREADS];
  run_threads(x, s, prefix, MT_COMM_GLOO_PROCS, begin, count, count, size, timeout_ms, body);
  int bad = 0;
  for (int i = 0; i < count; i++)
    if (x[i].rc) {
      bad = 1;
      fprintf(stderr, "rank %d (%.1f s): %s\n", x[i].rank, x[i].elapsed_s, x[i].err);
      char path[4096];
      snprintf(path, sizeof path, "%s/err.%d", dir, x[i].rank);
      FILE *f = fopen(path, "w");
      if (f) fprintf(f, "%.1f %s\n", x[i].elapsed_s, x[i].err), fclose(f);
    }
  s->free(s);
  _exit(bad);
}

/* Waits for every child until deadline (now_s()), then kills and reaps
 * the rest; how many had to be killed */
static int reap(child *c, int n, double deadline) {
  int left = n, killed = 0;
  while (left && now_s() < deadline) {
    left = 0;
    for (int i = 0; i < n; i++) {
      if (c[i].pid <= 0) continue;
      if (waitpid(c[i].pid, &c[i].status, WNOHANG) == c[i].pid)
        c[i].pid = 0;
      else
        left++;
    }
    if (left) usleep(20000);
  }
  for (int i = 0; i < n; i++)
    if (c[i].pid > 0) {
      kill(c[i].pid, SIGKILL);
      waitpid(c[i].pid, &c[i].status, 0);
      c[i].pid = 0, killed++;
    }
  return killed;
}

static void make_tmpdir(char *dir, size_t cap) {
  snprintf(dir, cap, "/tmp/test_comm_procs.XXXXXX");
  if (!mkdtemp(dir)) dir[0] = 0;
}

static void rmdir_all(const char *dir) {
  char cmd[4200];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
  if (system(cmd)) {
  }
}

/* ------------------------------------------------------------ tests */

static void test_one_process_of_6_threads_matches_the_reference(void) {
  mt_store *s;
  CHECK(!mt_store_mem_new(&s), "mem store: %s", mt_errmsg());
  rank_ctx x[6];
  run_threads(x, s, "one/world", MT_COMM_GLOO_PROCS, 0, 6, 6, 6, 20000, body_all);
  for (int i = 0; i < 6; i++) CHECK(x[i].rc == 0, "rank %d: %s", i, x[i].err);
  s->free(s);
}

static void test_3_processes_of_2_3_1_threads_match_the_reference(void) {
  char dir[64];
  make_tmpdir(dir, sizeof dir);
  static const int counts[] = {2, 3, 1};
  child c[3];
  for (int p = 0, b = 0; p < 3; b += counts[p++])
    c[p] = (child){spawn(dir, "three/world", b, counts[p], 6, 30000, body_all), 0};
  int killed = reap(c, 3, now_s() + 120);
  CHECK(!killed, "%d processes did not finish within 120 s", killed);
  for (int p = 0; p < 3; p++)
    CHECK(WIFEXITED(c[p].status) && WEXITSTATUS(c[p].status) == 0,
          "process %d (ranks from %d) ended with status %#x", p, p ? counts[0] : 0, c[p].status);
  rmdir_all(dir);
}

static void test_a_size_the_receiver_does_not_expect_is_refused(void) {
  mt_store *s;
  CHECK(!mt_store_mem_new(&s), "mem store: %s", mt_errmsg());
  rank_ctx x[2];
  run_threads(x, s, "mismatch/world", MT_COMM_GLOO_PROCS, 0, 2, 2, 2, 5000, body_mismatch);
  CHECK(x[1].rc != 0 && strstr(x[1].err, "rank 0 sent 32 bytes where rank 1 expected 16"),
        "receiver: %d %s", x[1].rc, x[1].err);
  CHECK(x[0].rc != 0, "sender returned 0");
  s->free(s);
}

static void test_a_killed_process_fails_every_thread_of_the_others_within_deadline(void) {
  char dir[64];
  make_tmpdir(dir, sizeof dir);
  enum { TIMEOUT_MS = 3000 };
  static const int counts[] = {2, 2, 2};
  child c[3];
  for (int p = 0; p < 3; p++)
    c[p] = (child){spawn(dir, "kill/world", 2 * p, counts[p], 6, TIMEOUT_MS, body_loop), 0};
  mt_store *s;
  CHECK(!mt_store_file_new(dir, &s), "file store: %s", mt_errmsg());
  int ready = 0;
  for (double until = now_s() + 60; ready < 6 && now_s() < until;) {
    ready = 0;
    for (int r = 0; r < 6; r++) {
      char key[32];
      snprintf(key, sizeof key, "ready/%d", r);
      ready += s->check(s, key) == 1;
    }
    if (ready < 6) usleep(20000);
  }
  CHECK(ready == 6, "%d of 6 ranks looped", ready);
  double t0 = now_s();
  kill(c[1].pid, SIGKILL);
  waitpid(c[1].pid, &c[1].status, 0);
  c[1].pid = 0;
  int killed = reap(c, 3, t0 + 3.0 * TIMEOUT_MS / 1000 + 5);
  CHECK(!killed, "%d processes hung past twice the deadline", killed);
  for (int p = 0; p < 3; p += 2) {
    CHECK(WIFEXITED(c[p].status) && WEXITSTATUS(c[p].status) == 1,
          "process %d ended with status %#x (want exit 1: its ranks failed)", p, c[p].status);
    for (int r = 2 * p; r < 2 * p + 2; r++) {
      char path[256], line[2100] = "";
      snprintf(path, sizeof path, "%s/err.%d", dir, r);
      FILE *f = fopen(path, "r");
      if (f && !fgets(line, sizeof line, f)) line[0] = 0;
      if (f) fclose(f);
      CHECK(strstr(line, "comm world") && strstr(line, "allreduce"),
            "rank %d's failure does not name the group and the operation: %s", r, line);
      printf("rank %d: %s", r, line);
    }
  }
  s->free(s);
  rmdir_all(dir);
}

static atomic_int aborted;

/* Ranks 0-2 all-reduce; rank 3 stays away: 3 s, or until the abort */
static int body_rank3_away(rank_ctx *x, mt_comm *c) {
  if (x->rank != 3) return body_allreduce_once(x, c);
  for (double until = now_s() + 3; now_s() < until && !atomic_load(&aborted);) usleep(10000);
  return 0;
}

static void *aborter(void *p) {
  (void)p;
  mt_comm *c = NULL;
  for (double until = now_s() + 10; !c && now_s() < until; usleep(10000))
    c = atomic_load(&abort_comm);
  usleep(300000); /* its all-reduce is waiting for rank 3 by now */
  if (c) mt_comm_abort(c);
  atomic_store(&aborted, 1);
  return NULL;
}

static void test_a_thread_that_never_comes_and_an_abort_fail_the_others(void) {
  mt_store *s;
  CHECK(!mt_store_mem_new(&s), "mem store: %s", mt_errmsg());
  rank_ctx x[4];
  double t0 = now_s();
  run_threads(x, s, "absent/world", MT_COMM_GLOO_PROCS, 0, 4, 4, 4, 1000, body_rank3_away);
  for (int i = 0; i < 3; i++)
    CHECK(x[i].rc == MT_ETIMEDOUT && x[i].elapsed_s < 2.5 &&
              strstr(x[i].err, "1 of this process's 4 ranks (world ranks from 0) did not come "
                               "within 1000 ms"),
          "rank %d (%.1f s): %d %s", i, x[i].elapsed_s, x[i].rc, x[i].err);
  printf("without rank 3 (%.1f s): %s\n", now_s() - t0, x[0].err);

  /* the same with a long deadline, cut short by an abort of rank 1's group */
  pthread_t a;
  rank_ctx y[4];
  memset(y, 0, sizeof y);
  abort_target = &y[1];
  atomic_store(&aborted, 0);
  pthread_create(&a, NULL, aborter, NULL);
  run_threads(y, s, "aborted/world", MT_COMM_GLOO_PROCS, 0, 4, 4, 4, 60000, body_rank3_away);
  pthread_join(a, NULL);
  for (int i = 0; i < 3; i++)
    CHECK(y[i].rc == MT_ECANCELED && y[i].elapsed_s < 5, "rank %d (%.1f s): %d %s", i,
          y[i].elapsed_s, y[i].rc, y[i].err);
  printf("aborted: %s\n", y[0].err);
  s->free(s);
}

static int body_none(rank_ctx *x, mt_comm *c) {
  (void)x, (void)c;
  return 0;
}

/* 16 ranks as 2 processes of 8 threads: the requests of forming the group,
 * each process's own, for GLOO_PROCS and for a Gloo mesh of the 16 */
static long formation_requests(mt_comm_backend be, const char *prefix) {
  char dir[64];
  make_tmpdir(dir, sizeof dir);
  long total = 0;
  int fds[2][2];
  child c[2];
  for (int p = 0; p < 2; p++) {
    if (pipe(fds[p])) return -1;
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (getppid() != parent) _exit(127);
      mt_store *files = NULL;
      if (mt_store_file_new(dir, &files)) _exit(126);
      mt_counting_store cs;
      mt_counting_store_init(&cs, files);
      rank_ctx x[8];
      run_threads(x, &cs.base, prefix, be, 8 * p, 8, 8, 16, 30000, body_none);
      long n = atomic_load(&cs.requests);
      int bad = 0;
      for (int i = 0; i < 8; i++)
        if (x[i].rc) { /* the parent sees only the exit status: say why here */
          bad = 1;
          fprintf(stderr, "forming %s, rank %d (%.1f s): %s\n", prefix, x[i].rank, x[i].elapsed_s,
                  x[i].err);
        }
      if (write(fds[p][1], &n, sizeof n) != sizeof n) bad = 1;
      _exit(bad);
    }
    c[p] = (child){pid, 0};
    close(fds[p][1]);
  }
  for (int p = 0; p < 2; p++) {
    long n = 0;
    if (read(fds[p][0], &n, sizeof n) == sizeof n) total += n;
    close(fds[p][0]);
  }
  reap(c, 2, now_s() + 60);
  for (int p = 0; p < 2; p++)
    if (!WIFEXITED(c[p].status) || WEXITSTATUS(c[p].status)) {
      fprintf(stderr, "forming %s: process %d ended with status %#x\n", prefix, p, c[p].status);
      total = -1;
    }
  rmdir_all(dir);
  return total;
}

/* The others create and destroy at once: before, a rank slow from the
 * store's join to its share came after they had all left it, made a share
 * of its own and waited there for a leader that had gone */
static void test_a_slow_thread_finds_the_group_formed(void) {
  mt_store *mem;
  CHECK(!mt_store_mem_new(&mem), "mem store: %s", mt_errmsg());
  mt_counting_store late;
  mt_counting_store_init(&late, mem);
  late.base.get = late_get;
  rank_ctx x[4];
  late_rank = 3, late_ms = 300;
  run_threads(x, &late.base, "late/world", MT_COMM_GLOO_PROCS, 0, 4, 4, 4, 3000, body_none);
  late_rank = -1;
  for (int i = 0; i < 4; i++)
    CHECK(x[i].rc == 0, "rank %d (%.1f s): %d %s", i, x[i].elapsed_s, x[i].rc, x[i].err);
  CHECK(x[0].elapsed_s >= 0.25, "rank 0 left the create after %.2f s, before rank 3 came",
        x[0].elapsed_s);
  printf("rank 3 came to its share 300 ms after the join: every rank formed the group (%.2f s, "
         "%.2f s)\n",
         x[0].elapsed_s, x[3].elapsed_s);
  mem->free(mem);
}

static void test_forming_asks_the_store_a_fraction_of_a_mesh(void) {
  long procs = formation_requests(MT_COMM_GLOO_PROCS, "form/procs");
  long mesh = formation_requests(MT_COMM_GLOO, "form/mesh");
  printf("forming 16 ranks as 2 processes of 8: %ld store requests; as a Gloo mesh: %ld\n", procs,
         mesh);
  CHECK(procs > 0 && mesh > 0, "a formation failed (%ld, %ld)", procs, mesh);
  CHECK(procs * 3 < mesh, "%ld requests against the mesh's %ld", procs, mesh);
}

int main(void) {
  signal(SIGPIPE, SIG_IGN);
  /* forks first, while this process has no thread of its own */
  test_3_processes_of_2_3_1_threads_match_the_reference();
  test_a_killed_process_fails_every_thread_of_the_others_within_deadline();
  test_forming_asks_the_store_a_fraction_of_a_mesh();
  test_one_process_of_6_threads_matches_the_reference();
  test_a_size_the_receiver_does_not_expect_is_refused();
  test_a_thread_that_never_comes_and_an_abort_fail_the_others();
  test_a_slow_thread_finds_the_group_formed();
  printf("test_comm_procs: %s\n", failures ? "FAILED" : "ok");
  return failures ? 1 : 0;
}
