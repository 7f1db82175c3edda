// CUDA implementation of eft_fast::eft_sample (docs/DESIGN.md sections 2-3), the twin of the CPU
// op (binding csrc/cpu/eft_sample.cpp, kernel csrc/cpu/eft_sample_kernel.cpp): the same op
// signature and input checks (csrc/op_checks.h), the same passes and thresholds, and the
// per-element math of csrc/eft_math.h.
//
// One CTA of kThreads threads per row, looping over the vocabulary, in five passes:
//   1. read the logits once (16-byte loads where a row is aligned): online log-sum-exp of
//      x_K, x_R0 and the unnormalised small policy c (start_small_policy, add_reward_term,
//      finish_small_policy), and the NaN / +inf check; c goes to an fp32 workspace row;
//   2. (knowledge given, weight_top_p < 1) the tie-inclusive top-p threshold key of exp(s),
//      s = c - lse_c, by radix select over order_key(s);
//   3. z = s + [s in S] (x_K - x_R0 + lse_R0 - lse_K) over c in the workspace, and lse_z;
//   4. (temperature > 0) the top-k (count) and top-p (mass of exp((z - zmax) / T) inside
//      the top-k set) threshold keys on z, by the same radix select;
//   5. Gumbel-max (T = 0: argmax of z) over the allowed tokens, ties to the lowest index,
//      writing log softmax(z) when asked.
// c and z are stored once and re-read, never recomputed from the logits, so every pass sees
// bit-identical values whatever FMA contraction the compiler applies at each call site.
//
// Radix select uses the CPU's 11 + 11 + 10 bit digits, one pass over the row per digit, with
// the histogram in shared memory. Masses are summed in 64-bit fixed point (weights <= 1
// scaled by 2^(63 - ceil(log2 V)), so no sum can overflow) with integer atomics: integer sums
// are exact and independent of the order of the atomics, which makes the thresholds
// deterministic without float atomics, and at least as accurate as the CPU's float sums
// (which it matches up to rounding). Every other reduction is a fixed shuffle tree, so a
// row's result does not depend on scheduling. The op never synchronises with the host, so it
// can be captured in CUDA graphs.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>

#include "../eft_math.h"
#include "../op_checks.h"

namespace eft_fast {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;
// The block reductions merge one value per warp in warp 0, lane w reading warp w's.
static_assert(kWarps == kWarpSize, "block reductions need exactly one warp's worth of warps");
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMaxBuckets = 2048;  // the widest radix digit has 11 bits
static_assert(kMaxBuckets % kThreads == 0, "the bucket scan gives each thread whole buckets");

// A lower bound of gumbel_noise: its minimum, at w0 = 0, is -log(-log(0.5 * 2^-32)) ~= -3.13.
// The argmax of z is always allowed, so the winning value is >= zmax / T + kGumbelMin before
// any noise is drawn; a token below that bound even with kGumbelMax noise cannot win.
constexpr float kGumbelMin = -4.0f;

// Logit elements per 16-byte load (float: 4, bfloat16 / half: 8).
template <typename T>
constexpr int kPack = 16 / static_cast<int>(sizeof(T));

template <typename T>
struct EftArgs {
  const T* knowledge;  // nullptr in draft mode
  int64_t knowledge_row_stride;
  const T* tuned;  // model r, row b at tuned + r * tuned_model_stride + b * tuned_row_stride
  int64_t tuned_model_stride, tuned_row_stride;
  const T* reference;  // nullptr in draft mode without reference
  int64_t reference_model_stride;  // 0 when one reference is shared by every tuned model
  int64_t reference_row_stride;
  int num_tuned;
  const float* beta;  // [B, R]
  int64_t beta_row_stride, beta_model_stride;
  const int64_t* seeds;
  int64_t seeds_stride;
  const int64_t* positions;
  int64_t positions_stride;
  const float* temperature;
  int64_t temperature_stride;
  const float* weight_top_p;
  int64_t weight_top_p_stride;
  const int64_t* top_k;
  int64_t top_k_stride;
  const float* top_p;
  int64_t top_p_stride;
  int64_t vocab;
  float fixed_scale;  // 2^(63 - ceil(log2 vocab)): one unit of weight in fixed point
  float* work;        // [B, work_stride] fp32: c, then z
  int64_t work_stride;  // a multiple of 4, so that every row is float4-aligned
  int64_t* tokens;
  float* logprob;
  float* row_logprobs;  // [B, vocab] or nullptr
  int32_t* status;
};

__device__ __forceinline__ bool is_aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

template <int P>
__device__ __forceinline__ int pack_size(int64_t vocab, int64_t j0) {
  return vocab - j0 < P ? static_cast<int>(vocab - j0) : P;
}

// Elements j0 .. j0 + n - 1 of a logit row as fp32 (the rest 0). One 16-byte load when the
// row is aligned (j0 is a multiple of the pack), element loads otherwise.
template <typename T>
__device__ __forceinline__ void load_logits(const T* row, int64_t j0, int n, bool row_aligned,
                                            float (&out)[kPack<T>]) {
  constexpr int P = kPack<T>;
  if (row_aligned && n == P) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(row + j0));
    T elems[P];
    memcpy(elems, &raw, sizeof(raw));
#pragma unroll
    for (int e = 0; e < P; ++e) out[e] = static_cast<float>(elems[e]);
  } else {
#pragma unroll
    for (int e = 0; e < P; ++e) out[e] = e < n ? static_cast<float>(row[j0 + e]) : 0.0f;
  }
}

