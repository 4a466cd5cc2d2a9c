/* node.c — the node daemon's life: host or dial the store, join, wait for a
 * generation, run this node's ranks, report, end. One libuv loop drives it.
 * A coordinator elected through etcd is node_etcd.c's; the control plane
 * node_control.c's. */
#include "node.h"
#include "node_int.h"

#include <errno.h>
#include <ifaddrs.h>
#include <limits.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <systemd/sd-daemon.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include "device.h"
#include "election.h"
#include "err.h"
#include "fileio.h"
#include "job.h"
#include "local.h"
#include "log.h"
#include "monotime.h"
#include "mt_config.h"
#include "notify.h"
#include "rdzv.h"
#include "steplog.h"
#include "store_client.h"
#include "store_etcd.h"
#include "store_server.h"

/* How long a node's end waits for systemd to take its last notifications
 * (its status and STOPPING=1); a PID 1 held up longer does not hold the
 * exit. */
#define NODE_NOTIFY_FLUSH_MS 1000

const char *const mt_node_state_names[] = {"joining", "waiting",  "spare",  "running",
                                           "ending",  "draining", "exiting"};

static void set_state(node *n, node_state s) {
  if (n->state == s) return;
  n->state = s;
  mt_log_debug("node %s: %s", n->cfg->name, mt_node_state_names[s]);
  mt_notify_status(n->notify, "%s, generation %d", mt_node_state_names[s], n->gen);
}

static void finish(node *n, int code) {
  n->exit_code = code;
  set_state(n, N_EXITING);
  uv_stop(&n->loop);
}

/* ---- the store: failures count against the heartbeat timeout ---- */

/* The coordinator is gone (why): the generation ends on this node, its
 * ranks are aborted, and the daemon exits 1 (systemd starts it again and it
 * joins whoever coordinates then). */
void node_coordinator_lost(node *n, const char *why) {
  pthread_mutex_lock(&n->mu); /* the end as the control plane shows it */
  snprintf(n->end_reason, sizeof n->end_reason, "coordinator lost: %s", why);
  n->end_seen = n->end_final = 1, n->end_ok = 0;
  n->coord_lost = 1;
  pthread_mutex_unlock(&n->mu);
  mt_log_error("%s", n->end_reason);
  if (n->engine_running && !n->aborted_ms) {
    mt_local_abort(n->local);
    n->aborted_ms = mt_mono_ms();
  }
  if (!n->engine_running) finish(n, 1);
}

/* Called after each round of store calls: rc < 0 means the coordinator could
 * not be reached; silent past the heartbeat timeout, it is lost. */
static void store_result(node *n, int rc) {
  if (rc >= 0) {
    n->store_failing_since_ms = 0;
    return;
  }
  int64_t t = mt_mono_ms();
  n->store_failed = 1; /* the next round reads coord/instance first (check_coordinator) */
  if (!n->store_failing_since_ms) {
    n->store_failing_since_ms = t;
    mt_log_warn("store at %s: %s", n->store_name, mt_errmsg());
  }
  if (t - n->store_failing_since_ms > n->cfg->heartbeat_timeout_ms) {
    char why[800];
    snprintf(why, sizeof why, "the store at %s did not answer for %.1f s", n->store_name,
             (t - n->store_failing_since_ms) / 1000.0);
    node_coordinator_lost(n, why);
  }
}

/* A coordinator that restarted sooner than the heartbeat timeout hosts a
 * new, empty store, which this node's client reconnects to without an
 * error: the generation this node waits on is gone with the old store, and
 * the new one may reuse its number. So after each new connection the
 * client makes, and first thing in the round after a store call failed (so
 * that a restart is found before this round writes into the new store),
 * coord/instance (drawn at each start of the coordinator) is read again,
 * and another instance than the one this node joined under is the
 * coordinator lost. Not there yet (a store just started): read next round.
 * Before the node joins, the instance fences both of its clients
 * (fence_to_coordinator, mt_store_tcp_fence): a connection made in the
 * middle of a round checks it before anything is sent on it, so no write of
 * this node lands in the new store, and a fenced client is the coordinator
 * lost here. */
static void check_coordinator(node *n) {
  if (n->etcd_root && node_etcd_check_term(n)) return;
  mt_store_tcp_stats st;
  if (n->coord_lost || mt_store_tcp_get_stats(n->store, &st)) return;
  if (st.fenced) { /* a new connection found another instance before it wrote */
    char why[800];
    snprintf(why, sizeof why,
             "the coordinator at %s restarted (its store is not instance %s): generation %d "
             "is gone with its store",
             n->store_name, n->coord_instance, n->gen);
    node_coordinator_lost(n, why);
    return;
  }
  if (st.connects == n->coord_connects && !n->store_failed) return;
  void *v;
  size_t bytes;
  if (mt_store_get(n->store, MT_RDZV_COORD_INSTANCE_KEY, &v, &bytes, 0)) return;
  n->store_failed = 0;
  char got[sizeof n->coord_instance];
  snprintf(got, sizeof got, "%.*s", (int)(bytes < sizeof got ? bytes : sizeof got - 1),
           (const char *)v);
  free(v);
  n->coord_connects = st.connects;
  if (strcmp(got, n->coord_instance)) { /* read before joining (fence_to_coordinator) */
    char why[800];
    snprintf(why, sizeof why,
             "the coordinator at %s restarted (instance %s, not %s): generation %d is gone "
             "with its store",
             n->store_name, got, n->coord_instance, n->gen);
    node_coordinator_lost(n, why);
  }
}

/* The coordinator this node joins is the one whose coord/instance its
 * client reads now (a follower may get there before the host wrote it: it
 * waits up to the heartbeat timeout); the client is fenced to it from here
 * on, so the join and everything after go to that store only. */
static int fence_to_coordinator(node *n) {
  void *v;
  size_t bytes;
  int rc =
      mt_store_get(n->store, MT_RDZV_COORD_INSTANCE_KEY, &v, &bytes, n->cfg->heartbeat_timeout_ms);
  if (rc == MT_ETIMEDOUT)
    return mt_seterr(MT_EIO,
                     "the store at %s has no %s after %d ms: its coordinator has not written "
                     "it (an mtnlgd that does not, or not an mtnlgd store)",
                     n->store_name, MT_RDZV_COORD_INSTANCE_KEY, n->cfg->heartbeat_timeout_ms);
  if (rc) return mt_wraperr(rc, "reading %s", MT_RDZV_COORD_INSTANCE_KEY);
  if (!bytes || bytes >= sizeof n->coord_instance) {
    free(v);
    return mt_seterr(MT_ECORRUPT, "the store at %s holds a %s of %zu bytes, not 16", n->store_name,
                     MT_RDZV_COORD_INSTANCE_KEY, bytes);
  }
  memcpy(n->coord_instance, v, bytes);
  n->coord_instance[bytes] = 0;
  rc = mt_store_tcp_fence(n->store, MT_RDZV_COORD_INSTANCE_KEY, v, bytes);
  free(v);
  mt_store_tcp_stats st;
  if (!rc && !mt_store_tcp_get_stats(n->store, &st)) n->coord_connects = st.connects;
  return rc;
}

/* ---- the engine ---- */

static void on_step(const mt_step_stats *st, void *arg) {
  node *n = arg;
  /* the line first: a status read while the store write below is on its
   * way then never shows a step whose line is not out yet */
  mt_steplog(&n->steplog, st, n->run_job.train.steps, n->run_job.train.log_interval,
             !strcmp(n->cfg->log_format, "json"));
  /* its passes, if any, are on its line; cleared first, so that no status
   * shows this step still evaluating */
  pthread_mutex_lock(&n->mu);
  n->evaluating = 0;
  pthread_mutex_unlock(&n->mu);
  node_history_add(n, st);
  if (!n->memory_logged) {
    const char *gpus[MT_RDZV_MAX_DEVICES];
    for (int i = 0; i < n->n_devices; i++) gpus[i] = n->specs[i];
    mt_log_memory(gpus, n->n_devices, st);
    n->memory_logged = 1;
  }
  if (n->holds_rank0) { /* nodes without ranks follow the steps from here */
    char key[64];
    snprintf(key, sizeof key, "gen/%d/step", n->gen);
    /* an overflowed fp16 step has an infinite norm, which JSON cannot hold: null */
    json_t *j =
        json_pack("{s:I, s:I, s:o, s:f, s:o, s:f, s:f, s:f, s:f, s:f}", "step",
                  (json_int_t)st->step, "consumed_tokens", (json_int_t)st->consumed_tokens, "loss",
                  isfinite(st->loss) ? json_real(st->loss) : json_null(), "lr", st->lr, "grad_norm",
                  isfinite(st->grad_norm) ? json_real(st->grad_norm) : json_null(), "step_ms",
                  st->step_ms, "tokens_per_s", st->tokens_per_s, "tflops", st->tflops, "bubble",
                  st->bubble, "comm_ms", st->comm_ms);
    if (st->has_val) json_object_set_new(j, "val_loss", json_real(st->val_loss));
    if (st->has_final_val) json_object_set_new(j, "final_val_loss", json_real(st->final_val_loss));
    if (st->has_test) json_object_set_new(j, "test_loss", json_real(st->test_loss));
    if (st->has_params_norm)
      json_object_set_new(j, "params_norm",
                          isfinite(st->params_norm) ? json_real(st->params_norm) : json_null());
    if (st->has_num_zeros) json_object_set_new(j, "num_zeros", json_integer(st->num_zeros));
    if (st->timing_level > 0) {
      json_object_set_new(j, "timing_level", json_integer(st->timing_level));
      json_object_set_new(j, "timers", node_timers_json(st));
    }
    json_object_set_new(j, "skipped_total", json_integer(st->skipped_total));
    json_object_set_new(j, "global_batch", json_integer(st->global_batch));
    if (st->loss_scaling) json_object_set_new(j, "loss_scale", json_real(st->loss_scale));
    if (st->exit_at > 0) json_object_set_new(j, "exit_at", json_real(st->exit_at));
    char *text = j ? json_dumps(j, JSON_COMPACT) : NULL;
    if (text) mt_store_set(n->store, key, text, strlen(text));
    free(text);
    json_decref(j);
  }
  mt_tboard_step(n->tboard, st); /* NULL without one */
  mt_notify_status(n->notify, "running generation %d: step %lld/%lld, loss %.4f", n->gen,
                   (long long)st->step, (long long)n->run_job.train.steps, st->loss);
}

