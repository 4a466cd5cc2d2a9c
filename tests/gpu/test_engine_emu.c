/* test_engine_emu.c — the engine on CUDA devices, without a GPU: the whole
 * training path (daemon/engine through mt_local, ranks as threads) on
 * "cuda:N" devices of the CPU emulator (tests/gpu/emu runs kernels/cuda, and
 * NCCL between the rank threads), against the same jobs on CPU devices.
 *
 * What this proves, since CI has no GPU: the engine touches device memory
 * only through the device API (no host pointer into a GPU buffer: the
 * emulator tracks allocations and dies on a wrong-way copy), device groups
 * go over NCCL with the world group on Gloo, the bucketed dp reduction and
 * every other collective move the right bytes, and the precision logic
 * (bf16 GEMMs, fp16 overflow found on the device) behaves as on the CPU.
 * NCCL runs in the emulator's late mode (mt_emu_nccl_late): every
 * operation moves its data only when a host waits for it, and its buffers
 * are guarded until then, so a kernel of the backward writing a bucket
 * whose reduce is in flight, or a stage reading a pipeline receive before
 * its wait, stops the test or shows as NaN, every run. It cannot show
 * speed, or races between kernels; tests/gpu/run measures on a GPU.
 *
 * MT_CUDA_EMU_DEVICES is set to 8 before anything asks for the count.
 */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cuda_emu.h" /* mt_emu_fail_launch, mt_emu_launch_count */
#include "device.h"
#include "err.h"
#include "gpt.h"
#include "indexed.h"
#include "job.h"
#include "local.h"
#include "mt_check.h"
#include "nccl_emu.h" /* mt_emu_nccl_late */
#include "rank_runs.h"
#include "safetensors.h"
#include "store.h"

enum { MAX_RANKS = RANK_RUNS_MAX_RANKS };

static char data_path[64];
static char docs_path[64];    /* tokens with an end of document (id 0) every 5 */
static char valid_dir[64];    /* holds valid_prefix's files and its sample index caches */
static char valid_prefix[80]; /* data_path's tokens as a .bin/.idx dataset, for data.valid */
static const char *preset_dirs[] = {MT_PRESET_DIR, NULL};

typedef struct layout {
  const char *kind; /* "cpu" or "cuda" */
  const char *precision;
  const char *loss_scale; /* JSON object or NULL */
  int steps, tp, pp, dp;
  const char *export_path; /* or NULL */
  const char *ckpt_dir;    /* or NULL */
  int ckpt_interval;       /* with ckpt_dir */
  int bucket_size;         /* 0: the default */
  float dropout;           /* attention's and the hidden one, 0: none */
  int n_layer;             /* 0: the preset's (2) */
  int blocking_p2p;        /* parallel.overlap_p2p = false */
  int seq_par;             /* parallel.sequence_parallel = true */
  int virtual_stages;      /* parallel.virtual_stages, 0: none */
  int global_batch;        /* 0: 8 */
  int untie;               /* model.untie_embeddings = true */
  int docs;   /* docs_path with data.eod_token 0, reset_position_ids and reset_attention_mask */
  int timing; /* train.timing_log_level */
  const char *attention; /* model.attention_backend, or NULL */
  int eval;              /* validation on the training tokens after every step, 1 batch */
  const char *profile;   /* train.profile's JSON object, or NULL */
} layout;

/* A 2-layer tiny model (n_embd 64, seq 16), global batch 8 in micro-batches
 * of 2; logs[w] receives world rank w's steps. */
static int run(const layout *l, rank_log *logs) {
  char json[1600], ckpt[400] = "", bucket[192] = "", drop[160] = "", timing[160] = "",
                   valid[128] = "", eval[64] = "";
  if (l->ckpt_dir)
    snprintf(ckpt, sizeof ckpt, ",\"checkpoint\":{\"dir\":\"%s\",\"interval\":%d}", l->ckpt_dir,
             l->ckpt_interval);
  if (l->bucket_size) snprintf(bucket, sizeof bucket, ",\"bucket_size\":%d", l->bucket_size);
  if (l->blocking_p2p)
    snprintf(bucket + strlen(bucket), sizeof bucket - strlen(bucket), ",\"overlap_p2p\":false");
  if (l->seq_par)
    snprintf(bucket + strlen(bucket), sizeof bucket - strlen(bucket),
             ",\"sequence_parallel\":true");
  if (l->virtual_stages)
    snprintf(bucket + strlen(bucket), sizeof bucket - strlen(bucket), ",\"virtual_stages\":%d",
             l->virtual_stages);
  if (l->dropout > 0.0f)
    snprintf(drop, sizeof drop, ",\"attention_dropout\":%g,\"hidden_dropout\":%g", l->dropout,
             l->dropout);
  if (l->n_layer)
    snprintf(drop + strlen(drop), sizeof drop - strlen(drop), ",\"n_layer\":%d", l->n_layer);
  if (l->untie)
    snprintf(drop + strlen(drop), sizeof drop - strlen(drop), ",\"untie_embeddings\":true");
  if (l->timing) snprintf(timing, sizeof timing, ",\"timing_log_level\":%d", l->timing);
  if (l->profile)
    snprintf(timing + strlen(timing), sizeof timing - strlen(timing), ",\"profile\":%s",
             l->profile);
  if (l->eval) {
    snprintf(valid, sizeof valid, ",\"valid\":\"%s\"", valid_prefix);
    snprintf(eval, sizeof eval, ",\"eval\":{\"interval\":1,\"iters\":1,\"test\":false}");
  }
  if (l->attention)
    snprintf(drop + strlen(drop), sizeof drop - strlen(drop), ",\"attention_backend\":\"%s\"",
             l->attention);
  snprintf(json, sizeof json,
           "{\"name\":\"emu\",\"model\":{\"preset\":\"tiny\",\"seq_len\":16%s},"
           "\"parallel\":{\"tp\":%d,\"pp\":%d,\"dp_min\":%d,\"dp_max\":%d,\"micro_batch\":2%s},"
           "\"train\":{\"global_batch\":%d,\"steps\":%d,\"seed\":5,\"precision\":\"%s\"%s%s%s,"
           "\"lr\":{\"schedule\":\"cosine\",\"peak\":3e-3,\"warmup_steps\":2,\"decay_steps\":12}},"
           "\"data\":{\"path\":\"%s\"%s%s}%s%s}",
           drop, l->tp, l->pp, l->dp, l->dp, bucket, l->global_batch ? l->global_batch : 8,
           l->steps, l->precision, l->loss_scale ? ",\"loss_scale\":" : "",
           l->loss_scale ? l->loss_scale : "", timing, l->docs ? docs_path : data_path,
           l->docs ? ",\"eod_token\":0,\"reset_position_ids\":true,\"reset_attention_mask\":true"
                   : "",
           valid, ckpt, eval);
  return run_ranks(json, preset_dirs, l->kind, l->export_path, logs);
}

static double worst_rel(const rank_log *a, const rank_log *b, int from, int steps) {
  return rank_runs_worst_rel(a, b, from, steps);
}

