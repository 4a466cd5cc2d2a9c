/* ckpt.c — `mtnlgctl ckpt verify DIR`: every checksum of checkpoints on
 * disk, offline, without a daemon (daemon/ckpt does the reading); `mtnlgctl
 * ckpt export DIR OUT`: a checkpoint's weights as GPT-2 safetensors. */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "ckpt.h"
#include "ckpt_export.h"
#include "ctl.h"
#include "err.h"
#include "log.h"

const char ctl_ckpt_help[] =
    "Checks checkpoints offline, or exports one's weights. DIR is one checkpoint (a\n"
    "step_NNNNNNNN directory with its manifest.json) or a job's checkpoint directory\n"
    "(every committed step in it). Every shard file's size, header and per-chunk XXH3\n"
    "checksum is compared with the manifest; each problem is printed with its file and\n"
    "chunk. A checkpoint a resume set aside as damaged (step_NNNNNNNN.damaged) is not\n"
    "part of its job's directory: name it as DIR.\n"
    "\n"
    "  verify DIR       exit 0 when every checksum matches, 1 when anything is wrong\n"
    "  export DIR OUT   write the checkpoint's fp32 master weights to OUT as Hugging Face\n"
    "                   GPT-2 safetensors (what --export writes at that step), whatever its\n"
    "                   tp x pp layout; a job directory as DIR exports the checkpoint a\n"
    "                   resume would load. Every checksum is checked first; the file is\n"
    "                   written a tensor at a time and appears only once complete.\n"
    "  -o json          one object: {\"checked\": [...], \"problems\": [...]} (verify),\n"
    "                   {\"checkpoint\", \"step\", \"path\", \"bytes\"} (export)\n";

typedef struct verify_ctx {
  json_t *problems;
  const char *dir;
} verify_ctx;

static void on_problem(void *arg, const char *problem) {
  verify_ctx *v = arg;
  json_array_append_new(v->problems,
                        json_pack("{s:s, s:s}", "checkpoint", v->dir, "problem", problem));
  if (ctl.output == CTL_OUTPUT_TABLE) printf("  %s\n", problem);
}

static int is_file(const char *dir, const char *name) {
  char p[4096];
  struct stat st;
  snprintf(p, sizeof p, "%s/%s", dir, name);
  return stat(p, &st) == 0 && S_ISREG(st.st_mode);
}

/* ckpt export DIR OUT: DIR a step directory or a job's directory. */
static int export_checkpoint(const char *dir, const char *out) {
  char job_dir[MT_CKPT_PATH_MAX];
  int64_t step = -1;
  snprintf(job_dir, sizeof job_dir, "%s", dir);
  if (is_file(dir, "manifest.json")) { /* one step directory: its job's, that step */
    char *slash = strrchr(job_dir, '/');
    const char *base = slash ? slash + 1 : job_dir;
    char *end;
    long long s = strncmp(base, "step_", 5) ? -1 : strtoll(base + 5, &end, 10);
    if (s < 0 || *end) {
      fprintf(stderr, "mtnlgctl ckpt: %s is not named step_NNNNNNNN\n", dir);
      return CTL_EXIT_FAILURE;
    }
    step = s;
    if (slash)
      *slash = 0;
    else
      snprintf(job_dir, sizeof job_dir, ".");
  }
  mt_log_set_level(MT_LOG_WARN); /* a resume's notes on passed-over checkpoints stay */
  mt_ckpt c;
  int rc = mt_ckpt_find(job_dir, step, MT_CKPT_VERIFY_CHECKSUMS, &c);
  if (rc) {
    fprintf(stderr, "mtnlgctl ckpt: %s\n", mt_ckpt_unprefixed(mt_errmsg()));
    return CTL_EXIT_FAILURE;
  }
  rc = mt_ckpt_export(&c, out);
  if (rc) {
    fprintf(stderr, "mtnlgctl ckpt: %s\n", mt_errmsg());
    mt_ckpt_close(&c);
    return CTL_EXIT_FAILURE;
  }
  struct stat st;
  long long bytes = stat(out, &st) ? -1 : (long long)st.st_size;
  if (ctl.output == CTL_OUTPUT_JSON) {
    json_t *j = json_pack("{s:s, s:I, s:s, s:I}", "checkpoint", c.dir, "step", (json_int_t)c.step,
                          "path", out, "bytes", (json_int_t)bytes);
    char *text = json_dumps(j, JSON_INDENT(2));
    if (text) printf("%s\n", text);
    free(text);
    json_decref(j);
  } else {
    printf("exported step %lld of %s (tp %d x pp %d) to %s: %.1f MB\n", (long long)c.step, c.dir,
           c.tp, c.pp, out, bytes / 1e6);
  }
  mt_ckpt_close(&c);
  return CTL_EXIT_OK;
}

