/* mtnlg-eval — a trained model used: text generation and zero-shot
 * evaluation, as Megatron's tools/run_text_generation_server.py and
 * tasks/main.py (LAMBADA, WikiText perplexity) are used, offline on one
 * device. The model is an export (--export, `mtnlgctl ckpt export`, or a
 * Hugging Face GPT-2 with its config.json).
 */
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "blas.h"
#include "ckpt.h"
#include "ckpt_export.h"
#include "device.h"
#include "err.h"
#include "infer.h"
#include "log.h"
#include "safetensors.h"
#include "threads.h"
#include "tokenizer.h"

static const char usage_text[] =
    "usage: mtnlg-eval generate MODEL --prompt TEXT [--tokens N] [--temperature T]\n"
    "                  [--top-k K] [--top-p P] [--seed S] [--no-cache] [options]\n"
    "       mtnlg-eval lambada MODEL FILE.jsonl [options]\n"
    "       mtnlg-eval perplexity MODEL FILE.txt [options]\n"
    "\n"
    "MODEL: a safetensors file, a Hugging Face sharded directory or its\n"
    "model.safetensors.index.json (an export of mtnlgd or `mtnlgctl ckpt export`, or\n"
    "Hugging Face GPT-2 with config.json beside it), or a checkpoint (a step directory,\n"
    "or a job's directory: the one a resume would load), its master weights exported\n"
    "under $TMPDIR first and removed after. Runs on one device, fp32.\n"
    "\n"
    "generate    continues the prompt by --tokens tokens (default 64), stopping early at\n"
    "            the end-of-document token: greedy with --temperature 0, else sampled from\n"
    "            softmax(logits / T) (default 1) cut to the top K (0: all, the default)\n"
    "            and to the nucleus of probability P (default 1: all), seeded by --seed\n"
    "            (default 1; the same seed, the same text). Each token after the prompt runs\n"
    "            only its own position, reading the earlier ones' keys and values from a\n"
    "            cache, while the text fits the model's context (--no-cache: a whole\n"
    "            forward pass over the context for every token, the same tokens).\n"
    "lambada     LAMBADA's zero-shot accuracy as Megatron's --strict-lambada counts it:\n"
    "            each line's JSON \"text\", its last word predicted from the words\n"
    "            before it, right when the greedy choice gets every token of the word;\n"
    "            also the perplexity of those tokens.\n"
    "perplexity  the file as one document, in windows of the model's context that do not\n"
    "            overlap (Megatron's WikiText evaluation without --overlapping-eval):\n"
    "            the tokens' perplexity.\n"
    "\n"
    "options:\n"
    "  --tokenizer gpt2|bytes   GPT-2 byte-level BPE, or raw bytes (ids 0..255); default\n"
    "                           bytes for a model of at most 257 tokens, else gpt2\n"
    "  --vocab FILE             GPT-2 vocab.json or encoder.json (gpt2)\n"
    "  --merges FILE            GPT-2 merges.txt or vocab.bpe (gpt2)\n"
    "  --device SPEC            cpu:0 (default) or cuda:N; opened before any work, so\n"
    "                           one that cannot run is refused (2) before an export\n"
    "  --batch N                sequences a forward pass (lambada, perplexity; default 8)\n"
    "  --no-cache               generate: no key-value cache, a whole forward per token\n"
    "  -o json                  one JSON object on standard output\n";

typedef struct {
  const char *task, *model, *file, *prompt, *tokenizer, *vocab, *merges, *device;
  int tokens, top_k, batch, json, no_cache;
  double temperature, top_p;
  unsigned long long seed;
} options;

static int fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int fail(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fputs("mtnlg-eval: ", stderr);
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  va_end(ap);
  return 2;
}

static int parse_long(const char *s, long lo, long hi, long *out) {
  char *end;
  errno = 0;
  long v = strtol(s, &end, 10);
  if (errno || *end || end == s || v < lo || v > hi) return -1;
  *out = v;
  return 0;
}

