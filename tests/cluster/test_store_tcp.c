/* test_store_tcp — the rendezvous store over TCP: a store_server_main process
 * on 127.0.0.1 (port 0), clients as threads of this process and as processes
 * (this executable run again in a child mode). Every op's semantics; a GET or
 * WAIT parked on the server is answered when another process sets the key, and
 * times out naming the key; adds from threads sum exactly; values of several
 * MB; malformed, truncated and oversized frames on raw sockets get an error
 * reply and a close while other clients are served; a client reconnects with
 * backoff after the server restarts on the same port; past an in-thread
 * server's limits on parked requests, receive buffers and connections,
 * requests are refused and connections closed while the others are served,
 * a client that does not read its replies loses its connection once they
 * pass the limit, and its stats count what is held. The server is started
 * and stopped by its pid (SIGTERM) and always reaped; stopped (SIGSTOP), its
 * clients and a comm group bootstrapping through it fail as a store failure
 * within their deadlines. */
#include "comm.h"
#include "err.h"
#include "store_client.h"
#include "store_server.h"
#include "store_wire.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef STORE_SERVER_MAIN
#error "STORE_SERVER_MAIN (path of the store_server_main executable) must be defined"
#endif

#include "mt_check.h"
#include "store_prefix_check.h"

static void sleep_ms(int ms) { usleep((useconds_t)ms * 1000); }

/* ------------------------------------------------------------------ the server process */

static pid_t server_pid;
static int server_port;

/* Starts store_server_main on port (0: any) and reads the port it prints. */
static int server_start(int port) {
  for (int attempt = 0; attempt < 20; attempt++) {
    int p[2];
    if (pipe2(p, O_CLOEXEC) < 0) return -1;
    char port_arg[16];
    snprintf(port_arg, sizeof port_arg, "%d", port);
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (getppid() != parent) _exit(127);
      dup2(p[1], 1);
      execl(STORE_SERVER_MAIN, STORE_SERVER_MAIN, "--host", "127.0.0.1", "--port", port_arg,
            (char *)NULL);
      _exit(127);
    }
    close(p[1]);
    char line[64] = "";
    size_t got = 0;
    double deadline = now_s() + 5;
    while (got < sizeof line - 1 && !strchr(line, '\n') && now_s() < deadline) {
      struct pollfd pfd = {p[0], POLLIN, 0};
      if (poll(&pfd, 1, 100) <= 0) continue;
      ssize_t r = read(p[0], line + got, sizeof line - 1 - got);
      if (r <= 0) break;
      got += (size_t)r;
      line[got] = 0;
    }
    close(p[0]);
    int bound = 0;
    if (sscanf(line, "port %d", &bound) == 1 && bound > 0) {
      server_pid = pid;
      server_port = bound;
      return 0;
    }
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    if (!port) break;
    sleep_ms(100); /* the same port, still held: try again */
  }
  return -1;
}

/* SIGTERM, then reap; 0 when it exited 0 within 5 s. */
static int server_stop(void) {
  if (server_pid <= 0) return -1;
  kill(server_pid, SIGTERM);
  int status = 0;
  double deadline = now_s() + 5;
  pid_t r;
  while ((r = waitpid(server_pid, &status, WNOHANG)) == 0 && now_s() < deadline) sleep_ms(10);
  if (r == 0) {
    kill(server_pid, SIGKILL);
    waitpid(server_pid, &status, 0);
  }
  server_pid = 0;
  return r == 0 || !WIFEXITED(status) || WEXITSTATUS(status) ? -1 : 0;
}

static mt_store *client(int connect_timeout_ms) {
  mt_store_tcp_opts o = {.connect_timeout_ms = connect_timeout_ms,
                         .request_timeout_ms = 5000,
                         .backoff_min_ms = 50,
                         .backoff_max_ms = 1000};
  mt_store *s = NULL;
  if (mt_store_tcp_new("127.0.0.1", server_port, &o, &s))
    fprintf(stderr, "client: %s\n", mt_errmsg());
  return s;
}

/* ------------------------------------------------------------------ child processes */

static pid_t spawn_self(char *const args[]) {
  pid_t parent = getpid();
  pid_t pid = fork();
  if (pid == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(127);
    execv("/proc/self/exe", args);
    _exit(127);
  }
  return pid;
}

