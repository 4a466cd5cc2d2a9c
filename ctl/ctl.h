/* ctl.h — what mtnlgctl's verbs share: the verb table entry, exit codes,
 * the global options and argument checks.
 *
 * One file per verb (plan.c, status.c, ...) holds its handler and help text;
 * mtnlgctl.c holds the table, the global options and the dispatch; http.h is
 * the client of the daemon's control API, output.h the tables and number
 * formats. A verb prints what a person can act on and returns an exit code;
 * it never calls exit().
 */
#ifndef MT_CTL_H
#define MT_CTL_H

#include <jansson.h>
#include <stdio.h>

enum {
  CTL_EXIT_OK = 0,          /* done */
  CTL_EXIT_FAILURE = 1,     /* the operation failed (a job refused, a plan that does not fit) */
  CTL_EXIT_USAGE = 2,       /* bad command line, endpoint or token file */
  CTL_EXIT_UNREACHABLE = 3, /* no answer from the daemon (refused, timed out, unresolvable) */
};

#define CTL_DEFAULT_ENDPOINT "http://127.0.0.1:8470"

typedef enum { CTL_OUTPUT_TABLE = 0, CTL_OUTPUT_JSON = 1 } ctl_output;

typedef struct ctl_verb ctl_verb;
struct ctl_verb {
  const char *name;
  int min_args, max_args; /* positional arguments after the options */
  /* argv[0] is the verb name; options may come before or after positionals */
  int (*run)(const ctl_verb *verb, int argc, char **argv);
  const char *synopsis; /* after "mtnlgctl VERB ": "JOB.json [OPTIONS]" */
  const char *summary;  /* one line for the verb list */
  const char *help;     /* description and options for `mtnlgctl help VERB` */
};

/* Global options, set by mtnlgctl.c before the verb runs; verbs may change
 * them from their own options (-o after the verb). */
typedef struct ctl_globals {
  ctl_output output;
  const char *endpoint;        /* control URL: -e/--endpoint, MTNLG_ENDPOINT or the default */
  const char *endpoint_source; /* where endpoint came from, for messages */
  const char *token_file;      /* --token-file or MTNLG_TOKEN_FILE; NULL: no token */
  const char *cacert;          /* --cacert or MTNLG_CACERT: the CA that signed an https
                                  daemon's certificate; NULL: the system's */
  const char *token_source;
} ctl_globals;
extern ctl_globals ctl;

/* Parses "table" or "json" into *out; prints a usage message and returns
 * CTL_EXIT_USAGE on anything else, 0 otherwise. */
int ctl_parse_output(const char *arg, ctl_output *out);

/* Checks the number of positional arguments against the verb's table entry;
 * prints a usage message and returns CTL_EXIT_USAGE when it is off. */
int ctl_check_args(const ctl_verb *verb, int nargs);

/* The verb's usage line and help text. */
void ctl_verb_help(const ctl_verb *verb, FILE *f);

/* Usage error: "mtnlgctl VERB: <message>" and a pointer to --help; returns
 * CTL_EXIT_USAGE. */
int ctl_usage_error(const ctl_verb *verb, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* Parses a positive number for option opt; a usage error naming opt
 * otherwise. With integer, a whole one in decimal digits alone ("0x2",
 * "2e0", "+2" and "1.0" are refused), at most INT_MAX (a larger one is said
 * to be over the maximum). */
int ctl_parse_positive(const ctl_verb *verb, const char *opt, const char *arg, int integer,
                       double *out);

/* The verbs, one file each. */
int ctl_verb_ckpt(const ctl_verb *verb, int argc, char **argv); /* ckpt.c */
extern const char ctl_ckpt_help[];
int ctl_verb_plan(const ctl_verb *verb, int argc, char **argv);
extern const char ctl_plan_help[];
int ctl_verb_status(const ctl_verb *verb, int argc, char **argv); /* status.c */
extern const char ctl_status_help[];
int ctl_verb_nodes(const ctl_verb *verb, int argc, char **argv); /* nodes.c */
extern const char ctl_nodes_help[];
/* The table of status's "nodes" (a STATUS object), for nodes and watch. */
int ctl_nodes_print(const json_t *status, FILE *f, int indent);
int ctl_verb_watch(const ctl_verb *verb, int argc, char **argv); /* watch.c */
extern const char ctl_watch_help[];
int ctl_verb_history(const ctl_verb *verb, int argc, char **argv); /* history.c */
extern const char ctl_history_help[];
/* mutate.c: pause, resume, stop, checkpoint, resize (the verb name is the kind) */
int ctl_verb_mutate(const ctl_verb *verb, int argc, char **argv);
extern const char ctl_pause_help[], ctl_resume_help[], ctl_stop_help[], ctl_checkpoint_help[],
    ctl_resize_help[];
int ctl_verb_ops(const ctl_verb *verb, int argc, char **argv); /* ops.c */
extern const char ctl_ops_help[];
/* "/v1/operations/ID" into buf; -1 when id has characters an id never has. */
int ctl_op_path(char *buf, size_t cap, const char *id);
/* One line for an operation: "op-7 resize dp=2: running (progress)",
 * "op-7 pause: succeeded at step 12", "op-8 resume: failed: REASON". */
char *ctl_op_summary(char *buf, size_t cap, const json_t *op);
int ctl_verb_checkpoints(const ctl_verb *verb, int argc, char **argv); /* checkpoints.c */
extern const char ctl_checkpoints_help[];

#endif