static int parse_double(const char *s, double lo, double hi, double *out) {
  char *end;
  errno = 0;
  double v = strtod(s, &end);
  if (errno || *end || end == s || !(v >= lo && v <= hi)) return -1;
  *out = v;
  return 0;
}

/* 0, 1 (help printed) or 2 (message printed). */
static int parse_args(int argc, char **argv, options *o) {
  *o = (options){
      .tokens = 64, .batch = 8, .temperature = 1.0, .top_p = 1.0, .seed = 1, .device = "cpu:0"};
  const char *pos[3] = {0};
  int n_pos = 0;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
      fputs(usage_text, stdout);
      return 1;
    }
    if (!strcmp(a, "--no-cache")) {
      o->no_cache = 1;
      continue;
    }
    if (a[0] != '-' || !a[1]) {
      if (n_pos == 3) return fail("unexpected argument '%s' (see --help)", a);
      pos[n_pos++] = a;
      continue;
    }
    static const char *const valued[] = {"--prompt", "--tokens", "--temperature", "--top-k",
                                         "--top-p",  "--seed",   "--tokenizer",   "--vocab",
                                         "--merges", "--device", "--batch",       "-o"};
    size_t k = 0, nv = sizeof valued / sizeof valued[0];
    const char *val = NULL;
    for (; k < nv; k++) {
      size_t l = strlen(valued[k]);
      if (!strncmp(a, valued[k], l) && (a[l] == 0 || a[l] == '=')) {
        val = a[l] == '=' ? a + l + 1 : (i + 1 < argc ? argv[++i] : NULL);
        break;
      }
    }
    if (k == nv) return fail("unknown option '%s' (see --help)", a);
    if (!val) return fail("%s needs a value", valued[k]);
    long n;
    double d;
    switch (k) {
    case 0: o->prompt = val; break;
    case 1:
      if (parse_long(val, 0, 1 << 20, &n)) return fail("--tokens %s: expected 0 to 1048576", val);
      o->tokens = (int)n;
      break;
    case 2:
      if (parse_double(val, 0.0, 100.0, &d))
        return fail("--temperature %s: expected a number from 0 to 100", val);
      o->temperature = d;
      break;
    case 3:
      if (parse_long(val, 0, 1 << 30, &n)) return fail("--top-k %s: expected 0 or more", val);
      o->top_k = (int)n;
      break;
    case 4:
      if (parse_double(val, 0.0, 1.0, &d) || d == 0.0)
        return fail("--top-p %s: expected a probability in (0, 1]", val);
      o->top_p = d;
      break;
    case 5: {
      char *end;
      errno = 0;
      o->seed = strtoull(val, &end, 10);
      if (errno || *end || end == val || val[0] == '-')
        return fail("--seed %s: expected a non-negative integer", val);
      break;
    }
    case 6:
      if (strcmp(val, "gpt2") && strcmp(val, "bytes"))
        return fail("--tokenizer %s: expected gpt2 or bytes", val);
      o->tokenizer = val;
      break;
    case 7: o->vocab = val; break;
    case 8: o->merges = val; break;
    case 9: o->device = val; break;
    case 10:
      if (parse_long(val, 1, 4096, &n)) return fail("--batch %s: expected 1 to 4096", val);
      o->batch = (int)n;
      break;
    case 11:
      if (strcmp(val, "json") && strcmp(val, "text"))
        return fail("-o %s: expected json or text", val);
      o->json = !strcmp(val, "json");
      break;
    }
  }
  if (n_pos < 2) return fail("a task and a model are needed (see --help)");
  o->task = pos[0], o->model = pos[1], o->file = pos[2];
  int gen = !strcmp(o->task, "generate");
  if (!gen && strcmp(o->task, "lambada") && strcmp(o->task, "perplexity"))
    return fail("unknown task '%s': generate, lambada or perplexity", o->task);
  if (gen && o->file)
    return fail("generate takes a model and --prompt TEXT, no file (%s given)", o->file);
  if (gen && !o->prompt) return fail("generate needs --prompt TEXT: the text to continue");
  if (!gen && !o->file) return fail("%s needs a file to evaluate on", o->task);
  if (!gen && o->prompt) return fail("--prompt is for generate");
  if (!gen && o->no_cache) return fail("--no-cache is for generate");
  return 0;
}

