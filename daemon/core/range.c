/* range.c — NVTX ranges (range.h). NVTX3 is header-only: the first call
 * looks for a tool (NVTX_INJECTION64_PATH, which nsys sets) and every
 * later one calls the tool's function or a no-op. */
#include "range.h"

#include <stdarg.h>
#include <stdio.h>

#if MT_HAVE_NVTX
#include <nvtx3/nvToolsExt.h>
#endif

static _Thread_local int depth;

void mt_range_push(const char *fmt, ...) {
  depth++;
#if MT_HAVE_NVTX
  char name[128];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(name, sizeof name, fmt, ap);
  va_end(ap);
  nvtxRangePushA(name);
#else
  (void)fmt;
#endif
}

void mt_range_pop(void) {
  if (depth <= 0) return;
  depth--;
#if MT_HAVE_NVTX
  nvtxRangePop();
#endif
}

void mt_range_init(void) {
#if MT_HAVE_NVTX
  nvtxInitialize(NULL);
#endif
}

int mt_range_depth(void) { return depth; }

void mt_range_pop_to(int d) {
  while (depth > d && depth > 0) mt_range_pop();
}

int mt_range_enabled(void) { return MT_HAVE_NVTX; }
