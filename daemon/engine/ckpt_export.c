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
  const mt_model_spec *ms = &job->model;
  mt_gpt_config cfg = {.n_layer = ms->n_layer,
                       .n_embd = ms->n_embd,
                       .n_head = ms->n_head,
                       .vocab_size = ms->vocab_size,
                       .padded_vocab = ms->padded_vocab,
                       .max_seq = ms->seq_len,
                       .tp_size = tp,
                       .tp_rank = q};
  if (pp > 1) mt_stage_layers(ms->n_layer, pp, s, &cfg.layer_begin, &cfg.layer_end);
  return cfg;
}

/* The job a checkpoint was saved under, from its manifest (extra.job). */
static int saved_job(const mt_ckpt *c, mt_job *job) {
  const json_t *j = json_object_get(c->extra, "job");
  if (!json_is_object(j))
    return mt_seterr(MT_EINVAL,
                     "export: %s does not record its job (saved by an older mtnlgd), so its "
                     "model is unknown",
                     c->dir);
  char *text = json_dumps(j, JSON_COMPACT);
  if (!text) return mt_seterr(MT_ENOMEM, "export: %s: the job", c->dir);
  int rc = mt_job_parse(job, text, NULL, NULL, NULL);
  free(text);
  if (rc) return mt_wraperr(rc, "export: %s: the job it records", c->dir);
  if (job->parallel.tp != c->tp)
    return mt_seterr(MT_ECORRUPT, "export: %s: its job says tp %d, its layout tp %d", c->dir,
                     job->parallel.tp, c->tp);
  return 0;
}

int mt_ckpt_export(const mt_ckpt *c, const char *path) {
  mt_job job;
  int rc = saved_job(c, &job);
  if (rc) return rc;
  int tp = c->tp, pp = c->pp, n = tp * pp;
  mt_param **tables = calloc((size_t)n, sizeof *tables);
  int *counts = calloc((size_t)n, sizeof *counts);
  float *piece = NULL;
  size_t max_numel = 0;
  if (!tables || !counts) rc = mt_seterr(MT_ENOMEM, "export: shard tables");
  if (!rc && job.model.n_layer < pp)
    rc = mt_seterr(MT_ECORRUPT, "export: %s: %d stages for %d layers", c->dir, pp,
                   job.model.n_layer);
  /* every shard file holds exactly its shard's parameters, "master" first */
  for (int k = 0; k < n && !rc; k++) {
    int q = k % tp, s = k / tp;
    mt_gpt_config cfg = shard_config(&job, tp, pp, q, s);
    size_t count;
    if ((rc = mt_gpt_table(&cfg, &tables[k], &counts[k], &count))) break;
    const mt_ckpt_file *f = mt_ckpt_file_of(c, q, s);
    int has_master = 0;
    for (int a = 0; f && a < f->n_arrays; a++) has_master |= !strcmp(f->arrays[a], "master");
    if (!f || f->n != count || !has_master)
      rc = mt_seterr(MT_ECORRUPT,
                     "export: %s: shard tp %d pp %d %s; the job's model has %zu parameters there",
                     c->dir, q, s,
                     !f           ? "is missing"
                     : has_master ? "holds another number of parameters"
                                  : "has no \"master\" array",
                     count);
    for (int i = 0; !rc && i < counts[k]; i++)
      if (tables[k][i].numel > max_numel) max_numel = tables[k][i].numel;
  }
  if (!rc && !(piece = malloc((max_numel ? max_numel : 1) * sizeof *piece)))
    rc = mt_seterr(MT_ENOMEM, "export: a buffer of %zu floats", max_numel);
  mt_gpt_export *e = NULL;
  if (!rc) {
    mt_gpt_config whole = shard_config(&job, tp, pp, 0, 0);
    rc = mt_gpt_export_open(&e, &whole, path);
  }
  const mt_param *t;
  while (!rc && (t = mt_gpt_export_tensor(e))) {
    for (int s = 0, found = 0; s < pp && !found && !rc; s++)
      for (int q = 0; q < tp && !rc; q++) {
        const mt_param *p = NULL;
        for (int i = 0; i < counts[s * tp + q] && !p; i++)
          if (!strcmp(tables[s * tp + q][i].name, t->name)) p = &tables[s * tp + q][i];
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
  for (int k = 0; tables && k < n; k++) free(tables[k]);
  free(tables);
  free(counts);
  free(piece);
  return rc;
}
