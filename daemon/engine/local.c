/* local.c — device threads of one process, each a data-parallel rank. */
#include "local.h"

#include <errno.h>
#include <omp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "checkpoint.h"
#include "err.h"
#include "log.h"
#include "monotime.h"
#include "range.h"
#include "safetensors.h"
#include "store.h"

/* A rank's groups, in rank_ctx.comms. */
enum {
  COMM_WORLD,
  COMM_DP,
  COMM_ACT_IN,
  COMM_GRAD_OUT,
  COMM_ACT_OUT,
  COMM_GRAD_IN,
  COMM_EMBED,
  COMM_TP,
  N_COMMS
};

typedef struct rank_ctx {
  const mt_local_opts *o;
  int rank, size, omp_threads;
  mt_store *store;
  mt_comm *comms[N_COMMS]; /* the groups it joined, aborted together on a failure */
  int rc;
  char err[1024];
  struct rank_ctx *all;
  int *first_failed;          /* local index of the rank whose failure came first, -1 while none */
  volatile int *cancel;       /* set on a failure: waits for peers in the store give up */
  int *running;               /* ranks of this process still running */
  int *joining;               /* ranks of this process still making their groups */
  int n_local;                /* ranks of this process: all[0 .. n_local) */
  char ckpt_dir[1200];        /* this job's checkpoints, or "" */
  mt_checkpoint_save pending; /* an async save in flight */
  int64_t pending_order_seq;
  char save_err[1024]; /* why the last save failed (the first rank of a process: the lowest
                          failing world rank's error, or its own), or "" */
  int profiling;       /* train.profile: this rank's GPU's capture is on */
} rank_ctx;

/* Rank 0's report: the model once, then steps, validation and the end. */
static void report_start(const mt_trainer *tr) {
  const mt_job *job = tr->job;
  size_t acts = 0; /* every chunk's (virtual stages) */
  for (int c = 0; c < tr->n_chunks; c++) acts += tr->chunks[c].acts_floats;
  char chunks[64] = "";
  if (tr->n_chunks > 1)
    snprintf(chunks, sizeof chunks, " in %d chunks of the interleaved schedule", tr->n_chunks);
  mt_log_info("model: %d layers, hidden %d, %d heads, vocab %d (padded %d), seq %d: %.2fM "
              "parameters on stage 0 of %d; batch %d = dp %d x %d micro-batches of %d; %.3f "
              "GFLOP per step on this device; Adam moments %zu bytes per rank (1/%d of the "
              "stage's); activations %zu bytes per rank%s%s",
              job->model.n_layer, job->model.n_embd, job->model.n_head, job->model.vocab_size,
              job->model.padded_vocab, job->model.seq_len, tr->model.num_params / 1e6,
              tr->g.pp_size, job->train.global_batch, tr->g.dp_size, tr->micro_batches,
              job->parallel.micro_batch, tr->flops_per_step / 1e9, 2 * tr->shard_n * sizeof(float),
              tr->g.dp_size, acts * sizeof(float), chunks,
              job->parallel.sequence_parallel && tr->g.tp_size > 1
                  ? " (sequence-parallel: the stream's rows split over tp)"
                  : "");
}

/* Logs a finished save and tells the owner (phase 1): the first rank of a
 * process, and every other rank whose own part failed (its error names its
 * file) unless its failure is the one every rank repeats (the lowest failing
 * rank's: the first rank of its process logs that one, not having failed). */
static void report_save(rank_ctx *c, int rc, const mt_checkpoint_result *res, int64_t order_seq) {
  const mt_local_opts *o = c->o;
  if (c != c->all) {
    if (rc && res->failed_here && !res->failed_first)
      mt_log_error("checkpoint of step %lld failed: %s", (long long)res->step, mt_errmsg());
    return;
  }
  snprintf(c->save_err, sizeof c->save_err, "%s", rc ? mt_errmsg() : "");
  if (rc)
    mt_log_error("checkpoint of step %lld failed: %s", (long long)res->step, mt_errmsg());
  else if (c->rank == 0)
    mt_log_info("checkpoint of step %lld committed in %s (%.1f MB from this rank in %.2f s)",
                (long long)res->step, res->path, res->bytes / 1e6, res->seconds);
  if (o->on_checkpoint)
    o->on_checkpoint(1, res->step, rc, rc ? mt_errmsg() : NULL, res, order_seq, o->arg);
}

/* A failed collective inside a save means a lost peer: the generation is
 * over. Any other failure fails the checkpoint only. */
static int save_rc(int rc) { return rc == MT_ECANCELED || rc == MT_ETIMEDOUT ? rc : 0; }

/* Finishes the save in flight when every rank's writes are done (or waits
 * for them). Collective. */
static int finish_pending(rank_ctx *c, mt_trainer *tr, int wait, int64_t *last_saved) {
  if (!c->pending.active) return 0;
  int finished = 0;
  mt_checkpoint_result res;
  int rc = mt_trainer_save_poll(tr, &c->pending, wait, &finished, &res);
  if (!finished) {
    /* given up on (a writer stuck past the deadline): a failed save, told
     * as one, before the generation ends on it */
    if (rc && wait) report_save(c, rc, &c->pending.res, c->pending_order_seq);
    return save_rc(rc);
  }
  if (!rc) *last_saved = res.step;
  report_save(c, rc, &res, c->pending_order_seq);
  return save_rc(rc);
}

/* Saves the trainer's state at its step (collective). A failed checkpoint is
 * reported and training goes on: the previous checkpoints are intact. With
 * checkpoint.async (and allow_async) only the copy to host memory happens
 * here; the writes run in the background and the commit happens at a later
 * step boundary (finish_pending). A new save first finishes the previous. */
