#pragma once
// ATen's Vectorized<> picks its implementation from CPU_CAPABILITY_* macros that
// torch's own build sets per file; without them an extension gets the scalar
// fallback (std::exp per element). Select it from what -march=native enabled.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2
#endif
#include <ATen/cpu/vec/vec.h>
