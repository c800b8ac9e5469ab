#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace pyengine::ops {

// Validates topk_update's arguments; returns the ids and payload as contiguous int64 (payload
// undefined when absent).
std::tuple<at::Tensor, at::Tensor> prepare_topk_update(const at::Tensor& values, const at::Tensor& ids,
                                                       const std::optional<at::Tensor>& payload,
                                                       const at::Tensor& top_values, const at::Tensor& top_ids,
                                                       const at::Tensor& top_payload);

}  // namespace pyengine::ops
