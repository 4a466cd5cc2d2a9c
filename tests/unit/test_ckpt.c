/* test_ckpt.c — the checkpoint library (daemon/ckpt, proto/ckpt-v1.md).
 *
 * Checkpoints are damaged here by hand (flipped bytes, truncation, removed
 * files, broken JSON, leftovers of a kill, a full disk) and each test states
 * what a reader must then do: name the file and chunk, fall back to the
 * previous checkpoint, or refuse a step that was named. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "ckpt.h"
#include "ckpt_testdata.h"
#include "err.h"
#include "log.h"
#include "mt_check.h"

/* ---- helpers ---- */

static mt_ckpt_meta meta_for(int64_t step, int tp, int pp, int dp) {
  mt_ckpt_meta m = {0};
  m.job = "unit";
  m.job_hash = "0123456789abcdef";
  m.step = step;
  m.consumed_samples = step * 32;
  m.consumed_tokens = step * 32 * 2048;
  m.seed = 1234;
  m.tp = tp, m.pp = pp, m.dp = dp;
  return m;
}

/* Saves step with one writer: tp x pp shards of n floats per array. */
static int save_step(const char *job, int64_t step, uint64_t n, int tp, int pp,
                     size_t chunk_bytes) {
  int ns = tp * pp;
  mt_ckpt_shard_desc d[16];
  float *bufs[16][3];
  const float *const *data[16];
  const float *ptrs[16][3];
  for (int s = 0; s < ns; s++) {
    d[s] = (mt_ckpt_shard_desc){s % tp, s / tp, n, 3, ckpt_test_arrays};
    for (int a = 0; a < 3; a++) {
      bufs[s][a] = ckpt_test_slice(step, d[s].tp, d[s].pp, a, 0, n);
      ptrs[s][a] = bufs[s][a];
    }
    data[s] = ptrs[s];
  }
  mt_ckpt_meta m = meta_for(step, tp, pp, 1);
  int rc = mt_ckpt_save(job, &m, d, data, ns, chunk_bytes);
  for (int s = 0; s < ns; s++)
    for (int a = 0; a < 3; a++) free(bufs[s][a]);
  return rc;
}

/* Every float of every array of c equals the generator's value for c's step. */
static int data_matches(const mt_ckpt *c) {
  for (int i = 0; i < c->n_files; i++) {
    const mt_ckpt_file *f = &c->files[i];
    float *got = malloc(f->n * sizeof *got);
    for (int a = 0; a < f->n_arrays; a++) {
      if (mt_ckpt_read(c, f->tp, f->pp, f->arrays[a], 0, f->n, got)) {
        fprintf(stderr, "  read: %s\n", mt_errmsg());
        free(got);
        return 0;
      }
      for (uint64_t k = 0; k < f->n; k++)
        if (got[k] != ckpt_test_value(c->step, f->tp, f->pp, a, k)) {
          fprintf(stderr, "  %s %s[%" PRIu64 "] differs\n", f->name, f->arrays[a], k);
          free(got);
          return 0;
        }
    }
    free(got);
  }
  return 1;
}

static const char *step_path(const char *job, int64_t step, const char *file) {
  static char buf[4][512];
  static int k;
  k = (k + 1) % 4;
  if (file)
    snprintf(buf[k], sizeof buf[k], "%s/step_%08" PRId64 "/%s", job, step, file);
  else
    snprintf(buf[k], sizeof buf[k], "%s/step_%08" PRId64, job, step);
  return buf[k];
}

/* Entries whose name contains ".tmp." in job and in its step directories. */
static int count_temp_files(const char *job) {
  int n = 0;
  DIR *d = opendir(job);
  if (!d) return 0;
  struct dirent *e;
  while ((e = readdir(d))) {
    if (strstr(e->d_name, ".tmp.")) n++;
    if (strncmp(e->d_name, "step_", 5)) continue;
    char sub[512];
    snprintf(sub, sizeof sub, "%s/%s", job, e->d_name);
    DIR *s = opendir(sub);
    struct dirent *f;
    while (s && (f = readdir(s))) n += strstr(f->d_name, ".tmp.") != NULL;
    if (s) closedir(s);
  }
  closedir(d);
  return n;
}

static int exists(const char *path) {
  struct stat st;
  return !stat(path, &st);
}

static void flip_byte(const char *path, uint64_t off) {
  int fd = open(path, O_RDWR);
  uint8_t b = 0;
  if (fd < 0 || pread(fd, &b, 1, (off_t)off) != 1) perror(path);
  b ^= 0x01;
  if (fd < 0 || pwrite(fd, &b, 1, (off_t)off) != 1) perror(path);
  if (fd >= 0) close(fd);
}

static void write_text(const char *path, const char *text) {
  FILE *fp = fopen(path, "w");
  if (!fp) {
    perror(path);
    return;
  }
  fputs(text, fp);
  fclose(fp);
}

static char *read_text(const char *path) {
  FILE *fp = fopen(path, "r");
  if (!fp) return NULL;
  static char buf[256];
  size_t k = fread(buf, 1, sizeof buf - 1, fp);
  buf[k] = 0;
  fclose(fp);
  return buf;
}

/* ---- writing and reading ---- */

static int test_one_writer_round_trip_is_bit_exact(void) {
  const char *job = tmp_path("one");
  REQUIRE(save_step(job, 10, 1000, 2, 2, 1002) == 0, "%s", mt_errmsg());
  mt_ckpt c;
  REQUIRE(mt_ckpt_find(job, -1, MT_CKPT_VERIFY_CHECKSUMS, &c) == 0, "%s", mt_errmsg());
  CHECK(c.step == 10, "step %" PRId64, c.step);
  CHECK(c.n_files == 4, "%d files", c.n_files);
  CHECK(c.skipped == NULL, "skipped: %s", c.skipped);
  CHECK(data_matches(&c), "data differs after the round trip");
  /* a range inside an array */
  float part[7];
  CHECK(mt_ckpt_read(&c, 1, 1, "adam_v", 500, 7, part) == 0, "%s", mt_errmsg());
  for (int i = 0; i < 7; i++)
    CHECK(part[i] == ckpt_test_value(10, 1, 1, 2, 500 + (uint64_t)i), "adam_v[%d]", 500 + i);
  CHECK(mt_ckpt_read(&c, 1, 1, "adam_v", 995, 6, part) == MT_EINVAL, "read past the end");
  CHECK(mt_ckpt_read(&c, 1, 1, "grad", 0, 1, part) == MT_EINVAL, "unknown array");
  CHECK(mt_ckpt_read(&c, 2, 0, "master", 0, 1, part) == MT_EINVAL, "unknown shard");
  mt_ckpt_close(&c);
  CHECK(mt_ckpt_verify(step_path(job, 10, NULL), NULL, NULL) == 0, "%s", mt_errmsg());
  CHECK(count_temp_files(job) == 0, "temp files left behind");
  return 0;
}

/* One dp writer: its slice [lo, lo+n) of every array of one shard. */
typedef struct writer_arg {
  const mt_ckpt_txn *txn;
  const mt_ckpt_shard_desc *d;
  int64_t step;
  uint64_t lo, n;
  mt_ckpt_chunks chunks;
  int rc;
  char err[512];
} writer_arg;

static void *writer_main(void *p) {
  writer_arg *w = p;
  float *v[3];
  const float *src[3];
  for (int a = 0; a < 3; a++)
    src[a] = v[a] = ckpt_test_slice(w->step, w->d->tp, w->d->pp, a, w->lo, w->n);
  w->rc = mt_ckpt_shard_write(w->txn, w->d, w->lo, w->n, src, 1000, &w->chunks);
  snprintf(w->err, sizeof w->err, "%s", mt_errmsg());
  for (int a = 0; a < 3; a++) free(v[a]);
  return NULL;
}

