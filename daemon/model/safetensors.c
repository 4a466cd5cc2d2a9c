/* safetensors.c — bounds-checked .safetensors reader, durable writer, and the
 * GPT-2 (Hugging Face) <-> mt_gpt mapping. See safetensors.h for the format. */
#include "safetensors.h"

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <libgen.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "err.h"
#include "fileio.h"
#include "half.h"
#include "log.h"

/* A header larger than this is refused before parsing (the reference
 * implementation's limit is 100 MB). */
#define ST_MAX_HEADER_BYTES ((uint64_t)100 << 20)
/* Hugging Face's index of a model in several files. */
#define ST_INDEX_NAME "model.safetensors.index.json"
/* Longest combined error message the GPT mapping assembles. */
#define ST_PROBLEMS_MAX 4096

/* ---- dtypes --------------------------------------------------------------- */

static const struct {
  const char *name;
  size_t bytes;
} st_dtypes[] = {
    {"F64", 8}, {"F32", 4}, {"F16", 2},  {"BF16", 2},    {"I64", 8},
    {"I32", 4}, {"I16", 2}, {"I8", 1},   {"U64", 8},     {"U32", 4},
    {"U16", 2}, {"U8", 1},  {"BOOL", 1}, {"F8_E4M3", 1}, {"F8_E5M2", 1},
};

/* An export's dtypes: the job's and mtnlgctl's name, the file's, torch's. */
static const struct {
  const char *name, *st, *torch;
  size_t bytes;
} st_export_dtypes[] = {
    [MT_ST_FP32] = {"fp32", "F32", "float32", 4},
    [MT_ST_BF16] = {"bf16", "BF16", "bfloat16", 2},
    [MT_ST_FP16] = {"fp16", "F16", "float16", 2},
};

int mt_st_dtype_parse(const char *name, mt_st_dtype *dtype) {
  for (int i = 0; i < 3; i++)
    if (name && !strcmp(name, st_export_dtypes[i].name)) {
      *dtype = (mt_st_dtype)i;
      return 0;
    }
  return mt_seterr(MT_EINVAL, "dtype \"%s\" is not one of fp32, bf16, fp16", name ? name : "");
}

const char *mt_st_dtype_name(mt_st_dtype dtype) {
  return (unsigned)dtype < 3 ? st_export_dtypes[dtype].name : "?";
}

/* Bytes per element of a dtype name, 0 if unknown. */
static size_t st_dtype_bytes(const char *dtype) {
  for (size_t i = 0; i < sizeof st_dtypes / sizeof st_dtypes[0]; i++)
    if (!strcmp(st_dtypes[i].name, dtype)) return st_dtypes[i].bytes;
  return 0;
}

static float st_f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign; /* ±0 */
    } else {       /* subnormal: normalise */
      exp = 127 - 15 + 1;
      while (!(mant & 0x400)) {
        mant <<= 1;
        exp--;
      }
      mant &= 0x3ff;
      bits = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13); /* inf / nan (payload kept) */
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

static float st_bf16_to_f32(uint16_t h) {
  uint32_t bits = (uint32_t)h << 16;
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

static uint64_t st_le64(const uint8_t *p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
  return v;
}

static uint16_t st_le16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

/* ---- reader --------------------------------------------------------------- */

static int st_cmp_offset(const void *a, const void *b) {
  const mt_st_tensor *x = *(const mt_st_tensor *const *)a, *y = *(const mt_st_tensor *const *)b;
  if (x->offset != y->offset) return x->offset < y->offset ? -1 : 1;
  if (x->bytes != y->bytes) return x->bytes < y->bytes ? -1 : 1;
  return 0;
}

/* Reads a JSON integer that must be >= 0. */
static int st_json_u64(const json_t *v, uint64_t *out) {
  if (!json_is_integer(v) || json_integer_value(v) < 0) return -1;
  *out = (uint64_t)json_integer_value(v);
  return 0;
}

/* Validates one tensor entry of the header and fills t (name not set). */
static int st_parse_entry(const char *path, const char *name, const json_t *v, size_t data_bytes,
                          mt_st_tensor *t) {
  if (!json_is_object(v))
    return mt_seterr(MT_ECORRUPT, "safetensors: %s: tensor \"%s\": entry is not an object", path,
                     name);
  const json_t *jd = json_object_get(v, "dtype");
  const json_t *js = json_object_get(v, "shape");
  const json_t *jo = json_object_get(v, "data_offsets");
  if (!json_is_string(jd) || !json_is_array(js) || !json_is_array(jo))
    return mt_seterr(MT_ECORRUPT,
                     "safetensors: %s: tensor \"%s\": needs string \"dtype\", array \"shape\" "
                     "and array \"data_offsets\"",
                     path, name);
  const char *dtype = json_string_value(jd);
  size_t esize = st_dtype_bytes(dtype);
  if (!esize || strlen(dtype) >= sizeof t->dtype)
    return mt_seterr(MT_ECORRUPT, "safetensors: %s: tensor \"%s\": unknown dtype \"%s\"", path,
                     name, dtype);
  snprintf(t->dtype, sizeof t->dtype, "%s", dtype);

  size_t ndim = json_array_size(js);
  if (ndim > sizeof t->shape / sizeof t->shape[0])
    return mt_seterr(MT_ECORRUPT, "safetensors: %s: tensor \"%s\": %zu dimensions (at most %zu)",
                     path, name, ndim, sizeof t->shape / sizeof t->shape[0]);
  t->ndim = (int)ndim;
  uint64_t numel = 1;
  int overflow = 0;
  for (size_t i = 0; i < ndim; i++) {
    uint64_t d;
    if (st_json_u64(json_array_get(js, i), &d) || d > INT64_MAX)
      return mt_seterr(MT_ECORRUPT,
                       "safetensors: %s: tensor \"%s\": shape[%zu] is not a non-negative integer",
                       path, name, i);
    t->shape[i] = (int64_t)d;
    if (d && numel > UINT64_MAX / d) overflow = 1;
    numel *= d;
  }
  if (overflow || numel > UINT64_MAX / esize)
    return mt_seterr(MT_ECORRUPT, "safetensors: %s: tensor \"%s\": shape overflows", path, name);

  uint64_t a, b;
  if (json_array_size(jo) != 2 || st_json_u64(json_array_get(jo, 0), &a) ||
      st_json_u64(json_array_get(jo, 1), &b))
    return mt_seterr(MT_ECORRUPT,
                     "safetensors: %s: tensor \"%s\": data_offsets must be two non-negative "
                     "integers [begin, end]",
                     path, name);
  if (a > b || b > data_bytes)
    return mt_seterr(MT_ECORRUPT,
                     "safetensors: %s: tensor \"%s\": data_offsets [%llu, %llu] outside the data "
                     "region of %zu bytes",
                     path, name, (unsigned long long)a, (unsigned long long)b, data_bytes);
  if (numel * esize != b - a)
    return mt_seterr(MT_ECORRUPT,
                     "safetensors: %s: tensor \"%s\": shape and dtype %s need %llu bytes but "
                     "data_offsets [%llu, %llu] span %llu",
                     path, name, dtype, (unsigned long long)(numel * esize), (unsigned long long)a,
                     (unsigned long long)b, (unsigned long long)(b - a));
  t->offset = (size_t)a;
  t->bytes = (size_t)(b - a);
  return 0;
}

/* Tensors must tile the data region: no overlap, no hole, nothing after the
 * last (the reference implementation's rule). */
static int st_check_layout(const char *path, const mt_st_file *f, size_t data_bytes) {
  if (f->n == 0) {
    if (data_bytes)
      return mt_seterr(MT_ECORRUPT, "safetensors: %s: %zu data bytes but no tensors", path,
                       data_bytes);
    return 0;
  }
  const mt_st_tensor **order = malloc((size_t)f->n * sizeof *order);
  if (!order) return mt_seterr(MT_ENOMEM, "safetensors: %s: out of memory", path);
  for (int i = 0; i < f->n; i++) order[i] = &f->tensors[i];
  qsort(order, (size_t)f->n, sizeof *order, st_cmp_offset);
  int rc = 0;
  size_t end = 0;
  for (int i = 0; i < f->n && !rc; i++) {
    const mt_st_tensor *t = order[i];
    if (t->offset < end)
      rc = mt_seterr(MT_ECORRUPT,
                     "safetensors: %s: tensor \"%s\" (bytes [%zu, %zu]) overlaps tensor \"%s\" "
                     "(ending at %zu)",
                     path, t->name, t->offset, t->offset + t->bytes, order[i - 1]->name, end);
    else if (t->offset > end)
      rc = mt_seterr(MT_ECORRUPT,
                     "safetensors: %s: hole in the data region: bytes [%zu, %zu] before tensor "
                     "\"%s\" belong to no tensor",
                     path, end, t->offset, t->name);
    end = t->offset + t->bytes;
  }
  if (!rc && end != data_bytes)
    rc = mt_seterr(MT_ECORRUPT,
                   "safetensors: %s: data region is %zu bytes but the tensors end at %zu", path,
                   data_bytes, end);
  free(order);
  return rc;
}

static int st_check_metadata(const char *path, const json_t *meta) {
  if (!json_is_object(meta))
    return mt_seterr(MT_ECORRUPT, "safetensors: %s: __metadata__ is not an object", path);
  const char *k;
  const json_t *v;
  json_object_foreach((json_t *)meta, k, v) {
    if (!json_is_string(v))
      return mt_seterr(MT_ECORRUPT, "safetensors: %s: __metadata__ value \"%s\" is not a string",
                       path, k);
  }
  return 0;
}

/* Maps the file and validates the whole header; on failure *f is empty. */
int mt_st_open(mt_st_file *f, const char *path) {
  memset(f, 0, sizeof *f);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int e = errno;
    return mt_seterr(e == ENOENT ? MT_ENOENT : MT_EIO, "safetensors: open %s: %s", path,
                     strerror(e));
  }
  struct stat st;
  if (fstat(fd, &st)) {
    int e = errno;
    close(fd);
    return mt_seterr(MT_EIO, "safetensors: stat %s: %s", path, strerror(e));
  }
  size_t size = (size_t)st.st_size;
  if (size < 8) {
    close(fd);
    return mt_seterr(MT_ECORRUPT,
                     "safetensors: %s: truncated: %zu bytes, shorter than the 8-byte header length",
                     path, size);
  }
  void *map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
  int e = errno;
  close(fd);
  if (map == MAP_FAILED) return mt_seterr(MT_EIO, "safetensors: mmap %s: %s", path, strerror(e));
  f->map = map;
  f->map_bytes = size;

  int rc = 0;
  json_t *root = NULL;
  const uint8_t *bytes = map;
  uint64_t hlen = st_le64(bytes);
  if (hlen > size - 8) {
    rc = mt_seterr(MT_ECORRUPT,
                   "safetensors: %s: header length %llu runs past the end of the file (%zu bytes); "
                   "truncated or not a safetensors file",
                   path, (unsigned long long)hlen, size);
    goto fail;
  }
  if (hlen > ST_MAX_HEADER_BYTES || hlen < 2) {
    rc = mt_seterr(MT_ECORRUPT, "safetensors: %s: implausible header length %llu", path,
                   (unsigned long long)hlen);
    goto fail;
  }
  json_error_t jerr;
  root = json_loadb((const char *)bytes + 8, (size_t)hlen, JSON_REJECT_DUPLICATES, &jerr);
  if (!root) {
    rc = mt_seterr(MT_ECORRUPT, "safetensors: %s: header is not valid JSON: %s (at byte %d)", path,
                   jerr.text, jerr.position);
    goto fail;
  }
  if (!json_is_object(root)) {
    rc = mt_seterr(MT_ECORRUPT, "safetensors: %s: header is not a JSON object", path);
    goto fail;
  }
  f->data = bytes + 8 + hlen;
  size_t data_bytes = size - 8 - (size_t)hlen;

  size_t cap = json_object_size(root);
  f->tensors = calloc(cap ? cap : 1, sizeof *f->tensors);
  if (!f->tensors) {
    rc = mt_seterr(MT_ENOMEM, "safetensors: %s: out of memory", path);
    goto fail;
  }
  const char *key;
  json_t *val;
  json_object_foreach(root, key, val) {
    if (!strcmp(key, "__metadata__")) {
      if ((rc = st_check_metadata(path, val))) goto fail;
      json_decref(f->meta);
      f->meta = json_incref(val);
      continue;
    }
    mt_st_tensor *t = &f->tensors[f->n];
    if ((rc = st_parse_entry(path, key, val, data_bytes, t))) goto fail;
    if (!(t->name = strdup(key))) {
      rc = mt_seterr(MT_ENOMEM, "safetensors: %s: out of memory", path);
      goto fail;
    }
    f->n++;
  }
  if ((rc = st_check_layout(path, f, data_bytes))) goto fail;
  json_decref(root);
  return 0;

fail:
  json_decref(root);
  mt_st_close(f);
  return rc;
}

