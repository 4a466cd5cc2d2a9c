/* test_gpt_dataset.c — GPT sample order, split, index cache and blending.
 *
 * The corpora are written with mt_indexed_writer_*; every token says where it
 * came from (doc * 1000 + offset, plus a per-corpus base), so a sample read
 * back through the dataset can be traced to the documents it covers and the
 * expectations are computed here from the document lengths alone. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "err.h"
#include "gpt_dataset.h"
#include "indexed.h"

#include "mt_check.h"

#define OK(expr) REQUIRE((expr) == 0, "%s", mt_errmsg())

/* ---- corpora ----------------------------------------------------------- */

enum { MAX_DOCS = 4000, TOKENS_PER_DOC_ID = 1000 };

typedef struct corpus {
  char prefix[256];
  int n_docs;
  int32_t base;
  uint32_t len[MAX_DOCS]; /* tokens per document */
} corpus;

static int32_t token_of(const corpus *c, uint64_t doc, uint64_t off) {
  return c->base + (int32_t)(doc * TOKENS_PER_DOC_ID + off);
}

/* Writes a corpus of n_docs documents with lengths len_of(d) (some empty),
 * each cut into sequences of at most seq_cap tokens, int32 tokens. */
static int make_corpus(corpus *c, const char *name, int n_docs, int32_t base,
                       uint32_t (*len_of)(int), uint32_t seq_cap) {
  memset(c, 0, sizeof *c);
  snprintf(c->prefix, sizeof c->prefix, "%s", tmp_path(name));
  c->n_docs = n_docs;
  c->base = base;
  mt_indexed_writer *w;
  OK(mt_indexed_writer_open(&w, c->prefix, MT_IDX_I32));
  int32_t buf[TOKENS_PER_DOC_ID];
  for (int d = 0; d < n_docs; d++) {
    c->len[d] = len_of(d);
    for (uint32_t t = 0; t < c->len[d]; t++) buf[t] = token_of(c, (uint64_t)d, t);
    uint32_t done = 0;
    do { /* an empty document is one empty sequence */
      uint32_t take = c->len[d] - done < seq_cap ? c->len[d] - done : seq_cap;
      OK(mt_indexed_writer_add_seq(w, buf + done, take));
      done += take;
    } while (done < c->len[d]);
    OK(mt_indexed_writer_end_doc(w));
  }
  OK(mt_indexed_writer_finish(w));
  return 0;
}

static uint32_t len_mixed(int d) { return d % 17 == 5 ? 0 : (uint32_t)((d * 37 + 11) % 90) + 1; }
static uint32_t len_short(int d) { return (uint32_t)((d * 13 + 3) % 9); }

/* Tokens of documents [d0, d1). */
static uint64_t corpus_tokens(const corpus *c, int d0, int d1) {
  uint64_t n = 0;
  for (int d = d0; d < d1; d++) n += c->len[d];
  return n;
}

static mt_gpt_dataset_spec spec_of(const corpus *c, const char *split, mt_split which, int seq,
                                   uint64_t n_samples, uint64_t seed, int shuffle) {
  mt_gpt_dataset_spec s = {c->prefix, split, which, seq, n_samples, seed, shuffle, NULL, NULL};
  return s;
}

/* All samples of d in training order, (len, seq+1). */
static int32_t *read_all(const mt_gpt_dataset *d, int seq) {
  uint64_t n = mt_gpt_dataset_len(d);
  int32_t *all = malloc((n ? n : 1) * (size_t)(seq + 1) * sizeof *all);
  if (!all) return NULL;
  for (uint64_t i = 0; i < n; i++)
    if (mt_gpt_dataset_sample(d, i, all + i * (uint64_t)(seq + 1))) {
      fprintf(stderr, "  sample %" PRIu64 ": %s\n", i, mt_errmsg());
      free(all);
      return NULL;
    }
  return all;
}

/* Within a sample, each token follows the previous in its document, or the
 * previous was its document's last and the next starts another document. */
static int check_contiguous(const corpus *c, const int32_t *s, int seq, int d0, int d1) {
  for (int t = 0; t <= seq; t++) {
    int64_t v = s[t] - c->base;
    int64_t doc = v / TOKENS_PER_DOC_ID, off = v % TOKENS_PER_DOC_ID;
    REQUIRE(doc >= d0 && doc < d1 && off < c->len[doc],
            "token %d = %d is not in documents [%d, %d)", t, s[t], d0, d1);
    if (t == 0) continue;
    int64_t pv = s[t - 1] - c->base;
    int64_t pdoc = pv / TOKENS_PER_DOC_ID, poff = pv % TOKENS_PER_DOC_ID;
    int follows =
        (doc == pdoc && off == poff + 1) || (off == 0 && poff == (int64_t)c->len[pdoc] - 1);
    REQUIRE(follows,
            "token %d (doc %" PRId64 " offset %" PRId64 ") does not follow doc %" PRId64
            " offset %" PRId64,
            t, doc, off, pdoc, poff);
  }
  return 0;
}

static uint64_t ceil_div(uint64_t a, uint64_t b) { return (a + b - 1) / b; }

/* ---- stderr capture for warnings ---------------------------------------- */

static int saved_stderr = -1;

static void capture_begin(void) {
  fflush(stderr);
  saved_stderr = dup(2);
  int fd = open(tmp_path("stderr.txt"), O_CREAT | O_TRUNC | O_WRONLY, 0644);
  dup2(fd, 2);
  close(fd);
}

static const char *capture_end(void) {
  static char text[8192];
  fflush(stderr);
  dup2(saved_stderr, 2);
  close(saved_stderr);
  FILE *fp = fopen(tmp_path("stderr.txt"), "r");
  size_t n = fp ? fread(text, 1, sizeof text - 1, fp) : 0;
  if (fp) fclose(fp);
  text[n] = 0;
  fputs(text, stderr); /* keep it visible in the test log */
  return text;
}

/* ---- sample order ------------------------------------------------------- */

/* Over the samples of one epoch (training-order block e, which is the samples
 * whose first token lies in epoch e), the inputs [start, start+seq) of the
 * samples cover every token of the train split exactly once. The train split's
 * token count is made a multiple of seq so the epoch blocks align exactly. */
static uint32_t len_pad_for_16(int d) {
  if (d > 0) return len_mixed(d);
  uint64_t rest = 0;
  for (int k = 1; k < 180; k++) rest += len_mixed(k); /* train split of "9,1" over 200 */
  return (uint32_t)(16 + (16 - rest % 16) % 16);
}

static int count_inputs(const corpus *c, const int32_t *all, int seq, uint64_t i0, uint64_t i1,
                        uint8_t *count) {
  memset(count, 0, (size_t)c->n_docs * TOKENS_PER_DOC_ID);
  for (uint64_t i = i0; i < i1; i++)
    for (int t = 0; t < seq; t++) {
      int32_t v = all[i * (uint64_t)(seq + 1) + (uint64_t)t] - c->base;
      REQUIRE(v >= 0 && v < c->n_docs * TOKENS_PER_DOC_ID, "token %d out of range", v);
      if (count[v] < 255) count[v]++;
    }
  return 0;
}

