/* ckpt_write.c — writing a checkpoint: shard temp files filled by many
 * writers, renamed when complete; the manifest and `latest` as the commit.
 *
 * Crash safety comes from ordering alone: a shard has its final name only
 * after every writer fsynced its slices; manifest.json appears (temp, fsync,
 * rename, fsync dir) only after every shard has; `latest` moves only after the
 * manifest is durable. A reader that trusts nothing without a manifest never
 * sees a torn checkpoint, whatever moment a kill or power cut lands on.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>

#include "ckpt_int.h"
#include "err.h"
#include "fileio.h"
#include "log.h"

/* Paths of a shard's final file and its temp file under t. */
static void shard_paths(const mt_ckpt_txn *t, const mt_ckpt_shard_desc *d,
                        char final[MT_CKPT_PATH_MAX + 64], char tmp[MT_CKPT_PATH_MAX + 128]) {
  char step[32], name[32];
  mt__ckpt_step_name(step, t->step);
  mt__ckpt_shard_name(name, d->tp, d->pp);
  snprintf(final, MT_CKPT_PATH_MAX + 64, "%s/%s/%s", t->job_dir, step, name);
  snprintf(tmp, MT_CKPT_PATH_MAX + 128, "%s.tmp.%s", final, t->tag);
}

/* <job_dir>/step_<08d> of t. */
static void step_dir_of(const mt_ckpt_txn *t, char out[MT_CKPT_PATH_MAX + 32]) {
  char step[32];
  mt__ckpt_step_name(step, t->step);
  snprintf(out, MT_CKPT_PATH_MAX + 32, "%s/%s", t->job_dir, step);
}

/* Checked, since the fields may come from another node: a tag must not make a
 * path leave the step directory. */
int mt_ckpt_txn_set(mt_ckpt_txn *t, const char *job_dir, int64_t step, const char *tag) {
  if (!job_dir || !*job_dir || strlen(job_dir) > MT_CKPT_PATH_MAX - 64)
    return mt_seterr(MT_EINVAL, "ckpt: job directory \"%.64s\" empty or too long (max %d)",
                     job_dir ? job_dir : "", MT_CKPT_PATH_MAX - 64);
  if (step < 0 || step > 999999999999999999LL)
    return mt_seterr(MT_EINVAL, "ckpt: step %" PRId64 " out of range", step);
  size_t len = tag ? strlen(tag) : 0;
  if (len < 1 || len >= sizeof t->tag)
    return mt_seterr(MT_EINVAL, "ckpt: temp-file tag must be 1..%zu characters", sizeof t->tag - 1);
  for (size_t i = 0; i < len; i++) {
    char c = tag[i];
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
          c == '_'))
      return mt_seterr(MT_EINVAL, "ckpt: temp-file tag \"%s\": only [A-Za-z0-9_-]", tag);
  }
  snprintf(t->job_dir, sizeof t->job_dir, "%s", job_dir);
  t->step = step;
  snprintf(t->tag, sizeof t->tag, "%s", tag);
  return 0;
}

int mt_ckpt_check_dir(const char *job_dir) {
  int rc = mt_make_dirs(job_dir);
  if (rc) return mt_wraperr(rc, "ckpt");
  char probe[MT_CKPT_PATH_MAX + 64], suffix[32];
  mt_tmp_suffix(suffix, sizeof suffix);
  snprintf(probe, sizeof probe, "%s/.write-check.tmp.%s", job_dir, suffix);
  int fd = open(probe, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0)
    return mt_seterr(MT_EIO, "ckpt: cannot create a file in %s: %s", job_dir, strerror(errno));
  close(fd);
  unlink(probe);
  return 0;
}

/* Clears the step's leftovers so that stale temp files or shards never mix
 * with the new ones. */
