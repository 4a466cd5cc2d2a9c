/* mutate.c — `mtnlgctl pause|resume|stop|checkpoint|resize`: the cluster-wide
 * orders, POST /v1/<verb>, each answered 202 with an operation; with --wait,
 * the operation is polled (GET /v1/operations/{id}) until it succeeds or
 * fails, printing each change of state or progress; a resize then until the
 * daemon asked shows the new width in its status.
 *
 * The verb's name is the operation's kind and the last segment of the path.
 * While waiting, a daemon that stops answering (or that cannot reach its
 * coordinator, 503) is retried for UNREACHABLE_GRACE_S before giving up
 * with exit 3: a resize or a coordinator restart may take a moment.
 *
 * Every POST carries an Idempotency-Key (128 random bits in hex, or the
 * one given with --idempotency-key): when its answer is lost after the
 * request went out (no answer, a reset connection, a 503 or a proxy's 504)
 * the same POST with the same key is sent again for UNREACHABLE_GRACE_S,
 * and the coordinator answers a key it has seen as it did, so the order
 * is given at most once while the coordinator runs (it forgets its keys
 * when it restarts). Only to a daemon that honours the key: one whose
 * answer echoes it, or whose GET /v1/health says "idempotency_keys"; an
 * older mtnlgd ignores the header and would order again. A connection refused before the request
 * went out is not sent again: nothing can have been ordered, and the daemon is not there.
 */
#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <stdio.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "ctl.h"
#include "http.h"
#include "output.h"

#define POLL_INTERVAL_S 0.5
#define UNREACHABLE_GRACE_S 30.0
#define SETTLE_S 5.0

#define MUTATION_OPTIONS                                                                           \
  "  --wait                 follow the operation until it ends: exit 0 when it\n"                  \
  "                         succeeded, 1 when it failed (with the reason)\n"                       \
  "  --idempotency-key KEY  send KEY (1 to 255 printable ASCII characters, no\n"                   \
  "                         spaces) as the request's Idempotency-Key instead of\n"                 \
  "                         a random one: a script run again with the same KEY\n"                  \
  "                         is answered the first run's operation (or refusal),\n"                 \
  "                         not ordered twice (the coordinator keeps its newest\n"                 \
  "                         1024 keyed requests, refusals included, while it\n"                    \
  "                         runs)\n"                                                               \
  "  -o, --output FORMAT    table (default) or json (the operation object; with\n"                 \
  "                         --wait, its final state; when refused, the daemon's\n"                 \
  "                         problem+json object)\n"                                                \
  "  -h, --help             show this help\n"                                                      \
  "\n"                                                                                             \
  "Needs the daemon's control token: --token-file PATH or MTNLG_TOKEN_FILE.\n"                     \
  "When the answer is lost after the request went out (no answer, a reset\n"                       \
  "connection, 503, 504), the same request is sent again with the same\n"                          \
  "Idempotency-Key for up to 30 s, to a daemon that honours the key (its 503\n"                    \
  "echoes it, or its /v1/health says so): the coordinator orders it at most\n"                     \
  "once while it runs.\n"                                                                          \
  "Without --wait, prints the operation id and state and returns; `mtnlgctl ops ID`\n"             \
  "shows it later. Interrupting --wait does not cancel the operation.\n"

const char ctl_pause_help[] =
    "Pauses training at the next step boundary, the same one on every rank; model and\n"
    "optimizer state stay in memory, and resume continues the same trajectory. The\n"
    "operation succeeds once every rank has paused.\n"
    "\n"
    "Options:\n" MUTATION_OPTIONS;

const char ctl_resume_help[] =
    "Resumes a paused job at the step where it paused. The daemon refuses (409\n"
    "Conflict) when the job is not paused, a pause not yet in effect included.\n"
    "\n"
    "Options:\n" MUTATION_OPTIONS;

const char ctl_stop_help[] =
    "Stops the job at the next step boundary on every rank; with a checkpoint.dir the\n"
    "ranks save a checkpoint there first, so the job continues from it when started\n"
    "again. The daemons then exit 0 (under systemd they stay down: a clean stop).\n"
    "\n"
    "Options:\n" MUTATION_OPTIONS;

