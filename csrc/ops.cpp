#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "droidspeak CPU kernels";
  m.def("rope_and_store", &rope_and_store,
        "Rotate q and k in place (rotate-half RoPE) and store k, v into pool slots");
  m.def("extend_attention", &extend_attention,
        "Prefill attention over pool slots, fused with RoPE and the KV store (ragged batch)");
  m.def("decode_attention", &decode_attention,
        "Single-token attention reading K/V from the pool through req_to_token");
}
