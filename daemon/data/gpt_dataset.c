/* gpt_dataset.c — GPT sample, document and shuffle indices; blending.
 *
 * After Megatron-LM's GPTDataset and build_sample_idx / build_blending_indices,
 * with the differences gpt_dataset.h states (every epoch's samples are
 * shuffled separately, the one running into the next epoch kept last, Philox
 * instead of numpy). As there, a "document" of the
 * indices is an .idx sequence; the .idx document index is not read.
 *
 * Cache file <basename>.<hash16>.gptidx, little-endian, every array 8-aligned:
 *   0   "MTGPTIDX"
 *   8   u64 version (CACHE_VERSION)          16  u64 description bytes
 *   24  u64 epochs E                          32  u64 sequences per epoch D
 *   40  u64 tokens per epoch T                48  u64 samples n
 *   56  u64 sample position width (4|8)       64  u64 shuffle width (4|8)
 *   72  u64 offset of doc_idx                 80  u64 offset of sample positions
 *   88  u64 offset of sample offsets          96  u64 offset of shuffle
 *   104 u64 body bytes (where the checksum sits)   112..127 zero
 *   128 description JSON, zero-padded to 8
 *   doc_idx    u32[E*D]  absolute sequence ids, epoch after epoch
 *   sample_pos u32|u64[n] position in doc_idx of each sample's first token
 *   sample_off u32[n]    token offset of that token in its sequence
 *   shuffle    u32|u64[n] training order -> sample
 *   u64 XXH3-64 of bytes [0, body bytes)
 * The header is a pure function of the description and the counts, so a
 * loader recomputes it and compares bytes.
 */
#include "gpt_dataset.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include "err.h"
#include "fileio.h"
#include "job.h"
#include "log.h"
#include "philox.h"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the .gptidx cache is written in host order, which must be little-endian"
#endif

/* 3: each epoch's last sample, the one running into the next epoch, is left
 * out of the epoch's shuffle (2: shuffled in, except in the last epoch, which
 * lacks it); 2: doc_idx holds sequence ids and the split is over sequences
 * (1: .idx documents). The version is in the description, so the file name
 * changes too */
enum { CACHE_VERSION = 3, HEADER_BYTES = 128 };
static const char cache_magic[8] = {'M', 'T', 'G', 'P', 'T', 'I', 'D', 'X'};
static const char *const split_names[3] = {"train", "valid", "test"};

struct mt_gpt_dataset {
  mt_indexed data;
  mt_split which;
  int seq;
  uint64_t seq_first, seq_end; /* the split's sequences */
  uint64_t tokens_per_epoch;   /* T */
  uint64_t epochs;             /* E */
  uint64_t n_doc_idx;          /* E * (seq_end - seq_first) */
  uint64_t n_samples;          /* (E*T - 1) / seq */
  int pos_width, shuffle_width;
  const uint32_t *doc_idx;    /* (E*D) */
  const uint8_t *sample_pos;  /* (n) of pos_width bytes */
  const uint32_t *sample_off; /* (n) */
  const uint8_t *shuffle;     /* (n) of shuffle_width bytes */
  uint8_t *image;             /* the whole cache file, mapped or malloc'd */
  size_t image_bytes;
  int image_mapped;
  int cache_status;
  char cache_path[PATH_MAX];
};

/* ---- small helpers ---- */

static uint64_t get_w(const uint8_t *a, int width, uint64_t i) {
  if (width == 4) return ((const uint32_t *)(const void *)a)[i];
  return ((const uint64_t *)(const void *)a)[i];
}

static void put_w(uint8_t *a, int width, uint64_t i, uint64_t v) {
  if (width == 4)
    ((uint32_t *)(void *)a)[i] = (uint32_t)v;
  else
    ((uint64_t *)(void *)a)[i] = v;
}

static uint64_t align8(uint64_t x) { return (x + 7) & ~(uint64_t)7; }

/* Uniform integer in [0, bound) for draw j of stream (key, epoch): Lemire's
 * multiply-shift with rejection, so it is exactly uniform; a rejected draw
 * moves to the next attempt counter. */
static uint64_t philox_below(uint64_t key, uint64_t j, uint64_t epoch, uint64_t bound) {
  for (uint32_t attempt = 0;; attempt++) {
    mt_philox_out o =
        mt_philox4x32((uint32_t)j, (uint32_t)(j >> 32), (uint32_t)epoch, attempt, key);
    uint64_t x = (uint64_t)o.v[0] | (uint64_t)o.v[1] << 32;
    unsigned __int128 m = (unsigned __int128)x * bound;
    uint64_t lo = (uint64_t)m;
    if (lo >= bound || lo >= (0 - bound) % bound) return (uint64_t)(m >> 64);
  }
}