int mt_ckpt_begin(mt_ckpt_txn *t, const char *job_dir, int64_t step) {
  uint32_t r;
  if (getrandom(&r, sizeof r, GRND_NONBLOCK) != sizeof r)
    r = (uint32_t)time(NULL) ^ (uint32_t)(uintptr_t)&r;
  char tag[48];
  snprintf(tag, sizeof tag, "%ld-%08x", (long)getpid(), r);
  int rc = mt_ckpt_txn_set(t, job_dir, step, tag);
  if (rc) return rc;
  if ((rc = mt_make_dirs(job_dir))) return mt_wraperr(rc, "ckpt");

  char dir[MT_CKPT_PATH_MAX + 32];
  step_dir_of(t, dir);
  struct stat st;
  if (!lstat(dir, &st) && S_ISLNK(st.st_mode) && stat(dir, &st)) {
    int e = errno;
    if (e != ENOENT && e != ENOTDIR) /* another job's files, maybe: not removed unseen */
      return mt_seterr(MT_EIO, "ckpt: %s is a link that cannot be followed: %s", dir, strerror(e));
    /* a link to nothing (its target moved or deleted) holds no checkpoint:
     * it goes, or the step could never be saved */
    mt_log_warn("ckpt: %s is a link to nothing (%s); removing the link to save step %lld", dir,
                strerror(e), (long long)step);
    if ((rc = mt__ckpt_remove_step(dir))) return rc;
  } else if (!stat(dir, &st)) {
    if (mt__ckpt_committed(dir)) {
      int64_t latest;
      int lrc = mt__ckpt_read_latest(job_dir, &latest);
      if (!lrc && latest == step)
        return mt_seterr(MT_EINVAL, "ckpt: %s is the latest checkpoint; refusing to overwrite it",
                         dir);
      /* without a readable latest, a job may have resumed from exactly this one */
      if (lrc)
        return mt_seterr(MT_EINVAL,
                         "ckpt: %s is committed and %s/latest is unreadable; refusing "
                         "to overwrite it",
                         dir, job_dir);
      mt_log_warn("ckpt: %s is committed but not the latest checkpoint; replacing it", dir);
    }
    if ((rc = mt__ckpt_remove_step(dir))) return rc;
  }
  if (mkdir(dir, 0755))
    return mt_seterr(MT_EIO, "ckpt: make directory %s: %s", dir, strerror(errno));
  return mt_fsync_parent_dir(dir);
}

/* Doubling: a writer appends one record per chunk_bytes written. */
int mt_ckpt_chunks_add(mt_ckpt_chunks *c, const mt_ckpt_chunk *v, size_t n) {
  if (c->n + n > c->cap) {
    size_t cap = c->cap ? c->cap : 16;
    while (cap < c->n + n) cap *= 2;
    mt_ckpt_chunk *p = realloc(c->v, cap * sizeof *p);
    if (!p) return mt_seterr(MT_ENOMEM, "ckpt: chunk records: out of memory");
    c->v = p;
    c->cap = cap;
  }
  memcpy(c->v + c->n, v, n * sizeof *v);
  c->n += n;
  return 0;
}

/* Leaves c empty and reusable. */
void mt_ckpt_chunks_free(mt_ckpt_chunks *c) {
  free(c->v);
  c->v = NULL;
  c->n = c->cap = 0;
}

/* Writers in other processes report through the store, as JSON. */
json_t *mt_ckpt_chunks_json(const mt_ckpt_chunks *c) {
  json_t *a = json_array();
  for (size_t i = 0; a && i < c->n; i++) {
    const mt_ckpt_chunk *k = &c->v[i];
    char hex[17];
    snprintf(hex, sizeof hex, "%016" PRIx64, k->xxh3);
    if (json_array_append_new(a, json_pack("{s:i, s:i, s:I, s:I, s:s}", "tp", k->tp, "pp", k->pp,
                                           "offset", (json_int_t)k->offset, "bytes",
                                           (json_int_t)k->bytes, "xxh3", hex))) {
      json_decref(a);
      a = NULL;
    }
  }
  return a;
}

/* The coordinator's side of mt_ckpt_chunks_json. */
int mt_ckpt_chunks_parse(const json_t *j, mt_ckpt_chunks *c) {
  if (!json_is_array(j)) return mt_seterr(MT_EINVAL, "ckpt: chunk records: not a JSON array");
  for (size_t i = 0; i < json_array_size(j); i++) {
    json_t *o = json_array_get(j, i);
    json_int_t tp, pp, off, bytes;
    const char *hex;
    mt_ckpt_chunk k;
    if (json_unpack(o, "{s:I, s:I, s:I, s:I, s:s}", "tp", &tp, "pp", &pp, "offset", &off, "bytes",
                    &bytes, "xxh3", &hex) ||
        tp < 0 || tp > 99 || pp < 0 || pp > 999 || off < 0 || bytes <= 0 ||
        mt__ckpt_parse_hex64(hex, &k.xxh3))
      return mt_seterr(MT_EINVAL, "ckpt: chunk record %zu: needs tp, pp, offset, bytes, xxh3", i);
    k.tp = (int)tp, k.pp = (int)pp, k.offset = (uint64_t)off, k.bytes = (uint64_t)bytes;
    int rc = mt_ckpt_chunks_add(c, &k, 1);
    if (rc) return rc;
  }
  return 0;
}

