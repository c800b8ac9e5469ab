#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#include "pyengine/core/occlusion.h"

namespace pyengine::ops {

// Validates occlusion_batch's arguments; returns the grid, the contiguous inputs and
// baseline, whether the baseline is per input, and the allocated output (count * B, *S).
std::tuple<core::OcclusionGrid, at::Tensor, at::Tensor, bool, at::Tensor> prepare_occlusion_batch(
    const at::Tensor& inputs, const at::Tensor& baseline, at::IntArrayRef window, at::IntArrayRef stride,
    int64_t first, int64_t count);

// Validates occlusion_accumulate's arguments; returns the grid and the drops as contiguous float64.
std::tuple<core::OcclusionGrid, at::Tensor> prepare_occlusion_accumulate(const at::Tensor& sums,
                                                                         const at::Tensor& drops,
                                                                         at::IntArrayRef window,
                                                                         at::IntArrayRef stride, int64_t first);

}  // namespace pyengine::ops
