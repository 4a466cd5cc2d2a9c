/* test_safetensors.c — the safetensors reader/writer and the GPT-2 mapping.
 *
 * Files for the reader tests are assembled byte by byte here, independently
 * of the writer, so a bug shared by both cannot hide. */
#include <dirent.h>
#include <jansson.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "device.h"
#include "err.h"
#include "fileio.h"
#include "gpt.h"
#include "half.h"
#include "safetensors.h"

static mt_device dev;

#include "mt_check.h"

/* Writes u64le(header_len) + header + data, the format by hand. */
static void write_raw(const char *path, uint64_t header_len, const char *header, size_t hbytes,
                      const void *data, size_t dbytes) {
  FILE *fp = fopen(path, "wb");
  if (!fp) {
    perror(path);
    exit(2);
  }
  uint8_t len8[8];
  for (int i = 0; i < 8; i++) len8[i] = (uint8_t)(header_len >> (8 * i));
  fwrite(len8, 1, 8, fp);
  fwrite(header, 1, hbytes, fp);
  if (dbytes) fwrite(data, 1, dbytes, fp);
  fclose(fp);
}

static void write_st(const char *path, const char *header, const void *data, size_t dbytes) {
  write_raw(path, strlen(header), header, strlen(header), data, dbytes);
}

/* Expects mt_st_open to refuse path with a message containing both needles. */
static int expect_open_refused(const char *path, const char *needle1, const char *needle2) {
  mt_st_file f;
  int rc = mt_st_open(&f, path);
  REQUIRE(rc < 0, "opened a bad file %s", path);
  REQUIRE(strstr(mt_errmsg(), path), "message does not name the file: %s", mt_errmsg());
  REQUIRE(!needle1 || strstr(mt_errmsg(), needle1), "message lacks \"%s\": %s", needle1,
          mt_errmsg());
  REQUIRE(!needle2 || strstr(mt_errmsg(), needle2), "message lacks \"%s\": %s", needle2,
          mt_errmsg());
  REQUIRE(f.map == NULL && f.n == 0, "refused file left state behind");
  printf("  refused as expected: %s\n", mt_errmsg());
  return 0;
}

/* ---- a tiny model --------------------------------------------------------- */

