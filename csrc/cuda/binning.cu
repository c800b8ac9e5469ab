// A warp reads 32 adjacent columns of one row (coalesced for row-major h); every value
// adds to its (target, column, label, bin) slot with double atomics.
#include <algorithm>

#include "binning.cuh"
#include "convert.cuh"

namespace pyengine::cuda {
namespace {

constexpr int kColumns = 32;
constexpr int kRowsPerPass = 8;

template <typename T>
__global__ void binned_statistics_kernel(const T* __restrict__ h, std::int64_t rows, std::int64_t cols,
                                         std::int64_t row_stride, std::int64_t col_stride,
                                         const std::uint8_t* __restrict__ labels, std::int64_t targets,
                                         const double* __restrict__ low, const double* __restrict__ high,
                                         std::int64_t bins, std::int64_t rows_per_split, double* counts,
                                         double* sums) {
  const std::int64_t col = static_cast<std::int64_t>(blockIdx.x) * kColumns + threadIdx.x;
  if (col >= cols) return;
  const double range = high[col] - low[col];
  const double scale = range > 0 ? static_cast<double>(bins) / range : 0.0;
  const std::int64_t r_begin = static_cast<std::int64_t>(blockIdx.y) * rows_per_split;
  const std::int64_t r_end = min(rows, r_begin + rows_per_split);
  for (std::int64_t r = r_begin + threadIdx.y; r < r_end; r += kRowsPerPass) {
    const double v = to_double(h + r * row_stride + col * col_stride);
    const double position = floor((v - low[col]) * scale);
    const std::int64_t bin = position >= static_cast<double>(bins - 1) ? bins - 1
                             : position > 0                          ? static_cast<std::int64_t>(position)
                                                                     : 0;
    for (std::int64_t t = 0; t < targets; ++t) {
      const std::int64_t label = labels[t * rows + r] != 0 ? 1 : 0;
      const std::int64_t slot = ((t * cols + col) * 2 + label) * bins + bin;
      atomicAdd(counts + slot, 1.0);
      atomicAdd(sums + slot, v);
    }
  }
}

template <typename T>
cudaError_t launch(const core::MatrixView& h, const std::uint8_t* labels, std::int64_t targets,
                   const double* low, const double* high, std::int64_t bins, double* counts, double* sums,
                   cudaStream_t stream) {
  const auto column_blocks = static_cast<unsigned>((h.cols + kColumns - 1) / kColumns);
  const std::int64_t splits = std::clamp<std::int64_t>(h.rows / 256, 1, 65535);
  const std::int64_t rows_per_split = (h.rows + splits - 1) / splits;
  binned_statistics_kernel<T><<<dim3(column_blocks, static_cast<unsigned>(splits)),
                                dim3(kColumns, kRowsPerPass), 0, stream>>>(
      static_cast<const T*>(h.data), h.rows, h.cols, h.row_stride, h.col_stride, labels, targets, low,
      high, bins, rows_per_split, counts, sums);
  return cudaGetLastError();
}

}  // namespace

cudaError_t binned_statistics(const core::MatrixView& h, const std::uint8_t* labels,
                              std::int64_t targets, const double* low, const double* high,
                              std::int64_t bins, double* counts, double* sums, cudaStream_t stream) {
  if (h.rows == 0 || h.cols == 0 || targets == 0) return cudaSuccess;
  switch (h.dtype) {
    case core::DType::Float16:
      return launch<__half>(h, labels, targets, low, high, bins, counts, sums, stream);
    case core::DType::BFloat16:
      return launch<__nv_bfloat16>(h, labels, targets, low, high, bins, counts, sums, stream);
    case core::DType::Float32:
      return launch<float>(h, labels, targets, low, high, bins, counts, sums, stream);
    case core::DType::Float64:
      return launch<double>(h, labels, targets, low, high, bins, counts, sums, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace pyengine::cuda