/* fp32 on one emulated GPU follows the CPU: the emulator's GEMMs add in
 * double, the CPU's in fp32, so the losses agree to fp32 reduction noise. */
static int test_fp32_one_gpu_matches_cpu(void) {
  enum { N = 5 };
  static rank_log cpu[1], gpu[1];
  layout l = {.kind = "cpu", .precision = "fp32", .steps = N, .tp = 1, .pp = 1, .dp = 1};
  REQUIRE(!run(&l, cpu), "cpu: %s", mt_errmsg());
  l.kind = "cuda";
  REQUIRE(!run(&l, gpu), "cuda: %s", mt_errmsg());
  double w = worst_rel(gpu, cpu, 0, N);
  CHECK(gpu[0].n == N && w < 1e-5, "fp32 cuda:0 vs cpu: %d steps, worst loss rel %.2e", gpu[0].n,
        w);
  CHECK(cpu[0].loss[N - 1] < cpu[0].loss[0] - 0.1, "did not train: loss %.4f -> %.4f",
        cpu[0].loss[0], cpu[0].loss[N - 1]);
  printf("  fp32 cuda:0 vs cpu:0, %d steps: worst loss rel %.2e (loss %.4f -> %.4f)\n", N, w,
         gpu[0].loss[0], gpu[0].loss[N - 1]);
  return 0;
}

/* bf16 on the GPU rounds GEMM inputs (activations too) to bf16, as autocast
 * does; the CPU backend computes in fp32 on bf16 weights. The first step
 * differs by the activations' rounding alone: a few 1e-3 at most. */
static int test_bf16_one_gpu_follows_cpu(void) {
  enum { N = 4 };
  static rank_log cpu[1], gpu[1];
  layout l = {.kind = "cpu", .precision = "bf16", .steps = N, .tp = 1, .pp = 1, .dp = 1};
  REQUIRE(!run(&l, cpu), "cpu: %s", mt_errmsg());
  l.kind = "cuda";
  REQUIRE(!run(&l, gpu), "cuda: %s", mt_errmsg());
  double w = worst_rel(gpu, cpu, 0, N);
  CHECK(gpu[0].n == N && w < 2e-2, "bf16 cuda:0 vs cpu: worst loss rel %.2e", w);
  CHECK(w > 0.0, "bf16 GEMMs on the GPU gave the CPU's fp32 losses exactly: not bf16?");
  printf("  bf16 cuda:0 vs cpu:0, %d steps: worst loss rel %.2e\n", N, w);
  return 0;
}

/* fp16 from a loss scale of 2^24, where the scaled gradients overflow fp16:
 * the overflow check on the device skips the same steps as the CPU's, the
 * scale walks down alike, and training resumes once it fits. */
static int test_fp16_overflow_skips_like_cpu(void) {
  enum { N = 8 };
  const char *ls = "{\"initial\":16777216,\"growth_interval\":4,\"hysteresis\":1}";
  static rank_log cpu[1], gpu[1];
  layout l = {
      .kind = "cpu", .precision = "fp16", .loss_scale = ls, .steps = N, .tp = 1, .pp = 1, .dp = 1};
  REQUIRE(!run(&l, cpu), "cpu: %s", mt_errmsg());
  l.kind = "cuda";
  REQUIRE(!run(&l, gpu), "cuda: %s", mt_errmsg());
  int skipped = 0, same = gpu[0].n == N;
  for (int s = 0; s < N && s < gpu[0].n; s++) {
    skipped += cpu[0].skipped[s];
    same &= cpu[0].skipped[s] == gpu[0].skipped[s] && cpu[0].scale[s] == gpu[0].scale[s];
  }
  CHECK(cpu[0].skipped[0] && skipped < N, "cpu: %d of %d steps skipped", skipped, N);
  CHECK(same, "fp16 skips or scales differ between cuda:0 and cpu:0");
  printf("  fp16 from 2^24: %d of %d steps skipped on both, scale now %g\n", skipped, N,
         gpu[0].scale[N - 1]);
  return 0;
}

/* Compares two safetensors exports tensor by tensor (relative L2). Adam
 * divides by sqrt(v): in a bias whose gradients are near zero, reduction-order
 * noise in the gradient is noise of the same relative size in its update, so
 * the weights agree less closely than the losses (2.9e-4 seen). A shard put
 * in the wrong place would be off by O(1). */
static int compare_exports(const char *a, const char *b, double tol) {
  mt_device host;
  REQUIRE(!mt_device_open(&host, "cpu:0"), "%s", mt_errmsg());
  mt_gpt_config cfg = {.n_layer = 2,
                       .n_embd = 64,
                       .n_head = 4,
                       .vocab_size = 256,
                       .padded_vocab = 256,
                       .max_seq = 16,
                       .ln_eps = 1e-5f,
                       .init_std = 0.02f};
  mt_gpt ma, mb;
  REQUIRE(!mt_gpt_create(&ma, &cfg, &host, 1, 1), "%s", mt_errmsg());
  REQUIRE(!mt_gpt_create(&mb, &cfg, &host, 1, 1), "%s", mt_errmsg());
  int rc = mt_gpt_load_safetensors(&ma, a);
  CHECK(!rc, "load %s: %s", a, mt_errmsg());
  if (!rc) rc = mt_gpt_load_safetensors(&mb, b);
  CHECK(!rc, "load %s: %s", b, mt_errmsg());
  double worst = 0.0;
  const char *worst_name = "";
  for (int i = 0; i < ma.n_tensors && !rc; i++) {
    const float *x = mt_gpt_param(&ma, i), *y = mt_gpt_param(&mb, i);
    double d = 0, n = 0;
    for (size_t e = 0; e < ma.params_table[i].numel; e++)
      d += (double)(x[e] - y[e]) * (x[e] - y[e]), n += (double)y[e] * y[e];
    double r = n > 0 ? sqrt(d / n) : sqrt(d);
    if (r > worst || isnan(r)) worst = r, worst_name = ma.params_table[i].name;
  }
  CHECK(!rc && worst < tol, "exports differ: worst tensor %s rel %.2e", worst_name, worst);
  printf("  export of tp2 pp2 dp2 on cuda vs one cpu: worst tensor %s rel %.2e\n", worst_name,
         worst);
  mt_gpt_destroy(&ma);
  mt_gpt_destroy(&mb);
  mt_device_close(&host);
  return 0;
}

/* tp2 x pp2 x dp2 on eight emulated GPUs: tp, pipeline, dp (bucketed, small
 * buckets) and the tied embedding over NCCL, the step's agreement over Gloo;
 * the losses follow one CPU device within tol, every rank agrees, and in
 * fp32 the export (gathered through host memory) holds the single device's
 * weights. In bf16 each GPU rank's attention is the flash kernels on its
 * heads, their dropout masks indexed from the rank's first head. */
