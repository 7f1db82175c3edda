// CPU kernel of eft_fast::eft_sample (DESIGN.md sections 2-3).
//
// This file is compiled once per instruction set (see CMakeLists.txt): EFT_CPU_NS names the
// namespace of each copy and CPU_CAPABILITY_* selects at::vec's vector width.
// csrc/cpu/eft_sample.cpp checks the inputs and picks the copy the processor supports.
//
// Per row, a fixed number of passes over the vocabulary, each over fp32 scratch that stays
// in cache:
//   1. read the logits once (pass1_chunk, vectorised, lane masks for -inf and NaN/+inf):
//      c and d = x_K - x_R0 into scratch with the maxima; then, over the cached chunk, the
//      sums of exp for the log-sum-exps of x_K, x_R0 and c, and (weight_top_p < 1) a mass
//      histogram over buckets of c, while the next chunk's logits are prefetched;
//   2. (weight_top_p < 1) the truncation threshold on c: the boundary bucket from the
//      histogram, then an exact, tie-inclusive cut among that bucket's tokens;
//   3. z = s + [c >= threshold] (d - lse_K + lse_R0) and its log-sum-exp;
//   4. (top_k / top_p) thresholds on z, by radix select over order-preserving keys;
//   5. Gumbel-max over the allowed tokens (gumbel_argmax): a cheap bound on z, then the
//      Philox words (AVX-512: eight per register) and a per-word bound on the noise, leave
//      few tokens whose logarithms are taken.
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
#include <cmath>
#include <type_traits>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include "../eft_math.h"
#include "eft_sample_cpu.h"

namespace eft_fast {
namespace EFT_CPU_NS {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kChunk = 8192;  // vocabulary chunk: the unit of parallel work and of merging

// Radix select digits over the 32-bit keys: 11 + 11 + 10 bits.
constexpr int kDigitBits[3] = {11, 11, 10};
constexpr int kDigitShift[3] = {21, 10, 0};
constexpr int kMaxBuckets = 2048;

// Gumbel noise g = -log(E(w)) of the Philox words words[0, n), n <= kNoiseBlock: the
// logarithms come from at::vec. Arrays, not structs, so that every loop vectorises.
constexpr int kNoiseBlock = 64;

void gumbel_from_words(const uint32_t* words, int n, float* noise) {
  alignas(64) float log_arg[kNoiseBlock], x[kNoiseBlock], logs[kNoiseBlock];
#pragma omp simd
  for (int i = 0; i < n; ++i) {
    const ExponentialArgs a = exponential_log_argument(words[i]);
    log_arg[i] = a.log_arg;
    x[i] = a.x;
  }
  at::vec::map([](Vec v) { return v.log(); }, logs, log_arg, n);
#pragma omp simd
  for (int i = 0; i < n; ++i) {
    const ExponentialArgs a{log_arg[i], x[i], words[i] >= 0x80000000u};
    log_arg[i] = exponential_from_log(a, logs[i]);  // E
  }
  at::vec::map([](Vec e) { return e.log().neg(); }, noise, log_arg, n);
}

// The first Philox word w0 of the counters (tokens[i], position, 0, 0), i < n <= kNoiseBlock:
// bit for bit philox4x32_10(seed, tokens[i], position, 0, 0).w0 (eft_math.h).
#if defined(CPU_CAPABILITY_AVX512)
// Eight counters per register, one per 64-bit lane: _mm512_mul_epu32 multiplies the low
// 32 bits of each lane into a full 64-bit product (high word = mulhi, low word = the
// product mod 2^32), and ignores the lanes' high halves, so they may hold garbage.
inline __m512i philox_w0_x8(__m512i token, uint32_t position, const uint32_t* k0, const uint32_t* k1) {
  const __m512i m0 = _mm512_set1_epi64(0xCD9E8D57u), m1 = _mm512_set1_epi64(0xD2511F53u);
  // Round 1 on (token, position, 0, 0): c0 = position ^ k0, c1 = 0, c2 = hi(m1 token) ^ k1,
  // c3 = lo(m1 token).
  __m512i p1 = _mm512_mul_epu32(token, m1);
  const uint32_t c0_scalar = position ^ k0[0];
  __m512i c2 = _mm512_xor_si512(_mm512_srli_epi64(p1, 32), _mm512_set1_epi64(k1[0]));
  __m512i c3 = p1;
  // Round 2: c0 is the same in every lane, so its products are scalars.
  const uint64_t q1 = static_cast<uint64_t>(0xD2511F53u) * c0_scalar;
  __m512i p0 = _mm512_mul_epu32(c2, m0);
  __m512i c0 = _mm512_xor_si512(_mm512_srli_epi64(p0, 32), _mm512_set1_epi64(k0[1]));  // c1 was 0
  c2 = _mm512_xor_si512(c3, _mm512_set1_epi64(static_cast<uint32_t>(q1 >> 32) ^ k1[1]));
  __m512i c1 = p0;
  c3 = _mm512_set1_epi64(static_cast<uint32_t>(q1));
  for (int round = 2; round < 10; ++round) {
    p0 = _mm512_mul_epu32(c2, m0);
    p1 = _mm512_mul_epu32(c0, m1);
    c0 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p0, 32), c1, _mm512_set1_epi64(k0[round]), 0x96);
    c2 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p1, 32), c3, _mm512_set1_epi64(k1[round]), 0x96);
    c1 = p0;
    c3 = p1;
  }
  return c0;  // w0 in the low half of each lane
}

