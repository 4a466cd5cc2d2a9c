/* http.c — the control API client: one libcurl easy handle, JSON in and out,
 * problem+json errors and transport failures turned into one line each.
 *
 * The endpoint is checked and the token file read on the first request, not
 * at start-up, so that offline verbs (plan) never trip over a bad
 * MTNLG_ENDPOINT or token file.
 */
#include <ctype.h>
#include <curl/curl.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctl.h"
#include "fileio.h"
#include "http.h"
#include "mt_config.h"
#include "output.h"

enum {
  MAX_ANSWER_BYTES = 64 << 20, /* no control answer comes near this */
  MAX_TOKEN_BYTES = 4096,      /* the daemon's MT_CONTROL_TOKEN_MAX */
};

typedef struct buf {
  char *data;
  size_t len, cap;
  int too_large;
} buf;

/* What the header callback keeps of the answer's head. */
typedef struct head {
  char reason[64];        /* "Conflict" from "HTTP/1.1 409 Conflict" (empty on HTTP/2) */
  char content_type[128]; /* "application/problem+json" */
  char idem_key[300];     /* the Idempotency-Key the daemon echoed, or "" */
} head;

static struct {
  int tried, init_rc;  /* set up once; init_rc is what every later call returns */
  char init_err[1024]; /* why setting up failed */
  int curl_global;     /* curl_global_init succeeded */
  CURL *curl;          /* reused: keeps the connection between requests */
  /* -e's endpoints (a comma-separated list, etcdctl's --endpoints): each
   * as given, for messages, and its base URL without a trailing '/'; cur
   * is the one requests go to, until it cannot be reached */
  char *names[CTL_HTTP_MAX_ENDPOINTS], *bases[CTL_HTTP_MAX_ENDPOINTS];
  int n_endpoints, cur;
  char *token;               /* NULL: none given, or not read yet */
  int token_tried, token_rc; /* the token file read once; token_rc what it gave */
  char token_err[1024];      /* why it could not be */
  int reads_need_token;      /* a read was answered 401: reads send the token too */
  struct curl_slist *get_headers, *post_headers; /* without the token */
  struct curl_slist *get_auth, *post_auth;       /* the same with it, once read */
  char errbuf[CURL_ERROR_SIZE];
  char idem_header[300]; /* "Idempotency-Key: K" for every POST, or "" */
  int sent;              /* the last request went out (a connection, TLS done) */
  int key_echoed;        /* the last answer echoed the request's Idempotency-Key */
} http;

static void set_err(char *err, size_t cap, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void set_err(char *err, size_t cap, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err, cap, fmt, ap);
  va_end(ap);
}

/* Reads the token: the whole file, one printable word with the whitespace
 * around it (the newline an editor or `echo` leaves) stripped, by the
 * daemon's rule (mt_token_word). Returns 0 or CTL_EXIT_USAGE with err set. */
static int read_token(const char *path, const char *source, char **out, char *err, size_t cap) {
  int ret = CTL_EXIT_USAGE;
  char *tok = NULL;
  FILE *f = fopen(path, "r");
  if (!f) {
    set_err(err, cap,
            "%s: cannot read the token file %s: %s; it must hold the daemon's control token",
            source, path, strerror(errno));
    goto cleanup;
  }
  tok = malloc(MAX_TOKEN_BYTES + 1);
  if (!tok) {
    set_err(err, cap, "out of memory");
    goto cleanup;
  }
  size_t n = fread(tok, 1, MAX_TOKEN_BYTES + 1, f);
  if (ferror(f)) {
    set_err(err, cap, "%s: cannot read the token file %s: %s", source, path, strerror(errno));
    goto cleanup;
  }
  if (n > MAX_TOKEN_BYTES) {
    set_err(err, cap, "%s: the token file %s is over %d bytes; is it the right file?", source, path,
            MAX_TOKEN_BYTES);
    goto cleanup;
  }
  /* the daemon's rule for control.token_file too */
  size_t off, len, bad_at;
  if (mt_token_word(tok, n, &off, &len, &bad_at)) {
    char why[160];
    mt_token_word_why(tok, bad_at, why, sizeof why);
    set_err(err, cap, "%s: the token file %s: %s; a token is one word of printable ASCII", source,
            path, why);
    goto cleanup;
  }
  if (len == 0) {
    set_err(err, cap, "%s: the token file %s is empty", source, path);
    goto cleanup;
  }
  memmove(tok, tok + off, len);
  tok[len] = '\0';
  *out = tok;
  tok = NULL;
  ret = 0;
cleanup:
  if (tok) {
    memset(tok, 0, MAX_TOKEN_BYTES + 1);
    free(tok);
  }
  if (f) fclose(f);
  return ret;
}