void mt_st_close(mt_st_file *f) {
  json_decref(f->meta);
  if (f->map) munmap(f->map, f->map_bytes);
  for (int i = 0; i < f->n; i++) free(f->tensors[i].name);
  free(f->tensors);
  memset(f, 0, sizeof *f);
}

const mt_st_tensor *mt_st_find(const mt_st_file *f, const char *name) {
  for (int i = 0; i < f->n; i++)
    if (!strcmp(f->tensors[i].name, name)) return &f->tensors[i];
  return NULL;
}

/* n elements of dtype at src to fp32; 0, or MT_ENOTSUP for a dtype that is
 * not a float. */
static int st_convert(const char *dtype, const uint8_t *src, size_t n, float *out) {
  if (!strcmp(dtype, "F32")) {
    memcpy(out, src, n * sizeof(float)); /* little-endian host; src may be unaligned */
  } else if (!strcmp(dtype, "F16")) {
    for (size_t i = 0; i < n; i++) out[i] = st_f16_to_f32(st_le16(src + 2 * i));
  } else if (!strcmp(dtype, "BF16")) {
    for (size_t i = 0; i < n; i++) out[i] = st_bf16_to_f32(st_le16(src + 2 * i));
  } else if (!strcmp(dtype, "F64")) {
    for (size_t i = 0; i < n; i++) {
      double d;
      memcpy(&d, src + 8 * i, sizeof d);
      out[i] = (float)d;
    }
  } else {
    return MT_ENOTSUP;
  }
  return 0;
}

static int st_not_float(const mt_st_tensor *t) {
  return mt_seterr(MT_ENOTSUP,
                   "safetensors: tensor \"%s\": dtype %s cannot be read as floats (F32, F16, "
                   "BF16, F64)",
                   t->name, t->dtype);
}

int mt_st_read_f32(const mt_st_file *f, const mt_st_tensor *t, float *out) {
  size_t eb = st_dtype_bytes(t->dtype);
  if (!eb || st_convert(t->dtype, f->data + t->offset, t->bytes / eb, out)) return st_not_float(t);
  return 0;
}

int mt_st_read_range_f32(const mt_st_file *f, const mt_st_tensor *t, size_t first, size_t n,
                         float *out) {
  size_t eb = st_dtype_bytes(t->dtype);
  if (!eb) return st_not_float(t);
  size_t numel = t->bytes / eb;
  if (first > numel || n > numel - first)
    return mt_seterr(MT_EINVAL, "safetensors: tensor \"%s\": elements [%zu, %zu) past its %zu",
                     t->name, first, first + n, numel);
  if (st_convert(t->dtype, f->data + t->offset + first * eb, n, out)) return st_not_float(t);
  return 0;
}

/* ---- writer --------------------------------------------------------------- */

typedef struct st_wtensor {
  char *name;
  int ndim;
  int64_t shape[8];
  size_t numel;
  const float *data; /* borrowed until commit */
} st_wtensor;

/* Elements converted to 16 bits per write. */
#define ST_CONVERT_CHUNK 8192

struct mt_st_writer {
  st_wtensor *t;
  int n, cap;
  json_t *meta;
  mt_st_dtype dtype; /* of every tensor */
  /* streaming (mt_st_writer_begin): the open temp file, the tensor being
   * written and its elements so far */
  mt_atomic_file file;
  int streaming, cur;
  size_t cur_numel;
  uint8_t *conv; /* ST_CONVERT_CHUNK converted elements (16-bit dtypes) */
};

mt_st_writer *mt_st_writer_new(void) {
  mt_st_writer *w = calloc(1, sizeof *w);
  if (!w || !(w->meta = json_object())) {
    free(w);
    mt_seterr(MT_ENOMEM, "safetensors: writer: out of memory");
    return NULL;
  }
  return w;
}

void mt_st_writer_free(mt_st_writer *w) {
  if (!w) return;
  if (w->streaming) mt_atomic_abort(&w->file);
  for (int i = 0; i < w->n; i++) free(w->t[i].name);
  free(w->t);
  free(w->conv);
  json_decref(w->meta);
  free(w);
}

int mt_st_writer_dtype(mt_st_writer *w, mt_st_dtype dtype) {
  if ((unsigned)dtype > MT_ST_FP16)
    return mt_seterr(MT_EINVAL, "safetensors: writer: dtype %d is not fp32, bf16 or fp16",
                     (int)dtype);
  if (w->streaming) return mt_seterr(MT_EINVAL, "safetensors: writer: dtype set after the header");
  w->dtype = dtype;
  return 0;
}

int mt_st_writer_add(mt_st_writer *w, const char *name, int ndim, const int64_t *shape,
                     const float *data) {
  if (!name || !*name || !strcmp(name, "__metadata__"))
    return mt_seterr(MT_EINVAL, "safetensors: writer: bad tensor name \"%s\"", name ? name : "");
  if (ndim < 0 || ndim > 8)
    return mt_seterr(MT_EINVAL, "safetensors: writer: tensor \"%s\": %d dimensions (0..8)", name,
                     ndim);
  for (int i = 0; i < w->n; i++)
    if (!strcmp(w->t[i].name, name))
      return mt_seterr(MT_EINVAL, "safetensors: writer: tensor \"%s\" added twice", name);
  size_t numel = 1;
  for (int i = 0; i < ndim; i++) {
    if (shape[i] < 0 || (shape[i] && numel > SIZE_MAX / 4 / (size_t)shape[i]))
      return mt_seterr(MT_EINVAL, "safetensors: writer: tensor \"%s\": bad shape[%d] = %lld", name,
                       i, (long long)shape[i]);
    numel *= (size_t)shape[i];
  }
  if (w->streaming)
    return mt_seterr(MT_EINVAL, "safetensors: writer: tensor \"%s\" added after the header", name);
  if (w->n == w->cap) {
    int cap = w->cap ? 2 * w->cap : 64;
    st_wtensor *nt = realloc(w->t, (size_t)cap * sizeof *nt);
    if (!nt) return mt_seterr(MT_ENOMEM, "safetensors: writer: out of memory");
    w->t = nt;
    w->cap = cap;
  }
  st_wtensor *t = &w->t[w->n];
  memset(t, 0, sizeof *t);
  if (!(t->name = strdup(name))) return mt_seterr(MT_ENOMEM, "safetensors: writer: out of memory");
  t->ndim = ndim;
  for (int i = 0; i < ndim; i++) t->shape[i] = shape[i];
  t->numel = numel;
  t->data = data;
  w->n++;
  return 0;
}

