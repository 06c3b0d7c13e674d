// Decode attention probabilities read straight from a paged KV cache, averaged over each GQA group, for the
// slots a scorer folds: momentkv/core/paged_probs.py (PagedProbs) calls it through ctypes, one call per layer.
//
// The cache is float32 blocks [num_blocks][kv_heads][2 * block_size * head_size]: per (block, KV head) the keys
// first (row-major [block_size][head_size], or transposed [head_size][block_size]), then the values (row-major
// [block_size][head_size]; read only where the attention's output is asked for).
// A row r holds lengths[r] tokens at physical indices 0 .. lengths[r]-1, index i in block
// blocks[r][i / block_size] at offset i % block_size. For each row and KV head h the step
//   1. computes every query head j of the group (query head h * groups + j) against every stored key:
//      l = (q . k) * scale, float32 products and sums;
//   2. takes the softmax over the row's tokens: m = max l, s = sum exp(l - m) (a double sum), p = exp(l - m) / s;
//   3. writes out[r][h][i] = (sum over j of p at index first[r] + i) * (1 / groups) for i < held: the mean over
//      the group, summed in j order and then scaled, as momentkv.core.group_attention.group_mean does;
//   4. where an output is given, writes each query head's attention output o = sum over t of p_t v_t (float32,
//      in token order) into it: the decode attention itself, so that one pass over the keys serves both.
// exp is a polynomial (range reduction by ln 2, degree 7): within a few ulp of the exact value for arguments in
// [-87.34, 0] and 0 below (an error under 2^-126), written so that the compiler vectorises it; the result is a
// softmax within float32 rounding of the exact one, not bit for bit equal to torch's.
// The (row, KV head) pairs are shared among OpenMP threads (as many as the caller names: torch's intra-op count,
// on the OpenMP runtime torch has loaded); each pair is computed by one thread, so the result does not depend on
// their number. Every index is checked before anything is written.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
inline size_t thread_id() { return static_cast<size_t>(omp_get_thread_num()); }  // in the current team
#else
inline size_t thread_id() { return 0; }
#endif

