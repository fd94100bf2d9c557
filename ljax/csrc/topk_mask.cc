// The exact top-k masks of layers' scores, for XLA:CPU: an FFI handler that replaces the XLA
// program of ljax.masks' 'hinted' selection on CPU (ljax/masks.py says when it runs).
//
// Same ranking as ljax.selection: order keys (uint32, key(a) < key(b) iff a < b, -0.0 == +0.0),
// the k highest kept, ties at the threshold broken by the lowest flat index. Returns per layer
// the mask, the threshold key (the k-th largest key; 0xFFFFFFFF for k = 0) and the count of
// positions whose bit differs from the old mask.
//
// One pass over the scores and the old mask, then only a few blocks, whatever the hint:
// 1. per block of 64 keys: the count of keys >= h (the hint), the largest key below h, the
//    smallest key >= h, and the count of positions where (key >= h) differs from the old bit.
//    With e = count(keys >= h) - k, the threshold is the (e+1)-th smallest key >= h (e >= 0) or
//    the (-e)-th largest key below h (e < 0). The |e|+1 blocks whose nearest key on that side is
//    nearest to h (with ties: all blocks as near as the (|e|+1)-th) hold every key between h and
//    the threshold and all its ties, so a selection over their few keys (nth_element) gives the
//    threshold, the count of keys above it and the indices of its ties exactly. The pass also
//    sums each group of 64 blocks (below): the serial selection visits only the groups whose
//    nearest block is among the |e|+1 nearest groups', which hold those blocks;
// 2. in place (XLA aliases the new mask to the old), the pass writes (key >= h) where it
//    differs from the old bit, while the block is in cache: outside the candidate blocks of 1.
//    those are the new bits, and elsewhere the old bits are. After the selection the candidate
//    blocks alone are written again, from their old bits, and compared with them. Not in place,
//    the whole mask is written after the selection. Loads run 1,024 keys ahead of use in long
//    spans (prefetched: the scores stream from memory, and the stalls at page ends dominated).
// A far hint only makes the selection's share larger (all blocks at worst), never the result
// different. Hint 0: estimated from 4,096 evenly spaced keys. Passes run on XLA's intra-op thread
// pool in chunks of 1,024 blocks; the calling thread takes chunks too, and waits only for chunks
// another thread has started.
// The first pass runs with AVX-512 or AVX2 where the CPU has them (`LJAX_TOPK_ISA=avx2` or `scalar`
// caps it: the tests run each).
// One call takes every layer of a step (below, `TopkMasks`), and with the search's step also the
// layers' weights and their masked copy under the old mask (aliased to its output): it writes the
// masked weights (the weight where the bit is set, +0.0 elsewhere) where the bit changes;
// elsewhere they are the old ones. With the search's score update too (`Sgd`, below), the first
// pass moves each group of 4,096 scores, then ranks them while they are in cache.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#define LJAX_X86 1
#include <immintrin.h>
// the mask write compiled for AVX2, SSE4.1 and baseline x86-64, picked at load time
#define LJAX_CLONES __attribute__((target_clones("avx2", "sse4.1", "default"), optimize("O3")))
// the score update with fused multiply-adds in hardware (the default: in software, as exact)
#define LJAX_FMA_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), optimize("O3")))
#else
#define LJAX_CLONES
#define LJAX_FMA_CLONES
#endif

#include "xla/ffi/api/ffi.h"
#include "thread_pool.h"

namespace ffi = xla::ffi;
using ljax::Parallel;

