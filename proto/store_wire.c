#include "store_wire.h"

#include "err.h"

#include <string.h>

/* ------------------------------------------------------------------ names */

const char *mt_store_op_name(uint8_t op) {
  switch (op & ~MT_STORE_REPLY) {
  case MT_STORE_OP_SET: return "SET";
  case MT_STORE_OP_GET: return "GET";
  case MT_STORE_OP_ADD: return "ADD";
  case MT_STORE_OP_CAS: return "CAS";
  case MT_STORE_OP_WAIT: return "WAIT";
  case MT_STORE_OP_CHECK: return "CHECK";
  case MT_STORE_OP_DELETE: return "DELETE";
  case MT_STORE_OP_PING: return "PING";
  case MT_STORE_OP_AUTH: return "AUTH";
  case MT_STORE_OP_DELETE_PREFIX: return "DELETE_PREFIX";
  case MT_STORE_OP_ERROR: return "ERROR";
  default: return "?";
  }
}

const char *mt_store_status_name(uint8_t status) {
  switch (status) {
  case MT_STORE_OK: return "OK";
  case MT_STORE_NOT_FOUND: return "NOT_FOUND";
  case MT_STORE_TIMEOUT: return "TIMEOUT";
  case MT_STORE_BAD_VALUE: return "BAD_VALUE";
  case MT_STORE_MALFORMED: return "MALFORMED";
  case MT_STORE_TOO_LARGE: return "TOO_LARGE";
  case MT_STORE_UNSUPPORTED: return "UNSUPPORTED";
  case MT_STORE_NO_MEMORY: return "NO_MEMORY";
  case MT_STORE_UNAUTHORIZED: return "UNAUTHORIZED";
  default: return "?";
  }
}

static int known_op(uint8_t op) { return op >= MT_STORE_OP_SET && op <= MT_STORE_OP_DELETE_PREFIX; }

/* ------------------------------------------------------------------ little-endian */

