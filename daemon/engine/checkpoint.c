/* checkpoint.c — the collective save and resume of a trainer's state. */
#include "checkpoint.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ckpt.h"
#include "ckpt_export.h"
#include "err.h"
#include "log.h"
#include "monotime.h"

static const char *const arrays[] = {"master", "adam_m", "adam_v"};

void mt_checkpoint_job_dir(const mt_job *job, char *out, size_t size) {
  snprintf(out, size, "%s/%s", job->checkpoint.dir, job->name);
}

/* A save's messages between ranks: why a rank failed, what one is stuck at. */
#define SAVE_MSG_BYTES 1024

/* How a rank is named in the messages other ranks repeat: "world rank 5
 * (tp 1, pp 0, dp 1; cpu:1 of node n2)". */
static void rank_place(const mt_trainer *tr, char *out, size_t size) {
  const mt_groups *g = &tr->g;
  snprintf(out, size, "world rank %d (tp %d, pp %d, dp %d; %s%s%s)",
           g->world ? mt_comm_rank(g->world) : 0, g->tp_rank, g->pp_rank, g->dp_rank,
           tr->dev ? tr->dev->name : "?", tr->node ? " of node " : "", tr->node ? tr->node : "");
}

/* Every rank learns whether any rank failed and, when one did, why: a rank
 * whose own part failed (failed, its error in err) keeps its own, every
 * other takes the lowest failing world rank's, with that rank's place, so
 * each node's log and the reason the job reports name the rank, its node
 * and the file, not only the failing node's log. On return err holds
 * "checkpoint of step S: <place> failed[ (and K other rank(s))]: <error>"
 * when *any, and *first_here says whether this rank is that lowest one.
 * Two all-reduces of an int and, after a failure, one broadcast; the world
 * group moves host memory on every device (the dp group of GPU ranks is
 * NCCL's, device memory only). */
static int agree(const mt_trainer *tr, int64_t step, int failed, char err[SAVE_MSG_BYTES], int *any,
                 int *first_here) {
  mt_comm *c = tr->g.world;
  struct {
    char place[160];
    char why[SAVE_MSG_BYTES];
  } msg = {"", ""};
  rank_place(tr, msg.place, sizeof msg.place);
  if (failed) snprintf(msg.why, sizeof msg.why, "%s", err);
  int n = failed ? 1 : 0, first = 0, rc = 0;
  if (c) {
    /* how many failed, and the lowest failing rank as size - rank under MAX
     * (0: none), so nothing is allocated on a path a failure may take */
    int size = mt_comm_size(c);
    int32_t count = n, lowest = failed ? size - mt_comm_rank(c) : 0;
    if ((rc = mt_comm_allreduce(c, &count, &count, 1, MT_COMM_I32, MT_COMM_SUM)) ||
        (rc = mt_comm_allreduce(c, &lowest, &lowest, 1, MT_COMM_I32, MT_COMM_MAX)))
      return rc;
    n = count, first = lowest ? size - lowest : -1;
  }
  *any = n > 0;
  *first_here = failed && (!c || mt_comm_rank(c) == first);
  if (!n) return 0;
  char own_place[160], own_why[SAVE_MSG_BYTES];
  memcpy(own_place, msg.place, sizeof own_place);
  memcpy(own_why, msg.why, sizeof own_why);
  if (c && (rc = mt_comm_broadcast(c, &msg, sizeof msg, MT_COMM_U8, first))) return rc;
  msg.place[sizeof msg.place - 1] = 0, msg.why[sizeof msg.why - 1] = 0;
  char others[64] = "";
  if (n > 1) snprintf(others, sizeof others, " (and %d other rank(s))", n - 1);
  /* the reason cut to what is left of the message's bytes after the rest
   * (at most 19 + 20 + 2 + 159 + 7 + 47 + 2) */
  snprintf(err, SAVE_MSG_BYTES, "checkpoint of step %lld: %s failed%s: %.760s", (long long)step,
           failed ? own_place : msg.place, others, failed ? own_why : msg.why);
  return 0;
}

/* The bytes of this rank's shard file (its three arrays): the deadline of a
 * wait for storage grows by the largest at 100 MB/s. */
static int64_t shard_bytes(const mt_trainer *tr) { return 12 * (int64_t)tr->model.num_params; }

/* Every rank gives up on a storage step together: each learns how many
 * ranks are still at it and, from the lowest of them, which rank that is
 * and what it is doing. Collective; the error is MT_ETIMEDOUT, as for a
 * lost peer, since the generation cannot go on while a rank is stuck. */
static int gave_up(const mt_trainer *tr, int64_t step, int lowest, int busy, const char *what,
                   double waited_s, const char *allowed) {
  mt_comm *w = tr->g.world;
  int32_t n = busy;
  char who[SAVE_MSG_BYTES] = "";
  if (mt_comm_rank(w) == lowest) {
    char place[160];
    rank_place(tr, place, sizeof place);
    snprintf(who, sizeof who, "%s still %.800s", place, what);
  }
  int rc = mt_comm_allreduce(w, &n, &n, 1, MT_COMM_I32, MT_COMM_SUM);
  if (!rc) rc = mt_comm_broadcast(w, who, sizeof who, MT_COMM_U8, lowest);
  if (rc)
    return mt_wraperr(rc, "checkpoint of step %lld: giving up on a rank's storage",
                      (long long)step);
  who[sizeof who - 1] = 0;
  char others[64] = "";
  if (n > 1) snprintf(others, sizeof others, " (and %d other rank(s) still at theirs)", n - 1);
  mt_seterr(MT_ETIMEDOUT,
            "checkpoint of step %lld: %s after %.1f s%s, past the comm deadline (%d ms) plus %s "
            "at 100 MB/s: given up (its storage is stalled or slower than that)",
            (long long)step, who, waited_s, others, mt_comm_timeout(w), allowed);
  /* a rank that returns ends the generation at once, aborting the comms of
   * its process: none returns before every rank has the message (a barrier
   * only the late ones may see aborted, after it is theirs) */
  char msg[2 * SAVE_MSG_BYTES];
  snprintf(msg, sizeof msg, "%s", mt_errmsg());
  mt_comm_barrier(w);
  return mt_seterr(MT_ETIMEDOUT, "%s", msg);
}

/* A storage step of a save, one rank's part of it: fn(arg) (NULL: none on
 * this rank), its result in rc and err, what it does in what (for a wait
 * given up on). */
typedef struct storage_op {
  int (*fn)(void *arg);
  void *arg;
  char what[SAVE_MSG_BYTES / 2];
  int done; /* atomic */
  int rc;
  char err[SAVE_MSG_BYTES];
} storage_op;

static void *storage_main(void *p) {
  storage_op *op = p;
  op->rc = op->fn(op->arg);
  if (op->rc) snprintf(op->err, sizeof op->err, "%s", mt_errmsg());
  __atomic_store_n(&op->done, 1, __ATOMIC_RELEASE);
  return NULL;
}

/* Runs a storage step that may stall on a slow disk or NFS server (making
 * the step directory, creating or committing a shard file, the manifest and
 * `latest`) on a thread, while every rank all-reduces about every 20 ms until
 * every rank's part is done: the rule of the slice writes, so no rank gives
 * up on a slow writer at the comm deadline. Past the comm deadline plus the
 * largest shard file at 100 MB/s every rank gives up together, naming the
 * lowest world rank still at it and what it was doing (MT_ETIMEDOUT). The
 * thread is always joined before the return (what it was given must
 * outlive it): a rank stuck on its storage says so and waits for it. 0 when
 * every rank's part returned; then op->rc and op->err are this rank's. */
static int storage_wait(mt_trainer *tr, int64_t step, storage_op *op) {
  mt_comm *w = tr->g.world;
  pthread_t thread;
  int threaded = 0;
  op->rc = 0, op->err[0] = 0, op->done = 0;
  if (op->fn && w && !pthread_create(&thread, NULL, storage_main, op))
    threaded = 1;
  else if (op->fn) /* alone, or no thread to be had: here, as before */
    storage_main(op);
  if (!w) return 0;
  int size = mt_comm_size(w), me = mt_comm_rank(w), rc = 0;
  double t0 = mt_mono_s(), give_up_ms = 0.0;
  for (;;) {
    /* a rank at work gives its thread up to 20 ms before each round; the
     * others wait for it inside the all-reduce */
    for (int i = 0; i < 20 && op->fn && !__atomic_load_n(&op->done, __ATOMIC_ACQUIRE); i++) {
      struct timespec ts = {0, 1000 * 1000};
      nanosleep(&ts, NULL);
    }
    int busy = op->fn && !__atomic_load_n(&op->done, __ATOMIC_ACQUIRE);
    int64_t v[3] = {busy ? size - me : 0, give_up_ms > 0.0 && 1e3 * mt_mono_s() > give_up_ms,
                    shard_bytes(tr)};
    if ((rc = mt_comm_allreduce(w, v, v, 3, MT_COMM_I64, MT_COMM_MAX))) {
      rc = mt_wraperr(rc, "checkpoint of step %lld", (long long)step);
      break;
    }
    if (give_up_ms == 0.0) give_up_ms = 1e3 * t0 + mt_comm_timeout(w) + (double)v[2] / 1e5;
    if (!v[0]) break;
    if (v[1]) {
      rc = gave_up(tr, step, size - (int)v[0], busy, op->what, mt_mono_s() - t0,
                   "the largest shard file");
      if (busy) { /* its own line, whichever rank the message names */
        char place[160];
        rank_place(tr, place, sizeof place);
        mt_log_error("checkpoint of step %lld: given up on %s, still %s after %.1f s; it waits "
                     "for its storage to return before it ends",
                     (long long)step, place, op->what, mt_mono_s() - t0);
      }
      break;
    }
  }
  if (threaded) {
    char msg[2 * SAVE_MSG_BYTES];
    snprintf(msg, sizeof msg, "%s", rc ? mt_errmsg() : "");
    pthread_join(thread, NULL);
    if (rc) mt_seterr(rc, "%s", msg); /* the join may have run on: the message stays */
  }
  return rc;
}

/* This rank's part of its shard's arrays: [lo, lo + n) of the unpadded flat
 * parameters (n may be 0 for the last ranks when padding fills their slice). */
static void my_slice(const mt_trainer *tr, uint64_t *lo, uint64_t *n) {
  uint64_t total = tr->model.num_params;
  *lo = tr->shard_lo < total ? tr->shard_lo : total;
  uint64_t hi = tr->shard_lo + tr->shard_n < total ? tr->shard_lo + tr->shard_n : total;
  *n = hi - *lo;
}

