/* test_ops.c — the CPU backend's ops (kernels/cpu/ops_cpu.c) against
 * references written here in double precision.
 *
 * - Every forward is compared with an independent double reference.
 * - Every backward is compared with central finite differences (h = 1e-6, in
 *   double) of that reference under a random projection L = Σ r_i·out_i; the
 *   op is called with dout = r. Big tensors are checked on a random subset of
 *   FD_SUBSET (>= 200) elements, small ones on every element.
 * - Tensors are compared norm-wise: rel = ||a − b|| / max(||a||, ||b||).
 *   Gradients against finite differences pass with rel < 1e-3 (GRAD_TOL);
 *   forwards against the double reference with rel < 1e-5 (FWD_TOL).
 * - Backward ops accumulate: gradients pre-filled with a known value must end
 *   as value + gradient (ACC_TOL on the difference).
 * - A fused op (linear_gelu_fwd, linear_bwd_dgelu) gives the bits of the ops
 *   it fuses.
 * - An op reading a 16-bit matrix (bf16, fp16), or attention reading a
 *   16-bit qkv, gives the bits it gives with an fp32 tensor holding the same
 *   values.
 * One line per check; the exit status is 1 when any check fails.
 */
#include <math.h>
#include <omp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "blas.h"
#include "device.h"
#include "err.h"
#include "half.h"
#include "mtmath.h"
#include "ops.h"

#define FWD_TOL 1e-5
#define GRAD_TOL 1e-3
#define ACC_TOL 1e-5
#define FD_H 1e-6
#define FD_SUBSET 200
#define PREFILL 0.25f

static mt_device dev;
static const mt_ops *ops;
static int n_checks, n_failed;

static void report(int ok, const char *test, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  printf("%s %s: ", ok ? "ok  " : "FAIL", test);
  vprintf(fmt, ap);
  printf("\n");
  va_end(ap);
  n_checks++;
  if (!ok) n_failed++;
}

/* ---- data --------------------------------------------------------------- */

static uint64_t rng_state = 20240601;

