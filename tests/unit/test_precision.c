/* test_precision.c — mixed precision on one device (daemon/engine/train.c,
 * daemon/model/gpt.c): fp32 master weights, a bf16/fp16 working copy the
 * forward and backward read, fp16's dynamic loss scaling with skipped steps.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "sanitizer.h"
#ifdef MT_ASAN
#include <sanitizer/asan_interface.h>
#endif

#include "device.h"
#include "err.h"
#include "gpt.h"
#include "half.h"
#include "job.h"
#include "loss_scale.h"
#include "mt_check.h"
#include "train.h"

static mt_device dev;
static char data_path[64];
static const char *preset_dirs[] = {MT_PRESET_DIR, NULL};

/* A repeating byte pattern: a tiny model learns it within a few steps. */
static int write_data(void) {
  uint16_t t[4000];
  for (int i = 0; i < 4000; i++) t[i] = (uint16_t)((i * 7 + i / 13) % 256);
  strcpy(data_path, "/tmp/mtnlg-precision-XXXXXX");
  int fd = mkstemp(data_path);
  if (fd < 0) return -1;
  ssize_t w = write(fd, t, sizeof t);
  close(fd);
  return w == (ssize_t)sizeof t ? 0 : -1;
}

/* The tiny model at seq 16, global batch 4 in micro-batches of 2. */
static int parse_job(mt_job *job, const char *precision, const char *loss_scale, int steps) {
  char json[1024];
  snprintf(json, sizeof json,
           "{\"model\":{\"preset\":\"tiny\",\"seq_len\":16},\"parallel\":{\"micro_batch\":2},"
           "\"train\":{\"global_batch\":4,\"steps\":%d,\"seed\":5,\"precision\":\"%s\"%s%s,"
           "\"lr\":{\"schedule\":\"cosine\",\"peak\":2e-3,\"warmup_steps\":1}},"
           "\"data\":{\"path\":\"%s\"}}",
           steps, precision, loss_scale ? ",\"loss_scale\":" : "", loss_scale ? loss_scale : "",
           data_path);
  return mt_job_parse(job, json, NULL, preset_dirs, NULL);
}

static int run_losses(const char *precision, int steps, double *losses) {
  mt_job job;
  mt_trainer tr;
  int rc = parse_job(&job, precision, NULL, steps);
  if (!rc) rc = mt_trainer_create(&tr, &job, &dev, NULL);
  if (rc) return rc;
  for (int s = 0; s < steps && !rc; s++) {
    mt_step_stats st;
    rc = mt_trainer_step(&tr, &st);
    losses[s] = st.loss;
  }
  mt_trainer_destroy(&tr);
  return rc;
}

static float round_to(float x, mt_precision p) {
  return p == MT_PREC_BF16 ? mt_bf16_to_f32(mt_f32_to_bf16(x)) : mt_fp16_to_f32(mt_f32_to_fp16(x));
}

/* (1) bf16 trains like fp32: the loss falls, and each step's loss is within
 * a bf16-sized distance of fp32's (2^-8 relative, bf16's machine epsilon:
 * weights rounded to 8 significant bits move the loss far less) without
 * being equal to it. */
static int test_bf16_trains_within_bf16_tolerance_of_fp32(void) {
  enum { STEPS = 10 };
  double f32[STEPS], b16[STEPS];
  REQUIRE(!run_losses("fp32", STEPS, f32), "fp32: %s", mt_errmsg());
  REQUIRE(!run_losses("bf16", STEPS, b16), "bf16: %s", mt_errmsg());
  double worst = 0.0;
  int differ = 0;
  for (int s = 0; s < STEPS; s++) {
    double r = fabs(b16[s] - f32[s]) / f32[s];
    worst = r > worst ? r : worst;
    differ += b16[s] != f32[s];
    CHECK(r < 0x1p-8, "step %d: bf16 loss %.7f vs fp32 %.7f (rel %.2e)", s + 1, b16[s], f32[s], r);
  }
  CHECK(differ > 0, "bf16 losses equal fp32's at every step: the weights were not rounded");
  CHECK(b16[STEPS - 1] < b16[0] - 0.1, "bf16 loss should fall: %.4f -> %.4f", b16[0],
        b16[STEPS - 1]);
  printf("  fp32 %.5f -> %.5f, bf16 %.5f -> %.5f, worst step rel %.2e\n", f32[0], f32[STEPS - 1],
         b16[0], b16[STEPS - 1], worst);
  return 0;
}

