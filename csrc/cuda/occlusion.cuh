// Torch-free CUDA occlusion sweeps: the contracts of core::occlusion_fill and
// core::occlusion_accumulate on device pointers, launched on `stream`.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "pyengine/core/occlusion.h"

namespace pyengine::cuda {

cudaError_t occlusion_fill(const core::OcclusionGrid& grid, const void* inputs, const void* baseline,
                           bool baseline_per_input, std::int64_t batch, std::int64_t element_size, std::int64_t first,
                           std::int64_t count, void* out, cudaStream_t stream);

cudaError_t occlusion_accumulate(const core::OcclusionGrid& grid, const double* drops, std::int64_t batch,
                                 std::int64_t targets, std::int64_t first, std::int64_t count, double* sums,
                                 cudaStream_t stream);

}  // namespace pyengine::cuda
