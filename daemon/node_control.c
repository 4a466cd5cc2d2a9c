/* node_control.c — what this node's control plane answers, and the store
 * traffic behind it: its own status out, the coordinator's cluster view in,
 * mutations handed to the coordinator. The HTTP thread only reads snapshots
 * under n->mu (and, for a mutation, waits on the store: never the loop). */
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "blas.h"
#include "ckpt.h"
#include "device.h"
#include "election.h"
#include "err.h"
#include "fileio.h"
#include "log.h"
#include "monotime.h"
#include "mt_config.h"
#include "node_int.h"
#include "ops.h"
#include "plan.h"

static double wall_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static json_t *num_or_null(double v) { return isfinite(v) ? json_real(v) : json_null(); }

json_t *node_timers_json(const mt_step_stats *st) {
  if (st->timing_level < 1) return json_null();
  json_t *t = json_object();
  for (int i = 0; t && i < MT_TM_COUNT; i++)
    if (mt_timer_reported(i, st->timing_level, st->timer_max[i]))
      json_object_set_new(t, mt_timer_name(i),
                          json_pack("[f, f]", st->timer_min[i], st->timer_max[i]));
  return t ? t : json_null();
}

void node_timers_from_json(mt_step_stats *st, int level, const json_t *timers) {
  const char *name;
  json_t *v;
  if (level < 1 || !json_is_object(timers)) return;
  st->timing_level = level;
  json_object_foreach((json_t *)timers, name, v) {
    int id = mt_timer_find(name);
    if (id >= 0 && json_is_array(v) && json_array_size(v) == 2)
      st->timer_min[id] = json_number_value(json_array_get(v, 0)),
      st->timer_max[id] = json_number_value(json_array_get(v, 1));
  }
}

void node_history_add(node *n, const mt_step_stats *st) {
  pthread_mutex_lock(&n->mu);
  /* a generation re-formed after a failure resumes from an earlier step:
   * the steps after it are history no more (they are trained again) */
  while (n->history && n->history_n > n->history_first &&
         n->history[(n->history_n - 1) % NODE_HISTORY].step >= st->step)
    n->history_n--;
  n->last_gen = n->gen;
  if (n->history) {
    node_point *p = &n->history[n->history_n % NODE_HISTORY];
    *p = (node_point){.step = st->step,
                      .consumed_tokens = st->consumed_tokens,
                      .time = wall_s(),
                      .loss = st->loss,
                      .lr = st->lr,
                      .grad_norm = st->grad_norm,
                      .step_ms = st->step_ms,
                      .tokens_per_s = st->tokens_per_s,
                      .tflops = st->tflops,
                      .bubble = st->bubble,
                      .comm_ms = st->comm_ms,
                      /* the step's newest validation: at a completed run's
                         last step the one at the end of training */
                      .val_loss = st->has_final_val ? st->final_val_loss
                                  : st->has_val     ? st->val_loss
                                                    : NAN,
                      .test_loss = st->has_test ? st->test_loss : NAN,
                      .global_batch = st->global_batch,
                      .num_zeros = st->has_num_zeros ? st->num_zeros : -1};
    n->history_n++;
    if (n->history_n - n->history_first > NODE_HISTORY)
      n->history_first = n->history_n - NODE_HISTORY;
  }
  n->last = *st;
  n->have_last = 1;
  n->exit_at = st->exit_at;
  pthread_mutex_unlock(&n->mu);
}

static json_t *point_json(const node_point *p) {
  json_t *j = json_pack("{s:I, s:f, s:o, s:o, s:o, s:f, s:f, s:f, s:f, s:I}", "step",
                        (json_int_t)p->step, "time", p->time, "loss", num_or_null(p->loss), "lr",
                        num_or_null(p->lr), "grad_norm", num_or_null(p->grad_norm), "step_ms",
                        p->step_ms, "tokens_per_s", p->tokens_per_s, "tflops", p->tflops, "bubble",
                        p->bubble, "consumed_tokens", (json_int_t)p->consumed_tokens);
  if (isfinite(p->val_loss)) json_object_set_new(j, "val_loss", json_real(p->val_loss));
  if (isfinite(p->test_loss)) json_object_set_new(j, "test_loss", json_real(p->test_loss));
  if (p->num_zeros >= 0) json_object_set_new(j, "num_zeros", json_integer(p->num_zeros));
  return j;
}

/* ---- the provider (HTTP thread) ---- */

static json_t *newest_checkpoint(node *n);

/* The job block of the status: the job this node runs or watches. */
static json_t *job_json(node *n) {
  const mt_job *j = n->have_run_job ? &n->run_job : n->have_job ? &n->job : NULL;
  if (!j) return json_null();
  int dp = n->have_run_job ? n->asg.dp : j->parallel.dp_min;
  /* the parameter count is the plan's; it changes only with the job */
  if (strcmp(n->params_job_hash, j->hash)) {
    mt_plan_device pd = {.memory_bytes = 1e18, .tflops = 1.0};
    mt_plan plan;
    n->params = mt_plan_compute(j, &pd, &plan) ? 0 : plan.model_params;
    snprintf(n->params_job_hash, sizeof n->params_job_hash, "%s", j->hash);
  }
  json_int_t params = (json_int_t)n->params;
  /* this node's paths.checkpoint_dir wins over the job's (start_engine),
   * already in the job it runs, not yet in the one it watches */
  const char *ckpt_dir =
      !n->have_run_job && n->cfg->checkpoint_dir[0] ? n->cfg->checkpoint_dir : j->checkpoint.dir;
  /* an operator's resize holds (the coordinator's own formings keep it) */
  int resized = n->have_run_job ? n->asg.dp_resized : 0;
  return json_pack("{s:s, s:s, s:I, s:i, s:i, s:i, s:I, s:i, s:i, s:i, s:i, s:i, s:o, s:o}", "name",
                   j->name, "hash", j->hash, "steps", (json_int_t)j->train.steps, "global_batch",
                   j->train.global_batch, "seq_len", j->model.seq_len, "micro_batch",
                   j->parallel.micro_batch, "params", params, "tp", j->parallel.tp, "pp",
                   j->parallel.pp, "dp", dp, "dp_min", j->parallel.dp_min, "dp_max",
                   j->parallel.dp_max, "dp_resized", resized ? json_integer(resized) : json_null(),
                   "checkpoint_dir", ckpt_dir[0] ? json_string(ckpt_dir) : json_null());
}

/* The rendezvous store this daemon hosts, with its limits; null on a node
 * that hosts none. Asked of the server's own thread (its loop answers). */
static json_t *store_status(node *n) {
  if (!n->server) return json_null();
  mt_store_server_stats st;
  mt_store_server_thread_get_stats(n->server, &st);
  return json_pack(
      "{s:I, s:I, s:I, s:I, s:I, s:i, s:i, s:i, s:I, s:I}", "keys", (json_int_t)st.keys, "bytes",
      (json_int_t)st.bytes, "max_bytes", (json_int_t)st.max_bytes, "transient_bytes",
      (json_int_t)st.transient_bytes, "max_transient_bytes", (json_int_t)st.max_transient_bytes,
      "clients", (int)st.clients, "max_clients", (int)st.max_conns, "waiters", (int)st.waiters,
      "refused_clients", (json_int_t)st.refused, "dropped_clients", (json_int_t)st.dropped);
}

