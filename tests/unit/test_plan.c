/* test_plan.c — the plan: parameter counts under tp/pp sharding, ZeRO-1
 * optimizer bytes, activation memory with and without recomputation, FLOPs
 * against Narayanan et al. eq. 3 and the MT-NLG paper's 60 s step, and the
 * refusal of a job that does not fit. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "device.h"
#include "err.h"
#include "gpt.h"
#include "job.h"
#include "plan.h"

#ifndef MT_PRESET_DIR
#error "MT_PRESET_DIR must name etc/models"
#endif
#ifndef MT_JOB_DIR
#error "MT_JOB_DIR must name etc/jobs"
#endif

static int failures;

#define CHECK(cond)                                                                                \
  do {                                                                                             \
    if (!(cond)) {                                                                                 \
      fprintf(stderr, "%s:%d: %s: check failed: %s\n  errmsg: %s\n", __FILE__, __LINE__, __func__, \
              #cond, mt_errmsg());                                                                 \
      failures++;                                                                                  \
      return;                                                                                      \
    }                                                                                              \
  } while (0)

static const char *const presets[] = {MT_PRESET_DIR, NULL};

/* MT-NLG's A100s: 80 GB, 126 TFLOP/s achieved. */
static const mt_plan_device a100 = {.memory_bytes = 80e9, .tflops = 126};

static int load_530b(mt_job *job, const char *ov0, const char *ov1) {
  const char *ovs[3] = {ov0, ov0 ? ov1 : NULL, NULL};
  return mt_job_load_for_plan(job, MT_JOB_DIR "/mtnlg-530b.json", presets, ovs);
}

/* The tiny preset (h 64, 4 heads, 2 layers, seq 64, vocab 256) with overrides. */
static int load_tiny(mt_job *job, const char *ov0, const char *ov1) {
  static const char *json =
      "{\"model\": {\"preset\": \"tiny\"}, \"parallel\": {\"micro_batch\": 2},"
      " \"train\": {\"global_batch\": 16, \"steps\": 1,"
      "             \"lr\": {\"peak\": 1e-3}},"
      " \"data\": {\"path\": \"tokens.u16\"}}";
  const char *ovs[3] = {ov0, ov0 ? ov1 : NULL, NULL};
  return mt_job_parse(job, json, "/jobs", presets, ovs);
}

static double rel(double a, double b) { return fabs(a - b) / fabs(b); }

static void test_flops_match_narayanan_eq3(void) {
  mt_job job;
  mt_plan plan;
  CHECK(load_530b(&job, NULL, NULL) == MT_OK);
  CHECK(mt_plan_compute(&job, &a100, &plan) == MT_OK);
  /* by hand: B 1920, s 2048, l 105, h 20480, Vp 51200 (50257 padded to 128 * 8):
   * 96 B s l h^2 = 1.6624615812e19; (1 + s/6h + Vp/16lh) = 1 + 1/60 + 0.00148810 */
  CHECK(plan.padded_vocab == 51200);
  CHECK(rel(plan.executed_flops, 1.6624615812e19 * 1.0181547619) < 1e-9);
  CHECK(rel(plan.executed_flops, 1.69e19) < 0.002);
  /* model FLOPs (MFU) leave the recomputed forward out: 72 instead of 96 on
   * the layers, the LM head's 6 B s h Vp the same */
  double layers96 = 1.6624615812e19 * (1 + 1 / 60.0), head = 6.0 * 1920 * 2048 * 20480 * 51200;
  CHECK(rel(plan.model_flops, layers96 * 0.75 + head) < 1e-9);
  CHECK(rel(plan.executed_flops, layers96 + head) < 1e-9);

  /* on one device the model FLOPs are the GPT module's own count, per micro-batch */
  CHECK(load_tiny(&job, NULL, NULL) == MT_OK);
  CHECK(mt_plan_compute(&job, &a100, &plan) == MT_OK);
  const mt_model_spec *m = &job.model;
  mt_gpt_config cfg = {.n_layer = m->n_layer,
                       .n_embd = m->n_embd,
                       .n_head = m->n_head,
                       .vocab_size = m->vocab_size,
                       .padded_vocab = m->padded_vocab,
                       .max_seq = m->seq_len};
  double per_micro = mt_gpt_flops_per_step(&cfg, plan.micro_batch, m->seq_len);
  CHECK(plan.micro_batches == 8);
  CHECK(rel(plan.model_flops, plan.micro_batches * per_micro) < 1e-12);
  CHECK(plan.executed_flops == plan.model_flops); /* recompute is off */
  printf("  ok test_flops_match_narayanan_eq3\n");
}

