// loctex::trace_attention_loss on CPU (DESIGN §3), with the gradient of its logits computed in the
// same pass.
//
// The loss is a scalar, so dL/d(q·kᵀ) for a unit upstream gradient is computed in the forward when
// asked for, as fused linear cross-entropy kernels do: nothing is rendered or exponentiated twice.
// The logits come from one batched GEMM, transposed: Zᵀ = k·qᵀ [B, H*W, L] (MKL runs this
// orientation ~15% faster than q·kᵀ), so that for each grid cell the logits of consecutive tokens
// are contiguous. One fused pass then takes blocks of kLanes tokens of an image (blocks in
// parallel): it renders each token's target into a column, and computes the softmax over the grid,
// the loss and dL/dz for the kLanes tokens at once, one vector across tokens per grid cell — no
// horizontal reductions and no loop remainders over the grid. dL/d(q·kᵀ)ᵀ is written over Zᵀ; the
// backward (trace_attention_autograd.cpp) scales it by the upstream gradient and contracts it with
// k and q — two more GEMMs. dL/dpoints and dL/dweights are computed here as well.
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

constexpr int kLanes = 16;  // tokens per block: one 512-bit vector of float32

// Per-thread scratch of the fused pass: a block's values laid out [grid cell][token lane].
template <typename T>
struct BlockScratch {
  explicit BlockScratch(int64_t N, bool grad_points)
      : z(N * kLanes), R(N * kLanes), e(N * kLanes), r(N), G(grad_points ? N : 0) {}
  std::vector<T> z, R, e;  // scaled logits (then dL/dz), targets R, exp(z − max z)
  std::vector<T> r, G;     // one token's rendered target, and its dℓ/dR for the point gradients
};

// ℓ and (when grad_z) scale·dℓ/dz, written over z, for one block: z, R, e as in BlockScratch, S the
// lanes' ΣR (1 in dead lanes, whose R is 0), lse their log-sum-exp. Returns ℓ per lane in loss.
template <typename T>
void block_loss(LossType lt, int64_t N, T* __restrict z, const T* __restrict R,
                const T* __restrict e, const T* S, const T* lse, const T* inv_se, T scale,
                bool grad_z, T* loss) {
  // P = R / S by division, not R·(1/S): a single cell's P must be exactly 1 (= A), as in the
  // reference, for its gradient to be exactly 0.
  T t_term[kLanes];  // t_term = Σ_n (dℓ/dA_n)·A_n, for l1 and mse
  for (int j = 0; j < kLanes; ++j) {
    loss[j] = 0;
    t_term[j] = 0;
  }
  for (int64_t n = 0; n < N; ++n) {
    const T* zn = z + n * kLanes;
    const T* Rn = R + n * kLanes;
    const T* en = e + n * kLanes;
    switch (lt) {
      case LossType::kKL:  // Σ P (log P − log A), 0·log 0 = 0 (P + tiny: no branch)
#pragma omp simd
        for (int j = 0; j < kLanes; ++j) {
          const T P = Rn[j] / S[j];
          loss[j] += P * (log_positive(P + std::numeric_limits<T>::min()) - (zn[j] - lse[j]));
        }
        break;
      case LossType::kCE:  // −Σ P log A
#pragma omp simd
        for (int j = 0; j < kLanes; ++j) loss[j] -= Rn[j] / S[j] * (zn[j] - lse[j]);
        break;
      case LossType::kL1:  // Σ |A − P|
#pragma omp simd
        for (int j = 0; j < kLanes; ++j) {
          const T A = en[j] * inv_se[j], d = A - Rn[j] / S[j];
          loss[j] += std::abs(d);
          t_term[j] += sign(d) * A;
        }
        break;
      case LossType::kMSE:  // Σ (A − P)²
#pragma omp simd
        for (int j = 0; j < kLanes; ++j) {
          const T A = en[j] * inv_se[j], d = A - Rn[j] / S[j];
          loss[j] += d * d;
          t_term[j] += 2 * d * A;
        }
        break;
    }
  }
  if (!grad_z) return;
  // kl, ce: dℓ/dz = A − P;  l1, mse: dℓ/dz_n = A_n (dℓ/dA_n − Σ_m (dℓ/dA_m) A_m).
  for (int64_t n = 0; n < N; ++n) {
    T* zn = z + n * kLanes;
    const T* Rn = R + n * kLanes;
    const T* en = e + n * kLanes;
    switch (lt) {
      case LossType::kKL:
      case LossType::kCE:
#pragma omp simd
        for (int j = 0; j < kLanes; ++j) zn[j] = scale * (en[j] * inv_se[j] - Rn[j] / S[j]);
        break;
      case LossType::kL1:
#pragma omp simd
        for (int j = 0; j < kLanes; ++j) {
          const T A = en[j] * inv_se[j];
          zn[j] = scale * A * (sign(A - Rn[j] / S[j]) - t_term[j]);
        }
        break;
      case LossType::kMSE:
#pragma omp simd
        for (int j = 0; j < kLanes; ++j) {
          const T A = en[j] * inv_se[j];
          zn[j] = scale * A * (2 * (A - Rn[j] / S[j]) - t_term[j]);
        }
        break;
    }
  }
}

