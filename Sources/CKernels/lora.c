// Fused multi-adapter LoRA: every segment (rows sharing an adapter module)
// in one parallel section. Work items are chunks of up to 4 rows of one
// segment, so each chunk reads its A and B^T once for all its rows.
#include "kernels.h"
#include "simd_x86.h"
#include <math.h>
#include <string.h>
#include <stdlib.h>
#include <pthread.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#define LORA_ROWS LM_LORA_CHUNK_ROWS

// Element (k, o) of a blocked B^T (see kernels.h).
static inline int64_t bt_index(int64_t k, int64_t o, int rank, int64_t n_out) {
    int64_t j = o / LM_LORA_BLOCK, w = n_out - j * LM_LORA_BLOCK;
    if (w > LM_LORA_BLOCK) w = LM_LORA_BLOCK;
    return j * LM_LORA_BLOCK * rank + k * w + (o - j * LM_LORA_BLOCK);
}

// Element (k, i) of a blocked A (see kernels.h): rows in groups of 4, each
// group stored as 16-column blocks holding the group's rows side by side, so
// the shrink, which reads four rows at once, reads A as one stream.
static inline int64_t a_index(int64_t k, int64_t i, int rank, int64_t n_in) {
    int64_t g0 = k & ~(int64_t)3, rows = rank - g0 < 4 ? rank - g0 : 4;
    int64_t b0 = i & ~(int64_t)15, wb = n_in - b0 < 16 ? n_in - b0 : 16;
    return g0 * n_in + b0 * rows + (k - g0) * wb + (i - b0);
}

void lm_lora_block_a(const void *src, void *dst, int rank, int64_t n_in, int dtype) {
    size_t es = dtype == LM_F16 ? 2 : 4;
    for (int k = 0; k < rank; k++)
        for (int64_t b0 = 0; b0 < n_in; b0 += 16) {  // one run of up to 16 per row and block
            int64_t wb = n_in - b0 < 16 ? n_in - b0 : 16;
            memcpy((char *)dst + (size_t)a_index(k, b0, rank, n_in) * es,
                   (const char *)src + ((size_t)k * (size_t)n_in + (size_t)b0) * es, (size_t)wb * es);
        }
}

void lm_lora_block_bt(const void *src, void *dst, int rank, int64_t n_out, int dtype) {
    size_t es = dtype == LM_F16 ? 2 : 4;
    for (int k = 0; k < rank; k++)
        for (int64_t o = 0; o < n_out; o += LM_LORA_BLOCK) {  // one run of up to 32 per row and block
            int64_t w = n_out - o < LM_LORA_BLOCK ? n_out - o : LM_LORA_BLOCK;
            memcpy((char *)dst + (size_t)bt_index(k, o, rank, n_out) * es,
                   (const char *)src + ((size_t)k * (size_t)n_out + (size_t)o) * es, (size_t)w * es);
        }
}

static inline float ld_elem(const void *p, int dtype, int64_t i) {
    return dtype == LM_F16 ? lm_f16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

// Tails the SIMD paths share. t plus row k of A against x over columns [i0, n_in).
static inline float shrink_tail(float t, const float *x, const lm_lora_seg *s, int k, int64_t i0, int64_t n_in) {
    for (int64_t i = i0; i < n_in; i++) t += x[i] * ld_elem(s->A, s->dtype, a_index(k, i, s->rank, n_in));
    return t;
}

// Column o of a row of Y with the delta d = scale * U added (DoRA applied):
// the same two operations as the fold of D in matmul.c.
static inline float add_delta(const lm_lora_seg *s, int64_t o, float y, float d) {
    return s->dora ? s->dora[o] * (y + d) : y + d;
}

// Whether column o goes to Y in a split chunk (see lm_lora_chunk).
static inline int col_done(const uint64_t *done, int64_t o) { return done && (done[o >> 6] >> (o & 63)) & 1; }

// Output columns [o0, n_out) of nr rows from row r0, one at a time: d =
// scale * U is added to Y (DoRA applied) or, with D, stored in D (ld ldd)
// except in the columns `done` marks. d is its own statement so that the
// compiler cannot fuse it into the add: Y + d must equal the fold of D.
static void expand_tail(const float *T, const lm_lora_seg *s, float *Y, int64_t ldy, float *D, int64_t ldd,
                        const uint64_t *done, int64_t r0, int nr, int64_t o0, int64_t n_out) {
    int rank = s->rank;
    for (int64_t o = o0; o < n_out; o++)
        for (int r = 0; r < nr; r++) {
            float u = 0.0f;
            for (int k = 0; k < rank; k++) u += T[r * rank + k] * ld_elem(s->BT, s->dtype, bt_index(k, o, rank, n_out));
            float d = s->scale * u;
            if (D && !col_done(done, o)) { D[(r0 + r) * ldd + o] = d; continue; }
            float *y = Y + (r0 + r) * ldy + o;
            *y = add_delta(s, o, *y, d);
        }
}

// ---- portable path ------------------------------------------------------------

static void chunk_scalar(const float *X, int64_t ldx, int64_t n_in, float *Y, int64_t ldy, int64_t n_out,
                         const lm_lora_seg *s, int64_t r0, int nr, float *T, float *U, int store) {
    int rank = s->rank;
    for (int r = 0; r < nr; r++)
        for (int k = 0; k < rank; k++) {
            const float *x = X + (r0 + r) * ldx;
            float acc = 0.0f;
            for (int64_t i = 0; i < n_in; i++) acc += x[i] * ld_elem(s->A, s->dtype, a_index(k, i, rank, n_in));
            T[r * rank + k] = acc;
        }
    for (int r = 0; r < nr; r++) memset(U + r * n_out, 0, (size_t)n_out * sizeof(float));
    for (int k = 0; k < rank; k++)
        for (int r = 0; r < nr; r++) {
            float t = T[r * rank + k];
            float *u = U + r * n_out;
            for (int64_t o = 0; o < n_out; o++) u[o] += t * ld_elem(s->BT, s->dtype, bt_index(k, o, rank, n_out));
        }
    for (int r = 0; r < nr; r++) {
        float *y = Y + (r0 + r) * ldy;
        const float *u = U + r * n_out;
        if (store) for (int64_t o = 0; o < n_out; o++) y[o] = s->scale * u[o];
        else if (s->dora) for (int64_t o = 0; o < n_out; o++) y[o] = s->dora[o] * (y[o] + s->scale * u[o]);
        else for (int64_t o = 0; o < n_out; o++) y[o] += s->scale * u[o];
    }
}

#if defined(__x86_64__)
// ---- AVX2 path ------------------------------------------------------------------
// The AVX-512VL path's chains in the 16 ymm registers: fewer rows of A per
// shrink pass and fewer output columns per expand pass, the same bits.

// The AVX2 path reads its A and B^T from memory (no prefetch rides on its
// GEMM tiles, see matmul.c), and one Zen 2 core streaming them with only the
// hardware prefetchers read 13.4 GB/s; software prefetches 512 bytes ahead
// of the reads gave 15.3 (256: 14.4, 1024: 15.0, 2048: 13.2; `loramux
// bench-kernel --threads 1`). PF (a constant) turns them on in the shared
// shrink and expand loops; the AVX-512VL path, whose tile-carried chunks
// come prefetched, passes 0. p is the line being read; the loops advance by
// two lines of f16 (four of f32) an iteration.
enum { LORA_PF_AHEAD = 512 };
__attribute__((always_inline))
static inline void prefetch_ahead(const char *p, int dtype) {
    _mm_prefetch(p + LORA_PF_AHEAD, _MM_HINT_T0);
    _mm_prefetch(p + LORA_PF_AHEAD + 64, _MM_HINT_T0);
    if (dtype != LM_F16) {
        _mm_prefetch(p + LORA_PF_AHEAD + 128, _MM_HINT_T0);
        _mm_prefetch(p + LORA_PF_AHEAD + 192, _MM_HINT_T0);
    }
}
__attribute__((target("avx2,f16c,fma")))
static inline __m256 load8(const void *p, int dtype, int64_t i) {
    if (dtype == LM_F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)));
    return _mm256_loadu_ps((const float *)p + i);
}

