// Per-column binned label statistics: the sufficient statistics of one-weight probes.
#pragma once

#include <cstdint>

#include "pyengine/core/matrix.h"

namespace pyengine::core {

// For every column j of h (n x d), value v = h[i, j] goes to bin
//   k = clamp(floor((v - low[j]) * bins / (high[j] - low[j])), 0, bins - 1)
// (k = 0 when high[j] <= low[j]). For every target t, with label l = labels[t * n + i]
// (0 or 1, anything nonzero counts as 1):
//   counts[((t * d + j) * 2 + l) * bins + k] += 1,  sums[same] += v.
// labels: targets x n, contiguous. counts and sums: targets * d * 2 * bins float64,
// accumulated into (the caller zeroes them). Threads split the columns.
void binned_statistics(const MatrixView& h, const std::uint8_t* labels, std::int64_t targets,
                       const double* low, const double* high, std::int64_t bins, double* counts,
                       double* sums, int num_threads);

}  // namespace pyengine::core
