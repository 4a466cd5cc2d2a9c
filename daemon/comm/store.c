#include "store.h"

#include "err.h"
#include "monotime.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* Parses the decimal integer an add left at a key; value is NUL-terminated. */
static int parse_count(const char *kind, const char *key, const char *value, int64_t *out) {
  char *end;
  errno = 0;
  long long v = strtoll(value, &end, 10);
  if (errno || end == value || *end)
    return mt_seterr(MT_EINVAL, "store(%s): add to key %s: its value \"%.40s\" is not an integer",
                     kind, key, value);
  *out = v;
  return 0;
}

/* ---------------------------------------------------------------- in-process */

typedef struct mem_entry {
  struct mem_entry *next;
  char *key;
  void *value;
  size_t bytes;
} mem_entry;

typedef struct mem_store {
  mt_store base;
  pthread_mutex_t mu;
  pthread_cond_t changed; /* broadcast on every set/add; waits use CLOCK_MONOTONIC */
  mem_entry *entries;
} mem_store;

static mem_entry *mem_find(mem_store *m, const char *key) {
  for (mem_entry *e = m->entries; e; e = e->next)
    if (!strcmp(e->key, key)) return e;
  return NULL;
}

/* Replaces (or creates) key's value with a copy of value; lock held. */
static int mem_put(mem_store *m, const char *key, const void *value, size_t bytes) {
  void *copy = malloc(bytes + 1);
  if (!copy)
    return mt_seterr(MT_ENOMEM, "store(mem): set %s: out of memory (%zu bytes)", key, bytes);
  if (bytes) memcpy(copy, value, bytes);
  ((char *)copy)[bytes] = 0;
  mem_entry *e = mem_find(m, key);
  if (!e) {
    e = calloc(1, sizeof *e);
    char *k = strdup(key);
    if (!e || !k) {
      free(e), free(k), free(copy);
      return mt_seterr(MT_ENOMEM, "store(mem): set %s: out of memory", key);
    }
    e->key = k;
    e->next = m->entries;
    m->entries = e;
  }
  free(e->value);
  e->value = copy;
  e->bytes = bytes;
  pthread_cond_broadcast(&m->changed);
  return 0;
}

static int mem_set(mt_store *s, const char *key, const void *value, size_t bytes) {
  mem_store *m = (mem_store *)s;
  pthread_mutex_lock(&m->mu);
  int rc = mem_put(m, key, value, bytes);
  pthread_mutex_unlock(&m->mu);
  return rc;
}

static int mem_get(mt_store *s, const char *key, void **value, size_t *bytes, int timeout_ms) {
  mem_store *m = (mem_store *)s;
  struct timespec deadline;
  clock_gettime(CLOCK_MONOTONIC, &deadline);
  if (timeout_ms > 0) {
    deadline.tv_sec += timeout_ms / 1000;
    deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000;
    if (deadline.tv_nsec >= 1000000000) deadline.tv_sec++, deadline.tv_nsec -= 1000000000;
  }
  pthread_mutex_lock(&m->mu);
  mem_entry *e;
  while (!(e = mem_find(m, key))) {
    if (timeout_ms == 0) break;
    if (timeout_ms < 0) {
      pthread_cond_wait(&m->changed, &m->mu);
    } else if (pthread_cond_timedwait(&m->changed, &m->mu, &deadline) == ETIMEDOUT) {
      e = mem_find(m, key);
      break;
    }
  }
  if (!e) {
    pthread_mutex_unlock(&m->mu);
    return mt_seterr(MT_ETIMEDOUT, "store(mem): key %s: not set within %d ms", key, timeout_ms);
  }
  void *copy = malloc(e->bytes + 1);
  if (copy) memcpy(copy, e->value, e->bytes + 1);
  size_t n = e->bytes;
  pthread_mutex_unlock(&m->mu);
  if (!copy) return mt_seterr(MT_ENOMEM, "store(mem): get %s: out of memory (%zu bytes)", key, n);
  *value = copy;
  if (bytes) *bytes = n;
  return 0;
}

