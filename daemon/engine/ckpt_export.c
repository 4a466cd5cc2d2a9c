/* ckpt_export.c — a checkpoint's master weights as GPT-2 safetensors,
 * offline (`mtnlgctl ckpt export`): Megatron's checkpoint conversion,
 * without the job running. The model comes from the job the manifest
 * recorded; each tensor is read from the shard files that hold its tp
 * slices and written as it completes, so the exporter holds one tensor. */
#include "ckpt_export.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "err.h"
#include "gpt.h"
#include "job.h"
#include "safetensors.h"
#include "train.h"

/* The shard model of (tp rank q, stage s) under the checkpoint's layout. */
static mt_gpt_config shard_config(const mt_job *job, int tp, int pp, int q, int s) {
  mt_gpt_config cfg = mt_trainer_model_shape(job);
  cfg.tp_size = tp, cfg.tp_rank = q;
  mt_gpt_set_stage(&cfg, pp, s, job->parallel.virtual_stages);
  return cfg;
}

/* A copy of the job a checkpoint records (extra.job), or NULL. mtnlgd
 * before 2026-12 recorded a generation's data-parallel width as
 * parallel.dp_min, above dp_max after a resize past it: such a job is read
 * with dp_max raised to it (the width does not change the model). */
static json_t *recorded_job(const mt_ckpt *c) {
  const json_t *saved = json_object_get(c->extra, "job");
  json_t *j = json_is_object(saved) ? json_deep_copy(saved) : NULL;
  json_t *par = j ? json_object_get(j, "parallel") : NULL;
  json_t *lo = json_object_get(par, "dp_min"), *hi = json_object_get(par, "dp_max");
  if (json_is_integer(lo) && json_is_integer(hi) && json_integer_value(hi) < json_integer_value(lo))
    json_object_set_new(par, "dp_max", json_integer(json_integer_value(lo)));
  return j;
}

/* The job a checkpoint was saved under, from its manifest (extra.job);
 * verb (export, reshard) begins the messages. */
static int saved_job(const mt_ckpt *c, const char *verb, mt_job *job) {
  json_t *j = recorded_job(c);
  if (!j)
    return mt_seterr(MT_EINVAL,
                     "%s: %s does not record its job (saved by an older mtnlgd), so its "
                     "model is unknown",
                     verb, c->dir);
  char *text = json_dumps(j, JSON_COMPACT);
  json_decref(j);
  if (!text) return mt_seterr(MT_ENOMEM, "%s: %s: the job", verb, c->dir);
  int rc = mt_job_parse(job, text, NULL, NULL, NULL);
  free(text);
  if (rc) return mt_wraperr(rc, "%s: %s: the job it records", verb, c->dir);
  if (job->parallel.tp != c->tp)
    return mt_seterr(MT_ECORRUPT, "%s: %s: its job says tp %d, its layout tp %d", verb, c->dir,
                     job->parallel.tp, c->tp);
  return 0;
}

/* The shard tables of a layout, [s * tp + q], and the largest tensor. */
static int layout_tables(const mt_job *job, int tp, int pp, mt_param ***tables, int **counts,
                         size_t **sizes, size_t *max_numel) {
  int n = tp * pp;
  if (job->model.n_layer < pp)
    return mt_seterr(MT_EINVAL, "parallel.pp: %d stages for %d layers", pp, job->model.n_layer);
  *tables = calloc((size_t)n, sizeof **tables);
  *counts = calloc((size_t)n, sizeof **counts);
  *sizes = calloc((size_t)n, sizeof **sizes);
  if (!*tables || !*counts || !*sizes) return mt_seterr(MT_ENOMEM, "reshard: shard tables");
  for (int k = 0; k < n; k++) {
    mt_gpt_config cfg = shard_config(job, tp, pp, k % tp, k / tp);
    int rc = mt_gpt_table(&cfg, &(*tables)[k], &(*counts)[k], &(*sizes)[k]);
    if (rc) return rc;
    for (int i = 0; i < (*counts)[k]; i++)
      if ((*tables)[k][i].numel > *max_numel) *max_numel = (*tables)[k][i].numel;
  }
  return 0;
}

static void free_tables(mt_param **tables, int *counts, size_t *sizes, int n) {
  for (int k = 0; tables && k < n; k++) free(tables[k]);
  free(tables);
  free(counts);
  free(sizes);
}

/* Entry `name` of one shard table, or NULL. */
static const mt_param *table_find(const mt_param *t, int n, const char *name) {
  int i = mt_param_find(t, n, name);
  return i < 0 ? NULL : &t[i];
}