/* Batches of the passes after step p->step - 1 that a pass under way has
 * read, in the engine's order: the interval's validation, then at the end
 * the valid and the test pass (mt_job_left_after counts them all). A stop's
 * validation is not among them: 0. */
static int64_t eval_batches_read(const mt_job *j, const mt_eval_progress *p) {
  int64_t ev = j->eval.interval, iters = j->eval.iters;
  int64_t interval = ev > 0 && p->step % ev == 0 ? iters : 0;
  if (!p->end_of_training) return interval ? p->done : 0;
  return interval + (p->split == MT_SPLIT_TEST ? iters : 0) + p->done;
}

/* The status's eta_s, what the run has left: its steps at the mean step
 * time of the last 20 points (under a batch ramp-up, the samples they read
 * at those points' time per sample); its validation and test batches at
 * the newest pass's time per batch (before one ran here, a third of a
 * training step's global batch: its forward pass); and the saves training
 * waits for at the newest save's time (once one ran here). A pass under
 * way follows a step not reported yet: that step is trained. null unless
 * the job runs. Under mu. */
static json_t *eta_json(node *n, const char *state) {
  const mt_step_stats *st = &n->last;
  const mt_job *j = n->have_run_job ? &n->run_job : NULL;
  if (!j || !n->have_last || n->history_n <= n->history_first ||
      (strcmp(state, "running") && strcmp(state, "checkpointing")))
    return json_null();
  double sum = 0, samples = 0;
  int k = 0;
  for (int64_t i = n->history_n - 1; i >= n->history_first && k < 20; i--, k++) {
    sum += n->history[i % NODE_HISTORY].step_ms;
    samples += n->history[i % NODE_HISTORY].global_batch;
  }
  mt_job_left left = mt_job_left_after(j, st->step);
  int64_t trained = 0, read = 0;
  if (n->evaluating && n->eval.step > st->step) {
    trained = n->eval.step - st->step;
    read = eval_batches_read(j, &n->eval);
  }
  int64_t steps = left.steps > trained ? left.steps - trained : 0;
  double ms = 0, batch_ms = sum / k; /* a full batch's step */
  if (samples > 0 && j->model.seq_len > 0) {
    batch_ms = sum / samples * j->train.global_batch;
    if (j->train.rampup.start) {
      int64_t done = st->consumed_tokens / j->model.seq_len;
      done += mt_job_samples_of(j, done, trained);
      ms += (double)mt_job_samples_of(j, done, steps) * sum / samples;
    }
  }
  if (!ms) ms = (double)steps * sum / k;
  int64_t batches = left.eval_batches - read;
  if (batches > 0) ms += (double)batches * (n->eval_batch_ms > 0 ? n->eval_batch_ms : batch_ms / 3);
  if (left.whole_saves > 0 && n->ckpt_seconds > 0)
    ms += (double)left.whole_saves * n->ckpt_seconds * 1e3;
  return json_real(ms / 1e3);
}

/* The status's devices: this node's, with the first local rank's rate and
 * MFU for each while the job steps (stepping). Under mu. */
static json_t *devices_json(node *n, int stepping) {
  const mt_step_stats *st = &n->last;
  json_t *devs = json_array();
  /* the MFU base is the best rate seen: the GEMM rate measured at start-up,
   * or a step's rate that beat it (measured on a busy machine, the base was
   * low, and MFU read over 100%) */
  if (stepping && isfinite(st->tflops) && n->peak_flops > 0 && st->tflops * 1e12 > n->peak_flops) {
    mt_log_debug("MFU: a step ran at %.4g TFLOP/s per device, past the base of %.4g: the base "
                 "from now on",
                 st->tflops, n->peak_flops / 1e12);
    n->peak_flops = st->tflops * 1e12;
  }
  if (n->have_run_job) {
    const mt_member *me = mt_assignment_find(&n->asg, n->cfg->name);
    for (int r = me ? me->rank_begin : 0; me && r < me->rank_end; r++) {
      int tp = n->asg.tp, dp = n->asg.dp;
      double tf = st->tflops;
      json_array_append_new(
          devs,
          json_pack("{s:s, s:s, s:i, s:i, s:i, s:o, s:o}", "node", n->cfg->name, "device",
                    n->specs[r - me->rank_begin], "rank", r, "stage", r / (tp * dp), "replica",
                    r / tp % dp, "tflops", stepping ? num_or_null(tf) : json_null(), "mfu",
                    n->peak_flops > 0 && stepping ? num_or_null(tf * 1e12 / n->peak_flops)
                                                  : json_null()));
    }
  }
  return devs;
}

/* The status's checkpoint_progress: this node's save, writing or the
 * last one. Under mu. */
static json_t *checkpoint_progress_json(node *n, const json_t *cl) {
  /* a node that has saved nothing (a spare) shows the cluster's last save,
   * as the nodes that saved it report it (of: "cluster") */
  const json_t *cs =
      cl && !n->ckpt_writing && !n->ckpt_step ? json_object_get(cl, "last_save") : NULL;
  const json_t *err = json_object_get(cs, "error");
  if (json_is_integer(json_object_get(cs, "step")) &&
      json_is_integer(json_object_get(cs, "failures")) &&
      (json_is_null(err) || json_is_string(err)))
    return json_pack("{s:s, s:s, s:O, s:n, s:n, s:n, s:O, s:O}", "of", "cluster", "state",
                     json_is_true(json_object_get(cs, "failed")) ? "failed" : "idle", "step",
                     json_object_get(cs, "step"), "bytes_done", "bytes_total", "bytes_per_s",
                     "failures", json_object_get(cs, "failures"), "error", err);
  /* the writers do not count their bytes as they go: while one writes, its
   * figures are unknown (null), not the previous save's; idle, they are the
   * last save's, null before any */
  int failed = !n->ckpt_writing && n->ckpt_failed;
  int known = !n->ckpt_writing && !failed && n->ckpt_seconds > 0;
  return json_pack("{s:s, s:s, s:o, s:o, s:o, s:o, s:I, s:o}", "of", "node", "state",
                   n->ckpt_writing ? "writing"
                   : failed        ? "failed"
                                   : "idle",
                   "step", n->ckpt_step ? json_integer(n->ckpt_step) : json_null(), "bytes_done",
                   known ? json_integer((json_int_t)n->ckpt_bytes) : json_null(), "bytes_total",
                   known ? json_integer((json_int_t)n->ckpt_bytes) : json_null(), "bytes_per_s",
                   known ? json_real(n->ckpt_bytes / n->ckpt_seconds) : json_null(), "failures",
                   (json_int_t)n->ckpt_failures, "error",
                   failed ? json_string(n->ckpt_error) : json_null());
}

json_t *node_eval_json(const mt_eval_progress *p, double elapsed_s) {
  return json_pack("{s:s, s:b, s:I, s:i, s:i, s:f}", "split",
                   p->split == MT_SPLIT_TEST ? "test" : "valid", "end_of_training",
                   p->end_of_training, "after_step", (json_int_t)p->step, "batches_done", p->done,
                   "batches", p->total, "elapsed_s", elapsed_s);
}

