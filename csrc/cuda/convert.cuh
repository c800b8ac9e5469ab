// Exact widening of every supported storage type to double, on the device.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace pyengine::cuda {

template <typename T>
__device__ __forceinline__ double to_double(const T* p) {
  return static_cast<double>(*p);
}
template <>
__device__ __forceinline__ double to_double<__half>(const __half* p) {
  return static_cast<double>(__half2float(*p));
}
template <>
__device__ __forceinline__ double to_double<__nv_bfloat16>(const __nv_bfloat16* p) {
  return static_cast<double>(__bfloat162float(*p));
}

}  // namespace pyengine::cuda