/* One writer sizes the file, so that every other writer can pwrite into it in
 * any order without coordination. */
int mt_ckpt_shard_create(const mt_ckpt_txn *t, const mt_ckpt_shard_desc *d, mt_ckpt_chunks *out) {
  int rc = mt__ckpt_check_desc(d);
  if (rc) return rc;
  char final[MT_CKPT_PATH_MAX + 64], tmp[MT_CKPT_PATH_MAX + 128];
  shard_paths(t, d, final, tmp);
  uint64_t bytes = mt__ckpt_file_bytes(d->n, d->n_arrays);
  int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return mt_seterr(MT_EIO, "ckpt: create %s: %s", tmp, strerror(errno));
  uint8_t h[MT__CKPT_HEADER_BYTES];
  mt__ckpt_header_encode(h, d->tp, d->pp, d->n, d->n_arrays);
  mt_ckpt_chunk k = {d->tp, d->pp, 0, MT__CKPT_HEADER_BYTES, (uint64_t)XXH3_64bits(h, sizeof h)};
  if (ftruncate(fd, (off_t)bytes))
    rc = mt_seterr(MT_EIO, "ckpt: size %s to %" PRIu64 " bytes: %s", tmp, bytes, strerror(errno));
  /* reserve the blocks now, so a full disk fails here and not hours into the writes */
  else if (fallocate(fd, 0, 0, (off_t)bytes) && errno != EOPNOTSUPP && errno != ENOSYS)
    rc =
        mt_seterr(MT_EIO, "ckpt: allocate %s (%" PRIu64 " bytes): %s", tmp, bytes, strerror(errno));
  else if (mt__pwrite_full(fd, h, sizeof h, 0))
    rc = mt_seterr(MT_EIO, "ckpt: write header of %s: %s", tmp, strerror(errno));
  if (close(fd) && !rc) rc = mt_seterr(MT_EIO, "ckpt: close %s: %s", tmp, strerror(errno));
  if (!rc) rc = mt_ckpt_chunks_add(out, &k, 1);
  if (rc) unlink(tmp);
  return rc;
}

/* Checksums the caller's memory as it is written: nothing is read back. */
int mt_ckpt_shard_write(const mt_ckpt_txn *t, const mt_ckpt_shard_desc *d, uint64_t lo, uint64_t n,
                        const float *const *src, size_t chunk_bytes, mt_ckpt_chunks *out) {
  int rc = mt__ckpt_check_desc(d);
  if (rc) return rc;
  if (lo > d->n || n > d->n - lo)
    return mt_seterr(MT_EINVAL,
                     "ckpt: shard tp %d pp %d: slice [%" PRIu64 ", %" PRIu64
                     ") outside [0, %" PRIu64 ")",
                     d->tp, d->pp, lo, lo + n, d->n);
  if (!chunk_bytes) chunk_bytes = MT_CKPT_CHUNK_BYTES;
  if (chunk_bytes < 64)
    return mt_seterr(MT_EINVAL, "ckpt: chunk_bytes %zu: at least 64", chunk_bytes);
  if (n == 0) return 0; /* a dp rank whose slice is empty */
  for (int a = 0; a < d->n_arrays; a++)
    if (!src || !src[a])
      return mt_seterr(MT_EINVAL, "ckpt: shard tp %d pp %d: no data for array %s", d->tp, d->pp,
                       d->arrays[a]);
  char final[MT_CKPT_PATH_MAX + 64], tmp[MT_CKPT_PATH_MAX + 128];
  shard_paths(t, d, final, tmp);
  int fd = open(tmp, O_WRONLY | O_CLOEXEC);
  if (fd < 0)
    return mt_seterr(MT_EIO, "ckpt: open %s: %s%s", tmp, strerror(errno),
                     errno == ENOENT ? " (not created, or removed after another writer failed)"
                                     : "");
  size_t n0 = out->n;
  for (int a = 0; a < d->n_arrays && !rc; a++) {
    const uint8_t *p = (const uint8_t *)src[a];
    uint64_t off = MT__CKPT_HEADER_BYTES + 4 * ((uint64_t)a * d->n + lo), len = 4 * n;
    for (uint64_t done = 0; done < len && !rc; done += chunk_bytes) {
      size_t piece = len - done < chunk_bytes ? (size_t)(len - done) : chunk_bytes;
      mt_ckpt_chunk k = {d->tp, d->pp, off + done, piece, (uint64_t)XXH3_64bits(p + done, piece)};
      if (mt__pwrite_full(fd, p + done, piece, off + done))
        rc = mt_seterr(MT_EIO, "ckpt: write %s at offset %" PRIu64 " (%zu bytes): %s", tmp,
                       off + done, piece, strerror(errno));
      else
        rc = mt_ckpt_chunks_add(out, &k, 1);
    }
  }
  if (!rc && fsync(fd)) rc = mt_seterr(MT_EIO, "ckpt: fsync %s: %s", tmp, strerror(errno));
  if (close(fd) && !rc) rc = mt_seterr(MT_EIO, "ckpt: close %s: %s", tmp, strerror(errno));
  if (rc) {
    out->n = n0;
    unlink(tmp);
  }
  return rc;
}