const char ctl_checkpoint_help[] =
    "Writes a checkpoint at the next step boundary: every shard, then the manifest\n"
    "and the latest pointer (a checkpoint exists once its manifest is committed).\n"
    "With --wait, waits until it is committed or failed, printing each change of\n"
    "the operation's state; the bytes written are not reported while it writes\n"
    "(mtnlgctl status shows the step being written, and once it is committed its\n"
    "size and the rate it was written at).\n"
    "\n"
    "Options:\n" MUTATION_OPTIONS;

const char ctl_resize_help[] =
    "Changes the number of data-parallel replicas to N: the current generation ends\n"
    "at a step boundary and the next one forms with N replicas (tp and pp unchanged),\n"
    "continuing the same job, from a checkpoint it saves first. N may lie outside\n"
    "the job's [dp_min, dp_max], and it holds: the generations the coordinator\n"
    "forms by itself after it (after a failure, or under another coordinator\n"
    "elected through etcd) are at most N wide (down to dp_min, or N where it is\n"
    "below), until the next resize. The daemon refuses (409 Conflict) when the job\n"
    "is not running, N is the current width, too few nodes are present for N\n"
    "replicas, micro-batch x N does not divide the global batch, or the job has no\n"
    "checkpoint.dir.\n"
    "\n"
    "Options:\n"
    "  --dp N                 the new number of replicas, N >= 1 (required)\n" MUTATION_OPTIONS;

static double now_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + t.tv_nsec / 1e9;
}

static void sleep_s(double s) {
  struct timespec t = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
  while (nanosleep(&t, &t) && errno == EINTR) {
  }
}

static int is_done(const json_t *op) {
  const char *s = ctl_jstr(op, "state");
  return s && (!strcmp(s, "succeeded") || !strcmp(s, "failed"));
}

static int is_failed(const json_t *op) {
  const char *s = ctl_jstr(op, "state");
  return s && !strcmp(s, "failed");
}

/* Whether b, read under a's id, is the same operation: its kind and the
 * time it was created. */
static int same_operation(const json_t *a, const json_t *b) {
  const char *ka = ctl_jstr(a, "kind"), *kb = ctl_jstr(b, "kind");
  double ca, cb;
  if (ka && kb && strcmp(ka, kb)) return 0;
  if (ctl_jnum(a, "created", &ca) && ctl_jnum(b, "created", &cb) && ca != cb) return 0;
  return 1;
}

/* Polls the operation until it ends. On success *op is its final state. */
static int wait_op(const char *id, json_t **op, int human) {
  char path[192], line[1024], last[1024], err[1024];
  if (ctl_op_path(path, sizeof path, id)) {
    fprintf(stderr, "mtnlgctl: the daemon named the operation \"%s\", which is not an id\n", id);
    return CTL_EXIT_FAILURE;
  }
  ctl_op_summary(last, sizeof last, *op);
  double last_ok = now_s();
  int retrying = 0;
  while (!is_done(*op)) {
    sleep_s(POLL_INTERVAL_S);
    json_t *next = NULL;
    long status = 0;
    int rc = ctl_http_request("GET", path, NULL, &next, NULL, &status, err, sizeof err);
    if (rc == CTL_EXIT_UNREACHABLE || (rc == CTL_EXIT_FAILURE && status == 503)) {
      if (now_s() - last_ok > UNREACHABLE_GRACE_S) {
        fprintf(stderr, "mtnlgctl: %s\n", err);
        fprintf(stderr,
                "mtnlgctl: gave up waiting for %s after %.0f s; `mtnlgctl ops %s` shows "
                "it once the daemon answers\n",
                id, UNREACHABLE_GRACE_S, id);
        return rc == CTL_EXIT_UNREACHABLE ? rc : CTL_EXIT_FAILURE;
      }
      if (!retrying)
        fprintf(stderr, "mtnlgctl: %s; retrying for %.0f s\n", err, UNREACHABLE_GRACE_S);
      retrying = 1;
      continue;
    }
    if (rc && status == 404) {
      fprintf(stderr,
              "mtnlgctl: operation %s is no longer known to the daemon at %s (did it restart?); "
              "`mtnlgctl ops` lists what it knows\n",
              id, ctl_http_endpoint());
      return CTL_EXIT_FAILURE;
    }
    if (rc) {
      fprintf(stderr, "mtnlgctl: %s\n", err);
      return rc;
    }
    if (retrying) fprintf(stderr, "mtnlgctl: the daemon answers again\n");
    retrying = 0;
    last_ok = now_s();
    if (!same_operation(*op, next)) {
      /* ids are the coordinator's: one elected in its place (or restarted)
       * numbers its own from op-1 again */
      double t = 0;
      char when[64] = "?";
      if (ctl_jnum(next, "created", &t)) ctl_fmt_time(when, sizeof when, t);
      fprintf(stderr,
              "mtnlgctl: operation %s is no longer known: the coordinator changed since, and its "
              "%s is another operation (%s, created %s); `mtnlgctl ops` lists what it knows, and "
              "`mtnlgctl status` shows whether yours took effect before\n",
              id, id, ctl_jstr(next, "kind") ? ctl_jstr(next, "kind") : "?", when);
      json_decref(next);
      return CTL_EXIT_FAILURE;
    }
    json_decref(*op);
    *op = next;
    ctl_op_summary(line, sizeof line, *op);
    if (human && strcmp(line, last)) {
      printf("%s\n", line);
      fflush(stdout);
    }
    snprintf(last, sizeof last, "%s", line);
  }
  return CTL_EXIT_OK;
}

