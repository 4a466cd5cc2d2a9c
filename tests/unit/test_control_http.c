/* test_control_http.c — the control plane's HTTP server over real sockets.
 *
 * A provider written here (running/paused and a list of operations) stands in
 * for the daemon; requests are raw HTTP/1.1 on plain sockets, so the test sees
 * exactly the status lines, headers and bodies a client would, and can play a
 * client that sends half a request and stalls. The metrics text goes through
 * promtool when it is installed. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include "control.h"
#include "err.h"
#include "log.h"

#include "mt_check.h"

#define TOKEN "s3cret-token"

/* ---- the provider: a small state machine ---------------------------------- */

typedef struct fake {
  pthread_mutex_t mu;
  const char *state; /* "running" or "paused" */
  json_t *ops;       /* array of OP, newest last */
  int next_id;
  int unreachable; /* 1: mutations answer 503 */
  int64_t step;
  /* the Idempotency-Key the last mutation came with ("" none), and, as the
   * coordinator keeps them (one here), the last key given, its kind and op */
  char got_key[300];
  int submits;
  char key[300], key_kind[16];
  json_t *key_op;
} fake;

static fake F = {.mu = PTHREAD_MUTEX_INITIALIZER, .state = "running", .step = 12};

static json_t *fake_status(void *arg) {
  fake *f = arg;
  pthread_mutex_lock(&f->mu);
  json_t *s = json_pack(
      "{s:s,s:s,s:s,s:{s:s,s:s,s:I,s:i,s:i,s:i,s:I,s:i,s:i,s:i,s:i,s:i},s:i,s:s,s:n,s:I,s:I,s:i,"
      "s:f,s:f,s:f,s:n,s:f,s:i,s:f,s:{s:f,s:f,s:f,s:f},s:f,"
      "s:[{s:s,s:s,s:i,s:i,s:i,s:f,s:f},{s:s,s:s,s:i,s:i,s:i,s:f,s:n}],"
      "s:[{s:s,s:s,s:s,s:s,s:[s],s:[i],s:[i],s:[i],s:f,s:I,s:s},"
      "{s:s,s:s,s:s,s:s,s:[s],s:[i],s:[i],s:[i],s:n,s:n,s:s}],"
      "s:{s:i,s:s,s:f,s:I},s:{s:s,s:s,s:i,s:I,s:I,s:f},s:i}",
      "node", "n0", "coordinator", "n0", "version", "0.1.0", "job", "name", "tiny \"demo\"", "hash",
      "abc123", "steps", (json_int_t)1000, "global_batch", 8, "seq_len", 128, "micro_batch", 2,
      "params", (json_int_t)1234567, "tp", 1, "pp", 2, "dp", 1, "dp_min", 1, "dp_max", 4,
      "generation", 2, "state", f->state, "reason", "step", (json_int_t)f->step, "consumed_tokens",
      (json_int_t)(f->step * 1024), "global_batch", 8, "loss", 3.21, "lr", 1e-3, "grad_norm", 0.8,
      "val_loss", "tokens_per_s", 2830.0, "skipped_steps", 0, "loss_scale", 65536.0, "step_time",
      "total_ms", 45.3, "compute_ms", 38.0, "bubble_ms", 4.1, "comm_ms", 3.2, "eta_s", 120.5,
      "devices", "node", "n0", "device", "cpu:0", "rank", 0, "stage", 0, "replica", 0, "tflops",
      0.21, "mfu", 0.3, "node", "n1\\x\"y\nz", "device", "cpu:0", "rank", 1, "stage", 1, "replica",
      0, "tflops", 0.2, "mfu", "nodes", "name", "n0", "host", "127.0.0.1", "role", "coordinator",
      "state", f->state, "devices", "cpu:0", "ranks", 0, "stages", 0, "replicas", 0,
      "heartbeat_age_s", 0.4, "memory_bytes", (json_int_t)123456789, "control_url",
      "http://127.0.0.1:8471", "name", "n1\\x\"y\nz", "host", "127.0.0.2", "role", "member",
      "state", f->state, "devices", "cpu:0", "ranks", 1, "stages", 1, "replicas", 0,
      "heartbeat_age_s", "memory_bytes", "control_url", "http://127.0.0.2:8471", "last_checkpoint",
      "step", 10, "path", "/ckpt/job/step_00000010", "time", 1700000000.0, "bytes",
      (json_int_t)12345, "checkpoint_progress", "of", "node", "state", "writing", "step", 12,
      "bytes_done", (json_int_t)100, "bytes_total", (json_int_t)400, "bytes_per_s", 1e6,
      "operations_pending", 0);
  if (s) json_object_set_new(s, "restarts", json_integer(1));
  if (s)
    json_object_set_new(s, "last_restart",
                        json_pack("{s:i, s:s, s:i, s:f}", "generation", 2, "reason",
                                  "node n1 lost (no heartbeat for 5.0 s, ranks [1, 2))",
                                  "resumed_from_step", 8, "time", 1700000000.0));
  if (s) json_object_set_new(s, "exit_at", json_real(1700003600.0));
  if (s) json_object_set_new(s, "exit_step", json_integer(5000));
  if (s) json_object_set_new(s, "test_loss", json_real(3.5)); /* a completed run's test pass */
  if (s) json_object_set_new(s, "tensorboard_dropped_steps", json_integer(7));
  if (s) /* a validation under way */
    json_object_set_new(s, "evaluation",
                        json_pack("{s:s, s:b, s:i, s:i, s:i, s:f}", "split", "valid",
                                  "end_of_training", 0, "after_step", 12, "batches_done", 40,
                                  "batches", 100, "elapsed_s", 12.5));
  if (s) /* train.timing_log_level's timers of the last step */
    json_object_set_new(json_object_get(s, "step_time"), "timers",
                        json_pack("{s:[f,f], s:[f,f]}", "forward-backward", 40.5, 41.25,
                                  "optimizer-inner-step", 0.5, 0.75));
  if (s) json_object_set_new(s, "heartbeat_interval_ms", json_integer(1000));
  if (s) json_object_set_new(s, "heartbeat_timeout_ms", json_integer(6000));
  if (s)
    json_object_set_new(
        s, "store",
        json_pack("{s:i, s:I, s:I, s:I, s:I, s:i, s:i, s:i, s:i, s:i}", "keys", 120, "bytes",
                  (json_int_t)40960, "max_bytes", (json_int_t)17179869184LL, "transient_bytes",
                  (json_int_t)131072, "max_transient_bytes", (json_int_t)4294967296LL, "clients", 2,
                  "max_clients", 65536, "waiters", 3, "refused_clients", 1, "dropped_clients", 4));
  if (s) json_object_set_new(s, "election", json_null()); /* the endpoint's node coordinates */
  pthread_mutex_unlock(&f->mu);
  if (!s) fprintf(stderr, "fake_status: json_pack failed\n");
  return s;
}

static json_t *fake_history(void *arg, int64_t since) {
  fake *f = arg;
  json_t *pts = json_array();
  for (int64_t s = since < 0 ? 1 : since + 1; s <= f->step; s++)
    json_array_append_new(pts, json_pack("{s:I,s:f,s:f,s:f,s:f,s:f,s:f,s:f,s:f,s:I}", "step",
                                         (json_int_t)s, "time", 1700000000.0 + (double)s, "loss",
                                         4.0 - 0.01 * (double)s, "lr", 1e-3, "grad_norm", 0.9,
                                         "step_ms", 45.0, "tokens_per_s", 2800.0, "tflops", 0.2,
                                         "bubble", 0.1, "consumed_tokens", (json_int_t)(s * 1024)));
  return json_pack("{s:o,s:I}", "steps", pts, "last_step", (json_int_t)f->step);
}

static json_t *fake_checkpoints(void *arg) {
  (void)arg;
  return json_pack("{s:[{s:i,s:s,s:i,s:f,s:b}], s:s}", "checkpoints", "step", 10, "path",
                   "/ckpt/job/step_00000010", "bytes", 12345, "time", 1700000000.0, "latest", 1,
                   "dir", "/ckpt/job");
}

static json_t *fake_operations(void *arg) {
  fake *f = arg;
  pthread_mutex_lock(&f->mu);
  json_t *r = json_pack("{s:O}", "operations", f->ops);
  pthread_mutex_unlock(&f->mu);
  return r;
}