int mt_st_writer_meta(mt_st_writer *w, const char *key, const char *value) {
  json_t *s = json_string(value);
  if (!s || json_object_set_new(w->meta, key, s))
    return mt_seterr(MT_EINVAL, "safetensors: writer: metadata \"%s\": not valid UTF-8", key);
  return 0;
}

/* Builds the header JSON (tensors in the order added, offsets back to back),
 * padded with spaces to a multiple of 8 bytes. */
static char *st_build_header(const mt_st_writer *w, size_t *len_out) {
  json_t *root = json_object();
  char *text = NULL, *padded = NULL;
  if (!root) goto done;
  if (json_object_size(w->meta) && json_object_set(root, "__metadata__", w->meta)) goto done;
  size_t off = 0, eb = st_export_dtypes[w->dtype].bytes;
  for (int i = 0; i < w->n; i++) {
    const st_wtensor *t = &w->t[i];
    size_t bytes = t->numel * eb;
    json_t *shape = json_array();
    json_t *offs = json_pack("[II]", (json_int_t)off, (json_int_t)(off + bytes));
    json_t *e = json_object();
    if (!shape || !offs || !e) {
      json_decref(shape), json_decref(offs), json_decref(e);
      goto done;
    }
    for (int d = 0; d < t->ndim; d++) json_array_append_new(shape, json_integer(t->shape[d]));
    json_object_set_new(e, "dtype", json_string(st_export_dtypes[w->dtype].st));
    json_object_set_new(e, "shape", shape);
    json_object_set_new(e, "data_offsets", offs);
    if (json_object_set_new(root, t->name, e)) goto done;
    off += bytes;
  }
  text = json_dumps(root, JSON_COMPACT | JSON_PRESERVE_ORDER);
  if (!text) goto done;
  size_t len = strlen(text), plen = (len + 7) & ~(size_t)7;
  if (!(padded = malloc(plen + 1))) goto done;
  memcpy(padded, text, len);
  memset(padded + len, ' ', plen - len);
  padded[plen] = 0;
  *len_out = plen;
done:
  free(text);
  json_decref(root);
  return padded;
}

/* Writes the length and the header to a new temp file beside path. */
static int st_write_header(mt_st_writer *w, const char *path) {
  size_t hlen = 0;
  char *header = st_build_header(w, &hlen);
  if (!header) return mt_seterr(MT_ENOMEM, "safetensors: %s: cannot build the header", path);
  uint8_t len8[8];
  for (int i = 0; i < 8; i++) len8[i] = (uint8_t)((uint64_t)hlen >> (8 * i));
  int rc = mt_atomic_open(&w->file, path);
  if (!rc) rc = mt_atomic_write(&w->file, len8, 8);
  if (!rc) rc = mt_atomic_write(&w->file, header, hlen);
  if (rc && w->file.path) mt_atomic_abort(&w->file);
  free(header);
  return rc;
}

/* Durable commit: temp file in the target's directory, fsync, rename, fsync
 * the directory. Either the old file or the complete new one exists. */
int mt_st_writer_commit(mt_st_writer *w, const char *path) {
  if (w->streaming)
    return mt_seterr(MT_EINVAL, "safetensors: %s: the writer is streaming (use mt_st_writer_end)",
                     path);
  for (int i = 0; i < w->n; i++)
    if (w->t[i].numel && !w->t[i].data)
      return mt_seterr(MT_EINVAL, "safetensors: %s: tensor \"%s\" has no data", path, w->t[i].name);
  /* the stream, fed from the tensors' own data */
  int rc = mt_st_writer_begin(w, path);
  for (int i = 0; i < w->n && !rc; i++) rc = mt_st_writer_append(w, w->t[i].data, w->t[i].numel);
  if (!rc) return mt_st_writer_end(w);
  if (w->streaming) mt_atomic_abort(&w->file), w->streaming = 0; /* nothing is left behind */
  return rc;
}

int mt_st_writer_begin(mt_st_writer *w, const char *path) {
  if (w->streaming) return mt_seterr(MT_EINVAL, "safetensors: %s: writer already begun", path);
  int rc = st_write_header(w, path);
  if (rc) return mt_wraperr(rc, "safetensors");
  w->streaming = 1;
  w->cur = 0;
  w->cur_numel = 0;
  return 0;
}

/* Element k (row-major) of tensor t as its index, "[i, j]". */
static void st_fmt_index(char *buf, size_t cap, const st_wtensor *t, size_t k) {
  size_t idx[8] = {0};
  for (int d = t->ndim - 1; d >= 0; d--) {
    size_t dim = t->shape[d] > 0 ? (size_t)t->shape[d] : 1;
    idx[d] = k % dim;
    k /= dim;
  }
  size_t len = (size_t)snprintf(buf, cap, "[");
  for (int d = 0; d < t->ndim && len < cap; d++)
    len += (size_t)snprintf(buf + len, cap - len, "%s%zu", d ? ", " : "", idx[d]);
  if (len < cap) snprintf(buf + len, cap - len, "]");
}

/* n floats of tensor t, from its element `first` on, as 16 bits each
 * (little-endian) into w->conv; refuses a finite value that becomes
 * infinite, and anything not finite in fp16, naming the element. */
static int st_convert_half(mt_st_writer *w, const st_wtensor *t, size_t first, const float *src,
                           size_t n) {
  int fp16 = w->dtype == MT_ST_FP16;
  for (size_t i = 0; i < n; i++) {
    float f = src[i];
    uint16_t bits = mt_half_pack(f, fp16);
    int finite = isfinite(f);
    if (fp16 ? mt_fp16_overflows(f) : finite && isinf(mt_half_unpack(bits, 0))) {
      char at[160];
      st_fmt_index(at, sizeof at, t, first + i);
      return mt_seterr(MT_EINVAL,
                       "safetensors: %s: tensor \"%s\": element %s is %g, which %s %s: export it "
                       "in %s",
                       w->file.path, t->name, at, (double)f,
                       finite ? "is past the largest finite value of" : "has no place in",
                       fp16 ? "fp16 (65504)" : "bf16", fp16 ? "bf16 or fp32" : "fp32");
    }
    w->conv[2 * i] = (uint8_t)bits;
    w->conv[2 * i + 1] = (uint8_t)(bits >> 8);
  }
  return 0;
}

int mt_st_writer_append(mt_st_writer *w, const float *data, size_t n) {
  if (!w->streaming) return mt_seterr(MT_EINVAL, "safetensors: writer: append before begin");
  if (!n) return 0;
  while (w->cur < w->n && w->cur_numel == w->t[w->cur].numel) w->cur++, w->cur_numel = 0;
  if (w->cur == w->n)
    return mt_seterr(MT_EINVAL, "safetensors: %s: %zu floats past the last tensor", w->file.path,
                     n);
  const st_wtensor *t = &w->t[w->cur];
  if (n > t->numel - w->cur_numel)
    return mt_seterr(MT_EINVAL, "safetensors: %s: %zu floats past the end of tensor \"%s\"",
                     w->file.path, n, t->name);
  if (w->dtype == MT_ST_FP32) {
    int rc = mt_atomic_write(&w->file, data, n * sizeof(float));
    if (rc) return mt_wraperr(rc, "safetensors");
    w->cur_numel += n;
    return 0;
  }
  if (!w->conv && !(w->conv = malloc(2 * ST_CONVERT_CHUNK)))
    return mt_seterr(MT_ENOMEM, "safetensors: %s: a conversion buffer", w->file.path);
  for (size_t done = 0; done < n;) {
    size_t k = n - done < ST_CONVERT_CHUNK ? n - done : ST_CONVERT_CHUNK;
    int rc = st_convert_half(w, t, w->cur_numel, data + done, k);
    if (!rc && (rc = mt_atomic_write(&w->file, w->conv, 2 * k))) mt_wraperr(rc, "safetensors");
    if (rc) return rc;
    done += k;
    w->cur_numel += k;
  }
  return 0;
}

int mt_st_writer_end(mt_st_writer *w) {
  if (!w->streaming) return mt_seterr(MT_EINVAL, "safetensors: writer: end before begin");
  while (w->cur < w->n && w->cur_numel == w->t[w->cur].numel) w->cur++, w->cur_numel = 0;
  if (w->cur < w->n)
    return mt_seterr(
        MT_EINVAL, "safetensors: %s: tensor \"%s\" has %zu of its %zu bytes; nothing written",
        w->file.path, w->t[w->cur].name, w->cur_numel * st_export_dtypes[w->dtype].bytes,
        w->t[w->cur].numel * st_export_dtypes[w->dtype].bytes);
  w->streaming = 0;
  int rc = mt_atomic_commit(&w->file);
  if (rc) return mt_wraperr(rc, "safetensors");
  return 0;
}

/* ---- GPT-2 mapping -------------------------------------------------------- */

/* Linear weights Hugging Face stores as Conv1D (in, out): ours are (out, in). */
static int st_is_conv1d(const char *name) {
  static const char *const suffixes[] = {".attn.c_attn.weight", ".attn.c_proj.weight",
                                         ".mlp.c_fc.weight", ".mlp.c_proj.weight"};
  size_t n = strlen(name);
  for (size_t i = 0; i < sizeof suffixes / sizeof suffixes[0]; i++) {
    size_t s = strlen(suffixes[i]);
    if (n > s && !strcmp(name + n - s, suffixes[i])) return 1;
  }
  return 0;
}

static int st_ends_with(const char *s, const char *suffix) {
  size_t n = strlen(s), k = strlen(suffix);
  return n >= k && !strcmp(s + n - k, suffix);
}

/* Buffers HF keeps in its state dicts that carry no parameters of ours. */
static int st_is_ignored(const char *name) {
  return st_ends_with(name, ".attn.bias") || st_ends_with(name, ".attn.masked_bias");
}

