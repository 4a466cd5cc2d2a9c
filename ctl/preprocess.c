/* preprocess.c — mtnlg-preprocess: JSONL or plain text to a Megatron .bin/.idx dataset.
 *
 * Modelled on Megatron-LM's tools/preprocess_data.py: one sequence per
 * document, EOD appended to each, u16 ids when the vocabulary fits, else i32.
 * Three kinds of thread share the work:
 *
 *   reader (1)      reads the inputs in ~1 MiB batches cut at a line (JSONL,
 *                   --text-docs line) or blank-line (paragraph) boundary
 *   workers (N)     parse JSON, tokenize with the one shared tokenizer (each
 *                   with its own mt_tok_buf), append EOD
 *   main (1)        writes batches in input order, prints progress
 *
 * Batches move through a ring of slots: FREE -> FILLED (reader) -> WORKING ->
 * DONE (a worker) -> FREE (main, after writing). The ring bounds memory to
 * (2N + 4) batches. A bad line is counted and reported, never fatal; I/O
 * errors end the run and leave no output (the writer removes its temp files).
 */
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "err.h"
#include "indexed.h"
#include "monotime.h"
#include "tokenizer.h"

enum { FMT_JSONL, FMT_TEXT };
enum { DOCS_PARAGRAPH, DOCS_LINE, DOCS_FILE };
enum { SLOT_FREE, SLOT_FILLED, SLOT_WORKING, SLOT_DONE };
enum { BATCH_BYTES = 1 << 20, MAX_REPORTED = 5 };

static const char usage_text[] =
    "usage: mtnlg-preprocess --input FILE... --output-prefix PREFIX [options]\n"
    "\n"
    "Tokenizes documents into a Megatron-LM indexed dataset PREFIX.bin + PREFIX.idx\n"
    "(one sequence per document, EOD after each; u16 ids when the vocabulary has at\n"
    "most 65536 entries, else i32).\n"
    "\n"
    "  --input FILE...          input files, read in order; '-' is standard input\n"
    "  --output-prefix PREFIX   writes PREFIX.bin and PREFIX.idx (no _text_document suffix)\n"
    "  --format jsonl|text      jsonl (default): one JSON object per line, the text in\n"
    "                           --json-key; text: plain UTF-8, documents per --text-docs\n"
    "  --json-key KEY           the field holding the text (default: text)\n"
    "  --text-docs paragraph|line|file\n"
    "                           text format: documents are separated by blank lines\n"
    "                           (default), are single lines, or are whole files\n"
    "  --tokenizer gpt2|bytes   GPT-2 byte-level BPE (default) or raw bytes (ids 0..255,\n"
    "                           EOD 256; needs no files)\n"
    "  --vocab FILE             GPT-2 vocab.json or encoder.json\n"
    "  --merges FILE            GPT-2 merges.txt or vocab.bpe\n"
    "  --workers N              tokenizing threads (default: every core this process may use)\n"
    "  --no-eod                 do not append EOD after each document\n"
    "  --quiet                  no progress line and no summary\n"
    "  -h, --help               this text\n"
    "\n"
    "Blank lines are skipped. Lines that are not JSON objects, or lack a string\n"
    "KEY, are counted and reported with their line numbers, never fatal; so are\n"
    "documents with no text. Invalid UTF-8 is replaced by U+FFFD and counted.\n"
    "Progress goes to stderr: documents, documents/s, MB/s (10^6 bytes of input)\n"
    "and an ETA from the input size.\n";

typedef struct options {
  const char **inputs;
  int n_inputs;
  const char *prefix, *json_key, *tokenizer, *vocab, *merges;
  int format, text_docs, workers, eod, quiet;
} options;

/* Lines of one batch with one kind of problem: how many, and the first few. */
typedef struct problem {
  uint64_t count;
  uint64_t lines[MAX_REPORTED]; /* 0-based line index within the batch */
  int n_lines;
} problem;

typedef struct slot {
  int state;
  int file;  /* index into options.inputs */
  char *buf; /* input bytes: whole lines, paragraphs or a whole file */
  size_t len, cap;
  int32_t *ids; /* the batch's documents' ids, back to back, EOD included */
  size_t n_ids, ids_cap;
  size_t *doc_len; /* tokens per document */
  size_t n_docs, docs_cap;
  uint64_t n_lines; /* '\n' in buf, for line numbers in later batches */
  problem bad_json, no_key;
  uint64_t empty_docs, invalid_utf8;
} slot;

typedef struct shared {
  const options *o;
  const mt_tokenizer *tok;
  int32_t eod;
  slot *slots;
  uint64_t n_slots;
  pthread_mutex_t mu;
  pthread_cond_t cv; /* broadcast on every change of the fields below */
  uint64_t next_in, next_take, next_out;
  int eof, stop;
  int err; /* first failure of the reader or a worker */
  char errmsg[1024];
} shared;

/* A line reported at the end: "FILE:LINE". */
typedef struct reported {
  int file;
  uint64_t line;
} reported;

static volatile sig_atomic_t interrupted;
static void on_signal(int sig) { interrupted = sig; }

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Records the first failure of a thread and stops every thread. */
static void fail(shared *s, int code) {
  pthread_mutex_lock(&s->mu);
  if (!s->err) {
    s->err = code;
    snprintf(s->errmsg, sizeof s->errmsg, "%s", mt_errmsg());
  }
  s->stop = 1;
  pthread_cond_broadcast(&s->cv);
  pthread_mutex_unlock(&s->mu);
}

static int grow(void **p, size_t *cap, size_t need, size_t elem) {
  if (need <= *cap) return 0;
  size_t c = *cap ? *cap : 4096;
  while (c < need) c *= 2;
  void *q = realloc(*p, c * elem);
  if (!q) return mt_seterr(MT_ENOMEM, "out of memory (%zu bytes)", c * elem);
  *p = q;
  *cap = c;
  return 0;
}

static int is_blank(const char *p, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (p[i] != ' ' && p[i] != '\t' && p[i] != '\r' && p[i] != '\f' && p[i] != '\v') return 0;
  return 1;
}

