// Per-token trace rendering (DESIGN §3) shared by the render op and the fused loss, and the
// vectorizable exp/log those use.
//
// R(h, w) = Σ_i w_i exp(-‖p_i - c(h, w)‖² / 2σ²) with c(h, w) = ((w + 0.5) / W, (h + 0.5) / H).
// The Gaussian is separable on the grid: exp(-(dx² + dy²) a) = exp(-dx² a) · exp(-dy² a), so a
// point costs H + W exponentials, not H·W.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
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

// The grid and the separable Gaussian factors of every point of a batch, computed once (points in
// parallel) and shared by all the tokens whose range holds a point — padded time windows overlap,
// so a point is rendered by about two tokens. For point i:
//   EX[i, :] = exp(-(x_i - cx)² / 2σ²)  (Wp entries: W padded to a multiple of 8 with zeros),
//   EY[i, :] = exp(-(y_i - cy)² / 2σ²)  (Hp entries), and WEY[i, :] = w_i EY[i, :].
template <typename T>
class PointFactors {
 public:
  PointFactors(const T* pts, const T* wts, int64_t num_points, int64_t H, int64_t W, double sigma)
      : H(H), W(W), Hp(pad8(H)), Wp(pad8(W)), pts(pts), wts(wts),
        inv_s2(static_cast<T>(1.0 / (sigma * sigma))), cx(centers(W, Wp)), cy(centers(H, Hp)),
        cy0(cy), ex_(uninitialized(num_points * Wp)), ey_(uninitialized(num_points * Hp)),
        wey_(uninitialized(num_points * Hp)) {
    std::fill(cy0.begin() + H, cy0.end(), T(0));
    const T a = static_cast<T>(-1.0 / (2.0 * sigma * sigma));
    at::parallel_for(0, num_points, 2048, [&](int64_t begin, int64_t end) {
      const int64_t n = end - begin;
      T* ex = ex_.get() + begin * Wp;
      T* ey = ey_.get() + begin * Hp;
      exponents(a, pts + 2 * begin, n, Wp, cx.data(), ex);
      exponents(a, pts + 2 * begin + 1, n, Hp, cy.data(), ey);
#pragma omp simd
      for (int64_t j = 0; j < n * Wp; ++j) ex[j] = exp_nonpositive(ex[j]);
#pragma omp simd
      for (int64_t j = 0; j < n * Hp; ++j) ey[j] = exp_nonpositive(ey[j]);
      T* wey = wey_.get() + begin * Hp;
      for (int64_t i = 0; i < n; ++i) {
        const T w = wts[begin + i];
#pragma omp simd
        for (int64_t h = 0; h < Hp; ++h) wey[i * Hp + h] = w * ey[i * Hp + h];
      }
    });
  }

  const T* ex(int64_t i) const { return ex_.get() + i * Wp; }
  const T* ey(int64_t i) const { return ey_.get() + i * Hp; }
  const T* wey(int64_t i) const { return wey_.get() + i * Hp; }

  const int64_t H, W, Hp, Wp;
  const T* const pts;  // [P, 2]
  const T* const wts;  // [P]
  const T inv_s2;
  std::vector<T> cx, cy, cy0;  // cell centers: padded with max (cx, cy) or 0 (cy0)

 private:
  static int64_t pad8(int64_t n) { return (n + 7) / 8 * 8; }

  // Cell centers (i + 0.5) / n, padded to np entries with the largest finite value: (v - max)²
  // overflows to +inf for every v but NaN, so the padded factors are exp(-inf) = 0 exactly, points
  // at ±inf included (an infinite padding center would give inf - inf = NaN there).
  static std::vector<T> centers(int64_t n, int64_t np) {
    std::vector<T> c(np, std::numeric_limits<T>::max());
    for (int64_t i = 0; i < n; ++i) c[i] = (static_cast<T>(i) + T(0.5)) / static_cast<T>(n);
    return c;
  }

