/* status.c — `mtnlgctl status`: where the job stands, from GET /v1/status.
 *
 * The human form is one line per aspect (job, generation, state, progress,
 * the step's numbers, throughput per device, checkpoint); -o json prints the
 * daemon's STATUS object as it came.
 */
#include <getopt.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "ctl.h"
#include "http.h"
#include "output.h"

const char ctl_status_help[] =
    "The job and where it stands, as the daemon at the endpoint sees it: job and\n"
    "layout, generation (and restarts after failures) and coordinator, state (and\n"
    "why, when failed or re-forming), step of steps, loss, learning rate, gradient\n"
    "norm, tokens/s, model TFLOP/s per device of the answering node (MFU when the\n"
    "daemon knows the peak; ask each node's endpoint for its own), the step time\n"
    "split into compute, pipeline bubble and communication (and, under\n"
    "train.timing_log_level, the last step's timers, min and max across ranks),\n"
    "the ETA, the last checkpoint, and a validation or test pass under way.\n"
    "\n"
    "Options:\n"
    "  --devices              also list the answering node's devices: rank, stage,\n"
    "                         replica, TFLOP/s, MFU (each node lists its own)\n"
    "  -o, --output FORMAT    table (default) or json (the daemon's /v1/status object)\n"
    "  -h, --help             show this help\n";

#define LABEL "  %-11s "

static void print_job(const json_t *st) {
  const json_t *job = json_object_get(st, "job");
  if (!json_is_object(job)) {
    printf("job (none yet: the cluster is %s)\n",
           ctl_jstr(st, "state") ? ctl_jstr(st, "state") : "forming");
    return;
  }
  char layout[128] = "", params[32] = "";
  double tp, pp, dp, p, dmin, dmax;
  if (ctl_jnum(job, "tp", &tp) && ctl_jnum(job, "pp", &pp) && ctl_jnum(job, "dp", &dp))
    snprintf(layout, sizeof layout, ": tp %.0f x pp %.0f x dp %.0f", tp, pp, dp);
  if (ctl_jnum(job, "dp_min", &dmin) && ctl_jnum(job, "dp_max", &dmax) && *layout) {
    char as[40] = ""; /* an operator's resize holds: the width the coordinator keeps */
    double resized;
    if (ctl_jnum(job, "dp_resized", &resized) && resized > 0)
      snprintf(as, sizeof as, ", resized to %.0f", resized);
    snprintf(layout + strlen(layout), sizeof layout - strlen(layout), " (dp %.0f..%.0f%s)", dmin,
             dmax, as);
  }
  if (ctl_jnum(job, "params", &p))
    snprintf(params, sizeof params, ", %.3g%s params",
             p >= 1e9   ? p / 1e9
             : p >= 1e6 ? p / 1e6
                        : p,
             p >= 1e9   ? " B"
             : p >= 1e6 ? " M"
                        : "");
  const char *name = ctl_jstr(job, "name"), *hash = ctl_jstr(job, "hash");
  printf("job %s%s%s%s%s%s\n", name ? name : "-", hash ? " (hash " : "", hash ? hash : "",
         hash ? ")" : "", layout, params);
  double gb, seq, mb;
  if (ctl_jnum(job, "global_batch", &gb) && ctl_jnum(job, "seq_len", &seq)) {
    printf(LABEL "%.0f sequences of %.0f tokens", "batch", gb, seq);
    if (ctl_jnum(job, "micro_batch", &mb)) printf(", micro-batch %.0f", mb);
    printf("\n");
  }
}

static void print_throughput(const json_t *st) {
  const json_t *devs = json_object_get(st, "devices");
  size_t n = 0, n_mfu = 0;
  double sum = 0, lo = INFINITY, hi = -INFINITY, mfu_sum = 0;
  for (size_t i = 0; i < json_array_size(devs); i++) {
    double t, m;
    if (!ctl_jnum(json_array_get(devs, i), "tflops", &t)) continue;
    n++, sum += t;
    lo = t < lo ? t : lo;
    hi = t > hi ? t : hi;
    if (ctl_jnum(json_array_get(devs, i), "mfu", &m)) n_mfu++, mfu_sum += m;
  }
  if (!n) {
    printf(LABEL "-\n", "TFLOP/s");
    return;
  }
  /* the answering node's devices only: the others' rates are theirs to report */
  const char *node = ctl_jstr(st, "node");
  char a[32], b[32];
  printf(LABEL "%s per device on %s", "TFLOP/s", ctl_fmt_rate(a, sizeof a, sum / (double)n),
         node ? node : "this node");
  if (n > 1 && hi > lo)
    printf(" (mean of %zu; min %s, max %s)", n, ctl_fmt_rate(a, sizeof a, lo),
           ctl_fmt_rate(b, sizeof b, hi));
  if (n_mfu) printf(", MFU %.1f%%", 100 * mfu_sum / (double)n_mfu);
  printf("\n");
}

