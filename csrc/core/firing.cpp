// Bitset firing patterns: packing splits row blocks of 64 across threads; pairwise
// counts split tiles of the upper triangle, each tile reading its bitsets word block by
// word block so both operands stay in cache.
#include "pyengine/core/firing.h"

#include "multiversion.h"
#include "pyengine/core/parallel.h"

#include <algorithm>
#include <bit>
#include <type_traits>
#include <vector>

namespace pyengine::core {
namespace {

constexpr std::int64_t kTile = 32;          // units per side of a pairwise tile
constexpr std::int64_t kWordBlock = 256;    // words per pass over a tile (2 KiB per unit)

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define PYENGINE_VPOPCNT 1

bool has_vpopcnt() { return __builtin_cpu_supports("avx512vpopcntdq") && __builtin_cpu_supports("avx512f"); }

// counts[a][b] += popcount(x_a XOR y_b) over words [0, count) for a 4 x 4 block of
// units: 16 vector accumulators, 8 loads per 16 XOR-popcounts. count % 8 == 0.
__attribute__((target("avx512f,avx512vpopcntdq"))) void xor_popcount_4x4(
    const std::uint64_t* const x[4], const std::uint64_t* const y[4], std::int64_t count,
    std::int64_t counts[4][4]) {
  __m512i acc[4][4];
  for (auto& row : acc) {
    for (auto& a : row) a = _mm512_setzero_si512();
  }
  for (std::int64_t w = 0; w < count; w += 8) {
    __m512i xs[4], ys[4];
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      xs[i] = _mm512_loadu_si512(x[i] + w);
      ys[i] = _mm512_loadu_si512(y[i] + w);
    }
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        acc[i][j] = _mm512_add_epi64(acc[i][j], _mm512_popcnt_epi64(_mm512_xor_si512(xs[i], ys[j])));
      }
    }
  }
  alignas(64) std::int64_t lanes[8];
  for (int i = 0; i < 4; ++i) {
    for (int j = 0; j < 4; ++j) {
      _mm512_store_si512(lanes, acc[i][j]);
      for (const std::int64_t lane : lanes) counts[i][j] += lane;
    }
  }
}
#else
bool has_vpopcnt() { return false; }
#endif

PYENGINE_MULTIVERSION
std::int64_t xor_popcount(const std::uint64_t* x, const std::uint64_t* y, std::int64_t count) {
  std::int64_t total = 0;
  for (std::int64_t w = 0; w < count; ++w) total += std::popcount(x[w] ^ y[w]);
  return total;
}

template <typename T>
void pack_typed(const MatrixView& h, double threshold, std::uint64_t* bits, std::int64_t words,
                std::int64_t word_begin, std::int64_t word_end) {
  const T* data = static_cast<const T*>(h.data);
  std::vector<std::uint64_t> local(static_cast<std::size_t>(h.cols));
  for (std::int64_t w = word_begin; w < word_end; ++w) {
    std::fill(local.begin(), local.end(), 0);
    const std::int64_t last = std::min<std::int64_t>(64, h.rows - w * 64);
    for (std::int64_t b = 0; b < last; ++b) {
      const T* row = data + (w * 64 + b) * h.row_stride;
      for (std::int64_t j = 0; j < h.cols; ++j) {
        local[j] |= static_cast<std::uint64_t>(to_double(row + j * h.col_stride) > threshold) << b;
      }
    }
    for (std::int64_t j = 0; j < h.cols; ++j) bits[j * words + w] = local[j];
  }
}

}  // namespace

void pack_firing(const MatrixView& h, double threshold, std::uint64_t* bits, std::int64_t words,
                 int num_threads) {
  if (h.rows == 0 || h.cols == 0) return;
  visit_dtype(h.dtype, [&](auto tag) {
    using T = std::remove_cv_t<std::remove_pointer_t<decltype(tag)>>;
    parallel_for(0, words, 1, [&](std::int64_t begin, std::int64_t end) {
      pack_typed<T>(h, threshold, bits, words, begin, end);
    }, num_threads);
  });
}

void firing_disagreements(const std::uint64_t* bits, std::int64_t units, std::int64_t words,
                          std::int64_t* disagreements, int num_threads) {
  std::vector<std::pair<std::int64_t, std::int64_t>> tiles;
  for (std::int64_t i = 0; i < units; i += kTile) {
    for (std::int64_t j = i; j < units; j += kTile) tiles.emplace_back(i, j);
  }
  const bool vector = has_vpopcnt();
  parallel_for(0, static_cast<std::int64_t>(tiles.size()), 1, [&](std::int64_t begin, std::int64_t end) {
    std::int64_t counts[kTile][kTile];
    const std::uint64_t* zero_row = nullptr;
    std::vector<std::uint64_t> zeros;
    for (std::int64_t k = begin; k < end; ++k) {
      const auto [i0, j0] = tiles[static_cast<std::size_t>(k)];
      const std::int64_t rows = std::min(kTile, units - i0);
      const std::int64_t cols = std::min(kTile, units - j0);
      for (auto& row : counts) std::fill(std::begin(row), std::end(row), 0);
      for (std::int64_t w0 = 0; w0 < words; w0 += kWordBlock) {
        const std::int64_t w1 = std::min(words, w0 + kWordBlock);
        std::int64_t vector_end = w0;
#ifdef PYENGINE_VPOPCNT
        if (vector) {
          // 4 x 4 blocks of units over the words divisible by 8; missing units read zeros.
          vector_end = w0 + (w1 - w0) / 8 * 8;
          if (zero_row == nullptr) {
            zeros.assign(static_cast<std::size_t>(words), 0);
            zero_row = zeros.data();
          }
          for (std::int64_t a = 0; a < rows; a += 4) {
            for (std::int64_t b = (i0 == j0 ? a : 0); b < cols; b += 4) {
              const std::uint64_t* x[4];
              const std::uint64_t* y[4];
              for (int q = 0; q < 4; ++q) {
                x[q] = a + q < rows ? bits + (i0 + a + q) * words : zero_row;
                y[q] = b + q < cols ? bits + (j0 + b + q) * words : zero_row;
              }
              std::int64_t block[4][4] = {};
              const std::uint64_t* xs[4] = {x[0] + w0, x[1] + w0, x[2] + w0, x[3] + w0};
              const std::uint64_t* ys[4] = {y[0] + w0, y[1] + w0, y[2] + w0, y[3] + w0};
              xor_popcount_4x4(xs, ys, vector_end - w0, block);
              for (int p = 0; p < 4 && a + p < rows; ++p) {
                for (int q = 0; q < 4 && b + q < cols; ++q) counts[a + p][b + q] += block[p][q];
              }
            }
          }
        }
#endif
        if (vector_end == w1) continue;
        for (std::int64_t a = 0; a < rows; ++a) {
          const std::uint64_t* x = bits + (i0 + a) * words;
          for (std::int64_t b = (i0 == j0 ? a + 1 : 0); b < cols; ++b) {
            counts[a][b] += xor_popcount(x + vector_end, bits + (j0 + b) * words + vector_end, w1 - vector_end);
          }
        }
      }
      for (std::int64_t a = 0; a < rows; ++a) {
        for (std::int64_t b = (i0 == j0 ? a + 1 : 0); b < cols; ++b) {
          disagreements[(i0 + a) * units + j0 + b] = counts[a][b];
          disagreements[(j0 + b) * units + i0 + a] = counts[a][b];
        }
      }
    }
  }, num_threads);
  for (std::int64_t i = 0; i < units; ++i) disagreements[i * units + i] = 0;
}

}  // namespace pyengine::core
