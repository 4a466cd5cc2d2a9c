/* job.c — reading, resolving and checking a job spec (see job.h).
 *
 * Order of work: parse the JSON, apply the --set overrides to the tree, merge
 * the model preset under the job's model fields, read every section into the
 * typed struct (unknown keys and wrong types are problems), derive what is
 * derived (token lengths to steps, padded vocab), then check that the job can
 * run. Problems are collected, not returned at the first one, so a user fixes
 * a job in one pass; each is one line starting with the key it is about.
 * Nothing here touches the data or checkpoint files: existence is checked by
 * the modules that open them.
 */
#include "job.h"

#include <errno.h>
#include <float.h>
#include <inttypes.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "err.h"
#include "fileio.h"
#include "mt_config.h"

/* ---- problem list: one line per problem ---- */

typedef struct problems {
  char *buf; /* lines joined by '\n', NUL-terminated */
  size_t len, cap;
  int n;
  bool oom;
  const char *muted[4]; /* keys whose problems are already explained */
  int n_muted;
} problems;

static void problem(problems *pb, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void problem(problems *pb, const char *fmt, ...) {
  char line[1536];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(line, sizeof line, fmt, ap);
  va_end(ap);
  if (n < 0) return;
  if ((size_t)n >= sizeof line) n = (int)sizeof line - 1;
  size_t need = pb->len + (pb->n ? 1 : 0) + (size_t)n + 1;
  if (need > pb->cap) {
    size_t cap = pb->cap ? pb->cap : 256;
    while (cap < need) cap *= 2;
    char *b = realloc(pb->buf, cap);
    if (!b) {
      pb->oom = true;
      pb->n++;
      return;
    }
    pb->buf = b;
    pb->cap = cap;
  }
  if (pb->n) pb->buf[pb->len++] = '\n';
  memcpy(pb->buf + pb->len, line, (size_t)n + 1);
  pb->len += (size_t)n;
  pb->n++;
}

/* Whether `key` or a parent of it ("train" for "train.steps") already has a
 * problem line or was muted. */
static bool covers(const char *reported, size_t rlen, const char *key) {
  return !strncmp(key, reported, rlen) && (key[rlen] == '\0' || key[rlen] == '.');
}

static bool seen(const problems *pb, const char *key) {
  for (int i = 0; i < pb->n_muted; i++)
    if (covers(pb->muted[i], strlen(pb->muted[i]), key)) return true;
  for (const char *l = pb->buf; l && *l;) {
    const char *colon = strchr(l, ':'), *nl = strchr(l, '\n');
    if (colon && (!nl || colon < nl) && covers(l, (size_t)(colon - l), key)) return true;
    l = nl ? nl + 1 : NULL;
  }
  return false;
}

static void mute(problems *pb, const char *key) {
  if (pb->n_muted < (int)(sizeof pb->muted / sizeof *pb->muted)) pb->muted[pb->n_muted++] = key;
}

/* A validation problem about `key`, left out when an earlier problem (a
 * missing or mistyped value, a preset that did not load) already explains it. */
static void check_fail(problems *pb, const char *key, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void check_fail(problems *pb, const char *key, const char *fmt, ...) {
  if (seen(pb, key)) return;
  char line[1536];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(line, sizeof line, fmt, ap);
  va_end(ap);
  problem(pb, "%s: %s", key, line);
}

/* ---- typed reads from the JSON tree ----
 * Each reads obj[key] into *out, leaving the default when the key is absent;
 * a value of the wrong type is a problem named "<prefix>.<key>". They return
 * true when the key was present and well typed. */

static const char *type_name(const json_t *v) {
  switch (json_typeof(v)) {
  case JSON_OBJECT: return "an object";
  case JSON_ARRAY: return "an array";
  case JSON_STRING: return "a string";
  case JSON_INTEGER: return "an integer";
  case JSON_REAL: return "a number";
  case JSON_TRUE:
  case JSON_FALSE: return "a boolean";
  case JSON_NULL: return "null";
  }
  return "?";
}

/* type_name, and for a string its text too: a --set value that is not
 * JSON ("1e400", "0x10", "NaN") is taken as a string, and "got a string"
 * alone would not say which. */
static const char *got(const json_t *v, char *buf, size_t cap) {
  if (json_is_real(v)) { /* where an integer or a boolean was expected */
    snprintf(buf, cap, "%g", json_real_value(v));
    return buf;
  }
  if (!json_is_string(v)) return type_name(v);
  char *text = json_dumps(v, JSON_ENCODE_ANY); /* quoted and escaped */
  size_t n = text ? strlen(text) : 0;
  if (!text)
    snprintf(buf, cap, "a string");
  else if (n <= 64)
    snprintf(buf, cap, "a string, %s", text);
  else
    snprintf(buf, cap, "a string, %.60s...\" (%zu bytes)", text, json_string_length(v));
  free(text);
  return buf;
}

static void full_key(char *buf, size_t cap, const char *prefix, const char *key) {
  if (prefix && *prefix)
    snprintf(buf, cap, "%s.%s", prefix, key);
  else
    snprintf(buf, cap, "%s", key);
}

/* Integers may be written as integral reals (1e9, 340e9): token counts are. */
static bool read_i64(problems *pb, json_t *obj, const char *prefix, const char *key, int64_t lo,
                     int64_t hi, int64_t *out) {
  json_t *v = obj ? json_object_get(obj, key) : NULL;
  if (!v) return false;
  char k[256];
  full_key(k, sizeof k, prefix, key);
  int64_t x;
  if (json_is_integer(v)) {
    x = (int64_t)json_integer_value(v);
  } else if (json_is_real(v)) {
    double d = json_real_value(v);
    if (d != floor(d) || d < -9.2e18 || d > 9.2e18) {
      problem(pb, "%s: expected an integer, got %g", k, d);
      return false;
    }
    x = (int64_t)d;
  } else {
    char g[128];
    problem(pb, "%s: expected an integer, got %s", k, got(v, g, sizeof g));
    return false;
  }
  if (x < lo || x > hi) {
    problem(pb, "%s: %" PRId64 " is out of range [%" PRId64 ", %" PRId64 "]", k, x, lo, hi);
    return false;
  }
  *out = x;
  return true;
}

/* Reads any integer an int holds; range rules are validation's job. */
static bool read_int(problems *pb, json_t *obj, const char *prefix, const char *key, int *out) {
  int64_t x;
  if (!read_i64(pb, obj, prefix, key, INT_MIN, INT_MAX, &x)) return false;
  *out = (int)x;
  return true;
}

static bool read_double(problems *pb, json_t *obj, const char *prefix, const char *key,
                        double *out) {
  json_t *v = obj ? json_object_get(obj, key) : NULL;
  if (!v) return false;
  if (!json_is_number(v)) {
    char k[256];
    full_key(k, sizeof k, prefix, key);
    char g[128];
    problem(pb, "%s: expected a number, got %s", k, got(v, g, sizeof g));
    return false;
  }
  *out = json_number_value(v);
  return true;
}

/* A float field: the value must be one a float holds (1e300 is refused, not
 * turned into inf). */
static bool read_float(problems *pb, json_t *obj, const char *prefix, const char *key, float *out) {
  double d;
  if (!read_double(pb, obj, prefix, key, &d)) return false;
  if (!isfinite(d) || fabs(d) > FLT_MAX) {
    char k[256];
    full_key(k, sizeof k, prefix, key);
    problem(pb, "%s: %g is beyond a float's range (%g)", k, d, (double)FLT_MAX);
    return false;
  }
  /* nor is 1e-50 turned into 0 (to be refused as "0 must be > 0") or a
   * denormal quietly less precise than the value given */
  if (d != 0 && fabs(d) < FLT_MIN) {
    char k[256];
    full_key(k, sizeof k, prefix, key);
    problem(pb, "%s: %g is below a float's smallest normal value (%g); give 0 or a larger one", k,
            d, (double)FLT_MIN);
    return false;
  }
  *out = (float)d;
  return true;
}

/* A dropout probability, a float in [0, 1): a value just below 1 that is
 * 1.0f (which would drop everything) is named as given, not as "1". Others
 * out of range are validate's. */
static void read_dropout(problems *pb, json_t *obj, const char *key, float *out) {
  if (!read_float(pb, obj, "model", key, out)) return;
  double d = json_number_value(json_object_get(obj, key));
  if (d >= 0 && d < 1 && !(*out < 1.0f))
    problem(pb, "model.%s: %.17g is 1 as a float, not in [0, 1)", key, d);
}

static bool read_bool(problems *pb, json_t *obj, const char *prefix, const char *key, int *out) {
  json_t *v = obj ? json_object_get(obj, key) : NULL;
  if (!v) return false;
  if (!json_is_boolean(v)) {
    char k[256];
    full_key(k, sizeof k, prefix, key);
    char g[128];
    problem(pb, "%s: expected true or false, got %s", k, got(v, g, sizeof g));
    return false;
  }
  *out = json_is_true(v);
  return true;
}

/* Strings never truncate: one that does not fit its buffer is a problem. */
static bool read_str(problems *pb, json_t *obj, const char *prefix, const char *key, char *out,
                     size_t cap) {
  json_t *v = obj ? json_object_get(obj, key) : NULL;
  if (!v) return false;
  char k[256];
  full_key(k, sizeof k, prefix, key);
  if (!json_is_string(v)) {
    problem(pb, "%s: expected a string, got %s", k, type_name(v));
    return false;
  }
  size_t n = json_string_length(v);
  const char *s = json_string_value(v);
  if (strlen(s) != n) {
    problem(pb, "%s: contains a NUL character", k);
    return false;
  }
  if (n >= cap) {
    problem(pb, "%s: %zu bytes long, at most %zu fit", k, n, cap - 1);
    return false;
  }
  memcpy(out, s, n + 1);
  return true;
}

/* One of the float formats (train.precision, checkpoint.export_dtype):
 * "fp32", "bf16" or "fp16" into out (8 bytes), left as it is when absent. */
static void read_float_format(problems *pb, json_t *obj, const char *prefix, const char *key,
                              char out[8]) {
  char v[64] = "";
  if (!read_str(pb, obj, prefix, key, v, sizeof v)) return;
  if (!strcmp(v, "fp32") || !strcmp(v, "bf16") || !strcmp(v, "fp16")) {
    memcpy(out, v, 5);
    return;
  }
  char k[256];
  full_key(k, sizeof k, prefix, key);
  problem(pb, "%s: \"%s\" is not one of fp32, bf16, fp16", k, v);
}

/* read_str of a file or a dataset prefix, which cannot be empty: refused
 * under the key the job gave it */
static void read_path(problems *pb, json_t *obj, const char *prefix, const char *key, char *out,
                      size_t cap) {
  if (read_str(pb, obj, prefix, key, out, cap) && !out[0]) {
    char k[256];
    full_key(k, sizeof k, prefix, key);
    problem(pb, "%s: must not be empty", k);
  }
}

/* A section that must be an object when present; NULL when absent or wrong. */
static json_t *read_object(problems *pb, json_t *obj, const char *prefix, const char *key) {
  json_t *v = obj ? json_object_get(obj, key) : NULL;
  if (!v) return NULL;
  if (!json_is_object(v)) {
    char k[256];
    full_key(k, sizeof k, prefix, key);
    char g[128];
    problem(pb, "%s: expected an object, got %s", k, got(v, g, sizeof g));
    return NULL;
  }
  return v;
}

static bool in_list(const char *key, const char *const *allowed) {
  for (; *allowed; allowed++)
    if (!strcmp(key, *allowed)) return true;
  return false;
}

static void check_keys(problems *pb, json_t *obj, const char *prefix, const char *const *allowed) {
  const char *key;
  json_t *v;
  if (!obj) return;
  json_object_foreach(obj, key, v) {
    if (in_list(key, allowed)) continue;
    char k[256];
    full_key(k, sizeof k, prefix, key);
    problem(pb, "%s: unknown key", k);
  }
}

static void require(problems *pb, json_t *obj, const char *prefix, const char *key,
                    const char *hint) {
  if (obj && json_object_get(obj, key)) return;
  char k[256];
  full_key(k, sizeof k, prefix, key);
  check_fail(pb, k, "missing%s", hint ? hint : "");
}

/* ---- keys of each section ---- */

static const char *const top_keys[] = {"name", "description", "model", "parallel", "train",
                                       "data", "checkpoint",  "eval",  NULL};
#define MODEL_FIELDS                                                                               \
  "n_layer", "n_embd", "n_head", "vocab_size", "vocab_pad_to", "seq_len", "max_positions",         \
      "ln_eps", "init_std", "hidden_dropout", "attention_dropout", "untie_embeddings"
static const char *const model_keys[] = {"preset", MODEL_FIELDS, "init_from", "attention_backend",
                                         NULL};
/* A preset describes an architecture: no weights to start from, no nesting. */
static const char *const preset_keys[] = {"description", MODEL_FIELDS, NULL};
static const char *const preset_int_fields[] = {
    "n_layer", "n_embd", "n_head", "vocab_size", "vocab_pad_to", "seq_len", "max_positions", NULL};
static const char *const parallel_keys[] = {"tp",
                                            "pp",
                                            "dp_min",
                                            "dp_max",
                                            "micro_batch",
                                            "recompute",
                                            "recompute_layers",
                                            "schedule",
                                            "bucket_size",
                                            "overlap_p2p",
                                            "sequence_parallel",
                                            "virtual_stages",
                                            NULL};
static const char *const train_keys[] = {"global_batch",
                                         "steps",
                                         "samples",
                                         "tokens",
                                         "seed",
                                         "lr",
                                         "adam",
                                         "weight_decay",
                                         "clip_grad",
                                         "precision",
                                         "loss_scale",
                                         "log_interval",
                                         "rampup_batch",
                                         "exit_duration_mins",
                                         "exit_interval",
                                         "log_params_norm",
                                         "tensorboard_dir",
                                         "weight_decay_schedule",
                                         "log_num_zeros_in_grad",
                                         "timing_log_level",
                                         "timing_log_option",
                                         "log_timers_to_tensorboard",
                                         "log_memory_to_tensorboard",
                                         "profile",
                                         NULL};
static const char *const rampup_keys[] = {"start", "increment", "samples", "tokens", NULL};
static const char *const profile_keys[] = {"step_start", "step_end", "ranks", NULL};
static const char *const lr_keys[] = {"schedule",
                                      "peak",
                                      "min",
                                      "warmup_steps",
                                      "warmup_tokens",
                                      "decay_steps",
                                      "decay_tokens",
                                      "wsd_decay_steps",
                                      "wsd_decay_style",
                                      "warmup_init",
                                      NULL};
static const char *const wd_schedule_keys[] = {"style", "start", "end", NULL};
static const char *const adam_keys[] = {"beta1", "beta2", "eps", NULL};
static const char *const loss_scale_keys[] = {"initial",    "min",     "growth_interval",
                                              "hysteresis", "dynamic", NULL};
/* the document keys on a line of their own (clang-format would set the
 * whole list one key a line) */
/* clang-format off */
static const char *const data_keys[] = {"path",          "prefix",    "blend", "split",
                                        "shuffle",       "cache_dir", "valid", "test",
                                        "eod_mask_loss", "eod_token",
                                        "reset_position_ids", "reset_attention_mask", NULL};
/* clang-format on */
static const char *const blend_keys[] = {"prefix", "weight", NULL};
static const char *const eval_keys[] = {"interval", "iters", "test", NULL};
static const char *const checkpoint_keys[] = {"dir",   "interval",       "keep",   "keep_every",
                                              "async", "resume_step",    "export", "export_dtype",
                                              "load",  "load_optimizer", NULL};

/* ---- overrides: "a.b.c=value" set in the tree before it is read ---- */

static int apply_override(problems *pb, json_t *root, const char *ov) {
  const char *eq = strchr(ov, '=');
  if (!eq || eq == ov) {
    problem(pb, "override \"%s\": expected section.key=value", ov);
    return -1;
  }
  size_t klen = (size_t)(eq - ov);
  char key[512];
  if (klen >= sizeof key) {
    problem(pb, "override \"%.40s...\": key too long", ov);
    return -1;
  }
  memcpy(key, ov, klen);
  key[klen] = '\0';
  /* every dotted component must be non-empty: "train..steps", ".x", "x." are malformed */
  for (const char *p = key; *p; p++)
    if (*p == '.' && (p == key || p[1] == '.' || p[1] == '\0')) {
      problem(pb, "override \"%s\": empty key component in \"%s\"", ov, key);
      return -1;
    }

  const char *text = eq + 1;
  json_t *value = json_loads(text, JSON_DECODE_ANY, NULL);
  if (!value) value = json_string(text);
  if (!value) {
    problem(pb, "override \"%s\": value is not valid UTF-8", ov);
    return -1;
  }

  json_t *obj = root;
  char *part = key;
  for (char *dot; (dot = strchr(part, '.')); part = dot + 1) {
    *dot = '\0';
    json_t *next = json_object_get(obj, part);
    if (!next) {
      next = json_object();
      json_object_set_new(obj, part, next);
    } else if (!json_is_object(next)) {
      problem(pb, "override \"%s\": %s is %s, not an object", ov, key, type_name(next));
      json_decref(value);
      return -1;
    }
    *dot = '.';
    obj = next;
  }
  json_object_set_new(obj, part, value);
  return 0;
}

/* Whether path key `key` ("data.path") was set by an override, itself or through
 * a parent ("data={...}"): such paths are relative to the caller's directory. */
static bool overridden(const char *const *overrides, const char *key) {
  size_t n = strlen(key);
  for (; overrides && *overrides; overrides++) {
    const char *ov = *overrides, *eq = strchr(ov, '=');
    if (!eq) continue;
    size_t k = (size_t)(eq - ov);
    if (k <= n && !strncmp(ov, key, k) && (k == n || key[k] == '.')) return true;
  }
  return false;
}

/* An override of the run's length (train.steps, train.samples or
 * train.tokens) replaces the length the job gives as another of them:
 * --set train.steps=10 on a job in tokens is a shorter run, not a job that
 * gives its length twice. Two overrides of it are refused as two keys in
 * the file are. */
static void drop_overridden_length(json_t *root, const char *const *overrides) {
  static const char *const keys[] = {"train.steps", "train.samples", "train.tokens"};
  json_t *train = json_object_get(root, "train");
  if (!json_is_object(train)) return;
  for (int i = 0; i < 3; i++)
    if (overridden(overrides, keys[i]))
      for (int j = 0; j < 3; j++)
        if (j != i) json_object_del(train, keys[j] + strlen("train."));
}

/* ---- model preset ---- */

static bool safe_name(const char *s) {
  if (!*s || *s == '.') return false;
  for (; *s; s++)
    if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') ||
          *s == '.' || *s == '_' || *s == '-'))
      return false;
  return true;
}

