/* election.h — a node's side of a coordinator elected through etcd
 * (rendezvous.etcd), once it is elected or follows.
 *
 * A thread of its own does the etcd work every heartbeat: the coordinator's
 * renews its lease on coord/leader (and, lapsed while etcd could not be
 * reached, takes the key again if nobody else did) and writes coord/state
 * when it changes; a follower's reads coord/leader. The node's loop only
 * looks at what the thread last found (mt_election_view), so an etcd that is
 * slow or has lost its quorum never holds the loop, and with it the node's
 * heartbeats to the coordinator's store, which is what the generation needs.
 * Nothing here exits.
 */
#ifndef MT_ELECTION_H
#define MT_ELECTION_H

#include <stdint.h>

#include "store.h"

typedef struct mt_election mt_election;

typedef struct mt_election_opts {
  mt_store *root;         /* the etcd store under rendezvous.etcd_prefix (borrowed) */
  const char *leader_key; /* "coord/leader" */
  const char *state_key;  /* "coord/state" (the coordinator's) */
  /* the leader's value: the coordinator's own, or the one a follower
   * joined under ("<term> <host:port>") */
  const char *leader_value;
  int64_t lease; /* the coordinator's lease; 0 on a follower */
  int ttl_s;     /* a lease's TTL, for the one taken again */
  int interval_ms;
} mt_election_opts;

typedef struct mt_election_view {
  int other; /* the key names another coordinator: other_value */
  char other_value[320];
  int64_t absent_since_ms;  /* a follower read no key since (mt_mono_ms); 0: it was there */
  int lapsed;               /* the coordinator's lease lapsed and another took the key */
  int64_t failing_since_ms; /* etcd has not answered since; 0: it did at the last round */
  char error[512];          /* the last failure's words */
} mt_election_view;

int mt_election_start(const mt_election_opts *o, mt_election **out);
/* What the thread found last. */
void mt_election_view_get(mt_election *e, mt_election_view *v);
/* The coordinator's coord/state (JSON text); the thread writes it at once
 * when it changed (and again at its rounds until a write succeeds). */
void mt_election_set_state(mt_election *e, const char *state_json);
/* Stops the thread (waiting for a request under way, at most etcd's
 * request timeout) and returns the lease (0 when lapsed or a follower). */
int64_t mt_election_stop(mt_election *e);

#endif