static int has_http_scheme(const char *url) {
  const char *host = NULL;
  if (!strncasecmp(url, "http://", 7))
    host = url + 7;
  else if (!strncasecmp(url, "https://", 8))
    host = url + 8;
  return host && *host && *host != '/';
}

/* The headers of a GET and of a POST, with the bearer token when given. */
static int make_headers(const char *token, struct curl_slist **get, struct curl_slist **post) {
  struct curl_slist *h = NULL, *t;
  const char *common[] = {"Accept: application/json, application/problem+json", "Expect:"};
  for (int list = 0; list < 2; list++) {
    h = NULL;
    for (size_t i = 0; i < sizeof common / sizeof *common; i++) {
      if (!(t = curl_slist_append(h, common[i]))) goto oom;
      h = t;
    }
    if (list == 1) {
      if (!(t = curl_slist_append(h, "Content-Type: application/json"))) goto oom;
      h = t;
    }
    if (token) {
      size_t len = strlen(token) + 32;
      char *auth = malloc(len);
      if (!auth) goto oom;
      snprintf(auth, len, "Authorization: Bearer %s", token);
      t = curl_slist_append(h, auth);
      memset(auth, 0, len);
      free(auth);
      if (!t) goto oom;
      h = t;
    }
    *(list ? post : get) = h;
  }
  return 0;
oom:
  curl_slist_free_all(h);
  curl_slist_free_all(*get); /* made before the POST's failed; NULL otherwise */
  *get = NULL;
  return -1;
}

/* One endpoint: checked, and its base URL (also when given as the API's
 * root, ".../v1", ".../v1/", as the API's paths read: the paths asked for
 * carry /v1 themselves). Returns 0, CTL_EXIT_USAGE (err set) or -1 (out of
 * memory). */
static int add_endpoint(const char *ep, size_t len, int index, int count) {
  char *name = strndup(ep, len);
  if (!name) return -1;
  http.names[http.n_endpoints] = name;
  char *base = strdup(name);
  if (!base) return -1;
  http.bases[http.n_endpoints++] = base;
  if (!has_http_scheme(base)) {
    char which[64] = "";
    if (count > 1) snprintf(which, sizeof which, " (endpoint %d of %d)", index + 1, count);
    set_err(http.init_err, sizeof http.init_err,
            "%s: \"%s\"%s is not an http:// or https:// URL (for example %s)",
            ctl.endpoint_source ? ctl.endpoint_source : "-e/--endpoint", name, which,
            CTL_DEFAULT_ENDPOINT);
    return CTL_EXIT_USAGE;
  }
  size_t n = strlen(base);
  while (n > 0 && base[n - 1] == '/') base[--n] = '\0';
  const char *path = strchr(strstr(base, "://") + 3, '/');
  if (path && n >= 3 && !strcmp(base + n - 3, "/v1") && base + n - 3 >= path) {
    base[n -= 3] = '\0';
    while (n > 0 && base[n - 1] == '/') base[--n] = '\0';
  }
  return 0;
}

