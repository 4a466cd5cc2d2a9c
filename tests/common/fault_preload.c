/* fault_preload.c — an LD_PRELOAD library that makes reads of one file fail
 * with EIO, as a failing disk or a lost NFS server does, for tests of what a
 * program does when a read fails and when the same read works again.
 *
 *   MTNLG_FAULT_EIO_FILE  a path suffix ("step_00000020/shard_tp01_pp001.bin");
 *                         pread and pread64 of a file whose path ends so fail
 *   MTNLG_FAULT_EIO_COUNT how many of them fail (then reads work); < 0: all
 *   MTNLG_FAULT_EIO_FROM  only reads at this offset or later (default 0)
 *   MTNLG_FAULT_EIO_SKIP  let this many such reads through first (default 0)
 *
 * Each failure is written to stderr as "fault_preload: EIO on PATH at OFF",
 * so a test can tell that the fault was met. Unset, every read goes through.
 *
 * It can also hold writes, as a stalled disk or NFS server does, so that a
 * test sees a save in progress for as long as it needs, not by timing:
 *
 *   MTNLG_FAULT_HOLD_FILE  a path part ("shard_tp00_pp000.bin"); pwrite,
 *                          pwrite64 and fsync of a file whose path contains
 *                          it wait (fsync: a file written with write(), as
 *                          an export is, held once all of it is written)
 *   MTNLG_FAULT_HOLD_UNTIL until this path exists (polled every 20 ms)
 *
 * The first held write says "fault_preload: holding writes to PATH".
 *
 * And it can fill the disk for one file, as a checkpoint meets a full one:
 *
 *   MTNLG_FAULT_NOSPACE_FILE  a path part ("shard_tp01_pp001.bin"); fallocate
 *                             of a file whose path contains it fails with
 *                             ENOSPC (said on stderr as "fault_preload:
 *                             ENOSPC on PATH")
 *
 * And hold or slow write(2) to one file (MTNLG_FAULT_HOLD_WRITE_FILE,
 * MTNLG_FAULT_WRITE_DELAY_US, with MTNLG_FAULT_HOLD_UNTIL): below. */
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

typedef ssize_t (*pread_fn)(int, void *, size_t, off_t);

static const char *suffix;
static long long from;
static int skip; /* atomic: matching reads still to let through */
static int left; /* atomic: failures still to give, < 0 for all */

/* Once, as the library loads: before any thread reads. */
__attribute__((constructor)) static void setup(void) {
  const char *f = getenv("MTNLG_FAULT_EIO_FILE"), *c = getenv("MTNLG_FAULT_EIO_COUNT");
  const char *o = getenv("MTNLG_FAULT_EIO_FROM"), *k = getenv("MTNLG_FAULT_EIO_SKIP");
  suffix = f && *f ? f : NULL;
  from = o ? atoll(o) : 0;
  __atomic_store_n(&skip, k ? atoi(k) : 0, __ATOMIC_RELAXED);
  __atomic_store_n(&left, c ? atoi(c) : -1, __ATOMIC_RELAXED);
}

/* Whether this read fails: the file matches, the offset is in range, no
 * read is left to let through and a failure is left to give (taken here). */