/* Fisher-Yates over a[first, first+m) (elements of `width` bytes), driven by
 * (key, epoch): a pure function of them, whatever else is in a. */
static void shuffle_range(uint8_t *a, int width, uint64_t first, uint64_t m, uint64_t key,
                          uint64_t epoch) {
  for (uint64_t j = m; j-- > 1;) {
    uint64_t r = philox_below(key, j, epoch, j + 1);
    uint64_t x = get_w(a, width, first + j), y = get_w(a, width, first + r);
    put_w(a, width, first + j, y);
    put_w(a, width, first + r, x);
  }
}

/* ---- split ---- */

static int parse_split(const char *split, double r[3]) {
  r[0] = 1, r[1] = r[2] = 0;
  if (!split || !*split) return 0;
  int rc = mt_job_split_weights(split, r); /* one grammar: the job's check's */
  if (rc) return rc;
  double sum = 0;
  for (int i = 0; i < 3; i++) sum += r[i];
  if (!(sum > 0)) return mt_seterr(MT_EINVAL, "data: split \"%s\" sums to 0", split);
  for (int i = 0; i < 3; i++) r[i] /= sum;
  return 0;
}

int mt_gpt_split_seqs(const char *split, uint64_t n_seqs, mt_split which, uint64_t *first,
                      uint64_t *end) {
  if ((unsigned)which > MT_SPLIT_TEST) return mt_seterr(MT_EINVAL, "data: split %d", (int)which);
  double r[3];
  int rc = parse_split(split, r);
  if (rc) return rc;
  /* Megatron: cumulative round(r_i * size) (Python's round: half to even, as
   * nearbyint in the default rounding mode), then every boundary shifted so
   * the last is size. Clamped to [0, size] for the degenerate cases where the
   * shift would go below 0. */
  int64_t b[4] = {0, 0, 0, 0};
  for (int i = 0; i < 3; i++) b[i + 1] = b[i] + (int64_t)nearbyint(r[i] * (double)n_seqs);
  int64_t diff = b[3] - (int64_t)n_seqs;
  for (int i = 1; i < 4; i++) {
    b[i] -= diff;
    if (b[i] < 0) b[i] = 0;
    if (b[i] > (int64_t)n_seqs) b[i] = (int64_t)n_seqs;
  }
  *first = (uint64_t)b[which];
  *end = (uint64_t)b[which + 1];
  if (*end < *first) *end = *first;
  return 0;
}

/* ---- description and cache name ---- */

/* Which file this is, as far as the cache can tell: size and mtime say it
 * changed, the inode tells apart two files with the same basename, size and
 * mtime in other directories that share a cache_dir. Not the device: an NFS
 * client numbers its mounts its own way, and every node would build its own
 * index of one shared file. */
static int file_identity(const char *prefix, const char *ext, char *out, size_t cap) {
  char path[PATH_MAX];
  snprintf(path, sizeof path, "%s%s", prefix, ext);
  struct stat st;
  if (stat(path, &st)) return mt_seterr(MT_EIO, "data: stat %s: %s", path, strerror(errno));
  snprintf(out, cap, "{\"bytes\":%lld,\"mtime_ns\":%lld,\"ino\":%llu}", (long long)st.st_size,
           (long long)st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec,
           (unsigned long long)st.st_ino);
  return 0;
}

/* Everything the indices depend on, as one canonical JSON line. n_samples
 * enters through the epoch count alone: the indices are a function of E. */
static int describe(const mt_gpt_dataset *d, const mt_gpt_dataset_spec *spec, char *out,
                    size_t cap) {
  char idx[192], bin[192];
  int rc = file_identity(spec->prefix, ".idx", idx, sizeof idx);
  if (!rc) rc = file_identity(spec->prefix, ".bin", bin, sizeof bin);
  if (rc) return rc;
  double r[3];
  parse_split(spec->split, r); /* already checked */
  int n = snprintf(out, cap,
                   "{\"format\":%d,\"kind\":\"gpt\",\"idx\":%s,\"bin\":%s,"
                   "\"split\":[%.17g,%.17g,%.17g],\"which\":\"%s\",\"seqs\":[%" PRIu64 ",%" PRIu64
                   "],\"seq\":%d,\"epochs\":%" PRIu64 ",\"seed\":%" PRIu64 ",\"shuffle\":%s}",
                   CACHE_VERSION, idx, bin, r[0], r[1], r[2], split_names[d->which], d->seq_first,
                   d->seq_end, d->seq, d->epochs, spec->seed, spec->shuffle ? "true" : "false");
  if (n < 0 || (size_t)n >= cap) return mt_seterr(MT_EINVAL, "data: description too long");
  return 0;
}

