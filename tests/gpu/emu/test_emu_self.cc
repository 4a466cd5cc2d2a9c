/* test_emu_self.cc — the emulator's own behaviour that the kernel tests'
 * modes rest on (cuda_emu.h), so that none of them goes vacuous:
 * - cp.async, which the flash kernels' prefetching uses: where a copy
 *   lands, at once or, in the late mode, at the wait that completes it
 *   (not before, and not for a copy no commit has put in a group), and a
 *   thread ending with copies not waited for stopping the program with a
 *   message (test_cuda_emu_cp_async_late runs the kernels late);
 * - the order threads take turns in: warps in step by default, and with
 *   the warps order a warp running alone until it waits at a block barrier
 *   (test_cuda_emu_warps runs the kernels so);
 * - a device buffer ending at the guard page, so that a write one element
 *   past its end faults even where cudaMalloc's rounding would hide it;
 * - under AddressSanitizer (the build-asan tree), a kernel's thread reading
 *   past its dynamic shared memory, or past a local array (a thread's
 *   "registers", on its fiber's stack, after a barrier switched fibers), is
 *   stopped with AddressSanitizer's report: test_cuda_emu_asan's kernels
 *   are checked, not merely run. */
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cuda_emu.h"

enum { THREADS = 64, SLOTS = 3, PROBES = 6 };

static int failures, checks;

static void expect(int ok, const char *what) {
  checks++;
  if (!ok) {
    failures++;
    printf("FAIL %s\n", what);
  }
}

/* expect with the check's name made as printf makes it */
__attribute__((format(printf, 2, 3))) static void expectf(int ok, const char *fmt, ...) {
  char what[200];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(what, sizeof what, fmt, ap);
  va_end(ap);
  expect(ok, what);
}

/* Thread t copies src[4t..4t+3] into its slot of each of three 16-byte
 * buffers, and records what the slots hold along the way (probe k of
 * thread t at out[t·PROBES + k]). */
static void k_probe(float *out, const float *src) {
  float *smem = (float *)mt_emu::dyn_smem();
  unsigned t = threadIdx.x;
  float *slot[SLOTS];
  for (int s = 0; s < SLOTS; s++) slot[s] = smem + (s * THREADS + t) * 4;
  float *o = out + t * PROBES;
  mt_emu::cp_async(slot[0], src + 4 * t);
  mt_emu::cp_async_commit(); /* group 1 */
  o[0] = slot[0][0];         /* issued, not waited for */
  mt_emu::cp_async(slot[1], src + 4 * t);
  mt_emu::cp_async_commit(); /* group 2 */
  mt_emu::cp_async_wait(1);  /* group 1 */
  o[1] = slot[0][0], o[2] = slot[1][0];
  mt_emu::cp_async(slot[2], nullptr); /* zeros, in no group yet */
  mt_emu::cp_async_wait(0);           /* group 2, not the uncommitted copy */
  o[3] = slot[1][0], o[4] = slot[2][0];
  mt_emu::cp_async_commit(); /* group 3 */
  mt_emu::cp_async_wait(0);
  __syncthreads();
  o[5] = smem[(2 * THREADS + (t + 1) % THREADS) * 4]; /* the next thread's zeros */
}

/* Two warps, four warp barriers each (shuffles) after one block barrier:
 * after barrier k lane 0 of each warp records its progress k + 1 and every
 * lane notes the other warp's at that step (seen[t·4 + k]). */
static void k_progress(int *seen) {
  int *progress = (int *)mt_emu::dyn_smem();
  unsigned t = threadIdx.x, w = t / 32;
  if (t == 0) progress[0] = progress[1] = 0;
  __syncthreads();
  for (int k = 0; k < 4; k++) {
    (void)__shfl_xor_sync(0xffffffffu, k, 1);
    if (t % 32 == 0) progress[w] = k + 1;
    seen[t * 4 + k] = progress[1 - w];
  }
}

static void run_order(int reverse, int warps) {
  mt_emu_set_order(reverse, warps);
  int *seen = nullptr, got[64 * 4];
  if (cudaMalloc((void **)&seen, sizeof got)) {
    printf("FAIL cudaMalloc\n");
    exit(1);
  }
  mt_emu::launch("k_progress", k_progress, dim3(1), dim3(64), 0, 128)(seen);
  cudaMemcpyAsync(got, seen, sizeof got, cudaMemcpyDeviceToHost, 0);
  cudaStreamSynchronize(0);
  /* per warp: every view 0 (the other had not started), every view 4 (it
   * had ended), some view between (the two ran in turns) */
  int none[2] = {1, 1}, all[2] = {1, 1}, between[2] = {0, 0};
  for (int t = 0; t < 64; t++)
    for (int k = 0; k < 4; k++) {
      int v = got[t * 4 + k], w = t / 32;
      none[w] &= v == 0;
      all[w] &= v == 4;
      between[w] |= v > 0 && v < 4;
    }
  const char *order = reverse ? "reverse" : "index";
  if (warps)
    expectf((none[0] && all[1]) || (all[0] && none[1]),
            "warps order (%s): one warp runs to its end before the other starts", order);
  else
    expectf(between[0] && between[1], "%s order: the warps take turns, a warp barrier at a time",
            order);
  cudaFree(seen);
  mt_emu_set_order(0, 0);
}

