/* plan.c — `mtnlgctl plan JOB.json`: what a job needs per device, offline.
 *
 * Loads the job as the coordinator would (presets, --set overrides, every
 * check), asks the engine's plan (daemon/engine/plan.h) for the given devices and prints
 * it as a table or JSON. A job whose worst stage does not fit prints the plan
 * and the refusal, and exits 1.
 */
#include <getopt.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctl.h"
#include "err.h"
#include "job.h"
#include "mt_config.h"
#include "plan.h"

/* The defaults describe MT-NLG's hardware: A100 80 GB at the 126 TFLOP/s per
 * GPU the paper measured (an achieved rate, so efficiency 1). */
#define DEFAULT_MEMORY_GB 80.0
#define DEFAULT_TFLOPS 126.0

const char ctl_plan_help[] =
    "Per-device memory of every pipeline stage (weights, gradients, ZeRO-1 optimizer\n"
    "slice, activations at the 1F1B peak, logits, comm buffers), model FLOPs per step\n"
    "(Narayanan et al. eq. 3), the pipeline bubble and a predicted step time of a job,\n"
    "without running it. Memory is in GB = 10^9 bytes (MB = 10^6 for small jobs).\n"
    "A job whose worst stage does not fit 90% of the device memory is printed with\n"
    "the refusal, and mtnlgctl exits 1.\n"
    "\n"
    "Options:\n"
    "  --devices N            devices in all; dp = N / (tp * pp)\n"
    "                         (default tp * pp * parallel.dp_min)\n"
    "  --device-memory GB     memory per device, GB = 10^9 bytes (default 80)\n"
    "  --device-tflops F      dense TFLOP/s per device (default 126, the rate MT-NLG\n"
    "                         achieved per A100; the step time is FLOPs / rate)\n"
    "  --efficiency E         fraction of --device-tflops reached, in (0, 1] (default 1)\n"
    "  --set SECTION.KEY=VALUE\n"
    "                         override a job field before it is checked (repeatable)\n"
    "  --presets DIR          extra directory of model presets (<name>.json)\n"
    "  --stages               list every pipeline stage (default: first, worst, last)\n"
    "  -o, --output FORMAT    table (default) or json\n"
    "  -h, --help             show this help\n";

/* Memory in the table's unit: GB, or MB when the largest stage is under 1 GB. */
typedef struct unit {
  const char *name;
  double bytes;
} unit;

static void fmt_count(char *buf, size_t cap, double n) {
  if (n >= 1e9)
    snprintf(buf, cap, "%.3f B", n / 1e9);
  else if (n >= 1e6)
    snprintf(buf, cap, "%.3f M", n / 1e6);
  else if (n >= 1e3)
    snprintf(buf, cap, "%.3f K", n / 1e3);
  else
    snprintf(buf, cap, "%.0f", n);
}

static void print_stage_row(const mt_plan_stage *st, const mt_plan *plan, unit u) {
  char params[32], layers[32];
  fmt_count(params, sizeof params, (double)st->params);
  if (plan->virtual_stages > 1)
    snprintf(layers, sizeof layers, "%d (v %d)", st->n_layers, plan->virtual_stages);
  else if (st->n_layers == 1)
    snprintf(layers, sizeof layers, "%d", st->first_layer);
  else
    snprintf(layers, sizeof layers, "%d-%d", st->first_layer, st->first_layer + st->n_layers - 1);
  char name[32];
  snprintf(name, sizeof name, "%d%s%s", st->stage, st->has_embedding ? " emb" : "",
           st->has_head ? " head" : "");
  printf("  %-11s %-9s %8d %11s %8.2f %8.2f %9.2f %11.2f %7.2f %6.2f %8.2f%s\n", name, layers,
         st->inflight, params, st->weight_bytes / u.bytes, st->grad_bytes / u.bytes,
         st->optimizer_bytes / u.bytes, st->activation_bytes / u.bytes, st->logits_bytes / u.bytes,
         st->comm_bytes / u.bytes, st->total_bytes / u.bytes,
         st->stage == plan->worst.stage ? "  <- worst" : "");
}