static int cache_path(const mt_gpt_dataset_spec *spec, const char *desc, char *out, size_t cap) {
  const char *base = strrchr(spec->prefix, '/');
  base = base ? base + 1 : spec->prefix;
  char dir[PATH_MAX];
  if (spec->cache_dir && *spec->cache_dir) {
    snprintf(dir, sizeof dir, "%s", spec->cache_dir);
  } else {
    size_t dl = (size_t)(base - spec->prefix);
    if (dl == 0)
      snprintf(dir, sizeof dir, ".");
    else
      snprintf(dir, sizeof dir, "%.*s", (int)(dl - 1 ? dl - 1 : 1), spec->prefix);
  }
  unsigned long long h = (unsigned long long)XXH3_64bits(desc, strlen(desc));
  int n = snprintf(out, cap, "%s/%s.%016llx.gptidx", dir, base, h);
  if (n < 0 || (size_t)n >= cap) return mt_seterr(MT_EINVAL, "data: cache path too long");
  return 0;
}

/* ---- cache image ---- */

typedef struct layout {
  uint64_t doc_idx_off, pos_off, off_off, shuffle_off, body_bytes;
} layout;

static layout layout_of(const mt_gpt_dataset *d, size_t desc_bytes) {
  layout l;
  l.doc_idx_off = align8(HEADER_BYTES + desc_bytes);
  l.pos_off = align8(l.doc_idx_off + 4 * d->n_doc_idx);
  l.off_off = align8(l.pos_off + (uint64_t)d->pos_width * d->n_samples);
  l.shuffle_off = align8(l.off_off + 4 * d->n_samples);
  l.body_bytes = align8(l.shuffle_off + (uint64_t)d->shuffle_width * d->n_samples);
  return l;
}

static void make_header(const mt_gpt_dataset *d, size_t desc_bytes, uint8_t *h) {
  layout l = layout_of(d, desc_bytes);
  uint64_t f[13] = {CACHE_VERSION,
                    desc_bytes,
                    d->epochs,
                    d->seq_end - d->seq_first,
                    d->tokens_per_epoch,
                    d->n_samples,
                    (uint64_t)d->pos_width,
                    (uint64_t)d->shuffle_width,
                    l.doc_idx_off,
                    l.pos_off,
                    l.off_off,
                    l.shuffle_off,
                    l.body_bytes};
  memset(h, 0, HEADER_BYTES);
  memcpy(h, cache_magic, 8);
  memcpy(h + 8, f, sizeof f);
}

/* Points d's arrays into image after checking it is the cache of desc.
 * Returns 0, or MT_ECORRUPT with a message saying what is wrong. */
static int attach_image(mt_gpt_dataset *d, const uint8_t *img, size_t bytes, const char *desc) {
  size_t dl = strlen(desc);
  layout l = layout_of(d, dl);
  uint8_t want[HEADER_BYTES];
  make_header(d, dl, want);
  if (bytes < HEADER_BYTES || memcmp(img, cache_magic, 8))
    return mt_seterr(MT_ECORRUPT, "not a .gptidx file");
  uint64_t ver;
  memcpy(&ver, img + 8, 8);
  if (ver != CACHE_VERSION)
    return mt_seterr(MT_ECORRUPT, "format version %" PRIu64 ", want %d", ver, CACHE_VERSION);
  uint64_t have_dl;
  memcpy(&have_dl, img + 16, 8);
  if (have_dl != dl || bytes < HEADER_BYTES + dl || memcmp(img + HEADER_BYTES, desc, dl))
    return mt_seterr(MT_ECORRUPT, "description changed");
  if (memcmp(img, want, HEADER_BYTES)) return mt_seterr(MT_ECORRUPT, "header fields differ");
  if (bytes != l.body_bytes + 8)
    return mt_seterr(MT_ECORRUPT, "%zu bytes, want %" PRIu64, bytes, l.body_bytes + 8);
  uint64_t sum;
  memcpy(&sum, img + l.body_bytes, 8);
  if (sum != (uint64_t)XXH3_64bits(img, l.body_bytes))
    return mt_seterr(MT_ECORRUPT, "checksum mismatch");
  d->doc_idx = (const uint32_t *)(const void *)(img + l.doc_idx_off);
  d->sample_pos = img + l.pos_off;
  d->sample_off = (const uint32_t *)(const void *)(img + l.off_off);
  d->shuffle = img + l.shuffle_off;
  return 0;
}

