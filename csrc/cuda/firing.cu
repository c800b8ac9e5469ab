// Packing: one thread per (unit, word) reads 64 rows of its column (coalesced across
// units). Pairwise: one block per 32x32 tile on or above the diagonal, words staged
// through shared memory 32 at a time, __popcll on XORed words.
#include <algorithm>

#include "convert.cuh"
#include "firing.cuh"

namespace pyengine::cuda {
namespace {

constexpr int kTile = 32;
constexpr int kRowsPerThread = 4;  // a 32 x 8 block covers a 32 x 32 tile

template <typename T>
__global__ void pack_kernel(const T* __restrict__ h, std::int64_t rows, std::int64_t cols, std::int64_t row_stride,
                            std::int64_t col_stride, double threshold, std::uint64_t* bits, std::int64_t words) {
  const std::int64_t unit = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const std::int64_t word = blockIdx.y;
  if (unit >= cols) return;
  const std::int64_t first = word * 64;
  const std::int64_t count = rows - first < 64 ? rows - first : 64;
  std::uint64_t packed = 0;
  for (std::int64_t b = 0; b < count; ++b) {
    packed |= static_cast<std::uint64_t>(to_double(h + (first + b) * row_stride + unit * col_stride) > threshold)
              << b;
  }
  bits[unit * words + word] = packed;
}

__device__ void upper_tile(int index, int tiles, int* tile_row, int* tile_col) {
  int row = 0;
  while (index >= tiles - row) {
    index -= tiles - row;
    ++row;
  }
  *tile_row = row;
  *tile_col = row + index;
}

__global__ void disagreement_kernel(const std::uint64_t* __restrict__ bits, std::int64_t units, std::int64_t words,
                                    int tiles, std::int64_t* out) {
  __shared__ std::uint64_t x[kTile][kTile + 1];
  __shared__ std::uint64_t y[kTile][kTile + 1];
  int tile_row = 0, tile_col = 0;
  upper_tile(blockIdx.x, tiles, &tile_row, &tile_col);
  const std::int64_t i0 = static_cast<std::int64_t>(tile_row) * kTile;
  const std::int64_t j0 = static_cast<std::int64_t>(tile_col) * kTile;
  const int tx = threadIdx.x, ty = threadIdx.y;
  std::int64_t acc[kRowsPerThread] = {};
  for (std::int64_t w0 = 0; w0 < words; w0 += kTile) {
    for (int r = ty; r < kTile; r += blockDim.y) {
      const std::int64_t w = w0 + tx;
      x[r][tx] = (i0 + r < units && w < words) ? bits[(i0 + r) * words + w] : 0;
      y[r][tx] = (j0 + r < units && w < words) ? bits[(j0 + r) * words + w] : 0;
    }
    __syncthreads();
#pragma unroll 8
    for (int w = 0; w < kTile; ++w) {
      const std::uint64_t other = y[tx][w];
#pragma unroll
      for (int k = 0; k < kRowsPerThread; ++k) acc[k] += __popcll(x[ty + 8 * k][w] ^ other);
    }
    __syncthreads();
  }
  for (int k = 0; k < kRowsPerThread; ++k) {
    const std::int64_t i = i0 + ty + 8 * k, j = j0 + tx;
    if (i >= units || j >= units) continue;
    out[i * units + j] = acc[k];
    if (tile_row != tile_col) out[j * units + i] = acc[k];
  }
}

template <typename T>
cudaError_t launch_pack(const core::MatrixView& h, double threshold, std::uint64_t* bits, std::int64_t words,
                        cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((h.cols + 255) / 256), static_cast<unsigned>(words));
  pack_kernel<T><<<grid, 256, 0, stream>>>(static_cast<const T*>(h.data), h.rows, h.cols, h.row_stride,
                                          h.col_stride, threshold, bits, words);
  return cudaGetLastError();
}

}  // namespace

cudaError_t pack_firing(const core::MatrixView& h, double threshold, std::uint64_t* bits, std::int64_t words,
                        cudaStream_t stream) {
  if (h.rows == 0 || h.cols == 0) return cudaSuccess;
  switch (h.dtype) {
    case core::DType::Float16:
      return launch_pack<__half>(h, threshold, bits, words, stream);
    case core::DType::BFloat16:
      return launch_pack<__nv_bfloat16>(h, threshold, bits, words, stream);
    case core::DType::Float32:
      return launch_pack<float>(h, threshold, bits, words, stream);
    case core::DType::Float64:
      return launch_pack<double>(h, threshold, bits, words, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t firing_disagreements(const std::uint64_t* bits, std::int64_t units, std::int64_t words,
                                 std::int64_t* disagreements, cudaStream_t stream) {
  if (units == 0) return cudaSuccess;
  const int tiles = static_cast<int>((units + kTile - 1) / kTile);
  const unsigned pairs = static_cast<unsigned>(static_cast<std::int64_t>(tiles) * (tiles + 1) / 2);
  disagreement_kernel<<<pairs, dim3(kTile, kTile / kRowsPerThread), 0, stream>>>(bits, units, words, tiles,
                                                                               disagreements);
  return cudaGetLastError();
}

}  // namespace pyengine::cuda
