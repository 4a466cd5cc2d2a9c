#include "store_server.h"

#include "err.h"
#include "log.h"
#include "store_wire.h"

#include <errno.h>
#include <inttypes.h>
#include <netdb.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

#define READ_CHUNK (64u << 10)
/* A client that stops reading its replies loses its connection once this much
 * is queued for it, rather than growing the daemon without bound. */
#define MAX_QUEUED_BYTES ((size_t)256 << 20)

/* What an entry costs beyond its key and value, counted against the limit. */
#define ENTRY_BYTES 64

typedef struct entry {
  struct entry *next;
  uint64_t hash;
  char *key; /* NUL-terminated, key_bytes long */
  uint32_t key_bytes;
  char *value; /* bytes + 1, NUL after the last byte */
  uint32_t bytes;
} entry;

typedef struct conn conn;

/* Events of one kind and the log lines about them: at most one every 10 s,
 * each saying how many came since the one before. */
typedef struct tally {
  uint64_t n, logged; /* events, and those a line has told of */
  uint64_t log_ms;    /* when the last line was written (uv_now) */
} tally;

/* Counts an event; 1 when a line is due (since_last: the events it tells of). */
static int tally_add(tally *t, uint64_t now_ms, uint64_t *since_last) {
  t->n++;
  if (t->logged && now_ms - t->log_ms < 10000) return 0;
  *since_last = t->n - t->logged;
  t->logged = t->n, t->log_ms = now_ms;
  return 1;
}

/* A parked GET or WAIT: answered when keys[missing..nkeys) all exist, or when
 * its timer fires. */
typedef struct waiter {
  struct waiter *prev, *next;
  mt_store_server *srv;
  conn *c;
  uint8_t op;
  uint32_t id;
  uint32_t nkeys, missing;
  mt_store_str *keys; /* copies, NUL-terminated, in the same allocation */
  size_t bytes;       /* the allocation, counted in the server's waiter_bytes */
  int timed;
  uv_timer_t timer;
} waiter;

enum { CONN_OPEN, CONN_DRAINING, CONN_CLOSED };

struct conn {
  uv_tcp_t tcp;
  mt_store_server *srv;
  conn *prev, *next;
  int state;
  int authed;   /* sent the cluster key (or the server has none) */
  uint8_t *buf; /* bytes received and not yet handled: buf[0..len), room for cap (counted
                 * in the server's buffer_bytes) */
  size_t len, cap, need;
  size_t queued; /* replies' bytes the kernel has not taken, as last seen (in queued_bytes) */
};

struct mt_store_server {
  uv_loop_t *loop;
  uv_tcp_t listener;
  char addr[300]; /* "host:port", for messages */
  int port;
  int stopping;
  unsigned handles; /* open handles: the listener, connections, waiter timers */
  conn *conns;
  unsigned nconns;
  waiter *waiters;
  unsigned nwaiters;
  entry **table;
  size_t nbuckets, nkeys;
  uint64_t bytes, max_bytes; /* held (keys, values, ENTRY_BYTES each) and the limit */
  /* the transient bytes, parked requests', receive buffers' and queued replies', and
   * their limit */
  uint64_t waiter_bytes, buffer_bytes, queued_bytes, max_transient;
  int transient_default; /* max_transient is the default, derived from max_bytes */
  unsigned max_conns;
  tally refused; /* connections closed at once */
  tally dropped; /* connections closed for replies queued past the limit */
  char *key;     /* the cluster key a connection must AUTH with, or NULL */
  uint32_t key_bytes;
  void (*closed)(void *);
  void *closed_arg;
  mt_store_str scratch[MT_STORE_MAX_WAIT_KEYS]; /* a WAIT's keys while it is decoded */
  uv_tcp_t reject;    /* accepts and closes a connection there is no memory for */
  int reject_closing; /* reject is closing; a connection waits for it (reject_waiting) */
  int reject_waiting;
};

static void conn_close(conn *c);

/* ------------------------------------------------------------------ teardown */

static void maybe_finish(mt_store_server *s) {
  if (!s->stopping || s->handles) return;
  for (size_t b = 0; b < s->nbuckets; b++)
    for (entry *e = s->table[b], *next; e; e = next) {
      next = e->next;
      free(e->key), free(e->value), free(e);
    }
  free(s->table);
  if (s->key) explicit_bzero(s->key, s->key_bytes);
  free(s->key);
  void (*closed)(void *) = s->closed;
  void *arg = s->closed_arg;
  free(s);
  if (closed) closed(arg);
}

static void handle_closed(mt_store_server *s) {
  s->handles--;
  maybe_finish(s);
}

static void listener_closed(uv_handle_t *h) { handle_closed(h->data); }

static void waiter_free(waiter *w);

/* The connection's parked requests go with it, here rather than in
 * conn_close, so that code walking the waiter list may close connections. */
static void conn_closed(uv_handle_t *h) {
  conn *c = h->data;
  mt_store_server *s = c->srv;
  for (waiter *w = s->waiters, *next; w; w = next) {
    next = w->next;
    if (w->c == c) waiter_free(w);
  }
  s->buffer_bytes -= c->cap;
  s->queued_bytes -= c->queued; /* 0: every write's callback has run by now */
  free(c->buf);
  free(c);
  handle_closed(s);
}

static void waiter_closed(uv_handle_t *h) {
  waiter *w = h->data;
  mt_store_server *s = w->srv;
  free(w);
  handle_closed(s);
}