/* Builds the complete cache image in memory. */
static int build_image(const mt_gpt_dataset *d, const char *desc, uint64_t seed, int shuffle,
                       uint8_t **out, size_t *out_bytes) {
  size_t dl = strlen(desc);
  layout l = layout_of(d, dl);
  if (l.body_bytes + 8 > SIZE_MAX) return mt_seterr(MT_ENOMEM, "data: index too large");
  size_t bytes = (size_t)l.body_bytes + 8;
  uint8_t *img = calloc(1, bytes);
  if (!img)
    return mt_seterr(MT_ENOMEM, "data: %s: %zu bytes for the sample index", d->data.prefix, bytes);
  make_header(d, dl, img);
  memcpy(img + HEADER_BYTES, desc, dl);

  /* document index: each epoch the split's sequences, shuffled by (seed, e) */
  uint64_t nd = d->seq_end - d->seq_first;
  char name[64];
  snprintf(name, sizeof name, "gpt_dataset.doc_idx.%s", split_names[d->which]);
  uint64_t doc_key = mt_philox_key(seed, name);
  uint8_t *doc_idx = img + l.doc_idx_off;
  for (uint64_t e = 0; e < d->epochs; e++) {
    for (uint64_t j = 0; j < nd; j++) put_w(doc_idx, 4, e * nd + j, d->seq_first + j);
    if (shuffle) shuffle_range(doc_idx, 4, e * nd, nd, doc_key, e);
  }

  /* sample index: the start of every seq-th token of the stream */
  const uint32_t *di = (const uint32_t *)(const void *)doc_idx;
  uint8_t *pos_a = img + l.pos_off;
  uint32_t *off_a = (uint32_t *)(void *)(img + l.off_off);
  uint64_t pos = 0, off = 0, len = 0;
  int rc = 0;
#define ENTER_DOC()                                                                                \
  do {                                                                                             \
    if (pos >= d->n_doc_idx) {                                                                     \
      rc = mt_seterr(MT_EINVAL, "data: %s: token stream ended early (internal error)",             \
                     d->data.prefix);                                                              \
      goto fail;                                                                                   \
    }                                                                                              \
    len = mt_indexed_seq_len(&d->data, di[pos]);                                                   \
  } while (0)
  ENTER_DOC();
  for (uint64_t k = 0; k < d->n_samples; k++) {
    while (off == len) { /* empty sequences, or the end of the last */
      pos++, off = 0;
      ENTER_DOC();
    }
    put_w(pos_a, d->pos_width, k, pos);
    off_a[k] = (uint32_t)off;
    for (uint64_t rem = (uint64_t)d->seq; rem;) {
      uint64_t avail = len - off;
      if (rem < avail) {
        off += rem;
        rem = 0;
      } else if (k + 1 < d->n_samples) {
        rem -= avail;
        pos++, off = 0;
        ENTER_DOC();
      } else {
        break; /* last sample: nothing after it to locate */
      }
    }
  }
#undef ENTER_DOC

  /* shuffle index: identity, then each epoch's samples permuted by (seed, e) */
  uint8_t *sh = img + l.shuffle_off;
  for (uint64_t k = 0; k < d->n_samples; k++) put_w(sh, d->shuffle_width, k, k);
  if (shuffle) {
    snprintf(name, sizeof name, "gpt_dataset.shuffle_idx.%s", split_names[d->which]);
    uint64_t sh_key = mt_philox_key(seed, name);
    uint64_t T = d->tokens_per_epoch, S = (uint64_t)d->seq;
    for (uint64_t e = 0; e < d->epochs; e++) {
      /* Samples whose first token k*S lies in [e*T, (e+1)*T) are
       * [b0, b1 + 1); the last of them, b1, runs into epoch e+1 and stays
       * in place after the others. It exists only once epoch e+1 does
       * (for the last epoch b1 == n_samples), so shuffling it in would
       * re-permute that epoch when the data is sized for more samples. */
      uint64_t b0 = (e * T + S - 1) / S, b1 = ((e + 1) * T + S - 1) / S - 1;
      if (b0 < b1) shuffle_range(sh, d->shuffle_width, b0, b1 - b0, sh_key, e);
    }
  }

  memcpy(img + l.body_bytes, &(uint64_t){XXH3_64bits(img, l.body_bytes)}, 8);
  *out = img;
  *out_bytes = bytes;
  return 0;
fail:
  free(img);
  return rc;
}

/* Maps path and attaches it. Returns 0; MT_ENOENT if absent; another code
 * with the reason when the file is there but unusable. */