static int test_three_writers_load_under_any_slicing(void) {
  const char *job = tmp_path("dp3");
  const uint64_t n = 10007, cut[4] = {0, 1234, 7000, n}; /* uneven dp slices */
  mt_ckpt_shard_desc d[2] = {{0, 0, n, 3, ckpt_test_arrays}, {1, 0, n, 3, ckpt_test_arrays}};
  mt_ckpt_txn txn;
  REQUIRE(mt_ckpt_begin(&txn, job, 7) == 0, "%s", mt_errmsg());
  mt_ckpt_chunks all = {0};
  writer_arg w[2][3];
  for (int s = 0; s < 2; s++) {
    REQUIRE(mt_ckpt_shard_create(&txn, &d[s], &all) == 0, "%s", mt_errmsg());
    pthread_t th[3];
    for (int r = 0; r < 3; r++) {
      w[s][r] = (writer_arg){&txn, &d[s], 7, cut[r], cut[r + 1] - cut[r], {0}, 0, ""};
      pthread_create(&th[r], NULL, writer_main, &w[s][r]);
    }
    for (int r = 0; r < 3; r++) pthread_join(th[r], NULL);
    for (int r = 0; r < 3; r++) REQUIRE(w[s][r].rc == 0, "writer %d: %s", r, w[s][r].err);
    REQUIRE(mt_ckpt_shard_commit(&txn, &d[s]) == 0, "%s", mt_errmsg());
  }
  /* the records travel as JSON (as through the store), in any order */
  for (int s = 1; s >= 0; s--)
    for (int r = 2; r >= 0; r--) {
      json_t *j = mt_ckpt_chunks_json(&w[s][r].chunks);
      REQUIRE(j && mt_ckpt_chunks_parse(j, &all) == 0, "%s", mt_errmsg());
      json_decref(j);
    }
  mt_ckpt_meta m = meta_for(7, 2, 1, 3);
  /* without the middle writer's records the files are not covered: refused */
  mt_ckpt_chunks partial = {0};
  for (size_t i = 0; i < all.n; i++)
    if (!(all.v[i].tp == 1 && all.v[i].offset >= 64 + 4 * 1234 && all.v[i].offset < 64 + 4 * 7000))
      mt_ckpt_chunks_add(&partial, &all.v[i], 1);
  CHECK(mt_ckpt_commit(&txn, &m, d, 2, &partial) == MT_EINVAL, "commit with a gap accepted");
  CHECK(strstr(mt_errmsg(), "shard_tp01_pp000.bin") && strstr(mt_errmsg(), "gap"), "%s",
        mt_errmsg());
  mt_ckpt_chunks_free(&partial);
  CHECK(!exists(step_path(job, 7, "manifest.json")), "a refused commit wrote a manifest");
  REQUIRE(mt_ckpt_commit(&txn, &m, d, 2, &all) == 0, "%s", mt_errmsg());
  mt_ckpt_chunks_free(&all);
  for (int s = 0; s < 2; s++)
    for (int r = 0; r < 3; r++) mt_ckpt_chunks_free(&w[s][r].chunks);

  mt_ckpt c;
  REQUIRE(mt_ckpt_find(job, 7, MT_CKPT_VERIFY_CHECKSUMS, &c) == 0, "%s", mt_errmsg());
  CHECK(c.dp == 3, "dp %d", c.dp);
  CHECK(data_matches(&c), "data differs");
  /* read back as dp 2 and dp 5 ranks would: each its own slice */
  for (int dp = 2; dp <= 5; dp += 3) {
    for (int r = 0; r < dp; r++) {
      uint64_t lo = n * (uint64_t)r / (uint64_t)dp, hi = n * (uint64_t)(r + 1) / (uint64_t)dp;
      float *got = malloc((hi - lo) * sizeof *got);
      for (int s = 0; s < 2; s++)
        for (int a = 0; a < 3; a++) {
          CHECK(mt_ckpt_read(&c, s, 0, ckpt_test_arrays[a], lo, hi - lo, got) == 0, "%s",
                mt_errmsg());
          int same = 1;
          for (uint64_t k = 0; k < hi - lo; k++)
            same &= got[k] == ckpt_test_value(7, s, 0, a, lo + k);
          CHECK(same, "dp %d rank %d shard %d array %d differs", dp, r, s, a);
        }
      free(got);
    }
  }
  mt_ckpt_close(&c);

  /* the file's bytes do not depend on dp: one writer gives the same file */
  const char *job1 = tmp_path("dp1");
  {
    mt_ckpt_shard_desc d1[2] = {d[0], d[1]};
    float *b[2][3];
    const float *p[2][3];
    const float *const *data[2] = {p[0], p[1]};
    for (int s = 0; s < 2; s++)
      for (int a = 0; a < 3; a++) p[s][a] = b[s][a] = ckpt_test_slice(7, s, 0, a, 0, n);
    mt_ckpt_meta m1 = meta_for(7, 2, 1, 1);
    REQUIRE(mt_ckpt_save(job1, &m1, d1, data, 2, 0) == 0, "%s", mt_errmsg());
    for (int s = 0; s < 2; s++)
      for (int a = 0; a < 3; a++) free(b[s][a]);
  }
  for (int s = 0; s < 2; s++) {
    char name[32];
    snprintf(name, sizeof name, "shard_tp%02d_pp000.bin", s);
    FILE *x = fopen(step_path(job, 7, name), "rb"), *y = fopen(step_path(job1, 7, name), "rb");
    REQUIRE(x && y, "open %s", name);
    int ca, cb, same = 1;
    do {
      ca = fgetc(x), cb = fgetc(y);
      same &= ca == cb;
    } while (ca != EOF && cb != EOF);
    fclose(x), fclose(y);
    CHECK(same, "%s differs between dp 3 and dp 1 writers", name);
  }
  return 0;
}

static int test_manifest_records_every_field(void) {
  const char *job = tmp_path("fields");
  uint64_t n = 3000;
  mt_ckpt_shard_desc d = {0, 0, n, 2, (const char *const[]){"master", "adam_m"}};
  float *v0 = ckpt_test_slice(5, 0, 0, 0, 0, n), *v1 = ckpt_test_slice(5, 0, 0, 1, 0, n);
  const float *p[2] = {v0, v1};
  const float *const *data[1] = {p};
  mt_ckpt_meta m = meta_for(5, 1, 1, 4);
  json_t *rng = json_pack("{s:I}", "philox_offset", (json_int_t)123456789);
  json_t *pos = json_pack("{s:s, s:I}", "dataset", "blend", "sample", (json_int_t)160);
  json_t *extra = json_pack("{s:f, s:s}", "loss", 2.5, "note", "unit");
  m.rng = rng, m.data_position = pos, m.extra = extra;
  int rc = mt_ckpt_save(job, &m, &d, data, 1, 4096);
  free(v0), free(v1);
  REQUIRE(rc == 0, "%s", mt_errmsg());

  json_error_t err;
  json_t *j = json_load_file(step_path(job, 5, "manifest.json"), 0, &err);
  REQUIRE(j, "manifest: %s", err.text);
  CHECK(!strcmp(json_string_value(json_object_get(j, "format")), "mtnlg-ckpt"), "format");
  CHECK(json_integer_value(json_object_get(j, "version")) == 1, "version");
  CHECK(!strcmp(json_string_value(json_object_get(j, "job")), "unit"), "job");
  CHECK(!strcmp(json_string_value(json_object_get(j, "job_hash")), "0123456789abcdef"), "job_hash");
  CHECK(json_integer_value(json_object_get(j, "step")) == 5, "step");
  CHECK(json_integer_value(json_object_get(j, "consumed_samples")) == 160, "consumed_samples");
  CHECK(json_integer_value(json_object_get(j, "consumed_tokens")) == 160 * 2048, "consumed_tokens");
  CHECK(json_integer_value(json_object_get(j, "seed")) == 1234, "seed");
  CHECK(json_equal(json_object_get(j, "rng"), rng), "rng");
  CHECK(json_equal(json_object_get(j, "data_position"), pos), "data_position");
  CHECK(json_equal(json_object_get(j, "extra"), extra), "extra");
  json_t *layout = json_object_get(j, "layout");
  CHECK(json_integer_value(json_object_get(layout, "tp")) == 1 &&
            json_integer_value(json_object_get(layout, "pp")) == 1 &&
            json_integer_value(json_object_get(layout, "dp")) == 4,
        "layout");
  const char *created = json_string_value(json_object_get(j, "created"));
  CHECK(created && strlen(created) == 20 && created[10] == 'T' && created[19] == 'Z', "created %s",
        created ? created : "(none)");
  json_t *files = json_object_get(j, "files");
  REQUIRE(json_array_size(files) == 1, "files");
  json_t *f = json_array_get(files, 0);
  CHECK(!strcmp(json_string_value(json_object_get(f, "name")), "shard_tp00_pp000.bin"), "name");
  CHECK(json_integer_value(json_object_get(f, "n")) == (json_int_t)n, "n");
  CHECK(json_integer_value(json_object_get(f, "bytes")) == (json_int_t)(64 + 2 * 4 * n), "bytes");
  json_t *arrays = json_object_get(f, "arrays");
  CHECK(json_array_size(arrays) == 2 &&
            !strcmp(json_string_value(json_array_get(arrays, 1)), "adam_m"),
        "arrays");
  struct stat st;
  REQUIRE(stat(step_path(job, 5, "shard_tp00_pp000.bin"), &st) == 0, "shard missing");
  CHECK((uint64_t)st.st_size == 64 + 2 * 4 * n, "file size %lld", (long long)st.st_size);
  /* chunks: header first, then pieces of at most 4096 bytes, covering every byte once */
  json_t *chunks = json_object_get(f, "chunks");
  json_int_t at = 0;
  for (size_t i = 0; i < json_array_size(chunks); i++) {
    json_t *k = json_array_get(chunks, i);
    json_int_t off = json_integer_value(json_object_get(k, "offset"));
    json_int_t len = json_integer_value(json_object_get(k, "bytes"));
    const char *hex = json_string_value(json_object_get(k, "xxh3"));
    CHECK(off == at, "chunk %zu at %lld, expected %lld", i, (long long)off, (long long)at);
    CHECK(len > 0 && len <= 4096 && (i > 0 || len == 64), "chunk %zu of %lld bytes", i,
          (long long)len);
    CHECK(hex && strlen(hex) == 16 && strspn(hex, "0123456789abcdef") == 16, "xxh3 %s", hex);
    at = off + len;
  }
  CHECK(at == st.st_size, "chunks cover %lld of %lld bytes", (long long)at, (long long)st.st_size);
  json_decref(j);

  mt_ckpt c;
  REQUIRE(mt_ckpt_find(job, -1, MT_CKPT_VERIFY_CHECKSUMS, &c) == 0, "%s", mt_errmsg());
  CHECK(c.step == 5 && c.consumed_samples == 160 && c.consumed_tokens == 160 * 2048 &&
            c.seed == 1234,
        "counters");
  CHECK(!strcmp(c.job, "unit") && !strcmp(c.job_hash, "0123456789abcdef"), "job");
  CHECK(c.tp == 1 && c.pp == 1 && c.dp == 4, "layout");
  CHECK(json_equal(c.data_position, pos) && json_equal(c.rng, rng) && json_equal(c.extra, extra),
        "opaque objects differ");
  mt_ckpt_close(&c);
  json_decref(rng), json_decref(pos), json_decref(extra);
  return 0;
}

