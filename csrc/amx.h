#pragma once
// What the AMX kernels share: the build-time guard, the tile configuration
// record (palette 1) and the one-time request for the tile state.
#include <cstddef>
#include <new>
#include <vector>

// Storage for tile operands, 64-byte aligned and not zeroed: a tile whose rows straddle two
// cache lines loads at about half speed.
template <class T>
struct TileAllocator {
  using value_type = T;
  TileAllocator() = default;
  template <class U>
  TileAllocator(const TileAllocator<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  // resize() leaves the elements uninitialised (the packers write every word)
  template <class U>
  void construct(U* p) {
    ::new (static_cast<void*>(p)) U;
  }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <class U>
  bool operator==(const TileAllocator<U>&) const { return true; }
  template <class U>
  bool operator!=(const TileAllocator<U>&) const { return false; }
};
template <class T>
using TileVector = std::vector<T, TileAllocator<T>>;

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#define DS_HAVE_AMX 1
#include "transpose.h"

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
  // GCC 12 does not count ldtilecfg as reading all 64 bytes: in a small function
  // it dropped the stores of rows and colsb (a #GP at the load). The empty asm
  // with a memory clobber keeps them.
  void load() const {
    asm volatile("" : : "r"(this) : "memory");
    _tile_loadconfig(this);
  }
};

// Column c of a stored 16 x 16 fp32 tile (rows 64 bytes apart), as one vector.
inline __m512 tile_column(const float (*tile)[16], int c) {
  const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                          _mm512_set1_epi32(16));
  return _mm512_i32gather_ps(_mm512_add_epi32(rows, _mm512_set1_epi32(c)), &tile[0][0], 4);
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
