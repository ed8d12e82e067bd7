// Normalisation, activation, rotary embedding, attention and sampling helpers.
#include "kernels.h"
#include <math.h>
#include <float.h>
#include <string.h>

void lm_rmsnorm(const float *x, const float *w, float *out, int64_t n_rows, int64_t dim, float eps) {
    for (int64_t r = 0; r < n_rows; r++) {
        const float *xr = x + r * dim;
        float *o = out + r * dim;
        double ss = 0.0;
        for (int64_t i = 0; i < dim; i++) ss += (double)xr[i] * (double)xr[i];
        float var = (float)(ss / (double)dim);
        float inv = 1.0f / sqrtf(var + eps);
        // Hugging Face order: weight * (x * rsqrt(var + eps))
        for (int64_t i = 0; i < dim; i++) o[i] = w[i] * (xr[i] * inv);
    }
}

void lm_add(float *x, const float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] += y[i];
}

void lm_silu_mul(float *gate, const float *up, int64_t n_rows, int64_t n, int64_t ld) {
    for (int64_t r = 0; r < n_rows; r++) {
        float *g = gate + r * ld;
        const float *u = up + r * ld;
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
    const int32_t *n_ctx;
    int64_t n_rows;
    int n_heads, n_kv_heads, head_dim;
    float scale;
    float *out;
    int64_t out_ld;
    float *scratch;
    int64_t per_thread;
} attn_ctx;

// One (row, head) item: scores over the row's context, softmax, weighted sum of V.
#define ATTN_ITEM(DOT, AXPY)                                                                  \
    float mx = -FLT_MAX;                                                                      \
    for (int64_t j0 = 0; j0 < n; j0 += bs) {                                                  \
        const float *K = c->k_pool + (int64_t)table[j0 / bs] * c->block_floats + c->layer_off + (int64_t)kvh * hd; \
        int64_t jn = n - j0 < bs ? n - j0 : bs;                                               \
        for (int64_t j = 0; j < jn; j++) {                                                    \
            float s = DOT(q, K + j * kv_dim, hd) * c->scale;                                  \
            scores[j0 + j] = s;                                                               \
            if (s > mx) mx = s;                                                               \
        }                                                                                     \
    }                                                                                         \
    float sum = 0.0f;                                                                         \
    for (int64_t j = 0; j < n; j++) {                                                         \
        float e = expf(scores[j] - mx);                                                       \
        scores[j] = e;                                                                        \
        sum += e;                                                                             \
    }                                                                                         \
    float inv = 1.0f / sum;                                                                   \
    for (int d = 0; d < hd; d++) o[d] = 0.0f;                                                 \
    for (int64_t j0 = 0; j0 < n; j0 += bs) {                                                  \
        const float *V = c->v_pool + (int64_t)table[j0 / bs] * c->block_floats + c->layer_off + (int64_t)kvh * hd; \
        int64_t jn = n - j0 < bs ? n - j0 : bs;                                               \
        for (int64_t j = 0; j < jn; j++) AXPY(o, scores[j0 + j] * inv, V + j * kv_dim, hd);   \
    }

static inline void axpy_f32(float *y, float a, const float *x, int n) {
    for (int i = 0; i < n; i++) y[i] += a * x[i];
}

static void attn_item_ref(const attn_ctx *c, float *scores, const float *q, const int32_t *table, int64_t n,
                          int kvh, int64_t kv_dim, float *o) {
    int hd = c->head_dim, bs = c->block_size;
    ATTN_ITEM(dot_f32, axpy_f32)
}

#if defined(__x86_64__)
#include <immintrin.h>
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
static void attn_item_avx512(const attn_ctx *c, float *scores, const float *q, const int32_t *table, int64_t n,
                             int kvh, int64_t kv_dim, float *o) {
    int hd = c->head_dim, bs = c->block_size;
    ATTN_ITEM(dot_avx512, axpy_avx512)
}
#endif

static void attn_task(void *vctx, int ith, int nth) {
    attn_ctx *c = (attn_ctx *)vctx;
    float *scores = c->scratch + (size_t)ith * (size_t)c->per_thread;
    int64_t items = c->n_rows * c->n_heads;
    int group = c->n_heads / c->n_kv_heads;
    int hd = c->head_dim;
    int64_t kv_dim = (int64_t)c->n_kv_heads * hd;
#if defined(__x86_64__)
    int fast = lm_cpu_level() >= LM_CPU_AVX512;
#endif
    for (int64_t it = ith; it < items; it += nth) {
        int64_t r = it / c->n_heads;
        int h = (int)(it % c->n_heads);
        const float *q = c->q + r * c->q_ld + (int64_t)h * hd;
        const int32_t *table = c->tables + r * c->table_stride;
        float *o = c->out + r * c->out_ld + (int64_t)h * hd;
#if defined(__x86_64__)
        if (fast) { attn_item_avx512(c, scores, q, table, c->n_ctx[r], h / group, kv_dim, o); continue; }
#endif
        attn_item_ref(c, scores, q, table, c->n_ctx[r], h / group, kv_dim, o);
    }
}

size_t lm_attention_scratch_floats(int64_t max_ctx) {
    return (size_t)lm_pool_threads() * (size_t)(max_ctx + 16);
}

void lm_attention(const float *q, int64_t q_ld,
                  const float *k_pool, const float *v_pool, int64_t block_floats, int64_t layer_off,
                  int block_size, const int32_t *tables, int64_t table_stride,
                  const int32_t *n_ctx, int64_t n_rows, int n_heads, int n_kv_heads, int head_dim,
                  float scale, float *out, int64_t out_ld, float *scratch) {
    int64_t max_ctx = 0;
    for (int64_t r = 0; r < n_rows; r++) if (n_ctx[r] > max_ctx) max_ctx = n_ctx[r];
    attn_ctx c = { q, q_ld, k_pool, v_pool, block_floats, layer_off, block_size, tables, table_stride,
                   n_ctx, n_rows, n_heads, n_kv_heads, head_dim, scale, out, out_ld, scratch, max_ctx + 16 };
    lm_parallel(attn_task, &c);
}

int64_t lm_argmax(const float *x, int64_t n) {
    int64_t best = 0;
    for (int64_t i = 1; i < n; i++) if (x[i] > x[best]) best = i;
    return best;
}