static int test_latest_names_the_newest_commit(void) {
  const char *job = tmp_path("latest");
  REQUIRE(save_step(job, 10, 100, 1, 1, 0) == 0, "%s", mt_errmsg());
  REQUIRE(save_step(job, 20, 100, 1, 1, 0) == 0, "%s", mt_errmsg());
  char path[512];
  snprintf(path, sizeof path, "%s/latest", job);
  const char *text = read_text(path);
  CHECK(text && !strcmp(text, "step_00000020\n"), "latest holds \"%s\"", text ? text : "(none)");
  mt_ckpt c;
  REQUIRE(mt_ckpt_find(job, -1, MT_CKPT_VERIFY_CHECKSUMS, &c) == 0, "%s", mt_errmsg());
  CHECK(c.step == 20, "found step %" PRId64, c.step);
  mt_ckpt_close(&c);
  REQUIRE(mt_ckpt_find(job, 10, MT_CKPT_VERIFY_CHECKSUMS, &c) == 0, "%s", mt_errmsg());
  CHECK(c.step == 10 && data_matches(&c), "named step 10");
  mt_ckpt_close(&c);
  CHECK(mt_ckpt_find(job, 15, MT_CKPT_VERIFY_SIZES, &c) == MT_ENOENT, "step 15 found");
  CHECK(mt_ckpt_find(tmp_path("nothing-here"), -1, MT_CKPT_VERIFY_SIZES, &c) == MT_ENOENT,
        "empty job found");
  /* the latest checkpoint cannot be begun again (it would be overwritten) */
  mt_ckpt_txn t;
  CHECK(mt_ckpt_begin(&t, job, 20) == MT_EINVAL, "begin over latest accepted");
  CHECK(strstr(mt_errmsg(), "step_00000020") != NULL, "%s", mt_errmsg());
  /* nor any committed one while latest is unreadable (a job may run from it) */
  char latest[512];
  snprintf(latest, sizeof latest, "%s/latest", job);
  write_text(latest, "nonsense\n");
  CHECK(mt_ckpt_begin(&t, job, 10) == MT_EINVAL, "begin over a committed step accepted");
  CHECK(strstr(mt_errmsg(), "unreadable") != NULL, "%s", mt_errmsg());
  write_text(latest, "step_00000020\n");
  /* an older committed step is replaced: un-committed first, gone after abort */
  REQUIRE(mt_ckpt_begin(&t, job, 10) == 0, "%s", mt_errmsg());
  CHECK(!exists(step_path(job, 10, "manifest.json")), "step 10 still committed");
  mt_ckpt_abort(&t);
  CHECK(!exists(step_path(job, 10, NULL)), "abort left step 10");
  CHECK(mt_ckpt_verify(step_path(job, 20, NULL), NULL, NULL) == 0, "%s", mt_errmsg());
  CHECK(count_temp_files(job) == 0, "temp files left behind");
  return 0;
}

/* ---- damage ---- */

/* What a checksum failure says of shard tp01_pp000 of checkpoint c when the
 * byte at file offset off is flipped: "<step>/shard_tp01_pp000.bin chunk K
 * (offset O, N bytes): checksum ". */
static void flipped_chunk_message(char *want, size_t cap, const mt_ckpt *c, uint64_t off) {
  const mt_ckpt_file *f = mt_ckpt_file_of(c, 1, 0);
  size_t ci = 0;
  while (ci < f->n_chunks && f->chunks[ci].offset + f->chunks[ci].bytes <= off) ci++;
  snprintf(want, cap,
           "step_%08" PRId64 "/shard_tp01_pp000.bin chunk %zu (offset %" PRIu64 ", %" PRIu64
           " bytes): checksum ",
           c->step, ci, f->chunks[ci].offset, f->chunks[ci].bytes);
}

static int test_flipped_byte_falls_back_to_previous(void) {
  const char *job = tmp_path("flip");
  REQUIRE(save_step(job, 10, 3000, 2, 1, 4096) == 0, "%s", mt_errmsg());
  REQUIRE(save_step(job, 20, 3000, 2, 1, 4096) == 0, "%s", mt_errmsg());
  uint64_t off = 64 + 12000 + 5000; /* inside adam_m */
  mt_ckpt c;
  REQUIRE(mt_ckpt_find(job, 20, MT_CKPT_VERIFY_SIZES, &c) == 0, "%s", mt_errmsg());
  char want[256];
  flipped_chunk_message(want, sizeof want, &c, off);
  mt_ckpt_close(&c);
  flip_byte(step_path(job, 20, "shard_tp01_pp000.bin"), off);

  REQUIRE(mt_ckpt_find(job, -1, MT_CKPT_VERIFY_CHECKSUMS, &c) == 0, "%s", mt_errmsg());
  CHECK(c.step == 10, "loaded step %" PRId64 ", not the previous one", c.step);
  CHECK(c.skipped && strstr(c.skipped, want), "skipped: %s\nwanted: %s", c.skipped, want);
  CHECK(data_matches(&c), "previous checkpoint's data");
  mt_ckpt_close(&c);
  /* named: refused, with the same message */
  CHECK(mt_ckpt_find(job, 20, MT_CKPT_VERIFY_CHECKSUMS, &c) == MT_ECORRUPT, "named step loaded");
  CHECK(strstr(mt_errmsg(), want) && strstr(mt_errmsg(), " expected "), "%s", mt_errmsg());
  printf("  refused as expected: %s\n", mt_errmsg());
  /* both bad: an error naming both */
  flip_byte(step_path(job, 10, "shard_tp00_pp000.bin"), 64 + 3);
  CHECK(mt_ckpt_find(job, -1, MT_CKPT_VERIFY_CHECKSUMS, &c) == MT_ECORRUPT, "a bad one loaded");
  CHECK(strstr(mt_errmsg(), "step_00000020/shard_tp01_pp000.bin chunk") &&
            strstr(mt_errmsg(), "step_00000010/shard_tp00_pp000.bin chunk 1 "),
        "%s", mt_errmsg());
  /* a flipped header byte: the header check names it before any chunk */
  flip_byte(step_path(job, 10, "shard_tp00_pp000.bin"), 64 + 3);
  flip_byte(step_path(job, 10, "shard_tp01_pp000.bin"), 17);
  CHECK(mt_ckpt_find(job, 10, MT_CKPT_VERIFY_SIZES, &c) == MT_ECORRUPT, "bad header accepted");
  CHECK(strstr(mt_errmsg(), "step_00000010/shard_tp01_pp000.bin: header"), "%s", mt_errmsg());
  return 0;
}

static int test_truncated_shard_falls_back_to_previous(void) {
  const char *job = tmp_path("trunc");
  REQUIRE(save_step(job, 10, 1000, 1, 2, 0) == 0, "%s", mt_errmsg());
  REQUIRE(save_step(job, 20, 1000, 1, 2, 0) == 0, "%s", mt_errmsg());
  REQUIRE(truncate(step_path(job, 20, "shard_tp00_pp001.bin"), 1000) == 0, "truncate");
  mt_ckpt c;
  /* sizes alone catch it */
  REQUIRE(mt_ckpt_find(job, -1, MT_CKPT_VERIFY_SIZES, &c) == 0, "%s", mt_errmsg());
  CHECK(c.step == 10, "loaded step %" PRId64, c.step);
  CHECK(c.skipped &&
            strstr(c.skipped, "step_00000020/shard_tp00_pp001.bin truncated: 1000 of 12064 bytes"),
        "skipped: %s", c.skipped);
  mt_ckpt_close(&c);
  CHECK(mt_ckpt_find(job, 20, MT_CKPT_VERIFY_CHECKSUMS, &c) == MT_ECORRUPT, "named step loaded");
  CHECK(strstr(mt_errmsg(), "truncated: 1000 of 12064 bytes"), "%s", mt_errmsg());
  return 0;
}

/* The list (what /v1/checkpoints and mtnlgctl checkpoints show) marks a
 * checkpoint damaged from sizes alone: a shard not the size its header
 * gives, and a copy of another step's directory, whose manifest says that
 * step. Before, both were listed as committed checkpoints like any other. */
static int test_list_marks_a_truncated_shard_or_another_steps_manifest_damaged(void) {
  const char *job = tmp_path("listdamage");
  REQUIRE(save_step(job, 10, 1000, 1, 2, 0) == 0, "%s", mt_errmsg());
  REQUIRE(save_step(job, 20, 1000, 1, 2, 0) == 0, "%s", mt_errmsg());
  REQUIRE(truncate(step_path(job, 20, "shard_tp00_pp001.bin"), 100) == 0, "truncate");
  char cmd[1200];
  snprintf(cmd, sizeof cmd, "cp -r '%s' '%s'", step_path(job, 10, NULL), step_path(job, 99, NULL));
  REQUIRE(system(cmd) == 0, "%s", cmd);
  mt_ckpt_entry *e;
  size_t n;
  REQUIRE(mt_ckpt_list(job, &e, &n) == 0, "%s", mt_errmsg());
  REQUIRE(n == 3, "listed %zu", n);
  CHECK(e[0].step == 10 && !e[0].damaged[0], "step 10: %s", e[0].damaged);
  CHECK(e[1].step == 20 && !strcmp(e[1].damaged, "shard_tp00_pp001.bin: 100 of 12064 bytes"),
        "step 20: \"%s\"", e[1].damaged);
  CHECK(e[2].step == 99 &&
            !strcmp(e[2].damaged, "manifest.json says step 10, its directory step 99"),
        "step 99: \"%s\"", e[2].damaged);
  free(e);
  return 0;
}

