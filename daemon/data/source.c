/* source.c — the trainer's view of its data: token file or indexed blend. */
#include "source.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "err.h"
#include "tokens.h"

struct mt_data_source {
  int seq, vocab;
  mt_token_file flat; /* when spec->path is set */
  int is_flat;
  int n;                                 /* datasets in the training blend */
  int n_sets[3];                         /* datasets in each split's blend */
  mt_gpt_dataset *sets[3][MT_MAX_BLEND]; /* [train|valid|test][k] */
  mt_blend *blend[3];
  char names[MT_MAX_BLEND][MT_PATH_MAX];
  /* each split's datasets, for its errors: data.valid and data.test are
   * others than the training blend's */
  char split_sets[3][MT_MAX_BLEND][MT_PATH_MAX];
  int32_t *sample; /* seq + 1 */
};

void mt_data_source_free(mt_data_source *s) {
  if (!s) return;
  if (s->is_flat) mt_tokens_close(&s->flat);
  for (int w = 0; w < 3; w++) {
    mt_blend_free(s->blend[w]);
    for (int k = 0; k < s->n_sets[w]; k++) mt_gpt_dataset_free(s->sets[w][k]);
  }
  free(s->sample);
  free(s);
}

/* The blend of one split: each dataset sized for its share of n samples.
 * data.valid and data.test are read whole (Megatron's --valid-data-path and
 * --test-data-path), the others' share of data.split. */
static int open_split(mt_data_source *s, const mt_data_spec *spec, mt_split which, uint64_t seed,
                      uint64_t n) {
  static const char *split_names[] = {"train", "valid", "test"};
  const mt_blend_spec *b = spec->blend;
  const char *split = spec->split, *key = NULL;
  int nb = spec->n_blend;
  if (which == MT_SPLIT_VALID && spec->n_valid)
    b = spec->valid, nb = spec->n_valid, split = "0,1,0", key = "data.valid";
  if (which == MT_SPLIT_TEST && spec->n_test)
    b = spec->test, nb = spec->n_test, split = "0,0,1", key = "data.test";
  double weights[MT_MAX_BLEND] = {0};
  uint64_t counts[MT_MAX_BLEND];
  for (int k = 0; k < nb; k++) weights[k] = b[k].weight;
  int rc = mt_blend_counts(weights, nb, n, counts);
  if (rc) return rc;
  for (int k = 0; k < nb; k++) {
    mt_gpt_dataset_spec ds = {
        .prefix = b[k].prefix,
        .split = split,
        .which = which,
        .seq = s->seq,
        .n_samples = counts[k] ? counts[k] : 1,
        .seed = seed,
        .shuffle = spec->shuffle,
        .cache_dir = spec->cache_dir[0] ? spec->cache_dir : NULL,
        .cache_fallback = spec->cache_fallback[0] ? spec->cache_fallback : NULL,
    };
    memcpy(s->split_sets[which][k], b[k].prefix, sizeof s->split_sets[which][k]);
    rc = mt_gpt_dataset_open(&s->sets[which][k], &ds);
    if (rc && key) return mt_wraperr(rc, "%s: %s", key, b[k].prefix);
    if (rc) return mt_wraperr(rc, "data: %s split of %s", split_names[which], b[k].prefix);
    s->n_sets[which] = k + 1;
  }
  rc = mt_blend_open(&s->blend[which], s->sets[which], weights, nb, n);
  if (rc) return mt_wraperr(rc, "data: %s blend", split_names[which]);
  return 0;
}

/* Whether every dataset of the blend has tokens in its share of the test
 * split: only then is there a test pass (Megatron's do_test). 0 or 1, or a
 * negative code for an index that cannot be read. */
static int test_split_present(const mt_data_spec *spec) {
  if (spec->n_test) return 1; /* data.test: read whole, and an empty one is refused */
  if (spec->path[0]) return 0;
  double w[3];
  if (mt_job_split_weights(spec->split, w) || !(w[2] > 0)) return 0;
  for (int k = 0; k < spec->n_blend; k++) {
    mt_indexed d;
    uint64_t first = 0, end = 0, tokens = 0;
    int rc = mt_indexed_open(&d, spec->blend[k].prefix);
    if (rc) return rc;
    rc = mt_gpt_split_seqs(spec->split, d.n_seqs, MT_SPLIT_TEST, &first, &end);
    for (uint64_t q = first; !rc && q < end && !tokens; q++) tokens += mt_indexed_seq_len(&d, q);
    mt_indexed_close(&d);
    if (rc) return rc;
    if (!tokens) return 0;
  }
  return 1;
}