// dℓ/dR of lane j of a block (for the point gradients): with G = dℓ/dP and P = R/S,
// dℓ/dR_n = (G_n − Σ_m G_m P_m) / S. Written to G[N].
template <typename T>
void target_gradient(LossType lt, int64_t N, int j, const T* z, const T* R, const T* e, T S,
                     T lse, T inv_se, T* G) {
  const T inv_S = T(1) / S;
  T GP = 0;
  for (int64_t n = 0; n < N; ++n) {
    const T P = R[n * kLanes + j] / S, log_A = z[n * kLanes + j] - lse;
    const T A = e[n * kLanes + j] * inv_se;
    switch (lt) {
      case LossType::kKL: G[n] = (P > 0 ? std::log(P) + 1 : T(0)) - log_A; break;
      case LossType::kCE: G[n] = -log_A; break;
      case LossType::kL1: G[n] = -sign(A - P); break;
      case LossType::kMSE: G[n] = -2 * (A - P); break;
    }
    GP += G[n] * P;
  }
  for (int64_t n = 0; n < N; ++n) G[n] = (G[n] - GP) * inv_S;
}

// z[n, j] = scale·zt[n·L + j] in live lanes, 0 in dead ones (whose logits, even NaN, must not
// reach a result), for the `lanes` tokens of a block. Its own function with restrict pointers and
// values, so that full blocks vectorize (a partial block's row may end at the tensor's end).
template <typename T>
void gather_logits(int64_t N, int64_t L, int lanes, const T* live, T scale,
                   const T* __restrict zt, T* __restrict z) {
  for (int64_t n = 0; n < N; ++n) {
    if (lanes == kLanes) {
#pragma omp simd
      for (int j = 0; j < kLanes; ++j) {
        z[n * kLanes + j] = live[j] != 0 ? scale * zt[n * L + j] : T(0);
      }
    } else {
      for (int j = 0; j < kLanes; ++j) {
        z[n * kLanes + j] = j < lanes && live[j] != 0 ? scale * zt[n * L + j] : T(0);
      }
    }
  }
}

// zt[n·L + j] = dL/dz of lane j (0 in dead lanes) for the `lanes` tokens of a block.
template <typename T>
void scatter_gradient(int64_t N, int64_t L, int lanes, const T* live, const T* __restrict z,
                      T* __restrict zt) {
  for (int64_t n = 0; n < N; ++n) {
    if (lanes == kLanes) {
#pragma omp simd
      for (int j = 0; j < kLanes; ++j) zt[n * L + j] = live[j] != 0 ? z[n * kLanes + j] : T(0);
    } else {
      for (int j = 0; j < lanes; ++j) zt[n * L + j] = live[j] != 0 ? z[n * kLanes + j] : T(0);
    }
  }
}