int node_eval_from_json(const json_t *ev, mt_eval_progress *p, double *elapsed_s) {
  const char *split = json_string_value(json_object_get(ev, "split"));
  json_t *step = json_object_get(ev, "after_step"), *done = json_object_get(ev, "batches_done"),
         *total = json_object_get(ev, "batches"), *secs = json_object_get(ev, "elapsed_s");
  /* what the status's schema allows: a value out of it is none */
  if (!split || !json_is_integer(step) || !json_is_integer(done) || !json_is_integer(total) ||
      !json_is_number(secs) || json_integer_value(step) < 0 || json_integer_value(total) < 1 ||
      json_integer_value(total) > INT_MAX || json_integer_value(done) < 0 ||
      json_integer_value(done) > json_integer_value(total) || !isfinite(json_number_value(secs)) ||
      json_number_value(secs) < 0)
    return -1;
  *p = (mt_eval_progress){.split = strcmp(split, "test") ? MT_SPLIT_VALID : MT_SPLIT_TEST,
                          .end_of_training = json_is_true(json_object_get(ev, "end_of_training")),
                          .step = json_integer_value(step),
                          .done = (int)json_integer_value(done),
                          .total = (int)json_integer_value(total)};
  *elapsed_s = json_number_value(secs);
  return 0;
}

static json_t *build_status(node *n) {
  /* before mu is taken: a wait for the scan must not hold the training
   * thread's on_step, which takes mu too */
  json_t *last = newest_checkpoint(n);
  pthread_mutex_lock(&n->mu);
  json_t *cl = n->cluster;
  const char *state = cl ? json_string_value(json_object_get(cl, "state")) : NULL;
  const char *reason = cl ? json_string_value(json_object_get(cl, "reason")) : NULL;
  if (n->end_seen && n->end_final && !n->end_ok && n->end_reason[0])
    state = "failed", reason = n->end_reason;
  if (!state) state = "forming";
  /* the cluster's word lags a heartbeat; this node's own save is news now */
  if (n->ckpt_writing && !strcmp(state, "running")) state = "checkpointing";
  json_t *s = json_object();
  json_object_set_new(s, "node", json_string(n->cfg->name));
  json_t *coord = cl ? json_object_get(cl, "coordinator") : NULL;
  json_object_set(s, "coordinator", coord ? coord : json_null());
  json_object_set_new(s, "version", json_string(MT_VERSION));
  json_object_set_new(s, "job", job_json(n));
  json_object_set_new(s, "generation", json_integer(n->gen));
  json_t *restarts = cl ? json_object_get(cl, "restarts") : NULL;
  json_object_set_new(s, "restarts", json_integer(json_integer_value(restarts)));
  json_t *last_restart = cl ? json_object_get(cl, "last_restart") : NULL;
  json_object_set_new(s, "last_restart", last_restart ? json_deep_copy(last_restart) : json_null());
  json_object_set_new(s, "state", json_string(state));
  json_object_set_new(s, "reason", reason ? json_string(reason) : json_null());
  const mt_step_stats *st = &n->last;
  int have = n->have_last;
  json_object_set_new(s, "step", json_integer(have ? st->step : 0));
  json_object_set_new(s, "consumed_tokens", json_integer(have ? st->consumed_tokens : 0));
  json_object_set_new(s, "global_batch",
                      have && st->global_batch > 0 ? json_integer(st->global_batch) : json_null());
  json_object_set_new(s, "loss", have ? num_or_null(st->loss) : json_null());
  json_object_set_new(s, "lr", have ? num_or_null(st->lr) : json_null());
  json_object_set_new(s, "grad_norm", have ? num_or_null(st->grad_norm) : json_null());
  json_object_set_new(s, "params_norm",
                      have && st->has_params_norm ? num_or_null(st->params_norm) : json_null());
  json_object_set_new(s, "num_zeros",
                      have && st->has_num_zeros ? json_integer(st->num_zeros) : json_null());
  /* the newest validation loss in the ring */
  json_t *val = json_null();
  for (int64_t i = n->history_n - 1; i >= n->history_first; i--)
    if (isfinite(n->history[i % NODE_HISTORY].val_loss)) {
      val = json_real(n->history[i % NODE_HISTORY].val_loss);
      break;
    }
  json_object_set_new(s, "val_loss", val);
  /* the test pass's loss: the newest step's (a completed run's last), so a
   * job given more steps after it does not show the old model's as current */
  json_t *test = json_null();
  if (n->history_n > n->history_first &&
      isfinite(n->history[(n->history_n - 1) % NODE_HISTORY].test_loss))
    test = json_real(n->history[(n->history_n - 1) % NODE_HISTORY].test_loss);
  json_object_set_new(s, "test_loss", test);
  /* a validation or test pass this node's ranks are in: the step line
   * comes once it ends (at scale, minutes of forward passes); none once
   * the generation has failed or ended under it */
  int passes = strcmp(state, "failed") && strcmp(state, "forming") && strcmp(state, "stopped");
  /* and only a pass after the step shown: a node without ranks reads the
   * step's record before it reads the pass is over (node_control_round) */
  json_t *ev = n->evaluating && passes && (!have || n->eval.step > st->step)
                   ? node_eval_json(&n->eval, (mt_mono_ms() - n->eval_started_ms) / 1e3)
                   : NULL;
  json_object_set_new(s, "evaluation", ev ? ev : json_null());
  /* the rates are the last step's: null, and no metrics sample, until a
   * step ran and while the job is not stepping (paused, stopped, forming...),
   * so an alert on throughput sees a paused or stalled job, not its last step */
  int stepping = have && (!strcmp(state, "running") || !strcmp(state, "checkpointing"));
  json_object_set_new(s, "tokens_per_s", stepping ? num_or_null(st->tokens_per_s) : json_null());
  json_object_set_new(s, "skipped_steps", json_integer(have ? st->skipped_total : 0));
  json_object_set_new(s, "loss_scale",
                      have && st->loss_scaling ? json_real(st->loss_scale) : json_null());
  /* the last step's phases: null before any (no metrics sample), not 0 */
  double total = have ? st->step_ms : 0, bubble = have ? st->bubble * st->step_ms : 0,
         comm = have ? st->comm_ms : 0;
  double compute = total - bubble - comm;
  json_object_set_new(s, "step_time",
                      have ? json_pack("{s:f, s:f, s:f, s:f, s:o}", "total_ms", total, "compute_ms",
                                       compute > 0 ? compute : 0.0, "bubble_ms", bubble, "comm_ms",
                                       comm, "timers", node_timers_json(st))
                           : json_pack("{s:n, s:n, s:n, s:n, s:n}", "total_ms", "compute_ms",
                                       "bubble_ms", "comm_ms", "timers"));
  const mt_job *j = n->have_run_job ? &n->run_job : NULL;
  json_object_set_new(s, "eta_s", eta_json(n, state));
  json_object_set_new(s, "exit_at", n->exit_at > 0 ? json_real(n->exit_at) : json_null());
  /* the step train.exit_interval stops the run after: the next multiple,
   * short of the last; null once the job has stopped or ended */
  json_t *exit_step = json_null();
  int64_t every = j ? j->train.exit_interval : 0;
  if (every > 0 && strcmp(state, "stopped") && strcmp(state, "failed")) {
    int64_t next = ((have ? st->step : 0) / every + 1) * every;
    if (next < j->train.steps) exit_step = json_integer(next);
  }
  json_object_set_new(s, "exit_step", exit_step);
  json_object_set_new(s, "devices", devices_json(n, stepping));
  json_t *nodes = cl ? json_object_get(cl, "nodes") : NULL;
  json_object_set_new(s, "nodes", nodes ? json_deep_copy(nodes) : json_array());
  /* what the nodes' heartbeat ages are to be read against (the dashboard's
   * late and lost) */
  json_object_set_new(s, "heartbeat_interval_ms", json_integer(n->cfg->heartbeat_interval_ms));
  json_object_set_new(s, "heartbeat_timeout_ms", json_integer(n->cfg->heartbeat_timeout_ms));
  json_object_set_new(s, "last_checkpoint", last);
  json_object_set_new(s, "checkpoint_progress", checkpoint_progress_json(n, cl));
  int pending = 0;
  json_t *ops = cl ? json_object_get(cl, "operations") : NULL;
  size_t i;
  json_t *op;
  json_array_foreach(ops, i, op) {
    const char *os = json_string_value(json_object_get(op, "state"));
    pending += os && (!strcmp(os, "queued") || !strcmp(os, "running"));
  }
  json_object_set_new(s, "operations_pending", json_integer(pending));
  pthread_mutex_unlock(&n->mu);
  json_object_set_new(s, "store", store_status(n));
  /* whether this node's etcd requests answer (its election thread's last
   * round): while they do not, training goes on but no election can */
  mt_election_view etcd_view = {0};
  if (n->election) mt_election_view_get(n->election, &etcd_view);
  json_object_set_new(
      s, "election",
      n->cfg->etcd[0] && n->term[0]
          ? json_pack("{s:s, s:s, s:s, s:b, s:i, s:b, s:o}", "etcd", n->cfg->etcd, "term", n->term,
                      "coordinator_endpoint", n->store_name, "elected_here", n->is_host, "lease_s",
                      node_lease_ttl_s(n->cfg), "etcd_answers", !etcd_view.failing_since_ms,
                      "etcd_error",
                      etcd_view.failing_since_ms ? json_string(etcd_view.error) : json_null())
          : json_null());
  /* world rank 0's TensorBoard writer fell behind (a slow or hung disk):
   * the steps every writer this daemon ran dropped, as its step thread
   * dropped them */
  json_object_set_new(s, "tensorboard_dropped_steps",
                      json_integer((json_int_t)mt_tboard_dropped_total()));
  return s;
}