/* After a resize succeeded: until the daemon asked shows the new width in
 * its own status (for up to SETTLE_S). The coordinator marks the resize
 * done in the tick that forms its generation, and a node takes the new
 * assignment in its own next tick, so without this a `status` right after
 * `resize --wait` could still show the old width. Quiet: the operation
 * succeeded either way. */
static void settle_resize(int dp) {
  double until = now_s() + SETTLE_S;
  for (;;) {
    json_t *st = NULL;
    char err[256];
    int shown = !ctl_http_request("GET", "/v1/status", NULL, &st, NULL, NULL, err, sizeof err) &&
                json_integer_value(json_object_get(json_object_get(st, "job"), "dp")) == dp;
    json_decref(st);
    if (shown || now_s() > until) return;
    sleep_s(0.05);
  }
}

/* The longest Idempotency-Key (the daemon's MT_CONTROL_IDEM_KEY_MAX). */
#define IDEM_KEY_MAX 255

/* Why key cannot be an Idempotency-Key (1 to IDEM_KEY_MAX printable ASCII
 * characters; no spaces, which a header's value loses at either end), or
 * NULL when it can. */
static const char *idem_key_problem(const char *key, char *why, size_t cap) {
  size_t n = strlen(key);
  if (n == 0) return "it is empty";
  if (n > IDEM_KEY_MAX) {
    snprintf(why, cap, "%zu characters, over %d", n, IDEM_KEY_MAX);
    return why;
  }
  for (size_t i = 0; i < n; i++)
    if ((unsigned char)key[i] <= 0x20 || (unsigned char)key[i] > 0x7e) {
      snprintf(why, cap, "byte 0x%02x at offset %zu is not printable ASCII other than a space",
               (unsigned char)key[i], i);
      return why;
    }
  return NULL;
}

