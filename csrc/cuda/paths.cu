// One thread walks one (input, target) pair down the layers, as the CPU code does, with its
// scratch rows in a global workspace. The walk is sequential per pair; pairs run in parallel.
#include <cmath>

#include "paths.cuh"
#include "pyengine/core/paths_connect.h"

namespace pyengine::cuda {
namespace {

using core::PathStep;

struct Workspace {
  double* weight;          // pairs x max_units
  unsigned char* seen;     // pairs x max_units
  std::int64_t* touched;   // pairs x max_candidates
  double* cand_score;      // pairs x beam x max_candidates
  std::int64_t* cand_ref;  // pairs x beam x max_candidates: parent * max_units + unit
  double* score;           // pairs x 2 x beam (current, next)
  std::int64_t* units;     // pairs x 2 x beam x layers
};

std::size_t align(std::size_t bytes) { return (bytes + 255) / 256 * 256; }

struct Scratch {
  double* weight;
  unsigned char* seen;
  std::int64_t* touched;
  std::int64_t count;

  __device__ void add(std::int64_t j, double w) {
    if (!seen[j]) {
      seen[j] = 1;
      touched[count++] = j;
    }
    weight[j] += w;
  }
  __device__ void reset() {
    for (std::int64_t i = 0; i < count; ++i) {
      weight[touched[i]] = 0.0;
      seen[touched[i]] = 0;
    }
    count = 0;
  }
};

// a before b in the beam's order: higher score, then lower reference (parent, then unit).
__device__ bool before(double sa, std::int64_t ra, double sb, std::int64_t rb) {
  return sa != sb ? sa > sb : ra < rb;
}

__global__ void paths_kernel(const PathStep* steps, std::int64_t layers, const double* const* activations,
                             std::int64_t pairs, const std::int64_t* targets, std::int64_t per_input,
                             std::int64_t beam, std::int64_t max_units, std::int64_t max_candidates, Workspace w,
                             std::int64_t* paths, double* scores) {
  const std::int64_t pair = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (pair >= pairs) return;
  const std::int64_t b = pair / per_input;
  Scratch scratch{w.weight + pair * max_units, w.seen + pair * max_units, w.touched + pair * max_candidates, 0};
  double* cand_score = w.cand_score + pair * beam * max_candidates;
  std::int64_t* cand_ref = w.cand_ref + pair * beam * max_candidates;
  double* score[2] = {w.score + pair * 2 * beam, w.score + pair * 2 * beam + beam};
  std::int64_t* units[2] = {w.units + pair * 2 * beam * layers, w.units + pair * 2 * beam * layers + beam * layers};
  std::int64_t entries = 1, current = 0;
  score[0][0] = 0.0;
  std::int64_t reached_top = targets[pair];
  for (std::int64_t l = layers - 1; l >= 0; --l) {
    const PathStep& s = steps[l];
    const double* a = activations[l] + b * s.in.size();
    const std::int64_t depth = layers - 1 - l;  // units already on each path
    std::int64_t n = 0;
    for (std::int64_t p = 0; p < entries; ++p) {
      const std::int64_t reached = depth == 0 ? reached_top : units[current][p * layers + depth - 1];
      scratch.reset();
      core::connect(s, b, reached, scratch);
      for (std::int64_t i = 0; i < scratch.count; ++i) {
        const std::int64_t j = scratch.touched[i];
        cand_score[n] = score[current][p] + scratch.weight[j] * a[j];
        cand_ref[n] = p * max_units + j;
        ++n;
      }
    }
    const std::int64_t keep = min(beam, n);
    const std::int64_t next = 1 - current;
    double last_score = INFINITY;
    std::int64_t last_ref = -1;
    for (std::int64_t k = 0; k < keep; ++k) {  // the k-th best: the best of those after the (k-1)-th
      std::int64_t best = -1;
      for (std::int64_t i = 0; i < n; ++i) {
        if (k > 0 && !before(last_score, last_ref, cand_score[i], cand_ref[i])) continue;
        if (best < 0 || before(cand_score[i], cand_ref[i], cand_score[best], cand_ref[best])) best = i;
      }
      last_score = cand_score[best];
      last_ref = cand_ref[best];
      const std::int64_t parent = last_ref / max_units;
      score[next][k] = last_score;
      for (std::int64_t d = 0; d < depth; ++d) units[next][k * layers + d] = units[current][parent * layers + d];
      units[next][k * layers + depth] = last_ref % max_units;
    }
    entries = keep;
    current = next;
  }
  for (std::int64_t k = 0; k < beam; ++k) {
    const bool found = k < entries;
    scores[pair * beam + k] = found ? score[current][k] : -INFINITY;
    for (std::int64_t l = 0; l < layers; ++l) {
      paths[(pair * beam + k) * layers + l] = found ? units[current][k * layers + (layers - 1 - l)] : -1;
    }
  }
}

}  // namespace

std::size_t path_workspace_bytes(std::int64_t pairs, std::int64_t layers, std::int64_t beam, std::int64_t max_units,
                                 std::int64_t max_candidates) {
  const auto p = static_cast<std::size_t>(pairs);
  return align(p * max_units * sizeof(double)) + align(p * max_units) + align(p * max_candidates * 8) +
         align(p * beam * max_candidates * sizeof(double)) + align(p * beam * max_candidates * 8) +
         align(p * 2 * beam * sizeof(double)) + align(p * 2 * beam * layers * 8);
}

cudaError_t hierarchical_paths(const core::PathStep* steps, std::int64_t layers, const double* const* activations,
                               std::int64_t batch, const std::int64_t* targets, std::int64_t per_input,
                               std::int64_t beam, std::int64_t max_units, std::int64_t max_candidates,
                               void* workspace, std::int64_t* paths, double* scores, cudaStream_t stream) {
  const std::int64_t pairs = batch * per_input;
  if (pairs == 0 || layers == 0) return cudaSuccess;
  auto* base = static_cast<unsigned char*>(workspace);
  const auto p = static_cast<std::size_t>(pairs);
  Workspace w{};
  std::size_t offset = 0;
  auto take = [&](std::size_t bytes) {
    unsigned char* at = base + offset;
    offset += align(bytes);
    return at;
  };
  w.weight = reinterpret_cast<double*>(take(p * max_units * sizeof(double)));
  w.seen = take(p * max_units);
  w.touched = reinterpret_cast<std::int64_t*>(take(p * max_candidates * 8));
  w.cand_score = reinterpret_cast<double*>(take(p * beam * max_candidates * sizeof(double)));
  w.cand_ref = reinterpret_cast<std::int64_t*>(take(p * beam * max_candidates * 8));
  w.score = reinterpret_cast<double*>(take(p * 2 * beam * sizeof(double)));
  w.units = reinterpret_cast<std::int64_t*>(take(p * 2 * beam * layers * 8));
  // weight and seen must start at zero; the rest is written before it is read.
  cudaError_t status = cudaMemsetAsync(w.weight, 0, p * max_units * sizeof(double), stream);
  if (status == cudaSuccess) status = cudaMemsetAsync(w.seen, 0, p * max_units, stream);
  if (status != cudaSuccess) return status;
  constexpr int kThreads = 64;
  paths_kernel<<<static_cast<unsigned>((pairs + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      steps, layers, activations, pairs, targets, per_input, beam, max_units, max_candidates, w, paths, scores);
  return cudaGetLastError();
}

}  // namespace pyengine::cuda
