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
 *   - mt_tboard_wait_left(200) finds the left writer still live;
 *   - a second writer for the same directory gets steps 5 to 7 of a run
 *     rolled back to step 4 (losses of its own), and must open nothing
 *     while the first one is held, and its free must leave it at once.
 * Then RELEASE is made: the left writer writes what it holds and ends, and
 * only then does the left second one read the directory for its rollback
 * and write (its file appears, waited for up to 30 s); then
 * mt_tboard_wait_left(30000) finds both ended.
 * Prints key=value lines: steps, dropped, dropped_total, max_step_us,
 * all_steps_ms, free_ms, left_held, files_while_held, free2_ms,
 * second_wrote_ms, left_end, files_after.
 *
 * usage: tboard_stuck slow DIR
 * The writer's disk is slow, not stuck (fault_preload's write delay on the
 * file for 4000000001): MT_TBOARD_QUEUE steps are queued at once, 3000
 * more at about one every 100 us, faster than the writer writes, then,
 * once the writer is down to half the queue, 10 more; freed, then
 * mt_tboard_wait_left(30000). Prints steps, dropped, dir_reads, left.
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

/* A slow disk: the queue stays full while the writer frees a slot at a
 * time; the steps it lets in are the test's (test_tboard.py). */
static int slow(const char *dir) {
  mt_tboard *t = mt_tboard_new(dir, 0, 0);
  if (!t) return 1;
  uint64_t reads0 = mt_tboard_dir_reads();
  int64_t k = 1;
  while (!mt_tboard_dropped(t) && k < 100000) {
    mt_step_stats st = stats(k++, 10.0);
    mt_tboard_step(t, &st);
  }
  for (int i = 0; i < 3000; i++) {
    mt_step_stats st = stats(k++, 10.0);
    mt_tboard_step(t, &st);
    usleep(100);
  }
  int64_t until = mt_mono_ms() + 20000;
  while (mt_tboard_queued(t) > MT_TBOARD_QUEUE / 2 && mt_mono_ms() < until) usleep(10 * 1000);
  for (int i = 0; i < 10; i++) {
    mt_step_stats st = stats(k++, 10.0);
    mt_tboard_step(t, &st);
  }
  uint64_t dropped = mt_tboard_dropped(t);
  mt_tboard_free(t);
  int left = mt_tboard_wait_left(30000);
  printf("steps=%lld\ndropped=%llu\ndir_reads=%llu\nleft=%d\n", (long long)(k - 1),
         (unsigned long long)dropped, (unsigned long long)(mt_tboard_dir_reads() - reads0), left);
  return 0;
}

int main(int argc, char **argv) {
  alarm(60);
  if (argc == 3 && !strcmp(argv[1], "slow")) return slow(argv[2]);
  if (argc != 3) {
    fprintf(stderr, "usage: tboard_stuck DIR RELEASE | tboard_stuck slow DIR\n");
    return 2;
  }
  const char *dir = argv[1], *release = argv[2];

  mt_tboard *t = mt_tboard_new(dir, 0, 0);
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
  int left_held = mt_tboard_wait_left(200);

  /* a new generation's writer for the directory, resumed from step 4's
   * checkpoint, while the old one is held */
  mt_tboard *t2 = mt_tboard_new(dir, 0, 0);
  if (!t2) return 1;
  for (int64_t k = 5; k <= 7; k++) {
    mt_step_stats st = stats(k, 20.0);
    mt_tboard_step(t2, &st);
  }
  usleep(300 * 1000);
  int files_while_held = events_files(dir);

  int64_t f2 = mt_mono_ns();
  mt_tboard_free(t2); /* still behind the old writer: left at once */
  int64_t free2_ns = mt_mono_ns() - f2;
  int fd = open(release, O_WRONLY | O_CREAT | O_EXCL, 0644);
  if (fd < 0) {
    perror(release);
    return 1;
  }
  close(fd);
  /* the old writer ends, then the second one opens its file and writes */
  int64_t w0 = mt_mono_ms();
  while (events_files(dir) < 3 && mt_mono_ms() - w0 < 30000) usleep(10 * 1000);
  int64_t second_wrote_ms = mt_mono_ms() - w0;
  int left_end = mt_tboard_wait_left(30000);

  printf("steps=%lld\ndropped=%llu\ndropped_total=%llu\nmax_step_us=%.1f\nall_steps_ms=%.1f\n"
         "free_ms=%.1f\nleft_held=%d\nfiles_while_held=%d\nfree2_ms=%.1f\nsecond_wrote_ms=%lld\n"
         "left_end=%d\nfiles_after=%d\n",
         (long long)steps, (unsigned long long)dropped,
         (unsigned long long)mt_tboard_dropped_total(), max_ns / 1e3, all_ns / 1e6, free_ns / 1e6,
         left_held, files_while_held, free2_ns / 1e6, (long long)second_wrote_ms, left_end,
         events_files(dir));
  return 0;
}
