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
 * at 160 (a few dozen bytes spilled in the bf16 build) where at 256 they
 * spill 0.5-0.7 KB (ptxas -v, CUDA 13, -O3: bench/RESULTS.md has every
 * kernel's registers and spills).
 *
 * Row work happens in registers, on the score fragments themselves: an
 * sm_80+ GPU places a 16 × 16 fp32 accumulator's elements as mma.m16n8k16
 * does (acc_row, acc_col below), so a lane holds two rows' elements and the
 * four lanes of a quad share those rows (a row's max and sum: two
 * shuffles). The emulator places them so too, and mt__cuda_acc_layout_check
 * proves it of each GPU when it opens (and tests/gpu/test_cuda_ops). The 16-bit
 * operands of the second products (P, dS) go through shared memory, a
 * warp's 16 rows, since wmma does not say where an operand fragment's
 * elements are; where a GPU's probe, when it opens, finds a bf16 A
 * fragment's at the accumulator's places (mma.m16n8k16's A layout), the
 * bf16 forward at 16 rows a warp and both backward kernels pass theirs in
 * registers (a_put). A warp's scores against 16·NB keys (or queries) come
 * from one pass over the head's width, loading its own operand once per
 * 16 columns for all NB blocks.
 *
 * Forward (k_flash_fwd): one sweep over the key tiles up to the diagonal,
 * FlashAttention-2's online softmax: a row's running max m and sum l of
 * exp(s - m), the output fragments rescaled by exp(m_old - m_new) as m
 * grows, P = exp(s - m) dropped out, rounded to the 16-bit type and
 * accumulated as P·V; at the end O = acc / l and lse = m + log l, from
 * which the backward recomputes the normalised P.
 *
 * Backward, deterministic (no atomics): k_flash_dot writes FlashAttention's
 * D = rowsum(dout ∘ out) per row; k_flash_bwd_kv, per key tile, sweeps the
 * query tiles from the diagonal on and accumulates dV += Pdᵀ·dO and dK +=
 * dSᵀ·Q; k_flash_bwd_q, per query tile, sweeps the key tiles up to the
 * diagonal and accumulates dQ += dS·K. With dP = dO·Vᵀ and m the dropout
 * scale, dS = P ∘ (dP·m - D)·scale; Pd, dO and dS are rounded to the 16-bit
 * type for their products: dO once, by k_flash_dot, into a 16-bit dqkv's Q
 * columns, where the dK/dV and dQ kernels load it as they load Q (an fp32
 * dqkv: as each tile loads). The dK/dV kernel loads the next query tile's
 * Q while dV accumulates (with dS and P in registers, each 16 queries'
 * products follow their scores, and Q loads during the last 16·NB's dV)
 * and its dO while the next scores start. Each
 * block adds (fp32) or writes (16-bit) its finished rows into dqkv.
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
#include "log.h"
}

using namespace nvcuda;

#define FULL_MASK 0xffffffffu
/* The small loops over fragments and their elements are unrolled (#pragma
 * unroll), so that fragment arrays stay in registers: an index known only
 * at run time puts an array in local memory. */
/* The forward's blocks an SM: 3 where its shared memory allows them (an
 * H100/H200's 228 KiB; ptxas then holds it to 168 registers a thread), 2
 * on an A100 (164 KiB), which then leaves it more registers */
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define MT_FLASH_FWD_BLOCKS 2
#else
#define MT_FLASH_FWD_BLOCKS 3
#endif

template <int FP16> struct elem { typedef __nv_bfloat16 t; };
template <> struct elem<1> { typedef __half t; };

/* Shared memory of a block (W warps, padded head width D), in bytes, each
 * region a multiple of 128. Row strides pad by a multiple wmma takes (8
 * 16-bit elements, 4 floats), which also staggers the banks of a warp's
 * row loops. */
#define LDE(D) ((D) + 8)      /* 16-bit Q/K/V/dO tiles, R rows */
#define LDP(W) (16 * (W) + 8) /* 16-bit probabilities (or dS) of a warp, 16 rows */
#define LDO(D) ((D) + 4)      /* fp32 output staging of a warp, 16 rows */
static size_t tile_bytes(int D, int W) { return (size_t)16 * W * LDE(D) * 2; }
static size_t probs_bytes(int W) { return (size_t)W * 16 * LDP(W) * 2; }
/* The forward's (MF row blocks a warp): Q (MF tiles of 16·W rows), K and V
 * tiles and the warps' P, unless P stays in registers (PR) (the output's
 * fp32 staging, W·16 × LDO(D), fits in the three tiles at every D and W
 * here) */
static size_t fwd_smem(int D, int W, int MF, int PR = 0) {
  return (size_t)(MF + 2) * tile_bytes(D, W) + (PR ? 0 : (size_t)MF * probs_bytes(W));
}
/* K, V, Q and dO tiles, the warps' two 16-bit operands, and the query
 * tile's lse, D and document starts: at head size 160 105,216 bytes,
 * under half an H100/H200 SM's 233,472 less 1 KB a block, so two blocks
 * share an SM. */
static size_t bwd_smem(int D, int W) {
  return 4 * tile_bytes(D, W) + 2 * probs_bytes(W) + 3 * (size_t)16 * W * 4;
}

/* 16 bytes from src (NULL: zeros) to dst, both 16-byte aligned: one vector
 * load and store on a GPU */
static __device__ __forceinline__ void copy16(void *dst, const void *src) {
#ifdef MT_CUDA_EMU /* aligned as a GPU's vector access must be, or the test stops */
  void *d = (void *)mt_emu::vec_at(dst, 16, "16-byte copy's destination");
  if (src)
    memcpy(d, mt_emu::vec_at(src, 16, "16-byte copy's source"), 16);
  else
    memset(d, 0, 16);
#else
  *(uint4 *)dst = src ? *(const uint4 *)src : make_uint4(0, 0, 0, 0);
#endif
}

/* cp.async (sm_80+): 16 bytes from global src to shared dst without
 * passing through registers, there once a later cp_async_wait allows and
 * shown to the block by a barrier after it; src NULL writes zeros (a
 * source size of 0 bytes reads nothing at base, any address of the
 * tensor). The emulator lands it at once, or (MT_CUDA_EMU_CP_ASYNC=late)
 * only at the wait that completes it: a read before then finds the old
 * contents. */
static __device__ __forceinline__ void copy16_async(void *dst, const void *src, const void *base) {
#ifdef MT_CUDA_EMU
  (void)base;
  mt_emu::cp_async(dst, src);
#else
  unsigned d = (unsigned)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src ? src : base),
               "r"(src ? 16 : 0)
               : "memory");
#endif
}
/* closes the copies this thread issued since its last commit into a group */
static __device__ __forceinline__ void cp_async_commit() {
#ifdef MT_CUDA_EMU
  mt_emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
/* waits until at most N of this thread's groups are in flight */
template <int N> static __device__ __forceinline__ void cp_async_wait() {
#ifdef MT_CUDA_EMU
  mt_emu::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

/* rows 0..R-1 of a tile from src (row 0 of the tile, element 0 of the head;
 * row stride ld): rows at or past `valid` and columns at or past HS are 0.
 * Eight elements at a time where HS and src allow (16-byte rows), then
 * (ASYNC) by cp.async, which the caller commits, waits for and syncs;
 * otherwise element by element, at once. */
template <int D, int ASYNC = 0>
static __device__ void load_tile(uint16_t *dst, const uint16_t *src, int R, int valid, int HS,
                                 size_t ld) {
  if (HS % 8 == 0 && ld % 8 == 0 && (uintptr_t)src % 16 == 0) {
    for (int i = threadIdx.x; i < R * (D / 8); i += blockDim.x) {
      int r = i / (D / 8), c = i % (D / 8) * 8;
      const uint16_t *from = r < valid && c < HS ? src + (size_t)r * ld + c : NULL;
      if (ASYNC)
        copy16_async(dst + r * LDE(D) + c, from, src);
      else
        copy16(dst + r * LDE(D) + c, from);
    }
    return;
  }
  for (int i = threadIdx.x; i < R * D; i += blockDim.x) {
    int r = i / D, c = i % D;
    dst[r * LDE(D) + c] = r < valid && c < HS ? src[(size_t)r * ld + c] : (uint16_t)0;
  }
}

/* v rounded to nearest even into the 16-bit type, as mt_half_pack does:
 * on a GPU by its conversion instruction (one, where half.h's portable
 * code takes a dozen integer operations, branches for binary16) */
template <int FP16> static __device__ __forceinline__ uint16_t pack16(float v) {
#ifdef MT_CUDA_EMU
  return mt_half_pack(v, FP16);
#else
  if (FP16) return __half_as_ushort(__float2half_rn(v));
  return __bfloat16_as_ushort(__float2bfloat16_rn(v));
#endif
}
/* two adjacent 16-bit values (lo first) into shared memory as one 32-bit
 * store; p 4-byte aligned */
template <int FP16>
static __device__ __forceinline__ void store_pair(uint16_t *p, float lo, float hi) {
  uint32_t w = (uint32_t)pack16<FP16>(lo) | (uint32_t)pack16<FP16>(hi) << 16;
#ifdef MT_CUDA_EMU
  memcpy((void *)mt_emu::vec_at(p, 4, "pair of 16-bit values"), &w, 4);
#else
  *(uint32_t *)p = w;
#endif
}

/* load_tile from fp32 (dout, row stride ld), rounded to the 16-bit type;
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
        memcpy(v, mt_emu::vec_at(src + (size_t)r * ld + c, 16, "float4"), 16);
#else
        float4 f = *(const float4 *)(src + (size_t)r * ld + c);
        v[0] = f.x, v[1] = f.y, v[2] = f.z, v[3] = f.w;
#endif
      }
      for (int k = 0; k < 4; k++) dst[r * LDE(D) + c + k] = pack16<FP16>(v[k]);
    }
    return;
  }
  for (int i = threadIdx.x; i < R * D; i += blockDim.x) {
    int r = i / D, c = i % D;
    dst[r * LDE(D) + c] = r < valid && c < HS ? pack16<FP16>(src[(size_t)r * ld + c]) : 0;
  }
}

typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc_frag;
/* a bf16 operand of the second products (P, dS) as the A of 16 × 16 × 16 */
typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a16_frag;

/* Element i (0..7) of a lane's 16 × 16 fp32 accumulator: row lane/4, + 8
 * for elements 2, 3, 6 and 7; column 2·(lane%4) + i%2, + 8 for elements
 * 4..7 (on sm_80 and later wmma's m16n16k16 accumulator is two of the PTX
 * ISA's mma.m16n8k16 "C" fragments, columns 0-7 then 8-15). */
static __device__ __forceinline__ int acc_row(int lane, int i) {
  return (lane >> 2) + 8 * ((i >> 1) & 1);
}
static __device__ __forceinline__ int acc_col(int lane, int i) {
  return 2 * (lane & 3) + (i & 1) + 8 * (i >> 2);
}

/* Element i of a bf16 A fragment: v rounded to nearest even (pack16's
 * bits), held at the accumulator's element i's place, (acc_row, acc_col),
 * where mma.m16n8k16 holds A's. Used only where the device's probe found
 * a matrix_a fragment laid out so (mt__cuda's a_layout): the 16-bit
 * operand of a second product then goes from the score fragments that
 * make it to the product in registers, not through shared memory. Its
 * values are the same bits either way, and so are the products. */
static __device__ __forceinline__ void a_put(a16_frag &f, int i, float v) {
#ifdef MT_CUDA_EMU
  f.x[i] = mt_half_unpack(pack16<0>(v), 0);
#else
  static_assert(a16_frag::num_elements == 8, "a bf16 matrix_a fragment of 8 elements a lane");
  f.x[i] = __float2bfloat16_rn(v);
#endif
}

/* 2^x in one instruction on a GPU (ex2.approx.ftz: relative error about
 * 2^-22, results under 2^-126 flushed to 0; -inf gives 0), where expf
 * takes about eight. The row work takes its exponentials base 2, with
 * log2(e) folded into the softmax scale (one FFMA before each), as
 * FlashAttention does: with a few instructions an element besides, they
 * were most of its cost. */
#define MT_LOG2E 1.4426950408889634f
static __device__ __forceinline__ float exp2_fast(float x) {
#ifdef MT_CUDA_EMU
  return exp2f(x);
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#endif
}

/* The two rows a lane holds (0: acc_row's lane/4, 1: 8 below) reduced over
 * the quad that shares them */
static __device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, 1));
  return fmaxf(v, __shfl_xor_sync(FULL_MASK, v, 2));
}
static __device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(FULL_MASK, v, 1);
  return v + __shfl_xor_sync(FULL_MASK, v, 2);
}