static void waiter_free(waiter *w) {
  mt_store_server *s = w->srv;
  if (w->prev)
    w->prev->next = w->next;
  else
    s->waiters = w->next;
  if (w->next) w->next->prev = w->prev;
  s->nwaiters--;
  s->waiter_bytes -= w->bytes;
  if (w->timed)
    uv_close((uv_handle_t *)&w->timer, waiter_closed);
  else
    free(w);
}

/* ------------------------------------------------------------------ transient bytes */

/* Everything counted against max_transient. */
static uint64_t transient_bytes(const mt_store_server *s) {
  return s->waiter_bytes + s->buffer_bytes + s->queued_bytes;
}

/* 0 when the transient bytes can grow by more; else an error naming what
 * (the request, frame or reply that wanted them), what holds them and the
 * limit. */
static int transient_room(const mt_store_server *s, const char *what, uint64_t more) {
  uint64_t held = transient_bytes(s), after = held + more;
  if (after <= s->max_transient) return 0;
  return mt_seterr(
      MT_ENOMEM,
      "%s: the store's room for waiting requests, unread frames and unsent replies is full: "
      "%" PRIu64 " bytes (%" PRIu64 " in %u parked GETs and WAITs, %" PRIu64
      " in the receive buffers of %u connections, %" PRIu64 " in replies not yet sent), "
      "this would make %" PRIu64 ", over their limit of %" PRIu64 "%s",
      what, held, s->waiter_bytes, s->nwaiters, s->buffer_bytes, s->nconns, s->queued_bytes, after,
      s->max_transient,
      s->transient_default ? " (a quarter of rendezvous.store_max_mb, at least 256 MiB)" : "");
}

/* Resizes c's receive buffer to cap bytes; growing it must fit the transient
 * limit. On failure the buffer is as it was. */
static int buf_resize(conn *c, size_t cap, const char *what) {
  mt_store_server *s = c->srv;
  char buffer[64];
  if (!what) {
    snprintf(buffer, sizeof buffer, "a receive buffer of %zu bytes", cap);
    what = buffer;
  }
  if (cap > c->cap) {
    int rc = transient_room(s, what, cap - c->cap);
    if (rc) return rc;
  }
  uint8_t *p = realloc(c->buf, cap);
  if (!p) return mt_seterr(MT_ENOMEM, "%s: out of memory", what);
  s->buffer_bytes = s->buffer_bytes - c->cap + cap;
  c->buf = p;
  c->cap = cap;
  return 0;
}

/* ------------------------------------------------------------------ the table */

static uint64_t hash_key(const char *p, uint32_t n) {
  uint64_t h = 1469598103934665603ull;
  for (uint32_t i = 0; i < n; i++) h = (h ^ (uint8_t)p[i]) * 1099511628211ull;
  return h;
}

static entry *lookup(mt_store_server *s, mt_store_str k) {
  uint64_t h = hash_key(k.p, k.bytes);
  for (entry *e = s->table[h & (s->nbuckets - 1)]; e; e = e->next)
    if (e->hash == h && e->key_bytes == k.bytes && !memcmp(e->key, k.p, k.bytes)) return e;
  return NULL;
}

static void grow(mt_store_server *s) {
  size_t n = s->nbuckets * 2;
  entry **t = calloc(n, sizeof *t);
  if (!t) return; /* longer chains, still correct */
  for (size_t b = 0; b < s->nbuckets; b++)
    for (entry *e = s->table[b], *next; e; e = next) {
      next = e->next;
      e->next = t[e->hash & (n - 1)];
      t[e->hash & (n - 1)] = e;
    }
  free(s->table);
  s->table = t;
  s->nbuckets = n;
}

/* Stores a copy of value under k, creating the entry when needed; on failure
 * the old value stays. */
static int put(mt_store_server *s, const char *op, mt_store_str k, const char *value,
               uint32_t bytes) {
  int shown = (int)(k.bytes > 200 ? 200 : k.bytes); /* k is not NUL-terminated */
  entry *e = lookup(s, k);
  uint64_t after = s->bytes - (e ? e->bytes : 0) + bytes + (e ? 0 : k.bytes + ENTRY_BYTES);
  if (after > s->bytes && after > s->max_bytes) /* a write that frees room always goes */
    return mt_seterr(MT_ENOMEM,
                     "%s %.*s: the store is full: %" PRIu64 " bytes in %zu keys, this would make "
                     "%" PRIu64 ", over its limit of %" PRIu64 " (rendezvous.store_max_mb)",
                     op, shown, k.p, s->bytes, s->nkeys, after, s->max_bytes);
  char *copy = malloc((size_t)bytes + 1);
  if (!copy)
    return mt_seterr(MT_ENOMEM, "%s %.*s: out of memory (%" PRIu32 " bytes)", op, shown, k.p,
                     bytes);
  if (bytes) memcpy(copy, value, bytes);
  copy[bytes] = 0;
  if (!e) {
    e = calloc(1, sizeof *e);
    char *key = e ? malloc((size_t)k.bytes + 1) : NULL;
    if (!key) {
      free(e), free(copy);
      return mt_seterr(MT_ENOMEM, "%s %.*s: out of memory", op, shown, k.p);
    }
    memcpy(key, k.p, k.bytes);
    key[k.bytes] = 0;
    e->key = key;
    e->key_bytes = k.bytes;
    e->hash = hash_key(k.p, k.bytes);
    entry **b = &s->table[e->hash & (s->nbuckets - 1)];
    e->next = *b;
    *b = e;
    if (++s->nkeys > s->nbuckets) grow(s);
  }
  free(e->value);
  e->value = copy;
  e->bytes = bytes;
  s->bytes = after;
  return 0;
}

