/* test_nccl_gpu — the comm layer's NCCL backend (daemon/comm/nccl.c) against
 * the real libnccl, on one GPU: groups of one rank (NCCL refuses two ranks
 * on one device), every check through mt_comm (nccl_one_rank.c). Needs a
 * GPU: tests/gpu/run runs it (about a second); CI runs the same checks on
 * the emulator (test_nccl_emu).
 *
 * Usage: test_nccl_gpu [cuda:N]. One line per check; then a RESULT line
 * with the NCCL version loaded and a summary, last. Exits 1 if any check
 * failed or the device would not open. */
#include "device.h"
#include "err.h"
#include "nccl_one_rank.h"
#include "store.h"

#include <nccl.h>
#include <stdio.h>
#include <time.h>

int main(int argc, char **argv) {
  const char *spec = argc > 1 ? argv[1] : "cuda:0";
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  /* the library loaded, which may not be the headers' */
  int v = 0;
  char version[32];
  if (ncclGetVersion(&v) == ncclSuccess)
    snprintf(version, sizeof version, "%d.%d.%d", v / 10000, v / 100 % 100, v % 100);
  else
    snprintf(version, sizeof version, "?");
  printf("RESULT nccl_version %s\n", version);
  printf("test_nccl_gpu: NCCL %s (built with %d.%d.%d headers) on %s\n", version, NCCL_MAJOR,
         NCCL_MINOR, NCCL_PATCH, spec);
  mt_device d;
  if (mt_device_open(&d, spec)) {
    printf("FAIL open %s: %s\ntest_nccl_gpu: FAILED, no device\n", spec, mt_errmsg());
    return 1;
  }
  mt_store *store = NULL;
  if (mt_store_mem_new(&store)) {
    printf("FAIL store: %s\ntest_nccl_gpu: FAILED, no store\n", mt_errmsg());
    mt_device_close(&d);
    return 1;
  }
  int failed = nccl_one_rank_checks(&d, store, "test/nccl_gpu");
  int rc = mt_device_sync(&d);
  if (rc) printf("FAIL device sync after the checks: %s\n", mt_errmsg()), failed++;
  mt_store_free(store);
  mt_device_close(&d);
  clock_gettime(CLOCK_MONOTONIC, &t1);
  double s = (double)(t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) * 1e-9;
  printf("test_nccl_gpu: %s, %d check(s) failed, NCCL %s, %.2f s\n", failed ? "FAILED" : "ok",
         failed, version, s);
  return failed ? 1 : 0;
}
