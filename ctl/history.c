/* history.c — `mtnlgctl history`: the job's steps as the daemon keeps them
 * (GET /v1/history), one row each, oldest first: the loss curve in a
 * terminal, or for a script in JSON.
 */
#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctl.h"
#include "http.h"
#include "output.h"

const char ctl_history_help[] =
    "The job's steps that the daemon keeps (its last 10000), oldest first: step, loss,\n"
    "validation loss (after a step that validated; at a completed run's last step the\n"
    "end of training's), learning rate, gradient norm, step time, tokens/s and when the\n"
    "step ended; then the test pass's loss where the run has one. After a restart from a\n"
    "checkpoint the steps since it are those trained again.\n"
    "\n"
    "Options:\n"
    "      --since STEP       the steps after STEP (0: all)\n"
    "  -n, --last N           the newest N of them\n"
    "  -o, --output FORMAT    table (default) or json (the daemon's /v1/history, its\n"
    "                         steps cut to the newest N with --last)\n"
    "  -h, --help             show this help\n";

static int print_table(const json_t *steps, size_t from) {
  static const char *const headers[] = {">STEP",      ">LOSS",    ">VAL LOSS", ">LR",
                                        ">GRAD NORM", ">STEP MS", ">TOKENS/S", "ENDED"};
  ctl_table *t = ctl_table_new(8, headers);
  const json_t *test = NULL;
  if (!t) goto oom;
  for (size_t i = from; i < json_array_size(steps); i++) {
    const json_t *pt = json_array_get(steps, i);
    char step[32], loss[32], val[32], lr[32], norm[32], ms[32], tps[32], ended[32] = "-";
    double v;
    if (ctl_jnum(pt, "time", &v)) ctl_fmt_time(ended, sizeof ended, v);
    if (ctl_jnum(pt, "test_loss", &v)) test = pt;
    const char *row[] = {ctl_fmt_field(step, sizeof step, pt, "step", "%.0f"),
                         ctl_fmt_field(loss, sizeof loss, pt, "loss", "%.4f"),
                         ctl_fmt_field(val, sizeof val, pt, "val_loss", "%.4f"),
                         ctl_fmt_field(lr, sizeof lr, pt, "lr", "%.3e"),
                         ctl_fmt_field(norm, sizeof norm, pt, "grad_norm", "%.3f"),
                         ctl_fmt_field(ms, sizeof ms, pt, "step_ms", "%.1f"),
                         ctl_fmt_field(tps, sizeof tps, pt, "tokens_per_s", "%.0f"),
                         ended};
    if (ctl_table_add(t, row)) goto oom;
  }
  ctl_table_print(t, stdout, 0);
  char first[32], last[32];
  int n = ctl_table_rows(t);
  printf("\n%d step%s", n, n == 1 ? "" : "s");
  if (n > 1)
    printf(", %s to %s",
           ctl_fmt_field(first, sizeof first, json_array_get(steps, from), "step", "%.0f"),
           ctl_fmt_field(last, sizeof last, json_array_get(steps, json_array_size(steps) - 1),
                         "step", "%.0f"));
  printf(".\n");
  if (test) {
    char loss[32], step[32];
    printf("test loss %s after step %s\n",
           ctl_fmt_field(loss, sizeof loss, test, "test_loss", "%.4f"),
           ctl_fmt_field(step, sizeof step, test, "step", "%.0f"));
  }
  ctl_table_free(t);
  return CTL_EXIT_OK;
oom:
  ctl_table_free(t);
  fprintf(stderr, "mtnlgctl history: out of memory\n");
  return CTL_EXIT_FAILURE;
}

int ctl_verb_history(const ctl_verb *verb, int argc, char **argv) {
  enum { OPT_SINCE = 256 };
  static const struct option opts[] = {
      {"since", required_argument, NULL, OPT_SINCE},
      {"last", required_argument, NULL, 'n'},
      {"output", required_argument, NULL, 'o'},
      {0},
  };
  int ret = CTL_EXIT_USAGE, c;
  double since = 0, last = 0;
  json_t *answer = NULL, *out = NULL;
  while ((c = getopt_long(argc, argv, "n:o:", opts, NULL)) != -1) {
    switch (c) {
    case OPT_SINCE: { /* 0, or a step */
      char *end;
      errno = 0;
      long long v = strtoll(optarg, &end, 10);
      if (!isdigit((unsigned char)optarg[0]) || *end || errno) {
        ret = ctl_usage_error(verb,
                              "--since: \"%s\" is not a step number (0 or more, in decimal "
                              "digits)",
                              optarg);
        goto cleanup;
      }
      since = (double)v;
      break;
    }
    case 'n':
      if (ctl_parse_positive(verb, "--last", optarg, 1, &last)) goto cleanup;
      break;
    case 'o':
      if (ctl_parse_output(optarg, &ctl.output)) goto cleanup;
      break;
    default: fprintf(stderr, "See 'mtnlgctl history --help'.\n"); goto cleanup;
    }
  }
  if (ctl_check_args(verb, argc - optind)) goto cleanup;

  char path[64];
  snprintf(path, sizeof path, "/v1/history?since=%.0f", since);
  if ((ret = ctl_http_get(path, &answer))) goto cleanup;
  json_t *steps = json_object_get(answer, "steps");
  size_t n = json_array_size(steps);
  size_t from = last > 0 && (size_t)last < n ? n - (size_t)last : 0;
  if (ctl.output == CTL_OUTPUT_JSON) {
    json_t *kept = json_array();
    for (size_t i = from; kept && i < n; i++) json_array_append(kept, json_array_get(steps, i));
    out = kept ? json_pack("{s:o, s:O?}", "steps", kept, "last_step",
                           json_object_get(answer, "last_step"))
               : NULL;
    ret = out ? ctl_print_json(out) : CTL_EXIT_FAILURE;
  } else if (!n) {
    if (since > 0)
      printf("no steps after step %.0f yet\n", since);
    else
      printf("no steps yet\n");
    ret = CTL_EXIT_OK;
  } else {
    ret = print_table(steps, from);
  }
cleanup:
  json_decref(out);
  json_decref(answer);
  return ret;
}