static int test_every_train_token_seen_once_per_epoch(void) {
  static corpus c;
  if (make_corpus(&c, "once", 200, 0, len_pad_for_16, 1000)) return 1;
  uint64_t T = corpus_tokens(&c, 0, 180);
  REQUIRE(T % 16 == 0, "T %" PRIu64, T);
  const int seq = 16;
  mt_gpt_dataset_spec s = spec_of(&c, "9,1", MT_SPLIT_TRAIN, seq, 3 * T / seq, 77, 1);
  mt_gpt_dataset *d;
  OK(mt_gpt_dataset_open(&d, &s));
  REQUIRE(mt_gpt_dataset_tokens_per_epoch(d) == T, "%" PRIu64 " tokens, want %" PRIu64,
          mt_gpt_dataset_tokens_per_epoch(d), T);
  int E = mt_gpt_dataset_epochs(d);
  REQUIRE(E == 4, "%d epochs for 3 epochs' worth + 1 token", E);
  int32_t *all = read_all(d, seq);
  REQUIRE(all, "read");
  uint8_t *count = malloc((size_t)c.n_docs * TOKENS_PER_DOC_ID);
  for (int e = 0; e < E - 1; e++) {
    uint64_t i0 = e * T / seq, i1 = (e + 1) * T / seq;
    if (count_inputs(&c, all, seq, i0, i1, count)) return 1;
    for (int doc = 0; doc < c.n_docs; doc++)
      for (uint32_t off = 0; off < (doc < 180 ? c.len[doc] : 0); off++)
        REQUIRE(count[doc * TOKENS_PER_DOC_ID + off] == 1,
                "epoch %d: doc %d offset %u seen %d times", e, doc, off,
                count[doc * TOKENS_PER_DOC_ID + off]);
    uint64_t total = 0;
    for (size_t v = 0; v < (size_t)c.n_docs * TOKENS_PER_DOC_ID; v++) total += count[v];
    REQUIRE(total == T, "epoch %d: %" PRIu64 " tokens seen, want %" PRIu64, e, total, T);
  }
  for (uint64_t i = 0; i < mt_gpt_dataset_len(d); i++)
    if (check_contiguous(&c, all + i * (seq + 1), seq, 0, 180)) return 1;
  mt_gpt_dataset_free(d);

  /* unaligned seq: each epoch's block still sees every token, except within
   * seq tokens of the epoch's two ends (the samples straddling epochs) */
  const int seq2 = 23;
  s = spec_of(&c, "9,1", MT_SPLIT_TRAIN, seq2, 2 * T / seq2 + 3, 78, 1);
  OK(mt_gpt_dataset_open(&d, &s));
  E = mt_gpt_dataset_epochs(d);
  free(all);
  all = read_all(d, seq2);
  REQUIRE(all, "read");
  for (int e = 0; e < E - 1; e++) {
    uint64_t i0 = ceil_div(e * T, seq2), i1 = ceil_div((e + 1) * T, seq2);
    if (count_inputs(&c, all, seq2, i0, i1, count)) return 1;
    uint64_t off_one = 0;
    for (int doc = 0; doc < 180; doc++)
      for (uint32_t off = 0; off < c.len[doc]; off++) {
        int n = count[doc * TOKENS_PER_DOC_ID + off];
        REQUIRE(n <= 2, "epoch %d: doc %d offset %u seen %d times", e, doc, off, n);
        off_one += n != 1;
      }
    REQUIRE(off_one <= 2 * (uint64_t)seq2, "epoch %d: %" PRIu64 " tokens not seen exactly once", e,
            off_one);
  }
  free(count);
  free(all);
  mt_gpt_dataset_free(d);
  return 0;
}

/* Sample i's last token is sample i+1's first in file order; shuffled, the
 * first tokens and the last tokens of all samples are the same multiset but
 * for the stream's very first and very last token. */
static int cmp_i32(const void *a, const void *b) {
  int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
  return (x > y) - (x < y);
}

static int test_samples_overlap_by_one_token(void) {
  static corpus c;
  if (make_corpus(&c, "overlap", 300, 0, len_mixed, 1000)) return 1;
  const int seq = 31;
  for (int shuffle = 0; shuffle <= 1; shuffle++) {
    mt_gpt_dataset_spec s = spec_of(&c, "949,50,1", MT_SPLIT_TRAIN, seq, 1000, 5, shuffle);
    mt_gpt_dataset *d;
    OK(mt_gpt_dataset_open(&d, &s));
    uint64_t n = mt_gpt_dataset_len(d);
    REQUIRE(n >= 1000, "len %" PRIu64, n);
    int32_t *all = read_all(d, seq);
    REQUIRE(all, "read");
    int32_t *firsts = malloc(n * sizeof *firsts), *lasts = malloc(n * sizeof *lasts);
    for (uint64_t i = 0; i < n; i++) {
      firsts[i] = all[i * (seq + 1)];
      lasts[i] = all[i * (seq + 1) + seq];
      if (check_contiguous(&c, all + i * (seq + 1), seq, 0, 285)) return 1;
      if (!shuffle && i + 1 < n)
        REQUIRE(lasts[i] == all[(i + 1) * (seq + 1)],
                "sample %" PRIu64 " ends with %d, next starts "
                "with %d",
                i, lasts[i], all[(i + 1) * (seq + 1)]);
    }
    qsort(firsts, n, sizeof *firsts, cmp_i32);
    qsort(lasts, n, sizeof *lasts, cmp_i32);
    uint64_t i = 0, j = 0, only_first = 0, only_last = 0;
    while (i < n || j < n) {
      if (j == n || (i < n && firsts[i] < lasts[j]))
        only_first++, i++;
      else if (i == n || lasts[j] < firsts[i])
        only_last++, j++;
      else
        i++, j++;
    }
    /* the samples' boundaries are one chain t0..tn: the first tokens are
     * t0..t(n-1), the last t1..tn, so at most t0 is unmatched (none when
     * t0 == tn); both lists hold n, so only_last always equals only_first */
    REQUIRE(only_first <= 1, "%" PRIu64 " first tokens unmatched by a last token", only_first);
    (void)only_last;
    free(firsts);
    free(lasts);
    free(all);
    mt_gpt_dataset_free(d);
  }
  return 0;
}

static int test_same_seed_same_order_and_other_seed_differs(void) {
  static corpus c;
  if (make_corpus(&c, "seed", 250, 0, len_mixed, 1000)) return 1;
  const int seq = 20;
  mt_gpt_dataset_spec s = spec_of(&c, "98,2,0", MT_SPLIT_TRAIN, seq, 2500, 1234, 1);
  mt_gpt_dataset *a, *b, *x;
  OK(mt_gpt_dataset_open(&a, &s));
  s.cache_dir = tmp_path("seed_cache_elsewhere"); /* built afresh, not loaded */
  OK(mt_gpt_dataset_open(&b, &s));
  REQUIRE(mt_gpt_dataset_cache_status(b) == MT_GPT_CACHE_BUILT, "status %d",
          mt_gpt_dataset_cache_status(b));
  s.seed = 1235;
  OK(mt_gpt_dataset_open(&x, &s));
  uint64_t n = mt_gpt_dataset_len(a);
  REQUIRE(n == mt_gpt_dataset_len(b) && n == mt_gpt_dataset_len(x), "lengths differ");
  int32_t *ta = read_all(a, seq), *tb = read_all(b, seq), *tx = read_all(x, seq);
  REQUIRE(ta && tb && tx, "read");
  size_t bytes = n * (seq + 1) * sizeof(int32_t);
  REQUIRE(!memcmp(ta, tb, bytes), "same seed, different samples");
  uint64_t same = 0;
  for (uint64_t i = 0; i < n; i++)
    same += !memcmp(ta + i * (seq + 1), tx + i * (seq + 1), (seq + 1) * sizeof(int32_t));
  REQUIRE(same < n / 20, "%" PRIu64 " of %" PRIu64 " samples equal under another seed", same, n);
  /* and the shuffle is not the identity */
  mt_gpt_dataset *f;
  s.shuffle = 0;
  OK(mt_gpt_dataset_open(&f, &s));
  int32_t *tf = read_all(f, seq);
  REQUIRE(tf && memcmp(ta, tf, bytes), "shuffled equals file order");
  free(ta), free(tb), free(tx), free(tf);
  mt_gpt_dataset_free(a), mt_gpt_dataset_free(b), mt_gpt_dataset_free(x), mt_gpt_dataset_free(f);
  return 0;
}