int ctl_verb_ckpt(const ctl_verb *verb, int argc, char **argv) {
  int ret = CTL_EXIT_USAGE;
  json_t *checked = json_array(), *problems = json_array();
  const char *dir = NULL, *out = NULL;
  for (int i = 1; i < argc; i++) {
    if ((!strcmp(argv[i], "-o") || !strcmp(argv[i], "--output")) && i + 1 < argc) {
      if (ctl_parse_output(argv[++i], &ctl.output)) goto cleanup;
    } else if (!strncmp(argv[i], "--output=", 9)) {
      if (ctl_parse_output(argv[i] + 9, &ctl.output)) goto cleanup;
    } else if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
      ctl_verb_help(verb, stdout);
      ret = CTL_EXIT_OK;
      goto cleanup;
    } else if (argv[i][0] == '-') {
      ret = ctl_usage_error(verb, "unknown option %s", argv[i]);
      goto cleanup;
    } else if (!strcmp(argv[i], "verify") && !dir && i + 1 < argc) {
      dir = argv[++i];
    } else if (!strcmp(argv[i], "export") && !dir && i + 2 < argc) {
      dir = argv[++i];
      out = argv[++i];
    } else {
      ret = ctl_usage_error(verb, "expected: mtnlgctl ckpt verify DIR, or ckpt export DIR OUT");
      goto cleanup;
    }
  }
  if (!dir) {
    ret = ctl_usage_error(verb, "expected: mtnlgctl ckpt verify DIR, or ckpt export DIR OUT");
    goto cleanup;
  }
  if (out) {
    ret = export_checkpoint(dir, out);
    goto cleanup;
  }
  ret = CTL_EXIT_FAILURE;
  /* one checkpoint, or every committed one of a job directory */
  char **dirs = NULL;
  size_t n = 0;
  if (is_file(dir, "manifest.json")) {
    dirs = calloc(1, sizeof *dirs);
    if (dirs) dirs[n++] = strdup(dir);
  } else {
    mt_ckpt_entry *e = NULL;
    size_t count = 0;
    if (mt_ckpt_list(dir, &e, &count)) {
      fprintf(stderr, "mtnlgctl ckpt: %s\n", mt_ckpt_unprefixed(mt_errmsg()));
      goto cleanup;
    }
    dirs = calloc(count ? count : 1, sizeof *dirs);
    for (size_t i = 0; dirs && i < count; i++) dirs[n++] = strdup(e[i].path);
    free(e);
    if (!n) {
      fprintf(stderr,
              "mtnlgctl ckpt: %s holds no committed checkpoint (no step_* directory with a "
              "manifest.json)\n",
              dir);
      free(dirs);
      goto cleanup;
    }
  }
  int bad = 0;
  for (size_t i = 0; i < n; i++) {
    verify_ctx v = {problems, dirs[i]};
    size_t before = json_array_size(problems);
    if (ctl.output == CTL_OUTPUT_TABLE) printf("%s\n", dirs[i]);
    int rc = mt_ckpt_verify(dirs[i], on_problem, &v);
    if (rc && json_array_size(problems) == before) on_problem(&v, mt_errmsg());
    int ok = !rc && json_array_size(problems) == before;
    bad |= !ok;
    json_array_append_new(checked, json_pack("{s:s, s:b}", "checkpoint", dirs[i], "ok", ok));
    if (ctl.output == CTL_OUTPUT_TABLE)
      printf("  %s\n", ok ? "ok: every checksum matches" : "DAMAGED");
    free(dirs[i]);
  }
  free(dirs);
  if (ctl.output == CTL_OUTPUT_JSON) {
    json_t *out = json_pack("{s:O, s:O}", "checked", checked, "problems", problems);
    char *s = json_dumps(out, JSON_INDENT(2));
    if (s) printf("%s\n", s);
    free(s);
    json_decref(out);
  }
  ret = bad ? CTL_EXIT_FAILURE : CTL_EXIT_OK;
cleanup:
  json_decref(checked);
  json_decref(problems);
  return ret;
}
