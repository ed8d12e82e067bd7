// Normalisation, activation, rotary embedding, attention and sampling helpers.
#include "kernels.h"
#include "simd_x86.h"
#include <math.h>
#include <float.h>
#include <string.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

// The sum of squares in double, as before, but in eight independent
// accumulators: the single running sum was a chain of dependent adds (~4
// cycles each), ~1 us a 576-wide row, and the serial RMSNorm before the q/k/v
// and gate/up sections left the other core idle for ~1.7 ms of a batch-32
// step. The order only moves the double's last bits; the float variance
// rounded from it is the same but for ties at float precision.
static double sum_squares(const float *x, int64_t n) {
    double acc[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) acc[k] += (double)x[i + k] * (double)x[i + k];
    for (; i < n; i++) acc[i & 7] += (double)x[i] * (double)x[i];
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

void lm_rmsnorm(const float *x, const float *w, float *out, int64_t n_rows, int64_t dim, float eps) {
    for (int64_t r = 0; r < n_rows; r++) {
        const float *xr = x + r * dim;
        float *o = out + r * dim;
        float var = (float)(sum_squares(xr, dim) / (double)dim);
        float inv = 1.0f / sqrtf(var + eps);
        // Hugging Face order: weight * (x * rsqrt(var + eps))
        for (int64_t i = 0; i < dim; i++) o[i] = w[i] * (xr[i] * inv);
    }
}

void lm_add(float *x, const float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] += y[i];
}

void lm_add_bias(float *x, int64_t ld, const float *b, int64_t n_rows, int64_t n) {
    for (int64_t r = 0; r < n_rows; r++)
        for (int64_t i = 0; i < n; i++) x[r * ld + i] += b[i];
}

// SiLU(g) * u = g / (1 + exp(-g)) * u, the expression Hugging Face's
// Llama MLP computes. libm's expf, one element at a time, took ~3.7 ns an
// element: 5.5 ms of a batch-32 step (32 x 1536 x 30 layers) on one core
// while the other waited. The vector paths compute exp with Cephes' expf
// polynomial (relative error ~1e-7, about an ulp, as torch's own vectorised
// exp), then the same division and product.
#if defined(__x86_64__)
#define EXP_C1 0.693359375f       /* ln 2 = C1 + C2, C1 exact in a few bits */
#define EXP_C2 -2.12194440e-4f
#define EXP_P0 1.9875691500e-4f
#define EXP_P1 1.3981999507e-3f
#define EXP_P2 8.3334519073e-3f
#define EXP_P3 4.1665795894e-2f
#define EXP_P4 1.6666665459e-1f
#define EXP_P5 5.0000001201e-1f

// exp(x) for x clamped to [-127, 128], past where it is 0 or inf in float
// (a NaN x gives exp(-127); callers keep the NaN through their other operand).
__attribute__((target("avx512f")))
static inline __m512 exp_clamped_avx512(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-127.0f)), _mm512_set1_ps(128.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_C1), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_C2), r);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(EXP_P0), r, _mm512_set1_ps(EXP_P1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P5));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);  // p * 2^n, rounded once, inf or 0 past the range
}

__attribute__((target("avx512f")))
static void silu_mul_row_avx512(float *g, const float *u, int64_t n) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = lm_mask16(n - i);
        __m512 v = _mm512_maskz_loadu_ps(m, g + i);
        __m512 e = exp_clamped_avx512(_mm512_sub_ps(_mm512_setzero_ps(), v));
        _mm512_mask_storeu_ps(g + i, m, _mm512_mul_ps(_mm512_div_ps(v, _mm512_add_ps(one, e)), _mm512_maskz_loadu_ps(m, u + i)));
    }
}

