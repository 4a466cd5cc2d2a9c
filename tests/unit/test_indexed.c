/* test_indexed.c — Megatron .bin/.idx reader and writer.
 *
 * Round trips go through our writer; the malformed files are assembled byte
 * by byte here (independently of the writer) and then damaged one field at a
 * time, each refusal checked for the file, field and index it names. */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "err.h"
#include "indexed.h"

#include "mt_check.h"

/* Number of entries in tmpdir whose name contains needle. */
static int count_files(const char *needle) {
  DIR *d = opendir(tmpdir);
  int n = 0;
  for (struct dirent *e; d && (e = readdir(d));)
    if (strstr(e->d_name, needle)) n++;
  if (d) closedir(d);
  return n;
}

/* ---- an independent .idx assembler ------------------------------------------ */

typedef struct {
  uint8_t b[4096];
  size_t n;
} bytes;

static void put(bytes *o, const void *p, size_t n) {
  memcpy(o->b + o->n, p, n);
  o->n += n;
}
static void put_u64(bytes *o, uint64_t v) {
  for (int i = 0; i < 8; i++) o->b[o->n++] = (uint8_t)(v >> (8 * i));
}
static void put_i32(bytes *o, int32_t v) {
  for (int i = 0; i < 4; i++) o->b[o->n++] = (uint8_t)((uint32_t)v >> (8 * i));
}

static void write_file(const char *path, const void *p, size_t n) {
  FILE *fp = fopen(path, "wb");
  if (!fp || (n && fwrite(p, 1, n, fp) != n) || fclose(fp)) {
    perror(path);
    exit(2);
  }
}

/* A valid u16 dataset "name": 3 documents over 4 sequences of lengths
 * 3, 0, 2, 5 (document 1 has two sequences, document 2 one empty one). */
enum { GOOD_N = 4, GOOD_D = 3 };
static const int32_t good_sizes[GOOD_N] = {3, 0, 2, 5};
static const int64_t good_docs[GOOD_D + 1] = {0, 1, 3, 4};

typedef struct {
  int bad_magic, version, dtype;
  uint64_t n, nd; /* header counts */
  int32_t sizes[GOOD_N];
  int64_t pointers[GOOD_N];
  int64_t docs[GOOD_D + 1];
  long idx_trunc, bin_trunc; /* bytes cut off the end */
} layout;

static layout good_layout(void) {
  layout l = {.version = 1, .dtype = MT_IDX_U16, .n = GOOD_N, .nd = GOOD_D + 1};
  int64_t off = 0;
  for (int i = 0; i < GOOD_N; i++) {
    l.sizes[i] = good_sizes[i];
    l.pointers[i] = off;
    off += 2 * good_sizes[i];
  }
  memcpy(l.docs, good_docs, sizeof l.docs);
  return l;
}

static const char *write_layout(const char *name, const layout *l) {
  static bytes idx, bin;
  idx.n = bin.n = 0;
  put(&idx, l->bad_magic ? "MMIDIDY\0\0" : "MMIDIDX\0\0", 9);
  put_u64(&idx, (uint64_t)l->version);
  idx.b[idx.n++] = (uint8_t)l->dtype;
  put_u64(&idx, l->n);
  put_u64(&idx, l->nd);
  for (int i = 0; i < GOOD_N; i++) put_i32(&idx, l->sizes[i]);
  for (int i = 0; i < GOOD_N; i++) put_u64(&idx, (uint64_t)l->pointers[i]);
  for (int i = 0; i <= GOOD_D; i++) put_u64(&idx, (uint64_t)l->docs[i]);
  for (int i = 0, t = 0; i < GOOD_N; i++)
    for (int j = 0; j < good_sizes[i]; j++, t++) {
      bin.b[bin.n++] = (uint8_t)(1000 + t);
      bin.b[bin.n++] = (uint8_t)((1000 + t) >> 8);
    }
  static char prefix[256];
  snprintf(prefix, sizeof prefix, "%s", tmp_path(name));
  char path[300];
  snprintf(path, sizeof path, "%s.idx", prefix);
  write_file(path, idx.b, idx.n - (size_t)l->idx_trunc);
  snprintf(path, sizeof path, "%s.bin", prefix);
  write_file(path, bin.b, bin.n - (size_t)l->bin_trunc);
  return prefix;
}