static void test_530b_prediction_near_paper_60s_on_2240_gpus(void) {
  /* Smith et al. 2022: 60.1 s per iteration on 280 DGX nodes (2240 A100s,
   * tp 8 x pp 35 x dp 8) at 126 TFLOP/s per GPU */
  mt_job job;
  mt_plan plan;
  CHECK(load_530b(&job, NULL, NULL) == MT_OK);
  mt_plan_device dev = a100;
  dev.devices = 2240;
  CHECK(mt_plan_compute(&job, &dev, &plan) == MT_OK);
  CHECK(plan.tp == 8 && plan.pp == 35 && plan.dp == 8 && plan.micro_batches == 240);
  CHECK(rel(plan.step_s, 60.1) < 0.05);
  CHECK(fabs(plan.bubble_fraction - 34.0 / 274) < 1e-12);
  CHECK(rel(plan.step_with_bubble_s, plan.step_s * 274 / 240) < 1e-12);
  CHECK(rel(plan.tokens_per_s, 1920.0 * 2048 / plan.step_s) < 1e-12);

  /* the job's own 4480 GPUs (dp 16) halve the time at the same rate */
  mt_plan plan16;
  CHECK(mt_plan_compute(&job, &a100, &plan16) == MT_OK);
  CHECK(plan16.devices == 4480 && plan16.dp == 16);
  CHECK(rel(plan16.step_s, plan.step_s / 2) < 1e-12);
  /* efficiency scales the rate */
  dev.efficiency = 0.5;
  CHECK(mt_plan_compute(&job, &dev, &plan16) == MT_OK);
  CHECK(rel(plan16.step_s, 2 * plan.step_s) < 1e-12);
  printf("  ok test_530b_prediction_near_paper_60s_on_2240_gpus (%.2f s)\n", plan.step_s);
}

static void test_zero1_optimizer_bytes_scale_as_one_over_dp(void) {
  mt_job job;
  mt_plan p1, pd;
  CHECK(load_530b(&job, NULL, NULL) == MT_OK);
  mt_plan_device dev = a100;
  dev.devices = 280;
  CHECK(mt_plan_compute(&job, &dev, &p1) == MT_OK);
  /* mixed precision, dp 1: fp32 master + Adam m + v = 12 bytes per parameter */
  CHECK(p1.dp == 1 && p1.first.optimizer_bytes == 12 * p1.first.params);
  for (int dp = 2; dp <= 32; dp *= 2) {
    dev.devices = 280 * dp;
    CHECK(mt_plan_compute(&job, &dev, &pd) == MT_OK);
    CHECK(pd.dp == dp);
    const mt_plan_stage *a = &p1.first, *b = &pd.first;
    /* 1/dp up to the one element a ZeRO slice rounds up */
    CHECK(b->optimizer_params == (a->params + dp - 1) / dp);
    CHECK(llabs(b->optimizer_bytes * dp - a->optimizer_bytes) <= 12 * dp);
    /* weights and gradients are not sharded by ZeRO stage 1 */
    CHECK(b->weight_bytes == a->weight_bytes && b->grad_bytes == a->grad_bytes);
  }
  /* fp32: the weights are the masters; Adam m + v only */
  CHECK(load_tiny(&job, NULL, NULL) == MT_OK);
  CHECK(mt_plan_compute(&job, &a100, &p1) == MT_OK);
  CHECK(p1.first.optimizer_bytes == 8 * p1.first.params);
  CHECK(p1.first.weight_bytes == 4 * p1.first.params && p1.first.grad_bytes == 4 * p1.first.params);
  printf("  ok test_zero1_optimizer_bytes_scale_as_one_over_dp\n");
}

