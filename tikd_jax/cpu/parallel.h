// Work spread over XLA:CPU's intra-op thread pool, for the C++ kernels beside this file
// (attention.cc, winograd.cc; kernels.py builds them with it).
#ifndef TIKD_JAX_CPU_PARALLEL_H_
#define TIKD_JAX_CPU_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace tikd {

// Runs body(item, scratch) for every item in [0, items) on the calling thread and the intra-op
// pool, each thread with `scratch_floats` floats of scratch of its own. Items go out in chunks of
// about 1/32 of a thread's share: few atomic claims, and the threads finish within a chunk of
// each other even when one starts late. The counters are shared, so a pool task that starts
// after the call returned finds no work and touches nothing else.
template <typename Body>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t items, int64_t scratch_floats, Body body) {
  struct Progress {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto progress = std::make_shared<Progress>();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t chunk = std::max<int64_t>(1, items / (32 * threads));
  const int64_t chunks = (items + chunk - 1) / chunk;
  auto work = [=]() {
    std::vector<float> scratch(scratch_floats);
    for (int64_t q; (q = progress->next.fetch_add(1)) < chunks;) {
      for (int64_t e = q * chunk; e < std::min(items, (q + 1) * chunk); ++e)
        body(e, scratch.data());
      progress->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < threads && t < chunks; ++t) pool.Schedule([work]() { work(); });
  work();
  while (progress->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

}  // namespace tikd

#endif  // TIKD_JAX_CPU_PARALLEL_H_
