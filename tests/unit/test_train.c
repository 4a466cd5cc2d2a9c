/* test_train.c — properties of the model, the data reader, the LR schedule
 * and the training step that DESIGN.md's determinism rule depends on. */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "checkpoint.h"
#include "ckpt.h"
#include "device.h"
#include "err.h"
#include "gpt.h"
#include "indexed.h"
#include "job.h"
#include "local.h"
#include "lr.h"
#include "tokens.h"
#include "train.h"

static int failures;
static mt_device dev;

#define CHECK(cond, ...)                                                                           \
  do {                                                                                             \
    if (!(cond)) {                                                                                 \
      printf("  FAIL %s:%d: ", __FILE__, __LINE__);                                                \
      printf(__VA_ARGS__);                                                                         \
      printf("\n");                                                                                \
      failures++;                                                                                  \
      return;                                                                                      \
    }                                                                                              \
  } while (0)

static const char *preset_dirs[] = {MT_PRESET_DIR, NULL};

static mt_gpt_config small_config(int layers, int recompute, float dropout) {
  mt_gpt_config c = {.n_layer = layers,
                     .n_embd = 24,
                     .n_head = 3,
                     .vocab_size = 61,
                     .padded_vocab = 64,
                     .max_seq = 16,
                     .ln_eps = 1e-5f,
                     .init_std = 0.02f,
                     .hidden_dropout = dropout,
                     .attention_dropout = dropout,
                     .recompute = recompute};
  return c;
}

static void fill_tokens(int32_t *x, size_t n, int vocab, uint32_t seed) {
  for (size_t i = 0; i < n; i++) {
    seed = seed * 1664525u + 1013904223u;
    x[i] = (int32_t)((seed >> 8) % (uint32_t)vocab);
  }
}

static void test_init_depends_only_on_seed_and_tensor_name(void) {
  mt_gpt a, b;
  mt_gpt_config ca = small_config(2, 0, 0), cb = small_config(3, 0, 0);
  CHECK(!mt_gpt_create(&a, &ca, &dev, 2, 8) && !mt_gpt_create(&b, &cb, &dev, 1, 16), "%s",
        mt_errmsg());
  CHECK(!mt_gpt_init_weights(&a, 7) && !mt_gpt_init_weights(&b, 7), "%s", mt_errmsg());
  /* same name, same values, whatever the depth or micro-batch shape */
  const char *names[] = {"wte.weight", "h.1.attn.c_attn.weight", "h.0.mlp.c_fc.weight", NULL};
  for (int i = 0; names[i]; i++) {
    int ia = mt_gpt_find(&a, names[i]), ib = mt_gpt_find(&b, names[i]);
    CHECK(ia >= 0 && ib >= 0, "%s missing", names[i]);
    CHECK(!memcmp(mt_gpt_param(&a, ia), mt_gpt_param(&b, ib),
                  a.params_table[ia].numel * sizeof(float)),
          "%s differs between a 2- and a 3-layer model", names[i]);
  }
  /* a different seed changes them */
  mt_gpt_init_weights(&b, 8);
  int i = mt_gpt_find(&a, "h.0.mlp.c_fc.weight");
  CHECK(memcmp(mt_gpt_param(&a, i), mt_gpt_param(&b, i), 16) != 0, "seed ignored");
  mt_gpt_destroy(&a);
  mt_gpt_destroy(&b);
  printf("  ok test_init_depends_only_on_seed_and_tensor_name\n");
}

static void test_init_std_and_scaled_output_projections(void) {
  mt_gpt m;
  mt_gpt_config c = small_config(4, 0, 0);
  c.n_embd = 96;
  c.n_head = 4;
  c.init_std = 0.05f;
  CHECK(!mt_gpt_create(&m, &c, &dev, 1, 4) && !mt_gpt_init_weights(&m, 1), "%s", mt_errmsg());
  struct {
    const char *name;
    double std;
  } want[] = {{"h.2.mlp.c_fc.weight", 0.05},
              {"h.2.mlp.c_proj.weight", 0.05 / sqrt(8.0)},
              {"h.1.attn.c_proj.weight", 0.05 / sqrt(8.0)},
              {"wpe.weight", 0.05}};
  for (int k = 0; k < 4; k++) {
    int i = mt_gpt_find(&m, want[k].name);
    const float *p = mt_gpt_param(&m, i);
    size_t n = m.params_table[i].numel;
    double s = 0, s2 = 0;
    for (size_t e = 0; e < n; e++) s += p[e], s2 += (double)p[e] * p[e];
    double mean = s / n, std = sqrt(s2 / n - mean * mean);
    CHECK(fabs(std / want[k].std - 1.0) < 0.05 && fabs(mean) < 4 * want[k].std / sqrt((double)n),
          "%s: mean %g std %g, want std %g", want[k].name, mean, std, want[k].std);
  }
  int ln = mt_gpt_find(&m, "h.3.ln_2.weight"), bias = mt_gpt_find(&m, "h.3.mlp.c_fc.bias");
  CHECK(mt_gpt_param(&m, ln)[5] == 1.0f && mt_gpt_param(&m, bias)[5] == 0.0f,
        "LayerNorm weight must start at 1 and biases at 0");
  CHECK(!m.params_table[bias].decay && !m.params_table[ln].decay &&
            m.params_table[mt_gpt_find(&m, "wte.weight")].decay,
        "decay flags: matrices and embeddings only");
  mt_gpt_destroy(&m);
  printf("  ok test_init_std_and_scaled_output_projections\n");
}

/* Gradients with per-layer recomputation equal those with stored activations,
 * bit for bit, dropout included (its masks are recomputed from Philox). */
/* Interleaved stages: two stages of two one-layer chunks each (stage 0:
 * layers 0 and 2 with the embeddings, stage 1: layers 1 and 3 with the
 * head), each chunk a view of its stage's parameters, run round the ring
 * by hand, give the whole model's loss and gradients, with recomputation
 * and dropout; and a chunk that borrows chunk 0's working buffers lays out
 * fewer activations than one with its own. */
static void test_chunks_are_views_that_share_working_buffers(void) {
  mt_gpt whole, stage[2], chunk[2][2], alone;
  mt_gpt_config cw = small_config(4, 1, 0.1f);
  int B = 2, T = 9, ok = !mt_gpt_create(&whole, &cw, &dev, B, T);
  for (int s = 0; s < 2 && ok; s++) {
    mt_gpt_config cs = cw;
    mt_gpt_set_stage(&cs, 2, s, 2);
    ok = !mt_gpt_create(&stage[s], &cs, &dev, B, T) && !mt_gpt_init_weights(&stage[s], 3);
    for (int c = 0; c < 2 && ok; c++)
      ok = !mt_gpt_create_chunk(&chunk[s][c], &stage[s], c, 1, c ? &chunk[s][0] : NULL);
  }
  ok = ok && !mt_gpt_init_weights(&whole, 3) && !mt_gpt_create_chunk(&alone, &stage[0], 1, 1, NULL);
  CHECK(ok, "%s", mt_errmsg());
  CHECK(stage[0].first && !stage[0].last && !stage[1].first && stage[1].last &&
            stage[0].n_layers == 2 && mt_gpt_find(&stage[0], "h.2.ln_1.weight") >= 0 &&
            mt_gpt_find(&stage[0], "h.1.ln_1.weight") < 0 && chunk[0][0].first &&
            !chunk[0][1].first && chunk[1][1].last && !chunk[1][0].last,
        "the stages hold the wrong layers or ends");
  CHECK(chunk[0][1].acts_floats < alone.acts_floats,
        "a borrowing chunk lays out %zu activation floats, one with its own buffers %zu",
        chunk[0][1].acts_floats, alone.acts_floats);
  int32_t in[18], tg[18];
  fill_tokens(in, 18, 61, 1);
  fill_tokens(tg, 18, 61, 2);
  mt_gpt_zero_grad(&whole);
  mt_gpt_zero_grad(&stage[0]);
  mt_gpt_zero_grad(&stage[1]);
  CHECK(!mt_gpt_forward(&whole, in, tg, 100) && !mt_gpt_backward(&whole, 1.0f), "%s", mt_errmsg());
  /* forward round the ring: chunk 0 of stage 0, of stage 1, chunk 1 of each */
  mt_gpt *order[4] = {&chunk[0][0], &chunk[1][0], &chunk[0][1], &chunk[1][1]};
  const float *x = NULL;
  for (int k = 0; k < 4; k++) {
    mt_gpt *m = order[k];
    CHECK(!mt_gpt_forward_stage(m, 0, m->first ? in : NULL, x, m->last ? tg : NULL, 100), "%s",
          mt_errmsg());
    x = m->last ? NULL : mt_gpt_stage_output(m, 0);
  }
  CHECK(chunk[1][1].last_loss == whole.last_loss, "loss %.9g through the chunks, %.9g whole",
        chunk[1][1].last_loss, whole.last_loss);
  const float *dy = NULL;
  for (int k = 3; k >= 0; k--) {
    mt_gpt *m = order[k];
    CHECK(!mt_gpt_backward_stage(m, 0, dy, 1.0f), "%s", mt_errmsg());
    dy = m->first ? NULL : mt_gpt_stage_input_grad(m);
  }
  double worst = 0.0;
  for (int s = 0; s < 2; s++)
    for (int i = 0; i < stage[s].n_tensors; i++) {
      const mt_param *p = &stage[s].params_table[i];
      const mt_param *q = &whole.params_table[mt_gpt_find(&whole, p->name)];
      for (size_t e = 0; e < p->numel; e++) {
        double a = stage[s].grads[p->offset + e], b = whole.grads[q->offset + e];
        double d = fabs(a - b) / (fabs(b) + 1e-6);
        if (!strcmp(p->name, "wte.weight")) break; /* the tied copies' sum: the engine's */
        if (d > worst) worst = d;
      }
    }
  CHECK(worst < 1e-5, "gradients through the chunks differ from the whole model's by %g", worst);
  mt_gpt_destroy(&alone);
  for (int s = 0; s < 2; s++) {
    mt_gpt_destroy(&chunk[s][1]);
    mt_gpt_destroy(&chunk[s][0]);
    mt_gpt_destroy(&stage[s]);
  }
  mt_gpt_destroy(&whole);
  printf("  ok test_chunks_are_views_that_share_working_buffers (gradients within %.1e)\n", worst);
}