/* S[c] (c < NB, 16 × 16 each) = A(16 × D) · B_cᵀ, A a warp's 16 rows of a
 * tile, B_c the 16 rows from B + 16·c·LDE(D), both ld LDE(D): A's fragment
 * loaded once per 16 columns of the head for all NB blocks. */
template <int FP16, int D, int NB>
static __device__ void warp_scores(acc_frag *S, const uint16_t *A, const uint16_t *B) {
  typedef typename elem<FP16>::t E;
#pragma unroll
  for (int c = 0; c < NB; c++) wmma::fill_fragment(S[c], 0.0f);
#pragma unroll
  for (int kk = 0; kk < D / 16; kk++) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::row_major> a;
    wmma::load_matrix_sync(a, (const E *)(A + 16 * kk), LDE(D));
#pragma unroll
    for (int c = 0; c < NB; c++) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::col_major> b;
      wmma::load_matrix_sync(b, (const E *)(B + 16 * c * LDE(D) + 16 * kk), LDE(D));
      wmma::mma_sync(S[c], a, b, S[c]);
    }
  }
}

/* acc[f·D/16 + n] (f < MF; 16 × D each in D/16 fragments) += P_f(16 × R,
 * 16-bit, from P + 16·f·LDP(W), ld LDP(W)) · B(R × D): each fragment of B
 * loaded once for all MF row blocks */
template <int FP16, int D, int W, int MF = 1>
static __device__ void warp_accumulate(acc_frag *acc, const uint16_t *P, const uint16_t *B) {
  typedef typename elem<FP16>::t E;
#pragma unroll
  for (int kk = 0; kk < W; kk++) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::row_major> a[MF];
#pragma unroll
    for (int f = 0; f < MF; f++)
      wmma::load_matrix_sync(a[f], (const E *)(P + 16 * f * LDP(W) + 16 * kk), LDP(W));
#pragma unroll
    for (int n = 0; n < D / 16; n++) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::row_major> b;
      wmma::load_matrix_sync(b, (const E *)(B + 16 * kk * LDE(D) + 16 * n), LDE(D));
#pragma unroll
      for (int f = 0; f < MF; f++)
        wmma::mma_sync(acc[f * (D / 16) + n], a[f], b, acc[f * (D / 16) + n]);
    }
  }
}

/* acc[n] (16 × D in D/16 fragments) += a(16 × 16, bf16, in registers) ·
 * B's 16 rows (ld LDE(D)): one step of warp_accumulate's sum, the 16 keys
 * of a */
template <int D>
static __device__ void warp_accumulate_a(acc_frag *acc, const a16_frag &a, const uint16_t *B) {
#pragma unroll
  for (int n = 0; n < D / 16; n++) {
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> b;
    wmma::load_matrix_sync(b, (const __nv_bfloat16 *)(B + 16 * n), LDE(D));
    wmma::mma_sync(acc[n], a, b, acc[n]);
  }
}

/* One output value: added to or written into a float, or rounded into a
 * 16-bit one (bf16, or binary16 when FP16) */
template <int FP16> static __device__ __forceinline__ void put_out(float *o, float v, int add) {
  *o = add ? *o + v : v;
}
template <int FP16> static __device__ __forceinline__ void put_out(uint16_t *o, float v, int) {
  *o = pack16<FP16>(v);
}

/* A warp's D/16 accumulators, rows row0.. of the head (16 of them, those
 * under T), written (ADD: added) into dst (row 0 of the head, row stride
 * ld; floats, or 16-bit values of FP16's type, written) through the staging
 * st (16 × LDO(D) floats). */
template <int D, int ADD, int FP16 = 0, class O = float>
static __device__ void warp_rows_out(O *dst, size_t ld, float *st, acc_frag *acc, int row0, int T,
                                     int HS) {
  int lane = threadIdx.x % 32;
#pragma unroll
  for (int n = 0; n < D / 16; n++)
    wmma::store_matrix_sync(st + 16 * n, acc[n], LDO(D), wmma::mem_row_major);
  __syncwarp();
  for (int i = lane; i < 16 * HS; i += 32) {
    int r = i / HS, c = i % HS;
    if (row0 + r >= T) continue;
    put_out<FP16>(dst + (size_t)(row0 + r) * ld + c, st[r * LDO(D) + c], ADD);
  }
  __syncwarp();
}

/* Attention dropout: element (t1, t2) of head h (ops.h's index: query t1,
 * key t2) keeps with scale mt_dropout_scale(p, key, sample, (h·T + t1)·T +
 * t2). Where T is a multiple of 4 that is value t2 % 4 of the Philox block
 * of keys t2 & ~3 (mtmath.h: the same bits), so a block drawn once serves
 * four elements, where element by element costs a whole block (about 80
 * integer operations) each. The lanes that share a block draw it once
 * between them and trade values by shuffles: all 32 lanes call these
 * (p > 0 is the same for the warp). */

/* Rows are queries (the forward, dQ): a lane's elements 2r + e of one
 * column half are keys tk0 + e (tk0 even) of rows tq[r]. Lanes l and l ^ 1
 * hold the same rows and the two halves of one run of 4 keys: each draws
 * one row's block (row l % 2) and takes the other's from its partner. */
static __device__ __forceinline__ void row_keep(float keep[2][2], float p, uint64_t key,
                                                uint64_t sample, uint32_t head, int T,
                                                const int tq[2], int tk0, int lane) {
  if (T % 4 == 0) {
    int own = lane & 1; /* the row drawn here (selected, not indexed: an index known
                           only at run time puts tq in local memory); tk0 % 4 == 2·own */
    mt_philox_out b = mt_philox_block(
        key, sample, (((uint64_t)head * T + (own ? tq[1] : tq[0])) * T + (tk0 & ~3)) >> 2);
    uint32_t x[4];
#pragma unroll
    for (int k = 0; k < 4; k++) x[k] = __shfl_xor_sync(FULL_MASK, b.v[k], 1);
    uint32_t mine[2] = {own ? b.v[2] : b.v[0], own ? b.v[3] : b.v[1]};
    uint32_t theirs[2] = {own ? x[2] : x[0], own ? x[3] : x[1]};
#pragma unroll
    for (int r = 0; r < 2; r++)
#pragma unroll
      for (int e = 0; e < 2; e++) keep[r][e] = mt_dropout_keep(p, r == own ? mine[e] : theirs[e]);
    return;
  }
#pragma unroll
  for (int r = 0; r < 2; r++)
#pragma unroll
    for (int e = 0; e < 2; e++)
      keep[r][e] =
          tk0 + e <= tq[r] && tq[r] < T
              ? mt_dropout_scale(p, key, sample, ((uint64_t)head * T + tq[r]) * T + tk0 + e)
              : 1.0f;
}

