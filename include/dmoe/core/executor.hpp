// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "namespace.hpp"
/// \file
/// CPU parallelism goes only through an executor passed in the context: no global thread knobs.
/// Work is cut into tasks whose boundaries never depend on the thread count, so results are
/// bitwise identical whichever thread runs a task.

#include <atomic>
#include <cstdint>
#include <type_traits>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "config.hpp"

DMOE_NAMESPACE_BEGIN

/// Runs independent tasks. Implementations must run every task in [0, n) exactly once and
/// return when all have finished.
class executor {
 public:
  virtual ~executor() = default;
  /// Largest number of tasks that may run at once; worker ids are in [0, concurrency()).
  virtual index_t concurrency() const noexcept = 0;

  /// Calls f(task, worker) for each task in [0, n). `worker` identifies the calling thread so
  /// that per-thread scratch can be indexed without locks. f must not throw.
  template <class F>
  void parallel_for(index_t n, F&& f) noexcept {
    if (n <= 0) return;
    using Fn = std::remove_reference_t<F>;
    run(n, [](void* ctx, index_t task, index_t worker) noexcept { (*static_cast<Fn*>(ctx))(task, worker); },
        const_cast<void*>(static_cast<const void*>(&f)));
  }

 protected:
  using task_fn = void (*)(void*, index_t, index_t) noexcept;
  virtual void run(index_t n, task_fn fn, void* ctx) noexcept = 0;
};

/// Runs every task on the calling thread.
class inline_executor final : public executor {
 public:
  index_t concurrency() const noexcept override { return 1; }

 protected:
  void run(index_t n, task_fn fn, void* ctx) noexcept override {
    for (index_t i = 0; i < n; ++i) fn(ctx, i, 0);
  }
};

/// A fixed pool of std::threads; the calling thread takes part as worker 0. Tasks are handed
/// out dynamically (atomic counter), which balances uneven experts without changing results.
/// Calls from several threads are serialised; a call from inside a task runs inline.
class thread_pool final : public executor {
 public:
  /// threads: total concurrency including the caller (>= 1).
  explicit thread_pool(int threads) : size_(threads < 1 ? 1 : threads) {
    workers_.reserve(static_cast<std::size_t>(size_ - 1));
    for (index_t w = 1; w < size_; ++w) workers_.emplace_back([this, w] { worker_loop(w); });
  }
  thread_pool(const thread_pool&) = delete;
  thread_pool& operator=(const thread_pool&) = delete;
  ~thread_pool() override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_.store(true, std::memory_order_release);
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
  }

  index_t concurrency() const noexcept override { return size_; }

 protected:
  void run(index_t n, task_fn fn, void* ctx) noexcept override {
    if (size_ == 1 || n == 1 || inside_task()) {
      for (index_t i = 0; i < n; ++i) fn(ctx, i, 0);
      return;
    }
    std::lock_guard<std::mutex> serial(run_mutex_);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      fn_ = fn;
      ctx_ = ctx;
      n_ = n;
      next_.store(0, std::memory_order_relaxed);
      busy_.store(size_ - 1, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    work(0);
    // Workers finish within microseconds of the last task; spin briefly, then block.
    for (int spin = 0; busy_.load(std::memory_order_acquire) != 0; ++spin) {
      if (spin > 4000) {
        std::unique_lock<std::mutex> lock(mutex_);
        done_.wait(lock, [this] { return busy_.load(std::memory_order_acquire) == 0; });
        break;
      }
      std::this_thread::yield();
    }
  }

 private:
  static bool& inside_task() noexcept {
    thread_local bool flag = false;
    return flag;
  }

  void work(index_t worker) noexcept {
    inside_task() = true;
    for (index_t i = next_.fetch_add(1, std::memory_order_relaxed); i < n_;
         i = next_.fetch_add(1, std::memory_order_relaxed))
      fn_(ctx_, i, worker);
    inside_task() = false;
  }

  void worker_loop(index_t worker) {
    std::uint64_t seen = 0;
    for (;;) {
      // Spin a little for back-to-back calls (decode latency), then sleep.
      std::uint64_t g = generation_.load(std::memory_order_acquire);
      for (int spin = 0; g == seen && spin < 2000; ++spin) {
        std::this_thread::yield();
        g = generation_.load(std::memory_order_acquire);
      }
      if (g == seen) {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
        g = generation_.load(std::memory_order_acquire);
      }
      seen = g;
      if (stop_.load(std::memory_order_acquire)) return;
      work(worker);
      if (busy_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> lock(mutex_);
        done_.notify_one();
      }
    }
  }

  index_t size_;
  std::vector<std::thread> workers_;
  std::mutex run_mutex_;
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  std::atomic<std::uint64_t> generation_{0};
  std::atomic<index_t> next_{0};
  std::atomic<index_t> busy_{0};
  task_fn fn_ = nullptr;
  void* ctx_ = nullptr;
  index_t n_ = 0;
  std::atomic<bool> stop_{false};
};

DMOE_NAMESPACE_END  // namespace dmoe
