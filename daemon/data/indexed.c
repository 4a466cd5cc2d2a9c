/* indexed.c — Megatron's mmap indexed dataset (.bin/.idx): reader and writer.
 *
 * The reader maps both files and checks every field before anything is read
 * from them, so later accessors only bounds-check their arguments. The arrays
 * sit at unaligned offsets in the .idx (the header is 34 bytes), so every
 * element is read with memcpy. The writer streams tokens to a temp .bin, keeps
 * sizes and document boundaries in memory, and on finish writes the .idx the
 * way Megatron's builder does (pointers contiguous from 0), then makes both
 * durable: fsync, rename, fsync the directory.
 */
#include "indexed.h"
#include "fileio.h"

#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "err.h"

static const uint8_t idx_magic[9] = {'M', 'M', 'I', 'D', 'I', 'D', 'X', 0, 0};
enum { IDX_HEADER_BYTES = 9 + 8 + 1 + 8 + 8 };

/* Element size of a dtype code; 0 if the code is unknown. */
static size_t dtype_bytes(int dtype) {
  switch (dtype) {
  case MT_IDX_U8:
  case MT_IDX_I8: return 1;
  case MT_IDX_I16:
  case MT_IDX_U16: return 2;
  case MT_IDX_I32:
  case MT_IDX_F32: return 4;
  case MT_IDX_I64:
  case MT_IDX_F64: return 8;
  default: return 0;
  }
}

static uint64_t ld_u64(const uint8_t *p) {
  uint64_t v;
  memcpy(&v, p, 8); /* the format is little-endian; so is every host we build for */
  return v;
}

static int64_t ld_i64(const uint8_t *p) {
  int64_t v;
  memcpy(&v, p, 8);
  return v;
}

static int32_t ld_i32(const uint8_t *p) {
  int32_t v;
  memcpy(&v, p, 4);
  return v;
}

static int32_t idx_size(const mt_indexed *d, uint64_t i) {
  return ld_i32(d->idx_map + d->sizes_off + 4 * i);
}
static int64_t idx_pointer(const mt_indexed *d, uint64_t i) {
  return ld_i64(d->idx_map + d->pointers_off + 8 * i);
}
static int64_t idx_doc(const mt_indexed *d, uint64_t i) {
  return ld_i64(d->idx_map + d->doc_idx_off + 8 * i);
}

/* Maps path read-only; an empty file gives map NULL, bytes 0. */
static int map_file(const char *path, const uint8_t **map, size_t *bytes) {
  *map = NULL;
  *bytes = 0;
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int e = errno;
    return mt_seterr(e == ENOENT ? MT_ENOENT : MT_EIO, "data: open %s: %s", path, strerror(e));
  }
  struct stat st;
  if (fstat(fd, &st)) {
    int e = errno;
    close(fd);
    return mt_seterr(MT_EIO, "data: stat %s: %s", path, strerror(e));
  }
  if (!S_ISREG(st.st_mode)) {
    close(fd);
    return mt_seterr(MT_EINVAL, "data: %s is not a regular file", path);
  }
  if (st.st_size == 0) {
    close(fd);
    return 0;
  }
  void *m = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED, fd, 0);
  int e = errno;
  close(fd);
  if (m == MAP_FAILED) return mt_seterr(MT_EIO, "data: mmap %s: %s", path, strerror(e));
  *map = m;
  *bytes = (size_t)st.st_size;
  return 0;
}

