// Torch-free CUDA streaming top-k: core::topk_update's contract on device pointers, on `stream`.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "pyengine/core/matrix.h"

namespace pyengine::cuda {

cudaError_t topk_update(const core::MatrixView& values, const std::int64_t* ids, const std::int64_t* payload,
                        std::int64_t k, double* top_values, std::int64_t* top_ids, std::int64_t* top_payload,
                        cudaStream_t stream);

}  // namespace pyengine::cuda
