/* steplog.c — step lines and the memory check before a job starts. */
#include "steplog.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "device.h"
#include "err.h"
#include "log.h"
#include "ops.h"
#include "plan.h"

/* A JSON number, or null for inf and NaN (an overflowed fp16 step), which
 * JSON cannot spell. buf holds 32 bytes. */
static const char *jnum(char *buf, double v) {
  if (!isfinite(v)) return "null";
  snprintf(buf, 32, "%.9g", v);
  return buf;
}

/* A timer's name as Megatron pads it for its rows: a space, then dots to 48 */
static const char *padded(char name[64], int id) {
  snprintf(name, 64, "%s ", mt_timer_name(id));
  size_t len = strlen(name);
  while (len < 48) name[len++] = '.';
  name[len] = 0;
  return name;
}

/* train.timing_log_level's timers, means per step over acc's steps: a JSON
 * member, or Megatron's lines (its timers.log format for the job's
 * train.timing_log_option, so its log parsers read them). A timer no rank
 * ran in those steps is left out; under all, so is a rank that did not run
 * it. */
static void print_timers(const mt_step_stats *st, const mt_steplog_acc *acc, int json) {
  if (st->timing_level < 1 || acc->steps < 1) return;
  int all = st->timing_option == MT_TIMING_ALL && acc->rank_steps > 0;
  const char *head = all                                  ? "times across ranks (ms):"
                     : st->timing_option == MT_TIMING_MAX ? "max time across ranks (ms):"
                                                          : "(min, max) time across ranks (ms):";
  int n = 0;
  char name[64];
  for (int i = 0; i < MT_TM_COUNT; i++) {
    if (!mt_timer_reported(i, st->timing_level, acc->timer_max[i])) continue;
    double lo = acc->timer_min[i] / acc->steps, hi = acc->timer_max[i] / acc->steps;
    if (json)
      printf("%s\"%s\":[%.3f,%.3f]", n ? "," : ",\"timers\":{", mt_timer_name(i), lo, hi);
    else if (all) {
      printf("%s\n  %s:", n ? "" : head, mt_timer_name(i));
      for (int r = 0; r < acc->rank_n; r++) {
        double ms = acc->rank_ms[(size_t)r * MT_TM_COUNT + i];
        if (ms > 0.0) printf("\n     rank %2d: %.2f", r, ms / acc->rank_steps);
      }
    } else if (st->timing_option == MT_TIMING_MAX)
      printf("%s\n    %s: %.2f", n ? "" : head, padded(name, i), hi);
    else
      printf("%s\n    %s: (%.2f, %.2f)", n ? "" : head, padded(name, i), lo, hi);
    n++;
  }
  if (n && json && all) {
    n = 0;
    for (int i = 0; i < MT_TM_COUNT; i++) {
      if (!mt_timer_reported(i, st->timing_level, acc->timer_max[i])) continue;
      printf("%s\"%s\":[", n++ ? "]," : "},\"timers_by_rank\":{", mt_timer_name(i));
      for (int r = 0; r < acc->rank_n; r++)
        printf("%s%.3f", r ? "," : "", acc->rank_ms[(size_t)r * MT_TM_COUNT + i] / acc->rank_steps);
    }
    printf("]");
  }
  if (n) printf(json ? "}" : "\n");
}

