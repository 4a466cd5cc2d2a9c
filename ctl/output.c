/* output.c — tables, units and compact lists for mtnlgctl's human output. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ctl.h"
#include "output.h"

struct ctl_table {
  int n_cols, n_rows, cap_rows;
  char **cells; /* (n_rows + 1, n_cols): row 0 is the header */
};

static char *dup_or_dash(const char *s) { return strdup(s && *s ? s : "-"); }

ctl_table *ctl_table_new(int n_cols, const char *const *headers) {
  ctl_table *t = calloc(1, sizeof *t);
  if (!t) return NULL;
  t->n_cols = n_cols;
  t->cap_rows = 16;
  t->cells = calloc((size_t)(t->cap_rows + 1) * (size_t)n_cols, sizeof *t->cells);
  if (!t->cells) {
    free(t);
    return NULL;
  }
  for (int c = 0; c < n_cols; c++) {
    if (!(t->cells[c] = dup_or_dash(headers[c]))) {
      ctl_table_free(t);
      return NULL;
    }
  }
  return t;
}

int ctl_table_add(ctl_table *t, const char *const *cells) {
  if (t->n_rows == t->cap_rows) {
    int cap = t->cap_rows * 2;
    char **c = realloc(t->cells, (size_t)(cap + 1) * (size_t)t->n_cols * sizeof *c);
    if (!c) return -1;
    t->cells = c;
    t->cap_rows = cap;
  }
  char **row = t->cells + (size_t)(t->n_rows + 1) * (size_t)t->n_cols;
  for (int c = 0; c < t->n_cols; c++) {
    if (!(row[c] = dup_or_dash(cells[c]))) {
      while (c-- > 0) free(row[c]);
      return -1;
    }
  }
  t->n_rows++;
  return 0;
}

int ctl_table_rows(const ctl_table *t) { return t->n_rows; }

void ctl_table_print(const ctl_table *t, FILE *f, int indent) {
  int *width = calloc((size_t)t->n_cols, sizeof *width);
  if (!width) return;
  for (int r = 0; r <= t->n_rows; r++) {
    for (int c = 0; c < t->n_cols; c++) {
      const char *s = t->cells[(size_t)r * (size_t)t->n_cols + (size_t)c];
      if (r == 0 && *s == '>') s++;
      int w = (int)strlen(s);
      if (w > width[c]) width[c] = w;
    }
  }
  for (int r = 0; r <= t->n_rows; r++) {
    fprintf(f, "%*s", indent, "");
    for (int c = 0; c < t->n_cols; c++) {
      const char *s = t->cells[(size_t)r * (size_t)t->n_cols + (size_t)c];
      const char *h = t->cells[c];
      int right = *h == '>';
      if (r == 0 && right) s++;
      int last = c == t->n_cols - 1;
      if (right)
        fprintf(f, "%*s", width[c], s);
      else if (last)
        fputs(s, f); /* no trailing spaces */
      else
        fprintf(f, "%-*s", width[c], s);
      if (!last) fputs("  ", f);
    }
    fputc('\n', f);
  }
  free(width);
}

void ctl_table_free(ctl_table *t) {
  if (!t) return;
  if (t->cells)
    for (size_t i = 0; i < (size_t)(t->n_rows + 1) * (size_t)t->n_cols; i++) free(t->cells[i]);
  free(t->cells);
  free(t);
}

const char *ctl_jstr(const json_t *obj, const char *key) {
  return json_string_value(json_object_get(obj, key));
}

int ctl_jnum(const json_t *obj, const char *key, double *out) {
  const json_t *v = json_object_get(obj, key);
  if (!json_is_number(v)) return 0;
  *out = json_number_value(v);
  return 1;
}

char *ctl_fmt_bytes(char *buf, size_t cap, double bytes) {
  static const char *units[] = {"B", "KB", "MB", "GB", "TB", "PB"};
  int u = 0;
  if (!isfinite(bytes) || bytes < 0) {
    snprintf(buf, cap, "-");
    return buf;
  }
  while (bytes >= 1000 && u < 5) {
    bytes /= 1000;
    u++;
  }
  if (u == 0)
    snprintf(buf, cap, "%.0f B", bytes);
  else
    snprintf(buf, cap, "%.*f %s", bytes < 10 ? 2 : bytes < 100 ? 1 : 0, bytes, units[u]);
  return buf;
}

char *ctl_fmt_duration(char *buf, size_t cap, double s) {
  if (!isfinite(s) || s < 0) {
    snprintf(buf, cap, "-");
  } else if (s < 10) {
    snprintf(buf, cap, "%.1f s", s);
  } else if (s < 60) {
    snprintf(buf, cap, "%.0f s", s);
  } else if (s < 3600) {
    long v = lround(s);
    snprintf(buf, cap, "%ld min %ld s", v / 60, v % 60);
  } else if (s < 86400) {
    long v = lround(s / 60);
    snprintf(buf, cap, "%ld h %ld min", v / 60, v % 60);
  } else {
    long v = lround(s / 3600);
    snprintf(buf, cap, "%ld d %ld h", v / 24, v % 24);
  }
  return buf;
}

char *ctl_fmt_evaluation(char *buf, size_t cap, const json_t *ev) {
  double done, total, after, secs;
  if (!json_is_object(ev) || !ctl_jnum(ev, "batches_done", &done) ||
      !ctl_jnum(ev, "batches", &total) || !ctl_jnum(ev, "after_step", &after))
    return NULL;
  const char *split = ctl_jstr(ev, "split");
  int test = split && !strcmp(split, "test");
  int end = json_is_true(json_object_get(ev, "end_of_training"));
  int len = snprintf(buf, cap, "%s%s after step %.0f: batch %.0f of %.0f",
                     test ? "the test pass" : "validation",
                     end && !test ? " at the end of training" : "", after, done, total);
  char d[32];
  if (len > 0 && (size_t)len < cap && ctl_jnum(ev, "elapsed_s", &secs))
    snprintf(buf + len, cap - (size_t)len, ", %s so far", ctl_fmt_duration(d, sizeof d, secs));
  return buf;
}