namespace {

constexpr int64_t kBlock = 64;
constexpr int64_t kChunkBlocks = 1024;  // the unit of work on the thread pool
constexpr int64_t kGroupBlocks = 64;  // the unit of the summaries: 16 to a chunk
constexpr int64_t kHeap = 4096;  // Select: a heap up to this many nearest blocks
constexpr int64_t kPrefetch = 1024;  // keys ahead
constexpr uint32_t kMax = 0xFFFFFFFFu;
constexpr int32_t kLast = 0x7FFFFFFF;  // every tie kept

using Bits = uint32_t __attribute__((may_alias));  // a float's bits, read in place

inline uint32_t Key(uint32_t bits) {
  bits = bits == 0x80000000u ? 0u : bits;  // -0.0 ranks as +0.0
  // negative: all bits flipped; positive: the sign bit set (branch-free, so loops vectorise)
  uint32_t sign = static_cast<uint32_t>(static_cast<int32_t>(bits) >> 31);
  return bits ^ (sign | 0x80000000u);
}

struct BlockStats {
  uint32_t count;  // keys >= h
  uint32_t below;  // largest key < h (if count < the block's size)
  uint32_t above;  // smallest key >= h (if count > 0)
  uint32_t size;   // keys in the block (64 but in a layer's last block)
  uint32_t diff;   // positions where (key >= h) differs from the old mask
  // where diff > 0: bit i is (key >= h) of the block's i-th key, and its old mask bit
  uint64_t ge_bits, old_bits;
};

// The bits of BlockStats, one key at a time (the blocks that differ from the old mask are few).
inline void BlockBits(const Bits* x, const uint8_t* old, int64_t size, uint32_t h,
                      BlockStats* out) {
  uint64_t ge = 0, was = 0;
  for (int64_t i = 0; i < size; ++i) {
    ge |= uint64_t{Key(x[i]) >= h} << i;
    was |= uint64_t{old[i] != 0} << i;
  }
  out->ge_bits = ge;
  out->old_bits = was;
}

inline void Block(const Bits* x, const uint8_t* old, int64_t size, uint32_t h, BlockStats* out) {
  uint32_t count = 0, below = 0, above = kMax, diff = 0;
  for (int64_t i = 0; i < size; ++i) {
    uint32_t key = Key(x[i]);
    uint32_t ge = key >= h;
    uint32_t b = ge ? 0u : key, a = ge ? key : kMax;
    count += ge;
    diff += ge ^ old[i];
    below = below > b ? below : b;
    above = above < a ? above : a;
  }
  *out = {count, below, above, static_cast<uint32_t>(size), diff, 0, 0};
  if (diff) BlockBits(x, old, size, h, out);
}

void StatsScalar(const Bits* x, const uint8_t* old, int64_t begin, int64_t end, uint32_t h,
                 BlockStats* out) {
  for (int64_t b = begin; b < end; b += kBlock) {
    Block(x + b, old + b, std::min(end, b + kBlock) - b, h, out + b / kBlock);
  }
}

#ifdef LJAX_X86
// The same with AVX2, 8 keys at a time (a block: 8 steps, then the lanes reduced).
__attribute__((target("avx2")))
void StatsAvx2(const Bits* x, const uint8_t* old, int64_t begin, int64_t end, uint32_t h,
               BlockStats* out) {
  const __m256i top = _mm256_set1_epi32(static_cast<int32_t>(0x80000000u));
  const __m256i hv = _mm256_set1_epi32(static_cast<int32_t>(h ^ 0x80000000u));  // signed order
  const __m256i ones = _mm256_set1_epi32(-1), one = _mm256_set1_epi32(1);
  int64_t b = begin;
  for (; b + kBlock <= end; b += kBlock) {
    __m256i count = _mm256_setzero_si256(), below = _mm256_setzero_si256(), above = ones;
    __m256i diff = _mm256_setzero_si256();
    for (int l = 0; l < 4; ++l) __builtin_prefetch(x + b + kPrefetch + 16 * l);
    __builtin_prefetch(old + b + kPrefetch);
    for (int64_t i = 0; i < kBlock; i += 8) {
      __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + b + i));
      bits = _mm256_andnot_si256(_mm256_cmpeq_epi32(bits, top), bits);  // -0.0 -> +0.0
      __m256i key = _mm256_xor_si256(bits, _mm256_or_si256(_mm256_srai_epi32(bits, 31), top));
      // key >= h: not (h > key), compared as signed after flipping the top bit
      __m256i lt = _mm256_cmpgt_epi32(hv, _mm256_xor_si256(key, top));
      count = _mm256_sub_epi32(count, _mm256_andnot_si256(lt, ones));  // += 1 where key >= h
      __m256i was = _mm256_cvtepu8_epi32(
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(old + b + i)));  // 0 or 1
      diff = _mm256_add_epi32(diff, _mm256_xor_si256(_mm256_andnot_si256(lt, one), was));
      below = _mm256_max_epu32(below, _mm256_and_si256(lt, key));
      above = _mm256_min_epu32(above, _mm256_or_si256(lt, key));
    }
    alignas(32) uint32_t c[8], lo[8], hi[8], df[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(c), count);
    _mm256_store_si256(reinterpret_cast<__m256i*>(df), diff);
    _mm256_store_si256(reinterpret_cast<__m256i*>(lo), below);
    _mm256_store_si256(reinterpret_cast<__m256i*>(hi), above);
    BlockStats s{0, 0, kMax, kBlock, 0, 0, 0};
    for (int l = 0; l < 8; ++l) {
      s.count += c[l];
      s.diff += df[l];
      s.below = std::max(s.below, lo[l]);
      s.above = std::min(s.above, hi[l]);
    }
    if (s.diff) BlockBits(x + b, old + b, kBlock, h, &s);
    out[b / kBlock] = s;
  }
  if (b < end) Block(x + b, old + b, end - b, h, out + b / kBlock);
}

