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
        pad_(H * Wp_) {}

  // Writes R[H*W] for points [s, e) and returns ΣR.
  T render(const T* pts, const T* wts, int64_t s, int64_t e, T* R) {
    factors(pts, s, e);
    T* pad = pad_.data();
    std::fill(pad, pad + H_ * Wp_, T(0));
    if (Wp_ == 8) {
      accumulate<8>(wts + s, e - s, pad);
    } else if (Wp_ == 16) {
      accumulate<16>(wts + s, e - s, pad);
    } else {
      for (int64_t i = 0; i < e - s; ++i) {
        const T* exi = ex_.data() + i * Wp_;
        const T* eyi = ey_.data() + i * Hp_;
        for (int64_t h = 0; h < H_; ++h) {
          T* row = pad + h * Wp_;
          const T c = wts[s + i] * eyi[h];
#pragma omp simd
          for (int64_t w = 0; w < Wp_; ++w) row[w] += c * exi[w];
        }
      }
    }
    T total = 0;
    for (int64_t h = 0; h < H_; ++h) {
      for (int64_t w = 0; w < W_; ++w) {
        R[h * W_ + w] = pad[h * Wp_ + w];
        total += pad[h * Wp_ + w];
      }
    }
    return total;
  }

  // Given dL/dR[H*W] for the points [s, e) of the last render(), adds dL/dp_i and dL/dw_i into
  // dpts / dwts (atomically). dR/dw_i = g_i, dR/dp_i = w_i g_i (c - p_i) / σ², g_i = EY[i] ⊗ EX[i].
  void render_backward(const T* pts, const T* wts, int64_t s, int64_t e, const T* dR, T* dpts,
                       T* dwts) const {
    for (int64_t i = s; i < e; ++i) {
      const T* exi = ex_.data() + (i - s) * Wp_;
      const T* eyi = ey_.data() + (i - s) * Hp_;
      const T px = pts[2 * i], py = pts[2 * i + 1];
      T gw = 0, gx = 0, gy = 0;  // Σ dR·g_i and its x and y moments
      for (int64_t h = 0; h < H_; ++h) {
        const T* row = dR + h * W_;
        T r = 0, rx = 0;
        for (int64_t w = 0; w < W_; ++w) {
          const T v = row[w] * exi[w];
          r += v;
          rx += v * (cx_[w] - px);
        }
        gw += eyi[h] * r;
        gx += eyi[h] * rx;
        gy += eyi[h] * (cy_[h] - py) * r;
      }
      atomic_add(dwts + i, gw);
      atomic_add(dpts + 2 * i, wts[i] * inv_s2_ * gx);
      atomic_add(dpts + 2 * i + 1, wts[i] * inv_s2_ * gy);
    }
  }

 private:
  static int64_t pad8(int64_t n) { return (n + 7) / 8 * 8; }

  // pad[h, :] += w_i EY[i, h] EX[i, :] with rows of a fixed width WP (up to 16 columns, i.e. the
  // usual grids) held as one vector each: no per-row loop overhead.
  template <int WP>
  void accumulate(const T* w, int64_t n, T* pad) const {
    using Row = typename VectorOf<T, WP>::type;
    for (int64_t i = 0; i < n; ++i) {
      Row x;
      std::memcpy(&x, ex_.data() + i * WP, sizeof(Row));
      const T* eyi = ey_.data() + i * Hp_;
      for (int64_t h = 0; h < H_; ++h) {
        Row r;
        std::memcpy(&r, pad + h * WP, sizeof(Row));
        r += (w[i] * eyi[h]) * x;
        std::memcpy(pad + h * WP, &r, sizeof(Row));
      }
    }
  }

  // Cell centers (i + 0.5) / n, padded to np entries with +inf, whose factor is exp(-inf) = 0.
  static std::vector<T> centers(int64_t n, int64_t np) {
    std::vector<T> c(np, std::numeric_limits<T>::infinity());
    for (int64_t i = 0; i < n; ++i) c[i] = (static_cast<T>(i) + T(0.5)) / static_cast<T>(n);
    return c;
  }

  // EX[i, :] = exp(a (x_i - cx)²) and EY[i, :] = exp(a (y_i - cy)²) for the points [s, e).
  void factors(const T* pts, int64_t s, int64_t e) {
    const int64_t n = e - s;
    if (static_cast<int64_t>(ex_.size()) < n * Wp_) {
      ex_.resize(n * Wp_);
      ey_.resize(n * Hp_);
    }
    T* ex = ex_.data();
    T* ey = ey_.data();
    const T* cx = cx_.data();
    const T* cy = cy_.data();
    for (int64_t i = 0; i < n; ++i) {
      const T px = pts[2 * (s + i)], py = pts[2 * (s + i) + 1];
#pragma omp simd
      for (int64_t w = 0; w < Wp_; ++w) ex[i * Wp_ + w] = a_ * (px - cx[w]) * (px - cx[w]);
#pragma omp simd
      for (int64_t h = 0; h < Hp_; ++h) ey[i * Hp_ + h] = a_ * (py - cy[h]) * (py - cy[h]);
    }
#pragma omp simd
    for (int64_t j = 0; j < n * Wp_; ++j) ex[j] = exp_nonpositive(ex[j]);
#pragma omp simd
    for (int64_t j = 0; j < n * Hp_; ++j) ey[j] = exp_nonpositive(ey[j]);
  }

  int64_t H_, W_, Hp_, Wp_;
  T a_, inv_s2_;
  std::vector<T> cx_, cy_, pad_, ex_, ey_;
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