static uint64_t rng_u64(void) { /* splitmix64 */
  uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

static double urand(double lo, double hi) {
  return lo + (hi - lo) * (double)(rng_u64() >> 11) * 0x1p-53;
}

static void *xmalloc(size_t bytes) {
  void *p = calloc(1, bytes ? bytes : 1);
  if (!p) {
    fprintf(stderr, "test_ops: out of memory (%zu bytes)\n", bytes);
    exit(2);
  }
  return p;
}

static float *fzeros(size_t n) { return xmalloc(n * sizeof(float)); }
static double *dzeros(size_t n) { return xmalloc(n * sizeof(double)); }

static float *frand(size_t n, double lo, double hi) {
  float *x = fzeros(n);
  for (size_t i = 0; i < n; i++) x[i] = (float)urand(lo, hi);
  return x;
}

static float *fcopy(const float *x, size_t n) {
  float *y = fzeros(n);
  memcpy(y, x, n * sizeof(float));
  return y;
}

static double *dcopy(const float *x, size_t n) {
  double *y = dzeros(n);
  for (size_t i = 0; i < n; i++) y[i] = x[i];
  return y;
}

static void ffill(float *x, size_t n, float v) {
  for (size_t i = 0; i < n; i++) x[i] = v;
}

static double dot(const double *a, const double *b, size_t n) {
  double s = 0.0;
  for (size_t i = 0; i < n; i++) s += a[i] * b[i];
  return s;
}

/* ---- comparisons -------------------------------------------------------- */

static double rel_err(const float *a, const double *b, size_t n) {
  double d = 0.0, na = 0.0, nb = 0.0;
  for (size_t i = 0; i < n; i++) {
    d += (a[i] - b[i]) * (a[i] - b[i]);
    na += (double)a[i] * a[i];
    nb += b[i] * b[i];
  }
  double den = sqrt(na > nb ? na : nb);
  return den == 0.0 ? sqrt(d) : sqrt(d) / den;
}

static void check_fwd(const char *test, const char *what, const float *a, const double *ref,
                      size_t n) {
  double r = rel_err(a, ref, n);
  report(r < FWD_TOL, test, "%s rel %.2e over %zu elements", what, r, n);
}

static int bits_equal(const float *a, const float *b, size_t n) {
  return memcmp(a, b, n * sizeof(float)) == 0;
}

/* The reference loss L = Σ r·out of one op, as a function of its double inputs. */
typedef double (*loss_fn)(void *ctx);

/* Compares grad (the op's float gradient of x) with central differences of
 * f with respect to the double copy x, on every element or on a random
 * subset of FD_SUBSET. x is restored. */
static void check_grad(const char *test, const char *what, loss_fn f, void *ctx, double *x,
                       size_t n, const float *grad) {
  size_t k = n <= FD_SUBSET ? n : FD_SUBSET;
  size_t *idx = xmalloc(k * sizeof(size_t));
  for (size_t i = 0; i < k; i++) idx[i] = n <= FD_SUBSET ? i : (size_t)(rng_u64() % n);
  float *a = fzeros(k);
  double *g = dzeros(k);
  for (size_t i = 0; i < k; i++) {
    double x0 = x[idx[i]];
    x[idx[i]] = x0 + FD_H;
    double lp = f(ctx);
    x[idx[i]] = x0 - FD_H;
    double lm = f(ctx);
    x[idx[i]] = x0;
    g[i] = (lp - lm) / (2.0 * FD_H);
    a[i] = grad[idx[i]];
  }
  double r = rel_err(a, g, k);
  report(r < GRAD_TOL, test, "%s rel %.2e on %zu of %zu elements", what, r, k, n);
  free(idx);
  free(a);
  free(g);
}

/* after: the op's gradient when it started from PREFILL; fresh: from zero.
 * Accumulation means after − PREFILL == fresh (up to one rounding of PREFILL). */
static void check_accumulates(const char *test, const char *what, const float *after,
                              const float *fresh, size_t n) {
  double d = 0.0, nf = 0.0;
  for (size_t i = 0; i < n; i++) {
    double e = ((double)after[i] - PREFILL) - fresh[i];
    d += e * e;
    nf += (double)fresh[i] * fresh[i];
  }
  double r = nf == 0.0 ? sqrt(d) : sqrt(d / nf);
  report(r < ACC_TOL, test, "%s: prefilled %.2f + gradient, rel %.2e", what, PREFILL, r);
}

/* ---- embedding ---------------------------------------------------------- */

typedef struct {
  int B, T, C, V, Vp;
  int32_t *tok;
  float *wte, *wpe, *r; /* the op's inputs; r is dout */
  double *dwte, *dwpe;  /* double copies of the parameters (perturbed by FD) */
  double *dr, *out;
} emb_case;

static void emb_ref(double *out, const int32_t *tok, const double *wte, const double *wpe, int B,
                    int T, int C) {
  for (int b = 0; b < B; b++)
    for (int t = 0; t < T; t++)
      for (int c = 0; c < C; c++)
        out[((size_t)b * T + t) * C + c] =
            wte[(size_t)tok[b * T + t] * C + c] + wpe[(size_t)t * C + c];
}

static double emb_loss(void *p) {
  emb_case *e = p;
  emb_ref(e->out, e->tok, e->dwte, e->dwpe, e->B, e->T, e->C);
  return dot(e->out, e->dr, (size_t)e->B * e->T * e->C);
}

static emb_case emb_make(int B, int T, int C, int V, int Vp) {
  emb_case e = {B, T, C, V, Vp, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL};
  size_t N = (size_t)B * T;
  e.tok = xmalloc(N * sizeof(int32_t));
  for (size_t i = 0; i < N; i++) e.tok[i] = (int32_t)(rng_u64() % (uint64_t)V);
  e.tok[N - 1] = e.tok[0]; /* a repeated token: its gradient rows must add */
  e.tok[1] = V - 1;
  e.wte = frand((size_t)Vp * C, -1, 1);
  e.wpe = frand((size_t)T * C, -1, 1);
  e.r = frand(N * C, -1, 1);
  e.dwte = dcopy(e.wte, (size_t)Vp * C);
  e.dwpe = dcopy(e.wpe, (size_t)T * C);
  e.dr = dcopy(e.r, N * C);
  e.out = dzeros(N * C);
  return e;
}

static void emb_free(emb_case *e) {
  free(e->tok), free(e->wte), free(e->wpe), free(e->r);
  free(e->dwte), free(e->dwpe), free(e->dr), free(e->out);
}

static void test_embedding_fwd_matches_reference(int B, int T, int C, int V, int Vp) {
  emb_case e = emb_make(B, T, C, V, Vp);
  size_t n = (size_t)B * T * C;
  float *out = frand(n, -9, 9);
  ops->embedding_fwd(&dev, out, e.tok, e.wte, MT_F32, e.wpe, B, T, C);
  emb_ref(e.out, e.tok, e.dwte, e.dwpe, B, T, C);
  char what[64];
  snprintf(what, sizeof what, "B=%d T=%d C=%d out", B, T, C);
  check_fwd(__func__, what, out, e.out, n);
  free(out);
  emb_free(&e);
}

static void test_embedding_bwd_matches_finite_differences(int B, int T, int C, int V, int Vp) {
  emb_case e = emb_make(B, T, C, V, Vp);
  float *gwte = fzeros((size_t)Vp * C), *gwpe = fzeros((size_t)T * C);
  ops->embedding_bwd(&dev, gwte, gwpe, e.r, e.tok, B, T, C);
  char what[64];
  snprintf(what, sizeof what, "B=%d T=%d C=%d Vp=%d dwte", B, T, C, Vp);
  check_grad(__func__, what, emb_loss, &e, e.dwte, (size_t)Vp * C, gwte);
  snprintf(what, sizeof what, "B=%d T=%d C=%d dwpe", B, T, C);
  check_grad(__func__, what, emb_loss, &e, e.dwpe, (size_t)T * C, gwpe);
  free(gwte), free(gwpe);
  emb_free(&e);
}

static void test_embedding_bwd_accumulates(void) {
  int B = 2, T = 7, C = 12, V = 37, Vp = 40;
  emb_case e = emb_make(B, T, C, V, Vp);
  float *gwte = fzeros((size_t)Vp * C), *gwpe = fzeros((size_t)T * C);
  float *awte = fzeros((size_t)Vp * C), *awpe = fzeros((size_t)T * C);
  ffill(awte, (size_t)Vp * C, PREFILL);
  ffill(awpe, (size_t)T * C, PREFILL);
  ops->embedding_bwd(&dev, gwte, gwpe, e.r, e.tok, B, T, C);
  ops->embedding_bwd(&dev, awte, awpe, e.r, e.tok, B, T, C);
  check_accumulates(__func__, "dwte", awte, gwte, (size_t)Vp * C);
  check_accumulates(__func__, "dwpe", awpe, gwpe, (size_t)T * C);
  free(gwte), free(gwpe), free(awte), free(awpe);
  emb_free(&e);
}

/* ---- layernorm ---------------------------------------------------------- */

#define LN_EPS 1e-5f

typedef struct {
  int N, C;
  float *inp, *w, *b, *r;
  double *dinp, *dw, *db, *dr, *out, *mean, *rstd;
} ln_case;

static void ln_ref(double *out, double *mean, double *rstd, const double *inp, const double *w,
                   const double *b, int N, int C, double eps) {
  for (int n = 0; n < N; n++) {
    const double *x = inp + (size_t)n * C;
    double m = 0.0, v = 0.0;
    for (int c = 0; c < C; c++) m += x[c];
    m /= C;
    for (int c = 0; c < C; c++) v += (x[c] - m) * (x[c] - m);
    v /= C;
    double rs = 1.0 / sqrt(v + eps);
    for (int c = 0; c < C; c++) out[(size_t)n * C + c] = (x[c] - m) * rs * w[c] + b[c];
    mean[n] = m;
    rstd[n] = rs;
  }
}

static double ln_loss(void *p) {
  ln_case *l = p;
  ln_ref(l->out, l->mean, l->rstd, l->dinp, l->dw, l->db, l->N, l->C, LN_EPS);
  return dot(l->out, l->dr, (size_t)l->N * l->C);
}

static ln_case ln_make(int N, int C) {
  ln_case l = {N, C, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL};
  size_t n = (size_t)N * C;
  /* means away from zero (the variance must be centred) and spreads from 1
   * down to 0.03, where eps is 3% of the variance */
  l.inp = frand(n, -1, 1);
  for (int i = 0; i < N; i++)
    for (int c = 0; c < C; c++) {
      float spread = i % 3 == 0 ? 1.0f : i % 3 == 1 ? 0.1f : 0.03f;
      l.inp[(size_t)i * C + c] = 1.0f + spread * l.inp[(size_t)i * C + c];
    }
  l.w = frand((size_t)C, 0.5, 1.5);
  l.b = frand((size_t)C, -1, 1);
  l.r = frand(n, -1, 1);
  l.dinp = dcopy(l.inp, n);
  l.dw = dcopy(l.w, (size_t)C);
  l.db = dcopy(l.b, (size_t)C);
  l.dr = dcopy(l.r, n);
  l.out = dzeros(n);
  l.mean = dzeros((size_t)N);
  l.rstd = dzeros((size_t)N);
  return l;
}

static void ln_free(ln_case *l) {
  free(l->inp), free(l->w), free(l->b), free(l->r), free(l->dinp), free(l->dw);
  free(l->db), free(l->dr), free(l->out), free(l->mean), free(l->rstd);
}

static void test_layernorm_fwd_matches_reference(int N, int C) {
  ln_case l = ln_make(N, C);
  size_t n = (size_t)N * C;
  float *out = frand(n, -9, 9), *mean = fzeros((size_t)N), *rstd = fzeros((size_t)N);
  ops->layernorm_fwd(&dev, out, MT_F32, mean, rstd, l.inp, l.w, l.b, N, C, LN_EPS);
  ln_ref(l.out, l.mean, l.rstd, l.dinp, l.dw, l.db, N, C, LN_EPS);
  char what[64];
  snprintf(what, sizeof what, "N=%d C=%d out", N, C);
  check_fwd(__func__, what, out, l.out, n);
  check_fwd(__func__, "mean", mean, l.mean, (size_t)N);
  check_fwd(__func__, "rstd", rstd, l.rstd, (size_t)N);
  free(out), free(mean), free(rstd);
  ln_free(&l);
}

/* runs fwd then bwd from the given gradient buffers */
static void ln_run_bwd(ln_case *l, float *gin, float *gw, float *gb) {
  size_t n = (size_t)l->N * l->C;
  float *out = fzeros(n), *mean = fzeros((size_t)l->N), *rstd = fzeros((size_t)l->N);
  ops->layernorm_fwd(&dev, out, MT_F32, mean, rstd, l->inp, l->w, l->b, l->N, l->C, LN_EPS);
  ops->layernorm_bwd(&dev, gin, gw, gb, l->r, l->inp, l->w, mean, rstd, l->N, l->C);
  free(out), free(mean), free(rstd);
}

static void test_layernorm_bwd_matches_finite_differences(int N, int C) {
  ln_case l = ln_make(N, C);
  size_t n = (size_t)N * C;
  float *gin = fzeros(n), *gw = fzeros((size_t)C), *gb = fzeros((size_t)C);
  ln_run_bwd(&l, gin, gw, gb);
  char what[64];
  snprintf(what, sizeof what, "N=%d C=%d dinp", N, C);
  check_grad(__func__, what, ln_loss, &l, l.dinp, n, gin);
  check_grad(__func__, "dw", ln_loss, &l, l.dw, (size_t)C, gw);
  check_grad(__func__, "db", ln_loss, &l, l.db, (size_t)C, gb);
  free(gin), free(gw), free(gb);
  ln_free(&l);
}

static void test_layernorm_bwd_accumulates(void) {
  int N = 13, C = 12;
  ln_case l = ln_make(N, C);
  size_t n = (size_t)N * C;
  float *gin = fzeros(n), *gw = fzeros((size_t)C), *gb = fzeros((size_t)C);
  float *ain = fzeros(n), *aw = fzeros((size_t)C), *ab = fzeros((size_t)C);
  ffill(ain, n, PREFILL), ffill(aw, (size_t)C, PREFILL), ffill(ab, (size_t)C, PREFILL);
  ln_run_bwd(&l, gin, gw, gb);
  ln_run_bwd(&l, ain, aw, ab);
  check_accumulates(__func__, "dinp", ain, gin, n);
  check_accumulates(__func__, "dw", aw, gw, (size_t)C);
  check_accumulates(__func__, "db", ab, gb, (size_t)C);
  free(gin), free(gw), free(gb), free(ain), free(aw), free(ab);
  ln_free(&l);
}

/* ---- linear ------------------------------------------------------------- */

typedef struct {
  int N, C, OC, has_bias;
  float *inp, *w, *bias, *r;
  double *dinp, *dw, *dbias, *dr, *out;
} lin_case;

static void lin_ref(double *out, const double *inp, const double *w, const double *bias, int N,
                    int C, int OC) {
  for (int n = 0; n < N; n++)
    for (int o = 0; o < OC; o++) {
      double s = bias ? bias[o] : 0.0;
      for (int c = 0; c < C; c++) s += inp[(size_t)n * C + c] * w[(size_t)o * C + c];
      out[(size_t)n * OC + o] = s;
    }
}

static double lin_loss(void *p) {
  lin_case *l = p;
  lin_ref(l->out, l->dinp, l->dw, l->has_bias ? l->dbias : NULL, l->N, l->C, l->OC);
  return dot(l->out, l->dr, (size_t)l->N * l->OC);
}

static lin_case lin_make(int N, int C, int OC, int has_bias) {
  lin_case l = {N, C, OC, has_bias, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL};
  l.inp = frand((size_t)N * C, -1, 1);
  l.w = frand((size_t)OC * C, -0.5, 0.5);
  l.bias = frand((size_t)OC, -1, 1);
  l.r = frand((size_t)N * OC, -1, 1);
  l.dinp = dcopy(l.inp, (size_t)N * C);
  l.dw = dcopy(l.w, (size_t)OC * C);
  l.dbias = dcopy(l.bias, (size_t)OC);
  l.dr = dcopy(l.r, (size_t)N * OC);
  l.out = dzeros((size_t)N * OC);
  return l;
}

static void lin_free(lin_case *l) {
  free(l->inp), free(l->w), free(l->bias), free(l->r), free(l->dinp), free(l->dw);
  free(l->dbias), free(l->dr), free(l->out);
}

static void test_linear_fwd_matches_reference(int N, int C, int OC, int has_bias) {
  lin_case l = lin_make(N, C, OC, has_bias);
  float *out = frand((size_t)N * OC, -9, 9);
  ops->linear_fwd(&dev, out, MT_F32, l.inp, MT_F32, l.w, MT_F32, has_bias ? l.bias : NULL, NULL, N,
                  C, OC);
  lin_ref(l.out, l.dinp, l.dw, has_bias ? l.dbias : NULL, N, C, OC);
  char what[80];
  snprintf(what, sizeof what, "N=%d C=%d OC=%d bias=%s out", N, C, OC, has_bias ? "yes" : "NULL");
  check_fwd(__func__, what, out, l.out, (size_t)N * OC);
  free(out);
  lin_free(&l);
}

static void test_linear_bwd_matches_finite_differences(int N, int C, int OC, int has_bias) {
  lin_case l = lin_make(N, C, OC, has_bias);
  float *gin = fzeros((size_t)N * C), *gw = fzeros((size_t)OC * C), *gb = fzeros((size_t)OC);
  ops->linear_bwd(&dev, gin, gw, has_bias ? gb : NULL, l.r, MT_F32, l.inp, MT_F32, l.w, MT_F32,
                  NULL, N, C, OC);
  char what[80];
  snprintf(what, sizeof what, "N=%d C=%d OC=%d dinp", N, C, OC);
  check_grad(__func__, what, lin_loss, &l, l.dinp, (size_t)N * C, gin);
  check_grad(__func__, "dw", lin_loss, &l, l.dw, (size_t)OC * C, gw);
  if (has_bias) check_grad(__func__, "dbias", lin_loss, &l, l.dbias, (size_t)OC, gb);
  free(gin), free(gw), free(gb);
  lin_free(&l);
}

/* With a second CPU device open, a GEMM outside a parallel region runs as
 * row blocks on the device's threads (blas.c: Debian's OpenBLAS runs one
 * threaded GEMM per process at a time, the others spinning): the linear op's
 * values against the double reference, the same bits each run, and its
 * gradients against finite differences. */
static void test_linear_with_two_cpu_devices(void) {
  int was = omp_get_max_threads();
  int N = 200, C = 64, OC = 96;
  lin_case l = lin_make(N, C, OC, 1);
  size_t n = (size_t)N * OC;
  float *one = fzeros(n), *two = fzeros(n);
  omp_set_num_threads(2);
  mt_device second;
  if (mt_device_open(&second, "cpu:1")) {
    report(0, __func__, "open cpu:1: %s", mt_errmsg());
  } else {
    unsigned long before = mt_blas_row_splits();
    ops->linear_fwd(&dev, two, MT_F32, l.inp, MT_F32, l.w, MT_F32, l.bias, NULL, N, C, OC);
    report(mt_blas_row_splits() > before, __func__, "the GEMM ran as row blocks");
    ops->linear_fwd(&dev, one, MT_F32, l.inp, MT_F32, l.w, MT_F32, l.bias, NULL, N, C, OC);
    lin_ref(l.out, l.dinp, l.dw, l.dbias, N, C, OC);
    check_fwd(__func__, "N=200 C=64 OC=96 out, two devices", two, l.out, n);
    /* the same bits every time (not those of OpenBLAS's own threading,
     * whose blocks differ: a row block's GEMM sums in its own order) */
    report(bits_equal(one, two, n), __func__, "out bit for bit again");
    float *gin = fzeros((size_t)N * C), *gw = fzeros((size_t)OC * C), *gb = fzeros((size_t)OC);
    ops->linear_bwd(&dev, gin, gw, gb, l.r, MT_F32, l.inp, MT_F32, l.w, MT_F32, NULL, N, C, OC);
    check_grad(__func__, "two devices: dinp", lin_loss, &l, l.dinp, (size_t)N * C, gin);
    check_grad(__func__, "two devices: dw", lin_loss, &l, l.dw, (size_t)OC * C, gw);
    free(gin), free(gw), free(gb);
    mt_device_close(&second);
  }
  free(one), free(two);
  lin_free(&l);
  omp_set_num_threads(was);
}

static void test_linear_bwd_accumulates_and_skips_null(void) {
  int N = 13, C = 12, OC = 9;
  lin_case l = lin_make(N, C, OC, 1);
  float *gin = fzeros((size_t)N * C), *gw = fzeros((size_t)OC * C), *gb = fzeros((size_t)OC);
  float *ain = fzeros((size_t)N * C), *aw = fzeros((size_t)OC * C), *ab = fzeros((size_t)OC);
  float *nw = fzeros((size_t)OC * C);
  ffill(ain, (size_t)N * C, PREFILL), ffill(aw, (size_t)OC * C, PREFILL);
  ffill(ab, (size_t)OC, PREFILL);
  ops->linear_bwd(&dev, gin, gw, gb, l.r, MT_F32, l.inp, MT_F32, l.w, MT_F32, NULL, N, C, OC);
  ops->linear_bwd(&dev, ain, aw, ab, l.r, MT_F32, l.inp, MT_F32, l.w, MT_F32, NULL, N, C, OC);
  ops->linear_bwd(&dev, NULL, nw, NULL, l.r, MT_F32, l.inp, MT_F32, l.w, MT_F32, NULL, N, C, OC);
  check_accumulates(__func__, "dinp", ain, gin, (size_t)N * C);
  check_accumulates(__func__, "dw", aw, gw, (size_t)OC * C);
  check_accumulates(__func__, "dbias", ab, gb, (size_t)OC);
  report(bits_equal(nw, gw, (size_t)OC * C), __func__, "dw alone (dinp, dbias NULL) is the same");
  free(gin), free(gw), free(gb), free(ain), free(aw), free(ab), free(nw);
  lin_free(&l);
}

/* ---- attention ---------------------------------------------------------- */

typedef struct {
  int B, T, C, NH;
  const mt_dropout *drop;
  float *qkv, *r;
  double *dqkv, *dr, *out, *lse;
  int32_t *ds; /* (B,T) document starts (att_docs); NULL: plain causal */
} att_case;

/* Straight from the definition: per (b, h, t) the scores of keys s0..t
 * (s0 = ds[b, t], 0 without documents), their log-sum-exp (lse) and
 * softmax, the dropped probabilities times the values. */
static void att_ref(double *out, double *lse, const double *qkv, int B, int T, int C, int NH,
                    const mt_dropout *drop, const int32_t *ds) {
  int HS = C / NH;
  double sc = 1.0 / sqrt((double)HS);
  double *s = dzeros((size_t)T), *a = dzeros((size_t)T);
  for (int b = 0; b < B; b++)
    for (int h = 0; h < NH; h++)
      for (int t = 0; t < T; t++) {
        const double *q = qkv + ((size_t)b * T + t) * 3 * C + (size_t)h * HS;
        double mx = -INFINITY, sum = 0.0;
        int s0 = ds ? ds[(size_t)b * T + t] : 0;
        for (int j = s0; j <= t; j++) {
          const double *k = qkv + ((size_t)b * T + j) * 3 * C + C + (size_t)h * HS;
          s[j] = 0.0;
          for (int i = 0; i < HS; i++) s[j] += q[i] * k[i];
          s[j] *= sc;
          if (s[j] > mx) mx = s[j];
        }
        for (int j = s0; j <= t; j++) sum += exp(s[j] - mx);
        lse[((size_t)b * NH + h) * T + t] = mx + log(sum);
        for (int j = s0; j <= t; j++) a[j] = exp(s[j] - mx) / sum;
        double *o = out + ((size_t)b * T + t) * C + (size_t)h * HS;
        for (int i = 0; i < HS; i++) o[i] = 0.0;
        for (int j = s0; j <= t; j++) {
          double m = 1.0;
          if (drop && drop->p > 0.0f)
            m = mt_dropout_scale(drop->p, drop->key, drop->sample0 + (uint64_t)b,
                                 ((uint64_t)h * T + t) * T + (uint64_t)j);
          const double *v = qkv + ((size_t)b * T + j) * 3 * C + 2 * C + (size_t)h * HS;
          for (int i = 0; i < HS; i++) o[i] += a[j] * m * v[i];
        }
      }
  free(s), free(a);
}

static double att_loss(void *p) {
  att_case *a = p;
  att_ref(a->out, a->lse, a->dqkv, a->B, a->T, a->C, a->NH, a->drop, a->ds);
  return dot(a->out, a->dr, (size_t)a->B * a->T * a->C);
}

static att_case att_make(int B, int T, int C, int NH, const mt_dropout *drop) {
  att_case a = {B, T, C, NH, drop, NULL, NULL, NULL, NULL, NULL, NULL, NULL};
  size_t N = (size_t)B * T;
  a.qkv = frand(N * 3 * C, -1.5, 1.5);
  a.r = frand(N * C, -1, 1);
  a.dqkv = dcopy(a.qkv, N * 3 * C);
  a.dr = dcopy(a.r, N * C);
  a.out = dzeros(N * C);
  a.lse = dzeros((size_t)B * NH * T);
  return a;
}

static void att_free(att_case *a) {
  free(a->qkv), free(a->r), free(a->dqkv), free(a->dr), free(a->out), free(a->lse), free(a->ds);
}

/* Documents for a (Megatron's --reset-attention-mask): ends (end-of-document
 * inputs) at rows 0, 3 and 4 of sample 0 (one first, two adjacent), every
 * 5th row of sample 1, and row T - 1 of each; a row's start is one past the
 * last end before it. */
static void att_docs(att_case *a) {
  a->ds = malloc((size_t)a->B * a->T * sizeof *a->ds);
  for (int b = 0; b < a->B; b++) {
    int32_t s = 0;
    for (int t = 0; t < a->T; t++) {
      a->ds[(size_t)b * a->T + t] = s;
      int end = t == a->T - 1 || (b % 2 == 0 ? t == 0 || t == 3 || t == 4 : t % 5 == 4);
      if (end) s = t + 1;
    }
  }
}

static void test_attention_fwd_matches_reference(int B, int T, int C, int NH,
                                                 const mt_dropout *drop) {
  att_case a = att_make(B, T, C, NH, drop);
  size_t N = (size_t)B * T, nl = (size_t)B * NH * T;
  size_t ns = ops->attention_scratch(&dev, T, C, NH, MT_F32);
  /* every element must be written; the scratch's contents are undefined */
  float *out = frand(N * C, -9, 9), *lse = frand(nl, -9, 9), *scratch = fzeros(ns);
  ffill(scratch, ns, NAN);
  ops->attention_fwd(&dev, out, lse, scratch, a.qkv, MT_F32, B, T, C, NH, drop, NULL);
  att_ref(a.out, a.lse, a.dqkv, B, T, C, NH, drop, NULL);
  char what[96];
  snprintf(what, sizeof what, "B=%d T=%d C=%d NH=%d dropout %.2f out", B, T, C, NH,
           drop ? drop->p : 0.0);
  check_fwd(__func__, what, out, a.out, N * C);
  check_fwd(__func__, "lse (log-sum-exp of each row's scaled scores)", lse, a.lse, nl);
  free(out), free(lse), free(scratch);
  att_free(&a);
}

/* Decoding with a key-value cache: attention_decode of the first n rows is
 * the double reference's row n - 1, for every n (one key, several, past a
 * large score that rescales the running sums), heads of odd sizes too. */
static void test_attention_decode_matches_reference(int T, int C, int NH) {
  att_case a = att_make(1, T, C, NH, NULL);
  for (int i = 0; i < C / NH; i++) a.qkv[(size_t)(T / 2) * 3 * C + C + i] = 4.0f; /* a big key */
  for (size_t i = 0; i < (size_t)T * 3 * C; i++) a.dqkv[i] = a.qkv[i];
  att_ref(a.out, a.lse, a.dqkv, 1, T, C, NH, NULL, NULL);
  float *out = frand((size_t)C, -9, 9);
  double worst = 0.0;
  for (int n = 1; n <= T; n++) {
    ops->attention_decode(&dev, out, a.qkv, n, C, NH);
    double r = rel_err(out, a.out + (size_t)(n - 1) * C, (size_t)C);
    worst = r > worst ? r : worst;
  }
  report(worst < FWD_TOL, __func__, "T=%d C=%d NH=%d: worst row rel %.2e over n = 1..%d", T, C, NH,
         worst, T);
  free(out);
  att_free(&a);
}

/* fwd then bwd; the scratch, exactly as large as the op asks (ASan sees
 * past it), starts as NaN since its contents are undefined */
static void att_run_bwd(att_case *a, float *dqkv) {
  size_t N = (size_t)a->B * a->T, nl = (size_t)a->B * a->NH * a->T;
  size_t ns = ops->attention_scratch(&dev, a->T, a->C, a->NH, MT_F32);
  float *out = fzeros(N * a->C), *lse = fzeros(nl), *scratch = fzeros(ns);
  ffill(scratch, ns, NAN);
  ops->attention_fwd(&dev, out, lse, scratch, a->qkv, MT_F32, a->B, a->T, a->C, a->NH, a->drop,
                     a->ds);
  ffill(scratch, ns, NAN);
  ops->attention_bwd(&dev, dqkv, MT_F32, scratch, a->r, out, a->qkv, MT_F32, lse, a->B, a->T, a->C,
                     a->NH, a->drop, a->ds);
  free(out), free(lse), free(scratch);
}

static void test_attention_bwd_matches_finite_differences(int B, int T, int C, int NH,
                                                          const mt_dropout *drop) {
  att_case a = att_make(B, T, C, NH, drop);
  size_t n = (size_t)B * T * 3 * C;
  float *g = fzeros(n);
  att_run_bwd(&a, g);
  char what[96];
  snprintf(what, sizeof what, "B=%d T=%d C=%d NH=%d dropout %.2f dqkv", B, T, C, NH,
           drop ? drop->p : 0.0);
  check_grad(__func__, what, att_loss, &a, a.dqkv, n, g);
  free(g);
  att_free(&a);
}

/* Attention within documents (doc_start): the forward against the
 * reference over each row's document only, the backward against finite
 * differences of it, with and without dropout, over one row block and
 * several (and several dropout column tiles). */
static void test_attention_documents_match_reference(int B, int T, int C, int NH,
                                                     const mt_dropout *drop) {
  att_case a = att_make(B, T, C, NH, drop);
  att_docs(&a);
  size_t N = (size_t)B * T, nl = (size_t)B * NH * T, n = N * 3 * C;
  size_t ns = ops->attention_scratch(&dev, T, C, NH, MT_F32);
  float *out = frand(N * C, -9, 9), *lse = frand(nl, -9, 9), *scratch = fzeros(ns);
  ffill(scratch, ns, NAN);
  ops->attention_fwd(&dev, out, lse, scratch, a.qkv, MT_F32, B, T, C, NH, drop, a.ds);
  att_ref(a.out, a.lse, a.dqkv, B, T, C, NH, drop, a.ds);
  char what[112];
  snprintf(what, sizeof what, "documents, B=%d T=%d C=%d NH=%d dropout %.2f out", B, T, C, NH,
           drop ? drop->p : 0.0);
  check_fwd(__func__, what, out, a.out, N * C);
  check_fwd(__func__, "documents, lse", lse, a.lse, nl);
  float *g = fzeros(n);
  att_run_bwd(&a, g);
  snprintf(what, sizeof what, "documents, B=%d T=%d C=%d NH=%d dropout %.2f dqkv", B, T, C, NH,
           drop ? drop->p : 0.0);
  check_grad(__func__, what, att_loss, &a, a.dqkv, n, g);
  free(out), free(lse), free(scratch), free(g);
  att_free(&a);
}

static void test_attention_bwd_accumulates(const mt_dropout *drop) {
  int B = 2, T = 7, C = 12, NH = 3;
  att_case a = att_make(B, T, C, NH, drop);
  size_t n = (size_t)B * T * 3 * C;
  float *g = fzeros(n), *acc = fzeros(n);
  ffill(acc, n, PREFILL);
  att_run_bwd(&a, g);
  att_run_bwd(&a, acc);
  check_accumulates(__func__, drop ? "dqkv, dropout on" : "dqkv", acc, g, n);
  free(g), free(acc);
  att_free(&a);
}

/* How many of n 16-bit values h are not f's fp32 values rounded to nearest
 * even (bf16, or binary16 when fp16) */
static size_t not_rounded(const uint16_t *h, const float *f, size_t n, int fp16) {
  size_t k = 0;
  for (size_t i = 0; i < n; i++) k += h[i] != mt_half_pack(f[i], fp16);
  return k;
}

/* A 16-bit qkv (bf16, fp16) is read as the floats it holds: attention_fwd
 * gives the lse, and out rounded into 16 bits, and attention_bwd (given
 * that out) the dqkv, that an fp32 qkv of those values gives, bit for bit.
 * Each call gets exactly the scratch attention_scratch asks for its qkv's
 * type (ASan sees past it), NaN at the start. */
static void test_attention_16bit_qkv_read_as_its_floats(int B, int T, int C, int NH,
                                                        const mt_dropout *drop) {
  size_t N = (size_t)B * T, nq = N * 3 * C, no = N * C, nl = (size_t)B * NH * T;
  size_t n32 = ops->attention_scratch(&dev, T, C, NH, MT_F32);
  for (int fp16 = 0; fp16 <= 1; fp16++) {
    mt_dtype qt = fp16 ? MT_F16 : MT_BF16;
    size_t n16 = ops->attention_scratch(&dev, T, C, NH, qt);
    /* qh the 16 bits, q the floats they hold */
    float *q = frand(nq, -1.5, 1.5), *dout = frand(no, -1, 1);
    float *s16 = fzeros(n16), *s32 = fzeros(n32);
    uint16_t *qh = xmalloc(nq * sizeof(uint16_t)), *oh = xmalloc(no * sizeof(uint16_t));
    for (size_t i = 0; i < nq; i++) {
      qh[i] = mt_half_pack(q[i], fp16);
      q[i] = mt_half_unpack(qh[i], fp16);
    }
    for (size_t i = 0; i < no; i++) oh[i] = 0x7fc1; /* every value must be written */
    float *o32 = fzeros(no), *l16 = frand(nl, -9, 9), *l32 = fzeros(nl);
    ffill(s16, n16, NAN);
    ops->attention_fwd(&dev, oh, l16, s16, qh, qt, B, T, C, NH, drop, NULL);
    ffill(s32, n32, NAN);
    ops->attention_fwd(&dev, o32, l32, s32, q, MT_F32, B, T, C, NH, drop, NULL);
    char what[96];
    snprintf(what, sizeof what, "%s B=%d T=%d C=%d NH=%d dropout %.2f", fp16 ? "fp16" : "bf16", B,
             T, C, NH, drop ? drop->p : 0.0);
    size_t off = 0;
    off += not_rounded(oh, o32, no, fp16);
    report(off == 0 && bits_equal(l16, l32, nl), __func__,
           "%s attention_fwd lse, and out (%zu of %zu not fp32's rounded)", what, off, no);

    for (size_t i = 0; i < no; i++) o32[i] = mt_half_unpack(oh[i], fp16);
    float *g16 = frand(nq, -1, 1), *g32 = fcopy(g16, nq); /* accumulated into */
    ffill(s16, n16, NAN);
    ops->attention_bwd(&dev, g16, MT_F32, s16, dout, oh, qh, qt, l16, B, T, C, NH, drop, NULL);
    ffill(s32, n32, NAN);
    ops->attention_bwd(&dev, g32, MT_F32, s32, dout, o32, q, MT_F32, l32, B, T, C, NH, drop, NULL);
    report(bits_equal(g16, g32, nq), __func__, "%s attention_bwd dqkv", what);

    /* a dqkv in qkv's own type: written (poisoned first), each value the
     * fp32 gradient from zero rounded */
    float *z32 = fzeros(nq);
    uint16_t *dh = xmalloc(nq * sizeof(uint16_t));
    for (size_t i = 0; i < nq; i++) dh[i] = 0x7fc1;
    ffill(s16, n16, NAN);
    ops->attention_bwd(&dev, dh, qt, s16, dout, oh, qh, qt, l16, B, T, C, NH, drop, NULL);
    ffill(s32, n32, NAN);
    ops->attention_bwd(&dev, z32, MT_F32, s32, dout, o32, q, MT_F32, l32, B, T, C, NH, drop, NULL);
    off = not_rounded(dh, z32, nq, fp16);
    report(off == 0, __func__, "%s attention_bwd 16-bit dqkv (%zu of %zu not fp32's rounded)", what,
           off, nq);
    free(z32), free(dh);
    free(q), free(dout), free(s16), free(s32), free(qh), free(oh);
    free(o32), free(l16), free(l32), free(g16), free(g32);
  }
}

/* ---- gelu --------------------------------------------------------------- */

typedef struct {
  size_t n;
  double *x, *r;
} gelu_case;

static double gelu_ref(double x) {
  double u = sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x);
  return 0.5 * x * (1.0 + tanh(u));
}

