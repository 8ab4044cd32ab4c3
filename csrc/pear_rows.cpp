// Native CPU kernels for the chunked PEAR path (pear_kernels/kernels/native_cpu.py).
//
// The PyTorch row work around one (rows x V) logits chunk takes several full memory passes
// (gather, amax, sub_, exp_, sum, then mul_ and scatter_add_). Here it takes two for the
// statistics and one for the gradient, each row handled by one thread:
//
//   softmax_stats_(z, y):  pass 1  m = max_v z_v
//                          pass 2  z_v <- exp(z_v - m), s += z_v          (in place)
//                          logp = z_y - m - log s   (z_y read before pass 2)
//   dlogits_(e, s, y, c):  pass 3  e_v <- e_v * c / s ;  e_y -= c        (in place)
//                          so e = c * (softmax - onehot(y)) = d(c * -logp)/dz
//
// and the PEAR scan over a chunk (suffix sums with carry, log-weights) in one loop.
//
// Rows are split over ATen's intra-op threads (at::parallel_for; the build passes -fopenmp, without
// which that header template runs serially). exp is a branch-free float polynomial the compiler vectorises (glibc's vector expf is only
// declared under -ffast-math, which would also break the -inf handling we need):
//   exp(x) = 2^n * exp(r),  n = round(x / ln 2),  r = x - n ln 2 in [-ln2/2, ln2/2]
//   exp(r) ~ 1 + r + r^2/2! + ... + r^7/7!   (Horner; truncation error < 2e-9 on that range,
//   below float's half-ulp of 6e-8, so the result is within ~2 ulp after rounding).
// Inputs below -87.3 return exactly 0 (float underflow), as std::exp does up to denormals.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace {

constexpr int64_t kRowGrain = 4;  // rows per parallel task: a row of a real vocabulary is ~100k floats

inline float exp_poly(float x) {
  const float kLog2e = 1.44269504088896341f;
  const float kLn2Hi = 0.693359375f;        // ln 2 split in two so n * kLn2Hi is exact
  const float kLn2Lo = -2.12194440e-4f;
  const float lo = -87.33654f, hi = 88.72283f;
  float xc = x < lo ? lo : (x > hi ? hi : x);
  // round to nearest by the 1.5 * 2^23 trick (nearbyint is a libm call that stops vectorisation)
  const float kRound = 12582912.f;
  float n = (xc * kLog2e + kRound) - kRound;
  float r = xc - n * kLn2Hi - n * kLn2Lo;
  float p = 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  float out = p * scale;
  return x < lo ? 0.f : out;
}

inline double exp_poly(double x) { return std::exp(x); }

template <typename T>
void check_rows(const at::Tensor& z, const at::Tensor& y, const char* name) {
  TORCH_CHECK(z.device().is_cpu() && y.device().is_cpu(), name, ": CPU tensors only");
  TORCH_CHECK(z.dim() == 2 && z.is_contiguous(), name, ": logits must be a contiguous 2-D tensor");
  TORCH_CHECK(y.dim() == 1 && y.size(0) == z.size(0) && y.scalar_type() == at::kLong, name,
              ": labels must be int64 of length rows");
}

// pass 1 of a row: its max (-inf for an all -inf row)
template <typename T>
inline T row_max(const T* row, int64_t V) {
  T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t v = 0; v < V; ++v) m = row[v] > m ? row[v] : m;
  return m;
}

// pass 2 of a row, in place: row <- exp(row - m); returns the sum of the exps
template <typename T>
inline T row_exp_sum_(T* row, int64_t V, T m) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t v = 0; v < V; ++v) {
    T e = exp_poly(row[v] - m);
    row[v] = e;
    s += e;
  }
  return s;
}

template <typename T>
void softmax_stats_impl(at::Tensor& z, const at::Tensor& y, at::Tensor& logp, at::Tensor& sumexp) {
  const int64_t rows = z.size(0), V = z.size(1);
  T* zp = z.data_ptr<T>();
  const int64_t* yp = y.data_ptr<int64_t>();
  T* lp = logp.data_ptr<T>();
  T* sp = sumexp.data_ptr<T>();
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* row = zp + i * V;
      const T m = row_max(row, V);
      const T target = row[yp[i]];
      const T s = row_exp_sum_(row, V, m);
      sp[i] = s;
      lp[i] = target - m - std::log(s);
    }
  });
}

