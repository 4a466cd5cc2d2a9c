/* test_half_helper.c — converts floats with half.h for test_half_torch.py.
 *
 * Usage: test_half_helper IN OUT. IN holds n little-endian float32; OUT gets
 * the n bf16 patterns, then the n fp16 patterns (uint16 each).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "half.h"

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s IN OUT\n", argv[0]);
    return 2;
  }
  FILE *in = fopen(argv[1], "rb");
  if (!in) {
    perror(argv[1]);
    return 1;
  }
  fseek(in, 0, SEEK_END);
  size_t n = (size_t)ftell(in) / sizeof(float);
  rewind(in);
  float *x = malloc(n * sizeof(float) + 1);
  uint16_t *h = malloc(2 * n * sizeof(uint16_t) + 1);
  if (!x || !h || fread(x, sizeof(float), n, in) != n) {
    fprintf(stderr, "%s: cannot read %zu floats\n", argv[1], n);
    return 1;
  }
  fclose(in);
  for (size_t i = 0; i < n; i++) {
    h[i] = mt_f32_to_bf16(x[i]).bits;
    h[n + i] = mt_f32_to_fp16(x[i]).bits;
  }
  FILE *out = fopen(argv[2], "wb");
  if (!out || fwrite(h, sizeof(uint16_t), 2 * n, out) != 2 * n || fclose(out)) {
    perror(argv[2]);
    return 1;
  }
  free(x);
  free(h);
  return 0;
}
