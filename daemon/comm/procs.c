/* procs.c — a group of host buffers as a group of processes
 * (MT_COMM_GLOO_PROCS): the ranks that are threads of one process meet in
 * its memory, and one thread of each process, its lowest rank (the
 * process's leader), carries the process's share to the other processes'
 * leaders over a Gloo group of the processes. For the world group, whose
 * full Gloo mesh of every rank costs some 3 N² store requests to form and
 * 2 descriptors per peer in each rank thread (at MT-NLG's 4480 ranks,
 * 60 million requests and 72 thousand descriptors a daemon), where a mesh
 * of the processes costs 64 times fewer of both at 8 ranks a process, and
 * a step's few doubles cross P processes rather than N ranks.
 *
 * A process's threads share a `procs_local`, found by the group's key
 * prefix: a collective waits until every thread of the process has posted
 * its buffers, the leader combines them (in world-rank order), runs the
 * collective among the processes, and writes every thread's result; the
 * others wait for it. Point to point between two threads of a process is a
 * rendezvous in memory; between processes each pair of ranks makes a
 * two-rank Gloo group the first time they talk. Failures (a peer process
 * gone, a deadline, an abort) break the process's share for every thread
 * of it, each of which then fails with the reason.
 */
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "comm.h"
#include "comm_impl.h"
#include "err.h"
#include "monotime.h"

typedef struct proc_span {
  int begin, count; /* a process's world ranks */
} proc_span;

/* Point to point inside the process: what a sender offers a receiver */
typedef struct mailbox {
  const void *buf;
  size_t bytes;
  int state; /* 0 empty, 1 offered, 2 taken */
} mailbox;

/* One process's share of a group: its threads' meeting place */
typedef struct procs_local {
  struct procs_local *next; /* the registry's */
  char prefix[256];
  int refs;   /* threads attached now */
  int joined; /* threads that ever attached: the share is full at n, and no
                 thread leaves creation before it is (procs_create) */
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int begin, n; /* this process's ranks [begin, begin + n) */
  /* made by the leader as the group forms */
  int ready, setup_rc;
  char setup_err[768];
  proc_span *procs; /* every process's ranks, in world order */
  int n_procs, proc, max_count;
  mt_comm *nodes; /* the leaders' Gloo group; NULL with one process */
  /* the collective in progress */
  int arrived;
  uint64_t seq; /* collectives done */
  const void **send;
  void **recv;
  int op_rc;
  char op_err[768];
  int leader_gone; /* the leading rank's thread destroyed its group: no more collectives */
  int broken;      /* the code of the failure that broke the share, 0 while healthy */
  char broken_err[768];
  mailbox *box; /* box[dst * n + src] */
} procs_local;

typedef struct pair {
  int peer;
  mt_comm *comm;
} pair;

/* One rank thread's view */
typedef struct procs_impl {
  procs_local *l;
  int rank, size, me; /* me: rank - l->begin */
  mt_store *store;
  char name[64], prefix[256], addr[64];
  pair *pairs; /* under l->mu: an abort scans them */
  int n_pairs;
} procs_impl;

static pthread_mutex_t registry_mu = PTHREAD_MUTEX_INITIALIZER;
static procs_local *registry;

/* Waits on l->cv until deadline (monotonic ms); 1 when it passed */
static int wait_until(procs_local *l, int64_t deadline) {
  int64_t left = deadline - mt_mono_ms();
  if (left <= 0) return 1;
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  ts.tv_sec += (time_t)(left / 1000);
  ts.tv_nsec += (long)(left % 1000) * 1000000L;
  if (ts.tv_nsec >= 1000000000L) ts.tv_sec++, ts.tv_nsec -= 1000000000L;
  pthread_cond_timedwait(&l->cv, &l->mu, &ts);
  return 0;
}

/* Breaks l (under l->mu) with rc and the message: every waiting and later
 * operation of every thread fails with it. The first reason stays. */
static void break_locked(procs_local *l, int rc, const char *msg) {
  if (!l->broken) {
    l->broken = rc;
    snprintf(l->broken_err, sizeof l->broken_err, "%s", msg);
  }
  pthread_cond_broadcast(&l->cv);
}

