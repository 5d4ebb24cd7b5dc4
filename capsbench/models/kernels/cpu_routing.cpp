// Dynamic routing for CPUs, fused with the DigitCaps predictions: u_hat is never stored
// (see cpu_routing.py for the Python side).
//
// u is stored (NI, B, K8) and W (NI, K8, J*D), both contiguous; u_hat[b, i, j, :] =
// sum_k u[i, b, k] W[i, k, j*D : (j+1)*D]; the gradient gu is written (NI, B, K8) as well.
// Every pass below walks the input capsules i (split statically over the threads, so a given
// thread count always adds in the same order) and, for each, the batch: W_i (K8 x J*D values, 5 kB for the paper's
// CapsNet) stays in the L1 cache while the rows u_hat[b, i] (J*D values) are recomputed into a
// per-thread buffer and used at once. Everything that routing keeps per (input, output) pair
// -- logits, couplings, their gradients -- is stored input-major, (NI, J, B), so each pass
// reads and writes contiguous blocks. Sums over i go to per-thread partial sums, added up
// after each pass.
//
// Forward (paper Procedure 1, as routing.route_passes):
//   s_0 = (1/J) sum_i u_hat_i;  v_t = squash(s_t)
//   t >= 1: logits += u_hat . v_{t-1};  c_t = softmax_j(logits);  s_t = sum_i c_t u_hat_i
//   one pass per iteration: agreement, softmax and weighted sum share each u_hat row.
// Backward (as routing.route_backward_terms): for t = r-1 .. 1 one pass computes
//   g_c = u_hat . g_s_t, g_b_t = g_b_{t+1} + c_t * (g_c - sum_j g_c c_t) and
//   g_v_{t-1} = sum_i g_b_t u_hat_i;
// then d loss / d u_hat = sum_t alpha_t (x) beta_t with the 2r - 1 terms
//   (c_t, g_s_t), (g_b_t, v_{t-1}) for t >= 1 and (1/J, g_s_0),
// which one last pass turns into d u and d W without storing it.
//
// The templates take K8 and D as compile-time constants for the paper's 8 and 16 (the loops
// over d then vectorise fully) and as run-time values (0) otherwise.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

constexpr int kMaxDim = 64;  // largest K8 or D of the run-time variant (checked by the caller)
constexpr double kSquashEps = 1e-7;  // routing.SQUASH_EPS

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

inline int team_size() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

// exp for the float32 softmax, of x >= kExpFloor (the caller clamps): Cody-Waite range
// reduction and the Cephes polynomial (relative error below 1e-7); plain arithmetic with no
// branch, so the compiler vectorises the loop that calls it.
inline float exp_of(float x) {
  const float t = x * 1.44269504088896341f + 12582912.0f;  // + 1.5 * 2^23 rounds to an integer n
  const float n = t - 12582912.0f;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t ti;
  std::memcpy(&ti, &t, sizeof ti);
  const int32_t bits = (ti - 0x4B400000 + 127) << 23;  // 2^n: n sits in t's low mantissa bits
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline double exp_of(double x) { return std::exp(x); }

template <typename T>
constexpr T kExpFloor = T(-87);  // exp(-87) ~ 1.6e-38: softmax terms below it count as that
template <>
constexpr double kExpFloor<double> = -700.0;

// v = squash(s) over rows of D values (routing.squash, same formula)
template <typename T>
void squash_rows(const T* s, T* v, int64_t rows, int D) {
#pragma omp for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const T* x = s + r * D;
    T sq = 0;
    for (int d = 0; d < D; ++d) sq += x[d] * x[d];
    const T f = sq / ((T(1) + sq) * std::sqrt(sq + T(kSquashEps)));
    for (int d = 0; d < D; ++d) v[r * D + d] = x[d] * f;
  }
}

