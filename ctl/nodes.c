/* nodes.c — `mtnlgctl nodes`: the daemons of the cluster, one row each, from
 * the "nodes" of GET /v1/status (the coordinator's view of membership).
 */
#include <getopt.h>
#include <jansson.h>
#include <stdio.h>
#include <string.h>

#include "ctl.h"
#include "http.h"
#include "output.h"

const char ctl_nodes_help[] =
    "The nodes (one mtnlgd each) of the cluster as the coordinator sees them: name,\n"
    "role (coordinator, member, spare, joined, lost, left, refused), state, host, the\n"
    "ranks, pipeline stages and data-parallel replicas it holds, its devices, the age\n"
    "of its last heartbeat and its memory in use (1 GB = 10^9 bytes).\n"
    "\n"
    "Options:\n"
    "  -o, --output FORMAT    table (default) or json ({\"generation\", \"nodes\"} as in\n"
    "                         /v1/status)\n"
    "  -h, --help             show this help\n";

int ctl_nodes_print(const json_t *status, FILE *f, int indent) {
  static const char *const headers[] = {"NAME",   "ROLE",     "STATE",   "HOST",       "RANKS",
                                        "STAGES", "REPLICAS", "DEVICES", ">HEARTBEAT", ">MEMORY"};
  const json_t *nodes = json_object_get(status, "nodes");
  ctl_table *t = ctl_table_new(10, headers);
  if (!t) goto oom;
  for (size_t i = 0; i < json_array_size(nodes); i++) {
    const json_t *n = json_array_get(nodes, i);
    char ranks[256], stages[128], replicas[128], devices[256], hb[32] = "-", mem[32] = "-";
    double v;
    if (ctl_jnum(n, "heartbeat_age_s", &v)) ctl_fmt_duration(hb, sizeof hb, v);
    if (ctl_jnum(n, "memory_bytes", &v)) ctl_fmt_bytes(mem, sizeof mem, v);
    const char *row[] = {ctl_jstr(n, "name"),
                         ctl_jstr(n, "role"),
                         ctl_jstr(n, "state"),
                         ctl_jstr(n, "host"),
                         ctl_fmt_ints(ranks, sizeof ranks, json_object_get(n, "ranks")),
                         ctl_fmt_ints(stages, sizeof stages, json_object_get(n, "stages")),
                         ctl_fmt_ints(replicas, sizeof replicas, json_object_get(n, "replicas")),
                         ctl_fmt_devices(devices, sizeof devices, json_object_get(n, "devices")),
                         hb,
                         mem};
    if (ctl_table_add(t, row)) goto oom;
  }
  ctl_table_print(t, f, indent);
  ctl_table_free(t);
  return CTL_EXIT_OK;
oom:
  ctl_table_free(t);
  fprintf(stderr, "mtnlgctl: out of memory\n");
  return CTL_EXIT_FAILURE;
}

int ctl_verb_nodes(const ctl_verb *verb, int argc, char **argv) {
  static const struct option opts[] = {
      {"output", required_argument, NULL, 'o'},
      {0},
  };
  int ret = CTL_EXIT_USAGE, c;
  json_t *st = NULL, *out = NULL;
  while ((c = getopt_long(argc, argv, "o:", opts, NULL)) != -1) {
    switch (c) {
    case 'o':
      if (ctl_parse_output(optarg, &ctl.output)) goto cleanup;
      break;
    default: fprintf(stderr, "See 'mtnlgctl nodes --help'.\n"); goto cleanup;
    }
  }
  if (ctl_check_args(verb, argc - optind)) goto cleanup;

  if ((ret = ctl_http_get("/v1/status", &st))) goto cleanup;
  json_t *nodes = json_object_get(st, "nodes");
  if (ctl.output == CTL_OUTPUT_JSON) {
    json_t *list = json_is_array(nodes) ? json_incref(nodes) : json_array();
    out = json_pack("{s:O?, s:o}", "generation", json_object_get(st, "generation"), "nodes", list);
    ret = out ? ctl_print_json(out) : CTL_EXIT_FAILURE;
    goto cleanup;
  }
  if (!json_array_size(nodes)) {
    printf("no nodes yet (state %s)\n", ctl_jstr(st, "state") ? ctl_jstr(st, "state") : "-");
    ret = CTL_EXIT_OK;
    goto cleanup;
  }
  if ((ret = ctl_nodes_print(st, stdout, 0))) goto cleanup;
  char gen[32];
  const char *state = ctl_jstr(st, "state"), *reason = ctl_jstr(st, "reason");
  int forming = state && !strcmp(state, "forming");
  printf("\n%zu node%s %s generation %s%s%s.\n", json_array_size(nodes),
         json_array_size(nodes) == 1 ? "" : "s", forming ? "present, forming" : "in",
         ctl_fmt_field(gen, sizeof gen, st, "generation", "%.0f"), forming && reason ? ": " : "",
         forming && reason ? reason : "");
  ret = CTL_EXIT_OK;
cleanup:
  json_decref(out);
  json_decref(st);
  return ret;
}