void philox_words(uint64_t seed, uint32_t position, const uint32_t* tokens, int n, uint32_t* words) {
  uint32_t k0[10], k1[10];
  k0[0] = static_cast<uint32_t>(seed & 0xffffffffull);
  k1[0] = static_cast<uint32_t>(seed >> 32);
  for (int r = 1; r < 10; ++r) {
    k0[r] = k0[r - 1] + kPhiloxKeyBumpA;
    k1[r] = k1[r - 1] + kPhiloxKeyBumpB;
  }
  for (int i = 0; i < n; i += 16) {
    const __m512i t = _mm512_loadu_si512(tokens + i);  // the buffers are padded to whole vectors
    const __m512i lo = philox_w0_x8(_mm512_cvtepu32_epi64(_mm512_castsi512_si256(t)), position, k0, k1);
    const __m512i hi = philox_w0_x8(_mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(t, 1)), position, k0, k1);
    const __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(lo)),
                                         _mm512_cvtepi64_epi32(hi), 1);
    _mm512_storeu_si512(words + i, w);
  }
}
#else
void philox_words(uint64_t seed, uint32_t position, const uint32_t* tokens, int n, uint32_t* words) {
  philox_w0_block<kNoiseBlock>(seed, tokens, position, n, words);
}
#endif

// An upper bound of the Gumbel noise as a function of the Philox word w, from its leading
// bits (g is increasing in w): level 1 indexes w >> 27; in the top level-1 bucket, where g
// grows fastest, level 2 indexes the next five bits. Each entry is g at the largest word of
// its bucket, computed in double, plus a margin far above the rounding error of the float
// noise. Only 1/1024 of the words get the global bound ~22.9.
struct NoiseBound {
  alignas(64) float level1[32];
  alignas(64) float level2[32];
  NoiseBound() {
    auto g_at = [](uint64_t w) {
      const double e = w >= 0x80000000ull ? -std::log1p(-((0xffffffffull - w) + 0.5) * 0x1p-32)
                                          : -std::log((w + 0.5) * 0x1p-32);
      return static_cast<float>(-std::log(e) + 1e-3);
    };
    for (uint64_t k = 0; k < 32; ++k) {
      level1[k] = g_at(((k + 1) << 27) - 1);
      level2[k] = g_at((uint64_t{31} << 27) + ((k + 1) << 22) - 1);
    }
  }
  float operator()(uint32_t w) const { return (w >> 27) == 31 ? level2[(w >> 22) & 31] : level1[w >> 27]; }
};
const NoiseBound kNoiseBound;

// Lane masks: __mmask16 on AVX-512, else all-ones / all-zeros float lanes of at::vec.
#if defined(CPU_CAPABILITY_AVX512)
using Mask = __mmask16;
inline Mask mask_none() { return 0; }
inline Mask is_neg_inf_v(Vec v) { return _mm512_cmp_ps_mask(v, _mm512_set1_ps(-INFINITY), _CMP_EQ_OQ); }
// NaN or +inf (the unordered compare is true for NaN).
inline Mask is_bad_v(Vec v) { return _mm512_cmp_ps_mask(v, _mm512_set1_ps(INFINITY), _CMP_NLT_UQ); }
inline bool any(Mask m) { return m != 0; }
inline Vec select(Mask m, Vec if_true, Vec if_false) { return _mm512_mask_blend_ps(m, if_false, if_true); }
#else
using Mask = Vec;
inline Mask mask_none() { return Vec(0.0f); }
inline Mask is_neg_inf_v(Vec v) { return v == Vec(-INFINITY); }
inline Mask is_bad_v(Vec v) { return (v != v) | (v == Vec(INFINITY)); }
inline bool any(Mask m) {
  alignas(64) uint32_t lanes[Vec::size()];
  m.store(lanes);
  uint32_t bits = 0;
  for (int i = 0; i < Vec::size(); ++i) bits |= lanes[i];
  return bits != 0;
}
inline Vec select(Mask m, Vec if_true, Vec if_false) { return Vec::blendv(if_false, if_true, m); }
#endif