/* (2) Every weight the forward reads is exactly representable in bf16
 * (fp16) while the master weights are not: the working copy is the master
 * rounded to nearest even, and forward + backward of the mixed model equal,
 * bit for bit, an fp32 model's whose weights are that rounded copy. After
 * training steps, the same holds of the weights the last step read. */
/* The values the forward reads, laid out as params (alloc_params floats,
 * padding 0): the matrices from the 16-bit copy, the rest from the floats. */
static float *working_values(const mt_gpt *m) {
  float *w = calloc(m->alloc_params, sizeof(float));
  if (!w) return NULL;
  for (int i = 0; i < m->n_tensors; i++) {
    const mt_param *t = &m->params_table[i];
    for (size_t k = 0; k < t->numel; k++)
      w[t->offset + k] = mt_gpt_is_matrix(m, i)
                             ? mt_half_unpack(m->half[t->offset + k], m->wtype == MT_F16)
                             : m->weights[m->vec_offset[i] + k];
  }
  return w;
}

static int check_working_copy(const mt_gpt *m, mt_precision p, const char *when) {
  const char *name = p == MT_PREC_BF16 ? "bf16" : "fp16";
  REQUIRE(m->half && m->weights && m->weights != m->params, "%s: no working copy", name);
  CHECK(m->wtype == (p == MT_PREC_BF16 ? MT_BF16 : MT_F16), "%s: working copy type %d", name,
        (int)m->wtype);
  /* the matrices, nearly every parameter, in 16 bits; only vectors and wpe
   * as floats */
  size_t vec = 0, padded = 0;
  for (int i = 0; i < m->n_tensors; i++)
    if (!mt_gpt_is_matrix(m, i)) {
      vec += m->params_table[i].numel;
      padded += (m->params_table[i].numel + 15) / 16 * 16;
      /* cuBLASLt's bias epilogue reads the biases from here: 64-byte aligned */
      CHECK(m->vec_offset[i] % 16 == 0, "%s: tensor %d's fp32 working copy at float %zu", name, i,
            m->vec_offset[i]);
    }
  CHECK(m->vec_floats == padded && vec < m->num_params / 5,
        "%s: %zu fp32 working floats (vectors hold %zu, %zu padded) of %zu parameters", name,
        m->vec_floats, vec, padded, m->num_params);
  float *wv = working_values(m);
  REQUIRE(wv, "out of memory");
  size_t not_exact = 0, bad = 0;
  for (size_t e = 0; e < m->alloc_params; e++) {
    float w = wv[e];
    bad += round_to(w, p) != w;
    not_exact += round_to(m->params[e], p) != m->params[e];
  }
  CHECK(bad == 0, "%s %s: %zu weights the forward reads are not %s values", name, when, bad, name);
  CHECK(not_exact > m->num_params / 2, "%s %s: only %zu of %zu master weights lie off the %s grid",
        name, when, not_exact, m->num_params, name);
  free(wv);
  return 0;
}

/* A model small enough to create by the dozen: vocabulary 61 (padded 64),
 * sequences up to 16. */
static mt_gpt_config small_config(int layers, int embd, int heads) {
  mt_gpt_config c = {.n_layer = layers,
                     .n_embd = embd,
                     .n_head = heads,
                     .vocab_size = 61,
                     .padded_vocab = 64,
                     .max_seq = 16,
                     .ln_eps = 1e-5f,
                     .init_std = 0.02f};
  return c;
}

