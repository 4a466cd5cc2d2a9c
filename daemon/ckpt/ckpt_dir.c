/* ckpt_dir.c — the job directory: names, the shard header codec, the scan of
 * step directories, the `latest` pointer, listing and retention. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>

#include "ckpt_int.h"
#include "err.h"
#include "fileio.h"
#include "log.h"

static const char shard_magic[8] = {'M', 'T', 'C', 'K', 'P', 'T', '0', '1'};

/* Widths fixed by the format: tp < 100 (inside a node), pp < 1000 stages. */
void mt__ckpt_shard_name(char out[32], int tp, int pp) {
  snprintf(out, 32, "shard_tp%02d_pp%03d.bin", tp, pp);
}

/* Zero-padded so that directory listings sort like steps. */
void mt__ckpt_step_name(char out[32], int64_t step) {
  snprintf(out, 32, "step_%08lld", (long long)step);
}

/* Only the canonical spelling, so that one step has one directory. */
int mt__ckpt_parse_step(const char *name, int64_t *step) {
  if (strncmp(name, "step_", 5)) return -1;
  const char *p = name + 5;
  size_t len = strlen(p);
  if (len < 1 || len > 18) return -1;
  int64_t v = 0;
  for (; *p; p++) {
    if (*p < '0' || *p > '9') return -1;
    v = v * 10 + (*p - '0');
  }
  char canon[32]; /* one name per step: "step_10" is not "step_00000010" */
  mt__ckpt_step_name(canon, v);
  if (strcmp(canon, name)) return -1;
  *step = v;
  return 0;
}

/* Strict: exactly what the writer prints, nothing a hand edit could slip in. */
int mt__ckpt_parse_hex64(const char *s, uint64_t *v) {
  if (!s || strlen(s) != 16) return -1;
  uint64_t x = 0;
  for (int i = 0; i < 16; i++) {
    char c = s[i];
    int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
    if (d < 0) return -1;
    x = x << 4 | (uint64_t)d;
  }
  *v = x;
  return 0;
}

uint64_t mt__ckpt_seal(const json_t *manifest, int *ok) {
  *ok = 0;
  json_t *copy = json_deep_copy(manifest);
  if (!copy) return 0;
  json_object_del(copy, MT__CKPT_SEAL_KEY);
  /* reals print with 17 digits: what a reader parses back prints the same */
  char *text = json_dumps(copy, JSON_COMPACT | JSON_SORT_KEYS);
  json_decref(copy);
  if (!text) return 0;
  uint64_t h = XXH3_64bits(text, strlen(text));
  free(text);
  *ok = 1;
  return h;
}

/* 0 on overflow, so an absurd N from a manifest is refused, not wrapped. */
uint64_t mt__ckpt_file_bytes(uint64_t n, int n_arrays) {
  if (n_arrays <= 0 || n > ((uint64_t)INT64_MAX - MT__CKPT_HEADER_BYTES) / 4 / (uint64_t)n_arrays)
    return 0;
  return MT__CKPT_HEADER_BYTES + 4 * n * (uint64_t)n_arrays;
}

/* Names go into JSON and messages: keep them plain. */
int mt__ckpt_check_array_name(const char *s) {
  size_t len = strlen(s);
  if (len < 1 || len >= MT_CKPT_NAME_MAX) return -1;
  for (; *s; s++)
    if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') ||
          *s == '_' || *s == '.' || *s == '-'))
      return -1;
  return 0;
}

