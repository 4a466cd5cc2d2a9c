/* no_cuda.c — the CUDA backend's entry points (cuda/cuda_backend.h) for a
 * program that never opens a GPU, linked in its place.
 *
 * device.c calls the backend for "cuda:N" specs, so every program that
 * links kernels/ from a CUDA build pulled device_cuda.cu and with it
 * cudart, cuBLAS and cuBLASLt: some 600 MB of libraries that take half a
 * second to load. mtnlgctl (the operator's command line, which reads
 * checkpoints and plans jobs on the host) links this file instead: the
 * linker then takes these definitions and leaves the backend's object, and
 * the libraries, out. A "cuda:N" there counts no GPU and says why. A symbol
 * device.c calls that is missing here makes the linker pull the backend
 * and fail on the duplicates, so the two cannot drift apart unnoticed. */
#include "cuda/cuda_backend.h"

#include <stdio.h>

#include "err.h"

static int absent(void) {
  return mt_seterr(MT_ENOTSUP, "this program carries no CUDA backend (mtnlgd does)");
}

int mt__cuda_count(char *why, size_t why_len) {
  if (why_len) snprintf(why, why_len, "this program carries no CUDA backend (mtnlgd does)");
  return 0;
}

int mt__cuda_memory(int index, size_t *total, size_t *free_bytes) {
  (void)index, (void)total, (void)free_bytes;
  return absent();
}

int mt__cuda_lost(int index, char *why, size_t why_len) {
  (void)index;
  if (why_len) why[0] = '\0';
  return 0;
}

int mt__cuda_open(mt_device *d, int index) {
  (void)d, (void)index;
  return absent();
}

void mt__cuda_close(mt_device *d) { (void)d; }

void *mt__cuda_alloc(mt_device *d, size_t bytes) {
  (void)d, (void)bytes;
  absent();
  return NULL;
}

void mt__cuda_free(mt_device *d, void *p) { (void)d, (void)p; }

int mt__cuda_memcpy(mt_device *d, void *dst, const void *src, size_t bytes, mt__cuda_copy kind) {
  (void)d, (void)dst, (void)src, (void)bytes, (void)kind;
  return absent();
}

int mt__cuda_memset0(mt_device *d, void *p, size_t bytes) {
  (void)d, (void)p, (void)bytes;
  return absent();
}

int mt__cuda_sync(mt_device *d) {
  (void)d;
  return absent();
}