static int test_forward_reads_only_16bit_weights(void) {
  mt_gpt_config c = small_config(2, 24, 3);
  int B = 2, T = 9;
  int32_t in[18], tg[18];
  for (int i = 0; i < 18; i++) in[i] = (i * 5 + 3) % 61, tg[i] = (i * 11 + 1) % 61;
  for (mt_precision p = MT_PREC_BF16; p <= MT_PREC_FP16; p++) {
    const char *name = p == MT_PREC_BF16 ? "bf16" : "fp16";
    mt_gpt q, f;
    mt_gpt_config cq = c;
    cq.precision = p;
    REQUIRE(!mt_gpt_create(&q, &cq, &dev, B, T) && !mt_gpt_create(&f, &cq, &dev, B, T), "%s",
            mt_errmsg());
    REQUIRE(!mt_gpt_init_weights(&q, 9), "%s", mt_errmsg());
    /* LayerNorm weights of 1, biases of 0 are exact: nudge every master
     * weight off the grid so the rounding has something to do */
    for (size_t e = 0; e < q.num_params; e++) q.params[e] = q.params[e] * 1.0001f + 1e-4f;
    REQUIRE(!mt_gpt_round_weights(&q), "%s", mt_errmsg());
    if (check_working_copy(&q, p, "after init")) return 1;
    float *wv = working_values(&q);
    REQUIRE(wv, "out of memory");
    for (int i = 0; i < q.n_tensors; i++)
      for (size_t e = q.params_table[i].offset;
           e < q.params_table[i].offset + q.params_table[i].numel; e++)
        CHECK(wv[e] == round_to(q.params[e], p), "%s: weight %zu is %a, round(master) %a", name, e,
              wv[e], round_to(q.params[e], p));
    /* f: the same precision with masters already on the grid, so that its
     * masters and working copy agree; q's differ, and only its working copy
     * may be read */
    memcpy(f.params, wv, q.alloc_params * sizeof(float));
    free(wv);
    REQUIRE(!mt_gpt_round_weights(&f), "%s", mt_errmsg());
    mt_gpt_zero_grad(&q);
    mt_gpt_zero_grad(&f);
    REQUIRE(!mt_gpt_forward(&q, in, tg, 0) && !mt_gpt_backward(&q, 1.0f), "%s", mt_errmsg());
    REQUIRE(!mt_gpt_forward(&f, in, tg, 0) && !mt_gpt_backward(&f, 1.0f), "%s", mt_errmsg());
    CHECK(q.last_loss == f.last_loss, "%s: loss %.9g, masters on the grid %.9g", name, q.last_loss,
          f.last_loss);
    CHECK(!memcmp(q.grads, f.grads, q.num_params * sizeof(float)),
          "%s: gradients differ from the run whose masters are its rounded weights", name);
    mt_gpt_destroy(&q);
    mt_gpt_destroy(&f);

    /* the trainer: a few steps, then the copy the last step read */
    mt_job job;
    mt_trainer tr;
    REQUIRE(!parse_job(&job, name, NULL, 3) && !mt_trainer_create(&tr, &job, &dev, NULL), "%s",
            mt_errmsg());
    for (int s = 0; s < 3; s++) {
      mt_step_stats st;
      REQUIRE(!mt_trainer_step(&tr, &st), "%s", mt_errmsg());
    }
    if (check_working_copy(&tr.model, p, "after 3 steps")) return 1;
    mt_trainer_destroy(&tr);
  }
  return 0;
}

/* pack_half and unpack_half, the storage of kept activations, are half.h's
 * conversions: ties to even, NaN stays NaN, fp16 overflow to infinity,
 * subnormals; the source is left holding what unpack returns. */