/* Checks the endpoints, makes the handle; once. The token is load_token's. */
static int setup(void) {
  if (http.tried) return http.init_rc;
  http.tried = 1;
  http.init_rc = CTL_EXIT_USAGE;
  const char *ep = ctl.endpoint ? ctl.endpoint : CTL_DEFAULT_ENDPOINT;
  const char *src = ctl.endpoint_source ? ctl.endpoint_source : "-e/--endpoint";
  int count = 1;
  for (const char *p = ep; *p; p++) count += *p == ',';
  if (count > CTL_HTTP_MAX_ENDPOINTS) {
    set_err(http.init_err, sizeof http.init_err, "%s: %d endpoints; at most %d, comma-separated",
            src, count, CTL_HTTP_MAX_ENDPOINTS);
    return http.init_rc;
  }
  for (int i = 0; i < count; i++) {
    const char *end = strchr(ep, ',');
    size_t len = end ? (size_t)(end - ep) : strlen(ep);
    while (len && (*ep == ' ' || *ep == '\t')) ep++, len--; /* "a, b" as "a,b" */
    while (len && (ep[len - 1] == ' ' || ep[len - 1] == '\t')) len--;
    int rc = add_endpoint(ep, len, i, count);
    if (rc < 0) goto oom;
    if (rc) return http.init_rc;
    ep = end ? end + 1 : ep + len;
  }
  http.init_rc = CTL_EXIT_FAILURE;

  if (curl_global_init(CURL_GLOBAL_DEFAULT)) {
    set_err(http.init_err, sizeof http.init_err, "cannot initialise libcurl");
    return http.init_rc;
  }
  http.curl_global = 1;
  http.curl = curl_easy_init();
  if (!http.curl) goto oom;

  if (make_headers(NULL, &http.get_headers, &http.post_headers)) goto oom;
  http.init_rc = 0;
  return 0;
oom:
  set_err(http.init_err, sizeof http.init_err, "out of memory");
  return http.init_rc;
}

/* The token file (--token-file, MTNLG_TOKEN_FILE), read once, when a request
 * first needs it: a mutation, or a read the daemon answered 401. A read of a
 * daemon that takes reads without a token never touches the file, so a
 * missing or unreadable one does not stop it. */
static int load_token(void) {
  if (http.token_tried) return http.token_rc;
  http.token_tried = 1;
  if (!ctl.token_file) return 0;
  http.token_rc = CTL_EXIT_USAGE;
  if (read_token(ctl.token_file, ctl.token_source ? ctl.token_source : "--token-file", &http.token,
                 http.token_err, sizeof http.token_err))
    return http.token_rc;
  if (make_headers(http.token, &http.get_auth, &http.post_auth)) {
    set_err(http.token_err, sizeof http.token_err, "out of memory");
    return http.token_rc = CTL_EXIT_FAILURE;
  }
  return http.token_rc = 0;
}

static size_t on_body(char *data, size_t size, size_t nmemb, void *arg) {
  buf *b = arg;
  size_t n = size * nmemb;
  if (b->len + n + 1 > MAX_ANSWER_BYTES) {
    b->too_large = 1;
    return 0; /* curl stops with CURLE_WRITE_ERROR */
  }
  if (b->len + n + 1 > b->cap) {
    size_t cap = b->cap ? b->cap : 16384;
    while (cap < b->len + n + 1) cap *= 2;
    char *d = realloc(b->data, cap);
    if (!d) return 0;
    b->data = d;
    b->cap = cap;
  }
  memcpy(b->data + b->len, data, n);
  b->len += n;
  b->data[b->len] = '\0';
  return n;
}

/* Copies s[0..n) into dst without the trailing CR/LF and spaces. */
static void copy_trimmed(char *dst, size_t cap, const char *s, size_t n) {
  while (n > 0 && isspace((unsigned char)s[n - 1])) n--;
  if (n >= cap) n = cap - 1;
  memcpy(dst, s, n);
  dst[n] = '\0';
}

static size_t on_header(char *data, size_t size, size_t nmemb, void *arg) {
  head *h = arg;
  size_t n = size * nmemb;
  if (n > 5 && !strncmp(data, "HTTP/", 5)) {
    /* a new status line (after a 100 Continue, say): forget the earlier head */
    memset(h, 0, sizeof *h);
    const char *sp = memchr(data, ' ', n);
    if (sp) sp = memchr(sp + 1, ' ', n - (size_t)(sp + 1 - data));
    if (sp) copy_trimmed(h->reason, sizeof h->reason, sp + 1, n - (size_t)(sp + 1 - data));
    /* ASCII, as RFC 9112 has it: a proxy's Latin-1 or UTF-8 reaches neither
     * the terminal nor the JSON a script reads as raw bytes */
    for (char *p = h->reason; *p; p++)
      if ((unsigned char)*p >= 0x80 || (unsigned char)*p < 0x20) *p = '?';
  } else if (n > 13 && !strncasecmp(data, "Content-Type:", 13)) {
    const char *v = data + 13;
    while (v < data + n && (*v == ' ' || *v == '\t')) v++;
    copy_trimmed(h->content_type, sizeof h->content_type, v, n - (size_t)(v - data));
  } else if (n > 16 && !strncasecmp(data, "Idempotency-Key:", 16)) {
    const char *v = data + 16;
    while (v < data + n && (*v == ' ' || *v == '\t')) v++;
    copy_trimmed(h->idem_key, sizeof h->idem_key, v, n - (size_t)(v - data));
  }
  return n;
}