// The shrink: rows [k, k + JA) of A (within one group of 4) against nr rows
// of X. Every (row, rank) sum is two 8-wide chains (columns [16b, 16b+8) and
// [16b+8, 16b+16)) added, then reduced, whatever JA and nr, so a row's result
// does not depend on the rows sharing its chunk. Used by the AVX2 and the
// AVX-512VL paths, which then agree bit for bit.
__attribute__((target("avx2,f16c,fma"), always_inline))
static inline void shrink_ymm(const float *X, int64_t ldx, int64_t n_in, const lm_lora_seg *s, int64_t r0,
                              const int nr, int k, const int JA, float *T, const int PF) {
    int rank = s->rank, dt = s->dtype;
    int64_t in16 = n_in & ~(int64_t)15;
    int64_t g0 = k & ~3, rows = rank - g0 < 4 ? rank - g0 : 4;
    int64_t base = g0 * n_in + (k - g0) * 16, stride = rows * 16;  // element (k + j, i) = base + j*16 + i/16*stride
    __m256 lo[4][LORA_ROWS], hi[4][LORA_ROWS];
    for (int j = 0; j < JA; j++) for (int r = 0; r < nr; r++) lo[j][r] = hi[j][r] = _mm256_setzero_ps();
    int64_t e = base;
    for (int64_t i = 0; i < in16; i += 16, e += stride) {
        // a group's later passes read lines the first fetched
        if (PF && k == g0) prefetch_ahead((const char *)s->A + (size_t)e * (dt == LM_F16 ? 2 : 4), dt);
        __m256 al[4], ah[4];
        for (int j = 0; j < JA; j++) { al[j] = load8(s->A, dt, e + j * 16); ah[j] = load8(s->A, dt, e + j * 16 + 8); }
        for (int r = 0; r < nr; r++) {
            const float *x = X + (r0 + r) * ldx + i;
            __m256 x0 = _mm256_loadu_ps(x), x1 = _mm256_loadu_ps(x + 8);
            for (int j = 0; j < JA; j++) {
                lo[j][r] = _mm256_fmadd_ps(al[j], x0, lo[j][r]);
                hi[j][r] = _mm256_fmadd_ps(ah[j], x1, hi[j][r]);
            }
        }
    }
    for (int r = 0; r < nr; r++)
        for (int j = 0; j < JA; j++)
            T[r * rank + k + j] = shrink_tail(lm_hsum256(_mm256_add_ps(lo[j][r], hi[j][r])), X + (r0 + r) * ldx, s, k + j, in16, n_in);
}

// Every row of A against nr rows of X, JA rows a pass where a group of 4
// has them left (then 2, then 1): T (nr, rank) = X A^T.
__attribute__((target("avx2,f16c,fma"), always_inline))
static inline void shrink_all(const float *X, int64_t ldx, int64_t n_in, const lm_lora_seg *s, int64_t r0,
                              const int nr, const int JA, float *T, const int PF) {
    int rank = s->rank;
    for (int k = 0; k < rank;) {
        int left = 4 - (k & 3);  // rows left in this group of A
        if (left > rank - k) left = rank - k;
        if (left >= JA) { shrink_ymm(X, ldx, n_in, s, r0, nr, k, JA, T, PF); k += JA; }
        else if (left >= 2) { shrink_ymm(X, ldx, n_in, s, r0, nr, k, 2, T, PF); k += 2; }
        else { shrink_ymm(X, ldx, n_in, s, r0, nr, k, 1, T, PF); k += 1; }
    }
}