/* ---- reader ----------------------------------------------------------------- */

/* Where a batch may end: after the last '\n' (lines), after the last blank
 * line (paragraphs), never (whole files). 0 if buf holds no such point yet. */
static size_t find_split(const options *o, const char *buf, size_t len) {
  if (o->format == FMT_TEXT && o->text_docs == DOCS_FILE) return 0;
  const char *nl = memrchr(buf, '\n', len);
  if (!nl) return 0;
  if (o->format == FMT_JSONL || o->text_docs == DOCS_LINE) return (size_t)(nl - buf) + 1;
  /* paragraphs: the last line that is blank, with the newline ending it */
  while (nl) {
    const char *start = nl > buf ? memrchr(buf, '\n', (size_t)(nl - buf)) : NULL;
    const char *line = start ? start + 1 : buf;
    if (start && is_blank(line, (size_t)(nl - line))) return (size_t)(nl - buf) + 1;
    nl = start;
  }
  return 0;
}

/* Waits for slot next_in to be free; NULL once the run is stopping. */
static slot *reader_acquire(shared *s) {
  pthread_mutex_lock(&s->mu);
  slot *b = &s->slots[s->next_in % s->n_slots];
  while (!s->stop && b->state != SLOT_FREE) pthread_cond_wait(&s->cv, &s->mu);
  if (s->stop) b = NULL;
  pthread_mutex_unlock(&s->mu);
  return b;
}

static void reader_publish(shared *s, slot *b) {
  pthread_mutex_lock(&s->mu);
  b->state = SLOT_FILLED;
  s->next_in++;
  pthread_cond_broadcast(&s->cv);
  pthread_mutex_unlock(&s->mu);
}

/* Reads one input into batches; the bytes after a batch's split point carry
 * over into the next. Returns 0 or a negative MT_E* code. */
static int read_input(shared *s, int f, char **carry, size_t *carry_cap) {
  const char *path = s->o->inputs[f];
  int fd = strcmp(path, "-") ? open(path, O_RDONLY | O_CLOEXEC) : STDIN_FILENO;
  if (fd < 0)
    return mt_seterr(errno == ENOENT ? MT_ENOENT : MT_EIO, "open %s: %s", path, strerror(errno));
  posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
  size_t carry_len = 0;
  int at_eof = 0, rc = 0;
  while (!at_eof && !rc) {
    slot *b = reader_acquire(s);
    if (!b) break;
    b->file = f;
    b->len = 0;
    size_t target = BATCH_BYTES;
    if ((rc = grow((void **)&b->buf, &b->cap, carry_len > target ? carry_len : target, 1))) break;
    if (carry_len) memcpy(b->buf, *carry, carry_len); /* *carry is NULL before the first */
    b->len = carry_len;
    size_t split = 0;
    for (;;) {
      while (b->len < target && !at_eof) {
        if ((rc = grow((void **)&b->buf, &b->cap, target, 1))) break;
        ssize_t k = read(fd, b->buf + b->len, b->cap - b->len);
        if (k < 0 && errno == EINTR) continue;
        if (k < 0) {
          rc = mt_seterr(MT_EIO, "read %s: %s", path, strerror(errno));
          break;
        }
        if (k == 0) at_eof = 1;
        b->len += (size_t)k;
      }
      if (rc) break;
      if (at_eof) {
        split = b->len;
        break;
      }
      if ((split = find_split(s->o, b->buf, b->len))) break;
      target = 2 * b->len; /* one line or paragraph longer than a batch: read on */
    }
    if (rc) break;
    carry_len = b->len - split;
    if ((rc = grow((void **)carry, carry_cap, carry_len, 1))) break;
    if (carry_len) memcpy(*carry, b->buf + split, carry_len);
    b->len = split;
    reader_publish(s, b);
  }
  if (fd != STDIN_FILENO) close(fd);
  return rc;
}

static void *reader_main(void *arg) {
  shared *s = arg;
  char *carry = NULL;
  size_t carry_cap = 0;
  int rc = 0;
  for (int f = 0; f < s->o->n_inputs && !rc; f++) rc = read_input(s, f, &carry, &carry_cap);
  free(carry);
  if (rc) {
    fail(s, rc);
    return NULL;
  }
  pthread_mutex_lock(&s->mu);
  s->eof = 1;
  pthread_cond_broadcast(&s->cv);
  pthread_mutex_unlock(&s->mu);
  return NULL;
}

/* ---- workers ---------------------------------------------------------------- */

typedef struct worker {
  shared *s;
  pthread_t thread;
  mt_tok_buf tb;
  char *fixed; /* a JSON line with invalid UTF-8 replaced, or decoded text */
  size_t fixed_cap;
  char *lenient; /* a JSON line with Python's non-JSON numbers made null */
  size_t lenient_cap;
  int no_fast_json;
} worker;

static void note(problem *p, uint64_t line) {
  if (p->n_lines < MAX_REPORTED) p->lines[p->n_lines++] = line;
  p->count++;
}

/* Length of the valid UTF-8 sequence at p, or 0 with *bad set to the length
 * of its maximal ill-formed subpart (as WHATWG's decoder, Python's
 * errors="replace" and JavaScript's TextDecoder replace them). */
static size_t utf8_valid_len(const unsigned char *p, size_t n, size_t *bad) {
  unsigned c = p[0];
  size_t need;
  unsigned lo = 0x80, hi = 0xBF;
  if (c < 0x80) return 1;
  if (c >= 0xC2 && c <= 0xDF)
    need = 1;
  else if (c == 0xE0)
    need = 2, lo = 0xA0;
  else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF)
    need = 2;
  else if (c == 0xED)
    need = 2, hi = 0x9F;
  else if (c == 0xF0)
    need = 3, lo = 0x90;
  else if (c >= 0xF1 && c <= 0xF3)
    need = 3;
  else if (c == 0xF4)
    need = 3, hi = 0x8F;
  else {
    *bad = 1;
    return 0;
  }
  for (size_t k = 1; k <= need; k++) {
    if (k >= n || p[k] < lo || p[k] > hi) {
      *bad = k;
      return 0;
    }
    lo = 0x80, hi = 0xBF;
  }
  return need + 1;
}

