#include "fileio.h"

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "err.h"
#include "log.h"

int mt_write_all(int fd, const void *buf, size_t n, const char *what) {
  const uint8_t *p = buf;
  while (n) {
    ssize_t k = write(fd, p, n > (1u << 30) ? (1u << 30) : n);
    if (k < 0) {
      if (errno == EINTR) continue;
      return mt_seterr(MT_EIO, "write %s: %s", what, strerror(errno));
    }
    if (k == 0) /* POSIX allows it for no reason it gives: not forever */
      return mt_seterr(MT_EIO, "write %s: the file took no bytes", what);
    p += k;
    n -= (size_t)k;
  }
  return 0;
}

int mt_file_dir(FILE *f, const char *path, const char *what, char *dir, size_t cap) {
  struct stat st;
  dir[0] = 0;
  /* a descriptor's name (/dev/stdin, /dev/fd/N, /proc/self/fd/N) is no
   * directory of the file behind it; /dev/shm/job.json is a file like any */
  int descriptor = !strcmp(path, "/dev/stdin") || !strncmp(path, "/dev/fd/", 8) ||
                   (!strncmp(path, "/proc/", 6) && strstr(path, "/fd/"));
  if (fstat(fileno(f), &st) || !S_ISREG(st.st_mode) || descriptor) return 0;
  char *copy = strdup(path);
  if (!copy) return mt_seterr(MT_ENOMEM, "%s %s: out of memory", what, path);
  char *slash = strrchr(copy, '/');
  if (slash) *(slash == copy ? slash + 1 : slash) = 0;
  char *abs = realpath(slash ? copy : ".", NULL);
  int rc = 0;
  if (!abs)
    rc = mt_seterr(MT_EIO, "%s %s: cannot resolve its directory %s: %s", what, path,
                   slash ? copy : ".", strerror(errno));
  else if ((size_t)snprintf(dir, cap, "%s", abs) >= cap)
    rc = mt_seterr(MT_EIO, "%s %s: its directory %s is longer than %zu bytes", what, path, abs,
                   cap - 1);
  if (rc) dir[0] = 0;
  free(abs);
  free(copy);
  return rc;
}

int mt_fsync_parent_dir(const char *path) {
  char *copy = strdup(path);
  if (!copy) return mt_seterr(MT_ENOMEM, "fsync directory of %s: out of memory", path);
  const char *dir = dirname(copy);
  int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  int rc = 0;
  if (fd < 0 || fsync(fd)) rc = mt_seterr(MT_EIO, "fsync directory %s: %s", dir, strerror(errno));
  if (fd >= 0) close(fd);
  free(copy);
  return rc;
}

void mt_tmp_suffix(char *buf, size_t n) {
  uint32_t r;
  if (getrandom(&r, sizeof r, GRND_NONBLOCK) != sizeof r)
    r = (uint32_t)time(NULL) ^ (uint32_t)clock() ^ (uint32_t)(uintptr_t)buf;
  snprintf(buf, n, ".tmp.%ld.%08x", (long)getpid(), r);
}

