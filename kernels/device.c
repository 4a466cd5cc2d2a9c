#include "device.h"

#include <errno.h>
#include <omp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cpu/blas.h"
#include "cpu/threads.h"
#include "err.h"
#include "log.h"
#include "mt_config.h"
#include "ops.h"

/* MT_CUDA_EMU: the test build that runs kernels/cuda on the CPU emulator
 * (tests/gpu/emu) compiles this file with the CUDA paths on. */
#if MT_HAVE_CUDA || defined(MT_CUDA_EMU)
#define WITH_CUDA 1
#include "cuda/cuda_backend.h"
#else
#define WITH_CUDA 0
#endif

/* GPUs here, and why there are none (the runtime's error) in why. */
static int cuda_count(char *why, size_t len) {
#if WITH_CUDA
  return mt__cuda_count(why, len);
#else
  snprintf(why, len, "this build has no CUDA backend (rebuild with -Dcuda=enabled)");
  return 0;
#endif
}

int mt_device_count(const char *kind) {
  char why[256];
  if (!strcmp(kind, "cuda")) return cuda_count(why, sizeof why);
  if (!strcmp(kind, "cpu")) return 1;
  return mt_seterr(MT_EINVAL, "device: unknown kind \"%s\" (want cpu or cuda)", kind);
}

int mt_cuda_device_count(void) { return mt_device_count("cuda"); }

int mt_device_resolve_auto(char *out, size_t len, int want) {
  char why[256] = "";
  int n = cuda_count(why, sizeof why), w;
  if (n > 0) {
    w = want > 0 && want < n ? want : n;
    if (w == 1)
      w = snprintf(out, len, "cuda:0") < (int)len ? 1 : -1;
    else
      w = snprintf(out, len, "cuda:0-%d", w - 1) < (int)len ? w : -1;
  } else {
    w = want > 0 ? want : 1;
    if (snprintf(out, len, "cpu:%d", w) >= (int)len)
      w = -1;
    else
      mt_log_warn("devices auto: no CUDA device (%s); using %s", why[0] ? why : "none found", out);
  }
  if (w < 0)
    return mt_seterr(MT_EINVAL, "devices auto: %zu bytes are too few for the device list", len);
  return w;
}

static int eager_by_us; /* set before any thread starts: no lock */

void mt_device_eager_modules(void) {
  if (getenv("CUDA_MODULE_LOADING")) return; /* the operator's choice */
  if (!setenv("CUDA_MODULE_LOADING", "EAGER", 1)) eager_by_us = 1;
}

const char *mt_device_cuda_loading(void) {
  if (eager_by_us) return "eager (set by mtnlg: its GPU ranks run collectives)";
  const char *v = getenv("CUDA_MODULE_LOADING");
  if (!v) return "CUDA's default (lazy since CUDA 12.2)";
  return !strcmp(v, "EAGER")  ? "eager (CUDA_MODULE_LOADING)"
         : !strcmp(v, "LAZY") ? "lazy (CUDA_MODULE_LOADING)"
                              : "CUDA_MODULE_LOADING's value";
}

/* mt_device_alloc's ledger: each live allocation's size, so a free can
 * take it back off the total (a device makes a few hundred: its arenas and
 * buffers; a free looks its pointer up from the newest). One lock, as the
 * threads of a checkpoint or an export may allocate beside the rank's. */
struct mt_device_ledger {
  pthread_mutex_t mu;
  struct {
    void *p;
    size_t bytes;
  } * e; /* the live allocations */
  size_t n, cap;
  size_t total, peak;
};

static struct mt_device_ledger *ledger_new(void) {
  struct mt_device_ledger *l = calloc(1, sizeof *l);
  if (l) pthread_mutex_init(&l->mu, NULL);
  return l;
}

static void ledger_free(struct mt_device_ledger *l) {
  if (!l) return;
  pthread_mutex_destroy(&l->mu);
  free(l->e);
  free(l);
}

/* Notes p's bytes; a ledger out of memory stops counting that one (the
 * figures are for people, the allocation stands) */
static void ledger_add(struct mt_device_ledger *l, void *p, size_t bytes) {
  if (!l || !p) return;
  pthread_mutex_lock(&l->mu);
  if (l->n == l->cap) {
    size_t cap = l->cap ? 2 * l->cap : 64;
    void *e = realloc(l->e, cap * sizeof *l->e);
    if (e) l->e = e, l->cap = cap;
  }
  if (l->n < l->cap) {
    l->e[l->n].p = p, l->e[l->n++].bytes = bytes;
    l->total += bytes;
    if (l->total > l->peak) l->peak = l->total;
  }
  pthread_mutex_unlock(&l->mu);
}

