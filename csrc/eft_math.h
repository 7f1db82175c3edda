// Per-element math of EFT sampling, shared by the CPU (C++) and CUDA sources.
//
// Everything here is a pure function of its arguments, so the CPU and CUDA backends
// compute bit-identical noise and identical per-token scores (up to the order of
// floating-point reductions, which lives in the backends). The spec is docs/DESIGN.md
// sections 2 and 3; the fp64 reference is eft_fast/reference.py.
#pragma once

#include <cstdint>
#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define EFT_HD __host__ __device__ __forceinline__
#else
#define EFT_HD inline
#endif
// nvcc compiles a .cu file twice: "#pragma unroll" is for the device pass; its host pass warns
// on either spelling (the loops are device-hot only). Plain C++ gets gcc's own spelling.
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
#define EFT_UNROLL _Pragma("unroll")
#elif defined(__CUDACC__) || defined(__HIPCC__)
#define EFT_UNROLL
#elif defined(__GNUC__) && !defined(__clang__)
#define EFT_UNROLL _Pragma("GCC unroll 10")
#else
#define EFT_UNROLL
#endif

namespace eft_fast {
// The CPU kernel is compiled once per instruction set; each copy gets its own copy of
// these inline functions, so the linker can never hand an AVX-512 body to another copy.
#ifdef EFT_CPU_NS
namespace EFT_CPU_NS {
#endif

// Row status codes, reported per row by every backend (eft_fast/ops.py decodes them).
enum RowStatus : int32_t {
  kRowOk = 0,
  kRowNaN = 1,        // a NaN in any input logit of the row
  kRowNoToken = 2,    // every token is masked (-inf score) or filtered out
  kRowBadParam = 3,   // a sampling parameter out of range (row_params_ok)
};
// On every status but kRowOk a backend writes token -1, log-prob NaN and, when asked for the
// row's log-probs, -inf over the whole row.

// Temperatures in (0, kGreedyTemperature) overflow z / T; callers map them to 0 (greedy),
// as eft_fast/_validation.py does with GREEDY_TEMPERATURE.
constexpr float kGreedyTemperature = 1e-5f;

// The parameter ranges the kernels handle; a row outside them gets kRowBadParam. Checked in
// the kernels, per row, so that a direct torch.ops caller is refused without a host sync.
// Every comparison is false for NaN.
EFT_HD bool row_params_ok(float temperature, float weight_top_p, int64_t top_k, float top_p) {
  const bool temperature_ok = temperature == 0.0f ||
                              (temperature >= kGreedyTemperature && temperature <= 3.4028235e38f);
  return temperature_ok && weight_top_p > 0.0f && weight_top_p <= 1.0f && top_k >= 0 && top_p > 0.0f &&
         top_p <= 1.0f;
}

// Upper bound (with margin) of the Gumbel noise g = -log(-log(u)), u in
// [0.5 * 2^-32, 1 - 0.5 * 2^-32]: the largest value, at the word 0xffffffff, is
// -log(-log1p(-2^-33)) = 22.87 (tests/test_philox.py checks the bound). A candidate j
// with z_j / T + kGumbelMax < best cannot win, so its noise need not be computed.
constexpr float kGumbelMax = 23.0f;

struct Philox4 {
  uint32_t w0, w1, w2, w3;
};

EFT_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// One Philox 4x32 round on the counter (c0, c1, c2, c3) with key (k0, k1).
EFT_HD void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
  const uint32_t a0 = c0, a2 = c2;
  c0 = mulhi32(0xCD9E8D57u, a2) ^ c1 ^ k0;
  c2 = mulhi32(0xD2511F53u, a0) ^ c3 ^ k1;
  c1 = 0xCD9E8D57u * a2;
  c3 = 0xD2511F53u * a0;
}
constexpr uint32_t kPhiloxKeyBumpA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyBumpB = 0xBB67AE85u;

// Philox 4x32 with 10 rounds (Salmon et al. 2011), bit for bit what Triton's
// tl.philox(seed, c0, c1, c2, c3) returns with key = (seed & 0xffffffff, seed >> 32).
EFT_HD Philox4 philox4x32_10(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3) {
  uint32_t k0 = static_cast<uint32_t>(seed & 0xffffffffull);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
EFT_UNROLL
  for (int round = 0; round < 10; ++round) {
    philox_round(c0, c1, c2, c3, k0, k1);
    k0 += kPhiloxKeyBumpA;
    k1 += kPhiloxKeyBumpB;
  }
  return {c0, c1, c2, c3};
}

#if !defined(__CUDACC__)
// The first Philox word w0 for counters (tokens[i], position, 0, 0), i < n: the same rounds
// as philox4x32_10, laid out round by round over arrays so that host compilers vectorise it.
template <int kMaxN>
inline void philox_w0_block(uint64_t seed, const uint32_t* tokens, uint32_t position, int n, uint32_t* w0) {
  alignas(64) uint32_t c0[kMaxN], c1[kMaxN], c2[kMaxN], c3[kMaxN];
  for (int i = 0; i < n; ++i) {
    c0[i] = tokens[i];
    c1[i] = position;
    c2[i] = 0u;
    c3[i] = 0u;
  }
  uint32_t k0 = static_cast<uint32_t>(seed & 0xffffffffull);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
#pragma omp simd
    for (int i = 0; i < n; ++i) philox_round(c0[i], c1[i], c2[i], c3[i], k0, k1);
    k0 += kPhiloxKeyBumpA;
    k1 += kPhiloxKeyBumpB;
  }
  for (int i = 0; i < n; ++i) w0[i] = c0[i];
}
#endif  // !__CUDACC__