/* A validation or test pass of this node's ranks goes on: the status
 * shows it until the step it follows is reported (on_step) or the
 * generation ends. */
static void on_eval(const mt_eval_progress *p, void *arg) {
  node *n = arg;
  int64_t now = mt_mono_ms();
  pthread_mutex_lock(&n->mu);
  if (!p->done) n->eval_started_ms = now;
  n->eval = *p;
  n->evaluating = 1;
  double elapsed_s = (now - n->eval_started_ms) / 1e3;
  if (p->done > 0) n->eval_batch_ms = 1e3 * elapsed_s / p->done;
  pthread_mutex_unlock(&n->mu);
  mt_evallog_progress(&n->evallog, p, now, MT_EVALLOG_EVERY_MS);
  /* told at the pass's start, its end and at most once a second between */
  if (p->done && p->done < p->total && now - n->eval_told_ms < 1000) return;
  n->eval_told_ms = now;
  /* systemctl status (the step's line takes over once it is reported) */
  char name[96];
  mt_notify_status(n->notify, "running generation %d: %s: batch %d of %d", n->gen,
                   mt_eval_pass_name(name, sizeof name, p), p->done, p->total);
  /* and nodes without ranks show it from the store */
  if (n->holds_rank0) {
    char key[64];
    snprintf(key, sizeof key, "gen/%d/eval", n->gen);
    json_t *j = node_eval_json(p, elapsed_s);
    char *text = j ? json_dumps(j, JSON_COMPACT) : NULL;
    if (text) mt_store_set(n->store, key, text, strlen(text));
    free(text);
    json_decref(j);
  }
}

static void on_resumed(int64_t step, void *arg) {
  node *n = arg;
  pthread_mutex_lock(&n->mu);
  n->resumed_step = step;
  pthread_mutex_unlock(&n->mu);
}

static void on_stopped(int64_t step, int why, const char *save_failed, int64_t saved, void *arg) {
  node *n = arg;
  pthread_mutex_lock(&n->mu);
  n->stopped_step = step;
  n->stopped_why = why;
  /* bounded, so that the report's reason keeps its end ("the newest
   * checkpoint ...") within what the coordinator keeps of it */
  snprintf(n->stop_unsaved, sizeof n->stop_unsaved, "%s", save_failed ? save_failed : "");
  mt_msg_cut_whole(n->stop_unsaved, sizeof n->stop_unsaved);
  if (save_failed && !n->stop_unsaved[0])
    snprintf(n->stop_unsaved, sizeof n->stop_unsaved, "(no reason given)");
  n->stop_saved = saved;
  pthread_mutex_unlock(&n->mu);
}

/* Tells the coordinator that order seq acted after step (ok, or why not).
 * The coordinator holds every later order but a stop until it hears, so a
 * word the store did not take (a blip on the loop's connection) is kept
 * and sent again each round (resend_acted), not dropped: a lost pause's
 * word left the job paused with its operation running for good. Called on
 * a rank thread. */
static void tell_acted(node *n, int64_t seq, int64_t step, int ok, const char *reason) {
  pthread_mutex_lock(&n->mu);
  int lost = n->coord_lost;
  pthread_mutex_unlock(&n->mu);
  if (lost || !mt_rdzv_acted(n->store, n->gen, seq, step, ok, reason)) return;
  mt_log_warn("cannot tell the coordinator order %lld acted yet (%s): trying again", (long long)seq,
              mt_errmsg());
  pthread_mutex_lock(&n->mu);
  if (n->n_acted < (int)(sizeof n->acted / sizeof n->acted[0])) {
    struct node_acted *a = &n->acted[n->n_acted++];
    a->gen = n->gen, a->ok = ok, a->seq = seq, a->step = step;
    snprintf(a->reason, sizeof a->reason, "%s", reason ? reason : "");
    mt_msg_cut_whole(a->reason, sizeof a->reason); /* else the JSON would fail every round */
  } else {
    mt_log_error("order %lld's word is dropped: %d others wait to be sent", (long long)seq,
                 n->n_acted);
  }
  pthread_mutex_unlock(&n->mu);
}

/* The loop's round: the words tell_acted kept, oldest first, until one is
 * refused again (an ended generation's are dropped: nobody waits for them). */
static void resend_acted(node *n) {
  pthread_mutex_lock(&n->mu);
  int k = n->coord_lost ? 0 : n->n_acted;
  struct node_acted a[sizeof n->acted / sizeof n->acted[0]];
  memcpy(a, n->acted, (size_t)k * sizeof *a);
  pthread_mutex_unlock(&n->mu);
  int done = 0;
  for (; done < k; done++) {
    if (a[done].gen != n->gen) continue;
    int rc =
        mt_rdzv_acted(n->store, a[done].gen, a[done].seq, a[done].step, a[done].ok, a[done].reason);
    store_result(n, rc);
    if (rc) break;
    mt_log_info("told the coordinator order %lld acted", (long long)a[done].seq);
  }
  if (!done) return;
  pthread_mutex_lock(&n->mu); /* a rank thread may have added more meanwhile */
  memmove(n->acted, n->acted + done, (size_t)(n->n_acted - done) * sizeof *n->acted);
  n->n_acted -= done;
  pthread_mutex_unlock(&n->mu);
}

/* An order took effect after step: pause and resume change what this node
 * reports; world rank 0's node tells the coordinator where it acted. */
static void on_order(int kind, int64_t seq, int64_t step, void *arg) {
  node *n = arg;
  static const char *const kinds[] = {"none", "pause", "resume", "stop", "checkpoint", "resize"};
  mt_log_info("generation %d: order %lld (%s) took effect after step %lld", n->gen, (long long)seq,
              kind >= 0 && kind <= 5 ? kinds[kind] : "?", (long long)step);
  pthread_mutex_lock(&n->mu); /* read by the loop thread's heartbeat */
  if (kind == MT_ORDER_PAUSE) n->paused = 1;
  if (kind == MT_ORDER_RESUME) n->paused = 0;
  pthread_mutex_unlock(&n->mu);
  mt_notify_status(n->notify, "%s after step %lld, generation %d",
                   kind == MT_ORDER_PAUSE  ? "paused"
                   : kind == MT_ORDER_STOP ? "stopping"
                                           : "running",
                   (long long)step, n->gen);
  /* a checkpoint is reported when it is committed (on_checkpoint) */
  if (kind != MT_ORDER_CHECKPOINT && kind != MT_ORDER_RESIZE && n->holds_rank0)
    tell_acted(n, seq, step, 1, NULL);
}

/* A checkpoint starts (phase 0) or ends (phase 1) on this node's ranks. */
static void on_checkpoint(int phase, int64_t step, int rc, const char *msg,
                          const mt_checkpoint_result *res, int64_t order_seq, void *arg) {
  node *n = arg;
  if (phase == 0 || res) { /* without res no save ran: an order's word only */
    pthread_mutex_lock(&n->mu);
    n->ckpt_writing = phase == 0;
    n->ckpt_step = step;
    if (phase == 1 && !rc) {
      n->ckpt_bytes = res->bytes;
      n->ckpt_seconds = res->seconds;
    }
    /* a save that failed is told as one, not as the last good one's figures */
    if (phase == 1) {
      n->ckpt_failed = rc != 0;
      n->ckpt_failures += rc != 0;
      snprintf(n->ckpt_error, sizeof n->ckpt_error, "%s", rc && msg ? msg : "");
      mt_msg_cut_whole(n->ckpt_error, sizeof n->ckpt_error); /* else no status carries it */
    }
    pthread_mutex_unlock(&n->mu);
  }
  if (phase == 1 && order_seq && n->holds_rank0) tell_acted(n, order_seq, step, rc == 0, msg);
}

