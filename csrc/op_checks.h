// Input checks shared by the CPU and CUDA bindings. The Python wrapper validates user
// input with messages for users; these checks guard direct torch.ops callers.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

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

}  // namespace eft_fast
