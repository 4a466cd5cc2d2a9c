/* fileio.h — files written whole or not at all.
 *
 * Redis's durable write: a temp file beside the target, write, fsync,
 * rename over the target, fsync the directory. A crash leaves either the old
 * file or the complete new one, never a torn one. Used by safetensors export,
 * dataset writers and index caches, and by checkpoints when they come.
 */
#ifndef MT_FILEIO_H
#define MT_FILEIO_H

#include <stddef.h>

typedef struct mt_atomic_file {
  int fd;
  char *tmp; /* "<path>" + mt_tmp_suffix */
  char *path;
} mt_atomic_file;

/* ".tmp.<pid>.<8 random hex digits>" into buf (40 bytes): a temp file's
 * suffix no other writer of the same path shares, a daemon on another node
 * of a shared filesystem included, where pids repeat (a container's pid 1). */
void mt_tmp_suffix(char *buf, size_t n);

/* Creates the temp file (O_EXCL). Errors name the path. */
int mt_atomic_open(mt_atomic_file *f, const char *path);
int mt_atomic_write(mt_atomic_file *f, const void *buf, size_t n);
/* fsync, close, rename over path, fsync the directory; frees f's strings.
 * On failure the temp file is removed and the old file is untouched. */
int mt_atomic_commit(mt_atomic_file *f);
/* Closes and removes the temp file; frees f's strings. Safe after a failed open. */
void mt_atomic_abort(mt_atomic_file *f);

/* write(2) until done, retrying EINTR; `what` names the file in errors. */
int mt_write_all(int fd, const void *buf, size_t n, const char *what);
/* Removes dir and the files directly in it (a flat directory such as a file
 * store's); best effort, for cleaning up temporary directories. */
void mt_remove_dir(const char *dir);
/* fsync of the directory that holds path (path names a file). */
int mt_fsync_parent_dir(const char *path);

#endif
