/* bench_train.c — training-step throughput of one CPU device, and the sgemm
 * ceiling measured in the same process, for bench/cpu-train.
 *
 * usage: bench_train [--preset gpt2-124m] [-B 4] [-T 64] [--steps 5]
 *                    [--warmup 2] [--recompute] [--ceiling-n 2048]
 *                    [--precision fp32|bf16|fp16]
 * Prints human lines on stderr and one JSON object on stdout. Never passes or
 * fails on time: the figures are for people and RESULTS.md.
 */
#include <getopt.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "blas.h"
#include "device.h"
#include "err.h"
#include "job.h"
#include "mt_config.h"
#include "train.h"

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Best of `reps` n×n×n sgemms, in FLOP/s: the ceiling MFU is measured against. */
static double sgemm_ceiling(int n, int reps) {
  size_t nn = (size_t)n * n;
  float *a = malloc(nn * sizeof(float)), *b = malloc(nn * sizeof(float));
  float *c = malloc(nn * sizeof(float));
  if (!a || !b || !c) return 0.0;
  for (size_t i = 0; i < nn; i++) {
    a[i] = (float)((i * 2654435761u) % 1000) * 1e-3f;
    b[i] = (float)((i * 40503u) % 1000) * 1e-3f;
  }
  double best = 0.0;
  for (int r = 0; r < reps + 1; r++) {
    double t0 = now_s();
    mt_sgemm(MT_BLAS_ROW_MAJOR, MT_BLAS_NO_TRANS, MT_BLAS_TRANS, n, n, n, 1.0f, a, n, b, n, 0.0f, c,
             n);
    double dt = now_s() - t0;
    if (r > 0 && 2.0 * n * nn / dt > best) best = 2.0 * n * nn / dt; /* first run warms up */
  }
  free(a);
  free(b);
  free(c);
  return best;
}

static int cmp_double(const void *x, const void *y) {
  double a = *(const double *)x, b = *(const double *)y;
  return (a > b) - (a < b);
}

