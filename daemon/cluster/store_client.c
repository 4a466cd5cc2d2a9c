#include "store_client.h"

#include "err.h"
#include "monotime.h"
#include "store_wire.h"

#include <errno.h>
#include <netdb.h>
#include <pthread.h>
#include <semaphore.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#define READ_CHUNK (64u << 10)

/* One call, from the thread that makes it to the loop thread and back. The
 * caller owns it (on its stack) and waits on done; the loop thread fills the
 * result and posts done as the very last thing it does with it. */
typedef struct creq {
  struct creq *next;
  /* what to do */
  uint8_t op;
  const char *key; /* the first missing key's name is filled in for WAIT messages */
  const void *value, *expected;
  size_t bytes, expected_bytes;
  int expect_absent;
  int64_t delta;
  int timeout_ms; /* GET, WAIT: 0 no wait, < 0 no limit */
  const char *const *keys;
  size_t nkeys;
  /* timing, in mt_mono_ms() */
  int64_t start_ms;
  int64_t wait_end_ms;       /* when the server-side wait ends; -1: no limit */
  int64_t deadline_ms;       /* when the client gives up on a reply; -1: never */
  int64_t unconnected_since; /* waiting for a connection since; -1: not waiting */
  uint32_t id;
  /* result */
  int rc;
  char err[768];
  void *out;
  size_t out_bytes;
  int64_t num;
  uint8_t flag, present;
  sem_t done;
} creq;

/* A connection, or an attempt at one; freed when its handle has closed. */
typedef struct peer {
  uv_tcp_t tcp;
  uv_connect_t connect;
  struct client *c;
  uint8_t *buf; /* reply bytes not yet handled */
  size_t len, cap, need;
} peer;

enum { DOWN, WAITING, CONNECTING, UP };

typedef struct client {
  mt_store base;
  char host[256];
  int port;
  char addr[300]; /* "host:port" for messages */
  mt_store_tcp_opts o;
  pthread_t thread;
  uv_loop_t loop;
  uv_async_t wake;
  uv_timer_t retry_timer;    /* WAITING: the backoff delay; CONNECTING: the attempt's limit */
  uv_timer_t deadline_timer; /* the earliest deadline of a pending or in-flight request */

  pthread_mutex_t mu; /* guards submit and closing */
  creq *submit, *submit_tail;
  int closing;

  /* loop thread only */
  peer *peer; /* the connection, or the attempt at one */
  int state;
  creq *pending, *pending_tail; /* not sent yet, in order */
  creq *inflight;               /* sent, waiting for a reply */
  uint32_t next_id;
  int backoff_ms;
  unsigned attempt;
  uint64_t rng;
  char last_error[200];
  char *key; /* the cluster key sent first on every connection, or NULL */
  size_t key_bytes;
  int refused;       /* the server refused the key: every request fails with... */
  char refusal[512]; /* ...this, and no connection is tried again */
  int refused_rc;    /* ...as this code (MT_EPERM, or MT_ECANCELED for the fence) */
  /* the fence (mt_store_tcp_fence), under mu: on every new connection,
   * fence_key must read fence_value before any request goes out */
  char *fence_key;
  void *fence_value;
  size_t fence_bytes;
  int refence; /* a fence set while connected: the loop checks this connection too */
  int fencing; /* loop: this connection's fence GET is not answered yet */

  mt_store_tcp_stats stats; /* updated with atomics */
  int no_del_prefix;        /* the server answered DELETE_PREFIX UNSUPPORTED (atomic) */
} client;

static const char *op_word(uint8_t op) {
  switch (op) {
  case MT_STORE_OP_SET: return "set";
  case MT_STORE_OP_GET: return "get";
  case MT_STORE_OP_ADD: return "add";
  case MT_STORE_OP_CAS: return "cas";
  case MT_STORE_OP_WAIT: return "wait";
  case MT_STORE_OP_CHECK: return "check";
  case MT_STORE_OP_DELETE: return "delete";
  case MT_STORE_OP_PING: return "ping";
  case MT_STORE_OP_DELETE_PREFIX: return "delete keys under";
  default: return "?";
  }
}

/* The op and its key, for messages: "get gen/0/x", "wait for 3 keys", "ping". */
static void describe(const creq *r, char *buf, size_t cap) {
  if (r->op == MT_STORE_OP_WAIT)
    snprintf(buf, cap, "wait for %zu key%s", r->nkeys, r->nkeys == 1 ? "" : "s");
  else if (r->key)
    snprintf(buf, cap, "%s %.300s", op_word(r->op), r->key);
  else
    snprintf(buf, cap, "%s", op_word(r->op));
}

/* Only the loop thread completes a request, and never touches it afterwards. */
static void complete(creq *r, int rc) {
  r->rc = rc;
  sem_post(&r->done);
}

__attribute__((format(printf, 4, 5))) static void fail(client *c, creq *r, int rc, const char *fmt,
                                                       ...) {
  char what[400];
  describe(r, what, sizeof what);
  int n = snprintf(r->err, sizeof r->err, "store(tcp %s): %s: ", c->addr, what);
  if (n < 0 || (size_t)n >= sizeof r->err) n = 0;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(r->err + n, sizeof r->err - (size_t)n, fmt, ap);
  va_end(ap);
  complete(r, rc);
}

static void stat_add(uint64_t *v, uint64_t d) { __atomic_add_fetch(v, d, __ATOMIC_RELAXED); }

/* SET, GET, WAIT, CHECK, PING give the same answer when sent twice. */
static int idempotent(uint8_t op) {
  return op == MT_STORE_OP_SET || op == MT_STORE_OP_GET || op == MT_STORE_OP_WAIT ||
         op == MT_STORE_OP_CHECK || op == MT_STORE_OP_PING;
}

/* ------------------------------------------------------------------ lists */

static void pending_push_back(client *c, creq *r) {
  r->next = NULL;
  if (c->pending_tail)
    c->pending_tail->next = r;
  else
    c->pending = r;
  c->pending_tail = r;
}