/* Expects mt_indexed_open to refuse prefix with code and every needle in the message. */
static int expect_refused(const char *prefix, int code, const char *n1, const char *n2,
                          const char *n3) {
  mt_indexed d;
  int rc = mt_indexed_open(&d, prefix);
  REQUIRE(rc == code, "open %s gave %d (%s), want %d", prefix, rc, mt_errmsg(), code);
  const char *needles[3] = {n1, n2, n3};
  for (int i = 0; i < 3; i++)
    REQUIRE(!needles[i] || strstr(mt_errmsg(), needles[i]), "message \"%s\" lacks \"%s\"",
            mt_errmsg(), needles[i]);
  REQUIRE(d.idx_map == NULL && d.bin_map == NULL, "a refused dataset is left closed");
  return 0;
}

/* ---- tests ------------------------------------------------------------------ */

static int test_hand_built_file_reads_as_written(void) {
  layout l = good_layout();
  const char *prefix = write_layout("good", &l);
  mt_indexed d;
  REQUIRE(mt_indexed_open(&d, prefix) == 0, "%s", mt_errmsg());
  REQUIRE(d.dtype == MT_IDX_U16 && d.elem_bytes == 2, "dtype %d", d.dtype);
  REQUIRE(d.n_seqs == GOOD_N && d.n_docs == GOOD_D, "N %llu D %llu", (unsigned long long)d.n_seqs,
          (unsigned long long)d.n_docs);
  REQUIRE(d.n_tokens == 10, "n_tokens %llu", (unsigned long long)d.n_tokens);
  for (int i = 0; i <= GOOD_D; i++)
    REQUIRE(mt_indexed_doc_start(&d, (uint64_t)i) == (uint64_t)good_docs[i], "doc %d", i);
  int t = 0;
  for (int i = 0; i < GOOD_N; i++) {
    REQUIRE(mt_indexed_seq_len(&d, (uint64_t)i) == (uint32_t)good_sizes[i], "len %d", i);
    REQUIRE(mt_indexed_seq_offset(&d, (uint64_t)i) == (uint64_t)l.pointers[i], "offset %d", i);
    int32_t got[8];
    REQUIRE(mt_indexed_read(&d, (uint64_t)i, 0, (uint64_t)good_sizes[i], got) == 0, "%s",
            mt_errmsg());
    for (int j = 0; j < good_sizes[i]; j++, t++) REQUIRE(got[j] == 1000 + t, "seq %d tok %d", i, j);
  }
  int32_t two[2];
  REQUIRE(mt_indexed_read(&d, 3, 2, 2, two) == 0 && two[0] == 1007 && two[1] == 1008,
          "a slice inside a sequence");
  REQUIRE(mt_indexed_read(&d, 3, 4, 2, two) == MT_EINVAL, "a slice past the sequence is refused");
  REQUIRE(mt_indexed_read(&d, 4, 0, 1, two) == MT_EINVAL, "sequence N is refused");
  mt_indexed_close(&d);
  return 0;
}