int mt_ckpt_export(const mt_ckpt *c, const char *path, mt_st_dtype dtype) {
  mt_job job;
  int tp = c->tp, pp = c->pp, n = tp * pp;
  mt_param **tables = NULL;
  int *counts = NULL;
  size_t *sizes = NULL, max_numel = 0;
  float *piece = NULL;
  int rc = saved_job(c, "export", &job);
  if (!rc && (rc = layout_tables(&job, tp, pp, &tables, &counts, &sizes, &max_numel)))
    mt_wraperr(rc, "export: %s", c->dir);
  /* every shard file holds exactly its shard's parameters, "master" among them */
  for (int k = 0; k < n && !rc; k++) {
    int q = k % tp, s = k / tp;
    const mt_ckpt_file *f = mt_ckpt_file_of(c, q, s);
    int has_master = 0;
    for (int a = 0; f && a < f->n_arrays; a++) has_master |= !strcmp(f->arrays[a], "master");
    if (!f || f->n != sizes[k] || !has_master)
      rc = mt_seterr(MT_ECORRUPT,
                     "export: %s: shard tp %d pp %d %s; the job's model has %zu parameters there",
                     c->dir, q, s,
                     !f           ? "is missing"
                     : has_master ? "holds another number of parameters"
                                  : "has no \"master\" array",
                     sizes[k]);
  }
  if (!rc && !(piece = malloc((max_numel ? max_numel : 1) * sizeof *piece)))
    rc = mt_seterr(MT_ENOMEM, "export: a buffer of %zu floats", max_numel);
  mt_gpt_export *e = NULL;
  if (!rc) {
    /* a directory's files split where the stages do (with virtual stages,
     * their chunks), as the run's own export writes them */
    mt_gpt_config whole = shard_config(&job, tp, 1, 0, 0);
    char dir[4096];
    int parts = pp > 1 ? pp * job.parallel.virtual_stages : 1;
    int *begin = calloc((size_t)parts, sizeof *begin), end;
    for (int s = 0; begin && s < parts; s++)
      mt_stage_layers(job.model.n_layer, parts, s, &begin[s], &end);
    mt_gpt_export_plan plan = {.pp = parts, .stage_begin = begin, .part = -1, .dtype = dtype};
    if (mt_st_export_dir(path, dir, sizeof dir)) plan.dir = dir;
    rc = begin ? mt_gpt_export_open_sharded(&e, &whole, plan.dir ? NULL : path, &plan)
               : mt_seterr(MT_ENOMEM, "export: %d stages", pp);
    free(begin); /* the exporter keeps each tensor's stage, not the array */
  }
  const mt_param *t;
  while (!rc && (t = mt_gpt_export_tensor(e))) {
    for (int s = 0, found = 0; s < pp && !found && !rc; s++)
      for (int q = 0; q < tp && !rc; q++) {
        const mt_param *p = table_find(tables[s * tp + q], counts[s * tp + q], t->name);
        if (!p) break; /* not this stage's (the tied embedding: the first stage's) */
        found = 1;
        if (q > 0 && p->shard == MT_SHARD_NONE) continue; /* replicated: shard 0's */
        rc = mt_ckpt_read(c, q, s, "master", p->offset, p->numel, piece);
        if (!rc) rc = mt_gpt_export_put(e, p, piece);
      }
    if (!rc) rc = mt_gpt_export_next(e);
  }
  if (!rc) rc = mt_gpt_export_commit(e);
  mt_gpt_export_free(e);
  free_tables(tables, counts, sizes, n);
  free(piece);
  return rc;
}

/* Tensor `name` of one array of c, whole (row-major; only rows below
 * `rows`: padding is the caller's), from each tp slice of the first stage
 * holding it, through piece (the largest slice). tables and counts: c's
 * layout, [s * tp + q]. verb begins the messages. */
static int gather_tensor(const mt_ckpt *c, mt_param **tables, const int *counts, const char *name,
                         const char *array, size_t rows, size_t cols, float *piece, float *whole,
                         const char *verb) {
  int tp = c->tp, s = 0;
  while (s < c->pp && !table_find(tables[s * tp], counts[s * tp], name)) s++;
  for (int q = 0; q < tp; q++) {
    const mt_param *p = s < c->pp ? table_find(tables[s * tp + q], counts[s * tp + q], name) : NULL;
    if (!p) return mt_seterr(MT_ECORRUPT, "%s: no stage holds tensor %s", verb, name);
    if (q > 0 && p->shard == MT_SHARD_NONE) continue; /* replicated: shard 0's */
    int rc = mt_ckpt_read(c, q, s, array, p->offset, p->numel, piece);
    if (rc) return rc;
    for (size_t e = 0; e < p->numel; e++) {
      size_t g = mt_param_global_index(p, e);
      if (g / cols < rows) whole[g] = piece[e];
    }
  }
  return 0;
}