// The sums of an expand pass: for nr rows and nv vectors of 8 columns from
// column o of a full 32-column block of B^T, an even-k and an odd-k chain.
enum { EXPAND_V = 4 };  // vectors a pass covers at most
__attribute__((target("avx2,f16c,fma"), always_inline))
static inline void expand_chains(const lm_lora_seg *s, const float *T, const int nr, int64_t o, const int nv,
                                 __m256 ev[EXPAND_V][LORA_ROWS], __m256 od[EXPAND_V][LORA_ROWS], const int PF) {
    enum { V = EXPAND_V };
    int rank = s->rank, dt = s->dtype;
    int64_t blk = (o & ~(int64_t)(LM_LORA_BLOCK - 1)) * rank + (o & (LM_LORA_BLOCK - 1));
    for (int v = 0; v < nv; v++) for (int r = 0; r < nr; r++) ev[v][r] = od[v][r] = _mm256_setzero_ps();
    int k = 0;
    for (; k + 2 <= rank; k += 2) {
        if (PF && (o & (LM_LORA_BLOCK - 1)) == 0) prefetch_ahead((const char *)s->BT + (size_t)(blk + (int64_t)k * LM_LORA_BLOCK) * (dt == LM_F16 ? 2 : 4), dt);
        __m256 b0[V], b1[V];
        for (int v = 0; v < nv; v++) {
            b0[v] = load8(s->BT, dt, blk + (int64_t)k * LM_LORA_BLOCK + 8 * v);
            b1[v] = load8(s->BT, dt, blk + (int64_t)(k + 1) * LM_LORA_BLOCK + 8 * v);
        }
        for (int r = 0; r < nr; r++) {
            __m256 t = _mm256_set1_ps(T[r * rank + k]), u = _mm256_set1_ps(T[r * rank + k + 1]);
            for (int v = 0; v < nv; v++) {
                ev[v][r] = _mm256_fmadd_ps(t, b0[v], ev[v][r]);
                od[v][r] = _mm256_fmadd_ps(u, b1[v], od[v][r]);
            }
        }
    }
    if (k < rank) {
        for (int r = 0; r < nr; r++) {
            __m256 t = _mm256_set1_ps(T[r * rank + k]);
            for (int v = 0; v < nv; v++) ev[v][r] = _mm256_fmadd_ps(t, load8(s->BT, dt, blk + (int64_t)k * LM_LORA_BLOCK + 8 * v), ev[v][r]);
        }
    }
}

// Output columns [o, o + OC) of a full 32-column block of B^T for nr rows,
// as an even-k and an odd-k chain added (as expand_vl does); where they go
// as for expand_tail (D's ld is n_out). No masked stores (microcoded on Zen
// 2): a vector whose 8 columns straddle a done and a pending base tile goes
// to D whole, and its done columns move to Y one by one.
__attribute__((target("avx2,f16c,fma"), always_inline))
static inline void expand_ymm(const lm_lora_seg *s, const float *T, float *Y, int64_t ldy, float *D,
                              const uint64_t *done, int64_t n_out, int64_t r0, const int nr, int64_t o, const int OC) {
    __m256 ev[EXPAND_V][LORA_ROWS], od[EXPAND_V][LORA_ROWS];
    const int nv = OC / 8;
    expand_chains(s, T, nr, o, nv, ev, od, 1);
    __m256 sc = _mm256_set1_ps(s->scale);
    for (int r = 0; r < nr; r++)
        for (int v = 0; v < nv; v++) {
            int64_t col = o + 8 * v;  // a multiple of 8: its 8 bits lie in one word of done
            __m256 d = _mm256_mul_ps(sc, _mm256_add_ps(ev[v][r], od[v][r]));
            unsigned m = !D ? 0xFF : done ? (unsigned)(done[col >> 6] >> (col & 63)) & 0xFF : 0;
            float *y = Y + (r0 + r) * ldy + col;
            if (m == 0xFF) {
                __m256 out = _mm256_add_ps(_mm256_loadu_ps(y), d);
                if (s->dora) out = _mm256_mul_ps(_mm256_loadu_ps(s->dora + col), out);
                _mm256_storeu_ps(y, out);
                continue;
            }
            float *dd = D + (r0 + r) * n_out + col;
            _mm256_storeu_ps(dd, d);
            for (; m; m &= m - 1) { int j = __builtin_ctz(m); y[j] = add_delta(s, col + j, y[j], dd[j]); }
        }
}

// How many A rows (JA) and output columns (OC) a pass covers, by nr, so the
// accumulators and operands fit the 16 ymm registers: a chunk of one row
// (every row its own adapter) otherwise ran two dependent FMA chains at a
// time, bound by the FMA latency rather than by converting f16.
__attribute__((target("avx2,f16c,fma"), always_inline))
static inline void chunk_avx2_n(const float *X, int64_t ldx, int64_t n_in, float *Y, int64_t ldy, int64_t n_out,
                                const lm_lora_seg *s, int64_t r0, const int nr, float *T, float *D, const uint64_t *done) {
    const int JA = nr == 1 ? 4 : nr == 2 ? 2 : 1, OC = nr == 1 ? 32 : nr == 2 ? 16 : 8;
    shrink_all(X, ldx, n_in, s, r0, nr, JA, T, 1);
    int64_t o = 0;
    for (; o + LM_LORA_BLOCK <= n_out; o += LM_LORA_BLOCK)
        for (int h = 0; h < LM_LORA_BLOCK; h += OC) expand_ymm(s, T, Y, ldy, D, done, n_out, r0, nr, o + h, OC);
    expand_tail(T, s, Y, ldy, D, n_out, done, r0, nr, o, n_out);
}