/* Replaces the job's model object by preset fields overlaid with the job's own.
 * Problems are named "model.preset" since that is the key the user can fix. */
static void merge_preset(problems *pb, json_t *root, const char *const *preset_dirs) {
  json_t *model = json_object_get(root, "model");
  if (!json_is_object(model)) return;
  json_t *pv = json_object_get(model, "preset");
  if (!pv) return;
  if (!json_is_string(pv)) return; /* reported when the model is read */
  const char *name = json_string_value(pv);
  if (!safe_name(name)) {
    problem(pb, "model.preset: \"%s\" is not a preset name (letters, digits, '.', '_', '-')", name);
    return;
  }

  char looked[1024] = "", path[MT_PATH_MAX];
  size_t lo = 0;
  FILE *f = NULL;
  for (const char *const *d = preset_dirs; d && *d; d++) {
    int n = snprintf(path, sizeof path, "%s/%s.json", *d, name);
    if (n < 0 || (size_t)n >= sizeof path) continue;
    f = fopen(path, "rb");
    if (f) break;
    if (lo < sizeof looked) {
      int w = snprintf(looked + lo, sizeof looked - lo, "%s%s", lo ? ", " : "", path);
      if (w > 0) lo += (size_t)w;
    }
  }
  if (!f) {
    problem(pb, "model.preset: \"%s\" not found (looked in: %s)", name,
            lo ? looked : "no preset directories given");
    return;
  }

  struct stat st;
  if (!fstat(fileno(f), &st) && S_ISDIR(st.st_mode)) { /* fopen opens one for reading */
    fclose(f);
    problem(pb, "model.preset: %s is a directory, not a JSON preset", path);
    return;
  }
  json_error_t jerr;
  json_t *preset = json_loadf(f, JSON_REJECT_DUPLICATES, &jerr);
  fclose(f);
  if (!preset) {
    problem(pb, "model.preset: %s: line %d, column %d: %s", path, jerr.line, jerr.column,
            jerr.text);
    return;
  }
  if (!json_is_object(preset)) {
    problem(pb, "model.preset: %s: expected an object, got %s", path, type_name(preset));
    json_decref(preset);
    return;
  }
  const char *key;
  json_t *v;
  int bad = 0;
  json_object_foreach(preset, key, v) {
    if (!in_list(key, preset_keys)) {
      problem(pb, "model.preset: %s: %s: %s", path, key,
              in_list(key, model_keys) ? "not allowed in a preset (give it in the job)"
                                       : "unknown key");
      bad++;
      continue;
    }
    /* a mistyped field is the preset file's: as model.<key> it would name a
     * key the job does not have */
    bool want_int = in_list(key, preset_int_fields), want_str = !strcmp(key, "description");
    bool want_bool = !strcmp(key, "untie_embeddings");
    bool ok = want_bool  ? json_is_boolean(v)
              : want_str ? json_is_string(v)
              : want_int ? json_is_integer(v) ||
                               (json_is_real(v) && json_real_value(v) == floor(json_real_value(v)))
                         : json_is_number(v);
    if (!ok) {
      char g[128];
      problem(pb, "model.preset: %s: %s: expected %s, got %s", path, key,
              want_bool  ? "true or false"
              : want_str ? "a string"
              : want_int ? "an integer"
                         : "a number",
              got(v, g, sizeof g));
      bad++;
    }
  }
  if (!bad) {
    json_object_del(preset, "description");
    json_object_update(preset, model); /* the job's fields win */
    json_object_set(root, "model", preset);
  }
  json_decref(preset);
}

/* ---- reading the sections ---- */

static int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0); }

/* "<base_dir>/<path>" for a relative path from the job file; others as given. */
static void resolve_path(problems *pb, const char *key, char *path, const char *base_dir,
                         const char *const *overrides) {
  if (!*path || path[0] == '/' || !base_dir || !*base_dir || !strcmp(base_dir, ".")) return;
  if (overridden(overrides, key)) return;
  char joined[MT_PATH_MAX];
  size_t bl = strlen(base_dir);
  int n =
      snprintf(joined, sizeof joined, "%s%s%s", base_dir, base_dir[bl - 1] == '/' ? "" : "/", path);
  if (n < 0 || (size_t)n >= sizeof joined) {
    problem(pb, "%s: %s resolved against %s is longer than %d bytes", key, path, base_dir,
            MT_PATH_MAX - 1);
    return;
  }
  memcpy(path, joined, (size_t)n + 1);
}

static void read_model(problems *pb, json_t *root, mt_model_spec *m) {
  json_t *o = read_object(pb, root, "", "model");
  const char *hint = " (give it, or a model.preset)";
  if (!json_object_get(root, "model")) {
    problem(pb, "model: missing (give model.preset or the model fields)");
    return;
  }
  if (!o) return;
  check_keys(pb, o, "model", model_keys);
  read_str(pb, o, "model", "preset", m->preset, sizeof m->preset);
  /* a preset that is not a string (its line says so) would have given the
   * fields, as one that did not load would (merge_preset mutes them too) */
  json_t *preset = json_object_get(o, "preset");
  if (preset && !json_is_string(preset)) mute(pb, "model");
  const char *req[] = {"n_layer", "n_embd", "n_head", "vocab_size", "seq_len"};
  for (size_t i = 0; i < sizeof req / sizeof *req; i++) require(pb, o, "model", req[i], hint);
  read_int(pb, o, "model", "n_layer", &m->n_layer);
  read_int(pb, o, "model", "n_embd", &m->n_embd);
  read_int(pb, o, "model", "n_head", &m->n_head);
  read_int(pb, o, "model", "vocab_size", &m->vocab_size);
  read_int(pb, o, "model", "vocab_pad_to", &m->vocab_pad_to);
  read_int(pb, o, "model", "seq_len", &m->seq_len);
  read_int(pb, o, "model", "max_positions", &m->max_positions);
  read_float(pb, o, "model", "ln_eps", &m->ln_eps);
  read_float(pb, o, "model", "init_std", &m->init_std);
  read_dropout(pb, o, "hidden_dropout", &m->hidden_dropout);
  read_dropout(pb, o, "attention_dropout", &m->attention_dropout);
  read_str(pb, o, "model", "init_from", m->init_from, sizeof m->init_from);
  read_bool(pb, o, "model", "untie_embeddings", &m->untie_embeddings);
  if (read_str(pb, o, "model", "attention_backend", m->attention_backend,
               sizeof m->attention_backend) &&
      strcmp(m->attention_backend, "flash") && strcmp(m->attention_backend, "chunked") &&
      strcmp(m->attention_backend, "auto"))
    problem(pb,
            "model.attention_backend: \"%s\" is not one of flash (the fused kernels), chunked "
            "(16-bit GEMMs around row kernels: Megatron's unfused) or auto (each shape's first "
            "call times both)",
            m->attention_backend);
}

static void read_parallel(problems *pb, json_t *root, mt_parallel_spec *p) {
  json_t *o = read_object(pb, root, "", "parallel");
  check_keys(pb, o, "parallel", parallel_keys);
  read_int(pb, o, "parallel", "tp", &p->tp);
  read_int(pb, o, "parallel", "pp", &p->pp);
  read_int(pb, o, "parallel", "dp_min", &p->dp_min);
  /* dp_max follows dp_min; a dp_min below 1 is refused on its own line */
  if (!read_int(pb, o, "parallel", "dp_max", &p->dp_max))
    p->dp_max = p->dp_min >= 1 ? p->dp_min : 1;
  read_int(pb, o, "parallel", "micro_batch", &p->micro_batch);
  read_bool(pb, o, "parallel", "recompute", &p->recompute);
  read_int(pb, o, "parallel", "recompute_layers", &p->recompute_layers);
  read_bool(pb, o, "parallel", "sequence_parallel", &p->sequence_parallel);
  read_int(pb, o, "parallel", "bucket_size", &p->bucket_size);
  read_bool(pb, o, "parallel", "overlap_p2p", &p->overlap_p2p);
  read_int(pb, o, "parallel", "virtual_stages", &p->virtual_stages);
  char sched[64] = "1f1b";
  read_str(pb, o, "parallel", "schedule", sched, sizeof sched);
  if (strcmp(sched, "1f1b"))
    problem(pb, "parallel.schedule: \"%s\" is not supported (only \"1f1b\")", sched);
}

