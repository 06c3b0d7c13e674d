// Decode tokens written into a paged KV cache, one slot per (row, KV head), with the slot's bookkeeping:
// momentkv/core/paged_write.py (PagedWrite) calls it through ctypes, one call per layer and step.
//
// The cache is float32 blocks [num_blocks][kv_heads][2 * block_size * head_size], as paged_probs.cpp reads it:
// per (block, KV head) the keys (row-major [block_size][head_size], or transposed [head_size][block_size]), then
// the values (row-major). Slot s is block s / block_size, offset s % block_size. For each row r and KV head h,
// with s = slots[r][h]:
//   key[tokens[r]][h] goes to the keys of (block, h) at the offset, value[tokens[r]][h] to its values;
//   positions[s][h] = now[r] (the token's sequence index);
//   every state pool's entry of (s, h) becomes 0 (a new token's scores start afresh), in every channel.
// Plain copies: the cache holds the bits of key and value.

#include <cstdint>

namespace {

template <typename T>
T pointer(int64_t v) {
    return reinterpret_cast<T>(static_cast<intptr_t>(v));
}

}  // namespace

// The argument block, int64 each: 0 cache, 1 block stride, 2 head stride (elements), 3 blocks, 4 kv heads,
// 5 block size, 6 head size, 7 keys transposed, 8 key, 9 its token stride, 10 its head stride, 11 value,
// 12 its token stride, 13 its head stride, 14 tokens (rows), 15 rows, 16 tokens in key and value, 17 slots
// ([rows][kv heads], contiguous), 18 positions ([blocks * block size][kv heads] int64, or 0), 19 now (rows),
// 20 state pools (an array of addresses of float32 [channels][blocks * block size][kv heads]), 21 their channels
// (an int64 array), 22 pools.
// Returns 0; 1 on bad sizes; 2 when a token or slot lies outside its tensor (checked first: nothing written).
extern "C" int momentkv_paged_write(const int64_t* block) noexcept {
    float* cache = pointer<float*>(block[0]);
    const int64_t block_stride = block[1], head_stride = block[2], blocks = block[3], heads = block[4];
    const int64_t bs = block[5], d = block[6], transposed = block[7];
    const float* key = pointer<const float*>(block[8]);
    const int64_t key_token = block[9], key_head = block[10];
    const float* value = pointer<const float*>(block[11]);
    const int64_t value_token = block[12], value_head = block[13];
    const int64_t* tokens = pointer<const int64_t*>(block[14]);
    const int64_t rows = block[15], num_tokens = block[16];
    const int64_t* slots = pointer<const int64_t*>(block[17]);
    int64_t* positions = pointer<int64_t*>(block[18]);
    const int64_t* now = pointer<const int64_t*>(block[19]);
    float* const* pools = pointer<float* const*>(block[20]);
    const int64_t* channels = pointer<const int64_t*>(block[21]);
    const int64_t num_pools = block[22];
    if (blocks <= 0 || heads <= 0 || bs <= 0 || d <= 0 || rows < 0 || num_pools < 0) return 1;
    const int64_t num_slots = blocks * bs;
    for (int64_t r = 0; r < rows; ++r) {
        if (tokens[r] < 0 || tokens[r] >= num_tokens) return 2;
        for (int64_t h = 0; h < heads; ++h) {
            const int64_t s = slots[r * heads + h];
            if (s < 0 || s >= num_slots) return 2;
        }
    }
    for (int64_t r = 0; r < rows; ++r) {
        const float* key_row = key + tokens[r] * key_token;
        const float* value_row = value + tokens[r] * value_token;
        for (int64_t h = 0; h < heads; ++h) {
            const int64_t s = slots[r * heads + h], b = s / bs, offset = s % bs;
            float* keys = cache + b * block_stride + h * head_stride;
            float* values = keys + bs * d;
            const float* k = key_row + h * key_head;
            const float* v = value_row + h * value_head;
            if (transposed) {
                for (int64_t i = 0; i < d; ++i) keys[i * bs + offset] = k[i];
            } else {
                for (int64_t i = 0; i < d; ++i) keys[offset * d + i] = k[i];
            }
            for (int64_t i = 0; i < d; ++i) values[offset * d + i] = v[i];
            if (positions != nullptr) positions[s * heads + h] = now[r];
            for (int64_t p = 0; p < num_pools; ++p) {
                for (int64_t c = 0; c < channels[p]; ++c) pools[p][(c * num_slots + s) * heads + h] = 0.0f;
            }
        }
    }
    return 0;
}
