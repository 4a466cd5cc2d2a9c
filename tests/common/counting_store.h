/* counting_store.h — an mt_store that counts the requests made of another:
 * what forming a group asks of the rendezvous store, in test_comm_procs
 * and bench_world alike. Its free leaves the inner store to the caller;
 * get_many and del_prefix are left out, so each key is one request. */
#ifndef MT_COUNTING_STORE_H
#define MT_COUNTING_STORE_H

#include <stdatomic.h>

#include "store.h"

typedef struct mt_counting_store {
  mt_store base; /* first: the table callers are given */
  mt_store *inner;
  atomic_long requests;
} mt_counting_store;

#define MT_COUNTED_(name, ret, params, args)                                                       \
  static inline ret mt_counted_##name params {                                                     \
    mt_counting_store *c = (mt_counting_store *)s;                                                 \
    atomic_fetch_add(&c->requests, 1);                                                             \
    return c->inner->name args;                                                                    \
  }
MT_COUNTED_(set, int, (mt_store * s, const char *k, const void *v, size_t n), (c->inner, k, v, n))
MT_COUNTED_(get, int, (mt_store * s, const char *k, void **v, size_t *n, int t),
            (c->inner, k, v, n, t))
MT_COUNTED_(add, int, (mt_store * s, const char *k, int64_t d, int64_t *r), (c->inner, k, d, r))
MT_COUNTED_(check, int, (mt_store * s, const char *k), (c->inner, k))
MT_COUNTED_(del, int, (mt_store * s, const char *k), (c->inner, k))
#undef MT_COUNTED_
static inline void mt_counted_free(mt_store *s) { (void)s; }

/* c counts every request made of inner through &c->base, from 0 */
static inline void mt_counting_store_init(mt_counting_store *c, mt_store *inner) {
  c->inner = inner;
  c->base = *inner;
  c->base.set = mt_counted_set, c->base.get = mt_counted_get, c->base.add = mt_counted_add;
  c->base.check = mt_counted_check, c->base.del = mt_counted_del, c->base.free = mt_counted_free;
  c->base.get_many = NULL, c->base.del_prefix = NULL;
  atomic_init(&c->requests, 0);
}

#endif