static int save_checkpoint(rank_ctx *c, mt_trainer *tr, int64_t order_seq, int64_t *last_saved,
                           int *saved, int allow_async) {
  const mt_local_opts *o = c->o;
  int rc;
  if (c->pending.active && (rc = finish_pending(c, tr, 1, last_saved))) return rc;
  if (saved) *saved = *last_saved == tr->step;
  if (!c->ckpt_dir[0] || *last_saved == tr->step) {
    if (c == c->all && o->on_checkpoint && order_seq)
      o->on_checkpoint(1, tr->step, *last_saved == tr->step ? 0 : MT_EINVAL,
                       *last_saved == tr->step ? NULL : "the job has no checkpoint.dir", NULL,
                       order_seq, o->arg);
    return 0;
  }
  if (c == c->all && o->on_checkpoint)
    o->on_checkpoint(0, tr->step, 0, NULL, NULL, order_seq, o->arg);
  mt_checkpoint_result res = {.step = tr->step};
  if (allow_async && o->job->checkpoint.async_save) {
    mt_range_push("checkpoint step %lld, to host memory", (long long)tr->step);
    rc = mt_trainer_save_begin(tr, c->ckpt_dir, &c->pending);
    mt_range_pop();
    c->pending_order_seq = order_seq;
    res.failed_here = c->pending.res.failed_here, res.failed_first = c->pending.res.failed_first;
    if (rc) report_save(c, rc, &res, order_seq);
    return save_rc(rc);
  }
  mt_range_push("checkpoint step %lld", (long long)tr->step);
  rc = mt_trainer_save(tr, c->ckpt_dir, &res);
  mt_range_pop();
  if (!rc) *last_saved = tr->step;
  if (saved) *saved = !rc;
  report_save(c, rc, &res, order_seq);
  return save_rc(rc);
}

/* Between steps: every rank learns whether any process was signalled to
 * stop and world rank 0's order word (a sum: only rank 0 adds it). */
static int agree_orders(mt_trainer *tr, int *stop, int *timed, int64_t *word) {
  mt_trainer_poll(tr);
  double v[2] = {mt_trainer_stop_vote(tr), (double)tr->order_word};
  if (tr->g.world) {
    int rc = mt_comm_allreduce(tr->g.world, v, v, 2, MT_COMM_F64, MT_COMM_SUM);
    if (rc) return rc;
  }
  *stop = v[0] > 0, *timed = mt_stop_vote_timed(v[0]), *word = (int64_t)v[1];
  return 0;
}

/* Paused after a step: every rank all-reduces the stop request and rank 0's
 * order word every 50 ms (so heartbeats, deadlines and peers stay alive)
 * until an order newer than the pause resumes or stops the run, or a
 * signal or train.exit_duration_mins' deadline stops it (*why: MT_STOPPED_*).
 * Nothing of the training state changes, so a resumed run continues its
 * trajectory. */
static int pause_loop(rank_ctx *c, mt_trainer *tr, int64_t *seq, int *stop, int *why,
                      int64_t *last_saved) {
  const mt_local_opts *o = c->o;
  for (;;) {
    struct timespec ts = {0, 50 * 1000 * 1000};
    nanosleep(&ts, NULL);
    int any_stop, timed;
    int64_t w;
    int rc = agree_orders(tr, &any_stop, &timed, &w);
    if (rc) return mt_wraperr(rc, "paused after step %lld", (long long)tr->step);
    *why = timed ? MT_STOPPED_TIME : MT_STOPPED_ASKED;
    if (any_stop) return *stop = 1, 0;
    if (mt_order_seq(w) <= *seq) continue;
    *seq = mt_order_seq(w);
    int kind = mt_order_kind(w);
    if (c == c->all && o->on_order) o->on_order(kind, *seq, tr->step, o->arg);
    if (kind == MT_ORDER_STOP) return *stop = 1, 0;
    if (kind == MT_ORDER_RESUME) return 0;
    if (kind == MT_ORDER_CHECKPOINT) { /* a paused job can be saved as it stands */
      int rc = save_checkpoint(c, tr, *seq, last_saved, NULL, 0);
      if (rc) return rc;
    }
  }
}

/* When this process first trained job `name` (mono_ms): the start of
 * train.exit_duration_mins' clock, kept across the job's generations (a
 * re-formed or resized one does not restart it) and started again for
 * another job. */
static int64_t job_start_ms(const char *name) {
  static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
  static char seen[sizeof((mt_job *)0)->name];
  static int64_t start;
  pthread_mutex_lock(&mu);
  if (!start || strcmp(seen, name)) {
    snprintf(seen, sizeof seen, "%s", name);
    start = mt_mono_ms();
  }
  int64_t s = start;
  pthread_mutex_unlock(&mu);
  return s;
}

/* The ranks agreed to stop after tr->step (why: MT_STOPPED_*), the stop's
 * save done: the first rank of this process says so, and whether the
 * steps since the last checkpoint are lost (its save failed: an error,
 * since the run ends there however it was asked to). */
static void report_stop(rank_ctx *c, const mt_trainer *tr, int why, int64_t last_saved) {
  const mt_local_opts *o = c->o;
  if (c != c->all) return;
  int unsaved = c->ckpt_dir[0] && last_saved != tr->step && tr->step > 0;
  if (o->on_stopped) o->on_stopped(tr->step, why, unsaved ? c->save_err : NULL, last_saved, o->arg);
  char reason[256];
  mt_local_stop_reason(reason, sizeof reason, o->job, tr->step, why);
  if (unsaved)
    mt_log_error("%s, but its checkpoint failed (above): the next run resumes from the one "
                 "`latest` names",
                 reason);
  else if (why == MT_STOPPED_ASKED)
    mt_log_info("%s", reason);
  else
    mt_log_info("%s; %s", reason,
                last_saved == tr->step ? "this step's checkpoint resumes it"
                : tr->step == 0        ? "nothing was trained"
                                       : "the job keeps no checkpoints (checkpoint.dir)");
}

void mt_local_stop_reason(char *buf, size_t size, const mt_job *job, int64_t step, int why) {
  long long s = (long long)step, n = (long long)job->train.steps;
  if (why == MT_STOPPED_TIME)
    snprintf(buf, size, "stopped at step %lld of %lld: train.exit_duration_mins (%g) has passed", s,
             n, job->train.exit_duration_mins);
  else if (why == MT_STOPPED_INTERVAL)
    snprintf(buf, size, "stopped at step %lld of %lld: a multiple of train.exit_interval (%lld)", s,
             n, (long long)job->train.exit_interval);
  else
    snprintf(buf, size, "stopped at step %lld of %lld on request", s, n);
}

