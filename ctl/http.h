/* http.h — mtnlgctl's client of the daemon's control API (HTTP/JSON, /v1;
 * notes in proto/, the server in daemon/control/).
 *
 * One libcurl handle, reused across requests (watch and --wait poll over one
 * connection), on the endpoint and token file of the global options (ctl.h).
 * The endpoint may be a comma-separated list (any daemon of a cluster
 * answers for all of it, as etcdctl's --endpoints): requests go to the
 * first, and to the next whenever one cannot be reached (no connection, or
 * a read with no answer), for the rest of the process; a mutation that went
 * out unanswered is not sent on (mutate.c sends it again, with its
 * Idempotency-Key, and that try goes to the next).
 * Connect timeout 3 s, whole request 10 s. Bodies are JSON both ways; an
 * error answer (4xx/5xx, application/problem+json) becomes one line naming
 * the status and the daemon's detail. The token file is read when a request
 * first needs it: for a mutation (POST), and for a read only once the daemon
 * answered one 401 (control.reads_need_token), which is then sent again with
 * the token, as every read after it is; a read of a daemon that does not
 * ask never reads the file. Under -o json a refusal's problem+json object
 * is printed on stdout as well, so a script reads JSON in every case where
 * the daemon answered. The token is sent as a bearer header and never
 * printed. Nothing here exits the process.
 */
#ifndef MT_CTL_HTTP_H
#define MT_CTL_HTTP_H

#include <jansson.h>
#include <stddef.h>

enum { CTL_HTTP_CONNECT_TIMEOUT_S = 3, CTL_HTTP_TIMEOUT_S = 10, CTL_HTTP_MAX_ENDPOINTS = 16 };

/* One request: method "GET" or "POST", path from the endpoint's root
 * ("/v1/status"; an endpoint given as ".../v1" is taken as its root), body
 * for POST (NULL: "{}"). On a 2xx answer *out gets the parsed JSON (a new
 * reference) and CTL_EXIT_OK is returned. Otherwise *out is NULL, err holds
 * one line saying what happened (without a "mtnlgctl: " prefix), *problem
 * (when problem is not NULL) gets, when the daemon answered with an error,
 * its problem+json object (a new reference; made of the status, title and
 * err when the answer held none), else NULL, and the return is:
 *   CTL_EXIT_USAGE        the endpoint is not an http(s) URL, the token file
 *                         (when the request needs it) cannot be read or is
 *                         not one word of printable ASCII
 *   CTL_EXIT_UNREACHABLE  no answer: connection refused, timeout, bad host
 *   CTL_EXIT_FAILURE      the daemon answered with an error, or not with JSON
 * *http_status (when not NULL) gets the HTTP status, 0 when none came. */
int ctl_http_request(const char *method, const char *path, const json_t *body, json_t **out,
                     json_t **problem, long *http_status, char *err, size_t err_cap);

/* A request that failed, as every verb prints it: err as "mtnlgctl: <err>"
 * on stderr and, under -o json, the daemon's problem object (when not NULL)
 * on stdout, as the answer a script reads (kubectl prints its Status so). */
void ctl_http_print_error(const char *err, const json_t *problem);

/* ctl_http_request that prints a failure by ctl_http_print_error. */
int ctl_http_get(const char *path, json_t **out);
int ctl_http_post(const char *path, const json_t *body, json_t **out);

/* Every POST after this carries "Idempotency-Key: key" (NULL: none); key
 * is 1 to 255 printable ASCII characters (proto/control-v1.yaml). */
void ctl_http_set_idempotency_key(const char *key);
/* Whether the last request went out: a connection (and its TLS handshake)
 * was made, so the daemon may have acted on it even when no answer came;
 * 0 when it was refused, timed out connecting, or never started. */
int ctl_http_sent(void);
/* Whether the last answer echoed the request's Idempotency-Key (a header
 * of the same name and value): a daemon that honours the key says so on
 * every answer to a keyed mutation, a 503 included; an older one, or a
 * proxy's own answer, does not. */
int ctl_http_key_echoed(void);

/* The endpoint requests go to now, as given (one of -e's list); -e as
 * given before the first request. */
const char *ctl_http_endpoint(void);

/* Frees the handle and libcurl's global state; safe to call when unused. */
void ctl_http_close(void);

#endif