static int test_missing_shard_falls_back_to_previous(void) {
  const char *job = tmp_path("missing");
  REQUIRE(save_step(job, 10, 100, 2, 1, 0) == 0, "%s", mt_errmsg());
  REQUIRE(save_step(job, 20, 100, 2, 1, 0) == 0, "%s", mt_errmsg());
  REQUIRE(unlink(step_path(job, 20, "shard_tp01_pp000.bin")) == 0, "unlink");
  mt_ckpt c;
  REQUIRE(mt_ckpt_find(job, -1, MT_CKPT_VERIFY_CHECKSUMS, &c) == 0, "%s", mt_errmsg());
  CHECK(c.step == 10, "loaded step %" PRId64, c.step);
  CHECK(c.skipped && strstr(c.skipped, "step_00000020/shard_tp01_pp000.bin missing"), "skipped: %s",
        c.skipped);
  mt_ckpt_close(&c);
  CHECK(mt_ckpt_find(job, 20, MT_CKPT_VERIFY_SIZES, &c) == MT_ECORRUPT, "named step loaded");
  CHECK(strstr(mt_errmsg(), "shard_tp01_pp000.bin missing"), "%s", mt_errmsg());
  return 0;
}

static int test_dir_without_manifest_is_not_a_checkpoint(void) {
  const char *job = tmp_path("nomanifest");
  REQUIRE(save_step(job, 10, 100, 1, 1, 0) == 0, "%s", mt_errmsg());
  REQUIRE(save_step(job, 20, 100, 1, 1, 0) == 0, "%s", mt_errmsg());
  REQUIRE(save_step(job, 30, 100, 1, 1, 0) == 0, "%s", mt_errmsg());
  /* 30: latest's target loses its manifest; 20 is the one to load */
  REQUIRE(unlink(step_path(job, 30, "manifest.json")) == 0, "unlink");
  mt_ckpt c;
  REQUIRE(mt_ckpt_find(job, -1, MT_CKPT_VERIFY_CHECKSUMS, &c) == 0, "%s", mt_errmsg());
  CHECK(c.step == 20, "loaded step %" PRId64, c.step);
  CHECK(c.skipped &&
            strstr(c.skipped, "latest names step_00000030, which has no committed manifest"),
        "skipped: %s", c.skipped);
  mt_ckpt_close(&c);
  CHECK(mt_ckpt_find(job, 30, MT_CKPT_VERIFY_SIZES, &c) == MT_ENOENT, "named step loaded");
  CHECK(strstr(mt_errmsg(), "step_00000030/manifest.json missing"), "%s", mt_errmsg());
  mt_ckpt_entry *e;
  size_t n;
  REQUIRE(mt_ckpt_list(job, &e, &n) == 0, "%s", mt_errmsg());
  CHECK(n == 2 && e[0].step == 10 && e[1].step == 20, "listed %zu", n);
  free(e);
  /* and with latest gone too, the newest committed directory is used */
  char path[512];
  snprintf(path, sizeof path, "%s/latest", job);
  unlink(path);
  REQUIRE(mt_ckpt_find(job, -1, MT_CKPT_VERIFY_SIZES, &c) == 0, "%s", mt_errmsg());
  CHECK(c.step == 20 && !c.skipped, "loaded step %" PRId64, c.step);
  mt_ckpt_close(&c);
  return 0;
}

/* A manifest is sealed: a digit changed in it (the seed here; Adam's count
 * or the data position in a real one), still valid JSON, is found on load,
 * and the previous checkpoint is used; named, it is refused. Unsealed, such
 * a change went through unnoticed. */
static int test_changed_manifest_fails_its_seal(void) {
  const char *job = tmp_path("sealed");
  REQUIRE(save_step(job, 10, 100, 1, 1, 0) == 0, "%s", mt_errmsg());
  REQUIRE(save_step(job, 20, 100, 1, 1, 0) == 0, "%s", mt_errmsg());
  FILE *fp = fopen(step_path(job, 20, "manifest.json"), "r");
  REQUIRE(fp, "open the manifest");
  static char text[1 << 16];
  size_t len = fread(text, 1, sizeof text - 1, fp);
  fclose(fp);
  text[len] = 0;
  char *seed = strstr(text, "\"seed\": 1234");
  REQUIRE(seed && strstr(text, "\"manifest_xxh3\": \""), "seed or seal not found:\n%.300s", text);
  seed[strlen("\"seed\": 123")] = '5';
  write_text(step_path(job, 20, "manifest.json"), text);
  mt_ckpt c;
  REQUIRE(mt_ckpt_find(job, -1, MT_CKPT_VERIFY_SIZES, &c) == 0, "%s", mt_errmsg());
  CHECK(c.step == 10 && c.skipped && strstr(c.skipped, "do not match its checksum"),
        "loaded step %" PRId64 ", skipped: %s", c.step, c.skipped ? c.skipped : "(nothing)");
  mt_ckpt_close(&c);
  CHECK(mt_ckpt_find(job, 20, MT_CKPT_VERIFY_SIZES, &c) == MT_ECORRUPT &&
            strstr(mt_errmsg(), "step_00000020/manifest.json: its contents do not match"),
        "%s", mt_errmsg());
  return 0;
}

static int test_corrupt_manifest_json_falls_back_to_previous(void) {
  const char *job = tmp_path("badjson");
  REQUIRE(save_step(job, 10, 100, 1, 1, 0) == 0, "%s", mt_errmsg());
  REQUIRE(save_step(job, 20, 100, 1, 1, 0) == 0, "%s", mt_errmsg());
  write_text(step_path(job, 20, "manifest.json"),
             "{\n \"format\": \"mtnlg-ckpt\",\n \"version\" 1\n}\n");
  mt_ckpt c;
  REQUIRE(mt_ckpt_find(job, -1, MT_CKPT_VERIFY_SIZES, &c) == 0, "%s", mt_errmsg());
  CHECK(c.step == 10, "loaded step %" PRId64, c.step);
  CHECK(c.skipped && strstr(c.skipped, "step_00000020/manifest.json: bad JSON at line 3"),
        "skipped: %s", c.skipped);
  mt_ckpt_close(&c);
  CHECK(mt_ckpt_find(job, 20, MT_CKPT_VERIFY_SIZES, &c) == MT_ECORRUPT, "named step loaded");
  CHECK(strstr(mt_errmsg(), "manifest.json: bad JSON at line 3"), "%s", mt_errmsg());
  printf("  refused as expected: %s\n", mt_errmsg());
  /* valid JSON, wrong fields: named too */
  write_text(step_path(job, 20, "manifest.json"),
             "{\"format\": \"mtnlg-ckpt\", \"version\": 1, \"job\": \"unit\"}");
  CHECK(mt_ckpt_find(job, 20, MT_CKPT_VERIFY_SIZES, &c) == MT_ECORRUPT, "named step loaded");
  CHECK(strstr(mt_errmsg(), "\"job_hash\" missing"), "%s", mt_errmsg());
  write_text(step_path(job, 20, "manifest.json"), "{\"format\": \"mtnlg-ckpt\", \"version\": 2}");
  CHECK(mt_ckpt_find(job, 20, MT_CKPT_VERIFY_SIZES, &c) == MT_ENOTSUP, "version 2 loaded");
  return 0;
}

/* What a kill leaves: a shard temp file mid-write (step 20), committed shards
 * without a manifest and a manifest temp file (step 30). */
static int test_temp_files_left_by_a_kill_are_never_read(void) {
  const char *job = tmp_path("kill");
  REQUIRE(save_step(job, 10, 500, 1, 1, 0) == 0, "%s", mt_errmsg());
  mt_ckpt_shard_desc d = {0, 0, 500, 3, ckpt_test_arrays};
  mt_ckpt_chunks ch = {0};
  float *v[3];
  const float *src[3];
  for (int a = 0; a < 3; a++) src[a] = v[a] = ckpt_test_slice(20, 0, 0, a, 0, 500);
  mt_ckpt_txn t;
  REQUIRE(mt_ckpt_begin(&t, job, 20) == 0, "%s", mt_errmsg());
  REQUIRE(mt_ckpt_shard_create(&t, &d, &ch) == 0, "%s", mt_errmsg());
  REQUIRE(mt_ckpt_shard_write(&t, &d, 0, 250, src, 0, &ch) == 0, "%s", mt_errmsg());
  REQUIRE(mt_ckpt_begin(&t, job, 30) == 0, "%s", mt_errmsg());
  REQUIRE(mt_ckpt_shard_create(&t, &d, &ch) == 0, "%s", mt_errmsg());
  REQUIRE(mt_ckpt_shard_write(&t, &d, 0, 500, src, 0, &ch) == 0, "%s", mt_errmsg());
  REQUIRE(mt_ckpt_shard_commit(&t, &d) == 0, "%s", mt_errmsg());
  for (int a = 0; a < 3; a++) free(v[a]);
  mt_ckpt_chunks_free(&ch);
  char from[512], to[512];
  snprintf(from, sizeof from, "%s", step_path(job, 10, "manifest.json"));
  snprintf(to, sizeof to, "%s", step_path(job, 30, "manifest.json.tmp.4242"));
  FILE *in = fopen(from, "rb"), *out = fopen(to, "wb");
  REQUIRE(in && out, "copy manifest");
  for (int ch2; (ch2 = fgetc(in)) != EOF;) fputc(ch2, out);
  fclose(in), fclose(out);
  REQUIRE(count_temp_files(job) == 2, "%d temp files", count_temp_files(job));

  mt_ckpt c;
  REQUIRE(mt_ckpt_find(job, -1, MT_CKPT_VERIFY_CHECKSUMS, &c) == 0, "%s", mt_errmsg());
  CHECK(c.step == 10 && !c.skipped, "loaded step %" PRId64 " (skipped %s)", c.step, c.skipped);
  mt_ckpt_close(&c);
  CHECK(mt_ckpt_find(job, 30, MT_CKPT_VERIFY_SIZES, &c) == MT_ENOENT, "uncommitted step loaded");
  mt_ckpt_entry *e;
  size_t n;
  REQUIRE(mt_ckpt_list(job, &e, &n) == 0, "%s", mt_errmsg());
  CHECK(n == 1 && e[0].step == 10 && e[0].latest, "listed %zu", n);
  free(e);
  /* newer than the newest commit: may be being written, so prune leaves them */
  int removed = -1;
  CHECK(mt_ckpt_prune(job, 1, 0, &removed) == 0 && removed == 0, "%s (removed %d)", mt_errmsg(),
        removed);
  CHECK(exists(step_path(job, 20, NULL)) && exists(step_path(job, 30, NULL)), "leftovers pruned");
  /* the step written again over its leftovers: a clean directory */
  REQUIRE(save_step(job, 20, 500, 1, 1, 0) == 0, "%s", mt_errmsg());
  DIR *dir = opendir(step_path(job, 20, NULL));
  int files = 0;
  for (struct dirent *x; dir && (x = readdir(dir));) files += x->d_name[0] != '.';
  if (dir) closedir(dir);
  CHECK(files == 2, "step 20 holds %d files, expected the shard and the manifest", files);
  /* a commit past 30: the older leftover goes */
  REQUIRE(save_step(job, 40, 500, 1, 1, 0) == 0, "%s", mt_errmsg());
  CHECK(mt_ckpt_prune(job, 2, 0, &removed) == 0 && removed == 2, "%s (removed %d)", mt_errmsg(),
        removed);
  CHECK(!exists(step_path(job, 10, NULL)) && !exists(step_path(job, 30, NULL)) &&
            exists(step_path(job, 20, NULL)) && exists(step_path(job, 40, NULL)),
        "wrong directories pruned");
  CHECK(count_temp_files(job) == 0, "temp files left");
  return 0;
}

