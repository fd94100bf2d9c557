// The exact top-k mask of one layer's scores, for XLA:CPU: an FFI handler that replaces the
// XLA program of ljax.masks' 'hinted' selection on CPU (ljax/masks.py says when it runs).
//
// Same ranking as ljax.selection: order keys (uint32, key(a) < key(b) iff a < b, -0.0 == +0.0),
// the k highest kept, ties at the threshold broken by the lowest flat index. Returns the mask, the
// threshold key (the k-th largest key; 0xFFFFFFFF for k = 0) and the count of positions whose bit
// differs from the old mask.
//
// One pass over the scores and the old mask, then only the blocks that change, whatever the hint:
// 1. per block of 64 keys: the count of keys >= h (the hint), the largest key below h, the
//    smallest key >= h, and the count of positions where (key >= h) differs from the old bit.
//    With e = count(keys >= h) - k, the threshold is the (e+1)-th smallest key >= h (e >= 0) or
//    the (-e)-th largest key below h (e < 0). The |e|+1 blocks whose nearest key on that side is
//    nearest to h (with ties: all blocks as near as the (|e|+1)-th) hold every key between h and
//    the threshold and all its ties, so a selection over their few keys (nth_element) gives the
//    threshold, the count of keys above it and the indices of its ties exactly. The pass also
//    sums each group of 64 blocks (below): the serial selection visits only the groups whose
//    nearest block is among the |e|+1 nearest groups', which hold those blocks;
// 2. the new mask written over the old (XLA aliases the two buffers), and compared with it, in
//    those candidate blocks and in the blocks where (key >= h) differs from the old bit: in every
//    other block (and every group without such a block) the new bits are (key >= h), which are
//    the old ones. Loads run 1,024 keys ahead of use (prefetched: the scores stream from memory,
//    and the stalls at page ends dominated).
// A far hint only makes the selection's share larger (all blocks at worst), never the result
// different. Hint 0: estimated from 4,096 evenly spaced keys. Passes run on XLA's intra-op thread
// pool in chunks of 1,024 blocks; the calling thread takes chunks too, and waits only for chunks
// another thread has started.
// The first pass runs with AVX-512 or AVX2 where the CPU has them (`LJAX_TOPK_ISA=avx2` or `scalar`
// caps it: the tests run each).
// A second handler (ljax_topk_mask_weights, for the search's step) also takes the layer's weights
// and their masked copy under the old mask (aliased to its output), and writes the masked weights
// (the weight where the bit is set, +0.0 elsewhere) in the same blocks as the mask: elsewhere they
// are the old ones.
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
#else
#define LJAX_CLONES
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
};

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
  *out = {count, below, above, static_cast<uint32_t>(size), diff};
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
    BlockStats s{0, 0, kMax, kBlock, 0};
    for (int l = 0; l < 8; ++l) {
      s.count += c[l];
      s.diff += df[l];
      s.below = std::max(s.below, lo[l]);
      s.above = std::min(s.above, hi[l]);
    }
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
                       static_cast<uint32_t>(__builtin_popcountll(ge ^ bit))};
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

// keep: key > t, or key >= t (at or before the last kept tie); the count of changed bits. With
// `w`: the masked weights written too, `w[i]` = keep ? `f[i]` : +0.0.
template <bool kWeights>
inline __attribute__((always_inline)) uint32_t WriteBody(const Bits* x, const uint8_t* old,
                                                         uint8_t* mask, int64_t size, uint32_t t,
                                                         uint32_t ties, const float* f, float* w) {
  uint32_t flips = 0;
  for (int64_t s = 0; s < size; s += 256) {
    for (int l = 0; l < 16; ++l) __builtin_prefetch(x + s + kPrefetch + 16 * l);
    for (int l = 0; l < 4; ++l) __builtin_prefetch(old + s + kPrefetch + 64 * l);
    const int64_t stop = std::min<int64_t>(size, s + 256);
    for (int64_t i = s; i < stop; ++i) {
      uint32_t key = Key(x[i]);
      uint8_t keep = (key > t) | ((key == t) & ties), was = old[i];
      mask[i] = keep;  // in place: `old` may be `mask`
      if constexpr (kWeights) w[i] = keep ? f[i] : 0.0f;
      flips += keep ^ was;
    }
  }
  return flips;
}

LJAX_CLONES
uint32_t WriteSpan(const Bits* x, const uint8_t* old, uint8_t* mask, int64_t size, uint32_t t,
                   uint32_t ties) {
  return WriteBody<false>(x, old, mask, size, t, ties, nullptr, nullptr);
}

