#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "pyengine/core/paths.h"

namespace pyengine::ops {

constexpr int64_t kPathGeometryInts = 26;

// hierarchical_paths' checked arguments: the steps (pointing into the held tensors), the
// activation pointers, and the allocated outputs.
struct HierarchicalPathsArgs {
  std::vector<core::PathStep> steps;
  std::vector<at::Tensor> held;  // float64 / int64 contiguous copies the steps point into
  std::vector<const double*> activations;
  at::Tensor targets;
  at::Tensor paths;
  at::Tensor scores;
};

HierarchicalPathsArgs prepare_hierarchical_paths(at::TensorList activations, at::TensorList weights,
                                                 at::TensorList max_indices, at::IntArrayRef geometry,
                                                 const at::Tensor& targets, int64_t beam);

}  // namespace pyengine::ops