static void test_recompute_gives_identical_gradients(void) {
  for (int drop = 0; drop < 2; drop++) {
    mt_gpt a, b;
    mt_gpt_config ca = small_config(3, 0, drop ? 0.1f : 0.0f);
    mt_gpt_config cb = small_config(3, 1, drop ? 0.1f : 0.0f);
    int B = 2, T = 9;
    CHECK(!mt_gpt_create(&a, &ca, &dev, B, T) && !mt_gpt_create(&b, &cb, &dev, B, T), "%s",
          mt_errmsg());
    mt_gpt_init_weights(&a, 3);
    mt_gpt_init_weights(&b, 3);
    int32_t in[18], tg[18];
    fill_tokens(in, 18, 61, 1);
    fill_tokens(tg, 18, 61, 2);
    mt_gpt_zero_grad(&a);
    mt_gpt_zero_grad(&b);
    CHECK(!mt_gpt_forward(&a, in, tg, 100) && !mt_gpt_backward(&a, 1.0f), "%s", mt_errmsg());
    CHECK(!mt_gpt_forward(&b, in, tg, 100) && !mt_gpt_backward(&b, 1.0f), "%s", mt_errmsg());
    CHECK(a.last_loss == b.last_loss, "loss %g vs %g", a.last_loss, b.last_loss);
    CHECK(!memcmp(a.grads, b.grads, a.num_params * sizeof(float)),
          "gradients differ with recompute (dropout %d)", drop);
    CHECK(b.acts_floats < a.acts_floats, "recompute should plan fewer activations");
    /* Megatron's block method: only the first two of the three blocks
     * recompute (sharing one set, the third keeping its own), the same
     * bits again, with a layout between the two */
    mt_gpt p;
    mt_gpt_config cp = cb;
    cp.recompute_layers = 2;
    CHECK(!mt_gpt_create(&p, &cp, &dev, B, T), "%s", mt_errmsg());
    mt_gpt_init_weights(&p, 3);
    mt_gpt_zero_grad(&p);
    CHECK(!mt_gpt_forward(&p, in, tg, 100) && !mt_gpt_backward(&p, 1.0f), "%s", mt_errmsg());
    CHECK(p.last_loss == a.last_loss && !memcmp(p.grads, a.grads, a.num_params * sizeof(float)),
          "gradients differ with two blocks recomputed (dropout %d)", drop);
    CHECK(b.acts_floats < p.acts_floats && p.acts_floats < a.acts_floats,
          "recomputing 2 of 3 blocks lays out %zu floats, all %zu, none %zu", p.acts_floats,
          b.acts_floats, a.acts_floats);
    mt_gpt_destroy(&p);
    /* a second micro-batch in flight (a pipeline's) adds its stream and
     * tokens, not another set of the recomputing blocks: one set serves all */
    mt_gpt two, two_none;
    mt_gpt_config c2 = cb, c2n = ca;
    c2.micro_slots = c2n.micro_slots = 2;
    CHECK(!mt_gpt_create(&two, &c2, &dev, B, T) && !mt_gpt_create(&two_none, &c2n, &dev, B, T),
          "%s", mt_errmsg());
    /* a block's set: qkv, atty, resid2 and fch, 9 B T C floats, and lse */
    size_t more = two.acts_floats - b.acts_floats, btc = (size_t)B * T * cb.n_embd;
    size_t more_none = two_none.acts_floats - a.acts_floats;
    CHECK(more_none - more >= 3 * 9 * btc,
          "a second slot adds %zu floats with recomputation, %zu without: not 3 sets fewer", more,
          more_none);
    mt_gpt_destroy(&two);
    mt_gpt_destroy(&two_none);
    mt_gpt_destroy(&a);
    mt_gpt_destroy(&b);
  }
  printf("  ok test_recompute_gives_identical_gradients\n");
}

/* Generation with a key-value cache: a forward over the first 5 tokens of a
 * row of 13 (padded with other tokens after them), then mt_gpt_decode of
 * positions 5..12, gives at every position the logits a whole forward over
 * those tokens gives (fp32 rounding apart: the decode attends row by row);
 * the position past the plan, a training model and a recomputing one are
 * refused, named. */
static void test_decode_matches_the_whole_forward(void) {
  enum { T = 13, P = 5 };
  mt_gpt whole, inc;
  mt_gpt_config c = small_config(3, 0, 0.1f); /* dropout: off once training is */
  CHECK(!mt_gpt_create(&whole, &c, &dev, 1, T) && !mt_gpt_create(&inc, &c, &dev, 1, T), "%s",
        mt_errmsg());
  mt_gpt_init_weights(&whole, 9);
  mt_gpt_init_weights(&inc, 9);
  int32_t tok[T], pad[T];
  fill_tokens(tok, T, 61, 4);
  fill_tokens(pad, T, 61, 5);
  CHECK(mt_gpt_decode(&inc, P, tok[P]) == MT_EINVAL && strstr(mt_errmsg(), "training off"),
        "a training model decoded: %s", mt_errmsg());
  whole.training = inc.training = 0;
  memcpy(pad, tok, P * sizeof *tok);
  CHECK(!mt_gpt_forward(&whole, tok, NULL, 0) && !mt_gpt_forward(&inc, pad, NULL, 0), "%s",
        mt_errmsg());
  for (int pos = P; pos < T; pos++) CHECK(!mt_gpt_decode(&inc, pos, tok[pos]), "%s", mt_errmsg());
  const float *a = mt_gpt_logits(&whole, 0), *b = mt_gpt_logits(&inc, 0);
  double worst = 0.0;
  for (int pos = 0; pos < T; pos++) {
    double num = 0.0, den = 0.0;
    for (int v = 0; v < c.vocab_size; v++) {
      double x = a[(size_t)pos * 64 + v], y = b[(size_t)pos * 64 + v];
      num += (x - y) * (x - y), den += x * x;
    }
    worst = fmax(worst, sqrt(num / den));
  }
  CHECK(worst < 1e-5, "decoded logits differ from the forward's by %.2e", worst);
  CHECK(mt_gpt_decode(&inc, T, 1) == MT_EINVAL && strstr(mt_errmsg(), "position 13"),
        "past the plan: %s", mt_errmsg());
  CHECK(mt_gpt_decode(&inc, 3, 61) == MT_EINVAL && strstr(mt_errmsg(), "token 61"),
        "a token outside the vocabulary: %s", mt_errmsg());
  mt_gpt_destroy(&whole);
  mt_gpt_destroy(&inc);
  mt_gpt_config r = small_config(1, 1, 0);
  CHECK(!mt_gpt_create(&inc, &r, &dev, 1, 4), "%s", mt_errmsg());
  inc.training = 0;
  CHECK(mt_gpt_decode(&inc, 0, 1) == MT_EINVAL && strstr(mt_errmsg(), "recomputation"),
        "a recomputing model decoded: %s", mt_errmsg());
  mt_gpt_destroy(&inc);
  printf("  ok test_decode_matches_the_whole_forward (worst row rel %.2e)\n", worst);
}

static void test_bad_tokens_are_refused_with_position(void) {
  mt_gpt m;
  mt_gpt_config c = small_config(1, 0, 0);
  CHECK(!mt_gpt_create(&m, &c, &dev, 1, 4), "%s", mt_errmsg());
  int32_t in[4] = {1, 2, 61, 3}, tg[4] = {1, 2, 3, 4};
  CHECK(mt_gpt_forward(&m, in, tg, 0) == MT_EINVAL && strstr(mt_errmsg(), "position 2"), "got: %s",
        mt_errmsg());
  CHECK(mt_gpt_backward(&m, 1.0f) == MT_EINVAL, "backward without a forward must fail");
  mt_gpt_config bad = small_config(1, 0, 0);
  bad.n_head = 5;
  mt_gpt m2;
  CHECK(mt_gpt_create(&m2, &bad, &dev, 1, 4) == MT_EINVAL && strstr(mt_errmsg(), "heads"),
        "got: %s", mt_errmsg());
  mt_gpt_destroy(&m);
  printf("  ok test_bad_tokens_are_refused_with_position\n");
}

static void test_lr_warmup_then_cosine_to_min(void) {
  mt_lr_spec s = {
      .kind = MT_LR_COSINE, .peak = 1.0, .min = 0.1, .warmup_steps = 10, .decay_steps = 110};
  /* Megatron's get_lr at num_steps = updates applied: the first update is
   * at 0, peak is reached after warmup_steps of them */
  CHECK(mt_lr_at(&s, 0) == 0.0, "first update %g", mt_lr_at(&s, 0));
  CHECK(fabs(mt_lr_at(&s, 1) - 0.1) < 1e-12, "second update %g", mt_lr_at(&s, 1));
  CHECK(fabs(mt_lr_at(&s, 9) - 0.9) < 1e-12, "last warmup update %g", mt_lr_at(&s, 9));
  CHECK(fabs(mt_lr_at(&s, 10) - 1.0) < 1e-12, "end of warmup %g", mt_lr_at(&s, 10));
  CHECK(fabs(mt_lr_at(&s, 60) - 0.55) < 1e-12, "cosine midpoint %g", mt_lr_at(&s, 60));
  CHECK(fabs(mt_lr_at(&s, 110) - 0.1) < 1e-12 && fabs(mt_lr_at(&s, 5000) - 0.1) < 1e-12,
        "after decay %g", mt_lr_at(&s, 110));
  s.kind = MT_LR_LINEAR;
  CHECK(fabs(mt_lr_at(&s, 35) - 0.775) < 1e-12, "linear quarter %g", mt_lr_at(&s, 35));
  mt_lr_spec k = {.kind = MT_LR_CONSTANT, .peak = 3e-4, .min = 3e-4};
  CHECK(mt_lr_at(&k, 0) == 3e-4 && mt_lr_at(&k, 1000000) == 3e-4, "constant");
  printf("  ok test_lr_warmup_then_cosine_to_min\n");
}

