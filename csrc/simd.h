#pragma once
// x86 SIMD intrinsics for the vector kernels. GCC 12 warns that the intrinsics'
// own undefined-vector placeholders (`__Y` in avx512fintrin.h) are used
// uninitialised wherever casts, shuffles and reductions are inlined (GCC bug
// 105593, fixed in GCC 13); those two warnings are off in files that include this.
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
// The AVX512-BF16 dot-product kernels' build-time guard, one definition for every file.
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define DS_HAVE_AVX512BF16 1
#endif
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#if defined(__AVX512F__)
// The horizontal sums of four vectors, as one vector [sum(a), sum(b), sum(c), sum(d)],
// by a fixed tree (the same roundings wherever it is used): each vector's halves
// added, then two rounds of pairwise adds. Rows that must come out bit-identical
// across kernels share it.
inline __m128 hsum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const auto halves = [](__m512 v) {
    return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  };
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(halves(a), halves(b)), _mm256_hadd_ps(halves(c), halves(d)));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
#endif
