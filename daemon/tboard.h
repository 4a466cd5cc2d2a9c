/* tboard.h — the run's scalars as TensorBoard event files, as Megatron's
 * --tensorboard-dir writes them: learning rate, batch size, loss, loss
 * scale, world size, gradient and params norms, the gradients' zeros, step
 * time, throughput and validation loss, one event per step, and one at the
 * samples read so far with Megatron's "<tag> vs samples" series. Only the
 * process holding world rank 0 writes.
 * Like the step line, writing never fails or stops a run: a directory or
 * file that cannot be written is said once and the run goes on without it.
 */
#ifndef MT_TBOARD_H
#define MT_TBOARD_H

#include <stddef.h>
#include <stdint.h>

#include "train.h"

typedef struct mt_tboard mt_tboard;

/* A writer for dir (made if missing); nothing is opened before the first
 * step. NULL when out of memory or dir is "" (no TensorBoard). */
mt_tboard *mt_tboard_new(const char *dir);

/* Appends st's scalars to t's events file, opened on the first call
 * (events.out.tfevents.<unix s>.<host>.<pid>.<n>). A rollback (the
 * directory, read as TensorBoard reads it, already shows a step at or past
 * this file's first, or a step that does not follow the last one written)
 * starts a new session at that step first, so TensorBoard drops the points
 * at and past it that the earlier run wrote and the curve is the one the
 * model followed; the "vs samples" points that start also drops (their
 * steps are samples, at least the step numbers) are read back from the
 * directory's files and written again after it. A file that continues
 * where the directory ends (a resize, a resume) starts no session.
 * Runs on world rank 0's thread: a write that hangs (a stuck network
 * mount) holds its step as a stuck checkpoint write would. */
void mt_tboard_step(mt_tboard *t, const mt_step_stats *st); /* t may be NULL: none */

/* Flushes to the disk and closes; t may be NULL. */
void mt_tboard_free(mt_tboard *t);

#endif