/* The file-side (Hugging Face) shape of the whole tensor that table entry
 * p (a shard, or all of it) belongs to; returns ndim. */
static int st_hf_shape(const mt_gpt_config *c, const mt_param *p, int64_t shape[2]) {
  if (p->ndim == 1) {
    shape[0] = (int64_t)p->full[0];
    return 1;
  }
  if (mt_param_is_vocab(p->name)) {
    shape[0] = c->vocab_size;
    shape[1] = (int64_t)p->full[1];
  } else if (st_is_conv1d(p->name)) {
    shape[0] = (int64_t)p->full[1];
    shape[1] = (int64_t)p->full[0];
  } else {
    shape[0] = (int64_t)p->full[0];
    shape[1] = (int64_t)p->full[1];
  }
  return 2;
}

/* One block of a shard inside its whole tensor, both in our layout: rows
 * [r0, r0 + nr) x columns [c0, c0 + nc) of the whole tensor are rows
 * [at, at + nr) of the shard, which is nc wide. A vector is one column. */
typedef struct st_rect {
  size_t r0, nr, c0, nc, at;
} st_rect;

/* The blocks of shard p (three for a fused q, k, v); returns how many. */
static int st_shard_rects(const mt_param *p, st_rect r[3]) {
  size_t cols = p->ndim == 2 ? p->shape[1] : 1, full_cols = p->ndim == 2 ? p->full[1] : 1;
  switch (p->shard) {
  case MT_SHARD_ROWS: r[0] = (st_rect){p->shard_off, p->shape[0], 0, cols, 0}; return 1;
  case MT_SHARD_QKV:
    for (int k = 0; k < 3; k++)
      r[k] = (st_rect){k * (p->full[0] / 3) + p->shard_off, p->shape[0] / 3, 0, cols,
                       k * (p->shape[0] / 3)};
    return 3;
  case MT_SHARD_COLS: r[0] = (st_rect){0, p->shape[0], p->shard_off, cols, 0}; return 1;
  default: r[0] = (st_rect){0, p->shape[0], 0, full_cols, 0}; return 1;
  }
}

/* How our whole tensor (R, C) lies in the file: transposed (a Conv1D: the
 * file holds (C, R)), and how many of our rows it holds (wte: the file has
 * the V real rows, not the padded ones). */
static void st_file_layout(const mt_gpt_config *c, const mt_param *p, int *transposed,
                           size_t *file_rows) {
  *transposed = p->ndim == 2 && st_is_conv1d(p->name);
  *file_rows = mt_param_is_vocab(p->name) ? (size_t)c->vocab_size : p->full[0];
}

/* File rows converted per pass when transposing on load. */
#define ST_TILE 16

/* Shard p of tensor t (our layout, p->numel floats) into dst, read from
 * the file block by block; tmp holds ST_TILE * (shard rows) floats. Rows
 * the file does not hold (wte's padding) are zero. */
static int st_read_shard(const mt_gpt_config *c, const mt_st_file *f, const mt_st_tensor *t,
                         const mt_param *p, float *dst, float *tmp) {
  int transposed;
  size_t file_rows, R = p->full[0], C = p->ndim == 2 ? p->full[1] : 1;
  st_file_layout(c, p, &transposed, &file_rows);
  st_rect rects[3];
  int n = st_shard_rects(p, rects);
  for (int k = 0; k < n; k++) {
    const st_rect *q = &rects[k];
    if (!transposed) {
      for (size_t i = 0; i < q->nr; i++) {
        float *row = dst + (q->at + i) * q->nc;
        size_t r = q->r0 + i;
        int rc = r < file_rows ? mt_st_read_range_f32(f, t, r * C + q->c0, q->nc, row) : 0;
        if (rc) return rc;
        if (r >= file_rows) memset(row, 0, q->nc * sizeof *row);
      }
      continue;
    }
    /* the file's rows are our columns: ST_TILE of them at a time */
    for (size_t c0 = 0; c0 < q->nc; c0 += ST_TILE) {
      size_t kc = q->nc - c0 < ST_TILE ? q->nc - c0 : ST_TILE;
      for (size_t j = 0; j < kc; j++) {
        int rc = mt_st_read_range_f32(f, t, (q->c0 + c0 + j) * R + q->r0, q->nr, tmp + j * q->nr);
        if (rc) return rc;
      }
      for (size_t i = 0; i < q->nr; i++)
        for (size_t j = 0; j < kc; j++) dst[(q->at + i) * q->nc + c0 + j] = tmp[j * q->nr + i];
    }
  }
  return 0;
}

/* Shard p (our layout) into hf, the whole tensor in the file's layout;
 * returns the number of the file's elements it filled. */
static size_t st_place_shard(const mt_gpt_config *c, const mt_param *p, const float *src,
                             float *hf) {
  int transposed;
  size_t file_rows, R = p->full[0], C = p->ndim == 2 ? p->full[1] : 1, placed = 0;
  st_file_layout(c, p, &transposed, &file_rows);
  st_rect rects[3];
  int n = st_shard_rects(p, rects);
  for (int k = 0; k < n; k++) {
    const st_rect *q = &rects[k];
    for (size_t i = 0; i < q->nr && !transposed; i++)
      if (q->r0 + i < file_rows) {
        memcpy(hf + (q->r0 + i) * C + q->c0, src + (q->at + i) * q->nc, q->nc * sizeof *hf);
        placed += q->nc;
      }
    if (!transposed) continue;
    for (size_t c0 = 0; c0 < q->nc; c0 += 64) {
      size_t kc = q->nc - c0 < 64 ? q->nc - c0 : 64;
      for (size_t i = 0; i < q->nr; i++)
        for (size_t j = 0; j < kc; j++)
          hf[(q->c0 + c0 + j) * R + q->r0 + i] = src[(q->at + i) * q->nc + c0 + j];
    }
    placed += q->nr * q->nc;
  }
  return placed;
}

static void st_fmt_shape(char *buf, size_t cap, int ndim, const int64_t *shape) {
  size_t k = (size_t)snprintf(buf, cap, "(");
  for (int i = 0; i < ndim && k < cap; i++)
    k += (size_t)snprintf(buf + k, cap - k, "%s%lld", i ? ", " : "", (long long)shape[i]);
  if (k < cap) snprintf(buf + k, cap - k, ")");
}

/* Accumulates "; "-separated problems so one error names all of them. */
typedef struct st_problems {
  char text[ST_PROBLEMS_MAX];
  size_t len;
  int count;
} st_problems;

static void st_problem(st_problems *p, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void st_problem(st_problems *p, const char *fmt, ...) {
  p->count++;
  if (p->len >= sizeof p->text - 1) return;
  if (p->len) p->len += (size_t)snprintf(p->text + p->len, sizeof p->text - p->len, "; ");
  if (p->len >= sizeof p->text - 1) return;
  va_list ap;
  va_start(ap, fmt);
  p->len += (size_t)vsnprintf(p->text + p->len, sizeof p->text - p->len, fmt, ap);
  va_end(ap);
  if (p->len > sizeof p->text - 1) p->len = sizeof p->text - 1;
}

/* The files of a model: path itself, or the ones a Hugging Face index
 * names (path is the index, or a directory holding
 * model.safetensors.index.json), each opened; *files owned (mt_st_close
 * each, free). The index's weight_map must name each tensor's file right. */
static int st_open_model(const char *path, mt_st_file **files, int *n_files) {
  struct stat st;
  char index[4096], dir[4096];
  size_t len = strlen(path);
  int rc = 0;
  *files = NULL, *n_files = 0;
  if (!stat(path, &st) && S_ISDIR(st.st_mode)) {
    snprintf(dir, sizeof dir, "%s", path);
    snprintf(index, sizeof index, "%s/%s", path, ST_INDEX_NAME);
  } else if (len > 11 && !strcmp(path + len - 11, ".index.json")) {
    snprintf(index, sizeof index, "%s", path);
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash)
      *slash = 0;
    else
      snprintf(dir, sizeof dir, ".");
  } else {
    if (!(*files = calloc(1, sizeof **files)))
      return mt_seterr(MT_ENOMEM, "safetensors: load %s", path);
    if ((rc = mt_st_open(*files, path))) {
      free(*files);
      *files = NULL;
      return rc;
    }
    *n_files = 1;
    return 0;
  }
  json_error_t jerr;
  json_t *root = json_load_file(index, JSON_REJECT_DUPLICATES, &jerr);
  json_t *map = root ? json_object_get(root, "weight_map") : NULL;
  if (!root)
    return mt_seterr(access(index, F_OK) ? MT_ENOENT : MT_EINVAL, "safetensors: load %s: %s", index,
                     jerr.text);
  if (!json_is_object(map) || !json_object_size(map)) {
    json_decref(root);
    return mt_seterr(MT_EINVAL, "safetensors: load %s: no \"weight_map\" object", index);
  }
  /* the distinct files, in the order first named */
  const char **names = calloc(json_object_size(map), sizeof *names);
  *files = calloc(json_object_size(map), sizeof **files);
  if (!names || !*files) rc = mt_seterr(MT_ENOMEM, "safetensors: load %s", index);
  const char *key;
  json_t *v;
  json_object_foreach(map, key, v) {
    const char *file = json_string_value(v);
    if (rc) break;
    if (!file || !*file || strchr(file, '/') || !strcmp(file, "..") || !strcmp(file, ".")) {
      rc = mt_seterr(MT_EINVAL,
                     "safetensors: load %s: tensor %s: file \"%s\" is not a file name "
                     "beside the index",
                     index, key, file ? file : "(not a string)");
      break;
    }
    int k = 0;
    while (k < *n_files && strcmp(names[k], file)) k++;
    if (k == *n_files) {
      char fp[8192];
      snprintf(fp, sizeof fp, "%s/%s", dir, file);
      names[k] = file;
      if ((rc = mt_st_open(&(*files)[k], fp))) break;
      (*n_files)++;
    }
    if (!mt_st_find(&(*files)[k], key))
      rc = mt_seterr(MT_EINVAL,
                     "safetensors: load %s: the index puts tensor %s in %s, which "
                     "does not hold it",
                     index, key, file);
  }
  free(names);
  json_decref(root);
  if (rc) {
    for (int k = 0; k < *n_files; k++) mt_st_close(&(*files)[k]);
    free(*files);
    *files = NULL, *n_files = 0;
  }
  return rc;
}

