/* test_job.c — the job spec: presets, overrides, unknown keys, validation
 * messages (one line per problem, each naming its key), token lengths, hash. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "err.h"
#include "job.h"

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

/* tiny_job's hash from before train.lr.warmup_init and
 * train.weight_decay_schedule: a job without them keeps its hash */
#define TINY_JOB_HASH "ada038af3160cc86"

/* A small valid job; tests edit it through overrides. */
static const char *tiny_job = "{\"model\": {\"preset\": \"tiny\"},"
                              " \"train\": {\"global_batch\": 8, \"steps\": 10,"
                              "             \"lr\": {\"peak\": 1e-3}},"
                              " \"data\": {\"path\": \"tokens.u16\"}}";

static int parse_with(mt_job *job, const char *json, const char *ov0, const char *ov1) {
  const char *ovs[3] = {ov0, ov0 ? ov1 : NULL, NULL};
  return mt_job_parse(job, json, "/jobs", presets, ovs);
}

static int count_lines(const char *s) {
  int n = *s ? 1 : 0;
  for (; *s; s++) n += *s == '\n';
  return n;
}

/* Whether some line of msg starts with prefix. */
static int has_line(const char *msg, const char *prefix) {
  size_t n = strlen(prefix);
  for (const char *l = msg; l; l = strchr(l, '\n')) {
    if (*l == '\n') l++;
    if (!strncmp(l, prefix, n)) return 1;
  }
  return 0;
}

/* A job the parser must refuse with one line: overrides ov0 and ov1 on
 * tiny_job, and the start of the line. */
typedef struct refusal {
  const char *ov0, *ov1, *line;
} refusal;

/* Each case refused (MT_EINVAL) with exactly its one line; fn names the
 * test in what a failure prints. */
static void one_line_refusals(const refusal *cases, size_t n, const char *fn) {
  mt_job job;
  for (size_t i = 0; i < n; i++) {
    int rc = parse_with(&job, tiny_job, cases[i].ov0, cases[i].ov1);
    if (rc != MT_EINVAL || !has_line(mt_errmsg(), cases[i].line) || count_lines(mt_errmsg()) != 1) {
      fprintf(stderr, "%s: case %zu: want the one line \"%s...\", got rc %d:\n%s\n", fn, i,
              cases[i].line, rc, mt_errmsg());
      failures++;
    }
  }
}

static void test_tiny_preset_loads(void) {
  mt_job job;
  CHECK(parse_with(&job, tiny_job, NULL, NULL) == MT_OK);
  CHECK(!strcmp(job.model.preset, "tiny"));
  CHECK(job.model.n_layer == 2 && job.model.n_embd == 64 && job.model.n_head == 4);
  CHECK(job.model.vocab_size == 256 && job.model.seq_len == 64);
  CHECK(job.model.vocab_pad_to == 128 && job.model.padded_vocab == 256);
  CHECK(fabsf(job.model.init_std - 0.02f) < 1e-9f && fabsf(job.model.ln_eps - 1e-5f) < 1e-12f);
  CHECK(job.model.hidden_dropout == 0.0f && job.model.attention_dropout == 0.0f);
  CHECK(!strcmp(job.name, "job"));
  CHECK(job.parallel.tp == 1 && job.parallel.pp == 1 && job.parallel.dp_min == 1);
  CHECK(job.parallel.dp_max == 1 && job.parallel.micro_batch == 1 && !job.parallel.recompute);
  CHECK(!strcmp(job.parallel.schedule, "1f1b"));
  CHECK(job.train.seed == 1234 && job.train.lr.kind == MT_LR_COSINE);
  CHECK(fabs(job.train.lr.min - 1e-4) < 1e-12);
  CHECK(job.train.lr.warmup_steps == 0 && job.train.lr.decay_steps == 10);
  CHECK(job.train.beta1 == 0.9 && job.train.beta2 == 0.95 && job.train.adam_eps == 1e-8);
  CHECK(job.train.weight_decay == 0.1 && job.train.clip_grad == 1.0);
  CHECK(!strcmp(job.train.precision, "fp32") && job.train.log_interval == 1);
  CHECK(!strcmp(job.data.path, "/jobs/tokens.u16"));
  CHECK(job.checkpoint.dir[0] == '\0' && job.checkpoint.interval == 0);
  CHECK(!strcmp(job.checkpoint.export_dtype, "fp32"));
  CHECK(job.model.max_positions == job.model.seq_len); /* one position per token */
  CHECK(strlen(job.hash) == 16);
}

static void test_job_fields_override_preset_fields(void) {
  mt_job job;
  const char *json = "{\"model\": {\"preset\": \"tiny\", \"n_layer\": 4, \"seq_len\": 32},"
                     " \"train\": {\"global_batch\": 8, \"steps\": 10, \"lr\": {\"peak\": 1e-3}},"
                     " \"data\": {\"path\": \"t.u16\"}}";
  CHECK(parse_with(&job, json, NULL, NULL) == MT_OK);
  CHECK(job.model.n_layer == 4 && job.model.seq_len == 32 && job.model.n_embd == 64);
}

static void test_model_given_field_by_field_needs_no_preset(void) {
  mt_job job;
  const char *json = "{\"model\": {\"n_layer\": 1, \"n_embd\": 8, \"n_head\": 2,"
                     "            \"vocab_size\": 300, \"seq_len\": 4, \"vocab_pad_to\": 64},"
                     " \"parallel\": {\"tp\": 2},"
                     " \"train\": {\"global_batch\": 2, \"steps\": 1, \"lr\": {\"peak\": 1}},"
                     " \"data\": {\"path\": \"/abs/t.u16\"}}";
  CHECK(mt_job_parse(&job, json, NULL, NULL, NULL) == MT_OK);
  CHECK(job.model.preset[0] == '\0');
  CHECK(job.model.padded_vocab == 384); /* roundup(300, 64 * tp 2) */
  CHECK(!strcmp(job.data.path, "/abs/t.u16"));
}

static void test_override_sets_nested_key(void) {
  mt_job job;
  CHECK(parse_with(&job, tiny_job, "train.lr.peak=3e-4", "checkpoint.dir=ck") == MT_OK);
  CHECK(fabs(job.train.lr.peak - 3e-4) < 1e-15);
  /* an override path is the caller's, not the job file's: it stays relative */
  CHECK(!strcmp(job.checkpoint.dir, "ck"));
  CHECK(parse_with(&job, tiny_job, "model.preset=gpt2-124m", "data.path=x.u16") == MT_OK);
  CHECK(job.model.n_layer == 12 && job.model.vocab_size == 50257);
  CHECK(job.model.padded_vocab == 50304);
  CHECK(!strcmp(job.data.path, "x.u16"));
  CHECK(parse_with(&job, tiny_job, "parallel.recompute=true", "name=run-7") == MT_OK);
  CHECK(job.parallel.recompute == 1 && !strcmp(job.name, "run-7"));
  /* sequence parallelism: off unless asked, in the canonical JSON only when on
   * (the jobs from before it keep their hash), and read back from it */
  CHECK(parse_with(&job, tiny_job, NULL, NULL) == MT_OK && !job.parallel.sequence_parallel);
  char *canon = mt_job_to_json(&job);
  CHECK(canon && !strstr(canon, "sequence_parallel"));
  free(canon);
  CHECK(parse_with(&job, tiny_job, "parallel.sequence_parallel=true", "parallel.tp=2") == MT_OK);
  CHECK(job.parallel.sequence_parallel == 1);
  canon = mt_job_to_json(&job);
  mt_job back;
  CHECK(canon && strstr(canon, "\"sequence_parallel\":true") &&
        mt_job_parse(&back, canon, "/jobs", presets, NULL) == MT_OK);
  CHECK(back.parallel.sequence_parallel == 1 && !strcmp(back.hash, job.hash));
  free(canon);
  /* recompute_layers: with recompute only, never negative, in the hash when set */
  CHECK(parse_with(&job, tiny_job, "parallel.recompute=true", "parallel.recompute_layers=1") ==
        MT_OK);
  CHECK(job.parallel.recompute_layers == 1);
  canon = mt_job_to_json(&job);
  CHECK(canon && strstr(canon, "\"recompute_layers\":1"));
  free(canon);
  CHECK(parse_with(&job, tiny_job, "parallel.recompute_layers=1", NULL) == MT_EINVAL);
  CHECK(
      strstr(mt_errmsg(), "parallel.recompute_layers: 1 recomputes only with parallel.recompute"));
  CHECK(parse_with(&job, tiny_job, "parallel.recompute=true", "parallel.recompute_layers=-1") ==
        MT_EINVAL);
  CHECK(strstr(mt_errmsg(), "parallel.recompute_layers: -1 must be >= 0"));
  /* exit_duration_mins: needs somewhere to save what it stops */
  CHECK(parse_with(&job, tiny_job, "train.exit_duration_mins=90", "checkpoint.dir=ck") == MT_OK);
  CHECK(job.train.exit_duration_mins == 90.0);
  CHECK(parse_with(&job, tiny_job, "train.exit_duration_mins=90", NULL) == MT_EINVAL);
  CHECK(strstr(mt_errmsg(), "train.exit_duration_mins: 90 needs checkpoint.dir"));
  CHECK(parse_with(&job, tiny_job, "train.exit_duration_mins=-1", NULL) == MT_EINVAL);
  CHECK(strstr(mt_errmsg(), "train.exit_duration_mins: -1 must be from 0"));
  /* exit_interval, the same: and a whole count of steps */
  CHECK(parse_with(&job, tiny_job, "train.exit_interval=5", "checkpoint.dir=/ck") == MT_OK);
  CHECK(job.train.exit_interval == 5);
  /* in the canonical form the nodes of a cluster read the job from */
  canon = mt_job_to_json(&job);
  CHECK(canon && strstr(canon, "\"exit_interval\":5") &&
        mt_job_parse(&back, canon, "/jobs", presets, NULL) == MT_OK);
  CHECK(back.train.exit_interval == 5 && !strcmp(back.hash, job.hash));
  free(canon);
  CHECK(parse_with(&job, tiny_job, "train.exit_interval=5", NULL) == MT_EINVAL);
  CHECK(strstr(mt_errmsg(), "train.exit_interval: 5 needs checkpoint.dir"));
  CHECK(parse_with(&job, tiny_job, "train.exit_interval=-2", "checkpoint.dir=ck") == MT_EINVAL);
  CHECK(strstr(mt_errmsg(), "train.exit_interval"));
  CHECK(parse_with(&job, tiny_job, "train.exit_interval=2.5", "checkpoint.dir=ck") == MT_EINVAL);
  CHECK(strstr(mt_errmsg(), "train.exit_interval: expected an integer"));
  /* virtual_stages: 1 unless asked, in the canonical form (and hash) only
   * when more, and refused where the interleaved schedule cannot run */
  CHECK(parse_with(&job, tiny_job, NULL, NULL) == MT_OK && job.parallel.virtual_stages == 1);
  canon = mt_job_to_json(&job);
  CHECK(canon && !strstr(canon, "virtual_stages"));
  free(canon);
  const char *vs2[] = {"parallel.virtual_stages=2", "parallel.pp=2", "model.n_layer=4", NULL};
  CHECK(mt_job_parse(&job, tiny_job, "/jobs", presets, vs2) == MT_OK);
  CHECK(job.parallel.virtual_stages == 2);
  canon = mt_job_to_json(&job);
  CHECK(canon && strstr(canon, "\"virtual_stages\":2") &&
        mt_job_parse(&back, canon, "/jobs", presets, NULL) == MT_OK);
  CHECK(back.parallel.virtual_stages == 2 && !strcmp(back.hash, job.hash));
  free(canon);
  CHECK(parse_with(&job, tiny_job, "parallel.virtual_stages=0", NULL) == MT_EINVAL);
  CHECK(strstr(mt_errmsg(), "parallel.virtual_stages: 0 must be >= 1"));
  CHECK(parse_with(&job, tiny_job, "parallel.virtual_stages=2", NULL) == MT_EINVAL);
  CHECK(strstr(mt_errmsg(), "parallel.virtual_stages: 2 chunks a stage interleave a pipeline: "
                            "they need parallel.pp >= 2"));
  const char *few[] = {"parallel.virtual_stages=2", "parallel.pp=2", "model.n_layer=3", NULL};
  CHECK(mt_job_parse(&job, tiny_job, "/jobs", presets, few) == MT_EINVAL);
  CHECK(strstr(mt_errmsg(), "parallel.virtual_stages: parallel.pp = 2 stages x 2 chunks need 4 "
                            "layers, model.n_layer is 3"));
  const char *odd_batch[] = {"parallel.virtual_stages=2", "parallel.pp=2",
                             "model.n_layer=4",           "train.global_batch=6",
                             "parallel.micro_batch=2",    NULL};
  CHECK(mt_job_parse(&job, tiny_job, "/jobs", presets, odd_batch) == MT_EINVAL);
  CHECK(strstr(mt_errmsg(), "train.global_batch 6 is not divisible by micro_batch * dp_min * pp = "
                            "2 * 1 * 2"));
  /* rows that do not split evenly over tp are refused at parse, named */
  CHECK(parse_with(&job, tiny_job, "parallel.sequence_parallel=true", "parallel.tp=4") == MT_OK);
  CHECK(parse_with(&job, tiny_job, "parallel.sequence_parallel=true", "model.seq_len=7") ==
        MT_OK); /* tp 1: nothing to split */
  const char *odd[] = {"parallel.sequence_parallel=true", "parallel.tp=2", "model.seq_len=7", NULL};
  CHECK(mt_job_parse(&job, tiny_job, "/jobs", presets, odd) == MT_EINVAL);
  CHECK(strstr(mt_errmsg(),
               "parallel.sequence_parallel: splits a micro-batch's "
               "parallel.micro_batch 1 x model.seq_len 7 = 7 rows over parallel.tp = 2"));
  /* a JSON string value quoted stays a string even when it looks like a number */
  CHECK(parse_with(&job, tiny_job, "data.path=\"123\"", NULL) == MT_OK);
  CHECK(!strcmp(job.data.path, "123"));
}

static void test_malformed_override_is_named(void) {
  mt_job job;
  CHECK(parse_with(&job, tiny_job, "train.steps", NULL) == MT_EINVAL);
  CHECK(strstr(mt_errmsg(), "train.steps") != NULL);
  CHECK(parse_with(&job, tiny_job, "=5", NULL) == MT_EINVAL);
  CHECK(strstr(mt_errmsg(), "\"=5\"") != NULL);
  CHECK(parse_with(&job, tiny_job, "train..steps=5", NULL) == MT_EINVAL);
  CHECK(strstr(mt_errmsg(), "train..steps=5") != NULL);
  CHECK(parse_with(&job, tiny_job, "train.steps.x=5", NULL) == MT_EINVAL);
  CHECK(strstr(mt_errmsg(), "train.steps.x=5") != NULL);
}

