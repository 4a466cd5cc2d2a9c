/* ckpt.h — checkpoint files: the shard format, the commit protocol, loading,
 * retention (proto/ckpt-v1.md is the contract).
 *
 * Pure file-level code: shard files of fp32 arrays and a manifest. It knows
 * nothing of the model, devices or communicators; the engine calls it from its
 * device threads and the coordinator. Every function is thread-safe and
 * leaves its message in the calling thread's mt_errmsg().
 * It must never exit or abort, never modify or delete a committed checkpoint
 * while writing a new one (a failed save leaves the old ones as they were),
 * and never let a reader see a checkpoint whose manifest.json is not committed.
 *
 * Writing, many writers (one per dp rank, any process):
 *   coordinator  mt_ckpt_begin(&txn, job_dir, step)   share txn with the writers
 *   one writer   mt_ckpt_shard_create(&txn, &desc, &chunks)   per shard file
 *   every writer mt_ckpt_shard_write(&txn, &desc, lo, n, arrays, 0, &chunks)
 *   one writer   mt_ckpt_shard_commit(&txn, &desc)      after all writes of it
 *   coordinator  mt_ckpt_commit(&txn, &meta, descs, n, &all_chunks)
 *                (on any failure: mt_ckpt_abort(&txn))
 * One writer in one process: mt_ckpt_save. Reading: mt_ckpt_find, mt_ckpt_read;
 * the checksums of a checkpoint opened by sizes, a file at a time:
 * mt_ckpt_verify_file (and mt_ckpt_find_below for the next older one).
 * After a resume that passed over damaged checkpoints: mt_ckpt_set_aside.
 */
#ifndef MT_CKPT_H
#define MT_CKPT_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#define MT_CKPT_VERSION 1
#define MT_CKPT_CHUNK_BYTES (16u << 20) /* default checksum piece: 16 MiB */
#define MT_CKPT_MAX_ARRAYS 8
#define MT_CKPT_NAME_MAX 32   /* array names: 1..31 of [A-Za-z0-9_.-] */
#define MT_CKPT_PATH_MAX 1280 /* job_dir and the paths under it */
/* step_<08d> + this (then .2, .3, ...): a damaged checkpoint set aside */
#define MT_CKPT_DAMAGED_SUFFIX ".damaged"
/* ... and one newer than the step a run was told to resume from
 * (checkpoint.resume_step): the timeline it rolled back from */
#define MT_CKPT_ROLLED_BACK_SUFFIX ".rolled-back"

/* What one shard file holds: n floats of each array, arrays in this order.
 * tp 0..99, pp 0..999; names borrowed (e.g. {"master", "adam_m", "adam_v"}). */
typedef struct mt_ckpt_shard_desc {
  int tp, pp;
  uint64_t n; /* floats per array, >= 1 */
  int n_arrays;
  const char *const *arrays;
} mt_ckpt_shard_desc;

/* One checksummed byte range [offset, offset+bytes) of shard (tp, pp). */
typedef struct mt_ckpt_chunk {
  int tp, pp;
  uint64_t offset, bytes;
  uint64_t xxh3; /* XXH3_64bits of the range */
} mt_ckpt_chunk;

/* A growable list of chunk records; zero-initialise, free with mt_ckpt_chunks_free. */
typedef struct mt_ckpt_chunks {
  mt_ckpt_chunk *v;
  size_t n, cap;
} mt_ckpt_chunks;

/* One checkpoint being written. A plain value: the coordinator fills it with
 * mt_ckpt_begin, a writer elsewhere with mt_ckpt_txn_set from the same fields. */
typedef struct mt_ckpt_txn {
  char job_dir[MT_CKPT_PATH_MAX]; /* <root>/<job> */
  int64_t step;
  char tag[48]; /* temp-file suffix shared by the writers: <file>.tmp.<tag> */
} mt_ckpt_txn;

/* What the manifest records besides the files. JSON values are borrowed and
 * copied; NULL means {}. */