/* "<step dir>/shard_tp01_pp000.bin": this rank's shard file, for messages. */
static void shard_file(const mt_checkpoint_save *sv, char *out, size_t size) {
  snprintf(out, size, "%s/shard_tp%02d_pp%03d.bin", sv->res.path, sv->d.tp, sv->d.pp);
}

/* The slow part of a save, on the background thread in async mode: write
 * this rank's slices from the host copy, fsync, checksum. No collectives. */
static void *write_slices(void *arg) {
  mt_checkpoint_save *sv = arg;
  if (sv->n && !sv->failed && !sv->other_failed) {
    const float *src[3] = {sv->host, sv->host + sv->n, sv->host + 2 * sv->n};
    if (mt_ckpt_shard_write(&sv->txn, &sv->d, sv->lo, sv->n, src, 0, &sv->chunks)) {
      sv->failed = 1;
      snprintf(sv->err, sizeof sv->err, "%s", mt_errmsg());
    }
  }
  __atomic_store_n(&sv->written, 1, __ATOMIC_RELEASE);
  return NULL;
}

static int claim_step(void *arg) {
  mt_checkpoint_save *sv = arg;
  return mt_ckpt_begin(&sv->txn, sv->job_dir, sv->res.step);
}

static int create_shard(void *arg) {
  mt_checkpoint_save *sv = arg;
  return mt_ckpt_shard_create(&sv->txn, &sv->d, &sv->chunks);
}

static int commit_shard(void *arg) {
  mt_checkpoint_save *sv = arg;
  return mt_ckpt_shard_commit(&sv->txn, &sv->d);
}

int mt_trainer_save_begin(mt_trainer *tr, const char *job_dir, mt_checkpoint_save *sv) {
  const mt_groups *g = &tr->g;
  int is0 = !g->world || mt_comm_rank(g->world) == 0;
  memset(sv, 0, sizeof *sv);
  sv->t0 = mt_mono_s();
  sv->res.step = tr->step;
  sv->adam_t = tr->opt.t;
  sv->lr_samples = tr->lr_samples;
  sv->rolled_back_to = tr->rolled_back_to;
  sv->consumed_samples = tr->consumed_samples;
  sv->scaler = tr->scaler;
  snprintf(sv->job_dir, sizeof sv->job_dir, "%s", job_dir);
  snprintf(sv->res.path, sizeof sv->res.path, "%s/step_%08lld", job_dir, (long long)tr->step);
  int rc = 0, any = 0;

  /* rank 0 claims the directory (the others poll meanwhile); all learn its tag */
  storage_op op = {.fn = is0 ? claim_step : NULL, .arg = sv};
  snprintf(op.what, sizeof op.what, "making the step directory %.400s", sv->res.path);
  if ((rc = storage_wait(tr, tr->step, &op))) return rc;
  struct {
    int32_t rc;
    char tag[sizeof sv->txn.tag];
    char why[SAVE_MSG_BYTES];
  } begin = {op.rc, "", ""};
  if (is0) {
    char place[160];
    rank_place(tr, place, sizeof place);
    memcpy(begin.tag, sv->txn.tag, sizeof begin.tag);
    snprintf(begin.why, sizeof begin.why, "%s failed: %.800s", place, op.err);
  }
  if (g->world && (rc = mt_comm_broadcast(g->world, &begin, sizeof begin, MT_COMM_U8, 0)))
    return mt_wraperr(rc, "checkpoint of step %lld", (long long)tr->step);
  begin.why[sizeof begin.why - 1] = 0;
  if (begin.rc) { /* every rank says rank 0's error */
    sv->res.failed_here = sv->res.failed_first = is0;
    return mt_seterr(begin.rc, "checkpoint of step %lld: %s", (long long)tr->step, begin.why);
  }
  /* a rank that cannot (its node's own checkpoint_dir path) fails the save
   * with the others at the agreement below, not alone before it */
  if (!is0 && mt_ckpt_txn_set(&sv->txn, job_dir, tr->step, begin.tag)) {
    sv->failed = 1;
    snprintf(sv->err, sizeof sv->err, "%s", mt_errmsg());
  }

  sv->d = (mt_ckpt_shard_desc){.tp = g->tp_rank,
                               .pp = g->pp_rank,
                               .n = tr->model.num_params,
                               .n_arrays = 3,
                               .arrays = arrays};
  my_slice(tr, &sv->lo, &sv->n);
  /* a device with a fault not yet reported holds no state worth saving: the
   * save fails on every rank before anything is staged */
  if (!sv->failed && mt_device_sync(tr->dev)) {
    sv->failed = 1;
    snprintf(sv->err, sizeof sv->err, "its device: %s", mt_errmsg());
  }
  /* one dp rank creates the shard file before any dp rank writes into it
   * (sized and reserved whole: on some storage that takes a while) */
  char file[1400];
  shard_file(sv, file, sizeof file);
  op = (storage_op){.fn = !sv->failed && g->dp_rank == 0 ? create_shard : NULL, .arg = sv};
  snprintf(op.what, sizeof op.what, "creating its shard file %.400s (%.1f MB)", file,
           (double)shard_bytes(tr) / 1e6);
  if ((rc = storage_wait(tr, tr->step, &op))) goto storage_failed;
  if (op.rc) {
    sv->failed = 1;
    snprintf(sv->err, sizeof sv->err, "%s", op.err);
  }
  /* the message of a failure is agreed once, in save_finish: here only
   * whether to write at all */
  char ignored[SAVE_MSG_BYTES];
  int lowest;
  snprintf(ignored, sizeof ignored, "%s", sv->err);
  if ((rc = agree(tr, tr->step, sv->failed, ignored, &any, &lowest))) goto comm_failed;
  if (any && !sv->failed) sv->other_failed = 1;
  /* the state as of this step boundary, in host memory: training may go on */
  if (!sv->failed && !sv->other_failed && sv->n) {
    uint64_t n = sv->n, lo = sv->lo;
    sv->host = malloc(3 * n * sizeof(float));
    if (!sv->host) {
      sv->failed = 1;
      snprintf(sv->err, sizeof sv->err, "out of memory for %llu floats of host staging",
               (unsigned long long)(3 * n));
    } else if (mt_device_memcpy_dtoh(tr->dev, sv->host, tr->model.params + lo, n * sizeof(float)) ||
               mt_device_memcpy_dtoh(tr->dev, sv->host + n, tr->opt.m + (lo - tr->shard_lo),
                                     n * sizeof(float)) ||
               mt_device_memcpy_dtoh(tr->dev, sv->host + 2 * n, tr->opt.v + (lo - tr->shard_lo),
                                     n * sizeof(float))) {
      sv->failed = 1;
      snprintf(sv->err, sizeof sv->err, "%s", mt_errmsg());
    }
    sv->res.bytes = 3 * n * sizeof(float);
  }
  sv->active = 1;
  /* on a thread in a synchronous save too: its wait (mt_trainer_save_poll)
   * is then short all-reduces while the slowest rank still writes, not one
   * that outlasts the comm deadline at scale (1.4 GB a rank at 530B) */
  if (!pthread_create(&sv->thread, NULL, write_slices, sv)) {
    sv->has_thread = 1;
  } else { /* fails the save on every rank at its agreement: written here,
            * the others would wait for this rank in one all-reduce */
    if (!sv->failed)
      snprintf(sv->err, sizeof sv->err, "cannot start the writer thread of %.900s", file);
    sv->failed = 1;
    __atomic_store_n(&sv->written, 1, __ATOMIC_RELEASE);
  }
  return 0;

comm_failed:
  rc = mt_wraperr(rc, "checkpoint of step %lld", (long long)tr->step);
storage_failed:
  mt_ckpt_chunks_free(&sv->chunks);
  return rc;
}

/* World rank 0's commit of a save every rank wrote: the manifest and
 * `latest` (mt_ckpt_commit), then retention, on a thread while the others
 * poll (storage_wait). */
typedef struct manifest_commit {
  mt_checkpoint_save *sv;
  const mt_ckpt_meta *meta;
  const mt_ckpt_shard_desc *ds;
  int n_shards;
  const mt_ckpt_chunks *all;
} manifest_commit;

static int commit_manifest(void *arg) {
  manifest_commit *m = arg;
  mt_checkpoint_save *sv = m->sv;
  int rc = mt_ckpt_commit(&sv->txn, m->meta, m->ds, m->n_shards, m->all);
  if (rc) {
    char why[SAVE_MSG_BYTES];
    snprintf(why, sizeof why, "%s", mt_errmsg());
    mt_ckpt_abort(&sv->txn);
    return mt_seterr(rc, "%s", why);
  }
  return 0;
}

/* Every rank's slices are on disk: commit the shards, gather the chunk
 * records, and world rank 0 commits the manifest and `latest`. */
