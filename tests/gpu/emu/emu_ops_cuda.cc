/* kernels/cuda/ops_cuda.cu built as C++ for the CPU emulator (see cuda_emu.h). */
#include "ops_cuda.cu"
