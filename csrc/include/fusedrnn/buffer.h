// fusedrnn: an owning, 64-byte aligned, uninitialised array of T (NaN in
// checking builds, FUSEDRNN_POISON_BUFFERS), whose
// memory comes from (and returns to) a small cache of large blocks
// (csrc/cpu/workspace.cpp).
#pragma once

#include <cstdlib>
#include <cstring>
#include <utility>

#include "fusedrnn/common.h"

namespace fusedrnn {

void* workspace_alloc(std::size_t bytes);  // 64-byte aligned; throws std::bad_alloc
void workspace_free(void* p, std::size_t bytes);
std::size_t workspace_cached_bytes();
// The most bytes kept: 256 MiB, or the most the process has had alive at
// once (working memory and returned arrays), up to a quarter of the RAM.
std::size_t workspace_keep_limit();
void workspace_release();  // return every cached block to the system
// Bytes of Buffers alive now (caches included), and the most alive at once
// since workspace_reset_peak() (which sets it to the bytes alive now).
std::size_t workspace_in_use_bytes();
std::size_t workspace_peak_bytes();
void workspace_reset_peak();
// Memory for an array a call returns of at least output_block_min() bytes
// (smaller ones come from NumPy), 64-byte aligned: from and back to the kept
// blocks, not counted as working memory. Any thread may free.
void* output_alloc(std::size_t bytes);  // throws std::bad_alloc
void output_free(void* p, std::size_t bytes);
std::size_t output_block_min();

template <typename T>
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(std::size_t n) { resize(n); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  Buffer(Buffer&& o) noexcept : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  Buffer& operator=(Buffer&& o) noexcept {
    std::swap(p_, o.p_);
    std::swap(n_, o.n_);
    return *this;
  }
  ~Buffer() { workspace_free(p_, n_ * sizeof(T)); }

  // Drops the old contents; throws std::bad_alloc when the memory cannot be had.
  void resize(std::size_t n) {
    workspace_free(p_, n_ * sizeof(T));
    p_ = nullptr;
    n_ = 0;
    if (n == 0) return;
    p_ = static_cast<T*>(workspace_alloc(checked_mul(n, sizeof(T))));
    n_ = n;
#ifdef FUSEDRNN_POISON_BUFFERS
    // Checking builds: new contents are NaN (all bits set), so a value read
    // before it is written shows in the results instead of passing unseen.
    std::memset(p_, 0xff, n_ * sizeof(T));
#endif
  }
  void zero() {
    if (n_) std::memset(p_, 0, n_ * sizeof(T));
  }

  T* data() { return p_; }
  const T* data() const { return p_; }
  std::size_t size() const { return n_; }
  std::size_t nbytes() const { return n_ * sizeof(T); }

 private:
  T* p_ = nullptr;
  std::size_t n_ = 0;
};

}  // namespace fusedrnn
