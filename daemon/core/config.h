/* config.h — the node config: /etc/mtnlg/mtnlgd.conf (INI, read with inih).
 *
 * What one node is and where it finds the others: its name and devices, the
 * rendezvous endpoint, the control plane's address and token, heartbeat
 * timing, local paths. Every key can be overridden on the command line with
 * `--set section.key=value`. Loading refuses a config that cannot run with one
 * line per problem naming the key (and the file line); it never exits. The job
 * (what to train) is a separate JSON file named here, read by the coordinator.
 */
#ifndef MT_CONFIG_H
#define MT_CONFIG_H

#define MT_CONF_PATH_MAX 1024

typedef struct mt_node_config {
  /* [node] */
  char name[64];    /* default: the host name */
  char devices[64]; /* "cpu:N", "cuda:0-7", "cuda:0,2", "auto" */
  int cpu_threads;  /* OpenMP threads shared by the device threads; 0 = every core */
  /* [rendezvous] */
  char endpoint[256];              /* HOST:PORT of the store, hosted by the coordinator */
  char key_file[MT_CONF_PATH_MAX]; /* the cluster key every node of the job holds, or "" */
  int host;                        /* 1 this node hosts the store and coordinates, 0 it follows,
                                      -1 (auto): it hosts when the endpoint's address is its own */
  int last_call_ms;                /* after pp * dp_min slots joined, wait this long for more */
  int join_timeout_s;              /* give up when no generation takes this node; 0 = never */
  /* the coordinator's: after a lost member (or ranks failed on a peer) the job
   * re-forms from the last checkpoint at most max_restarts times, waiting up
   * to reform_timeout_s for enough nodes each time */
  int max_restarts;
  int reform_timeout_s;
  int store_max_mb; /* the store this node hosts holds at most this many MiB (2^20 bytes) */
  /* The store kept in etcd instead (endpoint and key_file then unused): the
   * members' client URLs, comma-separated, or "" for the coordinator's own */
  char etcd[1024];
  char etcd_prefix[256];                     /* the job's keys in etcd; default "/mtnlg/" */
  char etcd_user[128];                       /* etcd's users: a name and the file of its */
  char etcd_password_file[MT_CONF_PATH_MAX]; /* password, both or neither */
  char etcd_cacert[MT_CONF_PATH_MAX];        /* https:// members: their CA's PEM file */
  char etcd_cert[MT_CONF_PATH_MAX];          /* and this node's client certificate and */
  char etcd_key[MT_CONF_PATH_MAX];           /* its key (--client-cert-auth), both or neither */
  /* [cluster] */
  int heartbeat_interval_ms;
  int heartbeat_timeout_ms; /* a node silent this long is lost */
  int comm_timeout_ms;      /* deadline of every collective */
  /* [job] */
  char job_path[MT_CONF_PATH_MAX];    /* the job spec; the coordinator needs it, a follower
                                         that has it checks the coordinator runs the same */
  char presets_dir[MT_CONF_PATH_MAX]; /* extra model presets, or "" */
  /* [control] */
  char control_listen[256]; /* HOST:PORT; default 127.0.0.1:8470 */
  char token_file[MT_CONF_PATH_MAX];
  int reads_need_token;
  /* HTTPS: the certificate (PEM, the chain from the server's own) and its
   * private key (PEM); both or neither ("": plain HTTP) */
  char tls_cert[MT_CONF_PATH_MAX];
  char tls_key[MT_CONF_PATH_MAX];
  /* [paths] */
  char state_dir[MT_CONF_PATH_MAX];
  char checkpoint_dir[MT_CONF_PATH_MAX]; /* overrides the job's checkpoint.dir when set */
  /* [log] */
  char log_level[16];
  char log_format[8]; /* "text" or "json" step lines on stdout */
} mt_node_config;

/* Defaults, then the file (path may be NULL: defaults only), then the
 * overrides ("section.key=value", NULL-terminated). A relative path in the
 * file is made the file's directory's (absolute); one in an override is
 * kept as given (the working directory's). MT_EINVAL with every
 * problem in mt_errmsg(), one per line; MT_EIO when the file cannot be read. */
int mt_node_config_load(mt_node_config *c, const char *path, const char *const *overrides);

/* Splits "host:port" ("[v6]:port" too). MT_EINVAL naming what. */
int mt_parse_host_port(const char *s, char *host, int host_size, int *port);

/* Parses a device list: "cpu:N" -> cpu:0..N-1, "cuda:0-7", "cuda:0,2,5".
 * Writes up to max specs ("cpu:0", …) of 16 bytes each; returns the count or
 * MT_EINVAL. "auto" is resolved by the caller first. */
int mt_parse_devices(const char *s, char specs[][16], int max);

#endif
