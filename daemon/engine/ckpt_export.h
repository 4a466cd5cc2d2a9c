/* ckpt_export.h — a committed checkpoint's master weights written as
 * Hugging Face GPT-2 safetensors, offline (mtnlgctl ckpt export), and a
 * checkpoint rewritten under another tp x pp (mtnlgctl ckpt reshard).
 *
 * Reads the shard files of any (tp, pp) layout and writes the whole model
 * a tensor at a time; the model is the one the manifest's job names. The
 * file is the one `--export` at that step would write, byte for byte.
 * Never touches the checkpoint.
 */
#ifndef MT_CKPT_EXPORT_H
#define MT_CKPT_EXPORT_H

#include "ckpt.h"
#include "gpt.h"
#include "job.h"
#include "safetensors.h"

/* c: opened with mt_ckpt_find; the weights stored as dtype (fp32: the
 * master weights as they are; bf16, fp16: rounded to nearest even, a
 * value past fp16's range refused naming its tensor), with config.json
 * (safetensors.h). MT_EINVAL when its manifest records no job,
 * MT_ECORRUPT when the shards do not hold the job's model. */
int mt_ckpt_export(const mt_ckpt *c, const char *path, mt_st_dtype dtype);

/* Writes c under layout tp x pp as step c->step of out_job_dir (a job's
 * checkpoint directory, made if missing; `latest` names it), as Megatron's
 * checkpoint converter changes a model's parallel sizes: every array
 * (master weights, Adam moments) of every tensor moved to its new shards,
 * padded vocabulary rows zero, the manifest's job under the new layout
 * (its hash that job's), counters, data position and optimizer state kept.
 * Holds each array's largest whole tensor. virtual_stages: the chunks a
 * stage holds under the new layout (parallel.virtual_stages; 0 keeps the
 * saved job's, or 1 for pp 1). MT_EINVAL naming the key when the model cannot run so.
 * The caller keeps out_job_dir apart from c's own directory (a begin there
 * could replace checkpoints). */
int mt_ckpt_reshard(const mt_ckpt *c, int tp, int pp, int virtual_stages, const char *out_job_dir);

/* A checkpoint's tensors read for a shard of the same model under any
 * layout (checkpoint.load): export's reader, a tensor at a time. */
typedef struct mt_ckpt_tensors mt_ckpt_tensors;

/* Opens c's tensors (c outlives *out) and gives the job c records in *job:
 * MT_EINVAL when c records none, MT_ECORRUPT when its files do not hold
 * that job's model. */
int mt_ckpt_tensors_open(const mt_ckpt *c, mt_job *job, mt_ckpt_tensors **out);
/* Reads the elements of p (an entry of any shard table of the same model,
 * any tp and pp) from `array` into out (p->numel floats): straight from the
 * file of the shard that holds the same slice, else gathered whole from the
 * tp slices of the first stage holding it (padded vocabulary rows zero). */
int mt_ckpt_tensors_read(mt_ckpt_tensors *r, const char *array, const mt_param *p, float *out);
void mt_ckpt_tensors_close(mt_ckpt_tensors *r);

#endif
