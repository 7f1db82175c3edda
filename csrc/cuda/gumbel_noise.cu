// CUDA implementation of eft_fast::gumbel_noise, the twin of csrc/cpu/gumbel_noise.cpp.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../eft_math.h"
#include "../op_checks.h"

namespace eft_fast {
namespace {

__global__ void gumbel_noise_kernel(const int64_t* __restrict__ seeds, const int64_t* __restrict__ positions,
                                    int64_t vocab_size, float* __restrict__ out) {
  const int64_t b = blockIdx.y;
  const uint64_t seed = static_cast<uint64_t>(seeds[b]);
  const uint32_t position = static_cast<uint32_t>(positions[b]);
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < vocab_size;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[b * vocab_size + j] = gumbel_noise(seed, static_cast<uint32_t>(j), position);
  }
}

}  // namespace

at::Tensor gumbel_noise_cuda(const at::Tensor& seeds, const at::Tensor& positions, int64_t vocab_size) {
  check_seeds_positions(seeds, positions, vocab_size);
  const c10::cuda::CUDAGuard guard(seeds.device());
  const int64_t batch = seeds.size(0);
  auto out = at::empty({batch, vocab_size}, seeds.options().dtype(at::kFloat));
  if (batch == 0) return out;
  TORCH_CHECK_VALUE(batch <= 65535, "gumbel_noise supports at most 65535 rows, got ", batch);
  const auto seeds_c = seeds.contiguous();
  const auto positions_c = positions.contiguous();
  constexpr int kThreads = 256;
  const int64_t blocks_x = std::min<int64_t>((vocab_size + kThreads - 1) / kThreads, 1024);
  const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(batch));
  gumbel_noise_kernel<<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      seeds_c.data_ptr<int64_t>(), positions_c.data_ptr<int64_t>(), vocab_size, out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace eft_fast

TORCH_LIBRARY_IMPL(eft_fast, CUDA, m) { m.impl("gumbel_noise", &eft_fast::gumbel_noise_cuda); }
