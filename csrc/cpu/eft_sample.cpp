// CPU implementation of eft_fast::eft_sample (DESIGN.md sections 2-3).
//
// Per row, a fixed number of passes over the vocabulary, each over fp32 scratch that stays
// in cache:
//   1. read the logits once: online log-sum-exp of x_K, x_R0 and the unnormalised small
//      policy c, and keep c and d = x_K - x_R0 in scratch;
//   2. (weight_top_p < 1) the top-p truncation threshold of exp(s), by radix select over
//      order-preserving keys (no sort);
//   3. z = s + [s in S] (d - lse_K + lse_R0) and its log-sum-exp;
//   4. (top_k / top_p) thresholds on z, again by radix select;
//   5. Gumbel-max over the allowed tokens; tokens that cannot win skip the Philox call.
// The vocabulary is cut into fixed chunks whose partial results are merged in chunk order,
// so the result does not depend on the thread count. Rows run in parallel; when there are
// fewer rows than threads, the chunks of one row run in parallel instead.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <vector>

#include "../eft_math.h"
#include "../op_checks.h"

namespace eft_fast {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kChunk = 8192;  // vocabulary chunk: the unit of parallel work and of merging

// Radix select digits over the 32-bit keys: 11 + 11 + 10 bits.
constexpr int kDigitBits[3] = {11, 11, 10};
constexpr int kDigitShift[3] = {21, 10, 0};
constexpr int kMaxBuckets = 2048;

template <typename F>
void for_each_chunk(int64_t num_chunks, bool parallel, const F& fn) {
  if (parallel && num_chunks > 1) {
    at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) fn(i);
    });
  } else {
    for (int64_t i = 0; i < num_chunks; ++i) fn(i);
  }
}

OnlineLse chunk_lse(const float* x, int64_t n) {
  OnlineLse out;
  const float mx = at::vec::reduce_all<float>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, x, n);
  if (mx == -INFINITY) return out;
  out.max = mx;
  out.sum = at::vec::map_reduce_all<float>([mx](Vec v) { return (v - Vec(mx)).exp(); },
                                           [](Vec a, Vec b) { return a + b; }, x, n);
  return out;
}

// Pointers and strides of one row's inputs, read as T (float, BFloat16 or Half).
template <typename T>
struct RowInputs {
  const T* knowledge;  // nullptr in draft mode
  const T* tuned;      // tuned model r at tuned + r * tuned_model_stride
  int64_t tuned_model_stride;
  const T* reference;  // nullptr in draft mode without reference
  int64_t reference_model_stride;  // 0 when the reference is shared
  const float* beta;   // [R]
  int num_tuned;
};

struct RowResult {
  int64_t token = -1;
  float logprob = NAN;
  int32_t status = kRowOk;
};

// Weighted radix select: the largest key k with sum_{key_j >= k} w_j >= target, over the
// items whose key is >= floor_key. Returns 0 when the total weight is below the target.
class RadixSelect {
 public:
  explicit RadixSelect(int64_t vocab) : vocab_(vocab) {
    num_chunks_ = (vocab + kChunk - 1) / kChunk;
    hist_.resize(num_chunks_ * kMaxBuckets);
    candidates_.resize(num_chunks_);
  }

