/* test_store_etcd — the store kept in etcd (daemon/cluster/store_etcd.c)
 * against a real three-member etcd cluster on loopback, started here as
 * processes (etcd-server's `etcd`) and stopped by their pids.
 *
 * store.h's contract as the other stores keep it (values of any bytes, a
 * waiting get, adds from threads summing exactly, batched reads, prefix
 * deletes, jobs' prefixes apart), a Gloo group bootstrapped through it, and
 * what etcd is for: losing the member a client talks to, even the leader,
 * loses nothing and stops nobody; losing the quorum fails requests with
 * MT_EIO naming the members (never a get's MT_ETIMEDOUT), and the keys are
 * all there when a quorum is back. An election on a leased key, and the
 * node's election thread (daemon/election.c) keeping its lease and
 * watching the key. Then etcd's users: no name, a wrong password, a role
 * without the prefix, each refused with MT_EPERM. */
#include "comm.h"
#include "election.h"
#include "err.h"
#include "store_etcd.h"

#include <arpa/inet.h>
#include <curl/curl.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "gloo_rank_check.h"
#include "mt_check.h"
#include "store_prefix_check.h"

#define MEMBERS 3

static void sleep_ms(int ms) { usleep((useconds_t)ms * 1000); }

/* ------------------------------------------------------------------ the etcd cluster */

typedef struct member {
  pid_t pid;
  int client_port, peer_port;
  char url[64];
} member;

static member m[MEMBERS];
static char all_endpoints[256];
static const char *etcd_bin;

/* A port nothing listens on now, below the kernel's ephemeral range when
 * that is known (as tools/local_cluster.py's free_port: a port from the
 * range could go to an outgoing connection before etcd binds it), and not
 * handed out before by this process. */
static int free_port(void) {
  static int given[64], n_given;
  int low = 0;
  FILE *f = fopen("/proc/sys/net/ipv4/ip_local_port_range", "r");
  if (f && fscanf(f, "%d", &low) != 1) low = 0;
  if (f) fclose(f);
  for (int attempt = 0; attempt < 1000; attempt++) {
    int want = low > 11000 ? 10000 + rand() % (low - 10000) : 0;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET,
                            .sin_port = htons((uint16_t)want),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    int port = -1;
    if (fd >= 0 && !bind(fd, (struct sockaddr *)&a, sizeof a) &&
        !getsockname(fd, (struct sockaddr *)&a, &len))
      port = ntohs(a.sin_port);
    if (fd >= 0) close(fd);
    int seen = port < 0;
    for (int i = 0; i < n_given && !seen; i++) seen = given[i] == port;
    if (seen) continue;
    if (n_given < 64) given[n_given++] = port;
    return port;
  }
  return -1;
}

/* etcd with the arguments after log (NULL-terminated), its output appended
 * to log, killed with this process: its pid, or -1. */
static pid_t etcd_spawn(const char *log, ...) {
  char *argv[64] = {(char *)etcd_bin};
  va_list ap;
  va_start(ap, log);
  int i = 1;
  while (i < 63 && (argv[i] = va_arg(ap, char *))) i++;
  va_end(ap);
  pid_t parent = getpid(), pid = fork();
  if (pid != 0) return pid;
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (getppid() != parent) _exit(127);
  int fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0644);
  if (fd >= 0) dup2(fd, 1), dup2(fd, 2);
  execv(etcd_bin, argv);
  _exit(127);
}

static int member_start(int i) {
  char name[16], data[256], client[64], peer[64], cluster[512] = "", log[300];
  snprintf(name, sizeof name, "m%d", i);
  snprintf(data, sizeof data, "%s", tmp_path(name));
  snprintf(log, sizeof log, "%s.log", data);
  snprintf(client, sizeof client, "http://127.0.0.1:%d", m[i].client_port);
  snprintf(peer, sizeof peer, "http://127.0.0.1:%d", m[i].peer_port);
  for (int k = 0; k < MEMBERS; k++)
    snprintf(cluster + strlen(cluster), sizeof cluster - strlen(cluster),
             "%sm%d=http://127.0.0.1:%d", k ? "," : "", k, m[k].peer_port);
  /* elections in half a second, not a second: the test waits for them */
  pid_t pid = etcd_spawn(log, "--name", name, "--data-dir", data, "--listen-client-urls", client,
                         "--advertise-client-urls", client, "--listen-peer-urls", peer,
                         "--initial-advertise-peer-urls", peer, "--initial-cluster", cluster,
                         "--initial-cluster-token", "mtnlg-test", "--initial-cluster-state", "new",
                         "--heartbeat-interval", "50", "--election-timeout", "500", "--logger",
                         "zap", "--log-outputs", "stderr", "--log-level", "error", (char *)NULL);
  if (pid < 0) return -1;
  m[i].pid = pid;
  return 0;
}

static void member_kill(int i) {
  if (m[i].pid <= 0) return;
  kill(m[i].pid, SIGKILL);
  waitpid(m[i].pid, NULL, 0);
  m[i].pid = 0;
}

/* A store on the given endpoints (NULL: all members'), waiting up to
 * wait_s for the cluster to answer. */
static mt_store *store_on(const char *endpoints, const char *prefix, double wait_s) {
  mt_store_etcd_opts o = {.prefix = prefix, .dial_timeout_ms = 500, .request_timeout_ms = 5000};
  double deadline = now_s() + wait_s;
  for (;;) {
    mt_store *s = NULL;
    int rc = mt_store_etcd_new(endpoints ? endpoints : all_endpoints, &o, &s);
    if (!rc) return s;
    if (now_s() > deadline) {
      fprintf(stderr, "store on %s: %s\n", endpoints ? endpoints : all_endpoints, mt_errmsg());
      return NULL;
    }
    sleep_ms(200);
  }
}