/* GET /v1/status (and /v1/metrics, /v1/health): a snapshot rebuilt at most
 * every 100 ms and shared read-only between requests, so polling at 1000
 * requests/s costs the training little more than the HTTP work itself. */
/* An HTTP read of what cluster/status says: the loop's copy, fetched again
 * first (the next tick, waited for up to 300 ms) when it is older than two
 * heartbeats, as it is after a while nobody read it (or 300 ms late
 * while the loop cannot fetch it: the store down, the daemon exiting). */
static void viewed(node *n) {
  int64_t now = mt_mono_ms();
  __atomic_store_n(&n->viewed_ms, now, __ATOMIC_RELAXED);
  pthread_mutex_lock(&n->mu);
  if (now - n->cluster_ms > 2 * (int64_t)n->cfg->heartbeat_interval_ms) {
    n->cluster_wanted = 1;
    struct timespec until = mt_mono_deadline(300);
    while (n->cluster_wanted && !pthread_cond_timedwait(&n->cluster_cv, &n->mu, &until)) {
    }
  }
  pthread_mutex_unlock(&n->mu);
}

static json_t *p_status(void *arg) {
  node *n = arg;
  viewed(n);
  pthread_mutex_lock(&n->status_cache_mu);
  int64_t now = mt_mono_ms();
  if (!n->status_cache || now - n->status_cache_ms >= 100) {
    json_t *fresh = build_status(n);
    if (fresh) {
      json_decref(n->status_cache);
      n->status_cache = fresh;
      n->status_cache_ms = now;
    }
  }
  json_t *s = json_incref(n->status_cache);
  pthread_mutex_unlock(&n->status_cache_mu);
  return s;
}

static json_t *p_history(void *arg, int64_t since) {
  node *n = arg;
  json_t *pts = json_array();
  pthread_mutex_lock(&n->mu);
  int64_t first = n->history_first;
  int64_t last_step = 0;
  for (int64_t i = first; i < n->history_n; i++) {
    const node_point *p = &n->history[i % NODE_HISTORY];
    last_step = p->step;
    if (p->step > since) json_array_append_new(pts, point_json(p));
  }
  pthread_mutex_unlock(&n->mu);
  return json_pack("{s:o, s:I}", "steps", pts, "last_step", (json_int_t)last_step);
}

/* This job's checkpoint directory as this node knows it, or "" (no job yet,
 * or no checkpoint.dir). With mu held. */
static void ckpt_dir_of(node *n, char *out, size_t size) {
  out[0] = 0;
  if (n->ckpt_job_dir[0]) {
    snprintf(out, size, "%s", n->ckpt_job_dir);
    return;
  }
  const mt_job *j = n->have_run_job ? &n->run_job : n->have_job ? &n->job : NULL;
  if (!j) return;
  const char *root = n->cfg->checkpoint_dir[0] ? n->cfg->checkpoint_dir : j->checkpoint.dir;
  if (root[0]) snprintf(out, size, "%s/%s", root, j->name);
}

/* Committed checkpoints of dir from the directory itself (no data is read:
 * `latest`, each shard's stat and header, each manifest's head), newest
 * last, each damaged with why when the sizes show it; an empty array when
 * none or dir is "". */
static json_t *list_checkpoints_in(const char *dir) {
  json_t *out = json_array();
  mt_ckpt_entry *e = NULL;
  size_t count = 0;
  if (dir[0] && !mt_ckpt_list(dir, &e, &count))
    for (size_t i = 0; i < count; i++)
      json_array_append_new(
          out, json_pack("{s:I, s:s, s:I, s:f, s:b, s:o}", "step", (json_int_t)e[i].step, "path",
                         e[i].path, "bytes", (json_int_t)e[i].bytes, "time", (double)e[i].created,
                         "latest", e[i].latest, "damaged",
                         e[i].damaged[0] ? json_string(e[i].damaged) : json_null()));
  free(e);
  return out;
}

/* The checkpoint list (GET /v1/checkpoints, and the status's
 * last_checkpoint, the entry `latest` names) comes from a scan on a thread
 * of its own: mt_ckpt_list stats every shard of every checkpoint, 0.3-0.6 s
 * for 300 checkpoints of 280 shards and forever on a hung NFS mount, and
 * the one HTTP thread answers /v1/health too. For the status a scan is
 * asked for when the directory, the generation or this node's checkpoint
 * step or phase changes (a save starts or commits; the prune after a
 * commit keeps latest's target), and every CKPT_RESCAN_MS besides (another
 * node's commit seen by a node without ranks, a checkpoint removed by
 * hand); the rebuild that asks waits up to CKPT_SCAN_WAIT_MS for it, and
 * after that, and meanwhile, the status shows the previous answer. GET
 * /v1/checkpoints asks for a scan of its own and waits up to
 * CKPT_LIST_WAIT_MS (none while an earlier scan has been running longer):
 * past it, it answers 503 rather than an old list. */
