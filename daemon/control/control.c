/* control.c — the control plane's HTTP server: routing, auth, body limits,
 * field checks and problem+json errors on libmicrohttpd's own thread. */
#include "control.h"

#include "control_priv.h"
#include "err.h"
#include "log.h"
#include "monotime.h"
#include "mt_config.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <malloc.h>
#include <microhttpd.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>

#define MAX_BODY_BYTES 65536
#define DEFAULT_TIMEOUT_S 10
#define DEFAULT_MAX_CONNS 128
#define DEFAULT_REQUEST_TIMEOUT_S 30
#define NCODES 600

/* The dashboard page, generated from dashboard.html by embed.py. */
extern const unsigned char mt_control_dashboard_html[];
extern const size_t mt_control_dashboard_html_len;

struct mt_control {
  struct MHD_Daemon *mhd;
  mt_control_provider p;
  char *token; /* NULL: mutations refused */
  int reads_need_token;
  int port;
  int loopback; /* listens on a loopback address: Host must name one (DNS rebinding) */
  char listen[300];
  char last_log[256];           /* MHD's last complaint, for start errors */
  unsigned long counts[NCODES]; /* answers by status code, atomics */
  /* The whole-request deadline: libmicrohttpd's timeout is an idle one, so
   * a client sending a byte every few seconds would hold its connection
   * for ever. Each connection's clock starts when it opens and again when
   * a request on it completes; the reaper shuts down a socket whose clock
   * passed request_timeout_s, and libmicrohttpd closes it. */
  unsigned request_timeout_s;
  pthread_mutex_t conns_mu;
  pthread_cond_t reaper_cv;
  struct conn_clock *conns; /* open connections, under conns_mu */
  int reaper_started, reaper_stop;
  pthread_t reaper;
  unsigned long cut; /* connections the deadline shut: atomics */
};

typedef struct conn_clock {
  int fd;
  int cut;      /* shut down already */
  double since; /* monotonic seconds: opened, or its last request completed */
  struct conn_clock *prev, *next;
} conn_clock;

enum { M_GET = 1, M_POST = 2 };

enum {
  R_ROOT,
  R_HEALTH,
  R_STATUS,
  R_METRICS,
  R_HISTORY,
  R_CHECKPOINTS,
  R_OPERATIONS,
  R_OPERATION, /* /v1/operations/{id} */
  R_MUTATION,  /* /v1/{pause,resume,stop,checkpoint,resize} */
};

typedef struct route {
  const char *path;
  int id;
  int methods;
} route;

static const route routes[] = {
    {"/", R_ROOT, M_GET},
    {"/v1/health", R_HEALTH, M_GET},
    {"/v1/status", R_STATUS, M_GET},
    {"/v1/metrics", R_METRICS, M_GET},
    {"/v1/history", R_HISTORY, M_GET},
    {"/v1/checkpoints", R_CHECKPOINTS, M_GET},
    {"/v1/operations", R_OPERATIONS, M_GET},
    {"/v1/pause", R_MUTATION, M_POST},
    {"/v1/resume", R_MUTATION, M_POST},
    {"/v1/stop", R_MUTATION, M_POST},
    {"/v1/checkpoint", R_MUTATION, M_POST},
    {"/v1/resize", R_MUTATION, M_POST},
};

/* One request's state across the access handler's calls. */
typedef struct req {
  const route *r;
  const char *kind; /* the mutation's last path segment */
  int checked;      /* check() ran: route, method and token are fine */
  int answered;     /* a response is queued: swallow what follows */
  int too_large;    /* the body passed MAX_BODY_BYTES: dropped, 413 at the end */
  int big_answer;   /* over BIG_ANSWER_BYTES: give the heap back when done */
  char *body;
  size_t len, cap;
} req;

/* ------------------------------------------------------------------ answers */

/* An answer this large (a full /v1/history is a few MB) leaves the HTTP
 * thread's malloc arena holding that much after it is sent, and answers
 * growing over weeks grew it (and the RSS) step by step: trimmed after. */
#define BIG_ANSWER_BYTES (1u << 20)

static const char *reason_phrase(int status) {
  switch (status) {
  case 200: return "OK";
  case 202: return "Accepted";
  case 400: return "Bad Request";
  case 401: return "Unauthorized";
  case 403: return "Forbidden";
  case 404: return "Not Found";
  case 405: return "Method Not Allowed";
  case 409: return "Conflict";
  case 413: return "Content Too Large";
  case 421: return "Misdirected Request";
  case 422: return "Unprocessable Content";
  case 500: return "Internal Server Error";
  case 501: return "Not Implemented";
  case 503: return "Service Unavailable";
  default: return "Error";
  }
}

/* problem "type": a stable slug a client can switch on, about:blank else. */
static const char *problem_type(int status) {
  switch (status) {
  case 400: return "https://mtnlg.dev/problems/bad-request";
  case 401: return "https://mtnlg.dev/problems/unauthorized";
  case 404: return "https://mtnlg.dev/problems/not-found";
  case 405: return "https://mtnlg.dev/problems/method-not-allowed";
  case 409: return "https://mtnlg.dev/problems/conflict";
  case 413: return "https://mtnlg.dev/problems/body-too-large";
  case 421: return "https://mtnlg.dev/problems/misdirected";
  case 422: return "https://mtnlg.dev/problems/idempotency-key-reused";
  case 503: return "https://mtnlg.dev/problems/unavailable";
  default: return "about:blank";
  }
}