static const char *standard_reason(long status) {
  switch (status) {
  case 400: return "Bad Request";
  case 401: return "Unauthorized";
  case 403: return "Forbidden";
  case 404: return "Not Found";
  case 405: return "Method Not Allowed";
  case 409: return "Conflict";
  case 413: return "Content Too Large";
  case 500: return "Internal Server Error";
  case 502: return "Bad Gateway";
  case 503: return "Service Unavailable";
  case 504: return "Gateway Timeout";
  default: return "";
  }
}

/* Why curl got no answer, in a few words for "cannot reach ... (WHY)". */
static void transport_reason(CURLcode cc, char *why, size_t cap) {
  long os_errno = 0;
  curl_off_t connect_us = 0;
  curl_easy_getinfo(http.curl, CURLINFO_OS_ERRNO, &os_errno);
  curl_easy_getinfo(http.curl, CURLINFO_CONNECT_TIME_T, &connect_us);
  switch (cc) {
  case CURLE_COULDNT_RESOLVE_HOST: snprintf(why, cap, "unknown host name"); break;
  case CURLE_COULDNT_RESOLVE_PROXY: snprintf(why, cap, "unknown proxy host name"); break;
  case CURLE_COULDNT_CONNECT:
    snprintf(why, cap, "%s", os_errno ? strerror((int)os_errno) : "connection failed");
    break;
  case CURLE_OPERATION_TIMEDOUT:
    if (connect_us == 0)
      snprintf(why, cap, "no connection within %d s", CTL_HTTP_CONNECT_TIMEOUT_S);
    else
      snprintf(why, cap, "no answer within %d s", CTL_HTTP_TIMEOUT_S);
    break;
  case CURLE_GOT_NOTHING: snprintf(why, cap, "it closed the connection without answering"); break;
  default: snprintf(why, cap, "%s", http.errbuf[0] ? http.errbuf : curl_easy_strerror(cc)); break;
  }
  /* "Connection refused" -> "connection refused": it continues a sentence */
  if (why[0] && isupper((unsigned char)why[0]) && !isupper((unsigned char)why[1]))
    why[0] = (char)tolower((unsigned char)why[0]);
}

/* Whether a 401's detail says the daemon takes no mutations at all (it has
 * no control.token_file): then no token the client sends can help. */
static int mutations_off(const char *detail) {
  return detail && strstr(detail, "mutations are off");
}

/* One line for an error answer: "the daemon refused: 409 Conflict: DETAIL".
 * With out_problem, *out_problem gets the answer's problem+json object, or,
 * when the answer held none, one made of its status, title and that line. */
static void answer_error(const char *method, const char *path, long status, const head *h,
                         const buf *b, char *err, size_t cap, json_t **out_problem) {
  json_t *problem = b->len ? json_loadb(b->data, b->len, 0, NULL) : NULL;
  const char *title = NULL, *detail = NULL;
  if (!json_is_object(problem)) {
    json_decref(problem);
    problem = NULL;
  } else {
    title = json_string_value(json_object_get(problem, "title"));
    detail = json_string_value(json_object_get(problem, "detail"));
  }
  if (!title || !*title) title = h->reason[0] ? h->reason : standard_reason(status);
  char d[512] = "";
  if (detail) {
    /* one line: the daemon's text may carry line breaks */
    snprintf(d, sizeof d, ": %s", detail);
    for (char *p = d; *p; p++)
      if (*p == '\n' || *p == '\r' || *p == '\t') *p = ' ';
  }
  char hint[384] = "";
  if (status == 401 && mutations_off(detail))
    snprintf(hint, sizeof hint,
             "; no token can change that: set control.token_file in the daemon's config "
             "(or --set control.token_file=PATH) and restart it");
  else if (status == 401 && !http.token)
    snprintf(hint, sizeof hint,
             "; give the daemon's control token with --token-file PATH or MTNLG_TOKEN_FILE");
  else if (status == 401 && detail && strstr(detail, "not accepted"))
    snprintf(hint, sizeof hint, " (the token sent is the one in %s)", ctl.token_file);
  else if (status == 401)
    snprintf(hint, sizeof hint, "; the token in %s was not accepted", ctl.token_file);
  else if (status == 404 && !json_is_object(problem))
    snprintf(hint, sizeof hint, " (%s %s); is %s an mtnlgd control endpoint?", method, path,
             http.bases[http.cur]);
  else if (status >= 300 && status < 400)
    snprintf(hint, sizeof hint,
             " (%s %s; redirects are not followed: set -e/--endpoint to the "
             "address that answers)",
             method, path);
  set_err(err, cap, "the daemon %s: %ld%s%s%s%s", status >= 500 ? "failed" : "refused", status,
          *title ? " " : "", title, d, hint);
  if (out_problem && !problem)
    problem = json_pack("{s:s, s:s, s:I, s:s}", "type", "about:blank", "title", title, "status",
                        (json_int_t)status, "detail", err);

  if (out_problem) {
    *out_problem = problem;
    problem = NULL;
  }
  json_decref(problem);
}