/* ---- a tensor at a time, for a shard of another layout ----------------- */

struct mt_ckpt_tensors {
  const mt_ckpt *c;
  mt_job job; /* the one c records */
  mt_param **tables;
  int *counts;
  size_t *sizes, max_numel;
  float *whole, *piece; /* a whole tensor and one slice of it, made on first need */
  size_t whole_cap;
};

void mt_ckpt_tensors_close(mt_ckpt_tensors *r) {
  if (!r) return;
  free_tables(r->tables, r->counts, r->sizes, r->c->tp * r->c->pp);
  free(r->whole);
  free(r->piece);
  free(r);
}

int mt_ckpt_tensors_open(const mt_ckpt *c, mt_job *job, mt_ckpt_tensors **out) {
  *out = NULL;
  mt_ckpt_tensors *r = calloc(1, sizeof *r);
  if (!r) return mt_seterr(MT_ENOMEM, "ckpt: a tensor reader");
  r->c = c;
  int rc = saved_job(c, "load", &r->job);
  if (!rc &&
      (rc = layout_tables(&r->job, c->tp, c->pp, &r->tables, &r->counts, &r->sizes, &r->max_numel)))
    mt_wraperr(rc, "load: %s", c->dir);
  for (int k = 0; k < c->tp * c->pp && !rc; k++) {
    const mt_ckpt_file *f = mt_ckpt_file_of(c, k % c->tp, k / c->tp);
    if (!f || f->n != r->sizes[k])
      rc = mt_seterr(MT_ECORRUPT, "load: %s: shard tp %d pp %d %s; its job's model has %zu there",
                     c->dir, k % c->tp, k / c->tp,
                     f ? "holds another number of parameters" : "is missing", r->sizes[k]);
  }
  if (rc) {
    mt_ckpt_tensors_close(r);
    return rc;
  }
  *job = r->job;
  *out = r;
  return 0;
}

int mt_ckpt_tensors_read(mt_ckpt_tensors *r, const char *array, const mt_param *p, float *out) {
  const mt_ckpt *c = r->c;
  int tp = c->tp, s = 0;
  while (s < c->pp && !table_find(r->tables[s * tp], r->counts[s * tp], p->name)) s++;
  if (s == c->pp)
    return mt_seterr(MT_ECORRUPT, "load: %s: no stage holds tensor %s", c->dir, p->name);
  /* the same slice in one of the stage's files: read as it is */
  for (int q = 0; q < tp; q++) {
    const mt_param *o = table_find(r->tables[s * tp + q], r->counts[s * tp + q], p->name);
    if (o && o->shard == p->shard && o->numel == p->numel && o->shard_off == p->shard_off &&
        o->full[0] == p->full[0] && o->full[1] == p->full[1] && o->shape[0] == p->shape[0] &&
        o->shape[1] == p->shape[1])
      return mt_ckpt_read(c, q, s, array, o->offset, p->numel, out);
  }
  /* else the whole tensor from the stage's tp slices, then this one's
   * elements; rows past the real vocabulary (padding) are zero */
  const mt_param *o0 = table_find(r->tables[s * tp], r->counts[s * tp], p->name);
  size_t cols = p->ndim == 2 ? p->full[1] : 1;
  size_t rows = mt_param_is_vocab(p->name) ? (size_t)r->job.model.vocab_size : p->full[0];
  if ((o0->ndim == 2 ? o0->full[1] : 1) != cols || (rows > o0->full[0]))
    return mt_seterr(MT_ECORRUPT, "load: %s: tensor %s has another shape", c->dir, p->name);
  size_t need = p->full[0] * cols;
  if (need > r->whole_cap) {
    free(r->whole);
    free(r->piece);
    r->whole = malloc(need * sizeof(float));
    r->piece = malloc((r->max_numel ? r->max_numel : 1) * sizeof(float));
    r->whole_cap = r->whole && r->piece ? need : 0;
    if (!r->whole_cap) return mt_seterr(MT_ENOMEM, "load: a buffer of %zu floats", need);
  }
  int rc = gather_tensor(c, r->tables, r->counts, p->name, array, rows, cols, r->piece, r->whole,
                         "load");
  if (rc) return rc;
  for (size_t e = 0; e < p->numel; e++) {
    size_t g = mt_param_global_index(p, e);
    out[e] = g / cols < rows ? r->whole[g] : 0.0f;
  }
  return 0;
}