static int load_cache(mt_gpt_dataset *d, const char *path, const char *desc) {
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int e = errno;
    return mt_seterr(e == ENOENT || e == ENOTDIR ? MT_ENOENT : MT_EIO, "open: %s", strerror(e));
  }
  struct stat st;
  if (fstat(fd, &st)) {
    int e = errno;
    close(fd);
    return mt_seterr(MT_EIO, "stat: %s", strerror(e));
  }
  if (st.st_size < HEADER_BYTES) {
    close(fd);
    return mt_seterr(MT_ECORRUPT, "%lld bytes, shorter than the header", (long long)st.st_size);
  }
  void *map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED, fd, 0);
  close(fd);
  if (map == MAP_FAILED) return mt_seterr(MT_EIO, "mmap: %s", strerror(errno));
  int rc = attach_image(d, map, (size_t)st.st_size, desc);
  if (rc) {
    munmap(map, (size_t)st.st_size);
    return rc;
  }
  d->image = map;
  d->image_bytes = (size_t)st.st_size;
  d->image_mapped = 1;
  return 0;
}

/* One load-or-build at a time in this process, so two threads opening the
 * same dataset do not race on one temp file. */
static pthread_mutex_t cache_lock = PTHREAD_MUTEX_INITIALIZER;

/* A failure is only said: writing the index there fails next, and says why. */
static void make_cache_dir(const char *dir) {
  if (mkdir(dir, 0755) && errno != EEXIST)
    mt_log_warn("data: create cache directory %s: %s", dir, strerror(errno));
}

static int load_or_build(mt_gpt_dataset *d, const mt_gpt_dataset_spec *spec, const char *desc) {
  const char *path = d->cache_path;
  if (spec->cache_dir && *spec->cache_dir) make_cache_dir(spec->cache_dir);
  int rc = load_cache(d, path, desc);
  if (!rc) {
    d->cache_status = MT_GPT_CACHE_LOADED;
    return 0;
  }
  /* the fallback directory holds the index when the first choice could not */
  char alt[PATH_MAX] = "";
  if (spec->cache_fallback && *spec->cache_fallback) {
    mt_gpt_dataset_spec in_alt = *spec;
    in_alt.cache_dir = spec->cache_fallback;
    if (cache_path(&in_alt, desc, alt, sizeof alt)) alt[0] = '\0';
    if (alt[0] && !load_cache(d, alt, desc)) {
      snprintf(d->cache_path, sizeof d->cache_path, "%s", alt);
      d->cache_status = MT_GPT_CACHE_LOADED;
      return 0;
    }
  }
  if (rc == MT_ENOENT) {
    d->cache_status = MT_GPT_CACHE_BUILT;
  } else {
    mt_log_warn("data: index cache %s is unusable (%s); rebuilding it", path, mt_errmsg());
    d->cache_status = MT_GPT_CACHE_REBUILT;
  }
  uint8_t *img = NULL;
  size_t bytes = 0;
  rc = build_image(d, desc, spec->seed, spec->shuffle, &img, &bytes);
  if (rc) return rc;
  rc = mt_atomic_write_file(path, img, bytes);
  if (!rc) rc = load_cache(d, path, desc);
  if (rc && alt[0]) {
    mt_log_info("data: cannot cache the %s index of %s at %s (%s); caching it in %s",
                split_names[d->which], spec->prefix, path, mt_errmsg(), alt);
    make_cache_dir(spec->cache_fallback);
    rc = mt_atomic_write_file(alt, img, bytes);
    if (!rc) rc = load_cache(d, alt, desc);
    if (!rc) snprintf(d->cache_path, sizeof d->cache_path, "%s", alt);
  }
  if (!rc) {
    free(img);
    return 0;
  }
  mt_log_warn("data: cannot cache the %s index of %s (%s); keeping it in memory",
              split_names[d->which], spec->prefix, mt_errmsg());
  d->cache_status = MT_GPT_CACHE_MEMORY;
  rc = attach_image(d, img, bytes, desc);
  if (rc) { /* cannot happen: the image was just built */
    free(img);
    return mt_wraperr(rc, "data: %s: built index", spec->prefix);
  }
  d->image = img;
  d->image_bytes = bytes;
  d->image_mapped = 0;
  return 0;
}

/* ---- dataset ---- */

