// Binned label statistics on the CPU: threads own disjoint column ranges, so no locks;
// columns go in blocks of eight so that a block's bins stay in cache.
#include "pyengine/core/binning.h"

#include <algorithm>
#include <cmath>
#include <thread>
#include <type_traits>
#include <vector>

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
  const std::int64_t work = h.rows * h.cols * targets;
  const auto threads = static_cast<std::int64_t>(std::clamp<std::int64_t>(
      std::min<std::int64_t>(num_threads, h.cols), 1, std::max<std::int64_t>(1, work / (1 << 16))));
  visit_dtype(h.dtype, [&](auto tag) {
    using T = std::remove_cv_t<std::remove_pointer_t<decltype(tag)>>;
    std::vector<std::thread> pool;
    for (std::int64_t t = 1; t < threads; ++t) {
      pool.emplace_back(run_columns<T>, std::cref(h), labels, targets, low, high, bins, counts, sums,
                        h.cols * t / threads, h.cols * (t + 1) / threads);
    }
    run_columns<T>(h, labels, targets, low, high, bins, counts, sums, 0, h.cols / threads);
    for (auto& thread : pool) thread.join();
  });
}

}  // namespace pyengine::core