static void test_unknown_key_is_named(void) {
  mt_job job;
  CHECK(parse_with(&job, tiny_job, "train.stpes=5", NULL) == MT_EINVAL);
  CHECK(!strcmp(mt_errmsg(), "train.stpes: unknown key"));
  CHECK(parse_with(&job, tiny_job, "train.lr.peek=1", NULL) == MT_EINVAL);
  CHECK(!strcmp(mt_errmsg(), "train.lr.peek: unknown key"));
  CHECK(parse_with(&job, tiny_job, "modle.n_layer=1", NULL) == MT_EINVAL);
  CHECK(!strcmp(mt_errmsg(), "modle: unknown key"));
  /* eval must be an object; validation needs a split, which a flat token file lacks */
  CHECK(parse_with(&job, tiny_job, "eval={\"iters\": 3}", NULL) == MT_OK);
  CHECK(job.eval.iters == 3 && job.eval.interval == 0);
  CHECK(parse_with(&job, tiny_job, "eval={\"interval\": 100}", NULL) == MT_EINVAL);
  CHECK(strstr(mt_errmsg(), "eval.interval: validation needs a valid split") != NULL);
  CHECK(parse_with(&job, tiny_job, "eval.itres=5", NULL) == MT_EINVAL);
  CHECK(!strcmp(mt_errmsg(), "eval.itres: unknown key"));
  CHECK(parse_with(&job, tiny_job, "eval=5", NULL) == MT_EINVAL);
  CHECK(!strcmp(mt_errmsg(), "eval: expected an object, got an integer"));
}

/* data: a token file, one indexed dataset or a weighted blend; exactly one */
static void test_data_sources_blend_and_split(void) {
  mt_job job;
  const char *blend = "data={\"blend\": [{\"prefix\": \"/d/books\", \"weight\": 0.7},"
                      " {\"prefix\": \"/d/wiki\", \"weight\": 0.3}], \"split\": \"98,2,0\"}";
  CHECK(parse_with(&job, tiny_job, blend, "eval={\"interval\": 50, \"iters\": 2}") == MT_OK);
  CHECK(job.data.n_blend == 2 && !strcmp(job.data.blend[1].prefix, "/d/wiki"));
  CHECK(job.data.blend[0].weight == 0.7 && !strcmp(job.data.split, "98,2,0") && job.data.shuffle);
  CHECK(job.eval.interval == 50 && job.eval.iters == 2);
  CHECK(parse_with(&job, tiny_job, "data={\"prefix\": \"/d/books\"}", NULL) == MT_OK);
  CHECK(job.data.n_blend == 1 && job.data.blend[0].weight == 1.0 && !job.data.path[0]);
  CHECK(!strcmp(job.data.split, "949,50,1"));
  CHECK(parse_with(&job, tiny_job, "data.prefix=/d/books", NULL) == MT_EINVAL);
  CHECK(has_line(mt_errmsg(), "data: give exactly one of path"));
  CHECK(parse_with(&job, tiny_job,
                   "data={\"blend\": [{\"prefix\": \"/d/a\", \"weight\": -1}],"
                   " \"split\": \"nan,1,1\"}",
                   NULL) == MT_EINVAL);
  CHECK(has_line(mt_errmsg(), "data.blend[0].weight: -1 must be > 0"));
  CHECK(has_line(mt_errmsg(), "data.split: \"nan,1,1\" is not up to three non-negative weights"));
  /* Megatron's --split: up to three numbers, the missing ones 0 */
  CHECK(parse_with(&job, tiny_job, "data={\"prefix\": \"/d/a\", \"split\": \"100\"}", NULL) ==
        MT_OK);
  CHECK(parse_with(&job, tiny_job, "data={\"prefix\": \"/d/a\", \"split\": \"98/2\"}", NULL) ==
        MT_OK);
  CHECK(parse_with(&job, tiny_job, "data={\"prefix\": \"/d/a\", \"split\": \"1,2,3,4\"}", NULL) ==
        MT_EINVAL);
  /* validation with a split that gives the valid split nothing: refused at load */
  CHECK(parse_with(&job, tiny_job, "data={\"prefix\": \"/d/a\", \"split\": \"1,0,0\"}",
                   "eval.interval=10") == MT_EINVAL);
  CHECK(has_line(mt_errmsg(), "eval.interval: validation needs a valid split, and data.split"));
  CHECK(parse_with(&job, tiny_job, "data={\"blend\": []}", NULL) == MT_EINVAL);
  CHECK(has_line(mt_errmsg(), "data.blend: expected an array"));
  /* each weight finite, their sum not: every share would be 0 at the first step */
  CHECK(parse_with(&job, tiny_job,
                   "data={\"blend\": [{\"prefix\": \"/d/a\", \"weight\": 1e308},"
                   " {\"prefix\": \"/d/b\", \"weight\": 1e308}]}",
                   NULL) == MT_EINVAL);
  CHECK(!strcmp(mt_errmsg(),
                "data.blend: the weights sum to inf, past a double's range: scale them down"));
}

static void test_wrong_type_is_named(void) {
  mt_job job;
  CHECK(parse_with(&job, tiny_job, "train.steps=many", NULL) == MT_EINVAL);
  CHECK(has_line(mt_errmsg(), "train.steps: expected an integer, got a string"));
  /* only that line: not also a warmup "longer than the decay" of the 0 steps
   * that stood in for the refused value */
  CHECK(parse_with(&job, tiny_job, "train.steps=many", "train.lr.warmup_steps=5") == MT_EINVAL);
  CHECK(count_lines(mt_errmsg()) == 1);
  CHECK(has_line(mt_errmsg(), "train.steps: expected an integer, got a string"));
  CHECK(parse_with(&job, tiny_job, "train.global_batch=2.5", NULL) == MT_EINVAL);
  CHECK(has_line(mt_errmsg(), "train.global_batch: expected an integer"));
  CHECK(parse_with(&job, tiny_job, "train.steps=1e3", NULL) == MT_OK); /* integral real */
  CHECK(job.train.steps == 1000);
  /* a --set value that is not JSON is a string: the line says which */
  CHECK(parse_with(&job, tiny_job, "train.steps=1e400", NULL) == MT_EINVAL);
  CHECK(!strcmp(mt_errmsg(), "train.steps: expected an integer, got a string, \"1e400\""));
  CHECK(parse_with(&job, tiny_job, "parallel.recompute=yes", "train.lr.peak=3e-4,") == MT_EINVAL);
  CHECK(has_line(mt_errmsg(), "parallel.recompute: expected true or false, got a string, \"yes\""));
  CHECK(has_line(mt_errmsg(), "train.lr.peak: expected a number, got a string, \"3e-4,\""));
}

static void test_every_problem_reported_one_per_line(void) {
  mt_job job;
  /* three problems: heads not divisible by tp, batch not by micro_batch, dropout out of range */
  const char *json = "{\"model\": {\"preset\": \"tiny\", \"hidden_dropout\": 1.5},"
                     " \"parallel\": {\"tp\": 3, \"micro_batch\": 3},"
                     " \"train\": {\"global_batch\": 8, \"steps\": 10, \"lr\": {\"peak\": 1e-3}},"
                     " \"data\": {\"path\": \"t.u16\"}}";
  CHECK(parse_with(&job, json, NULL, NULL) == MT_EINVAL);
  const char *msg = mt_errmsg();
  CHECK(count_lines(msg) == 3);
  CHECK(has_line(msg, "model.n_head: 4 is not divisible by parallel.tp = 3"));
  CHECK(has_line(msg, "train.global_batch: 8 is not divisible by parallel.micro_batch * dp_min"));
  CHECK(has_line(msg, "model.hidden_dropout: 1.5 is not in [0, 1)"));
}

