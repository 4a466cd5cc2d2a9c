/* test_timer_laps.c — daemon/model/timers.c: names, levels, and where a lap's
 * time goes. The time a lap takes is made by a sleep of 3 ms, so each check
 * is on where the time went (at least the sleep there, nothing elsewhere),
 * never on how long anything took. */
#include <math.h>
#include <string.h>
#include <time.h>

#include "monotime.h"
#include "mt_check.h"
#include "timers.h"

static void sleep_ms(int ms) {
  struct timespec t = {0, ms * 1000000L};
  while (nanosleep(&t, &t)) {
  }
}

/* The one timer that received time since ms was zeroed; -1 for none, -2
 * for more than one. */
static int only_timer(const mt_timers *t) {
  int which = -1;
  for (int i = 0; i < MT_TM_COUNT; i++)
    if (t->ms[i] != 0.0) which = which == -1 ? i : -2;
  return which;
}

static void test_names_are_unique_and_found_again(void) {
  for (int i = 0; i < MT_TM_COUNT; i++) {
    const char *n = mt_timer_name(i);
    CHECK(n && n[0] && strcmp(n, "?") && mt_timer_find(n) == i, "timer %d: name %s, found as %d", i,
          n ? n : "(null)", n ? mt_timer_find(n) : -9);
  }
  CHECK(mt_timer_find("forward-backward") == MT_TM_FORWARD_BACKWARD, "forward-backward");
  CHECK(mt_timer_find("nope") == -1 && mt_timer_find(NULL) == -1, "unknown names");
  CHECK(!strcmp(mt_timer_name(-1), "?") && !strcmp(mt_timer_name(MT_TM_COUNT), "?"),
        "past the ids");
}

static void test_phases_are_level_1_and_pieces_level_2(void) {
  for (int i = 0; i < MT_TM_COUNT; i++) {
    const char *n = mt_timer_name(i);
    int piece = (!strncmp(n, "forward-", 8) && strcmp(n, "forward-backward")) ||
                !strncmp(n, "backward-", 9);
    CHECK(mt_timer_level(i) == (piece ? 2 : 1), "%s: level %d", n, mt_timer_level(i));
  }
}

/* A lap goes to its timer in the forward; in the backward a forward
 * piece's id goes to the backward's timer of that piece, a backward id to
 * itself; while recomputing, every lap to backward-recompute. */
static void test_a_lap_goes_where_its_pass_says(void) {
  static const struct {
    int backward, recompute, id, want;
  } cases[] = {
      {0, 0, MT_TM_FWD_LINEAR, MT_TM_FWD_LINEAR},
      {1, 0, MT_TM_FWD_LINEAR, MT_TM_BWD_LINEAR},
      {1, 0, MT_TM_FWD_LAYERNORM, MT_TM_BWD_LAYERNORM},
      {1, 0, MT_TM_FWD_ELEMENTWISE, MT_TM_BWD_ELEMENTWISE},
      {1, 0, MT_TM_FWD_TP_COMM, MT_TM_BWD_TP_COMM},
      {1, 0, MT_TM_FWD_EMBEDDING, MT_TM_BWD_EMBEDDING},
      {1, 0, MT_TM_FWD_HEAD, MT_TM_BWD_HEAD},
      {1, 0, MT_TM_FWD_LOSS, MT_TM_BWD_LOSS},
      {1, 0, MT_TM_FWD_ATTENTION, MT_TM_BWD_ATTENTION},
      {1, 0, MT_TM_BWD_DP_COMM, MT_TM_BWD_DP_COMM},
      {0, 0, MT_TM_BWD_ATTENTION, MT_TM_BWD_ATTENTION},
      {1, 1, MT_TM_FWD_ATTENTION, MT_TM_BWD_RECOMPUTE},
      {0, 1, MT_TM_FWD_TP_COMM, MT_TM_BWD_RECOMPUTE},
  };
  for (size_t k = 0; k < sizeof cases / sizeof *cases; k++) {
    mt_timers t = {.level = 2, .backward = cases[k].backward, .recompute = cases[k].recompute};
    mt_timers_mark(&t);
    sleep_ms(3);
    mt_timers_lap(&t, cases[k].id);
    CHECK(only_timer(&t) == cases[k].want && t.ms[cases[k].want] >= 2.9,
          "case %zu: %s (backward %d, recompute %d) went to %d (want %s), %.3f ms", k,
          mt_timer_name(cases[k].id), cases[k].backward, cases[k].recompute, only_timer(&t),
          mt_timer_name(cases[k].want), t.ms[cases[k].want]);
  }
}

