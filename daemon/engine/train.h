/* train.h — the training step of one data-parallel rank: micro-batches with
 * gradient accumulation, ZeRO-1 over dp, global-norm clipping, AdamW, the LR
 * schedule.
 *
 * Step s consumes global samples [s*G, (s+1)*G) (DESIGN's determinism): dp
 * rank r takes [s*G + r*G/dp, s*G + (r+1)*G/dp) in micro-batches. The loss is
 * the mean over the global batch whatever dp and the micro-batch size. With
 * dp > 1 each rank owns a 1/dp slice of the flat parameters: the gradients
 * are cut into buckets (parallel.bucket_size elements at most, never across
 * two slices), each reduced onto the rank owning it, started during the last
 * micro-batch's backward as soon as the blocks above have their final
 * gradients (on a GPU the reduces run on NCCL's stream beside the backward's
 * kernels); each rank then updates its slice with its slice of the Adam
 * moments, and the slices are all-gathered. Loss, squared gradient norm and the stop order ride in
 * one all-reduce per step, so every rank acts on the same step boundary.
 *
 * Mixed precision (train.precision bf16 / fp16), Megatron's way: the model's
 * params stay the fp32 master weights (the optimizer's and the checkpoints');
 * each step first rounds them into the 16-bit working copy the forward and
 * backward read (mt_gpt_round_weights). fp16 scales the loss dynamically
 * (loss_scale.h): the backward starts from loss * scale; a non-finite global
 * norm, agreed on in the step's all-reduce, is an overflow on some rank and
 * every rank skips the update; otherwise 1/scale is folded into AdamW's
 * gradient scale with the clipping, computed on the unscaled norm. bf16 does
 * not scale.
 */
#ifndef MT_TRAIN_H
#define MT_TRAIN_H

#include <signal.h>

#include "comm.h"
#include "gpt.h"
#include "job.h"
#include "loss_scale.h"
#include "optim.h"
#include "source.h"

/* Why a rank asks to stop (mt_trainer.stop_request): a signal or a stop
 * order, or (world rank 0 only) train.exit_duration_mins has passed. */
enum { MT_STOP_NONE = 0, MT_STOP_ASKED = 1, MT_STOP_TIME = 2 };

typedef struct mt_step_stats {
  int64_t step;            /* 1-based number of the step just taken */
  int64_t consumed_tokens; /* after this step */
  int global_batch;        /* the samples this step read (under a ramp-up, less than the
                              job's global_batch early on) */
  int rampup;              /* the job ramps its batch up (train.rampup_batch) */
  double loss;             /* mean over the global batch */
  double lr;
  double grad_norm;    /* before clipping */
  int has_params_norm; /* train.log_params_norm: params_norm was taken */
  double params_norm;  /* of the fp32 master weights after this step's update, every
                          parameter counted once */
  double step_ms;
  double comm_ms; /* this rank's time in the step's data-parallel and world collectives */
  double tokens_per_s;
  double tflops;         /* model TFLOP/s on this device */
  int skipped;           /* non-finite gradients (fp16: an overflow): update skipped */
  int64_t skipped_total; /* steps of this run skipped so far, this one included; kept
                            in checkpoints, so a resumed run goes on counting */
  int loss_scaling;      /* fp16: dynamic loss scaling is on */
  double loss_scale;     /* the scale after this step's update (what the next step uses, as
                            Megatron logs it); 1 without loss scaling */
  int stop;              /* some rank asked to stop: all stop after this step */
  int timed;             /* ... and world rank 0's train.exit_duration_mins had passed */
  double exit_at;        /* world rank 0's train.exit_duration_mins deadline on its wall
                            clock (unix seconds) as of this step's all-reduce; 0: none */
  double bubble;         /* share of the step the ranks spent waiting on pipeline
                            neighbours (mean over ranks; 0 without pp) */
  int64_t order;         /* the coordinator's order word as every rank agreed on it
                            (mt_order_word: seq << 4 | kind), 0 when none */
  int has_val;           /* validation ran after this step (its interval's, or a stop's) */
  double val_loss;       /* mean over eval.iters global batches of the valid split */
  /* the last step of a completed run: Megatron's validation "at the end of
   * training" (on from the interval's, mt_eval_first_batch) and the test
   * pass over the test split's first eval.iters batches */
  int has_final_val, has_test;
  double final_val_loss, test_loss;
  /* train.log_num_zeros_in_grad (Megatron's --log-num-zeros-in-grad): the
   * zero elements of the gradients the update used (after the dp reduce,
   * before clipping), every parameter counted once; none on a skipped step */
  int has_num_zeros;
  int64_t num_zeros;
  int64_t consumed_samples; /* after this step (TensorBoard's "... vs samples" step) */
  int world_size;           /* the ranks this step ran on */
  /* train.timing_log_level > 0: each timer's ms in this step (timers.h), the
   * least and the most of any rank; a timer of a higher level than the
   * job's, or that no rank ran, is 0 on both */
  int timing_level;
  double timer_min[MT_TM_COUNT], timer_max[MT_TM_COUNT];
  /* train.timing_log_option (mt_timing_option); under all, every rank's
   * ms of each timer in this step, timer_ranks[r * MT_TM_COUNT + id] for
   * world rank r < timer_ranks_n: the trainer's, valid until its next step
   * (read it in the step's callback, never from a copy); NULL otherwise */
  int timing_option;
  const double *timer_ranks;
  int timer_ranks_n;
  /* this rank's device memory after the step's update (mt_device_mem_stats)
   * on the trainer's first step, for the memory line, and on every step
   * under train.log_memory_to_tensorboard; has_memory 0 on the others and
   * when the device could not say */
  int has_memory;
  mt_device_mem memory;
} mt_step_stats;

