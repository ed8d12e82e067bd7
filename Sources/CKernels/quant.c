// Block formats and dequantization. Scalar code is the reference; the SIMD
// variants must produce bit-identical floats (no FMA contraction: the
// reference value of a Q4_1 weight is d*q + m rounded twice, as in gguf-py).
#include "kernels.h"
#include <string.h>
#include <math.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

float lm_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t mant = h & 0x3ff;
    uint32_t bits;
    if (exp == 0) {
        if (mant == 0) bits = sign;
        else { // subnormal: normalise
            int e = -1;
            do { e++; mant <<= 1; } while ((mant & 0x400) == 0);
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((mant & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

uint16_t lm_f32_to_f16(float f) {
    // round-to-nearest-even, as numpy and torch do
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000;
    uint32_t absx = x & 0x7fffffffu;
    if (absx >= 0x7f800000u) return (uint16_t)(sign | 0x7c00 | (absx > 0x7f800000u ? 0x200 : 0));
    if (absx >= 0x477ff000u) return (uint16_t)(sign | 0x7c00); // overflow -> inf
    if (absx < 0x38800000u) { // subnormal or zero in f16
        float a;
        memcpy(&a, &absx, 4);
        // scale so that the f16 subnormal LSB becomes 1.0 and round to nearest even
        float s = a * 16777216.0f; // 2^24
        uint32_t m = (uint32_t)nearbyintf(s);
        return (uint16_t)(sign | m);
    }
    uint32_t e = ((absx >> 23) - 127 + 15);
    uint32_t mant = absx & 0x7fffff;
    uint32_t h = (e << 10) | (mant >> 13);
    uint32_t rem = mant & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++;
    return (uint16_t)(sign | h);
}

static inline float bf16_to_f32(uint16_t b) {
    uint32_t bits = (uint32_t)b << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t rd16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }

int lm_block_size(int dtype) {
    switch (dtype) {
    case LM_F32: case LM_F16: case LM_BF16: return 1;
    case LM_Q4_0: case LM_Q4_1: case LM_Q5_0: case LM_Q5_1: case LM_Q8_0: case LM_IQ4_NL: return 32;
    case LM_Q2_K: case LM_Q3_K: case LM_Q4_K: case LM_Q5_K: case LM_Q6_K: case LM_IQ4_XS: return 256;
    default: return 0;
    }
}

size_t lm_block_bytes(int dtype) {
    switch (dtype) {
    case LM_F32: return 4;
    case LM_F16: case LM_BF16: return 2;
    case LM_Q4_0: return 18;
    case LM_Q4_1: return 20;
    case LM_Q5_0: return 22;
    case LM_Q5_1: return 24;
    case LM_Q8_0: return 34;
    case LM_Q2_K: return 84;
    case LM_Q3_K: return 110;
    case LM_Q4_K: return 144;
    case LM_Q5_K: return 176;
    case LM_Q6_K: return 210;
    case LM_IQ4_NL: return 18;
    case LM_IQ4_XS: return 136;
    default: return 0;
    }
}

// IQ4_NL and IQ4_XS index this non-uniform grid (ggml's kvalues_iq4nl).
static const int8_t kvalues_iq4nl[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

// IQ4_XS sub-block ib's 6-bit scale minus 32: low 4 bits from scales_l, high 2 from scales_h.
static inline int iq4xs_scale(const uint8_t *p, int ib) {
    int lo = (p[4 + ib / 2] >> (4 * (ib % 2))) & 0xF;
    int hi = (rd16(p + 2) >> (2 * ib)) & 3;
    return (lo | hi << 4) - 32;
}

static inline void scale_min_k4(int j, const uint8_t *q, uint8_t *d, uint8_t *m) {
    if (j < 4) {
        *d = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

void lm_dequant_row_ref(int dtype, const void *src, float *y, int64_t n) {
    const uint8_t *p = (const uint8_t *)src;
    switch (dtype) {
    case LM_F32:
        memcpy(y, src, (size_t)n * 4);
        return;
    case LM_F16:
        for (int64_t i = 0; i < n; i++) y[i] = lm_f16_to_f32(rd16(p + 2 * i));
        return;
    case LM_BF16:
        for (int64_t i = 0; i < n; i++) y[i] = bf16_to_f32(rd16(p + 2 * i));
        return;
    case LM_Q4_0:
        for (int64_t b = 0; b < n / 32; b++, p += 18, y += 32) {
            float d = lm_f16_to_f32(rd16(p));
            for (int j = 0; j < 16; j++) {
                y[j] = (float)((p[2 + j] & 0xF) - 8) * d;
                y[j + 16] = (float)((p[2 + j] >> 4) - 8) * d;
            }
        }
        return;
    case LM_Q4_1:
        for (int64_t b = 0; b < n / 32; b++, p += 20, y += 32) {
            float d = lm_f16_to_f32(rd16(p)), m = lm_f16_to_f32(rd16(p + 2));
            for (int j = 0; j < 16; j++) {
                float lo = d * (float)(p[4 + j] & 0xF);
                float hi = d * (float)(p[4 + j] >> 4);
                y[j] = lo + m;
                y[j + 16] = hi + m;
            }
        }
        return;
    case LM_Q5_0:  // d qh[4] (bit j: the fifth bit of element j) qs[16]
    case LM_Q5_1:  // d m qh[4] qs[16]
        for (int64_t b = 0; b < n / 32; b++, y += 32) {
            int q51 = dtype == LM_Q5_1;
            float d = lm_f16_to_f32(rd16(p)), m = q51 ? lm_f16_to_f32(rd16(p + 2)) : 0;
            const uint8_t *qh = p + (q51 ? 4 : 2), *qs = qh + 4;
            uint32_t h = (uint32_t)qh[0] | (uint32_t)qh[1] << 8 | (uint32_t)qh[2] << 16 | (uint32_t)qh[3] << 24;
            // The quants first, then one loop per type: no branch inside the loop.
            int lo[16], hi[16];
            for (int j = 0; j < 16; j++) {
                lo[j] = (qs[j] & 0xF) | ((h >> j) & 1) << 4;
                hi[j] = (qs[j] >> 4) | ((h >> (j + 16)) & 1) << 4;
            }
            if (q51) {
                for (int j = 0; j < 16; j++) {  // separate statements: no FMA (gguf-py rounds the product)
                    float tl = d * (float)lo[j], th = d * (float)hi[j];
                    y[j] = tl + m;
                    y[j + 16] = th + m;
                }
            } else {
                for (int j = 0; j < 16; j++) {
                    y[j] = (float)(lo[j] - 16) * d;
                    y[j + 16] = (float)(hi[j] - 16) * d;
                }
            }
            p += q51 ? 24 : 22;
        }
        return;
    case LM_Q8_0:
        for (int64_t b = 0; b < n / 32; b++, p += 34, y += 32) {
            float d = lm_f16_to_f32(rd16(p));
            for (int j = 0; j < 32; j++) y[j] = (float)(int8_t)p[2 + j] * d;
        }
        return;
    case LM_Q4_K:
        for (int64_t b = 0; b < n / 256; b++, p += 144) {
            float d = lm_f16_to_f32(rd16(p)), dmin = lm_f16_to_f32(rd16(p + 2));
            const uint8_t *scales = p + 4, *q = p + 16;
            int is = 0;
            for (int j = 0; j < 256; j += 64) {
                uint8_t sc, m;
                scale_min_k4(is + 0, scales, &sc, &m);
                float d1 = d * sc, m1 = dmin * m;
                scale_min_k4(is + 1, scales, &sc, &m);
                float d2 = d * sc, m2 = dmin * m;
                for (int l = 0; l < 32; l++) { float t = d1 * (float)(q[l] & 0xF); y[l] = t - m1; }
                for (int l = 0; l < 32; l++) { float t = d2 * (float)(q[l] >> 4); y[32 + l] = t - m2; }
                q += 32; is += 2; y += 64;
            }
        }
        return;
    // The k-quants below follow ggml's dequantize_row_*. A product and the
    // min's subtraction are separate statements so that no compiler fuses
    // them into an FMA: gguf-py rounds each, and the test wants its bits.
    case LM_Q2_K:  // scales[16] (4-bit scale | 4-bit min) qs[64] d dmin
        for (int64_t b = 0; b < n / 256; b++, p += 84) {
            const uint8_t *sc = p, *q = p + 16;
            float d = lm_f16_to_f32(rd16(p + 80)), dmin = lm_f16_to_f32(rd16(p + 82));
            for (int h = 0; h < 2; h++, q += 32) {
                for (int shift = 0; shift < 8; shift += 2) {
                    for (int half = 0; half < 2; half++, sc++) {
                        float dl = d * (float)(*sc & 0xF), ml = dmin * (float)(*sc >> 4);
                        for (int l = 0; l < 16; l++) { float t = dl * (float)((q[16 * half + l] >> shift) & 3); y[l] = t - ml; }
                        y += 16;
                    }
                }
            }
        }
        return;
    case LM_Q3_K:  // hmask[32] qs[64] scales[12] (16 six-bit scales) d
        for (int64_t b = 0; b < n / 256; b++, p += 110) {
            const uint8_t *hm = p, *q = p + 32, *s12 = p + 96;
            float d = lm_f16_to_f32(rd16(p + 108));
            int8_t sc[16];
            for (int j = 0; j < 16; j++) {
                int lo = j < 8 ? s12[j] & 0xF : s12[j - 8] >> 4;
                int hi = (s12[8 + j % 4] >> (2 * (j / 4))) & 3;
                sc[j] = (int8_t)((lo | hi << 4) - 32);
            }
            uint8_t m = 1;
            int is = 0;
            for (int h = 0; h < 2; h++, q += 32) {
                for (int shift = 0; shift < 8; shift += 2, m <<= 1) {
                    for (int half = 0; half < 2; half++) {
                        float dl = d * (float)sc[is++];
                        for (int l = 0; l < 16; l++) {
                            int k = 16 * half + l;
                            y[l] = dl * (float)((int)((q[k] >> shift) & 3) - ((hm[k] & m) ? 0 : 4));
                        }
                        y += 16;
                    }
                }
            }
        }
        return;
    case LM_Q5_K:  // d dmin scales[12] qh[32] qs[128]
        for (int64_t b = 0; b < n / 256; b++, p += 176) {
            float d = lm_f16_to_f32(rd16(p)), dmin = lm_f16_to_f32(rd16(p + 2));
            const uint8_t *scales = p + 4, *qh = p + 16, *q = p + 48;
            uint8_t u1 = 1, u2 = 2;
            for (int j = 0, is = 0; j < 256; j += 64, is += 2, q += 32, u1 <<= 2, u2 <<= 2) {
                uint8_t sc, m;
                scale_min_k4(is + 0, scales, &sc, &m);
                float d1 = d * sc, m1 = dmin * m;
                scale_min_k4(is + 1, scales, &sc, &m);
                float d2 = d * sc, m2 = dmin * m;
                for (int l = 0; l < 32; l++) { float t = d1 * (float)((q[l] & 0xF) + (qh[l] & u1 ? 16 : 0)); y[l] = t - m1; }
                for (int l = 0; l < 32; l++) { float t = d2 * (float)((q[l] >> 4) + (qh[l] & u2 ? 16 : 0)); y[32 + l] = t - m2; }
                y += 64;
            }
        }
        return;
    case LM_Q6_K:
        for (int64_t b = 0; b < n / 256; b++, p += 210) {
            const uint8_t *ql = p, *qh = p + 128;
            const int8_t *sc = (const int8_t *)(p + 192);
            float d = lm_f16_to_f32(rd16(p + 208));
            for (int h = 0; h < 256; h += 128) {
                for (int l = 0; l < 32; l++) {
                    int is = l / 16;
                    int q1 = (int)((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
                    int q2 = (int)((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                    int q3 = (int)((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                    int q4 = (int)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                    y[l] = d * (float)sc[is + 0] * (float)q1;
                    y[l + 32] = d * (float)sc[is + 2] * (float)q2;
                    y[l + 64] = d * (float)sc[is + 4] * (float)q3;
                    y[l + 96] = d * (float)sc[is + 6] * (float)q4;
                }
                y += 128; ql += 64; qh += 32; sc += 8;
            }
        }
        return;
    case LM_IQ4_NL:  // d qs[16]
        for (int64_t b = 0; b < n / 32; b++, p += 18, y += 32) {
            float d = lm_f16_to_f32(rd16(p));
            for (int j = 0; j < 16; j++) {
                y[j] = d * (float)kvalues_iq4nl[p[2 + j] & 0xF];
                y[j + 16] = d * (float)kvalues_iq4nl[p[2 + j] >> 4];
            }
        }
        return;
    case LM_IQ4_XS:  // d scales_h(u16) scales_l[4] qs[128]; 8 sub-blocks of 32
        for (int64_t b = 0; b < n / 256; b++, p += 136) {
            float d = lm_f16_to_f32(rd16(p));
            const uint8_t *q = p + 8;
            for (int ib = 0; ib < 8; ib++, q += 16, y += 32) {
                float dl = d * (float)iq4xs_scale(p, ib);  // rounded once, as gguf-py does
                for (int j = 0; j < 16; j++) {
                    y[j] = dl * (float)kvalues_iq4nl[q[j] & 0xF];
                    y[j + 16] = dl * (float)kvalues_iq4nl[q[j] >> 4];
                }
            }
        }
        return;
    default:
        return;
    }
}

#if defined(__x86_64__)
static void dequant_avx2(int dtype, const void *src, float *y, int64_t n);

__attribute__((target("avx512f,avx512bw,avx512vl,f16c")))
static void dequant_avx512(int dtype, const void *src, float *y, int64_t n) {
    const uint8_t *p = (const uint8_t *)src;
    const __m128i mask = _mm_set1_epi8(0x0F);
    switch (dtype) {
    case LM_F16: {
        int64_t i = 0;
        for (; i + 16 <= n; i += 16)
            _mm512_storeu_ps(y + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + 2 * i))));
        for (; i < n; i++) y[i] = lm_f16_to_f32(rd16(p + 2 * i));
        return;
    }
    case LM_Q4_0:
        for (int64_t b = 0; b < n / 32; b++, p += 18, y += 32) {
            __m512 d = _mm512_set1_ps(_cvtsh_ss(rd16(p)));
            __m128i v = _mm_loadu_si128((const __m128i *)(p + 2));
            __m128i lo = _mm_sub_epi8(_mm_and_si128(v, mask), _mm_set1_epi8(8));
            __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(v, 4), mask), _mm_set1_epi8(8));
            _mm512_storeu_ps(y, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo)), d));
            _mm512_storeu_ps(y + 16, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi)), d));
        }
        return;
    case LM_Q4_1:
        for (int64_t b = 0; b < n / 32; b++, p += 20, y += 32) {
            __m512 d = _mm512_set1_ps(_cvtsh_ss(rd16(p)));
            __m512 m = _mm512_set1_ps(_cvtsh_ss(rd16(p + 2)));
            __m128i v = _mm_loadu_si128((const __m128i *)(p + 4));
            __m128i lo = _mm_and_si128(v, mask);
            __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
            _mm512_storeu_ps(y, _mm512_add_ps(_mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo))), m));
            _mm512_storeu_ps(y + 16, _mm512_add_ps(_mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi))), m));
        }
        return;
    case LM_Q8_0:
        for (int64_t b = 0; b < n / 32; b++, p += 34, y += 32) {
            __m512 d = _mm512_set1_ps(_cvtsh_ss(rd16(p)));
            __m128i a = _mm_loadu_si128((const __m128i *)(p + 2));
            __m128i c = _mm_loadu_si128((const __m128i *)(p + 18));
            _mm512_storeu_ps(y, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(a)), d));
            _mm512_storeu_ps(y + 16, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(c)), d));
        }
        return;
    case LM_IQ4_NL:
    case LM_IQ4_XS: {
        const __m128i grid = _mm_loadu_si128((const __m128i *)kvalues_iq4nl);
        int xs = dtype == LM_IQ4_XS;
        for (int64_t b = 0; b < n / (xs ? 256 : 32); b++, p += xs ? 136 : 18) {
            float d = _cvtsh_ss(rd16(p));
            const uint8_t *q = p + (xs ? 8 : 2);
            for (int ib = 0; ib < (xs ? 8 : 1); ib++, q += 16, y += 32) {
                __m512 dl = _mm512_set1_ps(xs ? d * (float)iq4xs_scale(p, ib) : d);
                __m128i v = _mm_loadu_si128((const __m128i *)q);
                __m128i lo = _mm_shuffle_epi8(grid, _mm_and_si128(v, mask));
                __m128i hi = _mm_shuffle_epi8(grid, _mm_and_si128(_mm_srli_epi16(v, 4), mask));
                _mm512_storeu_ps(y, _mm512_mul_ps(dl, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo))));
                _mm512_storeu_ps(y + 16, _mm512_mul_ps(dl, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi))));
            }
        }
        return;
    }
    default:
        // Dtypes without zmm code (Q5_x and the k-quants: bit-manipulation
        // bound, not width bound) take the ymm code, which falls back to the
        // reference in turn; all give the same bits.
        dequant_avx2(dtype, src, y, n);
    }
}

