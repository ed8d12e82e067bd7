// LoraMux hot loops. Free functions over caller-owned buffers: nothing here
// allocates (except the worker threads of the pool), nothing here decides
// policy. Shapes are written next to every argument; matrices are row-major.
#ifndef LORAMUX_KERNELS_H
#define LORAMUX_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Element types, numbered as GGML numbers them.
enum {
    LM_F32 = 0, LM_F16 = 1, LM_Q4_0 = 2, LM_Q4_1 = 3, LM_Q5_0 = 6, LM_Q5_1 = 7, LM_Q8_0 = 8,
    LM_Q2_K = 10, LM_Q3_K = 11, LM_Q4_K = 12, LM_Q5_K = 13, LM_Q6_K = 14, LM_IQ4_NL = 20, LM_IQ4_XS = 23,
    LM_BF16 = 30
};

// ---- CPU dispatch -------------------------------------------------------
enum { LM_CPU_SCALAR = 0, LM_CPU_AVX2 = 1, LM_CPU_AVX512 = 2 };
int lm_cpu_detect(void);          // best level this CPU supports
int lm_cpu_level(void);           // level in use
void lm_cpu_set_level(int level); // clamps to what the CPU supports; for tests/benchmarks
const char *lm_cpu_level_name(int level);
// Whether AVX-512 kernels that have both forms use zmm (full-width cores) or
// ymm with AVX-512VL (Zen 4); either gives the same bits. LORAMUX_CPU=avx512y
// forces ymm. The setter is for tests and benchmarks (< 0: as detected).
int lm_cpu_wide512(void);
void lm_cpu_set_wide512(int wide);

// ---- thread pool ----------------------------------------------------------
// One pool for the process; OpenBLAS is pinned to one thread and called from
// inside pool tasks, so the two never oversubscribe the cores.
void lm_pool_init(int n_threads); // idempotent; n_threads <= 0 means "number of cores"
int lm_pool_threads(void);
typedef void (*lm_task_fn)(void *ctx, int ith, int nth);
void lm_parallel(lm_task_fn fn, void *ctx); // runs fn(ctx, i, n) for i in [0, n) and waits
// One step of a busy wait (spins = steps so far): pauses first, then yields the
// core, so a waiter never starves the thread it waits for on a busy machine.
void lm_spin_wait(int spins);

// ---- element conversion / dequantization --------------------------------
float lm_f16_to_f32(uint16_t h);
uint16_t lm_f32_to_f16(float f);
int lm_block_size(int dtype);
size_t lm_block_bytes(int dtype);
// src: n/block blocks -> dst (n,). n must be a multiple of the block size.
void lm_dequant_row(int dtype, const void *src, float *dst, int64_t n);
// Same, always through the portable scalar code (reference for tests).
void lm_dequant_row_ref(int dtype, const void *src, float *dst, int64_t n);

// ---- matmul ---------------------------------------------------------------
// Y (n_rows, ldy)[:, 0:n_out] = X (n_rows, ldx)[:, 0:n_in] @ W(n_out, n_in)^T
// W is read in place (e.g. straight from an mmap) in its stored dtype.
// scratch: lm_matmul_scratch_floats(n_in, n_rows) floats, 64-byte aligned.
size_t lm_matmul_scratch_floats(int64_t n_in, int64_t n_rows);
void lm_matmul(const void *W, int dtype, int64_t n_out, int64_t n_in,
               const float *X, int64_t ldx, int64_t n_rows,
               float *Y, int64_t ldy, float *scratch);
// Portable reference: dequantize each weight row, dot accumulated in double.
void lm_matmul_ref(const void *W, int dtype, int64_t n_out, int64_t n_in,
                   const float *X, int64_t ldx, int64_t n_rows, float *Y, int64_t ldy);
// Row count at or below which the quantized GEMV kernels are used (by
// default 12 on full-width AVX-512, 8 on Zen 4 and AVX2, 4 scalar; see
// matmul.c). The setter is for tests (n < 0: back to the default).
int lm_matmul_gemv_max_rows(void);
void lm_matmul_set_gemv_max_rows(int n);
// At most n LoRA chunks run beside the serial part of a section (the RMSNorm
// or SiLU of lm_rmsnorm_matmul_multi / lm_silu_mul_matmul_lora, then the X^T
// pack; only the pack for lm_matmul_multi / lm_matmul_lora); the rest ride on
// base tiles. n < 0: no limit (the default). For tests.
void lm_matmul_set_early_chunks(int n);