// 2^n as two factors (n in [-183, 185] here), each a normal float, so p * 2^a
// is exact and only * 2^b rounds.
__attribute__((target("avx2,fma")))
static inline __m256 exp_clamped_avx2(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-127.0f)), _mm256_set1_ps(128.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_C1), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_C2), r);
    __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(EXP_P0), r, _mm256_set1_ps(EXP_P1));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P5));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i ni = _mm256_cvtps_epi32(n);
    __m256i a = _mm256_srai_epi32(ni, 1), b = _mm256_sub_epi32(ni, a);
    __m256i bias = _mm256_set1_epi32(127);
    __m256 fa = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(a, bias), 23));
    __m256 fb = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(b, bias), 23));
    return _mm256_mul_ps(_mm256_mul_ps(p, fa), fb);
}

__attribute__((target("avx2,fma")))
static void silu_mul_row_avx2(float *g, const float *u, int64_t n) {
    const __m256 one = _mm256_set1_ps(1.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(g + i);
        __m256 e = exp_clamped_avx2(_mm256_sub_ps(_mm256_setzero_ps(), v));
        _mm256_storeu_ps(g + i, _mm256_mul_ps(_mm256_div_ps(v, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
    }
    if (i < n) {  // the tail through the same arithmetic, so a value's result does not depend on its column
        float gt[8] = {0}, ut[8] = {0};
        memcpy(gt, g + i, (size_t)(n - i) * sizeof(float));
        memcpy(ut, u + i, (size_t)(n - i) * sizeof(float));
        silu_mul_row_avx2(gt, ut, 8);
        memcpy(g + i, gt, (size_t)(n - i) * sizeof(float));
    }
}
#endif

void lm_silu_mul(float *gate, const float *up, int64_t n_rows, int64_t n, int64_t ld) {
#if defined(__x86_64__)
    int level = lm_cpu_level();
#endif
    for (int64_t r = 0; r < n_rows; r++) {
        float *g = gate + r * ld;
        const float *u = up + r * ld;
#if defined(__x86_64__)
        if (level >= LM_CPU_AVX512) { silu_mul_row_avx512(g, u, n); continue; }
        if (level >= LM_CPU_AVX2) { silu_mul_row_avx2(g, u, n); continue; }
#endif
        for (int64_t i = 0; i < n; i++) {
            float v = g[i];
            g[i] = (v / (1.0f + expf(-v))) * u[i];
        }
    }
}

void lm_rope(float *x, int64_t n_rows, int64_t ld, int n_heads, int head_dim,
             const int32_t *positions, const float *inv_freq, int interleaved) {
    int half = head_dim / 2;
    float cs[512], sn[512]; // head_dim <= 1024
    for (int64_t r = 0; r < n_rows; r++) {
        float pos = (float)positions[r];
        for (int i = 0; i < half; i++) {
            float f = pos * inv_freq[i];
            cs[i] = cosf(f);
            sn[i] = sinf(f);
        }
        for (int h = 0; h < n_heads; h++) {
            float *v = x + r * ld + (int64_t)h * head_dim;
            if (interleaved) {
                for (int i = 0; i < half; i++) {
                    float a = v[2 * i], b = v[2 * i + 1];
                    v[2 * i] = a * cs[i] - b * sn[i];
                    v[2 * i + 1] = b * cs[i] + a * sn[i];
                }
            } else {
                for (int i = 0; i < half; i++) {
                    float a = v[i], b = v[i + half];
                    v[i] = a * cs[i] - b * sn[i];
                    v[i + half] = b * cs[i] + a * sn[i];
                }
            }
        }
    }
}

static inline float dot_f32(const float *a, const float *b, int n) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) acc[k] += a[i + k] * b[i + k];
    float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

void lm_kv_store(float *k_pool, float *v_pool, int64_t block_floats, int64_t layer_off, int block_size,
                 const int32_t *tables, int64_t table_stride, const int32_t *positions,
                 const float *k, const float *v, int64_t kv_ld, int64_t n_rows, int kv_dim) {
    for (int64_t r = 0; r < n_rows; r++) {
        int32_t p = positions[r];
        int32_t blk = tables[r * table_stride + p / block_size];
        int64_t off = (int64_t)blk * block_floats + layer_off + (int64_t)(p % block_size) * kv_dim;
        memcpy(k_pool + off, k + r * kv_ld, (size_t)kv_dim * sizeof(float));
        memcpy(v_pool + off, v + r * kv_ld, (size_t)kv_dim * sizeof(float));
    }
}

typedef struct {
    const float *q;
    int64_t q_ld;
    const float *k_pool, *v_pool;
    int64_t block_floats, layer_off;
    int block_size;
    const int32_t *tables;
    int64_t table_stride;
    const int32_t *n_ctx, *ctx_start;
    int64_t n_rows;
    int n_heads, n_kv_heads, head_dim;
    float scale;
    float *out;
    int64_t out_ld;
    float *scratch;
    int64_t per_thread;
} attn_ctx;

// Query heads a pass of the grouped kernel takes (rows of score scratch).
#define ATTN_G 8

// One (row, head) item: scores over the row's context, softmax, weighted sum of V.
#define ATTN_ITEM(DOT, AXPY)                                                                  \
    float mx = -FLT_MAX;                                                                      \
    for (int64_t j0 = lo - lo % bs; j0 < n; j0 += bs) {                                       \
        const float *K = c->k_pool + (int64_t)table[j0 / bs] * c->block_floats + c->layer_off + (int64_t)kvh * hd; \
        int64_t jn = n - j0 < bs ? n - j0 : bs;                                               \
        for (int64_t j = j0 < lo ? lo - j0 : 0; j < jn; j++) {                                \
            float s = DOT(q, K + j * kv_dim, hd) * c->scale;                                  \
            scores[j0 + j] = s;                                                               \
            if (s > mx) mx = s;                                                               \
        }                                                                                     \
    }                                                                                         \
    float sum = 0.0f;                                                                         \
    for (int64_t j = lo; j < n; j++) {                                                        \
        float e = expf(scores[j] - mx);                                                       \
        scores[j] = e;                                                                        \
        sum += e;                                                                             \
    }                                                                                         \
    float inv = 1.0f / sum;                                                                   \
    for (int d = 0; d < hd; d++) o[d] = 0.0f;                                                 \
    for (int64_t j0 = lo - lo % bs; j0 < n; j0 += bs) {                                       \
        const float *V = c->v_pool + (int64_t)table[j0 / bs] * c->block_floats + c->layer_off + (int64_t)kvh * hd; \
        int64_t jn = n - j0 < bs ? n - j0 : bs;                                               \
        for (int64_t j = j0 < lo ? lo - j0 : 0; j < jn; j++) AXPY(o, scores[j0 + j] * inv, V + j * kv_dim, hd); \
    }

static inline void axpy_f32(float *y, float a, const float *x, int n) {
    for (int i = 0; i < n; i++) y[i] += a * x[i];
}

static void attn_item_ref(const attn_ctx *c, float *scores, const float *q, const int32_t *table, int64_t lo, int64_t n,
                          int kvh, int64_t kv_dim, float *o) {
    int hd = c->head_dim, bs = c->block_size;
    ATTN_ITEM(dot_f32, axpy_f32)
}

#if defined(__x86_64__)
__attribute__((target("avx512f,fma")))
static inline float dot_avx512(const float *a, const float *b, int n) {
    __m512 acc = _mm512_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    float s = _mm512_reduce_add_ps(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}
__attribute__((target("avx512f,fma")))
static inline void axpy_avx512(float *y, float a, const float *x, int n) {
    __m512 av = _mm512_set1_ps(a);
    int i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(av, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * x[i];
}
__attribute__((target("avx512f,fma")))
static void attn_item_avx512(const attn_ctx *c, float *scores, const float *q, const int32_t *table, int64_t lo, int64_t n,
                             int kvh, int64_t kv_dim, float *o) {
    int hd = c->head_dim, bs = c->block_size;
    ATTN_ITEM(dot_avx512, axpy_avx512)
}

// Sums of the 16 vectors a[0..15], lane j = sum of a[j]: a tree of
// unpacks and 128-bit shuffles, ~3 operations a vector instead of a full
// horizontal reduction for each.
__attribute__((target("avx512f")))
static inline __m512 sum16_avx512(const __m512 *a) {
    __m512 t[8], u[4];
    for (int i = 0; i < 8; i++)
        t[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; i++) {
        __m512d x = _mm512_castps_pd(t[2 * i]), y = _mm512_castps_pd(t[2 * i + 1]);
        u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    __m512 v0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
    __m512 v1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(v0, v1, 0x88), _mm512_shuffle_f32x4(v0, v1, 0xDD));
}

// The query heads [0, G) of one (row, kv head) item at once, for head_dim
// = 16 * NV: scores 16 positions at a time (the dots summed by one tree),
// softmax with the vector exp, then each V row read once for up to GC heads
// whose outputs stay in registers. The per-head item spent most of its time
// on a horizontal sum per score, libm's expf per score, and loading and
// storing the output for every position (~10 ms of a batch-32 step at 48
// positions of context). scores: ATTN_G rows of sstride floats.
#define ATTN_GROUP_FN(NV, GC)                                                                                   \
__attribute__((target("avx512f,fma")))                                                                        \
static void attn_group_avx512_##NV(const attn_ctx *c, float *scores, int64_t sstride, const float *q, int G,   \
                                   const int32_t *table, int64_t lo, int64_t n, int kvh, int64_t kv_dim,       \
                                   float *o) {                                                                 \
    int bs = c->block_size, hd = 16 * NV;                                                                      \
    float inv[ATTN_G];                                                                                         \
    for (int g = 0; g < G; g++) {                                                                              \
        __m512 qv[NV], acc[16];                                                                                \
        for (int v = 0; v < NV; v++) qv[v] = _mm512_loadu_ps(q + g * hd + 16 * v);                           \
        float *sc = scores + g * sstride;                                                                      \
        for (int64_t j0 = lo - lo % bs; j0 < n; j0 += bs) {                                                    \
            const float *K = c->k_pool + (int64_t)table[j0 / bs] * c->block_floats + c->layer_off + (int64_t)kvh * hd; \
            int64_t jn = n - j0 < bs ? n - j0 : bs;                                                            \
            for (int64_t jj = j0 < lo ? lo - j0 : 0; jj < jn; jj += 16) {                                      \
                int m = jn - jj < 16 ? (int)(jn - jj) : 16;                                                    \
                for (int j = 0; j < 16; j++) {                                                                 \
                    acc[j] = _mm512_setzero_ps();                                                              \
                    if (j < m)                                                                                 \
                        for (int v = 0; v < NV; v++)                                                           \
                            acc[j] = _mm512_fmadd_ps(qv[v], _mm512_loadu_ps(K + (jj + j) * kv_dim + 16 * v), acc[j]); \
                }                                                                                              \
                __m512 s = _mm512_mul_ps(sum16_avx512(acc), _mm512_set1_ps(c->scale));                        \
                _mm512_mask_storeu_ps(sc + j0 + jj, lm_mask16(m), s);                                             \
            }                                                                                                  \
        }                                                                                                      \
        __m512 mx = _mm512_set1_ps(-FLT_MAX), sum = _mm512_setzero_ps();                                       \
        for (int64_t j = lo; j < n; j += 16) {                                                                 \
            __mmask16 k = lm_mask16(n - j);                                                                   \
            mx = _mm512_mask_max_ps(mx, k, mx, _mm512_maskz_loadu_ps(k, sc + j));                              \
        }                                                                                                      \
        __m512 mxv = _mm512_set1_ps(_mm512_reduce_max_ps(mx));                                                 \
        for (int64_t j = lo; j < n; j += 16) {                                                                 \
            __mmask16 k = lm_mask16(n - j);                                                                   \
            __m512 e = exp_clamped_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, sc + j), mxv));               \
            _mm512_mask_storeu_ps(sc + j, k, e);                                                               \
            sum = _mm512_mask_add_ps(sum, k, sum, e);                                                          \
        }                                                                                                      \
        inv[g] = 1.0f / _mm512_reduce_add_ps(sum);                                                             \
    }                                                                                                          \
    for (int g0 = 0; g0 < G; g0 += GC) {                                                                       \
        int gn = G - g0 < GC ? G - g0 : GC;                                                                    \
        __m512 acc[GC][NV];                                                                                    \
        for (int g = 0; g < GC; g++) for (int v = 0; v < NV; v++) acc[g][v] = _mm512_setzero_ps();             \
        for (int64_t j0 = lo - lo % bs; j0 < n; j0 += bs) {                                                    \
            const float *V = c->v_pool + (int64_t)table[j0 / bs] * c->block_floats + c->layer_off + (int64_t)kvh * hd; \
            int64_t jn = n - j0 < bs ? n - j0 : bs;                                                            \
            for (int64_t j = j0 < lo ? lo - j0 : 0; j < jn; j++) {                                             \
                __m512 vr[NV];                                                                                 \
                for (int v = 0; v < NV; v++) vr[v] = _mm512_loadu_ps(V + j * kv_dim + 16 * v);                 \
                for (int g = 0; g < GC; g++) {                                                                 \
                    if (g >= gn) break;                                                                        \
                    __m512 w = _mm512_set1_ps(scores[(g0 + g) * sstride + j0 + j] * inv[g0 + g]);              \
                    for (int v = 0; v < NV; v++) acc[g][v] = _mm512_fmadd_ps(w, vr[v], acc[g][v]);              \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
        for (int g = 0; g < gn; g++)                                                                           \
            for (int v = 0; v < NV; v++) _mm512_storeu_ps(o + (g0 + g) * hd + 16 * v, acc[g][v]);             \
    }                                                                                                          \
}
ATTN_GROUP_FN(4, 4)
ATTN_GROUP_FN(8, 2)

// The grouped kernel in ymm registers, for head_dim = 8 * NV, for CPUs
// without AVX-512 (which ran the scalar per-head item with libm's expf:
// ~14 % of a batch-32 decode step on Zen 2, for ~1 % of its FLOPs). Scores
// 4 positions at a time (12 of the 16 registers hold q and the four dots for
// NV = 8), softmax with the vector exp, then each head's output in registers
// over the V rows (V comes from L1 for the group's other heads).
#define ATTN_GROUP_FN_AVX2(NV)                                                                                  \
__attribute__((target("avx2,fma")))                                                                           \
static void attn_group_avx2_##NV(const attn_ctx *c, float *scores, int64_t sstride, const float *q, int G,     \
                                 const int32_t *table, int64_t lo, int64_t n, int kvh, int64_t kv_dim,         \
                                 float *o) {                                                                   \
    int bs = c->block_size, hd = 8 * NV;                                                                       \
    float inv[ATTN_G];                                                                                         \
    for (int g = 0; g < G; g++) {                                                                              \
        __m256 qv[NV];                                                                                         \
        for (int v = 0; v < NV; v++) qv[v] = _mm256_loadu_ps(q + g * hd + 8 * v);                             \
        float *sc = scores + g * sstride;                                                                      \
        for (int64_t j0 = lo - lo % bs; j0 < n; j0 += bs) {                                                    \
            const float *K = c->k_pool + (int64_t)table[j0 / bs] * c->block_floats + c->layer_off + (int64_t)kvh * hd; \
            int64_t jn = n - j0 < bs ? n - j0 : bs;                                                            \
            for (int64_t jj = j0 < lo ? lo - j0 : 0; jj < jn; jj += 4) {                                       \
                int m = jn - jj < 4 ? (int)(jn - jj) : 4;                                                      \
                __m256 acc[4];                                                                                 \
                for (int j = 0; j < 4; j++) {                                                                  \
                    acc[j] = _mm256_setzero_ps();                                                              \
                    if (j < m)                                                                                 \
                        for (int v = 0; v < NV; v++)                                                           \
                            acc[j] = _mm256_fmadd_ps(qv[v], _mm256_loadu_ps(K + (jj + j) * kv_dim + 8 * v), acc[j]); \
                }                                                                                              \
                __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));     \
                __m128 s4 = _mm_mul_ps(_mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)),     \
                                       _mm_set1_ps(c->scale));                                                 \
                float t[4];                                                                                    \
                _mm_storeu_ps(t, s4);                                                                          \
                for (int j = 0; j < m; j++) sc[j0 + jj + j] = t[j];                                            \
            }                                                                                                  \
        }                                                                                                      \
        float mx = -FLT_MAX;                                                                                   \
        for (int64_t j = lo; j < n; j++) mx = sc[j] > mx ? sc[j] : mx;                                         \
        __m256 mxv = _mm256_set1_ps(mx), sum8 = _mm256_setzero_ps();                                           \
        int64_t j = lo;                                                                                        \
        for (; j + 8 <= n; j += 8) {                                                                           \
            __m256 e = exp_clamped_avx2(_mm256_sub_ps(_mm256_loadu_ps(sc + j), mxv));                          \
            _mm256_storeu_ps(sc + j, e);                                                                       \
            sum8 = _mm256_add_ps(sum8, e);                                                                     \
        }                                                                                                      \
        float sum = lm_hsum256(sum8);                                                                          \
        if (j < n) {                                                                                           \
            float t[8] = {0};                                                                                  \
            memcpy(t, sc + j, (size_t)(n - j) * sizeof(float));                                                \
            _mm256_storeu_ps(t, exp_clamped_avx2(_mm256_sub_ps(_mm256_loadu_ps(t), mxv)));                     \
            for (int64_t l = 0; l < n - j; l++) { sc[j + l] = t[l]; sum += t[l]; }                             \
        }                                                                                                      \
        inv[g] = 1.0f / sum;                                                                                   \
    }                                                                                                          \
    for (int g = 0; g < G; g++) {                                                                              \
        __m256 acc[NV];                                                                                        \
        for (int v = 0; v < NV; v++) acc[v] = _mm256_setzero_ps();                                             \
        const float *sc = scores + g * sstride;                                                                \
        for (int64_t j0 = lo - lo % bs; j0 < n; j0 += bs) {                                                    \
            const float *V = c->v_pool + (int64_t)table[j0 / bs] * c->block_floats + c->layer_off + (int64_t)kvh * hd; \
            int64_t jn = n - j0 < bs ? n - j0 : bs;                                                            \
            for (int64_t jj = j0 < lo ? lo - j0 : 0; jj < jn; jj++) {                                          \
                __m256 w = _mm256_set1_ps(sc[j0 + jj] * inv[g]);                                               \
                for (int v = 0; v < NV; v++) acc[v] = _mm256_fmadd_ps(w, _mm256_loadu_ps(V + jj * kv_dim + 8 * v), acc[v]); \
            }                                                                                                  \
        }                                                                                                      \
        for (int v = 0; v < NV; v++) _mm256_storeu_ps(o + g * hd + 8 * v, acc[v]);                             \
    }                                                                                                          \
}
ATTN_GROUP_FN_AVX2(8)
ATTN_GROUP_FN_AVX2(16)
#endif