static void count_status(mt_control *c, int status) {
  if (status >= 100 && status < NCODES) __atomic_fetch_add(&c->counts[status], 1, __ATOMIC_RELAXED);
}

unsigned long mt__control_count(const mt_control *c, int status) {
  if (!c || status < 100 || status >= NCODES) return 0;
  return __atomic_load_n(&c->counts[status], __ATOMIC_RELAXED);
}

unsigned long mt__control_cut(const mt_control *c) {
  return c ? __atomic_load_n(&c->cut, __ATOMIC_RELAXED) : 0;
}

/* Queues one response with the headers every API answer carries; frees body
 * (malloc'd) unless it is the static dashboard. extra: "Name: value" pairs,
 * NULL-terminated. Counts the status for /v1/metrics. */
static enum MHD_Result answer(struct MHD_Connection *conn, mt_control *c, req *q, int status,
                              const char *type, char *body, size_t len, int is_static,
                              const char *const *extra) {
  struct MHD_Response *resp =
      is_static ? MHD_create_response_from_buffer(len, body, MHD_RESPMEM_PERSISTENT)
                : MHD_create_response_from_buffer(len, body, MHD_RESPMEM_MUST_COPY);
  if (!is_static) free(body);
  if (!resp) return MHD_NO;
  MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, type);
  MHD_add_response_header(resp, "X-Content-Type-Options", "nosniff");
  if (is_static) {
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
    MHD_add_response_header(resp, "Content-Security-Policy",
                            "default-src 'none'; script-src 'unsafe-inline'; "
                            "style-src 'unsafe-inline'; connect-src 'self'; img-src data:; "
                            "frame-ancestors 'none'; base-uri 'none'; form-action 'none'");
  } else {
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
  }
  for (; extra && extra[0]; extra += 2) MHD_add_response_header(resp, extra[0], extra[1]);
  enum MHD_Result ret = MHD_queue_response(conn, (unsigned)status, resp);
  MHD_destroy_response(resp);
  if (ret == MHD_YES) {
    count_status(c, status);
    if (q) q->answered = 1, q->big_answer = !is_static && len > BIG_ANSWER_BYTES;
  }
  return ret;
}

/* Answers a JSON value (stolen reference) as content type ctype. */
static enum MHD_Result answer_value(struct MHD_Connection *conn, mt_control *c, req *q, int status,
                                    const char *ctype, json_t *v, const char *const *extra) {
  char *text = json_dumps(v, JSON_COMPACT);
  json_decref(v);
  if (!text) return MHD_NO;
  size_t len = strlen(text);
  /* json_dumps allocates with jansson's allocator: hand MHD our own copy. */
  char *body = malloc(len + 1);
  if (body) memcpy(body, text, len + 1);
  free(text);
  if (!body) return MHD_NO;
  return answer(conn, c, q, status, ctype, body, len, 0, extra);
}

static enum MHD_Result answer_json(struct MHD_Connection *conn, mt_control *c, req *q, int status,
                                   json_t *v, const char *const *extra) {
  return answer_value(conn, c, q, status, "application/json", v, extra);
}

/* Answers application/problem+json; detail is printf-style. */
static enum MHD_Result problem(struct MHD_Connection *conn, mt_control *c, req *q, int status,
                               const char *const *extra, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));
static enum MHD_Result problem(struct MHD_Connection *conn, mt_control *c, req *q, int status,
                               const char *const *extra, const char *fmt, ...) {
  char detail[768];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(detail, sizeof detail, fmt, ap);
  va_end(ap);
  /* A detail may echo a client's bytes (a path, a field name) or be cut
   * mid-character: JSON wants UTF-8, so anything else becomes '?'. */
  json_t *d = json_string(detail);
  if (!d) {
    for (char *s = detail; *s; s++)
      if ((unsigned char)*s >= 0x80) *s = '?';
    d = json_string(detail);
  }
  json_t *p = json_pack("{s:s,s:s,s:i,s:o}", "type", problem_type(status), "title",
                        reason_phrase(status), "status", status, "detail", d);
  if (!p) return MHD_NO;
  return answer_value(conn, c, q, status, "application/problem+json", p, extra);
}

/* -------------------------------------------------------------------- auth */

/* Equal without an early exit: the time depends on the presented length
 * only, never on how much of the secret matched. */
static int token_equal(const char *want, const char *got) {
  size_t n = strlen(want), m = strlen(got);
  volatile unsigned char d = (unsigned char)(n != m);
  for (size_t i = 0; i < m; i++) d |= (unsigned char)(got[i] ^ want[i % n]);
  return d == 0;
}

/* 1 when the request carries "Authorization: Bearer <our token>". */
static int authorized(mt_control *c, struct MHD_Connection *conn) {
  if (!c->token) return 0;
  const char *h = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION);
  if (!h) return 0;
  while (*h == ' ') h++;
  if (strncasecmp(h, "Bearer ", 7) != 0) return 0;
  h += 7;
  while (*h == ' ') h++;
  char got[MT_CONTROL_TOKEN_MAX + 1];
  size_t n = strlen(h);
  while (n > 0 && (h[n - 1] == ' ' || h[n - 1] == '\t')) n--;
  if (n == 0 || n >= sizeof got) return 0;
  memcpy(got, h, n);
  got[n] = '\0';
  return token_equal(c->token, got);
}

