// CPU kernel of eft_fast::eft_sample (DESIGN.md sections 2-3).
//
// This file is compiled once per instruction set (see CMakeLists.txt): EFT_CPU_NS names the
// namespace of each copy and CPU_CAPABILITY_* selects at::vec's vector width.
// csrc/cpu/eft_sample.cpp checks the inputs and picks the copy the processor supports.
//
// Per row, two passes over the vocabulary: the logits are read once, and the second pass
// reads pass 1's fp32 scratch (c and d); the truncation works on a short candidate list.
//   1. pass1_chunk, vectorised, lane masks for -inf and NaN/+inf: c and d = x_K - x_R0 into
//      scratch with the maxima; then, over the cached chunk while the next chunk's logits
//      are prefetched, the sums of exponentials the row needs: without weight truncation
//      z = c + d up to a constant of the row, so only the log-sum-exp of c + d; with it,
//      those of c, x_K and x_R0, and the tokens above a floor under the truncation
//      threshold as candidates (token, c, d);
//   -  (weight_top_p < 1, truncate_row) the threshold, by a weighted selection among the
//      candidates, and the log-sum-exp of z from the candidates and the floor's mass;
//   -  (top_k / top_p) z into scratch and thresholds on it, by radix select over
//      order-preserving keys;
//   2. Gumbel-max over the allowed tokens (gumbel_argmax), z computed from the scratch as
//      it is read (Scores): a cheap bound on z, then the Philox words (AVX-512: eight per
//      register) and a per-word bound on the noise, leave few tokens whose logarithms are
//      taken.
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
#include <cstring>
#include <limits>
#include <memory>
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
constexpr int64_t kChunkRoom = kChunk + 64;  // a chunk's region of candidate buffers (whole-vector stores)

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

// exp(x) for x <= 0 (the shifted arguments of sums of exponentials), 0 for x < -87 (and
// -inf). AVX-512: x = n ln2 + r, |r| <= ln2 / 2, exp(r) = 1 + r + r^2 q(r) with q of degree 3
// fitted for the relative error (below 2e-7 in float arithmetic, lower than the degree-6
// Taylor polynomial's), times 2^n by vscalefps; inlined, so that the exponentials of one
// loop interleave. Elsewhere at::vec's exp_u20.
#if defined(CPU_CAPABILITY_AVX512)
__attribute__((always_inline)) inline Vec exp_nonpositive(Vec x) {
  const __m512 lowest = _mm512_set1_ps(-87.0f);
  const __mmask16 keep = _mm512_cmp_ps_mask(x, lowest, _CMP_GE_OQ);
  const __m512 v = _mm512_max_ps(x, lowest);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), v);   // ln2, high part (exact n * hi)
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);      // ln2, low part
  __m512 p = _mm512_set1_ps(0.008312525227665901f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.041890114545822144f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.16667114198207855f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.499992311000824f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(p, n));
}
#else
inline Vec exp_nonpositive(Vec x) { return x.exp_u20(); }
#endif