/* shuffle 0: sample i is tokens [i*seq, i*seq + seq + 1) of the split's
 * sequences in file order, repeated epoch after epoch, empty ones included. */
static int test_shuffle_false_reads_in_file_order(void) {
  static corpus c;
  if (make_corpus(&c, "order", 120, 500000, len_mixed, 1000)) return 1;
  const int seq = 13;
  /* "1,1,1" over 120: [0,40) [40,80) [80,120); read the valid split */
  uint64_t T = corpus_tokens(&c, 40, 80);
  mt_gpt_dataset_spec s = spec_of(&c, "1,1,1", MT_SPLIT_VALID, seq, 3 * T / seq + 1, 9, 0);
  mt_gpt_dataset *d;
  OK(mt_gpt_dataset_open(&d, &s));
  int E = mt_gpt_dataset_epochs(d);
  uint64_t n = mt_gpt_dataset_len(d);
  REQUIRE(E == 4 && n == (E * T - 1) / seq, "E %d n %" PRIu64 " T %" PRIu64, E, n, T);
  int32_t *stream = malloc(E * T * sizeof *stream);
  uint64_t k = 0;
  for (int e = 0; e < E; e++)
    for (int doc = 40; doc < 80; doc++)
      for (uint32_t off = 0; off < c.len[doc]; off++) stream[k++] = token_of(&c, doc, off);
  int32_t *all = read_all(d, seq);
  REQUIRE(all, "read");
  for (uint64_t i = 0; i < n; i++)
    REQUIRE(!memcmp(all + i * (seq + 1), stream + i * seq, (seq + 1) * sizeof *all),
            "sample %" PRIu64 " is not stream tokens [%" PRIu64 ", +%d]", i, i * seq, seq + 1);
  free(stream);
  free(all);
  mt_gpt_dataset_free(d);
  return 0;
}

static int test_split_ratios_partition_sequences(void) {
  /* expectations from Megatron's get_train_valid_test_split_ (Python) */
  static const struct {
    const char *split;
    uint64_t n, b[4];
  } cases[] = {
      {"949,50,1", 1000, {0, 949, 999, 1000}},
      {"949,50,1", 200, {0, 190, 200, 200}},
      {"9,1", 200, {0, 180, 200, 200}},
      {"1,1", 3, {0, 1, 3, 3}},
      {"1,1,1", 10, {0, 4, 7, 10}},
      {"969, 30, 1", 7, {0, 7, 7, 7}},
      {"98/2/0", 50, {0, 49, 50, 50}},
      {"1", 5, {0, 5, 5, 5}},
      {"949,50,1", 12345, {0, 11716, 12333, 12345}},
      {"5,3,2", 5, {0, 2, 4, 5}},
      {NULL, 9, {0, 9, 9, 9}},
      {"", 9, {0, 9, 9, 9}},
      /* Megatron gives [0, -1, 1, 3] (its valid split would read doc -1); we clamp */
      {"0,1,1", 3, {0, 0, 1, 3}},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
    for (int w = 0; w < 3; w++) {
      uint64_t f, e;
      OK(mt_gpt_split_seqs(cases[i].split, cases[i].n, (mt_split)w, &f, &e));
      REQUIRE(f == cases[i].b[w] && e == cases[i].b[w + 1],
              "\"%s\" over %" PRIu64 ", split %d: [%" PRIu64 ", %" PRIu64 "), want [%" PRIu64
              ", %" PRIu64 ")",
              cases[i].split ? cases[i].split : "(null)", cases[i].n, w, f, e, cases[i].b[w],
              cases[i].b[w + 1]);
    }
  /* any ratios and size: three adjacent ranges covering [0, n) */
  for (uint64_t n = 0; n < 60; n++)
    for (int a = 0; a < 6; a++)
      for (int b = 0; b < 6; b++)
        for (int t = 0; t < 6; t++) {
          if (a + b + t == 0) continue;
          char sp[64];
          snprintf(sp, sizeof sp, "%d,%d,%d", a, b, t);
          uint64_t prev = 0, f, e;
          for (int w = 0; w < 3; w++) {
            OK(mt_gpt_split_seqs(sp, n, (mt_split)w, &f, &e));
            REQUIRE(f == prev && e >= f,
                    "\"%s\" over %" PRIu64 ": split %d is [%" PRIu64 ", %" PRIu64
                    ") after %" PRIu64,
                    sp, n, w, f, e, prev);
            prev = e;
          }
          REQUIRE(prev == n, "\"%s\" over %" PRIu64 " ends at %" PRIu64, sp, n, prev);
        }
  static const char *bad[] = {"a,b", "1,2,3,4", "-1,2", "1,,2", "0,0,0", "1;2", "inf,1"};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    uint64_t f, e;
    REQUIRE(mt_gpt_split_seqs(bad[i], 10, MT_SPLIT_TRAIN, &f, &e) == MT_EINVAL &&
                strstr(mt_errmsg(), bad[i]),
            "\"%s\" accepted or unnamed: %s", bad[i], mt_errmsg());
  }

  /* each split's dataset reads only its own sequences (one per document here) */
  static corpus c;
  if (make_corpus(&c, "split", 100, 0, len_mixed, 1000)) return 1;
  const int seq = 8;
  for (int w = 0; w < 3; w++) {
    uint64_t lo[3] = {0, 80, 95}, hi[3] = {80, 95, 100};
    mt_gpt_dataset_spec s = spec_of(&c, "80,15,5", (mt_split)w, seq, 50, 3, 1);
    mt_gpt_dataset *d;
    OK(mt_gpt_dataset_open(&d, &s));
    REQUIRE(mt_gpt_dataset_tokens_per_epoch(d) == corpus_tokens(&c, (int)lo[w], (int)hi[w]),
            "split %d tokens", w);
    int32_t *all = read_all(d, seq);
    REQUIRE(all, "read");
    for (uint64_t i = 0; i < mt_gpt_dataset_len(d); i++)
      if (check_contiguous(&c, all + i * (seq + 1), seq, (int)lo[w], (int)hi[w])) return 1;
    free(all);
    mt_gpt_dataset_free(d);
  }
  mt_gpt_dataset_spec s = spec_of(&c, "100,0,0", MT_SPLIT_VALID, seq, 10, 3, 1);
  mt_gpt_dataset *d;
  REQUIRE(mt_gpt_dataset_open(&d, &s) == MT_EINVAL && strstr(mt_errmsg(), "no sequences") &&
              strstr(mt_errmsg(), "valid"),
          "empty split: %s", mt_errmsg());
  return 0;
}

/* Rewrites prefix.idx with the document index cut to [0], as Megatron's old
 * MMapIndexedDatasetBuilder.merge_file_ leaves it (sizes copied, doc_idx not). */
static int cut_doc_idx_to_0(const char *prefix) {
  char path[300];
  snprintf(path, sizeof path, "%s.idx", prefix);
  FILE *fp = fopen(path, "r+b");
  REQUIRE(fp, "open %s: %s", path, strerror(errno));
  uint64_t n, one = 1;
  REQUIRE(fseek(fp, 18, SEEK_SET) == 0 && fread(&n, 8, 1, fp) == 1, "read N");
  REQUIRE(fseek(fp, 26, SEEK_SET) == 0 && fwrite(&one, 8, 1, fp) == 1 && fclose(fp) == 0,
          "write D+1");
  REQUIRE(truncate(path, (off_t)(34 + 12 * n + 8)) == 0, "truncate %s: %s", path, strerror(errno));
  return 0;
}

/* doc_idx [0] over N > 0 sequences: the dataset opens, reads every sequence
 * in file order, and gives the same samples as the full doc_idx would. */