static const char *const unauthorized_hdr[] = {"WWW-Authenticate", "Bearer realm=\"mtnlg\"", NULL};

/* ------------------------------------------------------------------- reads */

/* Parses a non-negative decimal integer that fits int64; -1 if it is not one. */
static int64_t parse_since(const char *s) {
  if (!*s) return -1;
  int64_t v = 0;
  for (; *s; s++) {
    if (*s < '0' || *s > '9') return -1;
    if (v > (INT64_MAX - (*s - '0')) / 10) return -1;
    v = v * 10 + (*s - '0');
  }
  return v;
}

/* GET /v1/health: liveness plus who and where, from the status snapshot. */
static enum MHD_Result get_health(struct MHD_Connection *conn, mt_control *c, req *q) {
  json_t *st = c->p.status ? c->p.status(c->p.arg) : NULL;
  if (!st) return problem(conn, c, q, 503, NULL, "the daemon has no status to report yet");
  json_t *h = json_object(), *v;
  json_object_set_new(h, "status", json_string("ok"));
  v = json_object_get(st, "node");
  json_object_set(h, "node", v ? v : json_null());
  v = json_object_get(st, "state");
  json_object_set(h, "state", v ? v : json_null());
  v = json_object_get(st, "version");
  json_object_set_new(h, "version",
                      json_string(json_is_string(v) ? json_string_value(v) : MT_VERSION));
  json_decref(st);
  /* whether a token can make a mutation here: a page or a script can say
   * why its buttons do nothing instead of asking for a token in vain */
  json_object_set_new(h, "mutations", json_boolean(c->token != NULL));
  /* a mutation's Idempotency-Key is honoured here (an older daemon ignores
   * the header): mtnlgctl resends a lost order only to a daemon that says so */
  json_object_set_new(h, "idempotency_keys", json_true());
  return answer_json(conn, c, q, 200, h, NULL);
}

static enum MHD_Result get_metrics(struct MHD_Connection *conn, mt_control *c, req *q) {
  json_t *st = c->p.status ? c->p.status(c->p.arg) : NULL;
  char *text = mt_control_metrics_text(c, st);
  json_decref(st);
  if (!text) return problem(conn, c, q, 500, NULL, "out of memory rendering metrics");
  return answer(conn, c, q, 200, "text/plain; version=0.0.4; charset=utf-8", text, strlen(text), 0,
                NULL);
}

/* Answers a read whose value comes from a provider callback. */
static enum MHD_Result get_read(struct MHD_Connection *conn, mt_control *c, req *q,
                                const char *url) {
  json_t *v = NULL;
  int missing_status = 404;
  switch (q->r->id) {
  case R_STATUS:
    if (!c->p.status) return problem(conn, c, q, 503, NULL, "status is not available");
    v = c->p.status(c->p.arg);
    missing_status = 500;
    break;
  case R_HISTORY: {
    int64_t since = -1;
    const char *s = NULL;
    size_t sl = 0;
    if (MHD_lookup_connection_value_n(conn, MHD_GET_ARGUMENT_KIND, "since", 5, &s, &sl) ==
            MHD_YES &&
        (since = parse_since(s ? s : "")) < 0)
      return problem(conn, c, q, 400, NULL, "query since: \"%.64s\" is not a non-negative integer",
                     s ? s : "");
    if (!c->p.history) return problem(conn, c, q, 503, NULL, "history is not available");
    v = c->p.history(c->p.arg, since);
    missing_status = 500;
    break;
  }
  case R_CHECKPOINTS:
    if (!c->p.checkpoints) return problem(conn, c, q, 503, NULL, "checkpoints are not available");
    v = c->p.checkpoints(c->p.arg);
    if (!v)
      return problem(conn, c, q, 503, NULL,
                     "the checkpoint directory did not answer in time (a slow or hung "
                     "filesystem?); try again");
    break;
  case R_OPERATIONS:
    if (!c->p.operations) return problem(conn, c, q, 503, NULL, "operations are not available");
    v = c->p.operations(c->p.arg);
    break;
  case R_OPERATION: {
    const char *id = url + strlen("/v1/operations/");
    if (!c->p.operation) return problem(conn, c, q, 503, NULL, "operations are not available");
    v = c->p.operation(c->p.arg, id);
    if (!v) return problem(conn, c, q, 404, NULL, "no operation %.128s", id);
    break;
  }
  }
  if (!v) {
    if (missing_status == 500)
      return problem(conn, c, q, 500, NULL, "the daemon could not produce %s", url);
    return problem(conn, c, q, 404, NULL, "nothing at %s", url);
  }
  return answer_json(conn, c, q, 200, v, NULL);
}

/* --------------------------------------------------------------- mutations */

/* Checks a mutation's body: empty or an object, and for resize exactly
 * {"dp": integer >= 1}. Returns the args ({} when empty) or NULL with why. */