static int three_d_on_gpus_follows_one_cpu(const char *precision, float dropout, double tol,
                                           double norm_tol) {
  enum { N = 4 };
  static rank_log cpu[1], gpu[MAX_RANKS];
  int fp32 = !strcmp(precision, "fp32");
  char exp_cpu[128], exp_gpu[128];
  snprintf(exp_cpu, sizeof exp_cpu, "%s.cpu.safetensors", data_path);
  snprintf(exp_gpu, sizeof exp_gpu, "%s.gpu.safetensors", data_path);
  layout l = {.kind = "cpu",
              .precision = precision,
              .steps = N,
              .tp = 1,
              .pp = 1,
              .dp = 1,
              .export_path = fp32 ? exp_cpu : NULL,
              .dropout = dropout};
  REQUIRE(!run(&l, cpu), "cpu: %s", mt_errmsg());
  layout g = {.kind = "cuda",
              .precision = precision,
              .steps = N,
              .tp = 2,
              .pp = 2,
              .dp = 2,
              .export_path = fp32 ? exp_gpu : NULL,
              .bucket_size = 3000,
              .dropout = dropout};
  int rc = run(&g, gpu);
  CHECK(!rc, "cuda tp2 pp2 dp2 %s: %s", precision, mt_errmsg());
  if (!rc) {
    double worst_norm = 0.0;
    for (int w = 0; w < MAX_RANKS; w++) {
      double r = worst_rel(&gpu[w], cpu, 0, N);
      CHECK(gpu[w].n == N && r < tol, "%s rank %d: %d steps, worst loss rel %.2e vs one cpu",
            precision, w, gpu[w].n, r);
      /* every rank's norm is the all-reduced sum of the ranks' slices, each
       * parameter counted once: tp rank 1 leaves out the replicated
       * tensors, the last stage its copy of the tied embedding */
      double nr = rank_runs_worst_norm_rel(&gpu[w], cpu, 0, N);
      CHECK(nr < norm_tol, "%s rank %d: worst gradient norm rel %.2e vs one cpu", precision, w, nr);
      if (nr > worst_norm) worst_norm = nr;
    }
    printf("  %s tp2 pp2 dp2%s on cuda:0-7 vs cpu:0: worst loss rel %.2e, gradient norm rel "
           "%.2e\n",
           precision, dropout > 0.0f ? " with dropout" : "", worst_rel(&gpu[0], cpu, 0, N),
           worst_norm);
    if (fp32) compare_exports(exp_gpu, exp_cpu, 2e-3);
  }
  unlink(exp_cpu);
  unlink(exp_gpu);
  return 0;
}

static int test_3d_layout_on_gpus_matches_one_cpu(void) {
  return three_d_on_gpus_follows_one_cpu("fp32", 0.0f, 1e-5, 1e-6);
}

/* bf16 with dropout 0.1, within the rounding of the flash kernels'
 * probabilities and the GEMMs' gradients (3.2e-5 seen; the emulator and the
 * CPU are deterministic): a tp rank drawing its first heads' masks instead
 * of its own moved the loss by 3.5e-4 */
static int test_bf16_3d_layout_on_gpus_follows_one_cpu(void) {
  return three_d_on_gpus_follows_one_cpu("bf16", 0.1f, 1e-4, 2e-3);
}

/* Sequence parallelism on four emulated GPUs, bf16 with dropout: the
 * stream split over tp 4 by rows, so each rank's 8 rows are half a sample
 * (its dropout masks start inside one), NCCL's all-gathers and
 * reduce-scatters (late mode) where the all-reduces were, the LayerNorms'
 * gradients summed over tp; the losses follow one CPU device as tp 2 x pp 2
 * x dp 2's do. */
static int test_bf16_sequence_parallel_on_gpus_follows_one_cpu(void) {
  enum { N = 2 };
  static rank_log cpu[1], gpu[4];
  layout l = {
      .kind = "cpu", .precision = "bf16", .steps = N, .tp = 1, .pp = 1, .dp = 1, .dropout = 0.1f};
  REQUIRE(!run(&l, cpu), "cpu: %s", mt_errmsg());
  layout g = {.kind = "cuda",
              .precision = "bf16",
              .steps = N,
              .tp = 4,
              .pp = 1,
              .dp = 1,
              .dropout = 0.1f,
              .seq_par = 1};
  REQUIRE(!run(&g, gpu), "cuda tp4 sequence-parallel: %s", mt_errmsg());
  for (int w = 0; w < 4; w++) {
    double r = worst_rel(&gpu[w], cpu, 0, N);
    CHECK(gpu[w].n == N && r < 1e-4, "rank %d: %d steps, worst loss rel %.2e vs one cpu", w,
          gpu[w].n, r);
  }
  printf("  bf16 tp4 sequence-parallel with dropout on cuda:0-3 vs cpu:0: worst loss rel %.2e\n",
         worst_rel(&gpu[0], cpu, 0, N));
  return 0;
}

/* Pipeline receives posted an operation ahead on NCCL's in-order streams
 * (parallel.overlap_p2p, the default) give the blocking schedule's bits on
 * every rank: pp 4 over a 4-layer model, so the two middle stages post
 * ahead on both links, with dropout. Were both directions one NCCL group,
 * a send queued behind a receive posted ahead would wait for it, and the
 * neighbours would hold each other until the deadline. */
static int test_pp4_overlapped_p2p_on_gpus_matches_blocking(void) {
  enum { N = 2, PP = 4 };
  static rank_log ahead[PP], blocking[PP];
  layout l = {.kind = "cuda",
              .precision = "bf16",
              .steps = N,
              .tp = 1,
              .pp = PP,
              .dp = 1,
              .dropout = 0.1f,
              .n_layer = 4};
  REQUIRE(!run(&l, ahead), "overlapped: %s", mt_errmsg());
  l.blocking_p2p = 1;
  REQUIRE(!run(&l, blocking), "blocking: %s", mt_errmsg());
  for (int w = 0; w < PP; w++) {
    CHECK(ahead[w].n == N && blocking[w].n == N, "rank %d: %d and %d steps", w, ahead[w].n,
          blocking[w].n);
    for (int s = 0; s < N && s < ahead[w].n && s < blocking[w].n; s++)
      CHECK(ahead[w].loss[s] == blocking[w].loss[s], "rank %d step %d: loss %.9g vs %.9g", w, s + 1,
            ahead[w].loss[s], blocking[w].loss[s]);
  }
  printf("  bf16 pp4 on cuda:0-3: overlapped and blocking p2p, %d steps, losses equal (%.7f)\n", N,
         ahead[0].loss[N - 1]);
  return 0;
}

/* Interleaved 1F1B on GPUs: pp 2 x dp 2, each stage two one-layer chunks,
 * the last stage's chunk 0 feeding the first stage's chunk 1 over the
 * ring's NCCL pair, in bf16 with dropout; 4 micro-batches a replica, 2 pp,
 * so the schedule reaches its steady state (a forward and a backward in
 * turn, sends not yet waited for) and each chunk's last backward starts
 * its buckets. The losses are plain 1F1B's bit for bit (each tensor's
 * gradient sums the same micro-batches in the same order). (Blocking
 * receives are test_layouts' and test_pipe_schedule's: each run here
 * takes some 8 s of CPU.) */