static int open_tokenizer(const options *o, int vocab, mt_tokenizer **tok) {
  const char *kind = o->tokenizer ? o->tokenizer : vocab <= 257 ? "bytes" : "gpt2";
  if (!strcmp(kind, "bytes")) return mt_tokenizer_open_bytes(tok);
  if (!o->vocab || !o->merges)
    return mt_seterr(MT_EINVAL,
                     "the model has %d tokens: GPT-2's tokenizer needs --vocab (vocab.json or "
                     "encoder.json) and --merges (merges.txt or vocab.bpe)",
                     vocab);
  return mt_tokenizer_open_gpt2(tok, o->vocab, o->merges);
}

static int encode(const mt_tokenizer *tok, const char *text, size_t len, mt_tok_buf *b) {
  b->n = 0;
  return mt_tokenizer_encode(tok, text, len, b);
}

/* Whether every id of b is one of the model's vocab tokens. */
static int in_vocabulary(const mt_tok_buf *b, int vocab) {
  for (size_t i = 0; i < b->n; i++)
    if (b->ids[i] < 0 || b->ids[i] >= vocab)
      return mt_seterr(MT_EINVAL,
                       "token %d is outside the model's vocabulary of %d: is the tokenizer the "
                       "model's?",
                       b->ids[i], vocab);
  return 0;
}

/* A whole file, NUL-terminated; NULL with the error set. */
static char *read_all(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  if (!f) {
    mt_seterr(MT_EIO, "%s: %s", path, strerror(errno));
    return NULL;
  }
  size_t cap = 1 << 16, n = 0;
  char *buf = malloc(cap);
  int oom = !buf;
  while (buf) {
    if (n + 1 >= cap) {
      char *more = cap > SIZE_MAX / 2 ? NULL : realloc(buf, cap * 2);
      if (!more) {
        oom = 1;
        break;
      }
      buf = more;
      cap *= 2;
    }
    size_t got = fread(buf + n, 1, cap - n - 1, f);
    n += got;
    if (!got) break;
  }
  int err = ferror(f);
  fclose(f);
  if (oom || err) {
    free(buf);
    mt_seterr(err ? MT_EIO : MT_ENOMEM, "%s: %s", path, err ? "read error" : "out of memory");
    return NULL;
  }
  buf[n] = 0;
  *len = n;
  return buf;
}

/* text[0, len) with each ill-formed UTF-8 subsequence replaced by one
 * U+FFFD, as Unicode recommends ("maximal subparts": a lead byte and the
 * continuation bytes it validly took before the sequence broke), which is
 * what Python's and browsers' decoders do (JSON must be UTF-8; a byte-level
 * tokenizer's text need not be); malloc'd, NULL when out of memory. */
static char *valid_utf8(const char *text, size_t len, size_t *out_len) {
  char *out = malloc(3 * len + 1);
  size_t n = 0;
  if (!out) return NULL;
  for (size_t i = 0; i < len;) {
    const unsigned char *u = (const unsigned char *)text + i;
    size_t k = u[0] < 0x80                    ? 1
               : u[0] >= 0xc2 && u[0] <= 0xdf ? 2
               : u[0] >= 0xe0 && u[0] <= 0xef ? 3
               : u[0] >= 0xf0 && u[0] <= 0xf4 ? 4
                                              : 0;
    size_t ok = k ? 1 : 0; /* bytes of the sequence that are valid so far */
    while (ok && ok < k && i + ok < len) {
      unsigned char lo = 0x80, hi = 0xbf, b = u[ok];
      if (ok == 1) { /* the second byte's range excludes overlongs, surrogates, > U+10FFFF */
        if (u[0] == 0xe0) lo = 0xa0;
        if (u[0] == 0xed) hi = 0x9f;
        if (u[0] == 0xf0) lo = 0x90;
        if (u[0] == 0xf4) hi = 0x8f;
      }
      if (b < lo || b > hi) break;
      ok++;
    }
    if (k && ok == k) {
      memcpy(out + n, u, k);
      n += k;
      i += k;
    } else {
      memcpy(out + n, "\xef\xbf\xbd", 3);
      n += 3;
      i += ok ? ok : 1;
    }
  }
  out[n] = 0;
  *out_len = n;
  return out;
}

