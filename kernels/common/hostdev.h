/* hostdev.h — MT_HD marks a function callable from host C and CUDA device code.
 *
 * Everything in kernels/common is static inline and MT_HD, so the CPU backend,
 * the CUDA kernels and the tests compile one definition of each formula.
 */
#ifndef MT_HOSTDEV_H
#define MT_HOSTDEV_H

#ifdef __CUDACC__
#define MT_HD __host__ __device__
#else
#define MT_HD
#endif

#endif