enum { CKPT_RESCAN_MS = 10000, CKPT_SCAN_WAIT_MS = 300, CKPT_LIST_WAIT_MS = 2000 };

struct node_ckpt_scan {
  pthread_mutex_t mu;
  pthread_cond_t cv; /* asked, done or stop changed */
  pthread_t thread;
  char key[1400];           /* what the last scan asked for was of */
  char dir[1300];           /* the directory to scan; "" none */
  int64_t asked, done;      /* scans asked for, and the last one answered */
  int64_t waited, asked_ms; /* the last scan a rebuild waited for; when it was asked */
  json_t *list;             /* its answer (list_checkpoints_in), or NULL before the first */
  int64_t running_since_ms; /* when the scan in progress began; 0: none runs */
  int stop, exited, orphaned;
};

static void ckpt_scan_free(struct node_ckpt_scan *cs) {
  json_decref(cs->list);
  pthread_mutex_destroy(&cs->mu);
  pthread_cond_destroy(&cs->cv);
  free(cs);
}

static void *ckpt_scan_main(void *arg) {
  struct node_ckpt_scan *cs = arg;
  pthread_mutex_lock(&cs->mu);
  while (!cs->stop) {
    if (cs->done == cs->asked) {
      pthread_cond_wait(&cs->cv, &cs->mu);
      continue;
    }
    int64_t seq = cs->asked;
    char dir[sizeof cs->dir];
    memcpy(dir, cs->dir, sizeof dir);
    cs->running_since_ms = mt_mono_ms();
    pthread_mutex_unlock(&cs->mu);
    json_t *list = list_checkpoints_in(dir);
    pthread_mutex_lock(&cs->mu);
    cs->running_since_ms = 0;
    json_decref(cs->list);
    cs->list = list;
    cs->done = seq;
    pthread_cond_broadcast(&cs->cv);
  }
  int orphaned = cs->orphaned;
  cs->exited = 1;
  pthread_cond_broadcast(&cs->cv);
  pthread_mutex_unlock(&cs->mu);
  if (orphaned) ckpt_scan_free(cs); /* node_control_stop gave up waiting for it */
  return NULL;
}

static int ckpt_scan_start(node *n) {
  struct node_ckpt_scan *cs = calloc(1, sizeof *cs);
  if (!cs) return mt_seterr(MT_ENOMEM, "control: checkpoint scan");
  pthread_mutex_init(&cs->mu, NULL);
  mt_mono_cond_init(&cs->cv);
  int e = pthread_create(&cs->thread, NULL, ckpt_scan_main, cs);
  if (e) {
    ckpt_scan_free(cs);
    return mt_seterr(MT_ENOMEM, "control: checkpoint scan thread: %s", strerror(e));
  }
  n->ckpt_scan = cs;
  return 0;
}

/* Waits up to 2 s for the scan thread; one stuck in the filesystem is left
 * to free its state when (if) it returns. */
static void ckpt_scan_stop(node *n) {
  struct node_ckpt_scan *cs = n->ckpt_scan;
  if (!cs) return;
  n->ckpt_scan = NULL;
  struct timespec until = mt_mono_deadline(2000);
  pthread_mutex_lock(&cs->mu);
  cs->stop = 1;
  pthread_cond_broadcast(&cs->cv);
  while (!cs->exited && !pthread_cond_timedwait(&cs->cv, &cs->mu, &until)) {
  }
  int exited = cs->exited;
  if (!exited) { /* detached before the unlock: once it is, the thread may free cs */
    cs->orphaned = 1;
    pthread_detach(cs->thread);
  }
  pthread_mutex_unlock(&cs->mu);
  if (exited) {
    pthread_join(cs->thread, NULL);
    ckpt_scan_free(cs);
  } else {
    mt_log_warn("control: the checkpoint directory scan has not returned in 2 s (a hung "
                "filesystem?); exiting without it");
  }
}

/* Asks for a scan of dir (cs->mu held). */
static void ckpt_scan_ask(struct node_ckpt_scan *cs, const char *dir, int64_t now_ms) {
  snprintf(cs->dir, sizeof cs->dir, "%s", dir);
  cs->asked++;
  cs->asked_ms = now_ms;
  pthread_cond_broadcast(&cs->cv);
}

/* Waits (cs->mu held) up to ms for the scan asked last; whether it is done. */
static int ckpt_scan_wait(struct node_ckpt_scan *cs, int ms) {
  struct timespec until = mt_mono_deadline(ms);
  while (cs->done < cs->asked && !pthread_cond_timedwait(&cs->cv, &cs->mu, &until)) {
  }
  return cs->done == cs->asked;
}

/* The status's last_checkpoint: a new object, or json null. */
static json_t *newest_checkpoint(node *n) {
  struct node_ckpt_scan *cs = n->ckpt_scan;
  char dir[sizeof cs->dir], key[sizeof cs->key];
  pthread_mutex_lock(&n->mu);
  ckpt_dir_of(n, dir, sizeof dir);
  snprintf(key, sizeof key, "%d %lld %d %s", n->gen, (long long)n->ckpt_step, n->ckpt_writing, dir);
  pthread_mutex_unlock(&n->mu);
  int64_t now = mt_mono_ms();
  pthread_mutex_lock(&cs->mu);
  if (strcmp(key, cs->key) || now - cs->asked_ms >= CKPT_RESCAN_MS) {
    snprintf(cs->key, sizeof cs->key, "%s", key);
    ckpt_scan_ask(cs, dir, now);
  }
  if (cs->done < cs->asked && cs->waited < cs->asked) {
    /* once per scan: behind a hung one, every rebuild would wait */
    cs->waited = cs->asked;
    ckpt_scan_wait(cs, CKPT_SCAN_WAIT_MS);
  }
  json_t *last = NULL;
  for (size_t k = json_array_size(cs->list); !last && k-- > 0;)
    if (json_is_true(json_object_get(json_array_get(cs->list, k), "latest"))) {
      last = json_deep_copy(json_array_get(cs->list, k));
      json_object_del(last, "latest");
    }
  pthread_mutex_unlock(&cs->mu);
  return last ? last : json_null();
}

/* GET /v1/checkpoints: a scan of its own, or NULL (503) when the directory
 * does not answer in time. */
