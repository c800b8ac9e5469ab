// The glue's one CUDA status check: a failure names the op and what failed.
#pragma once

#include <c10/util/Exception.h>
#include <cuda_runtime.h>

namespace pyengine::ops {

inline void check_cuda(cudaError_t status, const char* op, const char* what = "CUDA launch") {
  TORCH_CHECK(status == cudaSuccess, op, ": ", what, " failed: ", cudaGetErrorString(status));
}

}  // namespace pyengine::ops
