#include "comm_check.h"

#include "err.h"

#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failf(char *err, size_t cap, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err, cap, fmt, ap);
  va_end(ap);
  return -1;
}

/* Input element i of rank r for a case (salt): a small integer (plus a
 * fraction the dtype holds exactly), offset per rank for the integer types so
 * that i64 exceeds what a double holds. long double keeps all of them exact. */
static long double input(mt_comm_dtype dt, int r, size_t i, int salt) {
  long double v = (long double)(((size_t)r * 7 + i * 13 + (size_t)salt * 5) % 31) - 15;
  switch (dt) {
  case MT_COMM_F32: return v + 0.25L;
  case MT_COMM_F64: return v + 0.5L;
  case MT_COMM_F16: return v + 0.5L;
  case MT_COMM_BF16: return v;
  case MT_COMM_I32: return v + (long double)(r + 1) * (1 << 24);
  case MT_COMM_I64: return v + (long double)(r + 1) * 72057594037927936.0L; /* 2^56 */
  default: return v + 15;                                                   /* u8: 0..30 */
  }
}

/* f16 of a value it holds exactly (normal or zero). */
static uint16_t to_f16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
  if (!(u & 0x7fffffff)) return sign;
  return sign | (uint16_t)((((u >> 23) & 0xff) - 112) << 10) | (uint16_t)((u >> 13) & 0x3ff);
}