namespace {

// exp(x) for x <= 0 (a logit minus its row's max); 0 below -87.34 (where exp(x) < 2^-126, the least normal float);
// NaN for a NaN, so that a NaN logit makes its row NaN, as torch's softmax does.
inline float exp_nonpositive(float x) {
    const float keep = x >= -87.34f ? 1.0f : (x < -87.34f ? 0.0f : x);  // 0 below the cut, NaN for a NaN
    x = x >= -87.34f ? x : -87.34f;  // a NaN takes the cut too, so the conversion below stays defined
    const float t = x * 1.44269504088896341f;
    const int32_t n = static_cast<int32_t>(t - 0.5f);  // t <= 0: rounds to nearest, up to ties
    const float fn = static_cast<float>(n);
    const float r = (x - fn * 0.693145751953125f) - fn * 1.428606765330187045e-06f;  // |r| <= ln 2 / 2 + ulp
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const uint32_t bits = static_cast<uint32_t>(n + 127) << 23;  // n in [-126, 0]: x >= -87.34 makes t - 0.5 > -127
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return p * scale * keep;
}

struct Args {
    const float* cache;
    int64_t block_stride, head_stride, kv_heads, block_size, head_size, transposed;
    const float* query;
    int64_t query_token_stride, query_head_stride;
    const int64_t* tokens;
    int64_t rows;
    const int64_t* blocks;
    int64_t blocks_row_stride;
    const int64_t* lengths;
    const int64_t* first;
    int64_t held, groups;
    float scale;
    float* out;
    float* attention;  // [tokens][heads][head_size] with the strides below, or null
    int64_t attention_token_stride, attention_head_stride;
    int64_t num_blocks, num_tokens, blocks_per_row, threads;
};

// Logits of the `groups` query heads `q` ([groups][head_size]) against one block's keys: logits[j][t] for t < count.
// Transposed keys with a block of BS and a group of G query heads (compile-time sizes): the G rows of BS logits
// stay in registers while the key rows stream past once.
template <int BS, int G>
void block_logits_group(const Args& a, const float* __restrict keys, const float* const* q, float* const* logits,
                        int64_t count) {
    float acc[G][BS] = {};
    for (int64_t k = 0; k < a.head_size; ++k) {
        const float* __restrict row = keys + k * BS;
        float qk[G];
        for (int j = 0; j < G; ++j) qk[j] = q[j][k];
#pragma omp simd
        for (int t = 0; t < BS; ++t) {
            const float key = row[t];
            for (int j = 0; j < G; ++j) acc[j][t] += qk[j] * key;
        }
    }
    for (int j = 0; j < G; ++j) {
        float* __restrict out = logits[j];
        for (int64_t t = 0; t < count; ++t) out[t] = acc[j][t] * a.scale;
    }
}

// Transposed keys with a block of BS: groups of up to four query heads per pass over the keys.
template <int BS>
void block_logits_transposed(const Args& a, const float* keys, const float* const* q, float* const* logits,
                             int64_t count) {
    int64_t j = 0;
    for (; j + 4 <= a.groups; j += 4) block_logits_group<BS, 4>(a, keys, q + j, logits + j, count);
    switch (a.groups - j) {
        case 3: block_logits_group<BS, 3>(a, keys, q + j, logits + j, count); break;
        case 2: block_logits_group<BS, 2>(a, keys, q + j, logits + j, count); break;
        case 1: block_logits_group<BS, 1>(a, keys, q + j, logits + j, count); break;
        default: break;
    }
}

void block_logits(const Args& a, const float* keys, const float* const* q, float* const* logits, int64_t count) {
    const int64_t d = a.head_size, bs = a.block_size;
    if (a.transposed && bs == 32) return block_logits_transposed<32>(a, keys, q, logits, count);
    if (a.transposed && bs == 16) return block_logits_transposed<16>(a, keys, q, logits, count);
    for (int64_t j = 0; j < a.groups; ++j) {
        const float* qj = q[j];
        float* lj = logits[j];
        if (a.transposed) {  // keys[k][t]: accumulate over k, vectorised over t
            for (int64_t t = 0; t < count; ++t) lj[t] = 0.0f;
            for (int64_t k = 0; k < d; ++k) {
                const float qk = qj[k];
                const float* row = keys + k * bs;
#pragma omp simd
                for (int64_t t = 0; t < count; ++t) lj[t] += qk * row[t];
            }
        } else {  // keys[t][k]: one dot product per token
            for (int64_t t = 0; t < count; ++t) {
                const float* key = keys + t * d;
                float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
                for (int64_t k = 0; k < d; ++k) acc += qj[k] * key[k];
                lj[t] = acc;
            }
        }
#pragma omp simd
        for (int64_t t = 0; t < count; ++t) lj[t] *= a.scale;
    }
}

// o_j[k] = sum over t < length of p_j[t] * v_t[k] for the G query heads j of one KV head, the values read block by
// block where they lie (after the keys), each value row once for the whole group, in token order; D and G fixed
// at compile time so that the G accumulators stay in registers.
template <int D, int G>
void attend_values_group(const Args& a, const int64_t* table, int64_t h, const float* const* p, int64_t length,
                         float* const* o) {
    const int64_t bs = a.block_size;
    float acc[G][D] = {};
    for (int64_t b = 0; b * bs < length; ++b) {
        const int64_t count = std::min(bs, length - b * bs);
        const float* values = a.cache + table[b] * a.block_stride + h * a.head_stride + bs * D;
        for (int64_t t = 0; t < count; ++t) {
            const float* __restrict v = values + t * D;
            for (int j = 0; j < G; ++j) {
                const float weight = p[j][b * bs + t];
#pragma omp simd
                for (int k = 0; k < D; ++k) acc[j][k] += weight * v[k];
            }
        }
    }
    for (int j = 0; j < G; ++j) std::memcpy(o[j], acc[j], sizeof acc[j]);
}

// Any head size: one query head at a time, the sum in a local buffer.
void attend_values_one(const Args& a, const int64_t* table, int64_t h, const float* p, int64_t length, float* o,
                       float* acc) {
    const int64_t d = a.head_size, bs = a.block_size;
    for (int64_t k = 0; k < d; ++k) acc[k] = 0.0f;
    for (int64_t b = 0; b * bs < length; ++b) {
        const int64_t count = std::min(bs, length - b * bs);
        const float* values = a.cache + table[b] * a.block_stride + h * a.head_stride + bs * d;
        const float* pb = p + b * bs;
        for (int64_t t = 0; t < count; ++t) {
            const float weight = pb[t];
            const float* __restrict v = values + t * d;
#pragma omp simd
            for (int64_t k = 0; k < d; ++k) acc[k] += weight * v[k];
        }
    }
    std::memcpy(o, acc, static_cast<size_t>(d) * sizeof(float));
}

// Query heads `p`/`o` of one KV head, in groups the register blocking fits (4 x 64 or 2 x 128 accumulators).
template <int D, int MaxG>
void attend_values_fixed(const Args& a, const int64_t* table, int64_t h, const float* const* p, int64_t length,
                         float* const* o) {
    int64_t j = 0;
    for (; j + MaxG <= a.groups; j += MaxG) attend_values_group<D, MaxG>(a, table, h, p + j, length, o + j);
    switch (a.groups - j) {
        case 3: attend_values_group<D, 3>(a, table, h, p + j, length, o + j); break;
        case 2: attend_values_group<D, 2>(a, table, h, p + j, length, o + j); break;
        case 1: attend_values_group<D, 1>(a, table, h, p + j, length, o + j); break;
        default: break;
    }
}

void attend_values(const Args& a, const int64_t* table, int64_t h, const float* const* p, int64_t length,
                   float* const* o, float* acc) {
    if (a.head_size == 64) return attend_values_fixed<64, 4>(a, table, h, p, length, o);
    if (a.head_size == 128) return attend_values_fixed<128, 2>(a, table, h, p, length, o);
    for (int64_t j = 0; j < a.groups; ++j) attend_values_one(a, table, h, p[j], length, o[j], acc);
}

// 0 when every row's indices lie inside the tensors the call was given, else the status naming the first problem:
// 2 a row's scored slots outside its stored tokens, 4 a query index outside the step's tokens, 5 a row storing
// more tokens than its block table holds, 6 a block id outside the cache (only the blocks a row reads).
int check(const Args& a) {
    for (int64_t r = 0; r < a.rows; ++r) {
        const int64_t length = a.lengths[r], first = a.first[r];
        if (length <= 0 || first < 0 || a.held > length || first > length - a.held) return 2;  // no overflow
        if (a.tokens[r] < 0 || a.tokens[r] >= a.num_tokens) return 4;
        if (length > a.blocks_per_row * a.block_size) return 5;
        const int64_t* table = a.blocks + r * a.blocks_row_stride;
        for (int64_t b = 0; b * a.block_size < length; ++b) {
            if (table[b] < 0 || table[b] >= a.num_blocks) return 6;
        }
    }
    return 0;
}

// One row r and KV head h: the logits of the group's query heads, their softmax, the scored slots' group mean
// into out, and (where asked) each query head's attention output. logits: groups * padded floats, acc:
// head_size floats (scratch).
void one_head(const Args& a, int64_t r, int64_t h, int64_t padded, float* logits_buffer, float* acc) {
    const int64_t g = a.groups, length = a.lengths[r], first = a.first[r];
    constexpr int64_t kMaxGroups = 64;
    const float* q[kMaxGroups];
    float* logits[kMaxGroups];
    const float* query = a.query + a.tokens[r] * a.query_token_stride;
    const int64_t* table = a.blocks + r * a.blocks_row_stride;
    for (int64_t j = 0; j < g; ++j) q[j] = query + (h * g + j) * a.query_head_stride;
    for (int64_t b = 0; b * a.block_size < length; ++b) {
        const int64_t count = std::min(a.block_size, length - b * a.block_size);
        const float* keys = a.cache + table[b] * a.block_stride + h * a.head_stride;
        for (int64_t j = 0; j < g; ++j) logits[j] = logits_buffer + j * padded + b * a.block_size;
        block_logits(a, keys, q, logits, count);
    }
    float* out = a.out + (r * a.kv_heads + h) * a.held;
    for (int64_t i = 0; i < a.held; ++i) out[i] = 0.0f;
    for (int64_t j = 0; j < g; ++j) {
        float* l = logits_buffer + j * padded;
        logits[j] = l;
        float peak = l[0];
#pragma omp simd reduction(max : peak)
        for (int64_t t = 1; t < length; ++t) peak = l[t] > peak ? l[t] : peak;
        double total = 0.0;
#pragma omp simd reduction(+ : total)
        for (int64_t t = 0; t < length; ++t) {
            const float e = exp_nonpositive(l[t] - peak);
            l[t] = e;
            total += e;
        }
        const float inverse = static_cast<float>(1.0 / total);
#pragma omp simd
        for (int64_t t = 0; t < length; ++t) l[t] *= inverse;
        for (int64_t i = 0; i < a.held; ++i) out[i] += l[first + i];
    }
    const float mean = 1.0f / static_cast<float>(g);
    for (int64_t i = 0; i < a.held; ++i) out[i] *= mean;
    if (a.attention != nullptr) {
        float* o[kMaxGroups];
        const float* p[kMaxGroups];
        float* row = a.attention + a.tokens[r] * a.attention_token_stride;
        for (int64_t j = 0; j < g; ++j) {
            o[j] = row + (h * g + j) * a.attention_head_stride;
            p[j] = logits[j];
        }
        attend_values(a, table, h, p, length, o, acc);
    }
}

// Every (row, KV head) pair, spread over `threads` OpenMP threads (each pair written by one thread, so the result
// does not depend on their number). Returns check's status, or 3 when the threads' scratch could not be allocated
// (made before anything is written: nothing written then). Rows must name distinct tokens (each writes its
// token's output).
int run(const Args& a) {
    const int status = check(a);
    if (status != 0) return status;
    int64_t padded = 0;
    for (int64_t r = 0; r < a.rows; ++r) {
        padded = std::max(padded, (a.lengths[r] + a.block_size - 1) / a.block_size * a.block_size);
    }
    const int64_t pairs = a.rows * a.kv_heads;
    const int64_t team = (a.threads > 1 && pairs > 1) ? std::min(a.threads, pairs) : 1;
    std::vector<std::vector<float>> logits(static_cast<size_t>(team)), acc(static_cast<size_t>(team));
    try {
        for (int64_t i = 0; i < team; ++i) {
            logits[i].resize(static_cast<size_t>(a.groups * padded));
            acc[i].resize(static_cast<size_t>(a.head_size));
        }
    } catch (...) {
        return 3;
    }
#pragma omp parallel for schedule(static, 1) num_threads(static_cast<int>(team)) if (team > 1)
    for (int64_t i = 0; i < pairs; ++i) {
        const size_t id = thread_id();
        one_head(a, i / a.kv_heads, i % a.kv_heads, padded, logits[id].data(), acc[id].data());
    }
    return 0;
}

template <typename T>
T pointer(int64_t v) {
    return reinterpret_cast<T>(static_cast<intptr_t>(v));
}

}  // namespace

