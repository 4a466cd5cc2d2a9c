/* comm.c — the backend-independent half of the comm layer: arguments, the
 * join rendezvous that names missing ranks, the broken and aborted states,
 * messages that name the group and the operation, and the element-wise
 * reductions Gloo runs on the CPU. */
#include "comm.h"

#include "comm_impl.h"
#include "err.h"
#include "monotime.h"

#include <inttypes.h>
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_TIMEOUT_MS 30000

struct mt_comm {
  char name[64];
  char prefix[256];
  int rank, size;
  int timeout_ms;
  const mt__comm_backend *be;
  void *impl;
  atomic_int aborted;
  int started;       /* reduces started and not yet waited for */
  unsigned p2p_busy; /* bit s: started point-to-point request s not yet waited for */
  char p2p_what[MT_COMM_P2P_MAX][64]; /* "send of 4096 bytes to rank 1", per request */
  int broken;       /* the code of the failure that broke the group, 0 while healthy */
  char *broken_msg; /* its message */
};

/* ------------------------------------------------------------- dtypes */

static const struct {
  const char *name;
  size_t bytes;
} dtypes[MT_COMM_NDTYPES] = {
    [MT_COMM_F32] = {"f32", 4}, [MT_COMM_F64] = {"f64", 8}, [MT_COMM_BF16] = {"bf16", 2},
    [MT_COMM_F16] = {"f16", 2}, [MT_COMM_I32] = {"i32", 4}, [MT_COMM_I64] = {"i64", 8},
    [MT_COMM_U8] = {"u8", 1},
};

size_t mt_comm_dtype_size(mt_comm_dtype dt) {
  return (unsigned)dt < MT_COMM_NDTYPES ? dtypes[dt].bytes : 0;
}

const char *mt_comm_dtype_name(mt_comm_dtype dt) {
  return (unsigned)dt < MT_COMM_NDTYPES ? dtypes[dt].name : "?";
}

const char *mt_comm_backend_name(mt_comm_backend b) {
  return b == MT_COMM_GLOO         ? "gloo"
         : b == MT_COMM_NCCL       ? "nccl"
         : b == MT_COMM_GLOO_PROCS ? "gloo-procs"
                                   : "?";
}

/* bf16 and f16 reduce in f32 and round to nearest even, as NCCL does. */
static inline float bf16_to_f32(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
  u += 0x7fff + ((u >> 16) & 1);
  return (uint16_t)(u >> 16);
}

static inline float f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
  if (exp == 31) {
    u = sign | 0x7f800000 | (man << 13);
  } else if (exp) {
    u = sign | ((exp + 112) << 23) | (man << 13);
  } else if (!man) {
    u = sign;
  } else { /* subnormal: man * 2^-24 */
    float f = (float)man * 0x1p-24f;
    memcpy(&u, &f, 4);
    u |= sign;
  }
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static inline uint16_t f32_to_f16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
  uint32_t a = u & 0x7fffffff;
  if (a > 0x7f800000) return sign | 0x7e00;
  if (a >= 0x477ff000) return sign | 0x7c00; /* rounds to beyond 65504: inf */
  if (a < 0x38800000) {                      /* below 2^-14: subnormal in f16 */
    float x;
    memcpy(&x, &a, 4);
    return sign | (uint16_t)lrintf(x * 0x1p24f); /* 0x400 is the smallest normal: right too */
  }
  uint32_t h = (((a >> 23) - 112) << 10) | ((a >> 13) & 0x3ff), rest = a & 0x1fff;
  if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) h++;
  return sign | (uint16_t)h;
}

/* max propagates NaN (either side), so an overflow on one rank is seen by all. */
#define FMAX(x, y) ((x) > (y) || (x) != (x) ? (x) : (y))
#define IMAX(x, y) ((x) > (y) ? (x) : (y))

