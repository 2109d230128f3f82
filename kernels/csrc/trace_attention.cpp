// loctex::trace_attention_loss on CPU (DESIGN §3), with the gradient of its logits computed in the
// same pass.
//
// The loss is a scalar, so dL/d(q·kᵀ) for a unit upstream gradient is computed in the forward when
// asked for, as fused linear cross-entropy kernels do: nothing is rendered or exponentiated twice.
// One fused pass over the tokens (in parallel) renders each target, takes the log-sum-exp of
// z = scale·q·kᵀ over the grid, the loss and dL/dz, written over the logits. The contraction q·kᵀ
// runs as one batched GEMM (at::bmm); the backward (kernels/cpp.py) scales dL/d(q·kᵀ) by the
// upstream gradient and contracts it with k and q — two more GEMMs — so the large gradients are
// written once, already scaled. dL/dpoints and dL/dweights are computed here as well.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <string_view>

#include "render.h"

namespace loctex {
namespace {

enum class LossType { kKL, kCE, kL1, kMSE };

LossType parse_loss_type(c10::string_view name) {
  const std::string_view s(name.data(), name.size());
  if (s == "kl") return LossType::kKL;
  if (s == "ce") return LossType::kCE;
  if (s == "l1") return LossType::kL1;
  if (s == "mse") return LossType::kMSE;
  TORCH_CHECK(false, "loss_type must be one of kl, ce, l1, mse; got ", s);
}

template <typename T>
inline T sign(T x) {
  return static_cast<T>((x > 0) - (x < 0));
}

// One token's ℓ(P, A), A = softmax(z), given the target R (ΣR = S), the scaled logits z, e =
// exp(z − max z), se = Σ e and lse = log Σ exp z. Writes scale·dℓ/dz (= dℓ/d(q·kᵀ)) over z when
// `grad_z`, and dℓ/dR over G when G is given.
template <typename T>
T token_loss(LossType lt, int64_t N, const T* R, T S, T* z, const T* e, T se, T lse, T scale,
             bool grad_z, T* G) {
  const T inv_S = T(1) / S, inv_se = T(1) / se;
  T loss = 0, t_term = 0;  // t_term = Σ_n (dℓ/dA_n)·A_n, for l1 and mse
  switch (lt) {
    case LossType::kKL:  // Σ P (log P − log A), 0·log 0 = 0
#pragma omp simd reduction(+ : loss)
      for (int64_t n = 0; n < N; ++n) {
        // P = 0 gives 0·log(tiny) = 0 without a branch (a branch stops the vectorization)
        const T P = R[n] / S;
        loss += P * (log_positive(P + std::numeric_limits<T>::min()) - (z[n] - lse));
      }
      break;
    case LossType::kCE:  // −Σ P log A
#pragma omp simd reduction(+ : loss)
      for (int64_t n = 0; n < N; ++n) loss -= R[n] / S * (z[n] - lse);
      break;
    case LossType::kL1:  // Σ |A − P|
#pragma omp simd reduction(+ : loss, t_term)
      for (int64_t n = 0; n < N; ++n) {
        const T A = e[n] * inv_se, d = A - R[n] / S;
        loss += std::abs(d);
        t_term += sign(d) * A;
      }
      break;
    case LossType::kMSE:  // Σ (A − P)²
#pragma omp simd reduction(+ : loss, t_term)
      for (int64_t n = 0; n < N; ++n) {
        const T A = e[n] * inv_se, d = A - R[n] / S;
        loss += d * d;
        t_term += 2 * d * A;
      }
      break;
  }
  if (G != nullptr) {
    // G = dℓ/dP; with P = R/S, dℓ/dR_n = (G_n − Σ_m G_m P_m) / S (written over G).
    T GP = 0;
    switch (lt) {
      case LossType::kKL:
#pragma omp simd reduction(+ : GP)
        for (int64_t n = 0; n < N; ++n) {
          const T P = R[n] * inv_S;
          // (log P + 1)·[P > 0], as arithmetic: a branch stops the vectorization
          const T log_P1 = log_positive(P + std::numeric_limits<T>::min()) + 1;
          G[n] = (P > 0 ? T(1) : T(0)) * log_P1 - (z[n] - lse);
          GP += G[n] * P;
        }
        break;
      case LossType::kCE:
#pragma omp simd reduction(+ : GP)
        for (int64_t n = 0; n < N; ++n) {
          G[n] = lse - z[n];
          GP += G[n] * R[n] * inv_S;
        }
        break;
      case LossType::kL1:
#pragma omp simd reduction(+ : GP)
        for (int64_t n = 0; n < N; ++n) {
          const T P = R[n] * inv_S;
          G[n] = -sign(e[n] * inv_se - P);
          GP += G[n] * P;
        }
        break;
      case LossType::kMSE:
#pragma omp simd reduction(+ : GP)
        for (int64_t n = 0; n < N; ++n) {
          const T P = R[n] * inv_S;
          G[n] = -2 * (e[n] * inv_se - P);
          GP += G[n] * P;
        }
        break;
    }
#pragma omp simd
    for (int64_t n = 0; n < N; ++n) G[n] = (G[n] - GP) * inv_S;
  }
  if (grad_z) {
    // kl, ce: dℓ/dz = A − P;  l1, mse: dℓ/dz_n = A_n (dℓ/dA_n − Σ_m (dℓ/dA_m) A_m).
    switch (lt) {
      case LossType::kKL:
      case LossType::kCE:
#pragma omp simd
        for (int64_t n = 0; n < N; ++n) z[n] = scale * (e[n] * inv_se - R[n] / S);
        break;
      case LossType::kL1:
#pragma omp simd
        for (int64_t n = 0; n < N; ++n) {
          const T A = e[n] * inv_se;
          z[n] = scale * A * (sign(A - R[n] / S) - t_term);
        }
        break;
      case LossType::kMSE:
#pragma omp simd
        for (int64_t n = 0; n < N; ++n) {
          const T A = e[n] * inv_se;
          z[n] = scale * A * (2 * (A - R[n] / S) - t_term);
        }
        break;
    }
  }
  return loss;
}

// Scales one token's logits in place (z = scale·q·kᵀ), writes e = exp(z − max z) and returns
// (max z, Σ e). Its own function with restrict pointers and the scale by value: inside the token
// loop's lambda the scale was captured by reference, reloaded after every store to z, and the loop
// was not vectorized.
template <typename T>
inline std::pair<T, T> scaled_softmax_stats(int64_t N, T scale, T* __restrict z, T* __restrict e) {
  T mx = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t n = 0; n < N; ++n) {
    z[n] *= scale;
    mx = std::max(mx, z[n]);
  }
  T se = 0;
#pragma omp simd reduction(+ : se)
  for (int64_t n = 0; n < N; ++n) {
    e[n] = exp_nonpositive(z[n] - mx);
    se += e[n];
  }
  return {mx, se};
}

// The fused pass over the tokens: fills the per-token losses and valid flags, overwrites Z
// (q·kᵀ) with dL/d(q·kᵀ) when grad_z (zeros for tokens that are not targets), adds dL/dpoints,
// dL/dweights when those are defined — all for the sum over tokens; the caller divides by the
// number of valid targets.
template <typename T>
void fused_tokens(LossType lt, int64_t BL, int64_t grid_h, int64_t grid_w, double sigma,
                  double scale, const at::Tensor& pts, const at::Tensor& wts,
                  const int64_t* ranges, const bool* mask, at::Tensor& Z, T* loss_p, char* valid,
                  bool grad_z, T* dpts, T* dwts) {
  const int64_t N = grid_h * grid_w;
  const T sc = static_cast<T>(scale);
  const bool grad_points = dpts != nullptr;
  const T* p = pts.data_ptr<T>();
  const T* w = wts.data_ptr<T>();
  T* z_all = Z.data_ptr<T>();
  at::parallel_for(0, BL, 8, [&](int64_t begin, int64_t end) {
    TraceRenderer<T> renderer(grid_h, grid_w, sigma);
    std::vector<T> R(N), ez(N), G(grad_points ? N : 0);
    for (int64_t tok = begin; tok < end; ++tok) {
      T* z = z_all + tok * N;
      int64_t first, last;
      token_range(ranges, tok, &first, &last);
      const T S = mask[tok] ? renderer.render(p, w, first, last, R.data()) : T(0);
      if (!(S > static_cast<T>(kRenderEps))) {  // not a target (NaN included)
        if (grad_z) std::fill(z, z + N, T(0));
        continue;
      }
      valid[tok] = 1;
      const auto [mx, se] = scaled_softmax_stats(N, sc, z, ez.data());
      loss_p[tok] = token_loss(lt, N, R.data(), S, z, ez.data(), se, mx + std::log(se), sc, grad_z,
                               grad_points ? G.data() : nullptr);
      if (grad_points) renderer.render_backward(p, w, first, last, G.data(), dpts, dwts);
    }
  });
}

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Outputs trace_attention_loss_cpu(const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& points_xy, const at::Tensor& point_weights,
                                 const at::Tensor& token_ranges, const at::Tensor& loc_mask,
                                 int64_t grid_h, int64_t grid_w, double sigma, double scale,
                                 c10::string_view loss_type, bool grad_logits, bool grad_points) {
  const LossType lt = parse_loss_type(loss_type);
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3, "q must be [B, L, D] and k [B, H*W, D]; got ",
              q.sizes(), " and ", k.sizes());
  const int64_t B = q.size(0), L = q.size(1), D = q.size(2), N = grid_h * grid_w;
  TORCH_CHECK(grid_h >= 1 && grid_w >= 1, "grid must be at least 1x1");
  TORCH_CHECK(k.size(0) == B && k.size(1) == N && k.size(2) == D, "k must be [B, H*W, D] = [",
              B, ", ", N, ", ", D, "], got ", k.sizes());
  TORCH_CHECK(token_ranges.dim() == 3 && token_ranges.size(0) == B && token_ranges.size(1) == L,
              "token_ranges must be [B, L, 2] = [", B, ", ", L, ", 2], got ", token_ranges.sizes());
  TORCH_CHECK(loc_mask.dim() == 2 && loc_mask.size(0) == B && loc_mask.size(1) == L,
              "loc_mask must be [B, L]");
  TORCH_CHECK(points_xy.dim() == 2 && points_xy.size(1) == 2 && point_weights.dim() == 1 &&
                  point_weights.size(0) == points_xy.size(0),
              "points_xy must be [P, 2] and point_weights [P]");
  TORCH_CHECK(sigma > 0, "sigma must be positive, got ", sigma);
  for (const auto& t : {q, k, points_xy, point_weights})
    TORCH_CHECK(at::isFloatingType(t.scalar_type()), "q, k, points_xy, point_weights must be "
                "floating point");

