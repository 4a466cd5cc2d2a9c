/* ckpt_read.c — finding, checking and reading committed checkpoints.
 *
 * Trust nothing on disk: the manifest is parsed field by field, every shard
 * file's size and header are compared with it, and (when asked) every chunk is
 * hashed again, one thread per file. A problem is reported with the file,
 * the chunk and the numbers, so a person can tell a bad disk from a bug.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include "ckpt_int.h"
#include "err.h"
#include "log.h"

#define VERIFY_THREADS_MAX 8
#define VERIFY_BUF_BYTES (4u << 20)

/* ---- the manifest ---- */

/* obj[key] as an integer in [lo, hi]; else an error naming where. */
static int get_int(const json_t *obj, const char *key, int64_t lo, int64_t hi, int64_t *v,
                   const char *where) {
  json_t *j = json_object_get(obj, key);
  if (!json_is_integer(j) || json_integer_value(j) < lo || json_integer_value(j) > hi)
    return mt_seterr(MT_ECORRUPT,
                     "%s: \"%s\" missing or not an integer in [%" PRId64 ", %" PRId64 "]", where,
                     key, lo, hi);
  *v = json_integer_value(j);
  return 0;
}

/* As get_int, for a string. */
static int get_str(const json_t *obj, const char *key, const char **v, const char *where) {
  json_t *j = json_object_get(obj, key);
  if (!json_is_string(j))
    return mt_seterr(MT_ECORRUPT, "%s: \"%s\" missing or not a string", where, key);
  *v = json_string_value(j);
  return 0;
}

/* As get_int, for an object (the caller's opaque state). */
static int get_obj(json_t *obj, const char *key, json_t **v, const char *where) {
  json_t *j = json_object_get(obj, key);
  if (!json_is_object(j))
    return mt_seterr(MT_ECORRUPT, "%s: \"%s\" missing or not an object", where, key);
  *v = j;
  return 0;
}

/* One "files" entry into f; checks the name, the size formula and that the
 * chunks cover the file exactly once, in order. */
static int parse_file(json_t *jf, mt_ckpt_file *f, const char *mwhere, size_t idx) {
  char where[512];
  snprintf(where, sizeof where, "%s: files[%zu]", mwhere, idx);
  if (!json_is_object(jf)) return mt_seterr(MT_ECORRUPT, "%s: not an object", where);
  int64_t tp = 0, pp = 0, n = 0, bytes = 0;
  const char *name = "";
  int rc;
  if ((rc = get_str(jf, "name", &name, where)) || (rc = get_int(jf, "tp", 0, 99, &tp, where)) ||
      (rc = get_int(jf, "pp", 0, 999, &pp, where)) ||
      (rc = get_int(jf, "n", 1, INT64_MAX, &n, where)) ||
      (rc = get_int(jf, "bytes", 1, INT64_MAX, &bytes, where)))
    return rc;
  f->tp = (int)tp, f->pp = (int)pp, f->n = (uint64_t)n, f->bytes = (uint64_t)bytes;
  mt__ckpt_shard_name(f->name, f->tp, f->pp);
  if (strcmp(name, f->name))
    return mt_seterr(MT_ECORRUPT, "%s: name \"%s\" is not %s", where, name, f->name);
  json_t *arrays = json_object_get(jf, "arrays");
  if (!json_is_array(arrays) || json_array_size(arrays) < 1 ||
      json_array_size(arrays) > MT_CKPT_MAX_ARRAYS)
    return mt_seterr(MT_ECORRUPT, "%s: \"arrays\" must list 1..%d names", where,
                     MT_CKPT_MAX_ARRAYS);
  f->n_arrays = (int)json_array_size(arrays);
  for (int a = 0; a < f->n_arrays; a++) {
    const char *s = json_string_value(json_array_get(arrays, (size_t)a));
    if (!s || mt__ckpt_check_array_name(s))
      return mt_seterr(MT_ECORRUPT, "%s: arrays[%d] is not an array name", where, a);
    for (int b = 0; b < a; b++)
      if (!strcmp(s, f->arrays[b]))
        return mt_seterr(MT_ECORRUPT, "%s: array \"%s\" listed twice", where, s);
    snprintf(f->arrays[a], sizeof f->arrays[a], "%s", s);
  }
  if (mt__ckpt_file_bytes(f->n, f->n_arrays) != f->bytes)
    return mt_seterr(MT_ECORRUPT, "%s: bytes %" PRIu64 " is not 64 + 4 x %d arrays x %" PRIu64,
                     where, f->bytes, f->n_arrays, f->n);
  json_t *chunks = json_object_get(jf, "chunks");
  if (!json_is_array(chunks) || !json_array_size(chunks))
    return mt_seterr(MT_ECORRUPT, "%s: \"chunks\" missing or empty", where);
  f->n_chunks = json_array_size(chunks);
  f->chunks = calloc(f->n_chunks, sizeof *f->chunks);
  if (!f->chunks) return mt_seterr(MT_ENOMEM, "%s: out of memory", where);
  uint64_t at = 0;
  for (size_t c = 0; c < f->n_chunks; c++) {
    json_t *jc = json_array_get(chunks, c);
    char cw[600];
    int64_t off = 0, len = 0;
    const char *hex = "";
    snprintf(cw, sizeof cw, "%s.chunks[%zu]", where, c);
    if (!json_is_object(jc)) return mt_seterr(MT_ECORRUPT, "%s: not an object", cw);
    if ((rc = get_int(jc, "offset", 0, INT64_MAX, &off, cw)) ||
        (rc = get_int(jc, "bytes", 1, INT64_MAX, &len, cw)) || (rc = get_str(jc, "xxh3", &hex, cw)))
      return rc;
    mt_ckpt_chunk *k = &f->chunks[c];
    k->tp = f->tp, k->pp = f->pp, k->offset = (uint64_t)off, k->bytes = (uint64_t)len;
    if (mt__ckpt_parse_hex64(hex, &k->xxh3))
      return mt_seterr(MT_ECORRUPT, "%s: xxh3 \"%s\" is not 16 hex digits", cw, hex);
    if (k->offset != at)
      return mt_seterr(MT_ECORRUPT,
                       "%s: offset %" PRIu64 ", expected %" PRIu64
                       " (chunks must cover the file once, in order)",
                       cw, k->offset, at);
    if (k->bytes > f->bytes - at)
      return mt_seterr(MT_ECORRUPT, "%s: runs past the end of the file (%" PRIu64 " bytes)", cw,
                       f->bytes);
    at += k->bytes;
  }
  if (at != f->bytes)
    return mt_seterr(MT_ECORRUPT, "%s: chunks cover %" PRIu64 " of %" PRIu64 " bytes", where, at,
                     f->bytes);
  return 0;
}

