/* timers.h — where a training step's time goes (train.timing_log_level,
 * Megatron's --timing-log-level).
 *
 * Level 1 times the step's phases (the forward and backward passes, the
 * gradient reductions, the norm, the update); level 2 adds the model's
 * pieces inside the passes (GEMMs, attention, LayerNorm, the element-wise
 * kernels, tensor-parallel communication, the head and the loss), summed
 * over the step's micro-batches. As Megatron's timers synchronise CUDA at
 * every start and stop, a timer waits for the device's queued work at each
 * of its boundaries (mt_device_wait, which leaves a fault to the step's own
 * sync): level 1 a few times a step, level 2 at every op, which serialises
 * the host's launches with the GPU's work and slows a GPU step (on a CPU
 * device, whose ops are done when they return, it costs nothing). Level 0,
 * the default, waits nowhere and keeps no times. */
#ifndef MT_TIMERS_H
#define MT_TIMERS_H

#include "device.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum mt_timer_id {
  /* level 1: the step's phases, Megatron's names where it has the phase */
  MT_TM_WEIGHTS_ROUND = 0, /* the fp32 master weights rounded to the 16-bit working copy */
  MT_TM_FORWARD_BACKWARD,  /* the pipeline schedule: every micro-batch's forward and backward */
  MT_TM_PIPELINE_WAIT,     /* of it, waiting on pipeline neighbours' activations and gradients */
  MT_TM_ALL_GRADS_SYNC,    /* the dp reduction of the buckets the backward left */
  MT_TM_EMBEDDING_GRADS,   /* the tied embedding's gradient summed between its two copies */
  MT_TM_GRAD_NORM,         /* the gradient slice's squared norm (and fp16's overflow check) */
  MT_TM_COUNT_ZEROS,       /* train.log_num_zeros_in_grad's count */
  MT_TM_STEP_ALL_REDUCE,   /* the all-reduce of loss, norm and votes: where ranks meet */
  MT_TM_OPTIMIZER,         /* AdamW on the slice (Megatron's optimizer-inner-step) */
  MT_TM_PARAMS_ALL_GATHER, /* ZeRO-1: the updated slices to every dp replica */
  /* level 2: the model's pieces, summed over the step's micro-batches */
  MT_TM_FWD_EMBEDDING, /* the token and position lookups and the embedding's dropout */
  MT_TM_FWD_LAYERNORM,
  MT_TM_FWD_LINEAR,      /* the blocks' GEMMs (with their bias and GeLU epilogues) */
  MT_TM_FWD_ATTENTION,   /* the attention op between QKV's GEMM and the projection's */
  MT_TM_FWD_ELEMENTWISE, /* dropout and residual adds, the 16-bit stream's rounding */
  MT_TM_FWD_TP_COMM,     /* tensor- and sequence-parallel sums and gathers */
  MT_TM_FWD_HEAD,        /* the LM head's GEMM (the logits) */
  MT_TM_FWD_LOSS,        /* cross-entropy and the losses read back */
  MT_TM_BWD_LOSS,        /* the logits' gradient */
  MT_TM_BWD_HEAD,        /* the LM head's two GEMMs */
  MT_TM_BWD_LAYERNORM,   /* LayerNorm's gradient (and its forward again, for the GEMMs' input) */
  MT_TM_BWD_LINEAR,      /* the blocks' GEMMs (with GeLU's gradient in an epilogue) */
  MT_TM_BWD_ATTENTION,
  MT_TM_BWD_ELEMENTWISE, /* dropout's gradient, GeLU again, zeroed buffers, the stream unpacked */
  MT_TM_BWD_TP_COMM,
  MT_TM_BWD_RECOMPUTE, /* parallel.recompute: the blocks' forward run again */
  MT_TM_BWD_DP_COMM,   /* starting the dp reduction of the buckets a block completed */
  MT_TM_BWD_EMBEDDING, /* the embedding's gradient scattered by token and position */
  MT_TM_COUNT
} mt_timer_id;

/* One rank's timers. ms sums what each timer measured since the caller last
 * zeroed it; level is the job's. */
typedef struct mt_timers {
  int level;
  mt_device *dev;
  double ms[MT_TM_COUNT];
  double mark;   /* level 2: when the last lap ended, ms on mt_mono_s's clock */
  int backward;  /* level 2: in the backward pass, whose laps of a forward id (the
                    pieces both passes run: LayerNorm, tp comm, element-wise, ...) go
                    to its backward timer */
  int recompute; /* level 2: laps go to MT_TM_BWD_RECOMPUTE (a block's forward again) */
} mt_timers;

/* The timer's name as the step log prints it ("forward-backward", ...). */
const char *mt_timer_name(int id);
/* The id of the timer named name; -1 for none. */
int mt_timer_find(const char *name);
/* The lowest train.timing_log_level that keeps timer id. */
int mt_timer_level(int id);

/* Whether a step at train.timing_log_level `level` reports timer id, whose
 * most of any rank was max_ms: of that level, and some rank ran it */
static inline int mt_timer_reported(int id, int level, double max_ms) {
  return mt_timer_level(id) <= level && max_ms > 0.0;
}

/* Milliseconds now, on mt_mono_s's clock, once d's queued work is done
 * when t keeps level-1 timers (else the clock alone, no wait). */
double mt_timers_now(mt_timers *t);
/* Adds now - since (mt_timers_now) to timer id, when t keeps it. */
void mt_timers_add(mt_timers *t, int id, double since);
/* Level 2: starts the next lap now (after the device's queued work). */
void mt_timers_mark(mt_timers *t);
/* Level 2: the time since the last lap's end (or mark) goes to timer id,
 * a forward piece's (MT_TM_FWD_*), which is its backward timer's while
 * t->backward, and MT_TM_BWD_RECOMPUTE while t->recompute; a new lap
 * starts. t may be NULL or keep a lower level: nothing then. */
void mt_timers_lap(mt_timers *t, int id);

#ifdef __cplusplus
}
#endif

#endif