static void *engine_wait(void *arg) {
  node *n = arg;
  n->engine_rc = mt_local_wait(n->local);
  if (n->engine_rc) snprintf(n->engine_err, sizeof n->engine_err, "%s", mt_errmsg());
  __atomic_store_n(&n->ranks_ended, 1, __ATOMIC_RELEASE); /* what is left is the close */
  /* here, not on the loop: NCCL's finalize would hold up its heartbeats
   * and the systemd watchdog */
  mt_local_close(n->local);
  uv_async_send(&n->engine_done);
  return NULL;
}

/* A generation formed after a failure: world rank 0's node says where its
 * ranks will pick up (the engine logs the step it resumed from). */
static void log_restart_point(node *n) {
  mt_ckpt_entry *list = NULL;
  size_t count = 0;
  if (!n->ckpt_job_dir[0]) {
    mt_log_warn("generation %d (restart %d): the job has no checkpoint.dir: training restarts from "
                "step 0",
                n->gen, n->asg.restart);
  } else if (mt_ckpt_list(n->ckpt_job_dir, &list, &count) || !count) {
    mt_log_warn("generation %d (restart %d): no committed checkpoint in %s yet: training restarts "
                "from step 0",
                n->gen, n->asg.restart, n->ckpt_job_dir);
  } else {
    /* the one `latest` names, which is the newest unless its write failed */
    size_t at = count - 1;
    for (size_t i = 0; i < count; i++)
      if (list[i].latest) at = i;
    mt_log_info("generation %d (restart %d): resuming from the %s checkpoint in %s (step %lld)",
                n->gen, n->asg.restart, list[at].latest ? "latest" : "newest committed",
                n->ckpt_job_dir, (long long)list[at].step);
  }
  free(list);
}

/* The coordinator's newest order for this generation, into order_word. */
static void read_order(node *n) {
  int64_t seq;
  char kind[32];
  if (mt_rdzv_order(n->store, n->gen, &seq, kind, sizeof kind) != 1 || seq <= n->order_seq) return;
  n->order_seq = seq;
  int code = mt_order_kind_code(kind); /* the engine's MT_ORDER_* numbers */
  /* world rank 0 carries it into the step's all-reduce: every rank acts on
   * the same step boundary */
  if (code && n->holds_rank0) /* rank 0's thread reads it before a step and its all-reduce */
    __atomic_store_n(&n->order_word, mt_order_word(seq, code), __ATOMIC_RELEASE);
  if (!code) mt_log_warn("the coordinator ordered \"%s\", unknown to this version", kind);
}

static int start_engine(node *n, const mt_member *me, const char *job_json) {
  const char *preset_dirs[MT_PRESET_DIRS_MAX];
  mt_job_preset_dirs(n->cfg->presets_dir[0] ? n->cfg->presets_dir : NULL, preset_dirs);
  /* made aside, then put in place under mu: the HTTP thread reads run_job
   * and ckpt_job_dir for the status */
  mt_job *job = malloc(sizeof *job);
  if (!job) return mt_seterr(MT_ENOMEM, "the published job of generation %d", n->gen);
  int rc = mt_job_parse(job, job_json, NULL, preset_dirs, NULL);
  if (rc) {
    free(job);
    return mt_wraperr(rc, "the published job of generation %d", n->gen);
  }
  if (strcmp(job->hash, n->asg.job_hash)) {
    rc = mt_seterr(MT_ECORRUPT, "the published job reads back as %s, published as %s", job->hash,
                   n->asg.job_hash);
    free(job);
    return rc;
  }
  if (n->cfg->checkpoint_dir[0]) /* the node's storage wins over the job's */
    snprintf(job->checkpoint.dir, sizeof job->checkpoint.dir, "%s", n->cfg->checkpoint_dir);
  /* dataset indices the data's own directory cannot take */
  if (n->cfg->state_dir[0] &&
      strlen(n->cfg->state_dir) + sizeof "/index-cache" <= sizeof job->data.cache_fallback)
    memcpy(stpcpy(job->data.cache_fallback, n->cfg->state_dir), "/index-cache",
           sizeof "/index-cache");
  /* checkpoint.resume_step stays in force in every generation: a rollback
   * that is done is told by the checkpoints saved since (rolled_back_to in
   * their manifests), and a later generation goes on from those; one that
   * is not done yet (the first generation failed before it set aside the
   * newer checkpoints) is done by the next */
  int here = me->rank_end - me->rank_begin;
  if (here < 1 || here > n->n_devices) {
    free(job);
    return mt_seterr(MT_EINVAL, "assigned %d ranks, this node has %d devices", here, n->n_devices);
  }
  pthread_mutex_lock(&n->mu);
  n->run_job = *job;
  n->run_job.parallel.dp = n->asg.dp; /* this generation's width */
  n->have_run_job = 1;
  if (n->run_job.checkpoint.dir[0])
    mt_checkpoint_job_dir(&n->run_job, n->ckpt_job_dir, sizeof n->ckpt_job_dir);
  pthread_mutex_unlock(&n->mu);
  free(job);
  n->holds_rank0 = me->rank_begin == 0;
  /* world rank 0's node writes the generation's TensorBoard events (closed
   * with the generation, on_engine_done) */
  mt_tboard_free(n->tboard); /* a start that failed before its ranks ran left one */
  n->tboard = n->holds_rank0 ? mt_tboard_new(n->run_job.train.tensorboard_dir,
                                             n->run_job.train.log_timers_to_tensorboard,
                                             n->run_job.train.log_memory_to_tensorboard)
                             : NULL;
  read_order(n); /* one already there (a generation formed paused) holds step one */
  if ((rc = mt_check_memory_plan(&n->run_job, here, n->specs[0]))) return rc;
  for (int i = 0; i < here; i++) n->dev_ptrs[i] = n->specs[i];
  /* fenced to the coordinator this node joined from the first connection */
  mt_store_tcp_opts eo = {.key = n->cluster_key,
                          .key_bytes = n->cluster_key_bytes,
                          .fence_key = MT_RDZV_COORD_INSTANCE_KEY,
                          .fence_value = n->coord_instance,
                          .fence_bytes = strlen(n->coord_instance)};
  rc = mt_store_tcp_new(n->store_host, n->store_port, &eo, &n->engine_store);
  if (rc) return rc;
  snprintf(n->comm_prefix, sizeof n->comm_prefix, "gen/%d/comm", n->gen);
  __atomic_store_n(&n->stop_flag, 0, __ATOMIC_RELEASE);
  n->lo = (mt_local_opts){
      .job = &n->run_job,
      .store = n->engine_store,
      .rank_begin = me->rank_begin,
      .rank_count = here,
      .devices = n->dev_ptrs,
      .comm_prefix = n->comm_prefix,
      .node = n->cfg->name,
      .generation = n->gen,
      .omp_threads = n->cfg->cpu_threads,
      .device_kind = "cpu",
      .comm_timeout_ms = n->cfg->comm_timeout_ms,
      .export_path =
          n->run_job.checkpoint.export_path[0] ? n->run_job.checkpoint.export_path : NULL,
      .stop = &n->stop_flag,
      .order = &n->order_word,
      .on_order = on_order,
      .checkpoint_dir = n->ckpt_job_dir[0] ? n->ckpt_job_dir : NULL,
      .on_checkpoint = on_checkpoint,
      .on_step = on_step,
      .on_eval = on_eval,
      .on_resumed = on_resumed,
      .on_stopped = on_stopped,
      .arg = n,
  };
  pthread_mutex_lock(&n->mu);
  n->resumed_step = -1;
  n->stopped_step = -1;
  n->stopped_why = MT_STOPPED_ASKED;
  n->stop_unsaved[0] = 0;
  n->stop_saved = -1;
  n->exit_at = 0.0; /* this generation's world rank 0 says it again at its first step */
  pthread_mutex_unlock(&n->mu);
  mt_log_info("generation %d: ranks [%d, %d) of %d on %s..%s (tp %d x pp %d x dp %d), job %s (%s)",
              n->gen, me->rank_begin, me->rank_end, n->asg.world, n->specs[0], n->specs[here - 1],
              n->asg.tp, n->asg.pp, n->asg.dp, n->run_job.name, n->run_job.hash);
  if (n->asg.restart > 0 && me->rank_begin == 0) log_restart_point(n);
  if ((rc = mt_local_start(&n->lo, &n->local))) {
    mt_store_free(n->engine_store);
    n->engine_store = NULL;
    return rc;
  }
  n->engine_running = 1;
  n->ranks_ended = 0;
  n->ran = 1;
  if (pthread_create(&n->waiter, NULL, engine_wait, n)) {
    mt_local_abort(n->local);
    mt_local_wait(n->local);
    mt_local_free(n->local);
    n->local = NULL;
    n->engine_running = 0;
    mt_store_free(n->engine_store);
    n->engine_store = NULL;
    return mt_seterr(MT_ENOMEM, "cannot start the engine's waiter thread");
  }
  return 0;
}