/* The whole of a file into *text (malloc'd, NUL after the last byte):
 * MT_ENOENT when it is missing, MT_EIO when a read fails, MT_ENOMEM. */
static int read_whole(const char *path, char **text, size_t *len) {
  *text = NULL, *len = 0;
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return mt_seterr(errno == ENOENT ? MT_ENOENT : MT_EIO, "open: %s", strerror(errno));
  struct stat st;
  if (fstat(fd, &st)) {
    int e = errno;
    close(fd);
    return mt_seterr(MT_EIO, "stat: %s", strerror(e));
  }
  char *buf = malloc((size_t)st.st_size + 1);
  if (!buf) {
    close(fd);
    return mt_seterr(MT_ENOMEM, "%lld bytes: out of memory", (long long)st.st_size);
  }
  int64_t got = mt__pread_full(fd, buf, (size_t)st.st_size, 0);
  int e = errno;
  close(fd);
  if (got < 0) {
    free(buf);
    return mt_seterr(MT_EIO, "read: %s", strerror(e));
  }
  buf[got] = 0;
  *text = buf, *len = (size_t)got;
  return 0;
}

/* Parses <dir>/manifest.json into c. disp ("step_00000020") names the
 * checkpoint in messages; expect_step >= 0 must match the manifest's step. */
