// CPU implementation of eft_fast::gumbel_noise: the section-3 noise of every token.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../eft_math.h"
#include "../op_checks.h"

namespace eft_fast {

at::Tensor gumbel_noise_cpu(const at::Tensor& seeds, const at::Tensor& positions, int64_t vocab_size) {
  check_seeds_positions(seeds, positions, vocab_size);
  const int64_t batch = seeds.size(0);
  auto out = at::empty({batch, vocab_size}, seeds.options().dtype(at::kFloat));
  const auto seeds_c = seeds.contiguous();
  const auto positions_c = positions.contiguous();
  const int64_t* seed_ptr = seeds_c.data_ptr<int64_t>();
  const int64_t* pos_ptr = positions_c.data_ptr<int64_t>();
  float* out_ptr = out.data_ptr<float>();
  at::parallel_for(0, batch * vocab_size, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / vocab_size;
      const int64_t j = i % vocab_size;
      out_ptr[i] = gumbel_noise(static_cast<uint64_t>(seed_ptr[b]), static_cast<uint32_t>(j),
                                static_cast<uint32_t>(pos_ptr[b]));
    }
  });
  return out;
}

}  // namespace eft_fast

TORCH_LIBRARY_IMPL(eft_fast, CPU, m) { m.impl("gumbel_noise", &eft_fast::gumbel_noise_cpu); }
