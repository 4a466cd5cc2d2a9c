#include "blas.h"

#include <cpuid.h>
#include <dlfcn.h>
#include <omp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "err.h"

mt_sgemm_fn mt_sgemm;
static mt_sgemm_fn lib_sgemm; /* the library's cblas_sgemm */
static atomic_int cpu_devices;
static atomic_ulong row_splits;
static atomic_int row_split_on = 1;

int mt_blas_row_split(int on) { return atomic_exchange(&row_split_on, on); }

unsigned long mt_blas_row_splits(void) { return atomic_load(&row_splits); }

void mt_blas_cpu_devices(int delta) { atomic_fetch_add(&cpu_devices, delta); }

/* Debian's OpenMP OpenBLAS hands a threaded GEMM to one work queue per
 * process: while one device thread's GEMM runs, another's waits for it,
 * spinning on a core. With several CPU devices in the process a GEMM called
 * outside a parallel region therefore runs as blocks of C's rows, one per
 * OpenMP thread of its device, each a single-threaded GEMM (OpenBLAS runs
 * one inside a parallel region on its caller's thread): the devices' GEMMs
 * run side by side. Each element is still one GEMM's full sum over k. */
enum { ROWS_MIN = 32 };
static void sgemm_rows(int order, int transa, int transb, int m, int n, int k, float alpha,
                       const float *a, int lda, const float *b, int ldb, float beta, float *c,
                       int ldc) {
  int nt = omp_get_max_threads(), blocks = m / ROWS_MIN < nt ? m / ROWS_MIN : nt;
  if (!atomic_load(&row_split_on) || atomic_load(&cpu_devices) < 2 || blocks < 2 ||
      omp_in_parallel() || order != MT_BLAS_ROW_MAJOR) {
    lib_sgemm(order, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  atomic_fetch_add(&row_splits, 1);
#pragma omp parallel for num_threads(blocks) schedule(static, 1)
  for (int i = 0; i < blocks; i++) {
    int r0 = (int)((long long)m * i / blocks), r1 = (int)((long long)m * (i + 1) / blocks);
    /* row-major A is m x k (or, transposed, k x m: its rows' block is columns) */
    const float *ai = transa == MT_BLAS_NO_TRANS ? a + (size_t)r0 * lda : a + r0;
    lib_sgemm(order, transa, transb, r1 - r0, n, k, alpha, ai, lda, b, ldb, beta,
              c + (size_t)r0 * ldc, ldc);
  }
}

static pthread_once_t blas_once = PTHREAD_ONCE_INIT;
static int blas_status;
static char blas_err[512];
static char corename[64], choice[160], library[256], config[256];

/* AVX-512 usable: the CPU has F/BW/VL/DQ and the OS saves the zmm state. */
static int cpu_has_avx512(void) {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return 0; /* OSXSAVE */
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if ((lo & 0xe6) != 0xe6) return 0; /* xmm, ymm, opmask, zmm state */
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
  unsigned need = (1u << 16) | (1u << 17) | (1u << 30) | (1u << 31); /* F DQ BW VL */
  return (b & need) == need;
}

static int cpu_has_avx2(void) {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27)) || !(c & (1u << 12))) return 0;
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if ((lo & 0x6) != 0x6) return 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
  return (b & (1u << 5)) != 0;
}

/* OpenBLAS kernels that predate AVX2: on an AVX2 CPU they mean it guessed. */
static int is_legacy_core(const char *name) {
  static const char *legacy[] = {"Prescott", "Core2",     "Penryn",     "Dunnington", "Nehalem",
                                 "Atom",     "Katmai",    "Coppermine", "Northwood",  "Banias",
                                 "Unknown",  "Barcelona", "Opteron",    "Bobcat",     NULL};
  for (int i = 0; legacy[i]; i++)
    if (!strcasecmp(name, legacy[i])) return 1;
  return 0;
}

