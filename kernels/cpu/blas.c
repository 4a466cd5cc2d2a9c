#include "blas.h"

#include <cpuid.h>
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "err.h"

mt_sgemm_fn mt_sgemm;

static pthread_once_t blas_once = PTHREAD_ONCE_INIT;
static int blas_status;
static char blas_err[512];
static char corename[64], choice[96], library[256], config[256];

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
  if (env && *env) {
    snprintf(choice, sizeof choice, "OPENBLAS_CORETYPE");
  } else if (cpu_has_avx512()) {
    setenv("OPENBLAS_CORETYPE", "SkylakeX", 0);
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
  mt_sgemm = (mt_sgemm_fn)dlsym(h, "cblas_sgemm");
  char *(*get_corename)(void) = (char *(*)(void))dlsym(h, "openblas_get_corename");
  char *(*get_config)(void) = (char *(*)(void))dlsym(h, "openblas_get_config");
  if (!mt_sgemm) {
    blas_status = MT_EIO;
    snprintf(blas_err, sizeof blas_err, "blas: %s has no cblas_sgemm", library);
    return;
  }
  if (get_config) snprintf(config, sizeof config, "%s", get_config());
  if (get_corename) snprintf(corename, sizeof corename, "%s", get_corename());

  /* An AVX2 CPU that OpenBLAS did not recognise: re-run its dispatch on the
   * Haswell kernels. Safe here: no BLAS call has happened yet. */
  void (*dyn_quit)(void) = (void (*)(void))dlsym(h, "gotoblas_dynamic_quit");
  void (*dyn_init)(void) = (void (*)(void))dlsym(h, "gotoblas_dynamic_init");
  if (!(env && *env) && is_legacy_core(corename) && cpu_has_avx2() && dyn_quit && dyn_init) {
    setenv("OPENBLAS_CORETYPE", "Haswell", 1);
    dyn_quit();
    dyn_init();
    if (get_corename) snprintf(corename, sizeof corename, "%s", get_corename());
    snprintf(choice, sizeof choice, "chosen by mtnlg for an AVX2 CPU");
  }
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
