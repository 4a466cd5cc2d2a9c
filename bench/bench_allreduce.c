/* bench_allreduce — all-reduce bus bandwidth of the comm layer (Gloo over
 * loopback) for ranks as threads of this process or as separate processes,
 * beside a memcpy ceiling measured in the same run.
 *
 * Bus bandwidth as nccl-tests defines it: algbw = bytes / time, busbw =
 * algbw * 2(n-1)/n, the rate each rank's link must sustain in a ring; the
 * time of one all-reduce is the slowest rank's mean over the timed iterations.
 * Before and after, the ceilings: a single-thread memcpy and one TCP stream
 * over loopback. Prints rows for bench/comm-allreduce; never fails on time.
 *
 * usage: bench_allreduce [--ranks N] [--mode threads|processes]
 *                        [--sizes-mb 1,4,16,64,256] [--min-time S]
 *        bench_allreduce --worker DIR RANK N SIZES MIN_TIME   (internal)
 */
#include "comm.h"
#include "err.h"
#include "fileio.h"
#include "store.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_SIZES 16

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Best single-thread memcpy rate (bytes copied per second) over 256 MB. */
static double memcpy_ceiling(void) {
  size_t bytes = 256u << 20;
  char *a = malloc(bytes), *b = malloc(bytes);
  if (!a || !b) return free(a), free(b), 0;
  memset(a, 1, bytes);
  memset(b, 2, bytes);
  double best = 0;
  for (int i = 0; i < 5; i++) {
    double t0 = now_s();
    memcpy(b, a, bytes);
    double t = now_s() - t0;
    if (bytes / t > best) best = bytes / t;
    a[i] = b[bytes - 1 - (size_t)i]; /* keep the copies observable */
  }
  free(a), free(b);
  return best;
}

/* One TCP stream over loopback: a thread writes 256 MB in 4 MB writes, this
 * one reads it. Best rate of 3, in bytes per second: what one ring link on
 * this machine can carry at most. */
typedef struct stream {
  struct sockaddr_in addr;
  size_t bytes;
} stream;

static void *stream_writer(void *p) {
  stream *st = p;
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  char *buf = calloc(1, 4u << 20);
  if (fd >= 0 && buf && !connect(fd, (struct sockaddr *)&st->addr, sizeof st->addr)) {
    for (size_t sent = 0; sent < st->bytes;) {
      ssize_t w = write(fd, buf, 4u << 20);
      if (w <= 0) break;
      sent += (size_t)w;
    }
  }
  free(buf);
  if (fd >= 0) close(fd);
  return NULL;
}

static double tcp_ceiling(void) {
  double best = 0;
  for (int run = 0; run < 3; run++) {
    stream st = {.addr = {.sin_family = AF_INET}, .bytes = 256u << 20};
    st.addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof st.addr;
    int lfd = socket(AF_INET, SOCK_STREAM, 0);
    if (lfd < 0 || bind(lfd, (struct sockaddr *)&st.addr, sizeof st.addr) || listen(lfd, 1) ||
        getsockname(lfd, (struct sockaddr *)&st.addr, &len)) {
      if (lfd >= 0) close(lfd);
      return 0;
    }
    pthread_t th;
    pthread_create(&th, NULL, stream_writer, &st);
    int fd = accept(lfd, NULL, NULL);
    char *buf = malloc(4u << 20);
    size_t got = 0;
    double t0 = now_s();
    while (fd >= 0 && buf && got < st.bytes) {
      ssize_t r = read(fd, buf, 4u << 20);
      if (r <= 0) break;
      got += (size_t)r;
    }
    double t = now_s() - t0;
    pthread_join(th, NULL);
    free(buf);
    if (fd >= 0) close(fd);
    close(lfd);
    if (got == st.bytes && got / t > best) best = got / t;
  }
  return best;
}

typedef struct config {
  int ranks;
  const char *mode;
  double sizes_mb[MAX_SIZES];
  int nsizes;
  double min_time;
} config;