static creq *pending_pop(client *c) {
  creq *r = c->pending;
  if (r && !(c->pending = r->next)) c->pending_tail = NULL;
  return r;
}

static void inflight_remove(client *c, creq *r) {
  for (creq **p = &c->inflight; *p; p = &(*p)->next)
    if (*p == r) {
      *p = r->next;
      return;
    }
}

/* ------------------------------------------------------------------ deadlines */

static void on_deadline(uv_timer_t *t);

static void arm_deadline(client *c) {
  int64_t first = -1;
  for (creq *r = c->inflight; r; r = r->next)
    if (r->deadline_ms >= 0 && (first < 0 || r->deadline_ms < first)) first = r->deadline_ms;
  for (creq *r = c->pending; r; r = r->next) {
    if (r->deadline_ms >= 0 && (first < 0 || r->deadline_ms < first)) first = r->deadline_ms;
    int64_t give_up = r->unconnected_since + c->o.connect_timeout_ms;
    if (r->unconnected_since >= 0 && (first < 0 || give_up < first)) first = give_up;
  }
  if (first < 0) {
    uv_timer_stop(&c->deadline_timer);
    return;
  }
  int64_t wait = first - mt_mono_ms();
  uv_timer_start(&c->deadline_timer, on_deadline, wait > 0 ? (uint64_t)wait : 0, 0);
}

static void on_deadline(uv_timer_t *t) {
  client *c = t->data;
  int64_t now = mt_mono_ms();
  for (creq **p = &c->inflight; *p;) {
    creq *r = *p;
    if (r->deadline_ms >= 0 && now >= r->deadline_ms) {
      *p = r->next;
      /* MT_EIO, not MT_ETIMEDOUT: a silent server is a store failure, and a
       * caller polling for a key must not take it for "not set yet". */
      fail(c, r, MT_EIO, "no reply from the store server within %d ms", c->o.request_timeout_ms);
    } else {
      p = &r->next;
    }
  }
  creq *keep = NULL, *keep_tail = NULL;
  for (creq *r = pending_pop(c); r; r = pending_pop(c)) {
    int no_link =
        r->unconnected_since >= 0 && now - r->unconnected_since >= c->o.connect_timeout_ms;
    if (no_link || (r->deadline_ms >= 0 && now >= r->deadline_ms)) {
      fail(c, r, MT_EIO, "no connection to the store server for %d ms (last error: %s)",
           (int)(now - (r->unconnected_since >= 0 ? r->unconnected_since : r->start_ms)),
           c->last_error[0] ? c->last_error : "none");
      continue;
    }
    r->next = NULL;
    if (keep_tail)
      keep_tail->next = r;
    else
      keep = r;
    keep_tail = r;
  }
  c->pending = keep;
  c->pending_tail = keep_tail;
  arm_deadline(c);
}

/* ------------------------------------------------------------------ sending */

typedef struct wreq {
  uv_write_t req;
  int secret; /* data holds the cluster key: wiped before it is freed */
  size_t bytes;
  uint8_t data[];
} wreq;

static void on_written(uv_write_t *req, int status) {
  (void)status; /* a failed write shows as a failed read, which drops the peer */
  wreq *w = (wreq *)req;
  if (w->secret) explicit_bzero(w->data, w->bytes); /* an AUTH's key */
  free(req);
}

static void link_down(client *c, const char *why);

/* Encodes r for the current connection, with the wait time it has left. */
/* The fence's GET: an id no request takes (0 is the AUTH's). */
#define FENCE_ID UINT32_MAX

static int send_req(client *c, creq *r) {
  if (!c->next_id || c->next_id == FENCE_ID) c->next_id = 1; /* 0 is the AUTH's */
  mt_store_msg m = {.op = r->op, .id = r->id = c->next_id++};
  m.key = mt_store_cstr(r->key);
  m.value = (mt_store_str){r->value, (uint32_t)r->bytes};
  m.expected = (mt_store_str){r->expected, (uint32_t)r->expected_bytes};
  m.flag = (uint8_t)r->expect_absent;
  m.num = r->delta;
  m.timeout_ms = r->timeout_ms;
  if (r->timeout_ms > 0) {
    int64_t left = r->wait_end_ms - mt_mono_ms();
    m.timeout_ms = left > 0 ? (int32_t)left : 0;
  }
  mt_store_str keys[r->op == MT_STORE_OP_WAIT ? r->nkeys : 1];
  if (r->op == MT_STORE_OP_WAIT) {
    for (size_t i = 0; i < r->nkeys; i++) keys[i] = mt_store_cstr(r->keys[i]);
    m.keys = keys;
    m.nkeys = (uint32_t)r->nkeys;
  }
  size_t bytes;
  if (mt_store_encode(&m, NULL, 0, &bytes)) {
    fail(c, r, MT_EINVAL, "%s", mt_errmsg());
    return 0;
  }
  wreq *w = malloc(sizeof *w + bytes);
  if (!w) {
    fail(c, r, MT_ENOMEM, "out of memory (%zu bytes)", bytes);
    return 0;
  }
  w->secret = 0, w->bytes = bytes;
  mt_store_encode(&m, w->data, bytes, &bytes); /* cannot fail once sized */
  uv_buf_t buf = uv_buf_init((char *)w->data, (unsigned)bytes);
  int e = uv_write(&w->req, (uv_stream_t *)&c->peer->tcp, &buf, 1, on_written);
  if (e < 0) {
    free(w);
    return e;
  }
  r->unconnected_since = -1;
  r->next = c->inflight;
  c->inflight = r;
  return 0;
}

static void flush(client *c) {
  while (c->state == UP && !c->fencing && c->pending) {
    creq *r = pending_pop(c);
    int e = send_req(c, r);
    if (e < 0) {
      r->next = c->pending; /* first in line once connected again */
      c->pending = r;
      if (!c->pending_tail) c->pending_tail = r;
      char why[120];
      snprintf(why, sizeof why, "write: %s", uv_strerror(e));
      link_down(c, why);
    }
  }
}

/* ------------------------------------------------------------------ replies */

static void link_closed(uv_handle_t *h) {
  peer *l = h->data;
  free(l->buf);
  free(l);
}