static int test_bf16_interleaved_on_gpus_matches_plain_1f1b(void) {
  enum { N = 2, W = 4 };
  static rank_log plain[W], ahead[W];
  layout l = {.kind = "cuda",
              .precision = "bf16",
              .steps = N,
              .tp = 1,
              .pp = 2,
              .dp = 2,
              .dropout = 0.1f,
              .n_layer = 4,
              .global_batch = 16};
  REQUIRE(!run(&l, plain), "plain 1F1B: %s", mt_errmsg());
  l.virtual_stages = 2;
  REQUIRE(!run(&l, ahead), "interleaved: %s", mt_errmsg());
  for (int w = 0; w < W; w++) {
    CHECK(plain[w].n == N && ahead[w].n == N, "rank %d: %d and %d steps", w, plain[w].n,
          ahead[w].n);
    for (int s = 0; s < N && s < plain[w].n && s < ahead[w].n; s++)
      CHECK(ahead[w].loss[s] == plain[w].loss[s],
            "rank %d step %d: loss %.9g interleaved, %.9g plain", w, s + 1, ahead[w].loss[s],
            plain[w].loss[s]);
  }
  printf("  bf16 pp2 x dp2 of 2 virtual stages on cuda:0-3: the losses of plain 1F1B (%.7f)\n",
         ahead[0].loss[N - 1]);
  return 0;
}

/* A checkpoint written from GPU memory resumes bit for bit: 6 steps straight,
 * against 3 steps, a checkpoint, and a resumed run of the rest, under dp 2
 * (each rank's ZeRO slice staged through the host both ways). */
static int test_checkpoint_resume_on_gpus_is_exact(void) {
  enum { N = 6 };
  static rank_log full[2], first[2], rest[2];
  char dir_a[96], dir_b[96];
  snprintf(dir_a, sizeof dir_a, "%s.ckpt-a", data_path);
  snprintf(dir_b, sizeof dir_b, "%s.ckpt-b", data_path);
  layout l = {.kind = "cuda",
              .precision = "bf16",
              .steps = N,
              .tp = 1,
              .pp = 1,
              .dp = 2,
              .ckpt_dir = dir_a,
              .ckpt_interval = 100};
  REQUIRE(!run(&l, full), "straight run: %s", mt_errmsg());
  l.ckpt_dir = dir_b;
  l.steps = 3;
  REQUIRE(!run(&l, first), "first half: %s", mt_errmsg());
  l.steps = N; /* resumes from step 3's checkpoint, the end of the first run */
  REQUIRE(!run(&l, rest), "resumed: %s", mt_errmsg());
  CHECK(rest[0].n == N - 3, "the resumed run took %d steps, not %d", rest[0].n, N - 3);
  for (int s = 0; s < N - 3 && s < rest[0].n; s++)
    CHECK(rest[0].loss[s] == full[0].loss[s + 3], "step %d: resumed loss %.9g, straight %.9g",
          s + 4, rest[0].loss[s], full[0].loss[s + 3]);
  printf("  bf16 dp2 on cuda: resumed at step 3, steps 4-%d equal the straight run's bit for bit\n",
         N);
  char cmd[256];
  snprintf(cmd, sizeof cmd, "rm -rf '%s' '%s'", dir_a, dir_b);
  if (system(cmd)) fprintf(stderr, "warning: could not remove %s and %s\n", dir_a, dir_b);
  return 0;
}

/* Runs l and returns how many launches of kernel a step took, all ranks
 * together (l->steps of them), or -1 with the run's error: where a test
 * aims mt_emu_fail_launch. */
static long launches_per_step(const layout *l, const char *kernel, rank_log *logs) {
  long n0 = mt_emu_launch_count(kernel);
  if (run(l, logs)) return -1;
  return (mt_emu_launch_count(kernel) - n0) / l->steps;
}

/* A kernel that faults mid-step (the emulator fails one launch of the
 * LayerNorm forward in step 2 on one of two dp ranks) fails that step on
 * both ranks, with the fault named on its rank and the other told why, and
 * neither applies the update: step 1 is the last either reports. A fault in
 * the update itself (AdamW's kernel, on one of two ranks, which may then
 * have sent the other a stale slice) fails the step on both too. Before,
 * the sync at the step's end dropped the error, and training went on. */
static int test_device_fault_fails_the_step_on_every_rank(void) {
  static rank_log logs[2];
  layout l = {.kind = "cuda", .precision = "bf16", .steps = 1, .tp = 1, .pp = 1, .dp = 2};
  long per_step = launches_per_step(&l, "k_layernorm_fwd", logs); /* both ranks */
  REQUIRE(per_step >= 0, "one step: %s", mt_errmsg());
  REQUIRE(per_step >= 4, "%ld LayerNorm forwards in a step of 2 ranks", per_step);
  l.steps = 3;
  mt_emu_fail_launch("k_layernorm_fwd", per_step + per_step / 2);
  int rc = run(&l, logs);
  mt_emu_fail_launch("k_layernorm_fwd", 0);
  int named = 0, told = 0;
  for (int w = 0; w < 2; w++) {
    char want[64]; /* what rank w says when rank 1 - w faulted */
    snprintf(want, sizeof want, "the device of world rank %d failed; no update applied", 1 - w);
    named += strstr(logs[w].err, "cudaErrorLaunchFailure") != NULL;
    told += strstr(logs[1 - w].err, "cudaErrorLaunchFailure") && strstr(logs[w].err, want);
  }
  CHECK(rc && logs[0].n == 1 && logs[1].n == 1 && named == 1 && told == 1,
        "fault in step 2: rc %d, steps reported %d and %d; rank 0: %s; rank 1: %s", rc, logs[0].n,
        logs[1].n, logs[0].err, logs[1].err);
  printf("  a LayerNorm fault in step 2 of dp 2: steps reported %d and %d\n    rank 0: %s\n"
         "    rank 1: %s\n",
         logs[0].n, logs[1].n, logs[0].err, logs[1].err);

  layout u = {.kind = "cuda", .precision = "fp32", .steps = 3, .tp = 1, .pp = 1, .dp = 2};
  long adam_per_step = launches_per_step(&u, "k_adamw_multi", logs); /* both ranks */
  REQUIRE(adam_per_step >= 0, "three steps: %s", mt_errmsg());
  REQUIRE(adam_per_step >= 2, "%ld AdamW launches in a step of 2 ranks", adam_per_step);
  mt_emu_fail_launch("k_adamw_multi", adam_per_step + 1); /* step 2's first, on either rank */
  rc = run(&u, logs);
  mt_emu_fail_launch("k_adamw_multi", 0);
  named = told = 0;
  for (int w = 0; w < 2; w++) {
    named += strstr(logs[w].err, "step 2: the update: ") &&
             strstr(logs[w].err, "cudaErrorLaunchFailure");
    char want[64];
    snprintf(want, sizeof want, "step 2: the device of world rank %d failed in the update", 1 - w);
    told += strstr(logs[1 - w].err, "cudaErrorLaunchFailure") && strstr(logs[w].err, want);
  }
  CHECK(rc && logs[0].n == 1 && logs[1].n == 1 && named == 1 && told == 1,
        "fault in step 2's update: rc %d, steps reported %d and %d; rank 0: %s; rank 1: %s", rc,
        logs[0].n, logs[1].n, logs[0].err, logs[1].err);
  printf("  an AdamW fault in step 2 of dp 2:\n    rank 0: %s\n    rank 1: %s\n", logs[0].err,
         logs[1].err);
  return 0;
}