  // keys[j], weights[j] for j < vocab (weights may be nullptr: every weight is 1).
  uint32_t select(const uint32_t* keys, const float* weights, float target, uint32_t floor_key,
                  bool parallel) {
    // Level 0 over the whole row, into per-chunk histograms merged in chunk order.
    const int bits0 = kDigitBits[0], shift0 = kDigitShift[0];
    for_each_chunk(num_chunks_, parallel, [&](int64_t c) {
      float* h = &hist_[c * kMaxBuckets];
      std::fill(h, h + (1 << bits0), 0.0f);
      const int64_t begin = c * kChunk, end = std::min(vocab_, begin + kChunk);
      for (int64_t j = begin; j < end; ++j) {
        if (keys[j] < floor_key) continue;
        h[keys[j] >> shift0] += weights ? weights[j] : 1.0f;
      }
    });
    std::array<float, kMaxBuckets> merged{};
    for (int64_t c = 0; c < num_chunks_; ++c) {
      const float* h = &hist_[c * kMaxBuckets];
      for (int b = 0; b < (1 << bits0); ++b) merged[b] += h[b];
    }
    int bucket = 0;
    if (!scan(merged.data(), 1 << bits0, &target, &bucket)) return 0;
    uint32_t prefix = static_cast<uint32_t>(bucket) << shift0;

    // The remaining levels only look at the items of the chosen bucket.
    for_each_chunk(num_chunks_, parallel, [&](int64_t c) {
      auto& cand = candidates_[c];
      cand.clear();
      const int64_t begin = c * kChunk, end = std::min(vocab_, begin + kChunk);
      for (int64_t j = begin; j < end; ++j) {
        if (keys[j] >= floor_key && (keys[j] >> shift0) == static_cast<uint32_t>(bucket)) {
          cand.push_back(j);
        }
      }
    });
    for (int level = 1; level < 3; ++level) {
      const int bits = kDigitBits[level], shift = kDigitShift[level];
      const uint32_t high_mask = ~((uint32_t{1} << (shift + bits)) - 1u);
      std::fill(merged.begin(), merged.begin() + (1 << bits), 0.0f);
      for (const auto& cand : candidates_) {
        for (const int64_t j : cand) {
          if ((keys[j] & high_mask) != prefix) continue;
          merged[(keys[j] >> shift) & ((1u << bits) - 1u)] += weights ? weights[j] : 1.0f;
        }
      }
      if (!scan(merged.data(), 1 << bits, &target, &bucket)) {
        // Rounding left the bucket short of the target: keep all of it.
        return prefix;
      }
      prefix |= static_cast<uint32_t>(bucket) << shift;
    }
    return prefix;
  }

 private:
  // Finds the highest bucket where the mass from the top reaches *target; updates *target
  // to what the chosen bucket must still supply.
  static bool scan(const float* hist, int num_buckets, float* target, int* bucket) {
    float above = 0.0f;
    for (int b = num_buckets - 1; b >= 0; --b) {
      if (above + hist[b] >= *target) {
        *target -= above;
        *bucket = b;
        return true;
      }
      above += hist[b];
    }
    return false;
  }

  int64_t vocab_;
  int64_t num_chunks_;
  std::vector<float> hist_;
  std::vector<std::vector<int64_t>> candidates_;
};

struct Scratch {
  std::vector<float> c;   // c, then s's successor z
  std::vector<float> d;   // x_K - x_R0
  std::vector<float> w;   // weights for radix select
  std::vector<uint32_t> key;
  RadixSelect radix;
  explicit Scratch(int64_t vocab) : c(vocab), d(vocab), w(vocab), key(vocab), radix(vocab) {}
};

struct RowParams {
  uint64_t seed;
  uint32_t position;
  float temperature, weight_top_p, top_p;
  int64_t top_k;
};