static float from_f16(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff;
  uint32_t u = e ? sign | ((e + 112) << 23) | (m << 13) : sign;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static void put(mt_comm_dtype dt, void *buf, size_t i, long double x) {
  switch (dt) {
  case MT_COMM_F32: ((float *)buf)[i] = (float)x; break;
  case MT_COMM_F64: ((double *)buf)[i] = (double)x; break;
  case MT_COMM_BF16: {
    float f = (float)x;
    uint32_t u;
    memcpy(&u, &f, 4);
    ((uint16_t *)buf)[i] = (uint16_t)(u >> 16);
    break;
  }
  case MT_COMM_F16: ((uint16_t *)buf)[i] = to_f16((float)x); break;
  case MT_COMM_I32: ((int32_t *)buf)[i] = (int32_t)x; break;
  case MT_COMM_I64: ((int64_t *)buf)[i] = (int64_t)x; break;
  default: ((uint8_t *)buf)[i] = (uint8_t)x; break;
  }
}

static long double get(mt_comm_dtype dt, const void *buf, size_t i) {
  switch (dt) {
  case MT_COMM_F32: return ((const float *)buf)[i];
  case MT_COMM_F64: return ((const double *)buf)[i];
  case MT_COMM_BF16: {
    uint32_t u = (uint32_t)((const uint16_t *)buf)[i] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
  }
  case MT_COMM_F16: return from_f16(((const uint16_t *)buf)[i]);
  case MT_COMM_I32: return ((const int32_t *)buf)[i];
  case MT_COMM_I64: return (long double)((const int64_t *)buf)[i];
  default: return ((const uint8_t *)buf)[i];
  }
}

/* The reduction over all ranks of element i. */
static long double reference(mt_comm_dtype dt, mt_comm_op op, int size, size_t i, int salt) {
  long double acc = input(dt, 0, i, salt);
  for (int r = 1; r < size; r++) {
    long double x = input(dt, r, i, salt);
    acc = op == MT_COMM_SUM ? acc + x : (x > acc ? x : acc);
  }
  return acc;
}

static void fill(mt_comm_dtype dt, void *buf, int r, size_t n, int salt) {
  for (size_t i = 0; i < n; i++) put(dt, buf, i, input(dt, r, i, salt));
}

static void garbage(void *buf, size_t bytes) { memset(buf, 0xa5, bytes); }

#define OPNAME(op) ((op) == MT_COMM_SUM ? "sum" : "max")

/* In place runs for f32 only: the in-place paths do not depend on the dtype,
 * and each collective costs a round trip per segment (keeps the suite short). */
static int check_case(mt_comm *c, mt_comm_dtype dt, size_t count, int salt, char *err, size_t cap) {
  const int n = mt_comm_size(c), r = mt_comm_rank(c), modes = dt == MT_COMM_F32 ? 2 : 1;
  const size_t esz = mt_comm_dtype_size(dt);
  const char *dn = mt_comm_dtype_name(dt);
  char *a = malloc(esz * count * (size_t)n), *b = malloc(esz * count * (size_t)n);
  int rc = -1;
  if (!a || !b) {
    failf(err, cap, "out of memory");
    goto done;
  }
  for (int op = MT_COMM_SUM; op <= MT_COMM_MAX; op++) {
    for (int inplace = 0; inplace < modes; inplace++) {
      /* all-reduce */
      fill(dt, a, r, count, salt);
      char *out = inplace ? a : b;
      if (!inplace) garbage(b, esz * count);
      if (mt_comm_allreduce(c, a, out, count, dt, op)) {
        failf(err, cap, "allreduce %s %s n=%zu: %s", dn, OPNAME(op), count, mt_errmsg());
        goto done;
      }
      for (size_t i = 0; i < count; i++) {
        long double want = reference(dt, op, n, i, salt), got = get(dt, out, i);
        if (got != want) {
          failf(err, cap, "allreduce %s %s n=%zu%s: element %zu is %Lg, want %Lg", dn, OPNAME(op),
                count, inplace ? " in place" : "", i, got, want);
          goto done;
        }
      }
      /* reduce-scatter: rank r's input is element j of the n*count vector */
      fill(dt, a, r, count * (size_t)n, salt);
      out = inplace ? a + (size_t)r * count * esz : b;
      if (!inplace) garbage(b, esz * count);
      if (mt_comm_reduce_scatter(c, a, out, count, dt, op)) {
        failf(err, cap, "reduce-scatter %s %s n=%zu: %s", dn, OPNAME(op), count, mt_errmsg());
        goto done;
      }
      for (size_t i = 0; i < count; i++) {
        size_t j = (size_t)r * count + i;
        long double want = reference(dt, op, n, j, salt), got = get(dt, out, i);
        if (got != want) {
          failf(err, cap, "reduce-scatter %s %s n=%zu%s: element %zu is %Lg, want %Lg", dn,
                OPNAME(op), count, inplace ? " in place" : "", i, got, want);
          goto done;
        }
      }
    }
  }
  for (int inplace = 0; inplace < modes; inplace++) {
    /* all-gather */
    garbage(b, esz * count * (size_t)n);
    char *in = inplace ? b + (size_t)r * count * esz : a;
    fill(dt, in, r, count, salt);
    if (mt_comm_allgather(c, in, b, count, dt)) {
      failf(err, cap, "allgather %s n=%zu: %s", dn, count, mt_errmsg());
      goto done;
    }
    for (int k = 0; k < n; k++)
      for (size_t i = 0; i < count; i++) {
        long double want = input(dt, k, i, salt), got = get(dt, b, (size_t)k * count + i);
        if (got != want) {
          failf(err, cap, "allgather %s n=%zu%s: rank %d's element %zu is %Lg, want %Lg", dn, count,
                inplace ? " in place" : "", k, i, got, want);
          goto done;
        }
      }
  }
  /* broadcast from a root that moves with the case */
  int root = (int)((count + (size_t)salt) % (size_t)n);
  if (r == root)
    fill(dt, a, r, count, salt);
  else
    garbage(a, esz * count);
  if (mt_comm_broadcast(c, a, count, dt, root)) {
    failf(err, cap, "broadcast %s n=%zu from %d: %s", dn, count, root, mt_errmsg());
    goto done;
  }
  for (size_t i = 0; i < count; i++) {
    long double want = input(dt, root, i, salt), got = get(dt, a, i);
    if (got != want) {
      failf(err, cap, "broadcast %s n=%zu from %d: element %zu is %Lg, want %Lg", dn, count, root,
            i, got, want);
      goto done;
    }
  }
  /* reduce to that root (in place there, for f32), then the same started
   * and waited for; other ranks' inputs stay as they were */
  for (int op = MT_COMM_SUM; op <= MT_COMM_MAX; op++) {
    for (int started = 0; started < 2; started++) {
      int inplace = dt == MT_COMM_F32 && started;
      fill(dt, a, r, count, salt);
      garbage(b, esz * count);
      char *out = inplace ? a : b;
      int e = started ? mt_comm_reduce_start(c, a, out, count, dt, op, root)
                      : mt_comm_reduce(c, a, out, count, dt, op, root);
      if (!e && started) e = mt_comm_wait(c);
      if (e) {
        failf(err, cap, "%sreduce %s %s n=%zu to %d: %s", started ? "started " : "", dn, OPNAME(op),
              count, root, mt_errmsg());
        goto done;
      }
      for (size_t i = 0; i < count; i++) {
        long double want = r == root ? reference(dt, op, n, i, salt) : input(dt, r, i, salt);
        long double got = r == root ? get(dt, out, i) : get(dt, a, i);
        if (got != want) {
          failf(err, cap, "%sreduce %s %s n=%zu to %d%s: element %zu is %Lg, want %Lg",
                started ? "started " : "", dn, OPNAME(op), count, root,
                r == root ? "" : " (a sender's input)", i, got, want);
          goto done;
        }
      }
    }
  }
  rc = 0;
done:
  free(a), free(b);
  return rc;
}

/* A value in [-1, 1) from (rank, i): to check the f32 reduction itself, not
 * only the data movement. */
static float random_f32(int r, size_t i) {
  uint64_t x = (uint64_t)r * 0x9e3779b97f4a7c15ull + i * 0xbf58476d1ce4e5b9ull + 1;
  x ^= x >> 31;
  x *= 0x94d049bb133111ebull;
  x ^= x >> 29;
  return (float)((double)(x >> 40) / (double)(1ull << 23) - 1.0);
}

int check_collectives(mt_comm *c, char *err, size_t cap) {
  static const size_t counts[] = {1, 7, 1031};
  int salt = 0;
  for (int dt = 0; dt < MT_COMM_NDTYPES; dt++)
    for (size_t k = 0; k < sizeof counts / sizeof *counts; k++)
      if (check_case(c, (mt_comm_dtype)dt, counts[k], salt++, err, cap)) return -1;

  const int n = mt_comm_size(c), r = mt_comm_rank(c);
  const size_t count = 4099;
  float *x = malloc(count * sizeof *x);
  if (!x) return failf(err, cap, "out of memory");
  for (size_t i = 0; i < count; i++) x[i] = random_f32(r, i);
  if (mt_comm_allreduce(c, x, x, count, MT_COMM_F32, MT_COMM_SUM)) {
    free(x);
    return failf(err, cap, "allreduce random f32: %s", mt_errmsg());
  }
  for (size_t i = 0; i < count; i++) {
    double want = 0;
    for (int k = 0; k < n; k++) want += random_f32(k, i);
    if (fabs(x[i] - want) > 1e-6 * n) {
      double got = x[i];
      free(x);
      return failf(err, cap, "allreduce random f32: element %zu is %.9g, want %.9g", i, got, want);
    }
  }
  free(x);
  if (mt_comm_barrier(c)) return failf(err, cap, "barrier: %s", mt_errmsg());
  return 0;
}

int check_large(mt_comm *c, size_t bytes, char *err, size_t cap) {
  const int n = mt_comm_size(c), r = mt_comm_rank(c);
  const size_t count = bytes / sizeof(float), chunk = count / (size_t)n;
  float *x = malloc(count * sizeof *x), *y = malloc(chunk * sizeof *y);
  int rc = -1;
  if (!x || !y) {
    failf(err, cap, "out of memory");
    goto done;
  }
  for (size_t i = 0; i < count; i++) x[i] = (float)((r * 7 + i * 13) % 31) - 15;
  if (mt_comm_allreduce(c, x, x, count, MT_COMM_F32, MT_COMM_SUM)) {
    failf(err, cap, "allreduce of %zu bytes: %s", bytes, mt_errmsg());
    goto done;
  }
  for (size_t i = 0; i < count; i++) {
    float want = 0;
    for (int k = 0; k < n; k++) want += (float)((k * 7 + i * 13) % 31) - 15;
    if (x[i] != want) {
      failf(err, cap, "allreduce of %zu bytes: element %zu is %g, want %g", bytes, i, x[i], want);
      goto done;
    }
  }
  for (size_t i = 0; i < count; i++) x[i] = (float)((r * 5 + i * 3) % 17);
  if (mt_comm_reduce_scatter(c, x, y, chunk, MT_COMM_F32, MT_COMM_SUM)) {
    failf(err, cap, "reduce-scatter of %zu bytes: %s", bytes, mt_errmsg());
    goto done;
  }
  for (size_t i = 0; i < chunk; i++) {
    size_t j = (size_t)r * chunk + i;
    float want = 0;
    for (int k = 0; k < n; k++) want += (float)((k * 5 + j * 3) % 17);
    if (y[i] != want) {
      failf(err, cap, "reduce-scatter of %zu bytes: element %zu is %g, want %g", bytes, i, y[i],
            want);
      goto done;
    }
  }
  /* a reduce of several segments, to the last rank */
  for (size_t i = 0; i < count; i++) x[i] = (float)((r * 3 + i * 11) % 23);
  if (mt_comm_reduce(c, x, x, count, MT_COMM_F32, MT_COMM_SUM, n - 1)) {
    failf(err, cap, "reduce of %zu bytes: %s", bytes, mt_errmsg());
    goto done;
  }
  for (size_t i = 0; i < count; i++) {
    float want = 0;
    for (int k = 0; k < n; k++) want += (float)((k * 3 + i * 11) % 23);
    if (r != n - 1) want = (float)((r * 3 + i * 11) % 23);
    if (x[i] != want) {
      failf(err, cap, "reduce of %zu bytes: element %zu is %g, want %g", bytes, i, x[i], want);
      goto done;
    }
  }
  rc = 0;
done:
  free(x), free(y);
  return rc;
}

static int check_msg(const int32_t *m, size_t count, int from, int k, char *err, size_t cap) {
  for (size_t i = 0; i < count; i++)
    if (m[i] != (int32_t)(from * 100000 + k * 1000 + (int)(i % 997)))
      return failf(err, cap, "message %d from rank %d: element %zu is %d", k, from, i, m[i]);
  return 0;
}

/* Started exchanges around the ring, each message in buffers of its own:
 * pass 0 posts all three (send right, receive left) before waiting for any,
 * receives first and in reverse; pass 1 mixes a started send with a blocking
 * receive, ordered by parity as blocking sends must be. Then the misuses
 * that must be refused without breaking the group. */
static int check_ring_started(mt_comm *c, char *err, size_t cap) {
  const int n = mt_comm_size(c), r = mt_comm_rank(c);
  const int right = (r + 1) % n, left = (r + n - 1) % n;
  const size_t max = 3 * 100003 + 64;
  int32_t *out = malloc(3 * max * sizeof *out), *in = malloc(3 * max * sizeof *in);
  int rc = -1, sreq[3], rreq[3];
  if (!out || !in) {
    failf(err, cap, "out of memory");
    goto done;
  }
  for (int pass = 0; pass < 2; pass++) {
    for (int k = 0; k < 3; k++) {
      size_t sc = 1 + (size_t)k * 100003 + (size_t)r;
      int32_t *o = out + (size_t)k * max;
      for (size_t i = 0; i < sc; i++) o[i] = (int32_t)(r * 100000 + k * 1000 + (int)(i % 997));
      memset(in + (size_t)k * max, 0, max * sizeof *in);
    }
    int e = 0;
    const char *what = pass ? "started send, blocking recv" : "started sendrecv";
    if (pass == 0) {
      for (int k = 0; k < 3 && !e; k++)
        e = mt_comm_sendrecv_start(c, out + (size_t)k * max, 1 + (size_t)k * 100003 + (size_t)r,
                                   right, in + (size_t)k * max,
                                   1 + (size_t)k * 100003 + (size_t)left, left, MT_COMM_I32,
                                   &sreq[k], &rreq[k]);
      for (int k = 2; k >= 0 && !e; k--) e = mt_comm_p2p_wait(c, rreq[k]);
      for (int k = 0; k < 3 && !e; k++) e = mt_comm_p2p_wait(c, sreq[k]);
    } else {
      for (int k = 0; k < 3 && !e; k++) {
        size_t sc = 1 + (size_t)k * 100003 + (size_t)r, rcount = 1 + (size_t)k * 100003 + left;
        int32_t *o = out + (size_t)k * max, *i = in + (size_t)k * max;
        if (r % 2 == 0) {
          e = mt_comm_sendrecv_start(c, o, sc, right, NULL, 0, left, MT_COMM_I32, &sreq[k], NULL);
          if (!e) e = mt_comm_recv(c, i, rcount, MT_COMM_I32, left);
        } else {
          e = mt_comm_recv(c, i, rcount, MT_COMM_I32, left);
          if (!e)
            e = mt_comm_sendrecv_start(c, o, sc, right, NULL, 0, left, MT_COMM_I32, &sreq[k], NULL);
        }
      }
      for (int k = 0; k < 3 && !e; k++) e = mt_comm_p2p_wait(c, sreq[k]);
    }
    if (e) {
      failf(err, cap, "%s ring: %s", what, mt_errmsg());
      goto done;
    }
    for (int k = 0; k < 3; k++)
      if (check_msg(in + (size_t)k * max, 1 + (size_t)k * 100003 + (size_t)left, left, k, err, cap))
        goto done;
  }
  /* misuse: a request never started, one waited twice, a missing id */
  int req = -1;
  if (mt_comm_p2p_wait(c, 3) != MT_EINVAL || !strstr(mt_errmsg(), "no such request")) {
    failf(err, cap, "wait for a request never started: not refused (%s)", mt_errmsg());
    goto done;
  }
  if (mt_comm_sendrecv_start(c, out, 1, right, NULL, 0, left, MT_COMM_I32, NULL, NULL) !=
      MT_EINVAL) {
    failf(err, cap, "started send without a place for its request: not refused");
    goto done;
  }
  if (mt_comm_sendrecv_start(c, out, 0, right, NULL, 0, left, MT_COMM_I32, &req, NULL) ||
      req != -1 || mt_comm_p2p_wait(c, req)) {
    failf(err, cap, "an empty started exchange is not a no-op with request -1");
    goto done;
  }
  rc = 0;
done:
  free(out), free(in);
  return rc;
}

int check_ring(mt_comm *c, char *err, size_t cap) {
  const int n = mt_comm_size(c), r = mt_comm_rank(c);
  if (n == 1) return 0;
  if (check_ring_started(c, err, cap)) return -1;
  const int right = (r + 1) % n, left = (r + n - 1) % n;
  const size_t max = 300000;
  int32_t *out = malloc(max * sizeof *out), *in = malloc(max * sizeof *in);
  int rc = -1;
  if (!out || !in) {
    failf(err, cap, "out of memory");
    goto done;
  }
  for (int pass = 0; pass < 2; pass++) {
    for (int k = 0; k < 3; k++) {
      /* odd sizes, different per sender: the receiver knows its sender */
      size_t sc = 1 + (size_t)k * 100003 + (size_t)r,
             rcount = 1 + (size_t)k * 100003 + (size_t)left;
      for (size_t i = 0; i < sc; i++) out[i] = (int32_t)(r * 100000 + k * 1000 + (int)(i % 997));
      memset(in, 0, rcount * sizeof *in);
      int e;
      if (pass == 0 && r % 2 == 0) {
        e = mt_comm_send(c, out, sc, MT_COMM_I32, right);
        if (!e) e = mt_comm_recv(c, in, rcount, MT_COMM_I32, left);
      } else if (pass == 0) {
        e = mt_comm_recv(c, in, rcount, MT_COMM_I32, left);
        if (!e) e = mt_comm_send(c, out, sc, MT_COMM_I32, right);
      } else {
        e = mt_comm_sendrecv(c, out, sc, right, in, rcount, left, MT_COMM_I32);
      }
      if (e) {
        failf(err, cap, "%s ring message %d: %s", pass ? "sendrecv" : "send/recv", k, mt_errmsg());
        goto done;
      }
      if (check_msg(in, rcount, left, k, err, cap)) goto done;
    }
  }
  rc = 0;
done:
  free(out), free(in);
  return rc;
}
