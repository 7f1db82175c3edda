// CPU kernel of eft_fast::eft_sample (docs/DESIGN.md sections 2-3).
//
// This file is compiled once per instruction set (see CMakeLists.txt): EFT_CPU_NS names the
// namespace of each copy and CPU_CAPABILITY_* selects at::vec's vector width.
// csrc/cpu/eft_sample.cpp checks the inputs and picks the copy the processor supports.
//
// Per row, the logits are read once, chunk by chunk (pass1.h): c (or f = c + d), the
// maxima and the sums of exponentials the row needs, while the next chunk is prefetched.
// What follows depends on what the row asks for:
//   - no weight truncation, no top-k / top-p, no full row of log-probs (the common case):
//     z = c + d up to a constant of the row, so each chunk is sampled (Gumbel-max, or argmax
//     when greedy) as soon as pass 1 has it, while it is in cache: one pass;
//   - weight truncation (weight_top_p < 1): pass 1 also keeps the tokens above a floor under
//     the truncation threshold as candidates; truncate_row finds the threshold by a
//     weighted selection among them (threshold_select.h) and lists the truncation set S;
//     pass 2 samples S from its list and the other tokens from c alone;
//   - top-k / top-p or the full row: z is formed for every token (Scores) and the filters'
//     thresholds come from a radix select over order-preserving keys.
// Gumbel-max (gumbel_max.h) takes the Philox words only of tokens within the noise's range
// of the best value so far, and logarithms only of the few a per-word bound cannot rule out.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include "../eft_math.h"
#include "eft_sample_cpu.h"
#include "gumbel_max.h"
#include "kernel_vec.h"
#include "pass1.h"
#include "threshold_select.h"

