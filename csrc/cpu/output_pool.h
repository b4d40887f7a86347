// Memory for the cpu ops' large outputs (y, the saved gates/cells, grad_gx, ...), reused
// across calls instead of coming fresh from the system allocator each time.
//
// Why: with glibc's default settings the buffers of one training iteration go back to the
// kernel when they are freed (the heap top is trimmed, large blocks are unmapped), so the
// next iteration page-faults all of them in again. Measured on the 2-core VM, a training
// loop of fusedrnn.LSTM alone (B=64, H=256, T=32): ~6500 minor faults and 15-20 ms of
// kernel time per forward+backward, most of them on the first writes into these outputs;
// with this pool ~100 faults, 0.2 ms, and the iteration 52-58 -> 42-49 ms (torch.nn: 47).
// (Benchmarks that interleave torch.nn and fusedrnn calls hide this: the other model's
// allocations keep the heap from being trimmed.)
//
// The outputs are ordinary tensors whose storage comes from this c10::Allocator: a freed
// block returns to the pool unless that would put the pool over its cap (then the oldest
// blocks go back to the system); an allocation takes the oldest pooled block of at least
// its size and at most twice it, else a new one. Blocks below kMinBytes are not pooled.
// The kernels' packed weights (16 MB for an LSTM layer of hidden size 1024, packed on
// every call) take their memory from it as well. FUSEDRNN_CPU_POOL_MB sets the cap
// (default 256; 0 turns pooling off).
#pragma once

#include <ATen/EmptyTensor.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>
#include <pthread.h>

#include <algorithm>
#include <cstdlib>
#include <list>
#include <chrono>
#include <mutex>
#include <thread>
#include <utility>

namespace fusedrnn {
namespace cpu {

class OutputPool final : public c10::Allocator {
 public:
  static constexpr size_t kMinBytes = 1 << 20;
  static constexpr size_t kAlign = 64;

  static OutputPool& get() {
    static OutputPool* pool = new OutputPool();  // never destroyed: tensors may be freed at exit
    return *pool;
  }

  // An uninitialized tensor like at::empty(shape, options) (CPU, contiguous).
  at::Tensor empty(at::IntArrayRef shape, const at::TensorOptions& options) {
    size_t bytes = options.dtype().itemsize();
    for (int64_t s : shape) bytes *= (size_t)s;
    if (cap_ == 0 || bytes < kMinBytes) return at::empty(shape, options);
    return at::detail::empty_generic(shape, this, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                     c10::typeMetaToScalarType(options.dtype()), c10::nullopt);
  }

  size_t pooled_bytes() {
    std::lock_guard<std::mutex> lock(mu_);
    return pooled_;
  }

  // Also used directly for the kernels' packed weights (register.cpp, Scratch).
  c10::DataPtr allocate(size_t n) override {
    Block* b = cap_ > 0 && n >= kMinBytes ? take(n) : nullptr;
    if (!b) {
      const size_t size = std::max<size_t>(kAlign, (n + kAlign - 1) / kAlign * kAlign);
      void* p = std::aligned_alloc(kAlign, size);
      TORCH_CHECK(p, "fusedrnn: out of memory allocating ", size, " bytes");
      b = new Block{p, size};
    }
    return {b->ptr, b, &OutputPool::release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  struct Block {
    void* ptr;
    size_t size;
  };

  OutputPool() {
    const char* e = std::getenv("FUSEDRNN_CPU_POOL_MB");
    const long long mb = e ? std::atoll(e) : 256;
    cap_ = mb > 0 ? (size_t)mb << 20 : 0;
    // A fork() while another thread holds mu_ would leave the child's copy of it locked for
    // good (its first pooled allocation would hang): hold mu_ across fork(), as glibc does
    // for malloc's locks. The critical sections are short and never wait for the GIL.
    pthread_atfork([] { get().mu_.lock(); }, [] { get().mu_.unlock(); }, [] { get().mu_.unlock(); });
  }

 public:
  // Test hook: a background thread holds the pool's lock for `ms` milliseconds.
  void hold_lock_for_test(int ms) {
    std::thread([this, ms] {
      std::lock_guard<std::mutex> lock(mu_);
      std::this_thread::sleep_for(std::chrono::milliseconds(ms));
    }).detach();
    std::this_thread::sleep_for(std::chrono::milliseconds(10));  // (so that it holds it on return)
  }

 private:

  static void release(void* ctx) { get().give(static_cast<Block*>(ctx)); }

  // The oldest pooled block of [n, 2n] bytes, or null.
  Block* take(size_t n) {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if ((*it)->size >= n && (*it)->size <= 2 * n) {
        Block* b = *it;
        pooled_ -= b->size;
        free_.erase(it);
        return b;
      }
    }
    return nullptr;
  }

  void give(Block* b) {
    if (cap_ == 0 || b->size < kMinBytes) {  // not worth pooling
      std::free(b->ptr);
      delete b;
      return;
    }
    std::list<Block*> evicted;
    {
      std::lock_guard<std::mutex> lock(mu_);
      free_.push_back(b);
      pooled_ += b->size;
      while (pooled_ > cap_ && !free_.empty()) {  // oldest first
        pooled_ -= free_.front()->size;
        evicted.splice(evicted.end(), free_, free_.begin());
      }
    }
    for (Block* e : evicted) {
      std::free(e->ptr);
      delete e;
    }
  }

  std::mutex mu_;
  std::list<Block*> free_;  // oldest first
  size_t pooled_ = 0;
  size_t cap_ = 0;
};

}  // namespace cpu
}  // namespace fusedrnn