/* Copies p[0..n) into w->fixed with each invalid sequence replaced by U+FFFD;
 * returns the number replaced, or a negative MT_E* code. */
static int64_t utf8_repair(worker *w, const char *p, size_t n, size_t *out_len) {
  if (grow((void **)&w->fixed, &w->fixed_cap, 3 * n + 1, 1)) return MT_ENOMEM;
  const unsigned char *u = (const unsigned char *)p;
  size_t i = 0, o = 0;
  int64_t replaced = 0;
  while (i < n) {
    size_t bad = 0, k = utf8_valid_len(u + i, n - i, &bad);
    if (k) {
      memcpy(w->fixed + o, p + i, k);
      o += k, i += k;
    } else {
      memcpy(w->fixed + o, "\xEF\xBF\xBD", 3);
      o += 3, i += bad;
      replaced++;
    }
  }
  *out_len = o;
  return replaced;
}

/* Tokenizes one document into the batch, EOD appended; no text, no document. */
static int add_doc(worker *w, slot *b, const char *text, size_t len) {
  const shared *s = w->s;
  w->tb.n = 0;
  int rc = mt_tokenizer_encode(s->tok, text, len, &w->tb);
  if (rc) return rc;
  if (w->tb.n == 0) {
    b->empty_docs++;
    return 0;
  }
  size_t n = w->tb.n + (s->o->eod ? 1 : 0);
  if ((rc = grow((void **)&b->ids, &b->ids_cap, b->n_ids + n, sizeof *b->ids))) return rc;
  if ((rc = grow((void **)&b->doc_len, &b->docs_cap, b->n_docs + 1, sizeof *b->doc_len))) return rc;
  memcpy(b->ids + b->n_ids, w->tb.ids, w->tb.n * sizeof *b->ids);
  if (s->o->eod) b->ids[b->n_ids + w->tb.n] = s->eod;
  b->n_ids += n;
  b->doc_len[b->n_docs++] = n;
  return 0;
}

/* ---- JSONL fast path ----------------------------------------------------------
 *
 * Most lines are a flat object with the text in one string. Building a jansson
 * tree for each costs more than GPT-2 BPE on short documents, so a line is
 * first scanned in place: validated as strictly as jansson would, skipping
 * every other value, decoding only KEY's string. Anything unusual (escaped
 * keys, lone surrogates, huge numbers, deep nesting, invalid UTF-8 outside the
 * text, any syntax error) is left to jansson, whose verdict stands; so the fast
 * path changes speed, never results. MTNLG_PREPROCESS_JSON=jansson turns it
 * off (for tests that compare the two).
 */

enum { FAST_UNSURE, FAST_FOUND, FAST_ABSENT };

typedef struct jscan {
  const char *p, *end;
} jscan;

static void js_ws(jscan *s) {
  while (s->p < s->end && (*s->p == ' ' || *s->p == '\t' || *s->p == '\r' || *s->p == '\n')) s->p++;
}

static int js_hex4(const char *p, const char *end, unsigned *v) {
  if (end - p < 4) return 0;
  *v = 0;
  for (int i = 0; i < 4; i++) {
    int c = p[i], d = c >= '0' && c <= '9'   ? c - '0'
                      : c >= 'a' && c <= 'f' ? c - 'a' + 10
                      : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                             : -1;
    if (d < 0) return 0;
    *v = *v << 4 | (unsigned)d;
  }
  return 1;
}

/* A string at s->p ('"'): 1 with s->p past the closing quote, its contents in
 * [*a, *b) and *escaped; 0 if unsure. check_utf8 = 0 leaves bytes >= 0x80 to
 * the tokenizer (which replaces and counts invalid ones). */
static int js_string(jscan *s, int check_utf8, const char **a, const char **b, int *escaped) {
  const char *p = s->p + 1, *end = s->end;
  *escaped = 0;
  *a = p;
  while (p < end) {
    unsigned char c = (unsigned char)*p;
    if (c == '"') {
      *b = p;
      s->p = p + 1;
      return 1;
    }
    if (c < 0x20) return 0;
    if (c == '\\') {
      *escaped = 1;
      if (++p >= end) return 0;
      if (*p && strchr("\"\\/bfnrt", *p)) {
        p++;
        continue;
      }
      unsigned v, lo;
      if (*p != 'u' || !js_hex4(p + 1, end, &v)) return 0;
      p += 5;
      if (v >= 0xDC00 && v <= 0xDFFF) return 0; /* lone low surrogate */
      if (v >= 0xD800 && v <= 0xDBFF) {
        if (end - p < 6 || p[0] != '\\' || p[1] != 'u' || !js_hex4(p + 2, end, &lo) ||
            lo < 0xDC00 || lo > 0xDFFF)
          return 0;
        p += 6;
      }
      continue;
    }
    if (c >= 0x80 && check_utf8) {
      size_t bad, k = utf8_valid_len((const unsigned char *)p, (size_t)(end - p), &bad);
      if (!k) return 0;
      p += k;
      continue;
    }
    p++;
  }
  return 0;
}