#if defined(__x86_64__)
// Asks for item it's K and V lines (into L2) before the thread gets to it:
// the kv head's slice of a position is a few lines at a stride of kv_dim
// floats, in blocks scattered over the pool, which the hardware prefetchers
// do not follow (the grouped kernel then ran at ~14 GB/s from memory
// against ~30 that two cores stream; with this, ~17).
static void attn_prefetch_item(const attn_ctx *c, int64_t it, int64_t kv_dim) {
    int64_t r = it / c->n_kv_heads, n = c->n_ctx[r];
    int hd = c->head_dim, bs = c->block_size;
    const int32_t *table = c->tables + r * c->table_stride;
    int64_t head = c->layer_off + (it % c->n_kv_heads) * hd;
    for (int64_t j = c->ctx_start ? c->ctx_start[r] : 0; j < n; j++) {
        int64_t off = (int64_t)table[j / bs] * c->block_floats + head + (j % bs) * kv_dim;
        for (int d = 0; d < hd; d += 16) {
            _mm_prefetch((const char *)(c->k_pool + off + d), _MM_HINT_T1);
            _mm_prefetch((const char *)(c->v_pool + off + d), _MM_HINT_T1);
        }
    }
}
#endif

// Items are (row, kv head): the query heads that share a kv head run
// together on one thread, so its K and V come from memory once and from
// cache for the rest of the group. (Items were (row, query head) dealt out
// in turn, which put a group's heads on both cores, each fetching the same
// K and V.)
static void attn_task(void *vctx, int ith, int nth) {
    attn_ctx *c = (attn_ctx *)vctx;
    float *scores = c->scratch + (size_t)ith * (size_t)c->per_thread;
    int64_t items = c->n_rows * c->n_kv_heads;
    int group = c->n_heads / c->n_kv_heads;
    int hd = c->head_dim;
    int64_t kv_dim = (int64_t)c->n_kv_heads * hd;
    int64_t sstride = (c->per_thread / ATTN_G) / 16 * 16;
#if defined(__x86_64__)
    int fast = lm_cpu_level() >= LM_CPU_AVX512, avx2 = lm_cpu_level() >= LM_CPU_AVX2;
#endif
    for (int64_t it = ith; it < items; it += nth) {
        int64_t r = it / c->n_kv_heads;
        int kvh = (int)(it % c->n_kv_heads);
        const int32_t *table = c->tables + r * c->table_stride;
        int64_t lo = c->ctx_start ? c->ctx_start[r] : 0, n = c->n_ctx[r];
#if defined(__x86_64__)
        if (avx2 && it + nth < items) attn_prefetch_item(c, it + nth, kv_dim);
#endif
        for (int h0 = kvh * group; h0 < (kvh + 1) * group; h0 += ATTN_G) {
            int G = (kvh + 1) * group - h0 < ATTN_G ? (kvh + 1) * group - h0 : ATTN_G;
            const float *q = c->q + r * c->q_ld + (int64_t)h0 * hd;
            float *o = c->out + r * c->out_ld + (int64_t)h0 * hd;
#if defined(__x86_64__)
            if (fast && hd == 64) { attn_group_avx512_4(c, scores, sstride, q, G, table, lo, n, kvh, kv_dim, o); continue; }
            if (fast && hd == 128) { attn_group_avx512_8(c, scores, sstride, q, G, table, lo, n, kvh, kv_dim, o); continue; }
            if (!fast && avx2 && hd == 64) { attn_group_avx2_8(c, scores, sstride, q, G, table, lo, n, kvh, kv_dim, o); continue; }
            if (!fast && avx2 && hd == 128) { attn_group_avx2_16(c, scores, sstride, q, G, table, lo, n, kvh, kv_dim, o); continue; }
#endif
            for (int g = 0; g < G; g++) {
#if defined(__x86_64__)
                if (fast) { attn_item_avx512(c, scores, q + g * hd, table, lo, n, kvh, kv_dim, o + g * hd); continue; }
#endif
                attn_item_ref(c, scores, q + g * hd, table, lo, n, kvh, kv_dim, o + g * hd);
            }
        }
    }
}