// The argument block, int64 each: 0 cache, 1 block stride, 2 head stride (elements), 3 kv heads, 4 block size,
// 5 head size, 6 keys transposed, 7 query, 8 query token stride, 9 query head stride, 10 tokens (rows),
// 11 rows, 12 blocks, 13 blocks' row stride, 14 lengths (rows), 15 first (rows), 16 held, 17 groups,
// 18 scale (a float's bits), 19 out ([rows][kv heads][held], contiguous), 20 attention output (0: none),
// 21 its token stride, 22 its head stride (elements; its head_size elements contiguous), 23 blocks in the cache,
// 24 tokens in the query, 25 entries per row of the block table, 26 threads (OpenMP, at most).
// Returns 0, 1 on bad sizes, 3 when memory runs out, or check's status (2, 4, 5, 6: an index outside the tensors
// given; nothing written then).
extern "C" int momentkv_paged_probs(const int64_t* block) {
    Args a;
    a.cache = pointer<const float*>(block[0]);
    a.block_stride = block[1];
    a.head_stride = block[2];
    a.kv_heads = block[3];
    a.block_size = block[4];
    a.head_size = block[5];
    a.transposed = block[6];
    a.query = pointer<const float*>(block[7]);
    a.query_token_stride = block[8];
    a.query_head_stride = block[9];
    a.tokens = pointer<const int64_t*>(block[10]);
    a.rows = block[11];
    a.blocks = pointer<const int64_t*>(block[12]);
    a.blocks_row_stride = block[13];
    a.lengths = pointer<const int64_t*>(block[14]);
    a.first = pointer<const int64_t*>(block[15]);
    a.held = block[16];
    a.groups = block[17];
    const int32_t bits = static_cast<int32_t>(block[18]);
    std::memcpy(&a.scale, &bits, sizeof a.scale);
    a.out = pointer<float*>(block[19]);
    a.attention = pointer<float*>(block[20]);
    a.attention_token_stride = block[21];
    a.attention_head_stride = block[22];
    a.num_blocks = block[23];
    a.num_tokens = block[24];
    a.blocks_per_row = block[25];
    a.threads = block[26];
    if (a.threads <= 0) return 1;
    if (a.groups > 64) return 7;  // declined: the caller computes it
    if (a.kv_heads <= 0 || a.block_size <= 0 || a.head_size <= 0 || a.groups <= 0 || a.held < 0 || a.rows < 0)
        return 1;
    try {
        return run(a);
    } catch (const std::bad_alloc&) {
        return 3;
    } catch (...) {
        return 3;
    }
}
