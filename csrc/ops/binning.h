#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace pyengine::ops {

// Validates binned_statistics' arguments and allocates its zeroed outputs
// (targets, d, 2, bins) float64; returns (labels as contiguous uint8, low, high as float64,
// counts, sums), shared by the CPU and CUDA kernels.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prepare_binned_statistics(
    const at::Tensor& h, const at::Tensor& labels, const at::Tensor& low, const at::Tensor& high,
    int64_t bins);

}  // namespace pyengine::ops
