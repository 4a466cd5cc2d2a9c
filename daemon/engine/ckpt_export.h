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

/* c: opened with mt_ckpt_find. MT_EINVAL when its manifest records no job,
 * MT_ECORRUPT when the shards do not hold the job's model. */
int mt_ckpt_export(const mt_ckpt *c, const char *path);

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

#endif