static json_t *check_body(const req *q, char *why, size_t why_bytes) {
  json_t *args;
  if (q->len == 0) {
    args = json_object();
  } else {
    json_error_t e;
    args = json_loadb(q->body, q->len, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &e);
    if (!args) {
      snprintf(why, why_bytes, "malformed JSON at line %d column %d: %s", e.line, e.column, e.text);
      return NULL;
    }
    if (!json_is_object(args)) {
      snprintf(why, why_bytes, "the body must be a JSON object");
      json_decref(args);
      return NULL;
    }
  }
  int resize = strcmp(q->kind, "resize") == 0;
  const char *key;
  json_t *v;
  json_object_foreach(args, key, v) {
    if (!resize || strcmp(key, "dp") != 0) {
      snprintf(why, why_bytes, "unknown field \"%.64s\" for %s", key, q->kind);
      json_decref(args);
      return NULL;
    }
  }
  if (resize) {
    json_t *dp = json_object_get(args, "dp");
    if (!dp) {
      snprintf(why, why_bytes, "field \"dp\" is required: {\"dp\": N}, N an integer >= 1");
      json_decref(args);
      return NULL;
    }
    if (!json_is_integer(dp) || json_integer_value(dp) < 1) {
      snprintf(why, why_bytes, "field \"dp\" must be an integer >= 1");
      json_decref(args);
      return NULL;
    }
  }
  return args;
}

/* Counts the Idempotency-Key headers (libmicrohttpd matches names without
 * regard to case). */
static enum MHD_Result count_idem_keys(void *cls, enum MHD_ValueKind kind, const char *key,
                                       const char *value) {
  (void)kind, (void)value;
  if (!strcasecmp(key, "Idempotency-Key")) ++*(int *)cls;
  return MHD_YES;
}

/* The request's Idempotency-Key: 0 with *key NULL when none came, or the
 * header's value; -1 with why when it is not 1 to MT_CONTROL_IDEM_KEY_MAX
 * printable ASCII characters (a tab, which find_bad_header lets through in
 * any header, is refused here), or came twice. */
static int check_idem_key(struct MHD_Connection *conn, const char **key, char *why,
                          size_t why_bytes) {
  int count = 0;
  MHD_get_connection_values(conn, MHD_HEADER_KIND, count_idem_keys, &count);
  *key = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Idempotency-Key");
  if (!*key) return 0;
  size_t n = strlen(*key);
  if (count > 1)
    snprintf(why, why_bytes, "header Idempotency-Key: %d of them; send one", count);
  else if (n == 0)
    snprintf(why, why_bytes,
             "header Idempotency-Key: empty; it takes 1 to %d printable ASCII "
             "characters",
             MT_CONTROL_IDEM_KEY_MAX);
  else if (n > MT_CONTROL_IDEM_KEY_MAX)
    snprintf(why, why_bytes, "header Idempotency-Key: %zu characters, over %d", n,
             MT_CONTROL_IDEM_KEY_MAX);
  else {
    for (size_t i = 0; i < n; i++)
      if ((unsigned char)(*key)[i] < 0x20 || (unsigned char)(*key)[i] > 0x7e) {
        snprintf(why, why_bytes,
                 "header Idempotency-Key: byte 0x%02x at offset %zu is not printable ASCII",
                 (unsigned char)(*key)[i], i);
        return -1;
      }
    return 0;
  }
  return -1;
}

/* POST /v1/<kind> once the whole body is in: check it, hand it to the
 * provider, answer 202 + Location or the provider's error. Once the
 * Idempotency-Key is checked, every answer echoes it (as a sign that the
 * key was honoured: mtnlgctl resends a lost order only then), and a
 * retry's answer, 202 or a refusal, says Idempotent-Replayed: true. */
static enum MHD_Result post_mutation(struct MHD_Connection *conn, mt_control *c, req *q) {
  if (q->too_large)
    return problem(conn, c, q, 413, NULL, "the body is over %d bytes", MAX_BODY_BYTES);
  char why[256];
  const char *key;
  if (check_idem_key(conn, &key, why, sizeof why)) return problem(conn, c, q, 400, NULL, "%s", why);
  /* name-value pairs, NULL-ended: [Location,] Idempotency-Key, Idempotent-Replayed */
  const char *hdr[7] = {NULL}, **more = hdr + 2;
  if (key) more[0] = "Idempotency-Key", more[1] = key;
  json_t *args = check_body(q, why, sizeof why);
  if (!args) return problem(conn, c, q, 400, more, "%s", why);
  if (!c->p.submit) {
    json_decref(args);
    return problem(conn, c, q, 503, more, "this daemon does not take orders yet");
  }
  mt_control_reply reply;
  memset(&reply, 0, sizeof reply);
  c->p.submit(c->p.arg, q->kind, args, key, &reply);
  json_decref(args);
  reply.detail[sizeof reply.detail - 1] = '\0';
  /* Idempotent-Replayed (Stripe's header): the answer a retry repeats */
  if (key && reply.replayed) more[2] = "Idempotent-Replayed", more[3] = "true";
  if (reply.status == 202) {
    const char *id = json_string_value(json_object_get(reply.op, "id"));
    if (!id) {
      json_decref(reply.op);
      return problem(conn, c, q, 500, more, "%s: the operation has no id", q->kind);
    }
    char location[300];
    snprintf(location, sizeof location, "/v1/operations/%s", id);
    hdr[0] = MHD_HTTP_HEADER_LOCATION, hdr[1] = location;
    return answer_json(conn, c, q, 202, reply.op, hdr);
  }
  json_decref(reply.op);
  int status = reply.status >= 400 && reply.status < 600 ? reply.status : 500;
  return problem(conn, c, q, status, more, "%s", reply.detail[0] ? reply.detail : q->kind);
}

/* ----------------------------------------------------------------- routing */