/* Refuses what could not be written, or read back, within the format's limits. */
int mt__ckpt_check_desc(const mt_ckpt_shard_desc *d) {
  if (!d) return mt_seterr(MT_EINVAL, "ckpt: no shard description");
  if (d->tp < 0 || d->tp > 99 || d->pp < 0 || d->pp > 999)
    return mt_seterr(MT_EINVAL, "ckpt: shard tp %d pp %d: tp must be 0..99 and pp 0..999", d->tp,
                     d->pp);
  if (d->n_arrays < 1 || d->n_arrays > MT_CKPT_MAX_ARRAYS || !d->arrays)
    return mt_seterr(MT_EINVAL, "ckpt: shard tp %d pp %d: %d arrays (1..%d)", d->tp, d->pp,
                     d->n_arrays, MT_CKPT_MAX_ARRAYS);
  if (d->n < 1 || !mt__ckpt_file_bytes(d->n, d->n_arrays))
    return mt_seterr(MT_EINVAL, "ckpt: shard tp %d pp %d: %" PRIu64 " floats per array", d->tp,
                     d->pp, d->n);
  for (int a = 0; a < d->n_arrays; a++) {
    if (!d->arrays[a] || mt__ckpt_check_array_name(d->arrays[a]))
      return mt_seterr(
          MT_EINVAL, "ckpt: shard tp %d pp %d: array name %d \"%s\": 1..%d of [A-Za-z0-9_.-]",
          d->tp, d->pp, a, d->arrays[a] ? d->arrays[a] : "(null)", MT_CKPT_NAME_MAX - 1);
    for (int b = 0; b < a; b++)
      if (!strcmp(d->arrays[a], d->arrays[b]))
        return mt_seterr(MT_EINVAL, "ckpt: shard tp %d pp %d: array \"%s\" named twice", d->tp,
                         d->pp, d->arrays[a]);
  }
  return 0;
}

/* Header fields are little-endian whatever the host: tools read them too. */
static void st_u32(uint8_t *p, uint32_t v) {
  for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static void st_u64(uint8_t *p, uint64_t v) {
  for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static uint32_t ld_u32(const uint8_t *p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; i--) v = v << 8 | p[i];
  return v;
}
static uint64_t ld_u64(const uint8_t *p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; i--) v = v << 8 | p[i];
  return v;
}

/* The shard's only self-description: enough to tell a stray or swapped file. */
void mt__ckpt_header_encode(uint8_t h[MT__CKPT_HEADER_BYTES], int tp, int pp, uint64_t n,
                            int n_arrays) {
  memset(h, 0, MT__CKPT_HEADER_BYTES);
  memcpy(h, shard_magic, 8);
  st_u32(h + 8, MT_CKPT_VERSION);
  st_u32(h + 12, MT__CKPT_HEADER_BYTES);
  st_u32(h + 16, (uint32_t)tp);
  st_u32(h + 20, (uint32_t)pp);
  st_u64(h + 24, n);
  st_u32(h + 32, (uint32_t)n_arrays);
  st_u64(h + 56, (uint64_t)XXH3_64bits(h, 56));
}

/* Magic and checksum first, so a reason never rests on unchecked bytes. */
const char *mt__ckpt_header_decode(const uint8_t h[MT__CKPT_HEADER_BYTES], mt__ckpt_header *out) {
  if (memcmp(h, shard_magic, 8)) return "not a shard file (bad magic)";
  if (ld_u64(h + 56) != (uint64_t)XXH3_64bits(h, 56)) return "header checksum mismatch";
  out->version = ld_u32(h + 8);
  out->header_bytes = ld_u32(h + 12);
  out->tp = ld_u32(h + 16);
  out->pp = ld_u32(h + 20);
  out->n = ld_u64(h + 24);
  out->n_arrays = ld_u32(h + 32);
  if (out->version != MT_CKPT_VERSION) return "unknown format version";
  if (out->header_bytes != MT__CKPT_HEADER_BYTES) return "unknown header size";
  return NULL;
}

/* The commit mark: nothing else makes a directory a checkpoint. */
int mt__ckpt_committed(const char *step_dir) {
  char path[MT_CKPT_PATH_MAX + 32];
  struct stat st;
  snprintf(path, sizeof path, "%s/" MT__CKPT_MANIFEST, step_dir);
  if (stat(path, &st)) return errno == ENOENT || errno == ENOTDIR ? 0 : -1;
  return S_ISREG(st.st_mode);
}

/* Strict: a torn or hand-edited latest is reported, never guessed at. */
int mt__ckpt_read_latest(const char *job_dir, int64_t *step) {
  char path[MT_CKPT_PATH_MAX + 16], buf[64];
  snprintf(path, sizeof path, "%s/" MT__CKPT_LATEST, job_dir);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return mt_seterr(MT_ENOENT, "ckpt: %s missing", path);
    return mt_seterr(MT_EIO, "ckpt: open %s: %s", path, strerror(errno));
  }
  int64_t k = mt__pread_full(fd, buf, sizeof buf - 1, 0);
  int e = errno;
  close(fd);
  if (k < 0) return mt_seterr(MT_EIO, "ckpt: read %s: %s", path, strerror(e));
  buf[k] = 0;
  if (k > 0 && buf[k - 1] == '\n') buf[--k] = 0;
  if (mt__ckpt_parse_step(buf, step))
    return mt_seterr(MT_ECORRUPT, "ckpt: %s holds \"%.40s\", not a step directory name", path, buf);
  return 0;
}

