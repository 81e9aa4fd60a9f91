/* What the AMX kernels share (lowbit_gemm_amx.c, gram_bf16_amx.c): the tile configuration (eight tiles of
 * 16 rows x 64 bytes: four float32 accumulators, two tiles of each operand) and the per-process permission
 * Linux asks for before a process may use the tile state. */
#ifndef HVG_AMX_TILES_H
#define HVG_AMX_TILES_H
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* every tile 16 rows of 64 bytes (this thread's tile state; _tile_release() gives it back) */
static void configure_tiles(void) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int t = 0; t < 8; t++) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    _tile_loadconfig(&cfg);
}

/* 1 once this process may use AMX tiles (asked once per process: a race asks twice), 0 when Linux refuses */
static int amx_permitted(void) {
    static volatile int permitted = 0;
    if (!permitted) {
        if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0) return 0;
        permitted = 1;
    }
    return 1;
}

#endif