static int test_pack_half_stores_what_unpack_returns(void) {
  float x[] = {0.0f,
               -0.0f,
               1.0f,
               -3.5f,
               0x1.01p0f /* bf16 tie */,
               0x1.03p0f,
               0x1.002p0f /* fp16 tie */,
               65504.0f,
               65520.0f,
               1e-7f,
               1e-40f,
               3.1e38f,
               INFINITY,
               -INFINITY,
               NAN};
  enum { N = sizeof x / sizeof *x };
  for (int fp16 = 0; fp16 < 2; fp16++) {
    float src[N], back[N];
    uint16_t h[N];
    memcpy(src, x, sizeof x);
    dev.ops->pack_half(&dev, h, src, N, fp16);
    dev.ops->unpack_half(&dev, back, h, N, fp16);
    for (int i = 0; i < N; i++) {
      uint16_t want = mt_half_pack(x[i], fp16);
      float r = mt_round_half(x[i], fp16);
      CHECK(h[i] == want, "%s: %a packs to %04x, want %04x", fp16 ? "fp16" : "bf16", x[i], h[i],
            want);
      CHECK(isnan(r) ? isnan(src[i]) && isnan(back[i]) : src[i] == r && back[i] == r,
            "%s: %a left as %a, unpacked %a, want %a", fp16 ? "fp16" : "bf16", x[i], src[i],
            back[i], r);
    }
  }
  return 0;
}

/* A bf16 job keeps its blocks' activations in 16 bits: what 4 more layers
 * add to the activation buffer is about half of what they add in fp32 (the
 * stream, Q/K/V, attention output, resid2 and c_fc output halve; each row's
 * log-sum-exp stays fp32), while the shared work buffers stay fp32. */
static int test_16bit_jobs_keep_activations_in_16_bits(void) {
  size_t acts[2][2]; /* [bf16][8 layers] */
  for (int half = 0; half < 2; half++)
    for (int deep = 0; deep < 2; deep++) {
      mt_gpt m;
      mt_gpt_config k = small_config(deep ? 8 : 4, 32, 4);
      k.precision = half ? MT_PREC_BF16 : MT_PREC_FP32;
      REQUIRE(!mt_gpt_create(&m, &k, &dev, 2, 16), "%s", mt_errmsg());
      acts[half][deep] = m.acts_floats;
      mt_gpt_destroy(&m);
    }
  double f = (double)(acts[0][1] - acts[0][0]), q = (double)(acts[1][1] - acts[1][0]);
  /* per token and layer: fp32 10 C + NH floats, 16-bit 5 C + NH */
  double want = (5.0 * 32 + 4) / (10.0 * 32 + 4);
  printf("  4 more layers: fp32 %.0f activation floats, bf16 %.0f (%.3f, expected %.3f)\n", f, q,
         q / f, want);
  CHECK(fabs(q / f - want) < 0.02, "bf16 layers add %.0f floats, fp32 %.0f", q, f);
  return 0;
}

/* A bf16 or fp16 stage sends its output on in 16 bits, and nothing is lost:
 * the stream is rounded at every block's output but the model's last, so
 * the 16 bits decode to exactly the output the stage computed. */
static int test_16bit_stage_output_travels_in_16_bits(void) {
  int B = 2, T = 9;
  int32_t in[18];
  for (int i = 0; i < 18; i++) in[i] = (i * 5 + 3) % 61;
  for (mt_precision p = MT_PREC_BF16; p <= MT_PREC_FP16; p++) {
    mt_gpt m;
    mt_gpt_config c = small_config(4, 24, 3);
    c.precision = p;
    c.layer_end = 2; /* the first of two stages */
    REQUIRE(!mt_gpt_create(&m, &c, &dev, B, T) && !mt_gpt_init_weights(&m, 3) &&
                !mt_gpt_round_weights(&m),
            "%s", mt_errmsg());
    REQUIRE(!mt_gpt_forward_stage(&m, 0, in, NULL, NULL, 0), "%s", mt_errmsg());
    size_t n = (size_t)B * T * 24, bytes = 0;
    const void *wire = mt_gpt_stage_output_wire(&m, 0, &bytes);
    const float *x = mt_gpt_stage_input_from_wire(&m, 0, wire);
    REQUIRE(x, "%s", mt_errmsg());
    CHECK(bytes == n * sizeof(uint16_t), "%zu bytes on the wire for %zu values", bytes, n);
    CHECK(!memcmp(x, mt_gpt_stage_output(&m, 0), n * sizeof(float)),
          "%s: the stage output does not survive its 16 bits", p == MT_PREC_BF16 ? "bf16" : "fp16");
    mt_gpt_destroy(&m);
  }
  return 0;
}