LJAX_CLONES
uint32_t WriteSpanWeights(const Bits* x, const uint8_t* old, uint8_t* mask, int64_t size,
                          uint32_t t, uint32_t ties, const float* f, float* w) {
  return WriteBody<true>(x, old, mask, size, t, ties, f, w);
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
    return int64_t{WriteSpanWeights(x + begin, o + begin, k + begin, split - begin, t, 1,
                                    m.f + begin, m.out + begin)} +
           WriteSpanWeights(x + split, o + split, k + split, end - split, t, 0, m.f + split,
                            m.out + split);
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
};

// A block's distance to h of its nearest key on one side (up: keys >= h, else keys < h); false
// when the block has no key on that side.
inline bool Nearest(const BlockStats& b, bool up, uint32_t h, uint32_t* d) {
  if (up ? b.count == 0 : b.count == b.size) return false;
  *d = up ? b.above - h : h - 1 - b.below;
  return true;
}

// A group's blocks summed up in the first pass, so that the serial selection and the write visit
// only the groups that can hold a candidate or a changed bit: per side (0: keys < h, 1: keys >= h)
// the blocks with a key there and the distance to h of the nearest of them (kMax: none).
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
  for (size_t s = 0; s < spans.size(); s += 2) for (int64_t b = spans[s]; b < spans[s + 1]; ++b) {
    uint32_t d;
    if (!nearest(stats[b], &d) || d > bound) continue;
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
  if (need >= static_cast<int64_t>(ties.size())) return {t, kLast, up, bound};
  std::nth_element(ties.begin(), ties.begin() + (need - 1), ties.end());
  return {t, ties[need - 1], up, bound};
}

ffi::Error TopkMaskUnguarded(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> scores,
                             ffi::Buffer<ffi::PRED> old, ffi::Buffer<ffi::S32> k_buf,
                             ffi::Buffer<ffi::U32> hint_buf, ffi::ResultBuffer<ffi::PRED> mask,
                             ffi::ResultBuffer<ffi::U32> threshold,
                             ffi::ResultBuffer<ffi::S32> flips, const Masked& m) {
  const Bits* x = reinterpret_cast<const Bits*>(scores.typed_data());
  const int64_t n = static_cast<int64_t>(scores.element_count());
  if (static_cast<int64_t>(old.element_count()) != n) {
    return ffi::Error::InvalidArgument("ljax topk_mask: the old mask and the scores differ in size");
  }
  if (n >= kLast) {
    return ffi::Error::InvalidArgument("ljax topk_mask: a layer of 2**31 - 1 or more weights");
  }
  const int64_t k = std::clamp<int64_t>(k_buf.typed_data()[0], 0, n);
  const int64_t nb = (n + kBlock - 1) / kBlock;
  const int64_t chunks = (nb + kChunkBlocks - 1) / kChunkBlocks;
  const int64_t chunk = kChunkBlocks * kBlock;

  bool* out = mask->typed_data();
  const bool* before = old.typed_data();
  const auto* was = reinterpret_cast<const uint8_t*>(before);
  Selection sel{kMax, -1};
  uint32_t h = 0;
  std::unique_ptr<BlockStats[]> stats;
  std::vector<GroupStats> summary((nb + kGroupBlocks - 1) / kGroupBlocks);
  if (k > 0) {
    h = hint_buf.typed_data()[0];
    if (h == 0) h = EstimateHint(x, n, k);
    h = std::max(h, 1u);
    stats.reset(new BlockStats[nb]);  // every entry written below
    Parallel(pool, chunks, [&](int64_t c) {
      const int64_t begin = c * chunk, end = std::min(n, begin + chunk);
      Stats(x, was, begin, end, h, stats.get());
      const int64_t stop = (end + kBlock - 1) / kBlock;
      for (int64_t b = begin / kBlock; b < stop; b += kGroupBlocks) {
        summary[b / kGroupBlocks] = Summarise(stats.get(), b, std::min(stop, b + kGroupBlocks), h);
      }
    });
    int64_t count = 0;
    for (const GroupStats& c : summary) count += c.count;
    sel = Select(x, n, k, h, count, stats.get(), nb, summary);
  }
  std::vector<int64_t> changed(chunks, 0);
  // (masked weights written to another buffer than the old ones': all written)
  if (stats && out == before && m.out == m.old) {
    // In place (the old mask's buffer is the new one's): a block can change only where a key
    // lies between h and the threshold (a candidate block of Select) or where (key >= h)
    // differs from the old bit; every other block keeps its bits and is not touched, nor is a
    // group or a chunk without such a block.
    auto dirty = [&](int64_t b) {
      uint32_t d;
      return stats[b].diff || (Nearest(stats[b], sel.up, h, &d) && d <= sel.bound);
    };
    auto dirty_group = [&](int64_t g) {
      const GroupStats& gs = summary[g];
      return gs.diff || (gs.blocks[sel.up] && gs.nearest[sel.up] <= sel.bound);
    };
    std::vector<int64_t> visit;  // the chunks with a dirty group
    for (int64_t g = 0; g < static_cast<int64_t>(summary.size()); ++g) {
      const int64_t c = g * kGroupBlocks / kChunkBlocks;
      if ((visit.empty() || visit.back() != c) && dirty_group(g)) visit.push_back(c);
    }
    Parallel(pool, static_cast<int64_t>(visit.size()), [&](int64_t v) {
      const int64_t c = visit[v];
      const int64_t first = c * kChunkBlocks, stop = std::min(nb, first + kChunkBlocks);
      int64_t sum = 0;
      for (int64_t b = first; b < stop;) {
        if (b % kGroupBlocks == 0 && !dirty_group(b / kGroupBlocks)) {
          b += kGroupBlocks;  // a clean group
          continue;
        }
        if (!dirty(b)) { ++b; continue; }
        int64_t e = b + 1;
        while (e < stop && dirty(e)) ++e;  // a run of dirty blocks, written in one span
        sum += Write(x, before, out, b * kBlock, std::min(n, e * kBlock), sel.threshold, sel.last,
                     m);
        b = e;
      }
      changed[c] = sum;
    });
  } else {
    Parallel(pool, chunks, [&](int64_t c) {
      int64_t begin = c * chunk;
      changed[c] =
          Write(x, before, out, begin, std::min(n, begin + chunk), sel.threshold, sel.last, m);
    });
  }
  int64_t total = 0;
  for (int64_t f : changed) total += f;
  threshold->typed_data()[0] = sel.threshold;
  flips->typed_data()[0] = static_cast<int32_t>(total);
  return ffi::Error::Success();
}

