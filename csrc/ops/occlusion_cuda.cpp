// occlusion_batch and occlusion_accumulate on CUDA: shared checks, torch-free kernels.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../cuda/occlusion.cuh"
#include "check.h"
#include "cuda_check.h"
#include "occlusion.h"

namespace pyengine::ops {
namespace {

at::Tensor occlusion_batch_cuda(const at::Tensor& inputs, const at::Tensor& baseline, at::IntArrayRef window,
                                at::IntArrayRef stride, int64_t first, int64_t count) {
  const c10::cuda::CUDAGuard guard(inputs.device());
  const OcclusionBatchArgs args = prepare_occlusion_batch(inputs, baseline, window, stride, first, count);
  check_cuda(cuda::occlusion_fill(args.grid, args.inputs.data_ptr(), args.baseline.data_ptr(), args.baseline_per_input,
                                  args.inputs.size(0), args.inputs.element_size(), first, count, args.out.data_ptr(),
                                  c10::cuda::getCurrentCUDAStream(inputs.device().index()).stream()),
             "pyengine.occlusion_batch");
  return args.out;
}

void occlusion_accumulate_cuda(const at::Tensor& sums, const at::Tensor& drops, at::IntArrayRef window,
                               at::IntArrayRef stride, int64_t first) {
  const c10::cuda::CUDAGuard guard(sums.device());
  const OcclusionAccumulateArgs args = prepare_occlusion_accumulate(sums, drops, window, stride, first);
  check_cuda(cuda::occlusion_accumulate(args.grid, args.drops.data_ptr<double>(), sums.size(0), sums.size(1), first,
                                        args.drops.size(0), sums.data_ptr<double>(),
                                        c10::cuda::getCurrentCUDAStream(sums.device().index()).stream()),
             "pyengine.occlusion_accumulate");
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CUDA, m) {
  m.impl("occlusion_batch", &occlusion_batch_cuda);
  m.impl("occlusion_accumulate", &occlusion_accumulate_cuda);
}

}  // namespace pyengine::ops
