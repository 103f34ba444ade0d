// fusedrnn: DLPack export and import at the pybind11 boundary.
//
// The legacy capsule protocol (DLPack 0.8 ABI): __dlpack__() returns a
// PyCapsule named "dltensor" holding a DLManagedTensor. A consumer takes it
// by renaming the capsule "used_dltensor" and calls the tensor's deleter when
// it no longer needs the memory; a capsule dropped unconsumed calls the
// deleter from its own destructor. The structs below restate the public
// DLPack ABI, so no dlpack.h (or CUDA header) is needed to build.
//
// Threads and the GIL: to_capsule and from_capsule touch Python objects and
// need the GIL. Deleters may run on any thread, with or without the GIL:
// ours only destroys the owner (use owner_of() for a Python object), and a
// View calls the producer's deleter from its destructor, wherever that runs.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace fusedrnn {
namespace dlpack {

// ---- The DLPack 0.8 ABI ----------------------------------------------------
enum DeviceType : int32_t { kDLCPU = 1, kDLCUDA = 2, kDLCUDAManaged = 13 };
enum TypeCode : uint8_t { kDLInt = 0, kDLUInt = 1, kDLFloat = 2, kDLBfloat = 4, kDLBool = 6 };

struct DLDevice { int32_t device_type; int32_t device_id; };
struct DLDataType { uint8_t code; uint8_t bits; uint16_t lanes; };
struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;  // in elements; NULL means C-contiguous
  uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor* self);
};

constexpr const char* kUnusedName = "dltensor";
constexpr const char* kUsedName = "used_dltensor";

// C-contiguous (row-major) strides, in elements, for a shape.
inline std::vector<int64_t> c_strides(const std::vector<int64_t>& shape) {
  std::vector<int64_t> s(shape.size());
  int64_t step = 1;
  for (size_t i = shape.size(); i-- > 0;) {
    s[i] = step;
    step *= shape[i] > 1 ? shape[i] : 1;
  }
  return s;
}

// ---- Export ----------------------------------------------------------------
namespace detail {

// What an exported capsule owns: the DLManagedTensor itself, the arrays its
// shape and strides point into, and a reference that keeps the memory alive.
struct Export {
  DLManagedTensor managed{};
  std::vector<int64_t> shape, strides;
  std::shared_ptr<void> owner;
  static void deleter(DLManagedTensor* self) noexcept { delete static_cast<Export*>(self->manager_ctx); }
};

// Runs when the capsule dies. A consumed capsule ("used_dltensor") belongs to
// its consumer, who calls the deleter; only an unconsumed one frees here. The
// error state is kept: the capsule may die while an exception propagates, and
// releasing the owner may run Python code.
inline void capsule_destructor(PyObject* cap) noexcept {
  if (!PyCapsule_IsValid(cap, kUnusedName)) return;
#if PY_VERSION_HEX >= 0x030C0000
  PyObject* err = PyErr_GetRaisedException();
#else
  PyObject *type, *value, *tb;
  PyErr_Fetch(&type, &value, &tb);
#endif
  auto* m = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(cap, kUnusedName));
  if (m && m->deleter) m->deleter(m);
#if PY_VERSION_HEX >= 0x030C0000
  PyErr_SetRaisedException(err);
#else
  PyErr_Restore(type, value, tb);
#endif
}

}  // namespace detail

// An owner that holds a reference to a Python object. Safe to release on any
// thread, with or without the GIL (it takes the GIL to drop the reference).
inline std::shared_ptr<void> owner_of(pybind11::object obj) {
  auto* p = obj.release().ptr();
  return std::shared_ptr<void>(p, [](void* o) {
    if (!Py_IsInitialized()) return;  // interpreter gone: leak, don't crash
    pybind11::gil_scoped_acquire gil;
    Py_DECREF(static_cast<PyObject*>(o));
  });
}

