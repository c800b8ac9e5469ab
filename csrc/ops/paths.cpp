// hierarchical_paths: shared checks and the CPU kernel.
#include "paths.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "check.h"

namespace pyengine::ops {
namespace {

constexpr const char* kOp = "pyengine.hierarchical_paths";

core::PathStep decode_step(const int64_t* g, int64_t l) {
  core::PathStep s;
  s.in = {g[0], g[1], g[2]};
  TORCH_CHECK(g[3] >= 0 && g[3] <= 2, kOp, ": step ", l, " has pool kind ", g[3], "; expected 0 (none), 1 (max), 2 (avg)");
  s.pool = static_cast<core::PoolKind>(g[3]);
  s.pool_kernel[0] = g[4], s.pool_kernel[1] = g[5];
  s.pool_stride[0] = g[6], s.pool_stride[1] = g[7];
  s.pool_padding[0] = g[8], s.pool_padding[1] = g[9];
  s.pool_count_padding = g[10] != 0;
  s.mid = {g[11], g[12], g[13]};
  TORCH_CHECK(g[14] == 0 || g[14] == 1, kOp, ": step ", l, " has map kind ", g[14], "; expected 0 (dense), 1 (conv)");
  s.map = static_cast<core::MapKind>(g[14]);
  s.out = {g[15], g[16], g[17]};
  for (int i = 0; i < 2; ++i) {
    s.kernel[i] = g[18 + i];
    s.stride[i] = g[20 + i];
    s.padding[i] = g[22 + i];
    s.dilation[i] = g[24 + i];
  }
  for (const int64_t v : {s.in.c, s.in.h, s.in.w, s.mid.c, s.mid.h, s.mid.w, s.out.c, s.out.h, s.out.w, s.kernel[0],
                          s.kernel[1], s.stride[0], s.stride[1], s.dilation[0], s.dilation[1], s.pool_kernel[0],
                          s.pool_kernel[1], s.pool_stride[0], s.pool_stride[1]}) {
    TORCH_CHECK(v >= 1, kOp, ": step ", l, " has a non-positive size, kernel, stride or dilation");
  }
  TORCH_CHECK(s.pool != core::PoolKind::None || (s.mid.c == s.in.c && s.mid.h == s.in.h && s.mid.w == s.in.w), kOp,
              ": step ", l, " has no pooling, so its mid shape must equal its input shape");
  TORCH_CHECK(s.pool == core::PoolKind::None || s.mid.c == s.in.c, kOp, ": step ", l,
              " pools, which keeps the channels; got ", s.in.c, " -> ", s.mid.c);
  return s;
}

}  // namespace

HierarchicalPathsArgs prepare_hierarchical_paths(at::TensorList activations, at::TensorList weights,
                                                 at::TensorList max_indices, at::IntArrayRef geometry,
                                                 const at::Tensor& targets, int64_t beam) {
  const auto layers = static_cast<int64_t>(activations.size());
  TORCH_CHECK(layers >= 1, kOp, ": needs at least one ReLU layer's activations");
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == layers && static_cast<int64_t>(max_indices.size()) == layers &&
                  static_cast<int64_t>(geometry.size()) == layers * kPathGeometryInts,
              kOp, ": expected one weight, one max-index tensor and ", kPathGeometryInts,
              " geometry values per layer (", layers, " layers)");
  check_tensor(kOp, targets, {"targets", 2, {at::kLong}});
  TORCH_CHECK(beam >= 1, kOp, ": beam must be a positive integer, got ", beam);
  const int64_t batch = targets.size(0);
  HierarchicalPathsArgs problem;
  const at::Device device = targets.device();
  for (int64_t l = 0; l < layers; ++l) {
    core::PathStep s = decode_step(geometry.data() + l * kPathGeometryInts, l);
    const at::Tensor& a = activations[static_cast<size_t>(l)];
    TORCH_CHECK(a.device() == device && a.dim() >= 1 && a.size(0) == batch && a.numel() == batch * s.in.size(), kOp,
                ": activations[", l, "] has shape ", shape_string(a), " on ", a.device(), "; expected ", batch,
                " rows of ", s.in.size(), " values on ", device);
    const at::Tensor& w = weights[static_cast<size_t>(l)];
    const int64_t expected = s.map == core::MapKind::Dense ? s.out.size() * s.mid.size()
                                                           : s.out.c * s.mid.c * s.kernel[0] * s.kernel[1];
    TORCH_CHECK(w.device() == device && w.numel() == expected, kOp, ": weights[", l, "] has shape ", shape_string(w),
                "; expected ", expected, " values on ", device);
    const at::Tensor& m = max_indices[static_cast<size_t>(l)];
    if (s.pool == core::PoolKind::Max) {
      TORCH_CHECK(m.device() == device && m.scalar_type() == at::kLong && m.numel() == batch * s.mid.size(), kOp,
                  ": max_indices[", l, "] must hold ", batch, " x ", s.mid.size(), " int64 indices on ", device);
      problem.held.push_back(m.contiguous());
      s.max_index = problem.held.back().data_ptr<int64_t>();
    }
    if (l + 1 < layers) {
      const core::PathStep next = decode_step(geometry.data() + (l + 1) * kPathGeometryInts, l + 1);
      TORCH_CHECK(s.out.size() == next.in.size(), kOp, ": step ", l, " outputs ", s.out.size(),
                  " units but layer ", l + 1, " has ", next.in.size());
    }
    problem.held.push_back(a.to(at::kDouble).contiguous());
    problem.activations.push_back(problem.held.back().data_ptr<double>());
    problem.held.push_back(w.to(at::kDouble).contiguous());
    s.weight = problem.held.back().data_ptr<double>();
    problem.steps.push_back(s);
  }
  const int64_t outputs = problem.steps.back().out.size();
  TORCH_CHECK(targets.numel() == 0 || (targets.min().item<int64_t>() >= 0 && targets.max().item<int64_t>() < outputs),
              kOp, ": targets must be output indices in [0, ", outputs, ")");
  problem.targets = targets.contiguous();
  const int64_t per_input = targets.size(1);
  problem.paths = at::empty({batch, per_input, beam, layers}, targets.options());
  problem.scores = at::empty({batch, per_input, beam}, targets.options().dtype(at::kDouble));
  return problem;
}

namespace {

std::tuple<at::Tensor, at::Tensor> hierarchical_paths_cpu(at::TensorList activations, at::TensorList weights,
                                                          at::TensorList max_indices, at::IntArrayRef geometry,
                                                          const at::Tensor& targets, int64_t beam) {
  HierarchicalPathsArgs p = prepare_hierarchical_paths(activations, weights, max_indices, geometry, targets, beam);
  core::hierarchical_paths(p.steps.data(), static_cast<int64_t>(p.steps.size()), p.activations.data(),
                           p.targets.size(0), p.targets.data_ptr<int64_t>(), p.targets.size(1), beam,
                           p.paths.data_ptr<int64_t>(), p.scores.data_ptr<double>(), at::get_num_threads());
  return {p.paths, p.scores};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CPU, m) { m.impl("hierarchical_paths", &hierarchical_paths_cpu); }

}  // namespace pyengine::ops
