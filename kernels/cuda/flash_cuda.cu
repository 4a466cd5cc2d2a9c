/* flash_cuda.cu — causal self-attention of a 16-bit qkv on the tensor cores,
 * fused as FlashAttention does it: scores, softmax, dropout and the product
 * with V stay in shared memory and registers, tile by tile, and nothing of
 * size T² is written. A 16-bit job keeps qkv in bf16 or binary16 (ops.h), so
 * the tiles load as they are; products are wmma's 16×16×16 (mma.sync),
 * accumulated in fp32.
 *
 * A block takes one tile of R = 16·W rows (queries, or keys in the
 * backward's dK/dV pass) of one (sample, head) with W warps, each warp 16
 * rows; the other side moves through tiles of R. The head's width HS is
 * padded with zeros to D (64, 128, 160 or 256) in shared memory: 160 is
 * MT-NLG 530B's head size, which 256 would pad with 60% more products;
 * and the dK/dV kernel's accumulators, D floats a lane, fit the registers
 * at 160 (no spills) where at 256 they spill. ptxas -v (CUDA 13, -O3) with
 * the documents' per-row starts: k_flash_bwd_kv<·,160,4> uses 253/254
 * registers (bf16, sm_80/sm_90; 254/254 before them) and 244/244 (fp16;
 * 244/242 before), no spill stores or loads (the bf16 build's 16-byte
 * stack frame was there before them too); <·,256,2> spills 356-576 bytes.
 * Row work on a
 * warp's 16 × R scores goes through shared memory, a lane pair per row.
 *
 * Forward (k_flash_fwd): two sweeps over the key tiles up to the diagonal:
 * the first finds each row's max and sum (online), so lse; the second
 * forms P = exp(s - lse) exactly normalised, drops it out, rounds it to the
 * 16-bit type and accumulates P·V in fragments. The extra Q·Kᵀ costs a
 * third more forward matmuls but needs no rescaling of the output rows,
 * whose fragment layout is the hardware's own; and the backward recomputes
 * the same P from lse.
 *
 * Backward, deterministic (no atomics): k_flash_dot writes FlashAttention's
 * D = rowsum(dout ∘ out) per row; k_flash_bwd_kv, per key tile, sweeps the
 * query tiles from the diagonal on and accumulates dV += Pdᵀ·dO and dK +=
 * dSᵀ·Q; k_flash_bwd_q, per query tile, sweeps the key tiles up to the
 * diagonal and accumulates dQ += dS·K. With dP = dO·Vᵀ and m the dropout
 * scale, dS = P ∘ (dP·m - D)·scale; Pd, dO and dS are rounded to the 16-bit
 * type for their products. Each block adds its finished rows into dqkv.
 *
 * Documents (doc_start, Megatron's --reset-attention-mask): a row t sees
 * keys doc_start[t]..t only, and the starts never decrease along t, so a
 * query tile's first row has the smallest: key tiles wholly before it are
 * not swept (forward, dQ), and a key tile's sweep of the query tiles ends
 * at the first tile whose first row starts past the key tile (dK/dV). In
 * a tile that is swept, the keys before a row's start count as the keys
 * past its diagonal do (no score, probability 0, dS 0); every row keeps
 * its own key, so no row is ever wholly masked.
 */
#include <float.h>
#include <math.h>

#include "cuda_backend.h"
#include "cuda_impl.h"
#include "half.h"
#include "mtmath.h"

extern "C" {
#include "err.h"
}

using namespace nvcuda;

#define FULL_MASK 0xffffffffu

template <int FP16> struct elem { typedef __nv_bfloat16 t; };
template <> struct elem<1> { typedef __half t; };

/* Shared memory of a block (W warps, padded head width D), in bytes, each
 * region a multiple of 128. Row strides pad by a multiple wmma takes (8
 * 16-bit elements, 4 floats), which also staggers the banks of a warp's
 * row loops. */
#define LDE(D) ((D) + 8)      /* 16-bit Q/K/V/dO tiles, R rows */
#define LDS(W) (16 * (W) + 4) /* fp32 scores of a warp, 16 rows */
#define LDP(W) (16 * (W) + 8) /* 16-bit probabilities (or dS) of a warp, 16 rows */
#define LDO(D) ((D) + 4)      /* fp32 output staging of a warp, 16 rows */
#define LDC 20                /* fp32 16 × 16 block of a warp's scores (the backward) */
static size_t tile_bytes(int D, int W) { return (size_t)16 * W * LDE(D) * 2; }
static size_t scores_bytes(int W) { return (size_t)W * 16 * LDS(W) * 4; }
static size_t probs_bytes(int W) { return (size_t)W * 16 * LDP(W) * 2; }
static size_t fwd_smem(int D, int W) {
  return 3 * tile_bytes(D, W) + scores_bytes(W) + probs_bytes(W);
}
/* The backward holds a warp's scores and dP a 16 × 16 block at a time
 * (fp32), and its two 16-bit products' operands whole: at head size 160
 * 115,200 bytes, under half an H100/H200 SM's 233,472 less 1 KB a block,
 * so two blocks share an SM (with whole fp32 rows it took 130,560: one). */
static size_t bwd_smem(int D, int W) {
  return 4 * tile_bytes(D, W) + 2 * (size_t)W * 16 * LDC * 4 + 2 * probs_bytes(W) +
         2 * (size_t)16 * W * 4;
}