/* Called after every writer's fsync, so that the final name means complete. */
int mt_ckpt_shard_commit(const mt_ckpt_txn *t, const mt_ckpt_shard_desc *d) {
  int rc = mt__ckpt_check_desc(d);
  if (rc) return rc;
  char final[MT_CKPT_PATH_MAX + 64], tmp[MT_CKPT_PATH_MAX + 128];
  shard_paths(t, d, final, tmp);
  uint64_t bytes = mt__ckpt_file_bytes(d->n, d->n_arrays);
  int fd = open(tmp, O_WRONLY | O_CLOEXEC);
  if (fd < 0) return mt_seterr(MT_EIO, "ckpt: commit %s: %s", tmp, strerror(errno));
  struct stat st;
  if (fstat(fd, &st))
    rc = mt_seterr(MT_EIO, "ckpt: stat %s: %s", tmp, strerror(errno));
  else if ((uint64_t)st.st_size != bytes)
    rc = mt_seterr(MT_EIO, "ckpt: %s is %lld bytes, expected %" PRIu64, tmp, (long long)st.st_size,
                   bytes);
  else if (fsync(fd))
    rc = mt_seterr(MT_EIO, "ckpt: fsync %s: %s", tmp, strerror(errno));
  if (close(fd) && !rc) rc = mt_seterr(MT_EIO, "ckpt: close %s: %s", tmp, strerror(errno));
  if (!rc && rename(tmp, final))
    rc = mt_seterr(MT_EIO, "ckpt: rename %s -> %s: %s", tmp, final, strerror(errno));
  if (rc) {
    unlink(tmp);
    return rc;
  }
  return mt_fsync_parent_dir(final);
}

/* Manifest order: by (pp, tp). */
static int shard_cmp(const void *a, const void *b) {
  const mt_ckpt_shard_desc *x = *(const mt_ckpt_shard_desc *const *)a;
  const mt_ckpt_shard_desc *y = *(const mt_ckpt_shard_desc *const *)b;
  if (x->pp != y->pp) return x->pp < y->pp ? -1 : 1;
  return (x->tp > y->tp) - (x->tp < y->tp);
}

/* By offset, to check coverage. */
static int chunk_cmp(const void *a, const void *b) {
  const mt_ckpt_chunk *x = a, *y = b;
  return (x->offset > y->offset) - (x->offset < y->offset);
}

/* The chunk records of shard d, sorted, checked to cover [0, bytes) exactly
 * once; *v owned. The manifest lists nothing a reader could not verify. */
