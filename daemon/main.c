/* main.c — mtnlgd. Today: `mtnlgd --standalone JOB.json`, training on this
 * machine alone without a rendezvous (like `torchrun --standalone`). The node
 * daemon (node config, rendezvous, control plane) grows around this. */
#include <getopt.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "blas.h"
#include "device.h"
#include "err.h"
#include "job.h"
#include "log.h"
#include "mt_config.h"
#include "safetensors.h"
#include "threads.h"
#include "train.h"

#define MAX_OVERRIDES 64

static volatile sig_atomic_t stop_requested;

static void on_signal(int sig) {
  if (stop_requested) { /* second signal: stop now */
    signal(sig, SIG_DFL);
    raise(sig);
  }
  stop_requested = 1;
}

static void usage(FILE *out) {
  fprintf(out,
          "usage: mtnlgd --standalone JOB.json [options]\n"
          "\n"
          "Trains the job on this machine alone, without a rendezvous.\n"
          "\n"
          "  --standalone JOB.json     job spec (model, parallel, train, data, checkpoint)\n"
          "  --set SECTION.KEY=VALUE   override a job field (repeatable), e.g. train.steps=20\n"
          "  --devices SPEC            device to train on (default cpu:0)\n"
          "  --export PATH             write the trained weights as GPT-2 safetensors\n"
          "  --presets DIR             extra directory of model presets (<name>.json)\n"
          "  --log-format text|json    per-step lines for people or for programs (stdout)\n"
          "  --log-level LEVEL         error, warn, info (default) or debug (stderr)\n"
          "  --version, --help\n");
}

static void print_step(const mt_step_stats *st, int64_t steps, int json) {
  if (json) {
    printf("{\"step\":%lld,\"steps\":%lld,\"consumed_tokens\":%lld,\"loss\":%.9g,\"lr\":%.9g,"
           "\"grad_norm\":%.9g,\"step_ms\":%.3f,\"tokens_per_s\":%.3f,\"tflops\":%.6f,"
           "\"skipped\":%s",
           (long long)st->step, (long long)steps, (long long)st->consumed_tokens, st->loss, st->lr,
           st->grad_norm, st->step_ms, st->tokens_per_s, st->tflops,
           st->skipped ? "true" : "false");
    if (st->has_val) printf(",\"val_loss\":%.9g", st->val_loss);
    printf("}\n");
  } else {
    printf("step %6lld/%lld | loss %.6f | lr %.3e | grad norm %.3f | %8.1f ms | %9.1f tok/s | "
           "%.3f TFLOP/s%s\n",
           (long long)st->step, (long long)steps, st->loss, st->lr, st->grad_norm, st->step_ms,
           st->tokens_per_s, st->tflops, st->skipped ? " | skipped" : "");
    if (st->has_val)
      printf("step %6lld/%lld | validation loss %.6f | perplexity %.3f\n", (long long)st->step,
             (long long)steps, st->val_loss, exp(st->val_loss));
  }
  fflush(stdout);
}