static int cluster_start(void) {
  for (int i = 0; i < MEMBERS; i++) {
    m[i].client_port = free_port();
    m[i].peer_port = free_port();
    snprintf(m[i].url, sizeof m[i].url, "http://127.0.0.1:%d", m[i].client_port);
    snprintf(all_endpoints + strlen(all_endpoints), sizeof all_endpoints - strlen(all_endpoints),
             "%s%s", i ? "," : "", m[i].url);
  }
  for (int i = 0; i < MEMBERS; i++)
    if (member_start(i)) return -1;
  mt_store *s = store_on(NULL, NULL, 30);
  if (!s) return -1;
  mt_store_free(s);
  return 0;
}

/* POSTs body to a member's path: its JSON reply's text in out, or -1. */
static int post(const char *url, const char *path, const char *body, const char *token, char *out,
                size_t cap);

/* The member that leads now (by its status), or -1. */
static int leader(void) {
  char ids[MEMBERS][32] = {{0}}, lead[32] = "";
  for (int i = 0; i < MEMBERS; i++) {
    char out[4096];
    if (!m[i].pid || post(m[i].url, "/v3/maintenance/status", "{}", NULL, out, sizeof out))
      continue;
    char *p = strstr(out, "\"member_id\":\""), *q = strstr(out, "\"leader\":\"");
    if (p) sscanf(p + 13, "%31[0-9]", ids[i]);
    if (q) sscanf(q + 10, "%31[0-9]", lead);
  }
  for (int i = 0; i < MEMBERS; i++)
    if (ids[i][0] && !strcmp(ids[i], lead)) return i;
  return -1;
}

typedef struct text_buf {
  char *p;
  size_t len, cap;
} text_buf;

static size_t text_write(char *d, size_t sz, size_t n, void *arg) {
  text_buf *t = arg;
  size_t k = sz * n;
  if (t->len + k + 1 > t->cap) return 0;
  memcpy(t->p + t->len, d, k);
  t->len += k;
  t->p[t->len] = 0;
  return k;
}

static int post(const char *url, const char *path, const char *body, const char *token, char *out,
                size_t cap) {
  char full[256], auth[600];
  snprintf(full, sizeof full, "%s%s", url, path);
  CURL *h = curl_easy_init();
  struct curl_slist *hdr = NULL;
  if (token) {
    snprintf(auth, sizeof auth, "Authorization: %s", token);
    hdr = curl_slist_append(hdr, auth);
  }
  text_buf t = {out, 0, cap};
  out[0] = 0;
  curl_easy_setopt(h, CURLOPT_URL, full);
  curl_easy_setopt(h, CURLOPT_POSTFIELDS, body);
  curl_easy_setopt(h, CURLOPT_HTTPHEADER, hdr);
  curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, 5000L);
  curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, text_write);
  curl_easy_setopt(h, CURLOPT_WRITEDATA, &t);
  long status = 0;
  CURLcode rc = curl_easy_perform(h);
  curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
  curl_easy_cleanup(h);
  curl_slist_free_all(hdr);
  return rc || status != 200 ? -1 : 0;
}

/* ------------------------------------------------------------------ the contract */

static void test_values_of_any_bytes_round_trip(mt_store *s) {
  static const char bin[] = {'a', 0, 'b', (char)0xff, '\n', 0, '='};
  CHECK(!mt_store_set(s, "gen/0/bin", bin, sizeof bin), "set: %s", mt_errmsg());
  void *v = NULL;
  size_t n = 0;
  int rc = mt_store_get(s, "gen/0/bin", &v, &n, 0);
  CHECK(!rc && n == sizeof bin && !memcmp(v, bin, n) && ((char *)v)[n] == 0,
        "a value with NULs read back as %zu bytes (want %zu): %s", n, sizeof bin, mt_errmsg());
  free(v);
  for (size_t len = 0; len < 5; len++) { /* every base64 padding, and nothing */
    CHECK(!mt_store_set(s, "gen/0/short", "wxyz", len), "set %zu bytes: %s", len, mt_errmsg());
    v = NULL;
    rc = mt_store_get(s, "gen/0/short", &v, &n, 0);
    CHECK(!rc && n == len && !memcmp(v, "wxyz", len), "%zu bytes read back as %zu", len, n);
    free(v);
  }
  CHECK(mt_store_check(s, "gen/0/bin") == 1, "check of a set key");
  CHECK(mt_store_check(s, "no/such/key") == 0, "check of a missing key");
  CHECK(!mt_store_del(s, "gen/0/bin"), "delete: %s", mt_errmsg());
  CHECK(mt_store_check(s, "gen/0/bin") == 0, "check after delete");
  rc = mt_store_del(s, "gen/0/bin");
  CHECK(rc == MT_ENOENT && strstr(mt_errmsg(), "gen/0/bin"), "second delete: %s (%s)",
        mt_strerror(rc), mt_errmsg());
  rc = mt_store_get(s, "gen/0/bin", &v, &n, 0);
  CHECK(rc == MT_ETIMEDOUT && strstr(mt_errmsg(), "gen/0/bin"), "get of a deleted key: %s (%s)",
        mt_strerror(rc), mt_errmsg());
}

