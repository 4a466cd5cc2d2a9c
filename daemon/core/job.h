/* job.h — the job spec: what to train, how, on what data.
 *
 * JSON (jansson), read by the coordinator (or by `mtnlgd --standalone`),
 * never by followers. Sections as DESIGN.md: model, parallel, train, data,
 * checkpoint, eval. A model is a preset from etc/models/<name>.json with any
 * field overridden in the job. mt_job_load() refuses a job that cannot run
 * with one line per problem, each naming the key ("train.global_batch: 30 is
 * not divisible by parallel.micro_batch * dp = 4").
 */
#ifndef MT_JOB_H
#define MT_JOB_H

#include <stdint.h>

#define MT_PATH_MAX 1024
#define MT_PROFILE_MAX_RANKS 64 /* train.profile.ranks */

typedef struct mt_model_spec {
  char preset[64]; /* "" if the model is given field by field */
  int n_layer;     /* transformer blocks */
  int n_embd;      /* hidden size */
  int n_head;
  int vocab_size;       /* real tokens */
  int vocab_pad_to;     /* pad vocab to a multiple of this (default 128) */
  int padded_vocab;     /* derived: roundup(vocab_size, vocab_pad_to * tp) */
  int seq_len;          /* context length: the tokens of a sample */
  int max_positions;    /* learned positions, rows of wpe (Megatron's --max-position-embeddings);
                           at least seq_len; 0 as parsed: seq_len */
  float ln_eps;         /* LayerNorm epsilon (1e-5) */
  float init_std;       /* normal(0, init_std); output projections / sqrt(2 L) */
  float hidden_dropout; /* dropout on embeddings and residual branches */
  float attention_dropout;
  char init_from[MT_PATH_MAX]; /* safetensors with HF GPT-2 names, or "" */
  int untie_embeddings;        /* the LM head a weight of its own, not wte (Megatron's
                                  --untie-embeddings-and-output-weights); default 0: tied */
  char attention_backend[16];  /* Megatron's --attention-backend: how GPUs compute a 16-bit
                                  job's attention, "flash", "chunked" (its unfused) or
                                  "auto"; "" (default): the devices' own (MTNLG_ATTENTION,
                                  else flash). CPU devices have one way. */
} mt_model_spec;

typedef struct mt_parallel_spec {
  int tp, pp, dp_min, dp_max; /* standalone, one device: all 1 */
  int dp;                     /* the data-parallel width this run trains at: mtnlgd sets its
                                 generation's, which may lie outside dp_min..dp_max after a
                                 resize; 0 (as parsed) is dp_min. Not a job key: never
                                 written out, so a checkpoint records the job as given */
  int micro_batch;            /* sequences per micro-batch */
  int recompute;              /* per-layer activation recomputation */
  int recompute_layers;       /* with recompute: only each stage's first this many layers
                                 (Megatron's --recompute-method block); 0: every layer */
  int sequence_parallel;      /* with tp > 1: LayerNorms, dropout and the stream split over tp
                                 by rows (Megatron's --sequence-parallel) */
  char schedule[16];          /* "1f1b" */
  int virtual_stages;         /* model chunks a pipeline stage holds (Megatron's virtual
                                 pipeline): > 1 runs the interleaved 1F1B schedule, stage s
                                 holding chunks s, s + pp, ... of pp * virtual_stages;
                                 default 1 */
  int bucket_size;            /* dp > 1: gradient elements per bucket reduced during the
                                 backward pass (Megatron's --ddp-bucket-size) */
  int overlap_p2p;            /* pipeline receives are posted an operation ahead and sends
                                 waited for only when their buffer is needed again (Megatron's
                                 --overlap-p2p-communication); 0: each exchange completes
                                 before the next compute. Default 1. */
} mt_parallel_spec;