static double gelu_loss(void *p) {
  gelu_case *g = p;
  double s = 0.0;
  for (size_t i = 0; i < g->n; i++) s += gelu_ref(g->x[i]) * g->r[i];
  return s;
}

static void test_gelu_fwd_matches_reference(size_t n) {
  float *x = frand(n, -5, 5), *out = fzeros(n);
  double *ref = dzeros(n);
  ops->gelu_fwd(&dev, out, MT_F32, x, MT_F32, n);
  for (size_t i = 0; i < n; i++) ref[i] = gelu_ref(x[i]);
  char what[64];
  snprintf(what, sizeof what, "n=%zu out", n);
  check_fwd(__func__, what, out, ref, n);
  free(x), free(out), free(ref);
}

/* The fused op's values are linear_fwd's and gelu_fwd's, bit for bit: the
 * model's results must not depend on which it calls. */
static void test_linear_gelu_fwd_is_linear_then_gelu(int N, int C, int OC, int has_bias) {
  size_t n = (size_t)N * OC;
  float *x = frand((size_t)N * C, -1, 1), *w = frand((size_t)OC * C, -0.5, 0.5),
        *b = frand((size_t)OC, -1, 1);
  float *out = frand(n, -9, 9), *pre = frand(n, -9, 9), *want_pre = fzeros(n), *want = fzeros(n);
  ops->linear_gelu_fwd(&dev, out, pre, MT_F32, x, MT_F32, w, MT_F32, has_bias ? b : NULL, NULL, N,
                       C, OC);
  ops->linear_fwd(&dev, want_pre, MT_F32, x, MT_F32, w, MT_F32, has_bias ? b : NULL, NULL, N, C,
                  OC);
  ops->gelu_fwd(&dev, want, MT_F32, want_pre, MT_F32, n);
  char what[80];
  snprintf(what, sizeof what, "N=%d C=%d OC=%d bias=%s", N, C, OC, has_bias ? "yes" : "NULL");
  report(bits_equal(pre, want_pre, n), __func__, "%s pre = linear_fwd", what);
  report(bits_equal(out, want, n), __func__, "%s out = gelu_fwd(pre)", what);
  free(x), free(w), free(b), free(out), free(pre), free(want_pre), free(want);
}