static int broken_error(procs_local *l) { return mt_seterr(l->broken, "%s", l->broken_err); }

static int leader_gone_error(procs_local *l) {
  return mt_seterr(MT_ECANCELED,
                   "this process's leading rank %d left the group: it carries the collectives",
                   l->begin);
}

/* A failure among the processes, with where this process stands among
 * them (the processes' group names its peers by their place) */
static int among(procs_local *l, int rc) {
  return mt_wraperr(rc,
                    "among the %d processes (a process's rank there is its place in world-rank "
                    "order; this one is %d, world ranks %d-%d)",
                    l->n_procs, l->proc, l->begin, l->begin + l->n - 1);
}

static procs_local *local_new(const char *prefix, int begin, int n) {
  procs_local *l = calloc(1, sizeof *l);
  if (!l) return NULL;
  l->send = calloc((size_t)n, sizeof *l->send);
  l->recv = calloc((size_t)n, sizeof *l->recv);
  l->box = calloc((size_t)n * (size_t)n, sizeof *l->box);
  if (!l->send || !l->recv || !l->box) {
    free(l->send), free(l->recv), free(l->box), free(l);
    return NULL;
  }
  snprintf(l->prefix, sizeof l->prefix, "%s", prefix);
  l->begin = begin, l->n = n;
  pthread_mutex_init(&l->mu, NULL);
  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_cond_init(&l->cv, &ca);
  pthread_condattr_destroy(&ca);
  return l;
}

static void local_free(procs_local *l) {
  mt_comm_destroy(l->nodes);
  pthread_cond_destroy(&l->cv);
  pthread_mutex_destroy(&l->mu);
  free(l->procs), free(l->send), free(l->recv), free(l->box), free(l);
}

/* The process's share for prefix, made by the first thread to come. The
 * ranks [begin, begin + n) name it too: the engine's tests run several
 * "processes" (mt_local instances) in one, each its own share. A full share
 * (all n came) takes no one more: a thread with its prefix is of a later
 * group of the same name, whose share is its own. */
static int attach(procs_impl *h, const char *prefix, int begin, int n) {
  pthread_mutex_lock(&registry_mu);
  procs_local *l = registry;
  while (l && (strcmp(l->prefix, prefix) || l->begin != begin || l->joined == l->n)) l = l->next;
  if (l && l->n != n) {
    pthread_mutex_unlock(&registry_mu);
    return mt_seterr(MT_EINVAL,
                     "this process's ranks: [%d, %d) here, [%d, %d) said by another of its threads",
                     begin, begin + n, l->begin, l->begin + l->n);
  }
  if (!l) {
    if (!(l = local_new(prefix, begin, n))) {
      pthread_mutex_unlock(&registry_mu);
      return mt_seterr(MT_ENOMEM, "out of memory");
    }
    l->next = registry, registry = l;
  }
  l->refs++;
  pthread_mutex_lock(&l->mu);
  l->joined++;
  pthread_cond_broadcast(&l->cv); /* the threads waiting for the share to fill */
  pthread_mutex_unlock(&l->mu);
  h->l = l;
  pthread_mutex_unlock(&registry_mu);
  return 0;
}

static void detach(procs_impl *h) {
  procs_local *l = h->l;
  if (!l) return;
  /* the share is touched only under registry_mu, which its last thread
   * needs to free it: once this one let go, another could free it */
  pthread_mutex_lock(&registry_mu);
  int last = --l->refs == 0;
  if (last) {
    for (procs_local **p = &registry; *p; p = &(*p)->next)
      if (*p == l) {
        *p = l->next;
        break;
      }
  } else if (h->me == 0) { /* the others' collectives cannot finish without it; their
                              messages to each other and to other processes still can */
    pthread_mutex_lock(&l->mu);
    l->leader_gone = 1;
    pthread_cond_broadcast(&l->cv);
    pthread_mutex_unlock(&l->mu);
  }
  pthread_mutex_unlock(&registry_mu);
  if (last) local_free(l);
  h->l = NULL;
}