// Per thread: ATTN_G rows of scores, each a multiple of 16 floats.
size_t lm_attention_scratch_floats(int64_t max_ctx) {
    return (size_t)lm_pool_threads() * ATTN_G * (size_t)((max_ctx + 31) / 16 * 16);
}

void lm_attention(const float *q, int64_t q_ld,
                  const float *k_pool, const float *v_pool, int64_t block_floats, int64_t layer_off,
                  int block_size, const int32_t *tables, int64_t table_stride,
                  const int32_t *n_ctx, const int32_t *ctx_start, int64_t n_rows, int n_heads, int n_kv_heads,
                  int head_dim, float scale, float *out, int64_t out_ld, float *scratch) {
    int64_t max_ctx = 0;
    for (int64_t r = 0; r < n_rows; r++) if (n_ctx[r] > max_ctx) max_ctx = n_ctx[r];
    attn_ctx c = { q, q_ld, k_pool, v_pool, block_floats, layer_off, block_size, tables, table_stride,
                   n_ctx, ctx_start, n_rows, n_heads, n_kv_heads, head_dim, scale, out, out_ld, scratch,
                   (int64_t)(lm_attention_scratch_floats(max_ctx) / (size_t)lm_pool_threads()) };
    lm_parallel(attn_task, &c);
}

