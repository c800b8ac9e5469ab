#pragma once

#include <ATen/core/Tensor.h>

namespace pyengine::ops {

// binned_statistics' checked arguments and zeroed outputs, shared by the CPU and CUDA kernels.
struct BinnedStatisticsArgs {
  at::Tensor labels;  // contiguous uint8 flags (targets, n)
  at::Tensor low;     // contiguous float64 (d,)
  at::Tensor high;    // contiguous float64 (d,)
  at::Tensor counts;  // (targets, d, 2, bins) float64
  at::Tensor sums;    // (targets, d, 2, bins) float64
};

BinnedStatisticsArgs prepare_binned_statistics(const at::Tensor& h, const at::Tensor& labels, const at::Tensor& low,
                                               const at::Tensor& high, int64_t bins);

}  // namespace pyengine::ops
