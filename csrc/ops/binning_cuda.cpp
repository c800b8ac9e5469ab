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
  const BinnedStatisticsArgs args = prepare_binned_statistics(h, labels, low, high, bins);
  check_cuda(cuda::binned_statistics(matrix_view(h), args.labels.data_ptr<uint8_t>(), args.labels.size(0),
                                     args.low.data_ptr<double>(), args.high.data_ptr<double>(), bins,
                                     args.counts.data_ptr<double>(), args.sums.data_ptr<double>(),
                                     c10::cuda::getCurrentCUDAStream(h.device().index()).stream()),
             "pyengine.binned_statistics");
  return {args.counts, args.sums};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CUDA, m) { m.impl("binned_statistics", &binned_statistics_cuda); }

}  // namespace pyengine::ops