/* What the job said about the LR lengths and floor, for defaults that depend on
 * other sections. tokens -1 = given in steps or not at all. */
typedef struct lr_given {
  int64_t warmup_tokens, decay_tokens;
  bool decay, min;
  int64_t rampup_tokens; /* -1: the ramp-up's length given in samples, or no ramp-up */
} lr_given;

/* Reads a length given in steps or in tokens; tokens become steps once the
 * batch and sequence length are known (tokens_out >= 0 marks that). */
static void read_length(problems *pb, json_t *lr, const char *what, int64_t *steps,
                        int64_t *tokens_out) {
  char ks[32], kt[32];
  snprintf(ks, sizeof ks, "%s_steps", what);
  snprintf(kt, sizeof kt, "%s_tokens", what);
  bool has_s = lr && json_object_get(lr, ks), has_t = lr && json_object_get(lr, kt);
  *tokens_out = -1;
  if (has_s && has_t) {
    problem(pb, "train.lr.%s: give it in steps or in tokens, not both", kt);
    return;
  }
  read_i64(pb, lr, "train.lr", ks, 0, INT64_MAX, steps);
  read_i64(pb, lr, "train.lr", kt, 0, INT64_MAX, tokens_out);
}

/* The run's length: exactly one of train.steps, train.samples (Megatron's
 * --train-samples) and train.tokens. Samples and tokens are kept as given
 * for derive, which turns them into steps; their ranges are checked there,
 * where a problem can name them with what they come to. */
static void read_run_length(problems *pb, json_t *o, mt_train_spec *t) {
  static const char *const keys[] = {"steps", "samples", "tokens"};
  const char *given[3];
  int n = 0;
  for (int i = 0; i < 3; i++)
    if (o && json_object_get(o, keys[i])) given[n++] = keys[i];
  if (o && n == 0)
    check_fail(pb, "train.steps",
               "missing (or give the run's length as train.samples or "
               "train.tokens)");
  if (n > 1) {
    /* named after the last of them; the line names every one given */
    problem(pb,
            "train.%s: the run's length is given %s, as train.%s%s%s and train.%s: give one of "
            "train.steps, train.samples or train.tokens",
            given[n - 1], n == 2 ? "twice" : "three times", given[0], n == 3 ? ", train." : "",
            n == 3 ? given[1] : "", given[n - 1]);
    mute(pb, "train.steps"); /* whatever it would say follows from the line above */
    return;
  }
  if (n == 1 && strcmp(given[0], "steps")) {
    if (read_i64(pb, o, "train", given[0], INT64_MIN, INT64_MAX, &t->length_given))
      snprintf(t->length_key, sizeof t->length_key, "%s", given[0]);
    else
      mute(pb, "train.steps"); /* the steps it would have come to */
    return;
  }
  read_i64(pb, o, "train", "steps", INT64_MIN, INT64_MAX, &t->steps);
}

/* train.weight_decay_schedule, Megatron's weight-decay increment: style
 * (constant, linear, cosine), start, and end, which is train.weight_decay
 * (given as either, or as both alike). wd_given: train.weight_decay was. */
static void read_wd_schedule(problems *pb, json_t *o, mt_train_spec *t, bool wd_given) {
  static const char *const key = "train.weight_decay_schedule";
  json_t *ws = read_object(pb, o, "train", "weight_decay_schedule");
  if (!ws) return;
  check_keys(pb, ws, key, wd_schedule_keys);
  require(pb, ws, key, "style", ": one of constant, linear, cosine");
  char style[16] = "";
  bool style_ok = false;
  if (read_str(pb, ws, key, "style", style, sizeof style)) {
    static const char *const styles[] = {"constant", "linear", "cosine"};
    int k = 0;
    while (k < 3 && strcmp(style, styles[k])) k++;
    if (k < 3)
      t->wd.style = (mt_wd_style)k, style_ok = true;
    else
      problem(pb, "%s.style: \"%s\" is not one of constant, linear, cosine", key, style);
  }
  double end = t->weight_decay;
  bool has_end = read_double(pb, ws, key, "end", &end);
  bool has_start = read_double(pb, ws, key, "start", &t->wd.start);
  if (has_end && !(end >= 0 && end <= FLT_MAX)) {
    problem(pb, "%s.end: %g must be >= 0 and at most %g (a float)", key, end, (double)FLT_MAX);
    mute(pb, "train.weight_decay"); /* it is end */
    return;
  }
  if (has_end && wd_given && end != t->weight_decay) {
    problem(pb,
            "%s.end: %g is not train.weight_decay = %g: the schedule ends at the job's weight "
            "decay (give one of them, or both alike)",
            key, end, t->weight_decay);
    return;
  }
  t->weight_decay = end;
  if (has_start && !(t->wd.start >= 0 && t->wd.start <= FLT_MAX))
    problem(pb, "%s.start: %g must be >= 0 and at most %g (a float)", key, t->wd.start,
            (double)FLT_MAX);
  else if (style_ok && t->wd.style != MT_WD_CONSTANT && !has_start && !json_object_get(ws, "start"))
    problem(pb,
            "%s.start: missing: the %s schedule goes from start to end (%s = %g) over the "
            "run (Megatron's --start-weight-decay)",
            key, style, has_end ? "its end" : "train.weight_decay", end);
  else if (style_ok && t->wd.style == MT_WD_CONSTANT && has_start && t->wd.start != end)
    problem(pb,
            "%s.start: %g is not its end %g: a constant schedule holds one weight decay "
            "(Megatron asserts start == end; linear or cosine moves it)",
            key, t->wd.start, end);
}

const char *mt_job_timing_option_name(int option) {
  static const char *const names[] = {"minmax", "max", "all"};
  return option >= MT_TIMING_MINMAX && option <= MT_TIMING_ALL ? names[option] : "?";
}

static void read_train(problems *pb, json_t *root, mt_train_spec *t, lr_given *g) {
  json_t *o = read_object(pb, root, "", "train");
  if (!json_object_get(root, "train")) {
    problem(pb, "train: missing (needs at least global_batch, steps (or samples or tokens) and "
                "lr.peak)");
    return;
  }
  check_keys(pb, o, "train", train_keys);
  require(pb, o, "train", "global_batch", NULL);
  read_int(pb, o, "train", "global_batch", &t->global_batch);
  read_run_length(pb, o, t);
  int64_t seed;
  if (read_i64(pb, o, "train", "seed", 0, INT64_MAX, &seed)) t->seed = (uint64_t)seed;

  json_t *lr = read_object(pb, o, "train", "lr");
  if (o && !json_object_get(o, "lr")) problem(pb, "train.lr: missing (needs at least peak)");
  check_keys(pb, lr, "train.lr", lr_keys);
  if (lr) require(pb, lr, "train.lr", "peak", NULL);
  char sched[32] = "cosine";
  read_str(pb, lr, "train.lr", "schedule", sched, sizeof sched);
  if (!strcmp(sched, "constant"))
    t->lr.kind = MT_LR_CONSTANT;
  else if (!strcmp(sched, "cosine"))
    t->lr.kind = MT_LR_COSINE;
  else if (!strcmp(sched, "linear"))
    t->lr.kind = MT_LR_LINEAR;
  else if (!strcmp(sched, "inverse-square-root"))
    t->lr.kind = MT_LR_INVERSE_SQRT;
  else if (!strcmp(sched, "WSD"))
    t->lr.kind = MT_LR_WSD;
  else
    problem(pb,
            "train.lr.schedule: \"%s\" is not one of constant, cosine, linear, "
            "inverse-square-root, WSD",
            sched);
  bool wsd_steps =
      read_i64(pb, lr, "train.lr", "wsd_decay_steps", 1, INT64_MAX, &t->lr.wsd_decay_steps);
  char wsd[16] = "linear";
  bool wsd_style = read_str(pb, lr, "train.lr", "wsd_decay_style", wsd, sizeof wsd);
  static const char *const wsd_styles[] = {"linear", "cosine", "exponential", "minus_sqrt"};
  int k = 0;
  while (k < 4 && strcmp(wsd, wsd_styles[k])) k++;
  if (k < 4)
    t->lr.wsd_style = (mt_wsd_style)k;
  else
    problem(pb,
            "train.lr.wsd_decay_style: \"%s\" is not one of linear, cosine, exponential, "
            "minus_sqrt",
            wsd);
  if (t->lr.kind == MT_LR_WSD && !wsd_steps && !seen(pb, "train.lr.wsd_decay_steps"))
    problem(pb, "train.lr.wsd_decay_steps: missing: the WSD schedule decays over the last "
                "wsd_decay_steps of its decay (Megatron's --lr-wsd-decay-iters)");
  else if (t->lr.kind != MT_LR_WSD && (wsd_steps || wsd_style) && !seen(pb, "train.lr.schedule"))
    problem(pb, "train.lr.%s: only the WSD schedule reads it (train.lr.schedule is \"%s\")",
            wsd_steps ? "wsd_decay_steps" : "wsd_decay_style", sched);
  read_double(pb, lr, "train.lr", "peak", &t->lr.peak);
  g->min = read_double(pb, lr, "train.lr", "min", &t->lr.min);
  read_double(pb, lr, "train.lr", "warmup_init", &t->lr.warmup_init);
  read_length(pb, lr, "warmup", &t->lr.warmup_steps, &g->warmup_tokens);
  read_length(pb, lr, "decay", &t->lr.decay_steps, &g->decay_tokens);
  g->decay = lr && (json_object_get(lr, "decay_steps") || json_object_get(lr, "decay_tokens"));

  json_t *adam = read_object(pb, o, "train", "adam");
  check_keys(pb, adam, "train.adam", adam_keys);
  read_double(pb, adam, "train.adam", "beta1", &t->beta1);
  read_double(pb, adam, "train.adam", "beta2", &t->beta2);
  read_double(pb, adam, "train.adam", "eps", &t->adam_eps);
  read_wd_schedule(pb, o, t, read_double(pb, o, "train", "weight_decay", &t->weight_decay));

  json_t *ramp = read_object(pb, o, "train", "rampup_batch");
  check_keys(pb, ramp, "train.rampup_batch", rampup_keys);
  if (ramp) {
    require(pb, ramp, "train.rampup_batch", "start", NULL);
    require(pb, ramp, "train.rampup_batch", "increment", NULL);
    read_int(pb, ramp, "train.rampup_batch", "start", &t->rampup.start);
    read_int(pb, ramp, "train.rampup_batch", "increment", &t->rampup.increment);
    bool has_s = json_object_get(ramp, "samples"), has_t = json_object_get(ramp, "tokens");
    if (has_s == has_t)
      problem(pb, "train.rampup_batch: give its length in samples or in tokens%s",
              has_s ? ", not both" : "");
    read_i64(pb, ramp, "train.rampup_batch", "samples", 1, (int64_t)1 << 50, &t->rampup.samples);
    read_i64(pb, ramp, "train.rampup_batch", "tokens", 1, INT64_MAX, &g->rampup_tokens);
  }
  read_double(pb, o, "train", "clip_grad", &t->clip_grad);
  read_float_format(pb, o, "train", "precision", t->precision);
  json_t *ls = read_object(pb, o, "train", "loss_scale");
  check_keys(pb, ls, "train.loss_scale", loss_scale_keys);
  read_double(pb, ls, "train.loss_scale", "initial", &t->loss_scale.initial);
  read_double(pb, ls, "train.loss_scale", "min", &t->loss_scale.min);
  read_int(pb, ls, "train.loss_scale", "growth_interval", &t->loss_scale.growth_interval);
  read_bool(pb, ls, "train.loss_scale", "dynamic", &t->loss_scale.dynamic);
  read_int(pb, ls, "train.loss_scale", "hysteresis", &t->loss_scale.hysteresis);
  read_int(pb, o, "train", "log_interval", &t->log_interval);
  read_bool(pb, o, "train", "log_params_norm", &t->log_params_norm);
  read_path(pb, o, "train", "tensorboard_dir", t->tensorboard_dir, sizeof t->tensorboard_dir);
  read_double(pb, o, "train", "exit_duration_mins", &t->exit_duration_mins);
  read_i64(pb, o, "train", "exit_interval", 0, INT64_MAX, &t->exit_interval);
  read_bool(pb, o, "train", "log_num_zeros_in_grad", &t->log_num_zeros_in_grad);
  read_int(pb, o, "train", "timing_log_level", &t->timing_log_level);
  char option[64] = "";
  if (read_str(pb, o, "train", "timing_log_option", option, sizeof option)) {
    t->timing_log_option = -1;
    for (int i = MT_TIMING_MINMAX; i <= MT_TIMING_ALL; i++)
      if (!strcmp(option, mt_job_timing_option_name(i))) t->timing_log_option = i;
    if (t->timing_log_option < 0)
      problem(pb,
              "train.timing_log_option: \"%s\" is not one of minmax (the least and the most "
              "of any rank), max (the most) or all (every rank's)",
              option);
  }
  read_bool(pb, o, "train", "log_timers_to_tensorboard", &t->log_timers_to_tensorboard);
  read_bool(pb, o, "train", "log_memory_to_tensorboard", &t->log_memory_to_tensorboard);
  json_t *prof = read_object(pb, o, "train", "profile");
  check_keys(pb, prof, "train.profile", profile_keys);
  if (prof) { /* every key optional: Megatron's defaults */
    t->profile.on = 1;
    read_i64(pb, prof, "train.profile", "step_start", 0, INT64_MAX, &t->profile.step_start);
    read_i64(pb, prof, "train.profile", "step_end", 0, INT64_MAX, &t->profile.step_end);
    json_t *ranks = json_object_get(prof, "ranks");
    if (ranks && (!json_is_array(ranks) || !json_array_size(ranks) ||
                  json_array_size(ranks) > MT_PROFILE_MAX_RANKS)) {
      char g[128];
      problem(pb, "train.profile.ranks: expected an array of 1 to %d world ranks, got %s",
              MT_PROFILE_MAX_RANKS,
              json_is_array(ranks) ? (json_array_size(ranks) ? "more" : "an empty array")
                                   : got(ranks, g, sizeof g));
    } else if (ranks) {
      size_t i;
      json_t *r;
      t->profile.n_ranks = 0;
      json_array_foreach(ranks, i, r) {
        if (!json_is_integer(r) || json_integer_value(r) < 0 || json_integer_value(r) > INT_MAX) {
          char g[128];
          problem(pb, "train.profile.ranks[%zu]: expected a world rank (0 or more), got %s", i,
                  json_is_integer(r) ? "a negative integer" : got(r, g, sizeof g));
          break;
        }
        t->profile.ranks[t->profile.n_ranks++] = (int)json_integer_value(r);
      }
    }
  }
}