static void test_tp_shards_matrices_and_replicates_layernorm(void) {
  mt_job job;
  mt_plan p1, p2, p4;
  CHECK(load_tiny(&job, NULL, NULL) == MT_OK);
  CHECK(mt_plan_compute(&job, &a100, &p1) == MT_OK);
  CHECK(load_tiny(&job, "parallel.tp=2", NULL) == MT_OK);
  CHECK(mt_plan_compute(&job, &a100, &p2) == MT_OK);
  CHECK(load_tiny(&job, "parallel.tp=4", NULL) == MT_OK);
  CHECK(mt_plan_compute(&job, &a100, &p4) == MT_OK);
  int64_t h = 64, L = 2, s = 64;
  /* replicated on every tp rank: positions, per layer 2 LayerNorms (4h) and
   * the row-parallel biases of attn.c_proj and mlp.c_proj (2h), final LayerNorm */
  int64_t replicated = s * h + L * 6 * h + 2 * h;
  /* split: wte over the padded vocab, the four matrices, QKV and MLP-in biases */
  int64_t split1 = 256 * h + L * (12 * h * h + 7 * h);
  CHECK(p1.padded_vocab == 256 && p1.first.params == split1 + replicated);
  CHECK(p2.padded_vocab == 256 && p2.first.params == split1 / 2 + replicated);
  /* tp 4 pads the vocabulary to a multiple of 128 * 4 = 512 */
  CHECK(p4.padded_vocab == 512);
  CHECK(p4.first.params == 512 * h / 4 + L * (12 * h * h + 7 * h) / 4 + replicated);
  /* two ranks together hold every split element once, the replicated twice */
  CHECK(2 * p2.first.params - p1.first.params == replicated);
  /* the model itself does not change with tp (up to the vocabulary padding) */
  CHECK(p2.model_params == p1.model_params);
  printf("  ok test_tp_shards_matrices_and_replicates_layernorm\n");
}

static void test_pp_splits_layers_and_last_stage_holds_tied_head(void) {
  mt_job job;
  mt_plan p1, p2;
  CHECK(load_tiny(&job, NULL, NULL) == MT_OK);
  CHECK(mt_plan_compute(&job, &a100, &p1) == MT_OK);
  CHECK(load_tiny(&job, "parallel.pp=2", NULL) == MT_OK);
  CHECK(mt_plan_compute(&job, &a100, &p2) == MT_OK);
  int64_t h = 64;
  CHECK(p2.first.has_embedding && !p2.first.has_head && p2.last.has_head && !p2.last.has_embedding);
  CHECK(p2.first.n_layers == 1 && p2.last.first_layer == 1 && p2.last.n_layers == 1);
  /* the last stage keeps its own copy of the tied word embedding */
  CHECK(p2.first.params + p2.last.params == p1.first.params + 256 * h);
  CHECK(p2.last.logits_bytes == 2 * 64 * 256 * 4 && p2.first.logits_bytes == 0);

  /* uneven: 5 layers over 2 stages, the first stage takes the extra one
   * (the job validator refuses this today; the plan already counts it) */
  job.model.n_layer = 5;
  CHECK(mt_plan_compute(&job, &a100, &p2) == MT_OK);
  CHECK(p2.first.n_layers == 3 && p2.last.first_layer == 3 && p2.last.n_layers == 2);
  job.model.n_layer = 1;
  CHECK(mt_plan_compute(&job, &a100, &p2) == MT_EINVAL);
  CHECK(strstr(mt_errmsg(), "1 layers cannot fill pp = 2 stages") && !p2.computed);

  /* 1F1B: stage s holds min(pp - s, m) micro-batches */
  CHECK(load_530b(&job, NULL, NULL) == MT_OK);
  CHECK(mt_plan_compute(&job, &a100, &p1) == MT_OK);
  CHECK(p1.first.inflight == 35 && p1.last.inflight == 1);
  mt_plan_stage st;
  CHECK(mt_plan_stage_of(&job, &p1, 10, &st) == MT_OK && st.inflight == 25);
  CHECK(load_530b(&job, "train.global_batch=320", NULL) == MT_OK); /* m = 20 */
  CHECK(mt_plan_compute(&job, &a100, &p1) == MT_OK);
  CHECK(p1.micro_batches == 20 && p1.first.inflight == 20);
  printf("  ok test_pp_splits_layers_and_last_stage_holds_tied_head\n");
}

