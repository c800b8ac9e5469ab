#pragma once

#include <ATen/core/Tensor.h>

#include "pyengine/core/occlusion.h"

namespace pyengine::ops {

// occlusion_batch's checked arguments and allocated output.
struct OcclusionBatchArgs {
  core::OcclusionGrid grid;
  at::Tensor inputs;    // contiguous
  at::Tensor baseline;  // contiguous
  bool baseline_per_input;
  at::Tensor out;  // (count * B, *S)
};

OcclusionBatchArgs prepare_occlusion_batch(const at::Tensor& inputs, const at::Tensor& baseline,
                                           at::IntArrayRef window, at::IntArrayRef stride, int64_t first,
                                           int64_t count);

// occlusion_accumulate's checked arguments.
struct OcclusionAccumulateArgs {
  core::OcclusionGrid grid;
  at::Tensor drops;  // contiguous float64
};

OcclusionAccumulateArgs prepare_occlusion_accumulate(const at::Tensor& sums, const at::Tensor& drops,
                                                     at::IntArrayRef window, at::IntArrayRef stride, int64_t first);

}  // namespace pyengine::ops