  // out[i, :] = a (v_i - c)² for the n coordinates v_i = v[2 i] (x or y of the points), rows of
  // np = 8 or 16 entries as single vectors (short run-time-length loops cost more than their
  // arithmetic), any other multiple of 8 by a loop.
  static void exponents(T a, const T* v, int64_t n, int64_t np, const T* c, T* out) {
    if (np == 8) return exponent_rows<8>(a, v, n, c, out);
    if (np == 16) return exponent_rows<16>(a, v, n, c, out);
    for (int64_t i = 0; i < n; ++i) {
      const T vi = v[2 * i];
#pragma omp simd
      for (int64_t j = 0; j < np; ++j) out[i * np + j] = a * (vi - c[j]) * (vi - c[j]);
    }
  }
  template <int NP>
  static void exponent_rows(T a, const T* v, int64_t n, const T* c, T* out) {
    using Row = typename VectorOf<T, NP>::type;
    Row cr;
    std::memcpy(&cr, c, sizeof(Row));
    for (int64_t i = 0; i < n; ++i) {
      const Row d = v[2 * i] - cr;
      const Row r = a * d * d;
      std::memcpy(out + i * NP, &r, sizeof(Row));
    }
  }

  // Every entry is written before it is read; zero-filling the ~2 MB (B=32, L=64) first was a
  // single-threaded memset, 9% of the loss forward's CPU samples in perf.
  static std::unique_ptr<T[]> uninitialized(int64_t n) { return std::unique_ptr<T[]>(new T[n]); }

  std::unique_ptr<T[]> ex_, ey_, wey_;
};

// Renders one token at a time from the batch's PointFactors (one instance per thread, for its
// scratch): R = Σ_i WEY[i, :] ⊗ EX[i, :] over the token's points.
template <typename T>
class TraceRenderer {
 public:
  explicit TraceRenderer(const PointFactors<T>& f)
      : f_(f), pad_(f.Hp * f.Wp), drt_(f.W * f.Hp), uv_(2 * f.Hp) {}