  const at::Tensor ranges = checked_ranges(token_ranges, points_xy.size(0));
  const auto acc = acc_type({q, k, points_xy, point_weights});
  const at::Tensor qf = q.to(acc), kf = k.to(acc);
  const at::Tensor pts = points_xy.to(acc).contiguous(), wts = point_weights.to(acc).contiguous();
  const at::Tensor mask = loc_mask.to(at::kBool).contiguous();
  at::Tensor Z = at::bmm(qf, kf.transpose(1, 2)).contiguous();  // q·kᵀ, then dL/d(q·kᵀ)
  at::Tensor per_token = at::zeros({B * L}, qf.options());
  at::Tensor dpts = grad_points ? at::zeros_like(pts) : at::empty({0}, pts.options());
  at::Tensor dwts = grad_points ? at::zeros_like(wts) : at::empty({0}, wts.options());
  std::vector<char> valid(B * L, 0);
  const int64_t* rng = ranges.data_ptr<int64_t>();
  const bool* mask_p = mask.data_ptr<bool>();

  at::Tensor loss;
  double inv_n = 1.0;
  AT_DISPATCH_FLOATING_TYPES(acc, "trace_attention_loss_cpu", [&] {
    scalar_t* loss_p = per_token.data_ptr<scalar_t>();
    fused_tokens<scalar_t>(lt, B * L, grid_h, grid_w, sigma, scale, pts, wts, rng, mask_p, Z,
                           loss_p, valid.data(), grad_logits,
                           grad_points ? dpts.data_ptr<scalar_t>() : nullptr,
                           grad_points ? dwts.data_ptr<scalar_t>() : nullptr);
    // Mean over valid targets, summed in order (deterministic).
    int64_t n_valid = 0;
    double sum = 0;
    for (int64_t tok = 0; tok < B * L; ++tok) {
      if (valid[tok]) {
        ++n_valid;
        sum += static_cast<double>(loss_p[tok]);
      }
    }
    inv_n = 1.0 / static_cast<double>(std::max<int64_t>(n_valid, 1));
    loss = at::scalar_tensor(sum * inv_n, qf.options());
  });
  if (grad_logits) {
    Z.mul_(inv_n);  // dL/d(q·kᵀ) of the mean
  } else {
    Z = at::empty({0}, qf.options());
  }
  if (grad_points) {
    dpts.mul_(inv_n);
    dwts.mul_(inv_n);
  }
  return {loss, Z, dpts, dwts};
}

}  // namespace

TORCH_LIBRARY_IMPL(loctex, CPU, m) { m.impl("trace_attention_loss", &trace_attention_loss_cpu); }

}  // namespace loctex