// The same with AVX-512 (F and BW), a block in 4 steps of 16 keys: the comparisons are bit masks,
// so the block's count and its differences from the old mask are two popcounts, and only the
// largest key below h and the smallest at or above it are reduced across lanes.
__attribute__((target("avx512f,avx512bw,popcnt")))
void StatsAvx512(const Bits* x, const uint8_t* old, int64_t begin, int64_t end, uint32_t h,
                 BlockStats* out) {
  const __m512i top = _mm512_set1_epi32(static_cast<int32_t>(0x80000000u));
  const __m512i hv = _mm512_set1_epi32(static_cast<int32_t>(h));
  int64_t b = begin;
  for (; b + kBlock <= end; b += kBlock) {
    __m512i below = _mm512_setzero_si512(), above = _mm512_set1_epi32(-1);
    uint64_t ge = 0;
    for (int l = 0; l < 4; ++l) __builtin_prefetch(x + b + kPrefetch + 16 * l);
    __builtin_prefetch(old + b + kPrefetch);
    for (int l = 0; l < 4; ++l) {
      __m512i bits = _mm512_loadu_si512(x + b + 16 * l);
      __m512i key = _mm512_xor_si512(bits, _mm512_or_si512(_mm512_srai_epi32(bits, 31), top));
      key = _mm512_mask_mov_epi32(key, _mm512_cmpeq_epi32_mask(bits, top), top);  // -0.0: +0.0
      __mmask16 g = _mm512_cmpge_epu32_mask(key, hv);
      ge |= static_cast<uint64_t>(g) << (16 * l);
      below = _mm512_mask_max_epu32(below, static_cast<__mmask16>(~g), below, key);
      above = _mm512_mask_min_epu32(above, g, above, key);
    }
    __m512i was = _mm512_loadu_si512(old + b);
    uint64_t bit = _mm512_test_epi8_mask(was, was);  // the old mask's 64 bits
    out[b / kBlock] = {static_cast<uint32_t>(__builtin_popcountll(ge)),
                       _mm512_reduce_max_epu32(below), _mm512_reduce_min_epu32(above),
                       static_cast<uint32_t>(kBlock),
                       static_cast<uint32_t>(__builtin_popcountll(ge ^ bit)), ge, bit};
  }
  if (b < end) Block(x + b, old + b, end - b, h, out + b / kBlock);
}

using StatsFn = void (*)(const Bits*, const uint8_t*, int64_t, int64_t, uint32_t, BlockStats*);

// The widest pass this CPU runs, or the one LJAX_TOPK_ISA caps it to; read once.
StatsFn PickStats() {
  const char* isa = std::getenv("LJAX_TOPK_ISA");
  std::string cap = isa ? isa : "";
  if (cap != "avx2" && cap != "scalar" && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512bw")) {
    return StatsAvx512;
  }
  if (cap != "scalar" && __builtin_cpu_supports("avx2")) return StatsAvx2;
  return StatsScalar;
}

void Stats(const Bits* x, const uint8_t* old, int64_t begin, int64_t end, uint32_t h,
           BlockStats* out) {
  static const StatsFn pass = PickStats();
  pass(x, old, begin, end, h, out);
}
#else
void Stats(const Bits* x, const uint8_t* old, int64_t begin, int64_t end, uint32_t h,
           BlockStats* out) {
  StatsScalar(x, old, begin, end, h, out);
}
#endif

// keep: key > t, or key >= t (at or before the last kept tie); the count of changed bits.
// kWeights: the masked weights `w[i]` = keep ? `f[i]` : +0.0 written too, everywhere (kAll), or
// only where the bit changes (kChanged: `w` holds those of the old mask; the in-place write of a
// few scattered blocks then touches the weights' lines of the few bits that change alone).
// In place (`old` is `mask`), the old bit is read from `mask` itself: with every pointer restrict,
// the loop vectorises without run-time overlap checks, which two equal pointers fail.
enum Weights { kNone, kAll, kChanged };

template <Weights kWeights, bool kInPlace>
inline __attribute__((always_inline)) uint32_t WriteBody(const Bits* __restrict x,
                                                         const uint8_t* __restrict old,
                                                         uint8_t* __restrict mask, int64_t size,
                                                         uint32_t t, uint32_t ties,
                                                         const float* __restrict f,
                                                         float* __restrict w) {
  const uint8_t* was = kInPlace ? mask : old;
  uint32_t flips = 0;
  for (int64_t s = 0; s < size; s += kBlock) {
    if (s % 256 == 0 && s + kPrefetch < size) {  // a long span: loads ahead
      for (int l = 0; l < 16; ++l) __builtin_prefetch(x + s + kPrefetch + 16 * l);
      for (int l = 0; l < 4; ++l) __builtin_prefetch(was + s + kPrefetch + 64 * l);
    }
    const int64_t len = std::min<int64_t>(size - s, kBlock);
    alignas(64) uint8_t before[kBlock];
    std::memcpy(before, was + s, len);
    uint32_t changed = 0;
    for (int64_t i = 0; i < len; ++i) {
      uint32_t key = Key(x[s + i]);
      uint8_t keep = (key > t) | ((key == t) & ties);
      mask[s + i] = keep;
      if constexpr (kWeights == kAll) w[s + i] = keep ? f[s + i] : 0.0f;
      changed += keep ^ before[i];
    }
    flips += changed;
    if (kWeights == kChanged && changed) {
      for (int64_t i = 0; i < len; ++i) {
        if (mask[s + i] != before[i]) w[s + i] = mask[s + i] ? f[s + i] : 0.0f;
      }
    }
  }
  return flips;
}