/* A coordinator elected through etcd: which term, where its store is. */
static void print_election(json_t *e) {
  const char *term = ctl_jstr(e, "term"), *at = ctl_jstr(e, "coordinator_endpoint");
  double lease;
  if (!json_is_object(e) || !term || !at || !ctl_jnum(e, "lease_s", &lease)) return;
  printf(LABEL "through etcd: term %s, store at %s, lease %.0f s%s\n", "elected", term, at, lease,
         json_is_true(json_object_get(e, "elected_here")) ? " (this node)" : "");
  /* training goes on without it, but no coordinator can be elected */
  if (json_is_false(json_object_get(e, "etcd_answers")))
    printf(LABEL "does not answer: %s; training goes on, but no coordinator can be elected "
                 "until it does\n",
           "etcd", ctl_jstr(e, "etcd_error") ? ctl_jstr(e, "etcd_error") : "?");
}

/* On the daemon that hosts the rendezvous store: what it holds of its limit,
 * its connections and parked requests. */
static void print_store(json_t *store) {
  double keys, bytes, max, clients, waiters, refused, dropped;
  if (!json_is_object(store) || !ctl_jnum(store, "keys", &keys) ||
      !ctl_jnum(store, "bytes", &bytes) || !ctl_jnum(store, "max_bytes", &max) ||
      !ctl_jnum(store, "clients", &clients) || !ctl_jnum(store, "waiters", &waiters))
    return;
  char a[32], b[32];
  printf(LABEL "%.0f keys, %s of %s (%.1f%%); %.0f clients, %.0f waiting", "store", keys,
         ctl_fmt_bytes(a, sizeof a, bytes), ctl_fmt_bytes(b, sizeof b, max),
         max > 0 ? 100.0 * bytes / max : 0.0, clients, waiters);
  if (ctl_jnum(store, "refused_clients", &refused) && refused > 0)
    printf("; %.0f connections refused", refused);
  if (ctl_jnum(store, "dropped_clients", &dropped) && dropped > 0)
    printf("; %.0f closed for not reading their replies", dropped);
  printf("\n");
}

static void print_step_time(const json_t *st) {
  const json_t *t = json_object_get(st, "step_time");
  double total, compute, bubble, comm;
  if (!ctl_jnum(t, "total_ms", &total) || total <= 0) { /* 0: no step yet */
    printf(LABEL "-\n", "step time");
    return;
  }
  printf(LABEL "%.1f ms", "step time", total);
  int c = ctl_jnum(t, "compute_ms", &compute), b = ctl_jnum(t, "bubble_ms", &bubble),
      m = ctl_jnum(t, "comm_ms", &comm);
  if (c || b || m) {
    printf(":");
    if (c) printf(" compute %.1f%s", compute, b || m ? "," : "");
    if (b) printf(" bubble %.1f%s", bubble, m ? "," : "");
    if (m) printf(" comm %.1f", comm);
    printf(" ms");
  }
  printf("\n");
  /* train.timing_log_level: the last step's timers, Megatron's (min, max) */
  const json_t *timers = json_object_get(t, "timers");
  const char *name;
  const json_t *v;
  if (json_is_object(timers) && json_object_size(timers)) {
    printf(LABEL "(min, max) across ranks, ms\n", "timers");
    json_object_foreach((json_t *)timers, name, v) {
      printf("    %-28s (%.2f, %.2f)\n", name, json_number_value(json_array_get(v, 0)),
             json_number_value(json_array_get(v, 1)));
    }
  }
}

static void print_checkpoint(const json_t *st) {
  const json_t *ck = json_object_get(st, "last_checkpoint");
  char size[32], age[32];
  double bytes, time;
  const json_t *job = json_object_get(st, "job");
  if (!json_is_object(ck) && json_is_object(job) &&
      json_is_null(json_object_get(job, "checkpoint_dir"))) {
    printf(LABEL "none: the job has no checkpoint.dir\n", "checkpoint");
  } else if (!json_is_object(ck)) {
    printf(LABEL "none yet\n", "checkpoint");
  } else {
    printf(LABEL "step %s", "checkpoint", ctl_fmt_field(size, sizeof size, ck, "step", "%.0f"));
    if (ctl_jnum(ck, "bytes", &bytes)) printf(", %s", ctl_fmt_bytes(size, sizeof size, bytes));
    if (ctl_jnum(ck, "time", &time)) printf(", %s ago", ctl_fmt_age(age, sizeof age, time));
    if (ctl_jstr(ck, "path")) printf(": %s", ctl_jstr(ck, "path"));
    printf("\n");
  }
  /* while a save writes, its bytes are not reported (null): the step only;
   * when idle, the figures are the last save's */
  const json_t *pr = json_object_get(st, "checkpoint_progress");
  const char *state = ctl_jstr(pr, "state");
  double rate;
  char a[32];
  if (state && !strcmp(state, "writing"))
    printf(LABEL "step %s\n", "writing", ctl_fmt_field(a, sizeof a, pr, "step", "%.0f"));
  else if (state && !strcmp(state, "failed"))
    printf(LABEL "the save of step %s failed: %s\n", "last save",
           ctl_fmt_field(a, sizeof a, pr, "step", "%.0f"),
           ctl_jstr(pr, "error") ? ctl_jstr(pr, "error") : "(no reason given)");
  else if (ctl_jnum(pr, "bytes_per_s", &rate))
    printf(LABEL "%s/s (the last save)\n", "written at", ctl_fmt_bytes(a, sizeof a, rate));
}

