// Torch-free CUDA Gram accumulation: the contract of core::gram_accumulate on device
// pointers, launched on `stream`.
#pragma once

#include <cuda_runtime.h>

#include "pyengine/core/matrix.h"

namespace pyengine::cuda {

// gram (x.cols x x.cols, row-major float64) += x^T x; sums (nullable) += column sums.
// Returns the launch status. Symmetric to rounding: row splits are combined atomically.
cudaError_t gram_accumulate(const core::MatrixView& x, double* gram, double* sums,
                            cudaStream_t stream);

}  // namespace pyengine::cuda
