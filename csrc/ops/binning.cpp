// binned_statistics: argument checks (shared) and the CPU kernel.
#include "binning.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "check.h"
#include "pyengine/core/binning.h"

namespace pyengine::ops {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prepare_binned_statistics(
    const at::Tensor& h, const at::Tensor& labels, const at::Tensor& low, const at::Tensor& high,
    int64_t bins) {
  constexpr const char* op = "pyengine.binned_statistics";
  check_tensor(op, h, {"h", 2, {at::kHalf, at::kBFloat16, at::kFloat, at::kDouble}});
  check_tensor(op, labels, {"labels", 2, {at::kBool, at::kByte, at::kInt, at::kLong}}, &h, "h");
  check_tensor(op, low, {"low", 1, {at::kFloat, at::kDouble}}, &h, "h");
  check_tensor(op, high, {"high", 1, {at::kFloat, at::kDouble}}, &h, "h");
  const int64_t n = h.size(0);
  const int64_t d = h.size(1);
  TORCH_CHECK(labels.size(1) == n, op, ": labels has shape ", shape_string(labels), " but h has ", n,
              " rows; expected labels of shape (targets, ", n, ")");
  TORCH_CHECK(low.size(0) == d && high.size(0) == d, op, ": low and high must have shape (", d,
              ",), one value per column of h; got ", shape_string(low), " and ", shape_string(high));
  TORCH_CHECK(bins >= 1, op, ": bins must be a positive integer, got ", bins);
  const auto options = h.options().dtype(at::kDouble);
  const std::vector<int64_t> shape{labels.size(0), d, 2, bins};
  return {labels.ne(0).to(at::kByte).contiguous(), low.to(at::kDouble).contiguous(),
          high.to(at::kDouble).contiguous(), at::zeros(shape, options), at::zeros(shape, options)};
}

namespace {

std::tuple<at::Tensor, at::Tensor> binned_statistics_cpu(const at::Tensor& h, const at::Tensor& labels,
                                                         const at::Tensor& low, const at::Tensor& high,
                                                         int64_t bins) {
  auto [flags, low64, high64, counts, sums] = prepare_binned_statistics(h, labels, low, high, bins);
  core::binned_statistics(matrix_view(h), flags.data_ptr<uint8_t>(), flags.size(0), low64.data_ptr<double>(),
                          high64.data_ptr<double>(), bins, counts.data_ptr<double>(), sums.data_ptr<double>(),
                          at::get_num_threads());
  return {counts, sums};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CPU, m) { m.impl("binned_statistics", &binned_statistics_cpu); }

}  // namespace pyengine::ops
