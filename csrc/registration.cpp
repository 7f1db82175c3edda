// Op schemas (each written once) and the Python module of the extension.
//
// The module `eft_fast._C` has no Python functions: importing it runs the static
// registrations below, after which the ops live under torch.ops.eft_fast.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "build_info.h"

namespace {

std::string build_info_json() { return EFT_FAST_BUILD_INFO_JSON; }

}  // namespace

TORCH_LIBRARY(eft_fast, m) {
  // Fused EFT sampling (docs/DESIGN.md sections 2-3). Shapes:
  //   knowledge [B, Vk] or None (draft mode), tuned [R, B, Vt], reference [Rr, B, Vr] or
  //   None (draft mode with R = 1 and weight 1), seeds/positions [B] int64,
  //   reward_weights [B, R] fp32, temperature/weight_top_p/top_p [B] fp32, top_k [B] int64.
  // Returns tokens [B] int64, logprob [B] fp32, row_logprobs [B, V] fp32 (or [0, V]
  // when not requested), status [B] int32 (0 ok, 1 NaN input, 2 no allowed token).
  m.def(
      "eft_sample(Tensor? knowledge, Tensor tuned, Tensor? reference, Tensor seeds, "
      "Tensor positions, Tensor reward_weights, Tensor temperature, Tensor weight_top_p, "
      "Tensor top_k, Tensor top_p, int vocab_size, bool return_logprobs) "
      "-> (Tensor tokens, Tensor logprob, Tensor row_logprobs, Tensor status)");
  // Gumbel noise g[b, j] of docs/DESIGN.md section 3: [B] seeds, [B] positions -> [B, V] fp32.
  m.def("gumbel_noise(Tensor seeds, Tensor positions, int vocab_size) -> Tensor");
  // JSON: compiled backends, CUDA architectures, and the torch the extension was built with.
  m.def("build_info() -> str", &build_info_json);
}

static struct PyModuleDef eft_fast_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&eft_fast_c_module); }