/* How a failure of this node's ranks is reported: one on a peer or the
 * network (a collective that failed, timed out or was aborted, a store that
 * did not answer) or one every rank agreed may pass (MT_EAGAIN: a checkpoint
 * that could not be read) may pass in a new generation; anything else (a job
 * that cannot run here, a checkpoint of another layout) would fail again. */
static int report_kind(int rc) { return mt_err_retryable(rc) ? MT_REPORT_PEER : MT_REPORT_FAILED; }

static void leave_and_exit(node *n, int code);
static void send_report(node *n, int kind, const char *reason);

/* After this node's ranks failed: the devices this process has lost (a GPU
 * whose context a fault corrupted answers every later call with that
 * fault), "spec: reason; ..." into out ("" when none). Such a node is no
 * use to the next generation until its process starts again.
 * MTNLG_TEST_DEVICE_LOST=SPEC makes the node take that device for lost (the
 * cluster tests, which have no GPU to lose). */
static void lost_devices(node *n, char *out, size_t len) {
  size_t used = 0;
  out[0] = '\0';
  const char *test = getenv("MTNLG_TEST_DEVICE_LOST");
  for (int i = 0; i < n->n_devices && used < len; i++) {
    char why[256];
    int lost = mt_device_lost(n->specs[i], why, sizeof why);
    if (!lost && test && !strcmp(test, n->specs[i]))
      lost = 1, snprintf(why, sizeof why, "lost for a test (MTNLG_TEST_DEVICE_LOST)");
    if (lost) {
      int w = snprintf(out + used, len - used, "%s%s: %s", used ? "; " : "", n->specs[i], why);
      used += w > 0 ? (size_t)w : 0;
    }
  }
}

/* The ranks ended: report to the coordinator, then wait for its word. */
static void on_engine_done(uv_async_t *h) {
  node *n = h->data;
  pthread_join(n->waiter, NULL);
  mt_local_free(n->local);
  n->local = NULL;
  n->engine_running = 0;
  /* the events file closes with its generation: the next generation this
   * node holds world rank 0 in opens one of its own, which sorts after what
   * other nodes wrote meanwhile (TensorBoard reads a directory's files in
   * name order and never goes back to an earlier one), starts its session
   * at its first step, and tries again a directory an earlier one could not
   * write */
  mt_tboard_free(n->tboard);
  n->tboard = NULL;
  mt_store_free(n->engine_store);
  n->engine_store = NULL;
  if (n->said_slow)
    mt_log_info("generation %d: this node's ranks stopped %.1f s after the abort; heartbeating "
                "again",
                n->gen, (mt_mono_ms() - n->aborted_ms) / 1000.0);
  n->quiet = n->said_slow = n->was_silent = 0;
  char reason[1200];
  int failed = n->engine_rc != 0;
  int unsaved = 0;             /* stopped, but the stop's checkpoint failed */
  if (failed && n->end_seen) { /* aborted because the generation ended */
    snprintf(reason, sizeof reason, "%s", n->engine_err);
    mt_log_warn("generation %d: this node's ranks stopped with the generation: %s", n->gen, reason);
  } else if (failed) {
    snprintf(reason, sizeof reason, "%s", n->engine_err);
    mt_log_error("generation %d: this node's ranks failed: %s", n->gen, reason);
  } else {
    pthread_mutex_lock(&n->mu);
    /* where they agreed to stop, else (the end) the last step */
    int64_t step = n->stopped_step >= 0 ? n->stopped_step : n->last.step;
    int64_t resumed = n->resumed_step, saved = n->stop_saved;
    int why = n->stopped_why;
    char save_failed[sizeof n->stop_unsaved];
    memcpy(save_failed, n->stop_unsaved, sizeof save_failed);
    pthread_mutex_unlock(&n->mu);
    if (resumed >= n->run_job.train.steps)
      snprintf(reason, sizeof reason,
               "nothing to train: the checkpoint at step %lld is at or past train.steps = %lld",
               (long long)resumed, (long long)n->run_job.train.steps);
    else if (step < n->run_job.train.steps)
      mt_local_stop_reason(reason, sizeof reason, &n->run_job, step, why);
    else
      snprintf(reason, sizeof reason, NODE_COMPLETED "%lld steps",
               (long long)n->run_job.train.steps);
    /* the steps since the newest checkpoint are lost: the stop stops, but
     * it is not a clean one (reported failed on the job: the job ends
     * failed and the nodes exit 2, which systemd does not restart into the
     * training the operator or the schedule stopped) */
    unsaved = save_failed[0] != 0;
    if (unsaved) {
      size_t len = strlen(reason);
      if (saved >= 0)
        snprintf(reason + len, sizeof reason - len,
                 "; its checkpoint failed: %s; the newest checkpoint is step %lld", save_failed,
                 (long long)saved);
      else
        snprintf(reason + len, sizeof reason - len,
                 "; its checkpoint failed: %s; no checkpoint was committed", save_failed);
    }
    mt_log(unsaved ? MT_LOG_ERROR : MT_LOG_INFO, "generation %d: this node's ranks ended: %s",
           n->gen, reason);
  }
  if (n->end_seen && (n->store_failing_since_ms || n->coord_lost)) { /* nobody to tell */
    finish(n, 1);
    return;
  }
  char lost[1024] = "";
  if (failed) lost_devices(n, lost, sizeof lost);
  if (lost[0]) {
    mt_log_error("generation %d: this process has lost %s; reporting the failure, leaving the "
                 "cluster and exiting 1, so that systemd starts the daemon again and it rejoins",
                 n->gen, lost);
    snprintf(reason + strlen(reason), sizeof reason - strlen(reason),
             " (node %s lost %.400s: it restarts)", n->cfg->name, lost);
  }
  send_report(n,
              failed    ? report_kind(n->engine_rc)
              : unsaved ? MT_REPORT_FAILED
                        : MT_REPORT_DONE,
              reason);
  if (lost[0]) {
    leave_and_exit(n, 1);
    return;
  }
  set_state(n, N_ENDING);
}

/* ---- the loop's rounds ---- */

/* This node's report on its part of the generation (gen/<g>/<kind>/<name>):
 * kept until the store took it, and sent again each round (N_ENDING) if it
 * did not: the coordinator ends a generation only once every member
 * reported, so a report lost to a store hiccup held the cluster for good. */
static void send_report(node *n, int kind, const char *reason) {
  n->report_kind = kind;
  snprintf(n->report_reason, sizeof n->report_reason, "%s", reason);
  int rc = mt_rdzv_report(n->store, n->gen, n->cfg->name, kind, reason);
  n->report_pending = rc < 0;
  if (rc < 0) mt_log_warn("cannot report to the coordinator yet (%s): trying again", mt_errmsg());
  store_result(n, rc);
}

static void resend_report(node *n) {
  if (!n->report_pending) return;
  int rc = mt_rdzv_report(n->store, n->gen, n->cfg->name, n->report_kind, n->report_reason);
  if (rc >= 0) n->report_pending = 0;
  store_result(n, rc);
}

static void leave_and_exit(node *n, int code) {
  mt_rdzv_leave(n->store, n->cfg->name); /* best effort: the coordinator times out otherwise */
  /* stay answering the control plane a moment, so a client waiting on an
   * operation (mtnlgctl stop --wait) sees how it ended */
  n->exit_code = code;
  n->drain_until_ms = mt_mono_ms() + 2000;
  set_state(n, N_DRAINING);
}

/* The coordinator's word on the generation: ended, and why. */
static int poll_end(node *n) {
  int final = 0, ok = 0, job_failed = 0;
  char reason[512];
  int rc = mt_rdzv_ended(n->store, n->gen, &final, &ok, &job_failed, reason, sizeof reason);
  if (rc <= 0) return rc;
  if (!n->end_seen) {
    pthread_mutex_lock(&n->mu);
    snprintf(n->end_reason, sizeof n->end_reason, "%s", reason);
    n->end_seen = 1, n->end_final = final, n->end_ok = ok, n->end_job_failed = job_failed;
    pthread_mutex_unlock(&n->mu);
    /* a failure the coordinator re-forms from is a warning; the job's end an error */
    mt_log(ok      ? MT_LOG_INFO
           : final ? MT_LOG_ERROR
                   : MT_LOG_WARN,
           "generation %d ended: %s", n->gen, reason);
    mt_notify_status(n->notify, "generation %d ended: %s", n->gen, reason);
  }
  return 1;
}

/* A generation ended without ending the job (a resize, or a failure the
 * coordinator re-forms from): wait for the next. */
