// Y = X @ W^T with W in its stored dtype.
//  - few rows (decode): GEMV kernels that read each quantized block once and
//    apply it to up to 4 rows, split over the pool by output rows;
//  - many rows (prefill, big batches): each thread dequantizes a tile of W
//    into f32 scratch and multiplies it with our AVX-512 kernel (gemm.c) over
//    X^T, packed once per call; below AVX-512, for 8 rows or fewer, or when
//    rounding the rows up to 8 would waste more than a quarter of the work,
//    single-threaded OpenBLAS sgemm takes the tile.
// Activations are never rounded: results match an f32 reference up to the
// order of additions.
#include "kernels.h"
#include "cblas_shim.h"
#include "simd_x86.h"
#include "gemm.h"
#include <string.h>
#include <stdlib.h>
#include <math.h>
#include <stdatomic.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#define TILE_ROWS 64
#define GEMV_GROUP 4

// Up to how many rows the GEMV kernels beat dequantized tiles. They cost
// about one pass per group of 4 rows; the tiles dequantize all of W whatever
// the row count. Zen 5, batch decode ms a step (none / distinct): 8 rows
// 10.6 / 12.6 by GEMV against 34 / 36 by OpenBLAS tiles and 21.9 / 24.6 by
// our GEMM; 12 rows 15.4 / 18.5 against 23.8 / 26.1 (our GEMM); 16 rows
// 19.9 / 24.0 against 21.4 / 23.1. On Zen 4 batch-8 decode took 22.7 ms
// with OpenBLAS tiles, about what two 4-row GEMV passes take (11.3 ms at
// batch 4), so 8 there: no slower, and rows 5-8 then get the same bits as
// rows 1-4. AVX2 (Zen 2, the 30 layers' Q4_1 GEMMs of a decode step,
// ms): 5 rows 14.6 by two GEMV passes against 25.1 by our ymm GEMM, 8 rows
// 21.1 against 25.5, 12 rows 30.1 against 29.4: 8. Scalar: 4.
static int g_gemv_max_rows = -1;  // < 0: the default above
int lm_matmul_gemv_max_rows(void) {
    if (g_gemv_max_rows >= 0) return g_gemv_max_rows;
    int level = lm_cpu_level();
    return level < LM_CPU_AVX2 ? 4 : level < LM_CPU_AVX512 ? 8 : lm_cpu_wide512() ? 12 : 8;
}
void lm_matmul_set_gemv_max_rows(int n) { g_gemv_max_rows = n < 0 ? -1 : n; }

static int g_early_chunks = -1;
void lm_matmul_set_early_chunks(int n) { g_early_chunks = n; }

static inline uint16_t rd16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline int has_gemv(int dtype) { return dtype == LM_Q4_0 || dtype == LM_Q4_1 || dtype == LM_Q8_0; }

static inline int64_t xt_ld(int64_t n_rows) { return (n_rows + 7) / 8 * 8; }

// Our kernel computes rows in blocks of 32, 16 and 8: use it when padding
// costs at most a quarter, and for more than 8 rows (its 8-row block is
// slower than OpenBLAS's small-M kernel: batch-8 decode 27 vs 23 ms a step;
// as the last block of 24 or 40 rows it beats padding to 16). Without AVX-512
// its ymm twin (gemm.c) takes the same shapes and also 5 to 8 rows of dtypes
// without a GEMV: on Zen 2 batch-8 decode took 47.8 ms a step with OpenBLAS
// tiles and 34.3 with ours (Q4/Q8 rows 5-8 now go to the faster GEMV).
static inline int use_gemm(int level, int64_t n_rows) {
    if (level == LM_CPU_AVX2 && n_rows <= 8) return n_rows > 4;
    return level >= LM_CPU_AVX2 && n_rows > 8 && 4 * n_rows >= 3 * xt_ld(n_rows);
}

size_t lm_matmul_scratch_floats(int64_t n_in, int64_t n_rows) {
    int nth = lm_pool_threads();
    // per-thread dequantized tile + per-row block sums of X (for Q4_0/Q4_1) + X^T
    size_t tile = (size_t)nth * TILE_ROWS * (size_t)n_in;
    size_t sums = (size_t)n_rows * (size_t)(n_in / 32 + 1);
    size_t xt = (size_t)n_in * (size_t)xt_ld(n_rows);
    return tile + sums + xt + 64 + 16;
}

// X^T lives after the tiles and the block sums, 64-byte aligned.
static float *xt_area(float *scratch, int64_t n_in, int64_t n_rows) {
    float *p = scratch + (size_t)lm_pool_threads() * TILE_ROWS * (size_t)n_in + (size_t)n_rows * (size_t)(n_in / 32 + 1);
    return (float *)(((uintptr_t)p + 63) & ~(uintptr_t)63);
}

// ---- GEMV kernels: rows [o0, o1) of W against nr (<= 4) rows of X ----------
// xs: per-row block sums of X (nr, nb), used by formats with an offset term.

static void gemv_scalar(int dtype, const uint8_t *W, int64_t n_in, int64_t o0, int64_t o1,
                        const float *X, int64_t ldx, int nr, const float *xs, int64_t nb,
                        float *Y, int64_t ldy) {
    size_t bb = lm_block_bytes(dtype);
    for (int64_t o = o0; o < o1; o++) {
        const uint8_t *row = W + (size_t)o * (size_t)nb * bb;
        for (int r = 0; r < nr; r++) {
            const float *x = X + r * ldx;
            float acc = 0.0f, off = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *p = row + b * bb;
                const float *xb = x + b * 32;
                float s = 0.0f;
                if (dtype == LM_Q8_0) {
                    for (int j = 0; j < 32; j++) s += xb[j] * (float)(int8_t)p[2 + j];
                    acc += s * lm_f16_to_f32(rd16(p));
                } else {
                    const uint8_t *q = p + (dtype == LM_Q4_1 ? 4 : 2);
                    for (int j = 0; j < 16; j++) s += xb[j] * (float)(q[j] & 0xF) + xb[j + 16] * (float)(q[j] >> 4);
                    float d = lm_f16_to_f32(rd16(p));
                    acc += s * d;
                    float m = dtype == LM_Q4_1 ? lm_f16_to_f32(rd16(p + 2)) : -8.0f * d;
                    off += m * xs[r * nb + b];
                }
            }
            Y[r * ldy + o] = acc + off;
        }
    }
}