static void ledger_remove(struct mt_device_ledger *l, void *p) {
  if (!l || !p) return;
  pthread_mutex_lock(&l->mu);
  for (size_t i = l->n; i-- > 0;)
    if (l->e[i].p == p) {
      l->total -= l->e[i].bytes;
      l->e[i] = l->e[--l->n];
      break;
    }
  pthread_mutex_unlock(&l->mu);
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
    mt_blas_cpu_devices(1);
    (void)mt_omp_wait_policy(); /* links the preinit hook into every program */
  } else if (kind_len == 4 && !strncmp(spec, "cuda", 4)) {
    char why[256] = "";
    int n = cuda_count(why, sizeof why);
    if (!WITH_CUDA) return mt_seterr(MT_ENOTSUP, "device: %s requested but %s", spec, why);
    if (n == 0)
      return mt_seterr(MT_ENOTSUP, "device: %s: no CUDA device: cudaGetDeviceCount: %s", spec,
                       why[0] ? why : "0 devices");
    if (idx >= n)
      return mt_seterr(MT_ENOTSUP, "device: %s requested but %d CUDA device%s usable here", spec, n,
                       n == 1 ? " is" : "s are");
#if WITH_CUDA
    static atomic_int said;
    if (!atomic_exchange(&said, 1)) mt_log_info("CUDA modules: %s", mt_device_cuda_loading());
    d->kind = MT_DEVICE_CUDA;
    d->index = (int)idx;
    d->threads = 1;
    snprintf(d->name, sizeof d->name, "cuda:%d", d->index);
    int rc = mt__cuda_open(d, (int)idx);
    if (rc) {
      memset(d, 0, sizeof *d);
      return rc;
    }
#endif
  } else {
    return mt_seterr(MT_EINVAL, "device: unknown kind in \"%s\" (want cpu:N or cuda:N)", spec);
  }
  snprintf(d->name, sizeof d->name, "%s:%d", d->kind == MT_DEVICE_CPU ? "cpu" : "cuda", d->index);
  if (!(d->ledger = ledger_new())) {
    mt_device_close(d);
    return mt_seterr(MT_ENOMEM, "device: %s: out of memory", spec);
  }
  return 0;
}

int mt_device_memory(const char *spec, size_t *total, size_t *free_bytes) {
  *total = *free_bytes = 0;
  if (!strncmp(spec, "cpu", 3)) {
    long pages = sysconf(_SC_PHYS_PAGES), avail = sysconf(_SC_AVPHYS_PAGES),
         page = sysconf(_SC_PAGESIZE);
    *total = pages > 0 && page > 0 ? (size_t)pages * (size_t)page : 0;
    *free_bytes = avail > 0 && page > 0 ? (size_t)avail * (size_t)page : 0;
    return 0;
  }
  const char *colon = strchr(spec, ':');
  char *end = NULL;
  long idx = colon ? strtol(colon + 1, &end, 10) : -1;
  if (strncmp(spec, "cuda:", 5) || !colon || end == colon + 1 || *end || idx < 0)
    return mt_seterr(MT_EINVAL, "device: bad spec \"%s\" (want cpu:N or cuda:N)", spec);
  char why[256] = "";
  int n = cuda_count(why, sizeof why);
  if (idx >= n)
    return mt_seterr(MT_ENOTSUP, "device: %s: %d CUDA device%s usable here%s%s", spec, n,
                     n == 1 ? "" : "s", why[0] ? ": " : "", why);
#if WITH_CUDA
  return mt__cuda_memory((int)idx, total, free_bytes);
#else
  return mt_seterr(MT_ENOTSUP, "device: %s: no CUDA backend", spec);
#endif
}

int mt_device_lost(const char *spec, char *why, size_t why_len) {
  if (why_len) why[0] = '\0';
  char *end = NULL;
  long idx = strncmp(spec, "cuda:", 5) ? -1 : strtol(spec + 5, &end, 10);
  if (idx < 0 || end == spec + 5 || *end) return 0; /* a CPU device, or none */
  char count_why[256] = "";
  if (idx >= cuda_count(count_why, sizeof count_why)) return 0;
#if WITH_CUDA
  return mt__cuda_lost((int)idx, why, why_len);
#else
  return 0;
#endif
}

void mt_device_close(mt_device *d) {
  ledger_free(d->ledger);
  if (d->kind == MT_DEVICE_CPU && d->ops) mt_blas_cpu_devices(-1);
#if WITH_CUDA
  if (d->kind == MT_DEVICE_CUDA && d->impl) mt__cuda_close(d);
#endif
  memset(d, 0, sizeof *d);
}

