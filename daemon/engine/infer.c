/* infer.c — a model's forward used for scoring and sampling (infer.h). The
 * training forward is reused as it is: rows are padded to the planned
 * length with token 0 and, the attention being causal, the padding changes
 * nothing before it. The forward leaves every layer's q, k and v of row 0
 * in the model's activations: the key-value cache generation extends a
 * position at a time (mt_gpt_decode). */
#include "infer.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "device.h"
#include "err.h"
#include "safetensors.h"

struct mt_infer {
  mt_device dev;
  int dev_open;
  mt_gpt m;
  int model_made;
  int B, T;
  int32_t *inputs, *targets; /* host (B, T) */
  float *row;                /* host: one position's padded_vocab logits */
  int cache_on;
  size_t cached; /* row 0's positions [0, cached) hold inputs[0, cached): the cache */
};

int mt_infer_open(mt_infer **out, const char *path, const mt_gpt_config *cfg, const char *device,
                  int batch, int seq) {
  *out = NULL;
  int rc = 0;
  if (batch < 1) return mt_seterr(MT_EINVAL, "infer: %d rows a forward", batch);
  if (seq < 0 || seq > cfg->max_seq)
    return mt_seterr(MT_EINVAL, "infer: %d tokens a row; the model has %d positions", seq,
                     cfg->max_seq);
  mt_infer *inf = calloc(1, sizeof *inf);
  if (!inf) return mt_seterr(MT_ENOMEM, "infer: %s", path);
  inf->B = batch;
  inf->T = seq ? seq : cfg->max_seq;
  size_t bt = (size_t)inf->B * (size_t)inf->T;
  if (!(inf->inputs = calloc(bt, sizeof *inf->inputs)) ||
      !(inf->targets = calloc(bt, sizeof *inf->targets)) ||
      !(inf->row = malloc((size_t)cfg->padded_vocab * sizeof *inf->row)))
    rc = mt_seterr(MT_ENOMEM, "infer: %s: buffers for %d x %d tokens", path, inf->B, inf->T);
  if (!rc && !(rc = mt_device_open(&inf->dev, device))) inf->dev_open = 1;
  if (!rc && !(rc = mt_gpt_create(&inf->m, cfg, &inf->dev, inf->B, inf->T))) inf->model_made = 1;
  if (!rc) rc = mt_gpt_load_safetensors(&inf->m, path);
  if (!rc) rc = mt_gpt_round_weights(&inf->m);
  if (rc) {
    mt_wraperr(rc, "infer: %s", path);
    mt_infer_free(inf);
    return rc;
  }
  inf->m.training = 0;
  inf->cache_on = 1;
  *out = inf;
  return 0;
}

void mt_infer_free(mt_infer *inf) {
  if (!inf) return;
  if (inf->model_made) mt_gpt_destroy(&inf->m);
  if (inf->dev_open) mt_device_close(&inf->dev);
  free(inf->inputs);
  free(inf->targets);
  free(inf->row);
  free(inf);
}

const mt_gpt_config *mt_infer_config(const mt_infer *inf) { return &inf->m.cfg; }
void mt_infer_set_cache(mt_infer *inf, int on) {
  inf->cache_on = on;
  inf->cached = 0;
}
int mt_infer_seq(const mt_infer *inf) { return inf->T; }

/* Position pos of row r's logits to inf->row (padded_vocab floats). */
static int logits_at(mt_infer *inf, int r, size_t pos) {
  size_t vp = (size_t)inf->m.cfg.padded_vocab;
  const float *dev = mt_gpt_logits(&inf->m, 0) + ((size_t)r * inf->T + pos) * vp;
  return mt_device_memcpy_dtoh(&inf->dev, inf->row, dev, vp * sizeof *inf->row);
}

int mt_infer_next(mt_infer *inf, const int32_t *tokens, size_t n, float *logits) {
  if (n < 1) return mt_seterr(MT_EINVAL, "infer: no tokens to go on from");
  size_t T = (size_t)inf->T, k = n > T ? T : n;
  int V = inf->m.cfg.vocab_size;
  for (size_t i = 0; i < k; i++) {
    if (tokens[n - k + i] < 0 || tokens[n - k + i] >= V)
      return mt_seterr(MT_EINVAL, "infer: token %d is outside the vocabulary of %d",
                       tokens[n - k + i], V);
  }
  int rc = 0;
  size_t c = inf->cached;
  if (inf->cache_on && n <= T && c >= 1 && c < n &&
      !memcmp(inf->inputs, tokens, c * sizeof *tokens)) {
    /* the cache holds a prefix: only the positions after it */
    for (size_t pos = c; pos < n && !rc; pos++) {
      inf->cached = 0; /* until the position is in */
      rc = mt_gpt_decode(&inf->m, (int)pos, tokens[pos]);
      if (!rc) inf->inputs[pos] = tokens[pos], inf->cached = pos + 1;
    }
    if (!rc) rc = logits_at(inf, 0, n - 1);
    if (rc) return mt_wraperr(rc, "infer: decode");
    memcpy(logits, inf->row, (size_t)V * sizeof *logits);
    return 0;
  }
  memset(inf->inputs, 0, (size_t)inf->B * T * sizeof *inf->inputs);
  memcpy(inf->inputs, tokens + (n - k), k * sizeof *tokens);
  inf->cached = 0;
  rc = mt_gpt_forward(&inf->m, inf->inputs, NULL, 0);
  if (!rc) rc = logits_at(inf, 0, k - 1);
  if (rc) return mt_wraperr(rc, "infer: forward");
  inf->cached = n <= T ? k : 0; /* a window that slid starts elsewhere each call */
  memcpy(logits, inf->row, (size_t)V * sizeof *logits);
  return 0;
}

