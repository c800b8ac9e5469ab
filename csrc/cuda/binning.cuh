// Torch-free CUDA binned label statistics: the contract of core::binned_statistics on
// device pointers, launched on `stream`.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "pyengine/core/matrix.h"

namespace pyengine::cuda {

cudaError_t binned_statistics(const core::MatrixView& h, const std::uint8_t* labels,
                              std::int64_t targets, const double* low, const double* high,
                              std::int64_t bins, double* counts, double* sums, cudaStream_t stream);

}  // namespace pyengine::cuda
