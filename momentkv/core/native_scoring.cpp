// One layer's steady-state scoring step on the CPU, in one call: the arithmetic of
// momentkv/core/fused_scoring.py (FusedStep.__call__ and FusedStep.victim), row by row.
//
// A row is one (batch, kv head) of a layer: T evictable slots. For each row the step
//   1. folds this step's attention into every stateful part (ema: s = alpha * s + a; accumulated: s = s + a),
//      in place;
//   2. computes each part's output: recency -age, instantaneous a, the state (ema with bias correction
//      divided by 1 - alpha^(age + 1), written -expm1((age + 1) ln alpha), or by age + 1 when alpha = 1: the
//      caller says which, since alpha = 1 is decided on the policy's double, not on its float32 rounding);
//   3. normalises the parts that do not rank (none, sum, max, zscore) and sums them, weighted, in policy order;
//      ranks the others (stable: ties keep their slot order; NaN above every number, as torch sorts) as
//      i / (T - 1), sums the weighted ranks, and adds that sum last;
//   4. names the victim: the first slot of the lowest total, protected slots (the sinks after the prompt and the
//      `recent` newest, counting the token that arrives at now + 1) excluded; a NaN total is chosen first, as
//      torch's argmin does.
// Rounding: the fold, recency, the ranks, the max normalisation, the mean correction and the sums of the parts
// are the float32 operations torch performs, in its order (compiled without contraction into fused
// multiply-adds), so they are equal bit for bit. The decayed correction may round differently: ATen's
// vectorised `log_alpha + log_alpha * age` is one fused multiply-add where the CPU has one (two roundings here),
// and expm1f is not ATen's expm1; so may the sums of the sum and zscore normalisations (another order).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
inline size_t thread_id() { return static_cast<size_t>(omp_get_thread_num()); }  // in the current team
#else
inline size_t thread_id() { return 0; }
#endif