/* The line for st, with the means over acc's steps where they differ. */
static void print_step(const mt_step_stats *st, const mt_steplog_acc *acc, int64_t steps,
                       int json) {
  double loss = acc->counted ? acc->loss / acc->counted : st->loss;
  double ms = acc->ms / acc->steps;
  double tok_s = acc->ms > 0.0 ? 1e3 * acc->tokens / acc->ms : st->tokens_per_s;
  double tflops = acc->ms > 0.0 ? acc->flop_ms / acc->ms : st->tflops;
  double bubble = acc->ms > 0.0 ? acc->bubble_ms / acc->ms : st->bubble;
  if (json) {
    char lbuf[32], norm[32];
    printf("{\"step\":%lld,\"steps\":%lld,\"consumed_tokens\":%lld,\"loss\":%s,\"lr\":%.9g,"
           "\"grad_norm\":%s,\"step_ms\":%.3f,\"tokens_per_s\":%.3f,\"tflops\":%.6f,"
           "\"bubble\":%.4f,\"skipped\":%s,\"skipped_total\":%lld",
           (long long)st->step, (long long)steps, (long long)st->consumed_tokens, jnum(lbuf, loss),
           st->lr, jnum(norm, st->grad_norm), ms, tok_s, tflops, bubble,
           st->skipped ? "true" : "false", (long long)st->skipped_total);
    if (st->has_params_norm) printf(",\"params_norm\":%s", jnum(norm, st->params_norm));
    if (st->has_num_zeros) printf(",\"num_zeros\":%lld", (long long)st->num_zeros);
    if (acc->steps > 1)
      printf(",\"interval_steps\":%d,\"interval_skipped\":%d", acc->steps, acc->skipped);
    if (st->loss_scaling) printf(",\"loss_scale\":%.9g", st->loss_scale);
    if (st->rampup) printf(",\"global_batch\":%d", st->global_batch);
    if (st->has_val) printf(",\"val_loss\":%s", jnum(lbuf, st->val_loss));
    if (st->has_final_val) printf(",\"final_val_loss\":%s", jnum(lbuf, st->final_val_loss));
    if (st->has_test) printf(",\"test_loss\":%s", jnum(lbuf, st->test_loss));
    print_timers(st, acc, 1);
    printf("}\n");
  } else {
    printf("step %6lld/%lld | tokens %lld | loss %.6f | lr %.3e | grad norm %.3f | ",
           (long long)st->step, (long long)steps, (long long)st->consumed_tokens, loss, st->lr,
           st->grad_norm);
    if (st->has_num_zeros) printf("num zeros %lld | ", (long long)st->num_zeros);
    if (st->has_params_norm) printf("params norm %.3f | ", st->params_norm);
    printf("%8.1f ms | %9.1f tok/s | %.3f TFLOP/s/device | bubble %.1f%%", ms, tok_s, tflops,
           100.0 * bubble);
    if (st->loss_scaling) printf(" | loss scale %g", st->loss_scale);
    if (st->rampup) printf(" | batch %d", st->global_batch);
    if (acc->skipped && acc->steps > 1)
      printf(" | skipped %d of %d (%lld in all)", acc->skipped, acc->steps,
             (long long)st->skipped_total);
    else if (acc->skipped)
      printf(" | skipped (%lld in all)", (long long)st->skipped_total);
    printf("\n");
    print_timers(st, acc, 0);
    if (st->has_val)
      printf("step %6lld/%lld | validation loss %.6f | perplexity %.3f\n", (long long)st->step,
             (long long)steps, st->val_loss, exp(st->val_loss));
    char line[256]; /* Megatron's words, so its log parsers find them */
    if (st->has_final_val) {
      mt_end_of_training_line(line, sizeof line, "val", st->final_val_loss);
      printf("%s\n", line);
    }
    if (st->has_test) {
      mt_end_of_training_line(line, sizeof line, "test", st->test_loss);
      printf("%s\n", line);
    }
  }
  fflush(stdout);
}

/* Zeroes acc's sums, keeping its buffer for every rank's */
static void restart(mt_steplog_acc *acc) {
  double *ms = acc->rank_ms;
  int cap = acc->rank_cap;
  memset(acc, 0, sizeof *acc);
  acc->rank_ms = ms, acc->rank_cap = cap;
}

/* train.timing_log_option all: st's every rank's timers into acc's sums.
 * Another world size (a resize) starts them over; out of memory, the line
 * shows min and max alone. */
