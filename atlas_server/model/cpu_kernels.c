/* Atlas's native CPU kernels, fp32, for the work of decoding that PyTorch does slowly here.
 *
 * decode_attention: for every (row b, query head h), out[b, h] = softmax(q[b, h] .
 * K[slot_b, h/group, :len_b] * scale) V[slot_b, h/group, :len_b], with an online softmax
 * so keys and values are read once, in memory order, and only the len_b positions row b
 * owns (no padding to the batch's longest row, no mask, no gather copy). Rows are
 * independent: a row's result is the same whatever else is in the batch. Why: at batch 16
 * the general SDPA kernel reads the cache at well under half of DRAM bandwidth for
 * one-token queries (docs/benchmarks.md, bench/profile_step.py). Given the step's new keys
 * and values, it first stores them at position len_b - 1 of each row's slot: one call
 * instead of two index_put calls, and the index checks in C rather than four reductions
 * read back in Python (with the leaner panel call, a llama-124m step's time outside its
 * products fell from 3.6-4.0 to 2.7 ms at one token: `python bench/step_overhead.py`).
 * It checks every slot and length before touching the cache and returns the first row out
 * of range (-1 when all are in). It works in blocks of positions (scores, one rescale,
 * exps in vectors, then the weighted values): 1.3-1.6x faster than the loop of one
 * position at a time it replaced, from DRAM, and 1.2-2.0x SDPA's unmasked time
 * (`python bench/bench_decode_attention.py`, AVX2 host, one thread).
 *
 * matmul_panels: y = x W (+ bias), then GELU (tanh form) when asked, for x [M, K] and W
 * [K, N] stored as column panels:
 * W[:, p*NR:(p+1)*NR] is panel p, [K, NR] contiguous (the last one zero-padded). A tile
 * keeps MR rows x NR columns of y in vector registers while it walks k: each step loads NR
 * weights and broadcasts MR inputs, no horizontal sums, no packing of x. The k loop runs
 * in chunks of KC steps, every tile of a block of rows over one chunk before the next, so
 * one panel is read from memory once and from L1 by every further tile, and the last tile
 * prefetches the next chunk; a thread takes a contiguous run of panels, so the weight is
 * read as one stream per thread. Why: against oneDNN's packed kernels, on an AVX-512 host
 * (before the chunking) 1.03-1.98x faster for the 1-32 rows of a decode step and on par at
 * 64-128; on an AVX2 host (with it) 1.15-2.05x faster at 1-16 rows and 1.12-1.40x at
 * 32-128; at one row it streams the weight near DRAM speed (`python
 * bench/bench_matmul.py`, `python bench/ceilings.py`). Each row is summed in the same
 * order whatever tile it lands in, so results do not depend on the batch. NR is a vector
 * multiple chosen at compile time; `panel_width()` tells Python how to lay the panels out.
 *
 * matmul_panels_q8: the same product over 8-bit weights (llama.cpp's q8_0, weight only):
 * each column's weights in blocks of QK = 32 along k, each block an int8 run q with one
 * scale d (d = max|w| / 127, q = round(w / d), d stored in fp16), panels [P, K, NR] int8
 * and their scales [P, ceil(K / QK), NR] fp16. A tile widens NR weights a step to floats,
 * sums a block of them against x, then adds that times the block's scales: x stays fp32
 * (llama.cpp rounds x to 8 bits too). Why: a decode step at a few rows is bound by reading
 * the weights, and these read 1.0625 bytes a weight instead of 4, q8_0's size
 * (docs/benchmarks.md, `python bench/bench_int8.py`).
 *
 * rms_norm and rope_rows: a Llama block's small steps at one token, each one call instead
 * of the 6-10 PyTorch operations (~3-20 us apiece) that made up ~8% of a llama-124m
 * batch-1 step. rms_norm is out = x / sqrt(mean(x^2) + eps) * w per row; rope_rows turns,
 * in place, the first R dims of each of `heads` heads of each row by its position's angles
 * ("rotate half": dims i and i + R/2 as a pair), reading the cos/sin tables [L, R] at the
 * row's position itself, so no gathered copy of them is made per layer. It checks each
 * position against L and returns the first row out of range (-1 when all are in).
 *
 * decode_stack: a decode step, one token per row, through every block of a model in one
 * call: norms, the four products, RoPE, the cache store, attention, the MLP's activation
 * and both residual adds (the output products add into x as they store), in one OpenMP
 * region with a barrier only where a step needs the whole of the one before. The kernels
 * above are written as the units a thread takes (multiply_panel, attend_task, norm_row,
 * rope_row), so both paths run the same code in the same order. Why: block by block, a
 * llama-124m step at one token spent 2.7-3.4 ms outside its products on ~15 interpreted
 * calls per block, and every C call woke OpenMP's threads anew; in one call a one-row
 * step takes 0.97-1.00x the time of its products called alone (1.17x at 16 rows, whose
 * attention reads 16 slots of cache) and runs 1.18-1.29x faster than block by block
 * (`python bench/step_overhead.py`, AVX2 host).
 *
 * Built by native.py with the system C compiler; OpenMP here is the runtime torch already
 * loaded (same soname), so the kernels share torch's threads. Layouts (element strides):
 * q [B, H, D] with heads D apart and rows q_row_stride apart (a slice of the fused qkv
 * projection), out [B, H, D] contiguous, new keys and values [B, K, D] likewise with rows
 * new_row_stride apart; k and v share strides (slot, head, pos) with D contiguous;
 * D <= 256. Callers validate shapes; the kernels check the indices they read.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

/* Which source the library was built from (native.py passes its hash and refuses a library
 * built from another: the signatures below may have changed). */