namespace {

enum Kind { EMA = 0, ACCUMULATED = 1, INSTANTANEOUS = 2, RECENCY = 3 };
enum Norm { NONE = 0, SUM = 1, MAX = 2, ZSCORE = 3, RANK = 4 };
enum Correction { UNCORRECTED = 0, MEAN = 1, DECAYED = 2 };  // none, divide by age + 1, by -expm1((age+1) ln a)

const int64_t kTableAges = int64_t(1) << 20;  // ages kept per ln alpha (4 MiB); older ones are computed

const float kEps = 1e-12f;

// A key whose unsigned order is torch's stable ascending order of float32 values: the value's order in the high
// 32 bits (-0 equal to +0, every NaN above +inf), the slot in the low 32 bits (ties keep their slot order).
inline uint64_t sort_key(float v, int64_t slot) {
    uint32_t bits;
    if (std::isnan(v)) {
        bits = 0xFFFFFFFFu;
    } else {
        if (v == 0.0f) v = 0.0f;
        std::memcpy(&bits, &v, sizeof bits);
        bits = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
    }
    return (static_cast<uint64_t>(bits) << 32) | static_cast<uint64_t>(slot);
}

// Row buffers of one thread.
struct Scratch {
    std::vector<float> out, rank_sum, age;
    std::vector<uint64_t> order;
    std::vector<uint32_t> high;
    std::vector<int32_t> rank_of;
    std::vector<int64_t> positions;  // paged: the row's positions, gathered
    std::vector<float> total;        // paged: the row's total, scattered at the end
    void resize(int64_t t, bool paged) {
        const size_t n = static_cast<size_t>(t);
        out.resize(n), rank_sum.resize(n), age.resize(n), order.resize(n), high.resize(n), rank_of.resize(n);
        if (paged) positions.resize(n), total.resize(n);
    }
};

// Calls with fewer rows x slots than this run on one thread (a team costs more than it saves).
const int64_t kParallelElements = 4096;

// Sort keys' ranks up to this many slots are counted (below), above it sorted.
const int64_t kCountedRanks = 1024;

// rank[i] = the position of slot i in the stable ascending order of `order` (the high halves of sort_key): the
// slots j that come before it, order[j] < order[i] or equal with j < i. The same permutation as sorting the keys,
// by t * t comparisons, 32 slots i at a time against each j so that they vectorise without a horizontal sum:
// for the few hundred slots of a budget, several times faster than a sort.
void ranks_by_count(const uint32_t* order, int64_t t, int32_t* rank) {
    constexpr int kWidth = 32;
    for (int64_t start = 0; start < t; start += kWidth) {
        uint32_t key[kWidth];
        int32_t slot[kWidth], below[kWidth];
        for (int k = 0; k < kWidth; ++k) {
            key[k] = start + k < t ? order[start + k] : 0u;
            slot[k] = static_cast<int32_t>(start + k);
            below[k] = 0;
        }
        // Slots before the block come first on a tie, slots after it second; inside it, compare the slots too.
        const int64_t end = std::min<int64_t>(start + kWidth, t);
        for (int64_t j = 0; j < start; ++j) {
            const uint32_t other = order[j];
#pragma omp simd
            for (int k = 0; k < kWidth; ++k) below[k] += other <= key[k] ? 1 : 0;
        }
        for (int64_t j = start; j < end; ++j) {
            const uint32_t other = order[j];
            const int32_t other_slot = static_cast<int32_t>(j);
#pragma omp simd
            for (int k = 0; k < kWidth; ++k) {
                const int32_t less = other < key[k], equal = other == key[k], earlier = other_slot < slot[k];
                below[k] += less | (equal & earlier);
            }
        }
        for (int64_t j = end; j < t; ++j) {
            const uint32_t other = order[j];
#pragma omp simd
            for (int k = 0; k < kWidth; ++k) below[k] += other < key[k] ? 1 : 0;
        }
        for (int k = 0; k < kWidth && start + k < t; ++k) rank[start + k] = below[k];
    }
}

void normalise(float* v, int64_t t, int how) {
    if (how == NONE || t == 0) return;
    if (how == SUM || how == MAX) {
        float acc = 0.0f;
        for (int64_t i = 0; i < t; ++i) {
            float m = std::fabs(v[i]);
            if (how == SUM) acc += m;
            else if (std::isnan(m) || (!std::isnan(acc) && m > acc)) acc = m;  // a NaN propagates, as in amax
        }
        if (acc < kEps) acc = kEps;
        for (int64_t i = 0; i < t; ++i) v[i] = v[i] / acc;
        return;
    }
    float sum = 0.0f;
    for (int64_t i = 0; i < t; ++i) sum += v[i];
    float mean = sum / static_cast<float>(t);
    float squares = 0.0f;
    for (int64_t i = 0; i < t; ++i) {
        v[i] = v[i] - mean;
        squares += v[i] * v[i];
    }
    float sd = std::sqrt(squares / static_cast<float>(t));
    if (sd < kEps) sd = kEps;
    for (int64_t i = 0; i < t; ++i) v[i] = v[i] / sd;
}

inline float decayed_denominator(float log_alpha, int64_t age) {
    float x = log_alpha * static_cast<float>(age);
    x = log_alpha + x;
    return std::expm1(x);
}

// decayed_denominator for ages 0, 1, ... (at most kTableAges of them): it depends on nothing else, so each thread
// keeps it per ln alpha, extended as generation grows. A deque: a table made for another alpha leaves the
// references already handed out valid.
const std::vector<float>& expm1_table(float log_alpha, int64_t max_age) {
    thread_local std::deque<std::pair<float, std::vector<float>>> tables;
    std::vector<float>* table = nullptr;
    for (auto& entry : tables) {
        if (entry.first == log_alpha) table = &entry.second;
    }
    if (table == nullptr) {
        tables.emplace_back(log_alpha, std::vector<float>());
        table = &tables.back().second;
    }
    const int64_t last = std::min(max_age, kTableAges - 1);
    for (int64_t age = static_cast<int64_t>(table->size()); age <= last; ++age) {
        table->push_back(decayed_denominator(log_alpha, age));
    }
    return *table;
}

// 0, 1/(T-1), ..., 1 as torch computes them (arange, then one float32 division).
const float* rank_steps(int64_t t) {
    thread_local std::vector<float> steps;
    if (static_cast<int64_t>(steps.size()) != t) {
        steps.resize(static_cast<size_t>(t));
        const float den = static_cast<float>(t > 1 ? t - 1 : 1);
        for (int64_t k = 0; k < t; ++k) steps[k] = static_cast<float>(k) / den;
    }
    return steps.data();
}

// Returns 0; 1 when a part's kind, correction or normalisation is unknown, 2 when a slot's position is after
// `now` (positions that are not this step's), 4 when an index lies outside the pools: nothing is written then.
//   rows, t                 rows = batch * kv_heads, t = evictable slots per row
//   parts                   number of scorers; kinds/alphas/log_alphas/corrected/norms/weights: one entry each
//                           (log_alphas: ln alpha rounded to float32 from double, as torch rounds a scalar;
//                           corrected: a Correction)
//   states                  one float32 (rows, t) pointer per ema/accumulated part, in part order; updated in place
//   heads                   kv heads per batch row: row r is (r / heads, r % heads)
//   attention               float32 (batch, heads, t), or null when no part reads it
//   positions               int64 (batch, heads, t) sequence indices of the slots
//   *_strides               attention's and positions' element strides over batch and heads (each row contiguous;
//                           a stride may be 0: one row broadcast)
//   nows, prompts           int64 (batch) per batch row: its `now` and `prompt_tokens` (rows of a paged engine's
//                           batch stand at different steps), or null: `now` and `prompt_tokens` for every row
//   total                   float32 (rows, t) out: the ranking score, protections not applied
//   victim                  int64 (rows) out: each row's lowest unprotected slot
//   index                   null, or int64 (rows, t): the states, positions and total are then per-slot pools
//                           (an engine's paged cache: (slots * heads) cells each) and row r's slot i is cell
//                           index[r * t + i] of each (states updated there, positions read there, total written
//                           there); distinct (the caller's), each checked to lie in [0, cells)
int fused_scoring_step(int64_t rows, int64_t t, int64_t parts, const int32_t* kinds, const float* alphas,
                       const float* log_alphas, const int32_t* corrected, const int32_t* norms, const float* weights,
                       float* const* states, int64_t heads, const float* attention, const int64_t* attention_strides,
                       const int64_t* positions, const int64_t* positions_strides, int64_t now_all,
                       int64_t prompt_all, int64_t sinks, int64_t recent, float* total, int64_t* victim,
                       const int64_t* nows, const int64_t* prompts, int64_t threads, const int64_t* index, int64_t cells) {
    auto row_of = [heads](int64_t r, const int64_t* strides) { return (r / heads) * strides[0] + (r % heads) * strides[1]; };
    auto now_of = [&](int64_t r) { return nows ? nows[r / heads] : now_all; };
    for (int64_t p = 0; p < parts; ++p) {
        if (kinds[p] < EMA || kinds[p] > RECENCY || norms[p] < NONE || norms[p] > RANK) return 1;
        if (corrected[p] < UNCORRECTED || corrected[p] > DECAYED) return 1;
    }
    int64_t max_age = 0;
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t now = now_of(r);
        const int64_t* slot = index ? index + r * t : nullptr;
        const int64_t* pos = index ? nullptr : positions + row_of(r, positions_strides);
        for (int64_t i = 0; i < t; ++i) {
            if (slot && (slot[i] < 0 || slot[i] >= cells)) return 4;
            const int64_t at = slot ? positions[slot[i]] : pos[i];
            if (at > now) return 2;
            max_age = std::max(max_age, now - at);
        }
    }
    // Everything that allocates comes before the first write, so that a failed allocation (status 3) leaves the
    // states as they were: the rank steps, the decayed parts' tables, the row buffers.
    const float* steps = rank_steps(t);
    std::vector<const std::vector<float>*> decayed(static_cast<size_t>(parts), nullptr);
    for (int64_t p = 0; p < parts; ++p) {
        if (kinds[p] == EMA && corrected[p] == DECAYED) decayed[p] = &expm1_table(log_alphas[p], max_age);
    }
    // Rows are independent: they are shared among `threads` OpenMP threads (one thread for a small call), each
    // with its own row buffers, made here; each row is computed by one thread, so the result does not depend on
    // their number.
    const int64_t team = (rows * t >= kParallelElements) ? std::max<int64_t>(1, std::min(threads, rows)) : 1;
    std::vector<Scratch> scratch(static_cast<size_t>(team));
    for (Scratch& each : scratch) each.resize(t, index != nullptr);
    const float inf = std::numeric_limits<float>::infinity();
#pragma omp parallel for schedule(static, 1) num_threads(static_cast<int>(team)) if (team > 1)
    for (int64_t r = 0; r < rows; ++r) {
        Scratch& mine = scratch[thread_id()];
        std::vector<float>& out = mine.out;
        std::vector<float>& rank_sum = mine.rank_sum;
        std::vector<float>& age = mine.age;
        std::vector<uint64_t>& order = mine.order;
        std::vector<uint32_t>& high = mine.high;
        std::vector<int32_t>& rank_of = mine.rank_of;
        const int64_t* slot = index ? index + r * t : nullptr;  // paged: the row's cells in the pools
        const int64_t* pos = slot ? nullptr : positions + row_of(r, positions_strides);
        if (slot) {
            for (int64_t i = 0; i < t; ++i) mine.positions[i] = positions[slot[i]];
            pos = mine.positions.data();
        }
        const float* att = attention ? attention + row_of(r, attention_strides) : nullptr;
        float* tot = slot ? mine.total.data() : total + r * t;
        const int64_t now = now_of(r), prompt_tokens = prompts ? prompts[r / heads] : prompt_all;
        for (int64_t i = 0; i < t; ++i) age[i] = static_cast<float>(now - pos[i]);
        bool have_total = false, have_ranks = false;
        int64_t state_index = 0;
        for (int64_t p = 0; p < parts; ++p) {
            const int kind = kinds[p];
            if (kind == RECENCY) {
                for (int64_t i = 0; i < t; ++i) out[i] = -age[i];
            } else if (kind == INSTANTANEOUS) {
                for (int64_t i = 0; i < t; ++i) out[i] = att[i];
            } else {
                float* s = states[state_index++];
                const float alpha = alphas[p];
                for (int64_t i = 0; i < t; ++i) {
                    float& cell = slot ? s[slot[i]] : s[r * t + i];
                    float v = cell;
                    if (kind == EMA) v = v * alpha;
                    v = v + att[i];
                    cell = v;
                    out[i] = v;
                }
                if (kind == EMA && corrected[p] == MEAN) {
                    for (int64_t i = 0; i < t; ++i) out[i] = out[i] / (age[i] + 1.0f);
                } else if (kind == EMA && corrected[p] == DECAYED) {
                    const std::vector<float>& table = *decayed[p];
                    const int64_t held = static_cast<int64_t>(table.size());
                    for (int64_t i = 0; i < t; ++i) {
                        const int64_t a = now - pos[i];  // read again: checked against the table, not trusted
                        const float d = (a >= 0 && a < held) ? table[a] : decayed_denominator(log_alphas[p], a);
                        out[i] = -(out[i] / d);
                    }
                }
            }
            const float weight = weights[p];
            if (norms[p] == RANK) {
                if (t <= kCountedRanks) {
                    for (int64_t i = 0; i < t; ++i) high[i] = static_cast<uint32_t>(sort_key(out[i], i) >> 32);
                    ranks_by_count(high.data(), t, rank_of.data());
                    for (int64_t i = 0; i < t; ++i) {
                        float rank = steps[rank_of[i]];
                        if (weight != 1.0f) rank = rank * weight;
                        rank_sum[i] = have_ranks ? rank_sum[i] + rank : rank;
                    }
                } else {
                    for (int64_t i = 0; i < t; ++i) order[i] = sort_key(out[i], i);
                    std::sort(order.begin(), order.end());
                    for (int64_t k = 0; k < t; ++k) {
                        float rank = steps[k];
                        if (weight != 1.0f) rank = rank * weight;
                        float& slot = rank_sum[order[k] & 0xFFFFFFFFu];
                        slot = have_ranks ? slot + rank : rank;
                    }
                }
                have_ranks = true;
                continue;
            }
            normalise(out.data(), t, norms[p]);
            for (int64_t i = 0; i < t; ++i) {
                float v = weight != 1.0f ? out[i] * weight : out[i];
                tot[i] = have_total ? tot[i] + v : v;
            }
            have_total = true;
        }
        if (have_ranks) {
            for (int64_t i = 0; i < t; ++i) tot[i] = have_total ? tot[i] + rank_sum[i] : rank_sum[i];
        }
        // The victim for the token at now + 1: sinks and the `recent` newest (that token among them) protected.
        const int64_t newest_protected = now + 2 - recent;
        int64_t best = 0;
        float best_value = inf;
        for (int64_t i = 0; i < t; ++i) {
            bool is_protected = (sinks > 0 && pos[i] >= prompt_tokens && pos[i] < prompt_tokens + sinks) ||
                                (recent > 1 && pos[i] >= newest_protected);
            float v = is_protected ? inf : tot[i];
            if (std::isnan(v)) {
                best = i;
                break;
            }
            if (i == 0 || v < best_value) {
                best = i;
                best_value = v;
            }
        }
        victim[r] = best;
        if (slot) {
            for (int64_t i = 0; i < t; ++i) total[slot[i]] = tot[i];
        }
    }
    return 0;
}

}  // namespace

