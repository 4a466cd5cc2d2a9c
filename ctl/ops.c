/* ops.c — `mtnlgctl ops [ID]`: the operations the daemon knows (pause,
 * resume, stop, checkpoint, resize), from GET /v1/operations, or one of them
 * from GET /v1/operations/{id}; and the words for an operation that
 * mutate.c prints too.
 */
#include <getopt.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctl.h"
#include "http.h"
#include "output.h"

const char ctl_ops_help[] =
    "Without ID, every operation the daemon keeps, oldest first: id, kind and\n"
    "arguments, state (queued, running, succeeded, failed), the step boundary where\n"
    "it acted, its age, and why it failed or how far it got. With ID, that one.\n"
    "\n"
    "Options:\n"
    "  -o, --output FORMAT    table (default) or json (/v1/operations or\n"
    "                         /v1/operations/ID as the daemon answers)\n"
    "  -h, --help             show this help\n";

int ctl_op_path(char *buf, size_t cap, const char *id) {
  if (!*id || strlen(id) > 128 ||
      strspn(id, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                 "0123456789-_.~") != strlen(id))
    return -1;
  snprintf(buf, cap, "/v1/operations/%s", id);
  return 0;
}

/* {"dp": 2} -> "dp=2"; {} -> "" */
static char *args_text(char *buf, size_t cap, const json_t *args) {
  const char *key;
  json_t *v;
  size_t len = 0;
  buf[0] = '\0';
  json_object_foreach((json_t *)args, key, v) {
    char *val = json_is_string(v) ? strdup(json_string_value(v))
                                  : json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY);
    int n = snprintf(buf + len, cap - len, "%s%s=%s", len ? " " : "", key, val ? val : "?");
    free(val);
    if (n < 0 || (size_t)n >= cap - len) break;
    len += (size_t)n;
  }
  return buf;
}

char *ctl_op_summary(char *buf, size_t cap, const json_t *op) {
  char args[256], step[32] = "";
  const char *id = ctl_jstr(op, "id"), *kind = ctl_jstr(op, "kind"), *state = ctl_jstr(op, "state"),
             *reason = ctl_jstr(op, "reason"), *progress = ctl_jstr(op, "progress");
  double s;
  if (ctl_jnum(op, "step", &s)) snprintf(step, sizeof step, " at step %.0f", s);
  args_text(args, sizeof args, json_object_get(op, "args"));
  int failed = state && !strcmp(state, "failed");
  const char *extra = failed ? reason : progress;
  snprintf(buf, cap, "%s %s%s%s: %s%s%s%s", id ? id : "-", kind ? kind : "-", *args ? " " : "",
           args, state ? state : "-", step, extra ? (failed ? ": " : " (") : "",
           extra ? extra : "");
  if (extra && !failed && strlen(buf) + 2 <= cap) strcat(buf, ")");
  return buf;
}

static int print_one(const json_t *op) {
  char line[1024], a[64], b[64];
  double t;
  printf("%s\n", ctl_op_summary(line, sizeof line, op));
  if (ctl_jnum(op, "created", &t))
    printf("  created   %s (%s ago)\n", ctl_fmt_time(a, sizeof a, t), ctl_fmt_age(b, sizeof b, t));
  if (ctl_jnum(op, "updated", &t))
    printf("  updated   %s (%s ago)\n", ctl_fmt_time(a, sizeof a, t), ctl_fmt_age(b, sizeof b, t));
  if (ctl_jstr(op, "progress")) printf("  progress  %s\n", ctl_jstr(op, "progress"));
  if (ctl_jstr(op, "reason")) printf("  reason    %s\n", ctl_jstr(op, "reason"));
  return CTL_EXIT_OK;
}

static int print_table(const json_t *ops) {
  static const char *const headers[] = {"ID", "KIND", "ARGS", "STATE", ">STEP", ">AGE", "DETAIL"};
  ctl_table *t = ctl_table_new(7, headers);
  if (!t) goto oom;
  for (size_t i = 0; i < json_array_size(ops); i++) {
    const json_t *op = json_array_get(ops, i);
    char args[256], step[32], age[32] = "-";
    double created;
    if (ctl_jnum(op, "created", &created)) ctl_fmt_age(age, sizeof age, created);
    const char *state = ctl_jstr(op, "state");
    const char *detail =
        state && !strcmp(state, "failed") ? ctl_jstr(op, "reason") : ctl_jstr(op, "progress");
    const char *row[] = {ctl_jstr(op, "id"),
                         ctl_jstr(op, "kind"),
                         args_text(args, sizeof args, json_object_get(op, "args")),
                         state,
                         ctl_fmt_field(step, sizeof step, op, "step", "%.0f"),
                         age,
                         detail};
    if (ctl_table_add(t, row)) goto oom;
  }
  ctl_table_print(t, stdout, 0);
  printf("\n%d operation%s.\n", ctl_table_rows(t), ctl_table_rows(t) == 1 ? "" : "s");
  ctl_table_free(t);
  return CTL_EXIT_OK;
oom:
  ctl_table_free(t);
  fprintf(stderr, "mtnlgctl ops: out of memory\n");
  return CTL_EXIT_FAILURE;
}

int ctl_verb_ops(const ctl_verb *verb, int argc, char **argv) {
  static const struct option opts[] = {
      {"output", required_argument, NULL, 'o'},
      {0},
  };
  int ret = CTL_EXIT_USAGE, c;
  json_t *answer = NULL;
  char path[192] = "/v1/operations";
  while ((c = getopt_long(argc, argv, "o:", opts, NULL)) != -1) {
    switch (c) {
    case 'o':
      if (ctl_parse_output(optarg, &ctl.output)) goto cleanup;
      break;
    default: fprintf(stderr, "See 'mtnlgctl ops --help'.\n"); goto cleanup;
    }
  }
  if (ctl_check_args(verb, argc - optind)) goto cleanup;
  const char *id = optind < argc ? argv[optind] : NULL;
  if (id && ctl_op_path(path, sizeof path, id)) {
    ctl_usage_error(verb, "\"%s\" is not an operation id (like op-7)", id);
    goto cleanup;
  }

  if ((ret = ctl_http_get(path, &answer))) goto cleanup;
  if (ctl.output == CTL_OUTPUT_JSON)
    ret = ctl_print_json(answer);
  else if (id)
    ret = print_one(answer);
  else if (!json_array_size(json_object_get(answer, "operations")))
    printf("no operations yet\n");
  else
    ret = print_table(json_object_get(answer, "operations"));
cleanup:
  json_decref(answer);
  return ret;
}