LJAX_CLONES
uint32_t WriteSpan(const Bits* x, const uint8_t* old, uint8_t* mask, int64_t size, uint32_t t,
                   uint32_t ties) {
  if (old == mask) return WriteBody<kNone, true>(x, nullptr, mask, size, t, ties, nullptr, nullptr);
  return WriteBody<kNone, false>(x, old, mask, size, t, ties, nullptr, nullptr);
}

// `w` in place (`masked`: it holds the masked weights under the old mask) or not
LJAX_CLONES
uint32_t WriteSpanWeights(const Bits* x, const uint8_t* old, uint8_t* mask, int64_t size,
                          uint32_t t, uint32_t ties, const float* f, float* w, bool masked) {
  if (old == mask && masked) {
    return WriteBody<kChanged, true>(x, nullptr, mask, size, t, ties, f, w);
  }
  if (old == mask) return WriteBody<kAll, true>(x, nullptr, mask, size, t, ties, f, w);
  return WriteBody<kAll, false>(x, old, mask, size, t, ties, f, w);
}

// The masked weights of a layer, when the call writes them: the weights `f`, and the old and new
// masked weights (the same buffer when XLA aliases them).
struct Masked {
  const float* f = nullptr;
  const float* old = nullptr;
  float* out = nullptr;
};

int64_t Write(const Bits* x, const bool* old, bool* mask, int64_t begin, int64_t end, uint32_t t,
              int64_t last, const Masked& m) {
  auto* o = reinterpret_cast<const uint8_t*>(old);
  auto* k = reinterpret_cast<uint8_t*>(mask);
  int64_t split = std::clamp<int64_t>(last + 1, begin, end);  // ties before it are kept
  if (m.out) {
    const bool masked = m.out == m.old;
    return int64_t{WriteSpanWeights(x + begin, o + begin, k + begin, split - begin, t, 1,
                                    m.f + begin, m.out + begin, masked)} +
           WriteSpanWeights(x + split, o + split, k + split, end - split, t, 0, m.f + split,
                            m.out + split, masked);
  }
  return int64_t{WriteSpan(x + begin, o + begin, k + begin, split - begin, t, 1)} +
         WriteSpan(x + split, o + split, k + split, end - split, t, 0);
}

uint32_t EstimateHint(const Bits* x, int64_t n, int64_t k) {
  int64_t s = std::min<int64_t>(n, 4096);
  std::vector<uint32_t> sample(s);
  for (int64_t i = 0; i < s; ++i) sample[i] = Key(x[i * n / s]);
  int64_t r = std::clamp<int64_t>(k * s / n, 1, s);  // the r-th largest of the sample
  std::nth_element(sample.begin(), sample.begin() + (r - 1), sample.end(), std::greater<>());
  return sample[r - 1];
}

struct Selection {
  uint32_t threshold;
  int64_t last;  // the last kept tie's index (kLast: all ties kept; -1: none)
  bool up = true;          // the threshold is >= the hint
  uint32_t bound = kMax;   // the candidate blocks' distance bound (see Select)
  std::vector<int64_t> blocks;  // the candidate blocks, ascending
};

// A block's distance to h of its nearest key on one side (up: keys >= h, else keys < h); false
// when the block has no key on that side.
inline bool Nearest(const BlockStats& b, bool up, uint32_t h, uint32_t* d) {
  if (up ? b.count == 0 : b.count == b.size) return false;
  *d = up ? b.above - h : h - 1 - b.below;
  return true;
}

// A group's blocks summed up in the first pass, so that the serial selection visits only the
// groups that can hold a candidate: per side (0: keys < h, 1: keys >= h) the blocks with a key
// there and the distance to h of the nearest of them (kMax: none); and the group's counts.
struct GroupStats {
  int64_t count = 0;  // keys >= h
  int64_t diff = 0;   // positions where (key >= h) differs from the old mask
  int64_t blocks[2] = {0, 0};
  uint32_t nearest[2] = {kMax, kMax};
};

GroupStats Summarise(const BlockStats* stats, int64_t first, int64_t stop, uint32_t h) {
  GroupStats c;
  for (int64_t b = first; b < stop; ++b) {
    c.count += stats[b].count;
    c.diff += stats[b].diff;
    for (int up = 0; up < 2; ++up) {
      uint32_t d;
      if (!Nearest(stats[b], up, h, &d)) continue;
      ++c.blocks[up];
      c.nearest[up] = std::min(c.nearest[up], d);
    }
  }
  return c;
}