static const route *find_route(const char *url) {
  for (size_t i = 0; i < sizeof routes / sizeof routes[0]; i++)
    if (strcmp(url, routes[i].path) == 0) return &routes[i];
  return NULL;
}

/* /v1/operations/{id}: one non-empty segment of sane characters. */
static int is_operation_url(const char *url) {
  const char *pre = "/v1/operations/";
  if (strncmp(url, pre, strlen(pre)) != 0) return 0;
  const char *id = url + strlen(pre);
  if (!*id || strlen(id) > 128) return 0;
  for (; *id; id++)
    if (*id == '/' || (unsigned char)*id < 0x21 || (unsigned char)*id > 0x7e) return 0;
  return 1;
}

/* Route, method and token: everything known from the headers alone. Answers
 * a refusal (404, 405, 401, 413) and leaves q->r, q->kind for dispatch. */
/* The Host header of a request to a loopback-only daemon: absent (HTTP/1.0),
 * or a loopback name or address, with or without a port. A web page that
 * rebinds its own DNS name to 127.0.0.1 sends its name, and is turned away
 * before it can read what the open reads show. */
static int host_ok(const char *host) {
  if (!host) return 1;
  char h[256];
  const char *end, *port;
  if (host[0] == '[') { /* [::1]:8470 */
    end = strchr(host, ']');
    if (!end) return 0;
    host++, port = end + 1;
  } else {
    end = strchr(host, ':');
    if (!end) end = host + strlen(host);
    port = end;
  }
  if (*port) { /* only ":digits" may follow the name */
    if (*port++ != ':' || !*port) return 0;
    for (; *port; port++)
      if (*port < '0' || *port > '9') return 0;
  }
  size_t n = (size_t)(end - host);
  if (n > 1 && host[n - 1] == '.') n--; /* "localhost." names the same host */
  if (n == 0 || n >= sizeof h) return 0;
  memcpy(h, host, n);
  h[n] = '\0';
  struct in_addr a4;
  struct in6_addr a6;
  if (!strcasecmp(h, "localhost")) return 1;
  if (inet_pton(AF_INET, h, &a4) == 1) return (ntohl(a4.s_addr) >> 24) == 127;
  if (inet_pton(AF_INET6, h, &a6) != 1) return 0;
  if (IN6_IS_ADDR_LOOPBACK(&a6)) return 1;
  return IN6_IS_ADDR_V4MAPPED(&a6) && a6.s6_addr[12] == 127; /* ::ffff:127.x.y.z */
}

/* The first header libmicrohttpd kept that RFC 9110 forbids: a name that
 * is not a token, or a value with control bytes (a bare CR, an ESC...):
 * what follows it cannot be trusted to be framed as the client meant.
 * (A line with an empty name never gets here: 0.9.75 ends the headers
 * there and reads the rest as the next request; see README.) */
typedef struct {
  const char *name;
  const char *what;
  const char *length; /* the first Content-Length */
} bad_header;

static enum MHD_Result find_bad_header(void *cls, enum MHD_ValueKind kind, const char *key,
                                       const char *value) {
  (void)kind;
  bad_header *b = cls;
  static const char tchar[] = "!#$%&'*+-.^_`|~";
  for (const char *k = key; *k && !b->what; k++)
    if (!isalnum((unsigned char)*k) && !strchr(tchar, *k))
      b->what = "a header name that is not a token";
  for (const char *v = value ? value : ""; *v && !b->what; v++)
    if (((unsigned char)*v < 0x20 && *v != '\t') || *v == 0x7f)
      b->what = "a control byte in a header value";
  /* two lengths that disagree frame the body two ways (RFC 9112 6.3: a
   * request smuggled past a proxy that reads the other one) */
  if (!b->what && !strcasecmp(key, MHD_HTTP_HEADER_CONTENT_LENGTH)) {
    if (b->length && strcmp(b->length, value ? value : ""))
      b->what = "two Content-Length headers that disagree";
    else
      b->length = value ? value : "";
  }
  if (!b->what) return MHD_YES;
  b->name = key;
  return MHD_NO;
}

static const char *const close_hdr[] = {"Connection", "close", NULL};