#define REDUCE(fname, T, expr)                                                                     \
  static void fname(void *out, const void *a, const void *b, size_t n) {                           \
    T *o = out;                                                                                    \
    const T *pa = a, *pb = b;                                                                      \
    for (size_t i = 0; i < n; i++) {                                                               \
      T x = pa[i], y = pb[i];                                                                      \
      o[i] = (expr);                                                                               \
    }                                                                                              \
  }

REDUCE(sum_f32, float, x + y)
REDUCE(max_f32, float, FMAX(x, y))
REDUCE(sum_f64, double, x + y)
REDUCE(max_f64, double, FMAX(x, y))
REDUCE(sum_i32, int32_t, (int32_t)((uint32_t)x + (uint32_t)y))
REDUCE(max_i32, int32_t, IMAX(x, y))
REDUCE(sum_i64, int64_t, (int64_t)((uint64_t)x + (uint64_t)y))
REDUCE(max_i64, int64_t, IMAX(x, y))
REDUCE(sum_u8, uint8_t, (uint8_t)(x + y))
REDUCE(max_u8, uint8_t, IMAX(x, y))
REDUCE(sum_bf16, uint16_t, f32_to_bf16(bf16_to_f32(x) + bf16_to_f32(y)))
REDUCE(max_bf16, uint16_t, f32_to_bf16(FMAX(bf16_to_f32(x), bf16_to_f32(y))))
REDUCE(sum_f16, uint16_t, f32_to_f16(f16_to_f32(x) + f16_to_f32(y)))
REDUCE(max_f16, uint16_t, f32_to_f16(FMAX(f16_to_f32(x), f16_to_f32(y))))

mt__reduce_fn mt__comm_reduce_fn(mt_comm_dtype dt, mt_comm_op op) {
  static const mt__reduce_fn fns[MT_COMM_NDTYPES][2] = {
      [MT_COMM_F32] = {sum_f32, max_f32},    [MT_COMM_F64] = {sum_f64, max_f64},
      [MT_COMM_BF16] = {sum_bf16, max_bf16}, [MT_COMM_F16] = {sum_f16, max_f16},
      [MT_COMM_I32] = {sum_i32, max_i32},    [MT_COMM_I64] = {sum_i64, max_i64},
      [MT_COMM_U8] = {sum_u8, max_u8},
  };
  if ((unsigned)dt >= MT_COMM_NDTYPES || (unsigned)op > MT_COMM_MAX) return NULL;
  return fns[dt][op];
}

/* ------------------------------------------------------------- create */

int mt__comm_key(char *key, size_t cap, const char *prefix, const char *suffix) {
  int n = snprintf(key, cap, "%s/%s", prefix, suffix);
  if (n < 0 || (size_t)n >= cap)
    return mt_seterr(MT_EINVAL, "store key %s/%s is too long", prefix, suffix);
  return 0;
}

/* Publishes <prefix>/join/<rank> and waits for every rank to have, so a
 * rank that never comes is named here instead of surfacing as a backend
 * timeout. Arrivals are counted (<prefix>/joined) and the last one writes
 * <prefix>/all, which the others wait for: a store request or two a rank,
 * not one per peer (20M in all for MT-NLG's 4480-rank world group). */