int mt_gpt_dataset_open(mt_gpt_dataset **out, const mt_gpt_dataset_spec *spec) {
  *out = NULL;
  if (!spec || !spec->prefix || !*spec->prefix)
    return mt_seterr(MT_EINVAL, "data: GPT dataset without a prefix");
  if (spec->seq < 1) return mt_seterr(MT_EINVAL, "data: %s: seq %d", spec->prefix, spec->seq);
  if ((unsigned)spec->which > MT_SPLIT_TEST)
    return mt_seterr(MT_EINVAL, "data: %s: split %d", spec->prefix, (int)spec->which);
  mt_gpt_dataset *d = calloc(1, sizeof *d);
  if (!d) return mt_seterr(MT_ENOMEM, "data: out of memory");
  d->which = spec->which;
  d->seq = spec->seq;
  int rc = mt_indexed_open(&d->data, spec->prefix);
  if (rc) {
    free(d);
    return rc;
  }
  const char *sp = spec->split && *spec->split ? spec->split : "1,0,0";
  /* Megatron splits and shuffles sequences (sizes), not the .idx documents */
  rc = mt_gpt_split_seqs(spec->split, d->data.n_seqs, spec->which, &d->seq_first, &d->seq_end);
  if (rc) goto fail;
  if (d->data.n_seqs > UINT32_MAX) {
    rc = mt_seterr(MT_EINVAL, "data: %s has %" PRIu64 " sequences (at most 2^32-1)", spec->prefix,
                   d->data.n_seqs);
    goto fail;
  }
  if (d->seq_end == d->seq_first) {
    rc = mt_seterr(MT_EINVAL, "data: %s: split \"%s\" gives %s no sequences (of %" PRIu64 ")",
                   spec->prefix, sp, split_names[spec->which], d->data.n_seqs);
    goto fail;
  }
  for (uint64_t s = d->seq_first; s < d->seq_end; s++)
    d->tokens_per_epoch += mt_indexed_seq_len(&d->data, s);
  uint64_t T = d->tokens_per_epoch, S = (uint64_t)spec->seq, need, nd = d->seq_end - d->seq_first;
  if (T == 0) {
    rc = mt_seterr(MT_EINVAL,
                   "data: %s: the %s split (sequences %" PRIu64 "..%" PRIu64 ") has no tokens",
                   spec->prefix, split_names[spec->which], d->seq_first, d->seq_end);
    goto fail;
  }
  /* smallest E with (E*T - 1) / S >= n_samples, i.e. E*T >= n_samples*S + 1 */
  if (__builtin_mul_overflow(spec->n_samples, S, &need) || need == UINT64_MAX) goto too_big;
  d->epochs = (need + 1 + T - 1) / T;
  uint64_t ET;
  if (d->epochs > INT_MAX || __builtin_mul_overflow(d->epochs, T, &ET) ||
      __builtin_mul_overflow(d->epochs, nd, &d->n_doc_idx))
    goto too_big;
  d->n_samples = (ET - 1) / S;
  d->pos_width = d->n_doc_idx <= UINT32_MAX ? 4 : 8;
  d->shuffle_width = d->n_samples <= UINT32_MAX ? 4 : 8;

  char desc[1024];
  rc = describe(d, spec, desc, sizeof desc);
  if (!rc) rc = cache_path(spec, desc, d->cache_path, sizeof d->cache_path);
  if (rc) goto fail;
  pthread_mutex_lock(&cache_lock);
  rc = load_or_build(d, spec, desc);
  pthread_mutex_unlock(&cache_lock);
  if (rc) goto fail;
  *out = d;
  return 0;
too_big:
  rc = mt_seterr(MT_EINVAL,
                 "data: %s: %" PRIu64 " samples of %d tokens need too many epochs of the %s "
                 "split (%" PRIu64 " tokens)",
                 spec->prefix, spec->n_samples, spec->seq, split_names[spec->which], T);
fail:
  mt_indexed_close(&d->data);
  free(d);
  return rc;
}

void mt_gpt_dataset_free(mt_gpt_dataset *d) {
  if (!d) return;
  if (d->image_mapped)
    munmap(d->image, d->image_bytes);
  else
    free(d->image);
  mt_indexed_close(&d->data);
  free(d);
}

uint64_t mt_gpt_dataset_len(const mt_gpt_dataset *d) { return d->n_samples; }
int mt_gpt_dataset_epochs(const mt_gpt_dataset *d) { return (int)d->epochs; }
uint64_t mt_gpt_dataset_tokens_per_epoch(const mt_gpt_dataset *d) { return d->tokens_per_epoch; }
int mt_gpt_dataset_cache_status(const mt_gpt_dataset *d) { return d->cache_status; }
const char *mt_gpt_dataset_cache_path(const mt_gpt_dataset *d) { return d->cache_path; }

