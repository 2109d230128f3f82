// Autograd for loctex::trace_attention_loss, in C++: the forward (trace_attention.cpp) returns
// dL/d(q·kᵀ)ᵀ and the point gradients for a unit upstream gradient, computed in the same pass; the
// backward scales dL/d(q·kᵀ)ᵀ ([B, H*W, L], small) by the upstream gradient and contracts it with k
// and q — two GEMMs — so dq and dk are written once, already scaled.
//
// It lives in C++ rather than in torch.library.register_autograd because the Python wrapper costs
// about 0.1 ms a call (argument defaults filled from the schema, Python frames forward and
// backward), 5% of the whole loss at B=32, L=64, 7x7 on two cores. The fake (meta) kernel for
// torch.compile stays in kernels/cpp.py.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>

namespace loctex {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Outputs call_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& points_xy,
                     const at::Tensor& point_weights, const at::Tensor& token_ranges,
                     const at::Tensor& loc_mask, int64_t grid_h, int64_t grid_w, double sigma,
                     double scale, c10::string_view loss_type, bool grad_logits,
                     bool grad_points) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("loctex::trace_attention_loss", "")
                       .typed<Outputs(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      int64_t, int64_t, double, double, c10::string_view, bool,
                                      bool)>();
  return op.call(q, k, points_xy, point_weights, token_ranges, loc_mask, grid_h, grid_w, sigma,
                 scale, loss_type, grad_logits, grad_points);
}

class TraceAttentionLoss : public torch::autograd::Function<TraceAttentionLoss> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& points_xy, const at::Tensor& point_weights,
                               const at::Tensor& token_ranges, const at::Tensor& loc_mask,
                               int64_t grid_h, int64_t grid_w, double sigma, double scale,
                               const std::string& loss_type, bool grad_logits, bool grad_points) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, d_logits, d_points, d_weights] =
        call_forward(q, k, points_xy, point_weights, token_ranges, loc_mask, grid_h, grid_w, sigma,
                     scale, loss_type, grad_logits, grad_points);
    ctx->save_for_backward({q, k, d_logits, d_points, d_weights});
    ctx->mark_non_differentiable({d_logits, d_points, d_weights});
    ctx->saved_data["grad_logits"] = grad_logits;
    ctx->saved_data["grad_points"] = grad_points;
    // the gradients come back in the inputs' dtypes (the op computes in float32 or float64)
    ctx->saved_data["dtype_points"] = static_cast<int64_t>(points_xy.scalar_type());
    ctx->saved_data["dtype_weights"] = static_cast<int64_t>(point_weights.scalar_type());
    return {loss, d_logits, d_points, d_weights};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad_loss = grads[0];
    variable_list out(13);
    if (!grad_loss.defined()) return out;  // no gradient reached the loss
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &d_logits = saved[2];
    const bool computed[4] = {ctx->saved_data["grad_logits"].toBool(),
                              ctx->saved_data["grad_logits"].toBool(),
                              ctx->saved_data["grad_points"].toBool(),
                              ctx->saved_data["grad_points"].toBool()};
    static const char* names[4] = {"q", "k", "points_xy", "point_weights"};
    for (int i = 0; i < 4; ++i) {
      TORCH_CHECK(!ctx->needs_input_grad(i) || computed[i],
                  "loctex::trace_attention_loss was called without the gradient of ", names[i],
                  " (its flag was false while gradients were disabled)");
    }
    if (ctx->needs_input_grad(0) || ctx->needs_input_grad(1)) {
      // d_logits is dL/d(q·kᵀ)ᵀ [B, H*W, L]: dq = dzᵀ·k, dk = dz·q
      const at::Tensor dz = d_logits * grad_loss.to(d_logits.scalar_type());
      if (ctx->needs_input_grad(0)) {
        out[0] = at::bmm(dz.transpose(1, 2), k.to(dz.scalar_type())).to(q.scalar_type());
      }
      if (ctx->needs_input_grad(1)) {
        out[1] = at::bmm(dz, q.to(dz.scalar_type())).to(k.scalar_type());
      }
    }
    if (ctx->needs_input_grad(2)) {
      const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["dtype_points"].toInt());
      out[2] = (saved[3] * grad_loss.to(saved[3].scalar_type())).to(dtype);
    }
    if (ctx->needs_input_grad(3)) {
      const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["dtype_weights"].toInt());
      out[3] = (saved[4] * grad_loss.to(saved[4].scalar_type())).to(dtype);
    }
    return out;
  }
};

// The Autograd kernel: asks the forward for exactly the gradients that autograd will need.
Outputs trace_attention_loss_autograd(const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& points_xy,
                                      const at::Tensor& point_weights,
                                      const at::Tensor& token_ranges, const at::Tensor& loc_mask,
                                      int64_t grid_h, int64_t grid_w, double sigma, double scale,
                                      c10::string_view loss_type, bool grad_logits,
                                      bool grad_points) {
  const bool grad_mode = at::GradMode::is_enabled();
  grad_logits = grad_logits || (grad_mode && (q.requires_grad() || k.requires_grad()));
  grad_points =
      grad_points || (grad_mode && (points_xy.requires_grad() || point_weights.requires_grad()));
  auto out = TraceAttentionLoss::apply(q, k, points_xy, point_weights, token_ranges, loc_mask,
                                       grid_h, grid_w, sigma, scale,
                                       std::string(loss_type.data(), loss_type.size()), grad_logits,
                                       grad_points);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(loctex, Autograd, m) {
  m.impl("trace_attention_loss", &trace_attention_loss_autograd);
}

}  // namespace loctex
