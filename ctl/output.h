/* output.h — how mtnlgctl's verbs print: aligned tables, numbers with units,
 * compact lists, and field access on the daemon's JSON that treats a missing
 * or null field as "-" rather than an error (a newer or older daemon may lack
 * a field; a person still wants the rest).
 *
 * Sizes are decimal (1 GB = 10^9 bytes), as in `mtnlgctl plan`. It never
 * talks to a daemon: it only formats what the verbs fetched.
 */
#ifndef MT_CTL_OUTPUT_H
#define MT_CTL_OUTPUT_H

#include <jansson.h>
#include <stddef.h>
#include <stdio.h>

/* A table of text cells, printed with columns as wide as their widest cell.
 * A header starting with '>' is right-aligned (numbers); the '>' is not
 * printed. Cells are copied. */
typedef struct ctl_table ctl_table;
ctl_table *ctl_table_new(int n_cols, const char *const *headers);
/* Appends one row of n_cols cells (NULL prints "-"); 0, or -1 when out of memory. */
int ctl_table_add(ctl_table *t, const char *const *cells);
/* Prints the header and the rows, each line indented by indent spaces. */
void ctl_table_print(const ctl_table *t, FILE *f, int indent);
int ctl_table_rows(const ctl_table *t);
void ctl_table_free(ctl_table *t);

/* Field access: NULL or 0 when absent, null or of another type. */
const char *ctl_jstr(const json_t *obj, const char *key);
int ctl_jnum(const json_t *obj, const char *key, double *out); /* 1 when a number */

/* Formatting into buf (returned); "-" where there is nothing to say. */
char *ctl_fmt_bytes(char *buf, size_t cap, double bytes);   /* "12.3 GB" */
char *ctl_fmt_duration(char *buf, size_t cap, double s);    /* "45 s", "2 min 5 s", "3 h 12 min" */
char *ctl_fmt_age(char *buf, size_t cap, double unix_s);    /* duration since unix_s: "5 min" */
char *ctl_fmt_time(char *buf, size_t cap, double unix_s);   /* local "2024-05-01 14:02:03" */
char *ctl_fmt_ints(char *buf, size_t cap, const json_t *a); /* [0,1,2,3,8] -> "0-3,8" */
/* ["cpu:0","cpu:1","cpu:2"] -> "cpu:0-2"; other lists joined by ','. */
char *ctl_fmt_devices(char *buf, size_t cap, const json_t *a);
/* A rate such as TFLOP/s: two decimals, or two significant digits below
 * 0.1 ("0.0011"), so a small model's rate does not read 0.00. */
char *ctl_fmt_rate(char *buf, size_t cap, double v);
/* A status's evaluation (a pass under way): "validation after step 5:
 * batch 26 of 600, 0.3 s so far"; NULL (buf untouched) when there is none. */
char *ctl_fmt_evaluation(char *buf, size_t cap, const json_t *ev);
/* A number field with printf format fmt, or "-" when absent. */
char *ctl_fmt_field(char *buf, size_t cap, const json_t *obj, const char *key, const char *fmt);

/* Prints root as indented JSON on stdout (key order kept), a newline after;
 * CTL_EXIT_OK, or CTL_EXIT_FAILURE with a message when writing fails. */
int ctl_print_json(const json_t *root);

#endif
