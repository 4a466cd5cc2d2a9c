#include "store_etcd.h"

#include "err.h"
#include "monotime.h"

#include <curl/curl.h>
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_ENDPOINTS 16
#define POOL_HANDLES 16
#define WATCH_SLICE_MS 5000 /* a waiting get reads its key again at least this often */
#define TXN_READS 64        /* get_many's ranges per txn (etcd's --max-txn-ops is 128) */
#define MAX_REPLY_BYTES (64u << 20)

typedef struct etcd_store {
  mt_store base;
  char *eps[MAX_ENDPOINTS]; /* "http://host:port", no slash at the end */
  int n_eps;
  char names[512]; /* the endpoints, for messages */
  atomic_int cur;  /* the member that answered last */
  char *prefix;
  size_t prefix_len;
  int dial_ms, request_ms;
  char *user, *password, *cacert, *cert, *key;
  pthread_mutex_t mu; /* guards the pool and the token */
  CURL *pool[POOL_HANDLES];
  int n_pool;
  char token[512]; /* etcd's auth token; "" without users */
} etcd_store;

/* ---- base64 (etcd's JSON carries keys and values as base64) ---- */

static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static char *b64_encode(const void *data, size_t n) {
  const unsigned char *p = data;
  char *out = malloc(4 * ((n + 2) / 3) + 1), *o = out;
  if (!out) return NULL;
  for (size_t i = 0; i < n; i += 3) {
    uint32_t v = (uint32_t)p[i] << 16;
    if (i + 1 < n) v |= (uint32_t)p[i + 1] << 8;
    if (i + 2 < n) v |= p[i + 2];
    *o++ = B64[v >> 18 & 63];
    *o++ = B64[v >> 12 & 63];
    *o++ = i + 1 < n ? B64[v >> 6 & 63] : '=';
    *o++ = i + 2 < n ? B64[v & 63] : '=';
  }
  *o = 0;
  return out;
}

static int b64_value(int c) {
  const char *q = c ? strchr(B64, c) : NULL;
  return q ? (int)(q - B64) : c == '-' ? 62 : c == '_' ? 63 : -1;
}

/* Decodes text (NULL: empty) into a malloc'd buffer with a NUL after the
 * last byte. MT_ECORRUPT on a character outside base64. */
static int b64_decode(const char *text, void **out, size_t *bytes) {
  size_t n = text ? strlen(text) : 0;
  unsigned char *buf = malloc(n / 4 * 3 + 4), *o = buf;
  if (!buf) return MT_ENOMEM;
  uint32_t acc = 0;
  int bits = 0;
  for (size_t i = 0; i < n && text[i] != '='; i++) {
    int v = b64_value((unsigned char)text[i]);
    if (v < 0) {
      free(buf);
      return MT_ECORRUPT;
    }
    acc = acc << 6 | (uint32_t)v;
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      *o++ = (unsigned char)(acc >> bits);
    }
  }
  *o = 0;
  *out = buf;
  *bytes = (size_t)(o - buf);
  return 0;
}

/* etcd's JSON writes 64-bit integers as strings; absent is 0. */
static int64_t json_i64(json_t *v) {
  if (json_is_integer(v)) return json_integer_value(v);
  if (json_is_string(v)) return strtoll(json_string_value(v), NULL, 10);
  return 0;
}

static char *full_key(etcd_store *s, const char *key, size_t *n) {
  size_t kn = strlen(key);
  char *k = malloc(s->prefix_len + kn + 1);
  if (!k) return NULL;
  memcpy(k, s->prefix, s->prefix_len);
  memcpy(k + s->prefix_len, key, kn + 1);
  *n = s->prefix_len + kn;
  return k;
}

/* base64 of prefix + key */
static char *key64(etcd_store *s, const char *key) {
  size_t n;
  char *k = full_key(s, key, &n);
  char *e = k ? b64_encode(k, n) : NULL;
  free(k);
  return e;
}

/* ---- one HTTP request ---- */

typedef struct reply_buf {
  char *p;
  size_t len, cap;
  /* a watch's stream: called with each complete JSON message; a nonzero
   * return ends the transfer */
  int (*on_message)(json_t *m, void *arg);
  void *arg;
} reply_buf;

static size_t on_body(char *data, size_t size, size_t nmemb, void *arg) {
  reply_buf *r = arg;
  size_t n = size * nmemb;
  if (r->len + n + 1 > MAX_REPLY_BYTES) return 0;
  if (r->len + n + 1 > r->cap) {
    size_t cap = r->cap ? r->cap : 4096;
    while (cap < r->len + n + 1) cap *= 2;
    char *p = realloc(r->p, cap);
    if (!p) return 0;
    r->p = p, r->cap = cap;
  }
  memcpy(r->p + r->len, data, n);
  r->len += n;
  r->p[r->len] = 0;
  if (!r->on_message) return n;
  /* a stream of JSON messages, one after another: hand on each whole one */
  size_t used = 0;
  while (used < r->len) {
    json_error_t e;
    const char *at = r->p + used;
    while (used < r->len && (*at == '\n' || *at == '\r' || *at == ' ')) at++, used++;
    if (used == r->len) break;
    json_t *m = json_loadb(at, r->len - used, JSON_DISABLE_EOF_CHECK, &e);
    if (!m) break; /* not whole yet */
    used += (size_t)e.position;
    int stop = r->on_message(m, r->arg);
    json_decref(m);
    if (stop) return 0; /* curl ends the transfer: CURLE_WRITE_ERROR */
  }
  memmove(r->p, r->p + used, r->len - used);
  r->len -= used;
  return n;
}