static int shard_chunks(const char *what, const mt_ckpt_shard_desc *d, const mt_ckpt_chunks *all,
                        mt_ckpt_chunk **v, size_t *n) {
  size_t k = 0;
  for (size_t i = 0; i < all->n; i++) k += all->v[i].tp == d->tp && all->v[i].pp == d->pp;
  *n = 0;
  *v = malloc((k ? k : 1) * sizeof **v);
  if (!*v) return mt_seterr(MT_ENOMEM, "ckpt: commit: out of memory");
  for (size_t i = 0; i < all->n; i++)
    if (all->v[i].tp == d->tp && all->v[i].pp == d->pp) (*v)[(*n)++] = all->v[i];
  qsort(*v, *n, sizeof **v, chunk_cmp);
  uint64_t bytes = mt__ckpt_file_bytes(d->n, d->n_arrays), at = 0;
  for (size_t i = 0; i < *n; i++) {
    if ((*v)[i].offset != at)
      return mt_seterr(MT_EINVAL, "ckpt: commit %s: chunk records %s at offset %" PRIu64, what,
                       (*v)[i].offset < at ? "overlap" : "leave a gap", at);
    at += (*v)[i].bytes;
  }
  if (at != bytes)
    return mt_seterr(MT_EINVAL,
                     "ckpt: commit %s: chunk records cover %" PRIu64 " of %" PRIu64
                     " bytes (a writer's records are missing)",
                     what, at, bytes);
  return 0;
}

/* The caller's objects are borrowed: copy them; NULL becomes {}. */
static json_t *json_or_empty(const json_t *v) { return v ? json_deep_copy(v) : json_object(); }

/* The manifest of t: every field of proto/ckpt-v1.md, files by (pp, tp). */
static int build_manifest(const mt_ckpt_txn *t, const mt_ckpt_meta *m,
                          const mt_ckpt_shard_desc *const *order, int n_shards,
                          const mt_ckpt_chunks *chunks, json_t **out) {
  char step[32], created[32];
  mt__ckpt_step_name(step, t->step);
  time_t now = time(NULL);
  struct tm tm;
  gmtime_r(&now, &tm);
  strftime(created, sizeof created, "%Y-%m-%dT%H:%M:%SZ", &tm);
  json_t *files = json_array();
  json_t *root = json_pack(
      "{s:s, s:i, s:s, s:s, s:I, s:I, s:I, s:I, s:o, s:o, s:{s:i, s:i, s:i}, s:s, s:o, s:o}",
      "format", "mtnlg-ckpt", "version", MT_CKPT_VERSION, "job", m->job, "job_hash", m->job_hash,
      "step", (json_int_t)m->step, "consumed_samples", (json_int_t)m->consumed_samples,
      "consumed_tokens", (json_int_t)m->consumed_tokens, "seed", (json_int_t)m->seed, "rng",
      json_or_empty(m->rng), "data_position", json_or_empty(m->data_position), "layout", "tp",
      m->tp, "pp", m->pp, "dp", m->dp, "created", created, "extra", json_or_empty(m->extra),
      "files", files);
  if (!root) return mt_seterr(MT_ENOMEM, "ckpt: manifest of %s: out of memory", step);
  int rc = 0;
  for (int i = 0; i < n_shards && !rc; i++) {
    const mt_ckpt_shard_desc *d = order[i];
    char name[32], what[80];
    mt__ckpt_shard_name(name, d->tp, d->pp);
    snprintf(what, sizeof what, "%s/%s", step, name);
    mt_ckpt_chunk *v;
    size_t n;
    if ((rc = shard_chunks(what, d, chunks, &v, &n))) {
      free(v);
      break;
    }
    json_t *arrays = json_array(), *list = json_array();
    for (int a = 0; a < d->n_arrays; a++) json_array_append_new(arrays, json_string(d->arrays[a]));
    for (size_t c = 0; c < n; c++) {
      char hex[17];
      snprintf(hex, sizeof hex, "%016" PRIx64, v[c].xxh3);
      json_array_append_new(list, json_pack("{s:I, s:I, s:s}", "offset", (json_int_t)v[c].offset,
                                            "bytes", (json_int_t)v[c].bytes, "xxh3", hex));
    }
    free(v);
    json_t *f = json_pack("{s:s, s:i, s:i, s:I, s:o, s:I, s:o}", "name", name, "tp", d->tp, "pp",
                          d->pp, "n", (json_int_t)d->n, "arrays", arrays, "bytes",
                          (json_int_t)mt__ckpt_file_bytes(d->n, d->n_arrays), "chunks", list);
    if (!f || json_array_size(list) != n || json_array_append_new(files, f))
      rc = mt_seterr(MT_ENOMEM, "ckpt: manifest of %s: out of memory", step);
  }
  if (rc) {
    json_decref(root);
    return rc;
  }
  *out = root;
  return 0;
}