static int save_finish(mt_trainer *tr, mt_checkpoint_save *sv) {
  const mt_groups *g = &tr->g;
  int is0 = !g->world || mt_comm_rank(g->world) == 0;
  int64_t step = sv->res.step;
  int rc = 0, any = 0, lowest = 0;
  char err[SAVE_MSG_BYTES] = "";
  int failed = sv->failed;
  if (failed) snprintf(err, sizeof err, "%s", sv->err);
  if ((rc = agree(tr, step, failed, err, &any, &lowest))) goto comm_failed;
  if (!any) { /* every shard written: each one's dp rank 0 commits it */
    char file[1400];
    shard_file(sv, file, sizeof file);
    storage_op op = {.fn = g->dp_rank == 0 ? commit_shard : NULL, .arg = sv};
    snprintf(op.what, sizeof op.what, "committing its shard file %.400s (fsync, rename)", file);
    if ((rc = storage_wait(tr, step, &op))) return rc;
    failed = op.rc != 0;
    if (failed) snprintf(err, sizeof err, "%s", op.err);
    if ((rc = agree(tr, step, failed, err, &any, &lowest))) goto comm_failed;
  }
  if (any) {
    if (is0) mt_ckpt_abort(&sv->txn);
    sv->res.failed_here = failed, sv->res.failed_first = lowest;
    return mt_seterr(MT_EIO, "%s", err);
  }
  mt_ckpt_chunks all = {0};
  int records_rc = 0; /* rank 0 could not hold every chunk record */
  int n_shards = g->tp_size * g->pp_size;
  uint64_t *shard_n = calloc((size_t)n_shards, sizeof *shard_n); /* rank 0: n of every shard */
  if (!shard_n) return mt_seterr(MT_ENOMEM, "checkpoint: shard list");
  shard_n[g->pp_rank * g->tp_size + g->tp_rank] = tr->model.num_params;
  if (g->world) {
    int size = mt_comm_size(g->world);
    int64_t info[3] = {g->tp_rank, g->pp_rank, (int64_t)tr->model.num_params};
    int64_t *infos = calloc((size_t)size * 3, sizeof *infos);
    if (!infos) rc = mt_seterr(MT_ENOMEM, "checkpoint: shard list");
    if (!rc) rc = mt_comm_allgather(g->world, info, infos, 3, MT_COMM_I64);
    for (int r = 0; !rc && r < size; r++)
      shard_n[infos[3 * r + 1] * g->tp_size + infos[3 * r]] = (uint64_t)infos[3 * r + 2];
    free(infos);
    int64_t most = (int64_t)sv->chunks.n;
    if (!rc) rc = mt_comm_allreduce(g->world, &most, &most, 1, MT_COMM_I64, MT_COMM_MAX);
    size_t rec = sizeof(mt_ckpt_chunk), per = most ? (size_t)most : 1;
    uint8_t *mine = NULL, *every = NULL;
    int64_t *counts = NULL, my_count = (int64_t)sv->chunks.n;
    if (!rc) {
      mine = calloc(per, rec);
      every = calloc((size_t)size * per, rec);
      counts = calloc((size_t)size, sizeof *counts);
      if (!mine || !every || !counts) rc = mt_seterr(MT_ENOMEM, "checkpoint: chunk records");
    }
    if (!rc && sv->chunks.n) memcpy(mine, sv->chunks.v, sv->chunks.n * rec);
    if (!rc) rc = mt_comm_allgather(g->world, &my_count, counts, 1, MT_COMM_I64);
    if (!rc) rc = mt_comm_allgather(g->world, mine, every, per * rec, MT_COMM_U8);
    /* a record that cannot be added fails the commit as out of memory (the
     * others still hear it), not as records "missing" from a writer */
    for (int r = 0; !rc && is0 && !records_rc && r < size; r++)
      if (mt_ckpt_chunks_add(&all, (const mt_ckpt_chunk *)(every + (size_t)r * per * rec),
                             (size_t)counts[r]))
        records_rc =
            mt_seterr(MT_ENOMEM, "checkpoint: out of memory for rank %d's %lld chunk records", r,
                      (long long)counts[r]);
    free(mine), free(every), free(counts);
    if (rc) {
      mt_ckpt_chunks_free(&all);
      free(shard_n);
      goto comm_failed;
    }
  } else if (mt_ckpt_chunks_add(&all, sv->chunks.v, sv->chunks.n)) {
    records_rc =
        mt_seterr(MT_ENOMEM, "checkpoint: out of memory for %zu chunk records", sv->chunks.n);
  }

  /* rank 0 builds the manifest's records here, then commits on a thread
   * while every rank polls (storage_wait) */
  struct {
    int32_t rc;
    char why[SAVE_MSG_BYTES];
  } commit = {0, ""};
  json_t *pos = NULL, *extra = NULL;
  mt_ckpt_shard_desc *ds = NULL;
  mt_ckpt_meta meta;
  manifest_commit mc = {.sv = sv};
  if (is0 && records_rc) {
    commit.rc = records_rc;
    snprintf(commit.why, sizeof commit.why, "%s", mt_errmsg());
    mt_ckpt_abort(&sv->txn);
  } else if (is0) {
    const mt_job *job = tr->job;
    int64_t consumed = sv->consumed_samples;
    pos = json_pack("{s:I}", "consumed_samples", (json_int_t)consumed);
    /* what else the next step depends on: Adam's count (skipped steps do
     * not advance it) and the fp16 loss scaler; the same on every rank */
    const mt_loss_scale *ls = &sv->scaler; /* as of the save's step, not of its commit */
    extra = json_pack("{s:I, s:{s:f, s:i, s:i, s:I, s:I, s:I}}", "adam_t", (json_int_t)sv->adam_t,
                      "loss_scale", "scale", (double)ls->scale, "growth_tracker",
                      ls->growth_tracker, "hysteresis_tracker", ls->hysteresis_tracker, "steps",
                      (json_int_t)ls->steps, "skipped", (json_int_t)ls->skipped, "skipped_in_row",
                      (json_int_t)ls->skipped_in_row);
    /* where the LR schedule is under a batch ramp-up (kept by every run) */
    int incomplete =
        !pos || !extra || json_object_set_new(extra, "lr_samples", json_integer(sv->lr_samples));
    /* the rollback this timeline went through last: a start told the same
     * checkpoint.resume_step goes on from here rather than roll back again */
    if (!incomplete && sv->rolled_back_to >= 0)
      incomplete = json_object_set_new(extra, "rolled_back_to", json_integer(sv->rolled_back_to));
    /* the model, which parameter counts do not tell apart (another n_head
     * splits the same matrices another way): a resume compares it */
    const mt_model_spec *ms = &job->model;
    if (!incomplete)
      incomplete = json_object_set_new(
          extra, "model",
          json_pack("{s:i, s:i, s:i, s:i, s:i, s:i}", "n_layer", ms->n_layer, "n_embd", ms->n_embd,
                    "n_head", ms->n_head, "vocab_size", ms->vocab_size, "seq_len", ms->seq_len,
                    "max_positions", ms->max_positions));
    /* only untied: a tied model's record is as before (a record without it is tied) */
    if (!incomplete && ms->untie_embeddings)
      incomplete =
          json_object_set_new(json_object_get(extra, "model"), "untie_embeddings", json_true());
    /* the whole resolved job: a resume names what changed since */
    char *job_text = mt_job_to_json(job);
    json_t *job_json = job_text ? json_loads(job_text, 0, NULL) : NULL;
    free(job_text);
    if (job_json && extra)
      json_object_set_new(extra, "job", job_json); /* else only not named */
    else
      json_decref(job_json);
    meta = (mt_ckpt_meta){.job = job->name,
                          .job_hash = job->hash,
                          .step = step,
                          .consumed_samples = consumed,
                          .consumed_tokens = consumed * job->model.seq_len,
                          .seed = (int64_t)job->train.seed,
                          .data_position = pos,
                          .extra = extra,
                          .tp = g->tp_size,
                          .pp = g->pp_size,
                          .dp = g->dp_size};
    ds = incomplete ? NULL : calloc((size_t)n_shards, sizeof *ds);
    if (!ds) {
      /* a manifest without Adam's count or the scaler would resume as an
       * older format's, on another trajectory: no commit at all */
      commit.rc = mt_seterr(MT_ENOMEM, "checkpoint: out of memory for the %s",
                            incomplete ? "manifest's optimizer records" : "shard list");
      snprintf(commit.why, sizeof commit.why, "%s", mt_errmsg());
      mt_ckpt_abort(&sv->txn);
    } else {
      for (int p = 0; p < g->pp_size; p++)
        for (int t = 0; t < g->tp_size; t++)
          ds[p * g->tp_size + t] = (mt_ckpt_shard_desc){
              .tp = t, .pp = p, .n = shard_n[p * g->tp_size + t], .n_arrays = 3, .arrays = arrays};
      mc = (manifest_commit){.sv = sv, .meta = &meta, .ds = ds, .n_shards = n_shards, .all = &all};
    }
  }
  storage_op op = {.fn = mc.ds ? commit_manifest : NULL, .arg = &mc};
  snprintf(op.what, sizeof op.what, "committing the manifest and `latest` of %.400s", sv->res.path);
  rc = storage_wait(tr, step, &op);
  if (!rc && op.rc) {
    commit.rc = op.rc;
    snprintf(commit.why, sizeof commit.why, "%s", op.err);
  }
  if (is0 && commit.rc) { /* every rank says rank 0's error */
    char place[160], why[SAVE_MSG_BYTES];
    rank_place(tr, place, sizeof place);
    snprintf(why, sizeof why, "%s", commit.why);
    snprintf(commit.why, sizeof commit.why, "%s failed: %.800s", place, why);
  }
  free(ds);
  json_decref(pos);
  json_decref(extra);
  mt_ckpt_chunks_free(&all);
  free(shard_n);
  if (rc) return rc;
  if (g->world && (rc = mt_comm_broadcast(g->world, &commit, sizeof commit, MT_COMM_U8, 0)))
    goto comm_failed;
  commit.why[sizeof commit.why - 1] = 0;
  if (commit.rc) {
    sv->res.failed_here = sv->res.failed_first = is0;
    return mt_seterr(commit.rc, "checkpoint of step %lld: %s", (long long)step, commit.why);
  }
  /* retention once every rank knows the commit, on rank 0 alone while the
   * others train on: a slow delete of an old step is no part of the wait
   * for the commit (keep 0 keeps every committed one; leftovers go either
   * way) */
  int removed = 0;
  if (is0 && mt_ckpt_prune(sv->job_dir, tr->job->checkpoint.keep, tr->job->checkpoint.keep_every,
                           &removed))
    mt_log_warn("checkpoint retention in %s: %s", sv->job_dir, mt_errmsg());
  return 0;

comm_failed:
  return mt_wraperr(rc, "checkpoint of step %lld", (long long)step);
}

static void save_release(mt_checkpoint_save *sv) {
  if (sv->has_thread) pthread_join(sv->thread, NULL);
  sv->has_thread = 0;
  free(sv->host);
  sv->host = NULL;
  mt_ckpt_chunks_free(&sv->chunks);
  sv->active = 0;
}

/* A collective of the poll failed: the save is over, failed, and its
 * caller reports it (not left unsaid). */
static int poll_failed(mt_checkpoint_save *sv, int rc, int *finished, mt_checkpoint_result *res) {
  *res = sv->res;
  save_release(sv);
  *finished = 1;
  return mt_wraperr(rc, "checkpoint of step %lld", (long long)sv->res.step);
}