static int test_retention_keeps_last_two_and_every_fifth(void) {
  const char *job = tmp_path("retain");
  int total = 0, removed;
  for (int64_t s = 1; s <= 12; s++) {
    REQUIRE(save_step(job, s, 64, 1, 1, 0) == 0, "%s", mt_errmsg());
    REQUIRE(mt_ckpt_prune(job, 2, 5, &removed) == 0, "%s", mt_errmsg());
    total += removed;
  }
  mt_ckpt_entry *e;
  size_t n;
  REQUIRE(mt_ckpt_list(job, &e, &n) == 0, "%s", mt_errmsg());
  int64_t want[] = {5, 10, 11, 12};
  CHECK(n == 4, "%zu kept", n);
  for (size_t i = 0; i < n && i < 4; i++)
    CHECK(e[i].step == want[i], "kept step %" PRId64, e[i].step);
  CHECK(n == 4 && e[3].latest && !e[2].latest, "latest flag");
  free(e);
  CHECK(total == 8, "removed %d", total);
  /* latest's target is kept whatever keep says (an operator rolled back to
   * 10), and what is newer than it is neither counted nor removed */
  char path[512];
  snprintf(path, sizeof path, "%s/latest", job);
  write_text(path, "step_00000010\n");
  CHECK(mt_ckpt_prune(job, 1, 0, &removed) == 0 && removed == 1, "%s (removed %d)", mt_errmsg(),
        removed);
  CHECK(exists(step_path(job, 10, NULL)) && exists(step_path(job, 11, NULL)) &&
            exists(step_path(job, 12, NULL)) && !exists(step_path(job, 5, NULL)),
        "kept the wrong ones");
  /* keep 2 under latest 10 keeps 10 and the one before it, not 11 and 12 */
  REQUIRE(save_step(job, 8, 64, 1, 1, 0) == 0 && save_step(job, 9, 64, 1, 1, 0) == 0, "%s",
          mt_errmsg());
  write_text(path, "step_00000010\n");
  CHECK(mt_ckpt_prune(job, 2, 0, &removed) == 0 && removed == 1, "%s (removed %d)", mt_errmsg(),
        removed);
  CHECK(exists(step_path(job, 9, NULL)) && exists(step_path(job, 10, NULL)) &&
            !exists(step_path(job, 8, NULL)) && exists(step_path(job, 11, NULL)),
        "keep 2 under latest 10 kept the wrong ones");
  CHECK(mt_ckpt_prune(job, 0, 0, &removed) == 0 && removed == 0, "keep 0 removed %d", removed);
  return 0;
}

/* Retention removes what an operator or a tool left inside a step
 * directory, subdirectories too (links in them removed, not followed), and
 * a directory it cannot remove does not keep it from the others: it is
 * named, and tried again at the next prune. */
static int test_retention_removes_subdirectories_and_carries_on_past_a_failure(void) {
  const char *job = tmp_path("retain-stuck"), *outside = tmp_path("retain-outside");
  for (int64_t s = 1; s <= 4; s++) REQUIRE(save_step(job, s, 64, 1, 1, 0) == 0, "%s", mt_errmsg());
  write_text(outside, "not the checkpoint's\n");
  char path[1024];
  snprintf(path, sizeof path, "%s", step_path(job, 1, "notes"));
  REQUIRE(!mkdir(path, 0755), "mkdir %s: %s", path, strerror(errno));
  snprintf(path, sizeof path, "%s", step_path(job, 1, "notes/eval.txt"));
  write_text(path, "loss 2.1\n");
  snprintf(path, sizeof path, "%s", step_path(job, 1, "notes/outside"));
  REQUIRE(!symlink(outside, path), "symlink: %s", strerror(errno));
  /* step 2: nested deeper than removal goes, so it cannot be removed */
  snprintf(path, sizeof path, "%s", step_path(job, 2, NULL));
  for (int i = 0; i < 40; i++) {
    strcat(path, "/d");
    REQUIRE(!mkdir(path, 0755), "mkdir %s: %s", path, strerror(errno));
  }
  for (int round = 0; round < 2; round++) {
    int removed = -1;
    int rc = mt_ckpt_prune(job, 1, 0, &removed);
    CHECK(rc == MT_EIO && strstr(mt_errmsg(), "1 step directory could not be removed"),
          "round %d: rc %d: %s", round, rc, mt_errmsg());
    CHECK(removed == (round ? 0 : 2), "round %d: removed %d", round, removed);
  }
  CHECK(!exists(step_path(job, 1, NULL)) && !exists(step_path(job, 3, NULL)),
        "steps 1 and 3 were kept");
  CHECK(exists(step_path(job, 2, NULL)) && !exists(step_path(job, 2, "manifest.json")),
        "step 2: gone, or still committed");
  CHECK(exists(step_path(job, 4, "manifest.json")), "the newest was removed");
  CHECK(exists(outside), "the file a link pointed at was removed through it");
  /* a latest temp file a crash left goes once it is a minute old; a fresh
   * one may be being written */
  char old_tmp[600], new_tmp[600];
  snprintf(old_tmp, sizeof old_tmp, "%s/latest.tmp.1234.deadbeef", job);
  snprintf(new_tmp, sizeof new_tmp, "%s/latest.tmp.1235.cafef00d", job);
  write_text(old_tmp, "step_00000003\n");
  write_text(new_tmp, "step_00000004\n");
  struct timespec ago[2] = {{.tv_sec = time(NULL) - 120}, {.tv_sec = time(NULL) - 120}};
  REQUIRE(!utimensat(AT_FDCWD, old_tmp, ago, 0), "utimensat: %s", strerror(errno));
  int removed = -1;
  mt_ckpt_prune(job, 1, 0, &removed);
  CHECK(!exists(old_tmp) && exists(new_tmp), "old latest temp kept %d, fresh one removed %d",
        exists(old_tmp), !exists(new_tmp));
  return 0;
}

/* A step directory that is a link to another job's (an operator's warm
 * start) is pruned as a link: the other job's checkpoint stays whole. */
static int test_retention_removes_a_linked_step_only_as_a_link(void) {
  const char *a = tmp_path("linked-a"), *b = tmp_path("linked-b");
  REQUIRE(save_step(a, 1, 64, 1, 1, 0) == 0, "%s", mt_errmsg());
  REQUIRE(save_step(b, 5, 64, 1, 1, 0) == 0 && save_step(b, 6, 64, 1, 1, 0) == 0, "%s",
          mt_errmsg());
  char target[512];
  snprintf(target, sizeof target, "%s", step_path(a, 1, NULL));
  REQUIRE(!symlink(target, step_path(b, 1, NULL)), "symlink: %s", strerror(errno));
  int removed = 0;
  CHECK(mt_ckpt_prune(b, 1, 0, &removed) == 0 && removed == 2, "%s (removed %d)", mt_errmsg(),
        removed);
  struct stat st;
  CHECK(lstat(step_path(b, 1, NULL), &st) && exists(step_path(b, 6, NULL)),
        "the link or the newest step of b");
  mt_ckpt r;
  int found = exists(step_path(a, 1, "manifest.json")) &&
              mt_ckpt_find(a, 1, MT_CKPT_VERIFY_CHECKSUMS, &r) == 0;
  CHECK(found, "a's step 1 was harmed through the link: %s", mt_errmsg());
  if (found) mt_ckpt_close(&r);
  return 0;
}

/* A damaged step that is a link to another job's is set aside as a link (the
 * other job's files stay), and a link to nothing at a step does not stop
 * that step's save. */
