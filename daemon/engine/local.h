/* local.h — a job on this machine's devices, one thread per device.
 *
 * `mtnlgd --standalone` runs here: tp * pp * dp ranks (mt_job_dp: the node
 * daemon's generation's width, else parallel.dp_min), each a thread with
 * its own device ("cpu:0", "cpu:1", …), its own trainer and a data-parallel
 * group over Gloo bootstrapped through an in-process store — the same comm
 * and engine code as ranks spread over nodes. The OpenMP threads of the
 * machine are divided among the device threads. Rank 0 reports steps, runs
 * validation and exports; a failure on any rank aborts the group so every
 * rank ends the step with an error instead of waiting out its deadline.
 * It never exits the process: a rank's failure is mt_local_wait's result.
 */
#ifndef MT_LOCAL_H
#define MT_LOCAL_H

#include <signal.h>

#include "checkpoint.h"
#include "job.h"
#include "store.h"
#include "train.h"

typedef struct mt_local_opts {
  const mt_job *job;
  /* The ranks may be spread over procs processes on this machine (tests,
   * development): process proc_rank runs world ranks [proc_rank * W / procs,
   * (proc_rank + 1) * W / procs), and all of them bootstrap through store
   * (a file or TCP store they share). procs 0 or 1: every rank here, store
   * NULL: an in-process store. */
  int procs, proc_rank;
  mt_store *store;
  /* Or, for a node of a cluster: this process runs world ranks
   * [rank_begin, rank_begin + rank_count) (rank_count > 0 overrides procs),
   * rank k of them on device devices[k] ("cpu:1", "cuda:3"; NULL: kind:rank),
   * and the groups' store keys start with comm_prefix ("gen/3/comm"; NULL:
   * "standalone"). mt_job_dp(job) is the data-parallel width. */
  int rank_begin, rank_count;
  const char *const *devices;
  const char *comm_prefix;
  const char *node;            /* this node's name, for messages other nodes repeat; NULL:
                                  standalone */
  int generation;              /* the cluster's (0: standalone); an unwritable checkpoint.dir
                                  is the job's fault in the first, this node's in a later one */
  int omp_threads;             /* shared by this process's ranks; 0: every core */
  const char *device_kind;     /* "cpu" */
  int comm_timeout_ms;         /* 0: 300000 */
  const char *export_path;     /* safetensors at the end, or NULL */
  volatile sig_atomic_t *stop; /* read just before each step's all-reduce (and every 50 ms
                                  while paused), so a signal during a step stops the run
                                  after that step; all ranks stop at one
                                  boundary. Read with __atomic_load_n: set it with
                                  __atomic_store_n (lock-free on an int, so a signal handler
                                  may) */
  /* The coordinator's latest order word (train.h, mt_order_word), read by
   * world rank 0 just before each step's all-reduce (an order that comes
   * during a step acts after it) and agreed on by all: pause
   * holds every rank after that step (a small all-reduce every 50 ms) until
   * resume or stop; stop ends the run there. NULL: no orders. */
  volatile int64_t *order;
  /* the first rank of this process, when an order takes effect after step */
  void (*on_order)(int kind, int64_t seq, int64_t step, void *arg);
  /* Checkpoints go to job_dir (NULL: checkpoint.dir/<job name>, or none
   * without checkpoint.dir): after every checkpoint.interval steps, on a
   * checkpoint order, before stopping, and at the end of the run; a job
   * resumes from the newest committed one. The first rank of this process
   * reports each: phase 0 starting, 1 done (rc, msg why it failed, res);
   * order_seq is the order that asked for it (0: none). */
  const char *checkpoint_dir;
  void (*on_checkpoint)(int phase, int64_t step, int rc, const char *msg,
                        const mt_checkpoint_result *res, int64_t order_seq, void *arg);
  /* the first rank of this process, after each step (validation filled in
   * when it ran): every rank learns the loss in the step's all-reduce */
  void (*on_step)(const mt_step_stats *st, void *arg);
  /* the first rank of this process, as a validation or test pass goes:
   * before its first batch and after each (the step it follows is then
   * reported by on_step, a pass that fails ends the run) */
  void (*on_eval)(const mt_eval_progress *p, void *arg);
  /* the first rank of this process, after resuming from a checkpoint at step */
  void (*on_resumed)(int64_t step, void *arg);
  /* the first rank of this process, when the ranks agreed to stop after
   * step (before the last, or at it), why: MT_STOPPED_*. save_failed: NULL
   * when a checkpoint holds the state at step (or nothing was trained, or
   * the job keeps no checkpoints), else why the stop's save failed, and
   * the steps since saved (the newest checkpoint this run committed or
   * resumed from, -1: none) are lost */
  void (*on_stopped)(int64_t step, int why, const char *save_failed, int64_t saved, void *arg);
  /* (also called at the job's last step when its checkpoint failed, with
   * step = train.steps) */
  void *arg;
} mt_local_opts;

typedef struct mt_local mt_local;

/* Why the ranks stopped short of train.steps: a signal or an order,
 * train.exit_duration_mins' deadline (while training or paused), or a step
 * that is a multiple of train.exit_interval. */
enum { MT_STOPPED_ASKED = 0, MT_STOPPED_TIME = 1, MT_STOPPED_INTERVAL = 2 };
/* "stopped at step S of N: <why>" for a run that stopped short of its
 * last step (the engine's log and the node's report say it alike). */
void mt_local_stop_reason(char *buf, size_t size, const mt_job *job, int64_t step, int why);

/* Starts this process's ranks and returns; o must outlive mt_local_wait. */
int mt_local_start(const mt_local_opts *o, mt_local **out);
/* Aborts every communicator of this process's ranks, so a rank blocked on a
 * lost peer fails now instead of at its deadline. Any thread, any time. */
void mt_local_abort(mt_local *l);
/* Waits for the ranks to end. 0, or the first failing rank's error with
 * mt_errmsg() naming the rank. l stays valid (mt_local_abort is harmless)
 * until mt_local_free. */
int mt_local_wait(mt_local *l);
/* Destroys the ranks' communicators, after mt_local_wait: a clean NCCL
 * finalize can take seconds each, so the daemon calls this off its event
 * loop. mt_local_abort stays harmless meanwhile; mt_local_free does it
 * when nobody did. */
void mt_local_close(mt_local *l);
void mt_local_free(mt_local *l);

/* Runs the job to its last step or an agreed stop: start, wait, free. */
int mt_local_run(const mt_local_opts *o);

#endif