/* prompt: o->prompt's tokens, encoded once by main to size the window */
static int generate(const options *o, mt_infer *inf, const mt_tokenizer *tok,
                    const mt_tok_buf *prompt) {
  const mt_gpt_config *c = mt_infer_config(inf);
  int rc = 0;
  if (!prompt->n) rc = mt_seterr(MT_EINVAL, "the prompt has no tokens");
  size_t prompt_n = prompt->n;
  int32_t *ids = rc ? NULL : malloc((prompt_n + (size_t)o->tokens) * sizeof *ids);
  float *logits = rc ? NULL : malloc((size_t)c->vocab_size * sizeof *logits);
  if (!rc && (!ids || !logits)) rc = mt_seterr(MT_ENOMEM, "generate: %d tokens", o->tokens);
  if (!rc) memcpy(ids, prompt->ids, prompt_n * sizeof *ids);
  mt_sampling s = {.temperature = o->temperature, .top_k = o->top_k, .top_p = o->top_p};
  /* a model's padded rows past the tokenizer's ids are never drawn: they
   * have no text */
  int vocab =
      c->vocab_size < mt_tokenizer_vocab_size(tok) ? c->vocab_size : mt_tokenizer_vocab_size(tok);
  uint64_t rng[2];
  mt_sample_seed(rng, o->seed);
  size_t n = prompt_n;
  int32_t eod = mt_tokenizer_eod(tok);
  int stopped = 0;
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  while (!rc && n < prompt_n + (size_t)o->tokens && !stopped) {
    if (!(rc = mt_infer_next(inf, ids, n, logits))) {
      int32_t next = mt_sample(logits, vocab, &s, rng);
      if (next < 0) {
        rc = next;
        break;
      }
      ids[n] = next;
      stopped = next == eod;
      n += !stopped;
    }
  }
  clock_gettime(CLOCK_MONOTONIC, &t1);
  double secs = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) * 1e-9;
  char *text = NULL;
  size_t len = 0;
  if (!rc) rc = mt_tokenizer_decode(tok, ids + prompt_n, n - prompt_n, &text, &len);
  if (!rc && o->json) {
    size_t pl, tl;
    char *p8 = valid_utf8(o->prompt, strlen(o->prompt), &pl), *t8 = valid_utf8(text, len, &tl);
    json_t *toks = json_array(), *out = NULL;
    for (size_t i = prompt_n; toks && i < n; i++) json_array_append_new(toks, json_integer(ids[i]));
    if (p8 && t8) /* "o" takes toks, also when the pack fails */
      out = json_pack("{s:s%, s:s%, s:o, s:I, s:b, s:f}", "prompt", p8, pl, "text", t8, tl,
                      "tokens", toks, "prompt_tokens", (json_int_t)prompt_n, "stopped_at_eod",
                      stopped, "seconds", secs);
    else
      json_decref(toks);
    char *dump = out ? json_dumps(out, JSON_COMPACT) : NULL;
    if (dump)
      puts(dump);
    else
      rc = mt_seterr(MT_ENOMEM, "generate: the JSON of %zu tokens", n - prompt_n);
    free(dump);
    free(p8);
    free(t8);
    json_decref(out);
  } else if (!rc) {
    fputs(o->prompt, stdout);
    fwrite(text, 1, len, stdout);
    fputc('\n', stdout);
    fprintf(stderr, "mtnlg-eval: %zu tokens in %.2f s%s\n", n - prompt_n, secs,
            stopped ? ", stopped at the end-of-document token" : "");
  }
  free(text);
  free(ids);
  free(logits);
  return rc;
}