/* train.timing_log_level 2 on GPUs: the timers wait for the devices at
 * every op (mt_device_wait) and change nothing, the losses of tp 2 x pp 2 x
 * dp 2 in bf16 with dropout are those of the run without them, bit for bit,
 * and every rank has the pieces; a fault in a step still fails it on every
 * rank, the waits leaving it to the step's own sync. The faulting rank
 * names its device even when the vote that tells the other is cut short
 * under it (test_a_fault_is_named_when_the_generation_ends_in_the_vote
 * makes that happen every run; here it did under load by chance). */
static int test_timers_on_gpus_change_nothing_and_leave_faults_to_the_step(void) {
  enum { N = 2 };
  static rank_log plain[8], timed[8];
  layout l = {
      .kind = "cuda", .precision = "bf16", .steps = N, .tp = 2, .pp = 2, .dp = 2, .dropout = 0.1f};
  REQUIRE(!run(&l, plain), "without timers: %s", mt_errmsg());
  l.timing = 2;
  REQUIRE(!run(&l, timed), "timing_log_level 2: %s", mt_errmsg());
  int same = 1, timed_all = 1;
  static const int pieces[] = {MT_TM_FORWARD_BACKWARD, MT_TM_FWD_LINEAR,    MT_TM_FWD_ATTENTION,
                               MT_TM_BWD_LINEAR,       MT_TM_BWD_ATTENTION, MT_TM_FWD_TP_COMM,
                               MT_TM_BWD_TP_COMM,      MT_TM_FWD_HEAD,      MT_TM_PIPELINE_WAIT};
  for (int w = 0; w < 8; w++) {
    same &= timed[w].n == N && plain[w].n == N;
    for (int s = 0; s < N && same; s++)
      same &=
          timed[w].loss[s] == plain[w].loss[s] && timed[w].grad_norm[s] == plain[w].grad_norm[s];
    timed_all &= timed[w].timing_level == 2 && plain[w].timing_level == 0;
    for (size_t k = 0; k < sizeof pieces / sizeof *pieces; k++)
      timed_all &= timed[w].timer_max[pieces[k]] > 0.0;
  }
  CHECK(same,
        "the losses or norms with timers differ from those without (rank 0: %.9g against %.9g)",
        timed[0].loss[N - 1], plain[0].loss[N - 1]);
  CHECK(timed_all, "a rank lacks a timer (rank 0: forward-backward %.3f, attention %.3f ms)",
        timed[0].timer_max[MT_TM_FORWARD_BACKWARD], timed[0].timer_max[MT_TM_FWD_ATTENTION]);
  printf("  bf16 tp2 pp2 dp2 with timers: the same losses; forward-backward %.1f ms, "
         "attention %.3f + %.3f ms (emulated)\n",
         timed[0].timer_max[MT_TM_FORWARD_BACKWARD], timed[0].timer_max[MT_TM_FWD_ATTENTION],
         timed[0].timer_max[MT_TM_BWD_ATTENTION]);

  static rank_log logs[2];
  layout f = {
      .kind = "cuda", .precision = "bf16", .steps = 1, .tp = 1, .pp = 1, .dp = 2, .timing = 2};
  long per_step = launches_per_step(&f, "k_layernorm_fwd", logs);
  REQUIRE(per_step >= 0, "one step: %s", mt_errmsg());
  f.steps = 3;
  mt_emu_fail_launch("k_layernorm_fwd", per_step + per_step / 2);
  int rc = run(&f, logs);
  mt_emu_fail_launch("k_layernorm_fwd", 0);
  int named = 0;
  for (int w = 0; w < 2; w++) named += strstr(logs[w].err, "cudaErrorLaunchFailure") != NULL;
  CHECK(rc && logs[0].n == 1 && logs[1].n == 1 && named == 1,
        "fault in step 2 under timers: rc %d, steps reported %d and %d; rank 0: %s; rank 1: %s", rc,
        logs[0].n, logs[1].n, logs[0].err, logs[1].err);
  printf("  a LayerNorm fault in step 2 under timers:\n    rank 0: %s\n    rank 1: %s\n",
         logs[0].err, logs[1].err);
  return 0;
}

/* train.profile: the CUDA profiler's capture runs on the listed ranks'
 * GPUs alone, from after step_start to after step_end (Megatron's), and is
 * off once the run ends, also when it ends inside the window: on rank 1 of
 * dp 2, a window of steps 2 and 3 takes twice the launches of a window of
 * step 2, rank 0 takes none, and neither changes a loss. */
static int test_profile_captures_the_listed_ranks_steps(void) {
  static rank_log plain[2], one[2], two[2], cut[2];
  layout l = {.kind = "cuda", .precision = "bf16", .steps = 4, .tp = 1, .pp = 1, .dp = 2};
  REQUIRE(!run(&l, plain), "without train.profile: %s", mt_errmsg());
  long d0 = mt_emu_profiled_launches(0), d1 = mt_emu_profiled_launches(1);
  l.profile = "{\"step_start\":1,\"step_end\":2,\"ranks\":[1]}";
  REQUIRE(!run(&l, one), "steps 2 to 2: %s", mt_errmsg());
  long step = mt_emu_profiled_launches(1) - d1;
  l.profile = "{\"step_start\":1,\"step_end\":3,\"ranks\":[1]}";
  REQUIRE(!run(&l, two), "steps 2 to 3: %s", mt_errmsg());
  long steps = mt_emu_profiled_launches(1) - d1 - step;
  CHECK(step > 0 && steps == 2 * step && mt_emu_profiled_launches(0) == d0,
        "launches captured: step 2 %ld, steps 2-3 %ld (want twice), on rank 0 %ld (want 0)", step,
        steps, mt_emu_profiled_launches(0) - d0);
  l.profile = "{\"step_start\":2,\"step_end\":9,\"ranks\":[0,1]}";
  REQUIRE(!run(&l, cut), "steps 3 to 9 of 4: %s", mt_errmsg());
  CHECK(!mt_emu_profiler_on(0) && !mt_emu_profiler_on(1),
        "a capture the run ended in is stopped: on %d and %d", mt_emu_profiler_on(0),
        mt_emu_profiler_on(1));
  int same = 1;
  for (int w = 0; w < 2; w++)
    for (int s = 0; s < 4; s++)
      same &= one[w].loss[s] == plain[w].loss[s] && two[w].loss[s] == plain[w].loss[s] &&
              cut[w].loss[s] == plain[w].loss[s];
  CHECK(same, "train.profile changed a loss");
  printf("  rank 1's GPU captured %ld launches for step 2, %ld for steps 2 and 3; rank 0's none\n",
         step, steps);
  return 0;
}

/* model.attention_backend: a bf16 job on one emulated GPU runs its
 * attention by the flash kernels (the default, and "flash") or by the
 * chunked 16-bit GEMMs ("chunked") and no launch of the other, and both
 * follow the CPU within bf16's rounding. */