static int del(mt_store_server *s, mt_store_str k) {
  uint64_t h = hash_key(k.p, k.bytes);
  for (entry **p = &s->table[h & (s->nbuckets - 1)]; *p; p = &(*p)->next) {
    entry *e = *p;
    if (e->hash == h && e->key_bytes == k.bytes && !memcmp(e->key, k.p, k.bytes)) {
      *p = e->next;
      s->bytes -= e->key_bytes + e->bytes + ENTRY_BYTES;
      free(e->key), free(e->value), free(e);
      s->nkeys--;
      return 1;
    }
  }
  return 0;
}

/* Removes every key that starts with prefix and returns how many: the
 * coordinator drops a past generation's gen/<g>/ keys this way, in one round
 * trip, so a long job's store does not grow with its generations. A walk of
 * the whole table: once a generation, over at most a few generations' keys. */
static int64_t del_prefix(mt_store_server *s, mt_store_str prefix) {
  int64_t n = 0;
  for (size_t b = 0; b < s->nbuckets; b++)
    for (entry **p = &s->table[b]; *p;) {
      entry *e = *p;
      if (e->key_bytes < prefix.bytes || memcmp(e->key, prefix.p, prefix.bytes)) {
        p = &e->next;
        continue;
      }
      *p = e->next;
      s->bytes -= e->key_bytes + e->bytes + ENTRY_BYTES;
      free(e->key), free(e->value), free(e);
      s->nkeys--;
      n++;
    }
  return n;
}

/* ------------------------------------------------------------------ replies */

typedef struct wreq {
  uv_write_t req;
  int close_after;
  uint8_t data[];
} wreq;

/* Brings c's share of the server's queued_bytes to what libuv holds for it now
 * (its write queue: bytes not yet taken by the kernel, which libuv lowers as
 * it writes and when the connection's close cancels its writes). Between
 * those and the next call the count is high, never low. */
static void sync_queued(conn *c) {
  size_t now = uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp);
  c->srv->queued_bytes = c->srv->queued_bytes - c->queued + now;
  c->queued = now;
}

/* Every queued write ends here, written, failed or cancelled by the
 * connection's close (before conn_closed frees c). */
static void on_written(uv_write_t *req, int status) {
  wreq *w = (wreq *)req;
  conn *c = req->handle->data;
  int close_after = w->close_after;
  sync_queued(c);
  free(w);
  if (status == UV_ECANCELED) return; /* the connection is closing */
  if (status < 0 || close_after) conn_close(c);
}

/* Closes c, whose queued replies and the next one would take the transient
 * bytes past their limit (the reason set), with a log line at most every 10 s
 * rather than one a connection. */
static void drop_slow_reader(conn *c) {
  mt_store_server *s = c->srv;
  char peer[64] = "an unknown address";
  struct sockaddr_storage sa;
  int len = sizeof sa;
  if (uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&sa, &len) == 0) {
    char ip[INET6_ADDRSTRLEN] = "";
    int port = 0;
    if (sa.ss_family == AF_INET6) {
      uv_ip6_name((struct sockaddr_in6 *)&sa, ip, sizeof ip);
      port = ntohs(((struct sockaddr_in6 *)&sa)->sin6_port);
    } else {
      uv_ip4_name((struct sockaddr_in *)&sa, ip, sizeof ip);
      port = ntohs(((struct sockaddr_in *)&sa)->sin_port);
    }
    snprintf(peer, sizeof peer, "%s:%d", ip, port);
  }
  uint64_t since;
  if (tally_add(&s->dropped, uv_now(s->loop), &since))
    mt_log_warn("store server %s: closing the connection from %s, which does not read its "
                "replies (%zu bytes queued for it): %s (%" PRIu64
                " such closes since the last such line, %" PRIu64 " in all)",
                s->addr, peer, c->queued, mt_errmsg(), since, s->dropped.n);
  conn_close(c);
}

/* Queues m on c; close_after: close the connection once it is written. A reply
 * that cannot be queued costs the client its connection; so does one that
 * would take the transient bytes past their limit while replies queued before
 * it are still waiting for the kernel to take them (one with nothing waiting
 * before it always goes, so a client that reads its replies is answered). */
static void send_msg(conn *c, const mt_store_msg *m, int close_after) {
  if (c->state == CONN_CLOSED) return;
  mt_store_server *s = c->srv;
  size_t bytes;
  wreq *w = NULL;
  if (mt_store_encode(m, NULL, 0, &bytes)) {
    conn_close(c);
    return;
  }
  sync_queued(c);
  if (c->queued) {
    char what[64];
    snprintf(what, sizeof what, "a reply of %zu bytes", bytes);
    if (transient_room(s, what, bytes)) {
      drop_slow_reader(c);
      return;
    }
  }
  if (!(w = malloc(sizeof *w + bytes)) || mt_store_encode(m, w->data, bytes, &bytes)) {
    free(w);
    conn_close(c);
    return;
  }
  w->close_after = close_after;
  uv_buf_t buf = uv_buf_init((char *)w->data, (unsigned)bytes);
  if (uv_write(&w->req, (uv_stream_t *)&c->tcp, &buf, 1, on_written) < 0) {
    free(w);
    conn_close(c);
    return;
  }
  sync_queued(c); /* what the kernel did not take at once */
  if (c->queued > MAX_QUEUED_BYTES) {
    mt_seterr(MT_ENOMEM, "over %zu MiB of replies queued for one connection",
              MAX_QUEUED_BYTES >> 20);
    drop_slow_reader(c);
  }
}