extern "C" {

// The entry point: one block of 64-bit words, so that a call from Python converts one argument, not eighteen.
//   block[0..17]  rows, t, parts, kinds, alphas, log_alphas, corrected, norms, weights, states, attention,
//                 positions, now, prompt_tokens, sinks, recent, total, victim (pointers as addresses, 0 = null)
//   block[18..22] heads, attention's strides over batch and heads, positions' strides over batch and heads
//   block[23..24] nows, prompts: per batch row (0 = null: block[12] and block[13] for every row)
//   block[25]     threads (OpenMP, at most: torch's intra-op count)
//   block[26..27] index (0 = null) and the cells of each pool, see fused_scoring_step
//   states        the address of an array of one address per stateful part
// Returns fused_scoring_step's status, or 3 when it threw (memory): no C++ exception crosses into the caller.
int momentkv_fused_scoring_call(const int64_t* block) noexcept {
    auto at = [&](int i) { return reinterpret_cast<void*>(static_cast<intptr_t>(block[i])); };
    try {
        return fused_scoring_step(block[0], block[1], block[2], static_cast<const int32_t*>(at(3)),
                              static_cast<const float*>(at(4)), static_cast<const float*>(at(5)),
                              static_cast<const int32_t*>(at(6)), static_cast<const int32_t*>(at(7)),
                              static_cast<const float*>(at(8)), static_cast<float* const*>(at(9)), block[18],
                              static_cast<const float*>(at(10)), block + 19, static_cast<const int64_t*>(at(11)),
                              block + 21, block[12],
                              block[13], block[14], block[15], static_cast<float*>(at(16)),
                              static_cast<int64_t*>(at(17)), static_cast<const int64_t*>(at(23)),
                              static_cast<const int64_t*>(at(24)), block[25],
                              static_cast<const int64_t*>(at(26)), block[27]);
    } catch (...) {
        return 3;
    }
}

}  // extern "C"