static void next_generation(node *n) {
  mt_log_info("waiting for generation %d", n->gen + 1);
  pthread_mutex_lock(&n->mu); /* the control plane's threads read gen under it */
  n->gen++;
  n->end_seen = n->end_final = n->end_ok = n->end_job_failed = 0;
  n->end_reason[0] = 0;
  n->paused = 0;
  pthread_mutex_unlock(&n->mu);
  n->order_seq = 0;
  __atomic_store_n(&n->order_word, 0, __ATOMIC_RELEASE);
  n->holds_rank0 = 0;
  n->aborted_ms = 0;
  n->engine_rc = 0;
  n->report_pending = 0;
  pthread_mutex_lock(&n->mu);
  n->ckpt_writing = 0; /* an async save the ended generation dropped */
  n->evaluating = 0;   /* a pass it ended */
  pthread_mutex_unlock(&n->mu);
  set_state(n, N_WAITING);
}

/* The generation ended and this node's ranks were aborted, but a rank may
 * not stop at once: held in a write to stalled storage, or in a collective
 * the abort cannot wake (an NCCL kernel). A stuck rank
 * must not hold the node: it exits without it (systemd restarts it, and it
 * joins again), as a survivor of a lost peer always has. Only a node that
 * was itself silent (note_silence), and so was likely declared lost and
 * left out of the re-formed cluster, waits for its ranks, up to their
 * deadline (cluster.comm_timeout_ms), quiet meanwhile (abort_ranks): it
 * heartbeats again once they stopped, to be placed later as a spare; so
 * does the coordinating node, whose exit would end the cluster. Ranks past
 * their deadline are stuck for good. */
static void wait_for_aborted_ranks(node *n) {
  int64_t waited = mt_mono_ms() - n->aborted_ms;
  int grace_ms = 2 * n->cfg->heartbeat_interval_ms + 1000;
  if (waited <= grace_ms) return;
  /* the ranks stopped and their communicators are being closed (an NCCL
   * abort can take seconds): that is no reason to leave the cluster */
  if (__atomic_load_n(&n->ranks_ended, __ATOMIC_ACQUIRE) && waited <= (int64_t)grace_ms + 60000) {
    if (!n->said_slow)
      mt_log_warn("generation %d: this node's ranks stopped; closing their communicators takes "
                  "long (%lld ms so far)",
                  n->gen, (long long)waited);
    n->said_slow = 1;
    return;
  }
  if (n->quiet && !n->end_final && waited <= (int64_t)grace_ms + n->cfg->comm_timeout_ms) {
    if (!n->said_slow)
      mt_log_warn("generation %d: this node's ranks did not stop within %d ms of the abort; "
                  "waiting for them up to cluster.comm_timeout_ms (%d ms) more, without "
                  "heartbeating",
                  n->gen, grace_ms, n->cfg->comm_timeout_ms);
    n->said_slow = 1;
    return;
  }
  /* the node that hosts the store and coordinates: its exit would take the
   * store down and every node with it (each loses its coordinator), making
   * one lost node the whole cluster's restart. It goes quiet instead, as a
   * silent node does: declared lost, it is left out of the next
   * generation, which the others form, and it waits for its ranks,
   * heartbeating again (placed again) once they stopped. Past their
   * deadline they are stuck for good: it coordinates on without them until
   * the job ends (restarting the daemon gives the node back its devices) */
  if (n->coord && !n->end_final) {
    if (!n->quiet) {
      mt_log_warn("generation %d: this node's ranks did not stop within %d ms of the abort; it "
                  "coordinates, so it stays rather than take the store down: it stops "
                  "heartbeating, to be left out of the next generation, and waits for them",
                  n->gen, grace_ms);
      n->quiet = n->said_slow = 1;
    } else if (n->said_slow < 2) { /* quiet and here: past the wait above */
      mt_log_error("generation %d: this node's ranks are stuck past cluster.comm_timeout_ms (%d "
                   "ms); it coordinates on without them until the job ends (restart the daemon "
                   "once it has, to use its devices again)",
                   n->gen, n->cfg->comm_timeout_ms);
      n->said_slow = 2;
    }
    return;
  }
  mt_log_error("this node's ranks did not stop within %lld ms of the abort; exiting without them",
               (long long)waited);
  n->abandoned = 1;
  mt_rdzv_leave(n->store, n->cfg->name);
  /* the job's end decides the code, as in N_ENDING: a job that failed on
   * its own is not started again by systemd (2) */
  /* engine_rc is the waiter's until ranks_ended says it is written */
  int failed = __atomic_load_n(&n->ranks_ended, __ATOMIC_ACQUIRE) && n->engine_rc;
  finish(n, n->end_final && n->end_ok && !failed ? 0 : n->end_final && n->end_job_failed ? 2 : 1);
}

/* The generation ended under this node's ranks: stop them now (peers may be
 * gone: do not wait out the deadline). A node that was silent, likely
 * declared lost, does not heartbeat until they stopped, so that the
 * coordinator takes it back only when it can take part: a node with ranks
 * still stuck in the ended generation would hold up the next one's start. */
static void abort_ranks(node *n) {
  mt_local_abort(n->local);
  n->aborted_ms = mt_mono_ms();
  /* back from a stop, the tick that finds the end can run before the
   * heartbeat timer that would notice the silence (note_silence). The
   * coordinator counts from the last heartbeat that reached the store, which
   * may be the round before the last one begun here: a stop that lands
   * while a heartbeat is on its way holds it until the node runs again. So
   * one interval short of the timeout is silent enough to have been
   * declared lost (a node that took itself for present exited, its ranks
   * stuck, and a cluster of two failed). */
  if (n->last_hb_ms &&
      n->aborted_ms - n->last_hb_ms > n->cfg->heartbeat_timeout_ms - n->cfg->heartbeat_interval_ms)
    n->was_silent = 1;
  n->quiet = !n->end_final && n->was_silent;
}

static void node_round(node *n) {
  int rc = 0;
  if (n->state != N_JOINING && n->state != N_DRAINING && n->state != N_EXITING)
    check_coordinator(n);
  if (n->coord_lost) { /* nothing more for its store: the ranks stop, then the daemon exits */
    if (n->state == N_RUNNING && n->aborted_ms) wait_for_aborted_ranks(n);
    return;
  }
  resend_acted(n);
  switch (n->state) {
  case N_JOINING: {
    int watch = 0;
    if (n->rejoin_at_ms) {
      if (mt_mono_ms() < n->rejoin_at_ms) break;
      if ((rc = mt_rdzv_join(n->store, &n->desc, &n->seq))) break; /* store_result counts it */
      n->rejoin_at_ms = 0;
      mt_log_info("joined %s again as join %lld", n->cfg->endpoint, (long long)n->seq);
      break;
    }
    rc = mt_rdzv_verdict(n->store, n->seq, &watch);
    int retry_ms = rc == 2 ? watch : 0; /* the coordinator's heartbeat timeout */
    if (rc == 2 && ++n->turned_away <= 3) {
      /* this daemon replaces one the coordinator still counts (a restart
       * after a crash): silent, so that it declares that one lost, then
       * again; a daemon still alive under the name keeps it, and this one
       * is refused for good on the fourth try */
      int wait_ms =
          (retry_ms > n->cfg->heartbeat_timeout_ms ? retry_ms : n->cfg->heartbeat_timeout_ms) +
          2 * n->cfg->heartbeat_interval_ms;
      mt_log_warn("the coordinator turned this node away for now: %s; joining again in %.1f s",
                  mt_errmsg(), wait_ms / 1000.0);
      n->rejoin_at_ms = mt_mono_ms() + wait_ms;
      n->seq = 0; /* a fresh join number; one whose write fails is written again */
      rc = 0;
      break;
    }
    if (rc == 2) {
      mt_log_error("the coordinator at %s still counts another daemon named %s after %d tries: "
                   "%s",
                   n->store_name, n->cfg->name, n->turned_away, mt_errmsg());
      mt_notify_status(n->notify, "refused: %s", mt_errmsg());
      finish(n, 2);
      return;
    }
    if (rc == MT_EINVAL) {
      mt_log_error("the coordinator at %s refused this node: %s", n->store_name, mt_errmsg());
      mt_notify_status(n->notify, "refused: %s", mt_errmsg());
      finish(n, 2);
      return;
    }
    if (rc == 1) {
      pthread_mutex_lock(&n->mu);
      n->gen = watch;
      pthread_mutex_unlock(&n->mu);
      mt_log_info("joined the rendezvous at %s as %s; waiting for generation %d", n->store_name,
                  n->cfg->name, watch);
      mt_notify_flags(n->notify, MT_NOTIFY_READY);
      set_state(n, N_WAITING);
    }
    break;
  }
  case N_WAITING:
  case N_SPARE: {
    if ((rc = poll_end(n)) == 1) {
      if (!n->end_final) {
        next_generation(n);
        return;
      }
      /* a job that ended without this node is not its failure; one this node
       * ran in earlier generations is, and so is one it coordinated (its
       * systemd unit says how the job ended: after a lost coordinator's
       * restart budget was spent, the node elected in its place may be the
       * only one left, and it trained nothing) */
      leave_and_exit(n, n->end_ok || (!n->ran && !n->coord) ? 0 : n->end_job_failed ? 2 : 1);
      return;
    }
    if (rc < 0 || n->state == N_SPARE) break;
    char *job_json = NULL;
    mt_assignment a = {0};
    rc = mt_rdzv_assignment(n->store, n->gen, &a, &job_json);
    if (rc != 1) {
      mt_assignment_free(&a);
      break;
    }
    pthread_mutex_lock(&n->mu); /* the status reads it on the HTTP thread */
    mt_assignment_free(&n->asg);
    n->asg = a;
    pthread_mutex_unlock(&n->mu);
    const mt_member *me = mt_assignment_find(&n->asg, n->cfg->name);
    if (!me) {
      mt_log_info("generation %d formed without this node: waiting as a spare", n->gen);
      const char *preset_dirs[MT_PRESET_DIRS_MAX];
      mt_job_preset_dirs(n->cfg->presets_dir[0] ? n->cfg->presets_dir : NULL, preset_dirs);
      pthread_mutex_lock(&n->mu);
      if (!mt_job_parse(&n->run_job, job_json, NULL, preset_dirs, NULL)) { /* for its status */
        n->run_job.parallel.dp = n->asg.dp;
        n->have_run_job = 1;
      }
      pthread_mutex_unlock(&n->mu);
      set_state(n, N_SPARE);
    } else if ((rc = start_engine(n, me, job_json))) {
      snprintf(n->engine_err, sizeof n->engine_err, "%s", mt_errmsg());
      n->engine_rc = rc;
      mt_log_error("generation %d: cannot start this node's ranks: %s", n->gen, n->engine_err);
      send_report(n, report_kind(rc), n->engine_err);
      set_state(n, N_ENDING);
    } else {
      set_state(n, N_RUNNING);
    }
    free(job_json);
    rc = 0;
    break;
  }
  case N_RUNNING: {
    if (n->aborted_ms) {
      wait_for_aborted_ranks(n);
      break;
    }
    if ((rc = poll_end(n)) == 1) {
      abort_ranks(n);
      break;
    }
    if (rc < 0) break;
    read_order(n);
    break;
  }
  case N_ENDING:
    resend_report(n);
    if ((rc = poll_end(n)) == 1 && n->end_final) {
      /* 2 when the job failed on its own: systemd (RestartPreventExitStatus)
       * does not start the node again only for the job to fail again */
      leave_and_exit(n, n->end_ok && !n->engine_rc ? 0 : n->end_job_failed ? 2 : 1);
    } else if (rc == 1 && n->signals) {
      /* told to stop while its generation ended: it takes no part in the next */
      if (n->coord)
        mt_coord_finish(n->coord, 1, "the coordinator was stopped while the cluster re-formed");
      leave_and_exit(n, 0);
    } else if (rc == 1) {
      next_generation(n);
    }
    break;
  case N_DRAINING:
  case N_EXITING: break;
  }
  store_result(n, rc < 0 ? rc : 0);
}