/* After the last step of a completed run: eval.iters batches of the valid
 * split on from the interval's runs, and, with eval.test and a test split,
 * the test split's first eval.iters batches (Megatron's "validation loss at
 * the end of training for val data" and "... for test data"). */
static int end_of_training(rank_ctx *c, mt_trainer *tr, mt_step_stats *st) {
  const mt_job *job = c->o->job;
  int rc = mt_trainer_eval(tr, MT_SPLIT_VALID, 1, mt_eval_first_batch(job, st->step, 1),
                           &st->final_val_loss);
  if (rc) return rc;
  st->has_final_val = 1;
  int has_test = 0;
  if (job->eval.test && (rc = mt_trainer_has_test(tr, &has_test))) return rc;
  if (has_test) {
    if ((rc = mt_trainer_eval(tr, MT_SPLIT_TEST, 1, 0, &st->test_loss))) return rc;
    st->has_test = 1;
  } else if (job->eval.test && c->rank == 0 && job->data.path[0])
    mt_log_info("no test pass: data.path %s has no test split (data.test names one)",
                job->data.path);
  else if (job->eval.test && c->rank == 0)
    mt_log_info("no test pass: data.split \"%s\" gives the test split no tokens%s", job->data.split,
                job->data.n_blend > 1 ? " in some dataset of the blend" : "");
  return 0;
}

/* train.profile (Megatron's --profile): on the listed world ranks, the
 * CUDA profiler's capture starts before the step after step_start (called
 * with the steps done, before a step and after it; Megatron's test on its
 * iteration count, so a run resumed past step_start takes no capture) and
 * stops after step_end, or where the ranks stop training (ending). A rank
 * on a CPU device says once that it has no capture. Never fails a step: a
 * capture that does not start is said and training goes on. */
static void profile_window(rank_ctx *c, mt_trainer *tr, int ending) {
  const mt_job *job = c->o->job;
  const mt_train_spec *t = &job->train;
  int listed = 0;
  for (int i = 0; t->profile.on && i < t->profile.n_ranks; i++)
    listed |= t->profile.ranks[i] == c->rank;
  if (!listed) return;
  long long from = (long long)t->profile.step_start + 1, to = (long long)t->profile.step_end;
  if (!c->profiling && !ending && tr->step == t->profile.step_start) {
    if (mt_device_profiler(tr->dev, 1))
      mt_log_info("train.profile: world rank %d takes no capture of steps %lld to %lld: %s (its "
                  "NVTX ranges mark them still)",
                  c->rank, from, to, mt_errmsg());
    else {
      c->profiling = 1;
      mt_log_info("train.profile: the CUDA profiler captures steps %lld to %lld on world rank %d "
                  "(%s)",
                  from, to, c->rank, tr->dev->name);
    }
  } else if (c->profiling && (ending || tr->step >= t->profile.step_end)) {
    c->profiling = 0;
    if (mt_device_profiler(tr->dev, 0))
      mt_log_warn("train.profile: world rank %d: %s", c->rank, mt_errmsg());
    else
      mt_log_info("train.profile: the capture on world rank %d (%s) stopped after step %lld",
                  c->rank, tr->dev->name, (long long)tr->step);
  }
}