/* Consecutive laps partition the time from the mark: none is counted
 * twice, and a mark starts afresh (what came before it goes nowhere). */
static void test_laps_partition_the_time_from_the_mark(void) {
  mt_timers t = {.level = 2};
  sleep_ms(3); /* before the mark: nowhere */
  mt_timers_mark(&t);
  double marked = t.mark;
  sleep_ms(3);
  mt_timers_lap(&t, MT_TM_FWD_LINEAR);
  double a = t.ms[MT_TM_FWD_LINEAR];
  sleep_ms(3);
  mt_timers_lap(&t, MT_TM_FWD_ATTENTION);
  mt_timers_lap(&t, MT_TM_FWD_LINEAR); /* at once */
  double total = 0, now = 1e3 * mt_mono_s();
  for (int i = 0; i < MT_TM_COUNT; i++) total += t.ms[i];
  CHECK(a >= 2.9 && t.ms[MT_TM_FWD_ATTENTION] >= 2.9, "laps %.3f and %.3f ms", a,
        t.ms[MT_TM_FWD_ATTENTION]);
  /* the laps add up to the time from the mark to the last lap's end, which
   * is before now: the sleep before the mark is not in them */
  CHECK(total <= now - marked + 1e-6 && fabs(total - (t.mark - marked)) < 1e-6,
        "laps %.6f ms in all, %.6f from the mark to the last lap, %.6f to now", total,
        t.mark - marked, now - marked);
}

/* Level 1 keeps the phases and no lap; level 0 and NULL nothing at all. */
static void test_levels_keep_only_their_timers(void) {
  mt_timers one = {.level = 1}, zero = {.level = 0};
  double since = mt_timers_now(&one);
  sleep_ms(3);
  mt_timers_add(&one, MT_TM_OPTIMIZER, since);
  mt_timers_mark(&one);
  sleep_ms(1);
  mt_timers_lap(&one, MT_TM_FWD_LINEAR);
  mt_timers_add(&one, MT_TM_FWD_ATTENTION, since); /* a level-2 timer: not kept */
  CHECK(only_timer(&one) == MT_TM_OPTIMIZER && one.ms[MT_TM_OPTIMIZER] >= 2.9,
        "level 1: went to %d, optimizer %.3f ms", only_timer(&one), one.ms[MT_TM_OPTIMIZER]);
  since = mt_timers_now(&zero);
  sleep_ms(1);
  mt_timers_add(&zero, MT_TM_OPTIMIZER, since);
  mt_timers_mark(&zero);
  mt_timers_lap(&zero, MT_TM_FWD_LINEAR);
  CHECK(only_timer(&zero) == -1, "level 0 kept %d", only_timer(&zero));
  mt_timers_add(NULL, MT_TM_OPTIMIZER, since); /* no timers: nothing, and no crash */
  mt_timers_mark(NULL);
  mt_timers_lap(NULL, MT_TM_FWD_LINEAR);
}

int main(void) {
  test_names_are_unique_and_found_again();
  test_phases_are_level_1_and_pieces_level_2();
  test_a_lap_goes_where_its_pass_says();
  test_laps_partition_the_time_from_the_mark();
  test_levels_keep_only_their_timers();
  if (failures) return 1;
  printf("test_timer_laps: all passed\n");
  return 0;
}