static void reply(conn *c, uint8_t op, uint32_t id, uint8_t status) {
  mt_store_msg m = {.op = op | MT_STORE_REPLY, .status = status, .id = id};
  send_msg(c, &m, 0);
}

/* An error reply with the calling thread's message as its text. */
static void reply_error(conn *c, uint8_t op, uint32_t id, uint8_t status, int close_after) {
  mt_store_msg m = {.op = op | MT_STORE_REPLY, .status = status, .id = id};
  m.value = mt_store_cstr(mt_errmsg());
  send_msg(c, &m, close_after);
  if (close_after && c->state == CONN_OPEN) {
    c->state = CONN_DRAINING;
    uv_read_stop((uv_stream_t *)&c->tcp);
  }
}

/* ------------------------------------------------------------------ waiters */

/* Finds w's first missing key again (one seen before may have been deleted
 * since); 1 when none is missing. */
static int waiter_ready(mt_store_server *s, waiter *w) {
  w->missing = 0;
  while (w->missing < w->nkeys && lookup(s, w->keys[w->missing])) w->missing++;
  return w->missing == w->nkeys;
}

static void waiter_answer(waiter *w) {
  mt_store_msg m = {.op = w->op | MT_STORE_REPLY, .id = w->id};
  if (w->op == MT_STORE_OP_GET) {
    entry *e = lookup(w->srv, w->keys[0]);
    m.value = (mt_store_str){e->value, e->bytes};
  }
  send_msg(w->c, &m, 0);
  waiter_free(w);
}

/* Answers every waiter whose next missing key is k and whose keys now all exist. */
static void wake(mt_store_server *s, mt_store_str k) {
  for (waiter *w = s->waiters, *next; w; w = next) {
    next = w->next;
    mt_store_str want = w->keys[w->missing];
    if (want.bytes == k.bytes && !memcmp(want.p, k.p, k.bytes) && waiter_ready(s, w))
      waiter_answer(w);
  }
}

static void on_wait_timeout(uv_timer_t *t) {
  waiter *w = t->data;
  mt_store_msg m = {.op = w->op | MT_STORE_REPLY, .status = MT_STORE_TIMEOUT, .id = w->id};
  if (w->op == MT_STORE_OP_WAIT) m.key = w->keys[w->missing];
  send_msg(w->c, &m, 0);
  waiter_free(w);
}

/* Parks a GET (one key) or WAIT until its keys exist or timeout_ms (> 0, or
 * < 0: no limit) passes. */
static void park(conn *c, const mt_store_msg *m, const mt_store_str *keys, uint32_t nkeys,
                 uint32_t missing) {
  mt_store_server *s = c->srv;
  size_t bytes = sizeof(waiter) + nkeys * sizeof(mt_store_str);
  for (uint32_t i = 0; i < nkeys; i++) bytes += keys[i].bytes + 1;
  char what[300];
  const mt_store_str *k = &keys[missing];
  snprintf(what, sizeof what, "%s %.*s", m->op == MT_STORE_OP_GET ? "get" : "wait for",
           (int)(k->bytes > 200 ? 200 : k->bytes), k->p);
  waiter *w = NULL;
  if (transient_room(s, what, bytes)) {
    reply_error(c, m->op, m->id, MT_STORE_NO_MEMORY, 0);
    return;
  }
  if (!(w = calloc(1, bytes))) {
    mt_seterr(MT_ENOMEM, "%s: out of memory to wait (%zu bytes)", what, bytes);
    reply_error(c, m->op, m->id, MT_STORE_NO_MEMORY, 0);
    return;
  }
  w->srv = s;
  w->bytes = bytes;
  s->waiter_bytes += bytes;
  w->c = c;
  w->op = m->op;
  w->id = m->id;
  w->nkeys = nkeys;
  w->missing = missing;
  w->keys = (mt_store_str *)(w + 1);
  char *p = (char *)(w->keys + nkeys);
  for (uint32_t i = 0; i < nkeys; i++) {
    memcpy(p, keys[i].p, keys[i].bytes);
    p[keys[i].bytes] = 0;
    w->keys[i] = (mt_store_str){p, keys[i].bytes};
    p += keys[i].bytes + 1;
  }
  if (m->timeout_ms > 0) {
    uv_timer_init(s->loop, &w->timer);
    w->timer.data = w;
    w->timed = 1;
    s->handles++;
    uv_timer_start(&w->timer, on_wait_timeout, (uint64_t)m->timeout_ms, 0);
  }
  w->next = s->waiters;
  if (s->waiters) s->waiters->prev = w;
  s->waiters = w;
  s->nwaiters++;
}

/* ------------------------------------------------------------------ ops */

static int parse_int(const entry *e, int64_t *v) {
  char *end;
  errno = 0;
  long long x = strtoll(e->value, &end, 10);
  if (errno || end == e->value || *end || (size_t)(end - e->value) != e->bytes) return -1;
  *v = x;
  return 0;
}