static int rank_loop(rank_ctx *c, mt_trainer *tr) {
  const mt_local_opts *o = c->o;
  const mt_job *job = o->job;
  int64_t order_seq = 0, last_saved = -1;
  /* train.exit_duration_mins counts on world rank 0's clock from the first
   * generation of the job this process trained (Megatron's: from its
   * start); its stop request, agreed in the step's all-reduce (or the
   * pause's), stops every rank at that step */
  tr->stop_at_ms =
      c->rank == 0 && job->train.exit_duration_mins > 0.0
          ? job_start_ms(job->name) + (int64_t)(job->train.exit_duration_mins * 60000.0)
          : 0;
  /* read just before each step's all-reduce and each agreement while paused */
  tr->stop_flag = o->stop;
  tr->order_src = c->rank == 0 ? o->order : NULL;
  tr->node = o->node;
  tr->on_eval = c == c->all ? o->on_eval : NULL;
  tr->eval_arg = o->arg;
  int why = MT_STOPPED_ASKED; /* of the agreed stop */
  if (c->rank == 0) report_start(tr);
  int64_t resumed = -1; /* -1: a fresh start */
  if (c->ckpt_dir[0]) {
    int rc = mt_trainer_resume(tr, c->ckpt_dir, job->checkpoint.resume_step, &resumed);
    if (rc) return rc;
    if (resumed >= 0) last_saved = resumed;
    if (resumed >= 0 && c == c->all && o->on_resumed) o->on_resumed(resumed, o->arg);
    if (c->rank == 0 && resumed >= job->train.steps)
      mt_log_info("the checkpoint at step %lld is at or past train.steps = %lld: nothing to train "
                  "(raise train.steps to train on)",
                  (long long)resumed, (long long)job->train.steps);
  }
  /* checkpoint.load starts a fresh run only: once the job has checkpoints of
   * its own it resumes from them (Megatron's --load of the save directory),
   * so a restart does not go back to the base weights */
  if (job->checkpoint.load[0] && resumed >= 0 && c->rank == 0)
    mt_log_info("checkpoint.load %s ignored: the job resumed from its own checkpoint of step %lld",
                job->checkpoint.load, (long long)resumed);
  if (job->checkpoint.load[0] && resumed < 0) {
    int rc = mt_trainer_load_from(tr, job->checkpoint.load, job->checkpoint.load_optimizer);
    if (rc) return rc;
  }
  /* a pause already ordered when the ranks start (a generation that formed
   * while the job was paused) holds them before their first step */
  int stopped = 0;
  if (o->order) {
    int any_stop, late; /* a signal or deadline before the first step is seen at its end */
    int64_t w;
    int rc = agree_orders(tr, &any_stop, &late, &w);
    if (rc) return mt_wraperr(rc, "agreeing on the orders before the first step");
    if (mt_order_kind(w) == MT_ORDER_PAUSE && mt_order_seq(w) > order_seq) {
      order_seq = mt_order_seq(w);
      if (c == c->all && o->on_order) o->on_order(MT_ORDER_PAUSE, order_seq, tr->step, o->arg);
      if ((rc = pause_loop(c, tr, &order_seq, &stopped, &why, &last_saved))) return rc;
      if (stopped) report_stop(c, tr, why, last_saved); /* its state is what it resumed */
    }
  }
  while (!stopped && tr->step < job->train.steps) {
    /* the step reads the stop flag and the order word just before its
     * all-reduce (tr->stop_flag, tr->order_src): any process signalled, all
     * stop together after that step */
    mt_step_stats st;
    profile_window(c, tr, 0);
    int rc = mt_trainer_step(tr, &st);
    profile_window(c, tr, 0);
    if (rc) return rc;
    why = st.stop && st.timed ? MT_STOPPED_TIME : MT_STOPPED_ASKED;
    /* train.exit_interval (Megatron's --exit-interval): every rank counts
     * the same steps, so all stop after the same one, validated and saved
     * as a stop on request is */
    int64_t every = job->train.exit_interval;
    if (!st.stop && every > 0 && st.step % every == 0 && st.step < job->train.steps)
      st.stop = 1, why = MT_STOPPED_INTERVAL;
    /* out of time: straight to the checkpoint, as Megatron's exit; each
     * validation reads the valid batches its step calls for
     * (mt_eval_first_batch). The run trained its last step (not out of
     * time): Megatron's validation at the end of training and its test
     * pass follow. */
    int64_t every_eval = job->eval.interval;
    int validate = every_eval > 0 && why != MT_STOPPED_TIME &&
                   (st.step % every_eval == 0 || (st.stop && st.step < job->train.steps));
    int end_passes = every_eval > 0 && why != MT_STOPPED_TIME && st.step == job->train.steps;
    /* every rank learned the loss in the step's all-reduce; a step with
     * passes after it is reported once they have run (their losses are on
     * its line) */
    if (!validate && !end_passes && c == c->all && o->on_step) o->on_step(&st, o->arg);
    int ordered_save = 0, pause = 0;
    if (st.order && mt_order_seq(st.order) > order_seq) {
      order_seq = mt_order_seq(st.order);
      int kind = mt_order_kind(st.order);
      /* the run ends after this step (its schedule, or its last step):
       * re-forming wider or narrower would train on past the stop or
       * re-form a job with nothing left, so the resize is refused (the
       * next run forms at the width its nodes give) and the step's own
       * save goes on as it would */
      char refused[400] = "";
      if (kind == MT_ORDER_RESIZE && (why == MT_STOPPED_INTERVAL || why == MT_STOPPED_TIME)) {
        char stop[256];
        mt_local_stop_reason(stop, sizeof stop, job, st.step, why);
        snprintf(refused, sizeof refused,
                 "the run %s: no resize; the next run forms at the width its nodes give", stop);
      } else if (kind == MT_ORDER_RESIZE && st.step >= job->train.steps)
        snprintf(refused, sizeof refused, "step %lld is the job's last (train.steps): no resize",
                 (long long)st.step);
      if (refused[0]) {
        if (c == c->all && o->on_checkpoint)
          o->on_checkpoint(1, st.step, MT_ECANCELED, refused, NULL, order_seq, o->arg);
      } else {
        if (c == c->all && o->on_order) o->on_order(kind, order_seq, st.step, o->arg);
        if (kind == MT_ORDER_STOP) st.stop = 1;
        if (kind == MT_ORDER_CHECKPOINT || kind == MT_ORDER_RESIZE) ordered_save = kind;
        pause = kind == MT_ORDER_PAUSE;
      }
    }
    /* a save in flight commits once every rank's writes are done */
    if (c->pending.active && (rc = finish_pending(c, tr, 0, &last_saved))) return rc;
    /* every rank decides alike: the interval, an order, a stop, the end.
     * The step's save comes before its validation and the passes at the
     * end of training, and before a validation it is made whole (not in
     * the background): those passes read data nothing read before and
     * run for eval.iters batches, and a bad token, a device fault or a
     * node lost in them must not cost the steps since the last
     * checkpoint (Megatron validates first, then saves) */
    int interval = job->checkpoint.interval;
    if (ordered_save || (interval > 0 && st.step % interval == 0) || st.stop ||
        st.step == job->train.steps) {
      int saved = 0;
      /* in the background only when training goes on right after it */
      int async =
          ordered_save != MT_ORDER_RESIZE && !st.stop && st.step < job->train.steps && !validate;
      rc = save_checkpoint(c, tr, ordered_save ? order_seq : 0, &last_saved, &saved, async);
      /* a resize stops this generation once its state is saved; unsaved, it trains on */
      if (!rc && ordered_save == MT_ORDER_RESIZE && saved) {
        st.stop = 1;
        if (c == c->all) mt_log_info("stopping after step %lld for a resize", (long long)tr->step);
      }
    }
    /* a pass that fails ends the run, as a save whose generation ends
     * does; the step, trained, is still reported, without the passes'
     * losses */
    if (!rc && validate) {
      rc = mt_trainer_eval(tr, MT_SPLIT_VALID, 0, mt_eval_first_batch(job, st.step, 0),
                           &st.val_loss);
      st.has_val = !rc;
    }
    if (!rc && end_passes && (rc = end_of_training(c, tr, &st))) st.has_final_val = st.has_test = 0;
    if ((validate || end_passes) && c == c->all && o->on_step) o->on_step(&st, o->arg);
    if (rc) return rc;
    /* a pause holds back nothing of this step: its scheduled save was
     * started above, and the one in flight commits before the wait, so a
     * node lost while paused costs no work */
    if (pause && !st.stop) {
      if (c->pending.active && (rc = finish_pending(c, tr, 1, &last_saved))) return rc;
      if ((rc = pause_loop(c, tr, &order_seq, &st.stop, &why, &last_saved))) return rc;
      if (st.stop && (rc = save_checkpoint(c, tr, 0, &last_saved, NULL, 0))) return rc;
    }
    if (st.stop) {
      report_stop(c, tr, why, last_saved);
      break;
    }
    /* the run's end: its checkpoint is what a longer run resumes from and,
     * without an export, the only copy of the trained weights; a failed
     * one is told as a stop's is (it was a "completed" run, exit 0) */
    if (tr->step >= job->train.steps && c->ckpt_dir[0] && last_saved != tr->step && c == c->all) {
      if (o->on_stopped) o->on_stopped(tr->step, MT_STOPPED_ASKED, c->save_err, last_saved, o->arg);
      mt_log_error("completed %lld steps, but the last step's checkpoint failed (above): a longer "
                   "run resumes from the one `latest` names%s",
                   (long long)tr->step,
                   o->export_path ? "" : ", and no export holds the trained weights");
    }
  }
  /* nothing to train (resumed at or past train.steps): the passes at the end
   * of training still run, as Megatron's pretrain runs them after a train()
   * with no iteration left, so a finished model gets its validation and test
   * losses, and a test pass that failed on its data runs once it is mended */
  if (resumed >= job->train.steps && !stopped && job->eval.interval > 0) {
    mt_step_stats st = {.step = tr->step};
    int rc = end_of_training(c, tr, &st);
    if (rc) return rc;
    char line[256];
    if (c->rank == 0) {
      mt_end_of_training_line(line, sizeof line, "val", st.final_val_loss);
      mt_log_info("%s", line);
    }
    if (c->rank == 0 && st.has_test) {
      mt_end_of_training_line(line, sizeof line, "test", st.test_loss);
      mt_log_info("%s", line);
    }
  }
  /* the job's own schedule stopped it: the run that ends the job exports */
  int scheduled = why == MT_STOPPED_TIME || why == MT_STOPPED_INTERVAL;
  if (o->export_path && scheduled && c == c->all)
    mt_log_info("export to %s skipped: the run stopped for %s; the run that ends it exports",
                o->export_path,
                why == MT_STOPPED_TIME ? "train.exit_duration_mins" : "train.exit_interval");
  if (o->export_path && !scheduled) {
    int64_t t0 = mt_mono_ms();
    int rc = mt_trainer_export(tr, o->export_path);
    if (rc) return mt_wraperr(rc, "export");
    if (c->rank == 0)
      mt_log_info("exported weights to %s in %.1f s", o->export_path, (mt_mono_ms() - t0) / 1e3);
  }
  if (c->rank != 0 || !tr->data) return 0;
  char consumed[1024];
  mt_data_source_describe(tr->data, (uint64_t)tr->consumed_samples, consumed, sizeof consumed);
  mt_log_info("data consumed: %s", consumed);
  return 0;
}

