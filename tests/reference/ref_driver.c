/* ref_driver.c — runs libmtnlg's GPT on given weights and tokens so an
 * independent PyTorch model (torch_gpt.py) can check its numbers.
 *
 *   ref_driver grads WEIGHTS.safetensors TOKENS.bin B T OUT_GRADS.safetensors [--recompute]
 *       one forward + backward (loss_scale 1); prints {"loss": L} and writes
 *       the gradients under the parameters' Hugging Face names and layouts.
 *   ref_driver adamw WEIGHTS.safetensors TOKENS.bin B T STEPS LR WD [BETA1 BETA2 EPS]
 *       STEPS AdamW steps on the same batch, no clipping; prints one
 *       {"step": s, "loss": L} line per step (the loss before that update).
 *   ref_driver blas
 *       prints the OpenBLAS kernel libmtnlg runs on here (its core name, as
 *       OPENBLAS_CORETYPE takes it), so the test can give torch the same one:
 *       their fp32 sums then run in the same order.
 *
 * The config comes from the weights file's __metadata__ (n_layer, n_embd,
 * n_head, vocab_size, seq); the vocabulary is padded to a multiple of 128,
 * LayerNorm eps is 1e-5 and dropout is off. TOKENS.bin holds int32 (B, T+1):
 * inputs are columns [0, T), targets columns [1, T]. The device is cpu:0
 * unless MT_REF_DEVICE names another. MT_REF_PRECISION=bf16 (or fp16) makes
 * it mixed precision: fp32 master weights, rounded into the 16-bit working
 * copy the forward and backward read (before every step of adamw; no loss
 * scaling), the activations kept in 16 bits; grads then saves the fp32
 * gradients of that working copy. Exit status 0 on success, 1 on any error (message on stderr), 2
 * on bad usage.
 */
#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "blas.h"
#include "device.h"
#include "err.h"
#include "gpt.h"
#include "optim.h"
#include "safetensors.h"

static void usage(void) {
  fprintf(stderr, "usage: ref_driver grads WEIGHTS.safetensors TOKENS.bin B T OUT.safetensors "
                  "[--recompute]\n"
                  "       ref_driver adamw WEIGHTS.safetensors TOKENS.bin B T STEPS LR WD "
                  "[BETA1 BETA2 EPS]\n"
                  "       ref_driver blas\n");
}

static int parse_int(const char *s, const char *what, int *out) {
  char *end;
  long v = strtol(s, &end, 10);
  if (!*s || *end || v < 1 || v > (1 << 30))
    return mt_seterr(MT_EINVAL, "ref_driver: %s \"%s\" is not a positive integer", what, s);
  *out = (int)v;
  return 0;
}

static int parse_double(const char *s, const char *what, double *out) {
  char *end;
  *out = strtod(s, &end);
  if (!*s || *end) return mt_seterr(MT_EINVAL, "ref_driver: %s \"%s\" is not a number", what, s);
  return 0;
}

/* Reads int32 (B, T+1) tokens and splits them into inputs and targets (B, T). */
static int read_tokens(const char *path, int B, int T, int32_t *inputs, int32_t *targets) {
  size_t row = (size_t)T + 1, n = (size_t)B * row;
  int32_t *all = malloc(n * sizeof *all);
  if (!all) return mt_seterr(MT_ENOMEM, "ref_driver: tokens");
  FILE *fp = fopen(path, "rb");
  int rc = 0;
  if (!fp) {
    rc = mt_seterr(MT_EIO, "ref_driver: open %s", path);
  } else {
    size_t got = fread(all, sizeof *all, n, fp);
    int extra = fgetc(fp) != EOF;
    if (got != n || extra)
      rc = mt_seterr(MT_EINVAL, "ref_driver: %s: want exactly %zu int32 tokens (B=%d, T+1=%zu)",
                     path, n, B, row);
    fclose(fp);
  }
  for (size_t b = 0; !rc && b < (size_t)B; b++) {
    memcpy(inputs + b * (size_t)T, all + b * row, (size_t)T * sizeof *all);
    memcpy(targets + b * (size_t)T, all + b * row + 1, (size_t)T * sizeof *all);
  }
  free(all);
  return rc;
}

