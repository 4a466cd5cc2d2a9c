/* tboard_stuck.c — drives daemon/tboard.c against a writer the disk holds,
 * for test_tboard.py, which reads back what it wrote.
 *
 * usage: tboard_stuck DIR
 * The stuck writer's events go to a pipe whose buffer is full
 * (mt_tboard_new_fd), so its first write(2) blocks in the kernel as one to
 * a hung network mount does, until this program reads the pipe. Meanwhile:
 *   - MT_TBOARD_QUEUE + 1000 steps are queued, each call timed;
 *   - mt_tboard_free is timed: it waits its bound, then leaves the writer;
 *   - a second writer for the same directory (a real file there) gets 3
 *     steps and must open nothing while the first one is still held.
 * Then the pipe is drained (its filler dropped) into DIR/../stuck.tfevents
 * until the left writer closes it, and the second writer is freed.
 * Prints key=value lines: steps, dropped, dropped_total, max_step_us,
 * all_steps_ms, free_ms, files_while_held, stuck_file, drain_ms.
 * Exits 1 on a failure of its own (a pipe, a file); the checks are the
 * Python side's. SIGALRM ends it after 60 s, should a step or free hang.
 */
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "monotime.h"
#include "tboard.h"

/* The step's scalars, distinct per step so that the reader can tell them. */
static mt_step_stats stats(int64_t step) {
  mt_step_stats st = {0};
  st.step = step;
  st.global_batch = 8;
  st.consumed_samples = 8 * step;
  st.consumed_tokens = 8 * 64 * step;
  st.loss = 10.0 - 1e-3 * (double)step;
  st.lr = 1e-4;
  st.grad_norm = 1.0;
  st.step_ms = 1.0;
  st.world_size = 2;
  return st;
}

static int events_files(const char *dir) {
  DIR *d = opendir(dir);
  int n = 0;
  struct dirent *e;
  while (d && (e = readdir(d)))
    if (!strncmp(e->d_name, "events.out.tfevents.", 20)) n++;
  if (d) closedir(d);
  return n;
}

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: tboard_stuck DIR\n");
    return 2;
  }
  alarm(60);
  const char *dir = argv[1];
  if (mkdir(dir, 0755)) {
    perror(dir);
    return 1;
  }
  /* a pipe as small as Linux makes one, filled: the next write blocks */
  int p[2];
  if (pipe(p)) {
    perror("pipe");
    return 1;
  }
  fcntl(p[1], F_SETPIPE_SZ, 4096);
  fcntl(p[1], F_SETFL, O_NONBLOCK);
  char fill[4096];
  memset(fill, 'x', sizeof fill);
  size_t filled = 0;
  ssize_t w;
  while ((w = write(p[1], fill, sizeof fill)) > 0) filled += (size_t)w;
  fcntl(p[1], F_SETFL, 0); /* the writer's writes block, as a file's do */

  mt_tboard *t = mt_tboard_new_fd(dir, p[1]);
  if (!t) return 1;
  int64_t steps = MT_TBOARD_QUEUE + 1000, max_ns = 0, all0 = mt_mono_ns();
  for (int64_t k = 1; k <= steps; k++) {
    mt_step_stats st = stats(k);
    int64_t t0 = mt_mono_ns();
    mt_tboard_step(t, &st);
    int64_t dt = mt_mono_ns() - t0;
    if (dt > max_ns) max_ns = dt;
  }
  int64_t all_ns = mt_mono_ns() - all0;
  uint64_t dropped = mt_tboard_dropped(t);
  int64_t f0 = mt_mono_ns();
  mt_tboard_free(t); /* the writer is still held: left to go on alone */
  int64_t free_ns = mt_mono_ns() - f0;

  /* a new generation's writer for the same directory, the old one held */
  mt_tboard *t2 = mt_tboard_new(dir);
  if (!t2) return 1;
  for (int64_t k = 1; k <= 3; k++) {
    mt_step_stats st = stats(k);
    mt_tboard_step(t2, &st);
  }
  usleep(300 * 1000);
  int files_while_held = events_files(dir);

  /* release the held writer: its filler first, then its events to EOF,
   * which comes when the left writer has written all and closed */
  char out[4096 + 64];
  snprintf(out, sizeof out, "%s/../stuck.tfevents", dir);
  FILE *o = fopen(out, "wb");
  if (!o) {
    perror(out);
    return 1;
  }
  int64_t d0 = mt_mono_ns();
  char buf[65536];
  size_t skip = filled;
  ssize_t r;
  while ((r = read(p[0], buf, sizeof buf)) > 0) {
    size_t from = skip < (size_t)r ? skip : (size_t)r;
    skip -= from;
    fwrite(buf + from, 1, (size_t)r - from, o);
  }
  int64_t drain_ns = mt_mono_ns() - d0;
  fclose(o);
  close(p[0]);
  mt_tboard_free(t2);

  printf("steps=%lld\ndropped=%llu\ndropped_total=%llu\nmax_step_us=%.1f\nall_steps_ms=%.1f\n"
         "free_ms=%.1f\nfiles_while_held=%d\nstuck_file=%s\ndrain_ms=%.1f\n",
         (long long)steps, (unsigned long long)dropped,
         (unsigned long long)mt_tboard_dropped_total(), max_ns / 1e3, all_ns / 1e6, free_ns / 1e6,
         files_while_held, out, drain_ns / 1e6);
  return 0;
}
