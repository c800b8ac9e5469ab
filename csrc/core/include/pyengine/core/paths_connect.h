// The effective weights from a layer's units to one unit of the next layer, shared by the
// CPU and CUDA walks. `Scratch` sums weights per unit: add(unit, weight).
#pragma once

#include <cstdint>

#include "pyengine/core/paths.h"

namespace pyengine::core {

// Adds pooled unit q = (c, y, x) of s.mid with weight w to the units of s.in it reads.
template <typename Scratch>
PYENGINE_HOST_DEVICE void add_pooled(const PathStep& s, std::int64_t b, std::int64_t q, double w, Scratch& scratch) {
  if (s.pool == PoolKind::None) {
    scratch.add(q, w);
    return;
  }
  const std::int64_t plane = s.mid.h * s.mid.w;
  const std::int64_t c = q / plane;
  if (s.pool == PoolKind::Max) {
    scratch.add(c * s.in.h * s.in.w + s.max_index[b * s.mid.size() + q], w);
    return;
  }
  const std::int64_t y0 = ((q % plane) / s.mid.w) * s.pool_stride[0] - s.pool_padding[0];
  const std::int64_t x0 = (q % s.mid.w) * s.pool_stride[1] - s.pool_padding[1];
  const std::int64_t y_begin = y0 > 0 ? y0 : 0, x_begin = x0 > 0 ? x0 : 0;
  const std::int64_t y_end = y0 + s.pool_kernel[0] < s.in.h ? y0 + s.pool_kernel[0] : s.in.h;
  const std::int64_t x_end = x0 + s.pool_kernel[1] < s.in.w ? x0 + s.pool_kernel[1] : s.in.w;
  // torch's divisor: the window clipped to the padded input, or to the input itself.
  const std::int64_t padded_h = y0 + s.pool_kernel[0] < s.in.h + s.pool_padding[0] ? s.pool_kernel[0]
                                                                                   : s.in.h + s.pool_padding[0] - y0;
  const std::int64_t padded_w = x0 + s.pool_kernel[1] < s.in.w + s.pool_padding[1] ? s.pool_kernel[1]
                                                                                   : s.in.w + s.pool_padding[1] - x0;
  const double count = s.pool_count_padding ? static_cast<double>(padded_h * padded_w)
                                            : static_cast<double>((y_end - y_begin) * (x_end - x_begin));
  for (std::int64_t iy = y_begin; iy < y_end; ++iy) {
    for (std::int64_t ix = x_begin; ix < x_end; ++ix) scratch.add((c * s.in.h + iy) * s.in.w + ix, w / count);
  }
}

// Every unit of s.in connected to unit t of s.out, with its summed effective weight
// (the scratch is expected empty).
template <typename Scratch>
PYENGINE_HOST_DEVICE void connect(const PathStep& s, std::int64_t b, std::int64_t t, Scratch& scratch) {
  if (s.map == MapKind::Dense) {
    const double* row = s.weight + t * s.mid.size();
    for (std::int64_t q = 0; q < s.mid.size(); ++q) add_pooled(s, b, q, row[q], scratch);
    return;
  }
  const std::int64_t plane = s.out.h * s.out.w;
  const std::int64_t co = t / plane, y = (t % plane) / s.out.w, x = t % s.out.w;
  for (std::int64_t ci = 0; ci < s.mid.c; ++ci) {
    for (std::int64_t ky = 0; ky < s.kernel[0]; ++ky) {
      const std::int64_t py = y * s.stride[0] - s.padding[0] + ky * s.dilation[0];
      if (py < 0 || py >= s.mid.h) continue;
      for (std::int64_t kx = 0; kx < s.kernel[1]; ++kx) {
        const std::int64_t px = x * s.stride[1] - s.padding[1] + kx * s.dilation[1];
        if (px < 0 || px >= s.mid.w) continue;
        add_pooled(s, b, (ci * s.mid.h + py) * s.mid.w + px,
                   s.weight[((co * s.mid.c + ci) * s.kernel[0] + ky) * s.kernel[1] + kx], scratch);
      }
    }
  }
}

}  // namespace pyengine::core
