// gram_accumulate on CUDA: checks, then the torch-free kernel on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../cuda/gram.cuh"
#include "check.h"
#include "cuda_check.h"
#include "gram.h"

namespace pyengine::ops {
namespace {

void gram_accumulate_cuda(at::Tensor gram, const at::Tensor& x, std::optional<at::Tensor> sums) {
  check_gram_accumulate(gram, x, sums);
  const c10::cuda::CUDAGuard guard(x.device());
  check_cuda(cuda::gram_accumulate(matrix_view(x), gram.data_ptr<double>(),
                                   sums.has_value() ? sums->data_ptr<double>() : nullptr,
                                   c10::cuda::getCurrentCUDAStream(x.device().index()).stream()),
             "pyengine.gram_accumulate");
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CUDA, m) { m.impl("gram_accumulate", &gram_accumulate_cuda); }

}  // namespace pyengine::ops