static int mem_add(mt_store *s, const char *key, int64_t delta, int64_t *result) {
  mem_store *m = (mem_store *)s;
  pthread_mutex_lock(&m->mu);
  int64_t v = 0;
  int rc = 0;
  mem_entry *e = mem_find(m, key);
  if (e) rc = parse_count("mem", key, e->value, &v);
  if (!rc && __builtin_add_overflow(v, delta, &v))
    rc = mt_seterr(MT_EINVAL, "store(mem): key %s: adding %" PRId64 " overflows 64 bits", key,
                   delta);
  if (!rc) {
    char text[32];
    int n = snprintf(text, sizeof text, "%" PRId64, v);
    rc = mem_put(m, key, text, (size_t)n);
  }
  pthread_mutex_unlock(&m->mu);
  if (!rc && result) *result = v;
  return rc;
}

static int mem_check(mt_store *s, const char *key) {
  mem_store *m = (mem_store *)s;
  pthread_mutex_lock(&m->mu);
  int found = mem_find(m, key) != NULL;
  pthread_mutex_unlock(&m->mu);
  return found;
}

static int mem_del(mt_store *s, const char *key) {
  mem_store *m = (mem_store *)s;
  pthread_mutex_lock(&m->mu);
  mem_entry **p = &m->entries;
  while (*p && strcmp((*p)->key, key)) p = &(*p)->next;
  mem_entry *e = *p;
  if (e) *p = e->next;
  pthread_mutex_unlock(&m->mu);
  if (!e) return mt_seterr(MT_ENOENT, "store(mem): delete %s: no such key", key);
  free(e->key), free(e->value), free(e);
  return 0;
}

/* Unlinks every entry under prefix, then frees them outside the lock. */
static int mem_del_prefix(mt_store *s, const char *prefix, int64_t *deleted) {
  mem_store *m = (mem_store *)s;
  size_t n = strlen(prefix);
  int64_t count = 0;
  mem_entry *gone = NULL;
  pthread_mutex_lock(&m->mu);
  for (mem_entry **p = &m->entries; *p;) {
    mem_entry *e = *p;
    if (strncmp(e->key, prefix, n)) {
      p = &e->next;
      continue;
    }
    *p = e->next;
    e->next = gone, gone = e;
    count++;
  }
  pthread_mutex_unlock(&m->mu);
  for (mem_entry *e = gone, *next; e; e = next) {
    next = e->next;
    free(e->key), free(e->value), free(e);
  }
  if (deleted) *deleted = count;
  return 0;
}

static void mem_free(mt_store *s) {
  mem_store *m = (mem_store *)s;
  for (mem_entry *e = m->entries, *next; e; e = next) {
    next = e->next;
    free(e->key), free(e->value), free(e);
  }
  pthread_cond_destroy(&m->changed);
  pthread_mutex_destroy(&m->mu);
  free(m);
}

int mt_store_mem_new(mt_store **out) {
  mem_store *m = calloc(1, sizeof *m);
  if (!m) return mt_seterr(MT_ENOMEM, "store(mem): out of memory");
  pthread_condattr_t attr;
  pthread_condattr_init(&attr);
  pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
  pthread_cond_init(&m->changed, &attr);
  pthread_condattr_destroy(&attr);
  pthread_mutex_init(&m->mu, NULL);
  m->base = (mt_store){.set = mem_set,
                       .get = mem_get,
                       .add = mem_add,
                       .check = mem_check,
                       .del = mem_del,
                       .free = mem_free,
                       .kind = "mem",
                       .del_prefix = mem_del_prefix};
  *out = &m->base;
  return 0;
}

/* ---------------------------------------------------------------- file-backed */

typedef struct file_store {
  mt_store base;
  char *dir;
  unsigned long seq; /* temp file names; atomic */
} file_store;

/* dir/k=<key with every byte outside [A-Za-z0-9._-] as %XX>: a flat directory,
 * and no key can name a temp file (".tmp.*") or the lock (".lock"). */
static int key_path(file_store *f, const char *key, char *path, size_t cap) {
  int n = snprintf(path, cap, "%s/k=", f->dir);
  size_t len = (size_t)n, name = 2;
  for (const unsigned char *p = (const unsigned char *)key; *p; p++) {
    int plain = (*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
                *p == '.' || *p == '_' || *p == '-';
    if (len + 4 >= cap || name + 3 > 250)
      return mt_seterr(MT_EINVAL, "store(file): key %.80s...: too long for a file name", key);
    if (plain) {
      path[len++] = (char)*p, name++;
    } else {
      snprintf(path + len, 4, "%%%02X", *p);
      len += 3, name += 3;
    }
  }
  path[len] = 0;
  if (!*key) return mt_seterr(MT_EINVAL, "store(file): empty key");
  return 0;
}

static int write_all(int fd, const void *buf, size_t bytes) {
  const char *p = buf;
  while (bytes) {
    ssize_t w = write(fd, p, bytes);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) return -1;
    p += w, bytes -= (size_t)w;
  }
  return 0;
}