/* 16 bytes from src (NULL: zeros) to dst, both 16-byte aligned: one vector
 * load and store on a GPU */
static __device__ __forceinline__ void copy16(void *dst, const void *src) {
#ifdef MT_CUDA_EMU
  if (src)
    memcpy(dst, src, 16);
  else
    memset(dst, 0, 16);
#else
  *(uint4 *)dst = src ? *(const uint4 *)src : make_uint4(0, 0, 0, 0);
#endif
}

/* rows 0..R-1 of a tile from src (row 0 of the tile, element 0 of the head;
 * row stride ld): rows at or past `valid` and columns at or past HS are 0.
 * Eight elements at a time where HS and src allow (16-byte rows). */
template <int D>
static __device__ void load_tile(uint16_t *dst, const uint16_t *src, int R, int valid, int HS,
                                 size_t ld) {
  if (HS % 8 == 0 && ld % 8 == 0 && (uintptr_t)src % 16 == 0) {
    for (int i = threadIdx.x; i < R * (D / 8); i += blockDim.x) {
      int r = i / (D / 8), c = i % (D / 8) * 8;
      copy16(dst + r * LDE(D) + c, r < valid && c < HS ? src + (size_t)r * ld + c : NULL);
    }
    return;
  }
  for (int i = threadIdx.x; i < R * D; i += blockDim.x) {
    int r = i / D, c = i % D;
    dst[r * LDE(D) + c] = r < valid && c < HS ? src[(size_t)r * ld + c] : (uint16_t)0;
  }
}

/* the same from fp32 (dout, row stride ld), rounded to the 16-bit type;
 * four at a time where HS and src allow */
template <int D, int FP16>
static __device__ void load_tile_f32(uint16_t *dst, const float *src, int R, int valid, int HS,
                                     size_t ld) {
  if (HS % 4 == 0 && ld % 4 == 0 && (uintptr_t)src % 16 == 0) {
    for (int i = threadIdx.x; i < R * (D / 4); i += blockDim.x) {
      int r = i / (D / 4), c = i % (D / 4) * 4;
      float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      if (r < valid && c < HS) {
#ifdef MT_CUDA_EMU
        memcpy(v, src + (size_t)r * ld + c, 16);
#else
        float4 f = *(const float4 *)(src + (size_t)r * ld + c);
        v[0] = f.x, v[1] = f.y, v[2] = f.z, v[3] = f.w;
#endif
      }
      for (int k = 0; k < 4; k++) dst[r * LDE(D) + c + k] = mt_half_pack(v[k], FP16);
    }
    return;
  }
  for (int i = threadIdx.x; i < R * D; i += blockDim.x) {
    int r = i / D, c = i % D;
    dst[r * LDE(D) + c] = r < valid && c < HS ? mt_half_pack(src[(size_t)r * ld + c], FP16) : 0;
  }
}

/* S(16 × 16, ld lds) = A(16 × D) · Bᵀ, A a warp's 16 rows of a tile and
 * B 16 rows of a tile, both ld LDE(D): one block of scores. */
template <int FP16, int D>
static __device__ void warp_score_block(float *S, int lds, const uint16_t *A, const uint16_t *B) {
  typedef typename elem<FP16>::t E;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.0f);
  for (int kk = 0; kk < D / 16; kk++) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::row_major> a;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::col_major> b;
    wmma::load_matrix_sync(a, (const E *)(A + 16 * kk), LDE(D));
    wmma::load_matrix_sync(b, (const E *)(B + 16 * kk), LDE(D));
    wmma::mma_sync(acc, a, b, acc);
  }
  wmma::store_matrix_sync(S, acc, lds, wmma::mem_row_major);
}

/* S(16 × R, ld LDS) = A(16 × D) · Bᵀ, B a whole tile (R rows): the scores
 * of a warp's rows against the other side's tile, a block at a time. */
template <int FP16, int D, int W>
static __device__ void warp_scores(float *S, const uint16_t *A, const uint16_t *B) {
  for (int c = 0; c < W; c++) /* R / 16 = W column blocks */
    warp_score_block<FP16, D>(S + 16 * c, LDS(W), A, B + 16 * c * LDE(D));
}

/* acc[n] (16 × D in D/16 fragments) += P(16 × R, ld LDP(W), 16-bit) · B(R × D) */
template <int FP16, int D, int W>
static __device__ void warp_accumulate(wmma::fragment<wmma::accumulator, 16, 16, 16, float> *acc,
                                       const uint16_t *P, const uint16_t *B) {
  typedef typename elem<FP16>::t E;
  for (int kk = 0; kk < W; kk++) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::row_major> a;
    wmma::load_matrix_sync(a, (const E *)(P + 16 * kk), LDP(W));
    for (int n = 0; n < D / 16; n++) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::row_major> b;
      wmma::load_matrix_sync(b, (const E *)(B + 16 * kk * LDE(D) + 16 * n), LDE(D));
      wmma::mma_sync(acc[n], a, b, acc[n]);
    }
  }
}

/* One output value: added to or written into a float, or rounded into a
 * 16-bit one (bf16, or binary16 when fp16) */
static __device__ __forceinline__ void put_out(float *o, float v, int add, int) {
  *o = add ? *o + v : v;
}
static __device__ __forceinline__ void put_out(uint16_t *o, float v, int, int fp16) {
  *o = mt_half_pack(v, fp16);
}