// ---- elementwise / normalisation -------------------------------------------
// out (n_rows, dim) = x / sqrt(mean(x^2) + eps) * w (dim,)
void lm_rmsnorm(const float *x, const float *w, float *out, int64_t n_rows, int64_t dim, float eps);
// x (n, ) += y (n, )
void lm_add(float *x, const float *y, int64_t n);
// every row of x (n_rows, ld)[:, 0:n] += b (n,): a projection's bias
void lm_add_bias(float *x, int64_t ld, const float *b, int64_t n_rows, int64_t n);
// gate (n_rows, ld)[:, 0:n] = silu(gate) * up (n_rows, ld)
void lm_silu_mul(float *gate, const float *up, int64_t n_rows, int64_t n, int64_t ld);
// Rotary embedding in place on x (n_rows, ld): n_heads heads of head_dim starting at column 0.
// interleaved != 0 rotates pairs (2i, 2i+1) (GGUF's permuted q/k rows);
// otherwise pairs (i, i + head_dim/2) (Hugging Face's rotate_half).
// inv_freq (head_dim/2,) are the per-pair frequencies; positions (n_rows,).
void lm_rope(float *x, int64_t n_rows, int64_t ld, int n_heads, int head_dim,
             const int32_t *positions, const float *inv_freq, int interleaved);

// ---- paged KV cache and attention -----------------------------------------
// The cache is a pool of blocks. A block holds block_size consecutive positions
// of one sequence for every layer: K pool (n_blocks, n_layers, block_size, kv_dim),
// and the same for V. block_floats = n_layers * block_size * kv_dim;
// layer_off = layer * block_size * kv_dim. Row r of a batch uses the block table
// tables[r * table_stride ...] (block ids in position order).

// Writes k, v (n_rows, kv_ld)[:, 0:kv_dim] at positions[r] of each row's table.
void lm_kv_store(float *k_pool, float *v_pool, int64_t block_floats, int64_t layer_off, int block_size,
                 const int32_t *tables, int64_t table_stride, const int32_t *positions,
                 const float *k, const float *v, int64_t kv_ld, int64_t n_rows, int kv_dim);

// For each row r and head h: out[r, h] = softmax(q[r, h] . K[s:n_ctx[r], kvh] * scale) @ V[s:.., kvh]
// with s = ctx_start[r] (a sliding window), or 0 when ctx_start is NULL.
// q (n_rows, q_ld), out (n_rows, out_ld). scratch: lm_attention_scratch_floats(max n_ctx).
size_t lm_attention_scratch_floats(int64_t max_ctx);
void lm_attention(const float *q, int64_t q_ld,
                  const float *k_pool, const float *v_pool, int64_t block_floats, int64_t layer_off,
                  int block_size, const int32_t *tables, int64_t table_stride,
                  const int32_t *n_ctx, const int32_t *ctx_start, int64_t n_rows, int n_heads, int n_kv_heads,
                  int head_dim, float scale, float *out, int64_t out_ld, float *scratch);

// ---- LoRA -------------------------------------------------------------------
// One segment: rows [row0, row0 + n_rows) of X/Y share one adapter module.
//   U (n, n_out) = (X_seg (n, n_in) @ A^T) @ B^T,  A (rank, n_in), BT = B^T (rank, n_out)
//   Y_seg += scale * U                              (plain LoRA)
//   Y_seg  = dora * (Y_seg + scale * U)             (DoRA; dora (n_out,) = m / ||W + scale B A||)
// A and BT are LM_F32 or LM_F16, contiguous. A is stored with its rows in
// groups of 4 (the last group holds rank % 4 when that is not 0), each group
// as 16-column blocks holding the group's rows side by side (lm_lora_block_a),
// so the shrink reads A front to back. BT is stored in column blocks
// of LM_LORA_BLOCK: block j (columns [32j, 32j + w), w = min(32, n_out - 32j))
// holds (rank, w) row-major, so the expand pass reads it front to back
// (lm_lora_block_bt makes this layout). Rows not covered by a segment are
// untouched. Segments may have different ranks, dtypes and scales.
typedef struct {
    int64_t row0, n_rows;
    const void *A;
    const void *BT;
    const float *dora;
    int32_t rank;
    int32_t dtype;
    float scale;
} lm_lora_seg;

