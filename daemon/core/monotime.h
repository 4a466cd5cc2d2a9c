/* monotime.h — the one clock deadlines and durations are measured with.
 *
 * CLOCK_MONOTONIC: never the wall clock, which a time step (NTP, an
 * operator) would move under a deadline or a step's timing. The readings
 * mean nothing across processes or reboots; only differences do.
 */
#ifndef MT_MONOTIME_H
#define MT_MONOTIME_H

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

#endif
