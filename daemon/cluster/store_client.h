/* store_client.h — the rendezvous store's TCP client (proto/store-v1.md).
 *
 * An mt_store (daemon/comm/store.h) that talks to a store server, so the comm
 * layer bootstraps through the cluster's store as it does through the
 * in-process one. Calls block and are safe from any number of threads: each
 * is handed to the client's own libuv loop thread, which owns the connection,
 * pipelines the requests and wakes the caller when its reply arrives. A
 * dropped connection is re-opened with exponential backoff and jitter; what
 * happens to requests in flight is in proto/store-v1.md, "Client behaviour":
 * SET, GET, WAIT, CHECK, PING are retried, ADD, CAS, DELETE fail with MT_EIO.
 * Never call it from a callback of the loop that hosts the server it talks to.
 * Errors name the server address and the key.
 */
#ifndef MT_STORE_CLIENT_H
#define MT_STORE_CLIENT_H

#include "store.h"

#include <stddef.h>
#include <stdint.h>

typedef struct mt_store_tcp_opts {
  int connect_timeout_ms; /* a request waits this long for a connection; default 10000 */
  int request_timeout_ms; /* and this long for its reply beyond its own wait; default 30000 */
  int backoff_min_ms;     /* first reconnect delay; default 50 */
  int backoff_max_ms;     /* delays double up to this; default 2000 */
  /* the cluster key (copied), sent first on every connection; NULL/0: none.
   * A server that refuses it (or, having a key, a client without one) makes
   * every request of this client fail with MT_EPERM, and it stops dialing. */
  const char *key;
  size_t key_bytes;
  /* a fence from the first connection on (as mt_store_tcp_fence); NULL: none */
  const char *fence_key;
  const void *fence_value;
  size_t fence_bytes;
} mt_store_tcp_opts;

/* Connects to host:port (waiting up to connect_timeout_ms for the first
 * connection) and returns a store whose kind is "tcp". opts may be NULL; a
 * field left 0 takes its default. */
int mt_store_tcp_new(const char *host, int port, const mt_store_tcp_opts *opts, mt_store **out);

/* Compare-and-set: stores value at key when the key holds exactly expected
 * (expected NULL: when the key does not exist). *swapped (may be NULL) says
 * whether it did; *current (may be NULL; malloc'd, NUL after the last byte,
 * free() it; NULL when the key does not exist) is the key's value afterwards. */
int mt_store_tcp_cas(mt_store *s, const char *key, const void *expected, size_t expected_bytes,
                     const void *value, size_t bytes, int *swapped, void **current,
                     size_t *current_bytes);

/* Waits until every key exists, at most timeout_ms (0: do not wait, < 0: no
 * limit). MT_ETIMEDOUT naming the first missing key when they did not appear. */
int mt_store_tcp_wait(mt_store *s, const char *const *keys, size_t nkeys, int timeout_ms);

/* A round trip to the server; *rtt_ms (may be NULL) is how long it took. */
int mt_store_tcp_ping(mt_store *s, double *rtt_ms);

typedef struct mt_store_tcp_stats {
  uint64_t connects;         /* connections made */
  uint64_t connect_failures; /* attempts that failed or timed out */
  uint64_t drops;            /* connections lost */
  uint64_t retries;          /* requests sent again after a drop */
  int last_backoff_ms;       /* the last delay before an attempt */
  int fenced;                /* a new connection failed the fence: the client refuses all */
} mt_store_tcp_stats;

int mt_store_tcp_get_stats(mt_store *s, mt_store_tcp_stats *st);

/* Fences the client to this store: key must read value on the connection up
 * now and on every new one (a GET, right after the AUTH on a new one, which
 * every request made after this call waits for) before anything is sent on
 * it. Another value, or none, is a server that
 * restarted (or another at its address): every request, then and after,
 * fails with MT_ECANCELED, the client stops dialing and its stats say
 * fenced, so nothing the caller meant for the old store lands in the new
 * one. Set again, the new value holds from then on. */
int mt_store_tcp_fence(mt_store *s, const char *key, const void *value, size_t bytes);

#endif