// g_s = d loss / d s of v = squash(s), given g_v = d loss / d v, over rows of D values
template <typename T>
void squash_rows_backward(const T* s, const T* gv, T* gs, int64_t rows, int D) {
#pragma omp for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const T* x = s + r * D;
    const T* g = gv + r * D;
    T sq = 0, sg = 0;
    for (int d = 0; d < D; ++d) {
      sq += x[d] * x[d];
      sg += x[d] * g[d];
    }
    const T q = T(1) + sq;
    const T rt = std::sqrt(sq + T(kSquashEps));
    const T f = sq / (q * rt);
    // f(sq) = sq / ((1 + sq) sqrt(sq + eps)), v = f s: g_s = f g_v + 2 f'(sq) (s . g_v) s
    const T df = T(1) / (q * rt) - sq / (q * q * rt) - sq / (T(2) * q * rt * rt * rt);
    const T c = T(2) * df * sg;
    for (int d = 0; d < D; ++d) gs[r * D + d] = f * g[d] + c * x[d];
  }
}

// part[t] holds thread t's partial sums (n values each); out = scale * their sum; every
// part is zeroed again for the next pass. Called by the whole team.
template <typename T>
void reduce_parts(std::vector<T>& part, int64_t n, int parts, T* out, T scale) {
#pragma omp for schedule(static)
  for (int64_t e = 0; e < n; ++e) {
    T s = 0;
    for (int t = 0; t < parts; ++t) {
      s += part[t * n + e];
      part[t * n + e] = 0;
    }
    out[e] = s * scale;
  }
}

// row[j*D + d] = u_hat[b, i, j, d] for one (b, i). JB outputs j at a time, so that JB * D / V
// independent sums hide the latency of the multiply-adds.
template <typename T, int K8C, int DC>
inline void uhat_row(const T* ub, const T* Wi, T* row, int64_t J, int K8, int D) {
  constexpr int JB = 5;
  const int64_t JD = J * D;
  int64_t j0 = 0;
  if (DC) {
    for (; j0 + JB <= J; j0 += JB) {
      T acc[JB][DC ? DC : 1] = {};
      for (int k = 0; k < K8; ++k) {
        const T uk = ub[k];
        const T* w = Wi + k * JD + j0 * D;
        for (int jj = 0; jj < JB; ++jj)
#pragma omp simd
          for (int d = 0; d < DC; ++d) acc[jj][d] += uk * w[jj * DC + d];
      }
      for (int jj = 0; jj < JB; ++jj)
        for (int d = 0; d < DC; ++d) row[(j0 + jj) * DC + d] = acc[jj][d];
    }
  }
  for (int64_t e = j0 * D; e < JD; ++e) row[e] = 0;
  for (int k = 0; k < K8; ++k) {
    const T uk = ub[k];
    const T* w = Wi + k * JD;
#pragma omp simd
    for (int64_t e = j0 * D; e < JD; ++e) row[e] += uk * w[e];
  }
}

