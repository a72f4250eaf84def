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