/* Decodes the escapes of validated string contents [a, b) into w->fixed. */
static int js_decode(worker *w, const char *a, const char *b, size_t *len) {
  if (grow((void **)&w->fixed, &w->fixed_cap, (size_t)(b - a) + 1, 1)) return MT_ENOMEM;
  char *o = w->fixed;
  while (a < b) {
    if (*a != '\\') {
      *o++ = *a++;
      continue;
    }
    char c = a[1];
    a += 2;
    switch (c) {
    case 'b': *o++ = '\b'; break;
    case 'f': *o++ = '\f'; break;
    case 'n': *o++ = '\n'; break;
    case 'r': *o++ = '\r'; break;
    case 't': *o++ = '\t'; break;
    case 'u': {
      unsigned v = 0, lo = 0xDC00;
      js_hex4(a, b, &v);
      a += 4;
      if (v >= 0xD800 && v <= 0xDBFF) {
        js_hex4(a + 2, b, &lo);
        a += 6;
        v = 0x10000 + ((v - 0xD800) << 10) + (lo - 0xDC00);
      }
      /* UTF-8 of v: never longer than the 6 or 12 escape bytes it replaces */
      if (v < 0x80)
        *o++ = (char)v;
      else if (v < 0x800)
        *o++ = (char)(0xC0 | v >> 6), *o++ = (char)(0x80 | (v & 0x3F));
      else if (v < 0x10000)
        *o++ = (char)(0xE0 | v >> 12), *o++ = (char)(0x80 | (v >> 6 & 0x3F)),
        *o++ = (char)(0x80 | (v & 0x3F));
      else
        *o++ = (char)(0xF0 | v >> 18), *o++ = (char)(0x80 | (v >> 12 & 0x3F)),
        *o++ = (char)(0x80 | (v >> 6 & 0x3F)), *o++ = (char)(0x80 | (v & 0x3F));
      break;
    }
    default: *o++ = c; break; /* " \ / */
    }
  }
  *len = (size_t)(o - w->fixed);
  return 0;
}

/* A number as jansson accepts it; unsure where jansson might overflow. */
static int js_number(jscan *s) {
  const char *p = s->p, *end = s->end, *start = p;
  int int_digits = 0, exp_digits = 0, real = 0;
  if (p < end && *p == '-') p++;
  if (p < end && *p == '0')
    p++, int_digits = 1;
  else
    while (p < end && *p >= '0' && *p <= '9') p++, int_digits++;
  if (!int_digits) return 0;
  if (p < end && *p == '.') {
    real = 1;
    if (++p >= end || *p < '0' || *p > '9') return 0;
    while (p < end && *p >= '0' && *p <= '9') p++;
  }
  if (p < end && (*p == 'e' || *p == 'E')) {
    real = 1;
    if (++p < end && (*p == '+' || *p == '-')) p++;
    while (p < end && *p >= '0' && *p <= '9') p++, exp_digits++;
    if (!exp_digits) return 0;
  }
  if (!real && int_digits > 18) return 0;
  if (real && (exp_digits > 2 || p - start > 24)) return 0;
  s->p = p;
  return 1;
}

static int js_value(jscan *s, int depth);

/* An object or array at s->p; members validated, values skipped. */
static int js_container(jscan *s, int depth) {
  char close = *s->p == '{' ? '}' : ']';
  const char *a, *b;
  int esc;
  if (depth > 32) return 0;
  s->p++;
  js_ws(s);
  if (s->p < s->end && *s->p == close) return s->p++, 1;
  for (;;) {
    if (close == '}') {
      if (s->p >= s->end || *s->p != '"' || !js_string(s, 1, &a, &b, &esc)) return 0;
      js_ws(s);
      if (s->p >= s->end || *s->p != ':') return 0;
      s->p++;
      js_ws(s);
    }
    if (!js_value(s, depth + 1)) return 0;
    js_ws(s);
    if (s->p >= s->end) return 0;
    if (*s->p == close) return s->p++, 1;
    if (*s->p != ',') return 0;
    s->p++;
    js_ws(s);
  }
}

static int js_value(jscan *s, int depth) {
  const char *a, *b;
  int esc;
  if (s->p >= s->end) return 0;
  switch (*s->p) {
  case '"': return js_string(s, 1, &a, &b, &esc);
  case '{':
  case '[': return js_container(s, depth);
  case 't':
  case 'f':
  case 'n': {
    const char *lit = *s->p == 't' ? "true" : *s->p == 'f' ? "false" : "null";
    size_t n = strlen(lit);
    if ((size_t)(s->end - s->p) < n || memcmp(s->p, lit, n)) return 0;
    s->p += n;
    return 1;
  }
  default: return js_number(s);
  }
}

/* The top-level object of a line: FAST_FOUND with the text of its last KEY
 * member in [*text, *text + *len) (in the line or in w->fixed), FAST_ABSENT if
 * that member is missing or not a string, FAST_UNSURE for jansson to judge. */
static int json_fast(worker *w, const char *line, size_t n, const char **text, size_t *len) {
  jscan s = {line, line + n};
  const char *key = w->s->o->json_key, *a, *b, *va = NULL, *vb = NULL;
  size_t key_len = strlen(key);
  int esc, vesc = 0, found = 0;
  js_ws(&s);
  if (s.p >= s.end || *s.p != '{') return FAST_UNSURE;
  s.p++;
  js_ws(&s);
  if (s.p < s.end && *s.p == '}') {
    s.p++;
  } else {
    for (;;) {
      if (s.p >= s.end || *s.p != '"' || !js_string(&s, 1, &a, &b, &esc) || esc) return FAST_UNSURE;
      int ours = (size_t)(b - a) == key_len && !memcmp(a, key, key_len);
      js_ws(&s);
      if (s.p >= s.end || *s.p != ':') return FAST_UNSURE;
      s.p++;
      js_ws(&s);
      if (ours && s.p < s.end && *s.p == '"') {
        if (!js_string(&s, 0, &va, &vb, &vesc)) return FAST_UNSURE;
        found = 1;
      } else {
        if (!js_value(&s, 1)) return FAST_UNSURE;
        if (ours) found = 0;
      }
      js_ws(&s);
      if (s.p >= s.end) return FAST_UNSURE;
      if (*s.p == '}') {
        s.p++;
        break;
      }
      if (*s.p != ',') return FAST_UNSURE;
      s.p++;
      js_ws(&s);
    }
  }
  js_ws(&s);
  if (s.p != s.end) return FAST_UNSURE;
  if (!found) return FAST_ABSENT;
  if (!vesc) {
    *text = va;
    *len = (size_t)(vb - va);
    return FAST_FOUND;
  }
  if (js_decode(w, va, vb, len)) return FAST_UNSURE; /* out of memory: jansson reports it */
  *text = w->fixed;
  return FAST_FOUND;
}

/* Length of the number Python's json scanner matches at p (its NUMBER_RE,
 * -?(?:0|[1-9]\d*)(\.\d+)?([eE][-+]?\d+)?), 0 if none. */
