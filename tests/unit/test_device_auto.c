/* test_device_auto.c — device discovery (kernels/device.c) as a machine
 * without a GPU sees it, which is every CI machine:
 * - mt_device_count("cuda") is 0, not an error (no driver is 0 devices);
 * - mt_device_open("cuda:0") fails with a message a person can act on,
 *   naming CUDA and why (the runtime's error, or a build without CUDA);
 * - devices "auto" resolves to cpu:W;
 * - CUDA_MODULE_LOADING is made EAGER for ranks that run collectives, unless set;
 * - mt_device_mem_stats follows allocations and frees: bytes as asked, the
 *   most at once, the count, and on a CPU device reserved equal to allocated
 *   (on a GPU, when one is here, reserved at least allocated).
 * On a machine with a GPU the same calls must find it instead: count > 0,
 * cuda:0 opens, auto resolves to cuda:0-K.
 */
#include <cpuid.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "blas.h"
#include "device.h"
#include "err.h"
#include "mt_check.h"
#include "mt_config.h"
#if MT_HAVE_CUDA
#include "cuda/cuda_backend.h"
#endif

/* 1 when this process has a library whose path contains name mapped. */
static int mapped(const char *name) {
  FILE *f = fopen("/proc/self/maps", "r");
  char line[4096];
  int found = 0;
  while (f && !found && fgets(line, sizeof line, f)) found = strstr(line, name) != NULL;
  if (f) fclose(f);
  return found;
}

/* A CUDA build links the runtime only: cuBLAS and cuBLASLt (0.3 s of every
 * start) load when the first GPU opens, so a program on CPUs never loads
 * them; and they load here, with every function the backend calls (the
 * table that mt__cuda_open fills first). */
static void test_cublas_loads_on_demand(void) {
#if MT_HAVE_CUDA
  CHECK(!mapped("libcublas"), "cuBLAS loaded before any device opened");
  CHECK(mt__cuda_blas_load() == 0, "loading cuBLAS: %s", mt_errmsg());
  CHECK(mapped("libcublasLt.so") && mapped("libcublas.so"), "cuBLAS not loaded after the load");
  CHECK(mt__cuda_blas_load() == 0, "a second load: %s", mt_errmsg());
#else
  CHECK(!mapped("libcublas"), "a build without CUDA has cuBLAS");
#endif
}

static void test_unknown_kind_and_cpu_count(void) {
  CHECK(mt_device_count("cpu") == 1, "cpu count %d", mt_device_count("cpu"));
  /* a size that wraps when rounded up to 64 bytes is refused, not a tiny buffer */
  mt_device cpu;
  if (!mt_device_open(&cpu, "cpu:0")) {
    void *p = mt_device_alloc(&cpu, SIZE_MAX - 10);
    CHECK(!p && strstr(mt_errmsg(), "cannot allocate"), "SIZE_MAX - 10 bytes: %p", p);
    free(p);
    mt_device_close(&cpu);
  }
  int rc = mt_device_count("tpu");
  CHECK(rc == MT_EINVAL && strstr(mt_errmsg(), "tpu"), "tpu: %d \"%s\"", rc, mt_errmsg());
  char out[4];
  rc = mt_device_resolve_auto(out, sizeof out, 2);
  CHECK(rc == MT_EINVAL, "a 4-byte buffer: rc %d", rc);
}

static void test_without_gpu_cuda_is_refused_and_auto_is_cpu(void) {
  CHECK(mt_cuda_device_count() == 0, "mt_cuda_device_count %d", mt_cuda_device_count());
  mt_device d;
  int rc = mt_device_open(&d, "cuda:0");
  CHECK(rc == MT_ENOTSUP, "open cuda:0: rc %d", rc);
  CHECK(strstr(mt_errmsg(), "CUDA") && strstr(mt_errmsg(), "cuda:0"), "message \"%s\"",
        mt_errmsg());
  printf("open cuda:0: %s\n", mt_errmsg());
  char out[32];
  rc = mt_device_resolve_auto(out, sizeof out, 0);
  CHECK(rc == 1 && !strcmp(out, "cpu:1"), "auto, want 0: %d \"%s\"", rc, out);
  rc = mt_device_resolve_auto(out, sizeof out, 4);
  CHECK(rc == 4 && !strcmp(out, "cpu:4"), "auto, want 4: %d \"%s\"", rc, out);
}