/* Rows are keys (dK/dV), a warp's 16 from tk_row0 (a multiple of 16), columns
 * queries from tq_col0: a lane's 8 elements of the block (acc_row,
 * acc_col) into keep. Element (key row g + 8r, query column c) is value g % 4
 * of its block, and the four lanes of rows 4a..4a+3 (one lane % 4) need the
 * same 8 blocks: each draws 2 and takes its values of the other 6 by
 * shuffles. */
static __device__ __forceinline__ void col_keep(float keep[8], float p, uint64_t key,
                                                uint64_t sample, uint32_t head, int T, int tk_row0,
                                                int tq_col0, int lane) {
  if (T % 4 == 0) {
    int u = (lane >> 2) & 3, quad0 = (lane & ~15) | (lane & 3); /* lane of u = 0 */
    mt_philox_out b[2]; /* elements 2u and 2u + 1's blocks */
#pragma unroll
    for (int e = 0; e < 2; e++) {
      int i = 2 * u + e, tq = tq_col0 + acc_col(lane, i);
      int run = tk_row0 + 4 * (lane >> 4) + 8 * (u & 1); /* the keys of acc_row(lane, i) & ~3 */
      b[e] = mt_philox_block(key, sample, (((uint64_t)head * T + tq) * T + run) >> 2);
    }
#pragma unroll
    for (int i = 0; i < 8; i++) {
      uint32_t v = 0;
#pragma unroll
      for (int k = 0; k < 4; k++) {
        uint32_t x = __shfl_sync(FULL_MASK, b[i & 1].v[k], quad0 + 4 * (i >> 1));
        v = k == u ? x : v;
      }
      keep[i] = mt_dropout_keep(p, v);
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < 8; i++) {
    int tq = tq_col0 + acc_col(lane, i), tk = tk_row0 + acc_row(lane, i);
    keep[i] = tk <= tq && tq < T
                  ? mt_dropout_scale(p, key, sample, ((uint64_t)head * T + tq) * T + tk)
                  : 1.0f;
  }
}

/* grid (query tiles, NH, B), 32·W threads; the last query tile (the most
 * key tiles under the causal mask) in block 0: blocks start in index order,
 * so the longest go first and the short ones fill the last wave, as in
 * FlashAttention (in order, the last wave was the heads' longest tiles,
 * with most SMs idle under it).
 *
 * A warp takes MF blocks of 16 query rows, a block's query tile 16·MF·W
 * rows; key tiles stay R = 16·W. With MF 2 (FlashAttention-2's 32 rows a
 * warp) each V fragment a warp loads from shared memory serves both row
 * blocks' P·V, and a block loads K and V tiles for twice the rows, at the
 * cost of registers (255 a thread, two blocks an SM). A row sees the same
 * key tiles in the same order at either MF, and its arithmetic is the
 * same, so the outputs are the same bits: a warp skips only tiles that
 * hold no key its rows see, which would leave its m, l and output as they
 * were (at MF 1 a warp sees every tile its block sweeps but those before
 * its documents; it sweeps them all, as it did before MF 2, which keeps
 * its registers as few).
 *
 * PR (bf16, MF 1, where the device's probe allows: a_put): P goes to P·V
 * as A fragments in registers, not through the warp's shared memory; no
 * Ps then. The 32-row warp keeps shared memory: its two row blocks' P
 * would stay live across its V wait, in a kernel at 255 registers. */
template <int FP16, int D, int W, int MF, int PR = 0>
static __global__ void MT_LAUNCH_BOUNDS(32 * W, MF == 1 ? MT_FLASH_FWD_BLOCKS : 2)
    k_flash_fwd(uint16_t *out, float *lse, const uint16_t *qkv, int T, int C, int NH, float scale,
                float p, uint64_t key, uint64_t sample0, uint32_t head0, const int32_t *docs) {
  static_assert(!PR || (MF == 1 && !FP16), "P in registers: bf16, 16 rows a warp");
  const int R = 16 * W, QR = MF * R, NO = D / 16;
  MT_DYN_SMEM(smem);
  uint16_t *Qs = (uint16_t *)smem, *Ks = Qs + QR * LDE(D), *Vs = Ks + R * LDE(D);
  uint16_t *Ps = Vs + R * LDE(D);
  int qt = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z, HS = C / NH;
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32, q0 = qt * QR, w0 = q0 + 16 * MF * warp;
  size_t ld = 3 * (size_t)C;
  const uint16_t *head = qkv + (size_t)b * T * ld + (size_t)h * HS;
  uint16_t *Pw = Ps + warp * 16 * MF * LDP(W);
  uint64_t sample = sample0 + (uint64_t)b;
  /* the lane's two rows (acc_row) of each row block f: queries tq, their
   * first keys (their documents' starts) ts; the first key tile any row of
   * the tile sees, and the last (its last row's, or T's) */
  const int32_t *ds = docs ? docs + (size_t)b * T : NULL;
  int tq[MF][2], ts[MF][2], kt0 = ds ? ds[q0] / R : 0;
  int kt1 = MF == 1 ? qt : ((q0 + QR < T ? q0 + QR : T) - 1) / R;
#pragma unroll
  for (int f = 0; f < MF; f++)
#pragma unroll
    for (int r = 0; r < 2; r++) {
      tq[f][r] = w0 + 16 * f + (lane >> 2) + 8 * r;
      ts[f][r] = ds && tq[f][r] < T ? ds[tq[f][r]] : 0;
    }
  /* the warp's keys: from its first row's start to its last row (rows
   * past T see none) */
  int wk0 = ds && w0 < T ? ds[w0] : 0, wk1 = w0 < T ? w0 + 16 * MF - 1 : -1;
  /* each row block's last first key (its last row's under T, the starts
   * never decreasing): a key tile from there to the block's first row is
   * seen whole by every row of the block, and needs no mask */
  int tsx[MF];
#pragma unroll
  for (int f = 0; f < MF; f++) {
    int r0 = w0 + 16 * f, r1 = r0 + 15 < T ? r0 + 15 : T - 1;
    tsx[f] = ds && r1 >= r0 ? ds[r1] : 0;
  }
  const float c2 = scale * MT_LOG2E; /* scores to base-2 exponents */

  /* Q, then each key tile's K and V as two groups of copies in flight (a
   * buffer each): the next tile's K loads while this tile's softmax and
   * P·V run, its V while the next Q·Kᵀ does */
  const uint16_t *kv0 = head + C + (size_t)kt0 * R * ld;
  load_tile<D, 1>(Qs, head + (size_t)q0 * ld, QR, T - q0, HS, ld);
  load_tile<D, 1>(Ks, kv0, R, T - kt0 * R, HS, ld);
  cp_async_commit();
  load_tile<D, 1>(Vs, kv0 + C, R, T - kt0 * R, HS, ld);
  cp_async_commit();
  const uint16_t *Qw = Qs + 16 * MF * warp * LDE(D);

  float m[MF][2], l[MF][2];
  acc_frag o[MF * NO];
  a16_frag pa[PR ? W : 1]; /* PR: P, a fragment per 16 keys */
#pragma unroll
  for (int f = 0; f < MF; f++)
#pragma unroll
    for (int r = 0; r < 2; r++) m[f][r] = -FLT_MAX, l[f][r] = 0.0f;
#pragma unroll
  for (int n = 0; n < MF * NO; n++) wmma::fill_fragment(o[n], 0.0f);
  for (int kt = kt0; kt <= kt1; kt++) {
    const uint16_t *next = head + C + (size_t)(kt + 1) * R * ld; /* its K; V at + C */
    /* whether any of the warp's rows sees a key of this tile (the same for
     * the whole warp) */
    int seen = MF == 1 || (kt * R <= wk1 && (kt + 1) * R > wk0);
    cp_async_wait<1>(); /* this tile's K (and Q): all but its V */
    __syncthreads();
    /* one row block's scores live at a time: two spill the 32-row warp's
     * registers (hundreds of bytes at head size 128), so its second
     * block's scores are taken after the first's softmax, and K is free
     * for the next tile's only after both */
    acc_frag sc[W];
    if (MF == 1) {
      if (seen) warp_scores<FP16, D, W>(sc, Qw, Ks);
      __syncthreads(); /* every warp has read Ks: the next tile's K */
      if (kt < kt1) load_tile<D, 1>(Ks, next, R, T - (kt + 1) * R, HS, ld);
      cp_async_commit(); /* (empty after the last tile: the waits count groups) */
    }
    if (seen) {
#pragma unroll
      for (int f = 0; f < MF; f++) {
        if (MF > 1) warp_scores<FP16, D, W>(sc, Qw + 16 * f * LDE(D), Ks);
        /* the keys a row does not see out (-inf: P 0), unless every row of
         * the block sees the whole tile (the tiles below the diagonal
         * past the documents' starts: most of them; the 32-row warp masks
         * every tile: the branch spilled 350-1,200 bytes of its registers
         * on sm_80); then each row's max of its raw scores over the tile
         * (the scale is positive) */
        if (MF > 1 || !((kt + 1) * R - 1 <= w0 + 16 * f && kt * R >= tsx[f]))
#pragma unroll
          for (int c = 0; c < W; c++)
#pragma unroll
            for (int i = 0; i < 8; i++) {
              int r = (i >> 1) & 1, tk = kt * R + 16 * c + acc_col(lane, i);
              if (!(tk <= tq[f][r] && tk >= ts[f][r])) sc[c].x[i] = -INFINITY;
            }
        float tm[2] = {-FLT_MAX, -FLT_MAX};
#pragma unroll
        for (int c = 0; c < W; c++)
#pragma unroll
          for (int i = 0; i < 8; i++) tm[(i >> 1) & 1] = fmaxf(tm[(i >> 1) & 1], sc[c].x[i]);
        float mn[2], alpha[2], mc[2], rs[2] = {0.0f, 0.0f};
#pragma unroll
        for (int r = 0; r < 2; r++) {
          mn[r] = fmaxf(m[f][r], quad_max(tm[r]));      /* -FLT_MAX while the row has seen no key */
          alpha[r] = exp2_fast((m[f][r] - mn[r]) * c2); /* then 1 */
          mc[r] = mn[r] * c2;
        }
        /* P = exp((s - m)·scale) = 2^(s·c2 - m·c2), finite m: summed
         * undropped into l, written dropped and rounded for P·V; a lane's
         * elements 2r + e of column half hh are keys tk0 + e of rows r */
        uint16_t *Pf = Pw + 16 * f * LDP(W);
#pragma unroll
        for (int c = 0; c < W; c++)
#pragma unroll
          for (int hh = 0; hh < 2; hh++) {
            int col0 = 16 * c + 8 * hh + 2 * (lane & 3), tk0 = kt * R + col0;
            float keep[2][2] = {{1.0f, 1.0f}, {1.0f, 1.0f}};
            if (p > 0.0f) row_keep(keep, p, key, sample, head0 + h, T, tq[f], tk0, lane);
#pragma unroll
            for (int r = 0; r < 2; r++) {
              float pv[2];
#pragma unroll
              for (int e = 0; e < 2; e++) {
                pv[e] = exp2_fast(fmaf(sc[c].x[4 * hh + 2 * r + e], c2, -mc[r]));
                rs[r] += pv[e];
                pv[e] *= keep[r][e];
              }
              if (PR) {
                a_put(pa[c], 4 * hh + 2 * r, pv[0]);
                a_put(pa[c], 4 * hh + 2 * r + 1, pv[1]);
              } else {
                store_pair<FP16>(Pf + ((lane >> 2) + 8 * r) * LDP(W) + col0, pv[0], pv[1]);
              }
            }
          }
#pragma unroll
        for (int r = 0; r < 2; r++) {
          l[f][r] = l[f][r] * alpha[r] + quad_sum(rs[r]);
          m[f][r] = mn[r];
        }
#pragma unroll
        for (int n = 0; n < NO; n++)
#pragma unroll
          for (int i = 0; i < 8; i++) o[f * NO + n].x[i] *= alpha[(i >> 1) & 1];
      }
    }
    if (MF > 1) {
      __syncthreads();
      if (kt < kt1) load_tile<D, 1>(Ks, next, R, T - (kt + 1) * R, HS, ld);
      cp_async_commit();
    }
    cp_async_wait<1>(); /* this tile's V: all but the next K */
    __syncthreads();    /* (and this warp's Pw written) */
    if (seen && PR)
#pragma unroll
      for (int kk = 0; kk < W; kk++) warp_accumulate_a<D>(o, pa[kk], Vs + 16 * kk * LDE(D));
    if (seen && !PR) warp_accumulate<FP16, D, W, MF>(o, Pw, Vs);
    __syncthreads(); /* every warp has read Vs: the next tile's V */
    if (kt < kt1) load_tile<D, 1>(Vs, next + C, R, T - (kt + 1) * R, HS, ld);
    cp_async_commit();
  }
  cp_async_wait<0>(); /* (only empty groups are left) */
  __syncthreads();    /* the tiles become the output's staging */
  float *st = (float *)smem + warp * 16 * LDO(D);
#pragma unroll
  for (int f = 0; f < MF; f++) {
    /* every row sees its own key, so l > 0 */
#pragma unroll
    for (int r = 0; r < 2; r++)
      if (!(lane & 3) && tq[f][r] < T)
        lse[((size_t)b * NH + h) * T + tq[f][r]] = m[f][r] * scale + logf(l[f][r]);
    /* (a warp wholly past T saw no key: l 0, its rows not written) */
    float inv[2] = {l[f][0] > 0.0f ? 1.0f / l[f][0] : 0.0f, l[f][1] > 0.0f ? 1.0f / l[f][1] : 0.0f};
#pragma unroll
    for (int n = 0; n < NO; n++)
#pragma unroll
      for (int i = 0; i < 8; i++) o[f * NO + n].x[i] *= inv[(i >> 1) & 1];
    warp_rows_out<D, 0, FP16>(out + (size_t)b * T * C + (size_t)h * HS, C, st, o + f * NO,
                              w0 + 16 * f, T, HS);
  }
}

/* dv[(b, h, t)] (rows of the group b0.., (Bg, NH, T)) = Σ_c dout·out over
 * the head; and, with dO16 (not NULL), dout rounded to the 16-bit type
 * into dO16's rows of stride 3C (dqkv's Q columns), which the dK/dV and dQ
 * kernels then load as they are; grid (T, Bg), a warp per head in turn */
template <int FP16>
static __global__ void k_flash_dot(float *dv, uint16_t *dO16, const float *dout,
                                   const uint16_t *out, int T, int C, int NH, int b0) {
  int t = blockIdx.x, bg = blockIdx.y, HS = C / NH;
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nw = blockDim.x / 32;
  size_t row = ((size_t)(b0 + bg) * T + t) * C, row16 = row * 3;
  for (int h = warp; h < NH; h += nw) {
    float s = 0.0f;
    for (int c = lane; c < HS; c += 32) {
      float g = dout[row + (size_t)h * HS + c];
      s += g * mt_half_unpack(out[row + (size_t)h * HS + c], FP16);
      if (dO16) dO16[row16 + (size_t)h * HS + c] = pack16<FP16>(g);
    }
    for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(FULL_MASK, s, o);
    if (lane == 0) dv[((size_t)bg * NH + h) * T + t] = s;
  }
}

/* The backward's shared memory: K, V, Q and dO tiles, a warp's 16-bit
 * products' operands (P dropped and dS: dK/dV; dS: dQ), and the query
 * tile's lse, D and document starts. */
struct bwd_smem_of {
  uint16_t *Ks, *Vs, *Qs, *dOs, *Pw, *dSw;
  float *lse_s, *D_s;
  int32_t *ts_s;
};
template <int D, int W> static __device__ bwd_smem_of bwd_layout(unsigned char *smem, int warp) {
  const int R = 16 * W;
  bwd_smem_of s;
  s.Ks = (uint16_t *)smem;
  s.Vs = s.Ks + R * LDE(D);
  s.Qs = s.Vs + R * LDE(D);
  s.dOs = s.Qs + R * LDE(D);
  uint16_t *Ps = s.dOs + R * LDE(D), *dSs = Ps + W * 16 * LDP(W);
  s.Pw = Ps + warp * 16 * LDP(W);
  s.dSw = dSs + warp * 16 * LDP(W);
  s.lse_s = (float *)(dSs + W * 16 * LDP(W));
  s.D_s = s.lse_s + R;
  s.ts_s = (int32_t *)(s.D_s + R);
  return s;
}

/* The backward kernels' arguments: samples b0.. (dv holds their D rows,
 * (Bg, NH, T)), the dropout as mt_dropout's fields (p 0: none). */
struct bwd_args {
  void *dqkv; /* fp32, added into; or (half_out) qkv's 16-bit type, written */
  int half_out;
  const float *dout;
  /* dout rounded to qkv's type by k_flash_dot, rows of stride 3C (in a
   * 16-bit dqkv's Q columns, which the dQ kernel writes last); NULL: the
   * kernels round dout's fp32 as they load it */
  const uint16_t *dO16;
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
  const uint16_t *g16; /* the head's row 0 in dO16, or NULL */
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
  k.g16 = a.dO16 ? a.dO16 + (size_t)k.b * a.T * k.ld + (size_t)k.h * k.HS : NULL;
  k.lse_h = a.lse + ((size_t)k.b * a.NH + k.h) * a.T;
  k.dv_h = a.dv + ((size_t)k.bg * a.NH + k.h) * a.T;
  k.sample = a.sample0 + (uint64_t)k.b;
  k.ds = a.docs ? a.docs + (size_t)k.b * a.T : NULL;
  k.s = bwd_layout<D, W>(smem, k.warp);
  return k;
}

/* A query tile's parts, from its first row q0: Q into Qs by cp.async; dO
 * into dOs by cp.async from the 16-bit copy, else rounded from dout's fp32
 * at once; the rows' lse (times log2(e)), D and first keys (rows past T:
 * zero) into lse_s,
 * D_s and ts_s, at once. The caller commits, waits and syncs. */
template <int D, int W> static __device__ void load_q_tile(const bwd_block &k, int q0, int T) {
  load_tile<D, 1>(k.s.Qs, k.head + (size_t)q0 * k.ld, 16 * W, T - q0, k.HS, k.ld);
}
template <int FP16, int D, int W>
static __device__ void load_dout_tile(const bwd_block &k, int C, int q0, int T) {
  if (k.g16)
    load_tile<D, 1>(k.s.dOs, k.g16 + (size_t)q0 * k.ld, 16 * W, T - q0, k.HS, k.ld);
  else
    load_tile_f32<D, FP16>(k.s.dOs, k.g + (size_t)q0 * C, 16 * W, T - q0, k.HS, C);
}
template <int W> static __device__ void load_row_data(const bwd_block &k, int q0, int T) {
  for (int r = threadIdx.x; r < 16 * W; r += blockDim.x) {
    k.s.lse_s[r] = q0 + r < T ? k.lse_h[q0 + r] * MT_LOG2E : 0.0f; /* base 2 (exp2_fast) */
    k.s.D_s[r] = q0 + r < T ? k.dv_h[q0 + r] : 0.0f;
    k.s.ts_s[r] = k.ds && q0 + r < T ? k.ds[q0 + r] : 0;
  }
}

/* A warp's finished gradient rows (16 from row0, columns col.. of the
 * head's dqkv rows): added into fp32, or written in the 16-bit type */
template <int FP16, int D>
static __device__ void grad_rows_out(const bwd_args &a, const bwd_block &k, size_t col, float *st,
                                     acc_frag *acc, int row0) {
  if (a.half_out)
    warp_rows_out<D, 0, FP16>((uint16_t *)a.dqkv + k.dhead + col, k.ld, st, acc, row0, a.T, k.HS);
  else
    warp_rows_out<D, 1>((float *)a.dqkv + k.dhead + col, k.ld, st, acc, row0, a.T, k.HS);
}

/* dS = P ∘ (dP·m - D) · scale feeds dK and dQ. In bf16 the scale
 * multiplies their finished rows instead, once, as FlashAttention-2 does,
 * not each element of dS (one instruction of the few an element's row
 * work takes); binary16 keeps it in dS, whose values it keeps sqrt(HS)
 * times smaller (11 at head size 128), further from binary16's largest,
 * 65504, under a loss scale. */
template <int FP16> static __device__ __forceinline__ float ds_scale(float scale) {
  return FP16 ? scale : 1.0f;
}
template <int FP16, int D> static __device__ void scale_rows(acc_frag *acc, float scale) {
  const float m = FP16 ? 1.0f : scale; /* (binary16: already in dS) */
#pragma unroll
  for (int n = 0; n < D / 16; n++)
#pragma unroll
    for (int i = 0; i < 8; i++) acc[n].x[i] *= m;
}

/* Query blocks of 16 whose scores a dK/dV warp holds at once: its dK and
 * dV fragments take 2·D/2 registers a lane, so fewer at the wider heads */
template <int D, int W> struct kv_blocks {
  enum { n = D <= 64 ? W : D <= 128 ? 2 : 1 };
};

/* grid (key tiles, NH, Bg), 32·W threads: dK and dV of R keys. PR (bf16,
 * where the device's probe allows: a_put): dSᵀ and Pdᵀ go to their
 * products in registers, each 16 queries' as soon as made, not through
 * the warp's shared memory; the next tile's Q then loads during the last
 * 16·NB queries' dV. */
template <int FP16, int D, int W, int PR = 0> static __global__ void k_flash_bwd_kv(bwd_args a) {
  static_assert(!PR || !FP16, "dS and P in registers: bf16");
  const int R = 16 * W, NB = kv_blocks<D, W>::n;
  MT_DYN_SMEM(smem);
  bwd_block k = bwd_block_of<D, W>(a, smem, 0);
  const bwd_smem_of &s = k.s;
  int T = a.T, C = a.C, k0 = k.t0, nt = (T + R - 1) / R;
  /* the lane's two key rows (acc_row) */
  int tk[2] = {k0 + 16 * k.warp + (k.lane >> 2), k0 + 16 * k.warp + (k.lane >> 2) + 8};
  const float c2 = a.scale * MT_LOG2E; /* scores to base-2 exponents */

  /* The next query tile loads while this one's products run: its Q (and
   * rows' data) once every warp's dK += dSᵀ·Q has read Qs, during dV +=
   * Pdᵀ·dO; its dO once dV has read dOs, during the next tile's scores
   * Sᵀ = K·Qᵀ of the first queries. Two groups of copies in flight, Q's
   * then dO's; the first tile's Q goes with K and V. */
  load_tile<D, 1>(s.Ks, k.head + C + (size_t)k0 * k.ld, R, T - k0, k.HS, k.ld);
  load_tile<D, 1>(s.Vs, k.head + 2 * C + (size_t)k0 * k.ld, R, T - k0, k.HS, k.ld);
  load_q_tile<D, W>(k, k0, T);
  load_row_data<W>(k, k0, T);
  cp_async_commit();
  load_dout_tile<FP16, D, W>(k, C, k0, T);
  cp_async_commit();
  const uint16_t *Kw = s.Ks + 16 * k.warp * LDE(D), *Vw = s.Vs + 16 * k.warp * LDE(D);
  acc_frag dk[D / 16], dvv[D / 16];
#pragma unroll
  for (int n = 0; n < D / 16; n++) {
    wmma::fill_fragment(dk[n], 0.0f);
    wmma::fill_fragment(dvv[n], 0.0f);
  }
  for (int q0 = k0;;) {
    /* the next query tile, unless past T or (documents) its rows, and
     * every later tile's, start past these keys */
    int nq = q0 + R, more = nq < nt * R && !(k.ds && k.ds[nq] >= k0 + R);
    cp_async_wait<1>(); /* this tile's Q: all but its dO */
    __syncthreads();
#pragma unroll 1 /* (unrolled, the blocks' loads crowd out registers: spills) */
    for (int cb = 0; cb < W; cb += NB) { /* Sᵀ and dPᵀ, 16·NB queries at a time */
      acc_frag st[NB], dpt[NB];
      a16_frag pda[PR ? NB : 1];                                 /* PR: Pdᵀ of each 16 queries */
      warp_scores<FP16, D, NB>(st, Kw, s.Qs + 16 * cb * LDE(D)); /* Sᵀ: keys × queries */
      if (cb == 0) {
        cp_async_wait<0>(); /* this tile's dO */
        __syncthreads();
      }
      warp_scores<FP16, D, NB>(dpt, Vw, s.dOs + 16 * cb * LDE(D)); /* dPᵀ = V·dOᵀ */
#pragma unroll
      for (int c = 0; c < NB; c++) {
        a16_frag dsa; /* PR: dSᵀ */
        float keep[8] = {1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f};
        if (a.p > 0.0f)
          col_keep(keep, a.p, a.key, k.sample, a.head0 + k.h, T, k0 + 16 * k.warp,
                   q0 + 16 * (cb + c), k.lane);
        /* the pairs a query does not see out (-inf: P 0, dS 0), unless all
         * 16 queries (under T, after the warp's last key, their documents
         * started by its first) see all the warp's keys */
        int qf = q0 + 16 * (cb + c), kw = k0 + 16 * k.warp;
        if (!(qf >= kw + 15 && qf + 15 < T && s.ts_s[16 * (cb + c) + 15] <= kw))
#pragma unroll
          for (int i = 0; i < 8; i++) {
            int r = (i >> 1) & 1, j = 16 * (cb + c) + acc_col(k.lane, i), tq = q0 + j;
            if (!(tq >= tk[r] && tq < T && tk[r] >= s.ts_s[j])) st[c].x[i] = -INFINITY;
          }
#pragma unroll
        for (int i0 = 0; i0 < 8; i0 += 2) { /* elements i0, i0 + 1: adjacent queries */
          float pd[2], ds[2];
#pragma unroll
          for (int e = 0; e < 2; e++) {
            int i = i0 + e, j = 16 * (cb + c) + acc_col(k.lane, i);
            float pf = exp2_fast(fmaf(st[c].x[i], c2, -s.lse_s[j])), m = keep[i];
            ds[e] = pf * (dpt[c].x[i] * m - s.D_s[j]) * ds_scale<FP16>(a.scale);
            pd[e] = pf * m;
          }
          if (PR) {
#pragma unroll
            for (int e = 0; e < 2; e++) a_put(pda[c], i0 + e, pd[e]), a_put(dsa, i0 + e, ds[e]);
          } else {
            int at = acc_row(k.lane, i0) * LDP(W) + 16 * (cb + c) + acc_col(k.lane, i0);
            store_pair<FP16>(s.Pw + at, pd[0], pd[1]);
            store_pair<FP16>(s.dSw + at, ds[0], ds[1]);
          }
        }
        if (PR) warp_accumulate_a<D>(dk, dsa, s.Qs + 16 * (cb + c) * LDE(D)); /* dK += dSᵀ·Q */
      }
      if (PR) {
        if (cb + NB >= W) {
          __syncthreads(); /* every warp has read Qs and the rows' data: the next tile's */
          if (more) {
            load_q_tile<D, W>(k, nq, T);
            load_row_data<W>(k, nq, T);
          }
          cp_async_commit();
        }
#pragma unroll
        for (int c = 0; c < NB; c++) /* dV += Pdᵀ·dO */
          warp_accumulate_a<D>(dvv, pda[c], s.dOs + 16 * (cb + c) * LDE(D));
      }
    }
    if (PR) {
      __syncthreads(); /* every warp has read dOs: the next tile's */
      if (more) load_dout_tile<FP16, D, W>(k, C, nq, T);
      cp_async_commit();
      if (!more) break;
      q0 = nq;
      continue;
    }
    __syncwarp();                                 /* Pw, dSw written */
    warp_accumulate<FP16, D, W>(dk, s.dSw, s.Qs); /* dK += dSᵀ·Q */
    __syncthreads(); /* every warp has read Qs and the rows' data: the next tile's */
    if (more) {
      load_q_tile<D, W>(k, nq, T);
      load_row_data<W>(k, nq, T);
    }
    cp_async_commit();
    warp_accumulate<FP16, D, W>(dvv, s.Pw, s.dOs); /* dV += Pdᵀ·dO */
    __syncthreads();                               /* every warp has read dOs: the next tile's */
    if (more) load_dout_tile<FP16, D, W>(k, C, nq, T);
    cp_async_commit();
    if (!more) break;
    q0 = nq;
  }
  cp_async_wait<0>(); /* (only empty groups are left) */
  __syncthreads();    /* Qs and dOs become the staging */
  float *st = (float *)s.Qs + k.warp * 16 * LDO(D);
  scale_rows<FP16, D>(dk, a.scale);
  grad_rows_out<FP16, D>(a, k, C, st, dk, k0 + 16 * k.warp);
  grad_rows_out<FP16, D>(a, k, 2 * (size_t)C, st, dvv, k0 + 16 * k.warp);
}

/* grid (query tiles, NH, Bg), 32·W threads: dQ of R queries, the last tile
 * first. PR (bf16, where the device's probe allows: a_put): dS goes to
 * dS·K as A fragments in registers, not through the warp's shared memory. */
template <int FP16, int D, int W, int PR = 0> static __global__ void k_flash_bwd_q(bwd_args a) {
  static_assert(!PR || !FP16, "dS in registers: bf16");
  const int R = 16 * W;
  MT_DYN_SMEM(smem);
  bwd_block k = bwd_block_of<D, W>(a, smem, 1);
  const bwd_smem_of &s = k.s;
  int T = a.T, C = a.C, q0 = k.t0;
  /* Q and dO by cp.async, in the first key tile's V group (waited for
   * before the first products) */
  load_q_tile<D, W>(k, q0, T);
  load_dout_tile<FP16, D, W>(k, C, q0, T);
  load_row_data<W>(k, q0, T);
  __syncthreads();
  /* the lane's two query rows (acc_row): tq, first key ts, lse, D */
  int tq[2], ts[2];
  float lr[2], dd[2];
#pragma unroll
  for (int r = 0; r < 2; r++) {
    int row = 16 * k.warp + (k.lane >> 2) + 8 * r;
    tq[r] = q0 + row, ts[r] = s.ts_s[row], lr[r] = s.lse_s[row], dd[r] = s.D_s[row];
  }
  /* the warp's rows: under T, and the last one's first key (the largest) */
  int qw = q0 + 16 * k.warp, rows_in = qw + 15 < T, tsx = s.ts_s[16 * k.warp + 15];
  const float c2 = a.scale * MT_LOG2E; /* scores to base-2 exponents */
  const uint16_t *Qw = s.Qs + 16 * k.warp * LDE(D), *dOw = s.dOs + 16 * k.warp * LDE(D);
  acc_frag dq[D / 16];
#pragma unroll
  for (int n = 0; n < D / 16; n++) wmma::fill_fragment(dq[n], 0.0f);
  /* from the key tile of the tile's first row's start; a key tile's V and
   * K load by cp.async as two groups in flight, V first: the next tile's V
   * while this tile's Q·Kᵀ, dS and dS·K are formed, its K while its dO·Vᵀ
   * is (a buffer each) */
  int kfirst = k.ds ? k.ds[q0] / R * R : 0;
  load_tile<D, 1>(s.Vs, k.head + 2 * C + (size_t)kfirst * k.ld, R, T - kfirst, k.HS, k.ld);
  cp_async_commit();
  load_tile<D, 1>(s.Ks, k.head + C + (size_t)kfirst * k.ld, R, T - kfirst, k.HS, k.ld);
  cp_async_commit();
  for (int k0 = kfirst; k0 <= q0; k0 += R) {
    const uint16_t *next = k.head + C + (size_t)(k0 + R) * k.ld; /* its K; V at + C */
    cp_async_wait<1>();                                          /* this tile's V: all but its K */
    __syncthreads();
    acc_frag sc[W], dp[W];
    warp_scores<FP16, D, W>(dp, dOw, s.Vs); /* dP = dO·Vᵀ */
    __syncthreads();                        /* every warp has read Vs */
    if (k0 + R <= q0) load_tile<D, 1>(s.Vs, next + C, R, T - (k0 + R), k.HS, k.ld);
    cp_async_commit();
    cp_async_wait<1>(); /* this tile's K: all but the next V */
    __syncthreads();
    warp_scores<FP16, D, W>(sc, Qw, s.Ks); /* S: queries × keys */
    /* the keys a row does not see out (-inf: P 0, dS 0), unless every row
     * of the warp sees the whole tile */
    if (!(k0 + R - 1 <= qw && rows_in && k0 >= tsx))
#pragma unroll
      for (int c = 0; c < W; c++)
#pragma unroll
        for (int i = 0; i < 8; i++) {
          int r = (i >> 1) & 1, tkk = k0 + 16 * c + acc_col(k.lane, i);
          if (!(tkk <= tq[r] && tq[r] < T && tkk >= ts[r])) sc[c].x[i] = -INFINITY;
        }
        /* a lane's elements 2r + e of column half hh: keys tk0 + e of rows r;
         * PR: each 16 keys' dS (dsa) into dQ as soon as made */
#pragma unroll
    for (int c = 0; c < W; c++) {
      a16_frag dsa;
#pragma unroll
      for (int hh = 0; hh < 2; hh++) {
        int col0 = 16 * c + 8 * hh + 2 * (k.lane & 3), tk0 = k0 + col0;
        float keep[2][2] = {{1.0f, 1.0f}, {1.0f, 1.0f}};
        if (a.p > 0.0f) row_keep(keep, a.p, a.key, k.sample, a.head0 + k.h, T, tq, tk0, k.lane);
#pragma unroll
        for (int r = 0; r < 2; r++) {
          float ds[2];
#pragma unroll
          for (int e = 0; e < 2; e++) {
            int i = 4 * hh + 2 * r + e;
            float pf = exp2_fast(fmaf(sc[c].x[i], c2, -lr[r]));
            ds[e] = pf * (dp[c].x[i] * keep[r][e] - dd[r]) * ds_scale<FP16>(a.scale);
          }
          if (PR) {
            a_put(dsa, 4 * hh + 2 * r, ds[0]);
            a_put(dsa, 4 * hh + 2 * r + 1, ds[1]);
          } else {
            store_pair<FP16>(s.Pw + ((k.lane >> 2) + 8 * r) * LDP(W) + col0, ds[0], ds[1]);
          }
        }
      }
      if (PR) warp_accumulate_a<D>(dq, dsa, s.Ks + 16 * c * LDE(D)); /* dQ += dS·K */
    }
    if (!PR) {
      __syncwarp();                                /* Pw written */
      warp_accumulate<FP16, D, W>(dq, s.Pw, s.Ks); /* dQ += dS·K */
    }
    __syncthreads(); /* every warp has read Ks */
    if (k0 + R <= q0) load_tile<D, 1>(s.Ks, next, R, T - (k0 + R), k.HS, k.ld);
    cp_async_commit();
  }
  cp_async_wait<0>(); /* (only empty groups are left) */
  __syncthreads();    /* Qs and dOs become the staging */
  float *st = (float *)s.Qs + k.warp * 16 * LDO(D);
  scale_rows<FP16, D>(dq, a.scale);
  grad_rows_out<FP16, D>(a, k, 0, st, dq, q0 + 16 * k.warp);
}

/* ---- host side ------------------------------------------------------------ */

/* Whether k may take smem bytes of dynamic shared memory on this GPU: the
 * backward at head sizes 129..160 takes 105,216 bytes, which an A100 or
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
   * (2 x (105,216 + 1,024) of 233,472 bytes) */
  if (cudaFuncSetAttribute(k, cudaFuncAttributePreferredSharedMemoryCarveout,
                           cudaSharedmemCarveoutMaxShared) != cudaSuccess)
    cudaGetLastError(); /* a hint refused: the launch still runs */
  return 1;
}

