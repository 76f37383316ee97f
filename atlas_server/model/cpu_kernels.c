/* Atlas's two native CPU kernels, fp32, for the memory-bound work of decoding.
 *
 * decode_attention: for every (row b, query head h), out[b, h] = softmax(q[b, h] .
 * K[slot_b, h/group, :len_b] * scale) V[slot_b, h/group, :len_b], with an online softmax
 * so keys and values are read once, in memory order, and only the len_b positions row b
 * owns (no padding to the batch's longest row, no mask, no gather copy). Rows are
 * independent: a row's result is the same whatever else is in the batch. Why: at batch 16
 * the general SDPA kernel reads the cache at well under half of DRAM bandwidth for
 * one-token queries (docs/benchmarks.md, bench/profile_step.py).
 *
 * matvec_rows: y = W x for a row-major W [n_out, n_in], one contiguous dot product per
 * output: every product of a batch-1 decode step (the tied embedding [V, C] as the head,
 * an [out, in] copy of each projection), which this plain loop streams faster than
 * oneDNN's packed kernel (`python bench/ceilings.py` prints both readers).
 *
 * Built by native.py with the system C compiler; OpenMP here is the runtime torch already
 * loaded (same soname), so the kernels share torch's threads. Layouts (element strides):
 * q and out [B, H, D] contiguous; k and v share strides (slot, head, pos) with D
 * contiguous; D <= 256. Callers validate every index.
 */
#include <math.h>
#include <stdint.h>

void decode_attention(const float *q, const float *k, const float *v, float *out,
                      const int64_t *slots, const int64_t *lengths, int64_t B, int64_t H,
                      int64_t K, int64_t D, int64_t slot_stride, int64_t head_stride,
                      int64_t pos_stride, float scale, int threads) {
    const int64_t group = H / K;
    /* dynamic: rows differ in length, so equal shares of (b, h) are unequal work */
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t bh = 0; bh < B * H; bh++) {
        const int64_t b = bh / H, h = bh % H;
        const int64_t offset = slots[b] * slot_stride + (h / group) * head_stride;
        const float *kp = k + offset, *vp = v + offset, *qp = q + bh * D;
        float query[256], acc[256];
        for (int64_t d = 0; d < D; d++) {
            query[d] = qp[d] * scale;
            acc[d] = 0.f;
        }
        float running_max = -INFINITY, denominator = 0.f;
        for (int64_t j = 0; j < lengths[b]; j++) {
            const float *key = kp + j * pos_stride, *value = vp + j * pos_stride;
            float score = 0.f;
#pragma omp simd reduction(+ : score)
            for (int64_t d = 0; d < D; d++) score += query[d] * key[d];
            if (score > running_max) { /* rescale what was summed under the old maximum */
                const float c = expf(running_max - score);
                denominator *= c;
#pragma omp simd
                for (int64_t d = 0; d < D; d++) acc[d] *= c;
                running_max = score;
            }
            const float p = expf(score - running_max);
            denominator += p;
#pragma omp simd
            for (int64_t d = 0; d < D; d++) acc[d] += p * value[d];
        }
        float *op = out + bh * D;
        for (int64_t d = 0; d < D; d++) op[d] = acc[d] / denominator;
    }
}

void matvec_rows(const float *w, const float *x, float *y, int64_t n_out, int64_t n_in,
                 int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t o = 0; o < n_out; o++) {
        const float *row = w + o * n_in;
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < n_in; i++) sum += row[i] * x[i];
        y[o] = sum;
    }
}