/* Rank r's part: for each size, warm up, then time all-reduces for at least
 * min_time; rank 0 prints one row per size. */
static int run_rank(mt_store *s, int r, const config *cfg) {
  mt_comm_opts o = {.store = s,
                    .name = "bench",
                    .prefix = "bench",
                    .rank = r,
                    .size = cfg->ranks,
                    .timeout_ms = 120000,
                    .backend = MT_COMM_GLOO};
  mt_comm *c;
  if (mt_comm_create(&c, &o)) return fprintf(stderr, "rank %d: %s\n", r, mt_errmsg()), 1;
  int rc = 0;
  for (int k = 0; k < cfg->nsizes && !rc; k++) {
    size_t count = (size_t)(cfg->sizes_mb[k] * (1 << 20)) / sizeof(float);
    float *x = malloc(count * sizeof *x);
    if (!x) return fprintf(stderr, "rank %d: out of memory\n", r), 1;
    for (size_t i = 0; i < count; i++) x[i] = 1.0f;
    /* warm-up (page faults, socket buffers), then decide iterations on rank 0's
     * timing, broadcast so every rank runs the same number */
    double t0 = now_s();
    rc = mt_comm_allreduce(c, x, x, count, MT_COMM_F32, MT_COMM_MAX);
    double once = now_s() - t0;
    int iters = once > 0 ? (int)(cfg->min_time / once) + 1 : 1;
    if (iters > 200) iters = 200;
    if (!rc) rc = mt_comm_broadcast(c, &iters, 1, MT_COMM_I32, 0);
    if (!rc) rc = mt_comm_barrier(c);
    t0 = now_s();
    for (int i = 0; i < iters && !rc; i++)
      rc = mt_comm_allreduce(c, x, x, count, MT_COMM_F32, MT_COMM_MAX);
    double t = (now_s() - t0) / iters;
    if (!rc) rc = mt_comm_allreduce(c, &t, &t, 1, MT_COMM_F64, MT_COMM_MAX);
    if (rc) {
      fprintf(stderr, "rank %d: %s\n", r, mt_errmsg());
      free(x);
      break;
    }
    if (r == 0) {
      double bytes = (double)count * sizeof(float), algbw = bytes / t;
      double busbw = algbw * 2.0 * (cfg->ranks - 1) / cfg->ranks;
      printf("row %s %d %.0f %d %.3f %.3f %.3f\n", cfg->mode, cfg->ranks, cfg->sizes_mb[k], iters,
             t * 1e3, algbw / 1e9, busbw / 1e9);
      fflush(stdout);
    }
    free(x);
  }
  mt_comm_destroy(c);
  return rc ? 1 : 0;
}

typedef struct thread_arg {
  mt_store *s;
  int rank;
  const config *cfg;
  int rc;
} thread_arg;

static void *thread_main(void *p) {
  thread_arg *a = p;
  a->rc = run_rank(a->s, a->rank, a->cfg);
  return NULL;
}

static int run_threads(const config *cfg) {
  mt_store *s;
  if (mt_store_mem_new(&s)) return fprintf(stderr, "%s\n", mt_errmsg()), 1;
  pthread_t th[64];
  thread_arg a[64];
  for (int r = 0; r < cfg->ranks; r++) {
    a[r] = (thread_arg){s, r, cfg, 0};
    pthread_create(&th[r], NULL, thread_main, &a[r]);
  }
  int rc = 0;
  for (int r = 0; r < cfg->ranks; r++) pthread_join(th[r], NULL), rc |= a[r].rc;
  mt_store_free(s);
  return rc;
}

/* Starts one worker process per rank (this executable with --worker), waits
 * for all of them by pid, and kills the rest if one fails. */