/* linear_bwd_dgelu's values are linear_bwd's into a zeroed buffer then
 * gelu_bwd's into a zeroed dpre, bit for bit, as the model called them
 * before: its dpre is written (the garbage it held does not show), dw and
 * dbias accumulate as linear_bwd's, scratch may hold anything. Row 0 of dout
 * is zero: with pre < -0.75 there gelu' < 0, so gelu' · 0 is -0, which an
 * accumulation into +0 turns into +0. */
static void test_linear_bwd_dgelu_is_linear_bwd_then_gelu_bwd(int N, int C, int OC, int has_bias) {
  size_t n = (size_t)N * C, no = (size_t)N * OC, nw = (size_t)OC * C;
  float *dout = frand(no, -1, 1), *inp = frand(n, -1, 1), *pre = frand(n, -4, 4),
        *w = frand(nw, -0.5, 0.5);
  ffill(dout, (size_t)OC, 0.0f);
  float *dpre = frand(n, -9, 9), *scratch = frand(n, -9, 9), *dw = frand(nw, -1, 1),
        *db = frand((size_t)OC, -1, 1);
  float *want_dfch = fzeros(n), *want = fzeros(n), *want_dw = fcopy(dw, nw),
        *want_db = fcopy(db, (size_t)OC);
  ops->linear_bwd_dgelu(&dev, dpre, MT_F32, scratch, dw, has_bias ? db : NULL, dout, inp, MT_F32,
                        pre, w, MT_F32, NULL, N, C, OC);
  ops->linear_bwd(&dev, want_dfch, want_dw, has_bias ? want_db : NULL, dout, MT_F32, inp, MT_F32, w,
                  MT_F32, NULL, N, C, OC);
  ops->gelu_bwd(&dev, want, pre, MT_F32, want_dfch, n);
  char what[80];
  snprintf(what, sizeof what, "N=%d C=%d OC=%d dbias=%s", N, C, OC, has_bias ? "yes" : "NULL");
  report(bits_equal(dpre, want, n), __func__, "%s dpre = gelu_bwd(linear_bwd)", what);
  report(bits_equal(dw, want_dw, nw), __func__, "%s dw += linear_bwd's", what);
  report(bits_equal(db, want_db, (size_t)OC), __func__, "%s dbias %s", what,
         has_bias ? "+= linear_bwd's" : "untouched");
  free(dout), free(inp), free(pre), free(w), free(dpre), free(scratch), free(dw), free(db);
  free(want_dfch), free(want), free(want_dw), free(want_db);
}

/* A 16-bit working copy (bf16, fp16) of a matrix, a 16-bit GEMM input and
 * a 16-bit GeLU input are read as the floats they hold: every op that takes
 * them gives the bits fp32 copies of those values give; to_half stores
 * half.h's rounding of each master, and LayerNorm, GeLU and the forward
 * GEMMs writing 16 bits store the rounding of what they write in fp32 (the
 * GEMMs adding the bias's 16-bit copy, which holds the fp32 bias's values). */