/* Joins group `name` (key prefix "<comm_prefix>/<name>") as rank `rank` of
 * `size`: over NCCL when dev is a GPU (the group moves device tensors),
 * else (and dev NULL: host values) over Gloo. */
static int join(rank_ctx *c, int slot, const char *name, int rank, int size, mt_device *dev,
                mt_comm_backend backend) {
  char prefix[192];
  snprintf(prefix, sizeof prefix, "%s/%s", c->o->comm_prefix ? c->o->comm_prefix : "standalone",
           name);
  mt_comm_opts co = {.store = c->store,
                     .name = name,
                     .prefix = prefix,
                     .rank = rank,
                     .size = size,
                     .timeout_ms = c->o->comm_timeout_ms ? c->o->comm_timeout_ms : 300000,
                     .backend = dev && dev->kind == MT_DEVICE_CUDA ? MT_COMM_NCCL : backend,
                     .device = dev,
                     .local_begin = c->all[0].rank,
                     .local_count = c->n_local,
                     .cancel = c->cancel};
  mt_comm *comm = NULL;
  int rc = mt_comm_create(&comm, &co);
  /* published, then the flag read (both sequentially consistent, as the
   * aborts set the flag, then read the comms): a comm made while an abort
   * scanned is seen by that scan or aborted here */
  __atomic_store_n(&c->comms[slot], comm, __ATOMIC_SEQ_CST);
  if (!rc && __atomic_load_n(c->cancel, __ATOMIC_SEQ_CST)) {
    mt_comm_abort(comm);
    rc = mt_seterr(MT_ECANCELED, "comm %s: made after the ranks were cancelled", name);
  }
  return rc;
}

/* Megatron's rank order: world rank = tp_rank + tp * (dp_rank + dp * pp_rank).
 * The world group carries host values (the step's agreed loss, norm and
 * order word, checkpoint bookkeeping, export): Gloo on every device, as
 * PyTorch keeps a Gloo group beside NCCL. The others move tensors of dev. */