template <typename... Args>
ffi::Error Guarded(Args&&... args) {
  try {
    return TopkMaskUnguarded(std::forward<Args>(args)...);
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("ljax topk_mask: ") + e.what());
  } catch (...) {
    return ffi::Error::Internal("ljax topk_mask: unknown C++ exception");
  }
}

ffi::Error TopkMask(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> scores, ffi::Buffer<ffi::PRED> old,
                    ffi::Buffer<ffi::S32> k, ffi::Buffer<ffi::U32> hint,
                    ffi::ResultBuffer<ffi::PRED> mask, ffi::ResultBuffer<ffi::U32> threshold,
                    ffi::ResultBuffer<ffi::S32> flips) {
  return Guarded(pool, scores, old, k, hint, mask, threshold, flips, Masked{});
}

// The same, and the masked weights where(new mask, weights, +0.0) written over the old ones (XLA
// aliases the two buffers), in the same blocks as the mask: those are the old masked weights'
// elsewhere.
ffi::Error TopkMaskWeights(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> scores,
                           ffi::Buffer<ffi::PRED> old, ffi::Buffer<ffi::S32> k,
                           ffi::Buffer<ffi::U32> hint, ffi::Buffer<ffi::F32> weights,
                           ffi::Buffer<ffi::F32> old_masked, ffi::ResultBuffer<ffi::PRED> mask,
                           ffi::ResultBuffer<ffi::F32> masked,
                           ffi::ResultBuffer<ffi::U32> threshold,
                           ffi::ResultBuffer<ffi::S32> flips) {
  if (weights.element_count() != scores.element_count() ||
      old_masked.element_count() != scores.element_count()) {
    return ffi::Error::InvalidArgument(
        "ljax topk_mask: the weights, the masked weights and the scores differ in size");
  }
  return Guarded(pool, scores, old, k, hint, mask, threshold, flips,
                 Masked{weights.typed_data(), old_masked.typed_data(), masked->typed_data()});
}

// The arguments both handlers share: the scores, the old mask, k and the hint.
auto TopkArgs() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::PRED>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::U32>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LjaxTopkMask, TopkMask,
                              TopkArgs()
                                  .Ret<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LjaxTopkMaskWeights, TopkMaskWeights,
                              TopkArgs()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