static int reap(pid_t pid, double timeout_s) {
  int status = 0;
  double deadline = now_s() + timeout_s;
  pid_t r;
  while ((r = waitpid(pid, &status, WNOHANG)) == 0 && now_s() < deadline) sleep_ms(10);
  if (r == 0) {
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
    return -1;
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

/* --child-set PORT KEY DELAY_MS: sets KEY to "from-child" after DELAY_MS. */
static int child_set(int port, const char *key, int delay_ms) {
  server_port = port;
  mt_store *s = client(5000);
  if (!s) return 2;
  sleep_ms(delay_ms);
  int rc = mt_store_set(s, key, "from-child", 10);
  if (rc) fprintf(stderr, "child set: %s\n", mt_errmsg());
  mt_store_free(s);
  return rc ? 3 : 0;
}

/* --child-barrier PORT RANK N: publishes its rank, waits for all N, counts itself done. */
static int child_barrier(int port, int rank, int n) {
  server_port = port;
  mt_store *s = client(5000);
  if (!s) return 2;
  char key[64], *keys[64];
  snprintf(key, sizeof key, "gen/0/barrier/%d", rank);
  int rc = mt_store_set(s, key, key, strlen(key));
  for (int i = 0; i < n; i++) {
    keys[i] = malloc(64);
    snprintf(keys[i], 64, "gen/0/barrier/%d", i);
  }
  if (!rc) rc = mt_store_tcp_wait(s, (const char *const *)keys, (size_t)n, 10000);
  if (!rc) rc = mt_store_add(s, "gen/0/barrier/done", 1, NULL);
  if (rc) fprintf(stderr, "child %d: %s\n", rank, mt_errmsg());
  for (int i = 0; i < n; i++) free(keys[i]);
  mt_store_free(s);
  return rc ? 3 : 0;
}

/* ------------------------------------------------------------------ raw sockets */

static int raw_connect_to(int port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  struct timeval tv = {3, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
    close(fd);
    return -1;
  }
  return fd;
}

static int raw_connect(void) { return raw_connect_to(server_port); }

static int raw_write(int fd, const void *buf, size_t bytes) {
  const char *p = buf;
  while (bytes) {
    ssize_t w = send(fd, p, bytes, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return -1;
    p += w, bytes -= (size_t)w;
  }
  return 0;
}

static int raw_send(int fd, const mt_store_msg *m) {
  static uint8_t buf[1 << 16];
  size_t n;
  if (mt_store_encode(m, buf, sizeof buf, &n)) return -1;
  return raw_write(fd, buf, n);
}

static int read_full(int fd, uint8_t *p, size_t n) {
  while (n) {
    ssize_t r = read(fd, p, n);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return r == 0 ? 1 : -1;
    p += r, n -= (size_t)r;
  }
  return 0;
}

/* One frame into buf (which m then points into): 0; 1 at end of stream; -1. */
static int raw_recv(int fd, uint8_t *buf, size_t cap, mt_store_msg *m) {
  int rc = read_full(fd, buf, MT_STORE_HDR_BYTES);
  if (rc) return rc;
  mt_store_hdr h;
  if (mt_store_peek(buf, MT_STORE_HDR_BYTES, &h, NULL) || h.frame_bytes > cap) return -1;
  if (read_full(fd, buf + MT_STORE_HDR_BYTES, h.body_bytes)) return -1;
  return mt_store_decode(buf, h.frame_bytes, m, NULL, 0, NULL) ? -1 : 0;
}

/* 1 when the peer closes the stream within the receive timeout. */
static int raw_closed(int fd) {
  uint8_t b[256];
  for (;;) {
    ssize_t r = read(fd, b, sizeof b);
    if (r == 0) return 1;
    if (r < 0 && errno == ECONNRESET) return 1;
    if (r < 0) return 0;
  }
}

/* ------------------------------------------------------------------ the tests */

static void test_values_round_trip(mt_store *s) {
  const char bin[] = {'a', 0, 'b', (char)0xff, 0};
  CHECK(!mt_store_set(s, "gen/0/comm/tp0/gloo/0", bin, sizeof bin), "%s", mt_errmsg());
  void *v = NULL;
  size_t n = 0;
  CHECK(!mt_store_get(s, "gen/0/comm/tp0/gloo/0", &v, &n, 0), "%s", mt_errmsg());
  CHECK(v && n == sizeof bin && !memcmp(v, bin, n), "binary value did not round trip");
  free(v);
  CHECK(!mt_store_set(s, "gen/0/comm/tp0/gloo/0", "x", 1), "%s", mt_errmsg());
  v = NULL;
  CHECK(!mt_store_get(s, "gen/0/comm/tp0/gloo/0", &v, &n, 0) && n == 1 && !strcmp(v, "x"),
        "overwrite: %s", mt_errmsg());
  free(v);
  CHECK(mt_store_check(s, "gen/0/comm/tp0/gloo/0") == 1, "check of a set key");
  CHECK(mt_store_check(s, "no/such/key") == 0, "check of a missing key");
  CHECK(!mt_store_del(s, "gen/0/comm/tp0/gloo/0"), "%s", mt_errmsg());
  CHECK(mt_store_check(s, "gen/0/comm/tp0/gloo/0") == 0, "check after delete");
  int rc = mt_store_del(s, "gen/0/comm/tp0/gloo/0");
  CHECK(rc == MT_ENOENT && strstr(mt_errmsg(), "gen/0/comm/tp0/gloo/0"), "delete twice: %s %s",
        mt_strerror(rc), mt_errmsg());
  CHECK(!mt_store_set(s, "empty", "", 0), "%s", mt_errmsg());
  v = NULL;
  CHECK(!mt_store_get(s, "empty", &v, &n, 0) && n == 0 && v, "empty value");
  free(v);
  CHECK(mt_store_set(s, "", "x", 1) == MT_EINVAL, "an empty key is refused");
  char long_key[MT_STORE_MAX_KEY + 2];
  memset(long_key, 'k', sizeof long_key - 1);
  long_key[sizeof long_key - 1] = 0;
  CHECK(mt_store_set(s, long_key, "x", 1) == MT_EINVAL, "a key over 4096 bytes is refused");
  long_key[MT_STORE_MAX_KEY] = 0;
  CHECK(!mt_store_set(s, long_key, "x", 1) && mt_store_check(s, long_key) == 1,
        "a key of 4096 bytes: %s", mt_errmsg());
  double rtt = -1;
  CHECK(!mt_store_tcp_ping(s, &rtt) && rtt >= 0 && rtt < 1000, "ping: %s (%.3f ms)", mt_errmsg(),
        rtt);
}

/* A batched read of 600 keys, a third of them absent: each value where it
 * was set, NULL where not, in one request per key sent at once; a bad key
 * fails the whole read naming it and returns nothing. */
static void test_get_many_reads_present_and_absent_keys(mt_store *s) {
  enum { N = 600 };
  static char names[N][32];
  const char *keys[N];
  void *vals[N];
  size_t bytes[N];
  for (int i = 0; i < N; i++) {
    snprintf(names[i], sizeof names[i], "many/%d", i);
    keys[i] = names[i];
    if (i % 3) CHECK(!mt_store_set(s, keys[i], names[i], strlen(names[i]) + (i % 2)), "set");
  }
  CHECK(s->get_many, "the TCP store batches reads");
  CHECK(!mt_store_get_many(s, keys, N, vals, bytes), "get_many: %s", mt_errmsg());
  int wrong = 0;
  for (int i = 0; i < N; i++) {
    if (i % 3)
      wrong += !vals[i] || bytes[i] != strlen(names[i]) + (i % 2) ||
               memcmp(vals[i], names[i], strlen(names[i]));
    else
      wrong += vals[i] != NULL || bytes[i] != 0;
    free(vals[i]);
  }
  CHECK(!wrong, "%d of %d keys read back wrong", wrong, N);
  keys[7] = "";
  vals[0] = (void *)1;
  int rc = mt_store_get_many(s, keys, N, vals, NULL);
  CHECK(rc == MT_EINVAL && strstr(mt_errmsg(), "empty key") && vals[0] == NULL,
        "a batch with an empty key: %s %s", mt_strerror(rc), mt_errmsg());
}

/* A store server from before DELETE_PREFIX, on a thread: answers PING, and
 * any other op as such a server answers one it does not know (ERROR,
 * UNSUPPORTED, then closes the connection). */
typedef struct old_server {
  int fd, del_prefix_seen, stop;
} old_server;

static void *old_server_run(void *arg) {
  old_server *o = arg;
  while (!__atomic_load_n(&o->stop, __ATOMIC_RELAXED)) {
    struct pollfd p = {o->fd, POLLIN, 0};
    if (poll(&p, 1, 50) <= 0) continue;
    int c = accept(o->fd, NULL, NULL);
    if (c < 0) continue;
    uint8_t f[MT_STORE_HDR_BYTES + 8192], out[256];
    for (;;) {
      if (read_full(c, f, MT_STORE_HDR_BYTES)) break;
      uint32_t id = f[8] | f[9] << 8 | f[10] << 16 | (uint32_t)f[11] << 24;
      uint32_t body = f[12] | f[13] << 8 | f[14] << 16 | (uint32_t)f[15] << 24;
      if (body > sizeof f - MT_STORE_HDR_BYTES || read_full(c, f + MT_STORE_HDR_BYTES, body)) break;
      size_t n;
      if (f[5] == MT_STORE_OP_PING) {
        mt_store_msg r = {.op = MT_STORE_OP_PING | MT_STORE_REPLY, .id = id};
        mt_store_encode(&r, out, sizeof out, &n);
        if (write(c, out, n) != (ssize_t)n) break;
        continue;
      }
      if (f[5] == MT_STORE_OP_DELETE_PREFIX)
        __atomic_add_fetch(&o->del_prefix_seen, 1, __ATOMIC_RELAXED);
      mt_store_msg r = {.op = MT_STORE_OP_ERROR | MT_STORE_REPLY,
                        .id = id,
                        .status = MT_STORE_UNSUPPORTED,
                        .value = mt_store_cstr("store frame: unknown op 10")};
      mt_store_encode(&r, out, sizeof out, &n);
      if (write(c, out, n) < 0) break;
      break;
    }
    close(c);
  }
  return NULL;
}

/* A server from before DELETE_PREFIX: the client's prefix delete fails with
 * MT_ENOTSUP, not as a store failure, is not sent to it again, and the
 * client goes on (a PING after it is answered). */
static void test_del_prefix_to_an_old_server_is_not_supported(void) {
  old_server o = {.fd = socket(AF_INET, SOCK_STREAM, 0)};
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  socklen_t len = sizeof a;
  if (bind(o.fd, (struct sockaddr *)&a, sizeof a) || listen(o.fd, 8) ||
      getsockname(o.fd, (struct sockaddr *)&a, &len)) {
    CHECK(0, "old server: %s", strerror(errno));
    close(o.fd);
    return;
  }
  pthread_t th;
  pthread_create(&th, NULL, old_server_run, &o);
  mt_store_tcp_opts opts = {.connect_timeout_ms = 3000,
                            .request_timeout_ms = 3000,
                            .backoff_min_ms = 20,
                            .backoff_max_ms = 200};
  mt_store *s = NULL;
  int rc = mt_store_tcp_new("127.0.0.1", ntohs(a.sin_port), &opts, &s);
  CHECK(!rc, "client of the old server: %s", mt_errmsg());
  if (s) {
    int64_t n = -1;
    rc = mt_store_del_prefix(s, "gen/1/", &n);
    CHECK(rc == MT_ENOTSUP && n == 0 && strstr(mt_errmsg(), "UNSUPPORTED"),
          "del_prefix on an old server: %s (%s)", mt_strerror(rc), mt_errmsg());
    rc = mt_store_del_prefix(s, "gen/2/", &n);
    CHECK(rc == MT_ENOTSUP && strstr(mt_errmsg(), "does not know"), "a second del_prefix: %s (%s)",
          mt_strerror(rc), mt_errmsg());
    CHECK(__atomic_load_n(&o.del_prefix_seen, __ATOMIC_RELAXED) == 1,
          "the old server saw %d DELETE_PREFIX requests, want 1", o.del_prefix_seen);
    CHECK(!mt_store_tcp_ping(s, NULL), "a ping after: %s", mt_errmsg());
    mt_store_free(s);
  }
  __atomic_store_n(&o.stop, 1, __ATOMIC_RELAXED);
  pthread_join(th, NULL);
  close(o.fd);
}

/* A server that holds at most 4 KB: SETs past it are refused naming the
 * figures, the store and the connection go on, an overwrite with a smaller
 * value and a DELETE still go, and a SET fits again once room is freed. */
static void test_full_store_refuses_writes_and_recovers(void) {
  mt_store_server_limits lim = {.max_bytes = 4096};
  mt_store_server_thread *t;
  mt_store *s = NULL;
  CHECK(!mt_store_server_run_thread("127.0.0.1", 0, &lim, &t), "%s", mt_errmsg());
  CHECK(!mt_store_tcp_new("127.0.0.1", mt_store_server_thread_port(t), NULL, &s), "%s",
        mt_errmsg());
  if (!s) return;
  char value[200], key[32];
  memset(value, 'v', sizeof value);
  int stored = 0, rc = 0;
  for (; stored < 100 && !rc; stored += !rc) {
    snprintf(key, sizeof key, "full/%d", stored);
    rc = mt_store_set(s, key, value, sizeof value);
  }
  /* each key costs 200 + 6 or 7 + 64 bytes: 15 fit in 4096 */
  CHECK(stored == 15 && rc == MT_ENOMEM && strstr(mt_errmsg(), "the store is full") &&
            strstr(mt_errmsg(), "full/15") && strstr(mt_errmsg(), "4096"),
        "%d keys stored, then %s: %s", stored, mt_strerror(rc), mt_errmsg());
  int64_t v = 0;
  CHECK(mt_store_add(s, "full/counter", 1, &v) == MT_ENOMEM, "an ADD of a new key when full");
  void *got = NULL;
  CHECK(!mt_store_get(s, "full/0", &got, NULL, 0) && got, "a GET when full: %s", mt_errmsg());
  free(got);
  CHECK(!mt_store_set(s, "full/0", "small", 5), "a smaller value when full: %s", mt_errmsg());
  CHECK(!mt_store_del(s, "full/1") && !mt_store_set(s, "full/15", value, sizeof value),
        "a SET after a DELETE made room: %s", mt_errmsg());
  mt_store_free(s);
  mt_store_server_thread_stop(t);
}

/* A store with a cluster key: a client with it works; one without it or
 * with another fails at once (not after its connect timeout) with EPERM
 * saying why, and every later request of it too; a raw connection whose
 * first frame is not AUTH is answered UNAUTHORIZED and closed. */
static void test_cluster_key_is_required(void) {
  static const char key[] = "4f1c0e9a-the-cluster-key";
  mt_store_server_limits lim = {.key = key, .key_bytes = sizeof key - 1};
  mt_store_server_thread *t;
  CHECK(!mt_store_server_run_thread("127.0.0.1", 0, &lim, &t), "%s", mt_errmsg());
  int port = mt_store_server_thread_port(t);
  mt_store_tcp_opts right = {.key = key, .key_bytes = sizeof key - 1},
                    wrong = {.key = "4f1c0e9a-the-cluster-kez", .key_bytes = sizeof key - 1};
  mt_store *s = NULL, *bad = NULL;
  CHECK(!mt_store_tcp_new("127.0.0.1", port, &right, &s), "the right key: %s", mt_errmsg());
  void *v = NULL;
  CHECK(s && !mt_store_set(s, "k", "v", 1) && !mt_store_get(s, "k", &v, NULL, 0) && v,
        "a client with the key: %s", mt_errmsg());
  free(v);
  mt_store_free(s);

  double t0 = now_s();
  int rc = mt_store_tcp_new("127.0.0.1", port, NULL, &bad);
  CHECK(rc == MT_EPERM && !bad && strstr(mt_errmsg(), "needs the cluster key") &&
            strstr(mt_errmsg(), "has no cluster key") && now_s() - t0 < 5,
        "no key: %s %s (%.1f s)", mt_strerror(rc), mt_errmsg(), now_s() - t0);
  rc = mt_store_tcp_new("127.0.0.1", port, &wrong, &bad);
  CHECK(rc == MT_EPERM && !bad && strstr(mt_errmsg(), "does not match"), "a wrong key: %s %s",
        mt_strerror(rc), mt_errmsg());

  int keep = server_port;
  server_port = port;
  int fd = raw_connect();
  server_port = keep;
  uint8_t buf[4096];
  mt_store_msg m = {.op = MT_STORE_OP_SET, .id = 7, .key = mt_store_cstr("x")}, r;
  CHECK(fd >= 0 && !raw_send(fd, &m) && !raw_recv(fd, buf, sizeof buf, &r) &&
            r.status == MT_STORE_UNAUTHORIZED && r.id == 7 && raw_closed(fd),
        "a SET before AUTH");
  if (fd >= 0) close(fd);
  mt_store_server_thread_stop(t);
}

/* ------------------------------------------------------------------ transient limits */

/* A PING on fd answered OK: the connection is served. */
static int raw_ping_ok(int fd, uint32_t id) {
  uint8_t buf[4096];
  mt_store_msg m = {.op = MT_STORE_OP_PING, .id = id}, r;
  return fd >= 0 && !raw_send(fd, &m) && !raw_recv(fd, buf, sizeof buf, &r) &&
         r.op == (MT_STORE_OP_PING | MT_STORE_REPLY) && r.id == id && r.status == MT_STORE_OK;
}

/* Polls t's stats until done(st) holds or 3 s have passed; 1 when it held. */
static int stats_reach(mt_store_server_thread *t, mt_store_server_stats *st,
                       int (*done)(const mt_store_server_stats *)) {
  double deadline = now_s() + 3;
  for (;;) {
    mt_store_server_thread_get_stats(t, st);
    if (done(st)) return 1;
    if (now_s() > deadline) return 0;
    sleep_ms(5);
  }
}

static int nothing_held(const mt_store_server_stats *st) {
  return st->clients == 0 && st->waiters == 0 && st->transient_bytes == 0;
}

static int one_client(const mt_store_server_stats *st) { return st->clients == 1; }

/* The room for two connections' read buffers and a few dozen parked WAITs. */
#define SMALL_TRANSIENT ((uint64_t)2 * (64 << 10) + 8192)

/* 100 WAITs on one connection past a small transient limit: those past it are
 * answered NO_MEMORY at once, naming the key, what is full and the figures,
 * and not parked; the connection and another one go on serving SETs and
 * GETs; a SET answers the parked ones and the bytes they held are let go;
 * once the connections close the stats show nothing held. */
static void test_parked_requests_past_the_transient_limit_are_refused(void) {
  mt_store_server_limits lim = {.max_transient_bytes = SMALL_TRANSIENT};
  mt_store_server_thread *t;
  CHECK(!mt_store_server_run_thread("127.0.0.1", 0, &lim, &t), "%s", mt_errmsg());
  int port = mt_store_server_thread_port(t);
  mt_store *other = NULL;
  CHECK(!mt_store_tcp_new("127.0.0.1", port, NULL, &other), "%s", mt_errmsg());
  int fd = raw_connect_to(port);
  if (!other || fd < 0) {
    CHECK(0, "could not connect");
    goto out;
  }
  CHECK(!mt_store_set(other, "gen/0/x", "1", 1) && raw_ping_ok(fd, 1), "before: %s", mt_errmsg());
  mt_store_server_stats base, st;
  mt_store_server_thread_get_stats(t, &base);
  CHECK(base.clients == 2 && base.waiters == 0 && base.transient_bytes > 0 &&
            base.transient_bytes <= SMALL_TRANSIENT,
        "two idle connections: %u clients, %" PRIu64 " transient bytes", base.clients,
        base.transient_bytes);

  enum { N = 100 };
  const mt_store_str key = mt_store_cstr("gen/0/later");
  for (uint32_t i = 0; i < N; i++) {
    mt_store_msg w = {
        .op = MT_STORE_OP_WAIT, .id = 100 + i, .timeout_ms = -1, .nkeys = 1, .keys = &key};
    raw_send(fd, &w);
  }
  mt_store_msg ping = {.op = MT_STORE_OP_PING, .id = 7}, r;
  raw_send(fd, &ping);
  uint8_t buf[4096];
  int refused = 0, other_replies = 0, named = 0;
  while (!raw_recv(fd, buf, sizeof buf, &r) && r.id != 7) {
    if (r.status != MT_STORE_NO_MEMORY || r.op != (MT_STORE_OP_WAIT | MT_STORE_REPLY)) {
      other_replies++;
      continue;
    }
    refused++;
    char text[1100];
    snprintf(text, sizeof text, "%.*s", (int)r.value.bytes, r.value.p);
    char limit[32];
    snprintf(limit, sizeof limit, "%" PRIu64, SMALL_TRANSIENT);
    named += strstr(text, "wait for gen/0/later") && strstr(text, "is full") &&
             strstr(text, "parked") && strstr(text, limit);
    if (refused == 1) fprintf(stderr, "  a refused WAIT: %s\n", text);
  }
  CHECK(r.id == 7 && r.status == MT_STORE_OK, "the PING after the WAITs was not answered");
  mt_store_server_thread_get_stats(t, &st);
  CHECK(refused > 0 && st.waiters > 0 && st.waiters + (unsigned)refused == N && !other_replies,
        "%d WAITs refused, %u parked, %d other replies of %d", refused, st.waiters, other_replies,
        N);
  CHECK(named == refused, "%d of %d refusals named the key, what is full and the limit", named,
        refused);
  CHECK(st.transient_bytes > base.transient_bytes && st.transient_bytes <= SMALL_TRANSIENT,
        "%u parked WAITs: %" PRIu64 " transient bytes (limit %" PRIu64 ")", st.waiters,
        st.transient_bytes, SMALL_TRANSIENT);

  /* the same connection and another one are served as before */
  mt_store_msg set = {
      .op = MT_STORE_OP_SET, .id = 8, .key = mt_store_cstr("gen/0/y"), .value = mt_store_cstr("2")};
  CHECK(!raw_send(fd, &set) && !raw_recv(fd, buf, sizeof buf, &r) && r.id == 8 &&
            r.status == MT_STORE_OK,
        "a SET on the connection whose WAITs were refused");
  void *v = NULL;
  CHECK(!mt_store_get(other, "gen/0/y", &v, NULL, 0) && v && !strcmp(v, "2"),
        "a GET on another connection: %s", mt_errmsg());
  free(v);

  /* a SET answers every parked WAIT and frees what they held */
  unsigned parked = st.waiters, answered = 0;
  CHECK(!mt_store_set(other, key.p, "go", 2), "%s", mt_errmsg());
  while (answered < parked && !raw_recv(fd, buf, sizeof buf, &r) && r.status == MT_STORE_OK)
    answered++;
  CHECK(answered == parked, "%u of %u parked WAITs answered", answered, parked);
  mt_store_server_thread_get_stats(t, &st);
  CHECK(st.waiters == 0 && st.transient_bytes <= base.transient_bytes + (256u << 10),
        "answered: %u waiters, %" PRIu64 " transient bytes (%" PRIu64 " before)", st.waiters,
        st.transient_bytes, base.transient_bytes);

  close(fd);
  fd = -1;
  mt_store_free(other);
  other = NULL;
  CHECK(stats_reach(t, &st, nothing_held),
        "all closed: %u clients, %u waiters, %" PRIu64 " transient bytes", st.clients, st.waiters,
        st.transient_bytes);
out:
  if (fd >= 0) close(fd);
  mt_store_free(other);
  mt_store_server_thread_stop(t);
}

/* A SET announcing a 1 MiB value past a small transient limit is answered
 * NO_MEMORY naming the frame and its connection closed before the body is
 * buffered; a connection the limit has no read buffer for is answered and
 * closed too; another connection goes on. */
static void test_a_frame_past_the_transient_limit_closes_its_connection(void) {
  mt_store_server_limits lim = {.max_transient_bytes = SMALL_TRANSIENT};
  mt_store_server_thread *t;
  CHECK(!mt_store_server_run_thread("127.0.0.1", 0, &lim, &t), "%s", mt_errmsg());
  int port = mt_store_server_thread_port(t);
  int fd = raw_connect_to(port), good = raw_connect_to(port);
  CHECK(raw_ping_ok(fd, 1) && raw_ping_ok(good, 1), "two connections");

  size_t bytes = 1 << 20, n = 0;
  char *value = calloc(1, bytes);
  uint8_t *frame = malloc(bytes + 256), buf[4096];
  mt_store_msg set = {.op = MT_STORE_OP_SET,
                      .id = 9,
                      .key = mt_store_cstr("gen/0/big"),
                      .value = {value, (uint32_t)bytes}},
               r;
  CHECK(value && frame && !mt_store_encode(&set, frame, bytes + 256, &n), "encode");
  raw_write(fd, frame, 4096); /* the header and a little of the body */
  int rc = raw_recv(fd, buf, sizeof buf, &r);
  char text[1100] = "";
  if (!rc) snprintf(text, sizeof text, "%.*s", (int)r.value.bytes, r.value.p);
  CHECK(!rc && r.op == (MT_STORE_OP_SET | MT_STORE_REPLY) && r.id == 9 &&
            r.status == MT_STORE_NO_MEMORY && strstr(text, "a SET frame of") &&
            strstr(text, "is full"),
        "a 1 MiB SET past the limit: rc %d, status %s: %s", rc, mt_store_status_name(r.status),
        text);
  fprintf(stderr, "  a refused frame: %s\n", text);
  CHECK(raw_closed(fd), "the connection of a frame past the limit stayed open");
  free(frame), free(value);
  mt_store_server_stats st;
  CHECK(stats_reach(t, &st, one_client), "%u clients once one was closed", st.clients);
  CHECK(raw_ping_ok(good, 2), "the other connection after the close");

  /* the limit less than a read buffer from full: a new connection is answered and closed */
  const mt_store_str key = mt_store_cstr("gen/0/never");
  mt_store_msg w = {.op = MT_STORE_OP_WAIT, .id = 10, .timeout_ms = -1, .nkeys = 1, .keys = &key};
  for (int i = 0; i < 600; i++) raw_send(good, &w); /* parks as many as fit */
  mt_store_msg ping = {.op = MT_STORE_OP_PING, .id = 11};
  raw_send(good, &ping);
  while (!raw_recv(good, buf, sizeof buf, &r) && r.id != 11) {
  }
  mt_store_server_thread_get_stats(t, &st);
  CHECK(r.id == 11 && st.waiters > 0 && SMALL_TRANSIENT - st.transient_bytes < (64 << 10),
        "%u WAITs parked, %" PRIu64 " of %" PRIu64 " transient bytes", st.waiters,
        st.transient_bytes, SMALL_TRANSIENT);
  int late = raw_connect_to(port);
  ping.id = 12;
  rc = late < 0 || raw_send(late, &ping) ? -1 : raw_recv(late, buf, sizeof buf, &r);
  CHECK(!rc && r.status == MT_STORE_NO_MEMORY && r.op == (MT_STORE_OP_ERROR | MT_STORE_REPLY) &&
            raw_closed(late),
        "a connection with no room for its read buffer: rc %d, status %s", rc,
        mt_store_status_name(r.status));
  if (late >= 0) close(late);
  CHECK(raw_ping_ok(good, 13), "the connection holding the WAITs after the refusal");
  close(good);
  CHECK(stats_reach(t, &st, nothing_held),
        "all closed: %u clients, %u waiters, %" PRIu64 " transient bytes", st.clients, st.waiters,
        st.transient_bytes);
  close(fd);
  mt_store_server_thread_stop(t);
}

static int two_clients(const mt_store_server_stats *st) { return st->clients == 2; }

/* A server that takes 3 connections: a fourth is closed at once and counted,
 * the three go on; once one closes, a new one is served. */
static void test_connections_past_the_cap_are_closed_at_once(void) {
  mt_store_server_limits lim = {.max_conns = 3};
  mt_store_server_thread *t;
  CHECK(!mt_store_server_run_thread("127.0.0.1", 0, &lim, &t), "%s", mt_errmsg());
  int port = mt_store_server_thread_port(t), fd[3];
  for (int i = 0; i < 3; i++) {
    fd[i] = raw_connect_to(port);
    CHECK(raw_ping_ok(fd[i], 1), "connection %d of 3", i + 1);
  }
  int extra = raw_connect_to(port);
  CHECK(extra >= 0 && raw_closed(extra), "a fourth connection was not closed");
  if (extra >= 0) close(extra);
  mt_store_server_stats st;
  mt_store_server_thread_get_stats(t, &st);
  CHECK(st.clients == 3 && st.refused == 1, "%u clients, %" PRIu64 " refused", st.clients,
        st.refused);
  for (int i = 0; i < 3; i++) CHECK(raw_ping_ok(fd[i], 2), "connection %d after the fourth", i + 1);
  close(fd[0]);
  CHECK(stats_reach(t, &st, two_clients), "%u clients after one closed", st.clients);
  fd[0] = raw_connect_to(port);
  CHECK(raw_ping_ok(fd[0], 3), "a connection once one closed");
  for (int i = 0; i < 3; i++)
    if (fd[i] >= 0) close(fd[i]);
  CHECK(stats_reach(t, &st, nothing_held), "all closed: %u clients, %" PRIu64 " transient bytes",
        st.clients, st.transient_bytes);
  mt_store_server_thread_stop(t);
}

/* A raw connection whose socket takes in little of what the server sends
 * (SO_RCVBUF set before connect, so the window stays small): the replies
 * queued for it stay in the server. */
static int raw_connect_small_rcvbuf(int port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  struct timeval tv = {3, 0};
  int rcvbuf = 4096;
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
  if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
    close(fd);
    return -1;
  }
  return fd;
}

/* Room for a 1 MiB SET's frame, two read buffers and a few 1 MiB replies. */
#define REPLY_TRANSIENT ((uint64_t)4 << 20)

/* One connection left, holding no more than its read buffer. */
static int one_idle_client(const mt_store_server_stats *st) {
  return st->clients == 1 && st->waiters == 0 && st->transient_bytes <= 2 * (64 << 10);
}

/* A client that pipelines 64 GETs of a 1 MiB value and reads none of the
 * replies: its connection is closed once the replies queued for it would take
 * the transient bytes past their limit (rather than holding 64 MiB); another
 * connection's SET and GET of the same value are served meanwhile and after,
 * and the bytes the queued replies held are let go. */
static void test_unread_replies_past_the_transient_limit_close_their_connection(void) {
  mt_store_server_limits lim = {.max_transient_bytes = REPLY_TRANSIENT};
  mt_store_server_thread *t;
  CHECK(!mt_store_server_run_thread("127.0.0.1", 0, &lim, &t), "%s", mt_errmsg());
  int port = mt_store_server_thread_port(t);
  mt_store *other = NULL;
  CHECK(!mt_store_tcp_new("127.0.0.1", port, NULL, &other), "%s", mt_errmsg());
  int fd = raw_connect_small_rcvbuf(port);
  size_t bytes = 1 << 20, n = 0;
  char *value = malloc(bytes);
  uint8_t *frame = malloc(bytes + 256), buf[4096];
  if (!other || fd < 0 || !value || !frame) {
    CHECK(0, "could not connect");
    goto out;
  }
  memset(value, 'v', bytes);
  /* the other connection has its read buffer before the replies fill the room */
  CHECK(!mt_store_set(other, "gen/0/x", "1", 1), "before: %s", mt_errmsg());
  mt_store_msg set = {.op = MT_STORE_OP_SET,
                      .id = 1,
                      .key = mt_store_cstr("gen/0/big"),
                      .value = {value, (uint32_t)bytes}},
               r;
  CHECK(!mt_store_encode(&set, frame, bytes + 256, &n) && !raw_write(fd, frame, n) &&
            !raw_recv(fd, buf, sizeof buf, &r) && r.id == 1 && r.status == MT_STORE_OK,
        "a SET of 1 MiB on the connection that will not read");

  enum { N = 64 };
  size_t off = 0;
  for (uint32_t i = 0; i < N; i++) {
    mt_store_msg get = {.op = MT_STORE_OP_GET, .id = 100 + i, .key = mt_store_cstr("gen/0/big")};
    CHECK(!mt_store_encode(&get, frame + off, bytes + 256 - off, &n), "encode GET %u", i);
    off += n;
  }
  CHECK(!raw_write(fd, frame, off), "%d GETs in one write", N);

  /* the other connection has nothing queued: its replies go through */
  void *v = NULL;
  size_t got = 0;
  CHECK(!mt_store_set(other, "gen/0/y", "2", 1), "a SET on another connection: %s", mt_errmsg());
  CHECK(!mt_store_get(other, "gen/0/big", &v, &got, 0) && got == bytes && v &&
            !memcmp(v, value, bytes),
        "a GET of the 1 MiB value on another connection: %s", mt_errmsg());
  free(v);
  v = NULL;

  mt_store_server_stats st;
  int gone = stats_reach(t, &st, one_idle_client);
  CHECK(gone,
        "%d unread GET replies of 1 MiB: %u clients, %" PRIu64 " transient bytes (limit %" PRIu64
        ")",
        N, st.clients, st.transient_bytes, REPLY_TRANSIENT);
  if (gone) CHECK(raw_closed(fd), "the connection that did not read its replies stayed open");
  /* counted, for /v1/status and the metrics; refused connections are not these */
  CHECK(st.dropped == 1 && st.refused == 0, "%" PRIu64 " dropped, %" PRIu64 " refused", st.dropped,
        st.refused);
  CHECK(!mt_store_get(other, "gen/0/y", &v, &got, 0) && got == 1 && v && !strcmp(v, "2"),
        "a GET on another connection after the close: %s", mt_errmsg());
  free(v);
  close(fd);
  fd = -1;
  mt_store_free(other);
  other = NULL;
  CHECK(stats_reach(t, &st, nothing_held),
        "all closed: %u clients, %u waiters, %" PRIu64 " transient bytes", st.clients, st.waiters,
        st.transient_bytes);
out:
  free(frame), free(value);
  if (fd >= 0) close(fd);
  mt_store_free(other);
  mt_store_server_thread_stop(t);
}

static void test_add_counts_and_refuses_text(mt_store *s) {
  int64_t v = 0;
  CHECK(!mt_store_add(s, "gen/0/n", 5, &v) && v == 5, "add to an absent key gave %" PRId64, v);
  CHECK(!mt_store_add(s, "gen/0/n", -7, &v) && v == -2, "add -7 gave %" PRId64, v);
  void *text = NULL;
  CHECK(!mt_store_get(s, "gen/0/n", &text, NULL, 0) && !strcmp(text, "-2"),
        "an added key holds decimal text");
  free(text);
  mt_store_set(s, "gen/0/text", "abc", 3);
  int rc = mt_store_add(s, "gen/0/text", 1, &v);
  CHECK(rc == MT_EINVAL && strstr(mt_errmsg(), "gen/0/text") && strstr(mt_errmsg(), "integer"),
        "add to text: %s %s", mt_strerror(rc), mt_errmsg());
  mt_store_set(s, "gen/0/big", "9223372036854775807", 19);
  CHECK(mt_store_add(s, "gen/0/big", 1, &v) == MT_EINVAL, "add past INT64_MAX");
  CHECK(!mt_store_add(s, "gen/0/n", 0, &v) && v == -2, "the connection is fine after refusals");
}

static void test_cas_swaps_only_on_match(mt_store *s) {
  int swapped = -1;
  void *cur = NULL;
  size_t n = 0;
  CHECK(!mt_store_tcp_cas(s, "gen/0/leader", NULL, 0, "node-a", 6, &swapped, &cur, &n) &&
            swapped == 1 && cur && n == 6 && !memcmp(cur, "node-a", 6),
        "cas on an absent key: %s", mt_errmsg());
  free(cur);
  CHECK(!mt_store_tcp_cas(s, "gen/0/leader", NULL, 0, "node-b", 6, &swapped, &cur, &n) &&
            swapped == 0 && cur && !strcmp(cur, "node-a"),
        "cas expecting absent on a present key must not swap");
  free(cur);
  CHECK(!mt_store_tcp_cas(s, "gen/0/leader", "node-x", 6, "node-b", 6, &swapped, &cur, &n) &&
            swapped == 0 && !strcmp(cur, "node-a"),
        "cas with a wrong expected value must not swap");
  free(cur);
  CHECK(!mt_store_tcp_cas(s, "gen/0/leader", "node-a", 6, "node-b", 6, &swapped, &cur, &n) &&
            swapped == 1 && !strcmp(cur, "node-b"),
        "cas with the right expected value swaps");
  free(cur);
  cur = (void *)1;
  CHECK(!mt_store_tcp_cas(s, "gen/0/nobody", "x", 1, "y", 1, &swapped, &cur, &n) && swapped == 0 &&
            cur == NULL && n == 0,
        "cas expecting a value on an absent key: no swap, no current value");
  CHECK(mt_store_check(s, "gen/0/nobody") == 0, "a failed cas created the key");
  mt_store other_kind = {.kind = "mem"};
  CHECK(mt_store_tcp_cas(&other_kind, "k", NULL, 0, "v", 1, NULL, NULL, NULL) == MT_EINVAL &&
            strstr(mt_errmsg(), "mem"),
        "cas on a store of another kind is refused: %s", mt_errmsg());
}

/* A raw GET parked on the server is answered when a child process sets the
 * key: the reply is the server's doing, there is nothing to poll with. A PING
 * sent behind it is answered first. */
static void test_get_is_answered_when_another_process_sets(void) {
  int fd = raw_connect();
  CHECK(fd >= 0, "raw connect");
  if (fd < 0) return;
  mt_store_msg get = {
      .op = MT_STORE_OP_GET, .id = 7, .key = mt_store_cstr("gen/0/late"), .timeout_ms = 5000};
  mt_store_msg ping = {.op = MT_STORE_OP_PING, .id = 8};
  raw_send(fd, &get), raw_send(fd, &ping);
  uint8_t buf[4096];
  mt_store_msg m;
  CHECK(!raw_recv(fd, buf, sizeof buf, &m) && m.id == 8 &&
            m.op == (MT_STORE_OP_PING | MT_STORE_REPLY),
        "the ping behind a parked get is answered first");
  char port[16];
  snprintf(port, sizeof port, "%d", server_port);
  char *args[] = {"test_store_tcp", "--child-set", port, "gen/0/late", "200", NULL};
  double t0 = now_s();
  pid_t child = spawn_self(args);
  int rc = raw_recv(fd, buf, sizeof buf, &m);
  double took = now_s() - t0;
  CHECK(!rc && m.id == 7 && m.status == MT_STORE_OK && m.value.bytes == 10 &&
            !memcmp(m.value.p, "from-child", 10),
        "the parked get got no value (rc %d, status %s)", rc, mt_store_status_name(m.status));
  CHECK(took >= 0.18 && took < 3.0, "the parked get was answered after %.3f s", took);
  CHECK(reap(child, 5) == 0, "the setting child failed");
  close(fd);
}

typedef struct job {
  mt_store *s;
  const char *key;
  int delay_ms, count;
} job;

static void *set_later(void *p) {
  job *j = p;
  sleep_ms(j->delay_ms);
  mt_store_set(j->s, j->key, "late", 4);
  return NULL;
}

static void test_get_waits_and_times_out_naming_key(mt_store *s, mt_store *other) {
  job j = {other, "gen/0/later", 150, 0};
  pthread_t th;
  pthread_create(&th, NULL, set_later, &j);
  double t0 = now_s();
  void *v = NULL;
  int rc = mt_store_get(s, j.key, &v, NULL, 5000);
  double took = now_s() - t0;
  pthread_join(th, NULL);
  CHECK(!rc && v && !strcmp(v, "late"), "get of a later set: %s", mt_errmsg());
  CHECK(took >= 0.14 && took < 1.0, "get waited %.3f s for a set after 0.15 s", took);
  free(v);

  t0 = now_s();
  rc = mt_store_get(s, "gen/0/never", &v, NULL, 200);
  took = now_s() - t0;
  char addr[64];
  snprintf(addr, sizeof addr, "127.0.0.1:%d", server_port);
  CHECK(rc == MT_ETIMEDOUT, "rc %s", mt_strerror(rc));
  CHECK(strstr(mt_errmsg(), "gen/0/never") && strstr(mt_errmsg(), "200 ms") &&
            strstr(mt_errmsg(), addr),
        "message names no key, timeout or address: %s", mt_errmsg());
  CHECK(took >= 0.19 && took < 1.0, "a 200 ms get took %.3f s", took);
  CHECK(mt_store_get(s, "gen/0/never", &v, NULL, 0) == MT_ETIMEDOUT, "get without wait");
}

static void *delete_then_set(void *p) {
  job *j = p;
  sleep_ms(50);
  mt_store_del(j->s, "gen/0/d/x");
  sleep_ms(50);
  mt_store_set(j->s, "gen/0/d/y", "y", 1);
  sleep_ms(150);
  mt_store_set(j->s, "gen/0/d/x", "x", 1);
  return NULL;
}

static void test_wait_for_several_keys(mt_store *s, mt_store *other) {
  /* A key present when the wait began but deleted before the last one came
   * is waited for again. */
  const char *xy[] = {"gen/0/d/x", "gen/0/d/y"};
  mt_store_set(s, xy[0], "x", 1);
  job d = {other, NULL, 0, 0};
  pthread_t dt;
  pthread_create(&dt, NULL, delete_then_set, &d);
  double t0 = now_s();
  int rc = mt_store_tcp_wait(s, xy, 2, 5000);
  double took = now_s() - t0;
  pthread_join(dt, NULL);
  CHECK(!rc && took >= 0.24 && took < 1.0, "wait across a delete: %s after %.3f s", mt_errmsg(),
        took);

  const char *keys[] = {"gen/0/w/a", "gen/0/w/b", "gen/0/w/c"};
  job j[3] = {{other, keys[0], 50, 0}, {other, keys[1], 100, 0}, {other, keys[2], 200, 0}};
  pthread_t th[3];
  for (int i = 0; i < 3; i++) pthread_create(&th[i], NULL, set_later, &j[i]);
  t0 = now_s();
  rc = mt_store_tcp_wait(s, keys, 3, 5000);
  took = now_s() - t0;
  for (int i = 0; i < 3; i++) pthread_join(th[i], NULL);
  CHECK(!rc, "wait: %s", mt_errmsg());
  CHECK(took >= 0.19 && took < 1.0, "wait for keys set by 0.2 s took %.3f s", took);
  CHECK(!mt_store_tcp_wait(s, keys, 3, 0), "wait on present keys: %s", mt_errmsg());
  const char *some[] = {"gen/0/w/a", "gen/0/w/missing", "gen/0/w/c"};
  t0 = now_s();
  rc = mt_store_tcp_wait(s, some, 3, 150);
  took = now_s() - t0;
  CHECK(rc == MT_ETIMEDOUT && strstr(mt_errmsg(), "gen/0/w/missing") &&
            strstr(mt_errmsg(), "150 ms"),
        "wait timeout: %s %s", mt_strerror(rc), mt_errmsg());
  CHECK(took >= 0.14 && took < 1.0, "a 150 ms wait took %.3f s", took);
}

/* n processes set their rank and wait for all: a barrier through the store. */
static void test_barrier_of_processes(mt_store *s) {
  enum { N = 8 };
  pid_t pid[N];
  char port[16], rank[N][8], n[8];
  snprintf(port, sizeof port, "%d", server_port);
  snprintf(n, sizeof n, "%d", N);
  for (int i = 0; i < N; i++) {
    snprintf(rank[i], sizeof rank[i], "%d", i);
    char *args[] = {"test_store_tcp", "--child-barrier", port, rank[i], n, NULL};
    pid[i] = spawn_self(args);
  }
  int ok = 0;
  for (int i = 0; i < N; i++) ok += reap(pid[i], 20) == 0;
  int64_t done = 0;
  mt_store_add(s, "gen/0/barrier/done", 0, &done);
  CHECK(ok == N && done == N, "%d of %d barrier processes passed, %" PRId64 " counted", ok, N,
        done);
}

static void *adder(void *p) {
  job *j = p;
  for (int i = 0; i < j->count; i++)
    if (mt_store_add(j->s, j->key, 1, NULL)) fprintf(stderr, "add: %s\n", mt_errmsg());
  return NULL;
}

/* 4 threads, two sharing one client and two with clients of their own. */
static void test_1000_adds_from_4_threads_sum_exactly(mt_store *shared) {
  mt_store *own[2] = {client(5000), client(5000)};
  job j[4] = {{shared, "gen/0/count", 0, 250},
              {shared, "gen/0/count", 0, 250},
              {own[0], "gen/0/count", 0, 250},
              {own[1], "gen/0/count", 0, 250}};
  pthread_t th[4];
  for (int i = 0; i < 4; i++)
    if (j[i].s) pthread_create(&th[i], NULL, adder, &j[i]);
  for (int i = 0; i < 4; i++)
    if (j[i].s) pthread_join(th[i], NULL);
  int64_t v = 0;
  CHECK(!mt_store_add(shared, "gen/0/count", 0, &v) && v == 1000,
        "4 threads x 250 adds gave %" PRId64, v);
  mt_store_free(own[0]);
  mt_store_free(own[1]);
}

static void *writer(void *p) {
  job *j = p;
  size_t bytes = 1 << 20;
  char *a = malloc(bytes);
  for (int i = 0; i < j->count; i++) {
    memset(a, i % 2 ? 'b' : 'a', bytes);
    mt_store_set(j->s, j->key, a, bytes);
  }
  free(a);
  return NULL;
}

static void test_values_of_several_mb(mt_store *s, mt_store *other) {
  size_t bytes = 8u << 20;
  unsigned char *big = malloc(bytes);
  for (size_t i = 0; i < bytes; i++) big[i] = (unsigned char)(i * 2654435761u >> 13);
  CHECK(!mt_store_set(s, "gen/0/blob", big, bytes), "set 8 MB: %s", mt_errmsg());
  void *v = NULL;
  size_t n = 0;
  CHECK(!mt_store_get(other, "gen/0/blob", &v, &n, 1000) && n == bytes && !memcmp(v, big, bytes),
        "8 MB did not round trip: %s", mt_errmsg());
  free(v);
  free(big);
  big = calloc(1, MT_STORE_MAX_VALUE + 1);
  CHECK(!mt_store_set(s, "gen/0/max", big, MT_STORE_MAX_VALUE), "set 16 MiB: %s", mt_errmsg());
  v = NULL;
  CHECK(!mt_store_get(s, "gen/0/max", &v, &n, 0) && n == MT_STORE_MAX_VALUE, "get 16 MiB: %s",
        mt_errmsg());
  free(v);
  int rc = mt_store_set(s, "gen/0/over", big, MT_STORE_MAX_VALUE + 1);
  CHECK(rc == MT_EINVAL && strstr(mt_errmsg(), "gen/0/over"), "a value over 16 MiB: %s %s",
        mt_strerror(rc), mt_errmsg());
  free(big);
  mt_store_del(s, "gen/0/max");

  /* Readers never see a partial value while a writer replaces 1 MB values. */
  job j = {other, "gen/0/churn", 0, 40};
  mt_store_set(s, j.key, "", 0);
  pthread_t th;
  pthread_create(&th, NULL, writer, &j);
  int partial = 0, reads = 0;
  for (int i = 0; i < 80; i++) {
    if (mt_store_get(s, j.key, &v, &n, 1000)) continue;
    reads++;
    const char *c = v;
    if (n && n != 1u << 20) partial++;
    for (size_t k = 1; k < n && !partial; k++) partial += c[k] != c[0];
    free(v);
  }
  pthread_join(th, NULL);
  CHECK(!partial && reads == 80, "%d of %d reads saw a partial value", partial, reads);
}

/* Sends bytes on a fresh raw connection and expects an error reply with want
 * status (op ERROR unless op given), then the close. */
static void expect_error_and_close(const char *what, const void *bytes, size_t n, uint8_t want,
                                   uint8_t op) {
  int fd = raw_connect();
  if (fd < 0) {
    CHECK(0, "%s: raw connect", what);
    return;
  }
  raw_write(fd, bytes, n);
  uint8_t buf[4096];
  mt_store_msg m;
  int rc = raw_recv(fd, buf, sizeof buf, &m);
  CHECK(!rc && m.status == want && m.op == (op | MT_STORE_REPLY) && m.value.bytes > 0,
        "%s: rc %d, op %u, status %s (want %s)", what, rc, m.op, mt_store_status_name(m.status),
        mt_store_status_name(want));
  CHECK(raw_closed(fd), "%s: the server kept the connection open", what);
  close(fd);
}

static void test_malformed_frames_close_only_their_connection(mt_store *s, mt_store *other) {
  /* A request of a good client, parked across all of this. */
  job later = {other, "gen/0/after-garbage", 600, 0};
  pthread_t th;
  pthread_create(&th, NULL, set_later, &later);

  char garbage[64];
  for (int i = 0; i < 64; i++) garbage[i] = (char)(i * 37 + 11);
  expect_error_and_close("garbage", garbage, sizeof garbage, MT_STORE_MALFORMED, MT_STORE_OP_ERROR);

  uint8_t f[256];
  size_t n;
  mt_store_msg set = {.op = MT_STORE_OP_SET,
                      .id = 3,
                      .key = mt_store_cstr("gen/0/raw"),
                      .value = mt_store_cstr("v")};
  mt_store_encode(&set, f, sizeof f, &n);
  f[0] ^= 0xff;
  expect_error_and_close("wrong magic", f, n, MT_STORE_MALFORMED, MT_STORE_OP_ERROR);
  mt_store_encode(&set, f, sizeof f, &n);
  f[4] = 2;
  expect_error_and_close("version 2", f, n, MT_STORE_UNSUPPORTED, MT_STORE_OP_ERROR);
  mt_store_encode(&set, f, sizeof f, &n);
  f[5] = 99;
  expect_error_and_close("unknown op", f, n, MT_STORE_UNSUPPORTED, MT_STORE_OP_ERROR);
  mt_store_encode(&set, f, sizeof f, &n);
  f[12] = 0xff, f[13] = 0xff, f[14] = 0xff, f[15] = 0x7f; /* a 2 GiB body, never sent */
  expect_error_and_close("oversized length", f, MT_STORE_HDR_BYTES, MT_STORE_TOO_LARGE,
                         MT_STORE_OP_ERROR);
  mt_store_encode(&set, f, sizeof f, &n);
  f[MT_STORE_HDR_BYTES] = 0xf0; /* the key's length runs past the body */
  expect_error_and_close("key past the body", f, n, MT_STORE_MALFORMED, MT_STORE_OP_SET);
  mt_store_encode(&set, f, sizeof f, &n);
  f[MT_STORE_HDR_BYTES + 4 + 3] = 0; /* "gen\0..." */
  expect_error_and_close("NUL in a key", f, n, MT_STORE_MALFORMED, MT_STORE_OP_SET);
  mt_store_encode(&set, f, sizeof f, &n);
  f[MT_STORE_HDR_BYTES + 1] = 0x20; /* key length 8192 + 10 */
  expect_error_and_close("key over 4 KiB", f, n, MT_STORE_TOO_LARGE, MT_STORE_OP_SET);
  mt_store_msg reply = {.op = MT_STORE_OP_PING | MT_STORE_REPLY, .id = 4};
  mt_store_encode(&reply, f, sizeof f, &n);
  expect_error_and_close("a reply sent to the server", f, n, MT_STORE_UNSUPPORTED,
                         MT_STORE_OP_ERROR);

  /* Truncated frames, then the client goes away: nothing to answer, nothing breaks. */
  mt_store_encode(&set, f, sizeof f, &n);
  for (size_t cut = 1; cut < n; cut += 3) {
    int fd = raw_connect();
    if (fd < 0) continue;
    raw_write(fd, f, cut);
    close(fd);
  }
  /* A header announcing 8 MB, a little of the body, then the client hangs up. */
  int fd = raw_connect();
  if (fd >= 0) {
    mt_store_encode(&set, f, sizeof f, &n);
    f[12] = 0, f[13] = 0, f[14] = 0x80, f[15] = 0;
    raw_write(fd, f, n);
    close(fd);
  }

  void *v = NULL;
  int rc = mt_store_get(s, later.key, &v, NULL, 5000);
  pthread_join(th, NULL);
  CHECK(!rc && v && !strcmp(v, "late"),
        "a get parked while others sent garbage was not answered: %s", mt_errmsg());
  free(v);
  CHECK(!mt_store_tcp_ping(s, NULL) && !mt_store_set(s, "gen/0/still", "ok", 2),
        "the server stopped serving after garbage: %s", mt_errmsg());
}

static void *get_forever(void *p) {
  job *j = p;
  void *v = NULL;
  j->count = mt_store_get(j->s, j->key, &v, NULL, 15000);
  free(v);
  return NULL;
}

/* The server goes away for a while and comes back on the same port: a GET
 * parked before is sent again and answered, an ADD made while it was down is
 * sent once it is back, and the attempts in between back off. */
static void test_client_reconnects_after_server_restart(mt_store *s) {
  mt_store_tcp_stats st0, st;
  mt_store_tcp_get_stats(s, &st0);
  job j = {s, "gen/1/after-restart", 0, -1};
  pthread_t th;
  pthread_create(&th, NULL, get_forever, &j);
  sleep_ms(100); /* parked on the server */
  int port = server_port;
  CHECK(!server_stop(), "the store server did not exit 0 on SIGTERM");
  double t0 = now_s();
  int64_t v = 0;
  sleep_ms(1200);
  mt_store_tcp_get_stats(s, &st);
  uint64_t attempts = st.connect_failures - st0.connect_failures;
  /* 1.2 s with delays from 50 ms doubling to 1 s: about 5 attempts, never a spin. */
  CHECK(attempts >= 2 && attempts <= 10, "%" PRIu64 " connect attempts in 1.2 s", attempts);
  CHECK(st.last_backoff_ms >= 100, "the last backoff was %d ms", st.last_backoff_ms);
  CHECK(st.drops == st0.drops + 1, "drops %" PRIu64 " -> %" PRIu64, st0.drops, st.drops);
  CHECK(!server_start(port) && server_port == port, "the server did not restart on port %d", port);
  int rc = mt_store_add(s, "gen/1/joined", 1, &v);
  CHECK(!rc && v == 1, "an add after the restart: %s", mt_errmsg());
  double back = now_s() - t0;
  mt_store *other = client(2000);
  if (other) mt_store_set(other, j.key, "x", 1);
  pthread_join(th, NULL);
  CHECK(j.count == 0, "the get parked before the restart failed: %s", mt_strerror(j.count));
  CHECK(back < 6.0, "the client took %.2f s to come back", back); /* backoff caps at 1 s */
  mt_store_tcp_get_stats(s, &st);
  CHECK(st.connects == st0.connects + 1 && st.retries >= st0.retries + 1,
        "connects %" PRIu64 ", retries %" PRIu64, st.connects - st0.connects,
        st.retries - st0.retries);
  mt_store_free(other);
}

/* A server that stops answering (SIGSTOP: the coordinator's host froze) is a
 * store failure, never "the key is not set yet": a GET polled in short slices
 * fails with MT_EIO after request_timeout_ms, and a comm group bootstrapping
 * through the store fails within its deadline plus one request timeout,
 * blaming the store rather than the peers. */
static void test_stopped_server_is_a_store_failure(void) {
  mt_store_tcp_opts o = {.connect_timeout_ms = 1000, .request_timeout_ms = 500};
  mt_store *s = NULL;
  CHECK(!mt_store_tcp_new("127.0.0.1", server_port, &o, &s), "%s", mt_errmsg());
  if (!s) return;
  CHECK(!mt_store_set(s, "gen/3/x", "1", 1), "%s", mt_errmsg());
  kill(server_pid, SIGSTOP);
  double t0 = now_s();
  void *v = NULL;
  int rc = mt_store_get(s, "gen/3/absent", &v, NULL, 100);
  double took = now_s() - t0;
  CHECK(rc == MT_EIO && strstr(mt_errmsg(), "no reply"), "a get from a stopped server: %s %s",
        mt_strerror(rc), mt_errmsg());
  CHECK(took >= 0.5 && took < 2.0, "a get with 100 + 500 ms to spare took %.2f s", took);
  free(v);

  mt_comm_opts co = {.store = s,
                     .name = "world",
                     .prefix = "gen/3/comm/world",
                     .rank = 0,
                     .size = 8,
                     .timeout_ms = 1500,
                     .backend = MT_COMM_GLOO};
  mt_comm *c = NULL;
  t0 = now_s();
  rc = mt_comm_create(&c, &co);
  took = now_s() - t0;
  CHECK(rc == MT_EIO && !c && strstr(mt_errmsg(), "no reply"),
        "a join through a stopped store: %s %s", mt_strerror(rc), mt_errmsg());
  CHECK(took < 1.5 + 0.5 + 1.5, "a join with a 1500 ms deadline took %.2f s", took);
  kill(server_pid, SIGCONT);
  mt_store_free(s);
}

static void test_no_server_fails_naming_address_and_key(void) {
  /* A port nobody listens on: bind one, note it, close it. */
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET};
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  bind(fd, (struct sockaddr *)&a, sizeof a);
  getsockname(fd, (struct sockaddr *)&a, &len);
  close(fd);
  int port = ntohs(a.sin_port);
  mt_store_tcp_opts o = {.connect_timeout_ms = 300, .backoff_min_ms = 20, .backoff_max_ms = 100};
  mt_store *s = NULL;
  double t0 = now_s();
  int rc = mt_store_tcp_new("127.0.0.1", port, &o, &s);
  double took = now_s() - t0;
  char addr[64];
  snprintf(addr, sizeof addr, "127.0.0.1:%d", port);
  CHECK(rc == MT_EIO && !s && strstr(mt_errmsg(), addr) && strstr(mt_errmsg(), "refused"),
        "no server: %s %s", mt_strerror(rc), mt_errmsg());
  CHECK(took >= 0.25 && took < 2.0, "a 300 ms connect timeout took %.3f s", took);

  /* A client whose server stops: requests fail after the connect timeout, naming the key. */
  mt_store_server_thread *t;
  CHECK(!mt_store_server_run_thread("127.0.0.1", 0, NULL, &t), "%s", mt_errmsg());
  port = mt_store_server_thread_port(t);
  CHECK(!mt_store_tcp_new("127.0.0.1", port, &o, &s), "%s", mt_errmsg());
  CHECK(!mt_store_set(s, "gen/2/x", "1", 1), "%s", mt_errmsg());
  mt_store_server_thread_stop(t);
  rc = mt_store_add(s, "gen/2/counter", 1, NULL);
  CHECK(rc == MT_EIO && strstr(mt_errmsg(), "gen/2/counter"), "add without a server: %s %s",
        mt_strerror(rc), mt_errmsg());
  mt_store_free(s);
}

/* The in-thread server: the same contract, and a stop with clients connected
 * and requests parked does not hang. */
static void test_server_on_its_own_thread(void) {
  mt_store_server_thread *t;
  if (mt_store_server_run_thread("127.0.0.1", 0, NULL, &t)) {
    CHECK(0, "run_thread: %s", mt_errmsg());
    return;
  }
  mt_store_tcp_opts o = {.connect_timeout_ms = 300, .backoff_min_ms = 20, .backoff_max_ms = 100};
  mt_store *s = NULL;
  CHECK(!mt_store_tcp_new("127.0.0.1", mt_store_server_thread_port(t), &o, &s), "%s", mt_errmsg());
  if (!s) return mt_store_server_thread_stop(t);
  test_values_round_trip(s);
  test_get_many_reads_present_and_absent_keys(s);
  test_del_prefix_removes_exactly_the_keys_under_it(s);
  job j = {s, "gen/0/never-set", 0, -1};
  pthread_t th;
  pthread_create(&th, NULL, get_forever, &j);
  sleep_ms(50);
  double t0 = now_s();
  mt_store_server_thread_stop(t);
  CHECK(now_s() - t0 < 1.0, "stopping the server took %.3f s", now_s() - t0);
  pthread_join(th, NULL);
  CHECK(j.count == MT_EIO, "a get parked on a stopped server: %s", mt_strerror(j.count));
  mt_store_free(s);
}

int main(int argc, char **argv) {
  signal(SIGPIPE, SIG_IGN);
  if (argc == 5 && !strcmp(argv[1], "--child-set"))
    return child_set(atoi(argv[2]), argv[3], atoi(argv[4]));
  if (argc == 5 && !strcmp(argv[1], "--child-barrier"))
    return child_barrier(atoi(argv[2]), atoi(argv[3]), atoi(argv[4]));

  if (server_start(0)) {
    fprintf(stderr, "could not start %s\n", STORE_SERVER_MAIN);
    return 1;
  }
  mt_store *s = client(5000), *other = client(5000);
  if (!s || !other) {
    server_stop();
    return 1;
  }
  test_values_round_trip(s);
  test_get_many_reads_present_and_absent_keys(s);
  test_add_counts_and_refuses_text(s);
  test_cas_swaps_only_on_match(s);
  test_get_is_answered_when_another_process_sets();
  test_get_waits_and_times_out_naming_key(s, other);
  test_wait_for_several_keys(s, other);
  test_barrier_of_processes(s);
  test_1000_adds_from_4_threads_sum_exactly(s);
  test_values_of_several_mb(s, other);
  test_malformed_frames_close_only_their_connection(s, other);
  test_client_reconnects_after_server_restart(s);
  test_stopped_server_is_a_store_failure();
  mt_store_free(other);
  mt_store_free(s);
  CHECK(!server_stop(), "the store server did not exit 0 on SIGTERM");
  test_no_server_fails_naming_address_and_key();
  test_server_on_its_own_thread();
  test_full_store_refuses_writes_and_recovers();
  test_del_prefix_to_an_old_server_is_not_supported();
  test_cluster_key_is_required();
  test_parked_requests_past_the_transient_limit_are_refused();
  test_a_frame_past_the_transient_limit_closes_its_connection();
  test_connections_past_the_cap_are_closed_at_once();
  test_unread_replies_past_the_transient_limit_close_their_connection();

  if (failures) fprintf(stderr, "%d check(s) failed\n", failures);
  return failures ? 1 : 0;
}