int mt_atomic_open(mt_atomic_file *f, const char *path) {
  f->fd = -1;
  f->path = strdup(path);
  size_t n = strlen(path) + 48;
  f->tmp = malloc(n);
  if (!f->path || !f->tmp) {
    mt_atomic_abort(f);
    return mt_seterr(MT_ENOMEM, "%s: out of memory", path);
  }
  char suffix[40];
  mt_tmp_suffix(suffix, sizeof suffix);
  snprintf(f->tmp, n, "%s%s", path, suffix);
  f->fd = open(f->tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (f->fd < 0) {
    int rc = mt_seterr(MT_EIO, "create %s: %s", f->tmp, strerror(errno));
    free(f->tmp), free(f->path);
    f->tmp = f->path = NULL;
    return rc;
  }
  return 0;
}

int mt_atomic_write(mt_atomic_file *f, const void *buf, size_t n) {
  return mt_write_all(f->fd, buf, n, f->tmp);
}

int mt_atomic_commit(mt_atomic_file *f) {
  int rc = 0;
  if (fsync(f->fd)) rc = mt_seterr(MT_EIO, "fsync %s: %s", f->tmp, strerror(errno));
  if (close(f->fd) && !rc) rc = mt_seterr(MT_EIO, "close %s: %s", f->tmp, strerror(errno));
  f->fd = -1;
  if (!rc && rename(f->tmp, f->path))
    rc = mt_seterr(MT_EIO, "rename %s -> %s: %s", f->tmp, f->path, strerror(errno));
  if (!rc) rc = mt_fsync_parent_dir(f->path);
  if (rc) unlink(f->tmp);
  free(f->tmp), free(f->path);
  f->tmp = f->path = NULL;
  return rc;
}

void mt_atomic_abort(mt_atomic_file *f) {
  if (f->fd >= 0) close(f->fd);
  if (f->tmp) unlink(f->tmp);
  free(f->tmp), free(f->path);
  f->fd = -1;
  f->tmp = f->path = NULL;
}

int mt_read_secret_file(const char *path, const char *what, const char *risk, char *buf, size_t cap,
                        size_t *len) {
  *len = 0;
  buf[0] = 0;
  FILE *f = fopen(path, "r");
  if (!f)
    return mt_seterr(errno == ENOENT ? MT_ENOENT : MT_EINVAL, "%s %s: %s", what, path,
                     strerror(errno));
  struct stat st;
  if (risk && !fstat(fileno(f), &st) && (st.st_mode & 077))
    mt_log_warn("%s %s can be read by other users (mode %03o): anyone who reads it %s; chmod 600 "
                "it",
                what, path, (unsigned)(st.st_mode & 0777), risk);
  size_t room = cap + 64; /* the longest secret and the newlines after it */
  char *tmp = malloc(room);
  if (!tmp) {
    fclose(f);
    return mt_seterr(MT_ENOMEM, "%s %s: out of memory", what, path);
  }
  size_t n = fread(tmp, 1, room, f);
  int err = ferror(f) ? errno : 0;
  fclose(f);
  while (n && isspace((unsigned char)tmp[n - 1])) n--;
  int rc = 0;
  if (err)
    rc = mt_seterr(MT_EINVAL, "%s %s: %s", what, path, strerror(err));
  else if (n >= cap)
    rc = mt_seterr(MT_EINVAL, "%s %s: over %zu bytes", what, path, cap - 1);
  if (!rc) {
    memcpy(buf, tmp, n);
    buf[n] = 0;
    *len = n;
  }
  explicit_bzero(tmp, room);
  free(tmp);
  return rc;
}

int mt_token_word(const char *buf, size_t n, size_t *off, size_t *len, size_t *bad_at) {
  size_t b = 0, e = n;
  while (b < e && isspace((unsigned char)buf[b])) b++;
  while (e > b && isspace((unsigned char)buf[e - 1])) e--;
  *off = b, *len = 0, *bad_at = 0;
  for (size_t i = b; i < e; i++)
    if ((unsigned char)buf[i] < 0x21 || (unsigned char)buf[i] > 0x7e) {
      *bad_at = i;
      return -1;
    }
  *len = e - b;
  return 0;
}

void mt_token_word_why(const char *buf, size_t bad_at, char *out, size_t size) {
  unsigned char b = (unsigned char)buf[bad_at];
  if (isspace(b)) /* trailing whitespace was stripped: a word follows */
    snprintf(out, size,
             "%s (0x%02x) at byte %zu between two words: the file holds more than one word or "
             "line",
             b == ' '                 ? "a space"
             : b == '\t'              ? "a tab"
             : b == '\n' || b == '\r' ? "a line break"
                                      : "whitespace",
             b, bad_at);
  else
    snprintf(out, size, "byte 0x%02x at offset %zu is not printable ASCII (0x21..0x7e): %s", b,
             bad_at,
             b >= 0x80 ? "a non-ASCII character (UTF-8 text, a byte-order mark?)"
                       : "a control character");
}

int mt_atomic_write_file(const char *path, const void *buf, size_t n) {
  mt_atomic_file f;
  int rc = mt_atomic_open(&f, path);
  if (rc) return rc;
  if ((rc = mt_atomic_write(&f, buf, n))) {
    mt_atomic_abort(&f);
    return rc;
  }
  return mt_atomic_commit(&f);
}

/* Removes the directory `name` under dir_fd and all it holds (an operator's
 * notes, a tool's output): links are removed, never followed. shown is its
 * path for messages. Carries on past an entry it cannot remove and returns
 * the first failure. */
static int remove_dir_at(int dir_fd, const char *name, const char *shown, int depth) {
  if (depth > 32) return mt_seterr(MT_EIO, "remove %s: nested over 32 levels", shown);
  int fd = openat(dir_fd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return 0;
    return mt_seterr(MT_EIO, "open directory %s: %s", shown, strerror(errno));
  }
  DIR *d = fdopendir(fd);
  if (!d) {
    int e = errno;
    close(fd);
    return mt_seterr(MT_EIO, "open directory %s: %s", shown, strerror(e));
  }
  int rc = 0;
  char first[1024] = ""; /* the first failure's message: later ones overwrite mt_errmsg */
  struct dirent *e;
  while ((e = readdir(d))) {
    if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
    char path[4352];
    snprintf(path, sizeof path, "%s/%s", shown, e->d_name);
    struct stat st;
    int sub = !fstatat(fd, e->d_name, &st, AT_SYMLINK_NOFOLLOW) && S_ISDIR(st.st_mode);
    int r = sub ? remove_dir_at(fd, e->d_name, path, depth + 1) : 0;
    if (!sub && unlinkat(fd, e->d_name, 0) && errno != ENOENT)
      r = mt_seterr(MT_EIO, "remove %s: %s", path, strerror(errno));
    if (r && !rc) {
      rc = r;
      snprintf(first, sizeof first, "%s", mt_errmsg());
    }
  }
  closedir(d);
  if (rc) return mt_seterr(rc, "%s", first);
  if (unlinkat(dir_fd, name, AT_REMOVEDIR) && errno != ENOENT)
    return mt_seterr(MT_EIO, "remove directory %s: %s", shown, strerror(errno));
  return 0;
}

int mt_remove_tree(const char *dir) { return remove_dir_at(AT_FDCWD, dir, dir, 0); }

void mt_remove_dir(const char *dir) { (void)mt_remove_tree(dir); }

int mt_make_dirs(const char *dir) {
  if (!*dir) return mt_seterr(MT_EINVAL, "make directory: the path is empty");
  char path[4096];
  if (snprintf(path, sizeof path, "%s", dir) >= (int)sizeof path)
    return mt_seterr(MT_EINVAL, "make directory %.200s...: the path is too long", dir);
  for (char *p = path + 1;; p++) {
    if (*p != '/' && *p) continue;
    char c = *p;
    *p = 0;
    int made = mkdir(path, 0755) == 0;
    if (!made && errno != EEXIST)
      return mt_seterr(MT_EIO, "make directory %s: %s", path, strerror(errno));
    int rc = made ? mt_fsync_parent_dir(path) : 0;
    if (rc) return mt_wraperr(rc, "made directory %s", path);
    if (!c) break;
    *p = c;
  }
  struct stat st;
  if (stat(dir, &st) || !S_ISDIR(st.st_mode))
    return mt_seterr(MT_EIO, "%s is not a directory", dir);
  return 0;
}