typedef enum {
  MT_LR_CONSTANT = 0,
  MT_LR_COSINE = 1,
  MT_LR_LINEAR = 2,
  MT_LR_INVERSE_SQRT = 3, /* Megatron's inverse-square-root */
  MT_LR_WSD = 4           /* warmup, stable at peak, then wsd_decay_steps of decay to min */
} mt_lr_kind;

/* How WSD's last wsd_decay_steps go from peak to min (Megatron's
 * --lr-wsd-decay-style). */
typedef enum {
  MT_WSD_LINEAR = 0,
  MT_WSD_COSINE = 1,
  MT_WSD_EXPONENTIAL = 2,
  MT_WSD_MINUS_SQRT = 3
} mt_wsd_style;

typedef struct mt_lr_spec {
  mt_lr_kind kind;
  double peak, min;
  /* Lengths, resolved to steps by mt_job_load when given in tokens
   * (warmup_tokens / decay_tokens in the JSON); decay_steps defaults to
   * train.steps (under a batch ramp-up: the run's samples, in steps of
   * global_batch). Steps of global_batch samples: under a ramp-up the
   * schedule moves on by the samples of each applied update over
   * global_batch, as Megatron's sample-based schedule does. */
  int64_t warmup_steps, decay_steps;
  int64_t wsd_decay_steps; /* WSD: the decay at the end of decay_steps (0 otherwise) */
  mt_wsd_style wsd_style;
  double warmup_init; /* the lr the warmup rises from to peak (Megatron's --lr-warmup-init; 0) */
} mt_lr_spec;

/* How the weight decay goes from start to end over the run (Megatron's
 * --weight-decay-incr-style). */
typedef enum { MT_WD_CONSTANT = 0, MT_WD_LINEAR = 1, MT_WD_COSINE = 2 } mt_wd_style;

/* Megatron's weight-decay increment (--start-weight-decay,
 * --end-weight-decay): from start at the first update to end at the end of
 * the run. Constant (the default): end, which is train.weight_decay,
 * throughout. */
typedef struct mt_wd_spec {
  mt_wd_style style;
  double start, end;
  /* The run's length in steps of global_batch, the span of the increment
   * (derived: under a batch ramp-up the run's samples over global_batch,
   * rounded up, as the lr's default decay; not written out) */
  int64_t incr_steps;
} mt_wd_spec;

/* Dynamic loss scaling of fp16 training (Megatron's DynamicGradScaler, its
 * flags' defaults): the scale starts at initial, halves once hysteresis
 * overflows have been seen since it last grew (never below min) and doubles
 * after growth_interval clean steps in a row. bf16 and fp32 do not scale. */
typedef struct mt_loss_scale_spec {
  double initial;      /* 2^32 */
  double min;          /* 1 */
  int growth_interval; /* 1000 */
  int hysteresis;      /* 2 */
  int dynamic;         /* 1; 0: a static scale, initial throughout (Megatron's --loss-scale) */
} mt_loss_scale_spec;

/* Megatron's --rampup-batch-size: the global batch starts at start and
 * grows by increment each time another samples / ((global_batch - start) /
 * increment) samples have been consumed, until global_batch. start = 0: no
 * ramp-up. */
typedef struct mt_rampup_spec {
  int start, increment;
  int64_t samples; /* given in samples, or in tokens (samples of seq_len, rounded up) */
} mt_rampup_spec;

/* train.timing_log_option's values, Megatron's names (mt_job_timing_option_name):
 * the least and the most of any rank (minmax, the default), the most
 * alone (max), or every rank's own (all) */
typedef enum { MT_TIMING_MINMAX = 0, MT_TIMING_MAX, MT_TIMING_ALL } mt_timing_option;
const char *mt_job_timing_option_name(int option);