static int print_devices(const json_t *st) {
  static const char *const headers[] = {"NODE",     "DEVICE",   ">RANK", ">STAGE",
                                        ">REPLICA", ">TFLOP/S", ">MFU"};
  ctl_table *t = ctl_table_new(7, headers);
  const json_t *devs = json_object_get(st, "devices");
  if (!t) goto oom;
  for (size_t i = 0; i < json_array_size(devs); i++) {
    const json_t *d = json_array_get(devs, i);
    char rank[24], stage[24], replica[24], tflops[24] = "-", mfu[24] = "-";
    double m;
    if (ctl_jnum(d, "mfu", &m)) snprintf(mfu, sizeof mfu, "%.1f%%", 100 * m);
    if (ctl_jnum(d, "tflops", &m)) ctl_fmt_rate(tflops, sizeof tflops, m);
    const char *row[] = {ctl_jstr(d, "node"),
                         ctl_jstr(d, "device"),
                         ctl_fmt_field(rank, sizeof rank, d, "rank", "%.0f"),
                         ctl_fmt_field(stage, sizeof stage, d, "stage", "%.0f"),
                         ctl_fmt_field(replica, sizeof replica, d, "replica", "%.0f"),
                         tflops,
                         mfu};
    if (ctl_table_add(t, row)) goto oom;
  }
  const char *node = ctl_jstr(st, "node");
  if (!ctl_table_rows(t))
    printf("\ndevices of %s: none training (the node is a spare, or no generation runs)\n",
           node ? node : "this node");
  else {
    printf("\ndevices of %s (the answering daemon; each node lists its own)\n",
           node ? node : "this node");
    ctl_table_print(t, stdout, 2);
  }
  ctl_table_free(t);
  return CTL_EXIT_OK;
oom:
  ctl_table_free(t);
  fprintf(stderr, "mtnlgctl status: out of memory\n");
  return CTL_EXIT_FAILURE;
}

/* Why the cluster last re-formed after a failure, where it resumed: the
 * status's reason says it only while the new generation forms. */
static void print_last_restart(const json_t *lr) {
  char gen[32], at[64], step[32];
  double t;
  if (!json_is_object(lr)) return;
  printf(LABEL "generation %s", "restarted",
         ctl_fmt_field(gen, sizeof gen, lr, "generation", "%.0f"));
  if (ctl_jnum(lr, "time", &t)) printf(" at %s", ctl_fmt_time(at, sizeof at, t));
  printf(": %s", ctl_jstr(lr, "reason") ? ctl_jstr(lr, "reason") : "(no reason given)");
  if (ctl_jnum(lr, "resumed_from_step", &t))
    printf("; resumed from step %s",
           ctl_fmt_field(step, sizeof step, lr, "resumed_from_step", "%.0f"));
  printf("\n");
}

