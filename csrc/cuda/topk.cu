// One thread per column walks the chunk's rows (adjacent threads read adjacent columns of a
// row) and keeps its column's sorted list, exactly as the CPU code does.
#include "convert.cuh"
#include "topk.cuh"
#include "pyengine/core/topk.h"

namespace pyengine::cuda {
namespace {

template <typename T>
__global__ void topk_kernel(const T* __restrict__ data, std::int64_t rows, std::int64_t cols, std::int64_t row_stride,
                            std::int64_t col_stride, const std::int64_t* __restrict__ ids,
                            const std::int64_t* __restrict__ payload, std::int64_t k, double* top_values,
                            std::int64_t* top_ids, std::int64_t* top_payload) {
  const std::int64_t c = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  double* v = top_values + c * k;
  std::int64_t* id = top_ids + c * k;
  std::int64_t* extra = top_payload + c * k;
  for (std::int64_t i = 0; i < rows; ++i) {
    core::topk_insert(to_double(data + i * row_stride + c * col_stride), ids[i],
                      payload != nullptr ? payload[i * cols + c] : 0, k, v, id, extra);
  }
}

template <typename T>
cudaError_t launch(const core::MatrixView& m, const std::int64_t* ids, const std::int64_t* payload, std::int64_t k,
                   double* top_values, std::int64_t* top_ids, std::int64_t* top_payload, cudaStream_t stream) {
  constexpr int kThreads = 128;
  topk_kernel<T><<<static_cast<unsigned>((m.cols + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      static_cast<const T*>(m.data), m.rows, m.cols, m.row_stride, m.col_stride, ids, payload, k, top_values, top_ids,
      top_payload);
  return cudaGetLastError();
}

}  // namespace

cudaError_t topk_update(const core::MatrixView& values, const std::int64_t* ids, const std::int64_t* payload,
                        std::int64_t k, double* top_values, std::int64_t* top_ids, std::int64_t* top_payload,
                        cudaStream_t stream) {
  if (values.rows == 0 || values.cols == 0 || k <= 0) return cudaSuccess;
  switch (values.dtype) {
    case core::DType::Float16:
      return launch<__half>(values, ids, payload, k, top_values, top_ids, top_payload, stream);
    case core::DType::BFloat16:
      return launch<__nv_bfloat16>(values, ids, payload, k, top_values, top_ids, top_payload, stream);
    case core::DType::Float32:
      return launch<float>(values, ids, payload, k, top_values, top_ids, top_payload, stream);
    case core::DType::Float64:
      return launch<double>(values, ids, payload, k, top_values, top_ids, top_payload, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace pyengine::cuda