static void test_16bit_operands_read_as_their_floats(int N, int C, int OC) {
  size_t nw = (size_t)OC * C, ni = (size_t)N * C, no = (size_t)N * OC;
  for (int fp16 = 0; fp16 <= 1; fp16++) {
    mt_dtype wt = fp16 ? MT_F16 : MT_BF16;
    const char *name = fp16 ? "fp16" : "bf16";
    float *master = frand(nw, -0.5, 0.5), *w = fzeros(nw);
    uint16_t *h = xmalloc(nw * sizeof(uint16_t));
    ops->to_half(&dev, h, master, nw, fp16);
    size_t bad = 0;
    for (size_t i = 0; i < nw; i++) {
      bad += h[i] != mt_half_pack(master[i], fp16);
      w[i] = mt_half_unpack(h[i], fp16);
    }
    report(bad == 0, __func__, "%s to_half: %zu of %zu differ from half.h", name, bad, nw);
    size_t sb = ops->linear_scratch(&dev, N, C, OC, wt, wt);
    report(sb >= (nw + ni + no) * sizeof(float) &&
               ops->linear_scratch(&dev, N, C, OC, MT_F32, MT_F32) == 0,
           __func__,
           "%s linear_scratch %zu bytes for %zu weights, %zu inputs and %zu outputs, 0 for fp32",
           name, sb, nw, ni, no);
    void *cvt = xmalloc(sb);
    float *x = frand(ni, -1, 1), *b = frand((size_t)OC, -1, 1), *dout = frand(no, -1, 1);
    float *pre = frand(ni, -4, 4);
    /* the input, GeLU's input and the bias in 16 bits (xh, preh, bh) and the
     * floats they hold (x, pre and b themselves from here) */
    uint16_t *xh = xmalloc(ni * sizeof(uint16_t)), *preh = xmalloc(ni * sizeof(uint16_t));
    uint16_t *bh = xmalloc((size_t)OC * sizeof(uint16_t));
    ops->to_half(&dev, xh, x, ni, fp16);
    ops->to_half(&dev, preh, pre, ni, fp16);
    ops->to_half(&dev, bh, b, (size_t)OC, fp16);
    for (size_t i = 0; i < ni; i++) x[i] = mt_half_unpack(xh[i], fp16);
    for (size_t i = 0; i < ni; i++) pre[i] = mt_half_unpack(preh[i], fp16);
    for (int i = 0; i < OC; i++) b[i] = mt_half_unpack(bh[i], fp16);

    float *o16 = frand(no, -9, 9), *o32 = fzeros(no), *g16 = frand(no, -9, 9), *g32 = fzeros(no);
    ops->linear_fwd(&dev, o16, MT_F32, xh, wt, h, wt, b, cvt, N, C, OC);
    ops->linear_fwd(&dev, o32, MT_F32, x, MT_F32, w, MT_F32, b, NULL, N, C, OC);
    report(bits_equal(o16, o32, no), __func__, "%s linear_fwd", name);
    ops->linear_gelu_fwd(&dev, g16, o16, MT_F32, xh, wt, h, wt, b, cvt, N, C, OC);
    ops->linear_gelu_fwd(&dev, g32, o32, MT_F32, x, MT_F32, w, MT_F32, b, NULL, N, C, OC);
    report(bits_equal(g16, g32, no) && bits_equal(o16, o32, no), __func__, "%s linear_gelu_fwd",
           name);
    /* 16-bit outputs: the fp32 op's, rounded; linear_gelu_fwd's GeLU of
     * the rounded pre */
    uint16_t *oh = xmalloc(no * sizeof(uint16_t)), *gh = xmalloc(no * sizeof(uint16_t));
    size_t roff = 0;
    ops->linear_fwd(&dev, oh, wt, xh, wt, h, wt, bh, cvt, N, C, OC);
    roff += not_rounded(oh, o32, no, fp16);
    ops->linear_fwd(&dev, oh, wt, xh, wt, h, wt, NULL, cvt, N, C, OC);
    ops->linear_fwd(&dev, o32, MT_F32, x, MT_F32, w, MT_F32, NULL, NULL, N, C, OC);
    roff += not_rounded(oh, o32, no, fp16);
    ops->linear_gelu_fwd(&dev, gh, oh, wt, xh, wt, h, wt, bh, cvt, N, C, OC);
    ops->linear_fwd(&dev, o32, MT_F32, x, MT_F32, w, MT_F32, b, NULL, N, C, OC);
    roff += not_rounded(oh, o32, no, fp16);
    for (size_t i = 0; i < no; i++) o32[i] = mt_round_half(o32[i], fp16);
    ops->gelu_fwd(&dev, g32, MT_F32, o32, MT_F32, no);
    roff += not_rounded(gh, g32, no, fp16);
    report(roff == 0, __func__,
           "%s linear_fwd and linear_gelu_fwd into %s (bias and none): %zu of %zu values not "
           "the fp32 op's rounded",
           name, name, roff, 4 * no);
    free(oh), free(gh);

    float *di16 = frand(ni, -1, 1), *di32 = fcopy(di16, ni), *dw16 = frand(nw, -1, 1),
          *dw32 = fcopy(dw16, nw), *db16 = frand((size_t)OC, -1, 1),
          *db32 = fcopy(db16, (size_t)OC);
    ops->linear_bwd(&dev, di16, dw16, db16, dout, MT_F32, xh, wt, h, wt, cvt, N, C, OC);
    ops->linear_bwd(&dev, di32, dw32, db32, dout, MT_F32, x, MT_F32, w, MT_F32, NULL, N, C, OC);
    report(bits_equal(di16, di32, ni) && bits_equal(dw16, dw32, nw) &&
               bits_equal(db16, db32, (size_t)OC),
           __func__, "%s linear_bwd dinp, dw, dbias", name);
    float *sc = frand(ni, -9, 9);
    ops->linear_bwd_dgelu(&dev, di16, MT_F32, sc, dw16, db16, dout, xh, wt, preh, h, wt, cvt, N, C,
                          OC);
    ops->linear_bwd_dgelu(&dev, di32, MT_F32, sc, dw32, db32, dout, x, MT_F32, pre, w, MT_F32, NULL,
                          N, C, OC);
    report(bits_equal(di16, di32, ni) && bits_equal(dw16, dw32, nw), __func__,
           "%s linear_bwd_dgelu dpre, dw", name);
    /* the MLP's inner gradient in 16 bits: linear_bwd_dgelu's dpre is the
     * fp32 one rounded, and a 16-bit dout gives linear_bwd the bits of the
     * floats it holds */
    uint16_t *dph = xmalloc(ni * sizeof(uint16_t)), *dyh = xmalloc(no * sizeof(uint16_t));
    ops->linear_bwd_dgelu(&dev, dph, wt, sc, dw16, db16, dout, xh, wt, preh, h, wt, cvt, N, C, OC);
    ops->linear_bwd_dgelu(&dev, di32, MT_F32, sc, dw32, db32, dout, x, MT_F32, pre, w, MT_F32, NULL,
                          N, C, OC);
    size_t dpre_off = not_rounded(dph, di32, ni, fp16);
    report(dpre_off == 0 && bits_equal(dw16, dw32, nw) && bits_equal(db16, db32, (size_t)OC),
           __func__,
           "%s linear_bwd_dgelu into a %s dpre: %zu of %zu values not the fp32 one's "
           "rounded; dw, dbias the same",
           name, name, dpre_off, ni);
    float *dyf = fzeros(no);
    ops->to_half(&dev, dyh, dout, no, fp16);
    for (size_t i = 0; i < no; i++) dyf[i] = mt_half_unpack(dyh[i], fp16);
    ops->linear_bwd(&dev, di16, dw16, db16, dyh, wt, xh, wt, h, wt, cvt, N, C, OC);
    ops->linear_bwd(&dev, di32, dw32, db32, dyf, MT_F32, x, MT_F32, w, MT_F32, NULL, N, C, OC);
    report(bits_equal(di16, di32, ni) && bits_equal(dw16, dw32, nw) &&
               bits_equal(db16, db32, (size_t)OC),
           __func__, "%s linear_bwd of a %s dout: dinp, dw, dbias", name, name);
    free(dph), free(dyh), free(dyf);

    /* the embedding lookups: (OC, C) as a vocabulary of OC rows; T = N */
    int32_t *tok = xmalloc((size_t)N * sizeof(int32_t));
    for (int i = 0; i < N; i++) tok[i] = (int32_t)(rng_u64() % (uint64_t)OC);
    float *wpe = frand(ni, -1, 1), *e16 = frand(ni, -9, 9), *e32 = fzeros(ni);
    ops->embedding_fwd(&dev, e16, tok, h, wt, wpe, 1, N, C);
    ops->embedding_fwd(&dev, e32, tok, w, MT_F32, wpe, 1, N, C);
    report(bits_equal(e16, e32, ni), __func__, "%s embedding_fwd", name);
    int v0 = OC / 3, Vl = OC / 2;
    ops->embedding_shard_fwd(&dev, e16, tok, h + (size_t)v0 * C, wt, v0, Vl, N, C);
    ops->embedding_shard_fwd(&dev, e32, tok, w + (size_t)v0 * C, MT_F32, v0, Vl, N, C);
    report(bits_equal(e16, e32, ni), __func__, "%s embedding_shard_fwd", name);

    /* LayerNorm and GeLU writing 16 bits: the fp32 op's values, rounded */
    float *lw = frand((size_t)C, 0.5, 1.5), *lb = frand((size_t)C, -0.5, 0.5), *mean = fzeros(N),
          *rstd = fzeros(N), *l32 = fzeros(ni);
    uint16_t *l16 = xmalloc(ni * sizeof(uint16_t));
    ops->layernorm_fwd(&dev, l32, MT_F32, mean, rstd, pre, lw, lb, N, C, 1e-5f);
    ops->layernorm_fwd(&dev, l16, wt, mean, rstd, pre, lw, lb, N, C, 1e-5f);
    size_t off = 0;
    off += not_rounded(l16, l32, ni, fp16);
    ops->gelu_fwd(&dev, l32, MT_F32, pre, MT_F32, ni);
    ops->gelu_fwd(&dev, l16, wt, pre, MT_F32, ni);
    off += not_rounded(l16, l32, ni, fp16);
    ops->gelu_fwd(&dev, l16, wt, preh, wt, ni);
    off += not_rounded(l16, l32, ni, fp16);
    report(off == 0, __func__,
           "%s layernorm_fwd and gelu_fwd (of fp32 and %s): %zu of %zu values not the fp32 "
           "op's rounded",
           name, name, off, 3 * ni);
    float *gg32 = frand(ni, -1, 1), *gg16 = fcopy(gg32, ni); /* accumulated into */
    ops->gelu_bwd(&dev, gg32, pre, MT_F32, x, ni);
    ops->gelu_bwd(&dev, gg16, preh, wt, x, ni);
    report(bits_equal(gg16, gg32, ni), __func__, "%s gelu_bwd of a 16-bit input", name);
    free(gg32), free(gg16), free(preh), free(bh);
    free(lw), free(lb), free(mean), free(rstd), free(l32), free(l16), free(xh);

    free(master), free(w), free(h), free(cvt), free(x), free(b), free(dout), free(pre);
    free(o16), free(o32), free(g16), free(g32), free(di16), free(di32), free(dw16), free(dw32);
    free(db16), free(db32), free(sc), free(tok), free(wpe), free(e16), free(e32);
  }
}

static void test_gelu_bwd_matches_finite_differences(size_t n) {
  float *x = frand(n, -5, 5), *r = frand(n, -1, 1), *g = fzeros(n);
  gelu_case c = {n, dcopy(x, n), dcopy(r, n)};
  ops->gelu_bwd(&dev, g, x, MT_F32, r, n);
  char what[64];
  snprintf(what, sizeof what, "n=%zu dinp", n);
  check_grad(__func__, what, gelu_loss, &c, c.x, n, g);
  float *acc = fzeros(n);
  ffill(acc, n, PREFILL);
  ops->gelu_bwd(&dev, acc, x, MT_F32, r, n);
  check_accumulates(__func__, "dinp accumulates", acc, g, n);
  free(x), free(r), free(g), free(acc), free(c.x), free(c.r);
}

/* ---- residual, add_inplace, scale, sumsq -------------------------------- */

static void test_residual_fwd_is_sum_and_may_alias(void) {
  size_t n = 100003;
  float *a = frand(n, -1, 1), *b = frand(n, -1, 1), *out = fzeros(n);
  double *ref = dzeros(n);
  for (size_t i = 0; i < n; i++) ref[i] = (double)a[i] + b[i];
  ops->residual_fwd(&dev, out, a, b, n);
  check_fwd(__func__, "out = a + b", out, ref, n);
  float *a2 = fcopy(a, n);
  ops->residual_fwd(&dev, a2, a2, b, n);
  report(bits_equal(a2, out, n), __func__, "out aliasing a gives the same result");
  float *b2 = fcopy(b, n);
  ops->residual_fwd(&dev, b2, a, b2, n);
  report(bits_equal(b2, out, n), __func__, "out aliasing b gives the same result");
  free(a), free(b), free(out), free(ref), free(a2), free(b2);
}

static void test_add_inplace_accumulates(void) {
  size_t n = 77777;
  float *dst = frand(n, -1, 1), *src = frand(n, -1, 1);
  double *ref = dzeros(n);
  for (size_t i = 0; i < n; i++) ref[i] = (double)dst[i] + src[i];
  ops->add_inplace(&dev, dst, src, n);
  check_fwd(__func__, "dst += src", dst, ref, n);
  free(dst), free(src), free(ref);
}

static void test_scale_multiplies(void) {
  size_t n = 50001;
  float *x = frand(n, -1, 1);
  double *ref = dzeros(n);
  for (size_t i = 0; i < n; i++) ref[i] = (double)x[i] * 0.37;
  ops->scale(&dev, x, 0.37f, n);
  check_fwd(__func__, "x *= 0.37", x, ref, n);
  free(x), free(ref);
}

static void test_sumsq_matches_double_sum(void) {
  size_t sizes[] = {1, 13, 100003};
  for (int k = 0; k < 3; k++) {
    size_t n = sizes[k];
    float *x = frand(n, -3, 3);
    double ref = 0.0;
    for (size_t i = 0; i < n; i++) ref += (double)x[i] * x[i];
    double got = ops->sumsq(&dev, x, n);
    double r = fabs(got - ref) / ref;
    report(r < 1e-12, __func__, "n=%zu rel %.2e (accumulated in double)", n, r);
    free(x);
  }
}

/* sumsq_multi is sumsq span by span, added in span order: the same bits, so
 * a trainer's gradient norm stays the one it added up tensor by tensor.
 * Empty spans among them (one of them NULL, which must not be read), spans
 * on sumsq's parallel path, and no spans at all. */
