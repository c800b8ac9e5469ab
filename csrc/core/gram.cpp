// Blocked, multithreaded gram += x^T x in float64.
//
// Rows are processed in panels (see kMaxPanelRows). Each panel is converted to float64
// and packed column-block-major ([col / 8][row][col % 8]) so the micro-kernels read
// contiguous memory: 8x16 with AVX-512 intrinsics, else an autovectorised 4x8. Only
// output tiles on or above the diagonal are computed (half the flops of a GEMM); each
// tile's panel delta is added to the tile and to its mirror.
#include "pyengine/core/gram.h"

#include "multiversion.h"
#include "pyengine/core/parallel.h"

#include <algorithm>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define PYENGINE_X86 1
#endif

namespace pyengine::core {
namespace {

constexpr std::int64_t kPack = 8;         // columns per packed block
// Rows per packed panel: tall panels amortise each tile's flush into the Gram matrix
// (measured best near 1024 rows at d = 512); wide layers get shorter panels so a
// panel stays under ~4 MiB per thread.
constexpr std::int64_t kMaxPanelRows = 1024;
constexpr std::int64_t kMinPanelRows = 256;
constexpr std::int64_t kPanelElements = std::int64_t{1} << 19;
constexpr std::int64_t kTile = 64;        // output tile edge, a multiple of kPack
constexpr std::int64_t kMicroRows = 4;    // micro-kernel: kMicroRows x kPack outputs

struct Tile {
  std::int64_t row0;
  std::int64_t col0;
};

// Pack rows [row0, row0 + rows) of x into `panel`, zero-padding to padded_cols.
template <typename T>
void pack_panel_typed(const MatrixView& x, std::int64_t row0, std::int64_t rows,
                      std::int64_t padded_cols, double* panel) {
  const T* base = static_cast<const T*>(x.data);
  for (std::int64_t r = 0; r < rows; ++r) {
    const T* row = base + (row0 + r) * x.row_stride;
    std::int64_t c = 0;
    for (; c < x.cols; ++c) {
      panel[(c / kPack) * rows * kPack + r * kPack + c % kPack] = to_double(row + c * x.col_stride);
    }
    for (; c < padded_cols; ++c) {
      panel[(c / kPack) * rows * kPack + r * kPack + c % kPack] = 0.0;
    }
  }
}

void pack_panel(const MatrixView& x, std::int64_t row0, std::int64_t rows,
                std::int64_t padded_cols, double* panel) {
  visit_dtype(x.dtype, [&](auto tag) {
    pack_panel_typed<std::remove_cv_t<std::remove_pointer_t<decltype(tag)>>>(x, row0, rows, padded_cols, panel);
  });
}

// out[i][j] += sum_k a[k][i] * b[k][j] for a 4 x 8 block; a and b step kPack per row.
PYENGINE_MULTIVERSION
void micro_kernel(const double* a, const double* b, std::int64_t rows, double* out,
                  std::int64_t ld_out) {
  double acc[kMicroRows][kPack] = {};
  for (std::int64_t k = 0; k < rows; ++k) {
    const double* ak = a + k * kPack;
    const double* bk = b + k * kPack;
#pragma GCC unroll 4
    for (int i = 0; i < kMicroRows; ++i) {
#pragma GCC unroll 8
      for (int j = 0; j < kPack; ++j) acc[i][j] += ak[i] * bk[j];
    }
  }
  for (int i = 0; i < kMicroRows; ++i) {
    for (int j = 0; j < kPack; ++j) out[i * ld_out + j] += acc[i][j];
  }
}

#ifdef PYENGINE_X86
// AVX-512: out[8 x 16] += a^T [b0 b1]; 16 accumulators stay in registers, and each k
// needs two vector loads and eight broadcasts for sixteen FMAs.
__attribute__((target("avx512f"))) void micro_kernel_8x16(const double* a, const double* b0, const double* b1,
                                                        std::int64_t rows, double* out, std::int64_t ld_out) {
  __m512d acc0[8], acc1[8];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) acc0[i] = acc1[i] = _mm512_setzero_pd();
  for (std::int64_t k = 0; k < rows; ++k) {
    const __m512d x0 = _mm512_loadu_pd(b0 + k * kPack);
    const __m512d x1 = _mm512_loadu_pd(b1 + k * kPack);
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      const __m512d ai = _mm512_set1_pd(a[k * kPack + i]);
      acc0[i] = _mm512_fmadd_pd(ai, x0, acc0[i]);
      acc1[i] = _mm512_fmadd_pd(ai, x1, acc1[i]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    double* row = out + i * ld_out;
    _mm512_storeu_pd(row, _mm512_add_pd(_mm512_loadu_pd(row), acc0[i]));
    _mm512_storeu_pd(row + 8, _mm512_add_pd(_mm512_loadu_pd(row + 8), acc1[i]));
  }
}

__attribute__((target("avx512f"))) void micro_kernel_8x8(const double* a, const double* b, std::int64_t rows,
                                                       double* out, std::int64_t ld_out) {
  __m512d acc[8];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) acc[i] = _mm512_setzero_pd();
  for (std::int64_t k = 0; k < rows; ++k) {
    const __m512d x = _mm512_loadu_pd(b + k * kPack);
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) acc[i] = _mm512_fmadd_pd(_mm512_set1_pd(a[k * kPack + i]), x, acc[i]);
  }
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    _mm512_storeu_pd(out + i * ld_out, _mm512_add_pd(_mm512_loadu_pd(out + i * ld_out), acc[i]));
  }
}

