// Schemas of the LocTex C++ ops (namespace `loctex`). CPU kernels are registered in render.cpp and
// trace_attention.cpp, the loss's autograd in trace_attention_autograd.cpp; fake (meta) kernels and
// the render op's autograd formula live in kernels/cpp.py, which loads this library with
// torch.ops.load_library.
#include <torch/library.h>

TORCH_LIBRARY(loctex, m) {
  m.set_python_module("loctex.kernels.cpp");
  m.def("render_traces(Tensor points_xy, Tensor point_weights, Tensor token_ranges, int grid_h, "
        "int grid_w, float sigma) -> (Tensor heat, Tensor valid)");
  m.def("render_traces_backward(Tensor grad_heat, Tensor points_xy, Tensor point_weights, "
        "Tensor token_ranges, int grid_h, int grid_w, float sigma) "
        "-> (Tensor grad_points, Tensor grad_weights)");
  // The loss and, when flagged, dL/d(q·kᵀ)ᵀ [B, H*W, L] and dL/dpoints_xy, dL/dpoint_weights for a
  // unit upstream gradient (computed in the same pass; the autograd kernel,
  // trace_attention_autograd.cpp, sets the flags, scales them and contracts dL/d(q·kᵀ)ᵀ with k and
  // q). Unflagged gradients are empty tensors.
  m.def("trace_attention_loss(Tensor q, Tensor k, Tensor points_xy, Tensor point_weights, "
        "Tensor token_ranges, Tensor loc_mask, int grid_h, int grid_w, float sigma, float scale, "
        "str loss_type, bool grad_logits, bool grad_points) "
        "-> (Tensor loss, Tensor grad_logits, Tensor grad_points, Tensor grad_weights)");
}
