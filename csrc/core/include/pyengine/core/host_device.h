// Marks inline core functions that the CUDA kernels share with the CPU code.
#pragma once

#if defined(__CUDACC__)
#define PYENGINE_HOST_DEVICE __host__ __device__
#else
#define PYENGINE_HOST_DEVICE
#endif
