/* node_etcd.c — a coordinator elected through etcd (rendezvous.etcd).
 *
 * Which node coordinates is decided in etcd: the node that holds
 * coord/leader under its lease does, hosting the rendezvous store on its
 * own rendezvous.endpoint as a coordinator always has, and the key's value
 * ("<term> <host:port>") tells the others where to dial. Nodes with the job
 * campaign; the rest follow. When the coordinator's node is lost, its store
 * goes with it and its lease lapses: the other nodes find the coordinator
 * lost (exit 1) and, started again by systemd, elect another among them,
 * which re-forms the job from its last checkpoint. Losing the coordinator's
 * node no longer ends the job. etcd holds that key and coord/state (below),
 * whatever the size of the job: the generations' keys stay in the
 * coordinator's store. */

#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "election.h"
#include "err.h"
#include "fileio.h"
#include "log.h"
#include "monotime.h"
#include "node_int.h"
#include "rdzv.h"
#include "store_etcd.h"

#define ETCD_LEADER_KEY "coord/leader"

/* The leader key's value: 16 hex digits of term, a space, the endpoint. */
static int parse_leader(const char *v, size_t bytes, char *term, char *endpoint, size_t ep_size) {
  if (bytes < 18 || bytes - 17 >= ep_size || v[16] != ' ') return -1;
  for (int i = 0; i < 16; i++)
    if (!strchr("0123456789abcdef", v[i]) || !v[i]) return -1;
  memcpy(term, v, 16);
  term[16] = 0;
  memcpy(endpoint, v + 17, bytes - 17);
  endpoint[bytes - 17] = 0;
  return 0;
}

/* The coordinator this node works under is the one coord/leader names.
 * The election's thread (election.c) reads it, or on the coordinator keeps
 * its lease, every heartbeat; here the loop looks at what it found.
 * Another coordinator there is one elected since (this one was lost, or
 * stalled past its lease): the generation is gone with it. None there (its
 * lease lapsed, or it resigned at its end) is a coordinator that does not
 * answer: lost past the heartbeat timeout, as a silent store is, while the
 * old store's keys (a job's final end) still read. An etcd that does not
 * answer costs nothing here: the generation does not need it. Returns 1
 * when lost. */
int node_etcd_check_term(node *n) {
  if (n->coord_lost) return 1;
  if (!n->election) return 0;
  mt_election_view v;
  mt_election_view_get(n->election, &v);
  int64_t now = mt_mono_ms();
  if (!!v.failing_since_ms != n->etcd_failing) { /* said once each way */
    n->etcd_failing = !!v.failing_since_ms;
    if (n->etcd_failing)
      mt_log_warn("etcd does not answer (%s): the generation goes on, a new election waits for "
                  "it",
                  v.error);
    else
      mt_log_info("etcd answers again");
  }
  char why[800] = "";
  if (v.lapsed)
    snprintf(why, sizeof why,
             "this node's lease on %s in etcd lapsed (etcd did not hear from it for %d s) and "
             "another coordinator holds it now (%s): generation %d is gone with term %s",
             ETCD_LEADER_KEY, node_lease_ttl_s(n->cfg), v.other_value, n->gen, n->term);
  else if (v.other)
    snprintf(why, sizeof why,
             "another coordinator was elected in etcd (%s, not term %s at %s): generation %d is "
             "gone with the old one",
             v.other_value, n->term, n->store_name, n->gen);
  else if (v.absent_since_ms && now - v.absent_since_ms > n->cfg->heartbeat_timeout_ms)
    snprintf(why, sizeof why,
             "no coordinator held %s in etcd for %.1f s (term %s's lease lapsed): generation %d "
             "is gone with it",
             ETCD_LEADER_KEY, (now - v.absent_since_ms) / 1000.0, n->term, n->gen);
  if (why[0]) node_coordinator_lost(n, why);
  return n->coord_lost;
}

/* What outlives a coordinator: coord/state in etcd holds the restarts it
 * has spent, whether the job is paused and the width an operator's resize
 * set ({"restarts": r, "paused": b, "coordinator": name, "dp_resized": N
 * when resized}), written when it is elected and whenever they change. A
 * coordinator elected while it is there counts its predecessor's loss as
 * one more restart, keeps the resized width and starts paused if the job was
 * (read_coord_state): a job whose coordinator keeps being lost ends once
 * rendezvous.max_restarts is spent rather than failing round for ever, and
 * an operator's pause holds. A coordinator that ends the job deletes it
 * (the next start has a budget of its own), except when the job completed
 * its train.steps: then it says so ("completed": {"job": hash, "name",
 * "step", "at": unix seconds}), and a node elected later for the same job
 * (one that lost contact just as the job ended, started again by systemd)
 * does not run it again: it exits 0 (node_etcd_close_job), as does a node
 * that follows and finds no coordinator (node_etcd_elect: at once with
 * the job's hash, after its join timeout without a job). The same job
 * changed (more steps) has another hash and runs. */
