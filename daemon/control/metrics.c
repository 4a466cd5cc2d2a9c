/* metrics.c — the STATUS object as Prometheus text (exposition format 0.0.4).
 *
 * Names carry the mtnlg_ prefix and base units (seconds, bytes, ratios,
 * FLOP/s); counters end in _total; every family has HELP and TYPE and its
 * samples stay together. A null or missing value is left out, never
 * rendered as 0: "unknown" and "zero" differ for an alert.
 */
#include "control.h"
#include "control_priv.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A growing text buffer; oom sticks once an allocation fails. */
typedef struct sbuf {
  char *p;
  size_t len, cap;
  int oom;
} sbuf;

static void sb_put(sbuf *b, const char *s, size_t n) {
  if (b->oom) return;
  if (b->len + n + 1 > b->cap) {
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + n + 1) cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) {
      b->oom = 1;
      return;
    }
    b->p = p;
    b->cap = cap;
  }
  memcpy(b->p + b->len, s, n);
  b->len += n;
  b->p[b->len] = '\0';
}

static void sb_str(sbuf *b, const char *s) { sb_put(b, s, strlen(s)); }

static void sb_printf(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_printf(sbuf *b, const char *fmt, ...) {
  char tmp[512];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
  va_end(ap);
  if (n < 0) return;
  if ((size_t)n < sizeof tmp) {
    sb_put(b, tmp, (size_t)n);
    return;
  }
  char *big = malloc((size_t)n + 1);
  if (!big) {
    b->oom = 1;
    return;
  }
  va_start(ap, fmt);
  vsnprintf(big, (size_t)n + 1, fmt, ap);
  va_end(ap);
  sb_put(b, big, (size_t)n);
  free(big);
}

/* One metric family: HELP and TYPE are written before its first sample only,
 * so a family whose every value is null leaves no trace. */
typedef struct family {
  const char *name, *type, *help;
  int started;
} family;

/* A sample's labels, already rendered: `a="x",b="y"`. */
typedef struct labels {
  char text[4096];
  size_t len;
} labels;

#define MAX_LABEL_BYTES 256

/* Appends name="value" with the exposition format's escapes (\\, \", \n).
 * A value longer than MAX_LABEL_BYTES is cut at a UTF-8 character boundary. */
static void label(labels *l, const char *name, const char *value) {
  size_t vn = strlen(value);
  if (vn > MAX_LABEL_BYTES) {
    vn = MAX_LABEL_BYTES;
    while (vn > 0 && ((unsigned char)value[vn] & 0xC0) == 0x80) vn--;
  }
  char buf[2 * MAX_LABEL_BYTES + 1];
  size_t n = 0;
  for (size_t i = 0; i < vn; i++) {
    char ch = value[i];
    if (ch == '\\' || ch == '"')
      buf[n++] = '\\', buf[n++] = ch;
    else if (ch == '\n')
      buf[n++] = '\\', buf[n++] = 'n';
    else
      buf[n++] = ch;
  }
  buf[n] = '\0';
  int w = snprintf(l->text + l->len, sizeof l->text - l->len, "%s%s=\"%s\"", l->len ? "," : "",
                   name, buf);
  if (w > 0 && (size_t)w < sizeof l->text - l->len)
    l->len += (size_t)w;
  else
    l->text[l->len] = '\0'; /* never with our few labels; drop rather than cut */
}

/* A label from a JSON string or integer; absent or other types give "". */
static void label_json(labels *l, const char *name, json_t *v) {
  char num[32];
  if (json_is_string(v))
    label(l, name, json_string_value(v));
  else if (json_is_integer(v)) {
    snprintf(num, sizeof num, "%lld", (long long)json_integer_value(v));
    label(l, name, num);
  } else
    label(l, name, "");
}

/* Integers exactly, other values to 15 significant digits (plenty for a
 * gauge, and 4.1 ms reads 0.0041 s, not 0.0040999999999999995); NaN and
 * infinities as Prometheus spells them. */
static void format_value(char *out, size_t n, double v) {
  if (isnan(v))
    snprintf(out, n, "NaN");
  else if (isinf(v))
    snprintf(out, n, v > 0 ? "+Inf" : "-Inf");
  else if (v == floor(v) && fabs(v) < 9007199254740992.0)
    snprintf(out, n, "%.0f", v);
  else
    snprintf(out, n, "%.15g", v);
}

static void sample(sbuf *b, family *f, const labels *l, double v) {
  if (!f->started) {
    sb_printf(b, "# HELP %s %s\n# TYPE %s %s\n", f->name, f->help, f->name, f->type);
    f->started = 1;
  }
  char num[64];
  format_value(num, sizeof num, v);
  if (l && l->len)
    sb_printf(b, "%s{%s} %s\n", f->name, l->text, num);
  else
    sb_printf(b, "%s %s\n", f->name, num);
}

/* A sample from a JSON number, converted to base units as v * mul / div;
 * null, missing or non-numbers are left out. */
static void sample_json(sbuf *b, family *f, const labels *l, json_t *v, double mul, double div) {
  if (!json_is_number(v)) return;
  sample(b, f, l, json_number_value(v) * mul / div);
}

/* A family with one unlabelled sample: the number at key of a status object. */
typedef struct field {
  const char *key;
  family f;
} field;

static void sample_fields(sbuf *b, field *v, size_t n, json_t *obj) {
  for (size_t i = 0; i < n; i++)
    sample_json(b, &v[i].f, NULL, json_object_get(obj, v[i].key), 1, 1);
}

static json_t *path(json_t *o, const char *a, const char *k) {
  return json_object_get(json_object_get(o, a), k);
}

static const char *const states[] = {"forming",  "running",  "pausing", "paused", "checkpointing",
                                     "resizing", "stopping", "stopped", "failed"};

/* The cluster-wide series: identity, state, progress, losses, speed. */
static void render_cluster(sbuf *b, json_t *st) {
  labels l = {0};
  family info = {"mtnlg_info", "gauge", "Identity of the answering daemon (always 1).", 0};
  label_json(&l, "node", json_object_get(st, "node"));
  label_json(&l, "coordinator", json_object_get(st, "coordinator"));
  label_json(&l, "version", json_object_get(st, "version"));
  sample(b, &info, &l, 1);

  family state = {"mtnlg_state", "gauge",
                  "Cluster state: 1 for the current state, 0 for the others.", 0};
  const char *cur = json_string_value(json_object_get(st, "state"));
  int known = 0;
  for (size_t i = 0; i < sizeof states / sizeof states[0]; i++) {
    labels s = {0};
    label(&s, "state", states[i]);
    int on = cur && strcmp(cur, states[i]) == 0;
    known |= on;
    sample(b, &state, &s, on);
  }
  if (cur && !known) {
    labels s = {0};
    label(&s, "state", cur);
    sample(b, &state, &s, 1);
  }

  field f[] = {
      {"generation",
       {"mtnlg_generation", "gauge", "Membership generation: bumped whenever the cluster re-forms.",
        0}},
      {"restarts",
       {"mtnlg_restarts_total", "counter",
        "Generations ended by a failure (a lost node) and re-formed from the last checkpoint.", 0}},
      {"step", {"mtnlg_step", "gauge", "Last completed optimizer step.", 0}},
      /* gauges, not counters: both are the position of the run, which goes
       * back when a generation resumes from an earlier checkpoint */
      {"consumed_tokens",
       {"mtnlg_consumed_tokens", "gauge",
        "Training tokens consumed by the run as of the last step (back to a checkpoint's count "
        "after a resume from it).",
        0}},
      {"global_batch",
       {"mtnlg_step_global_batch", "gauge",
        "Samples the last step read (below the job's global batch during a ramp-up).", 0}},
      {"loss", {"mtnlg_loss", "gauge", "Training loss of the last step.", 0}},
      {"val_loss", {"mtnlg_validation_loss", "gauge", "Last validation loss.", 0}},
      {"test_loss",
       {"mtnlg_test_loss", "gauge",
        "Loss of the test pass at the end of a completed run (eval.test).", 0}},
      {"lr", {"mtnlg_learning_rate", "gauge", "Learning rate of the last step.", 0}},
      {"grad_norm",
       {"mtnlg_grad_norm", "gauge", "Global gradient norm of the last step (before clipping).", 0}},
      {"params_norm",
       {"mtnlg_params_norm", "gauge",
        "Norm of the fp32 master weights after the last step's update (train.log_params_norm).",
        0}},
      {"num_zeros",
       {"mtnlg_grad_num_zeros", "gauge",
        "Zero elements of the last applied step's gradients (train.log_num_zeros_in_grad).", 0}},
      {"tokens_per_s",
       {"mtnlg_tokens_per_second", "gauge",
        "Training throughput of the last step in tokens per second; no sample before the first "
        "step nor while the job is not running (paused, stopped, re-forming...).",
        0}},
      {"skipped_steps",
       {"mtnlg_skipped_steps", "gauge",
        "Steps of the run skipped for non-finite gradients as of the last step (back to a "
        "checkpoint's count after a resume from it).",
        0}},
      {"loss_scale",
       {"mtnlg_loss_scale", "gauge", "fp16's dynamic loss scale after the last step.", 0}},
      {"eta_s",
       {"mtnlg_eta_seconds", "gauge",
        "Estimated time until the run ends: its steps, validation and test passes and the saves "
        "training waits for.",
        0}},
      {"exit_at",
       {"mtnlg_exit_time_seconds", "gauge",
        "When train.exit_duration_mins stops the run, in seconds since the epoch.", 0}},
      {"exit_step",
       {"mtnlg_exit_step", "gauge", "The step after which train.exit_interval stops the run.", 0}},
      {"operations_pending",
       {"mtnlg_operations_pending", "gauge", "Operations queued or running.", 0}},
      {"tensorboard_dropped_steps",
       {"mtnlg_tensorboard_dropped_steps_total", "counter",
        "Steps whose TensorBoard points this daemon dropped since it started: its writer was "
        "4096 steps behind (a slow or hung file system under train.tensorboard_dir), and until "
        "it was down to half of that. Not counted: what a writer held at the exit.",
        0}},
  };
  sample_fields(b, f, sizeof f / sizeof f[0], st);

  /* a validation or test pass under way, during which mtnlg_step stays: an
   * alert on a step that does not move can leave those minutes out */
  json_t *ev = json_object_get(st, "evaluation");
  family evaluating = {"mtnlg_evaluating", "gauge",
                       "1 while the answering daemon's ranks run a validation or test pass "
                       "(mtnlg_step moves on once it ends), else 0.",
                       0};
  sample(b, &evaluating, NULL, json_is_object(ev));
  family ev_done = {"mtnlg_evaluation_batches_done", "gauge",
                    "Global batches of the validation or test pass under way run so far; no "
                    "sample without one.",
                    0};
  family ev_total = {"mtnlg_evaluation_batches", "gauge",
                     "Global batches of the pass under way (eval.iters); no sample without one.",
                     0};
  if (json_is_object(ev)) {
    labels s = {0};
    label_json(&s, "split", json_object_get(ev, "split"));
    sample_json(b, &ev_done, &s, json_object_get(ev, "batches_done"), 1, 1);
    sample_json(b, &ev_total, &s, json_object_get(ev, "batches"), 1, 1);
  }

  family phase = {"mtnlg_step_time_seconds", "gauge",
                  "Time of the last step, split by phase (total = compute + bubble + comm).", 0};
  const char *phases[] = {"total", "compute", "bubble", "comm"};
  for (size_t i = 0; i < 4; i++) {
    char key[32];
    snprintf(key, sizeof key, "%s_ms", phases[i]);
    labels s = {0};
    label(&s, "phase", phases[i]);
    sample_json(b, &phase, &s, path(st, "step_time", key), 1, 1000);
  }

  /* train.timing_log_level: the last step's timers, the least and the most
   * of any rank */
  json_t *timers = path(st, "step_time", "timers");
  family tmin = {"mtnlg_step_timer_min_seconds", "gauge",
                 "train.timing_log_level's timers of the last step: the least of any rank.", 0};
  family tmax = {"mtnlg_step_timer_max_seconds", "gauge",
                 "train.timing_log_level's timers of the last step: the most of any rank.", 0};
  for (int k = 0; k < 2 && json_is_object(timers); k++) {
    const char *name;
    json_t *v;
    json_object_foreach(timers, name, v) {
      labels s = {0};
      label(&s, "timer", name);
      sample_json(b, k ? &tmax : &tmin, &s, json_array_get(v, (size_t)k), 1, 1000);
    }
  }
}

/* A coordinator elected through etcd (rendezvous.etcd): whether this
 * daemon's etcd requests answer; no sample without etcd. */
static void render_election(sbuf *b, json_t *el) {
  if (!json_is_object(el)) return;
  family up = {"mtnlg_etcd_up", "gauge",
               "1 while this daemon's etcd requests answer (rendezvous.etcd; every heartbeat), 0 "
               "while etcd cannot be reached or has no quorum: training goes on, but no "
               "coordinator can be elected meanwhile.",
               0};
  family here = {"mtnlg_elected_here", "gauge",
                 "1 on the daemon elected coordinator through etcd, 0 on the others.", 0};
  sample(b, &up, NULL, json_is_true(json_object_get(el, "etcd_answers")));
  sample(b, &here, NULL, json_is_true(json_object_get(el, "elected_here")));
}

/* The rendezvous store this daemon hosts (none on the other daemons): what
 * it holds and its limits, so an alert sees it fill before it refuses. */
static void render_store(sbuf *b, json_t *store) {
  if (!json_is_object(store)) return;
  field f[] = {
      {"keys", {"mtnlg_store_keys", "gauge", "Keys in the rendezvous store this daemon hosts.", 0}},
      {"bytes",
       {"mtnlg_store_bytes", "gauge",
        "Bytes the store holds, as rendezvous.store_max_mb counts them (keys, values, 64 an "
        "entry).",
        0}},
      {"max_bytes",
       {"mtnlg_store_max_bytes", "gauge", "What the store holds at most (rendezvous.store_max_mb).",
        0}},
      {"transient_bytes",
       {"mtnlg_store_transient_bytes", "gauge",
        "Bytes of parked GETs and WAITs, receive buffers and replies not yet sent.", 0}},
      {"max_transient_bytes",
       {"mtnlg_store_max_transient_bytes", "gauge", "The limit on the transient bytes.", 0}},
      {"clients", {"mtnlg_store_clients", "gauge", "Connections open to the store.", 0}},
      {"max_clients",
       {"mtnlg_store_max_clients", "gauge", "Connections the store takes at most.", 0}},
      {"waiters",
       {"mtnlg_store_waiters", "gauge", "GET and WAIT requests parked until their keys appear.",
        0}},
      {"refused_clients",
       {"mtnlg_store_refused_clients_total", "counter",
        "Connections the store closed at once: past its limit, or no memory for them.", 0}},
      {"dropped_clients",
       {"mtnlg_store_dropped_clients_total", "counter",
        "Connections the store closed for not reading their replies (queued past the transient "
        "limit).",
        0}},
  };
  sample_fields(b, f, sizeof f / sizeof f[0], store);
}

/* The job's shape: name and hash on an info gauge, sizes as gauges. */
static void render_job(sbuf *b, json_t *job) {
  if (!json_is_object(job)) return;
  labels l = {0};
  family info = {"mtnlg_job_info", "gauge", "The job being trained (always 1).", 0};
  label_json(&l, "name", json_object_get(job, "name"));
  label_json(&l, "hash", json_object_get(job, "hash"));
  sample(b, &info, &l, 1);
  field f[] = {
      {"steps", {"mtnlg_job_steps", "gauge", "Optimizer steps the job runs to.", 0}},
      {"global_batch",
       {"mtnlg_job_global_batch_sequences", "gauge", "Sequences per optimizer step.", 0}},
      {"micro_batch",
       {"mtnlg_job_micro_batch_sequences", "gauge", "Sequences per micro-batch.", 0}},
      {"seq_len", {"mtnlg_job_sequence_length_tokens", "gauge", "Tokens per sequence.", 0}},
      {"params", {"mtnlg_job_parameters", "gauge", "Model parameters.", 0}},
  };
  sample_fields(b, f, sizeof f / sizeof f[0], job);
  family par = {"mtnlg_job_parallelism", "gauge",
                "Parallel widths: tp, pp, dp now, the dp range the job accepts, and after an "
                "operator's resize the width it holds (dp_resized).",
                0};
  const char *dims[] = {"tp", "pp", "dp", "dp_min", "dp_max", "dp_resized"};
  for (size_t i = 0; i < sizeof dims / sizeof *dims; i++) {
    labels s = {0};
    label(&s, "dim", dims[i]);
    sample_json(b, &par, &s, json_object_get(job, dims[i]), 1, 1);
  }
}

/* Per-device series, labelled node, device, rank (and stage, replica). */
static void render_devices(sbuf *b, json_t *devs) {
  family flops = {"mtnlg_device_flops_per_second", "gauge",
                  "Model FLOP/s achieved by one device over the last step; no sample before the "
                  "first step nor while the job is not running.",
                  0};
  family mfu = {"mtnlg_device_mfu_ratio", "gauge",
                "Model FLOP/s utilization of one device (0..1); no sample before the first step "
                "nor while the job is not running.",
                0};
  family *fams[] = {&flops, &mfu};
  const char *keys[] = {"tflops", "mfu"};
  const double mul[] = {1e12, 1}; /* TFLOP/s -> FLOP/s */
  for (size_t k = 0; k < 2; k++) {
    size_t i;
    json_t *d;
    json_array_foreach(devs, i, d) {
      labels l = {0};
      label_json(&l, "node", json_object_get(d, "node"));
      label_json(&l, "device", json_object_get(d, "device"));
      label_json(&l, "rank", json_object_get(d, "rank"));
      label_json(&l, "stage", json_object_get(d, "stage"));
      label_json(&l, "replica", json_object_get(d, "replica"));
      sample_json(b, fams[k], &l, json_object_get(d, keys[k]), mul[k], 1);
    }
  }
}

/* Per-node series, labelled node; role and state ride on an info gauge. */
static void render_nodes(sbuf *b, json_t *nodes) {
  family info = {"mtnlg_node_info", "gauge", "A node of the cluster (always 1): host, role, state.",
                 0};
  family age = {"mtnlg_node_heartbeat_age_seconds", "gauge",
                "Time since the coordinator last heard from the node.", 0};
  family mem = {"mtnlg_node_memory_bytes", "gauge", "Memory the node's daemon uses.", 0};
  family ndev = {"mtnlg_node_devices", "gauge", "Devices the node trains on.", 0};
  size_t i;
  json_t *n;
  json_array_foreach(nodes, i, n) {
    labels l = {0};
    label_json(&l, "node", json_object_get(n, "name"));
    label_json(&l, "host", json_object_get(n, "host"));
    label_json(&l, "role", json_object_get(n, "role"));
    label_json(&l, "state", json_object_get(n, "state"));
    sample(b, &info, &l, 1);
  }
  family *fams[] = {&age, &mem};
  const char *keys[] = {"heartbeat_age_s", "memory_bytes"};
  for (size_t k = 0; k < 2; k++) {
    json_array_foreach(nodes, i, n) {
      labels l = {0};
      label_json(&l, "node", json_object_get(n, "name"));
      sample_json(b, fams[k], &l, json_object_get(n, keys[k]), 1, 1);
    }
  }
  json_array_foreach(nodes, i, n) {
    json_t *d = json_object_get(n, "devices");
    if (!json_is_array(d)) continue;
    labels l = {0};
    label_json(&l, "node", json_object_get(n, "name"));
    sample(b, &ndev, &l, (double)json_array_size(d));
  }
}

/* The last committed checkpoint and the one being written, if any. */
static void render_checkpoints(sbuf *b, json_t *st) {
  json_t *last = json_object_get(st, "last_checkpoint");
  field f[] = {
      {"step",
       {"mtnlg_checkpoint_last_step", "gauge", "Step of the last committed checkpoint.", 0}},
      {"bytes",
       {"mtnlg_checkpoint_last_bytes", "gauge", "Size of the last committed checkpoint.", 0}},
      {"time",
       {"mtnlg_checkpoint_last_timestamp_seconds", "gauge",
        "Unix time the last checkpoint was committed.", 0}},
  };
  sample_fields(b, f, sizeof f / sizeof f[0], last);

  json_t *cp = json_object_get(st, "checkpoint_progress");
  if (!json_is_object(cp)) return;
  const char *state = json_string_value(json_object_get(cp, "state"));
  family writing = {"mtnlg_checkpoint_writing", "gauge", "1 while a checkpoint is being written.",
                    0};
  if (state) sample(b, &writing, NULL, strcmp(state, "writing") == 0);
  family failed = {"mtnlg_checkpoint_last_save_failed", "gauge",
                   "1 while the newest checkpoint save on this node's ranks failed.", 0};
  /* a spare's status shows the cluster's last save (of: cluster): these
   * families are this node's ranks', none of which saved, so a sum over
   * the nodes counts each failure where it happened */
  const char *of = json_string_value(json_object_get(cp, "of"));
  int own = !of || strcmp(of, "cluster");
  if (state) sample(b, &failed, NULL, own && strcmp(state, "failed") == 0);
  family failures = {"mtnlg_checkpoint_failures_total", "counter",
                     "Checkpoint saves on this node's ranks that failed since the daemon started.",
                     0};
  json_t *nf = json_object_get(cp, "failures");
  if (json_is_integer(nf)) sample(b, &failures, NULL, own ? (double)json_integer_value(nf) : 0.0);
  if (!own) return;
  field g[] = {
      {"step",
       {"mtnlg_checkpoint_write_step", "gauge", "Step of the checkpoint being written.", 0}},
      {"bytes_done",
       {"mtnlg_checkpoint_write_done_bytes", "gauge", "Bytes of it written so far.", 0}},
      {"bytes_total", {"mtnlg_checkpoint_write_total_bytes", "gauge", "Bytes it will have.", 0}},
      {"bytes_per_s", {"mtnlg_checkpoint_write_bytes_per_second", "gauge", "Its write speed.", 0}},
  };
  sample_fields(b, g, sizeof g / sizeof g[0], cp);
}

/* The server's own answers, by status code. */
static void render_http(sbuf *b, const mt_control *c) {
  family f = {"mtnlg_http_requests_total", "counter",
              "Control API requests answered, by HTTP status code.", 0};
  for (int code = 100; code < 600; code++) {
    unsigned long n = mt__control_count(c, code);
    if (!n) continue;
    labels l = {0};
    char s[8];
    snprintf(s, sizeof s, "%d", code);
    label(&l, "code", s);
    sample(b, &f, &l, (double)n);
  }
  family cut = {"mtnlg_http_connections_cut_total", "counter",
                "Connections closed because a request took past the whole-request deadline.", 0};
  labels none = {0};
  sample(b, &cut, &none, (double)mt__control_cut(c));
}

char *mt_control_metrics_text(const mt_control *c, json_t *status) {
  sbuf b = {0};
  sb_str(&b, "");
  if (json_is_object(status)) {
    render_cluster(&b, status);
    render_job(&b, json_object_get(status, "job"));
    render_store(&b, json_object_get(status, "store"));
    render_election(&b, json_object_get(status, "election"));
    render_devices(&b, json_object_get(status, "devices"));
    render_nodes(&b, json_object_get(status, "nodes"));
    render_checkpoints(&b, status);
  }
  if (c) render_http(&b, c);
  if (b.oom) {
    free(b.p);
    return NULL;
  }
  return b.p;
}