template <typename T>
void dlogits_impl(at::Tensor& e, const at::Tensor& s, const at::Tensor& y, const at::Tensor& coef) {
  const int64_t rows = e.size(0), V = e.size(1);
  T* ep = e.data_ptr<T>();
  const T* sp = s.data_ptr<T>();
  const T* cp = coef.data_ptr<T>();
  const int64_t* yp = y.data_ptr<int64_t>();
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* row = ep + i * V;
      const T f = cp[i] / sp[i];
#pragma omp simd
      for (int64_t v = 0; v < V; ++v) row[v] *= f;
      row[yp[i]] -= cp[i];
    }
  });
}


// tanh for the softcap, branch-free so the row loop vectorises (libm's tanhf is a scalar call,
// several times the cost of the logits matmul at V = 152k). A [13/6] rational approximation
// x P(x^2) / Q(x^2) on [-7.905, 7.905] (the coefficients Eigen uses for its float tanh), the
// input clamped there (tanh(7.905) rounds to 1 - 2^-22 in float); below 4e-4 tanh(x) = x to
// float precision. Measured against float64 tanh over [-10, 10] and a log grid in [1e-8, 1]:
// at most 3.9e-7 absolute, 7 ulp. NaN stays NaN (both comparisons are false), +-inf -> +-1.
inline float tanh_poly(float x) {
  const float kClamp = 7.90531110763549805f;
  float xc = x < -kClamp ? -kClamp : (x > kClamp ? kClamp : x);
  float x2 = xc * xc;
  float p = -2.76076847742355e-16f;
  p = p * x2 + 2.00018790482477e-13f;
  p = p * x2 + -8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  p = p * xc;
  float q = 1.19825839466702e-06f;
  q = q * x2 + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  float t = p / q;
  return (x < 4e-4f && x > -4e-4f) ? x : t;
}

inline double tanh_poly(double x) { return std::tanh(x); }  // float64 serves oracles: exact libm

// 1 - tanh^2(x) = sech^2(x) = 4 e / (1 + e)^2 with e = exp(-2|x|): accurate to a few ulp
// relative everywhere, where 1 - t^2 of a rounded t is not once tanh saturates (|x| > ~4:
// float tanh(12) is 1, so 1 - t^2 = 0 instead of 1.5e-10; at the rational's clamp it would be
// 5e-7). e underflows to 0 past |x| ~ 44, where sech^2 < 1e-38.
template <typename T>
inline T sech2(T x) {
  const T ax = x < T(0) ? -x : x;
  const T e = exp_poly(T(-2) * ax);
  const T one_e = T(1) + e;
  return T(4) * e / (one_e * one_e);
}

// The loss options' row statistics (softcap, label smoothing's mean logit, the logsumexp for
// the z-loss and return_lse), on z = r / T with r the raw logits h W^T + b:
//   softcap (dcap defined):  x = z * cap_in,  z <- tanh(x) * cap_out,  dcap <- 1 - tanh^2(x)
//                            (cap_in = T / c, cap_out = c / T: z = c tanh(r / c) / T)
//   m = max z;  mean = sum z / V;  target = z[y];  z <- exp(z - m);  s = sum exp
//   lse = m + log s;  logp = target - lse
template <typename T>
void option_stats_impl(at::Tensor& z, const at::Tensor& y, at::Tensor* dcap, double cap_in, double cap_out,
                       bool want_mean, at::Tensor& logp, at::Tensor& sumexp, at::Tensor& lse, at::Tensor& zmean) {
  const int64_t rows = z.size(0), V = z.size(1);
  T* zp = z.data_ptr<T>();
  T* dp = dcap != nullptr ? dcap->data_ptr<T>() : nullptr;
  const int64_t* yp = y.data_ptr<int64_t>();
  T *lp = logp.data_ptr<T>(), *sp = sumexp.data_ptr<T>(), *lsep = lse.data_ptr<T>(), *mp = zmean.data_ptr<T>();
  const T ci = static_cast<T>(cap_in), co = static_cast<T>(cap_out);
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* row = zp + i * V;
      if (dp != nullptr) {
        T* drow = dp + i * V;
#pragma omp simd
        for (int64_t v = 0; v < V; ++v) {
          const T x = row[v] * ci;
          drow[v] = sech2(x);
          row[v] = tanh_poly(x) * co;
        }
      }
      T m = -std::numeric_limits<T>::infinity();
      T total = 0;
      if (want_mean) {  // the max and the sum in one pass
#pragma omp simd reduction(max : m) reduction(+ : total)
        for (int64_t v = 0; v < V; ++v) {
          m = row[v] > m ? row[v] : m;
          total += row[v];
        }
      } else {
        m = row_max(row, V);
      }
      const T target = row[yp[i]];
      const T s = row_exp_sum_(row, V, m);
      sp[i] = s;
      lsep[i] = m + std::log(s);
      lp[i] = target - lsep[i];
      mp[i] = want_mean ? total / static_cast<T>(V) : T(0);
    }
  });
}

