// Running work on XLA's intra-op thread pool from an FFI handler, shared by ljax's CPU kernels
// (topk_mask.cc, all_finite.cc).
#ifndef LJAX_CSRC_THREAD_POOL_H_
#define LJAX_CSRC_THREAD_POOL_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace ljax {

// Runs body(chunk) for chunk in [0, chunks) on the pool and the calling thread.
struct Shared {
  std::atomic<int64_t> next{0}, done{0};
  int64_t chunks = 0;
  std::function<void(int64_t)> body;
  std::mutex mutex;
  std::condition_variable cv;
  std::exception_ptr error;
};

inline void Work(const std::shared_ptr<Shared>& s) {
  for (;;) {
    int64_t c = s->next.fetch_add(1);
    if (c >= s->chunks) return;
    try {
      s->body(c);
    } catch (...) {
      std::lock_guard<std::mutex> lock(s->mutex);
      if (!s->error) s->error = std::current_exception();
    }
    if (s->done.fetch_add(1) + 1 == s->chunks) {
      std::lock_guard<std::mutex> lock(s->mutex);
      s->cv.notify_all();
    }
  }
}

inline void Parallel(xla::ffi::ThreadPool& pool, int64_t chunks,
                     std::function<void(int64_t)> body) {
  if (chunks <= 0) return;
  auto s = std::make_shared<Shared>();
  s->chunks = chunks;
  s->body = std::move(body);
  int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([s] { Work(s); });
  Work(s);
  {
    std::unique_lock<std::mutex> lock(s->mutex);
    s->cv.wait(lock, [&] { return s->done.load() == s->chunks; });
  }
  s->body = nullptr;  // a helper that starts late finds no chunk and never calls it
  if (s->error) std::rethrow_exception(s->error);
}

}  // namespace ljax

#endif  // LJAX_CSRC_THREAD_POOL_H_
