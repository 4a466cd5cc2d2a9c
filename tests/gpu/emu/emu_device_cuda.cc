/* kernels/cuda/device_cuda.cu built as C++ for the CPU emulator (see cuda_emu.h). */
#include "device_cuda.cu"
