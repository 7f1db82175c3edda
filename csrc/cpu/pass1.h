// Pass 1 of the CPU kernel: one read of a chunk of logits into c = x_R0 + sum_r beta_r
// (x_T[r] - x_R[r]) (or f = c + d), d = x_K - x_R0 where needed, the maxima, the sums of
// exponentials, and with weight truncation the split of the tokens into candidates for the
// truncation set and the mass below them.
#pragma once

#include <limits>
#include <vector>

#include "../eft_math.h"
#include "kernel_vec.h"

namespace eft_fast {
namespace EFT_CPU_NS {
namespace {

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
// margin (0.01 + 1e-5 |v|) far above the rounding of the values it is made of. The tokens
// below the floors then hold at most e^-0.01 (1 - weight_top_p) of the mass, so the
// candidates exceed the target by about 0.01 (1 - weight_top_p) of it: only where the float
// sums err by more (weight_top_p above about 0.9999) can the selection fall short, and then
// S is every token at or above the row's floor (truncate_row).
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
  float cand_floor = -INFINITY;  // truncation: the chunk's candidate floor
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
    out.cand_floor = floor_scalar;
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

}  // namespace
}  // namespace EFT_CPU_NS
}  // namespace eft_fast