/* 128 random bits in hex: a key no other request has. */
static int draw_idem_key(char out[33]) {
  unsigned char r[16];
  size_t got = 0;
  while (got < sizeof r) {
    ssize_t n = getrandom(r + got, sizeof r - got, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return -1;
    got += (size_t)n;
  }
  for (int i = 0; i < 16; i++) snprintf(out + 2 * i, 3, "%02x", r[i]);
  return 0;
}

/* Whether the daemon honours Idempotency-Key, asked with GET /v1/health
 * ("idempotency_keys": true): 1 yes, 0 no (an older mtnlgd, which would
 * order a resent request again), -1 it did not say (no answer). */
static int health_says_keys(void) {
  char err[1024];
  json_t *h = NULL;
  long status = 0;
  int rc = ctl_http_request("GET", "/v1/health", NULL, &h, NULL, &status, err, sizeof err);
  int says = rc ? -1 : json_is_true(json_object_get(h, "idempotency_keys"));
  json_decref(h);
  return says;
}

/* POST path with the key set (ctl_http_set_idempotency_key). When the
 * answer is lost after the request went out, sends it again, saying so
 * once, until an answer comes or UNREACHABLE_GRACE_S passed since the
 * first was lost; but only to a daemon that honours the key: one whose
 * answer (a 503) echoed it, or whose GET /v1/health says so, asked once
 * before the first resend. An older mtnlgd ignores the header and would
 * order it again, so when the daemon does not say, nothing is resent.
 * Prints a failure as ctl_http_post does. */
static int post_order(const char *path, const json_t *body, const char *key, json_t **op) {
  char err[1024];
  double lost_since = 0;
  int retrying = 0, honoured = -1; /* the daemon honours the key: 1, 0, -1 not known yet */
  for (;;) {
    json_t *problem = NULL;
    long status = 0;
    int rc = ctl_http_request("POST", path, body, op, &problem, &status, err, sizeof err);
    int lost = (rc == CTL_EXIT_UNREACHABLE && (retrying || ctl_http_sent())) ||
               (rc == CTL_EXIT_FAILURE && (status == 503 || status == 504));
    if (rc != CTL_EXIT_UNREACHABLE && ctl_http_key_echoed()) honoured = 1;
    if (!lost) {
      if (rc) ctl_http_print_error(err, problem);
      json_decref(problem);
      return rc;
    }
    if (!retrying) {
      lost_since = now_s();
      char *hint = strstr(err, "; is mtnlgd running?"); /* it answered before: it runs */
      if (hint) *hint = '\0';
    }
    /* before the first resend: whether the daemon honours the key */
    while (honoured < 0 && now_s() - lost_since <= UNREACHABLE_GRACE_S) {
      if ((honoured = health_says_keys()) < 0) sleep_s(POLL_INTERVAL_S);
    }
    if (honoured == 0) {
      ctl_http_print_error(err, problem);
      fprintf(stderr,
              "mtnlgctl: the daemon at %s does not say it honours Idempotency-Key (its GET "
              "/v1/health has no \"idempotency_keys\": true: an older mtnlgd?), so the request "
              "is not sent again, which could order it twice; `mtnlgctl ops` shows whether it "
              "was taken\n",
              ctl_http_endpoint());
      json_decref(problem);
      return rc;
    }
    if (now_s() - lost_since > UNREACHABLE_GRACE_S) {
      ctl_http_print_error(err, problem);
      if (honoured < 0)
        fprintf(stderr,
                "mtnlgctl: gave up after %.0f s: GET /v1/health did not answer, so whether the "
                "daemon honours Idempotency-Key is not known and the request was not sent "
                "again; the order may have been taken: `mtnlgctl ops` shows it\n",
                UNREACHABLE_GRACE_S);
      else
        fprintf(stderr,
                "mtnlgctl: gave up after %.0f s; the order may have been taken: `mtnlgctl ops` "
                "shows it, and the same command with --idempotency-key %s while the same "
                "coordinator runs does not order it twice\n",
                UNREACHABLE_GRACE_S, key);
      json_decref(problem);
      return rc;
    }
    if (!retrying)
      fprintf(stderr,
              "mtnlgctl: %s; sending the same request again (Idempotency-Key %s) for up to "
              "%.0f s: the daemon orders it at most once while its coordinator runs\n",
              err, key, UNREACHABLE_GRACE_S);
    retrying = 1;
    json_decref(problem);
    sleep_s(POLL_INTERVAL_S);
  }
}

int ctl_verb_mutate(const ctl_verb *verb, int argc, char **argv) {
  enum { OPT_WAIT = 256, OPT_DP, OPT_IDEM_KEY };
  static const struct option opts[] = {
      {"wait", no_argument, NULL, OPT_WAIT},
      {"dp", required_argument, NULL, OPT_DP},
      {"output", required_argument, NULL, 'o'},
      {"idempotency-key", required_argument, NULL, OPT_IDEM_KEY},
      {0},
  };
  int ret = CTL_EXIT_USAGE, wait = 0, c, resize = !strcmp(verb->name, "resize");
  double dp = 0;
  json_t *body = NULL, *op = NULL;
  char key[IDEM_KEY_MAX + 1] = "", why[128];
  while ((c = getopt_long(argc, argv, "o:", opts, NULL)) != -1) {
    switch (c) {
    case OPT_WAIT: wait = 1; break;
    case OPT_IDEM_KEY: {
      const char *problem = idem_key_problem(optarg, why, sizeof why);
      if (problem) {
        ctl_usage_error(verb, "--idempotency-key: %s", problem);
        goto cleanup;
      }
      snprintf(key, sizeof key, "%s", optarg);
      break;
    }
    case OPT_DP:
      if (!resize) {
        ctl_usage_error(verb, "--dp is an option of resize, not of %s", verb->name);
        goto cleanup;
      }
      if (ctl_parse_positive(verb, "--dp", optarg, 1, &dp)) goto cleanup;
      break;
    case 'o':
      if (ctl_parse_output(optarg, &ctl.output)) goto cleanup;
      break;
    default: fprintf(stderr, "See 'mtnlgctl %s --help'.\n", verb->name); goto cleanup;
    }
  }
  if (resize && argc - optind == 1 && dp == 0 && argv[optind][0] >= '0' &&
      argv[optind][0] <= '9') { /* "mtnlgctl resize 3" */
    ctl_usage_error(verb, "1 argument given, at most 0; did you mean `mtnlgctl resize --dp %s`?",
                    argv[optind]);
    goto cleanup;
  }
  if (ctl_check_args(verb, argc - optind)) goto cleanup;
  if (resize && dp == 0) {
    ctl_usage_error(verb, "--dp N is required: the number of data-parallel replicas to run");
    goto cleanup;
  }
  if (resize && !(body = json_pack("{s:I}", "dp", (json_int_t)dp))) {
    ret = CTL_EXIT_FAILURE;
    goto cleanup;
  }

  if (!key[0] && draw_idem_key(key)) {
    fprintf(stderr,
            "mtnlgctl: cannot draw a random Idempotency-Key (getrandom: %s); give one with "
            "--idempotency-key KEY\n",
            strerror(errno));
    ret = CTL_EXIT_FAILURE;
    goto cleanup;
  }
  ctl_http_set_idempotency_key(key);
  char path[64];
  snprintf(path, sizeof path, "/v1/%s", verb->name);
  if ((ret = post_order(path, body, key, &op))) goto cleanup;
  ret = CTL_EXIT_FAILURE;
  const char *id = ctl_jstr(op, "id");
  if (!id) {
    fprintf(stderr, "mtnlgctl: the daemon accepted the %s but named no operation id\n", verb->name);
    goto cleanup;
  }
  char line[1024];
  int human = ctl.output == CTL_OUTPUT_TABLE;
  if (human) {
    printf("%s\n", ctl_op_summary(line, sizeof line, op));
    fflush(stdout);
  }
  if (wait) {
    /* id points into op, which wait_op replaces: keep a copy */
    char id_copy[160];
    snprintf(id_copy, sizeof id_copy, "%s", id);
    if ((ret = wait_op(id_copy, &op, human))) goto cleanup;
    ret = CTL_EXIT_FAILURE;
    if (resize && !is_failed(op)) settle_resize((int)dp);
  }
  if (!human && ctl_print_json(op)) goto cleanup;
  if (is_failed(op)) {
    const char *reason = ctl_jstr(op, "reason");
    fprintf(stderr, "mtnlgctl: operation %s (%s) failed: %s\n", ctl_jstr(op, "id"), verb->name,
            reason ? reason : "the daemon gave no reason");
    goto cleanup;
  }
  if (human && !wait && !is_done(op))
    printf("follow it with `mtnlgctl ops %s`, or pass --wait\n", ctl_jstr(op, "id"));
  ret = CTL_EXIT_OK;
cleanup:
  json_decref(op);
  json_decref(body);
  return ret;
}