static void op_add(conn *c, const mt_store_msg *m) {
  mt_store_server *s = c->srv;
  entry *e = lookup(s, m->key);
  int64_t v = 0;
  if (e && parse_int(e, &v)) {
    mt_seterr(MT_EINVAL, "add to key %.*s: its value \"%.40s\" is not an integer",
              (int)(m->key.bytes > 200 ? 200 : m->key.bytes), m->key.p, e->value);
    reply_error(c, m->op, m->id, MT_STORE_BAD_VALUE, 0);
    return;
  }
  if (__builtin_add_overflow(v, m->num, &v)) {
    mt_seterr(MT_EINVAL, "add %" PRId64 " to key %.*s: overflows a 64-bit integer", m->num,
              (int)(m->key.bytes > 200 ? 200 : m->key.bytes), m->key.p);
    reply_error(c, m->op, m->id, MT_STORE_BAD_VALUE, 0);
    return;
  }
  char text[32];
  int n = snprintf(text, sizeof text, "%" PRId64, v);
  if (put(s, "add to", m->key, text, (uint32_t)n)) {
    reply_error(c, m->op, m->id, MT_STORE_NO_MEMORY, 0);
    return;
  }
  mt_store_msg r = {.op = m->op | MT_STORE_REPLY, .id = m->id, .num = v};
  send_msg(c, &r, 0);
  if (!e) wake(s, m->key);
}

static void op_cas(conn *c, const mt_store_msg *m) {
  mt_store_server *s = c->srv;
  entry *e = lookup(s, m->key);
  int swap = m->flag ? !e
                     : e && e->bytes == m->expected.bytes &&
                           !memcmp(e->value, m->expected.p, m->expected.bytes);
  if (swap && put(s, "cas", m->key, m->value.p, m->value.bytes)) {
    reply_error(c, m->op, m->id, MT_STORE_NO_MEMORY, 0);
    return;
  }
  if (swap) e = lookup(s, m->key);
  mt_store_msg r = {
      .op = m->op | MT_STORE_REPLY, .id = m->id, .flag = (uint8_t)swap, .present = e != NULL};
  if (e) r.value = (mt_store_str){e->value, e->bytes};
  send_msg(c, &r, 0);
  if (swap) wake(s, m->key);
}

/* Whether a equals the server's key, in time that does not depend on where
 * they first differ. */
static int key_matches(const mt_store_server *s, mt_store_str a) {
  unsigned char d = a.bytes != s->key_bytes;
  for (uint32_t i = 0; i < s->key_bytes; i++)
    d |= (unsigned char)(s->key[i] ^ (i < a.bytes ? a.p[i] : 0));
  return d == 0;
}

static void dispatch(conn *c, const mt_store_msg *m) {
  mt_store_server *s = c->srv;
  entry *e;
  mt_store_msg r = {.op = m->op | MT_STORE_REPLY, .id = m->id};
  if (m->op == MT_STORE_OP_AUTH) { /* a server without a key takes any */
    if (!s->key || key_matches(s, m->value)) {
      c->authed = 1;
      reply(c, m->op, m->id, MT_STORE_OK);
    } else {
      mt_seterr(MT_EPERM, "the cluster key does not match this store's (rendezvous.key_file)");
      reply_error(c, m->op, m->id, MT_STORE_UNAUTHORIZED, 1);
    }
    return;
  }
  switch (m->op) {
  case MT_STORE_OP_SET:
    if (put(s, "set", m->key, m->value.p, m->value.bytes)) {
      reply_error(c, m->op, m->id, MT_STORE_NO_MEMORY, 0);
      return;
    }
    reply(c, m->op, m->id, MT_STORE_OK);
    wake(s, m->key);
    return;
  case MT_STORE_OP_GET:
    if ((e = lookup(s, m->key))) {
      r.value = (mt_store_str){e->value, e->bytes};
      send_msg(c, &r, 0);
    } else if (m->timeout_ms == 0) {
      reply(c, m->op, m->id, MT_STORE_TIMEOUT);
    } else {
      park(c, m, &m->key, 1, 0);
    }
    return;
  case MT_STORE_OP_ADD: op_add(c, m); return;
  case MT_STORE_OP_CAS: op_cas(c, m); return;
  case MT_STORE_OP_WAIT: {
    uint32_t missing = 0;
    while (missing < m->nkeys && lookup(s, m->keys[missing])) missing++;
    if (missing == m->nkeys) {
      reply(c, m->op, m->id, MT_STORE_OK);
    } else if (m->timeout_ms == 0) {
      r.status = MT_STORE_TIMEOUT;
      r.key = m->keys[missing];
      send_msg(c, &r, 0);
    } else {
      park(c, m, m->keys, m->nkeys, missing);
    }
    return;
  }
  case MT_STORE_OP_CHECK:
    r.flag = lookup(s, m->key) != NULL;
    send_msg(c, &r, 0);
    return;
  case MT_STORE_OP_DELETE:
    reply(c, m->op, m->id, del(s, m->key) ? MT_STORE_OK : MT_STORE_NOT_FOUND);
    return;
  case MT_STORE_OP_DELETE_PREFIX: /* requests waiting for the keys keep waiting, as for DELETE */
    r.num = del_prefix(s, m->key);
    send_msg(c, &r, 0);
    return;
  case MT_STORE_OP_PING: reply(c, m->op, m->id, MT_STORE_OK); return;
  default:
    mt_seterr(MT_ENOTSUP, "op %u is not a request", m->op);
    reply_error(c, MT_STORE_OP_ERROR, m->id, MT_STORE_UNSUPPORTED, 1);
  }
}

/* ------------------------------------------------------------------ connections */