/* Header and array sizes: the .idx must be exactly header + 4N + 8N + 8(D+1). */
static int check_header(mt_indexed *d, const char *path, uint64_t *n_doc_idx) {
  if (d->idx_bytes < IDX_HEADER_BYTES)
    return mt_seterr(MT_ECORRUPT, "data: %s: %zu bytes, shorter than the %d-byte header", path,
                     d->idx_bytes, IDX_HEADER_BYTES);
  const uint8_t *p = d->idx_map;
  if (memcmp(p, idx_magic, sizeof idx_magic))
    return mt_seterr(MT_ECORRUPT,
                     "data: %s: magic is not \"MMIDIDX\\0\\0\" (not a Megatron mmap index)", path);
  uint64_t version = ld_u64(p + 9);
  if (version != 1)
    return mt_seterr(MT_ECORRUPT, "data: %s: version %llu (only version 1 is known)", path,
                     (unsigned long long)version);
  d->dtype = p[17];
  d->elem_bytes = dtype_bytes(d->dtype);
  if (!d->elem_bytes)
    return mt_seterr(MT_ECORRUPT, "data: %s: dtype code %d is not one of 1..8", path, d->dtype);
  uint64_t n = ld_u64(p + 18), nd = ld_u64(p + 26);
  if (nd == 0)
    return mt_seterr(MT_ECORRUPT,
                     "data: %s: document index length is 0 (it holds at least the leading 0)",
                     path);
  /* Sizes bounded by the file size before multiplying, so nothing overflows. */
  uint64_t room = d->idx_bytes - IDX_HEADER_BYTES;
  uint64_t want = 0;
  int fits = n <= room / 12 && nd <= room / 8;
  if (fits) want = IDX_HEADER_BYTES + 12 * n + 8 * nd;
  if (!fits || want != d->idx_bytes) {
    if (fits && d->idx_bytes == want + n && n > 0)
      return mt_seterr(MT_ENOTSUP,
                       "data: %s: %zu bytes: N = %llu sequences and %llu document boundaries "
                       "need %llu, plus N bytes of sequence modes (a multimodal index, which "
                       "GPT training does not read)",
                       path, d->idx_bytes, (unsigned long long)n, (unsigned long long)nd,
                       (unsigned long long)want);
    if (fits)
      return mt_seterr(MT_ECORRUPT,
                       "data: %s: %zu bytes, but N = %llu sequences and %llu document boundaries "
                       "need exactly %llu",
                       path, d->idx_bytes, (unsigned long long)n, (unsigned long long)nd,
                       (unsigned long long)want);
    return mt_seterr(MT_ECORRUPT,
                     "data: %s: %zu bytes, too short for N = %llu sequences and %llu document "
                     "boundaries",
                     path, d->idx_bytes, (unsigned long long)n, (unsigned long long)nd);
  }
  d->n_seqs = n;
  d->n_docs = nd - 1;
  d->sizes_off = IDX_HEADER_BYTES;
  d->pointers_off = d->sizes_off + 4 * n;
  d->doc_idx_off = d->pointers_off + 8 * n;
  d->sizes = (const int32_t *)(const void *)(d->idx_map + d->sizes_off);
  *n_doc_idx = nd;
  return 0;
}

/* Sizes non-negative, pointers contiguous from 0, the last sequence ending
 * exactly at the end of the .bin (Megatron writes them so and reads no other way). */
static int check_sequences(mt_indexed *d, const char *idx_path, const char *bin_path) {
  uint64_t end = 0, tokens = 0;
  for (uint64_t i = 0; i < d->n_seqs; i++) {
    int32_t s = idx_size(d, i);
    int64_t p = idx_pointer(d, i);
    if (s < 0)
      return mt_seterr(MT_ECORRUPT, "data: %s: sizes[%llu] = %d is negative", idx_path,
                       (unsigned long long)i, s);
    if (p < 0 || (uint64_t)p != end) {
      if (i == 0)
        return mt_seterr(MT_ECORRUPT,
                         "data: %s: pointers[0] = %lld but the first sequence starts at 0",
                         idx_path, (long long)p);
      return mt_seterr(MT_ECORRUPT,
                       "data: %s: pointers[%llu] = %lld but sequence %llu ends at %llu", idx_path,
                       (unsigned long long)i, (long long)p, (unsigned long long)(i - 1),
                       (unsigned long long)end);
    }
    end += (uint64_t)s * d->elem_bytes;
    tokens += (uint64_t)s;
    if (end > d->bin_bytes)
      return mt_seterr(MT_ECORRUPT,
                       "data: %s: %zu bytes, but sequence %llu (sizes[%llu] = %d at pointers[%llu] "
                       "= %lld in %s) ends at %llu",
                       bin_path, d->bin_bytes, (unsigned long long)i, (unsigned long long)i, s,
                       (unsigned long long)i, (long long)p, idx_path, (unsigned long long)end);
  }
  if (end != d->bin_bytes) {
    if (d->n_seqs == 0)
      return mt_seterr(MT_ECORRUPT, "data: %s: %zu bytes, but %s lists no sequences", bin_path,
                       d->bin_bytes, idx_path);
    return mt_seterr(MT_ECORRUPT,
                     "data: %s: %zu bytes, but the last sequence (%llu) in %s ends at %llu",
                     bin_path, d->bin_bytes, (unsigned long long)(d->n_seqs - 1), idx_path,
                     (unsigned long long)end);
  }
  d->n_tokens = tokens;
  return 0;
}