#if defined(__x86_64__)
// AVX-512 GEMV. Each block's 32 weights are dequantized exactly as gguf-py
// does (d*q + m, rounded twice) and then FMA'd into two accumulators per row
// (low and high half), so the FMA chains are independent. For Q4_x the 16
// possible values of a block come from one table (d*j + m, j = 0..15) and a
// permute, which is cheaper than converting every nibble to float.
#define GEMV512_BODY(NR)                                                                       \
    for (int64_t o = o0; o < o1; o++) {                                                        \
        const uint8_t *row = W + (size_t)o * (size_t)nb * bb;                                  \
        __m512 alo[NR], ahi[NR];                                                               \
        for (int r = 0; r < NR; r++) { alo[r] = _mm512_setzero_ps(); ahi[r] = _mm512_setzero_ps(); } \
        for (int64_t b = 0; b < nb; b++) {                                                     \
            const uint8_t *p = row + b * bb;                                                   \
            __m512 lo, hi;                                                                     \
            __m512 d = _mm512_set1_ps(_cvtsh_ss(rd16(p)));                                     \
            if (dtype == LM_Q8_0) {                                                            \
                lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p + 2)))), d); \
                hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p + 18)))), d); \
            } else {                                                                           \
                __m512 table;                                                                  \
                __m128i v;                                                                     \
                if (dtype == LM_Q4_1) {                                                        \
                    table = _mm512_add_ps(_mm512_mul_ps(d, iota), _mm512_set1_ps(_cvtsh_ss(rd16(p + 2)))); \
                    v = _mm_loadu_si128((const __m128i *)(p + 4));                             \
                } else {                                                                       \
                    table = _mm512_mul_ps(iota_m8, d);                                         \
                    v = _mm_loadu_si128((const __m128i *)(p + 2));                             \
                }                                                                              \
                __m512i ql = _mm512_cvtepu8_epi32(_mm_and_si128(v, mask));                     \
                __m512i qh = _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(v, 4), mask));  \
                lo = _mm512_permutexvar_ps(ql, table);                                         \
                hi = _mm512_permutexvar_ps(qh, table);                                         \
            }                                                                                  \
            for (int r = 0; r < NR; r++) {                                                     \
                const float *xb = X + r * ldx + b * 32;                                        \
                alo[r] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xb), alo[r]);                     \
                ahi[r] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xb + 16), ahi[r]);                \
            }                                                                                  \
        }                                                                                      \
        for (int r = 0; r < NR; r++) Y[r * ldy + o] = _mm512_reduce_add_ps(_mm512_add_ps(alo[r], ahi[r])); \
    }

#define GEMV512_FN(NR)                                                                          \
__attribute__((target("avx512f,avx512bw,avx512vl,f16c,fma")))                                   \
static void gemv_avx512_##NR(int dtype, const uint8_t *W, int64_t o0, int64_t o1,               \
                             const float *X, int64_t ldx, int64_t nb, float *Y, int64_t ldy) {  \
    const size_t bb = lm_block_bytes(dtype);                                                    \
    const __m128i mask = _mm_set1_epi8(0x0F);                                                   \
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);   \
    const __m512 iota_m8 = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7); \
    GEMV512_BODY(NR)                                                                            \
}
GEMV512_FN(1)
GEMV512_FN(2)
GEMV512_FN(3)
GEMV512_FN(4)

static void gemv_avx512(int dtype, const uint8_t *W, int64_t n_in, int64_t o0, int64_t o1,
                        const float *X, int64_t ldx, int nr, const float *xs, int64_t nb,
                        float *Y, int64_t ldy) {
    (void)n_in; (void)xs;
    switch (nr) {
    case 1: gemv_avx512_1(dtype, W, o0, o1, X, ldx, nb, Y, ldy); break;
    case 2: gemv_avx512_2(dtype, W, o0, o1, X, ldx, nb, Y, ldy); break;
    case 3: gemv_avx512_3(dtype, W, o0, o1, X, ldx, nb, Y, ldy); break;
    default: gemv_avx512_4(dtype, W, o0, o1, X, ldx, nb, Y, ldy); break;
    }
}

// AVX2 GEMV. The dtype and the row count are compile-time constants in each
// copy, so the accumulators stay in registers and the block loop has no
// branch: with a runtime row count they lived on the stack and every block's
// FMA waited on a store-forward (Zen 2: ~16 cycles a block, 75 tokens/s
// single-stream). Each block is sum(q*x) scaled by d, plus m times the
// block's sum of X (xs), in one chain per row whatever the group's size.
__attribute__((target("avx2,fma,f16c"), always_inline))
static inline void gemv_avx2_rows(const int dtype, const int NR, const uint8_t *W, int64_t o0, int64_t o1,
                                  const float *X, int64_t ldx, const float *xs, int64_t nb,
                                  float *Y, int64_t ldy) {
    const size_t bb = lm_block_bytes(dtype);
    const __m256i mask = _mm256_set1_epi32(0x0F);
    for (int64_t o = o0; o < o1; o++) {
        const uint8_t *row = W + (size_t)o * (size_t)nb * bb;
        __m256 acc[4];
        float off[4];
        for (int r = 0; r < NR; r++) { acc[r] = _mm256_setzero_ps(); off[r] = 0.0f; }
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *p = row + b * bb;
            __m256 w[4];
            // d (and Q4_1's m) from one 32-bit load and one conversion.
            uint32_t dm32;
            memcpy(&dm32, p, 4);
            __m128 dm = _mm_cvtph_ps(_mm_cvtsi32_si128((int)dm32));
            if (dtype == LM_Q8_0) {
                for (int k = 0; k < 4; k++)
                    w[k] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p + 2 + 8 * k))));
            } else {
                // Bytes widened to dwords straight from memory: a dword's
                // high nibble is then a shift, with no mask and no shuffle.
                const uint8_t *q = p + (dtype == LM_Q4_1 ? 4 : 2);
                __m256i v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)q));
                __m256i v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8)));
                w[0] = _mm256_cvtepi32_ps(_mm256_and_si256(v0, mask));
                w[1] = _mm256_cvtepi32_ps(_mm256_and_si256(v1, mask));
                w[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(v0, 4));
                w[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(v1, 4));
                float m = dtype == LM_Q4_1 ? _mm_cvtss_f32(_mm_movehdup_ps(dm)) : -8.0f * _mm_cvtss_f32(dm);
                for (int r = 0; r < NR; r++) off[r] += m * xs[r * nb + b];
            }
            __m256 dv = _mm256_broadcastss_ps(dm);
            for (int r = 0; r < NR; r++) {
                const float *xb = X + r * ldx + b * 32;
                __m256 t = _mm256_mul_ps(w[0], _mm256_loadu_ps(xb));
                t = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xb + 8), t);
                t = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xb + 16), t);
                t = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xb + 24), t);
                acc[r] = _mm256_fmadd_ps(t, dv, acc[r]);
            }
        }
        for (int r = 0; r < NR; r++) Y[r * ldy + o] = lm_hsum256(acc[r]) + off[r];
    }
}

