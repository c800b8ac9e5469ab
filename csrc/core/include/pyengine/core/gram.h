// Streaming Gram accumulation: gram += x^T x in float64, for x of any supported dtype.
#pragma once

#include <cstdint>

#include "pyengine/core/matrix.h"

namespace pyengine::core {

// gram: x.cols x x.cols, row-major, contiguous float64, updated in place (both
// triangles, bit-identical). sums: nullptr or x.cols float64 running column sums.
// num_threads <= 1 runs on the calling thread. The caller validates shapes.
void gram_accumulate(const MatrixView& x, double* gram, double* sums, int num_threads);

// The single-threaded textbook loop, for tests and as a C++ reference.
void gram_accumulate_reference(const MatrixView& x, double* gram, double* sums);

}  // namespace pyengine::core
