// topk_update on CUDA: shared checks, the torch-free kernel on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../cuda/topk.cuh"
#include "check.h"
#include "cuda_check.h"
#include "topk.h"

namespace pyengine::ops {
namespace {

void topk_update_cuda(const at::Tensor& values, const at::Tensor& ids, const std::optional<at::Tensor>& payload,
                      const at::Tensor& top_values, const at::Tensor& top_ids, const at::Tensor& top_payload) {
  const c10::cuda::CUDAGuard guard(values.device());
  const TopkUpdateArgs args = prepare_topk_update(values, ids, payload, top_values, top_ids, top_payload);
  check_cuda(cuda::topk_update(matrix_view(values), args.ids.data_ptr<int64_t>(),
                               args.payload.defined() ? args.payload.data_ptr<int64_t>() : nullptr, top_values.size(1),
                               top_values.data_ptr<double>(), top_ids.data_ptr<int64_t>(),
                               top_payload.data_ptr<int64_t>(),
                               c10::cuda::getCurrentCUDAStream(values.device().index()).stream()),
             "pyengine.topk_update");
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CUDA, m) { m.impl("topk_update", &topk_update_cuda); }

}  // namespace pyengine::ops