static void conn_close(conn *c) {
  if (c->state == CONN_CLOSED) return;
  mt_store_server *s = c->srv;
  c->state = CONN_CLOSED; /* its waiters stay, answered to no one, until conn_closed */
  if (c->prev)
    c->prev->next = c->next;
  else
    s->conns = c->next;
  if (c->next) c->next->prev = c->prev;
  s->nconns--;
  uv_close((uv_handle_t *)&c->tcp, conn_closed);
}

/* Room for the next chunk; handle_frames has made room for the frame being
 * read. Past the transient limit a connection reads into the room it has;
 * one with none (a new one) gets UV_ENOBUFS in on_read, with the reason set. */
static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  conn *c = h->data;
  (void)suggested;
  size_t want = c->len + READ_CHUNK;
  if (c->need > want) want = c->need;
  if (c->cap < want && buf_resize(c, want, NULL) && c->cap == c->len) {
    *buf = uv_buf_init(NULL, 0);
    return;
  }
  *buf = uv_buf_init((char *)c->buf + c->len, (unsigned)(c->cap - c->len));
}

/* Handles every whole frame in c->buf; a frame that breaks the protocol is
 * answered with an error and ends the connection. */
static void handle_frames(conn *c) {
  mt_store_server *s = c->srv;
  size_t off = 0;
  mt_store_hdr h = {0};
  c->need = MT_STORE_HDR_BYTES;
  while (c->state == CONN_OPEN) {
    size_t avail = c->len - off;
    if (avail < MT_STORE_HDR_BYTES) break;
    uint8_t why = MT_STORE_MALFORMED;
    if (mt_store_peek(c->buf + off, avail, &h, &why)) {
      reply_error(c, MT_STORE_OP_ERROR, h.id, why, 1);
      break;
    }
    if (h.op & MT_STORE_REPLY) {
      mt_seterr(MT_ENOTSUP, "store frame: a reply (op %u) sent to the server", h.op);
      reply_error(c, MT_STORE_OP_ERROR, h.id, MT_STORE_UNSUPPORTED, 1);
      break;
    }
    /* before the key, nothing but an AUTH of a key's size is buffered: a
     * stranger's header cannot make the server hold 64 MB a connection */
    if (s->key && !c->authed &&
        (h.op != MT_STORE_OP_AUTH || h.frame_bytes > MT_STORE_HDR_BYTES + 4 + MT_STORE_MAX_KEY)) {
      mt_seterr(MT_EPERM, "this store needs the cluster key first (rendezvous.key_file)");
      reply_error(c, h.op, h.id, MT_STORE_UNAUTHORIZED, 1);
      break;
    }
    if (avail < h.frame_bytes) {
      c->need = h.frame_bytes;
      break;
    }
    mt_store_msg m;
    if (mt_store_decode(c->buf + off, h.frame_bytes, &m, s->scratch, MT_STORE_MAX_WAIT_KEYS,
                        &why)) {
      reply_error(c, h.op, h.id, why, 1);
      break;
    }
    dispatch(c, &m);
    off += h.frame_bytes;
  }
  if (c->state == CONN_CLOSED) return;
  memmove(c->buf, c->buf + off, c->len - off);
  c->len -= off;
  /* a frame not all here: room for all of it now, or an error and the close,
   * before the client sends the rest */
  if (c->state == CONN_OPEN && c->need > c->cap) {
    char what[64];
    snprintf(what, sizeof what, "a %s frame of %zu bytes", mt_store_op_name(h.op), c->need);
    if (buf_resize(c, c->need, what)) {
      reply_error(c, h.op, h.id, MT_STORE_NO_MEMORY, 1);
      return;
    }
  }
  if (c->cap > 4 * READ_CHUNK && c->len < READ_CHUNK && c->need <= MT_STORE_HDR_BYTES)
    buf_resize(c, READ_CHUNK, NULL); /* a failed shrink keeps the larger buffer */
}

static void on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf) {
  conn *c = stream->data;
  (void)buf;
  if (nread == UV_ENOBUFS && c->state == CONN_OPEN) { /* on_alloc said why */
    reply_error(c, MT_STORE_OP_ERROR, 0, MT_STORE_NO_MEMORY, 1);
    return;
  }
  if (nread < 0) {
    conn_close(c);
    return;
  }
  if (c->state != CONN_OPEN) return;
  c->len += (size_t)nread;
  handle_frames(c);
}

static void on_connection(uv_stream_t *listener, int status);

/* Out of memory for a connection: it is accepted and closed at once, so
 * libuv, which pauses a listener until its connection is accepted, goes on
 * listening; the client sees the close and retries. */
static void reject_closed(uv_handle_t *h) {
  mt_store_server *s = h->data;
  s->reject_closing = 0;
  s->handles--;
  if (s->reject_waiting && !s->stopping) {
    s->reject_waiting = 0;
    on_connection((uv_stream_t *)&s->listener, 0);
  }
  maybe_finish(s);
}

static void reject_connection(mt_store_server *s) {
  if (s->reject_closing) { /* the one before is still closing: this one waits for it */
    s->reject_waiting = 1;
    return;
  }
  uv_tcp_init(s->loop, &s->reject);
  s->reject.data = s;
  s->handles++;
  s->reject_closing = 1;
  uv_accept((uv_stream_t *)&s->listener, (uv_stream_t *)&s->reject);
  uv_close((uv_handle_t *)&s->reject, reject_closed);
}

/* A connection closed at once: counted, and told of in a log line at most
 * every 10 s rather than one a connection. */