// The workspace is written and read within the kernel, so it is read with plain loads
// (not __ldg, whose cache is not coherent with writes of the same kernel).
template <int P>
__device__ __forceinline__ void load_work(const float* work, int64_t j0, int n, float (&out)[P]) {
  static_assert(P % 4 == 0, "packs are whole float4s");
  if (n == P) {
#pragma unroll
    for (int q = 0; q < P / 4; ++q) {
      const float4 v = reinterpret_cast<const float4*>(work + j0)[q];
      out[4 * q] = v.x;
      out[4 * q + 1] = v.y;
      out[4 * q + 2] = v.z;
      out[4 * q + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int e = 0; e < P; ++e) out[e] = e < n ? work[j0 + e] : 0.0f;
  }
}

template <int P>
__device__ __forceinline__ void store_work(float* work, int64_t j0, int n, const float (&v)[P]) {
  static_assert(P % 4 == 0, "packs are whole float4s");
  if (n == P) {
#pragma unroll
    for (int q = 0; q < P / 4; ++q) {
      reinterpret_cast<float4*>(work + j0)[q] = make_float4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]);
    }
  } else {
#pragma unroll
    for (int e = 0; e < P; ++e) {
      if (e < n) work[j0 + e] = v[e];
    }
  }
}

// Calls f(j, work[j]) for every j < vocab; each thread visits its tokens in increasing j,
// which the argmax's tie rule and its noise skipping rely on.
template <typename F>
__device__ __forceinline__ void for_each_work(const float* work, int64_t vocab, F&& f) {
  const int64_t num_quads = (vocab + 3) / 4;
  for (int64_t i = threadIdx.x; i < num_quads; i += kThreads) {
    const int n = pack_size<4>(vocab, 4 * i);
    float v[4];
    load_work<4>(work, 4 * i, n, v);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (e < n) f(4 * i + e, v[e]);
    }
  }
}

// ---- block-wide reductions (fixed trees: the result does not depend on timing) ----

__device__ __forceinline__ void warp_merge_lse(OnlineLse& x) {
  const int lane = threadIdx.x % kWarpSize;
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    OnlineLse other;
    other.max = __shfl_down_sync(kFullMask, x.max, offset);
    other.sum = __shfl_down_sync(kFullMask, x.sum, offset);
    if (lane + offset < kWarpSize) x.merge(other);
  }
}

// Merges each x[n] over the block; every thread gets the row's result.
template <int N>
__device__ __forceinline__ void block_merge_lse(OnlineLse (&x)[N]) {
  __shared__ float warp_max[N][kWarps], warp_sum[N][kWarps];
  __shared__ float row_max[N], row_sum[N];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int n = 0; n < N; ++n) {
    warp_merge_lse(x[n]);
    if (lane == 0) {
      warp_max[n][warp] = x[n].max;
      warp_sum[n][warp] = x[n].sum;
    }
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int n = 0; n < N; ++n) {
      OnlineLse y;
      y.max = warp_max[n][lane];
      y.sum = warp_sum[n][lane];
      warp_merge_lse(y);
      if (lane == 0) {
        row_max[n] = y.max;
        row_sum[n] = y.sum;
      }
    }
  }
  __syncthreads();