static void k_unwaited(const float *src) {
  mt_emu::cp_async(mt_emu::dyn_smem() + 16 * threadIdx.x, src + 4 * threadIdx.x);
  mt_emu::cp_async_commit();
}

static void run_probe(int late) {
  mt_emu_set_cp_async_late(late);
  float host[THREADS * 4], got[THREADS * PROBES];
  for (int i = 0; i < THREADS * 4; i++) host[i] = (float)(i + 1);
  float *src = nullptr, *out = nullptr;
  if (cudaMalloc((void **)&src, sizeof host) || cudaMalloc((void **)&out, sizeof got) ||
      cudaMemcpyAsync(src, host, sizeof host, cudaMemcpyHostToDevice, 0)) {
    printf("FAIL cudaMalloc/cudaMemcpyAsync\n");
    exit(1);
  }
  mt_emu::launch("k_probe", k_probe, dim3(1), dim3(THREADS), 0, SLOTS * THREADS * 16)(out, src);
  cudaMemcpyAsync(got, out, sizeof got, cudaMemcpyDeviceToHost, 0);
  cudaStreamSynchronize(0);
  int before = 1, landed = 1, uncommitted = 1, shared = 1;
  for (int t = 0; t < THREADS; t++) {
    const float *o = got + t * PROBES, want = (float)(4 * t + 1);
    /* shared memory starts as NaN bytes: a copy that has not landed reads NaN */
    before &= late ? isnan(o[0]) && isnan(o[2]) : o[0] == want && o[2] == want;
    landed &= o[1] == want && o[3] == want;
    uncommitted &= late ? isnan(o[4]) : o[4] == 0.0f;
    shared &= o[5] == 0.0f;
  }
  const char *mode = late ? "late" : "at once";
  expectf(before, "%s: copies not yet waited for %s", mode,
          late ? "leave the old contents" : "have landed");
  expectf(landed, "%s: a wait lands every group but the newest n", mode);
  expectf(uncommitted, "%s: a copy in no group %s", mode,
          late ? "is not landed by a wait" : "has landed");
  expectf(shared, "%s: after the waits and a barrier, other threads see the copies", mode);
  cudaFree(src);
  cudaFree(out);
}

/* Runs fn in a child process; its exit status, and the start of what it
 * wrote to stderr in msg. */