static void print_status(const json_t *st) {
  char a[64], b[64];
  double v, steps = 0;
  print_job(st);

  const char *coord = ctl_jstr(st, "coordinator"), *node = ctl_jstr(st, "node"),
             *version = ctl_jstr(st, "version");
  printf(LABEL "%s", "generation", ctl_fmt_field(a, sizeof a, st, "generation", "%.0f"));
  if (ctl_jnum(st, "restarts", &v) && v > 0)
    printf(" (%.0f restart%s after failures)", v, v == 1 ? "" : "s");
  if (coord) printf(", coordinator %s", coord);
  if (node || version) {
    printf(" (answered by %s", node ? node : "-");
    if (version) printf(", mtnlgd %s", version);
    printf(")");
  }
  printf("\n");
  print_election(json_object_get(st, "election"));

  const char *state = ctl_jstr(st, "state"), *reason = ctl_jstr(st, "reason");
  printf(LABEL "%s%s%s\n", "state", state ? state : "-", reason ? ": " : "", reason ? reason : "");
  print_last_restart(json_object_get(st, "last_restart"));
  /* a validation or test pass under way: its step's line waits for it */
  char ev[160];
  if (ctl_fmt_evaluation(ev, sizeof ev, json_object_get(st, "evaluation")))
    printf(LABEL "%s\n", "evaluating", ev);

  printf(LABEL "%s", "step", ctl_fmt_field(a, sizeof a, st, "step", "%.0f"));
  if (ctl_jnum(json_object_get(st, "job"), "steps", &steps) && steps > 0) {
    printf(" / %.0f", steps);
    if (ctl_jnum(st, "step", &v)) printf(" (%.1f%%)", 100 * v / steps);
  }
  if (ctl_jnum(st, "consumed_tokens", &v)) printf(", %.0f tokens consumed", v);
  double full;
  if (ctl_jnum(st, "global_batch", &v) &&
      ctl_jnum(json_object_get(st, "job"), "global_batch", &full) && v < full)
    printf(", batch %.0f of %.0f (ramp-up)", v, full);
  if (ctl_jnum(st, "skipped_steps", &v) && v > 0) printf(", %.0f skipped (non-finite grads)", v);
  printf("\n");

  printf(LABEL "%s", "loss", ctl_fmt_field(a, sizeof a, st, "loss", "%.4f"));
  if (ctl_jnum(st, "val_loss", &v)) printf(" (validation %.4f)", v);
  if (ctl_jnum(st, "test_loss", &v)) printf(" (test %.4f)", v);
  printf("\n");
  printf(LABEL "%s\n", "lr", ctl_fmt_field(a, sizeof a, st, "lr", "%.3e"));
  printf(LABEL "%s", "grad norm", ctl_fmt_field(a, sizeof a, st, "grad_norm", "%.3f"));
  if (ctl_jnum(st, "loss_scale", &v)) printf(" (fp16 loss scale %g)", v);
  printf("\n");
  if (ctl_jnum(st, "params_norm", &v)) printf(LABEL "%.3f\n", "params norm", v);
  if (ctl_jnum(st, "num_zeros", &v)) printf(LABEL "%.0f\n", "num zeros", v);
  printf(LABEL "%s\n", "tokens/s", ctl_fmt_field(a, sizeof a, st, "tokens_per_s", "%.0f"));
  print_throughput(st);
  print_step_time(st);
  /* and, past a minute, when on this machine's clock */
  if (ctl_jnum(st, "eta_s", &v) && v >= 60)
    printf(LABEL "%s (about %s)\n", "ETA", ctl_fmt_duration(b, sizeof b, v),
           ctl_fmt_time(a, sizeof a, (double)time(NULL) + v));
  else
    printf(LABEL "%s\n", "ETA", ctl_jnum(st, "eta_s", &v) ? ctl_fmt_duration(b, sizeof b, v) : "-");
  if (ctl_jnum(st, "exit_at", &v)) {
    double left = v - (double)time(NULL);
    printf(LABEL "%s (%s%s, train.exit_duration_mins)\n", "exits at", ctl_fmt_time(a, sizeof a, v),
           left > 0 ? "in " : "passed", left > 0 ? ctl_fmt_duration(b, sizeof b, left) : "");
  }
  if (ctl_jnum(st, "exit_step", &v))
    printf(LABEL "after step %.0f (train.exit_interval)\n", "exits", v);
  print_checkpoint(st);
  if (ctl_jnum(st, "operations_pending", &v) && v > 0)
    printf(LABEL "%.0f pending (mtnlgctl ops)\n", "operations", v);
  print_store(json_object_get(st, "store"));
}

int ctl_verb_status(const ctl_verb *verb, int argc, char **argv) {
  enum { OPT_DEVICES = 256 };
  static const struct option opts[] = {
      {"devices", no_argument, NULL, OPT_DEVICES},
      {"output", required_argument, NULL, 'o'},
      {0},
  };
  int ret = CTL_EXIT_USAGE, devices = 0, c;
  json_t *st = NULL;
  while ((c = getopt_long(argc, argv, "o:", opts, NULL)) != -1) {
    switch (c) {
    case OPT_DEVICES: devices = 1; break;
    case 'o':
      if (ctl_parse_output(optarg, &ctl.output)) goto cleanup;
      break;
    default: fprintf(stderr, "See 'mtnlgctl status --help'.\n"); goto cleanup;
    }
  }
  if (ctl_check_args(verb, argc - optind)) goto cleanup;

  if ((ret = ctl_http_get("/v1/status", &st))) goto cleanup;
  if (ctl.output == CTL_OUTPUT_JSON) {
    ret = ctl_print_json(st);
    goto cleanup;
  }
  print_status(st);
  ret = devices ? print_devices(st) : CTL_EXIT_OK;
cleanup:
  json_decref(st);
  return ret;
}