static int join(mt_comm *c, mt_store *store, int64_t deadline) {
  char key[512], host[64] = "?", value[128];
  gethostname(host, sizeof host - 1);
  int n = snprintf(value, sizeof value, "%s pid %ld", host, (long)getpid());
  char suffix[32];
  snprintf(suffix, sizeof suffix, "join/%d", c->rank);
  int rc;
  if ((rc = mt__comm_key(key, sizeof key, c->prefix, suffix))) return rc;
  if ((rc = mt_store_set(store, key, value, (size_t)n))) return rc;
  char all[512];
  int64_t arrived = 0;
  if ((rc = mt__comm_key(key, sizeof key, c->prefix, "joined")) ||
      (rc = mt__comm_key(all, sizeof all, c->prefix, "all")) ||
      (rc = mt_store_add(store, key, 1, &arrived)))
    return rc;
  if (arrived == c->size && (rc = mt_store_set(store, all, "1", 1))) return rc;
  int64_t left = deadline - mt_mono_ms();
  void *v = NULL;
  rc = mt_store_get(store, all, &v, NULL, left > 0 ? (int)left : 0);
  free(v);
  if (!rc) return 0;
  if (rc != MT_ETIMEDOUT) return rc;
  /* Name every rank that is missing now, not only the first one waited for.
   * The listing gets no time of its own: it stops at the deadline's grace
   * and at the first question the store cannot answer. */
  int store_rc = 0;
  char store_err[160] = "";
  char missing[256] = "";
  size_t len = 0;
  int count = 0;
  int64_t list_end = mt_mono_ms() + 1000;
  for (int r = 0; r < c->size; r++) {
    if (r == c->rank) continue;
    if (mt_mono_ms() >= list_end) {
      if (len < sizeof missing - 16)
        len += (size_t)snprintf(missing + len, sizeof missing - len, "%s...", count ? ", " : "");
      break;
    }
    snprintf(suffix, sizeof suffix, "join/%d", r);
    mt__comm_key(key, sizeof key, c->prefix, suffix);
    int have = mt_store_check(store, key);
    if (have == 1) continue;
    if (have < 0) {
      store_rc = have;
      snprintf(store_err, sizeof store_err, "%s", mt_errmsg());
      break;
    }
    if (len < sizeof missing - 16)
      len += (size_t)snprintf(missing + len, sizeof missing - len, "%s%d", count ? ", " : "", r);
    count++;
  }
  if (store_rc)
    return mt_seterr(store_rc,
                     "peers did not join within %d ms and the store (%s) did not answer: %s",
                     c->timeout_ms, store->kind, store_err);
  snprintf(suffix, sizeof suffix, "join/<rank>");
  mt__comm_key(key, sizeof key, c->prefix, suffix);
  return mt_seterr(MT_ETIMEDOUT, "rank%s %s did not join within %d ms (store %s, key %s)",
                   count == 1 ? "" : "s", len ? missing : "?", c->timeout_ms, store->kind, key);
}

int mt_comm_create(mt_comm **out, const mt_comm_opts *o) {
  *out = NULL;
  const char *name = o && o->name ? o->name : "?";
  if (!o || !o->store || !o->prefix || !*o->prefix)
    return mt_seterr(MT_EINVAL, "comm %s: create: no store or key prefix", name);
  if (o->size < 1 || o->rank < 0 || o->rank >= o->size)
    return mt_seterr(MT_EINVAL, "comm %s: create: rank %d of size %d", name, o->rank, o->size);
  if (strlen(name) >= sizeof((mt_comm *)0)->name || strlen(o->prefix) >= 200)
    return mt_seterr(MT_EINVAL, "comm %s: create: name or key prefix too long", name);
  if (o->timeout_ms < 0)
    return mt_seterr(MT_EINVAL, "comm %s: create: timeout_ms %d", name, o->timeout_ms);
  const mt__comm_backend *be = NULL;
  if (o->backend == MT_COMM_GLOO) {
    be = &mt__comm_gloo;
  } else if (o->backend == MT_COMM_GLOO_PROCS) {
    be = &mt__comm_gloo_procs;
  } else if (o->backend == MT_COMM_NCCL) {
#if MT_HAVE_NCCL || defined(MT_CUDA_EMU) /* the emulator test builds nccl.c on the CPU */
    be = &mt__comm_nccl;
#else
    return mt_seterr(MT_ENOTSUP,
                     "comm %s: create: a group of %d GPU ranks needs NCCL, and this build has "
                     "none (%s)",
                     name, o->size,
                     MT_HAVE_CUDA ? "meson found none beside nvcc nor in the system's folders, "
                                    "or -Dnccl=disabled: install NCCL and rebuild, or rebuild "
                                    "with -Dnccl_dir=DIR naming one"
                                  : "no CUDA backend: rebuild with -Dcuda=enabled");
#endif
  } else {
    return mt_seterr(MT_EINVAL, "comm %s: create: unknown backend %d", name, (int)o->backend);
  }

  mt_comm *c = calloc(1, sizeof *c);
  if (!c) return mt_seterr(MT_ENOMEM, "comm %s: create: out of memory", name);
  snprintf(c->name, sizeof c->name, "%s", name);
  snprintf(c->prefix, sizeof c->prefix, "%s", o->prefix);
  c->rank = o->rank;
  c->size = o->size;
  c->timeout_ms = o->timeout_ms ? o->timeout_ms : DEFAULT_TIMEOUT_MS;
  c->be = be;
  atomic_init(&c->aborted, 0);

  int64_t deadline = mt_mono_ms() + c->timeout_ms;
  int rc = c->size > 1 ? join(c, o->store, deadline) : 0;
  if (!rc) {
    int64_t left = deadline - mt_mono_ms();
    rc = be->create(o, left > 1 ? (int)left : 1, &c->impl);
  }
  if (rc) {
    free(c);
    return mt_wraperr(rc, "comm %s: create (rank %d of %d, %s)", name, o->rank, o->size, be->name);
  }
  *out = c;
  return 0;
}