#pragma unroll
  for (int n = 0; n < N; ++n) {
    x[n].max = row_max[n];
    x[n].sum = row_sum[n];
  }
}

struct Best {
  float value;    // z / T + g, or z when greedy
  float z;
  int64_t token;  // -1: none yet
};

// Larger value first, then the lower index: a total order (values are never NaN for valid
// temperatures), so any merge tree gives the first maximum, as the CPU's ordered scan does.
__device__ __forceinline__ bool better(const Best& a, const Best& b) {
  return a.token >= 0 &&
         (b.token < 0 || a.value > b.value || (a.value == b.value && a.token < b.token));
}

__device__ __forceinline__ void warp_best(Best& x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    Best other;
    other.value = __shfl_down_sync(kFullMask, x.value, offset);
    other.z = __shfl_down_sync(kFullMask, x.z, offset);
    other.token = __shfl_down_sync(kFullMask, x.token, offset);
    if (better(other, x)) x = other;
  }
}

__device__ __forceinline__ Best block_best(Best x) {
  __shared__ Best warp_result[kWarps];
  __shared__ Best row_result;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  warp_best(x);
  if (lane == 0) warp_result[warp] = x;
  __syncthreads();
  if (warp == 0) {
    Best y = warp_result[lane];
    warp_best(y);
    if (lane == 0) row_result = y;
  }
  __syncthreads();
  return row_result;
}

// Exclusive suffix sum of v over the block (the sum over higher threadIdx); *total gets the
// sum over all threads. Integer sums: exact whatever the tree.
__device__ __forceinline__ unsigned long long block_suffix_sum(unsigned long long v, unsigned long long* total) {
  __shared__ unsigned long long warp_total[kWarps], warp_suffix[kWarps];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  unsigned long long incl = v;
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    const unsigned long long y = __shfl_down_sync(kFullMask, incl, offset);
    if (lane + offset < kWarpSize) incl += y;
  }
  if (lane == 0) warp_total[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    unsigned long long s = warp_total[lane];
#pragma unroll
    for (int offset = 1; offset < kWarpSize; offset *= 2) {
      const unsigned long long y = __shfl_down_sync(kFullMask, s, offset);
      if (lane + offset < kWarpSize) s += y;
    }
    warp_suffix[lane] = s;
  }
  __syncthreads();
  *total = warp_suffix[0];
  return (warp + 1 < kWarps ? warp_suffix[warp + 1] : 0ull) + (incl - v);
}

// ---- radix select ----

// A weight in [0, 1] as fixed point. The clamp keeps vocab * fixed_scale a bound of every
// sum even if expf rounds a weight of 1 up.
__device__ __forceinline__ unsigned long long fixed_weight(float w, float fixed_scale) {
  return __float2ull_rn(fminf(w, 1.0f) * fixed_scale);
}

// ceil(x) for the target "mass >= x" on integer masses; 0 (every prefix qualifies) for x <= 0.
__device__ __forceinline__ unsigned long long fixed_target(float x) {
  return x > 0.0f ? __float2ull_ru(x) : 0ull;
}

// Shared memory of radix_select. Owned by the kernel: a __shared__ array declared inside
// radix_select would exist once per instantiation (one per call site's lambdas).
struct RadixShared {
  unsigned long long hist[kMaxBuckets];
  unsigned long long found_residual;
  uint32_t found_bucket;
  int found;
};