int main(int argc, char **argv) {
  const char *preset = "gpt2-124m", *precision = "fp32";
  int B = 4, T = 64, steps = 5, warmup = 2, recompute = 0, ceiling_n = 2048;
  static const struct option opts[] = {{"preset", required_argument, NULL, 'p'},
                                       {"steps", required_argument, NULL, 's'},
                                       {"warmup", required_argument, NULL, 'w'},
                                       {"recompute", no_argument, NULL, 'r'},
                                       {"ceiling-n", required_argument, NULL, 'n'},
                                       {"precision", required_argument, NULL, 'q'},
                                       {0}};
  int c;
  while ((c = getopt_long(argc, argv, "B:T:", opts, NULL)) != -1) {
    switch (c) {
    case 'p': preset = optarg; break;
    case 'B': B = atoi(optarg); break;
    case 'T': T = atoi(optarg); break;
    case 's': steps = atoi(optarg); break;
    case 'w': warmup = atoi(optarg); break;
    case 'r': recompute = 1; break;
    case 'n': ceiling_n = atoi(optarg); break;
    case 'q': precision = optarg; break;
    default:
      fprintf(stderr, "usage: bench_train [--preset P] [-B N] [-T N] [--steps N] [--warmup N] "
                      "[--recompute] [--ceiling-n N] [--precision fp32|bf16|fp16]\n");
      return 2;
    }
  }
  if (B < 1 || T < 1 || steps < 1 || warmup < 0) {
    fprintf(stderr, "bench_train: -B, -T and --steps must be positive\n");
    return 2;
  }

  mt_device dev;
  if (mt_device_open(&dev, "cpu:0")) {
    fprintf(stderr, "bench_train: %s\n", mt_errmsg());
    return 1;
  }

  /* random tokens for (warmup + steps) batches */
  char data_path[] = "/tmp/mtnlg-bench-XXXXXX";
  int fd = mkstemp(data_path);
  if (fd < 0) {
    perror("bench_train: mkstemp");
    return 1;
  }
  size_t n_tok = (size_t)(warmup + steps) * B * T + 1;
  uint16_t *tok = malloc(n_tok * sizeof(uint16_t));
  uint64_t x = 88172645463325252ull;
  for (size_t i = 0; i < n_tok; i++) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    tok[i] = (uint16_t)(x % 50257);
  }
  if (write(fd, tok, n_tok * sizeof(uint16_t)) != (ssize_t)(n_tok * sizeof(uint16_t))) {
    perror("bench_train: write");
    return 1;
  }
  close(fd);
  free(tok);

  char json[2048];
  snprintf(json, sizeof json,
           "{\"name\":\"bench\",\"model\":{\"preset\":\"%s\",\"seq_len\":%d},"
           "\"parallel\":{\"micro_batch\":%d,\"recompute\":%s},"
           "\"train\":{\"global_batch\":%d,\"steps\":%d,\"precision\":\"%s\","
           "\"lr\":{\"schedule\":\"constant\",\"peak\":1e-4},\"clip_grad\":1.0,"
           "\"weight_decay\":0.1},\"data\":{\"path\":\"%s\"}}",
           preset, T, B, recompute ? "true" : "false", B, warmup + steps, precision, data_path);
  const char *preset_dirs[MT_PRESET_DIRS_MAX];
  mt_job_preset_dirs(NULL, preset_dirs);
  mt_job job;
  mt_trainer tr;
  if (mt_job_parse(&job, json, NULL, preset_dirs, NULL) ||
      mt_trainer_create(&tr, &job, &dev, NULL)) {
    fprintf(stderr, "bench_train: %s\n", mt_errmsg());
    unlink(data_path);
    return 1;
  }

  /* the ceiling is measured before, between and after the steps and the best
   * kept, so a moment of interference cannot lower it and flatter the MFU */
  double ceiling = sgemm_ceiling(ceiling_n, 5);
  double *ms = calloc((size_t)steps, sizeof(double));
  for (int s = 0; s < warmup + steps; s++) {
    mt_step_stats st;
    if (mt_trainer_step(&tr, &st)) {
      fprintf(stderr, "bench_train: %s\n", mt_errmsg());
      unlink(data_path);
      return 1;
    }
    if (s >= warmup) ms[s - warmup] = st.step_ms;
    /* sample the ceiling between steps too: the best of all samples is the
     * machine's rate when nothing else took the cores */
    double between = sgemm_ceiling(ceiling_n, 2);
    if (between > ceiling) ceiling = between;
    fprintf(stderr, "  step %d: %.1f ms, loss %.4f%s\n", s + 1, st.step_ms, st.loss,
            s < warmup ? " (warm-up)" : "");
  }
  double after = sgemm_ceiling(ceiling_n, 5);
  if (after > ceiling) ceiling = after;
  qsort(ms, (size_t)steps, sizeof(double), cmp_double);
  double med_ms = ms[steps / 2];
  double tok_s = (double)B * T / (med_ms / 1e3);
  double flops = tr.flops_per_step / (med_ms / 1e3);
  printf("{\"preset\":\"%s\",\"B\":%d,\"T\":%d,\"precision\":\"%s\",\"threads\":%d,"
         "\"blas_core\":\"%s\",\"blas_choice\":\"%s\",\"step_ms\":%.3f,\"tokens_per_s\":%.2f,"
         "\"gflops\":%.2f,\"sgemm_ceiling_gflops\":%.2f,\"mfu\":%.4f,\"params\":%zu,"
         "\"flops_per_step\":%.6g,\"activation_bytes\":%zu}\n",
         preset, B, T, precision, omp_get_max_threads(), mt_blas_corename(), mt_blas_choice(),
         med_ms, tok_s, flops / 1e9, ceiling / 1e9, flops / ceiling, tr.model.num_params,
         tr.flops_per_step, tr.model.acts_floats * sizeof(float));
  free(ms);
  mt_trainer_destroy(&tr);
  mt_device_close(&dev);
  unlink(data_path);
  return 0;
}
