/* tboard.c — TensorBoard event files: TFRecord framing around hand-encoded
 * protocol buffers (tensorboard's event.proto and summary.proto; only the
 * fields written here):
 *
 *   record   = u64le length, u32le masked_crc32c(length bytes),
 *              data, u32le masked_crc32c(data)
 *   Event    = 1 wall_time (double), 2 step (int64), 3 file_version (string),
 *              5 summary (Summary), 7 session_log (SessionLog)
 *   Summary  = 1 value (repeated Value)
 *   Value    = 1 tag (string), 2 simple_value (float)
 *   SessionLog = 1 status (enum; 1 START)
 */
#include "tboard.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "err.h"
#include "fileio.h"
#include "log.h"

struct mt_tboard {
  char dir[4096];
  char path[4096 + 400]; /* the events file, once open */
  int fd;                /* -1 before the first step, or after a failure */
  int failed;            /* said once; nothing more is written */
  int64_t last_step;     /* the last step written; -1 before any */
};

/* ---- CRC-32C (Castagnoli), reflected, as TFRecord frames its records ---- */

static uint32_t crc32c(const void *data, size_t n) {
  static uint32_t table[256];
  static int ready;
  if (!__atomic_load_n(&ready, __ATOMIC_ACQUIRE)) {
    for (uint32_t i = 0; i < 256; i++) {
      uint32_t c = i;
      for (int k = 0; k < 8; k++) c = c & 1 ? (c >> 1) ^ 0x82F63B78u : c >> 1;
      table[i] = c; /* the same values from any thread that races here */
    }
    __atomic_store_n(&ready, 1, __ATOMIC_RELEASE);
  }
  const unsigned char *p = data;
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = 0; i < n; i++) c = table[(c ^ p[i]) & 0xFF] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

/* TFRecord's mask over the CRC, so a CRC of data holding CRCs stays strong */
static uint32_t masked_crc(const void *data, size_t n) {
  uint32_t c = crc32c(data, n);
  return ((c >> 15) | (c << 17)) + 0xA282EAD8u;
}

/* ---- protocol buffer encoding into a bounded buffer ---- */

typedef struct pbuf {
  unsigned char b[2048];
  size_t n;
  int over; /* ran past b: the event is dropped, never cut */
} pbuf;

static void put_bytes(pbuf *p, const void *v, size_t n) {
  if (p->over || n > sizeof p->b - p->n) {
    p->over = 1;
    return;
  }
  memcpy(p->b + p->n, v, n);
  p->n += n;
}

static void put_varint(pbuf *p, uint64_t v) {
  unsigned char b[10];
  size_t n = 0;
  do {
    b[n] = (unsigned char)(v & 0x7F);
    v >>= 7;
    if (v) b[n] |= 0x80;
    n++;
  } while (v);
  put_bytes(p, b, n);
}

static void put_key(pbuf *p, int field, int wire) { put_varint(p, (uint64_t)field << 3 | wire); }

static void put_le(pbuf *p, uint64_t v, size_t n) {
  unsigned char b[8];
  for (size_t i = 0; i < n; i++) b[i] = (unsigned char)(v >> (8 * i));
  put_bytes(p, b, n);
}

static void put_double(pbuf *p, int field, double v) {
  uint64_t u;
  memcpy(&u, &v, 8);
  put_key(p, field, 1);
  put_le(p, u, 8);
}

static void put_float(pbuf *p, int field, float v) {
  uint32_t u;
  memcpy(&u, &v, 4);
  put_key(p, field, 5);
  put_le(p, u, 4);
}

/* A length-delimited field: bytes, a string or an embedded message. */
static void put_len(pbuf *p, int field, const void *v, size_t n) {
  put_key(p, field, 2);
  put_varint(p, n);
  put_bytes(p, v, n);
}

