#pragma once
// What the AMX kernels share: the build-time guard, the tile configuration
// record (palette 1) and the one-time request for the tile state.
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#define DS_HAVE_AMX 1

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};

  void set(int tile, int rows_, int colsb_) {
    rows[tile] = static_cast<uint8_t>(rows_);
    colsb[tile] = static_cast<uint16_t>(colsb_);
  }
};

// Column c of a stored 16 x 16 fp32 tile (rows 64 bytes apart), as one vector.
inline __m512 tile_column(const float (*tile)[16], int c) {
  const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                          _mm512_set1_epi32(16));
  return _mm512_i32gather_ps(_mm512_add_epi32(rows, _mm512_set1_epi32(c)), &tile[0][0], 4);
}

// out[c] = column c of the 16 x 16 floats at m (rows 16 floats apart): pairs of
// rows interleaved, then quads, then 128-bit lanes twice.
inline void transpose16(const float (*m)[16], __m512 (&out)[16]) {
  __m512 t[16], u[16], v[16];
  for (int i = 0; i < 8; ++i) {
    const __m512 a = _mm512_load_ps(m[2 * i]), b = _mm512_load_ps(m[2 * i + 1]);
    t[2 * i] = _mm512_unpacklo_ps(a, b);
    t[2 * i + 1] = _mm512_unpackhi_ps(a, b);
  }
  for (int g = 0; g < 4; ++g) {  // u[4g + j]: rows 4g..4g+3, column 4L + j in lane L
    u[4 * g] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
    u[4 * g + 1] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0xEE);
    u[4 * g + 2] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
    u[4 * g + 3] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
  }
  for (int j = 0; j < 4; ++j) {
    v[j] = _mm512_shuffle_f32x4(u[j], u[4 + j], 0x88);
    v[4 + j] = _mm512_shuffle_f32x4(u[j], u[4 + j], 0xDD);
    v[8 + j] = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0x88);
    v[12 + j] = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0xDD);
  }
  for (int j = 0; j < 4; ++j) {
    out[j] = _mm512_shuffle_f32x4(v[j], v[8 + j], 0x88);
    out[8 + j] = _mm512_shuffle_f32x4(v[j], v[8 + j], 0xDD);
    out[4 + j] = _mm512_shuffle_f32x4(v[4 + j], v[12 + j], 0x88);
    out[12 + j] = _mm512_shuffle_f32x4(v[4 + j], v[12 + j], 0xDD);
  }
}

// Linux hands out the tile state only on request, once per process;
// DROIDSPEAK_NO_AMX=1 keeps the vector paths (to compare the two).
inline bool amx_permitted() {
  static const bool ok = [] {
    if (const char* off = std::getenv("DROIDSPEAK_NO_AMX"); off && *off && std::strcmp(off, "0") != 0) return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}
#endif
