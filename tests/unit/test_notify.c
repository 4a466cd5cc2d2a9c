/* test_notify.c — systemd notifications never hold their caller
 * (daemon/notify.c): with PID 1's socket full (a datagram socket of the
 * test's, named by NOTIFY_SOCKET, that it fills and does not read), status
 * after status and the watchdog's pings return at once, the newest status
 * replaces those not yet sent, and once the socket is read the newest one
 * arrives; flags pending together go in one datagram in systemd's order;
 * an end that PID 1 holds up returns after its wait and the rest is still
 * sent when PID 1 reads again. */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "notify.h"

#include "mt_check.h"

/* PID 1's side: a datagram socket at a path, NOTIFY_SOCKET naming it. */
typedef struct pid1 {
  int fd;
  struct sockaddr_un addr;
  int filler; /* the test's own sender, which fills the queue */
  int filled; /* datagrams it put there, not yet read back */
} pid1;

static int pid1_open(pid1 *p, const char *name) {
  memset(p, 0, sizeof *p);
  p->addr.sun_family = AF_UNIX;
  snprintf(p->addr.sun_path, sizeof p->addr.sun_path, "%s/%s", tmpdir, name);
  unlink(p->addr.sun_path);
  p->fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  p->filler = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (p->fd < 0 || p->filler < 0 || bind(p->fd, (struct sockaddr *)&p->addr, sizeof p->addr))
    return -1;
  return setenv("NOTIFY_SOCKET", p->addr.sun_path, 1);
}

static void pid1_close(pid1 *p) {
  close(p->fd);
  close(p->filler);
  unlink(p->addr.sun_path);
}

/* Fills the socket's queue until a sender would wait. */
static int pid1_fill(pid1 *p) {
  for (int k = 0; k < 100000; k++) {
    if (sendto(p->filler, "FILLER=1", 8, 0, (struct sockaddr *)&p->addr, sizeof p->addr) < 0)
      return errno == EAGAIN ? 0 : -1;
    p->filled++;
  }
  return -1;
}

/* A socket at tmpdir/name, filled; CHECKs and returns -1 if it cannot be. */
static int pid1_open_full(pid1 *p, const char *name) {
  if (!pid1_open(p, name) && !pid1_fill(p)) return 0;
  CHECK(0, "a notification socket %s, filled: %s", name, strerror(errno));
  return -1;
}

/* The next datagram that is not the filler's, waiting up to ms for it;
 * NULL if none came. */
