// binned_statistics on CUDA: shared checks, then the torch-free kernel on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../cuda/binning.cuh"
#include "binning.h"
#include "check.h"
#include "cuda_check.h"

namespace pyengine::ops {
namespace {

std::tuple<at::Tensor, at::Tensor> binned_statistics_cuda(const at::Tensor& h, const at::Tensor& labels,
                                                          const at::Tensor& low, const at::Tensor& high,
                                                          int64_t bins) {
  const c10::cuda::CUDAGuard guard(h.device());
  auto [flags, low64, high64, counts, sums] = prepare_binned_statistics(h, labels, low, high, bins);
  check_cuda(cuda::binned_statistics(matrix_view(h), flags.data_ptr<uint8_t>(), flags.size(0),
                                     low64.data_ptr<double>(), high64.data_ptr<double>(), bins,
                                     counts.data_ptr<double>(), sums.data_ptr<double>(),
                                     c10::cuda::getCurrentCUDAStream(h.device().index()).stream()),
             "pyengine.binned_statistics");
  return {counts, sums};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CUDA, m) { m.impl("binned_statistics", &binned_statistics_cuda); }

}  // namespace pyengine::ops
