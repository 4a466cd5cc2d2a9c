/* store.h — the key-value store that bootstraps communicators.
 *
 * Ranks of a group find each other through a store: each publishes what its
 * peers need (Gloo addresses, the ncclUniqueId) under keys such as
 * "gen/0/comm/tp0/gloo/3" and waits for theirs. mt_store is a table of
 * functions so the comm layer never knows which store it talks to; two live
 * here: an in-process one (ranks that are threads) and a file-backed one (ranks
 * that are processes on one machine). The cluster's TCP store implements the
 * same table.
 *
 * Every implementation is safe to call from several threads at once. Values are
 * opaque bytes; a key written by add holds its count as decimal text. Nothing
 * here exits: failures return a negative MT_E* code with mt_errmsg() naming the
 * key (and the timeout, for a wait that ran out).
 */
#ifndef MT_STORE_H
#define MT_STORE_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "err.h"

typedef struct mt_store mt_store;

struct mt_store {
  /* Sets key to the bytes of value, replacing any value; readers never see a
   * partial value. */
  int (*set)(mt_store *s, const char *key, const void *value, size_t bytes);
  /* Waits until key exists, at most timeout_ms (0: do not wait, < 0: no
   * limit), then returns a malloc'd copy of its value (free() it) with a NUL
   * after the last byte. MT_ETIMEDOUT when the key did not appear in time, and
   * only then: a store that cannot answer returns MT_EIO. */
  int (*get)(mt_store *s, const char *key, void **value, size_t *bytes, int timeout_ms);
  /* Atomically adds delta to the integer at key (0 when absent) and returns
   * the new value in *result (may be NULL). */
  int (*add)(mt_store *s, const char *key, int64_t delta, int64_t *result);
  /* 1 when key exists, 0 when not, < 0 on failure. */
  int (*check)(mt_store *s, const char *key);
  /* Removes key: 0, or MT_ENOENT when it did not exist. */
  int (*del)(mt_store *s, const char *key);
  /* Releases the handle (not the data of a shared store: a file store's
   * directory stays). */
  void (*free)(mt_store *s);
  const char *kind; /* "mem", "file", "tcp": for messages */
  /* Optional (NULL: mt_store_get_many asks key by key). Reads n keys as
   * they are now, without waiting, in one round trip to a remote store:
   * values[i] a malloc'd copy (NUL after the last byte; free() it) or NULL
   * where the key does not exist, bytes[i] its length (bytes may be NULL).
   * On failure no value is returned: every values[i] is NULL. */
  int (*get_many)(mt_store *s, const char *const *keys, size_t n, void **values, size_t *bytes);
  /* Optional (NULL: mt_store_del_prefix answers MT_ENOTSUP). Removes every
   * key that starts with prefix (byte for byte: "gen/1/" does not match
   * "gen/10/x") and sets *deleted (may be NULL) to how many. Requests waiting
   * for a removed key keep waiting. So a long job's store does not keep every
   * past generation's keys. */
  int (*del_prefix)(mt_store *s, const char *prefix, int64_t *deleted);
};

/* An in-process store: a mutex, a condition variable and a list. */
int mt_store_mem_new(mt_store **out);

/* A store in directory dir (created when missing) that processes on this
 * machine share: one file per key, written to a temp file and renamed into
 * place; add serialises through flock on dir/.lock; get polls with backoff. */
int mt_store_file_new(const char *dir, mt_store **out);

static inline int mt_store_set(mt_store *s, const char *key, const void *value, size_t bytes) {
  return s->set(s, key, value, bytes);
}
static inline int mt_store_get(mt_store *s, const char *key, void **value, size_t *bytes,
                               int timeout_ms) {
  return s->get(s, key, value, bytes, timeout_ms);
}
static inline int mt_store_add(mt_store *s, const char *key, int64_t delta, int64_t *result) {
  return s->add(s, key, delta, result);
}
static inline int mt_store_check(mt_store *s, const char *key) { return s->check(s, key); }
static inline int mt_store_del(mt_store *s, const char *key) { return s->del(s, key); }
/* s->get_many, or a get of each key with no wait where a store has none
 * (inline: the cluster layer uses the table without linking this one). */
static inline int mt_store_get_many(mt_store *s, const char *const *keys, size_t n, void **values,
                                    size_t *bytes) {
  if (s->get_many) return s->get_many(s, keys, n, values, bytes);
  int rc = 0;
  for (size_t i = 0; i < n; i++) values[i] = NULL;
  for (size_t i = 0; i < n && !rc; i++) {
    size_t b = 0;
    void *v = NULL;
    /* an absent key is not an error: asked first, it leaves no message */
    rc = mt_store_check(s, keys[i]);
    if (rc == 1) rc = mt_store_get(s, keys[i], &v, &b, 0);
    if (rc == MT_ETIMEDOUT) rc = 0, b = 0; /* deleted in between: absent */
    values[i] = rc ? NULL : v;
    if (bytes) bytes[i] = b;
  }
  for (size_t i = 0; i < n && rc; i++) free(values[i]), values[i] = NULL;
  return rc;
}
/* s->del_prefix, or MT_ENOTSUP (with a message naming the store's kind)
 * where a store has none or its server does not know the op. */
static inline int mt_store_del_prefix(mt_store *s, const char *prefix, int64_t *deleted) {
  if (deleted) *deleted = 0;
  if (!s->del_prefix)
    return mt_seterr(MT_ENOTSUP, "store(%s): delete keys under %.200s: not supported", s->kind,
                     prefix);
  return s->del_prefix(s, prefix, deleted);
}
static inline void mt_store_free(mt_store *s) {
  if (s) s->free(s);
}

#endif