static void test_sumsq_multi_is_sumsq_span_by_span(void) {
  size_t sizes[] = {13, 0, 100003, 1, 0, 4097, 250000, 7, 0};
  enum { K = sizeof sizes / sizeof *sizes };
  size_t total = 0;
  for (int k = 0; k < K; k++) total += sizes[k];
  float *x = frand(total, -3, 3);
  mt_sumsq_span s[K];
  double want = 0.0, ref = 0.0;
  size_t off = 0;
  for (int k = 0; k < K; k++) {
    s[k] = (mt_sumsq_span){k == K - 1 ? NULL : x + off, sizes[k]};
    if (s[k].x) want += ops->sumsq(&dev, s[k].x, sizes[k]);
    for (size_t i = 0; i < sizes[k]; i++) ref += (double)x[off + i] * x[off + i];
    off += sizes[k];
  }
  double got = ops->sumsq_multi(&dev, s, K);
  report(!memcmp(&got, &want, sizeof got), __func__,
         "%d spans: %.17g, sumsq span by span %.17g (the same bits)", K, got, want);
  double r = fabs(got - ref) / ref;
  report(r < 1e-12, __func__, "rel %.2e to a sequential double sum", r);
  got = ops->sumsq_multi(&dev, s, 0);
  report(got == 0.0, __func__, "no spans: %g", got);
  got = ops->sumsq_multi(&dev, s + 1, 1);
  report(got == 0.0, __func__, "one empty span: %g", got);
  free(x);
}

/* count_zeros counts +0 and -0, not NaN or the smallest subnormal, over
 * spans on the serial and the parallel path, an empty (NULL) one among
 * them, with zeros between the spans that a read past a span would count. */
static void test_count_zeros_counts_both_signed_zeros(void) {
  size_t sizes[] = {13, 0, 100003, 1, 250000};
  enum { K = sizeof sizes / sizeof *sizes };
  size_t total = 0;
  for (int k = 0; k < K; k++) total += sizes[k] + 1;
  float *x = frand(total, -3, 3);
  mt_sumsq_span s[K];
  int64_t want = 0;
  size_t off = 0;
  for (int k = 0; k < K; k++) {
    for (size_t i = 0; i < sizes[k]; i++) {
      int r = (int)((off + i) * 2654435761u % 11);
      float *v = &x[off + i];
      *v = r == 0 ? 0.0f : r == 1 ? -0.0f : r == 2 ? 1e-45f : r == 3 ? NAN : *v;
      want += r < 2;
    }
    x[off + sizes[k]] = 0.0f; /* between the spans: not counted */
    s[k] = (mt_sumsq_span){k == 1 ? NULL : x + off, sizes[k]};
    off += sizes[k] + 1;
  }
  int64_t got = ops->count_zeros(&dev, s, K);
  report(got == want && want > 0, __func__, "%d spans: %lld zeros, counted here %lld", K,
         (long long)got, (long long)want);
  got = ops->count_zeros(&dev, s, 0);
  report(got == 0, __func__, "no spans: %lld", (long long)got);
  free(x);
}

/* ---- dropout ------------------------------------------------------------ */

typedef struct {
  int B;
  size_t ps;
  const mt_dropout *drop;
  double *x, *r;
} drop_case;

static double drop_loss(void *p) {
  drop_case *c = p;
  double s = 0.0;
  for (int b = 0; b < c->B; b++)
    for (size_t e = 0; e < c->ps; e++) {
      size_t i = (size_t)b * c->ps + e;
      s += c->x[i] * mt_dropout_scale(c->drop->p, c->drop->key, c->drop->sample0 + (uint64_t)b, e) *
           c->r[i];
    }
  return s;
}

static void test_dropout_p0_and_null_are_identity(void) {
  int B = 3;
  size_t ps = 1001, n = (size_t)B * ps;
  mt_dropout d0 = {0.0f, 77, 5, 0, 0};
  float *x = frand(n, -1, 1), *out = frand(n, -9, 9);
  ops->dropout_fwd(&dev, out, x, B, ps, &d0);
  report(bits_equal(out, x, n), __func__, "fwd with p = 0 copies");
  ffill(out, n, 3.0f);
  ops->dropout_fwd(&dev, out, x, B, ps, NULL);
  report(bits_equal(out, x, n), __func__, "fwd with NULL copies");
  float *y = fcopy(x, n);
  ops->dropout_fwd(&dev, y, y, B, ps, &d0);
  report(bits_equal(y, x, n), __func__, "fwd in place with p = 0 leaves the input");
  float *g = frand(n, -1, 1), *acc = fzeros(n), *acc0 = fzeros(n);
  ffill(acc, n, PREFILL), ffill(acc0, n, PREFILL);
  ops->dropout_bwd(&dev, acc, g, B, ps, NULL);
  ops->dropout_bwd(&dev, acc0, g, B, ps, &d0);
  check_accumulates(__func__, "bwd with NULL adds dout", acc, g, n);
  check_accumulates(__func__, "bwd with p = 0 adds dout", acc0, g, n);
  free(x), free(out), free(y), free(g), free(acc), free(acc0);
}

/* The fused branch-join: resid + dropout(branch) with dropout_fwd's masks,
 * against double; in place on resid; a plain residual add without dropout. */
static void test_dropout_residual_fwd_is_dropout_then_add(void) {
  int B = 3;
  size_t ps = 5003, n = (size_t)B * ps;
  mt_dropout d = {0.2f, mt_philox_key(3, "h.0.attn_out"), 40, 0, 0};
  float *x = frand(n, -1, 1), *r = frand(n, -2, 2), *x0 = fcopy(x, n), *out = frand(n, -9, 9);
  double *want = dzeros(n);
  for (int bi = 0; bi < B; bi++)
    for (size_t e = 0; e < ps; e++) {
      size_t i = (size_t)bi * ps + e;
      want[i] = r[i] + (double)x[i] * mt_dropout_scale(d.p, d.key, d.sample0 + (uint64_t)bi, e);
    }
  ops->dropout_residual_fwd(&dev, out, NULL, MT_F32, r, x, B, ps, &d);
  check_fwd(__func__, "resid + dropout(branch)", out, want, n);
  report(bits_equal(x, x0, n), __func__, "the branch is left as it was");
  float *y = fcopy(r, n);
  ops->dropout_residual_fwd(&dev, y, NULL, MT_F32, y, x, B, ps, &d);
  report(bits_equal(y, out, n), __func__, "out aliasing resid gives the same");
  for (size_t i = 0; i < n; i++) want[i] = (double)r[i] + x[i];
  ops->dropout_residual_fwd(&dev, out, NULL, MT_F32, r, x, B, ps, NULL);
  check_fwd(__func__, "no dropout: resid + branch", out, want, n);
  free(x), free(r), free(x0), free(out), free(y), free(want);
}

/* A piece of each sample (elem0: sequence parallelism's rows of a rank)
 * gets the masks the whole samples give those elements, at every offset
 * modulo a Philox block's four, forward, fused and backward. */
static void test_dropout_piece_matches_whole_sample(void) {
  int B = 2;
  size_t ps = 1031, n = (size_t)B * ps;
  mt_dropout d = {0.3f, mt_philox_key(9, "h.2.attn_out"), 17, 0, 0};
  float *x = frand(n, -1, 1), *r = frand(n, -1, 1), *whole = fzeros(n), *fused = fzeros(n);
  float *back = frand(n, -1, 1), *back0 = fcopy(back, n);
  ops->dropout_fwd(&dev, whole, x, B, ps, &d);
  ops->dropout_residual_fwd(&dev, fused, NULL, MT_F32, r, x, B, ps, &d);
  ops->dropout_bwd(&dev, back, x, B, ps, &d);
  int ok = 1;
  for (size_t e0 = 0; e0 < 8; e0++) {
    size_t len = ps - e0 - 5;
    for (int bi = 0; bi < B; bi++) {
      size_t at = (size_t)bi * ps + e0;
      mt_dropout piece = d;
      piece.sample0 = d.sample0 + (uint64_t)bi, piece.elem0 = e0;
      float *y = fzeros(len), *z = fzeros(len), *w = fcopy(back0 + at, len);
      ops->dropout_fwd(&dev, y, x + at, 1, len, &piece);
      ops->dropout_residual_fwd(&dev, z, NULL, MT_F32, r + at, x + at, 1, len, &piece);
      ops->dropout_bwd(&dev, w, x + at, 1, len, &piece);
      ok &= bits_equal(y, whole + at, len) && bits_equal(z, fused + at, len) &&
            bits_equal(w, back + at, len);
      free(y), free(z), free(w);
    }
  }
  report(ok, __func__, "pieces at offsets 0..7 of both samples, every op");
  free(x), free(r), free(whole), free(fused), free(back), free(back0);
}

/* A 16-bit job's stream: the fused op rounds the sum as pack_half (with the
 * bits) or round_half (without) does after the fp32 op, bit for bit, with
 * and without dropout, in place on resid too. */
static void test_dropout_residual_fwd_rounds_like_pack_half(void) {
  int B = 2;
  size_t ps = 4099, n = (size_t)B * ps;
  mt_dropout d = {0.1f, mt_philox_key(5, "h.1.mlp_out"), 7, 0, 0};
  float *x = frand(n, -3, 3), *r = frand(n, -3, 3);
  float *want = fzeros(n), *out = fzeros(n), *y = fzeros(n);
  uint16_t *want_h = xmalloc(n * sizeof *want_h), *h = xmalloc(n * sizeof *h);
  for (int t = MT_BF16; t <= MT_F16; t++) {
    for (int drop = 0; drop < 2; drop++) {
      const mt_dropout *dp = drop ? &d : NULL;
      char what[64];
      snprintf(what, sizeof what, "%s, %s", t == MT_F16 ? "fp16" : "bf16",
               drop ? "dropout" : "no dropout");
      ops->dropout_residual_fwd(&dev, want, NULL, MT_F32, r, x, B, ps, dp);
      ops->pack_half(&dev, want_h, want, n, t == MT_F16);
      memset(h, 0xff, n * sizeof *h);
      ops->dropout_residual_fwd(&dev, out, h, (mt_dtype)t, r, x, B, ps, dp);
      report(bits_equal(out, want, n) && !memcmp(h, want_h, n * sizeof *h), __func__,
             "%s: values and bits", what);
      memcpy(y, r, n * sizeof *y);
      ops->dropout_residual_fwd(&dev, y, NULL, (mt_dtype)t, y, x, B, ps, dp);
      report(bits_equal(y, want, n), __func__, "%s: without the bits, in place on resid", what);
    }
  }
  free(x), free(r), free(want), free(out), free(y), free(want_h), free(h);
}

static void test_dropout_half_keeps_about_half_scaled_by_two(void) {
  int B = 4;
  size_t ps = 25013, n = (size_t)B * ps;
  mt_dropout d = {0.5f, mt_philox_key(1, "test.dropout"), 1000, 0, 0};
  float *x = frand(n, 0.5, 1.5), *out = fzeros(n);
  ops->dropout_fwd(&dev, out, x, B, ps, &d);
  size_t kept = 0, wrong = 0;
  for (size_t i = 0; i < n; i++) {
    if (out[i] != 0.0f) kept++;
    if (out[i] != 0.0f && out[i] != 2.0f * x[i]) wrong++;
  }
  double frac = (double)kept / (double)n;
  report(frac > 0.49 && frac < 0.51, __func__, "kept fraction %.4f of %zu", frac, n);
  report(wrong == 0, __func__, "kept elements are exactly 2x (%zu wrong)", wrong);
  free(x), free(out);
}

