#include "log.h"

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int log_level = MT_LOG_INFO;

void mt_log_set_level(int level) { log_level = level; }
int mt_log_level(void) { return log_level; }

int mt_log_parse_level(const char *s) {
  if (!strcmp(s, "error")) return MT_LOG_ERROR;
  if (!strcmp(s, "warn") || !strcmp(s, "warning")) return MT_LOG_WARN;
  if (!strcmp(s, "info")) return MT_LOG_INFO;
  if (!strcmp(s, "debug")) return MT_LOG_DEBUG;
  return -1;
}

void mt_log(int level, const char *fmt, ...) {
  if (level > log_level) return;
  char prefix[64];
  int pn;
  if (getenv("JOURNAL_STREAM")) {
    pn = snprintf(prefix, sizeof prefix, "<%d>", level);
  } else {
    static const char *names[8] = {"", "", "", "error", "warn", "", "info", "debug"};
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    pn = snprintf(prefix, sizeof prefix, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ %-5s ",
                  tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                  ts.tv_nsec / 1000000, names[level & 7]);
  }
  char msg[4096];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  /* every line of a message of several (one problem a line) carries the
   * prefix: a continuation without it has no level in the journal and no
   * time for a log shipper, which splits it off */
  char out[8192];
  size_t n = 0;
  for (const char *l = msg;;) {
    size_t len = strcspn(l, "\n"), room = sizeof out - n;
    if (room < (size_t)pn + 2) break;
    memcpy(out + n, prefix, (size_t)pn);
    n += (size_t)pn;
    size_t keep = len < room - (size_t)pn - 1 ? len : room - (size_t)pn - 1;
    memcpy(out + n, l, keep);
    n += keep;
    out[n++] = '\n';
    l += len;
    if (!*l || !l[1]) break; /* a trailing newline ends the message */
    l++;
  }
  /* a pipe takes a write of up to 4096 bytes whole; a longer message (the
   * prefix on every line can make one) goes out under a lock, all of it, so
   * another thread's message never lands inside it */
  static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
  pthread_mutex_lock(&lock);
  for (size_t done = 0; done < n;) {
    ssize_t w = write(STDERR_FILENO, out + done, n - done);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) break;
    done += (size_t)w;
  }
  pthread_mutex_unlock(&lock);
}