template <typename T>
RowResult sample_row(const RowInputs<T>& in, const RowParams& p, int64_t vocab, bool parallel,
                     Scratch& scratch, float* row_logprobs) {
  RowResult result;
  const int64_t num_chunks = (vocab + kChunk - 1) / kChunk;
  float* c = scratch.c.data();
  float* d = scratch.d.data();
  const bool has_knowledge = in.knowledge != nullptr;

  // Pass 1: logits -> c, d and the three log-sum-exps.
  struct Pass1 { OnlineLse k, r0, c; bool bad = false; };
  std::vector<Pass1> part1(num_chunks);
  for_each_chunk(num_chunks, parallel, [&](int64_t chunk) {
    const int64_t begin = chunk * kChunk, n = std::min(vocab, begin + kChunk) - begin;
    Pass1& out = part1[chunk];
    int bad = 0;
    for (int64_t j = begin; j < begin + n; ++j) {
      const float ref0 = in.reference ? static_cast<float>(in.reference[j]) : 0.0f;
      bool masked = false;
      c[j] = small_policy_logit(
          in.num_tuned, ref0,
          [&](int r) { return static_cast<float>(in.tuned[r * in.tuned_model_stride + j]); },
          [&](int r) { return in.reference ? static_cast<float>(in.reference[r * in.reference_model_stride + j]) : 0.0f; },
          [&](int r) { return in.beta[r]; }, &masked);
      bad |= !(ref0 < INFINITY);
      for (int r = 0; r < in.num_tuned; ++r) {
        bad |= !(static_cast<float>(in.tuned[r * in.tuned_model_stride + j]) < INFINITY);
        if (in.reference) bad |= !(static_cast<float>(in.reference[r * in.reference_model_stride + j]) < INFINITY);
      }
      if (has_knowledge) {
        const float xk = static_cast<float>(in.knowledge[j]);
        bad |= !(xk < INFINITY);
        d[j] = xk;
      }
    }
    out.bad = bad != 0;
    if (out.bad) return;
    out.c = chunk_lse(c + begin, n);
    if (has_knowledge) {
      out.k = chunk_lse(d + begin, n);
      if (in.reference) {
        // lse of x_R0 (staged in w, free until pass 2), then d = x_K - x_R0 in place. d is
        // only read where s is finite, i.e. where x_R0 is finite.
        float* ref_row = scratch.w.data() + begin;
        for (int64_t j = 0; j < n; ++j) ref_row[j] = static_cast<float>(in.reference[begin + j]);
        out.r0 = chunk_lse(ref_row, n);
        for (int64_t j = 0; j < n; ++j) d[begin + j] -= ref_row[j];
      }
    }
  });
  OnlineLse lse_k, lse_r0, lse_c;
  for (const auto& part : part1) {
    if (part.bad) { result.status = kRowNaN; return result; }
    lse_k.merge(part.k);
    lse_r0.merge(part.r0);
    lse_c.merge(part.c);
  }
  const float log_z_c = lse_c.value();
  if (log_z_c == -INFINITY) { result.status = kRowNoToken; return result; }

  RadixSelect& radix = scratch.radix;
  uint32_t* key = scratch.key.data();
  float* w = scratch.w.data();

  // Pass 2: the truncation set S = {key(s_j) >= s_key} at mass weight_top_p.
  uint32_t s_key = 0;
  if (has_knowledge && p.weight_top_p < 1.0f) {
    for_each_chunk(num_chunks, parallel, [&](int64_t chunk) {
      const int64_t begin = chunk * kChunk, end = std::min(vocab, begin + kChunk);
      for (int64_t j = begin; j < end; ++j) {
        const float s = c[j] - log_z_c;
        key[j] = order_key(s);
        w[j] = s;
      }
      at::vec::map([](Vec v) { return v.exp(); }, w + begin, w + begin, end - begin);
    });
    s_key = radix.select(key, w, p.weight_top_p, 0u, parallel);
  }

  // Pass 3: z and its log-sum-exp (z overwrites c).
  const float weight_shift = lse_r0.value() - lse_k.value();
  std::vector<OnlineLse> part3(num_chunks);
  for_each_chunk(num_chunks, parallel, [&](int64_t chunk) {
    const int64_t begin = chunk * kChunk, end = std::min(vocab, begin + kChunk);
    for (int64_t j = begin; j < end; ++j) {
      const float s = c[j] - log_z_c;  // -inf stays -inf
      if (!has_knowledge || s == -INFINITY) {
        c[j] = s;
      } else if (order_key(s) >= s_key) {
        c[j] = d[j] == -INFINITY ? -INFINITY : s + (d[j] + weight_shift);
      } else {
        c[j] = s;
      }
    }
    part3[chunk] = chunk_lse(c + begin, end - begin);
  });
  OnlineLse lse_z;
  for (const auto& part : part3) lse_z.merge(part);
  const float log_z_z = lse_z.value();
  const float* z = c;
  if (row_logprobs != nullptr) {
    for_each_chunk(num_chunks, parallel, [&](int64_t chunk) {
      const int64_t begin = chunk * kChunk, end = std::min(vocab, begin + kChunk);
      for (int64_t j = begin; j < end; ++j) row_logprobs[j] = z[j] - log_z_z;
    });
  }
  if (log_z_z == -INFINITY) { result.status = kRowNoToken; return result; }

  const bool greedy = p.temperature == 0.0f;
  const bool top_k_on = !greedy && p.top_k > 0 && p.top_k < vocab;
  const bool top_p_on = !greedy && p.top_p < 1.0f;

  // Filters: allowed = {key(z_j) >= allowed_key}; key(-inf) is below every finite key.
  uint32_t allowed_key = order_key(-INFINITY) + 1u;
  if (top_k_on || top_p_on) {
    for_each_chunk(num_chunks, parallel, [&](int64_t chunk) {
      const int64_t begin = chunk * kChunk, end = std::min(vocab, begin + kChunk);
      for (int64_t j = begin; j < end; ++j) key[j] = order_key(z[j]);
    });
  }
  if (top_k_on) {
    allowed_key = std::max(allowed_key, radix.select(key, nullptr, static_cast<float>(p.top_k), 0u, parallel));
  }
  if (top_p_on) {
    const float z_max = lse_z.max;
    const float inv_t = 1.0f / p.temperature;
    std::vector<float> part_mass(num_chunks);
    for_each_chunk(num_chunks, parallel, [&](int64_t chunk) {
      const int64_t begin = chunk * kChunk, end = std::min(vocab, begin + kChunk);
      float mass = 0.0f;
      for (int64_t j = begin; j < end; ++j) {
        w[j] = key[j] >= allowed_key ? expf((z[j] - z_max) * inv_t) : 0.0f;
        mass += w[j];
      }
      part_mass[chunk] = mass;
    });
    float total = 0.0f;
    for (const float m : part_mass) total += m;
    allowed_key = std::max(allowed_key, radix.select(key, w, p.top_p * total, allowed_key, parallel));
  }

  // Pass 5: Gumbel-max (or argmax) over the allowed tokens; ties go to the lowest index.
  struct Best { float value = -INFINITY; int64_t token = -1; };
  std::vector<Best> part5(num_chunks);
  for_each_chunk(num_chunks, parallel, [&](int64_t chunk) {
    const int64_t begin = chunk * kChunk, end = std::min(vocab, begin + kChunk);
    Best best;
    for (int64_t j = begin; j < end; ++j) {
      const float zj = z[j];
      if (zj == -INFINITY) continue;
      float value;
      if (greedy) {
        value = zj;
      } else {
        if (order_key(zj) < allowed_key) continue;
        const float scaled = zj / p.temperature;
        if (scaled + kGumbelMax < best.value) continue;  // cannot win: skip the noise
        value = scaled + gumbel_noise(p.seed, static_cast<uint32_t>(j), p.position);
      }
      if (value > best.value || best.token < 0) {
        best.value = value;
        best.token = j;
      }
    }
    part5[chunk] = best;
  });
  Best best;
  for (const auto& part : part5) {
    if (part.token >= 0 && (best.token < 0 || part.value > best.value)) best = part;
  }
  if (best.token < 0) { result.status = kRowNoToken; return result; }
  result.token = best.token;
  result.logprob = z[best.token] - log_z_z;
  return result;
}