static json_t *p_checkpoints(void *arg) {
  node *n = arg;
  struct node_ckpt_scan *cs = n->ckpt_scan;
  char dir[sizeof cs->dir];
  pthread_mutex_lock(&n->mu);
  ckpt_dir_of(n, dir, sizeof dir);
  pthread_mutex_unlock(&n->mu);
  int64_t now = mt_mono_ms();
  json_t *list = NULL;
  pthread_mutex_lock(&cs->mu);
  /* behind a scan that has run past the wait already, this one would too */
  int hung = cs->running_since_ms && now - cs->running_since_ms >= CKPT_LIST_WAIT_MS;
  if (!hung) {
    ckpt_scan_ask(cs, dir, now);
    if (ckpt_scan_wait(cs, CKPT_LIST_WAIT_MS)) list = json_deep_copy(cs->list);
  }
  pthread_mutex_unlock(&cs->mu);
  /* dir null: no checkpoint.dir, so none will come (mtnlgctl checkpoints says so) */
  return list ? json_pack("{s:o, s:o}", "checkpoints", list, "dir",
                          dir[0] ? json_string(dir) : json_null())
              : NULL;
}

/* The coordinator's list, plus what this node submitted that it does not list yet. */
static json_t *all_ops(node *n) {
  json_t *out = json_array();
  json_t *ops = n->cluster ? json_object_get(n->cluster, "operations") : NULL;
  size_t i, k;
  json_t *op, *mine;
  json_array_foreach(ops, i, op) json_array_append(out, op);
  json_array_foreach(n->extra_ops, k, mine) {
    const char *id = json_string_value(json_object_get(mine, "id"));
    int listed = 0;
    json_array_foreach(ops, i, op) listed |=
        id && json_equal(json_object_get(mine, "id"), json_object_get(op, "id"));
    if (!listed) json_array_append(out, mine);
  }
  return out;
}

static json_t *p_operations(void *arg) {
  node *n = arg;
  viewed(n);
  pthread_mutex_lock(&n->mu);
  json_t *ops = all_ops(n);
  pthread_mutex_unlock(&n->mu);
  return json_pack("{s:o}", "operations", ops);
}

static json_t *p_operation(void *arg, const char *id) {
  node *n = arg;
  viewed(n);
  pthread_mutex_lock(&n->mu);
  json_t *ops = all_ops(n), *found = NULL, *op;
  size_t i;
  json_array_foreach(ops, i, op) {
    const char *oid = json_string_value(json_object_get(op, "id"));
    if (oid && !strcmp(oid, id)) found = json_incref(op);
  }
  json_decref(ops);
  pthread_mutex_unlock(&n->mu);
  return found;
}

/* the control plane checks the header to the length the coordinator takes */
_Static_assert(MT_CONTROL_IDEM_KEY_MAX == MT_RDZV_IDEM_KEY_MAX,
               "an Idempotency-Key the control plane takes, the coordinator keeps");

static void p_submit(void *arg, const char *kind, json_t *args, const char *key,
                     mt_control_reply *reply) {
  node *n = arg;
  json_t *op = NULL;
  int status = 0;
  /* the coordinator answers within one round (~0.1 s); a dead one must not
   * hold the HTTP thread long */
  if (mt_rdzv_submit_op(n->store, kind, args, key, 2000, &status, &op, &reply->replayed,
                        reply->detail, sizeof reply->detail)) {
    reply->status = 503;
    /* mt_rdzv_submit_op's message says what failed, the coordinator named */
    snprintf(reply->detail, sizeof reply->detail, "%.400s", mt_errmsg());
    return;
  }
  reply->status = status;
  reply->op = op;
  if (status == 202 && op) {
    /* a retry's answer (the same Idempotency-Key) names an operation this
     * node may list already: listed once, as it stands now. One that has
     * ended is not kept to be listed: the coordinator may list it no more
     * (it keeps the newest), and an entry it never lists would stay here,
     * shown as it was, for good */
    const char *st = json_string_value(json_object_get(op, "state"));
    int pending = st && (!strcmp(st, "queued") || !strcmp(st, "running"));
    pthread_mutex_lock(&n->mu);
    size_t i;
    json_t *mine;
    json_array_foreach(n->extra_ops, i, mine) {
      if (json_equal(json_object_get(mine, "id"), json_object_get(op, "id"))) {
        json_array_remove(n->extra_ops, i);
        break;
      }
    }
    if (!reply->replayed || pending) json_array_append(n->extra_ops, op);
    pthread_mutex_unlock(&n->mu);
    mt_log_info("control: %s %s %s", kind, reply->replayed ? "answered again as" : "accepted as",
                json_string_value(json_object_get(op, "id")));
  }
}

/* ---- the loop's side ---- */

/* Whether this round fetches cluster/status: when an HTTP read waits for
 * it (viewed), else only at heartbeats, and, while no HTTP read used it for
 * 30 s and no operation of this node waits to be listed, every 10th
 * heartbeat. It holds a line per node: hundreds of nodes reading it every
 * tick moved megabytes a second through the coordinator's store, for
 * control planes nobody was reading. */
static int want_cluster_status(node *n, int heartbeat) {
  int64_t viewed = __atomic_load_n(&n->viewed_ms, __ATOMIC_RELAXED);
  pthread_mutex_lock(&n->mu);
  int waiting = json_array_size(n->extra_ops) > 0, wanted = n->cluster_wanted;
  pthread_mutex_unlock(&n->mu);
  if (wanted) return 1; /* an HTTP read waits for it: this tick */
  if (!heartbeat) return 0;
  if (!n->cluster || waiting || mt_mono_ms() - viewed < 30000 || ++n->cluster_skips >= 10) {
    n->cluster_skips = 0;
    return 1;
  }
  return 0;
}