static int test_attention_backend_picks_the_gpus_path(void) {
  enum { N = 2 };
  static rank_log cpu[1], gpu[1];
  layout l = {.kind = "cpu", .precision = "bf16", .steps = N, .tp = 1, .pp = 1, .dp = 1};
  REQUIRE(!run(&l, cpu), "cpu: %s", mt_errmsg());
  const char *backends[] = {NULL, "flash", "chunked"};
  for (int b = 0; b < 3; b++) {
    l.kind = "cuda", l.attention = backends[b];
    long flash0 = mt_emu_launch_count("flash_fwd"), chunk0 = mt_emu_launch_count("k_att16_softmax");
    REQUIRE(!run(&l, gpu), "cuda, attention_backend %s: %s", backends[b] ? backends[b] : "unset",
            mt_errmsg());
    long flash = mt_emu_launch_count("flash_fwd") - flash0,
         chunked = mt_emu_launch_count("k_att16_softmax") - chunk0;
    double w = worst_rel(gpu, cpu, 0, N);
    int want_chunked = b == 2;
    CHECK(gpu[0].n == N && w < 2e-2 &&
              (want_chunked ? chunked > 0 && !flash : flash > 0 && !chunked),
          "attention_backend %s: %ld flash and %ld chunked launches; worst loss rel %.2e vs cpu",
          backends[b] ? backends[b] : "unset", flash, chunked, w);
    printf("  attention_backend %s: %ld flash forwards, %ld chunked softmaxes; loss rel %.2e\n",
           backends[b] ? backends[b] : "unset", flash, chunked, w);
  }
  return 0;
}

/* The emulator's hook on the faulting rank's first sync after its fault:
 * ends that rank's generation there, as its node would. */
static void end_the_faulting_ranks_generation(int dev, void *arg) {
  (void)arg;
  mt_local *l =
      dev >= 0 && dev < MAX_RANKS ? __atomic_load_n(&rank_runs_live[dev], __ATOMIC_ACQUIRE) : NULL;
  if (l) mt_local_abort(l);
}

/* Runs 3 steps of bf16 dp 2 on emulated GPUs with the first launch of
 * `kernel` in step 2 failing (in_validation: in the validation pass after
 * step 1) on whichever rank launches it first, and that rank's generation
 * ended (its groups aborted) at its first sync after the fault, as its
 * node ends it once another rank failed. Checks that the run failed after
 * step 1 on both ranks (step 1 reported, even when its validation failed)
 * and that the faulting rank's message names the fault (after `fault`)
 * before what then failed under it (`then`, and after it "aborted"). */
static int fault_then_generation_ended(const char *kernel, const char *fault, const char *then,
                                       int in_validation) {
  static rank_log logs[2];
  layout l = {.kind = "cuda", .precision = "bf16", .steps = 1, .tp = 1, .pp = 1, .dp = 2};
  long per_step = launches_per_step(&l, kernel, logs);
  REQUIRE(per_step >= 0, "one step: %s", mt_errmsg());
  REQUIRE(per_step >= 2, "%ld launches of %s in a step of 2 ranks", per_step, kernel);
  l.steps = 3, l.eval = in_validation;
  mt_emu_on_fault_sync(end_the_faulting_ranks_generation, NULL);
  /* step 2's first, on either rank; with validation, the first of the
   * validation after step 1 (both ranks' training launches of step 1 come
   * before its vote, and its update launches no LayerNorm) */
  mt_emu_fail_launch(kernel, per_step + 1);
  int rc = run(&l, logs);
  mt_emu_fail_launch(kernel, 0);
  mt_emu_on_fault_sync(NULL, NULL);
  int faulted = -1;
  for (int w = 0; w < 2; w++)
    if (strstr(logs[w].err, "cudaErrorLaunchFailure")) faulted = faulted < 0 ? w : 2;
  const char *e = faulted == 0 || faulted == 1 ? logs[faulted].err : "";
  const char *f = strstr(e, fault), *t = strstr(e, then);
  CHECK(rc && logs[0].n == 1 && logs[1].n == 1 && f && t && f < t && strstr(t, "aborted"),
        "%s faulted, then the generation ended: rc %d, steps reported %d and %d; rank 0: %s; "
        "rank 1: %s",
        kernel, rc, logs[0].n, logs[1].n, logs[0].err, logs[1].err);
  printf("  %s faulted in %s, then the generation ended:\n    rank 0: %s\n    rank 1: %s\n", kernel,
         in_validation ? "validation" : "step 2", logs[0].err, logs[1].err);
  return 0;
}

/* A rank whose device faulted (the gradient norm's kernel failed), and
 * whose generation ends under it before the vote that would tell the
 * others (as when the healthy rank, done with that vote first, failed and
 * its node aborted the rest), still names its device's fault first and the
 * vote's failure after. Before, it said only "loss and norm all-reduce:
 * ...: aborted", which CI met once by chance. The gradient norm's kernel is
 * the last before the step's sync, after the dp reduction, so the hook (at
 * the norm's copy to the host) ends the generation between the fault and
 * the vote and nowhere else. */
static int test_a_fault_is_named_when_the_generation_ends_in_the_vote(void) {
  return fault_then_generation_ended(
      "k_sumsq_part", "step 2: device cuda:", "; then the loss and norm all-reduce: ", 0);
}

/* The same when the generation ends under the faulting rank earlier in
 * the step, before its sync: a LayerNorm forward fails, the hook ends the
 * generation at the loss's copy to the host, and the backward's bucket
 * reduce over dp fails "aborted". The failing rank asks its device for a
 * fault without waiting (mt_device_fault_pending) and names it first, then
 * the step's failure. Before, it said only the reduce's error. */
static int test_a_fault_is_named_when_the_generation_ends_before_the_sync(void) {
  return fault_then_generation_ended("k_layernorm_fwd", "): device cuda:",
                                     "cudaErrorLaunchFailure; then step 2, pipeline stage 0: ", 0);
}

/* And in validation, whose vote tells a device's fault as a step's does:
 * the faulting rank's generation ends at the validation loss's copy to
 * the host, its vote fails "aborted", and its device's fault comes first.
 * Before, it said only "validation: comm world: allreduce ...: aborted". */
static int test_a_fault_is_named_when_the_generation_ends_in_validation(void) {
  return fault_then_generation_ended("k_layernorm_fwd", "validation: step 1: device cuda:",
                                     "; then the validation all-reduce: ", 1);
}

/* mt_device_lost, which a node asks after its ranks failed: a GPU whose
 * context a fault corrupted (every later sync answers it) is lost, its
 * neighbours and CPU devices are not, and a device found again is not.
 * And mt_device_fault_pending, which a failing step asks. */
