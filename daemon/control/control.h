/* control.h — the HTTP/JSON control plane of one daemon (libmicrohttpd).
 *
 * The server knows nothing of training: every answer comes from a provider,
 * the daemon's node module, through the callbacks below, called from the
 * server's own thread (never from libuv's). The server owns HTTP: routing,
 * methods, the bearer token (constant-time compare), body limits, JSON
 * parsing and field checks, problem+json errors, the Prometheus rendering of
 * the status, and the embedded dashboard page. It never exits the process and
 * never blocks training: a provider callback must answer from a snapshot.
 * The contract is proto/control-v1.yaml.
 */
#ifndef MT_CONTROL_H
#define MT_CONTROL_H

#include <jansson.h>
#include <stdint.h>

typedef struct mt_control mt_control;

/* What a provider's mutation callback answers. */
typedef struct mt_control_reply {
  int status;       /* 202 with op set, or an error status (400, 404, 409, 503) */
  json_t *op;       /* new reference: the operation (202) */
  char detail[512]; /* why, for an error status: becomes problem+json "detail" */
  int replayed;     /* the answer a request with the same Idempotency-Key got before */
} mt_control_reply;

typedef struct mt_control_provider {
  /* GET /v1/status: a new reference to the STATUS object, or NULL (500). */
  json_t *(*status)(void *arg);
  /* GET /v1/history: points with step > since (since -1: all kept). */
  json_t *(*history)(void *arg, int64_t since);
  /* GET /v1/checkpoints (NULL: 503, the directory did not answer in time),
   * /v1/operations, /v1/operations/{id} (NULL: 404). */
  json_t *(*checkpoints)(void *arg);
  json_t *(*operations)(void *arg);
  json_t *(*operation)(void *arg, const char *id);
  /* POST /v1/{pause,resume,stop,checkpoint,resize}: kind is the last path
   * segment; args the checked body ({} or {"dp": N}); key the checked
   * Idempotency-Key header (MT_CONTROL_IDEM_KEY_MAX printable ASCII
   * characters at most), or NULL. Fills *reply. */
  void (*submit)(void *arg, const char *kind, json_t *args, const char *key,
                 mt_control_reply *reply);
  void *arg;
} mt_control_provider;

/* The longest bearer token, in bytes; mtnlgctl reads token files up to
 * this too (ctl/http.c), so a token one accepts the other does. */
#define MT_CONTROL_TOKEN_MAX 4096
/* The longest Idempotency-Key header a mutation may carry (the
 * coordinator's MT_RDZV_IDEM_KEY_MAX, mtnlgctl's --idempotency-key). */
#define MT_CONTROL_IDEM_KEY_MAX 255

typedef struct mt_control_opts {
  const char *listen;   /* "HOST:PORT"; PORT 0 picks a free one; default "127.0.0.1:0" */
  const char *token;    /* bearer token for mutations; NULL or "": mutations refused (401) */
  int reads_need_token; /* 1: GETs other than /v1/health need the token too */
  mt_control_provider provider;
  unsigned timeout_s; /* a connection idle this long is closed; 0: 10 s */
  /* a request (its bytes in, its answer out) that takes longer, counted
   * from the connection's open or its previous request's end, has its
   * connection closed, trickled bytes or not; 0: 30 s */
  unsigned request_timeout_s;
  unsigned max_connections; /* connections at once; more wait in the listen backlog; 0: 128 */
  /* HTTPS (GnuTLS under libmicrohttpd) with this certificate chain and
   * private key, PEM text; NULL: plain HTTP */
  const char *tls_cert_pem, *tls_key_pem;
} mt_control_opts;

/* Starts the server thread. 0, or a negative MT_E* code with mt_errmsg()
 * naming the address. */
int mt_control_start(const mt_control_opts *opts, mt_control **out);
/* The port actually bound (useful with port 0). */
int mt_control_port(const mt_control *c);
/* Stops the thread, closes every connection, frees. NULL is fine. */
void mt_control_stop(mt_control *c);

/* Prometheus text (exposition format 0.0.4) for a STATUS object, plus the
 * server's own request counters when c is not NULL. malloc'd; NULL on OOM. */
char *mt_control_metrics_text(const mt_control *c, json_t *status);

#endif
