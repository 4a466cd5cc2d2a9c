#include "log.h"

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
  char line[4096];
  int n;
  if (getenv("JOURNAL_STREAM")) {
    n = snprintf(line, sizeof line, "<%d>", level);
  } else {
    static const char *names[8] = {"", "", "", "error", "warn", "", "info", "debug"};
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    n = snprintf(line, sizeof line, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ %-5s ", tm.tm_year + 1900,
                 tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000,
                 names[level & 7]);
  }
  va_list ap;
  va_start(ap, fmt);
  n += vsnprintf(line + n, sizeof line - (size_t)n - 1, fmt, ap);
  va_end(ap);
  if (n > (int)sizeof line - 2) n = (int)sizeof line - 2;
  line[n++] = '\n';
  ssize_t w = write(STDERR_FILENO, line, (size_t)n);
  (void)w;
}