#ifndef SOURCE_SHA
#define SOURCE_SHA "unknown"
#endif
const char *source_sha(void) { return SOURCE_SHA; }

/* Tile sizes per instruction set: MR x NV accumulators plus NV weight vectors and a
 * broadcast must fit the register file (32 zmm with AVX-512, 16 ymm with AVX2). */
#if defined(__AVX512F__)
#define VL 16
#define MR 8
#elif defined(__AVX__)
#define VL 8
#define MR 4
#else
#define VL 4
#define MR 4
#endif
#define NV 3
#define NR (NV * VL)
/* Rows of an 8-bit tile: its partial sums take as many registers again (tile_q8). */
#if defined(__AVX512F__)
#define MRQ 4
#else
#define MRQ 2
#endif

typedef float vec __attribute__((vector_size(VL * 4), aligned(4))); /* unaligned loads OK */

int panel_width(void) { return NR; }

typedef int32_t ivec __attribute__((vector_size(VL * 4))); /* a vec's lanes as integers */

#define QK 32 /* weights per int8 block (along k) sharing one scale, as q8_0 */

/* VL fp16 numbers (the blocks' scales, stored as q8_0 stores them) as floats. */
static inline vec load_half(const uint16_t *h) {
#if defined(__AVX512F__)
    return (vec)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)h));
#elif defined(__F16C__) && defined(__AVX__)
    return (vec)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)h));
#else
    vec out;
    for (int i = 0; i < VL; i++) { /* IEEE half: sign, 5-bit exponent, 10-bit fraction */
        const uint32_t sign = (uint32_t)(h[i] & 0x8000) << 16, e = (h[i] >> 10) & 31,
                       f = h[i] & 1023;
        float value = e ? ldexpf((float)(f | 1024), (int)e - 25) : ldexpf((float)f, -24);
        if (e == 31) value = f ? NAN : INFINITY;
        uint32_t bits;
        memcpy(&bits, &value, 4);
        bits |= sign;
        memcpy(&out[i], &bits, 4);
    }
    return out;
#endif
}

/* VL int8 weights as floats: sign-extend, convert (two instructions on x86). Intrinsics,
 * because GCC 12 turns __builtin_convertvector from int8 into one scalar convert a lane. */
static inline vec widen(const int8_t *q) {
#if defined(__AVX512F__)
    return (vec)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q)));
#elif defined(__AVX2__)
    return (vec)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)q)));
#else
    vec w;
    for (int i = 0; i < VL; i++) w[i] = (float)q[i];
    return w;
#endif
}

static inline vec select_lanes(ivec mask, vec a, vec b) { /* mask ? a : b, lane by lane */
    return (vec)(((ivec)a & mask) | ((ivec)b & ~mask));
}

/* exp(t) for t in [-88, 88] as 2^n e^r, n = round(t / ln 2), |r| <= ln 2 / 2, e^r by its
 * degree-6 Taylor polynomial, a vector at a time (libm's expf vectorises only under
 * -ffast-math, which the attention kernel's infinities and the batch invariance rule out). */
static inline vec exp_approx(vec t) {
    const vec n = (t * 1.44269504f + 12582912.f) - 12582912.f; /* round to nearest */
    const vec r = (t - n * 0.693359375f) + n * 2.12194440e-4f; /* t - n ln 2, in two parts */
    vec p = (vec){0} + 1.f / 720.f;
    p = p * r + 1.f / 120.f;
    p = p * r + 1.f / 24.f;
    p = p * r + 1.f / 6.f;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    const ivec bits = (__builtin_convertvector(n, ivec) + 127) << 23; /* 2^n */
    return p * (vec)bits;
}

/* decode_attention's blocking: a task keeps the scores of BLOCK positions at a time, and
 * takes up to GQ query heads that share one key/value head together, so each key and
 * value is read from memory once and from L1 by the group's other heads. */
#define BLOCK 64
#define GQ 8

static inline float lane_sum(vec a) {
    float s = 0.f;
    for (int lane = 0; lane < VL; lane++) s += a[lane];
    return s;
}

