/* checkpoints.c — `mtnlgctl checkpoints`: the committed checkpoints of the
 * job, from GET /v1/checkpoints, oldest first as the daemon lists them.
 */
#include <getopt.h>
#include <jansson.h>
#include <stdio.h>
#include <string.h>

#include "ctl.h"
#include "http.h"
#include "output.h"

const char ctl_checkpoints_help[] =
    "The job's committed checkpoints (those with a manifest): step, time written,\n"
    "age, size (1 GB = 10^9 bytes), whether it is the one `latest` points to, and\n"
    "its directory; then each one whose sizes show damage (a truncated shard, a\n"
    "manifest of another step), and why.\n"
    "\n"
    "Options:\n"
    "  -o, --output FORMAT    table (default) or json (the daemon's /v1/checkpoints)\n"
    "  -h, --help             show this help\n";

static int print_table(const json_t *list) {
  static const char *const headers[] = {">STEP", "TIME", ">AGE", ">SIZE", "LATEST", "PATH"};
  ctl_table *t = ctl_table_new(6, headers);
  double latest_step = -1;
  if (!t) goto oom;
  for (size_t i = 0; i < json_array_size(list); i++) {
    const json_t *ck = json_array_get(list, i);
    char step[32], time[32] = "-", age[32] = "-", size[32] = "-";
    double v;
    if (ctl_jnum(ck, "time", &v)) {
      ctl_fmt_time(time, sizeof time, v);
      ctl_fmt_age(age, sizeof age, v);
    }
    if (ctl_jnum(ck, "bytes", &v)) ctl_fmt_bytes(size, sizeof size, v);
    int latest = json_is_true(json_object_get(ck, "latest"));
    if (latest) ctl_jnum(ck, "step", &latest_step);
    const char *row[] = {ctl_fmt_field(step, sizeof step, ck, "step", "%.0f"),
                         time,
                         age,
                         size,
                         latest ? "yes" : "",
                         ctl_jstr(ck, "path")};
    if (ctl_table_add(t, row)) goto oom;
  }
  ctl_table_print(t, stdout, 0);
  printf("\n%d checkpoint%s", ctl_table_rows(t), ctl_table_rows(t) == 1 ? "" : "s");
  if (latest_step >= 0) printf("; latest is step %.0f", latest_step);
  printf(".\n");
  /* what the sizes show (the daemon reads no data): a resume passes over these */
  for (size_t i = 0; i < json_array_size(list); i++) {
    const json_t *ck = json_array_get(list, i);
    char step[32];
    if (ctl_jstr(ck, "damaged"))
      printf("step %s is damaged: %s (mtnlgctl ckpt verify %s checks every byte)\n",
             ctl_fmt_field(step, sizeof step, ck, "step", "%.0f"), ctl_jstr(ck, "damaged"),
             ctl_jstr(ck, "path") ? ctl_jstr(ck, "path") : "DIR");
  }
  ctl_table_free(t);
  return CTL_EXIT_OK;
oom:
  ctl_table_free(t);
  fprintf(stderr, "mtnlgctl checkpoints: out of memory\n");
  return CTL_EXIT_FAILURE;
}

/* "No checkpoints yet", and what would write one in the job's state:
 * `mtnlgctl checkpoint` is refused until a generation runs, and after the
 * job ended. The state is the status's; without it, the hint says when. */
static void print_none_yet(const char *dir) {
  json_t *st = NULL;
  char err[1024];
  ctl_http_request("GET", "/v1/status", NULL, &st, NULL, NULL, err, sizeof err);
  const char *state = ctl_jstr(st, "state");
  if (!state)
    printf("no checkpoints yet in %s (`mtnlgctl checkpoint` writes one while the job runs)\n", dir);
  else if (!strcmp(state, "forming") || !strcmp(state, "resizing"))
    printf("no checkpoints yet in %s; the cluster is %s, and `mtnlgctl checkpoint` is refused "
           "until a generation runs (`mtnlgctl status` says what it waits for)\n",
           dir, state);
  else if (!strcmp(state, "stopping"))
    printf("no checkpoints yet in %s; the job is stopping, and its stop saves one\n", dir);
  else if (!strcmp(state, "stopped") || !strcmp(state, "failed"))
    printf("no checkpoints in %s; the job has ended (%s)\n", dir, state);
  else
    printf("no checkpoints yet in %s (`mtnlgctl checkpoint` writes one)\n", dir);
  json_decref(st);
}

int ctl_verb_checkpoints(const ctl_verb *verb, int argc, char **argv) {
  static const struct option opts[] = {
      {"output", required_argument, NULL, 'o'},
      {0},
  };
  int ret = CTL_EXIT_USAGE, c;
  json_t *answer = NULL;
  while ((c = getopt_long(argc, argv, "o:", opts, NULL)) != -1) {
    switch (c) {
    case 'o':
      if (ctl_parse_output(optarg, &ctl.output)) goto cleanup;
      break;
    default: fprintf(stderr, "See 'mtnlgctl checkpoints --help'.\n"); goto cleanup;
    }
  }
  if (ctl_check_args(verb, argc - optind)) goto cleanup;

  if ((ret = ctl_http_get("/v1/checkpoints", &answer))) goto cleanup;
  const json_t *list = json_object_get(answer, "checkpoints");
  if (ctl.output == CTL_OUTPUT_JSON)
    ret = ctl_print_json(answer);
  else if (!json_array_size(list) && !json_is_string(json_object_get(answer, "dir")))
    printf("no checkpoints: the job has no checkpoint.dir (nor has this node's config), so none "
           "is saved and mtnlgctl checkpoint is refused\n");
  else if (!json_array_size(list))
    print_none_yet(json_string_value(json_object_get(answer, "dir")));
  else
    ret = print_table(list);
cleanup:
  json_decref(answer);
  return ret;
}