// D NULL: Y += scale * U (DoRA applied); else as lm_lora_chunk.
__attribute__((target("avx2,f16c,fma")))
static void chunk_avx2(const float *X, int64_t ldx, int64_t n_in, float *Y, int64_t ldy, int64_t n_out,
                       const lm_lora_seg *s, int64_t r0, int nr, float *T, float *D, const uint64_t *done) {
    switch (nr) {
    case 1: chunk_avx2_n(X, ldx, n_in, Y, ldy, n_out, s, r0, 1, T, D, done); break;
    case 2: chunk_avx2_n(X, ldx, n_in, Y, ldy, n_out, s, r0, 2, T, D, done); break;
    case 3: chunk_avx2_n(X, ldx, n_in, Y, ldy, n_out, s, r0, 3, T, D, done); break;
    default: chunk_avx2_n(X, ldx, n_in, Y, ldy, n_out, s, r0, LORA_ROWS, T, D, done); break;
    }
}

// ---- AVX-512 machines: ymm registers (AVX-512VL) ---------------------------------
// The chunk is bound by converting f16 weights, and on this Zen 4 a zmm
// vcvtph2ps is two 256-bit halves: a probe converted 39.8 G f16/s with ymm
// against 30.1 G/s with zmm, and a whole 1-row chunk (A and B^T in L2) ran
// 13-22 % faster in ymm than the zmm kernel this replaced. AVX-512VL gives ymm
// code 32 registers, enough for the accumulators. A row's result does not
// depend on how many rows share the chunk: every (row, rank) shrink sum is two
// 8-wide chains (columns [16b, 16b+8) and [16b+8, 16b+16)) added, then
// reduced; every expand output is an even-k and an odd-k chain. Only how many
// A rows (JA) or output columns (OC) one pass covers changes with nr, to stay
// within the registers.
// Output columns [o, o + OC) of a full 32-column block of B^T; where they
// go as for expand_tail (D's ld is n_out). A vector's 8 columns may straddle
// two base tiles, one done and one not: masked stores split it.
__attribute__((target("avx512f,avx512vl,f16c,fma"), always_inline))
static inline void expand_vl(const lm_lora_seg *s, const float *T, float *Y, int64_t ldy, float *D,
                             const uint64_t *done, int64_t n_out, int64_t r0, const int nr, int64_t o, const int OC) {
    __m256 ev[EXPAND_V][LORA_ROWS], od[EXPAND_V][LORA_ROWS];
    const int nv = OC / 8;
    expand_chains(s, T, nr, o, nv, ev, od, 0);
    __m256 sc = _mm256_set1_ps(s->scale);
    for (int r = 0; r < nr; r++)
        for (int v = 0; v < nv; v++) {
            int64_t col = o + 8 * v;  // a multiple of 8: its 8 bits lie in one word of done
            __m256 d = _mm256_mul_ps(sc, _mm256_add_ps(ev[v][r], od[v][r]));
            __mmask8 m = !D ? 0xFF : done ? (__mmask8)(done[col >> 6] >> (col & 63)) : 0;
            if (m) {
                float *y = Y + (r0 + r) * ldy + col;
                __m256 out = _mm256_add_ps(_mm256_maskz_loadu_ps(m, y), d);
                if (s->dora) out = _mm256_mul_ps(_mm256_maskz_loadu_ps(m, s->dora + col), out);
                _mm256_mask_storeu_ps(y, m, out);
            }
            if (m != 0xFF) _mm256_mask_storeu_ps(D + (r0 + r) * n_out + col, (__mmask8)~m, d);
        }
}

// ---- AVX-512 machines with full-width zmm -----------------------------------
// Where a zmm vcvtph2ps is one operation (Zen 5: 13.1 against 6.9 f16 a TSC
// cycle in ymm), the same chains in zmm: lane j < 8 of a shrink accumulator
// is lane j of shrink_vl's lo chain and lane 8 + j of its hi chain, and an
// expand vector is two of expand_vl's, so every result has the same bits as
// on the ymm path. 32 zmm registers hold four rows of A for four rows.
__attribute__((target("avx512f,avx512vl,f16c,fma")))
static inline __m512 load16(const void *p, int dtype, int64_t i) {
    if (dtype == LM_F16) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i)));
    return _mm512_loadu_ps((const float *)p + i);
}

__attribute__((target("avx512f,avx512vl,f16c,fma"), always_inline))
static inline void shrink_z(const float *X, int64_t ldx, int64_t n_in, const lm_lora_seg *s, int64_t r0,
                            const int nr, int k, const int JA, float *T) {
    int rank = s->rank, dt = s->dtype;
    int64_t in16 = n_in & ~(int64_t)15;
    int64_t g0 = k & ~3, rows = rank - g0 < 4 ? rank - g0 : 4;
    int64_t base = g0 * n_in + (k - g0) * 16, stride = rows * 16;
    __m512 acc[4][LORA_ROWS];
    for (int j = 0; j < JA; j++) for (int r = 0; r < nr; r++) acc[j][r] = _mm512_setzero_ps();
    int64_t e = base;
    for (int64_t i = 0; i < in16; i += 16, e += stride) {
        __m512 a[4];
        for (int j = 0; j < JA; j++) a[j] = load16(s->A, dt, e + j * 16);
        for (int r = 0; r < nr; r++) {
            __m512 x = _mm512_loadu_ps(X + (r0 + r) * ldx + i);
            for (int j = 0; j < JA; j++) acc[j][r] = _mm512_fmadd_ps(a[j], x, acc[j][r]);
        }
    }
    for (int r = 0; r < nr; r++)
        for (int j = 0; j < JA; j++) {
            __m256 lo = _mm512_castps512_ps256(acc[j][r]);
            __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[j][r]), 1));
            T[r * rank + k + j] = shrink_tail(lm_hsum256(_mm256_add_ps(lo, hi)), X + (r0 + r) * ldx, s, k + j, in16, n_in);
        }
}