/* Writes value to a fresh temp file in the directory and renames it over path,
 * so a reader opens either the old value or the whole new one. */
static int file_put(file_store *f, const char *key, const char *path, const void *value,
                    size_t bytes) {
  char tmp[4096];
  unsigned long seq = __atomic_fetch_add(&f->seq, 1, __ATOMIC_RELAXED);
  snprintf(tmp, sizeof tmp, "%s/.tmp.%ld.%ld.%lu", f->dir, (long)getpid(), (long)gettid(), seq);
  int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0)
    return mt_seterr(MT_EIO, "store(file): set %s: create %s: %s", key, tmp, strerror(errno));
  if (write_all(fd, value, bytes) < 0) {
    int e = errno;
    close(fd), unlink(tmp);
    return mt_seterr(MT_EIO, "store(file): set %s: write %s: %s", key, tmp, strerror(e));
  }
  if (close(fd) < 0 || rename(tmp, path) < 0) {
    int e = errno;
    unlink(tmp);
    return mt_seterr(MT_EIO, "store(file): set %s: rename %s -> %s: %s", key, tmp, path,
                     strerror(e));
  }
  return 0;
}

static int file_set(mt_store *s, const char *key, const void *value, size_t bytes) {
  file_store *f = (file_store *)s;
  char path[4096];
  int rc = key_path(f, key, path, sizeof path);
  return rc ? rc : file_put(f, key, path, value, bytes);
}

/* Reads the whole file at path: 0, MT_ENOENT when absent, or MT_EIO. */
static int read_file(const char *key, const char *path, void **value, size_t *bytes) {
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0 && errno == ENOENT) return MT_ENOENT;
  if (fd < 0)
    return mt_seterr(MT_EIO, "store(file): get %s: open %s: %s", key, path, strerror(errno));
  struct stat st;
  if (fstat(fd, &st) < 0) {
    int e = errno;
    close(fd);
    return mt_seterr(MT_EIO, "store(file): get %s: stat %s: %s", key, path, strerror(e));
  }
  size_t n = (size_t)st.st_size, got = 0;
  char *buf = malloc(n + 1);
  if (!buf) {
    close(fd);
    return mt_seterr(MT_ENOMEM, "store(file): get %s: out of memory (%zu bytes)", key, n);
  }
  while (got < n) {
    ssize_t r = read(fd, buf + got, n - got);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) {
      int e = r < 0 ? errno : EIO;
      close(fd), free(buf);
      return mt_seterr(MT_EIO, "store(file): get %s: read %s: %s", key, path, strerror(e));
    }
    got += (size_t)r;
  }
  close(fd);
  buf[n] = 0;
  *value = buf;
  if (bytes) *bytes = n;
  return 0;
}

static int file_get(mt_store *s, const char *key, void **value, size_t *bytes, int timeout_ms) {
  file_store *f = (file_store *)s;
  char path[4096];
  int rc = key_path(f, key, path, sizeof path);
  if (rc) return rc;
  int64_t deadline = mt_mono_ms() + (timeout_ms > 0 ? timeout_ms : 0);
  long backoff_us = 500;
  for (;;) {
    rc = read_file(key, path, value, bytes);
    if (rc != MT_ENOENT) return rc;
    int64_t left = deadline - mt_mono_ms();
    if (timeout_ms == 0 || (timeout_ms > 0 && left <= 0))
      return mt_seterr(MT_ETIMEDOUT, "store(file): key %s: not set within %d ms (in %s)", key,
                       timeout_ms, f->dir);
    long sleep_us = backoff_us;
    if (timeout_ms > 0 && sleep_us > left * 1000) sleep_us = (long)left * 1000;
    usleep((useconds_t)sleep_us);
    if (backoff_us < 20000) backoff_us *= 2;
  }
}