int mt_data_source_open(mt_data_source **out, const mt_data_spec *spec, int seq, int vocab,
                        uint64_t seed, uint64_t n_train, uint64_t n_valid, uint64_t n_test) {
  *out = NULL;
  mt_data_source *s = calloc(1, sizeof *s);
  if (!s) return mt_seterr(MT_ENOMEM, "data: source");
  s->seq = seq;
  s->vocab = vocab;
  s->sample = malloc(((size_t)seq + 1) * sizeof(int32_t));
  int rc = s->sample ? 0 : mt_seterr(MT_ENOMEM, "data: sample buffer");
  if (!rc && spec->path[0]) {
    s->is_flat = 1;
    s->n = 1;
    snprintf(s->names[0], sizeof s->names[0], "%s", spec->path);
    rc = mt_tokens_open(&s->flat, spec->path);
    if (!rc && mt_tokens_samples(&s->flat, seq) == 0)
      rc = mt_seterr(MT_EINVAL, "data: %s has %zu tokens, fewer than one sample of %d + 1",
                     spec->path, s->flat.n_tokens, seq);
    if (!rc && n_valid && !spec->n_valid)
      rc = mt_seterr(MT_EINVAL, "data: %s is a flat token file without a valid split", spec->path);
    if (!rc && n_valid) rc = open_split(s, spec, MT_SPLIT_VALID, seed, n_valid);
    int present = !rc && n_test ? test_split_present(spec) : 0;
    if (present > 0) rc = open_split(s, spec, MT_SPLIT_TEST, seed, n_test);
  } else if (!rc) {
    s->n = spec->n_blend;
    for (int k = 0; k < s->n; k++) {
      const char *base = strrchr(spec->blend[k].prefix, '/');
      snprintf(s->names[k], sizeof s->names[k], "%s", base ? base + 1 : spec->blend[k].prefix);
    }
    rc = open_split(s, spec, MT_SPLIT_TRAIN, seed, n_train);
    if (!rc && n_valid) rc = open_split(s, spec, MT_SPLIT_VALID, seed, n_valid);
    int present = !rc && n_test ? test_split_present(spec) : 0;
    if (present < 0) rc = present;
    if (present > 0) rc = open_split(s, spec, MT_SPLIT_TEST, seed, n_test);
  }
  if (rc) {
    mt_data_source_free(s);
    return rc;
  }
  *out = s;
  return 0;
}

int mt_data_source_read(mt_data_source *s, mt_split which, uint64_t first, int count,
                        int32_t *inputs, int32_t *targets) {
  int seq = s->seq;
  if (s->is_flat && which == MT_SPLIT_TRAIN)
    return mt_tokens_read(&s->flat, first, count, seq, s->vocab, inputs, targets);
  static const char *const split_names[] = {"train", "valid", "test"};
  if (s->is_flat && !s->blend[which]) /* data.valid and data.test are indexed datasets */
    return mt_seterr(MT_EINVAL, "data: %s is a flat token file, with no %s split (give data.%s)",
                     s->names[0], split_names[which], split_names[which]);
  if (!s->blend[which])
    return mt_seterr(MT_EINVAL, "data: the %s split was not opened", split_names[which]);
  for (int i = 0; i < count; i++) {
    int k;
    int rc = mt_blend_sample(s->blend[which], first + (uint64_t)i, s->sample, &k);
    if (rc) return rc;
    for (int t = 0; t <= seq; t++) {
      if (s->sample[t] < 0 || s->sample[t] >= s->vocab)
        return mt_seterr(MT_ECORRUPT,
                         "data: %s: token %d in sample %llu of the %s split is outside vocab %d",
                         s->split_sets[which][k], s->sample[t],
                         (unsigned long long)(first + (uint64_t)i), split_names[which], s->vocab);
    }
    memcpy(inputs + (size_t)i * seq, s->sample, (size_t)seq * sizeof(int32_t));
    memcpy(targets + (size_t)i * seq, s->sample + 1, (size_t)seq * sizeof(int32_t));
  }
  return 0;
}

int mt_data_source_count(const mt_data_source *s) { return s->n; }
int mt_data_source_has_test(const mt_data_source *s) { return s->blend[MT_SPLIT_TEST] != NULL; }
const char *mt_data_source_name(const mt_data_source *s, int k) { return s->names[k]; }

uint64_t mt_data_source_consumed(const mt_data_source *s, int k, uint64_t n) {
  if (s->is_flat) return n;
  return mt_blend_consumed(s->blend[MT_SPLIT_TRAIN], k, n);
}

void mt_data_source_describe(const mt_data_source *s, uint64_t n, char *buf, size_t cap) {
  size_t off = 0;
  buf[0] = 0;
  for (int k = 0; k < s->n && off < cap; k++) {
    uint64_t c = mt_data_source_consumed(s, k, n);
    off += (size_t)snprintf(buf + off, cap - off, "%s%s %.1f%%", k ? ", " : "", s->names[k],
                            n ? 100.0 * (double)c / (double)n : 0.0);
  }
  if (off < cap) snprintf(buf + off, cap - off, " of %llu samples", (unsigned long long)n);
}