int mt_infer_score(mt_infer *inf, mt_infer_row *rows, int n_rows) {
  size_t T = (size_t)inf->T;
  int V = inf->m.cfg.vocab_size, rc = 0;
  for (int r = 0; r < n_rows; r++) {
    mt_infer_row *w = &rows[r];
    if (w->first < 1 || w->first >= w->n || w->n > T + 1)
      return mt_seterr(MT_EINVAL,
                       "infer: a row of %zu tokens scored from token %zu (1 <= first < n <= %zu)",
                       w->n, w->first, T + 1);
    for (size_t i = 0; i < w->n; i++)
      if (w->tokens[i] < 0 || w->tokens[i] >= V)
        return mt_seterr(MT_EINVAL, "infer: token %d is outside the vocabulary of %d", w->tokens[i],
                         V);
  }
  inf->cached = 0; /* the forwards below overwrite the cache */
  for (int r0 = 0; r0 < n_rows && !rc; r0 += inf->B) {
    int nb = n_rows - r0 < inf->B ? n_rows - r0 : inf->B;
    memset(inf->inputs, 0, (size_t)inf->B * T * sizeof *inf->inputs);
    memset(inf->targets, 0, (size_t)inf->B * T * sizeof *inf->targets);
    for (int r = 0; r < nb; r++) {
      const mt_infer_row *w = &rows[r0 + r];
      memcpy(inf->inputs + (size_t)r * T, w->tokens, (w->n - 1) * sizeof *w->tokens);
      memcpy(inf->targets + (size_t)r * T, w->tokens + 1, (w->n - 1) * sizeof *w->tokens);
    }
    /* the per-token losses land in host_losses: -log p(target) */
    if ((rc = mt_gpt_forward(&inf->m, inf->inputs, inf->targets, 0))) break;
    for (int r = 0; r < nb && !rc; r++) {
      mt_infer_row *w = &rows[r0 + r];
      w->nll = 0.0;
      w->hits = 0;
      for (size_t pos = w->first - 1; pos + 1 < w->n && !rc; pos++) {
        w->nll += inf->m.host_losses[(size_t)r * T + pos];
        if (!w->greedy) continue;
        if ((rc = logits_at(inf, r, pos))) break;
        int best = 0;
        for (int v = 1; v < V; v++)
          if (inf->row[v] > inf->row[best]) best = v;
        w->hits += best == w->tokens[pos + 1];
      }
      if (!rc && !isfinite(w->nll))
        rc = mt_seterr(MT_EINVAL, "infer: the model's log-likelihood is %g: it has diverged",
                       w->nll);
    }
  }
  return rc ? mt_wraperr(rc, "infer: forward") : 0;
}

/* xoroshiro128+ */
static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
static uint64_t next_u64(uint64_t s[2]) {
  uint64_t a = s[0], b = s[1], r = a + b;
  b ^= a;
  s[0] = rotl(a, 24) ^ b ^ (b << 16);
  s[1] = rotl(b, 37);
  return r;
}

void mt_sample_seed(uint64_t rng[2], uint64_t seed) {
  for (int i = 0; i < 2; i++) { /* splitmix64 */
    uint64_t z = (seed += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    rng[i] = z ^ (z >> 31);
  }
}

typedef struct {
  float p;
  int32_t id;
} cand;

static int by_p_desc(const void *a, const void *b) {
  const cand *x = a, *y = b;
  if (x->p != y->p) return x->p < y->p ? 1 : -1;
  return x->id < y->id ? -1 : x->id > y->id; /* ties: the smaller id first */
}

int32_t mt_sample(const float *logits, int vocab, const mt_sampling *s, uint64_t rng[2]) {
  int32_t best = 0;
  for (int v = 0; v < vocab; v++) {
    if (!isfinite(logits[v]))
      return mt_seterr(MT_EINVAL, "sample: logit %d is %g: the model has diverged", v,
                       (double)logits[v]);
    if (logits[v] > logits[best]) best = v;
  }
  if (s->temperature <= 0.0 || s->top_k == 1) return best;
  cand *c = malloc((size_t)vocab * sizeof *c);
  if (!c) return mt_seterr(MT_ENOMEM, "sample: %d candidates", vocab);
  double sum = 0.0, max = logits[best];
  for (int v = 0; v < vocab; v++) {
    c[v].id = v;
    c[v].p = (float)exp(((double)logits[v] - max) / s->temperature);
  }
  qsort(c, (size_t)vocab, sizeof *c, by_p_desc);
  int n = s->top_k > 0 && s->top_k < vocab ? s->top_k : vocab;
  for (int i = 0; i < n; i++) sum += c[i].p;
  if (s->top_p > 0.0 && s->top_p < 1.0) { /* the nucleus: the fewest whose share reaches top_p */
    double run = 0.0;
    int keep = 0;
    while (keep < n && (keep == 0 || run < s->top_p * sum)) run += c[keep++].p;
    n = keep, sum = run;
  }
  double u = (double)(next_u64(rng) >> 11) * 0x1.0p-53 * sum, acc = 0.0;
  int32_t pick = c[n - 1].id;
  for (int i = 0; i < n; i++) {
    acc += c[i].p;
    if (u < acc) {
      pick = c[i].id;
      break;
    }
  }
  free(c);
  return pick;
}