int ctl_http_request(const char *method, const char *path, const json_t *body, json_t **out,
                     json_t **problem, long *http_status, char *err, size_t err_cap) {
  int ret, post = !strcmp(method, "POST");
  char *url = NULL, *payload = NULL;
  struct curl_slist *keyed = NULL; /* the headers with the Idempotency-Key */
  buf b = {0};
  head h = {0};
  long status = 0;
  *out = NULL;
  if (problem) *problem = NULL;
  err[0] = '\0';
  if (http_status) *http_status = 0;
  http.sent = http.key_echoed = 0; /* this request's, whatever way it ends */
  if ((ret = setup())) {
    set_err(err, err_cap, "%s", http.init_err);
    goto cleanup;
  }
  if ((post || http.reads_need_token) && (ret = load_token())) {
    set_err(err, err_cap, "%s", http.token_err);
    goto cleanup;
  }
  /* the endpoints that could not be reached in this request, and why */
  char tried[1024] = "";
  int tries = 0;
again:
  ret = CTL_EXIT_FAILURE;
  size_t url_len = strlen(http.bases[http.cur]) + strlen(path) + 1;
  if (!(url = malloc(url_len))) {
    set_err(err, err_cap, "out of memory");
    goto cleanup;
  }
  snprintf(url, url_len, "%s%s", http.bases[http.cur], path);

  CURL *c = http.curl;
  http.errbuf[0] = '\0';
  curl_easy_setopt(c, CURLOPT_URL, url);
  if (ctl.cacert) { /* that CA alone: not also the system's directory of them */
    curl_easy_setopt(c, CURLOPT_CAINFO, ctl.cacert);
    curl_easy_setopt(c, CURLOPT_CAPATH, NULL);
  }
  curl_easy_setopt(c, CURLOPT_ERRORBUFFER, http.errbuf);
  curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT, (long)CTL_HTTP_CONNECT_TIMEOUT_S);
  curl_easy_setopt(c, CURLOPT_TIMEOUT, (long)CTL_HTTP_TIMEOUT_S);
  curl_easy_setopt(c, CURLOPT_USERAGENT, "mtnlgctl/" MT_VERSION);
  curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_body);
  curl_easy_setopt(c, CURLOPT_WRITEDATA, &b);
  curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, on_header);
  curl_easy_setopt(c, CURLOPT_HEADERDATA, &h);
  struct curl_slist *hdrs = http.token ? (post ? http.post_auth : http.get_auth)
                                       : (post ? http.post_headers : http.get_headers);
  if (post && http.idem_header[0]) { /* the list with the key: this request's own */
    /* curl_slist_append returns NULL, the list kept, when it fails: the
     * list so far is freed then */
    struct curl_slist *t = NULL;
    for (struct curl_slist *h = hdrs; h; h = h->next) {
      if (!(t = curl_slist_append(keyed, h->data))) break;
      keyed = t;
    }
    if (t || !hdrs) t = curl_slist_append(keyed, http.idem_header);
    if (!t) {
      set_err(err, err_cap, "out of memory");
      goto cleanup;
    }
    hdrs = keyed = t;
  }
  curl_easy_setopt(c, CURLOPT_HTTPHEADER, hdrs);
  if (post) {
    payload = body ? json_dumps(body, JSON_COMPACT) : strdup("{}");
    if (!payload) {
      set_err(err, err_cap, "out of memory");
      goto cleanup;
    }
    curl_easy_setopt(c, CURLOPT_POST, 1L);
    curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE, (long)strlen(payload));
    curl_easy_setopt(c, CURLOPT_POSTFIELDS, payload);
  } else {
    curl_easy_setopt(c, CURLOPT_HTTPGET, 1L);
  }

  CURLcode cc = curl_easy_perform(c);
  curl_off_t pretransfer = 0;
  http.sent = curl_easy_getinfo(c, CURLINFO_PRETRANSFER_TIME_T, &pretransfer) == CURLE_OK &&
              pretransfer > 0;
  /* "Idempotency-Key: " is 17 bytes: the key follows */
  http.key_echoed = post && http.idem_header[0] && !strcmp(h.idem_key, http.idem_header + 17);
  if (cc == CURLE_WRITE_ERROR && b.too_large) {
    set_err(err, err_cap, "the answer to %s %s from %s is over %d MiB; is it an mtnlgd?", method,
            path, http.names[http.cur], MAX_ANSWER_BYTES >> 20);
    goto cleanup;
  }
  if (cc == CURLE_OUT_OF_MEMORY || cc == CURLE_WRITE_ERROR) {
    set_err(err, err_cap, "out of memory reading the answer to %s %s", method, path);
    goto cleanup;
  }
  /* libcurl's own words on what failed, when it left any, else its code's */
  const char *curl_why = http.errbuf[0] ? http.errbuf : curl_easy_strerror(cc);
  /* libcurl says "unsupported protocol" too of an answer that is no HTTP
   * (HTTP/0.9): then a server was reached, and the URL was fine */
  char *peer = NULL;
  if (cc == CURLE_UNSUPPORTED_PROTOCOL &&
      curl_easy_getinfo(c, CURLINFO_PRIMARY_IP, &peer) == CURLE_OK && peer && peer[0]) {
    set_err(err, err_cap,
            "%s answered, but not in HTTP (%s); is it an mtnlgd's control port (control.listen), "
            "not the rendezvous store's?",
            http.names[http.cur], curl_why);
    ret = CTL_EXIT_UNREACHABLE;
    goto cleanup;
  }
  if (cc == CURLE_URL_MALFORMAT || cc == CURLE_UNSUPPORTED_PROTOCOL) {
    set_err(err, err_cap, "%s: \"%s\" is not a URL libcurl can use: %s",
            ctl.endpoint_source ? ctl.endpoint_source : "-e/--endpoint", http.names[http.cur],
            curl_why);
    ret = CTL_EXIT_USAGE;
    goto cleanup;
  }
  if (cc == CURLE_SSL_CACERT_BADFILE) {
    set_err(err, err_cap, "--cacert/MTNLG_CACERT %s: not a CA certificate libcurl can read (%s)",
            ctl.cacert ? ctl.cacert : "(the system's)", curl_why);
    ret = CTL_EXIT_USAGE;
    goto cleanup;
  }
  if (cc == CURLE_PEER_FAILED_VERIFICATION) {
    set_err(err, err_cap,
            "the daemon at %s did not prove it is the daemon named (%s); give the CA that signed "
            "its certificate with --cacert PATH or MTNLG_CACERT",
            http.names[http.cur], curl_why);
    ret = CTL_EXIT_UNREACHABLE;
    goto cleanup;
  }
  if (cc == CURLE_SSL_CONNECT_ERROR) {
    set_err(err, err_cap,
            "no TLS connection with the daemon at %s (%s); does it serve https (control.tls_cert), "
            "or plain http://?",
            http.names[http.cur], curl_why);
    ret = CTL_EXIT_UNREACHABLE;
    goto cleanup;
  }
  if (cc != CURLE_OK) {
    char why[CURL_ERROR_SIZE + 64];
    transport_reason(cc, why, sizeof why);
    size_t at = strlen(tried);
    snprintf(tried + at, sizeof tried - at, "%s%s: %s", at ? "; " : "", http.names[http.cur], why);
    /* the next endpoint, unless every one was tried, or a mutation went
     * out (the daemon may have acted: mutate.c decides whether to send it
     * again, with its Idempotency-Key, and that try goes on to the next
     * one, this one not answering a connection) */
    if (++tries < http.n_endpoints && (!post || !http.sent)) {
      http.cur = (http.cur + 1) % http.n_endpoints;
      if (keyed) curl_easy_setopt(http.curl, CURLOPT_HTTPHEADER, NULL);
      curl_slist_free_all(keyed), keyed = NULL;
      free(payload), payload = NULL;
      free(url), url = NULL;
      free(b.data);
      memset(&b, 0, sizeof b);
      memset(&h, 0, sizeof h);
      goto again;
    }
    if (tries > 1)
      set_err(err, err_cap,
              "cannot reach the daemon at any of %d endpoints (%s); is mtnlgd running? set "
              "-e/--endpoint or MTNLG_ENDPOINT",
              tries, tried);
    else
      set_err(err, err_cap,
              "cannot reach the daemon at %s (%s); is mtnlgd running? set -e/--endpoint or "
              "MTNLG_ENDPOINT",
              http.names[http.cur], why);
    /* the next request starts at the next one: this one did not answer */
    http.cur = (http.cur + 1) % http.n_endpoints;
    ret = CTL_EXIT_UNREACHABLE;
    goto cleanup;
  }
  curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
  if (http_status) *http_status = status;
  if (status == 401 && !post && !http.reads_need_token && ctl.token_file) {
    /* control.reads_need_token: reads too, from now on, with the token */
    http.reads_need_token = 1;
    free(payload), free(url), free(b.data);
    curl_slist_free_all(keyed);
    return ctl_http_request(method, path, body, out, problem, http_status, err, err_cap);
  }
  if (status < 200 || status >= 300) {
    answer_error(method, path, status, &h, &b, err, err_cap, problem);
    goto cleanup;
  }
  json_error_t jerr;
  json_t *root = json_loadb(b.data ? b.data : "", b.len, 0, &jerr);
  if (!root) {
    set_err(err, err_cap,
            "the answer to %s %s from %s is not JSON (%s, line %d); is it an mtnlgd control "
            "endpoint?",
            method, path, http.names[http.cur], jerr.text, jerr.line);
    goto cleanup;
  }
  *out = root;
  ret = CTL_EXIT_OK;