typedef struct mt_train_spec {
  int global_batch; /* sequences per step, whatever the split; under a ramp-up, the last */
  mt_rampup_spec rampup;
  int64_t steps; /* optimizer steps to run: as given, or resolved from train.samples or
                    train.tokens (below) */
  /* The run's length when the job gave it in samples or tokens rather than
   * steps: length_key "samples" or "tokens" and length_given the number
   * given ("" and 0 for train.steps). mt_job_load resolves it to steps (the
   * most updates whose batches it holds whole: Megatron's --train-samples);
   * everything else reads steps. Not written out: the resolved job, its
   * hash and a checkpoint's record of it are the same however the length
   * was spelled. */
  char length_key[8];
  int64_t length_given;
  uint64_t seed;
  mt_lr_spec lr;
  double beta1, beta2, adam_eps, weight_decay; /* weight_decay: wd.end under a schedule */
  mt_wd_spec wd;                               /* train.weight_decay_schedule */
  double clip_grad;                            /* global norm; 0 = off */
  char precision[8];             /* "fp32", "bf16" or "fp16": what the forward and backward read
                                    the weights in; the master weights stay fp32 */
  mt_loss_scale_spec loss_scale; /* used by fp16 only */
  int log_interval;              /* steps between log lines (1) */
  int log_params_norm;           /* Megatron's --log-params-norm: the norm of the fp32 master
                                    weights after each update, on the step line (off) */
  double exit_duration_mins;     /* Megatron's --exit-duration-in-mins: once a run has trained
                                    this long, it saves a checkpoint and stops (0: never) */
  int64_t exit_interval;         /* Megatron's --exit-interval: after a step that is a multiple
                                    of it (short of the last), saves and stops (0: never) */

  /* Megatron's --tensorboard-dir: world rank 0's process writes each step's
   * scalars there ("": none) */
  char tensorboard_dir[MT_PATH_MAX];
  /* Megatron's --log-num-zeros-in-grad: the gradients' zero elements on
   * each step's line (off) */
  int log_num_zeros_in_grad;
  /* Megatron's --timing-log-level: 0 none (default), 1 the step's phases, 2
   * also the model's pieces, as min and max across ranks with each step
   * line (daemon/model/timers.h) */
  int timing_log_level;
  /* Megatron's --timing-log-option: how a step line shows each timer across
   * ranks, mt_timing_option (default minmax) */
  int timing_log_option;
  /* Megatron's --log-timers-to-tensorboard: those timers' maxima in the
   * TensorBoard events too (off; needs tensorboard_dir and a level) */
  int log_timers_to_tensorboard;
  /* Megatron's --log-memory-to-tensorboard: world rank 0's device memory in
   * the TensorBoard events (mem-reserved-bytes, mem-allocated-bytes,
   * mem-max-allocated-bytes, mem-allocated-count; off; needs tensorboard_dir) */
  int log_memory_to_tensorboard;
  /* Megatron's --profile, --profile-step-start, --profile-step-end and
   * --profile-ranks (train.profile): the CUDA profiler's capture
   * (cudaProfilerStart) runs from after step step_start to after step
   * step_end on the GPUs of the listed world ranks, for `nsys profile
   * --capture-range=cudaProfilerApi`; on 0: none */
  struct {
    int on;
    int64_t step_start, step_end; /* 10 and 12: Megatron's */
    int n_ranks;
    int ranks[MT_PROFILE_MAX_RANKS]; /* [0]: Megatron's */
  } profile;
} mt_train_spec;

#define MT_MAX_BLEND 32

typedef struct mt_blend_spec {
  char prefix[MT_PATH_MAX]; /* Megatron indexed dataset: prefix.bin + prefix.idx */
  double weight;            /* > 0; normalised over the blend */
} mt_blend_spec;

/* Exactly one of: path (a flat uint16 token file read in order, no splits),
 * or one or more indexed datasets ("prefix": P is a blend of one). */