// The largest key k such that the items with key >= k (among those with key >= floor_key)
// hold weight >= target, where target = target_of(total weight of those items); 0 when the
// total falls short. RadixSelect::select of csrc/cpu/eft_sample.cpp: the same digits, the
// same "highest bucket whose mass from the top reaches the target" rule per digit, and the
// same result when a later digit falls short (unreachable with exact integer masses).
// value_of maps a workspace value to the value whose order_key is selected; weight_of gives
// an item's integer weight (0: the item adds nothing and is skipped).
template <typename ValueOf, typename WeightOf, typename TargetOf>
__device__ uint32_t radix_select(RadixShared& smem, const float* work, int64_t vocab, uint32_t floor_key,
                                 ValueOf value_of, WeightOf weight_of, TargetOf target_of) {
  unsigned long long* hist = smem.hist;
  unsigned long long& found_residual = smem.found_residual;
  uint32_t& found_bucket = smem.found_bucket;
  int& found = smem.found;
  const int tid = threadIdx.x;
  uint32_t prefix = 0, high_mask = 0;
  unsigned long long target = 0;
#pragma unroll 1
  for (int level = 0; level < 3; ++level) {
    const int bits = level == 2 ? 10 : 11;
    const int shift = level == 0 ? 21 : (level == 1 ? 10 : 0);
    const int num_buckets = 1 << bits;
    for (int i = tid; i < num_buckets; i += kThreads) hist[i] = 0;
    if (tid == 0) found = 0;
    __syncthreads();

    // Consecutive items of a thread mostly share a digit (especially the top one, where most
    // of a row falls in a few buckets), so runs are summed in a register and flushed with one
    // atomic: that keeps same-address atomics from serialising the warps.
    uint32_t run_digit = 0;
    unsigned long long run = 0;
    for_each_work(work, vocab, [&](int64_t, float x) {
      const float v = value_of(x);
      const uint32_t key = order_key(v);
      if (key < floor_key || (key & high_mask) != prefix) return;
      const unsigned long long w = weight_of(v);
      if (w == 0) return;
      const uint32_t digit = (key >> shift) & static_cast<uint32_t>(num_buckets - 1);
      if (digit != run_digit && run != 0) {
        atomicAdd(&hist[run_digit], run);
        run = 0;
      }
      run_digit = digit;
      run += w;
    });
    if (run != 0) atomicAdd(&hist[run_digit], run);
    __syncthreads();

    // The chosen bucket b is the highest one with above(b) + hist[b] >= target, above(b) being
    // the mass of the higher buckets. Exact sums are monotone in b, so exactly one thread sees
    // "b reaches the target and b + 1 does not" (or b is the top bucket).
    const int per_thread = num_buckets / kThreads;
    unsigned long long local = 0;
    for (int e = 0; e < per_thread; ++e) local += hist[tid * per_thread + e];
    unsigned long long total = 0;
    unsigned long long above = block_suffix_sum(local, &total);
    if (level == 0) target = target_of(total);
    for (int e = per_thread - 1; e >= 0; --e) {
      const int bucket = tid * per_thread + e;
      const unsigned long long h = hist[bucket];
      if (above + h >= target && (bucket == num_buckets - 1 || above < target)) {
        found = 1;
        found_bucket = static_cast<uint32_t>(bucket);
        found_residual = target - above;
      }
      above += h;
    }
    __syncthreads();
    const bool ok = found != 0;
    const uint32_t bucket = found_bucket;
    const unsigned long long residual = found_residual;
    __syncthreads();  // every thread has read the result before the next digit resets it
    if (!ok) return level == 0 ? 0u : prefix;
    target = residual;
    prefix |= bucket << shift;
    high_mask |= static_cast<uint32_t>(num_buckets - 1) << shift;
  }
  return prefix;
}

// ---- the kernel: one CTA per row ----