int mt_trainer_save_poll(mt_trainer *tr, mt_checkpoint_save *sv, int wait, int *finished,
                         mt_checkpoint_result *res) {
  *finished = 0;
  if (!sv->active) return 0;
  /* every rank's writes must be done: one small all-reduce per step while
   * a save is in flight, or (wait) one every 20 ms until they are, for at
   * most the comm deadline plus the largest rank's bytes at 100 MB/s (what
   * a resume allows); past it every rank gives up together, MT_ETIMEDOUT
   * as for a lost peer, the save left active for the caller to discard (a
   * writer stuck on a hung filesystem cannot be freed under) */
  double give_up_ms = 0.0;
  mt_comm *w = tr->g.world;
  if (wait && w) {
    int64_t most = (int64_t)sv->res.bytes;
    int rc = mt_comm_allreduce(w, &most, &most, 1, MT_COMM_I64, MT_COMM_MAX);
    if (rc) return poll_failed(sv, rc, finished, res);
    give_up_ms = 1e3 * mt_mono_s() + mt_comm_timeout(w) + (double)most / 1e5;
  }
  int size = w ? mt_comm_size(w) : 1, me = w ? mt_comm_rank(w) : 0;
  double t0 = mt_mono_s();
  for (;;) {
    /* a max over the world: the lowest rank still writing (size - rank) */
    int busy = !__atomic_load_n(&sv->written, __ATOMIC_ACQUIRE);
    int64_t v[2] = {busy ? size - me : 0, give_up_ms > 0.0 && 1e3 * mt_mono_s() > give_up_ms};
    int rc = w ? mt_comm_allreduce(w, v, v, 2, MT_COMM_I64, MT_COMM_MAX) : 0;
    if (rc) return poll_failed(sv, rc, finished, res);
    if (!v[0]) break;
    if (!wait) return 0;
    if (v[1]) {
      char what[SAVE_MSG_BYTES / 2], file[1400];
      shard_file(sv, file, sizeof file);
      snprintf(what, sizeof what, "writing its slice of %.400s (%.1f MB)", file,
               sv->res.bytes / 1e6);
      return gave_up(tr, sv->res.step, size - (int)v[0], busy, what, mt_mono_s() - t0,
                     "the largest rank's slice");
    }
    struct timespec ts = {0, 20 * 1000 * 1000};
    nanosleep(&ts, NULL);
  }
  int rc = save_finish(tr, sv);
  save_release(sv);
  sv->res.seconds = mt_mono_s() - sv->t0;
  *res = sv->res;
  *finished = 1;
  return rc;
}

void mt_trainer_save_discard(mt_checkpoint_save *sv) {
  if (sv->active) save_release(sv);
}

int mt_trainer_save(mt_trainer *tr, const char *job_dir, mt_checkpoint_result *res) {
  mt_checkpoint_save sv;
  memset(res, 0, sizeof *res);
  res->step = tr->step;
  int rc = mt_trainer_save_begin(tr, job_dir, &sv);
  res->failed_here = sv.res.failed_here, res->failed_first = sv.res.failed_first;
  if (rc) return rc;
  int finished;
  rc = mt_trainer_save_poll(tr, &sv, 1, &finished, res);
  mt_trainer_save_discard(&sv); /* given up on: waits for the writer, which holds sv */
  return rc;
}

/* A message carried between ranks: the first problem a verification found. */
#define RESUME_MSG_BYTES 768

/* What one rank's check, or load, of a checkpoint found: the second may
 * pass (a read that failed), the third will not (a damaged file). */
enum { CHECK_OK = 0, CHECK_FAILED = 1, CHECK_DAMAGED = 2 };

/* "world rank 5", "world ranks 4-5, 9": the ranks whose flag in all is set,
 * runs joined, cut with "..." past out's size. */
static void rank_list(const int32_t *all, int size, char *out, size_t out_size) {
  int n = 0;
  for (int r = 0; r < size; r++) n += all[r] != 0;
  size_t len = (size_t)snprintf(out, out_size, "world rank%s ", n > 1 ? "s" : "");
  for (int r = 0, k = 0; r < size && len < out_size; r++) {
    if (!all[r]) continue;
    int last = r;
    while (last + 1 < size && all[last + 1]) last++;
    char run[32];
    if (last > r)
      snprintf(run, sizeof run, "%s%d-%d", k ? ", " : "", r, last);
    else
      snprintf(run, sizeof run, "%s%d", k ? ", " : "", r);
    if (len + strlen(run) + 4 >= out_size) {
      snprintf(out + len, out_size - len, "...");
      return;
    }
    len += (size_t)snprintf(out + len, out_size - len, "%s", run);
    k++;
    r = last;
  }
}

/* After every rank checked or loaded its part of a checkpoint (CHECK_*): how
 * many ranks found a problem, whether one found the worst (CHECK_DAMAGED),
 * and on every rank in msg (RESUME_MSG_BYTES) the first such rank's message,
 * else the first failed one's; in who (RESUME_WHO_BYTES) which ranks did and
 * where the first is ("world ranks 4-5; first, world rank 4 (tp 0, pp 1,
 * dp 0; cpu:0 of node n2)"), so a failure every node reports names the node
 * that could not read, not only that node's own log. */
#define RESUME_WHO_BYTES 512
static int agree_checked(const mt_trainer *tr, int check, char *msg, int *n_bad, int *damaged,
                         char *who) {
  mt_comm *world = tr->g.world;
  *n_bad = check != CHECK_OK;
  *damaged = check == CHECK_DAMAGED;
  rank_place(tr, who, RESUME_WHO_BYTES);
  if (!world) return 0;
  int size = mt_comm_size(world), first = -1, first_damaged = -1;
  int32_t mine = check, *all = calloc((size_t)size, sizeof *all);
  if (!all) return mt_seterr(MT_ENOMEM, "resume: %d verification flags", size);
  int rc = mt_comm_allgather(world, &mine, all, 1, MT_COMM_I32);
  *n_bad = 0;
  for (int r = 0; !rc && r < size; r++) {
    if (all[r] != CHECK_OK) {
      if (first < 0) first = r;
      ++*n_bad;
    }
    if (all[r] == CHECK_DAMAGED && first_damaged < 0) first_damaged = r;
  }
  char ranks[RESUME_WHO_BYTES / 2] = "";
  if (!rc && *n_bad) rank_list(all, size, ranks, sizeof ranks);
  free(all);
  *damaged = first_damaged >= 0;
  if (first_damaged >= 0) first = first_damaged;
  struct {
    char place[160];
    char msg[RESUME_MSG_BYTES];
  } b;
  memcpy(b.place, who, sizeof b.place);
  b.place[sizeof b.place - 1] = 0;
  memcpy(b.msg, msg, sizeof b.msg);
  if (!rc && first >= 0) rc = mt_comm_broadcast(world, &b, sizeof b, MT_COMM_U8, first);
  if (!rc && first >= 0) {
    b.place[sizeof b.place - 1] = 0;
    memcpy(msg, b.msg, sizeof b.msg);
    snprintf(who, RESUME_WHO_BYTES, "%s; first, %s", ranks, b.place);
  }
  msg[RESUME_MSG_BYTES - 1] = 0;
  return rc;
}

/* The dp rank that checksums shard (tp, pp) at resume: files taken in turn
 * by the replicas, so a node (a stage's tp ranks, typically) reads about
 * tp / dp of its stage's files instead of all of them on replica 0. */
static int verifier_dp(const mt_groups *g) {
  return (g->pp_rank * g->tp_size + g->tp_rank) % (g->dp_size > 0 ? g->dp_size : 1);
}

/* World rank 0's list of the checkpoints a resume passed over as damaged. */
typedef struct damage_list {
  int n;
  mt_ckpt_damage *v; /* owned, newest first */
} damage_list;

/* Best effort: one that cannot be noted stays where it is, as before. A
 * step noted already (a read tried again passes over it again) is not. */
static void damage_add(damage_list *l, int64_t step, const char *why) {
  for (int i = 0; i < l->n; i++)
    if (l->v[i].step == step) return;
  mt_ckpt_damage *v = realloc(l->v, (size_t)(l->n + 1) * sizeof *v);
  if (!v) {
    mt_log_warn("resume: out of memory noting step %lld as damaged; it stays where it is",
                (long long)step);
    return;
  }
  v[l->n].step = step;
  snprintf(v[l->n].why, sizeof v[l->n].why, "%s", why);
  l->v = v;
  l->n++;
}

/* Fields of the job that change how a run is carried out (its length,
 * layout, logging, checkpoints, evaluation) but not the trajectory it
 * follows, floating-point reduction order aside. A field not named here
 * that changed makes a resumed run another run. */
static int operational_field(const char *path) {
  static const char *const exact[] = {"train.steps",
                                      "train.exit_duration_mins",
                                      "train.exit_interval",
                                      "train.log_interval",
                                      "train.log_params_norm",
                                      "train.tensorboard_dir",
                                      "parallel.dp_min",
                                      "parallel.dp_max",
                                      "parallel.micro_batch",
                                      "parallel.recompute",
                                      "parallel.sequence_parallel",
                                      "parallel.recompute_layers",
                                      "parallel.bucket_size",
                                      "parallel.overlap_p2p",
                                      "parallel.schedule",
                                      "description",
                                      "name",
                                      "data.cache_dir",
                                      "model.init_from",
                                      "train.log_num_zeros_in_grad",
                                      "train.timing_log_level",
                                      "train.timing_log_option",
                                      "train.log_timers_to_tensorboard",
                                      "train.log_memory_to_tensorboard",
                                      "model.attention_backend"};
  for (size_t i = 0; i < sizeof exact / sizeof *exact; i++)
    if (!strcmp(path, exact[i])) return 1;
  /* data.valid and data.test feed validation and the test pass, never training */
  /* train.profile: what a profiler records, as the log fields */
  return !strncmp(path, "checkpoint.", 11) || !strncmp(path, "eval.", 5) ||
         !strncmp(path, "train.profile", 13) || !strncmp(path, "data.valid", 10) ||
         !strncmp(path, "data.test", 9);
}

/* The fields that changed: in text those the trajectory depends on
 * (material of them), in other those it does not, each "path was -> now". */
typedef struct job_changes {
  char text[1024], other[1024];
  size_t len, other_len;
  int n, material;
  int steps_material; /* a weight-decay schedule runs over train.steps (either job's) */
  int micro_material; /* data.eod_mask_loss (either job's): each micro-batch's loss is the
                         mean over its own unmasked tokens, so their grouping counts */
} job_changes;

/* Sets what makes operational fields material for these two jobs. */
static void material_length_and_split(job_changes *ch, const json_t *was, const json_t *now) {
  /* the weight decay's increment spans the run (Megatron's wd_incr_steps is
   * the run's length): another length moves it, as it does a decay that
   * follows train.steps (train.lr.decay_steps changes with it) */
  ch->steps_material = json_object_get(json_object_get(was, "train"), "weight_decay_schedule") ||
                       json_object_get(json_object_get(now, "train"), "weight_decay_schedule");
  ch->micro_material =
      json_is_true(json_object_get(json_object_get(was, "data"), "eod_mask_loss")) ||
      json_is_true(json_object_get(json_object_get(now, "data"), "eod_mask_loss"));
}