/* The leader: publishes this process's ranks under <prefix>/procs/<begin>,
 * reads every process's by following them from rank 0 (a request a
 * process), and forms the processes' Gloo group. */
static int setup(procs_impl *h, const mt_comm_opts *o, int64_t deadline) {
  procs_local *l = h->l;
  if (l->n == h->size) { /* every rank here: no other process */
    if (!(l->procs = malloc(sizeof *l->procs))) return mt_seterr(MT_ENOMEM, "out of memory");
    l->procs[0] = (proc_span){l->begin, l->n};
    l->n_procs = 1, l->proc = 0, l->max_count = l->n;
    return 0;
  }
  char key[512], suffix[64], value[32];
  snprintf(suffix, sizeof suffix, "procs/%d", l->begin);
  int rc = mt__comm_key(key, sizeof key, h->prefix, suffix);
  int len = snprintf(value, sizeof value, "%d", l->n);
  if (!rc) rc = o->store->set(o->store, key, value, (size_t)len);
  int cap = 0;
  for (int b = 0; !rc && b < h->size;) {
    snprintf(suffix, sizeof suffix, "procs/%d", b);
    if ((rc = mt__comm_key(key, sizeof key, h->prefix, suffix))) break;
    void *v = NULL;
    int64_t left = deadline - mt_mono_ms();
    rc = o->store->get(o->store, key, &v, NULL, left > 0 ? (int)left : 0);
    if (rc) {
      rc = mt_wraperr(rc, "the process holding world rank %d did not say its ranks", b);
      break;
    }
    char *end = NULL;
    long count = strtol(v, &end, 10);
    int bad = end == v || *end || count < 1 || count > h->size - b;
    free(v);
    if (bad) {
      rc = mt_seterr(MT_ECORRUPT, "store key %s: not a count of ranks from %d to %d", key, b,
                     h->size);
      break;
    }
    if (l->n_procs == cap) {
      cap = cap ? 2 * cap : 16;
      proc_span *p = realloc(l->procs, (size_t)cap * sizeof *p);
      if (!p) {
        rc = mt_seterr(MT_ENOMEM, "out of memory");
        break;
      }
      l->procs = p;
    }
    if (b == l->begin) l->proc = l->n_procs;
    l->procs[l->n_procs++] = (proc_span){b, (int)count};
    if (count > l->max_count) l->max_count = (int)count;
    b += (int)count;
  }
  if (rc) return rc;
  if (l->procs[l->proc].begin != l->begin || l->procs[l->proc].count != l->n)
    return mt_seterr(MT_ECORRUPT, "the processes' ranks read back do not hold this one's [%d, %d)",
                     l->begin, l->begin + l->n);
  char name[64], prefix[300];
  snprintf(name, sizeof name, "%.48s.processes", h->name);
  snprintf(prefix, sizeof prefix, "%s/processes", h->prefix);
  int64_t left = deadline - mt_mono_ms();
  mt_comm_opts no = {.store = o->store,
                     .name = name,
                     .prefix = prefix,
                     .rank = l->proc,
                     .size = l->n_procs,
                     .timeout_ms = left > 1 ? (int)left : 1,
                     .backend = MT_COMM_GLOO,
                     .addr = o->addr};
  mt_comm *nodes = NULL;
  if ((rc = mt_comm_create(&nodes, &no))) return rc;
  /* every leader has read every process's ranks once all have formed the
   * processes' group: this one's key is no one's to read any more */
  snprintf(suffix, sizeof suffix, "procs/%d", l->begin);
  if (!mt__comm_key(key, sizeof key, h->prefix, suffix)) o->store->del(o->store, key);
  pthread_mutex_lock(&l->mu);
  l->nodes = nodes;
  int aborted = l->broken == MT_ECANCELED;
  pthread_mutex_unlock(&l->mu);
  if (aborted) mt_comm_abort(nodes);
  return 0;
}