static void test_with_gpu_cuda_opens_and_auto_is_cuda(int n) {
  mt_device d;
  int rc = mt_device_open(&d, "cuda:0");
  CHECK(rc == 0 && d.kind == MT_DEVICE_CUDA && d.stream, "open cuda:0: %d %s", rc, mt_errmsg());
  if (!rc) mt_device_close(&d);
  char spec[32], out[32];
  snprintf(spec, sizeof spec, "cuda:%d", n);
  CHECK(mt_device_open(&d, spec) == MT_ENOTSUP, "%s opened with %d devices", spec, n);
  rc = mt_device_resolve_auto(out, sizeof out, 0);
  CHECK(rc == n && !strncmp(out, "cuda:0", 6), "auto: %d \"%s\"", rc, out);
  rc = mt_device_resolve_auto(out, sizeof out, 1);
  CHECK(rc == 1 && !strcmp(out, "cuda:0"), "auto, want 1: %d \"%s\"", rc, out);
}

/* The ledger behind train.log_memory_to_tensorboard, on spec's device */
static void test_memory_stats_follow_allocations(const char *spec) {
  mt_device d;
  if (mt_device_open(&d, spec)) {
    CHECK(0, "open %s: %s", spec, mt_errmsg());
    return;
  }
  mt_device_mem m0, m;
  CHECK(!mt_device_mem_stats(&d, &m0), "%s: stats: %s", spec, mt_errmsg());
  CHECK(m0.allocated == 0 && m0.count == 0 && m0.max_allocated == 0,
        "%s: a new device holds %zu bytes in %lld", spec, m0.allocated, (long long)m0.count);
  enum { N = 100 }; /* past the ledger's first 64 entries */
  void *p[N];
  size_t want = 0;
  for (int i = 0; i < N; i++) {
    p[i] = mt_device_alloc(&d, (size_t)1000 + i);
    want += p[i] ? (size_t)1000 + i : 0;
  }
  mt_device_mem_stats(&d, &m);
  CHECK(m.allocated == want && m.count == N && m.max_allocated == want,
        "%s: %d allocations: %zu bytes (want %zu) in %lld, most %zu", spec, N, m.allocated, want,
        (long long)m.count, m.max_allocated);
  size_t peak = want;
  for (int i = 0; i < N; i += 2) { /* every other one, out of order of their making */
    mt_device_free(&d, p[i]);
    want -= (size_t)1000 + i;
  }
  mt_device_free(&d, NULL); /* nothing, and not counted */
  mt_device_mem_stats(&d, &m);
  CHECK(m.allocated == want && m.count == N / 2 && m.max_allocated == peak,
        "%s: half freed: %zu bytes (want %zu) in %lld, most %zu (want %zu)", spec, m.allocated,
        want, (long long)m.count, m.max_allocated, peak);
  if (d.kind == MT_DEVICE_CPU)
    CHECK(m.reserved == m.allocated, "%s: reserved %zu, allocated %zu", spec, m.reserved,
          m.allocated);
  else
    CHECK(m.reserved >= m.allocated, "%s: reserved %zu under allocated %zu", spec, m.reserved,
          m.allocated);
  for (int i = 1; i < N; i += 2) mt_device_free(&d, p[i]);
  mt_device_mem_stats(&d, &m);
  CHECK(m.allocated == 0 && m.count == 0 && m.max_allocated == peak,
        "%s: all freed: %zu bytes in %lld, most %zu", spec, m.allocated, (long long)m.count,
        m.max_allocated);
  mt_device_close(&d);
}

/* The OpenBLAS kernel this process loaded, and why, run again as a child
 * with OPENBLAS_CORETYPE as given (NULL: unset), into out. */
static int blas_choice_with(const char *self, const char *coretype, char *out, size_t cap) {
  int p[2];
  if (pipe(p)) return -1;
  pid_t pid = fork();
  if (pid == 0) {
    dup2(p[1], 1);
    if (coretype)
      setenv("OPENBLAS_CORETYPE", coretype, 1);
    else
      unsetenv("OPENBLAS_CORETYPE");
    execl(self, self, "--blas", (char *)NULL);
    _exit(127);
  }
  close(p[1]);
  size_t got = 0;
  ssize_t r;
  while (got < cap - 1 && (r = read(p[0], out + got, cap - 1 - got)) > 0) got += (size_t)r;
  out[got] = 0;
  close(p[0]);
  int status;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : -1;
}

/* OpenBLAS 0.3.21 takes an AVX-512 Xeon for Prescott (5-6x slower): unset,
 * or set but empty, mtnlg picks the kernel for the CPU; a kernel the user
 * names is kept; a name OpenBLAS does not have is said so, and on a CPU it
 * would misjudge, replaced by the pick. */
