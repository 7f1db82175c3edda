// CPU binding of eft_fast::eft_sample: input checks, then the kernel copy for this processor.
#include <torch/library.h>

#include <cstdlib>
#include <string>

#include "../op_checks.h"
#include "eft_sample_cpu.h"

namespace eft_fast {
namespace {

using KernelFn = void (*)(const EftSampleCpuArgs&);

// The widest copy this processor runs. EFT_FAST_CPU_ISA=default|avx2 caps it (for tests of
// the narrower copies on wide machines).
KernelFn select_kernel() {
  const char* cap = std::getenv("EFT_FAST_CPU_ISA");
  const std::string isa = cap ? cap : "";
  if (isa == "default") return &cpu_default::eft_sample_kernel;
#if defined(__x86_64__) && defined(EFT_FAST_CPU_AVX512)
  if (isa != "avx2" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return &cpu_avx512::eft_sample_kernel;
  }
#endif
#if defined(__x86_64__) && defined(EFT_FAST_CPU_AVX2)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return &cpu_avx2::eft_sample_kernel;
#endif
  return &cpu_default::eft_sample_kernel;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> eft_sample_cpu(
    const std::optional<at::Tensor>& knowledge, const at::Tensor& tuned,
    const std::optional<at::Tensor>& reference, const at::Tensor& seeds, const at::Tensor& positions,
    const at::Tensor& reward_weights, const at::Tensor& temperature, const at::Tensor& weight_top_p,
    const at::Tensor& top_k, const at::Tensor& top_p, int64_t vocab_size, bool return_logprobs) {
  check_eft_sample_inputs(knowledge, tuned, reference, seeds, positions, reward_weights, temperature,
                          weight_top_p, top_k, top_p, vocab_size);
  const int64_t batch = seeds.size(0);
  const auto opts = seeds.options();
  EftSampleCpuArgs args{knowledge, tuned, reference,
                        seeds.contiguous(), positions.contiguous(), reward_weights.contiguous(),
                        temperature.contiguous(), weight_top_p.contiguous(), top_k.contiguous(),
                        top_p.contiguous(), vocab_size,
                        at::empty({batch}, opts.dtype(at::kLong)), at::empty({batch}, opts.dtype(at::kFloat)),
                        at::empty({return_logprobs ? batch : 0, vocab_size}, opts.dtype(at::kFloat)),
                        at::empty({batch}, opts.dtype(at::kInt))};
  if (batch > 0) {
    static const KernelFn kernel = select_kernel();
    kernel(args);
  }
  return {args.tokens, args.logprob, args.row_logprobs, args.status};
}

}  // namespace eft_fast

TORCH_LIBRARY_IMPL(eft_fast, CPU, m) { m.impl("eft_sample", &eft_fast::eft_sample_cpu); }