/* Megatron's get_lr for the two other decay styles, written out:
 *   inverse-square-root: lr = max(min, peak * sqrt(max(warmup, 1)) / sqrt(max(n, 1)))
 *   WSD: anneal = decay - wsd_decay; coeff 1 up to anneal, then over
 *        r = (n - anneal) / wsd_decay: linear 1 - r, cosine (cos(pi r) + 1) / 2,
 *        exponential 2 * 0.5^r - 1, minus_sqrt 1 - sqrt(r); lr = min + coeff (peak - min)
 * both after the linear warmup, and min past the decay steps. */
static void test_lr_inverse_square_root_and_wsd_are_megatrons(void) {
  mt_lr_spec s = {.kind = MT_LR_INVERSE_SQRT,
                  .peak = 1.0,
                  .min = 0.01,
                  .warmup_steps = 4,
                  .decay_steps = 1000000};
  const double isr[][2] = {{2, 0.5}, {4, 1.0}, {16, 0.5}, {64, 0.25}, {100, 0.2}, {1e5, 0.01}};
  for (size_t i = 0; i < sizeof isr / sizeof *isr; i++)
    CHECK(fabs(mt_lr_at(&s, isr[i][0]) - isr[i][1]) < 1e-12, "inverse-sqrt at %g: %g, want %g",
          isr[i][0], mt_lr_at(&s, isr[i][0]), isr[i][1]);
  s.decay_steps = 100;
  CHECK(mt_lr_at(&s, 101) == 0.01, "inverse-sqrt past the decay: %g", mt_lr_at(&s, 101));
  mt_lr_spec w = {.kind = MT_LR_WSD,
                  .peak = 1.0,
                  .min = 0.1,
                  .warmup_steps = 10,
                  .decay_steps = 110,
                  .wsd_decay_steps = 20};
  const struct {
    mt_wsd_style style;
    double at, want;
  } wsd[] = {
      {MT_WSD_LINEAR, 5, 0.5},
      {MT_WSD_LINEAR, 50, 1.0},
      {MT_WSD_LINEAR, 90, 1.0},
      {MT_WSD_LINEAR, 100, 0.55},
      {MT_WSD_LINEAR, 110, 0.1},
      {MT_WSD_LINEAR, 111, 0.1},
      {MT_WSD_COSINE, 100, 0.55},
      {MT_WSD_COSINE, 95, 0.1 + 0.9 * 0.5 * (cos(M_PI / 4) + 1)},
      {MT_WSD_EXPONENTIAL, 100, 0.1 + 0.9 * (2 * sqrt(0.5) - 1)},
      {MT_WSD_MINUS_SQRT, 100, 0.1 + 0.9 * (1 - sqrt(0.5))},
  };
  for (size_t i = 0; i < sizeof wsd / sizeof *wsd; i++) {
    w.wsd_style = wsd[i].style;
    CHECK(fabs(mt_lr_at(&w, wsd[i].at) - wsd[i].want) < 1e-12, "WSD style %d at %g: %g, want %g",
          (int)wsd[i].style, wsd[i].at, mt_lr_at(&w, wsd[i].at), wsd[i].want);
  }
  printf("  ok test_lr_inverse_square_root_and_wsd_are_megatrons\n");
}

/* Megatron's OptimizerParamScheduler.get_wd, written out: num_steps and
 * wd_incr_steps in samples; end past the increment and for constant (which
 * asserts start == end), then start + coeff (end - start) over ratio =
 * num_steps / wd_incr_steps: linear ratio, cosine (cos(pi (1 - ratio)) + 1) / 2. */
static double megatron_get_wd(double start, double end, const char *style, double num_steps,
                              double wd_incr_steps) {
  if (num_steps > wd_incr_steps || !strcmp(style, "constant")) return end;
  double ratio = num_steps / wd_incr_steps;
  double coeff = !strcmp(style, "linear") ? ratio : 0.5 * (cos(M_PI * (1.0 - ratio)) + 1.0);
  return start + coeff * (end - start);
}

/* get_lr's warmup with --lr-warmup-init: init + (max - init) n / warmup. */
static double megatron_warmup_lr(double init, double max, double num_steps, double warmup) {
  return init + (max - init) * num_steps / warmup;
}

/* mt_wd_at is Megatron's get_wd for every style, over the whole run (in
 * samples under a batch ramp-up, as the lr counts them), and mt_lr_at's
 * warmup starts at warmup_init under every schedule, as get_lr's does. */
static void test_wd_schedule_and_warmup_init_are_megatrons(void) {
  const char *styles[] = {"constant", "linear", "cosine"};
  const double at[] = {0, 1, 25, 50, 62.5, 99, 100, 101, 1000};
  for (int k = 0; k < 3; k++) {
    mt_wd_spec w = {.style = (mt_wd_style)k, .start = 0.01, .end = 0.1, .incr_steps = 100};
    if (k == MT_WD_CONSTANT) w.start = w.end;
    for (size_t i = 0; i < sizeof at / sizeof *at; i++) {
      /* Megatron counts samples: global batch 8, 800 samples over the run */
      double want = megatron_get_wd(w.start, w.end, styles[k], 8 * at[i], 800);
      CHECK(fabs(mt_wd_at(&w, at[i]) - want) < 1e-15, "wd %s at %g: %.17g, want %.17g", styles[k],
            at[i], mt_wd_at(&w, at[i]), want);
    }
  }
  mt_wd_spec c = {.style = MT_WD_COSINE, .start = 0.0, .end = 0.1, .incr_steps = 100};
  CHECK(fabs(mt_wd_at(&c, 50) - 0.05) < 1e-15 &&
            fabs(mt_wd_at(&c, 25) - 0.05 * (1 - sqrt(0.5))) < 1e-15,
        "cosine: %g at the middle, %g at a quarter", mt_wd_at(&c, 50), mt_wd_at(&c, 25));

  /* under a ramp-up (batches 4 until 16 samples are read, then 8) the
   * increment runs over the run's samples: Megatron's wd_incr_steps is
   * train_samples, 16 + 4 x 8 = 48 for 8 steps */
  char json[512];
  for (int k = 0; k < 3; k++) {
    snprintf(json, sizeof json,
             "{\"model\":{\"preset\":\"tiny\"},\"parallel\":{\"micro_batch\":4},"
             "\"train\":{\"global_batch\":8,\"steps\":8,\"rampup_batch\":{\"start\":4,"
             "\"increment\":4,\"samples\":16},\"weight_decay_schedule\":{\"style\":\"%s\","
             "\"start\":%s,\"end\":0.3},\"lr\":{\"peak\":1e-3}},\"data\":{\"path\":\"t.u16\"}}",
             styles[k], k ? "0.02" : "0.3");
    mt_job job;
    CHECK(!mt_job_parse(&job, json, "/tmp", preset_dirs, NULL), "%s", mt_errmsg());
    CHECK(mt_job_samples_of(&job, 0, 8) == 48, "the ramp-up run reads %lld samples",
          (long long)mt_job_samples_of(&job, 0, 8));
    int64_t num = 0; /* Megatron's num_steps: the samples of the updates applied */
    for (int s = 0; s <= 9; s++) {
      double got = mt_wd_at(&job.train.wd, (double)num / 8);
      double want = megatron_get_wd(k ? 0.02 : 0.3, 0.3, styles[k], (double)num, 48);
      CHECK(fabs(got - want) < 1e-15,
            "ramp-up, %s: update %d after %lld samples at wd %.17g, "
            "want %.17g",
            styles[k], s + 1, (long long)num, got, want);
      num += mt_job_batch_at(&job, num);
    }
  }

  mt_lr_spec kinds[] = {
      {.kind = MT_LR_COSINE, .peak = 1.0, .min = 0.1, .warmup_steps = 10, .decay_steps = 110},
      {.kind = MT_LR_LINEAR, .peak = 1.0, .min = 0.1, .warmup_steps = 10, .decay_steps = 110},
      {.kind = MT_LR_CONSTANT, .peak = 1.0, .min = 1.0, .warmup_steps = 10},
      {.kind = MT_LR_INVERSE_SQRT, .peak = 1.0, .min = 0.1, .warmup_steps = 10, .decay_steps = 110},
      {.kind = MT_LR_WSD,
       .peak = 1.0,
       .min = 0.1,
       .warmup_steps = 10,
       .decay_steps = 110,
       .wsd_decay_steps = 20},
  };
  const double warm[] = {0, 0.5, 1, 5, 9, 10};
  for (size_t k = 0; k < sizeof kinds / sizeof *kinds; k++) {
    mt_lr_spec s = kinds[k];
    double after = mt_lr_at(&s, 60);
    s.warmup_init = 0.2;
    for (size_t i = 0; i < sizeof warm / sizeof *warm; i++)
      CHECK(fabs(mt_lr_at(&s, warm[i]) - megatron_warmup_lr(0.2, 1.0, warm[i], 10)) < 1e-15,
            "schedule %d, warmup from 0.2 at %g: %.17g, want %.17g", (int)s.kind, warm[i],
            mt_lr_at(&s, warm[i]), megatron_warmup_lr(0.2, 1.0, warm[i], 10));
    CHECK(mt_lr_at(&s, 60) == after, "schedule %d after the warmup: %g, was %g", (int)s.kind,
          mt_lr_at(&s, 60), after);
  }
  printf("  ok test_wd_schedule_and_warmup_init_are_megatrons\n");
}

static int write_tokens(char *path, const uint16_t *t, size_t n) {
  strcpy(path, "/tmp/mtnlg-test-XXXXXX");
  int fd = mkstemp(path);
  if (fd < 0) return -1;
  ssize_t w = write(fd, t, n * sizeof(uint16_t));
  close(fd);
  return w == (ssize_t)(n * sizeof(uint16_t)) ? 0 : -1;
}

