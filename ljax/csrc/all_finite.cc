// Whether every element of some float32 arrays is finite, for XLA:CPU: an FFI handler that
// replaces the XLA reductions of ljax.reductions.all_finite on CPU (ljax/loop.py says when it
// runs), one call for all of a step's gradients.
//
// A float is finite iff its exponent bits are not all ones. The arrays are cut into spans of 64K
// elements, checked on XLA's intra-op thread pool (`thread_pool.h`; the calling thread takes
// spans too) with AVX-512 where the CPU has it, else a loop the compiler vectorises; once a span
// finds a non-finite value the spans not yet started are skipped. XLA's own reduction runs at a
// third of the memory's speed here (a reduction per array, each split in two:
// ljax/reductions.py).
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#define LJAX_X86 1
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"
#include "thread_pool.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kSpan = 1 << 16;  // elements per task
constexpr uint32_t kExponent = 0x7F800000u;

struct Span {
  const uint32_t* x;
  int64_t size;
};

bool FiniteScalar(const uint32_t* x, int64_t n) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= (x[i] & kExponent) == kExponent;
  return !bad;
}

#ifdef LJAX_X86
__attribute__((target("avx512f")))
bool FiniteAvx512(const uint32_t* x, int64_t n) {
  const __m512i e = _mm512_set1_epi32(static_cast<int32_t>(kExponent));
  int64_t i = 0;
  __mmask16 bad = 0;
  for (; i + 64 <= n; i += 64) {
    for (int l = 0; l < 4; ++l) {
      __m512i v = _mm512_and_si512(_mm512_loadu_si512(x + i + 16 * l), e);
      bad |= _mm512_cmpeq_epi32_mask(v, e);
    }
  }
  return !bad && FiniteScalar(x + i, n - i);
}

using FiniteFn = bool (*)(const uint32_t*, int64_t);

FiniteFn PickFinite() {
  return __builtin_cpu_supports("avx512f") ? FiniteAvx512 : FiniteScalar;
}

bool Finite(const uint32_t* x, int64_t n) {
  static const FiniteFn check = PickFinite();
  return check(x, n);
}
#else
bool Finite(const uint32_t* x, int64_t n) { return FiniteScalar(x, n); }
#endif

ffi::Error AllFiniteUnguarded(ffi::ThreadPool pool, ffi::RemainingArgs args,
                              ffi::ResultBuffer<ffi::PRED> out) {
  std::vector<Span> spans;
  for (size_t a = 0; a < args.size(); ++a) {
    auto buffer = args.get<ffi::Buffer<ffi::F32>>(a);
    if (buffer.has_error()) return buffer.error();
    const auto* x = reinterpret_cast<const uint32_t*>(buffer->typed_data());
    const int64_t n = static_cast<int64_t>(buffer->element_count());
    for (int64_t b = 0; b < n; b += kSpan) spans.push_back({x + b, std::min(kSpan, n - b)});
  }
  std::atomic<bool> bad{false};  // once set, the spans not yet checked are skipped
  ljax::Parallel(pool, static_cast<int64_t>(spans.size()), [&](int64_t t) {
    if (!bad.load(std::memory_order_relaxed) && !Finite(spans[t].x, spans[t].size)) {
      bad.store(true, std::memory_order_relaxed);
    }
  });
  out->typed_data()[0] = !bad.load();
  return ffi::Error::Success();
}

ffi::Error AllFinite(ffi::ThreadPool pool, ffi::RemainingArgs args,
                     ffi::ResultBuffer<ffi::PRED> out) {
  try {
    return AllFiniteUnguarded(pool, args, out);
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("ljax all_finite: ") + e.what());
  } catch (...) {
    return ffi::Error::Internal("ljax all_finite: unknown C++ exception");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LjaxAllFinite, AllFinite,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::PRED>>());