/* The entries of a blend array v (1 to MT_MAX_BLEND, checked by the
 * caller) under key k: each {"prefix", "weight"} into b, *n of them, one
 * line per mistake; weights past a double's sum are refused (normalised by
 * their sum, 1e308 twice would make every share 0). */
static void read_blend_entries(problems *pb, json_t *v, const char *k, mt_blend_spec *b, int *n) {
  size_t i;
  json_t *e;
  double sum = 0;
  json_array_foreach(v, i, e) {
    char at[96];
    snprintf(at, sizeof at, "%s[%d]", k, (int)i);
    if (!json_is_object(e)) {
      problem(pb, "%s: expected an object, got %s", at, type_name(e));
      continue;
    }
    check_keys(pb, e, at, blend_keys);
    require(pb, e, at, "prefix", NULL);
    require(pb, e, at, "weight", NULL);
    read_path(pb, e, at, "prefix", b[i].prefix, sizeof b[i].prefix);
    read_double(pb, e, at, "weight", &b[i].weight);
    if (json_object_get(e, "weight") && !(b[i].weight > 0))
      problem(pb, "%s.weight: %g must be > 0", at, b[i].weight);
    sum += b[i].weight;
  }
  *n = (int)json_array_size(v);
  if (!isfinite(sum))
    problem(pb, "%s: the weights sum to %g, past a double's range: scale them down", k, sum);
}

/* data.valid or data.test (Megatron's --valid-data-path, --test-data-path):
 * a prefix, or a blend as data.blend's. */
static void read_split_data(problems *pb, json_t *o, const char *key, mt_blend_spec *b, int *n) {
  json_t *v = o ? json_object_get(o, key) : NULL;
  if (!v) return;
  char k[64];
  snprintf(k, sizeof k, "data.%s", key);
  if (json_is_string(v)) {
    read_path(pb, o, "data", key, b[0].prefix, sizeof b[0].prefix);
    b[0].weight = 1.0;
    *n = 1;
    return;
  }
  if (!json_is_array(v) || json_array_size(v) == 0 || json_array_size(v) > MT_MAX_BLEND) {
    char g[128];
    problem(pb,
            "%s: expected a prefix or an array of 1 to %d {\"prefix\", \"weight\"} objects, "
            "got %s",
            k, MT_MAX_BLEND, got(v, g, sizeof g));
    return;
  }
  read_blend_entries(pb, v, k, b, n);
}

/* Resolves data.valid's or data.test's prefixes against the job's directory
 * (not when --set gave them). */
static void resolve_split_data(problems *pb, const char *key, mt_blend_spec *b, int n,
                               const char *base_dir, const char *const *overrides) {
  char k[64];
  snprintf(k, sizeof k, "data.%s", key);
  if (overridden(overrides, k)) return;
  for (int i = 0; i < n; i++) {
    char at[96];
    snprintf(at, sizeof at, "%s[%d].prefix", k, i);
    resolve_path(pb, at, b[i].prefix, base_dir, overrides);
  }
}

static void read_data(problems *pb, json_t *root, mt_data_spec *d) {
  json_t *o = read_object(pb, root, "", "data");
  if (!json_object_get(root, "data")) {
    problem(pb, "data: missing (data.path, data.prefix or data.blend: what to train on)");
    return;
  }
  check_keys(pb, o, "data", data_keys);
  if (!o) return;
  int given =
      !!json_object_get(o, "path") + !!json_object_get(o, "prefix") + !!json_object_get(o, "blend");
  if (given != 1)
    problem(pb,
            "data: give exactly one of path (token file), prefix (indexed dataset) or "
            "blend (weighted indexed datasets); %d given",
            given);
  read_path(pb, o, "data", "path", d->path, sizeof d->path);
  if (json_object_get(o, "prefix")) {
    d->n_blend = 1;
    d->blend[0].weight = 1.0;
    read_path(pb, o, "data", "prefix", d->blend[0].prefix, sizeof d->blend[0].prefix);
  }
  json_t *blend = json_object_get(o, "blend");
  if (blend && (!json_is_array(blend) || json_array_size(blend) == 0 ||
                json_array_size(blend) > MT_MAX_BLEND)) {
    problem(pb, "data.blend: expected an array of 1 to %d {\"prefix\", \"weight\"} objects",
            MT_MAX_BLEND);
  } else if (blend) {
    read_blend_entries(pb, blend, "data.blend", d->blend, &d->n_blend);
  }
  read_str(pb, o, "data", "split", d->split, sizeof d->split);
  read_bool(pb, o, "data", "shuffle", &d->shuffle);
  read_str(pb, o, "data", "cache_dir", d->cache_dir, sizeof d->cache_dir);
  read_bool(pb, o, "data", "eod_mask_loss", &d->eod_mask_loss);
  int64_t eod;
  if (read_i64(pb, o, "data", "eod_token", 0, INT32_MAX, &eod)) d->eod_token = (int)eod;
  if (d->eod_mask_loss && d->eod_token < 0 && !seen(pb, "data.eod_token"))
    problem(pb, "data.eod_token: missing: data.eod_mask_loss masks the loss at the "
                "end-of-document token, and the data does not say which id that is (50256 for "
                "GPT-2's BPE, 256 for mtnlg-preprocess --tokenizer bytes)");
  read_bool(pb, o, "data", "reset_position_ids", &d->reset_position_ids);
  if (d->reset_position_ids && !d->eod_mask_loss && d->eod_token < 0 && !seen(pb, "data.eod_token"))
    problem(pb, "data.eod_token: missing: data.reset_position_ids starts the positions again after "
                "the end-of-document token, and the data does not say which id that is");
  read_bool(pb, o, "data", "reset_attention_mask", &d->reset_attention_mask);
  if (d->reset_attention_mask && !d->eod_mask_loss && !d->reset_position_ids && d->eod_token < 0 &&
      !seen(pb, "data.eod_token"))
    problem(pb, "data.eod_token: missing: data.reset_attention_mask keeps attention within the "
                "documents the end-of-document token ends, and the data does not say which id "
                "that is");
  double w[3];
  int bad = !d->split[0] || mt_job_split_weights(d->split, w);
  if (bad || !(w[0] + w[1] + w[2] > 0))
    problem(pb, "data.split: \"%s\" is not up to three non-negative weights like \"949,50,1\"",
            d->split);
  else if (w[0] <= 0)
    problem(pb, "data.split: \"%s\" gives the train split no documents", d->split);
  d->split_valid_weight = bad ? 0 : w[1];
  read_split_data(pb, o, "valid", d->valid, &d->n_valid);
  read_split_data(pb, o, "test", d->test, &d->n_test);
}

int mt_job_split_weights(const char *split, double w[3]) {
  w[0] = w[1] = w[2] = 0;
  char sep = strchr(split, ',') ? ',' : '/';
  int n = 0;
  for (const char *p = split;;) {
    char *end;
    errno = 0;
    double v = strtod(p, &end);
    while (*end == ' ' || *end == '\t') end++;
    if (n == 3 || end == p || errno || !isfinite(v) || v < 0 || (*end && *end != sep))
      return mt_seterr(MT_EINVAL,
                       "data: split \"%s\": want up to three non-negative numbers like "
                       "\"949,50,1\"",
                       split);
    w[n++] = v;
    if (!*end) return 0;
    p = end + 1;
  }
}

static void read_eval(problems *pb, json_t *root, mt_eval_spec *e) {
  json_t *o = read_object(pb, root, "", "eval");
  check_keys(pb, o, "eval", eval_keys);
  read_int(pb, o, "eval", "interval", &e->interval);
  read_int(pb, o, "eval", "iters", &e->iters);
  read_bool(pb, o, "eval", "test", &e->test);
  if (e->interval < 0) problem(pb, "eval.interval: %d must be >= 0 (0 = never)", e->interval);
  if (e->iters < 1) problem(pb, "eval.iters: %d must be at least 1", e->iters);
}

static void read_checkpoint(problems *pb, json_t *root, mt_checkpoint_spec *c) {
  json_t *o = read_object(pb, root, "", "checkpoint");
  check_keys(pb, o, "checkpoint", checkpoint_keys);
  read_str(pb, o, "checkpoint", "dir", c->dir, sizeof c->dir);
  read_int(pb, o, "checkpoint", "interval", &c->interval);
  read_int(pb, o, "checkpoint", "keep", &c->keep);
  read_int(pb, o, "checkpoint", "keep_every", &c->keep_every);
  read_bool(pb, o, "checkpoint", "async", &c->async_save);
  read_i64(pb, o, "checkpoint", "resume_step", -1, INT64_MAX, &c->resume_step);
  read_str(pb, o, "checkpoint", "export", c->export_path, sizeof c->export_path);
  read_str(pb, o, "checkpoint", "load", c->load, sizeof c->load);
  read_bool(pb, o, "checkpoint", "load_optimizer", &c->load_optimizer);
  read_float_format(pb, o, "checkpoint", "export_dtype", c->export_dtype);
}

static void set_defaults(mt_job *job) {
  memset(job, 0, sizeof *job);
  snprintf(job->name, sizeof job->name, "job");
  mt_model_spec *m = &job->model;
  m->vocab_pad_to = 128;
  m->ln_eps = 1e-5f;
  m->init_std = 0.02f;
  m->hidden_dropout = 0.0f; /* Megatron uses 0.1; 0 keeps small runs exactly reproducible */
  m->attention_dropout = 0.0f;
  mt_parallel_spec *p = &job->parallel;
  p->tp = p->pp = p->dp_min = p->dp_max = 1;
  p->micro_batch = 1;
  p->bucket_size = 40000000; /* Megatron's DDP bucket, in elements */
  p->overlap_p2p = 1;
  p->virtual_stages = 1;
  snprintf(p->schedule, sizeof p->schedule, "1f1b");
  mt_train_spec *t = &job->train;
  t->seed = 1234;
  t->lr.kind = MT_LR_COSINE;
  t->beta1 = 0.9;
  t->beta2 = 0.95;
  t->adam_eps = 1e-8;
  t->weight_decay = 0.1;
  t->clip_grad = 1.0;
  snprintf(t->precision, sizeof t->precision, "fp32");
  t->loss_scale.initial = 4294967296.0; /* 2^32, Megatron's --initial-loss-scale */
  t->loss_scale.min = 1.0;
  t->loss_scale.growth_interval = 1000;
  t->loss_scale.dynamic = 1;
  t->loss_scale.hysteresis = 2;
  t->log_interval = 1;
  /* Megatron's --profile-step-start, --profile-step-end, --profile-ranks */
  t->profile.step_start = 10, t->profile.step_end = 12;
  t->profile.n_ranks = 1, t->profile.ranks[0] = 0;
  snprintf(job->data.split, sizeof job->data.split, "949,50,1");
  job->data.split_valid_weight = 50;
  job->data.shuffle = 1;
  job->data.eod_token = -1;
  job->eval.interval = 0;
  job->checkpoint.resume_step = -1;
  snprintf(job->checkpoint.export_dtype, sizeof job->checkpoint.export_dtype, "fp32");
  job->eval.iters = 10;
  job->eval.test = 1;
}

int mt_job_reads_eod(const mt_job *job) {
  return job->data.eod_mask_loss || job->data.reset_position_ids || job->data.reset_attention_mask;
}