static void add_ranks(mt_steplog_acc *acc, const mt_step_stats *st) {
  int n = st->timer_ranks ? st->timer_ranks_n : 0;
  if (n < 1) return;
  if (n != acc->rank_n) {
    if (n > acc->rank_cap) {
      double *ms = realloc(acc->rank_ms, (size_t)n * MT_TM_COUNT * sizeof *ms);
      if (!ms) {
        acc->rank_n = acc->rank_steps = 0;
        return;
      }
      acc->rank_ms = ms, acc->rank_cap = n;
    }
    memset(acc->rank_ms, 0, (size_t)n * MT_TM_COUNT * sizeof *acc->rank_ms);
    acc->rank_n = n, acc->rank_steps = 0;
  }
  for (size_t k = 0; k < (size_t)n * MT_TM_COUNT; k++) acc->rank_ms[k] += st->timer_ranks[k];
  acc->rank_steps++;
}

void mt_steplog_acc_free(mt_steplog_acc *acc) {
  free(acc->rank_ms);
  memset(acc, 0, sizeof *acc);
}

void mt_steplog(mt_steplog_acc *acc, const mt_step_stats *st, int64_t steps, int log_every,
                int json) {
  if (log_every < 1) log_every = 1;
  /* a step that does not follow the last (a re-formed generation trains
   * again from its checkpoint) starts the sums over */
  if (acc->steps && st->step != acc->last_step + 1) restart(acc);
  acc->last_step = st->step;
  acc->steps++;
  /* a loss that is not finite on a step that was not skipped stays in the
   * mean, as in Megatron's: a diverging run shows on its line */
  if (st->skipped)
    acc->skipped++;
  else
    acc->counted++, acc->loss += st->loss;
  acc->ms += st->step_ms;
  acc->tokens += st->tokens_per_s * st->step_ms / 1e3;
  acc->flop_ms += st->tflops * st->step_ms;
  acc->bubble_ms += st->bubble * st->step_ms;
  for (int i = 0; i < MT_TM_COUNT && st->timing_level > 0; i++)
    acc->timer_min[i] += st->timer_min[i], acc->timer_max[i] += st->timer_max[i];
  add_ranks(acc, st);
  if (st->step % log_every == 0 || st->step == steps || st->step == 1 || st->has_val || st->stop) {
    print_step(st, acc, steps, json);
    restart(acc);
    acc->last_step = st->step;
  }
  if (!isfinite(st->loss)) mt_log_warn("step %lld: loss is %g", (long long)st->step, st->loss);
}

const char *mt_eval_pass_name(char *buf, size_t cap, const mt_eval_progress *p) {
  int test = p->split == MT_SPLIT_TEST;
  snprintf(buf, cap, "%s%s after step %lld", test ? "the test pass" : "validation",
           p->end_of_training && !test ? " at the end of training" : "", (long long)p->step);
  return buf;
}

void mt_evallog_progress(mt_evallog *e, const mt_eval_progress *p, int64_t now_ms,
                         int64_t every_ms) {
  char name[96];
  if (!p->done) { /* a pass starts */
    e->started_ms = now_ms, e->next_ms = now_ms + every_ms, e->logged = 0;
    return;
  }
  double secs = (now_ms - e->started_ms) / 1e3;
  if (p->done >= p->total) {
    if (e->logged)
      mt_log_info("%s: %d batches in %.1f s (%.3f s a batch)",
                  mt_eval_pass_name(name, sizeof name, p), p->total, secs, secs / p->total);
    e->logged = 0;
    return;
  }
  if (now_ms < e->next_ms) return;
  /* the next line a whole period on (every report when every_ms <= 0) */
  e->next_ms =
      every_ms > 0 ? e->next_ms + ((now_ms - e->next_ms) / every_ms + 1) * every_ms : now_ms;
  e->logged = 1;
  mt_log_info("%s: batch %d of %d, %.1f s so far, about %.1f s left",
              mt_eval_pass_name(name, sizeof name, p), p->done, p->total, secs,
              secs / p->done * (p->total - p->done));
}

int64_t mt_proc_memory(int64_t *peak) {
  FILE *f = fopen("/proc/self/status", "r");
  char line[256];
  long long rss = 0, hwm = 0;
  while (f && fgets(line, sizeof line, f)) {
    if (!strncmp(line, "VmRSS:", 6)) rss = strtoll(line + 6, NULL, 10);
    if (!strncmp(line, "VmHWM:", 6)) hwm = strtoll(line + 6, NULL, 10);
  }
  if (f) fclose(f);
  if (peak) *peak = (int64_t)hwm * 1024;
  return (int64_t)rss * 1024;
}