#define GEMV256_FN(DT, NR)                                                                      \
__attribute__((target("avx2,fma,f16c")))                                                        \
static void gemv_avx2_##DT##_##NR(const uint8_t *W, int64_t o0, int64_t o1, const float *X,     \
                                  int64_t ldx, const float *xs, int64_t nb, float *Y, int64_t ldy) { \
    gemv_avx2_rows(LM_##DT, NR, W, o0, o1, X, ldx, xs, nb, Y, ldy);                             \
}
#define GEMV256_DT(DT) GEMV256_FN(DT, 1) GEMV256_FN(DT, 2) GEMV256_FN(DT, 3) GEMV256_FN(DT, 4) \
    static void (*const gemv_avx2_##DT[4])(const uint8_t *, int64_t, int64_t, const float *,    \
                                           int64_t, const float *, int64_t, float *, int64_t) = { \
        gemv_avx2_##DT##_1, gemv_avx2_##DT##_2, gemv_avx2_##DT##_3, gemv_avx2_##DT##_4 };
GEMV256_DT(Q4_0)
GEMV256_DT(Q4_1)
GEMV256_DT(Q8_0)

static void gemv_avx2(int dtype, const uint8_t *W, int64_t n_in, int64_t o0, int64_t o1,
                      const float *X, int64_t ldx, int nr, const float *xs, int64_t nb,
                      float *Y, int64_t ldy) {
    (void)n_in;
    int i = nr < 4 ? nr - 1 : 3;
    if (dtype == LM_Q4_0) gemv_avx2_Q4_0[i](W, o0, o1, X, ldx, xs, nb, Y, ldy);
    else if (dtype == LM_Q4_1) gemv_avx2_Q4_1[i](W, o0, o1, X, ldx, xs, nb, Y, ldy);
    else gemv_avx2_Q8_0[i](W, o0, o1, X, ldx, xs, nb, Y, ldy);
}
#endif

// ---- driver -------------------------------------------------------------

// Split [0, n) into nth chunks aligned to `align`.
static void split(int64_t n, int ith, int nth, int64_t align, int64_t *a, int64_t *b) {
    int64_t units = (n + align - 1) / align;
    int64_t per = units / nth, extra = units % nth;
    int64_t u0 = ith * per + (ith < extra ? ith : extra);
    int64_t u1 = u0 + per + (ith < extra ? 1 : 0);
    *a = u0 * align < n ? u0 * align : n;
    *b = u1 * align < n ? u1 * align : n;
}

typedef struct {
    const uint8_t *W;
    int dtype;
    int64_t n_out, n_in, ldx, n_rows, ldy;
    const float *X;
    float *Y;
    float *tiles;   // nth * TILE_ROWS * n_in
    float *xsums;   // n_rows * nb
    float *XT;      // n_in x ldxt when our GEMM takes the tiles, else NULL
    int64_t ldxt;
    _Atomic int *xt_ready;
    int level;
} mm_ctx;

// X^T up to this many floats is built by the caller before the section (a few
// microseconds); larger ones (prefill) by all threads, then a barrier. A
// barrier at every section start cost more than the small transposes: the
// threads arrive up to ~10 us apart.
#define XT_SERIAL_FLOATS (1 << 17)

// X^T for our GEMM (NULL when OpenBLAS takes the tiles). Small ones are packed
// here, and *ready becomes NULL (no barrier); larger ones are left for the
// threads' xt_build, counted in *ready.
static float *xt_prepare(int level, const float *X, int64_t ldx, int64_t n_rows, int64_t n_in, float *scratch,
                         _Atomic int **ready) {
    if (!use_gemm(level, n_rows)) return NULL;
    float *XT = xt_area(scratch, n_in, n_rows);
    if (n_rows * n_in <= XT_SERIAL_FLOATS) { lm_gemm_pack_xt(X, ldx, n_rows, 0, n_in, XT, xt_ld(n_rows)); *ready = NULL; }
    return XT;
}

// Each thread transposes its share of X's columns; all wait for the whole.
static void xt_build(const mm_ctx *m, int ith, int nth) {
#if defined(__x86_64__)
    if (!m->xt_ready) return;  // built before the section
    int64_t k0, k1;
    split(m->n_in, ith, nth, 16, &k0, &k1);
    lm_gemm_pack_xt(m->X, m->ldx, m->n_rows, k0, k1, m->XT, m->ldxt);
    atomic_fetch_add_explicit(m->xt_ready, 1, memory_order_acq_rel);
    for (int spins = 0; atomic_load_explicit(m->xt_ready, memory_order_acquire) < nth; spins++) lm_spin_wait(spins);
#endif
}

static void task_gemv(void *vctx, int ith, int nth) {
    mm_ctx *c = (mm_ctx *)vctx;
    int64_t o0, o1;
    split(c->n_out, ith, nth, 16, &o0, &o1);
    if (o0 >= o1) return;
    int64_t nb = c->n_in / 32;
    for (int64_t r0 = 0; r0 < c->n_rows; r0 += GEMV_GROUP) {
        int nr = (int)(c->n_rows - r0 < GEMV_GROUP ? c->n_rows - r0 : GEMV_GROUP);
        const float *X = c->X + r0 * c->ldx;
        const float *xs = c->xsums + r0 * nb;
        float *Y = c->Y + r0 * c->ldy;
#if defined(__x86_64__)
        if (c->level >= LM_CPU_AVX512) { gemv_avx512(c->dtype, c->W, c->n_in, o0, o1, X, c->ldx, nr, xs, nb, Y, c->ldy); continue; }
        if (c->level >= LM_CPU_AVX2) { gemv_avx2(c->dtype, c->W, c->n_in, o0, o1, X, c->ldx, nr, xs, nb, Y, c->ldy); continue; }
#endif
        gemv_scalar(c->dtype, c->W, c->n_in, o0, o1, X, c->ldx, nr, xs, nb, Y, c->ldy);
    }
}

// Tiles: output columns cut into a multiple of nth equal tiles of at most
// `cols` (TILE_ROWS, or less for sections with LoRA chunks; so k/v's 192
// columns are 4 x 48 on two threads, not 64+64 | 64). With OpenBLAS tiles
// lm_matmul and lm_matmul_lora cut the same tiles, so a row's base result
// does not depend on which of them ran it; our GEMM's results do not depend
// on the tiles at all.
static inline int64_t tile_count(int64_t n_out, int nth, int64_t cols) {
    int64_t n = (n_out + cols - 1) / cols;
    return (n + nth - 1) / nth * nth;
}

static inline int64_t tile_width(int64_t n_out, int64_t n_tiles) { return (n_out + n_tiles - 1) / n_tiles; }

// Tile j's columns, [*c0, *c0 + n) with n returned, when tiles are `width`
// wide; n <= 0 for an empty last tile.
static inline int64_t tile_cols(int64_t n_out, int64_t width, int64_t j, int64_t *c0) {
    *c0 = j * width;
    return n_out - *c0 < width ? n_out - *c0 : width;
}

static void mm_tile(mm_ctx *m, int ith, int64_t t, int64_t n_tiles, lm_prefetch *pf) {
    int64_t t0, tn = tile_cols(m->n_out, tile_width(m->n_out, n_tiles), t, &t0);
    if (tn <= 0) return;
    const float *w;
    if (m->dtype == LM_F32) {
        w = (const float *)m->W + t0 * m->n_in;
    } else {
        float *tile = m->tiles + (size_t)ith * TILE_ROWS * (size_t)m->n_in;
        size_t row_bytes = (size_t)(m->n_in / lm_block_size(m->dtype)) * lm_block_bytes(m->dtype);
        for (int64_t i = 0; i < tn; i++) lm_dequant_row(m->dtype, m->W + (size_t)(t0 + i) * row_bytes, tile + i * m->n_in, m->n_in);
        w = tile;
    }
#if defined(__x86_64__)
    if (m->XT) { lm_gemm(m->n_in, m->XT, m->ldxt, m->n_rows, w, m->n_in, tn, m->Y + t0, m->ldy, pf); return; }
#endif
    (void)pf;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)m->n_rows, (int)tn, (int)m->n_in,
                1.0f, m->X, (int)m->ldx, w, (int)m->n_in, 0.0f, m->Y + t0, (int)m->ldy);
}

