// ParallelRows: the work split every gptjax CPU kernel uses (shared by cpu_matmul.cc and cpu_int4.cc).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace gptjax {

constexpr int64_t kTaskRows = 64;  // rows of w per work item (64 x K bytes or 2-byte values: L2-resident)

// Run body(n0, n1) over [0, N) in chunks (of kTaskRows by default) on the calling thread and the XLA pool. Chunks are
// claimed from a shared counter, so the caller never waits for a helper to start (no deadlock if the pool is
// busy); a helper that starts after all chunks are claimed just exits.
template <typename Body>
void ParallelRows(xla::ffi::ThreadPool& pool, int64_t N, const Body& body, int64_t chunk = kTaskRows) {
  const int64_t chunks = (N + chunk - 1) / chunk;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks) - 1;
  struct State {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto state = std::make_shared<State>();
  auto run = [state, chunks, chunk, N, body]() {
    for (int64_t c; (c = state->next.fetch_add(1)) < chunks;) {
      body(c * chunk, std::min(N, (c + 1) * chunk));
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([run]() { run(); });
  run();
  while (state->done.load(std::memory_order_acquire) < chunks) _mm_pause();
}

}  // namespace gptjax