static json_t *fake_operation(void *arg, const char *id) {
  fake *f = arg;
  json_t *found = NULL, *op;
  size_t i;
  pthread_mutex_lock(&f->mu);
  json_array_foreach(f->ops, i, op) {
    if (strcmp(json_string_value(json_object_get(op, "id")), id) == 0) found = json_incref(op);
  }
  pthread_mutex_unlock(&f->mu);
  return found;
}

/* pause/resume change the state at once; resume refuses unless paused and
 * resize refuses dp > 4, the way the daemon's coordinator would. */
static void fake_submit(void *arg, const char *kind, json_t *args, const char *key,
                        mt_control_reply *reply) {
  fake *f = arg;
  pthread_mutex_lock(&f->mu);
  f->submits++;
  snprintf(f->got_key, sizeof f->got_key, "%s", key ? key : "");
  if (key && !strncmp(key, "refused-", 8)) { /* a refusal the coordinator repeats */
    reply->status = 409;
    reply->replayed = 1;
    snprintf(reply->detail, sizeof reply->detail, "cannot %s: as before", kind);
  } else if (key && !strcmp(key, f->key) && !strcmp(kind, f->key_kind)) {
    reply->status = 202;
    reply->op = json_incref(f->key_op);
    reply->replayed = 1;
  } else if (key && !strcmp(key, f->key)) {
    reply->status = 422;
    snprintf(reply->detail, sizeof reply->detail,
             "Idempotency-Key \"%.200s\" was used for another request (%s {})", key, f->key_kind);
  } else if (f->unreachable) {
    reply->status = 503;
    snprintf(reply->detail, sizeof reply->detail, "cannot reach the coordinator");
  } else if (!strcmp(kind, "resume") && strcmp(f->state, "paused") != 0) {
    reply->status = 409;
    snprintf(reply->detail, sizeof reply->detail, "cannot resume: the job is %s, not paused",
             f->state);
  } else if (!strcmp(kind, "resize") && json_integer_value(json_object_get(args, "dp")) > 4) {
    reply->status = 409;
    snprintf(reply->detail, sizeof reply->detail, "cannot form dp=%lld: dp_max is 4",
             (long long)json_integer_value(json_object_get(args, "dp")));
  } else {
    if (!strcmp(kind, "pause")) f->state = "paused";
    if (!strcmp(kind, "resume")) f->state = "running";
    char id[32];
    snprintf(id, sizeof id, "op-%d", ++f->next_id);
    json_t *op = json_pack("{s:s,s:s,s:s,s:n,s:f,s:f,s:I,s:O,s:n}", "id", id, "kind", kind, "state",
                           "succeeded", "reason", "created", 1700000000.0, "updated", 1700000001.0,
                           "step", (json_int_t)f->step, "args", args, "progress");
    json_array_append(f->ops, op);
    reply->status = 202;
    reply->op = op;
    if (key) {
      snprintf(f->key, sizeof f->key, "%s", key);
      snprintf(f->key_kind, sizeof f->key_kind, "%s", kind);
      json_decref(f->key_op);
      f->key_op = json_incref(op);
    }
  }
  pthread_mutex_unlock(&f->mu);
}

static mt_control_opts fake_opts(void) {
  mt_control_opts o = {.listen = "127.0.0.1:0", .token = TOKEN};
  o.provider = (mt_control_provider){.status = fake_status,
                                     .history = fake_history,
                                     .checkpoints = fake_checkpoints,
                                     .operations = fake_operations,
                                     .operation = fake_operation,
                                     .submit = fake_submit,
                                     .arg = &F};
  return o;
}

/* ---- a raw HTTP client ----------------------------------------------------- */

typedef struct resp {
  int status;
  char head[8192]; /* status line and headers */
  char *body;      /* NUL-terminated */
  size_t body_len;
} resp;

static void resp_free(resp *r) {
  free(r->body);
  r->body = NULL;
}

