// The core's one thread split: body(lo, hi) over contiguous, disjoint ranges covering
// [begin, end), each at least `grain` items long (but for a short range). Runs inline
// when the range is small or one thread is asked for; otherwise the calling thread takes
// the first range and joins the others.
#pragma once

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

namespace pyengine::core {

// Threads parallel_for may use: the hardware's, or at most max_threads when positive.
inline std::int64_t thread_limit(int max_threads = 0) {
  const auto hardware = std::max<std::int64_t>(1, std::thread::hardware_concurrency());
  return max_threads > 0 ? std::min<std::int64_t>(max_threads, hardware) : hardware;
}

template <typename F>
void parallel_for(std::int64_t begin, std::int64_t end, std::int64_t grain, F&& body, int max_threads = 0) {
  const std::int64_t n = end - begin;
  if (n <= 0) return;
  const std::int64_t threads =
      std::clamp<std::int64_t>(n / std::max<std::int64_t>(1, grain), 1, thread_limit(max_threads));
  if (threads == 1) {
    body(begin, end);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(static_cast<std::size_t>(threads - 1));
  for (std::int64_t t = 1; t < threads; ++t) {
    pool.emplace_back([&body, begin, n, threads, t] { body(begin + n * t / threads, begin + n * (t + 1) / threads); });
  }
  body(begin, begin + n / threads);
  for (auto& thread : pool) thread.join();
}

}  // namespace pyengine::core