// The threshold of a layer whose keys >= h number `count` (> 0 away from k), from the blocks'
// statistics: see the file's comment.
Selection Select(const Bits* x, int64_t n, int64_t k, uint32_t h, int64_t count,
                 const BlockStats* stats, int64_t nb, const std::vector<GroupStats>& groups) {
  const int64_t e = count - k;
  const bool up = e >= 0;  // the threshold is >= h
  const int64_t j = up ? e + 1 : -e;  // it is the j-th nearest key to h on its side
  // per block, the distance to h of its nearest key on that side (blocks with none: skipped);
  // the j-th smallest: a heap of the j nearest for a near hint, else a selection over all
  auto nearest = [&](const BlockStats& b, uint32_t* d) { return Nearest(b, up, h, d); };
  uint32_t bound = kMax;  // blocks at most this far hold every key between h and the threshold
  // Only groups whose nearest block is at most the j-th smallest of the groups' nearest can hold
  // one of the j nearest blocks (those j groups hold j blocks at most that far): visit those.
  std::vector<uint32_t> near;
  int64_t blocks = 0;  // blocks with a key on that side
  for (const GroupStats& c : groups) {
    blocks += c.blocks[up];
    if (c.blocks[up]) near.push_back(c.nearest[up]);
  }
  uint32_t reach = kMax;
  if (static_cast<int64_t>(near.size()) >= j) {
    std::nth_element(near.begin(), near.begin() + (j - 1), near.end());
    reach = near[j - 1];
  }
  // [first, stop) block ranges to visit: those groups, or every block when each block with a key
  // on that side is a candidate (at most j of them: bound stays kMax)
  const bool all = blocks <= j;
  std::vector<int64_t> spans;
  if (all) spans = {0, nb};
  for (int64_t g = 0; g < static_cast<int64_t>(groups.size()) && !all; ++g) {
    if (!groups[g].blocks[up] || groups[g].nearest[up] > reach) continue;
    const int64_t first = g * kGroupBlocks, stop = std::min(nb, first + kGroupBlocks);
    if (!spans.empty() && spans.back() == first) {
      spans.back() = stop;  // adjacent groups: one range
    } else {
      spans.push_back(first);
      spans.push_back(stop);
    }
  }
  near.clear();
  if (!all && j <= kHeap) {
    near.reserve(j);
    for (size_t s = 0; s < spans.size(); s += 2) for (int64_t b = spans[s]; b < spans[s + 1]; ++b) {
      uint32_t d;
      if (!nearest(stats[b], &d)) continue;
      if (static_cast<int64_t>(near.size()) < j) {
        near.push_back(d);
        std::push_heap(near.begin(), near.end());
      } else if (d < near.front()) {
        std::pop_heap(near.begin(), near.end());
        near.back() = d;
        std::push_heap(near.begin(), near.end());
      }
    }
    bound = near.front();
  } else if (!all) {
    for (size_t s = 0; s < spans.size(); s += 2) for (int64_t b = spans[s]; b < spans[s + 1]; ++b) {
      uint32_t d;
      if (nearest(stats[b], &d)) near.push_back(d);
    }
    std::nth_element(near.begin(), near.begin() + (j - 1), near.end());
    bound = near[j - 1];
  }
  std::vector<std::pair<uint32_t, int32_t>> keys;  // (distance from h, index) of those keys
  std::vector<int64_t> candidates;
  for (size_t s = 0; s < spans.size(); s += 2) for (int64_t b = spans[s]; b < spans[s + 1]; ++b) {
    uint32_t d;
    if (!nearest(stats[b], &d) || d > bound) continue;
    candidates.push_back(b);
    int64_t stop = std::min(n, (b + 1) * kBlock);
    for (int64_t i = b * kBlock; i < stop; ++i) {
      uint32_t key = Key(x[i]);
      if (up ? key >= h : key < h) {
        uint32_t dist = up ? key - h : h - 1 - key;
        if (dist <= bound) keys.emplace_back(dist, static_cast<int32_t>(i));
      }
    }
  }
  // the j-th nearest of the gathered keys (all keys nearer than it are gathered)
  std::nth_element(keys.begin(), keys.begin() + (j - 1), keys.end(),
                   [](const auto& a, const auto& b) { return a.first < b.first; });
  const uint32_t dt = keys[j - 1].first;
  const uint32_t t = up ? h + dt : h - 1 - dt;
  // keys above t: those >= h beyond t (up), or all >= h plus those between t and h (down)
  int64_t nearer = 0;
  std::vector<int32_t> ties;
  for (const auto& [dist, i] : keys) {
    if (dist == dt) ties.push_back(i);
    else if (dist < dt) ++nearer;
  }
  const int64_t above = up ? count - nearer - static_cast<int64_t>(ties.size()) : count + nearer;
  const int64_t need = k - above;  // ties kept, >= 1
  if (need >= static_cast<int64_t>(ties.size())) {
    return {t, kLast, up, bound, std::move(candidates)};
  }
  std::nth_element(ties.begin(), ties.begin() + (need - 1), ties.end());
  return {t, ties[need - 1], up, bound, std::move(candidates)};
}