static int run_processes(const config *cfg, const char *self, const char *sizes_arg) {
  char dir[] = "/tmp/mtnlg-bench-comm-XXXXXX";
  if (!mkdtemp(dir)) return perror("mkdtemp"), 1;
  pid_t pid[64];
  char rank[16], n[16], mt[32];
  snprintf(n, sizeof n, "%d", cfg->ranks);
  snprintf(mt, sizeof mt, "%g", cfg->min_time);
  pid_t parent = getpid();
  for (int r = 0; r < cfg->ranks; r++) {
    snprintf(rank, sizeof rank, "%d", r);
    pid[r] = fork();
    if (pid[r] == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (getppid() != parent) _exit(127);
      execl(self, self, "--worker", dir, rank, n, sizes_arg, mt, (char *)NULL);
      perror("exec");
      _exit(127);
    }
  }
  int rc = 0, left = cfg->ranks;
  while (left) {
    int st;
    pid_t p = wait(&st);
    if (p < 0) break;
    left--;
    if (!WIFEXITED(st) || WEXITSTATUS(st)) {
      rc = 1;
      for (int r = 0; r < cfg->ranks; r++)
        if (pid[r] != p) kill(pid[r], SIGKILL);
    }
  }
  mt_remove_dir(dir);
  return rc;
}

static int parse_sizes(const char *arg, config *cfg) {
  cfg->nsizes = 0;
  char *copy = strdup(arg), *save = NULL;
  for (char *t = strtok_r(copy, ",", &save); t && cfg->nsizes < MAX_SIZES;
       t = strtok_r(NULL, ",", &save))
    cfg->sizes_mb[cfg->nsizes++] = atof(t);
  free(copy);
  return cfg->nsizes ? 0 : -1;
}

int main(int argc, char **argv) {
  signal(SIGPIPE, SIG_IGN);
  config cfg = {.ranks = 2, .mode = "processes", .min_time = 1.0};
  const char *sizes = "1,4,16,64,256";
  if (argc == 7 && !strcmp(argv[1], "--worker")) {
    cfg.ranks = atoi(argv[4]);
    cfg.min_time = atof(argv[6]);
    if (parse_sizes(argv[5], &cfg)) return 2;
    mt_store *s;
    if (mt_store_file_new(argv[2], &s)) return fprintf(stderr, "%s\n", mt_errmsg()), 1;
    int rc = run_rank(s, atoi(argv[3]), &cfg);
    mt_store_free(s);
    return rc;
  }
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--ranks") && i + 1 < argc)
      cfg.ranks = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--mode") && i + 1 < argc)
      cfg.mode = argv[++i];
    else if (!strcmp(argv[i], "--sizes-mb") && i + 1 < argc)
      sizes = argv[++i];
    else if (!strcmp(argv[i], "--min-time") && i + 1 < argc)
      cfg.min_time = atof(argv[++i]);
    else {
      fprintf(stderr, "usage: bench_allreduce [--ranks N] [--mode threads|processes] "
                      "[--sizes-mb 1,4,16,64,256] [--min-time S]\n");
      return 2;
    }
  }
  if (parse_sizes(sizes, &cfg) || cfg.ranks < 2 || cfg.ranks > 64 ||
      (strcmp(cfg.mode, "threads") && strcmp(cfg.mode, "processes")))
    return fprintf(stderr, "bench_allreduce: bad arguments\n"), 2;

  printf("memcpy %.3f\n", memcpy_ceiling() / 1e9);
  printf("tcp %.3f\n", tcp_ceiling() / 1e9);
  fflush(stdout);
  char self[4096];
  ssize_t len = readlink("/proc/self/exe", self, sizeof self - 1);
  if (len <= 0) return perror("readlink /proc/self/exe"), 1;
  self[len] = 0;
  int rc = !strcmp(cfg.mode, "threads") ? run_threads(&cfg) : run_processes(&cfg, self, sizes);
  printf("memcpy %.3f\n", memcpy_ceiling() / 1e9);
  printf("tcp %.3f\n", tcp_ceiling() / 1e9);
  return rc;
}