/* LAMBADA: each line's "text", its last word the target (Megatron's
 * strict rule: the context is the text before the word, stripped, and the
 * word is tokenized with a space before it). */
static int lambada(const options *o, mt_infer *inf, const mt_tokenizer *tok) {
  size_t len;
  char *all = read_all(o->file, &len);
  if (!all) return MT_EIO;
  int T = mt_infer_seq(inf), rc = 0, lineno = 0, batch = o->batch;
  int V = mt_infer_config(inf)->vocab_size;
  mt_tok_buf ctx = {0}, word = {0};
  mt_infer_row *rows = calloc((size_t)batch, sizeof *rows);
  int32_t *seqs = malloc((size_t)batch * ((size_t)T + 1) * sizeof *seqs);
  long examples = 0, right = 0, target_tokens = 0, hits = 0;
  double nll = 0.0;
  int n_rows = 0;
  if (!rows || !seqs) rc = mt_seterr(MT_ENOMEM, "lambada: a batch of %d", batch);
  char *line = all, *end = all + len;
  while (!rc && line < end) {
    char *nl = memchr(line, '\n', (size_t)(end - line));
    size_t ll = nl ? (size_t)(nl - line) : (size_t)(end - line);
    lineno++;
    char *next = nl ? nl + 1 : end;
    int blank = 1;
    for (size_t i = 0; i < ll; i++) blank &= line[i] == ' ' || line[i] == '\t' || line[i] == '\r';
    if (!blank) {
      json_error_t jerr;
      json_t *j = json_loadb(line, ll, 0, &jerr);
      const char *text = json_string_value(json_object_get(j, "text"));
      if (!text) {
        rc = mt_seterr(MT_EINVAL, "%s:%d: %s", o->file, lineno,
                       j ? "no string \"text\"" : jerr.text);
        json_decref(j);
        break;
      }
      /* the last word: after the last run of spaces */
      size_t tl = strlen(text);
      while (tl && strchr(" \t\r\n", text[tl - 1])) tl--;
      size_t ws = tl;
      while (ws && !strchr(" \t\r\n", text[ws - 1])) ws--;
      size_t ce = ws;
      while (ce && strchr(" \t\r\n", text[ce - 1])) ce--;
      if (!ws || !ce) {
        rc = mt_seterr(MT_EINVAL, "%s:%d: \"text\" needs words before its last one", o->file,
                       lineno);
        json_decref(j);
        break;
      }
      char *w = malloc(tl - ws + 2);
      if (!w) rc = mt_seterr(MT_ENOMEM, "lambada");
      if (!rc) {
        w[0] = ' ';
        memcpy(w + 1, text + ws, tl - ws);
        w[tl - ws + 1] = 0;
        size_t start = 0;
        while (start < ce && strchr(" \t\r\n", text[start])) start++;
        rc = encode(tok, text + start, ce - start, &ctx);
        if (!rc) rc = encode(tok, w, tl - ws + 1, &word);
        if (!rc && !(rc = in_vocabulary(&ctx, V))) rc = in_vocabulary(&word, V);
        if (rc) mt_wraperr(rc, "%s:%d", o->file, lineno);
      }
      free(w);
      json_decref(j);
      if (!rc && (word.n > (size_t)T || !ctx.n))
        rc = mt_seterr(MT_EINVAL, "%s:%d: the last word has %zu tokens; the model sees %d", o->file,
                       lineno, word.n, T);
      if (rc) break;
      /* the context's end when context and word pass the model's length */
      size_t keep = ctx.n + word.n > (size_t)T + 1 ? (size_t)T + 1 - word.n : ctx.n;
      int32_t *s = seqs + (size_t)n_rows * ((size_t)T + 1);
      memcpy(s, ctx.ids + (ctx.n - keep), keep * sizeof *s);
      memcpy(s + keep, word.ids, word.n * sizeof *s);
      rows[n_rows++] = (mt_infer_row){.tokens = s, .n = keep + word.n, .first = keep, .greedy = 1};
      examples++;
      target_tokens += (long)word.n;
    }
    line = next;
    if (!rc && n_rows && (n_rows == batch || line >= end)) {
      rc = mt_infer_score(inf, rows, n_rows);
      for (int r = 0; !rc && r < n_rows; r++) {
        nll += rows[r].nll;
        hits += rows[r].hits;
        right += (size_t)rows[r].hits == rows[r].n - rows[r].first;
      }
      n_rows = 0;
    }
  }
  if (!rc && !examples) rc = mt_seterr(MT_EINVAL, "%s: no examples", o->file);
  if (!rc) {
    double acc = (double)right / (double)examples, ppl = exp(nll / (double)target_tokens);
    if (o->json)
      printf("{\"task\":\"lambada\",\"examples\":%ld,\"right\":%ld,\"accuracy\":%.17g,"
             "\"target_tokens\":%ld,\"target_hits\":%ld,\"nll\":%.17g,\"perplexity\":%.17g}\n",
             examples, right, acc, target_tokens, hits, nll, ppl);
    else
      printf("lambada: %ld examples, accuracy %.4f (%ld right); the last words' %ld tokens: "
             "%ld right, perplexity %.4f\n",
             examples, acc, right, target_tokens, hits, ppl);
  }
  free(rows);
  free(seqs);
  free(all);
  mt_tok_buf_free(&ctx);
  mt_tok_buf_free(&word);
  return rc;
}