static int parse_manifest(const char *dir, const char *disp, int64_t expect_step, mt_ckpt *c) {
  memset(c, 0, sizeof *c);
  snprintf(c->dir, sizeof c->dir, "%s", dir);
  char path[MT_CKPT_PATH_MAX + 32], where[128];
  snprintf(path, sizeof path, "%s/" MT__CKPT_MANIFEST, dir);
  snprintf(where, sizeof where, "ckpt: %s/" MT__CKPT_MANIFEST, disp);
  struct stat st;
  if (stat(path, &st)) {
    if (errno == ENOENT) return mt_seterr(MT_ENOENT, "%s missing", where);
    return mt_seterr(MT_EIO, "%s: %s", where, strerror(errno));
  }
  /* read here, not by jansson: a read that fails says nothing of the JSON */
  char *text = NULL;
  size_t len = 0;
  int rc = read_whole(path, &text, &len);
  if (rc) return mt_wraperr(rc, "%s", where);
  json_error_t err;
  c->manifest = json_loadb(text, len, JSON_REJECT_DUPLICATES, &err);
  free(text);
  if (!c->manifest)
    return mt_seterr(MT_ECORRUPT, "%s: bad JSON at line %d column %d: %s", where, err.line,
                     err.column, err.text);
  json_t *m = c->manifest, *layout, *files;
  const char *format = "";
  int64_t version = 0, tp = 0, pp = 0, dp = 0;
  if (!json_is_object(m)) return mt_seterr(MT_ECORRUPT, "%s: not a JSON object", where);
  json_t *seal = json_object_get(m, MT__CKPT_SEAL_KEY);
  if (seal) { /* manifests before the seal have none */
    uint64_t want, got;
    int ok;
    if (!json_is_string(seal) || mt__ckpt_parse_hex64(json_string_value(seal), &want))
      return mt_seterr(MT_ECORRUPT, "%s: \"" MT__CKPT_SEAL_KEY "\" is not 16 hex digits", where);
    got = mt__ckpt_seal(m, &ok);
    if (!ok) return mt_seterr(MT_ENOMEM, "%s: out of memory checking it", where);
    if (got != want)
      return mt_seterr(MT_ECORRUPT,
                       "%s: its contents do not match its checksum (" MT__CKPT_SEAL_KEY
                       " %016" PRIx64 ", contents %016" PRIx64 "): changed or damaged since it "
                       "was written",
                       where, want, got);
  }
  if ((rc = get_str(m, "format", &format, where))) return rc;
  if (strcmp(format, "mtnlg-ckpt"))
    return mt_seterr(MT_ECORRUPT, "%s: format \"%s\" is not mtnlg-ckpt", where, format);
  if ((rc = get_int(m, "version", 1, INT32_MAX, &version, where))) return rc;
  if (version != MT_CKPT_VERSION)
    return mt_seterr(MT_ENOTSUP, "%s: format version %" PRId64 ", this build reads %d", where,
                     version, MT_CKPT_VERSION);
  if ((rc = get_str(m, "job", &c->job, where)) ||
      (rc = get_str(m, "job_hash", &c->job_hash, where)) ||
      (rc = get_int(m, "step", 0, INT64_MAX, &c->step, where)) ||
      (rc = get_int(m, "consumed_samples", 0, INT64_MAX, &c->consumed_samples, where)) ||
      (rc = get_int(m, "consumed_tokens", 0, INT64_MAX, &c->consumed_tokens, where)) ||
      (rc = get_int(m, "seed", 0, INT64_MAX, &c->seed, where)) ||
      (rc = get_obj(m, "rng", &c->rng, where)) ||
      (rc = get_obj(m, "data_position", &c->data_position, where)) ||
      (rc = get_obj(m, "extra", &c->extra, where)) || (rc = get_obj(m, "layout", &layout, where)))
    return rc;
  if ((rc = get_int(layout, "tp", 1, 100, &tp, where)) ||
      (rc = get_int(layout, "pp", 1, 1000, &pp, where)) ||
      (rc = get_int(layout, "dp", 1, INT32_MAX, &dp, where)))
    return rc;
  c->tp = (int)tp, c->pp = (int)pp, c->dp = (int)dp;
  if (expect_step >= 0 && c->step != expect_step)
    return mt_seterr(MT_ECORRUPT, "%s: step %" PRId64 " in a directory of step %" PRId64, where,
                     c->step, expect_step);
  files = json_object_get(m, "files");
  if (!json_is_array(files) || json_array_size(files) != (size_t)(tp * pp))
    return mt_seterr(MT_ECORRUPT,
                     "%s: \"files\" must list the %" PRId64 " shard files of tp %" PRId64
                     " x pp %" PRId64,
                     where, tp * pp, tp, pp);
  c->files = calloc(json_array_size(files), sizeof *c->files);
  if (!c->files) return mt_seterr(MT_ENOMEM, "%s: out of memory", where);
  for (size_t i = 0; i < json_array_size(files); i++) {
    mt_ckpt_file *f = &c->files[i];
    c->n_files = (int)i + 1;
    if ((rc = parse_file(json_array_get(files, i), f, where, i))) return rc;
    if (f->tp >= c->tp || f->pp >= c->pp)
      return mt_seterr(MT_ECORRUPT, "%s: files[%zu] %s is outside layout tp %d x pp %d", where, i,
                       f->name, c->tp, c->pp);
    for (size_t j = 0; j < i; j++)
      if (c->files[j].tp == f->tp && c->files[j].pp == f->pp)
        return mt_seterr(MT_ECORRUPT, "%s: %s listed twice", where, f->name);
  }
  return 0;
}

/* Safe on a zeroed or failed mt_ckpt, so error paths can always call it. */
void mt_ckpt_close(mt_ckpt *c) {
  if (!c) return;
  for (int i = 0; i < c->n_files; i++) free(c->files[i].chunks);
  free(c->files);
  json_decref(c->manifest);
  free(c->skipped);
  free(c->damaged);
  memset(c, 0, sizeof *c);
}

/* ---- checking the files ---- */

/* Problems found in one file, as "\n"-separated messages. */
typedef struct file_check {
  int rc; /* the first problem's code */
  int n_problems;
  char *text;
  size_t len;
} file_check;