static void *copy_bytes(mt_store_str s) {
  char *p = malloc((size_t)s.bytes + 1);
  if (!p) return NULL;
  if (s.bytes) memcpy(p, s.p, s.bytes);
  p[s.bytes] = 0;
  return p;
}

static void on_reply(client *c, creq *r, const mt_store_msg *m) {
  switch (m->status) {
  case MT_STORE_OK: break;
  case MT_STORE_NOT_FOUND: fail(c, r, MT_ENOENT, "no such key"); return;
  case MT_STORE_TIMEOUT:
    if (r->op == MT_STORE_OP_WAIT)
      fail(c, r, MT_ETIMEDOUT, "key %.*s: not set within %d ms", (int)m->key.bytes, m->key.p,
           r->timeout_ms);
    else
      fail(c, r, MT_ETIMEDOUT, "not set within %d ms", r->timeout_ms);
    return;
  default: {
    int rc = m->status == MT_STORE_BAD_VALUE      ? MT_EINVAL
             : m->status == MT_STORE_MALFORMED    ? MT_ECORRUPT
             : m->status == MT_STORE_TOO_LARGE    ? MT_EINVAL
             : m->status == MT_STORE_UNSUPPORTED  ? MT_ENOTSUP
             : m->status == MT_STORE_NO_MEMORY    ? MT_ENOMEM
             : m->status == MT_STORE_UNAUTHORIZED ? MT_EPERM
                                                  : MT_EIO;
    fail(c, r, rc, "server says %s: %.*s", mt_store_status_name(m->status), (int)m->value.bytes,
         m->value.p);
    return;
  }
  }
  switch (r->op) {
  case MT_STORE_OP_GET:
    if (!(r->out = copy_bytes(m->value))) {
      fail(c, r, MT_ENOMEM, "out of memory (%u bytes)", m->value.bytes);
      return;
    }
    r->out_bytes = m->value.bytes;
    break;
  case MT_STORE_OP_CAS:
    r->flag = m->flag;
    r->present = m->present;
    if (m->present && !(r->out = copy_bytes(m->value))) {
      fail(c, r, MT_ENOMEM, "out of memory (%u bytes)", m->value.bytes);
      return;
    }
    r->out_bytes = m->value.bytes;
    break;
  case MT_STORE_OP_ADD:
  case MT_STORE_OP_DELETE_PREFIX: r->num = m->num; break;
  case MT_STORE_OP_CHECK: r->flag = m->flag; break;
  default: break;
  }
  complete(r, 0);
}

/* The server refused this client's key (or its lack of one): every
 * request, now and later, fails with its word, and no connection is tried
 * again; a client with the wrong key cannot become right by retrying. */
static void refuse_all(client *c, int rc) {
  c->refused = 1, c->refused_rc = rc;
  if (rc == MT_ECANCELED) __atomic_store_n(&c->stats.fenced, 1, __ATOMIC_RELAXED);
  for (creq *r = pending_pop(c); r; r = pending_pop(c)) fail(c, r, rc, "%s", c->refusal);
  /* (a request in flight was not carried out: the server answers nothing
   * on an unauthenticated connection but the refusal, and nothing was sent
   * on a fenced one) */
  for (creq *r = c->inflight, *next; r; r = next) next = r->next, fail(c, r, rc, "%s", c->refusal);
  c->inflight = NULL;
  peer *l = c->peer;
  c->peer = NULL;
  c->state = DOWN;
  if (l) uv_close((uv_handle_t *)&l->tcp, link_closed);
  uv_timer_stop(&c->retry_timer);
  arm_deadline(c);
}

static void refused(client *c, const mt_store_msg *m) {
  snprintf(c->refusal, sizeof c->refusal, "the server refused this client: %.*s%s",
           (int)m->value.bytes, m->value.p, c->key ? "" : " (this client has no cluster key)");
  refuse_all(c, MT_EPERM);
}

/* Writes one frame on the connection: the AUTH (secret: wiped when written)
 * or the fence's GET. */
static int send_first(client *c, const mt_store_msg *m, int secret) {
  size_t bytes;
  if (mt_store_encode(m, NULL, 0, &bytes)) return UV_EINVAL;
  wreq *w = malloc(sizeof *w + bytes);
  if (!w) return UV_ENOMEM;
  w->secret = secret, w->bytes = bytes;
  mt_store_encode(m, w->data, bytes, &bytes);
  uv_buf_t buf = uv_buf_init((char *)w->data, (unsigned)bytes);
  int e = uv_write(&w->req, (uv_stream_t *)&c->peer->tcp, &buf, 1, on_written);
  if (e < 0) explicit_bzero(w->data, bytes), free(w);
  return e;
}

/* The fence's GET, after the AUTH on a new connection: requests wait for
 * its answer (fence_answer). 0 when no fence is set. */
static int send_fence(client *c) {
  pthread_mutex_lock(&c->mu);
  int e = 0;
  if (c->fence_key) {
    mt_store_msg m = {.op = MT_STORE_OP_GET, .id = FENCE_ID, .timeout_ms = 0};
    m.key = mt_store_cstr(c->fence_key);
    e = send_first(c, &m, 0);
    c->fencing = e >= 0;
  }
  pthread_mutex_unlock(&c->mu);
  return e;
}

/* The store answered the fence's GET: the value set (go on) or another, or
 * none (another store, started since: everything fails from now on); any
 * other answer says nothing of the store, and the link is made again.
 * 0, or -1 when the link went down or the client refuses all. */