static int run(int argc, char **argv) {
  int adamw = !strcmp(argv[1], "adamw");
  const char *weights = argv[2], *tokens = argv[3];
  int B, T, rc;
  if ((rc = parse_int(argv[4], "B", &B)) || (rc = parse_int(argv[5], "T", &T))) return rc;

  mt_gpt_config cfg;
  if ((rc = mt_gpt_config_of_file(weights, &cfg))) return rc;
  if (!adamw && argc == 8) cfg.recompute = 1;
  const char *prec = getenv("MT_REF_PRECISION");
  if (prec && !strcmp(prec, "bf16"))
    cfg.precision = MT_PREC_BF16;
  else if (prec && !strcmp(prec, "fp16"))
    cfg.precision = MT_PREC_FP16;
  else if (prec && strcmp(prec, "fp32"))
    return mt_seterr(MT_EINVAL, "ref_driver: MT_REF_PRECISION \"%s\": fp32, bf16 or fp16", prec);

  size_t BT = (size_t)B * (size_t)T;
  int32_t *inputs = malloc(BT * sizeof *inputs);
  int32_t *targets = malloc(BT * sizeof *targets);
  if (!inputs || !targets) return mt_seterr(MT_ENOMEM, "ref_driver: tokens");
  if ((rc = read_tokens(tokens, B, T, inputs, targets))) return rc;

  const char *spec = getenv("MT_REF_DEVICE") ? getenv("MT_REF_DEVICE") : "cpu:0";
  mt_device dev;
  if ((rc = mt_device_open(&dev, spec))) return rc;
  mt_gpt m;
  if ((rc = mt_gpt_create(&m, &cfg, &dev, B, T))) return rc;
  if ((rc = mt_gpt_load_safetensors(&m, weights))) return rc;

  if (!adamw) {
    mt_gpt_zero_grad(&m);
    if ((rc = mt_gpt_round_weights(&m)) || (rc = mt_gpt_forward(&m, inputs, targets, 0)) ||
        (rc = mt_gpt_backward(&m, 1.0f)))
      return rc;
    if ((rc = mt_gpt_save_grads_safetensors(&m, argv[6]))) return rc;
    printf("{\"loss\": %.9g}\n", m.last_loss);
  } else {
    int steps;
    double lr, wd, beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
    if ((rc = parse_int(argv[6], "STEPS", &steps)) || (rc = parse_double(argv[7], "LR", &lr)) ||
        (rc = parse_double(argv[8], "WD", &wd)))
      return rc;
    if (argc == 12 && ((rc = parse_double(argv[9], "BETA1", &beta1)) ||
                       (rc = parse_double(argv[10], "BETA2", &beta2)) ||
                       (rc = parse_double(argv[11], "EPS", &eps))))
      return rc;
    mt_adamw opt;
    if ((rc = mt_adamw_create(&opt, &m, 0, m.num_params, beta1, beta2, eps, wd))) return rc;
    for (int s = 0; s < steps; s++) {
      mt_gpt_zero_grad(&m);
      if ((rc = mt_gpt_round_weights(&m)) || (rc = mt_gpt_forward(&m, inputs, targets, 0)) ||
          (rc = mt_gpt_backward(&m, 1.0f)) || (rc = mt_adamw_step(&opt, &m, m.grads, lr, 1.0)))
        return rc;
      printf("{\"step\": %d, \"loss\": %.9g}\n", s, m.last_loss);
    }
    mt_adamw_destroy(&opt);
  }
  fflush(stdout);
  mt_gpt_destroy(&m);
  mt_device_close(&dev);
  free(inputs);
  free(targets);
  return 0;
}

int main(int argc, char **argv) {
  int ok_grads = argc >= 2 && !strcmp(argv[1], "grads") &&
                 (argc == 7 || (argc == 8 && !strcmp(argv[7], "--recompute")));
  int ok_adamw = argc >= 2 && !strcmp(argv[1], "adamw") && (argc == 9 || argc == 12);
  if (argc == 2 && !strcmp(argv[1], "blas")) {
    if (mt_blas_load()) {
      fprintf(stderr, "ref_driver: %s\n", mt_errmsg());
      return 1;
    }
    printf("%s\n", mt_blas_corename());
    return 0;
  }
  if (!ok_grads && !ok_adamw) {
    usage();
    return 2;
  }
  int rc = run(argc, argv);
  if (rc) {
    fprintf(stderr, "ref_driver: %s (%s)\n", mt_errmsg(), mt_strerror(rc));
    return 1;
  }
  return 0;
}