/* Writes text to path durably (fileio's temp, fsync, rename, fsync dir). */
static int write_durable(const char *path, const char *text) {
  return mt_atomic_write_file(path, text, strlen(text));
}

/* One line, "step_<08d>\n", so that readers can be strict about it. */
int mt__ckpt_write_latest(const char *job_dir, int64_t step) {
  char name[32], line[40], path[MT_CKPT_PATH_MAX + 16];
  mt__ckpt_step_name(name, step);
  snprintf(line, sizeof line, "%s\n", name);
  snprintf(path, sizeof path, "%s/" MT__CKPT_LATEST, job_dir);
  return write_durable(path, line);
}

/* Refused before anything is written: a manifest readers would reject. */
static int check_meta(const mt_ckpt_txn *t, const mt_ckpt_meta *m) {
  if (!m || !m->job || !m->job_hash)
    return mt_seterr(MT_EINVAL, "ckpt: commit: meta needs job and job_hash");
  if (m->step != t->step)
    return mt_seterr(MT_EINVAL,
                     "ckpt: commit: meta step %" PRId64 " is not the step begun (%" PRId64 ")",
                     m->step, t->step);
  if (m->seed < 0 || m->consumed_samples < 0 || m->consumed_tokens < 0)
    return mt_seterr(MT_EINVAL, "ckpt: commit: seed and consumed counts must be >= 0");
  if (m->tp < 1 || m->pp < 1 || m->dp < 1)
    return mt_seterr(MT_EINVAL, "ckpt: commit: layout tp %d pp %d dp %d", m->tp, m->pp, m->dp);
  const json_t *objs[3] = {m->rng, m->data_position, m->extra};
  for (int i = 0; i < 3; i++)
    if (objs[i] && !json_is_object(objs[i]))
      return mt_seterr(MT_EINVAL, "ckpt: commit: rng, data_position and extra must be objects");
  return 0;
}