static int test_a_device_lost_to_a_fault_is_found(void) {
  char why[256];
  CHECK(!mt_device_lost("cuda:3", why, sizeof why) && !why[0], "cuda:3 lost before any fault: %s",
        why);
  mt_emu_lose_device(3, cudaErrorIllegalAddress);
  int lost = mt_device_lost("cuda:3", why, sizeof why);
  CHECK(lost && strstr(why, "cudaErrorIllegalAddress"), "cuda:3 after an illegal address: %d, %s",
        lost, why);
  printf("  cuda:3 after an illegal address: lost (%s)\n", why);
  CHECK(!mt_device_lost("cuda:2", why, sizeof why), "cuda:2 lost beside cuda:3: %s", why);
  CHECK(!mt_device_lost("cpu:0", why, sizeof why), "cpu:0 lost");
  CHECK(!mt_device_lost("cuda:99", why, sizeof why), "cuda:99, no such device, lost");
  mt_emu_lose_device(3, cudaSuccess);
  CHECK(!mt_device_lost("cuda:3", why, sizeof why), "cuda:3 found again still lost: %s", why);

  /* an open device asked for a pending fault without waiting: none on a
   * GPU that answers; its context's fault once it is lost, which the next
   * sync still reports, once; none on a CPU device */
  mt_device g, cpu;
  REQUIRE(!mt_device_open(&g, "cuda:3"), "open cuda:3: %s", mt_errmsg());
  CHECK(!mt_device_fault_pending(&g, why, sizeof why), "cuda:3 answers, yet a fault: %s", why);
  mt_emu_lose_device(3, cudaErrorIllegalAddress);
  why[0] = 0;
  int pending = mt_device_fault_pending(&g, why, sizeof why);
  CHECK(pending && strstr(why, "cudaErrorIllegalAddress") && strstr(why, "cuda:3"),
        "lost cuda:3: pending %d (%s)", pending, why);
  mt_emu_lose_device(3, cudaSuccess);
  int rc = mt_device_sync(&g);
  CHECK(rc && strstr(mt_errmsg(), "cudaErrorIllegalAddress"),
        "the sync after the query: rc %d (%s)", rc, mt_errmsg());
  CHECK(!mt_device_fault_pending(&g, why, sizeof why) && !mt_device_sync(&g),
        "cuda:3 found again after its fault was told: %s", why);
  /* a context that stays lost answers every call with its fault: once a
   * sync told it, it is not pending again */
  mt_emu_lose_device(3, cudaErrorIllegalAddress);
  rc = mt_device_sync(&g);
  CHECK(rc && strstr(mt_errmsg(), "cudaErrorIllegalAddress"), "the sync of a lost cuda:3: rc %d",
        rc);
  CHECK(!mt_device_fault_pending(&g, why, sizeof why), "lost cuda:3's fault pending again: %s",
        why);
  mt_emu_lose_device(3, cudaSuccess);
  mt_device_close(&g);
  REQUIRE(!mt_device_open(&cpu, "cpu:0"), "open cpu:0: %s", mt_errmsg());
  CHECK(!mt_device_fault_pending(&cpu, why, sizeof why), "cpu:0 has a fault: %s", why);
  mt_device_close(&cpu);
  return 0;
}

/* Whether each of the first `ranks` GPU ranks logged `steps` steps whose
 * losses are within loss_tol (relative) of one CPU device's, and with
 * norm_tol >= 0 their gradient norms within it; the worst of each come
 * back for the test's summary line. */
static void ranks_follow_cpu(const rank_log *gpu, int ranks, const rank_log *cpu, int steps,
                             double loss_tol, double norm_tol, const char *what, double *worst,
                             double *worst_norm) {
  *worst = *worst_norm = 0.0;
  for (int w = 0; w < ranks; w++) {
    double r = worst_rel(&gpu[w], cpu, 0, steps);
    double nr = norm_tol >= 0 ? rank_runs_worst_norm_rel(&gpu[w], cpu, 0, steps) : 0.0;
    CHECK(gpu[w].n == steps && r < loss_tol && (norm_tol < 0 || nr < norm_tol),
          "%s rank %d: %d steps, worst loss rel %.2e, gradient norm rel %.2e vs one cpu", what, w,
          gpu[w].n, r, nr);
    if (r > *worst) *worst = r;
    if (nr > *worst_norm) *worst_norm = nr;
  }
}

/* Untied embeddings (model.untie_embeddings) in bf16 on eight emulated
 * GPUs: the last stage's lm_head (its 16-bit working copy, vocabulary-split
 * over tp, reduced over dp in the buckets with no tied all-reduce and no
 * embed group) follows one CPU device's untied run as the tied model's
 * tp 2 x pp 2 x dp 2 does, gradient norms included (each tensor counted
 * once, lm_head on the last stage). */
static int test_bf16_untied_3d_layout_on_gpus_follows_one_cpu(void) {
  enum { N = 4 };
  static rank_log cpu[1], gpu[MAX_RANKS];
  layout l = {
      .kind = "cpu", .precision = "bf16", .steps = N, .tp = 1, .pp = 1, .dp = 1, .untie = 1};
  REQUIRE(!run(&l, cpu), "cpu: %s", mt_errmsg());
  layout g = {.kind = "cuda",
              .precision = "bf16",
              .steps = N,
              .tp = 2,
              .pp = 2,
              .dp = 2,
              .bucket_size = 3000,
              .untie = 1};
  int rc = run(&g, gpu);
  CHECK(!rc, "cuda untied tp2 pp2 dp2: %s", mt_errmsg());
  if (rc) return 0;
  double worst, worst_norm;
  ranks_follow_cpu(gpu, MAX_RANKS, cpu, N, 1e-4, 2e-3, "untied", &worst, &worst_norm);
  printf("  bf16 untied tp2 pp2 dp2 on cuda:0-7 vs cpu:0: worst loss rel %.2e, gradient norm rel "
         "%.2e\n",
         worst, worst_norm);
  return 0;
}

/* Documents inside the samples (data.reset_position_ids and
 * reset_attention_mask) in bf16 on six emulated GPUs, tp 2 x pp 3 with a
 * middle stage that reads the tokens for the starts alone: the position
 * lookup, the flash kernels' skipped and masked key tiles and the starts
 * uploaded on every stage follow one CPU device's run with the documents,
 * which itself is far from the run without them (the keys do something
 * here). */
static int test_bf16_documents_on_gpus_follow_one_cpu(void) {
  enum { N = 4 };
  static rank_log cpu[1], plain[1], gpu[MAX_RANKS];
  layout l = {.kind = "cpu",
              .precision = "bf16",
              .steps = N,
              .tp = 1,
              .pp = 1,
              .dp = 1,
              .n_layer = 3,
              .docs = 1};
  REQUIRE(!run(&l, cpu), "cpu: %s", mt_errmsg());
  l.docs = 0;
  REQUIRE(!run(&l, plain), "cpu without documents: %s", mt_errmsg());
  layout g = {.kind = "cuda",
              .precision = "bf16",
              .steps = N,
              .tp = 2,
              .pp = 3,
              .dp = 1,
              .n_layer = 3,
              .docs = 1};
  int rc = run(&g, gpu);
  CHECK(!rc, "cuda documents tp2 pp3: %s", mt_errmsg());
  if (rc) return 0;
  double worst, unused, apart = worst_rel(cpu, plain, 0, N);
  ranks_follow_cpu(gpu, 6, cpu, N, 1e-4, -1.0, "documents", &worst, &unused);
  CHECK(apart > 1e-3, "the documents moved the cpu's losses only %.2e", apart);
  printf("  bf16 documents tp2 pp3 on cuda:0-5 vs cpu:0: worst loss rel %.2e (%.2e without "
         "the documents)\n",
         worst, apart);
  /* the same with attention as chunked 16-bit GEMMs (MTNLG_ATTENTION,
   * read as each device opens) */
  long rows0 = mt_emu_launch_count("k_att16_softmax_bwd"),
       flash0 = mt_emu_launch_count("flash_fwd");
  setenv("MTNLG_ATTENTION", "chunked", 1);
  rc = run(&g, gpu);
  unsetenv("MTNLG_ATTENTION");
  CHECK(!rc, "cuda documents tp2 pp3, chunked attention: %s", mt_errmsg());
  if (rc) return 0;
  CHECK(mt_emu_launch_count("k_att16_softmax_bwd") > rows0 &&
            mt_emu_launch_count("flash_fwd") == flash0,
        "chunked attention: %ld backward row kernels, %ld flash forwards",
        mt_emu_launch_count("k_att16_softmax_bwd") - rows0,
        mt_emu_launch_count("flash_fwd") - flash0);
  ranks_follow_cpu(gpu, 6, cpu, N, 1e-4, -1.0, "documents, chunked attention", &worst, &unused);
  printf("  the same with MTNLG_ATTENTION=chunked: worst loss rel %.2e\n", worst);
  return 0;
}