static void on_tick(uv_timer_t *t) {
  node *n = t->data;
  if (n->coord) {
    int rc = mt_coord_tick(n->coord, mt_mono_ms());
    if (rc < 0) mt_log_warn("coordinator: %s", mt_errmsg());
    node_etcd_publish_state(n); /* a restart or a pause acted on, in etcd within a tick */
  }
  if (n->state != N_EXITING) node_round(n);
  if (n->state != N_EXITING) node_control_round(n, 0);
  if (n->state == N_DRAINING && (n->coord ? mt_coord_drained(n->coord, mt_mono_ms(), 10000)
                                          : mt_mono_ms() >= n->drain_until_ms))
    finish(n, n->exit_code);
}

/* Heartbeat rounds far apart mean this process did not run (stopped,
 * swapped, starved): past the timeout the coordinator has likely declared it
 * lost, ended its generation if it was a member, and re-formed without it.
 * Nothing is wrong with the node: the coordinator takes it back as a spare
 * when its heartbeat moves again. Returns 1 then (and says so, so that its
 * log tells why it is a spare now). */
static int note_silence(node *n) {
  int64_t now = mt_mono_ms(), gap = n->last_hb_ms ? now - n->last_hb_ms : 0;
  n->last_hb_ms = now;
  if (gap <= n->cfg->heartbeat_timeout_ms) return 0;
  mt_log_warn("this node did not run for %.1f s (stopped, swapped or starved), past "
              "cluster.heartbeat_timeout_ms (%d ms): the coordinator has likely declared it "
              "lost; its heartbeats bring it back as a spare",
              gap / 1000.0, n->cfg->heartbeat_timeout_ms);
  return 1;
}

static void on_heartbeat(uv_timer_t *t) {
  node *n = t->data;
  if (n->state == N_EXITING || n->state == N_DRAINING) return;
  /* back from a silence with ranks running: the next round first learns
   * whether their generation went on without this node (abort_ranks) */
  int silent = note_silence(n);
  if (silent && n->state == N_RUNNING) {
    n->was_silent = 1;
    /* the silence found after the abort: the coordinator may have declared
     * this node lost, so it waits for its ranks quietly, as abort_ranks
     * would have had it, rather than be placed again with them stuck */
    if (n->aborted_ms && !n->end_final && !n->quiet) {
      mt_log_info("generation %d: this node was silent before its ranks were aborted: it stops "
                  "heartbeating until they stopped",
                  n->gen);
      n->quiet = 1;
    }
  }
  /* not before its join is accepted: a daemon started again under its name
   * would keep the entry of the one it replaces alive (the same hb/<name>) */
  int hold = (silent && n->state == N_RUNNING && !n->aborted_ms) || n->state == N_JOINING;
  if (!n->quiet && !hold) store_result(n, mt_rdzv_heartbeat(n->store, n->cfg->name));
  node_control_round(n, 1);
}

/* queued like every notification: the loop never waits on PID 1 */
static void on_watchdog(uv_timer_t *t) {
  node *n = t->data;
  mt_notify_flags(n->notify, MT_NOTIFY_WATCHDOG);
}

static void on_signal(uv_signal_t *h, int sig) {
  node *n = h->data;
  if (++n->signals > 1) {
    mt_log_warn("second %s: stopping now", sig == SIGINT ? "SIGINT" : "SIGTERM");
    signal(sig, SIG_DFL);
    raise(sig);
    return;
  }
  mt_log_info("%s: stopping at the next step boundary (again to stop now)",
              sig == SIGINT ? "SIGINT" : "SIGTERM");
  mt_notify_flags(n->notify, MT_NOTIFY_STOPPING);
  switch (n->state) {
  case N_RUNNING: /* rides the step's all-reduce to every rank */
    __atomic_store_n(&n->stop_flag, 1, __ATOMIC_RELEASE);
    /* and the coordinator hears of it: a generation that fails before the
     * stop is done (a node lost meanwhile) ends the job rather than re-form
     * without this node and train on */
    if (mt_rdzv_stop_signalled(n->store, n->gen, n->cfg->name))
      mt_log_warn("could not tell the coordinator of the stop: %s; a failure before the stop "
                  "is done re-forms the cluster without this node",
                  mt_errmsg());
    else
      mt_log_info("generation %d: the coordinator knows of the stop (a failure before it is done "
                  "ends the job)",
                  n->gen);
    break;
  case N_JOINING:
  case N_WAITING:
  case N_SPARE:
    if (n->coord) {
      /* the coordinator ends the job for everyone: as a spare by ordering a stop */
      if (n->state == N_SPARE && !mt_coord_order(n->coord, "stop")) {
        set_state(n, N_ENDING);
        break;
      }
      mt_coord_finish(n->coord, 1, "the coordinator was stopped while no generation ran");
      leave_and_exit(n, 0);
    } else {
      leave_and_exit(n, 0);
    }
    break;
  default: break;
  }
}

/* ---- start-up ---- */

/* Whether host names an address of this machine (so auto hosting applies). */
static int is_local_address(const char *host) {
  struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *res = NULL;
  if (getaddrinfo(host, NULL, &hints, &res)) return 0;
  int local = 0;
  struct ifaddrs *ifs = NULL;
  getifaddrs(&ifs);
  for (struct addrinfo *a = res; a && !local; a = a->ai_next) {
    if (a->ai_family == AF_INET &&
        (ntohl(((struct sockaddr_in *)a->ai_addr)->sin_addr.s_addr) >> 24) == 127)
      local = 1;
    for (struct ifaddrs *i = ifs; i && !local; i = i->ifa_next) {
      if (!i->ifa_addr || i->ifa_addr->sa_family != a->ai_family) continue;
      if (a->ai_family == AF_INET)
        local = ((struct sockaddr_in *)a->ai_addr)->sin_addr.s_addr ==
                ((struct sockaddr_in *)i->ifa_addr)->sin_addr.s_addr;
      else if (a->ai_family == AF_INET6)
        local = !memcmp(&((struct sockaddr_in6 *)a->ai_addr)->sin6_addr,
                        &((struct sockaddr_in6 *)i->ifa_addr)->sin6_addr, 16);
    }
  }
  if (ifs) freeifaddrs(ifs);
  freeaddrinfo(res);
  return local;
}

