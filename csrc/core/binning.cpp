// Binned label statistics on the CPU: threads own disjoint column ranges, so no locks;
// columns go in blocks of eight so that a block's bins stay in cache.
#include "pyengine/core/binning.h"

#include "pyengine/core/parallel.h"

#include <algorithm>
#include <cmath>
#include <type_traits>

namespace pyengine::core {
namespace {

constexpr std::int64_t kBlockColumns = 8;  // a block's bins (8 x targets x 2 x bins) stay in L2

template <typename T>
void run_columns(const MatrixView& h, const std::uint8_t* labels, std::int64_t targets,
                 const double* low, const double* high, std::int64_t bins, double* counts,
                 double* sums, std::int64_t col_begin, std::int64_t col_end) {
  const std::int64_t d = h.cols;
  const T* data = static_cast<const T*>(h.data);
  for (std::int64_t block = col_begin; block < col_end; block += kBlockColumns) {
    const std::int64_t width = std::min(kBlockColumns, col_end - block);
    double scale[kBlockColumns];
    std::int64_t bin[kBlockColumns];
    double value[kBlockColumns];
    for (std::int64_t j = 0; j < width; ++j) {
      const double range = high[block + j] - low[block + j];
      scale[j] = range > 0 ? static_cast<double>(bins) / range : 0.0;
    }
    for (std::int64_t i = 0; i < h.rows; ++i) {
      for (std::int64_t j = 0; j < width; ++j) {
        const double v = to_double(data + i * h.row_stride + (block + j) * h.col_stride);
        const double position = std::floor((v - low[block + j]) * scale[j]);
        // NaN and out-of-range values land in the edge bins.
        bin[j] = position >= static_cast<double>(bins - 1) ? bins - 1
                 : position > 0                          ? static_cast<std::int64_t>(position)
                                                         : 0;
        value[j] = v;
      }
      for (std::int64_t t = 0; t < targets; ++t) {
        const std::int64_t label = labels[t * h.rows + i] != 0 ? 1 : 0;
        for (std::int64_t j = 0; j < width; ++j) {
          const std::int64_t slot = ((t * d + block + j) * 2 + label) * bins + bin[j];
          counts[slot] += 1.0;
          sums[slot] += value[j];
        }
      }
    }
  }
}

}  // namespace

void binned_statistics(const MatrixView& h, const std::uint8_t* labels, std::int64_t targets,
                       const double* low, const double* high, std::int64_t bins, double* counts,
                       double* sums, int num_threads) {
  if (h.rows == 0 || h.cols == 0 || targets == 0) return;
  // A thread needs ~64 Ki updates (rows x targets x its columns) to pay for itself.
  const std::int64_t grain = std::max<std::int64_t>(1, (1 << 16) / (h.rows * targets));
  visit_dtype(h.dtype, [&](auto tag) {
    using T = std::remove_cv_t<std::remove_pointer_t<decltype(tag)>>;
    parallel_for(0, h.cols, grain, [&](std::int64_t begin, std::int64_t end) {
      run_columns<T>(h, labels, targets, low, high, bins, counts, sums, begin, end);
    }, num_threads);
  });
}

}  // namespace pyengine::core
