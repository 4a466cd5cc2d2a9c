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
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "err.h"
#include "fileio.h"
#include "log.h"
#include "monotime.h"

/* How long mt_tboard_free waits for the writer to drain and fsync: enough
 * for a healthy disk to append a full queue (a few MB) and fsync it, and
 * well under the default cluster.heartbeat_timeout_ms (6 s), since the
 * node's loop thread is the one waiting and sends no heartbeat meanwhile. */
#define TB_FREE_WAIT_MS 2000
/* A full queue is said at most this often (the first drop, then a count). */
#define TB_DROP_LOG_MS 60000

/* The writers' rollback decisions (a directory read each) since the
 * process started: mt_tboard_dir_reads, for the test. */
static uint64_t dir_reads;

typedef struct tb_point {
  mt_step_stats st;
  double when; /* the step's wall time (unix s): its events' wall_time */
} tb_point;

/* Shared by the step thread (mt_tboard_step, mt_tboard_free) and the
 * writer thread; the writer alone touches the file state. After
 * mt_tboard_free gives up waiting, the writer owns it all and frees it when
 * it ends. */
struct mt_tboard {
  /* the writer's own: the file */
  char dir[4096];
  char path[4096 + 400]; /* the events file, once open */
  int fd;                /* -1 before the first step, or after a failure */
  int failed;            /* said once; nothing more is written (also read by
                            mt_tboard_step, atomically, to queue no more) */
  int64_t last_step;     /* the last step written; -1 before any */
  int timers;            /* each step's timers too (train.log_timers_to_tensorboard) */
  int memory;            /* and its device memory (train.log_memory_to_tensorboard) */

  /* under mu: the queue, a ring of MT_TBOARD_QUEUE points */
  pthread_mutex_t mu;
  pthread_cond_t more; /* a point queued, or closing */
  pthread_cond_t done; /* exited */
  tb_point *q;
  size_t head, n;
  int writing;          /* the writer holds a point it took off the queue ... */
  int64_t writing_step; /* ... of this step */
  int closing;          /* mt_tboard_free: drain, fsync, close, end */
  int started;          /* past reg_wait_older: no older writer of dir is left */
  int shedding;         /* the queue was full and has not yet drained to half:
                           steps are still dropped */
  int exited;           /* the writer ended (not detached): mt_tboard_free frees */
  int abandoned;        /* mt_tboard_free gave up waiting: the writer frees */
  pthread_t thread;

  /* the step thread's own: the drop count said so far */
  uint64_t dropped;      /* also read atomically by anyone */
  uint64_t dropped_said; /* as of the last line about it */
  int64_t drop_said_ms;  /* when; 0: never */