static int in_child(void (*fn)(void), char *msg, size_t cap) {
  int fd[2];
  if (pipe(fd)) {
    perror("pipe");
    exit(1);
  }
  fflush(stdout);
  pid_t pid = fork();
  if (pid == 0) {
    dup2(fd[1], 2);
    close(fd[0]);
    fn();
    _exit(0);
  }
  close(fd[1]);
  size_t n = 0;
  ssize_t r;
  char rest[4096];
  while (n < cap - 1 && (r = read(fd[0], msg + n, cap - 1 - n)) > 0) n += (size_t)r;
  msg[n] = 0;
  while (read(fd[0], rest, sizeof rest) > 0) { /* the rest of a long report */
  }
  close(fd[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  return status;
}

static void launch_unwaited(void) {
  float *src = nullptr;
  if (cudaMalloc((void **)&src, THREADS * 16)) _exit(3);
  cudaMemsetAsync(src, 0, THREADS * 16, 0);
  mt_emu::launch("k_unwaited", k_unwaited, dim3(1), dim3(THREADS), 0, THREADS * 16)(src);
}

/* A block whose threads end with a copy not waited for: the child stops
 * with SIGABRT, its message naming the kernel. */
static void run_unwaited(void) {
  char msg[1024];
  int status = in_child(launch_unwaited, msg, sizeof msg);
  expect(WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT,
         "a thread ending with a copy not waited for stops the program");
  expect(strstr(msg, "k_unwaited") && strstr(msg, "not waited for"),
         "its message names the kernel and the copies not waited for");
  if (!strstr(msg, "not waited for")) printf("  child's stderr: %s\n", msg);
}

/* A buffer's end abuts the guard page: one thread writes element `at`. */
static void k_write_at(float *buf, int at) {
  if (threadIdx.x == 0) buf[at] = 1.0f;
}

enum { GUARDED_FLOATS = 1000 }; /* 4000 bytes: 96 of cudaMalloc's rounding after it */

static int g_at;

static void launch_write_at(void) {
  float *buf = nullptr;
  if (cudaMalloc((void **)&buf, GUARDED_FLOATS * sizeof(float))) _exit(3);
  mt_emu::launch("k_write_at", k_write_at, dim3(1), dim3(32), 0, 0)(buf, g_at);
  cudaStreamSynchronize(0);
}

/* The last element is written; one past it, in what cudaMalloc's rounding
 * to 256 bytes would leave unseen on a GPU, faults. Buffers start aligned
 * as cudaMalloc's when their size allows (a multiple of 256 bytes). */
static void run_guard(void) {
  char msg[4096];
  g_at = GUARDED_FLOATS - 1;
  int status = in_child(launch_write_at, msg, sizeof msg);
  expect(WIFEXITED(status) && WEXITSTATUS(status) == 0, "a write to a buffer's last element runs");
  g_at = GUARDED_FLOATS;
  status = in_child(launch_write_at, msg, sizeof msg);
  int faulted = (WIFSIGNALED(status) && WTERMSIG(status) == SIGSEGV) || strstr(msg, "SEGV");
  expect(faulted, "a write one element past a buffer's end (inside cudaMalloc's rounding) faults");
  if (!faulted) printf("  child's status %d, stderr: %.1500s\n", status, msg);
  float *a = nullptr, *b = nullptr;
  cudaMalloc((void **)&a, 1024 * sizeof(float));
  cudaMalloc((void **)&b, GUARDED_FLOATS * sizeof(float));
  expect((uintptr_t)a % 256 == 0, "a buffer of a multiple of 256 bytes is 256-byte aligned");
  expect((uintptr_t)b % 32 == 0, "any buffer is at least 32-byte aligned (wmma's pointers)");
  cudaFree(a);
  cudaFree(b);
}

#ifdef MT_ASAN
enum { SHARED_FLOATS = 2 * THREADS };

/* Thread t reads shared float t + past (after a barrier, so that every
 * thread has been switched out and in). */
static void k_shared_read(float *out, int past) {
  const float *smem = (const float *)mt_emu::dyn_smem();
  __syncthreads();
  out[threadIdx.x] = smem[threadIdx.x + past];
}

/* Thread t keeps 8 "registers" in a local array and reads number t % 8 +
 * past of them, after barriers, through a pointer (UBSan's bounds check,
 * which sees an array's index, would stop it first: ASan is checked). */
static void k_local_read(float *out, int past) {
  float r[8];
  for (int i = 0; i < 8; i++) r[i] = (float)(threadIdx.x * 8 + i);
  __syncthreads();
  (void)__shfl_xor_sync(0xffffffffu, 0, 1);
  volatile int k = (int)(threadIdx.x % 8) + past;
  const float *p = r;
  out[threadIdx.x] = p[k];
}

static int g_past; /* what the children's kernels read past their arrays */

static void launch_shared_read(void) {
  float *out = nullptr;
  if (cudaMalloc((void **)&out, THREADS * sizeof(float))) _exit(3);
  mt_emu::launch("k_shared_read", k_shared_read, dim3(1), dim3(THREADS), 0,
                 SHARED_FLOATS * sizeof(float))(out, g_past);
  cudaStreamSynchronize(0);
}

static void launch_local_read(void) {
  float *out = nullptr;
  if (cudaMalloc((void **)&out, THREADS * sizeof(float))) _exit(3);
  mt_emu::launch("k_local_read", k_local_read, dim3(1), dim3(THREADS), 0, 0)(out, g_past);
  cudaStreamSynchronize(0);
}

/* The same kernel in bounds passes, one element past the end is stopped
 * with the report naming the overflow. */
static void run_asan(const char *what, void (*launch)(void), int in_bounds, int past,
                     const char *kind) {
  char msg[4096];
  g_past = in_bounds;
  int status = in_child(launch, msg, sizeof msg);
  expectf(WIFEXITED(status) && WEXITSTATUS(status) == 0 && !strstr(msg, "AddressSanitizer"),
          "AddressSanitizer: %s in bounds runs clean", what);
  if (!(WIFEXITED(status) && WEXITSTATUS(status) == 0)) printf("  child's stderr: %.1500s\n", msg);
  g_past = past;
  status = in_child(launch, msg, sizeof msg);
  expectf(!(WIFEXITED(status) && WEXITSTATUS(status) == 0) && strstr(msg, kind),
          "AddressSanitizer: %s one element past the end is stopped (%s)", what, kind);
  if (!strstr(msg, kind)) printf("  child's stderr: %.1500s\n", msg);
}
#endif

int main(void) {
  run_probe(0);
  run_probe(1);
  mt_emu_set_cp_async_late(0);
  run_order(0, 0);
  run_order(1, 0);
  run_order(0, 1);
  run_order(1, 1);
  run_unwaited();
  run_guard();
#ifdef MT_ASAN
  /* the last thread's read: SHARED_FLOATS - THREADS + 63 in bounds, one more past */
  run_asan("a read of dynamic shared memory", launch_shared_read, SHARED_FLOATS - THREADS,
           SHARED_FLOATS - THREADS + 1, "heap-buffer-overflow");
  run_asan("a read of a thread's local array", launch_local_read, 0, 1, "stack-buffer-overflow");
#endif
  printf("test_emu_self: %d checks, %d failed\n", checks, failures);
  return failures != 0;
}