typedef struct mt_ckpt_meta {
  const char *job;      /* job name */
  const char *job_hash; /* the job spec's hash (mt_job.hash) */
  int64_t step, consumed_samples, consumed_tokens;
  int64_t seed;                /* >= 0 */
  const json_t *rng;           /* generator state beyond the seed, opaque */
  const json_t *data_position; /* the data loader's position, opaque */
  int tp, pp, dp;              /* layout at save */
  const json_t *extra;         /* anything else the caller wants back */
} mt_ckpt_meta;

/* ---- writing ---- */

/* Whether checkpoints can go to job_dir, checked before the first step:
 * makes it (and its parents) and creates and removes a file in it. Found
 * only at the first save, an unwritable checkpoint.dir let a run train for
 * hours without a checkpoint. MT_EIO naming the directory and the error. */
int mt_ckpt_check_dir(const char *job_dir);

/* Claims <job_dir>/step_<08d>/ for a new checkpoint (making directories as
 * needed) and picks a fresh tag. An uncommitted directory of that step is
 * emptied; a committed one is un-committed and emptied, unless `latest` names
 * it or cannot be read: that is refused (MT_EINVAL). */
int mt_ckpt_begin(mt_ckpt_txn *t, const char *job_dir, int64_t step);
/* Fills t for a writer that was told (job_dir, step, tag); touches no file. */
int mt_ckpt_txn_set(mt_ckpt_txn *t, const char *job_dir, int64_t step, const char *tag);

/* Creates the shard's temp file at its full size with its header; appends the
 * header's chunk record to out. Exactly one writer per shard, before the others. */
int mt_ckpt_shard_create(const mt_ckpt_txn *t, const mt_ckpt_shard_desc *d, mt_ckpt_chunks *out);
/* Writes floats [lo, lo+n) of every array into the temp file and fsyncs it.
 * src[a] points at n floats of array a (the caller's slice, borrowed).
 * Appends one record per piece of at most chunk_bytes (0: MT_CKPT_CHUNK_BYTES).
 * On failure removes the temp file (the shard cannot be completed). */
int mt_ckpt_shard_write(const mt_ckpt_txn *t, const mt_ckpt_shard_desc *d, uint64_t lo, uint64_t n,
                        const float *const *src, size_t chunk_bytes, mt_ckpt_chunks *out);
/* After every writer of the shard returned: fsync, rename to the final name,
 * fsync the directory. */
int mt_ckpt_shard_commit(const mt_ckpt_txn *t, const mt_ckpt_shard_desc *d);

/* The commit point: checks every shard file is in place at its size and that
 * chunks (every writer's records, in any order) cover each file exactly once,
 * then writes manifest.json and `latest` durably. m->step must be t->step. */
int mt_ckpt_commit(const mt_ckpt_txn *t, const mt_ckpt_meta *m, const mt_ckpt_shard_desc *d,
                   int n_shards, const mt_ckpt_chunks *chunks);
/* After a failure: removes the step directory unless its manifest is committed. */
void mt_ckpt_abort(const mt_ckpt_txn *t);

/* All of the above for one writer holding every shard: data[i][a] points at
 * d[i].n floats of array a of shard i (borrowed). Aborts on failure. */
int mt_ckpt_save(const char *job_dir, const mt_ckpt_meta *m, const mt_ckpt_shard_desc *d,
                 const float *const *const *data, int n_shards, size_t chunk_bytes);

int mt_ckpt_chunks_add(mt_ckpt_chunks *c, const mt_ckpt_chunk *v, size_t n);
void mt_ckpt_chunks_free(mt_ckpt_chunks *c);
/* Chunk records as JSON ([{tp, pp, offset, bytes, xxh3: "<16 hex>"}]) for
 * sending through the store; _parse appends to c. */
json_t *mt_ckpt_chunks_json(const mt_ckpt_chunks *c);
int mt_ckpt_chunks_parse(const json_t *j, mt_ckpt_chunks *c);

/* ---- reading ---- */