static int fails(int fd, off_t off) {
  if (!suffix || off < from) return 0;
  char link[64], path[4096];
  snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
  ssize_t k = readlink(link, path, sizeof path - 1);
  if (k <= 0) return 0;
  path[k] = 0;
  size_t n = strlen(suffix);
  if ((size_t)k < n || strcmp(path + k - n, suffix)) return 0;
  int through = __atomic_load_n(&skip, __ATOMIC_RELAXED);
  while (through > 0)
    if (__atomic_compare_exchange_n(&skip, &through, through - 1, 0, __ATOMIC_RELAXED,
                                    __ATOMIC_RELAXED))
      return 0;
  int had = __atomic_load_n(&left, __ATOMIC_RELAXED);
  while (had != 0) {
    if (had < 0 ||
        __atomic_compare_exchange_n(&left, &had, had - 1, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
      fprintf(stderr, "fault_preload: EIO on %s at %lld\n", path, (long long)off);
      return 1;
    }
  }
  return 0;
}

static ssize_t through(const char *name, int fd, void *buf, size_t n, off_t off) {
  pread_fn real = (pread_fn)dlsym(RTLD_NEXT, name);
  if (!real) {
    errno = ENOSYS;
    return -1;
  }
  return real(fd, buf, n, off);
}

ssize_t pread(int fd, void *buf, size_t n, off_t off) {
  if (fails(fd, off)) {
    errno = EIO;
    return -1;
  }
  return through("pread", fd, buf, n, off);
}

ssize_t pread64(int fd, void *buf, size_t n, off64_t off) {
  if (fails(fd, off)) {
    errno = EIO;
    return -1;
  }
  return through("pread64", fd, buf, n, off);
}

typedef ssize_t (*pwrite_fn)(int, const void *, size_t, off_t);

/* Waits while fd's path contains MTNLG_FAULT_HOLD_FILE and the path
 * MTNLG_FAULT_HOLD_UNTIL does not exist. */
static void hold(int fd) {
  const char *part = getenv("MTNLG_FAULT_HOLD_FILE"), *until = getenv("MTNLG_FAULT_HOLD_UNTIL");
  if (!part || !*part || !until || !*until) return;
  char link[64], path[4096];
  snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
  ssize_t k = readlink(link, path, sizeof path - 1);
  if (k <= 0) return;
  path[k] = 0;
  if (!strstr(path, part)) return;
  static int told; /* atomic */
  if (access(until, F_OK) != 0 && !__atomic_exchange_n(&told, 1, __ATOMIC_RELAXED))
    fprintf(stderr, "fault_preload: holding writes to %s\n", path);
  struct timespec pause = {0, 20 * 1000 * 1000};
  while (access(until, F_OK) != 0) nanosleep(&pause, NULL);
}

static ssize_t write_through(const char *name, int fd, const void *buf, size_t n, off_t off) {
  pwrite_fn real = (pwrite_fn)dlsym(RTLD_NEXT, name);
  if (!real) {
    errno = ENOSYS;
    return -1;
  }
  return real(fd, buf, n, off);
}

ssize_t pwrite(int fd, const void *buf, size_t n, off_t off) {
  hold(fd);
  return write_through("pwrite", fd, buf, n, off);
}

ssize_t pwrite64(int fd, const void *buf, size_t n, off64_t off) {
  hold(fd);
  return write_through("pwrite64", fd, buf, n, off);
}

typedef int (*fsync_fn)(int);

int fsync(int fd) {
  hold(fd);
  fsync_fn real = (fsync_fn)dlsym(RTLD_NEXT, "fsync");
  if (!real) {
    errno = ENOSYS;
    return -1;
  }
  return real(fd);
}

typedef int (*fallocate_fn)(int, int, off_t, off_t);

/* Whether fd's path contains MTNLG_FAULT_NOSPACE_FILE (said if so). */
static int no_space(int fd) {
  const char *part = getenv("MTNLG_FAULT_NOSPACE_FILE");
  if (!part || !*part) return 0;
  char link[64], path[4096];
  snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
  ssize_t k = readlink(link, path, sizeof path - 1);
  if (k <= 0) return 0;
  path[k] = 0;
  if (!strstr(path, part)) return 0;
  fprintf(stderr, "fault_preload: ENOSPC on %s\n", path);
  return 1;
}

static int fallocate_through(const char *name, int fd, int mode, off_t off, off_t len) {
  if (no_space(fd)) {
    errno = ENOSPC;
    return -1;
  }
  fallocate_fn real = (fallocate_fn)dlsym(RTLD_NEXT, name);
  if (!real) {
    errno = ENOSYS;
    return -1;
  }
  return real(fd, mode, off, len);
}

int fallocate(int fd, int mode, off_t off, off_t len) {
  return fallocate_through("fallocate", fd, mode, off, len);
}

int fallocate64(int fd, int mode, off64_t off, off64_t len) {
  return fallocate_through("fallocate64", fd, mode, off, len);
}

/* And it can hold write(2) itself, as a hung NFS mount holds an append
 * (the writes above are pwrite's and fsync's), or slow it down:
 *
 *   MTNLG_FAULT_HOLD_WRITE_FILE  a path part ("events.out.tfevents."); write
 *                                of a file whose path contains it waits until
 *                                MTNLG_FAULT_HOLD_UNTIL exists (none: no hold)
 *   MTNLG_FAULT_WRITE_DELAY_US   then each such write sleeps this long first,
 *                                as a slow disk's (default 0)
 *
 * The first held write says "fault_preload: holding write(2) to PATH".
 * Read once, as the library loads: write(2) is every daemon's hottest call
 * under this library. */
typedef ssize_t (*write_fn)(int, const void *, size_t);

static const char *write_part, *write_until;
static long write_delay_us;

__attribute__((constructor)) static void setup_write(void) {
  const char *part = getenv("MTNLG_FAULT_HOLD_WRITE_FILE"),
             *until = getenv("MTNLG_FAULT_HOLD_UNTIL");
  const char *delay = getenv("MTNLG_FAULT_WRITE_DELAY_US");
  write_part = part && *part ? part : NULL;
  write_until = until && *until ? until : NULL;
  write_delay_us = delay ? atol(delay) : 0;
}

ssize_t write(int fd, const void *buf, size_t n) {
  if (write_part) {
    char link[64], path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t k = readlink(link, path, sizeof path - 1);
    if (k > 0) {
      path[k] = 0;
      static int told; /* atomic */
      if (strstr(path, write_part)) {
        if (write_until && access(write_until, F_OK) != 0) {
          if (!__atomic_exchange_n(&told, 1, __ATOMIC_RELAXED))
            fprintf(stderr, "fault_preload: holding write(2) to %s\n", path);
          struct timespec pause = {0, 20 * 1000 * 1000};
          while (access(write_until, F_OK) != 0) nanosleep(&pause, NULL);
        }
        if (write_delay_us > 0) {
          struct timespec d = {write_delay_us / 1000000, write_delay_us % 1000000 * 1000};
          nanosleep(&d, NULL);
        }
      }
    }
  }
  static write_fn real_write; /* atomic: every write comes here, so looked up once */
  write_fn real = __atomic_load_n(&real_write, __ATOMIC_RELAXED);
  if (!real)
    __atomic_store_n(&real_write, real = (write_fn)dlsym(RTLD_NEXT, "write"), __ATOMIC_RELAXED);
  if (!real) {
    errno = ENOSYS;
    return -1;
  }
  return real(fd, buf, n);
}