// Block b's bits where `flip` is set, made those of `value` (bit i: the block's i-th key), and the
// masked weights there; with `moved`, the weights' lines are prefetched and their positions
// appended, for the caller to write once the lines are in.
inline void SetBits(uint8_t* bits, const Masked& m, int64_t b, uint64_t flip, uint64_t value,
                    std::vector<int64_t>* moved) {
  for (; flip; flip &= flip - 1) {
    const int i = __builtin_ctzll(flip);
    const int64_t p = b * kBlock + i;
    bits[p] = (value >> i) & 1;
    if (!m.out) continue;
    if (moved) {
      __builtin_prefetch(m.f + p);
      __builtin_prefetch(m.out + p, 1);
      moved->push_back(p);
    } else {
      m.out[p] = bits[p] ? m.f[p] : 0.0f;
    }
  }
}

// The search's score update, when the call makes the scores it ranks: optax's
// add_decayed_weights then sgd with momentum, on the straight-through gradient `g * f` (`f`: the
// weights), as the float operations XLA's fusion of it compiles to on CPUs with fused
// multiply-adds (a test compares them bit for bit):
//   u = fma(g, f, s * decay);  m = fma(m, momentum, u);  s = fma(step, m, s)  (step: -lr)
// The first pass runs it on a group of scores just before ranking them (`x` is then the new
// scores), instead of passes over the scores and the momentum of their own. In place: XLA
// aliases the new scores and momentum to the old.
struct Sgd {
  const float* g = nullptr;  // the gradients of the masked weights
  float* m = nullptr;        // the momentum
  float* s = nullptr;        // the scores: the layer's keys
  float decay = 0, momentum = 0, step = 0;
};

LJAX_FMA_CLONES
void SgdSpan(const Sgd& o, const float* __restrict f, int64_t begin, int64_t end) {
  const float* __restrict g = o.g;
  float* __restrict m = o.m;
  float* __restrict s = o.s;
  for (int64_t i = begin; i < end; ++i) {
    const float u = __builtin_fmaf(g[i], f[i], s[i] * o.decay);
    m[i] = __builtin_fmaf(m[i], o.momentum, u);
    s[i] = __builtin_fmaf(o.step, m[i], s[i]);
  }
}

// One layer of a call: its buffers, k and hint; the threshold key and flips it finds.
struct Layer {
  const Bits* x = nullptr;       // the scores (with `sgd`: the new ones, which it writes)
  const Sgd* sgd = nullptr;      // the score update, when the call makes the scores
  const bool* before = nullptr;  // the old mask
  bool* out = nullptr;           // the new mask (the old one's buffer when XLA aliases them)
  Masked m;                      // the masked weights, when the call writes them
  int64_t n = 0, k = 0;
  uint32_t hint = 0;
  uint32_t threshold = kMax;
  int64_t flips = 0;
};

