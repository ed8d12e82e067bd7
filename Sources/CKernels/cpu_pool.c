// Runtime CPU dispatch and the process-wide worker pool.
#define _GNU_SOURCE
#include "kernels.h"
#include <pthread.h>
#include <stdatomic.h>
#include <unistd.h>
#include <stdlib.h>
#include <string.h>
#include "cblas_shim.h"
#if defined(__x86_64__)
#include <immintrin.h>
#include <cpuid.h>
#define CPU_RELAX() _mm_pause()
#else
#define CPU_RELAX() ((void)0)
#endif

static int g_detected = -1;
static _Atomic int g_level = -1;

int lm_cpu_detect(void) {
    if (g_detected >= 0) return g_detected;
    int level = LM_CPU_SCALAR;
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        level = LM_CPU_AVX2;
    if (level == LM_CPU_AVX2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl"))
        level = LM_CPU_AVX512;
#endif
    g_detected = level;
    return level;
}

int lm_cpu_level(void) {
    int l = atomic_load(&g_level);
    if (l < 0) {
        l = lm_cpu_detect();
        const char *env = getenv("LORAMUX_CPU");
        if (env) {
            if (env[0] == 's') l = LM_CPU_SCALAR;
            else if (env[0] == 'a' && env[1] == 'v' && env[2] == 'x' && env[3] == '2') l = l < LM_CPU_AVX2 ? l : LM_CPU_AVX2;
        }
        atomic_store(&g_level, l);
    }
    return l;
}

void lm_cpu_set_level(int level) {
    int best = lm_cpu_detect();
    if (level > best) level = best;
    if (level < 0) level = 0;
    atomic_store(&g_level, level);
}

// Zen 4 splits a zmm operation into two 256-bit halves, and its f16
// conversions run faster in ymm (39.8 against 30.1 G/s in a probe); other
// AVX-512 cores, Zen 5 among them, convert twice as many a cycle in zmm.
static int wide512_detect(void) {
#if defined(__x86_64__)
    unsigned a, b, c, d;
    if (!__get_cpuid(0, &a, &b, &c, &d)) return 1;
    int amd = b == 0x68747541u && d == 0x69746e65u && c == 0x444d4163u;  // "AuthenticAMD"
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 1;
    unsigned family = (a >> 8) & 0xF;
    if (family == 0xF) family += (a >> 20) & 0xFF;
    return !(amd && family == 0x19);
#else
    return 0;
#endif
}

static _Atomic int g_wide = -1;

int lm_cpu_wide512(void) {
    int w = atomic_load_explicit(&g_wide, memory_order_relaxed);
    if (w < 0) {
        w = wide512_detect();
        const char *env = getenv("LORAMUX_CPU");
        if (env && strcmp(env, "avx512y") == 0) w = 0;
        atomic_store(&g_wide, w);
    }
    return w;
}

void lm_cpu_set_wide512(int wide) { atomic_store(&g_wide, wide < 0 ? wide512_detect() : wide != 0); }

const char *lm_cpu_level_name(int level) {
    switch (level) {
    case LM_CPU_AVX512: return "avx512";
    case LM_CPU_AVX2: return "avx2";
    default: return "scalar";
    }
}

// ---- pool -------------------------------------------------------------------
// Workers spin briefly between tasks (a forward pass issues hundreds of
// parallel sections a few microseconds apart) and then sleep on a condvar,
// so an idle server costs no CPU.

#define LM_MAX_THREADS 64
// Past SPIN_PAUSES pauses a spinning thread yields its core on every check: when
// the machine is oversubscribed, the thread it waits for may be the one that
// needs the core (pure spinning there cost a single stream 30x its speed).
// An idle worker sleeps after SPIN_ITERS checks; the yields are syscalls, so
// few of them: a long yielding phase took CPU from other work (5x slower
// adapter loads, which decompress on GCD threads).
#define SPIN_PAUSES 4096
#define SPIN_ITERS (SPIN_PAUSES + 256)
#include <sched.h>

void lm_spin_wait(int spins) {
    if (spins < SPIN_PAUSES) CPU_RELAX(); else sched_yield();
}

static struct {
    int n;
    pthread_t th[LM_MAX_THREADS];
    _Atomic uint64_t gen;
    _Atomic int pending;
    lm_task_fn fn;
    void *ctx;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_mutex_t call_mu; // one parallel section at a time
} g_pool = { .n = 0, .mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER,
             .call_mu = PTHREAD_MUTEX_INITIALIZER };
static pthread_once_t g_pool_once = PTHREAD_ONCE_INIT;
static int g_pool_request = 0;

static void *worker_main(void *arg) {
    int ith = (int)(intptr_t)arg;
    uint64_t seen = 0;
    for (;;) {
        uint64_t g;
        int spins = 0;
        while ((g = atomic_load_explicit(&g_pool.gen, memory_order_acquire)) == seen) {
            if (++spins < SPIN_ITERS) { lm_spin_wait(spins); continue; }
            pthread_mutex_lock(&g_pool.mu);
            while ((g = atomic_load_explicit(&g_pool.gen, memory_order_acquire)) == seen)
                pthread_cond_wait(&g_pool.cv, &g_pool.mu);
            pthread_mutex_unlock(&g_pool.mu);
            break;
        }
        seen = g;
        g_pool.fn(g_pool.ctx, ith, g_pool.n);
        atomic_fetch_sub_explicit(&g_pool.pending, 1, memory_order_acq_rel);
    }
    return NULL;
}

static void pool_start(void) {
    int n = g_pool_request;
    if (n <= 0) {
        const char *env = getenv("LORAMUX_THREADS");
        n = env ? atoi(env) : 0;
    }
    if (n <= 0) n = (int)sysconf(_SC_NPROCESSORS_ONLN);
    if (n < 1) n = 1;
    if (n > LM_MAX_THREADS) n = LM_MAX_THREADS;
    // Our own threads split every matmul; BLAS must not add threads of its own.
    openblas_set_num_threads(1);
    g_pool.n = n;
    for (int i = 1; i < n; i++) {
        if (pthread_create(&g_pool.th[i], NULL, worker_main, (void *)(intptr_t)i) != 0) {
            g_pool.n = i; // run with the threads we got
            break;
        }
    }
}

void lm_pool_init(int n_threads) {
    g_pool_request = n_threads;
    pthread_once(&g_pool_once, pool_start);
}

int lm_pool_threads(void) {
    pthread_once(&g_pool_once, pool_start);
    return g_pool.n;
}

void lm_parallel(lm_task_fn fn, void *ctx) {
    pthread_once(&g_pool_once, pool_start);
    if (g_pool.n == 1) { fn(ctx, 0, 1); return; }
    pthread_mutex_lock(&g_pool.call_mu);
    g_pool.fn = fn;
    g_pool.ctx = ctx;
    atomic_store_explicit(&g_pool.pending, g_pool.n - 1, memory_order_release);
    pthread_mutex_lock(&g_pool.mu);
    atomic_fetch_add_explicit(&g_pool.gen, 1, memory_order_acq_rel);
    pthread_cond_broadcast(&g_pool.cv);
    pthread_mutex_unlock(&g_pool.mu);
    fn(ctx, 0, g_pool.n);
    for (int spins = 0; atomic_load_explicit(&g_pool.pending, memory_order_acquire) > 0; spins++) lm_spin_wait(spins);
    pthread_mutex_unlock(&g_pool.call_mu);
}