/* ---- resharding ---------------------------------------------------------- */

/* The job of the resharded checkpoint: the saved one under tp x pp. */
static int resharded_job(const mt_ckpt *c, int tp, int pp, int v, mt_job *job, json_t **job_json) {
  json_t *j = recorded_job(c);
  json_t *par = j ? json_object_get(j, "parallel") : NULL;
  if (!json_is_object(par)) {
    json_decref(j);
    return mt_seterr(MT_EINVAL, "reshard: %s does not record its job (saved by an older mtnlgd)",
                     c->dir);
  }
  json_object_set_new(par, "tp", json_integer(tp));
  json_object_set_new(par, "pp", json_integer(pp));
  /* the saved job's chunks a stage, unless told; one stage interleaves nothing */
  if (v < 1 && pp < 2) v = 1;
  if (v > 0) json_object_set_new(par, "virtual_stages", json_integer(v));
  char *text = json_dumps(j, JSON_COMPACT);
  json_decref(j);
  int rc = text ? mt_job_parse(job, text, NULL, NULL, NULL) : MT_ENOMEM;
  free(text);
  if (rc) return mt_wraperr(rc, "reshard: tp %d x pp %d", tp, pp);
  char *canon = mt_job_to_json(job); /* the resolved job, as a save records it */
  *job_json = canon ? json_loads(canon, 0, NULL) : NULL;
  free(canon);
  return *job_json ? 0 : mt_seterr(MT_ENOMEM, "reshard: the job");
}