static void test_get_many_reads_present_and_absent_keys(mt_store *s) {
  enum { N = 150 }; /* more than one transaction's reads */
  const char *keys[N];
  char names[N][32];
  for (int i = 0; i < N; i++) {
    snprintf(names[i], sizeof names[i], "many/%03d", i);
    keys[i] = names[i];
    if (i % 3 == 0) mt_store_set(s, names[i], names[i], strlen(names[i]));
  }
  void *v[N];
  size_t b[N];
  int rc = mt_store_get_many(s, keys, N, v, b);
  CHECK(!rc, "get_many: %s", mt_errmsg());
  int wrong = 0;
  for (int i = 0; i < N && !rc; i++) {
    if (i % 3 == 0)
      wrong += !v[i] || b[i] != strlen(names[i]) || memcmp(v[i], names[i], b[i]);
    else
      wrong += v[i] != NULL;
    free(v[i]);
  }
  CHECK(!wrong, "get_many: %d of %d keys read wrong", wrong, N);
  int64_t gone = 0;
  mt_store_del_prefix(s, "many/", &gone);
  CHECK(gone == (N + 2) / 3, "del_prefix many/: %" PRId64 " deleted, want %d", gone, (N + 2) / 3);
}

static void test_add_counts_and_refuses_text(mt_store *s) {
  int64_t r = 0;
  CHECK(!mt_store_add(s, "count", 5, &r) && r == 5, "add to a missing key: %" PRId64, r);
  CHECK(!mt_store_add(s, "count", -7, &r) && r == -2, "add -7: %" PRId64, r);
  void *v;
  size_t n;
  CHECK(!mt_store_get(s, "count", &v, &n, 0) && n == 2 && !memcmp(v, "-2", 2),
        "the count is held as decimal text");
  free(v);
  mt_store_set(s, "text", "abc", 3);
  int rc = mt_store_add(s, "text", 1, &r);
  CHECK(rc == MT_EINVAL && strstr(mt_errmsg(), "not an integer"), "add to text: %s (%s)",
        mt_strerror(rc), mt_errmsg());
  mt_store_del(s, "count");
  mt_store_del(s, "text");
}

typedef struct adder_job {
  mt_store *s;
  int n, failed;
} adder_job;

static void *adder(void *p) {
  adder_job *j = p;
  for (int i = 0; i < j->n; i++)
    if (mt_store_add(j->s, "adds", 1, NULL)) j->failed++;
  return NULL;
}

/* The compare-and-swap under contention: threads on one client and on
 * another, every add counted once. */
static void test_adds_from_threads_sum_exactly(mt_store *s, mt_store *other) {
  pthread_t th[4];
  adder_job j[4];
  for (int i = 0; i < 4; i++) {
    j[i] = (adder_job){.s = i % 2 ? other : s, .n = 100};
    pthread_create(&th[i], NULL, adder, &j[i]);
  }
  int failed = 0;
  for (int i = 0; i < 4; i++) pthread_join(th[i], NULL), failed += j[i].failed;
  int64_t r = -1;
  mt_store_add(s, "adds", 0, &r);
  CHECK(!failed && r == 400, "4 threads x 100 adds: %" PRId64 ", %d failed", r, failed);
  mt_store_del(s, "adds");
}

typedef struct later {
  mt_store *s;
  const char *key;
  int delay_ms;
} later;

static void *set_later(void *p) {
  later *l = p;
  sleep_ms(l->delay_ms);
  mt_store_set(l->s, l->key, "late", 4);
  return NULL;
}

static void test_get_waits_for_another_client_and_times_out_naming_key(mt_store *s,
                                                                       mt_store *other) {
  pthread_t th;
  later l = {other, "gen/0/late", 300};
  pthread_create(&th, NULL, set_later, &l);
  void *v = NULL;
  size_t n = 0;
  double t0 = now_s();
  int rc = mt_store_get(s, "gen/0/late", &v, &n, 10000);
  double took = now_s() - t0;
  pthread_join(th, NULL);
  CHECK(!rc && n == 4 && !memcmp(v, "late", 4), "a waiting get: %s (%s)", mt_strerror(rc),
        mt_errmsg());
  CHECK(took >= 0.25 && took < 3, "the waiting get returned after %.2f s (set at 0.3 s)", took);
  free(v);
  t0 = now_s();
  rc = mt_store_get(s, "gen/0/never", &v, &n, 400);
  took = now_s() - t0;
  CHECK(rc == MT_ETIMEDOUT && strstr(mt_errmsg(), "gen/0/never") && strstr(mt_errmsg(), "400"),
        "a get that runs out: %s (%s)", mt_strerror(rc), mt_errmsg());
  CHECK(took >= 0.39 && took < 2, "a 400 ms get took %.2f s", took);
  rc = mt_store_get(s, "gen/0/never", &v, &n, 0);
  CHECK(rc == MT_ETIMEDOUT, "a get that does not wait: %s", mt_strerror(rc));
  /* a key deleted and set again while one waits: the set answers it */
  mt_store_del(s, "gen/0/late");
  l = (later){other, "gen/0/late", 200};
  pthread_create(&th, NULL, set_later, &l);
  rc = mt_store_get(s, "gen/0/late", &v, &n, 10000);
  pthread_join(th, NULL);
  CHECK(!rc, "a get of a deleted key set again: %s", mt_errmsg());
  if (!rc) free(v);
  mt_store_del(s, "gen/0/late");
}

/* Two jobs' prefixes in one etcd: neither sees, counts or deletes the
 * other's keys. */
static void test_prefixes_keep_jobs_apart(void) {
  mt_store *a = store_on(NULL, "/mtnlg/jobA/", 10), *b = store_on(NULL, "/mtnlg/jobB/", 10);
  if (!a || !b) {
    CHECK(0, "stores with prefixes: %s", mt_errmsg());
    mt_store_free(a), mt_store_free(b);
    return;
  }
  mt_store_set(a, "gen/1/job", "A", 1);
  mt_store_set(b, "gen/1/job", "B", 1);
  void *v = NULL;
  size_t n;
  CHECK(!mt_store_get(a, "gen/1/job", &v, &n, 0) && n == 1 && *(char *)v == 'A', "job A's key");
  free(v);
  int64_t k = 0;
  CHECK(!mt_store_del_prefix(a, "gen/", &k) && k == 1, "job A's del_prefix took %" PRId64, k);
  CHECK(mt_store_check(b, "gen/1/job") == 1, "job A's del_prefix took job B's key");
  mt_store_free(a);
  mt_store_free(b);
}