void mt_comm_destroy(mt_comm *c) {
  if (!c) return;
  if (c->impl) c->be->destroy(c->impl);
  free(c->broken_msg);
  free(c);
}

void mt_comm_abort(mt_comm *c) {
  if (!c) return;
  atomic_store(&c->aborted, 1);
  c->be->abort(c->impl); /* exit-ok: the group's abort, not abort(3) */
}

void mt_comm_set_timeout(mt_comm *c, int timeout_ms) {
  if (timeout_ms > 0) c->timeout_ms = timeout_ms;
}

int mt_comm_timeout(const mt_comm *c) { return c->timeout_ms; }
int mt_comm_rank(const mt_comm *c) { return c->rank; }
int mt_comm_size(const mt_comm *c) { return c->size; }
const char *mt_comm_name(const mt_comm *c) { return c->name; }

/* ------------------------------------------------------------- operations */

/* what: "allreduce of 4194304 bytes", for messages. */
static int refuse(mt_comm *c, const char *what) {
  if (atomic_load(&c->aborted))
    return mt_seterr(MT_ECANCELED, "comm %s: %s: aborted", c->name, what);
  if (c->broken)
    return mt_seterr(c->broken, "comm %s: %s: the group failed earlier: %s", c->name, what,
                     c->broken_msg ? c->broken_msg : "?");
  return 0;
}

static int finish(mt_comm *c, const char *what, int rc) {
  if (!rc) return 0;
  if (atomic_load(&c->aborted) && rc != MT_EINVAL) {
    rc = mt_seterr(MT_ECANCELED, "comm %s: %s: aborted", c->name, what);
  } else {
    mt_wraperr(rc, "comm %s: %s", c->name, what);
  }
  if (rc != MT_EINVAL && !c->broken) {
    c->broken = rc;
    c->broken_msg = strdup(mt_errmsg());
  }
  return rc;
}

static int check_buf(mt_comm *c, const char *what, const void *p, mt_comm_dtype dt) {
  if (!mt_comm_dtype_size(dt))
    return mt_seterr(MT_EINVAL, "comm %s: %s: unknown dtype %d", c->name, what, (int)dt);
  if (!p) return mt_seterr(MT_EINVAL, "comm %s: %s: NULL buffer", c->name, what);
  return 0;
}

int mt_comm_allreduce(mt_comm *c, const void *send, void *recv, size_t count, mt_comm_dtype dt,
                      mt_comm_op op) {
  char what[96];
  size_t bytes = count * mt_comm_dtype_size(dt);
  snprintf(what, sizeof what, "allreduce of %zu bytes", bytes);
  int rc = refuse(c, what);
  if (rc || !count) return rc;
  if ((rc = check_buf(c, what, send, dt)) || (rc = check_buf(c, what, recv, dt))) return rc;
  if ((unsigned)op > MT_COMM_MAX)
    return mt_seterr(MT_EINVAL, "comm %s: %s: unknown op %d", c->name, what, (int)op);
  return finish(c, what, c->be->allreduce(c->impl, send, recv, count, dt, op, c->timeout_ms));
}