static int procs_create(const mt_comm_opts *o, int timeout_ms, void **impl) {
  int begin = o->local_count > 0 ? o->local_begin : o->rank;
  int n = o->local_count > 0 ? o->local_count : 1;
  if (begin < 0 || o->rank < begin || o->rank >= begin + n || begin + n > o->size)
    return mt_seterr(MT_EINVAL, "this process's ranks [%d, %d) do not hold rank %d of %d", begin,
                     begin + n, o->rank, o->size);
  procs_impl *h = calloc(1, sizeof *h);
  if (!h) return mt_seterr(MT_ENOMEM, "out of memory");
  h->rank = o->rank, h->size = o->size, h->me = o->rank - begin, h->store = o->store;
  snprintf(h->name, sizeof h->name, "%s", o->name ? o->name : "?");
  snprintf(h->prefix, sizeof h->prefix, "%s", o->prefix);
  snprintf(h->addr, sizeof h->addr, "%s", o->addr ? o->addr : "");
  int rc = attach(h, o->prefix, begin, n);
  if (rc) {
    free(h);
    return rc;
  }
  procs_local *l = h->l;
  int64_t deadline = mt_mono_ms() + timeout_ms;
  if (h->me == 0) {
    rc = setup(h, o, deadline);
    pthread_mutex_lock(&l->mu);
    l->ready = 1, l->setup_rc = rc;
    if (rc) snprintf(l->setup_err, sizeof l->setup_err, "%s", mt_errmsg());
    pthread_cond_broadcast(&l->cv);
  } else {
    pthread_mutex_lock(&l->mu);
    while (!l->ready && !l->broken && !wait_until(l, deadline)) {
    }
    if (l->ready && l->setup_rc)
      rc = mt_seterr(l->setup_rc, "%s", l->setup_err);
    else if (!l->ready && l->broken)
      rc = broken_error(l);
    else if (!l->ready)
      rc = mt_seterr(MT_ETIMEDOUT,
                     "this process's leading rank %d did not form the processes' group within "
                     "%d ms",
                     l->begin, timeout_ms);
  }
  /* No thread leaves before every thread of the process has come. Every
   * rank passed the store's join (mt_comm_create) before any came here, but
   * a thread can still be slow from there to its attach: the others could
   * make the group, destroy it and drop the last reference to the share
   * meanwhile, and the slow one would make a new share and wait in it for a
   * leader that has gone (test_comm_procs saw it on 2 loaded cores). */
  while (!rc && l->joined < l->n && !l->broken && !wait_until(l, deadline)) {
  }
  if (!rc && l->broken) {
    rc = broken_error(l);
  } else if (!rc && l->joined < l->n) {
    char msg[256];
    snprintf(msg, sizeof msg,
             "%d of this process's %d ranks (world ranks from %d) did not come to form the group "
             "within %d ms",
             l->n - l->joined, l->n, l->begin, timeout_ms);
    break_locked(l, MT_ETIMEDOUT, msg); /* the others fail now, not each at its deadline */
    rc = broken_error(l);
  }
  pthread_mutex_unlock(&l->mu);
  if (rc) {
    detach(h);
    free(h);
    return rc;
  }
  *impl = h;
  return 0;
}

static void procs_destroy(void *impl) {
  procs_impl *h = impl;
  for (int i = 0; i < h->n_pairs; i++) mt_comm_destroy(h->pairs[i].comm);
  free(h->pairs);
  detach(h);
  free(h);
}

static void procs_abort(void *impl) {
  procs_impl *h = impl;
  procs_local *l = h->l;
  pthread_mutex_lock(&l->mu);
  break_locked(l, MT_ECANCELED, "aborted");
  if (l->nodes) mt_comm_abort(l->nodes);
  for (int i = 0; i < h->n_pairs; i++) mt_comm_abort(h->pairs[i].comm);
  pthread_mutex_unlock(&l->mu);
}

/* ------------------------------------------------------------ collectives */

/* What the leader runs once every thread of the process has posted its
 * buffers (l->send, l->recv): arg is the operation's */
typedef int (*body_fn)(procs_impl *h, void *arg, int64_t deadline);

/* The processes' group's deadline: what is left of ours */
static mt_comm *nodes_until(procs_local *l, int64_t deadline) {
  int64_t left = deadline - mt_mono_ms();
  mt_comm_set_timeout(l->nodes, left > 1 ? (int)left : 1);
  return l->nodes;
}