static void test_a_value_past_etcds_limit_is_refused_naming_it(mt_store *s) {
  size_t n = 3u << 20; /* etcd takes 1.5 MiB requests by default */
  char *big = malloc(n);
  memset(big, 'x', n);
  int rc = mt_store_set(s, "gen/0/big", big, n);
  CHECK(rc == MT_EINVAL && strstr(mt_errmsg(), "gen/0/big") &&
            strstr(mt_errmsg(), "max-request-bytes"),
        "a 3 MiB value: %s (%s)", mt_strerror(rc), mt_errmsg());
  CHECK(!mt_store_set(s, "gen/0/after-big", "ok", 2), "the next set: %s", mt_errmsg());
  /* and a value of 1 MiB, as large as a job's description can get, is kept whole */
  n = 1u << 20;
  for (size_t i = 0; i < n; i++) big[i] = (char)(i * 131 >> 3);
  CHECK(!mt_store_set(s, "gen/0/mb", big, n), "set 1 MiB: %s", mt_errmsg());
  void *v = NULL;
  size_t got = 0;
  CHECK(!mt_store_get(s, "gen/0/mb", &v, &got, 0) && got == n && !memcmp(v, big, n),
        "1 MiB read back as %zu bytes", got);
  free(v);
  free(big);
  mt_store_del(s, "gen/0/mb");
  mt_store_del(s, "gen/0/after-big");
}

/* ------------------------------------------------------------------ a Gloo group */

#define RANKS 4

typedef struct rank_job {
  int rank;
  char err[1024];
} rank_job;

static void *run_rank(void *p) {
  rank_job *j = p;
  mt_store *s = store_on(NULL, "/mtnlg/comm/", 10);
  if (!s)
    snprintf(j->err, sizeof j->err, "rank %d: %s", j->rank, mt_errmsg());
  else
    gloo_rank_check(s, "gen/0/comm/dp.pp0.tp0", j->rank, RANKS, j->err, sizeof j->err);
  mt_store_free(s);
  return NULL;
}

static void test_a_gloo_group_forms_through_etcd(void) {
  rank_job jobs[RANKS];
  pthread_t th[RANKS];
  for (int r = 0; r < RANKS; r++) {
    jobs[r] = (rank_job){.rank = r};
    pthread_create(&th[r], NULL, run_rank, &jobs[r]);
  }
  for (int r = 0; r < RANKS; r++) {
    pthread_join(th[r], NULL);
    CHECK(!jobs[r].err[0], "gloo over etcd: %s", jobs[r].err);
  }
}

/* ------------------------------------------------------------------ an election */

/* Two campaign: one leads; it keeps the key past its TTL by renewing its
 * lease; left to lapse, the key goes and the other's next campaign wins;
 * a leader that resigns frees the key at once. */
static void test_an_election_has_one_leader_until_its_lease_ends(void) {
  mt_store *a = store_on(NULL, "/mtnlg/elect/", 10), *b = store_on(NULL, "/mtnlg/elect/", 10);
  if (!a || !b) {
    CHECK(0, "stores: %s", mt_errmsg());
    mt_store_free(a), mt_store_free(b);
    return;
  }
  int64_t la = 0, lb = 0;
  char held[64];
  int ra = mt_store_etcd_campaign(a, "coord/leader", "A", 1, &la, held, sizeof held);
  int rb = mt_store_etcd_campaign(b, "coord/leader", "B", 1, &lb, held, sizeof held);
  CHECK(ra == 1 && la && rb == 0 && !lb && !strcmp(held, "A"),
        "first campaign %d, second %d (holder \"%s\"): %s", ra, rb, held, mt_errmsg());
  for (int i = 0; i < 8; i++) { /* 2 s: twice the TTL */
    CHECK(!mt_store_etcd_keepalive(a, la), "keepalive %d: %s", i, mt_errmsg());
    sleep_ms(250);
  }
  rb = mt_store_etcd_campaign(b, "coord/leader", "B", 1, &lb, held, sizeof held);
  CHECK(rb == 0 && !strcmp(held, "A"), "a kept lease lost the key: %d, holder \"%s\"", rb, held);
  double t0 = now_s();
  while ((rb = mt_store_etcd_campaign(b, "coord/leader", "B", 1, &lb, held, sizeof held)) == 0 &&
         now_s() - t0 < 10)
    sleep_ms(100);
  double took = now_s() - t0;
  CHECK(rb == 1, "a lapsed lease still holds the key after %.1f s: %s", took, mt_errmsg());
  CHECK(took < 5, "the 1 s lease lapsed only after %.1f s", took);
  int rc = mt_store_etcd_keepalive(a, la);
  CHECK(rc == MT_ENOENT, "the lapsed lease's keepalive: %s (%s)", mt_strerror(rc), mt_errmsg());
  CHECK(!mt_store_etcd_resign(b, lb), "resign: %s", mt_errmsg());
  ra = mt_store_etcd_campaign(a, "coord/leader", "A2", 5, &la, held, sizeof held);
  CHECK(ra == 1, "after the leader resigned: %d (holder \"%s\") %s", ra, held, mt_errmsg());
  /* a leader known dead deposed: only while the key holds its value */
  int dw = mt_store_etcd_depose(b, "coord/leader", "A");
  int dr = mt_store_etcd_depose(b, "coord/leader", "A2");
  rb = mt_store_etcd_campaign(b, "coord/leader", "B2", 5, &lb, held, sizeof held);
  CHECK(dw == 0 && dr == 1 && rb == 1,
        "depose another value %d, its value %d, then a campaign %d (holder \"%s\"): %s", dw, dr, rb,
        held, mt_errmsg());
  mt_store_etcd_resign(b, lb);
  mt_store_etcd_resign(a, la);
  mt_store_free(a);
  mt_store_free(b);
}