static int test_doc_idx_of_only_0_reads_every_sequence(void) {
  static corpus c, full;
  if (make_corpus(&c, "merged", 30, 0, len_mixed, 1000)) return 1;
  if (make_corpus(&full, "merged_full", 30, 0, len_mixed, 1000)) return 1;
  if (cut_doc_idx_to_0(c.prefix)) return 1;
  mt_indexed x;
  OK(mt_indexed_open(&x, c.prefix));
  REQUIRE(x.n_seqs == 30 && x.n_docs == 0, "N %" PRIu64 " D %" PRIu64, x.n_seqs, x.n_docs);
  mt_indexed_close(&x);
  const int seq = 9;
  uint64_t T = corpus_tokens(&c, 0, 30);
  mt_gpt_dataset_spec s = spec_of(&c, "1", MT_SPLIT_TRAIN, seq, T / seq, 4, 0);
  mt_gpt_dataset *d;
  OK(mt_gpt_dataset_open(&d, &s));
  REQUIRE(mt_gpt_dataset_tokens_per_epoch(d) == T, "%" PRIu64 " tokens, want %" PRIu64,
          mt_gpt_dataset_tokens_per_epoch(d), T);
  uint64_t n = mt_gpt_dataset_len(d);
  int32_t *stream = malloc(2 * T * sizeof *stream);
  uint64_t k = 0;
  for (int e = 0; e < 2; e++)
    for (int doc = 0; doc < 30; doc++)
      for (uint32_t off = 0; off < c.len[doc]; off++) stream[k++] = token_of(&c, doc, off);
  int32_t *all = read_all(d, seq);
  REQUIRE(all && n * seq + 1 <= k, "read %" PRIu64 " samples", n);
  for (uint64_t i = 0; i < n; i++)
    REQUIRE(!memcmp(all + i * (seq + 1), stream + i * seq, (seq + 1) * sizeof *all),
            "sample %" PRIu64 " is not stream tokens [%" PRIu64 ", +%d]", i, i * seq, seq + 1);
  mt_gpt_dataset_free(d);
  free(all);
  free(stream);
  /* shuffled, the samples are those of the same data with its full doc_idx */
  mt_gpt_dataset *a, *b;
  s = spec_of(&c, "8,2", MT_SPLIT_TRAIN, seq, 200, 4, 1);
  OK(mt_gpt_dataset_open(&a, &s));
  s.prefix = full.prefix;
  OK(mt_gpt_dataset_open(&b, &s));
  n = mt_gpt_dataset_len(a);
  REQUIRE(n == mt_gpt_dataset_len(b), "len %" PRIu64 " vs %" PRIu64, n, mt_gpt_dataset_len(b));
  int32_t *ta = read_all(a, seq), *tb = read_all(b, seq);
  REQUIRE(ta && tb && !memcmp(ta, tb, n * (seq + 1) * sizeof *ta),
          "doc_idx [0] gives other samples than the full doc_idx");
  free(ta), free(tb);
  mt_gpt_dataset_free(a), mt_gpt_dataset_free(b);
  return 0;
}

/* 10 empty documents (repeated doc_idx entries, no sequence) then 10
 * one-sequence documents: D = 20, N = 10. Megatron splits "8,2" over the
 * N = 10 sequences: train [0, 8), valid [8, 10). Over the 20 documents the
 * train split would end at document 16, sequence 6. */
static int test_split_counts_sequences_not_empty_documents(void) {
  static corpus c;
  memset(&c, 0, sizeof c);
  snprintf(c.prefix, sizeof c.prefix, "%s", tmp_path("empty_docs"));
  c.n_docs = 10;
  mt_indexed_writer *w;
  OK(mt_indexed_writer_open(&w, c.prefix, MT_IDX_I32));
  for (int e = 0; e < 10; e++) OK(mt_indexed_writer_end_doc(w));
  int32_t buf[TOKENS_PER_DOC_ID];
  for (int q = 0; q < 10; q++) {
    c.len[q] = 5 + (uint32_t)q;
    for (uint32_t t = 0; t < c.len[q]; t++) buf[t] = token_of(&c, (uint64_t)q, t);
    OK(mt_indexed_writer_add_seq(w, buf, c.len[q]));
    OK(mt_indexed_writer_end_doc(w));
  }
  OK(mt_indexed_writer_finish(w));
  mt_indexed x;
  OK(mt_indexed_open(&x, c.prefix));
  REQUIRE(x.n_seqs == 10 && x.n_docs == 20, "N %" PRIu64 " D %" PRIu64, x.n_seqs, x.n_docs);
  mt_indexed_close(&x);
  const int seq = 4;
  uint64_t lo[2] = {0, 8}, hi[2] = {8, 10};
  for (int which = 0; which < 2; which++) {
    mt_gpt_dataset_spec s = spec_of(&c, "8,2", (mt_split)which, seq, 30, 6, 1);
    mt_gpt_dataset *d;
    OK(mt_gpt_dataset_open(&d, &s));
    uint64_t T = corpus_tokens(&c, (int)lo[which], (int)hi[which]);
    REQUIRE(mt_gpt_dataset_tokens_per_epoch(d) == T,
            "%s split: %" PRIu64 " tokens, want %" PRIu64 " (sequences [%" PRIu64 ", %" PRIu64 "))",
            which ? "valid" : "train", mt_gpt_dataset_tokens_per_epoch(d), T, lo[which], hi[which]);
    int32_t *all = read_all(d, seq);
    REQUIRE(all, "read");
    for (uint64_t i = 0; i < mt_gpt_dataset_len(d); i++)
      if (check_contiguous(&c, all + i * (seq + 1), seq, (int)lo[which], (int)hi[which])) return 1;
    free(all);
    mt_gpt_dataset_free(d);
  }
  return 0;
}

static int test_epochs_added_when_data_run_out(void) {
  static corpus c;
  if (make_corpus(&c, "epochs", 60, 0, len_short, 1000)) return 1;
  const int seq = 10;
  uint64_t T = corpus_tokens(&c, 0, 60);
  uint64_t ns[] = {0, 1, (T - 1) / seq, (T - 1) / seq + 1, 5 * T / seq, 20 * T / seq + 7};
  for (size_t i = 0; i < sizeof ns / sizeof ns[0]; i++) {
    mt_gpt_dataset_spec s = spec_of(&c, "1", MT_SPLIT_TRAIN, seq, ns[i], 11, 1);
    mt_gpt_dataset *d;
    OK(mt_gpt_dataset_open(&d, &s));
    uint64_t E = (uint64_t)mt_gpt_dataset_epochs(d), n = mt_gpt_dataset_len(d);
    REQUIRE(n == (E * T - 1) / seq && n >= ns[i],
            "n_samples %" PRIu64 ": len %" PRIu64 " E %" PRIu64, ns[i], n, E);
    REQUIRE(E == 1 || ((E - 1) * T - 1) / seq < ns[i],
            "n_samples %" PRIu64 ": %" PRIu64 " epochs, one fewer suffices", ns[i], E);
    /* every epoch holds every document: each token's count over the whole
     * stream's inputs is E or E-1 (the last < seq tokens are no input) */
    int32_t *all = read_all(d, seq);
    REQUIRE(all, "read");
    static uint8_t count[60 * TOKENS_PER_DOC_ID];
    if (count_inputs(&c, all, seq, 0, n, count)) return 1;
    uint64_t short_by_one = 0;
    for (int doc = 0; doc < 60; doc++)
      for (uint32_t off = 0; off < c.len[doc]; off++) {
        uint64_t k = count[doc * TOKENS_PER_DOC_ID + off];
        REQUIRE(k == E || k + 1 == E,
                "doc %d offset %u seen %" PRIu64 " times in %" PRIu64 " epochs", doc, off, k, E);
        short_by_one += k + 1 == E;
      }
    REQUIRE(short_by_one == E * T - n * seq, "%" PRIu64 " tokens short, want %" PRIu64,
            short_by_one, E * T - n * seq);
    free(all);
    mt_gpt_dataset_free(d);
  }
  return 0;
}