cleanup:
  if (keyed) curl_easy_setopt(http.curl, CURLOPT_HTTPHEADER, NULL); /* freed here */
  curl_slist_free_all(keyed);
  free(payload);
  free(url);
  free(b.data);
  return ret;
}

void ctl_http_print_error(const char *err, const json_t *problem) {
  fprintf(stderr, "mtnlgctl: %s\n", err);
  if (problem && ctl.output == CTL_OUTPUT_JSON) ctl_print_json(problem);
}

static int request_printing(const char *method, const char *path, const json_t *body,
                            json_t **out) {
  char err[1024];
  json_t *problem = NULL;
  int rc = ctl_http_request(method, path, body, out, &problem, NULL, err, sizeof err);
  if (rc) ctl_http_print_error(err, problem);
  json_decref(problem);
  return rc;
}

int ctl_http_get(const char *path, json_t **out) {
  return request_printing("GET", path, NULL, out);
}

int ctl_http_post(const char *path, const json_t *body, json_t **out) {
  return request_printing("POST", path, body, out);
}

void ctl_http_close(void) {
  if (http.curl) curl_easy_cleanup(http.curl);
  curl_slist_free_all(http.get_headers);
  curl_slist_free_all(http.post_headers);
  curl_slist_free_all(http.get_auth);
  curl_slist_free_all(http.post_auth);
  if (http.curl_global) curl_global_cleanup();
  if (http.token) {
    memset(http.token, 0, strlen(http.token));
    free(http.token);
  }
  for (int i = 0; i < http.n_endpoints; i++) free(http.names[i]), free(http.bases[i]);
  memset(&http, 0, sizeof http);
}

void ctl_http_set_idempotency_key(const char *key) {
  snprintf(http.idem_header, sizeof http.idem_header, key ? "Idempotency-Key: %s" : "", key);
}

int ctl_http_sent(void) { return http.sent; }

const char *ctl_http_endpoint(void) {
  return http.n_endpoints ? http.names[http.cur] : ctl.endpoint;
}

int ctl_http_key_echoed(void) { return http.key_echoed; }
