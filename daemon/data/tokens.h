/* tokens.h — a flat token file: little-endian uint16 ids, read by mmap.
 *
 * Sample k of length seq covers tokens [k*seq, k*seq + seq + 1): inputs are
 * the first seq, targets the last seq, so consecutive samples overlap by one
 * token as Megatron's do. Samples past the end wrap around (a new epoch).
 * The file is mapped, never copied into memory or written. Megatron's
 * .bin/.idx datasets are indexed.h's.
 */
#ifndef MT_TOKENS_H
#define MT_TOKENS_H

#include <stddef.h>
#include <stdint.h>

typedef struct mt_token_file {
  const uint16_t *tokens;
  size_t n_tokens;
  void *map;
  size_t map_bytes;
  char path[1024];
} mt_token_file;

int mt_tokens_open(mt_token_file *f, const char *path);
void mt_tokens_close(mt_token_file *f);

/* Samples available of length seq: (n_tokens - 1) / seq. */
uint64_t mt_tokens_samples(const mt_token_file *f, int seq);

/* Fills inputs/targets (count, seq) with samples first .. first+count-1
 * (modulo the sample count). Fails, naming the token, if any id >= vocab. */
int mt_tokens_read(const mt_token_file *f, uint64_t first, int count, int seq, int vocab,
                   int32_t *inputs, int32_t *targets);

#endif
