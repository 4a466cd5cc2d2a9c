/* steplog.h — the per-step line on stdout, for people (text) or programs (json),
 * shared by `mtnlgd --standalone` and the node daemon, and the memory check
 * both run before a job starts. Printing never fails or stops a run. */
#ifndef MT_STEPLOG_H
#define MT_STEPLOG_H

#include <stdint.h>

#include "job.h"
#include "train.h"

/* Prints st when it is due: every log_every steps, the first and last, with
 * validation, and the step a stop took effect. */
void mt_steplog(const mt_step_stats *st, int64_t steps, int log_every, int json);

/* Checks the job's memory plan, as this engine stores it (weights, grads and
 * Adam fp32; bf16 and fp16 jobs add a 16-bit working copy of the weights and
 * keep their blocks' activations in 16 bits), against the
 * devices of this process: a GPU's own memory when device is "cuda:N" (the
 * first of them), else this machine's RAM shared by ranks_here CPU devices.
 * MT_EINVAL with the numbers when it cannot fit; logs the plan otherwise.
 * Before that, MT_EINVAL for a 16-bit job on GPUs whose head size is over
 * MT_FLASH_MAX_HS (ops.h). */
int mt_check_memory_plan(const mt_job *job, int ranks_here, const char *device);

#endif