/* The forward kernel's type (k_flash_fwd<FP16, D, W, MF>) */
typedef void flash_fwd_kernel(uint16_t *, float *, const uint16_t *, int, int, int, float, float,
                              uint64_t, uint64_t, uint32_t, const int32_t *);

/* The kernels of one (FP16, D, W), launched with the shared memory they take. */
template <int FP16, int D, int W> struct flash {
  /* the forward's row blocks a warp it is built with besides 1: 2 where a
   * block has 4 warps (head sizes to 160), 1 (no other) at 256 */
  enum { MF2 = W == 4 ? 2 : 1 };
  /* whether P (the forward of MF row blocks a warp) or dS and P (MF 0: the
   * backward kernels) pass in registers on c: bf16, the forward at 16 rows */
  static int regs(const mt__cuda *c, int MF) { return !FP16 && MF <= 1 && c->flash_p_regs; }
  /* the forward kernel of MF row blocks a warp that runs on c (p_smem:
   * with P through shared memory even where registers may take it), and
   * its shared memory */
  template <int MF>
  static flash_fwd_kernel *fwd_kernel(const mt__cuda *c, int p_smem, size_t *smem) {
    const int PR = MF == 1 && !FP16; /* the variant with P in registers, if any */
    int pr = regs(c, MF) && !p_smem;
    *smem = fwd_smem(D, W, MF, pr);
    return pr ? k_flash_fwd<FP16, D, W, MF, PR> : k_flash_fwd<FP16, D, W, MF, 0>;
  }
  static void (*bwd_q_kernel(const mt__cuda *c))(bwd_args) {
    return regs(c, 0) ? k_flash_bwd_q<FP16, D, W, !FP16> : k_flash_bwd_q<FP16, D, W, 0>;
  }
  static void (*bwd_kv_kernel(const mt__cuda *c))(bwd_args) {
    return regs(c, 0) ? k_flash_bwd_kv<FP16, D, W, !FP16> : k_flash_bwd_kv<FP16, D, W, 0>;
  }
  template <int MF>
  static void fwd_as(mt_device *d, int p_smem, uint16_t *out, float *lse, const uint16_t *qkv,
                     int B, int T, int C, int NH, float scale, const mt_dropout *drop,
                     const int32_t *docs) {
    mt__cuda *c = mt__cuda_enter(d);
    const int QR = 16 * W * MF;
    size_t smem;
    flash_fwd_kernel *flash_fwd = fwd_kernel<MF>(c, p_smem, &smem);
    if (!smem_ok(d, c, flash_fwd, smem, D, "attention_fwd (flash)")) return;
    MT_LAUNCH_SMEM(flash_fwd, dim3((unsigned)((T + QR - 1) / QR), (unsigned)NH, (unsigned)B),
                   32 * W, smem, c->stream)
    (out, lse, qkv, T, C, NH, scale, drop ? drop->p : 0.0f, drop ? drop->key : 0,
     drop ? drop->sample0 : 0, drop ? drop->head0 : 0, docs);
  }
  /* whether the forward of 32 rows a warp runs here: built, and its
   * shared memory within the GPU's (an sm_86 GPU's 99 KiB hold it at head
   * size 128, not 160) */
  static int has32(const mt__cuda *c) {
    return MF2 == 2 && fwd_smem(D, W, MF2) <= (size_t)c->smem_optin;
  }
  /* rows: 16 or 32 a warp (32 only where has32); p_smem: at 16 rows, P
   * through shared memory even where registers may take it */
  static void fwd(mt_device *d, int rows, int p_smem, uint16_t *out, float *lse,
                  const uint16_t *qkv, int B, int T, int C, int NH, float scale,
                  const mt_dropout *drop, const int32_t *docs) {
    if (rows == 32 && has32(mt__cuda_of(d)))
      fwd_as<MF2>(d, 0, out, lse, qkv, B, T, C, NH, scale, drop, docs);
    else
      fwd_as<1>(d, p_smem, out, lse, qkv, B, T, C, NH, scale, drop, docs);
  }
  static void bwd(mt_device *d, void *dqkv, int half_out, const float *dout, const uint16_t *dO16,
                  const uint16_t *qkv, const float *lse, const float *dv, int b0, int Bg, int T,
                  int C, int NH, float scale, const mt_dropout *drop, const int32_t *docs,
                  const cudaEvent_t *ev) {
    mt__cuda *c = mt__cuda_enter(d);
    const int R = 16 * W;
    size_t smem = bwd_smem(D, W);
    void (*flash_bwd_kv)(bwd_args) = bwd_kv_kernel(c);
    void (*flash_bwd_q)(bwd_args) = bwd_q_kernel(c);
    if (!smem_ok(d, c, flash_bwd_kv, smem, D, "attention_bwd (flash)") ||
        !smem_ok(d, c, flash_bwd_q, smem, D, "attention_bwd (flash)"))
      return;
    dim3 grid((unsigned)((T + R - 1) / R), (unsigned)NH, (unsigned)Bg);
    bwd_args a = {dqkv,
                  half_out,
                  dout,
                  dO16,
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
    if (ev) cudaEventRecord(ev[2], c->stream);
    MT_LAUNCH_SMEM(flash_bwd_q, grid, 32 * W, smem, c->stream)(a);
    if (ev) cudaEventRecord(ev[3], c->stream);
  }
  /* blocks an SM holds of the forward, dK/dV and dQ kernels and of the
   * forward of 32 rows a warp (0 where it does not run), set up as their
   * launches are */
  static int blocks(mt_device *d, int out[4]) {
#ifdef MT_CUDA_EMU
    (void)d, (void)out;
    return mt_seterr(MT_ENOTSUP, "flash occupancy: not on the emulator");
#else
    mt__cuda *c = mt__cuda_enter(d);
    size_t fsmem, fsmem2;
    flash_fwd_kernel *f = fwd_kernel<1>(c, 0, &fsmem);
    void (*kv)(bwd_args) = bwd_kv_kernel(c);
    void (*q)(bwd_args) = bwd_q_kernel(c);
    const char *what = "flash occupancy";
    if (!smem_ok(d, c, f, fsmem, D, what) || !smem_ok(d, c, kv, bwd_smem(D, W), D, what) ||
        !smem_ok(d, c, q, bwd_smem(D, W), D, what))
      return mt_seterr(MT_EIO, "%s", c->errmsg);
    cudaError_t e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&out[0], f, 32 * W, fsmem);
    if (e == cudaSuccess)
      e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&out[1], kv, 32 * W, bwd_smem(D, W));
    if (e == cudaSuccess)
      e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&out[2], q, 32 * W, bwd_smem(D, W));
    out[3] = 0;
    if (e == cudaSuccess && has32(c)) {
      flash_fwd_kernel *f2 = fwd_kernel<MF2>(c, 0, &fsmem2);
      if (!smem_ok(d, c, f2, fsmem2, D, what)) return mt_seterr(MT_EIO, "%s", c->errmsg);
      e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&out[3], f2, 32 * W, fsmem2);
    }
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