#if WITH_CUDA
#define IF_CUDA(d, call)                                                                           \
  if ((d)->kind == MT_DEVICE_CUDA) return call
#else
#define IF_CUDA(d, call) (void)(d)
#endif

static void *alloc_on(mt_device *d, size_t bytes) {
  IF_CUDA(d, mt__cuda_alloc(d, bytes));
  if (bytes > SIZE_MAX - 63) { /* rounded up, it would wrap to a tiny buffer */
    mt_seterr(MT_ENOMEM, "device %s: cannot allocate %zu bytes", d->name, bytes);
    return NULL;
  }
  size_t rounded = (bytes + 63) & ~(size_t)63;
  void *p = aligned_alloc(64, rounded ? rounded : 64);
  if (!p) {
    mt_seterr(MT_ENOMEM, "device %s: cannot allocate %zu bytes", d->name, bytes);
    return NULL;
  }
  memset(p, 0, rounded);
  return p;
}

void *mt_device_alloc(mt_device *d, size_t bytes) {
  void *p = alloc_on(d, bytes);
  ledger_add(d->ledger, p, bytes);
  return p;
}

void mt_device_free(mt_device *d, void *p) {
  ledger_remove(d->ledger, p);
  if (d->kind == MT_DEVICE_CUDA) {
#if WITH_CUDA
    mt__cuda_free(d, p);
#endif
    return;
  }
  free(p);
}

int mt_device_mem_stats(mt_device *d, mt_device_mem *m) {
  *m = (mt_device_mem){0};
  struct mt_device_ledger *l = d->ledger;
  if (l) {
    pthread_mutex_lock(&l->mu);
    m->allocated = l->total, m->max_allocated = l->peak, m->count = (int64_t)l->n;
    pthread_mutex_unlock(&l->mu);
  }
  m->reserved = m->allocated;
#if WITH_CUDA
  if (d->kind == MT_DEVICE_CUDA) {
    size_t total = 0, avail = 0;
    int rc = mt__cuda_memory(d->index, &total, &avail);
    if (rc) return rc;
    m->reserved = total - avail;
  }
#endif
  return 0;
}

int mt_device_memcpy_htod(mt_device *d, void *dst, const void *src, size_t bytes) {
  IF_CUDA(d, mt__cuda_memcpy(d, dst, src, bytes, MT__CUDA_HTOD));
  memcpy(dst, src, bytes);
  return 0;
}

int mt_device_memcpy_dtoh(mt_device *d, void *dst, const void *src, size_t bytes) {
  IF_CUDA(d, mt__cuda_memcpy(d, dst, src, bytes, MT__CUDA_DTOH));
  memcpy(dst, src, bytes);
  return 0;
}

int mt_device_memcpy_dtod(mt_device *d, void *dst, const void *src, size_t bytes) {
  IF_CUDA(d, mt__cuda_memcpy(d, dst, src, bytes, MT__CUDA_DTOD));
  memcpy(dst, src, bytes);
  return 0;
}

int mt_device_memset0(mt_device *d, void *p, size_t bytes) {
  IF_CUDA(d, mt__cuda_memset0(d, p, bytes));
  memset(p, 0, bytes);
  return 0;
}

int mt_device_sync(mt_device *d) {
  IF_CUDA(d, mt__cuda_sync(d));
  return 0;
}

int mt_device_set_attention(mt_device *d, const char *backend) {
  if (!backend || !*backend) return 0;
#if WITH_CUDA
  if (d->kind == MT_DEVICE_CUDA) return mt__cuda_attention_backend(d, backend);
#endif
  if (strcmp(backend, "flash") && strcmp(backend, "chunked") && strcmp(backend, "auto"))
    return mt_seterr(MT_EINVAL, "device %s: attention backend \"%s\": flash, chunked or auto",
                     d->name, backend);
  return 0; /* a CPU device's one way */
}

int mt_device_profiler(mt_device *d, int on) {
#if WITH_CUDA
  if (d->kind == MT_DEVICE_CUDA) return mt__cuda_profiler(d, on);
#endif
  (void)on;
  return mt_seterr(MT_ENOTSUP, "device %s: no CUDA profiler on a CPU device", d->name);
}

int mt_device_fault_pending(mt_device *d, char *msg, size_t len) {
#if WITH_CUDA
  if (d->kind == MT_DEVICE_CUDA) return mt__cuda_fault_pending(d, msg, len);
#endif
  (void)d, (void)msg, (void)len; /* a CPU op cannot fault */
  return 0;
}

void mt_device_wait(mt_device *d) {
#if WITH_CUDA
  if (d->kind == MT_DEVICE_CUDA) mt__cuda_wait(d);
#endif
  (void)d; /* a CPU device's ops are done when they return */
}