/* Workers cannot use mt_seterr (messages are per thread): each file keeps its own. */
static void add_problem(file_check *r, int rc, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void add_problem(file_check *r, int rc, const char *fmt, ...) {
  char msg[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  if (!r->rc) r->rc = rc;
  r->n_problems++;
  size_t k = strlen(msg);
  char *p = realloc(r->text, r->len + k + 2);
  if (!p) return; /* the count and code still say it failed */
  memcpy(p + r->len, msg, k);
  p[r->len + k] = '\n';
  p[r->len + k + 1] = 0;
  r->text = p;
  r->len += k + 1;
}

typedef struct check_job {
  const mt_ckpt *c;
  const char *disp; /* "step_00000020" */
  int checksums;    /* hash every chunk */
  int all;          /* every problem (verify) rather than the first (find) */
  file_check *results;
  int next; /* next file to take (atomic) */
  int stop; /* a problem was found and !all (atomic) */
} check_job;

/* Size, header and (when asked) every chunk of one file. */
static void check_file(check_job *job, const mt_ckpt_file *f, file_check *r, uint8_t *buf) {
  char path[MT_CKPT_PATH_MAX + 64];
  snprintf(path, sizeof path, "%s/%s", job->c->dir, f->name);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT)
      add_problem(r, MT_ECORRUPT, "ckpt: %s/%s missing", job->disp, f->name);
    else
      add_problem(r, MT_EIO, "ckpt: open %s/%s: %s", job->disp, f->name, strerror(errno));
    return;
  }
  struct stat st;
  uint8_t h[MT__CKPT_HEADER_BYTES];
  mt__ckpt_header hd;
  const char *why;
  if (fstat(fd, &st)) {
    add_problem(r, MT_EIO, "ckpt: stat %s/%s: %s", job->disp, f->name, strerror(errno));
  } else if ((uint64_t)st.st_size < f->bytes) {
    add_problem(r, MT_ECORRUPT, "ckpt: %s/%s truncated: %lld of %" PRIu64 " bytes", job->disp,
                f->name, (long long)st.st_size, f->bytes);
  } else if ((uint64_t)st.st_size > f->bytes) {
    add_problem(r, MT_ECORRUPT, "ckpt: %s/%s has %lld bytes, expected %" PRIu64, job->disp, f->name,
                (long long)st.st_size, f->bytes);
  } else if (mt__pread_full(fd, h, sizeof h, 0) != (int64_t)sizeof h) {
    add_problem(r, MT_EIO, "ckpt: read header of %s/%s: %s", job->disp, f->name, strerror(errno));
  } else if ((why = mt__ckpt_header_decode(h, &hd))) {
    add_problem(r, MT_ECORRUPT, "ckpt: %s/%s: header: %s", job->disp, f->name, why);
  } else if (hd.tp != (uint32_t)f->tp || hd.pp != (uint32_t)f->pp || hd.n != f->n ||
             hd.n_arrays != (uint32_t)f->n_arrays) {
    add_problem(r, MT_ECORRUPT,
                "ckpt: %s/%s: header says tp %u pp %u, %" PRIu64 " floats x %u arrays; manifest "
                "says tp %d pp %d, %" PRIu64 " x %d",
                job->disp, f->name, hd.tp, hd.pp, hd.n, hd.n_arrays, f->tp, f->pp, f->n,
                f->n_arrays);
  }
  if (r->n_problems || !job->checksums) {
    close(fd);
    return;
  }
  XXH3_state_t *s = XXH3_createState();
  if (!s) {
    add_problem(r, MT_ENOMEM, "ckpt: %s/%s: out of memory", job->disp, f->name);
    close(fd);
    return;
  }
  posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
  for (size_t i = 0; i < f->n_chunks; i++) {
    if (!job->all && __atomic_load_n(&job->stop, __ATOMIC_RELAXED)) break;
    const mt_ckpt_chunk *k = &f->chunks[i];
    XXH3_64bits_reset(s);
    int io = 0;
    for (uint64_t done = 0; done < k->bytes;) {
      size_t want =
          k->bytes - done < VERIFY_BUF_BYTES ? (size_t)(k->bytes - done) : VERIFY_BUF_BYTES;
      int64_t got = mt__pread_full(fd, buf, want, k->offset + done);
      if (got != (int64_t)want) {
        add_problem(r, MT_EIO, "ckpt: read %s/%s at offset %" PRIu64 ": %s", job->disp, f->name,
                    k->offset + done, got < 0 ? strerror(errno) : "unexpected end of file");
        io = 1;
        break;
      }
      XXH3_64bits_update(s, buf, want);
      done += want;
    }
    if (io) break;
    uint64_t sum = (uint64_t)XXH3_64bits_digest(s);
    if (sum != k->xxh3) {
      add_problem(r, MT_ECORRUPT,
                  "ckpt: %s/%s chunk %zu (offset %" PRIu64 ", %" PRIu64
                  " bytes): checksum %016" PRIx64 " expected %016" PRIx64,
                  job->disp, f->name, i, k->offset, k->bytes, sum, k->xxh3);
      if (!job->all) break;
    }
  }
  XXH3_freeState(s);
  close(fd);
}