static int dial(int port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  struct timeval tv = {.tv_sec = 5};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

/* Reads until the server closes (requests say Connection: close) and splits
 * the answer. 0, or -1 when nothing parseable came back. */
static int read_resp(int fd, resp *r) {
  memset(r, 0, sizeof *r);
  size_t cap = 1 << 16, len = 0;
  char *buf = malloc(cap);
  for (;;) {
    if (len + 4096 > cap) buf = realloc(buf, cap *= 2);
    ssize_t n = recv(fd, buf + len, cap - len - 1, 0);
    if (n <= 0) break;
    len += (size_t)n;
  }
  buf[len] = '\0';
  char *end = strstr(buf, "\r\n\r\n");
  if (!end || sscanf(buf, "HTTP/1.%*d %d", &r->status) != 1) {
    free(buf);
    return -1;
  }
  size_t hl = (size_t)(end - buf);
  if (hl >= sizeof r->head) hl = sizeof r->head - 1;
  memcpy(r->head, buf, hl);
  r->head[hl] = '\0';
  r->body_len = len - (size_t)(end + 4 - buf);
  r->body = malloc(r->body_len + 1);
  memcpy(r->body, end + 4, r->body_len);
  r->body[r->body_len] = '\0';
  free(buf);
  return 0;
}

/* Sends raw (errors ignored: the server may close first) and reads the answer. */
static int http_raw(int port, const char *raw, size_t n, resp *r) {
  int fd = dial(port);
  if (fd < 0) return -1;
  size_t off = 0;
  while (off < n) {
    ssize_t w = send(fd, raw + off, n - off, MSG_NOSIGNAL);
    if (w <= 0) break;
    off += (size_t)w;
  }
  int rc = read_resp(fd, r);
  close(fd);
  return rc;
}

/* METHOD path with an optional bearer token and body. */
static int http(int port, const char *method, const char *path, const char *token, const char *body,
                resp *r) {
  char req[4096];
  char auth[256] = "";
  if (token) snprintf(auth, sizeof auth, "Authorization: Bearer %s\r\n", token);
  size_t bl = body ? strlen(body) : 0;
  int n = snprintf(req, sizeof req,
                   "%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n%s"
                   "Content-Length: %zu\r\n\r\n%s",
                   method, path, auth, bl, body ? body : "");
  return http_raw(port, req, (size_t)n, r);
}

/* The value of header name (case-insensitive), copied into out; 0 if absent. */
static int header(const resp *r, const char *name, char *out, size_t out_bytes) {
  size_t nl = strlen(name);
  for (const char *line = strstr(r->head, "\r\n"); line; line = strstr(line + 2, "\r\n")) {
    const char *h = line + 2;
    if (strncasecmp(h, name, nl) == 0 && h[nl] == ':') {
      h += nl + 1;
      while (*h == ' ') h++;
      const char *e = strstr(h, "\r\n");
      size_t vl = e ? (size_t)(e - h) : strlen(h);
      if (vl >= out_bytes) vl = out_bytes - 1;
      memcpy(out, h, vl);
      out[vl] = '\0';
      return 1;
    }
  }
  return 0;
}

/* 1 when r is problem+json with the given status and a detail containing needle. */
static int is_problem(const resp *r, int status, const char *needle) {
  char ct[128];
  if (r->status != status || !header(r, "Content-Type", ct, sizeof ct) ||
      strcmp(ct, "application/problem+json") != 0)
    return 0;
  json_t *j = json_loads(r->body, 0, NULL);
  int ok = j && json_is_string(json_object_get(j, "type")) &&
           json_is_string(json_object_get(j, "title")) &&
           json_integer_value(json_object_get(j, "status")) == status &&
           json_is_string(json_object_get(j, "detail")) &&
           (!needle || strstr(json_string_value(json_object_get(j, "detail")), needle));
  if (!ok)
    fprintf(stderr, "  not a %d problem with \"%s\": %s\n%s\n", status, needle ? needle : "",
            r->head, r->body);
  json_decref(j);
  return ok;
}

static mt_control *srv;
static int port;

/* Appends one answer to answers.jsonl for the OpenAPI check at the end. */
static void record(const char *method, const char *path, const resp *r) {
  json_t *h = json_object();
  for (const char *line = strstr(r->head, "\r\n"); line; line = strstr(line + 2, "\r\n")) {
    const char *colon = strchr(line + 2, ':'), *e = strstr(line + 2, "\r\n");
    if (!colon || (e && colon > e)) continue;
    const char *v = colon + 1;
    while (*v == ' ') v++;
    char name[128];
    snprintf(name, sizeof name, "%.*s", (int)(colon - line - 2), line + 2);
    json_object_set_new(h, name, json_stringn(v, e ? (size_t)(e - v) : strlen(v)));
  }
  json_t *ct = json_object_get(h, "Content-Type");
  json_t *a =
      json_pack("{s:s,s:s,s:i,s:O,s:o,s:s%}", "method", method, "path", path, "status", r->status,
                "content_type", ct ? ct : json_null(), "headers", h, "body", r->body, r->body_len);
  FILE *f = fopen(tmp_path("answers.jsonl"), "a");
  if (f && a) {
    json_dumpf(a, f, JSON_COMPACT);
    fputc('\n', f);
  }
  if (f) fclose(f);
  json_decref(a);
}

/* ---- tests ------------------------------------------------------------------ */

static int test_every_read_is_200_with_its_content_type(void) {
  static const struct {
    const char *path, *type;
  } reads[] = {
      {"/", "text/html; charset=utf-8"},
      {"/v1/health", "application/json"},
      {"/v1/status", "application/json"},
      {"/v1/metrics", "text/plain; version=0.0.4; charset=utf-8"},
      {"/v1/history", "application/json"},
      {"/v1/history?since=5", "application/json"},
      {"/v1/checkpoints", "application/json"},
      {"/v1/operations", "application/json"},
  };
  for (size_t i = 0; i < sizeof reads / sizeof reads[0]; i++) {
    resp r;
    REQUIRE(http(port, "GET", reads[i].path, NULL, NULL, &r) == 0, "GET %s: no answer",
            reads[i].path);
    char ct[128] = "", cc[64] = "";
    header(&r, "Content-Type", ct, sizeof ct);
    header(&r, "Cache-Control", cc, sizeof cc);
    CHECK(r.status == 200, "GET %s: status %d", reads[i].path, r.status);
    record("GET", reads[i].path, &r);
    CHECK(strcmp(ct, reads[i].type) == 0, "GET %s: Content-Type %s", reads[i].path, ct);
    CHECK(strcmp(reads[i].path, "/") == 0 || strcmp(cc, "no-store") == 0,
          "GET %s: Cache-Control \"%s\"", reads[i].path, cc);
    if (strstr(ct, "json")) {
      json_t *j = json_loads(r.body, 0, NULL);
      CHECK(json_is_object(j), "GET %s: body is not a JSON object: %s", reads[i].path, r.body);
      json_decref(j);
    }
    resp_free(&r);
  }
  resp r;
  REQUIRE(http(port, "GET", "/v1/history?since=5", NULL, NULL, &r) == 0, "no answer");
  json_t *h = json_loads(r.body, 0, NULL);
  json_t *first = json_array_get(json_object_get(h, "steps"), 0);
  CHECK(json_integer_value(json_object_get(first, "step")) == 6, "since=5 starts at 6: %s", r.body);
  CHECK(json_integer_value(json_object_get(h, "last_step")) == 12, "last_step: %s", r.body);
  json_decref(h);
  resp_free(&r);
  REQUIRE(http(port, "GET", "/v1/health", NULL, NULL, &r) == 0, "no answer");
  CHECK(strstr(r.body, "\"status\":\"ok\"") && strstr(r.body, "\"node\":\"n0\"") &&
            strstr(r.body, "\"state\":\"running\"") && strstr(r.body, "\"version\":\"0.1.0\"") &&
            strstr(r.body, "\"mutations\":true") && strstr(r.body, "\"idempotency_keys\":true"),
        "health: %s", r.body);
  resp_free(&r);
  REQUIRE(http(port, "GET", "/", NULL, NULL, &r) == 0, "no answer");
  CHECK(strstr(r.body, "id=\"btn-pause\"") && strstr(r.body, "id=\"nodes\"") &&
            strstr(r.body, "</html>") && !strstr(r.body, "src=\"http"),
        "the dashboard is not the embedded page");
  resp_free(&r);
  return 0;
}

static int test_keep_alive_serves_several_requests_per_connection(void) {
  /* Pipelined on one connection: reads, a refusal without a body, a
   * mutation; the last asks to close. Each must come back, in order. */
  const char *raw =
      "GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
      "GET /v1/nope HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
      "POST /v1/checkpoint HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n"
      "POST /v1/checkpoint HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " TOKEN
      "\r\nContent-Length: 2\r\n\r\n{}"
      "GET /v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
  resp r;
  REQUIRE(http_raw(port, raw, strlen(raw), &r) == 0, "no answer");
  const char *want[] = {"HTTP/1.1 200", "HTTP/1.1 404", "HTTP/1.1 401", "HTTP/1.1 202",
                        "HTTP/1.1 200"};
  const char *at = r.head;
  CHECK(strncmp(at, want[0], strlen(want[0])) == 0, "first answer: %.40s", at);
  at = r.body;
  for (int i = 1; i < 5; i++) {
    const char *next = at ? strstr(at, "HTTP/1.1 ") : NULL;
    CHECK(next && strncmp(next, want[i], strlen(want[i])) == 0, "answer %d: %.40s", i,
          next ? next : "(missing)");
    at = next ? next + 1 : NULL;
  }
  resp_free(&r);
  return 0;
}

/* A header with a control byte (a bare CR, a NUL...) is 400, naming it, and
 * the connection closes after the answer: nothing after it on the
 * connection is read as a request, and a mutation it carries never runs. */
static int test_control_bytes_in_a_header_are_400_and_close(void) {
  static const struct {
    const char *line;
    size_t len;
  } bad[] = {{"X-Note: a\rb", 11},
             {"X-Note: a\x01"
              "b",
              11},
             {"X-Note: a\x7f", 10},
             {"Authorization: Bearer " TOKEN "\x1b", 35}};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    char raw[512];
    int n = snprintf(raw, sizeof raw, "POST /v1/pause HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    memcpy(raw + n, bad[i].line, bad[i].len);
    n += (int)bad[i].len;
    n += snprintf(raw + n, sizeof raw - (size_t)n,
                  "\r\nAuthorization: Bearer " TOKEN "\r\nContent-Length: 2\r\n\r\n{}"
                  "GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    resp r;
    REQUIRE(http_raw(port, raw, (size_t)n, &r) == 0, "case %zu: no answer", i);
    char conn[64] = "";
    header(&r, "Connection", conn, sizeof conn);
    CHECK(is_problem(&r, 400, "control byte"), "case %zu: %.60s %.200s", i, r.head, r.body);
    CHECK(!strcasecmp(conn, "close"), "case %zu: Connection \"%s\"", i, conn);
    CHECK(!strstr(r.body, "HTTP/1.1"), "case %zu: a second answer followed: %.300s", i, r.body);
    resp_free(&r);
  }
  /* without a body the answer comes after the request, where only the
   * daemon's Connection: close ends the connection */
  const char get[] = "GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Note: a\x01"
                     "b\r\n\r\nGET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
  resp r;
  REQUIRE(http_raw(port, get, sizeof get - 1, &r) == 0, "GET: no answer");
  char conn[64] = "";
  header(&r, "Connection", conn, sizeof conn);
  CHECK(is_problem(&r, 400, "control byte") && !strcasecmp(conn, "close") &&
            !strstr(r.body, "HTTP/1.1"),
        "GET: %.60s, Connection \"%s\", %.300s", r.head, conn, r.body);
  resp_free(&r);
  pthread_mutex_lock(&F.mu);
  CHECK(strcmp(F.state, "running") == 0, "a pause with a control byte reached the provider");
  pthread_mutex_unlock(&F.mu);
  return 0;
}

/* Two Content-Length headers that disagree are 400 and the connection
 * closes: a proxy that framed the body by the other one would pass a
 * second request through (RFC 9112 6.3). The mutation never runs; two
 * equal ones are one length. */
static int test_conflicting_content_lengths_are_400(void) {
  const char raw[] = "POST /v1/pause HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " TOKEN
                     "\r\nContent-Length: 2\r\nContent-Length: 5\r\n\r\n{}xyz";
  resp r;
  REQUIRE(http_raw(port, raw, sizeof raw - 1, &r) == 0, "no answer");
  char conn[64] = "";
  header(&r, "Connection", conn, sizeof conn);
  CHECK(is_problem(&r, 400, "two Content-Length headers that disagree"), "lengths 2 and 5");
  CHECK(!strcasecmp(conn, "close"), "Connection \"%s\"", conn);
  resp_free(&r);
  pthread_mutex_lock(&F.mu);
  CHECK(strcmp(F.state, "running") == 0, "a pause with two lengths reached the provider");
  pthread_mutex_unlock(&F.mu);
  const char same[] = "GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                      "Content-Length: 0\r\nContent-Length: 0\r\n\r\n";
  REQUIRE(http_raw(port, same, sizeof same - 1, &r) == 0, "equal lengths: no answer");
  CHECK(r.status == 200, "two equal lengths: %d %.200s", r.status, r.body);
  resp_free(&r);
  return 0;
}

static int test_unknown_path_is_404_problem(void) {
  const char *paths[] = {"/v1/nope",
                         "/v2/status",
                         "/v1/status/x",
                         "/v1/operations/",
                         "/v1/operations/op-999",
                         "/v1/operations/a%2Fb",
                         "/v1/\xff\xfe%C3"};
  for (size_t i = 0; i < sizeof paths / sizeof paths[0]; i++) {
    resp r;
    REQUIRE(http(port, "GET", paths[i], NULL, NULL, &r) == 0, "GET %s: no answer", paths[i]);
    CHECK(is_problem(&r, 404, NULL), "GET %s", paths[i]);
    if (strstr(paths[i], "op-999")) record("GET", paths[i], &r);
    resp_free(&r);
  }
  return 0;
}

static int test_wrong_method_is_405_with_allow(void) {
  static const struct {
    const char *method, *path, *allow;
  } cases[] = {
      {"POST", "/v1/status", "GET, HEAD"}, {"DELETE", "/v1/operations/op-1", "GET, HEAD"},
      {"GET", "/v1/pause", "POST"},        {"PUT", "/v1/resize", "POST"},
      {"POST", "/", "GET, HEAD"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    resp r;
    REQUIRE(http(port, cases[i].method, cases[i].path, TOKEN, NULL, &r) == 0, "no answer");
    char allow[64] = "";
    header(&r, "Allow", allow, sizeof allow);
    CHECK(is_problem(&r, 405, NULL), "%s %s", cases[i].method, cases[i].path);
    CHECK(strcmp(allow, cases[i].allow) == 0, "%s %s: Allow \"%s\"", cases[i].method, cases[i].path,
          allow);
    resp_free(&r);
  }
  return 0;
}

static int test_mutation_without_or_with_wrong_token_is_401(void) {
  const char *tokens[] = {NULL, "wrong", "s3cret-token-and-more", "s3cret-toke", ""};
  for (size_t i = 0; i < sizeof tokens / sizeof tokens[0]; i++) {
    resp r;
    REQUIRE(http(port, "POST", "/v1/pause", tokens[i], "{}", &r) == 0, "no answer");
    char www[128] = "";
    header(&r, "WWW-Authenticate", www, sizeof www);
    /* a token sent and refused is told apart from none sent (a stale
     * token file reads otherwise as a header that never left) */
    CHECK(is_problem(&r, 401,
                     !tokens[i]    ? "this needs Authorization: Bearer <token>"
                     : !*tokens[i] ? "the token sent is empty"
                                   : "the bearer token sent was not accepted"),
          "token \"%s\"", tokens[i] ? tokens[i] : "(none)");
    record("POST", "/v1/pause", &r);
    CHECK(strcmp(www, "Bearer realm=\"mtnlg\"") == 0, "WWW-Authenticate \"%s\"", www);
    resp_free(&r);
  }
  /* Basic auth with the token as password is not bearer auth. */
  const char *raw = "POST /v1/pause HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                    "Authorization: Basic czNjcmV0LXRva2Vu\r\nContent-Length: 0\r\n\r\n";
  resp r;
  REQUIRE(http_raw(port, raw, strlen(raw), &r) == 0, "no answer");
  CHECK(is_problem(&r, 401, "not another scheme"), "basic auth");
  resp_free(&r);
  pthread_mutex_lock(&F.mu);
  CHECK(strcmp(F.state, "running") == 0, "a refused pause reached the provider");
  pthread_mutex_unlock(&F.mu);
  return 0;
}

/* A daemon on loopback answers only requests that name a loopback host: a
 * web page that rebinds its DNS name to 127.0.0.1 sends that name, and gets
 * a 421 instead of the open reads. */
static int test_foreign_host_is_421_on_loopback(void) {
  static const struct {
    const char *host;
    int status;
  } cases[] = {{"evil.example", 421},
               {"evil.example:8470", 421},
               {"10.0.0.1", 421},
               {"localhost", 200},
               {"LOCALHOST:1", 200},
               {"127.0.0.1:9", 200},
               {"127.1.2.3", 200},
               {"[::1]:8470", 200},
               {"[::2]", 421},
               {"localhost.evil.example", 421},
               {"localhost.:8470", 200},
               {"[::ffff:127.0.0.1]", 200},
               {"[::1]evil.example", 421},
               {"127.0.0.1:80@evil.example", 421},
               {"localhost:", 421}};
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
    char raw[256];
    int n =
        snprintf(raw, sizeof raw,
                 "GET /v1/status HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", cases[i].host);
    resp r;
    REQUIRE(http_raw(port, raw, (size_t)n, &r) == 0, "no answer");
    CHECK(cases[i].status == 421 ? is_problem(&r, 421, "loopback only") : r.status == 200,
          "Host %s: %d, want %d", cases[i].host, r.status, cases[i].status);
    if (r.status == 421) record("GET", "/v1/status", &r);
    resp_free(&r);
  }
  return 0;
}

static int test_bad_bodies_are_400_naming_the_field(void) {
  static const struct {
    const char *path, *body, *needle;
  } cases[] = {
      {"/v1/pause", "{", "malformed JSON"},
      {"/v1/pause", "{\"a\":1,}", "malformed JSON"},
      {"/v1/pause", "[]", "object"},
      {"/v1/pause", "\"x\"", "object"},
      {"/v1/checkpoint", "{\"force\":true}", "\"force\""},
      {"/v1/stop", "{\"dp\":2}", "\"dp\""},
      {"/v1/resize", "", "\"dp\""},
      {"/v1/resize", "{}", "\"dp\""},
      {"/v1/resize", "{\"dp\":0}", "\"dp\""},
      {"/v1/resize", "{\"dp\":-3}", "\"dp\""},
      {"/v1/resize", "{\"dp\":2.0}", "\"dp\""},
      {"/v1/resize", "{\"dp\":\"2\"}", "\"dp\""},
      {"/v1/resize", "{\"dp\":null}", "\"dp\""},
      {"/v1/resize", "{\"dp\":2,\"tp\":2}", "\"tp\""},
      {"/v1/resize", "{\"dp\":2,\"dp\":3}", "malformed JSON"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    resp r;
    REQUIRE(http(port, "POST", cases[i].path, TOKEN, cases[i].body, &r) == 0, "no answer");
    CHECK(is_problem(&r, 400, cases[i].needle), "POST %s %s", cases[i].path, cases[i].body);
    record("POST", cases[i].path, &r);
    resp_free(&r);
  }
  return 0;
}

static int test_bad_since_is_400(void) {
  const char *bad[] = {"=-1", "=abc", "=1.5", "=", "", "=99999999999999999999999", "=5x", "=%FF"};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    char path[128];
    snprintf(path, sizeof path, "/v1/history?since%s", bad[i]);
    resp r;
    REQUIRE(http(port, "GET", path, NULL, NULL, &r) == 0, "no answer");
    CHECK(is_problem(&r, 400, "since"), "since=%s", bad[i]);
    record("GET", path, &r);
    resp_free(&r);
  }
  return 0;
}

static int test_body_over_64k_is_413(void) {
  /* Declared: refused from the headers, before the body is read. */
  size_t big = 70000;
  char *raw = malloc(big + 512);
  int n = snprintf(raw, 512,
                   "POST /v1/pause HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                   "Authorization: Bearer " TOKEN "\r\nContent-Length: %zu\r\n\r\n",
                   big);
  memset(raw + n, ' ', 1000);
  resp r;
  REQUIRE(http_raw(port, raw, (size_t)n + 1000, &r) == 0, "declared 70000: no answer");
  CHECK(is_problem(&r, 413, "65536"), "declared 70000");
  record("POST", "/v1/pause", &r);
  resp_free(&r);
  /* Chunked: no length up front, dropped as it passes the limit. */
  n = snprintf(raw, 512,
               "POST /v1/pause HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
               "Authorization: Bearer " TOKEN "\r\nTransfer-Encoding: chunked\r\n\r\n");
  size_t off = (size_t)n;
  for (int k = 0; k < 7; k++) {
    off += (size_t)sprintf(raw + off, "2710\r\n"); /* 10000 bytes */
    memset(raw + off, ' ', 10000);
    off += 10000;
    off += (size_t)sprintf(raw + off, "\r\n");
  }
  off += (size_t)sprintf(raw + off, "0\r\n\r\n");
  REQUIRE(http_raw(port, raw, off, &r) == 0, "chunked 70000: no answer");
  CHECK(is_problem(&r, 413, "65536"), "chunked 70000");
  resp_free(&r);
  free(raw);
  pthread_mutex_lock(&F.mu);
  CHECK(strcmp(F.state, "running") == 0, "an oversized pause reached the provider");
  pthread_mutex_unlock(&F.mu);
  return 0;
}

static int test_accepted_mutation_is_202_with_location(void) {
  resp r;
  REQUIRE(http(port, "POST", "/v1/pause", TOKEN, NULL, &r) == 0, "no answer");
  char loc[128] = "", ct[64] = "";
  header(&r, "Location", loc, sizeof loc);
  header(&r, "Content-Type", ct, sizeof ct);
  json_t *op = json_loads(r.body, 0, NULL);
  const char *id = json_string_value(json_object_get(op, "id"));
  char want[128];
  snprintf(want, sizeof want, "/v1/operations/%s", id ? id : "?");
  CHECK(r.status == 202, "pause: status %d: %s", r.status, r.body);
  CHECK(strcmp(ct, "application/json") == 0, "pause: Content-Type %s", ct);
  CHECK(id && strcmp(loc, want) == 0, "Location \"%s\", op %s", loc, r.body);
  record("POST", "/v1/pause", &r);
  resp_free(&r);
  /* The Location answers with the same operation. */
  REQUIRE(http(port, "GET", loc, NULL, NULL, &r) == 0, "no answer");
  json_t *again = json_loads(r.body, 0, NULL);
  CHECK(r.status == 200 && json_equal(op, again), "GET %s: %d %s", loc, r.status, r.body);
  record("GET", loc, &r);
  json_decref(again);
  json_decref(op);
  resp_free(&r);
  /* Now paused: resume and {} bodies go through; resize passes dp along. */
  REQUIRE(http(port, "POST", "/v1/resume", TOKEN, "{}", &r) == 0, "no answer");
  CHECK(r.status == 202, "resume when paused: %d %s", r.status, r.body);
  resp_free(&r);
  REQUIRE(http(port, "POST", "/v1/resize", TOKEN, "{\"dp\": 2}", &r) == 0, "no answer");
  CHECK(r.status == 202 && strstr(r.body, "\"args\":{\"dp\":2}"), "resize: %d %s", r.status,
        r.body);
  record("POST", "/v1/resize", &r);
  resp_free(&r);
  REQUIRE(http(port, "POST", "/v1/checkpoint", TOKEN, " { } ", &r) == 0, "no answer");
  CHECK(r.status == 202, "checkpoint: %d %s", r.status, r.body);
  resp_free(&r);
  REQUIRE(http(port, "GET", "/v1/operations", NULL, NULL, &r) == 0, "no answer");
  json_t *ops = json_loads(r.body, 0, NULL);
  CHECK(json_array_size(json_object_get(ops, "operations")) >= 4, "operations: %s", r.body);
  json_decref(ops);
  resp_free(&r);
  return 0;
}

static int test_provider_errors_pass_through(void) {
  resp r;
  REQUIRE(http(port, "POST", "/v1/resume", TOKEN, NULL, &r) == 0, "no answer");
  CHECK(is_problem(&r, 409, "cannot resume: the job is running, not paused"), "resume");
  record("POST", "/v1/resume", &r);
  resp_free(&r);
  REQUIRE(http(port, "POST", "/v1/resize", TOKEN, "{\"dp\":8}", &r) == 0, "no answer");
  CHECK(is_problem(&r, 409, "dp=8"), "resize 8");
  resp_free(&r);
  pthread_mutex_lock(&F.mu);
  F.unreachable = 1;
  pthread_mutex_unlock(&F.mu);
  REQUIRE(http(port, "POST", "/v1/stop", TOKEN, NULL, &r) == 0, "no answer");
  CHECK(is_problem(&r, 503, "coordinator"), "stop while unreachable");
  record("POST", "/v1/stop", &r);
  resp_free(&r);
  pthread_mutex_lock(&F.mu);
  F.unreachable = 0;
  pthread_mutex_unlock(&F.mu);
  return 0;
}

/* POST path with the token and extra header lines ("Name: value\r\n"...). */
static int post_with(int port, const char *path, const char *extra, resp *r) {
  char req[4096];
  int n = snprintf(req, sizeof req,
                   "POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                   "Authorization: Bearer " TOKEN "\r\n%sContent-Length: 0\r\n\r\n",
                   path, extra);
  return http_raw(port, req, (size_t)n, r);
}

/* The provider's count of mutations and the key the last came with. */
static int fake_submits(char *key, size_t cap) {
  pthread_mutex_lock(&F.mu);
  int n = F.submits;
  if (key) snprintf(key, cap, "%s", F.got_key);
  pthread_mutex_unlock(&F.mu);
  return n;
}

/* Idempotency-Key: 1 to 255 printable ASCII characters, once, else 400
 * naming the header and what is wrong, the provider never asked; a good one
 * reaches the provider as sent, and none as none; the provider's replay is
 * 202 with Idempotent-Replayed and the same Location, its 422 a problem. */
static int test_idempotency_key_is_checked_and_passed_on(void) {
  char k255[256], k256[300], line[400];
  memset(k255, 'k', 255), k255[255] = '\0';
  memset(k256, 'k', 256), k256[256] = '\0';
  snprintf(line, sizeof line, "Idempotency-Key: %s\r\n", k256);
  static const char *const bad_needles[] = {"empty", "256 characters, over 255",
                                            "byte 0xc3 at offset 3 is not printable ASCII",
                                            "2 of them"};
  const char *bad[] = {"Idempotency-Key:\r\n", line, "Idempotency-Key: caf\xc3\xa9\r\n",
                       "Idempotency-Key: a\r\nidempotency-key: a\r\n"};
  int before = fake_submits(NULL, 0);
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    resp r;
    REQUIRE(post_with(port, "/v1/checkpoint", bad[i], &r) == 0, "no answer");
    char needle[128];
    snprintf(needle, sizeof needle, "header Idempotency-Key: %s", bad_needles[i]);
    CHECK(is_problem(&r, 400, needle), "bad key %zu", i);
    record("POST", "/v1/checkpoint", &r);
    resp_free(&r);
  }
  CHECK(fake_submits(NULL, 0) == before, "a bad key reached the provider (%d mutations, was %d)",
        fake_submits(NULL, 0), before);

  char got[300], loc[128] = "", loc2[128] = "", replayed[16] = "";
  resp r;
  snprintf(line, sizeof line, "Idempotency-Key: %s\r\n", k255);
  REQUIRE(post_with(port, "/v1/checkpoint", line, &r) == 0, "no answer");
  header(&r, "Location", loc, sizeof loc);
  int first_replayed = header(&r, "Idempotent-Replayed", replayed, sizeof replayed);
  fake_submits(got, sizeof got);
  char echo[300] = "";
  header(&r, "Idempotency-Key", echo, sizeof echo);
  CHECK(r.status == 202 && !strcmp(got, k255) && !first_replayed && !strcmp(echo, k255),
        "a 255-character key: %d, provider got %zu characters, replayed header %d, echoed %zu "
        "characters: %s",
        r.status, strlen(got), first_replayed, strlen(echo), r.body);
  resp_free(&r);
  REQUIRE(post_with(port, "/v1/checkpoint", line, &r) == 0, "no answer");
  header(&r, "Location", loc2, sizeof loc2);
  CHECK(r.status == 202 && header(&r, "Idempotent-Replayed", replayed, sizeof replayed) &&
            !strcmp(replayed, "true") && loc[0] && !strcmp(loc, loc2),
        "the same key again: %d, Idempotent-Replayed \"%s\", Location %s then %s", r.status,
        replayed, loc, loc2);
  record("POST", "/v1/checkpoint", &r);
  resp_free(&r);
  REQUIRE(post_with(port, "/v1/stop", line, &r) == 0, "no answer");
  CHECK(is_problem(&r, 422, "was used for another request (checkpoint {})"),
        "the key with another request");
  echo[0] = '\0';
  CHECK(header(&r, "Idempotency-Key", echo, sizeof echo) && !strcmp(echo, k255) &&
            !header(&r, "Idempotent-Replayed", replayed, sizeof replayed),
        "the 422 echoes the key (%zu characters) and is no replay", strlen(echo));
  char type[128] = "";
  json_t *p = json_loads(r.body, 0, NULL);
  snprintf(type, sizeof type, "%s", json_string_value(json_object_get(p, "type")) ?: "");
  json_decref(p);
  CHECK(!strcmp(type, "https://mtnlg.dev/problems/idempotency-key-reused"), "422 type %s", type);
  record("POST", "/v1/stop", &r);
  resp_free(&r);
  REQUIRE(post_with(port, "/v1/checkpoint", "", &r) == 0, "no answer");
  fake_submits(got, sizeof got);
  CHECK(r.status == 202 && !got[0] && !header(&r, "Idempotent-Replayed", replayed, 16) &&
            !header(&r, "Idempotency-Key", echo, sizeof echo),
        "no key: %d, provider got \"%s\"", r.status, got);
  resp_free(&r);
  /* a refusal repeated for a retry says so too, and echoes the key */
  REQUIRE(post_with(port, "/v1/resume", "Idempotency-Key: refused-1\r\n", &r) == 0, "no answer");
  echo[0] = replayed[0] = '\0';
  header(&r, "Idempotency-Key", echo, sizeof echo);
  CHECK(is_problem(&r, 409, "as before") &&
            header(&r, "Idempotent-Replayed", replayed, sizeof replayed) &&
            !strcmp(replayed, "true") && !strcmp(echo, "refused-1"),
        "a replayed refusal: Idempotent-Replayed \"%s\", Idempotency-Key \"%s\"", replayed, echo);
  record("POST", "/v1/resume", &r);
  resp_free(&r);
  /* the coordinator out of reach: the 503 echoes the key (mtnlgctl resends
   * only to a daemon that honours it) */
  pthread_mutex_lock(&F.mu);
  F.unreachable = 1;
  pthread_mutex_unlock(&F.mu);
  REQUIRE(post_with(port, "/v1/checkpoint", "Idempotency-Key: k503\r\n", &r) == 0, "no answer");
  pthread_mutex_lock(&F.mu);
  F.unreachable = 0;
  pthread_mutex_unlock(&F.mu);
  echo[0] = '\0';
  header(&r, "Idempotency-Key", echo, sizeof echo);
  CHECK(is_problem(&r, 503, "coordinator") && !strcmp(echo, "k503"), "a 503 echoes \"%s\"", echo);
  record("POST", "/v1/checkpoint", &r);
  resp_free(&r);
  return 0;
}

/* Answered within budget_s, measured from the call. */
static int quick_status_200(double budget_s) {
  double t0 = now_s();
  resp r;
  if (http(port, "GET", "/v1/status", NULL, NULL, &r) != 0) return 0;
  int ok = r.status == 200 && now_s() - t0 < budget_s;
  resp_free(&r);
  return ok;
}

static int test_stalled_and_half_closed_clients_do_not_block_others(void) {
  /* Half a request line, half the headers, half a body: then silence. */
  const char *partial[] = {
      "GET /v1/sta",
      "GET /v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\n",
      "POST /v1/pause HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " TOKEN
      "\r\nContent-Length: 100\r\n\r\n{\"a\"",
  };
  int fds[3], half = -1;
  for (int i = 0; i < 3; i++) {
    fds[i] = dial(port);
    REQUIRE(fds[i] >= 0, "dial");
    REQUIRE(send(fds[i], partial[i], strlen(partial[i]), MSG_NOSIGNAL) > 0, "send");
  }
  /* And one that closes its sending side mid-request. */
  half = dial(port);
  REQUIRE(half >= 0, "dial");
  send(half, partial[1], strlen(partial[1]), MSG_NOSIGNAL);
  shutdown(half, SHUT_WR);
  for (int k = 0; k < 20; k++) CHECK(quick_status_200(2.0), "request %d behind stalled clients", k);
  /* The half-closed one is dropped without an answer that pretends success. */
  resp r;
  if (read_resp(half, &r) == 0) {
    CHECK(r.status >= 400, "half-closed request answered %d", r.status);
    resp_free(&r);
  }
  close(half);
  /* The server was started with timeout_s = 3: the stalled ones get closed. */
  double t0 = now_s();
  for (int i = 0; i < 3; i++) {
    char b[512];
    ssize_t n;
    while ((n = recv(fds[i], b, sizeof b, 0)) > 0) {
    }
    CHECK(n == 0 || errno == ECONNRESET, "stalled client %d: recv %zd (%s)", i, n, strerror(errno));
    close(fds[i]);
  }
  CHECK(now_s() - t0 < 6.0, "stalled clients held for %.1f s", now_s() - t0);
  return 0;
}

/* Reads one whole answer (headers, then Content-Length bytes) from a
 * kept-alive connection into buf: its status, or -1 (closed, or nothing
 * whole within timeout_ms). */
static int read_answer(int fd, char *buf, size_t cap, int timeout_ms) {
  size_t len = 0;
  double until = now_s() + timeout_ms / 1000.0;
  for (;;) {
    buf[len] = '\0';
    char *end = strstr(buf, "\r\n\r\n");
    const char *cl = end ? strcasestr(buf, "\r\nContent-Length:") : NULL;
    int status = 0;
    if (end && cl && cl < end && sscanf(buf, "HTTP/1.1 %d", &status) == 1 &&
        len >= (size_t)(end + 4 - buf) + strtoul(cl + 17, NULL, 10))
      return status;
    int left = (int)((until - now_s()) * 1000);
    struct pollfd p = {.fd = fd, .events = POLLIN};
    if (left <= 0 || len + 1 >= cap || poll(&p, 1, left) != 1) return -1;
    ssize_t n = recv(fd, buf + len, cap - 1 - len, 0);
    if (n <= 0) return -1;
    len += (size_t)n;
  }
}

/* A client that trickles a request a byte at a time never goes idle, so
 * only the whole-request deadline (request_timeout_s = 5) closes it; one
 * that sends whole requests on a kept-alive connection restarts the clock
 * with each and stays open past it. */
static int test_trickled_request_is_cut_at_the_request_deadline(void) {
  const char *req = "GET /v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: ";
  const char *one = "GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
  int slow = dial(port), kept = dial(port);
  REQUIRE(slow >= 0 && kept >= 0, "dial");
  double t0 = now_s(), cut = 0;
  size_t i = 0;
  int answered = 0;
  char b[4096];
  while (now_s() - t0 < 12 && !cut) {
    if (send(slow, i < strlen(req) ? req + i : "p", 1, MSG_NOSIGNAL) <= 0) cut = now_s() - t0;
    i++;
    if (i % 2 == 0) /* every second: a whole request on the kept connection */
      answered += send(kept, one, strlen(one), MSG_NOSIGNAL) > 0 &&
                  read_answer(kept, b, sizeof b, 2000) == 200;
    struct pollfd ps = {.fd = slow, .events = POLLIN};
    if (!cut && poll(&ps, 1, 500) == 1 && recv(slow, b, sizeof b, 0) <= 0) cut = now_s() - t0;
  }
  CHECK(cut >= 4.5 && cut < 9.0,
        "the trickling client was cut after %.1f s (deadline 5 s, idle 3 s)", cut);
  CHECK(answered >= 3, "the kept-alive connection answered %d requests before the cut", answered);
  /* the kept connection's clock restarted with each request: still served */
  REQUIRE(send(kept, one, strlen(one), MSG_NOSIGNAL) > 0, "send on the kept connection");
  int st = read_answer(kept, b, sizeof b, 3000);
  CHECK(st == 200, "the kept-alive connection was cut too (%d)", st);
  resp r;
  REQUIRE(http(port, "GET", "/v1/metrics", NULL, NULL, &r) == 0, "metrics: no answer");
  const char *m = strstr(r.body, "\nmtnlg_http_connections_cut_total ");
  CHECK(m && atof(m + 34) >= 1, "/v1/metrics does not count the cut: %.80s", m ? m : "(absent)");
  resp_free(&r);
  close(slow);
  close(kept);
  return 0;
}

static int test_connection_limit_holds_the_excess_until_a_slot_frees(void) {
  /* max_connections is 16: with 16 idle sockets held, a 17th request waits
   * in the listen backlog instead of growing the server; it is answered as
   * soon as the idle ones go (well before their 3 s timeout would). */
  int fds[16];
  for (int i = 0; i < 16; i++) {
    fds[i] = dial(port);
    REQUIRE(fds[i] >= 0, "dial %d", i);
  }
  usleep(100 * 1000); /* let the server accept them all */
  int extra = dial(port);
  REQUIRE(extra >= 0, "dial 17");
  const char *get = "GET /v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
  REQUIRE(send(extra, get, strlen(get), MSG_NOSIGNAL) > 0, "send");
  struct pollfd pfd = {.fd = extra, .events = POLLIN};
  CHECK(poll(&pfd, 1, 300) == 0, "a 17th connection was served past max_connections = 16");
  double t0 = now_s();
  for (int i = 0; i < 16; i++) close(fds[i]);
  resp r;
  CHECK(read_resp(extra, &r) == 0 && r.status == 200, "the waiting request was not served");
  CHECK(now_s() - t0 < 1.5, "the waiting request took %.2f s after the slots freed", now_s() - t0);
  if (r.body) resp_free(&r);
  close(extra);
  CHECK(quick_status_200(2.0), "server stuck after a connection flood");
  return 0;
}

/* Pipes text into `promtool check metrics`; -1 when promtool is absent. */
static int promtool_check(const char *text) {
  const char *tool = "/usr/bin/promtool";
  if (access(tool, X_OK) != 0) return -1;
  char cmd[256];
  snprintf(cmd, sizeof cmd, "%s check metrics 1>&2", tool);
  FILE *p = popen(cmd, "w");
  if (!p) return -1;
  fputs(text, p);
  int st = pclose(p);
  return st == 0 ? 0 : 1;
}

static int test_metrics_pass_promtool_and_count_requests(void) {
  resp r;
  REQUIRE(http(port, "GET", "/v1/metrics", NULL, NULL, &r) == 0, "no answer");
  REQUIRE(r.status == 200, "metrics: %d", r.status);
  static const char *const want[] = {
      "# TYPE mtnlg_state gauge\n",
      "mtnlg_state{state=\"running\"} 1\n",
      "mtnlg_state{state=\"paused\"} 0\n",
      "mtnlg_generation 2\n",
      "# TYPE mtnlg_restarts_total counter\n",
      "mtnlg_restarts_total 1\n",
      "mtnlg_step 12\n",
      "# TYPE mtnlg_consumed_tokens gauge\n",
      "mtnlg_consumed_tokens 12288\n",
      "mtnlg_step_global_batch 8\n",
      "mtnlg_loss 3.21\n",
      "# TYPE mtnlg_test_loss gauge\n",
      "mtnlg_test_loss 3.5\n",
      "mtnlg_learning_rate 0.001\n",
      "mtnlg_grad_norm 0.8\n",
      "mtnlg_tokens_per_second 2830\n",
      "# TYPE mtnlg_skipped_steps gauge\n",
      "mtnlg_skipped_steps 0\n",
      "mtnlg_exit_time_seconds 1700003600\n",
      "mtnlg_exit_step 5000\n",
      "mtnlg_operations_pending 0\n",
      "# TYPE mtnlg_loss_scale gauge\n",
      "mtnlg_loss_scale 65536\n",
      "mtnlg_step_time_seconds{phase=\"total\"} 0.0453\n",
      "mtnlg_step_time_seconds{phase=\"comm\"} 0.0032\n",
      "mtnlg_step_timer_min_seconds{timer=\"forward-backward\"} 0.0405\n",
      "mtnlg_step_timer_max_seconds{timer=\"forward-backward\"} 0.04125\n",
      "mtnlg_step_timer_max_seconds{timer=\"optimizer-inner-step\"} 0.00075\n",
      "mtnlg_checkpoint_last_step 10\n",
      "mtnlg_checkpoint_last_bytes 12345\n",
      "mtnlg_device_flops_per_second{node=\"n0\",device=\"cpu:0\",rank=\"0\",stage=\"0\","
      "replica=\"0\"} 210000000000\n",
      "mtnlg_device_mfu_ratio{node=\"n0\",",
      "mtnlg_node_info{node=\"n0\",host=\"127.0.0.1\",role=\"coordinator\",state=\"running\"} 1\n",
      "mtnlg_node_heartbeat_age_seconds{node=\"n0\"} 0.4\n",
      "mtnlg_node_memory_bytes{node=\"n0\"} 123456789\n",
      "node=\"n1\\\\x\\\"y\\nz\"", /* n1\x"y<newline>z, escaped */
      "mtnlg_job_info{name=\"tiny \\\"demo\\\"\",hash=\"abc123\"} 1\n",
      "mtnlg_store_keys 120\n",
      "mtnlg_store_bytes 40960\n",
      "mtnlg_store_max_bytes 17179869184\n",
      "mtnlg_store_transient_bytes 131072\n",
      "mtnlg_store_max_transient_bytes 4294967296\n",
      "mtnlg_store_clients 2\n",
      "mtnlg_store_max_clients 65536\n",
      "mtnlg_store_waiters 3\n",
      "# TYPE mtnlg_store_refused_clients_total counter\n",
      "mtnlg_store_refused_clients_total 1\n",
      "# TYPE mtnlg_store_dropped_clients_total counter\n",
      "mtnlg_store_dropped_clients_total 4\n",
      "# TYPE mtnlg_http_requests_total counter\n",
      "mtnlg_http_requests_total{code=\"200\"} ",
      "mtnlg_http_requests_total{code=\"404\"} ",
      "mtnlg_http_requests_total{code=\"413\"} 2\n",
      "# TYPE mtnlg_tensorboard_dropped_steps_total counter\n",
      "mtnlg_tensorboard_dropped_steps_total 7\n",
      "mtnlg_evaluating 1\n",
      "mtnlg_evaluation_batches_done{split=\"valid\"} 40\n",
      "mtnlg_evaluation_batches{split=\"valid\"} 100\n",
  };
  for (size_t i = 0; i < sizeof want / sizeof want[0]; i++)
    CHECK(strstr(r.body, want[i]), "metrics lack %s", want[i]);
  /* Null values are left out: n1's mfu, heartbeat, memory; val_loss. */
  CHECK(!strstr(r.body, "mtnlg_validation_loss"), "a null val_loss was rendered");
  CHECK(!strstr(r.body, "mtnlg_node_memory_bytes{node=\"n1"), "a null memory was rendered");
  CHECK(!strstr(r.body, "mtnlg_device_mfu_ratio{node=\"n1"), "a null mfu was rendered");
  int rc = promtool_check(r.body);
  if (rc < 0) printf("  promtool not found: skipped the promtool check\n");
  CHECK(rc <= 0, "promtool check metrics refused:\n%s", r.body);
  resp_free(&r);
  /* Without a status or a server, still valid text. */
  char *text = mt_control_metrics_text(NULL, NULL);
  CHECK(text && text[0] == '\0', "no status, no server: \"%s\"", text ? text : "(null)");
  free(text);
  json_t *partial =
      json_pack("{s:s,s:n,s:n,s:[],s:[]}", "state", "forming", "job", "loss", "devices", "nodes");
  text = mt_control_metrics_text(NULL, partial);
  CHECK(text && strstr(text, "mtnlg_state{state=\"forming\"} 1") && !strstr(text, "mtnlg_loss") &&
            !strstr(text, "mtnlg_job_info") && strstr(text, "mtnlg_evaluating 0\n") &&
            !strstr(text, "mtnlg_evaluation_batches"),
        "forming status: %s", text ? text : "(null)");
  if (text && promtool_check(text) > 0) CHECK(0, "promtool refused the forming status: %s", text);
  free(text);
  json_decref(partial);
  return 0;
}

static int test_reads_need_token_when_asked(void) {
  mt_control_opts o = fake_opts();
  o.reads_need_token = 1;
  mt_control *c;
  REQUIRE(mt_control_start(&o, &c) == 0, "start: %s", mt_errmsg());
  int p = mt_control_port(c);
  resp r;
  REQUIRE(http(p, "GET", "/v1/status", NULL, NULL, &r) == 0, "no answer");
  CHECK(is_problem(&r, 401, NULL), "status without token");
  resp_free(&r);
  REQUIRE(http(p, "GET", "/v1/metrics", "nope", NULL, &r) == 0, "no answer");
  CHECK(is_problem(&r, 401, NULL), "metrics with a wrong token");
  resp_free(&r);
  REQUIRE(http(p, "GET", "/v1/status", TOKEN, NULL, &r) == 0, "no answer");
  CHECK(r.status == 200, "status with token: %d", r.status);
  resp_free(&r);
  REQUIRE(http(p, "GET", "/v1/health", NULL, NULL, &r) == 0, "no answer");
  CHECK(r.status == 200, "health stays open: %d", r.status);
  resp_free(&r);
  mt_control_stop(c);
  return 0;
}

/* A token as long as mtnlgctl reads (MT_CONTROL_TOKEN_MAX bytes, what
 * `openssl rand -hex 2048` makes) is accepted whole, not cut short. */
static int test_a_token_of_the_longest_length_is_accepted(void) {
  static char tok[MT_CONTROL_TOKEN_MAX + 1], req[MT_CONTROL_TOKEN_MAX + 256];
  for (int i = 0; i < MT_CONTROL_TOKEN_MAX; i++) tok[i] = "0123456789abcdef"[(i * 7 + 3) % 16];
  mt_control_opts o = fake_opts();
  o.token = tok;
  mt_control *c;
  REQUIRE(mt_control_start(&o, &c) == 0, "start: %s", mt_errmsg());
  int p = mt_control_port(c);
  static const char *const what[] = {"", ", last byte changed", " and one byte more"};
  for (int variant = 0; variant < 3; variant++) {
    /* 1: the same token with its last byte changed; 2: the token followed
     * by one more byte (a comparison of only as much as fits would pass) */
    int n = snprintf(req, sizeof req,
                     "POST /v1/pause HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                     "Authorization: Bearer %.*s%s%s\r\nContent-Length: 2\r\n\r\n{}",
                     MT_CONTROL_TOKEN_MAX - 1, tok,
                     variant == 1 ? "x" : tok + MT_CONTROL_TOKEN_MAX - 1, variant == 2 ? "x" : "");
    resp r;
    REQUIRE(http_raw(p, req, (size_t)n, &r) == 0, "no answer");
    CHECK(variant ? r.status == 401 : r.status == 202, "%d-byte token%s: %d", MT_CONTROL_TOKEN_MAX,
          what[variant], r.status);
    resp_free(&r);
  }
  mt_control_stop(c);
  return 0;
}

static int test_no_token_configured_refuses_every_mutation(void) {
  mt_control_opts o = fake_opts();
  o.token = NULL;
  mt_control *c;
  REQUIRE(mt_control_start(&o, &c) == 0, "start: %s", mt_errmsg());
  int p = mt_control_port(c);
  const char *tokens[] = {NULL, "", "x"};
  for (int i = 0; i < 3; i++) {
    resp r;
    REQUIRE(http(p, "POST", "/v1/checkpoint", tokens[i], NULL, &r) == 0, "no answer");
    CHECK(is_problem(&r, 401, "no control token"), "token %d", i);
    resp_free(&r);
  }
  resp r;
  REQUIRE(http(p, "GET", "/v1/health", NULL, NULL, &r) == 0, "no answer");
  CHECK(r.status == 200 && strstr(r.body, "\"mutations\":false"),
        "health without a token says mutations are off: %s", r.body);
  resp_free(&r);
  mt_control_stop(c);
  return 0;
}

static int test_start_names_a_bad_or_busy_address(void) {
  mt_control_opts o = fake_opts();
  mt_control *c = NULL;
  const char *bad[] = {"127.0.0.1", "127.0.0.1:99999", "127.0.0.1:x", "no.such.host.invalid:80"};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    o.listen = bad[i];
    CHECK(mt_control_start(&o, &c) == MT_EINVAL && !c, "listen %s accepted", bad[i]);
    CHECK(strstr(mt_errmsg(), bad[i]), "listen %s: message \"%s\"", bad[i], mt_errmsg());
  }
  char busy[64];
  snprintf(busy, sizeof busy, "127.0.0.1:%d", port);
  o.listen = busy;
  CHECK(mt_control_start(&o, &c) < 0 && !c, "a second server on a busy port");
  CHECK(strstr(mt_errmsg(), busy), "busy: message \"%s\"", mt_errmsg());
  mt_control_stop(c);
  o.listen = "[::1]:0";
  if (mt_control_start(&o, &c) == 0) { /* IPv6 loopback, where the host has it */
    CHECK(mt_control_port(c) > 0, "v6 port");
    mt_control_stop(c);
  }
  mt_control_stop(NULL);
  return 0;
}