/* The fp16 range check: 65504 is fp16's largest finite value and everything
 * below 65520 rounds to it; 65520 and beyond, inf and NaN overflow. */
static int test_fp16_range_check_boundary(void) {
  mt_device dev;
  REQUIRE(!mt_device_open(&dev, "cpu:0"), "%s", mt_errmsg());
  float ok[] = {0.0f, -0.0f, 1e-30f, 65504.0f, -65504.0f, nextafterf(65520.0f, 0.0f), 3.0f};
  CHECK(dev.ops->fits_fp16(&dev, ok, sizeof ok / sizeof *ok), "in range flagged");
  float bad[] = {65520.0f, -65520.0f, 1e10f, INFINITY, -INFINITY, NAN};
  for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
    float v[3] = {1.0f, bad[i], 2.0f};
    CHECK(!dev.ops->fits_fp16(&dev, v, 3), "%g not flagged", bad[i]);
    CHECK(isinf(mt_fp16_to_f32(mt_f32_to_fp16(bad[i]))) || isnan(bad[i]), "%g is finite in fp16",
          bad[i]);
  }
  CHECK(!isinf(mt_fp16_to_f32(mt_f32_to_fp16(nextafterf(65520.0f, 0.0f)))), "65520- rounds to inf");
  mt_device_close(&dev);
  return 0;
}

/* Megatron's OptimizerParamScheduler.get_lr for cosine decay, written from
 * its source: num_steps counts the updates applied (train_step calls
 * step() only when the update succeeded). */
static double megatron_lr(double max_lr, double min_lr, int64_t warmup, int64_t decay,
                          int64_t num_steps) {
  if (warmup > 0 && num_steps <= warmup) return max_lr * (double)num_steps / (double)warmup;
  if (num_steps > decay) return min_lr;
  double decay_ratio = (double)(num_steps - warmup) / (double)(decay - warmup);
  double coeff = 0.5 * (cos(M_PI * decay_ratio) + 1.0);
  return min_lr + coeff * (max_lr - min_lr);
}

/* (3) A run that overflows and recovers: fp16 from a loss scale of 2^40. The
 * first steps overflow: each is skipped (flag set, weights and Adam step
 * untouched, the lr schedule where it was); the first overflow only uses up
 * hysteresis (2), each after it halves the scale, until the gradients fit
 * fp16; from there the run trains, the loss falls, and growth_interval
 * clean steps double the scale. Every step's lr is Megatron's for the
 * updates applied before it. */
