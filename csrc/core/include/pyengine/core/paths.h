// Hierarchical path decomposition of ReLU networks (Cheng et al., Algorithm 1, with a beam).
#pragma once

#include <cstdint>

#include "pyengine/core/host_device.h"

namespace pyengine::core {

enum class PoolKind : std::int64_t { None = 0, Max = 1, Avg = 2 };
enum class MapKind : std::int64_t { Dense = 0, Conv = 1 };

struct Shape3 {
  std::int64_t c = 1, h = 1, w = 1;  // features are (c, 1, 1)
  PYENGINE_HOST_DEVICE std::int64_t size() const { return c * h * w; }
};

// The linear map from one ReLU layer's output a (shape `in`) to the next pre-activations
// (shape `out`): an optional 2-D max or average pooling (in -> mid), then a dense map over
// the flattened mid units or a 2-D convolution (groups 1).
struct PathStep {
  Shape3 in;
  PoolKind pool = PoolKind::None;
  std::int64_t pool_kernel[2] = {1, 1}, pool_stride[2] = {1, 1}, pool_padding[2] = {0, 0};
  bool pool_count_padding = true;  // average pooling divides by the whole window (torch's default)
  Shape3 mid;                      // == in without pooling
  const std::int64_t* max_index = nullptr;  // max pooling: batch x mid.size(), flat index in the in.h x in.w plane
  MapKind map = MapKind::Dense;
  const double* weight = nullptr;  // dense: out.size() x mid.size(); conv: out.c x mid.c x kernel[0] x kernel[1]
  Shape3 out;
  std::int64_t kernel[2] = {1, 1}, stride[2] = {1, 1}, padding[2] = {0, 0}, dilation[2] = {1, 1};
};

// steps[l] maps ReLU layer l (forward order) to layer l + 1's pre-activations; the last maps
// to the outputs. activations[l]: batch x steps[l].in.size(). For each input b and each of
// its targets (targets: batch x per_input output indices), walks down from the output:
// the candidates of a target unit t are the units j of the layer below connected to it (its
// receptive field; through max pooling only the selected inputs), with importance
// w(t, j) * a_j, w the effective weight. A partial path's score is the sum of its steps'
// importances; the `beam` best partial paths are kept (beam 1 is Algorithm 1's argmax; ties
// go to the earlier path, then the lower unit index). paths: batch x per_input x beam x layers
// unit indices (-1 where fewer paths exist), scores: batch x per_input x beam.
void hierarchical_paths(const PathStep* steps, std::int64_t layers, const double* const* activations,
                        std::int64_t batch, const std::int64_t* targets, std::int64_t per_input, std::int64_t beam,
                        std::int64_t* paths, double* scores, int num_threads);

}  // namespace pyengine::core