static int fence_answer(client *c, const mt_store_msg *m) {
  c->fencing = 0;
  if (m->status != MT_STORE_OK && m->status != MT_STORE_TIMEOUT &&
      m->status != MT_STORE_NOT_FOUND) {
    char why[160];
    snprintf(why, sizeof why, "the fence's read of the store answered %s",
             mt_store_status_name(m->status));
    link_down(c, why);
    return -1;
  }
  pthread_mutex_lock(&c->mu);
  int same = m->status == MT_STORE_OK && c->fence_key && m->value.bytes == c->fence_bytes &&
             !memcmp(m->value.p, c->fence_value, c->fence_bytes);
  if (!same)
    snprintf(
        c->refusal, sizeof c->refusal,
        "the store at %.120s is not the one this client was fenced to: %.60s reads %s%.*s%s, not "
        "%.*s (the server restarted, or another took its address)",
        c->addr, c->fence_key ? c->fence_key : "(none)", m->status == MT_STORE_OK ? "\"" : "",
        m->status == MT_STORE_OK ? (int)(m->value.bytes < 64 ? m->value.bytes : 64) : 0,
        m->status == MT_STORE_OK ? m->value.p : "", m->status == MT_STORE_OK ? "\"" : "nothing",
        (int)(c->fence_bytes < 64 ? c->fence_bytes : 64), (const char *)c->fence_value);
  pthread_mutex_unlock(&c->mu);
  if (!same) {
    refuse_all(c, MT_ECANCELED);
    return -1;
  }
  peer *l = c->peer;
  flush(c);
  arm_deadline(c);
  return l == c->peer ? 0 : -1; /* a write that failed took the link down */
}

/* AUTH with the cluster key, first on a new connection (id 0, which no
 * request takes). */
static int send_auth(client *c) {
  mt_store_msg m = {.op = MT_STORE_OP_AUTH, .id = 0};
  m.value = (mt_store_str){c->key, (uint32_t)c->key_bytes};
  return send_first(c, &m, 1);
}

/* Handles the whole frames in l->buf; 0, or -1 when the link went down. */
static int handle_frames(client *c, peer *l) {
  size_t off = 0;
  l->need = MT_STORE_HDR_BYTES;
  for (;;) {
    size_t avail = l->len - off;
    if (avail < MT_STORE_HDR_BYTES) break;
    mt_store_hdr h;
    mt_store_msg m;
    char why[300];
    if (mt_store_peek(l->buf + off, avail, &h, NULL) == 0 && h.frame_bytes > avail) {
      l->need = h.frame_bytes;
      break;
    }
    int bad =
        mt_store_decode(l->buf + off, h.frame_bytes ? h.frame_bytes : avail, &m, NULL, 0, NULL);
    if (bad || !(m.op & MT_STORE_REPLY)) {
      snprintf(why, sizeof why, "the server sent a bad frame (%s)",
               bad ? mt_errmsg() : "a request");
      link_down(c, why);
      return -1;
    }
    off += h.frame_bytes;
    if (m.status == MT_STORE_UNAUTHORIZED) {
      refused(c, &m);
      return -1;
    }
    if (m.id == 0 && c->key && m.op == (MT_STORE_OP_ERROR | MT_STORE_REPLY) &&
        m.status == MT_STORE_UNSUPPORTED) { /* the AUTH, to a server from before it */
      mt_store_msg old = {.value = mt_store_cstr(
                              "it does not know AUTH (an mtnlgd older than rendezvous.key_file)")};
      refused(c, &old);
      return -1;
    }
    if (m.id == 0 && m.op == (MT_STORE_OP_AUTH | MT_STORE_REPLY)) continue; /* accepted */
    if (m.id == FENCE_ID && c->fencing && m.op == (MT_STORE_OP_GET | MT_STORE_REPLY)) {
      if (fence_answer(c, &m)) return -1;
      continue;
    }
    creq *r = c->inflight;
    while (r && r->id != m.id) r = r->next;
    if (r) { /* else the request timed out here already */
      inflight_remove(c, r);
      on_reply(c, r, &m);
    }
    if (m.op == (MT_STORE_OP_ERROR | MT_STORE_REPLY)) {
      snprintf(why, sizeof why, "the server closes the connection: %.*s", (int)m.value.bytes,
               m.value.p);
      link_down(c, why);
      return -1;
    }
  }
  memmove(l->buf, l->buf + off, l->len - off);
  l->len -= off;
  if (l->cap > 4 * READ_CHUNK && l->len < READ_CHUNK && l->need <= MT_STORE_HDR_BYTES) {
    uint8_t *p = realloc(l->buf, READ_CHUNK);
    if (p) l->buf = p, l->cap = READ_CHUNK;
  }
  return 0;
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  peer *l = h->data;
  (void)suggested;
  size_t want = l->len + READ_CHUNK;
  if (l->need > want) want = l->need;
  if (l->cap < want) {
    uint8_t *p = realloc(l->buf, want);
    if (!p) {
      *buf = uv_buf_init(NULL, 0);
      return;
    }
    l->buf = p;
    l->cap = want;
  }
  *buf = uv_buf_init((char *)l->buf + l->len, (unsigned)(l->cap - l->len));
}

static void on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf) {
  peer *l = stream->data;
  client *c = l->c;
  (void)buf;
  if (l != c->peer) return;
  if (nread < 0) {
    link_down(c, nread == UV_EOF ? "the server closed the connection" : uv_strerror((int)nread));
    return;
  }
  l->len += (size_t)nread;
  if (handle_frames(c, l) == 0) arm_deadline(c);
}

/* ------------------------------------------------------------------ connecting */

static void start_connect(client *c);

static void on_retry(uv_timer_t *t) {
  client *c = t->data;
  if (c->state == WAITING) {
    start_connect(c);
  } else if (c->state == CONNECTING) {
    snprintf(c->last_error, sizeof c->last_error, "connect timed out after %d ms",
             c->o.connect_timeout_ms);
    link_down(c, NULL);
  }
}

/* Waits the current backoff, with jitter, before the next attempt. */
static void schedule_connect(client *c) {
  if (c->refused) return; /* the key will not become right */
  c->rng ^= c->rng << 13, c->rng ^= c->rng >> 7, c->rng ^= c->rng << 17;
  int d = c->backoff_ms;
  int delay = d / 2 + (int)(c->rng % (uint64_t)(d / 2 + 1));
  __atomic_store_n(&c->stats.last_backoff_ms, delay, __ATOMIC_RELAXED);
  c->backoff_ms = d >= c->o.backoff_max_ms / 2 ? c->o.backoff_max_ms : d * 2;
  c->state = WAITING;
  uv_timer_start(&c->retry_timer, on_retry, (uint64_t)delay, 0);
}