static size_t py_number_len(const char *p, const char *end) {
  const char *q = p;
  if (q < end && *q == '-') q++;
  if (q >= end || *q < '0' || *q > '9') return 0;
  if (*q == '0')
    q++;
  else
    while (q < end && *q >= '0' && *q <= '9') q++;
  if (end - q >= 2 && q[0] == '.' && q[1] >= '0' && q[1] <= '9')
    for (q++; q < end && *q >= '0' && *q <= '9';) q++;
  if (q < end && (*q == 'e' || *q == 'E')) {
    const char *x = q + 1;
    if (x < end && (*x == '+' || *x == '-')) x++;
    if (x < end && *x >= '0' && *x <= '9') {
      while (x < end && *x >= '0' && *x <= '9') x++;
      q = x;
    }
  }
  return (size_t)(q - p);
}

/* Copies p[0..n) into w->lenient with what Python's json.loads reads but
 * jansson refuses made null: NaN, Infinity, -Infinity, and numbers beyond
 * double range (1e400). Strings are copied as they are, so the text is never
 * touched; everything else is left for jansson to judge, and null glues to
 * nothing around it into valid JSON. Returns the replacements made (0: the
 * line is not one of these), or a negative MT_E* code. */
static int64_t python_numbers_to_null(worker *w, const char *p, size_t n, size_t *out_len) {
  if (grow((void **)&w->lenient, &w->lenient_cap, 2 * n + 8, 1)) return MT_ENOMEM;
  static const char *const lits[] = {"-Infinity", "Infinity", "NaN"};
  char *o = w->lenient;
  const char *end = p + n;
  int64_t replaced = 0;
  while (p < end) {
    if (*p == '"') { /* a string, escapes and all, up to its closing quote */
      *o++ = *p++;
      while (p < end && *p != '"') {
        if (*p == '\\' && p + 1 < end) *o++ = *p++;
        *o++ = *p++;
      }
      if (p < end) *o++ = *p++;
      continue;
    }
    size_t lit = 0;
    for (size_t i = 0; i < sizeof lits / sizeof lits[0] && !lit; i++) {
      size_t k = strlen(lits[i]);
      if ((size_t)(end - p) >= k && !memcmp(p, lits[i], k)) lit = k;
    }
    size_t num = lit ? 0 : py_number_len(p, end);
    if (num) { /* kept unless strtod, as jansson, overflows it */
      memcpy(o, p, num);
      o[num] = '\0';
      errno = 0;
      double v = strtod(o, NULL);
      if (!(errno == ERANGE && isinf(v))) {
        o += num, p += num;
        continue;
      }
      lit = num;
    }
    if (lit) {
      memcpy(o, "null", 4);
      o += 4, p += lit;
      replaced++;
      continue;
    }
    *o++ = *p++;
  }
  *out_len = (size_t)(o - w->lenient);
  return replaced;
}

static int json_line(worker *w, slot *b, const char *p, size_t n, uint64_t line) {
  if (!w->no_fast_json) {
    const char *text;
    size_t len;
    int r = json_fast(w, p, n, &text, &len);
    if (r == FAST_FOUND) return add_doc(w, b, text, len);
    if (r == FAST_ABSENT) {
      note(&b->no_key, line);
      return 0;
    }
  }
  json_error_t jerr;
  /* an id above int64 (a 64-bit hash) is a number Python reads: keep the document */
  json_t *root = json_loadb(p, n, JSON_ALLOW_NUL | JSON_DECODE_INT_AS_REAL, &jerr);
  /* Python's json.loads is the judge, not jansson: invalid UTF-8 is replaced
   * (as errors="replace" would), and NaN, Infinity and numbers past double
   * range, which Python reads and json.dumps writes, are made null; each is
   * tried once, in the order jansson trips on them */
  int repaired = 0, lenient = 0;
  while (!root) {
    size_t len = 0;
    int64_t k;
    if (!repaired && json_error_code(&jerr) == json_error_invalid_utf8) {
      repaired = 1;
      if ((k = utf8_repair(w, p, n, &len)) < 0) return (int)k;
      b->invalid_utf8 += (uint64_t)k;
      p = w->fixed;
    } else if (!lenient) {
      lenient = 1;
      if ((k = python_numbers_to_null(w, p, n, &len)) < 0) return (int)k;
      if (!k) break;
      p = w->lenient;
    } else {
      break;
    }
    n = len;
    root = json_loadb(p, n, JSON_ALLOW_NUL | JSON_DECODE_INT_AS_REAL, &jerr);
  }
  if (!root || !json_is_object(root)) {
    note(&b->bad_json, line);
    json_decref(root);
    return 0;
  }
  json_t *v = json_object_get(root, w->s->o->json_key);
  int rc = 0;
  if (!json_is_string(v))
    note(&b->no_key, line);
  else
    rc = add_doc(w, b, json_string_value(v), json_string_length(v));
  json_decref(root);
  return rc;
}

/* Splits a batch into documents and tokenizes them. */
static int process(worker *w, slot *b) {
  const options *o = w->s->o;
  b->n_ids = b->n_docs = b->n_lines = 0;
  memset(&b->bad_json, 0, sizeof b->bad_json);
  memset(&b->no_key, 0, sizeof b->no_key);
  b->empty_docs = 0;
  b->invalid_utf8 = 0;
  uint64_t utf8_before = w->tb.invalid_utf8;
  int rc = 0;
  if (o->format == FMT_TEXT && o->text_docs == DOCS_FILE) {
    rc = add_doc(w, b, b->buf, b->len);
  } else {
    const char *p = b->buf, *end = b->buf + b->len;
    const char *para = NULL, *para_end = NULL; /* paragraph being gathered */
    for (uint64_t line = 0; p < end && !rc; line++) {
      const char *nl = memchr(p, '\n', (size_t)(end - p));
      const char *e = nl ? nl : end;
      size_t n = (size_t)(e - p);
      int blank = is_blank(p, n);
      if (o->format == FMT_JSONL) {
        if (!blank) rc = json_line(w, b, p, n, line);
      } else if (o->text_docs == DOCS_LINE) {
        if (n && e[-1] == '\r') n--;
        if (!blank) rc = add_doc(w, b, p, n);
      } else if (blank) {
        if (para) rc = add_doc(w, b, para, (size_t)(para_end - para));
        para = NULL;
      } else {
        if (!para) para = p;
        para_end = e > p && e[-1] == '\r' ? e - 1 : e;
      }
      if (nl) b->n_lines++;
      p = nl ? nl + 1 : end;
    }
    if (para && !rc) rc = add_doc(w, b, para, (size_t)(para_end - para));
  }
  b->invalid_utf8 += w->tb.invalid_utf8 - utf8_before;
  return rc;
}