int mt_comm_reduce_scatter(mt_comm *c, const void *send, void *recv, size_t count, mt_comm_dtype dt,
                           mt_comm_op op) {
  char what[96];
  size_t bytes = count * mt_comm_dtype_size(dt);
  snprintf(what, sizeof what, "reduce-scatter of %zu bytes", bytes * (size_t)c->size);
  int rc = refuse(c, what);
  if (rc || !count) return rc;
  if ((rc = check_buf(c, what, send, dt)) || (rc = check_buf(c, what, recv, dt))) return rc;
  if ((unsigned)op > MT_COMM_MAX)
    return mt_seterr(MT_EINVAL, "comm %s: %s: unknown op %d", c->name, what, (int)op);
  const char *in = send, *o = recv;
  if (o != in + (size_t)c->rank * bytes && o < in + bytes * (size_t)c->size && o + bytes > in)
    return mt_seterr(MT_EINVAL, "comm %s: %s: recv overlaps send other than at rank %d's chunk",
                     c->name, what, c->rank);
  return finish(c, what, c->be->reduce_scatter(c->impl, send, recv, count, dt, op, c->timeout_ms));
}

int mt_comm_allgather(mt_comm *c, const void *send, void *recv, size_t count, mt_comm_dtype dt) {
  char what[96];
  size_t bytes = count * mt_comm_dtype_size(dt);
  snprintf(what, sizeof what, "allgather of %zu bytes", bytes * (size_t)c->size);
  int rc = refuse(c, what);
  if (rc || !count) return rc;
  if ((rc = check_buf(c, what, send, dt)) || (rc = check_buf(c, what, recv, dt))) return rc;
  const char *in = send, *o = recv;
  if (in != o + (size_t)c->rank * bytes && in < o + bytes * (size_t)c->size && in + bytes > o)
    return mt_seterr(MT_EINVAL, "comm %s: %s: send overlaps recv other than at rank %d's chunk",
                     c->name, what, c->rank);
  return finish(c, what, c->be->allgather(c->impl, send, recv, bytes, c->timeout_ms));
}

int mt_comm_broadcast(mt_comm *c, void *buf, size_t count, mt_comm_dtype dt, int root) {
  char what[96];
  size_t bytes = count * mt_comm_dtype_size(dt);
  snprintf(what, sizeof what, "broadcast of %zu bytes from rank %d", bytes, root);
  int rc = refuse(c, what);
  if (rc || !count) return rc;
  if ((rc = check_buf(c, what, buf, dt))) return rc;
  if (root < 0 || root >= c->size)
    return mt_seterr(MT_EINVAL, "comm %s: %s: no such rank (size %d)", c->name, what, c->size);
  return finish(c, what, c->be->broadcast(c->impl, buf, bytes, root, c->timeout_ms));
}

static int reduce_args(mt_comm *c, char *what, size_t cap, const char *verb, const void *send,
                       void *recv, size_t count, mt_comm_dtype dt, mt_comm_op op, int root) {
  snprintf(what, cap, "%s of %zu bytes to rank %d", verb, count * mt_comm_dtype_size(dt), root);
  int rc = refuse(c, what);
  if (rc || !count) return rc;
  if ((rc = check_buf(c, what, send, dt)) ||
      (c->rank == root && (rc = check_buf(c, what, recv, dt))))
    return rc;
  if ((unsigned)op > MT_COMM_MAX)
    return mt_seterr(MT_EINVAL, "comm %s: %s: unknown op %d", c->name, what, (int)op);
  if (root < 0 || root >= c->size)
    return mt_seterr(MT_EINVAL, "comm %s: %s: no such rank (size %d)", c->name, what, c->size);
  return 0;
}

