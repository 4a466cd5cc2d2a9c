/* mtnlgctl.c — the control CLI: a table of verbs and their dispatch.
 *
 * `mtnlgctl [GLOBAL OPTIONS] VERB [ARGS]`. Each verb is one row of the table
 * below (name, positional-argument bounds, handler, one-line help) and one
 * file (plan.c, status.c, ...). `mtnlgctl --help` lists the verbs, `mtnlgctl
 * help VERB` and `mtnlgctl VERB --help` show one. The global options name the
 * daemon (-e, MTNLG_ENDPOINT), its control token (--token-file,
 * MTNLG_TOKEN_FILE) and the output format; they are only checked when a verb
 * talks to the daemon (http.c). Exit codes: 0 done, 1 the operation failed,
 * 2 usage, 3 the daemon cannot be reached.
 */
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctl.h"
#include "http.h"
#include "mt_config.h"

ctl_globals ctl;

static int verb_help(const ctl_verb *verb, int argc, char **argv);

static const ctl_verb verbs[] = {
    {"status", 0, 0, ctl_verb_status, "[OPTIONS]",
     "the job: state, step, loss, throughput, ETA, last checkpoint", ctl_status_help},
    {"nodes", 0, 0, ctl_verb_nodes, "[OPTIONS]",
     "the nodes: role, state, ranks, devices, heartbeat, memory", ctl_nodes_help},
    {"watch", 0, 0, ctl_verb_watch, "[--interval S] [--count N] [OPTIONS]",
     "follow the job and its nodes, refreshed in place", ctl_watch_help},
    {"history", 0, 0, ctl_verb_history, "[--since STEP] [--last N] [OPTIONS]",
     "the steps: loss, validation loss, lr, gradient norm, time", ctl_history_help},
    {"pause", 0, 0, ctl_verb_mutate, "[--wait] [--idempotency-key KEY] [OPTIONS]",
     "pause training at the next step boundary", ctl_pause_help},
    {"resume", 0, 0, ctl_verb_mutate, "[--wait] [--idempotency-key KEY] [OPTIONS]",
     "resume a paused job", ctl_resume_help},
    {"stop", 0, 0, ctl_verb_mutate, "[--wait] [--idempotency-key KEY] [OPTIONS]",
     "stop the job at the next step boundary", ctl_stop_help},
    {"checkpoint", 0, 0, ctl_verb_mutate, "[--wait] [--idempotency-key KEY] [OPTIONS]",
     "write a checkpoint at the next step boundary", ctl_checkpoint_help},
    {"resize", 0, 0, ctl_verb_mutate, "--dp N [--wait] [--idempotency-key KEY] [OPTIONS]",
     "change the number of data-parallel replicas", ctl_resize_help},
    {"ops", 0, 1, ctl_verb_ops, "[ID] [OPTIONS]", "the operations and how they went", ctl_ops_help},
    {"checkpoints", 0, 0, ctl_verb_checkpoints, "[OPTIONS]", "the committed checkpoints",
     ctl_checkpoints_help},
    {"ckpt", 2, 3, ctl_verb_ckpt,
     "verify DIR | export DIR OUT.safetensors [--dtype fp32|bf16|fp16] | reshard DIR OUT --tp T "
     "--pp P [--virtual-stages V] "
     "[-o json]",
     "check, export or reshard checkpoints on disk (offline)", ctl_ckpt_help},
    {"plan", 1, 1, ctl_verb_plan, "JOB.json [OPTIONS]",
     "per-device memory, FLOPs and step time of a job, without running it", ctl_plan_help},
    {"help", 0, 1, verb_help, "[VERB]", "show the verbs, or one verb's options",
     "Without VERB, the verbs and global options; with VERB, its usage and options.\n"},
};
#define N_VERBS (sizeof verbs / sizeof *verbs)

static const ctl_verb *find_verb(const char *name) {
  for (size_t i = 0; i < N_VERBS; i++)
    if (!strcmp(verbs[i].name, name)) return &verbs[i];
  return NULL;
}

static void list_verbs(FILE *f) {
  for (size_t i = 0; i < N_VERBS; i++) fprintf(f, "  %-12s %s\n", verbs[i].name, verbs[i].summary);
}