/* The file as one document in windows of T + 1 tokens, T apart: every
 * token but the first of each window predicted. */
static int perplexity(const options *o, mt_infer *inf, const mt_tokenizer *tok) {
  size_t len;
  char *all = read_all(o->file, &len);
  if (!all) return MT_EIO;
  mt_tok_buf b = {0};
  int rc = encode(tok, all, len, &b);
  if (!rc && (rc = in_vocabulary(&b, mt_infer_config(inf)->vocab_size)))
    mt_wraperr(rc, "%s", o->file);
  /* Megatron's adjusted perplexity counts the text's "original tokens" as
   * len(text.strip().split(" ")): the pieces between single spaces of the
   * text without its leading and trailing whitespace */
  size_t a0 = 0, a1 = len;
  while (a0 < a1 && isspace((unsigned char)all[a0])) a0++;
  while (a1 > a0 && isspace((unsigned char)all[a1 - 1])) a1--;
  long words = 1;
  for (size_t i = a0; i < a1; i++) words += all[i] == ' ';
  free(all);
  size_t T = (size_t)mt_infer_seq(inf), n_win = b.n > 1 ? (b.n - 2) / T + 1 : 0;
  if (!rc && !n_win) rc = mt_seterr(MT_EINVAL, "%s: fewer than 2 tokens", o->file);
  mt_infer_row *rows = rc ? NULL : calloc(n_win, sizeof *rows);
  if (!rc && !rows) rc = mt_seterr(MT_ENOMEM, "perplexity: %zu windows", n_win);
  for (size_t w = 0; !rc && w < n_win; w++) {
    size_t a = w * T, e = a + T + 1 < b.n ? a + T + 1 : b.n;
    rows[w] = (mt_infer_row){.tokens = b.ids + a, .n = e - a, .first = 1};
  }
  double nll = 0.0;
  long scored = 0;
  for (size_t w = 0; !rc && w < n_win; w += (size_t)o->batch) {
    int nb = (int)(n_win - w < (size_t)o->batch ? n_win - w : (size_t)o->batch);
    rc = mt_infer_score(inf, rows + w, nb);
    for (int r = 0; !rc && r < nb; r++) {
      nll += rows[w + r].nll;
      scored += (long)(rows[w + r].n - 1);
    }
  }
  if (!rc) {
    /* its exp(loss x (tokens - 1) / (words - 1)): nll over words - 1 */
    double ppl = exp(nll / (double)scored),
           word_ppl = exp(nll / (double)(words > 1 ? words - 1 : 1));
    if (o->json)
      printf("{\"task\":\"perplexity\",\"tokens\":%ld,\"windows\":%zu,\"nll\":%.17g,"
             "\"perplexity\":%.17g,\"words\":%ld,\"word_perplexity\":%.17g}\n",
             scored, n_win, nll, ppl, words, word_ppl);
    else
      printf("perplexity: %.4f over %ld tokens in %zu windows of %zu; per word (Megatron's "
             "adjusted, %ld words): %.4f\n",
             ppl, scored, n_win, T, words, word_ppl);
  }
  free(rows);
  mt_tok_buf_free(&b);
  return rc;
}