/* The groups one rank belongs to. Rank order is Megatron's: world rank =
 * tp_rank + tp * (dp_rank + dp * pp_rank), so a tp group never spans nodes.
 * Any of them is NULL when its size is 1. */
typedef struct mt_groups {
  mt_comm *world; /* every rank: loss, norm and stop order */
  mt_comm *tp;    /* same stage and replica: the shards of every layer */
  mt_comm *dp;    /* same stage, every replica: ZeRO-1 */
  /* Pipeline links, two ranks each (the lower stage is rank 0), one per
   * direction: NCCL runs a group's operations in order on its stream, so a
   * receive posted ahead on one never holds up the other's traffic. NULL at
   * the ends of the pipeline. */
  mt_comm *act_in, *grad_out; /* with the stage before: its output, our input's gradient */
  mt_comm *act_out, *grad_in; /* with the stage after: our output, its gradient */
  mt_comm *embed;             /* first and last stage of a replica: the tied embedding's gradient
                                 (NULL with model.untie_embeddings: no copy to sum) */
  int dp_rank, dp_size, pp_rank, pp_size, tp_rank, tp_size;
} mt_groups;

/* [lo, hi) of the flat gradients, reduced onto rank owner of the dp group
 * once block `ready` of the stage (and all above it) has its gradients;
 * ready -1: at the end of the backward (embeddings, after the tied copies'
 * all-reduce). */
typedef struct mt_grad_bucket {
  size_t lo, hi;
  int owner, ready;
} mt_grad_bucket;

/* One operation of a stage's pipeline schedule: the forward or backward
 * of micro-batch `micro` through the stage's model chunk `chunk`. */
typedef enum { MT_PIPE_FWD = 1, MT_PIPE_BWD = 2 } mt_pipe_kind;
typedef struct mt_pipe_op {
  mt_pipe_kind kind;
  int chunk, micro;
} mt_pipe_op;

/* The order stage s of pp runs its operations in over `micro` micro-batches
 * of a step, v chunks a stage: PipeDream-Flush (1F1B) with v = 1, p - s - 1
 * warm-up forwards, then a forward and a backward in turn, then the
 * remaining backwards; with v > 1 Megatron's interleaved 1F1B (Narayanan et
 * al. 2021, sec. 2.2), micro a multiple of pp: forwards and backwards taken
 * pp micro-batches of a chunk at a time, the chunks in order forward and in
 * reverse backward, after 2 (p - s - 1) + (v - 1) p warm-up forwards (all of
 * them when micro is pp). forward_only: every forward in that order. ops
 * holds 2 micro v; returns how many it wrote. */
int mt_pipe_schedule(int pp, int s, int v, int micro, int forward_only, mt_pipe_op *ops);
/* The most micro-batches whose activations chunk c of stage s holds at once
 * (forwarded, not yet backward) over steps of any multiple of pp (v > 1) or
 * any count (v = 1) of micro-batches up to micro: into inflight[v]. */
int mt_pipe_inflight(int pp, int s, int v, int micro, int *inflight);

/* A validation or test pass under way. */
typedef struct mt_eval_progress {
  mt_split split;      /* MT_SPLIT_VALID or MT_SPLIT_TEST */
  int end_of_training; /* one of Megatron's passes after the last step */
  int64_t step;        /* the step it follows */
  int done, total;     /* global batches (eval.iters) */
} mt_eval_progress;