/* Event's head: wall_time and step. */
static void event_head(pbuf *e, int64_t step) {
  struct timeval tv;
  gettimeofday(&tv, NULL);
  put_double(e, 1, (double)tv.tv_sec + tv.tv_usec / 1e6);
  put_key(e, 2, 0);
  put_varint(e, (uint64_t)step);
}

/* Summary.value: one scalar under tag. */
static void put_scalar(pbuf *summary, const char *tag, double v) {
  pbuf value = {.n = 0};
  put_len(&value, 1, tag, strlen(tag));
  put_float(&value, 2, (float)v);
  if (value.over) summary->over = 1;
  put_len(summary, 1, value.b, value.n);
}

/* tag's scalar into summary, and under "<tag> vs samples" into vs */
static void put_pair(pbuf *summary, pbuf *vs, const char *tag, double v) {
  char vs_tag[96];
  put_scalar(summary, tag, v);
  snprintf(vs_tag, sizeof vs_tag, "%s vs samples", tag);
  put_scalar(vs, vs_tag, v);
}

/* ---- the file ---- */

static void fail(mt_tboard *t, const char *what) {
  mt_log_warn("tensorboard: %s; training goes on without TensorBoard events", what);
  if (t->fd >= 0) close(t->fd);
  t->fd = -1;
  t->failed = 1;
}

/* One framed record, in a single write so a reader never sees half of one
 * unless the disk fills mid-way (a torn last record, which readers skip). */
static void write_record(mt_tboard *t, const pbuf *e) {
  if (t->failed || t->fd < 0) return;
  unsigned char rec[sizeof e->b + 16];
  uint64_t len = e->n;
  for (int i = 0; i < 8; i++) rec[i] = (unsigned char)(len >> (8 * i));
  uint32_t hc = masked_crc(rec, 8);
  for (int i = 0; i < 4; i++) rec[8 + i] = (unsigned char)(hc >> (8 * i));
  memcpy(rec + 12, e->b, e->n);
  uint32_t dc = masked_crc(e->b, e->n);
  for (int i = 0; i < 4; i++) rec[12 + e->n + i] = (unsigned char)(dc >> (8 * i));
  if (mt_write_all(t->fd, rec, e->n + 16, t->path)) fail(t, mt_errmsg());
}

/* The time the new file is named by: now, or past the newest events file
 * already in dir when that is not older (another node's clock ahead of
 * this one's, or a file opened this second), so the new file sorts after
 * it and TensorBoard, reading the files in name order, reads it last. */
static long long file_time(const char *dir) {
  long long now = (long long)time(NULL), newest = -1;
  DIR *d = opendir(dir);
  struct dirent *e;
  while (d && (e = readdir(d))) {
    static const char head[] = "events.out.tfevents.";
    char *end;
    if (strncmp(e->d_name, head, sizeof head - 1)) continue;
    long long ts = strtoll(e->d_name + sizeof head - 1, &end, 10);
    if (*end == '.' && ts > newest) newest = ts;
  }
  if (d) closedir(d);
  return newest >= now ? newest + 1 : now;
}

static void open_file(mt_tboard *t) {
  char why[4700];
  int rc = mt_make_dirs(t->dir);
  if (rc) {
    snprintf(why, sizeof why, "cannot make the directory: %s", mt_errmsg());
    fail(t, why);
    return;
  }
  char host[256] = "localhost";
  if (gethostname(host, sizeof host - 1)) snprintf(host, sizeof host, "localhost");
  host[sizeof host - 1] = 0;
  char *path = t->path;
  size_t cap = sizeof t->path;
  long long when = file_time(t->dir);
  for (int k = 0; k < 100; k++) {
    snprintf(path, cap, "%s/events.out.tfevents.%lld.%s.%d.%d", t->dir, when, host, (int)getpid(),
             k);
    t->fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_APPEND | O_CLOEXEC, 0644);
    if (t->fd >= 0 || errno != EEXIST) break;
  }
  if (t->fd < 0) {
    snprintf(why, sizeof why, "cannot create %s: %s", path, strerror(errno));
    fail(t, why);
    return;
  }
  mt_log_info("tensorboard: writing %s", path);
  pbuf e = {.n = 0};
  event_head(&e, 0);
  put_len(&e, 3, "brain.Event:2", 13);
  write_record(t, &e);
}

