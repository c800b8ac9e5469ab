// pack_firing and firing_disagreements: shared checks and the CPU kernels.
#include "firing.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "check.h"
#include "pyengine/core/firing.h"

namespace pyengine::ops {

at::Tensor prepare_pack_firing(const at::Tensor& h) {
  constexpr const char* op = "pyengine.pack_firing";
  check_tensor(op, h, {"h", 2, {at::kHalf, at::kBFloat16, at::kFloat, at::kDouble}});
  const int64_t words = h.size(0) / 64 + (h.size(0) % 64 != 0 ? 1 : 0);  // ceil(rows / 64) without overflow
  checked_product(op, "output size in bytes (units * words * 8)", {h.size(1), words, 8});
  return at::zeros({h.size(1), words}, h.options().dtype(at::kLong));
}

at::Tensor prepare_firing_disagreements(const at::Tensor& bits) {
  constexpr const char* op = "pyengine.firing_disagreements";
  check_tensor(op, bits, {"bits", 2, {at::kLong}, true});
  checked_product(op, "output size in bytes (units * units * 8)", {bits.size(0), bits.size(0), 8});
  return at::zeros({bits.size(0), bits.size(0)}, bits.options());
}

namespace {

uint64_t* words_of(const at::Tensor& bits) { return reinterpret_cast<uint64_t*>(bits.data_ptr<int64_t>()); }

at::Tensor pack_firing_cpu(const at::Tensor& h, double threshold) {
  at::Tensor bits = prepare_pack_firing(h);
  core::pack_firing(matrix_view(h), threshold, words_of(bits), bits.size(1), at::get_num_threads());
  return bits;
}

at::Tensor firing_disagreements_cpu(const at::Tensor& bits) {
  at::Tensor out = prepare_firing_disagreements(bits);
  core::firing_disagreements(reinterpret_cast<const uint64_t*>(bits.data_ptr<int64_t>()), bits.size(0),
                             bits.size(1), out.data_ptr<int64_t>(), at::get_num_threads());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CPU, m) {
  m.impl("pack_firing", &pack_firing_cpu);
  m.impl("firing_disagreements", &firing_disagreements_cpu);
}

}  // namespace pyengine::ops