/* Whether path is a checkpoint: a step directory (manifest.json) or a
 * job's directory (latest). */
static int is_checkpoint(const char *path) {
  char p[4096];
  struct stat st;
  snprintf(p, sizeof p, "%s/manifest.json", path);
  if (!stat(p, &st)) return 1;
  snprintf(p, sizeof p, "%s/latest", path);
  return !stat(p, &st);
}

/* The checkpoint's temporary export, removed on the way out, also when a
 * signal ends the run, the export's own temporary file included: the
 * directory is read with getdents64 and emptied with unlinkat, both system
 * calls, async-signal-safe as opendir (which allocates) is not. */
static char tmp_dir[4096], tmp_file[4200];
static int tmp_fd = -1;

static void remove_tmp(void) {
  static char buf[4096];
  long n;
  if (tmp_fd >= 0) {
    while ((n = syscall(SYS_getdents64, tmp_fd, buf, sizeof buf)) > 0)
      for (long off = 0; off < n;) {
        struct linux_dirent64 {
          uint64_t ino;
          int64_t off;
          unsigned short reclen;
          unsigned char type;
          char name[];
        } *d = (void *)(buf + off);
        if (strcmp(d->name, ".") && strcmp(d->name, "..")) unlinkat(tmp_fd, d->name, 0);
        off += d->reclen;
      }
    close(tmp_fd);
    tmp_fd = -1;
  }
  if (tmp_dir[0]) rmdir(tmp_dir);
}

static void on_signal(int sig) {
  remove_tmp();
  signal(sig, SIG_DFL);
  raise(sig);
}

/* remove_tmp on the way out, the signals held so a handler does not run
 * in the middle of it (they share the directory's descriptor). */
static void remove_tmp_at_exit(void) {
  sigset_t hold, old;
  sigemptyset(&hold);
  sigaddset(&hold, SIGINT);
  sigaddset(&hold, SIGTERM);
  sigaddset(&hold, SIGHUP);
  sigprocmask(SIG_BLOCK, &hold, &old);
  remove_tmp();
  sigprocmask(SIG_SETMASK, &old, NULL);
}

/* A checkpoint's master weights exported (as `mtnlgctl ckpt export` does,
 * every checksum checked) to tmp_file, <tmp_dir>/model.safetensors, tmp_dir
 * a new directory under $TMPDIR: remove_tmp removes both, also on SIGINT,
 * SIGTERM or SIGHUP. */
static int export_checkpoint(const char *path) {
  const char *base = getenv("TMPDIR") && *getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
  char dir[sizeof tmp_dir];
  snprintf(dir, sizeof dir, "%s/mtnlg-eval-XXXXXX", base);
  if (!mkdtemp(dir))
    return mt_seterr(MT_EIO, "a directory under %s for the checkpoint's weights: %s", base,
                     strerror(errno));
  struct sigaction sa = {.sa_handler = on_signal};
  sigemptyset(&sa.sa_mask);
  snprintf(tmp_file, sizeof tmp_file, "%s/model.safetensors", dir);
  memcpy(tmp_dir, dir, sizeof tmp_dir); /* before the handlers: they read both */
  if ((tmp_fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)) < 0)
    return mt_seterr(MT_EIO, "open %s: %s", dir, strerror(errno));
  /* a signal the caller ignores (nohup's SIGHUP) stays ignored */
  const int sigs[] = {SIGINT, SIGTERM, SIGHUP};
  for (size_t i = 0; i < sizeof sigs / sizeof sigs[0]; i++) {
    struct sigaction was;
    if (!sigaction(sigs[i], NULL, &was) && was.sa_handler != SIG_IGN) sigaction(sigs[i], &sa, NULL);
  }
  const char *file = tmp_file;
  mt_ckpt c;
  mt_log_set_level(MT_LOG_WARN); /* a resume's notes on passed-over checkpoints stay */
  int rc = mt_ckpt_open_path(path, MT_CKPT_VERIFY_CHECKSUMS, &c);
  if (rc) return rc;
  if (!(rc = mt_ckpt_export(&c, file, MT_ST_FP32)))
    fprintf(stderr, "mtnlg-eval: %s: step %lld's weights (tp %d x pp %d) exported to %s\n", path,
            (long long)c.step, c.tp, c.pp, file);
  mt_ckpt_close(&c);
  return rc;
}