/* Arguments, if any, pick the tests whose names contain one of them. */
int main(int argc, char **argv) {
  setenv("MT_CUDA_EMU_DEVICES", "8", 1);
  if (mt_device_count("cuda") < 8) {
    fprintf(stderr, "the emulator offers %d CUDA devices, not 8\n", mt_device_count("cuda"));
    return 1;
  }
  if (rank_runs_token_file(data_path, "/tmp/mtnlg-engine-emu-XXXXXX")) return 1;
  {
    uint16_t t[20000];
    for (int i = 0; i < 20000; i++) t[i] = i % 5 == 4 ? 0 : (uint16_t)(1 + (i * 7 + i / 13) % 255);
    snprintf(docs_path, sizeof docs_path, "/tmp/mtnlg-engine-emu-docs-XXXXXX");
    int fd = mkstemp(docs_path);
    int ok = fd >= 0 && write(fd, t, sizeof t) == (ssize_t)sizeof t;
    if (fd >= 0) close(fd);
    if (!ok) return fprintf(stderr, "cannot write %s\n", docs_path), 1;
  }
  {
    /* a validation set: the training tokens, 40 documents of 500 */
    uint16_t t[20000];
    int32_t ids[500];
    int fd = open(data_path, O_RDONLY);
    int ok = fd >= 0 && read(fd, t, sizeof t) == (ssize_t)sizeof t;
    if (fd >= 0) close(fd);
    /* in a directory of its own: validation caches its sample index
     * (<prefix>.<hash>.gptidx) beside the data, and the directory goes whole */
    snprintf(valid_dir, sizeof valid_dir, "/tmp/mtnlg-engine-emu-valid-XXXXXX");
    if (!mkdtemp(valid_dir)) return fprintf(stderr, "mkdtemp: %s\n", strerror(errno)), 1;
    snprintf(valid_prefix, sizeof valid_prefix, "%s/valid", valid_dir);
    mt_indexed_writer *w = NULL;
    ok = ok && !mt_indexed_writer_open(&w, valid_prefix, MT_IDX_U16);
    for (int d = 0; ok && d < 40; d++) {
      for (int i = 0; i < 500; i++) ids[i] = t[d * 500 + i];
      ok = !mt_indexed_writer_add_seq(w, ids, 500) && !mt_indexed_writer_end_doc(w);
    }
    if (w && !ok) mt_indexed_writer_abort(w);
    if (!ok || mt_indexed_writer_finish(w))
      return fprintf(stderr, "cannot write %s: %s\n", valid_prefix, mt_errmsg()), 1;
  }
  mt_emu_nccl_late(1);
  struct {
    const char *name;
    int (*fn)(void);
  } tests[] = {
      {"test_fp32_one_gpu_matches_cpu", test_fp32_one_gpu_matches_cpu},
      {"test_bf16_one_gpu_follows_cpu", test_bf16_one_gpu_follows_cpu},
      {"test_fp16_overflow_skips_like_cpu", test_fp16_overflow_skips_like_cpu},
      {"test_3d_layout_on_gpus_matches_one_cpu", test_3d_layout_on_gpus_matches_one_cpu},
      {"test_bf16_3d_layout_on_gpus_follows_one_cpu", test_bf16_3d_layout_on_gpus_follows_one_cpu},
      {"test_bf16_sequence_parallel_on_gpus_follows_one_cpu",
       test_bf16_sequence_parallel_on_gpus_follows_one_cpu},
      {"test_checkpoint_resume_on_gpus_is_exact", test_checkpoint_resume_on_gpus_is_exact},
      {"test_bf16_untied_3d_layout_on_gpus_follows_one_cpu",
       test_bf16_untied_3d_layout_on_gpus_follows_one_cpu},
      {"test_bf16_documents_on_gpus_follow_one_cpu", test_bf16_documents_on_gpus_follow_one_cpu},
      {"test_pp4_overlapped_p2p_on_gpus_matches_blocking",
       test_pp4_overlapped_p2p_on_gpus_matches_blocking},
      {"test_bf16_interleaved_on_gpus_matches_plain_1f1b",
       test_bf16_interleaved_on_gpus_matches_plain_1f1b},
      {"test_device_fault_fails_the_step_on_every_rank",
       test_device_fault_fails_the_step_on_every_rank},
      {"test_a_fault_is_named_when_the_generation_ends_in_the_vote",
       test_a_fault_is_named_when_the_generation_ends_in_the_vote},
      {"test_a_fault_is_named_when_the_generation_ends_before_the_sync",
       test_a_fault_is_named_when_the_generation_ends_before_the_sync},
      {"test_a_fault_is_named_when_the_generation_ends_in_validation",
       test_a_fault_is_named_when_the_generation_ends_in_validation},
      {"test_a_device_lost_to_a_fault_is_found", test_a_device_lost_to_a_fault_is_found},
      {"test_timers_on_gpus_change_nothing_and_leave_faults_to_the_step",
       test_timers_on_gpus_change_nothing_and_leave_faults_to_the_step},
      {"test_attention_backend_picks_the_gpus_path", test_attention_backend_picks_the_gpus_path},
      {"test_profile_captures_the_listed_ranks_steps",
       test_profile_captures_the_listed_ranks_steps},
  };
  for (size_t i = 0; i < sizeof tests / sizeof *tests; i++) {
    int run = argc < 2;
    for (int a = 1; a < argc; a++) run |= strstr(tests[i].name, argv[a]) != NULL;
    if (!run) continue;
    int before = failures;
    int rc = tests[i].fn();
    printf("%s %s\n", rc || failures > before ? "FAIL" : "ok", tests[i].name);
    fflush(stdout);
    failures += rc;
  }
  unlink(data_path);
  unlink(docs_path);
  char cmd[96];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", valid_dir);
  if (system(cmd)) fprintf(stderr, "warning: could not remove %s\n", valid_dir);
  return failures ? 1 : 0;
}
