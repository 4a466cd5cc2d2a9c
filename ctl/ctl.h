/* ctl.h — what mtnlgctl's verbs share: the verb table entry, exit codes,
 * the output format and argument checks.
 *
 * One file per verb (plan.c, ...) holds its handler and help text; mtnlgctl.c
 * holds the table, the global options and the dispatch. A verb prints what a
 * person can act on and returns an exit code; it never calls exit().
 */
#ifndef MT_CTL_H
#define MT_CTL_H

#include <stdio.h>

enum {
  CTL_EXIT_OK = 0,      /* done */
  CTL_EXIT_FAILURE = 1, /* the operation failed (a job refused, a plan that does not fit) */
  CTL_EXIT_USAGE = 2,   /* bad command line */
};

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

/* The verbs, one file each. */
int ctl_verb_plan(const ctl_verb *verb, int argc, char **argv);
extern const char ctl_plan_help[];

#endif