int mt_job_unused(const mt_job *job, char lines[MT_JOB_UNUSED_MAX][256]) {
  mt_job d;
  memset(&d, 0, sizeof d);
  set_defaults(&d);
  int n = 0;
  const mt_loss_scale_spec *ls = &job->train.loss_scale, *dls = &d.train.loss_scale;
  if (strcmp(job->train.precision, "fp16") &&
      (ls->initial != dls->initial || ls->min != dls->min ||
       ls->growth_interval != dls->growth_interval || ls->hysteresis != dls->hysteresis ||
       ls->dynamic != dls->dynamic))
    snprintf(lines[n++], 256,
             "train.loss_scale: only fp16 scales its loss; with train.precision = %s it is ignored",
             job->train.precision);
  else if (!ls->dynamic && (ls->min != dls->min || ls->growth_interval != dls->growth_interval ||
                            ls->hysteresis != dls->hysteresis))
    snprintf(lines[n++], 256,
             "train.loss_scale: min, growth_interval and hysteresis move a dynamic scale; with "
             "train.loss_scale.dynamic = false the scale stays at initial = %g and they are "
             "ignored",
             ls->initial);
  const mt_data_spec *ds = &job->data;
  const char *given[3];
  int k = 0;
  if (ds->path[0] && strcmp(ds->split, d.data.split)) given[k++] = "data.split";
  /* data.valid and data.test are indexed datasets: they read these two */
  int indexed = ds->n_valid || ds->n_test;
  if (ds->path[0] && !indexed && ds->shuffle != d.data.shuffle) given[k++] = "data.shuffle";
  if (ds->path[0] && !indexed && ds->cache_dir[0]) given[k++] = "data.cache_dir";
  if (k)
    snprintf(lines[n++], 256,
             "%s%s%s%s%s: data.path is read in order, whole; %s to data.prefix and data.blend "
             "only, so %s ignored",
             given[0],
             k == 2   ? " and "
             : k == 3 ? ", "
                      : "",
             k > 1 ? given[1] : "", k == 3 ? " and " : "", k == 3 ? given[2] : "",
             k > 1 ? "they apply" : "it applies", k > 1 ? "they are" : "it is");
  if (job->parallel.sequence_parallel && job->parallel.tp == 1)
    snprintf(lines[n++], 256,
             "parallel.sequence_parallel: it splits over tensor-parallel ranks, and parallel.tp "
             "= 1; it is ignored");
  if ((job->data.n_valid || job->data.n_test) && job->eval.interval == 0)
    snprintf(lines[n++], 256,
             "%s: validation and the test pass read it, and eval.interval = 0 runs no "
             "evaluation; it is ignored",
             job->data.n_valid && job->data.n_test ? "data.valid and data.test"
             : job->data.n_valid                   ? "data.valid"
                                                   : "data.test");
  if (!job->eval.test && job->eval.interval == 0)
    snprintf(lines[n++], 256,
             "eval.test: false turns off the test pass, and eval.interval = 0 runs no "
             "evaluation; it is ignored");
  if (ds->eod_token >= 0 && !mt_job_reads_eod(job))
    snprintf(lines[n++], 256,
             "data.eod_token: only data.eod_mask_loss, data.reset_position_ids and "
             "data.reset_attention_mask read it, and they are false; it is ignored");
  return n;
}

/* A ramp-up that mt_job_batch_at can follow (validate_rampup names what is
 * wrong with another). */
static bool ramp_ok(const mt_train_spec *t) {
  const mt_rampup_spec *r = &t->rampup;
  return r->start >= 1 && r->increment >= 1 && r->samples >= 1 && r->start < t->global_batch &&
         ((int64_t)t->global_batch - r->start) % r->increment == 0 &&
         ((int64_t)t->global_batch - r->start) / r->increment <= (1 << 20);
}

int mt_job_batch_at(const mt_job *job, int64_t consumed) {
  const mt_train_spec *t = &job->train;
  const mt_rampup_spec *r = &t->rampup;
  if (!ramp_ok(t) || consumed > r->samples) return t->global_batch;
  int64_t n = ((int64_t)t->global_batch - r->start) / r->increment;
  double per = (double)r->samples / (double)n; /* rampup_samples_per_increment */
  int64_t k = (int64_t)((double)consumed / per);
  return r->start + (int)((k < n ? k : n) * r->increment);
}

/* The steps that start at `consumed` or after it while the ramp-up's batch
 * is still b = mt_job_batch_at(job, consumed) < global_batch: b holds until
 * the first count it does not (found by bisection: mt_job_batch_at does not
 * decrease), and a step reads b while it starts before that. */
static int64_t ramp_stage_steps(const mt_job *job, int64_t consumed, int b) {
  int64_t lo = consumed, hi = job->train.rampup.samples + 1; /* batch_at(lo) == b, (hi) != b */
  while (hi - lo > 1) {
    int64_t mid = lo + (hi - lo) / 2;
    if (mt_job_batch_at(job, mid) == b)
      lo = mid;
    else
      hi = mid;
  }
  return ceil_div(hi - consumed, b);
}

int64_t mt_job_samples_of(const mt_job *job, int64_t consumed, int64_t steps) {
  const mt_train_spec *t = &job->train;
  int64_t total = 0;
  /* stage by stage through the ramp */
  while (steps > 0 && ramp_ok(t) && consumed <= t->rampup.samples) {
    int b = mt_job_batch_at(job, consumed);
    if (b == t->global_batch) break;
    int64_t j = ramp_stage_steps(job, consumed, b);
    if (j > steps) j = steps;
    total += j * b, consumed += j * b, steps -= j;
  }
  return total + (steps > 0 ? steps * (int64_t)t->global_batch : 0);
}

/* The steps a run of `samples` samples takes (samples >= 0): the most
 * updates whose batches the samples hold whole, a partial last batch
 * dropped. That is Megatron-LM's rule for --train-samples
 * (update_train_iters in megatron/training/training.py, "Note that we throw
 * away any partial last batch"): samples // global_batch without a ramp-up;
 * under one, the ramp's updates counted one by one while consumed <=
 * rampup_samples, then (train_samples - consumed) // global_batch more.
 * For a run longer than the ramp (the runs Megatron's loop is written for)
 * the two are the same count; for a shorter one Megatron's loop runs the
 * whole ramp regardless and adds a negative count, and this keeps to the
 * rule: the updates mt_job_samples_of counts that fit. */
static int64_t steps_in(const mt_job *job, int64_t samples) {
  const mt_train_spec *t = &job->train;
  int64_t steps = 0, consumed = 0;
  while (ramp_ok(t) && consumed <= t->rampup.samples) {
    int b = mt_job_batch_at(job, consumed);
    if (b == t->global_batch) break;
    int64_t j = ramp_stage_steps(job, consumed, b), fit = (samples - consumed) / b;
    if (fit < j) return steps + fit;
    steps += j, consumed += j * b;
  }
  return steps + (samples - consumed) / t->global_batch;
}

static int64_t gcd64(int64_t a, int64_t b) {
  while (b) {
    int64_t r = a % b;
    a = b, b = r;
  }
  return a;
}

int mt_job_names_test_split(const mt_job *job) {
  if (job->data.n_test) return 1;
  if (job->data.path[0]) return 0; /* a flat file is all training */
  double w[3];
  return !mt_job_split_weights(job->data.split, w) && w[2] > 0;
}

mt_job_left mt_job_left_after(const mt_job *job, int64_t step) {
  mt_job_left l = {0, 0, 0, 0};
  int64_t n = job->train.steps, ev = job->eval.interval, ci = job->checkpoint.interval;
  if (step < 0) step = 0;
  if (step >= n) return l;
  l.steps = n - step;
  if (ev > 0 && job->eval.iters > 0)
    l.eval_batches = (n / ev - step / ev + 1 + (job->eval.test && mt_job_names_test_split(job))) *
                     job->eval.iters;
  if (!job->checkpoint.dir[0]) return l;
  l.saves = (ci > 0 ? n / ci - step / ci : 0) + (ci <= 0 || n % ci != 0);
  l.whole_saves = l.saves;
  if (job->checkpoint.async_save) {
    /* the interval's saves in the background but on validation steps:
     * multiples of both intervals short of the last step */
    int64_t both = ci > 0 && ev > 0 ? ci / gcd64(ci, ev) * ev : 0;
    l.whole_saves = 1 + (both > 0 ? (n - 1) / both - step / both : 0);
  }
  return l;
}

int mt_job_batch_quantum(const mt_job *job) {
  const mt_train_spec *t = &job->train;
  return ramp_ok(t) ? (int)gcd64(t->rampup.start, t->rampup.increment) : t->global_batch;
}

/* train.samples or train.tokens (tokens: samples of seq_len, rounded up, as
 * for the ramp-up's length) in steps, by steps_in. A length that cannot be
 * resolved because the batch, the ramp-up or seq_len is wrong leaves steps
 * 0: their own lines say why, and validate names no train.steps. */
static void resolve_run_length(problems *pb, mt_job *job) {
  mt_train_spec *t = &job->train;
  if (!t->length_key[0]) return;
  char key[16];
  snprintf(key, sizeof key, "train.%s", t->length_key);
  bool tokens = !strcmp(t->length_key, "tokens");
  int64_t given = t->length_given, seq = job->model.seq_len;
  if (given < 1) {
    check_fail(pb, key, "%" PRId64 " must be at least 1", given);
    goto unresolved;
  }
  if (tokens && seq < 1) goto unresolved;
  int64_t samples = tokens ? ceil_div(given, seq) : given;
  if (samples > (int64_t)1 << 50) {
    if (tokens)
      check_fail(pb, key,
                 "%" PRId64 " samples of model.seq_len %" PRId64 " tokens are over 2^50, "
                 "the most this version takes",
                 samples, seq);
    else
      check_fail(pb, key, "%" PRId64 " is over 2^50, the most this version takes", samples);
    goto unresolved;
  }
  const mt_rampup_spec *r = &t->rampup;
  bool ramp_given = r->start || r->increment || r->samples;
  if (t->global_batch < 1 || (ramp_given && !ramp_ok(t))) goto unresolved;
  t->steps = steps_in(job, samples);
  if (t->steps >= 1) return;
  check_fail(pb, key,
             "%" PRId64 "%s hold no whole batch (the first is %d samples%s): the run would "
             "have no step",
             given, tokens ? " tokens" : " samples", mt_job_batch_at(job, 0),
             tokens ? " of model.seq_len tokens" : "");
unresolved:
  /* steps stays 0: what follows from train.steps (the decay, the warmup
   * against it) would say nothing new */
  mute(pb, "train.steps");
}

/* Values that follow from others: token lengths in steps (ceil: never less
 * than the tokens asked for), LR defaults, the padded vocabulary. */
static void derive(problems *pb, mt_job *job, const lr_given *g) {
  mt_model_spec *m = &job->model;
  if (m->max_positions == 0)
    m->max_positions = m->seq_len; /* one position per token */
  else if (m->max_positions < m->seq_len && m->seq_len >= 1)
    check_fail(pb, "model.max_positions",
               "%d is below model.seq_len %d: a sample's tokens past it would have no position",
               m->max_positions, m->seq_len);
  mt_lr_spec *lr = &job->train.lr;
  mt_rampup_spec *ramp = &job->train.rampup;
  if (g->rampup_tokens >= 0 && job->model.seq_len >= 1) {
    ramp->samples = ceil_div(g->rampup_tokens, job->model.seq_len);
    if (ramp->samples > (int64_t)1 << 50)
      check_fail(pb, "train.rampup_batch.tokens", "%" PRId64 " samples of %d tokens are over 2^50",
                 ramp->samples, job->model.seq_len);
  }
  resolve_run_length(pb, job);
  int64_t tokens_per_step = mt_job_tokens_per_step(job);
  if (tokens_per_step > 0) {
    if (g->warmup_tokens >= 0) lr->warmup_steps = ceil_div(g->warmup_tokens, tokens_per_step);
    if (g->decay_tokens >= 0) lr->decay_steps = ceil_div(g->decay_tokens, tokens_per_step);
  }
  /* the run's length in steps of global_batch: under a ramp-up the run's
   * steps read fewer samples than as many full batches, and the default
   * decay and the weight decay's increment end with the run (Megatron's
   * lr_decay_samples defaults to train_samples, wd_incr_steps is it) */
  mt_train_spec *t = &job->train;
  bool ramp_run = ramp_ok(t) && t->steps >= 1 && t->steps <= ((int64_t)1 << 50) / t->global_batch;
  int64_t run_steps =
      ramp_run ? ceil_div(mt_job_samples_of(job, 0, t->steps), t->global_batch) : t->steps;
  bool ramp_decay = !g->decay && ramp_run;
  if (!g->decay) lr->decay_steps = run_steps;
  t->wd.incr_steps = run_steps;
  t->wd.end = t->weight_decay;
  if (t->wd.style == MT_WD_CONSTANT) t->wd.start = t->wd.end;
  /* a decay length that was refused itself (its default, 0, stood in) says
   * nothing new about the decay or the warmup */
  bool decay_refused = seen(pb, "train.lr.decay_steps") || seen(pb, "train.lr.decay_tokens");
  /* Megatron asserts a decay length over 0: a zero one would run every step
   * at the floor */
  if (g->decay && !decay_refused && lr->kind != MT_LR_CONSTANT && lr->decay_steps == 0)
    check_fail(pb, g->decay_tokens >= 0 ? "train.lr.decay_tokens" : "train.lr.decay_steps",
               "a decay of 0 steps: a %s schedule decays over at least one (or set schedule "
               "\"constant\")",
               lr->kind == MT_LR_COSINE   ? "cosine"
               : lr->kind == MT_LR_LINEAR ? "linear"
                                          : "decaying");
  if (!g->min) lr->min = lr->kind == MT_LR_CONSTANT ? lr->peak : 0.1 * lr->peak;
  if (lr->warmup_init != 0 &&
      !(lr->warmup_init >= 0 && (lr->warmup_init <= lr->peak || !(lr->peak > 0 && lr->peak < 1e6))))
    check_fail(pb, "train.lr.warmup_init",
               "%g must be >= 0 and at most train.lr.peak = %g: the "
               "warmup rises from it to peak",
               lr->warmup_init, lr->peak);
  else if (lr->warmup_init != 0 && lr->warmup_steps == 0 && !seen(pb, "train.lr.warmup_steps") &&
           !seen(pb, "train.lr.warmup_tokens"))
    check_fail(pb, "train.lr.warmup_init",
               "%g starts a warmup, and the job has none (train.lr.warmup_steps is 0)",
               lr->warmup_init);
  if (lr->kind == MT_LR_WSD && lr->wsd_decay_steps > lr->decay_steps && lr->decay_steps > 0)
    check_fail(pb, "train.lr.wsd_decay_steps",
               "%" PRId64 " is past the decay's %" PRId64 " steps: WSD decays over the last "
               "wsd_decay_steps of them",
               lr->wsd_decay_steps, lr->decay_steps);
  /* a decay that follows train.steps says nothing new when train.steps was
   * refused itself (its default, 0, stood in) */
  if (lr->warmup_steps > lr->decay_steps && !decay_refused &&
      (g->decay || !seen(pb, "train.steps"))) {
    char whence[224] = "", steps[96];
    if (t->length_key[0]) /* the steps it was resolved to */
      snprintf(steps, sizeof steps, "the %" PRId64 " steps of train.%s = %" PRId64, t->steps,
               t->length_key, t->length_given);
    else if (ramp_decay)
      snprintf(steps, sizeof steps, "train.steps = %" PRId64, t->steps);
    else
      snprintf(steps, sizeof steps, "train.steps");
    if (ramp_decay) /* the run's samples in full batches */
      snprintf(whence, sizeof whence,
               " (the %" PRId64 " samples %s read under train.rampup_batch, in batches of %d)",
               mt_job_samples_of(job, 0, t->steps), steps, t->global_batch);
    else if (!g->decay)
      snprintf(whence, sizeof whence, " (%s)", steps);
    check_fail(pb, g->warmup_tokens >= 0 ? "train.lr.warmup_tokens" : "train.lr.warmup_steps",
               "warmup of %" PRId64 " steps is longer than the decay, %" PRId64 " steps%s",
               lr->warmup_steps, lr->decay_steps, whence);
  }

  if (m->vocab_size >= 1 && m->vocab_pad_to >= 1 && job->parallel.tp >= 1) {
    int64_t mult = (int64_t)m->vocab_pad_to * job->parallel.tp;
    int64_t padded = ceil_div(m->vocab_size, mult) * mult;
    m->padded_vocab = padded <= INT_MAX ? (int)padded : 0;
  }
}

