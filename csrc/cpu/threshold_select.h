// Threshold selection of the CPU kernel: a weighted radix select over order-preserving
// keys (top-k / top-p filters) and a weighted value bisection (the weight truncation
// threshold among pass 1's candidates).
#pragma once

#include <array>
#include <utility>
#include <vector>

#include "kernel_vec.h"

namespace eft_fast {
namespace EFT_CPU_NS {
namespace {

// Radix select digits over the 32-bit keys: 11 + 11 + 10 bits.
constexpr int kDigitBits[3] = {11, 11, 10};
constexpr int kDigitShift[3] = {21, 10, 0};
constexpr int kMaxBuckets = 2048;

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

}  // namespace
}  // namespace EFT_CPU_NS
}  // namespace eft_fast