static int test_fp16_run_that_overflows_and_recovers(void) {
  enum { STEPS = 48 };
  mt_job job;
  mt_trainer tr;
  REQUIRE(!parse_job(&job, "fp16",
                     "{\"initial\":1099511627776,\"growth_interval\":8,\"hysteresis\":2}", STEPS),
          "%s", mt_errmsg());
  REQUIRE(!mt_trainer_create(&tr, &job, &dev, NULL), "%s", mt_errmsg());
  size_t n = tr.model.alloc_params;
  float *before = malloc(n * sizeof(float));
  REQUIRE(before, "memory");
  int skipped[STEPS], first_clean = -1, clean = 0, grew = 0;
  double scale[STEPS], loss[STEPS];
  const mt_lr_spec *lr = &job.train.lr;
  for (int s = 0; s < STEPS; s++) {
    memcpy(before, tr.model.params, n * sizeof(float));
    mt_step_stats st;
    REQUIRE(!mt_trainer_step(&tr, &st), "step %d: %s", s + 1, mt_errmsg());
    skipped[s] = st.skipped, scale[s] = st.loss_scale, loss[s] = st.loss;
    int same = !memcmp(before, tr.model.params, n * sizeof(float));
    CHECK(st.loss_scaling && isfinite(st.loss), "step %d: scaling %d, loss %g", s + 1,
          st.loss_scaling, st.loss);
    double want_lr = megatron_lr(lr->peak, lr->min, lr->warmup_steps, lr->decay_steps, clean);
    CHECK(fabs(st.lr - want_lr) <= 1e-12 * lr->peak, "step %d: lr %g after %d updates, want %g",
          s + 1, st.lr, clean, want_lr);
    /* the first update, at lr 0 under warmup, moves Adam's moments only */
    CHECK(same == (skipped[s] || st.lr == 0.0), "step %d: skipped %d at lr %g but the weights %s",
          s + 1, skipped[s], st.lr, same ? "stayed" : "changed");
    if (!skipped[s]) {
      clean++;
      if (first_clean < 0) first_clean = s;
      if (s > 0 && scale[s] == 2.0 * scale[s - 1]) grew++;
    }
  }
  free(before);
  REQUIRE(first_clean > 1, "the first clean step is %d: 2^40 should overflow fp16 first",
          first_clean + 1);
  /* the overflowing start: skipped, scale 2^40 after the first (hysteresis),
   * then halving once per step */
  for (int s = 0; s < first_clean; s++) {
    double want = ldexp(1.0, s == 0 ? 40 : 40 - s);
    CHECK(skipped[s] && scale[s] == want, "step %d: skipped %d scale %g, want 1 %g", s + 1,
          skipped[s], scale[s], want);
  }
  CHECK(tr.opt.t == clean, "Adam took %lld steps, %d were clean", (long long)tr.opt.t, clean);
  CHECK(tr.scaler.skipped == STEPS - clean, "scaler counted %lld skips, want %d",
        (long long)tr.scaler.skipped, STEPS - clean);
  CHECK(3 * clean >= 2 * (STEPS - first_clean), "only %d clean steps of %d after recovering", clean,
        STEPS - first_clean);
  CHECK(grew > 0, "8 clean steps in a row never grew the scale");
  double tail = 0.0;
  for (int s = STEPS - 4; s < STEPS; s++) tail += loss[s] / 4;
  CHECK(tail < loss[first_clean] - 0.2,
        "loss should fall after recovering: %.4f at step %d, "
        "%.4f over the last 4",
        loss[first_clean], first_clean + 1, tail);
  printf("  %d steps skipped first, scale %g at the first clean step %d; loss %.4f -> %.4f; "
         "%d clean of %d, final scale %g\n",
         first_clean, scale[first_clean], first_clean + 1, loss[first_clean], tail, clean, STEPS,
         scale[STEPS - 1]);
  mt_trainer_destroy(&tr);
  return 0;
}

/* fp32 stays fp32: no working copy, no scale in the step's stats. */
static int test_fp32_has_no_working_copy_or_scale(void) {
  mt_job job;
  mt_trainer tr;
  REQUIRE(!parse_job(&job, "fp32", NULL, 1) && !mt_trainer_create(&tr, &job, &dev, NULL), "%s",
          mt_errmsg());
  mt_step_stats st;
  REQUIRE(!mt_trainer_step(&tr, &st), "%s", mt_errmsg());
  CHECK(tr.model.weights == tr.model.params, "fp32 allocated a working copy");
  CHECK(!st.loss_scaling && st.loss_scale == 1.0, "fp32 stats: scaling %d scale %g",
        st.loss_scaling, st.loss_scale);
  mt_trainer_destroy(&tr);
  return 0;
}

/* Under AddressSanitizer (build-asan) each activation tensor of a CPU
 * arena ends in a poisoned gap (gpt.c), so an op overrunning it stops
 * there: the byte after the logits and after a 16-bit stage output (whose
 * 16-bit element count is odd: its last float is half used) is poisoned,
 * their last element is not. Elsewhere there is nothing to check. */