// The truncation set S is a top-p set of exp(s), s = c - lse_c: an upper set in c. Its
// threshold is found from a histogram of the mass over fixed buckets of c (width 1/8,
// clamped to [1, kMassBuckets - 1]; monotone in c), built in pass 1 with the exponentials
// it computes anyway, then resolved exactly among the tokens of the boundary bucket.
constexpr int kMassBuckets = 2048;
inline int mass_bucket(float c) {
  return static_cast<int>(std::min(std::max(c * 8.0f + 1024.0f, 1.0f), static_cast<float>(kMassBuckets - 1)));
}
inline at::vec::Vectorized<int32_t> mass_bucket(Vec c) {
  const Vec v = at::vec::clamp(c * Vec(8.0f) + Vec(1024.0f), Vec(1.0f), Vec(static_cast<float>(kMassBuckets - 1)));
  return at::vec::convert_to_int_of_same_size(v);
}

// Pass 1 over one chunk of a row, fp32 inputs (nullptr = absent):
//   c = x_R0 + sum_r beta_r (x_T[r] - x_R[r]), -inf where any of its logits is -inf,
//   d = x_K - x_R0 (knowledge given), the log-sum-exps of c, x_K and x_R0, and whether any
//   logit is NaN or +inf or c overflowed. One pass computes c, d, the maxima and the checks;
//   a second pass over the (cached) chunk sums the exponentials.
struct Pass1Inputs {
  const float* ref0 = nullptr;       // x_R0; nullptr: draft mode without reference (x_R0 = 0)
  const float* knowledge = nullptr;  // x_K
  std::vector<const float*> tuned;
  std::vector<const float*> ref;  // x_R[r] when not shared (else nullptr)
  bool shared_ref = false;               // x_R[r] = x_R0 for every r
  const float* beta = nullptr;
  int num_tuned = 0;
  float* hist = nullptr;  // kMassBuckets floats: exp(c - chunk max) summed by mass_bucket(c)
  // Only tokens with c >= (max of c so far) + hist_offset enter the histogram: the others
  // lie below the truncation threshold (see truncation_threshold).
  float hist_offset = 0.0f;
  float max_before = -INFINITY;  // max of c over the chunks already done (sequential mode)
  // The next chunk's logits, prefetched while the exponentials of this one are computed
  // (the first loop waits on memory, the second on arithmetic).
  static constexpr int kMaxPrefetch = 4;
  const char* prefetch[kMaxPrefetch] = {};
  int64_t prefetch_bytes = 0;
};
struct Pass1Result { OnlineLse k, r0, c; bool bad = false; };

// Scalar form of one element, for the tail of a chunk (the same operations as the vectors).
inline float small_policy_scalar(const Pass1Inputs& in, int64_t j, bool* bad) {
  const float x0 = in.ref0 ? in.ref0[j] : 0.0f;
  bool masked = is_neg_inf(x0);
  *bad |= is_bad_logit(x0);
  float c = x0;
  for (int r = 0; r < in.num_tuned; ++r) {
    const float t = in.tuned[r][j];
    const float rr = in.ref[r] ? in.ref[r][j] : (in.shared_ref ? x0 : 0.0f);
    *bad |= is_bad_logit(t) | (in.ref[r] ? is_bad_logit(rr) : false);
    masked |= is_neg_inf(t) | is_neg_inf(rr);
    c = c + in.beta[r] * (t - rr);
  }
  c = masked ? -INFINITY : c;
  *bad |= is_bad_logit(c);
  return c;
}