static int roundtrip(int dtype, int32_t lo, int32_t hi) {
  char name[32];
  snprintf(name, sizeof name, "rt%d", dtype);
  const char *prefix = tmp_path(name);
  mt_indexed_writer *w;
  REQUIRE(mt_indexed_writer_open(&w, prefix, dtype) == 0, "%s", mt_errmsg());
  /* 50 documents of 0..3 sequences of 0..999 tokens; ids cycle through [lo, hi] */
  uint32_t rng = 12345;
  int32_t *ids = malloc(1000 * sizeof *ids);
  int64_t next = lo, span = (int64_t)hi - lo + 1;
  uint64_t n_seqs = 0, n_tokens = 0;
  for (int doc = 0; doc < 50; doc++) {
    int k = (int)((rng = rng * 1103515245u + 12345u) >> 16) % 4;
    for (int s = 0; s < k; s++) {
      size_t n = ((rng = rng * 1103515245u + 12345u) >> 16) % 1000;
      for (size_t i = 0; i < n; i++) ids[i] = (int32_t)(lo + (next++ - lo) % span);
      REQUIRE(mt_indexed_writer_add_seq(w, ids, n) == 0, "%s", mt_errmsg());
      n_seqs++;
      n_tokens += n;
    }
    REQUIRE(mt_indexed_writer_end_doc(w) == 0, "%s", mt_errmsg());
  }
  REQUIRE(count_files(name) == 1 && count_files(".bin.tmp.") == 1,
          "only a temp .bin while writing");
  REQUIRE(mt_indexed_writer_finish(w) == 0, "%s", mt_errmsg());
  REQUIRE(count_files(".tmp.") == 0, "no temp files left after finish");

  mt_indexed d;
  REQUIRE(mt_indexed_open(&d, prefix) == 0, "%s", mt_errmsg());
  REQUIRE(d.dtype == dtype && d.n_seqs == n_seqs && d.n_docs == 50 && d.n_tokens == n_tokens,
          "dtype %d N %llu D %llu tokens %llu", d.dtype, (unsigned long long)d.n_seqs,
          (unsigned long long)d.n_docs, (unsigned long long)d.n_tokens);
  rng = 12345;
  next = lo;
  uint64_t seq = 0;
  for (uint64_t doc = 0; doc < 50; doc++) {
    int k = (int)((rng = rng * 1103515245u + 12345u) >> 16) % 4;
    REQUIRE(mt_indexed_doc_start(&d, doc) == seq, "doc %llu", (unsigned long long)doc);
    for (int s = 0; s < k; s++, seq++) {
      size_t n = ((rng = rng * 1103515245u + 12345u) >> 16) % 1000;
      REQUIRE(mt_indexed_seq_len(&d, seq) == n, "seq %llu", (unsigned long long)seq);
      REQUIRE(mt_indexed_read(&d, seq, 0, n, ids) == 0, "%s", mt_errmsg());
      for (size_t i = 0; i < n; i++) {
        int32_t want = (int32_t)(lo + (next++ - lo) % span);
        REQUIRE(ids[i] == want, "seq %llu token %zu: %d, want %d", (unsigned long long)seq, i,
                ids[i], want);
      }
    }
  }
  REQUIRE(mt_indexed_doc_start(&d, 50) == n_seqs, "doc_idx ends at N");
  mt_indexed_close(&d);
  free(ids);
  return 0;
}

static int test_u16_roundtrip_through_writer(void) { return roundtrip(MT_IDX_U16, 0, 65535); }
static int test_i32_roundtrip_through_writer(void) {
  return roundtrip(MT_IDX_I32, INT32_MIN, INT32_MAX);
}

static int test_writer_refuses_ids_outside_dtype(void) {
  mt_indexed_writer *w;
  REQUIRE(mt_indexed_writer_open(&w, tmp_path("range"), MT_IDX_U16) == 0, "%s", mt_errmsg());
  int32_t ids[3] = {1, 65536, 2};
  REQUIRE(mt_indexed_writer_add_seq(w, ids, 3) == MT_EINVAL, "65536 in u16 accepted");
  REQUIRE(strstr(mt_errmsg(), "token 1 of sequence 0 is 65536"), "%s", mt_errmsg());
  mt_indexed_writer_abort(w);
  REQUIRE(mt_indexed_writer_open(&w, tmp_path("float"), MT_IDX_F32) == MT_ENOTSUP, "f32 writer");
  REQUIRE(mt_indexed_writer_open(&w, tmp_path("nine"), 9) == MT_EINVAL, "dtype 9 writer");
  return 0;
}