// Bits of the lanes that are set, lane i at bit i.
#if defined(CPU_CAPABILITY_AVX512)
inline Mask ge(Vec a, Vec b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }
inline Mask lt(Vec a, Vec b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
inline Mask eq(Vec a, Vec b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
inline Mask mask_and(Mask a, Mask b) { return a & b; }
inline Mask mask_andnot(Mask a, Mask b) { return a & static_cast<Mask>(~b); }  // a and not b
inline uint32_t mask_bits(Mask m) { return m; }
#else
inline Mask ge(Vec a, Vec b) { return a >= b; }
inline Mask lt(Vec a, Vec b) { return a < b; }
inline Mask eq(Vec a, Vec b) { return a == b; }
inline Mask mask_and(Mask a, Mask b) { return a & b; }
inline Mask mask_andnot(Mask a, Mask b) { return Vec::blendv(a, Vec(0.0f), b); }
inline uint32_t mask_bits(Mask m) {
  // zero_mask has a bit per lane that is 0.0: the lanes that are false.
  return ~static_cast<uint32_t>(m.zero_mask()) & ((1u << Vec::size()) - 1u);
}
#endif

// Appends the lanes set in bits, in lane order, to out; returns how many. The compress_store
// functions write a whole vector at out (lanes past the count are garbage), so out needs
// Vec::size() elements of room; in place (out <= the source position) is fine. (The
// compress-to-memory instruction is microcoded and slow on some processors.)
template <typename U>
inline int compress_lanes(uint32_t bits, const U* lanes, U* out) {
  int n = 0;
  for (; bits != 0; bits &= bits - 1) out[n++] = lanes[__builtin_ctz(bits)];
  return n;
}
inline int compress_store(Mask m, Vec v, float* out) {
#if defined(CPU_CAPABILITY_AVX512)
  _mm512_storeu_ps(out, _mm512_maskz_compress_ps(m, v));
  return __builtin_popcount(m);
#else
  alignas(64) float lanes[Vec::size()];
  v.store(lanes);
  return compress_lanes(mask_bits(m), lanes, out);
#endif
}
// 32-bit integers src[0, Vec::size()) of the lanes set in m.
inline int compress_store_i32(Mask m, const int32_t* src, int32_t* out) {
#if defined(CPU_CAPABILITY_AVX512)
  _mm512_storeu_si512(out, _mm512_maskz_compress_epi32(m, _mm512_loadu_si512(src)));
  return __builtin_popcount(m);
#else
  return compress_lanes(mask_bits(m), src, out);
#endif
}
// Token ids first, first + 1, ... of the lanes set in m.
inline int compress_store_ids(Mask m, int32_t first, int32_t* out) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512i ids = _mm512_add_epi32(_mm512_set1_epi32(first),
                                       _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  _mm512_storeu_si512(out, _mm512_maskz_compress_epi32(m, ids));
  return __builtin_popcount(m);
#else
  int n = 0;
  for (uint32_t bits = mask_bits(m); bits != 0; bits &= bits - 1) out[n++] = first + __builtin_ctz(bits);
  return n;
#endif
}

// c + d of a token with the masking of eft_score: -inf where c is -inf (d may then be
// +inf or NaN: x_R0 = -inf).
inline Vec masked_sum(Vec c, Vec d) { return select(is_neg_inf_v(c), Vec(-INFINITY), c + d); }
inline float masked_sum(float c, float d) { return c == -INFINITY ? -INFINITY : c + d; }

inline float horizontal_max(Vec v, float m) {
  alignas(64) float lanes[Vec::size()];
  v.store(lanes);
  for (int i = 0; i < Vec::size(); ++i) m = std::max(m, lanes[i]);
  return m;
}
inline float horizontal_sum(Vec v) {
  alignas(64) float lanes[Vec::size()];
  v.store(lanes);
  float s = 0.0f;
  for (int i = 0; i < Vec::size(); ++i) s += lanes[i];
  return s;
}

// Lane maximum of values that are not NaN (a row with a NaN is an error and its maxima are
// never used): one instruction, where at::vec::maximum also propagates NaN.
#if defined(CPU_CAPABILITY_AVX512)
inline Vec max_v(Vec a, Vec b) { return _mm512_max_ps(a, b); }
#elif defined(CPU_CAPABILITY_AVX2)
inline Vec max_v(Vec a, Vec b) { return _mm256_max_ps(a, b); }
#else
inline Vec max_v(Vec a, Vec b) { return at::vec::maximum(a, b); }
#endif

// Truncation: the split of one chunk's tokens at the candidate floor. The candidates
// (token, c, d) go to the chunk's region of the candidate buffers; of the others only
// sum exp(c - max c of the chunk) is kept. Pass 1 splits while it sums exponentials
// (sequential mode); split_chunk does it afterwards (parallel mode), with the same
// operations in the same order, so both give the same bits.
struct CandidateSplit {
  float floor;
  int32_t first_token;  // token id of element 0
  int32_t* token;
  float* cand_c;
  float* cand_d;
  Vec below_v = Vec(0.0f);
  float below_tail = 0.0f;
  int32_t count = 0;

  // Elements j .. j + Vec::size() - 1: c, e = exp(c - max) and d.
  void block(int64_t j, Vec cv, Vec e, Vec dv) {
    const Mask is_cand = ge(cv, Vec(floor));
    below_v = below_v + select(is_cand, Vec(0.0f), e);
#if !defined(CPU_CAPABILITY_AVX512)
    if (mask_bits(is_cand) == 0) return;  // (AVX-512: no branch, the stores are cheap)
#endif
    compress_store(is_cand, cv, cand_c + count);
    compress_store(is_cand, dv, cand_d + count);
    count += compress_store_ids(is_cand, first_token + static_cast<int32_t>(j), token + count);
  }
  void one(int64_t j, float c, float e, float d) {
    if (c >= floor) {
      cand_c[count] = c;
      cand_d[count] = d;
      token[count++] = first_token + static_cast<int32_t>(j);
    } else {
      below_tail += e;
    }
  }
  float below() const { return horizontal_sum(below_v) + below_tail; }
};

// Candidates need c >= max(max c of the chunk, log-sum-exp of c over the chunks before it)
// + offset (see sample_row); a masked c (-inf) never is one. The floor is lowered by a
// margin far above the rounding of the values it is made of.
inline float candidate_floor(float chunk_max, float log_mass_before, float offset) {
  const float v = std::max(chunk_max, log_mass_before) + offset;
  return std::max(v - (0.01f + 1e-5f * std::fabs(v)), -std::numeric_limits<float>::max());
}

// What pass 1 writes to scratch when there is a knowledge model (draft mode: c):
enum class Pass1Store {
  kScore,  // f = c + d, masked: z up to a constant of the row (no truncation)
  kC,      // c, and the maxima of x_K and x_R0 (truncation; d is formed where needed)
  kCAndD,  // c and d, and every maximum
};

// Software prefetch of the next chunk's logits, one cache line of each input per step(),
// spread over this chunk's compute-bound loops, while the memory system would be idle.
// Always four streams, so that a step has no loop: missing ones repeat the first.
struct Prefetcher {
  static constexpr int kStreams = 4;
  const char* stream[kStreams] = {};
  int num_streams = 0;
  int64_t bytes = 0;  // of each stream
  int64_t done = 0;
  void add(const void* p) {
    if (p == nullptr || num_streams == kStreams) return;
    stream[num_streams++] = static_cast<const char*>(p);
    for (int q = num_streams; q < kStreams; ++q) stream[q] = stream[0];
  }
  __attribute__((always_inline)) void step() {
    if (done >= bytes) return;
    for (int q = 0; q < kStreams; ++q) __builtin_prefetch(stream[q] + done, 0, 2);
    done += 64;
  }
};
struct NoPrefetch {
  void step() {}
};

// Pass 1 over one chunk of a row, fp32 inputs (nullptr = absent):
//   c = x_R0 + sum_r beta_r (x_T[r] - x_R[r]), -inf where any of its logits is -inf,
//   d = x_K - x_R0 (knowledge given), what `store` asks for into scratch, the maxima, and
//   whether any logit is NaN or +inf or c overflowed, in one loop; then, over the (cached)
//   chunk, the sums of exponentials that the row needs, which depend on the mode:
//   - draft mode (no knowledge model): z = s = c - lse_c, so the log-sum-exp of c;
//   - no truncation (weight_top_p = 1): z = c + d + (a constant of the row), so the
//     log-sum-exp of c + d, and nothing else (the constant cancels in sampling and in
//     log softmax(z));
//   - truncation: the log-sum-exps of c (the mass that weight_top_p cuts), x_K and x_R0
//     (the shift of z inside S), and the split of the tokens at a floor below the
//     truncation threshold: those above are candidates for S, kept as (token, c, d); of
//     those below only the mass sum exp(c) is kept.
struct Pass1Inputs {
  const float* ref0 = nullptr;       // x_R0; nullptr: draft mode without reference (x_R0 = 0)
  const float* knowledge = nullptr;  // x_K
  std::vector<const float*> tuned;
  std::vector<const float*> ref;  // x_R[r] when not shared (else nullptr)
  bool shared_ref = false;               // x_R[r] = x_R0 for every r
  const float* beta = nullptr;
  int num_tuned = 0;
  int32_t first_token = 0;  // token id of element 0
  Pass1Store store = Pass1Store::kCAndD;
  // Truncation: the sums of exp(c), exp(x_K) and exp(x_R0), and (split) the split of the
  // tokens into candidates for S and the others (CandidateSplit).
  bool truncate = false;
  bool split = false;
  float cand_offset = 0.0f;
  // Log-sum-exp of c over the chunks already done (sequential mode): the mass of the row is
  // at least that much, so candidates need c >= max(it, max c of the chunk) + cand_offset.
  float log_mass_before = -INFINITY;
  int32_t* cand_token = nullptr;
  float* cand_c = nullptr;
  float* cand_d = nullptr;
  // The next chunk's logits, prefetched while the exponentials of this one are computed
  // (the first loop waits on memory, the second on arithmetic): a step every
  // prefetch_every vectors.
  Prefetcher* prefetch = nullptr;
  int prefetch_every = 1;
};
struct Pass1Result {
  OnlineLse k, r0, c;
  OnlineLse cd;                // c + d (knowledge given, no truncation)
  float below = 0.0f;          // truncation: sum of exp(c - c.max) over the non-candidates
  int32_t num_cand = 0;        // truncation: candidates written
  bool bad = false;
};

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

// The maxima of pass 1's first loop, per lane, and whether a logit was NaN or +inf.
struct Pass1Maxima {
  Vec c = Vec(-INFINITY), k = Vec(-INFINITY), r = Vec(-INFINITY), cd = Vec(-INFINITY);
  bool bad = false;
};

// Whether any lane of the values added is NaN or +inf. AVX-512: a chain of masked compares
// (a lane stays good while its values are below +inf), without mask ORs.
struct BadLanes {
#if defined(CPU_CAPABILITY_AVX512)
  __mmask16 good = 0xffff;
  void add(Vec v) { good = _mm512_mask_cmp_ps_mask(good, v, _mm512_set1_ps(INFINITY), _CMP_LT_OQ); }
  bool any_bad() const { return good != 0xffff; }
#else
  Mask bad = mask_none();
  void add(Vec v) { bad = bad | is_bad_v(v); }
  bool any_bad() const { return any(bad); }
#endif
};

// Pass 1's first loop over the whole vectors of a chunk: reads the logits once and writes
// what kStore asks for (c, or f = c + d, and d), with the maxima. kOneTuned: one tuned
// model on the shared reference (or none), every pointer in a register; the same c.
template <bool kOneTuned, bool kHasK, Pass1Store kStore>
Pass1Maxima pass1_vectors(const Pass1Inputs& in, int64_t nv, float* c, float* d) {
  constexpr int kW = Vec::size();
  BadLanes bad_x0, bad_t, bad_k, bad_c;  // independent chains
  Vec max_c(-INFINITY), max_k(-INFINITY), max_r(-INFINITY), max_cd(-INFINITY);
  const float* ref0 = in.ref0;
  const float* tuned0 = in.tuned[0];
  const float* knowledge = in.knowledge;
  const Vec beta0(in.beta[0]);
  for (int64_t j = 0; j < nv; j += kW) {
    const Vec x0 = ref0 ? Vec::loadu(ref0 + j) : Vec(0.0f);
    Mask neg = is_neg_inf_v(x0);
    bad_x0.add(x0);
    Vec cv = x0;
    if constexpr (kOneTuned) {
      const Vec t = Vec::loadu(tuned0 + j);
      bad_t.add(t);
      neg = neg | is_neg_inf_v(t);
      cv = cv + beta0 * (t - x0);
    } else {
      for (int r = 0; r < in.num_tuned; ++r) {
        const Vec t = Vec::loadu(in.tuned[r] + j);
        Vec rr = in.shared_ref ? x0 : Vec(0.0f);
        if (in.ref[r]) {
          rr = Vec::loadu(in.ref[r] + j);
          bad_x0.add(rr);
          neg = neg | is_neg_inf_v(rr);
        }
        bad_t.add(t);
        neg = neg | is_neg_inf_v(t);
        cv = cv + Vec(in.beta[r]) * (t - rr);
      }
    }
    cv = select(neg, Vec(-INFINITY), cv);
    bad_c.add(cv);
    if constexpr (!kHasK) {
      cv.store(c + j);
      max_c = max_v(max_c, cv);
    } else {
      const Vec k = Vec::loadu(knowledge + j);
      bad_k.add(k);
      const Vec dv = k - x0;
      if constexpr (kStore == Pass1Store::kScore) {
        const Vec f = masked_sum(cv, dv);
        f.store(c + j);
        max_cd = max_v(max_cd, f);
      } else {
        cv.store(c + j);
        max_c = max_v(max_c, cv);
        max_k = max_v(max_k, k);
        max_r = max_v(max_r, x0);
        if constexpr (kStore == Pass1Store::kCAndD) {
          dv.store(d + j);
          max_cd = max_v(max_cd, masked_sum(cv, dv));
        }
      }
    }
  }
  Pass1Maxima m;
  m.c = max_c;
  m.k = max_k;
  m.r = max_r;
  m.cd = max_cd;
  m.bad = bad_x0.any_bad() || bad_t.any_bad() || bad_k.any_bad() || bad_c.any_bad();
  return m;
}

template <bool kOneTuned>
Pass1Maxima pass1_vectors_for(const Pass1Inputs& in, int64_t nv, float* c, float* d) {
  if (in.knowledge == nullptr) return pass1_vectors<kOneTuned, false, Pass1Store::kC>(in, nv, c, d);
  switch (in.store) {
    case Pass1Store::kScore: return pass1_vectors<kOneTuned, true, Pass1Store::kScore>(in, nv, c, d);
    case Pass1Store::kC: return pass1_vectors<kOneTuned, true, Pass1Store::kC>(in, nv, c, d);
    default: return pass1_vectors<kOneTuned, true, Pass1Store::kCAndD>(in, nv, c, d);
  }
}

// Pass 1 over one chunk: c (draft mode), f = c + d (kScore, into c) or c and d (into c, d),
// then the sums of exponentials. Returns the chunk's maxima and sums; with kScore the
// statistics of f are in `cd`.
Pass1Result pass1_chunk(const Pass1Inputs& in, int64_t n, float* c, float* d) {
  constexpr int kW = Vec::size();
  const int64_t nv = n - n % kW;
  const bool has_k = in.knowledge != nullptr;
  const bool score_only = has_k && in.store == Pass1Store::kScore;
  const bool store_d = has_k && in.store == Pass1Store::kCAndD;
  // x_R[0] is x_R0 (shared) or 0 (no reference): the tuned model's reference is x0.
  const Pass1Maxima vmax = in.num_tuned == 1 && in.ref[0] == nullptr && (in.shared_ref || in.ref0 == nullptr)
      ? pass1_vectors_for<true>(in, nv, c, d)
      : pass1_vectors_for<false>(in, nv, c, d);
  bool bad_tail = false;
  float mc = -INFINITY, mk = -INFINITY, mr = -INFINITY, mcd = -INFINITY;
  for (int64_t j = nv; j < n; ++j) {
    const float cj = small_policy_scalar(in, j, &bad_tail);
    if (!has_k) {
      c[j] = cj;
      mc = std::max(mc, cj);
      continue;
    }
    const float k = in.knowledge[j];
    bad_tail |= is_bad_logit(k);
    const float dj = k - in.ref0[j];
    if (score_only) {
      c[j] = masked_sum(cj, dj);
      mcd = std::max(mcd, c[j]);
      continue;
    }
    c[j] = cj;
    mc = std::max(mc, cj);
    mk = std::max(mk, k);
    mr = std::max(mr, in.ref0[j]);
    if (store_d) {
      d[j] = dj;
      mcd = std::max(mcd, masked_sum(cj, dj));
    }
  }
  Pass1Result out;
  out.bad = vmax.bad || bad_tail;
  if (out.bad) return out;  // the row is an error; nothing else is used
  // No NaN is left, so the maxima are plain maxima.
  mc = horizontal_max(vmax.c, mc);
  mk = horizontal_max(vmax.k, mk);
  mr = horizontal_max(vmax.r, mr);
  mcd = horizontal_max(vmax.cd, mcd);
  // Sums of exp(x - max). A max of -inf (every lane masked) gives an empty sum.
  auto origin = [](float m) { return m == -INFINITY ? 0.0f : m; };
  const float oc = origin(mc), ok = origin(mk), orr = origin(mr), ocd = origin(mcd);
  Vec sc(0.0f), sk(0.0f), sr(0.0f), scd(0.0f);
  const Vec voc(oc), vok(ok), vor(orr), vocd(ocd);
  Prefetcher no_prefetch;
  Prefetcher& pf = in.prefetch != nullptr ? *in.prefetch : no_prefetch;
  const int64_t pf_mask = in.prefetch_every * kW - 1;  // prefetch_every is a power of 2
  auto prefetch_next = [&](int64_t j) {
    if ((j & pf_mask) == 0) pf.step();
  };
  float tc = 0.0f, tk = 0.0f, tr = 0.0f, tcd = 0.0f, tbelow = 0.0f;
  int32_t num_cand = 0;
  if (!has_k) {
    // Draft mode: z = s needs the log-sum-exp of c only.
    for (int64_t j = 0; j < nv; j += kW) {
      prefetch_next(j);
      sc = sc + exp_nonpositive(Vec::loadu(c + j) - voc);
    }
    tc = horizontal_sum(sc);
    for (int64_t j = nv; j < n; ++j) tc += std::exp(c[j] - oc);
  } else if (score_only) {
    // f = c + d is z up to a constant: its log-sum-exp is all that is needed.
    for (int64_t j = 0; j < nv; j += kW) {
      prefetch_next(j);
      scd = scd + exp_nonpositive(Vec::loadu(c + j) - vocd);
    }
    tcd = horizontal_sum(scd);
    for (int64_t j = nv; j < n; ++j) tcd += std::exp(c[j] - ocd);
  } else if (!in.truncate) {
    for (int64_t j = 0; j < nv; j += kW) {
      prefetch_next(j);
      scd = scd + exp_nonpositive(masked_sum(Vec::loadu(c + j), Vec::loadu(d + j)) - vocd);
    }
    tcd = horizontal_sum(scd);
    for (int64_t j = nv; j < n; ++j) tcd += std::exp(masked_sum(c[j], d[j]) - ocd);
  } else {
    // Truncation: the log-sum-exps of c, x_K and x_R0, and the candidates.
    const float floor_scalar = candidate_floor(mc, in.log_mass_before, in.cand_offset);
    CandidateSplit split{floor_scalar, in.first_token, in.cand_token, in.cand_c, in.cand_d};
    for (int64_t j = 0; j < nv; j += kW) {
      prefetch_next(j);
      const Vec cv = Vec::loadu(c + j);
      const Vec k = Vec::loadu(in.knowledge + j), x0 = Vec::loadu(in.ref0 + j);
      const Vec e = exp_nonpositive(cv - voc);
      sc = sc + e;
      sk = sk + exp_nonpositive(k - vok);
      sr = sr + exp_nonpositive(x0 - vor);
      if (in.split) split.block(j, cv, e, k - x0);
    }
    tc = horizontal_sum(sc);
    tk = horizontal_sum(sk);
    tr = horizontal_sum(sr);
    for (int64_t j = nv; j < n; ++j) {
      const float e = std::exp(c[j] - oc);
      tc += e;
      tk += std::exp(in.knowledge[j] - ok);
      tr += std::exp(in.ref0[j] - orr);
      if (in.split) split.one(j, c[j], e, in.knowledge[j] - in.ref0[j]);
    }
    tbelow = split.below();
    num_cand = split.count;
  }
  // The maxima are always set (the callers use them); the sums only where computed.
  out.c = OnlineLse{mc, tc};
  if (has_k) {
    out.k = OnlineLse{mk, tk};
    out.r0 = OnlineLse{mr, tr};
    out.cd = OnlineLse{mcd, tcd};
  }
  out.below = tbelow;
  out.num_cand = num_cand;
  return out;
}

// The candidate split of one chunk after pass 1 (parallel mode): the operations of pass 1's
// truncation loop, c_max = the chunk's max of c.
void split_chunk(const float* c, const float* d, int64_t n, float c_max, CandidateSplit& split) {
  constexpr int kW = Vec::size();
  const float oc = c_max == -INFINITY ? 0.0f : c_max;
  const Vec voc(oc);
  const int64_t nv = n - n % kW;
  for (int64_t j = 0; j < nv; j += kW) {
    const Vec cv = Vec::loadu(c + j);
    split.block(j, cv, exp_nonpositive(cv - voc), Vec::loadu(d + j));
  }
  for (int64_t j = nv; j < n; ++j) split.one(j, c[j], std::exp(c[j] - oc), d[j]);
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

// Consecutive tokens first_token + i, scored by Scores.
struct RangeScores {
  Scores z;
  int64_t first_token;
  float at(int64_t i) const { return z.at(i); }
  Vec load(int64_t i) const { return z.load(i); }
  int64_t token(int64_t i) const { return first_token + i; }
#if defined(CPU_CAPABILITY_AVX512)
  Vec load(__mmask16 valid, int64_t i) const { return z.load(valid, i); }
  __m512i tokens(__mmask16, int64_t i) const {
    return _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(first_token + i)), lane_ids());
  }
#endif
};

// Consecutive tokens outside the truncation set: z = s = c - log_z_c, and -inf for the
// members of the set (c >= tau), which SetScores scores.
struct OutsideSetScores {
  const float* c;
  float log_z_c;
  float tau;
  int64_t first_token;
  float at(int64_t i) const { return c[i] >= tau ? -INFINITY : c[i] - log_z_c; }
  Vec of(Vec cv) const { return select(ge(cv, Vec(tau)), Vec(-INFINITY), cv - Vec(log_z_c)); }
  Vec load(int64_t i) const { return of(Vec::loadu(c + i)); }
  int64_t token(int64_t i) const { return first_token + i; }
#if defined(CPU_CAPABILITY_AVX512)
  Vec load(__mmask16 valid, int64_t i) const { return of(_mm512_maskz_loadu_ps(valid, c + i)); }
  __m512i tokens(__mmask16, int64_t i) const {
    return _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(first_token + i)), lane_ids());
  }
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
constexpr int kCandidates = kNoiseBlock;  // stage-1 block
constexpr int kSurvivors = 32;            // stage-3 buffer, flushed from 16 entries on
template <typename Source, typename Prefetch = NoPrefetch>
void gumbel_argmax(const Source& src, int64_t n, float temperature, float allowed_threshold, float noise_floor,
                   uint64_t seed, uint32_t position, Best* best_out, Prefetch&& prefetch = Prefetch{}) {
  Best best = *best_out;
  alignas(64) uint32_t cand[kCandidates], words[kCandidates];
  alignas(64) float cand_z[kCandidates];
  alignas(64) uint32_t surv[kSurvivors], surv_w[kSurvivors];
  alignas(64) float surv_zt[kSurvivors], noise[kSurvivors];
  int nc = 0, ns = 0;
  float bound = -INFINITY, cutoff = -INFINITY;
  auto update_bounds = [&] {
    bound = std::max(best.value, noise_floor);
    // z < cutoff implies z / T + kGumbelMax < bound with room to spare for rounding.
    const float zb = (bound - kGumbelMax) * temperature;
    cutoff = std::max(allowed_threshold, zb - 1e-3f * std::max(1.0f, std::fabs(zb)));
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
  constexpr int kW = Vec::size();
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    prefetch.step();
    const Vec zv = src.load(i);
    uint32_t bits = mask_bits(ge(zv, Vec(cutoff)));
    if (bits == 0) continue;
    alignas(64) float lanes[kW];
    zv.store(lanes);
    for (; bits != 0; bits &= bits - 1) {
      const int lane = __builtin_ctz(bits);
      cand[nc] = static_cast<uint32_t>(src.token(i + lane));
      cand_z[nc++] = lanes[lane];
      if (nc == kCandidates) flush_candidates();
    }
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

// The first j in [begin, end) with value(j) == target (-1 if none); vec_value(j) gives the
// lanes j.. j + Vec::size() - 1 with the same operations.
template <typename VecValue, typename Value>
int64_t first_equal(int64_t begin, int64_t end, float target, const VecValue& vec_value, const Value& value) {
  constexpr int kW = Vec::size();
  int64_t j = begin;
  for (; j + kW <= end; j += kW) {
    const uint32_t bits = mask_bits(eq(vec_value(j), Vec(target)));
    if (bits != 0) return j + __builtin_ctz(bits);
  }
  for (; j < end; ++j) {
    if (value(j) == target) return j;
  }
  return -1;
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

// Weighted selection: the largest v among vals[0, n) with
//   above + sum_{vals_i >= v} weights_i >= target   (ties inclusive),
// where the caller guarantees above + sum of all weights >= target. Value bisection: each
// step splits the values at the middle of their range and keeps the side that holds the
// answer, until few are left, which are sorted. vals and weights are reordered in place.
int64_t keep_side(float* vals, float* weights, int64_t n, float pivot, bool upper, float* lo, float* hi) {
  constexpr int kW = Vec::size();
  Vec vmin(INFINITY), vmax(-INFINITY);
  int64_t kept = 0, i = 0;
  for (; i + kW <= n; i += kW) {
    const Vec v = Vec::loadu(vals + i), w = Vec::loadu(weights + i);
    const Mask keep = upper ? ge(v, Vec(pivot)) : lt(v, Vec(pivot));
    if (mask_bits(keep) == 0) continue;
    vmin = at::vec::minimum(vmin, select(keep, v, Vec(INFINITY)));
    vmax = at::vec::maximum(vmax, select(keep, v, Vec(-INFINITY)));
    compress_store(keep, w, weights + kept);  // kept <= i: in place
    kept += compress_store(keep, v, vals + kept);
  }
  float mn = -horizontal_max(Vec(0.0f) - vmin, -INFINITY), mx = horizontal_max(vmax, -INFINITY);
  for (; i < n; ++i) {
    if ((vals[i] >= pivot) != upper) continue;
    mn = std::min(mn, vals[i]);
    mx = std::max(mx, vals[i]);
    weights[kept] = weights[i];
    vals[kept++] = vals[i];
  }
  *lo = mn;
  *hi = mx;
  return kept;
}

float weight_at_or_above(const float* vals, const float* weights, int64_t n, float pivot) {
  constexpr int kW = Vec::size();
  Vec sum(0.0f);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    sum = sum + select(ge(Vec::loadu(vals + i), Vec(pivot)), Vec::loadu(weights + i), Vec(0.0f));
  }
  float total = horizontal_sum(sum);
  for (; i < n; ++i) total += vals[i] >= pivot ? weights[i] : 0.0f;
  return total;
}

float select_threshold(float* vals, float* weights, int64_t n, float target, float above) {
  constexpr int64_t kSortAt = 64;
  float lo = 0.0f, hi = 0.0f;
  n = keep_side(vals, weights, n, -INFINITY, /*upper=*/true, &lo, &hi);  // min and max
  while (n > kSortAt && lo < hi) {
    float pivot = 0.5f * lo + 0.5f * hi;
    if (!(pivot > lo)) pivot = hi;  // adjacent floats: split off the top value
    const float upper = weight_at_or_above(vals, weights, n, pivot);
    const bool answer_above = above + upper >= target;
    if (!answer_above) above += upper;
    n = keep_side(vals, weights, n, pivot, answer_above, &lo, &hi);
  }
  if (lo == hi) return lo;  // one value left (ties are all in)
  std::vector<std::pair<float, float>> items(n);
  for (int64_t i = 0; i < n; ++i) items[i] = {vals[i], weights[i]};
  std::sort(items.begin(), items.end(), [](const auto& x, const auto& y) { return x.first > y.first; });
  float cum = above;
  for (size_t i = 0; i < items.size();) {
    const float v = items[i].first;
    for (; i < items.size() && items[i].first == v; ++i) cum += items[i].second;
    if (cum >= target) return v;
  }
  return items.back().first;  // rounding left the sum short: keep every value
}

inline float log_add_exp(float a, float b) {
  const float m = std::max(a, b);
  if (m == -INFINITY) return -INFINITY;
  return m + std::log(std::exp(a - m) + std::exp(b - m));
}
inline float log_of_scaled(float sum, float origin) { return sum > 0.0f ? origin + std::log(sum) : -INFINITY; }

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
  float log_mass_out = -INFINITY;  // log sum_{j not in S} exp(c_j)
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
  // the selection arrays.
  const float row_floor = candidate_floor(-INFINITY, lse_c.value(), cand_offset);
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
  t.log_mass_out = log_of_scaled(out, c_max);
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
  // The mass of S, sum exp(c + d), relative to its max.
  auto cd_at = [&](int64_t i) { return set_c[i] + set_d[i]; };
  auto cd_vec = [&](int64_t i) { return Vec::loadu(set_c + i) + Vec::loadu(set_d + i); };
  Vec in_max_v(-INFINITY);
  int64_t i = 0;
  for (; i + kW <= n_in; i += kW) in_max_v = max_v(in_max_v, cd_vec(i));
  float in_max = horizontal_max(in_max_v, -INFINITY);
  for (; i < n_in; ++i) in_max = std::max(in_max, cd_at(i));
  if (n_in > 0 && in_max != -INFINITY) {
    Vec in_sum_v(0.0f);
    for (i = 0; i + kW <= n_in; i += kW) in_sum_v = in_sum_v + exp_nonpositive(cd_vec(i) - Vec(in_max));
    float in_sum = horizontal_sum(in_sum_v);
    for (; i < n_in; ++i) in_sum += std::exp(cd_at(i) - in_max);
    t.log_mass_in = log_of_scaled(in_sum, in_max);
    t.top_in = set_token[first_equal(0, n_in, in_max, cd_vec, cd_at)];
  }
  return t;
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

// A lower bound of the winning value: the noisy value of a token known to be allowed,
// lowered by a margin that covers the rounding difference between this scalar noise and
// the vector noise of the same token.
inline float noisy_value_floor(float z, int64_t token, const RowParams& p) {
  const float v = z / p.temperature + gumbel_noise(p.seed, static_cast<uint32_t>(token), p.position);
  return v - 1e-3f * std::max(1.0f, std::fabs(v));
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
  if (best->token >= 0) {
    // No token of the chunk can reach the best value (the test of gumbel_argmax).
    const float zb = (best->value - kGumbelMax) * p.temperature;
    if (chunk_max < zb - 1e-3f * std::max(1.0f, std::fabs(zb))) return;
  }
  const int64_t top = src.token(first_at(src, n, chunk_max));
  const float allowed = threshold_from_key(order_key(-INFINITY) + 1u);
  gumbel_argmax(src, n, p.temperature, allowed, noisy_value_floor(chunk_max, top, p), p.seed, p.position, best,
                prefetch);
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
  const bool greedy = p.temperature == 0.0f;
  const float allowed = threshold_from_key(order_key(-INFINITY) + 1u);
  float noise_floor = -INFINITY;
  for (const int64_t j : high_tokens) {
    if (greedy || j < 0) continue;
    const float zj = score_at(j);
    if (zj != -INFINITY) noise_floor = std::max(noise_floor, noisy_value_floor(zj, j, p));
  }
  auto sample = [&](const auto& src, int64_t n, Best* best) {
    if (greedy) {
      scores_argmax(src, n, best);
    } else {
      gumbel_argmax(src, n, p.temperature, allowed, noise_floor, p.seed, p.position, best);
    }
  };
  Best best;
  sample(SetScores{t.set_token, t.set_c, t.set_d, log_z_c, shift}, t.set_size, &best);
  const int64_t num_chunks = (vocab + kChunk - 1) / kChunk;
  std::vector<Best> part2(num_chunks, best);
  for_each_chunk(num_chunks, parallel, [&](int64_t chunk) {
    const int64_t begin = chunk * kChunk, n = std::min(vocab, begin + kChunk) - begin;
    sample(OutsideSetScores{c + begin, log_z_c, t.tau, begin}, n, parallel ? &part2[chunk] : &best);
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
      sample_chunk(RangeScores{Scores{chunk_c, nullptr, 0.0f, -INFINITY, 0.0f}, begin}, n, chunk_max, p, &best,
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
  // differs from DESIGN.md's z by a constant of the row: neither the sample nor
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
    log_z_z = log_add_exp(t.log_mass_in + shift, t.log_mass_out) - log_z_c;
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
  const float temperature = p.temperature;
  // A lower bound on the winning value, from the noisy values of allowed high-scoring
  // tokens: it lets every chunk skip hopeless tokens from its start.
  float noise_floor = -INFINITY;
  for (const int64_t j : {top_c, top_cd, top_in, top_out, top_z}) {
    if (greedy || j < 0) continue;
    const float zj = z.at(j);
    if (zj != -INFINITY && zj >= allowed_threshold) noise_floor = std::max(noise_floor, noisy_value_floor(zj, j, p));
  }
  for_each_chunk(num_chunks, parallel, [&](int64_t chunk) {
    const int64_t begin = chunk * kChunk, n = std::min(vocab, begin + kChunk) - begin;
    const RangeScores src{z.from(begin), begin};
    if (greedy) {
      scores_argmax(src, n, &part2[chunk]);
    } else {
      gumbel_argmax(src, n, temperature, allowed_threshold, noise_floor, p.seed, p.position, &part2[chunk]);
    }
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
      const RowResult r = sample_row(in, p, vocab_size, parallel, scratch, rows);
      tokens.data_ptr<int64_t>()[b] = r.token;
      logprob.data_ptr<float>()[b] = r.logprob;
      status.data_ptr<int32_t>()[b] = r.status;
    };
    const int64_t threads = at::get_num_threads();
    if (batch >= threads || vocab_size <= kChunk) {
      at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
        Scratch& scratch = thread_scratch(vocab_size);
        for (int64_t b = begin; b < end; ++b) run_row(b, /*parallel=*/false, scratch);
      });
    } else {
      Scratch& scratch = thread_scratch(vocab_size);
      for (int64_t b = 0; b < batch; ++b) run_row(b, /*parallel=*/true, scratch);
    }
  });
}

}  // namespace EFT_CPU_NS
}  // namespace eft_fast