Pass1Result pass1_chunk(const Pass1Inputs& in, int64_t n, float* c, float* d) {
  constexpr int kW = Vec::size();
  const int64_t nv = n - n % kW;
  Mask bad = mask_none();
  Vec max_c(-INFINITY), max_k(-INFINITY), max_r(-INFINITY);
  const bool has_k = in.knowledge != nullptr;
  for (int64_t j = 0; j < nv; j += kW) {
    const Vec x0 = in.ref0 ? Vec::loadu(in.ref0 + j) : Vec(0.0f);
    Mask neg = is_neg_inf_v(x0);
    bad = bad | is_bad_v(x0);
    Vec cv = x0;
    for (int r = 0; r < in.num_tuned; ++r) {
      const Vec t = Vec::loadu(in.tuned[r] + j);
      Vec rr = in.shared_ref ? x0 : Vec(0.0f);
      if (in.ref[r]) {
        rr = Vec::loadu(in.ref[r] + j);
        bad = bad | is_bad_v(rr);
        neg = neg | is_neg_inf_v(rr);
      }
      bad = bad | is_bad_v(t);
      neg = neg | is_neg_inf_v(t);
      cv = cv + Vec(in.beta[r]) * (t - rr);
    }
    cv = select(neg, Vec(-INFINITY), cv);
    bad = bad | is_bad_v(cv);
    cv.store(c + j);
    max_c = at::vec::maximum(max_c, cv);
    if (has_k) {
      const Vec k = Vec::loadu(in.knowledge + j);
      bad = bad | is_bad_v(k);
      (k - x0).store(d + j);
      max_k = at::vec::maximum(max_k, k);
      max_r = at::vec::maximum(max_r, x0);
    }
  }
  bool bad_tail = false;
  float mc = -INFINITY, mk = -INFINITY, mr = -INFINITY;
  for (int64_t j = nv; j < n; ++j) {
    c[j] = small_policy_scalar(in, j, &bad_tail);
    mc = std::max(mc, c[j]);
    if (has_k) {
      const float k = in.knowledge[j];
      bad_tail |= is_bad_logit(k);
      d[j] = k - in.ref0[j];
      mk = std::max(mk, k);
      mr = std::max(mr, in.ref0[j]);
    }
  }
  Pass1Result out;
  out.bad = any(bad) || bad_tail;
  if (out.bad) return out;  // the row is an error; nothing else is used
  // No NaN is left, so the maxima are plain maxima.
  auto hmax = [](Vec v, float m) {
    alignas(64) float lanes[kW];
    v.store(lanes);
    for (int i = 0; i < kW; ++i) m = std::max(m, lanes[i]);
    return m;
  };
  mc = hmax(max_c, mc);
  mk = hmax(max_k, mk);
  mr = hmax(max_r, mr);
  // Sums of exp(x - max). A max of -inf (every lane masked) gives an empty sum.
  const float oc = mc == -INFINITY ? 0.0f : mc, ok = mk == -INFINITY ? 0.0f : mk, orr = mr == -INFINITY ? 0.0f : mr;
  Vec sc(0.0f), sk(0.0f), sr(0.0f);
  const Vec voc(oc), vok(ok), vor(orr);
  float* hist = in.hist;
  if (hist != nullptr) std::fill(hist, hist + kMassBuckets, 0.0f);
  const float floor_scalar = std::max(mc, in.max_before) + in.hist_offset;
  const Vec hist_floor(floor_scalar);
  int64_t prefetched = 0;
  for (int64_t j = 0; j < nv; j += kW) {
    if (prefetched < in.prefetch_bytes) {
      for (int q = 0; q < Pass1Inputs::kMaxPrefetch; ++q) {
        if (in.prefetch[q] != nullptr) __builtin_prefetch(in.prefetch[q] + prefetched, 0, 2);
      }
      prefetched += 64;
    }
    const Vec cv = Vec::loadu(c + j);
    const Vec e = (cv - voc).exp_u20();
    sc = sc + e;
    if (hist != nullptr) {
      // Lanes at or above the floor; zero_mask has a bit per lane that is 0.0 (false).
      uint32_t lanes = ~static_cast<uint32_t>((cv >= hist_floor).zero_mask()) & ((1u << kW) - 1u);
      if (lanes != 0) {
        alignas(64) float ew[kW];
        alignas(64) int32_t bucket[kW];
        e.store(ew);
        mass_bucket(cv).store(bucket);
        for (; lanes != 0; lanes &= lanes - 1) {
          const int i = __builtin_ctz(lanes);
          hist[bucket[i]] += ew[i];
        }
      }
    }
    if (has_k) {
      sk = sk + (Vec::loadu(in.knowledge + j) - vok).exp_u20();
      sr = sr + (Vec::loadu(in.ref0 + j) - vor).exp_u20();
    }
  }
  auto hsum = [](Vec v) {
    alignas(64) float lanes[kW];
    v.store(lanes);
    float s = 0.0f;
    for (int i = 0; i < kW; ++i) s += lanes[i];
    return s;
  };
  float tc = hsum(sc), tk = hsum(sk), tr = hsum(sr);
  for (int64_t j = nv; j < n; ++j) {
    const float e = std::exp(c[j] - oc);
    tc += e;
    if (hist != nullptr && c[j] >= floor_scalar) hist[mass_bucket(c[j])] += e;
    if (has_k) {
      tk += std::exp(in.knowledge[j] - ok);
      tr += std::exp(in.ref0[j] - orr);
    }
  }
  if (mc != -INFINITY) { out.c.max = mc; out.c.sum = tc; }
  if (has_k && mk != -INFINITY) { out.k.max = mk; out.k.sum = tk; }
  if (has_k && mr != -INFINITY) { out.r0.max = mr; out.r0.sum = tr; }
  return out;
}