/* An int from a string (metadata) or a number (config.json); -1 if neither. */
static long st_json_int(const json_t *v) {
  if (json_is_integer(v)) return (long)json_integer_value(v);
  const char *s = json_string_value(v);
  char *end;
  long x = s && *s ? strtol(s, &end, 10) : -1;
  return s && *s && !*end ? x : -1;
}

/* Hugging Face's config.json of the model at path: beside a file, in a
 * directory. */
static void st_config_json_path(const char *path, char *buf, size_t cap) {
  snprintf(buf, cap, "%s", path);
  struct stat st;
  if (stat(path, &st) || !S_ISDIR(st.st_mode)) {
    char *slash = strrchr(buf, '/');
    if (slash)
      *slash = 0;
    else
      snprintf(buf, cap, ".");
  }
  snprintf(buf + strlen(buf), cap - strlen(buf), "/config.json");
}

/* Whether the model at path (its files opened) has an untied head: an
 * lm_head.weight that the model says is its own, not wte's copy (an
 * mtnlg export's metadata "tie_word_embeddings": "false", or Hugging
 * Face's config.json beside it, whose default is tied). transformers
 * writes a tied model's lm_head.weight at times: that is wte again. */
static int st_untied(const mt_st_file *files, int n_files, const char *path) {
  int head = 0, said = -1; /* said: 1 untied, 0 tied, -1 not said */
  for (int k = 0; k < n_files; k++) {
    for (int i = 0; i < files[k].n; i++) {
      const char *name = files[k].tensors[i].name;
      head |= !strcmp(strncmp(name, "transformer.", 12) ? name : name + 12, "lm_head.weight");
    }
    /* Python writers say "False" and "True" too; another value says nothing */
    const char *v = json_string_value(json_object_get(files[k].meta, "tie_word_embeddings"));
    if (v && said < 0) said = !strcasecmp(v, "false") ? 1 : !strcasecmp(v, "true") ? 0 : -1;
  }
  if (!head) return 0;
  if (said >= 0) return said;
  char cfg_path[4096];
  st_config_json_path(path, cfg_path, sizeof cfg_path);
  json_t *hf = json_load_file(cfg_path, 0, NULL);
  int untied = json_is_false(json_object_get(hf, "tie_word_embeddings"));
  json_decref(hf);
  return untied;
}

int mt_gpt_config_of_file(const char *path, mt_gpt_config *c) {
  mt_st_file *files = NULL;
  int n_files = 0, rc = st_open_model(path, &files, &n_files);
  if (rc) return rc;
  memset(c, 0, sizeof *c);
  c->ln_eps = 1e-5f;
  c->init_std = 0.02f;
  long n_head = -1;
  int have_eps = 0;
  int64_t wte[2] = {0, 0}, wpe[2] = {0, 0};
  for (int k = 0; k < n_files; k++) {
    for (int i = 0; i < files[k].n; i++) {
      const mt_st_tensor *t = &files[k].tensors[i];
      const char *name = strncmp(t->name, "transformer.", 12) ? t->name : t->name + 12;
      int64_t *dst = !strcmp(name, "wte.weight") ? wte : !strcmp(name, "wpe.weight") ? wpe : NULL;
      if (dst && t->ndim == 2) dst[0] = t->shape[0], dst[1] = t->shape[1];
      if (!strncmp(name, "h.", 2) && st_ends_with(name, ".ln_1.weight")) {
        long l = strtol(name + 2, NULL, 10);
        if (l + 1 > c->n_layer && l < 100000) c->n_layer = (int)l + 1;
      }
    }
    if (n_head < 0) n_head = st_json_int(json_object_get(files[k].meta, "n_head"));
    const char *eps = json_string_value(json_object_get(files[k].meta, "layer_norm_epsilon"));
    char *end;
    double e = eps ? strtod(eps, &end) : 0.0;
    if (eps && !*end && e > 0 && isfinite(e)) c->ln_eps = (float)e, have_eps = 1;
  }
  c->untie_embeddings = st_untied(files, n_files, path);
  for (int k = 0; k < n_files; k++) mt_st_close(&files[k]);
  free(files);
  /* Hugging Face keeps the heads in config.json beside the weights */
  char cfg_path[4096];
  st_config_json_path(path, cfg_path, sizeof cfg_path);
  json_t *hf = n_head < 0 || !have_eps ? json_load_file(cfg_path, 0, NULL) : NULL;
  if (hf) {
    if (n_head < 0) n_head = st_json_int(json_object_get(hf, "n_head"));
    double eps = json_number_value(json_object_get(hf, "layer_norm_epsilon"));
    if (!have_eps && eps > 0 && isfinite(eps)) c->ln_eps = (float)eps;
    json_decref(hf);
  }
  if (!wte[0] || !wpe[0] || !c->n_layer || wte[1] != wpe[1])
    return mt_seterr(MT_EINVAL, "safetensors: %s is not a GPT-2 model: %s", path,
                     !wte[0]       ? "no 2-D wte.weight"
                     : !wpe[0]     ? "no 2-D wpe.weight"
                     : !c->n_layer ? "no block h.0"
                                   : "wte and wpe differ in width");
  if (n_head < 1 || wte[1] % n_head)
    return mt_seterr(MT_EINVAL,
                     "safetensors: %s: the number of heads is in neither the file's metadata "
                     "(\"n_head\") nor %s, or does not divide the width %lld",
                     path, cfg_path, (long long)wte[1]);
  c->n_head = (int)n_head;
  c->n_embd = (int)wte[1];
  c->vocab_size = (int)wte[0];
  c->padded_vocab = (c->vocab_size + 127) / 128 * 128;
  c->max_seq = (int)wpe[0];
  return 0;
}

/* Validates every name and shape first (collecting all problems), then copies,
 * so a refused file leaves the model untouched. */
/* Whether the file's tensor t fits table entry j: its shape, a dtype we read. */
static void st_check_tensor(const mt_gpt *m, st_problems *pr, int j, const mt_st_tensor *t) {
  int64_t want[2];
  int wnd = st_hf_shape(&m->cfg, &m->params_table[j], want);
  int same = t->ndim == wnd;
  for (int d = 0; same && d < wnd; d++) same = t->shape[d] == want[d];
  if (!same) {
    char got_s[96], want_s[64];
    st_fmt_shape(got_s, sizeof got_s, t->ndim, t->shape);
    st_fmt_shape(want_s, sizeof want_s, wnd, want);
    st_problem(pr, "tensor \"%s\" has shape %s, want %s", t->name, got_s, want_s);
  }
  if (strcmp(t->dtype, "F32") && strcmp(t->dtype, "F16") && strcmp(t->dtype, "BF16") &&
      strcmp(t->dtype, "F64"))
    st_problem(pr, "tensor \"%s\" has dtype %s (want F32, F16, BF16 or F64)", t->name, t->dtype);
}