// The layer's mask (and masked weights), threshold and flips: see the file's comment.
void RunLayer(ffi::ThreadPool& pool, Layer& a) {
  const Bits* x = a.x;
  const int64_t n = a.n, k = a.k;
  const Masked& m = a.m;
  const int64_t nb = (n + kBlock - 1) / kBlock;
  const int64_t chunks = (nb + kChunkBlocks - 1) / kChunkBlocks;
  const int64_t chunk = kChunkBlocks * kBlock;

  bool* out = a.out;
  const bool* before = a.before;
  const auto* was = reinterpret_cast<const uint8_t*>(before);
  Selection sel{kMax, -1, true, kMax, {}};
  uint32_t h = 0;
  std::unique_ptr<BlockStats[]> stats;
  std::vector<GroupStats> summary((nb + kGroupBlocks - 1) / kGroupBlocks);
  // In place (the old mask's buffer is the new one's, and the masked weights' too): the pass
  // writes (key >= h) over the old bits where they differ, and the weights there, while the keys
  // are in cache. Those are the new bits in every block but Select's candidates (the blocks that
  // hold a key between h and the threshold), which alone are written again after it.
  const bool in_place = out == before && m.out == m.old;
  if (k > 0) {
    h = a.hint;
    // (with `sgd`, from the scores before the update: a hint only changes the cost)
    if (h == 0) h = EstimateHint(x, n, k);
    h = std::max(h, 1u);
    stats.reset(new BlockStats[nb]);  // every entry written below
    Parallel(pool, chunks, [&](int64_t c) {
      const int64_t begin = c * chunk, end = std::min(n, begin + chunk);
      if (!a.sgd) {
        Stats(x, was, begin, end, h, stats.get());
      } else {  // a group's keys updated, then ranked while in cache
        for (int64_t s = begin; s < end; s += kGroupBlocks * kBlock) {
          const int64_t e = std::min(end, s + kGroupBlocks * kBlock);
          SgdSpan(*a.sgd, m.f, s, e);
          Stats(x, was, s, e, h, stats.get());
        }
      }
      const int64_t stop = (end + kBlock - 1) / kBlock;
      for (int64_t b = begin / kBlock; b < stop; b += kGroupBlocks) {
        summary[b / kGroupBlocks] = Summarise(stats.get(), b, std::min(stop, b + kGroupBlocks), h);
      }
      if (!in_place) return;
      auto* bits = reinterpret_cast<uint8_t*>(out);
      std::vector<int64_t> moved;  // positions whose bit changes: their weights, once prefetched
      for (int64_t b = begin / kBlock; b < stop; ++b) {
        const BlockStats& st = stats[b];
        if (st.diff) SetBits(bits, m, b, st.ge_bits ^ st.old_bits, st.ge_bits, &moved);
      }
      for (int64_t p : moved) m.out[p] = bits[p] ? m.f[p] : 0.0f;
    });
    int64_t count = 0;
    for (const GroupStats& c : summary) count += c.count;
    sel = Select(x, n, k, h, count, stats.get(), nb, summary);
  } else if (a.sgd) {  // no key kept: the scores still move
    Parallel(pool, chunks, [&](int64_t c) {
      SgdSpan(*a.sgd, m.f, c * chunk, std::min(n, (c + 1) * chunk));
    });
  }
  int64_t total = 0;  // flips
  if (stats && in_place) {
    // Select's candidate blocks written with the threshold, over their old bits, which the
    // pass's are turned back to: Write then counts their flips; every other block's are its
    // `diff`. Runs of adjacent candidates are written as one span.
    const std::vector<int64_t>& cand = sel.blocks;
    auto write = [&](int64_t first, int64_t stop) {  // cand[first:stop]
      int64_t sum = 0;
      for (int64_t i = first; i < stop;) {
        const int64_t b = cand[i];
        int64_t e = b + 1;
        for (++i; i < stop && cand[i] == e; ++i) ++e;
        for (int64_t c = b; c < e; ++c) {
          const BlockStats& st = stats[c];
          if (!st.diff) continue;
          SetBits(reinterpret_cast<uint8_t*>(out), m, c, st.ge_bits ^ st.old_bits, st.old_bits,
                  nullptr);
          sum -= st.diff;
        }
        sum += Write(x, before, out, b * kBlock, std::min(n, e * kBlock), sel.threshold, sel.last,
                     m);
      }
      return sum;
    };
    for (const GroupStats& g : summary) total += g.diff;
    const int64_t count = static_cast<int64_t>(cand.size());
    const int64_t parts = (count + kChunkBlocks - 1) / kChunkBlocks;  // a far hint: many
    std::vector<int64_t> sums(parts, 0);
    Parallel(pool, parts, [&](int64_t p) {
      sums[p] = write(p * kChunkBlocks, std::min(count, (p + 1) * kChunkBlocks));
    });
    for (int64_t v : sums) total += v;
  } else {  // (also with the masked weights written to another buffer than the old ones')
    std::vector<int64_t> changed(chunks, 0);
    Parallel(pool, chunks, [&](int64_t c) {
      int64_t begin = c * chunk;
      changed[c] =
          Write(x, before, out, begin, std::min(n, begin + chunk), sel.threshold, sel.last, m);
    });
    for (int64_t f : changed) total += f;
  }
  a.threshold = sel.threshold;
  a.flips = total;
}

