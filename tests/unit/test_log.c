/* test_log.c — the daemon's log lines (daemon/core/log.c): every line of a
 * message of several (a job refused with one problem a line) carries the
 * time and level, or under systemd the journal's priority, so neither the
 * journal nor a log shipper takes a continuation for a line of its own. */
#include <regex.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "log.h"
#include "mt_check.h"

/* What mt_log writes to stderr for one message, read back from a file. */
static char *logged(int level, const char *msg) {
  static char buf[16384];
  fflush(stderr);
  FILE *f = tmpfile();
  int saved = dup(STDERR_FILENO);
  if (!f || saved < 0 || dup2(fileno(f), STDERR_FILENO) < 0) return NULL;
  mt_log(level, "%s", msg);
  dup2(saved, STDERR_FILENO);
  close(saved);
  size_t n = fseek(f, 0, SEEK_SET) ? 0 : fread(buf, 1, sizeof buf - 1, f);
  buf[n] = 0;
  fclose(f);
  return buf;
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
  if (failures) fprintf(stderr, "test_log: %d failure(s)\n", failures);
  return failures != 0;
}