// A whole 32-column block of B^T from column o, as expand_vl.
__attribute__((target("avx512f,avx512vl,f16c,fma"), always_inline))
static inline void expand_z(const lm_lora_seg *s, const float *T, float *Y, int64_t ldy, float *D,
                            const uint64_t *done, int64_t n_out, int64_t r0, const int nr, int64_t o) {
    enum { V = LM_LORA_BLOCK / 16 };
    int rank = s->rank, dt = s->dtype;
    int64_t blk = o * rank;
    __m512 ev[V][LORA_ROWS], od[V][LORA_ROWS];
    for (int v = 0; v < V; v++) for (int r = 0; r < nr; r++) ev[v][r] = od[v][r] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 2 <= rank; k += 2) {
        __m512 b0[V], b1[V];
        for (int v = 0; v < V; v++) {
            b0[v] = load16(s->BT, dt, blk + (int64_t)k * LM_LORA_BLOCK + 16 * v);
            b1[v] = load16(s->BT, dt, blk + (int64_t)(k + 1) * LM_LORA_BLOCK + 16 * v);
        }
        for (int r = 0; r < nr; r++) {
            __m512 t = _mm512_set1_ps(T[r * rank + k]), u = _mm512_set1_ps(T[r * rank + k + 1]);
            for (int v = 0; v < V; v++) {
                ev[v][r] = _mm512_fmadd_ps(t, b0[v], ev[v][r]);
                od[v][r] = _mm512_fmadd_ps(u, b1[v], od[v][r]);
            }
        }
    }
    if (k < rank) {
        for (int r = 0; r < nr; r++) {
            __m512 t = _mm512_set1_ps(T[r * rank + k]);
            for (int v = 0; v < V; v++) ev[v][r] = _mm512_fmadd_ps(t, load16(s->BT, dt, blk + (int64_t)k * LM_LORA_BLOCK + 16 * v), ev[v][r]);
        }
    }
    __m512 sc = _mm512_set1_ps(s->scale);
    for (int r = 0; r < nr; r++)
        for (int v = 0; v < V; v++) {
            int64_t col = o + 16 * v;  // a multiple of 16: its 16 bits lie in one word of done
            __m512 d = _mm512_mul_ps(sc, _mm512_add_ps(ev[v][r], od[v][r]));
            __mmask16 m = !D ? 0xFFFF : done ? (__mmask16)(done[col >> 6] >> (col & 63)) : 0;
            if (m) {
                float *y = Y + (r0 + r) * ldy + col;
                __m512 out = _mm512_add_ps(_mm512_maskz_loadu_ps(m, y), d);
                if (s->dora) out = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, s->dora + col), out);
                _mm512_mask_storeu_ps(y, m, out);
            }
            if (m != 0xFFFF) _mm512_mask_storeu_ps(D + (r0 + r) * n_out + col, (__mmask16)~m, d);
        }
}

__attribute__((target("avx512f,avx512vl,f16c,fma"), always_inline))
static inline void chunk_z_n(const float *X, int64_t ldx, int64_t n_in, float *Y, int64_t ldy, int64_t n_out,
                             const lm_lora_seg *s, int64_t r0, const int nr, float *T, float *D, const uint64_t *done) {
    int rank = s->rank;
    for (int k = 0; k < rank;) {
        int left = 4 - (k & 3);  // rows left in this group of A
        if (left > rank - k) left = rank - k;
        if (left == 4) { shrink_z(X, ldx, n_in, s, r0, nr, k, 4, T); k += 4; }
        else if (left >= 2) { shrink_z(X, ldx, n_in, s, r0, nr, k, 2, T); k += 2; }
        else { shrink_z(X, ldx, n_in, s, r0, nr, k, 1, T); k += 1; }
    }
    int64_t o = 0;
    for (; o + LM_LORA_BLOCK <= n_out; o += LM_LORA_BLOCK) expand_z(s, T, Y, ldy, D, done, n_out, r0, nr, o);
    expand_tail(T, s, Y, ldy, D, n_out, done, r0, nr, o, n_out);
}

__attribute__((target("avx512f,avx512vl,f16c,fma")))
static void chunk_z(const float *X, int64_t ldx, int64_t n_in, float *Y, int64_t ldy, int64_t n_out,
                    const lm_lora_seg *s, int64_t r0, int nr, float *T, float *D, const uint64_t *done) {
    switch (nr) {
    case 1: chunk_z_n(X, ldx, n_in, Y, ldy, n_out, s, r0, 1, T, D, done); break;
    case 2: chunk_z_n(X, ldx, n_in, Y, ldy, n_out, s, r0, 2, T, D, done); break;
    case 3: chunk_z_n(X, ldx, n_in, Y, ldy, n_out, s, r0, 3, T, D, done); break;
    default: chunk_z_n(X, ldx, n_in, Y, ldy, n_out, s, r0, LORA_ROWS, T, D, done); break;
    }
}

__attribute__((target("avx512f,avx512vl,f16c,fma"), always_inline))
static inline void chunk_vl_n(const float *X, int64_t ldx, int64_t n_in, float *Y, int64_t ldy, int64_t n_out,
                              const lm_lora_seg *s, int64_t r0, const int nr, float *T, float *D, const uint64_t *done) {
    const int JA = nr <= 2 ? 4 : 2, OC = nr <= 2 ? 32 : 16;
    shrink_all(X, ldx, n_in, s, r0, nr, JA, T, 0);
    int64_t o = 0;
    for (; o + LM_LORA_BLOCK <= n_out; o += LM_LORA_BLOCK)
        for (int h = 0; h < LM_LORA_BLOCK; h += OC) expand_vl(s, T, Y, ldy, D, done, n_out, r0, nr, o + h, OC);
    expand_tail(T, s, Y, ldy, D, n_out, done, r0, nr, o, n_out);
}