int mt_comm_reduce(mt_comm *c, const void *send, void *recv, size_t count, mt_comm_dtype dt,
                   mt_comm_op op, int root) {
  char what[96];
  int rc = reduce_args(c, what, sizeof what, "reduce", send, recv, count, dt, op, root);
  if (rc || !count) return rc;
  if (c->started)
    return mt_seterr(MT_EINVAL, "comm %s: %s: started reduces not waited for", c->name, what);
  return finish(c, what, c->be->reduce(c->impl, send, recv, count, dt, op, root, c->timeout_ms));
}

int mt_comm_reduce_start(mt_comm *c, const void *send, void *recv, size_t count, mt_comm_dtype dt,
                         mt_comm_op op, int root) {
  char what[96];
  int rc = reduce_args(c, what, sizeof what, "started reduce", send, recv, count, dt, op, root);
  if (rc || !count) return rc;
  if (!c->be->reduce_start)
    return finish(c, what, c->be->reduce(c->impl, send, recv, count, dt, op, root, c->timeout_ms));
  rc =
      finish(c, what, c->be->reduce_start(c->impl, send, recv, count, dt, op, root, c->timeout_ms));
  if (!rc) c->started++;
  return rc;
}

int mt_comm_wait(mt_comm *c) {
  char what[96];
  snprintf(what, sizeof what, "wait for %d started reduce%s", c->started,
           c->started == 1 ? "" : "s");
  int rc = refuse(c, what);
  if (rc || !c->started) return rc;
  c->started = 0;
  return finish(c, what, c->be->wait(c->impl, c->timeout_ms));
}

static int check_peer(mt_comm *c, const char *what, int peer) {
  if (peer < 0 || peer >= c->size || peer == c->rank)
    return mt_seterr(MT_EINVAL, "comm %s: %s: bad peer (rank %d of %d)", c->name, what, c->rank,
                     c->size);
  return 0;
}

int mt_comm_send(mt_comm *c, const void *buf, size_t count, mt_comm_dtype dt, int peer) {
  char what[96];
  size_t bytes = count * mt_comm_dtype_size(dt);
  snprintf(what, sizeof what, "send of %zu bytes to rank %d", bytes, peer);
  int rc = refuse(c, what);
  if (rc || !count) return rc;
  if ((rc = check_buf(c, what, buf, dt)) || (rc = check_peer(c, what, peer))) return rc;
  return finish(c, what, c->be->send(c->impl, buf, bytes, peer, c->timeout_ms));
}

int mt_comm_recv(mt_comm *c, void *buf, size_t count, mt_comm_dtype dt, int peer) {
  char what[96];
  size_t bytes = count * mt_comm_dtype_size(dt);
  snprintf(what, sizeof what, "recv of %zu bytes from rank %d", bytes, peer);
  int rc = refuse(c, what);
  if (rc || !count) return rc;
  if ((rc = check_buf(c, what, buf, dt)) || (rc = check_peer(c, what, peer))) return rc;
  return finish(c, what, c->be->recv(c->impl, buf, bytes, peer, c->timeout_ms));
}

int mt_comm_sendrecv(mt_comm *c, const void *send, size_t send_count, int dst, void *recv,
                     size_t recv_count, int src, mt_comm_dtype dt) {
  char what[128];
  size_t esz = mt_comm_dtype_size(dt), sbytes = send_count * esz, rbytes = recv_count * esz;
  snprintf(what, sizeof what, "sendrecv of %zu bytes to rank %d, %zu bytes from rank %d", sbytes,
           dst, rbytes, src);
  int rc = refuse(c, what);
  if (rc || (!send_count && !recv_count)) return rc;
  if (send_count && ((rc = check_buf(c, what, send, dt)) || (rc = check_peer(c, what, dst))))
    return rc;
  if (recv_count && ((rc = check_buf(c, what, recv, dt)) || (rc = check_peer(c, what, src))))
    return rc;
  return finish(c, what,
                c->be->sendrecv(c->impl, send, sbytes, dst, recv, rbytes, src, c->timeout_ms));
}