static enum MHD_Result check(struct MHD_Connection *conn, mt_control *c, req *q, const char *url,
                             const char *method) {
  static const route operation_route = {"/v1/operations/{id}", R_OPERATION, M_GET};
  q->checked = 1;
  bad_header bad = {0};
  MHD_get_connection_values(conn, MHD_HEADER_KIND, find_bad_header, &bad);
  if (bad.what) /* what follows cannot be framed: answer, then close */
    return problem(conn, c, q, 400, close_hdr, "malformed request: %s (\"%.40s\")", bad.what,
                   bad.name);
  const char *host = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_HOST);
  if (c->loopback && !host_ok(host))
    return problem(conn, c, q, 421, NULL,
                   "Host \"%.100s\": this daemon listens on loopback only; ask it as localhost or "
                   "by its address",
                   host);
  q->r = find_route(url);
  if (!q->r && is_operation_url(url)) q->r = &operation_route;
  if (!q->r) return problem(conn, c, q, 404, NULL, "no such path: %.200s", url);
  int m = !strcmp(method, "GET") || !strcmp(method, "HEAD") ? M_GET
          : !strcmp(method, "POST")                         ? M_POST
                                                            : 0;
  if (!(m & q->r->methods)) {
    const char *const hdr[] = {"Allow", q->r->methods == M_POST ? "POST" : "GET, HEAD", NULL};
    return problem(conn, c, q, 405, hdr, "%s takes %s, not %.16s", q->r->path,
                   q->r->methods == M_POST ? "POST" : "GET", method);
  }
  if (q->r->id == R_ROOT) return MHD_YES; /* the page is static: open even with read tokens */
  int needs_token = m == M_POST || (c->reads_need_token && q->r->id != R_HEALTH);
  if (needs_token && !authorized(c, conn)) {
    /* a token sent and refused is told apart from none, another scheme
     * (Basic) and an empty one: a stale token file reads otherwise as a
     * header that never left */
    const char *auth =
        MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION);
    const char *token =
        auth && !strncasecmp(auth, "Bearer", 6) && (!auth[6] || auth[6] == ' ') ? auth + 6 : NULL;
    if (token) token += strspn(token, " ");
    return problem(conn, c, q, 401, unauthorized_hdr, "%s",
                   !c->token ? "this daemon has no control token: mutations are off"
                   : !auth   ? "this needs Authorization: Bearer <token>"
                   : !token  ? "this needs Authorization: Bearer <token>, not another scheme"
                   : !*token ? "this needs Authorization: Bearer <token>: the token sent is empty"
                             : "the bearer token sent was not accepted: it is not the one in "
                               "this daemon's control.token_file");
  }
  if (m == M_POST) q->kind = strrchr(q->r->path, '/') + 1;
  const char *cl =
      MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
  if (cl && strtoull(cl, NULL, 10) > MAX_BODY_BYTES)
    return problem(conn, c, q, 413, NULL, "the body is over %d bytes", MAX_BODY_BYTES);
  return MHD_YES;
}

/* The request is complete and passed check(): answer it. */
static enum MHD_Result dispatch(struct MHD_Connection *conn, mt_control *c, req *q,
                                const char *url) {
  switch (q->r->id) {
  case R_ROOT:
    return answer(conn, c, q, 200, "text/html; charset=utf-8", (char *)mt_control_dashboard_html,
                  mt_control_dashboard_html_len, 1, NULL);
  case R_HEALTH: return get_health(conn, c, q);
  case R_METRICS: return get_metrics(conn, c, q);
  case R_MUTATION: return post_mutation(conn, c, q);
  default: return get_read(conn, c, q, url);
  }
}

/* 1 when the request announces a body (a length above 0, or chunks). */
static int has_body(struct MHD_Connection *conn) {
  const char *cl =
      MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
  return (cl && strtoull(cl, NULL, 10) > 0) ||
         MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_TRANSFER_ENCODING);
}

/* Keeps at most MAX_BODY_BYTES; past that, drops what arrives and remembers. */
static int take_body(req *q, const char *data, size_t n) {
  if (q->too_large) return 0;
  if (q->len + n > MAX_BODY_BYTES) {
    q->too_large = 1;
    free(q->body);
    q->body = NULL;
    q->len = q->cap = 0;
    return 0;
  }
  if (q->len + n > q->cap) {
    size_t cap = q->cap ? q->cap : 1024;
    while (cap < q->len + n) cap *= 2;
    char *b = realloc(q->body, cap);
    if (!b) return MT_ENOMEM;
    q->body = b;
    q->cap = cap;
  }
  memcpy(q->body + q->len, data, n);
  q->len += n;
  return 0;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version, const char *upload_data,
                                  size_t *upload_data_size, void **con_cls) {
  (void)version;
  mt_control *c = cls;
  req *q = *con_cls;
  if (!q) {
    q = calloc(1, sizeof *q);
    if (!q) return MHD_NO;
    *con_cls = q;
    /* An answer queued now makes libmicrohttpd close the connection after
     * it: right for refusing a body unread, wrong for keep-alive. So only
     * requests with a body are checked this early. */
    return has_body(conn) ? check(conn, c, q, url, method) : MHD_YES;
  }
  if (q->answered) {
    *upload_data_size = 0;
    return MHD_YES;
  }
  if (*upload_data_size) {
    if (take_body(q, upload_data, *upload_data_size) < 0) return MHD_NO;
    *upload_data_size = 0;
    return MHD_YES;
  }
  if (!q->checked) {
    enum MHD_Result rc = check(conn, c, q, url, method);
    if (rc != MHD_YES || q->answered) return rc;
  }
  return dispatch(conn, c, q, url);
}

/* Opens and closes of connections: each gets a clock (see struct mt_control). */
static void on_connection(void *cls, struct MHD_Connection *conn, void **socket_context,
                          enum MHD_ConnectionNotificationCode code) {
  mt_control *c = cls;
  if (code == MHD_CONNECTION_NOTIFY_STARTED) {
    const union MHD_ConnectionInfo *fd =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    conn_clock *k = fd ? calloc(1, sizeof *k) : NULL;
    if (!k) return; /* out of memory: this one has the idle timeout only */
    k->fd = fd->connect_fd;
    k->since = mt_mono_s();
    pthread_mutex_lock(&c->conns_mu);
    k->next = c->conns;
    if (c->conns) c->conns->prev = k;
    c->conns = k;
    pthread_mutex_unlock(&c->conns_mu);
    *socket_context = k;
    return;
  }
  conn_clock *k = *socket_context;
  if (!k) return;
  /* libmicrohttpd closes the socket after this returns: while the reaper
   * holds the lock, every fd on the list is still its connection's */
  pthread_mutex_lock(&c->conns_mu);
  if (k->prev)
    k->prev->next = k->next;
  else
    c->conns = k->next;
  if (k->next) k->next->prev = k->prev;
  pthread_mutex_unlock(&c->conns_mu);
  free(k);
  *socket_context = NULL;
}