static CURL *handle_take(etcd_store *s) {
  pthread_mutex_lock(&s->mu);
  CURL *h = s->n_pool ? s->pool[--s->n_pool] : NULL;
  pthread_mutex_unlock(&s->mu);
  return h ? h : curl_easy_init();
}

static void handle_give(etcd_store *s, CURL *h) {
  pthread_mutex_lock(&s->mu);
  if (s->n_pool < POOL_HANDLES) s->pool[s->n_pool++] = h, h = NULL;
  pthread_mutex_unlock(&s->mu);
  if (h) curl_easy_cleanup(h);
}

typedef struct http_result {
  CURLcode code;
  long status;
  char curl_err[CURL_ERROR_SIZE];
} http_result;

/* POSTs body to endpoint i's path, within timeout_ms. */
static void http_post(etcd_store *s, int i, const char *path, const char *body, int timeout_ms,
                      int with_token, reply_buf *r, http_result *res) {
  char url[600], auth[600];
  snprintf(url, sizeof url, "%s%s", s->eps[i], path);
  struct curl_slist *hdr = curl_slist_append(NULL, "Content-Type: application/json");
  hdr = curl_slist_append(hdr, "Expect:");
  if (with_token) {
    pthread_mutex_lock(&s->mu);
    snprintf(auth, sizeof auth, "Authorization: %s", s->token);
    pthread_mutex_unlock(&s->mu);
    if (auth[15]) hdr = curl_slist_append(hdr, auth);
  }
  memset(res, 0, sizeof *res);
  CURL *h = handle_take(s);
  if (!h || !hdr) {
    res->code = CURLE_OUT_OF_MEMORY;
    snprintf(res->curl_err, sizeof res->curl_err, "out of memory");
    curl_slist_free_all(hdr);
    if (h) handle_give(s, h);
    return;
  }
  curl_easy_reset(h);
  curl_easy_setopt(h, CURLOPT_URL, url);
  curl_easy_setopt(h, CURLOPT_POSTFIELDS, body);
  curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)strlen(body));
  curl_easy_setopt(h, CURLOPT_HTTPHEADER, hdr);
  curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, (long)s->dial_ms);
  curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, (long)(timeout_ms > 1 ? timeout_ms : 1));
  curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_body);
  curl_easy_setopt(h, CURLOPT_WRITEDATA, r);
  curl_easy_setopt(h, CURLOPT_ERRORBUFFER, res->curl_err);
  curl_easy_setopt(h, CURLOPT_TCP_NODELAY, 1L);
  if (s->cacert) curl_easy_setopt(h, CURLOPT_CAINFO, s->cacert);
  if (s->cert) curl_easy_setopt(h, CURLOPT_SSLCERT, s->cert);
  if (s->key) curl_easy_setopt(h, CURLOPT_SSLKEY, s->key);
  res->code = curl_easy_perform(h);
  curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &res->status);
  if (res->code && !res->curl_err[0])
    snprintf(res->curl_err, sizeof res->curl_err, "%s", curl_easy_strerror(res->code));
  curl_easy_setopt(h, CURLOPT_ERRORBUFFER, NULL);
  curl_easy_setopt(h, CURLOPT_HTTPHEADER, NULL);
  curl_slist_free_all(hdr);
  handle_give(s, h);
}

/* ---- a request to the cluster ---- */

enum { SAFE_TO_RETRY = 1, AUTHENTICATING = 2 };

/* What etcd's error means for a request (grpc codes, etcd's words). */
enum { E_RETRY, E_UNAPPLIED, E_TOKEN, E_PERM, E_TOO_LARGE, E_FAIL };

static int classify(const char *msg, int64_t code) {
  if (strstr(msg, "no leader") || strstr(msg, "not capable")) return E_UNAPPLIED;
  if (strstr(msg, "invalid auth token") || strstr(msg, "auth token is expired")) return E_TOKEN;
  if (code == 7 || code == 16 || strstr(msg, "permission denied") ||
      strstr(msg, "authentication failed") || strstr(msg, "user name"))
    return E_PERM;
  if (strstr(msg, "too large") || strstr(msg, "larger than max") ||
      strstr(msg, "too many operations"))
    return E_TOO_LARGE;
  if (code == 14 || code == 4 || strstr(msg, "timed out") || strstr(msg, "leader changed"))
    return E_RETRY;
  return E_FAIL;
}

static int authenticate(etcd_store *s);