static uint32_t rd32(const uint8_t *p) {
  return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t rd64(const uint8_t *p) { return (uint64_t)rd32(p) | (uint64_t)rd32(p + 4) << 32; }

static void wr32(uint8_t *p, uint32_t v) {
  p[0] = (uint8_t)v, p[1] = (uint8_t)(v >> 8), p[2] = (uint8_t)(v >> 16), p[3] = (uint8_t)(v >> 24);
}

static void wr64(uint8_t *p, uint64_t v) { wr32(p, (uint32_t)v), wr32(p + 4, (uint32_t)(v >> 32)); }

/* ------------------------------------------------------------------ header */

static int fail(uint8_t *why, uint8_t status, int code, const char *what) {
  if (why) *why = status;
  return mt_seterr(code, "store frame: %s", what);
}

int mt_store_peek(const void *buf, size_t bytes, mt_store_hdr *h, uint8_t *why) {
  const uint8_t *p = buf;
  memset(h, 0, sizeof *h);
  if (!buf || bytes < MT_STORE_HDR_BYTES) {
    if (why) *why = MT_STORE_MALFORMED;
    return mt_seterr(MT_ECORRUPT, "store frame: %zu bytes, shorter than its %d-byte header", bytes,
                     MT_STORE_HDR_BYTES);
  }
  uint32_t magic = rd32(p);
  if (magic != MT_STORE_MAGIC) {
    if (why) *why = MT_STORE_MALFORMED;
    return mt_seterr(MT_ECORRUPT, "store frame: bad magic 0x%08x (want 0x%08x, \"MTS1\")", magic,
                     MT_STORE_MAGIC);
  }
  h->version = p[4];
  h->op = p[5];
  h->status = p[6];
  h->id = rd32(p + 8);
  h->body_bytes = rd32(p + 12);
  if (h->version != MT_STORE_VERSION) {
    if (why) *why = MT_STORE_UNSUPPORTED;
    return mt_seterr(MT_ENOTSUP, "store frame: protocol version %u, this side speaks %d",
                     h->version, MT_STORE_VERSION);
  }
  if (p[7] != 0) return fail(why, MT_STORE_MALFORMED, MT_ECORRUPT, "reserved byte is not 0");
  uint8_t base = h->op & (uint8_t)~MT_STORE_REPLY;
  int reply = (h->op & MT_STORE_REPLY) != 0;
  if (!known_op(base) && !(reply && base == MT_STORE_OP_ERROR)) {
    if (why) *why = MT_STORE_UNSUPPORTED;
    return mt_seterr(MT_ENOTSUP, "store frame: unknown op %u", h->op);
  }
  if (!reply && h->status != 0)
    return fail(why, MT_STORE_MALFORMED, MT_ECORRUPT, "a request with a status");
  if (h->status > MT_STORE_STATUS_MAX)
    return fail(why, MT_STORE_MALFORMED, MT_ECORRUPT, "unknown status");
  if (reply && base == MT_STORE_OP_ERROR && h->status < MT_STORE_BAD_VALUE)
    return fail(why, MT_STORE_MALFORMED, MT_ECORRUPT, "an ERROR reply without an error status");
  if (h->body_bytes > MT_STORE_MAX_FRAME - MT_STORE_HDR_BYTES) {
    if (why) *why = MT_STORE_TOO_LARGE;
    return mt_seterr(MT_EINVAL, "store frame: body of %u bytes, over the limit of %u",
                     h->body_bytes, MT_STORE_MAX_FRAME - MT_STORE_HDR_BYTES);
  }
  h->frame_bytes = MT_STORE_HDR_BYTES + h->body_bytes;
  return 0;
}

/* ------------------------------------------------------------------ body reader */

/* A cursor over the body; every take checks the bytes left first. */
typedef struct rd {
  const uint8_t *p;
  size_t left;
  uint8_t *why;
} rd;

static int take(rd *r, size_t n, const uint8_t **out, const char *field) {
  if (n > r->left) {
    if (r->why) *r->why = MT_STORE_MALFORMED;
    return mt_seterr(MT_ECORRUPT, "store frame: %s runs past the end of the body (%zu bytes left)",
                     field, r->left);
  }
  *out = r->p;
  r->p += n, r->left -= n;
  return 0;
}

static int take_u8(rd *r, uint8_t *v, const char *field) {
  const uint8_t *p = NULL;
  int rc = take(r, 1, &p, field);
  if (!rc) *v = *p;
  return rc;
}

static int take_bool(rd *r, uint8_t *v, const char *field) {
  int rc = take_u8(r, v, field);
  if (!rc && *v > 1) {
    if (r->why) *r->why = MT_STORE_MALFORMED;
    return mt_seterr(MT_ECORRUPT, "store frame: %s is %u, not 0 or 1", field, *v);
  }
  return rc;
}

static int take_u32(rd *r, uint32_t *v, const char *field) {
  const uint8_t *p = NULL;
  int rc = take(r, 4, &p, field);
  if (!rc) *v = rd32(p);
  return rc;
}

static int take_i64(rd *r, int64_t *v, const char *field) {
  const uint8_t *p = NULL;
  int rc = take(r, 8, &p, field);
  if (!rc) *v = (int64_t)rd64(p);
  return rc;
}

/* A length-prefixed field of at most max bytes; the length is checked against
 * the limit and the body before the bytes are touched. */
static int take_str(rd *r, uint32_t max, mt_store_str *s, const char *field) {
  uint32_t n;
  const uint8_t *p = NULL;
  int rc = take_u32(r, &n, field);
  if (rc) return rc;
  if (n > max) {
    if (r->why) *r->why = MT_STORE_TOO_LARGE;
    return mt_seterr(MT_EINVAL, "store frame: %s of %u bytes, over the limit of %u", field, n, max);
  }
  if ((rc = take(r, n, &p, field))) return rc;
  s->p = (const char *)p;
  s->bytes = n;
  return 0;
}

static int take_key(rd *r, mt_store_str *k) {
  int rc = take_str(r, MT_STORE_MAX_KEY, k, "key");
  if (rc) return rc;
  if (k->bytes == 0 || memchr(k->p, 0, k->bytes)) {
    if (r->why) *r->why = MT_STORE_MALFORMED;
    return mt_seterr(MT_ECORRUPT, "store frame: key %s", k->bytes ? "has a NUL byte" : "is empty");
  }
  return 0;
}

static int decode_request(rd *r, mt_store_msg *m, mt_store_str *keys, uint32_t keys_cap) {
  int rc = 0;
  uint32_t t;
  switch (m->op) {
  case MT_STORE_OP_SET:
    if (!(rc = take_key(r, &m->key))) rc = take_str(r, MT_STORE_MAX_VALUE, &m->value, "value");
    break;
  case MT_STORE_OP_GET:
    if (!(rc = take_key(r, &m->key)) && !(rc = take_u32(r, &t, "timeout_ms")))
      m->timeout_ms = (int32_t)t;
    break;
  case MT_STORE_OP_ADD:
    if (!(rc = take_key(r, &m->key))) rc = take_i64(r, &m->num, "delta");
    break;
  case MT_STORE_OP_CAS:
    if ((rc = take_key(r, &m->key)) || (rc = take_bool(r, &m->flag, "expect_absent")) ||
        (rc = take_str(r, MT_STORE_MAX_VALUE, &m->expected, "expected value")) ||
        (rc = take_str(r, MT_STORE_MAX_VALUE, &m->value, "new value")))
      break;
    if (m->flag && m->expected.bytes) {
      if (r->why) *r->why = MT_STORE_MALFORMED;
      rc = mt_seterr(MT_ECORRUPT, "store frame: CAS expects the key absent and a value");
    }
    break;
  case MT_STORE_OP_WAIT:
    if ((rc = take_u32(r, &t, "timeout_ms"))) break;
    m->timeout_ms = (int32_t)t;
    if ((rc = take_u32(r, &m->nkeys, "key count"))) break;
    if (m->nkeys == 0 || m->nkeys > MT_STORE_MAX_WAIT_KEYS) {
      if (r->why) *r->why = m->nkeys ? MT_STORE_TOO_LARGE : MT_STORE_MALFORMED;
      rc = mt_seterr(m->nkeys ? MT_EINVAL : MT_ECORRUPT,
                     "store frame: WAIT for %u keys (1 to %u allowed)", m->nkeys,
                     MT_STORE_MAX_WAIT_KEYS);
      break;
    }
    if (m->nkeys > keys_cap || !keys) {
      if (r->why) *r->why = MT_STORE_TOO_LARGE;
      rc = mt_seterr(MT_EINVAL, "store frame: WAIT for %u keys, room for %u here", m->nkeys,
                     keys ? keys_cap : 0);
      break;
    }
    for (uint32_t i = 0; i < m->nkeys && !rc; i++) rc = take_key(r, &keys[i]);
    m->keys = keys;
    break;
  case MT_STORE_OP_CHECK:
  case MT_STORE_OP_DELETE:
  case MT_STORE_OP_DELETE_PREFIX: rc = take_key(r, &m->key); break;
  case MT_STORE_OP_PING: break;
  case MT_STORE_OP_AUTH:
    if ((rc = take_str(r, MT_STORE_MAX_KEY, &m->value, "cluster key"))) break;
    if (!m->value.bytes) {
      if (r->why) *r->why = MT_STORE_MALFORMED;
      rc = mt_seterr(MT_ECORRUPT, "store frame: AUTH with an empty key");
    }
    break;
  default:
    if (r->why) *r->why = MT_STORE_UNSUPPORTED;
    rc = mt_seterr(MT_ENOTSUP, "store frame: op %u is not a request", m->op);
  }
  return rc;
}

static int decode_reply(rd *r, mt_store_msg *m) {
  uint8_t op = m->op & (uint8_t)~MT_STORE_REPLY;
  if (m->status >= MT_STORE_BAD_VALUE) return take_str(r, MT_STORE_MAX_TEXT, &m->value, "message");
  if (m->status == MT_STORE_NOT_FOUND) return 0;
  if (m->status == MT_STORE_TIMEOUT) return op == MT_STORE_OP_WAIT ? take_key(r, &m->key) : 0;
  int rc = 0;
  switch (op) {
  case MT_STORE_OP_GET: rc = take_str(r, MT_STORE_MAX_VALUE, &m->value, "value"); break;
  case MT_STORE_OP_ADD: rc = take_i64(r, &m->num, "value"); break;
  case MT_STORE_OP_DELETE_PREFIX:
    if ((rc = take_i64(r, &m->num, "deleted"))) break;
    if (m->num < 0) {
      if (r->why) *r->why = MT_STORE_MALFORMED;
      rc =
          mt_seterr(MT_ECORRUPT, "store frame: DELETE_PREFIX deleted %lld keys", (long long)m->num);
    }
    break;
  case MT_STORE_OP_CAS:
    if ((rc = take_bool(r, &m->flag, "swapped")) || (rc = take_bool(r, &m->present, "present")) ||
        (rc = take_str(r, MT_STORE_MAX_VALUE, &m->value, "current value")))
      break;
    if ((!m->present && (m->flag || m->value.bytes))) {
      if (r->why) *r->why = MT_STORE_MALFORMED;
      rc = mt_seterr(MT_ECORRUPT, "store frame: CAS reply without a key but %s",
                     m->flag ? "swapped" : "with a value");
    }
    break;
  case MT_STORE_OP_CHECK: rc = take_bool(r, &m->flag, "exists"); break;
  default: break; /* SET, WAIT, DELETE, PING: empty */
  }
  return rc;
}

int mt_store_decode(const void *buf, size_t bytes, mt_store_msg *m, mt_store_str *keys,
                    uint32_t keys_cap, uint8_t *why) {
  mt_store_hdr h;
  memset(m, 0, sizeof *m);
  int rc = mt_store_peek(buf, bytes, &h, why);
  if (rc) return rc;
  if (bytes != h.frame_bytes) {
    if (why) *why = MT_STORE_MALFORMED;
    return mt_seterr(MT_ECORRUPT, "store frame: header says %u bytes, the frame has %zu",
                     h.frame_bytes, bytes);
  }
  m->op = h.op;
  m->status = h.status;
  m->id = h.id;
  rd r = {(const uint8_t *)buf + MT_STORE_HDR_BYTES, h.body_bytes, why};
  rc = (h.op & MT_STORE_REPLY) ? decode_reply(&r, m) : decode_request(&r, m, keys, keys_cap);
  if (rc) return rc;
  if (r.left) {
    if (why) *why = MT_STORE_MALFORMED;
    return mt_seterr(MT_ECORRUPT, "store frame: %zu bytes left after the last field of %s", r.left,
                     mt_store_op_name(h.op));
  }
  return 0;
}

/* ------------------------------------------------------------------ encoder */

/* A cursor that counts when buf is NULL and stops writing at cap. */
typedef struct wr {
  uint8_t *p;
  size_t at, cap;
} wr;

static void put(wr *w, const void *src, size_t n) {
  if (w->p && w->at + n <= w->cap && n) memcpy(w->p + w->at, src, n);
  w->at += n;
}

static void put_u8(wr *w, uint8_t v) { put(w, &v, 1); }

static void put_u32(wr *w, uint32_t v) {
  uint8_t b[4];
  wr32(b, v);
  put(w, b, 4);
}

static void put_i64(wr *w, int64_t v) {
  uint8_t b[8];
  wr64(b, (uint64_t)v);
  put(w, b, 8);
}

static void put_str(wr *w, mt_store_str s) {
  put_u32(w, s.bytes);
  put(w, s.p, s.bytes);
}

static int check_str(mt_store_str s, uint32_t max, const char *field, uint8_t op) {
  if (s.bytes > max)
    return mt_seterr(MT_EINVAL, "store %s: %s of %u bytes is over the limit of %u",
                     mt_store_op_name(op), field, s.bytes, max);
  if (s.bytes && !s.p)
    return mt_seterr(MT_EINVAL, "store %s: %s has no bytes", mt_store_op_name(op), field);
  return 0;
}

static int check_key(mt_store_str k, uint8_t op) {
  int rc = check_str(k, MT_STORE_MAX_KEY, "key", op);
  if (rc) return rc;
  if (k.bytes == 0) return mt_seterr(MT_EINVAL, "store %s: empty key", mt_store_op_name(op));
  if (memchr(k.p, 0, k.bytes))
    return mt_seterr(MT_EINVAL, "store %s: key has a NUL byte", mt_store_op_name(op));
  return 0;
}

static int encode_request(const mt_store_msg *m, wr *w) {
  int rc = 0;
  switch (m->op) {
  case MT_STORE_OP_SET:
    if ((rc = check_key(m->key, m->op)) ||
        (rc = check_str(m->value, MT_STORE_MAX_VALUE, "value", m->op)))
      return rc;
    put_str(w, m->key), put_str(w, m->value);
    return 0;
  case MT_STORE_OP_GET:
    if ((rc = check_key(m->key, m->op))) return rc;
    put_str(w, m->key), put_u32(w, (uint32_t)m->timeout_ms);
    return 0;
  case MT_STORE_OP_ADD:
    if ((rc = check_key(m->key, m->op))) return rc;
    put_str(w, m->key), put_i64(w, m->num);
    return 0;
  case MT_STORE_OP_CAS:
    if ((rc = check_key(m->key, m->op)) ||
        (rc = check_str(m->expected, MT_STORE_MAX_VALUE, "expected value", m->op)) ||
        (rc = check_str(m->value, MT_STORE_MAX_VALUE, "new value", m->op)))
      return rc;
    if (m->flag > 1 || (m->flag && m->expected.bytes))
      return mt_seterr(MT_EINVAL, "store CAS: expect_absent with an expected value");
    put_str(w, m->key), put_u8(w, m->flag), put_str(w, m->expected), put_str(w, m->value);
    return 0;
  case MT_STORE_OP_WAIT:
    if (m->nkeys == 0 || m->nkeys > MT_STORE_MAX_WAIT_KEYS || !m->keys)
      return mt_seterr(MT_EINVAL, "store WAIT: %u keys (1 to %u allowed)", m->nkeys,
                       MT_STORE_MAX_WAIT_KEYS);
    put_u32(w, (uint32_t)m->timeout_ms), put_u32(w, m->nkeys);
    for (uint32_t i = 0; i < m->nkeys; i++) {
      if ((rc = check_key(m->keys[i], m->op))) return rc;
      put_str(w, m->keys[i]);
    }
    return 0;
  case MT_STORE_OP_CHECK:
  case MT_STORE_OP_DELETE:
  case MT_STORE_OP_DELETE_PREFIX:
    if ((rc = check_key(m->key, m->op))) return rc;
    put_str(w, m->key);
    return 0;
  case MT_STORE_OP_PING: return 0;
  case MT_STORE_OP_AUTH:
    if ((rc = check_str(m->value, MT_STORE_MAX_KEY, "cluster key", m->op))) return rc;
    if (!m->value.bytes) return mt_seterr(MT_EINVAL, "store AUTH: an empty cluster key");
    put_str(w, m->value);
    return 0;
  default: return mt_seterr(MT_EINVAL, "store: op %u is not a request", m->op);
  }
}

static int encode_reply(const mt_store_msg *m, wr *w) {
  uint8_t op = m->op & (uint8_t)~MT_STORE_REPLY;
  int rc;
  if (!known_op(op) && op != MT_STORE_OP_ERROR)
    return mt_seterr(MT_EINVAL, "store: op %u has no reply", op);
  if (m->status > MT_STORE_STATUS_MAX)
    return mt_seterr(MT_EINVAL, "store: status %u is unknown", m->status);
  if (op == MT_STORE_OP_ERROR && m->status < MT_STORE_BAD_VALUE)
    return mt_seterr(MT_EINVAL, "store: an ERROR reply needs an error status");
  if (m->status >= MT_STORE_BAD_VALUE) {
    /* A message is for a person: cut it to the limit rather than fail. */
    mt_store_str t = m->value;
    if (t.bytes > MT_STORE_MAX_TEXT) t.bytes = MT_STORE_MAX_TEXT;
    if (t.bytes && !t.p) t.bytes = 0;
    put_str(w, t);
    return 0;
  }
  if (m->status == MT_STORE_NOT_FOUND) return 0;
  if (m->status == MT_STORE_TIMEOUT) {
    if (op != MT_STORE_OP_WAIT) return 0;
    if ((rc = check_key(m->key, m->op))) return rc;
    put_str(w, m->key);
    return 0;
  }
  switch (op) {
  case MT_STORE_OP_GET:
    if ((rc = check_str(m->value, MT_STORE_MAX_VALUE, "value", m->op))) return rc;
    put_str(w, m->value);
    return 0;
  case MT_STORE_OP_ADD: put_i64(w, m->num); return 0;
  case MT_STORE_OP_DELETE_PREFIX:
    if (m->num < 0)
      return mt_seterr(MT_EINVAL, "store DELETE_PREFIX reply: %lld keys", (long long)m->num);
    put_i64(w, m->num);
    return 0;
  case MT_STORE_OP_CAS:
    if ((rc = check_str(m->value, MT_STORE_MAX_VALUE, "current value", m->op))) return rc;
    if (m->flag > 1 || m->present > 1 || (!m->present && (m->flag || m->value.bytes)))
      return mt_seterr(MT_EINVAL, "store CAS reply: swapped %u, present %u, %u bytes", m->flag,
                       m->present, m->value.bytes);
    put_u8(w, m->flag), put_u8(w, m->present), put_str(w, m->value);
    return 0;
  case MT_STORE_OP_CHECK:
    if (m->flag > 1) return mt_seterr(MT_EINVAL, "store CHECK reply: exists is %u", m->flag);
    put_u8(w, m->flag);
    return 0;
  default: return 0;
  }
}

int mt_store_encode(const mt_store_msg *m, void *buf, size_t cap, size_t *bytes) {
  wr w = {buf, MT_STORE_HDR_BYTES, cap};
  *bytes = 0;
  int rc = (m->op & MT_STORE_REPLY) ? encode_reply(m, &w) : encode_request(m, &w);
  if (rc) return rc;
  if (!(m->op & MT_STORE_REPLY) && m->status)
    return mt_seterr(MT_EINVAL, "store %s: a request has no status", mt_store_op_name(m->op));
  if (w.at > MT_STORE_MAX_FRAME)
    return mt_seterr(MT_EINVAL, "store %s: frame of %zu bytes is over the limit of %u",
                     mt_store_op_name(m->op), w.at, MT_STORE_MAX_FRAME);
  *bytes = w.at;
  if (!buf) return 0;
  if (w.at > cap)
    return mt_seterr(MT_EINVAL, "store %s: frame of %zu bytes does not fit in %zu",
                     mt_store_op_name(m->op), w.at, cap);
  uint8_t *p = buf;
  wr32(p, MT_STORE_MAGIC);
  p[4] = MT_STORE_VERSION;
  p[5] = m->op;
  p[6] = m->status;
  p[7] = 0;
  wr32(p + 8, m->id);
  wr32(p + 12, (uint32_t)(w.at - MT_STORE_HDR_BYTES));
  return 0;
}
