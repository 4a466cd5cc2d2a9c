/* plan.h — what a job costs per device before it runs: memory and FLOPs.
 *
 * From the job's model, layout (tp, pp, dp, micro-batch, recompute) and
 * precision, and from what a device offers (memory, achieved TFLOP/s), the
 * plan gives per pipeline stage the parameters one device holds and the bytes
 * of its weights, gradients, ZeRO-1 optimizer slice, activations at the 1F1B
 * peak, LM-head logits and communication buffers; the model FLOPs per step
 * (Narayanan et al. 2021, eq. 3), the pipeline bubble and a predicted step
 * time. It is arithmetic only: it never allocates device memory, never opens
 * a file and never exits. `mtnlgctl plan` prints it; the engine allocates from
 * it; a job whose worst stage does not fit is refused with the numbers.
 *
 * The model it counts is Megatron-LM's GPT with tensor slicing, no sequence
 * parallelism (each choice is documented in plan.c beside its number):
 * - tp: QKV and MLP-in are column-parallel (weight and bias split), attention
 *   out and MLP-out row-parallel (weight split, bias replicated); LayerNorms
 *   and position embeddings are replicated; the word embedding is
 *   vocab-parallel over the padded vocabulary Vp = roundup(V, 128 tp).
 * - pp: stage 0 holds the embeddings, the last stage the final LayerNorm and
 *   the LM head, tied to the word embedding: a second copy of it when pp > 1
 *   (untied, model.untie_embeddings: a weight of its own, lm_head, at any pp).
 *   L layers over p stages: the first L mod p stages hold one layer more.
 * - dp: ZeRO stage 1: fp32 master weights (mixed precision) and Adam m, v are
 *   sharded over dp; model weights and gradients are not.
 */
#ifndef MT_PLAN_H
#define MT_PLAN_H

#include <stdint.h>

#include "job.h"

/* Defaults of mt_plan_device fields left 0. */
#define MT_PLAN_USABLE_FRACTION 0.9        /* of device memory: CUDA context, allocator, NCCL */
#define MT_PLAN_DP_BUCKET_ELEMS 25000000LL /* elements of one dp bucket in flight */

/* What one device offers. */
typedef struct mt_plan_device {
  double memory_bytes;    /* per device; must be > 0 */
  double tflops;          /* dense TFLOP/s per device; with efficiency 1 the achieved rate */
  int devices;            /* in all; 0 = tp * pp * mt_job_dp(job) */
  double efficiency;      /* fraction of tflops reached; 0 = 1.0 */
  double usable_fraction; /* of memory_bytes the plan may fill; 0 = MT_PLAN_USABLE_FRACTION */
} mt_plan_device;

/* One device of one pipeline stage (every tp and dp rank of a stage is alike
 * up to one optimizer element of ZeRO rounding). Bytes are exact integers. */
typedef struct mt_plan_stage {
  int stage;
  int first_layer, n_layers; /* with virtual stages: its first chunk's first layer, and
                                the layers of all its chunks */
  int has_embedding;         /* word (its vocab shard) and position embeddings */
  int has_head;              /* final LayerNorm, LM head (tied: a copy when pp > 1;
                                untied: lm_head), logits */
  int64_t params;            /* held by one device: its tp shard of the stage */
  int64_t optimizer_params;  /* its ZeRO-1 slice: ceil(params / dp) */
  int inflight;              /* micro-batches whose activations it holds at the 1F1B peak
                                (with virtual stages: its first chunk's, the most) */
  int recomputed_layers;     /* of its layers, those that recompute in the backward pass */
  int64_t weight_bytes, grad_bytes, optimizer_bytes;
  int64_t activation_bytes, logits_bytes, comm_bytes;
  int64_t total_bytes;
} mt_plan_stage;

typedef struct mt_plan {
  int computed; /* every number below is filled in (also for a plan that does not fit) */
  int fits;     /* the worst stage fits usable_bytes */
  int tp, pp, dp, devices;
  int virtual_stages; /* v: chunks a stage holds (parallel.virtual_stages), 1: plain 1F1B */
  int micro_batch;    /* b: sequences per micro-batch */
  int micro_batches;  /* m: per dp rank per step = global_batch / (b dp) */
  int recompute;
  int recompute_layers;  /* with recompute: the first this many of each stage; 0: all */
  double recomputed;     /* the share of the layers that recompute, 0 to 1 */
  int sequence_parallel; /* on and tp > 1: the stream's rows split over tp */
  int mixed;             /* bf16 or fp16: 16-bit model copy and activations */
  int padded_vocab;      /* Vp */
  int64_t model_params;  /* of the whole model, Vp rows of wte, tied embedding once
                            (untied: and Vp rows of lm_head) */
  mt_plan_device dev;    /* as given, defaults filled in */
  double usable_bytes;   /* dev.memory_bytes * dev.usable_fraction */

  mt_plan_stage first, last, worst; /* worst: the largest total (the first such) */

  int64_t tokens_per_step;
  double model_flops;             /* per step, eq. 3 without recomputation: what MFU counts */
  double executed_flops;          /* per step as run: eq. 3 with 96 when recompute is on */
  double bubble_fraction;         /* (p - 1) / (v m + p - 1) of the (interleaved) 1F1B schedule */
  double step_s;                  /* executed_flops / (devices * tflops * efficiency) */
  double step_with_bubble_s;      /* step_s / (1 - bubble): tflops as the rate outside the bubble */
  double tokens_per_s;            /* tokens_per_step / step_s */
  double model_tflops_per_device; /* model_flops / step_s / devices */
} mt_plan;

/* Computes the plan of job on dev. Returns 0 when it fits; MT_EINVAL with
 * "plan: ..." when the layout cannot be planned (devices not a multiple of
 * tp * pp, global batch not divisible by micro_batch * dp, ...; out->computed
 * stays 0) or when the worst stage does not fit (out->computed is 1 and the
 * message gives the numbers in GB = 10^9 bytes). */
int mt_plan_compute(const mt_job *job, const mt_plan_device *dev, mt_plan *out);

/* Stage s (0 <= s < plan->pp) of a computed plan. */
int mt_plan_stage_of(const mt_job *job, const mt_plan *plan, int s, mt_plan_stage *out);

/* Narayanan et al. eq. 3 for a step of `batch` sequences, with Vp as the
 * vocabulary (the GEMM that runs): 96 B s l h² (1 + s/6h + Vp/16lh) with
 * recomputation, 72 B s l h² (1 + s/6h + Vp/12lh) without (the LM head's
 * 6 B s h Vp is never recomputed); `recomputed` is the share of the layers
 * that recompute (0 to 1: their forward runs twice). */
double mt_plan_flops(const mt_model_spec *m, int padded_vocab, int64_t batch, double recomputed);

#endif