namespace eft_fast {
namespace EFT_CPU_NS {
namespace {

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

inline float log_add_exp(float a, float b) {
  const float m = std::max(a, b);
  if (m == -INFINITY) return -INFINITY;
  return m + std::log(std::exp(a - m) + std::exp(b - m));
}

// The log-sum-exp of value(j), j in [begin, end), -inf masked: the maximum first, then the
// sum relative to it, so the largest term is 1 and only terms negligible next to it can
// underflow, whatever the gaps. vec_value(j) gives lanes j .. j + Vec::size() - 1 with the
// same operations.
template <typename VecValue, typename Value>
OnlineLse log_sum_exp_of(int64_t begin, int64_t end, const VecValue& vec_value, const Value& value) {
  constexpr int kW = Vec::size();
  Vec max_lanes(-INFINITY);
  int64_t j = begin;
  for (; j + kW <= end; j += kW) max_lanes = max_v(max_lanes, vec_value(j));
  float m = horizontal_max(max_lanes, -INFINITY);
  for (; j < end; ++j) m = std::max(m, value(j));
  if (m == -INFINITY) return OnlineLse{};
  Vec sum_lanes(0.0f);
  for (j = begin; j + kW <= end; j += kW) sum_lanes = sum_lanes + exp_nonpositive(vec_value(j) - Vec(m));
  float sum = horizontal_sum(sum_lanes);
  for (; j < end; ++j) sum += std::exp(value(j) - m);
  return OnlineLse{m, sum};
}

template <typename U>
using Buffer = std::unique_ptr<U[]>;

struct Scratch {
  int64_t vocab;
  Buffer<float> c, d;  // pass 1: c (or f) and d = x_K - x_R0; c becomes z when the filters need it
  Buffer<float> w;     // weights of the filters' radix select
  Buffer<uint32_t> key;
  // Truncation candidates (token, c, d), chunk k's from k * kChunkRoom on, their weights,
  // the working copies of the threshold selection, and the members of S (token, c, d).
  Buffer<int32_t> cand_token, set_token;
  Buffer<float> cand_c, cand_d, cand_w, select_v, select_w, set_c, set_d;
  std::unique_ptr<RadixSelect> radix_;
  explicit Scratch(int64_t v)
      : vocab(v), c(std::make_unique_for_overwrite<float[]>(v)), d(std::make_unique_for_overwrite<float[]>(v)) {}
  RadixSelect& radix() {
    if (!radix_) {
      radix_ = std::make_unique<RadixSelect>(vocab);
      w = std::make_unique_for_overwrite<float[]>(vocab);
      key = std::make_unique_for_overwrite<uint32_t[]>(vocab);
    }
    return *radix_;
  }
  void need_candidates() {
    if (cand_token) return;
    const int64_t room = (vocab + kChunk - 1) / kChunk * kChunkRoom;
    cand_token = std::make_unique_for_overwrite<int32_t[]>(room);
    set_token = std::make_unique_for_overwrite<int32_t[]>(room);
    for (auto* b : {&cand_c, &cand_d, &cand_w, &select_v, &select_w, &set_c, &set_d}) {
      *b = std::make_unique_for_overwrite<float[]>(room);
    }
  }
};

// The calling thread's scratch, kept from call to call: a few MB per thread, allocated once
// rather than faulted in on every call.
Scratch& thread_scratch(int64_t vocab) {
  thread_local std::unique_ptr<Scratch> scratch;
  if (!scratch || scratch->vocab != vocab) scratch = std::make_unique<Scratch>(vocab);
  return *scratch;
}

// The truncation set S = {c_j >= tau} (weight_top_p < 1), its members, and the two parts
// of sum_j exp(z_j) it splits the row into.
struct Truncation {
  float tau = -INFINITY;            // S = {c_j >= tau}
  float log_mass_in = -INFINITY;   // log sum_{j in S} exp(c_j + d_j)
  // log sum_{j not in S} exp(c_j), from sums relative to c_max: see mass_out_may_be_lost.
  float log_mass_out = -INFINITY;
  // The tokens of largest score on each side: max c + d in S, max c outside (-1: none found).
  int64_t top_in = -1, top_out = -1;
  // The members of S in token order, (token, c, d) at set_token[i], set_c[i], set_d[i].
  const int32_t* set_token = nullptr;
  const float* set_c = nullptr;
  const float* set_d = nullptr;
  int64_t set_size = 0;
};

// tau is the largest c value such that the tokens with c_j >= tau hold at least
// weight_top_p of the mass sum_j exp(c_j) (ties inclusive). Only pass 1's candidates can
// reach it: every other token lies below its chunk's floor, which is below tau. Of the
// candidates, the selection only needs those at or above the floor of the whole row.
Truncation truncate_row(const std::vector<Pass1Result>& part1, Scratch& sc, const OnlineLse& lse_c,
                        float weight_top_p, float cand_offset) {
  constexpr int kW = Vec::size();
  const int64_t num_chunks = static_cast<int64_t>(part1.size());
  const float c_max = lse_c.max;
  const Vec origin(c_max);
  float total = 0.0f, below = 0.0f;
  for (const Pass1Result& part : part1) {
    if (part.c.max == -INFINITY) continue;
    const float scale = std::exp(part.c.max - c_max);
    total += part.c.sum * scale;
    below += part.below * scale;
  }
  // The weights exp(c - c_max) of the candidates; those at or above the row's floor go to
  // the selection arrays. Exactly, no chunk's floor is above the row's (the log-sum-exp of
  // the chunks before is at most the row's); taking their maximum keeps that true under
  // rounding, so every token at or above tau is a candidate.
  float row_floor = candidate_floor(-INFINITY, lse_c.value(), cand_offset);
  for (const Pass1Result& part : part1) row_floor = std::max(row_floor, part.cand_floor);
  float* select_v = sc.select_v.get();
  float* select_w = sc.select_w.get();
  int64_t n_select = 0;
  for (int64_t ch = 0; ch < num_chunks; ++ch) {
    const float* cc = sc.cand_c.get() + ch * kChunkRoom;
    float* cw = sc.cand_w.get() + ch * kChunkRoom;
    const int64_t n = part1[ch].num_cand;
    int64_t i = 0;
    for (; i + kW <= n; i += kW) {
      const Vec c = Vec::loadu(cc + i);
      const Vec w = exp_nonpositive(c - origin);
      w.store(cw + i);
      const Mask keep = ge(c, Vec(row_floor));
      compress_store(keep, w, select_w + n_select);
      n_select += compress_store(keep, c, select_v + n_select);
    }
    for (; i < n; ++i) {
      cw[i] = std::exp(cc[i] - c_max);
      if (cc[i] >= row_floor) {
        select_w[n_select] = cw[i];
        select_v[n_select++] = cc[i];
      }
    }
  }
  // Exactly, the tokens at or above the row's floor hold more than the target; if rounding
  // leaves them short (weight_top_p next to 1), they are all in S.
  const float target = weight_top_p * total;
  const float select_mass = at::vec::reduce_all<float>([](Vec a, Vec b) { return a + b; }, select_w, n_select);
  Truncation t;
  t.tau = select_mass >= target ? select_threshold(select_v, select_w, n_select, target, 0.0f) : row_floor;
  // Over the candidates: the mass below tau joins the mass outside S (with the tokens below
  // the floors); the members of S are listed as (token, c, d).
  const Vec tau(t.tau);
  int32_t* set_token = sc.set_token.get();
  float* set_c = sc.set_c.get();
  float* set_d = sc.set_d.get();
  int64_t n_in = 0;
  Vec out_v(0.0f), out_max_v(-INFINITY);
  float out = below, out_max = -INFINITY;
  for (int64_t ch = 0; ch < num_chunks; ++ch) {
    const int64_t base = ch * kChunkRoom;
    const float *cc = sc.cand_c.get() + base, *cd = sc.cand_d.get() + base, *cw = sc.cand_w.get() + base;
    const int32_t* ct = sc.cand_token.get() + base;
    const int64_t n = part1[ch].num_cand;
    int64_t i = 0;
    for (; i + kW <= n; i += kW) {
      const Vec c = Vec::loadu(cc + i);
      const Mask in = ge(c, tau);
      out_v = out_v + select(in, Vec(0.0f), Vec::loadu(cw + i));
      out_max_v = max_v(out_max_v, select(in, Vec(-INFINITY), c));
      if (mask_bits(in) == 0) continue;
      compress_store_i32(in, ct + i, set_token + n_in);
      compress_store(in, Vec::loadu(cd + i), set_d + n_in);
      n_in += compress_store(in, c, set_c + n_in);
    }
    for (; i < n; ++i) {
      if (cc[i] >= t.tau) {
        set_token[n_in] = ct[i];
        set_d[n_in] = cd[i];
        set_c[n_in++] = cc[i];
      } else {
        out += cw[i];
        out_max = std::max(out_max, cc[i]);
      }
    }
  }
  out += horizontal_sum(out_v);
  out_max = horizontal_max(out_max_v, out_max);
  // out is 0 when there is no token outside S, or when every one underflowed; the caller
  // tells the two apart (mass_out_may_be_lost).
  t.log_mass_out = out > 0.0f ? c_max + std::log(out) : -INFINITY;
  t.set_token = set_token;
  t.set_c = set_c;
  t.set_d = set_d;
  t.set_size = n_in;
  // The top outside S: the first candidate at out_max (below tau, so outside S).
  for (int64_t ch = 0; ch < num_chunks && out_max != -INFINITY && t.top_out < 0; ++ch) {
    const int64_t base = ch * kChunkRoom;
    const float* cc = sc.cand_c.get() + base;
    const int64_t k = first_equal(0, part1[ch].num_cand, out_max, [&](int64_t i) { return Vec::loadu(cc + i); },
                                  [&](int64_t i) { return cc[i]; });
    if (k >= 0) t.top_out = sc.cand_token[base + k];
  }
  // The mass of S, sum exp(c + d), and its top.
  auto cd_at = [&](int64_t i) { return set_c[i] + set_d[i]; };
  auto cd_vec = [&](int64_t i) { return Vec::loadu(set_c + i) + Vec::loadu(set_d + i); };
  const OnlineLse in = log_sum_exp_of(0, n_in, cd_vec, cd_at);
  t.log_mass_in = in.value();
  if (in.max != -INFINITY) t.top_in = set_token[first_equal(0, n_in, in.max, cd_vec, cd_at)];
  return t;
}

// truncate_row sums the mass outside S from exponentials relative to c_max (the candidates)
// or to a chunk's maximum of c rescaled to c_max (the tokens below the floors), never to the
// maximum of the tokens outside S, which can lie any distance below c_max (S may be one
// token that holds nearly all of exp(c)). Each term, and each chunk's rescaled sum, more than
// kExpRange below c_max may be lost: at most 2 vocab e^(c_max - kExpRange) in all. That is
// below fp32 resolution of the row's total mass of exp(z) (exp(log_total), in the units of
// c) unless log_total is within log(2^24) of that bound: unless the tokens outside S lie some
// 60 nats or more below c_max and the knowledge model leaves S little mass of z. Only then
// is the sum redone from c (log_mass_outside), once per row; the pass 1 loops are unchanged.
inline bool mass_out_may_be_lost(float log_total, float c_max, int64_t vocab) {
  constexpr float kFloatResolution = 17.0f;  // > log(2^24)
  const float log_lost = c_max - kExpRange + std::log(2.0f * static_cast<float>(vocab));
  return !(log_total >= log_lost + kFloatResolution);
}

// log sum_{j not in S} exp(c_j) = log sum_{c_j < tau} exp(c_j), each chunk summed relative to
// its own maximum outside S and the chunks merged by OnlineLse: exact whatever the gaps.
float log_mass_outside(const float* c, int64_t vocab, float tau, bool parallel) {
  const int64_t num_chunks = (vocab + kChunk - 1) / kChunk;
  auto outside_vec = [&](int64_t j) {
    const Vec cv = Vec::loadu(c + j);
    return select(ge(cv, Vec(tau)), Vec(-INFINITY), cv);
  };
  auto outside_at = [&](int64_t j) { return c[j] >= tau ? -INFINITY : c[j]; };
  std::vector<OnlineLse> part(num_chunks);
  for_each_chunk(num_chunks, parallel, [&](int64_t chunk) {
    const int64_t begin = chunk * kChunk, end = std::min(vocab, begin + kChunk);
    part[chunk] = log_sum_exp_of(begin, end, outside_vec, outside_at);
  });
  OnlineLse total;
  for (const OnlineLse& p : part) total.merge(p);
  return total.value();
}

struct RowParams {
  uint64_t seed;
  uint32_t position;
  float temperature, weight_top_p, top_p;
  int64_t top_k;
};

// The first token whose value equals the row maximum `target`, searched in the chunks whose
// maximum (chunk_max(k)) it is; -1 if the maximum is -inf.
template <typename ChunkMax, typename VecValue, typename Value>
int64_t first_at_max(int64_t vocab, float target, const ChunkMax& chunk_max, const VecValue& vec_value,
                     const Value& value) {
  if (target == -INFINITY) return -1;
  const int64_t num_chunks = (vocab + kChunk - 1) / kChunk;
  for (int64_t ch = 0; ch < num_chunks; ++ch) {
    if (chunk_max(ch) != target) continue;
    const int64_t j = first_equal(ch * kChunk, std::min(vocab, (ch + 1) * kChunk), target, vec_value, value);
    if (j >= 0) return j;
  }
  return -1;
}

// The threshold that allows every token with a finite score (no filters).
inline float every_finite_score() { return threshold_from_key(order_key(-INFINITY) + 1u); }

// A lower bound of the winning value: the noisy value of a token known to be allowed,
// lowered by a margin that covers the rounding difference between this scalar noise and
// the vector noise of the same token.
inline float noisy_value_floor(float z, int64_t token, const RowParams& p) {
  const float v = z / p.temperature + gumbel_noise(p.seed, static_cast<uint32_t>(token), p.position);
  return v - 1e-3f * std::max(1.0f, std::fabs(v));
}

// The best such bound from a few high-scoring tokens (-1: none), scored by score_at;
// -inf when greedy or when none is allowed.
template <typename ScoreAt>
float noise_floor_of(std::initializer_list<int64_t> tokens, const ScoreAt& score_at, float allowed,
                     const RowParams& p) {
  float floor = -INFINITY;
  for (const int64_t j : tokens) {
    if (p.temperature == 0.0f || j < 0) continue;
    const float zj = score_at(j);
    if (zj != -INFINITY && zj >= allowed) floor = std::max(floor, noisy_value_floor(zj, j, p));
  }
  return floor;
}

// Folds the sample of positions [0, n) of a score source into *best: argmax when greedy,
// else Gumbel-max over the scores >= allowed.
template <typename Source, typename Prefetch = NoPrefetch>
void sample_source(const Source& src, int64_t n, const RowParams& p, float allowed, float noise_floor, Best* best,
                   Prefetch&& prefetch = Prefetch{}) {
  if (p.temperature == 0.0f) {
    scores_argmax(src, n, best);
  } else {
    gumbel_argmax(src, n, p.temperature, allowed, noise_floor, p.seed, p.position, best,
                  std::forward<Prefetch>(prefetch));
  }
}

// Samples positions [0, n) of one chunk whose largest score is chunk_max into *best
// (single pass: z is known up to a constant of the row, and every token is allowed).
template <typename Source>
void sample_chunk(const Source& src, int64_t n, float chunk_max, const RowParams& p, Best* best, Prefetcher& prefetch) {
  if (chunk_max == -INFINITY) return;
  if (p.temperature == 0.0f) {
    if (best->token >= 0 && chunk_max < best->value) return;
    const int64_t token = src.token(first_at(src, n, chunk_max));
    if (best->beaten_by(chunk_max, token)) *best = Best{chunk_max, token};
    return;
  }
  // No token of the chunk can reach the best value.
  if (best->token >= 0 && chunk_max < gumbel_cutoff(best->value, p.temperature)) return;
  const int64_t top = src.token(first_at(src, n, chunk_max));
  sample_source(src, n, p, every_finite_score(), noisy_value_floor(chunk_max, top, p), best, prefetch);
}

// Pass 2 with truncation when z is not needed in memory: S from its list (SetScores), then
// the tokens outside it from c alone (OutsideSetScores); every token is allowed.
// high_tokens: tokens of high score whose noisy values bound the winner's from below.
template <typename T>
RowResult sample_set_and_rest(const RowInputs<T>& in, const RowParams& p, int64_t vocab, bool parallel,
                              const float* c, const Truncation& t, float log_z_c, float shift, float log_z_z,
                              std::initializer_list<int64_t> high_tokens) {
  RowResult result;
  // z of one token; d from the logits, with pass 1's subtraction.
  auto score_at = [&](int64_t j) {
    const float dj = static_cast<float>(in.knowledge[j]) - static_cast<float>(in.reference[j]);
    return eft_score(c[j] - log_z_c, c[j] >= t.tau, dj, shift);
  };
  const float allowed = every_finite_score();
  const float noise_floor = noise_floor_of(high_tokens, score_at, allowed, p);
  Best best;
  sample_source(SetScores{t.set_token, t.set_c, t.set_d, log_z_c, shift}, t.set_size, p, allowed, noise_floor, &best);
  const int64_t num_chunks = (vocab + kChunk - 1) / kChunk;
  std::vector<Best> part2(num_chunks, best);
  for_each_chunk(num_chunks, parallel, [&](int64_t chunk) {
    const int64_t begin = chunk * kChunk, n = std::min(vocab, begin + kChunk) - begin;
    sample_source(OutsideSetScores{{begin}, c + begin, log_z_c, t.tau}, n, p, allowed, noise_floor,
                  parallel ? &part2[chunk] : &best);
  });
  if (parallel) {
    for (const Best& b : part2) best.fold(b);
  }
  if (best.token < 0) {
    result.status = kRowNoToken;
    return result;
  }
  result.token = best.token;
  result.logprob = score_at(best.token) - log_z_z;
  return result;
}

template <typename T>
RowResult sample_row(const RowInputs<T>& in, const RowParams& p, int64_t vocab, bool parallel,
                     Scratch& scratch, float* row_logprobs) {
  RowResult result;
  const int64_t num_chunks = (vocab + kChunk - 1) / kChunk;
  float* c = scratch.c.get();
  float* d = scratch.d.get();
  const bool has_knowledge = in.knowledge != nullptr;
  const bool greedy = p.temperature == 0.0f;
  const bool top_k_on = !greedy && p.top_k > 0 && p.top_k < vocab;
  const bool top_p_on = !greedy && p.top_p < 1.0f;
  const bool filters = top_k_on || top_p_on;
  const bool truncate = has_knowledge && p.weight_top_p < 1.0f;
  // The filters and the full log softmax(z) row need z of every token in memory. Without
  // them, and without truncation, z is known up to a constant of the row as soon as pass 1
  // has a chunk, which is then sampled while it is in cache (single pass); with truncation,
  // pass 2 samples S from its list and reads only c for the tokens outside it.
  const bool z_row = filters || row_logprobs != nullptr;
  const bool single_pass = !truncate && !z_row;
  const bool set_list = truncate && !z_row;
  // d is kept when the z row or the parallel candidate split needs it.
  const Pass1Store store = single_pass ? Pass1Store::kScore
                                       : (set_list && !parallel ? Pass1Store::kC : Pass1Store::kCAndD);
  if (truncate) scratch.need_candidates();
  // Tokens below max(c) + log((1 - weight_top_p) / V) hold less than 1 - weight_top_p of
  // the mass (each weighs less than (1 - weight_top_p) / V of the max token), so the
  // threshold is above them (candidate_floor adds a margin for rounding).
  const float cand_offset = truncate
      ? static_cast<float>(std::log((1.0 - static_cast<double>(p.weight_top_p)) / static_cast<double>(vocab)))
      : 0.0f;
  OnlineLse running;  // of c, over the chunks done (sequential mode only)
  // Single pass: the best so far (sequential) or of each chunk (parallel), and its score.
  std::vector<Best> part2(num_chunks);
  std::vector<float> part2_score(num_chunks);
  Best running_best;
  float running_best_score = NAN;
  // Pass 1: logits -> c (or f = c + d), d, the log-sum-exps and the truncation candidates
  // (pass1_chunk).
  std::vector<Pass1Result> part1(num_chunks);
  for_each_chunk(num_chunks, parallel, [&](int64_t chunk) {
    const int64_t begin = chunk * kChunk, n = std::min(vocab, begin + kChunk) - begin;
    // Inputs of other dtypes are converted chunk by chunk into per-thread buffers.
    thread_local std::vector<float> staging;
    const int num_inputs = 2 + 2 * in.num_tuned;
    if (!std::is_same_v<T, float> && staging.size() < static_cast<size_t>(num_inputs * kChunk)) {
      staging.resize(num_inputs * kChunk);
    }
    int slot = 0;
    auto as_float = [&](const T* src) -> const float* {
      if (src == nullptr) return nullptr;
      if constexpr (std::is_same_v<T, float>) {
        return src + begin;
      } else {
        return to_float(src + begin, staging.data() + kChunk * slot++, n);
      }
    };
    Pass1Inputs pin;
    pin.ref0 = as_float(in.reference);
    pin.knowledge = as_float(in.knowledge);
    pin.num_tuned = in.num_tuned;
    pin.beta = in.beta;
    pin.tuned.resize(in.num_tuned);
    pin.ref.resize(in.num_tuned);
    for (int r = 0; r < in.num_tuned; ++r) {
      pin.tuned[r] = as_float(in.tuned + r * in.tuned_model_stride);
      // A shared reference (stride 0) is ref0 itself: nullptr here, checked once as ref0.
      pin.ref[r] = in.reference && in.reference_model_stride != 0
          ? as_float(in.reference + r * in.reference_model_stride) : nullptr;
    }
    pin.shared_ref = in.reference != nullptr && in.reference_model_stride == 0;
    pin.first_token = static_cast<int32_t>(begin);
    pin.store = store;
    if (truncate) {
      pin.truncate = true;
      pin.split = !parallel;
      pin.cand_offset = cand_offset;
      pin.log_mass_before = running.value();
      pin.cand_token = scratch.cand_token.get() + chunk * kChunkRoom;
      pin.cand_c = scratch.cand_c.get() + chunk * kChunkRoom;
      pin.cand_d = scratch.cand_d.get() + chunk * kChunkRoom;
    }
    Prefetcher prefetch;
    if (!parallel && begin + kChunk < vocab) {
      const int64_t next = begin + kChunk;
      prefetch.bytes = (std::min(vocab, next + kChunk) - next) * static_cast<int64_t>(sizeof(T));
      if (in.reference != nullptr) prefetch.add(in.reference + next);
      if (in.knowledge != nullptr) prefetch.add(in.knowledge + next);
      for (int r = 0; r < in.num_tuned; ++r) prefetch.add(in.tuned + r * in.tuned_model_stride + next);
      pin.prefetch = &prefetch;
      // A single pass with sampling leaves half of the lines to its Gumbel scan.
      pin.prefetch_every = single_pass && !greedy ? 2 : 1;
    }
    // A sequential single pass keeps reusing the start of the scratch: the chunk stays in cache.
    float* chunk_c = single_pass && !parallel ? c : c + begin;
    const Pass1Result& part = part1[chunk] = pass1_chunk(pin, n, chunk_c, d + begin);
    if (!parallel) running.merge(part.c);
    if (single_pass && !part.bad) {
      Best& best = parallel ? part2[chunk] : running_best;
      float& best_score = parallel ? part2_score[chunk] : running_best_score;
      const int64_t before = best.token;
      const float chunk_max = has_knowledge ? part.cd.max : part.c.max;
      sample_chunk(RangeScores{{begin}, Scores{chunk_c, nullptr, 0.0f, -INFINITY, 0.0f}}, n, chunk_max, p, &best,
                   prefetch);
      if (best.token != before) best_score = chunk_c[best.token - begin];
    }
  });
  if (truncate && parallel && std::none_of(part1.begin(), part1.end(), [](const Pass1Result& r) { return r.bad; })) {
    // The split, with the floors the sequential mode uses (the log-sum-exp of c over the
    // chunks before each).
    std::vector<float> floors(num_chunks);
    OnlineLse before;
    for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
      floors[chunk] = candidate_floor(part1[chunk].c.max, before.value(), cand_offset);
      before.merge(part1[chunk].c);
    }
    for_each_chunk(num_chunks, parallel, [&](int64_t chunk) {
      const int64_t begin = chunk * kChunk, n = std::min(vocab, begin + kChunk) - begin;
      CandidateSplit split{floors[chunk], static_cast<int32_t>(begin), scratch.cand_token.get() + chunk * kChunkRoom,
                           scratch.cand_c.get() + chunk * kChunkRoom, scratch.cand_d.get() + chunk * kChunkRoom};
      split_chunk(c + begin, d + begin, n, part1[chunk].c.max, split);
      part1[chunk].below = split.below();
      part1[chunk].num_cand = split.count;
      part1[chunk].cand_floor = floors[chunk];
    });
  }
  OnlineLse lse_k, lse_r0, lse_c, lse_cd;
  for (const auto& part : part1) {
    if (part.bad) { result.status = kRowNaN; return result; }
    lse_k.merge(part.k);
    lse_r0.merge(part.r0);
    lse_c.merge(part.c);
    lse_cd.merge(part.cd);
  }

