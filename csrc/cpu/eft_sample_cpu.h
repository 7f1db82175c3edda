// The CPU kernel of eft_sample, compiled once per instruction set.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace eft_fast {

// Checked, canonical inputs (see csrc/registration.cpp for shapes) and preallocated outputs.
struct EftSampleCpuArgs {
  std::optional<at::Tensor> knowledge;  // [B, Vk]
  at::Tensor tuned;                     // [R, B, Vt]
  std::optional<at::Tensor> reference;  // [Rr, B, Vr]
  at::Tensor seeds, positions, reward_weights, temperature, weight_top_p, top_k, top_p;  // contiguous
  int64_t vocab_size;
  at::Tensor tokens, logprob, row_logprobs, status;  // outputs; row_logprobs [0, V] when not wanted
};

namespace cpu_default { void eft_sample_kernel(const EftSampleCpuArgs& args); }
namespace cpu_avx2 { void eft_sample_kernel(const EftSampleCpuArgs& args); }
namespace cpu_avx512 { void eft_sample_kernel(const EftSampleCpuArgs& args); }

}  // namespace eft_fast
