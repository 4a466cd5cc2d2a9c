#include "election.h"

#include "err.h"
#include "log.h"
#include "monotime.h"
#include "store_etcd.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct mt_election {
  mt_election_opts o;
  char *leader_key, *state_key, *leader_value;
  pthread_t thread;
  pthread_mutex_t mu; /* guards everything below */
  pthread_cond_t wake;
  int stopping;
  int kick; /* the state changed: a round now, not at the interval's end */
  int64_t lease;
  mt_election_view view;
  char state[512], written[512]; /* coord/state wanted, and as last written */
};

static void failed(mt_election *e, const char *what) {
  pthread_mutex_lock(&e->mu);
  if (!e->view.failing_since_ms) e->view.failing_since_ms = mt_mono_ms();
  snprintf(e->view.error, sizeof e->view.error, "%s: %s", what, mt_errmsg());
  pthread_mutex_unlock(&e->mu);
}

static void answered(mt_election *e) {
  pthread_mutex_lock(&e->mu);
  e->view.failing_since_ms = 0;
  pthread_mutex_unlock(&e->mu);
}

/* The coordinator's round: the lease renewed (or taken again), the state
 * written when it changed. */
static void coordinator_round(mt_election *e) {
  int64_t lease = e->lease;
  int rc = mt_store_etcd_keepalive(e->o.root, lease);
  if (rc == MT_ENOENT) {
    /* lapsed while etcd could not be reached: if nobody took the key
     * meanwhile, nobody else coordinates, and the term goes on */
    char holder[320] = "";
    int64_t fresh = 0;
    rc = mt_store_etcd_campaign(e->o.root, e->leader_key, e->leader_value, e->o.ttl_s, &fresh,
                                holder, sizeof holder);
    pthread_mutex_lock(&e->mu);
    if (rc == 1) {
      e->lease = fresh;
    } else if (rc == 0) {
      e->lease = 0;
      e->view.lapsed = 1;
      snprintf(e->view.other_value, sizeof e->view.other_value, "%s", holder);
    }
    pthread_mutex_unlock(&e->mu);
    if (rc == 1)
      mt_log_warn("etcd: this node's lease on %s lapsed (etcd did not answer for longer than "
                  "it): no other node took the key, so the term goes on under a new lease",
                  e->leader_key);
    if (rc == 0) return; /* another coordinates: its state is its own to write */
  }
  if (rc < 0) return failed(e, "keeping the coordinator's lease");
  answered(e);
  char want[sizeof e->state];
  pthread_mutex_lock(&e->mu);
  snprintf(want, sizeof want, "%s", e->state);
  pthread_mutex_unlock(&e->mu);
  if (!want[0] || !strcmp(want, e->written)) return;
  if (mt_store_set(e->o.root, e->state_key, want, strlen(want)))
    return failed(e, "writing the coordinator's state");
  snprintf(e->written, sizeof e->written, "%s", want);
}

/* A follower's round: coord/leader read. */
static void follower_round(mt_election *e) {
  void *v = NULL;
  size_t bytes = 0;
  int rc = mt_store_get(e->o.root, e->leader_key, &v, &bytes, 0);
  if (rc && rc != MT_ETIMEDOUT) return failed(e, "reading the coordinator's key");
  answered(e);
  pthread_mutex_lock(&e->mu);
  if (rc == MT_ETIMEDOUT) {
    if (!e->view.absent_since_ms) e->view.absent_since_ms = mt_mono_ms();
  } else {
    e->view.absent_since_ms = 0;
    if (bytes != strlen(e->leader_value) || memcmp(v, e->leader_value, bytes)) {
      e->view.other = 1;
      snprintf(e->view.other_value, sizeof e->view.other_value, "%.*s",
               (int)(bytes < 319 ? bytes : 319), (char *)v);
    }
  }
  pthread_mutex_unlock(&e->mu);
  free(v);
}

static void *run(void *arg) {
  mt_election *e = arg;
  pthread_mutex_lock(&e->mu);
  while (!e->stopping) {
    int coordinator = e->lease != 0, over = e->view.lapsed || e->view.other;
    pthread_mutex_unlock(&e->mu);
    if (coordinator)
      coordinator_round(e);
    else if (!over && !e->o.lease)
      follower_round(e);
    pthread_mutex_lock(&e->mu);
    struct timespec until = mt_mono_deadline(e->o.interval_ms);
    while (!e->stopping && !e->kick && pthread_cond_timedwait(&e->wake, &e->mu, &until) == 0) {
    }
    e->kick = 0;
  }
  pthread_mutex_unlock(&e->mu);
  return NULL;
}

static void election_free(mt_election *e) {
  free(e->leader_key), free(e->state_key), free(e->leader_value);
  pthread_cond_destroy(&e->wake);
  pthread_mutex_destroy(&e->mu);
  free(e);
}

int mt_election_start(const mt_election_opts *o, mt_election **out) {
  *out = NULL;
  mt_election *e = calloc(1, sizeof *e);
  if (!e) return mt_seterr(MT_ENOMEM, "election: out of memory");
  e->o = *o;
  e->lease = o->lease;
  pthread_mutex_init(&e->mu, NULL);
  if (mt_mono_cond_init(&e->wake)) pthread_cond_init(&e->wake, NULL);
  e->leader_key = strdup(o->leader_key);
  e->state_key = strdup(o->state_key);
  e->leader_value = strdup(o->leader_value);
  if (!e->leader_key || !e->state_key || !e->leader_value) {
    election_free(e);
    return mt_seterr(MT_ENOMEM, "election: out of memory");
  }
  if (pthread_create(&e->thread, NULL, run, e)) {
    election_free(e);
    return mt_seterr(MT_ENOMEM, "election: cannot start its thread");
  }
  *out = e;
  return 0;
}

void mt_election_view_get(mt_election *e, mt_election_view *v) {
  pthread_mutex_lock(&e->mu);
  *v = e->view;
  pthread_mutex_unlock(&e->mu);
}

void mt_election_set_state(mt_election *e, const char *state_json) {
  pthread_mutex_lock(&e->mu);
  if (strcmp(e->state, state_json)) { /* written at once: a pause is not lost with the node */
    snprintf(e->state, sizeof e->state, "%s", state_json);
    e->kick = 1;
    pthread_cond_signal(&e->wake);
  }
  pthread_mutex_unlock(&e->mu);
}

int64_t mt_election_stop(mt_election *e) {
  if (!e) return 0;
  pthread_mutex_lock(&e->mu);
  e->stopping = 1;
  pthread_cond_signal(&e->wake);
  pthread_mutex_unlock(&e->mu);
  pthread_join(e->thread, NULL);
  int64_t lease = e->lease;
  election_free(e);
  return lease;
}
