/* blas_lazy.cu — fills blas_lazy.h's table: cuBLAS and cuBLASLt, dlopened
 * when the first GPU opens rather than loaded with the program. */
#define MT__BLAS_NO_REDIRECT
#include "blas_lazy.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>

#include "cuda_backend.h"

extern "C" {
#include "err.h"
}

#define MT__STR2(x) #x
#define MT__STR(x) MT__STR2(x)

mt__blas_fns mt__blas;

/* the header declares the library's symbol with the table's type (the
 * cast picks that overload or fails to compile; unevaluated, so nothing
 * links against libcublas) */
static_assert(sizeof(static_cast<mt__gemm_strided_batched_ex>(&::cublasGemmStridedBatchedEx)) ==
                  sizeof(void *),
              "cublasGemmStridedBatchedEx's signature changed");

static pthread_once_t once = PTHREAD_ONCE_INIT;
static char failure[512]; /* empty: loaded */

static void load(void) {
  static const char *const names[2] = {"libcublasLt.so." MT__STR(CUBLAS_VER_MAJOR),
                                       "libcublas.so." MT__STR(CUBLAS_VER_MAJOR)};
  void *lib[2];
  for (int i = 0; i < 2; i++)
    if (!(lib[i] = dlopen(names[i], RTLD_NOW | RTLD_LOCAL))) {
      const char *e = dlerror();
      snprintf(failure, sizeof failure,
               "cannot load %s (%s): put the CUDA toolkit's library folder (lib64) on "
               "LD_LIBRARY_PATH or in the loader's cache (ldconfig)",
               names[i], e ? e : "unknown error");
      return;
    }
  mt__blas_fns f;
#define MT__BLAS_LOAD(i, name)                                                                     \
  if (!(*(void **)&f.name = dlsym(lib[i], #name))) {                                               \
    snprintf(failure, sizeof failure,                                                              \
             "%s has no %s: a toolkit older than this build's (cuBLAS %d)", names[i], #name,       \
             CUBLAS_VER_MAJOR);                                                                    \
    return;                                                                                        \
  }
#define MT__BLAS_LOAD_LT(name) MT__BLAS_LOAD(0, name)
#define MT__BLAS_LOAD_BLAS(name) MT__BLAS_LOAD(1, name)
  MT__BLAS_LT_FNS(MT__BLAS_LOAD_LT)
  MT__BLAS_FNS(MT__BLAS_LOAD_BLAS)
  MT__BLAS_LOAD_BLAS(cublasGemmStridedBatchedEx)
  mt__blas = f;
}

extern "C" int mt__cuda_blas_load(void) {
  pthread_once(&once, load);
  return failure[0] ? mt_seterr(MT_EIO, "%s", failure) : 0;
}
