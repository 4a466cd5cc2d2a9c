/* test_loss_scale.c — daemon/engine/loss_scale against traces of Megatron's
 * DynamicGradScaler written out by hand from its update():
 *
 *   if found_inf: growth_tracker = 0; hysteresis_tracker -= 1
 *                 if hysteresis_tracker <= 0: scale = max(scale * backoff, min)
 *   else:         growth_tracker += 1
 *                 if growth_tracker == interval: growth_tracker = 0
 *                     hysteresis_tracker = hysteresis; scale *= growth
 *
 * and the optimizer skips every step with found_inf.
 */
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "err.h"
#include "loss_scale.h"
#include "mt_check.h"

typedef struct {
  int inf;     /* this step's verdict */
  float scale; /* scale after the update */
  int skip;    /* the update's answer */
  int growth;  /* growth tracker after */
  int hyst;    /* hysteresis tracker after */
} step;

static void run_trace(const char *name, const mt_loss_scale_opts *o, const step *t, int n) {
  mt_loss_scale s;
  CHECK(mt_loss_scale_init(&s, o) == 0, "%s: init: %s", name, mt_errmsg());
  int64_t skipped = 0;
  for (int i = 0; i < n; i++) {
    int skip = mt_loss_scale_update(&s, t[i].inf);
    skipped += t[i].skip;
    CHECK(skip == t[i].skip && s.scale == t[i].scale && s.growth_tracker == t[i].growth &&
              s.hysteresis_tracker == t[i].hyst,
          "%s step %d (%s): skip %d scale %g growth %d hysteresis %d; want %d %g %d %d", name,
          i + 1, t[i].inf ? "inf" : "clean", skip, s.scale, s.growth_tracker, s.hysteresis_tracker,
          t[i].skip, t[i].scale, t[i].growth, t[i].hyst);
  }
  CHECK(s.steps == n && s.skipped == skipped, "%s: steps %lld skipped %lld, want %d %lld", name,
        (long long)s.steps, (long long)s.skipped, n, (long long)skipped);
}

/* interval 3, hysteresis 2: the first overflow only uses up hysteresis; with
 * none left every overflow halves; three clean steps grow and restore the
 * hysteresis, so the next overflow is tolerated again. */
static void test_hysteresis_consumes_overflows_before_backoff(void) {
  mt_loss_scale_opts o = {1024.0f, 1.0f, 2.0f, 0.5f, 3, 2, 0};
  static const step t[] = {
      {0, 1024, 0, 1, 2}, {1, 1024, 1, 0, 1},                    /* tolerated */
      {0, 1024, 0, 1, 1}, {0, 1024, 0, 2, 1}, {1, 512, 1, 0, 0}, /* hysteresis used up */
      {1, 256, 1, 0, -1},                                        /* and stays used up */
      {0, 256, 0, 1, -1}, {0, 256, 0, 2, -1}, {0, 512, 0, 0, 2}, /* growth restores it */
      {1, 512, 1, 0, 1},  {1, 256, 1, 0, 0},  {0, 256, 0, 1, 0},
      {0, 256, 0, 2, 0},  {0, 512, 0, 0, 2},  {0, 512, 0, 1, 2},
  };
  run_trace(__func__, &o, t, (int)(sizeof t / sizeof t[0]));
}

/* An overflow in the middle of a clean run restarts the count to growth. */
static void test_growth_needs_interval_clean_steps_in_a_row(void) {
  mt_loss_scale_opts o = {8.0f, 1.0f, 2.0f, 0.5f, 3, 2, 0};
  static const step t[] = {
      {0, 8, 0, 1, 2}, {0, 8, 0, 2, 2},  {1, 8, 1, 0, 1},  {0, 8, 0, 1, 1},
      {0, 8, 0, 2, 1}, {0, 16, 0, 0, 2}, {0, 16, 0, 1, 2},
  };
  run_trace(__func__, &o, t, (int)(sizeof t / sizeof t[0]));
}

/* A static scale (Megatron's --loss-scale, its ConstantGradScaler): an
 * overflow skips the step and the scale stays; clean steps past the growth
 * interval grow nothing, and the trackers never move. */
static void test_a_fixed_scale_skips_overflows_and_never_moves(void) {
  mt_loss_scale_opts o = {1024.0f, 1.0f, 2.0f, 0.5f, 2, 1, 1};
  static const step t[] = {
      {1, 1024, 1, 0, 1}, {1, 1024, 1, 0, 1}, {0, 1024, 0, 0, 1},
      {0, 1024, 0, 0, 1}, {0, 1024, 0, 0, 1}, {1, 1024, 1, 0, 1},
  };
  run_trace(__func__, &o, t, (int)(sizeof t / sizeof t[0]));
}

/* Backoff stops at min; growth starts again from there. */
static void test_backoff_stops_at_min(void) {
  mt_loss_scale_opts o = {4.0f, 1.0f, 2.0f, 0.5f, 2, 1, 0};
  static const step t[] = {
      {1, 2, 1, 0, 0}, {1, 1, 1, 0, -1}, {1, 1, 1, 0, -2}, {0, 1, 0, 1, -2}, {0, 2, 0, 0, 1},
  };
  run_trace(__func__, &o, t, (int)(sizeof t / sizeof t[0]));
}