static int test_linked_step_set_aside_as_link_and_dangling_link_replaced(void) {
  const char *a = tmp_path("alink-a"), *b = tmp_path("alink-b");
  REQUIRE(save_step(a, 3, 64, 1, 1, 0) == 0, "%s", mt_errmsg());
  REQUIRE(save_step(b, 2, 64, 1, 1, 0) == 0, "%s", mt_errmsg());
  char target[512], to[600], want[600];
  snprintf(target, sizeof target, "%s", step_path(a, 3, NULL));
  REQUIRE(!symlink(target, step_path(b, 3, NULL)), "symlink: %s", strerror(errno));
  CHECK(mt_ckpt_set_aside(b, 3, 2, to, sizeof to) == 0, "%s", mt_errmsg());
  snprintf(want, sizeof want, "%s.damaged", step_path(b, 3, NULL));
  struct stat st;
  CHECK(!strcmp(to, want) && !lstat(want, &st) && S_ISLNK(st.st_mode), "moved to %s", to);
  CHECK(exists(step_path(a, 3, "manifest.json")) && !lstat(step_path(a, 3, NULL), &st) &&
            S_ISDIR(st.st_mode),
        "a's step 3 was moved or harmed through the link");
  /* a link to nothing: set aside refuses it by name, a save of its step replaces it */
  char gone[512];
  snprintf(gone, sizeof gone, "%s/nowhere", a);
  REQUIRE(!symlink(gone, step_path(b, 4, NULL)), "symlink: %s", strerror(errno));
  CHECK(mt_ckpt_set_aside(b, 4, 2, to, sizeof to) == MT_ENOENT &&
            strstr(mt_errmsg(), "a link to nothing"),
        "set aside a dangling link: %s", mt_errmsg());
  CHECK(save_step(b, 4, 64, 1, 1, 0) == 0, "save over a dangling link: %s", mt_errmsg());
  mt_ckpt r;
  int found = !lstat(step_path(b, 4, NULL), &st) && S_ISDIR(st.st_mode) &&
              mt_ckpt_find(b, 4, MT_CKPT_VERIFY_CHECKSUMS, &r) == 0;
  CHECK(found, "step 4 of b: %s", mt_errmsg());
  if (found) mt_ckpt_close(&r);
  return 0;
}

/* In a child limited to limit_bytes per file: save step (n floats), which must
 * fail; returns the child's message through out. 0 when it failed cleanly. */
