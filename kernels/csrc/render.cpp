// loctex::render_traces and its backward on CPU: one token at a time, tokens in parallel.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "render.h"

namespace loctex {
namespace {

void check_points(const at::Tensor& points_xy, const at::Tensor& point_weights, int64_t grid_h,
                  int64_t grid_w, double sigma) {
  TORCH_CHECK(points_xy.dim() == 2 && points_xy.size(1) == 2, "points_xy must be [P, 2], got ",
              points_xy.sizes());
  TORCH_CHECK(point_weights.dim() == 1 && point_weights.size(0) == points_xy.size(0),
              "point_weights must be [P] with P = ", points_xy.size(0), ", got ",
              point_weights.sizes());
  TORCH_CHECK(at::isFloatingType(points_xy.scalar_type()) &&
                  at::isFloatingType(point_weights.scalar_type()),
              "points_xy and point_weights must be floating point");
  TORCH_CHECK(grid_h >= 1 && grid_w >= 1, "grid must be at least 1x1, got ", grid_h, "x", grid_w);
  TORCH_CHECK(sigma > 0, "sigma must be positive, got ", sigma);
}

std::tuple<at::Tensor, at::Tensor> render_traces_cpu(const at::Tensor& points_xy,
                                                     const at::Tensor& point_weights,
                                                     const at::Tensor& token_ranges,
                                                     int64_t grid_h, int64_t grid_w,
                                                     double sigma) {
  check_points(points_xy, point_weights, grid_h, grid_w, sigma);
  const at::Tensor ranges = checked_ranges(token_ranges, points_xy.size(0));
  const int64_t B = token_ranges.size(0), L = token_ranges.size(1), N = grid_h * grid_w;
  const auto acc = acc_type({points_xy, point_weights});
  const at::Tensor pts = points_xy.to(acc).contiguous(), wts = point_weights.to(acc).contiguous();
  at::Tensor heat = at::empty({B, L, grid_h, grid_w}, pts.options());
  at::Tensor valid = at::empty({B, L}, pts.options().dtype(at::kBool));
  const int64_t* rng = ranges.data_ptr<int64_t>();
  bool* valid_p = valid.data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES(acc, "render_traces_cpu", [&] {
    const scalar_t* p = pts.data_ptr<scalar_t>();
    const scalar_t* w = wts.data_ptr<scalar_t>();
    scalar_t* out = heat.data_ptr<scalar_t>();
    const PointFactors<scalar_t> factors(p, w, pts.size(0), grid_h, grid_w, sigma);
    at::parallel_for(0, B * L, 16, [&](int64_t begin, int64_t end) {
      TraceRenderer<scalar_t> renderer(factors);
      for (int64_t tok = begin; tok < end; ++tok) {
        int64_t s, e;
        token_range(rng, tok, &s, &e);
        scalar_t* R = out + tok * N;
        const scalar_t total = renderer.render(s, e, R);
        const bool ok = total > static_cast<scalar_t>(kRenderEps);  // false for NaN too
        valid_p[tok] = ok;
        const scalar_t inv = ok ? scalar_t(1) / total : scalar_t(0);
        for (int64_t n = 0; n < N; ++n) R[n] = ok ? R[n] * inv : scalar_t(0);
      }
    });
  });
  return {heat, valid};
}

std::tuple<at::Tensor, at::Tensor> render_traces_backward_cpu(
    const at::Tensor& grad_heat, const at::Tensor& points_xy, const at::Tensor& point_weights,
    const at::Tensor& token_ranges, int64_t grid_h, int64_t grid_w, double sigma) {
  check_points(points_xy, point_weights, grid_h, grid_w, sigma);
  const at::Tensor ranges = checked_ranges(token_ranges, points_xy.size(0));
  const int64_t B = token_ranges.size(0), L = token_ranges.size(1), N = grid_h * grid_w;
  TORCH_CHECK(grad_heat.numel() == B * L * N, "grad_heat must be [B, L, H, W]");
  const auto acc = acc_type({points_xy, point_weights});
  const at::Tensor pts = points_xy.to(acc).contiguous(), wts = point_weights.to(acc).contiguous();
  const at::Tensor g = grad_heat.to(acc).contiguous();
  at::Tensor dpts = at::zeros_like(pts), dwts = at::zeros_like(wts);
  const int64_t* rng = ranges.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(acc, "render_traces_backward_cpu", [&] {
    const scalar_t* p = pts.data_ptr<scalar_t>();
    const scalar_t* w = wts.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* dp = dpts.data_ptr<scalar_t>();
    scalar_t* dw = dwts.data_ptr<scalar_t>();
    const PointFactors<scalar_t> factors(p, w, pts.size(0), grid_h, grid_w, sigma);
    at::parallel_for(0, B * L, 16, [&](int64_t begin, int64_t end) {
      TraceRenderer<scalar_t> renderer(factors);
      std::vector<scalar_t> R(N), dR(N);
      for (int64_t tok = begin; tok < end; ++tok) {
        int64_t s, e;
        token_range(rng, tok, &s, &e);
        const scalar_t total = renderer.render(s, e, R.data());
        if (!(total > static_cast<scalar_t>(kRenderEps))) continue;  // output is a constant 0
        // P = R / ΣR  =>  dL/dR_n = (g_n - Σ_m g_m P_m) / ΣR
        const scalar_t* gt = gp + tok * N;
        scalar_t gP = 0;
        for (int64_t n = 0; n < N; ++n) gP += gt[n] * R[n];
        gP /= total;
        for (int64_t n = 0; n < N; ++n) dR[n] = (gt[n] - gP) / total;
        renderer.render_backward(s, e, dR.data(), dp, dw);
      }
    });
  });
  return {dpts.to(points_xy.scalar_type()), dwts.to(point_weights.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(loctex, CPU, m) {
  m.impl("render_traces", &render_traces_cpu);
  m.impl("render_traces_backward", &render_traces_backward_cpu);
}

}  // namespace loctex