// The fused pass: fills the per-token losses and valid flags, overwrites Zt (k·qᵀ, [B, N, L]) with
// dL/d(k·qᵀ) when grad_z (zeros for tokens that are not targets), adds dL/dpoints, dL/dweights
// when those are defined — all for the sum over tokens; the caller divides by the number of valid
// targets.
template <typename T>
void fused_blocks(LossType lt, int64_t B, int64_t L, const PointFactors<T>& factors, double scale,
                  const int64_t* ranges, const bool* mask, T* zt_all, T* loss_p, char* valid,
                  bool grad_z, T* dpts, T* dwts) {
  const int64_t N = factors.H * factors.W, blocks_per_image = (L + kLanes - 1) / kLanes;
  const T sc = static_cast<T>(scale);
  const bool grad_points = dpts != nullptr;
  at::parallel_for(0, B * blocks_per_image, 1, [&](int64_t begin, int64_t end) {
    TraceRenderer<T> renderer(factors);
    BlockScratch<T> buf(N, grad_points);
    T* z = buf.z.data();
    T* R = buf.R.data();
    T* e = buf.e.data();
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t b = blk / blocks_per_image, l0 = (blk % blocks_per_image) * kLanes;
      const int lanes = static_cast<int>(std::min<int64_t>(kLanes, L - l0));
      T* zt = zt_all + b * N * L + l0;  // zt[n * L + j]: cell n, token l0 + j
      // Targets, one column per token; dead lanes (not a target, or past L) get R = 0, S = 1.
      T S[kLanes], live[kLanes];  // live: 1 for a target, 0 for a dead lane
      bool any = false;
      for (int j = 0; j < kLanes; ++j) {
        const int64_t tok = b * L + l0 + j;
        S[j] = 0;
        if (j < lanes && mask[tok]) {
          int64_t first, last;
          token_range(ranges, tok, &first, &last);
          S[j] = renderer.render(first, last, buf.r.data());
        }
        const bool ok = S[j] > static_cast<T>(kRenderEps);  // false for NaN too
        live[j] = ok ? T(1) : T(0);
        if (j < lanes) valid[tok] = ok;
        any = any || ok;
        for (int64_t n = 0; n < N; ++n) R[n * kLanes + j] = ok ? buf.r[n] : T(0);
        if (!ok) S[j] = 1;
      }
      if (!any) {  // every lane dead: their gradients are 0
        if (grad_z) scatter_gradient(N, L, lanes, live, z, zt);
        continue;
      }
      gather_logits(N, L, lanes, live, sc, zt, z);
      T mx[kLanes], se[kLanes], lse[kLanes], inv_se[kLanes], loss[kLanes];
      std::fill(mx, mx + kLanes, -std::numeric_limits<T>::infinity());
      std::fill(se, se + kLanes, T(0));
      for (int64_t n = 0; n < N; ++n) {
#pragma omp simd
        for (int j = 0; j < kLanes; ++j) mx[j] = std::max(mx[j], z[n * kLanes + j]);
      }
      for (int64_t n = 0; n < N; ++n) {
#pragma omp simd
        for (int j = 0; j < kLanes; ++j) {
          e[n * kLanes + j] = exp_nonpositive(z[n * kLanes + j] - mx[j]);
          se[j] += e[n * kLanes + j];
        }
      }
      for (int j = 0; j < kLanes; ++j) {
        lse[j] = mx[j] + std::log(se[j]);
        inv_se[j] = T(1) / se[j];
      }
      if (grad_points) {  // before block_loss overwrites z with dL/dz
        for (int j = 0; j < lanes; ++j) {
          if (live[j] == 0) continue;
          int64_t first, last;
          token_range(ranges, b * L + l0 + j, &first, &last);
          target_gradient(lt, N, j, z, R, e, S[j], lse[j], inv_se[j], buf.G.data());
          renderer.render_backward(first, last, buf.G.data(), dpts, dwts);
        }
      }
      block_loss(lt, N, z, R, e, S, lse, inv_se, sc, grad_z, loss);
      for (int j = 0; j < lanes; ++j) loss_p[b * L + l0 + j] = live[j] != 0 ? loss[j] : T(0);
      if (grad_z) scatter_gradient(N, L, lanes, live, z, zt);
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
  // (q·kᵀ)ᵀ = k·qᵀ [B, N, L], then dL/d(q·kᵀ)ᵀ
  at::Tensor Z = at::bmm(kf, qf.transpose(1, 2)).contiguous();
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
    const PointFactors<scalar_t> factors(pts.data_ptr<scalar_t>(), wts.data_ptr<scalar_t>(),
                                         pts.size(0), grid_h, grid_w, sigma);
    fused_blocks<scalar_t>(lt, B, L, factors, scale, rng, mask_p, Z.data_ptr<scalar_t>(), loss_p,
                           valid.data(), grad_logits,
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
    Z.mul_(inv_n);  // dL/d(q·kᵀ)ᵀ of the mean
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
