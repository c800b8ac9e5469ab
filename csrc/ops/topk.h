#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace pyengine::ops {

// topk_update's checked arguments.
struct TopkUpdateArgs {
  at::Tensor ids;      // contiguous int64
  at::Tensor payload;  // contiguous int64; undefined when absent
};

TopkUpdateArgs prepare_topk_update(const at::Tensor& values, const at::Tensor& ids,
                                   const std::optional<at::Tensor>& payload, const at::Tensor& top_values,
                                   const at::Tensor& top_ids, const at::Tensor& top_payload);

}  // namespace pyengine::ops
