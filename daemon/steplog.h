/* steplog.h — the per-step line on stdout, for people (text) or programs (json),
 * shared by `mtnlgd --standalone` and the node daemon, and the memory check
 * both run before a job starts. Printing never fails or stops a run. */
#ifndef MT_STEPLOG_H
#define MT_STEPLOG_H

#include <stdint.h>

#include "job.h"
#include "train.h"

/* The steps since the last printed line, which the next one sums up (zero
 * it before the first step). */
typedef struct mt_steplog_acc {
  int64_t last_step; /* the step added last; a step that does not follow it starts over */
  int steps;         /* steps since the last line */
  int counted;       /* of them, those not skipped: the loss's mean */
  int skipped;
  double loss, ms, tokens, flop_ms, bubble_ms;
  double timer_min[MT_TM_COUNT], timer_max[MT_TM_COUNT]; /* train.timing_log_level's sums */
  /* train.timing_log_option all: each rank's sums, rank-major (rank_n
   * ranks), over rank_steps of the steps; the buffer (rank_cap ranks) stays
   * from line to line until mt_steplog_acc_free */
  double *rank_ms;
  int rank_n, rank_cap, rank_steps;
} mt_steplog_acc;

/* Frees what acc holds and zeroes it. */
void mt_steplog_acc_free(mt_steplog_acc *acc);

/* Adds st to acc and prints a line when one is due: every log_every steps,
 * the first and last, with validation, and the step a stop took effect. As
 * Megatron's training_log, a line gives the means over the steps since the
 * last one (the loss over those not skipped; time, tokens/s, TFLOP/s and
 * bubble over their time) and the lr, gradient norm and loss scale of its
 * own step. Under train.timing_log_level the line is followed (text) or
 * joined ("timers" in JSON: name to [min, max]) by Megatron's "(min, max)
 * time across ranks (ms)", each timer's mean per step over those steps,
 * every timer of the job's level that some rank ran; under
 * train.timing_log_option max by its "max time across ranks (ms)", and
 * under all by its "times across ranks (ms)", a line for each rank that
 * ran the timer, and in JSON "timers_by_rank" too (name to each rank's
 * ms). */
void mt_steplog(mt_steplog_acc *acc, const mt_step_stats *st, int64_t steps, int log_every,
                int json);

/* A validation or test pass in the log, for a pass that runs long: a line
 * every every_ms of it (MT_EVALLOG_EVERY_MS in the daemons) with the
 * batches done, the time so far and the time left at its pace, and, for a
 * pass that logged one, a line at its end with its time. Megatron prints
 * "Evaluating iter k/n" at every batch when verbose; at scale a pass takes
 * minutes, and the journal otherwise shows nothing between its step's
 * save and its step's line. A shorter pass logs nothing (its loss is on
 * the step's line). Call with each progress report of the pass (the
 * engine's on_eval: done 0 at its start, then after each batch) and now_ms
 * on the monotonic clock; zero e before the first. */
/* The pass in mtnlgctl status's words, into buf: "validation after step
 * 80", "validation at the end of training after step 81", "the test pass
 * after step 81". */
const char *mt_eval_pass_name(char *buf, size_t cap, const mt_eval_progress *p);

#define MT_EVALLOG_EVERY_MS 30000
typedef struct mt_evallog {
  int64_t started_ms, next_ms;
  int logged; /* the pass under way logged a line */
} mt_evallog;
void mt_evallog_progress(mt_evallog *e, const mt_eval_progress *p, int64_t now_ms,
                         int64_t every_ms);

/* The RAM this process holds now (VmRSS), in bytes, and at most so far
 * (VmHWM) into *peak unless NULL; 0 when unknown. */
int64_t mt_proc_memory(int64_t *peak);

/* Megatron's report_memory, for a process's first step st: what its GPUs
 * (specs[0..n), "cuda:N"; CPU devices are skipped) have in use now, every
 * process's on them (cudaMemGetInfo), what this process holds in RAM now
 * and at most (VmRSS, VmHWM), and what the engine's allocations on the
 * device of st's rank hold (st->memory: now, at most, how many), beside
 * what the plan said (the line mt_check_memory_plan logs). One log line;
 * never fails. */
void mt_log_memory(const char *const *specs, int n, const mt_step_stats *st);

/* Checks the job's memory plan, as this engine stores it (weights, grads and
 * Adam fp32; bf16 and fp16 jobs add a 16-bit working copy of the weights and
 * keep their blocks' activations in 16 bits), against the
 * devices of this process: a GPU's own memory when device is "cuda:N" (the
 * first of them), else this machine's RAM shared by ranks_here CPU devices.
 * MT_EINVAL with the numbers when it cannot fit; logs the plan otherwise
 * (and, for a 16-bit job on GPUs whose head size is over MT_FLASH_MAX_HS,
 * ops.h, that its attention takes the chunked GEMMs). */
int mt_check_memory_plan(const mt_job *job, int ranks_here, const char *device);

#endif