/* Closes the connection or attempt: requests in flight are sent again or
 * fail (see store_client.h), and a new attempt is scheduled. why: NULL for a
 * failed attempt (c->last_error says why), else what ended a live connection. */
static void link_down(client *c, const char *why) {
  peer *l = c->peer;
  int was_up = c->state == UP;
  c->fencing = 0; /* the next connection asks again */
  c->peer = NULL;
  c->state = DOWN;
  if (l) uv_close((uv_handle_t *)&l->tcp, link_closed);
  if (was_up) {
    stat_add(&c->stats.drops, 1);
    if (why && why != c->last_error) snprintf(c->last_error, sizeof c->last_error, "%s", why);
  } else {
    stat_add(&c->stats.connect_failures, 1);
  }
  /* In flight, newest first: retried ones go back in front of the pending
   * ones in the order they were sent. */
  creq *retry = NULL;
  for (creq *r = c->inflight, *next; r; r = next) {
    next = r->next;
    if (idempotent(r->op)) {
      r->next = retry;
      retry = r;
      stat_add(&c->stats.retries, 1);
    } else {
      fail(c, r, MT_EIO,
           "connection lost before the reply (%s); the server may or may not have applied it",
           c->last_error);
    }
  }
  c->inflight = NULL;
  if (retry) {
    creq *tail = retry;
    while (tail->next) tail = tail->next;
    tail->next = c->pending;
    if (!c->pending) c->pending_tail = tail;
    c->pending = retry;
  }
  int64_t now = mt_mono_ms();
  for (creq *r = c->pending; r; r = r->next)
    if (r->unconnected_since < 0) r->unconnected_since = now;
  schedule_connect(c);
  arm_deadline(c);
}

static void on_connect(uv_connect_t *req, int status) {
  peer *l = req->data;
  client *c = l->c;
  if (l != c->peer) return; /* an attempt given up on */
  if (status < 0) {
    snprintf(c->last_error, sizeof c->last_error, "connect: %s", uv_strerror(status));
    link_down(c, NULL);
    return;
  }
  uv_timer_stop(&c->retry_timer);
  c->state = UP;
  c->backoff_ms = c->o.backoff_min_ms;
  stat_add(&c->stats.connects, 1);
  uv_tcp_nodelay(&l->tcp, 1);
  uv_tcp_keepalive(&l->tcp, 1, 10);
  int e = uv_read_start((uv_stream_t *)&l->tcp, on_alloc, on_read);
  if (e < 0) {
    snprintf(c->last_error, sizeof c->last_error, "read: %s", uv_strerror(e));
    link_down(c, c->last_error);
    return;
  }
  if ((c->key && (e = send_auth(c)) < 0) || (e = send_fence(c)) < 0) {
    snprintf(c->last_error, sizeof c->last_error, "write: %s", uv_strerror(e));
    link_down(c, c->last_error);
    return;
  }
  flush(c);
  arm_deadline(c);
}

static void start_connect(client *c) {
  char service[16];
  snprintf(service, sizeof service, "%d", c->port);
  struct addrinfo hints = {.ai_family = AF_UNSPEC,
                           .ai_socktype = SOCK_STREAM,
                           .ai_flags = AI_NUMERICSERV},
                  *res = NULL;
  /* Resolved on every attempt: a restarted server may have moved. Blocks
   * this client's own loop only. */
  int g = getaddrinfo(c->host, service, &hints, &res);
  if (g) {
    snprintf(c->last_error, sizeof c->last_error, "resolve %.100s: %s", c->host, gai_strerror(g));
    link_down(c, NULL);
    return;
  }
  unsigned n = 0;
  for (struct addrinfo *a = res; a; a = a->ai_next) n++;
  struct addrinfo *a = res;
  for (unsigned i = c->attempt++ % n; i; i--) a = a->ai_next;
  peer *l = calloc(1, sizeof *l);
  if (!l) {
    freeaddrinfo(res);
    snprintf(c->last_error, sizeof c->last_error, "out of memory");
    link_down(c, NULL);
    return;
  }
  l->c = c;
  l->need = MT_STORE_HDR_BYTES;
  uv_tcp_init(&c->loop, &l->tcp);
  l->tcp.data = l;
  l->connect.data = l;
  c->peer = l;
  c->state = CONNECTING;
  int e = uv_tcp_connect(&l->connect, &l->tcp, a->ai_addr, on_connect);
  freeaddrinfo(res);
  if (e < 0) {
    snprintf(c->last_error, sizeof c->last_error, "connect: %s", uv_strerror(e));
    link_down(c, NULL);
    return;
  }
  uv_timer_start(&c->retry_timer, on_retry, (uint64_t)c->o.connect_timeout_ms, 0);
}

/* ------------------------------------------------------------------ the loop thread */

static void shut_down(client *c, creq *batch) {
  for (creq *r = batch, *next; r; r = next)
    next = r->next, fail(c, r, MT_ECANCELED, "client closed");
  for (creq *r = pending_pop(c); r; r = pending_pop(c)) fail(c, r, MT_ECANCELED, "client closed");
  for (creq *r = c->inflight, *next; r; r = next)
    next = r->next, fail(c, r, MT_ECANCELED, "client closed");
  c->inflight = NULL;
  if (c->peer) uv_close((uv_handle_t *)&c->peer->tcp, link_closed);
  c->peer = NULL;
  c->state = DOWN;
  uv_close((uv_handle_t *)&c->retry_timer, NULL);
  uv_close((uv_handle_t *)&c->deadline_timer, NULL);
  uv_close((uv_handle_t *)&c->wake, NULL);
}

