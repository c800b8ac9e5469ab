#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace pyengine::ops {

// Validates gram_accumulate's arguments (shared by the CPU and CUDA kernels).
void check_gram_accumulate(const at::Tensor& gram, const at::Tensor& x,
                           const std::optional<at::Tensor>& sums);

}  // namespace pyengine::ops
