/* blas_lazy.h — cuBLAS and cuBLASLt, loaded when the first GPU opens.
 *
 * Included by device_cuda.cu alone, after the CUDA headers, in the real
 * build (the emulator, MT_CUDA_EMU, defines these functions itself).
 * libcublasLt takes about 0.3 s to load, and every mtnlgd, CPU run or
 * not, loaded it at start (as did every tool and test linked with
 * kernels/). Now the program links the runtime only; mt__cuda_blas_load
 * dlopens both libraries by their soname (the loader's search: the
 * ld.so cache, LD_LIBRARY_PATH) when a device opens, and each name below
 * then calls through a pointer of the header's own type, so a signature
 * that changes in a later toolkit fails the build, not the call.
 */
#ifndef MT_CUDA_BLAS_LAZY_H
#define MT_CUDA_BLAS_LAZY_H

#include <cublasLt.h>
#include <cublas_v2.h>

/* from libcublasLt */
#define MT__BLAS_LT_FNS(X)                                                                         \
  X(cublasLtCreate)                                                                                \
  X(cublasLtDestroy)                                                                               \
  X(cublasLtMatmul)                                                                                \
  X(cublasLtMatmulAlgoGetHeuristic)                                                                \
  X(cublasLtMatmulDescCreate)                                                                      \
  X(cublasLtMatmulDescDestroy)                                                                     \
  X(cublasLtMatmulDescSetAttribute)                                                                \
  X(cublasLtMatmulPreferenceCreate)                                                                \
  X(cublasLtMatmulPreferenceDestroy)                                                               \
  X(cublasLtMatmulPreferenceSetAttribute)                                                          \
  X(cublasLtMatrixLayoutCreate)                                                                    \
  X(cublasLtMatrixLayoutDestroy)                                                                   \
  X(cublasLtMatrixLayoutSetAttribute)
/* from libcublas (cublas_v2.h names the _v2 symbols) */
#define MT__BLAS_FNS(X)                                                                            \
  X(cublasCreate_v2)                                                                               \
  X(cublasDestroy_v2)                                                                              \
  X(cublasSetStream_v2)                                                                            \
  X(cublasSetWorkspace_v2)                                                                         \
  X(cublasGetStatusString)

/* cublas_api.h overloads this one for C++ (an inline taking the older
 * cudaDataType compute type): the library's symbol takes a
 * cublasComputeType_t; blas_lazy.cu takes its address as this type, which
 * compiles only while the header declares exactly this signature. */
typedef cublasStatus_t (*mt__gemm_strided_batched_ex)(
    cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int, const void *, const void *,
    cudaDataType, int, long long int, const void *, cudaDataType, int, long long int, const void *,
    void *, cudaDataType, int, long long int, int, cublasComputeType_t, cublasGemmAlgo_t);

struct mt__blas_fns {
#define MT__BLAS_MEMBER(name) decltype(&::name) name;
  MT__BLAS_LT_FNS(MT__BLAS_MEMBER)
  MT__BLAS_FNS(MT__BLAS_MEMBER)
#undef MT__BLAS_MEMBER
  mt__gemm_strided_batched_ex cublasGemmStridedBatchedEx;
};
/* filled by mt__cuda_blas_load (cuda_backend.h) */
extern mt__blas_fns mt__blas;

/* From here on in the file that includes this, each name is the loaded
 * function (cublasCreate is cublas_v2.h's macro for cublasCreate_v2);
 * blas_lazy.cu, which fills the table, sees the real names. */
#ifndef MT__BLAS_NO_REDIRECT
#define cublasLtCreate mt__blas.cublasLtCreate
#define cublasLtDestroy mt__blas.cublasLtDestroy
#define cublasLtMatmul mt__blas.cublasLtMatmul
#define cublasLtMatmulAlgoGetHeuristic mt__blas.cublasLtMatmulAlgoGetHeuristic
#define cublasLtMatmulDescCreate mt__blas.cublasLtMatmulDescCreate
#define cublasLtMatmulDescDestroy mt__blas.cublasLtMatmulDescDestroy
#define cublasLtMatmulDescSetAttribute mt__blas.cublasLtMatmulDescSetAttribute
#define cublasLtMatmulPreferenceCreate mt__blas.cublasLtMatmulPreferenceCreate
#define cublasLtMatmulPreferenceDestroy mt__blas.cublasLtMatmulPreferenceDestroy
#define cublasLtMatmulPreferenceSetAttribute mt__blas.cublasLtMatmulPreferenceSetAttribute
#define cublasLtMatrixLayoutCreate mt__blas.cublasLtMatrixLayoutCreate
#define cublasLtMatrixLayoutDestroy mt__blas.cublasLtMatrixLayoutDestroy
#define cublasLtMatrixLayoutSetAttribute mt__blas.cublasLtMatrixLayoutSetAttribute
#define cublasCreate_v2 mt__blas.cublasCreate_v2
#define cublasDestroy_v2 mt__blas.cublasDestroy_v2
#define cublasSetStream_v2 mt__blas.cublasSetStream_v2
#define cublasSetWorkspace_v2 mt__blas.cublasSetWorkspace_v2
#define cublasGemmStridedBatchedEx mt__blas.cublasGemmStridedBatchedEx
#define cublasGetStatusString mt__blas.cublasGetStatusString
#endif

#endif