/* Bytes with the unit that shows them: GB on a GPU, kB on a tiny model's
 * CPU device, where "0.00 GB" would say nothing. Decimal units, as the
 * plan line's GB. */
static const char *bytes_text(char *buf, size_t n, double bytes) {
  if (bytes >= 1e9)
    snprintf(buf, n, "%.2f GB", bytes / 1e9);
  else if (bytes >= 1e6)
    snprintf(buf, n, "%.1f MB", bytes / 1e6);
  else
    snprintf(buf, n, "%.1f kB", bytes / 1e3);
  return buf;
}

void mt_log_memory(const char *const *specs, int n, const mt_step_stats *st) {
  char gpus[1024] = "";
  size_t len = 0;
  for (int i = 0; i < n && len < sizeof gpus - 80; i++) {
    size_t total = 0, avail = 0;
    if (strncmp(specs[i], "cuda:", 5) || mt_device_memory(specs[i], &total, &avail)) continue;
    len += (size_t)snprintf(gpus + len, sizeof gpus - len, "%s%s %.2f of %.2f GB", len ? ", " : "",
                            specs[i], (double)(total - avail) / 1e9, (double)total / 1e9);
  }
  int64_t peak, now = mt_proc_memory(&peak);
  char mine[192] = "", a[32], b[32];
  if (st->has_memory)
    snprintf(mine, sizeof mine,
             "; its first rank's device holds %s of the engine's allocations (%s at most, %lld "
             "of them)",
             bytes_text(a, sizeof a, (double)st->memory.allocated),
             bytes_text(b, sizeof b, (double)st->memory.max_allocated),
             (long long)st->memory.count);
  char c[32], d[32];
  mt_log_info("memory after step %lld: %s%sthis process holds %s of RAM (%s at most)%s",
              (long long)st->step, gpus, len ? " in use (every process's on them); " : "",
              bytes_text(c, sizeof c, (double)now), bytes_text(d, sizeof d, (double)peak), mine);
}

/* The plan counts Megatron's storage of the weights (a 16-bit copy, the
 * fp32 master in the ZeRO slice); this engine keeps weights, gradients and
 * Adam in fp32 and, in a bf16 or fp16 job, a 16-bit working copy of the
 * weights beside the master (2 bytes per parameter: the matrices are nearly
 * all of them, the few vectors' fp32 copies are not counted), and the
 * activations its blocks keep in the job's precision. So the check plans
 * each stage as an fp32 job, adds the working copy and the scratch its
 * GEMMs convert through (ops.h linear_scratch: the CPU unpacks a GEMM's
 * whole weight matrix and input to fp32; a GPU converts blocks of rows
 * within 128 MiB), and takes the activations from the job's own plan. */
