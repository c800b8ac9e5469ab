// One thread per output element. Filling: is the element inside its window? Accumulating
// (a gather, so no atomics): sum the drops of the chunk's windows that cover the element.
#include <algorithm>

#include "occlusion.cuh"

namespace pyengine::cuda {
namespace {

constexpr int kThreads = 256;

// The grid passed by value: shapes live in kernel parameter space.
struct Grid {
  std::int64_t dims;
  std::int64_t shape[core::kMaxOcclusionDims];
  std::int64_t window[core::kMaxOcclusionDims];
  std::int64_t stride[core::kMaxOcclusionDims];
  std::int64_t counts[core::kMaxOcclusionDims];
};

Grid device_grid(const core::OcclusionGrid& grid) {
  Grid g{};
  g.dims = grid.dims;
  for (std::int64_t d = 0; d < grid.dims; ++d) {
    g.shape[d] = grid.shape[d];
    g.window[d] = grid.window[d];
    g.stride[d] = grid.stride[d];
    g.counts[d] = grid.counts[d];
  }
  return g;
}

__device__ bool inside_window(const Grid& g, std::int64_t element, std::int64_t window) {
  for (std::int64_t d = g.dims - 1; d >= 0; --d) {
    const std::int64_t i = element % g.shape[d];
    const std::int64_t begin = (window % g.counts[d]) * g.stride[d];
    element /= g.shape[d];
    window /= g.counts[d];
    if (i < begin || i >= begin + g.window[d]) return false;
  }
  return true;
}

template <typename T>
__global__ void fill_kernel(Grid g, std::int64_t elements, const T* __restrict__ inputs,
                            const T* __restrict__ baseline, bool per_input, std::int64_t batch, std::int64_t first,
                            std::int64_t total, T* __restrict__ out) {
  for (std::int64_t index = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; index < total;
       index += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t e = index % elements;
    const std::int64_t row = index / elements;
    const std::int64_t b = row % batch;
    const std::int64_t p = row / batch;
    out[index] = inside_window(g, e, first + p) ? baseline[(per_input ? b * elements : 0) + e]
                                                : inputs[b * elements + e];
  }
}

__global__ void accumulate_kernel(Grid g, std::int64_t elements, const double* __restrict__ drops,
                                  std::int64_t maps, std::int64_t first, std::int64_t count,
                                  double* __restrict__ sums) {
  const std::int64_t total = maps * elements;
  for (std::int64_t index = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; index < total;
       index += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t map = index / elements;
    std::int64_t rest = index % elements;
    // Per dimension, the window positions k covering coordinate i: lo[d] <= k <= hi[d].
    std::int64_t lo[core::kMaxOcclusionDims];
    std::int64_t hi[core::kMaxOcclusionDims];
    bool covered = true;
    for (std::int64_t d = g.dims - 1; d >= 0; --d) {
      const std::int64_t i = rest % g.shape[d];
      rest /= g.shape[d];
      const std::int64_t reach = i - g.window[d] + 1;
      lo[d] = reach > 0 ? (reach + g.stride[d] - 1) / g.stride[d] : 0;
      hi[d] = min(i / g.stride[d], g.counts[d] - 1);
      covered = covered && lo[d] <= hi[d];
    }
    if (!covered) continue;
    double total_drop = 0.0;
    std::int64_t k[core::kMaxOcclusionDims];
    for (std::int64_t d = 0; d < g.dims; ++d) k[d] = lo[d];
    while (true) {
      std::int64_t window = 0;
      for (std::int64_t d = 0; d < g.dims; ++d) window = window * g.counts[d] + k[d];
      const std::int64_t p = window - first;
      if (p >= 0 && p < count) total_drop += drops[p * maps + map];
      std::int64_t d = g.dims - 1;
      while (d >= 0 && ++k[d] > hi[d]) {
        k[d] = lo[d];
        --d;
      }
      if (d < 0) break;
    }
    sums[index] += total_drop;
  }
}

unsigned blocks_for(std::int64_t total) {
  return static_cast<unsigned>(std::clamp<std::int64_t>((total + kThreads - 1) / kThreads, 1, 65535 * 16));
}

template <typename T>
cudaError_t launch_fill(const Grid& g, std::int64_t elements, const void* inputs, const void* baseline, bool per_input,
                        std::int64_t batch, std::int64_t first, std::int64_t count, void* out, cudaStream_t stream) {
  const std::int64_t total = count * batch * elements;
  fill_kernel<T><<<blocks_for(total), kThreads, 0, stream>>>(g, elements, static_cast<const T*>(inputs),
                                                            static_cast<const T*>(baseline), per_input, batch,
                                                            first, total, static_cast<T*>(out));
  return cudaGetLastError();
}

}  // namespace

cudaError_t occlusion_fill(const core::OcclusionGrid& grid, const void* inputs, const void* baseline,
                           bool baseline_per_input, std::int64_t batch, std::int64_t element_size, std::int64_t first,
                           std::int64_t count, void* out, cudaStream_t stream) {
  const std::int64_t elements = grid.elements();
  if (count <= 0 || batch <= 0 || elements == 0) return cudaSuccess;
  const Grid g = device_grid(grid);
  switch (element_size) {
    case 1:
      return launch_fill<std::uint8_t>(g, elements, inputs, baseline, baseline_per_input, batch, first, count, out, stream);
    case 2:
      return launch_fill<std::uint16_t>(g, elements, inputs, baseline, baseline_per_input, batch, first, count, out, stream);
    case 4:
      return launch_fill<std::uint32_t>(g, elements, inputs, baseline, baseline_per_input, batch, first, count, out, stream);
    case 8:
      return launch_fill<std::uint64_t>(g, elements, inputs, baseline, baseline_per_input, batch, first, count, out, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t occlusion_accumulate(const core::OcclusionGrid& grid, const double* drops, std::int64_t batch,
                                 std::int64_t targets, std::int64_t first, std::int64_t count, double* sums,
                                 cudaStream_t stream) {
  const std::int64_t elements = grid.elements();
  if (count <= 0 || batch <= 0 || targets <= 0 || elements == 0) return cudaSuccess;
  const std::int64_t total = batch * targets * elements;
  accumulate_kernel<<<blocks_for(total), kThreads, 0, stream>>>(device_grid(grid), elements, drops, batch * targets,
                                                                 first, count, sums);
  return cudaGetLastError();
}

}  // namespace pyengine::cuda