/* Reads up to *need tokens of sequence seq from token offset off on. */
static int read_seq(const mt_gpt_dataset *d, uint64_t seq, uint64_t off, uint64_t *need,
                    int32_t **out) {
  uint64_t len = mt_indexed_seq_len(&d->data, seq);
  if (off > len)
    return mt_seterr(MT_ECORRUPT, "data: %s: index cache %s points past sequence %" PRIu64,
                     d->data.prefix, d->cache_path, seq);
  uint64_t take = len - off < *need ? len - off : *need;
  int rc = take ? mt_indexed_read(&d->data, seq, off, take, *out) : 0;
  if (rc) return rc;
  *out += take;
  *need -= take;
  return 0;
}

int mt_gpt_dataset_sample(const mt_gpt_dataset *d, uint64_t i, int32_t *tokens) {
  if (i >= d->n_samples)
    return mt_seterr(MT_EINVAL, "data: %s: sample %" PRIu64 " of %" PRIu64, d->data.prefix, i,
                     d->n_samples);
  uint64_t k = get_w(d->shuffle, d->shuffle_width, i);
  if (k >= d->n_samples) goto corrupt;
  uint64_t pos = get_w(d->sample_pos, d->pos_width, k), off = d->sample_off[k];
  uint64_t need = (uint64_t)d->seq + 1;
  for (int32_t *out = tokens; need; pos++, off = 0) {
    if (pos >= d->n_doc_idx) goto corrupt;
    uint64_t seq = d->doc_idx[pos];
    if (seq < d->seq_first || seq >= d->seq_end) goto corrupt;
    int rc = read_seq(d, seq, off, &need, &out);
    if (rc) return rc;
  }
  return 0;
corrupt:
  return mt_seterr(MT_ECORRUPT, "data: %s: index cache %s is inconsistent at sample %" PRIu64,
                   d->data.prefix, d->cache_path, i);
}

/* ---- blending ---- */

/* Weights as fixed-point fractions of 2^40 summing to exactly 2^40, so the
 * greedy choice is integer arithmetic: the same on every host and build
 * (no FMA contraction or x87 rounding can change a tie). */
enum { BLEND_ONE_SHIFT = 40, BLEND_CHUNK = 1024 };

static int blend_weights(const double *w, int n, uint64_t *W) {
  if (n < 1 || n > 65535) return mt_seterr(MT_EINVAL, "blend: %d datasets (1..65535)", n);
  double sum = 0;
  for (int k = 0; k < n; k++) {
    if (!isfinite(w[k]) || w[k] < 0)
      return mt_seterr(MT_EINVAL, "blend: weight %d is %g; want a finite number >= 0", k, w[k]);
    sum += w[k];
  }
  if (!(sum > 0) || !isfinite(sum)) return mt_seterr(MT_EINVAL, "blend: weights sum to %g", sum);
  uint64_t one = (uint64_t)1 << BLEND_ONE_SHIFT, total = 0;
  int big = 0;
  for (int k = 0; k < n; k++) {
    W[k] = (uint64_t)floor(w[k] / sum * (double)one);
    if (W[k] > one) W[k] = one;
    total += W[k];
    if (w[k] > w[big]) big = k;
  }
  W[big] += one - total; /* the few units floor lost */
  return 0;
}

/* The greedy choice for sample i is argmax_k W_k*(i+1) - c_k*2^40 (the
 * dataset whose count lags its weight most once this sample is taken), ties to
 * the lowest k. err holds exactly that quantity for the next sample, updated
 * in place: it starts at W and moves by +W_k per sample, -2^40 per pick. It
 * stays within a few samples' worth of 2^40, far inside int64. */
static void blend_start(const uint64_t *W, int n, int64_t *err) {
  for (int k = 0; k < n; k++) err[k] = (int64_t)W[k];
}

static int blend_next(const uint64_t *W, int n, int64_t *err) {
  int best = 0;
  for (int k = 1; k < n; k++)
    if (err[k] > err[best]) best = k;
  err[best] -= (int64_t)1 << BLEND_ONE_SHIFT;
  for (int k = 0; k < n; k++) err[k] += (int64_t)W[k];
  return best;
}

int mt_blend_counts(const double *weights, int n, uint64_t n_samples, uint64_t *counts) {
  if (n < 1 || n > 65535) return mt_seterr(MT_EINVAL, "blend: %d datasets (1..65535)", n);
  uint64_t *W = malloc(sizeof *W * (size_t)n);
  int64_t *err = malloc(sizeof *err * (size_t)n);
  int rc = W && err ? blend_weights(weights, n, W) : mt_seterr(MT_ENOMEM, "blend: out of memory");
  if (!rc) {
    memset(counts, 0, sizeof *counts * (size_t)n);
    blend_start(W, n, err);
    for (uint64_t i = 0; i < n_samples; i++) counts[blend_next(W, n, err)]++;
  }
  free(W);
  free(err);
  return rc;
}