static void blas_load_once(void) {
  const char *env = getenv("OPENBLAS_CORETYPE");
  char asked[64] = "";
  if (env && *env) snprintf(asked, sizeof asked, "%s", env);
  /* the kernel for this CPU when OpenBLAS's own guess is wrong */
  const char *pick = cpu_has_avx512() ? "SkylakeX" : cpu_has_avx2() ? "Haswell" : NULL;
  const char *pick_why = cpu_has_avx512() ? "an AVX-512 CPU" : "an AVX2 CPU";
  if (asked[0]) {
    snprintf(choice, sizeof choice, "OPENBLAS_CORETYPE");
  } else if (cpu_has_avx512()) {
    /* overwrite: set but empty is unset to OpenBLAS too */
    setenv("OPENBLAS_CORETYPE", "SkylakeX", 1);
    snprintf(choice, sizeof choice, "chosen by mtnlg for an AVX-512 CPU");
  } else {
    snprintf(choice, sizeof choice, "detected by OpenBLAS");
  }

  static const char *candidates[] = {"/usr/lib/x86_64-linux-gnu/openblas-openmp/libopenblas.so.0",
                                     "/usr/lib/aarch64-linux-gnu/openblas-openmp/libopenblas.so.0",
                                     "libopenblas.so.0", "libopenblas.so", NULL};
  void *h = NULL;
  for (int i = 0; candidates[i] && !h; i++) {
    h = dlopen(candidates[i], RTLD_NOW | RTLD_LOCAL);
    if (h) snprintf(library, sizeof library, "%s", candidates[i]);
  }
  if (!h) {
    blas_status = MT_EIO;
    snprintf(blas_err, sizeof blas_err,
             "blas: cannot load OpenBLAS (install libopenblas0-openmp): %s", dlerror());
    return;
  }
  lib_sgemm = (mt_sgemm_fn)dlsym(h, "cblas_sgemm");
  char *(*get_corename)(void) = (char *(*)(void))dlsym(h, "openblas_get_corename");
  char *(*get_config)(void) = (char *(*)(void))dlsym(h, "openblas_get_config");
  if (!lib_sgemm) {
    blas_status = MT_EIO;
    snprintf(blas_err, sizeof blas_err, "blas: %s has no cblas_sgemm", library);
    return;
  }
  if (get_config) snprintf(config, sizeof config, "%s", get_config());
  if (get_corename) snprintf(corename, sizeof corename, "%s", get_corename());

  /* A legacy kernel on an AVX2 CPU means OpenBLAS guessed: it did not know
   * this CPU, or OPENBLAS_CORETYPE named no kernel it has (a typo falls back
   * to its detection). Re-run its dispatch on this CPU's kernels. Safe here:
   * no BLAS call has happened yet. A kernel the user named is kept. */
  void (*dyn_quit)(void) = (void (*)(void))dlsym(h, "gotoblas_dynamic_quit");
  void (*dyn_init)(void) = (void (*)(void))dlsym(h, "gotoblas_dynamic_init");
  int named = asked[0] && !strcasecmp(corename, asked);
  if (!named && pick && is_legacy_core(corename) && dyn_quit && dyn_init) {
    setenv("OPENBLAS_CORETYPE", pick, 1);
    dyn_quit();
    dyn_init();
    if (get_corename) snprintf(corename, sizeof corename, "%s", get_corename());
    if (asked[0])
      snprintf(choice, sizeof choice,
               "OPENBLAS_CORETYPE=%.20s is not a kernel this OpenBLAS runs here: "
               "chosen by mtnlg for %s",
               asked, pick_why);
    else
      snprintf(choice, sizeof choice, "chosen by mtnlg for %s", pick_why);
  } else if (asked[0] && !named) {
    snprintf(choice, sizeof choice,
             "OPENBLAS_CORETYPE=%.20s is not a kernel this OpenBLAS runs here: "
             "detected by OpenBLAS",
             asked);
  }
  mt_sgemm = sgemm_rows;
  blas_status = 0;
}

int mt_blas_load(void) {
  pthread_once(&blas_once, blas_load_once);
  if (blas_status) return mt_seterr(blas_status, "%s", blas_err);
  return 0;
}

const char *mt_blas_corename(void) { return corename; }
const char *mt_blas_choice(void) { return choice; }
const char *mt_blas_library(void) { return library; }
const char *mt_blas_config(void) { return config; }