/* Document boundaries: start at 0, never decrease, stay within N. They need
 * not end at N: Megatron's old merge_file_ (and tools built on it) copy the
 * sizes but leave doc_idx at [0], and Megatron trains on such files, since
 * its GPT dataset counts sequences, not documents. */
static int check_documents(const mt_indexed *d, const char *path, uint64_t nd) {
  int64_t first = idx_doc(d, 0);
  if (first != 0)
    return mt_seterr(MT_ECORRUPT, "data: %s: doc_idx[0] = %lld but must be 0", path,
                     (long long)first);
  int64_t prev = 0;
  for (uint64_t i = 1; i < nd; i++) {
    int64_t v = idx_doc(d, i);
    if (v < prev)
      return mt_seterr(MT_ECORRUPT, "data: %s: doc_idx[%llu] = %lld is below doc_idx[%llu] = %lld",
                       path, (unsigned long long)i, (long long)v, (unsigned long long)(i - 1),
                       (long long)prev);
    if ((uint64_t)v > d->n_seqs)
      return mt_seterr(MT_ECORRUPT, "data: %s: doc_idx[%llu] = %lld is past N = %llu sequences",
                       path, (unsigned long long)i, (long long)v, (unsigned long long)d->n_seqs);
    prev = v;
  }
  return 0;
}

/* Opens PREFIX.idx and PREFIX.bin and checks every field; on failure d is
 * left closed and the message names the file, the field and the index. */
int mt_indexed_open(mt_indexed *d, const char *prefix) {
  memset(d, 0, sizeof *d);
  size_t plen = strlen(prefix);
  if (plen + 5 > sizeof d->prefix)
    return mt_seterr(MT_EINVAL, "data: dataset prefix is %zu bytes long (at most %zu)", plen,
                     sizeof d->prefix - 5);
  memcpy(d->prefix, prefix, plen + 1);
  char idx_path[sizeof d->prefix], bin_path[sizeof d->prefix];
  snprintf(idx_path, sizeof idx_path, "%s.idx", prefix);
  snprintf(bin_path, sizeof bin_path, "%s.bin", prefix);

  uint64_t nd = 0;
  int rc = map_file(idx_path, &d->idx_map, &d->idx_bytes);
  if (!rc) rc = check_header(d, idx_path, &nd);
  if (!rc) rc = map_file(bin_path, &d->bin_map, &d->bin_bytes);
  if (!rc) rc = check_documents(d, idx_path, nd);
  if (!rc) rc = check_sequences(d, idx_path, bin_path);
  if (rc) {
    mt_indexed_close(d);
    return rc;
  }
  return 0;
}

void mt_indexed_close(mt_indexed *d) {
  if (d->idx_map) munmap((void *)d->idx_map, d->idx_bytes);
  if (d->bin_map) munmap((void *)d->bin_map, d->bin_bytes);
  memset(d, 0, sizeof *d);
}

uint32_t mt_indexed_seq_len(const mt_indexed *d, uint64_t seq) {
  return seq < d->n_seqs ? (uint32_t)idx_size(d, seq) : 0;
}

uint64_t mt_indexed_seq_offset(const mt_indexed *d, uint64_t seq) {
  return seq < d->n_seqs ? (uint64_t)idx_pointer(d, seq) : d->bin_bytes;
}

uint64_t mt_indexed_doc_start(const mt_indexed *d, uint64_t doc) {
  return doc <= d->n_docs ? (uint64_t)idx_doc(d, doc) : d->n_seqs;
}

/* Copies tokens [offset, offset+len) of sequence seq as int32. int64 values
 * outside int32 and float dtypes are refused, naming the position. */