static void refuse_connection(mt_store_server *s, const char *why) {
  if (s->reject_closing) { /* waits for the one before; looked at again (and counted) then */
    s->reject_waiting = 1;
    return;
  }
  uint64_t since;
  if (tally_add(&s->refused, uv_now(s->loop), &since))
    mt_log_warn("store server %s: closing new connections at once: %s (%" PRIu64
                " since the last such line, %" PRIu64 " in all)",
                s->addr, why, since, s->refused.n);
  reject_connection(s);
}

static void on_connection(uv_stream_t *listener, int status) {
  mt_store_server *s = listener->data;
  if (status < 0 || s->stopping) return;
  if (s->nconns >= s->max_conns) {
    char why[96];
    snprintf(why, sizeof why, "%u connections open, its limit of %u", s->nconns, s->max_conns);
    refuse_connection(s, why);
    return;
  }
  conn *c = calloc(1, sizeof *c);
  if (!c) {
    refuse_connection(s, "out of memory for a connection");
    return;
  }
  uv_tcp_init(s->loop, &c->tcp);
  s->handles++;
  c->tcp.data = c;
  c->srv = s;
  c->need = MT_STORE_HDR_BYTES;
  c->next = s->conns;
  if (s->conns) s->conns->prev = c;
  s->conns = c;
  s->nconns++;
  if (uv_accept(listener, (uv_stream_t *)&c->tcp) < 0) {
    conn_close(c);
    return;
  }
  uv_tcp_nodelay(&c->tcp, 1);
  if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) < 0) conn_close(c);
}

/* ------------------------------------------------------------------ start and stop */

/* A listening socket on host:port: 0 and *fd, or an error naming the address. */
static int listen_socket(const char *host, int port, int *fd_out) {
  char service[16];
  snprintf(service, sizeof service, "%d", port);
  struct addrinfo hints = {.ai_family = AF_UNSPEC,
                           .ai_socktype = SOCK_STREAM,
                           .ai_flags = AI_PASSIVE | AI_NUMERICSERV},
                  *res = NULL;
  int g = getaddrinfo(host && *host ? host : NULL, service, &hints, &res);
  if (g)
    return mt_seterr(MT_EINVAL, "store server: address %s:%d: %s", host ? host : "*", port,
                     gai_strerror(g));
  int err = 0, fd = -1;
  const char *what = "socket";
  for (struct addrinfo *a = res; a; a = a->ai_next) {
    fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, a->ai_protocol);
    if (fd < 0) {
      err = errno, what = "socket";
      continue;
    }
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, a->ai_addr, a->ai_addrlen) == 0 && listen(fd, 511) == 0) break;
    err = errno, what = "bind";
    close(fd);
    fd = -1;
  }
  freeaddrinfo(res);
  if (fd < 0)
    return mt_seterr(MT_EIO, "store server: %s %s:%d: %s", what, host ? host : "*", port,
                     strerror(err));
  *fd_out = fd;
  return 0;
}

int mt_store_server_start(struct uv_loop_s *loop, const char *host, int port,
                          const mt_store_server_limits *limits, mt_store_server **out) {
  *out = NULL;
  if (port < 0 || port > 65535)
    return mt_seterr(MT_EINVAL, "store server: port %d is not in 0..65535", port);
  int fd = -1, rc = listen_socket(host, port, &fd);
  if (rc) return rc;
  mt_store_server *s = calloc(1, sizeof *s);
  entry **table = calloc(64, sizeof *table);
  if (!s || !table) {
    free(s), free(table), close(fd);
    return mt_seterr(MT_ENOMEM, "store server: out of memory");
  }
  s->loop = loop;
  s->table = table;
  s->nbuckets = 64;
  s->max_bytes = limits && limits->max_bytes ? limits->max_bytes : MT_STORE_SERVER_MAX_BYTES;
  s->max_transient = limits ? limits->max_transient_bytes : 0;
  if (!s->max_transient) {
    s->transient_default = 1;
    s->max_transient = s->max_bytes / 4;
    if (s->max_transient < MT_STORE_SERVER_MIN_TRANSIENT_BYTES)
      s->max_transient = MT_STORE_SERVER_MIN_TRANSIENT_BYTES;
  }
  s->max_conns = limits && limits->max_conns ? limits->max_conns : MT_STORE_SERVER_MAX_CONNS;
  if (limits && limits->key_bytes) {
    if (!(s->key = malloc(limits->key_bytes))) {
      free(s), free(table), close(fd);
      return mt_seterr(MT_ENOMEM, "store server: out of memory");
    }
    memcpy(s->key, limits->key, limits->key_bytes);
    s->key_bytes = (uint32_t)limits->key_bytes;
  }
  struct sockaddr_storage sa;
  socklen_t len = sizeof sa;
  if (getsockname(fd, (struct sockaddr *)&sa, &len) == 0)
    s->port = ntohs(sa.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&sa)->sin6_port
                                             : ((struct sockaddr_in *)&sa)->sin_port);
  snprintf(s->addr, sizeof s->addr, "%s:%d", host && *host ? host : "*", s->port);
  uv_tcp_init(loop, &s->listener);
  s->listener.data = s;
  s->handles = 1;
  rc = uv_tcp_open(&s->listener, fd);
  if (rc < 0)
    close(fd); /* not the handle's yet */
  else
    rc = uv_listen((uv_stream_t *)&s->listener, 511, on_connection);
  if (rc < 0) {
    mt_seterr(MT_EIO, "store server: listen on %s: %s", s->addr, uv_strerror(rc));
    s->stopping = 1; /* frees s once the loop has closed the handle */
    uv_close((uv_handle_t *)&s->listener, listener_closed);
    return MT_EIO;
  }
  *out = s;
  return 0;
}