/* Ascending steps: retention and fallback walk them in order. */
static int dirent_cmp(const void *a, const void *b) {
  int64_t x = ((const mt__ckpt_dirent *)a)->step, y = ((const mt__ckpt_dirent *)b)->step;
  return (x > y) - (x < y);
}

/* Every step directory, committed or not: readers filter, retention needs both. */
int mt__ckpt_scan(const char *job_dir, mt__ckpt_dirent **out, size_t *n) {
  *out = NULL;
  *n = 0;
  DIR *d = opendir(job_dir);
  if (!d) {
    if (errno == ENOENT) return 0;
    return mt_seterr(MT_EIO, "ckpt: open directory %s: %s", job_dir, strerror(errno));
  }
  size_t cap = 0;
  struct dirent *e;
  char path[MT_CKPT_PATH_MAX + 64];
  int rc = 0;
  while ((e = readdir(d))) {
    int64_t step;
    struct stat st;
    if (mt__ckpt_parse_step(e->d_name, &step)) continue;
    snprintf(path, sizeof path, "%s/%s", job_dir, e->d_name);
    if (stat(path, &st) || !S_ISDIR(st.st_mode)) continue;
    if (*n == cap) {
      cap = cap ? 2 * cap : 16;
      mt__ckpt_dirent *v = realloc(*out, cap * sizeof *v);
      if (!v) {
        rc = mt_seterr(MT_ENOMEM, "ckpt: scan %s: out of memory", job_dir);
        break;
      }
      *out = v;
    }
    (*out)[(*n)++] = (mt__ckpt_dirent){step, mt__ckpt_committed(path) != 0};
  }
  closedir(d);
  if (rc) {
    free(*out);
    *out = NULL;
    *n = 0;
    return rc;
  }
  if (*n) qsort(*out, *n, sizeof **out, dirent_cmp);
  return 0;
}