/* Whether a failed request was refused by TLS itself: the member's
 * certificate not trusted here, this node's not trusted there (TLS 1.3
 * says so in an alert after the handshake, on the first read), or a
 * certificate or key file that cannot be used. */
static int tls_refused(const http_result *h) {
  if (h->code == CURLE_PEER_FAILED_VERIFICATION || h->code == CURLE_SSL_CERTPROBLEM ||
      h->code == CURLE_SSL_CACERT_BADFILE)
    return 1;
  return (h->code == CURLE_RECV_ERROR || h->code == CURLE_SSL_CONNECT_ERROR ||
          h->code == CURLE_SEND_ERROR) &&
         (strstr(h->curl_err, "certificate required") || strstr(h->curl_err, "bad certificate") ||
          strstr(h->curl_err, "unknown ca") || strstr(h->curl_err, "certificate unknown"));
}

static void sleep_ms(int ms) {
  struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
  nanosleep(&ts, NULL);
}

/* POSTs body to path on the members, from the one that answered last on,
 * until one answers or request_ms passes; *reply is its JSON (decref it).
 * what names the request for messages ("set gen/0/x"). A request that may
 * have reached etcd is sent again only with SAFE_TO_RETRY in flags. */
static int etcd_call(etcd_store *s, const char *path, const char *body, int flags, const char *what,
                     json_t **reply) {
  *reply = NULL;
  int64_t deadline = mt_mono_ms() + s->request_ms;
  int start = atomic_load(&s->cur), backoff = 20, reauthed = 0;
  /* A member can hold a request it cannot serve (one forwarded to a leader
   * that died is dropped, and answered only by the member's own timeout,
   * seconds later): what may be sent again is given a second, then twice
   * as long on each try; what may not, all the time there is. */
  int attempt_ms = s->dial_ms * 2 > 1000 ? s->dial_ms * 2 : 1000;
  char last[700] = "no member tried";
  for (;;) {
    for (int k = 0; k < s->n_eps; k++) {
      int i = (start + k) % s->n_eps;
      int64_t left = deadline - mt_mono_ms();
      if (left <= 0) goto out_of_time;
      reply_buf r = {0};
      http_result h;
      int limit = flags & SAFE_TO_RETRY && attempt_ms < left ? attempt_ms : (int)left;
      http_post(s, i, path, body, limit, !(flags & AUTHENTICATING), &r, &h);
      if (h.code) {
        snprintf(last, sizeof last, "%s: %s", s->eps[i], h.curl_err);
        free(r.p);
        /* certificates one side does not trust: no member will, and no
         * retry helps (a refused password is MT_EPERM too) */
        if (tls_refused(&h))
          return mt_seterr(MT_EPERM,
                           "store(etcd %s): %s: %s: TLS refused (the members' CA is "
                           "rendezvous.etcd_cacert, this node's certificate and key "
                           "rendezvous.etcd_cert and etcd_key)",
                           s->names, what, last);
        int unsent = h.code == CURLE_COULDNT_CONNECT || h.code == CURLE_COULDNT_RESOLVE_HOST;
        if (h.code == CURLE_OPERATION_TIMEDOUT && attempt_ms < s->request_ms) attempt_ms *= 2;
        if (!unsent && !(flags & SAFE_TO_RETRY))
          return mt_seterr(MT_EIO,
                           "store(etcd %s): %s: %s; it may or may not have been applied, so it is "
                           "not sent again",
                           s->names, what, last);
        continue;
      }
      json_error_t je;
      json_t *j = r.p ? json_loadb(r.p, r.len, 0, &je) : NULL;
      free(r.p);
      if (h.status == 200 && json_is_object(j)) {
        atomic_store(&s->cur, i);
        *reply = j;
        return 0;
      }
      const char *msg = json_string_value(json_object_get(j, "error"));
      if (!msg) msg = json_string_value(json_object_get(j, "message"));
      char words[400];
      snprintf(words, sizeof words, "%s", msg ? msg : "no error in the reply");
      int64_t code = json_i64(json_object_get(j, "code"));
      json_decref(j);
      snprintf(last, sizeof last, "%s: HTTP %ld: %s", s->eps[i], h.status, words);
      switch (msg ? classify(words, code) : E_RETRY) {
      case E_UNAPPLIED: continue;
      case E_TOKEN:
        if (!(flags & AUTHENTICATING) && !reauthed++ && s->user) {
          int rc = authenticate(s);
          if (rc) return rc;
          k--; /* the same member again, with the new token */
          continue;
        }
        /* fallthrough */
      case E_PERM:
        return mt_seterr(MT_EPERM, "store(etcd %s): %s: refused: %s", s->names, what, last);
      case E_TOO_LARGE:
        return mt_seterr(MT_EINVAL,
                         "store(etcd %s): %s: %s (etcd's --max-request-bytes and --max-txn-ops "
                         "bound a request)",
                         s->names, what, last);
      case E_RETRY:
        if (flags & SAFE_TO_RETRY) continue;
        return mt_seterr(MT_EIO,
                         "store(etcd %s): %s: %s; it may or may not have been applied, so it is "
                         "not sent again",
                         s->names, what, last);
      default: return mt_seterr(MT_EIO, "store(etcd %s): %s: %s", s->names, what, last);
      }
    }
    int64_t left = deadline - mt_mono_ms();
    if (left <= 0) break;
    sleep_ms((int)(backoff < left ? backoff : left));
    backoff = backoff * 2 > 500 ? 500 : backoff * 2;
    start = atomic_load(&s->cur);
  }
out_of_time:
  return mt_seterr(MT_EIO, "store(etcd %s): %s: no member answered within %d ms (last: %s)",
                   s->names, what, s->request_ms, last);
}