static void test_validation_rules(void) {
  mt_job job;
  struct {
    const char *ov0, *ov1, *line;
  } cases[] = {
      {"model.n_head=3", NULL, "model.n_embd: 64 is not divisible by model.n_head = 3"},
      {"parallel.pp=3", NULL, "model.n_layer: 2 layers cannot fill parallel.pp = 3 stages"},
      {"parallel.dp_min=4", "parallel.dp_max=2", "parallel.dp_max: 2 is below"},
      {"model.seq_len=0", NULL, "model.seq_len: 0 must be at least 1"},
      {"train.steps=0", NULL, "train.steps: 0 must be at least 1"},
      {"model.vocab_size=70000", NULL, "model.vocab_size: 70000 does not fit"},
      {"train.lr.peak=0", NULL, "train.lr.peak: 0 must be > 0"},
      {"train.lr.min=1", NULL, "train.lr.min: 1 is above train.lr.peak"},
      {"train.lr.warmup_steps=11", NULL, "train.lr.warmup_steps: warmup of 11 steps"},
      /* a decay of 0 would run every step at the floor (Megatron asserts > 0) */
      {"train.lr.decay_steps=0", NULL, "train.lr.decay_steps: a decay of 0 steps: a cosine"},
      {"train.lr.decay_tokens=0", "train.lr.schedule=linear",
       "train.lr.decay_tokens: a decay of 0 steps: a linear"},
      {"train.adam.beta2=1", NULL, "train.adam.beta2: 1 is not in [0, 1) as a float"},
      /* below 1, but 1.0f to the optimizer: its bias correction divides by 0 */
      {"train.adam.beta2=0.9999999999", NULL, "train.adam.beta2: 0.99999999989999999 is not in"},
      {"train.adam.beta1=0.99999999999", NULL, "train.adam.beta1: 0.99999999999 is not in"},
      {"train.adam.eps=0", NULL, "train.adam.eps: 0 must be in"},
      {"train.adam.eps=1e-50", NULL, "train.adam.eps: 1e-50 must be in"}, /* 0.0f */
      {"model.ln_eps=1e300", NULL, "model.ln_eps: 1e+300 is beyond a float's range"},
      /* named as given, not as the 0.0f (or the denormal) a float makes of it */
      {"model.ln_eps=1e-50", NULL, "model.ln_eps: 1e-50 is below a float's smallest normal"},
      {"model.init_std=1e-40", NULL, "model.init_std: 1e-40 is below a float's smallest normal"},
      {"model.hidden_dropout=0.999999999", NULL,
       "model.hidden_dropout: 0.99999999900000003 is 1 as a float, not in [0, 1)"},
      {"model.attention_dropout=1", NULL, "model.attention_dropout: 1 is not in [0, 1)"},
      /* the optimizer's float: 1e300 would decay by inf */
      {"train.weight_decay=1e300", NULL, "train.weight_decay: 1e+300 must be >= 0 and at most"},
      {"model.n_embd=2147483520", "model.n_head=1", "model.n_embd: 2147483520 is over 1048576"},
      /* each within its bound, the plan's parameter bytes past 2^63 */
      {"model.n_embd=1048576", "model.n_layer=65536", "model: 8.65e+17 parameters"},
      {"train.steps=4611686018427387904", NULL, "train.steps: 4611686018427387904 steps of"},
      {"train.lr.schedule=step", NULL, "train.lr.schedule: \"step\" is not one of"},
      {"parallel.schedule=gpipe", NULL, "parallel.schedule: \"gpipe\" is not supported"},
      {"train.precision=fp8", NULL, "train.precision: \"fp8\" is not one of"},
      {"model.max_positions=16", NULL,
       "model.max_positions: 16 is below model.seq_len 64: a sample's tokens past it would have "
       "no position"},
      {"checkpoint.export_dtype=f16", NULL,
       "checkpoint.export_dtype: \"f16\" is not one of fp32, bf16, fp16"},
      /* the end-of-run export could refuse a weight with nothing kept */
      {"checkpoint.export_dtype=fp16", NULL,
       "checkpoint.export_dtype: fp16 needs checkpoint.dir: a weight past fp16's range fails"},
      {"data.path=", NULL, "data.path: must not be empty"},
      /* one line for one mistake: not also lines about keys the job never
       * gave, from the defaults that stood in for a refused value */
      {"data={\"prefix\": \"\"}", NULL, "data.prefix: must not be empty"},
      {"data={\"blend\": [{\"prefix\": \"\", \"weight\": 1}]}", NULL,
       "data.blend[0].prefix: must not be empty"},
      {"data={\"blend\": [5]}", NULL, "data.blend[0]: expected an object, got an integer"},
      {"data={\"blend\": {}}", NULL, "data.blend: expected an array"},
      {"model.preset=5", NULL, "model.preset: expected a string, got an integer"},
      {"parallel.dp_min=0", NULL, "parallel.dp_min: 0 must be at least 1"},
      {"train.lr.decay_tokens=-5", NULL, "train.lr.decay_tokens: -5 is out of range"},
      {"train.lr.decay_steps=-1", "train.lr.warmup_steps=5",
       "train.lr.decay_steps: -1 is out of range"},
      {"checkpoint.interval=10", NULL, "checkpoint.interval: 10 needs checkpoint.dir"},
      {"name=a/b", NULL, "name: \"a/b\" must be"},
      {"model.preset=../tiny", NULL, "model.preset: \"../tiny\" is not a preset name"},
      {"train.clip_grad=-1", NULL, "train.clip_grad: -1 must be >= 0"},
      /* two starting points: which one wins would be a guess */
      {"checkpoint.load=ck/a", "model.init_from=w.st",
       "checkpoint.load: ck/a and model.init_from w.st both give the weights"},
      {"checkpoint.load_optimizer=true", NULL, "checkpoint.load_optimizer: needs checkpoint.load"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
    int rc = parse_with(&job, tiny_job, cases[i].ov0, cases[i].ov1);
    if (rc != MT_EINVAL || !has_line(mt_errmsg(), cases[i].line) || count_lines(mt_errmsg()) != 1) {
      fprintf(stderr, "%s: %s %s: want one line \"%s...\", got rc %d:\n%s\n", __func__,
              cases[i].ov0, cases[i].ov1 ? cases[i].ov1 : "", cases[i].line, rc, mt_errmsg());
      failures++;
    }
  }
}

static void test_long_string_is_an_error_not_truncated(void) {
  mt_job job;
  char ov[2100] = "data.path=";
  memset(ov + strlen(ov), 'a', 1500);
  CHECK(parse_with(&job, tiny_job, ov, NULL) == MT_EINVAL);
  CHECK(has_line(mt_errmsg(), "data.path: 1500 bytes long, at most 1023 fit"));
  CHECK(parse_with(&job, tiny_job,
                   "name=aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                   NULL) == MT_EINVAL);
  CHECK(has_line(mt_errmsg(), "name: 66 bytes long, at most 63 fit"));
}

static void test_tokens_lengths_convert_to_steps(void) {
  mt_job job;
  /* tiny: 8 sequences * 64 tokens = 512 tokens per step */
  CHECK(parse_with(&job, tiny_job, "train.lr.warmup_tokens=1000", "train.lr.decay_tokens=5120") ==
        MT_OK);
  CHECK(mt_job_tokens_per_step(&job) == 512);
  CHECK(job.train.lr.warmup_steps == 2); /* ceil(1000 / 512) */
  CHECK(job.train.lr.decay_steps == 10); /* exactly 5120 / 512 */
  CHECK(parse_with(&job, tiny_job, "train.lr.warmup_tokens=512", "train.lr.warmup_steps=1") ==
        MT_EINVAL);
  CHECK(!strcmp(mt_errmsg(), "train.lr.warmup_tokens: give it in steps or in tokens, not both"));
  CHECK(parse_with(&job, tiny_job, "train.lr.decay_steps=7", NULL) == MT_OK);
  CHECK(job.train.lr.decay_steps == 7);
  /* a constant schedule has no decay to run: 0 is fine there */
  CHECK(parse_with(&job, tiny_job, "train.lr.decay_steps=0", "train.lr.schedule=constant") ==
        MT_OK);
}

static void test_lr_min_defaults_by_schedule(void) {
  mt_job job;
  CHECK(parse_with(&job, tiny_job, "train.lr.schedule=constant", NULL) == MT_OK);
  CHECK(job.train.lr.kind == MT_LR_CONSTANT && job.train.lr.min == job.train.lr.peak);
  CHECK(parse_with(&job, tiny_job, "train.lr.schedule=linear", NULL) == MT_OK);
  CHECK(job.train.lr.kind == MT_LR_LINEAR && fabs(job.train.lr.min - 1e-4) < 1e-12);
}

/* Megatron's inverse-square-root and WSD schedules: read, carried back in
 * the canonical JSON (WSD's keys only under WSD, so other jobs keep their
 * hash), and each mistake one line naming its key. */
static void test_lr_inverse_square_root_and_wsd(void) {
  mt_job job, back;
  CHECK(parse_with(&job, tiny_job, "train.lr.schedule=inverse-square-root", NULL) == MT_OK);
  CHECK(job.train.lr.kind == MT_LR_INVERSE_SQRT);
  CHECK(parse_with(&job, tiny_job, "train.lr.schedule=WSD",
                   "train.lr={\"peak\": 1e-3, \"schedule\": \"WSD\", \"wsd_decay_steps\": 4, "
                   "\"wsd_decay_style\": \"minus_sqrt\"}") == MT_OK);
  CHECK(job.train.lr.kind == MT_LR_WSD && job.train.lr.wsd_decay_steps == 4 &&
        job.train.lr.wsd_style == MT_WSD_MINUS_SQRT);
  char *json = mt_job_to_json(&job);
  CHECK(json && strstr(json, "\"wsd_decay_steps\":4") && strstr(json, "\"minus_sqrt\""));
  CHECK(json && mt_job_parse(&back, json, "/jobs", presets, NULL) == MT_OK &&
        !strcmp(back.hash, job.hash) && back.train.lr.wsd_style == MT_WSD_MINUS_SQRT);
  free(json);
  refusal cases[] = {
      {"train.lr.schedule=WSD", NULL, "train.lr.wsd_decay_steps: missing: the WSD schedule"},
      {"train.lr.wsd_decay_steps=4", NULL,
       "train.lr.wsd_decay_steps: only the WSD schedule reads it (train.lr.schedule is "
       "\"cosine\")"},
      {"train.lr={\"peak\": 1e-3, \"schedule\": \"WSD\", \"wsd_decay_steps\": 11}", NULL,
       "train.lr.wsd_decay_steps: 11 is past the decay's 10 steps"},
      {"train.lr={\"peak\": 1e-3, \"schedule\": \"WSD\", \"wsd_decay_steps\": 2, "
       "\"wsd_decay_style\": \"sqrt\"}",
       NULL, "train.lr.wsd_decay_style: \"sqrt\" is not one of linear, cosine, exponential"},
      {"train.lr.schedule=wsd", NULL,
       "train.lr.schedule: \"wsd\" is not one of constant, cosine, linear, inverse-square-root, "
       "WSD"},
  };
  one_line_refusals(cases, sizeof cases / sizeof *cases, __func__);
}

/* Megatron's weight-decay increment (train.weight_decay_schedule, its end
 * train.weight_decay) and --lr-warmup-init (train.lr.warmup_init): read,
 * the increment spanning the run (its samples under a ramp-up, as the
 * default decay), carried back in the canonical JSON only when set, so a
 * job without them keeps its hash, and each mistake one line naming its
 * key. */
static void test_weight_decay_schedule_and_warmup_init(void) {
  mt_job job, back, plain;
  CHECK(parse_with(&plain, tiny_job, NULL, NULL) == MT_OK);
  CHECK(plain.train.wd.style == MT_WD_CONSTANT && plain.train.wd.start == 0.1 &&
        plain.train.wd.end == 0.1 && plain.train.lr.warmup_init == 0.0);
  /* the hash tiny_job had before these keys existed */
  CHECK(!strcmp(plain.hash, TINY_JOB_HASH));
  char *json = mt_job_to_json(&plain);
  CHECK(json && !strstr(json, "weight_decay_schedule") && !strstr(json, "warmup_init"));
  free(json);
  /* the defaults given explicitly, and a constant schedule (start == end),
   * are that job */
  CHECK(parse_with(&job, tiny_job, "train.lr.warmup_init=0",
                   "train.weight_decay_schedule={\"style\": \"constant\", \"start\": 0.1}") ==
        MT_OK);
  CHECK(!strcmp(job.hash, plain.hash));

  CHECK(parse_with(&job, tiny_job,
                   "train.weight_decay_schedule={\"style\": \"cosine\", \"start\": 0.01, "
                   "\"end\": 0.2}",
                   "train.lr={\"peak\": 1e-3, \"warmup_steps\": 2, \"warmup_init\": 1e-4}") ==
        MT_OK);
  CHECK(job.train.wd.style == MT_WD_COSINE && job.train.wd.start == 0.01 &&
        job.train.wd.end == 0.2 && job.train.weight_decay == 0.2 && job.train.wd.incr_steps == 10);
  CHECK(job.train.lr.warmup_init == 1e-4);
  json = mt_job_to_json(&job);
  CHECK(json && strstr(json, "\"weight_decay_schedule\":{\"end\":0.2") &&
        strstr(json, "\"style\":\"cosine\"") && strstr(json, "\"warmup_init\":0.0001"));
  CHECK(json && mt_job_parse(&back, json, "/jobs", presets, NULL) == MT_OK &&
        !strcmp(back.hash, job.hash) && back.train.wd.style == MT_WD_COSINE &&
        back.train.wd.start == 0.01 && back.train.wd.end == 0.2 &&
        back.train.lr.warmup_init == 1e-4);
  free(json);
  CHECK(strcmp(job.hash, plain.hash));
  /* end is train.weight_decay when not given, and both may be given alike */
  CHECK(parse_with(&job, tiny_job,
                   "train.weight_decay_schedule={\"style\": \"linear\", \"start\": 0}",
                   "train.weight_decay=0.3") == MT_OK);
  CHECK(job.train.wd.style == MT_WD_LINEAR && job.train.wd.start == 0.0 && job.train.wd.end == 0.3);
  CHECK(parse_with(&back, tiny_job,
                   "train.weight_decay_schedule={\"style\": \"linear\", \"start\": 0, \"end\": "
                   "0.3}",
                   "train.weight_decay=0.3") == MT_OK);
  CHECK(!strcmp(back.hash, job.hash));
  /* under a ramp-up the increment spans the run's samples in full batches,
   * as the default decay does: ceil(60 / 8) */
  CHECK(parse_with(&job, tiny_job,
                   "train.rampup_batch={\"start\": 2, \"increment\": 2, \"samples\": 24}",
                   "train.steps=12") == MT_OK);
  CHECK(job.train.wd.incr_steps == 8 && job.train.lr.decay_steps == 8);
  /* a decay given in steps leaves the increment at the run's length */
  CHECK(parse_with(&job, tiny_job, "train.lr.decay_steps=4", NULL) == MT_OK);
  CHECK(job.train.wd.incr_steps == 10);

  refusal cases[] = {
      {"train.weight_decay_schedule={\"style\": \"linear\", \"end\": 0.1}", NULL,
       "train.weight_decay_schedule.start: missing: the linear schedule goes from start to end"},
      {"train.weight_decay_schedule={\"start\": 0, \"end\": 0.1}", NULL,
       "train.weight_decay_schedule.style: missing: one of constant, linear, cosine"},
      {"train.weight_decay_schedule={\"style\": \"exponential\", \"start\": 0}", NULL,
       "train.weight_decay_schedule.style: \"exponential\" is not one of constant, linear, cosine"},
      {"train.weight_decay_schedule={\"style\": \"linear\", \"start\": -0.1}", NULL,
       "train.weight_decay_schedule.start: -0.1 must be >= 0"},
      {"train.weight_decay_schedule={\"style\": \"linear\", \"start\": 0, \"end\": -1}", NULL,
       "train.weight_decay_schedule.end: -1 must be >= 0"},
      {"train.weight_decay_schedule={\"style\": \"linear\", \"start\": 0, \"end\": 0.2}",
       "train.weight_decay=0.1",
       "train.weight_decay_schedule.end: 0.2 is not train.weight_decay = 0.1"},
      {"train.weight_decay_schedule={\"style\": \"constant\", \"start\": 0.01}", NULL,
       "train.weight_decay_schedule.start: 0.01 is not its end 0.1: a constant schedule"},
      {"train.weight_decay_schedule={\"style\": \"linear\", \"start\": 0, \"steps\": 3}", NULL,
       "train.weight_decay_schedule.steps: unknown key"},
      {"train.weight_decay_schedule=0.1", NULL, "train.weight_decay_schedule: expected an object"},
      {"train.weight_decay=-0.5", NULL, "train.weight_decay: -0.5 must be >= 0"},
      {"train.lr={\"peak\": 1e-3, \"warmup_steps\": 2, \"warmup_init\": 2e-3}", NULL,
       "train.lr.warmup_init: 0.002 must be >= 0 and at most train.lr.peak = 0.001"},
      {"train.lr={\"peak\": 1e-3, \"warmup_steps\": 2, \"warmup_init\": -1e-4}", NULL,
       "train.lr.warmup_init: -0.0001 must be >= 0"},
      {"train.lr.warmup_init=1e-4", NULL,
       "train.lr.warmup_init: 0.0001 starts a warmup, and the job has none"},
      {"train.lr={\"peak\": 1e-3, \"warmup_steps\": 2, \"warmup_init\": \"0\"}", NULL,
       "train.lr.warmup_init: expected a number"},
  };
  one_line_refusals(cases, sizeof cases / sizeof *cases, __func__);
}

/* eval.test: on by default and then absent from the canonical JSON (the
 * jobs from before it keep their hash); false is carried back and hashed;
 * anything but a boolean is one line naming the key; false without
 * validation is warned of as unread. */
static void test_eval_test_key(void) {
  mt_job def, on, off, back;
  char unused[MT_JOB_UNUSED_MAX][256];
  CHECK(parse_with(&def, tiny_job, NULL, NULL) == MT_OK && def.eval.test == 1);
  char *json = mt_job_to_json(&def);
  CHECK(json && !strstr(json, "\"test\""));
  free(json);
  CHECK(parse_with(&on, tiny_job, "eval.test=true", NULL) == MT_OK && on.eval.test == 1 &&
        !strcmp(on.hash, def.hash));
  CHECK(parse_with(&off, tiny_job, "eval.test=false", NULL) == MT_OK && off.eval.test == 0 &&
        strcmp(off.hash, def.hash));
  json = mt_job_to_json(&off);
  CHECK(json && strstr(json, "\"test\":false"));
  CHECK(json && mt_job_parse(&back, json, "/jobs", presets, NULL) == MT_OK && back.eval.test == 0 &&
        !strcmp(back.hash, off.hash));
  free(json);
  int n = mt_job_unused(&off, unused);
  CHECK(n == 1 && !strncmp(unused[0], "eval.test: false turns off the test pass", 40));
  CHECK(mt_job_unused(&def, unused) == 0);
  int rc = parse_with(&off, tiny_job, "eval.test=1", NULL);
  CHECK(rc == MT_EINVAL && has_line(mt_errmsg(), "eval.test: expected true or false, got") &&
        count_lines(mt_errmsg()) == 1);
}

/* data.valid and data.test (Megatron's --valid-data-path and
 * --test-data-path): a prefix or a blend, carried back as a blend and hashed
 * only when given; validation with data.path needs data.valid; a prefix
 * relative to the job file is resolved against its directory; each mistake
 * is one line naming its key. */
static void test_data_valid_and_test(void) {
  mt_job def, job, back;
  char unused[MT_JOB_UNUSED_MAX][256];
  CHECK(parse_with(&def, tiny_job, NULL, NULL) == MT_OK && !def.data.n_valid && !def.data.n_test);
  char *json = mt_job_to_json(&def);
  CHECK(json && !strstr(json, "\"valid\"") && !strstr(json, "\"test\""));
  free(json);
  CHECK(parse_with(&job, tiny_job, "data.valid=/d/heldout",
                   "data.test=[{\"prefix\": \"/d/t1\", \"weight\": 3}, "
                   "{\"prefix\": \"/d/t2\", \"weight\": 1}]") == MT_OK);
  CHECK(job.data.n_valid == 1 && !strcmp(job.data.valid[0].prefix, "/d/heldout") &&
        job.data.valid[0].weight == 1.0);
  CHECK(job.data.n_test == 2 && !strcmp(job.data.test[1].prefix, "/d/t2") &&
        job.data.test[0].weight == 3.0 && strcmp(job.hash, def.hash));
  json = mt_job_to_json(&job);
  CHECK(json && strstr(json, "\"valid\":[{\"prefix\":\"/d/heldout\""));
  CHECK(json && mt_job_parse(&back, json, "/jobs", presets, NULL) == MT_OK &&
        back.data.n_test == 2 && !strcmp(back.hash, job.hash));
  free(json);
  /* unread without validation */
  CHECK(mt_job_unused(&job, unused) == 1 && !strncmp(unused[0], "data.valid and data.test:", 25));
  /* a flat token file validates on data.valid */
  CHECK(parse_with(&job, tiny_job, "data.valid=/d/heldout", "eval.interval=5") == MT_OK);
  CHECK(mt_job_unused(&job, unused) == 0);
  /* which reads data.shuffle and data.cache_dir (data.split stays unread) */
  CHECK(parse_with(&job, tiny_job,
                   "data={\"path\": \"t.u16\", \"valid\": \"/d/h\", \"shuffle\": "
                   "false, \"cache_dir\": \"/c\", \"split\": \"1,1\"}",
                   "eval.interval=5") == MT_OK);
  CHECK(mt_job_unused(&job, unused) == 1 && !strncmp(unused[0], "data.split: data.path", 21));
  const char *rel = "{\"model\": {\"preset\": \"tiny\"}, \"train\": {\"global_batch\": 8, "
                    "\"steps\": 10, \"lr\": {\"peak\": 1e-3}}, \"data\": {\"path\": \"t.u16\", "
                    "\"valid\": [{\"prefix\": \"held/out\", \"weight\": 1}]}}";
  CHECK(parse_with(&job, rel, NULL, NULL) == MT_OK &&
        !strcmp(job.data.valid[0].prefix, "/jobs/held/out"));
  refusal cases[] = {
      {"data.valid=5", NULL,
       "data.valid: expected a prefix or an array of 1 to 32 {\"prefix\", \"weight\"} objects"},
      {"data.test=[]", NULL, "data.test: expected a prefix or an array of 1 to 32"},
      {"data.valid=\"\"", NULL, "data.valid: must not be empty"},
      {"data.valid=[{\"prefix\": \"/d/a\"}]", NULL, "data.valid[0].weight: missing"},
      {"data.test=[{\"prefix\": \"/d/a\", \"weight\": 0}]", NULL,
       "data.test[0].weight: 0 must be > 0"},
      {"data.valid=[{\"prefix\": \"/d/a\", \"weight\": 1, \"wieght\": 1}]", NULL,
       "data.valid[0].wieght: unknown key"},
      {"eval.interval=5", NULL,
       "eval.interval: validation needs a valid split: use data.prefix or "
       "data.blend, not data.path, or give data.valid"},
  };
  one_line_refusals(cases, sizeof cases / sizeof *cases, __func__);
}

static void test_hash_changes_with_any_field_and_not_with_key_order(void) {
  mt_job a, b;
  const char *reordered = "{\"data\": {\"path\": \"tokens.u16\"},"
                          " \"train\": {\"lr\": {\"peak\": 1e-3}, \"steps\": 10,"
                          "             \"global_batch\": 8},"
                          " \"model\": {\"preset\": \"tiny\"}}";
  CHECK(parse_with(&a, tiny_job, NULL, NULL) == MT_OK);
  CHECK(parse_with(&b, reordered, NULL, NULL) == MT_OK);
  CHECK(!strcmp(a.hash, b.hash));
  /* defaults written out explicitly are the same job */
  CHECK(parse_with(&b, tiny_job, "train.seed=1234", "parallel.tp=1") == MT_OK);
  CHECK(!strcmp(a.hash, b.hash));
  /* so is the preset written out field by field */
  const char *fields = "{\"model\": {\"n_layer\": 2, \"n_embd\": 64, \"n_head\": 4,"
                       "            \"vocab_size\": 256, \"seq_len\": 64},"
                       " \"train\": {\"global_batch\": 8, \"steps\": 10, \"lr\": {\"peak\": 1e-3}},"
                       " \"data\": {\"path\": \"tokens.u16\"}}";
  CHECK(mt_job_parse(&b, fields, "/jobs", NULL, NULL) == MT_OK);
  CHECK(!strcmp(a.hash, b.hash));

  const char *changes[] = {
      "name=other",
      "model.n_layer=4",
      "model.n_embd=128",
      "model.n_head=8",
      "model.vocab_size=257",
      "model.vocab_pad_to=64",
      "model.seq_len=32",
      "model.ln_eps=1e-6",
      "model.init_std=0.01",
      "model.hidden_dropout=0.1",
      "model.attention_dropout=0.1",
      "model.init_from=w.st",
      "parallel.tp=2",
      "parallel.pp=2",
      "parallel.dp_min=2",
      "parallel.dp_max=4",
      "parallel.micro_batch=2",
      "parallel.recompute=true",
      "parallel.sequence_parallel=true",
      "train.global_batch=16",
      "train.steps=11",
      "train.seed=1",
      "train.lr.peak=2e-3",
      "train.lr.min=0",
      "train.lr.schedule=linear",
      "train.lr.warmup_steps=1",
      "train.lr.decay_steps=9",
      "train.adam.beta1=0.8",
      "train.adam.beta2=0.99",
      "train.adam.eps=1e-6",
      "train.weight_decay=0",
      "train.clip_grad=0",
      "train.precision=bf16",
      "train.precision=fp16",
      "train.loss_scale.initial=1024",
      "train.loss_scale.min=2",
      "train.loss_scale.growth_interval=10",
      "train.loss_scale.hysteresis=1",
      "train.loss_scale.dynamic=false",
      "train.log_interval=10",
      "train.log_params_norm=true",
      "train.tensorboard_dir=tb",
      "model.max_positions=128",
      "data.path=other.u16",
      "checkpoint.dir=ck",
      "checkpoint.interval=5",
      "checkpoint.keep=2",
      "checkpoint.export=out.safetensors",
      "checkpoint.load=ck/a",
      "checkpoint.export_dtype=bf16",
  };
  for (size_t i = 0; i < sizeof changes / sizeof *changes; i++) {
    const char *ov1 = !strncmp(changes[i], "checkpoint.interval", 19) ? "checkpoint.dir=ck" : NULL;
    int rc = parse_with(&b, tiny_job, changes[i], ov1);
    if (rc != MT_OK || !strcmp(a.hash, b.hash)) {
      fprintf(stderr, "%s: %s: rc %d, hash %s vs %s: %s\n", __func__, changes[i], rc, b.hash,
              a.hash, mt_errmsg());
      failures++;
    }
  }
}

/* train.loss_scale: Megatron's defaults, every key read, every bad value one
 * line naming its key, and the canonical JSON carries it back. */
static void test_export_dtype_round_trips_and_fp32_keeps_the_hash(void) {
  mt_job plain, fp32, bf16, back;
  CHECK(parse_with(&plain, tiny_job, NULL, NULL) == MT_OK);
  CHECK(parse_with(&fp32, tiny_job, "checkpoint.export_dtype=fp32", NULL) == MT_OK);
  CHECK(!strcmp(plain.hash, fp32.hash)); /* the default: jobs from before it keep their hash */
  CHECK(parse_with(&bf16, tiny_job, "checkpoint.export_dtype=bf16", NULL) == MT_OK);
  CHECK(!strcmp(bf16.checkpoint.export_dtype, "bf16"));
  char *text = mt_job_to_json(&bf16), *text32 = mt_job_to_json(&fp32);
  CHECK(text && strstr(text, "\"export_dtype\":\"bf16\""));
  CHECK(text32 && !strstr(text32, "export_dtype"));
  CHECK(text && mt_job_parse(&back, text, "/jobs", presets, NULL) == MT_OK);
  CHECK(!strcmp(back.checkpoint.export_dtype, "bf16") && !strcmp(back.hash, bf16.hash));
  free(text);
  free(text32);
  CHECK(parse_with(&back, tiny_job, "checkpoint.export_dtype=fp16", "checkpoint.dir=ck") == MT_OK);
}

static void test_loss_scale_defaults_checks_and_round_trip(void) {
  mt_job job, back;
  CHECK(parse_with(&job, tiny_job, "train.precision=fp16", NULL) == MT_OK);
  CHECK(!strcmp(job.train.precision, "fp16"));
  CHECK(job.train.loss_scale.initial == 4294967296.0 && job.train.loss_scale.min == 1.0);
  CHECK(job.train.loss_scale.growth_interval == 1000 && job.train.loss_scale.hysteresis == 2);
  const char *set = "{\"model\": {\"preset\": \"tiny\"}, \"data\": {\"path\": \"tokens.u16\"},"
                    " \"train\": {\"global_batch\": 8, \"steps\": 10, \"lr\": {\"peak\": 1e-3},"
                    "  \"precision\": \"fp16\", \"loss_scale\": {\"initial\": 65536, \"min\": 0.5,"
                    "  \"growth_interval\": 50, \"hysteresis\": 3}}}";
  CHECK(mt_job_parse(&job, set, "/jobs", presets, NULL) == MT_OK);
  CHECK(job.train.loss_scale.initial == 65536.0 && job.train.loss_scale.min == 0.5);
  CHECK(job.train.loss_scale.growth_interval == 50 && job.train.loss_scale.hysteresis == 3);
  char *json = mt_job_to_json(&job);
  CHECK(json && strstr(json, "\"loss_scale\":{"));
  int rc = mt_job_parse(&back, json, "/jobs", presets, NULL);
  free(json);
  CHECK(rc == MT_OK && !strcmp(back.hash, job.hash));
  CHECK(back.train.loss_scale.min == 0.5 && back.train.loss_scale.hysteresis == 3);
  CHECK(job.train.loss_scale.dynamic == 1);
  /* a static scale (Megatron's --loss-scale): carried back; the dynamic
   * scale's other keys are told unused */
  CHECK(parse_with(&job, tiny_job, "train.precision=fp16", "train.loss_scale.dynamic=false") ==
        MT_OK);
  CHECK(job.train.loss_scale.dynamic == 0);
  json = mt_job_to_json(&job);
  CHECK(json && strstr(json, "\"dynamic\":false"));
  rc = mt_job_parse(&back, json, "/jobs", presets, NULL);
  free(json);
  CHECK(rc == MT_OK && !strcmp(back.hash, job.hash) && back.train.loss_scale.dynamic == 0);
  char unused[MT_JOB_UNUSED_MAX][256];
  CHECK(mt_job_unused(&job, unused) == 0);
  /* a static scale below the dynamic one's min: no min to be above */
  CHECK(parse_with(&job, tiny_job, "train.precision=fp16",
                   "train.loss_scale={\"dynamic\": false, \"initial\": 0.5}") == MT_OK);
  CHECK(parse_with(&job, tiny_job, "train.precision=fp16", "train.loss_scale.dynamic=false") ==
        MT_OK);
  job.train.loss_scale.hysteresis = 5;
  CHECK(mt_job_unused(&job, unused) == 1 &&
        strstr(unused[0], "with train.loss_scale.dynamic = false the scale stays at initial"));

  struct {
    const char *ov0, *ov1, *line;
  } cases[] = {
      {"train.loss_scale.initial=0", NULL, "train.loss_scale.initial: 0 must be > 0"},
      {"train.loss_scale.initial=1e39", NULL, "train.loss_scale.initial: 1e+39 must be > 0"},
      {"train.loss_scale.min=-1", NULL, "train.loss_scale.min: -1 must be > 0"},
      {"train.loss_scale.initial=8", "train.loss_scale.min=16",
       "train.loss_scale.min: 16 is above train.loss_scale.initial = 8"},
      {"train.loss_scale.growth_interval=0", NULL,
       "train.loss_scale.growth_interval: 0 must be at least 1"},
      {"train.loss_scale.hysteresis=0", NULL, "train.loss_scale.hysteresis: 0 must be at least 1"},
      {"train.loss_scale.window=5", NULL, "train.loss_scale.window: unknown key"},
      {"train.loss_scale.hysteresis=\"2\"", NULL, "train.loss_scale.hysteresis: expected an"},
      {"train.loss_scale.dynamic=0", NULL, "train.loss_scale.dynamic: expected"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
    rc = parse_with(&job, tiny_job, cases[i].ov0, cases[i].ov1);
    if (rc != MT_EINVAL || !has_line(mt_errmsg(), cases[i].line) || count_lines(mt_errmsg()) != 1) {
      fprintf(stderr, "%s: %s %s: want one line \"%s...\", got rc %d:\n%s\n", __func__,
              cases[i].ov0, cases[i].ov1 ? cases[i].ov1 : "", cases[i].line, rc, mt_errmsg());
      failures++;
    }
  }
}

static void test_bad_json_reports_line_and_column(void) {
  mt_job job;
  CHECK(mt_job_parse(&job, "{\n  \"name\": \"x\",\n  \"model\" {}\n}", NULL, presets, NULL) ==
        MT_EINVAL);
  CHECK(strstr(mt_errmsg(), "line 3") != NULL && strstr(mt_errmsg(), "column") != NULL);
  CHECK(mt_job_parse(&job, "{\"name\": \"a\", \"name\": \"b\"}", NULL, presets, NULL) == MT_EINVAL);
  CHECK(strstr(mt_errmsg(), "duplicate") != NULL);
  CHECK(mt_job_parse(&job, "[1]", NULL, presets, NULL) == MT_EINVAL);
}

static void test_missing_preset_lists_search_dirs(void) {
  mt_job job;
  const char *dirs[] = {"/nonexistent/a", MT_PRESET_DIR, NULL};
  const char *ovs[] = {"model.preset=nosuch", NULL};
  CHECK(mt_job_parse(&job, tiny_job, NULL, dirs, ovs) == MT_EINVAL);
  const char *msg = mt_errmsg();
  CHECK(!strncmp(msg, "model.preset: \"nosuch\" not found", 32));
  CHECK(strstr(msg, "/nonexistent/a/nosuch.json") != NULL);
  CHECK(strstr(msg, MT_PRESET_DIR "/nosuch.json") != NULL);
  CHECK(mt_job_parse(&job, tiny_job, NULL, NULL, NULL) == MT_EINVAL);
  CHECK(strstr(mt_errmsg(), "no preset directories") != NULL);
}

static void test_preset_dirs_searched_in_order(void) {
  char dir[] = "/tmp/test_job_XXXXXX";
  CHECK(mkdtemp(dir) != NULL);
  char path[256];
  snprintf(path, sizeof path, "%s/tiny.json", dir);
  FILE *f = fopen(path, "w");
  CHECK(f != NULL);
  fputs("{\"description\": \"shadow\", \"n_layer\": 6, \"n_embd\": 64, \"n_head\": 4,"
        " \"vocab_size\": 256, \"seq_len\": 64}",
        f);
  fclose(f);
  mt_job job;
  const char *dirs[] = {dir, MT_PRESET_DIR, NULL};
  int rc = mt_job_parse(&job, tiny_job, NULL, dirs, NULL);
  int n_layer = job.model.n_layer;
  /* a preset with a key a preset must not have is refused, naming the file */
  FILE *g = fopen(path, "w");
  if (g) {
    fputs("{\"n_layer\": 6, \"n_layres\": 1, \"init_from\": \"x\"}", g);
    fclose(g);
  }
  int rc2 = mt_job_parse(&job, tiny_job, NULL, dirs, NULL);
  char msg[1024];
  snprintf(msg, sizeof msg, "%s", mt_errmsg());
  /* a mistyped field is named in the preset file, not as a model.<key> the
   * job does not have */
  FILE *h = fopen(path, "w");
  if (h) {
    fputs("{\"n_layer\": \"6\", \"n_embd\": 64.5, \"n_head\": 4, \"vocab_size\": 256,"
          " \"seq_len\": 64, \"ln_eps\": \"1e-5\"}",
          h);
    fclose(h);
  }
  int rc3 = mt_job_parse(&job, tiny_job, NULL, dirs, NULL);
  char msg3[1024];
  snprintf(msg3, sizeof msg3, "%s", mt_errmsg());
  unlink(path);
  /* a directory where the preset file would be is not "'[' or '{' expected" */
  int rc4 = mkdir(path, 0700) ? MT_OK : mt_job_parse(&job, tiny_job, NULL, dirs, NULL);
  char msg4[1024];
  snprintf(msg4, sizeof msg4, "%s", mt_errmsg());
  rmdir(path);
  rmdir(dir);
  CHECK(rc == MT_OK && n_layer == 6); /* the first directory wins */
  CHECK(rc2 == MT_EINVAL);
  CHECK(count_lines(msg) == 2 && has_line(msg, "model.preset: ") &&
        strstr(msg, "n_layres: unknown key"));
  CHECK(strstr(msg, "init_from: not allowed in a preset") != NULL);
  CHECK(rc3 == MT_EINVAL && count_lines(msg3) == 3);
  CHECK(strstr(msg3, "tiny.json: n_layer: expected an integer, got a string, \"6\"\n"));
  CHECK(strstr(msg3, "tiny.json: n_embd: expected an integer, got 64.5\n"));
  CHECK(strstr(msg3, "tiny.json: ln_eps: expected a number, got a string, \"1e-5\""));
  CHECK(rc4 == MT_EINVAL && strstr(msg4, "tiny.json is a directory, not a JSON preset"));
}

static void test_missing_required_fields_are_named(void) {
  mt_job job;
  CHECK(mt_job_parse(&job, "{}", NULL, presets, NULL) == MT_EINVAL);
  const char *msg = mt_errmsg();
  CHECK(has_line(msg, "model: missing"));
  CHECK(has_line(msg, "train: missing"));
  CHECK(has_line(msg, "data: missing"));
  CHECK(mt_job_parse(&job, "{\"model\": {\"n_layer\": 2}, \"train\": {\"lr\": {}}, \"data\": {}}",
                     NULL, presets, NULL) == MT_EINVAL);
  msg = mt_errmsg();
  CHECK(has_line(msg, "model.n_embd: missing"));
  CHECK(has_line(msg, "train.steps: missing"));
  CHECK(has_line(msg, "train.lr.peak: missing"));
  CHECK(has_line(msg, "data: give exactly one of path"));
}

/* Settings a job gives that its configuration never reads are accepted
 * and named, one line each; the defaults and the settings in use are not. */
static void test_unused_settings_are_named(void) {
  mt_job job;
  char lines[MT_JOB_UNUSED_MAX][256];
  CHECK(parse_with(&job, tiny_job, NULL, NULL) == MT_OK);
  CHECK(mt_job_unused(&job, lines) == 0);
  CHECK(parse_with(&job, tiny_job, "train.precision=fp16", "train.loss_scale.initial=65536") ==
        MT_OK);
  CHECK(mt_job_unused(&job, lines) == 0);
  CHECK(parse_with(&job, tiny_job, "train.precision=bf16", "train.loss_scale.hysteresis=3") ==
        MT_OK);
  CHECK(mt_job_unused(&job, lines) == 1);
  CHECK(!strcmp(lines[0], "train.loss_scale: only fp16 scales its loss; with train.precision = "
                          "bf16 it is ignored"));
  CHECK(parse_with(&job, tiny_job, "data.shuffle=false", NULL) == MT_OK);
  CHECK(mt_job_unused(&job, lines) == 1);
  CHECK(!strcmp(lines[0], "data.shuffle: data.path is read in order, whole; it applies to "
                          "data.prefix and data.blend only, so it is ignored"));
  CHECK(parse_with(&job, tiny_job, "data.split=98,2,0", "data.cache_dir=idx") == MT_OK);
  CHECK(mt_job_unused(&job, lines) == 1);
  CHECK(!strcmp(lines[0], "data.split and data.cache_dir: data.path is read in order, whole; "
                          "they apply to data.prefix and data.blend only, so they are ignored"));
  const char *all[] = {"data.split=98,2,0",
                       "data.cache_dir=idx",
                       "data.shuffle=false",
                       "train.loss_scale.min=2",
                       "parallel.sequence_parallel=true",
                       NULL};
  CHECK(mt_job_parse(&job, tiny_job, "/jobs", presets, all) == MT_OK);
  CHECK(mt_job_unused(&job, lines) == 3);
  CHECK(!strncmp(lines[0], "train.loss_scale: ", 18));
  CHECK(!strncmp(lines[1], "data.split, data.shuffle and data.cache_dir: ", 45));
  CHECK(!strcmp(lines[2], "parallel.sequence_parallel: it splits over tensor-parallel ranks, "
                          "and parallel.tp = 1; it is ignored"));
  /* an indexed dataset reads its split, shuffle and cache_dir */
  const char *indexed =
      "{\"model\": {\"preset\": \"tiny\"},"
      " \"train\": {\"global_batch\": 8, \"steps\": 10, \"lr\": {\"peak\": 1e-3}},"
      " \"data\": {\"prefix\": \"corpus\", \"split\": \"98,2,0\","
      "           \"shuffle\": false, \"cache_dir\": \"idx\"}}";
  CHECK(mt_job_parse(&job, indexed, "/jobs", presets, NULL) == MT_OK);
  CHECK(mt_job_unused(&job, lines) == 0);
}

static void test_tiny_demo_example_loads(void) {
  mt_job job;
  CHECK(mt_job_load(&job, MT_JOB_DIR "/tiny-demo.json", presets, NULL) == MT_OK);
  CHECK(!strcmp(job.name, "tiny-demo") && job.model.n_layer == 2);
  CHECK(job.parallel.micro_batch == 8 && job.train.global_batch == 16 && job.train.steps == 300);
  CHECK(job.train.lr.kind == MT_LR_COSINE && job.train.lr.warmup_steps == 20);
  CHECK(job.train.lr.decay_steps == 300 && fabs(job.train.lr.min - 3e-4) < 1e-15);
  /* relative to the job file: absolute, ending in etc/jobs/tokens.u16 */
  size_t n = strlen(job.data.path);
  CHECK(job.data.path[0] == '/' && n > 16);
  CHECK(!strcmp(job.data.path + n - 16, "/jobs/tokens.u16"));
  const char *ovs[] = {"data.path=/tmp/bytes.u16", NULL};
  CHECK(mt_job_load(&job, MT_JOB_DIR "/tiny-demo.json", presets, ovs) == MT_OK);
  CHECK(!strcmp(job.data.path, "/tmp/bytes.u16"));
}

/* ---- the run's length in samples or tokens ----
 * Megatron-LM's update_train_iters (megatron/training/training.py), written
 * out here apart from job.c: --train-samples to --train-iters, dropping a
 * partial last batch. megatron_batch is RampupBatchsizeNumMicroBatches.update
 * (the batch of a step that starts with `consumed` samples read). */
static int megatron_batch(int64_t consumed, int start, int inc, int gbs, int64_t ramp) {
  if (!ramp || consumed > ramp) return gbs;
  double per = (double)ramp / (double)((gbs - start) / inc); /* rampup_samples_per_increment */
  int64_t k = (int64_t)((double)consumed / per);
  int b = start + (int)k * inc;
  return b < gbs ? b : gbs;
}

static int64_t megatron_train_iters(int64_t train_samples, int start, int inc, int gbs,
                                    int64_t ramp) {
  if (!ramp) return train_samples / gbs;
  int64_t iterations = 0, consumed = 0;
  while (consumed <= ramp) { /* rampup phase */
    consumed += megatron_batch(consumed, start, inc, gbs, ramp);
    iterations++;
  }
  /* constant phase: "we throw away any partial last batch"; Python's //
   * floors (a run ending inside the ramp's last batch gives -1) */
  int64_t rest = train_samples - consumed;
  return iterations + (rest >= 0 ? rest / gbs : -((-rest + gbs - 1) / gbs));
}

/* The same rule for a run shorter than the ramp, where Megatron's loop
 * would still run the whole ramp: the most steps whose batches fit. */
static int64_t whole_steps(int64_t samples, int start, int inc, int gbs, int64_t ramp) {
  int64_t steps = 0, consumed = 0;
  for (;;) {
    int b = megatron_batch(consumed, start, inc, gbs, ramp);
    if (consumed + b > samples) return steps;
    consumed += b, steps++;
  }
}

static void test_530b_example_loads_in_bf16(void) {
  mt_job job;
  CHECK(mt_job_load(&job, MT_JOB_DIR "/mtnlg-530b.json", presets, NULL) == MT_OK);
  CHECK(!strcmp(job.train.precision, "bf16"));
  const char *ovs[] = {"train.precision=fp32", NULL};
  CHECK(mt_job_load(&job, MT_JOB_DIR "/mtnlg-530b.json", presets, ovs) == MT_OK);
  CHECK(job.model.n_layer == 105 && job.model.n_embd == 20480 && job.model.n_head == 128);
  CHECK(job.model.padded_vocab == 51200); /* multiple of 128 * tp 8 = 1024 */
  CHECK(fabsf(job.model.init_std - 0.004f) < 1e-9f);
  CHECK(job.parallel.tp == 8 && job.parallel.pp == 35 && job.parallel.dp_min == 16);
  CHECK(job.parallel.dp_max == 16);
  CHECK(mt_job_tokens_per_step(&job) == 1920 * 2048);
  CHECK(job.train.lr.warmup_steps == 255);  /* ceil(1e9 / 3932160) */
  CHECK(job.train.lr.decay_steps == 86467); /* ceil(340e9 / 3932160) */
  CHECK(job.train.lr.min == 5e-6 && job.train.lr.peak == 5e-5);
  /* the ramp-up: 32 -> 1920 in 59 increments of 32 over 12e9 / 2048 samples
   * (Megatron: one increment per 5859375 / 59 = 99311.44 samples) */
  CHECK(job.train.rampup.start == 32 && job.train.rampup.increment == 32);
  CHECK(job.train.rampup.samples == 5859375); /* ceil(12e9 / 2048) */
  CHECK(mt_job_batch_at(&job, 0) == 32 && mt_job_batch_at(&job, 99311) == 32);
  CHECK(mt_job_batch_at(&job, 99312) == 64);
  CHECK(mt_job_batch_at(&job, 5859374) == 1888 && mt_job_batch_at(&job, 5859375) == 1920);
  CHECK(mt_job_batch_at(&job, 5859376) == 1920 && mt_job_batch_quantum(&job) == 32);
  /* train.tokens 270e9: ceil(270e9 / 2048) = 131835938 samples, in steps
   * by Megatron's rule: 80086 whole batches, 131834240 samples (269.9965e9
   * tokens), 1698 short of them; the 80087 the file gave by hand read past
   * them (to 270.0005e9 tokens) */
  CHECK(!strcmp(job.train.length_key, "tokens") && job.train.length_given == 270000000000);
  CHECK(megatron_train_iters(131835938, 32, 32, 1920, 5859375) == 80086);
  CHECK(job.train.steps == 80086);
  int64_t c = mt_job_samples_of(&job, 0, job.train.steps);
  CHECK(c == 131834240);
  int64_t walked = 0;
  for (int64_t i = 0; i < job.train.steps; i++)
    walked += megatron_batch(walked, 32, 32, 1920, 5859375);
  CHECK(walked == c);
  CHECK(mt_job_samples_of(&job, 0, 79000) +
            mt_job_samples_of(&job, mt_job_samples_of(&job, 0, 79000), 1086) ==
        c);
  /* the decay, given in tokens, is in steps of the final batch */
  CHECK(job.train.lr.decay_steps == 86467);
}

/* What mt_job_left_after counts (the status's ETA) is what the engine's
 * loop does after a step, walked step by step as daemon/engine/local.c
 * decides: a validation after every eval.interval-th step, the valid and
 * (where the data has a test split: data.test, or datasets whose data.split
 * weighs it, not data.path alone) the test pass after the last; a save at every
 * checkpoint.interval-th step and the last, made whole unless async, or on a step that validates or
 * the last. */
static void test_what_a_run_has_left_is_what_the_engine_walks(void) {
  mt_job job;
  CHECK(parse_with(&job, tiny_job, NULL, NULL) == MT_OK);
  int cases = 0;
  for (int n = 1; n <= 13; n++)
    for (int ev = 0; ev <= 5; ev++)
      for (int ci = 0; ci <= 4; ci++)
        for (int flags = 0; flags < 32; flags++) {
          /* the data: data.path alone, data.path with data.test, datasets
           * whose data.split gives the test split a weight, or none */
          int data = flags >> 3;
          snprintf(job.data.path, sizeof job.data.path, "%s", data < 2 ? "/data/tokens.u16" : "");
          job.data.n_blend = data < 2 ? 0 : 1;
          job.data.n_test = data == 1;
          snprintf(job.data.split, sizeof job.data.split, "%s", data == 3 ? "98,2,0" : "949,50,1");
          int tests = (flags & 1) && (data == 1 || data == 2);
          job.train.steps = n;
          job.eval.interval = ev;
          job.eval.iters = 3;
          job.eval.test = flags & 1;
          job.checkpoint.interval = ci;
          job.checkpoint.async_save = (flags >> 1) & 1;
          snprintf(job.checkpoint.dir, sizeof job.checkpoint.dir, "%s", flags & 4 ? "/ckpt" : "");
          for (int step = 0; step <= n; step++) {
            mt_job_left want = {0, 0, 0, 0};
            for (int s = step + 1; s <= n; s++) {
              int validate = ev > 0 && s % ev == 0;
              want.steps++;
              want.eval_batches += (validate + (ev > 0 && s == n) * (1 + tests)) * 3;
              if ((flags & 4) && ((ci > 0 && s % ci == 0) || s == n)) {
                want.saves++;
                want.whole_saves += !job.checkpoint.async_save || validate || s == n;
              }
            }
            mt_job_left got = mt_job_left_after(&job, step);
            cases++;
            if (got.steps != want.steps || got.eval_batches != want.eval_batches ||
                got.saves != want.saves || got.whole_saves != want.whole_saves) {
              fprintf(stderr,
                      "    steps %d, eval.interval %d, test %d, checkpoint.interval %d, async %d, "
                      "dir %d, data %d, after step %d: got %lld/%lld/%lld/%lld, walked "
                      "%lld/%lld/%lld/%lld (steps/eval batches/saves/whole saves)\n",
                      n, ev, flags & 1, ci, (flags >> 1) & 1, (flags >> 2) & 1, data, step,
                      (long long)got.steps, (long long)got.eval_batches, (long long)got.saves,
                      (long long)got.whole_saves, (long long)want.steps,
                      (long long)want.eval_batches, (long long)want.saves,
                      (long long)want.whole_saves);
              CHECK(!"what is left after the step differs from the engine's walk");
            }
          }
        }
  printf("  %d runs and steps walked\n", cases);
}

/* train.rampup_batch: Megatron's --rampup-batch-size, its checks, the
 * run-long decay default, and the canonical JSON carrying it back. */
static void test_rampup_batch(void) {
  mt_job job, back;
  CHECK(parse_with(&job, tiny_job,
                   "train.rampup_batch={\"start\": 2, \"increment\": 2, \"samples\": 24}",
                   "train.steps=12") == MT_OK);
  /* an increment every 24 / 3 = 8 samples */
  int want[] = {2, 2, 2, 2, 4, 4, 6, 6, 8, 8, 8, 8};
  int64_t c = 0;
  for (int i = 0; i < 12; i++) {
    CHECK(mt_job_batch_at(&job, c) == want[i]);
    CHECK(mt_job_samples_of(&job, 0, i) == c);
    c += want[i];
  }
  CHECK(mt_job_samples_of(&job, 0, 12) == 60 && mt_job_samples_of(&job, 6, 3) == 2 + 4 + 4);
  CHECK(mt_job_batch_quantum(&job) == 2);
  CHECK(job.train.lr.decay_steps == 8); /* ceil(60 / 8): the run's samples */
  char *json = mt_job_to_json(&job);
  CHECK(json && strstr(json, "\"rampup_batch\":{\"increment\":2,\"samples\":24,\"start\":2}"));
  int rc = mt_job_parse(&back, json, "/jobs", presets, NULL);
  free(json);
  CHECK(rc == MT_OK && !strcmp(back.hash, job.hash) && back.train.rampup.samples == 24);
  mt_job plain;
  CHECK(parse_with(&plain, tiny_job, "train.steps=12", NULL) == MT_OK);
  CHECK(strcmp(plain.hash, job.hash) && mt_job_batch_at(&plain, 0) == 8);
  CHECK(mt_job_samples_of(&plain, 16, 3) == 24 && mt_job_batch_quantum(&plain) == 8);

  /* tokens: samples of seq_len (tiny: 64), rounded up */
  CHECK(parse_with(&job, tiny_job,
                   "train.rampup_batch={\"start\": 4, \"increment\": 4, \"tokens\": 1000}",
                   NULL) == MT_OK);
  CHECK(job.train.rampup.samples == (1000 + job.model.seq_len - 1) / job.model.seq_len);

  struct {
    const char *ov0, *ov1, *line;
  } cases[] = {
      {"train.rampup_batch={\"start\": 2, \"increment\": 4, \"samples\": 24}", NULL,
       "train.rampup_batch.increment: 4 does not divide train.global_batch - start = 8 - 2 = 6"},
      {"train.rampup_batch={\"start\": 8, \"increment\": 2, \"samples\": 24}", NULL,
       "train.rampup_batch.start: 8 is not below train.global_batch = 8"},
      {"train.rampup_batch={\"start\": 0, \"increment\": 2, \"samples\": 24}", NULL,
       "train.rampup_batch.start: 0 must be at least 1"},
      {"train.rampup_batch={\"start\": 2, \"increment\": 2}", NULL,
       "train.rampup_batch: give its length in samples or in tokens"},
      {"train.rampup_batch={\"start\": 2, \"increment\": 2, \"samples\": 1, \"tokens\": 1}", NULL,
       "train.rampup_batch: give its length in samples or in tokens, not both"},
      {"train.rampup_batch={\"start\": 2, \"increment\": 2, \"samples\": 24}", "parallel.dp_min=4",
       "train.rampup_batch: start 2 and increment 2 must both be divisible"},
      {"train.rampup_batch={\"increment\": 2, \"samples\": 24}", NULL,
       "train.rampup_batch.start: missing"},
      {"train.rampup_batch={\"start\": 2, \"increment\": 2, \"samples\": 24, \"x\": 1}", NULL,
       "train.rampup_batch.x"},
      /* the decay the ramp made (its 44 samples in batches of 8), not train.steps' 10 */
      {"train.rampup_batch={\"start\": 2, \"increment\": 2, \"samples\": 24}",
       "train.lr={\"peak\": 1e-3, \"schedule\": \"cosine\", \"warmup_steps\": 7}",
       "train.lr.warmup_steps: warmup of 7 steps is longer than the decay, 6 steps (the 44 "
       "samples train.steps = 10 read under train.rampup_batch, in batches of 8)"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
    rc = parse_with(&job, tiny_job, cases[i].ov0, cases[i].ov1);
    if (rc != MT_EINVAL || !has_line(mt_errmsg(), cases[i].line)) {
      fprintf(stderr, "%s: case %zu: want a line starting \"%s\", got (%d):\n%s\n", __func__, i,
              cases[i].line, rc, mt_errmsg());
      failures++;
    }
  }
}

/* tiny with its length left to the test's overrides */
static const char *tiny_no_length = "{\"model\": {\"preset\": \"tiny\"},"
                                    " \"train\": {\"global_batch\": 8, \"lr\": {\"peak\": 1e-3}},"
                                    " \"data\": {\"path\": \"tokens.u16\"}}";

static void test_run_length_in_samples_or_tokens_is_megatrons_steps(void) {
  mt_job job, steps_job, back;
  char ov[64], ramp[96];
  /* without a ramp-up: whole batches of 8, a partial last one dropped */
  for (int64_t n = 8; n <= 200; n++) {
    snprintf(ov, sizeof ov, "train.samples=%lld", (long long)n);
    CHECK(parse_with(&job, tiny_no_length, ov, NULL) == MT_OK);
    CHECK(job.train.steps == megatron_train_iters(n, 0, 0, 8, 0) && job.train.steps == n / 8);
    CHECK(!strcmp(job.train.length_key, "samples") && job.train.length_given == n);
    CHECK(job.train.lr.decay_steps == job.train.steps); /* the default follows the run */
  }
  /* tokens: samples of seq_len (tiny: 64) rounded up, then the same rule */
  CHECK(parse_with(&job, tiny_no_length, "train.tokens=5120", NULL) == MT_OK);
  CHECK(job.train.steps == 10 && !strcmp(job.train.length_key, "tokens")); /* 80 samples */
  CHECK(parse_with(&job, tiny_no_length, "train.tokens=5567", NULL) == MT_OK);
  CHECK(job.train.steps == 10); /* ceil(5567 / 64) = 87 samples: 10 whole batches */
  CHECK(parse_with(&job, tiny_no_length, "train.tokens=5569", NULL) == MT_OK);
  CHECK(job.train.steps == 11); /* ceil(5569 / 64) = 88 samples */
  CHECK(parse_with(&job, tiny_no_length, "train.tokens=5.632e3", NULL) == MT_OK);
  CHECK(job.train.steps == 11); /* an integral real, as token counts are written */

  /* under a ramp-up: 2, 2, 2, 2, 4, 4, 6, 6, then 8 (24 samples of ramp) */
  snprintf(ramp, sizeof ramp,
           "train.rampup_batch={\"start\": 2, \"increment\": 2, \"samples\": 24}");
  for (int64_t n = 2; n <= 300; n++) {
    snprintf(ov, sizeof ov, "train.samples=%lld", (long long)n);
    CHECK(parse_with(&job, tiny_no_length, ov, ramp) == MT_OK);
    int64_t want = n > 24 ? megatron_train_iters(n, 2, 2, 8, 24) : whole_steps(n, 2, 2, 8, 24);
    if (job.train.steps != want) {
      fprintf(stderr, "%s: %lld samples: %lld steps, want %lld\n", __func__, (long long)n,
              (long long)job.train.steps, (long long)want);
      failures++;
      return;
    }
    CHECK(n <= 24 || want == whole_steps(n, 2, 2, 8, 24)); /* one rule past the ramp */
    CHECK(mt_job_samples_of(&job, 0, job.train.steps) <= n);
    CHECK(mt_job_samples_of(&job, 0, job.train.steps + 1) > n);
  }
  /* a ramp-up in tokens and a length in tokens */
  CHECK(parse_with(&job, tiny_no_length, "train.tokens=6400",
                   "train.rampup_batch={\"start\": 2, \"increment\": 2, \"tokens\": 1536}") ==
        MT_OK);
  CHECK(job.train.steps == megatron_train_iters(100, 2, 2, 8, 24)); /* 6400 / 64, 1536 / 64 */
  CHECK(job.train.steps == 17); /* 2+2+2+2+4+4+6+6 = 28, then 9 of 8: 100 */

  /* an override of the length replaces the file's, in whichever unit */
  CHECK(parse_with(&job, tiny_job, "train.samples=96", NULL) == MT_OK); /* tiny_job: steps 10 */
  CHECK(job.train.steps == 12 && !strcmp(job.train.length_key, "samples"));
  CHECK(parse_with(&job, tiny_no_length, "train.tokens=5120", NULL) == MT_OK);
  CHECK(mt_job_parse(&back,
                     "{\"model\": {\"preset\": \"tiny\"}, \"train\": {\"global_batch\": 8, "
                     "\"tokens\": 5120, \"lr\": {\"peak\": 1e-3}}, \"data\": {\"path\": \"t\"}}",
                     "/jobs", presets, (const char *const[]){"train.steps=3", NULL}) == MT_OK);
  CHECK(back.train.steps == 3 && !back.train.length_key[0]);

  /* the resolved job is in steps: the same job, hash and JSON as the steps
   * it came to, so a checkpoint of one resumes as the other */
  CHECK(parse_with(&job, tiny_no_length, "train.samples=100", ramp) == MT_OK);
  CHECK(parse_with(&steps_job, tiny_no_length, "train.steps=17", ramp) == MT_OK);
  CHECK(!strcmp(job.hash, steps_job.hash) &&
        job.train.lr.decay_steps == steps_job.train.lr.decay_steps);
  char *json = mt_job_to_json(&job);
  CHECK(json && strstr(json, "\"steps\":17") && !strstr(json, "\"samples\":100") &&
        !strstr(json, "\"tokens\""));
  int rc = mt_job_parse(&back, json, "/jobs", presets, NULL);
  free(json);
  CHECK(rc == MT_OK && !strcmp(back.hash, job.hash) && back.train.steps == 17);
}

static void test_run_length_refusals_name_the_key_given(void) {
  struct {
    const char *ov0, *ov1, *line;
  } cases[] = {
      {"train.steps=10", "train.samples=80",
       "train.samples: the run's length is given twice, as train.steps and train.samples: give "
       "one of train.steps, train.samples or train.tokens"},
      {"train.samples=80", "train.tokens=5120",
       "train.tokens: the run's length is given twice, as train.samples and train.tokens"},
      {"train={\"global_batch\": 8, \"steps\": 1, \"samples\": 8, \"tokens\": 512, \"lr\": "
       "{\"peak\": 1e-3}}",
       NULL,
       "train.tokens: the run's length is given three times, as train.steps, train.samples and "
       "train.tokens"},
      {"train.samples=0", NULL, "train.samples: 0 must be at least 1"},
      /* with a warmup: no second line comparing it with the 0 steps left */
      {"train.samples=0", "train.lr={\"peak\": 1e-3, \"warmup_steps\": 3}",
       "train.samples: 0 must be at least 1"},
      {"train.samples=-8", NULL, "train.samples: -8 must be at least 1"},
      {"train.tokens=0", NULL, "train.tokens: 0 must be at least 1"},
      {"train.samples=80.5", NULL, "train.samples: expected an integer, got 80.5"},
      {"train.tokens=lots", NULL, "train.tokens: expected an integer, got a string, \"lots\""},
      {"train.samples=1125899906842625", NULL,
       "train.samples: 1125899906842625 is over 2^50, the most this version takes"},
      {"train.tokens=9e18", NULL,
       "train.tokens: 140625000000000000 samples of model.seq_len 64 tokens are over 2^50"},
      {"train.samples=7", NULL,
       "train.samples: 7 samples hold no whole batch (the first is 8 samples): the run would "
       "have no step"},
      {"train.tokens=448", NULL, /* 7 samples; 449 tokens would be 8 */
       "train.tokens: 448 tokens hold no whole batch (the first is 8 samples of model.seq_len "
       "tokens)"},
      {"train.samples=1", "train.rampup_batch={\"start\": 2, \"increment\": 2, \"samples\": 24}",
       "train.samples: 1 samples hold no whole batch (the first is 2 samples)"},
      /* the default decay, resolved from samples, named as such */
      {"train.samples=80", "train.lr={\"peak\": 1e-3, \"warmup_steps\": 11}",
       "train.lr.warmup_steps: warmup of 11 steps is longer than the decay, 10 steps (the 10 "
       "steps of train.samples = 80)"},
  };
  mt_job job;
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
    int rc = parse_with(&job, tiny_no_length, cases[i].ov0, cases[i].ov1);
    /* one line: no "train.steps" line besides the one about the key given */
    if (rc != MT_EINVAL || !has_line(mt_errmsg(), cases[i].line) || count_lines(mt_errmsg()) != 1) {
      fprintf(stderr, "%s: case %zu: want the one line \"%s\", got (%d):\n%s\n", __func__, i,
              cases[i].line, rc, mt_errmsg());
      failures++;
    }
  }
  /* none of them: the missing length names all three */
  CHECK(parse_with(&job, tiny_no_length, NULL, NULL) == MT_EINVAL);
  CHECK(!strcmp(mt_errmsg(), "train.steps: missing (or give the run's length as train.samples "
                             "or train.tokens)"));
  /* a length a wrong batch cannot resolve leaves it to the batch's line */
  CHECK(parse_with(&job, tiny_no_length, "train.samples=80", "train.global_batch=0") == MT_EINVAL);
  CHECK(!strcmp(mt_errmsg(), "train.global_batch: 0 must be at least 1"));
}

static void test_every_preset_is_valid(void) {
  const char *names[] = {"tiny", "gpt2-124m", "gpt3-1.3b", "mtnlg-530b"};
  for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
    char ov[64];
    snprintf(ov, sizeof ov, "model.preset=%s", names[i]);
    mt_job job;
    int rc = parse_with(&job, tiny_job, ov, NULL);
    if (rc != MT_OK) {
      fprintf(stderr, "%s: %s: %s\n", __func__, names[i], mt_errmsg());
      failures++;
    }
  }
}

/* A job read through a descriptor (a pipe, /dev/stdin redirected from a
 * file) has no directory of its own: its relative paths are the current
 * directory's, as any argument's, not /proc/self/fd's. */
static void test_job_from_a_descriptor_takes_the_current_directory(void) {
  FILE *f = tmpfile();
  CHECK(f && fputs(tiny_job, f) >= 0 && fflush(f) == 0 && fseek(f, 0, SEEK_SET) == 0);
  char via[64], cwd[MT_PATH_MAX], want[MT_PATH_MAX + 16];
  snprintf(via, sizeof via, "/proc/self/fd/%d", fileno(f));
  mt_job job;
  int rc = mt_job_load(&job, via, presets, NULL);
  fclose(f);
  CHECK(rc == MT_OK && getcwd(cwd, sizeof cwd));
  snprintf(want, sizeof want, "%s/tokens.u16", cwd);
  CHECK(!strcmp(job.data.path, want));
  /* a file under /dev that is a file (tmpfs) keeps its own directory */
  char shm[] = "/dev/shm/mt_test_job_XXXXXX";
  int fd = mkstemp(shm);
  if (fd < 0) return; /* no /dev/shm here */
  FILE *g = fdopen(fd, "w");
  int wrote = g && fputs(tiny_job, g) >= 0;
  if (g) fclose(g);
  rc = wrote ? mt_job_load(&job, shm, presets, NULL) : MT_EIO;
  unlink(shm);
  CHECK(rc == MT_OK && !strcmp(job.data.path, "/dev/shm/tokens.u16"));
}

static void test_load_missing_file_is_eio(void) {
  mt_job job;
  CHECK(mt_job_load(&job, "/nonexistent/job.json", presets, NULL) == MT_EIO);
  CHECK(strstr(mt_errmsg(), "/nonexistent/job.json") != NULL);
  /* a directory is named as one, not "'[' or '{' expected near end of file" */
  CHECK(mt_job_load(&job, "/tmp", presets, NULL) == MT_EINVAL);
  CHECK(strstr(mt_errmsg(), "job /tmp: a directory, not a JSON job spec") != NULL);
}

/* checkpoint.load and load_optimizer: read, resolved against the job's
 * directory (an override stays as given, as every path does), carried by the canonical JSON (the
 * published job) and left out of it when not given, so the hash of every other job stays as it was.
 */
static void test_checkpoint_load_round_trip(void) {
  mt_job a, b, plain;
  const char *with_load = "{\"model\": {\"preset\": \"tiny\"},"
                          " \"train\": {\"global_batch\": 8, \"steps\": 10,"
                          "             \"lr\": {\"peak\": 1e-3}},"
                          " \"checkpoint\": {\"load\": \"ck/base\"},"
                          " \"data\": {\"path\": \"tokens.u16\"}}";
  CHECK(parse_with(&a, with_load, "checkpoint.load_optimizer=true", NULL) == MT_OK);
  CHECK(!strcmp(a.checkpoint.load, "/jobs/ck/base") && a.checkpoint.load_optimizer == 1);
  char *text = mt_job_to_json(&a);
  CHECK(text != NULL);
  int rc = mt_job_parse(&b, text, NULL, presets, NULL);
  free(text);
  CHECK(rc == MT_OK && !strcmp(b.checkpoint.load, a.checkpoint.load) &&
        b.checkpoint.load_optimizer == 1 && !strcmp(a.hash, b.hash));
  CHECK(parse_with(&plain, tiny_job, NULL, NULL) == MT_OK && !plain.checkpoint.load[0] &&
        !plain.checkpoint.load_optimizer);
  text = mt_job_to_json(&plain);
  CHECK(text != NULL);
  int absent = strstr(text, "\"load") == NULL;
  free(text);
  CHECK(absent);
}

/* train.tensorboard_dir: resolved against the job file's directory, written
 * back only when given (other jobs keep their hash), empty refused. */
static void test_tensorboard_dir_resolves_and_round_trips(void) {
  mt_job a, b, plain;
  const char *with_tb = "{\"model\": {\"preset\": \"tiny\"},"
                        " \"train\": {\"global_batch\": 8, \"steps\": 10,"
                        "             \"lr\": {\"peak\": 1e-3}, \"tensorboard_dir\": \"tb/run1\"},"
                        " \"data\": {\"path\": \"tokens.u16\"}}";
  CHECK(parse_with(&a, with_tb, NULL, NULL) == MT_OK);
  CHECK(!strcmp(a.train.tensorboard_dir, "/jobs/tb/run1"));
  char *text = mt_job_to_json(&a);
  CHECK(text != NULL);
  int rc = mt_job_parse(&b, text, NULL, presets, NULL);
  free(text);
  CHECK(rc == MT_OK && !strcmp(b.train.tensorboard_dir, a.train.tensorboard_dir) &&
        !strcmp(a.hash, b.hash));
  CHECK(parse_with(&plain, tiny_job, NULL, NULL) == MT_OK && !plain.train.tensorboard_dir[0]);
  text = mt_job_to_json(&plain);
  CHECK(text != NULL);
  int absent = strstr(text, "tensorboard") == NULL;
  free(text);
  CHECK(absent);
  CHECK(parse_with(&b, tiny_job, "train.tensorboard_dir=", NULL) == MT_EINVAL);
  CHECK(has_line(mt_errmsg(), "train.tensorboard_dir: must not be empty"));
}

/* data.eod_mask_loss (Megatron's --eod-mask-loss) with data.eod_token:
 * read, carried back in the canonical JSON only when on (so other jobs keep
 * their hash, the key given false included), the hash changing with either,
 * and each mistake one line naming its key. */
static void test_eod_mask_loss_keys_round_trip_and_hash(void) {
  mt_job plain, off, job, back, other;
  CHECK(parse_with(&plain, tiny_job, NULL, NULL) == MT_OK);
  CHECK(!plain.data.eod_mask_loss && plain.data.eod_token == -1);
  CHECK(parse_with(&off, tiny_job, "data.eod_mask_loss=false", NULL) == MT_OK);
  CHECK(!strcmp(off.hash, plain.hash));
  char *json = mt_job_to_json(&plain);
  CHECK(json && !strstr(json, "eod"));
  free(json);
  CHECK(parse_with(&job, tiny_job, "data.eod_mask_loss=true", "data.eod_token=10") == MT_OK);
  CHECK(job.data.eod_mask_loss == 1 && job.data.eod_token == 10 && strcmp(job.hash, plain.hash));
  json = mt_job_to_json(&job);
  CHECK(json && strstr(json, "\"eod_mask_loss\":true") && strstr(json, "\"eod_token\":10"));
  CHECK(json && mt_job_parse(&back, json, "/jobs", presets, NULL) == MT_OK &&
        !strcmp(back.hash, job.hash) && back.data.eod_mask_loss && back.data.eod_token == 10);
  free(json);
  CHECK(parse_with(&other, tiny_job, "data.eod_mask_loss=true", "data.eod_token=11") == MT_OK);
  CHECK(strcmp(other.hash, job.hash));
  const char *indexed =
      "{\"model\": {\"preset\": \"tiny\"},"
      " \"train\": {\"global_batch\": 8, \"steps\": 10, \"lr\": {\"peak\": 1e-3}},"
      " \"data\": {\"prefix\": \"corpus\", \"eod_mask_loss\": true,"
      " \"eod_token\": 255}}";
  CHECK(mt_job_parse(&job, indexed, "/jobs", presets, NULL) == MT_OK && job.data.eod_mask_loss &&
        job.data.eod_token == 255);
  refusal cases[] = {
      {"data.eod_mask_loss=true", NULL,
       "data.eod_token: missing: data.eod_mask_loss masks the loss at the end-of-document token"},
      {"data.eod_mask_loss=true", "data.eod_token=256",
       "data.eod_token: 256 is no token of model.vocab_size 256"},
      {"data.eod_mask_loss=true", "data.eod_token=-1",
       "data.eod_token: -1 is out of range [0, 2147483647]"},
      {"data.eod_mask_loss=1", "data.eod_token=10",
       "data.eod_mask_loss: expected true or false, got an integer"},
  };
  one_line_refusals(cases, sizeof cases / sizeof *cases, __func__);
}

/* data.reset_position_ids (Megatron's --reset-position-ids): needs
 * data.eod_token as the loss mask does, carried back (with the id) only
 * when true, so the jobs without it keep their hash; either changes it. */
static void test_reset_position_ids_keys_round_trip_and_hash(void) {
  mt_job plain, off, job, back, both;
  char unused[MT_JOB_UNUSED_MAX][256];
  CHECK(parse_with(&plain, tiny_job, NULL, NULL) == MT_OK && !plain.data.reset_position_ids);
  CHECK(parse_with(&off, tiny_job, "data.reset_position_ids=false", NULL) == MT_OK);
  CHECK(!strcmp(off.hash, plain.hash) && !strcmp(plain.hash, "ada038af3160cc86"));
  CHECK(parse_with(&job, tiny_job, "data.reset_position_ids=true", "data.eod_token=10") == MT_OK);
  CHECK(job.data.reset_position_ids && !job.data.eod_mask_loss && strcmp(job.hash, plain.hash));
  CHECK(mt_job_unused(&job, unused) == 0);
  char *json = mt_job_to_json(&job);
  CHECK(json && strstr(json, "\"reset_position_ids\":true") && strstr(json, "\"eod_token\":10") &&
        !strstr(json, "eod_mask_loss"));
  CHECK(json && mt_job_parse(&back, json, "/jobs", presets, NULL) == MT_OK &&
        !strcmp(back.hash, job.hash) && back.data.reset_position_ids && back.data.eod_token == 10);
  free(json);
  CHECK(parse_with(&both, tiny_job, "data.reset_position_ids=true", "data.eod_mask_loss=true") ==
            MT_EINVAL &&
        count_lines(mt_errmsg()) == 1); /* one missing eod_token, not two */
  CHECK(parse_with(&off, tiny_job, "data.eod_token=10", NULL) == MT_OK &&
        mt_job_unused(&off, unused) == 1 && !strncmp(unused[0], "data.eod_token: only", 20));
  refusal cases[] = {
      {"data.reset_position_ids=true", NULL,
       "data.eod_token: missing: data.reset_position_ids starts the positions again"},
      {"data.reset_position_ids=true", "data.eod_token=256",
       "data.eod_token: 256 is no token of model.vocab_size 256"},
      {"data.reset_position_ids=yes", "data.eod_token=10",
       "data.reset_position_ids: expected true or false, got a string"},
  };
  one_line_refusals(cases, sizeof cases / sizeof *cases, __func__);
}

/* data.reset_attention_mask (Megatron's --reset-attention-mask): the same
 * rules, alone and with the position reset, each key hashed on its own. */
static void test_reset_attention_mask_keys_round_trip_and_hash(void) {
  mt_job plain, off, job, back, pos, both;
  char unused[MT_JOB_UNUSED_MAX][256];
  CHECK(parse_with(&plain, tiny_job, NULL, NULL) == MT_OK && !plain.data.reset_attention_mask);
  CHECK(parse_with(&off, tiny_job, "data.reset_attention_mask=false", NULL) == MT_OK);
  CHECK(!strcmp(off.hash, plain.hash) && !strcmp(plain.hash, "ada038af3160cc86"));
  CHECK(parse_with(&job, tiny_job, "data.reset_attention_mask=true", "data.eod_token=10") == MT_OK);
  CHECK(job.data.reset_attention_mask && !job.data.reset_position_ids &&
        strcmp(job.hash, plain.hash) && mt_job_unused(&job, unused) == 0);
  char *json = mt_job_to_json(&job);
  CHECK(json && strstr(json, "\"reset_attention_mask\":true") && strstr(json, "\"eod_token\":10") &&
        !strstr(json, "reset_position_ids"));
  CHECK(json && mt_job_parse(&back, json, "/jobs", presets, NULL) == MT_OK &&
        !strcmp(back.hash, job.hash) && back.data.reset_attention_mask &&
        back.data.eod_token == 10);
  free(json);
  CHECK(parse_with(&pos, tiny_job, "data.reset_position_ids=true", "data.eod_token=10") == MT_OK);
  const char *both_keys[] = {"data.reset_position_ids=true", "data.reset_attention_mask=true",
                             "data.eod_token=10", NULL};
  CHECK(mt_job_parse(&both, tiny_job, "/jobs", presets, both_keys) == MT_OK &&
        both.data.reset_position_ids && both.data.reset_attention_mask &&
        strcmp(both.hash, job.hash) && strcmp(both.hash, pos.hash) && strcmp(pos.hash, job.hash));
  CHECK(parse_with(&both, tiny_job, "data.reset_position_ids=true",
                   "data.reset_attention_mask=true") == MT_EINVAL &&
        count_lines(mt_errmsg()) == 1); /* one missing eod_token */
  refusal cases[] = {
      {"data.reset_attention_mask=true", NULL,
       "data.eod_token: missing: data.reset_attention_mask keeps attention within the documents"},
      {"data.reset_attention_mask=true", "data.eod_token=256",
       "data.eod_token: 256 is no token of model.vocab_size 256"},
      {"data.reset_attention_mask=1", "data.eod_token=10",
       "data.reset_attention_mask: expected true or false, got an integer"},
  };
  one_line_refusals(cases, sizeof cases / sizeof *cases, __func__);
}

/* train.log_num_zeros_in_grad: off by default, so jobs without it keep
 * their hash (the key is written only when on); on, carried back through
 * the canonical JSON with the same hash; anything but a bool one line
 * naming the key. */
static void test_log_num_zeros_in_grad_round_trips_and_keeps_the_hash(void) {
  mt_job plain, off, on, back;
  CHECK(parse_with(&plain, tiny_job, NULL, NULL) == MT_OK && !plain.train.log_num_zeros_in_grad);
  CHECK(parse_with(&off, tiny_job, "train.log_num_zeros_in_grad=false", NULL) == MT_OK);
  CHECK(!strcmp(plain.hash, off.hash) && !strcmp(plain.hash, TINY_JOB_HASH));
  CHECK(parse_with(&on, tiny_job, "train.log_num_zeros_in_grad=true", NULL) == MT_OK);
  CHECK(on.train.log_num_zeros_in_grad && strcmp(on.hash, plain.hash));
  char *json = mt_job_to_json(&on), *plain_json = mt_job_to_json(&plain);
  CHECK(json && strstr(json, "\"log_num_zeros_in_grad\":true"));
  CHECK(plain_json && !strstr(plain_json, "log_num_zeros_in_grad"));
  CHECK(json && mt_job_parse(&back, json, "/jobs", presets, NULL) == MT_OK &&
        back.train.log_num_zeros_in_grad && !strcmp(back.hash, on.hash));
  free(json);
  free(plain_json);
  refusal cases[] = {
      {"train.log_num_zeros_in_grad=1", NULL,
       "train.log_num_zeros_in_grad: expected true or false, got an integer"},
      {"train.log_num_zeros_in_grad=\"yes\"", NULL,
       "train.log_num_zeros_in_grad: expected true or false, got a string"},
  };
  one_line_refusals(cases, sizeof cases / sizeof *cases, __func__);
}

/* train.timing_log_level: 0 by default and written only when set, so jobs
 * without it keep their hash; 2 carried back through the canonical JSON
 * with the same hash; a level past 0..2 or not an integer one line naming
 * the key. */
static void test_timing_log_level_round_trips_and_keeps_the_hash(void) {
  mt_job plain, zero, two, back;
  CHECK(parse_with(&plain, tiny_job, NULL, NULL) == MT_OK && plain.train.timing_log_level == 0);
  CHECK(parse_with(&zero, tiny_job, "train.timing_log_level=0", NULL) == MT_OK);
  CHECK(!strcmp(plain.hash, zero.hash) && !strcmp(plain.hash, TINY_JOB_HASH));
  CHECK(parse_with(&two, tiny_job, "train.timing_log_level=2", NULL) == MT_OK);
  CHECK(two.train.timing_log_level == 2);
  char *json = mt_job_to_json(&two), *plain_json = mt_job_to_json(&plain);
  CHECK(json && strstr(json, "\"timing_log_level\":2"));
  CHECK(plain_json && !strstr(plain_json, "timing_log_level"));
  CHECK(json && mt_job_parse(&back, json, "/jobs", presets, NULL) == MT_OK &&
        back.train.timing_log_level == 2 && !strcmp(back.hash, two.hash));
  free(json);
  free(plain_json);
  refusal cases[] = {
      {"train.timing_log_level=3", NULL,
       "train.timing_log_level: 3 must be 0 (no timers), 1 (the step's phases) or 2 (and the "
       "model's pieces)"},
      {"train.timing_log_level=-1", NULL, "train.timing_log_level: -1 must be 0"},
      {"train.timing_log_level=1.5", NULL, "train.timing_log_level: expected an integer"},
      {"train.timing_log_level=true", NULL, "train.timing_log_level: expected an integer"},
      {"train.log_timers_to_tensorboard=true", "train.tensorboard_dir=\"tb\"",
       "train.log_timers_to_tensorboard: needs train.timing_log_level 1 or 2"},
      {"train.log_timers_to_tensorboard=true", "train.timing_log_level=1",
       "train.log_timers_to_tensorboard: needs train.tensorboard_dir"},
      {"train.log_timers_to_tensorboard=1", NULL,
       "train.log_timers_to_tensorboard: expected true or false, got an integer"},
  };
  one_line_refusals(cases, sizeof cases / sizeof *cases, __func__);
}

/* train.timing_log_option: minmax by default and written only when
 * another (jobs without it, or saying minmax, keep their hash); max and
 * all carried back through the canonical JSON; another name, not a
 * string, or max/all without a level refused naming the key. */
static void test_timing_log_option_round_trips_and_keeps_the_hash(void) {
  mt_job plain, minmax, job, back;
  CHECK(parse_with(&plain, tiny_job, NULL, NULL) == MT_OK &&
        plain.train.timing_log_option == MT_TIMING_MINMAX);
  CHECK(parse_with(&minmax, tiny_job, "train.timing_log_option=\"minmax\"", NULL) == MT_OK);
  CHECK(!strcmp(minmax.hash, TINY_JOB_HASH));
  const char *names[] = {"max", "all"};
  const int want[] = {MT_TIMING_MAX, MT_TIMING_ALL};
  for (int i = 0; i < 2; i++) {
    char set[64];
    snprintf(set, sizeof set, "train.timing_log_option=\"%s\"", names[i]);
    CHECK(parse_with(&job, tiny_job, set, "train.timing_log_level=1") == MT_OK &&
          job.train.timing_log_option == want[i]);
    CHECK(!strcmp(mt_job_timing_option_name(want[i]), names[i]));
    char *json = mt_job_to_json(&job);
    CHECK(json && mt_job_parse(&back, json, "/jobs", presets, NULL) == MT_OK &&
          back.train.timing_log_option == want[i] && !strcmp(back.hash, job.hash));
    free(json);
  }
  char *plain_json = mt_job_to_json(&minmax);
  CHECK(plain_json && !strstr(plain_json, "timing_log_option"));
  free(plain_json);
  refusal cases[] = {
      {"train.timing_log_option=\"most\"", "train.timing_log_level=1",
       "train.timing_log_option: \"most\" is not one of minmax (the least and the most of any "
       "rank), max (the most) or all (every rank's)"},
      {"train.timing_log_option=2", NULL, "train.timing_log_option: expected a string"},
      {"train.timing_log_option=\"all\"", NULL,
       "train.timing_log_option: all needs train.timing_log_level 1 or 2"},
      {"train.timing_log_option=\"max\"", "train.timing_log_level=0",
       "train.timing_log_option: max needs train.timing_log_level 1 or 2"},
  };
  one_line_refusals(cases, sizeof cases / sizeof *cases, __func__);
}

/* train.log_memory_to_tensorboard: off by default and written only when
 * on (jobs without it keep their hash), carried back through the
 * canonical JSON; without a tensorboard_dir, or not a boolean, refused
 * naming the key. */
static void test_log_memory_to_tensorboard_round_trips_and_keeps_the_hash(void) {
  mt_job plain, off, on, back;
  CHECK(parse_with(&plain, tiny_job, NULL, NULL) == MT_OK &&
        !plain.train.log_memory_to_tensorboard);
  CHECK(parse_with(&off, tiny_job, "train.log_memory_to_tensorboard=false", NULL) == MT_OK);
  CHECK(!strcmp(off.hash, TINY_JOB_HASH));
  CHECK(parse_with(&on, tiny_job, "train.log_memory_to_tensorboard=true",
                   "train.tensorboard_dir=\"/runs/tb\"") == MT_OK &&
        on.train.log_memory_to_tensorboard);
  char *json = mt_job_to_json(&on), *plain_json = mt_job_to_json(&plain);
  CHECK(json && strstr(json, "\"log_memory_to_tensorboard\":true"));
  CHECK(plain_json && !strstr(plain_json, "log_memory_to_tensorboard"));
  CHECK(json && mt_job_parse(&back, json, "/jobs", presets, NULL) == MT_OK &&
        back.train.log_memory_to_tensorboard && !strcmp(back.hash, on.hash));
  free(json);
  free(plain_json);
  refusal cases[] = {
      {"train.log_memory_to_tensorboard=true", NULL,
       "train.log_memory_to_tensorboard: needs train.tensorboard_dir"},
      {"train.log_memory_to_tensorboard=\"yes\"", "train.tensorboard_dir=\"tb\"",
       "train.log_memory_to_tensorboard: expected true or false, got a string"},
  };
  one_line_refusals(cases, sizeof cases / sizeof *cases, __func__);
}

/* train.profile (Megatron's --profile and its --profile-step-start, -end
 * and -ranks): off by default and written only when given (jobs without it
 * keep their hash); {} takes Megatron's 10, 12 and [0]; the keys carried
 * back through the canonical JSON; an end not after the start, a rank the
 * job cannot have, an empty or mistyped rank list and an unknown key
 * refused naming the key. */
static void test_profile_defaults_round_trips_and_keeps_the_hash(void) {
  mt_job plain, dflt, job, back;
  CHECK(parse_with(&plain, tiny_job, NULL, NULL) == MT_OK && !plain.train.profile.on);
  CHECK(!strcmp(plain.hash, TINY_JOB_HASH));
  CHECK(parse_with(&dflt, tiny_job, "train.profile={}", NULL) == MT_OK && dflt.train.profile.on &&
        dflt.train.profile.step_start == 10 && dflt.train.profile.step_end == 12 &&
        dflt.train.profile.n_ranks == 1 && dflt.train.profile.ranks[0] == 0);
  CHECK(parse_with(&job, tiny_job,
                   "train.profile={\"step_start\": 100, \"step_end\": 105, \"ranks\": [0, 3]}",
                   "parallel.dp_min=4") == MT_OK);
  CHECK(job.train.profile.step_start == 100 && job.train.profile.step_end == 105 &&
        job.train.profile.n_ranks == 2 && job.train.profile.ranks[1] == 3);
  char *json = mt_job_to_json(&job), *plain_json = mt_job_to_json(&plain);
  CHECK(json && strstr(json, "\"profile\":{\"ranks\":[0,3],\"step_end\":105,\"step_start\":100}"));
  CHECK(plain_json && !strstr(plain_json, "profile"));
  CHECK(json && mt_job_parse(&back, json, "/jobs", presets, NULL) == MT_OK &&
        back.train.profile.on && back.train.profile.step_end == 105 &&
        back.train.profile.n_ranks == 2 && !strcmp(back.hash, job.hash));
  free(json);
  free(plain_json);
  refusal cases[] = {
      {"train.profile={\"step_start\": 5, \"step_end\": 5}", NULL,
       "train.profile.step_end: 5 is not after step_start = 5"},
      {"train.profile={\"ranks\": [1]}", NULL,
       "train.profile.ranks: world rank 1 is not in the job: it runs at most tp 1 x pp 1 x dp_max "
       "1 = 1 ranks, 0 to 0"},
      {"train.profile={\"ranks\": []}", NULL,
       "train.profile.ranks: expected an array of 1 to 64 world ranks, got an empty array"},
      {"train.profile={\"ranks\": 0}", NULL,
       "train.profile.ranks: expected an array of 1 to 64 world ranks, got an integer"},
      {"train.profile={\"ranks\": [-1]}", NULL,
       "train.profile.ranks[0]: expected a world rank (0 or more), got a negative integer"},
      {"train.profile={\"step_start\": -1}", NULL, "train.profile.step_start: -1 is out of range"},
      {"train.profile={\"start\": 3}", NULL, "train.profile.start"},
      {"train.profile=true", NULL, "train.profile: expected an object"},
  };
  one_line_refusals(cases, sizeof cases / sizeof *cases, __func__);
}

/* model.attention_backend: unset by default and written only when given
 * (jobs without it keep their hash); flash, chunked and auto carried back
 * through the canonical JSON; another name, a non-string or a preset
 * saying it refused naming the key. */
static void test_attention_backend_round_trips_and_keeps_the_hash(void) {
  mt_job plain, job, back;
  CHECK(parse_with(&plain, tiny_job, NULL, NULL) == MT_OK && !plain.model.attention_backend[0]);
  CHECK(!strcmp(plain.hash, TINY_JOB_HASH));
  const char *names[] = {"flash", "chunked", "auto"};
  for (int i = 0; i < 3; i++) {
    char set[64];
    snprintf(set, sizeof set, "model.attention_backend=\"%s\"", names[i]);
    CHECK(parse_with(&job, tiny_job, set, NULL) == MT_OK &&
          !strcmp(job.model.attention_backend, names[i]));
    char *json = mt_job_to_json(&job);
    CHECK(json && mt_job_parse(&back, json, "/jobs", presets, NULL) == MT_OK &&
          !strcmp(back.model.attention_backend, names[i]) && !strcmp(back.hash, job.hash));
    free(json);
  }
  char *plain_json = mt_job_to_json(&plain);
  CHECK(plain_json && !strstr(plain_json, "attention_backend"));
  free(plain_json);
  refusal cases[] = {
      {"model.attention_backend=\"fused\"", NULL,
       "model.attention_backend: \"fused\" is not one of flash (the fused kernels), chunked"},
      {"model.attention_backend=\"\"", NULL, "model.attention_backend: \"\" is not one of"},
      {"model.attention_backend=1", NULL, "model.attention_backend: expected a string"},
  };
  one_line_refusals(cases, sizeof cases / sizeof *cases, __func__);
}

/* model.untie_embeddings: off by default and when false (the hash of a
 * job from before it), material when on (another hash, in the canonical
 * form, which reads back to it), a preset may say it (an architecture),
 * and a value not a boolean is refused naming the key, in a job or in a
 * preset. */
static void test_untie_embeddings_key_round_trips_and_keeps_the_hash(void) {
  mt_job plain, off, job, back, preset_job;
  CHECK(parse_with(&plain, tiny_job, NULL, NULL) == MT_OK && !plain.model.untie_embeddings);
  CHECK(!strcmp(plain.hash, TINY_JOB_HASH));
  CHECK(parse_with(&off, tiny_job, "model.untie_embeddings=false", NULL) == MT_OK);
  CHECK(!strcmp(off.hash, TINY_JOB_HASH));
  char *json = mt_job_to_json(&off);
  CHECK(json && !strstr(json, "untie"));
  free(json);
  CHECK(parse_with(&job, tiny_job, "model.untie_embeddings=true", NULL) == MT_OK);
  CHECK(job.model.untie_embeddings == 1 && strcmp(job.hash, TINY_JOB_HASH));
  json = mt_job_to_json(&job);
  CHECK(json && strstr(json, "\"untie_embeddings\":true"));
  CHECK(json && mt_job_parse(&back, json, "/jobs", presets, NULL) == MT_OK &&
        !strcmp(back.hash, job.hash) && back.model.untie_embeddings);
  free(json);
  /* in a preset: the same job as given in the job */
  char dir[] = "/tmp/test_job_untie_XXXXXX", path[256];
  CHECK(mkdtemp(dir) != NULL);
  snprintf(path, sizeof path, "%s/untied.json", dir);
  FILE *f = fopen(path, "w");
  CHECK(f != NULL);
  fputs("{\"n_layer\": 2, \"n_embd\": 64, \"n_head\": 4, \"vocab_size\": 256,"
        " \"seq_len\": 64, \"init_std\": 0.02, \"untie_embeddings\": true}",
        f);
  fclose(f);
  const char *dirs[] = {dir, MT_PRESET_DIR, NULL};
  const char *untied_job = "{\"model\": {\"preset\": \"untied\"},"
                           " \"train\": {\"global_batch\": 8, \"steps\": 10,"
                           "             \"lr\": {\"peak\": 1e-3}},"
                           " \"data\": {\"path\": \"tokens.u16\"}}";
  int rc = mt_job_parse(&preset_job, untied_job, "/jobs", dirs, NULL);
  int untied = preset_job.model.untie_embeddings;
  f = fopen(path, "w");
  if (f) {
    fputs("{\"n_layer\": 2, \"n_embd\": 64, \"n_head\": 4, \"vocab_size\": 256,"
          " \"seq_len\": 64, \"untie_embeddings\": 1}",
          f);
    fclose(f);
  }
  mt_job bad;
  int rc2 = mt_job_parse(&bad, untied_job, "/jobs", dirs, NULL);
  char msg[1024];
  snprintf(msg, sizeof msg, "%s", mt_errmsg());
  unlink(path);
  rmdir(dir);
  CHECK(rc == MT_OK && untied && !strcmp(preset_job.hash, job.hash));
  CHECK(rc2 == MT_EINVAL && count_lines(msg) == 1 &&
        strstr(msg, "untied.json: untie_embeddings: expected true or false, got an integer"));
  refusal cases[] = {
      {"model.untie_embeddings=1", NULL,
       "model.untie_embeddings: expected true or false, got an integer"},
      {"model.untie_embeddings=\"yes\"", NULL,
       "model.untie_embeddings: expected true or false, got a string"},
  };
  one_line_refusals(cases, sizeof cases / sizeof *cases, __func__);
}

int main(void) {
  test_tiny_preset_loads();
  test_job_fields_override_preset_fields();
  test_model_given_field_by_field_needs_no_preset();
  test_override_sets_nested_key();
  test_malformed_override_is_named();
  test_unknown_key_is_named();
  test_data_sources_blend_and_split();
  test_wrong_type_is_named();
  test_every_problem_reported_one_per_line();
  test_validation_rules();
  test_long_string_is_an_error_not_truncated();
  test_tokens_lengths_convert_to_steps();
  test_lr_min_defaults_by_schedule();
  test_lr_inverse_square_root_and_wsd();
  test_weight_decay_schedule_and_warmup_init();
  test_eval_test_key();
  test_data_valid_and_test();
  test_eod_mask_loss_keys_round_trip_and_hash();
  test_hash_changes_with_any_field_and_not_with_key_order();
  test_loss_scale_defaults_checks_and_round_trip();
  test_export_dtype_round_trips_and_fp32_keeps_the_hash();
  test_what_a_run_has_left_is_what_the_engine_walks();
  test_profile_defaults_round_trips_and_keeps_the_hash();
  test_rampup_batch();
  test_run_length_in_samples_or_tokens_is_megatrons_steps();
  test_run_length_refusals_name_the_key_given();
  test_bad_json_reports_line_and_column();
  test_missing_preset_lists_search_dirs();
  test_preset_dirs_searched_in_order();
  test_missing_required_fields_are_named();
  test_unused_settings_are_named();
  test_tiny_demo_example_loads();
  test_530b_example_loads_in_bf16();
  test_every_preset_is_valid();
  test_reset_position_ids_keys_round_trip_and_hash();
  test_reset_attention_mask_keys_round_trip_and_hash();
  test_load_missing_file_is_eio();
  test_checkpoint_load_round_trip();
  test_tensorboard_dir_resolves_and_round_trips();
  test_job_from_a_descriptor_takes_the_current_directory();
  test_log_num_zeros_in_grad_round_trips_and_keeps_the_hash();
  test_timing_log_level_round_trips_and_keeps_the_hash();
  test_timing_log_option_round_trips_and_keeps_the_hash();
  test_log_memory_to_tensorboard_round_trips_and_keeps_the_hash();
  test_attention_backend_round_trips_and_keeps_the_hash();
  test_untie_embeddings_key_round_trips_and_keeps_the_hash();
  if (failures) {
    fprintf(stderr, "test_job: %d failure(s)\n", failures);
    return 1;
  }
  printf("test_job: all passed\n");
  return 0;
}