static int make_groups(rank_ctx *c, mt_groups *g, mt_device *dev) {
  const mt_parallel_spec *ps = &c->o->job->parallel;
  int tp = ps->tp, dp = mt_job_dp(c->o->job), pp = ps->pp;
  *g = (mt_groups){.tp_rank = c->rank % tp,
                   .tp_size = tp,
                   .dp_rank = c->rank / tp % dp,
                   .dp_size = dp,
                   .pp_rank = c->rank / (tp * dp),
                   .pp_size = pp};
  char name[64];
  int rc = 0;
  if (c->size > 1) rc = join(c, COMM_WORLD, "world", c->rank, c->size, NULL, MT_COMM_GLOO_PROCS);
  if (!rc && tp > 1) {
    snprintf(name, sizeof name, "tp.pp%d.dp%d", g->pp_rank, g->dp_rank);
    rc = join(c, COMM_TP, name, g->tp_rank, tp, dev, MT_COMM_GLOO);
  }
  if (!rc && dp > 1) {
    snprintf(name, sizeof name, "dp.pp%d.tp%d", g->pp_rank, g->tp_rank);
    rc = join(c, COMM_DP, name, g->dp_rank, dp, dev, MT_COMM_GLOO);
  }
  /* the links to the stages before and after, lower link first on every
   * stage so no two stages wait for each other; the lower stage is rank 0.
   * Link s joins stage s to s + 1; with virtual stages link pp - 1 closes
   * the ring (the last stage's chunks feed the first stage's next ones),
   * last on both of its stages */
  int ring = ps->virtual_stages > 1;
  for (int k = 0; k < 2 && pp > 1 && !rc; k++) {
    int link = k == 0 ? g->pp_rank - 1 : g->pp_rank;
    if (ring && g->pp_rank == 0) link = k == 0 ? 0 : pp - 1;
    if (link < 0 || (!ring && link >= pp - 1)) continue;
    /* this stage is the link's upper end (it receives the activations) */
    int up = (link + 1) % pp == g->pp_rank;
    snprintf(name, sizeof name, "pp.act.s%d.dp%d.tp%d", link, g->dp_rank, g->tp_rank);
    rc = join(c, up ? COMM_ACT_IN : COMM_ACT_OUT, name, up, 2, dev, MT_COMM_GLOO);
    snprintf(name, sizeof name, "pp.grad.s%d.dp%d.tp%d", link, g->dp_rank, g->tp_rank);
    if (!rc) rc = join(c, up ? COMM_GRAD_OUT : COMM_GRAD_IN, name, up, 2, dev, MT_COMM_GLOO);
  }
  /* the tied embedding's two copies (untied: no copy, no group) */
  if (!rc && pp > 1 && !c->o->job->model.untie_embeddings &&
      (g->pp_rank == 0 || g->pp_rank == pp - 1)) {
    snprintf(name, sizeof name, "embed.dp%d.tp%d", g->dp_rank, g->tp_rank);
    rc = join(c, COMM_EMBED, name, g->pp_rank == 0 ? 0 : 1, 2, dev, MT_COMM_GLOO);
  }
  g->world = c->comms[COMM_WORLD], g->dp = c->comms[COMM_DP], g->tp = c->comms[COMM_TP];
  g->embed = c->comms[COMM_EMBED];
  g->act_in = c->comms[COMM_ACT_IN], g->act_out = c->comms[COMM_ACT_OUT];
  g->grad_in = c->comms[COMM_GRAD_IN], g->grad_out = c->comms[COMM_GRAD_OUT];
  return rc;
}

/* A rank that failed while its device held a fault not told yet: the
 * generation ended under it (a rank that failed first, and its node
 * aborting the rest) before its step's sync could tell the fault, in a
 * bucket's reduce, a pipeline exchange or a tensor-parallel all-reduce,
 * which say only "aborted". The device is asked without waiting; a fault
 * comes first, with the device's code, then what failed. */
static int pending_fault_first(mt_device *dev, int rc) {
  char fault[512], then[1024];
  if (!mt_device_fault_pending(dev, fault, sizeof fault)) return rc;
  mt_msg_cut_whole(fault, sizeof fault);
  mt_errmsg_keep(then, sizeof then);
  return mt_seterr(MT_EIO, "%s; then %s", fault, then);
}

static void *rank_main(void *arg) {
  rank_ctx *c = arg;
  const mt_local_opts *o = c->o;
  omp_set_num_threads(c->omp_threads);
  char spec[32];
  if (o->devices)
    snprintf(spec, sizeof spec, "%s", o->devices[c - c->all]);
  else
    snprintf(spec, sizeof spec, "%s:%d", o->device_kind ? o->device_kind : "cpu", c->rank);
  mt_device dev;
  mt_trainer tr;
  mt_groups g;
  int have_dev = 0, have_tr = 0;
  int rc = mt_device_open(&dev, spec);
  have_dev = !rc;
  if (!rc) rc = make_groups(c, &g, &dev);
  int joined = !rc;
  __atomic_fetch_sub(c->joining, 1, __ATOMIC_ACQ_REL);
  if (!rc) rc = mt_trainer_create(&tr, o->job, &dev, &g);
  have_tr = !rc;
  if (!rc) rc = rank_loop(c, &tr);
  if (have_tr) profile_window(c, &tr, 1); /* a capture the run ended in */
  if (rc && have_dev) rc = pending_fault_first(&dev, rc);
  if (rc) {
    snprintf(c->err, sizeof c->err, "rank %d (%s): %s", c->rank, spec, mt_errmsg());
    c->rc = rc;
    int none = -1;
    __atomic_compare_exchange_n(c->first_failed, &none, (int)(c - c->all), 0, __ATOMIC_ACQ_REL,
                                __ATOMIC_ACQUIRE);
    /* a rank of this process still making its groups may be past the
     * store, in gloo's connect to a peer whose own join the flag below
     * would cut short: that connect waits out the whole deadline, as
     * nothing wakes it. A rank that made its groups (so no peer here
     * waits for its keys) lets the others finish theirs first, a bounded
     * while: one still waiting for a node that never comes is cancelled. */
    for (int waited = 0;
         joined && waited < 10000 && __atomic_load_n(c->joining, __ATOMIC_ACQUIRE) > 0 &&
         !__atomic_load_n(c->cancel, __ATOMIC_SEQ_CST);
         waited += 10) {
      struct timespec ts = {0, 10 * 1000 * 1000};
      nanosleep(&ts, NULL);
    }
    /* the others would wait for this rank until their deadline. Many
     * failures are agreed on by every rank (a checkpoint that cannot load):
     * let the others leave their last collective on their own first, so
     * that each ends with the failure, not with an abort. */
    __atomic_store_n(c->cancel, 1, __ATOMIC_SEQ_CST);
    int agreed = rc != MT_EIO && rc != MT_ETIMEDOUT && rc != MT_ECANCELED; /* not a comm failure */
    for (int waited = 0;
         agreed && waited < 2000 && __atomic_load_n(c->running, __ATOMIC_ACQUIRE) > 1;
         waited += 10) {
      struct timespec ts = {0, 10 * 1000 * 1000};
      nanosleep(&ts, NULL);
    }
    for (int r = 0; r < c->n_local; r++)
      for (int k = 0; k < N_COMMS; k++) {
        mt_comm *peer = __atomic_load_n(&c->all[r].comms[k], __ATOMIC_SEQ_CST);
        if (peer) mt_comm_abort(peer);
      }
  }
  mt_trainer_save_discard(&c->pending); /* an async save the failure interrupted */
  __atomic_fetch_sub(c->running, 1, __ATOMIC_ACQ_REL);
  if (have_tr) mt_trainer_destroy(&tr);
  if (have_dev) mt_device_close(&dev);
  return NULL;
}