#define LM_LORA_BLOCK 32
// src (rank, n_out) row-major -> dst in the blocked layout above; elements of `dtype` size.
void lm_lora_block_bt(const void *src, void *dst, int rank, int64_t n_out, int dtype);
// src A (rank, n_in) row-major -> dst in the grouped layout above.
void lm_lora_block_a(const void *src, void *dst, int rank, int64_t n_in, int dtype);
size_t lm_lora_scratch_floats(int max_rank, int64_t n_out);
void lm_lora_apply(const float *X, int64_t ldx, int64_t n_in, float *Y, int64_t ldy, int64_t n_out,
                   const lm_lora_seg *segs, int n_segs, float *scratch);
// One segment on the calling thread only (what a per-row loop would call).
void lm_lora_apply_single(const float *X, int64_t ldx, int64_t n_in, float *Y, int64_t ldy, int64_t n_out,
                          const lm_lora_seg *seg, float *scratch);
// Same result, one row at a time in plain C: the reference for tests.
void lm_lora_apply_ref(const float *X, int64_t ldx, int64_t n_in, float *Y, int64_t ldy, int64_t n_out,
                       const lm_lora_seg *segs, int n_segs);

// DoRA weight norms: out[o] = || W[o, :] + scale * (B @ A)[o, :] ||_2 with W in
// its stored dtype, A (rank, n_in) f32, B (n_out, rank) f32. scratch: n_in floats.
void lm_dora_norms(const void *W, int w_dtype, int64_t n_out, int64_t n_in, const float *A, const float *B,
                   int rank, float scale, float *out, float *scratch);

// Embedding LoRA for one token: x (dim,) += scale * BT^T @ a_col, where a_col
// (rank,) is the token's column of A and BT (rank, dim) is B^T; f32.
void lm_lora_embed(float *x, const float *a_col, const float *BT, int rank, int64_t dim, float scale);

// Y = X @ W^T plus the LoRA segments (as lm_lora_apply): the one call every
// projection of the model makes. With many rows the base tiles and the LoRA
// chunks run in one parallel section, so one core streams adapter weights
// (memory-bound) while the other multiplies (compute-bound).
// lora_scratch: lm_matmul_lora_scratch_floats(max_rank, n_out, n_rows) floats.
size_t lm_matmul_lora_scratch_floats(int max_rank, int64_t n_out, int64_t n_rows);
void lm_matmul_lora(const void *W, int dtype, int64_t n_out, int64_t n_in,
                    const float *X, int64_t ldx, int64_t n_rows, float *Y, int64_t ldy, float *scratch,
                    const lm_lora_seg *segs, int n_segs, float *lora_scratch);
// One projection of a fused section: Y (n_rows, n_out) = X @ W^T plus its
// LoRA segments (n_segs may be 0).
typedef struct {
    const void *W;
    int32_t dtype;
    int64_t n_out;
    float *Y;
    int64_t ldy;
    const lm_lora_seg *segs;
    int32_t n_segs;
} lm_proj;
// Several projections of the same X (q, k, v; gate, up) in one parallel
// section: what lm_matmul_lora does for each, with one tail and one start and
// join of the pool for all. Each projection's results equal lm_matmul_lora's.
// lora_scratch: lm_matmul_multi_scratch_floats(max_rank, max n_out, sum of n_out, n_rows).
size_t lm_matmul_multi_scratch_floats(int max_rank, int64_t max_n_out, int64_t sum_n_out, int64_t n_rows);
void lm_matmul_multi(const lm_proj *proj, int n_proj, int64_t n_in, const float *X, int64_t ldx, int64_t n_rows,
                     float *scratch, float *lora_scratch);
