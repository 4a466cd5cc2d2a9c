/* ckpt.c — `mtnlgctl ckpt verify DIR`: every checksum of checkpoints on
 * disk, offline, without a daemon (daemon/ckpt does the reading); `mtnlgctl
 * ckpt export DIR OUT`: a checkpoint's weights as GPT-2 safetensors;
 * `mtnlgctl ckpt reshard DIR OUT --tp T --pp P`: one under another layout. */
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "ckpt.h"
#include "ckpt_export.h"
#include "ctl.h"
#include "err.h"
#include "log.h"
#include "output.h"
#include "safetensors.h"

const char ctl_ckpt_help[] =
    "Checks checkpoints offline, or exports one's weights. DIR is one checkpoint (a\n"
    "step_NNNNNNNN directory with its manifest.json) or a job's checkpoint directory\n"
    "(every committed step in it). Every shard file's size, header and per-chunk XXH3\n"
    "checksum is compared with the manifest; each problem is printed with its file and\n"
    "chunk. A checkpoint a resume set aside as damaged (step_NNNNNNNN.damaged) is not\n"
    "part of its job's directory: name it as DIR.\n"
    "\n"
    "  verify DIR       exit 0 when every checksum matches, 1 when anything is wrong\n"
    "  export DIR OUT [--dtype fp32|bf16|fp16]\n"
    "                   write the checkpoint's master weights to OUT as Hugging Face GPT-2\n"
    "                   safetensors (what --export writes at that step), whatever its\n"
    "                   tp x pp layout; a job directory as DIR exports the checkpoint a\n"
    "                   resume would load. Every checksum is checked first; the file is\n"
    "                   written a tensor at a time and appears only once complete. OUT\n"
    "                   a directory (or ending in /): Hugging Face's sharded layout and\n"
    "                   config.json, which transformers' from_pretrained loads; one file:\n"
    "                   config.json beside it unless another's is there. --dtype: fp32\n"
    "                   (default: the master weights as they are), or rounded to nearest\n"
    "                   even into bf16 or fp16 (half the bytes; a weight that rounds past\n"
    "                   fp16's 65504, or is not finite, is refused naming its tensor)\n"
    "  reshard DIR OUT --tp T --pp P [--virtual-stages V]\n"
    "                   write the checkpoint (master weights and Adam moments) under tensor\n"
    "                   parallelism T and P pipeline stages, as step N of the job directory\n"
    "                   OUT (made if missing, `latest` pointing at it; another directory\n"
    "                   than DIR's job). Point checkpoint.dir/name at OUT and set\n"
    "                   parallel.tp and pp to T and P: the job resumes there. The\n"
    "                   virtual stages (the chunks a stage holds) stay the checkpoint's\n"
    "                   unless --virtual-stages V sets them (1: plain 1F1B).\n"
    "  -o json          one object: {\"checked\": [...], \"problems\": [...]} (verify),\n"
    "                   {\"checkpoint\", \"step\", \"path\", \"bytes\", \"dtype\"} (export),\n"
    "                   {\"checkpoint\", \"step\", \"path\", \"tp\", \"pp\"} (reshard)\n";

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

/* Opens the checkpoint DIR names: a step directory, or a job's directory
 * (the one a resume would load). 0, or prints why not and returns 1. */
static int open_checkpoint(const char *dir, mt_ckpt *c) {
  mt_log_set_level(MT_LOG_WARN); /* a resume's notes on passed-over checkpoints stay */
  if (mt_ckpt_open_path(dir, MT_CKPT_VERIFY_CHECKSUMS, c)) {
    fprintf(stderr, "mtnlgctl ckpt: %s\n", mt_ckpt_unprefixed(mt_errmsg()));
    return 1;
  }
  return 0;
}

/* Whether OUT's directory is one to write into; prints why not, naming it
 * (not the temporary file the export would have made there). Checked before
 * the checkpoint's checksums are read, which takes a while. */