static int file_add(mt_store *s, const char *key, int64_t delta, int64_t *result) {
  file_store *f = (file_store *)s;
  char path[4096], lock[4096];
  int rc = key_path(f, key, path, sizeof path);
  if (rc) return rc;
  snprintf(lock, sizeof lock, "%s/.lock", f->dir);
  int fd = open(lock, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0)
    return mt_seterr(MT_EIO, "store(file): add %s: open %s: %s", key, lock, strerror(errno));
  while (flock(fd, LOCK_EX) < 0) {
    if (errno == EINTR) continue;
    int e = errno;
    close(fd);
    return mt_seterr(MT_EIO, "store(file): add %s: flock %s: %s", key, lock, strerror(e));
  }
  int64_t v = 0;
  void *old = NULL;
  rc = read_file(key, path, &old, NULL);
  if (rc == MT_ENOENT)
    rc = 0;
  else if (!rc)
    rc = parse_count("file", key, old, &v);
  free(old);
  if (!rc && __builtin_add_overflow(v, delta, &v))
    rc = mt_seterr(MT_EINVAL, "store(file): key %s: adding %" PRId64 " overflows 64 bits", key,
                   delta);
  if (!rc) {
    char text[32];
    int n = snprintf(text, sizeof text, "%" PRId64, v);
    rc = file_put(f, key, path, text, (size_t)n);
  }
  flock(fd, LOCK_UN);
  close(fd);
  if (!rc && result) *result = v;
  return rc;
}

static int file_check(mt_store *s, const char *key) {
  file_store *f = (file_store *)s;
  char path[4096];
  int rc = key_path(f, key, path, sizeof path);
  if (rc) return rc;
  if (access(path, F_OK) == 0) return 1;
  if (errno == ENOENT) return 0;
  return mt_seterr(MT_EIO, "store(file): check %s: %s: %s", key, path, strerror(errno));
}

static int file_del(mt_store *s, const char *key) {
  file_store *f = (file_store *)s;
  char path[4096];
  int rc = key_path(f, key, path, sizeof path);
  if (rc) return rc;
  if (unlink(path) == 0) return 0;
  if (errno == ENOENT) return mt_seterr(MT_ENOENT, "store(file): delete %s: no such key", key);
  return mt_seterr(MT_EIO, "store(file): delete %s: unlink %s: %s", key, path, strerror(errno));
}

/* Unlinks every key file whose name starts with prefix's: a key's file name
 * encodes it byte by byte, so a key starts with prefix exactly when its name
 * starts with prefix's encoding. */
static int file_del_prefix(mt_store *s, const char *prefix, int64_t *deleted) {
  file_store *f = (file_store *)s;
  char path[4096];
  int rc = key_path(f, prefix, path, sizeof path);
  if (rc) return rc;
  const char *name = path + strlen(f->dir) + 1; /* "k=<encoded prefix>" */
  size_t n = strlen(name);
  DIR *d = opendir(f->dir);
  if (!d)
    return mt_seterr(MT_EIO, "store(file): delete keys under %s: opendir %s: %s", prefix, f->dir,
                     strerror(errno));
  int64_t count = 0;
  struct dirent *de;
  while ((de = readdir(d))) {
    if (strncmp(de->d_name, name, n)) continue;
    if (unlinkat(dirfd(d), de->d_name, 0) == 0) {
      count++;
    } else if (errno != ENOENT) {
      rc = mt_seterr(MT_EIO, "store(file): delete keys under %s: unlink %s/%s: %s", prefix, f->dir,
                     de->d_name, strerror(errno));
      break;
    }
  }
  closedir(d);
  if (deleted) *deleted = count;
  return rc;
}

static void file_free(mt_store *s) {
  file_store *f = (file_store *)s;
  free(f->dir);
  free(f);
}

int mt_store_file_new(const char *dir, mt_store **out) {
  if (!dir || !*dir) return mt_seterr(MT_EINVAL, "store(file): no directory given");
  if (strlen(dir) > 3000) return mt_seterr(MT_EINVAL, "store(file): directory name too long");
  if (mkdir(dir, 0755) < 0 && errno != EEXIST)
    return mt_seterr(MT_EIO, "store(file): mkdir %s: %s", dir, strerror(errno));
  struct stat st;
  if (stat(dir, &st) < 0 || !S_ISDIR(st.st_mode))
    return mt_seterr(MT_EIO, "store(file): %s is not a directory", dir);
  file_store *f = calloc(1, sizeof *f);
  if (!f || !(f->dir = strdup(dir))) {
    free(f);
    return mt_seterr(MT_ENOMEM, "store(file): out of memory");
  }
  f->base = (mt_store){.set = file_set,
                       .get = file_get,
                       .add = file_add,
                       .check = file_check,
                       .del = file_del,
                       .free = file_free,
                       .kind = "file",
                       .del_prefix = file_del_prefix};
  *out = &f->base;
  return 0;
}
