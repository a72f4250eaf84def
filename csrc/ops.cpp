#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "droidspeak CPU kernels";
  // The model's long ops release the GIL as torch's own do: the server's event loop
  // (another thread) runs while the scheduler thread is inside them.
  m.def("rope_and_store", &rope_and_store,
        "Rotate q and k in place (rotate-half RoPE) and store k, v into pool slots");
  m.def("extend_attention", &extend_attention, pybind11::call_guard<pybind11::gil_scoped_release>(),
        "Prefill attention over pool slots, fused with RoPE and the KV store (ragged batch)");
  m.def("decode_attention", &decode_attention, pybind11::call_guard<pybind11::gil_scoped_release>(),
        "Single-token attention reading K/V from the pool through req_to_token");
  m.def("grouped_linear", &grouped_linear, pybind11::call_guard<pybind11::gil_scoped_release>(),
        "Segmented bf16 linear: each group of rows through its own weight, one parallel region");
  m.def("amx_available", &amx_available, "Whether grouped_linear runs on AMX tiles on this CPU");
  m.def("decode_team_steps", &decode_team_steps, "LayerStack runs that took the decode team so far");
  m.def("rmsnorm", &rmsnorm, "RMSNorm per row (fp32 statistics), optionally one weight row per group");
  m.def("add_rmsnorm", &add_rmsnorm, "(x + delta, rmsnorm(x + delta)): a residual add and the next norm, one pass");
  m.def("argmax_rows", &argmax_rows, "Index of each row's first maximum of a float32 [B, V] (greedy sampling)");
  m.def("silu_and_mul", &silu_and_mul, "SwiGLU activation: silu(gate) * up over [T, 2 * I]");
  m.def("rans_encode", &rans_encode, "Static-model rANS: encode int32 symbols segment by segment");
  m.def("rans_decode", &rans_decode, "Static-model rANS: decode, validating the untrusted stream");
  m.def("cachegen_dequantize", &cachegen_dequantize,
        "CacheGen lossy levels: anchors + deltas times their steps, [L, T, C] fp32, on the calling thread");
  m.def("fp32_to_bf16", &fp32_to_bf16, "fp32 -> bf16 on the calling thread (no OpenMP)");
  m.def("codec_transform", &codec_transform,
        "A codec profile's per-layer K and V transforms, on the calling thread");
  pybind11::class_<LoRAStack, std::shared_ptr<LoRAStack>>(m, "LoRAStack",
                                                         "A LoRA adapter's per-layer updates for a LayerStack")
      .def(pybind11::init<std::vector<std::vector<c10::optional<at::Tensor>>>>());
  pybind11::class_<LayerStack>(m, "LayerStack", "A co-batched family's decoder layers, run in one call")
      .def(pybind11::init<std::vector<std::vector<at::Tensor>>, std::vector<int64_t>, int64_t, bool, int64_t,
                          int64_t, int64_t, double>())
      .def("run", &LayerStack::run, pybind11::call_guard<pybind11::gil_scoped_release>());
}