static void test_recompute_cuts_activation_memory(void) {
  mt_job job;
  mt_plan on, off;
  CHECK(load_530b(&job, NULL, NULL) == MT_OK);
  CHECK(job.parallel.recompute);
  CHECK(mt_plan_compute(&job, &a100, &on) == MT_OK);
  CHECK(load_530b(&job, "parallel.recompute=false", NULL) == MT_OK);
  /* with what it keeps it fits an A100 (Megatron's storage, 92.5 GB of
   * activations, does not) */
  CHECK(mt_plan_compute(&job, &a100, &off) == MT_OK);
  /* per layer and micro-batch, 16-bit, t = 8: s b h (4 + 16/8) = 6 sbh, plus
   * the fp32 log-sum-exp of each row (4 a s / 8); once per device the
   * working set, s b h (1 + 11/8) 16-bit values and s b h (7 + 4/8) fp32
   * ones, and attention's scratch: the flash backward's, (a/8) s fp32
   * values for each of the 8 samples a launch takes (the job leaves the
   * path to the devices: flash) */
  int64_t sbh = 2048LL * 20480, lse = 4 * 128 * 2048 / 8, full = 6 * sbh + lse;
  int64_t chunk = 16LL * 512 * 2048, flash = 8 * (128 / 8) * 2048 * 4;
  int64_t once = 2 * (sbh + sbh * 11 / 8) + 4 * (7 * sbh + sbh * 4 / 8) + flash;
  CHECK(off.first.activation_bytes == 35 * 3 * full + once);
  /* a job that may take the chunked path (chunked, or auto) adds the
   * chunked 16-bit GEMMs' scratch a GPU then makes (mt_att16_chunk: 16
   * heads of 512 query rows, their fp32 scores and products of dout, their
   * 16-bit probabilities and scores' gradient, dout's rows in 16 bits, and
   * fp32 dK and dV of 16 heads of 160 columns, 246 MB) */
  int64_t att16 = 4 * (3 * chunk + 16 * 512 * 160 / 2 + 2 * 16LL * 2048 * 160);
  static const char *const may_chunk[] = {"model.attention_backend=chunked",
                                          "model.attention_backend=auto"};
  for (int k = 0; k < 2; k++) {
    mt_plan chunked;
    CHECK(load_530b(&job, "parallel.recompute=false", may_chunk[k]) == MT_OK);
    CHECK(mt_plan_compute(&job, &a100, &chunked) == MT_OK);
    CHECK(chunked.first.activation_bytes == off.first.activation_bytes + att16);
  }
  CHECK(load_530b(&job, "parallel.recompute=false", "model.attention_backend=flash") == MT_OK);
  mt_plan flash_only;
  CHECK(mt_plan_compute(&job, &a100, &flash_only) == MT_OK);
  CHECK(flash_only.first.activation_bytes == off.first.activation_bytes);
  /* recomputation: each layer's input (2 sbh) and one layer's working set */
  CHECK(on.first.activation_bytes == 35 * 3 * 2 * sbh + full + once);
  CHECK(on.first.activation_bytes * 2 < off.first.activation_bytes);
  /* the price is the recomputed forward: 96 against 72 on the layers */
  CHECK(on.executed_flops > off.executed_flops && on.model_flops == off.model_flops);

  /* Megatron's block method: the first 2 of each stage's 3 layers
   * recompute, the third keeps its full set; the FLOPs between the two */
  mt_plan part;
  CHECK(load_530b(&job, "parallel.recompute_layers=2", NULL) == MT_OK);
  CHECK(mt_plan_compute(&job, &a100, &part) == MT_OK);
  CHECK(part.first.activation_bytes == 35 * (2 * 2 * sbh + full) + full + once);
  CHECK(fabs(part.recomputed - 70.0 / 105.0) < 1e-12);
  CHECK(part.executed_flops > off.executed_flops && part.executed_flops < on.executed_flops);
  double layers = 72.0 * 1920 * 2048 * 105 * 20480.0 * 20480 * (1 + 2048 / (6.0 * 20480));
  CHECK(fabs(part.executed_flops - off.executed_flops - layers * (2.0 / 3) / 3) <
        1e-9 * part.executed_flops);
  /* more layers than a stage holds: all of them, as recompute alone */
  CHECK(load_530b(&job, "parallel.recompute_layers=7", NULL) == MT_OK);
  CHECK(mt_plan_compute(&job, &a100, &part) == MT_OK);
  CHECK(part.first.activation_bytes == on.first.activation_bytes &&
        part.executed_flops == on.executed_flops);

  /* fp32 doubles the values; the log-sum-exp is fp32 either way */
  CHECK(load_530b(&job, "train.precision=fp32", "parallel.recompute=false") == MT_OK);
  CHECK(mt_plan_compute(&job, &a100, &off) == MT_EINVAL);
  once = 4 * (5 * sbh + sbh * 15 / 8) + 2LL * (128 / 8) * 2048 * 512 * 4;
  CHECK(off.first.activation_bytes == 35 * 3 * (sbh * 12 + lse) + once);
  printf("  ok test_recompute_cuts_activation_memory\n");
}