/* The executed FLOPs' formula (mt_plan_flops) in the form its case takes. */
static const char *flops_formula(const mt_plan *plan) {
  return !plan->recompute         ? "72 B s l h^2 (1 + s/6h + Vp/12lh)"
         : plan->recomputed < 1.0 ? "72 (1 + r/3) B s l h^2 (1 + s/6h) + 6 B s h Vp"
                                  : "96 B s l h^2 (1 + s/6h + Vp/16lh)";
}

static void print_table(const mt_job *job, const mt_plan *plan, int all_stages) {
  const mt_model_spec *m = &job->model;
  unit u = plan->worst.total_bytes >= 1e9 ? (unit){"GB", 1e9} : (unit){"MB", 1e6};
  char params[32];
  fmt_count(params, sizeof params, (double)plan->model_params);
  const mt_plan_device *d = &plan->dev;

  printf("job %s (hash %s)\n", job->name, job->hash);
  printf("  model      %d layers, hidden %d, %d heads, seq %d, vocab %d padded to %d\n", m->n_layer,
         m->n_embd, m->n_head, m->seq_len, m->vocab_size, plan->padded_vocab);
  printf("             %s parameters (%s)\n", params,
         m->untie_embeddings ? "untied: embedding and output layer"
                             : "tied embedding counted once");
  printf("  layout     tp %d x pp %d x dp %d = %d devices\n", plan->tp, plan->pp, plan->dp,
         plan->devices);
  printf("  batch      %d sequences = micro-batch %d x %d micro-batches x dp %d; %" PRId64
         " tokens per step\n",
         job->train.global_batch, plan->micro_batch, plan->micro_batches, plan->dp,
         plan->tokens_per_step);
  const mt_train_spec *t = &job->train;
  int64_t run_samples = mt_job_samples_of(job, 0, t->steps);
  if (t->length_key[0])
    printf("  run        %" PRId64 " steps (train.%s = %" PRId64 " in whole batches): %" PRId64
           " samples, %" PRId64 " tokens\n",
           t->steps, t->length_key, t->length_given, run_samples, run_samples * m->seq_len);
  else
    printf("  run        %" PRId64 " steps: %" PRId64 " samples, %" PRId64 " tokens\n", t->steps,
           run_samples, run_samples * m->seq_len);
  printf("  precision  %s: %s\n", job->train.precision,
         plan->mixed ? "16-bit weights and activations; fp32 grads, masters and Adam"
                     : "fp32 weights, activations, grads and Adam");
  if (plan->recompute && plan->recompute_layers > 0)
    printf("  recompute  on for the first %d layer(s) of each stage (%.0f%% of the layers): they "
           "keep only their input, the others as with it off\n",
           plan->recompute_layers, 100.0 * plan->recomputed);
  else
    printf("  recompute  %s\n", plan->recompute ? "on: each layer keeps only its input"
                                                : "off: every layer keeps its input, Q/K/V, the "
                                                  "attention output, the stream after attention "
                                                  "and the GeLU input; softmax, LayerNorm and "
                                                  "GeLU outputs are recomputed");
  if (plan->tp > 1)
    printf("  seq-par    %s\n", plan->sequence_parallel
                                    ? "on: LayerNorms, dropout and the stream split over tp by rows"
                                    : "off: every tp rank holds the whole stream");
  printf("  device     %.1f GB (%.1f GB usable, %.0f%%), %.1f TFLOP/s at efficiency %.2f\n",
         d->memory_bytes / 1e9, plan->usable_bytes / 1e9, 100 * d->usable_fraction, d->tflops,
         d->efficiency);

  printf("\nmemory per device in %s (1 %s = 10^%d bytes)\n", u.name, u.name,
         u.bytes == 1e9 ? 9 : 6);
  printf("  %-11s %-9s %8s %11s %8s %8s %9s %11s %7s %6s %8s\n", "stage", "layers", "inflight",
         "params", "weights", "grads", "optimizer", "activations", "logits", "comm", "total");
  for (int s = 0; s < plan->pp; s++) {
    if (!all_stages && s != 0 && s != plan->pp - 1 && s != plan->worst.stage) continue;
    mt_plan_stage st;
    mt_plan_stage_of(job, plan, s, &st);
    print_stage_row(&st, plan, u);
  }
  printf("  worst: stage %d needs %.2f of %.2f %s usable: %s\n", plan->worst.stage,
         plan->worst.total_bytes / u.bytes, plan->usable_bytes / u.bytes, u.name,
         plan->fits ? "fits" : "DOES NOT FIT");

  printf("\ncompute per step\n");
  printf("  model FLOPs     %.4g  (eq. 3 without recomputation: what MFU counts)\n",
         plan->model_flops);
  printf("  executed FLOPs  %.4g  (%s%s)\n", plan->executed_flops,
         !plan->recompute         ? "no recomputation, the same as the model FLOPs: "
         : plan->recomputed < 1.0 ? "eq. 3 with a share r of the layers recomputed, "
                                  : "eq. 3 with recomputation, ",
         flops_formula(plan));
  if (plan->virtual_stages > 1)
    printf("  bubble          %.1f%%  ((p - 1) / (v m + p - 1) = %d / %d, interleaved over %d "
           "virtual stages)\n",
           100 * plan->bubble_fraction, plan->pp - 1,
           plan->virtual_stages * plan->micro_batches + plan->pp - 1, plan->virtual_stages);
  else
    printf("  bubble          %.1f%%  ((p - 1) / (m + p - 1) = %d / %d)\n",
           100 * plan->bubble_fraction, plan->pp - 1, plan->micro_batches + plan->pp - 1);
  printf("  step time       %.4g s  (executed FLOPs / (%d x %.1f TFLOP/s x %.2f))\n", plan->step_s,
         plan->devices, d->tflops, d->efficiency);
  printf("  with bubble     %.4g s  (if %.1f TFLOP/s is the rate outside the bubble)\n",
         plan->step_with_bubble_s, d->tflops);
  printf("  tokens/s        %.0f\n", plan->tokens_per_s);
  printf("  model TFLOP/s   %.1f per device\n", plan->model_tflops_per_device);
}