static const char *pid1_next(pid1 *p, int ms) {
  static char buf[2048];
  struct timeval tv = {.tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000};
  setsockopt(p->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  for (;;) {
    ssize_t got = recv(p->fd, buf, sizeof buf - 1, 0);
    if (got < 0) return NULL;
    buf[got] = 0;
    if (strcmp(buf, "FILLER=1")) return buf;
    p->filled--;
  }
}

typedef struct caller {
  mt_notify *nt;
  int calls;
  int done; /* atomically */
} caller;

/* A rank's step and the loop's watchdog: calls after calls. */
static void *call_often(void *arg) {
  caller *c = arg;
  for (int k = 0; k < c->calls; k++) {
    mt_notify_status(c->nt, "running generation 1: step %d/%d, loss %.4f", k + 1, c->calls, 2.5);
    if (k % 100 == 0) mt_notify_flags(c->nt, MT_NOTIFY_WATCHDOG);
  }
  __atomic_store_n(&c->done, 1, __ATOMIC_RELEASE);
  return NULL;
}

/* Whether flag becomes true within ms. */
static int comes_true(const int *flag, int ms) {
  for (int k = 0; k < ms; k++) {
    if (__atomic_load_n(flag, __ATOMIC_ACQUIRE)) return 1;
    usleep(1000);
  }
  return __atomic_load_n(flag, __ATOMIC_ACQUIRE);
}

static void test_a_full_socket_holds_no_caller_and_the_newest_status_arrives(void) {
  pid1 p;
  if (pid1_open_full(&p, "notify-full")) return;
  mt_notify *nt = mt_notify_new();
  CHECK(nt, "a notifier");
  caller c = {.nt = nt, .calls = 10000};
  pthread_t th;
  pthread_create(&th, NULL, call_often, &c);
  /* the notifier's thread is held in its first send meanwhile */
  CHECK(comes_true(&c.done, 30000), "10000 statuses queued while PID 1's socket is full");
  CHECK(mt_notify_sent(nt) == 0, "nothing sent while the socket is full (%lu)", mt_notify_sent(nt));
  pthread_join(th, NULL);
  /* PID 1 reads again: what the notifier holds comes, then the newest */
  const char *got, *last = NULL;
  static char newest[2048];
  int datagrams = 0;
  while ((got = pid1_next(&p, 2000))) {
    datagrams++;
    snprintf(newest, sizeof newest, "%s", got);
    last = newest;
    if (strstr(got, "step 10000/10000")) break;
  }
  CHECK(last && strstr(last, "STATUS=running generation 1: step 10000/10000, loss 2.5000"),
        "the newest status arrives, got: %s", last ? last : "(nothing)");
  CHECK(datagrams <= 3, "the statuses not yet sent were replaced: %d datagrams for 10000",
        datagrams);
  CHECK(p.filled == 0, "every filler read (%d left)", p.filled);
  mt_notify_free(nt, 5000);
  pid1_close(&p);
}

static void test_pending_flags_and_status_go_in_one_datagram_in_order(void) {
  pid1 p;
  if (pid1_open_full(&p, "notify-order")) return;
  mt_notify *nt = mt_notify_new();
  mt_notify_status(nt, "held"); /* the notifier waits in this one's send */
  usleep(200000);               /* time for it to take this one first */
  mt_notify_flags(nt, MT_NOTIFY_STOPPING);
  mt_notify_status(nt, "stopping after step 7,\ngeneration 2");
  mt_notify_flags(nt, MT_NOTIFY_WATCHDOG);
  mt_notify_flags(nt, MT_NOTIFY_READY);
  mt_notify_flags(nt, MT_NOTIFY_WATCHDOG);
  const char *got;
  int held = 0, together = 0;
  while ((got = pid1_next(&p, 2000))) {
    if (!strcmp(got, "STATUS=held"))
      held = 1;
    else {
      CHECK(!strcmp(got,
                    "READY=1\nSTATUS=stopping after step 7, generation 2\nWATCHDOG=1\nSTOPPING=1"),
            "READY, STATUS (one line), WATCHDOG once, STOPPING last, got:\n%s", got);
      together = 1;
      break;
    }
  }
  /* "held" is sent first unless the notifier woke only after the rest came */
  CHECK(together, "the rest together (after the held status: %d)", held);
  mt_notify_free(nt, 5000);
  pid1_close(&p);
}

static void test_an_end_held_by_pid1_returns_and_sends_later(void) {
  pid1 p;
  if (pid1_open_full(&p, "notify-end")) return;
  mt_notify *nt = mt_notify_new();
  mt_notify_status(nt, "generation 3 ended: stopped");
  mt_notify_flags(nt, MT_NOTIFY_STOPPING);
  struct timespec a, b;
  clock_gettime(CLOCK_MONOTONIC, &a);
  mt_notify_free(nt, 200); /* the thread is held: left to finish */
  clock_gettime(CLOCK_MONOTONIC, &b);
  double waited = (double)(b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) * 1e-9;
  CHECK(waited < 20, "the end returned after its wait, not PID 1's (%.1f s)", waited);
  /* what it held still comes once PID 1 reads: the thread then frees itself */
  const char *got;
  int status = 0, stopping = 0;
  while ((got = pid1_next(&p, 2000))) {
    status |= strstr(got, "STATUS=generation 3 ended: stopped") != NULL;
    stopping |= strstr(got, "STOPPING=1") != NULL;
    if (stopping) break;
  }
  CHECK(status && stopping, "the status (%d) and STOPPING=1 (%d) sent after the end", status,
        stopping);
  usleep(100000); /* the abandoned thread frees the notifier (ASan sees a leak if not) */
  pid1_close(&p);
}

static void test_without_a_socket_nothing_is_sent_and_nothing_fails(void) {
  unsetenv("NOTIFY_SOCKET");
  mt_notify *nt = mt_notify_new();
  mt_notify_status(nt, "joining, generation 0");
  mt_notify_flags(nt, MT_NOTIFY_READY | MT_NOTIFY_STOPPING);
  mt_notify_free(nt, 5000);
  mt_notify_status(NULL, "a notifier that could not start takes calls");
  mt_notify_flags(NULL, MT_NOTIFY_WATCHDOG);
  mt_notify_free(NULL, 0);
  CHECK(mt_notify_sent(NULL) == 0, "none sent by no notifier");
}

int main(void) {
  mt_log_set_level(MT_LOG_INFO);
  snprintf(tmpdir, sizeof tmpdir, "/tmp/test_notify.XXXXXX");
  if (!mkdtemp(tmpdir)) {
    perror("mkdtemp");
    return 1;
  }
  test_a_full_socket_holds_no_caller_and_the_newest_status_arrives();
  test_pending_flags_and_status_go_in_one_datagram_in_order();
  test_an_end_held_by_pid1_returns_and_sends_later();
  test_without_a_socket_nothing_is_sent_and_nothing_fails();
  rmdir(tmpdir);
  if (failures) fprintf(stderr, "test_notify: %d failure(s)\n", failures);
  return failures != 0;
}
