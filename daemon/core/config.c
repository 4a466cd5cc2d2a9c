/* config.c — the node config: defaults, INI file, --set overrides, checks. */
#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <ini.h>
#include <limits.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "err.h"
#include "fileio.h"
#include "log.h"

typedef struct problems {
  char text[4096];
  size_t len;
  int n;
  unsigned long long bad; /* bit i: keys[i] was given a value it refused */
} problems;

static void problem(problems *p, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void problem(problems *p, const char *fmt, ...) {
  if (p->len >= sizeof p->text - 2) return;
  if (p->n++) p->text[p->len++] = '\n';
  va_list ap;
  va_start(ap, fmt);
  int w = vsnprintf(p->text + p->len, sizeof p->text - p->len, fmt, ap);
  va_end(ap);
  if (w > 0)
    p->len += (size_t)w < sizeof p->text - p->len ? (size_t)w : sizeof p->text - p->len - 1;
}

/* K_PATH: a K_STR naming a file or directory; relative in the file, it is
 * taken from the file's directory (resolve_path) */
typedef enum { K_STR, K_PATH, K_INT, K_BOOL, K_HOST } key_kind;

/* One row per key: where it lives in the struct and what it accepts. */
typedef struct key_def {
  const char *section, *name;
  key_kind kind;
  size_t offset, size; /* size: of the char array for K_STR */
  long min, max;       /* K_INT bounds */
} key_def;

#define STR(sec, key, field)                                                                       \
  { sec, key, K_STR, offsetof(mt_node_config, field), sizeof(((mt_node_config *)0)->field), 0, 0 }
#define PATH(sec, key, field)                                                                      \
  { sec, key, K_PATH, offsetof(mt_node_config, field), sizeof(((mt_node_config *)0)->field), 0, 0 }
#define INT(sec, key, field, lo, hi)                                                               \
  { sec, key, K_INT, offsetof(mt_node_config, field), 0, lo, hi }
#define BOOL(sec, key, field)                                                                      \
  { sec, key, K_BOOL, offsetof(mt_node_config, field), 0, 0, 1 }

static const key_def keys[] = {
    STR("node", "name", name),
    STR("node", "devices", devices),
    INT("node", "cpu_threads", cpu_threads, 0, 4096),
    STR("rendezvous", "endpoint", endpoint),
    PATH("rendezvous", "key_file", key_file),
    {"rendezvous", "host", K_HOST, offsetof(mt_node_config, host), 0, 0, 0},
    INT("rendezvous", "last_call_ms", last_call_ms, 0, 3600000),
    INT("rendezvous", "join_timeout_s", join_timeout_s, 0, 86400 * 30),
    INT("rendezvous", "max_restarts", max_restarts, 0, 1000000),
    INT("rendezvous", "reform_timeout_s", reform_timeout_s, 0, 86400 * 7),
    INT("rendezvous", "store_max_mb", store_max_mb, 1, 1 << 30),
    STR("rendezvous", "etcd", etcd),
    STR("rendezvous", "etcd_prefix", etcd_prefix),
    STR("rendezvous", "etcd_user", etcd_user),
    PATH("rendezvous", "etcd_password_file", etcd_password_file),
    PATH("rendezvous", "etcd_cacert", etcd_cacert),
    PATH("rendezvous", "etcd_cert", etcd_cert),
    PATH("rendezvous", "etcd_key", etcd_key),
    INT("cluster", "heartbeat_interval_ms", heartbeat_interval_ms, 10, 600000),
    INT("cluster", "heartbeat_timeout_ms", heartbeat_timeout_ms, 50, 3600000),
    INT("cluster", "comm_timeout_ms", comm_timeout_ms, 100, 86400000),
    PATH("job", "path", job_path),
    PATH("job", "presets", presets_dir),
    STR("control", "listen", control_listen),
    PATH("control", "token_file", token_file),
    BOOL("control", "reads_need_token", reads_need_token),
    PATH("control", "tls_cert", tls_cert),
    PATH("control", "tls_key", tls_key),
    PATH("paths", "state_dir", state_dir),
    PATH("paths", "checkpoint_dir", checkpoint_dir),
    STR("log", "level", log_level),
    STR("log", "format", log_format),
};
#define N_KEYS (sizeof keys / sizeof *keys)
_Static_assert(N_KEYS <= 64, "problems.bad has a bit per key");

static void set_defaults(mt_node_config *c) {
  memset(c, 0, sizeof *c);
  if (gethostname(c->name, sizeof c->name - 1) || !c->name[0])
    snprintf(c->name, sizeof c->name, "node");
  char *dot = strchr(c->name, '.');
  if (dot) *dot = 0;
  snprintf(c->devices, sizeof c->devices, "auto");
  snprintf(c->endpoint, sizeof c->endpoint, "127.0.0.1:29400");
  c->host = -1;
  snprintf(c->etcd_prefix, sizeof c->etcd_prefix, "/mtnlg/");
  c->last_call_ms = 3000;
  c->max_restarts = 3;
  c->reform_timeout_s = 600;
  c->store_max_mb = 16384; /* MiB: MT_STORE_SERVER_MAX_BYTES, 16 GiB */
  c->heartbeat_interval_ms = 1000;
  c->heartbeat_timeout_ms = 6000;
  c->comm_timeout_ms = 300000;
  snprintf(c->control_listen, sizeof c->control_listen, "127.0.0.1:8470");
  snprintf(c->state_dir, sizeof c->state_dir, "/var/lib/mtnlg");
  snprintf(c->log_level, sizeof c->log_level, "info");
  snprintf(c->log_format, sizeof c->log_format, "text");
}

static int parse_bool(const char *v, int *out) {
  static const char *const yes[] = {"1", "yes", "true", "on"}, *const no[] = {"0", "no", "false",
                                                                              "off"};
  for (int i = 0; i < 4; i++) {
    if (!strcasecmp(v, yes[i])) return *out = 1, 0;
    if (!strcasecmp(v, no[i])) return *out = 0, 0;
  }
  return -1;
}

static void store_value(mt_node_config *c, problems *p, const char *where, const char *dir,
                        const key_def *k, const char *value);

/* Stores one value; a problem names where it came from ("mtnlgd.conf:12" or "--set").
 * dir: what a relative path from there is taken from (resolve_path). */
static void set_key(mt_node_config *c, problems *p, const char *where, const char *dir,
                    const char *section, const char *name, const char *value) {
  const key_def *k = NULL;
  int section_known = 0;
  for (size_t i = 0; i < N_KEYS; i++) {
    if (!strcmp(keys[i].section, section)) section_known = 1;
    if (!strcmp(keys[i].section, section) && !strcmp(keys[i].name, name)) k = &keys[i];
  }
  if (!k) {
    if (!section_known)
      problem(p, "%s: unknown section [%s]", where, section);
    else
      problem(p, "%s: %s.%s: unknown key", where, section, name);
    return;
  }
  int before = p->n;
  store_value(c, p, where, dir, k, value);
  if (p->n > before) p->bad |= 1ull << (k - keys);
}

/* A relative path in the config file is taken from the file's directory,
 * not from the daemon's working directory (/ under systemd, where
 * "job.json" beside mtnlgd.conf would be /job.json): dir + "/" + value into
 * out. dir NULL: the value came from the command line (--set), where a
 * relative path is the shell's, as any argument's: kept. dir "": a config
 * that is no file in a directory (a pipe), so there is nothing to take it
 * from: refused. 0, or -1 with the problem named. */
static int resolve_path(problems *p, const char *where, const char *dir, const key_def *k,
                        const char *value, char *out, size_t size) {
  if (!dir || !value[0] || value[0] == '/') {
    snprintf(out, size, "%s", value);
    return 0;
  }
  if (!dir[0]) {
    problem(p,
            "%s: %s.%s: \"%s\" is a relative path, and this config is not a file in a "
            "directory to take it from: give an absolute path",
            where, k->section, k->name, value);
    return -1;
  }
  if ((size_t)snprintf(out, size, "%s/%s", dir, value) >= size) {
    problem(p, "%s: %s.%s: %s/%s is longer than %zu characters", where, k->section, k->name, dir,
            value, size - 1);
    return -1;
  }
  return 0;
}

static void store_value(mt_node_config *c, problems *p, const char *where, const char *dir,
                        const key_def *k, const char *value) {
  const char *section = k->section, *name = k->name;
  char *field = (char *)c + k->offset;
  char path[2 * MT_CONF_PATH_MAX];
  switch (k->kind) {
  case K_PATH:
    if (resolve_path(p, where, dir, k, value, path, sizeof path)) return;
    value = path;
    /* fall through */
  case K_STR:
    if (strlen(value) >= k->size) {
      problem(p, "%s: %s.%s: longer than %zu characters", where, section, name, k->size - 1);
      return;
    }
    memcpy(field, value, strlen(value) + 1);
    return;
  case K_INT: {
    char *end;
    errno = 0;
    long v = strtol(value, &end, 10);
    if (errno || end == value || *end || v < k->min || v > k->max) {
      problem(p, "%s: %s.%s: \"%s\" is not an integer in [%ld, %ld]", where, section, name, value,
              k->min, k->max);
      return;
    }
    *(int *)field = (int)v;
    return;
  }
  case K_BOOL:
    if (parse_bool(value, (int *)field))
      problem(p, "%s: %s.%s: \"%s\" is not a boolean (yes/no, true/false, 1/0)", where, section,
              name, value);
    return;
  case K_HOST: {
    int b;
    if (!strcasecmp(value, "auto"))
      *(int *)field = -1;
    else if (!parse_bool(value, &b))
      *(int *)field = b;
    else
      problem(p, "%s: %s.%s: \"%s\" must be auto, yes or no", where, section, name, value);
    return;
  }
  }
}

enum { SEEN_MAX = 256 };

typedef struct ini_ctx {
  mt_node_config *c;
  problems *p;
  const char *path;
  const char *dir; /* the file's directory, absolute ("": none, a pipe) */
  FILE *f;
  int line; /* lines read so far: inih's handler is called for the last one */
  int n_seen;
  struct {
    char key[128];
    int line;
  } seen[SEEN_MAX]; /* section.name of every key set, and where */
} ini_ctx;

/* inih's line reader, counting lines so problems can name them (Debian's
 * inih is built without INI_HANDLER_LINENO). A line longer than inih's
 * buffer would be cut and its rest read as the next line (an error naming
 * the wrong line, or a value cut short): it is named as too long, and none
 * of it is read. */
static char *read_line(char *buf, int size, void *stream) {
  ini_ctx *x = stream;
  char *r = fgets(buf, size, x->f);
  if (!r) return NULL;
  x->line++;
  size_t n = strlen(buf);
  if (n == (size_t)size - 1 && buf[n - 1] != '\n' && !feof(x->f)) {
    int ch;
    while ((ch = fgetc(x->f)) != EOF && ch != '\n') {
    }
    problem(x->p, "%s:%d: the line is over %d characters, the most a config line may have", x->path,
            x->line, size - 2);
    buf[0] = '#';
    buf[1] = 0;
  }
  return r;
}

static int on_ini(void *user, const char *section, const char *name, const char *value) {
  ini_ctx *x = user;
  char where[MT_CONF_PATH_MAX + 16];
  snprintf(where, sizeof where, "%s:%d", x->path, x->line);
  /* a key given twice (twice in one section, or a section repeated) is a
   * mistake to name, not one for the last value to win silently */
  char key[128];
  snprintf(key, sizeof key, "%s.%s", section, name);
  for (int i = 0; i < x->n_seen; i++)
    if (!strcasecmp(x->seen[i].key, key)) {
      problem(x->p, "%s: %s is given twice (first at line %d)", where, key, x->seen[i].line);
      return 1;
    }
  if (x->n_seen < SEEN_MAX) {
    snprintf(x->seen[x->n_seen].key, sizeof x->seen[x->n_seen].key, "%s", key);
    x->seen[x->n_seen++].line = x->line;
  }
  set_key(x->c, x->p, where, x->dir, section, name, value);
  return 1; /* keep going: report every problem, not the first */
}

int mt_parse_host_port(const char *s, char *host, int host_size, int *port) {
  const char *colon = strrchr(s, ':');
  if (!colon || colon == s) return mt_seterr(MT_EINVAL, "\"%s\" is not HOST:PORT", s);
  const char *h = s;
  size_t hn = (size_t)(colon - s);
  if (h[0] == '[' && hn >= 2 && h[hn - 1] == ']') h++, hn -= 2;
  if (hn == 0 || hn >= (size_t)host_size) return mt_seterr(MT_EINVAL, "\"%s\": bad host", s);
  char *end;
  long p = strtol(colon + 1, &end, 10);
  if (end == colon + 1 || *end || p < 0 || p > 65535)
    return mt_seterr(MT_EINVAL, "\"%s\": port must be 0..65535", s);
  memcpy(host, h, hn);
  host[hn] = 0;
  *port = (int)p;
  return 0;
}

int mt_parse_devices(const char *s, char specs[][16], int max) {
  const char *colon = strchr(s, ':');
  if (!colon) return mt_seterr(MT_EINVAL, "devices \"%s\": expected cpu:N or cuda:LIST", s);
  size_t kn = (size_t)(colon - s);
  int cpu = kn == 3 && !strncmp(s, "cpu", 3), cuda = kn == 4 && !strncmp(s, "cuda", 4);
  if (!cpu && !cuda) return mt_seterr(MT_EINVAL, "devices \"%s\": kind must be cpu or cuda", s);
  const char *q = colon + 1;
  char *end;
  if (cpu) {
    long n = strtol(q, &end, 10);
    if (end == q || *end || n < 1 || n > max)
      return mt_seterr(MT_EINVAL, "devices \"%s\": cpu:N needs 1 <= N <= %d", s, max);
    for (int i = 0; i < n; i++) snprintf(specs[i], 16, "cpu:%d", i);
    return (int)n;
  }
  int n = 0;
  while (*q) {
    long a = strtol(q, &end, 10), b;
    if (end == q || a < 0 || a > 1023) return mt_seterr(MT_EINVAL, "devices \"%s\": bad index", s);
    q = end, b = a;
    if (*q == '-') {
      b = strtol(++q, &end, 10);
      if (end == q || b < a || b > 1023)
        return mt_seterr(MT_EINVAL, "devices \"%s\": bad range", s);
      q = end;
    }
    for (long i = a; i <= b; i++) {
      if (n == max) return mt_seterr(MT_EINVAL, "devices \"%s\": more than %d devices", s, max);
      snprintf(specs[n++], 16, "cuda:%hu", (unsigned short)i); /* i <= 1023 */
    }
    if (*q == ',')
      q++;
    else if (*q)
      return mt_seterr(MT_EINVAL, "devices \"%s\": unexpected \"%s\"", s, q);
  }
  if (!n) return mt_seterr(MT_EINVAL, "devices \"%s\": no device", s);
  return n;
}

/* 1 when `section.name` was given a value it refused: the checks below
 * would judge its default instead. */
static int refused(const problems *p, const char *section, const char *name) {
  for (size_t i = 0; i < N_KEYS; i++)
    if (!strcmp(keys[i].section, section) && !strcmp(keys[i].name, name))
      return (int)(p->bad >> i & 1);
  return 0;
}

/* Checks of the values themselves and across keys, once everything is
 * read, so that one run names every problem. */
static void check(const mt_node_config *c, problems *p) {
  char host[256];
  int port;
  int endpoint_ok = !refused(p, "rendezvous", "endpoint");
  if (endpoint_ok && mt_parse_host_port(c->endpoint, host, sizeof host, &port))
    problem(p, "rendezvous.endpoint: %s", mt_errmsg());
  else if (endpoint_ok && port == 0)
    problem(p, "rendezvous.endpoint: \"%s\": the port must be set (the followers dial it)",
            c->endpoint);
  if (!refused(p, "rendezvous", "etcd") && c->etcd[0]) {
    if (endpoint_ok && !mt_parse_host_port(c->endpoint, host, sizeof host, &port) &&
        (!strcmp(host, "0.0.0.0") || !strcmp(host, "::")))
      problem(p,
              "rendezvous.endpoint: \"%s\": with rendezvous.etcd, the address this node "
              "hosts the store on when it is elected, which the others dial: name this "
              "node's address, not a wildcard",
              c->endpoint);
    if (!refused(p, "rendezvous", "etcd_prefix") &&
        (!c->etcd_prefix[0] || c->etcd_prefix[strlen(c->etcd_prefix) - 1] != '/'))
      problem(p, "rendezvous.etcd_prefix: \"%s\": must end with '/' (the job's keys go under it)",
              c->etcd_prefix);
  }
  if (!refused(p, "rendezvous", "etcd_user") && !refused(p, "rendezvous", "etcd_password_file") &&
      !c->etcd_user[0] != !c->etcd_password_file[0])
    problem(p, "rendezvous.%s is set but rendezvous.%s is not: etcd's users need both",
            c->etcd_user[0] ? "etcd_user" : "etcd_password_file",
            c->etcd_user[0] ? "etcd_password_file" : "etcd_user");
  if (!refused(p, "rendezvous", "etcd_cert") && !refused(p, "rendezvous", "etcd_key") &&
      !c->etcd_cert[0] != !c->etcd_key[0])
    problem(p,
            "rendezvous.%s is set but rendezvous.%s is not: a client certificate for etcd "
            "needs both",
            c->etcd_cert[0] ? "etcd_cert" : "etcd_key", c->etcd_cert[0] ? "etcd_key" : "etcd_cert");
  if (!refused(p, "rendezvous", "etcd") && !refused(p, "rendezvous", "etcd_cert") &&
      c->etcd_cert[0] && c->etcd[0] && strncmp(c->etcd, "https://", 8))
    problem(p,
            "rendezvous.etcd_cert is set but rendezvous.etcd \"%s\" is not https://: a client "
            "certificate goes with TLS",
            c->etcd);
  if (!refused(p, "control", "listen") &&
      mt_parse_host_port(c->control_listen, host, sizeof host, &port))
    problem(p, "control.listen: %s", mt_errmsg());
  if (!refused(p, "control", "tls_cert") && !refused(p, "control", "tls_key") &&
      !c->tls_cert[0] != !c->tls_key[0])
    problem(p, "control.%s is set but control.%s is not: HTTPS needs the certificate and its key",
            c->tls_cert[0] ? "tls_cert" : "tls_key", c->tls_cert[0] ? "tls_key" : "tls_cert");
  /* every read would be refused (401) with no token to send */
  if (!refused(p, "control", "reads_need_token") && !refused(p, "control", "token_file") &&
      c->reads_need_token && !c->token_file[0])
    problem(p, "control.reads_need_token is yes but control.token_file is not set: every read "
               "would be refused; set the token file or reads_need_token = no");
  if (!refused(p, "node", "devices") && strcmp(c->devices, "auto")) {
    char specs[256][16];
    if (mt_parse_devices(c->devices, specs, 256) < 0) problem(p, "node.devices: %s", mt_errmsg());
  }
  if (!refused(p, "node", "name") && !c->name[0]) problem(p, "node.name: empty");
  for (const char *q = c->name; *q && !refused(p, "node", "name"); q++)
    if (!isalnum((unsigned char)*q) && !strchr("-_.", *q)) {
      problem(p, "node.name: \"%s\": use letters, digits, '-', '_' and '.'", c->name);
      break;
    }
  if (!refused(p, "cluster", "heartbeat_timeout_ms") &&
      !refused(p, "cluster", "heartbeat_interval_ms") &&
      c->heartbeat_timeout_ms < 2 * c->heartbeat_interval_ms)
    problem(p, "cluster.heartbeat_timeout_ms: %d is under twice cluster.heartbeat_interval_ms (%d)",
            c->heartbeat_timeout_ms, c->heartbeat_interval_ms);
  if (!refused(p, "log", "level") && mt_log_parse_level(c->log_level) < 0)
    problem(p, "log.level: \"%s\" must be error, warn, info or debug", c->log_level);
  if (!refused(p, "log", "format") && strcmp(c->log_format, "text") &&
      strcmp(c->log_format, "json"))
    problem(p, "log.format: \"%s\" must be text or json", c->log_format);
}

int mt_node_config_load(mt_node_config *c, const char *path, const char *const *overrides) {
  problems p = {0};
  set_defaults(c);
  if (path) {
    FILE *f = fopen(path, "r");
    if (!f) return mt_seterr(MT_EIO, "config %s: %s", path, strerror(errno));
    struct stat st;
    if (!fstat(fileno(f), &st) && S_ISDIR(st.st_mode)) { /* a pipe is fine: <(...) */
      fclose(f);
      return mt_seterr(MT_EINVAL, "config %s: a directory, not a config file", path);
    }
    ini_ctx *x = calloc(1, sizeof *x);
    if (!x) {
      fclose(f);
      return mt_seterr(MT_ENOMEM, "config %s: out of memory", path);
    }
    /* the directory relative paths are taken from: the file's, made
     * absolute; none for a config that is no file in a directory (a pipe,
     * /dev/stdin), whose relative paths are refused */
    char dir[PATH_MAX];
    if (mt_file_dir(f, path, "config", dir, sizeof dir)) {
      free(x);
      fclose(f);
      return MT_EIO;
    }
    *x = (ini_ctx){.c = c, .p = &p, .path = path, .dir = dir, .f = f};
    int rc = ini_parse_stream(read_line, x, on_ini, x);
    int read_error = ferror(f);
    free(x);
    fclose(f);
    if (read_error) problem(&p, "%s: read failed", path);
    if (rc > 0)
      problem(&p, "%s:%d: not INI syntax (expected [section] or key = value)", path, rc);
    else if (rc < 0)
      problem(&p, "%s: cannot parse (%d)", path, rc);
  }
  for (int i = 0; overrides && overrides[i]; i++) {
    const char *o = overrides[i], *eq = strchr(o, '='), *dot = strchr(o, '.');
    if (!eq || !dot || dot > eq) {
      problem(&p, "--set %s: expected SECTION.KEY=VALUE", o);
      continue;
    }
    char section[64], name[64];
    snprintf(section, sizeof section, "%.*s", (int)(dot - o), o);
    snprintf(name, sizeof name, "%.*s", (int)(eq - dot - 1), dot + 1);
    set_key(c, &p, "--set", NULL, section, name, eq + 1);
  }
  check(c, &p);
  if (p.n) return mt_seterr(MT_EINVAL, "%s", p.text);
  return 0;
}