/* scores[j] = query . key_j for n keys pos_stride apart: four keys at a time, so that four
 * independent sums hide the FMA latency, in vectors with a scalar tail past the last whole
 * vector of D (OpenMP's simd reductions here spilled each sum to the stack and read it
 * back lane by lane, ~2x slower). */
static void block_scores(const float *query, const float *keys, int64_t pos_stride,
                         int64_t D, int64_t n, float *scores) {
    const int64_t whole = D / VL * VL;
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
        const float *k0 = keys + j * pos_stride, *k1 = k0 + pos_stride;
        const float *k2 = k1 + pos_stride, *k3 = k2 + pos_stride;
        vec s0 = (vec){0}, s1 = (vec){0}, s2 = (vec){0}, s3 = (vec){0};
        for (int64_t d = 0; d < whole; d += VL) {
            const vec qd = *(const vec *)(query + d);
            s0 += qd * *(const vec *)(k0 + d);
            s1 += qd * *(const vec *)(k1 + d);
            s2 += qd * *(const vec *)(k2 + d);
            s3 += qd * *(const vec *)(k3 + d);
        }
        float t0 = lane_sum(s0), t1 = lane_sum(s1), t2 = lane_sum(s2), t3 = lane_sum(s3);
        for (int64_t d = whole; d < D; d++) {
            t0 += query[d] * k0[d], t1 += query[d] * k1[d];
            t2 += query[d] * k2[d], t3 += query[d] * k3[d];
        }
        scores[j] = t0, scores[j + 1] = t1, scores[j + 2] = t2, scores[j + 3] = t3;
    }
    for (; j < n; j++) {
        const float *key = keys + j * pos_stride;
        vec s0 = (vec){0};
        for (int64_t d = 0; d < whole; d += VL)
            s0 += *(const vec *)(query + d) * *(const vec *)(key + d);
        float t = lane_sum(s0);
        for (int64_t d = whole; d < D; d++) t += query[d] * key[d];
        scores[j] = t;
    }
}

/* acc[:U*VL] += sum_j p[j] value_j[:U*VL]: U <= 8 vectors of acc stay in registers over all
 * n values (U independent sums per step); inlined once per U so the loop over u unrolls. */
static inline __attribute__((always_inline)) void values_chunk(const float *p,
                                                               const float *values,
                                                               int64_t pos_stride, int64_t n,
                                                               float *acc, const int U) {
    vec a[8];
    for (int u = 0; u < U; u++) a[u] = *(const vec *)(acc + u * VL);
    for (int64_t j = 0; j < n; j++) {
        const float *value = values + j * pos_stride, pj = p[j];
        for (int u = 0; u < U; u++) a[u] += pj * *(const vec *)(value + u * VL);
    }
    for (int u = 0; u < U; u++) *(vec *)(acc + u * VL) = a[u];
}

/* acc += sum_j p[j] value_j over n values pos_stride apart: up to 8 vectors of D at a time
 * held in registers (a pass over acc in memory per value ran ~2x slower), then the dims
 * past the last whole vector. */
static void block_values(const float *p, const float *values, int64_t pos_stride, int64_t D,
                         int64_t n, float *acc) {
    const int64_t vectors = D / VL;
    for (int64_t c = 0; c < vectors; c += 8) {
        float *a = acc + c * VL;
        const float *v = values + c * VL;
        switch (vectors - c < 8 ? vectors - c : 8) {
#define CHUNK(u) \
    case u: values_chunk(p, v, pos_stride, n, a, u); break;
            CHUNK(1) CHUNK(2) CHUNK(3) CHUNK(4) CHUNK(5) CHUNK(6) CHUNK(7) CHUNK(8)
        }
    }
    for (int64_t d = vectors * VL; d < D; d++) {
        float sum = acc[d];
        for (int64_t j = 0; j < n; j++) sum += p[j] * values[j * pos_stride + d];
        acc[d] = sum;
    }
}

/* One task of decode attention: row b's query heads h0..h0+G-1 (G <= GQ), which share key
 * and value head kv, over positions [0, lengths[b]) of the row's slot. */
