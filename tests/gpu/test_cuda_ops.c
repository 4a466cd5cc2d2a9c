/* test_cuda_ops.c — every op of the CUDA backend against the CPU backend.
 *
 * Each check draws fresh random inputs, runs the op on cpu:0 and on cuda:0
 * and compares what the GPU wrote with what the CPU wrote:
 * - outputs an op WRITES are poisoned with NaN on the GPU first, so an
 *   element it forgets shows; outputs it ACCUMULATES into start from the same
 *   random values on both, so accumulation is checked too; scratch buffers
 *   start as NaN (their contents are undefined, so must never be read first);
 * - a NaN in the result never passes;
 * - norm-wise relative error, rel = ||gpu - cpu|| / max(||gpu||, ||cpu||),
 *   within the precision's tolerance: fp32 1e-4, tf32 5e-3, bf16 1e-2 for
 *   GEMM ops in those modes; 0 (the same bits) where both backends add the
 *   same floats in the same order (embeddings, residual, add); dropout's
 *   mask must keep and drop exactly the same elements;
 * - every op that reads weights, also with a 16-bit working copy (bf16,
 *   binary16) against the CPU given the same bits; and bf16 weights in bf16
 *   GEMMs against fp32 weights holding the same values in FAST_16BF ones:
 *   the same bits on the emulator, where the sums run in one order;
 * - the linear ops also with a 16-bit input of the weights' type, against
 *   the CPU given the same bits, and against an fp32 input holding the same
 *   values (the same bits on the emulator, dw where it runs in one block);
 * - layernorm_fwd and gelu_fwd also storing bf16 and binary16: the bits
 *   mt_half_pack makes of the GPU's own fp32 output, and the CPU's bits
 *   wherever the two fp32 outputs agree (check_typed);
 * - on the emulator, also which path a GEMM with a GeLU or GeLU-gradient
 *   epilogue took, which GEMMs had 16-bit operands, how many conversion
 *   kernels a linear op launched (none for the forward of a 16-bit input),
 *   and that shapes past the conversion budget (tiny there,
 *   tests/gpu/meson.build) ran in blocks.
 * One line per check, PASS or FAIL; the exit status is 1 on any failure.
 *
 * Usage: test_cuda_ops [--small]. --small uses tiny shapes, for the CPU
 * emulator (tests/gpu/emu) that runs this file's checks in CI.
 */
#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/cuda_backend.h" /* mt__cuda_acc_layout_check */
#include "device.h"
#include "err.h"
#include "half.h"
#include "ops.h"
#ifdef MT_CUDA_EMU
#include "cuda_emu.h" /* mt_emu_gemm_counts, mt_emu_launch_count */
#endif

static mt_device cpu, gpu;
static int n_checks, n_failed;
static double worst_elem; /* the largest element error of a check with a tolerance, as above */

/* ---- memory: host arrays and device copies, freed after each check ------ */

#define ARENA_MAX 256
static void *host_blocks[ARENA_MAX], *dev_blocks[ARENA_MAX];
static int n_host, n_dev;

static void die(const char *what) {
  fprintf(stderr, "test_cuda_ops: %s: %s\n", what, mt_errmsg());
  exit(2);
}

static void *halloc(size_t bytes) {
  void *p = calloc(1, bytes ? bytes : 1);
  if (!p || n_host == ARENA_MAX) die("host memory");
  return host_blocks[n_host++] = p;
}

static void *dalloc(size_t bytes) {
  void *p = mt_device_alloc(&gpu, bytes ? bytes : 4);
  if (!p || n_dev == ARENA_MAX) die("device memory");
  return dev_blocks[n_dev++] = p;
}

static void arena_reset(void) {
  for (int i = 0; i < n_host; i++) free(host_blocks[i]);
  for (int i = 0; i < n_dev; i++) mt_device_free(&gpu, dev_blocks[i]);
  n_host = n_dev = 0;
}