/* A body of fields built with jansson's pack, as compact text. */
static char *pack_body(json_t *j) {
  char *text = j ? json_dumps(j, JSON_COMPACT) : NULL;
  json_decref(j);
  return text;
}

static int authenticate(etcd_store *s) {
  char *body = pack_body(json_pack("{s:s, s:s}", "name", s->user, "password", s->password));
  if (!body) return mt_seterr(MT_ENOMEM, "store(etcd): out of memory");
  json_t *j;
  char what[300];
  snprintf(what, sizeof what, "authenticate as %s", s->user);
  int rc = etcd_call(s, "/v3/auth/authenticate", body, SAFE_TO_RETRY | AUTHENTICATING, what, &j);
  free(body);
  if (rc) return rc;
  const char *token = json_string_value(json_object_get(j, "token"));
  if (!token || strlen(token) >= sizeof s->token) {
    json_decref(j);
    return mt_seterr(MT_EPERM, "store(etcd %s): %s: no token in the answer", s->names, what);
  }
  pthread_mutex_lock(&s->mu);
  snprintf(s->token, sizeof s->token, "%s", token);
  pthread_mutex_unlock(&s->mu);
  json_decref(j);
  return 0;
}

/* ---- the store's operations ---- */

static etcd_store *of(mt_store *b) { return (etcd_store *)b; }

/* Reads key as it is now (linearizable): *found, and when found its value
 * (value may be NULL: not wanted) and mod revision; *rev is the store's
 * revision the read saw. */
static int range_one(etcd_store *s, const char *key, const char *what, int *found, void **value,
                     size_t *bytes, int64_t *mod_rev, int64_t *rev) {
  char *k = key64(s, key);
  char *body = k ? pack_body(json_pack("{s:s}", "key", k)) : NULL;
  free(k);
  if (!body) return mt_seterr(MT_ENOMEM, "store(etcd): %s: out of memory", what);
  json_t *j;
  int rc = etcd_call(s, "/v3/kv/range", body, SAFE_TO_RETRY, what, &j);
  free(body);
  if (rc) return rc;
  json_t *kv = json_array_get(json_object_get(j, "kvs"), 0);
  *found = kv != NULL;
  if (rev) *rev = json_i64(json_object_get(json_object_get(j, "header"), "revision"));
  if (kv && mod_rev) *mod_rev = json_i64(json_object_get(kv, "mod_revision"));
  if (kv && value) {
    rc = b64_decode(json_string_value(json_object_get(kv, "value")), value, bytes);
    if (rc)
      rc = rc == MT_ENOMEM
               ? mt_seterr(rc, "store(etcd): %s: out of memory", what)
               : mt_seterr(rc, "store(etcd %s): %s: the value is not base64", s->names, what);
  }
  json_decref(j);
  return rc;
}

static int es_set(mt_store *b, const char *key, const void *value, size_t bytes) {
  etcd_store *s = of(b);
  char what[300];
  snprintf(what, sizeof what, "set %.200s (%zu bytes)", key, bytes);
  char *k = key64(s, key), *v = b64_encode(value, bytes);
  char *body = k && v ? pack_body(json_pack("{s:s, s:s}", "key", k, "value", v)) : NULL;
  free(k), free(v);
  if (!body) return mt_seterr(MT_ENOMEM, "store(etcd): %s: out of memory", what);
  json_t *j;
  int rc = etcd_call(s, "/v3/kv/put", body, SAFE_TO_RETRY, what, &j);
  free(body);
  json_decref(j);
  return rc;
}

/* A watch's wait for the first PUT of its key. */
typedef struct watch_wait {
  int put;
  void *value;
  size_t bytes;
  int rc;
} watch_wait;

/* One message of the watch's stream; nonzero ends the watch. */
static int on_watch_message(json_t *m, void *arg) {
  watch_wait *w = arg;
  json_t *res = json_object_get(m, "result");
  /* an error message, or a watch etcd canceled (compacted past its
   * revision): over; the caller reads the key again */
  if (!res || json_is_true(json_object_get(res, "canceled"))) return 1;
  size_t i;
  json_t *ev;
  json_array_foreach(json_object_get(res, "events"), i, ev) {
    const char *type = json_string_value(json_object_get(ev, "type"));
    if (type && strcmp(type, "PUT")) continue; /* PUT is 0: left out */
    json_t *kv = json_object_get(ev, "kv");
    w->rc = b64_decode(json_string_value(json_object_get(kv, "value")), &w->value, &w->bytes);
    w->put = 1;
    return 1;
  }
  return 0;
}