int mt_ckpt_reshard(const mt_ckpt *c, int tp, int pp, int virtual_stages, const char *out_job_dir) {
  if (tp < 1 || tp > 99 || pp < 1 || pp > 999) /* what shard file names hold */
    return mt_seterr(MT_EINVAL, "reshard: tp %d x pp %d: a checkpoint holds tp 1..99, pp 1..999",
                     tp, pp);
  mt_job old_job, new_job;
  json_t *new_job_json = NULL, *extra = NULL;
  mt_param **ot = NULL, **nt = NULL;
  int *oc = NULL, *nc = NULL, n_old = c->tp * c->pp, n_new = tp * pp;
  size_t *osz = NULL, *nsz = NULL, max_numel = 0;
  const mt_ckpt_file *f0 = mt_ckpt_file_of(c, 0, 0);
  int A = f0 ? f0->n_arrays : 0, begun = 0;
  float *whole[MT_CKPT_MAX_ARRAYS] = {0}, *piece[MT_CKPT_MAX_ARRAYS] = {0};
  const char *arrays[MT_CKPT_MAX_ARRAYS];
  mt_ckpt_shard_desc *desc = NULL;
  mt_ckpt_chunks chunks = {0};
  mt_ckpt_txn txn;
  int rc = saved_job(c, "reshard", &old_job);
  if (!rc) rc = resharded_job(c, tp, pp, virtual_stages, &new_job, &new_job_json);
  if (!rc && !f0) rc = mt_seterr(MT_ECORRUPT, "reshard: %s has no shard tp 0 pp 0", c->dir);
  for (int a = 0; a < A; a++) arrays[a] = f0->arrays[a];
  /* every file holds its shard of the saved model, the same arrays */
  if (!rc) rc = layout_tables(&old_job, c->tp, c->pp, &ot, &oc, &osz, &max_numel);
  for (int k = 0; k < n_old && !rc; k++) {
    const mt_ckpt_file *f = mt_ckpt_file_of(c, k % c->tp, k / c->tp);
    int same = f && f->n == osz[k] && f->n_arrays == A;
    for (int a = 0; same && a < A; a++) same = !strcmp(f->arrays[a], arrays[a]);
    if (!same)
      rc = mt_seterr(MT_ECORRUPT,
                     "reshard: %s: shard tp %d pp %d does not hold the job's %zu parameters in "
                     "the arrays of shard tp 0 pp 0",
                     c->dir, k % c->tp, k / c->tp, osz[k]);
  }
  if (!rc && (rc = layout_tables(&new_job, tp, pp, &nt, &nc, &nsz, &max_numel)))
    mt_wraperr(rc, "reshard: tp %d x pp %d", tp, pp);
  /* a whole tensor of each array (wte: its real rows) and a shard's piece */
  mt_gpt_config wc = shard_config(&old_job, 1, 1, 0, 0);
  mt_param *wt = NULL;
  int wn = 0;
  size_t wcount, whole_max = 0;
  if (!rc) rc = mt_gpt_table(&wc, &wt, &wn, &wcount);
  for (int i = 0; i < wn; i++)
    if (wt[i].numel > whole_max) whole_max = wt[i].numel;
  for (int a = 0; a < A && !rc; a++)
    if (!(whole[a] = malloc(whole_max * sizeof(float))) ||
        !(piece[a] = malloc((max_numel + 16) * sizeof(float)))) /* + a tensor's alignment */
      rc = mt_seterr(MT_ENOMEM, "reshard: buffers of %zu floats", whole_max);
  if (!rc && !(desc = calloc((size_t)n_new, sizeof *desc)))
    rc = mt_seterr(MT_ENOMEM, "reshard: shard list");
  if (!rc && !(rc = mt_ckpt_begin(&txn, out_job_dir, c->step))) begun = 1;
  for (int k = 0; k < n_new && !rc; k++) {
    desc[k] = (mt_ckpt_shard_desc){
        .tp = k % tp, .pp = k / tp, .n = nsz[k], .n_arrays = A, .arrays = arrays};
    rc = mt_ckpt_shard_create(&txn, &desc[k], &chunks);
  }
  size_t V = (size_t)old_job.model.vocab_size;
  for (int i = 0; i < wn && !rc; i++) {
    const mt_param *t = &wt[i];
    size_t cols = t->ndim == 2 ? t->full[1] : 1;
    size_t rows = mt_param_is_vocab(t->name) ? V : t->full[0]; /* padding: zero either way */
    for (int a = 0; a < A && !rc; a++)
      rc = gather_tensor(c, ot, oc, t->name, arrays[a], rows, cols, piece[a], whole[a], "reshard");
    /* scatter: every new shard holding it (the last stage's tied copy too),
     * with the zeros that align the next tensor: the file is covered whole */
    for (int k = 0; k < n_new && !rc; k++) {
      const mt_param *p = table_find(nt[k], nc[k], t->name);
      if (!p) continue;
      size_t next = p + 1 < nt[k] + nc[k] ? p[1].offset : nsz[k], span = next - p->offset;
      if (span < p->numel || span > p->numel + 16) {
        rc = mt_seterr(MT_EINVAL, "reshard: tensor %s: %zu floats to the next, %zu in it", t->name,
                       span, p->numel);
        break;
      }
      const float *src[MT_CKPT_MAX_ARRAYS];
      for (int a = 0; a < A; a++) {
        for (size_t e = 0; e < p->numel; e++) {
          size_t g = mt_param_global_index(p, e);
          piece[a][e] = g / cols < rows ? whole[a][g] : 0.0f;
        }
        for (size_t e = p->numel; e < span; e++) piece[a][e] = 0.0f;
        src[a] = piece[a];
      }
      rc = mt_ckpt_shard_write(&txn, &desc[k], p->offset, span, src, 0, &chunks);
    }
  }
  for (int k = 0; k < n_new && !rc; k++) rc = mt_ckpt_shard_commit(&txn, &desc[k]);
  if (!rc && !(extra = json_deep_copy(c->extra)))
    rc = mt_seterr(MT_ENOMEM, "reshard: the manifest's extra");
  if (!rc) {
    json_object_set(extra, "job", new_job_json);
    mt_ckpt_meta meta = {.job = new_job.name,
                         .job_hash = new_job.hash,
                         .step = c->step,
                         .consumed_samples = c->consumed_samples,
                         .consumed_tokens = c->consumed_tokens,
                         .seed = c->seed,
                         .rng = c->rng,
                         .data_position = c->data_position,
                         .tp = tp,
                         .pp = pp,
                         .dp = c->dp,
                         .extra = extra};
    rc = mt_ckpt_commit(&txn, &meta, desc, n_new, &chunks);
  }
  if (rc && begun) mt_ckpt_abort(&txn);
  for (int a = 0; a < A; a++) free(whole[a]), free(piece[a]);
  free(wt);
  free(desc);
  mt_ckpt_chunks_free(&chunks);
  free_tables(ot, oc, osz, n_old);
  free_tables(nt, nc, nsz, n_new);
  json_decref(new_job_json);
  json_decref(extra);
  return rc;
}