void check_logits(const char* name, const at::Tensor& t, int64_t dims, int64_t batch, int64_t vocab) {
  TORCH_CHECK_VALUE(t.dim() == dims, name, " must have ", dims, " dims, got ", t.sizes());
  TORCH_CHECK_VALUE(t.size(dims - 2) == batch, name, " must have batch size ", batch, ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.size(-1) >= vocab, name, " is narrower (", t.size(-1), ") than vocab_size ", vocab);
  TORCH_CHECK_VALUE(t.stride(-1) == 1, name, " must be contiguous in its last dim");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> eft_sample_cpu(
    const std::optional<at::Tensor>& knowledge, const at::Tensor& tuned,
    const std::optional<at::Tensor>& reference, const at::Tensor& seeds, const at::Tensor& positions,
    const at::Tensor& reward_weights, const at::Tensor& temperature, const at::Tensor& weight_top_p,
    const at::Tensor& top_k, const at::Tensor& top_p, int64_t vocab_size, bool return_logprobs) {
  check_seeds_positions(seeds, positions, vocab_size);
  const int64_t batch = seeds.size(0);
  check_logits("tuned", tuned, 3, batch, vocab_size);
  const int num_tuned = static_cast<int>(tuned.size(0));
  const auto dtype = tuned.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                   "logits must be float32, bfloat16 or float16, got ", dtype);
  if (knowledge) {
    check_logits("knowledge", *knowledge, 2, batch, vocab_size);
    TORCH_CHECK_TYPE(knowledge->scalar_type() == dtype, "knowledge dtype ", knowledge->scalar_type(),
                     " differs from tuned dtype ", dtype);
    TORCH_CHECK_VALUE(reference.has_value(), "reference is required when knowledge is given");
  }
  if (reference) {
    check_logits("reference", *reference, 3, batch, vocab_size);
    TORCH_CHECK_VALUE(reference->size(0) == 1 || reference->size(0) == num_tuned,
                      "reference must hold 1 or ", num_tuned, " models, got ", reference->size(0));
    TORCH_CHECK_TYPE(reference->scalar_type() == dtype, "reference dtype ", reference->scalar_type(),
                     " differs from tuned dtype ", dtype);
  }
  auto check_row_param = [&](const char* name, const at::Tensor& t, at::ScalarType type) {
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == batch && t.scalar_type() == type, name,
                      " must be a [", batch, "] ", type, " tensor, got ", t.sizes(), " ", t.scalar_type());
  };
  check_row_param("temperature", temperature, at::kFloat);
  check_row_param("weight_top_p", weight_top_p, at::kFloat);
  check_row_param("top_p", top_p, at::kFloat);
  check_row_param("top_k", top_k, at::kLong);
  TORCH_CHECK_VALUE(reward_weights.dim() == 2 && reward_weights.size(0) == batch &&
                        reward_weights.size(1) == num_tuned && reward_weights.scalar_type() == at::kFloat,
                    "reward_weights must be a [", batch, ", ", num_tuned, "] float32 tensor, got ",
                    reward_weights.sizes());

  const auto opts = seeds.options();
  auto tokens = at::empty({batch}, opts.dtype(at::kLong));
  auto logprob = at::empty({batch}, opts.dtype(at::kFloat));
  auto status = at::empty({batch}, opts.dtype(at::kInt));
  auto row_logprobs = at::empty({return_logprobs ? batch : 0, vocab_size}, opts.dtype(at::kFloat));
  if (batch == 0) return {tokens, logprob, row_logprobs, status};

  const auto seeds_c = seeds.contiguous(), positions_c = positions.contiguous();
  const auto weights_c = reward_weights.contiguous();
  const auto temp_c = temperature.contiguous(), wtp_c = weight_top_p.contiguous();
  const auto top_k_c = top_k.contiguous(), top_p_c = top_p.contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "eft_sample_cpu", [&] {
    auto make_row = [&](int64_t b) {
      RowInputs<scalar_t> in;
      in.knowledge = knowledge ? knowledge->const_data_ptr<scalar_t>() + b * knowledge->stride(0) : nullptr;
      in.tuned = tuned.const_data_ptr<scalar_t>() + b * tuned.stride(1);
      in.tuned_model_stride = tuned.stride(0);
      in.reference = reference ? reference->const_data_ptr<scalar_t>() + b * reference->stride(1) : nullptr;
      in.reference_model_stride = reference && reference->size(0) > 1 ? reference->stride(0) : 0;
      in.beta = weights_c.const_data_ptr<float>() + b * num_tuned;
      in.num_tuned = num_tuned;
      RowParams p;
      p.seed = static_cast<uint64_t>(seeds_c.const_data_ptr<int64_t>()[b]);
      p.position = static_cast<uint32_t>(positions_c.const_data_ptr<int64_t>()[b]);
      p.temperature = temp_c.const_data_ptr<float>()[b];
      p.weight_top_p = wtp_c.const_data_ptr<float>()[b];
      p.top_k = top_k_c.const_data_ptr<int64_t>()[b];
      p.top_p = top_p_c.const_data_ptr<float>()[b];
      return std::make_pair(in, p);
    };
    auto run_row = [&](int64_t b, bool parallel, Scratch& scratch) {
      auto [in, p] = make_row(b);
      float* rows = return_logprobs ? row_logprobs.data_ptr<float>() + b * vocab_size : nullptr;
      const RowResult r = sample_row(in, p, vocab_size, parallel, scratch, rows);
      tokens.data_ptr<int64_t>()[b] = r.token;
      logprob.data_ptr<float>()[b] = r.logprob;
      status.data_ptr<int32_t>()[b] = r.status;
    };
    const int64_t threads = at::get_num_threads();
    if (batch >= threads || vocab_size <= kChunk) {
      at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
        Scratch scratch(vocab_size);
        for (int64_t b = begin; b < end; ++b) run_row(b, /*parallel=*/false, scratch);
      });
    } else {
      Scratch scratch(vocab_size);
      for (int64_t b = 0; b < batch; ++b) run_row(b, /*parallel=*/true, scratch);
    }
  });
  return {tokens, logprob, row_logprobs, status};
}

}  // namespace eft_fast

TORCH_LIBRARY_IMPL(eft_fast, CPU, m) { m.impl("eft_sample", &eft_fast::eft_sample_cpu); }
