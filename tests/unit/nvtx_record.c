/* nvtx_record.c — an NVTX tool for tests: loaded through
 * NVTX_INJECTION64_PATH as Nsight Systems' is, it takes nvtxRangePushA and
 * nvtxRangePop and writes each, with the calling thread, as a line of the
 * file MT_NVTX_RECORD names ("TID push NAME", "TID pop"). What a profiler
 * would draw, read back by test_nvtx_ranges.py. */
#include <nvtx3/nvToolsExt.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

static FILE *out;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;

static int record_push(const char *name) {
  pthread_mutex_lock(&mu);
  fprintf(out, "%ld push %s\n", (long)syscall(SYS_gettid), name);
  fflush(out);
  pthread_mutex_unlock(&mu);
  return 0;
}

static int record_pop(void) {
  pthread_mutex_lock(&mu);
  fprintf(out, "%ld pop\n", (long)syscall(SYS_gettid));
  fflush(out);
  pthread_mutex_unlock(&mu);
  return 0;
}

/* NVTX's entry point for a tool: point the core module's push and pop at
 * ours. Nonzero: loaded. */
int InitializeInjectionNvtx2(NvtxGetExportTableFunc_t get_table) {
  const char *path = getenv("MT_NVTX_RECORD");
  const NvtxExportTableCallbacks *cb = get_table(NVTX_ETID_CALLBACKS);
  NvtxFunctionTable table = NULL;
  unsigned int size = 0;
  if (!path || !cb || !cb->GetModuleFunctionTable(NVTX_CB_MODULE_CORE, &table, &size) ||
      size <= NVTX_CBID_CORE_RangePop || !(out = fopen(path, "w")))
    return 0;
  *table[NVTX_CBID_CORE_RangePushA] = (NvtxFunctionPointer)record_push;
  *table[NVTX_CBID_CORE_RangePop] = (NvtxFunctionPointer)record_pop;
  return 1;
}