/* A burst of overflows at the default settings (2^16, interval 1000,
 * hysteresis 2): the first is tolerated, the next four halve to 2^12; then
 * 1000 clean steps double once, the next 1000 again. */
static void test_overflow_burst_then_recovery(void) {
  mt_loss_scale s;
  CHECK(mt_loss_scale_init(&s, NULL) == 0, "init: %s", mt_errmsg());
  for (int i = 0; i < 5; i++) CHECK(mt_loss_scale_update(&s, 1) == 1, "overflow %d not skipped", i);
  CHECK(s.scale == 4096.0f, "after 5 overflows: scale %g, want 4096", s.scale);
  CHECK(s.skipped == 5 && s.skipped_in_row == 5, "skipped %lld in a row %lld", (long long)s.skipped,
        (long long)s.skipped_in_row);
  for (int i = 0; i < 999; i++) CHECK(mt_loss_scale_update(&s, 0) == 0, "clean step %d skipped", i);
  CHECK(s.scale == 4096.0f && s.skipped_in_row == 0, "999 clean steps: scale %g", s.scale);
  mt_loss_scale_update(&s, 0);
  CHECK(s.scale == 8192.0f && s.hysteresis_tracker == 2, "1000 clean steps: scale %g hyst %d",
        s.scale, s.hysteresis_tracker);
  CHECK(mt_loss_scale_update(&s, 1) == 1 && s.scale == 8192.0f, "a tolerated overflow: %g",
        s.scale);
  for (int i = 0; i < 1000; i++) mt_loss_scale_update(&s, 0);
  CHECK(s.scale == 16384.0f && s.skipped == 6 && s.steps == 2006,
        "recovered: scale %g skipped %lld", s.scale, (long long)s.skipped);
}

static void test_defaults_are_megatrons_with_initial_2_16(void) {
  mt_loss_scale_opts d = mt_loss_scale_defaults();
  CHECK(d.initial == 65536.0f && d.min == 1.0f && d.growth_factor == 2.0f &&
            d.backoff_factor == 0.5f && d.growth_interval == 1000 && d.hysteresis == 2,
        "defaults %g %g %g %g %d %d", d.initial, d.min, d.growth_factor, d.backoff_factor,
        d.growth_interval, d.hysteresis);
}

static void test_bad_options_are_refused_by_name(void) {
  static const struct {
    mt_loss_scale_opts o;
    const char *word;
  } bad[] = {
      {{0.0f, 1.0f, 2.0f, 0.5f, 1000, 2, 0}, "initial"},
      {{INFINITY, 1.0f, 2.0f, 0.5f, 1000, 2, 0}, "initial"},
      {{4.0f, 8.0f, 2.0f, 0.5f, 1000, 2, 0}, "min"},
      {{4.0f, 1.0f, 1.0f, 0.5f, 1000, 2, 0}, "growth_factor"},
      {{4.0f, 1.0f, 2.0f, 1.0f, 1000, 2, 0}, "backoff_factor"},
      {{4.0f, 1.0f, 2.0f, NAN, 1000, 2, 0}, "backoff_factor"},
      {{4.0f, 1.0f, 2.0f, 0.5f, 0, 2, 0}, "growth_interval"},
      {{4.0f, 1.0f, 2.0f, 0.5f, 1000, 0, 0}, "hysteresis"},
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    mt_loss_scale s;
    int rc = mt_loss_scale_init(&s, &bad[i].o);
    CHECK(rc == MT_EINVAL && strstr(mt_errmsg(), bad[i].word), "case %zu: rc %d \"%s\" (want %s)",
          i, rc, mt_errmsg(), bad[i].word);
  }
}

static void test_check_finite_finds_inf_and_nan_anywhere(void) {
  enum { N = 1003 }; /* not a multiple of any vector width: the tail counts too */
  static float g[N];
  for (int i = 0; i < N; i++) g[i] = (float)(i - 500) * 1e-3f;
  g[7] = FLT_MAX;
  g[8] = -FLT_MAX;
  g[9] = 1e-45f; /* subnormal: finite */
  CHECK(mt_loss_scale_check_finite(g, N), "finite values reported non-finite");
  CHECK(mt_loss_scale_check_finite(g, 0), "empty input reported non-finite");
  const float bad[] = {INFINITY, -INFINITY, NAN, -NAN};
  const int at[] = {0, 1, 511, N - 1};
  for (int k = 0; k < 4; k++) {
    for (int j = 0; j < 4; j++) {
      float keep = g[at[j]];
      g[at[j]] = bad[k];
      CHECK(!mt_loss_scale_check_finite(g, N), "%g at %d not found", bad[k], at[j]);
      g[at[j]] = keep;
    }
  }
}

int main(void) {
  test_hysteresis_consumes_overflows_before_backoff();
  test_growth_needs_interval_clean_steps_in_a_row();
  test_backoff_stops_at_min();
  test_a_fixed_scale_skips_overflows_and_never_moves();
  test_overflow_burst_then_recovery();
  test_defaults_are_megatrons_with_initial_2_16();
  test_bad_options_are_refused_by_name();
  test_check_finite_finds_inf_and_nan_anywhere();
  printf("test_loss_scale: %s\n", failures ? "FAILED" : "ok");
  return failures ? 1 : 0;
}