/* Takes files from the shared counter until none are left or (find) one failed. */
static void *check_worker(void *arg) {
  check_job *job = arg;
  uint8_t *buf = job->checksums ? malloc(VERIFY_BUF_BYTES) : NULL;
  for (;;) {
    int i = __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED);
    if (i >= job->c->n_files) break;
    if (!job->all && __atomic_load_n(&job->stop, __ATOMIC_RELAXED)) break;
    file_check *r = &job->results[i];
    if (job->checksums && !buf)
      add_problem(r, MT_ENOMEM, "ckpt: verify: out of memory");
    else
      check_file(job, &job->c->files[i], r, buf);
    if (r->n_problems) __atomic_store_n(&job->stop, 1, __ATOMIC_RELAXED);
  }
  free(buf);
  return NULL;
}

/* Checks every file of c, in parallel when hashing; results[i] for files[i]. */
static void check_files(check_job *job) {
  int nt = job->checksums ? job->c->n_files : 1;
  long cpus = sysconf(_SC_NPROCESSORS_ONLN);
  if (nt > VERIFY_THREADS_MAX) nt = VERIFY_THREADS_MAX;
  if (cpus > 0 && nt > cpus) nt = (int)cpus;
  pthread_t th[VERIFY_THREADS_MAX];
  int started = 0;
  for (int i = 1; i < nt; i++) {
    if (pthread_create(&th[started], NULL, check_worker, job)) break;
    started++;
  }
  check_worker(job); /* the calling thread works too; with no threads it does it all */
  for (int i = 0; i < started; i++) pthread_join(th[i], NULL);
}

/* The display name of a step directory: its last path component. */
static void dir_disp(const char *dir, char out[64]) {
  size_t len = strlen(dir);
  while (len > 1 && dir[len - 1] == '/') len--;
  size_t start = len;
  while (start > 0 && dir[start - 1] != '/') start--;
  size_t k = len - start < 63 ? len - start : 63;
  memcpy(out, dir + start, k);
  out[k] = 0;
}

/* A file's first problem into mt_errmsg() (0 when it had none); frees its text. */
static int first_problem(file_check *r) {
  int rc = 0;
  if (r->n_problems) {
    char *nl = r->text ? strchr(r->text, '\n') : NULL;
    if (nl) *nl = 0;
    rc = mt_seterr(r->rc, "%s", r->text ? r->text : "ckpt: check failed");
  }
  free(r->text);
  r->text = NULL;
  return rc;
}

/* Opens one step directory: manifest, then files (first problem fails it). */
static int open_step(const char *dir, int64_t step, int verify, mt_ckpt *out) {
  char disp[64];
  dir_disp(dir, disp);
  int rc = parse_manifest(dir, disp, step, out);
  if (rc) {
    mt_ckpt_close(out);
    return rc;
  }
  file_check *results = calloc((size_t)out->n_files, sizeof *results);
  if (!results) {
    mt_ckpt_close(out);
    return mt_seterr(MT_ENOMEM, "ckpt: %s: out of memory", disp);
  }
  check_job job = {out, disp, verify == MT_CKPT_VERIFY_CHECKSUMS, 0, results, 0, 0};
  check_files(&job);
  for (int i = 0; i < out->n_files; i++) {
    if (!rc) rc = first_problem(&results[i]);
    free(results[i].text);
  }
  free(results);
  if (rc) mt_ckpt_close(out);
  return rc;
}

/* Appends "line\n" to *s (best effort: out of memory loses the note only). */
static void note(char **s, const char *line) {
  size_t had = *s ? strlen(*s) : 0, k = strlen(line);
  char *p = realloc(*s, had + k + 2);
  if (!p) return;
  memcpy(p + had, line, k);
  p[had + k] = '\n';
  p[had + k + 1] = 0;
  *s = p;
}

/* Appends a damaged step to the list (best effort, as note). */
static void note_damage(mt_ckpt_damage **v, int *n, int64_t step, const char *why) {
  mt_ckpt_damage *p = realloc(*v, (size_t)(*n + 1) * sizeof *p);
  if (!p) return;
  p[*n].step = step;
  snprintf(p[*n].why, sizeof p[*n].why, "%.*s", (int)sizeof p[*n].why - 1, why);
  *v = p;
  ++*n;
}