/* Sizing a dataset for more samples adds epochs after the ones it has and
 * changes none of the positions it had: a run given more steps, or resumed
 * with a smaller global batch, reads on where the shorter one stopped, and
 * trains on the samples the run planned long from the start would have. The
 * old last epoch is the one at risk: its sample straddling into the next
 * epoch exists only once a next epoch does. */
static int test_sizing_for_more_epochs_keeps_every_earlier_position(void) {
  static corpus c;
  if (make_corpus(&c, "grow", 120, 0, len_mixed, 1000)) return 1;
  const int seqs[] = {16, 23};
  for (size_t si = 0; si < sizeof seqs / sizeof seqs[0]; si++)
    for (uint64_t seed = 1; seed <= 4; seed++) {
      int seq = seqs[si];
      uint64_t T = corpus_tokens(&c, 0, 108); /* the train split of "9,1" */
      mt_gpt_dataset *d[3];
      for (int e = 1; e <= 3; e++) { /* sized for exactly e epochs' samples */
        mt_gpt_dataset_spec s = spec_of(&c, "9,1", MT_SPLIT_TRAIN, seq, (e * T - 1) / seq, seed, 1);
        OK(mt_gpt_dataset_open(&d[e - 1], &s));
        REQUIRE(mt_gpt_dataset_epochs(d[e - 1]) == e, "seq %d: %d epochs, want %d", seq,
                mt_gpt_dataset_epochs(d[e - 1]), e);
      }
      int32_t *all[3];
      for (int e = 0; e < 3; e++) {
        all[e] = read_all(d[e], seq);
        REQUIRE(all[e], "read");
      }
      for (int e = 0; e < 2; e++)
        for (int f = e + 1; f < 3; f++)
          for (uint64_t i = 0; i < mt_gpt_dataset_len(d[e]); i++)
            REQUIRE(!memcmp(all[e] + i * (seq + 1), all[f] + i * (seq + 1),
                            (size_t)(seq + 1) * sizeof(int32_t)),
                    "seq %d seed %" PRIu64 ": position %" PRIu64 " of %" PRIu64
                    " differs sized for %d and %d epochs",
                    seq, seed, i, mt_gpt_dataset_len(d[e]), e + 1, f + 1);
      for (int e = 0; e < 3; e++) free(all[e]), mt_gpt_dataset_free(d[e]);
    }
  return 0;
}

/* The same across a blend: a blend of n samples, each dataset sized with
 * mt_blend_counts, is a prefix of the blend of 3n. n is chosen so that dataset
 * 0 is read to the end of its only epoch. */
static int test_longer_blend_starts_with_the_shorter_one(void) {
  static corpus cs[2];
  const double w[2] = {0.6, 0.4};
  const int seq = 8;
  for (int k = 0; k < 2; k++) {
    char name[32];
    snprintf(name, sizeof name, "grow_blend%d", k);
    if (make_corpus(&cs[k], name, 40 + 20 * k, 10000000 * k, len_mixed, 1000)) return 1;
  }
  uint64_t len1 = (corpus_tokens(&cs[0], 0, cs[0].n_docs) - 1) / seq, counts[2], n = 1;
  OK(mt_blend_counts(w, 2, n, counts));
  while (counts[0] < len1) OK(mt_blend_counts(w, 2, ++n, counts));
  mt_gpt_dataset *sets[2][2];
  mt_blend *b[2];
  for (int r = 0; r < 2; r++) {
    uint64_t total = r ? 3 * n : n;
    OK(mt_blend_counts(w, 2, total, counts));
    for (int k = 0; k < 2; k++) {
      mt_gpt_dataset_spec s = spec_of(&cs[k], "1", MT_SPLIT_TRAIN, seq, counts[k], 200 + k, 1);
      OK(mt_gpt_dataset_open(&sets[r][k], &s));
    }
    OK(mt_blend_open(&b[r], sets[r], w, 2, total));
  }
  REQUIRE(mt_gpt_dataset_epochs(sets[0][0]) == 1 && mt_gpt_dataset_epochs(sets[1][0]) >= 3,
          "dataset 0 has %d and %d epochs", mt_gpt_dataset_epochs(sets[0][0]),
          mt_gpt_dataset_epochs(sets[1][0]));
  int32_t x[9], y[9];
  for (uint64_t i = 0; i < n; i++) {
    int kx, ky;
    OK(mt_blend_sample(b[0], i, x, &kx));
    OK(mt_blend_sample(b[1], i, y, &ky));
    REQUIRE(kx == ky && !memcmp(x, y, sizeof x), "global sample %" PRIu64 " of %" PRIu64 " differs",
            i, n);
  }
  for (int r = 0; r < 2; r++) {
    mt_blend_free(b[r]);
    for (int k = 0; k < 2; k++) mt_gpt_dataset_free(sets[r][k]);
  }
  return 0;
}

/* ---- cache --------------------------------------------------------------- */

static int file_stat(const char *path, struct stat *st) {
  REQUIRE(stat(path, st) == 0, "stat %s: %s", path, strerror(errno));
  return 0;
}

static int open_status(mt_gpt_dataset_spec *s, int want, char *path_out) {
  mt_gpt_dataset *d;
  OK(mt_gpt_dataset_open(&d, s));
  int st = mt_gpt_dataset_cache_status(d);
  if (path_out) snprintf(path_out, 512, "%s", mt_gpt_dataset_cache_path(d));
  mt_gpt_dataset_free(d);
  REQUIRE(st == want, "cache status %d, want %d", st, want);
  return 0;
}

static int test_cache_reused_and_rebuilt_when_description_changes(void) {
  static corpus c;
  if (make_corpus(&c, "cache", 80, 0, len_mixed, 1000)) return 1;
  const int seq = 16;
  uint64_t T = corpus_tokens(&c, 0, 76); /* "949,50,1" over 80 -> [0, 76) */
  uint64_t n2 = 2 * T / seq - 3;         /* two epochs, with room for one more sample */
  mt_gpt_dataset_spec s = spec_of(&c, "949,50,1", MT_SPLIT_TRAIN, seq, n2, 1, 1);
  char p1[512], p2[512];
  if (open_status(&s, MT_GPT_CACHE_BUILT, p1)) return 1;
  REQUIRE(strstr(p1, tmpdir) == p1 && strstr(p1, "/cache.") && strstr(p1, ".gptidx"),
          "cache path %s is not beside the data", p1);
  struct stat a, b;
  if (file_stat(p1, &a)) return 1;
  usleep(20000);
  if (open_status(&s, MT_GPT_CACHE_LOADED, p2)) return 1;
  if (file_stat(p2, &b)) return 1;
  REQUIRE(!strcmp(p1, p2) && a.st_ino == b.st_ino && a.st_mtim.tv_nsec == b.st_mtim.tv_nsec &&
              a.st_mtim.tv_sec == b.st_mtim.tv_sec,
          "cache rewritten on a second open");
  /* more samples within the same epochs: the same indices, the same file */
  s.n_samples = n2 + 1;
  if (open_status(&s, MT_GPT_CACHE_LOADED, p2)) return 1;
  REQUIRE(!strcmp(p1, p2), "%s vs %s", p1, p2);
  /* each part of the description makes another file */
  s.n_samples = 5 * T / seq; /* more epochs */
  if (open_status(&s, MT_GPT_CACHE_BUILT, p2)) return 1;
  REQUIRE(strcmp(p1, p2), "same path for more epochs");
  s.n_samples = n2;
  char seen[8][512];
  int n_seen = 0;
  snprintf(seen[n_seen++], 512, "%s", p1);
  for (int change = 0; change < 5; change++) {
    mt_gpt_dataset_spec t = s;
    if (change == 0) t.seed = 2;
    if (change == 1) t.seq = 17;
    if (change == 2) t.shuffle = 0;
    if (change == 3) t.split = "90,10,0";
    if (change == 4) t.which = MT_SPLIT_VALID;
    if (open_status(&t, MT_GPT_CACHE_BUILT, p2)) return 1;
    for (int k = 0; k < n_seen; k++)
      REQUIRE(strcmp(seen[k], p2), "change %d reuses %s", change, p2);
    snprintf(seen[n_seen++], 512, "%s", p2);
  }
  /* the data changing (its mtime) is a new description */
  char idx[300];
  snprintf(idx, sizeof idx, "%s.idx", c.prefix);
  struct timespec ts[2] = {{1000000000, 0}, {1000000000, 0}};
  REQUIRE(utimensat(AT_FDCWD, idx, ts, 0) == 0, "utimensat: %s", strerror(errno));
  if (open_status(&s, MT_GPT_CACHE_BUILT, p2)) return 1;
  REQUIRE(strcmp(p1, p2), "same path after the data changed");
  if (open_status(&s, MT_GPT_CACHE_LOADED, NULL)) return 1;
  /* cache_dir puts it there, created if missing */
  s.cache_dir = tmp_path("cachedir");
  if (open_status(&s, MT_GPT_CACHE_BUILT, p2)) return 1;
  REQUIRE(strstr(p2, s.cache_dir) == p2, "%s not under %s", p2, s.cache_dir);
  if (open_status(&s, MT_GPT_CACHE_LOADED, NULL)) return 1;
  return 0;
}