static void attend_task(const float *q, int64_t q_row_stride, const float *k, const float *v,
                        float *out, const int64_t *slots, const int64_t *lengths, int64_t H,
                        int64_t K, int64_t D, int64_t slot_stride, int64_t head_stride,
                        int64_t pos_stride, float scale, int64_t task) {
    const int64_t group = H / K, chunks = (group + GQ - 1) / GQ; /* tasks per kv head */
    const int64_t b = task / (K * chunks), kv = task / chunks % K;
    const int64_t h0 = kv * group + task % chunks * GQ;
    const int64_t G = kv * group + group - h0 < GQ ? kv * group + group - h0 : GQ;
    const int64_t offset = slots[b] * slot_stride + kv * head_stride, len = lengths[b];
    const float *kp = k + offset, *vp = v + offset;
    float query[GQ][256], acc[GQ][256], running_max[GQ], denominator[GQ];
    float scores[BLOCK] __attribute__((aligned(64)));
    for (int64_t g = 0; g < G; g++) {
        const float *qp = q + b * q_row_stride + (h0 + g) * D;
        for (int64_t d = 0; d < D; d++) {
            query[g][d] = qp[d] * scale;
            acc[g][d] = 0.f;
        }
        running_max[g] = -INFINITY, denominator[g] = 0.f;
    }
    for (int64_t j0 = 0; j0 < len; j0 += BLOCK) {
        const int64_t n = len - j0 < BLOCK ? len - j0 : BLOCK;
        for (int64_t g = 0; g < G; g++) {
            block_scores(query[g], kp + j0 * pos_stride, pos_stride, D, n, scores);
            const int64_t padded = (n + VL - 1) / VL * VL;
            for (int64_t j = n; j < padded; j++) scores[j] = -INFINITY; /* weigh nothing */
            vec top_lanes = (vec){0} + running_max[g];
            for (int64_t j = 0; j < padded; j += VL) {
                const vec s = *(vec *)(scores + j);
                top_lanes = select_lanes(s > top_lanes, s, top_lanes);
            }
            float top = top_lanes[0];
            for (int lane = 1; lane < VL; lane++)
                top = top_lanes[lane] > top ? top_lanes[lane] : top;
            if (top > running_max[g]) { /* rescale what was summed under the old maximum */
                const float c = expf(running_max[g] - top);
                denominator[g] *= c;
                for (int64_t d = 0; d < D; d++) acc[g][d] *= c;
                running_max[g] = top;
            }
            vec sum = (vec){0};
            for (int64_t j = 0; j < padded; j += VL) { /* probabilities, VL at a time */
                vec t = *(vec *)(scores + j) - top;
                /* exp_approx's range; below it (and the padding's -inf) e^t < 2e-38 */
                t = select_lanes(t > -87.f, t, (vec){0} - 87.f);
                const vec e = exp_approx(t);
                *(vec *)(scores + j) = e;
                sum += e;
            }
            for (int lane = 0; lane < VL; lane++) denominator[g] += sum[lane];
            block_values(scores, vp + j0 * pos_stride, pos_stride, D, n, acc[g]);
        }
    }
    for (int64_t g = 0; g < G; g++) {
        float *op = out + (b * H + h0 + g) * D;
        for (int64_t d = 0; d < D; d++) op[d] = acc[g][d] / denominator[g];
    }
}

int64_t decode_attention(const float *q, int64_t q_row_stride, const float *k_new,
                         const float *v_new, int64_t new_row_stride, float *k, float *v,
                         float *out, const int64_t *slots, const int64_t *lengths,
                         int64_t n_slots, int64_t max_len, int64_t B, int64_t H, int64_t K,
                         int64_t D, int64_t slot_stride, int64_t head_stride,
                         int64_t pos_stride, float scale, int threads) {
    for (int64_t b = 0; b < B; b++) /* every index first: a bad one must change nothing */
        if (slots[b] < 0 || slots[b] >= n_slots || lengths[b] < 1 || lengths[b] > max_len)
            return b;
    if (k_new) /* serially, before any row reads: rows sharing a slot see the last write */
        for (int64_t b = 0; b < B; b++)
            for (int64_t h = 0; h < K; h++) {
                const int64_t at = slots[b] * slot_stride + h * head_stride +
                                   (lengths[b] - 1) * pos_stride;
                memcpy(k + at, k_new + b * new_row_stride + h * D, D * sizeof(float));
                memcpy(v + at, v_new + b * new_row_stride + h * D, D * sizeof(float));
            }
    const int64_t chunks = (H / K + GQ - 1) / GQ; /* tasks per kv head */
    /* dynamic: rows differ in length, so equal shares of the tasks are unequal work */
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t task = 0; task < B * K * chunks; task++)
        attend_task(q, q_row_stride, k, v, out, slots, lengths, H, K, D, slot_stride,
                    head_stride, pos_stride, scale, task);
    return -1;
}

/* GELU, tanh form: 0.5 x (1 + tanh(u)) = x / (1 + exp(-2u)), u = sqrt(2/pi) (x + 0.044715
 * x^3); within 2e-6 relative of the exact value (tests/test_native_kernels.py). */
static inline vec gelu_tanh(vec x) {
    const vec limit = (vec){0} + 88.f; /* exp's range; the result is 0 or x well before */
    vec t = -1.5957691216f * (x + 0.044715f * x * x * x); /* -2u */
    t = select_lanes(t < limit, t, limit);
    t = select_lanes(t > -limit, t, -limit);
    return x / (1.f + exp_approx(t));
}

