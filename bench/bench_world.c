/* bench_world — the world group as the daemons form and use it: P
 * processes of T rank threads each, through one TCP store server on a
 * thread of this process, as a group of processes (MT_COMM_GLOO_PROCS,
 * daemon/comm/procs.c) beside the peer, a Gloo full mesh of every rank
 * (MT_COMM_GLOO, what the world group was), in the same invocation. For
 * each: the time to form (the slowest rank), the store requests forming
 * took (every process's), the descriptors a process holds for the group,
 * and the step's all-reduce of 10 doubles (median of 200, the slowest
 * rank's). Never fails on time.
 *
 * usage: bench_world [PxT ...]      (default 2x8 4x4 4x8)
 *        bench_world --child PORT P T INDEX BACKEND PREFIX   (one process)
 */
#include <dirent.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "comm.h"
#include "counting_store.h"
#include "err.h"
#include "store.h"
#include "store_client.h"
#include "store_server.h"

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* ---- one process: T rank threads ---------------------------------------- */

typedef struct rank {
  mt_store *store;
  const char *prefix;
  mt_comm_backend be;
  int rank, size, begin, count;
  pthread_barrier_t *formed;
  double form_s, allreduce_us;
  int rc;
  char err[512];
} rank;

static int cmp(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

static int open_fds(void) {
  DIR *d = opendir("/proc/self/fd");
  int n = 0;
  for (struct dirent *e; d && (e = readdir(d));) n += e->d_name[0] != '.';
  if (d) closedir(d);
  return n;
}

static void *rank_main(void *p) {
  rank *r = p;
  mt_comm_opts o = {.store = r->store,
                    .name = "world",
                    .prefix = r->prefix,
                    .rank = r->rank,
                    .size = r->size,
                    .timeout_ms = 120000,
                    .backend = r->be,
                    .local_begin = r->begin,
                    .local_count = r->count};
  mt_comm *c = NULL;
  double t0 = now_s();
  r->rc = mt_comm_create(&c, &o);
  r->form_s = now_s() - t0;
  pthread_barrier_wait(r->formed); /* the process counts its descriptors here */
  pthread_barrier_wait(r->formed);
  double v[10], t[200];
  for (int i = 0; !r->rc && i < 220; i++) {
    for (int k = 0; k < 10; k++) v[k] = k + r->rank;
    double a = now_s();
    r->rc = mt_comm_allreduce(c, v, v, 10, MT_COMM_F64, MT_COMM_SUM);
    if (i >= 20) t[i - 20] = 1e6 * (now_s() - a);
  }
  if (r->rc) {
    snprintf(r->err, sizeof r->err, "%s", mt_errmsg());
  } else {
    qsort(t, 200, sizeof *t, cmp);
    r->allreduce_us = t[100];
  }
  mt_comm_destroy(c);
  return NULL;
}

static int child(int port, int P, int T, int index, int be, const char *prefix) {
  (void)P;
  mt_store *tcp = NULL;
  if (mt_store_tcp_new("127.0.0.1", port, NULL, &tcp)) {
    fprintf(stderr, "child %d: %s\n", index, mt_errmsg());
    return 1;
  }
  mt_counting_store cs;
  mt_counting_store_init(&cs, tcp);
  rank *r = calloc((size_t)T, sizeof *r);
  pthread_t *th = calloc((size_t)T, sizeof *th);
  pthread_barrier_t formed;
  pthread_barrier_init(&formed, NULL, (unsigned)T + 1);
  int fds0 = open_fds();
  for (int i = 0; i < T; i++) {
    r[i] = (rank){.store = &cs.base,
                  .prefix = prefix,
                  .be = (mt_comm_backend)be,
                  .rank = index * T + i,
                  .size = P * T,
                  .begin = index * T,
                  .count = T,
                  .formed = &formed};
    pthread_create(&th[i], NULL, rank_main, &r[i]);
  }
  pthread_barrier_wait(&formed);
  int fds = open_fds() - fds0;
  long requests = atomic_load(&cs.requests);
  pthread_barrier_wait(&formed);
  double form = 0, us = 0;
  int bad = 0;
  for (int i = 0; i < T; i++) {
    pthread_join(th[i], NULL);
    if (r[i].rc) fprintf(stderr, "rank %d: %s\n", r[i].rank, r[i].err), bad = 1;
    if (r[i].form_s > form) form = r[i].form_s;
    if (r[i].allreduce_us > us) us = r[i].allreduce_us;
  }
  printf("%.6f %ld %d %.3f\n", form, requests, fds, us);
  fflush(stdout);
  cs.inner->free(cs.inner);
  free(r), free(th);
  return bad;
}

/* ---- the parent ---------------------------------------------------------- */

typedef struct figures {
  double form_s, allreduce_us;
  long requests;
  int fds; /* the most of any process */
  int ok;
} figures;

static figures run(const char *self, int port, int P, int T, int be, const char *prefix) {
  figures f = {.ok = 1};
  pid_t *pid = calloc((size_t)P, sizeof *pid);
  FILE **out = calloc((size_t)P, sizeof *out);
  for (int p = 0; p < P; p++) {
    int fd[2];
    if (pipe(fd)) return (figures){0};
    pid_t parent = getpid();
    pid[p] = fork();
    if (pid[p] == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (getppid() != parent) _exit(127);
      dup2(fd[1], 1);
      close(fd[0]);
      char a[6][32];
      snprintf(a[0], 32, "%d", port), snprintf(a[1], 32, "%d", P), snprintf(a[2], 32, "%d", T);
      snprintf(a[3], 32, "%d", p), snprintf(a[4], 32, "%d", be);
      execl(self, self, "--child", a[0], a[1], a[2], a[3], a[4], prefix, (char *)NULL);
      _exit(127);
    }
    close(fd[1]);
    out[p] = fdopen(fd[0], "r");
  }
  for (int p = 0; p < P; p++) {
    double form = 0, us = 0;
    long req = 0;
    int fds = 0, status = 0;
    if (fscanf(out[p], "%lf %ld %d %lf", &form, &req, &fds, &us) != 4) f.ok = 0;
    fclose(out[p]);
    waitpid(pid[p], &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status)) f.ok = 0;
    if (form > f.form_s) f.form_s = form;
    if (us > f.allreduce_us) f.allreduce_us = us;
    if (fds > f.fds) f.fds = fds;
    f.requests += req;
  }
  free(pid), free(out);
  return f;
}