int main(int argc, char **argv) {
  const char *job_path = NULL, *devices = "cpu:0", *export_path = NULL, *extra_presets = NULL;
  const char *overrides[MAX_OVERRIDES + 1] = {0};
  int n_overrides = 0, json = 0;
  enum { OPT_SET = 256, OPT_DEVICES, OPT_EXPORT, OPT_PRESETS, OPT_LOG_FORMAT, OPT_LOG_LEVEL,
         OPT_VERSION };
  static const struct option opts[] = {
      {"standalone", required_argument, NULL, 's'},
      {"set", required_argument, NULL, OPT_SET},
      {"devices", required_argument, NULL, OPT_DEVICES},
      {"export", required_argument, NULL, OPT_EXPORT},
      {"presets", required_argument, NULL, OPT_PRESETS},
      {"log-format", required_argument, NULL, OPT_LOG_FORMAT},
      {"log-level", required_argument, NULL, OPT_LOG_LEVEL},
      {"version", no_argument, NULL, OPT_VERSION},
      {"help", no_argument, NULL, 'h'},
      {0},
  };
  int c;
  while ((c = getopt_long(argc, argv, "s:h", opts, NULL)) != -1) {
    switch (c) {
    case 's': job_path = optarg; break;
    case OPT_SET:
      if (n_overrides == MAX_OVERRIDES) {
        fprintf(stderr, "mtnlgd: more than %d --set options\n", MAX_OVERRIDES);
        return 2;
      }
      overrides[n_overrides++] = optarg;
      break;
    case OPT_DEVICES: devices = optarg; break;
    case OPT_EXPORT: export_path = optarg; break;
    case OPT_PRESETS: extra_presets = optarg; break;
    case OPT_LOG_FORMAT:
      if (strcmp(optarg, "text") && strcmp(optarg, "json")) {
        fprintf(stderr, "mtnlgd: --log-format must be text or json, not \"%s\"\n", optarg);
        return 2;
      }
      json = !strcmp(optarg, "json");
      break;
    case OPT_LOG_LEVEL: {
      int level = mt_log_parse_level(optarg);
      if (level < 0) {
        fprintf(stderr, "mtnlgd: --log-level must be error, warn, info or debug\n");
        return 2;
      }
      mt_log_set_level(level);
      break;
    }
    case OPT_VERSION: printf("mtnlgd %s\n", MT_VERSION); return 0;
    case 'h': usage(stdout); return 0;
    default: usage(stderr); return 2;
    }
  }
  if (optind < argc) {
    fprintf(stderr, "mtnlgd: unexpected argument \"%s\"\n", argv[optind]);
    usage(stderr);
    return 2;
  }
  if (!job_path) {
    fprintf(stderr, "mtnlgd: only --standalone JOB.json is available in this version; the node "
                    "daemon (--config, rendezvous) comes with the cluster issue\n");
    usage(stderr);
    return 2;
  }

  const char *preset_dirs[4] = {0};
  int np = 0;
  if (extra_presets) preset_dirs[np++] = extra_presets;
  preset_dirs[np++] = MT_SOURCE_DIR "/etc/models";
  preset_dirs[np++] = MT_DATA_DIR "/models";

  int ret = 1;
  mt_job job;
  mt_device dev = {0};
  mt_trainer tr = {0};
  int have_dev = 0, have_tr = 0;
  if (mt_job_load(&job, job_path, preset_dirs, overrides)) {
    fprintf(stderr, "mtnlgd: job %s cannot run:\n%s\n", job_path, mt_errmsg());
    return 2;
  }
  if (mt_device_open(&dev, devices)) {
    mt_log_error("%s", mt_errmsg());
    goto cleanup;
  }
  have_dev = 1;
  mt_log_info("mtnlgd %s: job %s (%s), device %s, %d threads (OpenMP wait %s), OpenBLAS %s "
              "(%s) from %s",
              MT_VERSION, job.name, job.hash, dev.name, dev.threads, mt_omp_wait_policy(),
              mt_blas_corename(), mt_blas_choice(), mt_blas_library());
  if (mt_trainer_create(&tr, &job, &dev)) {
    mt_log_error("%s", mt_errmsg());
    goto cleanup;
  }
  have_tr = 1;
  mt_log_info("model: %d layers, hidden %d, %d heads, vocab %d (padded %d), seq %d: %.2fM "
              "parameters; batch %d = %d micro-batches of %d; %.3f GFLOP per step",
              job.model.n_layer, job.model.n_embd, job.model.n_head, job.model.vocab_size,
              job.model.padded_vocab, job.model.seq_len, tr.model.num_params / 1e6,
              job.train.global_batch, tr.micro_batches, job.parallel.micro_batch,
              tr.flops_per_step / 1e9);

  signal(SIGINT, on_signal);
  signal(SIGTERM, on_signal);
  int log_every = job.train.log_interval > 0 ? job.train.log_interval : 1;
  while (tr.step < job.train.steps && !stop_requested) {
    mt_step_stats st;
    if (mt_trainer_step(&tr, &st)) {
      mt_log_error("%s", mt_errmsg());
      goto cleanup;
    }
    if (job.eval.interval > 0 &&
        (st.step % job.eval.interval == 0 || st.step == job.train.steps)) {
      if (mt_trainer_eval(&tr, &st.val_loss)) {
        mt_log_error("%s", mt_errmsg());
        goto cleanup;
      }
      st.has_val = 1;
    }
    if (st.step % log_every == 0 || st.step == job.train.steps || st.step == 1 || st.has_val)
      print_step(&st, job.train.steps, json);
    if (!isfinite(st.loss)) {
      mt_log_error("step %lld: loss is %g; stopping", (long long)st.step, st.loss);
      goto cleanup;
    }
  }
  char consumed[1024];
  mt_data_source_describe(tr.data, (uint64_t)tr.step * (uint64_t)job.train.global_batch, consumed,
                          sizeof consumed);
  mt_log_info("data consumed: %s", consumed);
  if (stop_requested)
    mt_log_info("stopped at step %lld of %lld on request", (long long)tr.step,
                (long long)job.train.steps);

  if (!export_path && job.checkpoint.export_path[0]) export_path = job.checkpoint.export_path;
  if (export_path) {
    if (mt_gpt_save_safetensors(&tr.model, export_path)) {
      mt_log_error("export: %s", mt_errmsg());
      goto cleanup;
    }
    mt_log_info("exported weights to %s", export_path);
  }
  ret = 0;
cleanup:
  if (have_tr) mt_trainer_destroy(&tr);
  if (have_dev) mt_device_close(&dev);
  return ret;
}