/* One warp loads a 16 × 16 accumulator whose element (r, c) holds 16·r + c
 * and counts, a lane each, its elements not where acc_row and acc_col
 * place them. */
/* a fragment element's value: a GPU's bf16 elements, the emulator's floats */
static __device__ __forceinline__ float frag_float(float v) { return v; }
#ifndef MT_CUDA_EMU
static __device__ __forceinline__ float frag_float(__nv_bfloat16 v) { return __bfloat162float(v); }
#endif

/* f's elements (element (r, c) of the tile holding 16·r + c) not where
 * acc_row and acc_col place element i of this lane; past the 8 those
 * place, every one */
template <class Frag> static __device__ int misplaced_in(const Frag &f, int lane) {
  int n = 0;
  for (int i = 0; i < f.num_elements; i++)
    n += i >= 8 || frag_float(f.x[i]) != (float)(16 * acc_row(lane, i) + acc_col(lane, i));
  return n;
}

static __global__ void k_acc_layout(int *misplaced) {
  MT_DYN_SMEM(smem);
  float *m = (float *)smem;
  int lane = threadIdx.x % 32;
  for (int i = lane; i < 256; i += 32) m[i] = (float)i;
  __syncwarp();
  acc_frag f;
  wmma::load_matrix_sync(f, m, 16, wmma::mem_row_major);
  misplaced[lane] = misplaced_in(f, lane);
}

