/* checkpoint.h — a trainer's state into and out of checkpoints (daemon/ckpt).
 *
 * Collective over every rank of the job, at a step boundary. Each (tp, pp)
 * shard is one file holding the fp32 master weights and both Adam moments of
 * that shard's flat parameters, unpadded, so its layout does not depend on dp:
 * every dp rank writes its ZeRO-1 slice at its offset, and a checkpoint loads
 * under any dp width. World rank 0 claims the step directory, collects every
 * writer's chunk checksums and commits the manifest and `latest` (DESIGN has
 * the coordinator commit; rank 0 does it because it is the process that can
 * see the checkpoint filesystem — the coordinator may be a node without it).
 * A failure anywhere fails the checkpoint on every rank alike, removes its
 * directory and leaves every committed checkpoint as it was; training goes on.
 */
#ifndef MT_CHECKPOINT_H
#define MT_CHECKPOINT_H

#include <pthread.h>
#include <stdint.h>

#include "ckpt.h"

#include "train.h"

/* <checkpoint.dir>/<job name>: where this job's checkpoints live. */
void mt_checkpoint_job_dir(const mt_job *job, char *out, size_t size);

typedef struct mt_checkpoint_result {
  int64_t step;
  uint64_t bytes;   /* written by this rank */
  double seconds;   /* wall time on this rank */
  char path[1300];  /* the step directory */
  int failed_here;  /* a failed save: this rank's own part failed, and the message is its
                       own (else it names the lowest world rank that failed, and why) */
  int failed_first; /* ... and this rank is that lowest one: every rank's message is its */
} mt_checkpoint_result;

/* A save in flight (async mode): begun at a step boundary, the slow writes on
 * a background thread, finished at a later boundary. Owned by its rank. */
typedef struct mt_checkpoint_save {
  int active;       /* begun and not yet finished */
  int failed;       /* this rank's own part failed; err says why */
  int other_failed; /* another rank's did, learnt as the save began: nothing is written */
  char err[1024];
  char job_dir[1200];
  mt_ckpt_txn txn;
  mt_ckpt_shard_desc d;
  uint64_t lo, n; /* this rank's slice of its shard */
  float *host;    /* 3 * n floats: master, adam_m, adam_v at the boundary */
  mt_ckpt_chunks chunks;
  pthread_t thread;
  int has_thread;
  int written; /* the background writes are done */
  double t0;
  int64_t adam_t;           /* Adam's count and the loss scaler at the save's step */
  int64_t lr_samples;       /* and the samples of the applied updates (mt_trainer's) */
  int64_t rolled_back_to;   /* and the rollback its history holds (mt_trainer's) */
  int64_t consumed_samples; /* and the data position */
  mt_loss_scale scaler;
  mt_checkpoint_result res;
} mt_checkpoint_save;

/* Starts a save of step tr->step (collective): claims the directory, makes
 * the shard files, copies this rank's state to host memory; the writes then
 * run on a background thread. Training may go on (an async save), or the
 * caller waits at once (mt_trainer_save_poll with wait). */
int mt_trainer_save_begin(mt_trainer *tr, const char *job_dir, mt_checkpoint_save *sv);
/* At a later step boundary (collective): when every rank's writes are done
 * (when wait, once they are: an all-reduce every 20 ms meanwhile, so no
 * rank waits past the comm deadline for the slowest writer), commits the
 * checkpoint and sets *finished; otherwise returns 0 with *finished 0. A
 * save that failed returns its error with *finished 1; training may go on. */
int mt_trainer_save_poll(mt_trainer *tr, mt_checkpoint_save *sv, int wait, int *finished,
                         mt_checkpoint_result *res);

/* After a failure elsewhere: waits for the background writes and frees the
 * save; its directory stays uncommitted (readers ignore it, pruning removes it). */
void mt_trainer_save_discard(mt_checkpoint_save *sv);

/* Saves step tr->step under job_dir (begin, then poll waiting). The same return code on every rank;
 * the message names the world rank that failed (its node and device) and its error, this rank's
 * own when its part failed (res->failed_here). The storage steps (the step directory, each shard
 * file's creation and commit, the manifest and `latest`) run on a thread while the other ranks
 * all-reduce every 20 ms, as the slice writes do: a stalled disk is waited for up to the comm
 * deadline plus the largest shard file at 100 MB/s, then every rank gives up (MT_ETIMEDOUT)
 * naming the rank still at it and what it was doing. */
int mt_trainer_save(mt_trainer *tr, const char *job_dir, mt_checkpoint_result *res);

/* Loads the newest committed checkpoint of job_dir (step < 0), or exactly
 * that step: weights, moments, step count. A newer checkpoint that a check
 * found damaged is skipped with a warning naming the file and chunk; a named
 * step that fails is an error. One that could not be read (an I/O error, or
 * files a rank sees otherwise) is read again twice, then refused with
 * MT_EAGAIN, never skipped; so is a read that fails while loading. *resumed_step: the step loaded,
 * or -1 when there was none (a fresh start; 0 is a checkpoint of step 0). The checkpoint's tp and
 * pp must be the job's. After every rank loaded, world rank 0 sets aside the newer checkpoints a
 * check found damaged (mt_ckpt_set_aside: renamed, `latest` moved to the one loaded), logging each;
 * if that fails, it logs why and the run goes on. */
int mt_trainer_resume(mt_trainer *tr, const char *job_dir, int64_t step, int64_t *resumed_step);

/* Starts the run from another job's committed checkpoint (checkpoint.load:
 * a step directory, or a job directory for the checkpoint its resume would
 * take), as Megatron's --load with --finetune: the fp32 master weights of
 * the same model, saved under any tp x pp (read as `ckpt export` reads
 * them); with load_optimizer Adam's moments and count too, and an fp16
 * run's loss scale (Megatron's optimizer state), else they start afresh.
 * Step 0, data from the start, a fresh learning-rate schedule. Every
 * checksum is checked before a byte loads (each file by one rank); a
 * newer checkpoint there that fails its checks is not passed over. Nothing
 * under path is written. Collective, the same return on every rank:
 * MT_EINVAL for a source the job cannot use (another model, damaged,
 * missing; named), MT_EAGAIN for one that could not be read. */
int mt_trainer_load_from(mt_trainer *tr, const char *path, int load_optimizer);

#endif