static void note_change(job_changes *ch, const char *path, const json_t *was, const json_t *now) {
  int material = !operational_field(path) || (ch->steps_material && !strcmp(path, "train.steps")) ||
                 (ch->micro_material && !strcmp(path, "parallel.micro_batch"));
  ch->n++;
  ch->material += material;
  char *out = material ? ch->text : ch->other;
  size_t *len = material ? &ch->len : &ch->other_len, cap = sizeof ch->text;
  if (*len >= cap - 1) return;
  char *a = was ? json_dumps(was, JSON_ENCODE_ANY | JSON_COMPACT | JSON_REAL_PRECISION(8)) : NULL;
  char *b = now ? json_dumps(now, JSON_ENCODE_ANY | JSON_COMPACT | JSON_REAL_PRECISION(8)) : NULL;
  /* a key the resolved job leaves out holds its default */
  int w = snprintf(out + *len, cap - *len, "%s%s %.40s -> %.40s", *len ? ", " : "", path,
                   a ? a : "(default)", b ? b : "(default)");
  free(a);
  free(b);
  if (w > 0) *len += (size_t)w < cap - *len ? (size_t)w : cap - *len - 1;
}

/* The leaves of two resolved jobs that differ, as dotted paths. */
static void diff_job(job_changes *ch, const char *prefix, const json_t *was, const json_t *now) {
  if (json_is_object(was) && json_is_object(now)) {
    const char *key;
    json_t *v;
    char path[256];
    json_object_foreach((json_t *)was, key, v) {
      snprintf(path, sizeof path, "%s%s%s", prefix, *prefix ? "." : "", key);
      diff_job(ch, path, v, json_object_get(now, key));
    }
    json_object_foreach((json_t *)now, key, v) {
      snprintf(path, sizeof path, "%s%s%s", prefix, *prefix ? "." : "", key);
      if (!json_object_get(was, key)) note_change(ch, path, NULL, v);
    }
  } else if (!was || !now || !json_equal((json_t *)was, (json_t *)now)) {
    note_change(ch, prefix, was, now);
  }
}

/* A resume under another job hash: says what changed since the save. A
 * change of length, layout or checkpointing is a note; one of the model,
 * data or optimizer makes this run another run, which deserves a warning. */
static void log_job_changes(const char *dir, const char *saved_hash, const json_t *saved_job,
                            const mt_job *job) {
  char *text = saved_job ? mt_job_to_json(job) : NULL;
  json_t *now = text ? json_loads(text, 0, NULL) : NULL;
  free(text);
  if (!now) { /* saved before manifests held the job */
    mt_log_warn("resume: %s was saved by job %s, this is job %s (a changed job spec)", dir,
                saved_hash, job->hash);
    return;
  }
  job_changes ch = {0};
  material_length_and_split(&ch, saved_job, now);
  diff_job(&ch, "", saved_job, now);
  json_decref(now);
  if (ch.material)
    mt_log_warn("resume: the job changed since %s was saved, so this run departs from the saved "
                "run's trajectory: %s%s%s%s",
                dir, ch.text, ch.other_len ? " (also changed, the trajectory not with them: " : "",
                ch.other, ch.other_len ? ")" : "");
  else if (ch.n)
    mt_log_info("resume: the job changed since %s was saved (its trajectory does not): %s", dir,
                ch.other);
  else /* the same fields, hashed from another spelling of the spec */
    mt_log_info("resume: %s was saved by job %s, this is job %s, with the same settings", dir,
                saved_hash, job->hash);
}

/* How often a resume reads a checkpoint that could not be read before it
 * gives up, and the seconds it waits before each try after the first. */
#define RESUME_READ_TRIES 3
static const int resume_retry_s[RESUME_READ_TRIES - 1] = {1, 3};

/* What a refusal of a checkpoint that could not be read tells the operator. */
#define UNREADABLE_ADVICE                                                                          \
  "A checkpoint that could not be read is not passed over (an older one would train the steps "    \
  "since it again): mtnlgd tries again when the job re-forms, within rendezvous.max_restarts; "    \
  "mend the storage, or the checkpoint.dir every node must share, or name an older step in "       \
  "checkpoint.resume_step"

/* Every rank waits before trying a read again (they all know to). */
static void wait_to_retry(int tries, int is0, const char *what) {
  int s = resume_retry_s[tries - 1];
  if (is0)
    mt_log_warn("resume: %s; trying again in %d s (try %d of %d)", mt_ckpt_unprefixed(what), s,
                tries + 1, RESUME_READ_TRIES);
  struct timespec ts = {s, 0};
  while (nanosleep(&ts, &ts) && errno == EINTR) {
  }
}

/* Rank 0 picks a checkpoint by the cheap checks (sizes and headers) and every
 * rank opens it; then each shard file's checksums are checked once, by one
 * dp rank of its (tp, pp) (verifier_dp), and every rank learns the outcome
 * before any loads a byte. A damaged file refuses a named step; otherwise
 * every rank falls back to the next older checkpoint and checks that. World
 * rank 0 notes in damaged the checkpoints passed over because a check found
 * them damaged. A checkpoint that some rank could not read (an I/O error, or
 * files that look otherwise from its node) is read again, RESUME_READ_TRIES
 * times in all, and then refused, never passed over: the check learnt
 * nothing of it, and an older one would train the steps since again. */
