#pragma once
// x86 SIMD intrinsics for the vector kernels. GCC 12 warns that the intrinsics'
// own undefined-vector placeholders (`__Y` in avx512fintrin.h) are used
// uninitialised wherever casts, shuffles and reductions are inlined (GCC bug
// 105593, fixed in GCC 13); those two warnings are off in files that include this.
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
