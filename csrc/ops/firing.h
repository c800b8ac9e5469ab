#pragma once

#include <ATen/core/Tensor.h>

namespace pyengine::ops {

// Checks shared by the CPU and CUDA kernels; each returns the zeroed output.
at::Tensor prepare_pack_firing(const at::Tensor& h);
at::Tensor prepare_firing_disagreements(const at::Tensor& bits);

}  // namespace pyengine::ops