static int resume_load(mt_trainer *tr, const char *job_dir, int64_t step, int64_t *resumed_step,
                       damage_list *damaged) {
  const mt_groups *g = &tr->g;
  int is0 = !g->world || mt_comm_rank(g->world) == 0;
  int me = g->world ? mt_comm_rank(g->world) : 0;
  *resumed_step = -1;
  mt_ckpt c;
  struct {
    int64_t rc, step;
    char why[RESUME_MSG_BYTES];
  } pick;
  char err[2600] = "", passed_over[2048] = ""; /* rank 0: checkpoints that failed verification */
  int rc, tries = 0;           /* reads of the step at hand that could not read it */
  for (int64_t below = -1;;) { /* below: the step whose verification failed */
    memset(&pick, 0, sizeof pick);
    err[0] = 0;
    if (is0) {
      rc = below < 0 ? mt_ckpt_find(job_dir, step, MT_CKPT_VERIFY_SIZES, &c)
                     : mt_ckpt_find_below(job_dir, below, MT_CKPT_VERIFY_SIZES, &c);
      pick.rc = rc, pick.step = rc ? 0 : c.step;
      for (int i = 0; !rc && i < c.n_damaged; i++)
        damage_add(damaged, c.damaged[i].step, c.damaged[i].why);
      if (rc && below >= 0 && (rc == MT_ENOENT || rc == MT_ECORRUPT)) {
        /* as mt_ckpt_find says it, with the ones passed over here first */
        const char *older = rc == MT_ECORRUPT ? strchr(mt_errmsg(), '\n') : NULL;
        pick.rc = MT_ECORRUPT;
        snprintf(err, sizeof err, "ckpt: no checkpoint in %s passed its checks:\n%s%s", job_dir,
                 passed_over, older ? older + 1 : "");
      } else if (rc && rc != MT_ENOENT) {
        snprintf(err, sizeof err, "%s", mt_errmsg());
      } else if (rc == MT_ENOENT && step >= 0) { /* a step asked for that is not there */
        snprintf(err, sizeof err,
                 "checkpoint.resume_step %lld: no committed checkpoint of that step (%s)",
                 (long long)step, mt_errmsg());
      }
      snprintf(pick.why, sizeof pick.why, "%.*s", (int)sizeof pick.why - 1, err);
    }
    if (g->world && (rc = mt_comm_broadcast(g->world, &pick, sizeof pick, MT_COMM_U8, 0))) {
      if (is0 && !pick.rc) mt_ckpt_close(&c);
      return mt_wraperr(rc, "resume");
    }
    if (pick.rc == MT_ENOENT && step < 0) return 0; /* nothing to resume: a fresh start */
    if ((pick.rc == MT_EIO || pick.rc == MT_ENOMEM) && ++tries < RESUME_READ_TRIES) {
      wait_to_retry(tries, is0, is0 ? err : pick.why);
      continue;
    }
    if (pick.rc == MT_EIO || pick.rc == MT_ENOMEM) /* worth another generation's try */
      return mt_seterr(MT_EAGAIN, "resume from %s: %s; %d tries. " UNREADABLE_ADVICE, job_dir,
                       is0 ? err : pick.why, tries);
    if (pick.rc)
      return is0 ? mt_seterr((int)pick.rc, "resume from %s: %s", job_dir, err)
                 : mt_seterr((int)pick.rc, "resume from %s: %s", job_dir,
                             pick.why[0] ? pick.why : "rank 0 found no usable checkpoint");

    int check = CHECK_OK, vrc = 0;
    char msg[RESUME_MSG_BYTES] = "";
    if (!is0 && mt_ckpt_find(job_dir, pick.step, MT_CKPT_VERIFY_SIZES, &c)) {
      check = CHECK_FAILED; /* rank 0 passed it: this rank's view of the files differs */
      snprintf(msg, sizeof msg, "%s", mt_errmsg());
    } else if (c.tp == g->tp_size && c.pp == g->pp_size && g->dp_rank == verifier_dp(g) &&
               mt_ckpt_file_of(&c, g->tp_rank, g->pp_rank) &&
               (vrc = mt_ckpt_verify_file(&c, g->tp_rank, g->pp_rank))) {
      check = vrc == MT_ECORRUPT ? CHECK_DAMAGED : CHECK_FAILED;
      snprintf(msg, sizeof msg, "%s", mt_errmsg());
    } /* another layout: no file is this rank's; the checks below refuse it */
    if (check != CHECK_OK)
      mt_log_warn("resume: rank %d (tp %d, pp %d, dp %d) checked step %lld: %s", me, g->tp_rank,
                  g->pp_rank, g->dp_rank, (long long)pick.step, mt_ckpt_unprefixed(msg));
    /* the ranks that checked nothing wait here for the slowest that did:
     * the world's deadline grows by the largest file at 100 MB/s, a floor
     * any storage a job of this size sits on keeps */
    int n_bad, found_damaged, base_ms = g->world ? mt_comm_timeout(g->world) : 0;
    if (g->world && c.n_files) {
      uint64_t most = 0;
      for (int i = 0; i < c.n_files; i++) most = c.files[i].bytes > most ? c.files[i].bytes : most;
      uint64_t ms = (uint64_t)base_ms + most / 100000;
      mt_comm_set_timeout(g->world, ms > INT32_MAX ? INT32_MAX : (int)ms);
    }
    char who[RESUME_WHO_BYTES];
    rc = agree_checked(tr, check, msg, &n_bad, &found_damaged, who);
    if (g->world) mt_comm_set_timeout(g->world, base_ms);
    if (rc) {
      mt_ckpt_close(&c);
      return mt_wraperr(rc, "resume");
    }
    if (!n_bad) break;
    mt_ckpt_close(&c); /* no rank loads a checkpoint with a bad file */
    if (!found_damaged && ++tries < RESUME_READ_TRIES) {
      wait_to_retry(tries, is0, msg);
      continue;
    }
    if (!found_damaged)
      return mt_seterr(MT_EAGAIN,
                       "resume from %s: step %lld could not be read on %d rank(s) in %d tries, "
                       "%s: %s. " UNREADABLE_ADVICE,
                       job_dir, (long long)pick.step, n_bad, tries, who, mt_ckpt_unprefixed(msg));
    if (step >= 0)
      return mt_seterr(MT_ECORRUPT,
                       "resume from %s: step %lld failed checksum verification on %d rank(s), "
                       "%s: %s",
                       job_dir, (long long)pick.step, n_bad, who, mt_ckpt_unprefixed(msg));
    if (is0) {
      mt_log_warn("resume: skipping step %lld: %d rank(s) found problems, first: %s; falling back "
                  "to the previous one",
                  (long long)pick.step, n_bad, mt_ckpt_unprefixed(msg));
      size_t had = strlen(passed_over);
      snprintf(passed_over + had, sizeof passed_over - had, "%s\n", msg);
      damage_add(damaged, pick.step, msg);
    }
    below = pick.step;
    tries = 0;
  }
  /* a rank's load: CHECK_FAILED for a read that failed, else CHECK_DAMAGED */
  int failed = CHECK_OK;
  const mt_ckpt_file *f = mt_ckpt_file_of(&c, g->tp_rank, g->pp_rank);
  /* the chunks a stage holds decide which layers its file has */
  const json_t *saved_v = json_object_get(
      json_object_get(json_object_get(c.extra, "job"), "parallel"), "virtual_stages");
  int was_v = json_is_integer(saved_v) ? (int)json_integer_value(saved_v) : 1;
  int now_v = tr->job->parallel.virtual_stages > 1 ? tr->job->parallel.virtual_stages : 1;
  /* the head before the parameter count: at pp 1 an untied model's one
   * stage has lm_head's parameters more than a tied one's, and the count's
   * message would not name the key; at pp > 1 the last stage's lm_head is
   * where its tied copy of wte was, of the same size. Only the record
   * tells them apart (a record without the key is tied, and so is a
   * checkpoint from before the model was recorded: it predates the key) */
  const json_t *saved_model = json_object_get(c.extra, "model");
  int was_untied = json_is_true(json_object_get(saved_model, "untie_embeddings"));
  if (c.tp == g->tp_size && c.pp == g->pp_size && f && was_v != now_v && g->pp_size > 1) {
    failed = CHECK_DAMAGED;
    snprintf(err, sizeof err,
             "resume: %s was saved with %d virtual stages a pipeline stage, the job runs %d: "
             "its stages hold other layers (`mtnlgctl ckpt reshard --virtual-stages %d` writes "
             "it for this job)",
             c.dir, was_v, now_v, now_v);
  } else if (c.tp != g->tp_size || c.pp != g->pp_size || !f) {
    failed = CHECK_DAMAGED;
    snprintf(err, sizeof err,
             "resume: %s was saved with tp %d x pp %d, the job runs tp %d x pp %d (`mtnlgctl "
             "ckpt reshard` writes it under another layout)",
             c.dir, c.tp, c.pp, g->tp_size, g->pp_size);
  } else if (was_untied != tr->job->model.untie_embeddings) {
    failed = CHECK_DAMAGED;
    snprintf(err, sizeof err,
             "resume: %s was saved by a model with %s embeddings, the job's "
             "model.untie_embeddings is %s: another model (set model.untie_embeddings to %s, or "
             "give the job a checkpoint.dir of its own)",
             c.dir, was_untied ? "untied" : "tied",
             tr->job->model.untie_embeddings ? "true" : "false", was_untied ? "true" : "false");
  } else if (f->n != tr->model.num_params) {
    failed = CHECK_DAMAGED;
    snprintf(err, sizeof err,
             "resume: %s/%s holds %llu parameters, this shard of the model has %zu: another model",
             c.dir, f->name, (unsigned long long)f->n, tr->model.num_params);
  } else {
    /* the same count, another model (Megatron's check_checkpoint_args):
     * checkpoints from before the model was recorded pass */
    const json_t *saved = json_object_get(c.extra, "model");
    const mt_model_spec *ms = &tr->job->model;
    const struct {
      const char *key;
      int want;
    } arch[] = {{"n_layer", ms->n_layer}, {"n_embd", ms->n_embd},
                {"n_head", ms->n_head},   {"vocab_size", ms->vocab_size},
                {"seq_len", ms->seq_len}, {"max_positions", ms->max_positions}};
    for (size_t k = 0; saved && k < sizeof arch / sizeof *arch && !failed; k++) {
      const json_t *v = json_object_get(saved, arch[k].key);
      if (json_is_integer(v) && json_integer_value(v) != arch[k].want) {
        failed = CHECK_DAMAGED;
        snprintf(err, sizeof err,
                 "resume: %s was saved by a model with %s %lld, the job's has %d: another model "
                 "(start it with a checkpoint.dir of its own, or model.init_from an export)",
                 c.dir, arch[k].key, (long long)json_integer_value(v), arch[k].want);
      }
    }
  }
  uint64_t lo, n;
  my_slice(tr, &lo, &n);
  float *host = NULL;
  if (!failed) {
    size_t total = tr->model.num_params;
    host = malloc((total + 2 * (n ? n : 1)) * sizeof(float));
    if (!host) {
      failed = CHECK_DAMAGED;
      snprintf(err, sizeof err, "resume: host buffer of %zu floats", total);
    } else if ((rc = mt_ckpt_read(&c, g->tp_rank, g->pp_rank, "master", 0, total, host)) ||
               (n &&
                (rc = mt_ckpt_read(&c, g->tp_rank, g->pp_rank, "adam_m", lo, n, host + total))) ||
               (n && (rc = mt_ckpt_read(&c, g->tp_rank, g->pp_rank, "adam_v", lo, n,
                                        host + total + n)))) {
      failed = rc == MT_EIO || rc == MT_ENOMEM ? CHECK_FAILED : CHECK_DAMAGED;
      snprintf(err, sizeof err, "%s", mt_errmsg());
    } else if (mt_device_memcpy_htod(tr->dev, tr->model.params, host, total * sizeof(float)) ||
               mt_device_memset0(tr->dev, tr->opt.m, tr->shard_n * sizeof(float)) ||
               mt_device_memset0(tr->dev, tr->opt.v, tr->shard_n * sizeof(float)) ||
               (n && mt_device_memcpy_htod(tr->dev, tr->opt.m + (lo - tr->shard_lo), host + total,
                                           n * sizeof(float))) ||
               (n && mt_device_memcpy_htod(tr->dev, tr->opt.v + (lo - tr->shard_lo),
                                           host + total + n, n * sizeof(float)))) {
      failed = CHECK_DAMAGED;
      snprintf(err, sizeof err, "%s", mt_errmsg());
    }
  }
  free(host);
  int64_t saved_step = c.step, consumed = c.consumed_samples;
  json_t *ls = json_object_get(c.extra, "loss_scale");
  int has_extra = json_is_integer(json_object_get(c.extra, "adam_t")) && json_is_object(ls);
  int64_t adam_t = json_integer_value(json_object_get(c.extra, "adam_t"));
  json_t *lrs = json_object_get(c.extra, "lr_samples");
  int64_t lr_samples = json_is_integer(lrs) ? json_integer_value(lrs) : -1;
  json_t *rb = json_object_get(c.extra, "rolled_back_to");
  int64_t rolled_back_to = json_is_integer(rb) ? json_integer_value(rb) : -1;
  double ls_scale = json_number_value(json_object_get(ls, "scale"));
  int64_t ls_growth = json_integer_value(json_object_get(ls, "growth_tracker"));
  int64_t ls_hyst = json_integer_value(json_object_get(ls, "hysteresis_tracker"));
  int64_t ls_steps = json_integer_value(json_object_get(ls, "steps"));
  int64_t ls_skipped = json_integer_value(json_object_get(ls, "skipped"));
  int64_t ls_in_row = json_integer_value(json_object_get(ls, "skipped_in_row"));
  int saved_dp = c.dp;
  char dir[MT_CKPT_PATH_MAX];
  snprintf(dir, sizeof dir, "%s", c.dir);
  if (is0 && c.job_hash && strcmp(c.job_hash, tr->job->hash))
    log_job_changes(c.dir, c.job_hash, json_object_get(c.extra, "job"), tr->job);
  mt_ckpt_close(&c);
  /* the data was sized for steps x global_batch samples; saved with a larger
   * global batch, the rest of the run reads past that: size it for what it
   * reads (before the agreement: every rank learns of a failure) */
  int64_t steps = tr->job->train.steps;
  if (!failed && steps > saved_step) {
    uint64_t need =
        (uint64_t)consumed + (uint64_t)mt_job_samples_of(tr->job, consumed, steps - saved_step);
    if (mt_trainer_data_reach(tr, need)) {
      failed = CHECK_DAMAGED;
      snprintf(err, sizeof err, "resume: the data for %llu samples: %s", (unsigned long long)need,
               mt_errmsg());
    }
  }
  /* every rank fails with the first failed rank's message; a read that
   * failed may pass (MT_EAGAIN: another generation tries again) */
  char msg[RESUME_MSG_BYTES];
  snprintf(msg, sizeof msg, "%.*s", failed ? (int)sizeof msg - 1 : 0, err);
  int n_failed, worst;
  char who[RESUME_WHO_BYTES];
  if ((rc = agree_checked(tr, failed, msg, &n_failed, &worst, who)))
    return mt_wraperr(rc, "resume");
  if (n_failed)
    return mt_seterr(worst ? MT_EINVAL : MT_EAGAIN, "resume from %s failed on %d rank(s), %s: %s",
                     dir, n_failed, who, msg);
  tr->step = saved_step;
  tr->consumed_samples = consumed;
  int64_t G = tr->job->train.global_batch;
  if (is0 && consumed != mt_job_samples_of(tr->job, 0, saved_step))
    mt_log_info("resume: %lld samples were read in %lld steps; this job's global batch is %lld: "
                "reading goes on from sample %lld",
                (long long)consumed, (long long)saved_step, (long long)G, (long long)consumed);
  tr->opt.t = saved_step;
  if (has_extra) { /* checkpoints without it predate skipped steps: t = step */
    tr->opt.t = adam_t;
    tr->scaler.skipped = ls_skipped;
    if (ls_scale > 0) { /* saved by an fp16 run: its scaler goes on */
      tr->scaler.scale = (float)ls_scale;
      tr->scaler.growth_tracker = (int)ls_growth;
      tr->scaler.hysteresis_tracker = (int)ls_hyst;
      tr->scaler.steps = ls_steps;
      tr->scaler.skipped_in_row = ls_in_row;
      if (tr->scaler.o.fixed) /* a static scale is the job's, whatever the saving run's was */
        tr->scaler.scale = tr->scaler.o.initial;
    } else if (is0 && tr->precision == MT_PREC_FP16) {
      mt_log_info("resume: %s was saved by a run without loss scaling: the scale starts at the "
                  "job's %g",
                  dir, (double)tr->scaler.scale);
    }
  }
  /* older checkpoints: their updates taken as full batches */
  tr->lr_samples = lr_samples >= 0 ? lr_samples : tr->opt.t * G;
  tr->rolled_back_to = rolled_back_to;
  *resumed_step = saved_step;
  if (is0)
    mt_log_info("resumed from %s: step %lld, saved with dp %d, running with dp %d", dir,
                (long long)saved_step, saved_dp, g->dp_size);
  return 0;
}