static void test_samples_overlap_by_one_token_and_wrap(void) {
  uint16_t t[11];
  for (int i = 0; i < 11; i++) t[i] = (uint16_t)i;
  char path[64];
  CHECK(!write_tokens(path, t, 11), "temp file");
  mt_token_file f;
  CHECK(!mt_tokens_open(&f, path), "%s", mt_errmsg());
  CHECK(mt_tokens_samples(&f, 4) == 2, "(11-1)/4 = 2 samples");
  int32_t in[12], tg[12];
  CHECK(!mt_tokens_read(&f, 1, 3, 4, 100, in, tg), "%s", mt_errmsg());
  /* sample 1 = tokens 4..8, sample 2 wraps to sample 0, sample 3 = sample 1 */
  CHECK(in[0] == 4 && tg[0] == 5 && tg[3] == 8, "sample 1: in %d tg %d..%d", in[0], tg[0], tg[3]);
  CHECK(in[4] == 0 && tg[7] == 4, "wrap to sample 0");
  CHECK(in[8] == 4, "sample 3 is sample 1 again");
  CHECK(mt_tokens_read(&f, 0, 1, 4, 4, in, tg) == MT_ECORRUPT && strstr(mt_errmsg(), "offset 4"),
        "token 4 >= vocab 4 must be refused: %s", mt_errmsg());
  mt_tokens_close(&f);
  unlink(path);
  /* an odd byte count is not a token file */
  strcpy(path, "/tmp/mtnlg-test-XXXXXX");
  int fd = mkstemp(path);
  CHECK(write(fd, "abc", 3) == 3, "write");
  close(fd);
  CHECK(mt_tokens_open(&f, path) == MT_ECORRUPT && strstr(mt_errmsg(), "3 bytes"), "%s",
        mt_errmsg());
  unlink(path);
  CHECK(mt_tokens_open(&f, "/nonexistent/x.u16") == MT_EIO &&
            strstr(mt_errmsg(), "/nonexistent/x.u16"),
        "%s", mt_errmsg());
  printf("  ok test_samples_overlap_by_one_token_and_wrap\n");
}

/* Runs `steps` steps of the tiny model with (global_batch 4, micro_batch mb),
 * returning the final parameters and the per-step losses. */
static int run_job(const char *data, int mb, float dropout, int steps, double *losses,
                   float **params, size_t *n) {
  char json[1024];
  snprintf(json, sizeof json,
           "{\"model\":{\"preset\":\"tiny\",\"seq_len\":16,\"hidden_dropout\":%g,"
           "\"attention_dropout\":%g},\"parallel\":{\"micro_batch\":%d},"
           "\"train\":{\"global_batch\":4,\"steps\":%d,\"seed\":5,\"lr\":{\"schedule\":\"cosine\","
           "\"peak\":2e-3,\"warmup_steps\":1}},\"data\":{\"path\":\"%s\"}}",
           dropout, dropout, mb, steps, data);
  mt_job job;
  mt_trainer tr;
  if (mt_job_parse(&job, json, NULL, preset_dirs, NULL)) return -1;
  if (mt_trainer_create(&tr, &job, &dev, NULL)) return -1;
  for (int s = 0; s < steps; s++) {
    mt_step_stats st;
    if (mt_trainer_step(&tr, &st)) return -1;
    losses[s] = st.loss;
  }
  *n = tr.model.num_params;
  *params = malloc(*n * sizeof(float));
  memcpy(*params, tr.model.params, *n * sizeof(float));
  mt_trainer_destroy(&tr);
  return 0;
}

/* DESIGN: the loss is the mean over the global batch whatever the split, and
 * dropout masks follow the global sample, so 1x4, 2x2 and 4x1 micro-batching
 * train the same trajectory up to float reduction order. */
static void test_microbatch_split_keeps_trajectory(void) {
  uint16_t t[4000];
  for (int i = 0; i < 4000; i++) t[i] = (uint16_t)((i * 7 + i / 13) % 256);
  char path[64];
  CHECK(!write_tokens(path, t, 4000), "temp file");
  for (int drop = 0; drop < 2; drop++) {
    double loss[3][4];
    float *p[3];
    size_t n = 0;
    int mbs[3] = {4, 2, 1};
    for (int k = 0; k < 3; k++)
      CHECK(!run_job(path, mbs[k], drop ? 0.1f : 0.0f, 4, loss[k], &p[k], &n), "%s", mt_errmsg());
    for (int k = 1; k < 3; k++) {
      for (int s = 0; s < 4; s++)
        CHECK(fabs(loss[k][s] - loss[0][s]) < 1e-5 * fabs(loss[0][s]),
              "dropout %d: micro_batch %d step %d loss %.9g vs %.9g", drop, mbs[k], s + 1,
              loss[k][s], loss[0][s]);
      double d2 = 0, r2 = 0;
      for (size_t i = 0; i < n; i++) {
        double e = (double)p[k][i] - p[0][i];
        d2 += e * e;
        r2 += (double)p[0][i] * p[0][i];
      }
      CHECK(sqrt(d2 / r2) < 1e-5, "dropout %d: micro_batch %d parameters differ by %g relative",
            drop, mbs[k], sqrt(d2 / r2));
    }
    CHECK(loss[0][3] < loss[0][0], "loss should fall on a repeating pattern: %g -> %g", loss[0][0],
          loss[0][3]);
    for (int k = 0; k < 3; k++) free(p[k]);
  }
  unlink(path);
  printf("  ok test_microbatch_split_keeps_trajectory\n");
}

/* A token file of a repeating pattern (4000 tokens) at path, and a scratch
 * directory at dir (a mkdtemp template). */
static int pattern_data(char *path, char *dir) {
  uint16_t t[4000];
  for (int i = 0; i < 4000; i++) t[i] = (uint16_t)((i * 7 + i / 13) % 256);
  return write_tokens(path, t, 4000) || !mkdtemp(dir) ? -1 : 0;
}

static void remove_data(const char *path, const char *dir) {
  char cmd[300];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
  CHECK(system(cmd) == 0, "cleanup of %s", dir);
  unlink(path);
}

/* A trainer of the tiny model at seq 16 over data, global batch G. */
static int tiny_trainer(mt_job *job, mt_trainer *tr, const char *data, int G, const char *ckpt,
                        const char *precision) {
  char json[1024];
  snprintf(json, sizeof json,
           "{\"name\":\"pos\",\"model\":{\"preset\":\"tiny\",\"seq_len\":16},"
           "\"parallel\":{\"micro_batch\":2},\"train\":{\"global_batch\":%d,\"steps\":20,"
           "\"seed\":5,\"precision\":\"%s\",\"lr\":{\"peak\":1e-3}},\"data\":{\"path\":\"%s\"},"
           "\"checkpoint\":{\"dir\":\"%s\"}}",
           G, precision, data, ckpt);
  int rc = mt_job_parse(job, json, NULL, preset_dirs, NULL);
  return rc ? rc : mt_trainer_create(tr, job, &dev, NULL);
}

/* An indexed dataset (data.prefix) sized by the job is read to the end of
 * the run by a run resumed with half its checkpoint's global batch: saved at
 * step 3 with 8 samples a step (24 read), the 17 steps left at 4 read up to
 * sample 92, past the 20 x 4 = 80 the data was first sized for. Before the
 * data was resized at resume, step 18 failed with "sample 80 of 80". */
static void test_resume_with_a_smaller_global_batch_reads_to_the_end(void) {
  char dir[] = "/tmp/mtnlg-test-ckpt-XXXXXX", prefix[128], job_dir[128], json[1024];
  if (!mkdtemp(dir)) {
    CHECK(0, "mkdtemp");
    return;
  }
  snprintf(prefix, sizeof prefix, "%s/corpus", dir);
  mt_indexed_writer *w = NULL;
  int32_t doc[300];
  int rc = mt_indexed_writer_open(&w, prefix, MT_IDX_U16);
  for (int d = 0; !rc && d < 20; d++) {
    for (int i = 0; i < 300; i++) doc[i] = (d * 31 + i * 7) % 256;
    rc = mt_indexed_writer_add_seq(w, doc, 300);
    if (!rc) rc = mt_indexed_writer_end_doc(w);
  }
  if (!rc) rc = mt_indexed_writer_finish(w);
  CHECK(!rc, "corpus: %s", mt_errmsg());
  mt_job job;
  mt_trainer tr;
  mt_step_stats st;
  mt_checkpoint_result res;
  int64_t resumed = -1;
  for (int G = 8; G >= 4; G /= 2) {
    snprintf(json, sizeof json,
             "{\"name\":\"reach\",\"model\":{\"preset\":\"tiny\",\"seq_len\":16},"
             "\"parallel\":{\"micro_batch\":2},\"train\":{\"global_batch\":%d,\"steps\":20,"
             "\"seed\":5,\"lr\":{\"peak\":1e-3}},\"data\":{\"prefix\":\"%s\","
             "\"split\":\"100,0,0\"},\"checkpoint\":{\"dir\":\"%s\"}}",
             G, prefix, dir);
    rc = mt_job_parse(&job, json, NULL, preset_dirs, NULL);
    if (!rc) rc = mt_trainer_create(&tr, &job, &dev, NULL);
    CHECK(!rc, "global batch %d: %s", G, mt_errmsg());
    if (rc) break;
    mt_checkpoint_job_dir(&job, job_dir, sizeof job_dir);
    if (G == 8) {
      for (int s = 0; s < 3; s++) CHECK(!mt_trainer_step(&tr, &st), "%s", mt_errmsg());
      CHECK(!mt_trainer_save(&tr, job_dir, &res), "save: %s", mt_errmsg());
    } else {
      CHECK(!mt_trainer_resume(&tr, job_dir, -1, &resumed), "resume: %s", mt_errmsg());
      int64_t failed_at = -1;
      while (tr.step < 20 && failed_at < 0)
        if (mt_trainer_step(&tr, &st)) failed_at = tr.step + 1;
      CHECK(failed_at < 0 && tr.step == 20 && tr.consumed_samples == 24 + 17 * 4,
            "resumed at step %lld, failed at step %lld (%s), %lld samples read, want 92",
            (long long)resumed, (long long)failed_at, failed_at < 0 ? "" : mt_errmsg(),
            (long long)tr.consumed_samples);
    }
    mt_trainer_destroy(&tr);
  }
  remove_data("/nonexistent", dir);
  printf("  ok test_resume_with_a_smaller_global_batch_reads_to_the_end\n");
}

