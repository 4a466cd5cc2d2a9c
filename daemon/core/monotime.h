/* monotime.h — the one clock deadlines and durations are measured with.
 *
 * CLOCK_MONOTONIC: never the wall clock, which a time step (NTP, an
 * operator) would move under a deadline or a step's timing. The readings
 * mean nothing across processes or reboots; only differences do.
 */
#ifndef MT_MONOTIME_H
#define MT_MONOTIME_H

#include <pthread.h>
#include <stdint.h>
#include <time.h>

/* Nanoseconds since an unspecified start. */
static inline int64_t mt_mono_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static inline int64_t mt_mono_us(void) { return mt_mono_ns() / 1000; }
static inline int64_t mt_mono_ms(void) { return mt_mono_ns() / 1000000; }
/* Seconds, to the nanosecond for a century of uptime. */
static inline double mt_mono_s(void) { return (double)mt_mono_ns() * 1e-9; }

/* A condition variable whose timed waits count on this clock: a wall-clock
 * step back would otherwise stretch a wait by the step. */
static inline int mt_mono_cond_init(pthread_cond_t *cv) {
  pthread_condattr_t ca;
  int rc = pthread_condattr_init(&ca);
  if (!rc) rc = pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  if (!rc) rc = pthread_cond_init(cv, &ca);
  pthread_condattr_destroy(&ca);
  return rc;
}

/* The moment ms from now, for pthread_cond_timedwait on such a condition. */
static inline struct timespec mt_mono_deadline(int64_t ms) {
  int64_t ns = mt_mono_ns() + ms * 1000000;
  struct timespec ts = {.tv_sec = (time_t)(ns / 1000000000), .tv_nsec = (long)(ns % 1000000000)};
  return ts;
}

#endif