// log1p(x) for x in (-1, 0] from one logf: with y = 1 + x rounded, log(y) * x / (y - 1)
// corrects the rounding of y (Goldberg 1991), and y == 1 means |x| < 2^-24 where
// log1p(x) = x to float precision. Used instead of log1pf so that the vectorised CPU
// path computes E with a single logarithm per token, exactly as the CUDA path does.
EFT_HD float log1p_from_log(float x, float log_y, float y) {
  return y == 1.0f ? x : log_y * (x / (y - 1.0f));
}

// Exponential variate E = -log(u), u = (w + 0.5) * 2^-32, without cancellation near u = 1:
// for u > 1/2, E = -log1p(-(1 - u)) with 1 - u = (~w + 0.5) * 2^-32 exact in float.
// The logarithm's argument is split out (exponential_log_argument) so vector code can
// take one vector log of it.
struct ExponentialArgs {
  float log_arg;   // take logf of this
  float x;         // -(1 - u) when w is high (log1p branch)
  bool high;       // w >= 2^31: u > 1/2
};
EFT_HD ExponentialArgs exponential_log_argument(uint32_t w) {
  constexpr float kTwoPowMinus32 = 2.3283064365386963e-10f;
  ExponentialArgs a;
  a.high = w >= 0x80000000u;
  a.x = -(static_cast<float>(~w) + 0.5f) * kTwoPowMinus32;
  a.log_arg = a.high ? 1.0f + a.x : (static_cast<float>(w) + 0.5f) * kTwoPowMinus32;
  return a;
}
EFT_HD float exponential_from_log(const ExponentialArgs& a, float log_of_arg) {
  return a.high ? -log1p_from_log(a.x, log_of_arg, a.log_arg) : -log_of_arg;
}
EFT_HD float exponential_from_word(uint32_t w) {
  const ExponentialArgs a = exponential_log_argument(w);
  return exponential_from_log(a, logf(a.log_arg));
}

// Gumbel noise of token j at sequence position `position` for a request's `seed`.
EFT_HD float gumbel_noise(uint64_t seed, uint32_t token, uint32_t position) {
  const Philox4 r = philox4x32_10(seed, token, position, 0u, 0u);
  return -logf(exponential_from_word(r.w0));
}

