/* reduce.cuh — warp and block reductions for the CUDA kernels.
 *
 * Deterministic: for a given blockDim the sums are a fixed tree, so a rerun
 * gives the same bits (no atomics anywhere in this backend). Every thread of
 * the warp or block gets the result: with xor butterflies each lane adds the
 * same two halves, in an order commutativity makes irrelevant. Block
 * reductions need blockDim.x a multiple of 32 (at most 1024), blockDim.y 1.
 */
#ifndef MT_CUDA_REDUCE_CUH
#define MT_CUDA_REDUCE_CUH

static __device__ __forceinline__ float mt__warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

static __device__ __forceinline__ double mt__warp_sum_d(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

/* max as the CPU backend writes it (a NaN never wins a comparison) */
static __device__ __forceinline__ float mt__warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) {
    float u = __shfl_xor_sync(0xffffffffu, v, o);
    v = u > v ? u : v;
  }
  return v;
}

static __device__ inline float mt__block_sum(float v) {
  __shared__ float sh[32];
  unsigned lane = threadIdx.x & 31u, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = mt__warp_sum(v);
  __syncthreads(); /* an earlier call may still be reading sh */
  if (lane == 0) sh[w] = v;
  __syncthreads();
  return mt__warp_sum(lane < nw ? sh[lane] : 0.0f);
}

static __device__ inline double mt__block_sum_d(double v) {
  __shared__ double sh[32];
  unsigned lane = threadIdx.x & 31u, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = mt__warp_sum_d(v);
  __syncthreads();
  if (lane == 0) sh[w] = v;
  __syncthreads();
  return mt__warp_sum_d(lane < nw ? sh[lane] : 0.0);
}

static __device__ inline float mt__block_max(float v) {
  __shared__ float sh[32];
  unsigned lane = threadIdx.x & 31u, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = mt__warp_max(v);
  __syncthreads();
  if (lane == 0) sh[w] = v;
  __syncthreads();
  return mt__warp_max(lane < nw ? sh[lane] : -FLT_MAX);
}

#endif
