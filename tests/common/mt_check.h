/* mt_check.h — the small harness shared by C tests. CHECK records a failure
 * (file, line, message) and goes on, so one run reports every broken
 * property; REQUIRE makes the test function return 1 at the first one; main
 * returns non-zero when anything failed. now_s() times deadlines; tmp_path()
 * names files in the test's temporary directory (tmpdir, made by the test). */
#ifndef MT_CHECK_H
#define MT_CHECK_H

#include <stdarg.h>
#include <stdio.h>
#include <time.h>

static int failures __attribute__((unused));
static char tmpdir[64] __attribute__((unused));

#define CHECK(cond, ...)                                                                           \
  do {                                                                                             \
    if (!(cond)) {                                                                                 \
      fprintf(stderr, "%s:%d: FAIL: ", __FILE__, __LINE__);                                        \
      fprintf(stderr, __VA_ARGS__);                                                                \
      fprintf(stderr, "\n");                                                                       \
      failures++;                                                                                  \
    }                                                                                              \
  } while (0)

#define REQUIRE(cond, ...)                                                                         \
  do {                                                                                             \
    if (!(cond)) {                                                                                 \
      fprintf(stderr, "  %s:%d: check failed: %s: ", __FILE__, __LINE__, #cond);                   \
      fprintf(stderr, __VA_ARGS__);                                                                \
      fprintf(stderr, "\n");                                                                       \
      return 1;                                                                                    \
    }                                                                                              \
  } while (0)

/* tmpdir/name, in one of 8 rotating buffers (so a call may use several). */
static inline const char *tmp_path(const char *name) {
  static char buf[8][256];
  static int k;
  k = (k + 1) % 8;
  snprintf(buf[k], sizeof buf[k], "%s/%s", tmpdir, name);
  return buf[k];
}

/* A check that lists itself: "ok  what" or "FAIL what" on stdout, a line
 * each (the GPU tests' listing, which tests/gpu/run filters for FAIL), the
 * failures counted in *failed. */
static inline void check_line(int *failed, int ok, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static inline void check_line(int *failed, int ok, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  printf("%s ", ok ? "ok  " : "FAIL");
  vprintf(fmt, ap);
  printf("\n");
  va_end(ap);
  fflush(stdout);
  if (!ok) ++*failed;
}

static inline double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

#endif
