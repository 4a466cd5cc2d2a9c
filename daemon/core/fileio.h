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
#include <stdio.h>

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
/* All of the above for n bytes held in memory: path is the old file or buf. */
int mt_atomic_write_file(const char *path, const void *buf, size_t n);

/* A secret kept in a file (a bearer token, a cluster key), into buf (cap
 * bytes, NUL-terminated) with the trailing whitespace an editor or echo
 * leaves cut; *len its bytes. Errors name `what` (the config key) and the
 * path: MT_ENOENT when there is no such file, MT_EINVAL for one that
 * cannot be read or holds more than cap - 1 bytes (buf then ""). Warns,
 * saying what anyone who reads it can do (`risk`), when other users can
 * (risk NULL: not a secret, such as a certificate; no warning). */
int mt_read_secret_file(const char *path, const char *what, const char *risk, char *buf, size_t cap,
                        size_t *len);

/* The one rule for a bearer token's file, the daemon's control.token_file
 * and mtnlgctl's --token-file alike, so a token one takes the other can
 * give: one word of printable ASCII (0x21..0x7e), whitespace (the newline
 * an editor or echo leaves) allowed around it. Of buf's n bytes: 0 with the
 * word at buf + *off, *len bytes (0: the file is blank); -1 with *bad_at
 * the offset of the first byte that breaks it (a space, a line break, a
 * control or non-ASCII byte inside the word, or a second word). */
int mt_token_word(const char *buf, size_t n, size_t *off, size_t *len, size_t *bad_at);
/* What the byte at bad_at (mt_token_word's) is, for a message, into out:
 * whitespace inside the text, "a line break (0x0a) at byte 12 between two
 * words: the file holds more than one word or line"; anything else, "byte
 * 0xc3 at offset 1 is not printable ASCII (0x21..0x7e)", naming a control
 * character or a non-ASCII byte (UTF-8 text, a BOM) as such. */
void mt_token_word_why(const char *buf, size_t bad_at, char *out, size_t size);

/* write(2) until done, retrying EINTR; `what` names the file in errors. */
int mt_write_all(int fd, const void *buf, size_t n, const char *what);
/* Removes dir and all it holds, subdirectories too; links are removed, not
 * followed. Carries on past an entry it cannot remove; returns 0 or MT_EIO
 * naming the first that failed. */
int mt_remove_tree(const char *dir);
/* The same, best effort, for cleaning up temporary directories. */
void mt_remove_dir(const char *dir);
/* The directory the relative paths in a file read from path are taken
 * from (f: that file, open): path's directory made absolute, into dir. ""
 * when the file is no file in a directory: a pipe (`<(...)`), or a
 * descriptor's name (`/dev/stdin`, `/dev/fd/N`, `/proc/self/fd/N`),
 * redirected from a file or not. MT_EIO naming `what` and path when the directory cannot be
 * resolved (or does not fit in cap), else 0. */
int mt_file_dir(FILE *f, const char *path, const char *what, char *dir, size_t cap);
/* fsync of the directory that holds path (path names a file). */
int mt_fsync_parent_dir(const char *path);
/* mkdir -p: every directory made is fsynced into its parent, so what is
 * committed under it later cannot vanish with it in a power cut. MT_EIO
 * naming the directory that could not be made, or dir when it is no
 * directory. */
int mt_make_dirs(const char *dir);

#endif