static void on_wake(uv_async_t *a) {
  client *c = a->data;
  pthread_mutex_lock(&c->mu);
  creq *batch = c->submit;
  int closing = c->closing, refence = c->refence;
  c->submit = c->submit_tail = NULL;
  c->refence = 0;
  pthread_mutex_unlock(&c->mu);
  /* a fence set while connected checks this connection before the batch goes */
  if (refence && !closing && !c->refused && c->state == UP && !c->fencing) {
    int e = send_fence(c);
    if (e < 0) {
      snprintf(c->last_error, sizeof c->last_error, "write: %s", uv_strerror(e));
      link_down(c, c->last_error);
    }
  }
  if (closing) {
    shut_down(c, batch);
    return;
  }
  if (c->refused) {
    for (creq *r = batch, *next; r; r = next)
      next = r->next, fail(c, r, c->refused_rc, "%s", c->refusal);
    return;
  }
  int64_t now = mt_mono_ms();
  for (creq *r = batch, *next; r; r = next) {
    next = r->next;
    r->unconnected_since = c->state == UP && !c->fencing ? -1 : now;
    pending_push_back(c, r);
  }
  flush(c);
  arm_deadline(c);
}

static void *client_thread(void *arg) {
  client *c = arg;
  start_connect(c);
  uv_run(&c->loop, UV_RUN_DEFAULT);
  return NULL;
}

/* ------------------------------------------------------------------ calls */

/* Hands rs[0, n) to the loop thread in one batch, so they go out
 * pipelined, and waits for every one; each rs[i].rc says how it went. 0,
 * or MT_ECANCELED (message set) when the client is closing. */
static int submit_and_wait(client *c, creq *rs, size_t n) {
  int64_t now = mt_mono_ms();
  for (size_t i = 0; i < n; i++) {
    creq *r = &rs[i];
    r->start_ms = now;
    r->wait_end_ms = r->timeout_ms < 0 ? -1 : r->start_ms + r->timeout_ms;
    r->deadline_ms = r->timeout_ms < 0 ? -1 : r->wait_end_ms + c->o.request_timeout_ms;
    r->unconnected_since = -1;
    r->next = i + 1 < n ? &rs[i + 1] : NULL;
    sem_init(&r->done, 0, 0);
  }
  pthread_mutex_lock(&c->mu);
  if (c->closing) {
    pthread_mutex_unlock(&c->mu);
    for (size_t i = 0; i < n; i++) sem_destroy(&rs[i].done);
    return mt_seterr(MT_ECANCELED, "store(tcp %s): %s: client closed", c->addr, op_word(rs[0].op));
  }
  if (c->submit_tail)
    c->submit_tail->next = &rs[0];
  else
    c->submit = &rs[0];
  c->submit_tail = &rs[n - 1];
  /* woken under mu: a free racing this call cannot close the handle in between */
  uv_async_send(&c->wake);
  pthread_mutex_unlock(&c->mu);
  for (size_t i = 0; i < n; i++) {
    while (sem_wait(&rs[i].done) < 0 && errno == EINTR) {
    }
    sem_destroy(&rs[i].done);
  }
  return 0;
}

/* Hands r to the loop thread and waits for its result. */
static int call(client *c, creq *r) {
  int rc = submit_and_wait(c, r, 1);
  if (!rc && r->rc) rc = mt_seterr(r->rc, "%s", r->err);
  return rc;
}

static int check_key(client *c, const char *op, const char *key) {
  if (!key || !*key) return mt_seterr(MT_EINVAL, "store(tcp %s): %s: empty key", c->addr, op);
  size_t n = strnlen(key, MT_STORE_MAX_KEY + 1);
  if (n > MT_STORE_MAX_KEY)
    return mt_seterr(MT_EINVAL, "store(tcp %s): %s %.80s...: key longer than %u bytes", c->addr, op,
                     key, MT_STORE_MAX_KEY);
  return 0;
}

static int check_value(client *c, const char *op, const char *key, size_t bytes) {
  if (bytes > MT_STORE_MAX_VALUE)
    return mt_seterr(MT_EINVAL, "store(tcp %s): %s %s: value of %zu bytes is over the limit of %u",
                     c->addr, op, key, bytes, MT_STORE_MAX_VALUE);
  return 0;
}

static int tcp_set(mt_store *s, const char *key, const void *value, size_t bytes) {
  client *c = (client *)s;
  int rc = check_key(c, "set", key);
  if (rc || (rc = check_value(c, "set", key, bytes))) return rc;
  creq r = {.op = MT_STORE_OP_SET, .key = key, .value = value, .bytes = bytes};
  return call(c, &r);
}

static int tcp_get(mt_store *s, const char *key, void **value, size_t *bytes, int timeout_ms) {
  client *c = (client *)s;
  int rc = check_key(c, "get", key);
  if (rc) return rc;
  creq r = {.op = MT_STORE_OP_GET, .key = key, .timeout_ms = timeout_ms};
  if ((rc = call(c, &r))) return rc;
  *value = r.out;
  if (bytes) *bytes = r.out_bytes;
  return 0;
}

/* n GETs with no wait, sent at once: one round trip. */
static int tcp_get_many(mt_store *s, const char *const *keys, size_t n, void **values,
                        size_t *bytes) {
  client *c = (client *)s;
  int rc = 0;
  for (size_t i = 0; i < n; i++) values[i] = NULL;
  for (size_t i = 0; i < n && !rc; i++) rc = check_key(c, "get", keys[i]);
  if (rc || !n) return rc;
  creq *rs = calloc(n, sizeof *rs);
  if (!rs) return mt_seterr(MT_ENOMEM, "store(tcp %s): get of %zu keys: out of memory", c->addr, n);
  for (size_t i = 0; i < n; i++) rs[i] = (creq){.op = MT_STORE_OP_GET, .key = keys[i]};
  rc = submit_and_wait(c, rs, n);
  for (size_t i = 0; i < n && !rc; i++) {
    if (rs[i].rc && rs[i].rc != MT_ETIMEDOUT) rc = mt_seterr(rs[i].rc, "%s", rs[i].err);
    if (bytes) bytes[i] = rs[i].rc ? 0 : rs[i].out_bytes;
  }
  for (size_t i = 0; i < n; i++) {
    if (!rc && !rs[i].rc)
      values[i] = rs[i].out;
    else
      free(rs[i].out);
  }
  free(rs);
  return rc;
}

