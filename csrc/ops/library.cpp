// Every pyengine op's schema, in one place. Implementations register per device.
#include <torch/library.h>

TORCH_LIBRARY(pyengine, m) {
  m.def("gram_accumulate(Tensor(a!) gram, Tensor x, Tensor(b!)? sums=None) -> ()");
  m.def("gram_eigh(Tensor gram, *, int? n=None, Tensor? center_sums=None) -> (Tensor, Tensor)");
  m.def("pack_firing(Tensor h, float threshold=0.0) -> Tensor");
  m.def("firing_disagreements(Tensor bits) -> Tensor");
  m.def("binned_statistics(Tensor h, Tensor labels, Tensor low, Tensor high, int bins) -> (Tensor, Tensor)");
  m.def("occlusion_batch(Tensor inputs, Tensor baseline, int[] window, int[] stride, int first, int count) -> Tensor");
  m.def("topk_update(Tensor values, Tensor ids, Tensor? payload, Tensor(a!) top_values, Tensor(b!) top_ids, "
        "Tensor(c!) top_payload) -> ()");
  m.def("hierarchical_paths(Tensor[] activations, Tensor[] weights, Tensor[] max_indices, int[] geometry, "
        "Tensor targets, int beam) -> (Tensor, Tensor)");
  m.def("occlusion_accumulate(Tensor(a!) sums, Tensor drops, int[] window, int[] stride, int first) -> ()");
}