typedef struct mt_trainer {
  const mt_job *job;
  mt_device *dev;
  mt_gpt model; /* this stage's parameters; with virtual stages, of every chunk */
  /* the model as it runs: chunks[c] is the stage's chunk c (parallel.
   * virtual_stages), a view of model's parameters with its own activations;
   * with one chunk, &model itself */
  mt_gpt *chunks;
  int n_chunks;
  int grads_block0;    /* during a backward: model's block index of its chunk's block 0 */
  mt_timers timers;    /* train.timing_log_level's, of the step being taken; the chunks'
                          forward and backward time their pieces into it at level 2 */
  int memory_taken;    /* a step has taken the device's memory figures (mt_step_stats) */
  double *timer_ranks; /* train.timing_log_option all: every rank's timers of the last
                          step, rank-major (world size x MT_TM_COUNT); NULL otherwise */
  mt_adamw opt;
  mt_data_source *data;        /* first and last stages only (the others read no tokens) */
  int reads_tokens;            /* the stage opens the data: the first or the last, or any
                                  with data.reset_attention_mask */
  int reads_for_documents;     /* a middle stage that opens it for reset_attention_mask alone */
  uint64_t data_train_samples; /* training samples data was sized for */
  mt_groups g;
  int64_t step;                   /* steps taken */
  int64_t consumed_samples;       /* training samples read (every replica's), skipped steps'
                                     too: where the next step reads; a resume restores it, so a
                                     run resumed with another global_batch neither skips nor
                                     repeats data (Megatron's consumed_train_samples) */
  int micro_batches;              /* of the current step on this replica (the job's
                                     global_batch's before the first; fewer during a batch
                                     ramp-up) */
  int64_t lr_samples;             /* samples of the applied updates: under a batch ramp-up
                                     the LR schedule's position, in samples (Megatron's
                                     sample-based schedule); kept in checkpoints */
  int64_t rolled_back_to;         /* the checkpoint.resume_step of the rollback this run's
                                     history holds last (-1: none); kept in checkpoints, so a
                                     later start does not roll back again */
  size_t shard_lo, shard_n;       /* this rank's ZeRO-1 slice of the flat parameters */
  struct mt_grad_bucket *buckets; /* dp > 1: in parameter order */
  int n_buckets, next_bucket;     /* the next to start, counting down; -1 when all are */
  /* the gradients the step's norm counts, a tensor (or the part of one in
   * the slice) each in table order; NULL where the whole slice counts */
  mt_sumsq_span *norm_spans;
  int n_norm_spans;
  mt_sumsq_span *pnorm_spans; /* the same spans over the master weights (log_params_norm) */
  /* train.log_num_zeros_in_grad: the gradients the zero count reads, a
   * tensor's real elements in the slice each (never the whole slice: no
   * alignment gap, ZeRO tail or padded vocabulary row) */
  mt_sumsq_span *zero_spans;
  int n_zero_spans;
  /* receive buffers, two of each so the next operation's can be posted
   * while the stage computes with the current one (a kind's receives take
   * them in turn) */
  void *recv_buf;     /* the allocation of: */
  float *recv_dy[2];  /* (B,T,C) gradients from the next stage; NULL on the last */
  void *recv_wire[2]; /* the previous stage's output as it travels (mt_gpt_stage_output_wire);
                         NULL on the first */
  volatile int stop_request;   /* set by the owner thread, MT_STOP_*; agreed on in the step */
  int64_t stop_at_ms;          /* world rank 0: train.exit_duration_mins' deadline on the
                                  monotonic clock (0: none), read just before the step's
                                  all-reduce, so the step during which it passes is the last
                                  (Megatron checks after each step) */
  volatile int64_t order_word; /* world rank 0 only: the latest order it knows of */
  /* read just before the step's all-reduce (NULL: none): a signal or
   * an order that comes during a step stops it or acts after that step, not
   * the next (a step of MT-NLG's size takes tens of seconds) */
  volatile sig_atomic_t *stop_flag; /* the process's stop flag, set by a signal */
  volatile int64_t *order_src;      /* world rank 0 only: the coordinator's latest order */
  const char *node;                 /* this process's node.name, named in messages other ranks
                                       repeat (a failed checkpoint's); NULL: standalone */
  int32_t *inputs, *targets;        /* host, (micro_batch, seq) */
  double flops_per_step;            /* model FLOPs of this rank per step (the current step's) */
  double flops_per_micro;           /* ... per micro-batch */
  mt_precision precision;           /* of the job's train.precision */
  mt_loss_scale scaler;             /* fp16 only; the same state on every rank */
  /* a validation or test pass's progress, on the rank that reports (NULL:
   * none): before its first batch and after each */
  void (*on_eval)(const mt_eval_progress *p, void *arg);
  void *eval_arg;
} mt_trainer;