/* Every thread posts send and recv; the leader waits for all of them, runs
 * body and publishes its result, which the others wait for (up to twice
 * the deadline: the leader's own wait, then its collective). */
static int collective(procs_impl *h, const void *send, void *recv, body_fn body, void *arg,
                      int timeout_ms) {
  procs_local *l = h->l;
  int64_t deadline = mt_mono_ms() + timeout_ms;
  pthread_mutex_lock(&l->mu);
  if (l->broken || l->leader_gone) {
    int rc = l->broken ? broken_error(l) : leader_gone_error(l);
    pthread_mutex_unlock(&l->mu);
    return rc;
  }
  l->send[h->me] = send, l->recv[h->me] = recv;
  uint64_t seq = l->seq;
  l->arrived++;
  int rc = 0;
  if (h->me == 0) {
    while (l->arrived < l->n && !l->broken && !wait_until(l, deadline)) {
    }
    if (!l->broken && l->arrived < l->n) {
      char msg[256];
      snprintf(msg, sizeof msg,
               "%d of this process's %d ranks (world ranks from %d) did not come within %d ms",
               l->n - l->arrived, l->n, l->begin, timeout_ms);
      break_locked(l, MT_ETIMEDOUT, msg);
    }
    if (l->broken) {
      rc = broken_error(l);
      pthread_mutex_unlock(&l->mu);
      return rc;
    }
    pthread_mutex_unlock(&l->mu);
    rc = body(h, arg, deadline);
    pthread_mutex_lock(&l->mu);
    l->op_rc = rc;
    if (rc) {
      snprintf(l->op_err, sizeof l->op_err, "%s", mt_errmsg());
      break_locked(l, rc, l->op_err);
    }
    l->arrived = 0;
    l->seq++;
    pthread_cond_broadcast(&l->cv);
    pthread_mutex_unlock(&l->mu);
    return rc;
  }
  pthread_cond_broadcast(&l->cv); /* the leader may be waiting for this one */
  int64_t until = deadline + timeout_ms;
  while (l->seq == seq && !l->broken && !l->leader_gone && !wait_until(l, until)) {
  }
  if (l->seq != seq) {
    rc = l->op_rc;
    if (rc) mt_seterr(rc, "%s", l->op_err);
  } else if (l->broken) {
    rc = broken_error(l);
  } else if (l->leader_gone) {
    rc = leader_gone_error(l);
  } else {
    char msg[256];
    snprintf(msg, sizeof msg, "this process's leading rank %d did not finish within %d ms",
             l->begin, 2 * timeout_ms);
    break_locked(l, MT_ETIMEDOUT, msg);
    rc = broken_error(l);
  }
  pthread_mutex_unlock(&l->mu);
  return rc;
}

typedef struct reduce_arg {
  size_t count;
  mt_comm_dtype dt;
  mt_comm_op op;
  int root;    /* reduce: the rank whose recv gets it; -1: all (allreduce) */
  int scatter; /* reduce_scatter: each rank's recv gets its chunk of count */
} reduce_arg;

/* The reduction of every rank's send: this process's in world-rank order
 * into a buffer, then among the processes in place */
static int reduce_body(procs_impl *h, void *argp, int64_t deadline) {
  procs_local *l = h->l;
  reduce_arg *a = argp;
  size_t total = a->scatter ? a->count * (size_t)h->size : a->count;
  size_t bytes = total * mt_comm_dtype_size(a->dt);
  mt__reduce_fn fn = mt__comm_reduce_fn(a->dt, a->op);
  char *acc = malloc(bytes);
  if (!acc) return mt_seterr(MT_ENOMEM, "out of memory for %zu bytes", bytes);
  memcpy(acc, l->send[0], bytes);
  for (int i = 1; i < l->n; i++) fn(acc, acc, l->send[i], total);
  int rc = 0;
  if (l->nodes) {
    rc = mt_comm_allreduce(nodes_until(l, deadline), acc, acc, total, a->dt, a->op);
    if (rc) rc = among(l, rc);
  }
  size_t chunk = a->count * mt_comm_dtype_size(a->dt);
  for (int i = 0; !rc && i < l->n; i++) {
    if (a->scatter)
      memcpy(l->recv[i], acc + (size_t)(l->begin + i) * chunk, chunk);
    else if (a->root < 0 || a->root == l->begin + i)
      memcpy(l->recv[i], acc, bytes);
  }
  free(acc);
  return rc;
}