/* A message without its "ckpt: ", for quoting inside another. */
const char *mt_ckpt_unprefixed(const char *msg) {
  return strncmp(msg, "ckpt: ", 6) ? msg : msg + 6;
}

int mt_ckpt_find(const char *job_dir, int64_t step, int verify, mt_ckpt *out) {
  memset(out, 0, sizeof *out);
  if (step < 0) return mt_ckpt_find_below(job_dir, INT64_MAX, verify, out);
  if (strlen(job_dir) > MT_CKPT_PATH_MAX - 64)
    return mt_seterr(MT_EINVAL, "ckpt: job directory path too long: %.64s...", job_dir);
  char dir[MT_CKPT_PATH_MAX], name[32];
  mt__ckpt_step_name(name, step);
  snprintf(dir, sizeof dir, "%s/%s", job_dir, name);
  struct stat st;
  if (stat(dir, &st))
    return mt_seterr(MT_ENOENT, "ckpt: %s: no such checkpoint (%s)", dir, strerror(errno));
  return open_step(dir, step, verify, out);
}

int mt_ckpt_open_path(const char *dir, int verify, mt_ckpt *out) {
  char job_dir[MT_CKPT_PATH_MAX], manifest[MT_CKPT_PATH_MAX + 16];
  int64_t step = -1;
  struct stat st;
  snprintf(job_dir, sizeof job_dir, "%s", dir);
  for (size_t k = strlen(job_dir); k > 1 && job_dir[k - 1] == '/'; k--) job_dir[k - 1] = 0;
  snprintf(manifest, sizeof manifest, "%s/manifest.json", job_dir);
  if (!stat(manifest, &st) && S_ISREG(st.st_mode)) { /* one step directory: its job's, that step */
    char *slash = strrchr(job_dir, '/');
    const char *base = slash ? slash + 1 : job_dir;
    char *end = NULL;
    long long s = strncmp(base, "step_", 5) ? -1 : strtoll(base + 5, &end, 10);
    if (s < 0 || *end) return mt_seterr(MT_EINVAL, "%s is not named step_NNNNNNNN", dir);
    step = s;
    if (slash)
      *slash = 0;
    else
      snprintf(job_dir, sizeof job_dir, ".");
  }
  return mt_ckpt_find(job_dir, step, verify, out);
}

int mt_ckpt_open_named(const char *dir, int verify, mt_ckpt *out) {
  char manifest[MT_CKPT_PATH_MAX + 16];
  struct stat st;
  snprintf(manifest, sizeof manifest, "%s/manifest.json", dir);
  if (!stat(manifest, &st) && S_ISREG(st.st_mode)) return mt_ckpt_open_path(dir, verify, out);
  int64_t latest = -1;
  int rc = mt__ckpt_read_latest(dir, &latest);
  if (rc == MT_ENOENT) return mt_ckpt_find(dir, -1, verify, out); /* no latest: the newest */
  if (rc) return rc;
  return mt_ckpt_find(dir, latest, verify, out);
}

/* A check that could not read a checkpoint (an I/O error, no memory) says
 * nothing of the checkpoint: a find stops there rather than take an older one,
 * which would train the steps between again for what may be a passing fault. */
static int unreadable(int rc) { return rc == MT_EIO || rc == MT_ENOMEM; }

static int stop_at_unreadable(int rc, const char *name, const char *msg) {
  return mt_seterr(rc,
                   "ckpt: %s could not be read, so no older checkpoint is taken in its place: %s",
                   name, mt_ckpt_unprefixed(msg));
}

/* Never newer than latest's target: a newer committed directory is a save
 * whose latest write was lost, or a timeline an operator rolled back from.
 * A caller that passed over a checkpoint (below = its step) sees latest's
 * target only when it is older, and hears of a broken latest only then. */