__attribute__((target("avx2,fma,f16c")))
static void dequant_avx2(int dtype, const void *src, float *y, int64_t n) {
    const uint8_t *p = (const uint8_t *)src;
    switch (dtype) {
    case LM_F16: {
        int64_t i = 0;
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(y + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 2 * i))));
        for (; i < n; i++) y[i] = lm_f16_to_f32(rd16(p + 2 * i));
        return;
    }
    case LM_Q4_1:
        for (int64_t b = 0; b < n / 32; b++, p += 20, y += 32) {
            __m256 d = _mm256_set1_ps(_cvtsh_ss(rd16(p)));
            __m256 m = _mm256_set1_ps(_cvtsh_ss(rd16(p + 2)));
            for (int k = 0; k < 2; k++) {
                __m128i v = _mm_loadl_epi64((const __m128i *)(p + 4 + 8 * k));
                __m128i lo = _mm_and_si128(v, _mm_set1_epi8(0x0F));
                __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(0x0F));
                _mm256_storeu_ps(y + 8 * k, _mm256_add_ps(_mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo))), m));
                _mm256_storeu_ps(y + 16 + 8 * k, _mm256_add_ps(_mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi))), m));
            }
        }
        return;
    case LM_Q8_0:
        for (int64_t b = 0; b < n / 32; b++, p += 34, y += 32) {
            __m256 d = _mm256_set1_ps(_cvtsh_ss(rd16(p)));
            for (int k = 0; k < 4; k++) {
                __m128i a = _mm_loadl_epi64((const __m128i *)(p + 2 + 8 * k));
                _mm256_storeu_ps(y + 8 * k, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(a)), d));
            }
        }
        return;
    case LM_Q5_0:
    case LM_Q5_1: {
        // Eight elements a vector: each dword takes its byte's nibble and its
        // fifth bit from qh, shifted down by the lane's index.
        const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        const __m256i mask = _mm256_set1_epi32(0x0F), one = _mm256_set1_epi32(1);
        const int q51 = dtype == LM_Q5_1;
        for (int64_t b = 0; b < n / 32; b++, p += q51 ? 24 : 22, y += 32) {
            float df = _cvtsh_ss(rd16(p));
            __m256 d = _mm256_set1_ps(df), m = _mm256_set1_ps(q51 ? _cvtsh_ss(rd16(p + 2)) : 0.0f);
            const uint8_t *qh = p + (q51 ? 4 : 2), *qs = qh + 4;
            uint32_t h;
            memcpy(&h, qh, 4);
            for (int k = 0; k < 2; k++) {
                __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qs + 8 * k)));
                __m256i hl = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)(h >> (8 * k))), lane), one);
                __m256i hh = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)(h >> (16 + 8 * k))), lane), one);
                __m256i lo = _mm256_or_si256(_mm256_and_si256(v, mask), _mm256_slli_epi32(hl, 4));
                __m256i hi = _mm256_or_si256(_mm256_srli_epi32(v, 4), _mm256_slli_epi32(hh, 4));
                __m256 fl, fh;
                if (q51) {  // d*q + m, rounded twice as the reference does
                    fl = _mm256_add_ps(_mm256_mul_ps(d, _mm256_cvtepi32_ps(lo)), m);
                    fh = _mm256_add_ps(_mm256_mul_ps(d, _mm256_cvtepi32_ps(hi)), m);
                } else {
                    const __m256i s16 = _mm256_set1_epi32(16);
                    fl = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(lo, s16)), d);
                    fh = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(hi, s16)), d);
                }
                _mm256_storeu_ps(y + 8 * k, fl);
                _mm256_storeu_ps(y + 16 + 8 * k, fh);
            }
        }
        return;
    }
    case LM_Q4_K:
    case LM_Q5_K: {
        // Per 64 elements two sub-blocks (low and high nibbles of 32 bytes),
        // each d*sc*q - dmin*m with the two products rounded as the reference
        // rounds them; Q5_K's fifth bits are bit 2j (low) and 2j+1 (high) of qh.
        const __m256i mask = _mm256_set1_epi32(0x0F), one = _mm256_set1_epi32(1);
        const int q5 = dtype == LM_Q5_K;
        for (int64_t b = 0; b < n / 256; b++, p += q5 ? 176 : 144) {
            float d = _cvtsh_ss(rd16(p)), dmin = _cvtsh_ss(rd16(p + 2));
            const uint8_t *scales = p + 4, *qh = p + 16, *q = p + (q5 ? 48 : 16);
            for (int j = 0; j < 4; j++, q += 32, y += 64) {
                uint8_t sc, mn;
                scale_min_k4(2 * j, scales, &sc, &mn);
                __m256 d1 = _mm256_set1_ps(d * sc), m1 = _mm256_set1_ps(dmin * mn);
                scale_min_k4(2 * j + 1, scales, &sc, &mn);
                __m256 d2 = _mm256_set1_ps(d * sc), m2 = _mm256_set1_ps(dmin * mn);
                for (int k = 0; k < 4; k++) {
                    __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8 * k)));
                    __m256i lo = _mm256_and_si256(v, mask), hi = _mm256_srli_epi32(v, 4);
                    if (q5) {
                        __m256i h = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qh + 8 * k)));
                        lo = _mm256_or_si256(lo, _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(h, 2 * j), one), 4));
                        hi = _mm256_or_si256(hi, _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(h, 2 * j + 1), one), 4));
                    }
                    _mm256_storeu_ps(y + 8 * k, _mm256_sub_ps(_mm256_mul_ps(d1, _mm256_cvtepi32_ps(lo)), m1));
                    _mm256_storeu_ps(y + 32 + 8 * k, _mm256_sub_ps(_mm256_mul_ps(d2, _mm256_cvtepi32_ps(hi)), m2));
                }
            }
        }
        return;
    }
    case LM_Q6_K: {
        // Per 128 elements: ql[64] and qh[32] give four runs of 32 values,
        // each run two sub-blocks of 16 with their own int8 scale; (d*sc)*q
        // in the reference's order.
        const __m256i mask = _mm256_set1_epi32(0x0F), three = _mm256_set1_epi32(3), s32 = _mm256_set1_epi32(32);
        for (int64_t b = 0; b < n / 256; b++, p += 210) {
            const uint8_t *ql = p, *qh = p + 128;
            const int8_t *sc = (const int8_t *)(p + 192);
            float d = _cvtsh_ss(rd16(p + 208));
            for (int h = 0; h < 2; h++, y += 128, ql += 64, qh += 32, sc += 8) {
                for (int k = 0; k < 4; k++) {  // elements 8k..8k+7 of each run
                    int is = k / 2;
                    __m256i a = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(ql + 8 * k)));
                    __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(ql + 32 + 8 * k)));
                    __m256i e = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qh + 8 * k)));
                    __m256i q1 = _mm256_or_si256(_mm256_and_si256(a, mask), _mm256_slli_epi32(_mm256_and_si256(e, three), 4));
                    __m256i q2 = _mm256_or_si256(_mm256_and_si256(c, mask), _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(e, 2), three), 4));
                    __m256i q3 = _mm256_or_si256(_mm256_srli_epi32(a, 4), _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(e, 4), three), 4));
                    __m256i q4 = _mm256_or_si256(_mm256_srli_epi32(c, 4), _mm256_slli_epi32(_mm256_srli_epi32(e, 6), 4));
                    _mm256_storeu_ps(y + 8 * k, _mm256_mul_ps(_mm256_set1_ps(d * (float)sc[is]), _mm256_cvtepi32_ps(_mm256_sub_epi32(q1, s32))));
                    _mm256_storeu_ps(y + 32 + 8 * k, _mm256_mul_ps(_mm256_set1_ps(d * (float)sc[is + 2]), _mm256_cvtepi32_ps(_mm256_sub_epi32(q2, s32))));
                    _mm256_storeu_ps(y + 64 + 8 * k, _mm256_mul_ps(_mm256_set1_ps(d * (float)sc[is + 4]), _mm256_cvtepi32_ps(_mm256_sub_epi32(q3, s32))));
                    _mm256_storeu_ps(y + 96 + 8 * k, _mm256_mul_ps(_mm256_set1_ps(d * (float)sc[is + 6]), _mm256_cvtepi32_ps(_mm256_sub_epi32(q4, s32))));
                }
            }
        }
        return;
    }
    case LM_IQ4_NL:
    case LM_IQ4_XS: {
        const __m128i grid = _mm_loadu_si128((const __m128i *)kvalues_iq4nl), mask = _mm_set1_epi8(0x0F);
        int xs = dtype == LM_IQ4_XS;
        for (int64_t b = 0; b < n / (xs ? 256 : 32); b++, p += xs ? 136 : 18) {
            float d = _cvtsh_ss(rd16(p));
            const uint8_t *q = p + (xs ? 8 : 2);
            for (int ib = 0; ib < (xs ? 8 : 1); ib++, q += 16, y += 32) {
                __m256 dl = _mm256_set1_ps(xs ? d * (float)iq4xs_scale(p, ib) : d);
                __m128i v = _mm_loadu_si128((const __m128i *)q);
                __m128i lo = _mm_shuffle_epi8(grid, _mm_and_si128(v, mask));
                __m128i hi = _mm_shuffle_epi8(grid, _mm_and_si128(_mm_srli_epi16(v, 4), mask));
                _mm256_storeu_ps(y, _mm256_mul_ps(dl, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo))));
                _mm256_storeu_ps(y + 8, _mm256_mul_ps(dl, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)))));
                _mm256_storeu_ps(y + 16, _mm256_mul_ps(dl, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi))));
                _mm256_storeu_ps(y + 24, _mm256_mul_ps(dl, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)))));
            }
        }
        return;
    }
    default:
        lm_dequant_row_ref(dtype, src, y, n);
    }
}
#endif

void lm_dequant_row(int dtype, const void *src, float *dst, int64_t n) {
#if defined(__x86_64__)
    int level = lm_cpu_level();
    if (level >= LM_CPU_AVX512) { dequant_avx512(dtype, src, dst, n); return; }
    if (level >= LM_CPU_AVX2) { dequant_avx2(dtype, src, dst, n); return; }
#endif
    lm_dequant_row_ref(dtype, src, dst, n);
}