char *ctl_fmt_age(char *buf, size_t cap, double unix_s) {
  struct timespec now;
  clock_gettime(CLOCK_REALTIME, &now);
  double age = (double)now.tv_sec + now.tv_nsec / 1e9 - unix_s;
  if (!isfinite(unix_s) || unix_s <= 0) return ctl_fmt_duration(buf, cap, -1);
  return ctl_fmt_duration(buf, cap, age < 0 ? 0 : age); /* clocks of two hosts may differ */
}

char *ctl_fmt_time(char *buf, size_t cap, double unix_s) {
  struct tm tm;
  time_t t = (time_t)unix_s;
  if (!isfinite(unix_s) || unix_s <= 0 || !localtime_r(&t, &tm) ||
      !strftime(buf, cap, "%Y-%m-%d %H:%M:%S", &tm))
    snprintf(buf, cap, "-");
  return buf;
}

/* Appends "a" or "a-b" (with a leading ',' after the first) to buf at *len. */
static void append_run(char *buf, size_t cap, size_t *len, const char *prefix, int64_t a,
                       int64_t b) {
  if (*len >= cap) return;
  int n;
  if (a == b)
    n = snprintf(buf + *len, cap - *len, "%s%s%lld", *len ? "," : "", prefix, (long long)a);
  else
    n = snprintf(buf + *len, cap - *len, "%s%s%lld-%lld", *len ? "," : "", prefix, (long long)a,
                 (long long)b);
  *len += n > 0 ? (size_t)n : 0;
  if (*len >= cap) *len = cap - 1;
}

char *ctl_fmt_ints(char *buf, size_t cap, const json_t *a) {
  size_t len = 0, n = json_array_size(a);
  buf[0] = '\0';
  for (size_t i = 0; i < n;) {
    if (!json_is_integer(json_array_get(a, i))) {
      i++;
      continue;
    }
    int64_t lo = json_integer_value(json_array_get(a, i)), hi = lo;
    size_t j = i + 1;
    while (j < n && json_is_integer(json_array_get(a, j)) &&
           json_integer_value(json_array_get(a, j)) == hi + 1)
      hi++, j++;
    if (hi == lo + 1) { /* two in a row read better as "0,1" than "0-1" */
      append_run(buf, cap, &len, "", lo, lo);
      append_run(buf, cap, &len, "", hi, hi);
    } else {
      append_run(buf, cap, &len, "", lo, hi);
    }
    i = j;
  }
  if (!len) snprintf(buf, cap, "-");
  return buf;
}

/* "cpu:12" -> prefix "cpu:", index 12; 0 when the name has no numeric tail. */
static int split_device(const char *name, size_t *prefix_len, int64_t *index) {
  size_t n = strlen(name), i = n;
  while (i > 0 && name[i - 1] >= '0' && name[i - 1] <= '9') i--;
  if (i == n || i == 0 || n - i > 9) return 0;
  *prefix_len = i;
  *index = strtoll(name + i, NULL, 10);
  return 1;
}

char *ctl_fmt_devices(char *buf, size_t cap, const json_t *a) {
  size_t len = 0, n = json_array_size(a);
  buf[0] = '\0';
  for (size_t i = 0; i < n;) {
    const char *name = json_string_value(json_array_get(a, i));
    size_t plen;
    int64_t lo;
    if (!name) {
      i++;
      continue;
    }
    if (!split_device(name, &plen, &lo)) {
      int k = snprintf(buf + len, cap - len, "%s%s", len ? "," : "", name);
      len += k > 0 ? (size_t)k : 0;
      if (len >= cap) len = cap - 1;
      i++;
      continue;
    }
    /* extend the run while the next name has the same prefix and index + 1 */
    int64_t hi = lo;
    size_t j = i + 1;
    for (; j < n; j++) {
      const char *next = json_string_value(json_array_get(a, j));
      size_t nlen;
      int64_t idx;
      if (!next || !split_device(next, &nlen, &idx) || nlen != plen || strncmp(next, name, plen) ||
          idx != hi + 1)
        break;
      hi = idx;
    }
    char prefix[64];
    snprintf(prefix, sizeof prefix, "%.*s", (int)(plen < 63 ? plen : 63), name);
    append_run(buf, cap, &len, prefix, lo, hi);
    i = j;
  }
  if (!len) snprintf(buf, cap, "-");
  return buf;
}

char *ctl_fmt_rate(char *buf, size_t cap, double v) {
  snprintf(buf, cap, v == 0 || fabs(v) >= 0.1 ? "%.2f" : "%.2g", v);
  return buf;
}

char *ctl_fmt_field(char *buf, size_t cap, const json_t *obj, const char *key, const char *fmt) {
  double v;
  if (ctl_jnum(obj, key, &v))
    snprintf(buf, cap, fmt, v);
  else
    snprintf(buf, cap, "-");
  return buf;
}

int ctl_print_json(const json_t *root) {
  if (json_dumpf(root, stdout, JSON_INDENT(2) | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(17)) ||
      putchar('\n') == EOF || fflush(stdout)) {
    fprintf(stderr, "mtnlgctl: writing the JSON output failed\n");
    return CTL_EXIT_FAILURE;
  }
  return CTL_EXIT_OK;
}