static void *worker_main(void *arg) {
  worker *w = arg;
  shared *s = w->s;
  pthread_mutex_lock(&s->mu);
  for (;;) {
    while (!s->stop && s->next_take == s->next_in && !s->eof) pthread_cond_wait(&s->cv, &s->mu);
    if (s->stop || s->next_take == s->next_in) break;
    slot *b = &s->slots[s->next_take++ % s->n_slots];
    b->state = SLOT_WORKING;
    pthread_mutex_unlock(&s->mu);
    int rc = process(w, b);
    if (rc) {
      fail(s, rc);
      return NULL;
    }
    pthread_mutex_lock(&s->mu);
    b->state = SLOT_DONE;
    pthread_cond_broadcast(&s->cv);
  }
  pthread_mutex_unlock(&s->mu);
  return NULL;
}

/* ---- main: ordered writing, progress, summary -------------------------------- */

typedef struct totals {
  uint64_t docs, tokens, bytes, empty_docs, invalid_utf8;
  uint64_t bad_json, no_key;
  reported bad_json_at[MAX_REPORTED], no_key_at[MAX_REPORTED];
  int n_bad_json_at, n_no_key_at;
  int file;           /* file of the last batch written */
  uint64_t line_base; /* lines of that file before the batch */
} totals;

static void report_lines(totals *t, const problem *p, int file, reported *at, int *n_at) {
  for (int i = 0; i < p->n_lines && *n_at < MAX_REPORTED; i++)
    at[(*n_at)++] = (reported){file, t->line_base + p->lines[i] + 1};
}

static int write_batch(mt_indexed_writer *w, totals *t, const slot *b) {
  size_t off = 0;
  for (size_t d = 0; d < b->n_docs; d++) {
    int rc = mt_indexed_writer_add_seq(w, b->ids + off, b->doc_len[d]);
    if (!rc) rc = mt_indexed_writer_end_doc(w);
    if (rc) return rc;
    off += b->doc_len[d];
  }
  if (b->file != t->file) t->file = b->file, t->line_base = 0;
  report_lines(t, &b->bad_json, b->file, t->bad_json_at, &t->n_bad_json_at);
  report_lines(t, &b->no_key, b->file, t->no_key_at, &t->n_no_key_at);
  t->line_base += b->n_lines;
  t->docs += b->n_docs;
  t->tokens += b->n_ids;
  t->bytes += b->len;
  t->empty_docs += b->empty_docs;
  t->invalid_utf8 += b->invalid_utf8;
  t->bad_json += b->bad_json.count;
  t->no_key += b->no_key.count;
  return 0;
}

static void fmt_duration(char *out, size_t n, double s) {
  unsigned v = s < 0 ? 0 : s > 3.6e8 ? 360000000u : (unsigned)(s + 0.5);
  snprintf(out, n, "%u:%02u:%02u", v / 3600, v / 60 % 60, v % 60);
}

/* One progress line: refreshed in place on a terminal, else printed as is. */
static void progress(const totals *t, double elapsed, uint64_t total_bytes, int tty) {
  double mb = (double)t->bytes / 1e6, rate = elapsed > 0 ? mb / elapsed : 0;
  char eta[48] = "";
  if (total_bytes && rate > 0) {
    char d[32];
    fmt_duration(d, sizeof d, ((double)total_bytes / 1e6 - mb) / rate);
    snprintf(eta, sizeof eta, "  ETA %s", d);
  }
  char of[32] = "";
  if (total_bytes) snprintf(of, sizeof of, " of %.1f", (double)total_bytes / 1e6);
  fprintf(stderr, "%s%llu documents  %.0f docs/s  %.1f MB/s  %.1f%s MB%s%s", tty ? "\r" : "",
          (unsigned long long)t->docs, elapsed > 0 ? (double)t->docs / elapsed : 0.0, rate, mb, of,
          eta, tty ? "\033[K" : "\n");
}

static void print_reported(const options *o, const char *what, uint64_t count, const reported *at,
                           int n_at) {
  if (!count) return;
  fprintf(stderr, "mtnlg-preprocess: skipped %llu %s (", (unsigned long long)count, what);
  for (int i = 0; i < n_at; i++)
    fprintf(stderr, "%s%s:%llu", i ? ", " : "", o->inputs[at[i].file],
            (unsigned long long)at[i].line);
  fprintf(stderr, "%s)\n", (uint64_t)n_at < count ? ", ..." : "");
}

static int parse_int(const char *s, int *out) {
  char *end;
  errno = 0;
  long v = strtol(s, &end, 10);
  if (errno || *end || end == s || v < 1 || v > 4096) return -1;
  *out = (int)v;
  return 0;
}

static int default_workers(void) {
  cpu_set_t set;
  if (!sched_getaffinity(0, sizeof set, &set) && CPU_COUNT(&set) > 0) return CPU_COUNT(&set);
  long n = sysconf(_SC_NPROCESSORS_ONLN);
  return n > 0 ? (int)n : 1;
}