template <typename T, int K8C, int DC>
void forward(const T* u, const T* W, int64_t B, int64_t NI, int64_t J, int iterations, int k8rt, int drt,
             T* s_all, T* v_all, T* c_all, int threads) {
  const int K8 = K8C ? K8C : k8rt;
  const int D = DC ? DC : drt;
  const int64_t JD = J * D;
  const int64_t n = B * JD;  // values of one s_t
  const int64_t BJ = B * J;
  std::vector<T> part(static_cast<size_t>(threads) * n, T(0));
  // written before it is read: left uninitialised (a std::vector would zero 4.6 MB per call)
  std::unique_ptr<T[]> logits(new T[iterations > 2 ? NI * BJ : 1]);
#pragma omp parallel num_threads(threads)
  {
    const int parts = team_size();
    T* P = part.data() + thread_id() * n;
    std::vector<T> rows(static_cast<size_t>(n));  // u_hat[:, i] of one input capsule
    std::vector<T> lg(static_cast<size_t>(BJ));
    std::vector<T> stat(static_cast<size_t>(B));
    for (int t = 0; t < iterations; ++t) {
      const T* v_prev = t > 0 ? v_all + (t - 1) * n : nullptr;
      T* c_t = t > 0 ? c_all + (t - 1) * NI * BJ : nullptr;
#pragma omp for schedule(static)
      for (int64_t i = 0; i < NI; ++i) {
        const T* Wi = W + i * K8 * JD;
        if (t == 0) {  // uniform couplings: s_0 = (1/J) sum_i u_hat_i
          for (int64_t b = 0; b < B; ++b) {
            T* row = rows.data();
            uhat_row<T, K8C, DC>(u + (i * B + b) * K8, Wi, row, J, K8, D);
            T* Pb = P + b * JD;
#pragma omp simd
            for (int64_t e = 0; e < JD; ++e) Pb[e] += row[e];
          }
          continue;
        }
        T* li = iterations > 2 ? logits.get() + i * BJ : lg.data();  // (J, B)
        for (int64_t b = 0; b < B; ++b) {
          T* row = rows.data() + b * JD;
          uhat_row<T, K8C, DC>(u + (i * B + b) * K8, Wi, row, J, K8, D);
          const T* vb = v_prev + b * JD;
          for (int64_t j = 0; j < J; ++j) {
            T a = 0;
#pragma omp simd reduction(+ : a)
            for (int d = 0; d < D; ++d) a += row[j * D + d] * vb[j * D + d];
            li[j * B + b] = (t == 1 ? T(0) : li[j * B + b]) + a;
          }
        }
        // c_t[i] = softmax over j of the logits, every loop running over b
        T* ci = c_t + i * BJ;
        T* m = stat.data();
        for (int64_t b = 0; b < B; ++b) m[b] = li[b];
        for (int64_t j = 1; j < J; ++j)
#pragma omp simd
          for (int64_t b = 0; b < B; ++b) m[b] = li[j * B + b] > m[b] ? li[j * B + b] : m[b];
        for (int64_t j = 0; j < J; ++j)
#pragma omp simd
          for (int64_t b = 0; b < B; ++b) {
            const T x = li[j * B + b] - m[b];
            ci[j * B + b] = x < kExpFloor<T> ? kExpFloor<T> : x;
          }
#pragma omp simd
        for (int64_t e = 0; e < BJ; ++e) ci[e] = exp_of(ci[e]);
        T* z = m;  // the maxima are no longer needed
#pragma omp simd
        for (int64_t b = 0; b < B; ++b) z[b] = ci[b];
        for (int64_t j = 1; j < J; ++j)
#pragma omp simd
          for (int64_t b = 0; b < B; ++b) z[b] += ci[j * B + b];
#pragma omp simd
        for (int64_t b = 0; b < B; ++b) z[b] = T(1) / z[b];
        for (int64_t j = 0; j < J; ++j)
#pragma omp simd
          for (int64_t b = 0; b < B; ++b) ci[j * B + b] *= z[b];
        for (int64_t b = 0; b < B; ++b) {
          const T* row = rows.data() + b * JD;
          T* Pb = P + b * JD;
          for (int64_t j = 0; j < J; ++j) {
            const T c = ci[j * B + b];
#pragma omp simd
            for (int d = 0; d < D; ++d) Pb[j * D + d] += c * row[j * D + d];
          }
        }
      }
      reduce_parts(part, n, parts, s_all + t * n, t == 0 ? T(1) / static_cast<T>(J) : T(1));
      squash_rows(s_all + t * n, v_all + t * n, BJ, D);
    }
  }
}

// H_i[b, j, :] = sum_t alpha_t[i, j, b] beta_t[b, j, :] for one input capsule i, summed over
// the terms in registers (h is written once); alpha[t] == nullptr stands for the uniform
// couplings 1 / J.
template <typename T, int DC>
inline void h_rows(const T* const* alpha, const T* const* beta, int terms, int64_t i, int64_t B, int64_t J, int D,
                   T inv_j, T* h) {
  const int64_t BJ = B * J;
  for (int64_t j = 0; j < J; ++j)
    for (int64_t b = 0; b < B; ++b) {
      const int64_t e = (b * J + j) * D;  // h and beta_t are (B, J, D), alpha_t[i] (J, B)
      T acc[DC ? DC : kMaxDim];
      for (int d = 0; d < D; ++d) acc[d] = 0;
      for (int t = 0; t < terms; ++t) {
        const T a = alpha[t] ? alpha[t][i * BJ + j * B + b] : inv_j;
        const T* bt = beta[t] + e;
#pragma omp simd
        for (int d = 0; d < D; ++d) acc[d] += a * bt[d];
      }
      for (int d = 0; d < D; ++d) h[e + d] = acc[d];
    }
}

