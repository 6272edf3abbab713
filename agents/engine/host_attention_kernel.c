/* Decode attention of (sequence, KV-head range) items over a paged KV cache in host memory.

   Why hand-written: torch's CPU flash kernel runs a GQA decode (4 query rows per KV head) at
   ~2 GB/s of KV per core (bench/host_attention_bench.py): its small GEMMs and per-tile softmax
   dominate. Here each KV row is read once, converted to fp32 in registers and used by every
   query head of its group: the scores with one 8-float accumulator per query head, the values
   in register tiles of 4 x 8 floats per query head, an online softmax per 16-token block (its
   exp a branch-free polynomial, so the compiler vectorises it). An item's KV heads are walked
   block by block (all its heads of one block, then the next block, prefetched meanwhile), so
   the reads stream through memory instead of striding across it once per head (1.7x here).
   Built by host_attention.py with the system C compiler (-O3 -march=native; GCC/Clang
   vector extensions) and called through ctypes, which releases the GIL: each pool thread
   runs its shard of items here.

   Layout (the engine's PagedKVCache, one layer): cache[block][slot][kv_head][head_dim].
   q and out: [rows][kv_heads * group][head_dim] fp32, q pre-scaled by the softmax scale.
   items: per item {row, context_len, head_first, head_end}; tables: [rows][width] int64.
   Returns 0, or -1 for a shape outside the limits below (the caller raises). The exported
   functions dispatch on the group size so that groups of 1, 2, 4 and 8 compile with a constant
   group: their accumulators then stay in registers (~1.5x the scan rate of a runtime group). */

#include <math.h>
#include <stdint.h>
#include <string.h>

typedef float f8 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));

#define MAX_GROUP 8
#define MAX_HEAD_DIM 256
#define MAX_BLOCK 64
#define TILE 4      /* 8-float vectors of the values per pass: TILE x group accumulators */
#define MAX_HEADS 8 /* KV heads of one item scanned together, block by block */

static inline f8 load_bf16(const uint16_t *p) {
    u16x8 raw;
    memcpy(&raw, p, sizeof raw);
    u32x8 wide = __builtin_convertvector(raw, u32x8) << 16;
    f8 out;
    memcpy(&out, &wide, sizeof out);
    return out;
}

static inline f8 load_f32(const float *p) {
    f8 out;
    memcpy(&out, p, sizeof out);
    return out;
}

static inline float hsum(f8 v) {
    float s = 0.0f;
    for (int i = 0; i < 8; i++) s += v[i];
    return s;
}

/* e^x for x <= 0 (-inf and below -87 give ~0): 2^(x log2 e), the fraction's power by a degree-6
   polynomial (relative error ~1e-7). */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float t = x * 1.44269504f, n = floorf(t), f = t - n;
    float p = 1.535336188319500e-4f;
    p = p * f + 1.339887440266574e-3f;
    p = p * f + 9.618437357674640e-3f;
    p = p * f + 5.550332471162809e-2f;
    p = p * f + 2.402264791363012e-1f;
    p = p * f + 6.931472028550421e-1f;
    p = p * f + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

