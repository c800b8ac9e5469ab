// binned_statistics: argument checks (shared) and the CPU kernel.
#include "binning.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "check.h"
#include "pyengine/core/binning.h"

namespace pyengine::ops {

BinnedStatisticsArgs prepare_binned_statistics(const at::Tensor& h, const at::Tensor& labels, const at::Tensor& low,
                                               const at::Tensor& high, int64_t bins) {
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
  checked_product(op, "output size in bytes (targets * d * 2 * bins * 8)", {labels.size(0), d, 2, bins, 8});
  const auto options = h.options().dtype(at::kDouble);
  const std::vector<int64_t> shape{labels.size(0), d, 2, bins};
  return {.labels = labels.ne(0).to(at::kByte).contiguous(),
          .low = low.to(at::kDouble).contiguous(),
          .high = high.to(at::kDouble).contiguous(),
          .counts = at::zeros(shape, options),
          .sums = at::zeros(shape, options)};
}

namespace {

std::tuple<at::Tensor, at::Tensor> binned_statistics_cpu(const at::Tensor& h, const at::Tensor& labels,
                                                         const at::Tensor& low, const at::Tensor& high,
                                                         int64_t bins) {
  const BinnedStatisticsArgs args = prepare_binned_statistics(h, labels, low, high, bins);
  core::binned_statistics(matrix_view(h), args.labels.data_ptr<uint8_t>(), args.labels.size(0),
                          args.low.data_ptr<double>(), args.high.data_ptr<double>(), bins,
                          args.counts.data_ptr<double>(), args.sums.data_ptr<double>(), at::get_num_threads());
  return {args.counts, args.sums};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CPU, m) { m.impl("binned_statistics", &binned_statistics_cpu); }

}  // namespace pyengine::ops