void node_control_round(node *n, int heartbeat) {
  int rc = 0;
  json_t *cl = want_cluster_status(n, heartbeat) ? mt_rdzv_cluster_status(n->store, &rc) : NULL;
  if (cl) {
    pthread_mutex_lock(&n->mu);
    json_decref(n->cluster);
    n->cluster = cl;
    n->cluster_ms = mt_mono_ms();
    n->cluster_wanted = 0;
    pthread_cond_broadcast(&n->cluster_cv);
    /* drop what the coordinator now lists */
    json_t *ops = json_object_get(cl, "operations"), *mine, *op;
    size_t i, k;
    for (k = 0; k < json_array_size(n->extra_ops);) {
      mine = json_array_get(n->extra_ops, k);
      int listed = 0;
      json_array_foreach(ops, i, op) listed |=
          json_equal(json_object_get(op, "id"), json_object_get(mine, "id"));
      if (listed)
        json_array_remove(n->extra_ops, k);
      else
        k++;
    }
    pthread_mutex_unlock(&n->mu);
  }
  /* a node without ranks follows the steps world rank 0's node publishes */
  if (!n->engine_running && n->gen > 0 && n->state != N_EXITING) {
    char key[64];
    snprintf(key, sizeof key, "gen/%d/step", n->gen);
    if (mt_store_check(n->store, key) == 1) {
      void *v;
      size_t bytes;
      if (!mt_store_get(n->store, key, &v, &bytes, 500)) {
        json_t *j = json_loads(v, 0, NULL);
        free(v);
        int64_t step = j ? json_integer_value(json_object_get(j, "step")) : 0;
        pthread_mutex_lock(&n->mu);
        int newer = step > (n->have_last ? n->last.step : 0) || n->last_gen != n->gen;
        pthread_mutex_unlock(&n->mu);
        if (j && newer) {
          mt_step_stats st = {.step = step};
          st.consumed_tokens = json_integer_value(json_object_get(j, "consumed_tokens"));
          /* null: not finite (an overflowed fp16 step) */
          json_t *lv = json_object_get(j, "loss"), *gv = json_object_get(j, "grad_norm");
          st.loss = json_is_number(lv) ? json_number_value(lv) : NAN;
          st.lr = json_number_value(json_object_get(j, "lr"));
          st.grad_norm = json_is_number(gv) ? json_number_value(gv) : NAN;
          st.step_ms = json_number_value(json_object_get(j, "step_ms"));
          st.tokens_per_s = json_number_value(json_object_get(j, "tokens_per_s"));
          st.tflops = json_number_value(json_object_get(j, "tflops"));
          st.bubble = json_number_value(json_object_get(j, "bubble"));
          st.comm_ms = json_number_value(json_object_get(j, "comm_ms"));
          json_t *vl = json_object_get(j, "val_loss");
          if (vl) st.has_val = 1, st.val_loss = json_number_value(vl);
          json_t *fv = json_object_get(j, "final_val_loss"), *tl = json_object_get(j, "test_loss");
          if (fv) st.has_final_val = 1, st.final_val_loss = json_number_value(fv);
          if (tl) st.has_test = 1, st.test_loss = json_number_value(tl);
          json_t *pn = json_object_get(j, "params_norm"); /* null: not finite */
          if (pn)
            st.has_params_norm = 1,
            st.params_norm = json_is_number(pn) ? json_number_value(pn) : NAN;
          json_t *nz = json_object_get(j, "num_zeros");
          if (nz) st.has_num_zeros = 1, st.num_zeros = json_integer_value(nz);
          node_timers_from_json(&st, (int)json_integer_value(json_object_get(j, "timing_level")),
                                json_object_get(j, "timers"));
          st.skipped_total = json_integer_value(json_object_get(j, "skipped_total"));
          st.global_batch = (int)json_integer_value(json_object_get(j, "global_batch"));
          json_t *ls = json_object_get(j, "loss_scale");
          if (ls) st.loss_scaling = 1, st.loss_scale = json_number_value(ls);
          st.exit_at = json_number_value(json_object_get(j, "exit_at")); /* 0: none */
          node_history_add(n, &st);
        }
        json_decref(j);
      }
    }
    /* and the pass under way, until the step it follows comes (a job
     * that validates: the others' nodes ask the store nothing more) */
    snprintf(key, sizeof key, "gen/%d/eval", n->gen);
    json_t *ev = NULL;
    void *v;
    size_t bytes;
    int validates = n->have_run_job && n->run_job.eval.interval > 0;
    if (validates && mt_store_check(n->store, key) == 1 &&
        !mt_store_get(n->store, key, &v, &bytes, 500)) {
      ev = json_loadb(v, bytes, 0, NULL);
      free(v);
    }
    mt_eval_progress p;
    double elapsed;
    pthread_mutex_lock(&n->mu);
    int64_t shown = n->have_last && n->last_gen == n->gen ? n->last.step : 0;
    n->evaluating = ev && !node_eval_from_json(ev, &p, &elapsed) && p.step > shown;
    if (n->evaluating) {
      n->eval = p;
      n->eval_started_ms = mt_mono_ms() - (int64_t)(elapsed * 1e3);
      if (p.done > 0) n->eval_batch_ms = 1e3 * elapsed / p.done;
    }
    pthread_mutex_unlock(&n->mu);
    json_decref(ev);
  }
  if (heartbeat) {
    pthread_mutex_lock(&n->mu);
    int64_t step = n->have_last ? n->last.step : 0;
    int paused = n->paused, writing = n->ckpt_writing;
    int64_t resumed = n->engine_running ? n->resumed_step : -1;
    /* this node's last save, which the coordinator passes on to every node
     * (a spare's status shows the cluster's) */
    json_t *save =
        !writing && n->ckpt_step > 0
            ? json_pack("{s:I, s:b, s:I, s:o}", "step", (json_int_t)n->ckpt_step, "failed",
                        n->ckpt_failed, "failures", (json_int_t)n->ckpt_failures, "error",
                        n->ckpt_failed ? json_string(n->ckpt_error) : json_null())
            : NULL;
    pthread_mutex_unlock(&n->mu);
    const char *state = mt_node_state_names[n->state];
    if (n->state == N_RUNNING && paused)
      state = "paused";
    else if (n->state == N_RUNNING && writing)
      state = "checkpointing"; /* a running job's: a paused one's save shows as paused */
    json_t *me = json_pack("{s:s, s:I, s:I, s:i, s:s}", "state", state, "memory_bytes",
                           (json_int_t)mt_proc_memory(NULL), "step", (json_int_t)step, "pid",
                           (int)getpid(), "control_url", n->control_url);
    /* the coordinator's last_restart says where a restarted generation resumed */
    json_object_set_new(me, "generation", json_integer(n->gen));
    if (resumed >= 0) json_object_set_new(me, "resumed_step", json_integer(resumed));
    if (save) json_object_set_new(me, "last_save", save);
    mt_rdzv_publish_node_status(n->store, n->cfg->name, me);
  }
}

/* A GPU's bf16 GEMM rate, for MFU on GPUs (gpu_bench's denominator):
 * linear_fwd of 4096² bf16 weights and inputs into fp32 through the CUDA
 * ops (one cuBLASLt GEMM), best of three after a warm-up, once at start-up
 * (well under a second); 0, which leaves MFU out, when the device cannot
 * be opened or the product fails. */
static double measure_gpu_peak_flops(const char *spec) {
  mt_device d;
  if (mt_device_open(&d, spec)) {
    mt_log_warn("MFU: %s for its GEMM rate: %s", spec, mt_errmsg());
    return 0;
  }
  d.matmul = MT_MATMUL_BF16;
  int N = 4096;
  size_t nn = (size_t)N * N;
  void *w = mt_device_alloc(&d, nn * 2), *x = mt_device_alloc(&d, nn * 2);
  float *y = mt_device_alloc(&d, nn * sizeof(float));
  double best = 0;
  if (w && x && y) {
    mt_device_memset0(&d, w, nn * 2);
    mt_device_memset0(&d, x, nn * 2);
    for (int r = 0; r < 4; r++) {
      double t0 = mt_mono_s();
      d.ops->linear_fwd(&d, y, MT_F32, x, MT_BF16, w, MT_BF16, NULL, NULL, N, N, N);
      if (mt_device_sync(&d)) break;
      double s = mt_mono_s() - t0;
      if (r > 0 && s > 0 && 2.0 * N * N * N / s > best) best = 2.0 * N * N * N / s;
    }
  }
  if (!best) mt_log_warn("MFU: no GEMM rate measured on %s: %s", spec, mt_errmsg());
  mt_device_free(&d, w), mt_device_free(&d, x), mt_device_free(&d, y);
  mt_device_close(&d);
  return best;
}

/* The MFU base of one device: on GPUs their bf16 GEMM rate (the first
 * GPU's); on the CPU the sgemm rate of one device's share of the cores, a
 * 1024^3 product a few times, best of them, once at start-up (~0.1 s). */
