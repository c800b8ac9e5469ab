// Occlusion sweeps on the CPU. Filling copies each input once and overwrites the window's
// box run by run; accumulating adds each drop to its window's box. Threads own disjoint
// outputs (occluded copies, or one input-target map each), so no locks.
#include "pyengine/core/occlusion.h"

#include "pyengine/core/parallel.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace pyengine::core {

std::int64_t OcclusionGrid::elements() const {
  std::int64_t n = 1;
  for (std::int64_t d = 0; d < dims; ++d) n *= shape[d];
  return n;
}

std::int64_t OcclusionGrid::windows() const {
  std::int64_t n = 1;
  for (std::int64_t d = 0; d < dims; ++d) n *= counts[d];
  return n;
}

OcclusionGrid make_occlusion_grid(std::int64_t dims, const std::int64_t* shape, const std::int64_t* window,
                                  const std::int64_t* stride) {
  OcclusionGrid grid;
  grid.dims = dims;
  for (std::int64_t d = 0; d < dims; ++d) {
    grid.shape[d] = shape[d];
    grid.window[d] = window[d];
    grid.stride[d] = stride[d];
    grid.counts[d] = (shape[d] - window[d] + stride[d] - 1) / stride[d] + 1;
  }
  return grid;
}

namespace {

// The part of window `index` inside the input: begin[d] .. end[d] per dimension.
struct Box {
  std::int64_t begin[kMaxOcclusionDims];
  std::int64_t end[kMaxOcclusionDims];
};

Box window_box(const OcclusionGrid& grid, std::int64_t index) {
  Box box;
  for (std::int64_t d = grid.dims - 1; d >= 0; --d) {
    const std::int64_t k = index % grid.counts[d];
    index /= grid.counts[d];
    box.begin[d] = k * grid.stride[d];
    box.end[d] = std::min(box.begin[d] + grid.window[d], grid.shape[d]);
  }
  return box;
}

// Calls run(offset, length) for every contiguous run of the box (the last dimension),
// with offsets in elements from the start of one input.
template <typename Run>
void for_each_run(const OcclusionGrid& grid, const Box& box, Run&& run) {
  const std::int64_t last = grid.dims - 1;
  const std::int64_t length = box.end[last] - box.begin[last];
  std::int64_t at[kMaxOcclusionDims];
  for (std::int64_t d = 0; d < grid.dims; ++d) at[d] = box.begin[d];
  while (true) {
    std::int64_t offset = 0;
    for (std::int64_t d = 0; d < grid.dims; ++d) offset = offset * grid.shape[d] + at[d];
    run(offset, length);
    std::int64_t d = last - 1;
    while (d >= 0 && ++at[d] == box.end[d]) {
      at[d] = box.begin[d];
      --d;
    }
    if (d < 0) return;
  }
}

}  // namespace

void occlusion_fill(const OcclusionGrid& grid, const void* inputs, const void* baseline, bool baseline_per_input,
                    std::int64_t batch, std::int64_t element_size, std::int64_t first, std::int64_t count, void* out,
                    int num_threads) {
  const std::int64_t row_bytes = grid.elements() * element_size;
  if (count <= 0 || batch <= 0 || row_bytes == 0) return;
  const auto* source = static_cast<const unsigned char*>(inputs);
  const auto* fill = static_cast<const unsigned char*>(baseline);
  auto* target = static_cast<unsigned char*>(out);
  // Copies are memory-bound: a thread needs a few hundred KiB of work to pay for itself.
  const std::int64_t min_rows = std::max<std::int64_t>(1, (256 << 10) / row_bytes);
  parallel_for(0, count * batch, min_rows, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t row = begin; row < end; ++row) {
      const std::int64_t p = row / batch;
      const std::int64_t b = row % batch;
      unsigned char* copy = target + row * row_bytes;
      std::memcpy(copy, source + b * row_bytes, static_cast<std::size_t>(row_bytes));
      const unsigned char* values = fill + (baseline_per_input ? b * row_bytes : 0);
      for_each_run(grid, window_box(grid, first + p), [&](std::int64_t offset, std::int64_t length) {
        std::memcpy(copy + offset * element_size, values + offset * element_size,
                    static_cast<std::size_t>(length * element_size));
      });
    }
  }, num_threads);
}

void occlusion_accumulate(const OcclusionGrid& grid, const double* drops, std::int64_t batch, std::int64_t targets,
                          std::int64_t first, std::int64_t count, double* sums, int num_threads) {
  const std::int64_t elements = grid.elements();
  if (count <= 0 || batch <= 0 || targets <= 0 || elements == 0) return;
  std::vector<Box> boxes(static_cast<std::size_t>(count));
  for (std::int64_t p = 0; p < count; ++p) boxes[static_cast<std::size_t>(p)] = window_box(grid, first + p);
  parallel_for(0, batch * targets, 1, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t map = begin; map < end; ++map) {
      double* sum = sums + map * elements;
      for (std::int64_t p = 0; p < count; ++p) {
        const double drop = drops[p * batch * targets + map];
        for_each_run(grid, boxes[static_cast<std::size_t>(p)], [&](std::int64_t offset, std::int64_t length) {
          double* run = sum + offset;
          for (std::int64_t i = 0; i < length; ++i) run[i] += drop;
        });
      }
    }
  }, num_threads);
}

}  // namespace pyengine::core
