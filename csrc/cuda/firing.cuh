// Torch-free CUDA firing bitsets: the contracts of core::pack_firing and
// core::firing_disagreements on device pointers, launched on `stream`.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "pyengine/core/matrix.h"

namespace pyengine::cuda {

cudaError_t pack_firing(const core::MatrixView& h, double threshold, std::uint64_t* bits, std::int64_t words,
                        cudaStream_t stream);

cudaError_t firing_disagreements(const std::uint64_t* bits, std::int64_t units, std::int64_t words,
                                 std::int64_t* disagreements, cudaStream_t stream);

}  // namespace pyengine::cuda