#define ETCD_STATE_KEY "coord/state"

/* coord/state's record of a job that completed, when it holds one: which
 * job, and "job NAME (HASH) completed its N steps at WHEN (coord/state in
 * etcd says so)" in said. */
typedef struct {
  char hash[17];
  char name[64];
  char when[32];
  char said[320];
} job_completed;

static int completed_in_state(json_t *j, job_completed *done) {
  json_t *rec = json_object_get(j, "completed");
  if (!json_is_object(rec)) return 0;
  const char *hash = json_string_value(json_object_get(rec, "job"));
  const char *name = json_string_value(json_object_get(rec, "name"));
  json_int_t step = json_integer_value(json_object_get(rec, "step"));
  time_t at = (time_t)json_integer_value(json_object_get(rec, "at"));
  struct tm tm;
  snprintf(done->hash, sizeof done->hash, "%s", hash ? hash : "?");
  snprintf(done->name, sizeof done->name, "%s", name ? name : "?");
  snprintf(done->when, sizeof done->when, "?");
  if (at > 0 && gmtime_r(&at, &tm))
    strftime(done->when, sizeof done->when, "%Y-%m-%d %H:%M:%S UTC", &tm);
  snprintf(done->said, sizeof done->said,
           "job %s (%s) completed its %lld steps at %s (%s in etcd says so)", done->name,
           done->hash, (long long)step, done->when, ETCD_STATE_KEY);
  return 1;
}

/* coord/state read for its completed job's record, by a node that
 * follows and finds no coordinator; 0 when there is none (or etcd cannot
 * say). */
static int read_completed(node *n, job_completed *done) {
  void *v = NULL;
  size_t bytes = 0;
  if (mt_store_get(n->etcd_root, ETCD_STATE_KEY, &v, &bytes, 0)) return 0;
  json_t *j = json_loadb(v, bytes, 0, NULL);
  free(v);
  int rc = completed_in_state(j, done);
  json_decref(j);
  return rc;
}

static void read_coord_state(node *n) {
  void *v = NULL;
  size_t bytes = 0;
  int rc = mt_store_get(n->etcd_root, ETCD_STATE_KEY, &v, &bytes, 0);
  if (rc) { /* none: no coordinator was lost in this job (or etcd cannot say) */
    if (rc != MT_ETIMEDOUT) mt_log_warn("etcd: reading %s: %s", ETCD_STATE_KEY, mt_errmsg());
    return;
  }
  json_t *j = json_loadb(v, bytes, 0, NULL);
  free(v);
  job_completed done;
  if (completed_in_state(j, &done)) {
    if (!strcmp(done.hash, n->job.hash)) {
      n->completed_before = 1;
      snprintf(n->completed_said, sizeof n->completed_said, "%s", done.said);
    } else {
      mt_log_info("etcd: %s says job %s (%s) completed under this prefix at %s; this is job %s "
                  "(%s), another: it runs, with a restart budget of its own",
                  ETCD_STATE_KEY, done.name, done.hash, done.when, n->job.name, n->job.hash);
    }
    json_decref(j);
    return;
  }
  json_t *r = json_object_get(j, "restarts");
  const char *who = json_string_value(json_object_get(j, "coordinator"));
  if (json_is_integer(r) && json_integer_value(r) >= 0 && json_integer_value(r) < 1000000) {
    n->restarts_spent = (int)json_integer_value(r) + 1;
    n->start_paused = json_is_true(json_object_get(j, "paused"));
    json_t *dp = json_object_get(j, "dp_resized"); /* the operator's width holds too */
    if (json_is_integer(dp) && json_integer_value(dp) >= 1 && json_integer_value(dp) <= 65536)
      n->start_dp_resized = (int)json_integer_value(dp);
    snprintf(n->restart_reason, sizeof n->restart_reason,
             "the coordinator %s was lost (its lease on %s in etcd lapsed)", who ? who : "?",
             ETCD_LEADER_KEY);
  } else {
    mt_log_warn("etcd: %s is not {\"restarts\": N, ...}: the restart budget starts afresh",
                ETCD_STATE_KEY);
  }
  json_decref(j);
}

