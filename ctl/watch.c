/* watch.c — `mtnlgctl watch`: GET /v1/status again and again.
 *
 * On a terminal the view is redrawn in place (cursor home, each line cleared
 * to its end, the rest of the screen cleared after), so it does not flicker
 * and scrollback stays clean; elsewhere (a pipe, a log) each refresh is one
 * line; -o json prints each STATUS object as one line (JSON Lines). A daemon
 * that cannot be reached on the first refresh ends the watch (exit 3); later
 * it is shown and the watch goes on (a daemon restarting comes back).
 */
#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "ctl.h"
#include "http.h"
#include "output.h"

enum { MAX_NODES_INLINE = 8 };
#define MIN_INTERVAL_S 0.1

const char ctl_watch_help[] =
    "Follows the job: step, loss, tokens/s, TFLOP/s per device, state, and one line\n"
    "per node (role, state, ranks, heartbeat, memory), refreshed every interval. On a\n"
    "terminal the view is redrawn in place; otherwise each refresh prints one line:\n"
    "time, step, loss, tokens/s, state and NAME=STATE/HEARTBEAT per node. With\n"
    "-o json each refresh prints the daemon's /v1/status object on one line.\n"
    "If the daemon cannot be reached at the first refresh, watch exits 3; later\n"
    "failures are shown and watching goes on. Stop with Ctrl-C.\n"
    "\n"
    "Options:\n"
    "  --interval S           seconds between refreshes (default 2, at least 0.1)\n"
    "  --count N              stop after N refreshes (default: never); the exit status\n"
    "                         is then that of the last refresh\n"
    "  -o, --output FORMAT    table (default) or json (JSON Lines)\n"
    "  -h, --help             show this help\n";

static void sleep_s(double s) {
  struct timespec t = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
  while (nanosleep(&t, &t) && errno == EINTR) {
  }
}

static char *now_text(char *buf, size_t cap, const char *fmt) {
  time_t now = time(NULL);
  struct tm tm;
  if (!localtime_r(&now, &tm) || !strftime(buf, cap, fmt, &tm)) snprintf(buf, cap, "-");
  return buf;
}

/* "step 12/1000" or "step 12" */
static char *step_text(char *buf, size_t cap, const json_t *st) {
  double step, steps;
  if (!ctl_jnum(st, "step", &step))
    snprintf(buf, cap, "step -");
  else if (ctl_jnum(json_object_get(st, "job"), "steps", &steps) && steps > 0)
    snprintf(buf, cap, "step %.0f/%.0f", step, steps);
  else
    snprintf(buf, cap, "step %.0f", step);
  return buf;
}

/* One line: time, step, loss, tokens/s, state, then the nodes compactly. */
static void print_line(const json_t *st) {
  char t[32], step[64], loss[32], tps[32];
  const json_t *nodes = json_object_get(st, "nodes");
  size_t n = json_array_size(nodes);
  printf("%s %s loss %s tokens/s %s state %s", now_text(t, sizeof t, "%Y-%m-%dT%H:%M:%S"),
         step_text(step, sizeof step, st), ctl_fmt_field(loss, sizeof loss, st, "loss", "%.4f"),
         ctl_fmt_field(tps, sizeof tps, st, "tokens_per_s", "%.0f"),
         ctl_jstr(st, "state") ? ctl_jstr(st, "state") : "-");
  if (n) printf(" nodes");
  for (size_t i = 0; i < n && i < MAX_NODES_INLINE; i++) {
    const json_t *node = json_array_get(nodes, i);
    double hb;
    const char *name = ctl_jstr(node, "name"), *state = ctl_jstr(node, "state");
    printf(" %s=%s", name ? name : "-", state ? state : "-");
    if (ctl_jnum(node, "heartbeat_age_s", &hb)) printf("/%.1fs", hb);
  }
  if (n > MAX_NODES_INLINE) printf(" +%zu more", n - MAX_NODES_INLINE);
  printf("\n");
}

