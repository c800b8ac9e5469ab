// Occlusion sweeps: build batches of occluded inputs, scatter output drops into maps.
#pragma once

#include <cstdint>

namespace pyengine::core {

constexpr int kMaxOcclusionDims = 6;

// The windows slid over one input of `dims` non-batch dimensions. Along dimension d the
// window starts at k * stride[d] for k in [0, counts[d]), counts[d] = ceil((shape[d] -
// window[d]) / stride[d]) + 1 (Captum's Occlusion grid: the last window may be cut off by
// the edge). Windows are numbered row-major over (k_0, ..., k_{dims-1}).
struct OcclusionGrid {
  std::int64_t dims = 0;
  std::int64_t shape[kMaxOcclusionDims] = {};
  std::int64_t window[kMaxOcclusionDims] = {};
  std::int64_t stride[kMaxOcclusionDims] = {};
  std::int64_t counts[kMaxOcclusionDims] = {};

  std::int64_t elements() const;  // elements of one input
  std::int64_t windows() const;   // windows in the sweep
};

// Fills counts[]; the caller has checked 1 <= window[d] <= shape[d] and stride[d] >= 1.
OcclusionGrid make_occlusion_grid(std::int64_t dims, const std::int64_t* shape, const std::int64_t* window,
                                  const std::int64_t* stride);

// out (count x batch x elements, contiguous): out[p, b] = inputs[b] with the elements inside
// window first + p replaced by baseline[b] (baseline_per_input) or baseline[0]. Works on raw
// bytes, so any element type of size element_size.
void occlusion_fill(const OcclusionGrid& grid, const void* inputs, const void* baseline, bool baseline_per_input,
                    std::int64_t batch, std::int64_t element_size, std::int64_t first, std::int64_t count, void* out,
                    int num_threads);

// sums[b, t, e] += drops[p, b, t] for every window first + p (p < count) that covers element e.
// drops: count x batch x targets; sums: batch x targets x elements; both contiguous.
void occlusion_accumulate(const OcclusionGrid& grid, const double* drops, std::int64_t batch, std::int64_t targets,
                          std::int64_t first, std::int64_t count, double* sums, int num_threads);

}  // namespace pyengine::core