/* Once every rank has loaded `loaded`: moves the damaged checkpoints out of
 * the way, so that the next resume does not read them again and this run can
 * save their steps again (mt_ckpt_set_aside keeps them, under another name).
 * A failure is logged and the run goes on: a directory not moved stays where
 * it was, as before; a latest not rewritten names a directory that is gone,
 * which a resume passes over until the next commit rewrites it. */
static void set_aside_damaged(const char *job_dir, const damage_list *damaged, int64_t loaded) {
  for (int i = 0; i < damaged->n; i++) {
    const mt_ckpt_damage *d = &damaged->v[i];
    char to[MT_CKPT_PATH_MAX];
    int rc = mt_ckpt_set_aside(job_dir, d->step, loaded, to, sizeof to);
    if (to[0])
      mt_log_warn("resume: set aside the damaged checkpoint of step %lld as %s (kept for "
                  "inspection; this run resumed from step %lld); it failed its check: %s",
                  (long long)d->step, to, (long long)loaded, mt_ckpt_unprefixed(d->why));
    if (rc && to[0])
      mt_log_error("resume: %s; until a checkpoint commits, a resume warns of latest and takes "
                   "the newest committed checkpoint",
                   mt_ckpt_unprefixed(mt_errmsg()));
    else if (rc)
      mt_log_error("resume: could not set aside the damaged checkpoint of step %lld: %s; it "
                   "stays, so the next resume checks it again and, while latest names it, "
                   "step %lld cannot be saved again",
                   (long long)d->step, mt_ckpt_unprefixed(mt_errmsg()), (long long)d->step);
  }
}

/* A run told to resume from a step older than committed checkpoints rolls
 * back: those are set aside (renamed .rolled-back, kept) and latest names
 * the step loaded, so a restart goes on from this run's own checkpoints,
 * not from the abandoned ones, and this run can save their steps again. */
static void set_aside_rolled_back(const char *job_dir, int64_t loaded) {
  mt_ckpt_entry *e = NULL;
  size_t n = 0;
  if (mt_ckpt_list(job_dir, &e, &n)) {
    mt_log_error("resume: cannot list %s to set aside what step %lld rolls back: %s", job_dir,
                 (long long)loaded, mt_ckpt_unprefixed(mt_errmsg()));
    return;
  }
  for (size_t i = n; i-- > 0 && e[i].step > loaded;) {
    char to[MT_CKPT_PATH_MAX];
    if (mt_ckpt_set_aside_as(job_dir, e[i].step, loaded, MT_CKPT_ROLLED_BACK_SUFFIX, to, sizeof to))
      mt_log_error("resume: could not set aside step %lld, newer than checkpoint.resume_step "
                   "%lld: %s; while latest names it, a restart resumes from it",
                   (long long)e[i].step, (long long)loaded, mt_ckpt_unprefixed(mt_errmsg()));
    else
      mt_log_warn("resume: checkpoint.resume_step %lld rolls back past step %lld: set aside as "
                  "%s (kept)",
                  (long long)loaded, (long long)e[i].step, to);
  }
  free(e);
}

/* A copy of a resolved job in which a decay length that follows the run's
 * length (train.lr.decay_steps = train.steps, the default) reads as such: a
 * run given more steps changes its length, not its course. */
static json_t *length_free_job(const json_t *job) {
  json_t *j = json_deep_copy(job);
  json_t *train = json_object_get(j, "train"), *lr = json_object_get(train, "lr");
  json_t *decay = json_object_get(lr, "decay_steps"), *steps = json_object_get(train, "steps");
  if (json_is_integer(decay) && json_is_integer(steps) &&
      json_integer_value(decay) == json_integer_value(steps))
    json_object_set_new(lr, "decay_steps", json_string("train.steps"));
  return j;
}

/* Whether the checkpoint a resume of the newest would load was trained
 * after a rollback to step (its manifest's rolled_back_to) under the same
 * trajectory as this job's (what changed since its save, if anything, is
 * operational: length, layout, checkpoints; a decay that follows the length
 * counts as length): then that rollback was done,
 * by an earlier start of this job, and this start (a re-formed generation,
 * a restarted daemon, a run given more steps) goes on from the newest
 * rather than set aside the steps trained since. A job that changed what
 * the run computes and names the step again is a retry from it: it rolls
 * back again. World rank 0 reads the manifest; every rank learns the
 * answer (*newest: its step, or -1 when there is a rollback to do). A
 * checkpoint that cannot be read here is left to the resume, which names
 * what is wrong. */
static int rollback_done(mt_trainer *tr, const char *job_dir, int64_t step, int64_t *newest) {
  int is0 = !tr->g.world || mt_comm_rank(tr->g.world) == 0;
  int64_t found = -1;
  mt_ckpt c;
  if (is0 && !mt_ckpt_find(job_dir, -1, MT_CKPT_VERIFY_SIZES, &c)) {
    json_t *rb = json_object_get(c.extra, "rolled_back_to");
    const json_t *saved_job = json_object_get(c.extra, "job");
    if (c.step > step && json_is_integer(rb) && json_integer_value(rb) == step && saved_job) {
      char *text = mt_job_to_json(tr->job);
      json_t *parsed = text ? json_loads(text, 0, NULL) : NULL;
      free(text);
      json_t *now = parsed ? length_free_job(parsed) : NULL, *was = length_free_job(saved_job);
      json_decref(parsed);
      job_changes ch = {0};
      if (now && was) material_length_and_split(&ch, was, now);
      ch.steps_material = 0; /* length is operational here, a decay that follows it too */
      if (now && was) diff_job(&ch, "", was, now);
      if (now && was && !ch.material)
        found = c.step;
      else if (now && was)
        mt_log_warn("resume: checkpoint.resume_step %lld rolls back again, past the checkpoints "
                    "trained after the last rollback to it (the newest is step %lld): this job "
                    "takes another course from there (a retry): %s",
                    (long long)step, (long long)c.step, ch.text);
      json_decref(now);
      json_decref(was);
    }
    mt_ckpt_close(&c);
  }
  int rc = tr->g.world ? mt_comm_broadcast(tr->g.world, &found, 1, MT_COMM_I64, 0) : 0;
  if (rc) return mt_wraperr(rc, "resume");
  *newest = found;
  return 0;
}

int mt_trainer_resume(mt_trainer *tr, const char *job_dir, int64_t step, int64_t *resumed_step) {
  int is0 = !tr->g.world || mt_comm_rank(tr->g.world) == 0;
  if (step >= 0) {
    int64_t newest;
    int rc = rollback_done(tr, job_dir, step, &newest);
    if (rc) return rc;
    if (newest >= 0) {
      if (is0)
        mt_log_warn("resume: checkpoint.resume_step %lld was done already: the newest checkpoint, "
                    "step %lld, was trained after that rollback, on the trajectory this job "
                    "computes, so the run goes on from it (to roll back to step %lld again, "
                    "set aside the newer checkpoints: rename each step_<N> to "
                    "step_<N>.rolled-back)",
                    (long long)step, (long long)newest, (long long)step);
      step = -1;
    }
  }
  damage_list damaged = {0};
  int rc = resume_load(tr, job_dir, step, resumed_step, &damaged);
  /* only after every rank agreed it loaded: a resume that failed moves nothing */
  if (!rc && damaged.n) set_aside_damaged(job_dir, &damaged, *resumed_step);
  free(damaged.v);
  /* step 0 too: a checkpoint of step 0 is one (a job checkpointed before its
   * first step), and the newer ones are what resuming from it rolls back */
  if (!rc && step >= 0 && *resumed_step == step) {
    tr->rolled_back_to = step; /* every rank: each one's saves carry it */
    if (is0) set_aside_rolled_back(job_dir, step);
  }
  return rc;
}

/* ---- checkpoint.load: another job's checkpoint as the starting point ---- */

/* The first field of the model that differs between the job's and the
 * checkpoint's (Megatron's check_checkpoint_args), in what; 0 when none.
 * vocab_pad_to, not the padded size: that follows tp, which may differ. */
static int model_differs(const mt_model_spec *want, const mt_model_spec *got, char *what,
                         size_t size) {
  const struct {
    const char *key;
    int want, got;
  } f[] = {{"n_layer", want->n_layer, got->n_layer},
           {"n_embd", want->n_embd, got->n_embd},
           {"n_head", want->n_head, got->n_head},
           {"vocab_size", want->vocab_size, got->vocab_size},
           {"vocab_pad_to", want->vocab_pad_to, got->vocab_pad_to},
           {"max_positions", want->max_positions, got->max_positions}};
  for (size_t k = 0; k < sizeof f / sizeof *f; k++)
    if (f[k].want != f[k].got) {
      snprintf(what, size, "model.%s: the checkpoint's model has %d, the job's %d", f[k].key,
               f[k].got, f[k].want);
      return 1;
    }
  if (want->untie_embeddings != got->untie_embeddings) {
    snprintf(what, size,
             "model.untie_embeddings: the checkpoint's model has %s embeddings, the job's %s",
             got->untie_embeddings ? "untied" : "tied", want->untie_embeddings ? "untied" : "tied");
    return 1;
  }
  if (want->ln_eps != got->ln_eps) {
    snprintf(what, size, "model.ln_eps: the checkpoint's model has %g, the job's %g",
             (double)got->ln_eps, (double)want->ln_eps);
    return 1;
  }
  return 0;
}