/* Two datasets with the same basename, size and mtime in two directories,
 * sharing one cache_dir: each gets its own index (the cache key holds the
 * files' inodes), and each reads its own tokens. */
static int test_same_name_size_mtime_in_other_directory_gets_its_own_cache(void) {
  static corpus a, b;
  REQUIRE(mkdir(tmp_path("twin_a"), 0755) == 0 && mkdir(tmp_path("twin_b"), 0755) == 0, "mkdir: %s",
          strerror(errno));
  if (make_corpus(&a, "twin_a/twin", 40, 0, len_mixed, 1000)) return 1;
  if (make_corpus(&b, "twin_b/twin", 40, 7000000, len_mixed, 1000)) return 1;
  struct timespec ts[2] = {{1000000000, 0}, {1000000000, 0}};
  const char *exts[2] = {".idx", ".bin"};
  for (int k = 0; k < 2; k++) {
    char pa[300], pb[300];
    snprintf(pa, sizeof pa, "%s%s", a.prefix, exts[k]);
    snprintf(pb, sizeof pb, "%s%s", b.prefix, exts[k]);
    REQUIRE(utimensat(AT_FDCWD, pa, ts, 0) == 0 && utimensat(AT_FDCWD, pb, ts, 0) == 0,
            "utimensat: %s", strerror(errno));
    struct stat sa, sb;
    if (file_stat(pa, &sa) || file_stat(pb, &sb)) return 1;
    REQUIRE(sa.st_size == sb.st_size, "%s and %s differ in size", pa, pb);
  }
  const int seq = 8;
  mt_gpt_dataset_spec s = spec_of(&a, "1", MT_SPLIT_TRAIN, seq, 50, 3, 1);
  s.cache_dir = tmp_path("twin_cache");
  char p1[512], p2[512];
  if (open_status(&s, MT_GPT_CACHE_BUILT, p1)) return 1;
  s.prefix = b.prefix;
  if (open_status(&s, MT_GPT_CACHE_BUILT, p2)) return 1;
  REQUIRE(strcmp(p1, p2), "both datasets share the index %s", p1);
  mt_gpt_dataset *d;
  OK(mt_gpt_dataset_open(&d, &s));
  int32_t *all = read_all(d, seq);
  REQUIRE(all, "read");
  for (uint64_t i = 0; i < mt_gpt_dataset_len(d); i++)
    if (check_contiguous(&b, all + i * (seq + 1), seq, 0, 40)) return 1;
  free(all);
  mt_gpt_dataset_free(d);
  return 0;
}

static int write_at(const char *path, long off, const void *buf, size_t n) {
  int fd = open(path, O_WRONLY);
  REQUIRE(fd >= 0 && pwrite(fd, buf, n, off) == (ssize_t)n, "pwrite %s", path);
  close(fd);
  return 0;
}

static int test_corrupt_cache_is_rebuilt_with_warning(void) {
  static corpus c;
  if (make_corpus(&c, "corrupt", 90, 0, len_mixed, 1000)) return 1;
  const int seq = 12;
  mt_gpt_dataset_spec s = spec_of(&c, "1", MT_SPLIT_TRAIN, seq, 700, 3, 1);
  mt_gpt_dataset *d;
  OK(mt_gpt_dataset_open(&d, &s));
  char path[512];
  snprintf(path, sizeof path, "%s", mt_gpt_dataset_cache_path(d));
  int32_t *want = read_all(d, seq);
  REQUIRE(want, "read");
  uint64_t n = mt_gpt_dataset_len(d);
  mt_gpt_dataset_free(d);
  struct stat st;
  if (file_stat(path, &st)) return 1;

  static const struct {
    const char *what, *needle;
  } damage[] = {{"flip", "checksum"},
                {"truncate", "bytes"},
                {"describe", "description changed"},
                {"garbage", "not a .gptidx"},
                {"empty", "shorter"}};
  for (size_t k = 0; k < sizeof damage / sizeof damage[0]; k++) {
    const char *what = damage[k].what;
    if (!strcmp(what, "flip")) {
      uint8_t x = 0x5a;
      if (write_at(path, (long)st.st_size / 2, &x, 1)) return 1;
    } else if (!strcmp(what, "truncate")) {
      REQUIRE(truncate(path, st.st_size - 100) == 0, "truncate");
    } else if (!strcmp(what, "describe")) {
      if (write_at(path, 128 + 2, "X", 1)) return 1; /* inside the description JSON */
    } else if (!strcmp(what, "garbage")) {
      char junk[4096];
      memset(junk, 'j', sizeof junk);
      if (write_at(path, 0, junk, sizeof junk)) return 1;
    } else {
      REQUIRE(truncate(path, 0) == 0, "truncate");
    }
    capture_begin();
    int rc = mt_gpt_dataset_open(&d, &s);
    const char *err = capture_end();
    OK(rc);
    REQUIRE(mt_gpt_dataset_cache_status(d) == MT_GPT_CACHE_REBUILT, "%s: status %d", what,
            mt_gpt_dataset_cache_status(d));
    REQUIRE(strstr(err, "warn") && strstr(err, path) && strstr(err, damage[k].needle) &&
                strstr(err, "rebuild"),
            "%s: warning \"%s\" lacks the path or \"%s\"", what, err, damage[k].needle);
    int32_t *got = read_all(d, seq);
    REQUIRE(got && mt_gpt_dataset_len(d) == n && !memcmp(got, want, n * (seq + 1) * sizeof *got),
            "%s: other samples", what);
    free(got);
    mt_gpt_dataset_free(d);
    if (open_status(&s, MT_GPT_CACHE_LOADED, NULL)) return 1; /* repaired on disk */
  }
  free(want);
  return 0;
}

/* A corpus named name, *d opened over it with its index cached beside it
 * (the reference), and *s the same spec with a cache_dir that cannot exist
 * (a directory under the regular file `blocker`). */
static int open_with_unwritable_cache(corpus *c, const char *name, const char *blocker,
                                      mt_gpt_dataset_spec *s, mt_gpt_dataset **d) {
  if (make_corpus(c, name, 40, 0, len_mixed, 1000)) return 1;
  FILE *fp = fopen(tmp_path(blocker), "w");
  REQUIRE(fp, "create %s", blocker);
  fclose(fp);
  *s = spec_of(c, "1", MT_SPLIT_TRAIN, 9, 300, 4, 1);
  OK(mt_gpt_dataset_open(d, s));
  static char dir[256];
  snprintf(dir, sizeof dir, "%s/sub", tmp_path(blocker));
  s->cache_dir = dir;
  return 0;
}