static void test_job_that_does_not_fit_is_refused_with_numbers(void) {
  mt_job job;
  mt_plan plan;
  CHECK(load_530b(&job, "parallel.recompute=false", "train.precision=fp32") == MT_OK);
  job.parallel.micro_batch = 2;
  CHECK(mt_plan_compute(&job, &a100, &plan) == MT_EINVAL);
  CHECK(plan.computed && !plan.fits && plan.worst.stage == 0);
  const char *msg = mt_errmsg();
  const char *want = "plan: stage 0 needs 126.6 GB per device (weights 8.2, grads 8.2, "
                     "optimizer 1.0, activations 108.2, logits 0.0, comm 0.9)";
  CHECK(!strncmp(msg, want, strlen(want)));
  CHECK(strstr(msg, "but the devices have 80.0 GB, 72.0 GB usable (90%)"));
  CHECK(strstr(msg, "parallel.recompute=true"));
  CHECK(!strchr(msg, '\n'));
  /* 141 GB devices (an H200) take it */
  mt_plan_device big = a100;
  big.memory_bytes = 141e9;
  CHECK(mt_plan_compute(&job, &big, &plan) == MT_OK && plan.fits);

  /* a layout that cannot be planned says why and computes nothing */
  mt_plan_device dev = a100;
  dev.devices = 1000;
  CHECK(mt_plan_compute(&job, &dev, &plan) == MT_EINVAL && !plan.computed);
  CHECK(strstr(mt_errmsg(), "1000 devices are not a positive multiple of tp * pp = 8 * 35 = 280"));
  dev.devices = 280 * 7;
  CHECK(mt_plan_compute(&job, &dev, &plan) == MT_EINVAL && !plan.computed);
  CHECK(strstr(mt_errmsg(), "train.global_batch: 1920 is not divisible by micro_batch * dp"));
  printf("  ok test_job_that_does_not_fit_is_refused_with_numbers\n");
}

/* The whole model of ms on one device, as the tests below build it. */
static mt_gpt_config config_of(const mt_model_spec *ms) {
  mt_gpt_config cfg = {.n_layer = ms->n_layer,
                       .n_embd = ms->n_embd,
                       .n_head = ms->n_head,
                       .vocab_size = ms->vocab_size,
                       .padded_vocab = ms->padded_vocab,
                       .max_seq = ms->seq_len,
                       .ln_eps = ms->ln_eps,
                       .init_std = ms->init_std};
  return cfg;
}