/* The same for a bf16 row-major matrix_a fragment (values exact in bf16)
 * against mma.m16n8k16's A operand, whose places are the accumulator's:
 * where none is misplaced, the bf16 kernels' P and dS pass from their
 * score fragments to their products in registers (a_put). */
static __global__ void k_a_layout(int *misplaced) {
  MT_DYN_SMEM(smem);
  uint16_t *m = (uint16_t *)smem;
  int lane = threadIdx.x % 32;
  for (int i = lane; i < 256; i += 32) m[i] = pack16<0>((float)i);
  __syncwarp();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> f;
  wmma::load_matrix_sync(f, (const __nv_bfloat16 *)m, 16);
  misplaced[lane] = misplaced_in(f, lane);
}

/* 32 lanes' counts from k (one warp, 1 KiB of shared memory) summed */
static int layout_probe(mt_device *d, void (*k)(int *), const char *what, int *misplaced) {
  int *dev = (int *)mt_device_alloc(d, 32 * sizeof(int)), host[32];
  if (!dev) return -1;
  mt__cuda *c = mt__cuda_enter(d);
  MT_LAUNCH_SMEM(k, dim3(1), 32, 256 * sizeof(float), c->stream)(dev);
  mt__cuda_check(d, what);
  int rc = mt_device_memcpy_dtoh(d, host, dev, sizeof host);
  if (!rc) rc = mt_device_sync(d);
  mt_device_free(d, dev);
  if (rc) return rc;
  *misplaced = 0;
  for (int i = 0; i < 32; i++) *misplaced += host[i];
  return 0;
}

