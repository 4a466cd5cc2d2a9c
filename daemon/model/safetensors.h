/* safetensors.h — reading and writing .safetensors files, and GPT-2 weights.
 *
 * Format: u64 little-endian header length, a JSON header
 * {"name": {"dtype": "F32", "shape": [...], "data_offsets": [a, b]}, ...,
 *  "__metadata__": {...}}, then the raw tensor bytes. Reads are bounds-checked
 * (every offset inside the file, no overlap, sizes match shape and dtype);
 * writes go to a temp file, fsync, rename, fsync the directory.
 *
 * GPT-2 mapping (Hugging Face names and layouts): wte.weight (V, C) — our
 * padded rows beyond V are zero on load and dropped on save; wpe.weight;
 * h.N.{ln_1,ln_2}.{weight,bias}; h.N.attn.c_attn.weight (C, 3C) Conv1D, i.e.
 * the transpose of our (3C, C); attn.c_proj, mlp.c_fc, mlp.c_proj likewise;
 * ln_f.{weight,bias}; an untied model's lm_head.weight (V, C) as wte, with
 * "tie_word_embeddings": "false" in the metadata and config.json, and the
 * other tensors under "transformer." (GPT2LMHeadModel's state dict; a tied
 * export has no prefix). On load a "transformer." prefix is accepted and
 * the attn.bias / attn.masked_bias buffers and a tied model's
 * lm_head.weight (wte's copy) are ignored; an untied model from a tied
 * file starts lm_head as a copy of its wte, and an untied file is refused
 * by a tied model.
 * A write never leaves a partial file under the final name.
 */
#ifndef MT_SAFETENSORS_H
#define MT_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "gpt.h"

typedef struct mt_st_tensor {
  char *name;
  char dtype[8]; /* "F32", "F16", "BF16", ... */
  int ndim;
  int64_t shape[8];
  size_t offset; /* into data */
  size_t bytes;
} mt_st_tensor;

typedef struct mt_st_file {
  void *map; /* the mmapped file */
  size_t map_bytes;
  const uint8_t *data; /* start of tensor bytes */
  mt_st_tensor *tensors;
  int n;
  struct json_t *meta; /* __metadata__ (string values), or NULL */
} mt_st_file;

int mt_st_open(mt_st_file *f, const char *path);
void mt_st_close(mt_st_file *f);
const mt_st_tensor *mt_st_find(const mt_st_file *f, const char *name);
/* Copies a tensor to fp32 (F32, F16, BF16 and F64 sources). */
int mt_st_read_f32(const mt_st_file *f, const mt_st_tensor *t, float *out);
/* Elements [first, first + n) of a tensor (row-major) to fp32. */
int mt_st_read_range_f32(const mt_st_file *f, const mt_st_tensor *t, size_t first, size_t n,
                         float *out);

/* What a writer stores its tensors as: fp32 (the floats as given), or
 * each rounded to nearest even into bf16 or IEEE fp16 ("BF16", "F16"). */
typedef enum { MT_ST_FP32 = 0, MT_ST_BF16, MT_ST_FP16 } mt_st_dtype;
/* "fp32", "bf16" or "fp16" to *dtype; MT_EINVAL naming what is accepted. */
int mt_st_dtype_parse(const char *name, mt_st_dtype *dtype);
const char *mt_st_dtype_name(mt_st_dtype dtype); /* "fp32", "bf16", "fp16" */

/* Writer: add tensors (data copied by reference until commit), then
 * commit. Or stream a file larger than memory: add every tensor with data
 * NULL, begin (writes the header to a temp file), append the floats of the
 * tensors in the order added, end (durable, like commit). Freeing a writer
 * that has begun and not ended removes its temp file. */
typedef struct mt_st_writer mt_st_writer;
mt_st_writer *mt_st_writer_new(void);
int mt_st_writer_add(mt_st_writer *w, const char *name, int ndim, const int64_t *shape,
                     const float *data);
int mt_st_writer_meta(mt_st_writer *w, const char *key, const char *value);
/* Stores every tensor as dtype (default fp32); before begin. The floats
 * given are converted as they are appended: a value that becomes infinite
 * (fp16 past 65504, or NaN or infinite already in fp16; bf16 past its
 * largest finite) is refused, naming the tensor and the element. */
int mt_st_writer_dtype(mt_st_writer *w, mt_st_dtype dtype);
int mt_st_writer_commit(mt_st_writer *w, const char *path); /* durable */
int mt_st_writer_begin(mt_st_writer *w, const char *path);
int mt_st_writer_append(mt_st_writer *w, const float *data, size_t n); /* n floats */
int mt_st_writer_end(mt_st_writer *w); /* refuses a tensor short of its bytes */
void mt_st_writer_free(mt_st_writer *w);

/* GPT-2 weights in and out (device <-> file). path is one file, or a
 * Hugging Face sharded model (its directory or its
 * model.safetensors.index.json). Loading names every missing,
 * extra or misshapen tensor; a pipeline stage or a tensor-parallel shard
 * (or both) reads only its own slices, a tensor at a time, so no rank ever
 * holds more of the file than its largest tensor. Saving takes a whole
 * model (one stage, no shards); a sharded one exports with mt_gpt_export. */
