/* bench_cpu_devices — several CPU devices in one process, each a thread
 * running linear_fwd GEMMs on its own OpenMP threads, as mtnlgd's device
 * threads do: GFLOP/s with the GEMMs as row blocks on each device's threads
 * (blas.c, the default) against OpenBLAS's own threading (whose one work
 * queue per process runs one device's GEMM at a time while the others spin),
 * in one invocation. Figures only.
 *
 * usage: bench_cpu_devices [DEVICES [THREADS_PER_DEVICE [N C OC [REPS]]]]
 */
#include <omp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "blas.h"
#include "device.h"
#include "err.h"
#include "ops.h"

static int threads_per = 2, N = 512, C = 1024, OC = 1024, reps = 10;
static pthread_barrier_t start;

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

typedef struct {
  int index, rc;
  double seconds;
} job;

static void *device_thread(void *p) {
  job *j = p;
  char spec[16];
  snprintf(spec, sizeof spec, "cpu:%d", j->index);
  omp_set_num_threads(threads_per);
  mt_device d;
  if ((j->rc = mt_device_open(&d, spec))) {
    pthread_barrier_wait(&start);
    pthread_barrier_wait(&start);
    return NULL;
  }
  float *x = malloc(sizeof(float) * N * C), *w = malloc(sizeof(float) * OC * C);
  float *y = malloc(sizeof(float) * N * OC);
  for (size_t i = 0; i < (size_t)N * C; i++) x[i] = (float)(i % 13) * 0.01f;
  for (size_t i = 0; i < (size_t)OC * C; i++) w[i] = (float)(i % 7) * 0.01f;
  d.ops->linear_fwd(&d, y, MT_F32, x, MT_F32, w, MT_F32, NULL, NULL, N, C, OC); /* warm */
  pthread_barrier_wait(&start); /* every device open: the count is final */
  pthread_barrier_wait(&start);
  double t0 = now_s();
  for (int r = 0; r < reps; r++)
    d.ops->linear_fwd(&d, y, MT_F32, x, MT_F32, w, MT_F32, NULL, NULL, N, C, OC);
  j->seconds = now_s() - t0;
  free(x), free(w), free(y);
  mt_device_close(&d);
  return NULL;
}

static double run(int devices) {
  pthread_t th[64];
  job jobs[64];
  pthread_barrier_init(&start, NULL, (unsigned)devices + 1);
  for (int i = 0; i < devices; i++) {
    jobs[i] = (job){.index = i};
    pthread_create(&th[i], NULL, device_thread, &jobs[i]);
  }
  pthread_barrier_wait(&start);
  double t0 = now_s();
  pthread_barrier_wait(&start);
  for (int i = 0; i < devices; i++) pthread_join(th[i], NULL);
  double wall = now_s() - t0;
  pthread_barrier_destroy(&start);
  for (int i = 0; i < devices; i++)
    if (jobs[i].rc) {
      fprintf(stderr, "bench_cpu_devices: device %d: %s\n", i, mt_errmsg());
      exit(1);
    }
  return 2.0 * N * C * OC * reps * devices / wall / 1e9;
}

int main(int argc, char **argv) {
  int devices = argc > 1 ? atoi(argv[1]) : 2;
  if (argc > 2) threads_per = atoi(argv[2]);
  if (argc > 5) N = atoi(argv[3]), C = atoi(argv[4]), OC = atoi(argv[5]);
  if (argc > 6) reps = atoi(argv[6]);
  if (devices < 1 || devices > 64 || threads_per < 1 || N < 1 || C < 1 || OC < 1 || reps < 1) {
    fprintf(stderr, "usage: bench_cpu_devices [DEVICES [THREADS_PER_DEVICE [N C OC [REPS]]]]\n");
    return 2;
  }
  if (mt_blas_load()) {
    fprintf(stderr, "bench_cpu_devices: %s\n", mt_errmsg());
    return 1;
  }
  printf("%d CPU devices x %d OpenMP threads (%d cores), linear_fwd %dx%dx%d x %d each, OpenBLAS "
         "%s\n",
         devices, threads_per, omp_get_num_procs(), N, C, OC, reps, mt_blas_corename());
  double split[3], lib[3];
  for (int k = 0; k < 3; k++) { /* alternated, best of 3 each */
    mt_blas_row_split(0);
    lib[k] = run(devices);
    mt_blas_row_split(1);
    split[k] = run(devices);
  }
  double bs = 0, bl = 0;
  for (int k = 0; k < 3; k++) bs = split[k] > bs ? split[k] : bs, bl = lib[k] > bl ? lib[k] : bl;
  printf("OpenBLAS threading: %7.1f GFLOP/s (best of 3: %.1f %.1f %.1f)\n", bl, lib[0], lib[1],
         lib[2]);
  printf("row blocks:         %7.1f GFLOP/s (best of 3: %.1f %.1f %.1f)\n", bs, split[0], split[1],
         split[2]);
  printf("ratio row blocks / OpenBLAS threading: %.2fx\n", bs / bl);
  return 0;
}
