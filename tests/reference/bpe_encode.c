/* bpe_encode.c — runs libmtnlg's tokenizer on files so test_bpe.py can compare
 * its ids with gpt-3-encoder's under node.
 *
 *   bpe_encode VOCAB MERGES [FILE...]    GPT-2 BPE (vocab.json/encoder.json,
 *                                        merges.txt/vocab.bpe)
 *   bpe_encode --bytes [FILE...]         the byte tokenizer
 *
 * Prints one JSON line per FILE (stdin when none), in order:
 *   {"file": NAME, "ids": [...], "invalid_utf8": N, "roundtrip": true|false}
 * where roundtrip says whether decode(ids) gave back the file's bytes.
 * With --time SECONDS before the tokenizer, encodes each file again and again
 * for about that long (one buffer, so the word cache stays warm after the first
 * pass) and prints {"file", "bytes", "tokens", "first_pass_mb_per_s", "mb_per_s"}
 * instead. Exit status 0 on success, 1 on an error (message on stderr), 2 on bad
 * usage.
 */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "err.h"
#include "tokenizer.h"

static void usage(void) {
  fprintf(stderr, "usage: bpe_encode [--time SECONDS] (VOCAB MERGES | --bytes) [FILE...]\n");
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int read_all(FILE *f, char **data, size_t *len) {
  size_t cap = 1 << 16, n = 0;
  char *buf = malloc(cap);
  while (buf) {
    n += fread(buf + n, 1, cap - n, f);
    if (n < cap) break;
    cap *= 2;
    char *nb = realloc(buf, cap);
    if (!nb) free(buf);
    buf = nb;
  }
  if (!buf || ferror(f)) {
    free(buf);
    return -1;
  }
  *data = buf;
  *len = n;
  return 0;
}

/* Prints the ids of one input as a JSON line. */
static int print_ids(const mt_tokenizer *t, const char *name, const char *data, size_t len,
                     mt_tok_buf *b) {
  b->n = 0;
  b->invalid_utf8 = 0;
  if (mt_tokenizer_encode(t, data, len, b)) {
    fprintf(stderr, "bpe_encode: %s: %s\n", name, mt_errmsg());
    return -1;
  }
  char *text;
  size_t text_len;
  if (mt_tokenizer_decode(t, b->ids, b->n, &text, &text_len)) {
    fprintf(stderr, "bpe_encode: %s: decode: %s\n", name, mt_errmsg());
    return -1;
  }
  int roundtrip = text_len == len && !memcmp(text, data, len);
  free(text);
  json_t *ids = json_array();
  for (size_t i = 0; i < b->n; i++) json_array_append_new(ids, json_integer(b->ids[i]));
  json_t *line = json_pack("{s:s, s:o, s:I, s:b}", "file", name, "ids", ids, "invalid_utf8",
                           (json_int_t)b->invalid_utf8, "roundtrip", roundtrip);
  char *s = json_dumps(line, JSON_COMPACT);
  json_decref(line);
  if (!s) return -1;
  puts(s);
  free(s);
  return 0;
}

/* Encodes one input for about seconds, prints its speed as a JSON line. */
static int print_speed(const mt_tokenizer *t, const char *name, const char *data, size_t len,
                       double seconds, mt_tok_buf *b) {
  double t0 = now_s(), first = 0, elapsed;
  long passes = 0;
  do {
    b->n = 0;
    if (mt_tokenizer_encode(t, data, len, b)) {
      fprintf(stderr, "bpe_encode: %s: %s\n", name, mt_errmsg());
      return -1;
    }
    elapsed = now_s() - t0;
    if (!passes++) first = elapsed;
  } while (elapsed < seconds);
  double mb = (double)len / 1e6;
  printf("{\"file\": \"%s\", \"bytes\": %zu, \"tokens\": %zu, \"first_pass_mb_per_s\": %.2f, "
         "\"mb_per_s\": %.2f}\n",
         name, len, b->n, mb / first, mb * (double)passes / elapsed);
  return 0;
}

int main(int argc, char **argv) {
  double seconds = 0;
  int i = 1;
  if (i + 1 < argc && !strcmp(argv[i], "--time")) {
    seconds = atof(argv[i + 1]);
    i += 2;
  }
  mt_tokenizer *t = NULL;
  if (i < argc && !strcmp(argv[i], "--bytes")) {
    if (mt_tokenizer_open_bytes(&t)) goto fail;
    i++;
  } else if (i + 1 < argc) {
    if (mt_tokenizer_open_gpt2(&t, argv[i], argv[i + 1])) goto fail;
    i += 2;
  } else {
    usage();
    return 2;
  }
  int ret = 1;
  mt_tok_buf b = {0};
  for (int f = i; f < argc || (f == i && i == argc); f++) {
    const char *name = f < argc ? argv[f] : "-";
    FILE *in = f < argc ? fopen(name, "rb") : stdin;
    char *data;
    size_t len;
    if (!in || read_all(in, &data, &len)) {
      fprintf(stderr, "bpe_encode: cannot read %s\n", name);
      if (in && in != stdin) fclose(in);
      goto cleanup;
    }
    if (in != stdin) fclose(in);
    int rc = seconds > 0 ? print_speed(t, name, data, len, seconds, &b)
                         : print_ids(t, name, data, len, &b);
    free(data);
    if (rc) goto cleanup;
  }
  ret = 0;
cleanup:
  mt_tok_buf_free(&b);
  mt_tokenizer_free(t);
  return ret;
fail:
  fprintf(stderr, "bpe_encode: %s\n", mt_errmsg());
  return 1;
}