template <typename T>
__global__ void __launch_bounds__(kThreads) eft_sample_kernel(const EftArgs<T> a) {
  constexpr int P = kPack<T>;
  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x;
  const int64_t vocab = a.vocab;
  const int num_tuned = a.num_tuned;
  const T* knowledge = a.knowledge != nullptr ? a.knowledge + b * a.knowledge_row_stride : nullptr;
  const T* tuned = a.tuned + b * a.tuned_row_stride;
  const T* reference = a.reference != nullptr ? a.reference + b * a.reference_row_stride : nullptr;
  const float* beta = a.beta + b * a.beta_row_stride;
  float* work = a.work + b * a.work_stride;
  float* row_logprobs = a.row_logprobs != nullptr ? a.row_logprobs + b * vocab : nullptr;
  const uint64_t seed = static_cast<uint64_t>(a.seeds[b * a.seeds_stride]);
  const uint32_t position = static_cast<uint32_t>(a.positions[b * a.positions_stride]);
  const float temperature = a.temperature[b * a.temperature_stride];
  const float weight_top_p = a.weight_top_p[b * a.weight_top_p_stride];
  const int64_t top_k = a.top_k[b * a.top_k_stride];
  const float top_p = a.top_p[b * a.top_p_stride];
  const float fixed_scale = a.fixed_scale;

  __shared__ RadixShared radix_smem;

  // Called by every thread of the block. An error row's log-probs are -inf (eft_math.h).
  auto finish = [&](int64_t token, float logprob, int32_t status) {
    if (status != kRowOk && row_logprobs != nullptr) {
      for (int64_t j = tid; j < vocab; j += kThreads) row_logprobs[j] = -INFINITY;
    }
    if (tid == 0) {
      a.tokens[b] = token;
      a.logprob[b] = logprob;
      a.status[b] = status;
    }
  };

  if (!row_params_ok(temperature, weight_top_p, top_k, top_p)) {  // the same for every thread
    finish(-1, NAN, kRowBadParam);
    return;
  }

  // Pass 1: logits -> c (workspace) and the log-sum-exps of x_K, x_R0 and c.
  const bool knowledge_aligned = knowledge != nullptr && is_aligned16(knowledge);
  const bool tuned_aligned = is_aligned16(tuned);
  const bool reference_aligned = reference != nullptr && is_aligned16(reference);
  const float beta0 = num_tuned > 0 ? beta[0] : 0.0f;
  const int64_t num_packs = (vocab + P - 1) / P;
  OnlineLse lse[3];  // x_K, x_R0, c
  bool bad = false;
  for (int64_t i = tid; i < num_packs; i += kThreads) {
    const int64_t j0 = i * P;
    const int n = pack_size<P>(vocab, j0);
    // Model 0's rows come in packs; further tuned / reference models (reward interpolation)
    // are read per element.
    float xt[P], xr[P], xk[P], c[P];
    load_logits(tuned, j0, n, tuned_aligned, xt);
    if (reference != nullptr) {
      load_logits(reference, j0, n, reference_aligned, xr);
    } else {
#pragma unroll
      for (int e = 0; e < P; ++e) xr[e] = 0.0f;
    }
    if (knowledge != nullptr) {
      load_logits(knowledge, j0, n, knowledge_aligned, xk);
    } else {
#pragma unroll
      for (int e = 0; e < P; ++e) xk[e] = 0.0f;
    }
#pragma unroll
    for (int e = 0; e < P; ++e) {
      c[e] = 0.0f;
      if (e >= n) continue;
      const int64_t j = j0 + e;
      const float ref0 = xr[e];
      bool elem_bad = is_bad_logit(ref0);
      bool masked = false;
      float cj = start_small_policy(ref0, &masked);
      for (int r = 0; r < num_tuned; ++r) {
        const float t = r == 0 ? xt[e] : static_cast<float>(tuned[r * a.tuned_model_stride + j]);
        const float beta_r = r == 0 ? beta0 : beta[r * a.beta_model_stride];
        if (reference == nullptr) {
          elem_bad = elem_bad || is_bad_logit(t);
          cj = add_reward_term(cj, &masked, beta_r, t, 0.0f);
        } else {
          const float rr = (r == 0 || a.reference_model_stride == 0)
                               ? ref0
                               : static_cast<float>(reference[r * a.reference_model_stride + j]);
          elem_bad = elem_bad || is_bad_logit(t) || is_bad_logit(rr);
          cj = add_reward_term(cj, &masked, beta_r, t, rr);
        }
      }
      c[e] = finish_small_policy(cj, masked);
      elem_bad = elem_bad || is_bad_logit(c[e]);  // the weighted sum overflowed fp32
      if (knowledge != nullptr) {
        elem_bad = elem_bad || is_bad_logit(xk[e]);
        lse[0].add(xk[e]);
        lse[1].add(ref0);
      }
      lse[2].add(c[e]);
      bad = bad || elem_bad;
    }
    store_work<P>(work, j0, n, c);
  }
  if (__syncthreads_or(bad)) {
    finish(-1, NAN, kRowNaN);
    return;
  }
  block_merge_lse(lse);
  const float log_z_c = lse[2].value();
  if (log_z_c == -INFINITY) {
    finish(-1, NAN, kRowNoToken);
    return;
  }

  // Pass 2: the truncation set S = {order_key(s_j) >= s_key} at mass weight_top_p.
  uint32_t s_key = 0;
  if (knowledge != nullptr && weight_top_p < 1.0f) {
    const unsigned long long target = fixed_target(weight_top_p * fixed_scale);
    s_key = radix_select(
        radix_smem, work, vocab, 0u, [=](float cj) { return cj - log_z_c; },
        [=](float s) { return fixed_weight(expf(s), fixed_scale); },
        [=](unsigned long long) { return target; });
  }

  // Pass 3: z over c, and its log-sum-exp. Membership of S is tested on the float threshold,
  // as on the CPU. d = x_K - x_R0 only matters where s is finite, i.e. where x_R0 is finite,
  // so it is never -inf - -inf where it is used.
  const float s_threshold = threshold_from_key(s_key);
  const float weight_shift = lse[1].value() - lse[0].value();
  OnlineLse lse_z[1];
  for (int64_t i = tid; i < num_packs; i += kThreads) {
    const int64_t j0 = i * P;
    const int n = pack_size<P>(vocab, j0);
    float z[P];
    load_work<P>(work, j0, n, z);
    bool in_set[P];
    bool any_in_set = false;
#pragma unroll
    for (int e = 0; e < P; ++e) {
      z[e] -= log_z_c;  // s; -inf stays -inf
      in_set[e] = z[e] >= s_threshold;
      any_in_set = any_in_set || (e < n && z[e] != -INFINITY && in_set[e]);
    }
    if (knowledge != nullptr) {
      // With a truncation set most packs hold no token of S: their logits are not read.
      float xk[P], xr[P];
      if (any_in_set) {
        load_logits(knowledge, j0, n, knowledge_aligned, xk);
        load_logits(reference, j0, n, reference_aligned, xr);
      } else {
#pragma unroll
        for (int e = 0; e < P; ++e) xk[e] = xr[e] = 0.0f;
      }
#pragma unroll
      for (int e = 0; e < P; ++e) z[e] = eft_score(z[e], in_set[e], xk[e] - xr[e], weight_shift);
    }
#pragma unroll
    for (int e = 0; e < P; ++e) {
      if (e < n) lse_z[0].add(z[e]);
    }
    store_work<P>(work, j0, n, z);
  }
  block_merge_lse(lse_z);
  const float log_z_z = lse_z[0].value();
  const float z_max = lse_z[0].max;
  if (log_z_z == -INFINITY) {
    finish(-1, NAN, kRowNoToken);
    return;
  }

  // Pass 4: filters, as keys: allowed = {z_j >= threshold_from_key(allowed_key)}; the
  // initial key, just above order_key(-inf), allows every finite z.
  const bool greedy = temperature == 0.0f;
  const bool top_k_on = !greedy && top_k > 0 && top_k < vocab;
  const bool top_p_on = !greedy && top_p < 1.0f;
  uint32_t allowed_key = order_key(-INFINITY) + 1u;
  if (top_k_on) {
    // Counts every token, masked ones included, like the CPU: with fewer than top_k finite
    // scores the threshold falls on -inf and every finite token stays allowed.
    const uint32_t k = radix_select(
        radix_smem, work, vocab, 0u, [](float zj) { return zj; }, [](float) { return 1ull; },
        [=](unsigned long long) { return static_cast<unsigned long long>(top_k); });
    allowed_key = max(allowed_key, k);
  }
  if (top_p_on) {
    const float inv_t = 1.0f / temperature;
    const uint32_t k = radix_select(
        radix_smem, work, vocab, allowed_key, [](float zj) { return zj; },
        [=](float zj) { return fixed_weight(expf((zj - z_max) * inv_t), fixed_scale); },
        [=](unsigned long long total) {
          const double t = static_cast<double>(top_p) * static_cast<double>(total);
          if (!(t > 0.0)) return 0ull;
          const double target = ceil(t);
          // (double)total may round above total; the target never exceeds the mass present.
          return target >= static_cast<double>(total) ? total : static_cast<unsigned long long>(target);
        });
    allowed_key = max(allowed_key, k);
  }

  // Pass 5: Gumbel-max (greedy: argmax of z) over the allowed tokens, ties to the lowest index.
  // As on the CPU, allowed means z >= the float threshold of allowed_key, and a value of -inf
  // is never a candidate. A token is skipped without drawing its noise only when it provably
  // cannot win: even with the largest noise it stays below this thread's best so far, or
  // below skip_floor (a lower bound of the row's winning value, see kGumbelMin).
  const float allowed_threshold = threshold_from_key(allowed_key);
  const float skip_floor = greedy ? -INFINITY : z_max / temperature + kGumbelMin;
  const bool row_logprobs_aligned = row_logprobs != nullptr && is_aligned16(row_logprobs);
  Best best{-INFINITY, 0.0f, -1};
  const int64_t num_quads = (vocab + 3) / 4;
  for (int64_t i = tid; i < num_quads; i += kThreads) {
    const int64_t j0 = 4 * i;
    const int n = pack_size<4>(vocab, j0);
    float zq[4];
    load_work<4>(work, j0, n, zq);
    if (row_logprobs != nullptr) {
      if (row_logprobs_aligned && n == 4) {
        *reinterpret_cast<float4*>(row_logprobs + j0) =
            make_float4(zq[0] - log_z_z, zq[1] - log_z_z, zq[2] - log_z_z, zq[3] - log_z_z);
      } else {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (e < n) row_logprobs[j0 + e] = zq[e] - log_z_z;
        }
      }
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (e >= n) continue;
      const float zj = zq[e];
      const int64_t j = j0 + e;
      float value = zj;
      if (!greedy) {
        if (!(zj >= allowed_threshold)) continue;
        const float scaled = zj / temperature;
        if (scaled + kGumbelMax < fmaxf(best.value, skip_floor)) continue;
        value = scaled + gumbel_noise(seed, static_cast<uint32_t>(j), position);
      }
      if (value == -INFINITY) continue;
      if (best.token < 0 || value > best.value) best = Best{value, zj, j};
    }
  }
  best = block_best(best);
  if (best.token < 0) {
    finish(-1, NAN, kRowNoToken);
    return;
  }
  finish(best.token, best.z - log_z_z, kRowOk);
}