struct Best {
  float value = -INFINITY;
  int64_t token = -1;
};

// Gumbel-max over the tokens j in [begin, end) with z_j >= allowed_threshold: the first
// maximum of value_j = z_j / T + g_j, folded into *best_out. Only tokens that can still win
// get their exact noise, in three stages that keep index order:
//   1. g < kGumbelMax: j is a candidate only if z_j / T + kGumbelMax can reach the bound
//      max(best value, noise_floor) (one compare of z_j against a cutoff);
//   2. the candidates' Philox words; g is increasing in the word, so NoiseBound gives a much
//      tighter bound per word and drops most candidates;
//   3. the survivors' logarithms and values, in blocks.
// Every test is conservative (the margins exceed the rounding), so the result is the first
// maximum of value_j over all allowed tokens, with the noise of gumbel_from_words.
constexpr int kCandidates = kNoiseBlock;  // stage-1 block
constexpr int kSurvivors = 32;            // stage-3 buffer, flushed from 16 entries on
void gumbel_argmax(const float* z, int64_t begin, int64_t end, float temperature, float allowed_threshold,
                   float noise_floor, uint64_t seed, uint32_t position, Best* best_out) {
  Best best = *best_out;
  alignas(64) uint32_t cand[kCandidates], words[kCandidates];
  alignas(64) float cand_z[kCandidates];
  alignas(64) uint32_t surv[kSurvivors], surv_w[kSurvivors];
  alignas(64) float surv_zt[kSurvivors], noise[kSurvivors];
  int nc = 0, ns = 0;
  float bound = -INFINITY, cutoff = -INFINITY;
  auto update_bounds = [&] {
    bound = std::max(best.value, noise_floor);
    // z_j < cutoff implies z_j / T + kGumbelMax < bound with room to spare for rounding.
    const float zb = (bound - kGumbelMax) * temperature;
    cutoff = std::max(allowed_threshold, zb - 1e-3f * std::max(1.0f, std::fabs(zb)));
  };
  update_bounds();
  auto flush_survivors = [&] {
    gumbel_from_words(surv_w, ns, noise);
    for (int i = 0; i < ns; ++i) {
      const float value = noise[i] + surv_zt[i];
      if (value > best.value || best.token < 0) {
        best.value = value;
        best.token = surv[i];
      }
    }
    ns = 0;
    update_bounds();
  };
  auto flush_candidates = [&] {
    philox_words(seed, position, cand, nc, words);
#if defined(CPU_CAPABILITY_AVX512)
    const __m512 t = _mm512_set1_ps(temperature);
    const __m512 l1lo = _mm512_load_ps(kNoiseBound.level1), l1hi = _mm512_load_ps(kNoiseBound.level1 + 16);
    const __m512 l2lo = _mm512_load_ps(kNoiseBound.level2), l2hi = _mm512_load_ps(kNoiseBound.level2 + 16);
    const __m512i top = _mm512_set1_epi32(31), five = _mm512_set1_epi32(31);
    for (int i = 0; i < nc; i += 16) {
      const __mmask16 valid = nc - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (nc - i)) - 1u);
      const __m512i w = _mm512_load_si512(words + i);
      const __m512 zt = _mm512_div_ps(_mm512_load_ps(cand_z + i), t);
      const __m512i hi5 = _mm512_srli_epi32(w, 27);
      const __m512i next5 = _mm512_and_si512(_mm512_srli_epi32(w, 22), five);
      const __m512 ub = _mm512_mask_blend_ps(_mm512_cmpeq_epi32_mask(hi5, top),
                                             _mm512_permutex2var_ps(l1lo, hi5, l1hi),
                                             _mm512_permutex2var_ps(l2lo, next5, l2hi));
      const __mmask16 keep = _mm512_mask_cmp_ps_mask(valid, _mm512_add_ps(zt, ub), _mm512_set1_ps(bound), _CMP_GE_OQ);
      if (keep == 0) continue;
      _mm512_storeu_si512(surv + ns, _mm512_maskz_compress_epi32(keep, _mm512_load_si512(cand + i)));
      _mm512_storeu_si512(surv_w + ns, _mm512_maskz_compress_epi32(keep, w));
      _mm512_storeu_ps(surv_zt + ns, _mm512_maskz_compress_ps(keep, zt));
      ns += __builtin_popcount(keep);
      if (ns >= 16) flush_survivors();
    }