static void *reaper_main(void *arg) {
  mt_control *c = arg;
  pthread_mutex_lock(&c->conns_mu);
  while (!c->reaper_stop) {
    struct timespec until = mt_mono_deadline(250);
    pthread_cond_timedwait(&c->reaper_cv, &c->conns_mu, &until);
    double now = mt_mono_s();
    unsigned n = 0;
    for (conn_clock *k = c->conns; k && !c->reaper_stop; k = k->next)
      if (!k->cut && now - k->since > c->request_timeout_s) {
        shutdown(k->fd, SHUT_RDWR); /* libmicrohttpd reads the end and closes it */
        k->cut = 1;
        n++;
      }
    unsigned long total = __atomic_add_fetch(&c->cut, n, __ATOMIC_RELAXED);
    if (n) { /* logged unlocked: the server's thread waits on the lock */
      pthread_mutex_unlock(&c->conns_mu);
      mt_log(MT_LOG_WARN,
             "control: closed %u connection(s) that took over %u s for a request (%lu so far)", n,
             c->request_timeout_s, total);
      pthread_mutex_lock(&c->conns_mu);
    }
  }
  pthread_mutex_unlock(&c->conns_mu);
  return NULL;
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode toe) {
  (void)toe;
  mt_control *c = cls;
  const union MHD_ConnectionInfo *sc =
      MHD_get_connection_info(conn, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
  if (sc && sc->socket_context) { /* the next request's clock starts now */
    pthread_mutex_lock(&c->conns_mu);
    ((conn_clock *)sc->socket_context)->since = mt_mono_s();
    pthread_mutex_unlock(&c->conns_mu);
  }
  req *q = *con_cls;
  if (!q) return;
  int big = q->big_answer;
  free(q->body);
  free(q);
  *con_cls = NULL;
  if (big) malloc_trim(0);
}

/* MHD's complaints go to our log; the last one also explains a failed start. */
static void on_mhd_log(void *cls, const char *fmt, va_list ap) {
  mt_control *c = cls;
  char line[256];
  vsnprintf(line, sizeof line, fmt, ap);
  size_t n = strlen(line);
  while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r')) line[--n] = '\0';
  snprintf(c->last_log, sizeof c->last_log, "%s", line);
  /* a client sending garbage must not flood the journal: one line a second */
  static time_t last_s;
  static unsigned suppressed;
  time_t now = time(NULL);
  if (now == last_s) {
    suppressed++;
    return;
  }
  if (suppressed)
    mt_log_warn("control: %s (and %u more such messages in the last second)", line, suppressed);
  else
    mt_log_warn("control: %s", line);
  last_s = now, suppressed = 0;
}

/* ---------------------------------------------------------------- lifetime */

/* Splits "HOST:PORT" ("[v6]:PORT" too) and resolves it to one address. */
static int resolve(const char *listen, struct sockaddr_storage *ss, int *port_out) {
  char host[256];
  const char *colon = strrchr(listen, ':');
  if (!colon || colon == listen || !colon[1])
    return mt_seterr(MT_EINVAL, "control: listen \"%s\": expected HOST:PORT", listen);
  size_t hn = (size_t)(colon - listen);
  const char *h = listen;
  if (h[0] == '[' && hn >= 2 && h[hn - 1] == ']') h++, hn -= 2;
  if (hn >= sizeof host)
    return mt_seterr(MT_EINVAL, "control: listen \"%s\": host too long", listen);
  memcpy(host, h, hn);
  host[hn] = '\0';
  char *end;
  long port = strtol(colon + 1, &end, 10);
  if (*end || port < 0 || port > 65535)
    return mt_seterr(MT_EINVAL, "control: listen \"%s\": bad port", listen);
  struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE | AI_NUMERICSERV};
  struct addrinfo *res = NULL;
  int rc = getaddrinfo(host, colon + 1, &hints, &res);
  if (rc != 0 || !res)
    return mt_seterr(MT_EINVAL, "control: listen \"%s\": %s", listen, gai_strerror(rc));
  memcpy(ss, res->ai_addr, res->ai_addrlen);
  *port_out = (int)port;
  freeaddrinfo(res);
  return 0;
}

