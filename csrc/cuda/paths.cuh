// Torch-free CUDA hierarchical path decomposition: core::hierarchical_paths' contract on
// device pointers (steps and activation pointers themselves in device memory), on `stream`.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "pyengine/core/paths.h"

namespace pyengine::cuda {

// Workspace per (input, target) pair, in device memory: `max_units` doubles and bytes (the
// largest layer), `max_candidates` candidates per beam entry (the most units a target unit
// connects to), see workspace_bytes.
std::size_t path_workspace_bytes(std::int64_t pairs, std::int64_t layers, std::int64_t beam, std::int64_t max_units,
                                 std::int64_t max_candidates);

cudaError_t hierarchical_paths(const core::PathStep* steps, std::int64_t layers, const double* const* activations,
                               std::int64_t batch, const std::int64_t* targets, std::int64_t per_input,
                               std::int64_t beam, std::int64_t max_units, std::int64_t max_candidates,
                               void* workspace, std::int64_t* paths, double* scores, cudaStream_t stream);

}  // namespace pyengine::cuda