/* Parses argv into o; 0, 1 (help printed) or -1 (message printed). */
static int parse_args(int argc, char **argv, options *o) {
  *o = (options){.json_key = "text",
                 .tokenizer = "gpt2",
                 .eod = 1,
                 .format = FMT_JSONL,
                 .text_docs = DOCS_PARAGRAPH};
  o->inputs = calloc((size_t)argc, sizeof *o->inputs);
  if (!o->inputs) return -1;
  const char *format = NULL, *text_docs = NULL, *workers = NULL;
  for (int i = 1; i < argc; i++) {
    char *a = argv[i], *val = NULL;
    if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
      fputs(usage_text, stdout);
      return 1;
    }
    if (!strcmp(a, "--no-eod")) {
      o->eod = 0;
      continue;
    }
    if (!strcmp(a, "--quiet")) {
      o->quiet = 1;
      continue;
    }
    if (!strncmp(a, "--input", 7) && (a[7] == 0 || a[7] == '=')) {
      if (a[7] == '=') o->inputs[o->n_inputs++] = a + 8;
      while (i + 1 < argc && strncmp(argv[i + 1], "--", 2)) o->inputs[o->n_inputs++] = argv[++i];
      continue;
    }
    static const char *const valued[] = {"--output-prefix", "--json-key", "--format", "--text-docs",
                                         "--tokenizer",     "--vocab",    "--merges", "--workers"};
    const char **dest[] = {&o->prefix,    &o->json_key, &format,    &text_docs,
                           &o->tokenizer, &o->vocab,    &o->merges, &workers};
    size_t k = 0, nv = sizeof valued / sizeof valued[0];
    for (; k < nv; k++) {
      size_t l = strlen(valued[k]);
      if (!strncmp(a, valued[k], l) && (a[l] == 0 || a[l] == '=')) {
        val = a[l] == '=' ? a + l + 1 : (i + 1 < argc ? argv[++i] : NULL);
        break;
      }
    }
    if (k == nv) {
      fprintf(stderr, "mtnlg-preprocess: unknown argument '%s' (see --help)\n", a);
      return -1;
    }
    if (!val) {
      fprintf(stderr, "mtnlg-preprocess: %s needs a value\n", valued[k]);
      return -1;
    }
    *dest[k] = val;
  }
  if (!o->n_inputs || !o->prefix) {
    fprintf(stderr, "mtnlg-preprocess: --input and --output-prefix are required (see --help)\n");
    return -1;
  }
  if (format && !strcmp(format, "text"))
    o->format = FMT_TEXT;
  else if (format && strcmp(format, "jsonl")) {
    fprintf(stderr, "mtnlg-preprocess: --format %s: expected jsonl or text\n", format);
    return -1;
  }
  if (text_docs && !strcmp(text_docs, "line"))
    o->text_docs = DOCS_LINE;
  else if (text_docs && !strcmp(text_docs, "file"))
    o->text_docs = DOCS_FILE;
  else if (text_docs && strcmp(text_docs, "paragraph")) {
    fprintf(stderr, "mtnlg-preprocess: --text-docs %s: expected paragraph, line or file\n",
            text_docs);
    return -1;
  }
  if (strcmp(o->tokenizer, "gpt2") && strcmp(o->tokenizer, "bytes")) {
    fprintf(stderr, "mtnlg-preprocess: --tokenizer %s: expected gpt2 or bytes\n", o->tokenizer);
    return -1;
  }
  if (!strcmp(o->tokenizer, "gpt2") && (!o->vocab || !o->merges)) {
    fprintf(stderr, "mtnlg-preprocess: --tokenizer gpt2 needs --vocab (vocab.json or "
                    "encoder.json) and --merges (merges.txt or vocab.bpe); --tokenizer bytes "
                    "needs no files\n");
    return -1;
  }
  if (!workers)
    o->workers = default_workers();
  else if (parse_int(workers, &o->workers)) {
    fprintf(stderr, "mtnlg-preprocess: --workers %s: expected a number from 1 to 4096\n", workers);
    return -1;
  }
  int stdin_count = 0;
  for (int i = 0; i < o->n_inputs; i++) stdin_count += !strcmp(o->inputs[i], "-");
  if (stdin_count > 1) {
    fprintf(stderr, "mtnlg-preprocess: standard input ('-') given %d times\n", stdin_count);
    return -1;
  }
  return 0;
}

/* Sum of the input sizes for the ETA; 0 when one is not a regular file. */
static uint64_t input_bytes(const options *o) {
  uint64_t total = 0;
  for (int i = 0; i < o->n_inputs; i++) {
    struct stat st;
    if (stat(o->inputs[i], &st) || !S_ISREG(st.st_mode)) return 0;
    total += (uint64_t)st.st_size;
  }
  return total;
}