  /* the writers' registry (reg_mu): a writer opens its file only after
   * every older writer of the same directory has ended, so its rollback
   * decision reads what they wrote, all of it */
  uint64_t seq;
  struct mt_tboard *reg_next;
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
  unsigned char b[4096]; /* a step's tags, its 28 timers' too, take under 2 KB */
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

/* Event's head: wall_time (unix s) and step. */
static void event_head(pbuf *e, double when, int64_t step) {
  put_double(e, 1, when);
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

/* ---- the "vs samples" points a session start would drop ---- */

/* A session start at step s drops, in TensorBoard's Python loader, every
 * tag's points at s and past it. The "vs samples" series' steps are
 * samples, at least the step numbers, so the start drops their points from
 * s samples on, too: those of the steps before s that read more than s
 * samples, which the model did follow. Those points, read back from the
 * directory's files as the loader reads them, are written again after the
 * start. A start is written only on a rollback: where the directory, read
 * so, shows a per-step point at s or past it. */

#define VS_SUFFIX " vs samples"

/* The "vs samples" tags this writer writes (put_pair's), the only ones
 * carried: a foreign file's tags are never written again. */
static const char *const vs_tags[] = {
    "learning-rate" VS_SUFFIX,
    "batch-size" VS_SUFFIX,
    "lm loss" VS_SUFFIX,
    "loss-scale" VS_SUFFIX,
    "world-size" VS_SUFFIX,
    "grad-norm" VS_SUFFIX,
    "num-zeros" VS_SUFFIX,
    "params-norm" VS_SUFFIX,
    "lm loss validation" VS_SUFFIX,
    "lm loss validation ppl" VS_SUFFIX,
    "lm loss test" VS_SUFFIX,
    "lm loss test ppl" VS_SUFFIX,
};
#define N_VS_TAGS ((int)(sizeof vs_tags / sizeof vs_tags[0]))
/* the per-step tag every step's event holds: its step is a step's */
#define STEP_TAG "learning-rate"

typedef struct vs_point {
  int64_t step; /* samples */
  float v;
  int tag; /* index into vs_tags */
} vs_point;

typedef struct carry {
  int64_t lo, hi; /* the samples kept: [lo, hi] */
  int collect;    /* 0: only last_step is read */
  /* the last per-step point the loader shows (STEP_TAG's step), at most:
   * a session start at t leaves it below t; -1: none */
  int64_t last_step;
  vs_point *p;
  size_t n, cap;
  int failed; /* out of memory: nothing is written again */
} carry;

/* A varint at *at (before end), moved past; -1 past the end or too long. */
static int get_varint(const unsigned char **at, const unsigned char *end, uint64_t *v) {
  *v = 0;
  for (int sh = 0; sh < 64 && *at < end; sh += 7) {
    unsigned char b = *(*at)++;
    *v |= (uint64_t)(b & 0x7F) << sh;
    if (!(b & 0x80)) return 0;
  }
  return -1;
}

/* The next field of the message [*at, end): its number, wire type and, for
 * a length-delimited one, its bytes (*val, *len), for a varint its value
 * (*num); -1 when the message is malformed. */
static int next_field(const unsigned char **at, const unsigned char *end, int *field, int *wire,
                      const unsigned char **val, size_t *len, uint64_t *num) {
  uint64_t key;
  if (get_varint(at, end, &key)) return -1;
  *field = (int)(key >> 3), *wire = (int)(key & 7);
  *val = *at, *len = 0, *num = 0;
  switch (*wire) {
  case 0: return get_varint(at, end, num);
  case 1: *len = 8; break;
  case 5: *len = 4; break;
  case 2:
    if (get_varint(at, end, num) || *num > (uint64_t)(end - *at)) return -1;
    *val = *at, *len = (size_t)*num;
    break;
  default: return -1;
  }
  if (*len > (size_t)(end - *at)) return -1;
  *at += *len;
  return 0;
}

static void carry_add(carry *c, int64_t step, const unsigned char *tag, size_t n, float v) {
  int k = 0;
  while (k < N_VS_TAGS && (strlen(vs_tags[k]) != n || memcmp(vs_tags[k], tag, n))) k++;
  if (k == N_VS_TAGS) return; /* none of ours */
  if (c->n == c->cap) {
    size_t cap = c->cap ? 2 * c->cap : 1024;
    vs_point *p = realloc(c->p, cap * sizeof *p);
    if (!p) {
      c->failed = 1;
      return;
    }
    c->p = p, c->cap = cap;
  }
  c->p[c->n++] = (vs_point){step, v, k};
}

/* One Event: a session start drops the points at and past its step, a
 * summary adds its "vs samples" values in [lo, hi] (collecting) and moves
 * last_step to a per-step event's step. */
static void carry_event(carry *c, const unsigned char *at, const unsigned char *end) {
  int64_t step = 0;
  const unsigned char *summary = NULL, *session = NULL;
  size_t summary_n = 0, session_n = 0;
  int field, wire;
  const unsigned char *val;
  size_t len;
  uint64_t num;
  while (at < end) {
    if (next_field(&at, end, &field, &wire, &val, &len, &num)) return;
    if (field == 2 && wire == 0) step = (int64_t)num;
    if (field == 5 && wire == 2) summary = val, summary_n = len;
    if (field == 7 && wire == 2) session = val, session_n = len;
  }
  if (session) {
    const unsigned char *s = session, *s_end = session + session_n;
    while (s < s_end && !next_field(&s, s_end, &field, &wire, &val, &len, &num))
      if (field == 1 && wire == 0 && num == 1) { /* START */
        if (c->last_step >= step) c->last_step = step - 1;
        size_t kept = 0;
        for (size_t i = 0; i < c->n; i++)
          if (c->p[i].step < step) c->p[kept++] = c->p[i];
        c->n = kept;
      }
  }
  if (!summary) return;
  int in_range = c->collect && step >= c->lo && step <= c->hi;
  const unsigned char *s = summary, *s_end = summary + summary_n;
  while (s < s_end && !next_field(&s, s_end, &field, &wire, &val, &len, &num)) {
    if (field != 1 || wire != 2) continue;
    const unsigned char *v = val, *v_end = val + len, *tag = NULL, *tv;
    size_t tag_n = 0, tl;
    float x = 0.0f;
    int has_x = 0, f, w;
    uint64_t u;
    while (v < v_end && !next_field(&v, v_end, &f, &w, &tv, &tl, &u)) {
      if (f == 1 && w == 2) tag = tv, tag_n = tl;
      if (f == 2 && w == 5) {
        uint32_t bits =
            (uint32_t)tv[0] | (uint32_t)tv[1] << 8 | (uint32_t)tv[2] << 16 | (uint32_t)tv[3] << 24;
        memcpy(&x, &bits, 4);
        has_x = 1;
      }
    }
    if (tag && tag_n == sizeof STEP_TAG - 1 && !memcmp(tag, STEP_TAG, tag_n) && step > c->last_step)
      c->last_step = step;
    if (in_range && tag && has_x) carry_add(c, step, tag, tag_n, x);
  }
}

/* The records of one events file, in order; a torn or bad record ends it
 * (as TensorBoard stops reading a file there), one too long to be ours is
 * passed over. Opened without blocking and read only if it is a regular
 * file: a FIFO of that name would hold the writer's thread. */
static void carry_file(carry *c, const char *path) {
  int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) return;
  struct stat sb;
  FILE *f = fstat(fd, &sb) || !S_ISREG(sb.st_mode) ? NULL : fdopen(fd, "rb");
  if (!f) {
    close(fd);
    return;
  }
  unsigned char head[12], *data = NULL;
  size_t cap = 0;
  while (!c->failed && fread(head, 1, 12, f) == 12) {
    uint64_t n = 0;
    uint32_t hc = 0;
    for (int i = 0; i < 8; i++) n |= (uint64_t)head[i] << (8 * i);
    for (int i = 0; i < 4; i++) hc |= (uint32_t)head[8 + i] << (8 * i);
    if (hc != masked_crc(head, 8)) break; /* the length's own CRC, as TensorBoard checks */
    if (n > (1u << 26)) {
      if (fseeko(f, (off_t)(n + 4), SEEK_CUR)) break;
      continue;
    }
    if (n + 4 > cap) {
      unsigned char *d = realloc(data, n + 4);
      if (!d) break;
      data = d, cap = n + 4;
    }
    if (fread(data, 1, n + 4, f) != n + 4) break;
    uint32_t dc = 0;
    for (int i = 0; i < 4; i++) dc |= (uint32_t)data[n + i] << (8 * i);
    if (dc != masked_crc(data, n)) break;
    carry_event(c, data, data + n);
  }
  free(data);
  fclose(f);
}

static int by_name(const void *a, const void *b) {
  return strcmp(*(char *const *)a, *(char *const *)b);
}

/* The last per-step point and (collecting) the "vs samples" points in
 * [lo, hi] that dir's events files leave, read in name order
 * (TensorBoard's), each file's session starts applied. */
static void carry_read(carry *c, const char *dir) {
  DIR *d = opendir(dir);
  if (!d) return;
  char **names = NULL;
  size_t n = 0, cap = 0;
  struct dirent *e;
  while ((e = readdir(d))) {
    static const char head[] = "events.out.tfevents.";
    if (strncmp(e->d_name, head, sizeof head - 1)) continue;
    if (n == cap) {
      char **m = realloc(names, (cap = cap ? 2 * cap : 16) * sizeof *m);
      if (!m) break;
      names = m;
    }
    if (!(names[n] = strdup(e->d_name))) break;
    n++;
  }
  closedir(d);
  qsort(names, n, sizeof *names, by_name);
  char path[4096 + 300];
  for (size_t i = 0; i < n; i++) {
    snprintf(path, sizeof path, "%s/%s", dir, names[i]);
    carry_file(c, path);
    free(names[i]);
  }
  free(names);
}

/* ---- the file ---- */

static void fail(mt_tboard *t, const char *what) {
  mt_log_warn("tensorboard: %s; training goes on without TensorBoard events", what);
  if (t->fd >= 0) close(t->fd);
  t->fd = -1;
  __atomic_store_n(&t->failed, 1, __ATOMIC_RELAXED);
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

/* The "vs samples" points of c written again, an event for each run of
 * points at one step (more when they do not fit one), at the wall time
 * when of the step whose rollback carries them. */
static void carry_write(mt_tboard *t, const carry *c, double when) {
  size_t i = 0;
  while (i < c->n) {
    pbuf s = {.n = 0};
    int64_t step = c->p[i].step;
    for (; i < c->n && c->p[i].step == step && s.n < sizeof s.b / 2; i++)
      put_scalar(&s, vs_tags[c->p[i].tag], c->p[i].v);
    pbuf e = {.n = 0};
    event_head(&e, when, step);
    put_len(&e, 5, s.b, s.n);
    if (!s.over && !e.over) write_record(t, &e);
  }
}

static void open_file(mt_tboard *t, double when) {
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
  long long name_time = file_time(t->dir);
  for (int k = 0; k < 100; k++) {
    snprintf(path, cap, "%s/events.out.tfevents.%lld.%s.%d.%d", t->dir, name_time, host,
             (int)getpid(), k);
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
  event_head(&e, when, 0);
  put_len(&e, 3, "brain.Event:2", 13);
  write_record(t, &e);
}

/* One step's events (on the writer's thread, in step order): the file
 * opened on the first, a rollback's session start, the step's event and its
 * "vs samples" event. */
static void write_step(mt_tboard *t, const tb_point *pt) {
  const mt_step_stats *st = &pt->st;
  double when = pt->when;
  if (t->failed) return;
  if (t->fd < 0) open_file(t, when);
  if (t->fd < 0) return;
  /* The directory is read on the file's first step and on a step that goes
   * back, never on one that skips ahead: within one writer that is only a
   * full queue's drop, and a slow disk would otherwise re-read the whole
   * directory (1.4 s at 300,000 steps) for each step after a gap. */
  if (t->last_step < 0 || st->step <= t->last_step) {
    __atomic_add_fetch(&dir_reads, 1, __ATOMIC_RELAXED);
    /* a rollback, where the directory shows a step at or past this one:
     * SessionLog START at step s, so that TensorBoard discards the points
     * at s and past it that this directory's files hold from before; the
     * "vs samples" points from s to the samples read before this step are
     * the model's, and are written again after it. A resize or a resume
     * that goes on where the files end writes neither. */
    carry c = {.lo = st->step, .hi = st->consumed_samples - st->global_batch, .last_step = -1};
    carry_read(&c, t->dir);
    if (c.last_step >= st->step) {
      c.collect = 1, c.last_step = -1;
      if (c.hi >= c.lo) carry_read(&c, t->dir);
      if (c.failed)
        mt_log_warn("tensorboard: out of memory for the \"vs samples\" points before "
                    "step %lld; TensorBoard's Python loader shows them no more",
                    (long long)st->step);
      pbuf e = {.n = 0};
      event_head(&e, when, st->step);
      unsigned char start[] = {0x08, 0x01}; /* status = START */
      put_len(&e, 7, start, sizeof start);
      write_record(t, &e);
      if (!c.failed) carry_write(t, &c, when);
    }
    free(c.p);
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
  if (t->memory &&
      st->has_memory) { /* Megatron's names, torch.cuda.memory_stats' figures as ours have them */
    put_scalar(&s, "mem-reserved-bytes", (double)st->memory.reserved);
    put_scalar(&s, "mem-allocated-bytes", (double)st->memory.allocated);
    put_scalar(&s, "mem-max-allocated-bytes", (double)st->memory.max_allocated);
    put_scalar(&s, "mem-allocated-count", (double)st->memory.count);
  }
  for (int i = 0; t->timers && i < MT_TM_COUNT; i++) {
    if (!mt_timer_reported(i, st->timing_level, st->timer_max[i])) continue;
    char tag[64];
    snprintf(tag, sizeof tag, "%s-time", mt_timer_name(i));
    put_scalar(&s, tag, st->timer_max[i] / 1e3);
  }
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
  event_head(&e, when, st->step);
  put_len(&e, 5, s.b, s.n);
  event_head(&ev, when, st->consumed_samples);
  put_len(&ev, 5, vs.b, vs.n);
  if (s.over || e.over || vs.over || ev.over) {
    fail(t, "an event did not fit its buffer");
    return;
  }
  write_record(t, &e);
  write_record(t, &ev);
  t->last_step = st->step;
}

/* ---- the writer thread ---- */

/* The writers of this process not yet ended, newest first: a new writer
 * waits on it for the older ones of its directory (reg_wait_older), and
 * the exit waits on it for every one left (mt_tboard_wait_left). */
static pthread_mutex_t reg_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t reg_gone; /* a writer ended; on the monotonic clock */
static pthread_once_t reg_once = PTHREAD_ONCE_INIT;
static mt_tboard *reg_live;
static uint64_t reg_seq;
/* steps dropped for a full queue since the process started, all writers */
static uint64_t dropped_total;

/* reg_gone's timed waits (mt_tboard_wait_left) must not stretch with a
 * wall-clock step; PTHREAD_COND_INITIALIZER would count on that clock. A
 * failure leaves the default clock, which only a clock step would show. */
static void reg_init(void) {
  if (mt_mono_cond_init(&reg_gone)) pthread_cond_init(&reg_gone, NULL);
}

/* t joins the live writers, numbered after every one before it, so that
 * reg_wait_older can tell which of its directory's writers came first. */
static void reg_add(mt_tboard *t) {
  pthread_once(&reg_once, reg_init);
  pthread_mutex_lock(&reg_mu);
  t->seq = ++reg_seq;
  t->reg_next = reg_live;
  reg_live = t;
  pthread_mutex_unlock(&reg_mu);
}

/* t has ended (its file closed, or never opened): the newer writers of
 * its directory and an exit waiting for the last writer are woken. */
static void reg_remove(mt_tboard *t) {
  pthread_mutex_lock(&reg_mu);
  for (mt_tboard **p = &reg_live; *p; p = &(*p)->reg_next)
    if (*p == t) {
      *p = t->reg_next;
      break;
    }
  pthread_cond_broadcast(&reg_gone);
  pthread_mutex_unlock(&reg_mu);
}

/* Whether an older writer of t's directory is still live (under reg_mu). */
static int older_live(const mt_tboard *t) {
  const mt_tboard *o = reg_live;
  while (o && !(o->seq < t->seq && !strcmp(o->dir, t->dir))) o = o->reg_next;
  return o != NULL;
}

/* Waits until no older writer of t's directory is left: one a generation
 * ended while its disk hung, still draining on its own. Its queued points
 * land in its file, which sorts before t's; were t to read the directory
 * before they did, a rollback into them would go unseen and TensorBoard
 * would show both runs' points at those steps. t's own points queue (and,
 * past MT_TBOARD_QUEUE, drop) meanwhile. Only this process's writers are
 * known: one left on another node (world rank 0 moved) is not waited for. */
static void reg_wait_older(mt_tboard *t) {
  pthread_mutex_lock(&reg_mu);
  while (older_live(t)) pthread_cond_wait(&reg_gone, &reg_mu);
  pthread_mutex_unlock(&reg_mu);
}

/* Frees t, whose writer thread has ended (or never ran): by mt_tboard_free
 * after the join, or by the writer itself once it was left. */
static void destroy(mt_tboard *t) {
  pthread_cond_destroy(&t->more);
  pthread_cond_destroy(&t->done);
  pthread_mutex_destroy(&t->mu);
  free(t->q);
  free(t);
}

/* The writer: every file and directory operation of t, in step order, off
 * the step thread; at closing, what is queued, then fsync and close. */
static void *writer_main(void *arg) {
  mt_tboard *t = arg;
  reg_wait_older(t);
  pthread_mutex_lock(&t->mu);
  t->started = 1;
  for (;;) {
    while (!t->n && !t->closing) pthread_cond_wait(&t->more, &t->mu);
    if (!t->n) break; /* closing, and all written */
    tb_point pt = t->q[t->head];
    t->head = (t->head + 1) % MT_TBOARD_QUEUE;
    t->n--;
    t->writing = 1, t->writing_step = pt.st.step;
    pthread_mutex_unlock(&t->mu);
    write_step(t, &pt);
    pthread_mutex_lock(&t->mu);
    t->writing = 0;
  }
  pthread_mutex_unlock(&t->mu);
  if (t->fd >= 0) {
    if (fsync(t->fd))
      mt_log_warn("tensorboard: fsync of %s failed: %s; its last points may not be on disk",
                  t->path, strerror(errno));
    close(t->fd);
    t->fd = -1;
  }
  /* abandoned is read after the fsync, which mt_tboard_free may have
   * given up on; the writer leaves the registry last, so an exit waiting
   * for it (mt_tboard_wait_left) never runs under its log line */
  pthread_mutex_lock(&t->mu);
  if (t->abandoned) {
    pthread_mutex_unlock(&t->mu);
    if (!t->failed) /* a failure said so itself */
      mt_log_info("tensorboard: %s's writer caught up after its run ended: the points it still "
                  "held are written",
                  t->dir);
    reg_remove(t);
    destroy(t);
    return NULL;
  }
  t->exited = 1; /* mt_tboard_free joins this thread before it frees t */
  pthread_cond_signal(&t->done);
  pthread_mutex_unlock(&t->mu);
  reg_remove(t);
  return NULL;
}

mt_tboard *mt_tboard_new(const char *dir, int timers, int memory) {
  if (!dir || !*dir) return NULL;
  mt_tboard *t = calloc(1, sizeof *t);
  tb_point *q = t ? malloc(MT_TBOARD_QUEUE * sizeof *q) : NULL;
  if (!q) {
    mt_log_warn("tensorboard: out of memory for the writer of %s; training goes on without "
                "TensorBoard events",
                dir);
    free(t);
    return NULL;
  }
  snprintf(t->dir, sizeof t->dir, "%s", dir);
  t->fd = -1;
  t->last_step = -1;
  t->timers = timers;
  t->memory = memory;
  t->q = q;
  /* done counts on the monotonic clock: mt_tboard_free's bound is the
   * heartbeat's, which a wall-clock step back must not stretch */
  int rc = pthread_mutex_init(&t->mu, NULL);
  if (!rc && (rc = pthread_cond_init(&t->more, NULL))) pthread_mutex_destroy(&t->mu);
  if (!rc && (rc = mt_mono_cond_init(&t->done))) {
    pthread_cond_destroy(&t->more);
    pthread_mutex_destroy(&t->mu);
  }
  if (rc) {
    mt_log_warn("tensorboard: cannot set up the writer of %s: %s; training goes on without "
                "TensorBoard events",
                dir, strerror(rc));
    free(q);
    free(t);
    return NULL;
  }
  reg_add(t);
  rc = pthread_create(&t->thread, NULL, writer_main, t);
  if (rc) {
    mt_log_warn("tensorboard: cannot start the writer thread of %s: %s; training goes on "
                "without TensorBoard events",
                dir, strerror(rc));
    reg_remove(t);
    destroy(t);
    return NULL;
  }
  return t;
}

/* A full queue, said on the first drop and then at most every
 * TB_DROP_LOG_MS with the count since (the step thread's, outside mu). */
static void say_dropped(mt_tboard *t, int64_t step) {
  int64_t now = mt_mono_ms();
  if (t->drop_said_ms && now - t->drop_said_ms < TB_DROP_LOG_MS) return;
  uint64_t n = __atomic_load_n(&t->dropped, __ATOMIC_RELAXED);
  if (!t->drop_said_ms)
    mt_log_warn("tensorboard: the writer of %s is %d steps behind (a slow or stuck file "
                "system); step %lld's points and those after it are dropped until it catches up",
                t->dir, MT_TBOARD_QUEUE, (long long)step);
  else
    mt_log_warn("tensorboard: %llu more steps' points dropped (%llu in all) as of step %lld: "
                "the writer of %s is still behind",
                (unsigned long long)(n - t->dropped_said), (unsigned long long)n, (long long)step,
                t->dir);
  t->drop_said_ms = now, t->dropped_said = n;
}

void mt_tboard_step(mt_tboard *t, const mt_step_stats *st) {
  if (!t || __atomic_load_n(&t->failed, __ATOMIC_RELAXED)) return;
  struct timeval tv;
  gettimeofday(&tv, NULL);
  pthread_mutex_lock(&t->mu);
  /* Once full, steps are dropped until the writer is down to half the
   * queue: each slow spell leaves one gap, not a comb of single steps let
   * in as single slots free, each one more gap in the curve. */
  if (t->n == MT_TBOARD_QUEUE) t->shedding = 1;
  if (t->shedding && t->n <= MT_TBOARD_QUEUE / 2) t->shedding = 0;
  int drop = t->shedding;
  if (!drop) {
    t->q[(t->head + t->n) % MT_TBOARD_QUEUE] =
        (tb_point){*st, (double)tv.tv_sec + tv.tv_usec / 1e6};
    t->n++;
    pthread_cond_signal(&t->more);
  }
  pthread_mutex_unlock(&t->mu);
  if (drop) {
    __atomic_add_fetch(&t->dropped, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&dropped_total, 1, __ATOMIC_RELAXED);
    say_dropped(t, st->step);
  }
}

uint64_t mt_tboard_dropped(const mt_tboard *t) {
  return t ? __atomic_load_n(&t->dropped, __ATOMIC_RELAXED) : 0;
}

uint64_t mt_tboard_dropped_total(void) { return __atomic_load_n(&dropped_total, __ATOMIC_RELAXED); }

uint64_t mt_tboard_dir_reads(void) { return __atomic_load_n(&dir_reads, __ATOMIC_RELAXED); }

size_t mt_tboard_queued(mt_tboard *t) {
  if (!t) return 0;
  pthread_mutex_lock(&t->mu);
  size_t n = t->n;
  pthread_mutex_unlock(&t->mu);
  return n;
}

void mt_tboard_free(mt_tboard *t) {
  if (!t) return;
  uint64_t dropped = __atomic_load_n(&t->dropped, __ATOMIC_RELAXED);
  if (dropped)
    mt_log_warn("tensorboard: %llu steps' points were dropped in all for %s's writer falling "
                "behind",
                (unsigned long long)dropped, t->dir);
  struct timespec until = mt_mono_deadline(TB_FREE_WAIT_MS);
  pthread_mutex_lock(&reg_mu);
  int behind = older_live(t);
  pthread_mutex_unlock(&reg_mu);
  pthread_mutex_lock(&t->mu);
  t->closing = 1;
  pthread_cond_signal(&t->more);
  /* a writer still waiting for an older one of its directory (whose disk
   * hangs) cannot finish within any bound: it is left at once, not after
   * 2 s of the loop thread's (every generation again while the disk hangs) */
  int waits = behind && !t->started;
  while (!t->exited && !waits)
    if (pthread_cond_timedwait(&t->done, &t->mu, &until) == ETIMEDOUT) break;
  if (!t->exited) {
    /* the disk holds the writer: it is left to finish on its own or to
     * end with the process; a file system that hangs for good loses these
     * points. Once mu is let go the writer may free t at any time: what is
     * said of it is put together first. */
    size_t held = t->n + (size_t)t->writing;
    int64_t first = t->writing ? t->writing_step : t->n ? t->q[t->head].st.step : -1;
    char what[4096 + 300];
    if (waits)
      snprintf(what, sizeof what,
               "tensorboard: %s's writer waits for an older writer of the directory (a slow or "
               "stuck file system); it goes on alone with %zu steps' points from step %lld on "
               "not yet written, lost if the daemon exits first",
               t->dir, held, (long long)first);
    else if (held)
      snprintf(what, sizeof what,
               "tensorboard: %s's writer did not finish within %d ms (a slow or stuck file "
               "system); it goes on alone with %zu steps' points from step %lld on not yet "
               "written, lost if the daemon exits first",
               t->dir, TB_FREE_WAIT_MS, held, (long long)first);
    else
      snprintf(what, sizeof what,
               "tensorboard: %s's writer did not finish its fsync within %d ms (a slow or stuck "
               "file system); it goes on alone",
               t->dir, TB_FREE_WAIT_MS);
    pthread_t writer = t->thread;
    t->abandoned = 1;
    pthread_mutex_unlock(&t->mu);
    pthread_detach(writer);
    mt_log_warn("%s", what);
    return;
  }
  pthread_mutex_unlock(&t->mu);
  pthread_join(t->thread, NULL);
  destroy(t);
}

int mt_tboard_wait_left(int timeout_ms) {
  pthread_once(&reg_once, reg_init);
  struct timespec until = mt_mono_deadline(timeout_ms);
  pthread_mutex_lock(&reg_mu);
  int n = 0;
  for (;;) {
    n = 0;
    for (mt_tboard *o = reg_live; o; o = o->reg_next) n++;
    if (!n || pthread_cond_timedwait(&reg_gone, &reg_mu, &until) == ETIMEDOUT) break;
  }
  if (n) { /* recount: one may have ended as the wait ran out */
    n = 0;
    for (mt_tboard *o = reg_live; o; o = o->reg_next) n++;
  }
  pthread_mutex_unlock(&reg_mu);
  if (n)
    mt_log_warn("tensorboard: %d writer%s still held by the file system after %d ms; the points "
                "%s held are lost",
                n, n == 1 ? " is" : "s are", timeout_ms, n == 1 ? "it" : "they");
  return n;
}
