/* tboard.h — the run's scalars as TensorBoard event files, as Megatron's
 * --tensorboard-dir writes them: learning rate, batch size, loss, loss
 * scale, world size, gradient and params norms, the gradients' zeros, step
 * time, throughput and validation loss, one event per step, and one at the
 * samples read so far with Megatron's "<tag> vs samples" series. Only the
 * process holding world rank 0 writes.
 * Like the step line, writing never fails or stops a run: a directory or
 * file that cannot be written is said once and the run goes on without it.
 * Nor does it ever hold a step: every file and directory operation runs on
 * a writer thread of each mt_tboard's own (as torch's SummaryWriter queues
 * to its EventFileWriter's thread), so a file system that hangs costs
 * TensorBoard points, never the job's progress.
 */
#ifndef MT_TBOARD_H
#define MT_TBOARD_H

#include <stddef.h>
#include <stdint.h>

#include "train.h"

typedef struct mt_tboard mt_tboard;

/* Steps' points a writer holds at most before mt_tboard_step drops the
 * newest: some thousands of steps, so a rollback's rewrite (1.4 s at
 * 300,000 steps) loses nothing even at 100 steps a second, nor a file
 * system stalled for 40 s there, or for hours at a large model's pace. */
#define MT_TBOARD_QUEUE 4096

/* A writer for dir (made if missing) and its thread; nothing is opened
 * before the first step, and not before every older writer of this
 * process for the same dir (one a generation ended while the disk hung)
 * has ended, so this one's rollback decision reads all they wrote. NULL
 * when out of memory or dir is "" (no TensorBoard). */
mt_tboard *mt_tboard_new(const char *dir);

/* Queues st's scalars for the writer and returns at once; t may be NULL
 * (none). The writer appends them, in step order, to t's events file,
 * opened for the first (events.out.tfevents.<unix s>.<host>.<pid>.<n>). A
 * rollback (the directory, read as TensorBoard reads it, already shows a
 * step at or past this file's first, or a step that does not follow the
 * last one written) starts a new session at that step first, so
 * TensorBoard drops the points at and past it that the earlier run wrote
 * and the curve is the one the model followed; the "vs samples" points
 * that start also drops (their steps are samples, at least the step
 * numbers) are read back from the directory's files and written again
 * after it. A file that continues where the directory ends (a resize, a
 * resume) starts no session. With MT_TBOARD_QUEUE steps queued (the disk
 * slow or stuck) st is dropped and counted, said on the first drop and
 * then at most once a minute. Called from one thread at a time. */
void mt_tboard_step(mt_tboard *t, const mt_step_stats *st);

/* Steps' points t dropped for a full queue; 0 for NULL. */
uint64_t mt_tboard_dropped(const mt_tboard *t);
/* The same over every writer since the process started. */
uint64_t mt_tboard_dropped_total(void);

/* Writes what is queued, fsyncs and closes, waiting at most 2 s (the
 * caller is a node's loop thread, which must heartbeat again well within
 * cluster.heartbeat_timeout_ms); a writer the disk still holds then is
 * left to finish on its own, owning and freeing t, and what it still held
 * is said. t may be NULL. */
void mt_tboard_free(mt_tboard *t);

#endif