typedef struct mt_data_spec {
  char path[MT_PATH_MAX];
  int n_blend;
  mt_blend_spec blend[MT_MAX_BLEND];
  char split[64];              /* train,valid,test weights over documents ("949,50,1") */
  double split_valid_weight;   /* derived: split's valid weight (0: no valid split) */
  int shuffle;                 /* default 1 */
  char cache_dir[MT_PATH_MAX]; /* sample indices; "" = beside each dataset */
  /* Megatron's --valid-data-path / --test-data-path: datasets read whole as
   * the valid / test split in place of data.split's share (n 0: none given) */
  int n_valid, n_test;
  mt_blend_spec valid[MT_MAX_BLEND], test[MT_MAX_BLEND];
  int eod_mask_loss; /* Megatron's --eod-mask-loss: a position whose input token is
                        eod_token is left out of the loss (default 0) */
  int eod_token;     /* the end-of-document id; -1 when not given */
  /* Megatron's --reset-position-ids: the position after an eod_token input
   * is 0 again (default 0) */
  int reset_position_ids;
  /* Megatron's --reset-attention-mask: a position attends only to the
   * positions of its own document, the one an eod_token input ends
   * (default 0) */
  int reset_attention_mask;
  /* where they go when that cannot take them (the node's state_dir, set by
   * the daemon; not part of the job's JSON or hash); "" = kept in memory */
  char cache_fallback[MT_PATH_MAX];
} mt_data_spec;

typedef struct mt_eval_spec {
  int interval; /* steps between validation runs; 0 = never (nor the test pass) */
  int iters;    /* global batches of the valid split per run (each run reads the next ones,
                   mt_eval_first_batch), and of the test split in the test pass */
  int test;     /* the test pass at the end of a completed run (default 1); written to the
                   resolved job only when 0, so the jobs from before it keep their hash */
} mt_eval_spec;

typedef struct mt_checkpoint_spec {
  char dir[MT_PATH_MAX];         /* "" = none */
  int interval;                  /* steps; 0 = only on request */
  int keep;                      /* keep the newest N committed checkpoints (0: all) */
  int keep_every;                /* and every step that is a multiple of this (0: none) */
  int async_save;                /* copy to host at the boundary, write in the background */
  int64_t resume_step;           /* -1: the newest committed checkpoint; else exactly this step */
  char export_path[MT_PATH_MAX]; /* safetensors written at the end, or "" */
  char load[MT_PATH_MAX];        /* another job's native checkpoint to start from (a step or a
                                    job directory, Megatron's --load with --finetune), or "";
                                    ignored once this job has a checkpoint of its own */
  int load_optimizer;            /* with load: take Adam's moments too (default 0) */
  char export_dtype[8];          /* what the export stores: "fp32" (default), "bf16", "fp16" */
} mt_checkpoint_spec;

typedef struct mt_job {
  char name[64];
  mt_model_spec model;
  mt_parallel_spec parallel;
  mt_train_spec train;
  mt_data_spec data;
  mt_checkpoint_spec checkpoint;
  mt_eval_spec eval;
  char hash[17]; /* hex of a 64-bit hash of the canonical JSON */
} mt_job;

/* The weights of a data.split string (Megatron's --split): up to three
 * finite non-negative numbers separated by ',' or '/', the missing ones 0
 * ("100" is all train). Not normalised; MT_EINVAL naming the string. */
int mt_job_split_weights(const char *split, double w[3]);

/* Reads and validates a job file. preset_dirs: NULL-terminated list searched
 * for <preset>.json. overrides: NULL-terminated "section.key=value" strings
 * (the --set flag; value parsed as JSON, else taken as a string), applied to
 * the JSON before it is checked. Relative paths in the job are resolved
 * against the job file's directory. On failure returns MT_EINVAL (or MT_EIO)
 * and mt_errmsg() holds every problem, one per line. */
int mt_job_load(mt_job *job, const char *path, const char *const *preset_dirs,
                const char *const *overrides);
/* mt_job_load for planning (`mtnlgctl plan`): room to accept what this build
 * cannot run yet but a plan can count. Today that is nothing (bf16 and fp16
 * run on every backend), so it is mt_job_load. */