/* Another n_head splits the same matrices another way: the parameter counts
 * agree, so a checkpoint or an export of a 4-head model loaded into an
 * 8-head one trained on without a word (Megatron's check_checkpoint_args
 * refuses it). Both are refused now, naming n_head. */
static void test_another_n_head_is_refused(void) {
  char path[64], dir[] = "/tmp/mtnlg-test-ckpt-XXXXXX", job_dir[128], json[1024], exported[160];
  CHECK(!pattern_data(path, dir), "temp files");
  snprintf(exported, sizeof exported, "%s/four-heads.safetensors", dir);
  mt_job job;
  mt_trainer tr;
  mt_step_stats st;
  mt_checkpoint_result res;
  int64_t resumed = -1;
  for (int k = 0; k < 3; k++) {
    int heads = k ? 8 : 4;
    snprintf(
        json, sizeof json,
        "{\"name\":\"heads\",\"model\":{\"preset\":\"tiny\",\"seq_len\":16,\"n_head\":%d%s%s%s},"
        "\"parallel\":{\"micro_batch\":2},\"train\":{\"global_batch\":4,\"steps\":20,"
        "\"seed\":5,\"lr\":{\"peak\":1e-3}},\"data\":{\"path\":\"%s\"},"
        "\"checkpoint\":{\"dir\":\"%s\"}}",
        heads, k == 2 ? ",\"init_from\":\"" : "", k == 2 ? exported : "", k == 2 ? "\"" : "", path,
        dir);
    int rc = mt_job_parse(&job, json, NULL, preset_dirs, NULL);
    CHECK(!rc, "job: %s", mt_errmsg());
    rc = mt_trainer_create(&tr, &job, &dev, NULL);
    if (k == 2) { /* init_from the 4-head export */
      CHECK(rc == MT_EINVAL &&
                strstr(mt_errmsg(), "__metadata__ says n_head 4, the job's model has 8"),
            "an 8-head model from a 4-head export: rc %d, %s", rc, mt_errmsg());
      if (!rc) mt_trainer_destroy(&tr);
      break;
    }
    CHECK(!rc, "create: %s", mt_errmsg());
    if (rc) break;
    mt_checkpoint_job_dir(&job, job_dir, sizeof job_dir);
    if (k == 0) {
      CHECK(!mt_trainer_step(&tr, &st), "%s", mt_errmsg());
      CHECK(!mt_trainer_save(&tr, job_dir, &res), "save: %s", mt_errmsg());
      CHECK(!mt_trainer_export(&tr, exported), "export: %s", mt_errmsg());
    } else {
      rc = mt_trainer_resume(&tr, job_dir, -1, &resumed);
      CHECK(rc == MT_EINVAL && strstr(mt_errmsg(), "with n_head 4, the job's has 8"),
            "an 8-head model from a 4-head checkpoint: rc %d, %s", rc, mt_errmsg());
    }
    mt_trainer_destroy(&tr);
  }
  remove_data(path, dir);
  printf("  ok test_another_n_head_is_refused\n");
}

/* The data position is saved and restored, not recomputed from the step: a
 * run resumed with twice the global batch reads on from the sample the
 * saved run stopped at (Megatron's consumed_train_samples), and its next
 * checkpoint says how many samples were read in all. Recomputed, it skipped
 * 3 x (8 - 4) samples and claimed 32 read at step 4. The resumed run is
 * fp16, the saved one fp32: its loss scale starts at the job's. */
static void test_resume_with_another_global_batch_reads_on(void) {
  char path[64], dir[] = "/tmp/mtnlg-test-ckpt-XXXXXX", job_dir[128];
  CHECK(!pattern_data(path, dir), "temp files");
  mt_job job;
  mt_trainer tr;
  mt_step_stats st;
  mt_checkpoint_result res;
  int64_t resumed = -1;
  CHECK(!tiny_trainer(&job, &tr, path, 4, dir, "fp32"), "%s", mt_errmsg());
  mt_checkpoint_job_dir(&job, job_dir, sizeof job_dir);
  for (int s = 0; s < 3; s++) CHECK(!mt_trainer_step(&tr, &st), "%s", mt_errmsg());
  CHECK(!mt_trainer_save(&tr, job_dir, &res), "save: %s", mt_errmsg());
  mt_trainer_destroy(&tr);
  /* and an fp16 run resumed from an fp32 one starts at the job's loss scale,
   * not at the 0 the fp32 run's unused scaler held (which backed off to 1) */
  CHECK(!tiny_trainer(&job, &tr, path, 8, dir, "fp16"), "%s", mt_errmsg());
  float initial = tr.scaler.scale;
  CHECK(!mt_trainer_resume(&tr, job_dir, -1, &resumed), "resume: %s", mt_errmsg());
  CHECK(resumed == 3 && tr.consumed_samples == 12, "resumed step %lld at sample %lld, want 3, 12",
        (long long)resumed, (long long)tr.consumed_samples);
  CHECK(tr.scaler.scale == initial && initial > 1.0f && tr.opt.t == 3,
        "fp16 from an fp32 checkpoint: scale %g (the job's %g), Adam's count %lld",
        (double)tr.scaler.scale, (double)initial, (long long)tr.opt.t);
  CHECK(!mt_trainer_step(&tr, &st), "%s", mt_errmsg());
  CHECK(st.step == 4 && st.consumed_tokens == 20 * 16, "step %lld: %lld tokens read, want %d",
        (long long)st.step, (long long)st.consumed_tokens, 20 * 16);
  CHECK(!mt_trainer_save(&tr, job_dir, &res), "save: %s", mt_errmsg());
  mt_trainer_destroy(&tr);
  char manifest[256];
  snprintf(manifest, sizeof manifest, "%s/step_00000004/manifest.json", job_dir);
  json_t *m = json_load_file(manifest, 0, NULL);
  json_int_t read = json_integer_value(json_object_get(m, "consumed_samples"));
  CHECK(read == 20, "the step 4 manifest says %lld samples read, want 20", (long long)read);
  json_decref(m);
  remove_data(path, dir);
  printf("  ok test_resume_with_another_global_batch_reads_on\n");
}

/* An fp16 run resumes with every counter of its loss scaler as saved: a
 * growth counter lost at resume delays the next growth by up to
 * growth_interval steps, which an overflow soon after the resume (that
 * resets it anyway) hides from a comparison of losses. */
static void test_fp16_resume_restores_every_loss_scaler_field(void) {
  char path[64], dir[] = "/tmp/mtnlg-test-ckpt-XXXXXX", job_dir[128];
  CHECK(!pattern_data(path, dir), "temp files");
  mt_job job;
  mt_trainer tr;
  mt_step_stats st;
  mt_checkpoint_result res;
  int64_t resumed = -1;
  CHECK(!tiny_trainer(&job, &tr, path, 4, dir, "fp16"), "%s", mt_errmsg());
  mt_checkpoint_job_dir(&job, job_dir, sizeof job_dir);
  for (int s = 0; s < 2; s++) CHECK(!mt_trainer_step(&tr, &st), "%s", mt_errmsg());
  /* values no fresh scaler holds, each field distinct */
  tr.scaler.scale = 4096.0f;
  tr.scaler.growth_tracker = 37;
  tr.scaler.hysteresis_tracker = -3;
  tr.scaler.steps = 1234;
  tr.scaler.skipped = 56;
  tr.scaler.skipped_in_row = 7;
  mt_loss_scale saved = tr.scaler;
  CHECK(!mt_trainer_save(&tr, job_dir, &res), "save: %s", mt_errmsg());
  mt_trainer_destroy(&tr);
  CHECK(!tiny_trainer(&job, &tr, path, 4, dir, "fp16"), "%s", mt_errmsg());
  CHECK(!mt_trainer_resume(&tr, job_dir, -1, &resumed) && resumed == 2, "resume: %s", mt_errmsg());
  const mt_loss_scale *got = &tr.scaler;
  CHECK(got->scale == saved.scale && got->growth_tracker == saved.growth_tracker &&
            got->hysteresis_tracker == saved.hysteresis_tracker && got->steps == saved.steps &&
            got->skipped == saved.skipped && got->skipped_in_row == saved.skipped_in_row,
        "resumed scaler: scale %g growth %d hysteresis %d steps %lld skipped %lld in a row %lld; "
        "saved %g %d %d %lld %lld %lld",
        (double)got->scale, got->growth_tracker, got->hysteresis_tracker, (long long)got->steps,
        (long long)got->skipped, (long long)got->skipped_in_row, (double)saved.scale,
        saved.growth_tracker, saved.hysteresis_tracker, (long long)saved.steps,
        (long long)saved.skipped, (long long)saved.skipped_in_row);
  mt_trainer_destroy(&tr);
  remove_data(path, dir);
  printf("  ok test_fp16_resume_restores_every_loss_scaler_field\n");
}

/* checkpoint.resume_step older than the newest checkpoint rolls back: the
 * newer ones are set aside (kept, renamed .rolled-back), latest names the
 * step loaded, and the run saves those steps again. Before, latest stayed
 * on the abandoned newest, so a restart went back to it, and saving its
 * step again was refused. And with keep 0 the next commit clears an
 * uncommitted leftover older than it (pruning used to run only with
 * keep > 0, so a cut-short save's preallocated files stayed). */