/* Watches key from revision from on, for at most slice_ms: 1 with its value
 * when it was put, 0 when the slice passed (or the watch ended early). */
static int watch_put(etcd_store *s, const char *key, int64_t from, int slice_ms, void **value,
                     size_t *bytes) {
  char *k = key64(s, key);
  char revtext[32];
  snprintf(revtext, sizeof revtext, "%" PRId64, from);
  char *body = k ? pack_body(json_pack("{s:{s:s, s:s}}", "create_request", "key", k,
                                       "start_revision", revtext))
                 : NULL;
  free(k);
  if (!body) return mt_seterr(MT_ENOMEM, "store(etcd): get %s: out of memory", key);
  watch_wait w = {0};
  reply_buf r = {.on_message = on_watch_message, .arg = &w};
  http_result h;
  int i = atomic_load(&s->cur);
  int64_t t0 = mt_mono_ms();
  http_post(s, i, "/v3/watch", body, slice_ms, 1, &r, &h);
  free(body);
  free(r.p);
  if (w.put) {
    if (w.rc)
      return mt_seterr(MT_ECORRUPT, "store(etcd %s): get %s: a value not base64", s->names, key);
    *value = w.value, *bytes = w.bytes;
    return 1;
  }
  if (h.code && h.code != CURLE_OPERATION_TIMEDOUT) {
    /* that member went away: the next read finds another; not at once */
    atomic_compare_exchange_strong(&s->cur, &i, (i + 1) % s->n_eps);
    int64_t spent = mt_mono_ms() - t0;
    if (spent < 50) sleep_ms((int)(50 - spent));
  }
  return 0;
}

static int es_get(mt_store *b, const char *key, void **value, size_t *bytes_out, int timeout_ms) {
  etcd_store *s = of(b);
  size_t spare, *bytes = bytes_out ? bytes_out : &spare; /* bytes may be NULL */
  *value = NULL, *bytes = 0;
  char what[300];
  snprintf(what, sizeof what, "get %.200s", key);
  int64_t end = timeout_ms < 0 ? -1 : mt_mono_ms() + timeout_ms;
  for (;;) {
    int found;
    int64_t rev = 0;
    int rc = range_one(s, key, what, &found, value, bytes, NULL, &rev);
    if (rc || found) return rc;
    int64_t left = end < 0 ? WATCH_SLICE_MS : end - mt_mono_ms();
    if (left <= 0)
      return mt_seterr(MT_ETIMEDOUT, "store(etcd %s): key %s: not set within %d ms", s->names, key,
                       timeout_ms);
    rc = watch_put(s, key, rev + 1, (int)(left < WATCH_SLICE_MS ? left : WATCH_SLICE_MS), value,
                   bytes);
    if (rc) return rc < 0 ? rc : 0;
  }
}

static int es_check(mt_store *b, const char *key) {
  etcd_store *s = of(b);
  char what[300];
  snprintf(what, sizeof what, "check %.200s", key);
  int found;
  int rc = range_one(s, key, what, &found, NULL, NULL, NULL, NULL);
  return rc ? rc : found;
}

static int es_add(mt_store *b, const char *key, int64_t delta, int64_t *result) {
  etcd_store *s = of(b);
  char what[300];
  snprintf(what, sizeof what, "add %" PRId64 " to %.200s", delta, key);
  for (;;) {
    int found;
    void *v = NULL;
    size_t n = 0;
    int64_t mod = 0;
    int rc = range_one(s, key, what, &found, &v, &n, &mod, NULL);
    if (rc) return rc;
    int64_t now = 0;
    if (found) {
      char *end;
      errno = 0;
      now = strtoll(v, &end, 10);
      if (!n || *end || errno) {
        rc = mt_seterr(MT_EINVAL,
                       "store(etcd): add to key %s: its value \"%.40s\" is not an integer", key,
                       (char *)v);
        free(v);
        return rc;
      }
    }
    free(v);
    if ((delta > 0 && now > INT64_MAX - delta) || (delta < 0 && now < INT64_MIN - delta))
      return mt_seterr(MT_EINVAL, "store(etcd): key %s: adding %" PRId64 " overflows 64 bits", key,
                       delta);
    char text[32], modtext[32];
    snprintf(text, sizeof text, "%" PRId64, now + delta);
    snprintf(modtext, sizeof modtext, "%" PRId64, mod);
    char *k = key64(s, key), *tv = b64_encode(text, strlen(text));
    /* the new count lands only on the value it was counted from */
    json_t *cmp = found ? json_pack("{s:s, s:s, s:s, s:s}", "key", k ? k : "", "target", "MOD",
                                    "result", "EQUAL", "mod_revision", modtext)
                        : json_pack("{s:s, s:s, s:s, s:s}", "key", k ? k : "", "target", "CREATE",
                                    "result", "EQUAL", "create_revision", "0");
    json_t *req = NULL; /* "o" takes cmp, on failure too */
    if (k && tv)
      req = json_pack("{s:[o], s:[{s:{s:s, s:s}}]}", "compare", cmp, "success", "request_put",
                      "key", k, "value", tv);
    else
      json_decref(cmp);
    char *body = pack_body(req);
    free(k), free(tv);
    if (!body) return mt_seterr(MT_ENOMEM, "store(etcd): %s: out of memory", what);
    json_t *j;
    rc = etcd_call(s, "/v3/kv/txn", body, 0, what, &j);
    free(body);
    if (rc) return rc;
    int swapped = json_is_true(json_object_get(j, "succeeded"));
    json_decref(j);
    if (swapped) {
      if (result) *result = now + delta;
      return 0;
    }
  }
}

