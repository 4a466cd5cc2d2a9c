/* lr.h — learning-rate schedules: constant, or linear warmup then cosine or
 * linear decay to min, as Megatron's OptimizerParamScheduler. Lengths are in
 * steps (the job spec converts token lengths). */
#ifndef MT_LR_H
#define MT_LR_H

#include <stdint.h>

#include "job.h"

/* LR for optimizer step `step` (0-based: the first update uses step 0). */
double mt_lr_at(const mt_lr_spec *s, int64_t step);

#endif