static int load_job(node *n) {
  const mt_node_config *c = n->cfg;
  if (!c->job_path[0]) return 0;
  char real[PATH_MAX];
  if (!realpath(c->job_path, real))
    return mt_seterr(MT_EINVAL, "job.path %s: %s", c->job_path, strerror(errno));
  const char *preset_dirs[MT_PRESET_DIRS_MAX];
  mt_job_preset_dirs(c->presets_dir[0] ? c->presets_dir : NULL, preset_dirs);
  int rc = mt_job_load(&n->job, real, preset_dirs, n->o->job_overrides);
  if (rc) return mt_wraperr(rc, "job %s cannot run", real);
  char unused[MT_JOB_UNUSED_MAX][256];
  for (int i = 0, k = mt_job_unused(&n->job, unused); i < k; i++)
    mt_log_warn("job %s: %s", real, unused[i]);
  if (!(n->job_json = mt_job_to_json(&n->job))) return MT_ENOMEM;
  n->have_job = 1;
  return 0;
}

static int resolve_devices(node *n) {
  const char *d = n->cfg->devices;
  char resolved[64];
  if (!strcmp(d, "auto")) {
    /* every GPU present, else one CPU device (logged with the reason) */
    if (mt_device_resolve_auto(resolved, sizeof resolved, 0) < 0) return MT_EINVAL;
    d = resolved;
  }
  int count = mt_parse_devices(d, n->specs, MT_RDZV_MAX_DEVICES);
  if (count < 0) return count;
  /* GPUs named that are not here are refused now, not at the first step */
  for (int i = 0; i < count && !strncmp(d, "cuda", 4); i++) {
    size_t total, avail;
    int rc = mt_device_memory(n->specs[i], &total, &avail);
    if (rc) return mt_wraperr(rc, "node.devices = %s", d);
  }
  if (!MT_HAVE_NCCL && count > 0 && !strncmp(d, "cuda", 4))
    mt_log_warn("node.devices = %s: this build has no NCCL, so a job whose GPU groups have "
                "more than one rank fails when its generation forms (install NCCL and rebuild)",
                d);
  n->n_devices = count;
  return 0;
}

/* rendezvous.key_file: the cluster key the store asks every connection
 * for (hosting) or this node gives it (following). Unreadable or empty is
 * a config that cannot run: a node must not join a cluster unkeyed by
 * mistake. */
static int read_cluster_key(node *n) {
  const char *path = n->cfg->key_file;
  n->cluster_key_bytes = 0;
  if (!path[0]) return 0;
  int rc = mt_read_secret_file(path, "rendezvous.key_file", "can write the job's rendezvous",
                               n->cluster_key, sizeof n->cluster_key, &n->cluster_key_bytes);
  if (rc) return rc == MT_ENOENT ? mt_seterr(MT_EINVAL, "%s", mt_errmsg()) : rc;
  if (!n->cluster_key_bytes) return mt_seterr(MT_EINVAL, "rendezvous.key_file %s is empty", path);
  return 0;
}

static int dial_store(node *n);

/* Hosts the store when this node should (explicitly, or auto and the
 * endpoint is ours and free; through etcd, when it was elected), then
 * dials it (through etcd, the elected node's). */
static int connect_store(node *n) {
  const mt_node_config *c = n->cfg;
  snprintf(n->store_name, sizeof n->store_name, "%s", c->endpoint);
elect:;
  int rc = c->etcd[0] ? node_etcd_elect(n)
                      : mt_parse_host_port(c->endpoint, n->store_host, sizeof n->store_host,
                                           &n->store_port);
  if (rc || (rc = read_cluster_key(n))) return rc;
  if (!c->etcd[0]) n->is_host = c->host == 1;
  if (c->etcd[0] && n->is_host) { /* elected: it hosts the store, on its own endpoint */
    mt_store_server_limits lim = {.max_bytes = (uint64_t)c->store_max_mb << 20,
                                  .key = n->cluster_key,
                                  .key_bytes = n->cluster_key_bytes};
    rc = mt_store_server_run_thread(n->store_host, n->store_port, &lim, &n->server);
    if (rc) {
      mt_store_etcd_resign(n->etcd_root, n->lease), n->lease = 0; /* another may do better */
      return mt_wraperr(rc,
                        "elected to coordinate, but cannot host the store on "
                        "rendezvous.endpoint %s",
                        c->endpoint);
    }
  } else if (c->host != 0 && !c->etcd[0]) {
    mt_store_server_limits lim = {.max_bytes = (uint64_t)c->store_max_mb << 20,
                                  .key = n->cluster_key,
                                  .key_bytes = n->cluster_key_bytes};
    rc = mt_store_server_run_thread(n->store_host, n->store_port, &lim, &n->server);
    if (!rc) {
      n->is_host = 1;
    } else if (c->host == 1 || is_local_address(n->store_host) == 0) {
      if (c->host == 1) return mt_wraperr(rc, "rendezvous.host = yes, but");
    } else {
      mt_log_info("rendezvous endpoint %s is taken here (%s): following it", c->endpoint,
                  mt_errmsg());
    }
  }
  if (n->is_host) {
    if (!n->have_job)
      return mt_seterr(MT_EINVAL,
                       "this node hosts the rendezvous (%s) and so coordinates, but "
                       "has no job: set job.path",
                       c->endpoint);
    mt_log_info("hosting the rendezvous store on %s and coordinating job %s (%s)", c->endpoint,
                n->job.name, n->job.hash);
  }
  rc = dial_store(n);
  if (rc == MT_EAGAIN) goto elect; /* the leader it read went away first */
  return rc;
}

/* Connects to the coordinator's store (n->store_host:port), waiting up to
 * rendezvous.join_timeout_s for it to answer. Elected through etcd, a
 * follower whose leader is gone before its store answered (a lease that
 * had not lapsed yet when it read it) gets MT_EAGAIN: elect again. */
static int dial_store(node *n) {
  const mt_node_config *c = n->cfg;
  int rc;
  mt_store_tcp_opts so = {.connect_timeout_ms = c->heartbeat_interval_ms,
                          .request_timeout_ms = c->heartbeat_interval_ms * 2,
                          .key = n->cluster_key,
                          .key_bytes = n->cluster_key_bytes};
  int64_t deadline = mt_mono_ms() + (c->join_timeout_s ? c->join_timeout_s * 1000LL : 600000LL);
  for (;;) {
    rc = mt_store_tcp_new(n->store_host, n->store_port, &so, &n->store);
    if (!rc) return 0;
    if (rc == MT_EPERM) /* the key will not become right by waiting */
      return mt_wraperr(rc, "the rendezvous at %s", n->store_name);
    if (mt_mono_ms() > deadline) {
      n->store_unreachable = 1;
      return mt_wraperr(rc, "cannot reach the rendezvous at %s", n->store_name);
    }
    mt_log_info("waiting for the rendezvous at %s: %s", n->store_name, mt_errmsg());
    if (n->etcd_root && !n->is_host && !node_etcd_leader_stays(n)) {
      mt_log_info("etcd: the coordinator of term %s at %s is gone before its store answered: "
                  "electing again",
                  n->term, n->store_name);
      return MT_EAGAIN;
    }
    sleep(1);
  }
}

/* The hosting node runs the coordinator: it owns the job, forms the
 * generations and orders them, in this loop's ticks (on_tick). */
static int start_coordinator(node *n) {
  mt_coord_opts co = {.store = n->store,
                      .coordinator_name = n->cfg->name,
                      .job_json = n->job_json,
                      .job_hash = n->job.hash,
                      .version = MT_VERSION,
                      .tp = n->job.parallel.tp,
                      .pp = n->job.parallel.pp,
                      .dp_min = n->job.parallel.dp_min,
                      .dp_max = n->job.parallel.dp_max > n->job.parallel.dp_min
                                    ? n->job.parallel.dp_max
                                    : n->job.parallel.dp_min,
                      .micro_batch = n->job.parallel.micro_batch,
                      .global_batch = n->job.train.global_batch,
                      .batch_quantum = mt_job_batch_quantum(&n->job),
                      .interleaved = n->job.parallel.virtual_stages > 1,
                      .last_call_ms = n->cfg->last_call_ms,
                      .heartbeat_timeout_ms = n->cfg->heartbeat_timeout_ms,
                      .has_checkpoint_dir = n->job.checkpoint.dir[0] || n->cfg->checkpoint_dir[0],
                      .max_restarts = n->cfg->max_restarts,
                      .reform_timeout_ms = n->cfg->reform_timeout_s * 1000,
                      .restarts_spent = n->restarts_spent,
                      .restart_reason = n->restart_reason,
                      .paused = n->start_paused,
                      .dp_resized = n->start_dp_resized};
  return mt_coord_new(&co, &n->coord);
}

/* Joins the rendezvous under this start's instance with what the node
 * brings (its devices, its version, its job's hash), waiting out a store
 * that answers late up to rendezvous.join_timeout_s. A store that stays
 * unreachable sets store_unreachable. */