int mt_ckpt_find_below(const char *job_dir, int64_t below, int verify, mt_ckpt *out) {
  memset(out, 0, sizeof *out);
  if (strlen(job_dir) > MT_CKPT_PATH_MAX - 64)
    return mt_seterr(MT_EINVAL, "ckpt: job directory path too long: %.64s...", job_dir);
  char dir[MT_CKPT_PATH_MAX], name[32];
  mt__ckpt_dirent *dirs;
  size_t nd;
  int rc = mt__ckpt_scan(job_dir, &dirs, &nd);
  if (rc) return rc;
  char *skipped = NULL, msg[2048];
  mt_ckpt_damage *damaged = NULL;
  int n_damaged = 0;
  /* candidates: latest's target when below `below`, then committed steps
   * below both */
  int64_t latest = -1, cap = below;
  int use_latest = 0;
  int lrc = mt__ckpt_read_latest(job_dir, &latest);
  if (unreadable(lrc)) { /* the newest committed may be a timeline latest left behind */
    free(dirs);
    return mt_wraperr(lrc, "ckpt: %s/latest could not be read, so no checkpoint is taken", job_dir);
  }
  if (!lrc) {
    mt__ckpt_step_name(name, latest);
    snprintf(dir, sizeof dir, "%s/%s", job_dir, name);
    if (mt__ckpt_committed(dir)) {
      use_latest = latest < below;
      if (latest < cap) cap = latest;
    } else {
      lrc = mt_seterr(MT_ECORRUPT, "ckpt: %s/latest names %s, which has no committed manifest",
                      job_dir, name);
    }
  }
  size_t nc = 0;
  for (size_t i = 0; i < nd; i++) nc += dirs[i].committed && dirs[i].step < cap;
  if (!use_latest && !nc) {
    free(dirs);
    if (below != INT64_MAX)
      return mt_seterr(MT_ENOENT, "ckpt: no committed checkpoint in %s below step %" PRId64,
                       job_dir, below);
    return mt_seterr(MT_ENOENT, "ckpt: no committed checkpoint in %s", job_dir);
  }
  if (lrc && (latest < 0 || latest < below)) {
    snprintf(msg, sizeof msg, "%s", mt_errmsg());
    mt_log_warn("%s; using the newest committed step directory", msg);
    if (lrc != MT_ENOENT) note(&skipped, msg);
  }
  if (use_latest) {
    mt__ckpt_step_name(name, latest);
    snprintf(dir, sizeof dir, "%s/%s", job_dir, name);
    rc = open_step(dir, latest, verify, out);
    if (!rc) {
      free(dirs);
      return 0;
    }
    snprintf(msg, sizeof msg, "%s", mt_errmsg());
    if (unreadable(rc)) {
      free(dirs);
      free(skipped);
      free(damaged);
      return stop_at_unreadable(rc, name, msg);
    }
    mt_log_warn("ckpt: skipping the latest checkpoint, %s: %s; falling back to the previous one",
                name, mt_ckpt_unprefixed(msg));
    note(&skipped, msg);
    if (rc == MT_ECORRUPT) note_damage(&damaged, &n_damaged, latest, msg);
  }
  for (size_t i = nd; i-- > 0;) {
    if (!dirs[i].committed || dirs[i].step >= cap) continue;
    mt__ckpt_step_name(name, dirs[i].step);
    snprintf(dir, sizeof dir, "%s/%s", job_dir, name);
    rc = open_step(dir, dirs[i].step, verify, out);
    if (!rc) {
      free(dirs);
      out->skipped = skipped;
      out->damaged = damaged;
      out->n_damaged = n_damaged;
      if (skipped) mt_log_warn("ckpt: loading %s instead of a newer checkpoint", dir);
      return 0;
    }
    snprintf(msg, sizeof msg, "%s", mt_errmsg());
    if (unreadable(rc)) {
      free(dirs);
      free(skipped);
      free(damaged);
      return stop_at_unreadable(rc, name, msg);
    }
    mt_log_warn("ckpt: skipping %s: %s; falling back to the previous one", name,
                mt_ckpt_unprefixed(msg));
    note(&skipped, msg);
    if (rc == MT_ECORRUPT) note_damage(&damaged, &n_damaged, dirs[i].step, msg);
  }
  free(dirs);
  free(damaged);
  rc = mt_seterr(MT_ECORRUPT, "ckpt: no checkpoint in %s passed its checks:\n%s", job_dir,
                 skipped ? skipped : "");
  free(skipped);
  return rc;
}

/* Linear: tp x pp files, asked once per rank. */
const mt_ckpt_file *mt_ckpt_file_of(const mt_ckpt *c, int tp, int pp) {
  for (int i = 0; i < c->n_files; i++)
    if (c->files[i].tp == tp && c->files[i].pp == pp) return &c->files[i];
  return NULL;
}

/* A rank's ZeRO slice by pread; no checksums (find or mt_ckpt_verify_file did
 * them), so it is as fast as the disk. */