/* Every answer recorded above, through tests/common/openapi_check.py against
 * proto/control-v1.yaml (skipped without python3). */
static int test_answers_conform_to_openapi(void) {
#if defined(MT_PYTHON) && defined(MT_OPENAPI_CHECK) && defined(MT_OPENAPI_SPEC)
  if (access(MT_PYTHON, X_OK) != 0) {
    printf("  %s not found: skipped the OpenAPI check\n", MT_PYTHON);
    return 0;
  }
  char cmd[2048];
  snprintf(cmd, sizeof cmd, "'%s' '%s' '%s' --batch '%s' 1>&2", MT_PYTHON, MT_OPENAPI_CHECK,
           MT_OPENAPI_SPEC, tmp_path("answers.jsonl"));
  REQUIRE(system(cmd) == 0, "answers do not conform to %s", MT_OPENAPI_SPEC);
#else
  printf("  built without the checker's paths: skipped the OpenAPI check\n");
#endif
  return 0;
}

#define TEST(fn)                                                                                   \
  { #fn, fn }
static const struct {
  const char *name;
  int (*fn)(void);
} tests[] = {
    TEST(test_every_read_is_200_with_its_content_type),
    TEST(test_keep_alive_serves_several_requests_per_connection),
    TEST(test_control_bytes_in_a_header_are_400_and_close),
    TEST(test_unknown_path_is_404_problem),
    TEST(test_wrong_method_is_405_with_allow),
    TEST(test_mutation_without_or_with_wrong_token_is_401),
    TEST(test_conflicting_content_lengths_are_400),
    TEST(test_foreign_host_is_421_on_loopback),
    TEST(test_bad_bodies_are_400_naming_the_field),
    TEST(test_bad_since_is_400),
    TEST(test_body_over_64k_is_413),
    TEST(test_accepted_mutation_is_202_with_location),
    TEST(test_provider_errors_pass_through),
    TEST(test_idempotency_key_is_checked_and_passed_on),
    TEST(test_stalled_and_half_closed_clients_do_not_block_others),
    TEST(test_connection_limit_holds_the_excess_until_a_slot_frees),
    TEST(test_trickled_request_is_cut_at_the_request_deadline),
    TEST(test_metrics_pass_promtool_and_count_requests),
    TEST(test_reads_need_token_when_asked),
    TEST(test_no_token_configured_refuses_every_mutation),
    TEST(test_a_token_of_the_longest_length_is_accepted),
    TEST(test_start_names_a_bad_or_busy_address),
    TEST(test_answers_conform_to_openapi),
};

int main(void) {
  mt_log_set_level(getenv("MT_TEST_VERBOSE") ? MT_LOG_DEBUG : MT_LOG_ERROR);
  snprintf(tmpdir, sizeof tmpdir, "/tmp/mt_test_control.XXXXXX");
  if (!mkdtemp(tmpdir)) {
    perror("mkdtemp");
    return 2;
  }
  F.ops = json_array();
  mt_control_opts o = fake_opts();
  o.timeout_s = 3; /* idle: the stalled-client tests wait it out */
  o.request_timeout_s = 5;
  o.max_connections = 16;
  if (mt_control_start(&o, &srv) != 0) {
    fprintf(stderr, "mt_control_start: %s\n", mt_errmsg());
    return 1;
  }
  port = mt_control_port(srv);
  for (size_t i = 0; i < sizeof tests / sizeof tests[0]; i++) {
    int before = failures;
    int rc = tests[i].fn();
    printf("%s %s\n", rc || failures != before ? "FAIL" : "ok  ", tests[i].name);
    failures += rc != 0;
  }
  mt_control_stop(srv);
  json_decref(F.ops);
  json_decref(F.key_op);
  char cmd[128];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
  if (system(cmd)) fprintf(stderr, "could not remove %s\n", tmpdir);
  printf("%d failed of %zu\n", failures, sizeof tests / sizeof tests[0]);
  return failures ? 1 : 0;
}
