// Small SIMD helpers shared by the kernel files (x86 only; not part of the
// public header Swift imports).
#pragma once
#if defined(__x86_64__)
#include <immintrin.h>

__attribute__((target("avx2,fma,f16c")))
static inline float lm_hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// Y (nr rows, ld ldy)[0:n] += D (ld ldd), or Y = dora * (Y + D): a LoRA
// delta folded into the base result, the same two operations as the scalar
// fold (so the same bits), 8 columns at a time and the tail one by one.
// (Not under a mask: AVX2's vmaskmovps store is microcoded on Zen 2, and a
// masked fold ran slower than the compiler's SSE loop.)
__attribute__((target("avx2")))
static inline void lm_fold_rows_avx2(float *restrict y, int64_t ldy, const float *restrict d, int64_t ldd,
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

// The mask of a 16-float vector's first min(left, 16) lanes (left > 0): the
// last, partial vector of a row under masked loads and stores.
static inline __mmask16 lm_mask16(int64_t left) {
    return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
}
#endif