static void usage(FILE *f) {
  fprintf(f, "Usage: mtnlgctl [OPTIONS] VERB [ARGS]\n"
             "\n"
             "Inspect and steer mtnlg training jobs.\n"
             "\n"
             "Verbs:\n");
  list_verbs(f);
  fprintf(f, "\n"
             "Options:\n"
             "  -e, --endpoint URL    the daemon's control address (default $MTNLG_ENDPOINT,\n"
             "                        else " CTL_DEFAULT_ENDPOINT "); or several,\n"
             "                        comma-separated (any node answers for the cluster):\n"
             "                        the first that answers is asked, the next once one\n"
             "                        cannot be reached\n"
             "      --token-file PATH file holding the control token, needed for pause,\n"
             "                        resume, stop, checkpoint, resize (default\n"
             "                        $MTNLG_TOKEN_FILE); a read (status, nodes, ...)\n"
             "                        reads it only when the daemon answers 401\n"
             "                        (control.reads_need_token), then asks again with it\n"
             "      --cacert PATH     the CA certificate (PEM) an https:// daemon's\n"
             "                        certificate is checked against (default $MTNLG_CACERT,\n"
             "                        else the system's)\n"
             "  -o, --output FORMAT   table (default) or json: the daemon's JSON as it came,\n"
             "                        its problem+json object when it refuses\n"
             "  -h, --help            show this help; `mtnlgctl help VERB` for a verb\n"
             "      --version         print the version\n"
             "\n"
             "Exit status: 0 done, 1 the operation failed, 2 usage error,\n"
             "3 the daemon cannot be reached.\n");
}

void ctl_verb_help(const ctl_verb *verb, FILE *f) {
  fprintf(f, "Usage: mtnlgctl %s %s\n\n%s", verb->name, verb->synopsis, verb->help);
}

int ctl_usage_error(const ctl_verb *verb, const char *fmt, ...) {
  va_list ap;
  fprintf(stderr, "mtnlgctl%s%s: ", verb ? " " : "", verb ? verb->name : "");
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fprintf(stderr, "\nSee 'mtnlgctl %s%s--help'.\n", verb ? verb->name : "", verb ? " " : "");
  return CTL_EXIT_USAGE;
}

int ctl_parse_output(const char *arg, ctl_output *out) {
  if (!strcmp(arg, "table"))
    *out = CTL_OUTPUT_TABLE;
  else if (!strcmp(arg, "json"))
    *out = CTL_OUTPUT_JSON;
  else
    return ctl_usage_error(NULL, "-o/--output: \"%s\" is not one of table, json", arg);
  return 0;
}

/* A whole number in decimal digits alone (no sign, no 0x, no exponent, no
 * spaces: what strtol would also take reads as another number than the one
 * meant), at least 1 and at most INT_MAX. */
static int parse_positive_int(const ctl_verb *verb, const char *opt, const char *arg, double *out) {
  const char *p = arg;
  while (*p >= '0' && *p <= '9') p++;
  if (p == arg || *p)
    return ctl_usage_error(verb, "%s: \"%s\" is not a positive integer (decimal digits, like 4)",
                           opt, arg);
  errno = 0;
  long long v = strtoll(arg, NULL, 10);
  if (errno == ERANGE || v > INT_MAX)
    return ctl_usage_error(verb, "%s: \"%s\" is larger than the maximum, %d", opt, arg, INT_MAX);
  if (v < 1) return ctl_usage_error(verb, "%s: \"%s\" is not a positive integer", opt, arg);
  *out = (double)v;
  return 0;
}

int ctl_parse_positive(const ctl_verb *verb, const char *opt, const char *arg, int integer,
                       double *out) {
  if (integer) return parse_positive_int(verb, opt, arg, out);
  char *end;
  errno = 0;
  double v = strtod(arg, &end);
  if (errno || end == arg || *end || !isfinite(v) || v <= 0)
    return ctl_usage_error(verb, "%s: \"%s\" is not a positive number", opt, arg);
  *out = v;
  return 0;
}

int ctl_check_args(const ctl_verb *verb, int nargs) {
  if (nargs < verb->min_args)
    return ctl_usage_error(verb, "missing argument (usage: mtnlgctl %s %s)", verb->name,
                           verb->synopsis);
  if (nargs > verb->max_args)
    return ctl_usage_error(verb, "%d argument%s given, at most %d (usage: mtnlgctl %s %s)", nargs,
                           nargs == 1 ? "" : "s", verb->max_args, verb->name, verb->synopsis);
  return 0;
}

static int verb_help(const ctl_verb *verb, int argc, char **argv) {
  int rc = ctl_check_args(verb, argc - 1);
  if (rc) return rc;
  if (argc == 1) {
    usage(stdout);
    return CTL_EXIT_OK;
  }
  const ctl_verb *v = find_verb(argv[1]);
  if (!v) {
    fprintf(stderr, "mtnlgctl help: unknown verb \"%s\"; the verbs are:\n", argv[1]);
    list_verbs(stderr);
    return CTL_EXIT_USAGE;
  }
  ctl_verb_help(v, stdout);
  return CTL_EXIT_OK;
}

/* The global options given after the verb ("mtnlgctl pause --token-file F",
 * "mtnlgctl status -e URL"), as the help texts and hints spell them: taken
 * out of the verb's arguments (before any "--") and applied. Returns 0, or
 * CTL_EXIT_USAGE for one without its value. */