static void test_resume_step_rolls_back_and_sets_aside_newer(void) {
  char path[64], dir[] = "/tmp/mtnlg-test-ckpt-XXXXXX", job_dir[128];
  CHECK(!pattern_data(path, dir), "temp files");
  mt_job job;
  mt_trainer tr;
  mt_step_stats st;
  mt_checkpoint_result res;
  CHECK(!tiny_trainer(&job, &tr, path, 4, dir, "fp32"), "%s", mt_errmsg());
  mt_checkpoint_job_dir(&job, job_dir, sizeof job_dir);
  for (int s = 1; s <= 6; s++) {
    CHECK(!mt_trainer_step(&tr, &st), "%s", mt_errmsg());
    if (s % 3 == 0) CHECK(!mt_trainer_save(&tr, job_dir, &res), "save: %s", mt_errmsg());
  }
  mt_trainer_destroy(&tr);
  CHECK(!tiny_trainer(&job, &tr, path, 4, dir, "fp32"), "%s", mt_errmsg());
  int64_t resumed = -1;
  /* a step that was never saved is named, not "resume from DIR: " and nothing */
  int rc = mt_trainer_resume(&tr, job_dir, 5, &resumed);
  CHECK(rc == MT_ENOENT && strstr(mt_errmsg(), "checkpoint.resume_step 5: no committed checkpoint"),
        "resume_step 5: rc %d, %s", rc, mt_errmsg());
  CHECK(!mt_trainer_resume(&tr, job_dir, 3, &resumed) && resumed == 3, "resume: %s", mt_errmsg());
  mt_ckpt_entry *e = NULL;
  size_t n = 0;
  CHECK(!mt_ckpt_list(job_dir, &e, &n), "%s", mt_errmsg());
  CHECK(n == 1 && e[0].step == 3 && e[0].latest,
        "after the rollback: %zu checkpoint(s), newest %lld", n,
        n ? (long long)e[n - 1].step : -1LL);
  free(e);
  char aside[200];
  snprintf(aside, sizeof aside, "%s/step_00000006" MT_CKPT_ROLLED_BACK_SUFFIX, job_dir);
  CHECK(access(aside, F_OK) == 0, "%s: not there", aside);
  /* an uncommitted leftover (a save a crash cut short) goes at the next
   * commit, though checkpoint.keep is 0 (keep every committed one) */
  char leftover[200];
  snprintf(leftover, sizeof leftover, "%s/step_00000004", job_dir);
  CHECK(mkdir(leftover, 0755) == 0, "mkdir %s", leftover);
  for (int s = 4; s <= 6; s++) CHECK(!mt_trainer_step(&tr, &st), "%s", mt_errmsg());
  CHECK(!mt_trainer_save(&tr, job_dir, &res), "saving step 6 again: %s", mt_errmsg());
  CHECK(access(leftover, F_OK) != 0, "the uncommitted %s is still there", leftover);
  mt_trainer_destroy(&tr);
  remove_data(path, dir);
  printf("  ok test_resume_step_rolls_back_and_sets_aside_newer\n");
}

/* A checkpoint of step 0 (a job checkpointed before its first step) is one:
 * resuming from it says 0, where "nothing to resume" says -1 (both were 0,
 * so a resume from it was taken for a fresh start), and checkpoint.resume_step
 * 0 rolls back the newer ones as any older step does. */
static void test_step_0_checkpoint_is_resumed_and_rolls_back(void) {
  char path[64], dir[] = "/tmp/mtnlg-test-ckpt-XXXXXX", job_dir[128];
  CHECK(!pattern_data(path, dir), "temp files");
  mt_job job;
  mt_trainer tr;
  mt_step_stats st;
  mt_checkpoint_result res;
  CHECK(!tiny_trainer(&job, &tr, path, 4, dir, "fp32"), "%s", mt_errmsg());
  mt_checkpoint_job_dir(&job, job_dir, sizeof job_dir);
  int64_t resumed = 7;
  CHECK(!mt_trainer_resume(&tr, job_dir, -1, &resumed) && resumed == -1,
        "nothing to resume: rc %s, resumed %lld", mt_errmsg(), (long long)resumed);
  CHECK(!mt_trainer_save(&tr, job_dir, &res), "save of step 0: %s", mt_errmsg());
  for (int s = 1; s <= 3; s++) CHECK(!mt_trainer_step(&tr, &st), "%s", mt_errmsg());
  CHECK(!mt_trainer_save(&tr, job_dir, &res), "save of step 3: %s", mt_errmsg());
  mt_trainer_destroy(&tr);
  CHECK(!tiny_trainer(&job, &tr, path, 4, dir, "fp32"), "%s", mt_errmsg());
  CHECK(!mt_trainer_resume(&tr, job_dir, 0, &resumed) && resumed == 0 && tr.step == 0,
        "resume_step 0: %s, resumed %lld", mt_errmsg(), (long long)resumed);
  mt_ckpt_entry *e = NULL;
  size_t n = 0;
  CHECK(!mt_ckpt_list(job_dir, &e, &n), "%s", mt_errmsg());
  CHECK(n == 1 && e[0].step == 0 && e[0].latest, "after the rollback to 0: %zu checkpoint(s)", n);
  free(e);
  mt_trainer_destroy(&tr);
  remove_data(path, dir);
  printf("  ok test_step_0_checkpoint_is_resumed_and_rolls_back\n");
}

/* A pause ordered at a step with a scheduled checkpoint (async, every 4
 * steps) holds nothing back: that step's checkpoint commits while the run
 * is paused, so a node lost during the pause costs no work. The pause used
 * to come before the save (and before committing one in flight). */
static int64_t order_word; /* read by rank 0's thread: __atomic_* */
static int paused_at;

static void pause_at_4(const mt_step_stats *st, void *arg) {
  (void)arg;
  if (st->step == 3) /* acted on after step 4 */
    __atomic_store_n(&order_word, mt_order_word(1, MT_ORDER_PAUSE), __ATOMIC_RELEASE);
}

static void on_order(int kind, int64_t seq, int64_t step, void *arg) {
  (void)seq, (void)arg;
  if (kind == MT_ORDER_PAUSE) __atomic_store_n(&paused_at, (int)step, __ATOMIC_RELEASE);
}

/* The tiny model (batch 4 of 2-sample micro-batches) on path's tokens,
 * checkpointing into dir: train_more and ckpt_more are extra fields. */
static void parse_ckpt_job(mt_job *job, const char *name, const char *path, const char *dir,
                           int64_t steps, const char *train_more, const char *ckpt_more) {
  char json[1024];
  snprintf(json, sizeof json,
           "{\"name\":\"%s\",\"model\":{\"preset\":\"tiny\",\"seq_len\":16},"
           "\"parallel\":{\"micro_batch\":2},\"train\":{\"global_batch\":4,\"steps\":%lld,"
           "\"seed\":5,%s\"lr\":{\"peak\":1e-3}},\"data\":{\"path\":\"%s\"},"
           "\"checkpoint\":{\"dir\":\"%s\",%s}}",
           name, (long long)steps, train_more, path, dir, ckpt_more);
  CHECK(!mt_job_parse(job, json, NULL, preset_dirs, NULL), "%s", mt_errmsg());
}

static void test_pause_at_a_checkpoint_step_commits_it(void) {
  char path[64], dir[] = "/tmp/mtnlg-test-ckpt-XXXXXX";
  CHECK(!pattern_data(path, dir), "temp files");
  mt_job job;
  parse_ckpt_job(&job, "pause", path, dir, 40, "", "\"interval\":4,\"async\":true");
  order_word = 0, paused_at = 0;
  mt_local_opts o = {
      .job = &job, .order = &order_word, .on_step = pause_at_4, .on_order = on_order};
  mt_local *l = NULL;
  CHECK(!mt_local_start(&o, &l), "%s", mt_errmsg());
  for (int i = 0; i < 2000 && !__atomic_load_n(&paused_at, __ATOMIC_ACQUIRE); i++) usleep(5000);
  char job_dir[200];
  snprintf(job_dir, sizeof job_dir, "%s/pause", dir);
  int64_t latest = -1;
  for (int i = 0; i < 4000 && latest != 4; i++) { /* up to 20 s, paused */
    mt_ckpt_entry *e = NULL;
    size_t n = 0;
    if (!mt_ckpt_list(job_dir, &e, &n))
      for (size_t k = 0; k < n; k++)
        if (e[k].latest) latest = e[k].step;
    free(e);
    if (latest != 4) usleep(5000);
  }
  CHECK(paused_at == 4 && latest == 4,
        "paused after step %d; the latest checkpoint then: step %lld", paused_at,
        (long long)latest);
  __atomic_store_n(&order_word, mt_order_word(2, MT_ORDER_STOP), __ATOMIC_RELEASE);
  CHECK(!mt_local_wait(l), "%s", mt_errmsg());
  mt_local_free(l);
  remove_data(path, dir);
  printf("  ok test_pause_at_a_checkpoint_step_commits_it\n");
}

/* A resize ordered in the step after which the run stops (a multiple of
 * train.exit_interval, or the job's last): the run stops there with its
 * checkpoint, and the resize is refused (re-forming would train past the
 * stop, or re-form a job with nothing left), naming why. */
static int64_t acted_seq, acted_step, saved_step, resize_after;
static int acted_rc, stopped_why, took_effect;
static char acted_msg[300];

static void resize_at(const mt_step_stats *st, void *arg) {
  (void)arg;
  if (st->step == resize_after - 1) /* acted on after the next step */
    __atomic_store_n(&order_word, mt_order_word(1, MT_ORDER_RESIZE), __ATOMIC_RELEASE);
}

static void note_order(int kind, int64_t seq, int64_t step, void *arg) {
  (void)kind, (void)seq, (void)step, (void)arg;
  took_effect = 1;
}

static void note_checkpoint(int phase, int64_t step, int rc, const char *msg,
                            const mt_checkpoint_result *res, int64_t order_seq, void *arg) {
  (void)arg;
  if (phase == 1 && order_seq)
    acted_seq = order_seq, acted_step = step, acted_rc = rc,
    snprintf(acted_msg, sizeof acted_msg, "%s", msg ? msg : "");
  if (phase == 1 && !rc && res) saved_step = step;
}

static int64_t stopped_step, stopped_saved;
static char stopped_unsaved[300]; /* why the stop's save failed, "-" when it did not */

static void note_stopped(int64_t step, int why, const char *save_failed, int64_t saved, void *arg) {
  (void)arg;
  stopped_why = why, stopped_step = step, stopped_saved = saved;
  snprintf(stopped_unsaved, sizeof stopped_unsaved, "%s", save_failed ? save_failed : "-");
}

/* A resize that takes effect after step `after` of a job of `steps` with
 * train fields `more`: refused, the run stopping there for want_why. */
