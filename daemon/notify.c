/* notify.c — systemd notifications from a thread of their own (notify.h). */
#include "notify.h"

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <systemd/sd-daemon.h>

#include "log.h"
#include "monotime.h"

#define NOTIFY_STATUS_MAX 1024

/* Shared by the callers and the thread, under mu. After mt_notify_free
 * gives up waiting, the thread owns it and frees it when it ends. */
struct mt_notify {
  pthread_mutex_t mu;
  pthread_cond_t more; /* something pending, or closing */
  pthread_cond_t done; /* the thread ended */
  int flags;           /* MT_NOTIFY_* not yet said */
  int has_status;      /* status holds a STATUS= not yet said */
  char status[NOTIFY_STATUS_MAX];
  int closing;   /* mt_notify_free: say what is pending, then end */
  int exited;    /* the thread ended: mt_notify_free frees */
  int abandoned; /* mt_notify_free gave up waiting: the thread frees */
  unsigned long sent;
  pthread_t thread;
};

static void notify_destroy(mt_notify *nt) {
  pthread_cond_destroy(&nt->more);
  pthread_cond_destroy(&nt->done);
  pthread_mutex_destroy(&nt->mu);
  free(nt);
}

/* One datagram of everything pending, in notify.h's order: systemd reads a
 * message's READY/STOPPING as the last one given. */
static void *notifier(void *arg) {
  mt_notify *nt = arg;
  char msg[NOTIFY_STATUS_MAX + 64];
  int failed_said = 0;
  pthread_mutex_lock(&nt->mu);
  for (;;) {
    while (!nt->flags && !nt->has_status && !nt->closing) pthread_cond_wait(&nt->more, &nt->mu);
    if (!nt->flags && !nt->has_status) break; /* closing, and all said */
    int flags = nt->flags;
    size_t len = 0;
    msg[0] = 0;
    if (flags & MT_NOTIFY_READY) len += (size_t)snprintf(msg + len, sizeof msg - len, "READY=1\n");
    if (nt->has_status)
      len += (size_t)snprintf(msg + len, sizeof msg - len, "STATUS=%s\n", nt->status);
    if (flags & MT_NOTIFY_WATCHDOG)
      len += (size_t)snprintf(msg + len, sizeof msg - len, "WATCHDOG=1\n");
    if (flags & MT_NOTIFY_STOPPING)
      len += (size_t)snprintf(msg + len, sizeof msg - len, "STOPPING=1\n");
    nt->flags = 0;
    nt->has_status = 0;
    pthread_mutex_unlock(&nt->mu);
    if (len && msg[len - 1] == '\n') msg[len - 1] = 0;
    int rc = sd_notify(0, msg); /* may block while PID 1's queue is full */
    if (rc < 0 && !failed_said) {
      mt_log_warn("systemd notification failed: %s (said once)", strerror(-rc));
      failed_said = 1;
    }
    pthread_mutex_lock(&nt->mu);
    __atomic_add_fetch(&nt->sent, 1, __ATOMIC_RELAXED);
  }
  nt->exited = 1;
  int abandoned = nt->abandoned;
  pthread_cond_broadcast(&nt->done);
  pthread_mutex_unlock(&nt->mu);
  if (abandoned) {
    pthread_detach(pthread_self());
    notify_destroy(nt);
  }
  return NULL;
}

mt_notify *mt_notify_new(void) {
  mt_notify *nt = calloc(1, sizeof *nt);
  if (!nt) return NULL;
  pthread_mutex_init(&nt->mu, NULL);
  pthread_cond_init(&nt->more, NULL);
  if (mt_mono_cond_init(&nt->done)) pthread_cond_init(&nt->done, NULL);
  int rc = pthread_create(&nt->thread, NULL, notifier, nt);
  if (rc) {
    mt_log_warn("systemd notifications: cannot start their thread: %s; none will be sent",
                strerror(rc));
    notify_destroy(nt);
    return NULL;
  }
  return nt;
}

void mt_notify_flags(mt_notify *nt, int flags) {
  if (!nt) return;
  pthread_mutex_lock(&nt->mu);
  nt->flags |= flags;
  pthread_cond_signal(&nt->more);
  pthread_mutex_unlock(&nt->mu);
}

void mt_notify_status(mt_notify *nt, const char *fmt, ...) {
  if (!nt) return;
  char text[NOTIFY_STATUS_MAX]; /* formatted outside the lock */
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(text, sizeof text, fmt, ap);
  va_end(ap);
  for (char *p = text; *p; p++) /* one line: a newline would start another field */
    if (*p == '\n') *p = ' ';
  pthread_mutex_lock(&nt->mu);
  memcpy(nt->status, text, sizeof text);
  nt->has_status = 1;
  pthread_cond_signal(&nt->more);
  pthread_mutex_unlock(&nt->mu);
}

void mt_notify_free(mt_notify *nt, int wait_ms) {
  if (!nt) return;
  struct timespec until = mt_mono_deadline(wait_ms);
  pthread_mutex_lock(&nt->mu);
  nt->closing = 1;
  pthread_cond_signal(&nt->more);
  while (!nt->exited)
    if (pthread_cond_timedwait(&nt->done, &nt->mu, &until) == ETIMEDOUT) break;
  if (!nt->exited) { /* held in sd_notify: it frees itself when it comes back */
    nt->abandoned = 1;
    pthread_mutex_unlock(&nt->mu);
    mt_log_warn("systemd notifications: still not sent after %d ms (is PID 1 held up?); "
                "leaving them",
                wait_ms);
    return;
  }
  pthread_mutex_unlock(&nt->mu);
  pthread_join(nt->thread, NULL);
  notify_destroy(nt);
}

unsigned long mt_notify_sent(const mt_notify *nt) {
  return nt ? __atomic_load_n(&nt->sent, __ATOMIC_RELAXED) : 0;
}