/* Deletes [key, range_end) (range_end NULL: the key alone); *n how many. */
static int delete_range(etcd_store *s, const char *key, int whole_prefix, const char *what,
                        int64_t *n) {
  size_t len;
  char *fk = full_key(s, key, &len);
  char *k = fk ? b64_encode(fk, len) : NULL, *end = NULL;
  if (fk && whole_prefix) { /* the first key past every one that starts with it */
    while (len && (unsigned char)fk[len - 1] == 0xff) len--;
    if (len) fk[len - 1]++;
    end = len ? b64_encode(fk, len) : strdup("AA=="); /* "\0": every key from key on */
  }
  char *body = k && (!whole_prefix || end)
                   ? pack_body(whole_prefix ? json_pack("{s:s, s:s}", "key", k, "range_end", end)
                                            : json_pack("{s:s}", "key", k))
                   : NULL;
  free(fk), free(k), free(end);
  if (!body) return mt_seterr(MT_ENOMEM, "store(etcd): %s: out of memory", what);
  json_t *j;
  int rc = etcd_call(s, "/v3/kv/deleterange", body, 0, what, &j);
  free(body);
  if (rc) return rc;
  *n = json_i64(json_object_get(j, "deleted"));
  json_decref(j);
  return 0;
}

static int es_del(mt_store *b, const char *key) {
  etcd_store *s = of(b);
  char what[300];
  snprintf(what, sizeof what, "delete %.200s", key);
  int64_t n = 0;
  int rc = delete_range(s, key, 0, what, &n);
  if (rc) return rc;
  return n ? 0 : mt_seterr(MT_ENOENT, "store(etcd): delete %s: no such key", key);
}

static int es_del_prefix(mt_store *b, const char *prefix, int64_t *deleted) {
  etcd_store *s = of(b);
  char what[300];
  snprintf(what, sizeof what, "delete keys under %.200s", prefix);
  int64_t n = 0;
  int rc = delete_range(s, prefix, 1, what, &n);
  if (deleted) *deleted = rc ? 0 : n;
  return rc;
}

/* n keys as they are now, TXN_READS to a transaction (each one snapshot). */
static int es_get_many(mt_store *b, const char *const *keys, size_t n, void **values,
                       size_t *bytes) {
  etcd_store *s = of(b);
  for (size_t i = 0; i < n; i++) values[i] = NULL;
  if (bytes)
    for (size_t i = 0; i < n; i++) bytes[i] = 0;
  int rc = 0;
  for (size_t at = 0; at < n && !rc; at += TXN_READS) {
    size_t m = n - at < TXN_READS ? n - at : TXN_READS;
    char what[300];
    snprintf(what, sizeof what, "read %zu keys from %.200s", m, keys[at]);
    json_t *ops = json_array();
    for (size_t i = 0; ops && i < m; i++) {
      char *k = key64(s, keys[at + i]);
      if (!k || json_array_append_new(ops, json_pack("{s:{s:s}}", "request_range", "key", k))) {
        json_decref(ops), ops = NULL;
      }
      free(k);
    }
    char *body = ops ? pack_body(json_pack("{s:o}", "success", ops)) : NULL;
    if (!body) {
      rc = mt_seterr(MT_ENOMEM, "store(etcd): %s: out of memory", what);
      break;
    }
    json_t *j;
    rc = etcd_call(s, "/v3/kv/txn", body, SAFE_TO_RETRY, what, &j);
    free(body);
    if (rc) break;
    json_t *res = json_object_get(j, "responses");
    for (size_t i = 0; i < m && !rc; i++) {
      json_t *kv = json_array_get(
          json_object_get(json_object_get(json_array_get(res, i), "response_range"), "kvs"), 0);
      if (!kv) continue;
      size_t nb = 0;
      rc = b64_decode(json_string_value(json_object_get(kv, "value")), &values[at + i], &nb);
      if (rc) rc = mt_seterr(rc, "store(etcd %s): %s: a value not base64", s->names, what);
      if (bytes) bytes[at + i] = nb;
    }
    json_decref(j);
  }
  if (rc)
    for (size_t i = 0; i < n; i++) free(values[i]), values[i] = NULL;
  return rc;
}

static void es_free(mt_store *b) {
  etcd_store *s = of(b);
  if (!s) return;
  for (int i = 0; i < s->n_pool; i++) curl_easy_cleanup(s->pool[i]);
  for (int i = 0; i < s->n_eps; i++) free(s->eps[i]);
  free(s->prefix), free(s->user), free(s->password), free(s->cacert), free(s->cert), free(s->key);
  pthread_mutex_destroy(&s->mu);
  free(s);
}