int mt_store_server_port(const mt_store_server *s) { return s->port; }

void mt_store_server_get_stats(const mt_store_server *s, mt_store_server_stats *st) {
  st->clients = s->nconns;
  st->waiters = s->nwaiters;
  st->keys = s->nkeys;
  st->bytes = s->bytes;
  st->transient_bytes = transient_bytes(s);
  st->refused = s->refused.n;
  st->dropped = s->dropped.n;
  st->max_bytes = s->max_bytes;
  st->max_transient_bytes = s->max_transient;
  st->max_conns = s->max_conns;
}

void mt_store_server_stop(mt_store_server *s, void (*closed)(void *arg), void *arg) {
  if (s->stopping) return;
  s->stopping = 1;
  s->closed = closed;
  s->closed_arg = arg;
  while (s->conns) conn_close(s->conns);
  uv_close((uv_handle_t *)&s->listener, listener_closed);
}

/* ------------------------------------------------------------------ own thread */

struct mt_store_server_thread {
  uv_loop_t loop;
  uv_async_t stop;
  mt_store_server *srv;
  pthread_t thread;
  int port;
  /* stats asked for from another thread: the loop answers asked with answered */
  uv_async_t stats_async;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  uint64_t asked, answered;
  int stopped; /* no loop to ask: stats are the last ones */
  mt_store_server_stats stats;
};

static void *server_thread(void *arg) {
  mt_store_server_thread *t = arg;
  uv_run(&t->loop, UV_RUN_DEFAULT);
  return NULL;
}

static void on_stop(uv_async_t *a) {
  mt_store_server_thread *t = a->data;
  /* an asker waiting now, or later, gets the last stats rather than no answer */
  pthread_mutex_lock(&t->mu);
  mt_store_server_get_stats(t->srv, &t->stats);
  t->stopped = 1;
  t->answered = t->asked;
  pthread_cond_broadcast(&t->cv);
  pthread_mutex_unlock(&t->mu);
  mt_store_server_stop(t->srv, NULL, NULL);
  uv_close((uv_handle_t *)a, NULL);
  uv_close((uv_handle_t *)&t->stats_async, NULL);
}

static void on_stats(uv_async_t *a) {
  mt_store_server_thread *t = a->data;
  pthread_mutex_lock(&t->mu);
  mt_store_server_get_stats(t->srv, &t->stats);
  t->answered = t->asked;
  pthread_cond_broadcast(&t->cv);
  pthread_mutex_unlock(&t->mu);
}

int mt_store_server_run_thread(const char *host, int port, const mt_store_server_limits *limits,
                               mt_store_server_thread **out) {
  *out = NULL;
  mt_store_server_thread *t = calloc(1, sizeof *t);
  if (!t) return mt_seterr(MT_ENOMEM, "store server: out of memory");
  int rc = uv_loop_init(&t->loop);
  if (rc < 0) {
    free(t);
    return mt_seterr(MT_EIO, "store server: event loop: %s", uv_strerror(rc));
  }
  if ((rc = mt_store_server_start(&t->loop, host, port, limits, &t->srv))) {
    uv_run(&t->loop, UV_RUN_DEFAULT); /* lets a half-started server close */
    uv_loop_close(&t->loop);
    free(t);
    return rc;
  }
  t->port = mt_store_server_port(t->srv);
  uv_async_init(&t->loop, &t->stop, on_stop);
  t->stop.data = t;
  uv_async_init(&t->loop, &t->stats_async, on_stats);
  t->stats_async.data = t;
  pthread_mutex_init(&t->mu, NULL);
  pthread_cond_init(&t->cv, NULL);
  /* The thread writes to sockets whose peer may be gone: EPIPE, not SIGPIPE. */
  sigset_t pipe, old;
  sigemptyset(&pipe);
  sigaddset(&pipe, SIGPIPE);
  pthread_sigmask(SIG_BLOCK, &pipe, &old);
  int e = pthread_create(&t->thread, NULL, server_thread, t);
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  if (e) {
    mt_store_server_stop(t->srv, NULL, NULL);
    uv_close((uv_handle_t *)&t->stop, NULL);
    uv_close((uv_handle_t *)&t->stats_async, NULL);
    uv_run(&t->loop, UV_RUN_DEFAULT);
    uv_loop_close(&t->loop);
    pthread_cond_destroy(&t->cv);
    pthread_mutex_destroy(&t->mu);
    free(t);
    return mt_seterr(MT_EIO, "store server: thread: %s", strerror(e));
  }
  *out = t;
  return 0;
}

int mt_store_server_thread_port(const mt_store_server_thread *t) { return t->port; }

void mt_store_server_thread_get_stats(mt_store_server_thread *t, mt_store_server_stats *st) {
  pthread_mutex_lock(&t->mu);
  uint64_t want = ++t->asked;
  if (!t->stopped) uv_async_send(&t->stats_async);
  while (!t->stopped && t->answered < want) pthread_cond_wait(&t->cv, &t->mu);
  *st = t->stats;
  pthread_mutex_unlock(&t->mu);
}

void mt_store_server_thread_stop(mt_store_server_thread *t) {
  if (!t) return;
  uv_async_send(&t->stop);
  pthread_join(t->thread, NULL);
  uv_loop_close(&t->loop);
  pthread_cond_destroy(&t->cv);
  pthread_mutex_destroy(&t->mu);
  free(t);
}