static void resize_in_the_last_step(const char *name, int64_t steps, const char *more,
                                    int64_t after, int want_why, const char *want_msg) {
  char path[64], dir[] = "/tmp/mtnlg-test-ckpt-XXXXXX";
  CHECK(!pattern_data(path, dir), "temp files");
  mt_job job;
  parse_ckpt_job(&job, name, path, dir, steps, more, "\"interval\":10");
  acted_seq = acted_step = saved_step = 0, acted_rc = took_effect = 0;
  stopped_why = -1, acted_msg[0] = 0;
  resize_after = after;
  /* after step 1: ordered before the run starts (read in step 1) */
  order_word = after == 1 ? mt_order_word(1, MT_ORDER_RESIZE) : 0;
  mt_local_opts o = {.job = &job,
                     .order = &order_word,
                     .on_step = resize_at,
                     .on_order = note_order,
                     .on_checkpoint = note_checkpoint,
                     .on_stopped = note_stopped};
  mt_local *l = NULL;
  CHECK(!mt_local_start(&o, &l), "%s", mt_errmsg());
  CHECK(!mt_local_wait(l), "%s", mt_errmsg());
  mt_local_free(l);
  CHECK(stopped_why == want_why && saved_step == resize_after,
        "stopped for %d (want %d), saved step %lld (want %lld)", stopped_why, want_why,
        (long long)saved_step, (long long)resize_after);
  CHECK(acted_seq == 1 && acted_step == resize_after && acted_rc == MT_ECANCELED &&
            strstr(acted_msg, want_msg) && !took_effect,
        "the resize's word: order %lld after step %lld, rc %d, \"%s\"%s", (long long)acted_seq,
        (long long)acted_step, acted_rc, acted_msg, took_effect ? "; said to take effect" : "");
  remove_data(path, dir);
}

static void test_resize_in_the_exit_interval_or_last_step_is_refused(void) {
  resize_in_the_last_step("exit", 40, "\"exit_interval\":4,", 4, MT_STOPPED_INTERVAL,
                          "train.exit_interval (4): no resize");
  /* a deadline past before the first step ends: it stops after step 1 */
  resize_in_the_last_step("exit-time", 40, "\"exit_duration_mins\":1e-9,", 1, MT_STOPPED_TIME,
                          "train.exit_duration_mins (1e-09) has passed: no resize");
  /* the last step: no stop is agreed (on_stopped is not called) */
  resize_in_the_last_step("exit-last", 6, "", 6, -1,
                          "step 6 is the job's last (train.steps): no resize");
  printf("  ok test_resize_in_the_exit_interval_or_last_step_is_refused\n");
}

/* Runs job `name` of `steps` (train fields `more`), saving every 4 steps,
 * with the save of step `bad` failing when fail (its directory a link to
 * itself, which root cannot follow either); what on_stopped was told is in
 * stopped_*. */
static void run_with_unwritable_step(const char *name, int64_t steps, const char *more, int64_t bad,
                                     int fail) {
  char path[64], dir[] = "/tmp/mtnlg-test-ckpt-XXXXXX", link[200], target[32];
  CHECK(!pattern_data(path, dir), "temp files");
  mt_job job;
  parse_ckpt_job(&job, name, path, dir, steps, more, "\"interval\":4");
  snprintf(link, sizeof link, "%s/%s", dir, name);
  CHECK(!mkdir(link, 0755), "mkdir %s", link);
  snprintf(target, sizeof target, "step_%08lld", (long long)bad);
  snprintf(link, sizeof link, "%s/%s/%s", dir, name, target);
  CHECK(!fail || !symlink(target, link), "symlink %s", link);
  stopped_why = -1, stopped_step = stopped_saved = -2, stopped_unsaved[0] = 0;
  mt_local_opts o = {.job = &job, .on_stopped = note_stopped};
  CHECK(!mt_local_run(&o), "%s", mt_errmsg());
  remove_data(path, dir);
}

/* A run that train.exit_interval stops after step 6, saving every 4 steps:
 * with step 6's save failing, the stop says why and that step 4 is the
 * newest checkpoint, so the node reports the steps since it lost; saved, it
 * says nothing failed. Before, a failed stop's save was told as a clean
 * stop. */
static void test_a_stop_whose_checkpoint_fails_says_so(void) {
  for (int fail = 0; fail < 2; fail++) {
    run_with_unwritable_step("unsaved", 40, "\"exit_interval\":6,", 6, fail);
    int ok = stopped_why == MT_STOPPED_INTERVAL && stopped_step == 6 &&
             (fail ? strstr(stopped_unsaved, "step_00000006") && stopped_saved == 4
                   : !strcmp(stopped_unsaved, "-") && stopped_saved == 6);
    CHECK(ok, "%s: stopped after step %lld for %d, newest checkpoint %lld, save failed: %s",
          fail ? "step 6 unwritable" : "written", (long long)stopped_step, stopped_why,
          (long long)stopped_saved, stopped_unsaved);
  }
  printf("  ok test_a_stop_whose_checkpoint_fails_says_so\n");
}

/* The job's last step is a stop too: its checkpoint failing is told as a
 * stop's is, with the newest checkpoint, where the run was reported
 * completed and the steps since it lost without a word to the owner. */
static void test_the_last_steps_failed_checkpoint_is_told(void) {
  for (int fail = 0; fail < 2; fail++) {
    run_with_unwritable_step("lastunsaved", 8, "", 8, fail);
    int ok =
        fail ? stopped_step == 8 && strstr(stopped_unsaved, "step_00000008") && stopped_saved == 4
             : stopped_step == -2; /* saved: nothing to tell */
    CHECK(ok, "%s: told after step %lld, newest checkpoint %lld, save failed: %s",
          fail ? "step 8 unwritable" : "written", (long long)stopped_step, (long long)stopped_saved,
          stopped_unsaved);
  }
  printf("  ok test_the_last_steps_failed_checkpoint_is_told\n");
}

/* checkpoint.load (Megatron's --load with --finetune): another job's
 * checkpoint gives the master weights and nothing else (step 0, no data
 * read, Adam's moments zero and its count 0), or with load_optimizer its
 * moments and count too; the trainer's state is the checkpoint's arrays
 * exactly. */
static void test_load_from_takes_weights_and_optionally_the_moments(void) {
  char path[64], dir[] = "/tmp/mtnlg-test-ckpt-XXXXXX", dir2[] = "/tmp/mtnlg-test-ckpt-XXXXXX";
  char job_dir[128];
  CHECK(!pattern_data(path, dir) && mkdtemp(dir2), "temp files");
  mt_job job;
  mt_trainer tr;
  mt_step_stats st;
  mt_checkpoint_result res;
  CHECK(!tiny_trainer(&job, &tr, path, 4, dir, "fp32"), "%s", mt_errmsg());
  mt_checkpoint_job_dir(&job, job_dir, sizeof job_dir);
  for (int s = 0; s < 3; s++) CHECK(!mt_trainer_step(&tr, &st), "%s", mt_errmsg());
  CHECK(!mt_trainer_save(&tr, job_dir, &res), "save: %s", mt_errmsg());
  mt_trainer_destroy(&tr);
  mt_ckpt c;
  CHECK(!mt_ckpt_open_path(job_dir, MT_CKPT_VERIFY_CHECKSUMS, &c), "%s", mt_errmsg());
  size_t n = c.files[0].n;
  float *want = malloc(3 * n * sizeof(float)), *got = malloc(3 * n * sizeof(float));
  CHECK(want && got, "memory");
  const char *arrays[3] = {"master", "adam_m", "adam_v"};
  for (int a = 0; a < 3; a++)
    CHECK(!mt_ckpt_read(&c, 0, 0, arrays[a], 0, n, want + a * n), "%s", mt_errmsg());
  mt_ckpt_close(&c);
  for (int opt = 0; opt < 2; opt++) {
    CHECK(!tiny_trainer(&job, &tr, path, 4, dir2, "fp32"), "%s", mt_errmsg());
    CHECK(tr.model.num_params == n, "model of %zu, checkpoint of %zu", tr.model.num_params, n);
    CHECK(!mt_trainer_load_from(&tr, job_dir, opt), "load (optimizer %d): %s", opt, mt_errmsg());
    CHECK(!mt_device_memcpy_dtoh(&dev, got, tr.model.params, n * sizeof(float)) &&
              !mt_device_memcpy_dtoh(&dev, got + n, tr.opt.m, n * sizeof(float)) &&
              !mt_device_memcpy_dtoh(&dev, got + 2 * n, tr.opt.v, n * sizeof(float)),
          "%s", mt_errmsg());
    CHECK(!memcmp(got, want, n * sizeof(float)), "optimizer %d: master weights not loaded", opt);
    size_t nonzero = 0;
    for (size_t i = n; i < 3 * n; i++) nonzero += got[i] != 0.0f;
    if (opt)
      CHECK(!memcmp(got + n, want + n, 2 * n * sizeof(float)), "moments not the checkpoint's");
    else
      CHECK(!nonzero, "load_optimizer false: %zu moments not zero", nonzero);
    CHECK(tr.step == 0 && tr.consumed_samples == 0 && tr.lr_samples == 0 &&
              tr.opt.t == (opt ? 3 : 0),
          "optimizer %d: step %lld, sample %lld, lr samples %lld, Adam's count %lld", opt,
          (long long)tr.step, (long long)tr.consumed_samples, (long long)tr.lr_samples,
          (long long)tr.opt.t);
    CHECK(!mt_trainer_step(&tr, &st) && st.step == 1 && st.consumed_tokens == 4 * 16,
          "first step after the load: step %lld, %lld tokens", (long long)st.step,
          (long long)st.consumed_tokens);
    mt_trainer_destroy(&tr);
  }
  free(want);
  free(got);
  remove_data(path, dir);
  remove_data(path, dir2);
  printf("  ok test_load_from_takes_weights_and_optionally_the_moments\n");
}