/* A warp's D/16 accumulators, rows row0.. of the head (16 of them, those
 * under T), written (ADD: added) into dst (row 0 of the head, row stride
 * ld; floats, or 16-bit values of FP16's type, written) through the staging
 * st (16 × LDO(D) floats). */
template <int D, int ADD, int FP16 = 0, class O = float>
static __device__ void warp_rows_out(O *dst, size_t ld, float *st,
                                     wmma::fragment<wmma::accumulator, 16, 16, 16, float> *acc,
                                     int row0, int T, int HS) {
  int lane = threadIdx.x % 32;
  for (int n = 0; n < D / 16; n++)
    wmma::store_matrix_sync(st + 16 * n, acc[n], LDO(D), wmma::mem_row_major);
  __syncwarp();
  for (int i = lane; i < 16 * HS; i += 32) {
    int r = i / HS, c = i % HS;
    if (row0 + r >= T) continue;
    put_out(dst + (size_t)(row0 + r) * ld + c, st[r * LDO(D) + c], ADD, FP16);
  }
  __syncwarp();
}

/* The dropout scales of elements (t1, t2 .. t2 + 3) of head h (ops.h's
 * index), t2 a multiple of 4, into keep (1s without dropout): where T is a
 * multiple of 4 they are one Philox block (mtmath.h: the same bits as
 * element by element), drawn once, where element by element costs a whole
 * block per value. Keys past t1 (masked: causal) are not drawn, but for
 * a block partly under the diagonal, nor is a query past the sequence
 * (t1 >= T: never stored). Every pass draws its scales this way. */
static __device__ __forceinline__ void drop_scale4(float keep[4], float p, uint64_t key,
                                                   uint64_t sample, uint32_t head, int T, int t1,
                                                   int t2) {
  uint64_t e = ((uint64_t)head * T + t1) * T + t2;
  if (p > 0.0f && T % 4 == 0 && t2 <= t1 && t1 < T) {
    mt_philox_out blk = mt_philox_block(key, sample, e >> 2);
    for (int u = 0; u < 4; u++) keep[u] = mt_dropout_keep(p, blk.v[u]);
  } else {
    for (int u = 0; u < 4; u++)
      keep[u] = p > 0.0f && t2 + u <= t1 && t1 < T ? mt_dropout_scale(p, key, sample, e + u) : 1.0f;
  }
}

/* grid (query tiles, NH, B), 32·W threads; the last query tile (the most
 * key tiles under the causal mask) in block 0: blocks start in index order,
 * so the longest go first and the short ones fill the last wave, as in
 * FlashAttention (in order, the last wave was the heads' longest tiles,
 * with most SMs idle under it) */
template <int FP16, int D, int W>
static __global__ void k_flash_fwd(uint16_t *out, float *lse, const uint16_t *qkv, int T, int C,
                                   int NH, float scale, float p, uint64_t key, uint64_t sample0,
                                   uint32_t head0, const int32_t *docs) {
  const int R = 16 * W;
  MT_DYN_SMEM(smem);
  uint16_t *Qs = (uint16_t *)smem, *Ks = Qs + R * LDE(D), *Vs = Ks + R * LDE(D);
  float *Ss = (float *)(Vs + R * LDE(D));
  uint16_t *Ps = (uint16_t *)(Ss + W * 16 * LDS(W));
  int qt = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z, HS = C / NH;
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32, q0 = qt * R;
  size_t ld = 3 * (size_t)C;
  const uint16_t *head = qkv + (size_t)b * T * ld + (size_t)h * HS;
  float *Sw = Ss + warp * 16 * LDS(W);
  uint16_t *Pw = Ps + warp * 16 * LDP(W);
  /* the lane pair of row rr: query tq, the lanes on even and odd columns
   * (sweep 2: on alternate runs of 4 columns) */
  int rr = lane >> 1, j0 = lane & 1, tq = q0 + 16 * warp + rr;
  const float *srow = Sw + rr * LDS(W);
  uint64_t sample = sample0 + (uint64_t)b;
  /* the row's first key (its document's start) and the first key tile any
   * row of the tile sees */
  const int32_t *ds = docs ? docs + (size_t)b * T : NULL;
  int ts = ds && tq < T ? ds[tq] : 0, kt0 = ds ? ds[q0] / R : 0;

  load_tile<D>(Qs, head + (size_t)q0 * ld, R, T - q0, HS, ld);
  const uint16_t *Qw = Qs + 16 * warp * LDE(D);

  /* sweep 1: the row's max m and sum l of exp(s - m), online */
  float m = -FLT_MAX, l = 0.0f;
  for (int kt = kt0; kt <= qt; kt++) {
    __syncthreads(); /* Ks free */
    load_tile<D>(Ks, head + C + (size_t)kt * R * ld, R, T - kt * R, HS, ld);
    __syncthreads();
    warp_scores<FP16, D, W>(Sw, Qw, Ks);
    __syncwarp();
    float tm = -FLT_MAX;
    for (int j = j0; j < R; j += 2)
      if (kt * R + j <= tq && kt * R + j >= ts) tm = fmaxf(tm, srow[j] * scale);
    tm = fmaxf(tm, __shfl_xor_sync(FULL_MASK, tm, 1));
    float mn = fmaxf(m, tm), s = 0.0f;
    for (int j = j0; j < R; j += 2)
      if (kt * R + j <= tq && kt * R + j >= ts) s += expf(srow[j] * scale - mn);
    s += __shfl_xor_sync(FULL_MASK, s, 1);
    l = l * expf(m - mn) + s;
    m = mn;
    __syncwarp(); /* every lane has read Sw */
  }
  float lse_r = m + logf(l);
  if (!(lane & 1) && tq < T) lse[((size_t)b * NH + h) * T + tq] = lse_r;

  /* sweep 2: O = Σ drop(exp(s - lse)) · V */
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> o[D / 16];
  for (int n = 0; n < D / 16; n++) wmma::fill_fragment(o[n], 0.0f);
  for (int kt = kt0; kt <= qt; kt++) {
    __syncthreads();
    load_tile<D>(Ks, head + C + (size_t)kt * R * ld, R, T - kt * R, HS, ld);
    load_tile<D>(Vs, head + 2 * C + (size_t)kt * R * ld, R, T - kt * R, HS, ld);
    __syncthreads();
    warp_scores<FP16, D, W>(Sw, Qw, Ks);
    __syncwarp();
    /* the lane pair takes runs of 4 keys in turn: one Philox block a run */
    for (int j4 = 4 * j0; j4 < R; j4 += 8) {
      float keep[4];
      drop_scale4(keep, p, key, sample, head0 + h, T, tq, kt * R + j4);
      for (int u = 0; u < 4; u++) {
        int j = j4 + u;
        int in = kt * R + j <= tq && kt * R + j >= ts;
        float pv = in ? expf(srow[j] * scale - lse_r) * keep[u] : 0.0f;
        Pw[rr * LDP(W) + j] = mt_half_pack(pv, FP16);
      }
    }
    __syncwarp();
    warp_accumulate<FP16, D, W>(o, Pw, Vs);
  }
  __syncthreads(); /* Qs and Ks become the output's staging */
  warp_rows_out<D, 0, FP16>(out + (size_t)b * T * C + (size_t)h * HS, C,
                            (float *)smem + warp * 16 * LDO(D), o, q0 + 16 * warp, T, HS);
}

