// The backward's gradient buffers, recycled: a small cache of the buffers the library hands to torch
// (through DLPack), so that a training loop's next step writes its logits' gradients into memory the
// process already has instead of fresh pages the kernel must fault in and zero (measured on synapse2d:
// ~2 000 faults and ~10-15 ms of a ~110 ms step whenever glibc had returned the last step's gradients
// to the system, which it does when they sit at the top of its heap).
//
// A buffer is taken for each gradient tensor; torch calls the DLPack deleter when the tensor's storage
// dies (the .grad is set to None, or the network's backward has consumed it), which gives the buffer
// back. The cache holds at most the bytes of the largest single backward (its cap): one step's
// gradients, the steady state of a training loop; older buffers beyond it are freed. Thread-safe (the
// deleter runs on whichever thread drops the tensor, without the GIL).
#pragma once

#include <cstdlib>
#include <deque>
#include <mutex>
#include <utility>

#include "common.h"

namespace {

// DLPack 0.8 (dlpack.h), the parts a CPU tensor uses: the ABI torch.from_dlpack reads.
struct DLDevice { int32_t device_type, device_id; };   // kDLCPU = 1
struct DLDataType { uint8_t code, bits; uint16_t lanes; };  // code: kDLFloat = 2, kDLBfloat = 4
struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;  // in elements
  uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor*);
};

constexpr int POOL_MAX_DIMS = 8;

class GradPool {
 public:
  // A buffer of at least `bytes` (64-byte aligned; 2 MiB aligned when it is that large, so that the
  // backward's transparent-huge-page hint, advise_huge_pages, covers all of it), from the cache when one
  // of that size is there.
  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto it = free_.rbegin(); it != free_.rend(); ++it)  // newest first: likeliest in cache
        if (it->first == bytes) {
          void* p = it->second;
          cached_ -= bytes;
          free_.erase(std::next(it).base());
          return p;
        }
    }
    const size_t huge = (size_t)2 << 20, align = bytes >= huge ? huge : ALIGN;
    void* p = nullptr;
    if (posix_memalign(&p, align, (bytes + align - 1) / align * align) != 0) return nullptr;
    return p;
  }

  // Back into the cache (the oldest cached buffers are freed while the cache is over its cap).
  void give(void* p, size_t bytes) {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      free_.emplace_back(bytes, p);
      cached_ += bytes;
      while (cached_ > cap_ && !free_.empty()) {
        drop.push_back(free_.front().second);
        cached_ -= free_.front().first;
        free_.pop_front();
      }
    }
    for (void* q : drop) std::free(q);
  }

  // One backward's gradients take `bytes` in all: the cache may hold that much.
  void reserve(size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    cap_ = std::max(cap_, bytes);
  }

  // Free every cached buffer and forget the cap (buffers still held by tensors come back later and
  // are then freed, unless a new backward has set a cap again).
  void release() {
    std::deque<std::pair<size_t, void*>> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      drop.swap(free_);
      cached_ = 0;
      cap_ = 0;
    }
    for (auto& e : drop) std::free(e.second);
  }

  size_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mu_);
    return cached_;
  }

 private:
  std::mutex mu_;
  std::deque<std::pair<size_t, void*>> free_;  // (bytes, buffer), oldest first
  size_t cached_ = 0, cap_ = 0;
};

GradPool& grad_pool() {
  static GradPool* pool = new GradPool();  // never destroyed: tensors may give buffers back at exit
  return *pool;
}

// A DLPack tensor with its shape and strides, owning one pool buffer.
struct PooledTensor {
  DLManagedTensor managed;
  int64_t shape[POOL_MAX_DIMS], strides[POOL_MAX_DIMS];
  size_t bytes;
};

void pooled_tensor_deleter(DLManagedTensor* m) {
  PooledTensor* t = (PooledTensor*)m->manager_ctx;
  grad_pool().give(m->dl_tensor.data, t->bytes);
  delete t;
}

// A contiguous CPU tensor of `shape` (ndim ≤ POOL_MAX_DIMS) and dtype (code, bits) over a pool buffer;
// null when out of memory or the arguments are out of range.
DLManagedTensor* pooled_tensor(int ndim, const int64_t* shape, int code, int bits) {
  if (ndim < 0 || ndim > POOL_MAX_DIMS || bits <= 0 || bits % 8) return nullptr;
  PooledTensor* t = new (std::nothrow) PooledTensor();
  if (!t) return nullptr;
  size_t elems = 1;
  for (int d = ndim - 1; d >= 0; --d) {
    t->shape[d] = shape[d];
    t->strides[d] = (int64_t)elems;
    elems *= (size_t)shape[d];
  }
  t->bytes = std::max<size_t>(elems * (size_t)(bits / 8), 1);
  void* data = grad_pool().take(t->bytes);
  if (!data) {
    delete t;
    return nullptr;
  }
  t->managed.dl_tensor = DLTensor{data, DLDevice{1, 0}, ndim, DLDataType{(uint8_t)code, (uint8_t)bits, 1},
                                  t->shape, t->strides, 0};
  t->managed.manager_ctx = t;
  t->managed.deleter = pooled_tensor_deleter;
  return &t->managed;
}

}  // namespace