/* Whether a and b (seq 9) give the same samples. */
static int same_samples(const mt_gpt_dataset *a, const mt_gpt_dataset *b) {
  int32_t *x = read_all(a, 9), *y = read_all(b, 9);
  int same = x && y && mt_gpt_dataset_len(a) == mt_gpt_dataset_len(b) &&
             !memcmp(x, y, mt_gpt_dataset_len(a) * 10 * sizeof *x);
  free(x), free(y);
  return same;
}

static int test_unwritable_cache_keeps_index_in_memory(void) {
  static corpus c;
  mt_gpt_dataset_spec s;
  mt_gpt_dataset *d, *e;
  if (open_with_unwritable_cache(&c, "nocache", "a_file", &s, &d)) return 1;
  capture_begin();
  int rc = mt_gpt_dataset_open(&e, &s);
  const char *err = capture_end();
  OK(rc);
  REQUIRE(mt_gpt_dataset_cache_status(e) == MT_GPT_CACHE_MEMORY, "status %d",
          mt_gpt_dataset_cache_status(e));
  REQUIRE(strstr(err, "in memory"), "no warning: %s", err);
  REQUIRE(same_samples(d, e), "samples differ");
  mt_gpt_dataset_free(d);
  mt_gpt_dataset_free(e);
  return 0;
}

/* A dataset whose cache_dir (or whose own directory, as on read-only
 * shared storage) cannot take the index puts it in cache_fallback (the
 * node's state_dir), and the next open loads it from there instead of
 * building it again. */
static int test_unwritable_cache_falls_back_to_the_state_dir(void) {
  static corpus c;
  mt_gpt_dataset_spec s;
  mt_gpt_dataset *d, *e, *f;
  if (open_with_unwritable_cache(&c, "fallback", "b_file", &s, &d)) return 1;
  char fallback[512];
  snprintf(fallback, sizeof fallback, "%s", tmp_path("state/index-cache"));
  mkdir(tmp_path("state"), 0755);
  s.cache_fallback = fallback;
  capture_begin();
  int rc = mt_gpt_dataset_open(&e, &s);
  const char *err = capture_end();
  OK(rc);
  REQUIRE(mt_gpt_dataset_cache_status(e) == MT_GPT_CACHE_BUILT, "status %d: %s",
          mt_gpt_dataset_cache_status(e), err);
  REQUIRE(strstr(mt_gpt_dataset_cache_path(e), fallback) == mt_gpt_dataset_cache_path(e),
          "cached at %s, not under %s", mt_gpt_dataset_cache_path(e), fallback);
  REQUIRE(strstr(err, "caching it in"), "no note: %s", err);
  OK(mt_gpt_dataset_open(&f, &s));
  REQUIRE(mt_gpt_dataset_cache_status(f) == MT_GPT_CACHE_LOADED, "reopened: status %d",
          mt_gpt_dataset_cache_status(f));
  REQUIRE(same_samples(d, f), "samples differ");
  mt_gpt_dataset_free(d);
  mt_gpt_dataset_free(e);
  mt_gpt_dataset_free(f);
  return 0;
}

typedef struct reader {
  const mt_gpt_dataset *d;
  int seq, stride, first;
  const int32_t *want;
  int bad;
} reader;

static void *read_thread(void *arg) {
  reader *r = arg;
  int32_t buf[64];
  for (uint64_t i = (uint64_t)r->first; i < mt_gpt_dataset_len(r->d); i += (uint64_t)r->stride)
    if (mt_gpt_dataset_sample(r->d, i, buf) ||
        memcmp(buf, r->want + i * (r->seq + 1), (r->seq + 1) * sizeof *buf))
      r->bad++;
  return NULL;
}

static int test_concurrent_reads_match_serial(void) {
  static corpus c;
  if (make_corpus(&c, "threads", 200, 0, len_mixed, 30)) return 1;
  const int seq = 40;
  mt_gpt_dataset_spec s = spec_of(&c, "1", MT_SPLIT_TRAIN, seq, 3000, 8, 1);
  mt_gpt_dataset *d;
  OK(mt_gpt_dataset_open(&d, &s));
  int32_t *want = read_all(d, seq);
  REQUIRE(want, "read");
  pthread_t th[4];
  reader r[4];
  for (int t = 0; t < 4; t++) {
    r[t] = (reader){d, seq, 4, t, want, 0};
    pthread_create(&th[t], NULL, read_thread, &r[t]);
  }
  int bad = 0;
  for (int t = 0; t < 4; t++) pthread_join(th[t], NULL), bad += r[t].bad;
  REQUIRE(bad == 0, "%d samples differ when read from 4 threads", bad);
  free(want);
  mt_gpt_dataset_free(d);
  return 0;
}

static int test_open_refuses_bad_specs(void) {
  static corpus c;
  if (make_corpus(&c, "bad", 10, 0, len_mixed, 1000)) return 1;
  mt_gpt_dataset *d;
  mt_gpt_dataset_spec s = spec_of(&c, "1", MT_SPLIT_TRAIN, 0, 10, 1, 1);
  REQUIRE(mt_gpt_dataset_open(&d, &s) == MT_EINVAL && strstr(mt_errmsg(), "seq"), "seq 0: %s",
          mt_errmsg());
  s = spec_of(&c, "1,x", MT_SPLIT_TRAIN, 8, 10, 1, 1);
  REQUIRE(mt_gpt_dataset_open(&d, &s) == MT_EINVAL && strstr(mt_errmsg(), "1,x"), "split: %s",
          mt_errmsg());
  s.prefix = tmp_path("no_such_dataset");
  s.split = "1";
  int rc = mt_gpt_dataset_open(&d, &s);
  REQUIRE(rc == MT_ENOENT && strstr(mt_errmsg(), "no_such_dataset"), "missing: %d %s", rc,
          mt_errmsg());
  s = spec_of(&c, "1", MT_SPLIT_TRAIN, 8, UINT64_MAX / 4, 1, 1);
  REQUIRE(mt_gpt_dataset_open(&d, &s) == MT_EINVAL && strstr(mt_errmsg(), "epochs"), "huge: %s",
          mt_errmsg());
  s = spec_of(&c, "1", MT_SPLIT_TRAIN, 8, 10, 1, 1);
  OK(mt_gpt_dataset_open(&d, &s));
  int32_t buf[9];
  REQUIRE(mt_gpt_dataset_sample(d, mt_gpt_dataset_len(d), buf) == MT_EINVAL, "past the end read");
  mt_gpt_dataset_free(d);
  return 0;
}

/* ---- blending ------------------------------------------------------------ */

enum { BLEND_N = 10000 };

/* Opens datasets k = 0..n-1 (corpus base k * 10^7) sized for the blend. */
static int open_blend_sets(const double *w, int n, uint64_t n_samples, corpus *cs,
                           mt_gpt_dataset **sets) {
  uint64_t counts[8];
  OK(mt_blend_counts(w, n, n_samples, counts));
  for (int k = 0; k < n; k++) {
    char name[32];
    snprintf(name, sizeof name, "blend%d", k);
    if (cs[k].n_docs == 0 && make_corpus(&cs[k], name, 50 + 10 * k, 10000000 * k, len_mixed, 1000))
      return 1;
    mt_gpt_dataset_spec s = spec_of(&cs[k], "1", MT_SPLIT_TRAIN, 8, counts[k], 100 + k, 1);
    OK(mt_gpt_dataset_open(&sets[k], &s));
  }
  return 0;
}