/* Orders from the coordinator, numbered by seq, agreed on by every rank in
 * the step's all-reduce: all act on the same step boundary. */
enum {
  MT_ORDER_NONE = 0,
  MT_ORDER_PAUSE = 1,
  MT_ORDER_RESUME = 2,
  MT_ORDER_STOP = 3,
  MT_ORDER_CHECKPOINT = 4,
  MT_ORDER_RESIZE = 5
};
static inline int64_t mt_order_word(int64_t seq, int kind) { return seq << 4 | kind; }
static inline int mt_order_kind(int64_t word) { return (int)(word & 15); }
static inline int64_t mt_order_seq(int64_t word) { return word >> 4; }

/* The model's shape as the job gives it (layers, widths, vocabulary,
 * positions, LayerNorm's epsilon, initialisation, dropout, untied head):
 * what every copy of the model shares, whatever its layout. The layout's
 * fields (tp, stage, ZeRO shards, micro-batch slots) and the run's
 * (precision, recomputation, documents) are the caller's. */
mt_gpt_config mt_trainer_model_shape(const mt_job *job);

/* Builds this rank's stage of the model (initialised from seed or
 * model.init_from), its optimizer slice and data reader. g: its groups
 * (sizes must match parallel.pp and mt_job_dp), or NULL for a single device. */
int mt_trainer_create(mt_trainer *tr, const mt_job *job, mt_device *dev, const mt_groups *g);
void mt_trainer_destroy(mt_trainer *tr);

/* The rank's vote on stopping, for an all-reduce (sum) of every rank's: 1
 * for tr->stop_request, else 0.5 when world rank 0's train.exit_duration_mins
 * deadline (tr->stop_at_ms) has passed (setting MT_STOP_TIME), else 0. From
 * the sum, mt_stop_vote_timed says whether the stop is the deadline's: world
 * rank 0's 0.5 among the others' 1s. */
double mt_trainer_stop_vote(mt_trainer *tr);
/* Reads tr->stop_flag (a signal: MT_STOP_ASKED) and, on world rank 0,
 * tr->order_src into tr for the next vote: just before a step's all-reduce
 * and before each agreement while paused. */
void mt_trainer_poll(mt_trainer *tr);
int mt_stop_vote_timed(double sum);

/* One optimizer step: 1F1B (interleaved with virtual stages) over the micro-batches, then ZeRO-1.
 * Collective over every rank. */
int mt_trainer_step(mt_trainer *tr, mt_step_stats *st);
/* Makes the data reach n_train training samples: a run resumed with a
 * smaller global_batch than its checkpoint's reads past steps x global_batch
 * (reopens the source larger; a no-op when it already reaches). */
int mt_trainer_data_reach(mt_trainer *tr, uint64_t n_train);

/* The first of the eval.iters global batches of the valid split that the
 * validation after step `step` reads: Megatron's valid iterator moving on by
 * eval.iters batches a run, as a pure function of the step (a resumed,
 * re-formed or resized run reads what an uninterrupted one does). The run
 * after step k * eval.interval reads from (k - 1) * iters, one between them
 * (a stop's) what the next would; the run at the end of a completed run
 * (end_of_training), Megatron's "at the end of training" one, reads on from
 * (steps / interval) * iters, after the interval's run at the last step. */
uint64_t mt_eval_first_batch(const mt_job *job, int64_t step, int end_of_training);

/* Megatron's perplexity of a mean loss: e^loss, capped at e^20. */
double mt_ppl(double loss);

/* Megatron's line for a pass at the end of training (data "val" or
 * "test"), so its log parsers find it: "validation loss at the end of
 * training for val data | lm loss value: ... | lm loss PPL: ... |". */
void mt_end_of_training_line(char *buf, size_t cap, const char *data, double loss);

/* Whether the data has a test split to run the test pass on (every rank
 * learns it alike). Collective over every rank. */
int mt_trainer_has_test(mt_trainer *tr, int *has);

/* Mean loss over eval.iters global batches of split `which` (valid or
 * test) from global batch first_batch, without dropout; end_of_training:
 * one of Megatron's passes after the last step (for tr->on_eval). Calls
 * tr->on_eval, when set, before the first batch and after each. Collective
 * over every rank. */
int mt_trainer_eval(mt_trainer *tr, mt_split which, int end_of_training, uint64_t first_batch,
                    double *loss);

/* Writes the whole model as GPT-2 safetensors from world rank 0, which
 * gathers replica 0's stages and shards one tensor at a time and writes
 * each as it completes (no rank holds more than its own weights and one
 * whole tensor). Collective over every rank. */
int mt_trainer_export(mt_trainer *tr, const char *path);

#endif