/* --device opened and closed before any work: a checkpoint's export comes
 * first and takes minutes at 530B, and a device that cannot run (a typo, a
 * GPU this machine or build lacks) was refused only after it. 0 or 2. */
static int check_device(const char *spec) {
  mt_device d;
  if (mt_device_open(&d, spec)) {
    fprintf(stderr, "mtnlg-eval: --device %s: %s\n", spec, mt_errmsg());
    return 2;
  }
  mt_device_close(&d);
  return 0;
}

int main(int argc, char **argv) {
  options o;
  int rc = parse_args(argc, argv, &o);
  if (rc) return rc == 1 ? 0 : 2;
  if ((rc = check_device(o.device))) return rc;
  int gen = !strcmp(o.task, "generate");
  mt_infer *inf = NULL;
  mt_tokenizer *tok = NULL;
  mt_gpt_config cfg;
  const char *given = o.model;
  if (is_checkpoint(o.model) && !(rc = export_checkpoint(o.model))) o.model = tmp_file;
  if (!rc) rc = mt_gpt_config_of_file(o.model, &cfg);
  if (!rc) rc = open_tokenizer(&o, cfg.vocab_size, &tok);
  /* generation plans its forward for the prompt and the new tokens alone */
  int seq = 0;
  mt_tok_buf prompt = {0};
  if (!rc && gen) {
    rc = encode(tok, o.prompt, strlen(o.prompt), &prompt);
    size_t want = prompt.n + (size_t)o.tokens;
    seq = want < (size_t)cfg.max_seq ? (int)(want ? want : 1) : cfg.max_seq;
  }
  if (!rc) rc = mt_infer_open(&inf, o.model, &cfg, o.device, gen ? 1 : o.batch, seq);
  if (!rc && o.no_cache) mt_infer_set_cache(inf, 0);
  if (!rc && !o.json) {
    const mt_gpt_config *c = mt_infer_config(inf);
    char blas[160] = "";
    if (mt_blas_corename()[0])
      snprintf(blas, sizeof blas, ", OpenBLAS %s (%s)", mt_blas_corename(), mt_blas_choice());
    fprintf(stderr,
            "mtnlg-eval: %s: %d layers, hidden %d, %d heads, vocabulary %d, %d positions; "
            "tokenizer %s; %s%s, OpenMP wait %s\n",
            o.model, c->n_layer, c->n_embd, c->n_head, c->vocab_size, c->max_seq,
            mt_tokenizer_name(tok), o.device, blas, mt_omp_wait_policy());
  }
  if (!rc && gen)
    rc = generate(&o, inf, tok, &prompt);
  else if (!rc && !strcmp(o.task, "lambada"))
    rc = lambada(&o, inf, tok);
  else if (!rc)
    rc = perplexity(&o, inf, tok);
  if (rc) fprintf(stderr, "mtnlg-eval: %s %s: %s\n", o.task, given, mt_errmsg());
  mt_tok_buf_free(&prompt);
  mt_infer_free(inf);
  mt_tokenizer_free(tok);
  remove_tmp_at_exit();
  return rc ? 1 : 0;
}