int mt_ckpt_read(const mt_ckpt *c, int tp, int pp, const char *array, uint64_t lo, uint64_t n,
                 float *out) {
  char disp[64];
  dir_disp(c->dir, disp);
  const mt_ckpt_file *f = mt_ckpt_file_of(c, tp, pp);
  if (!f) return mt_seterr(MT_EINVAL, "ckpt: %s has no shard tp %d pp %d", disp, tp, pp);
  int a = 0;
  while (a < f->n_arrays && strcmp(f->arrays[a], array)) a++;
  if (a == f->n_arrays)
    return mt_seterr(MT_EINVAL, "ckpt: %s/%s has no array \"%s\"", disp, f->name, array);
  if (lo > f->n || n > f->n - lo)
    return mt_seterr(MT_EINVAL,
                     "ckpt: %s/%s: range [%" PRIu64 ", %" PRIu64 ") outside [0, %" PRIu64 ")", disp,
                     f->name, lo, lo + n, f->n);
  char path[MT_CKPT_PATH_MAX + 64];
  snprintf(path, sizeof path, "%s/%s", c->dir, f->name);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return mt_seterr(MT_EIO, "ckpt: open %s/%s: %s", disp, f->name, strerror(errno));
  uint8_t h[MT__CKPT_HEADER_BYTES];
  mt__ckpt_header hd;
  const char *why = NULL;
  int rc = 0;
  /* the header again: the file may have been replaced since mt_ckpt_find */
  int64_t head = mt__pread_full(fd, h, sizeof h, 0);
  if (head < 0)
    rc = mt_seterr(MT_EIO, "ckpt: read header of %s/%s: %s", disp, f->name, strerror(errno));
  else if (head != (int64_t)sizeof h || (why = mt__ckpt_header_decode(h, &hd)) ||
           hd.tp != (uint32_t)tp || hd.pp != (uint32_t)pp || hd.n != f->n)
    rc = mt_seterr(MT_ECORRUPT, "ckpt: %s/%s: header %s", disp, f->name,
                   head != (int64_t)sizeof h ? "truncated"
                   : why                     ? why
                                             : "does not match the manifest");
  uint64_t off = MT__CKPT_HEADER_BYTES + 4 * ((uint64_t)a * f->n + lo);
  int64_t got = rc ? 0 : mt__pread_full(fd, out, 4 * n, off);
  if (!rc && got < 0)
    rc = mt_seterr(MT_EIO, "ckpt: read %s/%s at offset %" PRIu64 ": %s", disp, f->name, off,
                   strerror(errno));
  else if (!rc && (uint64_t)got != 4 * n)
    rc = mt_seterr(MT_ECORRUPT, "ckpt: %s/%s truncated: ends inside [%" PRIu64 ", %" PRIu64 ")",
                   disp, f->name, off, off + 4 * n);
  close(fd);
  return rc;
}

/* The same check as a find with MT_CKPT_VERIFY_CHECKSUMS makes of each file,
 * for one file, on the calling thread: resume spreads the files over ranks. */
int mt_ckpt_verify_file(const mt_ckpt *c, int tp, int pp) {
  char disp[64];
  dir_disp(c->dir, disp);
  const mt_ckpt_file *f = mt_ckpt_file_of(c, tp, pp);
  if (!f) return mt_seterr(MT_EINVAL, "ckpt: %s has no shard tp %d pp %d", disp, tp, pp);
  uint8_t *buf = malloc(VERIFY_BUF_BYTES);
  if (!buf) return mt_seterr(MT_ENOMEM, "ckpt: verify %s/%s: out of memory", disp, f->name);
  file_check r = {0};
  check_job job = {c, disp, 1, 0, &r, 0, 0};
  check_file(&job, f, &r, buf);
  free(buf);
  return first_problem(&r);
}

/* Every problem, not the first: whoever repairs a copy wants the whole list. */
int mt_ckpt_verify(const char *step_dir, mt_ckpt_report_fn report, void *arg) {
  if (strlen(step_dir) > MT_CKPT_PATH_MAX - 64)
    return mt_seterr(MT_EINVAL, "ckpt: path too long: %.64s...", step_dir);
  char disp[64];
  dir_disp(step_dir, disp);
  mt_ckpt c;
  int rc = parse_manifest(step_dir, disp, -1, &c);
  if (rc) {
    if (report) report(arg, mt_errmsg());
    mt_ckpt_close(&c);
    return rc;
  }
  file_check *results = calloc((size_t)c.n_files, sizeof *results);
  if (!results) {
    mt_ckpt_close(&c);
    return mt_seterr(MT_ENOMEM, "ckpt: verify %s: out of memory", disp);
  }
  check_job job = {&c, disp, 1, 1, results, 0, 0};
  check_files(&job);
  int total = 0;
  char first[1024] = "";
  for (int i = 0; i < c.n_files; i++) {
    file_check *r = &results[i];
    if (r->n_problems && !rc) {
      rc = r->rc;
      if (r->text) snprintf(first, sizeof first, "%.*s", (int)strcspn(r->text, "\n"), r->text);
    }
    total += r->n_problems;
    for (char *p = r->text; p && *p;) {
      char *nl = strchr(p, '\n');
      if (nl) *nl = 0;
      if (report) report(arg, p);
      p = nl ? nl + 1 : p + strlen(p);
    }
    free(r->text);
  }
  free(results);
  mt_ckpt_close(&c);
  if (rc)
    return total > 1 ? mt_seterr(rc, "%s (and %d more problems)", first, total - 1)
                     : mt_seterr(rc, "%s", first);
  return 0;
}