// D NULL: Y += scale * U (DoRA applied); else as lm_lora_chunk.
__attribute__((target("avx512f,avx512vl,f16c,fma")))
static void chunk_vl(const float *X, int64_t ldx, int64_t n_in, float *Y, int64_t ldy, int64_t n_out,
                     const lm_lora_seg *s, int64_t r0, int nr, float *T, float *D, const uint64_t *done) {
    switch (nr) {
    case 1: chunk_vl_n(X, ldx, n_in, Y, ldy, n_out, s, r0, 1, T, D, done); break;
    case 2: chunk_vl_n(X, ldx, n_in, Y, ldy, n_out, s, r0, 2, T, D, done); break;
    case 3: chunk_vl_n(X, ldx, n_in, Y, ldy, n_out, s, r0, 3, T, D, done); break;
    default: chunk_vl_n(X, ldx, n_in, Y, ldy, n_out, s, r0, LORA_ROWS, T, D, done); break;
    }
}
#endif

// ---- driver -------------------------------------------------------------------

typedef struct {
    const float *X;
    int64_t ldx, n_in;
    float *Y;
    int64_t ldy, n_out;
    const lm_lora_seg *segs;
    int n_segs;
    float *scratch;
    size_t per_thread;
    int64_t n_items;
    int level;
} lora_ctx;

static void lora_task(void *vctx, int ith, int nth) {
    lora_ctx *c = (lora_ctx *)vctx;
    float *U = c->scratch + (size_t)ith * c->per_thread;
    float *T = U + (size_t)LORA_ROWS * (size_t)c->n_out;
    // Item i is the (i)-th chunk of LORA_ROWS rows counting across segments.
    int64_t item = 0;
    for (int si = 0; si < c->n_segs; si++) {
        const lm_lora_seg *s = &c->segs[si];
        if (s->rank <= 0 || s->n_rows <= 0) continue;
        for (int64_t r0 = 0; r0 < s->n_rows; r0 += LORA_ROWS, item++) {
            if (item % nth != ith) continue;
            int nr = (int)(s->n_rows - r0 < LORA_ROWS ? s->n_rows - r0 : LORA_ROWS);
#if defined(__x86_64__)
            if (c->level >= LM_CPU_AVX512 && lm_cpu_wide512()) { chunk_z(c->X, c->ldx, c->n_in, c->Y, c->ldy, c->n_out, s, s->row0 + r0, nr, T, NULL, NULL); continue; }
            if (c->level >= LM_CPU_AVX512) { chunk_vl(c->X, c->ldx, c->n_in, c->Y, c->ldy, c->n_out, s, s->row0 + r0, nr, T, NULL, NULL); continue; }
            if (c->level >= LM_CPU_AVX2) { chunk_avx2(c->X, c->ldx, c->n_in, c->Y, c->ldy, c->n_out, s, s->row0 + r0, nr, T, NULL, NULL); continue; }
#endif
            chunk_scalar(c->X, c->ldx, c->n_in, c->Y, c->ldy, c->n_out, s, s->row0 + r0, nr, T, U, 0);
        }
    }
}

void lm_lora_chunk(const float *X, int64_t ldx, int64_t n_in, float *Y, int64_t ldy, float *D, int64_t n_out,
                   const lm_lora_seg *s, int64_t r0, int nr, const uint64_t *done, float *scratch, int level) {
    float *U = scratch, *T = U + (size_t)LORA_ROWS * (size_t)n_out;
#if defined(__x86_64__)
    if (level >= LM_CPU_AVX512 && lm_cpu_wide512()) { chunk_z(X, ldx, n_in, Y, ldy, n_out, s, r0, nr, T, D, done); return; }
    if (level >= LM_CPU_AVX512) { chunk_vl(X, ldx, n_in, Y, ldy, n_out, s, r0, nr, T, D, done); return; }
    if (level >= LM_CPU_AVX2) { chunk_avx2(X, ldx, n_in, Y, ldy, n_out, s, r0, nr, T, D, done); return; }
#endif
    chunk_scalar(X, ldx, n_in, D, n_out, n_out, s, r0, nr, T, U, 1);
    (void)level;
    // Below AVX2 all of scale * U went to D; the done columns move to Y
    // as the fold would move them.
    for (int r = 0; r < nr && done; r++) {
        float *y = Y + (r0 + r) * ldy;
        const float *d = D + (r0 + r) * n_out;
        for (int64_t o = 0; o < n_out; o++)
            if (col_done(done, o)) y[o] = add_delta(s, o, y[o], d[o]);
    }
}

size_t lm_lora_scratch_floats(int max_rank, int64_t n_out) {
    return (size_t)lm_pool_threads() * ((size_t)LORA_ROWS * (size_t)(n_out + max_rank) + 16);
}

void lm_lora_apply(const float *X, int64_t ldx, int64_t n_in, float *Y, int64_t ldy, int64_t n_out,
                   const lm_lora_seg *segs, int n_segs, float *scratch) {
    int max_rank = 0;
    int64_t items = 0;
    for (int i = 0; i < n_segs; i++) {
        if (segs[i].rank > max_rank) max_rank = segs[i].rank;
        if (segs[i].rank > 0) items += (segs[i].n_rows + LORA_ROWS - 1) / LORA_ROWS;
    }
    if (items == 0) return;
    lora_ctx c = { X, ldx, n_in, Y, ldy, n_out, segs, n_segs, scratch,
                   (size_t)LORA_ROWS * (size_t)(n_out + max_rank) + 16, items, lm_cpu_level() };
    if (items == 1) { lora_task(&c, 0, 1); return; } // not worth waking the pool
    lm_parallel(lora_task, &c);
}