static int join_rendezvous(node *n, const char *instance) {
  mt_node_desc *d = &n->desc; /* kept: a node turned away for now joins again with it */
  *d = (mt_node_desc){.n_devices = n->n_devices, .pid = (int)getpid()};
  snprintf(d->name, sizeof d->name, "%s", n->cfg->name);
  memcpy(d->instance, instance, sizeof d->instance);
  if (gethostname(d->host, sizeof d->host - 1)) snprintf(d->host, sizeof d->host, "unknown");
  snprintf(d->version, sizeof d->version, "%s", n->version);
  if (n->have_job) snprintf(d->job_hash, sizeof d->job_hash, "%s", n->job.hash);
  snprintf(d->control_url, sizeof d->control_url, "%s", n->control_url);
  for (int i = 0; i < n->n_devices; i++) snprintf(d->devices[i], 16, "%s", n->specs[i]);
  /* a store that answers late (its host busy or stopped a moment) is
   * waited for as long as the connection was, rendezvous.join_timeout_s;
   * the write of a numbered join is repeated rather than numbered again
   * while the coordinator still waits for it (it passes over a number
   * unwritten for 30 s, and would never read it after), then a fresh
   * number is drawn */
  int64_t join_deadline =
      mt_mono_ms() + (n->cfg->join_timeout_s ? n->cfg->join_timeout_s * 1000LL : 600000LL);
  int64_t drawn_ms = 0, said_ms = 0;
  n->seq = 0;
  int rc;
  while ((rc = mt_rdzv_join(n->store, d, &n->seq))) {
    int64_t now = mt_mono_ms();
    if (!mt_err_retryable(rc) || now > join_deadline) {
      if (mt_err_retryable(rc)) n->store_unreachable = 1;
      return rc;
    }
    if (n->seq > 0 && !drawn_ms) drawn_ms = now;
    if (n->seq > 0 && now - drawn_ms > 20000) n->seq = 0, drawn_ms = 0;
    if (!said_ms || now - said_ms >= 5000) {
      mt_log_warn("%s; joining again (for up to %lld s more)", mt_errmsg(),
                  (long long)(join_deadline - now) / 1000);
      said_ms = now;
    }
    usleep(200 * 1000);
  }
  mt_log_info("mtnlgd %s: node %s with %d device(s) (%s..%s) joined %s as join %lld%s", n->version,
              n->cfg->name, n->n_devices, n->specs[0], n->specs[n->n_devices - 1], n->store_name,
              (long long)n->seq, n->is_host ? ", coordinating" : "");
  return 0;
}

/* The node's loop: signals, the round tick, heartbeats, the systemd
 * watchdog and the engine's end, until finish() stops it. */
static void run_loop(node *n) {
  uv_loop_init(&n->loop);
  uv_signal_init(&n->loop, &n->sigint);
  uv_signal_init(&n->loop, &n->sigterm);
  n->sigint.data = n->sigterm.data = n;
  uv_signal_start(&n->sigint, on_signal, SIGINT);
  uv_signal_start(&n->sigterm, on_signal, SIGTERM);
  uv_timer_init(&n->loop, &n->tick);
  uv_timer_init(&n->loop, &n->heartbeat);
  uv_timer_init(&n->loop, &n->watchdog);
  n->tick.data = n->heartbeat.data = n->watchdog.data = n;
  int tick_ms = n->cfg->heartbeat_interval_ms < 100 ? n->cfg->heartbeat_interval_ms : 100;
  uv_timer_start(&n->tick, on_tick, 0, (uint64_t)tick_ms);
  uv_timer_start(&n->heartbeat, on_heartbeat, 0, (uint64_t)n->cfg->heartbeat_interval_ms);
  uint64_t wd_usec = 0;
  if (sd_watchdog_enabled(0, &wd_usec) > 0 && wd_usec >= 2000)
    uv_timer_start(&n->watchdog, on_watchdog, 0, wd_usec / 2000);
  uv_async_init(&n->loop, &n->engine_done, on_engine_done);
  n->engine_done.data = n;
  uv_run(&n->loop, UV_RUN_DEFAULT);
}

int mt_node_main(const mt_node_opts *o) {
  node *n = calloc(1, sizeof *n);
  if (!n) return 1;
  n->o = o;
  n->cfg = o->config;
  pthread_mutex_init(&n->mu, NULL);
  n->notify = mt_notify_new(); /* NULL (none sent) if its thread cannot start */
  n->version =
      getenv("MTNLG_TEST_ADVERTISE_VERSION") ? getenv("MTNLG_TEST_ADVERTISE_VERSION") : MT_VERSION;
  int code = 2;
  if (resolve_devices(n) || load_job(n)) {
    mt_log_error("%s", mt_errmsg());
    goto out;
  }
  code = 1;
  uint64_t inst; /* which start of the daemon this is, where a pid can repeat */
  if (getrandom(&inst, sizeof inst, GRND_NONBLOCK) != sizeof inst)
    inst = (uint64_t)time(NULL) * 0x9e3779b97f4a7c15ull ^ (uint64_t)clock() << 20 ^ (uintptr_t)n;
  char instance[17];
  snprintf(instance, sizeof instance, "%016llx", (unsigned long long)inst);
  if (connect_store(n)) {
    /* a rendezvous not up yet (its node rebooting) is worth starting again
     * for (1: systemd restarts); a config that cannot host it is not (2);
     * a job that completed is done (0) */
    mt_log(n->completed_before ? MT_LOG_INFO : MT_LOG_ERROR, "%s", mt_errmsg());
    code = n->completed_before ? 0 : n->store_unreachable ? 1 : 2;
    goto out;
  }
  if (n->etcd_root && node_etcd_start_election(n)) {
    mt_log_error("%s", mt_errmsg());
    goto out;
  }
  /* the hosting daemon's instance, before any node can have joined it */
  if (n->is_host && mt_store_set(n->store, MT_RDZV_COORD_INSTANCE_KEY, instance, 16)) {
    mt_log_error("cannot write %s to the store it hosts: %s", MT_RDZV_COORD_INSTANCE_KEY,
                 mt_errmsg());
    goto out;
  }
  if (fence_to_coordinator(n)) {
    mt_log_error("%s", mt_errmsg());
    goto out;
  }
  if (node_control_start(n)) {
    mt_log_error("%s", mt_errmsg());
    code = 2;
    goto out;
  }
  if (n->is_host && start_coordinator(n)) {
    mt_log_error("%s", mt_errmsg());
    goto out;
  }
  if (join_rendezvous(n, instance)) {
    mt_log_error("%s", mt_errmsg());
    goto out;
  }

  run_loop(n);
  code = n->exit_code;

  if (n->engine_running && !n->abandoned) { /* a stop that skipped the engine's end */
    mt_local_abort(n->local);
    pthread_join(n->waiter, NULL);
    mt_local_free(n->local);
    mt_store_free(n->engine_store);
  }
  if (n->abandoned) { /* ranks still blocked: the process ends without joining them */
    mt_log_info("node %s exits (%d)%s%s", n->cfg->name, code, n->end_reason[0] ? ": " : "",
                n->end_reason);
    if (o->abandoned) *o->abandoned = 1;
    int64_t lease = n->election ? mt_election_stop(n->election) : n->lease;
    if (lease) mt_store_etcd_resign(n->etcd_root, lease); /* the next one elects at once */
    return code; /* n stays allocated: the blocked ranks still point into it */
  }
  uv_close((uv_handle_t *)&n->sigint, NULL);
  uv_close((uv_handle_t *)&n->sigterm, NULL);
  uv_close((uv_handle_t *)&n->tick, NULL);
  uv_close((uv_handle_t *)&n->heartbeat, NULL);
  uv_close((uv_handle_t *)&n->watchdog, NULL);
  uv_close((uv_handle_t *)&n->engine_done, NULL);
  uv_run(&n->loop, UV_RUN_DEFAULT);
  uv_loop_close(&n->loop);
  mt_log_info("node %s exits (%d)%s%s", n->cfg->name, code, n->end_reason[0] ? ": " : "",
              n->end_reason);
out:
  node_control_stop(n);
  mt_assignment_free(&n->asg);
  mt_tboard_free(n->tboard);
  mt_steplog_acc_free(&n->steplog);
  if (n->election) n->lease = mt_election_stop(n->election), n->election = NULL;
  if (n->lease && n->coord && !n->coord_lost && n->end_final) node_etcd_close_job(n);
  mt_coord_free(n->coord);
  mt_store_free(n->store);
  if (n->lease && mt_store_etcd_resign(n->etcd_root, n->lease)) /* or it lapses */
    mt_log_warn("%s: %s", n->store_name, mt_errmsg());
  mt_store_free(n->etcd_root);
  if (n->server) mt_store_server_thread_stop(n->server);
  free(n->job_json);
  mt_notify_free(n->notify, NODE_NOTIFY_FLUSH_MS); /* the last status and STOPPING=1 */
  pthread_mutex_destroy(&n->mu);
  free(n);
  return code;
}