/* dv[(b, h, t)] (rows of the group b0.., (Bg, NH, T)) = Σ_c dout·out over
 * the head; grid (T, Bg), a warp per head in turn */
template <int FP16>
static __global__ void k_flash_dot(float *dv, const float *dout, const uint16_t *out, int T, int C,
                                   int NH, int b0) {
  int t = blockIdx.x, bg = blockIdx.y, HS = C / NH;
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nw = blockDim.x / 32;
  size_t row = ((size_t)(b0 + bg) * T + t) * C;
  for (int h = warp; h < NH; h += nw) {
    float s = 0.0f;
    for (int c = lane; c < HS; c += 32)
      s += dout[row + (size_t)h * HS + c] * mt_half_unpack(out[row + (size_t)h * HS + c], FP16);
    for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(FULL_MASK, s, o);
    if (lane == 0) dv[((size_t)bg * NH + h) * T + t] = s;
  }
}

/* The backward's shared memory: K, V, Q and dO tiles, a warp's 16 × 16
 * block of scores and of dP (fp32), its 16-bit products' operands (P
 * dropped and dS: dK/dV; dS: dQ), lse and D of the query tile. */
struct bwd_smem_of {
  uint16_t *Ks, *Vs, *Qs, *dOs, *Pw, *dSw;
  float *Sc, *dPc, *lse_s, *D_s;
};
template <int D, int W> static __device__ bwd_smem_of bwd_layout(unsigned char *smem, int warp) {
  const int R = 16 * W;
  bwd_smem_of s;
  s.Ks = (uint16_t *)smem;
  s.Vs = s.Ks + R * LDE(D);
  s.Qs = s.Vs + R * LDE(D);
  s.dOs = s.Qs + R * LDE(D);
  float *Ss = (float *)(s.dOs + R * LDE(D)), *dPs = Ss + W * 16 * LDC;
  uint16_t *Ps = (uint16_t *)(dPs + W * 16 * LDC), *dSs = Ps + W * 16 * LDP(W);
  s.Sc = Ss + warp * 16 * LDC;
  s.dPc = dPs + warp * 16 * LDC;
  s.Pw = Ps + warp * 16 * LDP(W);
  s.dSw = dSs + warp * 16 * LDP(W);
  s.lse_s = (float *)(dSs + W * 16 * LDP(W));
  s.D_s = s.lse_s + R;
  return s;
}

/* The query tile q0.. of head h into Qs, dOs (rounded), lse_s and D_s
 * (rows past T: zero). */
template <int FP16, int D, int W>
static __device__ void load_query_tile(const bwd_smem_of &s, const uint16_t *head, size_t ld,
                                       const float *g, int C, const float *lse_h, const float *dv_h,
                                       int q0, int T, int HS) {
  const int R = 16 * W;
  load_tile<D>(s.Qs, head + (size_t)q0 * ld, R, T - q0, HS, ld);
  load_tile_f32<D, FP16>(s.dOs, g + (size_t)q0 * C, R, T - q0, HS, C);
  for (int r = threadIdx.x; r < R; r += blockDim.x) {
    s.lse_s[r] = q0 + r < T ? lse_h[q0 + r] : 0.0f;
    s.D_s[r] = q0 + r < T ? dv_h[q0 + r] : 0.0f;
  }
}

