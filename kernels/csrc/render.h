// Per-token trace rendering (DESIGN §3) shared by the render op and the fused loss, and the
// vectorizable exp/log those use.
//
// R(h, w) = Σ_i w_i exp(-‖p_i - c(h, w)‖² / 2σ²) with c(h, w) = ((w + 0.5) / W, (h + 0.5) / H).
// The Gaussian is separable on the grid: exp(-(dx² + dy²) a) = exp(-dx² a) · exp(-dy² a), so a
// point costs H + W exponentials, not H·W.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace loctex {

// ΣR must exceed this for a token to count as a target; reference.RENDER_EPS.
constexpr double kRenderEps = 1e-6;

// exp(x) for x <= 0, written so that `omp simd` loops vectorize it (glibc's expf does not
// vectorize without -ffast-math). Cephes expf: about 1 ulp; returns 0 below -87.33, where float32
// results would be denormal. NaN propagates. double uses std::exp.
inline float exp_nonpositive(float x) {
  x = std::min(x, 0.0f);
  const bool underflow = x < -87.33654475f;
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const float z = r * r;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * z + r + 1.0f;
  const float n_ok = n >= -126.0f ? n : 0.0f;  // NaN and underflow take the other branch below
  const int32_t bits = (static_cast<int32_t>(n_ok) + 127) << 23;  // 2^n
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return underflow ? 0.0f : y * two_n;
}
inline double exp_nonpositive(double x) { return std::exp(x); }

// log(x) for normal x > 0, vectorizable (Cephes logf, about 1 ulp). double uses std::log.
// (GCC vectorizes it only while it stays free of branches.)
inline float log_positive(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const int32_t e = ((bits >> 23) & 0xff) - 126;         // x = m · 2^e, m in [0.5, 1)
  const int32_t mbits = (bits & 0x007fffff) | 0x3f000000;
  float m;
  std::memcpy(&m, &mbits, sizeof(m));
  const float low = m < 0.707106781186547524f ? 1.0f : 0.0f;  // arithmetic, no branch: vectorizes
  const float ef = static_cast<float>(e) - low;
  const float f = m * (1.0f + low) - 1.0f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  y += -2.12194440e-4f * ef;
  y += -0.5f * z;
  return f + y + 0.693359375f * ef;
}
inline double log_positive(double x) { return std::log(x); }

// GCC vector extension types: VectorOf<T, n>::type holds n lanes of T.
template <typename T, int n>
struct VectorOf;
template <int n>
struct VectorOf<float, n> {
  typedef float type __attribute__((vector_size(n * sizeof(float))));
};
template <int n>
struct VectorOf<double, n> {
  typedef double type __attribute__((vector_size(n * sizeof(double))));
};

// Relaxed atomic add on float/double via compare-and-swap: point ranges of different tokens may
// overlap (padded time windows), so gradients of a point can come from several threads.
template <typename T>
inline void atomic_add(T* addr, T value) {
  T expected, desired;
  __atomic_load(addr, &expected, __ATOMIC_RELAXED);
  do {
    desired = expected + value;
  } while (!__atomic_compare_exchange(addr, &expected, &desired, /*weak=*/true, __ATOMIC_RELAXED,
                                      __ATOMIC_RELAXED));
}

// Renders one token at a time (one instance per thread). For the token's points it computes the
// factors EX[i, :] = exp(-(x_i - cx)² / 2σ²) (rows zero-padded to Wp, a multiple of 8, so that row
// updates vectorize) and EY[i, :] likewise along y, then R = Σ_i w_i EY[i, :] ⊗ EX[i, :].
template <typename T>
class TraceRenderer {
 public:
  TraceRenderer(int64_t H, int64_t W, double sigma)
      : H_(H), W_(W), Hp_(pad8(H)), Wp_(pad8(W)), a_(static_cast<T>(-1.0 / (2.0 * sigma * sigma))),
        inv_s2_(static_cast<T>(1.0 / (sigma * sigma))), cx_(centers(W, Wp_)), cy_(centers(H, Hp_)),
        cy0_(cy_), pad_(Hp_ * Wp_), drt_(W * Hp_), uv_(2 * Hp_) {
    std::fill(cy0_.begin() + H, cy0_.end(), T(0));
  }