  if (single_pass) {
    // z = f + (a constant of the row): f = c + d, or c in draft mode.
    const OnlineLse& lse_f = has_knowledge ? lse_cd : lse_c;
    Best best = running_best;
    float best_score = running_best_score;
    for (int64_t chunk = 0; chunk < num_chunks && parallel; ++chunk) {
      if (part2[chunk].token >= 0 && best.beaten_by(part2[chunk].value, part2[chunk].token)) {
        best = part2[chunk];
        best_score = part2_score[chunk];
      }
    }
    if (lse_f.max == -INFINITY || best.token < 0) { result.status = kRowNoToken; return result; }
    result.token = best.token;
    result.logprob = best_score - lse_f.value();
    return result;
  }
  if (lse_c.max == -INFINITY) { result.status = kRowNoToken; return result; }

  // Tokens with high scores, whose noisy values bound the winner's from below: the argmax
  // of c (the top of s, always in S), without truncation the argmax of c + d, and with it
  // the tops of either side of S.
  const int64_t top_c = first_at_max(vocab, lse_c.max, [&](int64_t ch) { return part1[ch].c.max; },
                                     [&](int64_t j) { return Vec::loadu(c + j); }, [&](int64_t j) { return c[j]; });
  const int64_t top_cd = has_knowledge && !truncate
      ? first_at_max(vocab, lse_cd.max, [&](int64_t ch) { return part1[ch].cd.max; },
                     [&](int64_t j) { return masked_sum(Vec::loadu(c + j), Vec::loadu(d + j)); },
                     [&](int64_t j) { return masked_sum(c[j], d[j]); })
      : -1;

