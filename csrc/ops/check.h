// The one argument-check helper every op uses: errors name the op, the argument, what
// was expected and what was given, before any pointer is touched.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/safe_numerics.h>

#include <initializer_list>
#include <optional>
#include <sstream>
#include <string>
#include <utility>

#include "pyengine/core/matrix.h"

namespace pyengine::ops {

inline std::string shape_string(const at::Tensor& t) {
  std::ostringstream out;
  out << "(";
  for (int64_t i = 0; i < t.dim(); ++i) out << (i ? ", " : "") << t.size(i);
  out << (t.dim() == 1 ? ",)" : ")");
  return out.str();
}

struct TensorSpec {
  const char* name;
  int64_t dim;                                  // required number of dimensions
  std::initializer_list<at::ScalarType> dtypes;  // allowed dtypes
  bool contiguous = false;                       // must be contiguous (written in place)
};

// Checks one tensor against its spec and, when given, the device of `reference`.
inline void check_tensor(const char* op, const at::Tensor& t, const TensorSpec& spec,
                         const at::Tensor* reference = nullptr,
                         const char* reference_name = nullptr) {
  TORCH_CHECK(t.defined(), op, ": ", spec.name, " is undefined; expected a tensor");
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", spec.name, " has layout ", t.layout(),
              "; expected a dense (strided) tensor");
  TORCH_CHECK(t.dim() == spec.dim, op, ": ", spec.name, " must be ", spec.dim,
              "-D, got shape ", shape_string(t));
  bool dtype_ok = false;
  std::ostringstream allowed;
  for (auto dtype : spec.dtypes) {
    dtype_ok = dtype_ok || t.scalar_type() == dtype;
    allowed << (allowed.tellp() > 0 ? "/" : "") << c10::toString(dtype);
  }
  TORCH_CHECK(dtype_ok, op, ": ", spec.name, " has dtype ", t.scalar_type(), "; expected ",
              allowed.str());
  TORCH_CHECK(!spec.contiguous || t.is_contiguous(), op, ": ", spec.name,
              " must be contiguous (it is written in place); call .contiguous() first");
  if (reference != nullptr) {
    TORCH_CHECK(t.device() == reference->device(), op, ": ", spec.name, " is on ", t.device(),
                " but ", reference_name, " is on ", reference->device(),
                "; all tensors must be on one device");
  }
}

// Overflow-safe size arithmetic: every size product, sum or range end a kernel relies on
// goes through these, so a wrapped int64 never passes a size check or reaches a pointer.
inline int64_t checked_mul(const char* op, const std::string& what, int64_t a, int64_t b) {
  int64_t out = 0;
  TORCH_CHECK(!c10::mul_overflows(a, b, &out), op, ": ", what, " overflows int64 (", a, " * ", b, ")");
  return out;
}

inline int64_t checked_add(const char* op, const std::string& what, int64_t a, int64_t b) {
  int64_t out = 0;
  TORCH_CHECK(!c10::add_overflows(a, b, &out), op, ": ", what, " overflows int64 (", a, " + ", b, ")");
  return out;
}

inline int64_t checked_product(const char* op, const std::string& what, std::initializer_list<int64_t> factors) {
  int64_t out = 1;
  for (const int64_t f : factors) out = checked_mul(op, what, out, f);
  return out;
}

inline int64_t checked_numel(const char* op, const std::string& what, at::IntArrayRef factors) {
  int64_t out = 1;
  for (const int64_t f : factors) out = checked_mul(op, what, out, f);
  return out;
}

// Whether two strided tensors may share memory: the same storage and overlapping byte
// spans (conservative for interleaved views, exact for the usual slices and aliases).
inline bool may_share_memory(const at::Tensor& a, const at::Tensor& b) {
  if (!a.defined() || !b.defined() || a.numel() == 0 || b.numel() == 0) return false;
  if (!a.storage().is_alias_of(b.storage())) return false;
  auto span = [](const at::Tensor& t) {
    int64_t last = 0;  // the furthest element, in elements (torch strides are non-negative)
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    const auto* begin = static_cast<const char*>(t.data_ptr());
    return std::pair{begin, begin + (last + 1) * static_cast<int64_t>(t.element_size())};
  };
  const auto [a_begin, a_end] = span(a);
  const auto [b_begin, b_end] = span(b);
  return a_begin < b_end && b_begin < a_end;
}

// `written` is modified in place, so it must not share memory with `other` (an input or
// another output): the kernel would read values it has already overwritten.
inline void check_no_alias(const char* op, const char* written_name, const at::Tensor& written,
                           const char* other_name, const at::Tensor& other) {
  TORCH_CHECK(!may_share_memory(written, other), op, ": ", written_name, " shares memory with ", other_name,
              "; expected separate tensors (", written_name, " is written in place)");
}

inline core::DType core_dtype(at::ScalarType type) {
  switch (type) {
    case at::kHalf:
      return core::DType::Float16;
    case at::kBFloat16:
      return core::DType::BFloat16;
    case at::kFloat:
      return core::DType::Float32;
    case at::kDouble:
      return core::DType::Float64;
    default:
      TORCH_CHECK(false, "pyengine: unsupported dtype ", type);
  }
}

// A torch-free view of a checked 2-D floating tensor (any strides).
inline core::MatrixView matrix_view(const at::Tensor& x) {
  core::MatrixView view;
  view.data = x.data_ptr();
  view.dtype = core_dtype(x.scalar_type());
  view.rows = x.size(0);
  view.cols = x.size(1);
  view.row_stride = x.stride(0);
  view.col_stride = x.stride(1);
  return view;
}

}  // namespace pyengine::ops