int mt_check_memory_plan(const mt_job *job, int ranks_here, const char *device) {
  size_t total = 0, avail = 0;
  int gpu = device && !strncmp(device, "cuda", 4);
  int hs = job->model.n_head > 0 ? job->model.n_embd / job->model.n_head : 0;
  if (gpu && strcmp(job->train.precision, "fp32") && hs > MT_FLASH_MAX_HS)
    mt_log_info("model: head size %d (n_embd %d / n_head %d) is over %d, the most the GPUs' "
                "flash attention takes: this %s job's attention runs as chunked 16-bit GEMMs",
                hs, job->model.n_embd, job->model.n_head, MT_FLASH_MAX_HS, job->train.precision);
  int rc = mt_device_memory(gpu ? device : "cpu:0", &total, &avail);
  if (rc) return rc;
  /* CPU devices of this process share its RAM; a GPU has its own */
  double per = gpu ? (double)total : (double)total / (ranks_here > 0 ? ranks_here : 1);
  int mixed = strcmp(job->train.precision, "fp32") != 0;
  mt_job *stored = malloc(sizeof *stored);
  if (!stored) return mt_seterr(MT_ENOMEM, "memory check: out of memory");
  *stored = *job;
  snprintf(stored->train.precision, sizeof stored->train.precision, "fp32");
  mt_plan_device pd = {.memory_bytes = per, .tflops = 1.0};
  mt_plan plan, own;
  rc = mt_plan_compute(stored, &pd, &plan);
  int own_rc = mixed ? mt_plan_compute(job, &pd, &own) : 0;
  if (!plan.computed || (mixed && !own.computed) || (!mixed && rc)) {
    free(stored); /* a layout that cannot run, or an fp32 job: the plan's own word */
    return rc ? rc : own_rc;
  }
  /* the worst stage as stored: fp32 but for the kept activations */
  mt_plan_stage w = plan.worst;
  double need = 0.0, copy = 0.0, cvt = 0.0;
  double hid = job->model.n_embd, t = plan.tp;
  for (int s = 0; s < plan.pp; s++) {
    mt_plan_stage f, h;
    mt_plan_stage_of(stored, &plan, s, &f);
    if (mixed) {
      mt_plan_stage_of(job, &own, s, &h);
      f.total_bytes += h.activation_bytes - f.activation_bytes;
      f.activation_bytes = h.activation_bytes;
    }
    double c = mixed ? 2.0 * (double)f.params : 0.0; /* the 16-bit working copy */
    /* the CPU's: a GEMM's weights and input unpacked, the LM head's or the
     * MLP projection's (4h/t wide input) */
    double rows = (double)job->model.seq_len * plan.micro_batch, largest = 0.0;
    if (f.has_head) largest = (double)plan.padded_vocab * hid / t + rows * hid;
    if (f.n_layers && 4.0 * hid * hid / t + rows * 4.0 * hid / t > largest)
      largest = 4.0 * hid * hid / t + rows * 4.0 * hid / t;
    double v = !mixed ? 0.0 : gpu ? (double)(128 << 20) : 4.0 * largest;
    if (s == 0 || (double)f.total_bytes + c + v > need)
      w = f, copy = c, cvt = v, need = (double)f.total_bytes + c + v;
  }
  free(stored);
  const char *where = gpu ? "GPU memory" : "RAM";
  char as[48] = "every tensor fp32";
  if (mixed) snprintf(as, sizeof as, "fp32 with %s activations", job->train.precision);
  if (need > plan.usable_bytes)
    return mt_seterr(
        MT_EINVAL,
        "plan: stage %d needs %.1f GB per device as this engine stores a %s job (%s: "
        "fp32 weights %.1f and their 16-bit working copy %.1f, GEMM conversion scratch %.1f, "
        "grads %.1f, optimizer %.1f, "
        "activations %.1f, logits %.1f, comm %.1f) but the devices have %.1f GB of "
        "%s, %.1f GB usable; try parallel.recompute=true, a larger tp or pp, or a "
        "smaller micro_batch",
        w.stage, need / 1e9, job->train.precision, as, (double)w.weight_bytes / 1e9, copy / 1e9,
        cvt / 1e9, (double)w.grad_bytes / 1e9, (double)w.optimizer_bytes / 1e9,
        (double)w.activation_bytes / 1e9, (double)w.logits_bytes / 1e9, (double)w.comm_bytes / 1e9,
        per / 1e9, where, plan.usable_bytes / 1e9);
  mt_log_info("plan: %.2f GB per device at most as stored here, %s (stage %d: weights %.2f%s, "
              "grads %.2f, optimizer %.2f, activations %.2f, logits %.2f, comm %.2f GB) of %.1f "
              "GB %s per device",
              need / 1e9, as, w.stage, (double)(w.weight_bytes + copy + cvt) / 1e9,
              mixed ? " with the working copy" : "", (double)w.grad_bytes / 1e9,
              (double)w.optimizer_bytes / 1e9, (double)w.activation_bytes / 1e9,
              (double)w.logits_bytes / 1e9, (double)w.comm_bytes / 1e9, per / 1e9, where);
  return 0;
}
