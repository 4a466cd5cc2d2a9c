/* test_start_checks.c — what mtnlgd checks before a job starts, on the
 * devices it is given (daemon/steplog.c): a 16-bit job on GPUs whose head
 * size the flash attention does not take is no longer refused (its
 * attention takes the chunked 16-bit GEMMs), so the check goes on to the
 * devices' memory. No GPU is needed: without one that question fails, and
 * not on the head size. */
#include <string.h>

#include "err.h"
#include "job.h"
#include "ops.h"
#include "steplog.h"

#include "mt_check.h"

#ifndef MT_PRESET_DIR
#error "MT_PRESET_DIR must name etc/models"
#endif

static const char *const presets[] = {MT_PRESET_DIR, NULL};

/* The tiny preset with n_embd / n_head = hs and the given precision. */
static void job_with(mt_job *job, int hs, const char *precision) {
  char embd[64], head[64], prec[64];
  snprintf(embd, sizeof embd, "model.n_embd=%d", 2 * hs);
  snprintf(head, sizeof head, "model.n_head=%d", 2);
  snprintf(prec, sizeof prec, "train.precision=%s", precision);
  const char *ov[] = {embd, head, prec, NULL};
  const char *json = "{\"model\": {\"preset\": \"tiny\"}, \"train\": {\"global_batch\": 8, "
                     "\"steps\": 10, \"lr\": {\"peak\": 1e-3}}, \"data\": {\"path\": \"t.u16\"}}";
  if (mt_job_parse(job, json, ".", presets, ov))
    fprintf(stderr, "job: %s\n", mt_errmsg()), failures++;
}

static int names_head_size(void) { return strstr(mt_errmsg(), "head size") != NULL; }

/* Over the flash kernels' head size in bf16: the check goes past the head
 * size to the devices (this machine may lack cuda:0: any error but the
 * head size's) and, on the CPU, passes. */
static void test_16bit_job_over_the_flash_head_size_passes(void) {
  mt_job job;
  job_with(&job, MT_FLASH_MAX_HS + 64, "bf16");
  mt_seterr(0, "%s", "no error");
  mt_check_memory_plan(&job, 1, "cuda:0");
  CHECK(!names_head_size(), "head size %d refused: %s", MT_FLASH_MAX_HS + 64, mt_errmsg());
  int rc = mt_check_memory_plan(&job, 1, "cpu:0");
  CHECK(rc == 0, "a bf16 job on the CPU refused: %s", mt_errmsg());
}

static void test_what_the_flash_kernels_take_passes(void) {
  mt_job job;
  /* at the limit, on GPUs (the check then asks for cuda:0, which this
   * machine may lack: any error but the head size's) */
  job_with(&job, MT_FLASH_MAX_HS, "fp16");
  mt_seterr(0, "%s", "no error");
  mt_check_memory_plan(&job, 1, "cuda:0");
  CHECK(!names_head_size(), "head size %d refused: %s", MT_FLASH_MAX_HS, mt_errmsg());
  /* over it in fp32 (the chunked attention), and on the CPU */
  job_with(&job, MT_FLASH_MAX_HS + 64, "fp32");
  mt_seterr(0, "%s", "no error");
  mt_check_memory_plan(&job, 1, "cuda:0");
  CHECK(!names_head_size(), "an fp32 job refused: %s", mt_errmsg());
}

int main(void) {
  test_16bit_job_over_the_flash_head_size_passes();
  test_what_the_flash_kernels_take_passes();
  printf("%s\n", failures ? "FAIL" : "ok");
  return failures ? 1 : 0;
}