int mt_control_start(const mt_control_opts *opts, mt_control **out) {
  if (!opts || !out) return mt_seterr(MT_EINVAL, "control: start needs opts and out");
  *out = NULL;
  mt_control *c = calloc(1, sizeof *c);
  if (!c) return mt_seterr(MT_ENOMEM, "control: out of memory");
  pthread_mutex_init(&c->conns_mu, NULL);
  mt_mono_cond_init(&c->reaper_cv);
  c->request_timeout_s =
      opts->request_timeout_s ? opts->request_timeout_s : DEFAULT_REQUEST_TIMEOUT_S;
  snprintf(c->listen, sizeof c->listen, "%s",
           opts->listen && opts->listen[0] ? opts->listen : "127.0.0.1:0");
  c->p = opts->provider;
  c->reads_need_token = opts->reads_need_token;
  if (opts->token && opts->token[0] && !(c->token = strdup(opts->token))) {
    mt_control_stop(c);
    return mt_seterr(MT_ENOMEM, "control: out of memory");
  }
  struct sockaddr_storage ss;
  int port = 0;
  int rc = resolve(c->listen, &ss, &port);
  if (rc < 0) {
    mt_control_stop(c);
    return rc;
  }
  c->loopback = ss.ss_family == AF_INET
                    ? (ntohl(((struct sockaddr_in *)&ss)->sin_addr.s_addr) >> 24) == 127
                    : ss.ss_family == AF_INET6 &&
                          IN6_IS_ADDR_LOOPBACK(&((struct sockaddr_in6 *)&ss)->sin6_addr);
  unsigned flags = MHD_USE_AUTO_INTERNAL_THREAD | MHD_USE_ERROR_LOG;
  if (ss.ss_family == AF_INET6) flags |= MHD_USE_IPv6;
  int tls = opts->tls_cert_pem && opts->tls_key_pem;
  if (tls && MHD_is_feature_supported(MHD_FEATURE_TLS) != MHD_YES) {
    mt_control_stop(c);
    return mt_seterr(MT_EINVAL, "control: this libmicrohttpd was built without TLS: no HTTPS");
  }
  struct MHD_OptionItem tls_opts[] = {
      {tls ? MHD_OPTION_HTTPS_MEM_CERT : MHD_OPTION_END, 0, (void *)opts->tls_cert_pem},
      {MHD_OPTION_HTTPS_MEM_KEY, 0, (void *)opts->tls_key_pem},
      {MHD_OPTION_END, 0, NULL}};
  if (tls) flags |= MHD_USE_TLS;
  unsigned timeout_s = opts->timeout_s ? opts->timeout_s : DEFAULT_TIMEOUT_S;
  unsigned max_conns = opts->max_connections ? opts->max_connections : DEFAULT_MAX_CONNS;
  errno = 0;
  c->mhd = MHD_start_daemon(flags, (uint16_t)port, NULL, NULL, on_request, c,
                            MHD_OPTION_EXTERNAL_LOGGER, on_mhd_log, c, MHD_OPTION_SOCK_ADDR,
                            (struct sockaddr *)&ss, MHD_OPTION_CONNECTION_TIMEOUT, timeout_s,
                            MHD_OPTION_CONNECTION_LIMIT, max_conns,
                            /* one remote host cannot hold every connection open (on loopback
                             * every client is one host: the excess waits in the backlog) */
                            MHD_OPTION_PER_IP_CONNECTION_LIMIT,
                            c->loopback     ? 0u
                            : max_conns / 2 ? max_conns / 2
                                            : 1u,
                            MHD_OPTION_LISTEN_BACKLOG_SIZE, 64u, MHD_OPTION_NOTIFY_COMPLETED,
                            on_completed, c, MHD_OPTION_NOTIFY_CONNECTION, on_connection, c,
                            MHD_OPTION_ARRAY, tls_opts, /* the certificate and key, when HTTPS */
                            /* one thread: a pool of 4 made the training step 8x as sensitive
                             * to 1000 reads/s on 2 cores (bench/control-load); a mutation
                             * holds it for one coordinator round (~0.1 s) */
                            MHD_OPTION_END);
  if (!c->mhd) {
    int e = errno;
    rc = mt_seterr(MT_EIO, "control: cannot listen on %s%s: %s", c->listen,
                   tls && !strstr(c->last_log, "bind") && e != EADDRINUSE && e != EACCES
                       ? " with HTTPS (is the key the certificate's, both PEM?)"
                       : "",
                   c->last_log[0] ? c->last_log
                   : e            ? strerror(e)
                                  : "libmicrohttpd refused");
    mt_control_stop(c);
    return rc;
  }
  const union MHD_DaemonInfo *info = MHD_get_daemon_info(c->mhd, MHD_DAEMON_INFO_BIND_PORT);
  c->port = info ? info->port : 0;
  if (c->port == 0) {
    rc = mt_seterr(MT_EIO, "control: %s: libmicrohttpd did not report the bound port", c->listen);
    mt_control_stop(c);
    return rc;
  }
  if (pthread_create(&c->reaper, NULL, reaper_main, c) != 0) {
    mt_control_stop(c);
    return mt_seterr(MT_EIO, "control: cannot start the request-deadline thread");
  }
  c->reaper_started = 1;
  mt_log_info("control: listening on %s (port %d%s)", c->listen, c->port, tls ? ", HTTPS" : "");
  *out = c;
  return 0;
}

int mt_control_port(const mt_control *c) { return c ? c->port : 0; }

void mt_control_stop(mt_control *c) {
  if (!c) return;
  if (c->reaper_started) {
    pthread_mutex_lock(&c->conns_mu);
    c->reaper_stop = 1;
    pthread_cond_signal(&c->reaper_cv);
    pthread_mutex_unlock(&c->conns_mu);
    pthread_join(c->reaper, NULL);
  }
  if (c->mhd) MHD_stop_daemon(c->mhd); /* closes each connection: frees its clock */
  pthread_cond_destroy(&c->reaper_cv);
  pthread_mutex_destroy(&c->conns_mu);
  if (c->token) {
    memset(c->token, 0, strlen(c->token));
    free(c->token);
  }
  free(c);
}