static void test_parameter_count_matches_model_table(void) {
  mt_job job;
  mt_plan plan;
  CHECK(load_tiny(&job, NULL, NULL) == MT_OK);
  CHECK(mt_plan_compute(&job, &a100, &plan) == MT_OK);
  const mt_model_spec *ms = &job.model;
  mt_gpt_config cfg = config_of(ms);
  mt_device dev;
  CHECK(mt_device_open(&dev, "cpu:0") == MT_OK);
  mt_gpt m;
  int rc = mt_gpt_create(&m, &cfg, &dev, 1, ms->seq_len);
  if (rc) mt_device_close(&dev);
  CHECK(rc == MT_OK);
  int64_t numel = 0;
  for (int i = 0; i < m.n_tensors; i++) numel += (int64_t)m.params_table[i].numel;
  mt_gpt_destroy(&m);
  mt_device_close(&dev);
  CHECK(plan.model_params == numel);
  CHECK(plan.first.params == numel); /* tp = pp = 1: one device holds all of it */

  /* GPT-2 small: 124,439,808 with its 50257 tokens, 36,096 more padded to 50304 */
  CHECK(mt_job_parse(&job,
                     "{\"model\": {\"preset\": \"gpt2-124m\"}, \"train\": {\"global_batch\": 8,"
                     " \"steps\": 1, \"lr\": {\"peak\": 1e-3}}, \"data\": {\"path\": \"t.u16\"}}",
                     "/jobs", presets, NULL) == MT_OK);
  CHECK(mt_plan_compute(&job, &a100, &plan) == MT_OK);
  CHECK(plan.padded_vocab == 50304 && plan.model_params == 124439808 + 47 * 768);
  /* MT-NLG: 530 B */
  CHECK(load_530b(&job, NULL, NULL) == MT_OK);
  CHECK(mt_plan_compute(&job, &a100, &plan) == MT_OK);
  CHECK(rel((double)plan.model_params, 530e9) < 0.002);
  printf("  ok test_parameter_count_matches_model_table\n");
}

/* model.untie_embeddings: each stage of tp 2 x pp 2 (and the one stage of
 * pp 1) holds the plan's parameters as mt_gpt_table lays them out, lm_head
 * on the last stage in place of wte's copy (at pp 1 beside wte); the model
 * has Vp h more than tied, and the FLOPs are the same (eq. 3 counts the
 * head's GEMM either way). */
static void test_untied_parameter_count_matches_model_tables(void) {
  mt_job tied, job;
  mt_plan tplan, plan;
  for (int pp = 1; pp <= 2; pp++) {
    char o_pp[32];
    snprintf(o_pp, sizeof o_pp, "parallel.pp=%d", pp);
    CHECK(load_tiny(&tied, o_pp, "parallel.tp=2") == MT_OK);
    CHECK(mt_plan_compute(&tied, &a100, &tplan) == MT_OK);
    const char *ovs[] = {o_pp, "parallel.tp=2", "model.untie_embeddings=true", NULL};
    CHECK(mt_job_parse(&job,
                       "{\"model\": {\"preset\": \"tiny\"}, \"parallel\": {\"micro_batch\": 2},"
                       " \"train\": {\"global_batch\": 16, \"steps\": 1, \"lr\": {\"peak\": 1e-3}},"
                       " \"data\": {\"path\": \"tokens.u16\"}}",
                       "/jobs", presets, ovs) == MT_OK);
    CHECK(mt_plan_compute(&job, &a100, &plan) == MT_OK);
    int64_t Vh = (int64_t)plan.padded_vocab * job.model.n_embd;
    CHECK(plan.model_params == tplan.model_params + Vh);
    CHECK(plan.model_flops == tplan.model_flops);
    for (int s = 0; s < pp; s++) {
      mt_plan_stage st;
      CHECK(mt_plan_stage_of(&job, &plan, s, &st) == MT_OK);
      mt_gpt_config cfg = config_of(&job.model);
      cfg.max_seq = job.model.max_positions;
      cfg.padded_vocab = plan.padded_vocab;
      cfg.tp_size = 2;
      cfg.untie_embeddings = 1;
      mt_gpt_set_stage(&cfg, pp, s, 1);
      mt_param *t = NULL;
      int n = 0, head = 0;
      size_t count;
      CHECK(mt_gpt_table(&cfg, &t, &n, &count) == MT_OK);
      int64_t numel = 0;
      for (int i = 0; i < n; i++) numel += (int64_t)t[i].numel;
      head = mt_param_find(t, n, "lm_head.weight") >= 0;
      int wte = mt_param_find(t, n, "wte.weight") >= 0;
      free(t);
      CHECK(st.params == numel);
      CHECK(head == (s == pp - 1) && wte == (s == 0));
    }
  }
  printf("  ok test_untied_parameter_count_matches_model_tables\n");
}