/* coord/state's text for what the coordinator has now. */
static void coord_state_text(node *n, char *text, size_t cap) {
  int r = n->coord ? mt_coord_restarts(n->coord) : n->restarts_spent;
  int paused = n->coord ? mt_coord_paused(n->coord) : n->start_paused;
  int dp = n->coord ? mt_coord_dp_resized(n->coord) : n->start_dp_resized;
  char resized[32] = "";
  if (dp) snprintf(resized, sizeof resized, ", \"dp_resized\": %d", dp);
  snprintf(text, cap, "{\"restarts\": %d, \"paused\": %s, \"coordinator\": \"%s\"%s}", r,
           paused ? "true" : "false", n->cfg->name, resized);
}

/* The election's thread, once this node coordinates or follows (its
 * etcd work off the loop: election.h). */
int node_etcd_start_election(node *n) {
  mt_election_opts eo = {.root = n->etcd_root,
                         .leader_key = ETCD_LEADER_KEY,
                         .state_key = ETCD_STATE_KEY,
                         .leader_value = n->leader_value,
                         .lease = n->lease,
                         .ttl_s = node_lease_ttl_s(n->cfg),
                         .interval_ms = n->cfg->heartbeat_interval_ms};
  int rc = mt_election_start(&eo, &n->election);
  if (!rc && n->is_host) {
    char text[256];
    coord_state_text(n, text, sizeof text);
    mt_election_set_state(n->election, text);
  }
  return rc;
}

/* The coordinator's coord/state, handed to the election's thread every
 * tick (it writes what changed, at once). */
void node_etcd_publish_state(node *n) {
  if (!n->election || !n->is_host || n->coord_lost) return;
  char text[256];
  coord_state_text(n, text, sizeof text);
  mt_election_set_state(n->election, text);
}

/* The job ended under this coordinator: coord/state says so if it
 * completed its train.steps (a node elected later for it exits 0), and
 * goes otherwise (stopped or failed: the next start has a restart budget
 * of its own, and resumes from the newest checkpoint). */
void node_etcd_close_job(node *n) {
  /* the members' reports say it (the first is the generation's reason) */
  if (n->end_ok && !strncmp(n->end_reason, NODE_COMPLETED, strlen(NODE_COMPLETED))) {
    json_t *j = json_pack("{s:i, s:b, s:s, s:{s:s, s:s, s:I, s:I}}", "restarts",
                          mt_coord_restarts(n->coord), "paused", 0, "coordinator", n->cfg->name,
                          "completed", "job", n->job.hash, "name", n->job.name, "step",
                          (json_int_t)n->job.train.steps, "at", (json_int_t)time(NULL));
    char *text = j ? json_dumps(j, JSON_COMPACT) : NULL;
    if (!text || mt_store_set(n->etcd_root, ETCD_STATE_KEY, text, strlen(text)))
      mt_log_warn("etcd: writing %s (the job completed): %s", ETCD_STATE_KEY,
                  text ? mt_errmsg() : "out of memory");
    free(text);
    json_decref(j);
    return;
  }
  if (mt_store_del(n->etcd_root, ETCD_STATE_KEY) && !strstr(mt_errmsg(), "no such key"))
    mt_log_warn("etcd: deleting %s: %s", ETCD_STATE_KEY, mt_errmsg());
}

/* Whether nothing listens on host:port here: a socket binds it. */
static int endpoint_free(const char *host, int port) {
  char service[16];
  snprintf(service, sizeof service, "%d", port);
  struct addrinfo hints = {
      .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE};
  struct addrinfo *res = NULL;
  if (getaddrinfo(host, service, &hints, &res)) return 0;
  int ok = 0;
  for (struct addrinfo *a = res; a && !ok; a = a->ai_next) {
    int fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) continue;
    int one = 1; /* as the store server binds: a closed socket's TIME_WAIT is no holder */
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    ok = bind(fd, a->ai_addr, a->ai_addrlen) == 0;
    close(fd);
  }
  freeaddrinfo(res);
  return ok;
}

/* A coordinator on this node's own endpoint holds coord/leader, and
 * nothing listens there: an earlier start of this daemon, dead (systemd
 * started it again), whose lease would hold the key for up to its TTL
 * more while every other node waits. The key is deleted if it still
 * holds that value; 1 when it was. */
static int depose_own_dead_leader(node *n, const char *leader) {
  char term[17], endpoint[300], host[256];
  int port;
  if (parse_leader(leader, strlen(leader), term, endpoint, sizeof endpoint) ||
      strcmp(endpoint, n->cfg->endpoint) ||
      mt_parse_host_port(endpoint, host, sizeof host, &port) || !endpoint_free(host, port))
    return 0;
  int rc = mt_store_etcd_depose(n->etcd_root, ETCD_LEADER_KEY, leader);
  if (rc == 1)
    mt_log_info("etcd: %s names term %s on this node's endpoint %s, where nothing listens: an "
                "earlier start of this daemon, gone; its key deleted rather than waiting out its "
                "lease",
                ETCD_LEADER_KEY, term, endpoint);
  return rc == 1;
}