// Every layer of a step in one call, a layer to a task on the pool (the largest first): the
// layers' passes, selections and writes run side by side, where one layer at a time would leave
// the pool idle in its serial selection and in each pass's wait for a helper thread (tens of us
// to wake on a small machine). A layer's own passes still take any idle thread.
// Arguments: k and the hints (u32, one per layer), then per layer the scores, then the old masks,
// then (with weights) the weights, then the old masked weights, then (with the score update,
// `Sgd`) the masked weights' gradients, then the momentum, then f32[3] (decay, momentum, step).
// Results: per layer the masks, then (with weights) the masked weights (aliased to the old ones),
// then (with the update) the new scores and momentum (aliased to the old), then the thresholds
// and flips.
ffi::Error TopkMasksChecked(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> k_buf,
                            ffi::Buffer<ffi::U32> hint_buf, ffi::RemainingArgs args,
                            ffi::RemainingRets rets) {
  const size_t count = k_buf.element_count();
  if (hint_buf.element_count() != count) {
    return ffi::Error::InvalidArgument("ljax topk_mask: k and the hints differ in size");
  }
  const bool sgd = args.size() == 6 * count + 1;
  const bool weights = sgd || args.size() == 4 * count;
  if ((!weights && args.size() != 2 * count) ||
      rets.size() != (sgd ? 4 : weights ? 2 : 1) * count + 2) {
    return ffi::Error::InvalidArgument("ljax topk_mask: wrong number of arguments or results");
  }
  std::vector<Sgd> updates(sgd ? count : 0);
  float coef[3] = {0, 0, 0};  // decay, momentum, step
  if (sgd) {
    auto c = args.get<ffi::Buffer<ffi::F32>>(6 * count);
    if (c.has_error()) return c.error();
    if (c->element_count() != 3) {
      return ffi::Error::InvalidArgument("ljax topk_mask: the update takes f32[3] coefficients");
    }
    std::copy_n(c->typed_data(), 3, coef);
  }
  auto thresholds = rets.get<ffi::Buffer<ffi::U32>>(rets.size() - 2);
  auto flips = rets.get<ffi::Buffer<ffi::S32>>(rets.size() - 1);
  if (thresholds.has_error()) return thresholds.error();
  if (flips.has_error()) return flips.error();
  if ((*thresholds)->element_count() != count || (*flips)->element_count() != count) {
    return ffi::Error::InvalidArgument("ljax topk_mask: thresholds and flips must hold a value "
                                       "per layer");
  }
  std::vector<Layer> layers(count);
  for (size_t l = 0; l < count; ++l) {
    Layer& a = layers[l];
    auto scores = args.get<ffi::Buffer<ffi::F32>>(l);
    auto old = args.get<ffi::Buffer<ffi::PRED>>(count + l);
    auto mask = rets.get<ffi::Buffer<ffi::PRED>>(l);
    if (scores.has_error()) return scores.error();
    if (old.has_error()) return old.error();
    if (mask.has_error()) return mask.error();
    a.n = static_cast<int64_t>(scores->element_count());
    if (static_cast<int64_t>(old->element_count()) != a.n ||
        static_cast<int64_t>((*mask)->element_count()) != a.n) {
      return ffi::Error::InvalidArgument(
          "ljax topk_mask: the old mask and the scores differ in size");
    }
    if (a.n >= kLast) {
      return ffi::Error::InvalidArgument("ljax topk_mask: a layer of 2**31 - 1 or more weights");
    }
    a.x = reinterpret_cast<const Bits*>(scores->typed_data());
    a.before = old->typed_data();
    a.out = (*mask)->typed_data();
    a.k = std::clamp<int64_t>(k_buf.typed_data()[l], 0, a.n);
    a.hint = hint_buf.typed_data()[l];
    if (weights) {
      auto f = args.get<ffi::Buffer<ffi::F32>>(2 * count + l);
      auto masked_old = args.get<ffi::Buffer<ffi::F32>>(3 * count + l);
      auto masked = rets.get<ffi::Buffer<ffi::F32>>(count + l);
      if (f.has_error()) return f.error();
      if (masked_old.has_error()) return masked_old.error();
      if (masked.has_error()) return masked.error();
      if (static_cast<int64_t>(f->element_count()) != a.n ||
          static_cast<int64_t>(masked_old->element_count()) != a.n ||
          static_cast<int64_t>((*masked)->element_count()) != a.n) {
        return ffi::Error::InvalidArgument(
            "ljax topk_mask: the weights, the masked weights and the scores differ in size");
      }
      a.m = Masked{f->typed_data(), masked_old->typed_data(), (*masked)->typed_data()};
    }
    if (sgd) {
      auto g = args.get<ffi::Buffer<ffi::F32>>(4 * count + l);
      auto m_old = args.get<ffi::Buffer<ffi::F32>>(5 * count + l);
      auto s_new = rets.get<ffi::Buffer<ffi::F32>>(2 * count + l);
      auto m_new = rets.get<ffi::Buffer<ffi::F32>>(3 * count + l);
      if (g.has_error()) return g.error();
      if (m_old.has_error()) return m_old.error();
      if (s_new.has_error()) return s_new.error();
      if (m_new.has_error()) return m_new.error();
      if (static_cast<int64_t>(g->element_count()) != a.n ||
          static_cast<int64_t>(m_old->element_count()) != a.n) {
        return ffi::Error::InvalidArgument(
            "ljax topk_mask: the gradients, the momentum and the scores differ in size");
      }
      if ((*s_new)->typed_data() != scores->typed_data() ||
          (*m_new)->typed_data() != m_old->typed_data()) {
        return ffi::Error::InvalidArgument(
            "ljax topk_mask: the score update runs in place: alias the new scores and momentum "
            "to the old");
      }
      Sgd& o = updates[l];
      o = Sgd{g->typed_data(), (*m_new)->typed_data(), (*s_new)->typed_data(), coef[0], coef[1],
              coef[2]};
      a.x = reinterpret_cast<const Bits*>(o.s);
      a.sgd = &o;
    }
  }
  std::vector<size_t> order(count);  // the largest layers first: the last tasks are the shortest
  for (size_t l = 0; l < count; ++l) order[l] = l;
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return layers[a].n > layers[b].n; });
  Parallel(pool, static_cast<int64_t>(count), [&](int64_t i) { RunLayer(pool, layers[order[i]]); });
  for (size_t l = 0; l < count; ++l) {
    (*thresholds)->typed_data()[l] = layers[l].threshold;
    (*flips)->typed_data()[l] = static_cast<int32_t>(layers[l].flips);
  }
  return ffi::Error::Success();
}

ffi::Error TopkMasks(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> k, ffi::Buffer<ffi::U32> hint,
                     ffi::RemainingArgs args, ffi::RemainingRets rets) {
  try {
    return TopkMasksChecked(pool, k, hint, args, rets);
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("ljax topk_mask: ") + e.what());
  } catch (...) {
    return ffi::Error::Internal("ljax topk_mask: unknown C++ exception");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LjaxTopkMasks, TopkMasks,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .RemainingArgs()
                                  .RemainingRets());
