// Torch-free description of a strided 2-D matrix, shared by the CPU and CUDA kernels.
#pragma once

#include <cstdint>

namespace pyengine::core {

enum class DType : std::uint8_t { Float16, BFloat16, Float32, Float64 };

// A read-only view of `rows` x `cols` elements; strides are in elements, not bytes.
struct MatrixView {
  const void* data = nullptr;
  DType dtype = DType::Float32;
  std::int64_t rows = 0;
  std::int64_t cols = 0;
  std::int64_t row_stride = 0;
  std::int64_t col_stride = 1;
};

// IEEE binary16 -> float, exact (normals, subnormals, inf, nan).
inline float half_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  std::uint32_t exponent = (h >> 10) & 0x1fu;
  std::uint32_t mantissa = h & 0x3ffu;
  std::uint32_t bits;
  if (exponent == 0x1fu) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    exponent = 113;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    bits = sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13);
  }
  float out;
  __builtin_memcpy(&out, &bits, sizeof out);
  return out;
}

// bfloat16 -> float, exact: bfloat16 is the top half of a float.
inline float bfloat16_to_float(std::uint16_t b) {
  const std::uint32_t bits = static_cast<std::uint32_t>(b) << 16;
  float out;
  __builtin_memcpy(&out, &bits, sizeof out);
  return out;
}

// Storage types of the 16-bit formats, and exact widening of every supported type.
struct Half {
  std::uint16_t bits;
};
struct BFloat16 {
  std::uint16_t bits;
};
inline double to_double(const Half* p) { return half_to_float(p->bits); }
inline double to_double(const BFloat16* p) { return bfloat16_to_float(p->bits); }
inline double to_double(const float* p) { return *p; }
inline double to_double(const double* p) { return *p; }

// Calls f(static_cast<const T*>(nullptr)) with T the storage type of `dtype`.
template <typename F>
decltype(auto) visit_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float16:
      return f(static_cast<const Half*>(nullptr));
    case DType::BFloat16:
      return f(static_cast<const BFloat16*>(nullptr));
    case DType::Float32:
      return f(static_cast<const float*>(nullptr));
    case DType::Float64:
      break;
  }
  return f(static_cast<const double*>(nullptr));
}

}  // namespace pyengine::core