mt_tboard *mt_tboard_new(const char *dir) {
  if (!dir || !*dir) return NULL;
  mt_tboard *t = calloc(1, sizeof *t);
  if (!t) {
    mt_log_warn("tensorboard: out of memory for the writer of %s; training goes on without "
                "TensorBoard events",
                dir);
    return NULL;
  }
  snprintf(t->dir, sizeof t->dir, "%s", dir);
  t->fd = -1;
  t->last_step = -1;
  return t;
}

void mt_tboard_step(mt_tboard *t, const mt_step_stats *st) {
  if (!t || t->failed) return;
  if (t->fd < 0) open_file(t);
  if (t->fd < 0) return;
  if (st->step != t->last_step + 1) { /* every file's first step, too */
    /* SessionLog START at step s: TensorBoard discards the points at s and
     * past it that this directory's files hold from before */
    pbuf e = {.n = 0};
    event_head(&e, st->step);
    unsigned char start[] = {0x08, 0x01}; /* status = START */
    put_len(&e, 7, start, sizeof start);
    write_record(t, &e);
  }
  /* Megatron's tags, so its users' dashboards read these runs unchanged:
   * each per-step tag (s, at the step) and, where Megatron writes one, its
   * "<tag> vs samples" (vs, at the samples consumed after the step) */
  pbuf s = {.n = 0}, vs = {.n = 0};
  put_pair(&s, &vs, "learning-rate", st->lr);
  put_pair(&s, &vs, "batch-size", st->global_batch);
  put_pair(&s, &vs, "lm loss", st->loss);
  if (st->loss_scaling) put_pair(&s, &vs, "loss-scale", st->loss_scale);
  put_pair(&s, &vs, "world-size", st->world_size);
  if (isfinite(st->grad_norm)) put_pair(&s, &vs, "grad-norm", st->grad_norm);
  if (st->has_num_zeros) put_pair(&s, &vs, "num-zeros", (double)st->num_zeros);
  if (st->has_params_norm) put_pair(&s, &vs, "params-norm", st->params_norm);
  put_scalar(&s, "iteration-time", st->step_ms / 1e3);
  put_scalar(&s, "throughput", st->tflops);
  put_scalar(&s, "tokens-per-second", st->tokens_per_s);
  put_scalar(&s, "skipped-iterations", (double)st->skipped);
  /* Megatron writes its validation at the end of training under the same
   * tag; at a step that had its own, that one stands */
  int has_val = st->has_val || st->has_final_val;
  double val = st->has_val ? st->val_loss : st->final_val_loss;
  if (has_val) {
    put_pair(&s, &vs, "lm loss validation", val);
    put_pair(&s, &vs, "lm loss validation ppl", mt_ppl(val));
  }
  if (st->has_test) {
    put_pair(&s, &vs, "lm loss test", st->test_loss);
    put_pair(&s, &vs, "lm loss test ppl", mt_ppl(st->test_loss));
  }
  pbuf e = {.n = 0}, ev = {.n = 0};
  event_head(&e, st->step);
  put_len(&e, 5, s.b, s.n);
  event_head(&ev, st->consumed_samples);
  put_len(&ev, 5, vs.b, vs.n);
  if (s.over || e.over || vs.over || ev.over) {
    fail(t, "an event did not fit its buffer");
    return;
  }
  write_record(t, &e);
  write_record(t, &ev);
  t->last_step = st->step;
}

void mt_tboard_free(mt_tboard *t) {
  if (!t) return;
  if (t->fd >= 0) {
    fsync(t->fd);
    close(t->fd);
  }
  free(t);
}