static int procs_allreduce(void *impl, const void *send, void *recv, size_t count, mt_comm_dtype dt,
                           mt_comm_op op, int timeout_ms) {
  reduce_arg a = {count, dt, op, -1, 0};
  return collective(impl, send, recv, reduce_body, &a, timeout_ms);
}

static int procs_reduce(void *impl, const void *send, void *recv, size_t count, mt_comm_dtype dt,
                        mt_comm_op op, int root, int timeout_ms) {
  reduce_arg a = {count, dt, op, root, 0};
  return collective(impl, send, recv, reduce_body, &a, timeout_ms);
}

static int procs_reduce_scatter(void *impl, const void *send, void *recv, size_t count,
                                mt_comm_dtype dt, mt_comm_op op, int timeout_ms) {
  reduce_arg a = {count, dt, op, -1, 1};
  return collective(impl, send, recv, reduce_body, &a, timeout_ms);
}

/* Every rank's bytes at its world rank's place in every recv: the
 * process's into its block (max_count ranks wide, so every process's block
 * is as long), the blocks gathered among the processes */
static int allgather_body(procs_impl *h, void *argp, int64_t deadline) {
  procs_local *l = h->l;
  size_t bytes = *(size_t *)argp, block = (size_t)l->max_count * bytes;
  char *all = malloc(block * (size_t)l->n_procs);
  if (!all) return mt_seterr(MT_ENOMEM, "out of memory for %zu bytes", block * l->n_procs);
  char *mine = all + (size_t)l->proc * block;
  for (int i = 0; i < l->n; i++) memcpy(mine + (size_t)i * bytes, l->send[i], bytes);
  int rc = 0;
  if (l->nodes) {
    rc = mt_comm_allgather(nodes_until(l, deadline), mine, all, block, MT_COMM_U8);
    if (rc) rc = among(l, rc);
  }
  char *out = l->recv[0];
  for (int q = 0; !rc && q < l->n_procs; q++)
    memcpy(out + (size_t)l->procs[q].begin * bytes, all + (size_t)q * block,
           (size_t)l->procs[q].count * bytes);
  for (int i = 1; !rc && i < l->n; i++) memcpy(l->recv[i], out, bytes * (size_t)h->size);
  free(all);
  return rc;
}

static int procs_allgather(void *impl, const void *send, void *recv, size_t bytes, int timeout_ms) {
  return collective(impl, send, recv, allgather_body, &bytes, timeout_ms);
}

typedef struct bcast_arg {
  size_t bytes;
  int root;
} bcast_arg;

/* The process holding root */
static int proc_of(const procs_local *l, int rank) {
  int q = 0;
  while (q + 1 < l->n_procs && l->procs[q + 1].begin <= rank) q++;
  return q;
}

static int broadcast_body(procs_impl *h, void *argp, int64_t deadline) {
  procs_local *l = h->l;
  bcast_arg *a = argp;
  char *buf = l->recv[0];
  int local_root = a->root - l->begin;
  if (local_root > 0 && local_root < l->n) memcpy(buf, l->recv[local_root], a->bytes);
  int rc = 0;
  if (l->nodes) {
    rc =
        mt_comm_broadcast(nodes_until(l, deadline), buf, a->bytes, MT_COMM_U8, proc_of(l, a->root));
    if (rc) rc = among(l, rc);
  }
  for (int i = 1; !rc && i < l->n; i++)
    if (i != local_root) memcpy(l->recv[i], buf, a->bytes);
  return rc;
}

static int procs_broadcast(void *impl, void *buf, size_t bytes, int root, int timeout_ms) {
  bcast_arg a = {bytes, root};
  return collective(impl, buf, buf, broadcast_body, &a, timeout_ms);
}