int mt_gpt_load_safetensors(mt_gpt *m, const char *path) {
  mt_st_file *files = NULL;
  int n_files = 0;
  int rc = st_open_model(path, &files, &n_files);
  if (rc) return rc;
  /* the shapes must agree; an epsilon the file was trained with is worth a word */
  const char *eps = json_string_value(json_object_get(files[0].meta, "layer_norm_epsilon"));
  double e = eps ? strtod(eps, NULL) : 0.0;
  if (e > 0 && m->cfg.ln_eps > 0 && fabs(e - m->cfg.ln_eps) > 1e-6 * e)
    mt_log_warn("%s was trained with LayerNorm epsilon %s; this model uses %g (model.ln_eps)", path,
                eps, (double)m->cfg.ln_eps);
  const mt_st_tensor **src = calloc((size_t)m->n_tensors, sizeof *src);
  const mt_st_file **src_file = calloc((size_t)m->n_tensors, sizeof *src_file);
  float *stage = NULL, *tbuf = NULL;
  st_problems *pr = calloc(1, sizeof *pr);
  mt_param *whole = NULL; /* a pipeline stage skips the other stages' tensors */
  int n_whole = 0;
  if (!src || !src_file || !pr) {
    rc = mt_seterr(MT_ENOMEM, "safetensors: load %s: out of memory", path);
    goto done;
  }
  if (!(m->first && m->last)) {
    mt_gpt_config full = m->cfg;
    mt_gpt_set_stage(&full, 1, 0, 1);
    size_t count;
    if ((rc = mt_gpt_table(&full, &whole, &n_whole, &count))) goto done;
  }

  /* the head: a tied model reads wte, an untied one its own lm_head; an
   * untied model from a tied file (the usual way to untie GPT-2 for
   * fine-tuning) starts its lm_head as a copy of the file's wte, and a
   * tied model is no place for a file's own lm_head */
  int untie = m->cfg.untie_embeddings, file_untied = st_untied(files, n_files, path);
  int head_from_wte = untie && !file_untied;
  if (head_from_wte && m->last)
    mt_log_info("%s: the file's embeddings are tied: lm_head.weight (model.untie_embeddings) "
                "starts as a copy of its wte.weight",
                path);
  if (!untie && file_untied)
    st_problem(pr, "the file's lm_head.weight is an output layer of its own (tie_word_embeddings "
                   "false), the job's model ties it to wte: set model.untie_embeddings");
  for (int k = 0; k < n_files; k++)
    for (int i = 0; i < files[k].n; i++) {
      const mt_st_file *fk = &files[k];
      const mt_st_tensor *t = &fk->tensors[i];
      const char *name = t->name;
      if (!strncmp(name, "transformer.", 12)) name += 12;
      if (st_is_ignored(name)) continue;
      if (!strcmp(name, "lm_head.weight") && untie != file_untied) continue; /* said above */
      if (!strcmp(name, "lm_head.weight") && !untie) continue; /* a tied copy of wte */
      if (head_from_wte && m->last && !strcmp(name, "wte.weight")) {
        int h = m->i_head; /* checked as the file's wte below, or here where it is no
                            * tensor of this stage's */
        if (!src[h] && mt_gpt_find(m, name) < 0) st_check_tensor(m, pr, h, t);
        src[h] = src[h] ? src[h] : t;
        src_file[h] = src_file[h] ? src_file[h] : fk;
      }
      int j = mt_gpt_find(m, name);
      if (j < 0 && mt_param_find(whole, n_whole, name) >= 0) continue; /* another stage's */
      if (j < 0) {
        st_problem(pr, "unexpected tensor \"%s\"", t->name);
        continue;
      }
      if (src[j]) {
        st_problem(pr, "tensor \"%s\" appears twice (\"%s\" and \"%s\")", name, src[j]->name,
                   t->name);
        continue;
      }
      src[j] = t;
      src_file[j] = fk;
      st_check_tensor(m, pr, j, t);
    }
  for (int j = 0; j < m->n_tensors; j++)
    if (!src[j])
      st_problem(pr, "missing tensor \"%s\"%s", m->params_table[j].name,
                 head_from_wte && j == m->i_head ? " (nor a wte.weight to copy it from)" : "");
  /* shapes do not tell every model apart: n_head splits the same matrices
   * another way, and a vocabulary within one padding step pads alike. A
   * file that says its model (mtnlg writes these; Hugging Face's say only
   * "format") must say this one's. */
  const struct {
    const char *key;
    int want;
  } arch[] = {{"n_layer", m->cfg.n_layer},
              {"n_embd", m->cfg.n_embd},
              {"n_head", m->cfg.n_head},
              {"vocab_size", m->cfg.vocab_size}};
  for (int i = 0; i < n_files; i++)
    for (size_t k = 0; files[i].meta && k < sizeof arch / sizeof *arch; k++) {
      const char *v = json_string_value(json_object_get(files[i].meta, arch[k].key));
      char *end;
      long got = v ? strtol(v, &end, 10) : 0;
      if (v && (*end || end == v || got != arch[k].want))
        st_problem(pr, "__metadata__ says %s %s, the job's model has %d", arch[k].key, v,
                   arch[k].want);
    }
  if (pr->count) {
    rc = mt_seterr(MT_EINVAL, "safetensors: load %s: %d problem%s: %s", path, pr->count,
                   pr->count == 1 ? "" : "s", pr->text);
    goto done;
  }

  /* one tensor of the shard at a time: a shard reads its own slices of
   * the file (mapped, so shards on one node share its pages) */
  size_t max_numel = 0, max_rows = 0;
  for (int j = 0; j < m->n_tensors; j++) {
    const mt_param *p = &m->params_table[j];
    if (p->numel > max_numel) max_numel = p->numel;
    if (p->shape[0] > max_rows) max_rows = p->shape[0];
  }
  stage = malloc(max_numel * sizeof *stage);
  tbuf = malloc(ST_TILE * max_rows * sizeof *tbuf);
  if (!stage || !tbuf) {
    rc = mt_seterr(MT_ENOMEM, "safetensors: load %s: out of memory (%zu floats)", path, max_numel);
    goto done;
  }
  for (int j = 0; j < m->n_tensors; j++) {
    const mt_param *p = &m->params_table[j];
    if ((rc = st_read_shard(&m->cfg, src_file[j], src[j], p, stage, tbuf))) {
      mt_wraperr(rc, "safetensors: load %s", path);
      goto done;
    }
    if ((rc = mt_device_memcpy_htod(m->dev, mt_gpt_param(m, j), stage, p->numel * sizeof(float)))) {
      mt_wraperr(rc, "safetensors: load %s: tensor %s", path, p->name);
      goto done;
    }
  }
  rc = mt_device_sync(m->dev);

done:
  free(whole);
  free(stage);
  free(tbuf);
  free(pr);
  free(src);
  free(src_file);
  for (int k = 0; k < n_files; k++) mt_st_close(&files[k]);
  free(files);
  return rc;
}

/* ---- export: a whole model written one tensor at a time ------------------ */

struct mt_gpt_export {
  mt_gpt_config cfg; /* the whole model's: no stage, no tp shards */
  mt_param *table;   /* its tensors, in the file's order */
  int n, next;       /* tensors; the one being filled */
  int *stage_of;     /* tensor i is in pipeline stage stage_of[i] */
  int part;          /* -1: every tensor is written here, else stage part's */
  mt_st_dtype dtype; /* what the files store */
  int no_config;     /* no config.json (gradients) */
  float *hf;         /* that tensor in the file's layout */
  size_t placed;     /* of its elements, filled so far */
  /* one file, or Hugging Face's sharded layout in directory `dir`:
   * model-<k>-of-<n>.safetensors, tensors in order, a new file where the
   * next tensor would pass max_bytes, and model.safetensors.index.json */
  int n_files, *file_of; /* tensor i is in file file_of[i] */
  mt_st_writer **w;      /* file k's, begun when its first tensor is due */
  char *dir;             /* NULL: one file at path */
  char *path;
};

/* The whole tensor's elements in the file (wte without its padding). */
static size_t st_file_numel(const mt_gpt_config *c, const mt_param *p) {
  int64_t shape[2];
  int nd = st_hf_shape(c, p, shape);
  return (size_t)shape[0] * (nd == 2 ? (size_t)shape[1] : 1);
}

/* File k's path: the one file, or <dir>/model-<k+1>-of-<n>.safetensors. */
static void st_shard_path(const mt_gpt_export *e, int k, char *buf, size_t cap) {
  if (!e->dir)
    snprintf(buf, cap, "%s", e->path);
  else
    snprintf(buf, cap, "%s/model-%05d-of-%05d.safetensors", e->dir, k + 1, e->n_files);
}

/* Tensor i's name in the files: a tied model's as before, without
 * Hugging Face's "transformer." prefix (GPT2LMHeadModel's from_pretrained
 * maps such a state dict onto its base model, transformer); an untied
 * one's as GPT2LMHeadModel's own state dict names it, the base model's
 * tensors as transformer.<name> and the head beside it as lm_head.weight
 * (an unprefixed file with a top-level lm_head.weight is neither layout:
 * transformers would prefix every key and leave lm_head random). mtnlg's
 * loader takes both. */
static const char *st_file_name(const mt_gpt_export *e, int i, char *buf, size_t cap) {
  const char *name = e->table[i].name;
  if (!e->cfg.untie_embeddings || !strcmp(name, "lm_head.weight")) return name;
  snprintf(buf, cap, "transformer.%s", name);
  return buf;
}

/* A writer for file k: its tensors declared, the model's metadata. */
static int st_new_writer(mt_gpt_export *e, int k) {
  mt_st_writer *w = mt_st_writer_new();
  if (!w) return MT_ENOMEM; /* its message is set */
  e->w[k] = w;
  char num[32];
  const struct {
    const char *key;
    int value;
  } meta[] = {{"n_layer", e->cfg.n_layer},
              {"n_embd", e->cfg.n_embd},
              {"n_head", e->cfg.n_head},
              {"vocab_size", e->cfg.vocab_size},
              {"seq", e->cfg.max_seq}};
  int rc = mt_st_writer_dtype(w, e->dtype);
  if (!rc) rc = mt_st_writer_meta(w, "format", "pt");
  for (size_t m = 0; m < sizeof meta / sizeof meta[0] && !rc; m++) {
    snprintf(num, sizeof num, "%d", meta[m].value);
    rc = mt_st_writer_meta(w, meta[m].key, num);
  }
  /* Hugging Face's name for it (config.json's); the shapes say the rest */
  snprintf(num, sizeof num, "%.9g", e->cfg.ln_eps > 0 ? e->cfg.ln_eps : 1e-5f);
  if (!rc) rc = mt_st_writer_meta(w, "layer_norm_epsilon", num);
  /* only untied (config.json's name): a tied export's header is as before */
  if (!rc && e->cfg.untie_embeddings) rc = mt_st_writer_meta(w, "tie_word_embeddings", "false");
  for (int i = 0; i < e->n && !rc; i++) {
    if (e->file_of[i] != k) continue;
    int64_t shape[2];
    int nd = st_hf_shape(&e->cfg, &e->table[i], shape);
    char name[128];
    rc = mt_st_writer_add(w, st_file_name(e, i, name, sizeof name), nd, shape, NULL);
  }
  return rc;
}

/* The stage of each of the whole model's tensors (table order: wte and
 * wpe, the blocks, ln_f, an untied lm_head): a block's is the stage its layer begins in;
 * before the first block stage 0, after the last the last stage. */
static void st_stages(mt_gpt_export *e, const mt_gpt_export_plan *plan) {
  int pp = plan->pp > 1 && plan->stage_begin ? plan->pp : 1, blocks = 0;
  for (int i = 0; i < e->n; i++) {
    int layer = e->table[i].layer, s = 0;
    if (layer >= 0) {
      blocks = 1;
      while (s + 1 < pp && plan->stage_begin[s + 1] <= layer) s++;
    } else if (blocks) {
      s = pp - 1;
    }
    e->stage_of[i] = s;
  }
}