/* ---- validation: can this job run at all ---- */

/* Megatron's checks of --rampup-batch-size, and every batch of the ramp
 * split over micro_batch * dp_min. */
static void validate_rampup(problems *pb, const mt_job *job) {
  const mt_train_spec *t = &job->train;
  const mt_rampup_spec *r = &t->rampup;
  if (!r->start && !r->increment && !r->samples) return;
  if (r->start < 1) check_fail(pb, "train.rampup_batch.start", "%d must be at least 1", r->start);
  if (r->increment < 1)
    check_fail(pb, "train.rampup_batch.increment", "%d must be at least 1", r->increment);
  if (r->start < 1 || r->increment < 1 || t->global_batch < 1) return;
  if (r->start >= t->global_batch) {
    check_fail(pb, "train.rampup_batch.start",
               "%d is not below train.global_batch = %d, the batch the ramp-up ends at", r->start,
               t->global_batch);
    return;
  }
  int64_t diff = (int64_t)t->global_batch - r->start;
  if (diff % r->increment)
    check_fail(pb, "train.rampup_batch.increment",
               "%d does not divide train.global_batch - start = %d - %d = %" PRId64, r->increment,
               t->global_batch, r->start, diff);
  else if (diff / r->increment > (1 << 20))
    check_fail(pb, "train.rampup_batch.increment",
               "%d makes %" PRId64 " increments from %d to %d, over 2^20", r->increment,
               diff / r->increment, r->start, t->global_batch);
  const mt_parallel_spec *p = &job->parallel;
  int64_t per = (int64_t)p->micro_batch * p->dp_min;
  if (per >= 1 && (r->start % per || r->increment % per))
    check_fail(pb, "train.rampup_batch",
               "start %d and increment %d must both be divisible by parallel.micro_batch * dp_min "
               "= %d * %d: every batch of the ramp-up is split into whole micro-batches",
               r->start, r->increment, p->micro_batch, p->dp_min);
}

static void validate(problems *pb, mt_job *job) {
  const mt_model_spec *m = &job->model;
  const mt_parallel_spec *p = &job->parallel;
  const mt_train_spec *t = &job->train;
  const mt_checkpoint_spec *c = &job->checkpoint;

  if (!safe_name(job->name))
    check_fail(pb, "name",
               "\"%s\" must be non-empty letters, digits, '.', '_' or '-' and not start with '.' "
               "(it names checkpoint directories)",
               job->name);

  /* positive sizes */
  struct {
    const char *key;
    int64_t v;
  } pos[] = {
      {"model.n_layer", m->n_layer},
      {"model.n_embd", m->n_embd},
      {"model.n_head", m->n_head},
      {"model.vocab_size", m->vocab_size},
      {"model.vocab_pad_to", m->vocab_pad_to},
      {"model.seq_len", m->seq_len},
      {"parallel.tp", p->tp},
      {"parallel.pp", p->pp},
      {"parallel.dp_min", p->dp_min},
      {"parallel.dp_max", p->dp_max},
      {"parallel.micro_batch", p->micro_batch},
      {"parallel.bucket_size", p->bucket_size},
      {"train.global_batch", t->global_batch},
      {"train.steps", t->steps},
      {"train.log_interval", t->log_interval},
  };
  for (size_t i = 0; i < sizeof pos / sizeof *pos; i++)
    /* steps resolved from train.samples or train.tokens: resolve_run_length's */
    if (pos[i].v < 1 && !(t->length_key[0] && !strcmp(pos[i].key, "train.steps")))
      check_fail(pb, pos[i].key, "%" PRId64 " must be at least 1", pos[i].v);

  /* sizes past any model's, so the planning and the index arithmetic
   * (12 h^2 per layer, steps x global batch samples) stay in 64 bits: MT-NLG
   * 530B is 105 layers of 20480, 128 heads, 2048 tokens */
  struct {
    const char *key;
    int64_t v, most;
  } big[] = {
      {"model.n_layer", m->n_layer, 1 << 16},
      {"model.n_embd", m->n_embd, 1 << 20},
      {"model.n_head", m->n_head, 1 << 16},
      {"model.seq_len", m->seq_len, 1 << 20},
      {"model.max_positions", m->max_positions, 1 << 20},
      {"model.vocab_size", m->vocab_size, 1 << 26},
      {"train.global_batch", t->global_batch, 1 << 26},
  };
  int in_bounds = 1;
  for (size_t i = 0; i < sizeof big / sizeof *big; i++)
    if (big[i].v > big[i].most) {
      in_bounds = 0;
      check_fail(pb, big[i].key, "%" PRId64 " is over %" PRId64 ", the most this version takes",
                 big[i].v, big[i].most);
    }
  /* and the products the plan and the activation buffers take, in double:
   * the parameters (12 h^2 a layer and the embeddings; 530B has 5.3e11)
   * times 16 bytes, and a micro-batch's B x T x C (530B: 4.2e7) */
  if (in_bounds && m->n_layer >= 1 && m->n_embd >= 1 && m->vocab_size >= 1 && m->seq_len >= 1) {
    double h = m->n_embd,
           params = 12.0 * m->n_layer * h * h + ((double)m->vocab_size + m->max_positions) * h;
    if (params > 1e15)
      check_fail(pb, "model", "%.3g parameters (n_layer %d, n_embd %d) are over 1e15", params,
                 m->n_layer, m->n_embd);
    if (p->micro_batch >= 1 && (double)p->micro_batch * m->seq_len * h > (double)(1LL << 40))
      check_fail(pb, "parallel.micro_batch",
                 "%d x seq_len %d x n_embd %d activations a layer are over 2^40", p->micro_batch,
                 m->seq_len, m->n_embd);
  }
  if (t->steps >= 1 && t->global_batch >= 1 && t->steps > ((int64_t)1 << 50) / t->global_batch) {
    char key[16];
    snprintf(key, sizeof key, "train.%s", t->length_key[0] ? t->length_key : "steps");
    check_fail(pb, key,
               "%" PRId64 " steps of %d samples are over 2^50 samples, the most this version takes",
               (int64_t)t->steps, t->global_batch);
  }

  /* shapes and their split over the parallel layout, on positive sizes only */
  if (m->n_embd >= 1 && m->n_head >= 1 && m->n_embd % m->n_head)
    check_fail(pb, "model.n_embd", "%d is not divisible by model.n_head = %d", m->n_embd,
               m->n_head);
  if (m->n_head >= 1 && p->tp >= 1 && m->n_head % p->tp)
    check_fail(pb, "model.n_head", "%d is not divisible by parallel.tp = %d", m->n_head, p->tp);
  if (t->timing_log_level < 0 || t->timing_log_level > 2)
    check_fail(pb, "train.timing_log_level",
               "%d must be 0 (no timers), 1 (the step's phases) or 2 (and the model's pieces)",
               t->timing_log_level);
  else if (t->log_timers_to_tensorboard && !t->timing_log_level)
    check_fail(pb, "train.log_timers_to_tensorboard",
               "needs train.timing_log_level 1 or 2: the timers it writes are off");
  if (t->timing_log_option > 0 && !t->timing_log_level)
    check_fail(pb, "train.timing_log_option",
               "%s needs train.timing_log_level 1 or 2: the timers it shows are off",
               mt_job_timing_option_name(t->timing_log_option));
  if (t->log_timers_to_tensorboard && !t->tensorboard_dir[0])
    check_fail(pb, "train.log_timers_to_tensorboard",
               "needs train.tensorboard_dir: where the events go");
  if (t->log_memory_to_tensorboard && !t->tensorboard_dir[0])
    check_fail(pb, "train.log_memory_to_tensorboard",
               "needs train.tensorboard_dir: where the events go");
  if (t->profile.on && t->profile.step_end <= t->profile.step_start)
    check_fail(pb, "train.profile.step_end",
               "%" PRId64 " is not after step_start = %" PRId64
               ": the capture runs from after step step_start to after step step_end",
               t->profile.step_end, t->profile.step_start);
  const mt_parallel_spec *pa = &job->parallel;
  int64_t world = (int64_t)pa->tp * pa->pp * (pa->dp_max > pa->dp_min ? pa->dp_max : pa->dp_min);
  for (int i = 0; t->profile.on && i < t->profile.n_ranks && world > 0; i++)
    if (t->profile.ranks[i] >= world) {
      check_fail(pb, "train.profile.ranks",
                 "world rank %d is not in the job: it runs at most tp %d x pp %d x dp_max %d = "
                 "%" PRId64 " ranks, 0 to %" PRId64,
                 t->profile.ranks[i], pa->tp, pa->pp, pa->dp_max, world, world - 1);
      break;
    }
  if (!(t->exit_duration_mins >= 0.0 && t->exit_duration_mins <= 1e7))
    check_fail(pb, "train.exit_duration_mins", "%g must be from 0 (never) to 1e7",
               t->exit_duration_mins);
  else if (t->exit_duration_mins > 0.0 && !c->dir[0])
    check_fail(pb, "train.exit_duration_mins",
               "%g needs checkpoint.dir: the run it stops is resumed from the checkpoint it saves",
               t->exit_duration_mins);
  if (t->exit_interval > 0 && !c->dir[0])
    check_fail(pb, "train.exit_interval",
               "%" PRId64 " needs checkpoint.dir: the run it stops is resumed from the checkpoint "
               "it saves",
               t->exit_interval);
  if (p->recompute_layers < 0)
    check_fail(pb, "parallel.recompute_layers", "%d must be >= 0 (0 = every layer)",
               p->recompute_layers);
  if (p->recompute_layers > 0 && !p->recompute)
    check_fail(pb, "parallel.recompute_layers", "%d recomputes only with parallel.recompute = true",
               p->recompute_layers);
  if (p->sequence_parallel && p->tp > 1 && p->micro_batch >= 1 && m->seq_len >= 1 &&
      ((int64_t)p->micro_batch * m->seq_len) % p->tp)
    check_fail(pb, "parallel.sequence_parallel",
               "splits a micro-batch's parallel.micro_batch %d x model.seq_len %d = %" PRId64
               " rows over parallel.tp = %d, which does not divide them",
               p->micro_batch, m->seq_len, (int64_t)p->micro_batch * m->seq_len, p->tp);
  /* uneven splits are allowed: the first n_layer % pp stages hold one layer more */
  if (m->n_layer >= 1 && p->pp >= 1 && m->n_layer < p->pp)
    check_fail(pb, "model.n_layer", "%d layers cannot fill parallel.pp = %d stages", m->n_layer,
               p->pp);
  if (p->virtual_stages < 1)
    check_fail(pb, "parallel.virtual_stages", "%d must be >= 1 (1: plain 1F1B)", p->virtual_stages);
  if (p->virtual_stages > 1 && p->pp < 2)
    check_fail(pb, "parallel.virtual_stages",
               "%d chunks a stage interleave a pipeline: they need parallel.pp >= 2",
               p->virtual_stages);
  if (p->virtual_stages > 1 && p->pp >= 2 && m->n_layer >= 1 &&
      m->n_layer < (int64_t)p->pp * p->virtual_stages)
    check_fail(pb, "parallel.virtual_stages",
               "parallel.pp = %d stages x %d chunks need %" PRId64 " layers, model.n_layer is %d",
               p->pp, p->virtual_stages, (int64_t)p->pp * p->virtual_stages, m->n_layer);
  if (p->virtual_stages > 1 && p->pp >= 2 && t->global_batch >= 1 && p->micro_batch >= 1 &&
      p->dp_min >= 1 && t->global_batch % ((int64_t)p->micro_batch * p->dp_min * p->pp))
    check_fail(pb, "parallel.virtual_stages",
               "the interleaved schedule takes micro-batches parallel.pp at a time: "
               "train.global_batch %d is not divisible by micro_batch * dp_min * pp = %d * %d * %d",
               t->global_batch, p->micro_batch, p->dp_min, p->pp);
  if (p->dp_min >= 1 && p->dp_max >= 1 && p->dp_max < p->dp_min)
    check_fail(pb, "parallel.dp_max", "%d is below parallel.dp_min = %d", p->dp_max, p->dp_min);
  if (t->global_batch >= 1 && p->micro_batch >= 1 && p->dp_min >= 1 &&
      t->global_batch % ((int64_t)p->micro_batch * p->dp_min))
    check_fail(pb, "train.global_batch",
               "%d is not divisible by parallel.micro_batch * dp_min = %d * %d", t->global_batch,
               p->micro_batch, p->dp_min);
  validate_rampup(pb, job);
  const mt_rampup_spec *ramp = &t->rampup;
  int64_t pp_quantum = (int64_t)p->micro_batch * p->dp_min * p->pp;
  if (p->virtual_stages > 1 && p->pp >= 2 && ramp->start > 0 && pp_quantum >= 1 &&
      (ramp->start % pp_quantum || ramp->increment % pp_quantum))
    check_fail(pb, "parallel.virtual_stages",
               "the interleaved schedule takes micro-batches parallel.pp at a time: "
               "train.rampup_batch start %d and increment %d must be multiples of micro_batch * "
               "dp_min * pp = %" PRId64,
               ramp->start, ramp->increment, pp_quantum);
  if (m->vocab_size > 65536 && job->data.path[0])
    check_fail(pb, "model.vocab_size",
               "%d does not fit the uint16 tokens of data.path (at most 65536)", m->vocab_size);
  /* a data token past the vocabulary is refused where it is read; an id
   * that no token can be would mask nothing */
  if (mt_job_reads_eod(job) && job->data.eod_token >= m->vocab_size && m->vocab_size >= 1)
    check_fail(pb, "data.eod_token", "%d is no token of model.vocab_size %d", job->data.eod_token,
               m->vocab_size);
  if (m->vocab_size >= 1 && m->vocab_pad_to >= 1 && p->tp >= 1 && m->padded_vocab == 0)
    check_fail(pb, "model.vocab_pad_to", "%d * parallel.tp = %d pads model.vocab_size past 2^31",
               m->vocab_pad_to, p->tp);

  /* model numerics */
  if (!(m->ln_eps > 0)) check_fail(pb, "model.ln_eps", "%g must be > 0", (double)m->ln_eps);
  if (!(m->init_std > 0)) check_fail(pb, "model.init_std", "%g must be > 0", (double)m->init_std);
  if (!(m->hidden_dropout >= 0 && m->hidden_dropout < 1))
    check_fail(pb, "model.hidden_dropout", "%g is not in [0, 1)", (double)m->hidden_dropout);
  if (!(m->attention_dropout >= 0 && m->attention_dropout < 1))
    check_fail(pb, "model.attention_dropout", "%g is not in [0, 1)", (double)m->attention_dropout);

  /* optimizer */
  if (!(t->lr.peak > 0 && t->lr.peak < 1e6))
    check_fail(pb, "train.lr.peak", "%g must be > 0 (and below 1e6)", t->lr.peak);
  if (!(t->lr.min >= 0))
    check_fail(pb, "train.lr.min", "%g must be >= 0", t->lr.min);
  else if (t->lr.peak > 0 && t->lr.min > t->lr.peak)
    check_fail(pb, "train.lr.min", "%g is above train.lr.peak = %g", t->lr.min, t->lr.peak);
  /* the optimizer computes in float: 0.9999999999 is 1.0f there (Adam's bias
   * correction divides by 0) and 1e-50 is 0.0f (0/0 for a row never seen),
   * so the checks are on the values as floats */
  if (!(t->beta1 >= 0 && (float)t->beta1 < 1.0f))
    check_fail(pb, "train.adam.beta1", "%.17g is not in [0, 1) as a float", t->beta1);
  if (!(t->beta2 >= 0 && (float)t->beta2 < 1.0f))
    check_fail(pb, "train.adam.beta2", "%.17g is not in [0, 1) as a float", t->beta2);
  if (!(t->adam_eps > 0 && (float)t->adam_eps >= FLT_MIN && t->adam_eps <= 1))
    check_fail(pb, "train.adam.eps", "%g must be in [%g, 1] (a normal float)", t->adam_eps,
               (double)FLT_MIN);
  /* the AdamW kernel takes it as a float: 1e300 would be inf there */
  if (!(t->weight_decay >= 0 && t->weight_decay <= FLT_MAX))
    check_fail(pb, "train.weight_decay", "%g must be >= 0 and at most %g (a float)",
               t->weight_decay, (double)FLT_MAX);
  if (!(t->clip_grad >= 0))
    check_fail(pb, "train.clip_grad", "%g must be >= 0 (0 = no clipping)", t->clip_grad);

  /* loss scaling: the scaler keeps a float */
  const mt_loss_scale_spec *ls = &t->loss_scale;
  if (!(ls->initial > 0 && ls->initial <= FLT_MAX))
    check_fail(pb, "train.loss_scale.initial", "%g must be > 0 and at most %g (a float)",
               ls->initial, (double)FLT_MAX);
  if (!(ls->min > 0))
    check_fail(pb, "train.loss_scale.min", "%g must be > 0", ls->min);
  else if (ls->dynamic && ls->initial > 0 && ls->min > ls->initial) /* a static scale has no min */
    check_fail(pb, "train.loss_scale.min", "%g is above train.loss_scale.initial = %g", ls->min,
               ls->initial);
  if (ls->growth_interval < 1)
    check_fail(pb, "train.loss_scale.growth_interval", "%d must be at least 1",
               ls->growth_interval);
  if (ls->hysteresis < 1)
    check_fail(pb, "train.loss_scale.hysteresis", "%d must be at least 1", ls->hysteresis);

  /* files */
  /* an empty data.path, data.prefix or blend prefix is read_data's, named by
   * the key the job gave it under */
  if (job->eval.interval > 0 && job->data.path[0] && !job->data.n_valid)
    check_fail(pb, "eval.interval",
               "validation needs a valid split: use data.prefix or data.blend, not data.path, "
               "or give data.valid");
  else if (job->eval.interval > 0 && !job->data.n_valid && !(job->data.split_valid_weight > 0))
    check_fail(pb, "eval.interval",
               "validation needs a valid split, and data.split \"%s\" gives it nothing",
               job->data.split);
  if (job->eval.interval > 0 && job->eval.iters >= 1 && t->global_batch >= 1 &&
      job->eval.iters > ((int64_t)1 << 40) / t->global_batch)
    check_fail(pb, "eval.iters", "%d batches of %d samples are over 2^40 samples", job->eval.iters,
               t->global_batch);
  if (c->interval < 0) check_fail(pb, "checkpoint.interval", "%d must be >= 0", c->interval);
  if (c->keep < 0) check_fail(pb, "checkpoint.keep", "%d must be >= 0 (0 = keep all)", c->keep);
  if (c->keep_every < 0)
    check_fail(pb, "checkpoint.keep_every", "%d must be >= 0 (0 = none)", c->keep_every);
  if (c->resume_step >= 0 && !c->dir[0])
    check_fail(pb, "checkpoint.resume_step", "%lld needs checkpoint.dir",
               (long long)c->resume_step);
  if (c->interval > 0 && !c->dir[0])
    check_fail(pb, "checkpoint.interval", "%d needs checkpoint.dir", c->interval);
  /* an fp16 export refuses a weight past fp16's range, at the end of the
   * run: without a checkpoint nothing would keep the trained weights */
  if (!strcmp(c->export_dtype, "fp16") && !c->dir[0])
    check_fail(pb, "checkpoint.export_dtype",
               "fp16 needs checkpoint.dir: a weight past fp16's range fails the export at the end "
               "of the run, and without a checkpoint the trained weights would be lost (export "
               "bf16, or set checkpoint.dir and export fp16 from it with mtnlgctl ckpt export)");
  /* two sources of the starting weights: which one wins would be a guess */
  if (c->load[0] && job->model.init_from[0])
    check_fail(pb, "checkpoint.load",
               "%s and model.init_from %s both give the weights to start from: name one", c->load,
               job->model.init_from);
  if (c->load_optimizer && !c->load[0])
    check_fail(pb, "checkpoint.load_optimizer", "needs checkpoint.load");
}

