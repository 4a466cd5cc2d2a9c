/* test_device_auto.c — device discovery (kernels/device.c) as a machine
 * without a GPU sees it, which is every CI machine:
 * - mt_device_count("cuda") is 0, not an error (no driver is 0 devices);
 * - mt_device_open("cuda:0") fails with a message a person can act on,
 *   naming CUDA and why (the runtime's error, or a build without CUDA);
 * - devices "auto" resolves to cpu:W.
 * On a machine with a GPU the same calls must find it instead: count > 0,
 * cuda:0 opens, auto resolves to cuda:0-K.
 */
#include <stdio.h>
#include <string.h>

#include "device.h"
#include "err.h"
#include "mt_check.h"

static void test_unknown_kind_and_cpu_count(void) {
  CHECK(mt_device_count("cpu") == 1, "cpu count %d", mt_device_count("cpu"));
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

int main(void) {
  test_unknown_kind_and_cpu_count();
  int n = mt_device_count("cuda");
  CHECK(n >= 0, "cuda count %d", n);
  printf("CUDA devices here: %d\n", n);
  if (n == 0)
    test_without_gpu_cuda_is_refused_and_auto_is_cpu();
  else
    test_with_gpu_cuda_opens_and_auto_is_cuda(n);
  printf("test_device_auto: %s\n", failures ? "FAILED" : "ok");
  return failures ? 1 : 0;
}