int mt_indexed_read(const mt_indexed *d, uint64_t seq, uint64_t offset, uint64_t len,
                    int32_t *out) {
  if (seq >= d->n_seqs)
    return mt_seterr(MT_EINVAL, "data: %s: sequence %llu of %llu", d->prefix,
                     (unsigned long long)seq, (unsigned long long)d->n_seqs);
  uint64_t n = (uint64_t)idx_size(d, seq);
  if (offset > n || len > n - offset)
    return mt_seterr(MT_EINVAL, "data: %s: tokens [%llu, %llu) of sequence %llu, which has %llu",
                     d->prefix, (unsigned long long)offset, (unsigned long long)(offset + len),
                     (unsigned long long)seq, (unsigned long long)n);
  if (len == 0) return 0;
  const uint8_t *p = d->bin_map + idx_pointer(d, seq) + offset * d->elem_bytes;
  switch (d->dtype) {
  case MT_IDX_U8:
    for (uint64_t i = 0; i < len; i++) out[i] = p[i];
    break;
  case MT_IDX_I8:
    for (uint64_t i = 0; i < len; i++) out[i] = (int8_t)p[i];
    break;
  case MT_IDX_U16:
    for (uint64_t i = 0; i < len; i++) {
      uint16_t v;
      memcpy(&v, p + 2 * i, 2);
      out[i] = v;
    }
    break;
  case MT_IDX_I16:
    for (uint64_t i = 0; i < len; i++) {
      int16_t v;
      memcpy(&v, p + 2 * i, 2);
      out[i] = v;
    }
    break;
  case MT_IDX_I32: memcpy(out, p, 4 * len); break;
  case MT_IDX_I64:
    for (uint64_t i = 0; i < len; i++) {
      int64_t v = ld_i64(p + 8 * i);
      if (v < INT32_MIN || v > INT32_MAX)
        return mt_seterr(
            MT_ECORRUPT, "data: %s.bin: token %llu of sequence %llu is %lld, outside int32",
            d->prefix, (unsigned long long)(offset + i), (unsigned long long)seq, (long long)v);
      out[i] = (int32_t)v;
    }
    break;
  default:
    return mt_seterr(MT_ENOTSUP, "data: %s: dtype code %d holds floats, not token ids", d->prefix,
                     d->dtype);
  }
  return 0;
}

/* ---- writer --------------------------------------------------------------- */

struct mt_indexed_writer {
  int dtype;
  size_t elem;
  char *bin_path, *idx_path, *bin_tmp, *idx_tmp;
  int bin_fd;
  uint8_t *buf; /* pending .bin bytes */
  size_t buf_n, buf_cap;
  int32_t *sizes; /* N */
  size_t n_seqs, sizes_cap;
  int64_t *doc_idx; /* D+1, doc_idx[0] = 0 */
  size_t n_doc_idx, doc_cap;
  uint64_t bin_bytes;
};

static int write_all(int fd, const void *buf, size_t n, const char *path) {
  const uint8_t *p = buf;
  while (n) {
    ssize_t k = write(fd, p, n > (1u << 30) ? (1u << 30) : n);
    if (k < 0) {
      if (errno == EINTR) continue;
      return mt_seterr(MT_EIO, "data: write %s: %s", path, strerror(errno));
    }
    p += k;
    n -= (size_t)k;
  }
  return 0;
}

static int grow(void **p, size_t *cap, size_t need, size_t elem) {
  if (need <= *cap) return 0;
  size_t c = *cap ? *cap : 1024;
  while (c < need) c *= 2;
  void *q = realloc(*p, c * elem);
  if (!q) return mt_seterr(MT_ENOMEM, "data: writer: out of memory");
  *p = q;
  *cap = c;
  return 0;
}

static char *path_with(const char *prefix, const char *suffix) {
  size_t n = strlen(prefix) + strlen(suffix) + 1;
  char *s = malloc(n);
  if (s) snprintf(s, n, "%s%s", prefix, suffix);
  return s;
}

static void writer_free(mt_indexed_writer *w) {
  if (w->bin_fd >= 0) close(w->bin_fd);
  free(w->bin_path), free(w->idx_path), free(w->bin_tmp), free(w->idx_tmp);
  free(w->buf), free(w->sizes), free(w->doc_idx);
  free(w);
}

/* Starts PREFIX.bin/.idx for dtype (integer dtypes only). Nothing appears
 * under the final names until finish. */