#else
    for (int i = 0; i < nc; ++i) {
      const float zt = cand_z[i] / temperature;
      surv[ns] = cand[i];
      surv_w[ns] = words[i];
      surv_zt[ns] = zt;
      ns += zt + kNoiseBound(words[i]) >= bound;
      if (ns == kSurvivors) flush_survivors();
    }
#endif
    nc = 0;
  };
#if defined(CPU_CAPABILITY_AVX512)
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t j = begin; j < end; j += 16) {
    const __mmask16 valid = end - j >= 16 ? __mmask16(0xffff) : __mmask16((1u << (end - j)) - 1u);
    const __m512 zv = _mm512_maskz_loadu_ps(valid, z + j);
    const __mmask16 m = _mm512_mask_cmp_ps_mask(valid, zv, _mm512_set1_ps(cutoff), _CMP_GE_OQ);
    if (m == 0) continue;
    const __m512i idx = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(j)), iota);
    _mm512_storeu_si512(cand + nc, _mm512_maskz_compress_epi32(m, idx));
    _mm512_storeu_ps(cand_z + nc, _mm512_maskz_compress_ps(m, zv));
    nc += __builtin_popcount(m);
    if (nc > kCandidates - 16) flush_candidates();
  }
#else
  for (int64_t j = begin; j < end; ++j) {
    cand[nc] = static_cast<uint32_t>(j);
    cand_z[nc] = z[j];
    nc += z[j] >= cutoff;
    if (nc == kCandidates) flush_candidates();
  }
#endif
  if (nc > 0) flush_candidates();
  if (ns > 0) flush_survivors();
  *best_out = best;
}

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

// The row segment as fp32: the input itself for float, else converted into buf.
inline const float* to_float(const float* src, float* /*buf*/, int64_t /*n*/) { return src; }
template <typename T>
const float* to_float(const T* src, float* buf, int64_t n) {
  at::vec::convert(src, buf, n);
  return buf;
}

// Folds v[0, n) (token ids offset + i) into best: the largest finite value, lowest index on ties.
void first_argmax(const float* v, int64_t n, int64_t offset, Best* best) {
  const float mx = at::vec::reduce_all<float>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, v, n);
  if (mx == -INFINITY || (best->token >= 0 && !(mx > best->value))) return;
  int64_t i = 0;
  while (i + 1 < n && v[i] != mx) ++i;
  best->value = mx;
  best->token = offset + i;
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