static int out_dir_ok(const char *out) {
  char parent[PATH_MAX];
  snprintf(parent, sizeof parent, "%s", out);
  size_t n = strlen(parent);
  while (n > 1 && parent[n - 1] == '/') parent[--n] = '\0'; /* "out/" names out */
  char *slash = strrchr(parent, '/');
  if (!slash)
    snprintf(parent, sizeof parent, ".");
  else if (slash == parent)
    parent[1] = '\0'; /* "/out": the root */
  else
    *slash = '\0';
  struct stat st;
  if (stat(parent, &st)) {
    fprintf(stderr, "mtnlgctl ckpt: export to %s: its directory %s: %s\n", out, parent,
            strerror(errno));
    return 0;
  }
  if (!S_ISDIR(st.st_mode)) {
    fprintf(stderr, "mtnlgctl ckpt: export to %s: %s is not a directory\n", out, parent);
    return 0;
  }
  return 1;
}

/* ckpt export DIR OUT */
static int export_checkpoint(const char *dir, const char *out, mt_st_dtype dtype) {
  mt_ckpt c;
  if (!out_dir_ok(out)) return CTL_EXIT_FAILURE;
  if (open_checkpoint(dir, &c)) return CTL_EXIT_FAILURE;
  if (mt_ckpt_export(&c, out, dtype)) {
    fprintf(stderr, "mtnlgctl ckpt: %s\n", mt_errmsg());
    mt_ckpt_close(&c);
    return CTL_EXIT_FAILURE;
  }
  struct stat st;
  long long bytes = stat(out, &st) ? -1 : (long long)st.st_size;
  if (!stat(out, &st) && S_ISDIR(st.st_mode)) { /* Hugging Face's sharded layout */
    char index[MT_CKPT_PATH_MAX + 64];
    snprintf(index, sizeof index, "%s/model.safetensors.index.json", out);
    json_t *j = json_load_file(index, 0, NULL);
    bytes = json_integer_value(json_object_get(json_object_get(j, "metadata"), "total_size"));
    json_decref(j);
  }
  if (ctl.output == CTL_OUTPUT_JSON) {
    json_t *j =
        json_pack("{s:s, s:I, s:s, s:I, s:s}", "checkpoint", c.dir, "step", (json_int_t)c.step,
                  "path", out, "bytes", (json_int_t)bytes, "dtype", mt_st_dtype_name(dtype));
    ctl_print_json(j);
    json_decref(j);
  } else {
    printf("exported step %lld of %s (tp %d x pp %d) to %s: %.1f MB %s\n", (long long)c.step, c.dir,
           c.tp, c.pp, out, bytes / 1e6, mt_st_dtype_name(dtype));
  }
  mt_ckpt_close(&c);
  return CTL_EXIT_OK;
}

/* ckpt reshard DIR OUT --tp T --pp P [--virtual-stages V] */
static int reshard_checkpoint(const char *dir, const char *out, int tp, int pp, int v) {
  mt_ckpt c;
  if (open_checkpoint(dir, &c)) return CTL_EXIT_FAILURE;
  /* never into the checkpoint's own job directory, nor over a step there */
  char src[PATH_MAX], dst[PATH_MAX], step_dir[MT_CKPT_PATH_MAX + 32];
  snprintf(step_dir, sizeof step_dir, "%s/step_%08lld", out, (long long)c.step);
  char *slash = strrchr(c.dir, '/');
  if (slash) *slash = 0;
  int same = realpath(slash ? c.dir : ".", src) && realpath(out, dst) && !strcmp(src, dst);
  if (slash) *slash = '/';
  struct stat st;
  int ret = CTL_EXIT_FAILURE;
  if (same)
    fprintf(stderr, "mtnlgctl ckpt: %s is the checkpoint's own job directory: name another\n", out);
  else if (!stat(step_dir, &st))
    fprintf(stderr, "mtnlgctl ckpt: %s exists: remove it, or name another directory\n", step_dir);
  else if (mt_ckpt_reshard(&c, tp, pp, v, out))
    fprintf(stderr, "mtnlgctl ckpt: %s\n", mt_errmsg());
  else
    ret = CTL_EXIT_OK;
  if (ret == CTL_EXIT_OK && ctl.output == CTL_OUTPUT_JSON) {
    json_t *j = json_pack("{s:s, s:I, s:s, s:i, s:i}", "checkpoint", c.dir, "step",
                          (json_int_t)c.step, "path", step_dir, "tp", tp, "pp", pp);
    if (v > 0) json_object_set_new(j, "virtual_stages", json_integer(v));
    ctl_print_json(j);
    json_decref(j);
  } else if (ret == CTL_EXIT_OK) {
    printf("resharded step %lld of %s from tp %d x pp %d to tp %d x pp %d: %s\n", (long long)c.step,
           c.dir, c.tp, c.pp, tp, pp, step_dir);
  }
  mt_ckpt_close(&c);
  return ret;
}