static void task_tiles(void *vctx, int ith, int nth) {
    mm_ctx *c = (mm_ctx *)vctx;
    int64_t n_tiles = tile_count(c->n_out, nth, TILE_ROWS);
    if (c->XT) xt_build(c, ith, nth);
    for (int64_t t = ith; t < n_tiles; t += nth) mm_tile(c, ith, t, n_tiles, NULL);
}

// ---- base tiles and LoRA chunks in one parallel section ------------------------
// A section is one or more projections of the same input X (q, k and v; gate
// and up). Items: base tiles (TILE_ROWS output columns of one projection, all
// rows, written to its Y) and LoRA chunks (up to LM_LORA_CHUNK_ROWS rows of one
// segment, all columns, written to the projection's part of a side buffer D as
// scale * U). With our AVX-512 GEMM every thread takes tiles, and each tile
// carries its share of the chunks, prefetched while the tile computes
// (task_overlap_pf). With OpenBLAS tiles the last thread takes LoRA chunks
// first, the others base tiles first; each turns to the other queue when its
// own is empty. The LoRA-first thread leaves `reserve` chunks for the end: a
// base tile is worth tens of chunks, so without small items left the thread
// that draws the last tile is waited for by the others. D is folded into Y
// (Y += D, or Y = dora * (Y + D)) piece by piece, a chunk's rows over a
// tile's columns as soon as both are done (tile_done), with no barrier; a
// chunk adds straight into the columns of tiles done before it starts
// (run_chunk), with the same result. One
// section for several projections pays the tail, and the pool's start and
// join, once.

#define MAX_PROJ 8

// The serial op that makes a section's input X, row by row: SiLU(gate) * up
// into gate (X = gate), RMSNorm of src with weight into X, or nothing (X is
// ready; only X^T is left to pack).
typedef struct {
    enum { PRO_NONE, PRO_SILU_MUL, PRO_RMSNORM } kind;
    float *X;
    const float *src;   // up, or the rows to normalise
    const float *w;     // RMSNorm weight
    float eps;
} row_prologue;

// Rows [r0, r1) of the prologue's op, exactly as the whole op computes them
// (RMSNorm's rows are contiguous: ld == n).
static void prologue_rows(const row_prologue *p, int64_t r0, int64_t r1, int64_t n, int64_t ld) {
    if (r1 <= r0 || p->kind == PRO_NONE) return;
    if (p->kind == PRO_SILU_MUL) lm_silu_mul(p->X + r0 * ld, p->src + r0 * ld, r1 - r0, n, ld);
    else lm_rmsnorm(p->src + r0 * n, p->w, p->X + r0 * n, r1 - r0, n, p->eps);
}

// A LoRA chunk: rows [row, row + LM_LORA_CHUNK_ROWS) of segment seg of projection proj,
// r0 rows into the segment.
// k: its place among the projection's chunks.
typedef struct { int64_t row; int32_t proj, seg, r0, k; } chunk_item;

typedef struct {
    mm_ctx mm[MAX_PROJ];
    const lm_proj *proj;
    int n_proj;
    const int32_t *tile_proj, *tile_idx, *tiles_of;  // base tile -> (projection, tile); tiles per projection
    const chunk_item *chunks;
    int64_t n_tiles, n_chunks, reserve;
    float *D[MAX_PROJ];                               // n_rows x n_out per projection
    float *lora_scratch;
    size_t lora_per_thread;
    _Atomic uint64_t *done;                           // see tile_done
    int32_t word0[MAX_PROJ], tgroups[MAX_PROJ], cgroups[MAX_PROJ], pchunk0[MAX_PROJ];
    int64_t width[MAX_PROJ];                          // columns per base tile
    const int32_t *pchunk;                            // pchunk[pchunk0[p] + k]: index of projection p's chunk k
    _Atomic int64_t next_tile, next_chunk;
    _Atomic uint8_t *claimed;                         // tile-carried chunks: taken by its tile's thread or a helper
    _Atomic int xt_ready;
    // Prologue (see row_prologue): thread 0 makes X's rows, then X^T; the
    // others run chunks of ready rows meanwhile. Chunks [0, early) ran then;
    // the tiles carry [early, n_chunks).
    const row_prologue *pro;
    _Atomic int64_t rows_ready;
    _Atomic int go;
    int64_t early, early_limit;
} mml_ctx;

// Rows in chunk ch of segment s (LM_LORA_CHUNK_ROWS, or fewer at the segment's end).
static inline int chunk_rows(const lm_lora_seg *s, const chunk_item *ch) {
    return (int)(s->n_rows - ch->r0 < LM_LORA_CHUNK_ROWS ? s->n_rows - ch->r0 : LM_LORA_CHUNK_ROWS);
}

// Takes the next chunk below `limit`, or returns -1.
static int64_t take_chunk(mml_ctx *c, int64_t limit) {
    int64_t i = atomic_load_explicit(&c->next_chunk, memory_order_relaxed);
    while (i < limit)
        if (atomic_compare_exchange_weak_explicit(&c->next_chunk, &i, i + 1, memory_order_relaxed, memory_order_relaxed)) return i;
    return -1;
}

// Y (nr rows, ld ldy) += D (ld ldd) over n columns, or Y = dora * (Y + D).
static void fold_rows_scalar(float *restrict y, int64_t ldy, const float *restrict d, int64_t ldd,
                             const float *restrict dora, int nr, int64_t n) {
    for (int r = 0; r < nr; r++, y += ldy, d += ldd) {
        if (dora) for (int64_t o = 0; o < n; o++) y[o] = dora[o] * (y[o] + d[o]);
        else for (int64_t o = 0; o < n; o++) y[o] += d[o];
    }
}

#if defined(__x86_64__)
// The last partial vector under a mask: pieces are a tile wide, not always a
// multiple of 16 (58 columns for 576 outputs in 10 tiles), and a scalar tail
// ran on a third of them.
__attribute__((target("avx512f")))
static void fold_rows_avx512(float *restrict y, int64_t ldy, const float *restrict d, int64_t ldd,
                             const float *restrict dora, int nr, int64_t n) {
    for (int r = 0; r < nr; r++, y += ldy, d += ldd)
        for (int64_t o = 0; o < n; o += 16) {
            __mmask16 m = lm_mask16(n - o);
            __m512 v = _mm512_add_ps(_mm512_maskz_loadu_ps(m, y + o), _mm512_maskz_loadu_ps(m, d + o));
            if (dora) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, dora + o));
            _mm512_mask_storeu_ps(y + o, m, v);
        }
}

