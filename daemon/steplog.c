/* steplog.c — step lines and the memory check before a job starts. */
#include "steplog.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "device.h"
#include "err.h"
#include "log.h"
#include "plan.h"

/* A JSON number, or null for inf and NaN (an overflowed fp16 step), which
 * JSON cannot spell. buf holds 32 bytes. */
static const char *jnum(char *buf, double v) {
  if (!isfinite(v)) return "null";
  snprintf(buf, 32, "%.9g", v);
  return buf;
}

static void print_step(const mt_step_stats *st, int64_t steps, int json) {
  if (json) {
    char loss[32], norm[32];
    printf("{\"step\":%lld,\"steps\":%lld,\"consumed_tokens\":%lld,\"loss\":%s,\"lr\":%.9g,"
           "\"grad_norm\":%s,\"step_ms\":%.3f,\"tokens_per_s\":%.3f,\"tflops\":%.6f,"
           "\"bubble\":%.4f,\"skipped\":%s",
           (long long)st->step, (long long)steps, (long long)st->consumed_tokens,
           jnum(loss, st->loss), st->lr, jnum(norm, st->grad_norm), st->step_ms, st->tokens_per_s,
           st->tflops, st->bubble, st->skipped ? "true" : "false");
    if (st->loss_scaling) printf(",\"loss_scale\":%.9g", st->loss_scale);
    if (st->has_val) printf(",\"val_loss\":%.9g", st->val_loss);
    printf("}\n");
  } else {
    printf("step %6lld/%lld | tokens %lld | loss %.6f | lr %.3e | grad norm %.3f | %8.1f ms | "
           "%9.1f tok/s | %.3f TFLOP/s/device | bubble %.1f%%",
           (long long)st->step, (long long)steps, (long long)st->consumed_tokens, st->loss, st->lr,
           st->grad_norm, st->step_ms, st->tokens_per_s, st->tflops, 100.0 * st->bubble);
    if (st->loss_scaling) printf(" | loss scale %g", st->loss_scale);
    printf("%s\n", st->skipped ? " | skipped" : "");
    if (st->has_val)
      printf("step %6lld/%lld | validation loss %.6f | perplexity %.3f\n", (long long)st->step,
             (long long)steps, st->val_loss, exp(st->val_loss));
  }
  fflush(stdout);
}

void mt_steplog(const mt_step_stats *st, int64_t steps, int log_every, int json) {
  if (log_every < 1) log_every = 1;
  if (st->step % log_every == 0 || st->step == steps || st->step == 1 || st->has_val || st->stop)
    print_step(st, steps, json);
  if (!isfinite(st->loss)) mt_log_warn("step %lld: loss is %g", (long long)st->step, st->loss);
}

int mt_check_memory_plan(const mt_job *job, int ranks_here, const char *device) {
  size_t total = 0, avail = 0;
  int gpu = device && !strncmp(device, "cuda", 4);
  int rc = mt_device_memory(gpu ? device : "cpu:0", &total, &avail);
  if (rc) return rc;
  /* CPU devices of this process share its RAM; a GPU has its own */
  double per = gpu ? (double)total : (double)total / (ranks_here > 0 ? ranks_here : 1);
  mt_plan_device pd = {.memory_bytes = per, .tflops = 1.0};
  mt_plan plan;
  rc = mt_plan_compute(job, &pd, &plan);
  if (rc) return rc;
  mt_log_info("plan: %.2f GB per device at most (stage %d: weights %.2f, grads %.2f, "
              "optimizer %.2f, activations %.2f GB) of %.1f GB %s per device",
              (double)plan.worst.total_bytes / 1e9, plan.worst.stage,
              (double)plan.worst.weight_bytes / 1e9, (double)plan.worst.grad_bytes / 1e9,
              (double)plan.worst.optimizer_bytes / 1e9, (double)plan.worst.activation_bytes / 1e9,
              pd.memory_bytes / 1e9, gpu ? "GPU memory" : "RAM");
  return 0;
}