/* Keep a vector in a register: with AVX2's 16 registers GCC otherwise folds the weight
 * loads into every row's FMA, 16 loads per k step instead of 7 (`gcc -O3 -march=native
 * -S` shows the folded FMAs), and the tile is bound by loads rather than by the FMAs
 * (bench/bench_matmul.py before and after, docs/benchmarks.md). An empty asm that claims
 * to change the value; "v" lets
 * it sit in any of AVX-512's 32 registers (where GCC kept the weights in registers anyway),
 * and other architectures do without. */
#if defined(__AVX512F__)
#define KEEP_IN_REGISTER(r) __asm__("" : "+v"(r))
#elif defined(__x86_64__) || defined(__i386__)
#define KEEP_IN_REGISTER(r) __asm__("" : "+x"(r))
#else
#define KEEP_IN_REGISTER(r) ((void)0)
#endif

/* Blocking of a panel's k loop. A block of MB rows walks the panel KC steps at a time,
 * tile by tile, so the tiles after the first read the chunk from L1 rather than L2, and the
 * last tile prefetches the next chunk while it computes: at 8-32 rows the weight then
 * streams from DRAM while the arithmetic runs instead of before it. KC = 48 was the best of
 * 32-128 in a standalone sweep on an AVX2 host (not kept; rebuild with another KC and rerun
 * bench/bench_matmul.py to check it on yours). */
#define KC 48
#define MB 32 /* rows whose partial sums a thread keeps on its stack: MB x NR floats */

/* sums[r, :] (+)= x[r, k0:k1] . panel[k0:k1, :] for `rows` <= MR rows, starting from zero
 * when `first`; inlined once per row count so the loops over r and v unroll into
 * registers. `ahead`, when given, is prefetched one cache line pair per k step. */
static inline __attribute__((always_inline)) void tile(const float *x, int64_t K,
                                                       const float *panel, int64_t k0,
                                                       int64_t k1, float *sums, int first,
                                                       const char *ahead, const int rows) {
    vec acc[MR][NV];
    for (int r = 0; r < rows; r++)
        for (int v = 0; v < NV; v++)
            acc[r][v] = first ? (vec){0} : *(const vec *)(sums + r * NR + v * VL);
    for (int64_t k = k0; k < k1; k++) {
        if (ahead) { /* NR floats of the next chunk per step: 96 bytes (AVX2) to 192 */
            for (int line = 0; line < (NR * 4 + 63) / 64; line++)
                __builtin_prefetch(ahead + 64 * line, 0, 3);
            ahead += NR * 4;
        }
        vec w[NV];
        for (int v = 0; v < NV; v++) {
            w[v] = *(const vec *)(panel + k * NR + v * VL);
            KEEP_IN_REGISTER(w[v]);
        }
        for (int r = 0; r < rows; r++) {
            const float s = x[r * K + k];
            for (int v = 0; v < NV; v++) acc[r][v] += w[v] * s;
        }
    }
    for (int r = 0; r < rows; r++)
        for (int v = 0; v < NV; v++) *(vec *)(sums + r * NR + v * VL) = acc[r][v];
}

/* tile() over 8-bit weights: panel [K, NR] int8, scales [ceil(K / QK), NR]; k0 is a
 * multiple of QK. Each block's QK steps are summed over the weights widened to floats but
 * not yet scaled, then added to the tile times the block's scales: one multiply per block
 * rather than one per step, which at one row (where this loop, not memory, is the limit)
 * is a quarter of the work. The partial sums double the registers a row needs, hence
 * tiles of at most MRQ rows. Every row, in any tile, sums in this same order. */
static inline __attribute__((always_inline)) void tile_q8(const float *x, int64_t K,
                                                          const int8_t *panel,
                                                          const uint16_t *scales, int64_t k0,
                                                          int64_t k1, float *sums, int first,
                                                          const char *ahead, const int rows) {
    vec acc[MRQ][NV];
    for (int r = 0; r < rows; r++)
        for (int v = 0; v < NV; v++)
            acc[r][v] = first ? (vec){0} : *(const vec *)(sums + r * NR + v * VL);
    for (int64_t g0 = k0; g0 < k1; g0 += QK) {
        const int64_t g1 = g0 + QK < k1 ? g0 + QK : k1;
        vec part[MRQ][NV];
        for (int r = 0; r < rows; r++)
            for (int v = 0; v < NV; v++) part[r][v] = (vec){0};
        for (int64_t k = g0; k < g1; k++) {
            if (ahead) { /* NR bytes of the next chunk per step: under one line */
                __builtin_prefetch(ahead, 0, 3);
                ahead += NR;
            }
            vec w[NV];
            for (int v = 0; v < NV; v++) {
                w[v] = widen(panel + k * NR + v * VL);
                KEEP_IN_REGISTER(w[v]);
            }
            for (int r = 0; r < rows; r++) {
                const float s = x[r * K + k];
                for (int v = 0; v < NV; v++) part[r][v] += w[v] * s;
            }
        }
        vec d[NV];
        for (int v = 0; v < NV; v++) d[v] = load_half(scales + g0 / QK * NR + v * VL);
        for (int r = 0; r < rows; r++)
            for (int v = 0; v < NV; v++) acc[r][v] += part[r][v] * d[v];
    }
    for (int r = 0; r < rows; r++)
        for (int v = 0; v < NV; v++) *(vec *)(sums + r * NR + v * VL) = acc[r][v];
}