static double measure_peak_flops(const char *spec, int devices) {
  if (!strncmp(spec, "cuda", 4)) return measure_gpu_peak_flops(spec);
  if (mt_blas_load()) return 0;
  int N = 1024;
  float *a = calloc((size_t)N * N, sizeof *a), *b = calloc((size_t)N * N, sizeof *b),
        *c = calloc((size_t)N * N, sizeof *c);
  double best = 0;
  for (int r = 0; a && b && c && r < 3; r++) {
    double t0 = mt_mono_s();
    mt_sgemm(MT_BLAS_ROW_MAJOR, MT_BLAS_NO_TRANS, MT_BLAS_TRANS, N, N, N, 1.0f, a, N, b, N, 0.0f, c,
             N);
    double s = mt_mono_s() - t0;
    if (s > 0 && 2.0 * N * N * N / s > best) best = 2.0 * N * N * N / s;
  }
  free(a), free(b), free(c);
  return devices > 0 ? best / devices : best;
}

static int read_token(node *n) {
  const char *path = n->cfg->token_file;
  if (!path[0]) return 0;
  size_t len, off, bad_at;
  int rc = mt_read_secret_file(path, "control.token_file", "can pause, stop or resize the job",
                               n->token, MT_CONTROL_TOKEN_MAX + 1, &len);
  /* mtnlgctl's rule (mt_token_word): a token it would refuse to send
   * would leave nobody able to authenticate */
  if (!rc && mt_token_word(n->token, len, &off, &len, &bad_at)) {
    char why[160];
    mt_token_word_why(n->token, bad_at, why, sizeof why);
    explicit_bzero(n->token, sizeof n->token);
    return mt_seterr(MT_EINVAL,
                     "control.token_file %s: %s; mtnlgctl refuses to send such a token: write "
                     "the token alone, one word of printable ASCII on one line",
                     path, why);
  }
  if (!rc) {
    memmove(n->token, n->token + off, len);
    n->token[len] = 0;
  }
  if (n->cfg->reads_need_token && (rc == MT_ENOENT || (!rc && !len)))
    return mt_seterr(MT_EINVAL,
                     "control.reads_need_token is yes but control.token_file %s %s: every read "
                     "would be refused; write the token there or set reads_need_token = no",
                     path, rc ? "does not exist" : "is empty");
  if (rc == MT_ENOENT) {
    mt_log_warn("control.token_file %s does not exist: mutations are refused (401) until it "
                "does and the daemon restarts",
                path);
    return 0;
  }
  if (rc) return rc;
  if (!len) mt_log_warn("control.token_file %s is empty: mutations are refused (401)", path);
  return 0;
}

/* control.tls_cert and control.tls_key, when set: PEM text for HTTPS. */
enum { TLS_PEM_MAX = 256 * 1024 };
static int read_tls(node *n) {
  if (!n->cfg->tls_cert[0]) return 0;
  size_t len;
  n->tls_cert = malloc(TLS_PEM_MAX + 2);
  n->tls_key = malloc(TLS_PEM_MAX + 2);
  if (!n->tls_cert || !n->tls_key) return mt_seterr(MT_ENOMEM, "control: TLS");
  int rc = mt_read_secret_file(n->cfg->tls_cert, "control.tls_cert", NULL, n->tls_cert, TLS_PEM_MAX,
                               &len);
  if (!rc && !len)
    rc = mt_seterr(MT_EINVAL, "control.tls_cert %s is empty: HTTPS needs the certificate",
                   n->cfg->tls_cert);
  if (!rc) strcpy(n->tls_cert + len, "\n"); /* the PEM's last line, its newline back */
  if (!rc)
    rc = mt_read_secret_file(n->cfg->tls_key, "control.tls_key",
                             "can pose as this daemon's control plane", n->tls_key, TLS_PEM_MAX,
                             &len);
  if (!rc && !len)
    rc = mt_seterr(MT_EINVAL, "control.tls_key %s is empty: HTTPS needs the certificate's key",
                   n->cfg->tls_key);
  if (!rc) strcpy(n->tls_key + len, "\n");
  if (rc) {
    explicit_bzero(n->tls_key, TLS_PEM_MAX + 2);
    free(n->tls_key);
    free(n->tls_cert);
    n->tls_key = n->tls_cert = NULL;
  }
  return rc;
}

int node_control_start(node *n) {
  pthread_mutex_init(&n->status_cache_mu, NULL);
  mt_mono_cond_init(&n->cluster_cv);
  n->history = calloc(NODE_HISTORY, sizeof *n->history);
  n->extra_ops = json_array();
  if (!n->history || !n->extra_ops) return mt_seterr(MT_ENOMEM, "control: history");
  n->peak_flops = measure_peak_flops(n->specs[0], n->n_devices);
  int rc = read_token(n);
  if (!rc) rc = read_tls(n);
  if (!rc) rc = ckpt_scan_start(n);
  if (rc) return rc;
  mt_control_opts co = {.listen = n->cfg->control_listen,
                        .token = n->token,
                        .reads_need_token = n->cfg->reads_need_token,
                        .provider = {.status = p_status,
                                     .history = p_history,
                                     .checkpoints = p_checkpoints,
                                     .operations = p_operations,
                                     .operation = p_operation,
                                     .submit = p_submit,
                                     .arg = n},
                        .tls_cert_pem = n->tls_cert,
                        .tls_key_pem = n->tls_key};
  rc = mt_control_start(&co, &n->control);
  if (rc) return mt_wraperr(rc, "control plane on %s", n->cfg->control_listen);
  char host[256];
  int port;
  mt_parse_host_port(n->cfg->control_listen, host, sizeof host, &port);
  int bound = mt_control_port(n->control);
  /* a wildcard listener is advertised under the host's name: other nodes'
   * dashboards link to it, and 127.0.0.1 or [::] would be the reader's own
   * machine (a loopback listener stays loopback) */
  if (!host[0] || !strcmp(host, "0.0.0.0") || !strcmp(host, "::")) {
    char name[256] = "";
    if (gethostname(name, sizeof name - 1) || !name[0]) snprintf(name, sizeof name, "127.0.0.1");
    snprintf(host, sizeof host, "%s", name);
  }
  snprintf(n->control_url, sizeof n->control_url, "%s://%s%s%s:%d", n->tls_cert ? "https" : "http",
           strchr(host, ':') ? "[" : "", host, strchr(host, ':') ? "]" : "", bound);
  mt_log_info("control plane and dashboard on %s/ (mutations %s)", n->control_url,
              n->token[0] ? "need the bearer token" : "refused: no token configured");
  return 0;
}

void node_control_stop(node *n) {
  mt_control_stop(n->control);
  n->control = NULL;
  ckpt_scan_stop(n);
  if (n->tls_key) explicit_bzero(n->tls_key, TLS_PEM_MAX + 2);
  free(n->tls_key);
  free(n->tls_cert);
  n->tls_key = n->tls_cert = NULL;
  json_decref(n->cluster);
  json_decref(n->extra_ops);
  json_decref(n->status_cache);
  n->status_cache = NULL;
  pthread_mutex_destroy(&n->status_cache_mu);
  pthread_cond_destroy(&n->cluster_cv);
  free(n->history);
  n->cluster = n->extra_ops = NULL;
  n->history = NULL;
}