/* This rank's part of a load: the whole shard's master weights into
 * master (num_params floats) and, when m, the moments of its ZeRO slice
 * [lo, lo + n) into m and v. */
static int load_shard(mt_trainer *tr, mt_ckpt_tensors *rd, float *master, float *m, float *v,
                      uint64_t lo, uint64_t n) {
  const mt_gpt *model = &tr->model;
  size_t most = 1;
  for (int i = 0; i < model->n_tensors; i++)
    if (model->params_table[i].numel > most) most = model->params_table[i].numel;
  float *piece = m ? malloc(most * sizeof *piece) : NULL;
  if (m && !piece) return mt_seterr(MT_ENOMEM, "load: a buffer of %zu floats", most);
  int rc = 0;
  for (int i = 0; i < model->n_tensors && !rc; i++) {
    const mt_param *p = &model->params_table[i];
    rc = mt_ckpt_tensors_read(rd, "master", p, master + p->offset);
    size_t a, b;
    if (rc || !m || !mt_param_overlap(p, lo, lo + n, &a, &b)) continue;
    for (int k = 0; k < 2 && !rc; k++) {
      rc = mt_ckpt_tensors_read(rd, k ? "adam_v" : "adam_m", p, piece);
      if (!rc) memcpy((k ? v : m) + (a - lo), piece + (a - p->offset), (b - a) * sizeof(float));
    }
  }
  free(piece);
  return rc;
}

int mt_trainer_load_from(mt_trainer *tr, const char *path, int load_optimizer) {
  const mt_groups *g = &tr->g;
  int is0 = !g->world || mt_comm_rank(g->world) == 0;
  int size = g->world ? mt_comm_size(g->world) : 1, me = g->world ? mt_comm_rank(g->world) : 0;
  struct {
    int64_t rc;
    char dir[MT_CKPT_PATH_MAX];
    char why[RESUME_MSG_BYTES];
  } pick;
  memset(&pick, 0, sizeof pick);
  mt_ckpt c;
  int opened = 0, rc;
  /* rank 0 picks the checkpoint (the one a resume of that job would take,
   * never an older one in place of a damaged newer), every rank opens it */
  if (is0) {
    rc = mt_ckpt_open_named(path, MT_CKPT_VERIFY_SIZES, &c);
    if (!rc && c.skipped) { /* an older one would start from other weights than named */
      snprintf(pick.why, sizeof pick.why,
               "its newest checkpoint failed its checks, and no older one is taken in its "
               "place (name a step directory to start from it): %.500s",
               mt_ckpt_unprefixed(c.skipped));
      mt_ckpt_close(&c);
      rc = MT_ECORRUPT;
    } else if (!rc) {
      snprintf(pick.dir, sizeof pick.dir, "%s", c.dir);
      mt_ckpt_close(&c);
    } else {
      snprintf(pick.why, sizeof pick.why, "%s", mt_ckpt_unprefixed(mt_errmsg()));
    }
    pick.rc = rc;
  }
  if (g->world && (rc = mt_comm_broadcast(g->world, &pick, sizeof pick, MT_COMM_U8, 0)))
    return mt_wraperr(rc, "checkpoint.load");
  pick.dir[sizeof pick.dir - 1] = 0, pick.why[sizeof pick.why - 1] = 0;
  if (pick.rc)
    return mt_seterr(pick.rc == MT_EIO || pick.rc == MT_ENOMEM ? MT_EAGAIN : MT_EINVAL,
                     "checkpoint.load %s: %s", path, pick.why);

  /* every checksum, each file by one rank, before any rank loads a byte */
  int check = CHECK_OK;
  char msg[RESUME_MSG_BYTES] = "", err[RESUME_MSG_BYTES] = "";
  if ((rc = mt_ckpt_open_path(pick.dir, MT_CKPT_VERIFY_SIZES, &c))) {
    check = rc == MT_EIO || rc == MT_ENOMEM ? CHECK_FAILED : CHECK_DAMAGED;
    snprintf(msg, sizeof msg, "%s", mt_ckpt_unprefixed(mt_errmsg()));
  } else {
    opened = 1;
    for (int k = me; k < c.n_files && check == CHECK_OK; k += size)
      if ((rc = mt_ckpt_verify_file(&c, c.files[k].tp, c.files[k].pp))) {
        check = rc == MT_ECORRUPT ? CHECK_DAMAGED : CHECK_FAILED;
        snprintf(msg, sizeof msg, "%s", mt_ckpt_unprefixed(mt_errmsg()));
      }
  }
  int n_bad, damaged, base_ms = g->world ? mt_comm_timeout(g->world) : 0;
  if (g->world && opened) { /* as a resume: the slowest check is waited for */
    uint64_t most = 0;
    for (int i = 0; i < c.n_files; i++) most += c.files[i].bytes;
    uint64_t ms = (uint64_t)base_ms + most / 100000;
    mt_comm_set_timeout(g->world, ms > INT32_MAX ? INT32_MAX : (int)ms);
  }
  char who[RESUME_WHO_BYTES];
  rc = agree_checked(tr, check, msg, &n_bad, &damaged, who);
  if (g->world) mt_comm_set_timeout(g->world, base_ms);
  if (!rc && n_bad)
    rc = mt_seterr(damaged ? MT_EINVAL : MT_EAGAIN, "checkpoint.load %s: %s (found by %s)",
                   pick.dir, msg, who);
  else if (rc)
    rc = mt_wraperr(rc, "checkpoint.load");
  if (rc) {
    if (opened) mt_ckpt_close(&c);
    return rc;
  }

  /* the same model (any layout), then this rank's slices */
  int failed = CHECK_OK;
  mt_job saved;
  mt_ckpt_tensors *rd = NULL;
  if ((rc = mt_ckpt_tensors_open(&c, &saved, &rd))) {
    failed = CHECK_DAMAGED;
    snprintf(err, sizeof err, "%s", mt_errmsg());
  } else if (model_differs(&tr->job->model, &saved.model, err, sizeof err)) {
    failed = CHECK_DAMAGED;
  }
  uint64_t lo, n;
  my_slice(tr, &lo, &n);
  size_t total = tr->model.num_params;
  float *host = NULL;
  if (!failed && !(host = calloc(total + (load_optimizer ? 2 * n : 0) + 1, sizeof *host))) {
    failed = CHECK_DAMAGED;
    snprintf(err, sizeof err, "out of memory for %zu floats", total + 2 * n);
  }
  if (!failed && (rc = load_shard(tr, rd, host, load_optimizer ? host + total : NULL,
                                  load_optimizer ? host + total + n : NULL, lo, n))) {
    failed = rc == MT_EIO || rc == MT_ENOMEM ? CHECK_FAILED : CHECK_DAMAGED;
    snprintf(err, sizeof err, "%s", mt_ckpt_unprefixed(mt_errmsg()));
  }
  mt_ckpt_tensors_close(rd);
  if (!failed && (mt_device_memcpy_htod(tr->dev, tr->model.params, host, total * sizeof(float)) ||
                  mt_device_memset0(tr->dev, tr->opt.m, tr->shard_n * sizeof(float)) ||
                  mt_device_memset0(tr->dev, tr->opt.v, tr->shard_n * sizeof(float)) ||
                  (load_optimizer && n &&
                   (mt_device_memcpy_htod(tr->dev, tr->opt.m + (lo - tr->shard_lo), host + total,
                                          n * sizeof(float)) ||
                    mt_device_memcpy_htod(tr->dev, tr->opt.v + (lo - tr->shard_lo),
                                          host + total + n, n * sizeof(float)))))) {
    failed = CHECK_DAMAGED;
    snprintf(err, sizeof err, "%s", mt_errmsg());
  }
  free(host);
  /* Adam's count goes with its moments (bias correction); the fp16 scaler
   * is part of Megatron's optimizer state too */
  json_t *ls = json_object_get(c.extra, "loss_scale");
  json_t *at = json_object_get(c.extra, "adam_t");
  int64_t adam_t = json_is_integer(at) ? json_integer_value(at) : c.step;
  double ls_scale = json_number_value(json_object_get(ls, "scale"));
  int ls_growth = (int)json_integer_value(json_object_get(ls, "growth_tracker"));
  int ls_hyst = (int)json_integer_value(json_object_get(ls, "hysteresis_tracker"));
  int64_t saved_step = c.step;
  char saved_name[64];
  snprintf(saved_name, sizeof saved_name, "%s", c.job ? c.job : "?");
  mt_ckpt_close(&c);
  snprintf(msg, sizeof msg, "%.*s", failed ? (int)sizeof msg - 1 : 0, err);
  if ((rc = agree_checked(tr, failed, msg, &n_bad, &damaged, who)))
    return mt_wraperr(rc, "checkpoint.load");
  if (n_bad)
    return mt_seterr(damaged ? MT_EINVAL : MT_EAGAIN, "checkpoint.load %s: %s (%s)", pick.dir, msg,
                     who);
  /* a fresh run in every other respect */
  tr->step = 0;
  tr->consumed_samples = 0;
  tr->lr_samples = 0;
  tr->rolled_back_to = -1;
  tr->opt.t = load_optimizer ? adam_t : 0;
  if (load_optimizer && ls_scale > 0 && tr->precision == MT_PREC_FP16 && !tr->scaler.o.fixed) {
    tr->scaler.scale = (float)ls_scale;
    tr->scaler.growth_tracker = ls_growth;
    tr->scaler.hysteresis_tracker = ls_hyst;
  }
  if (is0)
    mt_log_info("checkpoint.load: starting from %s (step %lld of job %s), saved as tp %d x pp %d: "
                "its master weights%s; step 0, data from the start, a fresh learning-rate "
                "schedule",
                pick.dir, (long long)saved_step, saved_name, saved.parallel.tp, saved.parallel.pp,
                load_optimizer ? " and Adam's moments and count (checkpoint.load_optimizer)"
                               : ", Adam's moments at zero");
  return 0;
}
