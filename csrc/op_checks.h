// Input checks shared by the CPU and CUDA bindings. The Python wrapper validates user
// input with messages for users; these checks guard direct torch.ops callers.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <optional>

namespace eft_fast {

inline void check_seeds_positions(const at::Tensor& seeds, const at::Tensor& positions, int64_t vocab_size) {
  TORCH_CHECK_VALUE(seeds.dim() == 1 && seeds.scalar_type() == at::kLong,
                    "seeds must be a 1-D int64 tensor, got ", seeds.sizes(), " ", seeds.scalar_type());
  TORCH_CHECK_VALUE(positions.dim() == 1 && positions.scalar_type() == at::kLong,
                    "positions must be a 1-D int64 tensor, got ", positions.sizes(), " ",
                    positions.scalar_type());
  TORCH_CHECK_VALUE(positions.size(0) == seeds.size(0), "positions must have shape [", seeds.size(0),
                    "], got ", positions.sizes());
  TORCH_CHECK_VALUE(positions.device() == seeds.device(), "positions must be on ", seeds.device(),
                    ", got ", positions.device());
  TORCH_CHECK_VALUE(vocab_size >= 1 && vocab_size <= (int64_t{1} << 31),
                    "vocab_size must be in [1, 2^31], got ", vocab_size);
}

inline void check_logits(const char* name, const at::Tensor& t, int64_t dims, int64_t batch, int64_t vocab,
                         const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.dim() == dims, name, " must have ", dims, " dims, got ", t.sizes());
  TORCH_CHECK_VALUE(t.size(dims - 2) == batch, name, " must have batch size ", batch, ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.size(-1) >= vocab, name, " is narrower (", t.size(-1), ") than vocab_size ", vocab);
  TORCH_CHECK_VALUE(t.stride(-1) == 1, name, " must be contiguous in its last dim");
  TORCH_CHECK_VALUE(t.device() == like.device(), name, " must be on ", like.device(), ", got ", t.device());
  const auto dtype = t.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, name,
                   " must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK_TYPE(dtype == like.scalar_type(), name, " dtype ", dtype, " differs from tuned dtype ",
                   like.scalar_type());
}

inline void check_row_param(const char* name, const at::Tensor& t, int64_t batch, at::ScalarType type,
                            const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == batch && t.scalar_type() == type, name, " must be a [",
                    batch, "] ", type, " tensor, got ", t.sizes(), " ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == like.device(), name, " must be on ", like.device(), ", got ", t.device());
}

// The op-level checks of eft_sample, shared by the CPU and CUDA bindings.
inline void check_eft_sample_inputs(const std::optional<at::Tensor>& knowledge, const at::Tensor& tuned,
                                    const std::optional<at::Tensor>& reference, const at::Tensor& seeds,
                                    const at::Tensor& positions, const at::Tensor& reward_weights,
                                    const at::Tensor& temperature, const at::Tensor& weight_top_p,
                                    const at::Tensor& top_k, const at::Tensor& top_p, int64_t vocab_size) {
  check_seeds_positions(seeds, positions, vocab_size);
  const int64_t batch = seeds.size(0);
  check_logits("tuned", tuned, 3, batch, vocab_size, tuned);
  TORCH_CHECK_VALUE(tuned.device() == seeds.device(), "seeds must be on ", tuned.device(), ", got ",
                    seeds.device());
  const int64_t num_tuned = tuned.size(0);
  TORCH_CHECK_VALUE(num_tuned >= 1, "tuned must hold at least one model");
  if (knowledge) {
    check_logits("knowledge", *knowledge, 2, batch, vocab_size, tuned);
    TORCH_CHECK_VALUE(reference.has_value(), "reference is required when knowledge is given");
  }
  if (reference) {
    check_logits("reference", *reference, 3, batch, vocab_size, tuned);
    TORCH_CHECK_VALUE(reference->size(0) == 1 || reference->size(0) == num_tuned, "reference must hold 1 or ",
                      num_tuned, " models, got ", reference->size(0));
  }
  check_row_param("temperature", temperature, batch, at::kFloat, tuned);
  check_row_param("weight_top_p", weight_top_p, batch, at::kFloat, tuned);
  check_row_param("top_p", top_p, batch, at::kFloat, tuned);
  check_row_param("top_k", top_k, batch, at::kLong, tuned);
  TORCH_CHECK_VALUE(reward_weights.dim() == 2 && reward_weights.size(0) == batch &&
                        reward_weights.size(1) == num_tuned && reward_weights.scalar_type() == at::kFloat,
                    "reward_weights must be a [", batch, ", ", num_tuned, "] float32 tensor, got ",
                    reward_weights.sizes(), " ", reward_weights.scalar_type());
  TORCH_CHECK_VALUE(reward_weights.device() == tuned.device(), "reward_weights must be on ", tuned.device());
}

}  // namespace eft_fast