/* ---- an election ---- */

static int lease_call(etcd_store *s, const char *path, int64_t lease, int ttl_s, const char *what,
                      json_t **j) {
  char id[32], ttl[32];
  snprintf(id, sizeof id, "%" PRId64, lease);
  snprintf(ttl, sizeof ttl, "%d", ttl_s);
  char *body = pack_body(lease ? json_pack("{s:s}", "ID", id) : json_pack("{s:s}", "TTL", ttl));
  if (!body) return mt_seterr(MT_ENOMEM, "store(etcd): %s: out of memory", what);
  int rc = etcd_call(s, path, body, SAFE_TO_RETRY, what, j);
  free(body);
  return rc;
}

int mt_store_etcd_campaign(mt_store *b, const char *key, const char *value, int ttl_s,
                           int64_t *lease, char *holder, size_t holder_size) {
  etcd_store *s = of(b);
  *lease = 0;
  if (holder_size) holder[0] = 0;
  char what[300];
  snprintf(what, sizeof what, "campaign for %.200s", key);
  json_t *j;
  int rc = lease_call(s, "/v3/lease/grant", 0, ttl_s > 0 ? ttl_s : 1, what, &j);
  if (rc) return rc;
  int64_t id = json_i64(json_object_get(j, "ID"));
  json_decref(j);
  if (!id) return mt_seterr(MT_EIO, "store(etcd %s): %s: etcd granted no lease", s->names, what);
  char idtext[32];
  snprintf(idtext, sizeof idtext, "%" PRId64, id);
  char *k = key64(s, key), *v = b64_encode(value, strlen(value));
  /* put it only where nobody has: the key's create revision is 0 */
  char *body = k && v ? pack_body(json_pack(
                            "{s:[{s:s, s:s, s:s, s:s}], s:[{s:{s:s, s:s, s:s}}], s:[{s:{s:s}}]}",
                            "compare", "key", k, "target", "CREATE", "result", "EQUAL",
                            "create_revision", "0", "success", "request_put", "key", k, "value", v,
                            "lease", idtext, "failure", "request_range", "key", k))
                      : NULL;
  free(k), free(v);
  if (!body) return mt_seterr(MT_ENOMEM, "store(etcd): %s: out of memory", what);
  rc = etcd_call(s, "/v3/kv/txn", body, 0, what, &j);
  free(body);
  if (rc) return rc; /* the lease runs out by itself */
  if (json_is_true(json_object_get(j, "succeeded"))) {
    json_decref(j);
    *lease = id;
    return 1;
  }
  json_t *kv = json_array_get(
      json_object_get(
          json_object_get(json_array_get(json_object_get(j, "responses"), 0), "response_range"),
          "kvs"),
      0);
  void *held = NULL;
  size_t n = 0;
  if (kv && !b64_decode(json_string_value(json_object_get(kv, "value")), &held, &n) && holder_size)
    snprintf(holder, holder_size, "%s", (char *)held);
  free(held);
  json_decref(j);
  mt_store_etcd_resign(b, id); /* not needed: the leader's lease holds the key */
  return 0;
}

int mt_store_etcd_depose(mt_store *b, const char *key, const char *value) {
  etcd_store *s = of(b);
  char what[300];
  snprintf(what, sizeof what, "delete %.200s as the dead leader left it", key);
  char *k = key64(s, key), *v = b64_encode(value, strlen(value));
  char *body = k && v ? pack_body(json_pack("{s:[{s:s, s:s, s:s, s:s}], s:[{s:{s:s}}]}", "compare",
                                            "key", k, "target", "VALUE", "result", "EQUAL", "value",
                                            v, "success", "request_delete_range", "key", k))
                      : NULL;
  free(k), free(v);
  if (!body) return mt_seterr(MT_ENOMEM, "store(etcd): %s: out of memory", what);
  json_t *j;
  /* sent again safely: a second delete of the same value finds none */
  int rc = etcd_call(s, "/v3/kv/txn", body, SAFE_TO_RETRY, what, &j);
  free(body);
  if (rc) return rc;
  int deleted = json_is_true(json_object_get(j, "succeeded"));
  json_decref(j);
  return deleted;
}

int mt_store_etcd_keepalive(mt_store *b, int64_t lease) {
  etcd_store *s = of(b);
  char what[64];
  snprintf(what, sizeof what, "keep lease %" PRIx64 " alive", (uint64_t)lease);
  json_t *j;
  int rc = lease_call(s, "/v3/lease/keepalive", lease, 0, what, &j);
  if (rc) return rc;
  json_t *res = json_object_get(j, "result");
  int64_t ttl = json_i64(json_object_get(res ? res : j, "TTL"));
  json_decref(j);
  if (ttl <= 0)
    return mt_seterr(MT_ENOENT, "store(etcd %s): lease %" PRIx64 " had expired", s->names,
                     (uint64_t)lease);
  return 0;
}