bool has_avx512() { return __builtin_cpu_supports("avx512f"); }
#else
bool has_avx512() { return false; }
#endif

// One panel's contribution to one output tile, into `local` (kTile x kTile).
void tile_delta(const double* panel, std::int64_t rows, const Tile& tile, std::int64_t height,
                std::int64_t width, bool avx512, double* local) {
  auto block = [&](std::int64_t col) { return panel + (col / kPack) * rows * kPack; };
#ifdef PYENGINE_X86
  if (avx512) {
    for (std::int64_t jb = 0; jb < width; jb += 16) {
      const double* b = block(tile.col0 + jb);
      for (std::int64_t ib = 0; ib < height; ib += kPack) {
        const double* a = block(tile.row0 + ib);
        if (jb + 16 <= width) {
          micro_kernel_8x16(a, b, b + rows * kPack, rows, local + ib * kTile + jb, kTile);
        } else {
          micro_kernel_8x8(a, b, rows, local + ib * kTile + jb, kTile);
        }
      }
    }
    return;
  }
#endif
  for (std::int64_t jb = 0; jb < width; jb += kPack) {
    const double* b = block(tile.col0 + jb);
    for (std::int64_t ib = 0; ib < height; ib += kMicroRows) {
      const std::int64_t col = tile.row0 + ib;
      micro_kernel(block(col) + col % kPack, b, rows, local + ib * kTile + jb, kTile);
    }
  }
}

// What one worker does: `tiles` over rows [row_begin, row_end), written into `gram`
// (d x d), plus column sums of columns [sum_begin, sum_end) into `sums`.
struct Work {
  std::int64_t row_begin = 0;
  std::int64_t row_end = 0;
  std::vector<Tile> tiles;
  double* gram = nullptr;
  double* sums = nullptr;
  std::int64_t sum_begin = 0;
  std::int64_t sum_end = 0;
};

void run_work(const MatrixView& x, const Work& work) {
  const std::int64_t d = x.cols;
  const std::int64_t padded = (d + kPack - 1) / kPack * kPack;
  const std::int64_t panel_rows = std::clamp(kPanelElements / padded, kMinPanelRows, kMaxPanelRows);
  std::vector<double> panel(static_cast<std::size_t>(padded * panel_rows));
  std::vector<double> local(static_cast<std::size_t>(kTile * kTile));
  const bool avx512 = has_avx512();

  for (std::int64_t r0 = work.row_begin; r0 < work.row_end; r0 += panel_rows) {
    const std::int64_t rows = std::min(panel_rows, work.row_end - r0);
    pack_panel(x, r0, rows, padded, panel.data());
    for (std::int64_t c = work.sum_begin; c < work.sum_end; ++c) {
      const double* block = panel.data() + (c / kPack) * rows * kPack + c % kPack;
      double s = 0.0;
      for (std::int64_t r = 0; r < rows; ++r) s += block[r * kPack];
      work.sums[c] += s;
    }
    for (const Tile& tile : work.tiles) {
      const std::int64_t height = std::min(kTile, padded - tile.row0);
      const std::int64_t width = std::min(kTile, padded - tile.col0);
      std::fill(local.begin(), local.end(), 0.0);
      tile_delta(panel.data(), rows, tile, height, width, avx512, local.data());
      const std::int64_t valid_h = std::min(height, d - tile.row0);
      const std::int64_t valid_w = std::min(width, d - tile.col0);
      for (std::int64_t i = 0; i < valid_h; ++i) {
        for (std::int64_t j = 0; j < valid_w; ++j) {
          const double v = local[i * kTile + j];
          work.gram[(tile.row0 + i) * d + tile.col0 + j] += v;
          if (tile.row0 != tile.col0) work.gram[(tile.col0 + j) * d + tile.row0 + i] += v;
        }
      }
    }
  }
}