static int test_activation_tensors_end_in_a_poisoned_gap_under_asan(void) {
#ifdef MT_ASAN
  int B = 1, T = 9;
  int32_t in[9], tg[9];
  for (int i = 0; i < 9; i++) in[i] = (i * 7 + 2) % 61, tg[i] = (i * 3 + 1) % 61;
  for (mt_precision p = MT_PREC_FP32; p <= MT_PREC_BF16; p++) {
    mt_gpt last, first;
    mt_gpt_config c = small_config(2, 24, 3);
    c.precision = p;
    mt_gpt_config f = c;
    f.layer_end = 1; /* the first of two stages: its output is sent on */
    REQUIRE(!mt_gpt_create(&last, &c, &dev, B, T) && !mt_gpt_init_weights(&last, 5) &&
                !mt_gpt_round_weights(&last) && !mt_gpt_create(&first, &f, &dev, B, T) &&
                !mt_gpt_init_weights(&first, 5) && !mt_gpt_round_weights(&first),
            "%s", mt_errmsg());
    REQUIRE(!mt_gpt_forward_stage(&last, 0, in, NULL, tg, 0) &&
                !mt_gpt_forward_stage(&first, 0, in, NULL, NULL, 0),
            "%s", mt_errmsg());
    const float *logits = mt_gpt_logits(&last, 0);
    size_t n = (size_t)B * T * c.padded_vocab, bytes = 0;
    const unsigned char *wire = mt_gpt_stage_output_wire(&first, 0, &bytes);
    CHECK(logits && !__asan_address_is_poisoned(logits + n - 1) &&
              __asan_address_is_poisoned(logits + n),
          "%s: the logits' last element addressable, the float after them poisoned",
          p == MT_PREC_FP32 ? "fp32" : "bf16");
    CHECK(wire && bytes && !__asan_address_is_poisoned(wire + bytes - 1) &&
              __asan_address_is_poisoned(wire + bytes + (bytes % 4 ? 4 - bytes % 4 : 0)),
          "%s: the stage output's last byte addressable (%zu bytes), the float after it "
          "poisoned",
          p == MT_PREC_FP32 ? "fp32" : "bf16", bytes);
    mt_gpt_destroy(&last);
    mt_gpt_destroy(&first);
  }
  printf("  logits and stage outputs end in poisoned gaps (fp32, bf16)\n");
#else
  printf("  no AddressSanitizer in this build: nothing to check\n");
#endif
  return 0;
}

int main(void) {
  if (mt_device_open(&dev, "cpu:0")) {
    fprintf(stderr, "cannot open cpu:0: %s\n", mt_errmsg());
    return 1;
  }
  if (write_data()) {
    fprintf(stderr, "cannot write %s\n", data_path);
    return 1;
  }
  struct {
    const char *name;
    int (*fn)(void);
  } tests[] = {
      {"test_bf16_trains_within_bf16_tolerance_of_fp32",
       test_bf16_trains_within_bf16_tolerance_of_fp32},
      {"test_forward_reads_only_16bit_weights", test_forward_reads_only_16bit_weights},
      {"test_pack_half_stores_what_unpack_returns", test_pack_half_stores_what_unpack_returns},
      {"test_16bit_jobs_keep_activations_in_16_bits", test_16bit_jobs_keep_activations_in_16_bits},
      {"test_16bit_stage_output_travels_in_16_bits", test_16bit_stage_output_travels_in_16_bits},
      {"test_fp16_range_check_boundary", test_fp16_range_check_boundary},
      {"test_fp16_run_that_overflows_and_recovers", test_fp16_run_that_overflows_and_recovers},
      {"test_fp32_has_no_working_copy_or_scale", test_fp32_has_no_working_copy_or_scale},
      {"test_activation_tensors_end_in_a_poisoned_gap_under_asan",
       test_activation_tensors_end_in_a_poisoned_gap_under_asan},
  };
  for (size_t i = 0; i < sizeof tests / sizeof *tests; i++) {
    int before = failures;
    int rc = tests[i].fn();
    printf("%s %s\n", rc || failures > before ? "FAIL" : "ok", tests[i].name);
    failures += rc;
  }
  unlink(data_path);
  mt_device_close(&dev);
  return failures ? 1 : 0;
}