/* The backward kernels' arguments: samples b0.. (dv holds their D rows,
 * (Bg, NH, T)), the dropout as mt_dropout's fields (p 0: none). */
struct bwd_args {
  void *dqkv; /* fp32, added into; or (half_out) qkv's 16-bit type, written */
  int half_out;
  const float *dout;
  const uint16_t *qkv;
  const float *lse, *dv;
  int T, C, NH, b0;
  float scale, p;
  uint64_t key, sample0;
  uint32_t head0;
  const int32_t *docs; /* (B,T) document starts; NULL: none */
};

/* Where a backward block works: head h of sample b (the group's bg-th),
 * the first row t0 of its tile (keys or queries), pointers at row 0 of the
 * head in qkv, dout (g), dqkv, lse and D, and its shared memory. */
struct bwd_block {
  int t0, h, bg, b, HS, warp, lane;
  size_t ld; /* qkv's and dqkv's row stride */
  const uint16_t *head;
  const float *g, *lse_h, *dv_h;
  size_t dhead; /* element offset of the head's row 0 in dqkv */
  uint64_t sample;
  const int32_t *ds; /* the sample's T document starts; NULL: none */
  bwd_smem_of s;
};

/* last_first: block 0 takes the last tile (dQ: the query tile with the most
 * key tiles to sweep; the dK/dV kernel's heaviest, key tile 0, is first as
 * it is), so the longest blocks start first, as in k_flash_fwd */
template <int D, int W>
static __device__ bwd_block bwd_block_of(const bwd_args &a, unsigned char *smem, int last_first) {
  bwd_block k;
  int tile = last_first ? (int)gridDim.x - 1 - (int)blockIdx.x : (int)blockIdx.x;
  k.t0 = tile * 16 * W, k.h = blockIdx.y, k.bg = blockIdx.z, k.b = a.b0 + k.bg;
  k.HS = a.C / a.NH, k.warp = threadIdx.x / 32, k.lane = threadIdx.x % 32;
  k.ld = 3 * (size_t)a.C;
  k.head = a.qkv + (size_t)k.b * a.T * k.ld + (size_t)k.h * k.HS;
  k.dhead = (size_t)k.b * a.T * k.ld + (size_t)k.h * k.HS;
  k.g = a.dout + (size_t)k.b * a.T * a.C + (size_t)k.h * k.HS;
  k.lse_h = a.lse + ((size_t)k.b * a.NH + k.h) * a.T;
  k.dv_h = a.dv + ((size_t)k.bg * a.NH + k.h) * a.T;
  k.sample = a.sample0 + (uint64_t)k.b;
  k.ds = a.docs ? a.docs + (size_t)k.b * a.T : NULL;
  k.s = bwd_layout<D, W>(smem, k.warp);
  return k;
}

/* A warp's finished gradient rows (16 from row0, columns col.. of the
 * head's dqkv rows): added into fp32, or written in the 16-bit type */
template <int FP16, int D>
static __device__ void grad_rows_out(const bwd_args &a, const bwd_block &k, size_t col, float *st,
                                     wmma::fragment<wmma::accumulator, 16, 16, 16, float> *acc,
                                     int row0) {
  if (a.half_out)
    warp_rows_out<D, 0, FP16>((uint16_t *)a.dqkv + k.dhead + col, k.ld, st, acc, row0, a.T, k.HS);
  else
    warp_rows_out<D, 1>((float *)a.dqkv + k.dhead + col, k.ld, st, acc, row0, a.T, k.HS);
}

