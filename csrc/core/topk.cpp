// Streaming top-k on the CPU: threads own disjoint columns; each candidate is compared with
// the column's current k-th entry and, if better, inserted by shifting the worse ones down
// (topk_insert, shared with the CUDA kernel).
#include "pyengine/core/topk.h"

#include "pyengine/core/parallel.h"

#include <algorithm>
#include <type_traits>

namespace pyengine::core {
namespace {

template <typename T>
void merge_columns(const MatrixView& values, const std::int64_t* ids, const std::int64_t* payload, std::int64_t k,
                   double* top_values, std::int64_t* top_ids, std::int64_t* top_payload, std::int64_t begin,
                   std::int64_t end) {
  const T* data = static_cast<const T*>(values.data);
  for (std::int64_t c = begin; c < end; ++c) {
    double* v = top_values + c * k;
    std::int64_t* id = top_ids + c * k;
    std::int64_t* extra = top_payload + c * k;
    for (std::int64_t i = 0; i < values.rows; ++i) {
      topk_insert(to_double(data + i * values.row_stride + c * values.col_stride), ids[i],
                  payload != nullptr ? payload[i * values.cols + c] : 0, k, v, id, extra);
    }
  }
}

}  // namespace

void topk_update(const MatrixView& values, const std::int64_t* ids, const std::int64_t* payload, std::int64_t k,
                 double* top_values, std::int64_t* top_ids, std::int64_t* top_payload, int num_threads) {
  if (values.rows == 0 || values.cols == 0 || k <= 0) return;
  // A thread needs ~16 Ki candidates (rows x its columns) to pay for itself.
  const std::int64_t grain = std::max<std::int64_t>(1, (1 << 14) / values.rows);
  visit_dtype(values.dtype, [&](auto tag) {
    using T = std::remove_cv_t<std::remove_pointer_t<decltype(tag)>>;
    parallel_for(0, values.cols, grain, [&](std::int64_t begin, std::int64_t end) {
      merge_columns<T>(values, ids, payload, k, top_values, top_ids, top_payload, begin, end);
    }, num_threads);
  });
}

}  // namespace pyengine::core
