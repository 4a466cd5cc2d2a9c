/* test_comm_processes — the comm layer with ranks as 4 separate processes
 * (comm_worker, fork/exec) that bootstrap through a file store in a temp
 * directory: the collectives match the serial reference, and a rank killed
 * with SIGKILL mid-collective makes every other rank fail within its deadline
 * with an error naming the group. Workers are started and stopped by pid and
 * always reaped; they also die with this process (PR_SET_PDEATHSIG). */
#include "err.h"
#include "fileio.h"
#include "store.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef COMM_WORKER
#error "COMM_WORKER (path of the comm_worker executable) must be defined"
#endif

#define RANKS 4

#include "mt_check.h"

typedef struct worker {
  pid_t pid;  /* 0 once reaped */
  int status; /* from waitpid */
  double exited_at;
} worker;

static pid_t spawn(const char *dir, int rank, const char *mode, int timeout_ms) {
  char r[16], n[16], t[16];
  snprintf(r, sizeof r, "%d", rank);
  snprintf(n, sizeof n, "%d", RANKS);
  snprintf(t, sizeof t, "%d", timeout_ms);
  pid_t parent = getpid();
  pid_t pid = fork();
  if (pid == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(127);
    execl(COMM_WORKER, COMM_WORKER, dir, r, n, mode, t, (char *)NULL);
    perror("exec " COMM_WORKER);
    _exit(127);
  }
  return pid;
}

/* Reaps every worker that exits before deadline (absolute, now_s()); kills
 * and reaps the rest. Returns how many had to be killed. */
static int reap_all(worker *w, int n, double deadline) {
  int left = 0;
  for (int i = 0; i < n; i++) left += w[i].pid > 0;
  while (left && now_s() < deadline) {
    for (int i = 0; i < n; i++) {
      if (w[i].pid <= 0) continue;
      pid_t p = waitpid(w[i].pid, &w[i].status, WNOHANG);
      if (p == w[i].pid || (p < 0 && errno == ECHILD)) {
        w[i].pid = 0;
        w[i].exited_at = now_s();
        left--;
      }
    }
    if (left) usleep(2000);
  }
  int killed = 0;
  for (int i = 0; i < n; i++) {
    if (w[i].pid <= 0) continue;
    kill(w[i].pid, SIGKILL);
    waitpid(w[i].pid, &w[i].status, 0);
    w[i].pid = 0;
    w[i].exited_at = now_s();
    killed++;
  }
  return killed;
}

static int exit_code(const worker *w) {
  return WIFEXITED(w->status) ? WEXITSTATUS(w->status) : 128 + WTERMSIG(w->status);
}

static void read_text(const char *dir, const char *name, char *buf, size_t cap) {
  char path[4096];
  snprintf(path, sizeof path, "%s/%s", dir, name);
  buf[0] = 0;
  FILE *f = fopen(path, "r");
  if (!f) return;
  size_t n = fread(buf, 1, cap - 1, f);
  buf[n] = 0;
  fclose(f);
}

static void test_collectives_match_reference_across_4_processes(void) {
  char dir[] = "/tmp/mtnlg-comm-XXXXXX";
  if (!mkdtemp(dir)) return perror("mkdtemp"), (void)failures++;
  worker w[RANKS] = {{0}};
  double t0 = now_s();
  for (int r = 0; r < RANKS; r++) w[r].pid = spawn(dir, r, "check", 20000);
  int killed = reap_all(w, RANKS, t0 + 40);
  CHECK(!killed, "%d worker(s) still running after 40 s", killed);
  for (int r = 0; r < RANKS; r++)
    CHECK(exit_code(&w[r]) == 0, "rank %d exited with %d", r, exit_code(&w[r]));
  printf("collectives, %d processes: %.2f s\n", RANKS, now_s() - t0);
  mt_remove_dir(dir);
}

static void test_killed_process_fails_others_within_deadline(void) {
  const int timeout_ms = 5000, victim = 2;
  char dir[] = "/tmp/mtnlg-comm-XXXXXX";
  if (!mkdtemp(dir)) return perror("mkdtemp"), (void)failures++;
  worker w[RANKS] = {{0}};
  for (int r = 0; r < RANKS; r++) w[r].pid = spawn(dir, r, "loop", timeout_ms);

  /* Wait until every rank has finished one all-reduce: they are now looping. */
  mt_store *s;
  int ready = 0;
  if (!mt_store_file_new(dir, &s)) {
    for (int r = 0; r < RANKS; r++) {
      char key[32];
      void *v = NULL;
      snprintf(key, sizeof key, "ready/%d", r);
      ready += !mt_store_get(s, key, &v, NULL, 20000);
      free(v);
    }
    mt_store_free(s);
  }
  CHECK(ready == RANKS, "only %d of %d ranks got through their first all-reduce", ready, RANKS);
  usleep(50000);

  double killed_at = now_s();
  kill(w[victim].pid, SIGKILL);
  /* Everyone must be gone by the deadline plus scheduling slack. */
  int killed = reap_all(w, RANKS, killed_at + timeout_ms / 1000.0 + 3.0);
  CHECK(!killed, "%d worker(s) still running %.1f s after the kill", killed,
        timeout_ms / 1000.0 + 3.0);
  CHECK(exit_code(&w[victim]) == 128 + SIGKILL, "victim exited with %d", exit_code(&w[victim]));
  for (int r = 0; r < RANKS; r++) {
    if (r == victim) continue;
    char err[4096], name[32];
    snprintf(name, sizeof name, "err.%d", r);
    read_text(dir, name, err, sizeof err);
    double took = w[r].exited_at - killed_at;
    CHECK(exit_code(&w[r]) == 3, "rank %d exited with %d, not with a failed all-reduce", r,
          exit_code(&w[r]));
    CHECK(strstr(err, "comm dp.pp0.tp0: allreduce of 4194304 bytes"),
          "rank %d's error names no group and operation: %s", r, err);
    CHECK(took < timeout_ms / 1000.0 + 3.0, "rank %d failed %.2f s after the kill (deadline %d ms)",
          r, took, timeout_ms);
    printf("rank %d failed %.2f s after rank %d was killed: %s", r, took, victim, err);
  }
  mt_remove_dir(dir);
}

int main(void) {
  test_collectives_match_reference_across_4_processes();
  test_killed_process_fails_others_within_deadline();
  if (failures) fprintf(stderr, "%d check(s) failed\n", failures);
  return failures ? 1 : 0;
}
