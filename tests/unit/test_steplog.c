/* test_steplog.c — a long validation or test pass in the log
 * (mt_evallog_progress, daemon/steplog.c): a line every period of the pass
 * with the batches done, the time so far and the time left at its pace,
 * one line for a stall however many periods it spans, a closing line with
 * the pass's time only after a pass that logged, nothing for a pass
 * shorter than a period, and the pass named as mtnlgctl status names it.
 * The clock is given, so no test waits. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "log.h"
#include "steplog.h"

#include "mt_check.h"
#include "stderr_capture.h"

/* A pass's reports (the engine's on_eval: done 0, then after each batch)
 * at the times given (ms; at[0] the start), as mt_log writes them to stderr ("" if that cannot be
 * read). */
static char *pass_log(mt_evallog *e, mt_eval_progress p, const int64_t *at, int reports,
                      int64_t every_ms) {
  static char buf[16384];
  stderr_capture c;
  buf[0] = 0;
  if (stderr_capture_begin(&c)) {
    CHECK(0, "stderr to a temporary file");
    return buf;
  }
  for (int k = 0; k < reports; k++) {
    p.done = k;
    mt_evallog_progress(e, &p, at[k], every_ms);
  }
  return stderr_capture_end(&c, buf, sizeof buf);
}

static int count_lines(const char *s) {
  int n = 0;
  for (; *s; s++) n += *s == '\n';
  return n;
}

/* 10 batches of 400 ms against a 1 s period: lines after batches 3 (1.2 s),
 * 5 (2.0 s) and 8 (3.2 s), each with the rest at its pace, then the end. */
static void test_a_long_pass_logs_each_period_and_its_end(void) {
  mt_evallog e = {0};
  mt_eval_progress p = {.split = MT_SPLIT_VALID, .step = 80, .total = 10};
  int64_t at[11];
  for (int k = 0; k <= 10; k++) at[k] = 5000 + 400 * k;
  char *log = pass_log(&e, p, at, 11, 1000);
  CHECK(count_lines(log) == 4, "4 lines, got:\n%s", log);
  CHECK(strstr(log, "validation after step 80: batch 3 of 10, 1.2 s so far, about 2.8 s left"),
        "the first period's line, got:\n%s", log);
  CHECK(strstr(log, "validation after step 80: batch 5 of 10, 2.0 s so far, about 2.0 s left"),
        "the second's, got:\n%s", log);
  CHECK(strstr(log, "validation after step 80: batch 8 of 10, 3.2 s so far, about 0.8 s left"),
        "the third's, got:\n%s", log);
  CHECK(strstr(log, "validation after step 80: 10 batches in 4.0 s (0.400 s a batch)"),
        "the end's, got:\n%s", log);
  printf("  ok test_a_long_pass_logs_each_period_and_its_end\n");
}

/* A pass shorter than a period logs nothing, its end included, even after
 * a pass that logged and failed before its end. */
static void test_a_short_pass_logs_nothing(void) {
  mt_evallog e = {0};
  mt_eval_progress p = {.split = MT_SPLIT_VALID, .step = 40, .total = 10};
  int64_t at[11];
  for (int k = 0; k <= 10; k++) at[k] = 400 * k;
  char *log = pass_log(&e, p, at, 4, 1000); /* fails after batch 3, which logged */
  CHECK(count_lines(log) == 1, "the failed pass's one line, got:\n%s", log);
  for (int k = 0; k <= 10; k++) at[k] = 20000 + 90 * k;
  log = pass_log(&e, p, at, 11, 1000);
  CHECK(!*log, "nothing from a pass of 0.9 s, got:\n%s", log);
  printf("  ok test_a_short_pass_logs_nothing\n");
}

/* A batch that stalls over several periods gives one line, and the next
 * comes at the next period of the pass (4 s), not once per period missed. */
static void test_a_stall_logs_once(void) {
  mt_evallog e = {0};
  mt_eval_progress p = {.split = MT_SPLIT_VALID, .step = 7, .total = 6};
  int64_t at[] = {0, 100, 3500, 3600, 4400, 4600, 4700};
  char *log = pass_log(&e, p, at, 7, 1000);
  CHECK(count_lines(log) == 3, "3 lines, got:\n%s", log);
  CHECK(strstr(log, "batch 2 of 6, 3.5 s so far"), "the stall's line, got:\n%s", log);
  CHECK(strstr(log, "batch 4 of 6, 4.4 s so far"), "the next period's, got:\n%s", log);
  CHECK(strstr(log, "6 batches in 4.7 s"), "the end's, got:\n%s", log);
  printf("  ok test_a_stall_logs_once\n");
}

/* The end of training's validation and the test pass, in mtnlgctl's words. */
static void test_passes_are_named_as_mtnlgctl_names_them(void) {
  int64_t at[] = {0, 2000, 4000};
  mt_evallog e = {0};
  mt_eval_progress p = {.split = MT_SPLIT_VALID, .end_of_training = 1, .step = 81, .total = 2};
  char *log = pass_log(&e, p, at, 3, 1000);
  CHECK(strstr(log, "validation at the end of training after step 81: batch 1 of 2, 2.0 s"),
        "the end's validation, got:\n%s", log);
  p.split = MT_SPLIT_TEST;
  log = pass_log(&e, p, at, 3, 1000);
  CHECK(strstr(log, "the test pass after step 81: batch 1 of 2, 2.0 s") &&
            strstr(log, "the test pass after step 81: 2 batches in 4.0 s"),
        "the test pass, got:\n%s", log);
  printf("  ok test_passes_are_named_as_mtnlgctl_names_them\n");
}

int main(void) {
  mt_log_set_level(MT_LOG_INFO);
  test_a_long_pass_logs_each_period_and_its_end();
  test_a_short_pass_logs_nothing();
  test_a_stall_logs_once();
  test_passes_are_named_as_mtnlgctl_names_them();
  if (failures) fprintf(stderr, "test_steplog: %d failure(s)\n", failures);
  return failures != 0;
}