// Exports `data` (C-contiguous, the given shape and dtype, on the given
// device) as a "dltensor" capsule. `owner` keeps the memory alive until the
// consumer calls the deleter, or until the capsule dies unconsumed.
inline pybind11::capsule to_capsule(std::shared_ptr<void> owner, void* data, std::vector<int64_t> shape,
                                    uint8_t code, uint8_t bits, int32_t device_type, int32_t device_id) {
  for (int64_t d : shape)
    if (d < 0) throw pybind11::value_error("dlpack: negative dimension in shape");
  auto ex = std::make_unique<detail::Export>();
  ex->strides = c_strides(shape);
  ex->shape = std::move(shape);
  ex->owner = std::move(owner);
  DLTensor& t = ex->managed.dl_tensor;
  t.data = data;
  t.device = {device_type, device_id};
  t.ndim = static_cast<int32_t>(ex->shape.size());
  t.dtype = {code, bits, 1};
  t.shape = ex->shape.data();
  t.strides = ex->strides.data();
  t.byte_offset = 0;
  ex->managed.manager_ctx = ex.get();
  ex->managed.deleter = &detail::Export::deleter;
  PyObject* cap = PyCapsule_New(&ex->managed, kUnusedName, &detail::capsule_destructor);
  if (!cap) throw pybind11::error_already_set();
  ex.release();  // the capsule (then its consumer) owns it now
  return pybind11::reinterpret_steal<pybind11::capsule>(cap);
}

// ---- Import ----------------------------------------------------------------

// A consumed DLPack tensor. Holds the producer's DLManagedTensor and calls its
// deleter when destroyed, so the memory stays valid while the View lives.
struct View {
  void* data = nullptr;  // byte_offset already applied
  int32_t device_type = 0, device_id = 0;
  uint8_t code = 0, bits = 0;
  uint16_t lanes = 1;
  std::vector<int64_t> shape, strides;  // strides in elements (C strides when the producer gave NULL)

  int64_t numel() const { int64_t n = 1; for (int64_t d : shape) n *= d; return n; }
  size_t itemsize() const { return (size_t(bits) * lanes + 7) / 8; }

  View() = default;
  View(const View&) = delete;
  View& operator=(const View&) = delete;
  ~View() {
    if (managed_ && managed_->deleter) managed_->deleter(managed_);
  }

 private:
  DLManagedTensor* managed_ = nullptr;
  friend std::shared_ptr<View> from_capsule(pybind11::capsule cap);
};

// Consumes a "dltensor" capsule. Checks come first: on an error the capsule
// is left unconsumed, and its own destructor frees the tensor.
inline std::shared_ptr<View> from_capsule(pybind11::capsule cap) {
  PyObject* p = cap.ptr();
  if (!PyCapsule_IsValid(p, kUnusedName)) {
    if (PyCapsule_IsValid(p, kUsedName))
      throw pybind11::value_error("dlpack: this capsule was already consumed (a DLPack capsule can be used only once)");
    if (PyCapsule_IsValid(p, "dltensor_versioned"))
      throw pybind11::value_error("dlpack: versioned (DLPack 1.x) capsules are not supported; call __dlpack__() "
                                  "without max_version");
    throw pybind11::value_error("dlpack: expected a PyCapsule named 'dltensor' (not a DLPack capsule)");
  }
  auto* m = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(p, kUnusedName));
  if (!m) throw pybind11::error_already_set();
  const DLTensor& t = m->dl_tensor;
  if (t.dtype.lanes != 1)
    throw pybind11::value_error("dlpack: vector dtypes (lanes=" + std::to_string(t.dtype.lanes) +
                                ") are not supported");
  if (t.ndim < 0 || (t.ndim > 0 && !t.shape)) throw pybind11::value_error("dlpack: malformed tensor (ndim/shape)");

  auto v = std::make_shared<View>();
  v->data = reinterpret_cast<void*>(reinterpret_cast<uintptr_t>(t.data) + t.byte_offset);
  v->device_type = t.device.device_type;
  v->device_id = t.device.device_id;
  v->code = t.dtype.code;
  v->bits = t.dtype.bits;
  v->lanes = t.dtype.lanes;
  v->shape.assign(t.shape, t.shape + t.ndim);
  if (t.strides)
    v->strides.assign(t.strides, t.strides + t.ndim);
  else
    v->strides = c_strides(v->shape);

  if (PyCapsule_SetName(p, kUsedName) != 0) throw pybind11::error_already_set();
  v->managed_ = m;  // from here on the View owns the tensor
  return v;
}

// True when the elements are laid out C-contiguously (row-major, no gaps).
// Like NumPy, dimensions of size 1 may have any stride, and an empty tensor
// counts as contiguous.
inline bool is_c_contiguous(const View& v) {
  for (int64_t d : v.shape)
    if (d == 0) return true;
  int64_t expect = 1;
  for (size_t i = v.shape.size(); i-- > 0;) {
    if (v.shape[i] == 1) continue;
    if (v.strides[i] != expect) return false;
    expect *= v.shape[i];
  }
  return true;
}

}  // namespace dlpack
}  // namespace fusedrnn