/* One shard file of a committed checkpoint, as its manifest lists it. */
typedef struct mt_ckpt_file {
  char name[32]; /* shard_tpTT_ppPPP.bin */
  int tp, pp;
  uint64_t n, bytes;
  int n_arrays;
  char arrays[MT_CKPT_MAX_ARRAYS][MT_CKPT_NAME_MAX];
  size_t n_chunks;
  mt_ckpt_chunk *chunks; /* owned, by offset */
} mt_ckpt_file;

/* A committed checkpoint a find passed over because a check found it
 * damaged (MT_ECORRUPT: a shard missing, truncated or with a wrong header, a
 * broken manifest), not merely unreadable or of another format version. */
typedef struct mt_ckpt_damage {
  int64_t step;
  char why[768]; /* its first problem, as logged (may be cut short) */
} mt_ckpt_damage;

/* A committed checkpoint that passed its checks. Owns everything in it;
 * read-only after mt_ckpt_find (or _find_below), so threads may share it. */
typedef struct mt_ckpt {
  char dir[MT_CKPT_PATH_MAX]; /* the step directory */
  int64_t step, consumed_samples, consumed_tokens, seed;
  const char *job, *job_hash;          /* inside manifest */
  json_t *rng, *data_position, *extra; /* borrowed from manifest */
  int tp, pp, dp;                      /* layout at save */
  json_t *manifest;                    /* owned: the whole manifest */
  int n_files;
  mt_ckpt_file *files; /* owned */
  char *skipped;       /* owned: why newer checkpoints were passed over, or NULL */
  int n_damaged;
  mt_ckpt_damage *damaged; /* owned: those of them found damaged, newest first */
} mt_ckpt;

enum {
  MT_CKPT_VERIFY_SIZES = 0,     /* files present, sizes and headers right */
  MT_CKPT_VERIFY_CHECKSUMS = 1, /* and every chunk's XXH3 (reads everything) */
};

/* Opens a checkpoint of job_dir. step < 0: the one `latest` names, else the
 * newest committed step directory; one that fails its checks is skipped with
 * a warning (logged and kept in out->skipped, and in out->damaged when the
 * check found it damaged) for the previous committed one; one that could
 * not be read (MT_EIO, MT_ENOMEM: the check learnt nothing of it) is not
 * passed over but returned as the error, since an older one would train the
 * steps between again. step >= 0: exactly that step, or the error. MT_ENOENT
 * when there is none. */
int mt_ckpt_find(const char *job_dir, int64_t step, int verify, mt_ckpt *out);
/* The checkpoint dir names: a step directory (it holds manifest.json:
 * exactly that step of its job), or a job's directory (the one a resume
 * would load, as mt_ckpt_find with step < 0). */
int mt_ckpt_open_path(const char *dir, int verify, mt_ckpt *out);
/* As mt_ckpt_open_path, but a job's directory means exactly the checkpoint
 * its `latest` names (the newest committed step directory when it has no
 * `latest`): one that fails its checks is the error, never passed over for
 * an older one, and nothing is logged. For a caller that must start from
 * the weights it was named (checkpoint.load), not from older ones. */
int mt_ckpt_open_named(const char *dir, int verify, mt_ckpt *out);
/* As mt_ckpt_find with step < 0 (which is below = INT64_MAX), among the
 * checkpoints older than step `below`: for a caller whose own checks failed
 * the one it was given. Never newer than latest's target. MT_ENOENT when no
 * committed one is below; MT_ECORRUPT, with each one's problem, when none of
 * them passed; MT_EIO or MT_ENOMEM for the first that could not be read. */
int mt_ckpt_find_below(const char *job_dir, int64_t below, int verify, mt_ckpt *out);
void mt_ckpt_close(mt_ckpt *c);
/* The file of shard (tp, pp), or NULL. */
const mt_ckpt_file *mt_ckpt_file_of(const mt_ckpt *c, int tp, int pp);
/* Reads floats [lo, lo+n) of one array of shard (tp, pp) into out (n floats). */
int mt_ckpt_read(const mt_ckpt *c, int tp, int pp, const char *array, uint64_t lo, uint64_t n,
                 float *out);

