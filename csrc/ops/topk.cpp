// topk_update: shared checks and the CPU kernel.
#include "topk.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "check.h"
#include "pyengine/core/topk.h"

namespace pyengine::ops {

TopkUpdateArgs prepare_topk_update(const at::Tensor& values, const at::Tensor& ids,
                                   const std::optional<at::Tensor>& payload, const at::Tensor& top_values,
                                   const at::Tensor& top_ids, const at::Tensor& top_payload) {
  constexpr const char* op = "pyengine.topk_update";
  check_tensor(op, values, {"values", 2, {at::kHalf, at::kBFloat16, at::kFloat, at::kDouble}});
  check_tensor(op, ids, {"ids", 1, {at::kLong}}, &values, "values");
  check_tensor(op, top_values, {"top_values", 2, {at::kDouble}, true}, &values, "values");
  check_tensor(op, top_ids, {"top_ids", 2, {at::kLong}, true}, &values, "values");
  check_tensor(op, top_payload, {"top_payload", 2, {at::kLong}, true}, &values, "values");
  TORCH_CHECK(ids.size(0) == values.size(0), op, ": ids has ", ids.size(0), " entries but values has ",
              values.size(0), " rows; expected one id per row");
  TORCH_CHECK(top_values.size(0) == values.size(1) && top_values.size(1) >= 1 &&
                  top_ids.sizes() == top_values.sizes() && top_payload.sizes() == top_values.sizes(),
              op, ": top_values, top_ids and top_payload must all be (", values.size(1), ", k) with k >= 1; got ",
              shape_string(top_values), ", ", shape_string(top_ids), ", ", shape_string(top_payload));
  at::Tensor extra;
  if (payload.has_value() && payload->defined()) {
    check_tensor(op, *payload, {"payload", 2, {at::kLong}}, &values, "values");
    TORCH_CHECK(payload->sizes() == values.sizes(), op, ": payload has shape ", shape_string(*payload),
                "; expected the shape of values ", shape_string(values));
    extra = payload->contiguous();
  }
  // The running lists are written in place: none may share memory with another argument.
  const std::pair<const char*, const at::Tensor*> written[] = {
      {"top_values", &top_values}, {"top_ids", &top_ids}, {"top_payload", &top_payload}};
  const std::pair<const char*, const at::Tensor*> inputs[] = {{"values", &values}, {"ids", &ids}, {"payload", &extra}};
  for (size_t i = 0; i < 3; ++i) {
    for (const auto& [name, tensor] : inputs) check_no_alias(op, written[i].first, *written[i].second, name, *tensor);
    for (size_t j = i + 1; j < 3; ++j) {
      check_no_alias(op, written[i].first, *written[i].second, written[j].first, *written[j].second);
    }
  }
  return {.ids = ids.contiguous(), .payload = extra};
}

namespace {

void topk_update_cpu(const at::Tensor& values, const at::Tensor& ids, const std::optional<at::Tensor>& payload,
                     const at::Tensor& top_values, const at::Tensor& top_ids, const at::Tensor& top_payload) {
  const TopkUpdateArgs args = prepare_topk_update(values, ids, payload, top_values, top_ids, top_payload);
  core::topk_update(matrix_view(values), args.ids.data_ptr<int64_t>(),
                    args.payload.defined() ? args.payload.data_ptr<int64_t>() : nullptr,
                    top_values.size(1), top_values.data_ptr<double>(), top_ids.data_ptr<int64_t>(),
                    top_payload.data_ptr<int64_t>(), at::get_num_threads());
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CPU, m) { m.impl("topk_update", &topk_update_cpu); }

}  // namespace pyengine::ops