/* The commit point: the manifest, then latest, each durable before the next. */
int mt_ckpt_commit(const mt_ckpt_txn *t, const mt_ckpt_meta *m, const mt_ckpt_shard_desc *d,
                   int n_shards, const mt_ckpt_chunks *chunks) {
  int rc = check_meta(t, m);
  if (rc) return rc;
  if (n_shards != m->tp * m->pp)
    return mt_seterr(MT_EINVAL, "ckpt: commit: %d shard files for layout tp %d x pp %d", n_shards,
                     m->tp, m->pp);
  char dir[MT_CKPT_PATH_MAX + 32], step[32];
  step_dir_of(t, dir);
  mt__ckpt_step_name(step, t->step);
  const mt_ckpt_shard_desc **order = malloc((size_t)n_shards * sizeof *order);
  if (!order) return mt_seterr(MT_ENOMEM, "ckpt: commit %s: out of memory", step);
  for (int i = 0; i < n_shards && !rc; i++) {
    order[i] = &d[i];
    if ((rc = mt__ckpt_check_desc(&d[i]))) break;
    if (d[i].tp >= m->tp || d[i].pp >= m->pp) {
      rc = mt_seterr(MT_EINVAL, "ckpt: commit: shard tp %d pp %d outside layout tp %d x pp %d",
                     d[i].tp, d[i].pp, m->tp, m->pp);
      break;
    }
    char final[MT_CKPT_PATH_MAX + 64], tmp[MT_CKPT_PATH_MAX + 128];
    struct stat st;
    uint64_t bytes = mt__ckpt_file_bytes(d[i].n, d[i].n_arrays);
    shard_paths(t, &d[i], final, tmp);
    if (stat(final, &st))
      rc = mt_seterr(MT_EIO, "ckpt: commit %s: %s: %s (was the shard committed?)", step, final,
                     strerror(errno));
    else if ((uint64_t)st.st_size != bytes)
      rc = mt_seterr(MT_EIO, "ckpt: commit %s: %s is %lld bytes, expected %" PRIu64, step, final,
                     (long long)st.st_size, bytes);
  }
  if (!rc) {
    qsort(order, (size_t)n_shards, sizeof *order, shard_cmp);
    for (int i = 1; i < n_shards && !rc; i++)
      if (!shard_cmp(&order[i - 1], &order[i]))
        rc = mt_seterr(MT_EINVAL, "ckpt: commit %s: shard tp %d pp %d listed twice", step,
                       order[i]->tp, order[i]->pp);
  }
  for (size_t i = 0; i < chunks->n && !rc; i++) {
    int known = 0;
    for (int s = 0; s < n_shards && !known; s++)
      known = d[s].tp == chunks->v[i].tp && d[s].pp == chunks->v[i].pp;
    if (!known)
      rc = mt_seterr(MT_EINVAL, "ckpt: commit %s: chunk record for shard tp %d pp %d, not listed",
                     step, chunks->v[i].tp, chunks->v[i].pp);
  }
  json_t *manifest = NULL;
  if (!rc) rc = build_manifest(t, m, order, n_shards, chunks, &manifest);
  free(order);
  if (rc) return rc;

  /* sealed, so a changed digit in the manifest (Adam's count, the data
   * position) is found on load like a flipped byte in a shard */
  int sealed;
  uint64_t seal = mt__ckpt_seal(manifest, &sealed);
  char hex[17];
  snprintf(hex, sizeof hex, "%016" PRIx64, seal);
  char *text = sealed && !json_object_set_new(manifest, MT__CKPT_SEAL_KEY, json_string(hex))
                   ? json_dumps(manifest, JSON_INDENT(1))
                   : NULL;
  json_decref(manifest);
  if (!text) return mt_seterr(MT_ENOMEM, "ckpt: manifest of %s: out of memory", step);
  char path[MT_CKPT_PATH_MAX + 64];
  snprintf(path, sizeof path, "%s/" MT__CKPT_MANIFEST, dir);
  size_t manifest_bytes = strlen(text);
  /* mt_atomic_* name only the file; say which checkpoint failed */
  rc = write_durable(path, text);
  free(text);
  if (rc) return mt_wraperr(rc, "ckpt: commit %s", step);

  if ((rc = mt__ckpt_write_latest(t->job_dir, t->step)))
    return mt_wraperr(rc, "ckpt: %s is committed but latest still names the previous one", step);
  mt_log_info("ckpt: committed %s (%d shard files, manifest %zu bytes)", dir, n_shards,
              manifest_bytes);
  return 0;
}

/* Never removes a committed checkpoint: if only latest failed, the step stays
 * and readers keep following latest. */
void mt_ckpt_abort(const mt_ckpt_txn *t) {
  char dir[MT_CKPT_PATH_MAX + 32];
  step_dir_of(t, dir);
  if (mt__ckpt_committed(dir)) return;
  if (mt__ckpt_remove_step(dir)) mt_log_warn("%s", mt_errmsg());
}

/* For single-node jobs and tests: the same protocol and files, one writer. */
int mt_ckpt_save(const char *job_dir, const mt_ckpt_meta *m, const mt_ckpt_shard_desc *d,
                 const float *const *const *data, int n_shards, size_t chunk_bytes) {
  if (!m) return mt_seterr(MT_EINVAL, "ckpt: save: no meta");
  mt_ckpt_txn t;
  mt_ckpt_chunks chunks = {0};
  int rc = mt_ckpt_begin(&t, job_dir, m->step);
  if (rc) return rc;
  for (int i = 0; i < n_shards && !rc; i++) {
    rc = mt_ckpt_shard_create(&t, &d[i], &chunks);
    if (!rc) rc = mt_ckpt_shard_write(&t, &d[i], 0, d[i].n, data[i], chunk_bytes, &chunks);
    if (!rc) rc = mt_ckpt_shard_commit(&t, &d[i]);
  }
  if (!rc) rc = mt_ckpt_commit(&t, m, d, n_shards, &chunks);
  mt_ckpt_chunks_free(&chunks);
  if (rc) {
    /* keep the message of the failure, not of the clean-up */
    char msg[2048];
    snprintf(msg, sizeof msg, "%s", mt_errmsg());
    mt_ckpt_abort(&t);
    mt_seterr(rc, "%s", msg);
  }
  return rc;
}