int main(int argc, char **argv) {
  options o;
  int a = parse_args(argc, argv, &o);
  if (a) {
    free(o.inputs);
    return a > 0 ? 0 : 2;
  }
  double t0 = now_s();
  int ret = 1, rc = 0, tty = isatty(STDERR_FILENO);
  mt_tokenizer *tok = NULL;
  mt_indexed_writer *w = NULL;
  worker *workers = NULL;
  pthread_t reader;
  int reader_started = 0, n_started = 0;
  shared s = {.o = &o};
  totals t = {.file = -1};
  pthread_mutex_init(&s.mu, NULL);
  mt_mono_cond_init(&s.cv);

  rc = !strcmp(o.tokenizer, "bytes") ? mt_tokenizer_open_bytes(&tok)
                                     : mt_tokenizer_open_gpt2(&tok, o.vocab, o.merges);
  if (rc) {
    fprintf(stderr, "mtnlg-preprocess: %s\n", mt_errmsg());
    goto done;
  }
  s.tok = tok;
  s.eod = mt_tokenizer_eod(tok);
  int dtype = mt_tokenizer_vocab_size(tok) <= 65536 ? MT_IDX_U16 : MT_IDX_I32;
  if ((rc = mt_indexed_writer_open(&w, o.prefix, dtype))) {
    fprintf(stderr, "mtnlg-preprocess: %s\n", mt_errmsg());
    goto done;
  }
  const char *json_env = getenv("MTNLG_PREPROCESS_JSON");
  int no_fast_json = json_env && !strcmp(json_env, "jansson");
  s.n_slots = 2 * (uint64_t)o.workers + 4;
  s.slots = calloc(s.n_slots, sizeof *s.slots);
  workers = calloc((size_t)o.workers, sizeof *workers);
  if (!s.slots || !workers) {
    fprintf(stderr, "mtnlg-preprocess: out of memory\n");
    goto done;
  }

  /* Signals go to this thread only: it removes the temp files and exits. */
  struct sigaction sa = {.sa_handler = on_signal};
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, NULL);
  sigaction(SIGTERM, &sa, NULL);
  sigaction(SIGHUP, &sa, NULL);
  sigset_t block, old;
  sigemptyset(&block);
  sigaddset(&block, SIGINT);
  sigaddset(&block, SIGTERM);
  sigaddset(&block, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &block, &old);
  if (!pthread_create(&reader, NULL, reader_main, &s)) reader_started = 1;
  for (int i = 0; reader_started && i < o.workers; i++) {
    workers[i].s = &s;
    workers[i].no_fast_json = no_fast_json;
    if (pthread_create(&workers[i].thread, NULL, worker_main, &workers[i])) break;
    n_started++;
  }
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  if (!reader_started || !n_started) {
    fprintf(stderr, "mtnlg-preprocess: cannot start threads\n");
    fail(&s, MT_ENOMEM);
  }

  uint64_t total_bytes = input_bytes(&o);
  double every = tty ? 0.25 : 5.0, last = now_s();
  int shown = 0;
  pthread_mutex_lock(&s.mu);
  for (;;) {
    slot *b = &s.slots[s.next_out % s.n_slots];
    if (s.stop || interrupted || (s.eof && s.next_out == s.next_in)) break;
    if (b->state != SLOT_DONE) {
      struct timespec until = mt_mono_deadline(100);
      pthread_cond_timedwait(&s.cv, &s.mu, &until);
    } else {
      pthread_mutex_unlock(&s.mu);
      rc = write_batch(w, &t, b);
      if (b->ids_cap > (64u << 20)) free(b->ids), b->ids = NULL, b->ids_cap = 0;
      if (b->cap > (64u << 20)) free(b->buf), b->buf = NULL, b->cap = 0;
      if (rc) fail(&s, rc);
      pthread_mutex_lock(&s.mu);
      b->state = SLOT_FREE;
      s.next_out++;
      pthread_cond_broadcast(&s.cv);
    }
    double now = now_s();
    if (!o.quiet && now - last >= every) {
      pthread_mutex_unlock(&s.mu);
      progress(&t, now - t0, total_bytes, tty);
      shown = 1;
      last = now;
      pthread_mutex_lock(&s.mu);
    }
  }
  s.stop = 1; /* wakes any thread still waiting (there is none on success) */
  pthread_cond_broadcast(&s.cv);
  int err = s.err;
  pthread_mutex_unlock(&s.mu);
  if (shown && tty) fputc('\n', stderr);

  if (interrupted) {
    /* the reader may sit in read() on a pipe: remove the temp files and go */
    mt_indexed_writer_abort(w);
    fprintf(stderr, "mtnlg-preprocess: interrupted (%s); nothing written\n",
            strsignal(interrupted));
    return 128 + interrupted;
  }
  if (reader_started) pthread_join(reader, NULL);
  for (int i = 0; i < n_started; i++) pthread_join(workers[i].thread, NULL);
  reader_started = n_started = 0;
  if (err) {
    fprintf(stderr, "mtnlg-preprocess: %s\n", s.errmsg);
    goto done;
  }

  print_reported(&o, "lines that are not JSON objects", t.bad_json, t.bad_json_at, t.n_bad_json_at);
  char what[300];
  snprintf(what, sizeof what, "lines without a string \"%s\"", o.json_key);
  print_reported(&o, what, t.no_key, t.no_key_at, t.n_no_key_at);
  if (t.empty_docs)
    fprintf(stderr, "mtnlg-preprocess: skipped %llu documents with no text\n",
            (unsigned long long)t.empty_docs);
  if (t.invalid_utf8)
    fprintf(stderr, "mtnlg-preprocess: replaced %llu invalid UTF-8 sequences with U+FFFD\n",
            (unsigned long long)t.invalid_utf8);
  if (!t.docs) {
    fprintf(stderr, "mtnlg-preprocess: no documents in %llu bytes of input; nothing written\n",
            (unsigned long long)t.bytes);
    goto done;
  }
  if ((rc = mt_indexed_writer_finish(w))) {
    w = NULL;
    fprintf(stderr, "mtnlg-preprocess: %s\n", mt_errmsg());
    goto done;
  }
  w = NULL;
  double secs = now_s() - t0;
  if (!o.quiet)
    fprintf(stderr,
            "mtnlg-preprocess: %llu documents, %llu tokens (%s, %s) from %.1f MB in %.2f s: "
            "%.1f MB/s, %d workers -> %s.bin, %s.idx\n",
            (unsigned long long)t.docs, (unsigned long long)t.tokens, mt_tokenizer_name(tok),
            dtype == MT_IDX_U16 ? "u16" : "i32", (double)t.bytes / 1e6, secs,
            secs > 0 ? (double)t.bytes / 1e6 / secs : 0.0, o.workers, o.prefix, o.prefix);
  ret = 0;
done:
  if (reader_started || n_started) {
    pthread_mutex_lock(&s.mu);
    s.stop = 1;
    pthread_cond_broadcast(&s.cv);
    pthread_mutex_unlock(&s.mu);
    if (reader_started) pthread_join(reader, NULL);
    for (int i = 0; i < n_started; i++) pthread_join(workers[i].thread, NULL);
  }
  mt_indexed_writer_abort(w);
  for (uint64_t i = 0; s.slots && i < s.n_slots; i++)
    free(s.slots[i].buf), free(s.slots[i].ids), free(s.slots[i].doc_len);
  for (int i = 0; workers && i < o.workers; i++)
    mt_tok_buf_free(&workers[i].tb), free(workers[i].fixed), free(workers[i].lenient);
  free(s.slots);
  free(workers);
  mt_tokenizer_free(tok);
  free(o.inputs);
  pthread_cond_destroy(&s.cv);
  pthread_mutex_destroy(&s.mu);
  return ret;
}