int mt_store_etcd_resign(mt_store *b, int64_t lease) {
  etcd_store *s = of(b);
  char what[64];
  snprintf(what, sizeof what, "revoke lease %" PRIx64, (uint64_t)lease);
  json_t *j;
  int rc = lease_call(s, "/v3/lease/revoke", lease, 0, what, &j);
  json_decref(j);
  if (rc && strstr(mt_errmsg(), "not found")) rc = 0; /* gone already */
  return rc;
}

/* ---- making one ---- */

static pthread_once_t curl_once = PTHREAD_ONCE_INIT;
static CURLcode curl_init_rc;
static void curl_init(void) { curl_init_rc = curl_global_init(CURL_GLOBAL_DEFAULT); }

static int parse_endpoints(etcd_store *s, const char *endpoints) {
  const char *p = endpoints;
  while (*p) {
    size_t n = strcspn(p, ",");
    while (n && (*p == ' ')) p++, n--;
    size_t m = n;
    while (m && (p[m - 1] == ' ' || p[m - 1] == '/')) m--;
    if (m) {
      if (s->n_eps == MAX_ENDPOINTS)
        return mt_seterr(MT_EINVAL, "store(etcd): more than %d endpoints in \"%.200s\"",
                         MAX_ENDPOINTS, endpoints);
      int has_scheme =
          (m > 7 && !strncmp(p, "http://", 7)) || (m > 8 && !strncmp(p, "https://", 8));
      if (!has_scheme && memchr(p, '/', m))
        return mt_seterr(MT_EINVAL,
                         "store(etcd): endpoint \"%.*s\": not http://host:port, https://host:port "
                         "or host:port",
                         (int)m, p);
      char *e = malloc(m + 8);
      if (!e) return mt_seterr(MT_ENOMEM, "store(etcd): out of memory");
      snprintf(e, m + 8, "%s%.*s", has_scheme ? "" : "http://", (int)m, p);
      s->eps[s->n_eps++] = e;
    }
    p += n;
    if (*p == ',') p++;
  }
  if (!s->n_eps) return mt_seterr(MT_EINVAL, "store(etcd): no endpoint in \"%.200s\"", endpoints);
  size_t at = 0;
  for (int i = 0; i < s->n_eps && at < sizeof s->names; i++)
    at += (size_t)snprintf(s->names + at, sizeof s->names - at, "%s%s", i ? "," : "", s->eps[i]);
  return 0;
}

int mt_store_etcd_new(const char *endpoints, const mt_store_etcd_opts *opts, mt_store **out) {
  *out = NULL;
  mt_store_etcd_opts o = opts ? *opts : (mt_store_etcd_opts){0};
  if (!o.user != !o.password)
    return mt_seterr(MT_EINVAL, "store(etcd): a user needs a password and a password a user");
  pthread_once(&curl_once, curl_init);
  if (curl_init_rc)
    return mt_seterr(MT_EIO, "store(etcd): libcurl: %s", curl_easy_strerror(curl_init_rc));
  etcd_store *s = calloc(1, sizeof *s);
  if (!s) return mt_seterr(MT_ENOMEM, "store(etcd): out of memory");
  pthread_mutex_init(&s->mu, NULL);
  s->base = (mt_store){.set = es_set,
                       .get = es_get,
                       .add = es_add,
                       .check = es_check,
                       .del = es_del,
                       .free = es_free,
                       .kind = "etcd",
                       .get_many = es_get_many,
                       .del_prefix = es_del_prefix};
  s->dial_ms = o.dial_timeout_ms > 0 ? o.dial_timeout_ms : 1000;
  s->request_ms = o.request_timeout_ms > 0 ? o.request_timeout_ms : 10000;
  s->prefix = strdup(o.prefix ? o.prefix : "");
  s->prefix_len = s->prefix ? strlen(s->prefix) : 0;
  s->user = o.user ? strdup(o.user) : NULL;
  s->password = o.password ? strdup(o.password) : NULL;
  s->cacert = o.cacert ? strdup(o.cacert) : NULL;
  s->cert = o.cert ? strdup(o.cert) : NULL;
  s->key = o.key ? strdup(o.key) : NULL;
  int rc = 0;
  if (!s->prefix || (o.user && (!s->user || !s->password)) || (o.cacert && !s->cacert) ||
      (o.cert && !s->cert) || (o.key && !s->key))
    rc = mt_seterr(MT_ENOMEM, "store(etcd): out of memory");
  if (!rc && !o.cert != !o.key)
    rc = mt_seterr(MT_EINVAL, "store(etcd): a client certificate needs its key and a key its "
                              "certificate: give both or neither");
  if (!rc) rc = parse_endpoints(s, endpoints ? endpoints : "");
  if (!rc && s->user) rc = authenticate(s);
  if (!rc) { /* one member answers: the cluster is there (and the token good) */
    int found;
    rc = range_one(s, ".reach", "reach the cluster", &found, NULL, NULL, NULL, NULL);
  }
  if (rc) {
    es_free(&s->base);
    return rc;
  }
  *out = &s->base;
  return 0;
}