static int test_writer_abort_removes_temp_files(void) {
  mt_indexed_writer *w;
  REQUIRE(mt_indexed_writer_open(&w, tmp_path("aborted"), MT_IDX_I32) == 0, "%s", mt_errmsg());
  int32_t ids[2] = {7, 8};
  REQUIRE(mt_indexed_writer_add_seq(w, ids, 2) == 0, "%s", mt_errmsg());
  REQUIRE(count_files("aborted") == 1, "the temp .bin exists while writing");
  mt_indexed_writer_abort(w);
  REQUIRE(count_files("aborted") == 0, "abort leaves nothing behind");
  return 0;
}

/* Sequences after the last end_doc form a last document. */
static int test_writer_finish_closes_open_document(void) {
  const char *prefix = tmp_path("open_doc");
  mt_indexed_writer *w;
  REQUIRE(mt_indexed_writer_open(&w, prefix, MT_IDX_U16) == 0, "%s", mt_errmsg());
  int32_t ids[2] = {7, 8};
  REQUIRE(mt_indexed_writer_add_seq(w, ids, 2) == 0, "%s", mt_errmsg());
  REQUIRE(mt_indexed_writer_end_doc(w) == 0, "%s", mt_errmsg());
  REQUIRE(mt_indexed_writer_add_seq(w, ids, 1) == 0, "%s", mt_errmsg());
  REQUIRE(mt_indexed_writer_finish(w) == 0, "%s", mt_errmsg());
  mt_indexed d;
  REQUIRE(mt_indexed_open(&d, prefix) == 0, "%s", mt_errmsg());
  REQUIRE(d.n_docs == 2 && d.n_seqs == 2 && mt_indexed_doc_start(&d, 1) == 1, "D %llu",
          (unsigned long long)d.n_docs);
  mt_indexed_close(&d);
  return 0;
}

static int test_empty_dataset_reads(void) {
  const char *prefix = tmp_path("empty");
  mt_indexed_writer *w;
  REQUIRE(mt_indexed_writer_open(&w, prefix, MT_IDX_U16) == 0, "%s", mt_errmsg());
  REQUIRE(mt_indexed_writer_finish(w) == 0, "%s", mt_errmsg());
  mt_indexed d;
  REQUIRE(mt_indexed_open(&d, prefix) == 0, "%s", mt_errmsg());
  REQUIRE(d.n_seqs == 0 && d.n_docs == 0 && d.n_tokens == 0, "empty");
  mt_indexed_close(&d);
  return 0;
}

static int test_truncated_idx_refused(void) {
  layout l = good_layout();
  l.idx_trunc = 3;
  if (expect_refused(write_layout("trunc_idx", &l), MT_ECORRUPT, "trunc_idx.idx", "bytes",
                     "need exactly"))
    return 1;
  l.idx_trunc = 114 - 20; /* inside the header */
  return expect_refused(write_layout("trunc_head", &l), MT_ECORRUPT, "trunc_head.idx",
                        "shorter than the 34-byte header", NULL);
}

static int test_truncated_bin_refused(void) {
  layout l = good_layout();
  l.bin_trunc = 2;
  return expect_refused(write_layout("trunc_bin", &l), MT_ECORRUPT, "trunc_bin.bin: 18 bytes",
                        "sequence 3", "ends at 20");
}

static int test_long_bin_refused(void) {
  layout l = good_layout();
  l.sizes[3] = 4; /* the .bin holds one token more than the index says */
  return expect_refused(write_layout("long_bin", &l), MT_ECORRUPT, "long_bin.bin: 20 bytes",
                        "last sequence (3)", "ends at 18");
}

static int test_bad_magic_refused(void) {
  layout l = good_layout();
  l.bad_magic = 1;
  return expect_refused(write_layout("magic", &l), MT_ECORRUPT, "magic.idx", "magic", NULL);
}