/* ------------------------------------------------------------------ the node's election thread */

static int wait_view(mt_election *e, int (*done)(const mt_election_view *), double limit_s,
                     mt_election_view *v) {
  for (double t0 = now_s(); now_s() - t0 < limit_s; sleep_ms(20)) {
    mt_election_view_get(e, v);
    if (done(v)) return 1;
  }
  return 0;
}
static int saw_other(const mt_election_view *v) { return v->other; }
static int saw_absent(const mt_election_view *v) { return v->absent_since_ms != 0; }

/* daemon/election.c, as mtnlgd runs it: the coordinator's thread keeps its
 * 1 s lease for 3 s and writes its state at once when it changes; a
 * follower's thread sees the key gone when the coordinator stops without
 * its lease (resigned), and another coordinator's value when one is
 * elected. Under ThreadSanitizer too (suite tsan). */
static void test_the_election_thread_keeps_the_lease_and_watches_the_key(void) {
  mt_store *root = store_on(NULL, "/mtnlg/thread/", 10);
  if (!root) {
    CHECK(0, "store: %s", mt_errmsg());
    return;
  }
  int64_t lease = 0;
  const char *mine = "00000000000000aa 127.0.0.1:1";
  CHECK(mt_store_etcd_campaign(root, "coord/leader", mine, 1, &lease, NULL, 0) == 1, "campaign: %s",
        mt_errmsg());
  mt_election *coord = NULL, *follower = NULL;
  mt_election_opts o = {.root = root,
                        .leader_key = "coord/leader",
                        .state_key = "coord/state",
                        .leader_value = mine,
                        .lease = lease,
                        .ttl_s = 1,
                        .interval_ms = 200};
  CHECK(!mt_election_start(&o, &coord), "start the coordinator's: %s", mt_errmsg());
  o.lease = 0;
  CHECK(!mt_election_start(&o, &follower), "start a follower's: %s", mt_errmsg());
  if (!coord || !follower) {
    mt_election_stop(coord), mt_election_stop(follower);
    mt_store_free(root);
    return;
  }
  sleep_ms(3000); /* three TTLs */
  mt_election_view v;
  mt_election_view_get(follower, &v);
  CHECK(!v.other && !v.absent_since_ms, "the follower saw the kept lease's key go (other %d)",
        v.other);
  double t0 = now_s();
  mt_election_set_state(coord, "{\"restarts\": 2}");
  void *val = NULL;
  size_t n = 0;
  int rc = mt_store_get(root, "coord/state", &val, &n, 2000);
  CHECK(!rc && n == 15 && now_s() - t0 < 1.0, "the state written %.2f s after it changed: %s",
        now_s() - t0, rc ? mt_errmsg() : (char *)val);
  free(val);
  lease = mt_election_stop(coord);
  CHECK(lease != 0, "the coordinator's thread lost its lease");
  CHECK(!mt_store_etcd_resign(root, lease), "resign: %s", mt_errmsg());
  CHECK(wait_view(follower, saw_absent, 5, &v), "the follower did not see the key go");
  int64_t other_lease = 0;
  mt_store_etcd_campaign(root, "coord/leader", "00000000000000bb 127.0.0.1:2", 5, &other_lease,
                         NULL, 0);
  CHECK(wait_view(follower, saw_other, 5, &v) &&
            !strcmp(v.other_value, "00000000000000bb 127.0.0.1:2"),
        "the follower did not see another coordinator: \"%s\"", v.other_value);
  CHECK(mt_election_stop(follower) == 0, "a follower's thread holds a lease");
  mt_store_etcd_resign(root, other_lease);
  mt_store_del(root, "coord/state");
  mt_store_free(root);
}

/* ------------------------------------------------------------------ losing members */

typedef struct waiter {
  mt_store *s;
  const char *key;
  int timeout_ms, rc;
  char err[600];
  void *v;
  size_t n;
} waiter;

static void *wait_key(void *p) {
  waiter *w = p;
  w->rc = mt_store_get(w->s, w->key, &w->v, &w->n, w->timeout_ms);
  if (w->rc) snprintf(w->err, sizeof w->err, "%s", mt_errmsg());
  return NULL;
}

/* The leader, first in the client's list (so the one it talks to), is
 * SIGKILLed while a get waits on it: a set through the others answers the
 * get, and sets, adds and reads go on under the new leader. */