static int take_global_options(int *argc, char **argv) {
  int out = 1;
  for (int i = 1; i < *argc; i++) {
    const char *a = argv[i], *value = NULL;
    if (!strcmp(a, "--")) {
      while (i < *argc) argv[out++] = argv[i++];
      break;
    }
    int endpoint = !strcmp(a, "-e") || !strcmp(a, "--endpoint");
    int token = !strcmp(a, "--token-file"), cacert = !strcmp(a, "--cacert");
    if (endpoint || token || cacert) {
      if (i + 1 >= *argc) {
        fprintf(stderr, "mtnlgctl %s: %s needs a value\n", argv[0], a);
        return CTL_EXIT_USAGE;
      }
      value = argv[++i];
    } else if (!strncmp(a, "--endpoint=", 11)) {
      endpoint = 1, value = a + 11;
    } else if (!strncmp(a, "--token-file=", 13)) {
      token = 1, value = a + 13;
    } else if (!strncmp(a, "--cacert=", 9)) {
      cacert = 1, value = a + 9;
    } else if (!strncmp(a, "-e", 2) && a[2]) {
      endpoint = 1, value = a + 2;
    }
    if (endpoint) {
      ctl.endpoint = value;
      ctl.endpoint_source = "-e/--endpoint";
    } else if (token) {
      ctl.token_file = value;
      ctl.token_source = "--token-file";
    } else if (cacert) {
      ctl.cacert = value;
    } else {
      argv[out++] = argv[i];
    }
  }
  *argc = out;
  argv[out] = NULL;
  return 0;
}

/* Whether the verb's arguments ask for its help (before any "--"). */
static int wants_help(int argc, char **argv) {
  for (int i = 1; i < argc && strcmp(argv[i], "--"); i++)
    if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) return 1;
  return 0;
}

int main(int argc, char **argv) {
  enum { OPT_VERSION = 256, OPT_TOKEN_FILE, OPT_CACERT };
  static const struct option opts[] = {
      {"endpoint", required_argument, NULL, 'e'},
      {"token-file", required_argument, NULL, OPT_TOKEN_FILE},
      {"cacert", required_argument, NULL, OPT_CACERT},
      {"output", required_argument, NULL, 'o'},
      {"help", no_argument, NULL, 'h'},
      {"version", no_argument, NULL, OPT_VERSION},
      {0},
  };
  int c;
  const char *env = getenv("MTNLG_ENDPOINT");
  ctl.endpoint = env && *env ? env : CTL_DEFAULT_ENDPOINT;
  ctl.endpoint_source = env && *env ? "MTNLG_ENDPOINT" : "the default endpoint";
  env = getenv("MTNLG_TOKEN_FILE");
  ctl.token_file = env && *env ? env : NULL;
  ctl.token_source = "MTNLG_TOKEN_FILE";
  env = getenv("MTNLG_CACERT");
  ctl.cacert = env && *env ? env : NULL;
  /* getopt names argv[0] in its messages, which would be the path the tool
   * was run by: "mtnlgctl: unrecognized option '--bogus'", as every other */
  argv[0] = "mtnlgctl";
  /* '+': stop at the verb; what follows is the verb's to parse */
  while ((c = getopt_long(argc, argv, "+e:o:h", opts, NULL)) != -1) {
    switch (c) {
    case 'e':
      ctl.endpoint = optarg;
      ctl.endpoint_source = "-e/--endpoint";
      break;
    case OPT_TOKEN_FILE:
      ctl.token_file = optarg;
      ctl.token_source = "--token-file";
      break;
    case OPT_CACERT: ctl.cacert = optarg; break;
    case 'o':
      if (ctl_parse_output(optarg, &ctl.output)) return CTL_EXIT_USAGE;
      break;
    case 'h': usage(stdout); return CTL_EXIT_OK;
    case OPT_VERSION: printf("mtnlgctl %s\n", MT_VERSION); return CTL_EXIT_OK;
    default: fprintf(stderr, "See 'mtnlgctl --help'.\n"); return CTL_EXIT_USAGE;
    }
  }
  if (optind >= argc) {
    fprintf(stderr, "mtnlgctl: no verb given\n\n");
    usage(stderr);
    return CTL_EXIT_USAGE;
  }
  const ctl_verb *verb = find_verb(argv[optind]);
  if (!verb) {
    fprintf(stderr, "mtnlgctl: unknown verb \"%s\"; the verbs are:\n", argv[optind]);
    list_verbs(stderr);
    return CTL_EXIT_USAGE;
  }
  int vargc = argc - optind;
  char **vargv = argv + optind;
  if (take_global_options(&vargc, vargv)) return CTL_EXIT_USAGE;
  if (wants_help(vargc, vargv)) {
    ctl_verb_help(verb, stdout);
    return CTL_EXIT_OK;
  }
  /* getopt names argv[0] in its messages: "mtnlgctl status: unrecognized option" */
  char verb_name[64];
  snprintf(verb_name, sizeof verb_name, "mtnlgctl %s", vargv[0]);
  vargv[0] = verb_name;
  optind = 0; /* the verb runs getopt_long afresh on its own argv */
  int rc = verb->run(verb, vargc, vargv);
  ctl_http_close();
  return rc;
}
