// occlusion_batch and occlusion_accumulate: shared checks and the CPU kernels.
#include "occlusion.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "check.h"

namespace pyengine::ops {
namespace {

std::string list_string(at::IntArrayRef values) {
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < values.size(); ++i) out << (i ? ", " : "") << values[i];
  out << (values.size() == 1 ? ",)" : ")");
  return out.str();
}

// The grid of windows over `shape` (an input without its batch dimension), checked.
core::OcclusionGrid checked_grid(const char* op, at::IntArrayRef shape, at::IntArrayRef window,
                                 at::IntArrayRef stride, int64_t first, int64_t count) {
  const auto dims = static_cast<int64_t>(shape.size());
  TORCH_CHECK(dims >= 1 && dims <= core::kMaxOcclusionDims, op, ": inputs must have 1 to ",
              core::kMaxOcclusionDims, " dimensions after the batch dimension, got ", dims);
  TORCH_CHECK(static_cast<int64_t>(window.size()) == dims && static_cast<int64_t>(stride.size()) == dims, op,
              ": window ", list_string(window), " and stride ", list_string(stride), " must have one entry per input dimension ",
              list_string(shape));
  for (int64_t d = 0; d < dims; ++d) {
    TORCH_CHECK(window[d] >= 1 && window[d] <= shape[d], op, ": window ", list_string(window),
                " must fit the input ", list_string(shape), " (1 <= window <= size in every dimension)");
    TORCH_CHECK(stride[d] >= 1, op, ": stride ", list_string(stride), " must be positive in every dimension");
    TORCH_CHECK(window[d] == shape[d] || stride[d] <= window[d], op, ": stride ", list_string(stride),
                " is larger than window ", list_string(window),
                " in a dimension the window does not cover, so some inputs would never be occluded");
  }
  checked_numel(op, "input size (product of the non-batch dimensions)", shape);
  const core::OcclusionGrid grid = core::make_occlusion_grid(dims, shape.data(), window.data(), stride.data());
  const int64_t windows = checked_numel(op, "number of windows", at::IntArrayRef(grid.counts, dims));
  // first + count is never formed before both are known to fit: no wrapped windows.
  TORCH_CHECK(first >= 0 && count >= 0 && first <= windows && count <= windows - first, op, ": windows first = ",
              first, ", count = ", count, " are out of range; expected 0 <= first <= first + count <= ", windows,
              " (the windows of this sweep)");
  return grid;
}

}  // namespace

OcclusionBatchArgs prepare_occlusion_batch(const at::Tensor& inputs, const at::Tensor& baseline,
                                           at::IntArrayRef window, at::IntArrayRef stride, int64_t first,
                                           int64_t count) {
  constexpr const char* op = "pyengine.occlusion_batch";
  TORCH_CHECK(inputs.defined() && inputs.dim() >= 2, op, ": inputs must be (batch, ...) with at least 2 dimensions");
  const at::IntArrayRef shape = inputs.sizes().slice(1);
  const core::OcclusionGrid grid = checked_grid(op, shape, window, stride, first, count);
  TORCH_CHECK(baseline.defined() && baseline.scalar_type() == inputs.scalar_type() &&
                  baseline.device() == inputs.device(),
              op, ": baseline must be a ", inputs.scalar_type(), " tensor on ", inputs.device(), ", like inputs");
  const bool shared = baseline.sizes() == shape;
  const bool per_input = baseline.dim() == inputs.dim() && baseline.sizes() == inputs.sizes();
  TORCH_CHECK(shared || per_input, op, ": baseline has shape ", shape_string(baseline), "; expected ",
              list_string(shape), " (one for all inputs) or ", shape_string(inputs), " (one per input)");
  TORCH_CHECK(inputs.layout() == at::kStrided && baseline.layout() == at::kStrided, op,
              ": inputs and baseline must be dense (strided) tensors");
  const int64_t rows = checked_mul(op, "output rows (count * batch)", count, inputs.size(0));
  checked_product(op, "output size in bytes", {rows, grid.elements(), static_cast<int64_t>(inputs.element_size())});
  std::vector<int64_t> out_shape{rows};
  out_shape.insert(out_shape.end(), shape.begin(), shape.end());
  return {.grid = grid,
          .inputs = inputs.contiguous(),
          .baseline = baseline.contiguous(),
          .baseline_per_input = per_input,
          .out = at::empty(out_shape, inputs.options())};
}

OcclusionAccumulateArgs prepare_occlusion_accumulate(const at::Tensor& sums, const at::Tensor& drops,
                                                     at::IntArrayRef window, at::IntArrayRef stride, int64_t first) {
  constexpr const char* op = "pyengine.occlusion_accumulate";
  TORCH_CHECK(sums.defined() && sums.dim() >= 3, op, ": sums must be (batch, targets, ...) with at least 3 dimensions");
  check_tensor(op, sums, {"sums", sums.dim(), {at::kDouble}, true});
  check_tensor(op, drops, {"drops", 3, {at::kHalf, at::kBFloat16, at::kFloat, at::kDouble}}, &sums, "sums");
  TORCH_CHECK(drops.size(1) == sums.size(0) && drops.size(2) == sums.size(1), op, ": drops has shape ",
              shape_string(drops), " but sums has shape ", shape_string(sums), "; expected drops (windows, ",
              sums.size(0), ", ", sums.size(1), ")");
  check_no_alias(op, "sums", sums, "drops", drops);
  const core::OcclusionGrid grid = checked_grid(op, sums.sizes().slice(2), window, stride, first, drops.size(0));
  return {.grid = grid, .drops = drops.to(at::kDouble).contiguous()};
}

namespace {

at::Tensor occlusion_batch_cpu(const at::Tensor& inputs, const at::Tensor& baseline, at::IntArrayRef window,
                               at::IntArrayRef stride, int64_t first, int64_t count) {
  const OcclusionBatchArgs args = prepare_occlusion_batch(inputs, baseline, window, stride, first, count);
  core::occlusion_fill(args.grid, args.inputs.data_ptr(), args.baseline.data_ptr(), args.baseline_per_input,
                       args.inputs.size(0), args.inputs.element_size(), first, count, args.out.data_ptr(),
                       at::get_num_threads());
  return args.out;
}

void occlusion_accumulate_cpu(const at::Tensor& sums, const at::Tensor& drops, at::IntArrayRef window,
                              at::IntArrayRef stride, int64_t first) {
  const OcclusionAccumulateArgs args = prepare_occlusion_accumulate(sums, drops, window, stride, first);
  core::occlusion_accumulate(args.grid, args.drops.data_ptr<double>(), sums.size(0), sums.size(1), first,
                             args.drops.size(0), sums.data_ptr<double>(), at::get_num_threads());
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CPU, m) {
  m.impl("occlusion_batch", &occlusion_batch_cpu);
  m.impl("occlusion_accumulate", &occlusion_accumulate_cpu);
}

}  // namespace pyengine::ops
