// The one argument-check helper every op uses: errors name the op, the argument, what
// was expected and what was given, before any pointer is touched.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <optional>
#include <sstream>
#include <string>

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