void lm_lora_apply_single(const float *X, int64_t ldx, int64_t n_in, float *Y, int64_t ldy, int64_t n_out,
                          const lm_lora_seg *seg, float *scratch) {
    int64_t per = (int64_t)LORA_ROWS * (n_out + seg->rank) + 16;
    lora_ctx c = { X, ldx, n_in, Y, ldy, n_out, seg, 1, scratch, (size_t)per, 1, lm_cpu_level() };
    lora_task(&c, 0, 1);
}

void lm_lora_apply_ref(const float *X, int64_t ldx, int64_t n_in, float *Y, int64_t ldy, int64_t n_out,
                       const lm_lora_seg *segs, int n_segs) {
    for (int si = 0; si < n_segs; si++) {
        const lm_lora_seg *s = &segs[si];
        for (int64_t r = s->row0; r < s->row0 + s->n_rows; r++) {
            double t[s->rank > 0 ? s->rank : 1];
            for (int k = 0; k < s->rank; k++) {
                double acc = 0;
                for (int64_t i = 0; i < n_in; i++) acc += (double)X[r * ldx + i] * ld_elem(s->A, s->dtype, a_index(k, i, s->rank, n_in));
                t[k] = acc;
            }
            for (int64_t o = 0; o < n_out; o++) {
                double u = 0;
                for (int k = 0; k < s->rank; k++) u += t[k] * ld_elem(s->BT, s->dtype, bt_index(k, o, s->rank, n_out));
                double y = Y[r * ldy + o] + s->scale * u;
                Y[r * ldy + o] = (float)(s->dora ? s->dora[o] * y : y);
            }
        }
    }
}

void lm_dora_norms(const void *W, int w_dtype, int64_t n_out, int64_t n_in, const float *A, const float *B,
                   int rank, float scale, float *out, float *scratch) {
    size_t row_bytes = (size_t)(n_in / lm_block_size(w_dtype)) * lm_block_bytes(w_dtype);
    for (int64_t o = 0; o < n_out; o++) {
        lm_dequant_row(w_dtype, (const uint8_t *)W + (size_t)o * row_bytes, scratch, n_in);
        double ss = 0;
        for (int64_t i = 0; i < n_in; i++) {
            float ba = 0.0f;
            for (int k = 0; k < rank; k++) ba += B[o * rank + k] * A[(int64_t)k * n_in + i];
            float w = scratch[i] + scale * ba;
            ss += (double)w * (double)w;
        }
        out[o] = (float)sqrt(ss);
    }
}

void lm_lora_embed(float *x, const float *a_col, const float *BT, int rank, int64_t dim, float scale) {
    for (int64_t d = 0; d < dim; d++) {
        float u = 0.0f;
        for (int k = 0; k < rank; k++) u += a_col[k] * BT[(int64_t)k * dim + d];
        x[d] += u * scale;
    }
}

void lm_f16_to_f32_n(const uint16_t *src, float *dst, int64_t n) { lm_dequant_row(LM_F16, src, dst, n); }

void lm_f32_to_f16_n(const float *src, uint16_t *dst, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = lm_f32_to_f16(src[i]);
}

int64_t lm_first_nonfinite(const float *x, int64_t n) {
    const uint32_t *u = (const uint32_t *)x;
    // The exponent all ones is NaN or infinity; test 64 at a time without a branch, then find the one.
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        uint32_t any = 0;
        for (int j = 0; j < 64; j++) any |= (uint32_t)((u[i + j] & 0x7F800000u) == 0x7F800000u);
        if (any) break;
    }
    for (; i < n; i++) if ((u[i] & 0x7F800000u) == 0x7F800000u) return i;
    return -1;
}

int64_t lm_adapter_tensor(int src_dtype, const void *src, int64_t rows, int64_t cols, int transpose,
                          int dst_dtype, void *dst, float *scratch) {
    int64_t n = rows * cols;
    float *f = (dst_dtype == LM_F32 && !transpose) ? (float *)dst : scratch;
    lm_dequant_row_ref(src_dtype, src, f, n);
    int64_t bad = lm_first_nonfinite(f, n);
    if (bad >= 0) return bad;
    if (!transpose) {
        if (dst_dtype == LM_F16) lm_f32_to_f16_n(f, (uint16_t *)dst, n);
        return -1;
    }
    // 16 x 16 tiles: each tile's reads and writes stay within a few cache lines.
    for (int64_t r0 = 0; r0 < rows; r0 += 16)
        for (int64_t c0 = 0; c0 < cols; c0 += 16) {
            int64_t r1 = r0 + 16 < rows ? r0 + 16 : rows, c1 = c0 + 16 < cols ? c0 + 16 : cols;
            if (dst_dtype == LM_F32) {
                float *d = (float *)dst;
                for (int64_t c = c0; c < c1; c++) for (int64_t r = r0; r < r1; r++) d[c * rows + r] = f[r * cols + c];
            } else {
                uint16_t *d = (uint16_t *)dst;
                for (int64_t c = c0; c < c1; c++) for (int64_t r = r0; r < r1; r++) d[c * rows + r] = lm_f32_to_f16(f[r * cols + c]);
            }
        }
    return -1;
}

#define LM_ROPE_PERMUTE(T)                                                                    \
    do {                                                                                      \
        T *m = (T *)p, *tmp = (T *)malloc((size_t)cols * sizeof(T));                          \
        if (!tmp) abort();                                                                    \
        for (int64_t r = 0; r < rows; r++) {                                                  \
            T *row = m + r * cols;                                                            \
            memcpy(tmp, row, (size_t)cols * sizeof(T));                                       \
            /* column g = h0 + k of a whole head takes h0 + (k & 1) * half + k / 2 */           \
            for (int64_t g = 0, h0 = 0, k = 0; g < whole; g++) {                              \
                row[g] = tmp[h0 + (k & 1) * half + (k >> 1)];                                 \
                if (++k == head_dim) { k = 0; h0 += head_dim; }                               \
            }                                                                                 \
        }                                                                                     \
        free(tmp);                                                                            \
    } while (0)