#define DEFINE_SCAN(NAME, ELEM, LOAD)                                                          \
    static inline __attribute__((always_inline)) int NAME##_body(                              \
        const ELEM *k_cache, const ELEM *v_cache, int64_t block_size, int64_t kv_heads,        \
        int64_t head_dim, const int64_t group, const float *q, float *out,                     \
        const int64_t *items, int64_t n_items, const int64_t *tables, int64_t width) {         \
        if (group > MAX_GROUP || head_dim > MAX_HEAD_DIM || head_dim % (8 * TILE)              \
            || block_size > MAX_BLOCK)                                                         \
            return -1;                                                                         \
        const int64_t token_stride = kv_heads * head_dim;                                      \
        const int64_t block_stride = block_size * token_stride, nv = head_dim / 8;             \
        float scores[MAX_GROUP][MAX_BLOCK];                                                    \
        f8 qv[MAX_HEADS][MAX_GROUP][MAX_HEAD_DIM / 8];                                         \
        f8 acc[MAX_HEADS][MAX_GROUP][MAX_HEAD_DIM / 8];                                        \
        float m[MAX_HEADS][MAX_GROUP], l[MAX_HEADS][MAX_GROUP];                                \
        for (int64_t it = 0; it < n_items; it++) {                                             \
            const int64_t seq = items[4 * it], len = items[4 * it + 1];                        \
            const int64_t *table = tables + seq * width;                                       \
            for (int64_t h0 = items[4 * it + 2]; h0 < items[4 * it + 3]; h0 += MAX_HEADS) {    \
                const int64_t h1 = h0 + MAX_HEADS < items[4 * it + 3] ? h0 + MAX_HEADS         \
                                                                      : items[4 * it + 3];     \
                for (int64_t h = h0; h < h1; h++) {                                            \
                    const float *qh = q + (seq * kv_heads * group + h * group) * head_dim;     \
                    for (int64_t g = 0; g < group; g++) {                                      \
                        m[h - h0][g] = -INFINITY;                                              \
                        l[h - h0][g] = 0.0f;                                                   \
                        for (int64_t c = 0; c < nv; c++) {                                     \
                            qv[h - h0][g][c] = load_f32(qh + g * head_dim + 8 * c);            \
                            acc[h - h0][g][c] = (f8){0};                                       \
                        }                                                                      \
                    }                                                                          \
                }                                                                              \
                const int64_t span = (h1 - h0) * head_dim * (int64_t)sizeof(ELEM);             \
                for (int64_t start = 0; start < len; start += block_size) {                    \
                    const int64_t n = len - start < block_size ? len - start : block_size;     \
                    const int64_t block = table[start / block_size];                           \
                    if (start + block_size < len) { /* the next block, while this one runs */  \
                        const int64_t next = table[start / block_size + 1] * block_stride      \
                                             + h0 * head_dim;                                  \
                        for (int64_t t = 0; t < block_size; t++)                               \
                            for (int64_t b = 0; b < span; b += 64) {                           \
                                __builtin_prefetch((const char *)(k_cache + next               \
                                                   + t * token_stride) + b);                   \
                                __builtin_prefetch((const char *)(v_cache + next               \
                                                   + t * token_stride) + b);                   \
                            }                                                                  \
                    }                                                                          \
                    for (int64_t h = h0; h < h1; h++) {                                        \
                        const int64_t base = block * block_stride + h * head_dim;              \
                        f8 (*qh)[MAX_HEAD_DIM / 8] = qv[h - h0];                               \
                        f8 (*ah)[MAX_HEAD_DIM / 8] = acc[h - h0];                              \
                        for (int64_t t = 0; t < n; t++) {                                      \
                            const ELEM *kr = k_cache + base + t * token_stride;                \
                            f8 s[MAX_GROUP];                                                   \
                            for (int64_t g = 0; g < group; g++) s[g] = (f8){0};                \
                            for (int64_t c = 0; c < nv; c++) {                                 \
                                const f8 kv = LOAD(kr + 8 * c);                                \
                                for (int64_t g = 0; g < group; g++) s[g] += qh[g][c] * kv;     \
                            }                                                                  \
                            for (int64_t g = 0; g < group; g++) scores[g][t] = hsum(s[g]);     \
                        }                                                                      \
                        for (int64_t g = 0; g < group; g++) {                                  \
                            float top = m[h - h0][g];                                          \
                            for (int64_t t = 0; t < n; t++)                                    \
                                top = scores[g][t] > top ? scores[g][t] : top;                 \
                            const float alpha = exp_nonpositive(m[h - h0][g] - top);           \
                            float sum = 0.0f;                                                  \
                            for (int64_t t = 0; t < n; t++) {                                  \
                                const float p = exp_nonpositive(scores[g][t] - top);           \
                                scores[g][t] = p;                                              \
                                sum += p;                                                      \
                            }                                                                  \
                            l[h - h0][g] = l[h - h0][g] * alpha + sum;                         \
                            m[h - h0][g] = top;                                                \
                            for (int64_t c = 0; c < nv; c++) ah[g][c] *= alpha;                \
                        }                                                                      \
                        for (int64_t c0 = 0; c0 < nv; c0 += TILE) {                            \
                            f8 a[MAX_GROUP][TILE];                                             \
                            for (int64_t g = 0; g < group; g++)                                \
                                for (int j = 0; j < TILE; j++) a[g][j] = ah[g][c0 + j];        \
                            for (int64_t t = 0; t < n; t++) {                                  \
                                const ELEM *vr = v_cache + base + t * token_stride + 8 * c0;   \
                                f8 vv[TILE];                                                   \
                                for (int j = 0; j < TILE; j++) vv[j] = LOAD(vr + 8 * j);       \
                                for (int64_t g = 0; g < group; g++) {                          \
                                    const float p = scores[g][t];                              \
                                    for (int j = 0; j < TILE; j++) a[g][j] += p * vv[j];       \
                                }                                                              \
                            }                                                                  \
                            for (int64_t g = 0; g < group; g++)                                \
                                for (int j = 0; j < TILE; j++) ah[g][c0 + j] = a[g][j];        \
                        }                                                                      \
                    }                                                                          \
                }                                                                              \
                for (int64_t h = h0; h < h1; h++) {                                            \
                    float *oh = out + (seq * kv_heads * group + h * group) * head_dim;         \
                    for (int64_t g = 0; g < group; g++) {                                      \
                        const float inv = 1.0f / l[h - h0][g];                                 \
                        for (int64_t c = 0; c < nv; c++) {                                     \
                            const f8 o = acc[h - h0][g][c] * inv;                              \
                            memcpy(oh + g * head_dim + 8 * c, &o, sizeof o);                   \
                        }                                                                      \
                    }                                                                          \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
        return 0;                                                                              \
    }                                                                                          \
    int NAME(const ELEM *k_cache, const ELEM *v_cache, int64_t block_size, int64_t kv_heads,   \
             int64_t head_dim, int64_t group, const float *q, float *out,                      \
             const int64_t *items, int64_t n_items, const int64_t *tables, int64_t width) {    \
        switch (group) {                                                                       \
        case 1:                                                                                \
            return NAME##_body(k_cache, v_cache, block_size, kv_heads, head_dim, 1, q, out,    \
                               items, n_items, tables, width);                                 \
        case 2:                                                                                \
            return NAME##_body(k_cache, v_cache, block_size, kv_heads, head_dim, 2, q, out,    \
                               items, n_items, tables, width);                                 \
        case 4:                                                                                \
            return NAME##_body(k_cache, v_cache, block_size, kv_heads, head_dim, 4, q, out,    \
                               items, n_items, tables, width);                                 \
        case 8:                                                                                \
            return NAME##_body(k_cache, v_cache, block_size, kv_heads, head_dim, 8, q, out,    \
                               items, n_items, tables, width);                                 \
        default:                                                                               \
            return NAME##_body(k_cache, v_cache, block_size, kv_heads, head_dim, group, q,     \
                               out, items, n_items, tables, width);                            \
        }                                                                                      \
    }

DEFINE_SCAN(scan_bf16, uint16_t, load_bf16)
DEFINE_SCAN(scan_f32, float, load_f32)