static json_t *stage_json(const mt_plan_stage *st) {
  return json_pack(
      "{s:i, s:i, s:i, s:b, s:b, s:I, s:I, s:i, s:I, s:I, s:I, s:I, s:I, s:I, s:I}", "stage",
      st->stage, "first_layer", st->first_layer, "layers", st->n_layers, "embedding",
      st->has_embedding, "head", st->has_head, "params", (json_int_t)st->params, "optimizer_params",
      (json_int_t)st->optimizer_params, "inflight_micro_batches", st->inflight, "weights_bytes",
      (json_int_t)st->weight_bytes, "grads_bytes", (json_int_t)st->grad_bytes, "optimizer_bytes",
      (json_int_t)st->optimizer_bytes, "activations_bytes", (json_int_t)st->activation_bytes,
      "logits_bytes", (json_int_t)st->logits_bytes, "comm_bytes", (json_int_t)st->comm_bytes,
      "total_bytes", (json_int_t)st->total_bytes);
}

static int print_json(const mt_job *job, const mt_plan *plan, const char *refusal) {
  const mt_model_spec *m = &job->model;
  json_t *stages = json_array();
  for (int s = 0; stages && s < plan->pp; s++) {
    mt_plan_stage st;
    mt_plan_stage_of(job, plan, s, &st);
    json_array_append_new(stages, stage_json(&st));
  }
  json_t *root = json_pack(
      "{s:s, s:s,"
      " s:{s:i, s:i, s:i, s:i, s:i, s:i, s:I},"
      " s:{s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:b, s:i, s:f, s:b, s:s},"
      " s:{s:f, s:f, s:f, s:f},"
      " s:{s:i, s:o, s:b},"
      " s:{s:f, s:f, s:s},"
      " s:f, s:f, s:f, s:I, s:f, s:f}",
      "job", job->name, "hash", job->hash,                                    /* */
      "model", "layers", m->n_layer, "hidden", m->n_embd, "heads", m->n_head, /* */
      "seq_len", m->seq_len, "vocab", m->vocab_size, "padded_vocab", plan->padded_vocab, "params",
      (json_int_t)plan->model_params, /* */
      "layout", "tp", plan->tp, "pp", plan->pp, "dp", plan->dp, "devices", plan->devices,
      "global_batch", job->train.global_batch, "micro_batch", plan->micro_batch, "micro_batches",
      plan->micro_batches, "recompute", plan->recompute, "recompute_layers", plan->recompute_layers,
      "recomputed_share", plan->recomputed, "sequence_parallel", plan->sequence_parallel, /* */
      "precision", job->train.precision,                                                  /* */
      "device", "memory_bytes", plan->dev.memory_bytes, "usable_bytes", plan->usable_bytes,
      "tflops", plan->dev.tflops, "efficiency", plan->dev.efficiency, /* */
      "memory", "worst_stage", plan->worst.stage, "stages", stages, "fits", plan->fits, "flops",
      "model_per_step", plan->model_flops, "executed_per_step", plan->executed_flops, "formula",
      flops_formula(plan), "bubble_fraction", plan->bubble_fraction, "step_time_s", plan->step_s,
      "step_time_with_bubble_s", plan->step_with_bubble_s, "tokens_per_step",
      (json_int_t)plan->tokens_per_step, "tokens_per_s", plan->tokens_per_s,
      "model_tflops_per_device", plan->model_tflops_per_device);
  if (!root) {
    fprintf(stderr, "mtnlgctl plan: cannot build the JSON output\n");
    return CTL_EXIT_FAILURE;
  }
  json_object_set_new(root, "refusal", refusal ? json_string(refusal) : json_null());
  /* the run's length as resolved, and as the job gave it */
  const mt_train_spec *t = &job->train;
  int64_t run_samples = mt_job_samples_of(job, 0, t->steps);
  json_object_set_new(root, "run",
                      json_pack("{s:I, s:I, s:I, s:s, s:I}", "steps", (json_int_t)t->steps,
                                "samples", (json_int_t)run_samples, "tokens",
                                (json_int_t)(run_samples * m->seq_len), "given_as",
                                t->length_key[0] ? t->length_key : "steps", "given",
                                (json_int_t)(t->length_key[0] ? t->length_given : t->steps)));
  json_object_set_new(json_object_get(root, "layout"), "virtual_stages",
                      json_integer(plan->virtual_stages));
  json_object_set_new(json_object_get(root, "model"), "untie_embeddings",
                      json_boolean(m->untie_embeddings));
  int rc = json_dumpf(root, stdout, JSON_INDENT(2) | JSON_REAL_PRECISION(10));
  json_decref(root);
  if (rc) {
    fprintf(stderr, "mtnlgctl plan: writing the JSON output failed\n");
    return CTL_EXIT_FAILURE;
  }
  putchar('\n');
  return CTL_EXIT_OK;
}