/* Whether name is one of the sharded layout's files, model-NNNNN-of-NNNNN.safetensors. */
static int st_is_shard_name(const char *name) {
  if (strlen(name) != 32 || strncmp(name, "model-", 6) || strncmp(name + 11, "-of-", 4) ||
      strcmp(name + 20, ".safetensors"))
    return 0;
  for (int i = 0; i < 5; i++)
    if (!isdigit((unsigned char)name[6 + i]) || !isdigit((unsigned char)name[15 + i])) return 0;
  return 1;
}

int mt_gpt_export_prepare_dir(const char *dir) {
  char index[4096];
  struct stat st;
  snprintf(index, sizeof index, "%s/%s", dir, ST_INDEX_NAME);
  if (stat(dir, &st) && errno == ENOENT && mkdir(dir, 0755) && errno != EEXIST)
    return mt_seterr(MT_EIO, "safetensors: export: mkdir %s: %s", dir, strerror(errno));
  if (stat(dir, &st) || !S_ISDIR(st.st_mode))
    return mt_seterr(MT_EINVAL, "safetensors: export: %s is not a directory", dir);
  if (unlink(index) && errno != ENOENT)
    return mt_seterr(MT_EIO, "safetensors: export: remove %s: %s", index, strerror(errno));
  /* an earlier export's files go too (as Hugging Face's save_pretrained
   * removes them): none can pass for one of this export's */
  DIR *d = opendir(dir);
  if (!d) return mt_seterr(MT_EIO, "safetensors: export: read %s: %s", dir, strerror(errno));
  int rc = 0;
  for (struct dirent *de; !rc && (de = readdir(d));) {
    if (!st_is_shard_name(de->d_name)) continue;
    char old[4096 + 64];
    struct stat os;
    snprintf(old, sizeof old, "%s/%s", dir, de->d_name);
    if (lstat(old, &os) || !S_ISREG(os.st_mode)) continue; /* a file only: not what a user put */
    if (unlink(old) && errno != ENOENT)
      rc =
          mt_seterr(MT_EIO, "safetensors: export: remove the earlier %s: %s", old, strerror(errno));
  }
  closedir(d);
  return rc ? rc : mt_fsync_parent_dir(index);
}

/* The first tensor from i on that this exporter writes (e->n: none). */
static int st_due_from(const mt_gpt_export *e, int i) {
  while (i < e->n && e->part >= 0 && e->stage_of[i] != e->part) i++;
  return i;
}

int mt_gpt_export_open_sharded(mt_gpt_export **out, const mt_gpt_config *cfg, const char *path,
                               const mt_gpt_export_plan *plan) {
  *out = NULL;
  const char *dir = plan->dir, *what = dir ? dir : path;
  uint64_t max_bytes = plan->max_bytes ? plan->max_bytes : MT_ST_SHARD_BYTES;
  mt_gpt_export *e = calloc(1, sizeof *e);
  if (!e) return mt_seterr(MT_ENOMEM, "safetensors: export %s: out of memory", what);
  e->cfg = *cfg;
  mt_gpt_set_stage(&e->cfg, 1, 0, 1);
  e->cfg.tp_size = 1, e->cfg.tp_rank = 0;
  e->part = plan->part;
  e->dtype = plan->dtype;
  size_t count, max_numel = 0,
                eb = st_export_dtypes[(unsigned)e->dtype <= MT_ST_FP16 ? e->dtype : 0].bytes;
  int rc = mt_gpt_table(&e->cfg, &e->table, &e->n, &count);
  if (!rc && (!(e->file_of = calloc((size_t)e->n + 1, sizeof *e->file_of)) ||
              !(e->stage_of = calloc((size_t)e->n + 1, sizeof *e->stage_of)) ||
              !(e->path = strdup(what)) || (dir && !(e->dir = strdup(dir)))))
    rc = mt_seterr(MT_ENOMEM, "safetensors: export %s: out of memory", what);
  if (!rc) st_stages(e, plan);
  if (!rc && (unsigned)e->dtype > MT_ST_FP16)
    rc = mt_seterr(MT_EINVAL, "safetensors: export %s: dtype %d is not fp32, bf16 or fp16", what,
                   (int)e->dtype);
  if (!rc && e->part >= 0 && (!dir || e->part >= (plan->pp > 1 ? plan->pp : 1)))
    rc = mt_seterr(MT_EINVAL, "safetensors: export %s: part %d of %d stages%s", what, e->part,
                   plan->pp, dir ? "" : " (parts are written to a directory)");
  /* tensors to files in order: a file closes where the next tensor would
   * take it past max_bytes (a tensor larger than that has one of its own)
   * or belongs to the next stage */
  uint64_t in_file = 0;
  e->n_files = 1;
  for (int i = 0; i < e->n && !rc; i++) {
    uint64_t bytes = (uint64_t)st_file_numel(&e->cfg, &e->table[i]) * eb;
    int new_stage = i > 0 && e->stage_of[i] != e->stage_of[i - 1];
    if (dir && in_file && (in_file + bytes > max_bytes || new_stage)) e->n_files++, in_file = 0;
    e->file_of[i] = e->n_files - 1;
    in_file += bytes;
    if (st_file_numel(&e->cfg, &e->table[i]) > max_numel)
      max_numel = st_file_numel(&e->cfg, &e->table[i]);
  }
  if (!rc) e->next = st_due_from(e, 0);
  if (!rc && !(e->w = calloc((size_t)e->n_files, sizeof *e->w)))
    rc = mt_seterr(MT_ENOMEM, "safetensors: export %s: out of memory", what);
  if (!rc && !(e->hf = malloc((max_numel ? max_numel : 1) * sizeof *e->hf)))
    rc = mt_seterr(MT_ENOMEM, "safetensors: export %s: a buffer of %zu floats", what, max_numel);
  if (!rc && dir && e->part < 0) rc = mt_gpt_export_prepare_dir(dir);
  if (rc) {
    mt_gpt_export_free(e);
    return rc;
  }
  *out = e;
  return 0;
}

int mt_st_names_a_directory(const char *path) {
  struct stat st;
  size_t n = strlen(path);
  return (n && path[n - 1] == '/') || (!stat(path, &st) && S_ISDIR(st.st_mode));
}

int mt_st_export_dir(const char *path, char *dir, size_t cap) {
  snprintf(dir, cap, "%s", path);
  for (size_t k = strlen(dir); k > 1 && dir[k - 1] == '/'; k--) dir[k - 1] = 0;
  return mt_st_names_a_directory(path);
}

int mt_gpt_export_open(mt_gpt_export **out, const mt_gpt_config *cfg, const char *path) {
  char dir[4096];
  mt_gpt_export_plan plan = {.part = -1};
  if (mt_st_export_dir(path, dir, sizeof dir)) plan.dir = dir;
  return mt_gpt_export_open_sharded(out, cfg, plan.dir ? NULL : path, &plan);
}

const mt_param *mt_gpt_export_tensor(const mt_gpt_export *e) {
  return e->next < e->n ? &e->table[e->next] : NULL;
}

int mt_gpt_export_put(mt_gpt_export *e, const mt_param *p, const float *data) {
  const mt_param *t = mt_gpt_export_tensor(e);
  if (!t) return mt_seterr(MT_EINVAL, "safetensors: export: %s after the last tensor", p->name);
  if (strcmp(t->name, p->name) || t->full[0] != p->full[0] ||
      (t->ndim == 2 && t->full[1] != p->full[1]))
    return mt_seterr(MT_EINVAL, "safetensors: export: %s given where %s is due", p->name, t->name);
  e->placed += st_place_shard(&e->cfg, p, data, e->hf);
  if (e->placed > st_file_numel(&e->cfg, t))
    return mt_seterr(MT_EINVAL, "safetensors: export: %s given more than once", t->name);
  return 0;
}

int mt_gpt_export_next(mt_gpt_export *e) {
  const mt_param *t = mt_gpt_export_tensor(e);
  if (!t) return mt_seterr(MT_EINVAL, "safetensors: export: every tensor is written");
  size_t want = st_file_numel(&e->cfg, t);
  if (e->placed < want)
    return mt_seterr(MT_EINVAL, "safetensors: export: tensor %s has %zu of its %zu elements",
                     t->name, e->placed, want);
  int k = e->file_of[e->next], rc = 0;
  char path[4096];
  if (!e->w[k]) { /* the file's first tensor: its header goes out now */
    st_shard_path(e, k, path, sizeof path);
    if (!(rc = st_new_writer(e, k))) rc = mt_st_writer_begin(e->w[k], path);
  }
  if (!rc) rc = mt_st_writer_append(e->w[k], e->hf, want);
  /* its last tensor: the file is committed (durable, under its name) */
  if (!rc && (e->next + 1 == e->n || e->file_of[e->next + 1] != k)) rc = mt_st_writer_end(e->w[k]);
  if (rc) return rc;
  e->next = st_due_from(e, e->next + 1);
  e->placed = 0;
  return 0;
}

/* A float as the shortest decimal that reads back as it (1e-05, not
 * 9.99999975e-06), for a JSON file a person reads. */
static json_t *st_json_float(float f) {
  char buf[32];
  for (int prec = 6; prec <= 9; prec++) {
    snprintf(buf, sizeof buf, "%.*g", prec, (double)f);
    if ((float)strtod(buf, NULL) == f) break;
  }
  return json_real(strtod(buf, NULL));
}

/* Hugging Face's GPT2Config of the exported model, as transformers names
 * its fields. vocab_size is the file's wte rows (the real vocabulary: the
 * padding is not exported); GeLU is the tanh approximation (mt_gelu),
 * transformers' "gelu_new"; the GPT-2 BPE's <|endoftext|> (50256) is the
 * bos and eos of a model with that vocabulary. weights: the single file it
 * describes ("mtnlg_weights"), or NULL in a directory. */