int mt_indexed_writer_open(mt_indexed_writer **out, const char *prefix, int dtype) {
  *out = NULL;
  if (!dtype_bytes(dtype))
    return mt_seterr(MT_EINVAL, "data: writer: %s: dtype code %d is not one of 1..8", prefix,
                     dtype);
  if (dtype == MT_IDX_F32 || dtype == MT_IDX_F64)
    return mt_seterr(MT_ENOTSUP, "data: writer: %s: dtype code %d holds floats, not token ids",
                     prefix, dtype);
  mt_indexed_writer *w = calloc(1, sizeof *w);
  if (!w) return mt_seterr(MT_ENOMEM, "data: writer: out of memory");
  w->bin_fd = -1;
  w->dtype = dtype;
  w->elem = dtype_bytes(dtype);
  char tmp_suffix[48];
  mt_tmp_suffix(tmp_suffix, sizeof tmp_suffix);
  w->bin_path = path_with(prefix, ".bin");
  w->idx_path = path_with(prefix, ".idx");
  w->bin_tmp = w->bin_path ? path_with(w->bin_path, tmp_suffix) : NULL;
  w->idx_tmp = w->idx_path ? path_with(w->idx_path, tmp_suffix) : NULL;
  w->buf_cap = 1 << 20;
  w->buf = malloc(w->buf_cap);
  if (!w->bin_path || !w->idx_path || !w->bin_tmp || !w->idx_tmp || !w->buf ||
      grow((void **)&w->doc_idx, &w->doc_cap, 1, sizeof *w->doc_idx)) {
    writer_free(w);
    return mt_seterr(MT_ENOMEM, "data: writer: out of memory");
  }
  w->doc_idx[w->n_doc_idx++] = 0;
  w->bin_fd = open(w->bin_tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (w->bin_fd < 0) {
    int rc = mt_seterr(errno == ENOENT ? MT_ENOENT : MT_EIO, "data: writer: create %s: %s",
                       w->bin_tmp, strerror(errno));
    writer_free(w);
    return rc;
  }
  *out = w;
  return 0;
}

static int writer_flush(mt_indexed_writer *w) {
  int rc = write_all(w->bin_fd, w->buf, w->buf_n, w->bin_tmp);
  w->buf_n = 0;
  return rc;
}

/* Appends one sequence; ids must fit the dtype. */
int mt_indexed_writer_add_seq(mt_indexed_writer *w, const int32_t *ids, size_t n) {
  static const int64_t lo[9] = {0, 0, -128, -32768, INT32_MIN, INT32_MIN, 0, 0, 0};
  static const int64_t hi[9] = {0, 255, 127, 32767, INT32_MAX, INT32_MAX, 0, 0, 65535};
  if (n > INT32_MAX)
    return mt_seterr(MT_EINVAL, "data: writer: %s: sequence of %zu tokens (at most %d)",
                     w->bin_path, n, INT32_MAX);
  for (size_t i = 0; i < n; i++)
    if (ids[i] < lo[w->dtype] || ids[i] > hi[w->dtype])
      return mt_seterr(MT_EINVAL,
                       "data: writer: %s: token %zu of sequence %zu is %d, outside "
                       "dtype code %d",
                       w->bin_path, i, w->n_seqs, ids[i], w->dtype);
  int rc = grow((void **)&w->sizes, &w->sizes_cap, w->n_seqs + 1, sizeof *w->sizes);
  if (rc) return rc;
  size_t i = 0;
  while (i < n) {
    if (w->buf_n + w->elem > w->buf_cap && (rc = writer_flush(w))) return rc;
    size_t k = (w->buf_cap - w->buf_n) / w->elem;
    if (k > n - i) k = n - i;
    uint8_t *p = w->buf + w->buf_n;
    switch (w->dtype) {
    case MT_IDX_U8:
    case MT_IDX_I8:
      for (size_t j = 0; j < k; j++) p[j] = (uint8_t)ids[i + j];
      break;
    case MT_IDX_U16:
    case MT_IDX_I16:
      for (size_t j = 0; j < k; j++) {
        uint16_t v = (uint16_t)ids[i + j];
        memcpy(p + 2 * j, &v, 2);
      }
      break;
    case MT_IDX_I32: memcpy(p, ids + i, 4 * k); break;
    case MT_IDX_I64:
      for (size_t j = 0; j < k; j++) {
        int64_t v = ids[i + j];
        memcpy(p + 8 * j, &v, 8);
      }
      break;
    }
    w->buf_n += k * w->elem;
    i += k;
  }
  w->sizes[w->n_seqs++] = (int32_t)n;
  w->bin_bytes += n * w->elem;
  return 0;
}

/* Closes the current document: the sequences added since the last end_doc. */
int mt_indexed_writer_end_doc(mt_indexed_writer *w) {
  int rc = grow((void **)&w->doc_idx, &w->doc_cap, w->n_doc_idx + 1, sizeof *w->doc_idx);
  if (rc) return rc;
  w->doc_idx[w->n_doc_idx++] = (int64_t)w->n_seqs;
  return 0;
}

/* fsyncs the directory holding path, so a rename into it is durable. */
static int fsync_dir(const char *path) {
  char *copy = strdup(path);
  if (!copy) return mt_seterr(MT_ENOMEM, "data: writer: out of memory");
  const char *dir = dirname(copy);
  int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  int rc = 0;
  if (fd < 0 || fsync(fd))
    rc = mt_seterr(MT_EIO, "data: fsync directory %s: %s", dir, strerror(errno));
  if (fd >= 0) close(fd);
  free(copy);
  return rc;
}

static int write_idx(mt_indexed_writer *w, int fd) {
  uint8_t head[IDX_HEADER_BYTES];
  uint64_t version = 1, n = w->n_seqs, nd = w->n_doc_idx;
  memcpy(head, idx_magic, 9);
  memcpy(head + 9, &version, 8);
  head[17] = (uint8_t)w->dtype;
  memcpy(head + 18, &n, 8);
  memcpy(head + 26, &nd, 8);
  int rc = write_all(fd, head, sizeof head, w->idx_tmp);
  if (!rc) rc = write_all(fd, w->sizes, 4 * w->n_seqs, w->idx_tmp);
  /* pointers: byte offsets, contiguous from 0, as Megatron's builder writes them */
  int64_t chunk[4096], off = 0;
  for (size_t i = 0; !rc && i < w->n_seqs;) {
    size_t k = 0;
    for (; k < 4096 && i < w->n_seqs; k++, i++) {
      chunk[k] = off;
      off += (int64_t)w->sizes[i] * (int64_t)w->elem;
    }
    rc = write_all(fd, chunk, 8 * k, w->idx_tmp);
  }
  if (!rc) rc = write_all(fd, w->doc_idx, 8 * w->n_doc_idx, w->idx_tmp);
  return rc;
}

/* Writes the .idx, then makes both files durable under their final names:
 * fsync each temp file, rename .bin then .idx, fsync the directory. A
 * document still open (sequences after the last end_doc) is closed first. */
int mt_indexed_writer_finish(mt_indexed_writer *w) {
  int rc = 0, fd = -1;
  if ((size_t)w->doc_idx[w->n_doc_idx - 1] != w->n_seqs && (rc = mt_indexed_writer_end_doc(w)))
    goto fail;
  if ((rc = writer_flush(w))) goto fail;
  if (fsync(w->bin_fd)) {
    rc = mt_seterr(MT_EIO, "data: fsync %s: %s", w->bin_tmp, strerror(errno));
    goto fail;
  }
  int bfd = w->bin_fd;
  w->bin_fd = -1;
  if (close(bfd)) {
    rc = mt_seterr(MT_EIO, "data: close %s: %s", w->bin_tmp, strerror(errno));
    goto fail;
  }
  fd = open(w->idx_tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    rc = mt_seterr(MT_EIO, "data: create %s: %s", w->idx_tmp, strerror(errno));
    goto fail;
  }
  if ((rc = write_idx(w, fd))) goto fail;
  if (fsync(fd)) {
    rc = mt_seterr(MT_EIO, "data: fsync %s: %s", w->idx_tmp, strerror(errno));
    goto fail;
  }
  int ifd = fd;
  fd = -1;
  if (close(ifd)) {
    rc = mt_seterr(MT_EIO, "data: close %s: %s", w->idx_tmp, strerror(errno));
    goto fail;
  }
  if (rename(w->bin_tmp, w->bin_path)) {
    rc = mt_seterr(MT_EIO, "data: rename %s -> %s: %s", w->bin_tmp, w->bin_path, strerror(errno));
    goto fail;
  }
  if (rename(w->idx_tmp, w->idx_path)) {
    rc = mt_seterr(MT_EIO, "data: rename %s -> %s: %s", w->idx_tmp, w->idx_path, strerror(errno));
    goto fail;
  }
  rc = fsync_dir(w->idx_path);
  writer_free(w);
  return rc;
fail:
  if (fd >= 0) close(fd);
  unlink(w->bin_tmp);
  unlink(w->idx_tmp);
  writer_free(w);
  return rc;
}

void mt_indexed_writer_abort(mt_indexed_writer *w) {
  if (!w) return;
  if (w->bin_fd >= 0) close(w->bin_fd);
  w->bin_fd = -1;
  unlink(w->bin_tmp);
  unlink(w->idx_tmp);
  writer_free(w);
}