/* The store the ranks bootstrap through, made cancellable: a rank still
 * waiting for a group's peers when another rank of this process failed must
 * not wait out the deadline for peers that will never come. Waits are cut
 * into 100 ms slices that check the flag. */
typedef struct cancel_store {
  mt_store base;
  mt_store *inner;
  volatile int *cancel;
} cancel_store;

static int cs_set(mt_store *s, const char *key, const void *value, size_t bytes) {
  return mt_store_set(((cancel_store *)s)->inner, key, value, bytes);
}
static int cs_get(mt_store *s, const char *key, void **value, size_t *bytes, int timeout_ms) {
  cancel_store *c = (cancel_store *)s;
  /* The deadline is read off the clock: a slice can take longer than 100 ms
   * when the store is slow to answer. */
  int64_t end = timeout_ms < 0 ? -1 : mt_mono_ms() + timeout_ms;
  for (;;) {
    if (__atomic_load_n(c->cancel, __ATOMIC_SEQ_CST))
      return mt_seterr(MT_ECANCELED, "store: wait for %s cancelled: a rank failed", key);
    int64_t left = end < 0 ? 100 : end - mt_mono_ms();
    int slice = left < 0 ? 0 : left < 100 ? (int)left : 100;
    int rc = mt_store_get(c->inner, key, value, bytes, slice);
    if (rc != MT_ETIMEDOUT || (end >= 0 && mt_mono_ms() >= end)) return rc;
  }
}
static int cs_add(mt_store *s, const char *key, int64_t delta, int64_t *result) {
  return mt_store_add(((cancel_store *)s)->inner, key, delta, result);
}
static int cs_check(mt_store *s, const char *key) {
  return mt_store_check(((cancel_store *)s)->inner, key);
}
static int cs_del(mt_store *s, const char *key) {
  return mt_store_del(((cancel_store *)s)->inner, key);
}
static void cs_free(mt_store *s) { (void)s; /* embedded in mt_local */ }

struct mt_local {
  rank_ctx *ranks;
  pthread_t *threads;
  int n, started, first_failed, rc;
  char err[1024];  /* the start failure's message: mt_local_wait may run on another thread */
  mt_store *own;   /* the in-process store, when no other was given */
  cancel_store cs; /* what the ranks use: store, cancelled when a rank fails */
  volatile int cancel;
  int running; /* ranks not yet ended */
  int joining; /* ranks not yet past making their groups */
  /* held by mt_local_abort while it touches the ranks' comms, and by
   * mt_local_close while it takes one out to destroy it */
  pthread_mutex_t comms_mu;
};

/* Where the export goes must take it, checked before the first step: found
 * only after the whole run, a missing parent lost the trained model of a
 * job without checkpoints. A file to write, or a directory (one that
 * exists, or a path ending in '/') for Hugging Face's sharded layout. */
static int check_export_path(const char *path) {
  struct stat st;
  char dir[4096];
  int is_dir = mt_st_export_dir(path, dir, sizeof dir);
  if (is_dir && !stat(dir, &st)) { /* the files go into it */
    if (access(dir, W_OK))
      return mt_seterr(MT_EINVAL, "checkpoint.export %s: cannot write in it: %s", path,
                       strerror(errno));
    return 0;
  }
  char *slash = strrchr(dir, '/'); /* the file, or the directory to make, goes here */
  if (!slash)
    snprintf(dir, sizeof dir, ".");
  else if (slash == dir)
    dir[1] = 0;
  else
    *slash = 0;
  if (stat(dir, &st))
    return mt_seterr(MT_EINVAL, "checkpoint.export %s: the directory %s does not exist", path, dir);
  if (!S_ISDIR(st.st_mode))
    return mt_seterr(MT_EINVAL, "checkpoint.export %s: %s is not a directory", path, dir);
  if (access(dir, W_OK))
    return mt_seterr(MT_EINVAL, "checkpoint.export %s: cannot write in %s: %s", path, dir,
                     strerror(errno));
  return 0;
}