// In place on e = exp(z - m): the gradient of the options' token loss w.r.t. the raw logits,
//   e_v <- (e_v * f / s - u - [v == y] t) * dcap_v        (dcap = 1 without a softcap)
// with the per-row factors (already divided by the temperature) f = coef + 2 s_z lse ucoef
// (softmax part: PEAR-weighted cross-entropy and unweighted z-loss), t = coef (1 - eps)
// (the one-hot part) and u = coef eps / V (label smoothing's uniform part).
template <typename T>
void option_dlogits_impl(at::Tensor& e, const at::Tensor& s, const at::Tensor& y, const at::Tensor& f,
                         const at::Tensor& t, const at::Tensor& u, const at::Tensor* dcap) {
  const int64_t rows = e.size(0), V = e.size(1);
  T* ep = e.data_ptr<T>();
  const T *sp = s.data_ptr<T>(), *fp = f.data_ptr<T>(), *tp = t.data_ptr<T>(), *up = u.data_ptr<T>();
  const T* dp = dcap != nullptr ? dcap->data_ptr<T>() : nullptr;
  const int64_t* yp = y.data_ptr<int64_t>();
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* row = ep + i * V;
      const T scale = fp[i] / sp[i], uni = up[i];
      if (dp != nullptr) {
        const T* drow = dp + i * V;
#pragma omp simd
        for (int64_t v = 0; v < V; ++v) row[v] = (row[v] * scale - uni) * drow[v];
        row[yp[i]] -= tp[i] * drow[yp[i]];
      } else {
#pragma omp simd
        for (int64_t v = 0; v < V; ++v) row[v] = row[v] * scale - uni;
        row[yp[i]] -= tp[i];
      }
    }
  });
}

}  // namespace

// In place: z <- exp(z - rowmax). Returns (logp of y, row sums of exp).
std::tuple<at::Tensor, at::Tensor> softmax_stats_(at::Tensor z, at::Tensor y) {
  check_rows<float>(z, y, "softmax_stats_");
  auto logp = at::empty({z.size(0)}, z.options());
  auto sumexp = at::empty({z.size(0)}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "softmax_stats_", [&] {
    softmax_stats_impl<scalar_t>(z, y, logp, sumexp);
  });
  return {logp, sumexp};
}

// In place: e (= exp(z - m)) <- coef * (softmax - onehot(y)).
at::Tensor dlogits_(at::Tensor e, at::Tensor sumexp, at::Tensor y, at::Tensor coef) {
  check_rows<float>(e, y, "dlogits_");
  TORCH_CHECK(sumexp.scalar_type() == e.scalar_type() && coef.scalar_type() == e.scalar_type(),
              "dlogits_: sumexp and coef must have the logits' dtype");
  TORCH_CHECK(sumexp.is_contiguous() && coef.is_contiguous() && sumexp.numel() == e.size(0) &&
                  coef.numel() == e.size(0),
              "dlogits_: sumexp and coef must be contiguous of length rows");
  AT_DISPATCH_FLOATING_TYPES(e.scalar_type(), "dlogits_", [&] { dlogits_impl<scalar_t>(e, sumexp, y, coef); });
  return e;
}

// Loss options (softcap, label smoothing, z-loss, lse): in place z <- exp(z - rowmax) of the
// capped logits; dcap (same shape as z, or an empty tensor for no softcap) receives sech^2.
// Returns (logp of y, row sums of exp, lse, mean capped logit or 0 without want_mean).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> option_stats_(at::Tensor z, at::Tensor y, at::Tensor dcap,
                                                                         double cap_in, double cap_out,
                                                                         bool want_mean) {
  check_rows<float>(z, y, "option_stats_");
  const bool capped = dcap.numel() != 0;
  if (capped) {
    TORCH_CHECK(dcap.sizes() == z.sizes() && dcap.is_contiguous() && dcap.scalar_type() == z.scalar_type(),
                "option_stats_: dcap must be contiguous with the logits' shape and dtype");
  }
  auto logp = at::empty({z.size(0)}, z.options());
  auto sumexp = at::empty_like(logp), lse = at::empty_like(logp), zmean = at::empty_like(logp);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "option_stats_", [&] {
    option_stats_impl<scalar_t>(z, y, capped ? &dcap : nullptr, cap_in, cap_out, want_mean, logp, sumexp, lse, zmean);
  });
  return {logp, sumexp, lse, zmean};
}