  // Writes R[H*W] for points [s, e) and returns ΣR.
  T render(int64_t s, int64_t e, T* R) {
    const int64_t H = f_.H, W = f_.W, Hp = f_.Hp, Wp = f_.Wp;
    T* pad = pad_.data();
    if (Wp == 8) {
      accumulate<8>(s, e, pad);
    } else if (Wp == 16) {
      accumulate<16>(s, e, pad);
    } else {  // wide grids: each row is long enough to keep the vector units busy
      std::fill(pad, pad + Hp * Wp, T(0));
      for (int64_t i = s; i < e; ++i) {
        const T* exi = f_.ex(i);
        const T* weyi = f_.wey(i);
        for (int64_t h = 0; h < H; ++h) {
          T* row = pad + h * Wp;
#pragma omp simd
          for (int64_t w = 0; w < Wp; ++w) row[w] += weyi[h] * exi[w];
        }
      }
    }
    // The padding of pad is zero (EX and EY vanish at the padded centers), so ΣR is its sum: one
    // vectorized reduction instead of a chain of scalar adds.
    T total = 0;
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < Hp * Wp; ++j) total += pad[j];
    for (int64_t h = 0; h < H; ++h) std::memcpy(R + h * W, pad + h * Wp, W * sizeof(T));
    return total;
  }

  // Given dL/dR[H*W] for the points [s, e), adds dL/dp_i and dL/dw_i into dpts / dwts
  // (atomically). With g_i = EY[i] ⊗ EX[i]: dR/dw_i = g_i and dR/dp_i = w_i g_i (c - p_i) / σ²,
  // so dL/dw_i = EY[i]·u_i, dL/dx_i = w_i/σ² EY[i]·v_i and
  // dL/dy_i = w_i/σ² ((cy - y_i) ∘ EY[i])·u_i, where u_i = dR·EX[i] and
  // v_i = dR·((cx - x_i) ∘ EX[i]) are columns over the grid rows (vectors of Hp lanes).
  void render_backward(int64_t s, int64_t e, const T* dR, T* dpts, T* dwts) {
    const int64_t H = f_.H, W = f_.W, Hp = f_.Hp;
    T* dRT = drt_.data();  // dRᵀ, rows padded to Hp lanes with zeros
    std::fill(dRT, dRT + W * Hp, T(0));
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t w = 0; w < W; ++w) dRT[w * Hp + h] = dR[h * W + w];
    }
    if (Hp == 8) {
      point_gradients<8>(s, e, dpts, dwts);
    } else if (Hp == 16) {
      point_gradients<16>(s, e, dpts, dwts);
    } else {
      T* u = uv_.data();
      T* v = u + Hp;
      for (int64_t i = s; i < e; ++i) {
        const T* exi = f_.ex(i);
        const T px = f_.pts[2 * i];
        std::fill(u, u + 2 * Hp, T(0));
        for (int64_t w = 0; w < W; ++w) {
          const T a = exi[w], b = exi[w] * (f_.cx[w] - px);
          const T* col = dRT + w * Hp;
#pragma omp simd
          for (int64_t h = 0; h < Hp; ++h) {
            u[h] += a * col[h];
            v[h] += b * col[h];
          }
        }
        add_point_gradient(i, u, v, dpts, dwts);
      }
    }
  }

 private:
  // pad = Σ_i WEY[i, :] ⊗ EX[i, :] for rows of a fixed width WP (8 or 16 columns: the usual
  // grids), eight rows at a time held in registers. (Accumulating into memory row by row instead
  // chains every point's update of a row through a store and a load: about 8x slower.)
  template <int WP>
  void accumulate(int64_t s, int64_t e, T* pad) const {
    using Row = typename VectorOf<T, WP>::type;
    constexpr int kRows = 8;  // Hp is a multiple of 8
    for (int64_t h0 = 0; h0 < f_.Hp; h0 += kRows) {
      Row acc[kRows];
      for (int j = 0; j < kRows; ++j) acc[j] = Row{};
      for (int64_t i = s; i < e; ++i) {
        Row x;
        std::memcpy(&x, f_.ex(i), sizeof(Row));
        const T* c = f_.wey(i) + h0;
        for (int j = 0; j < kRows; ++j) acc[j] += c[j] * x;
      }
      for (int j = 0; j < kRows; ++j) std::memcpy(pad + (h0 + j) * WP, &acc[j], sizeof(Row));
    }
  }

  // render_backward's columns u_i and v_i as single vectors of HP lanes (grids of up to 16 rows):
  // short loops of a length known only at run time cost more in overhead than in arithmetic.
  template <int HP>
  void point_gradients(int64_t s, int64_t e, T* dpts, T* dwts) {
    using Col = typename VectorOf<T, HP>::type;
    const T* dRT = drt_.data();
    T* uv = uv_.data();
    for (int64_t i = s; i < e; ++i) {
      const T* exi = f_.ex(i);
      const T px = f_.pts[2 * i];
      Col u{}, v{};
      for (int64_t w = 0; w < f_.W; ++w) {
        Col col;
        std::memcpy(&col, dRT + w * HP, sizeof(Col));
        u += exi[w] * col;
        v += (exi[w] * (f_.cx[w] - px)) * col;
      }
      std::memcpy(uv, &u, sizeof(Col));
      std::memcpy(uv + HP, &v, sizeof(Col));
      add_point_gradient(i, uv, uv + HP, dpts, dwts);
    }
  }

  // dL/dw_i = EY[i]·u, dL/dx_i = w_i/σ² EY[i]·v, dL/dy_i = w_i/σ² ((cy - y_i) ∘ EY[i])·u, added
  // atomically.
  void add_point_gradient(int64_t i, const T* u, const T* v, T* dpts, T* dwts) const {
    const T* eyi = f_.ey(i);
    const T* cy0 = f_.cy0.data();
    const T py = f_.pts[2 * i + 1];
    T gw = 0, gx = 0, gy = 0;
#pragma omp simd reduction(+ : gw, gx, gy)
    for (int64_t h = 0; h < f_.Hp; ++h) {
      gw += eyi[h] * u[h];
      gx += eyi[h] * v[h];
      gy += eyi[h] * (cy0[h] - py) * u[h];
    }
    const T scale = f_.wts[i] * f_.inv_s2;
    atomic_add(dwts + i, gw);
    atomic_add(dpts + 2 * i, scale * gx);
    atomic_add(dpts + 2 * i + 1, scale * gy);
  }

  const PointFactors<T>& f_;
  std::vector<T> pad_, drt_, uv_;  // scratch: rendered rows, dRᵀ, the columns u and v
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