  // The scores z (Scores) and their log-sum-exp. Without truncation z = c + d, which
  // differs from docs/DESIGN.md's z by a constant of the row: neither the sample nor
  // log softmax(z) depends on it. With truncation, z = s + [c >= tau] (d + shift), and its
  // log-sum-exp comes from the two sides of S (truncate_row).
  Scores z{c, nullptr, 0.0f, -INFINITY, 0.0f};
  float log_z_z = -INFINITY;
  int64_t top_in = -1, top_out = -1;
  if (!has_knowledge) {
    z.log_z_c = lse_c.value();  // z = s
    log_z_z = 0.0f;
  } else if (!truncate) {
    z.d = d;  // z = c + d
    log_z_z = lse_cd.value();
  } else {
    const float log_z_c = lse_c.value();
    const float shift = lse_r0.value() - lse_k.value();
    const Truncation t = truncate_row(part1, scratch, lse_c, p.weight_top_p, cand_offset);
    z = Scores{c, d, log_z_c, t.tau, shift};
    top_in = t.top_in;
    top_out = t.top_out;
    // shift is +inf when every knowledge logit is -inf; S then has no mass (its z are -inf).
    const float log_in = t.log_mass_in == -INFINITY ? -INFINITY : t.log_mass_in + shift;
    float log_out = t.log_mass_out;
    if (mass_out_may_be_lost(log_add_exp(log_in, log_out), lse_c.max, vocab)) {
      log_out = log_mass_outside(c, vocab, t.tau, parallel);
    }
    log_z_z = log_add_exp(log_in, log_out) - log_z_c;
    if (set_list) {
      if (log_z_z == -INFINITY) { result.status = kRowNoToken; return result; }
      return sample_set_and_rest(in, p, vocab, parallel, c, t, log_z_c, shift, log_z_z, {top_c, top_in, top_out});
    }
  }
  if (row_logprobs != nullptr) {
    for_each_chunk(num_chunks, parallel, [&](int64_t chunk) {
      const int64_t begin = chunk * kChunk, end = std::min(vocab, begin + kChunk);
      constexpr int kW = Vec::size();
      int64_t j = begin;
      for (; j + kW <= end; j += kW) (z.load(j) - Vec(log_z_z)).store(row_logprobs + j);
      for (; j < end; ++j) row_logprobs[j] = z.at(j) - log_z_z;
    });
  }
  if (log_z_z == -INFINITY) { result.status = kRowNoToken; return result; }