// In place: e (= exp(z - m)) <- (e f / s - u - onehot(y) t) * dcap (see option_dlogits_impl).
at::Tensor option_dlogits_(at::Tensor e, at::Tensor sumexp, at::Tensor y, at::Tensor f, at::Tensor t, at::Tensor u,
                           at::Tensor dcap) {
  check_rows<float>(e, y, "option_dlogits_");
  for (const auto* v : {&sumexp, &f, &t, &u}) {
    TORCH_CHECK(v->scalar_type() == e.scalar_type() && v->is_contiguous() && v->numel() == e.size(0),
                "option_dlogits_: sumexp, f, t, u must be contiguous of length rows in the logits' dtype");
  }
  const bool capped = dcap.numel() != 0;
  if (capped) {
    TORCH_CHECK(dcap.sizes() == e.sizes() && dcap.is_contiguous() && dcap.scalar_type() == e.scalar_type(),
                "option_dlogits_: dcap must be contiguous with the logits' shape and dtype");
  }
  AT_DISPATCH_FLOATING_TYPES(e.scalar_type(), "option_dlogits_", [&] {
    option_dlogits_impl<scalar_t>(e, sumexp, y, f, t, u, capped ? &dcap : nullptr);
  });
  return e;
}

// The PEAR scan over compact tokens [start, end) of a chunk, visited from its end.
//   d[i]    = clip(log_ratio[i], dlo, dhi)                            (written)
//   incl[i] = d[i] + (incl[i+1] if i+1 is in the same sequence else 0)
//             where incl[end] (a later chunk, already final) is the carry
//   token:  logw[i] = n_after[i] * log_gamma + (incl[i+1] if i+1 is in the same sequence else 0)
//           (read from the next token, never incl[i] - d[i]: with an unbounded delta clip an
//           infinite d would give inf - inf = NaN)
//   block:  logw[i] = the token value at block_end[i] (>= i, so already known in this loop)
// Returns the unclipped log-weights of the range (float64). variant: 0 token, 1 block.
// The sequence and none variants need no scan here (the Python side handles them).
at::Tensor pear_scan_chunk(at::Tensor log_ratio, at::Tensor d, at::Tensor incl, at::Tensor seq_end,
                           at::Tensor n_after, at::Tensor block_end, int64_t start, int64_t end,
                           double dlo, double dhi, double log_gamma, int64_t variant) {
  for (const auto* t : {&log_ratio, &d, &incl}) {
    TORCH_CHECK(t->scalar_type() == at::kDouble && t->is_contiguous() && t->device().is_cpu(),
                "pear_scan_chunk: float64 contiguous CPU buffers expected");
  }
  for (const auto* t : {&seq_end, &n_after, &block_end}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(), "pear_scan_chunk: int64 layout expected");
  }
  const int64_t M = incl.numel();
  TORCH_CHECK(0 <= start && start <= end && end <= M, "pear_scan_chunk: bad range");
  TORCH_CHECK(variant == 0 || variant == 1, "pear_scan_chunk: variant must be 0 (token) or 1 (block)");
  const double* lr = log_ratio.data_ptr<double>();
  double* dp = d.data_ptr<double>();
  double* ip = incl.data_ptr<double>();
  const int64_t* se = seq_end.data_ptr<int64_t>();
  const int64_t* na = n_after.data_ptr<int64_t>();
  const int64_t* be = block_end.data_ptr<int64_t>();
  auto out = at::empty({end - start}, incl.options());
  double* op = out.data_ptr<double>();
  for (int64_t i = end - 1; i >= start; --i) {
    double di = lr[i - start];
    di = di < dlo ? dlo : (di > dhi ? dhi : di);
    dp[i] = di;
    ip[i] = di + (i + 1 < se[i] ? ip[i + 1] : 0.0);
  }
  for (int64_t i = start; i < end; ++i) {
    const int64_t j = variant == 0 ? i : be[i];
    const double after = j + 1 < se[j] ? ip[j + 1] : 0.0;
    op[i - start] = static_cast<double>(na[j]) * log_gamma + after;
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pear_kernels native CPU row pass and PEAR scan";
  m.def("softmax_stats_", &softmax_stats_, "in place exp(z - max); returns (logp, sumexp)");
  m.def("dlogits_", &dlogits_, "in place coef * (softmax - onehot)");
  m.def("option_stats_", &option_stats_, "loss options: in place softcap and exp(z - max); (logp, sumexp, lse, mean)");
  m.def("option_dlogits_", &option_dlogits_, "loss options: in place dloss/dlogits");
  m.def("pear_scan_chunk", &pear_scan_chunk, "PEAR suffix-sum scan over one chunk");
}