/* ---- canonical form and hash ---- */

/* The resolved job as JSON in the input schema, every default filled in and
 * every length in steps, without the preset name: a self-contained job that
 * reads back to the same struct. Its compact, key-sorted dump is what the
 * hash covers. */
static json_t *job_to_json_core(const mt_job *job) {
  const mt_model_spec *m = &job->model;
  const mt_parallel_spec *p = &job->parallel;
  const mt_train_spec *t = &job->train;
  const mt_checkpoint_spec *c = &job->checkpoint;
  static const char *const kinds[] = {"constant", "cosine", "linear", "inverse-square-root", "WSD"};
  return json_pack(
      "{s:s, s:{s:I, s:I, s:I, s:I, s:I, s:I, s:f, s:f, s:f, s:f, s:s},"
      " s:{s:I, s:I, s:I, s:I, s:I, s:b, s:s, s:I},"
      " s:{s:I, s:I, s:I, s:{s:s, s:f, s:f, s:I, s:I}, s:{s:f, s:f, s:f}, s:f, s:f, s:s, s:I},"
      " s:{s:s}, s:{s:s, s:I, s:I, s:s}}",
      "name", job->name, "model", "n_layer", (json_int_t)m->n_layer, "n_embd",
      (json_int_t)m->n_embd, "n_head", (json_int_t)m->n_head, "vocab_size",
      (json_int_t)m->vocab_size, "vocab_pad_to", (json_int_t)m->vocab_pad_to, "seq_len",
      (json_int_t)m->seq_len, "ln_eps", (double)m->ln_eps, "init_std", (double)m->init_std,
      "hidden_dropout", (double)m->hidden_dropout, "attention_dropout",
      (double)m->attention_dropout, "init_from", m->init_from, "parallel", "tp", (json_int_t)p->tp,
      "pp", (json_int_t)p->pp, "dp_min", (json_int_t)p->dp_min, "dp_max", (json_int_t)p->dp_max,
      "micro_batch", (json_int_t)p->micro_batch, "recompute", p->recompute, "schedule", p->schedule,
      "bucket_size", (json_int_t)p->bucket_size, "train", "global_batch",
      (json_int_t)t->global_batch, "steps", (json_int_t)t->steps, "seed", (json_int_t)t->seed, "lr",
      "schedule", kinds[t->lr.kind], "peak", t->lr.peak, "min", t->lr.min, "warmup_steps",
      (json_int_t)t->lr.warmup_steps, "decay_steps", (json_int_t)t->lr.decay_steps, "adam", "beta1",
      t->beta1, "beta2", t->beta2, "eps", t->adam_eps, "weight_decay", t->weight_decay, "clip_grad",
      t->clip_grad, "precision", t->precision, "log_interval", (json_int_t)t->log_interval, "data",
      "path", job->data.path, "checkpoint", "dir", c->dir, "interval", (json_int_t)c->interval,
      "keep", (json_int_t)c->keep, "export", c->export_path);
}

/* The resolved job as JSON: the core sections, then data (whichever source
 * kind) and eval. */