static void test_losing_the_leader_it_talks_to_stops_nothing(void) {
  int lead = -1;
  for (double t = now_s(); lead < 0 && now_s() - t < 10;) lead = leader(), sleep_ms(50);
  CHECK(lead >= 0, "no leader found");
  if (lead < 0) return;
  char eps[256];
  snprintf(eps, sizeof eps, "%s", m[lead].url);
  for (int i = 0; i < MEMBERS; i++)
    if (i != lead) snprintf(eps + strlen(eps), sizeof eps - strlen(eps), ",%s", m[i].url);
  mt_store *s = store_on(eps, "/mtnlg/ha/", 10), *other = store_on(NULL, "/mtnlg/ha/", 10);
  if (!s || !other) {
    CHECK(0, "stores: %s", mt_errmsg());
    mt_store_free(s), mt_store_free(other);
    return;
  }
  for (int i = 0; i < 20; i++) {
    char k[32];
    snprintf(k, sizeof k, "before/%d", i);
    CHECK(!mt_store_set(s, k, k, strlen(k)), "set %s: %s", k, mt_errmsg());
  }
  waiter w = {.s = s, .key = "gen/3/go", .timeout_ms = 30000};
  pthread_t th;
  pthread_create(&th, NULL, wait_key, &w);
  sleep_ms(300); /* the get watches on the leader now */
  member_kill(lead);
  double t0 = now_s();
  int rc = mt_store_set(other, "gen/3/go", "go", 2);
  CHECK(!rc, "a set as the leader died: %s", mt_errmsg());
  printf("leader m%d killed: a set on another client took %.2f s\n", lead, now_s() - t0);
  pthread_join(th, NULL);
  double took = now_s() - t0;
  CHECK(!w.rc && w.n == 2 && !memcmp(w.v, "go", 2), "the get waiting on the lost leader: %s (%s)",
        mt_strerror(w.rc), w.err);
  CHECK(took < 10, "it was answered %.2f s after the leader died", took);
  printf("leader m%d killed: the waiting get answered after %.2f s\n", lead, took);
  free(w.v);
  t0 = now_s();
  rc = mt_store_set(s, "after/0", "x", 1);
  CHECK(!rc, "a set on the client that talked to the lost leader: %s", mt_errmsg());
  printf("its next set took %.2f s\n", now_s() - t0);
  int64_t r = 0;
  for (int i = 0; i < 50; i++) rc |= mt_store_add(s, "after/count", 1, &r);
  CHECK(!rc && r == 50, "50 adds after the election: %" PRId64 " (%s)", r, mt_errmsg());
  int lost = 0;
  for (int i = 0; i < 20; i++) {
    char k[32];
    void *v = NULL;
    size_t n = 0;
    snprintf(k, sizeof k, "before/%d", i);
    lost += mt_store_get(s, k, &v, &n, 0) || n != strlen(k) || memcmp(v, k, n);
    free(v);
  }
  CHECK(!lost, "%d of 20 keys written before the leader died are gone", lost);
  mt_store_free(other);
  mt_store_free(s);
  CHECK(!member_start(lead), "restart m%d", lead);
}

/* Two of three members gone: no quorum. Requests fail with MT_EIO naming
 * the members within the request timeout (a get too, however long it may
 * wait: the store cannot answer, which is not a key that is missing); with
 * one member back, every key is still there. */
static void test_without_a_quorum_requests_fail_and_nothing_is_lost(void) {
  mt_store *s = store_on(NULL, "/mtnlg/q/", 20);
  if (!s) {
    CHECK(0, "store: %s", mt_errmsg());
    return;
  }
  CHECK(!mt_store_set(s, "kept", "still here", 10), "set: %s", mt_errmsg());
  for (int i = 0; i < MEMBERS; i++) /* the restarted member has caught up */
    if (m[i].pid) {
      mt_store *one = store_on(m[i].url, "/mtnlg/q/", 20);
      CHECK(one && mt_store_check(one, "kept") == 1, "m%d did not catch up", i);
      mt_store_free(one);
    }
  member_kill(1);
  member_kill(2);
  double t0 = now_s();
  int rc = mt_store_set(s, "lost", "x", 1);
  double took = now_s() - t0;
  CHECK(rc == MT_EIO && strstr(mt_errmsg(), m[0].url) && strstr(mt_errmsg(), "lost"),
        "a set without a quorum: %s (%s)", mt_strerror(rc), mt_errmsg());
  CHECK(took < 8, "it failed after %.2f s (request timeout 5 s)", took);
  printf("a set without a quorum: %s after %.2f s\n", mt_errmsg(), took);
  void *v = NULL;
  size_t n = 0;
  rc = mt_store_get(s, "kept", &v, &n, 100);
  CHECK(rc == MT_EIO, "a read without a quorum: %s (%s), not MT_EIO", mt_strerror(rc), mt_errmsg());
  rc = mt_store_add(s, "count", 1, NULL);
  CHECK(rc == MT_EIO, "an add without a quorum: %s (%s)", mt_strerror(rc), mt_errmsg());
  CHECK(!member_start(1), "restart m1");
  t0 = now_s();
  rc = mt_store_get(s, "kept", &v, &n, 0);
  for (int i = 0; rc == MT_EIO && i < 5; i++) rc = mt_store_get(s, "kept", &v, &n, 0);
  CHECK(!rc && n == 10 && !memcmp(v, "still here", 10), "with a quorum back: %s (%s)",
        mt_strerror(rc), mt_errmsg());
  free(v);
  CHECK(!member_start(2), "restart m2");
  mt_store_free(s);
}

static void test_no_etcd_and_bad_endpoints_are_named(void) {
  int port = free_port();
  char eps[64];
  snprintf(eps, sizeof eps, "127.0.0.1:%d", port);
  mt_store_etcd_opts o = {.dial_timeout_ms = 200, .request_timeout_ms = 1000};
  mt_store *s = NULL;
  double t0 = now_s();
  int rc = mt_store_etcd_new(eps, &o, &s);
  CHECK(rc == MT_EIO && strstr(mt_errmsg(), eps) && now_s() - t0 < 3,
        "no etcd at %s: %s (%s) after %.2f s", eps, mt_strerror(rc), mt_errmsg(), now_s() - t0);
  rc = mt_store_etcd_new("ftp://x/y", &o, &s);
  CHECK(rc == MT_EINVAL && strstr(mt_errmsg(), "ftp://x/y"), "a bad endpoint: %s (%s)",
        mt_strerror(rc), mt_errmsg());
  rc = mt_store_etcd_new(" , ", &o, &s);
  CHECK(rc == MT_EINVAL && strstr(mt_errmsg(), "no endpoint"), "no endpoint: %s (%s)",
        mt_strerror(rc), mt_errmsg());
  o.user = "root";
  rc = mt_store_etcd_new(all_endpoints, &o, &s);
  CHECK(rc == MT_EINVAL && strstr(mt_errmsg(), "password"), "a user without a password: %s (%s)",
        mt_strerror(rc), mt_errmsg());
}