/* Checks the header, size and every chunk's checksum of one shard file of c
 * (opened with MT_CKPT_VERIFY_SIZES), as MT_CKPT_VERIFY_CHECKSUMS would, on
 * the calling thread: many ranks can each take a file. 0 when clean, else the
 * first problem (file, chunk, checksums) in mt_errmsg(): MT_ECORRUPT, MT_EIO,
 * MT_ENOMEM, or MT_EINVAL when c has no shard (tp, pp). */
int mt_ckpt_verify_file(const mt_ckpt *c, int tp, int pp);

/* Checks every checksum of one checkpoint, calling report once per problem
 * (from the calling thread, in file order). 0 when clean, else MT_ECORRUPT or
 * MT_ENOENT with the first problem in mt_errmsg(). report may be NULL. */
typedef void (*mt_ckpt_report_fn)(void *arg, const char *problem);

/* msg without its leading "ckpt: ", for quoting inside another message. */
const char *mt_ckpt_unprefixed(const char *msg);
int mt_ckpt_verify(const char *step_dir, mt_ckpt_report_fn report, void *arg);

/* ---- the job directory ---- */

typedef struct mt_ckpt_entry {
  int64_t step;
  char path[MT_CKPT_PATH_MAX];
  uint64_t bytes;    /* shard files and manifest on disk */
  int64_t created;   /* unix seconds: when the manifest was committed */
  int latest;        /* 1 for the checkpoint `latest` names */
  char damaged[256]; /* "" or why it cannot load: "shard_tp00_pp000.bin: 100 of 1446976 bytes" */
} mt_ckpt_entry;

/* Committed checkpoints of job_dir by ascending step; *out is owned (free()).
 * Nothing is read but directory entries (a stat of every file), `latest`,
 * a shard's 64-byte header (its size against the one it gives) once for
 * each name and size in the listing, and the first 4 KiB of the newest
 * checkpoint's manifest and latest's (its step against the directory's,
 * where a resume looks); no data. */
int mt_ckpt_list(const char *job_dir, mt_ckpt_entry **out, size_t *n);

/* After a resume passed over the checkpoint of `step` as damaged and every
 * rank loaded the committed, older step `loaded` instead: renames
 * step_<08d> of `step` to step_<08d>.damaged, or .damaged.2, .3, ... when
 * that name is taken, then points `latest` at `loaded` (durably, as a commit
 * does; the job directory is fsynced either way). Nothing is deleted:
 * readers, listing and retention ignore the new name, and the step can be
 * saved again. moved_to (cap bytes, may be NULL; MT_CKPT_PATH_MAX is enough)
 * gets the new path once renamed, also when what follows fails. MT_EINVAL
 * when loaded is not committed or not older, MT_ENOENT when step has no
 * directory, MT_EIO when the rename, the fsync or writing latest failed. */
int mt_ckpt_set_aside(const char *job_dir, int64_t step, int64_t loaded, char *moved_to,
                      size_t cap);
/* The same with another suffix (MT_CKPT_ROLLED_BACK_SUFFIX): step need not
 * be damaged. */
int mt_ckpt_set_aside_as(const char *job_dir, int64_t step, int64_t loaded, const char *suffix,
                         char *moved_to, size_t cap);

/* Deletes old checkpoints: keeps the newest `keep` committed ones (0: all),
 * every step that is a multiple of keep_every (0: none), latest's target, and
 * every directory from the newest on (one may be being written). The newest
 * is latest's target when that is committed (directories newer than it are a
 * save whose latest write was lost, or a timeline rolled back from: neither
 * counted nor removed), else the newest committed step. Uncommitted
 * leftovers older than the newest go too.
 * *removed (may be NULL) counts the directories deleted. */
int mt_ckpt_prune(const char *job_dir, int keep, int64_t keep_every, int *removed);

#endif