static void test_dropout_mask_same_in_fwd_bwd_and_any_batch_split(void) {
  int B = 4;
  size_t ps = 10007, n = (size_t)B * ps;
  mt_dropout d = {0.3f, mt_philox_key(7, "h.1.attn.resid"), 100, 0, 0};
  float *ones = fzeros(n), *fwd = fzeros(n), *bwd = fzeros(n);
  ffill(ones, n, 1.0f);
  ops->dropout_fwd(&dev, fwd, ones, B, ps, &d);
  ops->dropout_bwd(&dev, bwd, ones, B, ps, &d);
  report(bits_equal(fwd, bwd, n), __func__, "fwd and bwd use the same mask");
  /* samples 2..3 run as their own batch: sample0 moves by 2, the mask must not */
  mt_dropout d2 = d;
  d2.sample0 = d.sample0 + 2;
  float *half = fzeros(2 * ps);
  ops->dropout_fwd(&dev, half, ones, 2, ps, &d2);
  report(bits_equal(half, fwd + 2 * ps, 2 * ps), __func__,
         "rows 2..3 alone (sample0 + 2) give the same mask as in the full batch");
  int rows_differ = !bits_equal(fwd, fwd + ps, ps);
  report(rows_differ, __func__, "different samples get different masks");
  float *inplace = fcopy(ones, n);
  ops->dropout_fwd(&dev, inplace, inplace, B, ps, &d);
  report(bits_equal(inplace, fwd, n), __func__, "fwd in place gives the same result");
  free(ones), free(fwd), free(bwd), free(half), free(inplace);
}

static void test_dropout_fwd_matches_reference(void) {
  int B = 2;
  size_t ps = 97, n = (size_t)B * ps;
  mt_dropout d = {0.3f, 99, 4, 0, 0};
  float *x = frand(n, -1, 1), *out = fzeros(n);
  double *ref = dzeros(n);
  for (int b = 0; b < B; b++)
    for (size_t e = 0; e < ps; e++)
      ref[(size_t)b * ps + e] =
          x[(size_t)b * ps + e] * (double)mt_dropout_scale(d.p, d.key, d.sample0 + b, e);
  ops->dropout_fwd(&dev, out, x, B, ps, &d);
  check_fwd(__func__, "p=0.3 out", out, ref, n);
  free(x), free(out), free(ref);
}

static void test_dropout_bwd_matches_finite_differences(void) {
  int B = 2;
  size_t ps = 97, n = (size_t)B * ps;
  mt_dropout d = {0.3f, 99, 4, 0, 0};
  float *x = frand(n, -1, 1), *r = frand(n, -1, 1), *g = fzeros(n);
  drop_case c = {B, ps, &d, dcopy(x, n), dcopy(r, n)};
  ops->dropout_bwd(&dev, g, r, B, ps, &d);
  check_grad(__func__, "p=0.3 dinp", drop_loss, &c, c.x, n, g);
  float *acc = fzeros(n);
  ffill(acc, n, PREFILL);
  ops->dropout_bwd(&dev, acc, r, B, ps, &d);
  check_accumulates(__func__, "dinp", acc, g, n);
  free(x), free(r), free(g), free(acc), free(c.x), free(c.r);
}

/* ---- cross-entropy ------------------------------------------------------ */

typedef struct {
  int N, V, Vp;
  float dloss;
  int32_t *tg;
  double *x;
} ce_case;

static void ce_ref(double *losses, const double *x, const int32_t *tg, int N, int V, int Vp) {
  for (int n = 0; n < N; n++) {
    const double *row = x + (size_t)n * Vp;
    double mx = -INFINITY, s = 0.0;
    for (int j = 0; j < V; j++) mx = row[j] > mx ? row[j] : mx;
    for (int j = 0; j < V; j++) s += exp(row[j] - mx);
    losses[n] = mx + log(s) - row[tg[n]];
  }
}

static double ce_loss(void *p) { /* dloss · Σ losses */
  ce_case *c = p;
  double *l = dzeros((size_t)c->N);
  ce_ref(l, c->x, c->tg, c->N, c->V, c->Vp);
  double s = 0.0;
  for (int n = 0; n < c->N; n++) s += l[n];
  free(l);
  return c->dloss * s;
}

/* logits of scale 3, one row shifted by +1000 (max-subtraction must hold),
 * padded columns set to `pad` */
static float *ce_logits(int N, int V, int Vp, float pad) {
  float *x = frand((size_t)N * Vp, -3, 3);
  for (int j = 0; j < V; j++) x[j] += 1000.0f;
  for (int n = 0; n < N; n++)
    for (int j = V; j < Vp; j++) x[(size_t)n * Vp + j] = pad;
  return x;
}

static int32_t *ce_targets(int N, int V) {
  int32_t *tg = xmalloc((size_t)N * sizeof(int32_t));
  for (int n = 0; n < N; n++) tg[n] = (int32_t)(rng_u64() % (uint64_t)V);
  tg[N - 1] = V - 1;
  return tg;
}

/* dlogits against the exact gradient, element by element: dloss · (softmax -
 * onehot) in double. Finite differences over a 200-element sample at V=1000
 * missed a gradient without the target's softmax term (the term is 1/V of
 * the row's). */
static void test_crossentropy_bwd_is_softmax_minus_onehot(int N, int V, int Vp) {
  float *x = ce_logits(N, V, Vp, 0.5f), *dl = frand((size_t)N * Vp, -9, 9);
  int32_t *tg = ce_targets(N, V);
  const float dloss = 0.37f;
  ops->crossentropy(&dev, NULL, dl, x, tg, dloss, N, V, Vp);
  double worst = 0;
  for (int n = 0; n < N; n++) {
    const float *row = x + (size_t)n * Vp;
    double mx = -INFINITY, sum = 0;
    for (int v = 0; v < V; v++) mx = row[v] > mx ? row[v] : mx;
    for (int v = 0; v < V; v++) sum += exp((double)row[v] - mx);
    for (int v = 0; v < Vp; v++) {
      double want = v < V ? dloss * (exp((double)row[v] - mx) / sum - (v == tg[n])) : 0.0;
      double err = fabs(dl[(size_t)n * Vp + v] - want) / (fabs(want) + 1e-3 / V);
      worst = err > worst ? err : worst;
    }
  }
  report(worst < 1e-4, __func__, "N=%d V=%d Vp=%d: worst relative error %.2e per element", N, V, Vp,
         worst);
  free(x), free(dl), free(tg);
}

static void test_crossentropy_fwd_matches_reference(int N, int V, int Vp) {
  float *x = ce_logits(N, V, Vp, 0.5f), *losses = frand((size_t)N, -9, 9);
  int32_t *tg = ce_targets(N, V);
  double *dx = dcopy(x, (size_t)N * Vp), *ref = dzeros((size_t)N);
  ops->crossentropy(&dev, losses, NULL, x, tg, 1.0f, N, V, Vp);
  ce_ref(ref, dx, tg, N, V, Vp);
  char what[64];
  snprintf(what, sizeof what, "N=%d V=%d Vp=%d losses", N, V, Vp);
  check_fwd(__func__, what, losses, ref, (size_t)N);
  free(x), free(losses), free(tg), free(dx), free(ref);
}

static void test_crossentropy_bwd_matches_finite_differences(int N, int V, int Vp) {
  float *x = ce_logits(N, V, Vp, 0.5f), *dl = frand((size_t)N * Vp, -9, 9);
  int32_t *tg = ce_targets(N, V);
  ce_case c = {N, V, Vp, 0.37f, tg, dcopy(x, (size_t)N * Vp)};
  ops->crossentropy(&dev, NULL, dl, x, tg, c.dloss, N, V, Vp);
  char what[64];
  snprintf(what, sizeof what, "N=%d V=%d Vp=%d dlogits (written, not accumulated)", N, V, Vp);
  check_grad(__func__, what, ce_loss, &c, c.x, (size_t)N * Vp, dl);
  free(x), free(dl), free(tg), free(c.x);
}

static void test_crossentropy_ignores_padded_columns(void) {
  int N = 13, V = 37, Vp = 40;
  float *x = ce_logits(N, V, Vp, 0.5f), *huge = fcopy(x, (size_t)N * Vp);
  for (int n = 0; n < N; n++)
    for (int j = V; j < Vp; j++) huge[(size_t)n * Vp + j] = (j & 1) ? 1e30f : -1e30f;
  int32_t *tg = ce_targets(N, V);
  float *l1 = fzeros((size_t)N), *l2 = fzeros((size_t)N);
  float *d1 = frand((size_t)N * Vp, -9, 9), *d2 = frand((size_t)N * Vp, -9, 9);
  ops->crossentropy(&dev, l1, d1, x, tg, 0.5f, N, V, Vp);
  ops->crossentropy(&dev, l2, d2, huge, tg, 0.5f, N, V, Vp);
  report(bits_equal(l1, l2, (size_t)N) && bits_equal(d1, d2, (size_t)N * Vp), __func__,
         "padded logits of +-1e30 change neither losses nor dlogits");
  int pad_zero = 1;
  for (int n = 0; n < N; n++)
    for (int j = V; j < Vp; j++) pad_zero &= d1[(size_t)n * Vp + j] == 0.0f;
  report(pad_zero, __func__, "dlogits are written 0 in padded columns");
  /* in place: dlogits aliasing logits */
  float *inplace = fcopy(x, (size_t)N * Vp), *l3 = fzeros((size_t)N);
  ops->crossentropy(&dev, l3, inplace, inplace, tg, 0.5f, N, V, Vp);
  report(bits_equal(l3, l1, (size_t)N) && bits_equal(inplace, d1, (size_t)N * Vp), __func__,
         "dlogits aliasing logits gives the same losses and dlogits");
  free(x), free(huge), free(tg), free(l1), free(l2), free(d1), free(d2), free(inplace), free(l3);
}

/* Targets of MT_TARGET_IGNORE (Megatron's loss mask): those rows' losses are
 * 0 and their dlogits rows all 0, written over whatever was there (in place
 * too); every other row is bit for bit what it is with a real target there,
 * rows being independent. The vocabulary-parallel pieces alike: the ignored
 * row's target logit 0 and gradient row 0 in each of two shards, the other
 * rows unchanged. */
