/* store_etcd.h — an mt_store kept in an etcd cluster (etcd v3, through the
 * JSON gateway every member serves on its client URL).
 *
 * For clusters that want the rendezvous to outlive any one machine: the keys
 * live in etcd's replicated log, so losing an etcd member (even the leader)
 * loses nothing while a quorum is left, and the client goes on through the
 * members that answer. Calls block and are safe from any number of threads
 * (each takes a libcurl handle of its own from a small pool). A get that
 * waits watches its key; an add is a compare-and-swap on the key's revision.
 *
 * What is retried after a request may have reached etcd, as the TCP store's
 * client does (proto/store-v1.md, "Client behaviour"): set, get, check and
 * get_many go to the next member; add, del and del_prefix fail with MT_EIO
 * ("may or may not have been applied") unless etcd said it did not apply them
 * (no leader yet, or a member that could not be reached at all).
 *
 * Errors name the endpoints and the key. Nothing here exits.
 */
#ifndef MT_STORE_ETCD_H
#define MT_STORE_ETCD_H

#include "store.h"

typedef struct mt_store_etcd_opts {
  /* Every key is kept as prefix + key, so that jobs share an etcd cluster
   * without seeing each other's keys ("/mtnlg/<job>/"); NULL: none. */
  const char *prefix;
  int dial_timeout_ms;    /* one member's connect; default 1000 */
  int request_timeout_ms; /* a request gets an answer from some member within this long, beyond
                             its own wait; default 10000 */
  /* etcd's users (`etcdctl auth enable`): both or neither. A refused name
   * or password fails every request with MT_EPERM. */
  const char *user, *password;
  const char *cacert; /* https:// endpoints: the CA's PEM file; NULL: the system's */
  /* https:// endpoints that ask for a client certificate (etcd's
   * --client-cert-auth): its PEM file and its key's, both or neither. A
   * certificate either side does not trust fails every request with
   * MT_EPERM at once, naming what was refused. */
  const char *cert, *key;
} mt_store_etcd_opts;

/* endpoints: the members' client URLs, comma-separated
 * ("http://10.0.0.1:2379,http://10.0.0.2:2379"; a bare host:port is http).
 * Reaches one of them (each within dial_timeout_ms, the whole within
 * request_timeout_ms) and returns a store whose kind is "etcd". opts may be
 * NULL; a field left 0 takes its default. */
int mt_store_etcd_new(const char *endpoints, const mt_store_etcd_opts *opts, mt_store **out);

/* ---- an election (which node coordinates) ----
 *
 * A key held under an etcd lease: whoever puts it first leads, for as long
 * as it keeps its lease alive; a leader that dies (or stalls past the TTL)
 * loses the key with its lease, and the next campaign wins. s must be an
 * etcd store (kind "etcd"). */

/* Puts value at key under a new lease of ttl_s seconds, unless the key
 * exists. 1: this caller leads, *lease its lease; 0: another does, holder
 * (holder_size bytes, may be NULL) its value; < 0 a failure. */
int mt_store_etcd_campaign(mt_store *s, const char *key, const char *value, int ttl_s,
                           int64_t *lease, char *holder, size_t holder_size);
/* Renews the lease for another TTL: 0, MT_ENOENT when it had expired (the
 * key is gone and another may lead), < 0 a failure. */
int mt_store_etcd_keepalive(mt_store *s, int64_t lease);
/* Ends the lease now, and with it the key (a leader that is done): 0, or
 * < 0 a failure (the key then goes when the lease expires). */
int mt_store_etcd_resign(mt_store *s, int64_t lease);
/* Deletes key if it still holds value (a leader known dead: its lease
 * would outlive it by up to its TTL): 1 deleted, 0 it holds another value
 * or none, < 0 a failure. */
int mt_store_etcd_depose(mt_store *s, const char *key, const char *value);

#endif