// The threshold of the truncation set: the largest c value t such that the tokens with
// c_j >= t hold at least weight_top_p of the mass sum_j exp(c_j) (ties inclusive); -inf
// when rounding leaves the total short. hist holds pass 1's per-chunk histograms.
float truncation_threshold(const float* c, int64_t vocab, const float* hist,
                           const std::vector<Pass1Result>& part1, float c_max, float weight_top_p,
                           bool parallel) {
  const int64_t num_chunks = static_cast<int64_t>(part1.size());
  // Merge the chunk histograms, each relative to its chunk's max, relative to the row max.
  alignas(64) std::array<float, kMassBuckets> merged{};
  for (int64_t ch = 0; ch < num_chunks; ++ch) {
    if (part1[ch].c.max == -INFINITY) continue;
    const Vec scale(std::exp(part1[ch].c.max - c_max));
    const float* h = hist + ch * kMassBuckets;
    for (int b = 0; b < kMassBuckets; b += Vec::size()) {
      (Vec::loadu(merged.data() + b) + Vec::loadu(h + b) * scale).store(merged.data() + b);
    }
  }
  // The total mass from the chunk sums (the histogram leaves out the lightest tokens).
  float total = 0.0f;
  for (int64_t ch = 0; ch < num_chunks; ++ch) {
    if (part1[ch].c.max != -INFINITY) total += part1[ch].c.sum * std::exp(part1[ch].c.max - c_max);
  }
  float target = weight_top_p * total;
  int bucket = -1;
  float above = 0.0f;
  for (int b = kMassBuckets - 1; b >= 0; --b) {
    if (above + merged[b] >= target) { bucket = b; break; }
    above += merged[b];
  }
  if (bucket < 0) return -INFINITY;
  target -= above;
  // The boundary bucket's tokens, with their weights exp(c - c_max), then exactly.
  std::vector<std::vector<std::pair<float, float>>> found(num_chunks);
  for_each_chunk(num_chunks, parallel, [&](int64_t ch) {
    const int64_t begin = ch * kChunk, end = std::min(vocab, begin + kChunk);
    auto& out = found[ch];
    int64_t j = begin;
    constexpr int kW = Vec::size();
    // mass_bucket(c) == bucket  <=>  bucket <= clamp(8 c + 1024) < bucket + 1 (clamp >= 1).
    const Vec lo(static_cast<float>(bucket)), hi(static_cast<float>(bucket + 1));
    for (; j + kW <= end; j += kW) {
      const Vec cv = Vec::loadu(c + j);
      const Vec scaled = at::vec::clamp(cv * Vec(8.0f) + Vec(1024.0f), Vec(1.0f), Vec(static_cast<float>(kMassBuckets - 1)));
      uint32_t lanes = ~static_cast<uint32_t>(((scaled >= lo) & (scaled < hi)).zero_mask()) & ((1u << kW) - 1u);
      for (; lanes != 0; lanes &= lanes - 1) {
        const int i = __builtin_ctz(lanes);
        if (mass_bucket(c[j + i]) == bucket) out.emplace_back(c[j + i], 0.0f);
      }
    }
    for (; j < end; ++j) {
      if (mass_bucket(c[j]) == bucket) out.emplace_back(c[j], 0.0f);
    }
  });
  std::vector<std::pair<float, float>> cand;
  for (auto& f : found) cand.insert(cand.end(), f.begin(), f.end());
  if (cand.empty()) return -INFINITY;  // cannot happen: the bucket has mass
  for (auto& e : cand) e.second = std::exp(e.first - c_max);
  std::sort(cand.begin(), cand.end(), [](const auto& x, const auto& y) { return x.first > y.first; });
  float cum = 0.0f;
  for (size_t i = 0; i < cand.size();) {
    const float v = cand[i].first;
    for (; i < cand.size() && cand[i].first == v; ++i) cum += cand[i].second;
    if (cum >= target) return v;
  }
  return cand.back().first;  // rounding left the bucket short: keep all of it
}

struct Scratch {
  std::vector<float> c;   // c, then s's successor z
  std::vector<float> d;   // x_K - x_R0
  std::vector<float> w;   // weights for radix select
  std::vector<uint32_t> key;
  std::vector<float> hist;  // per-chunk mass histograms of pass 1
  RadixSelect radix;
  explicit Scratch(int64_t vocab)
      : c(vocab), d(vocab), w(vocab), key(vocab),
        hist(((vocab + kChunk - 1) / kChunk) * kMassBuckets), radix(vocab) {}
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

  const bool truncate = has_knowledge && p.weight_top_p < 1.0f;
  // Tokens below max(c) + log((1 - weight_top_p) / V) hold less than 1 - weight_top_p of
  // the mass (each weighs less than (1 - weight_top_p) / V of the max token), so the
  // threshold is above them; one more unit of margin covers rounding.
  const float hist_offset = truncate
      ? static_cast<float>(std::log((1.0 - static_cast<double>(p.weight_top_p)) / static_cast<double>(vocab)) - 1.0)
      : 0.0f;
  float running_max = -INFINITY;  // sequential mode only
  // Pass 1: logits -> c, d and the three log-sum-exps (pass1_chunk).
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
    pin.hist = truncate ? scratch.hist.data() + chunk * kMassBuckets : nullptr;
    if (!parallel && begin + kChunk < vocab) {
      const int64_t next = begin + kChunk;
      pin.prefetch_bytes = (std::min(vocab, next + kChunk) - next) * static_cast<int64_t>(sizeof(T));
      int q = 0;
      auto add = [&](const T* src) {
        if (src != nullptr && q < Pass1Inputs::kMaxPrefetch) pin.prefetch[q++] = reinterpret_cast<const char*>(src + next);
      };
      add(in.reference);
      add(in.knowledge);
      for (int r = 0; r < in.num_tuned; ++r) add(in.tuned + r * in.tuned_model_stride);
    }
    pin.hist_offset = hist_offset;
    pin.max_before = parallel ? -INFINITY : running_max;
    part1[chunk] = pass1_chunk(pin, n, c + begin, d + begin);
    if (!parallel) running_max = std::max(running_max, part1[chunk].c.max);
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

