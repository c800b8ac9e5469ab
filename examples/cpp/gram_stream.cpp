// Streams an (n x d) float32 matrix through pyengine::core::gram_accumulate in chunks and
// checks it against the textbook loop. Usage: gram_stream N D CHUNK THREADS
// Row i, column j holds sin(0.001 * (i * D + j)) so other tools can recompute it.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "pyengine/core/gram.h"

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: %s N D CHUNK THREADS\n", argv[0]);
    return 2;
  }
  const long n = std::atol(argv[1]), d = std::atol(argv[2]), chunk = std::atol(argv[3]);
  const int threads = std::atoi(argv[4]);
  if (n < 0 || d < 1 || chunk < 1 || threads < 1) {
    std::fprintf(stderr, "error: expected N >= 0, D >= 1, CHUNK >= 1, THREADS >= 1\n");
    return 2;
  }
  std::vector<float> x(static_cast<std::size_t>(n * d));
  for (long i = 0; i < n * d; ++i) x[i] = static_cast<float>(std::sin(0.001 * i));

  std::vector<double> gram(d * d, 0.0), sums(d, 0.0), ref(d * d, 0.0), ref_sums(d, 0.0);
  for (long first = 0; first < n; first += chunk) {
    const long rows = std::min(chunk, n - first);
    pyengine::core::MatrixView view{x.data() + first * d, pyengine::core::DType::Float32, rows, d, d, 1};
    pyengine::core::gram_accumulate(view, gram.data(), sums.data(), threads);
  }
  pyengine::core::MatrixView all{x.data(), pyengine::core::DType::Float32, n, d, d, 1};
  pyengine::core::gram_accumulate_reference(all, ref.data(), ref_sums.data());

  double trace = 0.0, max_rel = 0.0, scale = 0.0;
  for (long i = 0; i < d * d; ++i) scale = std::max(scale, std::abs(ref[i]));
  for (long i = 0; i < d * d; ++i) max_rel = std::max(max_rel, std::abs(gram[i] - ref[i]) / (scale > 0 ? scale : 1));
  for (long i = 0; i < d; ++i) trace += gram[i * d + i];
  double sum_total = 0.0;
  for (long j = 0; j < d; ++j) sum_total += sums[j];
  std::printf("trace %.17g\nsum %.17g\nmax_rel_error %.3g\n", trace, sum_total, max_rel);
  return max_rel <= 1e-12 ? 0 : 1;
}