/* grid (key tiles, NH, Bg), 32·W threads: dK and dV of R keys */
template <int FP16, int D, int W> static __global__ void k_flash_bwd_kv(bwd_args a) {
  const int R = 16 * W;
  MT_DYN_SMEM(smem);
  bwd_block k = bwd_block_of<D, W>(a, smem, 0);
  const bwd_smem_of &s = k.s;
  int T = a.T, C = a.C, k0 = k.t0, nt = (T + R - 1) / R;
  /* a lane's run of 4 key rows r4 .. r4 + 3 (keys tk4 ..: one Philox
   * block of dropout a query, as the forward draws them), columns c and
   * c + 8 of each block of 16 queries */
  int r4 = 4 * (k.lane & 3), c = k.lane >> 2, tk4 = k0 + 16 * k.warp + r4;

  load_tile<D>(s.Ks, k.head + C + (size_t)k0 * k.ld, R, T - k0, k.HS, k.ld);
  load_tile<D>(s.Vs, k.head + 2 * C + (size_t)k0 * k.ld, R, T - k0, k.HS, k.ld);
  const uint16_t *Kw = s.Ks + 16 * k.warp * LDE(D), *Vw = s.Vs + 16 * k.warp * LDE(D);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> dk[D / 16], dvv[D / 16];
  for (int n = 0; n < D / 16; n++) {
    wmma::fill_fragment(dk[n], 0.0f);
    wmma::fill_fragment(dvv[n], 0.0f);
  }
  for (int q0 = k0; q0 < nt * R; q0 += R) {
    /* this query tile's rows, and every later tile's, start past these keys */
    if (k.ds && k.ds[q0] >= k0 + R) break;
    __syncthreads(); /* Qs, dOs free */
    load_query_tile<FP16, D, W>(s, k.head, k.ld, k.g, C, k.lse_h, k.dv_h, q0, T, k.HS);
    __syncthreads();
    for (int cb = 0; cb < R; cb += 16) { /* Sᵀ and dPᵀ 16 queries at a time */
      warp_score_block<FP16, D>(s.Sc, LDC, Kw, s.Qs + cb * LDE(D));   /* Sᵀ: keys × queries */
      warp_score_block<FP16, D>(s.dPc, LDC, Vw, s.dOs + cb * LDE(D)); /* dPᵀ = V·dOᵀ */
      __syncwarp();
      for (int j = c; j < 16; j += 8) {
        int tq = q0 + cb + j, ts = k.ds && tq < T ? k.ds[tq] : 0;
        float keep[4];
        drop_scale4(keep, a.p, a.key, k.sample, a.head0 + k.h, T, tq, tk4);
        for (int u = 0; u < 4; u++) {
          int r = r4 + u;
          float pf = 0.0f, ds = 0.0f, m = 1.0f;
          if (tq >= tk4 + u && tq < T && tk4 + u >= ts) {
            pf = expf(s.Sc[r * LDC + j] * a.scale - s.lse_s[cb + j]);
            m = keep[u];
            ds = pf * (s.dPc[r * LDC + j] * m - s.D_s[cb + j]) * a.scale;
          }
          s.Pw[r * LDP(W) + cb + j] = mt_half_pack(pf * m, FP16);
          s.dSw[r * LDP(W) + cb + j] = mt_half_pack(ds, FP16);
        }
      }
      __syncwarp(); /* every lane has read the block */
    }
    warp_accumulate<FP16, D, W>(dvv, s.Pw, s.dOs); /* dV += Pdᵀ·dO */
    warp_accumulate<FP16, D, W>(dk, s.dSw, s.Qs);  /* dK += dSᵀ·Q */
  }
  __syncthreads(); /* Qs and dOs become the staging */
  float *st = (float *)s.Qs + k.warp * 16 * LDO(D);
  grad_rows_out<FP16, D>(a, k, C, st, dk, k0 + 16 * k.warp);
  grad_rows_out<FP16, D>(a, k, 2 * (size_t)C, st, dvv, k0 + 16 * k.warp);
}

/* grid (query tiles, NH, Bg), 32·W threads: dQ of R queries, the last tile first */
template <int FP16, int D, int W> static __global__ void k_flash_bwd_q(bwd_args a) {
  const int R = 16 * W;
  MT_DYN_SMEM(smem);
  bwd_block k = bwd_block_of<D, W>(a, smem, 1);
  const bwd_smem_of &s = k.s;
  int T = a.T, C = a.C, q0 = k.t0;
  /* the lane pair of query row rr (tile row 16·warp + rr): query tq, key
   * columns in runs of 4 from 4·j0, every 8 */
  int rr = k.lane >> 1, j0 = k.lane & 1, row = 16 * k.warp + rr, tq = q0 + row;
  int ts = k.ds && tq < T ? k.ds[tq] : 0; /* the row's first key */

  load_query_tile<FP16, D, W>(s, k.head, k.ld, k.g, C, k.lse_h, k.dv_h, q0, T, k.HS);
  const uint16_t *Qw = s.Qs + 16 * k.warp * LDE(D), *dOw = s.dOs + 16 * k.warp * LDE(D);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> dq[D / 16];
  for (int n = 0; n < D / 16; n++) wmma::fill_fragment(dq[n], 0.0f);
  /* from the key tile of the tile's first row's start */
  for (int k0 = k.ds ? k.ds[q0] / R * R : 0; k0 <= q0; k0 += R) {
    __syncthreads(); /* Ks, Vs free; the query tile loaded */
    load_tile<D>(s.Ks, k.head + C + (size_t)k0 * k.ld, R, T - k0, k.HS, k.ld);
    load_tile<D>(s.Vs, k.head + 2 * C + (size_t)k0 * k.ld, R, T - k0, k.HS, k.ld);
    __syncthreads();
    float l = s.lse_s[row], dd = s.D_s[row];
    for (int cb = 0; cb < R; cb += 16) {                            /* S and dP 16 keys at a time */
      warp_score_block<FP16, D>(s.Sc, LDC, Qw, s.Ks + cb * LDE(D)); /* S: queries × keys */
      warp_score_block<FP16, D>(s.dPc, LDC, dOw, s.Vs + cb * LDE(D)); /* dP = dO·Vᵀ */
      __syncwarp();
      const float *srow = s.Sc + rr * LDC, *prow = s.dPc + rr * LDC;
      for (int j4 = 4 * j0; j4 < 16; j4 += 8) { /* runs of 4 keys, as the forward's */
        float keep[4];
        drop_scale4(keep, a.p, a.key, k.sample, a.head0 + k.h, T, tq, k0 + cb + j4);
        for (int u = 0; u < 4; u++) {
          int j = j4 + u;
          float ds = 0.0f;
          if (k0 + cb + j <= tq && tq < T && k0 + cb + j >= ts) {
            float pf = expf(srow[j] * a.scale - l);
            ds = pf * (prow[j] * keep[u] - dd) * a.scale;
          }
          s.Pw[rr * LDP(W) + cb + j] = mt_half_pack(ds, FP16);
        }
      }
      __syncwarp(); /* every lane has read the block */
    }
    warp_accumulate<FP16, D, W>(dq, s.Pw, s.Ks); /* dQ += dS·K */
  }
  __syncthreads();
  float *st = (float *)s.Qs + k.warp * 16 * LDO(D);
  grad_rows_out<FP16, D>(a, k, 0, st, dq, q0 + 16 * k.warp);
}