template <typename T, int K8C, int DC>
void backward(const T* u, const T* W, const T* grad_v, const T* s_all, const T* v_all, const T* c_all, int64_t B,
              int64_t NI, int64_t J, int iterations, int k8rt, int drt, T* gu, T* gW, int threads) {
  const int K8 = K8C ? K8C : k8rt;
  const int D = DC ? DC : drt;
  const int64_t JD = J * D;
  const int64_t n = B * JD;
  const int64_t BJ = B * J;
  const int r = iterations;
  const T inv_j = T(1) / static_cast<T>(J);
  constexpr int V = 32 / sizeof(T);  // values per 256-bit register
  std::vector<T> part(static_cast<size_t>(threads) * n, T(0));
  std::vector<T> gs(static_cast<size_t>(r * n));                                  // g_s_t
  std::vector<T> gv(static_cast<size_t>(n));                                      // g_v of the current t
  std::unique_ptr<T[]> gb(new T[r > 1 ? (r - 1) * NI * BJ : 1]);                 // g_b_t, t = 1 .. r-1
  std::vector<const T*> alpha, beta;  // the 2r - 1 terms of d loss / d u_hat
  for (int t = r - 1; t >= 1; --t) {
    alpha.push_back(c_all + (t - 1) * NI * BJ);
    beta.push_back(gs.data() + t * n);
    alpha.push_back(gb.get() + (t - 1) * NI * BJ);
    beta.push_back(v_all + (t - 1) * n);
  }
  alpha.push_back(nullptr);
  beta.push_back(gs.data());
  const int terms = static_cast<int>(alpha.size());
#pragma omp parallel num_threads(threads)
  {
    const int parts = team_size();
    T* P = part.data() + thread_id() * n;
    std::vector<T> rows(static_cast<size_t>(n));  // u_hat[:, i] of one input capsule
    std::vector<T> gc(static_cast<size_t>(BJ));   // g_c = d loss / d c_t[i], (J, B)
    std::vector<T> stat(static_cast<size_t>(B));
    for (int t = r - 1; t >= 0; --t) {
      squash_rows_backward(s_all + t * n, t == r - 1 ? grad_v : gv.data(), gs.data() + t * n, BJ, D);
      if (t == 0) break;
      const T* gst = gs.data() + t * n;
      const T* ct = c_all + (t - 1) * NI * BJ;
      const T* gb_next = t < r - 1 ? gb.get() + t * NI * BJ : nullptr;
      T* gbt = gb.get() + (t - 1) * NI * BJ;
#pragma omp for schedule(static)
      for (int64_t i = 0; i < NI; ++i) {
        const T* Wi = W + i * K8 * JD;
        const int64_t o = i * BJ;  // c_t, g_b_t of input capsule i: (J, B)
        for (int64_t b = 0; b < B; ++b) {
          T* row = rows.data() + b * JD;
          uhat_row<T, K8C, DC>(u + (i * B + b) * K8, Wi, row, J, K8, D);
          for (int64_t j = 0; j < J; ++j) {
            T a = 0;
#pragma omp simd reduction(+ : a)
            for (int d = 0; d < D; ++d) a += row[j * D + d] * gst[b * JD + j * D + d];
            gc[j * B + b] = a;
          }
        }
        // g_b_t = g_b_{t+1} + c_t * (g_c - sum_j g_c c_t), every loop running over b
        T* dot = stat.data();
#pragma omp simd
        for (int64_t b = 0; b < B; ++b) dot[b] = 0;
        for (int64_t j = 0; j < J; ++j)
#pragma omp simd
          for (int64_t b = 0; b < B; ++b) dot[b] += gc[j * B + b] * ct[o + j * B + b];
        for (int64_t j = 0; j < J; ++j)
#pragma omp simd
          for (int64_t b = 0; b < B; ++b) {
            const int64_t e = o + j * B + b;
            gbt[e] = (gb_next ? gb_next[e] : T(0)) + ct[e] * (gc[j * B + b] - dot[b]);
          }
        for (int64_t b = 0; b < B; ++b) {
          const T* row = rows.data() + b * JD;
          T* Pb = P + b * JD;
          for (int64_t j = 0; j < J; ++j) {
            const T g = gbt[o + j * B + b];
#pragma omp simd
            for (int d = 0; d < D; ++d) Pb[j * D + d] += g * row[j * D + d];
          }
        }
      }
      reduce_parts(part, n, parts, gv.data(), T(1));
    }
    // d u and d W from d loss / d u_hat = sum_t alpha_t (x) beta_t, one input capsule at a time
    std::vector<T> h(static_cast<size_t>(n));
#pragma omp for schedule(static)
    for (int64_t i = 0; i < NI; ++i) {
      const T* Wi = W + i * K8 * JD;
      h_rows<T, DC>(alpha.data(), beta.data(), terms, i, B, J, D, inv_j, h.data());
      // gu[b, i, k] = W_i[k, :] . H_i[b, :] over the J*D values: K8 vectors of V partial sums
      for (int64_t b = 0; b < B; ++b) {
        const T* hb = h.data() + b * JD;
        T* gub = gu + (i * B + b) * K8;
        if (K8C && JD % V == 0) {
          T g[K8C ? K8C : 1][V] = {};
          for (int64_t e = 0; e < JD; e += V)
            for (int k = 0; k < K8; ++k) {
              const T* w = Wi + k * JD + e;
#pragma omp simd
              for (int v = 0; v < V; ++v) g[k][v] += w[v] * hb[e + v];
            }
          for (int k = 0; k < K8; ++k) {
            T s = 0;
            for (int v = 0; v < V; ++v) s += g[k][v];
            gub[k] = s;
          }
        } else {
          for (int k = 0; k < K8; ++k) {
            T s = 0;
            for (int64_t e = 0; e < JD; ++e) s += Wi[k * JD + e] * hb[e];
            gub[k] = s;
          }
        }
      }
      // gW[i, k, :] = sum_b u[b, i, k] H_i[b, :], KB values of k and D of the row at a time
      T* gWi = gW + i * K8 * JD;
      constexpr int KB = 4;
      for (int64_t j = 0; j < J; ++j)
        for (int k0 = 0; k0 < K8; k0 += KB) {
          const int kn = K8 - k0 < KB ? K8 - k0 : KB;
          T acc[KB][DC ? DC : kMaxDim];
          for (int k = 0; k < KB; ++k)
            for (int d = 0; d < D; ++d) acc[k][d] = 0;
          for (int64_t b = 0; b < B; ++b) {
            const T* hb = h.data() + b * JD + j * D;
            const T* ub = u + (i * B + b) * K8 + k0;
            if (kn == KB) {
              for (int k = 0; k < KB; ++k) {
                const T uk = ub[k];
#pragma omp simd
                for (int d = 0; d < D; ++d) acc[k][d] += uk * hb[d];
              }
            } else {
              for (int k = 0; k < kn; ++k) {
                const T uk = ub[k];
#pragma omp simd
                for (int d = 0; d < D; ++d) acc[k][d] += uk * hb[d];
              }
            }
          }
          for (int k = 0; k < kn; ++k)
            for (int d = 0; d < D; ++d) gWi[(k0 + k) * JD + j * D + d] = acc[k][d];
        }
    }
  }
}

}  // namespace

