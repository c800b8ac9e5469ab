// pack_firing and firing_disagreements on CUDA: shared checks, torch-free kernels.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../cuda/firing.cuh"
#include "check.h"
#include "cuda_check.h"
#include "firing.h"

namespace pyengine::ops {
namespace {

at::Tensor pack_firing_cuda(const at::Tensor& h, double threshold) {
  const c10::cuda::CUDAGuard guard(h.device());
  at::Tensor bits = prepare_pack_firing(h);
  check_cuda(cuda::pack_firing(matrix_view(h), threshold, reinterpret_cast<uint64_t*>(bits.data_ptr<int64_t>()),
                               bits.size(1), c10::cuda::getCurrentCUDAStream(h.device().index()).stream()),
             "pyengine.pack_firing");
  return bits;
}

at::Tensor firing_disagreements_cuda(const at::Tensor& bits) {
  const c10::cuda::CUDAGuard guard(bits.device());
  at::Tensor out = prepare_firing_disagreements(bits);
  check_cuda(cuda::firing_disagreements(reinterpret_cast<const uint64_t*>(bits.data_ptr<int64_t>()),
                                        bits.size(0), bits.size(1), out.data_ptr<int64_t>(),
                                        c10::cuda::getCurrentCUDAStream(bits.device().index()).stream()),
             "pyengine.firing_disagreements");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CUDA, m) {
  m.impl("pack_firing", &pack_firing_cuda);
  m.impl("firing_disagreements", &firing_disagreements_cuda);
}

}  // namespace pyengine::ops