/* Activation floats a model of cfg at (B, T) lays out with n slots. */
static int64_t model_act_bytes(mt_gpt_config cfg, mt_device *dev, int B, int T, int slots) {
  cfg.micro_slots = slots;
  mt_gpt m;
  if (mt_gpt_create(&m, &cfg, dev, B, T)) return -1;
  int64_t bytes = (int64_t)m.acts_floats * 4;
  mt_gpt_destroy(&m);
  return bytes;
}

/* The working set the plan counts once per device is what model/gpt.c lays
 * out once beside the slots, in fp32 and in 16-bit jobs: the plan's stage 0
 * of pp 2 with one micro-batch in flight and with two gives it, as does the
 * model's stage with one slot and with two; attention's scratch (the plan
 * counts a GPU's, the model lays out its device's) left out of both. */
static void test_working_set_matches_model_layout(void) {
  static const char *const precs[] = {"fp32", "bf16"};
  mt_device dev;
  CHECK(mt_device_open(&dev, "cpu:0") == MT_OK);
  int64_t slot_bytes[2][2] = {{0}}; /* per micro-batch at tp 2, [sp][plan or model] */
  for (int k = 0; k < 6; k++) {
    const char *prec = precs[k % 2];
    int tp = k < 2 ? 1 : 2, sp = k >= 4;
    char o_prec[64], o_tp[64], o_sp[64];
    snprintf(o_prec, sizeof o_prec, "train.precision=%s", prec);
    snprintf(o_tp, sizeof o_tp, "parallel.tp=%d", tp);
    snprintf(o_sp, sizeof o_sp, "parallel.sequence_parallel=%s", sp ? "true" : "false");
    mt_job job;
    mt_plan one, two;
    mt_plan_stage s1, s2;
    const char *ovs[] = {o_prec, o_tp, o_sp, "parallel.pp=2", "train.global_batch=2", NULL};
    CHECK(mt_job_parse(&job,
                       "{\"model\": {\"preset\": \"tiny\"}, \"parallel\": {\"micro_batch\": 2},"
                       " \"train\": {\"steps\": 1, \"lr\": {\"peak\": 1e-3}},"
                       " \"data\": {\"path\": \"t.u16\"}}",
                       "/jobs", presets, ovs) == MT_OK);
    CHECK(mt_plan_compute(&job, &a100, &one) == MT_OK);
    CHECK(mt_plan_stage_of(&job, &one, 0, &s1) == MT_OK && s1.inflight == 1);
    job.train.global_batch = 4;
    CHECK(mt_plan_compute(&job, &a100, &two) == MT_OK);
    CHECK(mt_plan_stage_of(&job, &two, 0, &s2) == MT_OK && s2.inflight == 2);
    const mt_model_spec *ms = &job.model;
    int64_t s = ms->seq_len, rows = s < 512 ? s : 512;
    int nh = ms->n_head / tp;
    /* a 16-bit job on the flash kernels: their backward's row sums */
    int64_t f16 = (int64_t)mt_flash_bwd_samples((int)s, nh) * nh * s;
    int64_t plan_scratch = k % 2 ? 4 * f16 : (int64_t)nh * s * 4 * 2 * rows;
    int64_t plan_work = 2 * s1.activation_bytes - s2.activation_bytes - plan_scratch;

    mt_gpt_config cfg = config_of(ms);
    cfg.tp_size = tp;
    cfg.sequence_parallel = sp;
    cfg.precision = k % 2 ? MT_PREC_BF16 : MT_PREC_FP32;
    cfg.layer_begin = s1.first_layer;
    cfg.layer_end = s1.first_layer + s1.n_layers;
    int B = job.parallel.micro_batch, T = ms->seq_len;
    int64_t a1 = model_act_bytes(cfg, &dev, B, T, 1), a2 = model_act_bytes(cfg, &dev, B, T, 2);
    CHECK(a1 > 0 && a2 > 0);
    int64_t att = (int64_t)dev.ops->attention_scratch(&dev, T, ms->n_embd / tp, ms->n_head / tp,
                                                      k % 2 ? MT_BF16 : MT_F32);
    int64_t model_work = 2 * a1 - a2 - 4 * att;
    /* the model's also holds LayerNorm's mean and rstd and pads each tensor
     * to 64 bytes: a few percent at this size */
    printf("    %s tp %d%s: working set %lld bytes planned, %lld laid out\n", prec, tp,
           sp ? " sequence-parallel" : "", (long long)plan_work, (long long)model_work);
    CHECK(rel((double)plan_work, (double)model_work) < 0.05);
    if (tp == 2 && k % 2 == 0) {
      slot_bytes[sp][0] = s2.activation_bytes - s1.activation_bytes;
      slot_bytes[sp][1] = a2 - a1;
    }
  }
  /* what a micro-batch in flight keeps shrinks with sequence parallelism, in
   * the plan and in the model's layout by about the same amount */
  double plan_cut = (double)slot_bytes[1][0] / (double)slot_bytes[0][0];
  double model_cut = (double)slot_bytes[1][1] / (double)slot_bytes[0][1];
  printf(
      "    fp32 tp 2: a micro-batch keeps %.2f of its bytes sequence-parallel planned, %.2f laid "
      "out\n",
      plan_cut, model_cut);
  CHECK(plan_cut < 0.95 && model_cut < 0.95 && fabs(plan_cut - model_cut) < 0.1);
  mt_device_close(&dev);
  printf("  ok test_working_set_matches_model_layout\n");
}