// log(sum(exp(x))) over a logits row, for the logprobs a request asks for.
// The max is taken out first so no term overflows; the terms are summed in
// double (a float sum over a 49k vocabulary would lose ~1e-4 of the total).
// The vector paths use the same Cephes exp as SiLU (~1 ulp), so the result
// agrees with the scalar path to ~1e-7 relative, not bit for bit.
#if defined(__x86_64__)
__attribute__((target("avx512f")))
static double sum_exp_avx512(const float *x, int64_t n, float mx) {
    __m512d a0 = _mm512_setzero_pd(), a1 = _mm512_setzero_pd();
    const __m512 m = _mm512_set1_ps(mx);
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 k = lm_mask16(n - i);
        // Masked-off lanes read -inf - mx: exp gives 0 after the clamp's scalef.
        __m512 v = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), k, x + i);
        __m512 e = _mm512_maskz_mov_ps(k, exp_clamped_avx512(_mm512_sub_ps(v, m)));
        a0 = _mm512_add_pd(a0, _mm512_cvtps_pd(_mm512_castps512_ps256(e)));
        a1 = _mm512_add_pd(a1, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1))));
    }
    return _mm512_reduce_add_pd(_mm512_add_pd(a0, a1));
}

__attribute__((target("avx2,fma")))
static double sum_exp_avx2(const float *x, int64_t n, float mx) {
    __m256d a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd();
    const __m256 m = _mm256_set1_ps(mx);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 e = exp_clamped_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + i), m));
        a0 = _mm256_add_pd(a0, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
        a1 = _mm256_add_pd(a1, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
    }
    double t[4];
    _mm256_storeu_pd(t, _mm256_add_pd(a0, a1));
    double s = (t[0] + t[1]) + (t[2] + t[3]);
    for (; i < n; i++) s += (double)expf(x[i] - mx);
    return s;
}
#endif

double lm_logsumexp(const float *x, int64_t n) {
    if (n <= 0) return -INFINITY;
    float mx = x[0];
    for (int64_t i = 1; i < n; i++) {
        if (isnan(x[i])) return NAN;
        if (x[i] > mx) mx = x[i];
    }
    if (isnan(mx)) return NAN;
    if (isinf(mx)) return (double)mx;  // +inf dominates; all -inf has no mass
    double s;
#if defined(__x86_64__)
    int level = lm_cpu_level();
    if (level >= LM_CPU_AVX512) s = sum_exp_avx512(x, n, mx);
    else if (level >= LM_CPU_AVX2) s = sum_exp_avx2(x, n, mx);
    else
#endif
    {
        s = 0;
        for (int64_t i = 0; i < n; i++) s += (double)expf(x[i] - mx);
    }
    return (double)mx + log(s);
}

int64_t lm_argmax(const float *x, int64_t n) {
    int64_t best = 0;
    for (int64_t i = 1; i < n; i++) if (x[i] > x[best]) best = i;
    return best;
}