/* ---- host side ------------------------------------------------------------ */

/* Whether k may take smem bytes of dynamic shared memory on this GPU: the
 * backward at head sizes 129..160 takes 115,200 bytes, which an A100 or
 * H100 gives a block and an sm_86/sm_89 part (A10, A40, L40S: 99 KB) does not.
 * Refused with the figures rather than launched to fail unexplained. */
template <class K>
static int smem_ok(mt_device *d, mt__cuda *c, K *k, size_t smem, int D, const char *what) {
  char msg[256];
  if (smem > (size_t)c->smem_optin) {
    snprintf(
        msg, sizeof msg,
        "head sizes up to %d need %zu bytes of shared memory per block, this GPU allows %d; use "
        "fp32 attention (train.precision fp32) or a GPU with more (A100, H100)",
        D, smem, c->smem_optin);
    mt__cuda_fail(d, what, msg);
    return 0;
  }
  cudaError_t e = cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (e != cudaSuccess) {
    snprintf(msg, sizeof msg, "allowing %zu bytes of shared memory: %s", smem,
             cudaGetErrorString(e));
    mt__cuda_fail(d, what, msg);
    return 0;
  }
  /* the SM's whole shared memory for k's blocks, as a hint: two backward
   * blocks at head size 160 fit an H100/H200 SM only in its largest split
   * (2 x (115,200 + 1,024) of 233,472 bytes) */
  if (cudaFuncSetAttribute(k, cudaFuncAttributePreferredSharedMemoryCarveout,
                           cudaSharedmemCarveoutMaxShared) != cudaSuccess)
    cudaGetLastError(); /* a hint refused: the launch still runs */
  return 1;
}

/* The forward kernel's type (k_flash_fwd<FP16, D, W>) */
typedef void flash_fwd_kernel(uint16_t *, float *, const uint16_t *, int, int, int, float, float,
                              uint64_t, uint64_t, uint32_t, const int32_t *);

/* The kernels of one (FP16, D, W), launched with the shared memory they take. */
template <int FP16, int D, int W> struct flash {
  static void fwd(mt_device *d, uint16_t *out, float *lse, const uint16_t *qkv, int B, int T, int C,
                  int NH, float scale, const mt_dropout *drop, const int32_t *docs) {
    mt__cuda *c = mt__cuda_enter(d);
    const int R = 16 * W;
    size_t smem = fwd_smem(D, W);
    flash_fwd_kernel *flash_fwd = k_flash_fwd<FP16, D, W>;
    if (!smem_ok(d, c, flash_fwd, smem, D, "attention_fwd (flash)")) return;
    MT_LAUNCH_SMEM(flash_fwd, dim3((unsigned)((T + R - 1) / R), (unsigned)NH, (unsigned)B), 32 * W,
                   smem, c->stream)
    (out, lse, qkv, T, C, NH, scale, drop ? drop->p : 0.0f, drop ? drop->key : 0,
     drop ? drop->sample0 : 0, drop ? drop->head0 : 0, docs);
  }
  static void bwd(mt_device *d, void *dqkv, int half_out, const float *dout, const uint16_t *qkv,
                  const float *lse, const float *dv, int b0, int Bg, int T, int C, int NH,
                  float scale, const mt_dropout *drop, const int32_t *docs) {
    mt__cuda *c = mt__cuda_enter(d);
    const int R = 16 * W;
    size_t smem = bwd_smem(D, W);
    void (*flash_bwd_kv)(bwd_args) = k_flash_bwd_kv<FP16, D, W>;
    void (*flash_bwd_q)(bwd_args) = k_flash_bwd_q<FP16, D, W>;
    if (!smem_ok(d, c, flash_bwd_kv, smem, D, "attention_bwd (flash)") ||
        !smem_ok(d, c, flash_bwd_q, smem, D, "attention_bwd (flash)"))
      return;
    dim3 grid((unsigned)((T + R - 1) / R), (unsigned)NH, (unsigned)Bg);
    bwd_args a = {dqkv,
                  half_out,
                  dout,
                  qkv,
                  lse,
                  dv,
                  T,
                  C,
                  NH,
                  b0,
                  scale,
                  drop ? drop->p : 0.0f,
                  drop ? drop->key : 0,
                  drop ? drop->sample0 : 0,
                  drop ? drop->head0 : 0,
                  docs};
    MT_LAUNCH_SMEM(flash_bwd_kv, grid, 32 * W, smem, c->stream)(a);
    MT_LAUNCH_SMEM(flash_bwd_q, grid, 32 * W, smem, c->stream)(a);
  }
  /* blocks an SM holds of the forward, dK/dV and dQ kernels, set up as
   * their launches are */
  static int blocks(mt_device *d, int out[3]) {
#ifdef MT_CUDA_EMU
    (void)d, (void)out;
    return mt_seterr(MT_ENOTSUP, "flash occupancy: not on the emulator");
#else
    mt__cuda *c = mt__cuda_enter(d);
    flash_fwd_kernel *f = k_flash_fwd<FP16, D, W>;
    void (*kv)(bwd_args) = k_flash_bwd_kv<FP16, D, W>;
    void (*q)(bwd_args) = k_flash_bwd_q<FP16, D, W>;
    const char *what = "flash occupancy";
    if (!smem_ok(d, c, f, fwd_smem(D, W), D, what) || !smem_ok(d, c, kv, bwd_smem(D, W), D, what) ||
        !smem_ok(d, c, q, bwd_smem(D, W), D, what))
      return mt_seterr(MT_EIO, "%s", c->errmsg);
    cudaError_t e =
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&out[0], f, 32 * W, fwd_smem(D, W));
    if (e == cudaSuccess)
      e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&out[1], kv, 32 * W, bwd_smem(D, W));
    if (e == cudaSuccess)
      e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&out[2], q, 32 * W, bwd_smem(D, W));
    if (e != cudaSuccess) {
      cudaGetLastError();
      return mt_seterr(MT_EIO, "%s: %s", what, cudaGetErrorString(e));
    }
    return 0;