static int test_bad_version_refused(void) {
  layout l = good_layout();
  l.version = 2;
  return expect_refused(write_layout("version", &l), MT_ECORRUPT, "version.idx", "version 2", NULL);
}

static int test_unknown_dtype_refused(void) {
  layout l = good_layout();
  l.dtype = 9;
  if (expect_refused(write_layout("dtype9", &l), MT_ECORRUPT, "dtype9.idx", "dtype code 9", NULL))
    return 1;
  l.dtype = 0;
  return expect_refused(write_layout("dtype0", &l), MT_ECORRUPT, "dtype0.idx", "dtype code 0",
                        NULL);
}

static int test_header_counts_must_match_idx_size(void) {
  layout l = good_layout();
  l.n = 5;
  if (expect_refused(write_layout("count_n", &l), MT_ECORRUPT, "count_n.idx", "N = 5", "need"))
    return 1;
  l = good_layout();
  l.nd = (uint64_t)1 << 62; /* would overflow a naive size computation */
  if (expect_refused(write_layout("count_huge", &l), MT_ECORRUPT, "count_huge.idx", "too short",
                     NULL))
    return 1;
  l = good_layout();
  l.nd = 0;
  return expect_refused(write_layout("count_zero", &l), MT_ECORRUPT, "count_zero.idx",
                        "document index length is 0", NULL);
}

/* doc_idx need not end at N (Megatron's old merge_file_ leaves it short);
 * what it holds is still read as it is. */
static int test_doc_idx_ending_short_of_n_accepted(void) {
  layout l = good_layout();
  l.docs[GOOD_D] = 3;
  mt_indexed d;
  REQUIRE(mt_indexed_open(&d, write_layout("doc_short", &l)) == 0, "%s", mt_errmsg());
  REQUIRE(d.n_seqs == GOOD_N && d.n_docs == GOOD_D && mt_indexed_doc_start(&d, GOOD_D) == 3,
          "N %llu D %llu", (unsigned long long)d.n_seqs, (unsigned long long)d.n_docs);
  mt_indexed_close(&d);
  return 0;
}

static int test_doc_idx_past_n_or_not_from_0_refused(void) {
  layout l = good_layout();
  l.docs[GOOD_D] = 5;
  if (expect_refused(write_layout("doc_past", &l), MT_ECORRUPT, "doc_past.idx",
                     "doc_idx[3] = 5 is past N = 4", NULL))
    return 1;
  l = good_layout();
  l.docs[0] = 1;
  return expect_refused(write_layout("doc_start", &l), MT_ECORRUPT, "doc_start.idx",
                        "doc_idx[0] = 1", NULL);
}

static int test_non_monotonic_doc_idx_refused(void) {
  layout l = good_layout();
  l.docs[1] = 3;
  l.docs[2] = 2;
  return expect_refused(write_layout("doc_order", &l), MT_ECORRUPT, "doc_order.idx",
                        "doc_idx[2] = 2 is below doc_idx[1] = 3", NULL);
}

static int test_pointer_inconsistency_refused(void) {
  layout l = good_layout();
  l.pointers[2] = 8; /* sequence 1 ends at 6 */
  if (expect_refused(write_layout("ptr", &l), MT_ECORRUPT, "ptr.idx",
                     "pointers[2] = 8 but sequence 1 ends at 6", NULL))
    return 1;
  l = good_layout();
  for (int i = 0; i < GOOD_N; i++) l.pointers[i] += 2;
  if (expect_refused(write_layout("ptr0", &l), MT_ECORRUPT, "ptr0.idx",
                     "pointers[0] = 2 but the first sequence starts at 0", NULL))
    return 1;
  l = good_layout();
  l.sizes[1] = -1;
  return expect_refused(write_layout("neg", &l), MT_ECORRUPT, "neg.idx", "sizes[1] = -1", NULL);
}