static int test_blend_shares_within_half_percent_over_10000_samples(void) {
  static const struct {
    int n;
    double w[4];
  } cases[] = {{3, {0.5, 0.3, 0.2}},    {3, {0.7, 0.29, 0.01}}, {3, {1, 1, 1}},
               {4, {3, 0.001, 5, 2.5}}, {2, {0.999, 0.001}},    {4, {0, 2, 0, 1}}};
  static corpus cs[4];
  for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
    int n = cases[ci].n;
    double sum = 0, w[4];
    for (int k = 0; k < n; k++) sum += cases[ci].w[k];
    for (int k = 0; k < n; k++) w[k] = cases[ci].w[k] / sum;
    mt_gpt_dataset *sets[4];
    if (open_blend_sets(cases[ci].w, n, BLEND_N, cs, sets)) return 1;
    mt_blend *b;
    OK(mt_blend_open(&b, sets, cases[ci].w, n, BLEND_N));
    double worst = 0;
    for (uint64_t i = 0; i <= BLEND_N; i++)
      for (int k = 0; k < n; k++) {
        double dev = fabs((double)mt_blend_consumed(b, k, i) - w[k] * (double)i);
        if (dev > worst) worst = dev;
        REQUIRE(dev < 1.0,
                "case %zu: dataset %d after %" PRIu64 " samples: %" PRIu64 ", weight says %.3f", ci,
                k, i, mt_blend_consumed(b, k, i), w[k] * (double)i);
      }
    uint64_t counts[4], total = 0;
    OK(mt_blend_counts(cases[ci].w, n, BLEND_N, counts));
    for (int k = 0; k < n; k++) {
      /* within 0.5% of the weight where a sample is under 0.5% of its
       * share (w >= 2%), and never a whole sample off */
      double share = (double)counts[k] / BLEND_N;
      REQUIRE(fabs(share - w[k]) <= 0.005 * w[k] || w[k] < 0.02,
              "case %zu: dataset %d share %.5f, "
              "weight %.5f",
              ci, k, share, w[k]);
      REQUIRE(fabs((double)counts[k] - w[k] * BLEND_N) < 1,
              "case %zu: dataset %d: %" PRIu64 " samples, weight says %.2f", ci, k, counts[k],
              w[k] * BLEND_N);
      REQUIRE(counts[k] == mt_blend_consumed(b, k, BLEND_N), "counts disagree with the blend");
      total += counts[k];
    }
    REQUIRE(total == BLEND_N, "total %" PRIu64, total);
    printf("  weights case %zu: worst prefix deviation %.3f samples\n", ci, worst);

    /* global sample i is dataset k's sample consumed(k, i), token for token */
    int32_t got[9], want[9];
    for (uint64_t i = 0; i < BLEND_N; i += 7) {
      int k;
      OK(mt_blend_sample(b, i, got, &k));
      REQUIRE(k >= 0 && k < n && w[k] > 0, "sample %" PRIu64 " from dataset %d", i, k);
      OK(mt_gpt_dataset_sample(sets[k], mt_blend_consumed(b, k, i), want));
      REQUIRE(!memcmp(got, want, sizeof got), "sample %" PRIu64 " differs", i);
      REQUIRE(got[0] / 10000000 == k, "token %d is not from dataset %d", got[0], k);
    }
    mt_blend_free(b);
    for (int k = 0; k < n; k++) mt_gpt_dataset_free(sets[k]);
  }
  return 0;
}

static int test_blend_is_deterministic(void) {
  static corpus cs[3];
  const double w[3] = {0.45, 0.35, 0.2};
  mt_gpt_dataset *sets[3];
  if (open_blend_sets(w, 3, 5000, cs, sets)) return 1;
  mt_blend *a, *b;
  OK(mt_blend_open(&a, sets, w, 3, 5000));
  OK(mt_blend_open(&b, sets, w, 3, 5000));
  int32_t ta[9], tb[9];
  for (uint64_t i = 0; i < 5000; i++) {
    int ka, kb;
    OK(mt_blend_sample(a, i, ta, &ka));
    OK(mt_blend_sample(b, i, tb, &kb));
    REQUIRE(ka == kb && !memcmp(ta, tb, sizeof ta), "sample %" PRIu64 " differs", i);
  }
  /* a longer blend starts with the shorter one */
  mt_blend *c;
  OK(mt_blend_open(&c, sets, w, 3, 3000));
  for (uint64_t i = 0; i <= 3000; i++)
    for (int k = 0; k < 3; k++)
      REQUIRE(mt_blend_consumed(a, k, i) == mt_blend_consumed(c, k, i), "prefix %" PRIu64, i);
  /* ties go to the lowest index; a weight-0 dataset may be absent */
  mt_blend *t;
  const double even[2] = {1, 1};
  OK(mt_blend_open(&t, sets, even, 2, 10));
  for (uint64_t i = 0; i < 10; i++) {
    int k;
    OK(mt_blend_sample(t, i, ta, &k));
    REQUIRE(k == (int)(i % 2), "even blend sample %" PRIu64 " from %d", i, k);
  }
  mt_blend_free(t);
  mt_gpt_dataset *some[3] = {NULL, sets[1], NULL};
  const double one[3] = {0, 1, 0};
  OK(mt_blend_open(&t, some, one, 3, 100));
  REQUIRE(mt_blend_consumed(t, 1, 100) == 100, "weight-1 dataset got %" PRIu64,
          mt_blend_consumed(t, 1, 100));
  mt_blend_free(t);
  /* a dataset smaller than its share is refused, naming it */
  const double heavy[3] = {0.1, 0.1, 5};
  REQUIRE(mt_blend_open(&t, sets, heavy, 3, 5000) == MT_EINVAL && strstr(mt_errmsg(), "blend2"),
          "undersized: %s", mt_errmsg());
  const double neg[2] = {1, -1};
  REQUIRE(mt_blend_open(&t, sets, neg, 2, 10) == MT_EINVAL, "negative weight accepted");
  mt_blend_free(a), mt_blend_free(b), mt_blend_free(c);
  for (int k = 0; k < 3; k++) mt_gpt_dataset_free(sets[k]);
  return 0;
}

static const struct {
  const char *name;
  int (*fn)(void);
} tests[] = {
#define T(f)                                                                                       \
  { #f, f }
    T(test_every_train_token_seen_once_per_epoch),
    T(test_samples_overlap_by_one_token),
    T(test_same_seed_same_order_and_other_seed_differs),
    T(test_shuffle_false_reads_in_file_order),
    T(test_split_ratios_partition_sequences),
    T(test_doc_idx_of_only_0_reads_every_sequence),
    T(test_split_counts_sequences_not_empty_documents),
    T(test_epochs_added_when_data_run_out),
    T(test_sizing_for_more_epochs_keeps_every_earlier_position),
    T(test_cache_reused_and_rebuilt_when_description_changes),
    T(test_same_name_size_mtime_in_other_directory_gets_its_own_cache),
    T(test_corrupt_cache_is_rebuilt_with_warning),
    T(test_unwritable_cache_keeps_index_in_memory),
    T(test_unwritable_cache_falls_back_to_the_state_dir),
    T(test_concurrent_reads_match_serial),
    T(test_open_refuses_bad_specs),
    T(test_blend_shares_within_half_percent_over_10000_samples),
    T(test_blend_is_deterministic),
    T(test_longer_blend_starts_with_the_shorter_one),
#undef T
};

int main(void) {
  snprintf(tmpdir, sizeof tmpdir, "/tmp/mt_test_gpt_dataset.XXXXXX");
  if (!mkdtemp(tmpdir)) {
    perror("mkdtemp");
    return 2;
  }
  for (size_t i = 0; i < sizeof tests / sizeof tests[0]; i++) {
    int rc = tests[i].fn();
    printf("%s %s\n", rc ? "FAIL" : "ok  ", tests[i].name);
    fflush(stdout);
    failures += rc != 0;
  }
  char cmd[128];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
  if (system(cmd)) fprintf(stderr, "could not remove %s\n", tmpdir);
  printf("%d of %zu failed\n", failures, sizeof tests / sizeof tests[0]);
  return failures ? 1 : 0;
}