static int barrier_body(procs_impl *h, void *arg, int64_t deadline) {
  (void)arg;
  procs_local *l = h->l;
  if (!l->nodes) return 0;
  int rc = mt_comm_barrier(nodes_until(l, deadline));
  return rc ? among(l, rc) : 0;
}

static int procs_barrier(void *impl, int timeout_ms) {
  return collective(impl, NULL, NULL, barrier_body, NULL, timeout_ms);
}

/* ---------------------------------------------------------- point to point */

/* A rendezvous with a thread of this process: the sender offers its buffer
 * in the receiver's box for it and waits until the receiver has copied it */
static int local_send(procs_impl *h, const void *buf, size_t bytes, int peer, int timeout_ms) {
  procs_local *l = h->l;
  mailbox *b = &l->box[(size_t)(peer - l->begin) * l->n + h->me];
  int64_t deadline = mt_mono_ms() + timeout_ms;
  pthread_mutex_lock(&l->mu);
  while (b->state != 0 && !l->broken && !wait_until(l, deadline)) {
  }
  int rc = 0;
  if (l->broken) {
    rc = broken_error(l);
  } else if (b->state != 0) {
    rc = mt_seterr(MT_ETIMEDOUT, "rank %d did not take the last message within %d ms", peer,
                   timeout_ms);
  } else {
    b->buf = buf, b->bytes = bytes, b->state = 1;
    pthread_cond_broadcast(&l->cv);
    while (b->state == 1 && !l->broken && !wait_until(l, deadline)) {
    }
    if (b->state == 2)
      b->state = 0, pthread_cond_broadcast(&l->cv);
    else {
      b->state = 0; /* withdrawn: the receiver never saw it */
      rc = l->broken
               ? broken_error(l)
               : mt_seterr(MT_ETIMEDOUT, "rank %d did not receive within %d ms", peer, timeout_ms);
    }
  }
  pthread_mutex_unlock(&l->mu);
  return rc;
}

static int local_recv(procs_impl *h, void *buf, size_t bytes, int peer, int timeout_ms) {
  procs_local *l = h->l;
  mailbox *b = &l->box[(size_t)h->me * l->n + (peer - l->begin)];
  int64_t deadline = mt_mono_ms() + timeout_ms;
  pthread_mutex_lock(&l->mu);
  while (b->state != 1 && !l->broken && !wait_until(l, deadline)) {
  }
  int rc = 0;
  if (l->broken) {
    rc = broken_error(l);
  } else if (b->state != 1) {
    rc = mt_seterr(MT_ETIMEDOUT, "rank %d sent nothing within %d ms", peer, timeout_ms);
  } else if (b->bytes != bytes) {
    char msg[256];
    snprintf(msg, sizeof msg, "rank %d sent %zu bytes where rank %d expected %zu", peer, b->bytes,
             h->rank, bytes);
    break_locked(l, MT_EINVAL, msg);
    rc = broken_error(l);
  } else {
    memcpy(buf, b->buf, bytes);
    b->state = 2;
    pthread_cond_broadcast(&l->cv);
  }
  pthread_mutex_unlock(&l->mu);
  return rc;
}

/* The two-rank Gloo group of this rank and peer (another process's),
 * formed the first time either talks to the other */
static int pair_with(procs_impl *h, int peer, int timeout_ms, mt_comm **out) {
  for (int i = 0; i < h->n_pairs; i++)
    if (h->pairs[i].peer == peer) return *out = h->pairs[i].comm, 0;
  int lo = h->rank < peer ? h->rank : peer, hi = h->rank < peer ? peer : h->rank;
  char name[64], prefix[320];
  snprintf(name, sizeof name, "%.40s.p2p.%d-%d", h->name, lo, hi);
  snprintf(prefix, sizeof prefix, "%s/p2p/%d-%d", h->prefix, lo, hi);
  mt_comm_opts o = {.store = h->store,
                    .name = name,
                    .prefix = prefix,
                    .rank = h->rank == lo ? 0 : 1,
                    .size = 2,
                    .timeout_ms = timeout_ms,
                    .backend = MT_COMM_GLOO,
                    .addr = h->addr[0] ? h->addr : NULL};
  mt_comm *c = NULL;
  int rc = mt_comm_create(&c, &o);
  if (rc) return rc;
  procs_local *l = h->l;
  pthread_mutex_lock(&l->mu);
  pair *p = realloc(h->pairs, (size_t)(h->n_pairs + 1) * sizeof *p);
  if (p) h->pairs = p, h->pairs[h->n_pairs++] = (pair){peer, c};
  int aborted = l->broken == MT_ECANCELED;
  pthread_mutex_unlock(&l->mu);
  if (!p) {
    mt_comm_destroy(c);
    return mt_seterr(MT_ENOMEM, "out of memory");
  }
  if (aborted) mt_comm_abort(c);
  *out = c;
  return 0;
}

