/* infer.h — a trained model used, not trained: the logits of a window of
 * tokens, scores of token sequences (log-likelihood and greedy hits, as
 * Megatron's zero-shot tasks count them) and sampling, on one device, fp32,
 * dropout off. The model comes from an export (a safetensors file, a
 * Hugging Face sharded directory or its index), its shape from the file. */
#ifndef MT_INFER_H
#define MT_INFER_H

#include <stddef.h>
#include <stdint.h>

#include "gpt.h"

typedef struct mt_infer mt_infer;

/* The model at path, of the shape cfg that mt_gpt_config_of_file read from
 * it (the caller has it to choose seq), on device spec ("cpu:0"), run
 * `batch` rows at a time of seq tokens each (0: the model's whole context). */
int mt_infer_open(mt_infer **out, const char *path, const mt_gpt_config *cfg, const char *device,
                  int batch, int seq);
void mt_infer_free(mt_infer *inf);
const mt_gpt_config *mt_infer_config(const mt_infer *inf);
int mt_infer_seq(const mt_infer *inf); /* tokens a row holds */

/* The next token's logits after tokens[0, n) (n >= 1; past seq tokens only
 * the last seq are seen): vocab_size floats into logits. With the key-value
 * cache on (the default), a call whose tokens extend the previous call's
 * (n <= seq) runs only the new positions (mt_gpt_decode); any other call
 * runs a forward over its window, which fills the cache. */
int mt_infer_next(mt_infer *inf, const int32_t *tokens, size_t n, float *logits);
/* Turns the key-value cache on or off (off: every call a whole forward,
 * the way to check the cache against). */
void mt_infer_set_cache(mt_infer *inf, int on);

/* One sequence scored: tokens[first, n) each predicted from the tokens
 * before it (1 <= first < n <= seq + 1). nll: the sum of their negative log
 * likelihoods (natural log); hits, when greedy is set: how many the greedy
 * choice (the largest logit) gets right (it reads those positions' logits
 * back from the device). A log-likelihood that is not finite (a diverged
 * model) fails the call. */
typedef struct mt_infer_row {
  const int32_t *tokens;
  size_t n, first;
  int greedy;
  double nll;
  int hits;
} mt_infer_row;
int mt_infer_score(mt_infer *inf, mt_infer_row *rows, int n_rows);

/* How the next token is drawn: temperature 0 takes the largest logit
 * (greedy); otherwise softmax(logits / temperature), cut to the top_k
 * largest (0: all) and then to the smallest set whose probability reaches
 * top_p (1: all), drawn with the generator in *rng (seed it with
 * mt_sample_seed). */
typedef struct mt_sampling {
  double temperature;
  int top_k;
  double top_p;
} mt_sampling;
void mt_sample_seed(uint64_t rng[2], uint64_t seed);
/* Returns the token, or a negative MT_E* with the error set (out of
 * memory, or a logit that is not finite). */
int32_t mt_sample(const float *logits, int vocab, const mt_sampling *s, uint64_t rng[2]);

#endif
