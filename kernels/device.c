#include "device.h"

#include <errno.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/blas.h"
#include "cpu/threads.h"
#include "err.h"
#include "mt_config.h"
#include "ops.h"

#if MT_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

int mt_cuda_device_count(void) {
#if MT_HAVE_CUDA
  int n = 0; /* stays 0 when there is no driver (cudaErrorInsufficientDriver) */
  if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
  return n;
#else
  return 0;
#endif
}

int mt_device_open(mt_device *d, const char *spec) {
  memset(d, 0, sizeof *d);
  const char *colon = strchr(spec, ':');
  char *end = NULL;
  long idx = 0;
  if (colon) {
    errno = 0;
    idx = strtol(colon + 1, &end, 10);
    if (errno || end == colon + 1 || *end || idx < 0 || idx > 4095)
      return mt_seterr(MT_EINVAL, "device: bad index in \"%s\" (want cpu:N or cuda:N)", spec);
  }
  size_t kind_len = colon ? (size_t)(colon - spec) : strlen(spec);
  if (kind_len == 3 && !strncmp(spec, "cpu", 3)) {
    int rc = mt_blas_load();
    if (rc) return rc;
    d->kind = MT_DEVICE_CPU;
    d->index = (int)idx;
    d->threads = omp_get_max_threads();
    d->ops = &mt_cpu_ops;
    (void)mt_omp_wait_policy(); /* links the preinit hook into every program */
  } else if (kind_len == 4 && !strncmp(spec, "cuda", 4)) {
    int n = mt_cuda_device_count();
    if (!MT_HAVE_CUDA)
      return mt_seterr(MT_ENOTSUP,
                       "device: %s requested but this build has no CUDA backend "
                       "(rebuild with -Dcuda=enabled)",
                       spec);
    if (idx >= n)
      return mt_seterr(MT_ENOTSUP, "device: %s requested but %d CUDA device(s) are usable here",
                       spec, n);
    return mt_seterr(MT_ENOTSUP, "device: %s: the CUDA backend is not built yet", spec);
  } else {
    return mt_seterr(MT_EINVAL, "device: unknown kind in \"%s\" (want cpu:N or cuda:N)", spec);
  }
  snprintf(d->name, sizeof d->name, "%s:%d", d->kind == MT_DEVICE_CPU ? "cpu" : "cuda", d->index);
  return 0;
}

void mt_device_close(mt_device *d) { memset(d, 0, sizeof *d); }

void *mt_device_alloc(mt_device *d, size_t bytes) {
  (void)d;
  size_t rounded = (bytes + 63) & ~(size_t)63;
  void *p = aligned_alloc(64, rounded ? rounded : 64);
  if (!p) {
    mt_seterr(MT_ENOMEM, "device %s: cannot allocate %zu bytes", d->name, bytes);
    return NULL;
  }
  memset(p, 0, rounded);
  return p;
}

void mt_device_free(mt_device *d, void *p) {
  (void)d;
  free(p);
}

int mt_device_memcpy_htod(mt_device *d, void *dst, const void *src, size_t bytes) {
  (void)d;
  memcpy(dst, src, bytes);
  return 0;
}

int mt_device_memcpy_dtoh(mt_device *d, void *dst, const void *src, size_t bytes) {
  (void)d;
  memcpy(dst, src, bytes);
  return 0;
}

int mt_device_memcpy_dtod(mt_device *d, void *dst, const void *src, size_t bytes) {
  (void)d;
  memcpy(dst, src, bytes);
  return 0;
}

int mt_device_memset0(mt_device *d, void *p, size_t bytes) {
  (void)d;
  memset(p, 0, bytes);
  return 0;
}

int mt_device_sync(mt_device *d) {
  (void)d;
  return 0;
}