static uint64_t rng_state = 0x5eed2024ull;
static uint64_t rng_u64(void) { /* splitmix64 */
  uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
static float urand(float lo, float hi) {
  return lo + (hi - lo) * (float)((double)(rng_u64() >> 11) * 0x1p-53);
}

/* host array of n uniform values in [lo, hi) */
static float *H(size_t n, float lo, float hi) {
  float *x = halloc(n * sizeof(float));
  for (size_t i = 0; i < n; i++) x[i] = urand(lo, hi);
  return x;
}

static float *hcopy(const float *x, size_t n) {
  float *y = halloc(n * sizeof(float));
  memcpy(y, x, n * sizeof(float));
  return y;
}

static int32_t *tokens(size_t n, int V) {
  int32_t *t = halloc(n * sizeof(int32_t));
  for (size_t i = 0; i < n; i++) t[i] = (int32_t)(rng_u64() % (uint64_t)V);
  if (n > 3) t[n - 1] = t[0], t[2] = t[0]; /* repeats: their gradient rows must add */
  return t;
}

/* device copy of a host array */
static void *D(const void *h, size_t bytes) {
  void *d = dalloc(bytes);
  if (mt_device_memcpy_htod(&gpu, d, h, bytes)) die("copy to the device");
  return d;
}
static float *Df(const float *h, size_t n) { return D(h, n * sizeof(float)); }

/* device array of n NaNs: an output the op must write in full */
static float *DN(size_t n) {
  float *h = halloc(n * sizeof(float));
  for (size_t i = 0; i < n; i++) h[i] = NAN;
  return Df(h, n);
}

/* the device array back on the host (after the device's queued work) */
static float *back(const float *d, size_t n) {
  if (mt_device_sync(&gpu)) die("device sync");
  float *h = halloc(n * sizeof(float));
  if (mt_device_memcpy_dtoh(&gpu, h, d, n * sizeof(float))) die("copy from the device");
  return h;
}

/* ---- comparison --------------------------------------------------------- */

static const char *prec_name(mt_matmul_precision p) {
  return p == MT_MATMUL_TF32 ? "tf32" : p == MT_MATMUL_BF16 ? "bf16" : "fp32";
}

static double prec_tol(mt_matmul_precision p) {
  return p == MT_MATMUL_TF32 ? 5e-3 : p == MT_MATMUL_BF16 ? 1e-2 : 1e-4;
}

/* GeLU and its gradient from cuBLASLt's epilogues use their own tanh,
 * perhaps the GPU's approximate one rather than tanhf: what passed through
 * them is held to at least this, the GEMM's plain result to prec_tol. Not yet
 * measured on a GPU. */
#define GELU_EPILOGUE_TOL 1e-3

/* A norm-wise bound lets one wrong element among millions through (one in
 * 2.4M moves rel by about 6e-4), so each element is held too: |got - want|
 * within ELEM_TOL times tol of the largest |want|. Rounding differences
 * stay far inside it (the emulator's worst check is printed as "elem"); a
 * misplaced or stale element is off by about its own size. */
#define ELEM_TOL 8.0

/* got: the GPU's result; want: the CPU's. tol 0 means the same bits. */
static void check(const char *op, const char *what, const float *got, const float *want, size_t n,
                  double tol) {
  double d = 0.0, ng = 0.0, nw = 0.0, maxd = 0.0, maxw = 0.0;
  size_t nans = 0, diff_bits = 0;
  for (size_t i = 0; i < n; i++) {
    if (isnan(got[i]) || isnan(want[i])) {
      nans++;
      continue;
    }
    double e = (double)got[i] - (double)want[i];
    d += e * e;
    ng += (double)got[i] * got[i];
    nw += (double)want[i] * want[i];
    if (fabs(e) > maxd) maxd = fabs(e);
    if (fabs(want[i]) > maxw) maxw = fabs(want[i]);
    if (memcmp(&got[i], &want[i], sizeof(float))) diff_bits++;
  }
  double den = sqrt(ng > nw ? ng : nw), rel = den > 0.0 ? sqrt(d) / den : sqrt(d);
  /* the element bound in units of ELEM_TOL * tol * max|want|: at most 1 */
  double elem = maxd / (tol * (maxw > 0.0 ? maxw : 1.0));
  int ok = !nans && (tol == 0.0 ? diff_bits == 0 : rel <= tol && elem <= ELEM_TOL);
  n_checks++;
  if (!ok) n_failed++;
  if (tol > 0.0 && elem > worst_elem) worst_elem = elem;
  printf("%s %-24s %-34s rel %.2e max|d| %.2e", ok ? "PASS" : "FAIL", op, what, rel, maxd);
  if (tol > 0.0) printf(" elem %.2f", elem / ELEM_TOL);
  if (tol == 0.0) printf(" (%zu of %zu differ in bits)", diff_bits, n);
  if (nans) printf(" (%zu NaN)", nans);
  printf("\n");
  fflush(stdout);
}

/* Dropout keeps and drops the same elements on both backends. */
static void check_mask(const char *op, const char *what, const float *got, const float *want,
                       size_t n) {
  size_t bad = 0, dropped = 0;
  for (size_t i = 0; i < n; i++) {
    bad += (got[i] == 0.0f) != (want[i] == 0.0f);
    dropped += want[i] == 0.0f;
  }
  n_checks++;
  if (bad) n_failed++;
  printf("%s %-24s %-34s %zu of %zu dropped, %zu differ\n", bad ? "FAIL" : "PASS", op, what,
         dropped, n, bad);
}

/* A property that is not a comparison of values */
static void check_that(const char *op, const char *what, int ok, const char *detail) {
  n_checks++;
  if (!ok) n_failed++;
  printf("%s %-24s %-34s %s\n", ok ? "PASS" : "FAIL", op, what, detail);
}

/* ---- shapes ------------------------------------------------------------- */

typedef struct {
  int B, T, C, NH, V, Vp;
} shape;

static char label_buf[8][96];
static int label_k;
static const char *label(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static const char *label(const char *fmt, ...) {
  char *b = label_buf[label_k++ % 8];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(b, sizeof label_buf[0], fmt, ap);
  va_end(ap);
  return b;
}

static const char *wt_name(mt_dtype t) {
  return t == MT_BF16 ? "bf16 w" : t == MT_F16 ? "fp16 w" : "fp32 w";
}

static const char *it_name(mt_dtype t) {
  return t == MT_BF16 ? "bf16 in" : t == MT_F16 ? "fp16 in" : "fp32 in";
}

/* n fp32 values as an op takes them stored as t (16-bit: rounded to
 * nearest even, half.h), weights or a linear op's input: the host copy for
 * the CPU in *host, the device copy returned */
static void *stored(const float *x, size_t n, mt_dtype t, const void **host) {
  if (t == MT_F32) {
    *host = x;
    return Df(x, n);
  }
  uint16_t *h = halloc(n * sizeof(uint16_t));
  for (size_t i = 0; i < n; i++) h[i] = mt_half_pack(x[i], t == MT_F16);
  *host = h;
  return D(h, n * sizeof(uint16_t));
}

/* x rounded in place to the values t holds (nothing for fp32) */
static float *round_to(float *x, size_t n, mt_dtype t) {
  if (t != MT_F32)
    for (size_t i = 0; i < n; i++) x[i] = mt_round_half(x[i], t == MT_F16);
  return x;
}

/* device bytes of NaN (all ones): scratch whose contents are undefined,
 * and 16-bit outputs an op must write in full (0xFFFF is a NaN in bf16 and
 * in binary16) */
static void *DP(size_t bytes) {
  void *h = halloc(bytes);
  memset(h, 0xFF, bytes);
  return D(h, bytes);
}

/* n 16-bit values from the device, after its queued work */
static uint16_t *back16(const void *d, size_t n) {
  if (mt_device_sync(&gpu)) die("device sync");
  uint16_t *h = halloc(n * sizeof(uint16_t));
  if (mt_device_memcpy_dtoh(&gpu, h, d, n * sizeof(uint16_t))) die("copy from the device");
  return h;
}

/* The floats n 16-bit values of type t (bf16, binary16) hold: on the host
 * (as_floats), or on the device after its queued work (back_half) */
static float *as_floats(const uint16_t *h, size_t n, mt_dtype t) {
  float *f = halloc(n * sizeof(float));
  for (size_t i = 0; i < n; i++) f[i] = mt_half_unpack(h[i], t == MT_F16);
  return f;
}
static float *back_half(const void *d, size_t n, mt_dtype t) {
  return as_floats(back16(d, n), n, t);
}

/* The relative size of one unit in the last place of a 16-bit type: how
 * far apart two backends' roundings of nearly equal floats may land. */
static double half_tol(mt_dtype t) { return t == MT_F16 ? 0x1p-10 : 0x1p-7; }

/* An output the op stored as ot (16-bit): got, the GPU's bits on the
 * device; want, the CPU's; got32 and want32, the fp32 op's outputs of each
 * backend. The GPU's bits must be mt_half_pack of its own fp32 output, bit
 * for bit; against the CPU's, the same bits wherever the two fp32 outputs
 * are, else within one 16-bit rounding (norm-wise). A NaN (the poison
 * left unwritten) never passes. */
static void check_typed(const char *op, const char *what, const void *got, const uint16_t *want,
                        const float *got32, const float *want32, size_t n, mt_dtype ot) {
  int fp16 = ot == MT_F16;
  uint16_t *gb = back16(got, n);
  float *bits = halloc(n * sizeof(float)), *packed = halloc(n * sizeof(float));
  float *gv = halloc(n * sizeof(float)), *cv = halloc(n * sizeof(float));
  size_t split = 0, agree = 0;
  for (size_t i = 0; i < n; i++) {
    bits[i] = (float)gb[i]; /* the bits as exact floats */
    packed[i] = (float)mt_half_pack(got32[i], fp16);
    gv[i] = mt_half_unpack(gb[i], fp16);
    cv[i] = mt_half_unpack(want[i], fp16);
    if (!memcmp(&got32[i], &want32[i], sizeof(float))) {
      agree++;
      split += gb[i] != want[i];
    }
  }
  const char *h16 = fp16 ? "fp16" : "bf16";
  check(op, label("%s %s = pack(fp32 out)", what, h16), bits, packed, n, 0.0);
  check(op, label("%s %s vs cpu", what, h16), gv, cv, n, half_tol(ot));
  char detail[96];
  snprintf(detail, sizeof detail, "%zu of %zu differ where the fp32 outputs agree (%zu)", split, n,
           agree);
  check_that(op, label("%s %s = cpu where fp32 is", what, h16), split == 0, detail);
}

/* Whether cuBLASLt's GeLU epilogues serve a GEMM whose output (or dpre) is
 * `width` wide: a multiple of 8, cuBLASLt there (not MT_CUDA_EMU_NO_LT), and
 * the device's switch on (MTNLG_GELU_EPILOGUE) */
static int gelu_epilogue_serves(int width) {
  return width % 8 == 0 && !getenv("MT_CUDA_EMU_NO_LT") && gpu.gelu_epilogue;
}

/* A GEMM's 16-bit output (ot): on the emulator, which sums each dot
 * product once whatever D's type, check_typed's (the bits of its own fp32
 * output, rounded); on a GPU, whose 16-bit and fp32 GEMMs may be different
 * kernels summing in different orders, the values within tol and one
 * 16-bit rounding of the CPU's. */
static void check_gemm_typed(const char *op, const char *what, const void *got,
                             const uint16_t *want, const float *got32, const float *want32,
                             size_t n, mt_dtype ot, double tol) {
#ifdef MT_CUDA_EMU
  (void)tol;
  check_typed(op, what, got, want, got32, want32, n, ot);
#else
  (void)got32, (void)want32;
  check(op, label("%s %s vs cpu", what, ot == MT_F16 ? "fp16" : "bf16"), back_half(got, n, ot),
        as_floats(want, n, ot), n, tol + half_tol(ot));
#endif
}

/* Each backend's conversion scratch for linear ops of this shape (for the
 * GPU's d->matmul now): the CPU's on the host, the GPU's poisoned; NULL
 * where a backend needs none. */
static void linear_scratch_pair(int N, int C, int OC, mt_dtype it, mt_dtype wt, void **ccvt,
                                void **gcvt) {
  size_t cb = cpu.ops->linear_scratch(&cpu, N, C, OC, it, wt);
  size_t gb = gpu.ops->linear_scratch(&gpu, N, C, OC, it, wt);
  *ccvt = cb ? halloc(cb) : NULL;
  *gcvt = gb ? DP(gb) : NULL;
}

/* ---- GEMM paths (the emulator counts them) ------------------------------ */

/* The conversion budget ops_cuda.cu was built with (tests/gpu/meson.build;
 * its default elsewhere) */
#ifdef MT_CUDA_CVT_BYTES
#define CVT_BUDGET ((size_t)MT_CUDA_CVT_BYTES)
#else
#define CVT_BUDGET ((size_t)128 << 20)
#endif

/* Blocks of `all` rows of row_bytes each that fit CVT_BUDGET: ops_cuda.cu's
 * rows_in: the GEMMs a blocked op runs, and whether its rows go in blocks */
static long blocks_of(int all, size_t row_bytes) {
  size_t r = row_bytes ? CVT_BUDGET / row_bytes : (size_t)all;
  if (r >= (size_t)all) return all ? 1 : 0;
  if (r > 8) r &= ~(size_t)7;
  if (!r) r = 1;
  return (long)((all + r - 1) / r);
}

#ifdef MT_CUDA_EMU

/* GEMMs run since the last call: all of them, with the GeLU epilogue, with
 * the DGELU one, with 16-bit A and B; and conversion kernels launched
 * (to_half, unpack_half: a linear op's operands rounded or unpacked) */
typedef struct {
  long gemms, gelu, dgelu, half, conv;
} gemm_tally;

static gemm_tally gemms_since(void) {
  static long last[5];
  long lt, gelu, dgelu, blas;
  mt_emu_gemm_counts(&lt, &gelu, &dgelu, &blas);
  long conv = mt_emu_launch_count("k_to_half") + mt_emu_launch_count("k_unpack_half");
  long now[5] = {lt + blas, gelu, dgelu, mt_emu_gemm16_count(), conv};
  gemm_tally t = {now[0] - last[0], now[1] - last[1], now[2] - last[2], now[3] - last[3],
                  now[4] - last[4]};
  memcpy(last, now, sizeof now);
  return t;
}

static void check_path(const char *op, const char *what, int ok, gemm_tally t) {
  n_checks++;
  if (!ok) n_failed++;
  printf("%s %-24s %-34s %ld GEMM(s): %ld GeLU, %ld DGELU epilogue, %ld 16-bit; %ld conversions\n",
         ok ? "PASS" : "FAIL", op, what, t.gemms, t.gelu, t.dgelu, t.half, t.conv);
}

/* fp16 weights, and bf16 ones in a bf16 d->matmul, multiply natively
 * (ops_cuda.cu's LIN_NATIVE) */
static int native_16(mt_dtype wt, mt_matmul_precision p) {
  return wt == MT_F16 || (wt == MT_BF16 && p == MT_MATMUL_BF16);
}

/* The forward's GEMMs: a 16-bit input (it == wt) makes it one 16-bit GEMM
 * of the operands as stored, nothing converted; an fp32 one, one fp32 GEMM
 * for fp32 weights, else one per block of converted rows, 16-bit exactly
 * when native_16. */
static int fwd_path_ok(gemm_tally t, mt_dtype it, mt_dtype wt, mt_matmul_precision p) {
  if (it != MT_F32) return t.gemms == 1 && t.half == 1 && t.conv == 0;
  if (wt == MT_F32) return t.gemms == 1 && t.half == 0 && t.conv == 0;
  return t.gemms >= 1 && t.half == (native_16(wt, p) ? t.gemms : 0) && t.conv == t.gemms;
}

/* The backward's dw GEMMs: one per block of rows where the rows go in
 * blocks (native_16: dout's rows, and an fp32 input's; a 16-bit input
 * otherwise, unpacked), else one */
static long dw_gemms(int N, int C, int OC, mt_dtype it, mt_dtype wt, mt_matmul_precision p) {
  if (native_16(wt, p)) return blocks_of(N, (size_t)OC * 2 + (it == MT_F32 ? (size_t)C * 2 : 0));
  return it == MT_F32 ? 1 : blocks_of(N, (size_t)C * 4);
}

/* The backward with dinp: native_16, a dinp and a dw GEMM per block of
 * rows, all 16-bit, after dout's block (and an fp32 input's) is rounded; a
 * bf16 input is read as it is. Otherwise fp32 GEMMs: fp32 weights, one of
 * each; 16-bit ones, unpacked whole or in blocks for dinp, and a 16-bit
 * input unpacked in blocks for dw, one conversion before each GEMM. */
static int bwd_path_ok(gemm_tally t, int N, int C, int OC, mt_dtype it, mt_dtype wt,
                       mt_matmul_precision p) {
  long dw = dw_gemms(N, C, OC, it, wt, p);
  if (native_16(wt, p))
    return t.gemms == 2 * dw && t.half == t.gemms && t.conv == (it == MT_F32 ? 2 : 1) * dw;
  if (wt == MT_F32) return t.gemms == 2 && t.half == 0 && t.conv == 0;
  return t.gemms > dw && t.half == 0 && t.conv == t.gemms - (it == MT_F32 ? 1 : 0);
}
#endif

/* ---- checks ------------------------------------------------------------- */

static void test_embedding(shape s) {
  int N = s.B * s.T, C = s.C;
  int32_t *tok = tokens((size_t)N, s.V);
  float *wte = H((size_t)s.Vp * C, -1, 1), *wpe = H((size_t)s.T * C, -1, 1);
  float *co = halloc((size_t)N * C * sizeof(float)), *go;
  int32_t *dtok = D(tok, (size_t)N * sizeof(int32_t));
  float *gwpe = Df(wpe, (size_t)s.T * C);
  /* wte as stored: the float each element holds, so the same bits as the CPU's */
  static const mt_dtype wts[] = {MT_F32, MT_BF16, MT_F16};
  for (int k = 0; k < 3; k++) {
    const void *hwte;
    void *gwte = stored(wte, (size_t)s.Vp * C, wts[k], &hwte);
    cpu.ops->embedding_fwd(&cpu, co, tok, hwte, wts[k], wpe, s.B, s.T, C);
    go = DN((size_t)N * C);
    gpu.ops->embedding_fwd(&gpu, go, dtok, gwte, wts[k], gwpe, s.B, s.T, C);
    check("embedding_fwd", label("%s B=%d T=%d C=%d out", wt_name(wts[k]), s.B, s.T, C),
          back(go, (size_t)N * C), co, (size_t)N * C, 0.0);
  }

  float *dout = H((size_t)N * C, -1, 1);
  float *cdwte = H((size_t)s.Vp * C, -1, 1), *cdwpe = H((size_t)s.T * C, -1, 1);
  float *gdwte = Df(cdwte, (size_t)s.Vp * C), *gdwpe = Df(cdwpe, (size_t)s.T * C);
  cpu.ops->embedding_bwd(&cpu, cdwte, cdwpe, dout, tok, s.B, s.T, C);
  gpu.ops->embedding_bwd(&gpu, gdwte, gdwpe, Df(dout, (size_t)N * C), dtok, s.B, s.T, C);
  check("embedding_bwd", label("Vp=%d dwte (+=)", s.Vp), back(gdwte, (size_t)s.Vp * C), cdwte,
        (size_t)s.Vp * C, 0.0);
  check("embedding_bwd", "dwpe (+=)", back(gdwpe, (size_t)s.T * C), cdwpe, (size_t)s.T * C, 0.0);

  /* a shard of the vocabulary: rows [v0, v0 + Vl) */
  int v0 = s.Vp / 3, Vl = s.Vp / 2;
  for (int k = 0; k < 3; k++) {
    const void *hwte;
    void *gwte = stored(wte + (size_t)v0 * C, (size_t)Vl * C, wts[k], &hwte);
    cpu.ops->embedding_shard_fwd(&cpu, co, tok, hwte, wts[k], v0, Vl, N, C);
    go = DN((size_t)N * C);
    gpu.ops->embedding_shard_fwd(&gpu, go, dtok, gwte, wts[k], v0, Vl, N, C);
    check("embedding_shard_fwd", label("%s v0=%d Vl=%d out", wt_name(wts[k]), v0, Vl),
          back(go, (size_t)N * C), co, (size_t)N * C, 0.0);
  }
  float *cds = H((size_t)Vl * C, -1, 1), *gds = Df(cds, (size_t)Vl * C);
  cpu.ops->embedding_shard_bwd(&cpu, cds, dout, tok, v0, Vl, N, C);
  gpu.ops->embedding_shard_bwd(&gpu, gds, Df(dout, (size_t)N * C), dtok, v0, Vl, N, C);
  check("embedding_shard_bwd", "dwte shard (+=)", back(gds, (size_t)Vl * C), cds, (size_t)Vl * C,
        0.0);
  arena_reset();
}

/* layernorm_fwd (fp32 out, and bf16 and binary16 outs: check_typed) and
 * layernorm_bwd against the CPU */
static void test_layernorm(int N, int C) {
  size_t n = (size_t)N * C;
  float *x = H(n, -2, 3), *w = H((size_t)C, 0.5f, 1.5f), *b = H((size_t)C, -0.5f, 0.5f);
  for (size_t i = 0; i < n; i++) x[i] += 10.0f * (float)(i / C % 3); /* rows with an offset */
  float *co = halloc(n * sizeof(float)), *cm = halloc(N * sizeof(float)),
        *cr = halloc(N * sizeof(float));
  cpu.ops->layernorm_fwd(&cpu, co, MT_F32, cm, cr, x, w, b, N, C, 1e-5f);
  float *go = DN(n), *gm = DN((size_t)N), *gr = DN((size_t)N);
  float *dx = Df(x, n), *dw = Df(w, (size_t)C), *db = Df(b, (size_t)C);
  gpu.ops->layernorm_fwd(&gpu, go, MT_F32, gm, gr, dx, dw, db, N, C, 1e-5f);
  float *go_h = back(go, n);
  check("layernorm_fwd", label("N=%d C=%d out", N, C), go_h, co, n, 1e-4);
  check("layernorm_fwd", "mean", back(gm, (size_t)N), cm, (size_t)N, 1e-4);
  check("layernorm_fwd", "rstd", back(gr, (size_t)N), cr, (size_t)N, 1e-4);
  for (int fp16 = 0; fp16 < 2; fp16++) {
    mt_dtype ot = fp16 ? MT_F16 : MT_BF16;
    uint16_t *ch = halloc(n * sizeof(uint16_t));
    void *gh = DP(n * sizeof(uint16_t));
    float *gm2 = DN((size_t)N), *gr2 = DN((size_t)N);
    cpu.ops->layernorm_fwd(&cpu, ch, ot, cm, cr, x, w, b, N, C, 1e-5f);
    gpu.ops->layernorm_fwd(&gpu, gh, ot, gm2, gr2, dx, dw, db, N, C, 1e-5f);
    check_typed("layernorm_fwd", "out", gh, ch, go_h, co, n, ot);
    check("layernorm_fwd", label("%s out: mean", fp16 ? "fp16" : "bf16"), back(gm2, (size_t)N), cm,
          (size_t)N, 1e-4);
    check("layernorm_fwd", "rstd", back(gr2, (size_t)N), cr, (size_t)N, 1e-4);
  }

  float *dout = H(n, -1, 1);
  float *cdx = H(n, -1, 1), *cdw = H((size_t)C, -1, 1), *cdb = H((size_t)C, -1, 1);
  float *gdx = Df(cdx, n), *gdw = Df(cdw, (size_t)C), *gdb = Df(cdb, (size_t)C);
  cpu.ops->layernorm_bwd(&cpu, cdx, cdw, cdb, dout, x, w, cm, cr, N, C);
#ifdef MT_CUDA_EMU
  long adds0 = mt_emu_launch_count("k_cols_add");
#endif
  gpu.ops->layernorm_bwd(&gpu, gdx, gdw, gdb, Df(dout, n), dx, dw, Df(cm, (size_t)N),
                         Df(cr, (size_t)N), N, C);
  check("layernorm_bwd", label("N=%d C=%d dinp (+=)", N, C), back(gdx, n), cdx, n, 1e-4);
  check("layernorm_bwd", "dw (+=)", back(gdw, (size_t)C), cdw, (size_t)C, 1e-4);
  check("layernorm_bwd", "db (+=)", back(gdb, (size_t)C), cdb, (size_t)C, 1e-4);
#ifdef MT_CUDA_EMU
  /* dw and db by groups of rows where the column blocks are fewer than two
   * per SM (the emulator's 4) and there are rows for two groups (of at least
   * 2 rows here, MT_CUDA_COL_MIN_ROWS) */
  int grouped = (C + 31) / 32 < 8 && N >= 4;
  check_that("layernorm_bwd", label("dw, db %s", grouped ? "by groups of rows" : "in one pass"),
             mt_emu_launch_count("k_cols_add") == adds0 + grouped,
             grouped ? "one k_cols_add" : "no k_cols_add");
#endif
  arena_reset();
}

/* linear_fwd and linear_bwd with the input stored as it (fp32, or wt's
 * 16-bit type) and the weights as wt, against the CPU given the same bits;
 * on the emulator also the GEMMs and conversions each ran (fwd_path_ok,
 * bwd_path_ok). */
static void test_linear(int N, int C, int OC, mt_matmul_precision p, mt_dtype wt, mt_dtype it) {
  gpu.matmul = p;
  double tol = prec_tol(p);
  char pn[48];
  snprintf(pn, sizeof pn, "%s %s %s", prec_name(p), wt_name(wt), it_name(it));
  float *x = H((size_t)N * C, -1, 1), *w = H((size_t)OC * C, -0.5f, 0.5f),
        *b = round_to(H((size_t)OC, -1, 1), (size_t)OC, it); /* a 16-bit output's bias holds them */
  const void *hw, *hx, *hb16;
  void *dw = stored(w, (size_t)OC * C, wt, &hw), *dx = stored(x, (size_t)N * C, it, &hx);
  void *ccvt, *gcvt, *db16 = stored(b, (size_t)OC, it, &hb16);
  float *db = Df(b, (size_t)OC);
  linear_scratch_pair(N, C, OC, it, wt, &ccvt, &gcvt);
  size_t no = (size_t)N * OC;
  for (int with_bias = 1; with_bias >= 0; with_bias--) {
    const char *tag = label("%s N=%d C=%d OC=%d %s", pn, N, C, OC, with_bias ? "bias" : "no bias");
    float *co = halloc(no * sizeof(float)), *go = DN(no);
    cpu.ops->linear_fwd(&cpu, co, MT_F32, hx, it, hw, wt, with_bias ? b : NULL, ccvt, N, C, OC);
#ifdef MT_CUDA_EMU
    gemms_since();
#endif
    gpu.ops->linear_fwd(&gpu, go, MT_F32, dx, it, dw, wt, with_bias ? db : NULL, gcvt, N, C, OC);
    float *go32 = back(go, no);
    check("linear_fwd", tag, go32, co, no, tol);
#ifdef MT_CUDA_EMU
    gemm_tally t = gemms_since();
    check_path("linear_fwd", label("%s path", pn), fwd_path_ok(t, it, wt, p), t);
#endif
    if (it == MT_F32) continue;
    /* a 16-bit input's output in its type, as a 16-bit job's qkv and fch */
    uint16_t *ch = halloc(no * sizeof(uint16_t));
    void *gh = DP(no * sizeof(uint16_t));
    cpu.ops->linear_fwd(&cpu, ch, it, hx, it, hw, wt, with_bias ? hb16 : NULL, ccvt, N, C, OC);
#ifdef MT_CUDA_EMU
    gemms_since();
#endif
    gpu.ops->linear_fwd(&gpu, gh, it, dx, it, dw, wt, with_bias ? db16 : NULL, gcvt, N, C, OC);
    check_gemm_typed("linear_fwd", label("%s out", tag), gh, ch, go32, co, no, it, tol);
#ifdef MT_CUDA_EMU
    t = gemms_since();
    check_path("linear_fwd", label("%s 16-bit out: one 16-bit GEMM", pn),
               t.gemms == 1 && t.half == 1 && t.conv == 0, t);
#endif
  }
  float *dout = H((size_t)N * OC, -1, 1), *gdout = Df(dout, (size_t)N * OC);
  float *cdx = H((size_t)N * C, -1, 1), *cdw = H((size_t)OC * C, -1, 1),
        *cdb = H((size_t)OC, -1, 1);
  float *gdx = Df(cdx, (size_t)N * C), *gdw = Df(cdw, (size_t)OC * C), *gdb = Df(cdb, (size_t)OC);
  cpu.ops->linear_bwd(&cpu, cdx, cdw, cdb, dout, MT_F32, hx, it, hw, wt, ccvt, N, C, OC);
#ifdef MT_CUDA_EMU
  gemms_since();
#endif
  gpu.ops->linear_bwd(&gpu, gdx, gdw, gdb, gdout, MT_F32, dx, it, dw, wt, gcvt, N, C, OC);
  check("linear_bwd", label("%s N=%d C=%d OC=%d dinp (+=)", pn, N, C, OC), back(gdx, (size_t)N * C),
        cdx, (size_t)N * C, tol);
  check("linear_bwd", label("%s dw (+=)", pn), back(gdw, (size_t)OC * C), cdw, (size_t)OC * C, tol);
  check("linear_bwd", "dbias (+=)", back(gdb, (size_t)OC), cdb, (size_t)OC, 1e-4);
#ifdef MT_CUDA_EMU
  gemm_tally t = gemms_since();
  check_path("linear_bwd", label("%s path", pn), bwd_path_ok(t, N, C, OC, it, wt, p), t);
#endif
  /* dinp and dbias NULL: only dw */
  float *cdw2 = H((size_t)OC * C, -1, 1), *gdw2 = Df(cdw2, (size_t)OC * C);
  cpu.ops->linear_bwd(&cpu, NULL, cdw2, NULL, dout, MT_F32, hx, it, hw, wt, ccvt, N, C, OC);
  gpu.ops->linear_bwd(&gpu, NULL, gdw2, NULL, gdout, MT_F32, dx, it, dw, wt, gcvt, N, C, OC);
  check("linear_bwd", label("%s dw alone (dinp, dbias NULL)", pn), back(gdw2, (size_t)OC * C), cdw2,
        (size_t)OC * C, tol);
  if (it != MT_F32) { /* a 16-bit dout, as the MLP's inner gradient: every operand 16-bit */
    const void *hdy;
    void *gdy = stored(dout, (size_t)N * OC, it, &hdy);
    float *cdx3 = H((size_t)N * C, -1, 1), *cdw3 = H((size_t)OC * C, -1, 1),
          *cdb3 = H((size_t)OC, -1, 1);
    float *gdx3 = Df(cdx3, (size_t)N * C), *gdw3 = Df(cdw3, (size_t)OC * C),
          *gdb3 = Df(cdb3, (size_t)OC);
    cpu.ops->linear_bwd(&cpu, cdx3, cdw3, cdb3, hdy, it, hx, it, hw, wt, ccvt, N, C, OC);
#ifdef MT_CUDA_EMU
    gemms_since();
#endif
    gpu.ops->linear_bwd(&gpu, gdx3, gdw3, gdb3, gdy, it, dx, it, dw, wt, gcvt, N, C, OC);
    check("linear_bwd", label("%s %s dout: dinp (+=)", pn, wt_name(it)), back(gdx3, (size_t)N * C),
          cdx3, (size_t)N * C, tol);
    check("linear_bwd", label("%s %s dout: dw (+=)", pn, wt_name(it)), back(gdw3, (size_t)OC * C),
          cdw3, (size_t)OC * C, tol);
    check("linear_bwd", label("%s dout: dbias (+=)", wt_name(it)), back(gdb3, (size_t)OC), cdb3,
          (size_t)OC, 1e-4);
#ifdef MT_CUDA_EMU
    t = gemms_since();
    check_path("linear_bwd", label("%s 16-bit dout: two 16-bit GEMMs", pn),
               t.gemms == 2 && t.half == 2 && t.conv == 0, t);
#endif
  }
  gpu.matmul = MT_MATMUL_FP32;
  arena_reset();
}

/* linear_gelu_fwd: out and pre, both poisoned, against the CPU's (linear_fwd
 * then gelu_fwd there); with a 16-bit input, also both in its type (the
 * epilogue's GeLU is of the unrounded sum, the CPU's of the rounded pre:
 * the GeLU epilogue's tolerance and a rounding apart). On the emulator also
 * its path: cuBLASLt GEMMs with the GeLU epilogue when OC (the aux ld) is a
 * multiple of 8 and cuBLASLt is on, else GEMMs (cuBLASLt's bias epilogue or
 * cuBLAS) and the GeLU kernel; the GEMMs and conversions of linear_fwd
 * (fwd_path_ok). */
static void test_linear_gelu(int N, int C, int OC, mt_matmul_precision p, mt_dtype wt,
                             mt_dtype it) {
  gpu.matmul = p;
  double tol = prec_tol(p), tol_out = tol > GELU_EPILOGUE_TOL ? tol : GELU_EPILOGUE_TOL;
  size_t no = (size_t)N * OC;
  float *x = H((size_t)N * C, -1, 1), *w = H((size_t)OC * C, -0.5f, 0.5f),
        *b = round_to(H((size_t)OC, -1, 1), (size_t)OC, it);
  const void *hw, *hx, *hb16;
  void *dw = stored(w, (size_t)OC * C, wt, &hw), *dx = stored(x, (size_t)N * C, it, &hx);
  void *ccvt, *gcvt, *db16 = stored(b, (size_t)OC, it, &hb16);
  float *db = Df(b, (size_t)OC);
  linear_scratch_pair(N, C, OC, it, wt, &ccvt, &gcvt);
  for (int with_bias = 1; with_bias >= 0; with_bias--) {
    const char *tag = label("%s %s %s N=%d C=%d OC=%d %s", prec_name(p), wt_name(wt), it_name(it),
                            N, C, OC, with_bias ? "bias" : "no bias");
    float *co = halloc(no * sizeof(float)), *cp = halloc(no * sizeof(float));
    float *go = DN(no), *gp = DN(no);
    cpu.ops->linear_gelu_fwd(&cpu, co, cp, MT_F32, hx, it, hw, wt, with_bias ? b : NULL, ccvt, N, C,
                             OC);
#ifdef MT_CUDA_EMU
    gemms_since();
#endif
    gpu.ops->linear_gelu_fwd(&gpu, go, gp, MT_F32, dx, it, dw, wt, with_bias ? db : NULL, gcvt, N,
                             C, OC);
    check("linear_gelu_fwd", label("%s out", tag), back(go, no), co, no, tol_out);
    float *gp32 = back(gp, no);
    check("linear_gelu_fwd", label("%s pre", tag), gp32, cp, no, tol);
    int fused = gelu_epilogue_serves(OC);
    (void)fused; /* the path checks are the emulator's */
#ifdef MT_CUDA_EMU
    gemm_tally t = gemms_since();
    int ok = fwd_path_ok(t, it, wt, p) && t.gelu == (fused ? t.gemms : 0) && t.dgelu == 0;
    check_path("linear_gelu_fwd", fused ? "path: GeLU epilogue" : "path: GEMM, GeLU kernel", ok, t);
#endif
    if (it == MT_F32) continue;
    uint16_t *cho = halloc(no * sizeof(uint16_t)), *chp = halloc(no * sizeof(uint16_t));
    void *gho = DP(no * sizeof(uint16_t)), *ghp = DP(no * sizeof(uint16_t));
    cpu.ops->linear_gelu_fwd(&cpu, cho, chp, it, hx, it, hw, wt, with_bias ? hb16 : NULL, ccvt, N,
                             C, OC);
#ifdef MT_CUDA_EMU
    gemms_since();
#endif
    gpu.ops->linear_gelu_fwd(&gpu, gho, ghp, it, dx, it, dw, wt, with_bias ? db16 : NULL, gcvt, N,
                             C, OC);
    check_gemm_typed("linear_gelu_fwd", label("%s pre", tag), ghp, chp, gp32, cp, no, it, tol);
    check("linear_gelu_fwd", label("%s out %s vs cpu", tag, wt_name(it)), back_half(gho, no, it),
          as_floats(cho, no, it), no, tol_out + half_tol(it));
#ifdef MT_CUDA_EMU
    t = gemms_since();
    ok = t.gemms == 1 && t.half == 1 && t.conv == 0 && t.gelu == (fused ? 1 : 0);
    check_path("linear_gelu_fwd", fused ? "16-bit out: GeLU epilogue" : "16-bit out: GeLU kernel",
               ok, t);
#endif
  }
  gpu.matmul = MT_MATMUL_FP32;
  arena_reset();
}

/* linear_bwd_dgelu: dpre poisoned (it is written), dw and dbias accumulating
 * from the same random values on both, scratch NaN, against the CPU's
 * (linear_bwd then gelu_bwd there). inp and pre stored as it. On the
 * emulator also its path: dinp GEMMs with the DGELU epilogue when C (the
 * aux ld) is a multiple of 8, cuBLASLt is on and pre is stored as dpre
 * (the aux has D's type), else plain ones and the GeLU-gradient kernel;
 * the GEMMs and conversions of linear_bwd (bwd_path_ok). Unpacked 16-bit
 * weights take the epilogue only when the dinp GEMM is one (with several,
 * gelu' waits for the whole sum) and writes fp32. With a 16-bit input,
 * dpre in its type too, as a 16-bit job keeps it. */
static void test_linear_bwd_dgelu(int N, int C, int OC, mt_matmul_precision p, mt_dtype wt,
                                  mt_dtype it) {
  gpu.matmul = p;
  double tol = prec_tol(p), tol_dpre = tol > GELU_EPILOGUE_TOL ? tol : GELU_EPILOGUE_TOL;
  size_t ni = (size_t)N * C, no = (size_t)N * OC, nw = (size_t)OC * C;
  /* pre over GeLU's bend, where gelu' goes from 0 through negative to 1 */
  float *pre = H(ni, -3, 3), *inp = H(ni, -1, 1), *w = H(nw, -0.5f, 0.5f), *dout = H(no, -1, 1);
  const void *hw, *hx, *hpre;
  void *gw = stored(w, nw, wt, &hw), *ginp = stored(inp, ni, it, &hx), *ccvt, *gcvt;
  void *gpre = stored(pre, ni, it, &hpre);
  float *gdout = Df(dout, no);
  linear_scratch_pair(N, C, OC, it, wt, &ccvt, &gcvt);
  for (int with_bias = 1; with_bias >= 0; with_bias--) {
    const char *tag = label("%s %s %s N=%d C=%d OC=%d %s", prec_name(p), wt_name(wt), it_name(it),
                            N, C, OC, with_bias ? "dbias" : "no dbias");
    float *cdpre = halloc(ni * sizeof(float)), *cscratch = halloc(ni * sizeof(float));
    float *cdw = H(nw, -1, 1), *cdb = H((size_t)OC, -1, 1);
    float *gdw = Df(cdw, nw), *gdb = Df(cdb, (size_t)OC), *gdpre = DN(ni), *gscratch = DN(ni);
    cpu.ops->linear_bwd_dgelu(&cpu, cdpre, MT_F32, cscratch, cdw, with_bias ? cdb : NULL, dout, hx,
                              it, hpre, hw, wt, ccvt, N, C, OC);
#ifdef MT_CUDA_EMU
    gemms_since();
#endif
    gpu.ops->linear_bwd_dgelu(&gpu, gdpre, MT_F32, gscratch, gdw, with_bias ? gdb : NULL, gdout,
                              ginp, it, gpre, gw, wt, gcvt, N, C, OC);
    check("linear_bwd_dgelu", label("%s dpre", tag), back(gdpre, ni), cdpre, ni, tol_dpre);
    check("linear_bwd_dgelu", label("%s %s %s dw (+=)", prec_name(p), wt_name(wt), it_name(it)),
          back(gdw, nw), cdw, nw, tol);
    if (with_bias)
      check("linear_bwd_dgelu", "dbias (+=)", back(gdb, (size_t)OC), cdb, (size_t)OC, 1e-4);
#ifdef MT_CUDA_EMU
    gemm_tally t = gemms_since();
    int fused = gelu_epilogue_serves(C) && it == MT_F32;
    int native = native_16(wt, p);
    long dinp_gemms = t.gemms - dw_gemms(N, C, OC, it, wt, p);
    long want = fused && (native || dinp_gemms == 1) ? dinp_gemms : 0;
    int ok = bwd_path_ok(t, N, C, OC, it, wt, p) && t.dgelu == want && t.gelu == 0;
    check_path("linear_bwd_dgelu", want ? "path: DGELU epilogue" : "path: GEMM, gradient kernel",
               ok, t);
#endif
    if (it == MT_F32) continue;
    /* dpre in the input's 16 bits, as a 16-bit job keeps it: the DGELU
     * epilogue's aux (pre) now has D's type */
    uint16_t *chp = halloc(ni * sizeof(uint16_t));
    void *ghp = DP(ni * sizeof(uint16_t));
    float *cdw2 = H(nw, -1, 1), *cdb2 = H((size_t)OC, -1, 1);
    float *gdw2 = Df(cdw2, nw), *gdb2 = Df(cdb2, (size_t)OC);
    cpu.ops->linear_bwd_dgelu(&cpu, chp, it, cscratch, cdw2, with_bias ? cdb2 : NULL, dout, hx, it,
                              hpre, hw, wt, ccvt, N, C, OC);
#ifdef MT_CUDA_EMU
    gemms_since();
#endif
    gpu.ops->linear_bwd_dgelu(&gpu, ghp, it, gscratch, gdw2, with_bias ? gdb2 : NULL, gdout, ginp,
                              it, gpre, gw, wt, gcvt, N, C, OC);
    check("linear_bwd_dgelu", label("%s %s dpre vs cpu", tag, wt_name(it)), back_half(ghp, ni, it),
          as_floats(chp, ni, it), ni, tol_dpre + half_tol(it));
    check("linear_bwd_dgelu", label("%s dpre: dw (+=)", wt_name(it)), back(gdw2, nw), cdw2, nw,
          tol);
    if (with_bias)
      check("linear_bwd_dgelu", label("%s dpre: dbias (+=)", wt_name(it)), back(gdb2, (size_t)OC),
            cdb2, (size_t)OC, 1e-4);
#ifdef MT_CUDA_EMU
    t = gemms_since();
    dinp_gemms = t.gemms - dw_gemms(N, C, OC, it, wt, p);
    want = gelu_epilogue_serves(C) && native ? dinp_gemms : 0;
    ok = bwd_path_ok(t, N, C, OC, it, wt, p) && t.dgelu == want && t.gelu == 0;
    check_path("linear_bwd_dgelu",
               want ? "16-bit dpre: DGELU epilogue" : "16-bit dpre: GEMM, gradient kernel", ok, t);
#endif
  }
  gpu.matmul = MT_MATMUL_FP32;
  arena_reset();
}

/* One way to call the linear ops: input and weights as stored, and the
 * conversion scratch they use. */
typedef struct {
  const void *inp;
  mt_dtype it;
  const void *w;
  mt_dtype wt;
  void *cvt;
} lin_call;

/* linear_fwd, linear_gelu_fwd, linear_bwd and linear_bwd_dgelu called as a
 * and as b on the same bias, dout and GeLU input: b's results against a's,
 * the GPU against itself, for two ways that sum the same products. On the
 * emulator (sums in one order) the same bits, but for dw once the rows go
 * in several blocks (`blocked`), which adds each block's sum to dw in turn;
 * on a GPU, within what the kernels' summation orders allow. dbias sums the
 * same fp32 dout either way: the same bits. native_path: b is the native
 * bf16 call beside a FAST_16BF one (the emulator checks that every GEMM of
 * b's calls is 16-bit; a GPU holds them to bf16's tolerance, below). Labels
 * read "<bname> = <aname>". */
static void compare_linear_calls(const lin_call *ca, const lin_call *cb, const char *aname,
                                 const char *bname, const char *tag, int N, int C, int OC,
                                 int blocked, int native_path) {
#ifdef MT_CUDA_EMU
  double same = 0.0, dw_tol = blocked ? 1e-6 : 0.0;
#define B_CALL_STARTS() gemms_since()
#define B_CALL_ENDS(op)                                                                            \
  do {                                                                                             \
    gemm_tally t_ = gemms_since();                                                                 \
    if (native_path)                                                                               \
      check_path(op, "path: all GEMMs 16-bit", t_.gemms >= 1 && t_.half == t_.gemms, t_);          \
  } while (0)
#else
  /* FAST_16BF "allows" tensor cores with a down-conversion to bf16: cuBLAS
   * promises neither that a shape gets them nor how they round, and a kernel
   * that keeps the fp32 inputs differs from the native bf16 call by bf16's
   * rounding. Either is a right bf16 GEMM, so on a GPU the two are held to
   * bf16's tolerance, not to the same bits (the emulator rounds as the
   * native call does: the same bits there) */
  /* dw in blocks sums each block's rows, then adds the block sums: fp32
   * sums of N products in another order, whose relative difference grows
   * as sqrt(N)·eps (the first GPU run, N 32768: 1.1e-5 to 1.2e-5, past a
   * flat 1e-5), so its bound is 4·sqrt(N)·FLT_EPSILON, 1e-5 at least */
  double order_tol = fmax(1e-5, 4.0 * sqrt((double)N) * FLT_EPSILON);
  double same = native_path ? prec_tol(MT_MATMUL_BF16) : 1e-5,
         dw_tol = native_path ? prec_tol(MT_MATMUL_BF16)
                  : blocked   ? order_tol
                              : 1e-5;
#define B_CALL_STARTS() ((void)0)
#define B_CALL_ENDS(op) ((void)0)
#endif
  size_t ni = (size_t)N * C, no = (size_t)N * OC, nw = (size_t)OC * C;
  float *b = Df(H((size_t)OC, -1, 1), (size_t)OC);
  /* GeLU's input, stored as each call's input: the values of its 16-bit
   * type where either is 16-bit */
  mt_dtype t16 = ca->it != MT_F32 ? ca->it : cb->it;
  float *pre = round_to(H(ni, -3, 3), ni, t16), *dout = Df(H(no, -1, 1), no);
  const void *host;
  void *prea = stored(pre, ni, ca->it, &host), *preb = stored(pre, ni, cb->it, &host);
  const char *eq = label("%s = %s", bname, aname), *near = label("%s ~ %s", bname, aname);

  float *oa = DN(no), *ob = DN(no);
  gpu.ops->linear_fwd(&gpu, oa, MT_F32, ca->inp, ca->it, ca->w, ca->wt, b, ca->cvt, N, C, OC);
  B_CALL_STARTS();
  gpu.ops->linear_fwd(&gpu, ob, MT_F32, cb->inp, cb->it, cb->w, cb->wt, b, cb->cvt, N, C, OC);
  B_CALL_ENDS("linear_fwd");
  check("linear_fwd", label("%s, %s", eq, tag), back(ob, no), back(oa, no), no, same);

  float *ga = DN(no), *pa = DN(no), *gb = DN(no), *pb = DN(no);
  gpu.ops->linear_gelu_fwd(&gpu, ga, pa, MT_F32, ca->inp, ca->it, ca->w, ca->wt, b, ca->cvt, N, C,
                           OC);
  B_CALL_STARTS();
  gpu.ops->linear_gelu_fwd(&gpu, gb, pb, MT_F32, cb->inp, cb->it, cb->w, cb->wt, b, cb->cvt, N, C,
                           OC);
  B_CALL_ENDS("linear_gelu_fwd");
  check("linear_gelu_fwd", label("%s: out", eq), back(gb, no), back(ga, no), no, same);
  check("linear_gelu_fwd", label("%s: pre", eq), back(pb, no), back(pa, no), no, same);

  float *h0 = H(ni, -1, 1), *hw0 = H(nw, -1, 1), *hb0 = H((size_t)OC, -1, 1);
  float *dxa = Df(h0, ni), *dwa = Df(hw0, nw), *dba = Df(hb0, (size_t)OC);
  float *dxb = Df(h0, ni), *dwb = Df(hw0, nw), *dbb = Df(hb0, (size_t)OC);
  gpu.ops->linear_bwd(&gpu, dxa, dwa, dba, dout, MT_F32, ca->inp, ca->it, ca->w, ca->wt, ca->cvt, N,
                      C, OC);
  B_CALL_STARTS();
  gpu.ops->linear_bwd(&gpu, dxb, dwb, dbb, dout, MT_F32, cb->inp, cb->it, cb->w, cb->wt, cb->cvt, N,
                      C, OC);
  B_CALL_ENDS("linear_bwd");
  check("linear_bwd", label("%s: dinp", eq), back(dxb, ni), back(dxa, ni), ni, same);
  check("linear_bwd", label("%s: dw%s", near, blocked ? " (blocks)" : ""), back(dwb, nw),
        back(dwa, nw), nw, dw_tol);
  check("linear_bwd", label("%s: dbias", eq), back(dbb, (size_t)OC), back(dba, (size_t)OC),
        (size_t)OC, 0.0);

  float *ea = DN(ni), *eb = DN(ni), *sa = DN(ni), *sb = DN(ni);
  dwa = Df(hw0, nw), dwb = Df(hw0, nw);
  gpu.ops->linear_bwd_dgelu(&gpu, ea, MT_F32, sa, dwa, NULL, dout, ca->inp, ca->it, prea, ca->w,
                            ca->wt, ca->cvt, N, C, OC);
  B_CALL_STARTS();
  gpu.ops->linear_bwd_dgelu(&gpu, eb, MT_F32, sb, dwb, NULL, dout, cb->inp, cb->it, preb, cb->w,
                            cb->wt, cb->cvt, N, C, OC);
  B_CALL_ENDS("linear_bwd_dgelu");
  check("linear_bwd_dgelu", label("%s: dpre", eq), back(eb, ni), back(ea, ni), ni, same);
  check("linear_bwd_dgelu", label("%s: dw%s", near, blocked ? " (blocks)" : ""), back(dwb, nw),
        back(dwa, nw), nw, dw_tol);
#undef B_CALL_STARTS
#undef B_CALL_ENDS
}

/* bf16 weights in native bf16 GEMMs against fp32 weights holding the same
 * values in FAST_16BF GEMMs (fp32 inputs both): both round every operand to
 * bf16 (nearest even) and accumulate in fp32. The native call rounds the
 * rows of inp and dout into the conversion budget, 2·(C + OC) bytes a row
 * (ops_cuda.cu's lin_plan_of): past it, in blocks of rows, its dw a sum of
 * the blocks' sums (the emulator's budget is 2 KB: its 1024 × 768 × 3072
 * case goes in blocks, a GPU's does not). */
static void test_linear_bf16_native(int N, int C, int OC) {
  int blocked = blocks_of(N, 2 * ((size_t)C + OC)) > 1;
  gpu.matmul = MT_MATMUL_BF16;
  size_t ni = (size_t)N * C, nw = (size_t)OC * C;
  float *w = round_to(H(nw, -0.5f, 0.5f), nw, MT_BF16), *x = Df(H(ni, -1, 1), ni);
  const void *hw;
  lin_call fast = {x, MT_F32, Df(w, nw), MT_F32, NULL};
  lin_call native = {x, MT_F32, stored(w, nw, MT_BF16, &hw), MT_BF16,
                     DP(gpu.ops->linear_scratch(&gpu, N, C, OC, MT_F32, MT_BF16))};
  compare_linear_calls(&fast, &native, "FAST_16BF", "bf16 native",
                       label("N=%d C=%d OC=%d", N, C, OC), N, C, OC, blocked, 1);
  gpu.matmul = MT_MATMUL_FP32;
  arena_reset();
}

/* A 16-bit input (t, with t weights, in d->matmul p) against an fp32 input
 * holding the same values. Products of 16-bit values are exact, and bf16
 * GEMMs, TF32 and fp32 ones round none of them, so the same sums. */
static void test_linear_typed_input(int N, int C, int OC, mt_matmul_precision p, mt_dtype t,
                                    int blocked) {
  gpu.matmul = p;
  size_t ni = (size_t)N * C, nw = (size_t)OC * C;
  const void *host;
  float *xv = round_to(H(ni, -1, 1), ni, t);
  void *w = stored(H(nw, -0.5f, 0.5f), nw, t, &host);
  size_t cb32 = gpu.ops->linear_scratch(&gpu, N, C, OC, MT_F32, t);
  size_t cb16 = gpu.ops->linear_scratch(&gpu, N, C, OC, t, t);
  void *cvt = DP(cb32 > cb16 ? cb32 : cb16);
  lin_call in32 = {Df(xv, ni), MT_F32, w, t, cvt}, in16 = {stored(xv, ni, t, &host), t, w, t, cvt};
  compare_linear_calls(
      &in32, &in16, "fp32 in", "16-bit in",
      label("%s %s N=%d C=%d OC=%d", prec_name(p), t == MT_F16 ? "fp16" : "bf16", N, C, OC), N, C,
      OC, blocked, 0);
  gpu.matmul = MT_MATMUL_FP32;
  arena_reset();
}

#ifdef MT_CUDA_EMU
/* Past the conversion budget (MT_CUDA_CVT_BYTES, tiny on the emulator: see
 * tests/gpu/meson.build) the linear ops convert in blocks, a GEMM each: the
 * forward of an fp32 input and every backward of a shape chosen past it
 * take more GEMMs than one block does; the forward of a 16-bit input stays
 * one GEMM, converting nothing. Their results are the other tests'
 * business. */
static void test_linear_blocks(int N, int C, int OC, mt_matmul_precision p, mt_dtype wt,
                               mt_dtype it) {
  gpu.matmul = p;
  size_t ni = (size_t)N * C, no = (size_t)N * OC, nw = (size_t)OC * C;
  const void *host;
  void *w = stored(H(nw, -0.5f, 0.5f), nw, wt, &host), *x = stored(H(ni, -1, 1), ni, it, &host);
  void *cvt = DP(gpu.ops->linear_scratch(&gpu, N, C, OC, it, wt));
  float *dout = Df(H(no, -1, 1), no);
  char tag[80];
  snprintf(tag, sizeof tag, "%s %s %s N=%d C=%d OC=%d blocks", prec_name(p), wt_name(wt),
           it_name(it), N, C, OC);
  gemms_since();
  gpu.ops->linear_fwd(&gpu, DN(no), MT_F32, x, it, w, wt, NULL, cvt, N, C, OC);
  gemm_tally t = gemms_since();
  check_path("linear_fwd", tag, fwd_path_ok(t, it, wt, p) && (it != MT_F32 || t.gemms > 1), t);
  gpu.ops->linear_bwd(&gpu, DN(ni), DN(nw), NULL, dout, MT_F32, x, it, w, wt, cvt, N, C, OC);
  t = gemms_since();
  check_path("linear_bwd", tag, bwd_path_ok(t, N, C, OC, it, wt, p) && t.gemms > 2, t);
  if (mt_device_sync(&gpu)) die("device sync");
  gpu.matmul = MT_MATMUL_FP32;
  arena_reset();
}
#endif

/* An input neither fp32 nor of the weights' type has no GEMM, nor has a
 * 16-bit output from an fp32 input (ops.h rules them out): the op leaves
 * its outputs alone and the next sync reports it, naming the types. */
static void test_linear_bad_types(void) {
  static const mt_dtype pairs[][2] = {{MT_BF16, MT_F16}, {MT_F16, MT_BF16}, {MT_BF16, MT_F32}};
  int N = 9, C = 16, OC = 8;
  size_t no = (size_t)N * OC, nw = (size_t)OC * C;
  float *out0 = H(no, -1, 1), *dw0 = H(nw, -1, 1);
  void *x = DP((size_t)N * C * 4), *w = DP(nw * 4), *cvt = DP(1 << 16);
  for (size_t k = 0; k < sizeof pairs / sizeof *pairs; k++) {
    mt_dtype it = pairs[k][0], wt = pairs[k][1];
    const char *what = label("%s, %s", it_name(it), wt_name(wt));
    float *out = Df(out0, no), *dw = Df(dw0, nw);
    gpu.ops->linear_fwd(&gpu, out, MT_F32, x, it, w, wt, NULL, cvt, N, C, OC);
    int rc = mt_device_sync(&gpu);
    int named = rc && strstr(mt_errmsg(), "linear_fwd") &&
                strstr(mt_errmsg(), it == MT_BF16 ? "bf16 input" : "fp16 input");
    check_that("linear_fwd", label("%s: an error", what), named, rc ? mt_errmsg() : "no error");
    check("linear_fwd", label("%s: out left alone", what), back(out, no), out0, no, 0.0);
    if (wt != MT_F32) { /* a 16-bit output from an fp32 input */
      gpu.ops->linear_fwd(&gpu, out, wt, x, MT_F32, w, wt, NULL, cvt, N, C, OC);
      rc = mt_device_sync(&gpu);
      named = rc && strstr(mt_errmsg(), wt == MT_BF16 ? "bf16 output" : "fp16 output");
      check_that("linear_fwd", label("%s output, fp32 in: an error", wt_name(wt)), named,
                 rc ? mt_errmsg() : "no error");
      check("linear_fwd", label("%s output: out left alone", wt_name(wt)), back(out, no), out0,
            no / 2, 0.0);
    }
    gpu.ops->linear_bwd(&gpu, NULL, dw, NULL, out, MT_F32, x, it, w, wt, cvt, N, C, OC);
    rc = mt_device_sync(&gpu);
    check_that("linear_bwd", label("%s: an error", what), rc != 0, rc ? mt_errmsg() : "no error");
    check("linear_bwd", label("%s: dw left alone", what), back(dw, nw), dw0, nw, 0.0);
  }
  /* a 16-bit gradient (dout, or linear_bwd_dgelu's dpre) only with a
   * 16-bit input of the weights' type */
  float *dw = Df(dw0, nw), *dout = Df(out0, no);
  gpu.ops->linear_bwd(&gpu, NULL, dw, NULL, x, MT_BF16, x, MT_F32, w, MT_BF16, cvt, N, C, OC);
  int rc = mt_device_sync(&gpu);
  check_that("linear_bwd", "bf16 dout, fp32 in: an error", rc && strstr(mt_errmsg(), "bf16 dout"),
             rc ? mt_errmsg() : "no error");
  check("linear_bwd", "bf16 dout: dw left alone", back(dw, nw), dw0, nw, 0.0);
  gpu.ops->linear_bwd_dgelu(&gpu, DP((size_t)N * C * 2), MT_BF16, DN((size_t)N * C), dw, NULL, dout,
                            x, MT_F32, x, w, MT_BF16, cvt, N, C, OC);
  rc = mt_device_sync(&gpu);
  check_that("linear_bwd_dgelu", "bf16 dpre, fp32 in: an error",
             rc && strstr(mt_errmsg(), "bf16 dpre"), rc ? mt_errmsg() : "no error");
  check("linear_bwd_dgelu", "bf16 dpre: dw left alone", back(dw, nw), dw0, nw, 0.0);
  arena_reset();
}

/* linear_scratch: none for an fp32 input with fp32 weights whatever
 * d->matmul; some for 16-bit weights, with an fp32 input or one of their
 * type; bounded (blocks) where converting a whole operand would take GiBs */
static void test_linear_scratch(void) {
  static const mt_matmul_precision precs[] = {MT_MATMUL_FP32, MT_MATMUL_TF32, MT_MATMUL_BF16};
  char detail[96];
  for (int i = 0; i < 3; i++) {
    gpu.matmul = precs[i];
    size_t f32 = gpu.ops->linear_scratch(&gpu, 9, 20, 12, MT_F32, MT_F32) |
                 gpu.ops->linear_scratch(&gpu, 1 << 20, 1 << 15, 1 << 15, MT_F32, MT_F32);
    snprintf(detail, sizeof detail, "%zu bytes", f32);
    check_that("linear_scratch", label("%s fp32 in, w: 0", prec_name(precs[i])), f32 == 0, detail);
    for (int h = 0; h < 4; h++) {
      mt_dtype wt = h & 1 ? MT_F16 : MT_BF16, it = h & 2 ? wt : MT_F32;
      size_t small = gpu.ops->linear_scratch(&gpu, 9, 20, 12, it, wt);
      /* whole: 128 GiB of bf16 activations and gradients, 4 GiB of fp32 weights */
      size_t big = gpu.ops->linear_scratch(&gpu, 1 << 20, 1 << 15, 1 << 15, it, wt);
      snprintf(detail, sizeof detail, "%zu bytes, %zu for N=2^20 C=OC=2^15", small, big);
      check_that("linear_scratch",
                 label("%s %s %s: some, bounded", prec_name(precs[i]), wt_name(wt), it_name(it)),
                 small > 0 && big > 0 && big <= (size_t)1 << 30, detail);
    }
  }
  gpu.matmul = MT_MATMUL_FP32;
}

/* to_half: the bits of half.h's conversions (nearest even, subnormals,
 * NaN, overflow), the source left as it was */
static void test_to_half(size_t n) {
  float *x = H(n, -70000, 70000);
  static const float special[] = {NAN,        -INFINITY,      INFINITY,       65520.0f,
                                  65519.0f,   -0.0f,          0x1p-24f,       0x1p-25f,
                                  0x1.8p-25f, 1.0f + 0x1p-8f, 1.0f + 0x3p-8f, FLT_MAX,
                                  1e-40f,     -3.0e38f,       0x1.002p0f,     1e-8f};
  size_t ns = sizeof special / sizeof *special;
  for (size_t i = 0; i < ns && i < n; i++) x[i] = special[i];
  for (size_t i = ns; i < n && i < 64; i++) x[i] = urand(-1, 1) * 0x1p-20f; /* fp16 subnormals */
  float *gx = Df(x, n);
  for (int fp16 = 0; fp16 < 2; fp16++) {
    uint16_t *gh = dalloc(n * sizeof(uint16_t));
    gpu.ops->to_half(&gpu, gh, gx, n, fp16);
    float *got = halloc(n * sizeof(float)), *want = halloc(n * sizeof(float));
    if (mt_device_sync(&gpu) || mt_device_memcpy_dtoh(&gpu, got, gh, n * sizeof(uint16_t)))
      die("copy from the device");
    uint16_t *bits = (uint16_t *)got;
    for (size_t i = n; i-- > 0;) got[i] = (float)bits[i]; /* the bits as exact floats */
    for (size_t i = 0; i < n; i++) want[i] = (float)mt_half_pack(x[i], fp16);
    check("to_half", label("%s bits n=%zu", fp16 ? "fp16" : "bf16", n), got, want, n, 0.0);
  }
  float *left = halloc(n * sizeof(float));
  if (mt_device_memcpy_dtoh(&gpu, left, gx, n * sizeof(float))) die("copy from the device");
  check_that("to_half", "source left as it was", !memcmp(left, x, n * sizeof(float)), "");
  arena_reset();
}

/* Attention within documents (ops.h's doc_start): with_docs set, the
 * attention tests below give both backends these starts: in sample 0 ends
 * at rows 5 and 6 (adjacent), 30 and 63 (so rows from 64 start past a
 * whole flash tile of keys: skipped, and the dK/dV sweep of keys 0..63
 * stops before the queries from 64), in sample 1 at row 0 and every 17th,
 * in a third sample none. */
static int with_docs;
static int32_t *doc_starts(int B, int T) {
  int32_t *ds = halloc((size_t)B * T * sizeof(int32_t));
  for (int b = 0; b < B; b++) {
    int32_t st = 0;
    for (int t = 0; t < T; t++) {
      ds[(size_t)b * T + t] = st;
      int end = b % 3 == 0 ? t == 5 || t == 6 || t == 30 || t == 63 : b % 3 == 1 ? t % 17 == 0 : 0;
      if (end) st = t + 1;
    }
  }
  return ds;
}

static void test_attention(shape s, mt_matmul_precision p, int with_dropout) {
  gpu.matmul = p;
  double tol = prec_tol(p);
  int B = s.B, T = s.T, C = s.C, NH = s.NH;
  size_t nq = (size_t)B * T * 3 * C, no = (size_t)B * T * C, nl = (size_t)B * NH * T;
  size_t ncs = cpu.ops->attention_scratch(&cpu, T, C, NH, MT_F32);
  size_t ngs = gpu.ops->attention_scratch(&gpu, T, C, NH, MT_F32);
  mt_dropout drop = {0.2f, 0x1234567887654321ull, 11, 2, 0};
  const mt_dropout *dp = with_dropout ? &drop : NULL;
  const char *tag = label("%s B=%d T=%d C=%d NH=%d%s%s", prec_name(p), B, T, C, NH,
                          with_dropout ? " drop" : "", with_docs ? " docs" : "");
  int32_t *cds = with_docs ? doc_starts(B, T) : NULL;
  int32_t *gds = cds ? D(cds, (size_t)B * T * sizeof(int32_t)) : NULL;
  float *qkv = H(nq, -1.5f, 1.5f), *gqkv = Df(qkv, nq);
  float *co = halloc(no * sizeof(float)), *cl = halloc(nl * sizeof(float));
  float *cs = halloc(ncs * sizeof(float)), *gs = DN(ngs);
  cpu.ops->attention_fwd(&cpu, co, cl, cs, qkv, MT_F32, B, T, C, NH, dp, cds);
  float *go = DN(no), *gl = DN(nl);
  gpu.ops->attention_fwd(&gpu, go, gl, gs, gqkv, MT_F32, B, T, C, NH, dp, gds);
  check("attention_fwd", label("%s out", tag), back(go, no), co, no, tol);
  check("attention_fwd", label("%s lse", tag), back(gl, nl), cl, nl, tol);

  float *dout = H(no, -1, 1), *cdq = H(nq, -1, 1), *gdq = Df(cdq, nq);
  /* both backward passes take the CPU's lse, so only the backward differs */
  cpu.ops->attention_bwd(&cpu, cdq, MT_F32, cs, dout, co, qkv, MT_F32, cl, B, T, C, NH, dp, cds);
  gpu.ops->attention_bwd(&gpu, gdq, MT_F32, gs, Df(dout, no), Df(co, no), gqkv, MT_F32, Df(cl, nl),
                         B, T, C, NH, dp, gds);
  check("attention_bwd", label("%s dqkv (+=)", tag), back(gdq, nq), cdq, nq, tol);
  gpu.matmul = MT_MATMUL_FP32;
  arena_reset();
}

/* Decoding with a key-value cache: the GPU's attention of one new position
 * over n cached rows against the CPU's, for n = 1, a few, and all T rows
 * (more keys than the block's threads, or than one tile of its online
 * softmax); the output poisoned first. */
static void test_attention_decode(int T, int C, int NH) {
  size_t nq = (size_t)T * 3 * C;
  float *qkv = H(nq, -1.5f, 1.5f), *gqkv = Df(qkv, nq), *c = halloc((size_t)C * sizeof(float));
  int ns[] = {1, 3, T};
  for (int k = 0; k < 3; k++) {
    float *g = DN((size_t)C);
    cpu.ops->attention_decode(&cpu, c, qkv, ns[k], C, NH);
    gpu.ops->attention_decode(&gpu, g, gqkv, ns[k], C, NH);
    check("attention_decode", label("T=%d C=%d NH=%d, %d keys", T, C, NH, ns[k]),
          back(g, (size_t)C), c, (size_t)C, 1e-5);
  }
  arena_reset();
}

/* A 16-bit qkv (a bf16 or fp16 job's): the GPU's flash kernels against the
 * CPU's attention of the same values, each backend with exactly the scratch
 * it asks for qt. The flash kernels also round the probabilities, dout and
 * the scores' gradient to qt, so the tolerance is the 16-bit one. out is
 * written in qt by both (poisoned first); the backward's out is the CPU's,
 * as a job keeps it. */
static void test_flash_attention(shape s, mt_dtype qt, int with_dropout) {
  int B = s.B, T = s.T, C = s.C, NH = s.NH, fp16 = qt == MT_F16;
  size_t nq = (size_t)B * T * 3 * C, no = (size_t)B * T * C, nl = (size_t)B * NH * T;
  size_t ncs = cpu.ops->attention_scratch(&cpu, T, C, NH, qt);
  size_t ngs = gpu.ops->attention_scratch(&gpu, T, C, NH, qt);
  mt_dropout drop = {0.2f, 0x1234567887654321ull, 11, 2, 0};
  const mt_dropout *dp = with_dropout ? &drop : NULL;
  char tag[96]; /* kept: label's buffers turn over */
  snprintf(tag, sizeof tag, "%s B=%d T=%d HS=%d NH=%d%s%s", fp16 ? "fp16" : "bf16", B, T, C / NH,
           NH, with_dropout ? " drop" : "", with_docs ? " docs" : "");
  int32_t *cds = with_docs ? doc_starts(B, T) : NULL;
  int32_t *gds = cds ? D(cds, (size_t)B * T * sizeof(int32_t)) : NULL;
  mt__cuda_attention_path(&gpu, MT__CUDA_ATT_FLASH); /* (test_chunked16_attention: the other) */
  const void *qh; /* qkv in 16 bits, on the host and (gqkv) the device */
  void *gqkv = stored(H(nq, -1.5f, 1.5f), nq, qt, &qh);
  uint16_t *oh = halloc(no * sizeof(uint16_t));
  float *cl = halloc(nl * sizeof(float)), *cs = halloc(ncs * sizeof(float)), *gs = DN(ngs);
  cpu.ops->attention_fwd(&cpu, oh, cl, cs, qh, qt, B, T, C, NH, dp, cds);
  void *go = DP(no * sizeof(uint16_t));
  float *gl = DN(nl);
#ifdef MT_CUDA_EMU
  long flash0 = mt_emu_launch_count("flash_fwd");
#endif
  mt__cuda_flash_fwd_rows(&gpu, 16);
  gpu.ops->attention_fwd(&gpu, go, gl, gs, gqkv, qt, B, T, C, NH, dp, gds);
  float *go16 = back_half(go, no, qt), *gl16 = back(gl, nl);
  check("attention_fwd", label("%s out", tag), go16, as_floats(oh, no, qt), no, 1e-2);
  check("attention_fwd", label("%s lse", tag), gl16, cl, nl, 1e-2);
#ifdef MT_CUDA_EMU
  check_that("attention_fwd", label("%s flash kernel", tag),
             mt_emu_launch_count("flash_fwd") == flash0 + 1, "one launch");
#endif
  /* 32 query rows a warp (where built: head sizes to 160) and the choice
   * timed on the shape's first call (4 launches then, 6 where P may also
   * pass in registers at 16 rows; 1 after): the same bits as 16, each into
   * poisoned outputs */
  int fwd_rows[2] = {32, 0};
  for (int i = 0; i < 2; i++) {
    mt__cuda_flash_fwd_rows(&gpu, fwd_rows[i]);
    int known = mt__cuda_flash_fwd_rows_of(&gpu, C / NH, fp16, B, T, NH, with_dropout, !!gds);
    void *go2 = DP(no * sizeof(uint16_t));
    float *gl2 = DN(nl);
#ifdef MT_CUDA_EMU
    long launches = mt_emu_launch_count("flash_fwd");
#endif
    gpu.ops->attention_fwd(&gpu, go2, gl2, gs, gqkv, qt, B, T, C, NH, dp, gds);
    const char *how = fwd_rows[i] ? "32 rows a warp" : known ? "rows known" : "rows timed";
    check("attention_fwd", label("%s out, %s", tag, how), back_half(go2, no, qt), go16, no, 0.0);
    check("attention_fwd", label("%s lse, %s", tag, how), back(gl2, nl), gl16, nl, 0.0);
    int rows = mt__cuda_flash_fwd_rows_of(&gpu, C / NH, fp16, B, T, NH, with_dropout, !!gds);
    int set = C / NH > 160 ? 16 : fwd_rows[i]; /* 0: either, as timed */
    check_that("attention_fwd", label("%s rows a warp, %s", tag, how),
               set ? rows == set : rows == 16 || rows == 32, label("%d", rows));
    /* P in registers: bf16 at 16 rows where the device allows it, unless
     * timed slower (either then); at 32 rows or in fp16 not */
    int pr = mt__cuda_flash_fwd_p_regs_of(&gpu, C / NH, fp16, B, T, NH, with_dropout, !!gds);
    int regs_here = rows == 16 && !fp16 && mt__cuda_flash_p_regs_of(&gpu);
    int timed = !set && C / NH <= 160; /* (head size 256: 16 rows, not timed) */
    if (!(regs_here && timed))
      check_that("attention_fwd", label("%s P in registers, %s", tag, how), pr == regs_here,
                 label("%d at %d rows", pr, rows));
#ifdef MT_CUDA_EMU
    long want = known ? 1 : !fp16 && mt__cuda_flash_p_regs_of(&gpu) ? 6 : 4;
    check_that("attention_fwd", label("%s launches, %s", tag, how),
               mt_emu_launch_count("flash_fwd") == launches + want,
               label("%ld of %ld", mt_emu_launch_count("flash_fwd") - launches, want));
#endif
  }

  float *dout = H(no, -1, 1), *cdq = H(nq, -1, 1), *gdq = Df(cdq, nq);
  void *goh = D(oh, no * sizeof(uint16_t));
  float *gdout = Df(dout, no), *gcl = Df(cl, nl);
  cpu.ops->attention_bwd(&cpu, cdq, MT_F32, cs, dout, oh, qh, qt, cl, B, T, C, NH, dp, cds);
  gpu.ops->attention_bwd(&gpu, gdq, MT_F32, gs, gdout, goh, gqkv, qt, gcl, B, T, C, NH, dp, gds);
  check("attention_bwd", label("%s dqkv (+=)", tag), back(gdq, nq), cdq, nq, 1e-2);

  /* dqkv in qkv's own type, as a 16-bit job keeps it: written (every value
   * poisoned first), against the CPU's, which is its fp32 sum rounded */
  uint16_t *cdh = halloc(nq * sizeof(uint16_t));
  void *gdh = DP(nq * sizeof(uint16_t));
  cpu.ops->attention_bwd(&cpu, cdh, qt, cs, dout, oh, qh, qt, cl, B, T, C, NH, dp, cds);
  gpu.ops->attention_bwd(&gpu, gdh, qt, gs, gdout, goh, gqkv, qt, gcl, B, T, C, NH, dp, gds);
  check("attention_bwd", label("%s dqkv in 16 bits (written)", tag), back_half(gdh, nq, qt),
        as_floats(cdh, nq, qt), nq, 1e-2);
  /* bf16 on a GPU whose matrix_a fragment is laid out as the accumulator
   * (the emulator's, unless told otherwise): P and dS pass in registers;
   * through shared memory instead, the same bits, into poisoned outputs */
  if (!fp16 && mt__cuda_flash_p_regs_of(&gpu)) {
    mt__cuda_flash_p_regs(&gpu, 0);
    mt__cuda_flash_fwd_rows(&gpu, 16);
    void *go3 = DP(no * sizeof(uint16_t)), *gdh3 = DP(nq * sizeof(uint16_t));
    float *gl3 = DN(nl);
    gpu.ops->attention_fwd(&gpu, go3, gl3, gs, gqkv, qt, B, T, C, NH, dp, gds);
    gpu.ops->attention_bwd(&gpu, gdh3, qt, gs, gdout, goh, gqkv, qt, gcl, B, T, C, NH, dp, gds);
    check("attention_fwd", label("%s out, P through shared memory", tag), back_half(go3, no, qt),
          go16, no, 0.0);
    check("attention_fwd", label("%s lse, P through shared memory", tag), back(gl3, nl), gl16, nl,
          0.0);
    check("attention_bwd", label("%s dqkv, dS through shared memory", tag), back_half(gdh3, nq, qt),
          back_half(gdh, nq, qt), nq, 0.0);
    mt__cuda_flash_p_regs(&gpu, 1);
  }
  if (!with_dropout) { /* the other 16-bit type: refused, naming it, dqkv left alone */
    mt_dtype other = fp16 ? MT_BF16 : MT_F16;
    gpu.ops->attention_bwd(&gpu, gdh, other, gs, gdout, goh, gqkv, qt, gcl, B, T, C, NH, dp, NULL);
    int rc = mt_device_sync(&gpu);
    check_that("attention_bwd", label("%s dqkv of the other 16-bit type: an error", tag),
               rc && strstr(mt_errmsg(), "dqkv"), rc ? mt_errmsg() : "no error");
    check("attention_bwd", label("%s: dqkv left alone", tag), back_half(gdh, nq, qt),
          as_floats(cdh, nq, qt), nq, 1e-2);
  }
  arena_reset();
}

/* A 16-bit qkv by chunked 16-bit GEMMs (mt__cuda_attention_path chunked),
 * against the CPU's attention of the same values: out and lse, dqkv added
 * into fp32 and written in qkv's type, each into poisoned outputs, within
 * the 16-bit bound. Then auto, on a fresh shape: the forward's first call
 * runs the flash kernels once and both paths twice (their timing), keeps
 * one, and later calls run that one alone; the backward with a 16-bit dqkv
 * the same; with an fp32 dqkv (added into) flash, untimed. Head sizes over
 * MT_FLASH_MAX_HS take the GEMMs whatever is set. */
static void test_chunked16_attention(shape s, mt_dtype qt, int with_dropout) {
  int B = s.B, T = s.T, C = s.C, NH = s.NH, HS = C / NH, fp16 = qt == MT_F16;
  int wide = HS > MT_FLASH_MAX_HS, docs = with_docs;
  size_t nq = (size_t)B * T * 3 * C, no = (size_t)B * T * C, nl = (size_t)B * NH * T;
  size_t ncs = cpu.ops->attention_scratch(&cpu, T, C, NH, qt);
  size_t ngs = gpu.ops->attention_scratch(&gpu, T, C, NH, qt);
  mt_dropout drop = {0.2f, 0x1234567887654321ull, 11, 2, 0};
  const mt_dropout *dp = with_dropout ? &drop : NULL;
  char tag[112];
  snprintf(tag, sizeof tag, "%s B=%d T=%d HS=%d NH=%d%s%s, 16-bit GEMMs", fp16 ? "fp16" : "bf16", B,
           T, HS, NH, with_dropout ? " drop" : "", docs ? " docs" : "");
  int32_t *cds = docs ? doc_starts(B, T) : NULL;
  int32_t *gds = cds ? D(cds, (size_t)B * T * sizeof(int32_t)) : NULL;
  const void *qh;
  void *gqkv = stored(H(nq, -1.5f, 1.5f), nq, qt, &qh);
  uint16_t *oh = halloc(no * sizeof(uint16_t)), *cdh = halloc(nq * sizeof(uint16_t));
  float *cl = halloc(nl * sizeof(float)), *cs = halloc(ncs * sizeof(float)), *gs = DN(ngs);
  float *dout = H(no, -1, 1), *cdq = H(nq, -1, 1), *gdq = Df(cdq, nq), *gdout = Df(dout, no);
  float *cdq0 = hcopy(cdq, nq);
  cpu.ops->attention_fwd(&cpu, oh, cl, cs, qh, qt, B, T, C, NH, dp, cds);
  cpu.ops->attention_bwd(&cpu, cdq, MT_F32, cs, dout, oh, qh, qt, cl, B, T, C, NH, dp, cds);
  cpu.ops->attention_bwd(&cpu, cdh, qt, cs, dout, oh, qh, qt, cl, B, T, C, NH, dp, cds);
  void *goh = D(oh, no * sizeof(uint16_t));
  float *gcl = Df(cl, nl);

  mt__cuda_attention_path(&gpu, MT__CUDA_ATT_CHUNKED);
  void *go = DP(no * sizeof(uint16_t)), *gdh = DP(nq * sizeof(uint16_t));
  float *gl = DN(nl);
  gpu.ops->attention_fwd(&gpu, go, gl, gs, gqkv, qt, B, T, C, NH, dp, gds);
  check("attention_fwd", label("%s out", tag), back_half(go, no, qt), as_floats(oh, no, qt), no,
        1e-2);
  check("attention_fwd", label("%s lse", tag), back(gl, nl), cl, nl, 1e-2);
  gpu.ops->attention_bwd(&gpu, gdq, MT_F32, gs, gdout, goh, gqkv, qt, gcl, B, T, C, NH, dp, gds);
  check("attention_bwd", label("%s dqkv (+=)", tag), back(gdq, nq), cdq, nq, 1e-2);
#ifdef MT_CUDA_EMU
  /* the last chunk's rows (T columns) in blocks of threads enough to keep
   * every column, 8 a thread, within the row kernels' bounds (meson.build) */
  long want_threads = ((T + 7) / 8 + 31) / 32 * 32;
  if (want_threads < MT_CUDA_ATT_ROW_THREADS) want_threads = MT_CUDA_ATT_ROW_THREADS;
  if (want_threads > MT_CUDA_ATT_ROW_THREADS_MAX) want_threads = MT_CUDA_ATT_ROW_THREADS_MAX;
  check_that("attention_bwd", label("%s rows of %d in blocks of %ld threads", tag, T, want_threads),
             mt_emu_launch_threads("k_att16_softmax") == want_threads &&
                 mt_emu_launch_threads("k_att16_softmax_bwd") == want_threads,
             label("forward %ld, backward %ld", mt_emu_launch_threads("k_att16_softmax"),
                   mt_emu_launch_threads("k_att16_softmax_bwd")));
#endif
  gpu.ops->attention_bwd(&gpu, gdh, qt, gs, gdout, goh, gqkv, qt, gcl, B, T, C, NH, dp, gds);
  check("attention_bwd", label("%s dqkv in 16 bits (written)", tag), back_half(gdh, nq, qt),
        as_floats(cdh, nq, qt), nq, 1e-2);
#ifdef MT_CUDA_EMU
  /* the shapes' algorithms kept (ALGO_CACHE): the same calls again query
   * cuBLASLt's heuristic no more, where the chunks' GEMM shapes are few
   * (row blocks of distinct widths, 7 GEMMs each); not with cuBLASLt
   * off (MT_CUDA_EMU_NO_LT), whose refusals are not kept */
  if ((T + 3) / 4 <= 8 && !getenv("MT_CUDA_EMU_NO_LT")) {
    long q0 = mt_emu_heuristic_count();
    gpu.ops->attention_fwd(&gpu, go, gl, gs, gqkv, qt, B, T, C, NH, dp, gds);
    gpu.ops->attention_bwd(&gpu, gdh, qt, gs, gdout, goh, gqkv, qt, gcl, B, T, C, NH, dp, gds);
    check_that("attention", label("%s again: no heuristic query", tag),
               mt_emu_heuristic_count() == q0, label("%ld", mt_emu_heuristic_count() - q0));
  }
#endif
  /* smaller chunks (mt__cuda_attention_chunk, gpu_bench's timing of
   * them): the emulator's rows 1 to 3 at a time and heads one or two, a
   * GPU's half the budget's and one more (the last block partial), the
   * same within the bound; a negative count refused */
  if (NH > 1) {
    int rows0, heads0, rows, heads;
    mt__cuda_attention_chunk_of(&gpu, T, NH, HS, &rows0, &heads0);
    int cr = rows0 > 4 ? rows0 / 2 + 1 : 1 + T % 3, ch = heads0 > 2 ? heads0 / 2 : 1 + NH % 2;
    mt__cuda_attention_chunk(&gpu, cr, ch);
    mt__cuda_attention_chunk_of(&gpu, T, NH, HS, &rows, &heads);
    check_that("attention", label("%s, chunks of at most %d rows and %d heads", tag, cr, ch),
               rows == (cr < rows0 ? cr : rows0) && heads == (ch < heads0 ? ch : heads0),
               label("%d rows and %d heads, from %d and %d", rows, heads, rows0, heads0));
    void *go4 = DP(no * sizeof(uint16_t)), *gdh4 = DP(nq * sizeof(uint16_t));
    float *gl4 = DN(nl);
#ifdef MT_CUDA_EMU
    long k0 = mt_emu_launch_count("k_att16_softmax");
#endif
    gpu.ops->attention_fwd(&gpu, go4, gl4, gs, gqkv, qt, B, T, C, NH, dp, gds);
#ifdef MT_CUDA_EMU
    long kn = mt_emu_launch_count("k_att16_softmax") - k0;
    long want = (long)B * ((NH + heads - 1) / heads) * ((T + rows - 1) / rows);
    check_that("attention_fwd", label("%s, a row kernel a chunk", tag), kn == want,
               label("%ld launches for %ld chunks", kn, want));
#endif
    gpu.ops->attention_bwd(&gpu, gdh4, qt, gs, gdout, goh, gqkv, qt, gcl, B, T, C, NH, dp, gds);
    char sm[160];
    snprintf(sm, sizeof sm, "%s, chunks of %d rows and %d heads", tag, rows, heads);
    check("attention_fwd", label("%s out", sm), back_half(go4, no, qt), as_floats(oh, no, qt), no,
          1e-2);
    check("attention_fwd", label("%s lse", sm), back(gl4, nl), cl, nl, 1e-2);
    check("attention_bwd", label("%s dqkv in 16 bits (written)", sm), back_half(gdh4, nq, qt),
          as_floats(cdh, nq, qt), nq, 1e-2);
    /* fewer rows take no more heads than the budget's: their dK and dV
     * sums would outgrow the scratch */
    mt__cuda_attention_chunk(&gpu, 1, 0);
    mt__cuda_attention_chunk_of(&gpu, T, NH, HS, &rows, &heads);
    check_that("attention", label("%s, chunks of 1 row: %d heads, the budget's", tag, heads0),
               rows == 1 && heads == heads0, label("%d rows and %d heads", rows, heads));
    int crc = mt__cuda_attention_chunk(&gpu, -1, 0);
    check_that("attention", label("%s: chunks of -1 rows refused", tag),
               crc == MT_EINVAL && strstr(mt_errmsg(), "-1 rows"), mt_errmsg());
    mt__cuda_attention_chunk(&gpu, 0, 0);
  }

  /* auto; B + 1 samples (the first B as above): a shape not yet timed */
  mt__cuda_attention_path(&gpu, MT__CUDA_ATT_AUTO);
  int B2 = B + 1;
  size_t nq2 = nq / B * B2, no2 = no / B * B2, nl2 = nl / B * B2;
  void *gqkv2 = DP(nq2 * 2), *go2 = DP(no2 * 2), *gdh2 = DP(nq2 * 2);
  float *gl2 = DN(nl2), *gdout2 = DN(no2);
  int32_t *gds2 = NULL;
  if (docs) {
    int32_t *c2 = doc_starts(B2, T);
    memcpy(c2, cds, (size_t)B * T * sizeof(int32_t)); /* the first B samples as above */
    gds2 = D(c2, (size_t)B2 * T * sizeof(int32_t));
  }
  mt_device_memcpy_dtod(&gpu, gqkv2, gqkv, nq * 2);
  mt_device_memcpy_dtod(&gpu, gdout2, gdout, no * sizeof(float));
  const char *pass[2] = {"attention_fwd", "attention_bwd"};
#ifdef MT_CUDA_EMU
  const char *kern[2][2] = {{"flash_fwd", "k_att16_softmax"},
                            {"flash_bwd_kv", "k_att16_softmax_bwd"}};
#endif
  for (int call = 0; call < 2; call++)
    for (int bwd = 0; bwd < 2; bwd++) {
      int before = mt__cuda_attention_path_of(&gpu, bwd, HS, fp16, B2, T, NH, with_dropout, docs);
#ifdef MT_CUDA_EMU
      long f0 = mt_emu_launch_count(kern[bwd][0]), g0 = mt_emu_launch_count(kern[bwd][1]);
#endif
      if (bwd)
        gpu.ops->attention_bwd(&gpu, gdh2, qt, gs, gdout2, go2, gqkv2, qt, gl2, B2, T, C, NH, dp,
                               gds2);
      else
        gpu.ops->attention_fwd(&gpu, go2, gl2, gs, gqkv2, qt, B2, T, C, NH, dp, gds2);
      int after = mt__cuda_attention_path_of(&gpu, bwd, HS, fp16, B2, T, NH, with_dropout, docs);
      const char *how = call ? "auto, kept" : "auto, timed";
      check_that(pass[bwd], label("%s path, %s", tag, how),
                 wide   ? before == MT__CUDA_ATT_CHUNKED && after == before
                 : call ? before == after && before != MT__CUDA_ATT_AUTO
                        : before == MT__CUDA_ATT_AUTO && after != MT__CUDA_ATT_AUTO,
                 label("%d then %d", before, after));
      if (bwd)
        check("attention_bwd", label("%s dqkv in 16 bits, %s", tag, how), back_half(gdh2, nq, qt),
              as_floats(cdh, nq, qt), nq, 1e-2);
      else {
        check("attention_fwd", label("%s out, %s", tag, how), back_half(go2, no, qt),
              as_floats(oh, no, qt), no, 1e-2);
        check("attention_fwd", label("%s lse, %s", tag, how), back(gl2, nl), cl, nl, 1e-2);
      }
#ifdef MT_CUDA_EMU
      /* the chunks' row kernel launches once a chunk */
      long f = mt_emu_launch_count(kern[bwd][0]) - f0, g = mt_emu_launch_count(kern[bwd][1]) - g0;
      int flash = after == MT__CUDA_ATT_FLASH;
      int ok = wide ? !f && g > 0 : call ? (flash ? f >= 1 && !g : !f && g > 0) : f >= 3 && g > 0;
      check_that(pass[bwd], label("%s launches, %s", tag, how), ok,
                 label("flash %ld, row kernel %ld", f, g));
#endif
    }
  /* an fp32 dqkv (added into) in auto: flash, untimed (a head size the
   * flash kernels take) */
  float *gdq2 = DN(nq2), *want = halloc(nq * sizeof(float));
  mt_device_memset0(&gpu, gdq2, nq2 * sizeof(float));
#ifdef MT_CUDA_EMU
  long g0 = mt_emu_launch_count("k_att16_softmax_bwd"), f0 = mt_emu_launch_count("flash_bwd_kv");
#endif
  gpu.ops->attention_bwd(&gpu, gdq2, MT_F32, gs, gdout2, go2, gqkv2, qt, gl2, B2, T, C, NH, dp,
                         gds2);
  for (size_t i = 0; i < nq; i++) want[i] = cdq[i] - cdq0[i]; /* the CPU's gradient alone */
  check("attention_bwd", label("%s fp32 dqkv from 0, auto", tag), back(gdq2, nq), want, nq, 1e-2);
#ifdef MT_CUDA_EMU
  long g = mt_emu_launch_count("k_att16_softmax_bwd") - g0;
  long f = mt_emu_launch_count("flash_bwd_kv") - f0;
  check_that("attention_bwd",
             label("%s fp32 dqkv in auto: %s, untimed", tag, wide ? "the GEMMs" : "flash"),
             wide ? !f && g > 0 : f >= 1 && !g, label("flash %ld, row kernel %ld", f, g));
#endif
  mt__cuda_attention_path(&gpu, MT__CUDA_ATT_FLASH);
  arena_reset();
}

/* An upload returns with the host buffer free (mt__cuda_memcpy queues
 * copies from the host, which from pageable memory the driver stages
 * before it returns): the buffer overwritten at once, while the copy
 * still waits behind queued GEMMs, and the device holds the old values. */
static void test_upload_queued(void) {
#ifdef MT_CUDA_EMU
  const int S = 64, reps = 1; /* the emulator runs each op as it is issued */
#else
  const int S = 2048, reps = 8; /* milliseconds of queued work on a GPU */
#endif
  size_t n = (size_t)S * S, big = (size_t)4 << 20;
  float *x = Df(H(n, -1, 1), n), *w = Df(H(n, -1, 1), n), *y = DN(n);
  float *h = H(big, -1, 1), *want = hcopy(h, big), *d = DN(big);
  if (mt_device_sync(&gpu)) die("device sync");
  for (int i = 0; i < reps; i++)
    gpu.ops->linear_fwd(&gpu, y, MT_F32, x, MT_F32, w, MT_F32, NULL, NULL, S, S, S);
  int rc = mt_device_memcpy_htod(&gpu, d, h, big * sizeof(float));
  for (size_t i = 0; i < big; i++) h[i] = 7.0f;
  check_that("memcpy_htod", "behind queued work", !rc, rc ? mt_errmsg() : "queued");
  check("memcpy_htod", "host buffer written after the call", back(d, big), want, big, 0.0);
  arena_reset();
}

static void test_elementwise(size_t n) {
  float *x = H(n, -4, 4), *y = H(n, -1, 1), *gx = Df(x, n), *gy = Df(y, n);
  float *c = halloc(n * sizeof(float)), *g = DN(n);
  cpu.ops->gelu_fwd(&cpu, c, MT_F32, x, MT_F32, n);
  gpu.ops->gelu_fwd(&gpu, g, MT_F32, gx, MT_F32, n);
  float *g32 = back(g, n);
  check("gelu_fwd", label("n=%zu", n), g32, c, n, 1e-5);
  for (int fp16 = 0; fp16 < 2; fp16++) {
    mt_dtype ot = fp16 ? MT_F16 : MT_BF16;
    uint16_t *ch = halloc(n * sizeof(uint16_t));
    void *gh = DP(n * sizeof(uint16_t));
    cpu.ops->gelu_fwd(&cpu, ch, ot, x, MT_F32, n);
    gpu.ops->gelu_fwd(&gpu, gh, ot, gx, MT_F32, n);
    check_typed("gelu_fwd", "out", gh, ch, g32, c, n, ot);
    /* a 16-bit input (a 16-bit job's fch), both ways */
    const void *hx;
    float *xr = round_to(hcopy(x, n), n, ot), *c2 = halloc(n * sizeof(float));
    void *gxh = stored(xr, n, ot, &hx);
    float *g2 = DN(n);
    cpu.ops->gelu_fwd(&cpu, c2, MT_F32, hx, ot, n);
    gpu.ops->gelu_fwd(&gpu, g2, MT_F32, gxh, ot, n);
    check("gelu_fwd", label("%s in", fp16 ? "fp16" : "bf16"), back(g2, n), c2, n, 1e-5);
    float *cd = H(n, -1, 1), *gd = Df(cd, n);
    cpu.ops->gelu_bwd(&cpu, cd, hx, ot, y, n);
    gpu.ops->gelu_bwd(&gpu, gd, gxh, ot, gy, n);
    check("gelu_bwd", label("%s in: dinp (+=)", fp16 ? "fp16" : "bf16"), back(gd, n), cd, n, 1e-5);
  }
  float *cd = H(n, -1, 1), *gd = Df(cd, n);
  cpu.ops->gelu_bwd(&cpu, cd, x, MT_F32, y, n);
  gpu.ops->gelu_bwd(&gpu, gd, gx, MT_F32, gy, n);
  check("gelu_bwd", "dinp (+=)", back(gd, n), cd, n, 1e-5);

  g = DN(n);
  cpu.ops->residual_fwd(&cpu, c, x, y, n);
  gpu.ops->residual_fwd(&gpu, g, gx, gy, n);
  check("residual_fwd", label("n=%zu", n), back(g, n), c, n, 0.0);
  float *ca = hcopy(x, n), *ga = Df(x, n); /* out aliasing a */
  cpu.ops->residual_fwd(&cpu, ca, ca, y, n);
  gpu.ops->residual_fwd(&gpu, ga, ga, gy, n);
  check("residual_fwd", "out aliases a", back(ga, n), ca, n, 0.0);

  ca = hcopy(x, n), ga = Df(x, n);
  cpu.ops->add_inplace(&cpu, ca, y, n);
  gpu.ops->add_inplace(&gpu, ga, gy, n);
  check("add_inplace", label("n=%zu", n), back(ga, n), ca, n, 0.0);

  ca = hcopy(x, n), ga = Df(x, n);
  cpu.ops->scale(&cpu, ca, 0.37f, n);
  gpu.ops->scale(&gpu, ga, 0.37f, n);
  check("scale", label("n=%zu", n), back(ga, n), ca, n, 0.0);

  double cs = cpu.ops->sumsq(&cpu, x, n), gsq = gpu.ops->sumsq(&gpu, gx, n);
  float fc = (float)cs, fg = (float)gsq;
  check("sumsq", label("n=%zu (in double)", n), &fg, &fc, 1, 1e-7);

  /* mixed precision: the rounded working copy, bit for bit; in place too */
  float *w = H(n, -70000, 70000), *gw = Df(w, n);
  for (int fp16 = 0; fp16 < 2; fp16++) {
    g = DN(n);
    cpu.ops->round_half(&cpu, c, w, n, fp16);
    gpu.ops->round_half(&gpu, g, gw, n, fp16);
    check("round_half", label("%s n=%zu", fp16 ? "fp16" : "bf16", n), back(g, n), c, n, 0.0);
  }
  ga = Df(w, n);
  cpu.ops->round_half(&cpu, c, w, n, 0);
  gpu.ops->round_half(&gpu, ga, ga, n, 0);
  check("round_half", "bf16 in place", back(ga, n), c, n, 0.0);

  /* the 16-bit storage of kept activations: the bits, the rounded source
   * left behind, and what unpacking the bits gives, all bit for bit */
  for (int fp16 = 0; fp16 < 2; fp16++) {
    const char *h16 = fp16 ? "fp16" : "bf16";
    float *cs = hcopy(w, n), *gs = Df(w, n);
    uint16_t *ch = halloc(n * sizeof(uint16_t)), *gh = dalloc(n * sizeof(uint16_t));
    cpu.ops->pack_half(&cpu, ch, cs, n, fp16);
    gpu.ops->pack_half(&gpu, gh, gs, n, fp16);
    check("pack_half", label("%s source n=%zu", h16, n), back(gs, n), cs, n, 0.0);
    float *cb = halloc(n * sizeof(float)), *gb = halloc(n * sizeof(float));
    if (mt_device_sync(&gpu) || mt_device_memcpy_dtoh(&gpu, gb, gh, n * sizeof(uint16_t)))
      die("copy from the device");
    uint16_t *gbits = (uint16_t *)gb;
    for (size_t i = n; i-- > 0;) gb[i] = (float)gbits[i]; /* the bits as exact floats */
    for (size_t i = 0; i < n; i++) cb[i] = (float)ch[i];
    check("pack_half", label("%s bits", h16), gb, cb, n, 0.0);
    float *cu = halloc(n * sizeof(float)), *gu = DN(n);
    cpu.ops->unpack_half(&cpu, cu, ch, n, fp16);
    gpu.ops->unpack_half(&gpu, gu, gh, n, fp16);
    check("unpack_half", label("%s n=%zu", h16, n), back(gu, n), cu, n, 0.0);
  }

  /* the fp16 overflow test: in range, then one bad value at either end */
  static const float bad[] = {65520.0f, -1e10f, INFINITY, NAN};
  for (size_t k = 0; k < sizeof bad / sizeof *bad; k++) {
    for (int at_end = 0; at_end < 2; at_end++) {
      float *v = H(n, -65504, 65504);
      int want_before = cpu.ops->fits_fp16(&cpu, v, n);
      v[at_end ? n - 1 : 0] = bad[k];
      float *gv = Df(v, n);
      int want = cpu.ops->fits_fp16(&cpu, v, n), got = gpu.ops->fits_fp16(&gpu, gv, n);
      int got_before = gpu.ops->fits_fp16(&gpu, Df(v + 1, n - 2), n - 2);
      float fw = (float)(want * 2 + want_before), fgot = (float)(got * 2 + got_before);
      check("fits_fp16", label("%g at %s, n=%zu", (double)bad[k], at_end ? "end" : "start", n),
            &fgot, &fw, 1, 0.0);
    }
  }
  arena_reset();
}

static void test_dropout(int B, size_t per) {
  size_t n = (size_t)B * per;
  mt_dropout drop = {0.3f, 0xfeedface12345678ull, 1000, 0, 0};
  float *x = H(n, -1, 1), *gx = Df(x, n);
  float *c = halloc(n * sizeof(float)), *g = DN(n);
  cpu.ops->dropout_fwd(&cpu, c, x, B, per, &drop);
  gpu.ops->dropout_fwd(&gpu, g, gx, B, per, &drop);
  float *gb = back(g, n);
  check("dropout_fwd", label("B=%d per_sample=%zu", B, per), gb, c, n, 1e-6);
  check_mask("dropout_fwd", "mask", gb, c, n);
  /* a piece of each sample at offset e0 (sequence parallelism's rows) */
  static const size_t offsets[] = {1, 3, 4, 6};
  for (int k = 0; k < 4 && per > offsets[k] + 2; k++) {
    size_t e0 = offsets[k];
    mt_dropout piece = drop;
    piece.elem0 = e0;
    size_t len = per - e0 - 1;
    float *cp = halloc(len * sizeof(float)), *gp = DN(len), *gpx = Df(x + e0, len);
    cpu.ops->dropout_fwd(&cpu, cp, x + e0, 1, len, &piece);
    gpu.ops->dropout_fwd(&gpu, gp, gpx, 1, len, &piece);
    check("dropout_fwd", label("a piece at element %zu", e0), back(gp, len), cp, len, 1e-6);
    check("dropout_fwd", label("a piece at %zu: the whole sample's masks", e0), cp, c + e0, len,
          0.0);
  }
  float *ci = hcopy(x, n), *gi = Df(x, n); /* in place */
  cpu.ops->dropout_fwd(&cpu, ci, ci, B, per, &drop);
  gpu.ops->dropout_fwd(&gpu, gi, gi, B, per, &drop);
  check("dropout_fwd", "in place", back(gi, n), ci, n, 1e-6);
  float *cd = H(n, -1, 1), *gd = Df(cd, n);
  cpu.ops->dropout_bwd(&cpu, cd, x, B, per, &drop);
  gpu.ops->dropout_bwd(&gpu, gd, gx, B, per, &drop);
  check("dropout_bwd", "dinp (+=)", back(gd, n), cd, n, 1e-6);
  g = DN(n);
  cpu.ops->dropout_fwd(&cpu, c, x, B, per, NULL);
  gpu.ops->dropout_fwd(&gpu, g, gx, B, per, NULL);
  check("dropout_fwd", "p = 0 (a copy)", back(g, n), c, n, 0.0);

  /* fused dropout + residual: against the CPU's, and against dropout_fwd
   * then residual_fwd on the GPU itself; out aliasing resid; no dropout */
  float *r = H(n, -2, 2), *gr = Df(r, n);
  g = DN(n);
  cpu.ops->dropout_residual_fwd(&cpu, c, NULL, MT_F32, r, x, B, per, &drop);
  gpu.ops->dropout_residual_fwd(&gpu, g, NULL, MT_F32, gr, gx, B, per, &drop);
  float *fused = back(g, n);
  check("dropout_residual_fwd", label("B=%d per_sample=%zu", B, per), fused, c, n, 1e-6);
  float *gt = DN(n), *gs = DN(n);
  gpu.ops->dropout_fwd(&gpu, gt, gx, B, per, &drop);
  gpu.ops->residual_fwd(&gpu, gs, gr, gt, n);
  check("dropout_residual_fwd", "= dropout_fwd, residual_fwd", fused, back(gs, n), n, 1e-6);
  check("dropout_residual_fwd", "branch left as it was", back(gx, n), x, n, 0.0);
  float *galias = Df(r, n);
  gpu.ops->dropout_residual_fwd(&gpu, galias, NULL, MT_F32, galias, gx, B, per, &drop);
  check("dropout_residual_fwd", "out aliases resid", back(galias, n), c, n, 1e-6);
  g = DN(n);
  cpu.ops->dropout_residual_fwd(&cpu, c, NULL, MT_F32, r, x, B, per, NULL);
  gpu.ops->dropout_residual_fwd(&gpu, g, NULL, MT_F32, gr, gx, B, per, NULL);
  check("dropout_residual_fwd", "no dropout (a residual add)", back(g, n), c, n, 0.0);

  /* a 16-bit job's stream, rounded in the same pass: the bits are those of
   * the GPU's own fp32 sum and the CPU's (check_typed); out holds their
   * values; in place on resid without the bits, the same values */
  for (int t = MT_BF16; t <= MT_F16; t++) {
    for (int dropped = 0; dropped < 2; dropped++) {
      mt_dtype ht = (mt_dtype)t;
      const mt_dropout *dp = dropped ? &drop : NULL;
      const char *what =
          label("%s %s", dropped ? "dropout" : "no dropout", ht == MT_F16 ? "fp16" : "bf16");
      float *c32 = halloc(n * sizeof(float)), *cr = halloc(n * sizeof(float));
      uint16_t *ch = halloc(n * sizeof(uint16_t));
      cpu.ops->dropout_residual_fwd(&cpu, c32, NULL, MT_F32, r, x, B, per, dp);
      cpu.ops->dropout_residual_fwd(&cpu, cr, ch, ht, r, x, B, per, dp);
      float *g32 = DN(n), *gv = DN(n), *ga = Df(r, n);
      void *gh = DP(n * sizeof(uint16_t));
      gpu.ops->dropout_residual_fwd(&gpu, g32, NULL, MT_F32, gr, gx, B, per, dp);
      gpu.ops->dropout_residual_fwd(&gpu, gv, gh, ht, gr, gx, B, per, dp);
      gpu.ops->dropout_residual_fwd(&gpu, ga, NULL, ht, ga, gx, B, per, dp);
      float *values = back(gv, n);
      check_typed("dropout_residual_fwd", dropped ? "dropout" : "no dropout", gh, ch, back(g32, n),
                  c32, n, ht);
      check("dropout_residual_fwd", label("%s: out holds the bits' values", what), values,
            back_half(gh, n, ht), n, 0.0);
      check("dropout_residual_fwd", label("%s: in place without the bits", what), back(ga, n),
            values, n, 0.0);
    }
  }
  arena_reset();
}

/* With ignore, rows 0, N/2 and N-1 have ignored targets (Megatron's loss
 * mask): both backends give them loss 0 and a gradient row of 0. */
static void test_crossentropy(int N, int V, int Vp, int ignore) {
  size_t n = (size_t)N * Vp;
  float *x = H(n, -4, 4), *gx = Df(x, n);
  int32_t *t = tokens((size_t)N, V);
  if (ignore) t[0] = t[N - 1] = MT_TARGET_IGNORE, t[N / 2] = -5;
  int32_t *gt = D(t, (size_t)N * sizeof(int32_t));
  float dloss = 1.0f / (float)N;
  float *cl = halloc(N * sizeof(float)), *cd = halloc(n * sizeof(float));
  float *gl = DN((size_t)N), *gd = DN(n);
  cpu.ops->crossentropy(&cpu, cl, cd, x, t, dloss, N, V, Vp);
  gpu.ops->crossentropy(&gpu, gl, gd, gx, gt, dloss, N, V, Vp);
  check("crossentropy", label("N=%d V=%d Vp=%d losses", N, V, Vp), back(gl, (size_t)N), cl,
        (size_t)N, 1e-5);
  check("crossentropy", "dlogits", back(gd, n), cd, n, 1e-5);
  if (ignore) {
    float *bl = back(gl, (size_t)N), *bd = back(gd, n), *zero = halloc((size_t)Vp * sizeof(float));
    int rows[3] = {0, N / 2, N - 1};
    for (int i = 0; i < 3; i++) {
      check("crossentropy", label("ignored row %d: loss", rows[i]), bl + rows[i], zero, 1, 0.0);
      check("crossentropy", label("ignored row %d: dlogits", rows[i]), bd + (size_t)rows[i] * Vp,
            zero, (size_t)Vp, 0.0);
    }
  }
  float *ca = hcopy(x, n), *ga = Df(x, n); /* dlogits aliasing logits, no losses */
  cpu.ops->crossentropy(&cpu, NULL, ca, ca, t, dloss, N, V, Vp);
  gpu.ops->crossentropy(&gpu, NULL, ga, ga, gt, dloss, N, V, Vp);
  check("crossentropy", "dlogits aliasing logits", back(ga, n), ca, n, 1e-5);
  gl = DN((size_t)N);
  cpu.ops->crossentropy(&cpu, cl, NULL, x, t, 0.0f, N, V, Vp);
  gpu.ops->crossentropy(&gpu, gl, NULL, gx, gt, 0.0f, N, V, Vp);
  check("crossentropy", "losses alone", back(gl, (size_t)N), cl, (size_t)N, 1e-5);

  /* the vocabulary-parallel pieces on a shard [v0, v0 + Vl) with `real` real columns */
  int v0 = Vp / 2, Vl = Vp - v0, real = V - v0 < Vl ? V - v0 : Vl;
  float *sx = hcopy(x, (size_t)N * Vl), *gsx = Df(sx, (size_t)N * Vl);
  float *cmax = halloc(N * sizeof(float)), *gmax = DN((size_t)N);
  cpu.ops->crossentropy_shard_max(&cpu, cmax, sx, N, real, Vl);
  gpu.ops->crossentropy_shard_max(&gpu, gmax, gsx, N, real, Vl);
  check("crossentropy_shard_max", label("v0=%d Vl=%d real=%d", v0, Vl, real), back(gmax, (size_t)N),
        cmax, (size_t)N, 0.0);
  float *csum = halloc(2 * N * sizeof(float)), *gsum = DN(2 * (size_t)N);
  float *dmax = Df(cmax, (size_t)N);
  cpu.ops->crossentropy_shard_sum(&cpu, csum, csum + N, sx, t, cmax, N, real, Vl, v0);
  gpu.ops->crossentropy_shard_sum(&gpu, gsum, gsum + N, gsx, gt, dmax, N, real, Vl, v0);
  float *gsb = back(gsum, 2 * (size_t)N);
  check("crossentropy_shard_sum", "rowsum", gsb, csum, (size_t)N, 1e-5);
  check("crossentropy_shard_sum", "target logit", gsb + N, csum + N, (size_t)N, 0.0);
  float *cg = halloc((size_t)N * Vl * sizeof(float)), *gg = DN((size_t)N * Vl);
  cpu.ops->crossentropy_shard_grad(&cpu, cg, sx, t, cmax, csum, dloss, N, real, Vl, v0);
  gpu.ops->crossentropy_shard_grad(&gpu, gg, gsx, gt, dmax, Df(csum, (size_t)N), dloss, N, real, Vl,
                                   v0);
  float *ggb = back(gg, (size_t)N * Vl);
  check("crossentropy_shard_grad", "dlogits", ggb, cg, (size_t)N * Vl, 1e-5);
  if (ignore) {
    float *zero = halloc((size_t)Vl * sizeof(float));
    int rows[3] = {0, N / 2, N - 1};
    for (int i = 0; i < 3; i++) {
      check("crossentropy_shard_sum", label("ignored row %d: target logit", rows[i]),
            gsb + N + rows[i], zero, 1, 0.0);
      check("crossentropy_shard_grad", label("ignored row %d: dlogits", rows[i]),
            ggb + (size_t)rows[i] * Vl, zero, (size_t)Vl, 0.0);
    }
  }
  arena_reset();
}

static void test_adamw(size_t n) {
  float *p = H(n, -1, 1), *g = H(n, -0.1f, 0.1f), *m = H(n, -0.01f, 0.01f), *v = H(n, 0, 1e-4f);
  float *gp = Df(p, n), *gm = Df(m, n), *gv = Df(v, n);
  cpu.ops->adamw(&cpu, p, g, m, v, n, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 0.5f, 7);
  gpu.ops->adamw(&gpu, gp, Df(g, n), gm, gv, n, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 0.5f, 7);
  check("adamw", label("n=%zu param", n), back(gp, n), p, n, 1e-6);
  check("adamw", "m", back(gm, n), m, n, 1e-6);
  check("adamw", "v", back(gv, n), v, n, 1e-6);

  /* several slices, one empty and one across many chunks, in one call */
  enum { K = 5 };
  size_t sizes[K] = {n, 0, 3, n / 3 + 1, 2 * n + 5};
  mt_adamw_slice cs[K], gs[K];
  for (int i = 0; i < K; i++) {
    size_t k = sizes[i];
    cs[i] = (mt_adamw_slice){H(k, -1, 1), H(k, -0.1f, 0.1f),  H(k, -0.01f, 0.01f), H(k, 0, 1e-4f),
                             k,           i % 2 ? 0.0f : 0.1f};
    gs[i] = (mt_adamw_slice){
        Df(cs[i].param, k), Df(cs[i].grad, k), Df(cs[i].m, k), Df(cs[i].v, k), k, cs[i].wd};
  }
  cpu.ops->adamw_multi(&cpu, cs, K, 1e-3f, 0.9f, 0.95f, 1e-8f, 2.0f, 3);
  gpu.ops->adamw_multi(&gpu, gs, K, 1e-3f, 0.9f, 0.95f, 1e-8f, 2.0f, 3);
  for (int i = 0; i < K; i++) {
    size_t k = sizes[i];
    check("adamw_multi", label("slice %d n=%zu param", i, k), back(gs[i].param, k), cs[i].param, k,
          1e-6);
    check("adamw_multi", label("slice %d m, v", i), back(gs[i].v, k), cs[i].v, k, 1e-6);
  }
  arena_reset();
}

/* kernels/cuda's partials of one sumsq_multi launch (cuda_impl.h); the
 * emulator's test shrinks them (tests/gpu/meson.build). A span has one
 * block per 4096 elements, up to a sixteenth of them (ops_cuda.cu). */
#ifndef MT_CUDA_RED_PARTS
#define MT_CUDA_RED_PARTS 16384
#endif

/* sumsq_multi over spans of odd lengths, empty ones among them (one NULL),
 * more than one launch's count of spans, then spans past a span's cap of
 * blocks, more than one launch's partials of them, against a sequential
 * sum in long double. Between the spans lie guards of 1e6, which a read
 * past a span's end would add. Twice, the same bits; on the emulator, the
 * launches it took (a few, not one a span), and a failed one read as NaN. */
static void test_sumsq_multi(void) {
  enum { SMALL = 200, BIG = 17, K = SMALL + BIG, GUARD = 3 };
  size_t big = (size_t)MT_CUDA_RED_PARTS * 256 + 4099, *len = halloc(K * sizeof(size_t));
  size_t total = 0;
  for (int k = 0; k < K; k++) {
    len[k] = k >= SMALL ? big + (size_t)k : k % 7 == 3 ? 0 : 1 + rng_u64() % 300;
    total += len[k] + GUARD;
  }
  float *x = H(total, -3, 3);
  mt_sumsq_span *gs = halloc(K * sizeof *gs);
  long double ref = 0.0L;
  size_t off = 0;
  for (int k = 0; k < K; k++) {
    for (size_t i = 0; i < len[k]; i++) ref += (long double)x[off + i] * x[off + i];
    for (int i = 0; i < GUARD; i++) x[off + len[k] + i] = 1e6f;
    off += len[k] + GUARD;
  }
  float *gx = Df(x, total);
  off = 0;
  for (int k = 0; k < K; k++) {
    gs[k] = (mt_sumsq_span){k == 10 ? NULL : gx + off, len[k]}; /* 10 % 7 == 3: empty */
    off += len[k] + GUARD;
  }
#ifdef MT_CUDA_EMU
  long parts0 = mt_emu_launch_count("k_sumsq_multi_part");
  long totals0 = mt_emu_launch_count("k_sumsq_multi_total");
#endif
  double got = gpu.ops->sumsq_multi(&gpu, gs, K), again = gpu.ops->sumsq_multi(&gpu, gs, K);
  double rel = fabs(got - (double)ref) / (double)ref;
  char detail[160];
  snprintf(detail, sizeof detail, "%d spans, %zu floats: rel %.2e to long double", K, total, rel);
  check_that("sumsq_multi", "against a sequential sum", rel <= 1e-12, detail);
  check_that("sumsq_multi", "twice: the same bits", !memcmp(&got, &again, sizeof got), "");
  double none = gpu.ops->sumsq_multi(&gpu, gs, 0), empty = gpu.ops->sumsq_multi(&gpu, gs + 10, 1);
  snprintf(detail, sizeof detail, "%g and %g", none, empty);
  check_that("sumsq_multi", "no spans, one empty span: 0", none == 0.0 && empty == 0.0, detail);
#ifdef MT_CUDA_EMU
  long parts = (mt_emu_launch_count("k_sumsq_multi_part") - parts0) / 2;
  long totals = (mt_emu_launch_count("k_sumsq_multi_total") - totals0) / 2;
  snprintf(detail, sizeof detail, "%ld partial launches, %ld totals a call", parts, totals);
  check_that("sumsq_multi", "a launch per pack of spans",
             parts >= 3 && parts <= 1 + K / 32 && totals == parts, detail);
  /* a partial launch, then a total, that fail: NaN, and the sync says so */
  const char *kernels[] = {"k_sumsq_multi_part", "k_sumsq_multi_total"};
  for (int f = 0; f < 2; f++) {
    mt_emu_fail_launch(kernels[f], 2);
    double v = gpu.ops->sumsq_multi(&gpu, gs, K);
    int rc = mt_device_sync(&gpu);
    mt_emu_fail_launch(kernels[f], 0);
    snprintf(detail, sizeof detail, "%g, sync %d", v, rc);
    check_that("sumsq_multi", label("failed %s: NaN", kernels[f] + 2), isnan(v) && rc, detail);
  }
#endif
  arena_reset();
}

/* count_zeros against the CPU's and a count here: spans of odd lengths,
 * empty ones among them (one NULL), more than one launch's count of spans
 * and spans past a span's cap of blocks, holding +0, -0 (zeros), the
 * smallest subnormal and NaN (not zeros) among random values, with guards
 * of zeros between the spans that a read past a span's end would count.
 * Twice, the same count; a failed launch on the emulator reads as -1. */
static void test_count_zeros(void) {
  enum { SMALL = 200, BIG = 5, K = SMALL + BIG, GUARD = 3 };
  size_t big = (size_t)MT_CUDA_RED_PARTS * 256 + 4099, *len = halloc(K * sizeof(size_t));
  size_t total = 0;
  for (int k = 0; k < K; k++) {
    len[k] = k >= SMALL ? big + (size_t)k : k % 7 == 3 ? 0 : 1 + rng_u64() % 300;
    total += len[k] + GUARD;
  }
  float *x = H(total, -3, 3);
  mt_sumsq_span *cs = halloc(K * sizeof *cs), *gs = halloc(K * sizeof *gs);
  int64_t want = 0;
  size_t off = 0;
  for (int k = 0; k < K; k++) {
    for (size_t i = 0; i < len[k]; i++) {
      uint64_t r = rng_u64() % 16;
      x[off + i] = r == 0 ? 0.0f : r == 1 ? -0.0f : r == 2 ? 1e-45f : r == 3 ? NAN : x[off + i];
      want += x[off + i] == 0.0f;
    }
    for (int i = 0; i < GUARD; i++) x[off + len[k] + i] = 0.0f;
    cs[k] = (mt_sumsq_span){k == 10 ? NULL : x + off, len[k]}; /* 10 % 7 == 3: empty */
    off += len[k] + GUARD;
  }
  float *gx = Df(x, total);
  off = 0;
  for (int k = 0; k < K; k++) {
    gs[k] = (mt_sumsq_span){k == 10 ? NULL : gx + off, len[k]};
    off += len[k] + GUARD;
  }
  int64_t c = cpu.ops->count_zeros(&cpu, cs, K), g = gpu.ops->count_zeros(&gpu, gs, K),
          again = gpu.ops->count_zeros(&gpu, gs, K);
  char detail[160];
  snprintf(detail, sizeof detail, "%d spans, %zu floats: cuda %lld, cpu %lld, here %lld", K, total,
           (long long)g, (long long)c, (long long)want);
  check_that("count_zeros", "the cpu's and a count here", g == want && c == want && want > 0,
             detail);
  check_that("count_zeros", "twice: the same count", g == again, "");
  int64_t none = gpu.ops->count_zeros(&gpu, gs, 0), empty = gpu.ops->count_zeros(&gpu, gs + 10, 1);
  snprintf(detail, sizeof detail, "%lld and %lld", (long long)none, (long long)empty);
  check_that("count_zeros", "no spans, one empty span: 0", none == 0 && empty == 0, detail);
#ifdef MT_CUDA_EMU
  mt_emu_fail_launch("k_sumsq_multi_part", 1);
  int64_t v = gpu.ops->count_zeros(&gpu, gs, K);
  int rc = mt_device_sync(&gpu);
  mt_emu_fail_launch("k_sumsq_multi_part", 0);
  snprintf(detail, sizeof detail, "%lld, sync %d", (long long)v, rc);
  check_that("count_zeros", "a failed launch: -1", v == -1 && rc, detail);
#endif
  arena_reset();
}

/* An environment variable's value, kept (NULL: unset), and put back */
static char *env_saved(const char *name) {
  const char *v = getenv(name);
  return v ? strdup(v) : NULL;
}
static void env_put_back(const char *name, char *saved) {
  if (saved)
    setenv(name, saved, 1);
  else
    unsetenv(name);
  free(saved);
}

/* MTNLG_FLASH_FWD_ROWS at open: 16 or 32 sets the flash forward's query
 * rows a warp for every shape, auto (as unset) times each shape's first
 * call; anything else refuses the device, naming the variable. So does
 * mt__cuda_flash_fwd_rows with any other count. The environment is put
 * back as it was. */
static void test_flash_rows_switch(void) {
  char *saved = env_saved("MTNLG_FLASH_FWD_ROWS");
  static const char *vals[] = {"33", "16", "32", "auto"};
  static const int rows[] = {0, 16, 32, 0};
  for (int k = 0; k < 4; k++) {
    mt_device d;
    setenv("MTNLG_FLASH_FWD_ROWS", vals[k], 1);
    int rc = mt_device_open(&d, "cuda:0");
    const char *what = label("MTNLG_FLASH_FWD_ROWS=%s", vals[k]);
    if (!k) {
      check_that("device_open", label("%s: refused", what),
                 rc && strstr(mt_errmsg(), "MTNLG_FLASH_FWD_ROWS=\"33\""),
                 rc ? mt_errmsg() : "opened");
      continue;
    }
    int got = rc ? -1 : mt__cuda_flash_fwd_rows_of(&d, 64, 0, 2, 70, 2, 0, 0);
    check_that("device_open", label("%s: %d rows a warp", what, rows[k]), !rc && got == rows[k],
               rc ? mt_errmsg() : label("%d", got));
    if (rc) continue;
    if (k == 3) { /* head size 256 has 16 rows a warp alone */
      got = mt__cuda_flash_fwd_rows_of(&d, 200, 0, 2, 70, 2, 0, 0);
      check_that("device_open", label("%s: head size 200, 16 rows", what), got == 16,
                 label("%d", got));
      int bad = mt__cuda_flash_fwd_rows(&d, 24);
      check_that("flash_fwd_rows", "24 rows a warp: refused",
                 bad == MT_EINVAL && strstr(mt_errmsg(), "24"), bad ? mt_errmsg() : "taken");
    }
    mt_device_close(&d);
  }
  env_put_back("MTNLG_FLASH_FWD_ROWS", saved);
}

/* MTNLG_ATTENTION at open: flash (as unset), chunked or auto sets how a
 * 16-bit qkv's attention runs; anything else refuses the device, naming
 * the variable, as mt__cuda_attention_path refuses any other value. A
 * head size over MT_FLASH_MAX_HS takes the chunked GEMMs whatever is set.
 * The environment is put back as it was. */
static void test_attention_path_switch(void) {
  char *saved = env_saved("MTNLG_ATTENTION");
  static const char *vals[] = {"fast", NULL, "flash", "chunked", "auto"};
  static const int want[] = {-1, MT__CUDA_ATT_FLASH, MT__CUDA_ATT_FLASH, MT__CUDA_ATT_CHUNKED,
                             MT__CUDA_ATT_AUTO};
  for (int k = 0; k < 5; k++) {
    mt_device d;
    if (vals[k])
      setenv("MTNLG_ATTENTION", vals[k], 1);
    else
      unsetenv("MTNLG_ATTENTION");
    int rc = mt_device_open(&d, "cuda:0");
    const char *what = label("MTNLG_ATTENTION=%s", vals[k] ? vals[k] : "(unset)");
    if (!k) {
      check_that("device_open", label("%s: refused", what),
                 rc && strstr(mt_errmsg(), "MTNLG_ATTENTION=\"fast\""),
                 rc ? mt_errmsg() : "opened");
      continue;
    }
    int got = rc ? -1 : mt__cuda_attention_path_mode(&d);
    int fwd = rc ? -1 : mt__cuda_attention_path_of(&d, 0, 64, 0, 2, 70, 2, 0, 0);
    check_that("device_open", label("%s: path %d", what, want[k]),
               !rc && got == want[k] && fwd == want[k], rc ? mt_errmsg() : label("%d", got));
    if (rc) continue;
    int wide = mt__cuda_attention_path_of(&d, 1, 300, 0, 2, 70, 2, 0, 0);
    check_that("attention_path", label("%s: head size 300 chunked", what),
               wide == MT__CUDA_ATT_CHUNKED, label("%d", wide));
    if (k == 4) {
      int bad = mt__cuda_attention_path(&d, 7);
      check_that("attention_path", "path 7: refused", bad == MT_EINVAL && strstr(mt_errmsg(), "7"),
                 bad ? mt_errmsg() : "taken");
    }
    mt_device_close(&d);
  }
  env_put_back("MTNLG_ATTENTION", saved);

  /* MTNLG_ATTENTION_CHUNK: the chunked path's chunks at most ROWSxHEADS;
   * anything else refuses the device, naming the variable */
  saved = env_saved("MTNLG_ATTENTION_CHUNK");
  static const char *chunks[] = {"256", "0x4", "2x3x", "8x-1", "2x1", NULL};
  for (int k = 0; k < 6; k++) {
    mt_device d;
    if (chunks[k])
      setenv("MTNLG_ATTENTION_CHUNK", chunks[k], 1);
    else
      unsetenv("MTNLG_ATTENTION_CHUNK");
    int rc = mt_device_open(&d, "cuda:0"), rows = 0, heads = 0, rows0, heads0;
    const char *what = label("MTNLG_ATTENTION_CHUNK=%s", chunks[k] ? chunks[k] : "(unset)");
    if (k < 4) {
      check_that("device_open", label("%s: refused", what),
                 rc && strstr(mt_errmsg(), label("MTNLG_ATTENTION_CHUNK=\"%s\"", chunks[k])),
                 rc ? mt_errmsg() : "opened");
      if (!rc) mt_device_close(&d);
      continue;
    }
    if (!rc) mt__cuda_attention_chunk_of(&d, 13, 5, 4, &rows, &heads);
    mt__cuda_attention_chunk_of(&gpu, 13, 5, 4, &rows0, &heads0); /* the budget's */
    int want_r = k == 4 && rows0 > 2 ? 2 : rows0, want_h = k == 4 ? 1 : heads0;
    check_that("device_open", label("%s: chunks of %d rows and %d heads", what, want_r, want_h),
               !rc && rows == want_r && heads == want_h,
               rc ? mt_errmsg() : label("%d rows and %d heads", rows, heads));
    if (!rc) mt_device_close(&d);
  }
  env_put_back("MTNLG_ATTENTION_CHUNK", saved);
}

/* A 16-bit qkv's attention scratch is the flash backward's alone (its row
 * sums, NH·T floats for each of up to 8 samples); the chunked path's
 * tensors are the device's own, made the first time that path runs and
 * grown for a longer sequence: a device on the flash kernels holds none.
 * A fresh device, so that no other test's chunked run has made them. */
static void test_chunked16_scratch_is_the_devices(void) {
  mt_device d;
  int rc = mt_device_open(&d, "cuda:0");
  check_that("device_open", "a fresh device for the chunked path's scratch", !rc,
             rc ? mt_errmsg() : "opened");
  if (rc) return;
  int B = 2, C = 64, NH = 2;
  size_t held[2] = {0, 0};
  for (int k = 0; k < 2; k++) {
    int T = k ? 140 : 70;
    size_t nq = (size_t)B * T * 3 * C, no = (size_t)B * T * C, nl = (size_t)B * NH * T;
    size_t ns = d.ops->attention_scratch(&d, T, C, NH, MT_BF16);
    if (!k)
      check_that("attention_scratch", "bf16 T=70: the flash backward's row sums alone",
                 ns >= (size_t)NH * T && ns <= 8 * (size_t)NH * T, label("%zu floats", ns));
    void *q = mt_device_alloc(&d, nq * 2), *o = mt_device_alloc(&d, no * 2);
    void *dq = mt_device_alloc(&d, nq * 2);
    float *l = mt_device_alloc(&d, nl * 4), *sc = mt_device_alloc(&d, ns * 4);
    float *dout = mt_device_alloc(&d, no * 4);
    if (!q || !o || !dq || !l || !sc || !dout) die("device alloc");
    mt_device_memset0(&d, q, nq * 2);
    mt_device_memset0(&d, dout, no * 4);
    for (int path = 0; path < 2; path++) {
      mt__cuda_attention_path(&d, path ? MT__CUDA_ATT_CHUNKED : MT__CUDA_ATT_FLASH);
      d.ops->attention_fwd(&d, o, l, sc, q, MT_BF16, B, T, C, NH, NULL, NULL);
      d.ops->attention_bwd(&d, dq, MT_BF16, sc, dout, o, q, MT_BF16, l, B, T, C, NH, NULL, NULL);
      int src = mt_device_sync(&d);
      size_t bytes = mt__cuda_attention_chunked_bytes(&d);
      if (!k && !path)
        check_that("attention_fwd", "bf16 T=70 by the flash kernels: no chunked scratch made",
                   !src && bytes == 0, src ? mt_errmsg() : label("%zu bytes", bytes));
      if (path) held[k] = bytes;
    }
    mt_device_free(&d, q), mt_device_free(&d, o), mt_device_free(&d, dq);
    mt_device_free(&d, l), mt_device_free(&d, sc), mt_device_free(&d, dout);
  }
  check_that("attention_fwd", "bf16 chunked: its scratch made at T=70, grown at T=140",
             held[0] > 0 && held[1] > held[0], label("%zu, then %zu bytes", held[0], held[1]));
  mt_device_close(&d);
}

/* MTNLG_GELU_EPILOGUE at open: 0 turns cuBLASLt's GeLU epilogues off (the
 * ops then run GeLU and its gradient as kernels of their own, the values
 * the same within the epilogues' tolerance, which the op checks hold them
 * to), 1 keeps them on, anything else refuses the device, naming the
 * variable. The environment is put back as it was. */
static void test_gelu_epilogue_switch(void) {
  char *saved = env_saved("MTNLG_GELU_EPILOGUE");
  static const char *vals[] = {"yes", "0", "1"};
  for (int k = 0; k < 3; k++) {
    mt_device d;
    setenv("MTNLG_GELU_EPILOGUE", vals[k], 1);
    int rc = mt_device_open(&d, "cuda:0");
    const char *what = label("MTNLG_GELU_EPILOGUE=%s", vals[k]);
    if (!k)
      check_that("device_open", label("%s: refused", what),
                 rc && strstr(mt_errmsg(), "MTNLG_GELU_EPILOGUE=\"yes\""),
                 rc ? mt_errmsg() : "opened");
    else
      check_that("device_open", label("%s: epilogues %s", what, k == 1 ? "off" : "on"),
                 !rc && d.gelu_epilogue == (k == 2), rc ? mt_errmsg() : "opened");
    if (!rc) mt_device_close(&d);
  }
  env_put_back("MTNLG_GELU_EPILOGUE", saved);
  int on = gpu.gelu_epilogue;
  gpu.gelu_epilogue = 0;
  test_linear_gelu(9, 20, 16, MT_MATMUL_FP32, MT_F32, MT_F32);
  test_linear_bwd_dgelu(9, 16, 20, MT_MATMUL_FP32, MT_F32, MT_F32);
  test_linear_gelu(9, 20, 16, MT_MATMUL_BF16, MT_BF16, MT_BF16);
  test_linear_bwd_dgelu(9, 16, 20, MT_MATMUL_BF16, MT_BF16, MT_BF16);
  gpu.gelu_epilogue = on;
}

/* A bias and a GeLU input (aux) 4 bytes past an allocation, as a slice of
 * a packed vector could be: cuBLASLt's heuristic cannot be told their
 * alignment and its epilogues may fault on one under 16 bytes, so the GPU
 * takes cuBLAS and its own bias and GeLU kernels there (device_cuda.cu's
 * gemm_lt). Against the CPU; on the emulator also that no cuBLASLt GEMM ran. */
static void test_linear_unaligned_bias_and_aux(void) {
  const int N = 9, C = 20, OC = 16; /* OC a multiple of 8: aligned, both epilogues would serve */
  const size_t no = (size_t)N * OC;
  float *x = H((size_t)N * C, -1, 1), *w = H((size_t)OC * C, -0.5f, 0.5f), *b = H(OC, -1, 1);
  float *dx = Df(x, (size_t)N * C), *dw = Df(w, (size_t)OC * C);
  float *db = Df(H(OC + 1, -1, 1), OC + 1) + 1; /* 4 bytes past a 256-byte boundary */
  if (mt_device_memcpy_htod(&gpu, db, b, OC * sizeof(float))) die("copy to the device");
  float *co = halloc(no * sizeof(float)), *cp = halloc(no * sizeof(float));
  float *go = DN(no), *gp = DN(no + 1) + 1;
  long lt0, lt1, gelu, dgelu, blas;
  (void)lt0, (void)lt1, (void)gelu, (void)dgelu, (void)blas;
#ifdef MT_CUDA_EMU
  mt_emu_gemm_counts(&lt0, &gelu, &dgelu, &blas);
#endif
  cpu.ops->linear_fwd(&cpu, co, MT_F32, x, MT_F32, w, MT_F32, b, NULL, N, C, OC);
  gpu.ops->linear_fwd(&gpu, go, MT_F32, dx, MT_F32, dw, MT_F32, db, NULL, N, C, OC);
  check("linear_fwd", "bias 4-byte aligned", back(go, no), co, no, prec_tol(MT_MATMUL_FP32));
  cpu.ops->linear_gelu_fwd(&cpu, co, cp, MT_F32, x, MT_F32, w, MT_F32, b, NULL, N, C, OC);
  gpu.ops->linear_gelu_fwd(&gpu, go, gp, MT_F32, dx, MT_F32, dw, MT_F32, db, NULL, N, C, OC);
  check("linear_gelu_fwd", "bias, pre 4-byte aligned: out", back(go, no), co, no,
        GELU_EPILOGUE_TOL);
  check("linear_gelu_fwd", "bias, pre 4-byte aligned: pre", back(gp, no), cp, no,
        prec_tol(MT_MATMUL_FP32));
#ifdef MT_CUDA_EMU
  mt_emu_gemm_counts(&lt1, &gelu, &dgelu, &blas);
  check_that("linear_fwd", "unaligned bias or aux: no cuBLASLt", lt1 == lt0,
             label("%ld cuBLASLt GEMM(s)", lt1 - lt0));
#endif
  arena_reset();
}

#ifdef MT_CUDA_EMU
/* A GPU placing a wmma accumulator's elements otherwise than the flash
 * kernels assume (emulated: mt_emu_set_acc_layout(0)) gets a message from
 * a 16-bit attention, not wrong attention: the layout is read once per
 * device, when it opens, and no flash kernel is launched. */
static void test_flash_other_layout(void) {
  mt_emu_set_acc_layout(0);
  mt_device other;
  int rc = mt_device_open(&other, "cuda:0");
  if (!rc) {
    int B = 1, T = 16, C = 64, NH = 1;
    size_t nq = (size_t)B * T * 3 * C, no = (size_t)B * T * C;
    uint16_t *qkv = mt_device_alloc(&other, nq * 2), *out = mt_device_alloc(&other, no * 2);
    float *lse = mt_device_alloc(&other, (size_t)T * 4);
    float *s = mt_device_alloc(&other, other.ops->attention_scratch(&other, T, C, NH, MT_BF16) * 4);
    mt_device_memset0(&other, qkv, nq * 2);
    long launches = mt_emu_launch_count("flash_fwd");
    other.ops->attention_fwd(&other, out, lse, s, qkv, MT_BF16, B, T, C, NH, NULL, NULL);
    int frc = mt_device_sync(&other);
    check_that("attention_fwd", "bf16, another accumulator layout: refused",
               frc && strstr(mt_errmsg(), "otherwise than mma.m16n8k16") &&
                   mt_emu_launch_count("flash_fwd") == launches,
               frc ? mt_errmsg() : "ran");
    mt_device_free(&other, qkv), mt_device_free(&other, out), mt_device_free(&other, lse);
    mt_device_free(&other, s);
    mt_device_close(&other);
  }
  check_that("device_open", "a GPU with another accumulator layout", !rc,
             rc ? mt_errmsg() : "opened");
  mt_emu_set_acc_layout(1);
}

/* A GPU that cannot run the layout probes when it opens (emulated: the
 * accumulator's probe faulting, then the A fragment's; both launch as
 * "k", layout_probe's parameter): the device does not open, and says
 * why. */
static void test_probe_fault_at_open(void) {
  for (long n = 1; n <= 2; n++) {
    mt_emu_fail_launch("k", n);
    mt_device d;
    int rc = mt_device_open(&d, "cuda:0");
    mt_emu_fail_launch("k", 0);
    check_that("device_open",
               label("the %s probe faulting: not opened", n == 1 ? "accumulator" : "matrix_a"),
               rc && strstr(mt_errmsg(), n == 1 ? "accumulator layout" : "matrix_a layout") &&
                   strstr(mt_errmsg(), "when it opens"),
               rc ? mt_errmsg() : "opened");
    if (!rc) mt_device_close(&d);
  }
}

/* an attention's outputs, their bits on the host */
typedef struct {
  uint16_t *out, *dqkv;
  float *lse;
} attn_bits;
/* a bf16 attention forward and backward of qkv qh (host bf16) and dout on
 * d (B 2, T 70, head size 32, dropout), its outputs' bits */
static attn_bits attention_on(mt_device *d, const void *qh, const float *dout) {
  int B = 2, T = 70, C = 64, NH = 2;
  size_t nq = (size_t)B * T * 3 * C, no = (size_t)B * T * C, nl = (size_t)B * NH * T;
  size_t ns = d->ops->attention_scratch(d, T, C, NH, MT_BF16);
  mt_dropout drop = {0.2f, 0x1234567887654321ull, 11, 2, 0};
  void *q = mt_device_alloc(d, nq * 2), *o = mt_device_alloc(d, no * 2);
  void *dq = mt_device_alloc(d, nq * 2);
  float *l = mt_device_alloc(d, nl * 4), *gs = mt_device_alloc(d, ns * 4);
  float *gd = mt_device_alloc(d, no * 4);
  if (!q || !o || !dq || !l || !gs || !gd) die("device alloc");
  mt_device_memcpy_htod(d, q, qh, nq * 2);
  mt_device_memcpy_htod(d, gd, dout, no * 4);
  mt__cuda_flash_fwd_rows(d, 16);
  d->ops->attention_fwd(d, o, l, gs, q, MT_BF16, B, T, C, NH, &drop, NULL);
  d->ops->attention_bwd(d, dq, MT_BF16, gs, gd, o, q, MT_BF16, l, B, T, C, NH, &drop, NULL);
  attn_bits r = {halloc(no * 2), halloc(nq * 2), halloc(nl * 4)};
  mt_device_memcpy_dtoh(d, r.out, o, no * 2);
  mt_device_memcpy_dtoh(d, r.lse, l, nl * 4);
  mt_device_memcpy_dtoh(d, r.dqkv, dq, nq * 2);
  if (mt_device_sync(d)) die("attention, P in registers or not");
  void *bufs[6] = {q, o, dq, l, gs, gd};
  for (int i = 0; i < 6; i++) mt_device_free(d, bufs[i]);
  return r;
}

/* A GPU whose bf16 matrix_a fragment is not laid out as the accumulator
 * (emulated: mt_emu_set_a_layout(0)): the probe tells it when the device
 * opens, P and dS go through shared memory there (asking for registers is
 * refused), and the attention is the same bits as the main device's, where
 * they pass in registers. */
static void test_flash_other_a_layout(void) {
  int B = 2, T = 70, C = 64, NH = 2;
  size_t nq = (size_t)B * T * 3 * C, no = (size_t)B * T * C, nl = (size_t)B * NH * T;
  int regs = mt__cuda_flash_p_regs_of(&gpu);
  const void *qh;
  stored(H(nq, -1.5f, 1.5f), nq, MT_BF16, &qh);
  float *dout = H(no, -1, 1);
  attn_bits want = attention_on(&gpu, qh, dout); /* before the emulated layout changes */
  mt_emu_set_a_layout(0);
  mt_device other;
  int rc = mt_device_open(&other, "cuda:0");
  check_that("device_open", "a GPU with another matrix_a layout", !rc, rc ? mt_errmsg() : "opened");
  if (!rc) {
    mt__cuda_attention_path(&other, MT__CUDA_ATT_FLASH);
    int a_misplaced = -1, arc = mt__cuda_a_layout_check(&other, &a_misplaced);
    check_that("flash", "matrix_a probe: the emulator's own order told apart",
               !arc && a_misplaced > 0, label("%d of 256 elements elsewhere", a_misplaced));
    int on = mt__cuda_flash_p_regs(&other, 1);
    check_that("flash", "P in registers there: refused",
               on == MT_EINVAL && strstr(mt_errmsg(), "matrix_a") &&
                   !mt__cuda_flash_p_regs_of(&other),
               on ? mt_errmsg() : "allowed");
    attn_bits got = attention_on(&other, qh, dout);
    check_that("attention",
               label("bf16, through shared memory there against %s here: the same bits",
                     regs ? "registers" : "shared memory"),
               !memcmp(got.out, want.out, no * 2) && !memcmp(got.lse, want.lse, nl * 4) &&
                   !memcmp(got.dqkv, want.dqkv, nq * 2),
               "out, lse and dqkv");
    mt_device_close(&other);
  }
  mt_emu_set_a_layout(1);
  arena_reset();
}

/* On a GPU that gives a block less shared memory than the flash backward at
 * head size 160 takes (an sm_86/sm_89 part: 101376 bytes, emulated through
 * MT_CUDA_EMU_SMEM_OPTIN), the forward (73728 bytes) runs and the backward
 * (105216) is refused naming both figures, instead of a launch failing with
 * "invalid argument"; at head size 128 both passes run (61440 and 88832
 * bytes). */
static void test_flash_shared_memory_limit(void) {
  setenv("MT_CUDA_EMU_SMEM_OPTIN", "101376", 1);
  mt_device small;
  int rc = mt_device_open(&small, "cuda:0");
  check_that("device_open", "a GPU with 99 KB of shared memory per block", !rc,
             rc ? mt_errmsg() : "opened");
  for (int C = 128; !rc && C <= 160; C += 32) {
    int B = 1, T = 16, NH = 1, fits = C == 128;
    size_t nq = (size_t)B * T * 3 * C, no = (size_t)B * T * C, nl = (size_t)B * NH * T;
    size_t ns = small.ops->attention_scratch(&small, T, C, NH, MT_BF16);
    uint16_t *qkv = mt_device_alloc(&small, nq * 2), *out = mt_device_alloc(&small, no * 2);
    float *lse = mt_device_alloc(&small, nl * 4), *s = mt_device_alloc(&small, ns * 4);
    float *dq = mt_device_alloc(&small, nq * 4), *dout = mt_device_alloc(&small, no * 4);
    mt_device_memset0(&small, qkv, nq * 2);
    mt_device_memset0(&small, dout, no * 4);
    char what[96];
    small.ops->attention_fwd(&small, out, lse, s, qkv, MT_BF16, B, T, C, NH, NULL, NULL);
    int frc = mt_device_sync(&small);
    snprintf(what, sizeof what, "HS=%d bf16 within 99 KB of shared memory", C);
    check_that("attention_fwd", what, !frc, frc ? mt_errmsg() : "ran");
    small.ops->attention_bwd(&small, dq, MT_F32, s, dout, out, qkv, MT_BF16, lse, B, T, C, NH, NULL,
                             NULL);
    int brc = mt_device_sync(&small);
    if (fits) {
      snprintf(what, sizeof what, "HS=%d bf16 within 99 KB of shared memory", C);
      check_that("attention_bwd", what, !brc, brc ? mt_errmsg() : "ran");
    } else {
      snprintf(what, sizeof what, "HS=%d bf16 over 99 KB of shared memory: refused with figures",
               C);
      check_that("attention_bwd", what,
                 brc && strstr(mt_errmsg(), "105216 bytes of shared memory") &&
                     strstr(mt_errmsg(), "allows 101376"),
                 brc ? mt_errmsg() : "no error");
    }
    mt_device_free(&small, qkv), mt_device_free(&small, out), mt_device_free(&small, lse);
    mt_device_free(&small, s), mt_device_free(&small, dq), mt_device_free(&small, dout);
  }
  if (!rc) mt_device_close(&small);
  unsetenv("MT_CUDA_EMU_SMEM_OPTIN");
}
#endif

/* The flash kernels at GPT-2's (HS 64), GPT-3 1.3B's (HS 128, T 2048) and
 * MT-NLG 530B's (HS 160) head sizes; then within documents (doc_start):
 * their skipped and masked key tiles at GPT-2's and MT-NLG's. On a GPU,
 * the chunked 16-bit GEMMs too, at MT-NLG's and GPT-2's. */
static void flash_full_shapes(void) {
  shape gpt = {2, 1024, 512, 8, 50257, 50304};
  test_flash_attention(gpt, MT_BF16, 1);
  test_flash_attention(gpt, MT_F16, 0);
  shape xl = {1, 2048, 2048, 16, 37, 40}, mtnlg = {1, 512, 640, 4, 37, 40};
  test_flash_attention(xl, MT_BF16, 1);
  test_flash_attention(mtnlg, MT_BF16, 1);
  with_docs = 1;
  test_flash_attention(gpt, MT_BF16, 1);
  test_flash_attention(mtnlg, MT_F16, 1);
#ifndef MT_CUDA_EMU /* the emulator's chunks (a row and a head at these T) would take hours */
  test_chunked16_attention(mtnlg, MT_F16, 1);
#endif
  with_docs = 0;
#ifndef MT_CUDA_EMU
  test_chunked16_attention(gpt, MT_BF16, 1);
#endif
}

/* test_cuda_ops [--small | --flash]: every op at small shapes, or the flash
 * kernels alone at the full ones (a change to them, on the emulator in
 * minutes), or everything at the full shapes */
int main(int argc, char **argv) {
  int small = argc > 1 && !strcmp(argv[1], "--small");
  int flash_only = argc > 1 && !strcmp(argv[1], "--flash");
  if (mt_device_open(&cpu, "cpu:0")) die("open cpu:0");
  if (mt_device_open(&gpu, "cuda:0")) die("open cuda:0");
  /* each 16-bit attention test sets the path it tests; until then, flash */
  mt__cuda_attention_path(&gpu, MT__CUDA_ATT_FLASH);
  printf("test_cuda_ops: %s against %s, %s shapes\n", gpu.name, cpu.name, small ? "small" : "full");
  static const mt_matmul_precision precs[] = {MT_MATMUL_FP32, MT_MATMUL_TF32, MT_MATMUL_BF16};

  /* the flash kernels work on rows in the score fragments' registers,
   * where mma.m16n8k16 places them: so on this GPU too */
  int misplaced = -1;
  int lrc = mt__cuda_acc_layout_check(&gpu, &misplaced);
  check_that("flash", "accumulator layout: mma.m16n8k16's", !lrc && misplaced == 0,
             lrc ? mt_errmsg() : label("%d of 256 elements elsewhere", misplaced));
  /* the matrix_a probe, whose answer when the device opened decides
   * whether P and dS pass in registers (test_flash_other_a_layout: the
   * other answer) */
  int a_misplaced = -1, arc = mt__cuda_a_layout_check(&gpu, &a_misplaced);
  check_that("flash", "matrix_a probe: P and dS in registers where it finds none misplaced",
             !arc && mt__cuda_flash_p_regs_of(&gpu) == !a_misplaced,
             arc ? mt_errmsg()
                 : label("%d of 256 elements elsewhere, in registers %d", a_misplaced,
                         mt__cuda_flash_p_regs_of(&gpu)));
#ifdef MT_CUDA_EMU
  check_that("flash", "matrix_a layout on the emulator: mma.m16n8k16's A", !arc && !a_misplaced,
             label("%d of 256 elements elsewhere", a_misplaced));
#endif

  if (flash_only) {
    flash_full_shapes();
  } else if (small) {
    shape s = {2, 13, 24, 3, 37, 40};
    test_embedding(s);
    test_layernorm(7, 24);
    test_layernorm(3, 300); /* more columns than threads */
    for (int i = 0; i < 3; i++) test_linear(9, 20, 12, precs[i], MT_F32, MT_F32);
    test_linear(5, 7, 3, MT_MATMUL_FP32, MT_F32, MT_F32); /* odd sizes: 4-byte aligned rows */
    for (int i = 0; i < 3; i++)
      test_linear_gelu(9, 20, 16, precs[i], MT_F32, MT_F32); /* GeLU epilogue */
    /* aux ld 12: GEMM, then the GeLU kernel */
    test_linear_gelu(9, 20, 12, MT_MATMUL_FP32, MT_F32, MT_F32);
    test_linear_gelu(5, 7, 3, MT_MATMUL_FP32, MT_F32, MT_F32);
    for (int i = 0; i < 3; i++)
      test_linear_bwd_dgelu(9, 16, 20, precs[i], MT_F32, MT_F32); /* DGELU */
    /* aux ld 12: GEMM, then gelu_bwd */
    test_linear_bwd_dgelu(9, 12, 20, MT_MATMUL_FP32, MT_F32, MT_F32);
    test_linear_bwd_dgelu(5, 3, 7, MT_MATMUL_FP32, MT_F32, MT_F32);
    /* 16-bit weights, with fp32 inputs and with inputs of their type: bf16
     * in every precision (bf16: native bf16 GEMMs), fp16 in tf32 as fp16
     * jobs run them */
    for (int k = 0; k < 2; k++) {
      mt_dtype bf_in = k ? MT_BF16 : MT_F32, fp_in = k ? MT_F16 : MT_F32;
      for (int i = 0; i < 3; i++) test_linear(9, 20, 12, precs[i], MT_BF16, bf_in);
      test_linear(9, 20, 12, MT_MATMUL_TF32, MT_F16, fp_in);
      /* odd sizes: 2-byte aligned 16-bit rows */
      test_linear(5, 7, 3, MT_MATMUL_BF16, MT_BF16, bf_in);
      test_linear(5, 7, 3, MT_MATMUL_TF32, MT_F16, fp_in);
      test_linear_gelu(9, 20, 16, MT_MATMUL_BF16, MT_BF16, bf_in);
      test_linear_gelu(9, 20, 16, MT_MATMUL_FP32, MT_BF16, bf_in);
      test_linear_gelu(9, 20, 16, MT_MATMUL_TF32, MT_F16, fp_in);
      test_linear_gelu(9, 20, 12, MT_MATMUL_BF16, MT_BF16, bf_in);
      test_linear_gelu(5, 7, 3, MT_MATMUL_TF32, MT_F16, fp_in);
      test_linear_bwd_dgelu(9, 16, 20, MT_MATMUL_BF16, MT_BF16, bf_in);
      test_linear_bwd_dgelu(9, 16, 20, MT_MATMUL_FP32, MT_BF16, bf_in);
      test_linear_bwd_dgelu(9, 16, 20, MT_MATMUL_TF32, MT_F16, fp_in);
      test_linear_bwd_dgelu(5, 3, 7, MT_MATMUL_BF16, MT_BF16, bf_in);
      test_linear_bwd_dgelu(5, 3, 7, MT_MATMUL_TF32, MT_F16, fp_in);
    }
    test_linear_bf16_native(9, 20, 16);
    test_linear_bf16_native(5, 7, 3);
    test_linear_typed_input(9, 20, 16, MT_MATMUL_BF16, MT_BF16, 0);
    test_linear_typed_input(9, 20, 16, MT_MATMUL_FP32, MT_BF16, 0);
    test_linear_typed_input(9, 20, 16, MT_MATMUL_TF32, MT_F16, 0);
    test_linear_typed_input(5, 7, 3, MT_MATMUL_BF16, MT_BF16, 0);
#ifdef MT_CUDA_CVT_BYTES
    /* past the emulator's conversion budget (meson: 2048 bytes): with fp32
     * inputs, rows of inp and dout in blocks of 16 (and 40 for the
     * forward); with 16-bit ones, rows of dout alone in blocks of 24, and
     * unpacked inputs in blocks of 16; weight rows in blocks of 16 */
    for (int k = 0; k < 2; k++) {
      mt_dtype bf_in = k ? MT_BF16 : MT_F32, fp_in = k ? MT_F16 : MT_F32;
      test_linear(64, 24, 40, MT_MATMUL_BF16, MT_BF16, bf_in);
      test_linear(64, 24, 40, MT_MATMUL_FP32, MT_BF16, bf_in);
      test_linear(64, 24, 40, MT_MATMUL_TF32, MT_F16, fp_in);
      test_linear_gelu(64, 24, 40, MT_MATMUL_BF16, MT_BF16, bf_in);
      test_linear_gelu(64, 24, 40, MT_MATMUL_TF32, MT_F16, fp_in);
      test_linear_bwd_dgelu(64, 24, 40, MT_MATMUL_BF16, MT_BF16, bf_in);
      test_linear_bwd_dgelu(64, 24, 40, MT_MATMUL_TF32, MT_F16, fp_in);
      /* aux ld 20: GEMMs, then gelu_bwd */
      test_linear_bwd_dgelu(64, 20, 44, MT_MATMUL_TF32, MT_F16, fp_in);
      test_linear_blocks(64, 24, 40, MT_MATMUL_BF16, MT_BF16, bf_in);
      test_linear_blocks(64, 24, 40, MT_MATMUL_FP32, MT_BF16, bf_in);
      test_linear_blocks(64, 24, 40, MT_MATMUL_TF32, MT_F16, fp_in);
    }
    test_linear_bf16_native(64, 24, 40);
    test_linear_typed_input(64, 24, 40, MT_MATMUL_BF16, MT_BF16, 1);
    test_linear_typed_input(64, 24, 40, MT_MATMUL_TF32, MT_F16, 1);
#endif
    test_linear_bad_types();
    test_linear_scratch();
    test_to_half(1000);
    for (int i = 0; i < 3; i++) test_attention(s, precs[i], 0);
    test_attention(s, MT_MATMUL_FP32, 1);
    shape odd = {2, 9, 15, 5, 37, 40}; /* head size 3: every head slice misaligned */
    test_attention(odd, MT_MATMUL_FP32, 0);
    test_attention(odd, MT_MATMUL_FP32, 1);
    /* the emulator's chunks (tests/gpu/meson.build): 4 rows, 512 floats */
    shape heads = {1, 13, 20, 5, 37, 40}; /* groups of 4 heads, then 1 */
    test_attention(heads, MT_MATMUL_FP32, 1);
    shape rows = {1, 70, 16, 2, 37, 40}; /* 3 rows and 1 head per chunk: 2·4·70 > 512 */
    test_attention(rows, MT_MATMUL_FP32, 1);
    /* the flash kernels: head size 16 padded to 64 (tiles loaded 8 or 4
     * elements at a time), T past one tile of 64 rows and not a multiple of
     * it; 80 padded to 128; 144 padded to 160 (MT-NLG's width); 200
     * padded to 256 in tiles of 32 rows; the backward takes B = 2 in one
     * launch and B = 3 as 2 then 1 (the emulator caps a launch at 2 samples,
     * MT_CUDA_FLASH_SAMPLES) */
    shape f64 = {2, 70, 32, 2, 37, 40}, f128 = {1, 20, 160, 2, 37, 40};
    shape f160 = {1, 70, 144, 1, 37, 40}, f256 = {1, 40, 200, 1, 37, 40};
    shape fgroups = {3, 70, 64, 4, 37, 40};
    test_flash_attention(f64, MT_BF16, 0);
    test_flash_attention(f64, MT_BF16, 1);
    test_flash_attention(f64, MT_F16, 1);
    test_flash_attention(f128, MT_BF16, 1);
    test_flash_attention(f160, MT_BF16, 1);
    test_flash_attention(f256, MT_F16, 0);
    test_flash_attention(fgroups, MT_BF16, 1);
    shape fodd = {2, 33, 20, 2, 37, 40}; /* head size 10: tiles load element by element */
    test_flash_attention(fodd, MT_BF16, 1);
    /* three query tiles of 128 rows (32 rows a warp), the last partial;
     * two at MT-NLG's width */
    shape f300 = {1, 300, 32, 2, 37, 40}, f200 = {1, 200, 144, 1, 37, 40};
    test_flash_attention(f300, MT_BF16, 1);
    test_flash_attention(f200, MT_BF16, 1);
    /* the same within documents (doc_start): the fp32 chunks, and the flash
     * kernels with whole key tiles before a query tile's rows (T 70 in
     * tiles of 64 and of 32 rows), at head sizes 32, 144 and 200 */
    with_docs = 1;
    shape docs3 = {3, 70, 32, 2, 37, 40};
    test_attention(docs3, MT_MATMUL_FP32, 0);
    test_attention(docs3, MT_MATMUL_FP32, 1);
    test_attention(rows, MT_MATMUL_FP32, 1);
    test_flash_attention(docs3, MT_BF16, 0);
    test_flash_attention(docs3, MT_F16, 1);
    shape d160 = {3, 70, 144, 1, 37, 40}; /* MT-NLG's width padded to 160, in tiles of 64 */
    test_flash_attention(d160, MT_F16, 1);
    shape d256 = {3, 70, 200, 1, 37, 40};
    test_flash_attention(d256, MT_BF16, 1);
    test_flash_attention(f300, MT_F16, 0); /* warps whose rows start past a key tile */
    test_flash_attention(f200, MT_F16, 1);
    test_chunked16_attention(docs3, MT_BF16, 1);
    test_chunked16_attention(docs3, MT_F16, 0);
    with_docs = 0;
    /* the same with 16-bit GEMMs (the emulator's chunks: 2 rows and 1 head
     * of f64's; 4 rows and groups of 3 heads, then 2, of heads'); head size
     * 3 (every slice misaligned, the GEMMs not cuBLASLt's); 300, over what
     * the flash kernels take */
    test_chunked16_attention(f64, MT_BF16, 1);
    test_chunked16_attention(f64, MT_F16, 0);
    test_chunked16_attention(heads, MT_F16, 1);
    test_chunked16_attention(odd, MT_BF16, 1);
    /* rows past a row kernel's first quads (the emulator's blocks of 64
     * threads keep 256 columns in each thread's first quad, 512 in both);
     * rows of 800 past what the fp32 kernels' 64 threads and the 16-bit
     * ones' 96 keep (512 and 768 columns), the rest read again and summed
     * online */
    test_attention(f300, MT_MATMUL_FP32, 0);
    test_chunked16_attention(f300, MT_BF16, 0);
    shape f800 = {1, 800, 16, 1, 37, 40}, f600 = {1, 600, 16, 1, 37, 40};
    test_attention(f800, MT_MATMUL_FP32, 1);
    test_chunked16_attention(f800, MT_BF16, 1);
    test_chunked16_attention(f600, MT_F16, 0); /* 75 threads' worth, in 96 that keep it all */
    shape wide = {1, 20, 600, 2, 37, 40};
    test_chunked16_attention(wide, MT_BF16, 1);
    test_attention_decode(300, 64, 4);
    test_attention_decode(17, 20, 2);
    test_attention_decode(2300, 48, 3);  /* three tiles of keys, the last one partial */
    test_attention_decode(1100, 320, 2); /* head size 160: columns past the block's threads */
    test_chunked16_scratch_is_the_devices();
#ifdef MT_CUDA_EMU
    test_flash_shared_memory_limit();
    test_flash_other_layout();
    test_flash_other_a_layout();
    test_probe_fault_at_open();
#endif
    test_upload_queued();
    test_elementwise(1000);
    test_dropout(3, 101);
    test_crossentropy(5, 37, 40, 0);
    test_crossentropy(3, 700, 768, 0);
    test_crossentropy(5, 37, 40, 1);
    test_crossentropy(7, 700, 768, 1);
    test_adamw(5000);
    test_sumsq_multi();
    test_linear_unaligned_bias_and_aux();
    test_count_zeros();
  } else {
    shape s = {4, 256, 256, 4, 1000, 1024};
    test_embedding(s);
    test_layernorm(1024, 768);
    test_layernorm(37, 2050);
    for (int i = 0; i < 3; i++) {
      test_linear(1024, 768, 2304, precs[i], MT_F32, MT_F32);
      test_linear(67, 129, 65, precs[i], MT_F32, MT_F32);
      test_linear_gelu(1024, 768, 3072, precs[i], MT_F32, MT_F32);
      test_linear_bwd_dgelu(1024, 3072, 768, precs[i], MT_F32, MT_F32); /* the MLP's c_proj */
    }
    /* aux ld 260: not a multiple of 8 */
    test_linear_gelu(67, 129, 260, MT_MATMUL_FP32, MT_F32, MT_F32);
    test_linear_bwd_dgelu(67, 260, 129, MT_MATMUL_FP32, MT_F32, MT_F32);
    /* 16-bit weights, with fp32 inputs and with inputs of their type: bf16
     * jobs' native bf16 GEMMs, fp16 jobs' native fp16 ones */
    for (int k = 0; k < 2; k++) {
      mt_dtype bf_in = k ? MT_BF16 : MT_F32, fp_in = k ? MT_F16 : MT_F32;
      test_linear(1024, 768, 2304, MT_MATMUL_BF16, MT_BF16, bf_in);
      test_linear(67, 129, 65, MT_MATMUL_BF16, MT_BF16, bf_in);
      test_linear(1024, 768, 2304, MT_MATMUL_TF32, MT_F16, fp_in);
      test_linear(67, 129, 65, MT_MATMUL_TF32, MT_F16, fp_in);
      test_linear_gelu(1024, 768, 3072, MT_MATMUL_BF16, MT_BF16, bf_in);
      test_linear_gelu(1024, 768, 3072, MT_MATMUL_TF32, MT_F16, fp_in);
      test_linear_bwd_dgelu(1024, 3072, 768, MT_MATMUL_BF16, MT_BF16, bf_in);
      test_linear_bwd_dgelu(1024, 3072, 768, MT_MATMUL_TF32, MT_F16, fp_in);
    }
    test_linear_bf16_native(1024, 768, 3072);
    test_linear_typed_input(1024, 768, 3072, MT_MATMUL_BF16, MT_BF16, 0);
    test_linear_typed_input(1024, 768, 3072, MT_MATMUL_TF32, MT_F16, 0);
    /* past the default 128 MiB budget: bf16 weights under TF32 unpacked in
     * blocks of rows (256 MiB in fp32); bf16 rows of inp and dout in blocks
     * (192 MiB), of dout alone (256 MiB); fp16 rows of dout alone in blocks
     * (256 MiB) */
    test_linear(64, 8192, 8192, MT_MATMUL_TF32, MT_BF16, MT_F32);
    test_linear_bf16_native(16384, 2048, 4096);
    test_linear_typed_input(32768, 2048, 4096, MT_MATMUL_BF16, MT_BF16, 1);
    test_linear_typed_input(32768, 2048, 4096, MT_MATMUL_TF32, MT_F16, 1);
    test_linear_bad_types();
    for (int i = 0; i < 3; i++) test_attention(s, precs[i], 0);
    test_attention(s, MT_MATMUL_FP32, 1);
    test_attention(s, MT_MATMUL_BF16, 1);
    shape odd = {2, 67, 15, 5, 37, 40};
    test_attention(odd, MT_MATMUL_FP32, 0);
    test_attention(odd, MT_MATMUL_FP32, 1);
    shape gpt = {2, 1024, 512, 8, 50257, 50304}; /* GPT-2 vocabulary, longer rows */
    test_attention(gpt, MT_MATMUL_BF16, 1);
    flash_full_shapes();
    with_docs = 1;
    test_attention(gpt, MT_MATMUL_FP32, 1);
    with_docs = 0;
    test_embedding(gpt);
    test_linear_scratch();
    test_to_half((size_t)1 << 20);
    test_elementwise((size_t)3 << 20);
    test_dropout(4, (size_t)1 << 20 | 3);
    test_crossentropy(256, 50257, 50304, 1);
    test_adamw((size_t)1 << 22);
    test_sumsq_multi();
    test_linear_unaligned_bias_and_aux();
    test_count_zeros();
  }
  test_gelu_epilogue_switch();
  test_flash_rows_switch();
  test_attention_path_switch();
  int rc = mt_device_sync(&gpu);
  if (rc) {
    printf("FAIL device sync: %s\n", mt_errmsg());
    n_failed++;
  }
  mt_device_close(&gpu);
  mt_device_close(&cpu);
  printf("test_cuda_ops: %d checks, %d failed; worst element error %.2f of its bound\n", n_checks,
         n_failed, worst_elem / ELEM_TOL);
  return n_failed ? 1 : 0;
}
