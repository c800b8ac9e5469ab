// Streaming top-k per column: merge a chunk of candidates into running sorted lists.
#pragma once

#include <cstdint>

#include "pyengine/core/host_device.h"
#include "pyengine/core/matrix.h"

namespace pyengine::core {

// For every column c of values (n x columns), merges rows i (candidate value values[i, c],
// id ids[i], payload payload[i * columns + c] if payload is given, else 0) into the running
// list of column c: top_values / top_ids / top_payload[c * k .. c * k + k), kept sorted by
// value descending, then id ascending (so ties go to the lower id and results never depend
// on chunking). Empty slots hold value -inf and id -1. NaN values never enter.
// Inserts (value, id, extra) into one column's sorted list v/ids/extras of length k, if it
// belongs there. Shared by the CPU and CUDA kernels.
PYENGINE_HOST_DEVICE inline bool topk_before(double value, std::int64_t id, double other_value,
                                             std::int64_t other_id) {
  if (value != other_value) return value > other_value;
  return other_id < 0 ? id >= 0 : (id >= 0 && id < other_id);
}

PYENGINE_HOST_DEVICE inline void topk_insert(double value, std::int64_t id, std::int64_t extra, std::int64_t k,
                                             double* v, std::int64_t* ids, std::int64_t* extras) {
  if (value != value || !topk_before(value, id, v[k - 1], ids[k - 1])) return;  // NaN, or not in the top k
  std::int64_t slot = k - 1;
  while (slot > 0 && topk_before(value, id, v[slot - 1], ids[slot - 1])) {
    v[slot] = v[slot - 1];
    ids[slot] = ids[slot - 1];
    extras[slot] = extras[slot - 1];
    --slot;
  }
  v[slot] = value;
  ids[slot] = id;
  extras[slot] = extra;
}

void topk_update(const MatrixView& values, const std::int64_t* ids, const std::int64_t* payload, std::int64_t k,
                 double* top_values, std::int64_t* top_ids, std::int64_t* top_payload, int num_threads);

}  // namespace pyengine::core