static json_t *job_to_json(const mt_job *job) {
  json_t *root = job_to_json_core(job);
  if (!root) return NULL;
  const mt_data_spec *d = &job->data;
  json_t *data = json_pack("{s:s, s:b}", "split", d->split, "shuffle", d->shuffle);
  if (d->path[0]) json_object_set_new(data, "path", json_string(d->path));
  if (d->cache_dir[0]) json_object_set_new(data, "cache_dir", json_string(d->cache_dir));
  if (d->eod_mask_loss) /* only when on: the jobs from before it keep their hash */
    json_object_set_new(data, "eod_mask_loss", json_true());
  if (d->reset_position_ids) /* likewise */
    json_object_set_new(data, "reset_position_ids", json_true());
  if (d->reset_attention_mask) /* likewise */
    json_object_set_new(data, "reset_attention_mask", json_true());
  if (mt_job_reads_eod(job)) json_object_set_new(data, "eod_token", json_integer(d->eod_token));
  if (d->n_blend) {
    json_t *blend = json_array();
    for (int i = 0; i < d->n_blend; i++)
      json_array_append_new(blend, json_pack("{s:s, s:f}", "prefix", d->blend[i].prefix, "weight",
                                             d->blend[i].weight));
    json_object_set_new(data, "blend", blend);
  }
  /* only when given: the jobs from before them keep their hash */
  const char *split_keys[2] = {"valid", "test"};
  const mt_blend_spec *split_sets[2] = {d->valid, d->test};
  int split_n[2] = {d->n_valid, d->n_test};
  for (int w = 0; w < 2; w++) {
    if (!split_n[w]) continue;
    json_t *a = json_array();
    for (int i = 0; i < split_n[w]; i++)
      json_array_append_new(a, json_pack("{s:s, s:f}", "prefix", split_sets[w][i].prefix, "weight",
                                         split_sets[w][i].weight));
    json_object_set_new(data, split_keys[w], a);
  }
  json_object_set_new(root, "data", data);
  const mt_loss_scale_spec *ls = &job->train.loss_scale;
  json_object_set_new(json_object_get(root, "train"), "loss_scale",
                      json_pack("{s:f, s:f, s:I, s:I}", "initial", ls->initial, "min", ls->min,
                                "growth_interval", (json_int_t)ls->growth_interval, "hysteresis",
                                (json_int_t)ls->hysteresis));
  if (!ls->dynamic) /* only when off: the jobs from before it keep their hash */
    json_object_set_new(json_object_get(json_object_get(root, "train"), "loss_scale"), "dynamic",
                        json_false());
  const mt_rampup_spec *ramp = &job->train.rampup;
  if (ramp->start || ramp->increment || ramp->samples)
    json_object_set_new(json_object_get(root, "train"), "rampup_batch",
                        json_pack("{s:i, s:i, s:I}", "start", ramp->start, "increment",
                                  ramp->increment, "samples", (json_int_t)ramp->samples));
  json_object_set_new(json_object_get(root, "parallel"), "overlap_p2p",
                      json_boolean(job->parallel.overlap_p2p));
  /* only when on: the jobs from before them keep their canonical form and hash */
  if (job->parallel.sequence_parallel)
    json_object_set_new(json_object_get(root, "parallel"), "sequence_parallel", json_true());
  if (job->parallel.virtual_stages > 1)
    json_object_set_new(json_object_get(root, "parallel"), "virtual_stages",
                        json_integer(job->parallel.virtual_stages));
  if (job->parallel.recompute_layers)
    json_object_set_new(json_object_get(root, "parallel"), "recompute_layers",
                        json_integer(job->parallel.recompute_layers));
  if (job->train.exit_duration_mins > 0.0)
    json_object_set_new(json_object_get(root, "train"), "exit_duration_mins",
                        json_real(job->train.exit_duration_mins));
  if (job->train.exit_interval > 0)
    json_object_set_new(json_object_get(root, "train"), "exit_interval",
                        json_integer(job->train.exit_interval));
  if (job->train.log_params_norm)
    json_object_set_new(json_object_get(root, "train"), "log_params_norm", json_true());
  if (job->train.tensorboard_dir[0]) /* only when given: other jobs keep their hash */
    json_object_set_new(json_object_get(root, "train"), "tensorboard_dir",
                        json_string(job->train.tensorboard_dir));
  if (job->train.log_num_zeros_in_grad) /* only when set: other jobs keep their hash */
    json_object_set_new(json_object_get(root, "train"), "log_num_zeros_in_grad", json_true());
  if (job->train.timing_log_level) /* only when set: other jobs keep their hash */
    json_object_set_new(json_object_get(root, "train"), "timing_log_level",
                        json_integer(job->train.timing_log_level));
  if (job->train.timing_log_option) /* only when not minmax: other jobs keep their hash */
    json_object_set_new(json_object_get(root, "train"), "timing_log_option",
                        json_string(mt_job_timing_option_name(job->train.timing_log_option)));
  if (job->train.log_timers_to_tensorboard) /* only when set: other jobs keep their hash */
    json_object_set_new(json_object_get(root, "train"), "log_timers_to_tensorboard", json_true());
  if (job->train.log_memory_to_tensorboard) /* only when set: other jobs keep their hash */
    json_object_set_new(json_object_get(root, "train"), "log_memory_to_tensorboard", json_true());
  if (job->train.profile.on) { /* only when given: other jobs keep their hash */
    json_t *ranks = json_array();
    for (int i = 0; i < job->train.profile.n_ranks; i++)
      json_array_append_new(ranks, json_integer(job->train.profile.ranks[i]));
    json_object_set_new(json_object_get(root, "train"), "profile",
                        json_pack("{s:I, s:I, s:o}", "step_start",
                                  (json_int_t)job->train.profile.step_start, "step_end",
                                  (json_int_t)job->train.profile.step_end, "ranks", ranks));
  }
  if (job->train.lr.kind == MT_LR_WSD) {
    static const char *const styles[] = {"linear", "cosine", "exponential", "minus_sqrt"};
    json_t *lr = json_object_get(json_object_get(root, "train"), "lr");
    json_object_set_new(lr, "wsd_decay_steps", json_integer(job->train.lr.wsd_decay_steps));
    json_object_set_new(lr, "wsd_decay_style", json_string(styles[job->train.lr.wsd_style]));
  }
  /* only when set: the jobs from before them keep their hash */
  if (job->train.lr.warmup_init != 0)
    json_object_set_new(json_object_get(json_object_get(root, "train"), "lr"), "warmup_init",
                        json_real(job->train.lr.warmup_init));
  if (job->train.wd.style != MT_WD_CONSTANT) {
    static const char *const styles[] = {"constant", "linear", "cosine"};
    const mt_wd_spec *wd = &job->train.wd;
    json_object_set_new(json_object_get(root, "train"), "weight_decay_schedule",
                        json_pack("{s:s, s:f, s:f}", "style", styles[wd->style], "start", wd->start,
                                  "end", wd->end));
  }
  /* only when past seq_len: the jobs from before it keep their hash */
  if (job->model.max_positions != job->model.seq_len)
    json_object_set_new(json_object_get(root, "model"), "max_positions",
                        json_integer(job->model.max_positions));
  /* only when untied: the jobs from before it keep their hash */
  if (job->model.untie_embeddings)
    json_object_set_new(json_object_get(root, "model"), "untie_embeddings", json_true());
  if (job->model.attention_backend[0]) /* only when given: other jobs keep their hash */
    json_object_set_new(json_object_get(root, "model"), "attention_backend",
                        json_string(job->model.attention_backend));
  json_t *ck = json_object_get(root, "checkpoint");
  json_object_set_new(ck, "keep_every", json_integer(job->checkpoint.keep_every));
  json_object_set_new(ck, "async", json_boolean(job->checkpoint.async_save));
  json_object_set_new(ck, "resume_step", json_integer(job->checkpoint.resume_step));
  if (job->checkpoint.load[0]) { /* only when given: other jobs keep their hashes */
    json_object_set_new(ck, "load", json_string(job->checkpoint.load));
    json_object_set_new(ck, "load_optimizer", json_boolean(job->checkpoint.load_optimizer));
  }
  /* only when not the default: the jobs from before it keep their hash */
  if (job->checkpoint.export_dtype[0] && strcmp(job->checkpoint.export_dtype, "fp32"))
    json_object_set_new(ck, "export_dtype", json_string(job->checkpoint.export_dtype));
  json_t *ev = json_pack("{s:I, s:I}", "interval", (json_int_t)job->eval.interval, "iters",
                         (json_int_t)job->eval.iters);
  /* only when off: the jobs from before it keep their hash */
  if (!job->eval.test) json_object_set_new(ev, "test", json_false());
  json_object_set_new(root, "eval", ev);
  return root;
}

/* FNV-1a, 64 bit: stable across builds and machines, which is all a job
 * identity needs (it is compared, never trusted against an adversary). */
static uint64_t fnv1a64(const char *s) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (; *s; s++) {
    h ^= (unsigned char)*s;
    h *= 0x100000001b3ull;
  }
  return h;
}

static int compute_hash(mt_job *job) {
  json_t *j = job_to_json(job);
  char *s = j ? json_dumps(j, JSON_SORT_KEYS | JSON_COMPACT) : NULL;
  json_decref(j);
  if (!s) return mt_seterr(MT_ENOMEM, "job: cannot serialize the resolved job");
  snprintf(job->hash, sizeof job->hash, "%016" PRIx64, fnv1a64(s));
  free(s);
  return MT_OK;
}

char *mt_job_to_json(const mt_job *job) {
  json_t *j = job_to_json(job);
  char *s = j ? json_dumps(j, JSON_SORT_KEYS | JSON_COMPACT) : NULL;
  json_decref(j);
  if (!s) mt_seterr(MT_ENOMEM, "job: cannot serialize the resolved job");
  return s;
}

/* ---- entry points ---- */

static int job_from_tree(mt_job *job, json_t *root, const char *base_dir,
                         const char *const *preset_dirs, const char *const *overrides) {
  problems pb = {0};
  set_defaults(job);
  if (!json_is_object(root)) {
    int rc = mt_seterr(MT_EINVAL, "job: expected a JSON object, got %s", type_name(root));
    return rc;
  }

  drop_overridden_length(root, overrides);
  for (const char *const *ov = overrides; ov && *ov; ov++) apply_override(&pb, root, *ov);
  int before = pb.n;
  merge_preset(&pb, root, preset_dirs);
  if (pb.n > before) mute(&pb, "model"); /* the fields it would give are unknown */

  check_keys(&pb, root, "", top_keys);
  read_str(&pb, root, "", "name", job->name, sizeof job->name);
  json_t *desc = json_object_get(root, "description");
  if (desc && !json_is_string(desc))
    problem(&pb, "description: expected a string, got %s", type_name(desc));

  lr_given given = {.warmup_tokens = -1, .decay_tokens = -1, .rampup_tokens = -1};
  read_model(&pb, root, &job->model);
  read_parallel(&pb, root, &job->parallel);
  read_train(&pb, root, &job->train, &given);
  read_data(&pb, root, &job->data);
  read_checkpoint(&pb, root, &job->checkpoint);
  read_eval(&pb, root, &job->eval);

  derive(&pb, job, &given);
  resolve_path(&pb, "data.path", job->data.path, base_dir, overrides);
  for (int i = 0; i < job->data.n_blend; i++) {
    char key[64];
    if (json_object_get(json_object_get(root, "data"), "prefix"))
      snprintf(key, sizeof key, "data.prefix");
    else
      snprintf(key, sizeof key, "data.blend[%d].prefix", i);
    resolve_path(&pb, key, job->data.blend[i].prefix, base_dir, overrides);
  }
  resolve_split_data(&pb, "valid", job->data.valid, job->data.n_valid, base_dir, overrides);
  resolve_split_data(&pb, "test", job->data.test, job->data.n_test, base_dir, overrides);
  resolve_path(&pb, "data.cache_dir", job->data.cache_dir, base_dir, overrides);
  resolve_path(&pb, "model.init_from", job->model.init_from, base_dir, overrides);
  resolve_path(&pb, "checkpoint.dir", job->checkpoint.dir, base_dir, overrides);
  resolve_path(&pb, "checkpoint.export", job->checkpoint.export_path, base_dir, overrides);
  resolve_path(&pb, "checkpoint.load", job->checkpoint.load, base_dir, overrides);
  resolve_path(&pb, "train.tensorboard_dir", job->train.tensorboard_dir, base_dir, overrides);

  validate(&pb, job);

  int rc = MT_OK;
  if (pb.oom)
    rc = mt_seterr(MT_ENOMEM, "job: out of memory while listing %d problems", pb.n);
  else if (pb.n)
    rc = mt_seterr(MT_EINVAL, "%s", pb.buf);
  else
    rc = compute_hash(job);
  free(pb.buf);
  return rc;
}

int mt_job_parse(mt_job *job, const char *json, const char *base_dir,
                 const char *const *preset_dirs, const char *const *overrides) {
  json_error_t jerr;
  json_t *root = json_loads(json, JSON_REJECT_DUPLICATES, &jerr);
  if (!root) {
    set_defaults(job);
    return mt_seterr(MT_EINVAL, "job: line %d, column %d: %s", jerr.line, jerr.column, jerr.text);
  }
  int rc = job_from_tree(job, root, base_dir, preset_dirs, overrides);
  json_decref(root);
  return rc;
}

int mt_job_load(mt_job *job, const char *path, const char *const *preset_dirs,
                const char *const *overrides) {
  set_defaults(job);
  FILE *f = fopen(path, "rb");
  if (!f) return mt_seterr(MT_EIO, "job: open %s: %s", path, strerror(errno));
  struct stat st;
  if (!fstat(fileno(f), &st) && S_ISDIR(st.st_mode)) { /* a pipe is fine: <(...) */
    fclose(f);
    return mt_seterr(MT_EINVAL, "job %s: a directory, not a JSON job spec", path);
  }
  /* relative paths in the file are relative to the file's directory, made
   * absolute so that nothing depends on the daemon's working directory; a
   * job that is no file in a directory (a pipe, /dev/stdin) takes them from
   * the current one, as any argument */
  char dir[MT_PATH_MAX];
  int rc = mt_file_dir(f, path, "job", dir, sizeof dir);
  if (!rc && !dir[0] && !getcwd(dir, sizeof dir))
    rc = mt_seterr(MT_EIO, "job %s: relative paths: the current directory: %s", path,
                   strerror(errno));
  if (rc) {
    fclose(f);
    return rc;
  }
  json_error_t jerr;
  json_t *root = json_loadf(f, JSON_REJECT_DUPLICATES, &jerr);
  fclose(f);
  if (!root)
    return mt_seterr(MT_EINVAL, "job %s: line %d, column %d: %s", path, jerr.line, jerr.column,
                     jerr.text);
  rc = job_from_tree(job, root, dir, preset_dirs, overrides);
  json_decref(root);
  return rc;
}

/* ---- planning ---- */

/* Every precision runs now; the plan's loader stays for what a plan can count
 * before this build can run it. */
int mt_job_load_for_plan(mt_job *job, const char *path, const char *const *preset_dirs,
                         const char *const *overrides) {
  return mt_job_load(job, path, preset_dirs, overrides);
}

void mt_job_preset_dirs(const char *extra, const char *dirs[MT_PRESET_DIRS_MAX]) {
  int n = 0;
  if (extra) dirs[n++] = extra;
  dirs[n++] = MT_SOURCE_DIR "/etc/models";
  dirs[n++] = MT_DATA_DIR "/models";
  while (n < MT_PRESET_DIRS_MAX) dirs[n++] = NULL;
}