  // Pass 2: the truncation set S = {c_j >= c_threshold} at mass weight_top_p.
  const float c_threshold = truncate
      ? truncation_threshold(c, vocab, scratch.hist.data(), part1, lse_c.max, p.weight_top_p, parallel)
      : -INFINITY;

  // Pass 3: z and its log-sum-exp (z overwrites c).
  const float weight_shift = lse_r0.value() - lse_k.value();
  std::vector<OnlineLse> part3(num_chunks);
  for_each_chunk(num_chunks, parallel, [&](int64_t chunk) {
    const int64_t begin = chunk * kChunk, end = std::min(vocab, begin + kChunk);
    // eft_score, lane by lane: the same operations on vectors.
    constexpr int kW = Vec::size();
    const Vec lz(log_z_c), thr(c_threshold), shift(weight_shift), neg_inf(-INFINITY);
    int64_t j = begin;
    Vec vmax(-INFINITY);
    for (; j + kW <= end; j += kW) {
      const Vec cv = Vec::loadu(c + j);
      Vec zv = cv - lz;  // -inf stays -inf
      if (has_knowledge) {
        const Vec dv = Vec::loadu(d + j);
        const Vec scored = select(is_neg_inf_v(dv), neg_inf, zv + (dv + shift));
        const Vec use = (cv >= thr) & (zv != neg_inf);
        zv = Vec::blendv(zv, scored, use);
      }
      zv.store(c + j);
      vmax = at::vec::maximum(vmax, zv);
    }
    float mx = -INFINITY;
    for (; j < end; ++j) {
      const float sj = c[j] - log_z_c;
      c[j] = has_knowledge ? eft_score(sj, c[j] >= c_threshold, d[j], weight_shift) : sj;
      mx = std::max(mx, c[j]);
    }
    {
      alignas(64) float lanes[kW];
      vmax.store(lanes);
      for (int i = 0; i < kW; ++i) mx = std::max(mx, lanes[i]);
    }
    OnlineLse part;
    if (mx != -INFINITY) {
      part.max = mx;
      part.sum = at::vec::map_reduce_all<float>([mx](Vec v) { return (v - Vec(mx)).exp_u20(); },
                                                [](Vec a, Vec b) { return a + b; }, c + begin, end - begin);
    }
    part3[chunk] = part;
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
      for (int64_t j = begin; j < end; ++j) w[j] = key[j] >= allowed_key ? (z[j] - z_max) * inv_t : -INFINITY;
      at::vec::map([](Vec x) { return x.exp_u20(); }, w + begin, w + begin, end - begin);
      part_mass[chunk] = at::vec::reduce_all<float>([](Vec a, Vec b) { return a + b; }, w + begin, end - begin);
    });
    float total = 0.0f;
    for (const float m : part_mass) total += m;
    allowed_key = std::max(allowed_key, radix.select(key, w, p.top_p * total, allowed_key, parallel));
  }

  // Pass 5: Gumbel-max (or argmax) over the allowed tokens; ties go to the lowest index.
  const float allowed_threshold = threshold_from_key(allowed_key);
  const float temperature = p.temperature;
  // A lower bound on the winning value, from the noise of the argmax of z (always allowed):
  // it lets every chunk skip hopeless tokens from its start. The margin covers the rounding
  // difference between this scalar noise and the vector noise of the same token.
  float noise_floor = -INFINITY;
  if (!greedy) {
    // The first token at the max, in the first chunk whose max it is.
    int64_t top = 0;
    for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
      if (part3[chunk].max == lse_z.max) { top = chunk * kChunk; break; }
    }
    while (top + 1 < vocab && z[top] != lse_z.max) ++top;
    const float top_value = z[top] / temperature + gumbel_noise(p.seed, static_cast<uint32_t>(top), p.position);
    noise_floor = top_value - 1e-3f * std::max(1.0f, std::fabs(top_value));
  }
  std::vector<Best> part5(num_chunks);
  for_each_chunk(num_chunks, parallel, [&](int64_t chunk) {
    const int64_t begin = chunk * kChunk, end = std::min(vocab, begin + kChunk);
    Best best;
    if (greedy) {
      first_argmax(z + begin, end - begin, begin, &best);
    } else {
      gumbel_argmax(z, begin, end, temperature, allowed_threshold, noise_floor, p.seed, p.position, &best);
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
}

}  // namespace EFT_CPU_NS
}  // namespace eft_fast