static json_t *st_hf_config(const mt_gpt_export *e, const char *weights) {
  const mt_gpt_config *c = &e->cfg;
  json_t *eos = c->vocab_size > 50256 ? json_integer(50256) : json_null();
  json_t *j = json_pack(
      "{s:[s], s:s, s:i, s:i, s:i, s:i, s:i, s:i, s:n, s:s, s:o, s:o, s:o, s:o, s:o, s:b, s:s, "
      "s:O, s:o}",
      "architectures", "GPT2LMHeadModel", "model_type", "gpt2", "vocab_size", c->vocab_size,
      "n_positions", c->max_seq, "n_ctx", c->max_seq, "n_embd", c->n_embd, "n_layer", c->n_layer,
      "n_head", c->n_head, "n_inner", "activation_function", "gelu_new", "layer_norm_epsilon",
      st_json_float(c->ln_eps > 0 ? c->ln_eps : 1e-5f), "initializer_range",
      st_json_float(c->init_std), "resid_pdrop", st_json_float(c->hidden_dropout), "embd_pdrop",
      st_json_float(c->hidden_dropout), "attn_pdrop", st_json_float(c->attention_dropout),
      "tie_word_embeddings", !c->untie_embeddings, "torch_dtype", st_export_dtypes[e->dtype].torch,
      "bos_token_id", eos, "eos_token_id", eos);
  if (j && weights) json_object_set_new(j, "mtnlg_weights", json_string(weights));
  return j;
}

/* <dir>/config.json (durable), describing this export; weights as in
 * st_hf_config. */
static int st_write_config(const mt_gpt_export *e, const char *dir, const char *weights) {
  char path[4096 + 16];
  json_t *j = st_hf_config(e, weights);
  char *text =
      j ? json_dumps(j, JSON_INDENT(2) | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(9)) : NULL;
  json_decref(j);
  if (!text) return mt_seterr(MT_ENOMEM, "safetensors: export %s: config.json", e->path);
  snprintf(path, sizeof path, "%s/config.json", dir);
  size_t len = strlen(text);
  text[len] = '\n'; /* jansson's buffer has the terminator's byte to spare */
  int rc = mt_atomic_write_file(path, text, len + 1);
  free(text);
  return rc ? mt_wraperr(rc, "safetensors: export: config.json") : 0;
}

/* A directory export's config.json: the directory's own. */
static int st_write_hf_config(const mt_gpt_export *e, const char *dir) {
  return st_write_config(e, dir, NULL);
}

/* A single file's config.json beside it: where there is none, or the one
 * there is an earlier export's of a file of this name. Another's (a
 * Hugging Face model's, or an export's of another file) is kept, said at
 * info level (exports of several files into one directory are common, and
 * the export's own metadata says its model to mtnlg either way). */
static int st_config_beside_file(const mt_gpt_export *e) {
  char dir[4096], cfg[4096 + 16];
  snprintf(dir, sizeof dir, "%s", e->path);
  char *slash = strrchr(dir, '/');
  const char *base = strrchr(e->path, '/') ? strrchr(e->path, '/') + 1 : e->path;
  if (!slash)
    snprintf(dir, sizeof dir, ".");
  else if (slash == dir)
    dir[1] = 0;
  else
    *slash = 0;
  snprintf(cfg, sizeof cfg, "%s/config.json", dir);
  struct stat st;
  if (!lstat(cfg, &st)) {
    json_t *old = S_ISREG(st.st_mode) ? json_load_file(cfg, 0, NULL) : NULL;
    const char *of = json_string_value(json_object_get(old, "mtnlg_weights"));
    int ours = of && !strcmp(of, base);
    json_decref(old);
    if (!ours) {
      mt_log_info("export %s: no config.json written: %s is another model's or another "
                  "file's; an export to a directory (DIR/) has a config.json of its own",
                  e->path, cfg);
      return 0;
    }
  } else if (errno != ENOENT) {
    return mt_seterr(MT_EIO, "safetensors: export %s: %s: %s", e->path, cfg, strerror(errno));
  }
  return st_write_config(e, dir, base);
}

/* <dir>/model.safetensors.index.json, durably: what Hugging Face reads. */
int mt_gpt_export_write_index(const mt_gpt_export *e) {
  if (!e->dir)
    return mt_seterr(MT_EINVAL, "safetensors: export %s: one file has no index", e->path);
  /* every file the index will name is there: parts written on other nodes
   * into a directory that is not one shared directory are not */
  for (int k = 0; k < e->n_files; k++) {
    char path[4096];
    struct stat st;
    st_shard_path(e, k, path, sizeof path);
    if (stat(path, &st) || !S_ISREG(st.st_mode))
      return mt_seterr(MT_EIO,
                       "safetensors: export %s: %s is not there, so no index is written: the "
                       "stages' files go to the directory as each stage's writer sees it, which "
                       "must be one shared directory at the same path on every node",
                       e->dir, path);
  }
  int crc = e->no_config ? 0 : st_write_hf_config(e, e->dir);
  if (crc) return crc;
  json_t *map = json_object(), *root = NULL;
  uint64_t total = 0;
  char name[64], path[4096];
  for (int i = 0; map && i < e->n; i++) {
    snprintf(name, sizeof name, "model-%05d-of-%05d.safetensors", e->file_of[i] + 1, e->n_files);
    char key[128];
    json_object_set_new(map, st_file_name(e, i, key, sizeof key), json_string(name));
    total += (uint64_t)st_file_numel(&e->cfg, &e->table[i]) * st_export_dtypes[e->dtype].bytes;
  }
  if (map)
    root =
        json_pack("{s:{s:I}, s:o}", "metadata", "total_size", (json_int_t)total, "weight_map", map);
  char *text = root ? json_dumps(root, JSON_INDENT(2) | JSON_PRESERVE_ORDER) : NULL;
  json_decref(root);
  if (!text) return mt_seterr(MT_ENOMEM, "safetensors: export %s: the index", e->dir);
  snprintf(path, sizeof path, "%s/%s", e->dir, ST_INDEX_NAME);
  int rc = mt_atomic_write_file(path, text, strlen(text));
  free(text);
  return rc ? mt_wraperr(rc, "safetensors: export") : 0;
}

int mt_gpt_export_commit(mt_gpt_export *e) {
  const mt_param *t = mt_gpt_export_tensor(e);
  if (t)
    return mt_seterr(MT_EINVAL, "safetensors: export: tensor %s was not written; nothing is",
                     t->name);
  /* each file was committed with its last tensor; a part's index is its caller's */
  if (e->dir) return e->part < 0 ? mt_gpt_export_write_index(e) : 0;
  return e->no_config ? 0 : st_config_beside_file(e);
}

void mt_gpt_export_free(mt_gpt_export *e) {
  if (!e) return;
  for (int k = 0; e->w && k < e->n_files; k++) mt_st_writer_free(e->w[k]);
  free(e->w);
  free(e->file_of);
  free(e->stage_of);
  free(e->table);
  free(e->hf);
  free(e->dir);
  free(e->path);
  free(e);
}

/* Writes one of a whole model's buffers (params or grads, device) in HF
 * names and layouts, one tensor at a time. */
static int st_save_buffer(const mt_gpt *m, const float *dev_buf, const char *path, const char *what,
                          mt_st_dtype dtype) {
  if (m->cfg.tp_size > 1 || !(m->first && m->last))
    return mt_seterr(MT_EINVAL,
                     "safetensors: save %s %s: the model is a shard or a stage (exports of "
                     "those gather through mt_gpt_export)",
                     what, path);
  size_t max_numel = 0;
  for (int j = 0; j < m->n_tensors; j++)
    if (m->params_table[j].numel > max_numel) max_numel = m->params_table[j].numel;
  float *piece = malloc((max_numel ? max_numel : 1) * sizeof *piece);
  if (!piece) return mt_seterr(MT_ENOMEM, "safetensors: save %s %s: out of memory", what, path);
  mt_gpt_export *e = NULL;
  int rc = mt_device_sync(m->dev);
  char dir[4096];
  mt_gpt_export_plan plan = {.part = -1, .dtype = dtype};
  if (mt_st_export_dir(path, dir, sizeof dir)) plan.dir = dir;
  if (!rc) rc = mt_gpt_export_open_sharded(&e, &m->cfg, plan.dir ? NULL : path, &plan);
  if (!rc) e->no_config = dev_buf != m->params; /* gradients are no model */
  const mt_param *t;
  while (!rc && (t = mt_gpt_export_tensor(e))) {
    int j = mt_gpt_find(m, t->name);
    const mt_param *p = j >= 0 ? &m->params_table[j] : NULL;
    if (!p) {
      rc = mt_seterr(MT_EINVAL, "safetensors: save %s %s: no tensor %s", what, path, t->name);
      break;
    }
    rc = mt_device_memcpy_dtoh(m->dev, piece, dev_buf + p->offset, p->numel * sizeof(float));
    if (rc) mt_wraperr(rc, "safetensors: save %s %s: tensor %s", what, path, p->name);
    if (!rc) rc = mt_gpt_export_put(e, p, piece);
    if (!rc) rc = mt_gpt_export_next(e);
  }
  if (!rc) rc = mt_gpt_export_commit(e);
  mt_gpt_export_free(e);
  free(piece);
  return rc;
}

int mt_gpt_save_safetensors(const mt_gpt *m, const char *path) {
  return st_save_buffer(m, m->params, path, "weights", MT_ST_FP32);
}

int mt_gpt_save_safetensors_as(const mt_gpt *m, const char *path, mt_st_dtype dtype) {
  return st_save_buffer(m, m->params, path, "weights", dtype);
}

int mt_gpt_save_grads_safetensors(const mt_gpt *m, const char *path) {
  return st_save_buffer(m, m->grads, path, "gradients", MT_ST_FP32);
}