static void test_crossentropy_ignored_targets_give_no_loss_and_no_gradient(int N, int V, int Vp) {
  float *x = ce_logits(N, V, Vp, 0.5f);
  int32_t *tg = ce_targets(N, V), *masked = xmalloc((size_t)N * sizeof(int32_t));
  int ignored[3] = {0, N / 2, N - 1};
  memcpy(masked, tg, (size_t)N * sizeof(int32_t));
  for (int i = 0; i < 3; i++) masked[ignored[i]] = MT_TARGET_IGNORE;
  masked[N / 2] = -7; /* any negative id is ignored */
  float *l1 = fzeros((size_t)N), *l2 = frand((size_t)N, -9, 9);
  float *d1 = frand((size_t)N * Vp, -9, 9), *d2 = frand((size_t)N * Vp, -9, 9);
  ops->crossentropy(&dev, l1, d1, x, tg, 0.37f, N, V, Vp);
  ops->crossentropy(&dev, l2, d2, x, masked, 0.37f, N, V, Vp);
  int zero = 1, same = 1;
  for (int n = 0; n < N; n++) {
    int ign = masked[n] < 0;
    const float *a = d1 + (size_t)n * Vp, *b = d2 + (size_t)n * Vp;
    if (ign) {
      zero &= l2[n] == 0.0f;
      for (int j = 0; j < Vp; j++) zero &= b[j] == 0.0f;
    } else {
      same &= l1[n] == l2[n] && bits_equal(a, b, (size_t)Vp);
    }
  }
  report(zero && same, __func__,
         "N=%d V=%d Vp=%d: ignored rows loss 0 and dlogits 0 (%s), the others unchanged (%s)", N, V,
         Vp, zero ? "yes" : "NO", same ? "yes" : "NO");
  float *inplace = fcopy(x, (size_t)N * Vp), *l3 = fzeros((size_t)N);
  ops->crossentropy(&dev, l3, inplace, inplace, masked, 0.37f, N, V, Vp);
  report(bits_equal(l3, l2, (size_t)N) && bits_equal(inplace, d2, (size_t)N * Vp), __func__,
         "N=%d: dlogits aliasing logits gives the same with ignored rows", N);
  float *l4 = frand((size_t)N, -9, 9);
  ops->crossentropy(&dev, l4, NULL, x, masked, 0.0f, N, V, Vp);
  report(bits_equal(l4, l2, (size_t)N), __func__, "N=%d: losses alone the same", N);

  /* two vocabulary shards of Vl = Vp / 2 columns */
  int Vl = Vp / 2, ok = 1;
  float *gmax = fzeros((size_t)N), *mx = fzeros((size_t)N), *gsum = fzeros((size_t)N);
  float *sum = fzeros(2 * (size_t)N), *xt = fzeros((size_t)N);
  float *shard = fzeros((size_t)N * Vl), *g1 = fzeros((size_t)N * Vl);
  float *g2 = frand((size_t)N * Vl, -9, 9);
  for (int pass = 0; pass < 2; pass++) /* the global max, then the global sum */
    for (int s = 0; s < 2; s++) {
      int v0 = s * Vl, real = V - v0 < 0 ? 0 : V - v0 > Vl ? Vl : V - v0;
      for (int n = 0; n < N; n++)
        memcpy(shard + (size_t)n * Vl, x + (size_t)n * Vp + v0, (size_t)Vl * sizeof(float));
      if (pass == 0) {
        ops->crossentropy_shard_max(&dev, mx, shard, N, real, Vl);
        for (int n = 0; n < N; n++) gmax[n] = s == 0 || mx[n] > gmax[n] ? mx[n] : gmax[n];
      } else {
        ops->crossentropy_shard_sum(&dev, sum, sum + N, shard, masked, gmax, N, real, Vl, v0);
        for (int n = 0; n < N; n++) gsum[n] += sum[n];
        for (int n = 0; n < N; n++)
          if (masked[n] < 0) ok &= sum[N + n] == 0.0f;
      }
    }
  for (int s = 0; s < 2; s++) {
    int v0 = s * Vl, real = V - v0 < 0 ? 0 : V - v0 > Vl ? Vl : V - v0;
    for (int n = 0; n < N; n++)
      memcpy(shard + (size_t)n * Vl, x + (size_t)n * Vp + v0, (size_t)Vl * sizeof(float));
    ops->crossentropy_shard_grad(&dev, g1, shard, tg, gmax, gsum, 0.37f, N, real, Vl, v0);
    ops->crossentropy_shard_grad(&dev, g2, shard, masked, gmax, gsum, 0.37f, N, real, Vl, v0);
    for (int n = 0; n < N; n++) {
      const float *a = g1 + (size_t)n * Vl, *b = g2 + (size_t)n * Vl;
      if (masked[n] < 0)
        for (int j = 0; j < Vl; j++) ok &= b[j] == 0.0f;
      else
        ok &= bits_equal(a, b, (size_t)Vl);
    }
  }
  report(ok, __func__,
         "N=%d V=%d Vp=%d: two vocabulary shards: ignored rows' target logit and gradient 0, the "
         "others unchanged",
         N, V, Vp);
  free(x), free(tg), free(masked), free(l1), free(l2), free(d1), free(d2), free(inplace);
  free(l3), free(l4), free(gmax), free(mx), free(gsum), free(sum), free(xt), free(shard);
  free(g1), free(g2);
}

/* ---- adamw -------------------------------------------------------------- */

static void test_adamw_matches_reference_over_three_steps(size_t n, float wd) {
  const float lr = 1e-2f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f, gs = 0.5f;
  float *p = frand(n, -1, 1), *m = fzeros(n), *v = fzeros(n), *p0 = fcopy(p, n);
  double *rp = dcopy(p, n), *rm = dzeros(n), *rv = dzeros(n);
  for (int t = 1; t <= 3; t++) {
    float *g = frand(n, -2, 2);
    ops->adamw(&dev, p, g, m, v, n, lr, b1, b2, eps, wd, gs, t);
    double bc1 = 1.0 - pow(b1, t), bc2 = 1.0 - pow(b2, t);
    for (size_t i = 0; i < n; i++) {
      double gg = (double)g[i] * gs;
      rm[i] = b1 * rm[i] + (1.0 - b1) * gg;
      rv[i] = b2 * rv[i] + (1.0 - b2) * gg * gg;
      rp[i] -= lr * ((rm[i] / bc1) / (sqrt(rv[i] / bc2) + eps) + wd * rp[i]);
    }
    free(g);
  }
  /* compare the updates, not the parameters, so a small error cannot hide */
  float *dp = fzeros(n);
  double *rdp = dzeros(n);
  for (size_t i = 0; i < n; i++) {
    dp[i] = p[i] - p0[i];
    rdp[i] = rp[i] - p0[i];
  }
  char what[64];
  snprintf(what, sizeof what, "n=%zu wd=%.1f param update", n, wd);
  double r = rel_err(dp, rdp, n);
  report(r < GRAD_TOL, __func__, "%s rel %.2e", what, r);
  check_fwd(__func__, "m", m, rm, n);
  check_fwd(__func__, "v", v, rv, n);
  free(p), free(m), free(v), free(p0), free(rp), free(rm), free(rv), free(dp), free(rdp);
}

/* ---- main --------------------------------------------------------------- */

int main(void) {
  if (mt_device_open(&dev, "cpu:0")) {
    fprintf(stderr, "test_ops: cannot open cpu:0\n");
    return 1;
  }
  ops = dev.ops;
  printf("test_ops: backend %s, %d threads\n", ops->name, dev.threads);

  /* small odd shapes: B=2 T=7 C=12 NH=3 N=13 V=37 Vp=40 OC=9, then larger ones
   * that take the parallel paths */
  test_embedding_fwd_matches_reference(2, 7, 12, 37, 40);
  test_embedding_fwd_matches_reference(4, 33, 256, 500, 512);
  test_embedding_bwd_matches_finite_differences(2, 7, 12, 37, 40);
  test_embedding_bwd_matches_finite_differences(4, 33, 256, 500, 512);
  test_embedding_bwd_accumulates();

  test_layernorm_fwd_matches_reference(13, 12);
  test_layernorm_fwd_matches_reference(130, 256);
  test_layernorm_bwd_matches_finite_differences(13, 12);
  test_layernorm_bwd_matches_finite_differences(130, 256);
  /* past one 1024-column tile: hidden 20480 takes these paths */
  test_layernorm_fwd_matches_reference(3, 2500);
  test_layernorm_bwd_matches_finite_differences(3, 2500);
  test_layernorm_bwd_accumulates();

  test_linear_fwd_matches_reference(13, 12, 9, 1);
  test_linear_fwd_matches_reference(13, 12, 9, 0);
  test_linear_fwd_matches_reference(130, 32, 260, 1);
  test_linear_bwd_matches_finite_differences(13, 12, 9, 1);
  test_linear_bwd_matches_finite_differences(13, 12, 9, 0);
  test_linear_bwd_matches_finite_differences(130, 32, 260, 1);
  /* a thread's share of the columns past 512, and a bias past 1024 */
  test_linear_fwd_matches_reference(5, 16, 2100, 1);
  test_linear_bwd_matches_finite_differences(5, 16, 2100, 1);
  test_linear_with_two_cpu_devices();
  test_linear_bwd_accumulates_and_skips_null();

  mt_dropout attn_drop = {0.3f, mt_philox_key(3, "h.0.attn.drop"), 11, 0, 0};
  test_attention_fwd_matches_reference(2, 7, 12, 3, NULL);
  test_attention_fwd_matches_reference(2, 70, 32, 2, NULL); /* T past one row block */
  test_attention_fwd_matches_reference(2, 7, 12, 3, &attn_drop);
  test_attention_fwd_matches_reference(1, 200, 16, 2, &attn_drop); /* several column tiles */
  test_attention_decode_matches_reference(40, 32, 2);
  test_attention_decode_matches_reference(9, 12, 3);
  test_attention_bwd_matches_finite_differences(2, 7, 12, 3, NULL);
  test_attention_bwd_matches_finite_differences(2, 70, 32, 2, NULL);
  test_attention_bwd_matches_finite_differences(2, 7, 12, 3, &attn_drop);
  test_attention_bwd_matches_finite_differences(1, 200, 16, 2, &attn_drop);
  test_attention_bwd_accumulates(NULL);
  test_attention_bwd_accumulates(&attn_drop);
  test_attention_documents_match_reference(2, 7, 12, 3, NULL);
  test_attention_documents_match_reference(2, 70, 32, 2, NULL);
  test_attention_documents_match_reference(2, 7, 12, 3, &attn_drop);
  test_attention_documents_match_reference(2, 200, 16, 2, &attn_drop);
  test_attention_16bit_qkv_read_as_its_floats(2, 70, 32, 2, NULL); /* T past one row block */
  test_attention_16bit_qkv_read_as_its_floats(2, 70, 32, 2, &attn_drop);
  test_attention_16bit_qkv_read_as_its_floats(1, 200, 16, 2, &attn_drop); /* column tiles */

  test_gelu_fwd_matches_reference(1001);
  test_gelu_fwd_matches_reference(100003);
  test_linear_gelu_fwd_is_linear_then_gelu(13, 12, 9, 1);
  test_linear_gelu_fwd_is_linear_then_gelu(13, 12, 9, 0);
  test_linear_gelu_fwd_is_linear_then_gelu(130, 32, 260, 1); /* the parallel paths */
  test_linear_bwd_dgelu_is_linear_bwd_then_gelu_bwd(13, 12, 9, 1);
  test_linear_bwd_dgelu_is_linear_bwd_then_gelu_bwd(13, 12, 9, 0);
  test_linear_bwd_dgelu_is_linear_bwd_then_gelu_bwd(130, 260, 32, 1); /* the parallel paths */
  test_16bit_operands_read_as_their_floats(13, 12, 9);
  test_16bit_operands_read_as_their_floats(130, 64, 520); /* the parallel paths */
  test_16bit_operands_read_as_their_floats(5, 16, 2100);  /* a 16-bit bias past 1024 */
  test_gelu_bwd_matches_finite_differences(1001);
  test_gelu_bwd_matches_finite_differences(100003);

  test_residual_fwd_is_sum_and_may_alias();
  test_add_inplace_accumulates();
  test_scale_multiplies();
  test_sumsq_matches_double_sum();
  test_sumsq_multi_is_sumsq_span_by_span();
  test_count_zeros_counts_both_signed_zeros();

  test_dropout_p0_and_null_are_identity();
  test_dropout_residual_fwd_is_dropout_then_add();
  test_dropout_piece_matches_whole_sample();
  test_dropout_residual_fwd_rounds_like_pack_half();
  test_dropout_half_keeps_about_half_scaled_by_two();
  test_dropout_mask_same_in_fwd_bwd_and_any_batch_split();
  test_dropout_fwd_matches_reference();
  test_dropout_bwd_matches_finite_differences();

  test_crossentropy_fwd_matches_reference(13, 37, 40);
  test_crossentropy_fwd_matches_reference(33, 1000, 1024);
  test_crossentropy_bwd_matches_finite_differences(13, 37, 40);
  test_crossentropy_bwd_matches_finite_differences(33, 1000, 1024);
  test_crossentropy_bwd_is_softmax_minus_onehot(13, 37, 40);
  test_crossentropy_bwd_is_softmax_minus_onehot(33, 1000, 1024);
  test_crossentropy_ignores_padded_columns();
  test_crossentropy_ignored_targets_give_no_loss_and_no_gradient(13, 37, 40);
  test_crossentropy_ignored_targets_give_no_loss_and_no_gradient(33, 1000, 1024);

  test_adamw_matches_reference_over_three_steps(1000, 0.0f);
  test_adamw_matches_reference_over_three_steps(1000, 0.1f);
  test_adamw_matches_reference_over_three_steps(100003, 0.1f);

  printf("test_ops: %d checks, %d failed\n", n_checks, n_failed);
  mt_device_close(&dev);
  return n_failed ? 1 : 0;
}