/* What a product does with its result once the sums are done (after adding the bias). */
enum { STORE = 0, STORE_GELU = 1, ADD_TO_Y = 2 };

/* y[r, :cols] = sums[r, :cols] (+ bias), then GELU when asked, or y += that (a residual
 * add in the same pass), for `rows` rows. */
static void finish_rows(float *sums, const float *bias, float *y, int64_t N, int64_t cols,
                        int epilogue, int64_t rows) {
    for (int64_t r = 0; r < rows; r++) {
        float *out = sums + r * NR;
        if (bias)
            for (int64_t c = 0; c < cols; c++) out[c] += bias[c];
        if (epilogue == STORE_GELU) /* over all NR columns: the padding is never stored */
            for (int v = 0; v < NV; v++)
                *(vec *)(out + v * VL) = gelu_tanh(*(vec *)(out + v * VL));
        if (epilogue == ADD_TO_Y)
            for (int64_t c = 0; c < cols; c++) y[r * N + c] += out[c];
        else
            memcpy(y + r * N, out, cols * sizeof(float));
    }
}

/* Panel p's columns of y = x W (+ bias), every row: the unit of work a thread takes. W is
 * fp32 panels, or with `scales` int8 panels and their block scales (matmul_panels_q8). */
static void multiply_panel(const float *x, const void *panels, const uint16_t *scales,
                           const float *bias, float *y, int64_t M, int64_t K, int64_t N,
                           int epilogue, int64_t p) {
    const float *panel = (const float *)panels + p * K * NR, *b = bias ? bias + p * NR : 0;
    const int8_t *qpanel = (const int8_t *)panels + p * K * NR;
    const uint16_t *d = scales ? scales + p * ((K + QK - 1) / QK) * NR : 0;
    /* int8 chunks hold whole blocks, so a block's scales are loaded once per chunk */
    const int64_t kc = scales ? 2 * QK : KC;
    const int64_t cols = N - p * NR < NR ? N - p * NR : NR;
    float sums[MB * NR] __attribute__((aligned(64)));
    for (int64_t m0 = 0; m0 < M; m0 += MB) {
        const int64_t rows = M - m0 < MB ? M - m0 : MB;
        if (K == 0) /* no chunk to start the sums: a product over nothing is zero */
            memset(sums, 0, sizeof(sums));
        for (int64_t k0 = 0; k0 < K; k0 += kc) {
            const int64_t k1 = k0 + kc < K ? k0 + kc : K;
            const int mr = scales ? MRQ : MR;
            for (int64_t m = 0; m < rows; m += mr) {
                const float *xm = x + (m0 + m) * K;
                float *tile_sums = sums + m * NR;
                const int n = rows - m < mr ? (int)(rows - m) : mr, first = k0 == 0;
                /* A single tile is left to the hardware prefetcher: software prefetch
                 * made one row slower in the same sweep. */
                const char *ahead = 0;
                if (rows > mr && m + mr >= rows)
                    ahead = scales ? (const char *)(qpanel + k1 * NR)
                                   : (const char *)(panel + k1 * NR);
                if (scales) {
                    switch (n) {
#define TILE_Q8(r) \
    case r: tile_q8(xm, K, qpanel, d, k0, k1, tile_sums, first, ahead, r); break;
                        TILE_Q8(1) TILE_Q8(2)
#if MRQ > 2
                        TILE_Q8(3) TILE_Q8(4)
#endif
                    }
                    continue;
                }
                switch (n) {
#define TILE(r) \
    case r: tile(xm, K, panel, k0, k1, tile_sums, first, ahead, r); break;
                    TILE(1) TILE(2) TILE(3) TILE(4)
#if MR > 4
                    TILE(5) TILE(6) TILE(7) TILE(8)
#endif
                }
            }
        }
        finish_rows(sums, b, y + m0 * N + p * NR, N, cols, epilogue, rows);
    }
}

void matmul_panels(const float *x, const float *panels, const float *bias, float *y, int64_t M,
                   int64_t K, int64_t N, int gelu, int threads) {
    const int64_t n_panels = (N + NR - 1) / NR;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t p = 0; p < n_panels; p++)
        multiply_panel(x, panels, 0, bias, y, M, K, N, gelu ? STORE_GELU : STORE, p);
}

void matmul_panels_q8(const float *x, const int8_t *panels, const uint16_t *scales,
                      const float *bias, float *y, int64_t M, int64_t K, int64_t N, int gelu,
                      int threads) {
    const int64_t n_panels = (N + NR - 1) / NR;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t p = 0; p < n_panels; p++)
        multiply_panel(x, panels, scales, bias, y, M, K, N, gelu ? STORE_GELU : STORE, p);
}