static int save_over_limit(const char *job, int64_t step, uint64_t n, rlim_t limit_bytes, char *out,
                           size_t cap) {
  int fds[2];
  if (pipe(fds)) return -1;
  pid_t pid = fork();
  if (pid == 0) {
    close(fds[0]);
    signal(SIGXFSZ, SIG_IGN);
    struct rlimit rl = {limit_bytes, limit_bytes};
    setrlimit(RLIMIT_FSIZE, &rl);
    int rc = save_step(job, step, n, 1, 1, 0);
    const char *msg = rc ? mt_errmsg() : "saved despite the limit";
    ssize_t w = write(fds[1], msg, strlen(msg));
    (void)w;
    _exit(rc < 0 ? 0 : 1);
  }
  close(fds[1]);
  size_t k = 0;
  ssize_t r;
  while (k < cap - 1 && (r = read(fds[0], out + k, cap - 1 - k)) > 0) k += (size_t)r;
  out[k] = 0;
  close(fds[0]);
  int status;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

static int test_disk_full_fails_cleanly_and_keeps_previous(void) {
  const char *job = tmp_path("full");
  REQUIRE(save_step(job, 1, 16, 1, 1, 0) == 0, "%s", mt_errmsg());
  char msg[2048], latest[512];
  snprintf(latest, sizeof latest, "%s/latest", job);
  /* the shard does not fit: refused when its space is reserved */
  CHECK(save_over_limit(job, 2, 4096, 16384, msg, sizeof msg) == 0, "child: %s", msg);
  CHECK(strstr(msg, "step_00000002/shard_tp00_pp000.bin.tmp.") && strstr(msg, "File too large"),
        "message: %s", msg);
  printf("  failed as expected: %s\n", msg);
  CHECK(!exists(step_path(job, 2, NULL)), "the failed step's directory was left");
  /* the shard fits, the manifest does not */
  CHECK(save_over_limit(job, 3, 16, 300, msg, sizeof msg) == 0, "child: %s", msg);
  CHECK(strstr(msg, "step_00000003") && strstr(msg, "manifest.json") &&
            strstr(msg, "File too large"),
        "message: %s", msg);
  printf("  failed as expected: %s\n", msg);
  CHECK(!exists(step_path(job, 3, NULL)), "the failed step's directory was left");
  const char *text = read_text(latest);
  CHECK(text && !strcmp(text, "step_00000001\n"), "latest holds %s", text ? text : "(none)");
  CHECK(count_temp_files(job) == 0, "temp files left");
  mt_ckpt c;
  REQUIRE(mt_ckpt_find(job, -1, MT_CKPT_VERIFY_CHECKSUMS, &c) == 0, "%s", mt_errmsg());
  CHECK(c.step == 1 && !c.skipped && data_matches(&c), "previous checkpoint");
  mt_ckpt_close(&c);
  return 0;
}

/* ---- verification spread over ranks ---- */

static int test_verify_file_names_the_bad_shard_only(void) {
  const char *job = tmp_path("verify_file");
  REQUIRE(save_step(job, 10, 3000, 2, 1, 4096) == 0, "%s", mt_errmsg());
  mt_ckpt c;
  REQUIRE(mt_ckpt_find(job, 10, MT_CKPT_VERIFY_SIZES, &c) == 0, "%s", mt_errmsg());
  CHECK(mt_ckpt_verify_file(&c, 0, 0) == 0, "%s", mt_errmsg());
  CHECK(mt_ckpt_verify_file(&c, 1, 0) == 0, "%s", mt_errmsg());
  CHECK(mt_ckpt_verify_file(&c, 2, 0) == MT_EINVAL, "a shard outside the layout verified");
  /* a flipped byte after the cheap checks passed: that file fails, named with its chunk */
  uint64_t off = 64 + 12000 + 5000;
  char want[256];
  flipped_chunk_message(want, sizeof want, &c, off);
  flip_byte(step_path(job, 10, "shard_tp01_pp000.bin"), off);
  CHECK(mt_ckpt_verify_file(&c, 1, 0) == MT_ECORRUPT, "a flipped byte passed");
  CHECK(strstr(mt_errmsg(), want) && strstr(mt_errmsg(), " expected "), "%s\nwanted: %s",
        mt_errmsg(), want);
  printf("  found as expected: %s\n", mt_errmsg());
  /* the same words as the whole checkpoint's check */
  char whole[1024];
  mt_ckpt c2;
  CHECK(mt_ckpt_find(job, 10, MT_CKPT_VERIFY_CHECKSUMS, &c2) == MT_ECORRUPT, "named step loaded");
  snprintf(whole, sizeof whole, "%s", mt_errmsg());
  CHECK(mt_ckpt_verify_file(&c, 1, 0) == MT_ECORRUPT && !strcmp(whole, mt_errmsg()),
        "whole: %s\nfile: %s", whole, mt_errmsg());
  /* the other shard of the same checkpoint still passes */
  CHECK(mt_ckpt_verify_file(&c, 0, 0) == 0, "%s", mt_errmsg());
  /* damage of the size too (after the open) */
  REQUIRE(truncate(step_path(job, 10, "shard_tp00_pp000.bin"), 1000) == 0, "truncate");
  CHECK(mt_ckpt_verify_file(&c, 0, 0) == MT_ECORRUPT &&
            strstr(mt_errmsg(), "step_00000010/shard_tp00_pp000.bin truncated: 1000 of"),
        "%s", mt_errmsg());
  mt_ckpt_close(&c);
  return 0;
}

static int test_find_below_skips_to_the_older_step(void) {
  const char *job = tmp_path("below");
  for (int64_t s = 10; s <= 30; s += 10)
    REQUIRE(save_step(job, s, 100, 1, 1, 0) == 0, "%s", mt_errmsg());
  mt_ckpt c;
  REQUIRE(mt_ckpt_find_below(job, INT64_MAX, MT_CKPT_VERIFY_SIZES, &c) == 0, "%s", mt_errmsg());
  CHECK(c.step == 30 && !c.skipped, "below everything: step %" PRId64, c.step);
  mt_ckpt_close(&c);
  REQUIRE(mt_ckpt_find_below(job, 30, MT_CKPT_VERIFY_CHECKSUMS, &c) == 0, "%s", mt_errmsg());
  CHECK(c.step == 20 && !c.skipped && data_matches(&c), "below 30: step %" PRId64, c.step);
  mt_ckpt_close(&c);
  REQUIRE(mt_ckpt_find_below(job, 25, MT_CKPT_VERIFY_SIZES, &c) == 0, "%s", mt_errmsg());
  CHECK(c.step == 20, "below 25: step %" PRId64, c.step);
  mt_ckpt_close(&c);
  REQUIRE(mt_ckpt_find_below(job, 20, MT_CKPT_VERIFY_SIZES, &c) == 0, "%s", mt_errmsg());
  CHECK(c.step == 10, "below 20: step %" PRId64, c.step);
  mt_ckpt_close(&c);
  CHECK(mt_ckpt_find_below(job, 10, MT_CKPT_VERIFY_SIZES, &c) == MT_ENOENT, "found below 10");
  CHECK(strstr(mt_errmsg(), "below step 10"), "%s", mt_errmsg());
  /* never newer than latest's target (rolled back to 20): 30 is no candidate */
  char latest[512];
  snprintf(latest, sizeof latest, "%s/latest", job);
  write_text(latest, "step_00000020\n");
  REQUIRE(mt_ckpt_find_below(job, INT64_MAX, MT_CKPT_VERIFY_SIZES, &c) == 0, "%s", mt_errmsg());
  CHECK(c.step == 20, "rolled back: step %" PRId64, c.step);
  mt_ckpt_close(&c);
  REQUIRE(mt_ckpt_find_below(job, 40, MT_CKPT_VERIFY_SIZES, &c) == 0, "%s", mt_errmsg());
  CHECK(c.step == 20, "rolled back, below 40: step %" PRId64, c.step);
  mt_ckpt_close(&c);
  /* one that fails the cheap checks is skipped, as mt_ckpt_find skips it */
  write_text(latest, "step_00000030\n");
  REQUIRE(truncate(step_path(job, 20, "shard_tp00_pp000.bin"), 100) == 0, "truncate");
  REQUIRE(mt_ckpt_find_below(job, 30, MT_CKPT_VERIFY_SIZES, &c) == 0, "%s", mt_errmsg());
  CHECK(c.step == 10, "loaded step %" PRId64, c.step);
  CHECK(c.skipped && strstr(c.skipped, "step_00000020/shard_tp00_pp000.bin truncated"),
        "skipped: %s", c.skipped);
  mt_ckpt_close(&c);
  REQUIRE(truncate(step_path(job, 10, "shard_tp00_pp000.bin"), 100) == 0, "truncate");
  CHECK(mt_ckpt_find_below(job, 30, MT_CKPT_VERIFY_SIZES, &c) == MT_ECORRUPT, "a bad one loaded");
  CHECK(strstr(mt_errmsg(), "passed its checks") && strstr(mt_errmsg(), "step_00000020/") &&
            strstr(mt_errmsg(), "step_00000010/") && !strstr(mt_errmsg(), "step_00000030/"),
        "%s", mt_errmsg());
  /* and mt_ckpt_find still takes the latest */
  REQUIRE(mt_ckpt_find(job, -1, MT_CKPT_VERIFY_CHECKSUMS, &c) == 0, "%s", mt_errmsg());
  CHECK(c.step == 30 && !c.skipped, "latest: step %" PRId64, c.step);
  mt_ckpt_close(&c);
  return 0;
}

/* ---- list and verify ---- */

typedef struct problems {
  int n;
  char text[4][512];
} problems;

static void collect(void *arg, const char *problem) {
  problems *p = arg;
  if (p->n < 4) snprintf(p->text[p->n], sizeof p->text[0], "%s", problem);
  p->n++;
}

static int test_list_and_verify_report_every_problem(void) {
  const char *job = tmp_path("verify");
  for (int64_t s = 10; s <= 30; s += 10)
    REQUIRE(save_step(job, s, 2000, 2, 1, 1024) == 0, "%s", mt_errmsg());
  mt_ckpt_entry *e;
  size_t n;
  REQUIRE(mt_ckpt_list(job, &e, &n) == 0, "%s", mt_errmsg());
  REQUIRE(n == 3, "listed %zu", n);
  for (size_t i = 0; i < n; i++) {
    struct stat st;
    uint64_t want = 2 * (64 + 3 * 4 * 2000);
    if (!stat(step_path(job, e[i].step, "manifest.json"), &st)) want += (uint64_t)st.st_size;
    CHECK(e[i].bytes == want, "step %" PRId64 ": %" PRIu64 " bytes, expected %" PRIu64, e[i].step,
          e[i].bytes, want);
    CHECK(e[i].created > 1700000000, "created %" PRId64, e[i].created);
    CHECK(e[i].latest == (i == 2), "latest flag of %" PRId64, e[i].step);
    CHECK(!strcmp(e[i].path, step_path(job, e[i].step, NULL)), "path %s", e[i].path);
  }
  free(e);

  problems p = {0};
  CHECK(mt_ckpt_verify(step_path(job, 10, NULL), collect, &p) == 0 && p.n == 0, "%s", mt_errmsg());
  flip_byte(step_path(job, 20, "shard_tp00_pp000.bin"), 64 + 10);
  flip_byte(step_path(job, 20, "shard_tp00_pp000.bin"), 64 + 8000 * 2 + 10);
  REQUIRE(truncate(step_path(job, 20, "shard_tp01_pp000.bin"), 4000) == 0, "truncate");
  CHECK(mt_ckpt_verify(step_path(job, 20, NULL), collect, &p) == MT_ECORRUPT, "damage missed");
  CHECK(p.n == 3, "%d problems reported", p.n);
  CHECK(strstr(p.text[0], "step_00000020/shard_tp00_pp000.bin chunk 1 (offset 64, 1024 bytes)"),
        "%s", p.text[0]);
  CHECK(strstr(p.text[1], "step_00000020/shard_tp00_pp000.bin chunk "), "%s", p.text[1]);
  CHECK(strstr(p.text[2], "shard_tp01_pp000.bin truncated: 4000 of 24064 bytes"), "%s", p.text[2]);
  CHECK(strstr(mt_errmsg(), "(and 2 more problems)"), "%s", mt_errmsg());
  for (int i = 0; i < p.n && i < 4; i++) printf("  reported: %s\n", p.text[i]);
  p.n = 0;
  unlink(step_path(job, 30, "manifest.json"));
  CHECK(mt_ckpt_verify(step_path(job, 30, NULL), collect, &p) == MT_ENOENT && p.n == 1 &&
            strstr(p.text[0], "manifest.json missing"),
        "%s", p.text[0]);
  return 0;
}

/* ---- setting damaged checkpoints aside ---- */

/* After a resume fell back from a damaged 30 to 20: 30 moves to
 * step_00000030.damaged with its bytes, latest names 20, and neither finding,
 * listing nor retention sees the moved directory again; 30 can be saved anew. */
static int test_set_aside_moves_a_damaged_step_out_of_every_scan(void) {
  const char *job = tmp_path("aside");
  for (int64_t s = 10; s <= 30; s += 10)
    REQUIRE(save_step(job, s, 3000, 2, 1, 4096) == 0, "%s", mt_errmsg());
  uint64_t off = 64 + 12000 + 5000;
  flip_byte(step_path(job, 30, "shard_tp01_pp000.bin"), off);
  mt_ckpt c;
  REQUIRE(mt_ckpt_find(job, -1, MT_CKPT_VERIFY_CHECKSUMS, &c) == 0, "%s", mt_errmsg());
  CHECK(c.step == 20, "loaded step %" PRId64, c.step);
  CHECK(c.n_damaged == 1 && c.damaged[0].step == 30 &&
            strstr(c.damaged[0].why, "step_00000030/shard_tp01_pp000.bin chunk"),
        "%d damaged: %s", c.n_damaged, c.n_damaged ? c.damaged[0].why : "");
  mt_ckpt_close(&c);

  char to[MT_CKPT_PATH_MAX], want[512], latest[512];
  snprintf(latest, sizeof latest, "%s/latest", job);
  REQUIRE(mt_ckpt_set_aside(job, 30, 20, to, sizeof to) == 0, "%s", mt_errmsg());
  snprintf(want, sizeof want, "%s.damaged", step_path(job, 30, NULL));
  CHECK(!strcmp(to, want), "moved to %s", to);
  CHECK(!exists(step_path(job, 30, NULL)), "step 30 still in place");
  const char *text = read_text(latest);
  CHECK(text && !strcmp(text, "step_00000020\n"), "latest holds %s", text ? text : "(none)");
  /* kept as it was, damage and all, for whoever wants to look at it */
  problems p = {0};
  CHECK(mt_ckpt_verify(to, collect, &p) == MT_ECORRUPT && p.n == 1 &&
            strstr(p.text[0], "step_00000030.damaged/shard_tp01_pp000.bin chunk"),
        "%d problems: %s", p.n, p.text[0]);

  /* no scan sees it: find, find_below, list (and so ckpt verify) */
  REQUIRE(mt_ckpt_find(job, -1, MT_CKPT_VERIFY_CHECKSUMS, &c) == 0, "%s", mt_errmsg());
  CHECK(c.step == 20 && !c.skipped && !c.n_damaged, "loaded step %" PRId64 ", skipped %s", c.step,
        c.skipped ? c.skipped : "nothing");
  mt_ckpt_close(&c);
  CHECK(mt_ckpt_find(job, 30, MT_CKPT_VERIFY_SIZES, &c) == MT_ENOENT, "step 30 found");
  REQUIRE(mt_ckpt_find_below(job, INT64_MAX, MT_CKPT_VERIFY_SIZES, &c) == 0, "%s", mt_errmsg());
  CHECK(c.step == 20, "below everything: step %" PRId64, c.step);
  mt_ckpt_close(&c);
  mt_ckpt_entry *e;
  size_t n;
  REQUIRE(mt_ckpt_list(job, &e, &n) == 0, "%s", mt_errmsg());
  CHECK(n == 2 && e[0].step == 10 && e[1].step == 20 && e[1].latest, "listed %zu", n);
  free(e);

  /* the step saves again; damaged again, it goes to the next free name (an
   * empty directory of a name is not replaced); latest already names the
   * loaded step, as for the second of two damaged ones, and stays */
  REQUIRE(save_step(job, 30, 3000, 2, 1, 4096) == 0, "%s", mt_errmsg());
  text = read_text(latest);
  CHECK(text && !strcmp(text, "step_00000030\n"), "latest holds %s", text ? text : "(none)");
  flip_byte(step_path(job, 30, "shard_tp00_pp000.bin"), 64 + 7);
  write_text(latest, "step_00000020\n");
  snprintf(want, sizeof want, "%s.damaged.2", step_path(job, 30, NULL));
  REQUIRE(mkdir(want, 0755) == 0, "mkdir %s", want);
  REQUIRE(mt_ckpt_set_aside(job, 30, 20, to, sizeof to) == 0, "%s", mt_errmsg());
  snprintf(want, sizeof want, "%s.damaged.3", step_path(job, 30, NULL));
  CHECK(!strcmp(to, want), "moved to %s", to);
  snprintf(want, sizeof want, "%s.damaged.2/manifest.json", step_path(job, 30, NULL));
  CHECK(!exists(want), "the empty directory was replaced");
  snprintf(want, sizeof want, "%s.damaged/manifest.json", step_path(job, 30, NULL));
  CHECK(exists(want), "the first one set aside is gone");
  text = read_text(latest);
  CHECK(text && !strcmp(text, "step_00000020\n"), "latest holds %s", text ? text : "(none)");

  /* retention neither counts nor removes them */
  REQUIRE(save_step(job, 40, 100, 1, 1, 0) == 0, "%s", mt_errmsg());
  REQUIRE(save_step(job, 50, 100, 1, 1, 0) == 0, "%s", mt_errmsg());
  int removed = 0;
  CHECK(mt_ckpt_prune(job, 1, 0, &removed) == 0 && removed == 3, "%s (removed %d)", mt_errmsg(),
        removed);
  CHECK(!exists(step_path(job, 20, NULL)) && exists(step_path(job, 50, NULL)), "pruned wrong");
  const char *kept[] = {".damaged", ".damaged.2", ".damaged.3"};
  for (int i = 0; i < 3; i++) {
    snprintf(want, sizeof want, "%s%s", step_path(job, 30, NULL), kept[i]);
    CHECK(exists(want), "%s pruned", want);
  }

  /* refused, and nothing touched: the loaded step must be committed and older */
  CHECK(mt_ckpt_set_aside(job, 50, 50, to, sizeof to) == MT_EINVAL, "set aside the loaded one");
  CHECK(mt_ckpt_set_aside(job, 50, 45, to, sizeof to) == MT_EINVAL, "latest to a missing step");
  CHECK(strstr(mt_errmsg(), "step_00000045") && !to[0], "%s", mt_errmsg());
  CHECK(mt_ckpt_set_aside(job, 60, 50, to, sizeof to) == MT_ENOENT, "a missing step moved");
  text = read_text(latest);
  CHECK(exists(step_path(job, 50, NULL)) && text && !strcmp(text, "step_00000050\n"),
        "latest holds %s", text ? text : "(none)");
  return 0;
}

/* A find notes as damaged what its checks found broken, not what it could
 * not read or was written by a newer format. */
static int test_find_notes_damaged_not_unreadable_steps(void) {
  const char *job = tmp_path("damage_kinds");
  for (int64_t s = 10; s <= 40; s += 10)
    REQUIRE(save_step(job, s, 100, 1, 1, 0) == 0, "%s", mt_errmsg());
  REQUIRE(truncate(step_path(job, 40, "shard_tp00_pp000.bin"), 100) == 0, "truncate");
  write_text(step_path(job, 30, "manifest.json"), "{\"format\": \"mtnlg-ckpt\", \"version\": 2}");
  write_text(step_path(job, 20, "manifest.json"), "{\"format\": \"mtnlg-ckpt\",");
  mt_ckpt c;
  REQUIRE(mt_ckpt_find(job, -1, MT_CKPT_VERIFY_SIZES, &c) == 0, "%s", mt_errmsg());
  CHECK(c.step == 10, "loaded step %" PRId64, c.step);
  CHECK(c.skipped && strstr(c.skipped, "step_00000030/manifest.json: format version 2"),
        "skipped: %s", c.skipped);
  CHECK(c.n_damaged == 2 && c.damaged[0].step == 40 && c.damaged[1].step == 20 &&
            strstr(c.damaged[0].why, "step_00000040/shard_tp00_pp000.bin truncated") &&
            strstr(c.damaged[1].why, "step_00000020/manifest.json: bad JSON"),
        "%d damaged", c.n_damaged);
  mt_ckpt_close(&c);
  return 0;
}

static int test_bad_arguments_are_refused(void) {
  const char *job = tmp_path("args");
  mt_ckpt_txn t;
  mt_ckpt_chunks ch = {0};
  REQUIRE(mt_ckpt_begin(&t, job, 1) == 0, "%s", mt_errmsg());
  const char *const bad_names[] = {"master", "adam m"};
  const char *const twice[] = {"master", "master"};
  mt_ckpt_shard_desc d[] = {
      {100, 0, 10, 3, ckpt_test_arrays},
      {0, 1000, 10, 3, ckpt_test_arrays},
      {0, 0, 0, 3, ckpt_test_arrays},
      {0, 0, 10, 2, bad_names},
      {0, 0, 10, 2, twice},
      {0, 0, 10, 9, ckpt_test_arrays},
  };
  for (size_t i = 0; i < sizeof d / sizeof d[0]; i++)
    CHECK(mt_ckpt_shard_create(&t, &d[i], &ch) == MT_EINVAL, "desc %zu accepted", i);
  mt_ckpt_shard_desc ok = {0, 0, 10, 3, ckpt_test_arrays};
  float v[10] = {0};
  const float *src[3] = {v, v, v};
  REQUIRE(mt_ckpt_shard_create(&t, &ok, &ch) == 0, "%s", mt_errmsg());
  CHECK(mt_ckpt_shard_write(&t, &ok, 5, 6, src, 0, &ch) == MT_EINVAL, "slice past the end");
  CHECK(mt_ckpt_shard_write(&t, &ok, 0, 10, src, 8, &ch) == MT_EINVAL, "chunk_bytes 8");
  CHECK(ch.n == 1, "%zu records after refusals", ch.n);
  mt_ckpt_meta m = meta_for(2, 1, 1, 1);
  CHECK(mt_ckpt_commit(&t, &m, &ok, 1, &ch) == MT_EINVAL, "meta of another step accepted");
  m = meta_for(1, 2, 1, 1);
  CHECK(mt_ckpt_commit(&t, &m, &ok, 1, &ch) == MT_EINVAL, "1 shard for tp 2 accepted");
  m = meta_for(1, 1, 1, 1);
  CHECK(mt_ckpt_commit(&t, &m, &ok, 1, &ch) == MT_EIO, "uncommitted shard accepted");
  CHECK(strstr(mt_errmsg(), "shard_tp00_pp000.bin"), "%s", mt_errmsg());
  mt_ckpt_abort(&t);
  CHECK(!exists(step_path(job, 1, NULL)), "abort left the directory");
  CHECK(mt_ckpt_txn_set(&t, job, 1, "a/b") == MT_EINVAL, "tag with a slash");
  CHECK(mt_ckpt_begin(&t, job, -1) == MT_EINVAL, "negative step");
  mt_ckpt_chunks_free(&ch);
  return 0;
}

static const struct {
  const char *name;
  int (*fn)(void);
} tests[] = {
    {"one_writer_round_trip_is_bit_exact", test_one_writer_round_trip_is_bit_exact},
    {"three_writers_load_under_any_slicing", test_three_writers_load_under_any_slicing},
    {"manifest_records_every_field", test_manifest_records_every_field},
    {"latest_names_the_newest_commit", test_latest_names_the_newest_commit},
    {"flipped_byte_falls_back_to_previous", test_flipped_byte_falls_back_to_previous},
    {"truncated_shard_falls_back_to_previous", test_truncated_shard_falls_back_to_previous},
    {"list_marks_a_truncated_shard_or_another_steps_manifest_damaged",
     test_list_marks_a_truncated_shard_or_another_steps_manifest_damaged},
    {"missing_shard_falls_back_to_previous", test_missing_shard_falls_back_to_previous},
    {"dir_without_manifest_is_not_a_checkpoint", test_dir_without_manifest_is_not_a_checkpoint},
    {"corrupt_manifest_json_falls_back_to_previous",
     test_corrupt_manifest_json_falls_back_to_previous},
    {"test_changed_manifest_fails_its_seal", test_changed_manifest_fails_its_seal},
    {"temp_files_left_by_a_kill_are_never_read", test_temp_files_left_by_a_kill_are_never_read},
    {"retention_keeps_last_two_and_every_fifth", test_retention_keeps_last_two_and_every_fifth},
    {"retention_removes_subdirectories_and_carries_on_past_a_failure",
     test_retention_removes_subdirectories_and_carries_on_past_a_failure},
    {"retention_removes_a_linked_step_only_as_a_link",
     test_retention_removes_a_linked_step_only_as_a_link},
    {"linked_step_set_aside_as_link_and_dangling_link_replaced",
     test_linked_step_set_aside_as_link_and_dangling_link_replaced},
    {"disk_full_fails_cleanly_and_keeps_previous", test_disk_full_fails_cleanly_and_keeps_previous},
    {"verify_file_names_the_bad_shard_only", test_verify_file_names_the_bad_shard_only},
    {"find_below_skips_to_the_older_step", test_find_below_skips_to_the_older_step},
    {"list_and_verify_report_every_problem", test_list_and_verify_report_every_problem},
    {"set_aside_moves_a_damaged_step_out_of_every_scan",
     test_set_aside_moves_a_damaged_step_out_of_every_scan},
    {"find_notes_damaged_not_unreadable_steps", test_find_notes_damaged_not_unreadable_steps},
    {"bad_arguments_are_refused", test_bad_arguments_are_refused},
};

int main(void) {
  mt_log_set_level(MT_LOG_WARN);
  snprintf(tmpdir, sizeof tmpdir, "/tmp/mt_test_ckpt.XXXXXX");
  if (!mkdtemp(tmpdir)) {
    perror("mkdtemp");
    return 2;
  }
  for (size_t i = 0; i < sizeof tests / sizeof tests[0]; i++) {
    double t0 = now_s();
    int rc = tests[i].fn();
    printf("%s %s (%.2f s)\n", rc ? "FAIL" : "ok  ", tests[i].name, now_s() - t0);
    failures += rc != 0;
  }
  char cmd[128];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
  if (system(cmd)) fprintf(stderr, "could not remove %s\n", tmpdir);
  printf("%d of %zu failed\n", failures, sizeof tests / sizeof tests[0]);
  return failures ? 1 : 0;
}