static int tcp_add(mt_store *s, const char *key, int64_t delta, int64_t *result) {
  client *c = (client *)s;
  int rc = check_key(c, "add", key);
  if (rc) return rc;
  creq r = {.op = MT_STORE_OP_ADD, .key = key, .delta = delta};
  if ((rc = call(c, &r))) return rc;
  if (result) *result = r.num;
  return 0;
}

static int tcp_check(mt_store *s, const char *key) {
  client *c = (client *)s;
  int rc = check_key(c, "check", key);
  if (rc) return rc;
  creq r = {.op = MT_STORE_OP_CHECK, .key = key};
  if ((rc = call(c, &r))) return rc;
  return r.flag;
}

static int tcp_del(mt_store *s, const char *key) {
  client *c = (client *)s;
  int rc = check_key(c, "delete", key);
  if (rc) return rc;
  creq r = {.op = MT_STORE_OP_DELETE, .key = key};
  return call(c, &r);
}

/* DELETE_PREFIX. A server from before the op answers it with an ERROR,
 * UNSUPPORTED, and closes the connection (taking the client's other
 * non-idempotent requests in flight with it): the client remembers the
 * answer and never sends the op to that server again. */
static int tcp_del_prefix(mt_store *s, const char *prefix, int64_t *deleted) {
  client *c = (client *)s;
  int rc = check_key(c, "delete keys under", prefix);
  if (rc) return rc;
  if (__atomic_load_n(&c->no_del_prefix, __ATOMIC_RELAXED))
    return mt_seterr(MT_ENOTSUP,
                     "store(tcp %s): delete keys under %.300s: the server does not know the op "
                     "(an mtnlgd from before DELETE_PREFIX)",
                     c->addr, prefix);
  creq r = {.op = MT_STORE_OP_DELETE_PREFIX, .key = prefix};
  rc = call(c, &r);
  if (rc == MT_ENOTSUP) __atomic_store_n(&c->no_del_prefix, 1, __ATOMIC_RELAXED);
  if (!rc && deleted) *deleted = r.num;
  return rc;
}

static void tcp_free(mt_store *s) {
  client *c = (client *)s;
  pthread_mutex_lock(&c->mu);
  c->closing = 1;
  pthread_mutex_unlock(&c->mu);
  uv_async_send(&c->wake);
  pthread_join(c->thread, NULL);
  uv_loop_close(&c->loop);
  pthread_mutex_destroy(&c->mu);
  if (c->key) explicit_bzero(c->key, c->key_bytes);
  free(c->key);
  free(c->fence_key);
  free(c->fence_value);
  free(c);
}

static client *as_tcp(mt_store *s, const char *op) {
  if (s && s->free == tcp_free) return (client *)s;
  mt_seterr(MT_EINVAL, "store(%s): %s: only the tcp store has it", s ? s->kind : "none", op);
  return NULL;
}

int mt_store_tcp_cas(mt_store *s, const char *key, const void *expected, size_t expected_bytes,
                     const void *value, size_t bytes, int *swapped, void **current,
                     size_t *current_bytes) {
  client *c = as_tcp(s, "cas");
  if (!c) return MT_EINVAL;
  int rc = check_key(c, "cas", key);
  if (rc || (rc = check_value(c, "cas", key, bytes)) ||
      (rc = check_value(c, "cas", key, expected ? expected_bytes : 0)))
    return rc;
  creq r = {.op = MT_STORE_OP_CAS,
            .key = key,
            .value = value,
            .bytes = bytes,
            .expected = expected,
            .expected_bytes = expected ? expected_bytes : 0,
            .expect_absent = expected == NULL};
  if ((rc = call(c, &r))) return rc;
  if (swapped) *swapped = r.flag;
  if (current)
    *current = r.out;
  else
    free(r.out);
  if (current_bytes) *current_bytes = r.present ? r.out_bytes : 0;
  return 0;
}

int mt_store_tcp_wait(mt_store *s, const char *const *keys, size_t nkeys, int timeout_ms) {
  client *c = as_tcp(s, "wait");
  if (!c) return MT_EINVAL;
  if (nkeys == 0 || nkeys > MT_STORE_MAX_WAIT_KEYS)
    return mt_seterr(MT_EINVAL, "store(tcp %s): wait for %zu keys (1 to %u allowed)", c->addr,
                     nkeys, MT_STORE_MAX_WAIT_KEYS);
  for (size_t i = 0; i < nkeys; i++) {
    int rc = check_key(c, "wait", keys[i]);
    if (rc) return rc;
  }
  creq r = {.op = MT_STORE_OP_WAIT, .keys = keys, .nkeys = nkeys, .timeout_ms = timeout_ms};
  return call(c, &r);
}

int mt_store_tcp_ping(mt_store *s, double *rtt_ms) {
  client *c = as_tcp(s, "ping");
  if (!c) return MT_EINVAL;
  double t0 = mt_mono_s();
  creq r = {.op = MT_STORE_OP_PING};
  int rc = call(c, &r);
  if (!rc && rtt_ms) *rtt_ms = (mt_mono_s() - t0) * 1e3;
  return rc;
}

int mt_store_tcp_get_stats(mt_store *s, mt_store_tcp_stats *st) {
  client *c = as_tcp(s, "stats");
  if (!c) return MT_EINVAL;
  st->connects = __atomic_load_n(&c->stats.connects, __ATOMIC_RELAXED);
  st->connect_failures = __atomic_load_n(&c->stats.connect_failures, __ATOMIC_RELAXED);
  st->drops = __atomic_load_n(&c->stats.drops, __ATOMIC_RELAXED);
  st->retries = __atomic_load_n(&c->stats.retries, __ATOMIC_RELAXED);
  st->last_backoff_ms = __atomic_load_n(&c->stats.last_backoff_ms, __ATOMIC_RELAXED);
  st->fenced = __atomic_load_n(&c->stats.fenced, __ATOMIC_RELAXED);
  return 0;
}

