// hierarchical_paths: shared checks and the CPU kernel.
#include "paths.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "check.h"

namespace pyengine::ops {
namespace {

constexpr const char* kOp = "pyengine.hierarchical_paths";

std::string step_name(int64_t l, const char* what) { return "step " + std::to_string(l) + " " + what; }

// The index arithmetic of connect() / add_pooled() stays inside int64: the furthest position
// a window reaches, (positions - 1) * stride + (kernel - 1) * dilation + 1, must fit.
void check_reach(int64_t l, const char* what, int64_t positions, int64_t stride, int64_t kernel, int64_t dilation) {
  const std::string name = step_name(l, what);
  checked_add(kOp, name, checked_mul(kOp, name, positions - 1, stride),
              checked_add(kOp, name, checked_mul(kOp, name, kernel - 1, dilation), 1));
}

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
  for (const int64_t v : {s.padding[0], s.padding[1], s.pool_padding[0], s.pool_padding[1]}) {
    TORCH_CHECK(v >= 0, kOp, ": step ", l, " has a negative padding");
  }
  // Every size product the kernels and the checks below use, overflow-checked first.
  checked_product(kOp, step_name(l, "input shape c * h * w"), {s.in.c, s.in.h, s.in.w});
  checked_product(kOp, step_name(l, "pooled shape c * h * w"), {s.mid.c, s.mid.h, s.mid.w});
  checked_product(kOp, step_name(l, "output shape c * h * w"), {s.out.c, s.out.h, s.out.w});
  checked_product(kOp, step_name(l, "pool window"), {s.pool_kernel[0], s.pool_kernel[1]});
  checked_add(kOp, step_name(l, "padded input height"), s.in.h, s.pool_padding[0]);
  checked_add(kOp, step_name(l, "padded input width"), s.in.w, s.pool_padding[1]);
  check_reach(l, "pool rows", s.mid.h, s.pool_stride[0], s.pool_kernel[0], 1);
  check_reach(l, "pool columns", s.mid.w, s.pool_stride[1], s.pool_kernel[1], 1);
  check_reach(l, "convolution rows", s.out.h, s.stride[0], s.kernel[0], s.dilation[0]);
  check_reach(l, "convolution columns", s.out.w, s.stride[1], s.kernel[1], s.dilation[1]);
  TORCH_CHECK(s.pool != core::PoolKind::None || (s.mid.c == s.in.c && s.mid.h == s.in.h && s.mid.w == s.in.w), kOp,
              ": step ", l, " has no pooling, so its mid shape must equal its input shape");
  TORCH_CHECK(s.pool == core::PoolKind::None || s.mid.c == s.in.c, kOp, ": step ", l,
              " pools, which keeps the channels; got ", s.in.c, " -> ", s.mid.c);
  return s;
}

// The values of an int64 tensor lie in [0, end): one reduction (on the tensor's device).
bool all_in_range(const at::Tensor& t, int64_t end) {
  if (t.numel() == 0) return true;
  const auto [low, high] = at::aminmax(t);
  return low.item<int64_t>() >= 0 && high.item<int64_t>() < end;
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
    const int64_t values = checked_mul(kOp, step_name(l, "activations: batch * units"), batch, s.in.size());
    TORCH_CHECK(a.device() == device && a.layout() == at::kStrided && at::isFloatingType(a.scalar_type()) &&
                    a.dim() >= 1 && a.size(0) == batch && a.numel() == values,
                kOp, ": activations[", l, "] has shape ", shape_string(a), " (", a.scalar_type(), ") on ",
                a.device(), "; expected ", batch, " rows of ", s.in.size(), " floating values on ", device);
    const at::Tensor& w = weights[static_cast<size_t>(l)];
    const int64_t expected =
        s.map == core::MapKind::Dense
            ? checked_mul(kOp, step_name(l, "weight size"), s.out.size(), s.mid.size())
            : checked_product(kOp, step_name(l, "weight size"), {s.out.c, s.mid.c, s.kernel[0], s.kernel[1]});
    TORCH_CHECK(w.device() == device && w.layout() == at::kStrided && at::isFloatingType(w.scalar_type()) &&
                    w.numel() == expected,
                kOp, ": weights[", l, "] has shape ", shape_string(w), " (", w.scalar_type(), ") on ", w.device(),
                "; expected ", expected, " floating values on ", device);
    const at::Tensor& m = max_indices[static_cast<size_t>(l)];
    if (s.pool == core::PoolKind::Max) {
      const int64_t indices = checked_mul(kOp, step_name(l, "max_indices: batch * pooled units"), batch, s.mid.size());
      TORCH_CHECK(m.device() == device && m.layout() == at::kStrided && m.scalar_type() == at::kLong &&
                      m.numel() == indices,
                  kOp, ": max_indices[", l, "] must hold ", batch, " x ", s.mid.size(), " int64 indices on ", device,
                  "; got shape ", shape_string(m), " (", m.scalar_type(), ") on ", m.device());
      const int64_t plane = s.in.h * s.in.w;
      TORCH_CHECK(all_in_range(m, plane), kOp, ": max_indices[", l, "] must be flat indices into the ", s.in.h,
                  " x ", s.in.w, " input plane, in [0, ", plane, ")");
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
  TORCH_CHECK(all_in_range(targets, outputs), kOp, ": targets must be output indices in [0, ", outputs, ")");
  problem.targets = targets.contiguous();
  const int64_t per_input = targets.size(1);
  checked_product(kOp, "paths size (batch * targets * beam * layers * 8 bytes)",
                  {batch, per_input, beam, layers, static_cast<int64_t>(sizeof(int64_t))});
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