static mt_gpt_config tiny_config(void) {
  mt_gpt_config c;
  memset(&c, 0, sizeof c);
  c.n_layer = 2;
  c.n_embd = 32;
  c.n_head = 4;
  c.vocab_size = 250;
  c.padded_vocab = 256;
  c.max_seq = 16;
  c.ln_eps = 1e-5f;
  c.init_std = 0.02f;
  return c;
}

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static float rand_float(void) {
  rng_state ^= rng_state << 13;
  rng_state ^= rng_state >> 7;
  rng_state ^= rng_state << 17;
  return (float)((rng_state >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f;
}

/* Fills every parameter (or gradient) with distinct random values; the
 * padded vocabulary rows stay zero as the format cannot carry them. */
static int fill_random(mt_gpt *m, float *dev_buf) {
  float *h = malloc(m->num_params * sizeof *h);
  if (!h) return -1;
  for (size_t i = 0; i < m->num_params; i++) h[i] = rand_float();
  int wte = mt_gpt_find(m, "wte.weight");
  const mt_param *p = &m->params_table[wte];
  size_t C = (size_t)m->cfg.n_embd;
  memset(h + p->offset + (size_t)m->cfg.vocab_size * C, 0,
         (size_t)(m->cfg.padded_vocab - m->cfg.vocab_size) * C * sizeof *h);
  int rc = mt_device_memcpy_htod(m->dev, dev_buf, h, m->num_params * sizeof *h);
  free(h);
  return rc;
}

static float *download(const mt_gpt *m, const float *dev_buf) {
  float *h = malloc(m->num_params * sizeof *h);
  if (h && mt_device_memcpy_dtoh(m->dev, h, dev_buf, m->num_params * sizeof *h)) {
    free(h);
    return NULL;
  }
  return h;
}

static int make_model(mt_gpt *m) {
  mt_gpt_config c = tiny_config();
  int rc = mt_gpt_create(m, &c, &dev, 2, 8);
  if (rc) fprintf(stderr, "  mt_gpt_create: %s\n", mt_errmsg());
  return rc;
}

/* Reads the file's __metadata__ straight from the header. */
static json_t *read_metadata(const char *path) {
  mt_st_file f;
  if (mt_st_open(&f, path)) return NULL;
  uint64_t hlen = 0;
  for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | ((const uint8_t *)f.map)[i];
  json_t *root = json_loadb((const char *)f.map + 8, hlen, 0, NULL);
  mt_st_close(&f);
  json_t *meta = json_incref(json_object_get(root, "__metadata__"));
  json_decref(root);
  return meta;
}

/* ---- tests ---------------------------------------------------------------- */

static int test_gpt_save_then_load_is_bit_exact(void) {
  mt_gpt a, b;
  REQUIRE(!make_model(&a), "create a");
  REQUIRE(!make_model(&b), "create b");
  REQUIRE(!fill_random(&a, a.params), "fill");
  const char *path = tmp_path("roundtrip.safetensors");
  int rc = mt_gpt_save_safetensors(&a, path);
  REQUIRE(!rc, "save: %s", mt_errmsg());
  rc = mt_gpt_load_safetensors(&b, path);
  REQUIRE(!rc, "load: %s", mt_errmsg());
  float *ha = download(&a, a.params), *hb = download(&b, b.params);
  REQUIRE(ha && hb, "download");
  REQUIRE(a.num_params == b.num_params, "sizes differ");
  size_t diff = 0;
  for (size_t i = 0; i < a.num_params; i++) diff += memcmp(&ha[i], &hb[i], sizeof(float)) != 0;
  free(ha);
  free(hb);
  REQUIRE(diff == 0, "%zu of %zu parameters differ after the round trip", diff, a.num_params);
  mt_gpt_destroy(&a);
  mt_gpt_destroy(&b);
  return 0;
}

static int test_saved_file_has_hf_shapes_layouts_and_metadata(void) {
  mt_gpt m;
  REQUIRE(!make_model(&m), "create");
  REQUIRE(!fill_random(&m, m.params), "fill");
  const char *path = tmp_path("layout.safetensors");
  REQUIRE(!mt_gpt_save_safetensors(&m, path), "save: %s", mt_errmsg());
  float *host = download(&m, m.params);
  REQUIRE(host, "download");
  mt_st_file f;
  REQUIRE(!mt_st_open(&f, path), "open: %s", mt_errmsg());
  REQUIRE(f.n == m.n_tensors, "%d tensors in the file, %d in the model", f.n, m.n_tensors);
  const int64_t C = 32, V = 250;

  const mt_st_tensor *wte = mt_st_find(&f, "wte.weight");
  REQUIRE(wte && wte->ndim == 2 && wte->shape[0] == V && wte->shape[1] == C,
          "wte.weight must be (V=250, C) without padding rows");
  REQUIRE(!strcmp(wte->dtype, "F32"), "dtype %s", wte->dtype);

  const mt_st_tensor *qkv = mt_st_find(&f, "h.1.attn.c_attn.weight");
  REQUIRE(qkv && qkv->ndim == 2 && qkv->shape[0] == C && qkv->shape[1] == 3 * C,
          "c_attn.weight must be Conv1D (C, 3C)");
  float *fileq = malloc((size_t)(3 * C * C) * sizeof *fileq);
  REQUIRE(fileq && !mt_st_read_f32(&f, qkv, fileq), "read");
  const float *ours = host + m.params_table[mt_gpt_find(&m, "h.1.attn.c_attn.weight")].offset;
  for (int64_t o = 0; o < 3 * C; o++)
    for (int64_t i = 0; i < C; i++)
      REQUIRE(fileq[i * 3 * C + o] == ours[o * C + i], "file[%lld][%lld] != ours[%lld][%lld]",
              (long long)i, (long long)o, (long long)o, (long long)i);
  free(fileq);

  const mt_st_tensor *fc = mt_st_find(&f, "h.0.mlp.c_fc.weight");
  REQUIRE(fc && fc->shape[0] == C && fc->shape[1] == 4 * C, "c_fc.weight must be (C, 4C)");
  const mt_st_tensor *fcp = mt_st_find(&f, "h.0.mlp.c_proj.weight");
  REQUIRE(fcp && fcp->shape[0] == 4 * C && fcp->shape[1] == C, "mlp.c_proj.weight must be (4C, C)");
  const mt_st_tensor *wpe = mt_st_find(&f, "wpe.weight");
  REQUIRE(wpe && wpe->shape[0] == 16 && wpe->shape[1] == C, "wpe.weight must be (max_seq, C)");
  const mt_st_tensor *lnb = mt_st_find(&f, "ln_f.bias");
  REQUIRE(lnb && lnb->ndim == 1 && lnb->shape[0] == C, "ln_f.bias must be (C)");
  REQUIRE((uintptr_t)(f.data - (const uint8_t *)f.map) % 8 == 0,
          "header not padded to 8-byte alignment");
  mt_st_close(&f);
  free(host);

  json_t *meta = read_metadata(path);
  REQUIRE(meta, "no __metadata__");
  const char *want[][2] = {{"format", "pt"}, {"n_layer", "2"},      {"n_embd", "32"},
                           {"n_head", "4"},  {"vocab_size", "250"}, {"seq", "16"}};
  for (size_t k = 0; k < sizeof want / sizeof want[0]; k++) {
    const char *v = json_string_value(json_object_get(meta, want[k][0]));
    REQUIRE(v && !strcmp(v, want[k][1]), "metadata %s = %s, want \"%s\"", want[k][0],
            v ? v : "(missing or not a string)", want[k][1]);
  }
  json_decref(meta);
  mt_gpt_destroy(&m);
  return 0;
}

static int test_grads_saved_under_parameter_names_and_layouts(void) {
  mt_gpt m;
  REQUIRE(!make_model(&m), "create");
  REQUIRE(!fill_random(&m, m.grads), "fill grads");
  const char *path = tmp_path("grads.safetensors");
  REQUIRE(!mt_gpt_save_grads_safetensors(&m, path), "save grads: %s", mt_errmsg());
  /* Loading the gradient file as weights must reproduce the gradients. */
  mt_gpt b;
  REQUIRE(!make_model(&b), "create b");
  REQUIRE(!mt_gpt_load_safetensors(&b, path), "load: %s", mt_errmsg());
  float *g = download(&m, m.grads), *p = download(&b, b.params);
  REQUIRE(g && p, "download");
  REQUIRE(!memcmp(g, p, m.num_params * sizeof *g), "gradients changed on the way through the file");
  free(g);
  free(p);
  mt_gpt_destroy(&m);
  mt_gpt_destroy(&b);
  return 0;
}

/* Half-precision bit patterns, written as bytes, read as fp32. */
static int test_reads_hand_written_f16_bf16_f32_f64(void) {
  /* F16: 1, -2, 0.5, 65504 (max), 2^-24 (smallest subnormal), 2^-14
   *      (smallest normal), +inf, -0 */
  const uint16_t h16[8] = {0x3C00, 0xC000, 0x3800, 0x7BFF, 0x0001, 0x0400, 0x7C00, 0x8000};
  const float f16_want[8] = {
      1.0f, -2.0f, 0.5f, 65504.0f, 5.9604644775390625e-08f, 6.103515625e-05f, INFINITY, -0.0f};
  /* BF16: 1, -3.5, 3.140625, 2^-133 (subnormal) */
  const uint16_t b16[4] = {0x3F80, 0xC060, 0x4049, 0x0001};
  const float bf_want[4] = {1.0f, -3.5f, 3.140625f, 9.183549615799121e-41f};
  const float f32[3] = {1.5f, -0.25f, 1e-30f};
  const double f64[2] = {0.1, -123.5};

  uint8_t data[64];
  size_t k = 0;
  for (int i = 0; i < 8; i++)
    data[k++] = (uint8_t)(h16[i] & 0xff), data[k++] = (uint8_t)(h16[i] >> 8);
  for (int i = 0; i < 4; i++)
    data[k++] = (uint8_t)(b16[i] & 0xff), data[k++] = (uint8_t)(b16[i] >> 8);
  memcpy(data + k, f32, sizeof f32); /* little-endian host */
  k += sizeof f32;
  memcpy(data + k, f64, sizeof f64);
  k += sizeof f64;
  REQUIRE(k == 16 + 8 + 12 + 16, "layout");
  /* Header length 163 is deliberately not a multiple of 8: reads must cope
   * with unaligned data. */
  const char *header = "{\"__metadata__\":{\"format\":\"pt\"},"
                       "\"half\":{\"dtype\":\"F16\",\"shape\":[2,4],\"data_offsets\":[0,16]},"
                       "\"brain\":{\"dtype\":\"BF16\",\"shape\":[4],\"data_offsets\":[16,24]},"
                       "\"single\":{\"dtype\":\"F32\",\"shape\":[3,1],\"data_offsets\":[24,36]},"
                       "\"double\":{\"dtype\":\"F64\",\"shape\":[2],\"data_offsets\":[36,52]}}";
  const char *path = tmp_path("handmade.safetensors");
  write_st(path, header, data, k);

  mt_st_file f;
  REQUIRE(!mt_st_open(&f, path), "open: %s", mt_errmsg());
  REQUIRE(f.n == 4, "%d tensors (metadata is not a tensor)", f.n);
  REQUIRE(mt_st_find(&f, "__metadata__") == NULL, "metadata listed as a tensor");
  REQUIRE(mt_st_find(&f, "nope") == NULL, "found a tensor that is not there");
  float out[8];

  const mt_st_tensor *t = mt_st_find(&f, "half");
  REQUIRE(t && !strcmp(t->dtype, "F16") && t->ndim == 2 && t->shape[0] == 2 && t->shape[1] == 4 &&
              t->bytes == 16,
          "half: metadata");
  REQUIRE(!mt_st_read_f32(&f, t, out), "read half: %s", mt_errmsg());
  for (int i = 0; i < 8; i++)
    REQUIRE(!memcmp(&out[i], &f16_want[i], 4), "F16 %#06x -> %g, want %g", h16[i], out[i],
            f16_want[i]);

  t = mt_st_find(&f, "brain");
  REQUIRE(t && !strcmp(t->dtype, "BF16") && t->ndim == 1 && t->shape[0] == 4, "brain: metadata");
  REQUIRE(!mt_st_read_f32(&f, t, out), "read brain: %s", mt_errmsg());
  for (int i = 0; i < 4; i++)
    REQUIRE(out[i] == bf_want[i], "BF16 %#06x -> %g, want %g", b16[i], out[i], bf_want[i]);

  t = mt_st_find(&f, "single");
  REQUIRE(t && !mt_st_read_f32(&f, t, out), "read single");
  for (int i = 0; i < 3; i++) REQUIRE(out[i] == f32[i], "F32[%d] -> %g", i, out[i]);

  t = mt_st_find(&f, "double");
  REQUIRE(t && !mt_st_read_f32(&f, t, out), "read double");
  for (int i = 0; i < 2; i++) REQUIRE(out[i] == (float)f64[i], "F64[%d] -> %g", i, out[i]);
  mt_st_close(&f);
  return 0;
}

static int test_refuses_integer_dtype_as_floats(void) {
  const char *path = tmp_path("ints.safetensors");
  int32_t v[2] = {1, 2};
  write_st(path, "{\"ids\":{\"dtype\":\"I32\",\"shape\":[2],\"data_offsets\":[0,8]}}", v, 8);
  mt_st_file f;
  REQUIRE(!mt_st_open(&f, path), "open: %s", mt_errmsg());
  float out[2];
  int rc = mt_st_read_f32(&f, mt_st_find(&f, "ids"), out);
  REQUIRE(rc < 0 && strstr(mt_errmsg(), "ids") && strstr(mt_errmsg(), "I32"),
          "I32 read as floats: %s", mt_errmsg());
  mt_st_close(&f);
  return 0;
}

static int test_writer_output_is_valid_and_padded(void) {
  mt_st_writer *w = mt_st_writer_new();
  REQUIRE(w, "new");
  float a[6] = {1, 2, 3, 4, 5, 6}, b[1] = {7};
  int64_t sa[2] = {2, 3}, sb[1] = {1};
  REQUIRE(!mt_st_writer_add(w, "a", 2, sa, a), "add a");
  REQUIRE(!mt_st_writer_add(w, "b", 1, sb, b), "add b");
  REQUIRE(mt_st_writer_add(w, "a", 1, sb, b) < 0 && strstr(mt_errmsg(), "\"a\""),
          "a duplicate name must be refused: %s", mt_errmsg());
  REQUIRE(!mt_st_writer_meta(w, "note", "x\"y"), "meta");
  const char *path = tmp_path("writer.safetensors");
  REQUIRE(!mt_st_writer_commit(w, path), "commit: %s", mt_errmsg());
  mt_st_writer_free(w);
  /* no <name>.tmp.* beside it */
  char dirbuf[300], stem[300];
  snprintf(dirbuf, sizeof dirbuf, "%s", path);
  char *slash = strrchr(dirbuf, '/');
  REQUIRE(slash, "path %s has a directory", path);
  *slash = 0;
  snprintf(stem, sizeof stem, "%s.tmp.", slash + 1);
  DIR *dir = opendir(dirbuf);
  REQUIRE(dir, "open %s", dirbuf);
  int left = 0;
  for (struct dirent *e; (e = readdir(dir));) left += !strncmp(e->d_name, stem, strlen(stem));
  closedir(dir);
  REQUIRE(!left, "%d temp file(s) %s* left behind in %s", left, stem, dirbuf);

  mt_st_file f;
  REQUIRE(!mt_st_open(&f, path), "open: %s", mt_errmsg());
  uint64_t hlen = 0;
  for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | ((const uint8_t *)f.map)[i];
  REQUIRE(hlen % 8 == 0, "header length %llu not a multiple of 8", (unsigned long long)hlen);
  REQUIRE(f.map_bytes == 8 + hlen + 28, "file size %zu", f.map_bytes);
  float out[6];
  REQUIRE(!mt_st_read_f32(&f, mt_st_find(&f, "a"), out) && !memcmp(out, a, sizeof a), "a");
  REQUIRE(!mt_st_read_f32(&f, mt_st_find(&f, "b"), out) && out[0] == 7, "b");
  mt_st_close(&f);
  json_t *meta = read_metadata(path);
  REQUIRE(meta && !strcmp(json_string_value(json_object_get(meta, "note")), "x\"y"), "metadata");
  json_decref(meta);
  return 0;
}

static int test_refuses_file_shorter_than_length_prefix(void) {
  const char *path = tmp_path("short.safetensors");
  FILE *fp = fopen(path, "wb");
  fwrite("\x10\0\0", 1, 3, fp);
  fclose(fp);
  return expect_open_refused(path, "truncated", NULL);
}

static int test_refuses_truncated_file(void) {
  /* A valid file with the last 4 data bytes cut off. */
  float v[4] = {1, 2, 3, 4};
  const char *path = tmp_path("truncated.safetensors");
  const char *h = "{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}";
  write_st(path, h, v, 12);
  return expect_open_refused(path, "\"w\"", "outside the data region");
}

static int test_refuses_header_length_beyond_file(void) {
  const char *path = tmp_path("hlen.safetensors");
  const char *h = "{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}";
  float v = 1;
  write_raw(path, 1u << 20, h, strlen(h), &v, 4);
  return expect_open_refused(path, "header length", "past the end");
}

static int test_refuses_absurd_header_length(void) {
  const char *path = tmp_path("hlen2.safetensors");
  const char *h = "{}";
  write_raw(path, UINT64_MAX, h, 2, NULL, 0);
  return expect_open_refused(path, "header length", NULL);
}

static int test_refuses_overlapping_offsets(void) {
  const char *path = tmp_path("overlap.safetensors");
  float v[4] = {0};
  write_st(path,
           "{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,12]},"
           "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}",
           v, 16);
  return expect_open_refused(path, "\"b\"", "overlaps");
}

static int test_refuses_offsets_out_of_range(void) {
  const char *path = tmp_path("range.safetensors");
  float v[2] = {0};
  write_st(path,
           "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
           "\"far\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4096,4104]}}",
           v, 8);
  return expect_open_refused(path, "\"far\"", "outside the data region");
}

static int test_refuses_reversed_offsets(void) {
  const char *path = tmp_path("reversed.safetensors");
  float v[2] = {0};
  write_st(path, "{\"r\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,0]}}", v, 8);
  return expect_open_refused(path, "\"r\"", NULL);
}

static int test_refuses_hole_in_data(void) {
  const char *path = tmp_path("hole.safetensors");
  float v[3] = {0};
  write_st(path,
           "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
           "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}",
           v, 12);
  return expect_open_refused(path, "hole", "\"b\"");
}

static int test_refuses_shape_dtype_size_mismatch(void) {
  const char *path = tmp_path("mismatch.safetensors");
  uint16_t v[6] = {0};
  /* 3 F16 values are 6 bytes, the offsets span 12 */
  write_st(path, "{\"m\":{\"dtype\":\"F16\",\"shape\":[3],\"data_offsets\":[0,12]}}", v, 12);
  return expect_open_refused(path, "\"m\"", "need 6 bytes");
}

static int test_refuses_unknown_dtype(void) {
  const char *path = tmp_path("dtype.safetensors");
  float v = 0;
  write_st(path, "{\"q\":{\"dtype\":\"F17\",\"shape\":[1],\"data_offsets\":[0,4]}}", &v, 4);
  return expect_open_refused(path, "\"q\"", "F17");
}

static int test_refuses_non_json_header(void) {
  const char *path = tmp_path("notjson.safetensors");
  float v = 0;
  write_st(path, "{\"w\": {\"dtype\": \"F32\", shape: [1]", &v, 4);
  return expect_open_refused(path, "not valid JSON", NULL);
}

static int test_refuses_non_string_metadata(void) {
  const char *path = tmp_path("meta.safetensors");
  write_st(path, "{\"__metadata__\":{\"n_layer\":2}}", NULL, 0);
  return expect_open_refused(path, "n_layer", "not a string");
}

static int test_refuses_missing_file_with_enoent(void) {
  mt_st_file f;
  const char *path = tmp_path("does-not-exist.safetensors");
  int rc = mt_st_open(&f, path);
  REQUIRE(rc == MT_ENOENT && strstr(mt_errmsg(), path), "rc %d: %s", rc, mt_errmsg());
  return 0;
}

/* Writes the tiny model's tensors under HF names with a caller's twist. */
typedef enum { EDIT_NONE, EDIT_PREFIX_AND_EXTRAS, EDIT_BROKEN } edit_kind;

static int write_edited(mt_gpt *m, const char *path, edit_kind kind) {
  REQUIRE(!mt_gpt_save_safetensors(m, tmp_path("base.safetensors")), "save: %s", mt_errmsg());
  mt_st_file f;
  REQUIRE(!mt_st_open(&f, tmp_path("base.safetensors")), "open: %s", mt_errmsg());
  mt_st_writer *w = mt_st_writer_new();
  float **bufs = calloc((size_t)f.n, sizeof *bufs);
  static float mask[16 * 16];
  int64_t mask_shape[4] = {1, 1, 16, 16};
  char name[128];
  for (int i = 0; i < f.n; i++) {
    const mt_st_tensor *t = &f.tensors[i];
    bufs[i] = malloc(t->bytes ? t->bytes : 4);
    REQUIRE(!mt_st_read_f32(&f, t, bufs[i]), "read");
    int64_t shape[8];
    memcpy(shape, t->shape, sizeof shape);
    snprintf(name, sizeof name, "%s", t->name);
    if (kind == EDIT_PREFIX_AND_EXTRAS) {
      snprintf(name, sizeof name, "transformer.%s", t->name);
    } else if (kind == EDIT_BROKEN) {
      if (!strcmp(t->name, "h.1.ln_2.bias")) continue; /* missing */
      if (!strcmp(t->name, "h.0.mlp.c_fc.weight")) {
        shape[0] = t->shape[1]; /* stored in our (out, in) layout by mistake */
        shape[1] = t->shape[0];
      }
      if (!strcmp(t->name, "ln_f.weight")) continue; /* missing */
    }
    REQUIRE(!mt_st_writer_add(w, name, t->ndim, shape, bufs[i]), "add: %s", mt_errmsg());
  }
  if (kind == EDIT_PREFIX_AND_EXTRAS) {
    REQUIRE(!mt_st_writer_add(w, "transformer.h.0.attn.bias", 4, mask_shape, mask), "add");
    REQUIRE(!mt_st_writer_add(w, "transformer.h.1.attn.masked_bias", 0, NULL, mask), "add");
    const mt_st_tensor *wte = mt_st_find(&f, "wte.weight");
    REQUIRE(!mt_st_writer_add(w, "lm_head.weight", 2, wte->shape, bufs[wte - f.tensors]), "add");
  } else if (kind == EDIT_BROKEN) {
    REQUIRE(!mt_st_writer_add(w, "h.7.attn.c_attn.weight", 1, mask_shape + 2, mask), "add");
  }
  REQUIRE(!mt_st_writer_commit(w, path), "commit: %s", mt_errmsg());
  mt_st_writer_free(w);
  for (int i = 0; i < f.n; i++) free(bufs[i]);
  free(bufs);
  mt_st_close(&f);
  return 0;
}

static int test_load_accepts_transformer_prefix_and_ignores_buffers(void) {
  mt_gpt a, b;
  REQUIRE(!make_model(&a) && !make_model(&b), "create");
  REQUIRE(!fill_random(&a, a.params), "fill");
  const char *path = tmp_path("prefixed.safetensors");
  if (write_edited(&a, path, EDIT_PREFIX_AND_EXTRAS)) return 1;
  REQUIRE(!mt_gpt_load_safetensors(&b, path), "load: %s", mt_errmsg());
  float *ha = download(&a, a.params), *hb = download(&b, b.params);
  REQUIRE(ha && hb && !memcmp(ha, hb, a.num_params * sizeof *ha), "values differ");
  free(ha);
  free(hb);
  mt_gpt_destroy(&a);
  mt_gpt_destroy(&b);
  return 0;
}

static int test_load_names_every_missing_extra_and_misshapen_tensor(void) {
  mt_gpt a, b;
  REQUIRE(!make_model(&a) && !make_model(&b), "create");
  REQUIRE(!fill_random(&a, a.params), "fill");
  REQUIRE(!fill_random(&b, b.params), "fill");
  float *before = download(&b, b.params);
  const char *path = tmp_path("broken.safetensors");
  if (write_edited(&a, path, EDIT_BROKEN)) return 1;
  int rc = mt_gpt_load_safetensors(&b, path);
  const char *msg = mt_errmsg();
  printf("  refused as expected: %s\n", msg);
  REQUIRE(rc < 0, "a broken file loaded");
  REQUIRE(strstr(msg, path), "file not named");
  REQUIRE(strstr(msg, "missing tensor \"h.1.ln_2.bias\""), "missing h.1.ln_2.bias not named");
  REQUIRE(strstr(msg, "missing tensor \"ln_f.weight\""), "missing ln_f.weight not named");
  REQUIRE(strstr(msg, "unexpected tensor \"h.7.attn.c_attn.weight\""), "extra not named");
  REQUIRE(strstr(msg, "\"h.0.mlp.c_fc.weight\" has shape (128, 32), want (32, 128)"),
          "wrong shape not named");
  float *after = download(&b, b.params);
  REQUIRE(before && after && !memcmp(before, after, b.num_params * sizeof *after),
          "a refused load changed the model");
  free(before);
  free(after);
  mt_gpt_destroy(&a);
  mt_gpt_destroy(&b);
  return 0;
}

static int test_load_refuses_other_config(void) {
  mt_gpt a, b;
  REQUIRE(!make_model(&a), "create");
  mt_gpt_config c = tiny_config();
  c.n_embd = 48;
  c.n_head = 3;
  REQUIRE(!mt_gpt_create(&b, &c, &dev, 2, 8), "create: %s", mt_errmsg());
  const char *path = tmp_path("other.safetensors");
  REQUIRE(!mt_gpt_save_safetensors(&a, path), "save: %s", mt_errmsg());
  int rc = mt_gpt_load_safetensors(&b, path);
  REQUIRE(rc < 0 && strstr(mt_errmsg(), "\"wte.weight\" has shape (250, 32), want (250, 48)"),
          "load into another width: %s", mt_errmsg());
  mt_gpt_destroy(&a);
  mt_gpt_destroy(&b);
  return 0;
}

/* Two writers of one path (nodes building the same index cache on shared
 * storage, whose daemons may share a pid) each write a temp file of their
 * own: the path ends up whole, the last commit's. One temp name per pid
 * had the second writer truncate the first's file and its commit fail. */
static int test_two_writers_of_one_path_do_not_mix(void) {
  const char *path = tmp_path("shared.idx");
  mt_atomic_file a, b;
  REQUIRE(!mt_atomic_open(&a, path) && !mt_atomic_open(&b, path), "open: %s", mt_errmsg());
  REQUIRE(strcmp(a.tmp, b.tmp), "both write %s", a.tmp);
  char big[4096];
  memset(big, 'a', sizeof big);
  REQUIRE(!mt_atomic_write(&a, big, sizeof big) && !mt_atomic_write(&b, "bb", 2), "write: %s",
          mt_errmsg());
  REQUIRE(!mt_atomic_commit(&a), "first commit: %s", mt_errmsg());
  REQUIRE(!mt_atomic_commit(&b), "second commit: %s", mt_errmsg());
  FILE *f = fopen(path, "rb");
  REQUIRE(f, "open %s", path);
  char got[8] = {0};
  size_t n = fread(got, 1, sizeof got, f);
  fclose(f);
  REQUIRE(n == 2 && !memcmp(got, "bb", 2), "%s holds %zu bytes, not the last commit's 2", path, n);
  return 0;
}

/* Whether a file holds exactly the bytes of another. */
static int same_bytes(const char *a, const char *b) {
  FILE *fa = fopen(a, "rb"), *fb = fopen(b, "rb");
  int same = fa && fb;
  for (int ca = 0, cb = 0; same && ca != EOF; same = ca == cb) ca = fgetc(fa), cb = fgetc(fb);
  if (fa) fclose(fa);
  if (fb) fclose(fb);
  return same;
}

/* How many temp files of path's name are left in its directory. */
static int temps_left(const char *path) {
  char dirbuf[300], stem[300];
  snprintf(dirbuf, sizeof dirbuf, "%s", path);
  char *slash = strrchr(dirbuf, '/');
  *slash = 0;
  snprintf(stem, sizeof stem, "%s.tmp.", slash + 1);
  DIR *dir = opendir(dirbuf);
  int left = 0;
  for (struct dirent *e; dir && (e = readdir(dir));)
    left += !strncmp(e->d_name, stem, strlen(stem));
  if (dir) closedir(dir);
  return left;
}

static int test_streamed_writer_matches_commit_and_refuses_a_short_stream(void) {
  float a[6] = {1, 2, 3, 4, 5, 6}, b[3] = {7, 8, 9};
  int64_t sa[2] = {2, 3}, sb[1] = {3};
  const char *whole = tmp_path("committed.safetensors"),
             *streamed = tmp_path("streamed.safetensors");
  mt_st_writer *w = mt_st_writer_new();
  REQUIRE(w && !mt_st_writer_add(w, "a", 2, sa, a) && !mt_st_writer_add(w, "b", 1, sb, b), "add");
  REQUIRE(!mt_st_writer_commit(w, whole), "commit: %s", mt_errmsg());
  mt_st_writer_free(w);

  /* the same tensors declared without data, appended in pieces */
  w = mt_st_writer_new();
  REQUIRE(w && !mt_st_writer_add(w, "a", 2, sa, NULL) && !mt_st_writer_add(w, "b", 1, sb, NULL),
          "declare: %s", mt_errmsg());
  REQUIRE(mt_st_writer_commit(w, streamed) < 0 && strstr(mt_errmsg(), "\"a\" has no data"),
          "a commit of tensors without data: %s", mt_errmsg());
  REQUIRE(!mt_st_writer_begin(w, streamed), "begin: %s", mt_errmsg());
  REQUIRE(!mt_st_writer_append(w, a, 4) && !mt_st_writer_append(w, a + 4, 2), "append a");
  REQUIRE(mt_st_writer_append(w, b, 4) < 0 && strstr(mt_errmsg(), "\"b\""),
          "4 floats into b's 3: %s", mt_errmsg());
  REQUIRE(!mt_st_writer_append(w, b, 3), "append b");
  REQUIRE(mt_st_writer_append(w, b, 1) < 0 && strstr(mt_errmsg(), "past the last"),
          "a float past the last tensor: %s", mt_errmsg());
  REQUIRE(!mt_st_writer_end(w), "end: %s", mt_errmsg());
  mt_st_writer_free(w);
  REQUIRE(same_bytes(whole, streamed), "the streamed file differs from the committed one");

  /* a stream that stops short writes nothing under the name */
  const char *cut = tmp_path("cut.safetensors");
  w = mt_st_writer_new();
  REQUIRE(w && !mt_st_writer_add(w, "a", 2, sa, NULL) && !mt_st_writer_add(w, "b", 1, sb, NULL),
          "declare");
  REQUIRE(!mt_st_writer_begin(w, cut) && !mt_st_writer_append(w, a, 6) &&
              !mt_st_writer_append(w, b, 2),
          "a short stream: %s", mt_errmsg());
  REQUIRE(mt_st_writer_end(w) < 0 && strstr(mt_errmsg(), "\"b\" has 8 of its 12 bytes"),
          "end of a short stream: %s", mt_errmsg());
  REQUIRE(temps_left(cut) == 1, "the temp file is kept until the writer is freed");
  mt_st_writer_free(w);
  REQUIRE(access(cut, F_OK) && !temps_left(cut), "a short stream left %s or its temp file", cut);
  return 0;
}

/* tp 4 over a vocabulary of 100 padded to 256: shards 2 and 3 of wte are
 * all padding, which the file does not hold. */
static mt_gpt_config shard_config(int tp, int tp_rank, int lb, int le) {
  mt_gpt_config c = tiny_config();
  c.vocab_size = 100;
  c.tp_size = tp, c.tp_rank = tp_rank;
  c.layer_begin = lb, c.layer_end = le;
  return c;
}

/* Every (stage, tp shard) of a whole model loads only its own slices of the
 * file, element for element those of the whole (padding rows zero), and the
 * shards put back through mt_gpt_export write the same file byte for byte. */
static int test_shards_load_their_slices_and_export_rewrites_the_file(void) {
  mt_gpt whole;
  mt_gpt_config wc = shard_config(1, 0, 0, 0);
  REQUIRE(!mt_gpt_create(&whole, &wc, &dev, 2, 8), "create: %s", mt_errmsg());
  REQUIRE(!fill_random(&whole, whole.params), "fill");
  const char *path = tmp_path("whole.safetensors");
  REQUIRE(!mt_gpt_save_safetensors(&whole, path), "save: %s", mt_errmsg());
  float *ref = download(&whole, whole.params);
  REQUIRE(ref, "download");
  const int layouts[][2] = {{2, 1}, {4, 1}, {1, 2}, {2, 2}, {4, 2}}; /* tp, pp */
  for (size_t k = 0; k < sizeof layouts / sizeof *layouts; k++) {
    int tp = layouts[k][0], pp = layouts[k][1];
    mt_gpt shards[8];
    for (int s = 0; s < pp; s++)
      for (int q = 0; q < tp; q++) {
        mt_gpt *m = &shards[s * tp + q];
        mt_gpt_config c = shard_config(tp, q, pp > 1 ? s : 0, pp > 1 ? s + 1 : 0);
        REQUIRE(!mt_gpt_create(m, &c, &dev, 2, 8), "create tp %d pp %d: %s", tp, pp, mt_errmsg());
        REQUIRE(!mt_gpt_load_safetensors(m, path), "load stage %d shard %d of tp %d: %s", s, q, tp,
                mt_errmsg());
        for (int j = 0; j < m->n_tensors; j++) {
          const mt_param *p = &m->params_table[j];
          const mt_param *w = &whole.params_table[mt_gpt_find(&whole, p->name)];
          for (size_t e = 0; e < p->numel; e++)
            REQUIRE(m->params[p->offset + e] == ref[w->offset + mt_param_global_index(p, e)],
                    "tp %d pp %d stage %d shard %d: %s[%zu] is not the file's", tp, pp, s, q,
                    p->name, e);
        }
      }
    char name[64];
    snprintf(name, sizeof name, "tp%d-pp%d.safetensors", tp, pp);
    const char *out = tmp_path(name);
    mt_gpt_export *e;
    REQUIRE(!mt_gpt_export_open(&e, &shards[0].cfg, out), "export open: %s", mt_errmsg());
    for (const mt_param *t; (t = mt_gpt_export_tensor(e));) {
      int s = t->layer >= 0 ? t->layer * pp / wc.n_layer : strncmp(t->name, "ln_f", 4) ? 0 : pp - 1;
      for (int q = 0; q < tp; q++) {
        mt_gpt *m = &shards[s * tp + q];
        const mt_param *p = &m->params_table[mt_gpt_find(m, t->name)];
        if (q > 0 && p->shard == MT_SHARD_NONE) continue;
        REQUIRE(!mt_gpt_export_put(e, p, m->params + p->offset), "put %s: %s", t->name,
                mt_errmsg());
      }
      REQUIRE(!mt_gpt_export_next(e), "write %s: %s", t->name, mt_errmsg());
    }
    REQUIRE(!mt_gpt_export_commit(e), "commit: %s", mt_errmsg());
    mt_gpt_export_free(e);
    REQUIRE(same_bytes(path, out), "tp %d pp %d: the export differs from the whole model's file",
            tp, pp);
    for (int i = 0; i < tp * pp; i++) mt_gpt_destroy(&shards[i]);
  }
  free(ref);
  mt_gpt_destroy(&whole);
  return 0;
}

/* An export given the wrong tensor, a tensor twice, a tensor short of a
 * shard, or committed early says which tensor, and leaves no file. */
static int test_export_refuses_wrong_missing_and_repeated_pieces(void) {
  mt_gpt_config c0 = tiny_config(), c1 = tiny_config(); /* vocab 250 of 256: both shards count */
  c0.tp_size = c1.tp_size = 2, c1.tp_rank = 1;
  mt_gpt s0, s1;
  REQUIRE(!mt_gpt_create(&s0, &c0, &dev, 2, 8) && !mt_gpt_create(&s1, &c1, &dev, 2, 8), "create");
  const char *out = tmp_path("refused-export.safetensors");
  mt_gpt_export *e;
  REQUIRE(!mt_gpt_export_open(&e, &c0, out), "open: %s", mt_errmsg());
  const mt_param *wte0 = &s0.params_table[mt_gpt_find(&s0, "wte.weight")];
  const mt_param *wpe0 = &s0.params_table[mt_gpt_find(&s0, "wpe.weight")];
  REQUIRE(mt_gpt_export_put(e, wpe0, s0.params + wpe0->offset) < 0 &&
              strstr(mt_errmsg(), "wpe.weight given where wte.weight is due"),
          "the wrong tensor: %s", mt_errmsg());
  REQUIRE(!mt_gpt_export_put(e, wte0, s0.params + wte0->offset), "put shard 0: %s", mt_errmsg());
  REQUIRE(mt_gpt_export_next(e) < 0 &&
              strstr(mt_errmsg(), "wte.weight has 4096 of its 8000 elements"),
          "a tensor short of shard 1: %s", mt_errmsg());
  REQUIRE(mt_gpt_export_put(e, wte0, s0.params + wte0->offset) < 0 &&
              strstr(mt_errmsg(), "more than once"),
          "shard 0 again: %s", mt_errmsg());
  REQUIRE(mt_gpt_export_commit(e) < 0 && strstr(mt_errmsg(), "wte.weight was not written"),
          "an early commit: %s", mt_errmsg());
  mt_gpt_export_free(e);
  REQUIRE(access(out, F_OK) && !temps_left(out), "a refused export left a file");
  mt_gpt_destroy(&s0);
  mt_gpt_destroy(&s1);
  return 0;
}

/* Every tensor e has due, from the whole model m, then its commit. */
static int export_all(const mt_gpt *m, mt_gpt_export *e) {
  for (const mt_param *t; (t = mt_gpt_export_tensor(e));) {
    const mt_param *p = &m->params_table[mt_gpt_find(m, t->name)];
    REQUIRE(!mt_gpt_export_put(e, p, m->params + p->offset) && !mt_gpt_export_next(e),
            "write %s: %s", t->name, mt_errmsg());
  }
  REQUIRE(!mt_gpt_export_commit(e), "commit: %s", mt_errmsg());
  return 0;
}

/* Hugging Face's sharded layout: files of at most 20 KB (wte, 32 KB, alone
 * in one), an index naming every tensor's file and the bytes in all, and a
 * model that loads back bit for bit from the directory or the index, also
 * as tp shards; an index that puts a tensor in the wrong file is refused. */
static int test_sharded_export_writes_an_index_and_loads_back(void) {
  mt_gpt a, b;
  REQUIRE(!make_model(&a) && !make_model(&b), "create");
  REQUIRE(!fill_random(&a, a.params), "fill");
  const char *dir = tmp_path("sharded");
  mt_gpt_export *e;
  mt_gpt_export_plan plan = {.dir = dir, .max_bytes = 20000, .part = -1};
  REQUIRE(!mt_gpt_export_open_sharded(&e, &a.cfg, NULL, &plan), "open: %s", mt_errmsg());
  REQUIRE(!export_all(&a, e), "the export");
  mt_gpt_export_free(e);

  char index[300];
  snprintf(index, sizeof index, "%s/model.safetensors.index.json", dir);
  json_error_t jerr;
  json_t *root = json_load_file(index, 0, &jerr);
  REQUIRE(root, "index: %s", jerr.text);
  json_t *map = json_object_get(root, "weight_map");
  json_int_t total =
      json_integer_value(json_object_get(json_object_get(root, "metadata"), "total_size"));
  REQUIRE((int)json_object_size(map) == a.n_tensors, "%zu tensors in the index, %d in the model",
          json_object_size(map), a.n_tensors);
  size_t want_total = 0, files = 0;
  const char *key, *last = "";
  json_t *v;
  json_object_foreach(map, key, v) {
    const char *file = json_string_value(v);
    if (strcmp(file, last)) files++, last = file;
    char fp[400];
    snprintf(fp, sizeof fp, "%s/%s", dir, file);
    mt_st_file f;
    REQUIRE(!mt_st_open(&f, fp), "open %s: %s", fp, mt_errmsg());
    const mt_st_tensor *t = mt_st_find(&f, key);
    REQUIRE(t, "%s does not hold %s", file, key);
    want_total += t->bytes;
    size_t data = f.map_bytes - (size_t)(f.data - (const uint8_t *)f.map);
    REQUIRE(data <= 20000 || f.n == 1, "%s holds %zu bytes of %d tensors", file, data, f.n);
    mt_st_close(&f);
  }
  char of[32];
  snprintf(of, sizeof of, "-of-%05zu.safetensors", files);
  REQUIRE(files > 3 && strstr(last, of), "%zu files, the last %s", files, last);
  REQUIRE((size_t)total == want_total, "total_size %lld, the tensors hold %zu", (long long)total,
          want_total);
  json_decref(root);

  REQUIRE(!mt_gpt_load_safetensors(&b, dir), "load the directory: %s", mt_errmsg());
  float *ha = download(&a, a.params), *hb = download(&b, b.params);
  REQUIRE(ha && hb && !memcmp(ha, hb, a.num_params * sizeof *ha), "the model changed");
  free(hb);
  mt_gpt_config c1 = tiny_config();
  c1.tp_size = 2, c1.tp_rank = 1;
  mt_gpt s1;
  REQUIRE(!mt_gpt_create(&s1, &c1, &dev, 2, 8), "create tp shard");
  REQUIRE(!mt_gpt_load_safetensors(&s1, index), "load the index as tp shard 1: %s", mt_errmsg());
  for (int j = 0; j < s1.n_tensors; j++) {
    const mt_param *p = &s1.params_table[j];
    const mt_param *w = &a.params_table[mt_gpt_find(&a, p->name)];
    for (size_t k = 0; k < p->numel; k++)
      REQUIRE(s1.params[p->offset + k] == ha[w->offset + mt_param_global_index(p, k)],
              "shard 1: %s[%zu]", p->name, k);
  }
  free(ha);
  mt_gpt_destroy(&s1);

  /* ln_f.bias said to be where wte is */
  root = json_load_file(index, 0, &jerr);
  map = json_object_get(root, "weight_map");
  json_object_set(map, "ln_f.bias", json_object_get(map, "wte.weight"));
  REQUIRE(!json_dump_file(root, index, 0), "rewrite the index");
  json_decref(root);
  int rc = mt_gpt_load_safetensors(&b, dir);
  REQUIRE(rc == MT_EINVAL && strstr(mt_errmsg(), "ln_f.bias") &&
              strstr(mt_errmsg(), "does not hold it"),
          "a wrong index: %s", mt_errmsg());
  mt_gpt_destroy(&a);
  mt_gpt_destroy(&b);
  return 0;
}

/* A whole file's bytes (malloc'd), or NULL. */
static char *slurp(const char *path, size_t *n) {
  FILE *f = fopen(path, "rb");
  char *buf = NULL;
  long len = -1;
  if (f && !fseek(f, 0, SEEK_END) && (len = ftell(f)) >= 0 && !fseek(f, 0, SEEK_SET) &&
      (buf = malloc((size_t)len + 1)) && fread(buf, 1, (size_t)len, f) != (size_t)len) {
    free(buf);
    buf = NULL;
  }
  if (f) fclose(f);
  *n = buf ? (size_t)len : 0;
  return buf;
}

/* An export in parts, one a pipeline stage (as the ranks of a pp 2 job
 * write it): stage 1's part written before stage 0's, each into files of
 * its own stage's tensors alone, the index written once both committed,
 * is the whole model's sharded export file for file, byte for byte; a part
 * that has not committed its tensors leaves its files missing. */
static int test_export_in_stage_parts_is_the_whole_export(void) {
  mt_gpt a;
  REQUIRE(!make_model(&a), "create");
  REQUIRE(!fill_random(&a, a.params), "fill");
  const char *whole_dir = tmp_path("whole-staged"), *parts_dir = tmp_path("parts");
  int begin[2] = {0, 1};
  mt_gpt_export_plan plan = {
      .dir = whole_dir, .max_bytes = 20000, .pp = 2, .stage_begin = begin, .part = -1};
  mt_gpt_export *e;
  REQUIRE(!mt_gpt_export_open_sharded(&e, &a.cfg, NULL, &plan), "open: %s", mt_errmsg());
  REQUIRE(!export_all(&a, e), "the export");
  mt_gpt_export_free(e);

  /* an earlier export's file in the directory is gone before a part begins */
  REQUIRE(!mkdir(parts_dir, 0755), "mkdir %s", parts_dir);
  char stale[300];
  snprintf(stale, sizeof stale, "%s/model-00009-of-00009.safetensors", parts_dir);
  FILE *sf = fopen(stale, "w");
  REQUIRE(sf, "stale file");
  fclose(sf);
  REQUIRE(!mt_gpt_export_prepare_dir(parts_dir), "prepare: %s", mt_errmsg());
  REQUIRE(access(stale, F_OK), "an earlier export's %s is still there", stale);
  plan.dir = parts_dir;
  mt_gpt_export *part[2];
  int seen_ln_f = 0, seen_wte = 0;
  for (int s = 1; s >= 0; s--) {
    plan.part = s;
    REQUIRE(!mt_gpt_export_open_sharded(&part[s], &a.cfg, NULL, &plan), "open part %d: %s", s,
            mt_errmsg());
    for (const mt_param *t; (t = mt_gpt_export_tensor(part[s]));) {
      REQUIRE(t->layer < 0 || t->layer == s, "part %d is given %s", s, t->name);
      seen_ln_f |= s == 1 && !strncmp(t->name, "ln_f.", 5);
      seen_wte |= s == 0 && !strcmp(t->name, "wte.weight");
      const mt_param *p = &a.params_table[mt_gpt_find(&a, t->name)];
      REQUIRE(!mt_gpt_export_put(part[s], p, a.params + p->offset) && !mt_gpt_export_next(part[s]),
              "part %d: write %s: %s", s, t->name, mt_errmsg());
    }
    REQUIRE(!mt_gpt_export_commit(part[s]), "commit part %d: %s", s, mt_errmsg());
  }
  REQUIRE(seen_ln_f && seen_wte, "ln_f in stage 1 %d, wte in stage 0 %d", seen_ln_f, seen_wte);
  char index[300];
  snprintf(index, sizeof index, "%s/model.safetensors.index.json", parts_dir);
  REQUIRE(access(index, F_OK), "a part wrote the index");
  REQUIRE(!mt_gpt_export_write_index(part[0]), "index: %s", mt_errmsg());
  mt_gpt_export_free(part[0]);
  mt_gpt_export_free(part[1]);

  /* the same files under both directories, and no file of two stages */
  DIR *d = opendir(whole_dir);
  REQUIRE(d, "open %s", whole_dir);
  int files = 0;
  for (struct dirent *de; (de = readdir(d));) {
    if (de->d_name[0] == '.') continue;
    char pa[400], pb[400];
    snprintf(pa, sizeof pa, "%s/%s", whole_dir, de->d_name);
    snprintf(pb, sizeof pb, "%s/%s", parts_dir, de->d_name);
    size_t na, nb;
    char *ba = slurp(pa, &na), *bb = slurp(pb, &nb);
    REQUIRE(ba && bb && na == nb && !memcmp(ba, bb, na), "%s differs between the two exports",
            de->d_name);
    free(ba);
    free(bb);
    files++;
    if (strstr(de->d_name, ".index.json") || !strcmp(de->d_name, "config.json")) continue;
    mt_st_file f;
    REQUIRE(!mt_st_open(&f, pa), "open %s: %s", pa, mt_errmsg());
    int stage0 = 0, stage1 = 0;
    for (int k = 0; k < f.n; k++) {
      const char *name = f.tensors[k].name;
      int layer = !strncmp(name, "h.", 2) ? atoi(name + 2) : !strncmp(name, "ln_f.", 5) ? 1 : 0;
      stage0 |= layer == 0, stage1 |= layer == 1;
    }
    mt_st_close(&f);
    REQUIRE(!(stage0 && stage1), "%s holds tensors of both stages", de->d_name);
  }
  closedir(d);
  REQUIRE(files > 4, "%d files", files);

  /* a part that wrote nothing: its files are missing, and no index */
  const char *half = tmp_path("half");
  REQUIRE(!mt_gpt_export_prepare_dir(half), "prepare: %s", mt_errmsg());
  plan.dir = half, plan.part = 1;
  REQUIRE(!mt_gpt_export_open_sharded(&e, &a.cfg, NULL, &plan), "open: %s", mt_errmsg());
  REQUIRE(mt_gpt_export_commit(e) < 0 && strstr(mt_errmsg(), "h.1.ln_1.weight was not written"),
          "an empty part's commit: %s", mt_errmsg());
  mt_gpt_export_free(e);
  d = opendir(half);
  REQUIRE(d, "open %s", half);
  int left = 0;
  for (struct dirent *de; (de = readdir(d));) left += de->d_name[0] != '.';
  closedir(d);
  REQUIRE(!left, "%d files left by a part that wrote nothing", left);
  /* and an index over files that are not all there is refused */
  plan.part = 0;
  REQUIRE(!mt_gpt_export_open_sharded(&e, &a.cfg, NULL, &plan), "open: %s", mt_errmsg());
  REQUIRE(!export_all(&a, e), "part 0");
  REQUIRE(mt_gpt_export_write_index(e) == MT_EIO && strstr(mt_errmsg(), "is not there") &&
              strstr(mt_errmsg(), "shared directory"),
          "an index over a missing part: %s", mt_errmsg());
  snprintf(index, sizeof index, "%s/model.safetensors.index.json", half);
  REQUIRE(access(index, F_OK), "an index was written over a missing part");
  mt_gpt_export_free(e);
  plan.dir = NULL, plan.part = 0;
  REQUIRE(mt_gpt_export_open_sharded(&e, &a.cfg, "x.safetensors", &plan) < 0 &&
              strstr(mt_errmsg(), "directory"),
          "a part of one file: %s", mt_errmsg());
  mt_gpt_destroy(&a);
  return 0;
}

/* A model's shape read back from its file, its sharded directory and its
 * index; a file without "n_head" needs config.json beside it. */
static int test_config_of_file_reads_the_shape(void) {
  mt_gpt a;
  REQUIRE(!make_model(&a), "create");
  const char *one = tmp_path("shape.safetensors"), *dir = tmp_path("shape-dir/");
  REQUIRE(!mt_gpt_save_safetensors(&a, one) && !mt_gpt_save_safetensors(&a, dir), "save: %s",
          mt_errmsg());
  char index[300];
  snprintf(index, sizeof index, "%smodel.safetensors.index.json", dir);
  const char *paths[] = {one, dir, index};
  for (int k = 0; k < 3; k++) {
    mt_gpt_config c;
    REQUIRE(!mt_gpt_config_of_file(paths[k], &c), "%s: %s", paths[k], mt_errmsg());
    REQUIRE(c.n_layer == a.cfg.n_layer && c.n_embd == a.cfg.n_embd && c.n_head == a.cfg.n_head &&
                c.vocab_size == a.cfg.vocab_size && c.max_seq == a.cfg.max_seq &&
                c.padded_vocab == 256,
            "%s: %d layers, %d wide, %d heads, vocab %d (%d), %d positions", paths[k], c.n_layer,
            c.n_embd, c.n_head, c.vocab_size, c.padded_vocab, c.max_seq);
  }
  /* the same tensors without metadata: the heads from config.json */
  const char *bare_dir = tmp_path("bare");
  REQUIRE(!mkdir(bare_dir, 0755), "mkdir");
  char bare[300], cfg_json[300];
  snprintf(bare, sizeof bare, "%s/model.safetensors", bare_dir);
  snprintf(cfg_json, sizeof cfg_json, "%s/config.json", bare_dir);
  mt_st_file f;
  REQUIRE(!mt_st_open(&f, one), "open: %s", mt_errmsg());
  mt_st_writer *w = mt_st_writer_new();
  float *buf = malloc(a.num_params * sizeof *buf);
  REQUIRE(w && buf, "writer");
  for (int i = 0; i < f.n; i++) {
    REQUIRE(!mt_st_read_f32(&f, &f.tensors[i], buf), "read: %s", mt_errmsg());
    REQUIRE(!mt_st_writer_add(w, f.tensors[i].name, f.tensors[i].ndim, f.tensors[i].shape, buf),
            "add: %s", mt_errmsg());
  }
  mt_st_close(&f);
  REQUIRE(!mt_st_writer_commit(w, bare), "commit: %s", mt_errmsg());
  mt_st_writer_free(w);
  free(buf);
  mt_gpt_config c;
  REQUIRE(mt_gpt_config_of_file(bare, &c) == MT_EINVAL && strstr(mt_errmsg(), "config.json"),
          "no heads anywhere: %s", mt_errmsg());
  FILE *cf = fopen(cfg_json, "w");
  REQUIRE(cf, "config.json");
  fprintf(cf, "{\"n_head\": 4, \"layer_norm_epsilon\": 1e-6}\n");
  fclose(cf);
  REQUIRE(!mt_gpt_config_of_file(bare, &c) && c.n_head == 4 && c.ln_eps == 1e-6f,
          "with config.json: %s, %d heads", mt_errmsg(), c.n_head);
  /* an export says its own epsilon, over config.json's */
  mt_gpt_config ce = tiny_config();
  ce.ln_eps = 3e-6f;
  mt_gpt e;
  REQUIRE(!mt_gpt_create(&e, &ce, &dev, 2, 8), "create");
  char eps_file[300];
  snprintf(eps_file, sizeof eps_file, "%s/eps.safetensors", bare_dir);
  REQUIRE(!mt_gpt_save_safetensors(&e, eps_file), "save: %s", mt_errmsg());
  REQUIRE(!mt_gpt_config_of_file(eps_file, &c) && c.ln_eps == 3e-6f, "epsilon %g: %s",
          (double)c.ln_eps, mt_errmsg());
  mt_gpt_destroy(&e);
  mt_gpt_destroy(&a);
  return 0;
}

/* ---- export dtypes and config.json ---------------------------------------- */

/* The model's parameters after a round trip through 16 bits (fp16 != 0:
 * binary16), rounded to nearest even by kernels/common/half.h. */
static float *rounded(const mt_gpt *m, int fp16) {
  float *h = download(m, m->params);
  for (size_t i = 0; h && i < m->num_params; i++) h[i] = mt_round_half(h[i], fp16);
  return h;
}

/* A bf16 and an fp16 export (a file, and a directory of 20 KB files) hold
 * every tensor as BF16 / F16, each value the fp32 one rounded to nearest
 * even, in half the bytes (the index's total_size too); loading either
 * (init_from) gives those rounded weights bit for bit. */
static int test_bf16_and_fp16_exports_round_and_load_back(void) {
  mt_gpt a, b;
  REQUIRE(!make_model(&a) && !make_model(&b), "create");
  REQUIRE(!fill_random(&a, a.params), "fill");
  const char *f32 = tmp_path("dt32.safetensors");
  REQUIRE(!mt_gpt_save_safetensors(&a, f32), "save fp32: %s", mt_errmsg());
  struct stat st32;
  REQUIRE(!stat(f32, &st32), "stat %s", f32);
  for (int fp16 = 0; fp16 < 2; fp16++) {
    mt_st_dtype dt = fp16 ? MT_ST_FP16 : MT_ST_BF16;
    const char *want = fp16 ? "F16" : "BF16";
    const char *one = tmp_path(fp16 ? "dt16.safetensors" : "dtbf.safetensors");
    const char *dir = tmp_path(fp16 ? "dt16-dir" : "dtbf-dir");
    REQUIRE(!mt_gpt_save_safetensors_as(&a, one, dt), "save %s: %s", want, mt_errmsg());
    int begin[1] = {0};
    mt_gpt_export_plan plan = {
        .dir = dir, .max_bytes = 20000, .pp = 1, .stage_begin = begin, .part = -1, .dtype = dt};
    mt_gpt_export *e;
    REQUIRE(!mt_gpt_export_open_sharded(&e, &a.cfg, NULL, &plan), "open: %s", mt_errmsg());
    REQUIRE(!export_all(&a, e), "the %s export", want);
    mt_gpt_export_free(e);
    mt_st_file f, g;
    REQUIRE(!mt_st_open(&f, one) && !mt_st_open(&g, f32), "open: %s", mt_errmsg());
    size_t data16 = 0, data32 = 0;
    for (int i = 0; i < f.n; i++) {
      const mt_st_tensor *t = &f.tensors[i], *u = mt_st_find(&g, t->name);
      REQUIRE(!strcmp(t->dtype, want), "%s is %s, not %s", t->name, t->dtype, want);
      REQUIRE(u && t->bytes * 2 == u->bytes, "%s: %zu bytes, fp32 %zu", t->name, t->bytes,
              u ? u->bytes : 0);
      /* each stored value is the fp32 one rounded, bit for bit */
      const uint8_t *p16 = f.data + t->offset;
      for (size_t k = 0; k < t->bytes / 2; k++) {
        float x;
        memcpy(&x, g.data + u->offset + 4 * k, 4);
        uint16_t bits = (uint16_t)(p16[2 * k] | p16[2 * k + 1] << 8);
        REQUIRE(bits == mt_half_pack(x, fp16), "%s[%zu]: %04x, %g rounds to %04x", t->name, k, bits,
                (double)x, mt_half_pack(x, fp16));
      }
      data16 += t->bytes, data32 += u->bytes;
    }
    mt_st_close(&f);
    mt_st_close(&g);
    REQUIRE(data16 * 2 == data32 && data16 > 0, "%zu bytes in %s, %zu in fp32", data16, want,
            data32);
    char index[300];
    snprintf(index, sizeof index, "%s/model.safetensors.index.json", dir);
    json_t *ij = json_load_file(index, 0, NULL);
    json_int_t total =
        json_integer_value(json_object_get(json_object_get(ij, "metadata"), "total_size"));
    json_decref(ij);
    REQUIRE(total == (json_int_t)data16, "the index says %lld bytes, the tensors have %zu",
            (long long)total, data16);
    /* init_from of either: the rounded weights */
    float *r = rounded(&a, fp16);
    REQUIRE(r, "download");
    const char *paths[] = {one, dir};
    for (int k = 0; k < 2; k++) {
      REQUIRE(!mt_gpt_load_safetensors(&b, paths[k]), "load %s: %s", paths[k], mt_errmsg());
      float *hb = download(&b, b.params);
      REQUIRE(hb, "download");
      size_t diff = 0;
      for (size_t i = 0; i < a.num_params; i++) diff += memcmp(&r[i], &hb[i], sizeof(float)) != 0;
      free(hb);
      REQUIRE(!diff, "%s: %zu of %zu weights are not the %s-rounded ones", paths[k], diff,
              a.num_params, want);
    }
    free(r);
  }
  mt_gpt_destroy(&a);
  mt_gpt_destroy(&b);
  return 0;
}

/* An fp16 export of a weight past fp16's range (70000) is refused naming
 * the tensor, the element and what to do, and writes nothing (no file, no
 * config.json); bf16 holds it. Unknown dtype names are refused naming the
 * accepted ones. */
static int test_fp16_overflow_is_refused_naming_the_tensor(void) {
  mt_gpt a;
  REQUIRE(!make_model(&a), "create");
  REQUIRE(!fill_random(&a, a.params), "fill");
  const mt_param *p = &a.params_table[mt_gpt_find(&a, "h.1.mlp.c_fc.weight")];
  float big = 70000.0f; /* our (4C, C) row 3, column 5: the file's Conv1D [5, 3] */
  REQUIRE(
      !mt_device_memcpy_htod(a.dev, a.params + p->offset + 3 * p->shape[1] + 5, &big, sizeof big),
      "poke");
  const char *dir = tmp_path("overflow"), *out = tmp_path("overflow/w.safetensors");
  REQUIRE(!mkdir(dir, 0755), "mkdir %s", dir);
  REQUIRE(mt_gpt_save_safetensors_as(&a, out, MT_ST_FP16) == MT_EINVAL, "fp16 export of 70000");
  const char *msg = mt_errmsg();
  REQUIRE(strstr(msg, "tensor \"h.1.mlp.c_fc.weight\"") && strstr(msg, "[5, 3]") &&
              strstr(msg, "70000") && strstr(msg, "65504") && strstr(msg, "bf16 or fp32"),
          "the message: %s", msg);
  printf("  refused as expected: %s\n", msg);
  DIR *d = opendir(dir);
  REQUIRE(d, "opendir %s", dir);
  int left = 0;
  for (struct dirent *de; (de = readdir(d));) left += de->d_name[0] != '.';
  closedir(d);
  REQUIRE(!left, "%d files left in %s", left, dir);
  REQUIRE(!mt_gpt_save_safetensors_as(&a, out, MT_ST_BF16), "bf16: %s", mt_errmsg());
  mt_st_dtype dt;
  REQUIRE(mt_st_dtype_parse("f16", &dt) == MT_EINVAL &&
              strstr(mt_errmsg(), "\"f16\" is not one of fp32, bf16, fp16"),
          "parse f16: %s", mt_errmsg());
  REQUIRE(!mt_st_dtype_parse("bf16", &dt) && dt == MT_ST_BF16, "parse bf16");
  mt_gpt_destroy(&a);
  return 0;
}

/* Reads dir/config.json. */
static json_t *config_json(const char *dir) {
  char path[400];
  snprintf(path, sizeof path, "%s/config.json", dir);
  return json_load_file(path, JSON_REJECT_DUPLICATES, NULL);
}

/* config.json of a directory export says the model as transformers'
 * GPT2Config names it (its sizes, gelu_new, epsilon, init std, dropouts,
 * tied embeddings, the dtype), and reads back through
 * mt_gpt_config_of_file with no metadata in the file. Beside one file it
 * is written where none is and names the file; one of another file, or of
 * another model, is kept as it was. */
static int test_export_writes_config_json_of_the_model(void) {
  mt_gpt_config c = tiny_config();
  c.ln_eps = 1e-6f, c.init_std = 0.006f, c.hidden_dropout = 0.1f, c.attention_dropout = 0.05f;
  mt_gpt a;
  REQUIRE(!mt_gpt_create(&a, &c, &dev, 2, 8), "create: %s", mt_errmsg());
  REQUIRE(!fill_random(&a, a.params), "fill");
  const char *dir = tmp_path("hf-config");
  REQUIRE(!mt_gpt_save_safetensors_as(&a, tmp_path("hf-config/"), MT_ST_BF16), "save: %s",
          mt_errmsg());
  json_t *j = config_json(dir);
  REQUIRE(j, "no config.json in %s", dir);
  const struct {
    const char *key;
    long want;
  } ints[] = {{"vocab_size", 250}, {"n_positions", 16}, {"n_ctx", 16},
              {"n_embd", 32},      {"n_layer", 2},      {"n_head", 4}};
  for (size_t k = 0; k < sizeof ints / sizeof *ints; k++) {
    json_t *v = json_object_get(j, ints[k].key);
    REQUIRE(json_is_integer(v) && json_integer_value(v) == ints[k].want, "%s: want %ld",
            ints[k].key, ints[k].want);
  }
  const struct {
    const char *key;
    double want;
  } reals[] = {{"layer_norm_epsilon", 1e-6},
               {"initializer_range", 0.006},
               {"resid_pdrop", 0.1},
               {"embd_pdrop", 0.1},
               {"attn_pdrop", 0.05}};
  for (size_t k = 0; k < sizeof reals / sizeof *reals; k++) {
    json_t *v = json_object_get(j, reals[k].key);
    /* the decimal the job gave, not the float's 9.99999997e-07 */
    REQUIRE(json_is_real(v) && json_real_value(v) == reals[k].want, "%s: %.17g, want %g",
            reals[k].key, json_number_value(v), reals[k].want);
  }
  json_t *arch = json_object_get(j, "architectures");
  REQUIRE(json_array_size(arch) == 1 &&
              !strcmp(json_string_value(json_array_get(arch, 0)), "GPT2LMHeadModel"),
          "architectures");
  REQUIRE(!strcmp(json_string_value(json_object_get(j, "model_type")), "gpt2"), "model_type");
  /* kernels/common/mtmath.h's mt_gelu is the tanh approximation */
  REQUIRE(!strcmp(json_string_value(json_object_get(j, "activation_function")), "gelu_new"),
          "activation_function");
  REQUIRE(!strcmp(json_string_value(json_object_get(j, "torch_dtype")), "bfloat16"), "torch_dtype");
  REQUIRE(json_is_true(json_object_get(j, "tie_word_embeddings")), "tie_word_embeddings");
  REQUIRE(json_is_null(json_object_get(j, "n_inner")), "n_inner: 4 n_embd, as GPT-2's null");
  /* a byte vocabulary has no <|endoftext|> */
  REQUIRE(json_is_null(json_object_get(j, "eos_token_id")), "eos_token_id");
  json_decref(j);

  /* the file without its metadata: config.json alone says the heads and epsilon */
  char bare_dir[300], src[300], cfg_src[320], cfg_dst[320];
  snprintf(bare_dir, sizeof bare_dir, "%s", tmp_path("hf-config-bare"));
  REQUIRE(!mkdir(bare_dir, 0755), "mkdir");
  snprintf(src, sizeof src, "%s/model-00001-of-00001.safetensors", dir);
  mt_st_file f;
  REQUIRE(!mt_st_open(&f, src), "open %s: %s", src, mt_errmsg());
  mt_st_writer *w = mt_st_writer_new();
  REQUIRE(w && !mt_st_writer_dtype(w, MT_ST_FP32), "writer");
  float *vals[64] = {0};
  REQUIRE(f.n <= 64, "%d tensors", f.n);
  for (int i = 0; i < f.n; i++) {
    const mt_st_tensor *t = &f.tensors[i];
    vals[i] = malloc(t->bytes * 2);
    REQUIRE(vals[i] && !mt_st_read_f32(&f, t, vals[i]), "read %s", t->name);
    REQUIRE(!mt_st_writer_add(w, t->name, t->ndim, t->shape, vals[i]), "add %s", t->name);
  }
  char bare[400];
  snprintf(bare, sizeof bare, "%s/model.safetensors", bare_dir);
  REQUIRE(!mt_st_writer_commit(w, bare), "commit: %s", mt_errmsg());
  mt_st_writer_free(w);
  for (int i = 0; i < f.n; i++) free(vals[i]);
  mt_st_close(&f);
  snprintf(cfg_src, sizeof cfg_src, "%s/config.json", dir);
  snprintf(cfg_dst, sizeof cfg_dst, "%s/config.json", bare_dir);
  REQUIRE(!link(cfg_src, cfg_dst), "link config.json");
  mt_gpt_config back;
  REQUIRE(!mt_gpt_config_of_file(bare, &back), "config of %s: %s", bare, mt_errmsg());
  REQUIRE(back.n_head == 4 && back.ln_eps == 1e-6f && back.n_layer == 2 && back.n_embd == 32 &&
              back.vocab_size == 250 && back.max_seq == 16,
          "read back: %d heads, eps %g", back.n_head, (double)back.ln_eps);

  /* one file: config.json beside it names it; another file's is kept */
  const char *one_dir = tmp_path("hf-one");
  REQUIRE(!mkdir(one_dir, 0755), "mkdir");
  REQUIRE(!mt_gpt_save_safetensors(&a, tmp_path("hf-one/a.safetensors")), "save a: %s",
          mt_errmsg());
  j = config_json(one_dir);
  REQUIRE(j && !strcmp(json_string_value(json_object_get(j, "mtnlg_weights")), "a.safetensors") &&
              !strcmp(json_string_value(json_object_get(j, "torch_dtype")), "float32"),
          "config.json beside a.safetensors");
  json_decref(j);
  REQUIRE(!mt_gpt_save_safetensors_as(&a, tmp_path("hf-one/b.safetensors"), MT_ST_FP16),
          "save b: %s", mt_errmsg());
  j = config_json(one_dir);
  REQUIRE(j && !strcmp(json_string_value(json_object_get(j, "mtnlg_weights")), "a.safetensors") &&
              !strcmp(json_string_value(json_object_get(j, "torch_dtype")), "float32"),
          "b's export replaced a's config.json");
  json_decref(j);
  REQUIRE(!mt_gpt_save_safetensors_as(&a, tmp_path("hf-one/a.safetensors"), MT_ST_FP16),
          "save a again: %s", mt_errmsg());
  j = config_json(one_dir);
  REQUIRE(j && !strcmp(json_string_value(json_object_get(j, "torch_dtype")), "float16"),
          "a's export again did not update its config.json");
  json_decref(j);
  /* another model's config.json stays byte for byte */
  const char *theirs = "{\"model_type\": \"bert\"}\n";
  char their_cfg[300];
  snprintf(their_cfg, sizeof their_cfg, "%s/config.json", tmp_path("hf-theirs"));
  REQUIRE(!mkdir(tmp_path("hf-theirs"), 0755), "mkdir");
  FILE *fp = fopen(their_cfg, "w");
  REQUIRE(fp && fputs(theirs, fp) >= 0 && !fclose(fp), "write %s", their_cfg);
  REQUIRE(!mt_gpt_save_safetensors(&a, tmp_path("hf-theirs/model.safetensors")), "save: %s",
          mt_errmsg());
  size_t n;
  char *kept = slurp(their_cfg, &n);
  REQUIRE(kept && n == strlen(theirs) && !memcmp(kept, theirs, n), "another's config.json changed");
  free(kept);
  mt_gpt_destroy(&a);
  return 0;
}

static const struct {
  const char *name;
  int (*fn)(void);
} tests[] = {
#define T(f)                                                                                       \
  { #f, f }
    T(test_two_writers_of_one_path_do_not_mix),
    T(test_bf16_and_fp16_exports_round_and_load_back),
    T(test_fp16_overflow_is_refused_naming_the_tensor),
    T(test_export_writes_config_json_of_the_model),
    T(test_reads_hand_written_f16_bf16_f32_f64),
    T(test_refuses_integer_dtype_as_floats),
    T(test_writer_output_is_valid_and_padded),
    T(test_refuses_file_shorter_than_length_prefix),
    T(test_refuses_truncated_file),
    T(test_refuses_header_length_beyond_file),
    T(test_refuses_absurd_header_length),
    T(test_refuses_overlapping_offsets),
    T(test_refuses_offsets_out_of_range),
    T(test_refuses_reversed_offsets),
    T(test_refuses_hole_in_data),
    T(test_refuses_shape_dtype_size_mismatch),
    T(test_refuses_unknown_dtype),
    T(test_refuses_non_json_header),
    T(test_refuses_non_string_metadata),
    T(test_refuses_missing_file_with_enoent),
    T(test_gpt_save_then_load_is_bit_exact),
    T(test_saved_file_has_hf_shapes_layouts_and_metadata),
    T(test_grads_saved_under_parameter_names_and_layouts),
    T(test_load_accepts_transformer_prefix_and_ignores_buffers),
    T(test_load_names_every_missing_extra_and_misshapen_tensor),
    T(test_load_refuses_other_config),
    T(test_streamed_writer_matches_commit_and_refuses_a_short_stream),
    T(test_shards_load_their_slices_and_export_rewrites_the_file),
    T(test_export_refuses_wrong_missing_and_repeated_pieces),
    T(test_sharded_export_writes_an_index_and_loads_back),
    T(test_export_in_stage_parts_is_the_whole_export),
    T(test_config_of_file_reads_the_shape),
#undef T
};

int main(void) {
  snprintf(tmpdir, sizeof tmpdir, "/tmp/mt_test_safetensors.XXXXXX");
  if (!mkdtemp(tmpdir)) {
    perror("mkdtemp");
    return 2;
  }
  if (mt_device_open(&dev, "cpu:0")) {
    fprintf(stderr, "cpu:0: %s\n", mt_errmsg());
    return 2;
  }
  for (size_t i = 0; i < sizeof tests / sizeof tests[0]; i++) {
    int rc = tests[i].fn();
    printf("%s %s\n", rc ? "FAIL" : "ok  ", tests[i].name);
    failures += rc != 0;
  }
  mt_device_close(&dev);
  char cmd[128];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
  if (system(cmd)) fprintf(stderr, "could not remove %s\n", tmpdir);
  printf("%d of %zu failed\n", failures, sizeof tests / sizeof tests[0]);
  return failures ? 1 : 0;
}