static int p2p_slot(mt_comm *c) {
  for (int i = 0; i < MT_COMM_P2P_MAX; i++)
    if (!(c->p2p_busy & (1u << i))) return i;
  return -1;
}

int mt_comm_sendrecv_start(mt_comm *c, const void *send, size_t send_count, int dst, void *recv,
                           size_t recv_count, int src, mt_comm_dtype dt, int *send_req,
                           int *recv_req) {
  char what[128];
  size_t esz = mt_comm_dtype_size(dt), sbytes = send_count * esz, rbytes = recv_count * esz;
  snprintf(what, sizeof what, "started sendrecv of %zu bytes to rank %d, %zu bytes from rank %d",
           sbytes, dst, rbytes, src);
  if (send_req) *send_req = -1;
  if (recv_req) *recv_req = -1;
  int rc = refuse(c, what);
  if (rc || (!send_count && !recv_count)) return rc;
  if ((send_count && !send_req) || (recv_count && !recv_req))
    return mt_seterr(MT_EINVAL, "comm %s: %s: no place for the request id", c->name, what);
  if (send_count && ((rc = check_buf(c, what, send, dt)) || (rc = check_peer(c, what, dst))))
    return rc;
  if (recv_count && ((rc = check_buf(c, what, recv, dt)) || (rc = check_peer(c, what, src))))
    return rc;
  int ss = -1, rs = -1;
  if (send_count && (ss = p2p_slot(c)) >= 0) c->p2p_busy |= 1u << ss;
  if (recv_count && (rs = p2p_slot(c)) >= 0) c->p2p_busy |= 1u << rs;
  if ((send_count && ss < 0) || (recv_count && rs < 0)) {
    if (ss >= 0) c->p2p_busy &= ~(1u << ss);
    if (rs >= 0) c->p2p_busy &= ~(1u << rs);
    return mt_seterr(MT_EINVAL, "comm %s: %s: %d requests pending already (at most %d)", c->name,
                     what, __builtin_popcount(c->p2p_busy), MT_COMM_P2P_MAX);
  }
  rc = finish(
      c, what,
      c->be->sendrecv_start(c->impl, ss, send, sbytes, dst, rs, recv, rbytes, src, c->timeout_ms));
  if (rc) {
    /* the backend released both slots; the group is broken */
    if (ss >= 0) c->p2p_busy &= ~(1u << ss);
    if (rs >= 0) c->p2p_busy &= ~(1u << rs);
    return rc;
  }
  if (ss >= 0) {
    snprintf(c->p2p_what[ss], sizeof c->p2p_what[ss], "send of %zu bytes to rank %d", sbytes, dst);
    *send_req = ss;
  }
  if (rs >= 0) {
    snprintf(c->p2p_what[rs], sizeof c->p2p_what[rs], "recv of %zu bytes from rank %d", rbytes,
             src);
    *recv_req = rs;
  }
  return 0;
}

int mt_comm_p2p_wait(mt_comm *c, int req) {
  if (req == -1) return 0;
  if (req < 0 || req >= MT_COMM_P2P_MAX || !(c->p2p_busy & (1u << req)))
    return mt_seterr(MT_EINVAL, "comm %s: wait for request %d: no such request pending", c->name,
                     req);
  char what[96];
  snprintf(what, sizeof what, "wait for started %s", c->p2p_what[req]);
  c->p2p_busy &= ~(1u << req);
  int rc = refuse(c, what);
  if (rc) return rc;
  return finish(c, what, c->be->p2p_wait(c->impl, req, c->timeout_ms));
}

int mt_comm_barrier(mt_comm *c) {
  int rc = refuse(c, "barrier");
  if (rc) return rc;
  return finish(c, "barrier", c->be->barrier(c->impl, c->timeout_ms));
}
