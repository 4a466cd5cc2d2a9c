/* cuda_backend.h — what device.c calls for "cuda:N" devices (kernels/cuda).
 *
 * Internal to kernels/ (and bench/gpu_bench): the engine reaches a GPU only
 * through device.h and d->ops. Defined in device_cuda.cu (the cuBLAS loader
 * in blas_lazy.cu, the flash kernels' occupancy in flash_cuda.cu; C
 * linkage); built only when the build
 * has CUDA (or runs the kernels on the CPU emulator, tests/gpu/emu).
 */
#ifndef MT_CUDA_BACKEND_H
#define MT_CUDA_BACKEND_H

#include <stddef.h>

#include "device.h"

#ifdef __cplusplus
extern "C" {
#endif

/* GPUs usable here; 0 with the CUDA runtime's reason in why ("" when it
 * simply found none). Never fails: no driver is 0 devices. */
int mt__cuda_count(char *why, size_t why_len);

/* Total and free memory of GPU `index`; MT_EIO with the runtime's reason. */
int mt__cuda_memory(int index, size_t *total, size_t *free_bytes);

/* 1 when this process has lost GPU `index` (mt_device_lost), the reason in
 * why; else 0. */
int mt__cuda_lost(int index, char *why, size_t why_len);

/* Loads cuBLAS and cuBLASLt with every function the backend calls, once
 * for the process (blas_lazy.cu; mt__cuda_open calls it first): 0, or
 * MT_EIO naming what could not be loaded and what to do. Not in the
 * emulator's build, which defines cuBLAS itself. */
int mt__cuda_blas_load(void);

/* Fills d's CUDA state (streams, cuBLASLt, workspaces) for GPU `index`. */
int mt__cuda_open(mt_device *d, int index);
void mt__cuda_close(mt_device *d);

void *mt__cuda_alloc(mt_device *d, size_t bytes);
void mt__cuda_free(mt_device *d, void *p);

typedef enum { MT__CUDA_HTOD, MT__CUDA_DTOH, MT__CUDA_DTOD } mt__cuda_copy;
int mt__cuda_memcpy(mt_device *d, void *dst, const void *src, size_t bytes, mt__cuda_copy kind);
int mt__cuda_memset0(mt_device *d, void *p, size_t bytes);
int mt__cuda_sync(mt_device *d);
int mt__cuda_profiler(mt_device *d, int on); /* mt_device_profiler */
void mt__cuda_wait(mt_device *d);            /* the wait of mt__cuda_sync, its error kept */
int mt__cuda_fault_pending(mt_device *d, char *msg, size_t len); /* mt_device_fault_pending */

/* Blocks an SM of d's GPU holds of the flash kernels for head_size (the
 * forward, dK/dV and dQ, into blocks[0..2]; the forward of 32 query rows a
 * warp into blocks[3], 0 where it does not run), bf16 or (fp16) binary16,
 * set up as the launches set them up: for bench/gpu_bench. MT_ENOTSUP on
 * the emulator. (flash_cuda.cu) */
int mt__cuda_flash_blocks_per_sm(mt_device *d, int head_size, int fp16, int blocks[4]);

/* For bench/gpu_bench: from now on each flash backward on d records
 * events[0..3] (cudaEvent_t, created by the caller on d's GPU) on d's
 * stream around the kernels of its first group of samples (all of them
 * up to mt_flash_bwd_samples): before k_flash_dot, after it, after the
 * dK/dV kernel, after the dQ kernel. events NULL: no more. (flash_cuda.cu) */
void mt__cuda_flash_bwd_timing(mt_device *d, void *const events[4]);

/* The flash forward's query rows a warp on d from now on: 16 or 32 (32
 * at head sizes to 160; at 256, 16 whatever is asked), or 0: for each new
 * shape, both timed on its first call and the faster kept. Their outputs
 * are the same bits. Returns MT_EINVAL for any other value. Set from
 * MTNLG_FLASH_FWD_ROWS when the device opens. (flash_cuda.cu) */
int mt__cuda_flash_fwd_rows(mt_device *d, int rows);
/* The rows d's flash forward runs with for this shape: those set, else
 * those timed faster for it, 0 while it has not run */
int mt__cuda_flash_fwd_rows_of(mt_device *d, int head_size, int fp16, int B, int T, int NH,
                               int dropout, int docs);
/* Whether d's flash forward of this shape passes P in registers: at 16
 * rows a warp, bf16, where the device allows it, unless the shape's first
 * call timed it faster through shared memory (MTNLG_FLASH_FWD_ROWS=16
 * leaves registers, untimed); 0 at 32 rows or before the timing */
int mt__cuda_flash_fwd_p_regs_of(mt_device *d, int head_size, int fp16, int B, int T, int NH,
                                 int dropout, int docs);

/* Loads a known 16 × 16 fp32 accumulator on d's GPU and counts into
 * *misplaced its elements that are not where the flash kernels' row work
 * assumes (mma.m16n8k16's layout, flash_cuda.cu's acc_row and acc_col):
 * 0 on sm_80 and later, and on the emulator. (flash_cuda.cu) */
int mt__cuda_acc_layout_check(mt_device *d, int *misplaced);
/* The same for a bf16 row-major wmma matrix_a fragment against
 * mma.m16n8k16's A operand (the accumulator's places), read when the
 * device opens: where none is misplaced, the bf16 flash kernels' P and dS
 * pass to their products in registers. The emulator places
 * them so, or in its own order after mt_emu_set_a_layout(0).
 * (flash_cuda.cu) */
int mt__cuda_a_layout_check(mt_device *d, int *misplaced);
/* Whether d's flash kernels pass P and dS (bf16) in registers from now
 * on (on nonzero) or through shared memory: the same bits either way, for
 * tests and bench/gpu_bench. MT_EINVAL for on where d's probe found the
 * matrix_a fragment laid out otherwise. (flash_cuda.cu) */
int mt__cuda_flash_p_regs(mt_device *d, int on);
/* 1 when d's flash kernels pass P and dS in registers, else 0 */
int mt__cuda_flash_p_regs_of(mt_device *d);

/* How d computes the attention of a 16-bit qkv from now on: by the flash
 * kernels (flash_cuda.cu), by chunked GEMMs in the 16-bit type around row
 * kernels (attention_cuda.cu, Megatron's unfused path), or auto: each
 * shape's first forward, and first backward with a 16-bit dqkv, time both
 * and keep the faster for that pass (a backward into an fp32 dqkv, which
 * adds, is not timed: flash). The two round differently, so auto, like
 * cuDNN's benchmark mode, makes a run's bits depend on its timings (a
 * resumed run may differ from a straight one in the last bits); flash and
 * chunked do not. Head sizes over MT_FLASH_MAX_HS always take the GEMMs.
 * MT_EINVAL for any other value. Set from MTNLG_ATTENTION (flash, the
 * default; chunked; auto) when the device opens. (attention_cuda.cu) */
enum { MT__CUDA_ATT_AUTO = 0, MT__CUDA_ATT_FLASH = 1, MT__CUDA_ATT_CHUNKED = 2 };
int mt__cuda_attention_path(mt_device *d, int path);
/* mt_device_set_attention's: the path named "flash", "chunked" or "auto",
 * set and logged when it changes what d does (device_cuda.cu) */
int mt__cuda_attention_backend(mt_device *d, const char *name);
/* What mt__cuda_attention_path last set on d (or MTNLG_ATTENTION did) */
int mt__cuda_attention_path_mode(mt_device *d);
/* The path d's attention of a 16-bit qkv of this shape takes in its
 * forward (bwd 0) or backward (bwd 1): MT__CUDA_ATT_FLASH or _CHUNKED, or
 * MT__CUDA_ATT_AUTO while auto has not timed it */
int mt__cuda_attention_path_of(mt_device *d, int bwd, int head_size, int fp16, int B, int T, int NH,
                               int dropout, int docs);
/* The chunked path's chunks of a 16-bit qkv on d from now on: at most
 * `rows` query rows and `heads` heads each, 0 for the scratch budget's
 * (MT_GPU_ATT_ROWS rows, as many heads as fit MT_GPU_ATT_FLOATS). Chunks
 * only shrink (each count at most the budget's), and with them the
 * device's own scratch the path makes. Also set from MTNLG_ATTENTION_CHUNK
 * (ROWSxHEADS) when the device opens.
 * gpu_bench times smaller chunks, whose score tensors a GPU's L2 cache
 * may hold between the kernels that write and read them. MT_EINVAL for a
 * negative count. (attention_cuda.cu) */
int mt__cuda_attention_chunk(mt_device *d, int rows, int heads);
/* Bytes of the chunked 16-bit path's own scratch d holds: 0 until that
 * path first runs (attention_cuda.cu) */
size_t mt__cuda_attention_chunked_bytes(mt_device *d);
/* The chunks d's chunked path takes a 16-bit qkv of this shape in now:
 * *rows query rows and *heads heads */
void mt__cuda_attention_chunk_of(mt_device *d, int T, int NH, int head_size, int *rows, int *heads);

#ifdef __cplusplus
}
#endif

#endif
