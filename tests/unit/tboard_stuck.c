/* tboard_stuck.c — drives daemon/tboard.c while the disk holds its writer,
 * for test_tboard.py, which runs it under fault_preload and reads back the
 * files it leaves.
 *
 * usage: tboard_stuck DIR RELEASE
 * DIR holds an events file named for unix time 4000000000, so the first
 * writer names its file for 4000000001 (file_time: past the newest) and
 * the second for 4000000002; test_tboard.py has fault_preload hold every
 * write(2) to "tfevents.4000000001." until the path RELEASE exists, as a
 * hung network mount holds an append: the first writer's file is made, and
 * its first write never returns until then. Meanwhile:
 *   - MT_TBOARD_QUEUE + 1000 steps are queued, each call timed;
 *   - mt_tboard_free is timed: it waits its bound, then leaves the writer;
 *   - a second writer for the same directory gets steps 5 to 7 of a run
 *     rolled back to step 4 (losses of its own), and must open nothing
 *     while the first one is held.
 * Then RELEASE is made: the left writer writes what it holds and ends, and
 * only then does the second one read the directory for its rollback and
 * write; its free is timed too.
 * Prints key=value lines: steps, dropped, dropped_total, max_step_us,
 * all_steps_ms, free_ms, files_while_held, free2_ms, files_after.
 * Exits 1 on a failure of its own (a file); the checks are the Python
 * side's. SIGALRM ends it after 60 s, should a step or a free hang.
 */
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "monotime.h"
#include "tboard.h"

/* A step's scalars; loss0 tells the runs apart, the step the steps. */
static mt_step_stats stats(int64_t step, double loss0) {
  mt_step_stats st = {0};
  st.step = step;
  st.global_batch = 8;
  st.consumed_samples = 8 * step;
  st.consumed_tokens = 8 * 64 * step;
  st.loss = loss0 - 1e-3 * (double)step;
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
  if (argc != 3) {
    fprintf(stderr, "usage: tboard_stuck DIR RELEASE\n");
    return 2;
  }
  alarm(60);
  const char *dir = argv[1], *release = argv[2];

  mt_tboard *t = mt_tboard_new(dir);
  if (!t) return 1;
  int64_t steps = MT_TBOARD_QUEUE + 1000, max_ns = 0, all0 = mt_mono_ns();
  for (int64_t k = 1; k <= steps; k++) {
    mt_step_stats st = stats(k, 10.0);
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

  /* a new generation's writer for the directory, resumed from step 4's
   * checkpoint, while the old one is held */
  mt_tboard *t2 = mt_tboard_new(dir);
  if (!t2) return 1;
  for (int64_t k = 5; k <= 7; k++) {
    mt_step_stats st = stats(k, 20.0);
    mt_tboard_step(t2, &st);
  }
  usleep(300 * 1000);
  int files_while_held = events_files(dir);

  int fd = open(release, O_WRONLY | O_CREAT | O_EXCL, 0644);
  if (fd < 0) {
    perror(release);
    return 1;
  }
  close(fd);
  int64_t f2 = mt_mono_ns();
  mt_tboard_free(t2); /* the old writer ends, then this one writes all */
  int64_t free2_ns = mt_mono_ns() - f2;

  printf("steps=%lld\ndropped=%llu\ndropped_total=%llu\nmax_step_us=%.1f\nall_steps_ms=%.1f\n"
         "free_ms=%.1f\nfiles_while_held=%d\nfree2_ms=%.1f\nfiles_after=%d\n",
         (long long)steps, (unsigned long long)dropped,
         (unsigned long long)mt_tboard_dropped_total(), max_ns / 1e3, all_ns / 1e6, free_ns / 1e6,
         files_while_held, free2_ns / 1e6, events_files(dir));
  return 0;
}
