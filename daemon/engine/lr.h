/* lr.h — learning-rate schedules: constant, or linear warmup then cosine or
 * linear decay to min, and the weight decay's, as Megatron's
 * OptimizerParamScheduler. Lengths are in
 * steps (the job spec converts token lengths). Pure functions of their
 * arguments: no state, so every rank and a resumed run agree. */
#ifndef MT_LR_H
#define MT_LR_H

#include <stdint.h>

#include "job.h"

/* LR of the update made after `done` updates were applied (Megatron's
 * num_steps, in steps; fractional under a batch ramp-up, where an update of
 * b samples moves it on by b / global_batch): the first update, done = 0, is
 * at warmup_init (0) under a warmup, and peak comes with done = warmup_steps.
 * A skipped step (an fp16 overflow, a non-finite norm) applies no update, so
 * it moves the schedule on no more than Megatron's train_step does. */
double mt_lr_at(const mt_lr_spec *s, double done);

/* Weight decay of the update made after `done` updates (counted as for
 * mt_lr_at): Megatron's get_wd, start at done = 0, end from done =
 * incr_steps (the run's end) on; end throughout for a constant one. */
double mt_wd_at(const mt_wd_spec *w, double done);

#endif