#endif
  }
};

/* fn(flash<FP16, D, W>()) for the kernels that take head size HS (at most
 * MT_FLASH_MAX_HS): the one place head sizes map to tile widths */
template <class Fn> static auto with_flash(int HS, int fp16, Fn fn) {
  if (HS <= 64) return fp16 ? fn(flash<1, 64, 4>()) : fn(flash<0, 64, 4>());
  if (HS <= 128) return fp16 ? fn(flash<1, 128, 4>()) : fn(flash<0, 128, 4>());
  if (HS <= 160) return fp16 ? fn(flash<1, 160, 4>()) : fn(flash<0, 160, 4>());
  return fp16 ? fn(flash<1, 256, 2>()) : fn(flash<0, 256, 2>());
}

int mt__cuda_flash_blocks_per_sm(mt_device *d, int head_size, int fp16, int blocks[3]) {
  if (head_size < 1 || head_size > MT_FLASH_MAX_HS)
    return mt_seterr(MT_EINVAL, "flash occupancy: head size %d", head_size);
  return with_flash(head_size, fp16, [&](auto f) { return f.blocks(d, blocks); });
}

static int flash_fits(mt_device *d, const char *what, int HS) {
  if (HS <= MT_FLASH_MAX_HS) return 1;
  char msg[128];
  snprintf(msg, sizeof msg, "head size %d over %d with a 16-bit qkv", HS, MT_FLASH_MAX_HS);
  mt__cuda_fail(d, what, msg);
  return 0;
}

void mt__cuda_flash_fwd(mt_device *d, uint16_t *out, float *lse, const uint16_t *qkv, mt_dtype qt,
                        int B, int T, int C, int NH, const mt_dropout *drop,
                        const int32_t *doc_start) {
  int HS = C / NH, fp16 = qt == MT_F16;
  if (drop && drop->p == 0.0f) drop = NULL;
  if (B < 1 || T < 1 || !flash_fits(d, "attention_fwd", HS)) return;
  float scale = 1.0f / sqrtf((float)HS);
  with_flash(HS, fp16,
             [&](auto f) { f.fwd(d, out, lse, qkv, B, T, C, NH, scale, drop, doc_start); });
  mt__cuda_check(d, "attention_fwd (flash)");
}

void mt__cuda_flash_bwd(mt_device *d, void *dqkv, mt_dtype gt, float *scratch,
                        size_t scratch_floats, const float *dout, const uint16_t *out,
                        const uint16_t *qkv, mt_dtype qt, const float *lse, int B, int T, int C,
                        int NH, const mt_dropout *drop, const int32_t *doc_start) {
  int HS = C / NH, fp16 = qt == MT_F16, half = gt != MT_F32;
  if (drop && drop->p == 0.0f) drop = NULL;
  if (B < 1 || T < 1 || !flash_fits(d, "attention_bwd", HS)) return;
  if (half && gt != qt) {
    char msg[128];
    snprintf(msg, sizeof msg, "a %s dqkv with a %s qkv (ops.h: fp32, or qkv's own type)",
             gt == MT_F16 ? "binary16" : "bf16", qt == MT_F16 ? "binary16" : "bf16");
    mt__cuda_fail(d, "attention_bwd", msg);
    return;
  }
  mt__cuda *c = mt__cuda_enter(d);
  float scale = 1.0f / sqrtf((float)HS);
  int per = (int)(scratch_floats / ((size_t)NH * T)); /* samples whose D fit the scratch */
  if (per < 1) {
    mt__cuda_fail(d, "attention_bwd", "scratch below one sample's rows");
    return;
  }
  for (int b0 = 0; b0 < B; b0 += per) {
    int Bg = B - b0 < per ? B - b0 : per;
    if (fp16) MT_LAUNCH(k_flash_dot<1>, dim3((unsigned)T, (unsigned)Bg), 128, c->stream)
    (scratch, dout, out, T, C, NH, b0);
    else MT_LAUNCH(k_flash_dot<0>, dim3((unsigned)T, (unsigned)Bg), 128,
                   c->stream)(scratch, dout, out, T, C, NH, b0);
    with_flash(HS, fp16, [&](auto f) {
      f.bwd(d, dqkv, half, dout, qkv, lse, scratch, b0, Bg, T, C, NH, scale, drop, doc_start);
    });
  }
  mt__cuda_check(d, "attention_bwd (flash)");
}