static void test_blas_kernel_choice(const char *self) {
  unsigned a, b, c, d;
  int avx512 = __get_cpuid_count(7, 0, &a, &b, &c, &d) && (b & (1u << 16));
  int avx2 = __get_cpuid_count(7, 0, &a, &b, &c, &d) && (b & (1u << 5));
  char out[512];
  static const char *legacy[] = {"Prescott", "Core2",   "Penryn",    "Dunnington", "Nehalem",
                                 "Atom",     "Unknown", "Barcelona", "Opteron",    NULL};
  for (int empty = 0; empty < 2; empty++) {
    CHECK(!blas_choice_with(self, empty ? "" : NULL, out, sizeof out), "child failed: %s", out);
    printf("OPENBLAS_CORETYPE %s: %s", empty ? "empty" : "unset", out);
    if (avx512) /* mtnlg always picks here: 0.3.21 takes these CPUs for Prescott */
      CHECK(!strncmp(out, "SkylakeX (chosen by mtnlg", 25), "unset or empty on AVX-512: %s", out);
    for (int i = 0; avx2 && legacy[i]; i++) /* never a pre-AVX2 kernel on an AVX2 CPU */
      CHECK(strncmp(out, legacy[i], strlen(legacy[i])), "a legacy kernel on AVX2: %s", out);
  }
  if (!avx2) return;
  CHECK(!blas_choice_with(self, "Haswell", out, sizeof out), "child failed: %s", out);
  CHECK(!strncmp(out, "Haswell (OPENBLAS_CORETYPE)", 27), "Haswell asked for: %s", out);
  CHECK(!blas_choice_with(self, "Bogus", out, sizeof out), "child failed: %s", out);
  printf("OPENBLAS_CORETYPE Bogus: %s", out);
  CHECK(strstr(out, "OPENBLAS_CORETYPE=Bogus is not a kernel this OpenBLAS runs here"),
        "a kernel OpenBLAS does not have is named: %s", out);
}

/* A process whose GPU ranks run collectives loads CUDA's modules when CUDA
 * starts (device.h: lazy loading beside NCCL kernels stalls or deadlocks),
 * unless the operator chose: each case in a child, as the choice is the
 * process's. */
static void test_module_loading_eager_unless_set(void) {
  const char *given[] = {NULL, "LAZY", "EAGER"};
  const char *want_env[] = {"EAGER", "LAZY", "EAGER"};
  const char *want_says[] = {"set by mtnlg", "lazy (CUDA_MODULE_LOADING)",
                             "eager (CUDA_MODULE_LOADING)"};
  for (int i = 0; i < 3; i++) {
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
      if (given[i])
        setenv("CUDA_MODULE_LOADING", given[i], 1);
      else
        unsetenv("CUDA_MODULE_LOADING");
      const char *before = mt_device_cuda_loading();
      mt_device_eager_modules();
      const char *env = getenv("CUDA_MODULE_LOADING"), *says = mt_device_cuda_loading();
      int ok = env && !strcmp(env, want_env[i]) && strstr(says, want_says[i]) &&
               (given[i] || strstr(before, "default"));
      if (!ok)
        printf("FAIL: CUDA_MODULE_LOADING %s: after the call %s, said \"%s\" (before: \"%s\")\n",
               given[i] ? given[i] : "unset", env ? env : "unset", says, before);
      fflush(stdout);
      _exit(ok ? 0 : 1);
    }
    int st = 0;
    CHECK(pid > 0 && waitpid(pid, &st, 0) == pid && WIFEXITED(st) && WEXITSTATUS(st) == 0,
          "module loading with CUDA_MODULE_LOADING %s", given[i] ? given[i] : "unset");
  }
}

int main(int argc, char **argv) {
  if (argc == 2 && !strcmp(argv[1], "--blas")) {
    if (mt_blas_load()) return 1;
    printf("%s (%s)\n", mt_blas_corename(), mt_blas_choice());
    return 0;
  }
  test_blas_kernel_choice(argv[0]);
  test_unknown_kind_and_cpu_count();
  test_cublas_loads_on_demand();
  test_module_loading_eager_unless_set();
  test_memory_stats_follow_allocations("cpu:0");
  int n = mt_device_count("cuda");
  CHECK(n >= 0, "cuda count %d", n);
  printf("CUDA devices here: %d\n", n);
  if (n == 0)
    test_without_gpu_cuda_is_refused_and_auto_is_cpu();
  else
    test_with_gpu_cuda_opens_and_auto_is_cuda(n), test_memory_stats_follow_allocations("cuda:0");
  printf("test_device_auto: %s\n", failures ? "FAILED" : "ok");
  return failures ? 1 : 0;
}
