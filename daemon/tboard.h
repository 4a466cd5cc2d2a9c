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
 * system stalled for 40 s there, or for hours at a large model's pace, in
 * under 3 MB (a point is a step's mt_step_stats, its timers included, and
 * its time). The
 * oldest stay: the first queued point decides whether the file rolls back.
 * Once full, steps are dropped until the writer is down to half of it. */
#define MT_TBOARD_QUEUE 4096

/* A writer for dir (made if missing) and its thread; with timers
 * (train.log_timers_to_tensorboard, Megatron's --log-timers-to-tensorboard)
 * each step's event also holds "<timer>-time": a timer's most of any rank,
 * in seconds, as Megatron's timers.write puts them, for every timer of the
 * step's train.timing_log_level that some rank ran; with memory
 * (train.log_memory_to_tensorboard, Megatron's --log-memory-to-tensorboard)
 * mem-reserved-bytes, mem-allocated-bytes, mem-max-allocated-bytes and
 * mem-allocated-count of the step's device memory. Nothing is opened
 * before the first step, and not before every older writer of this daemon
 * (this process) for the same dir (one a generation ended while the disk
 * hung) has ended, so this one's rollback decision reads all they wrote.
 * A writer left on another node (world rank 0 moved since) is not known
 * here: its tail can land after this one's files, at the same steps. NULL
 * when out of memory or dir is "" (no TensorBoard). */
mt_tboard *mt_tboard_new(const char *dir, int timers, int memory);

/* Queues st's scalars for the writer and returns at once; t may be NULL
 * (none). The writer appends them, in step order, to t's events file,
 * opened for the first (events.out.tfevents.<unix s>.<host>.<pid>.<n>). A
 * rollback (the directory, read as TensorBoard reads it on the file's
 * first step and on a step back, already shows a step at or past this
 * one) starts a new session at that step first, so TensorBoard drops the
 * points at and past it that the earlier run wrote and the curve is the
 * one the model followed; the "vs samples" points that start also drops
 * (their steps are samples, at least the step numbers) are read back from
 * the directory's files and written again after it. A file that continues
 * where the directory ends (a resize, a resume) starts no session, nor
 * does a step past a gap the queue's drops left. With MT_TBOARD_QUEUE
 * steps queued (the disk slow or stuck) st is dropped and counted, and so
 * are the steps after it until half the queue is written; said on the
 * first drop and then at most once a minute. Called from one thread at a
 * time. */
void mt_tboard_step(mt_tboard *t, const mt_step_stats *st);

/* Steps t dropped for a full queue; 0 for NULL. For the test. */
uint64_t mt_tboard_dropped(const mt_tboard *t);
/* The same over every writer since the process started (not counting
 * what a writer left at the exit loses: mt_tboard_wait_left says that). */
uint64_t mt_tboard_dropped_total(void);
/* For the test: directory reads (rollback decisions) of every writer since
 * the process started, and the steps t holds queued. */
uint64_t mt_tboard_dir_reads(void);
size_t mt_tboard_queued(mt_tboard *t);

/* Writes what is queued, fsyncs and closes, waiting at most 2 s (the
 * caller is a node's loop thread, which must heartbeat again well within
 * cluster.heartbeat_timeout_ms); a writer the disk still holds then, or
 * one still waiting for an older writer of its directory (left at once),
 * is left to finish on its own, owning and freeing t, and what it still
 * held is said. t may be NULL. */
void mt_tboard_free(mt_tboard *t);

/* Waits at most timeout_ms until every writer mt_tboard_free left has
 * ended, before the daemon exits (no heartbeat needed then); returns how many are
 * still live, said as a warning: their points are lost, and the caller
 * must leave with _exit, since a writer may be inside stdio or a write. */
int mt_tboard_wait_left(int timeout_ms);

#endif