/* ------------------------------------------------------------------ etcd's users */

static int auth_post(const char *path, const char *body, const char *token) {
  char out[4096];
  int rc = post(m[0].url, path, body, token, out, sizeof out);
  if (rc) fprintf(stderr, "%s %s: %s\n", path, body, out);
  return rc;
}

static void test_etcd_users_are_checked(void) {
  /* root (etcd's own), and mtnlg with a role on /mtnlg/job/ only */
  int rc = auth_post("/v3/auth/user/add", "{\"name\":\"root\",\"password\":\"rootpw\"}", NULL) ||
           auth_post("/v3/auth/user/grant", "{\"user\":\"root\",\"role\":\"root\"}", NULL) ||
           auth_post("/v3/auth/role/add", "{\"name\":\"trainer\"}", NULL) ||
           auth_post("/v3/auth/user/add", "{\"name\":\"mtnlg\",\"password\":\"s3cret\"}", NULL) ||
           auth_post("/v3/auth/user/grant", "{\"user\":\"mtnlg\",\"role\":\"trainer\"}", NULL);
  /* key "/mtnlg/job/" and range_end "/mtnlg/job0" ('/' + 1), in base64 */
  rc = rc || auth_post("/v3/auth/role/grant",
                       "{\"name\":\"trainer\",\"perm\":{\"permType\":\"READWRITE\",\"key\":"
                       "\"L210bmxnL2pvYi8=\",\"range_end\":\"L210bmxnL2pvYjA=\"}}",
                       NULL);
  rc = rc || auth_post("/v3/auth/enable", "{}", NULL);
  CHECK(!rc, "could not set up etcd's users");
  if (rc) return;
  mt_store_etcd_opts o = {.prefix = "/mtnlg/job/",
                          .dial_timeout_ms = 500,
                          .request_timeout_ms = 5000,
                          .user = "mtnlg",
                          .password = "s3cret"};
  mt_store *s = NULL;
  rc = mt_store_etcd_new(all_endpoints, &o, &s);
  CHECK(!rc, "the trainer's store: %s", mt_errmsg());
  if (!rc) {
    CHECK(!mt_store_set(s, "gen/0/x", "1", 1), "set with a user: %s", mt_errmsg());
    int64_t r = 0;
    CHECK(!mt_store_add(s, "gen/0/n", 2, &r) && r == 2, "add with a user: %s", mt_errmsg());
    pthread_t th;
    later l = {s, "gen/0/w", 200};
    pthread_create(&th, NULL, set_later, &l);
    void *v = NULL;
    size_t n;
    rc = mt_store_get(s, "gen/0/w", &v, &n, 5000);
    pthread_join(th, NULL);
    CHECK(!rc, "a waiting get with a user (its watch carries the token): %s", mt_errmsg());
    if (!rc) free(v);
    int64_t k = 0;
    CHECK(!mt_store_del_prefix(s, "gen/", &k) && k == 3, "del_prefix with a user: %" PRId64, k);
    mt_store_free(s);
  }
  o.password = "wrong";
  rc = mt_store_etcd_new(all_endpoints, &o, &s);
  CHECK(rc == MT_EPERM && strstr(mt_errmsg(), "mtnlg"), "a wrong password: %s (%s)",
        mt_strerror(rc), mt_errmsg());
  o.user = o.password = NULL;
  rc = mt_store_etcd_new(all_endpoints, &o, &s);
  CHECK(rc == MT_EPERM, "no user: %s (%s)", mt_strerror(rc), mt_errmsg());
  o.user = "mtnlg", o.password = "s3cret", o.prefix = "/mtnlg/other/";
  rc = mt_store_etcd_new(all_endpoints, &o, &s);
  CHECK(rc == MT_EPERM && strstr(mt_errmsg(), "permission denied"),
        "a prefix the role does not cover: %s (%s)", mt_strerror(rc), mt_errmsg());
}

/* ------------------------------------------------------------------ TLS */

/* One more member, alone, serving https:// and asking for a client
 * certificate (--client-cert-auth), with tests/cluster/tls/etcd-*.pem. */
static pid_t tls_member_start(char *url, size_t cap) {
  int client = free_port(), peer_port = free_port();
  char data[256], log[300], curl_url[64], peer[64], cluster[96], cert[512], key[512], ca[512];
  snprintf(data, sizeof data, "%s", tmp_path("tls"));
  snprintf(log, sizeof log, "%s.log", data);
  snprintf(curl_url, sizeof curl_url, "https://127.0.0.1:%d", client);
  snprintf(peer, sizeof peer, "http://127.0.0.1:%d", peer_port);
  snprintf(cluster, sizeof cluster, "tls=%s", peer);
  snprintf(cert, sizeof cert, "%s/etcd-server.pem", TLS_DIR);
  snprintf(key, sizeof key, "%s/etcd-server.key", TLS_DIR);
  snprintf(ca, sizeof ca, "%s/etcd-ca.pem", TLS_DIR);
  snprintf(url, cap, "%s", curl_url);
  return etcd_spawn(log, "--name", "tls", "--data-dir", data, "--listen-client-urls", curl_url,
                    "--advertise-client-urls", curl_url, "--listen-peer-urls", peer,
                    "--initial-advertise-peer-urls", peer, "--initial-cluster", cluster,
                    "--initial-cluster-state", "new", "--cert-file", cert, "--key-file", key,
                    "--trusted-ca-file", ca, "--client-cert-auth", "--logger", "zap",
                    "--log-outputs", "stderr", "--log-level", "error", (char *)NULL);
}