/* The full view for a terminal, into f (a memory stream). */
static void render_view(FILE *f, const json_t *st, const char *error, double interval_s) {
  char t[32], a[64], b[64], c[64], d[64];
  fprintf(f, "mtnlgctl watch: %s every %.1f s, %s\n\n", ctl_http_endpoint(), interval_s,
          now_text(t, sizeof t, "%H:%M:%S"));
  if (error) fprintf(f, "%s\n%s\n", error, st ? "the last answer:\n" : "");
  if (!st) return;
  const json_t *job = json_object_get(st, "job");
  const char *state = ctl_jstr(st, "state"), *reason = ctl_jstr(st, "reason");
  fprintf(f, "job %s  generation %s  state %s%s%s\n",
          ctl_jstr(job, "name") ? ctl_jstr(job, "name") : "-",
          ctl_fmt_field(a, sizeof a, st, "generation", "%.0f"), state ? state : "-",
          reason ? ": " : "", reason ? reason : "");
  char ev[160];
  if (ctl_fmt_evaluation(ev, sizeof ev, json_object_get(st, "evaluation")))
    fprintf(f, "evaluating %s\n", ev);
  double eta, tflops = 0;
  size_t n_dev = 0;
  const json_t *devs = json_object_get(st, "devices");
  for (size_t i = 0; i < json_array_size(devs); i++) {
    double v;
    if (ctl_jnum(json_array_get(devs, i), "tflops", &v)) tflops += v, n_dev++;
  }
  fprintf(f, "%s  loss %s  lr %s  grad norm %s\n", step_text(a, sizeof a, st),
          ctl_fmt_field(b, sizeof b, st, "loss", "%.4f"),
          ctl_fmt_field(c, sizeof c, st, "lr", "%.3e"),
          ctl_fmt_field(d, sizeof d, st, "grad_norm", "%.3f"));
  fprintf(f, "tokens/s %s  TFLOP/s per device ",
          ctl_fmt_field(a, sizeof a, st, "tokens_per_s", "%.0f"));
  fprintf(f, "%s", n_dev ? ctl_fmt_rate(b, sizeof b, tflops / (double)n_dev) : "-");
  double step_ms;
  if (ctl_jnum(json_object_get(st, "step_time"), "total_ms", &step_ms) && step_ms > 0)
    snprintf(a, sizeof a, "%.1f", step_ms);
  else
    snprintf(a, sizeof a, "-"); /* 0: no step yet */
  fprintf(f, "  step %s ms  ETA %s", a,
          ctl_jnum(st, "eta_s", &eta) ? ctl_fmt_duration(b, sizeof b, eta) : "-");
  /* past a minute, when on this machine's clock, as mtnlgctl status says */
  if (ctl_jnum(st, "eta_s", &eta) && eta >= 60)
    fprintf(f, " (about %s)", ctl_fmt_time(c, sizeof c, (double)time(NULL) + eta));
  fprintf(f, "\n");
  fprintf(f, "\n");
  if (json_array_size(json_object_get(st, "nodes")))
    ctl_nodes_print(st, f, 0);
  else
    fprintf(f, "no nodes yet\n");
}

/* Redraws the terminal: home, every line cleared to its end, the rest cleared. */
static void draw(const json_t *st, const char *error, double interval_s) {
  char *text = NULL;
  size_t len = 0;
  FILE *f = open_memstream(&text, &len);
  if (!f) return;
  render_view(f, st, error, interval_s);
  if (fclose(f)) {
    free(text);
    return;
  }
  static int cleared;
  if (!cleared) fputs("\033[2J", stdout); /* the first view starts on a clear screen */
  cleared = 1;
  fputs("\033[H", stdout);
  for (const char *line = text; *line;) {
    const char *nl = strchr(line, '\n');
    size_t n = nl ? (size_t)(nl - line) : strlen(line);
    fwrite(line, 1, n, stdout);
    fputs("\033[K\n", stdout);
    line += n + (nl != NULL);
  }
  fputs("\033[J", stdout);
  fflush(stdout);
  free(text);
}

int ctl_verb_watch(const ctl_verb *verb, int argc, char **argv) {
  enum { OPT_INTERVAL = 256, OPT_COUNT };
  static const struct option opts[] = {
      {"interval", required_argument, NULL, OPT_INTERVAL},
      {"count", required_argument, NULL, OPT_COUNT},
      {"output", required_argument, NULL, 'o'},
      {0},
  };
  int ret = CTL_EXIT_USAGE, c;
  double interval_s = 2, count = 0;
  while ((c = getopt_long(argc, argv, "o:", opts, NULL)) != -1) {
    switch (c) {
    case OPT_INTERVAL:
      if (ctl_parse_positive(verb, "--interval", optarg, 0, &interval_s)) return ret;
      if (interval_s < MIN_INTERVAL_S)
        return ctl_usage_error(verb, "--interval: %s s is under %.1f s", optarg, MIN_INTERVAL_S);
      break;
    case OPT_COUNT:
      if (ctl_parse_positive(verb, "--count", optarg, 1, &count)) return ret;
      break;
    case 'o':
      if (ctl_parse_output(optarg, &ctl.output)) return ret;
      break;
    default: fprintf(stderr, "See 'mtnlgctl watch --help'.\n"); return ret;
    }
  }
  if (ctl_check_args(verb, argc - optind)) return ret;

  int tty = ctl.output == CTL_OUTPUT_TABLE && isatty(STDOUT_FILENO);
  json_t *last = NULL; /* the last answer, still shown on a terminal while none comes */
  for (long i = 0; count == 0 || i < (long)count; i++) {
    if (i) sleep_s(interval_s);
    json_t *st = NULL, *problem = NULL;
    char err[1024];
    ret = ctl_http_request("GET", "/v1/status", NULL, &st, &problem, NULL, err, sizeof err);
    if (ret) {
      /* the first answer a refusal (401, say): printed as every verb prints
       * one, its problem under -o json; later ones go on stderr, between the
       * statuses of the stream */
      if (i == 0)
        ctl_http_print_error(err, problem);
      else if (!tty)
        fprintf(stderr, "mtnlgctl: %s\n", err);
      json_decref(problem);
      if (i == 0) break; /* nothing to watch: a wrong endpoint, most likely */
      if (tty) draw(last, err, interval_s);
      continue;
    }
    if (ctl.output == CTL_OUTPUT_JSON) {
      if (json_dumpf(st, stdout, JSON_COMPACT | JSON_PRESERVE_ORDER) || putchar('\n') == EOF)
        ret = CTL_EXIT_FAILURE;
    } else if (tty) {
      draw(st, NULL, interval_s);
    } else {
      print_line(st);
    }
    json_decref(last);
    last = st;
    if (fflush(stdout)) {
      fprintf(stderr, "mtnlgctl watch: writing the output failed\n");
      ret = CTL_EXIT_FAILURE;
      break;
    }
  }
  json_decref(last);
  return ret;
}