static int is_local(const procs_impl *h, int peer) {
  return peer >= h->l->begin && peer < h->l->begin + h->l->n;
}

/* A message to (send) or from another process's rank over their pair */
static int pair_message(procs_impl *h, int send, void *buf, size_t bytes, int peer,
                        int timeout_ms) {
  mt_comm *c = NULL;
  int rc = pair_with(h, peer, timeout_ms, &c);
  if (rc) return rc;
  mt_comm_set_timeout(c, timeout_ms);
  int other = h->rank < peer ? 1 : 0;
  return send ? mt_comm_send(c, buf, bytes, MT_COMM_U8, other)
              : mt_comm_recv(c, buf, bytes, MT_COMM_U8, other);
}

static int procs_send(void *impl, const void *buf, size_t bytes, int peer, int timeout_ms) {
  procs_impl *h = impl;
  if (is_local(h, peer)) return local_send(h, buf, bytes, peer, timeout_ms);
  return pair_message(h, 1, (void *)buf, bytes, peer, timeout_ms);
}

static int procs_recv(void *impl, void *buf, size_t bytes, int peer, int timeout_ms) {
  procs_impl *h = impl;
  if (is_local(h, peer)) return local_recv(h, buf, bytes, peer, timeout_ms);
  return pair_message(h, 0, buf, bytes, peer, timeout_ms);
}

/* The pipeline's exchanges and started requests move tensors between
 * neighbours, on groups of their own: this group does not carry them */
static int refused(const char *what) {
  return mt_seterr(MT_ENOTSUP,
                   "%s: not carried by a group of processes (gloo-procs); the pipeline's links "
                   "carry them",
                   what);
}

static int procs_sendrecv(void *impl, const void *send, size_t send_bytes, int dst, void *recv,
                          size_t recv_bytes, int src, int timeout_ms) {
  (void)impl, (void)send, (void)send_bytes, (void)dst, (void)recv, (void)recv_bytes, (void)src,
      (void)timeout_ms;
  return refused("sendrecv");
}

static int procs_sendrecv_start(void *impl, int send_slot, const void *send, size_t send_bytes,
                                int dst, int recv_slot, void *recv, size_t recv_bytes, int src,
                                int timeout_ms) {
  (void)impl, (void)send_slot, (void)send, (void)send_bytes, (void)dst, (void)recv_slot, (void)recv,
      (void)recv_bytes, (void)src, (void)timeout_ms;
  return refused("sendrecv_start");
}

static int procs_p2p_wait(void *impl, int slot, int timeout_ms) {
  (void)impl, (void)slot, (void)timeout_ms;
  return refused("p2p_wait");
}

static int procs_wait(void *impl, int timeout_ms) {
  (void)impl, (void)timeout_ms;
  return 0; /* reduce_start runs at once (NULL below) */
}

const mt__comm_backend mt__comm_gloo_procs = {
    .name = "gloo-procs",
    .create = procs_create,
    .destroy = procs_destroy,
    .abort = procs_abort,
    .allreduce = procs_allreduce,
    .reduce_scatter = procs_reduce_scatter,
    .allgather = procs_allgather,
    .broadcast = procs_broadcast,
    .reduce = procs_reduce,
    .reduce_start = NULL,
    .wait = procs_wait,
    .send = procs_send,
    .recv = procs_recv,
    .sendrecv = procs_sendrecv,
    .sendrecv_start = procs_sendrecv_start,
    .p2p_wait = procs_p2p_wait,
    .barrier = procs_barrier,
};