  // Filters: allowed = {key(z_j) >= allowed_key}; key(-inf) is below every finite key. They
  // need z in memory: it overwrites c.
  uint32_t allowed_key = order_key(-INFINITY) + 1u;
  int64_t top_z = -1;
  if (top_k_on || top_p_on) {
    RadixSelect& radix = scratch.radix();
    uint32_t* key = scratch.key.get();
    float* w = scratch.w.get();
    std::vector<float> part_max(num_chunks, -INFINITY);
    for_each_chunk(num_chunks, parallel, [&](int64_t chunk) {
      const int64_t begin = chunk * kChunk, end = std::min(vocab, begin + kChunk);
      constexpr int kW = Vec::size();
      Vec vmax(-INFINITY);
      int64_t j = begin;
      for (; j + kW <= end; j += kW) {
        const Vec zv = z.load(j);
        zv.store(c + j);
        vmax = at::vec::maximum(vmax, zv);
      }
      float mx = horizontal_max(vmax, -INFINITY);
      for (; j < end; ++j) {
        c[j] = z.at(j);
        mx = std::max(mx, c[j]);
      }
      for (j = begin; j < end; ++j) key[j] = order_key(c[j]);
      part_max[chunk] = mx;
    });
    z = Scores{c, nullptr, 0.0f, -INFINITY, 0.0f};
    const float z_max = *std::max_element(part_max.begin(), part_max.end());
    top_z = first_at_max(vocab, z_max, [&](int64_t ch) { return part_max[ch]; },
                         [&](int64_t j) { return Vec::loadu(c + j); }, [&](int64_t j) { return c[j]; });
    if (top_k_on) {
      allowed_key = std::max(allowed_key, radix.select(key, nullptr, static_cast<float>(p.top_k), 0u, parallel));
    }
    if (top_p_on) {
      const float inv_t = 1.0f / p.temperature;
      std::vector<float> part_mass(num_chunks);
      for_each_chunk(num_chunks, parallel, [&](int64_t chunk) {
        const int64_t begin = chunk * kChunk, end = std::min(vocab, begin + kChunk);
        for (int64_t j = begin; j < end; ++j) w[j] = key[j] >= allowed_key ? (c[j] - z_max) * inv_t : -INFINITY;
        at::vec::map([](Vec x) { return exp_nonpositive(x); }, w + begin, w + begin, end - begin);
        part_mass[chunk] = at::vec::reduce_all<float>([](Vec a, Vec b) { return a + b; }, w + begin, end - begin);
      });
      float total = 0.0f;
      for (const float m : part_mass) total += m;
      allowed_key = std::max(allowed_key, radix.select(key, w, p.top_p * total, allowed_key, parallel));
    }
  }

