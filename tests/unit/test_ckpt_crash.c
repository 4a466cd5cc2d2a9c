/* test_ckpt_crash.c — the commit protocol under SIGKILL.
 *
 * ckpt_writer (argv[1]) writes 8 MB checkpoints in a loop; it is killed at a
 * random moment, 20 times, each run resuming from the last. After every kill
 * `latest` must name a committed checkpoint that verifies and holds that
 * step's data, found without skipping anything, and a partly written step
 * must never be latest. */
#include <dirent.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "ckpt.h"
#include "ckpt_testdata.h"
#include "err.h"
#include "log.h"
#include "mt_check.h"

#define TRIALS 20
#define FLOATS "350000" /* 2 shards x 3 arrays x 350000 x 4 B = 8.4 MB */

static const char *writer;

/* Runs the writer; kills it after delay_s (< 0: lets it finish). Returns 0
 * when it was killed or exited 0. */
static int run_writer(const char *job, const char *count, double delay_s) {
  pid_t pid = fork();
  if (pid == 0) {
    execl(writer, writer, job, count, FLOATS, (char *)NULL);
    perror(writer);
    _exit(127);
  }
  if (pid < 0) return -1;
  if (delay_s >= 0) {
    usleep((useconds_t)(delay_s * 1e6));
    kill(pid, SIGKILL);
  }
  int status;
  waitpid(pid, &status, 0);
  if (WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) return 0;
  return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : -1;
}

/* Traces of a kill: step directories without a manifest, and temp files.
 * *sig changes whenever those traces do (names, directory mtimes), so a trace
 * left by an earlier trial is not counted again. Checks none is latest's. */
static int count_partial(const char *job, int64_t latest, uint64_t *sig) {
  int partial = 0;
  uint64_t h = 1469598103934665603ull;
  DIR *d = opendir(job);
  struct dirent *e;
  while (d && (e = readdir(d))) {
    int trace = strstr(e->d_name, ".tmp.") != NULL;
    if (!strncmp(e->d_name, "step_", 5)) {
      char path[512];
      struct stat st;
      snprintf(path, sizeof path, "%s/%s/manifest.json", job, e->d_name);
      if (access(path, F_OK)) {
        trace = 1;
        CHECK(strtoll(e->d_name + 5, NULL, 10) != latest, "latest names uncommitted %s", e->d_name);
        snprintf(path, sizeof path, "%s/%s", job, e->d_name);
        if (!stat(path, &st)) h = (h ^ (uint64_t)st.st_mtim.tv_nsec) * 1099511628211ull;
      }
    }
    if (!trace) continue;
    partial++;
    for (const char *c = e->d_name; *c; c++) h = (h ^ (uint8_t)*c) * 1099511628211ull;
  }
  if (d) closedir(d);
  if (sig) *sig = h;
  return partial;
}

static int check_latest(const char *job, int64_t *prev_step) {
  mt_ckpt c;
  int rc = mt_ckpt_find(job, -1, MT_CKPT_VERIFY_CHECKSUMS, &c);
  REQUIRE(rc == 0, "%s", mt_errmsg());
  CHECK(!c.skipped, "latest failed its checks: %s", c.skipped);
  char path[512], text[64] = "";
  snprintf(path, sizeof path, "%s/latest", job);
  FILE *fp = fopen(path, "r");
  REQUIRE(fp && fgets(text, sizeof text, fp), "read %s", path);
  fclose(fp);
  CHECK(strtoll(text + 5, NULL, 10) == c.step, "latest says %s, loaded %" PRId64, text, c.step);
  CHECK(c.step >= *prev_step, "went back from step %" PRId64 " to %" PRId64, *prev_step, c.step);
  *prev_step = c.step;
  CHECK(mt_ckpt_verify(c.dir, NULL, NULL) == 0, "%s", mt_errmsg());
  /* every float of the step latest names */
  for (int i = 0; i < c.n_files; i++) {
    const mt_ckpt_file *f = &c.files[i];
    float *got = malloc(f->n * sizeof *got);
    for (int a = 0; a < f->n_arrays; a++) {
      REQUIRE(mt_ckpt_read(&c, f->tp, f->pp, f->arrays[a], 0, f->n, got) == 0, "%s", mt_errmsg());
      uint64_t bad = 0;
      for (uint64_t k = 0; k < f->n; k++)
        bad += got[k] != ckpt_test_value(c.step, f->tp, f->pp, a, k);
      CHECK(bad == 0, "step %" PRId64 " %s %s: %" PRIu64 " floats differ", c.step, f->name,
            f->arrays[a], bad);
    }
    free(got);
  }
  count_partial(job, c.step, NULL);
  mt_ckpt_close(&c);
  return 0;
}

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: test_ckpt_crash CKPT_WRITER\n");
    return 2;
  }
  writer = argv[1];
  mt_log_set_level(MT_LOG_ERROR);
  snprintf(tmpdir, sizeof tmpdir, "/tmp/mt_test_ckpt_crash.XXXXXX");
  if (!mkdtemp(tmpdir)) {
    perror("mkdtemp");
    return 2;
  }
  const char *job = tmp_path("job");
  unsigned seed = getenv("MTNLG_TEST_SEED") ? (unsigned)atoi(getenv("MTNLG_TEST_SEED")) : 20251129;
  srand(seed);

  /* calibrate: start-up and two checkpoints, so kills spread over the writes */
  double t0 = now_s();
  if (run_writer(job, "2", -1)) {
    fprintf(stderr, "FAIL: the writer did not finish two checkpoints\n");
    return 1;
  }
  double span = now_s() - t0;
  int64_t step = 0;
  failures += check_latest(job, &step) != 0;
  printf("calibration: 2 checkpoints in %.3f s; seed %u\n", span, seed);

  int partial = 0;
  uint64_t last_sig = 0;
  count_partial(job, -1, &last_sig);
  for (int trial = 0; trial < TRIALS; trial++) {
    double delay = span * (0.1 + 1.4 * rand() / (double)RAND_MAX);
    if (run_writer(job, "100000", delay)) {
      fprintf(stderr, "FAIL: trial %d: the writer failed before the kill\n", trial);
      failures++;
      continue;
    }
    int64_t before = step;
    uint64_t sig;
    int p = count_partial(job, -1, &sig) > 0 && sig != last_sig;
    last_sig = sig;
    partial += p;
    int rc = check_latest(job, &step);
    failures += rc != 0;
    printf("trial %2d: killed after %5.1f ms: latest step %" PRId64 " (+%" PRId64 ")%s%s\n", trial,
           delay * 1e3, step, step - before, p ? ", killed mid-checkpoint" : "", rc ? " FAIL" : "");
  }
  printf("%d of %d kills landed mid-checkpoint\n", partial, TRIALS);
  CHECK(partial > 0, "no kill landed mid-checkpoint: the test did not test anything");
  char cmd[128];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
  if (system(cmd)) fprintf(stderr, "could not remove %s\n", tmpdir);
  printf("%s\n", failures ? "FAIL" : "ok");
  return failures ? 1 : 0;
}
