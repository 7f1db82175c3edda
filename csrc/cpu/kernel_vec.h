// Vector helpers of the CPU kernel (csrc/cpu/eft_sample_kernel.cpp), compiled once per
// instruction set: CPU_CAPABILITY_* picks at::vec's width and EFT_CPU_NS the namespace.
// Lane masks, the exponential of the sums, compress-stores, reductions, the fixed
// vocabulary chunks and the software prefetch of the next chunk.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace eft_fast {
namespace EFT_CPU_NS {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kChunk = 8192;  // vocabulary chunk: the unit of parallel work and of merging
constexpr int64_t kChunkRoom = kChunk + 64;  // a chunk's region of candidate buffers (whole-vector stores)

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

// exp(x) is a normal float down to x = -87; below it exp_nonpositive gives 0 (at::vec's
// exp_u20 from -87.34, std::exp a subnormal). So a term of a sum of exponentials shifted by
// an origin m is lost, or kept with no precision, when it is more than kExpRange below m.
constexpr float kExpRange = 87.0f;

// exp(x) for x <= 0 (the shifted arguments of sums of exponentials), 0 for x < -kExpRange
// (and -inf). AVX-512: x = n ln2 + r, |r| <= ln2 / 2, exp(r) = 1 + r + r^2 q(r) with q of degree 3
// fitted for the relative error (below 2e-7 in float arithmetic, lower than the degree-6
// Taylor polynomial's), times 2^n by vscalefps; inlined, so that the exponentials of one
// loop interleave. Elsewhere at::vec's exp_u20.
#if defined(CPU_CAPABILITY_AVX512)
__attribute__((always_inline)) inline Vec exp_nonpositive(Vec x) {
  const __m512 lowest = _mm512_set1_ps(-kExpRange);
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
inline Mask mask_andnot(Mask a, Mask b) { return a & static_cast<Mask>(~b); }  // a and not b
inline uint32_t mask_bits(Mask m) { return m; }
#else
inline Mask ge(Vec a, Vec b) { return a >= b; }
inline Mask lt(Vec a, Vec b) { return a < b; }
inline Mask eq(Vec a, Vec b) { return a == b; }
inline Mask mask_andnot(Mask a, Mask b) { return Vec::blendv(a, Vec(0.0f), b); }
#if defined(CPU_CAPABILITY_AVX2)
inline uint32_t mask_bits(Mask m) { return static_cast<uint32_t>(_mm256_movemask_ps(m)); }  // sign bits
#else
inline uint32_t mask_bits(Mask m) {
  // zero_mask has a bit per lane that is 0.0: the lanes that are false.
  return ~static_cast<uint32_t>(m.zero_mask()) & ((1u << Vec::size()) - 1u);
}
#endif
#endif

#if defined(CPU_CAPABILITY_AVX2)
// Left-pack permutations of eight lanes: entry m lists the lanes set in m, a byte each
// (AVX2 has no compress instruction). Built at compile time: a load-time initialiser in
// this copy could use AVX2 instructions on a processor that lacks them.
struct LeftPack {
  uint64_t lanes[256] = {};
  constexpr LeftPack() {
    for (uint32_t m = 0; m < 256; ++m) {
      uint64_t packed = 0;
      int n = 0;
      for (int i = 0; i < 8; ++i) {
        if ((m >> i) & 1u) packed |= static_cast<uint64_t>(i) << (8 * n++);
      }
      lanes[m] = packed;
    }
  }
  __m256i permutation(uint32_t m) const {
    return _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(lanes[m])));
  }
};
constexpr LeftPack kLeftPack{};
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
#elif defined(CPU_CAPABILITY_AVX2)
  const uint32_t bits = mask_bits(m);
  _mm256_storeu_ps(out, _mm256_permutevar8x32_ps(v, kLeftPack.permutation(bits)));
  return __builtin_popcount(bits);
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
#elif defined(CPU_CAPABILITY_AVX2)
  const uint32_t bits = mask_bits(m);
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_permutevar8x32_epi32(v, kLeftPack.permutation(bits)));
  return __builtin_popcount(bits);
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
#elif defined(CPU_CAPABILITY_AVX2)
  const uint32_t bits = mask_bits(m);
  const __m256i ids = _mm256_add_epi32(_mm256_set1_epi32(first), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_permutevar8x32_epi32(ids, kLeftPack.permutation(bits)));
  return __builtin_popcount(bits);
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

}  // namespace
}  // namespace EFT_CPU_NS
}  // namespace eft_fast
