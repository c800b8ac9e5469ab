// hierarchical_paths on CUDA: shared checks, the steps copied to the device, one workspace.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../cuda/paths.cuh"
#include "check.h"
#include "cuda_check.h"
#include "paths.h"

namespace pyengine::ops {
namespace {

constexpr const char* kOp = "pyengine.hierarchical_paths";

// a * b, or `cap` when the product is larger (or overflows int64); a, b, cap >= 0.
int64_t capped_mul(int64_t a, int64_t b, int64_t cap) {
  int64_t out = 0;
  return c10::mul_overflows(a, b, &out) || out > cap ? cap : out;
}

// The most units one target unit of step s connects to (the candidate list's capacity).
int64_t max_connected(const core::PathStep& s) {
  const int64_t cap = s.in.size();
  const int64_t pooled = s.pool == core::PoolKind::Avg ? s.pool_kernel[0] * s.pool_kernel[1] : 1;
  const int64_t reads =
      s.map == core::MapKind::Dense ? s.mid.size() : capped_mul(capped_mul(s.mid.c, s.kernel[0], cap), s.kernel[1], cap);
  return capped_mul(reads, pooled, cap);
}

// path_workspace_bytes' terms, overflow-checked (with room for its 256-byte alignment).
void check_workspace_size(int64_t pairs, int64_t layers, int64_t beam, int64_t max_units, int64_t max_candidates) {
  const char* what = "the GPU workspace size";
  int64_t per_pair = checked_mul(kOp, what, max_units, 9);  // weight (8 bytes) and seen (1 byte)
  per_pair = checked_add(kOp, what, per_pair, checked_mul(kOp, what, max_candidates, 8));
  per_pair = checked_add(kOp, what, per_pair, checked_product(kOp, what, {beam, max_candidates, 16}));
  per_pair = checked_add(kOp, what, per_pair, checked_mul(kOp, what, beam, 16));
  per_pair = checked_add(kOp, what, per_pair, checked_product(kOp, what, {beam, layers, 16}));
  checked_add(kOp, what, checked_mul(kOp, what, pairs, per_pair), 7 * 256);
}

at::Tensor to_device(const void* data, size_t bytes, const at::Tensor& like, cudaStream_t stream) {
  at::Tensor out = at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
  check_cuda(cudaMemcpyAsync(out.data_ptr(), data, bytes, cudaMemcpyHostToDevice, stream),
             kOp, "copy to the GPU");
  return out;
}

std::tuple<at::Tensor, at::Tensor> hierarchical_paths_cuda(at::TensorList activations, at::TensorList weights,
                                                           at::TensorList max_indices, at::IntArrayRef geometry,
                                                           const at::Tensor& targets, int64_t beam) {
  const c10::cuda::CUDAGuard guard(targets.device());
  HierarchicalPathsArgs p = prepare_hierarchical_paths(activations, weights, max_indices, geometry, targets, beam);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(targets.device().index()).stream();
  int64_t max_units = 1, max_candidates = 1;
  for (const auto& s : p.steps) {
    max_units = std::max(max_units, s.in.size());
    max_candidates = std::max(max_candidates, max_connected(s));
  }
  const auto layers = static_cast<int64_t>(p.steps.size());
  const at::Tensor steps = to_device(p.steps.data(), p.steps.size() * sizeof(core::PathStep), targets, stream);
  const at::Tensor pointers =
      to_device(p.activations.data(), p.activations.size() * sizeof(const double*), targets, stream);
  const int64_t pairs = p.targets.size(0) * p.targets.size(1);  // the size of targets
  check_workspace_size(pairs, layers, beam, max_units, max_candidates);
  at::Tensor workspace = at::empty(
      {static_cast<int64_t>(cuda::path_workspace_bytes(pairs, layers, beam, max_units, max_candidates))},
      targets.options().dtype(at::kByte));
  check_cuda(cuda::hierarchical_paths(reinterpret_cast<const core::PathStep*>(steps.data_ptr()), layers,
                                      reinterpret_cast<const double* const*>(pointers.data_ptr()), p.targets.size(0),
                                      p.targets.data_ptr<int64_t>(), p.targets.size(1), beam, max_units,
                                      max_candidates, workspace.data_ptr(), p.paths.data_ptr<int64_t>(),
                                      p.scores.data_ptr<double>(), stream),
             kOp);
  return {p.paths, p.scores};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CUDA, m) { m.impl("hierarchical_paths", &hierarchical_paths_cuda); }

}  // namespace pyengine::ops