  // Pass 2: Gumbel-max (or argmax) over the allowed tokens; ties go to the lowest index.
  const float allowed_threshold = threshold_from_key(allowed_key);
  // A lower bound on the winning value, from the noisy values of allowed high-scoring
  // tokens: it lets every chunk skip hopeless tokens from its start.
  const float noise_floor = noise_floor_of({top_c, top_cd, top_in, top_out, top_z}, [&](int64_t j) { return z.at(j); },
                                           allowed_threshold, p);
  for_each_chunk(num_chunks, parallel, [&](int64_t chunk) {
    const int64_t begin = chunk * kChunk, n = std::min(vocab, begin + kChunk) - begin;
    sample_source(RangeScores{{begin}, z.from(begin)}, n, p, allowed_threshold, noise_floor, &part2[chunk]);
  });
  Best best;
  for (const Best& part : part2) best.fold(part);
  if (best.token < 0) { result.status = kRowNoToken; return result; }
  result.token = best.token;
  result.logprob = z.at(best.token) - log_z_z;
  return result;
}

}  // namespace

void eft_sample_kernel(const EftSampleCpuArgs& a) {
  const auto& knowledge = a.knowledge;
  const auto& reference = a.reference;
  const at::Tensor& tuned = a.tuned;
  const int64_t vocab_size = a.vocab_size;
  const bool return_logprobs = a.row_logprobs.size(0) > 0;
  at::Tensor tokens = a.tokens, logprob = a.logprob, row_logprobs = a.row_logprobs, status = a.status;
  const int64_t batch = tokens.size(0);
  const int num_tuned = static_cast<int>(tuned.size(0));
  const auto dtype = tuned.scalar_type();
  const at::Tensor &seeds_c = a.seeds, &positions_c = a.positions, &weights_c = a.reward_weights;
  const at::Tensor &temp_c = a.temperature, &wtp_c = a.weight_top_p, &top_k_c = a.top_k, &top_p_c = a.top_p;

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
      RowResult r;
      if (row_params_ok(p.temperature, p.weight_top_p, p.top_k, p.top_p)) {
        r = sample_row(in, p, vocab_size, parallel, scratch, rows);
      } else {
        r.status = kRowBadParam;
      }
      if (r.status != kRowOk) {
        // Early exits may leave the row unwritten or half written (eft_math.h: RowStatus).
        r = RowResult{-1, NAN, r.status};
        if (rows != nullptr) std::fill(rows, rows + vocab_size, -INFINITY);
      }
      tokens.data_ptr<int64_t>()[b] = r.token;
      logprob.data_ptr<float>()[b] = r.logprob;
      status.data_ptr<int32_t>()[b] = r.status;
    };
    const int64_t threads = at::get_num_threads();
    if (batch >= threads || vocab_size <= kChunk) {
      // Rows are handed out one at a time (a row's result does not depend on the thread):
      // a thread slowed by other work on the machine takes fewer rows instead of holding
      // up a static half of the batch.
      std::atomic<int64_t> next_row{0};
      at::parallel_for(0, std::min(threads, batch), 1, [&](int64_t, int64_t) {
        Scratch& scratch = thread_scratch(vocab_size);
        for (int64_t b = next_row.fetch_add(1, std::memory_order_relaxed); b < batch;
             b = next_row.fetch_add(1, std::memory_order_relaxed)) {
          run_row(b, /*parallel=*/false, scratch);
        }
      });
    } else {
      Scratch& scratch = thread_scratch(vocab_size);
      for (int64_t b = 0; b < batch; ++b) run_row(b, /*parallel=*/true, scratch);
    }
  });
}

}  // namespace EFT_CPU_NS
}  // namespace eft_fast