int mt_store_tcp_fence(mt_store *s, const char *key, const void *value, size_t bytes) {
  client *c = as_tcp(s, "fence");
  if (!c) return MT_EINVAL;
  if (!key || !*key) return mt_seterr(MT_EINVAL, "store %s: fence: no key", c->addr);
  char *k = strdup(key);
  void *v = malloc(bytes ? bytes : 1);
  if (!k || !v) {
    free(k), free(v);
    return mt_seterr(MT_ENOMEM, "store %s: fence: out of memory", c->addr);
  }
  memcpy(v, value, bytes);
  pthread_mutex_lock(&c->mu);
  char *old_k = c->fence_key;
  void *old_v = c->fence_value;
  c->fence_key = k, c->fence_value = v, c->fence_bytes = bytes;
  c->refence = 1; /* the connection up now is checked too, before what follows */
  pthread_mutex_unlock(&c->mu);
  uv_async_send(&c->wake);
  free(old_k), free(old_v);
  return 0;
}

/* ------------------------------------------------------------------ creation */

int mt_store_tcp_new(const char *host, int port, const mt_store_tcp_opts *opts, mt_store **out) {
  *out = NULL;
  if (!host || !*host || strlen(host) >= 256)
    return mt_seterr(MT_EINVAL, "store(tcp): bad host \"%.80s\"", host ? host : "");
  if (port <= 0 || port > 65535)
    return mt_seterr(MT_EINVAL, "store(tcp %s): port %d is not in 1..65535", host, port);
  client *c = calloc(1, sizeof *c);
  if (!c) return mt_seterr(MT_ENOMEM, "store(tcp %s:%d): out of memory", host, port);
  snprintf(c->host, sizeof c->host, "%s", host);
  c->port = port;
  snprintf(c->addr, sizeof c->addr, strchr(host, ':') ? "[%s]:%d" : "%s:%d", host, port);
  mt_store_tcp_opts o = opts ? *opts : (mt_store_tcp_opts){0};
  if (o.connect_timeout_ms <= 0) o.connect_timeout_ms = 10000;
  if (o.request_timeout_ms <= 0) o.request_timeout_ms = 30000;
  if (o.backoff_min_ms <= 0) o.backoff_min_ms = 50;
  if (o.backoff_max_ms < o.backoff_min_ms)
    o.backoff_max_ms = o.backoff_min_ms > 2000 ? o.backoff_min_ms : 2000;
  c->o = o;
  if (opts && opts->key_bytes > MT_STORE_MAX_KEY) {
    free(c);
    return mt_seterr(MT_EINVAL, "store(tcp %s:%d): a cluster key of %zu bytes (at most %u)", host,
                     port, opts->key_bytes, MT_STORE_MAX_KEY);
  }
  if (opts && opts->key_bytes) {
    if (!(c->key = malloc(opts->key_bytes))) {
      free(c);
      return mt_seterr(MT_ENOMEM, "store(tcp %s:%d): out of memory", host, port);
    }
    memcpy(c->key, opts->key, opts->key_bytes);
    c->key_bytes = opts->key_bytes;
  }
  if (opts && opts->fence_key && opts->fence_key[0]) { /* from the first connection on */
    c->fence_key = strdup(opts->fence_key);
    c->fence_value = malloc(opts->fence_bytes ? opts->fence_bytes : 1);
    if (!c->fence_key || !c->fence_value) {
      free(c->fence_key), free(c->fence_value), free(c->key), free(c);
      return mt_seterr(MT_ENOMEM, "store(tcp %s:%d): out of memory", host, port);
    }
    memcpy(c->fence_value, opts->fence_value, opts->fence_bytes);
    c->fence_bytes = opts->fence_bytes;
  }
  c->backoff_ms = o.backoff_min_ms;
  c->next_id = 1;
  c->rng = (uint64_t)mt_mono_ms() * 0x9e3779b97f4a7c15ull ^ (uint64_t)getpid() << 32 ^ (uintptr_t)c;
  if (!c->rng) c->rng = 1;
  c->base = (mt_store){.set = tcp_set,
                       .get = tcp_get,
                       .add = tcp_add,
                       .check = tcp_check,
                       .del = tcp_del,
                       .free = tcp_free,
                       .kind = "tcp",
                       .get_many = tcp_get_many,
                       .del_prefix = tcp_del_prefix};
  int e = uv_loop_init(&c->loop);
  if (e < 0) {
    free(c->fence_key), free(c->fence_value), free(c->key), free(c);
    return mt_seterr(MT_EIO, "store(tcp %s:%d): event loop: %s", host, port, uv_strerror(e));
  }
  pthread_mutex_init(&c->mu, NULL);
  uv_async_init(&c->loop, &c->wake, on_wake);
  uv_timer_init(&c->loop, &c->retry_timer);
  uv_timer_init(&c->loop, &c->deadline_timer);
  c->wake.data = c->retry_timer.data = c->deadline_timer.data = c;
  /* The thread writes to a socket whose peer may be gone: EPIPE, not SIGPIPE. */
  sigset_t pipe, old;
  sigemptyset(&pipe);
  sigaddset(&pipe, SIGPIPE);
  pthread_sigmask(SIG_BLOCK, &pipe, &old);
  e = pthread_create(&c->thread, NULL, client_thread, c);
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  if (e) {
    uv_close((uv_handle_t *)&c->wake, NULL);
    uv_close((uv_handle_t *)&c->retry_timer, NULL);
    uv_close((uv_handle_t *)&c->deadline_timer, NULL);
    uv_run(&c->loop, UV_RUN_DEFAULT);
    uv_loop_close(&c->loop);
    pthread_mutex_destroy(&c->mu);
    free(c->fence_key), free(c->fence_value), free(c->key), free(c);
    return mt_seterr(MT_EIO, "store(tcp %s:%d): thread: %s", host, port, strerror(e));
  }
  /* The first round trip: a server that is not there fails here, after
   * connect_timeout_ms, rather than at the first real request. */
  int rc = mt_store_tcp_ping(&c->base, NULL);
  if (rc) {
    tcp_free(&c->base);
    return rc;
  }
  *out = &c->base;
  return 0;
}