int ctl_verb_ckpt(const ctl_verb *verb, int argc, char **argv) {
  int ret = CTL_EXIT_USAGE;
  json_t *checked = json_array(), *problems = json_array();
  const char *dir = NULL, *out = NULL;
  int reshard = 0;
  double tp = 0, pp = 0, vs = 0;
  const char *dtype_name = NULL;
  mt_st_dtype dtype = MT_ST_FP32;
  for (int i = 1; i < argc; i++) {
    if ((!strcmp(argv[i], "-o") || !strcmp(argv[i], "--output")) && i + 1 < argc) {
      if (ctl_parse_output(argv[++i], &ctl.output)) goto cleanup;
    } else if (!strncmp(argv[i], "--output=", 9)) {
      if (ctl_parse_output(argv[i] + 9, &ctl.output)) goto cleanup;
    } else if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
      ctl_verb_help(verb, stdout);
      ret = CTL_EXIT_OK;
      goto cleanup;
    } else if ((!strcmp(argv[i], "--tp") || !strcmp(argv[i], "--pp")) && i + 1 < argc) {
      double *v = argv[i][2] == 't' ? &tp : &pp;
      if (ctl_parse_positive(verb, argv[i], argv[i + 1], 1, v)) goto cleanup;
      i++;
    } else if (!strcmp(argv[i], "--dtype") || !strncmp(argv[i], "--dtype=", 8)) {
      if (argv[i][7] == '=')
        dtype_name = argv[i] + 8;
      else if (i + 1 < argc)
        dtype_name = argv[++i];
      else {
        ret = ctl_usage_error(verb, "--dtype needs one of fp32, bf16, fp16");
        goto cleanup;
      }
      if (mt_st_dtype_parse(dtype_name, &dtype)) {
        ret = ctl_usage_error(verb, "--dtype: %s", mt_errmsg());
        goto cleanup;
      }
    } else if (!strcmp(argv[i], "--virtual-stages") && i + 1 < argc) {
      if (ctl_parse_positive(verb, argv[i], argv[i + 1], 1, &vs)) goto cleanup;
      i++;
    } else if (argv[i][0] == '-') {
      ret = ctl_usage_error(verb, "unknown option %s", argv[i]);
      goto cleanup;
    } else if (!strcmp(argv[i], "reshard") && !dir && i + 2 < argc) {
      reshard = 1;
      dir = argv[++i];
      out = argv[++i];
    } else if (!strcmp(argv[i], "verify") && !dir && i + 1 < argc) {
      dir = argv[++i];
    } else if (!strcmp(argv[i], "export") && !dir && i + 2 < argc) {
      dir = argv[++i];
      out = argv[++i];
    } else {
      ret = ctl_usage_error(verb, "expected: mtnlgctl ckpt verify DIR, ckpt export DIR OUT, or "
                                  "ckpt reshard DIR OUT --tp T --pp P");
      goto cleanup;
    }
  }
  if (!dir) {
    ret = ctl_usage_error(verb, "expected: mtnlgctl ckpt verify DIR, ckpt export DIR OUT, or "
                                "ckpt reshard DIR OUT --tp T --pp P");
    goto cleanup;
  }
  if (reshard && (!tp || !pp)) {
    ret = ctl_usage_error(verb, "reshard needs --tp T and --pp P");
    goto cleanup;
  }
  if (!reshard && (tp || pp || vs)) {
    ret = ctl_usage_error(verb, "--tp, --pp and --virtual-stages go with reshard");
    goto cleanup;
  }
  if (dtype_name && (reshard || !out)) {
    ret =
        ctl_usage_error(verb, "--dtype goes with export (a checkpoint keeps fp32 master weights)");
    goto cleanup;
  }
  if (out) {
    ret = reshard ? reshard_checkpoint(dir, out, (int)tp, (int)pp, (int)vs)
                  : export_checkpoint(dir, out, dtype);
    goto cleanup;
  }
  ret = CTL_EXIT_FAILURE;
  struct stat st;
  if (stat(dir, &st)) { /* not "holds no committed checkpoint": there is nothing */
    fprintf(stderr, "mtnlgctl ckpt: %s: %s\n", dir, strerror(errno));
    goto cleanup;
  }
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
