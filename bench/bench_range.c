/* bench_range — what the engine's NVTX ranges (daemon/core/range.h) cost a
 * step with no profiler attached: a push of a formatted name ("layer %d")
 * and its pop, timed over many pairs, beside the peer, the same name
 * formatted into a buffer alone (what a range costs at the least); then the
 * ranges a step of etc/jobs/gpt3-1.3b-bench.json pushes on a rank (the
 * step, its 8 phases, each micro-batch's forward and backward and each of
 * those's 24 layers) against that step's time on the H200 (1259 ms,
 * bench/RESULTS.md's first GPU run).
 *
 *   bench_range [--iters N]
 * With NVTX_INJECTION64_PATH set to a tool (tests/unit's
 * libmtnlg_nvtx_record.so and MT_NVTX_RECORD=/dev/null), the cost of a
 * range a profiler takes. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "range.h"

static double now_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
  long iters = 2000000;
  for (int i = 1; i + 1 < argc; i += 2)
    if (!strcmp(argv[i], "--iters")) iters = atol(argv[i + 1]);
  printf("NVTX ranges in this build: %s; a tool: %s\n", mt_range_enabled() ? "yes" : "no",
         getenv("NVTX_INJECTION64_PATH") ? getenv("NVTX_INJECTION64_PATH") : "none");
  double best_range = 1e30, best_fmt = 1e30;
  volatile size_t sink = 0;
  for (int rep = 0; rep < 3; rep++) {
    double t0 = now_s();
    for (long i = 0; i < iters; i++) {
      mt_range_push("layer %d", (int)(i & 127));
      mt_range_pop();
    }
    double t1 = now_s();
    char name[128];
    for (long i = 0; i < iters; i++)
      sink += (size_t)snprintf(name, sizeof name, "layer %d", (int)(i & 127));
    double t2 = now_s();
    best_range = t1 - t0 < best_range ? t1 - t0 : best_range;
    best_fmt = t2 - t1 < best_fmt ? t2 - t1 : best_fmt;
  }
  double ns = best_range / iters * 1e9, fmt_ns = best_fmt / iters * 1e9;
  printf("push(\"layer %%d\") + pop: %.1f ns (best of 3 x %ld); the name formatted alone: %.1f ns; "
         "ratio %.2f\n",
         ns, iters, fmt_ns, ns / fmt_ns);
  /* gpt3-1.3b-bench: 24 layers, 4 micro-batches a step on one GPU */
  int layers = 24, micro = 4, ranges = 1 + 8 + 2 * micro + 2 * micro * layers;
  double step_ms = 1259.4;
  printf("a gpt3-1.3b-bench step: %d ranges, %.1f us of a %.1f ms step (%.5f%%)\n", ranges,
         ranges * ns / 1e3, step_ms, ranges * ns / 1e6 / step_ms * 100.0);
  return sink == 0;
}
