/* store_wire.h — the store protocol's codec (proto/store-v1.md).
 *
 * Encodes and decodes frames of the rendezvous store's wire protocol. Pure
 * functions over caller-owned buffers: no I/O, no allocation, no global state
 * beyond the calling thread's error message, so the decoder can be fuzzed.
 * The decoder must never read outside [frame, frame + bytes) whatever the
 * input; it checks every length against the buffer and the protocol limits
 * before it looks at the field.
 */
#ifndef MT_STORE_WIRE_H
#define MT_STORE_WIRE_H

#include <stddef.h>
#include <stdint.h>

#define MT_STORE_MAGIC 0x3153544du /* the bytes "MTS1" */
#define MT_STORE_VERSION 1
#define MT_STORE_HDR_BYTES 16
#define MT_STORE_MAX_FRAME (64u << 20) /* header included */
#define MT_STORE_MAX_KEY 4096u
#define MT_STORE_MAX_VALUE (16u << 20)
#define MT_STORE_MAX_TEXT 1024u
#define MT_STORE_MAX_WAIT_KEYS 1024u

enum {
  MT_STORE_OP_SET = 1,
  MT_STORE_OP_GET = 2,
  MT_STORE_OP_ADD = 3,
  MT_STORE_OP_CAS = 4,
  MT_STORE_OP_WAIT = 5,
  MT_STORE_OP_CHECK = 6,
  MT_STORE_OP_DELETE = 7,
  MT_STORE_OP_PING = 8,
  MT_STORE_OP_AUTH = 9, /* the cluster key, first on a connection to a store that has one */
  MT_STORE_OP_DELETE_PREFIX = 10, /* every key that starts with the given bytes */
  MT_STORE_OP_ERROR = 127,        /* replies only: a frame whose header was unusable */
  MT_STORE_REPLY = 0x80,          /* or'ed into the op of a reply */
};

enum {
  MT_STORE_OK = 0,
  MT_STORE_NOT_FOUND = 1,
  MT_STORE_TIMEOUT = 2,
  MT_STORE_BAD_VALUE = 3,
  MT_STORE_MALFORMED = 4,
  MT_STORE_TOO_LARGE = 5,
  MT_STORE_UNSUPPORTED = 6,
  MT_STORE_NO_MEMORY = 7,
  MT_STORE_UNAUTHORIZED = 8, /* no AUTH with the store's cluster key on this connection */
  MT_STORE_STATUS_MAX = 8,
};

/* A run of bytes inside a frame or a caller's buffer; not NUL-terminated. */
typedef struct mt_store_str {
  const char *p;
  uint32_t bytes;
} mt_store_str;

typedef struct mt_store_hdr {
  uint8_t version, op, status;
  uint32_t id;
  uint32_t body_bytes;
  uint32_t frame_bytes; /* MT_STORE_HDR_BYTES + body_bytes */
} mt_store_hdr;

/* One request or reply. Which fields mean something depends on op and status
 * (store-v1.md, "Ops"); the others are zero. Decoded strings point into the
 * frame, so the message lives as long as the frame's buffer. */
typedef struct mt_store_msg {
  uint8_t op;     /* MT_STORE_OP_*, with MT_STORE_REPLY in replies */
  uint8_t status; /* replies: MT_STORE_OK...; requests: 0 */
  uint32_t id;
  mt_store_str key;      /* single-key requests, DELETE_PREFIX's prefix; WAIT's TIMEOUT reply:
                            the missing key */
  mt_store_str value;    /* SET, CAS: the new value; GET, CAS replies: the value;
                            AUTH: the cluster key; error replies: the message text */
  mt_store_str expected; /* CAS request, unless expect_absent */
  int64_t num;           /* ADD: the delta; its reply: the new value; DELETE_PREFIX reply: the
                            number of keys deleted */
  int32_t timeout_ms;    /* GET, WAIT: 0 no wait, < 0 no limit */
  uint8_t flag;          /* CAS request: expect_absent; CAS reply: swapped; CHECK reply: exists */
  uint8_t present;       /* CAS reply: the key exists now */
  uint32_t nkeys;        /* WAIT request */
  const mt_store_str *keys;
} mt_store_msg;

/* Checks the header in the first MT_STORE_HDR_BYTES of buf (bytes must be at
 * least that) and fills h, frame_bytes included, so a reader knows how much
 * to buffer. On a bad header returns MT_ECORRUPT (magic, reserved byte,
 * status in a request, unknown status), MT_ENOTSUP (version, unknown op) or
 * MT_EINVAL (body over the limit), sets *why (may be NULL) to the status to
 * answer with, and leaves a message; h is filled as far as it was read. */
int mt_store_peek(const void *buf, size_t bytes, mt_store_hdr *h, uint8_t *why);

/* Decodes the whole frame in buf, which must be exactly bytes long (header
 * and body), into m. A WAIT request's keys go to keys[0..keys_cap) (pass
 * MT_STORE_MAX_WAIT_KEYS entries to accept every valid WAIT; NULL and 0 when
 * only replies are expected). Errors as for mt_store_peek, plus MT_ECORRUPT
 * or MT_EINVAL for a body that breaks the rules. */
int mt_store_decode(const void *buf, size_t bytes, mt_store_msg *m, mt_store_str *keys,
                    uint32_t keys_cap, uint8_t *why);

/* Encodes m into buf[0..cap). With buf NULL only computes the size. Sets
 * *bytes to the frame's size either way. MT_EINVAL when a field breaks the
 * protocol's rules (an empty key, a value over the limit, ...) or cap is too
 * small. */
int mt_store_encode(const mt_store_msg *m, void *buf, size_t cap, size_t *bytes);

/* "SET", "GET", ..., "?" for an unknown op; the reply bit is ignored. */
const char *mt_store_op_name(uint8_t op);
/* "OK", "NOT_FOUND", ..., "?" */
const char *mt_store_status_name(uint8_t status);

static inline mt_store_str mt_store_cstr(const char *s) {
  mt_store_str r = {s, 0};
  while (s && s[r.bytes]) r.bytes++;
  return r;
}

#endif
