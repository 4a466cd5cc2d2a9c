/* gpt_dataset.h — GPT samples over indexed datasets: split, shuffle, blend.
 *
 * A GPT dataset is one split ("949,50,1" over sequences) of one indexed
 * dataset, cut into samples of seq+1 tokens that overlap by one token, in an
 * order fixed by the seed: sequences shuffled per epoch, samples shuffled;
 * epochs are added until n_samples are covered. The three indices (document,
 * sample, shuffle) are cached beside the data under a hash of their
 * description and rebuilt when it changes. A blend draws global sample i from
 * the dataset whose realised share lags its weight most (greedy), so every
 * prefix of the sample stream tracks the weights. All of it is a pure function
 * of (data, description, seed): the engine's data position is one global
 * sample counter, and any rank computes any sample.
 *
 * Order, exactly: epoch e lists the split's sequences, shuffled by a Philox
 * Fisher-Yates keyed by (seed, e); epochs are concatenated into one token
 * stream and sample k is stream tokens [k*seq, k*seq + seq + 1). The samples
 * whose tokens all lie in epoch e are shuffled among themselves (Philox,
 * (seed, e)), come after all of epoch e-1's and are followed by the one sample
 * that starts in epoch e and runs into e+1: Megatron's "separate last epoch"
 * rule applied to every epoch, so training sees each epoch whole before the
 * next. The epoch count E is the smallest with (E*T - 1) / seq >= n_samples
 * (T the split's tokens); len is that whole count, the stream's last < seq
 * tokens are never a sample start. A larger n_samples only appends: the
 * sample running into epoch E, then the added epochs; positions [0, len) are
 * the same for every n_samples, so a run sized for more samples (more steps,
 * a smaller global batch at resume, a blend's grown share) reads on in the
 * order it read. As in Megatron's GPTDataset, the unit split and
 * shuffled (its "document") is an .idx sequence: the .idx document index is
 * not read, so a document cut into several sequences has them shuffled apart,
 * empty documents (repeated doc_idx entries) do not move the split
 * boundaries, and a merged index whose doc_idx is only [0] trains as Megatron
 * trains on it.
 */
#ifndef MT_GPT_DATASET_H
#define MT_GPT_DATASET_H

#include <stddef.h>
#include <stdint.h>

#include "indexed.h"

typedef enum { MT_SPLIT_TRAIN = 0, MT_SPLIT_VALID = 1, MT_SPLIT_TEST = 2 } mt_split;

typedef struct mt_gpt_dataset_spec {
  const char *prefix; /* indexed dataset */
  const char *split;  /* "949,50,1" */
  mt_split which;
  int seq;            /* sample = seq + 1 tokens */
  uint64_t n_samples; /* at least this many; epochs added as needed */
  uint64_t seed;
  int shuffle;           /* 0: sequences and samples in file order */
  const char *cache_dir; /* NULL or "": beside the data */
  /* NULL or "": none. Where the index goes when cache_dir (or the data's
   * directory) cannot take it, as a dataset on read-only shared storage:
   * the node's paths.state_dir, so that it is not built again at each start */
  const char *cache_fallback;
} mt_gpt_dataset_spec;

typedef struct mt_gpt_dataset mt_gpt_dataset;

int mt_gpt_dataset_open(mt_gpt_dataset **out, const mt_gpt_dataset_spec *spec);
void mt_gpt_dataset_free(mt_gpt_dataset *d);
uint64_t mt_gpt_dataset_len(const mt_gpt_dataset *d); /* samples available */
int mt_gpt_dataset_epochs(const mt_gpt_dataset *d);
uint64_t mt_gpt_dataset_tokens_per_epoch(const mt_gpt_dataset *d);
/* Sample i (i < len) as seq+1 token ids. */
int mt_gpt_dataset_sample(const mt_gpt_dataset *d, uint64_t i, int32_t *tokens);

/* Sequences [*first, *end) of n_seqs that split string `split` gives to
 * `which`, rounded as Megatron's get_train_valid_test_split_ does ("," or "/"
 * between up to three non-negative ratios; missing ones are 0; NULL or "" is
 * "1,0,0"). An empty range is not an error here; opening it is. */
int mt_gpt_split_seqs(const char *split, uint64_t n_seqs, mt_split which, uint64_t *first,
                      uint64_t *end);

/* How open came by the indices: loaded from the cache file, built because it
 * was absent, rebuilt over an unusable one (a warning says why), or built and
 * kept in memory because the cache could not be written (warned too). */
enum { MT_GPT_CACHE_LOADED = 0, MT_GPT_CACHE_BUILT, MT_GPT_CACHE_REBUILT, MT_GPT_CACHE_MEMORY };
int mt_gpt_dataset_cache_status(const mt_gpt_dataset *d);
const char *mt_gpt_dataset_cache_path(const mt_gpt_dataset *d);

typedef struct mt_blend mt_blend;
/* Weights need not sum to 1 (normalised; kept as integers over 2^40 so the
 * greedy choice, W_k*(i+1) - c_k, ties to the lowest k, is exact everywhere).
 * A weight-0 dataset is never drawn and may be NULL. Each dataset must have at least
 * the samples the blend assigns to it for n_samples (the caller sizes them
 * with mt_blend_counts first). */
int mt_blend_counts(const double *weights, int n, uint64_t n_samples, uint64_t *counts);
int mt_blend_open(mt_blend **out, mt_gpt_dataset **sets, const double *weights, int n,
                  uint64_t n_samples);
void mt_blend_free(mt_blend *b);
/* Global sample i: which dataset and which of its samples. */
int mt_blend_sample(const mt_blend *b, uint64_t i, int32_t *tokens, int *dataset);
/* Samples of dataset k among the first i of the stream (i clamped to n_samples). */
uint64_t mt_blend_consumed(const mt_blend *b, int k, uint64_t i);

#endif