#define CAPSBENCH_ROUTING_EXPORTS(NAME, T)                                                               \
  extern "C" void NAME##_forward(const T* u, const T* W, int64_t B, int64_t NI, int64_t J, int iterations, \
                                 int K8, int D, T* s_all, T* v_all, T* c_all, int threads) {            \
    if (K8 == 8 && D == 16)                                                                              \
      forward<T, 8, 16>(u, W, B, NI, J, iterations, K8, D, s_all, v_all, c_all, threads);                \
    else                                                                                                 \
      forward<T, 0, 0>(u, W, B, NI, J, iterations, K8, D, s_all, v_all, c_all, threads);                 \
  }                                                                                                      \
  extern "C" void NAME##_backward(const T* u, const T* W, const T* grad_v, const T* s_all, const T* v_all, \
                                  const T* c_all, int64_t B, int64_t NI, int64_t J, int iterations,      \
                                  int K8, int D, T* gu, T* gW, int threads) {                            \
    if (K8 == 8 && D == 16)                                                                              \
      backward<T, 8, 16>(u, W, grad_v, s_all, v_all, c_all, B, NI, J, iterations, K8, D, gu, gW, threads); \
    else                                                                                                 \
      backward<T, 0, 0>(u, W, grad_v, s_all, v_all, c_all, B, NI, J, iterations, K8, D, gu, gW, threads);  \
  }

CAPSBENCH_ROUTING_EXPORTS(capsbench_f32, float)
CAPSBENCH_ROUTING_EXPORTS(capsbench_f64, double)

extern "C" int capsbench_routing_abi() { return 2; }