// ---- host side ----

// The smallest s with 2^s >= n.
int ceil_log2(int64_t n) {
  int s = 0;
  while ((int64_t{1} << s) < n) ++s;
  return s;
}

struct OpTensors {
  const std::optional<at::Tensor>& knowledge;
  const at::Tensor& tuned;
  const std::optional<at::Tensor>& reference;
  const at::Tensor& seeds;
  const at::Tensor& positions;
  const at::Tensor& reward_weights;
  const at::Tensor& temperature;
  const at::Tensor& weight_top_p;
  const at::Tensor& top_k;
  const at::Tensor& top_p;
  int64_t vocab_size;
  const at::Tensor& work;
  const at::Tensor& tokens;
  const at::Tensor& logprob;
  const at::Tensor& row_logprobs;
  const at::Tensor& status;
  bool return_logprobs;
};

template <typename T>
EftArgs<T> make_args(const OpTensors& t) {
  EftArgs<T> a;
  a.knowledge = t.knowledge ? t.knowledge->const_data_ptr<T>() : nullptr;
  a.knowledge_row_stride = t.knowledge ? t.knowledge->stride(0) : 0;
  a.tuned = t.tuned.const_data_ptr<T>();
  a.tuned_model_stride = t.tuned.stride(0);
  a.tuned_row_stride = t.tuned.stride(1);
  a.reference = t.reference ? t.reference->const_data_ptr<T>() : nullptr;
  a.reference_model_stride = t.reference && t.reference->size(0) > 1 ? t.reference->stride(0) : 0;
  a.reference_row_stride = t.reference ? t.reference->stride(1) : 0;
  a.num_tuned = static_cast<int>(t.tuned.size(0));
  a.beta = t.reward_weights.const_data_ptr<float>();
  a.beta_row_stride = t.reward_weights.stride(0);
  a.beta_model_stride = t.reward_weights.stride(1);
  a.seeds = t.seeds.const_data_ptr<int64_t>();
  a.seeds_stride = t.seeds.stride(0);
  a.positions = t.positions.const_data_ptr<int64_t>();
  a.positions_stride = t.positions.stride(0);
  a.temperature = t.temperature.const_data_ptr<float>();
  a.temperature_stride = t.temperature.stride(0);
  a.weight_top_p = t.weight_top_p.const_data_ptr<float>();
  a.weight_top_p_stride = t.weight_top_p.stride(0);
  a.top_k = t.top_k.const_data_ptr<int64_t>();
  a.top_k_stride = t.top_k.stride(0);
  a.top_p = t.top_p.const_data_ptr<float>();
  a.top_p_stride = t.top_p.stride(0);
  a.vocab = t.vocab_size;
  // Every weight is <= 1, so the mass of the vocab_size tokens is <= 2^63 in fixed point.
  a.fixed_scale = std::ldexp(1.0f, 63 - ceil_log2(t.vocab_size));
  a.work = t.work.data_ptr<float>();
  a.work_stride = t.work.stride(0);
  a.tokens = t.tokens.data_ptr<int64_t>();
  a.logprob = t.logprob.data_ptr<float>();
  a.row_logprobs = t.return_logprobs ? t.row_logprobs.data_ptr<float>() : nullptr;
  a.status = t.status.data_ptr<int32_t>();
  return a;
}