// Order-preserving map float -> uint32 (larger float, larger key; -inf is below every
// finite value). Top-k / top-p thresholds are searched over these keys by radix select.
EFT_HD uint32_t order_key(float v) {
  uint32_t bits;
#if defined(__CUDA_ARCH__)
  bits = __float_as_uint(v);
#else
  __builtin_memcpy(&bits, &v, sizeof(bits));
#endif
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

EFT_HD float key_to_float(uint32_t key) {
  const uint32_t bits = (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key;
  float v;
#if defined(__CUDA_ARCH__)
  v = __uint_as_float(bits);
#else
  __builtin_memcpy(&v, &bits, sizeof(v));
#endif
  return v;
}

// The float threshold of a radix-selected key: {v >= threshold} == {order_key(v) >= key}
// for every non-NaN v except -0.0 vs +0.0. Keys at or below -inf's mean "everything".
EFT_HD float threshold_from_key(uint32_t key) {
  return key <= order_key(-INFINITY) ? -INFINITY : key_to_float(key);
}

// -inf marks a masked token; checking it before subtracting keeps -inf - (-inf) from
// ever producing NaN.
EFT_HD bool is_neg_inf(float v) { return v == -INFINITY; }

// The unnormalised small-scale policy of one token,
//   c_j = x_R0 + sum_r beta_r (x_T[r] - x_R[r]),
// built term by term: start_small_policy(x_R0), add_reward_term for each tuned model,
// finish_small_policy. log_softmax is shift invariant, so s = log_softmax(c) equals
// docs/DESIGN.md's log_softmax(l_R0 + a). A token where any logit is -inf is masked (-inf);
// the mask is applied last, so -inf - (-inf) never leaks out as NaN. Without a reference
// (draft mode, R = 1, weight 1) x_R0 and x_R[0] are taken as 0, so c = x_T[0].
EFT_HD float start_small_policy(float ref0, bool* masked) {
  *masked = is_neg_inf(ref0);
  return ref0;
}
EFT_HD float add_reward_term(float c, bool* masked, float beta, float tuned, float ref) {
  *masked = *masked | is_neg_inf(tuned) | is_neg_inf(ref);
  return c + beta * (tuned - ref);
}
EFT_HD float finish_small_policy(float c, bool masked) { return masked ? -INFINITY : c; }

// A logit that makes its row an error: NaN or +inf (written so that NaN compares true).
EFT_HD bool is_bad_logit(float x) { return !(x < INFINITY); }

// Online log-sum-exp state (max, sum of exp(x - max)).
struct OnlineLse {
  float max = -INFINITY;
  float sum = 0.0f;
  EFT_HD void add(float x) {
    if (x == -INFINITY) return;
    if (x > max) {
      sum = sum * expf(max - x) + 1.0f;
      max = x;
    } else {
      sum += expf(x - max);
    }
  }
  EFT_HD void merge(const OnlineLse& o) {
    if (o.max == -INFINITY) return;
    if (max == -INFINITY) { *this = o; return; }
    if (o.max > max) {
      sum = sum * expf(max - o.max) + o.sum;
      max = o.max;
    } else {
      sum += o.sum * expf(o.max - max);
    }
  }
  // log(sum_j exp(x_j)); -inf when every x_j is -inf.
  EFT_HD float value() const { return max == -INFINITY ? -INFINITY : max + logf(sum); }
};

// The EFT score of one token (docs/DESIGN.md section 2):
//   z = s + [j in S] ((x_K - lse_K) - (x_R0 - lse_R0)),
// computed as s + (d + shift) with d = x_K - x_R0 and shift = lse_R0 - lse_K. Inside S a
// -inf knowledge logit masks the token (d = -inf); outside S the knowledge model does not
// enter the score. `in_set` is s >= tau_w, the truncation threshold.
EFT_HD float eft_score(float s, bool in_set, float d, float shift) {
  if (s == -INFINITY || !in_set) return s;
  return d == -INFINITY ? -INFINITY : s + (d + shift);
}

#ifdef EFT_CPU_NS
}  // namespace EFT_CPU_NS
#endif
}  // namespace eft_fast