// lm_rmsnorm(x, w, X, n_rows, n_in, eps) and then lm_matmul_multi of X (the
// q/k/v or gate/up section), with the same results; with LoRA rows, one
// thread normalises row by row while the others run chunks of finished rows.
void lm_rmsnorm_matmul_multi(const float *x, const float *w, float eps, float *X, const lm_proj *proj, int n_proj,
                             int64_t n_in, int64_t n_rows, float *scratch, float *lora_scratch);
// lm_silu_mul(gate, up, n_rows, n_in, ld) and then lm_matmul_lora of X = gate
// (the down projection), with the same results. In one parallel section when
// there are LoRA rows: one thread computes SiLU row by row while the others
// already run the LoRA chunks of the rows it has finished.
void lm_silu_mul_matmul_lora(float *gate, const float *up, int64_t ld, const void *W, int dtype, int64_t n_out,
                             int64_t n_in, int64_t n_rows, float *Y, int64_t ldy, float *scratch,
                             const lm_lora_seg *segs, int n_segs, float *lora_scratch);
// One chunk (nr <= 4 rows from row r0 of segment s) of lm_lora_apply, on the
// calling thread, split by column: where bit o of `done` is set (done[o / 64]
// bit o % 64), Y += scale * U as lm_lora_apply adds it (DoRA applied); every
// other column is stored as D = scale * U (DoRA ignored; D is n_rows x n_out,
// no clearing needed), for a later fold Y += D that gives the same bits. D's
// values in the done columns are left unspecified. done NULL: all columns to
// D. scratch: per-thread, as lm_lora_apply lays it out.
void lm_lora_chunk(const float *X, int64_t ldx, int64_t n_in, float *Y, int64_t ldy, float *D, int64_t n_out,
                   const lm_lora_seg *s, int64_t r0, int nr, const uint64_t *done, float *scratch, int level);
#define LM_LORA_CHUNK_ROWS 4

// ---- conversion and checksums ---------------------------------------------------
void lm_f16_to_f32_n(const uint16_t *src, float *dst, int64_t n);
void lm_f32_to_f16_n(const float *src, uint16_t *dst, int64_t n);
// Index of the first NaN or infinity in x[0..n), or -1.
int64_t lm_first_nonfinite(const float *x, int64_t n);
// One adapter tensor into kernel layout: dequantized with the reference
// conversion, (rows, cols) transposed to (cols, rows) when `transpose`, stored
// as LM_F32 or LM_F16. `scratch` holds rows*cols floats. Returns the source
// index of the first non-finite value (dst is then unspecified), or -1.
int64_t lm_adapter_tensor(int src_dtype, const void *src, int64_t rows, int64_t cols, int transpose,
                          int dst_dtype, void *dst, float *scratch);
// n bf16 values stored in the upper half of an n-float buffer, widened to f32
// in place (front to back, so each value is read before its bytes are written).
void lm_bf16_widen_in_place(void *buf, int64_t n);
// The reverse: n f32 values rounded to bf16 (nearest, ties to even; NaN stays a
// quiet NaN) into the first half of the same buffer, front to back.
void lm_f32_to_bf16_in_place(void *buf, int64_t n);
// GGUF's interleaved RoPE order for a (rows, cols) matrix of 4- or 2-byte
// elements whose columns are heads of `head_dim`: column h*hd + 2i + t takes
// the Hugging Face column h*hd + t*hd/2 + i. In place.
void lm_rope_permute_cols(void *p, int64_t rows, int64_t cols, int64_t head_dim, int elem_bytes);
// CRC-32C (Castagnoli), hardware-accelerated where SSE4.2 is present.
uint32_t lm_crc32c(uint32_t crc, const void *data, size_t n);
// The bitwise definition, for tests.
uint32_t lm_crc32c_ref(uint32_t crc, const void *data, size_t n);

// ---- sampling helpers --------------------------------------------------------
int64_t lm_argmax(const float *x, int64_t n);
// log(sum_i exp(x[i])) in double; NaN if any x is NaN, -inf for n == 0.
double lm_logsumexp(const float *x, int64_t n);

#ifdef __cplusplus
}
#endif
#endif
