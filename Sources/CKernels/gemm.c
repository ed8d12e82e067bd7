// Micro-kernels for Y = X @ W^T when W is an f32 tile (dequantized or stored):
// vectors run along rows (16 rows of X^T per register) and W's elements are
// broadcast, so a dequantized row of W is used where it lies, with no packing.
// A 32-row x 8-column block keeps 16 accumulators; per k it loads two vectors
// of X^T and eight scalars of W for 16 FMAs. On this box: ~115 GFLOP/s on one
// core for a 32x64x576 tile, against 75 for single-threaded OpenBLAS sgemm
// (which also repacks both operands).
#include "gemm.h"
#include "kernels.h"
#include <math.h>
#if defined(__x86_64__)
#include <immintrin.h>

// 16x16 transpose in registers: o[j] = column j of the rows r[0..15].
__attribute__((target("avx512f"), always_inline))
static inline void transpose16(const __m512 r[16], __m512 o[16]) {
    __m512 t[16], u[16], v[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        u[4 * i + 0] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        u[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
        u[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        u[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {
        v[i] = _mm512_shuffle_f32x4(u[i], u[i + 4], 0x88);
        v[i + 4] = _mm512_shuffle_f32x4(u[i], u[i + 4], 0xDD);
        v[i + 8] = _mm512_shuffle_f32x4(u[i + 8], u[i + 12], 0x88);
        v[i + 12] = _mm512_shuffle_f32x4(u[i + 8], u[i + 12], 0xDD);
    }
    for (int i = 0; i < 8; i++) {
        o[i] = _mm512_shuffle_f32x4(v[i], v[i + 8], 0x88);
        o[i + 8] = _mm512_shuffle_f32x4(v[i], v[i + 8], 0xDD);
    }
}

__attribute__((target("avx512f")))
static void pack_xt_avx512(const float *X, int64_t ldx, int64_t n_rows, int64_t k0, int64_t k1, float *XT, int64_t ldxt) {
    for (int64_t i0 = 0; i0 < ldxt; i0 += 16) {
        int w = ldxt - i0 < 16 ? 8 : 16;  // ldxt is a multiple of 8
        int nr = (int)(n_rows - i0 < w ? (n_rows - i0 > 0 ? n_rows - i0 : 0) : w);
        int64_t k = k0;
        for (; k + 16 <= k1; k += 16) {
            __m512 r[16], o[16];
            for (int i = 0; i < 16; i++) r[i] = i < nr ? _mm512_loadu_ps(X + (i0 + i) * ldx + k) : _mm512_setzero_ps();
            transpose16(r, o);
            if (w == 16) for (int j = 0; j < 16; j++) _mm512_storeu_ps(XT + (k + j) * ldxt + i0, o[j]);
            else for (int j = 0; j < 16; j++) _mm256_storeu_ps(XT + (k + j) * ldxt + i0, _mm512_castps512_ps256(o[j]));
        }
        for (; k < k1; k++)
            for (int i = 0; i < w; i++) XT[k * ldxt + i0 + i] = i < nr ? X[(i0 + i) * ldx + k] : 0.0f;
    }
}

// The prefetcher's position inside a kernel call, in registers.
typedef struct { const char *cur, *end; uint32_t step, acc; int t0; } pf_pos;

__attribute__((always_inline))
static inline pf_pos pf_begin(const lm_prefetch *pf, uint32_t step) {
    return (pf_pos){ pf->cur, pf->end, step, pf->acc, pf->t0 };
}

// One k iteration's share: step / 65536 lines (step <= 65536, see
// lm_prefetch's bound on the rate), issued as whole lines. The
// current line is prefetched on every iteration (a repeat costs one load slot,
// of which the FMA-bound loop has plenty) and the position moves on by a line
// when the fixed-point sum carries, so the loop has no data-dependent branch
// but the rare one at the end of a span. Once the spans run out, step is 0
// and the last line is repeated (for the rest of this kernel call; the next
// call finds the spans run out after one iteration).
// NTA measured best on Zen 4 (batch-32 distinct, rdtsc per phase): the
// tiles slowed by ~3 % with NTA, ~8 % with T1/T2, ~16 % with T0, and the
// chunks that follow found their lines in cache alike. On Zen 5 T0 is best
// (in-process A/B, batch-32 distinct sections: T0 0.8-2.5 % faster than NTA,
// T1 0.8-1.5 %), so lm_prefetch's t0 picks the hint (see matmul.c).
__attribute__((always_inline))
static inline void pf_tick(lm_prefetch *pf, pf_pos *q) {
    q->acc += q->step;
    q->cur += (q->acc >> 16) << 6;
    q->acc &= 0xFFFF;
    if (__builtin_expect(q->cur >= q->end, 0)) {
        if (pf->i < pf->n) { q->cur = pf->spans[pf->i].p; q->end = pf->spans[pf->i].end; pf->i++; }
        else { q->step = 0; q->cur = q->end - 64; }
    }
    if (q->t0) _mm_prefetch(q->cur, _MM_HINT_T0);
    else _mm_prefetch(q->cur, _MM_HINT_NTA);
}

static inline void pf_end(lm_prefetch *pf, const pf_pos *q) { pf->cur = q->cur; pf->end = q->end; pf->acc = q->acc; }

// MV vectors of 16 rows x NJ columns; rows at or past n_rows are not stored.
// Constant MV and NJ let the compiler unroll everything into registers.
__attribute__((target("avx512f"), always_inline))
static inline void ukr_body(const int MV, const int NJ, int64_t K, const float *XT, int64_t ldxt, int n_rows,
                            const float *W, int64_t ldw, float *Y, int64_t ldy, lm_prefetch *pf) {
    __m512 acc[2][8];
    for (int v = 0; v < MV; v++)
        for (int j = 0; j < NJ; j++) acc[v][j] = _mm512_setzero_ps();
#define UKR_K_STEP                                                                          \
    {                                                                                       \
        __m512 x[2];                                                                        \
        for (int v = 0; v < MV; v++) x[v] = _mm512_loadu_ps(XT + k * ldxt + 16 * v);        \
        for (int j = 0; j < NJ; j++) {                                                      \
            __m512 w = _mm512_set1_ps(W[j * ldw + k]);                                      \
            for (int v = 0; v < MV; v++) acc[v][j] = _mm512_fmadd_ps(x[v], w, acc[v][j]);   \
        }                                                                                   \
    }
    if (pf && pf->cur) {
        pf_pos q = pf_begin(pf, pf->rate * 2 * MV);
        for (int64_t k = 0; k < K; k++) { pf_tick(pf, &q); UKR_K_STEP }
        pf_end(pf, &q);
    } else {
        for (int64_t k = 0; k < K; k++) UKR_K_STEP
    }
#undef UKR_K_STEP
    for (int v = 0; v < MV; v++) {
        int nr = n_rows - 16 * v < 16 ? n_rows - 16 * v : 16;
        for (int j = 0; j < NJ; j++) {
            float b[16];
            _mm512_storeu_ps(b, acc[v][j]);
            for (int l = 0; l < nr; l++) Y[(16 * v + l) * ldy + j] = b[l];
        }
    }
}

// The same for a block of at most 8 rows, in ymm registers: the last 8 rows
// of 24, 40, ... would otherwise pad to 16. (Batches of 8 or fewer rows go to
// OpenBLAS, whose small-M kernel is faster than this one.)
__attribute__((target("avx512f,fma"), always_inline))
static inline void ukr8_body(const int NJ, int64_t K, const float *XT, int64_t ldxt, int n_rows,
                             const float *W, int64_t ldw, float *Y, int64_t ldy, lm_prefetch *pf) {
    __m256 acc[8];
    for (int j = 0; j < NJ; j++) acc[j] = _mm256_setzero_ps();
#define UKR8_K_STEP                                                                                \
    {                                                                                              \
        __m256 x = _mm256_loadu_ps(XT + k * ldxt);                                                 \
        for (int j = 0; j < NJ; j++) acc[j] = _mm256_fmadd_ps(x, _mm256_set1_ps(W[j * ldw + k]), acc[j]); \
    }
    if (pf && pf->cur) {
        pf_pos q = pf_begin(pf, pf->rate);
        for (int64_t k = 0; k < K; k++) { pf_tick(pf, &q); UKR8_K_STEP }
        pf_end(pf, &q);
    } else {
        for (int64_t k = 0; k < K; k++) UKR8_K_STEP
    }
#undef UKR8_K_STEP
    for (int j = 0; j < NJ; j++) {
        float b[8];
        _mm256_storeu_ps(b, acc[j]);
        for (int l = 0; l < n_rows; l++) Y[l * ldy + j] = b[l];
    }
}

#define GEMM_UKR8(NJ)                                                                                     \
__attribute__((target("avx512f,fma")))                                                                    \
static void ukr_0_##NJ(int64_t K, const float *XT, int64_t ldxt, int n_rows, const float *W, int64_t ldw, \
                       float *Y, int64_t ldy, lm_prefetch *pf) {                                          \
    ukr8_body(NJ, K, XT, ldxt, n_rows, W, ldw, Y, ldy, pf);                                               \
}

#define GEMM_UKR(MV, NJ)                                                                                  \
__attribute__((target("avx512f")))                                                                        \
static void ukr_##MV##_##NJ(int64_t K, const float *XT, int64_t ldxt, int n_rows, const float *W, int64_t ldw, \
                            float *Y, int64_t ldy, lm_prefetch *pf) {                                     \
    ukr_body(MV, NJ, K, XT, ldxt, n_rows, W, ldw, Y, ldy, pf);                                            \
}

GEMM_UKR8(1) GEMM_UKR8(2) GEMM_UKR8(3) GEMM_UKR8(4) GEMM_UKR8(5) GEMM_UKR8(6) GEMM_UKR8(7) GEMM_UKR8(8)
GEMM_UKR(1, 1) GEMM_UKR(1, 2) GEMM_UKR(1, 3) GEMM_UKR(1, 4) GEMM_UKR(1, 5) GEMM_UKR(1, 6) GEMM_UKR(1, 7) GEMM_UKR(1, 8)
GEMM_UKR(2, 1) GEMM_UKR(2, 2) GEMM_UKR(2, 3) GEMM_UKR(2, 4) GEMM_UKR(2, 5) GEMM_UKR(2, 6) GEMM_UKR(2, 7) GEMM_UKR(2, 8)

typedef void (*ukr_fn)(int64_t, const float *, int64_t, int, const float *, int64_t, float *, int64_t, lm_prefetch *);
static const ukr_fn ukr[3][8] = {
    { ukr_0_1, ukr_0_2, ukr_0_3, ukr_0_4, ukr_0_5, ukr_0_6, ukr_0_7, ukr_0_8 },
    { ukr_1_1, ukr_1_2, ukr_1_3, ukr_1_4, ukr_1_5, ukr_1_6, ukr_1_7, ukr_1_8 },
    { ukr_2_1, ukr_2_2, ukr_2_3, ukr_2_4, ukr_2_5, ukr_2_6, ukr_2_7, ukr_2_8 },
};

static void gemm_avx512(int64_t n_in, const float *XT, int64_t ldxt, int64_t n_rows,
                        const float *W, int64_t ldw, int64_t n_cols, float *Y, int64_t ldy, lm_prefetch *pf) {
    for (int64_t j0 = 0; j0 < n_cols; j0 += 8) {
        int nj = (int)(n_cols - j0 < 8 ? n_cols - j0 : 8);
        // Blocks of 32, 16 or 8 rows, within X^T's padded width.
        for (int64_t r0 = 0; r0 < n_rows;) {
            int64_t padded = ldxt - r0;
            int kind = padded >= 32 ? 2 : padded >= 16 ? 1 : 0, rows = 8 << kind;
            int nr = (int)(n_rows - r0 < rows ? n_rows - r0 : rows);
            ukr[kind][nj - 1](n_in, XT + r0, ldxt, nr, W + j0 * ldw, ldw, Y + r0 * ldy + j0, ldy, pf);
            r0 += rows;
        }
    }
}

// ---- the same GEMM in ymm registers, for CPUs without AVX-512 ----------------
// Without it the tiles went to OpenBLAS sgemm, which repacks both operands
// on every 64-column tile (batch-32 decode on Zen 2: see docs/BENCHMARKS.md).
// Each output is the same FMA chain over k in order as above, from zero, so
// the bits equal the AVX-512 kernel's.

// 8x8 transpose in registers: o[j] = column j of the rows r[0..7].
__attribute__((target("avx2"), always_inline))
static inline void transpose8(const __m256 r[8], __m256 o[8]) {
    __m256 t[8], u[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++) {
        u[4 * i + 0] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
        u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {
        o[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
        o[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    }
}

__attribute__((target("avx2")))
static void pack_xt_avx2(const float *X, int64_t ldx, int64_t n_rows, int64_t k0, int64_t k1, float *XT, int64_t ldxt) {
    for (int64_t i0 = 0; i0 < ldxt; i0 += 8) {
        int nr = (int)(n_rows - i0 < 8 ? (n_rows - i0 > 0 ? n_rows - i0 : 0) : 8);
        int64_t k = k0;
        for (; k + 8 <= k1; k += 8) {
            __m256 r[8], o[8];
            for (int i = 0; i < 8; i++) r[i] = i < nr ? _mm256_loadu_ps(X + (i0 + i) * ldx + k) : _mm256_setzero_ps();
            transpose8(r, o);
            for (int j = 0; j < 8; j++) _mm256_storeu_ps(XT + (k + j) * ldxt + i0, o[j]);
        }
        for (; k < k1; k++)
            for (int i = 0; i < 8; i++) XT[k * ldxt + i0 + i] = i < nr ? X[(i0 + i) * ldx + k] : 0.0f;
    }
}

// MV vectors of 8 rows x NJ columns: 16 rows x 6 columns is 12 accumulators,
// two vectors of X^T and one broadcast, 15 of the 16 ymm registers; per k,
// 8 loads for 12 FMAs, so the FMA ports bound it.
__attribute__((target("avx2,fma"), always_inline))
static inline void ukr2_body(const int MV, const int NJ, int64_t K, const float *XT, int64_t ldxt, int n_rows,
                             const float *W, int64_t ldw, float *Y, int64_t ldy, lm_prefetch *pf) {
    __m256 acc[2][6];
    for (int v = 0; v < MV; v++)
        for (int j = 0; j < NJ; j++) acc[v][j] = _mm256_setzero_ps();
#define UKR2_K_STEP                                                                         \
    {                                                                                       \
        __m256 x[2];                                                                        \
        for (int v = 0; v < MV; v++) x[v] = _mm256_loadu_ps(XT + k * ldxt + 8 * v);         \
        for (int j = 0; j < NJ; j++) {                                                      \
            __m256 w = _mm256_broadcast_ss(W + j * ldw + k);                                \
            for (int v = 0; v < MV; v++) acc[v][j] = _mm256_fmadd_ps(x[v], w, acc[v][j]);   \
        }                                                                                   \
    }
    // No prefetch stream here (matmul.c passes none below AVX-512): on Zen 2
    // it slowed these loops by more than it saved the LoRA chunks.
    (void)pf;
    for (int64_t k = 0; k < K; k++) UKR2_K_STEP
#undef UKR2_K_STEP
    for (int v = 0; v < MV; v++) {
        int nr = n_rows - 8 * v < 8 ? n_rows - 8 * v : 8;
        for (int j = 0; j < NJ; j++) {
            float b[8];
            _mm256_storeu_ps(b, acc[v][j]);
            for (int l = 0; l < nr; l++) Y[(8 * v + l) * ldy + j] = b[l];
        }
    }
}

#define GEMM_UKR2(MV, NJ)                                                                                   \
__attribute__((target("avx2,fma")))                                                                         \
static void ukr2_##MV##_##NJ(int64_t K, const float *XT, int64_t ldxt, int n_rows, const float *W, int64_t ldw, \
                             float *Y, int64_t ldy, lm_prefetch *pf) {                                      \
    ukr2_body(MV, NJ, K, XT, ldxt, n_rows, W, ldw, Y, ldy, pf);                                             \
}

GEMM_UKR2(1, 1) GEMM_UKR2(1, 2) GEMM_UKR2(1, 3) GEMM_UKR2(1, 4) GEMM_UKR2(1, 5) GEMM_UKR2(1, 6)
GEMM_UKR2(2, 1) GEMM_UKR2(2, 2) GEMM_UKR2(2, 3) GEMM_UKR2(2, 4) GEMM_UKR2(2, 5) GEMM_UKR2(2, 6)

static const ukr_fn ukr2[2][6] = {
    { ukr2_1_1, ukr2_1_2, ukr2_1_3, ukr2_1_4, ukr2_1_5, ukr2_1_6 },
    { ukr2_2_1, ukr2_2_2, ukr2_2_3, ukr2_2_4, ukr2_2_5, ukr2_2_6 },
};

static void gemm_avx2(int64_t n_in, const float *XT, int64_t ldxt, int64_t n_rows,
                      const float *W, int64_t ldw, int64_t n_cols, float *Y, int64_t ldy, lm_prefetch *pf) {
    for (int64_t j0 = 0; j0 < n_cols; j0 += 6) {
        int nj = (int)(n_cols - j0 < 6 ? n_cols - j0 : 6);
        // Blocks of 16 or 8 rows, within X^T's padded width.
        for (int64_t r0 = 0; r0 < n_rows;) {
            int kind = ldxt - r0 >= 16 ? 1 : 0, rows = 8 << kind;
            int nr = (int)(n_rows - r0 < rows ? n_rows - r0 : rows);
            ukr2[kind][nj - 1](n_in, XT + r0, ldxt, nr, W + j0 * ldw, ldw, Y + r0 * ldy + j0, ldy, pf);
            r0 += rows;
        }
    }
}

void lm_gemm_pack_xt(const float *X, int64_t ldx, int64_t n_rows, int64_t k0, int64_t k1, float *XT, int64_t ldxt) {
    if (lm_cpu_level() >= LM_CPU_AVX512) pack_xt_avx512(X, ldx, n_rows, k0, k1, XT, ldxt);
    else pack_xt_avx2(X, ldx, n_rows, k0, k1, XT, ldxt);
}

void lm_gemm(int64_t n_in, const float *XT, int64_t ldxt, int64_t n_rows,
             const float *W, int64_t ldw, int64_t n_cols, float *Y, int64_t ldy, lm_prefetch *pf) {
    if (lm_cpu_level() >= LM_CPU_AVX512) gemm_avx512(n_in, XT, ldxt, n_rows, W, ldw, n_cols, Y, ldy, pf);
    else gemm_avx2(n_in, XT, ldxt, n_rows, W, ldw, n_cols, Y, ldy, pf);
}
#else
// Other architectures never select this path (use_gemm needs AVX2); plain
// loops keep the symbols defined and correct.
void lm_gemm_pack_xt(const float *X, int64_t ldx, int64_t n_rows, int64_t k0, int64_t k1, float *XT, int64_t ldxt) {
    for (int64_t k = k0; k < k1; k++)
        for (int64_t i = 0; i < ldxt; i++) XT[k * ldxt + i] = i < n_rows ? X[i * ldx + k] : 0.0f;
}

void lm_gemm(int64_t n_in, const float *XT, int64_t ldxt, int64_t n_rows,
             const float *W, int64_t ldw, int64_t n_cols, float *Y, int64_t ldy, lm_prefetch *pf) {
    (void)pf;
    for (int64_t i = 0; i < n_rows; i++)
        for (int64_t j = 0; j < n_cols; j++) {
            float acc = 0.0f;
            for (int64_t k = 0; k < n_in; k++) acc = fmaf(XT[k * ldxt + i], W[j * ldw + k], acc);
            Y[i * ldy + j] = acc;
        }
}
#endif