int mt__cuda_a_layout_check(mt_device *d, int *misplaced) {
  return layout_probe(d, k_a_layout, "matrix_a layout", misplaced);
}

int mt__cuda_acc_layout_check(mt_device *d, int *misplaced) {
  return layout_probe(d, k_acc_layout, "accumulator layout", misplaced);
}

void mt__cuda_flash_bwd_timing(mt_device *d, void *const events[4]) {
  mt__cuda *c = mt__cuda_of(d);
  for (int i = 0; i < 4; i++) c->flash_events[i] = events ? (cudaEvent_t)events[i] : NULL;
}

int mt__cuda_flash_blocks_per_sm(mt_device *d, int head_size, int fp16, int blocks[4]) {
  if (head_size < 1 || head_size > MT_FLASH_MAX_HS)
    return mt_seterr(MT_EINVAL, "flash occupancy: head size %d", head_size);
  return with_flash(head_size, fp16, [&](auto f) { return f.blocks(d, blocks); });
}

/* The flash kernels' row work assumes mma.m16n8k16's accumulator layout
 * (acc_row, acc_col), which every sm_80+ GPU has: read once per device,
 * when it opens (device_cuda.cu), so that a GPU placing them otherwise
 * fails with a message instead of training on wrong attention. */
static int flash_layout_ok(mt_device *d, const char *what) {
  if (mt__cuda_of(d)->acc_layout > 0) return 1;
  mt__cuda_fail(d, what,
                "this GPU places a wmma accumulator's elements otherwise than mma.m16n8k16 does, "
                "which the flash kernels assume; use fp32 attention (train.precision fp32)");
  return 0;
}

