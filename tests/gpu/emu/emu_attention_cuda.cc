/* kernels/cuda/attention_cuda.cu built as C++ for the CPU emulator (see cuda_emu.h). */
#include "attention_cuda.cu"