  // Writes R[H*W] for points [s, e) and returns ΣR.
  T render(const T* pts, const T* wts, int64_t s, int64_t e, T* R) {
    const int64_t n = e - s;
    factors(pts, s, e);
    // WEY[i, :] = w_i EY[i, :]: the row weights of the rank-n update below
    T* wey = wey_.data();
    const T* ey = ey_.data();
    for (int64_t i = 0; i < n; ++i) {
      const T w = wts[s + i];
#pragma omp simd
      for (int64_t h = 0; h < Hp_; ++h) wey[i * Hp_ + h] = w * ey[i * Hp_ + h];
    }
    T* pad = pad_.data();
    if (Wp_ == 8) {
      accumulate<8>(n, pad);
    } else if (Wp_ == 16) {
      accumulate<16>(n, pad);
    } else {  // wide grids: each row is long enough to keep the vector units busy
      std::fill(pad, pad + Hp_ * Wp_, T(0));
      for (int64_t i = 0; i < n; ++i) {
        const T* exi = ex_.data() + i * Wp_;
        for (int64_t h = 0; h < H_; ++h) {
          T* row = pad + h * Wp_;
          const T c = wey[i * Hp_ + h];
#pragma omp simd
          for (int64_t w = 0; w < Wp_; ++w) row[w] += c * exi[w];
        }
      }
    }
    // The padding of pad is zero (EX and EY vanish at the padded centers), so ΣR is its sum: one
    // vectorized reduction instead of a chain of scalar adds.
    T total = 0;
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < Hp_ * Wp_; ++j) total += pad[j];
    for (int64_t h = 0; h < H_; ++h) std::memcpy(R + h * W_, pad + h * Wp_, W_ * sizeof(T));
    return total;
  }

  // Given dL/dR[H*W] for the points [s, e) of the last render(), adds dL/dp_i and dL/dw_i into
  // dpts / dwts (atomically). With g_i = EY[i] ⊗ EX[i]: dR/dw_i = g_i and
  // dR/dp_i = w_i g_i (c - p_i) / σ², so dL/dw_i = EY[i]·u_i, dL/dx_i = w_i/σ² EY[i]·v_i and
  // dL/dy_i = w_i/σ² ((cy - y_i) ∘ EY[i])·u_i, where u_i = dR·EX[i] and v_i = dR·((cx - x_i) ∘ EX[i])
  // are columns over the grid rows (vectors of Hp lanes).
  void render_backward(const T* pts, const T* wts, int64_t s, int64_t e, const T* dR, T* dpts,
                       T* dwts) {
    T* dRT = drt_.data();  // dRᵀ, rows padded to Hp lanes with zeros
    std::fill(dRT, dRT + W_ * Hp_, T(0));
    for (int64_t h = 0; h < H_; ++h) {
      for (int64_t w = 0; w < W_; ++w) dRT[w * Hp_ + h] = dR[h * W_ + w];
    }
    if (Hp_ == 8) {
      point_gradients<8>(pts, wts, s, e, dpts, dwts);
    } else if (Hp_ == 16) {
      point_gradients<16>(pts, wts, s, e, dpts, dwts);
    } else {
      T* u = uv_.data();
      T* v = u + Hp_;
      for (int64_t i = s; i < e; ++i) {
        const T* exi = ex_.data() + (i - s) * Wp_;
        const T px = pts[2 * i];
        std::fill(u, u + 2 * Hp_, T(0));
        for (int64_t w = 0; w < W_; ++w) {
          const T a = exi[w], b = exi[w] * (cx_[w] - px);
          const T* col = dRT + w * Hp_;
#pragma omp simd
          for (int64_t h = 0; h < Hp_; ++h) {
            u[h] += a * col[h];
            v[h] += b * col[h];
          }
        }
        add_point_gradient(pts, wts, i, ey_.data() + (i - s) * Hp_, u, v, dpts, dwts);
      }
    }
  }

 private:
  static int64_t pad8(int64_t n) { return (n + 7) / 8 * 8; }

  // pad = Σ_i WEY[i, :] ⊗ EX[i, :] for rows of a fixed width WP (8 or 16 columns: the usual
  // grids), eight rows at a time held in registers. (Accumulating into memory row by row instead
  // chains every point's update of a row through a store and a load: about 8x slower.)
  template <int WP>
  void accumulate(int64_t n, T* pad) const {
    using Row = typename VectorOf<T, WP>::type;
    constexpr int kRows = 8;  // Hp_ is a multiple of 8
    for (int64_t h0 = 0; h0 < Hp_; h0 += kRows) {
      Row acc[kRows];
      for (int j = 0; j < kRows; ++j) acc[j] = Row{};
      for (int64_t i = 0; i < n; ++i) {
        Row x;
        std::memcpy(&x, ex_.data() + i * WP, sizeof(Row));
        const T* c = wey_.data() + i * Hp_ + h0;
        for (int j = 0; j < kRows; ++j) acc[j] += c[j] * x;
      }
      for (int j = 0; j < kRows; ++j) std::memcpy(pad + (h0 + j) * WP, &acc[j], sizeof(Row));
    }
  }

  // render_backward's columns u_i and v_i as single vectors of HP lanes (grids of up to 16 rows):
  // short loops of a length known only at run time cost more in overhead than in arithmetic.
  template <int HP>
  void point_gradients(const T* pts, const T* wts, int64_t s, int64_t e, T* dpts, T* dwts) {
    using Col = typename VectorOf<T, HP>::type;
    const T* dRT = drt_.data();
    T* uv = uv_.data();
    for (int64_t i = s; i < e; ++i) {
      const T* exi = ex_.data() + (i - s) * Wp_;
      const T px = pts[2 * i];
      Col u{}, v{};
      for (int64_t w = 0; w < W_; ++w) {
        Col col;
        std::memcpy(&col, dRT + w * HP, sizeof(Col));
        u += exi[w] * col;
        v += (exi[w] * (cx_[w] - px)) * col;
      }
      std::memcpy(uv, &u, sizeof(Col));
      std::memcpy(uv + HP, &v, sizeof(Col));
      add_point_gradient(pts, wts, i, ey_.data() + (i - s) * HP, uv, uv + HP, dpts, dwts);
    }
  }

  // dL/dw_i = EY[i]·u, dL/dx_i = w_i/σ² EY[i]·v, dL/dy_i = w_i/σ² ((cy - y_i) ∘ EY[i])·u, added
  // atomically.
  void add_point_gradient(const T* pts, const T* wts, int64_t i, const T* eyi, const T* u,
                          const T* v, T* dpts, T* dwts) const {
    const T py = pts[2 * i + 1];
    T gw = 0, gx = 0, gy = 0;
#pragma omp simd reduction(+ : gw, gx, gy)
    for (int64_t h = 0; h < Hp_; ++h) {
      gw += eyi[h] * u[h];
      gx += eyi[h] * v[h];
      gy += eyi[h] * (cy0_[h] - py) * u[h];
    }
    atomic_add(dwts + i, gw);
    atomic_add(dpts + 2 * i, wts[i] * inv_s2_ * gx);
    atomic_add(dpts + 2 * i + 1, wts[i] * inv_s2_ * gy);
  }

  // Cell centers (i + 0.5) / n, padded to np entries with the largest finite value: (v - max)²
  // overflows to +inf for every v but NaN, so the padded factors are exp(-inf) = 0 exactly, points
  // at ±inf included (an infinite padding center would give inf - inf = NaN there).
  static std::vector<T> centers(int64_t n, int64_t np) {
    std::vector<T> c(np, std::numeric_limits<T>::max());
    for (int64_t i = 0; i < n; ++i) c[i] = (static_cast<T>(i) + T(0.5)) / static_cast<T>(n);
    return c;
  }

  // EX[i, :] = exp(a (x_i - cx)²) and EY[i, :] = exp(a (y_i - cy)²) for the points [s, e).
  void factors(const T* pts, int64_t s, int64_t e) {
    const int64_t n = e - s;
    if (static_cast<int64_t>(ex_.size()) < n * Wp_) {
      ex_.resize(n * Wp_);
      ey_.resize(n * Hp_);
      wey_.resize(n * Hp_);
    }
    T* ex = ex_.data();
    T* ey = ey_.data();
    const T* cx = cx_.data();
    const T* cy = cy_.data();
    exponents(pts + 2 * s, n, Wp_, cx, ex);
    exponents(pts + 2 * s + 1, n, Hp_, cy, ey);
#pragma omp simd
    for (int64_t j = 0; j < n * Wp_; ++j) ex[j] = exp_nonpositive(ex[j]);
#pragma omp simd
    for (int64_t j = 0; j < n * Hp_; ++j) ey[j] = exp_nonpositive(ey[j]);
  }

  // out[i, :] = a (v_i - c)² for the n coordinates v_i = v[2 i] (x or y of the points), rows of
  // np = 8 or 16 entries as single vectors (short run-time-length loops cost more than their
  // arithmetic), any other multiple of 8 by a loop.
  void exponents(const T* v, int64_t n, int64_t np, const T* c, T* out) const {
    if (np == 8) return exponent_rows<8>(v, n, c, out);
    if (np == 16) return exponent_rows<16>(v, n, c, out);
    for (int64_t i = 0; i < n; ++i) {
      const T vi = v[2 * i];
#pragma omp simd
      for (int64_t j = 0; j < np; ++j) out[i * np + j] = a_ * (vi - c[j]) * (vi - c[j]);
    }
  }
  template <int NP>
  void exponent_rows(const T* v, int64_t n, const T* c, T* out) const {
    using Row = typename VectorOf<T, NP>::type;
    Row cr;
    std::memcpy(&cr, c, sizeof(Row));
    for (int64_t i = 0; i < n; ++i) {
      const Row d = v[2 * i] - cr;
      const Row r = a_ * d * d;
      std::memcpy(out + i * NP, &r, sizeof(Row));
    }
  }

  int64_t H_, W_, Hp_, Wp_;
  T a_, inv_s2_;
  std::vector<T> cx_, cy_, cy0_;  // cell centers: padded with max (cx_, cy_) or 0 (cy0_)
  std::vector<T> pad_, drt_, uv_;  // scratch: rendered rows, dRᵀ, the columns u and v
  std::vector<T> ex_, ey_, wey_;  // per point: EX, EY and w·EY
};