/* Slices run to gigabytes: pread returns short counts past 2 GiB and on signals. */
int64_t mt__pread_full(int fd, void *buf, size_t n, uint64_t off) {
  uint8_t *p = buf;
  size_t done = 0;
  while (done < n) {
    size_t want = n - done > (1u << 30) ? (1u << 30) : n - done;
    ssize_t k = pread(fd, p + done, want, (off_t)(off + done));
    if (k < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    if (k == 0) break;
    done += (size_t)k;
  }
  return (int64_t)done;
}

/* As mt__pread_full; a zero-byte write is an error, not a loop. */
int mt__pwrite_full(int fd, const void *buf, size_t n, uint64_t off) {
  const uint8_t *p = buf;
  size_t done = 0;
  while (done < n) {
    size_t want = n - done > (1u << 30) ? (1u << 30) : n - done;
    ssize_t k = pwrite(fd, p + done, want, (off_t)(off + done));
    if (k < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    if (k == 0) {
      errno = EIO;
      return -1;
    }
    done += (size_t)k;
  }
  return 0;
}

/* Manifest first: a crash mid-delete leaves an uncommitted directory, never a
 * committed one with holes. */
int mt__ckpt_remove_step(const char *step_dir) {
  char path[MT_CKPT_PATH_MAX + 300];
  /* a link to another job's step (an operator's warm start) loses only the
   * link: unlinking through it would delete that job's checkpoint */
  struct stat st;
  if (!lstat(step_dir, &st) && S_ISLNK(st.st_mode)) {
    if (unlink(step_dir) && errno != ENOENT)
      return mt_seterr(MT_EIO, "ckpt: remove link %s: %s", step_dir, strerror(errno));
    return 0;
  }
  snprintf(path, sizeof path, "%s/" MT__CKPT_MANIFEST, step_dir);
  if (unlink(path) && errno != ENOENT)
    return mt_seterr(MT_EIO, "ckpt: remove %s: %s", path, strerror(errno));
  /* then the rest, subdirectories included (proto/ckpt-v1.md: whatever else
   * a step directory holds goes with it) */
  int rc = mt_remove_tree(step_dir);
  return rc ? mt_wraperr(rc, "ckpt") : 0;
}

/* The shard files (name and size) whose header already gave their size in
 * this listing: every checkpoint of a layout has the same files of the
 * same sizes, so a listing of 300 checkpoints of 280 shards reads 280
 * headers, not 84,000 (an open is a round trip to an NFS server). Keys are
 * XXH3 of the name seeded by the size, 0 an empty slot. */
typedef struct shard_memo {
  uint64_t *slot;
  size_t cap, n;
} shard_memo;

static uint64_t memo_key(const char *name, uint64_t size) {
  uint64_t k = XXH3_64bits_withSeed(name, strlen(name), size);
  return k ? k : 1;
}

/* Whether the key is there; with add, puts it there (a full or failed
 * table only forgets: the header is read again). */
static int memo_has(shard_memo *m, uint64_t key, int add) {
  if (add && 2 * (m->n + 1) > m->cap) {
    size_t cap = m->cap ? 2 * m->cap : 1024;
    uint64_t *s = calloc(cap, sizeof *s);
    if (!s) return 0;
    for (size_t i = 0; i < m->cap; i++)
      for (size_t j = m->slot[i] & (cap - 1); m->slot[i]; j = (j + 1) & (cap - 1))
        if (!s[j]) {
          s[j] = m->slot[i];
          break;
        }
    free(m->slot);
    m->slot = s, m->cap = cap;
  }
  if (!m->cap) return 0;
  for (size_t j = key & (m->cap - 1);; j = (j + 1) & (m->cap - 1)) {
    if (m->slot[j] == key) return 1;
    if (!m->slot[j]) {
      if (add) m->slot[j] = key, m->n++;
      return 0;
    }
  }
}

/* A shard file's size against the size its header gives (64 + 4·N·A):
 * "" when they agree, else why, into why (cap bytes). */
static void check_shard_size(const char *path, const char *name, uint64_t size, char *why,
                             size_t cap) {
  uint8_t h[MT__CKPT_HEADER_BYTES];
  mt__ckpt_header hd;
  const char *bad;
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    snprintf(why, cap, "%.60s: %s", name, strerror(errno));
    return;
  }
  if (size < sizeof h)
    snprintf(why, cap, "%.60s: %" PRIu64 " bytes, short of its %d-byte header", name, size,
             MT__CKPT_HEADER_BYTES);
  else if (mt__pread_full(fd, h, sizeof h, 0) != (int64_t)sizeof h)
    snprintf(why, cap, "%.60s: read header: %s", name, strerror(errno));
  else if ((bad = mt__ckpt_header_decode(h, &hd)))
    snprintf(why, cap, "%.60s: header: %.120s", name, bad);
  else if (mt__ckpt_file_bytes(hd.n, (int)hd.n_arrays) != size)
    snprintf(why, cap, "%.60s: %" PRIu64 " of %" PRIu64 " bytes", name, size,
             mt__ckpt_file_bytes(hd.n, (int)hd.n_arrays));
  close(fd);
}

/* The manifest's step, from its first 4 KiB (the writer puts it near the
 * top, at indent 1; a manifest can be tens of MB): the disagreement with
 * the directory's step, into why, or nothing when they agree or the head
 * does not say. */
static void check_manifest_step(const char *step_dir, int64_t step, char *why, size_t cap) {
  char path[MT_CKPT_PATH_MAX + 32], head[4097];
  snprintf(path, sizeof path, "%s/" MT__CKPT_MANIFEST, step_dir);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return;
  int64_t got = mt__pread_full(fd, head, sizeof head - 1, 0);
  close(fd);
  if (got <= 0) return;
  head[got] = 0;
  const char *at = strstr(head, "\n \"step\":");
  char *end;
  long long said = at ? strtoll(at + 9, &end, 10) : step;
  if (at && end != at + 9 && said != step)
    snprintf(why, cap, MT__CKPT_MANIFEST " says step %lld, its directory step %" PRId64, said,
             step);
}

/* Bytes of the committed files of one step directory (shards and manifest;
 * temp files left by a crash are not part of the checkpoint), and the first
 * damage the sizes show (a shard not the size its header gives, the
 * manifest's step not the directory's) into damaged, "" when none. */
static uint64_t step_bytes(const char *step_dir, int64_t step, int read_manifest, shard_memo *memo,
                           char *damaged, size_t cap) {
  damaged[0] = 0;
  DIR *d = opendir(step_dir);
  if (!d) return 0;
  uint64_t sum = 0;
  struct dirent *e;
  char path[MT_CKPT_PATH_MAX + 300];
  while ((e = readdir(d))) {
    size_t len = strlen(e->d_name);
    int shard = !strncmp(e->d_name, "shard_", 6) && len > 4 && !strcmp(e->d_name + len - 4, ".bin");
    if (!shard && strcmp(e->d_name, MT__CKPT_MANIFEST)) continue;
    struct stat st;
    snprintf(path, sizeof path, "%s/%s", step_dir, e->d_name);
    if (stat(path, &st) || !S_ISREG(st.st_mode)) continue;
    sum += (uint64_t)st.st_size;
    uint64_t key = shard ? memo_key(e->d_name, (uint64_t)st.st_size) : 0;
    if (shard && !damaged[0] && !memo_has(memo, key, 0)) {
      check_shard_size(path, e->d_name, (uint64_t)st.st_size, damaged, cap);
      if (!damaged[0]) memo_has(memo, key, 1);
    }
  }
  closedir(d);
  if (!damaged[0] && read_manifest) check_manifest_step(step_dir, step, damaged, cap);
  return sum;
}

/* Directory entries, stat, shard headers and manifest heads only: the
 * control plane polls this, and a manifest can be tens of MB. */
int mt_ckpt_list(const char *job_dir, mt_ckpt_entry **out, size_t *n) {
  *out = NULL;
  *n = 0;
  if (strlen(job_dir) > MT_CKPT_PATH_MAX - 32)
    return mt_seterr(MT_EINVAL, "ckpt: job directory path too long: %.64s...", job_dir);
  mt__ckpt_dirent *dirs;
  size_t nd;
  int rc = mt__ckpt_scan(job_dir, &dirs, &nd);
  if (rc) return rc;
  int64_t latest = -1;
  if (mt__ckpt_read_latest(job_dir, &latest)) latest = -1;
  size_t nc = 0;
  int64_t newest = -1;
  for (size_t i = 0; i < nd; i++) {
    nc += dirs[i].committed;
    if (dirs[i].committed && dirs[i].step > newest) newest = dirs[i].step;
  }
  mt_ckpt_entry *v = nc ? calloc(nc, sizeof *v) : NULL;
  if (nc && !v) {
    free(dirs);
    return mt_seterr(MT_ENOMEM, "ckpt: list %s: out of memory", job_dir);
  }
  size_t k = 0;
  shard_memo memo = {0};
  for (size_t i = 0; i < nd; i++) {
    if (!dirs[i].committed) continue;
    char name[32], manifest[MT_CKPT_PATH_MAX + 32];
    struct stat st;
    mt__ckpt_step_name(name, dirs[i].step);
    v[k].step = dirs[i].step;
    snprintf(v[k].path, sizeof v[k].path, "%s/%s", job_dir, name);
    snprintf(manifest, sizeof manifest, "%s/" MT__CKPT_MANIFEST, v[k].path);
    v[k].created = stat(manifest, &st) ? 0 : (int64_t)st.st_mtime;
    /* a manifest's head only where a resume looks: the newest and latest's */
    int resumable = dirs[i].step == latest || dirs[i].step == newest;
    v[k].bytes =
        step_bytes(v[k].path, dirs[i].step, resumable, &memo, v[k].damaged, sizeof v[k].damaged);
    v[k].latest = dirs[i].step == latest;
    k++;
  }
  free(memo.slot);
  free(dirs);
  *out = v;
  *n = k;
  return 0;
}

/* The rename first, so that nothing is ever lost: a crash or a failure
 * before latest is rewritten leaves latest naming a directory that is gone,
 * which readers pass over with a warning for the newest committed one (the
 * next commit rewrites it). The other order would leave the damaged
 * directory committed beside a latest older than it, and the next begin of
 * its step would delete it. The suffix makes a name mt__ckpt_parse_step
 * refuses, so no scan sees the directory again. */
int mt_ckpt_set_aside(const char *job_dir, int64_t step, int64_t loaded, char *moved_to,
                      size_t cap) {
  return mt_ckpt_set_aside_as(job_dir, step, loaded, MT_CKPT_DAMAGED_SUFFIX, moved_to, cap);
}

int mt_ckpt_set_aside_as(const char *job_dir, int64_t step, int64_t loaded, const char *suffix,
                         char *moved_to, size_t cap) {
  if (moved_to && cap) moved_to[0] = 0;
  if (strlen(job_dir) > MT_CKPT_PATH_MAX - 64)
    return mt_seterr(MT_EINVAL, "ckpt: job directory path too long: %.64s...", job_dir);
  if (loaded < 0 || loaded >= step)
    return mt_seterr(MT_EINVAL,
                     "ckpt: set aside step %" PRId64 " of %s: the loaded step %" PRId64
                     " must be older",
                     step, job_dir, loaded);
  char name[32], lname[32], from[MT_CKPT_PATH_MAX], ldir[MT_CKPT_PATH_MAX];
  char to[MT_CKPT_PATH_MAX + 32];
  mt__ckpt_step_name(name, step);
  mt__ckpt_step_name(lname, loaded);
  snprintf(from, sizeof from, "%s/%s", job_dir, name);
  snprintf(ldir, sizeof ldir, "%s/%s", job_dir, lname);
  struct stat st;
  if (lstat(from, &st))
    return mt_seterr(errno == ENOENT ? MT_ENOENT : MT_EIO, "ckpt: set aside %s: %s", from,
                     strerror(errno));
  /* a link to another job's step (an operator's warm start) is set aside as
   * a link: rename(2) moves the link, and the other job's files stay */
  if (S_ISLNK(st.st_mode) && stat(from, &st)) {
    int e = errno, nothing = e == ENOENT || e == ENOTDIR;
    return mt_seterr(nothing ? MT_ENOENT : MT_EIO, "ckpt: set aside %s: %s (%s)", from,
                     nothing ? "a link to nothing" : "a link that cannot be followed", strerror(e));
  }
  if (!S_ISDIR(st.st_mode))
    return mt_seterr(MT_ENOENT, "ckpt: set aside %s: not a directory", from);
  if (!mt__ckpt_committed(ldir))
    return mt_seterr(MT_EINVAL, "ckpt: set aside %s: %s, for latest to name, is not committed",
                     from, ldir);
  /* lstat, then rename: rename(2) would quietly replace an empty directory of
   * the new name; only world rank 0 ever renames, so nothing races it */
  int k = 1;
  for (;; k++) {
    if (k > 999)
      return mt_seterr(MT_EIO, "ckpt: set aside %s: %s%s to .999 all exist", from, name, suffix);
    if (k == 1)
      snprintf(to, sizeof to, "%s%s", from, suffix);
    else
      snprintf(to, sizeof to, "%s%s.%d", from, suffix, k);
    if (!lstat(to, &st)) continue;
    if (errno != ENOENT)
      return mt_seterr(MT_EIO, "ckpt: set aside %s: stat %s: %s", from, to, strerror(errno));
    break;
  }
  if (rename(from, to))
    return mt_seterr(MT_EIO, "ckpt: rename %s -> %s: %s", from, to, strerror(errno));
  if (moved_to && cap) snprintf(moved_to, cap, "%s", to);
  /* writing latest fsyncs job_dir, and with it the rename */
  int64_t latest;
  int rc;
  if (!mt__ckpt_read_latest(job_dir, &latest) && latest == loaded) {
    if ((rc = mt_fsync_parent_dir(to)))
      return mt_wraperr(rc, "ckpt: renamed %s -> %s, not yet durable", from, to);
  } else if ((rc = mt__ckpt_write_latest(job_dir, loaded))) {
    return mt_wraperr(rc, "ckpt: renamed %s -> %s, but could not point latest at %s", from, to,
                      lname);
  }
  return 0;
}

/* `latest` temp files (latest.tmp.<pid>.<hex>) a crash or a power cut left
 * in the job directory, which no scan of step directories sees: those over
 * a minute old go (only world rank 0 writes latest, and it has finished). */
static void remove_stale_latest_temps(const char *job_dir) {
  DIR *d = opendir(job_dir);
  if (!d) return;
  time_t now = time(NULL);
  struct dirent *e;
  while ((e = readdir(d))) {
    if (strncmp(e->d_name, MT__CKPT_LATEST ".tmp.", sizeof MT__CKPT_LATEST ".tmp." - 1)) continue;
    struct stat st;
    if (fstatat(dirfd(d), e->d_name, &st, AT_SYMLINK_NOFOLLOW) || !S_ISREG(st.st_mode) ||
        now - st.st_mtime < 60)
      continue;
    if (unlinkat(dirfd(d), e->d_name, 0) && errno != ENOENT)
      mt_log_warn("ckpt: remove %s/%s (a crash's leftover): %s", job_dir, e->d_name,
                  strerror(errno));
    else
      mt_log_info("ckpt: removed %s/%s, a crash's leftover", job_dir, e->d_name);
  }
  closedir(d);
}

/* Runs after each commit; what it keeps is in ckpt.h and proto/ckpt-v1.md. */
int mt_ckpt_prune(const char *job_dir, int keep, int64_t keep_every, int *removed) {
  if (removed) *removed = 0;
  if (keep < 0 || keep_every < 0)
    return mt_seterr(MT_EINVAL, "ckpt: prune %s: keep %d, keep_every %" PRId64 " must be >= 0",
                     job_dir, keep, keep_every);
  if (strlen(job_dir) > MT_CKPT_PATH_MAX - 32)
    return mt_seterr(MT_EINVAL, "ckpt: job directory path too long: %.64s...", job_dir);
  remove_stale_latest_temps(job_dir);
  mt__ckpt_dirent *dirs;
  size_t nd;
  int rc = mt__ckpt_scan(job_dir, &dirs, &nd);
  if (rc) return rc;
  int64_t latest = -1, newest = -1;
  if ((rc = mt__ckpt_read_latest(job_dir, &latest))) {
    if (rc == MT_EIO || rc == MT_ENOMEM) { /* counting without it could take the wrong ones */
      free(dirs);
      return mt_wraperr(rc, "ckpt: prune %s: nothing removed", job_dir);
    }
    latest = -1, rc = 0;
  }
  int latest_committed = 0;
  for (size_t i = 0; i < nd; i++) latest_committed |= dirs[i].committed && dirs[i].step == latest;
  /* the newest: latest's target (a committed directory newer than it is a
   * save whose latest write was lost, or a timeline rolled back from, which
   * is neither counted nor removed), else the newest committed */
  size_t nc = 0;
  for (size_t i = 0; i < nd; i++)
    if (dirs[i].committed && (!latest_committed || dirs[i].step <= latest))
      nc++, newest = dirs[i].step;
  /* dirs ascend: the committed ones at rank >= nc - keep are the newest `keep` */
  size_t rank = 0;
  int failed = 0; /* one directory that cannot go must not keep the rest */
  for (size_t i = 0; i < nd; i++) {
    mt__ckpt_dirent *e = &dirs[i];
    if (e->step >= newest) break; /* the newest and anything written after it */
    int keep_it = e->step == latest;
    if (e->committed) {
      keep_it |= keep == 0 || rank + (size_t)keep >= nc;
      keep_it |= keep_every > 0 && e->step % keep_every == 0;
      rank++;
    }
    if (keep_it) continue;
    char name[32], path[MT_CKPT_PATH_MAX + 32];
    mt__ckpt_step_name(name, e->step);
    snprintf(path, sizeof path, "%s/%s", job_dir, name);
    int r = mt__ckpt_remove_step(path);
    if (r) {
      mt_log_warn("%s", mt_errmsg());
      if (!failed++) rc = r;
      continue;
    }
    mt_log_info("ckpt: pruned %s%s", path, e->committed ? "" : " (uncommitted leftover)");
    if (removed) (*removed)++;
  }
  free(dirs);
  if (failed)
    return mt_seterr(rc,
                     "ckpt: prune %s: %d step director%s could not be removed (logged "
                     "above); the others were",
                     job_dir, failed, failed == 1 ? "y" : "ies");
  return 0;
}