static void test_plan_loader_keeps_mixed_precision(void) {
  mt_job job;
  /* both loaders take bf16 and keep it */
  CHECK(mt_job_load(&job, MT_JOB_DIR "/mtnlg-530b.json", presets, NULL) == MT_OK);
  CHECK(load_530b(&job, NULL, NULL) == MT_OK);
  CHECK(!strcmp(job.train.precision, "bf16"));
  char h_bf16[17];
  memcpy(h_bf16, job.hash, sizeof h_bf16);
  CHECK(load_530b(&job, "train.precision=fp16", NULL) == MT_OK);
  CHECK(!strcmp(job.train.precision, "fp16") && strcmp(job.hash, h_bf16));
  CHECK(load_530b(&job, "train.precision=fp32", NULL) == MT_OK);
  CHECK(!strcmp(job.train.precision, "fp32") && strcmp(job.hash, h_bf16));
  /* every other check still applies */
  CHECK(load_530b(&job, "parallel.tp=3", NULL) == MT_EINVAL);
  CHECK(strstr(mt_errmsg(), "model.n_head: 128 is not divisible by parallel.tp = 3"));
  CHECK(!strstr(mt_errmsg(), "precision"));
  CHECK(load_530b(&job, "train.precision=fp8", NULL) == MT_EINVAL);
  CHECK(strstr(mt_errmsg(), "train.precision: \"fp8\" is not one of"));
  printf("  ok test_plan_loader_keeps_mixed_precision\n");
}

int main(void) {
  test_flops_match_narayanan_eq3();
  test_530b_prediction_near_paper_60s_on_2240_gpus();
  test_zero1_optimizer_bytes_scale_as_one_over_dp();
  test_tp_shards_matrices_and_replicates_layernorm();
  test_pp_splits_layers_and_last_stage_holds_tied_head();
  test_recompute_cuts_activation_memory();
  test_job_that_does_not_fit_is_refused_with_numbers();
  test_parameter_count_matches_model_table();
  test_untied_parameter_count_matches_model_tables();
  test_plan_loader_keeps_mixed_precision();
  test_working_set_matches_model_layout();
  if (failures) {
    fprintf(stderr, "test_plan: %d failure(s)\n", failures);
    return 1;
  }
  printf("test_plan: all passed\n");
  return 0;
}
