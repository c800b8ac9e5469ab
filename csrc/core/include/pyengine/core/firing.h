// ReLU firing patterns as bitsets, and pairwise agreement by popcount.
#pragma once

#include <cstdint>

#include "pyengine/core/matrix.h"

namespace pyengine::core {

// bits (h.cols x words, row-major, words = ceil(h.rows / 64)), zeroed by the caller:
// bit (r % 64) of bits[j * words + r / 64] is set when h[r, j] > threshold.
void pack_firing(const MatrixView& h, double threshold, std::uint64_t* bits, std::int64_t words,
                 int num_threads);

// disagreements (units x units, row-major): popcount(bits_i XOR bits_j) summed over the
// words, so rows where exactly one of i, j fires. Symmetric; zero diagonal.
void firing_disagreements(const std::uint64_t* bits, std::int64_t units, std::int64_t words,
                          std::int64_t* disagreements, int num_threads);

}  // namespace pyengine::core