int ctl_verb_plan(const ctl_verb *verb, int argc, char **argv) {
  enum {
    OPT_DEVICES = 256,
    OPT_MEMORY,
    OPT_TFLOPS,
    OPT_EFFICIENCY,
    OPT_SET,
    OPT_PRESETS,
    OPT_STAGES
  };
  static const struct option opts[] = {
      {"devices", required_argument, NULL, OPT_DEVICES},
      {"device-memory", required_argument, NULL, OPT_MEMORY},
      {"device-tflops", required_argument, NULL, OPT_TFLOPS},
      {"efficiency", required_argument, NULL, OPT_EFFICIENCY},
      {"set", required_argument, NULL, OPT_SET},
      {"presets", required_argument, NULL, OPT_PRESETS},
      {"stages", no_argument, NULL, OPT_STAGES},
      {"output", required_argument, NULL, 'o'},
      {0},
  };
  int ret = CTL_EXIT_USAGE, all_stages = 0, n_ov = 0, c;
  const char *extra_presets = NULL;
  /* at most one override per argument, NULL-terminated */
  const char **overrides = calloc((size_t)argc + 1, sizeof *overrides);
  double v = 0, memory_gb = DEFAULT_MEMORY_GB;
  mt_plan_device dev = {.tflops = DEFAULT_TFLOPS, .efficiency = 1.0};
  if (!overrides) {
    fprintf(stderr, "mtnlgctl plan: out of memory\n");
    return CTL_EXIT_FAILURE;
  }
  while ((c = getopt_long(argc, argv, "o:", opts, NULL)) != -1) {
    switch (c) {
    case OPT_DEVICES:
      if (ctl_parse_positive(verb, "--devices", optarg, 1, &v)) goto cleanup;
      dev.devices = (int)v;
      break;
    case OPT_MEMORY:
      if (ctl_parse_positive(verb, "--device-memory", optarg, 0, &memory_gb)) goto cleanup;
      break;
    case OPT_TFLOPS:
      if (ctl_parse_positive(verb, "--device-tflops", optarg, 0, &dev.tflops)) goto cleanup;
      break;
    case OPT_EFFICIENCY:
      if (ctl_parse_positive(verb, "--efficiency", optarg, 0, &dev.efficiency)) goto cleanup;
      if (dev.efficiency > 1) {
        ctl_usage_error(verb, "--efficiency: %s is above 1", optarg);
        goto cleanup;
      }
      break;
    case OPT_SET:
      if (!strchr(optarg, '=') || optarg[0] == '=') {
        ctl_usage_error(verb, "--set: \"%s\" is not SECTION.KEY=VALUE", optarg);
        goto cleanup;
      }
      overrides[n_ov++] = optarg;
      break;
    case OPT_PRESETS: extra_presets = optarg; break;
    case OPT_STAGES: all_stages = 1; break;
    case 'o':
      if (ctl_parse_output(optarg, &ctl.output)) goto cleanup;
      break;
    default: fprintf(stderr, "See 'mtnlgctl plan --help'.\n"); goto cleanup;
    }
  }
  if (ctl_check_args(verb, argc - optind)) goto cleanup;
  dev.memory_bytes = memory_gb * 1e9;

  ret = CTL_EXIT_FAILURE;
  const char *job_path = argv[optind];
  const char *preset_dirs[MT_PRESET_DIRS_MAX];
  mt_job_preset_dirs(extra_presets, preset_dirs);
  mt_job job;
  if (mt_job_load_for_plan(&job, job_path, preset_dirs, overrides)) {
    fprintf(stderr, "mtnlgctl plan: cannot plan %s:\n%s\n", job_path, mt_errmsg());
    goto cleanup;
  }
  /* what the daemons will warn of, on stderr: stdout stays the plan */
  char unused[MT_JOB_UNUSED_MAX][256];
  for (int i = 0, k = mt_job_unused(&job, unused); i < k; i++)
    fprintf(stderr, "mtnlgctl plan: warning: %s\n", unused[i]);

  mt_plan plan;
  int rc = mt_plan_compute(&job, &dev, &plan);
  if (!plan.computed) {
    fprintf(stderr, "mtnlgctl %s\n", mt_errmsg()); /* "plan: ..." */
    goto cleanup;
  }
  /* the refusal outlives the printing, which may set other messages */
  char refusal[1024] = "";
  if (rc) snprintf(refusal, sizeof refusal, "%s", mt_errmsg());
  if (ctl.output == CTL_OUTPUT_JSON) {
    if (print_json(&job, &plan, rc ? refusal : NULL)) goto cleanup;
  } else {
    print_table(&job, &plan, all_stages);
  }
  fflush(stdout);
  if (rc) {
    fprintf(stderr, "mtnlgctl: %s\n", refusal);
    goto cleanup;
  }
  ret = CTL_EXIT_OK;
cleanup:
  free(overrides);
  return ret;
}
