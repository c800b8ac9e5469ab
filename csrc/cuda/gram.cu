// Tiled fp64 Gram accumulation. One block computes one 64x64 output tile on or above
// the diagonal over a range of rows; 256 threads each hold a 4x4 register tile.
#include <algorithm>
#include <cstdint>

#include "gram.cuh"
#include "convert.cuh"

namespace pyengine::cuda {
namespace {

constexpr int kTile = 64;
constexpr int kStep = 16;  // rows per shared-memory stage
constexpr int kThreads = 256;
constexpr int kPerThread = 4;

// Maps a linear index to the (tile_row, tile_col) pair with tile_row <= tile_col.
__device__ void upper_tile(int index, int tiles, int* tile_row, int* tile_col) {
  int row = 0;
  while (index >= tiles - row) {
    index -= tiles - row;
    ++row;
  }
  *tile_row = row;
  *tile_col = row + index;
}

template <typename T>
__global__ void gram_tile_kernel(const T* __restrict__ x, std::int64_t rows, std::int64_t cols,
                                 std::int64_t row_stride, std::int64_t col_stride,
                                 std::int64_t rows_per_split, int tiles, double* gram) {
  __shared__ double a_tile[kStep][kTile];
  __shared__ double b_tile[kStep][kTile];

  int tile_row = 0, tile_col = 0;
  upper_tile(blockIdx.x, tiles, &tile_row, &tile_col);
  const std::int64_t i0 = static_cast<std::int64_t>(tile_row) * kTile;
  const std::int64_t j0 = static_cast<std::int64_t>(tile_col) * kTile;
  const std::int64_t r_begin = blockIdx.y * rows_per_split;
  const std::int64_t r_end = min(rows, r_begin + rows_per_split);

  const int tx = threadIdx.x % 16;
  const int ty = threadIdx.x / 16;
  double acc[kPerThread][kPerThread] = {};

  for (std::int64_t r0 = r_begin; r0 < r_end; r0 += kStep) {
    for (int e = threadIdx.x; e < kStep * kTile; e += kThreads) {
      const int k = e / kTile;
      const int c = e % kTile;
      const std::int64_t r = r0 + k;
      const bool row_ok = r < r_end;
      const T* row = x + r * row_stride;
      a_tile[k][c] = (row_ok && i0 + c < cols) ? to_double(row + (i0 + c) * col_stride) : 0.0;
      b_tile[k][c] = (row_ok && j0 + c < cols) ? to_double(row + (j0 + c) * col_stride) : 0.0;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kStep; ++k) {
      double a[kPerThread], b[kPerThread];
#pragma unroll
      for (int p = 0; p < kPerThread; ++p) {
        a[p] = a_tile[k][ty + 16 * p];
        b[p] = b_tile[k][tx + 16 * p];
      }
#pragma unroll
      for (int p = 0; p < kPerThread; ++p) {
#pragma unroll
        for (int q = 0; q < kPerThread; ++q) acc[p][q] = fma(a[p], b[q], acc[p][q]);
      }
    }
    __syncthreads();
  }

  for (int p = 0; p < kPerThread; ++p) {
    for (int q = 0; q < kPerThread; ++q) {
      const std::int64_t i = i0 + ty + 16 * p;
      const std::int64_t j = j0 + tx + 16 * q;
      if (i >= cols || j >= cols) continue;
      atomicAdd(gram + i * cols + j, acc[p][q]);
      if (tile_row != tile_col) atomicAdd(gram + j * cols + i, acc[p][q]);
    }
  }
}

template <typename T>
__global__ void column_sums_kernel(const T* __restrict__ x, std::int64_t rows, std::int64_t cols,
                                   std::int64_t row_stride, std::int64_t col_stride,
                                   std::int64_t rows_per_split, double* sums) {
  const std::int64_t c = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  if (c >= cols) return;
  const std::int64_t r_begin = blockIdx.y * rows_per_split;
  const std::int64_t r_end = min(rows, r_begin + rows_per_split);
  double s = 0.0;
  for (std::int64_t r = r_begin; r < r_end; ++r) s += to_double(x + r * row_stride + c * col_stride);
  atomicAdd(sums + c, s);
}

template <typename T>
cudaError_t launch(const core::MatrixView& x, double* gram, double* sums, cudaStream_t stream) {
  const T* data = static_cast<const T*>(x.data);
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int tiles = static_cast<int>((x.cols + kTile - 1) / kTile);
  const std::int64_t tile_pairs = static_cast<std::int64_t>(tiles) * (tiles + 1) / 2;
  // Enough blocks to fill the GPU a few times over, but at least 256 rows per block.
  const std::int64_t wanted = std::max<std::int64_t>(1, 4LL * std::max(sms, 1) / tile_pairs);
  const std::int64_t splits =
      std::clamp<std::int64_t>(wanted, 1, std::max<std::int64_t>(1, x.rows / 256));
  const std::int64_t rows_per_split = (x.rows + splits - 1) / splits;

  gram_tile_kernel<T><<<dim3(static_cast<unsigned>(tile_pairs), static_cast<unsigned>(splits)),
                        kThreads, 0, stream>>>(data, x.rows, x.cols, x.row_stride, x.col_stride,
                                               rows_per_split, tiles, gram);
  if (sums != nullptr) {
    const std::int64_t sum_splits = std::clamp<std::int64_t>(x.rows / 1024, 1, 1024);
    const std::int64_t sum_rows = (x.rows + sum_splits - 1) / sum_splits;
    const unsigned col_blocks = static_cast<unsigned>((x.cols + 255) / 256);
    column_sums_kernel<T><<<dim3(col_blocks, static_cast<unsigned>(sum_splits)), 256, 0, stream>>>(
        data, x.rows, x.cols, x.row_stride, x.col_stride, sum_rows, sums);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t gram_accumulate(const core::MatrixView& x, double* gram, double* sums,
                            cudaStream_t stream) {
  if (x.rows == 0 || x.cols == 0) return cudaSuccess;
  switch (x.dtype) {
    case core::DType::Float16:
      return launch<__half>(x, gram, sums, stream);
    case core::DType::BFloat16:
      return launch<__nv_bfloat16>(x, gram, sums, stream);
    case core::DType::Float32:
      return launch<float>(x, gram, sums, stream);
    case core::DType::Float64:
      return launch<double>(x, gram, sums, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace pyengine::cuda
