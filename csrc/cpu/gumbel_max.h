// Gumbel-max sampling of the CPU kernel (docs/DESIGN.md section 3): Philox words eight per
// AVX-512 register, the Gumbel noise of a block of words, a per-word bound on the noise, the
// score sources the samplers read (a row's scores, the tokens outside or inside the
// truncation set), and the samplers (gumbel_argmax, scores_argmax).
#pragma once

#include <cstring>

#include "../eft_math.h"
#include "kernel_vec.h"

namespace eft_fast {
namespace EFT_CPU_NS {
namespace {

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
// Built on first use, by the copy the processor runs: a load-time initialiser in every copy
// could run AVX-512 instructions on a processor that lacks them.
const NoiseBound& noise_bound() {
  static const NoiseBound bound;
  return bound;
}

// The EFT scores z_j of one row (eft_score), computed where they are read from pass 1's
// scratch: z = s + [c >= tau] (d + shift) with s = c - log_z_c. With d == nullptr (no
// knowledge model, or z already written to c with log_z_c = 0) z = s.
struct Scores {
  const float* c;
  const float* d;
  float log_z_c;
  float tau;    // the truncation set is {c >= tau}
  float shift;  // lse_R0 - lse_K

  float at(int64_t j) const {
    const float s = c[j] - log_z_c;
    return d == nullptr ? s : eft_score(s, c[j] >= tau, d[j], shift);
  }
  // The same operations on the lanes of (cv, dv).
  Vec of(Vec cv, Vec dv) const {
    const Vec s = cv - Vec(log_z_c);  // -inf stays -inf
    if (d == nullptr) return s;
    const Vec scored = select(is_neg_inf_v(dv), Vec(-INFINITY), s + (dv + Vec(shift)));
    return select(mask_andnot(ge(cv, Vec(tau)), is_neg_inf_v(s)), scored, s);
  }
  Vec load(int64_t j) const { return of(Vec::loadu(c + j), d == nullptr ? Vec(0.0f) : Vec::loadu(d + j)); }
#if defined(CPU_CAPABILITY_AVX512)
  // Lanes outside `valid` are not read; their values are meaningless.
  Vec load(__mmask16 valid, int64_t j) const {
    return of(_mm512_maskz_loadu_ps(valid, c + j), d == nullptr ? Vec(0.0f) : Vec(_mm512_maskz_loadu_ps(valid, d + j)));
  }
#endif
  // The scores of the positions from `first` on.
  Scores from(int64_t first) const { return Scores{c + first, d == nullptr ? nullptr : d + first, log_z_c, tau, shift}; }
};

// Where the samplers below read scores: positions i = 0 .. n - 1, position i holding token
// token(i) (increasing in i) with score at(i); load(i) gives the scores of positions
// i .. i + Vec::size() - 1 with the same operations, and on AVX-512 load(valid, i) and
// tokens(valid, i) those of the lanes in `valid`.
#if defined(CPU_CAPABILITY_AVX512)
inline __m512i lane_ids() { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
#endif

// The token ids of sources whose positions are consecutive tokens first_token + i.
struct ConsecutiveTokens {
  int64_t first_token;
  int64_t token(int64_t i) const { return first_token + i; }
  void ids_at(int64_t i, int32_t* out) const {
    for (int l = 0; l < Vec::size(); ++l) out[l] = static_cast<int32_t>(first_token + i + l);
  }
#if defined(CPU_CAPABILITY_AVX512)
  __m512i tokens(__mmask16, int64_t i) const {
    return _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(first_token + i)), lane_ids());
  }
#endif
};

// Consecutive tokens, scored by Scores.
struct RangeScores : ConsecutiveTokens {
  Scores z;
  float at(int64_t i) const { return z.at(i); }
  Vec load(int64_t i) const { return z.load(i); }
#if defined(CPU_CAPABILITY_AVX512)
  Vec load(__mmask16 valid, int64_t i) const { return z.load(valid, i); }
#endif
};

// Consecutive tokens outside the truncation set: z = s = c - log_z_c, and -inf for the
// members of the set (c >= tau), which SetScores scores.
struct OutsideSetScores : ConsecutiveTokens {
  const float* c;
  float log_z_c;
  float tau;
  float at(int64_t i) const { return c[i] >= tau ? -INFINITY : c[i] - log_z_c; }
  Vec of(Vec cv) const { return select(ge(cv, Vec(tau)), Vec(-INFINITY), cv - Vec(log_z_c)); }
  Vec load(int64_t i) const { return of(Vec::loadu(c + i)); }
#if defined(CPU_CAPABILITY_AVX512)
  Vec load(__mmask16 valid, int64_t i) const { return of(_mm512_maskz_loadu_ps(valid, c + i)); }
#endif
};

// The members of the truncation set, listed as (token, c, d) in token order (c is finite):
// z = s + (d + shift), -inf where d is (the knowledge model masks the token). The same
// operations as Scores inside the set.
struct SetScores {
  const int32_t* token_ids;
  const float* c;
  const float* d;
  float log_z_c;
  float shift;
  float at(int64_t i) const { return eft_score(c[i] - log_z_c, true, d[i], shift); }
  Vec of(Vec cv, Vec dv) const {
    return select(is_neg_inf_v(dv), Vec(-INFINITY), (cv - Vec(log_z_c)) + (dv + Vec(shift)));
  }
  Vec load(int64_t i) const { return of(Vec::loadu(c + i), Vec::loadu(d + i)); }
  int64_t token(int64_t i) const { return token_ids[i]; }
  void ids_at(int64_t i, int32_t* out) const { std::memcpy(out, token_ids + i, sizeof(int32_t) * Vec::size()); }
#if defined(CPU_CAPABILITY_AVX512)
  Vec load(__mmask16 valid, int64_t i) const {
    return of(_mm512_maskz_loadu_ps(valid, c + i), _mm512_maskz_loadu_ps(valid, d + i));
  }
  __m512i tokens(__mmask16 valid, int64_t i) const { return _mm512_maskz_loadu_epi32(valid, token_ids + i); }
#endif
};

struct Best {
  float value = -INFINITY;
  int64_t token = -1;
  // Whether (value, token) wins over this: a larger value, or the same value at a lower
  // token (ties go to the lowest index, whatever order the tokens are visited in).
  bool beaten_by(float v, int64_t t) const { return token < 0 || v > value || (v == value && t < token); }
  void fold(const Best& other) {
    if (other.token >= 0 && beaten_by(other.value, other.token)) *this = other;
  }
};

// Gumbel-max over positions [0, n) of a score source with z >= allowed_threshold: the
// maximum of value = z / T + g, folded into *best_out (Best's tie rule). Only tokens that
// can still win get their exact noise, in three stages:
//   1. g < kGumbelMax: a token is a candidate only if z / T + kGumbelMax can reach the bound
//      max(best value, noise_floor) (one compare of z against a cutoff);
//   2. the candidates' Philox words; g is increasing in the word, so NoiseBound gives a much
//      tighter bound per word and drops most candidates;
//   3. the survivors' logarithms and values, in blocks.
// Every test is conservative (the margins exceed the rounding), so the result is the
// maximum of value over all allowed tokens, with the noise of gumbel_from_words.
// A score below which a token cannot reach the value `bound` whatever its noise:
// z < gumbel_cutoff(bound, T) implies z / T + kGumbelMax < bound, with room for rounding.
inline float gumbel_cutoff(float bound, float temperature) {
  const float zb = (bound - kGumbelMax) * temperature;
  return zb - 1e-3f * std::max(1.0f, std::fabs(zb));
}

constexpr int kCandidates = kNoiseBlock;  // stage-1 block
constexpr int kSurvivors = 32;            // stage-3 buffer (AVX-512: flushed from 16 entries on)
template <typename Source, typename Prefetch = NoPrefetch>
void gumbel_argmax(const Source& src, int64_t n, float temperature, float allowed_threshold, float noise_floor,
                   uint64_t seed, uint32_t position, Best* best_out, Prefetch&& prefetch = Prefetch{}) {
  Best best = *best_out;
  const NoiseBound& bounds = noise_bound();
  alignas(64) uint32_t cand[kCandidates], words[kCandidates];
  alignas(64) float cand_z[kCandidates];
  alignas(64) uint32_t surv[kSurvivors], surv_w[kSurvivors];
  alignas(64) float surv_zt[kSurvivors], noise[kSurvivors];
  int nc = 0, ns = 0;
  float bound = -INFINITY, cutoff = -INFINITY;
  auto update_bounds = [&] {
    bound = std::max(best.value, noise_floor);
    cutoff = std::max(allowed_threshold, gumbel_cutoff(bound, temperature));
  };
  update_bounds();
  auto flush_survivors = [&] {
    gumbel_from_words(surv_w, ns, noise);
    for (int i = 0; i < ns; ++i) {
      const float value = noise[i] + surv_zt[i];
      if (best.beaten_by(value, surv[i])) {
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
    const __m512 l1lo = _mm512_load_ps(bounds.level1), l1hi = _mm512_load_ps(bounds.level1 + 16);
    const __m512 l2lo = _mm512_load_ps(bounds.level2), l2hi = _mm512_load_ps(bounds.level2 + 16);
    const __m512i top = _mm512_set1_epi32(31), low5 = _mm512_set1_epi32(31);
    for (int i = 0; i < nc; i += 16) {
      const __mmask16 valid = nc - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (nc - i)) - 1u);
      const __m512i w = _mm512_load_si512(words + i);
      const __m512 zt = _mm512_div_ps(_mm512_load_ps(cand_z + i), t);
      const __m512i hi5 = _mm512_srli_epi32(w, 27);
      const __m512i next5 = _mm512_and_si512(_mm512_srli_epi32(w, 22), low5);
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
      ns += zt + bounds(words[i]) >= bound;
      if (ns == kSurvivors) flush_survivors();
    }
#endif
    nc = 0;
  };
#if defined(CPU_CAPABILITY_AVX512)
  // Without a branch on whether a vector has candidates: where a fair share of the vectors
  // has one, that branch is mispredicted often. Lanes outside `valid` are never candidates.
  const Source local = src;  // members in registers
  auto scan = [&](__mmask16 valid, int64_t i) {
    const __m512 zv = local.load(valid, i);
    const __mmask16 m = _mm512_mask_cmp_ps_mask(valid, zv, _mm512_set1_ps(cutoff), _CMP_GE_OQ);
    _mm512_storeu_si512(cand + nc, _mm512_maskz_compress_epi32(m, local.tokens(valid, i)));
    _mm512_storeu_ps(cand_z + nc, _mm512_maskz_compress_ps(m, zv));
    nc += __builtin_popcount(m);
    if (nc > kCandidates - 16) flush_candidates();
  };
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    prefetch.step();
    scan(__mmask16(0xffff), i);
  }
  if (i < n) scan(static_cast<__mmask16>((1u << (n - i)) - 1u), i);
#else
  // Also without a branch on whether a vector has candidates (compress_store left-packs).
  constexpr int kW = Vec::size();
  const Source local = src;
  alignas(64) int32_t ids[kW];
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    prefetch.step();
    const Vec zv = local.load(i);
    const Mask m = ge(zv, Vec(cutoff));
    local.ids_at(i, ids);
    compress_store_i32(m, ids, reinterpret_cast<int32_t*>(cand + nc));
    nc += compress_store(m, zv, cand_z + nc);
    if (nc > kCandidates - kW) flush_candidates();
  }
  for (; i < n; ++i) {
    const float zi = src.at(i);
    cand[nc] = static_cast<uint32_t>(src.token(i));
    cand_z[nc] = zi;
    nc += zi >= cutoff;
    if (nc == kCandidates) flush_candidates();
  }
#endif
  if (nc > 0) flush_candidates();
  if (ns > 0) flush_survivors();
  *best_out = best;
}

// The first position of [0, n) whose score is `target`, -1 if none.
template <typename Source>
int64_t first_at(const Source& src, int64_t n, float target) {
  return first_equal(0, n, target, [&](int64_t i) { return src.load(i); }, [&](int64_t i) { return src.at(i); });
}

// Folds the largest finite score of positions [0, n) into best (Best's tie rule).
template <typename Source>
void scores_argmax(const Source& src, int64_t n, Best* best) {
  constexpr int kW = Vec::size();
  Vec vmax(-INFINITY);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) vmax = max_v(vmax, src.load(i));
  float mx = horizontal_max(vmax, -INFINITY);
  for (; i < n; ++i) mx = std::max(mx, src.at(i));
  if (mx == -INFINITY || !(best->token < 0 || mx >= best->value)) return;
  const int64_t token = src.token(first_at(src, n, mx));
  if (best->beaten_by(mx, token)) *best = Best{mx, token};
}

}  // namespace
}  // namespace EFT_CPU_NS
}  // namespace eft_fast
