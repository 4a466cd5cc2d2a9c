/* device.h — one compute device: its memory and its backend's op table.
 *
 * A device is "cpu:N" (a virtual CPU device; N only names it) or "cuda:N".
 * Everything above kernels/ reaches compute through d->ops, never by calling a
 * backend directly, so the model and engine run unchanged on either backend.
 * This module knows nothing of parallelism and never exits: failures return a
 * negative MT_E* code with mt_errmsg() set.
 */
#ifndef MT_DEVICE_H
#define MT_DEVICE_H

#include <stddef.h>
#include <stdint.h>

typedef struct mt_ops mt_ops;

typedef enum { MT_DEVICE_CPU = 0, MT_DEVICE_CUDA = 1 } mt_device_kind;

typedef struct mt_device {
  mt_device_kind kind;
  int index;          /* N of cpu:N / cuda:N */
  int threads;        /* CPU: threads its ops use */
  const mt_ops *ops;  /* the backend's op table */
  char name[32];      /* "cpu:0" */
  void *impl;         /* backend state (streams, handles) */
} mt_device;

/* Opens "cpu:N" or "cuda:N". cuda is refused with a clear message when this
 * build or machine has no GPU. */
int mt_device_open(mt_device *d, const char *spec);
void mt_device_close(mt_device *d);

/* Device memory: 64-byte aligned and zeroed. NULL with mt_errmsg() on failure. */
void *mt_device_alloc(mt_device *d, size_t bytes);
void mt_device_free(mt_device *d, void *p);
int mt_device_memcpy_htod(mt_device *d, void *dst, const void *src, size_t bytes);
int mt_device_memcpy_dtoh(mt_device *d, void *dst, const void *src, size_t bytes);
int mt_device_memcpy_dtod(mt_device *d, void *dst, const void *src, size_t bytes);
int mt_device_memset0(mt_device *d, void *p, size_t bytes);
int mt_device_sync(mt_device *d);

/* Number of CUDA devices usable here (0 without a GPU or driver). */
int mt_cuda_device_count(void);

#endif
