// The GEMM the tile path uses, AVX-512 or AVX2 by lm_cpu_level() (private to CKernels).
#pragma once
#include <stdint.h>
#include <stddef.h>

// Memory to pull into L2 while the GEMM computes: rate / 65536 lines per
// 8 rows x 8 columns x one k of work (a 16-row kernel's iteration counts
// twice, a 32-row one's four times), spread evenly so the lines do not all
// queue for DRAM at the start of a tile. Rate at most 1/4 of 65536, so a
// line issues at most every ~16 cycles (rate 65536/4 with 32 rows: one per
// iteration). cur/end: the span being read (set to the first span, with
// i = 1, before the first call); acc: the fixed-point remainder carried from
// one kernel call to the next. Lets the LoRA chunks a thread runs after a
// base tile find their A and B in cache instead of waiting on DRAM with the
// FMA units idle.
typedef struct { const char *p, *end; } lm_span;
typedef struct {
    const lm_span *spans;
    int n, i;
    const char *cur, *end;
    uint32_t rate, acc;
    int t0;  // prefetch with the T0 hint instead of NTA (gemm.c)
} lm_prefetch;

// XT (n_in, ldxt) = X (n_rows, ldx)^T for columns [k0, k1), rows n_rows..ldxt-1 zero.
void lm_gemm_pack_xt(const float *X, int64_t ldx, int64_t n_rows, int64_t k0, int64_t k1, float *XT, int64_t ldxt);
// Y (n_rows, ldy)[:, 0:n_cols] = XT^T @ W^T; W (n_cols, ldw) f32 row-major, XT from
// lm_gemm_pack_xt (ldxt a multiple of 8). Each output is one FMA chain over k
// in order, so it does not depend on tiling or on the other rows. pf may be NULL
// (the AVX2 kernel ignores it: matmul.c prefetches only on AVX-512).
void lm_gemm(int64_t n_in, const float *XT, int64_t ldxt, int64_t n_rows,
             const float *W, int64_t ldw, int64_t n_cols, float *Y, int64_t ldy, lm_prefetch *pf);