/* One row of RMSNorm (x / sqrt(mean(x^2) + eps) * w) or, with `layer`, LayerNorm ((x -
 * mean) / sqrt(var + eps) * w (+ b)). */
static void norm_row(const float *x, const float *w, const float *b, float *o, int64_t dim,
                     int layer, float eps) {
    float mean = 0.f, squares = 0.f;
    if (layer) {
#pragma omp simd reduction(+ : mean)
        for (int64_t d = 0; d < dim; d++) mean += x[d];
        mean /= (float)dim;
    }
#pragma omp simd reduction(+ : squares)
    for (int64_t d = 0; d < dim; d++) squares += (x[d] - mean) * (x[d] - mean);
    const float inv = 1.f / sqrtf(squares / (float)dim + eps);
#pragma omp simd
    for (int64_t d = 0; d < dim; d++) o[d] = (x[d] - mean) * inv * w[d] + (b ? b[d] : 0.f);
}

void rms_norm(const float *x, const float *w, float *out, int64_t rows, int64_t dim, float eps,
              int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (rows > 16)
    for (int64_t r = 0; r < rows; r++) norm_row(x + r * dim, w, 0, out + r * dim, dim, 0, eps);
}

/* Turn the first R dims of each of `heads` heads (D apart) of one row by one position's
 * angles c, s [R] ("rotate half": dims i and i + R/2 as a pair). */
static void rope_row(float *x, int64_t heads, int64_t D, int64_t R, const float *c,
                     const float *s) {
    const int64_t half = R / 2;
    for (int64_t h = 0; h < heads; h++) {
        float *v = x + h * D;
#pragma omp simd
        for (int64_t i = 0; i < half; i++) {
            const float a = v[i], b = v[i + half];
            v[i] = a * c[i] - b * s[i];
            v[i + half] = b * c[i + half] + a * s[i + half];
        }
    }
}

int64_t rope_rows(float *x, int64_t rows, int64_t row_stride, int64_t heads, int64_t D,
                  int64_t R, const int64_t *positions, const float *cos_table,
                  const float *sin_table, int64_t table_len, int threads) {
    for (int64_t r = 0; r < rows; r++)
        if (positions[r] < 0 || positions[r] >= table_len) return r;
#pragma omp parallel for schedule(static) num_threads(threads) if (rows > 16)
    for (int64_t r = 0; r < rows; r++)
        rope_row(x + r * row_stride, heads, D, R, cos_table + positions[r] * R,
                 sin_table + positions[r] * R);
    return -1;
}

/* ---- decode_stack: a decode step through every block of a model, in one call ---- */

/* One block's tensors; NULL where the model has none (biases, LayerNorm's shift). The
 * products' weights are column panels (pack_panels); k_cache and v_cache are the layer's
 * whole cache, strides as in decode_attention. */
struct block_weights {
    const float *norm1_w, *norm1_b;
    const void *qkv;
    const float *qkv_bias;
    const void *o;
    const float *o_bias, *norm2_w, *norm2_b;
    const void *w_in;
    const float *in_bias;
    const void *w_out;
    const float *out_bias;
    float *k_cache, *v_cache;
    /* NULL for fp32 panels; with int8 panels (matmul_panels_q8), their block scales */
    const uint16_t *qkv_scales, *o_scales, *in_scales, *out_scales;
};

enum { MLP_SWIGLU = 0, MLP_GELU_TANH = 1, MLP_GELU_ERF = 2 };

/* The shapes every block shares. R = 0: no rotary embedding (learned or sinusoidal
 * positions were added to the embeddings). */
struct stack_shape {
    int64_t rows, C, H, K, D, F, R, n_slots, max_len, slot_stride, head_stride, pos_stride;
    int64_t table_len, layer_norm, mlp, parallel_residual;
    float eps, scale;
};

/* Floats of scratch decode_stack needs for `rows` rows (the caller allocates it). */
int64_t decode_stack_scratch(const struct stack_shape *s) {
    const int64_t in = s->mlp == MLP_SWIGLU ? 2 * s->F : s->F;
    return s->rows * (2 * s->C + (s->H + 2 * s->K) * s->D + s->H * s->D + in + s->F);
}

/* x [rows, C] (the embedded tokens, updated in place to the last block's output) through
 * n_layers blocks, one token per row at positions[b] in cache slot slots[b]: each block
 * is norm -> q|k|v product -> RoPE -> this token's key and value stored in the cache ->
 * attention over positions [0, positions[b]] -> output product added to x -> norm -> MLP
 * -> its output added to x (with parallel_residual both norms read the block's input).
 * The same numbers as those steps one call at a time (the kernels above, in the same
 * order of operations), but in one OpenMP region: no interpreter, no allocation and no
 * thread wake-up between the steps, only a barrier where a step needs the previous one's
 * whole result. Checks every slot and position first and returns the first row out of
 * range (-1 when all are in), having changed nothing. */