template <typename T>
void launch_eft_sample(const OpTensors& t, int64_t batch) {
  if constexpr (std::is_same_v<T, double>) {
    // Rejected by check_eft_sample_inputs; this branch only keeps a double kernel from being
    // compiled for AT_DISPATCH_FLOATING_TYPES_AND2.
    TORCH_CHECK_TYPE(false, "logits must be float32, bfloat16 or float16, got double");
  } else {
    const EftArgs<T> args = make_args<T>(t);
    eft_sample_kernel<T><<<static_cast<unsigned>(batch), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> eft_sample_cuda(
    const std::optional<at::Tensor>& knowledge, const at::Tensor& tuned,
    const std::optional<at::Tensor>& reference, const at::Tensor& seeds, const at::Tensor& positions,
    const at::Tensor& reward_weights, const at::Tensor& temperature, const at::Tensor& weight_top_p,
    const at::Tensor& top_k, const at::Tensor& top_p, int64_t vocab_size, bool return_logprobs) {
  check_eft_sample_inputs(knowledge, tuned, reference, seeds, positions, reward_weights, temperature,
                          weight_top_p, top_k, top_p, vocab_size);
  // The shared checks put every tensor on tuned's device; this binding needs it to be CUDA.
  const at::Device device = tuned.device();
  TORCH_CHECK_VALUE(device.is_cuda(), "tuned must be a CUDA tensor, got ", device);
  const int64_t batch = seeds.size(0);
  TORCH_CHECK_VALUE(batch <= std::numeric_limits<int32_t>::max(), "eft_sample supports at most ",
                    std::numeric_limits<int32_t>::max(), " rows on CUDA, got ", batch);
  const c10::cuda::CUDAGuard guard(device);

  const auto opts = seeds.options();
  auto tokens = at::empty({batch}, opts.dtype(at::kLong));
  auto logprob = at::empty({batch}, opts.dtype(at::kFloat));
  auto status = at::empty({batch}, opts.dtype(at::kInt));
  auto row_logprobs = at::empty({return_logprobs ? batch : 0, vocab_size}, opts.dtype(at::kFloat));
  if (batch == 0) return {tokens, logprob, row_logprobs, status};

  // c, then z, of every row; rows padded to whole float4s.
  auto work = at::empty({batch, (vocab_size + 3) / 4 * 4}, opts.dtype(at::kFloat));
  const OpTensors t{knowledge, tuned,  reference,   seeds,  positions, reward_weights,
                    temperature, weight_top_p, top_k, top_p, vocab_size, work,
                    tokens, logprob, row_logprobs, status, return_logprobs};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, tuned.scalar_type(), "eft_sample_cuda",
                                  [&] { launch_eft_sample<scalar_t>(t, batch); });
  return {tokens, logprob, row_logprobs, status};
}

}  // namespace eft_fast

TORCH_LIBRARY_IMPL(eft_fast, CUDA, m) { m.impl("eft_sample", &eft_fast::eft_sample_cuda); }