int mt_gpt_load_safetensors(mt_gpt *m, const char *path);
int mt_gpt_save_safetensors(const mt_gpt *m, const char *path);
/* The same in another dtype (mt_gpt_save_safetensors is fp32). */
int mt_gpt_save_safetensors_as(const mt_gpt *m, const char *path, mt_st_dtype dtype);
/* The whole model a file (or sharded directory, or index) holds, from its
 * tensors' shapes (layers, width, vocabulary, positions) and its heads from
 * the file's metadata (an mtnlg export's "n_head") or Hugging Face's
 * config.json beside it, and so LayerNorm's epsilon ("layer_norm_epsilon";
 * 1e-5 when neither says) and an untied head (an lm_head.weight with
 * "tie_word_embeddings" false); padded_vocab rounded up to 128. */
int mt_gpt_config_of_file(const char *path, mt_gpt_config *c);
/* Gradients under the same names and layouts (for reference tests). */
int mt_gpt_save_grads_safetensors(const mt_gpt *m, const char *path);

/* A whole model's weights written as they arrive, one tensor at a time:
 * the writer holds the tensor being filled and nothing else, so a model
 * larger than any host's memory exports. mt_gpt_export_tensor says which
 * tensor is due (the whole model's table entry; NULL once all are
 * written); put gives it shard by shard (p: a shard's table entry of that
 * tensor under any tp layout, data: its p->numel floats, our layout; a
 * replicated tensor once); next writes it, refusing one with elements
 * missing, and moves on. Commit is durable and refuses an incomplete file;
 * free without commit removes it. A path that is a directory (or ends in
 * '/') gets Hugging Face's sharded layout (below).
 *
 * Beside the weights goes Hugging Face's config.json for GPT2LMHeadModel
 * (model_type "gpt2", the sizes, gelu_new, layer_norm_epsilon,
 * initializer_range, the dropouts, tie_word_embeddings, torch_dtype), so
 * transformers' from_pretrained loads the directory. In a directory export
 * it is the directory's (replaced, as save_pretrained does). Beside one
 * file X it is written only where no config.json is, or where the one
 * there is an earlier export's of a file named X ("mtnlg_weights": "X"):
 * another's config.json is kept (logged at info level). */
typedef struct mt_gpt_export mt_gpt_export;
int mt_gpt_export_open(mt_gpt_export **e, const mt_gpt_config *cfg, const char *path);
/* Whether an export to path writes the sharded layout: path is a
 * directory, or ends in '/'. */
int mt_st_names_a_directory(const char *path);
/* The same, and path without its trailing '/'s in dir (cap bytes). */
int mt_st_export_dir(const char *path, char *dir, size_t cap);
/* Hugging Face's files of at most this many bytes (its max_shard_size
 * "5GB"; a tensor larger than that has a file of its own). */
#define MT_ST_SHARD_BYTES 5000000000ull
/* How an export is laid out in files (mt_gpt_export_open_sharded). */
typedef struct mt_gpt_export_plan {
  /* Hugging Face's sharded layout in this directory (made if missing):
   * model-00001-of-0000N.safetensors and model.safetensors.index.json;
   * NULL: one file at path */
  const char *dir;
  uint64_t max_bytes; /* a sharded file's bytes at most (0: MT_ST_SHARD_BYTES) */
  /* pipeline stages (0 or 1: none); with more, no file holds tensors of
   * two stages, so each stage's files can be written by a rank of that
   * stage. stage_begin[s]: stage s's first block; wte and wpe are stage
   * 0's, ln_f (and an untied lm_head) the last stage's. */
  int pp;
  const int *stage_begin;
  /* -1: every tensor; open prepares the directory (the old index removed
   * first: no index names a mix of two exports) and commit writes the
   * index. s >= 0: stage s's tensors and files alone; the caller prepares
   * the directory before any part opens (mt_gpt_export_prepare_dir) and
   * writes the index once every part has committed
   * (mt_gpt_export_write_index, from any part's exporter). */
  int part;
  mt_st_dtype dtype; /* what the files store (0: fp32) */
} mt_gpt_export_plan;
int mt_gpt_export_open_sharded(mt_gpt_export **e, const mt_gpt_config *cfg, const char *path,
                               const mt_gpt_export_plan *plan);
int mt_gpt_export_prepare_dir(const char *dir);
/* config.json (below), then the index, written last: a directory with an
 * index holds a whole export. */
int mt_gpt_export_write_index(const mt_gpt_export *e);
const mt_param *mt_gpt_export_tensor(const mt_gpt_export *e);
int mt_gpt_export_put(mt_gpt_export *e, const mt_param *p, const float *data);
int mt_gpt_export_next(mt_gpt_export *e);
int mt_gpt_export_commit(mt_gpt_export *e);
void mt_gpt_export_free(mt_gpt_export *e);

#endif