int64_t decode_stack(const struct block_weights *layers, int64_t n_layers,
                     const struct stack_shape *s, float *x, float *scratch,
                     const int64_t *slots, const int64_t *positions, const float *cos_table,
                     const float *sin_table, int threads) {
    const int64_t B = s->rows, C = s->C, H = s->H, K = s->K, D = s->D, F = s->F;
    const int64_t QKV = (H + 2 * K) * D, A = H * D, IN = s->mlp == MLP_SWIGLU ? 2 * F : F;
    if (B < 1) return -1;
    for (int64_t b = 0; b < B; b++)
        if (slots[b] < 0 || slots[b] >= s->n_slots || positions[b] < 0 ||
            positions[b] >= s->max_len || (s->R && positions[b] >= s->table_len))
            return b;
    float *normed = scratch, *normed2 = normed + B * C, *qkv = normed2 + B * C;
    float *attn = qkv + B * QKV, *hidden = attn + B * A, *act = hidden + B * IN;
    int64_t lengths[B]; /* what each row attends to: its own position and those before */
    for (int64_t b = 0; b < B; b++) lengths[b] = positions[b] + 1;
    const int64_t chunks = (H / K + GQ - 1) / GQ;
#define PANELS(n) (((n) + NR - 1) / NR)
#pragma omp parallel num_threads(threads)
    for (int64_t l = 0; l < n_layers; l++) {
        const struct block_weights *w = layers + l;
#pragma omp for schedule(static)
        for (int64_t b = 0; b < B; b++) {
            norm_row(x + b * C, w->norm1_w, w->norm1_b, normed + b * C, C, s->layer_norm, s->eps);
            if (s->parallel_residual) /* the MLP reads the block's input too */
                norm_row(x + b * C, w->norm2_w, w->norm2_b, normed2 + b * C, C, s->layer_norm,
                         s->eps);
        }
#pragma omp for schedule(static)
        for (int64_t p = 0; p < PANELS(QKV); p++)
            multiply_panel(normed, w->qkv, w->qkv_scales, w->qkv_bias, qkv, B, C, QKV, STORE, p);
#pragma omp single /* one thread, in row order: rows sharing a slot see the last write */
        for (int64_t b = 0; b < B; b++) {
            float *row = qkv + b * QKV;
            if (s->R)
                rope_row(row, H + K, D, s->R, cos_table + positions[b] * s->R,
                         sin_table + positions[b] * s->R);
            for (int64_t h = 0; h < K; h++) {
                const int64_t at =
                    slots[b] * s->slot_stride + h * s->head_stride + positions[b] * s->pos_stride;
                memcpy(w->k_cache + at, row + (H + h) * D, D * sizeof(float));
                memcpy(w->v_cache + at, row + (H + K + h) * D, D * sizeof(float));
            }
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < B * K * chunks; task++)
            attend_task(qkv, QKV, w->k_cache, w->v_cache, attn, slots, lengths, H, K, D,
                        s->slot_stride, s->head_stride, s->pos_stride, s->scale, task);
#pragma omp for schedule(static)
        for (int64_t p = 0; p < PANELS(C); p++)
            multiply_panel(attn, w->o, w->o_scales, w->o_bias, x, B, A, C, ADD_TO_Y, p);
        if (!s->parallel_residual) {
#pragma omp for schedule(static)
            for (int64_t b = 0; b < B; b++)
                norm_row(x + b * C, w->norm2_w, w->norm2_b, normed2 + b * C, C, s->layer_norm,
                         s->eps);
        }
#pragma omp for schedule(static)
        for (int64_t p = 0; p < PANELS(IN); p++)
            multiply_panel(normed2, w->w_in, w->in_scales, w->in_bias, hidden, B, C, IN,
                           s->mlp == MLP_GELU_TANH ? STORE_GELU : STORE, p);
        const float *mlp_in = hidden;
        if (s->mlp != MLP_GELU_TANH) {
            mlp_in = act;
#pragma omp for schedule(static)
            for (int64_t i = 0; i < B * F; i++) {
                const int64_t b = i / F, j = i % F;
                const float g = hidden[b * IN + j];
                act[i] = s->mlp == MLP_SWIGLU ? g / (1.f + expf(-g)) * hidden[b * IN + F + j]
                                              : 0.5f * g * (1.f + erff(g * 0.70710678118654752f));
            }
        }
#pragma omp for schedule(static)
        for (int64_t p = 0; p < PANELS(C); p++)
            multiply_panel(mlp_in, w->w_out, w->out_scales, w->out_bias, x, B, F, C, ADD_TO_Y, p);
    }
#undef PANELS
    return -1;
}