struct mt_blend {
  int n;
  uint64_t n_samples;
  mt_gpt_dataset **sets; /* (n), not owned */
  uint16_t *ds;          /* (n_samples) dataset of each global sample */
  uint64_t *counts_at;   /* (n_samples / CHUNK + 1, n) consumed before sample c*CHUNK */
};

void mt_blend_free(mt_blend *b) {
  if (!b) return;
  free(b->sets);
  free(b->ds);
  free(b->counts_at);
  free(b);
}

int mt_blend_open(mt_blend **out, mt_gpt_dataset **sets, const double *weights, int n,
                  uint64_t n_samples) {
  *out = NULL;
  if (n < 1 || n > 65535) return mt_seterr(MT_EINVAL, "blend: %d datasets (1..65535)", n);
  mt_blend *b = calloc(1, sizeof *b);
  uint64_t *w = calloc((size_t)n, sizeof *w), *c = calloc((size_t)n, sizeof *c);
  int64_t *err = calloc((size_t)n, sizeof *err);
  uint64_t n_chunks = n_samples / BLEND_CHUNK + 1;
  int rc = 0;
  if (!b || !w || !c || !err) goto oom;
  b->n = n;
  b->n_samples = n_samples;
  b->sets = calloc((size_t)n, sizeof *b->sets);
  b->ds = malloc(n_samples ? n_samples * sizeof *b->ds : 1);
  b->counts_at = calloc(n_chunks * (uint64_t)n, sizeof *b->counts_at);
  if (!b->sets || !b->ds || !b->counts_at) goto oom;
  rc = blend_weights(weights, n, w);
  if (rc) goto fail;
  blend_start(w, n, err);
  for (uint64_t i = 0; i < n_samples; i++) {
    if (i % BLEND_CHUNK == 0) memcpy(b->counts_at + (i / BLEND_CHUNK) * n, c, n * sizeof *c);
    int k = blend_next(w, n, err);
    b->ds[i] = (uint16_t)k;
    c[k]++;
  }
  if (n_samples % BLEND_CHUNK == 0)
    memcpy(b->counts_at + (n_samples / BLEND_CHUNK) * n, c, n * sizeof *c);
  for (int k = 0; k < n; k++) {
    b->sets[k] = sets[k];
    if (c[k] && !sets[k]) {
      rc = mt_seterr(MT_EINVAL,
                     "blend: dataset %d is missing; the blend needs %" PRIu64 " samples of it", k,
                     c[k]);
      goto fail;
    }
    if (c[k] && mt_gpt_dataset_len(sets[k]) < c[k]) {
      rc = mt_seterr(MT_EINVAL,
                     "blend: dataset %d (%s) has %" PRIu64 " samples; the blend needs %" PRIu64
                     " (size it with mt_blend_counts)",
                     k, sets[k]->data.prefix, mt_gpt_dataset_len(sets[k]), c[k]);
      goto fail;
    }
  }
  free(w);
  free(c);
  free(err);
  *out = b;
  return 0;
oom:
  rc = mt_seterr(MT_ENOMEM, "blend: out of memory for %" PRIu64 " samples", n_samples);
fail:
  free(w);
  free(c);
  free(err);
  mt_blend_free(b);
  return rc;
}

uint64_t mt_blend_consumed(const mt_blend *b, int k, uint64_t i) {
  if (k < 0 || k >= b->n) return 0;
  if (i > b->n_samples) i = b->n_samples;
  uint64_t c0 = i / BLEND_CHUNK * BLEND_CHUNK;
  uint64_t n = b->counts_at[(i / BLEND_CHUNK) * b->n + k];
  for (uint64_t j = c0; j < i; j++) n += b->ds[j] == k;
  return n;
}

int mt_blend_sample(const mt_blend *b, uint64_t i, int32_t *tokens, int *dataset) {
  if (i >= b->n_samples)
    return mt_seterr(MT_EINVAL, "blend: sample %" PRIu64 " of %" PRIu64, i, b->n_samples);
  int k = b->ds[i];
  if (dataset) *dataset = k;
  int rc = mt_gpt_dataset_sample(b->sets[k], mt_blend_consumed(b, k, i), tokens);
  return rc ? mt_wraperr(rc, "blend: global sample %" PRIu64, i) : 0;
}