// The same two operations as the scalar fold (so the same bits), 8 columns
// at a time and the tail one by one. Not under a mask: AVX2's vmaskmovps
// store is microcoded on Zen 2, and a masked fold ran slower than the
// compiler's SSE loop.
__attribute__((target("avx2")))
static void fold_rows_avx2(float *restrict y, int64_t ldy, const float *restrict d, int64_t ldd,
                           const float *restrict dora, int nr, int64_t n) {
    for (int r = 0; r < nr; r++, y += ldy, d += ldd) {
        int64_t o = 0;
        for (; o + 8 <= n; o += 8) {
            __m256 v = _mm256_add_ps(_mm256_loadu_ps(y + o), _mm256_loadu_ps(d + o));
            if (dora) v = _mm256_mul_ps(v, _mm256_loadu_ps(dora + o));
            _mm256_storeu_ps(y + o, v);
        }
        for (; o < n; o++) y[o] = dora ? dora[o] * (y[o] + d[o]) : y[o] + d[o];
    }
}
#endif

// Folds chunk i's rows of D into Y over the columns of base tile j of the
// chunk's projection: Y += D, or Y = dora * (Y + D). A piece is one row by
// a tile's width at batch-32 distinct, tens of thousands a step, so its
// bookkeeping is kept lean: the width comes from the context (no division)
// and the rows go to one call (in-process A/B: sections 0.1-2.5 % faster).
static void fold_piece(const mml_ctx *c, int64_t i, int64_t j) {
    const chunk_item *ch = &c->chunks[i];
    int p = ch->proj;
    const mm_ctx *m = &c->mm[p];
    const lm_lora_seg *s = &c->proj[p].segs[ch->seg];
    int64_t c0, n = tile_cols(m->n_out, c->width[p], j, &c0);
    if (n <= 0) return;
    float *y = m->Y + ch->row * m->ldy + c0;
    const float *d = c->D[p] + ch->row * m->n_out + c0, *dora = s->dora ? s->dora + c0 : NULL;
#if defined(__x86_64__)
    if (m->level >= LM_CPU_AVX512) { fold_rows_avx512(y, m->ldy, d, m->n_out, dora, chunk_rows(s, ch), n); return; }
    if (m->level >= LM_CPU_AVX2) { fold_rows_avx2(y, m->ldy, d, m->n_out, dora, chunk_rows(s, ch), n); return; }
#endif
    fold_rows_scalar(y, m->ldy, d, m->n_out, dora, chunk_rows(s, ch), n);
}

// A piece (chunk i, tile j) can be folded once both are done, and is folded
// by whichever finishes second, so no thread waits at a barrier for the
// other's last tile. A projection's tiles and chunks are tracked in 64-bit
// words: word (g, h) holds tiles [32g, 32g + 32) in its low half and the
// projection's chunks [32h, 32h + 32) in its high half. A tile sets its bit
// in every word of its group g, a chunk in every word of its group h; the
// value each fetch_or returns says which partners were already done. Both
// bits of a pair live in one word, so exactly one of the two sees the other.
static void tile_done(mml_ctx *c, int p, int64_t j) {
    for (int h = 0; h < c->cgroups[p]; h++) {
        _Atomic uint64_t *w = &c->done[c->word0[p] + (int)(j / 32) * c->cgroups[p] + h];
        uint64_t prev = atomic_fetch_or_explicit(w, 1ull << (j % 32), memory_order_acq_rel) >> 32;
        for (; prev; prev &= prev - 1) fold_piece(c, c->pchunk[c->pchunk0[p] + h * 32 + __builtin_ctzll(prev)], j);
    }
}

// direct[g]: the tiles of group g that the chunk added to Y itself.
static void chunk_done(mml_ctx *c, int64_t i, const uint32_t *direct) {
    const chunk_item *ch = &c->chunks[i];
    int p = ch->proj, h = ch->k / 32;
    for (int g = 0; g < c->tgroups[p]; g++) {
        _Atomic uint64_t *w = &c->done[c->word0[p] + g * c->cgroups[p] + h];
        uint64_t prev = atomic_fetch_or_explicit(w, 1ull << (32 + ch->k % 32), memory_order_acq_rel) & 0xFFFFFFFFull;
        for (prev &= ~(uint64_t)direct[g]; prev; prev &= prev - 1) fold_piece(c, i, g * 32 + __builtin_ctzll(prev));
    }
}

// Sets bits [a, b) of the bitmap m (a < b).
static inline void set_bits(uint64_t *m, int64_t a, int64_t b) {
    int64_t wa = a >> 6, wb = (b - 1) >> 6;
    uint64_t first = ~0ull << (a & 63), last = ~0ull >> (63 - ((b - 1) & 63));
    if (wa == wb) { m[wa] |= first & last; return; }
    m[wa] |= first;
    for (int64_t w = wa + 1; w < wb; w++) m[w] = ~0ull;
    m[wb] |= last;
}

// Runs chunk i and folds it. Over the columns of the base tiles already done
// the chunk adds scale * U to Y itself, with no pass through D: their base
// results are in Y, and their threads will not fold this chunk, whose bit
// is not set yet. The other columns go to D, folded by chunk_done or by
// their tiles as they finish. (Folds took ~1.3 ms of each thread's batch-32
// step; adding directly made the q/k/v sections 0.3-3.0 % faster, measured
// in-process, variant rotated over layers, against storing everything to D.)
static void run_chunk(mml_ctx *c, int ith, int64_t i) {
    const chunk_item *ch = &c->chunks[i];
    int p = ch->proj, h = ch->k / 32;
    mm_ctx *m = &c->mm[p];
    const lm_lora_seg *s = &c->proj[p].segs[ch->seg];
    uint32_t direct[c->tgroups[p]];
    uint64_t cols[(m->n_out + 63) / 64];
    memset(cols, 0, sizeof cols);
    for (int g = 0; g < c->tgroups[p]; g++) {
        uint64_t w = atomic_load_explicit(&c->done[c->word0[p] + g * c->cgroups[p] + h], memory_order_acquire);
        direct[g] = (uint32_t)w;
        for (uint32_t b = direct[g]; b; b &= b - 1) {
            int64_t c0, n = tile_cols(m->n_out, c->width[p], g * 32 + __builtin_ctz(b), &c0);
            if (n > 0) set_bits(cols, c0, c0 + n);  // the last tiles may be empty
        }
    }
    lm_lora_chunk(m->X, m->ldx, m->n_in, m->Y, m->ldy, c->D[p], m->n_out, s, ch->row, chunk_rows(s, ch), cols,
                  c->lora_scratch + (size_t)ith * c->lora_per_thread, m->level);
    chunk_done(c, i, direct);
}

#define MAX_PF_SPANS 32

// Spans of the A and B^T that chunks [a, b) read, for the prefetcher.
static int chunk_spans(const mml_ctx *c, int64_t a, int64_t b, lm_span *spans, size_t *bytes) {
    int ns = 0;
    const lm_lora_seg *prev = NULL;
    *bytes = 0;
    for (int64_t i = a; i < b && ns + 2 <= MAX_PF_SPANS; i++) {
        const chunk_item *ch = &c->chunks[i];
        const lm_lora_seg *s = &c->proj[ch->proj].segs[ch->seg];
        if (s == prev) continue;  // later chunks of a segment read the same matrices
        prev = s;
        size_t es = s->dtype == LM_F16 ? 2 : 4;
        size_t na = (size_t)s->rank * (size_t)c->mm[ch->proj].n_in * es, nb = (size_t)s->rank * (size_t)c->mm[ch->proj].n_out * es;
        spans[ns++] = (lm_span){ (const char *)s->A, (const char *)s->A + na };
        spans[ns++] = (lm_span){ (const char *)s->BT, (const char *)s->BT + nb };
        *bytes += na + nb;
    }
    return ns;
}