static int flash_fits(mt_device *d, const char *what, int HS) {
  if (!flash_layout_ok(d, what)) return 0;
  if (HS <= MT_FLASH_MAX_HS) return 1;
  char msg[128];
  snprintf(msg, sizeof msg, "head size %d over %d with a 16-bit qkv", HS, MT_FLASH_MAX_HS);
  mt__cuda_fail(d, what, msg);
  return 0;
}

int mt__cuda_flash_p_regs(mt_device *d, int on) {
  mt__cuda *c = mt__cuda_of(d);
  if (on && c->a_layout <= 0)
    return mt_seterr(MT_EINVAL,
                     "device %s: flash P in registers: this GPU's bf16 matrix_a fragment is not "
                     "laid out as its accumulator",
                     d->name);
  if (c->flash_p_regs != !!on) c->flash_tuned.n = 0; /* the 16-row forward changed: time again */
  c->flash_p_regs = !!on;
  return 0;
}

int mt__cuda_flash_p_regs_of(mt_device *d) { return mt__cuda_of(d)->flash_p_regs; }

int mt__cuda_flash_fwd_rows(mt_device *d, int rows) {
  if (rows != 0 && rows != 16 && rows != 32)
    return mt_seterr(MT_EINVAL, "device %s: flash forward rows a warp %d: 16, 32 or 0 (timed)",
                     d->name, rows);
  mt__cuda_of(d)->flash_fwd_rows = rows;
  return 0;
}

/* The forward d runs for this shape: its rows a warp (0 while the shape
 * has not been timed) and, in *p_regs, 1 where it passes P in registers
 * (bf16 at 16 rows where the device allows it, unless the shape's timing
 * found shared memory faster); one look at the timed shapes */
static int fwd_choice(mt_device *d, int HS, int fp16, int B, int T, int NH, int dropout, int docs,
                      int *p_regs) {
  mt__cuda *c = mt__cuda_of(d);
  int regs = !fp16 && c->flash_p_regs, rows;
  *p_regs = 0;
  if (HS < 1 || HS > MT_FLASH_MAX_HS) return 0;
  if (!with_flash(HS, fp16, [&](auto f) { return f.has32(c); }))
    rows = 16;
  else if (c->flash_fwd_rows)
    rows = c->flash_fwd_rows;
  else {
    mt__flash_choice *t = c->flash_tuned.find({HS, !!fp16, B, T, NH, !!dropout, !!docs});
    if (!t) return 0;
    rows = t->rows, regs = regs && !t->p_smem;
  }
  *p_regs = rows == 16 && regs;
  return rows;
}

int mt__cuda_flash_fwd_rows_of(mt_device *d, int head_size, int fp16, int B, int T, int NH,
                               int dropout, int docs) {
  int p_regs;
  return fwd_choice(d, head_size, fp16, B, T, NH, dropout, docs, &p_regs);
}

int mt__cuda_flash_fwd_p_regs_of(mt_device *d, int head_size, int fp16, int B, int T, int NH,
                                 int dropout, int docs) {
  int p_regs;
  fwd_choice(d, head_size, fp16, B, T, NH, dropout, docs, &p_regs);
  return p_regs;
}

/* Which of the forward's variants (16 or 32 query rows a warp; at 16, P
 * in registers where the device allows it, or through shared memory) is
 * faster depends on the GPU and the shape: more warps an SM against fewer
 * shared memory loads a product, and the registers each variant spills
 * under its bound. As cuDNN's benchmark mode does, the first call of a
 * shape times each, twice, on the caller's own tensors (their outputs are
 * the same bits, so the last run leaves the right ones), and keeps the
 * fastest. A timing that fails keeps 16 rows, P as the device allows. */
template <class F>
static void fwd_timed(mt_device *d, mt__cuda *c, F f, const mt__att_shape &k, uint16_t *out,
                      float *lse, const uint16_t *qkv, int B, int T, int C, int NH, float scale,
                      const mt_dropout *drop, const int32_t *docs) {
  static const int rows[3] = {16, 32, 16}, p_smem[3] = {0, 0, 1};
  int n = f.regs(c, 1) ? 3 : 2; /* the third: 16 rows, P through shared memory */
  float best[3];
  int ok = mt__cuda_time_variants(c, n, best, [&](int v) {
    f.fwd(d, rows[v], p_smem[v], out, lse, qkv, B, T, C, NH, scale, drop, docs);
  });
  /* a launch that fails while the timing works is left for the op's
   * launch check to report; a timing that fails (an event) keeps 16 rows,
   * clears its error and runs them once more, so the outputs are written
   * and a launch that fails again is still reported */
  int v = 0;
  for (int i = 1; ok && i < n; i++)
    if (best[i] < best[v]) v = i;
  mt__flash_choice t = {rows[v], p_smem[v]};
  if (!ok) {
    cudaGetLastError();
    f.fwd(d, 16, 0, out, lse, qkv, B, T, C, NH, scale, drop, docs);
  }
  *c->flash_tuned.get(k) = t;
  mt_log_debug("device %s: flash forward, head size %d, B %d, T %d, %d heads: 16 rows a warp "
               "%.3f ms%s, 32 rows %.3f ms, 16 rows with P through shared memory %.3f ms: "
               "%d rows%s kept",
               d->name, k.HS, B, T, NH, best[0], n == 3 ? " (P in registers)" : "", best[1],
               n == 3 ? best[2] : 0.0, t.rows, t.p_smem ? ", P through shared memory," : "");
}

void mt__cuda_flash_fwd(mt_device *d, uint16_t *out, float *lse, const uint16_t *qkv, mt_dtype qt,
                        int B, int T, int C, int NH, const mt_dropout *drop,
                        const int32_t *doc_start) {
  int HS = C / NH, fp16 = qt == MT_F16;
  if (drop && drop->p == 0.0f) drop = NULL;
  if (B < 1 || T < 1 || !flash_fits(d, "attention_fwd", HS)) return;
  float scale = 1.0f / sqrtf((float)HS);
  mt__cuda *c = mt__cuda_enter(d);
  int p_regs, rows = fwd_choice(d, HS, fp16, B, T, NH, drop != NULL, doc_start != NULL, &p_regs);
  with_flash(HS, fp16, [&](auto f) {
    if (rows) {
      f.fwd(d, rows, rows == 16 && !p_regs, out, lse, qkv, B, T, C, NH, scale, drop, doc_start);
      return;
    }
    mt__att_shape k = {HS, fp16, B, T, NH, drop != NULL, doc_start != NULL};
    fwd_timed(d, c, f, k, out, lse, qkv, B, T, C, NH, scale, drop, doc_start);
  });
  mt__cuda_check(d, "attention_fwd (flash)");
}

void mt__cuda_flash_bwd(mt_device *d, void *dqkv, mt_dtype gt, float *scratch,
                        size_t scratch_floats, const float *dout, const uint16_t *out,
                        const uint16_t *qkv, mt_dtype qt, const float *lse, int B, int T, int C,
                        int NH, const mt_dropout *drop, const int32_t *doc_start) {
  int HS = C / NH, fp16 = qt == MT_F16, half = gt != MT_F32;
  if (drop && drop->p == 0.0f) drop = NULL;
  if (B < 1 || T < 1 || !flash_fits(d, "attention_bwd", HS)) return;
  mt__cuda *c = mt__cuda_enter(d);
  float scale = 1.0f / sqrtf((float)HS);
  int per = (int)(scratch_floats / ((size_t)NH * T)); /* samples whose D fit the scratch */
  if (per < 1) {
    mt__cuda_fail(d, "attention_bwd", "scratch below one sample's rows");
    return;
  }
  /* A 16-bit dqkv's Q columns, which only the dQ kernel writes, last,
   * each block the rows whose dO it has loaded, first hold dO rounded to
   * the 16-bit type: the dK/dV kernel loads every query tile's dO once per
   * key tile, half the bytes of fp32 and by cp.async. An fp32 dqkv is added
   * into: its dO is rounded as loaded. */
  uint16_t *dO16 = half ? (uint16_t *)dqkv : NULL;
  for (int b0 = 0; b0 < B; b0 += per) {
    int Bg = B - b0 < per ? B - b0 : per;
    /* bench/gpu_bench's timing (mt__cuda_flash_bwd_timing): the first group */
    const cudaEvent_t *ev = !b0 && c->flash_events[0] ? c->flash_events : NULL;
    if (ev) cudaEventRecord(ev[0], c->stream);
    if (fp16) MT_LAUNCH(k_flash_dot<1>, dim3((unsigned)T, (unsigned)Bg), 128, c->stream)
    (scratch, dO16, dout, out, T, C, NH, b0);
    else MT_LAUNCH(k_flash_dot<0>, dim3((unsigned)T, (unsigned)Bg), 128,
                   c->stream)(scratch, dO16, dout, out, T, C, NH, b0);
    if (ev) cudaEventRecord(ev[1], c->stream);
    with_flash(HS, fp16, [&](auto f) {
      f.bwd(d, dqkv, half, dout, dO16, qkv, lse, scratch, b0, Bg, T, C, NH, scale, drop, doc_start,
            ev);
    });
  }
  mt__cuda_check(d, "attention_bwd (flash)");
}