void lm_rope_permute_cols(void *p, int64_t rows, int64_t cols, int64_t head_dim, int elem_bytes) {
    if (head_dim < 2 || rows <= 0 || cols <= 0) return;
    // Whole heads only (the plan's shapes make every column one; a partial head would read past the row).
    int64_t half = head_dim / 2, whole = cols / head_dim * head_dim;
    if (elem_bytes == 4) LM_ROPE_PERMUTE(uint32_t);
    else LM_ROPE_PERMUTE(uint16_t);
}

void lm_f32_to_bf16_in_place(void *buf, int64_t n) {
    const uint32_t *f = (const uint32_t *)buf;
    uint16_t *h = (uint16_t *)buf;
    // h[i] (bytes 2i, 2i+1) lies at or below f[i] (bytes 4i..4i+3), which is read first.
    for (int64_t i = 0; i < n; i++) {
        uint32_t b = f[i];
        h[i] = (b & 0x7FFFFFFFu) > 0x7F800000u ? (uint16_t)((b >> 16) | 0x40) : (uint16_t)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
    }
}

void lm_bf16_widen_in_place(void *buf, int64_t n) {
    uint32_t *f = (uint32_t *)buf;
    const uint16_t *h = (const uint16_t *)buf + n;
    // A block's 16 values are loaded before any is stored: its stores reach at
    // most byte 4i+63, below the next block's first read at 2n+2i+32 (i+16 <= n).
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        uint32_t t[16];
        for (int j = 0; j < 16; j++) t[j] = (uint32_t)h[i + j] << 16;
        memcpy(f + i, t, sizeof t);
    }
    for (; i < n; i++) f[i] = (uint32_t)h[i] << 16;
}

#if defined(__x86_64__)
// One crc32 instruction has a latency of 3 cycles and a throughput of 1, so a
// single stream runs at a third of the unit's speed (~8 GB/s at 2.6 GHz).
// Three streams over adjacent stretches run in parallel; their registers are
// then joined: the register after X||Y is shift_|Y|(register after X) xor the
// register of Y alone from 0, where shift_L (appending L zero bytes) is linear
// in the register and so is four table lookups.
enum { CRC_LONG = 8192, CRC_SHORT = 256 };
static uint32_t crc_long[4][256], crc_short[4][256];
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;

__attribute__((target("sse4.2")))
static uint32_t crc_zeros(uint32_t reg, size_t len) {
    uint64_t c = reg;
    for (size_t i = 0; i < len; i += 8) c = _mm_crc32_u64(c, 0);
    return (uint32_t)c;
}

static void crc_table(uint32_t t[4][256], size_t len) {
    uint32_t col[32];  // shift_len of each single-bit register
    for (int b = 0; b < 32; b++) col[b] = crc_zeros(1u << b, len);
    for (int k = 0; k < 4; k++)
        for (int v = 0; v < 256; v++) {
            uint32_t x = 0;
            for (int j = 0; j < 8; j++) if (v >> j & 1) x ^= col[8 * k + j];
            t[k][v] = x;
        }
}

static void crc_tables_init(void) { crc_table(crc_long, CRC_LONG); crc_table(crc_short, CRC_SHORT); }

static inline uint32_t crc_shift(const uint32_t t[4][256], uint32_t c) {
    return t[0][c & 0xff] ^ t[1][(c >> 8) & 0xff] ^ t[2][(c >> 16) & 0xff] ^ t[3][c >> 24];
}

static inline uint64_t crc_load64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

__attribute__((target("sse4.2")))
static const uint8_t *crc_three_way(uint64_t *reg, const uint8_t *p, size_t *n, size_t len, const uint32_t t[4][256]) {
    uint64_t c0 = *reg;
    while (*n >= 3 * len) {
        uint64_t c1 = 0, c2 = 0;
        for (size_t i = 0; i < len; i += 8) {
            c0 = _mm_crc32_u64(c0, crc_load64(p + i));
            c1 = _mm_crc32_u64(c1, crc_load64(p + len + i));
            c2 = _mm_crc32_u64(c2, crc_load64(p + 2 * len + i));
        }
        c0 = crc_shift(t, (uint32_t)c0) ^ (uint32_t)c1;
        c0 = crc_shift(t, (uint32_t)c0) ^ (uint32_t)c2;
        p += 3 * len;
        *n -= 3 * len;
    }
    *reg = c0;
    return p;
}

__attribute__((target("sse4.2")))
static uint32_t crc32c_hw(uint32_t crc, const uint8_t *p, size_t n) {
    uint64_t c = (uint32_t)~crc;
    if (n >= 3 * CRC_SHORT) {
        pthread_once(&crc_once, crc_tables_init);
        p = crc_three_way(&c, p, &n, CRC_LONG, (const uint32_t (*)[256])crc_long);
        p = crc_three_way(&c, p, &n, CRC_SHORT, (const uint32_t (*)[256])crc_short);
    }
    while (n >= 8) { c = _mm_crc32_u64(c, crc_load64(p)); p += 8; n -= 8; }
    uint32_t c32 = (uint32_t)c;
    while (n--) c32 = _mm_crc32_u8(c32, *p++);
    return ~c32;
}
#endif

static uint32_t crc32c_sw(uint32_t crc, const uint8_t *p, size_t n) {
    uint32_t c = ~crc;
    while (n--) {
        c ^= *p++;
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
    }
    return ~c;
}

uint32_t lm_crc32c(uint32_t crc, const void *data, size_t n) {
#if defined(__x86_64__)
    if (__builtin_cpu_supports("sse4.2")) return crc32c_hw(crc, (const uint8_t *)data, n);
#endif
    return crc32c_sw(crc, (const uint8_t *)data, n);
}

uint32_t lm_crc32c_ref(uint32_t crc, const void *data, size_t n) { return crc32c_sw(crc, (const uint8_t *)data, n); }