// Far above any chunk count: thread 0 adds it to next_chunk to close the
// early phase, so no chunk is taken after it has read how many were.
#define EARLY_CLOSED ((int64_t)1 << 40)

// The prologue: thread 0 computes X's rows one by one (publishing each; with
// PRO_NONE all are out from the start) and then X^T, while the other threads
// take chunks in row order and run each as soon as its rows are out. The core that idled through the serial SiLU or
// RMSNorm streams adapter weights instead. Thread 0 then closes the early
// phase; every thread waits for that before the first tile, which needs X^T.
static void prologue(mml_ctx *c, int ith) {
    mm_ctx *m = &c->mm[0];
    if (ith == 0) {
        for (int64_t r = c->pro->kind == PRO_NONE ? m->n_rows : 0; r < m->n_rows; r++) {
            prologue_rows(c->pro, r, r + 1, m->n_in, m->ldx);
            atomic_store_explicit(&c->rows_ready, r + 1, memory_order_release);
        }
        lm_gemm_pack_xt(m->X, m->ldx, m->n_rows, 0, m->n_in, m->XT, m->ldxt);
        int64_t taken = atomic_fetch_add_explicit(&c->next_chunk, EARLY_CLOSED, memory_order_relaxed);
        c->early = taken < c->early_limit ? taken : c->early_limit;
        atomic_store_explicit(&c->go, 1, memory_order_release);
        return;
    }
    for (int64_t i; (i = atomic_fetch_add_explicit(&c->next_chunk, 1, memory_order_relaxed)) < c->early_limit;) {
        const chunk_item *ch = &c->chunks[i];
        const lm_lora_seg *s = &c->proj[ch->proj].segs[ch->seg];
        int64_t need = ch->row + chunk_rows(s, ch);
        for (int spins = 0; atomic_load_explicit(&c->rows_ready, memory_order_acquire) < need; spins++) lm_spin_wait(spins);
        run_chunk(c, ith, i);
    }
    for (int spins = 0; !atomic_load_explicit(&c->go, memory_order_acquire); spins++) lm_spin_wait(spins);
}

// A tile-carried chunk runs on whichever thread claims it first.
static inline int claim(mml_ctx *c, int64_t i) {
    return !atomic_load_explicit(&c->claimed[i], memory_order_relaxed) &&
           !atomic_exchange_explicit(&c->claimed[i], 1, memory_order_relaxed);
}

// With our GEMM: every thread takes base tiles, and tile t carries a share of
// the chunks. While the tile's FMAs run, the kernel prefetches those chunks'
// A and B^T (one line every few iterations, which the FMA-bound loop absorbs);
// the chunks then run from cache right after the tile. The adapters' bytes
// stream while the FMA units work, instead of a thread waiting on DRAM with
// its FMA units idle. (A tail of chunks set aside for whichever thread
// finishes first, prefetched by the last tiles, measured slightly worse: those
// chunks ran ~50 % slower, often from the other core's cache. Taking, once a
// thread runs out of tiles, only the chunks no one has started is better.)
static void task_overlap_pf(mml_ctx *c, int ith, int nth) {
    if (c->pro) prologue(c, ith);
    else xt_build(&c->mm[0], ith, nth);
    int64_t T = c->n_tiles, E = c->early, C = c->n_chunks - E;
    // Below AVX-512 nothing is prefetched, and a chunk is cheaper the more
    // base tiles are done when it runs: over their columns it adds to Y
    // itself, with no pass through D and no fold. So the first 3/4 of the
    // tiles carry no chunks and the last quarter carry them all. (In-process
    // A/B on Zen 2, batch-32 distinct over `none`, means of 9-14 interleaved
    // runs, by the share of tiles that carry none: 0 0.803, 1/4 0.807, 1/2
    // 0.817-0.819, 3/4 0.825-0.827, 7/8 0.825-0.829 (within the noise of
    // 3/4), all of them (chunks after every tile) 0.815-0.817.)
    int64_t h = c->mm[0].level >= LM_CPU_AVX512 ? 0 : T * 3 / 4;
    for (int64_t t; (t = atomic_fetch_add_explicit(&c->next_tile, 1, memory_order_relaxed)) < T;) {
        int p = c->tile_proj[t];
        mm_ctx *m = &c->mm[p];
        // the chunks this tile carries
        int64_t a = t < h ? E : E + (t - h) * C / (T - h), b = t < h ? E : E + (t - h + 1) * C / (T - h);
        lm_span spans[MAX_PF_SPANS];
        size_t bytes = 0;
        // Only AVX-512 machines prefetch. On Zen 2 (AVX2) the stream cost the
        // ymm tiles 16-20 % more cycles, more than it saved the chunks: batch-32
        // distinct steps ran 2.5 % faster without it (in-process A/B, steps
        // alternating), and a quarter of the lines was worse than all of them.
        int ns = m->level >= LM_CPU_AVX512 ? chunk_spans(c, a, b, spans, &bytes) : 0;
        lm_prefetch pf = { .spans = spans, .n = ns, .i = 1, .cur = ns ? spans[0].p : NULL, .end = ns ? spans[0].end : NULL,
                           .t0 = lm_cpu_wide512() };  // NTA on Zen 4, T0 elsewhere (see gemm.c's pf_tick)
        if (ns > 0) {
            int64_t width = c->width[p];
            int64_t units = (width + 7) / 8 * (m->ldxt / 8) * m->n_in;  // see lm_prefetch
            int64_t lines = (int64_t)(bytes / 64) + 1;
            pf.rate = 4 * lines >= units ? 65536u / 4 : (uint32_t)(lines * 65536 / units);
        }
        mm_tile(m, ith, c->tile_idx[t], c->tiles_of[p], ns > 0 ? &pf : NULL);
        tile_done(c, p, c->tile_idx[t]);
        for (int64_t i = a; i < b; i++) if (claim(c, i)) run_chunk(c, ith, i);
    }
    // No tiles left: take the chunks no one has started, from the back (their
    // tile's thread works from the front), instead of waiting at the join
    // while the last tile's thread runs all of its chunks alone. Their lines
    // come from the other core's cache or from memory, but a core idling at
    // the join costs more.
    for (int64_t i = c->n_chunks - 1; i >= E; i--) if (claim(c, i)) run_chunk(c, ith, i);
}

static void task_overlap(void *vctx, int ith, int nth) {
    mml_ctx *c = (mml_ctx *)vctx;
    if (c->mm[0].XT) { task_overlap_pf(c, ith, nth); return; }
    if (ith == nth - 1)
        for (int64_t i; (i = take_chunk(c, c->n_chunks - c->reserve)) >= 0;) run_chunk(c, ith, i);
    for (int64_t t; (t = atomic_fetch_add_explicit(&c->next_tile, 1, memory_order_relaxed)) < c->n_tiles;) {
        int p = c->tile_proj[t];
        mm_tile(&c->mm[p], ith, c->tile_idx[t], c->tiles_of[p], NULL);
        tile_done(c, p, c->tile_idx[t]);
    }
    for (int64_t i; (i = take_chunk(c, c->n_chunks)) >= 0;) run_chunk(c, ith, i);
}