int main(int argc, char **argv) {
  if (argc == 8 && !strcmp(argv[1], "--child"))
    return child(atoi(argv[2]), atoi(argv[3]), atoi(argv[4]), atoi(argv[5]), atoi(argv[6]),
                 argv[7]);
  static const char *defaults[] = {"2x8", "4x4", "4x8"};
  int n = argc > 1 ? argc - 1 : 3;
  const char *const *layouts = argc > 1 ? (const char *const *)argv + 1 : defaults;
  mt_store_server_thread *server;
  if (mt_store_server_run_thread("127.0.0.1", 0, NULL, &server)) {
    fprintf(stderr, "store server: %s\n", mt_errmsg());
    return 1;
  }
  int port = mt_store_server_thread_port(server);
  char self[4096];
  ssize_t len = readlink("/proc/self/exe", self, sizeof self - 1);
  if (len <= 0) return 1;
  self[len] = 0;
  printf("the world group of P processes x T rank threads, through one TCP store on loopback\n");
  printf("%-6s | %-43s | %-43s | %s\n", "PxT", "Gloo mesh of every rank (peer)",
         "group of processes (gloo-procs)", "peer / procs");
  printf("%-6s | %8s %9s %6s %12s | %8s %9s %6s %12s | %6s %6s %6s %6s\n", "", "form s", "requests",
         "fds", "allreduce us", "form s", "requests", "fds", "allreduce us", "form", "reqs", "fds",
         "us");
  int bad = 0;
  for (int i = 0; i < n; i++) {
    int P = 0, T = 0;
    if (sscanf(layouts[i], "%dx%d", &P, &T) != 2 || P < 1 || T < 1 || P * T > 256) {
      fprintf(stderr, "bench_world: %s: want PxT (processes x threads, at most 256 ranks)\n",
              layouts[i]);
      return 2;
    }
    char prefix[64];
    snprintf(prefix, sizeof prefix, "bench/%d/mesh", i);
    figures m = run(self, port, P, T, MT_COMM_GLOO, prefix);
    snprintf(prefix, sizeof prefix, "bench/%d/procs", i);
    figures g = run(self, port, P, T, MT_COMM_GLOO_PROCS, prefix);
    if (!m.ok || !g.ok) {
      printf("%-6s | a run failed (mesh %s, procs %s)\n", layouts[i], m.ok ? "ok" : "failed",
             g.ok ? "ok" : "failed");
      bad = 1;
      continue;
    }
    printf("%-6s | %8.3f %9ld %6d %12.1f | %8.3f %9ld %6d %12.1f | %5.1fx %5.1fx %5.1fx %5.1fx\n",
           layouts[i], m.form_s, m.requests, m.fds, m.allreduce_us, g.form_s, g.requests, g.fds,
           g.allreduce_us, m.form_s / g.form_s, (double)m.requests / (double)g.requests,
           (double)m.fds / (g.fds > 0 ? g.fds : 1), m.allreduce_us / g.allreduce_us);
    fflush(stdout);
  }
  printf("fds: the descriptors a process opened for the group (the most of any); allreduce: 10 "
         "doubles, median of 200 after 20, the slowest rank's\n");
  mt_store_server_thread_stop(server);
  return bad;
}
