/* kernels/cuda/flash_cuda.cu built as C++ for the CPU emulator (see cuda_emu.h). */
#include "flash_cuda.cu"