size_t lm_matmul_multi_scratch_floats(int max_rank, int64_t max_n_out, int64_t sum_n_out, int64_t n_rows) {
    return lm_lora_scratch_floats(max_rank, max_n_out) + (size_t)n_rows * (size_t)sum_n_out + 16;
}

size_t lm_matmul_lora_scratch_floats(int max_rank, int64_t n_out, int64_t n_rows) {
    return lm_matmul_multi_scratch_floats(max_rank, n_out, n_out, n_rows);
}

// X is made by pro first (in the section when it can, else serially here);
// with PRO_NONE it is ready, and only its X^T goes in the section.
static void matmul_multi(const lm_proj *proj, int n_proj, int64_t n_in, const float *X, int64_t ldx, int64_t n_rows,
                         float *scratch, float *lora_scratch, const row_prologue *pro) {
    if (n_rows <= 0 || n_proj <= 0) return;
    int nth = lm_pool_threads();
    int64_t chunks = 0, tiles = 0, max_out = 0, gemv_rows = lm_matmul_gemv_max_rows();
    int max_rank = 0, tiles_path = n_proj <= MAX_PROJ;
    int32_t at[n_rows + 1];  // chunks starting at row r, counted in at[r + 1] (the counting sort below)
    int32_t pcount[n_proj];  // chunks per projection
    memset(at, 0, sizeof at);
    memset(pcount, 0, sizeof pcount);
    for (int p = 0; p < n_proj; p++) {
        if (has_gemv(proj[p].dtype) && n_rows <= gemv_rows) tiles_path = 0;
        if (proj[p].n_out > max_out) max_out = proj[p].n_out;
        for (int i = 0; i < proj[p].n_segs; i++) {
            const lm_lora_seg *s = &proj[p].segs[i];
            if (s->rank <= 0 || s->n_rows <= 0) continue;
            for (int64_t r = 0; r < s->n_rows; r += LM_LORA_CHUNK_ROWS, chunks++, pcount[p]++) at[s->row0 + r + 1]++;
            if (s->rank > max_rank) max_rank = s->rank;
        }
    }
    static int no_overlap = -1;
    if (no_overlap < 0) no_overlap = getenv("LORAMUX_NO_OVERLAP") != NULL;
    int level = lm_cpu_level();
    // Chunks ride on tiles. On Zen 4 a section with chunks ran faster with
    // tiles half as wide (each carries fewer chunks, the last tile's tail is
    // shorter; in-process A/B, batch-32 distinct, 32 against 64 columns:
    // q/k/v -2.1 / -0.8 / +0.5 %, o -0.9 to -2.0 %, gate/up -1.1 %). On
    // Zen 5, with zmm chunks and the T0 prefetch, only single-projection
    // sections still do (o +/-1 %, down 1.7-2.9 % slower at 64); q/k/v ran
    // 2.8-3.5 % and gate/up 0.7-2.9 % faster at 64 (4 runs each), so
    // sections of several projections keep 64. `none` has no chunks: 64.
    int64_t tile_cols = chunks > 0 && use_gemm(level, n_rows) && n_proj == 1 ? TILE_ROWS / 2 : TILE_ROWS;
    for (int p = 0; p < n_proj; p++) tiles += tile_count(proj[p].n_out, nth, tile_cols);
    // The prologue needs our GEMM (chunks read X, tiles X^T, both made by
    // thread 0) and an X^T small enough for one thread to pack.
    if (!(chunks > 0 && nth >= 2 && tiles_path && max_out > 0 && !no_overlap &&
          use_gemm(level, n_rows) && n_rows * n_in <= XT_SERIAL_FLOATS)) {
        prologue_rows(pro, 0, n_rows, n_in, ldx);
        pro = NULL;
    }
    if (nth < 2 || !tiles_path || max_out <= 0 || (no_overlap && chunks > 0)) {
        for (int p = 0; p < n_proj; p++) {
            lm_matmul(proj[p].W, proj[p].dtype, proj[p].n_out, n_in, X, ldx, n_rows, proj[p].Y, proj[p].ldy, scratch);
            if (proj[p].n_segs > 0)
                lm_lora_apply(X, ldx, n_in, proj[p].Y, proj[p].ldy, proj[p].n_out, proj[p].segs, proj[p].n_segs, lora_scratch);
        }
        return;
    }
    mml_ctx c = { .proj = proj, .n_proj = n_proj, .n_tiles = tiles, .n_chunks = chunks, .lora_scratch = lora_scratch,
                  .pro = pro,
                  .early_limit = g_early_chunks >= 0 && g_early_chunks < chunks ? g_early_chunks : chunks };
    // One X^T for all projections when our GEMM takes the tiles.
    _Atomic int *xt_ready = &c.xt_ready;
    float *XT = pro ? xt_area(scratch, n_in, n_rows) : xt_prepare(level, X, ldx, n_rows, n_in, scratch, &xt_ready);
    if (pro) xt_ready = NULL;
    int32_t tile_proj[tiles], tile_idx[tiles], tiles_of[n_proj], pchunk[chunks + 1];
    int n_words = 0;
    for (int p = 0, k0 = 0; p < n_proj; p++) {
        tiles_of[p] = (int32_t)tile_count(proj[p].n_out, nth, tile_cols);
        c.width[p] = tile_width(proj[p].n_out, tiles_of[p]);
        c.tgroups[p] = (tiles_of[p] + 31) / 32;
        c.cgroups[p] = (pcount[p] + 31) / 32;
        c.word0[p] = n_words;
        c.pchunk0[p] = k0;
        n_words += c.tgroups[p] * c.cgroups[p];
        k0 += pcount[p];
    }
    _Atomic uint64_t done[n_words + 1];
    for (int w = 0; w < n_words; w++) atomic_init(&done[w], 0);
    size_t per = chunks > 0 ? lm_lora_scratch_floats(max_rank, max_out) / (size_t)nth : 0;
    float *d = lora_scratch + per * (size_t)nth;
    int64_t t = 0;
    chunk_item items[chunks + 1];
    _Atomic uint8_t claimed[chunks + 1];
    for (int64_t i = 0; i < chunks; i++) atomic_init(&claimed[i], 0);
    // Chunks in order of first row, then projection: an adapter's q, k and v
    // (gate and up) matrices lie back to back in its arena, so the chunks
    // read one long stream per adapter instead of jumping between adapters
    // for every projection (a C probe over the same layout: 20.7 -> 22.8
    // GB/s). A counting sort on the first row: the loop below visits
    // projections in order, so each row's chunks land in projection order.
    // (qsort took ~2.5 us a call: 0.3 ms a step at batch 32 distinct.)
    for (int64_t r = 0; r < n_rows; r++) at[r + 1] += at[r];  // now: where row r's chunks start
    for (int p = 0; p < n_proj; p++) {
        c.mm[p] = (mm_ctx){ .W = (const uint8_t *)proj[p].W, .dtype = proj[p].dtype, .n_out = proj[p].n_out, .n_in = n_in,
                            .ldx = ldx, .n_rows = n_rows, .ldy = proj[p].ldy, .X = X, .Y = proj[p].Y,
                            .level = level, .tiles = scratch, .xsums = NULL, .XT = XT, .ldxt = xt_ld(n_rows),
                            .xt_ready = xt_ready };
        for (int32_t i = 0; i < tiles_of[p]; i++, t++) { tile_proj[t] = p; tile_idx[t] = i; }
        if (chunks > 0) { c.D[p] = d; d += (size_t)n_rows * (size_t)proj[p].n_out; }
        for (int i = 0, k = 0; i < proj[p].n_segs; i++) {
            const lm_lora_seg *s = &proj[p].segs[i];
            if (s->rank <= 0 || s->n_rows <= 0) continue;
            for (int64_t r = 0; r < s->n_rows; r += LM_LORA_CHUNK_ROWS, k++) {
                int32_t at_r = at[s->row0 + r]++;
                items[at_r] = (chunk_item){ .row = s->row0 + r, .proj = p, .seg = i, .r0 = (int32_t)r, .k = k };
                pchunk[c.pchunk0[p] + k] = at_r;
            }
        }
    }
    c.tile_proj = tile_proj; c.tile_idx = tile_idx; c.tiles_of = tiles_of;
    c.chunks = items;
    c.claimed = claimed;
    c.pchunk = pchunk;
    c.done = done;
    c.lora_per_thread = per;
    if (chunks > 0 && !XT) {  // the OpenBLAS scheme's reserve (task_overlap)
        // Reserve about one tail tile's worth of chunks: a tile is ~2*rows*width*n_in
        // flops at ~50 GFLOP/s per core, a chunk streams rank*(n_in+n_out) weights
        // at ~15 GB/s per core when both cores stream (this box's figures; only the
        // ratio matters, and only roughly).
        const lm_proj *last = &proj[n_proj - 1];
        int64_t width = (last->n_out + tiles_of[n_proj - 1] - 1) / tiles_of[n_proj - 1];
        double tile_s = 2.0 * (double)n_rows * (double)width * (double)n_in / 50e9;
        double chunk_s = (double)max_rank * (double)(n_in + max_out) * 2.0 / 15e9;
        c.reserve = (int64_t)(tile_s / chunk_s) + 1;
        if (c.reserve > chunks) c.reserve = chunks;
    }
    atomic_init(&c.next_tile, 0);
    atomic_init(&c.next_chunk, 0);
    atomic_init(&c.xt_ready, 0);
    atomic_init(&c.rows_ready, pro && pro->kind == PRO_NONE ? n_rows : 0);
    atomic_init(&c.go, 0);
    lm_parallel(task_overlap, &c);
}