static int test_missing_files_refused(void) {
  layout l = good_layout();
  const char *prefix = write_layout("nobin", &l);
  char path[300];
  snprintf(path, sizeof path, "%s.bin", prefix);
  unlink(path);
  if (expect_refused(prefix, MT_ENOENT, "nobin.bin", "No such file", NULL)) return 1;
  return expect_refused(tmp_path("nothing"), MT_ENOENT, "nothing.idx", NULL, NULL);
}

/* Megatron-core's multimodal index carries N extra bytes of sequence modes. */
static int test_multimodal_index_named(void) {
  layout l = good_layout();
  const char *prefix = write_layout("multimodal", &l);
  char path[300];
  snprintf(path, sizeof path, "%s.idx", prefix);
  FILE *fp = fopen(path, "ab");
  REQUIRE(fp && fwrite("\0\0\0\0", 1, GOOD_N, fp) == GOOD_N && !fclose(fp), "append");
  return expect_refused(prefix, MT_ENOTSUP, "multimodal.idx", "sequence modes", NULL);
}

static int test_float_dtype_opens_but_read_refused(void) {
  layout l = good_layout();
  l.dtype = MT_IDX_F32; /* 4-byte elements: pointers and .bin size must follow */
  int64_t off = 0;
  for (int i = 0; i < GOOD_N; i++) {
    l.pointers[i] = off;
    off += 4 * good_sizes[i];
  }
  const char *prefix = write_layout("f32", &l);
  char path[300];
  snprintf(path, sizeof path, "%s.bin", prefix);
  uint8_t zeros[40] = {0};
  write_file(path, zeros, sizeof zeros);
  mt_indexed d;
  REQUIRE(mt_indexed_open(&d, prefix) == 0, "%s", mt_errmsg());
  int32_t out[4];
  REQUIRE(mt_indexed_read(&d, 0, 0, 3, out) == MT_ENOTSUP, "floats read as ids");
  mt_indexed_close(&d);
  return 0;
}

#define TEST(fn)                                                                                   \
  { #fn, fn }
static const struct {
  const char *name;
  int (*fn)(void);
} tests[] = {
    TEST(test_hand_built_file_reads_as_written),
    TEST(test_u16_roundtrip_through_writer),
    TEST(test_i32_roundtrip_through_writer),
    TEST(test_writer_refuses_ids_outside_dtype),
    TEST(test_writer_abort_removes_temp_files),
    TEST(test_writer_finish_closes_open_document),
    TEST(test_empty_dataset_reads),
    TEST(test_truncated_idx_refused),
    TEST(test_truncated_bin_refused),
    TEST(test_long_bin_refused),
    TEST(test_bad_magic_refused),
    TEST(test_bad_version_refused),
    TEST(test_unknown_dtype_refused),
    TEST(test_header_counts_must_match_idx_size),
    TEST(test_doc_idx_ending_short_of_n_accepted),
    TEST(test_doc_idx_past_n_or_not_from_0_refused),
    TEST(test_non_monotonic_doc_idx_refused),
    TEST(test_pointer_inconsistency_refused),
    TEST(test_missing_files_refused),
    TEST(test_multimodal_index_named),
    TEST(test_float_dtype_opens_but_read_refused),
};

int main(void) {
  snprintf(tmpdir, sizeof tmpdir, "/tmp/mt_test_indexed.XXXXXX");
  if (!mkdtemp(tmpdir)) {
    perror("mkdtemp");
    return 2;
  }
  for (size_t i = 0; i < sizeof tests / sizeof tests[0]; i++) {
    int rc = tests[i].fn();
    printf("%s %s\n", rc ? "FAIL" : "ok  ", tests[i].name);
    failures += rc != 0;
  }
  char cmd[128];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
  if (system(cmd)) fprintf(stderr, "could not remove %s\n", tmpdir);
  printf("%d of %zu failed\n", failures, sizeof tests / sizeof tests[0]);
  return failures ? 1 : 0;
}
