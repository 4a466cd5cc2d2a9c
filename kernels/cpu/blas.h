/* blas.h — OpenBLAS, loaded at run time on the kernel this CPU deserves.
 *
 * OpenBLAS 0.3.21 picks its kernel when it loads, and on CPUs newer than it
 * knows (AVX-512 Xeons) it falls back to Prescott, 5-6x slower. We therefore
 * never link it: mt_blas_load() sets OPENBLAS_CORETYPE when the user has not
 * (respecting it when set), then dlopen()s the OpenMP build of OpenBLAS so
 * that GEMMs and our OpenMP loops share one thread pool instead of two sets
 * of threads spinning against each other on the same cores.
 */
#ifndef MT_BLAS_H
#define MT_BLAS_H

enum { MT_BLAS_ROW_MAJOR = 101 };
enum { MT_BLAS_NO_TRANS = 111, MT_BLAS_TRANS = 112 };

typedef void (*mt_sgemm_fn)(int order, int transa, int transb, int m, int n, int k, float alpha,
                            const float *a, int lda, const float *b, int ldb, float beta, float *c,
                            int ldc);

/* cblas_sgemm, valid after a successful mt_blas_load(): with more than one
 * CPU device open in the process, a GEMM outside a parallel region runs as
 * row blocks on its device's OpenMP threads (blas.c says why). */
extern mt_sgemm_fn mt_sgemm;

/* CPU devices opened (+1) and closed (-1): mt_device_open and _close. */
void mt_blas_cpu_devices(int delta);
/* How many GEMMs ran as row blocks so far (for tests). */
unsigned long mt_blas_row_splits(void);
/* Turns the row blocks on (1, the default) or off (0: OpenBLAS's own
 * threading, for bench/cpu-devices); returns the previous setting. */
int mt_blas_row_split(int on);

/* Idempotent and thread-safe. 0 or MT_EIO with mt_errmsg(). */
int mt_blas_load(void);

/* e.g. "SkylakeX", and how it was chosen: "OPENBLAS_CORETYPE", "chosen by mtnlg
 * for an AVX-512 CPU", "detected by OpenBLAS". Empty before loading. */
const char *mt_blas_corename(void);
const char *mt_blas_choice(void);
/* The library file loaded and its build string (openblas_get_config). */
const char *mt_blas_library(void);
const char *mt_blas_config(void);

#endif