/* Runs fn(arg) with this process's stderr (where the log goes) into out. */
static int with_stderr_captured(char *out, size_t cap, int (*fn)(void *), void *arg) {
  char path[] = "/tmp/mtnlg-test-stderr-XXXXXX";
  int fd = mkstemp(path), saved = dup(2);
  if (fd < 0 || saved < 0) return -1;
  dup2(fd, 2);
  int rc = fn(arg);
  dup2(saved, 2);
  close(saved);
  ssize_t n = pread(fd, out, cap - 1, 0);
  out[n > 0 ? n : 0] = '\0';
  close(fd);
  unlink(path);
  return rc;
}

static int resume_newest(void *arg) {
  mt_trainer *tr = arg;
  char job_dir[128];
  int64_t resumed;
  mt_checkpoint_job_dir(tr->job, job_dir, sizeof job_dir);
  return mt_trainer_resume(tr, job_dir, -1, &resumed);
}

/* Copies this (dp 1) trainer's master weights and Adam's moments. */
static int snapshot_update_state(mt_trainer *tr, float *p, float *m, float *v) {
  size_t n = tr->opt.n, bytes = n * sizeof(float);
  return mt_device_memcpy_dtoh(tr->dev, p, tr->model.params, bytes) ||
         mt_device_memcpy_dtoh(tr->dev, m, tr->opt.m, bytes) ||
         mt_device_memcpy_dtoh(tr->dev, v, tr->opt.v, bytes);
}

/* The largest |p1 - AdamW's update of p0| over the trainer's tensors, in
 * float roundings (of the weight's magnitude, and of the step: lr x 1e-6),
 * the update written out (torch.optim.AdamW's: p (1 - lr wd) - lr m^ /
 * (sqrt(v^) + eps), wd only on the tensors that decay) with Adam's new
 * moments m1, v1 at its count t: the gradient needs no recomputing. */
static double adamw_mismatch(const mt_trainer *tr, const float *p0, const float *p1,
                             const float *m1, const float *v1, double lr, double wd) {
  const mt_job *job = tr->job;
  double t = (double)tr->opt.t, worst = 0.0;
  double bc1 = 1.0 - pow(job->train.beta1, t), bc2 = 1.0 - pow(job->train.beta2, t);
  for (int k = 0; k < tr->model.n_tensors; k++) {
    const mt_param *q = &tr->model.params_table[k];
    double d = q->decay ? wd : 0.0;
    for (size_t i = q->offset; i < q->offset + q->numel; i++) {
      double want = (double)p0[i] * (1.0 - lr * d) -
                    lr * (m1[i] / bc1) / (sqrt(v1[i] / bc2) + job->train.adam_eps);
      double e = fabs(p1[i] - want) / (2e-7 * fabs(want) + 1e-6 * lr);
      if (e > worst) worst = e;
    }
  }
  return worst;
}

/* The trainer's updates apply Megatron's weight decay of each step
 * (train.weight_decay_schedule, cosine from 0.02 to 0.5 here) and the lr of
 * a warmup from train.lr.warmup_init, both at the samples of the updates
 * applied under a batch ramp-up (batches 2, 2, 2, 2, then 4: the run's 16
 * samples are 4 steps of global_batch 4), before and after a resume (which
 * recomputes them from the checkpoint's count). Every step is checked
 * against AdamW with get_wd's and get_lr's values, and would not pass at the
 * job's constant end value (what a schedule that never reached the
 * optimizer would leave). */
static void test_trainer_applies_the_scheduled_weight_decay_and_warmup_lr(void) {
  char path[64], dir[] = "/tmp/mtnlg-test-ckpt-XXXXXX", job_dir[128], json[1024];
  CHECK(!pattern_data(path, dir), "temp files");
  snprintf(json, sizeof json,
           "{\"name\":\"wd\",\"model\":{\"preset\":\"tiny\",\"seq_len\":16},"
           "\"parallel\":{\"micro_batch\":2},\"train\":{\"global_batch\":4,\"steps\":6,"
           "\"seed\":5,\"clip_grad\":0,\"rampup_batch\":{\"start\":2,\"increment\":2,"
           "\"samples\":8},\"weight_decay_schedule\":{\"style\":\"cosine\",\"start\":0.02,"
           "\"end\":0.5},\"lr\":{\"schedule\":\"constant\",\"peak\":2e-3,\"warmup_steps\":2,"
           "\"warmup_init\":5e-4}},\"data\":{\"path\":\"%s\"},\"checkpoint\":{\"dir\":\"%s\"}}",
           path, dir);
  mt_job job;
  mt_trainer tr;
  mt_step_stats st;
  mt_checkpoint_result res;
  int64_t resumed = -1;
  CHECK(!mt_job_parse(&job, json, NULL, preset_dirs, NULL), "%s", mt_errmsg());
  CHECK(!mt_trainer_create(&tr, &job, &dev, NULL), "%s", mt_errmsg());
  mt_checkpoint_job_dir(&job, job_dir, sizeof job_dir);
  size_t n = tr.opt.n;
  float *buf = malloc(6 * n * sizeof(float));
  CHECK(buf, "memory");
  float *p0 = buf, *m0 = buf + n, *v0 = buf + 2 * n, *p1 = buf + 3 * n, *m1 = buf + 4 * n,
        *v1 = buf + 5 * n;
  int64_t num = 0; /* Megatron's num_steps: samples of the updates applied; 16 in all */
  for (int s = 1; s <= 6; s++) {
    if (s == 4) { /* a resume recomputes both from its step */
      CHECK(!mt_trainer_save(&tr, job_dir, &res), "save: %s", mt_errmsg());
      mt_trainer_destroy(&tr);
      CHECK(!mt_trainer_create(&tr, &job, &dev, NULL), "%s", mt_errmsg());
      CHECK(!mt_trainer_resume(&tr, job_dir, -1, &resumed) && resumed == 3, "resume: %s",
            mt_errmsg());
    }
    CHECK(!snapshot_update_state(&tr, p0, m0, v0), "%s", mt_errmsg());
    CHECK(!mt_trainer_step(&tr, &st) && !st.skipped, "step %d: %s", s, mt_errmsg());
    CHECK(!snapshot_update_state(&tr, p1, m1, v1), "%s", mt_errmsg());
    double wd = megatron_get_wd(0.02, 0.5, "cosine", (double)num, 16);
    double lr = num <= 8 ? megatron_warmup_lr(5e-4, 2e-3, (double)num, 8) : 2e-3;
    CHECK(fabs(st.lr - lr) < 1e-15, "step %d: lr %.17g, want %.17g", s, st.lr, lr);
    double err = adamw_mismatch(&tr, p0, p1, m1, v1, lr, wd);
    double at_end = adamw_mismatch(&tr, p0, p1, m1, v1, lr, 0.5);
    printf("    step %d: wd %.6f, lr %.6g: %.3g roundings from AdamW's update, %.3g at wd 0.5\n", s,
           wd, lr, err, at_end);
    CHECK(err < 1.0,
          "step %d (%lld samples applied): %.3g roundings from AdamW at wd %.6g, lr %.6g", s,
          (long long)num, err, wd, lr);
    /* the check tells the scheduled decay from the constant one */
    CHECK(wd > 0.49 || at_end > 20,
          "step %d: wd 0.5 for %.6g gives updates only %.3g roundings off", s, wd, at_end);
    num += mt_job_batch_at(&job, num);
  }
  CHECK(num == 16 && tr.lr_samples == 16, "samples applied %lld, the trainer's %lld",
        (long long)num, (long long)tr.lr_samples);
  mt_trainer_destroy(&tr);
  /* resumed under another run length, the increment spans another run: the
   * resume says the run departs from the saved trajectory with train.steps
   * (without a schedule, a length is no change of course) */
  char said[4096] = "", *at = strstr(json, "\"steps\":6");
  CHECK(at, "the job's steps");
  at[8] = '8';
  mt_job longer;
  CHECK(!mt_job_parse(&longer, json, NULL, preset_dirs, NULL), "%s", mt_errmsg());
  CHECK(!mt_trainer_create(&tr, &longer, &dev, NULL), "%s", mt_errmsg());
  int rc = with_stderr_captured(said, sizeof said, resume_newest, &tr);
  mt_trainer_destroy(&tr);
  CHECK(!rc, "resume under 8 steps: %s", said);
  const char *line = strstr(said, "departs from the saved run's trajectory: ");
  const char *also = line ? strstr(line, "(also changed") : NULL;
  const char *steps = line ? strstr(line, "train.steps 6 -> 8") : NULL;
  CHECK(steps && (!also || steps < also),
        "a resume under 8 steps of a 6-step weight-decay schedule said:\n%s", said);
  free(buf);
  remove_data(path, dir);
  printf("  ok test_trainer_applies_the_scheduled_weight_decay_and_warmup_lr\n");
}

int main(void) {
  if (mt_device_open(&dev, "cpu:0")) {
    printf("cannot open cpu:0: %s\n", mt_errmsg());
    return 1;
  }
  test_init_depends_only_on_seed_and_tensor_name();
  test_init_std_and_scaled_output_projections();
  test_recompute_gives_identical_gradients();
  test_chunks_are_views_that_share_working_buffers();
  test_bad_tokens_are_refused_with_position();
  test_decode_matches_the_whole_forward();
  test_lr_warmup_then_cosine_to_min();
  test_lr_inverse_square_root_and_wsd_are_megatrons();
  test_wd_schedule_and_warmup_init_are_megatrons();
  test_samples_overlap_by_one_token_and_wrap();
  test_microbatch_split_keeps_trajectory();
  test_resume_with_another_global_batch_reads_on();
  test_fp16_resume_restores_every_loss_scaler_field();
  test_resume_with_a_smaller_global_batch_reads_to_the_end();
  test_another_n_head_is_refused();
  test_pause_at_a_checkpoint_step_commits_it();
  test_resize_in_the_exit_interval_or_last_step_is_refused();
  test_a_stop_whose_checkpoint_fails_says_so();
  test_the_last_steps_failed_checkpoint_is_told();
  test_resume_step_rolls_back_and_sets_aside_newer();
  test_step_0_checkpoint_is_resumed_and_rolls_back();
  test_load_from_takes_weights_and_optionally_the_moments();
  test_trainer_applies_the_scheduled_weight_decay_and_warmup_lr();
  printf("%s\n", failures ? "FAILED" : "all passed");
  return failures ? 1 : 0;
}