int mt_job_load_for_plan(mt_job *job, const char *path, const char *const *preset_dirs,
                         const char *const *overrides);
/* Same from a JSON string; base_dir resolves relative paths (may be NULL). */
int mt_job_parse(mt_job *job, const char *json, const char *base_dir,
                 const char *const *preset_dirs, const char *const *overrides);

/* Settings the job gives that its configuration never reads, one line each
 * naming the key and why: train.loss_scale away from its defaults without
 * fp16; data.split, data.shuffle or data.cache_dir with data.path;
 * parallel.sequence_parallel with tp = 1; data.eod_token without
 * data.eod_mask_loss, data.reset_position_ids or data.reset_attention_mask
 * (mt_job_reads_eod). They are accepted, as Megatron
 * accepts them (refusing them would change what a job that ran before
 * means); a daemon given the job file, a standalone run and `mtnlgctl plan` warn of
 * them. Returns how many lines it wrote. */
#define MT_JOB_UNUSED_MAX 8
/* Whether a setting of the job reads data.eod_token (the loss mask, the
 * document positions or the document attention mask). */
int mt_job_reads_eod(const mt_job *job);
int mt_job_unused(const mt_job *job, char lines[MT_JOB_UNUSED_MAX][256]);

/* The resolved job as compact JSON, every default filled in: what the
 * coordinator publishes; mt_job_parse() of it gives the same job and hash.
 * malloc'd (free() it), or NULL with mt_errmsg(). */
char *mt_job_to_json(const mt_job *job);

/* The preset directories every program searches, in order: extra (may be
 * NULL), the source tree's etc/models, the installed share/mtnlg/models. */
#define MT_PRESET_DIRS_MAX 4
void mt_job_preset_dirs(const char *extra, const char *dirs[MT_PRESET_DIRS_MAX]);

/* Tokens per step: global_batch * seq_len (under a ramp-up, once it is over). */
static inline int64_t mt_job_tokens_per_step(const mt_job *job) {
  return (int64_t)job->train.global_batch * job->model.seq_len;
}

/* The global batch of the step that starts with `consumed` samples read
 * (Megatron's RampupBatchsizeNumMicroBatches.update, in the same double
 * arithmetic): global_batch without a ramp-up. */
int mt_job_batch_at(const mt_job *job, int64_t consumed);
/* The samples that `steps` steps read from `consumed` on. */
int64_t mt_job_samples_of(const mt_job *job, int64_t consumed, int64_t steps);

/* Whether the job's data has a test split by its spec: data.test, or
 * datasets whose data.split gives the test split a weight (data.path alone
 * has none). A weight whose share of a small dataset holds no whole sample
 * leaves the split empty all the same, which only the engine sees when it
 * reads the data (mt_trainer_has_test). */
int mt_job_names_test_split(const mt_job *job);

/* What a run still does after its step `step` besides training (the
 * status's ETA): the global batches its validation and test passes read
 * (eval.iters after every eval.interval-th step, then at the end of the
 * run the valid pass and, with eval.test and a test split named
 * (mt_job_names_test_split), the test pass, as the engine runs them) and its
 * checkpoint saves (every checkpoint.interval-th step and the last, with
 * a checkpoint.dir). whole_saves are those made before training goes on:
 * every one, or under checkpoint.async the last and those on a step that
 * validates. Zero after the last step. */
typedef struct mt_job_left {
  int64_t steps, eval_batches, saves, whole_saves;
} mt_job_left;
mt_job_left mt_job_left_after(const mt_job *job, int64_t step);
/* The largest number that divides every global batch the job runs:
 * global_batch, or under a ramp-up gcd(start, increment). micro_batch * dp
 * must divide it. */
int mt_job_batch_quantum(const mt_job *job);

/* The data-parallel width the job runs at (parallel.dp, else dp_min). */
static inline int mt_job_dp(const mt_job *job) {
  return job->parallel.dp > 0 ? job->parallel.dp : job->parallel.dp_min;
}

#endif