static void test_tls_certificates_are_checked(void) {
  char url[64], ca[512], other_ca[512], cert[512], key[512], server_key[512];
  snprintf(ca, sizeof ca, "%s/etcd-ca.pem", TLS_DIR);
  snprintf(other_ca, sizeof other_ca, "%s/other-ca.pem", TLS_DIR);
  snprintf(cert, sizeof cert, "%s/etcd-client.pem", TLS_DIR);
  snprintf(key, sizeof key, "%s/etcd-client.key", TLS_DIR);
  snprintf(server_key, sizeof server_key, "%s/etcd-server.key", TLS_DIR);
  pid_t pid = tls_member_start(url, sizeof url);
  CHECK(pid > 0, "start the TLS member");
  if (pid <= 0) return;
  mt_store_etcd_opts o = {.prefix = "/mtnlg/tls/",
                          .dial_timeout_ms = 500,
                          .request_timeout_ms = 5000,
                          .cacert = ca,
                          .cert = cert,
                          .key = key};
  mt_store *s = NULL;
  int rc = -1;
  for (double deadline = now_s() + 30; now_s() < deadline; sleep_ms(200))
    if (!(rc = mt_store_etcd_new(url, &o, &s))) break;
  CHECK(!rc, "a store over TLS with the client's certificate: %s", mt_errmsg());
  if (!rc) {
    CHECK(!mt_store_set(s, "k", "v", 1), "set over TLS: %s", mt_errmsg());
    pthread_t th;
    later l = {s, "w", 200};
    pthread_create(&th, NULL, set_later, &l);
    void *v = NULL;
    size_t n = 0;
    rc = mt_store_get(s, "w", &v, &n, 5000);
    pthread_join(th, NULL);
    CHECK(!rc, "a waiting get over TLS (its watch too): %s", mt_errmsg());
    free(v);
    mt_store_free(s);
  }
  /* refusals: at once, MT_EPERM, naming what to set */
  struct {
    const char *what, *cacert, *cert, *key;
  } bad[] = {
      {"no client certificate", ca, NULL, NULL},
      {"a CA that did not sign the member's", other_ca, cert, key},
      {"a key that is not the certificate's", ca, cert, server_key},
  };
  for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
    o.cacert = bad[i].cacert, o.cert = bad[i].cert, o.key = bad[i].key;
    s = NULL;
    double t0 = now_s();
    rc = mt_store_etcd_new(url, &o, &s);
    CHECK(rc == MT_EPERM && strstr(mt_errmsg(), "TLS refused") && strstr(mt_errmsg(), url) &&
              now_s() - t0 < 2.5,
          "%s: %s (%s) after %.2f s", bad[i].what, mt_strerror(rc), mt_errmsg(), now_s() - t0);
    printf("TLS, %s: %s after %.2f s\n", bad[i].what, mt_errmsg(), now_s() - t0);
    mt_store_free(s);
  }
  o.cacert = ca, o.cert = cert, o.key = NULL;
  rc = mt_store_etcd_new(url, &o, &s);
  CHECK(rc == MT_EINVAL && strstr(mt_errmsg(), "both or neither"), "a certificate alone: %s (%s)",
        mt_strerror(rc), mt_errmsg());
  kill(pid, SIGKILL);
  waitpid(pid, NULL, 0);
}

int main(void) {
  signal(SIGPIPE, SIG_IGN);
  etcd_bin = getenv("ETCD");
  if (!etcd_bin) etcd_bin = ETCD_PATH;
  if (access(etcd_bin, X_OK)) {
    fprintf(stderr, "no etcd at %s: install Debian's etcd-server (tools/test does)\n", etcd_bin);
    return 1;
  }
  snprintf(tmpdir, sizeof tmpdir, "/tmp/test_store_etcd.XXXXXX");
  if (!mkdtemp(tmpdir)) return 1;
  curl_global_init(CURL_GLOBAL_DEFAULT);
  srand((unsigned)getpid() ^ (unsigned)time(NULL));
  if (cluster_start()) {
    fprintf(stderr, "the etcd cluster did not start (logs in %s)\n", tmpdir);
    for (int i = 0; i < MEMBERS; i++) member_kill(i);
    return 1;
  }
  mt_store *s = store_on(NULL, "/mtnlg/t/", 10), *other = store_on(NULL, "/mtnlg/t/", 10);
  if (s && other) {
    test_values_of_any_bytes_round_trip(s);
    test_get_many_reads_present_and_absent_keys(s);
    test_add_counts_and_refuses_text(s);
    test_adds_from_threads_sum_exactly(s, other);
    test_del_prefix_removes_exactly_the_keys_under_it(s);
    test_get_waits_for_another_client_and_times_out_naming_key(s, other);
    test_a_value_past_etcds_limit_is_refused_naming_it(s);
  } else {
    CHECK(0, "stores: %s", mt_errmsg());
  }
  mt_store_free(s);
  mt_store_free(other);
  test_prefixes_keep_jobs_apart();
  test_tls_certificates_are_checked();
  test_a_gloo_group_forms_through_etcd();
  test_an_election_has_one_leader_until_its_lease_ends();
  test_the_election_thread_keeps_the_lease_and_watches_the_key();
  test_no_etcd_and_bad_endpoints_are_named();
  test_losing_the_leader_it_talks_to_stops_nothing();
  test_without_a_quorum_requests_fail_and_nothing_is_lost();
  test_etcd_users_are_checked();
  for (int i = 0; i < MEMBERS; i++) member_kill(i);
  if (!failures) {
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    if (system(cmd)) fprintf(stderr, "could not remove %s\n", tmpdir);
  }
  if (failures) fprintf(stderr, "%d check(s) failed (etcd's logs in %s)\n", failures, tmpdir);
  return failures ? 1 : 0;
}