int mt_local_start(const mt_local_opts *o, mt_local **out) {
  const mt_parallel_spec *ps = &o->job->parallel;
  int size = mt_job_dp(o->job) * ps->pp * ps->tp;
  int procs = o->procs > 1 ? o->procs : 1;
  *out = NULL;
  if (size < 1) return mt_seterr(MT_EINVAL, "local: %d ranks", size);
  int n, r0;
  if (o->rank_count > 0) {
    if (o->rank_begin < 0 || o->rank_begin + o->rank_count > size)
      return mt_seterr(MT_EINVAL, "local: ranks [%d, %d) outside the world of %d", o->rank_begin,
                       o->rank_begin + o->rank_count, size);
    n = o->rank_count, r0 = o->rank_begin;
  } else {
    if (size % procs || o->proc_rank < 0 || o->proc_rank >= procs)
      return mt_seterr(MT_EINVAL,
                       "local: %d ranks cannot be split evenly over %d processes "
                       "(this is process %d)",
                       size, procs, o->proc_rank);
    n = size / procs, r0 = o->proc_rank * n;
  }
  /* world rank 0 writes the export, and to a directory so does each
   * stage's first rank (tp 0 of replica 0): their processes check before
   * any step that they can write there (or make it). Whether it is one
   * directory shared by all is found only at the end: world rank 0 writes
   * no index while a stage's file is not there. */
  int writes = r0 == 0;
  int stage_ranks = ps->tp * (size / (ps->tp * ps->pp));
  for (int r = r0; r < r0 + n && o->export_path && mt_st_names_a_directory(o->export_path); r++)
    writes |= r % stage_ranks == 0;
  if (writes && o->export_path) {
    int rc = check_export_path(o->export_path);
    if (rc) return rc;
  }
  /* every rank writes its slice of each checkpoint: this process checks
   * before any step that it can write there (an unwritable checkpoint.dir
   * failed every save of a run that went on to its end). At a job's start
   * that is the job's fault (refused: exit 2); in a later generation the
   * job wrote there before, so it is this node's storage (a mount gone):
   * the node's failure, which re-forms the cluster rather than end the job */
  char ckpt_dir[1200] = "";
  if (o->checkpoint_dir)
    snprintf(ckpt_dir, sizeof ckpt_dir, "%s", o->checkpoint_dir);
  else if (o->job->checkpoint.dir[0])
    mt_checkpoint_job_dir(o->job, ckpt_dir, sizeof ckpt_dir);
  if (ckpt_dir[0] && mt_ckpt_check_dir(ckpt_dir)) {
    char why[1500];
    snprintf(why, sizeof why, "%s", mt_ckpt_unprefixed(mt_errmsg()));
    return mt_seterr(o->generation > 1 ? MT_EIO : MT_EINVAL, "checkpoint.dir %s: %s",
                     o->job->checkpoint.dir, why);
  }
  if (n < size && !o->store)
    return mt_seterr(MT_EINVAL, "local: ranks spread over processes need a shared store");
  mt_local *l = calloc(1, sizeof *l);
  if (!l) return mt_seterr(MT_ENOMEM, "local: %d ranks", n);
  l->ranks = calloc((size_t)n, sizeof *l->ranks);
  l->threads = calloc((size_t)n, sizeof *l->threads);
  l->n = n, l->first_failed = -1;
  pthread_mutex_init(&l->comms_mu, NULL);
  mt_store *store = o->store;
  int rc = l->ranks && l->threads ? 0 : mt_seterr(MT_ENOMEM, "local: %d ranks", n);
  if (!rc && size > 1 && !store && !(rc = mt_store_mem_new(&l->own))) store = l->own;
  if (store) {
    l->cs = (cancel_store){.base = {.set = cs_set,
                                    .get = cs_get,
                                    .add = cs_add,
                                    .check = cs_check,
                                    .del = cs_del,
                                    .free = cs_free,
                                    .kind = store->kind},
                           .inner = store,
                           .cancel = &l->cancel};
    store = &l->cs.base;
  }
  int cores = o->omp_threads > 0 ? o->omp_threads : omp_get_max_threads();
  mt_range_init(); /* NVTX's tool, before the rank threads' first ranges */
  for (int k = 0; !rc && k < n; k++) {
    l->ranks[k] = (rank_ctx){.o = o,
                             .rank = r0 + k,
                             .size = size,
                             .store = store,
                             .all = l->ranks,
                             .n_local = n,
                             .omp_threads = cores / n > 0 ? cores / n : 1,
                             .first_failed = &l->first_failed,
                             .cancel = &l->cancel,
                             .running = &l->running,
                             .joining = &l->joining};
    memcpy(l->ranks[k].ckpt_dir, ckpt_dir, sizeof ckpt_dir); /* checked above */
    __atomic_fetch_add(&l->running, 1, __ATOMIC_ACQ_REL);
    __atomic_fetch_add(&l->joining, 1, __ATOMIC_ACQ_REL);
    if (pthread_create(&l->threads[k], NULL, rank_main, &l->ranks[k]))
      rc = mt_seterr(MT_ENOMEM, "local: cannot start the thread of rank %d", r0 + k),
      __atomic_fetch_sub(&l->running, 1, __ATOMIC_ACQ_REL),
      __atomic_fetch_sub(&l->joining, 1, __ATOMIC_ACQ_REL);
    else
      l->started++;
  }
  l->rc = rc;
  if (rc) snprintf(l->err, sizeof l->err, "%s", mt_errmsg());
  *out = l;
  return 0; /* a start failure is reported by mt_local_wait, after the started ranks end */
}

void mt_local_abort(mt_local *l) {
  if (!l) return;
  __atomic_store_n(&l->cancel, 1, __ATOMIC_SEQ_CST);
  pthread_mutex_lock(&l->comms_mu);
  for (int r = 0; r < l->started; r++)
    for (int k = 0; k < N_COMMS; k++) {
      mt_comm *c = __atomic_load_n(&l->ranks[r].comms[k], __ATOMIC_SEQ_CST);
      if (c) mt_comm_abort(c);
    }
  pthread_mutex_unlock(&l->comms_mu);
}

int mt_local_wait(mt_local *l) {
  if (!l) return 0;
  int rc = l->rc;
  if (rc) mt_local_abort(l); /* the started ranks would wait for the missing ones */
  for (int r = 0; r < l->started; r++) pthread_join(l->threads[r], NULL);
  /* the rank that failed first; the others failed because it aborted them */
  if (rc) return mt_seterr(rc, "%s", l->err);
  if (l->first_failed >= 0)
    rc = mt_seterr(l->ranks[l->first_failed].rc, "%s", l->ranks[l->first_failed].err);
  return rc;
}

void mt_local_close(mt_local *l) {
  if (!l) return;
  for (int r = 0; r < l->n && l->ranks; r++)
    for (int k = 0; k < N_COMMS; k++) {
      pthread_mutex_lock(&l->comms_mu);
      mt_comm *c = __atomic_exchange_n(&l->ranks[r].comms[k], NULL, __ATOMIC_SEQ_CST);
      pthread_mutex_unlock(&l->comms_mu);
      mt_comm_destroy(c); /* outside the lock: an abort meanwhile finds it gone */
    }
}

void mt_local_free(mt_local *l) {
  if (!l) return;
  mt_local_close(l);
  pthread_mutex_destroy(&l->comms_mu);
  mt_store_free(l->own);
  free(l->ranks);
  free(l->threads);
  free(l);
}

int mt_local_run(const mt_local_opts *o) {
  mt_local *l;
  int rc = mt_local_start(o, &l);
  if (rc) return rc;
  rc = mt_local_wait(l);
  mt_local_free(l);
  return rc;
}
