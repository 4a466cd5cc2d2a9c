/* test_log.c — the daemon's log lines (daemon/core/log.c): every line of a
 * message of several (a job refused with one problem a line) carries the
 * time and level, or under systemd the journal's priority, so neither the
 * journal nor a log shipper takes a continuation for a line of its own,
 * and two threads' messages never land inside each other on a pipe, even
 * past the 4096 bytes a pipe takes whole. */
#include <errno.h>
#include <pthread.h>
#include <regex.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "err.h"
#include "log.h"
#include "mt_check.h"
#include "stderr_capture.h"

/* What mt_log writes to stderr for one message, read back from a file. */
static char *logged(int level, const char *msg) {
  static char buf[16384];
  stderr_capture c;
  if (stderr_capture_begin(&c)) return NULL;
  mt_log(level, "%s", msg);
  return stderr_capture_end(&c, buf, sizeof buf);
}

static int lines_match(const char *text, const char *pattern, int want) {
  regex_t re;
  if (regcomp(&re, pattern, REG_EXTENDED | REG_NOSUB)) return -1;
  int n = 0, ok = 1;
  char copy[16384];
  snprintf(copy, sizeof copy, "%s", text);
  for (char *save, *l = strtok_r(copy, "\n", &save); l; l = strtok_r(NULL, "\n", &save), n++)
    ok &= !regexec(&re, l, 0, NULL, 0);
  regfree(&re);
  return ok && n == want;
}

/* Two threads log messages of 40 lines (about 5 KB stamped) to a pipe a
 * third drains slowly, so writes block part-way; each line says whose
 * message and which line it is. */
enum { MSGS = 60, LINES = 40 };

static void *log_many(void *arg) {
  int who = (int)(intptr_t)arg;
  char msg[LINES * 128], *p = msg;
  for (int m = 0; m < MSGS; m++) {
    p = msg;
    for (int l = 0; l < LINES; l++)
      p += sprintf(
          p, "%s%d %d %d %.80s", l ? "\n" : "", who, m, l,
          "................................................................................");
    mt_log(MT_LOG_INFO, "%s", msg);
  }
  return NULL;
}

typedef struct {
  int fd;
  char *buf;
  size_t n, cap;
} drain;

static void *drain_pipe(void *arg) {
  drain *d = arg;
  for (;;) {
    usleep(200);
    ssize_t r = read(d->fd, d->buf + d->n, d->cap - d->n < 1000 ? d->cap - d->n : 1000);
    if (r <= 0) return NULL;
    d->n += (size_t)r;
  }
}

/* Whether every message's lines came out one after another, in order. */
static int messages_whole(char *text, int *lines_seen) {
  int ok = 1, prev_who = -1, prev_m = -1, prev_l = LINES - 1;
  *lines_seen = 0;
  for (char *save, *l = strtok_r(text, "\n", &save); l; l = strtok_r(NULL, "\n", &save)) {
    const char *body = strstr(l, "info  ");
    int who, m, line;
    if (!body || sscanf(body + 6, "%d %d %d", &who, &m, &line) != 3) return 0;
    if (line == 0 ? prev_l != LINES - 1 : (who != prev_who || m != prev_m || line != prev_l + 1))
      ok = 0;
    prev_who = who, prev_m = m, prev_l = line;
    ++*lines_seen;
  }
  return ok && prev_l == LINES - 1;
}

static void two_threads_on_a_pipe(void) {
  int fds[2];
  if (pipe(fds)) {
    CHECK(0, "pipe: %s", strerror(errno));
    return;
  }
  drain d = {.fd = fds[0], .cap = 2u * MSGS * LINES * 160};
  d.buf = malloc(d.cap + 1);
  fflush(stderr);
  int saved = dup(STDERR_FILENO);
  dup2(fds[1], STDERR_FILENO);
  close(fds[1]);
  pthread_t reader, a, b;
  pthread_create(&reader, NULL, drain_pipe, &d);
  pthread_create(&a, NULL, log_many, (void *)(intptr_t)1);
  pthread_create(&b, NULL, log_many, (void *)(intptr_t)2);
  pthread_join(a, NULL);
  pthread_join(b, NULL);
  dup2(saved, STDERR_FILENO); /* the pipe's last writer closes: the reader sees its end */
  close(saved);
  pthread_join(reader, NULL);
  close(fds[0]);
  d.buf[d.n] = 0;
  int seen;
  CHECK(messages_whole(d.buf, &seen) && seen == 2 * MSGS * LINES,
        "two threads' 40-line messages each whole on a pipe (%d of %d lines read, %zu bytes)", seen,
        2 * MSGS * LINES, d.n);
  free(d.buf);
}

/* A message copied into a bounded buffer is cut at a whole UTF-8
 * character (mt_msg_cut_whole): half an "é" would fail every JSON that
 * carries it, a status or a restart's reason. */
static const char *copied_cut(char s[8], const char *from) {
  size_t n = strlen(from) < 7 ? strlen(from) : 7; /* what a bounded copy keeps */
  memcpy(s, from, n);
  s[n] = 0;
  mt_msg_cut_whole(s, 8);
  return s;
}

static void messages_cut_whole(void) {
  char s[8];
  CHECK(!strcmp(copied_cut(s, "abcdef\xc3\xa9"), "abcdef"), "half an e-acute dropped: \"%s\"", s);
  CHECK(!strcmp(copied_cut(s, "abcde\xc3\xa9z"), "abcde\xc3\xa9"),
        "a whole character at the end kept: \"%s\"", s);
  CHECK(!strcmp(copied_cut(s, "abcde\xe2\x82\xac"), "abcde"),
        "two bytes of a euro's three dropped: \"%s\"", s);
  CHECK(!strcmp(copied_cut(s, "ab"), "ab"), "a short message untouched");
}

int main(void) {
  unsetenv("JOURNAL_STREAM");
  const char *two = "job j.json cannot run: train.lr.warmup_stpes: unknown key\n"
                    "model.n_head: 4 is not divisible by parallel.tp = 3";
  char *out = logged(MT_LOG_ERROR, two);
  CHECK(out && lines_match(out, "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]{12}Z error [^ ]", 2),
        "two problems, two stamped error lines:\n%s", out ? out : "(none)");
  CHECK(out && strstr(out, "error model.n_head: 4 is not divisible"), "second line kept:\n%s",
        out ? out : "(none)");
  out = logged(MT_LOG_WARN, "one line\n");
  CHECK(out && lines_match(out, "^[0-9T:.Z-]{24} warn  one line$", 1),
        "a trailing newline adds no empty line:\n%s", out ? out : "(none)");
  setenv("JOURNAL_STREAM", "8:1234", 1);
  out = logged(MT_LOG_WARN, "first\nsecond\nthird");
  CHECK(out && !strcmp(out, "<4>first\n<4>second\n<4>third\n"),
        "under systemd every line has its priority:\n%s", out ? out : "(none)");
  char big[6000];
  memset(big, 'x', sizeof big - 1);
  big[sizeof big - 1] = 0;
  out = logged(MT_LOG_INFO, big);
  CHECK(out && strlen(out) > 4000 && out[strlen(out) - 1] == '\n' && !strncmp(out, "<6>xxx", 6),
        "a long message is cut, one line ending in a newline (%zu bytes)", out ? strlen(out) : 0);
  unsetenv("JOURNAL_STREAM");
  two_threads_on_a_pipe();
  messages_cut_whole();
  if (failures) fprintf(stderr, "test_log: %d failure(s)\n", failures);
  return failures != 0;
}