void lm_matmul_multi(const lm_proj *proj, int n_proj, int64_t n_in, const float *X, int64_t ldx, int64_t n_rows,
                     float *scratch, float *lora_scratch) {
    // No serial op: X^T alone is packed in the section, and the other threads
    // start on the chunks meanwhile.
    row_prologue ready = { .kind = PRO_NONE };
    matmul_multi(proj, n_proj, n_in, X, ldx, n_rows, scratch, lora_scratch, &ready);
}

void lm_rmsnorm_matmul_multi(const float *x, const float *w, float eps, float *X, const lm_proj *proj, int n_proj,
                             int64_t n_in, int64_t n_rows, float *scratch, float *lora_scratch) {
    row_prologue pro = { .kind = PRO_RMSNORM, .X = X, .src = x, .w = w, .eps = eps };
    matmul_multi(proj, n_proj, n_in, X, n_in, n_rows, scratch, lora_scratch, &pro);
}

void lm_silu_mul_matmul_lora(float *gate, const float *up, int64_t ld, const void *W, int dtype, int64_t n_out,
                             int64_t n_in, int64_t n_rows, float *Y, int64_t ldy, float *scratch,
                             const lm_lora_seg *segs, int n_segs, float *lora_scratch) {
    lm_proj p = { .W = W, .dtype = dtype, .n_out = n_out, .Y = Y, .ldy = ldy, .segs = segs, .n_segs = n_segs };
    row_prologue pro = { .kind = PRO_SILU_MUL, .X = gate, .src = up };
    matmul_multi(&p, 1, n_in, gate, ld, n_rows, scratch, lora_scratch, &pro);
}

void lm_matmul_lora(const void *W, int dtype, int64_t n_out, int64_t n_in,
                    const float *X, int64_t ldx, int64_t n_rows, float *Y, int64_t ldy, float *scratch,
                    const lm_lora_seg *segs, int n_segs, float *lora_scratch) {
    lm_proj p = { .W = W, .dtype = dtype, .n_out = n_out, .Y = Y, .ldy = ldy, .segs = segs, .n_segs = n_segs };
    lm_matmul_multi(&p, 1, n_in, X, ldx, n_rows, scratch, lora_scratch);
}

void lm_matmul(const void *W, int dtype, int64_t n_out, int64_t n_in,
               const float *X, int64_t ldx, int64_t n_rows,
               float *Y, int64_t ldy, float *scratch) {
    if (n_rows <= 0 || n_out <= 0) return;
    mm_ctx c = { .W = (const uint8_t *)W, .dtype = dtype, .n_out = n_out, .n_in = n_in, .ldx = ldx,
                 .n_rows = n_rows, .ldy = ldy, .X = X, .Y = Y, .level = lm_cpu_level() };
    int nth = lm_pool_threads();
    c.tiles = scratch;
    c.xsums = scratch + (size_t)nth * TILE_ROWS * (size_t)n_in;
    if (has_gemv(dtype) && n_rows <= lm_matmul_gemv_max_rows()) {
        int64_t nb = n_in / 32;
        if (dtype != LM_Q8_0) {
            for (int64_t r = 0; r < n_rows; r++) {
                const float *x = X + r * ldx;
                for (int64_t b = 0; b < nb; b++) {
                    float s = 0.0f;
                    for (int j = 0; j < 32; j++) s += x[b * 32 + j];
                    c.xsums[r * nb + b] = s;
                }
            }
        }
        lm_parallel(task_gemv, &c);
    } else {
        _Atomic int ready;
        atomic_init(&ready, 0);
        c.xt_ready = &ready;
        c.XT = xt_prepare(c.level, X, ldx, n_rows, n_in, scratch, &c.xt_ready);
        c.ldxt = xt_ld(n_rows);
        lm_parallel(task_tiles, &c);
    }
}

void lm_matmul_ref(const void *W, int dtype, int64_t n_out, int64_t n_in,
                   const float *X, int64_t ldx, int64_t n_rows, float *Y, int64_t ldy) {
    size_t row_bytes = (size_t)(n_in / lm_block_size(dtype)) * lm_block_bytes(dtype);
    float w[n_in]; // reference only: small shapes in tests
    for (int64_t o = 0; o < n_out; o++) {
        lm_dequant_row_ref(dtype, (const uint8_t *)W + o * row_bytes, w, n_in);
        for (int64_t r = 0; r < n_rows; r++) {
            double s = 0.0;
            for (int64_t i = 0; i < n_in; i++) s += (double)X[r * ldx + i] * (double)w[i];
            Y[r * ldy + o] = (float)s;
        }
    }
}