void run_all(const MatrixView& x, const std::vector<Work>& works) {
  const auto count = static_cast<std::int64_t>(works.size());
  parallel_for(0, count, 1, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t t = begin; t < end; ++t) run_work(x, works[static_cast<std::size_t>(t)]);
  }, static_cast<int>(count));
}

}  // namespace

void gram_accumulate(const MatrixView& x, double* gram, double* sums, int num_threads) {
  const std::int64_t n = x.rows;
  const std::int64_t d = x.cols;
  if (n == 0 || d == 0) return;

  std::vector<Tile> tiles;
  for (std::int64_t i = 0; i < d; i += kTile) {
    for (std::int64_t j = i; j < d; j += kTile) tiles.push_back({i, j});
  }
  // Below ~1 MFLOP per thread, threads cost more than they save.
  const std::int64_t flops = n * d * d;
  const std::int64_t max_useful = std::max<std::int64_t>(1, flops / (1 << 20));
  const auto threads = static_cast<std::int64_t>(
      std::clamp<std::int64_t>(num_threads, 1, max_useful));

  if (static_cast<std::int64_t>(tiles.size()) >= threads) {
    // Wide layers: threads own disjoint tiles of the shared gram, all rows each.
    std::vector<Work> works(static_cast<std::size_t>(threads));
    for (std::int64_t t = 0; t < threads; ++t) {
      Work& w = works[static_cast<std::size_t>(t)];
      w.row_begin = 0;
      w.row_end = n;
      for (std::size_t k = static_cast<std::size_t>(t); k < tiles.size();
           k += static_cast<std::size_t>(threads)) {
        w.tiles.push_back(tiles[k]);
      }
      w.gram = gram;
      w.sums = sums;
      w.sum_begin = sums ? d * t / threads : 0;
      w.sum_end = sums ? d * (t + 1) / threads : 0;
    }
    run_all(x, works);
    return;
  }

  // Narrow layers: threads own row ranges and private deltas, reduced in order.
  std::vector<Work> works(static_cast<std::size_t>(threads));
  std::vector<double> deltas(static_cast<std::size_t>(threads * d * (d + 1)), 0.0);
  for (std::int64_t t = 0; t < threads; ++t) {
    Work& w = works[static_cast<std::size_t>(t)];
    w.row_begin = n * t / threads;
    w.row_end = n * (t + 1) / threads;
    w.tiles = tiles;
    w.gram = deltas.data() + t * d * (d + 1);
    w.sums = w.gram + d * d;
    w.sum_begin = 0;
    w.sum_end = sums ? d : 0;
  }
  run_all(x, works);
  for (const Work& w : works) {
    for (std::int64_t k = 0; k < d * d; ++k) gram[k] += w.gram[k];
    if (sums) {
      for (std::int64_t c = 0; c < d; ++c) sums[c] += w.sums[c];
    }
  }
}

void gram_accumulate_reference(const MatrixView& x, double* gram, double* sums) {
  const std::int64_t d = x.cols;
  std::vector<double> row(static_cast<std::size_t>(d));
  std::vector<double> panel(static_cast<std::size_t>((d + kPack - 1) / kPack * kPack));
  for (std::int64_t r = 0; r < x.rows; ++r) {
    pack_panel(x, r, 1, static_cast<std::int64_t>(panel.size()), panel.data());
    for (std::int64_t c = 0; c < d; ++c) row[c] = panel[(c / kPack) * kPack + c % kPack];
    for (std::int64_t i = 0; i < d; ++i) {
      for (std::int64_t j = 0; j < d; ++j) gram[i * d + j] += row[i] * row[j];
      if (sums) sums[i] += row[i];
    }
  }
}

}  // namespace pyengine::core
