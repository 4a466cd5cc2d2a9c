/* timers.c — train.timing_log_level's timers. */
#include "timers.h"

#include <string.h>

#include "monotime.h"

static const char *const names[MT_TM_COUNT] = {
    [MT_TM_WEIGHTS_ROUND] = "weights-round",
    [MT_TM_FORWARD_BACKWARD] = "forward-backward",
    [MT_TM_PIPELINE_WAIT] = "pipeline-wait",
    [MT_TM_ALL_GRADS_SYNC] = "all-grads-sync",
    [MT_TM_EMBEDDING_GRADS] = "embedding-grads-all-reduce",
    [MT_TM_GRAD_NORM] = "grad-norm",
    [MT_TM_COUNT_ZEROS] = "optimizer-count-zeros",
    [MT_TM_STEP_ALL_REDUCE] = "step-all-reduce",
    [MT_TM_OPTIMIZER] = "optimizer-inner-step",
    [MT_TM_PARAMS_ALL_GATHER] = "params-all-gather",
    [MT_TM_FWD_EMBEDDING] = "forward-embedding",
    [MT_TM_FWD_LAYERNORM] = "forward-layernorm",
    [MT_TM_FWD_LINEAR] = "forward-linear",
    [MT_TM_FWD_ATTENTION] = "forward-attention",
    [MT_TM_FWD_ELEMENTWISE] = "forward-elementwise",
    [MT_TM_FWD_TP_COMM] = "forward-tp-comm",
    [MT_TM_FWD_HEAD] = "forward-head",
    [MT_TM_FWD_LOSS] = "forward-loss",
    [MT_TM_BWD_LOSS] = "backward-loss",
    [MT_TM_BWD_HEAD] = "backward-head",
    [MT_TM_BWD_LAYERNORM] = "backward-layernorm",
    [MT_TM_BWD_LINEAR] = "backward-linear",
    [MT_TM_BWD_ATTENTION] = "backward-attention",
    [MT_TM_BWD_ELEMENTWISE] = "backward-elementwise",
    [MT_TM_BWD_TP_COMM] = "backward-tp-comm",
    [MT_TM_BWD_RECOMPUTE] = "backward-recompute",
    [MT_TM_BWD_DP_COMM] = "backward-dp-comm",
    [MT_TM_BWD_EMBEDDING] = "backward-embedding",
};

const char *mt_timer_name(int id) { return id >= 0 && id < MT_TM_COUNT ? names[id] : "?"; }

int mt_timer_find(const char *name) {
  for (int i = 0; name && i < MT_TM_COUNT; i++)
    if (!strcmp(names[i], name)) return i;
  return -1;
}

int mt_timer_level(int id) { return id < MT_TM_FWD_EMBEDDING ? 1 : 2; }

double mt_timers_now(mt_timers *t) {
  if (t && t->level >= 1 && t->dev) mt_device_wait(t->dev);
  return 1e3 * mt_mono_s();
}

void mt_timers_add(mt_timers *t, int id, double since) {
  if (t && t->level >= mt_timer_level(id)) t->ms[id] += mt_timers_now(t) - since;
}

void mt_timers_mark(mt_timers *t) {
  if (t && t->level >= 2) t->mark = mt_timers_now(t);
}

void mt_timers_lap(mt_timers *t, int id) {
  if (!t || t->level < 2) return;
  /* the backward timer of each forward piece, in the order of the enum */
  static const int backward_of[] = {MT_TM_BWD_EMBEDDING, MT_TM_BWD_LAYERNORM,   MT_TM_BWD_LINEAR,
                                    MT_TM_BWD_ATTENTION, MT_TM_BWD_ELEMENTWISE, MT_TM_BWD_TP_COMM,
                                    MT_TM_BWD_HEAD,      MT_TM_BWD_LOSS};
  _Static_assert(sizeof backward_of / sizeof *backward_of ==
                     MT_TM_FWD_LOSS - MT_TM_FWD_EMBEDDING + 1,
                 "a backward timer for every forward piece");
  if (t->recompute)
    id = MT_TM_BWD_RECOMPUTE;
  else if (t->backward && id >= MT_TM_FWD_EMBEDDING && id <= MT_TM_FWD_LOSS)
    id = backward_of[id - MT_TM_FWD_EMBEDDING];
  double now = mt_timers_now(t);
  t->ms[id] += now - t->mark;
  t->mark = now;
}