// [start, end) of token `tok`; an inverted range is empty.
inline void token_range(const int64_t* ranges, int64_t tok, int64_t* s, int64_t* e) {
  *s = ranges[2 * tok];
  *e = std::max(ranges[2 * tok + 1], *s);
}

// Checks that every non-empty range lies inside [0, P) and returns the ranges as contiguous int64.
inline at::Tensor checked_ranges(const at::Tensor& token_ranges, int64_t num_points) {
  TORCH_CHECK(token_ranges.dim() == 3 && token_ranges.size(2) == 2,
              "token_ranges must be [B, L, 2], got ", token_ranges.sizes());
  TORCH_CHECK(!at::isFloatingType(token_ranges.scalar_type()), "token_ranges must be integer");
  at::Tensor r = token_ranges.to(at::kLong).contiguous();
  const int64_t* p = r.data_ptr<int64_t>();
  for (int64_t t = 0; t < r.numel() / 2; ++t) {
    const int64_t s = p[2 * t], e = p[2 * t + 1];
    TORCH_CHECK(e <= s || (s >= 0 && e <= num_points), "token_ranges[", t, "] = [", s, ", ", e,
                ") is outside the ", num_points, " points");
  }
  return r;
}

// float32 unless an input is float64 (bfloat16/half inputs are computed in float32).
inline at::ScalarType acc_type(std::initializer_list<at::Tensor> tensors) {
  for (const auto& t : tensors)
    if (t.scalar_type() == at::kDouble) return at::kDouble;
  return at::kFloat;
}

}  // namespace loctex
