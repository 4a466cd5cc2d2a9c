/* ckpt_export.h — a committed checkpoint's master weights written as
 * Hugging Face GPT-2 safetensors, offline (mtnlgctl ckpt export).
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

#endif