/* Reaches etcd and elects: a node with the job and rendezvous.host auto
 * or yes campaigns (yes waits to win), and one that wins coordinates; the
 * others follow the leader they read. Fills in the store's endpoint and
 * is_host; waits for etcd and for a leader up to rendezvous.join_timeout_s. */
int node_etcd_elect(node *n) {
  const mt_node_config *c = n->cfg;
  if (c->etcd_user[0]) {
    size_t len;
    int rc = mt_read_secret_file(c->etcd_password_file, "rendezvous.etcd_password_file",
                                 "can write the job's rendezvous", n->etcd_password,
                                 sizeof n->etcd_password, &len);
    if (rc) return rc == MT_ENOENT ? mt_seterr(MT_EINVAL, "%s", mt_errmsg()) : rc;
  }
  if (c->host == 1 && !n->have_job)
    return mt_seterr(MT_EINVAL, "rendezvous.host = yes: this node would coordinate the job, but "
                                "has no job: set job.path");
  int campaign = c->host != 0 && n->have_job;
  uint64_t draw;
  if (getrandom(&draw, sizeof draw, GRND_NONBLOCK) != sizeof draw)
    draw = (uint64_t)time(NULL) * 0x9e3779b97f4a7c15ull ^ (uint64_t)getpid() << 32;
  char mine[320];
  snprintf(mine, sizeof mine, "%016llx %s", (unsigned long long)draw, c->endpoint);
  int ttl_s = node_lease_ttl_s(c);
  int64_t deadline = mt_mono_ms() + (c->join_timeout_s ? c->join_timeout_s * 1000LL : 600000LL);
  int hb = c->heartbeat_interval_ms;
  /* an election among etcd's own members takes a second or so: ride it out */
  mt_store_etcd_opts o = {.prefix = c->etcd_prefix,
                          .dial_timeout_ms = hb < 1000 ? hb : 1000,
                          .request_timeout_ms = 2 * hb > 2000 ? 2 * hb : 2000,
                          .user = c->etcd_user[0] ? c->etcd_user : NULL,
                          .password = c->etcd_user[0] ? n->etcd_password : NULL,
                          .cacert = c->etcd_cacert[0] ? c->etcd_cacert : NULL,
                          .cert = c->etcd_cert[0] ? c->etcd_cert : NULL,
                          .key = c->etcd_key[0] ? c->etcd_key : NULL};
  char said[700] = "", leader[320] = "";
  int deposed = 0;
  for (;;) {
    int rc = n->etcd_root ? 0 : mt_store_etcd_new(c->etcd, &o, &n->etcd_root);
    leader[0] = 0;
    if (!rc && campaign) {
      rc = mt_store_etcd_campaign(n->etcd_root, ETCD_LEADER_KEY, mine, ttl_s, &n->lease, leader,
                                  sizeof leader);
      if (rc == 1) {
        n->is_host = 1;
        snprintf(leader, sizeof leader, "%s", mine);
        break;
      }
      if (rc == 0 && leader[0] && deposed < 3 && depose_own_dead_leader(n, leader)) {
        deposed++;
        continue; /* campaign again at once */
      }
    } else if (!rc) {
      void *v = NULL;
      size_t b = 0;
      rc = mt_store_get(n->etcd_root, ETCD_LEADER_KEY, &v, &b, hb);
      if (!rc) snprintf(leader, sizeof leader, "%.*s", (int)(b < 319 ? b : 319), (char *)v);
      if (rc == MT_ETIMEDOUT) rc = 0;
      free(v);
    }
    if (rc == MT_EPERM || rc == MT_EINVAL)
      return mt_wraperr(rc, "the rendezvous in etcd (%s)", c->etcd);
    if (!rc && leader[0] && c->host != 1) break;
    /* a follower with no coordinator to follow: the job may have completed
     * (a node started again after its end, or one left waiting as a spare) */
    job_completed done;
    int closed = !rc && !leader[0] && !campaign && read_completed(n, &done);
    if (closed && n->have_job && !strcmp(done.hash, n->job.hash)) {
      n->completed_before = 1;
      return mt_seterr(MT_EINVAL,
                       "following, but %s and no coordinator holds %s%s: nothing to follow (to "
                       "run the same job again, delete %s%s in etcd, or give it another "
                       "rendezvous.etcd_prefix)",
                       done.said, c->etcd_prefix, ETCD_LEADER_KEY, c->etcd_prefix, ETCD_STATE_KEY);
    }
    int wait_s = c->join_timeout_s ? c->join_timeout_s : 600;
    char now_says[700];
    if (rc)
      snprintf(now_says, sizeof now_says, "waiting for etcd: %s", mt_errmsg());
    else if (leader[0])
      snprintf(now_says, sizeof now_says,
               "rendezvous.host = yes: waiting for the lease of %s (%s) to end", ETCD_LEADER_KEY,
               leader);
    else if (closed)
      snprintf(now_says, sizeof now_says,
               "no coordinator, and %s: waiting up to %d s for another job's coordinator to be "
               "elected",
               done.said, wait_s);
    else
      snprintf(now_says, sizeof now_says,
               "waiting for a node with the job to be elected coordinator");
    if (mt_mono_ms() > deadline) {
      n->store_unreachable = rc != 0;
      if (closed && !n->have_job) { /* the rendezvous is over: a clean end, not a failure */
        n->completed_before = 1;
        return mt_seterr(MT_ETIMEDOUT,
                         "the rendezvous in etcd(%s): %s, and no coordinator was elected in the "
                         "%d s since: nothing to follow (started again, this node joins the "
                         "next job under rendezvous.etcd_prefix %s)",
                         c->etcd, done.said, wait_s, c->etcd_prefix);
      }
      return mt_seterr(rc ? rc : MT_ETIMEDOUT, "the rendezvous in etcd(%s): still %s after %d s",
                       c->etcd, now_says, wait_s);
    }
    if (strcmp(now_says, said)) mt_log_info("etcd(%s): %s", c->etcd, now_says);
    snprintf(said, sizeof said, "%s", now_says);
    if (rc || campaign) usleep((useconds_t)hb * 1000);
  }
  char endpoint[300];
  if (parse_leader(leader, strlen(leader), n->term, endpoint, sizeof endpoint) ||
      mt_parse_host_port(endpoint, n->store_host, sizeof n->store_host, &n->store_port)) {
    if (n->lease) mt_store_etcd_resign(n->etcd_root, n->lease), n->lease = 0;
    return mt_seterr(MT_ECORRUPT,
                     "etcd(%s) holds a %s of \"%s\", not \"<term> <host:port>\": not an mtnlg "
                     "rendezvous under rendezvous.etcd_prefix %s",
                     c->etcd, ETCD_LEADER_KEY, leader, c->etcd_prefix);
  }
  snprintf(n->store_name, sizeof n->store_name, "%s", endpoint);
  snprintf(n->leader_value, sizeof n->leader_value, "%s", leader);
  if (n->is_host) read_coord_state(n);
  if (n->completed_before) { /* nothing to run: the next node elected finds the same */
    mt_store_etcd_resign(n->etcd_root, n->lease), n->lease = 0;
    return mt_seterr(MT_EINVAL,
                     "elected to coordinate, but %s: not running it again (to run the same job "
                     "again, delete %s%s in etcd, or give it another rendezvous.etcd_prefix)",
                     n->completed_said, c->etcd_prefix, ETCD_STATE_KEY);
  }
  if (n->is_host)
    mt_log_info("etcd(%s): elected coordinator of job %s (term %s, lease %d s)%s%s", c->etcd,
                n->job.name, n->term, ttl_s, n->restarts_spent ? ": " : "",
                n->restarts_spent ? n->restart_reason : "");
  if (n->is_host && n->start_dp_resized)
    mt_log_info("etcd: the job was resized to dp %d under the coordinator before: that width "
                "holds (mtnlgctl resize --dp N changes it)",
                n->start_dp_resized);
  if (n->is_host && n->start_paused)
    mt_log_info("etcd: the job was paused under the coordinator before: it stays paused "
                "(mtnlgctl resume)");
  if (!n->is_host)
    mt_log_info("etcd(%s): following the coordinator of term %s at %s", c->etcd, n->term, endpoint);
  return 0;
}

/* etcd's leader still the one this node read (leader_value)? 1 yes, or
 * when etcd cannot say; 0 when another leads or none does. */
int node_etcd_leader_stays(node *n) {
  void *v = NULL;
  size_t bytes = 0;
  int rc = mt_store_get(n->etcd_root, ETCD_LEADER_KEY, &v, &bytes, 0);
  if (rc && rc != MT_ETIMEDOUT) return 1;
  int same = !rc && bytes == strlen(n->leader_value) && !memcmp(v, n->leader_value, bytes);
  free(v);
  return same;
}
