// gram_accumulate (CPU) and gram_eigh (any device, composite of ATen ops).
#include "gram.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "check.h"
#include "pyengine/core/gram.h"

namespace pyengine::ops {

void check_gram_accumulate(const at::Tensor& gram, const at::Tensor& x,
                           const std::optional<at::Tensor>& sums) {
  constexpr const char* op = "pyengine.gram_accumulate";
  check_tensor(op, x, {"x", 2, {at::kHalf, at::kBFloat16, at::kFloat, at::kDouble}});
  check_tensor(op, gram, {"gram", 2, {at::kDouble}, true}, &x, "x");
  const int64_t d = x.size(1);
  TORCH_CHECK(gram.size(0) == d && gram.size(1) == d, op, ": gram has shape ",
              shape_string(gram), " but x has ", d, " columns; expected gram of shape (", d,
              ", ", d, ")");
  if (sums.has_value()) {
    check_tensor(op, *sums, {"sums", 1, {at::kDouble}, true}, &x, "x");
    TORCH_CHECK(sums->size(0) == d, op, ": sums has shape ", shape_string(*sums),
                " but x has ", d, " columns; expected (", d, ",)");
    check_no_alias(op, "sums", *sums, "x", x);
    check_no_alias(op, "gram", gram, "sums", *sums);
  }
  check_no_alias(op, "gram", gram, "x", x);
}

namespace {

void gram_accumulate_cpu(at::Tensor gram, const at::Tensor& x, std::optional<at::Tensor> sums) {
  check_gram_accumulate(gram, x, sums);
  core::gram_accumulate(matrix_view(x), gram.data_ptr<double>(),
                        sums.has_value() ? sums->data_ptr<double>() : nullptr,
                        at::get_num_threads());
}

std::tuple<at::Tensor, at::Tensor> gram_eigh(const at::Tensor& gram, std::optional<int64_t> n,
                                             const std::optional<at::Tensor>& center_sums) {
  constexpr const char* op = "pyengine.gram_eigh";
  check_tensor(op, gram, {"gram", 2, {at::kFloat, at::kDouble}});
  TORCH_CHECK(gram.size(0) == gram.size(1), op, ": gram must be square, got shape ",
              shape_string(gram));
  TORCH_CHECK(!n.has_value() || *n > 0, op, ": n must be the positive number of rows ",
              "accumulated, got ", n.value_or(0));
  at::Tensor matrix = gram;
  if (center_sums.has_value()) {
    TORCH_CHECK(n.has_value(), op, ": centering needs n, the number of rows accumulated");
    check_tensor(op, *center_sums, {"center_sums", 1, {at::kFloat, at::kDouble}}, &gram, "gram");
    TORCH_CHECK(center_sums->size(0) == gram.size(0), op, ": center_sums has shape ",
                shape_string(*center_sums), "; expected (", gram.size(0), ",)");
    const at::Tensor s = center_sums->to(gram.scalar_type());
    matrix = gram - at::outer(s, s) / static_cast<double>(*n);
  }
  if (n.has_value()) matrix = matrix / static_cast<double>(*n);
  auto [values, vectors] = at::linalg_eigh(matrix, "U");
  return {values.flip({0}), vectors.flip({1})};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CPU, m) { m.impl("gram_accumulate", &gram_accumulate_cpu); }

TORCH_LIBRARY_IMPL(pyengine, CompositeImplicitAutograd, m) { m.impl("gram_eigh", &gram_eigh); }

}  // namespace pyengine::ops
