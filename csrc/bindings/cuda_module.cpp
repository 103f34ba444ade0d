// fusedrnn._cuda: the pybind11 boundary of the CUDA backend.
//
// The Python layer (python/fusedrnn/_device.py) turns device arrays (torch,
// CuPy, JAX, anything with __cuda_array_interface__ or DLPack) into raw
// pointers after checking shapes, dtypes and devices, and allocates the
// outputs with the caller's own library. This module checks again what it
// can (every pointer is device memory on the call's device) and runs the
// kernels on the caller's stream without the GIL. It imports on machines
// without a GPU or driver: device_count() is then 0 and device_status() says why.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cuda/runtime.h"

#include <cstdint>
#include <memory>
#include <string>

#include "bindings/cell_names.h"
#include "bindings/dlpack.h"
#include "cuda/cublas_dyn.h"
#include "cuda/rnn_cuda.h"

namespace py = pybind11;
using namespace fusedrnn;
using namespace fusedrnn::cuda;

namespace {

DType parse_dtype(const std::string& s) {
  if (s == "float32") return DType::F32;
  if (s == "float16") return DType::F16;
  if (s == "bfloat16") return DType::BF16;
  throw py::type_error("dtype must be float32, float16 or bfloat16 on a CUDA device, got " + s);
}

const char* dtype_name(DType d) {
  switch (d) {
    case DType::F32: return "float32";
    case DType::F16: return "float16";
    case DType::BF16: return "bfloat16";
  }
  return "?";
}

Algo parse_algo(const std::string& s) {
  if (s == "auto") return Algo::Auto;
  if (s == "standard") return Algo::Standard;
  if (s == "persistent") return Algo::Persistent;
  if (s == "benchmark") return Algo::Benchmark;
  throw py::value_error("algo must be 'auto', 'standard', 'persistent' or 'benchmark', got '" +
                        s + "'");
}

const char* algo_name(Algo a) {
  switch (a) {
    case Algo::Auto: return "auto";
    case Algo::Standard: return "standard";
    case Algo::Persistent: return "persistent";
    case Algo::Benchmark: return "benchmark";
  }
  return "?";
}

// The device a pointer's memory lives on, or -1 when it is not device memory.
int pointer_device(uintptr_t ptr) {
  if (!ptr) return -1;
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(ptr)) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged) return -1;
  return attr.device;
}

const void* device_ptr(const char* name, uintptr_t ptr, int device, bool optional) {
  if (!ptr) {
    if (optional) return nullptr;
    throw py::value_error(std::string(name) + " must be an array on CUDA device " +
                          std::to_string(device) + ", got a null pointer");
  }
  const int d = pointer_device(ptr);
  if (d != device)
    throw py::value_error(std::string(name) + " must be an array on CUDA device " +
                          std::to_string(device) + ", got " +
                          (d < 0 ? std::string("memory that is not CUDA device memory")
                                 : "an array on CUDA device " + std::to_string(d)));
  return reinterpret_cast<const void*>(ptr);
}

void* device_out(const char* name, uintptr_t ptr, int device, bool optional) {
  return const_cast<void*>(device_ptr(name, ptr, device, optional));
}

cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

// Owned device memory for outputs of callers whose array library cannot
// allocate (plain __cuda_array_interface__ producers): freed in stream order.
struct DeviceBuffer {
  void* ptr = nullptr;
  std::size_t nbytes = 0;
  int device = 0;
  cudaStream_t stream = nullptr;
  DeviceBuffer(std::size_t n, int dev, uintptr_t st)
      : ptr(device_alloc(n ? n : 1, dev, as_stream(st))), nbytes(n), device(dev),
        stream(as_stream(st)) {}
  ~DeviceBuffer() { device_free(ptr, device, stream); }
};

}  // namespace

#ifndef FUSEDRNN_CUDA_MODULE
#define FUSEDRNN_CUDA_MODULE _cuda
#endif

PYBIND11_MODULE(FUSEDRNN_CUDA_MODULE, m) {
  m.doc() = "fusedrnn's CUDA kernels (optional build); see fusedrnn._device for the Python side";

  m.def("device_count", []() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    return n;
  });
  m.def("device_status", []() -> std::string {
    int n = 0;
    const cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
      cudaGetLastError();
      return std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
    }
    return std::to_string(n) + " CUDA device(s)";
  });
  m.def("device_name", [](int dev) {
    cudaDeviceProp prop{};
    check(cudaGetDeviceProperties(&prop, dev), "cudaGetDeviceProperties");
    return std::string(prop.name);
  });
  m.def("runtime_version", []() {
    int v = 0;
    cudaRuntimeGetVersion(&v);
    return v;
  });
  m.def("pointer_device", &pointer_device, py::arg("ptr"),
        "The CUDA device holding ptr's memory, or -1 when it is not device memory.");
  m.def("load_cublas", &load_cublas, py::arg("dir") = std::string());
  m.def("cublas_path", &cublas_path);
#ifdef FUSEDRNN_CUDA_EMULATE
  m.def("take_gemm_log", &take_gemm_log,
        "(m, n, k) of every GEMM run since the last call, in order (the emulator only).");
  m.def("take_launch_log", &::emu::take_launch_log,
        "'grid' or 'cluster' for every persistent launch since the last call, in order "
        "(the emulator only).");
#endif
  m.def("cublas_values", []() {
    py::dict d;
    d["CUBLAS_OP_N"] = static_cast<int>(blas::N);
    d["CUBLAS_OP_T"] = static_cast<int>(blas::T);
    d["CUDA_R_32F"] = static_cast<int>(blas::R32F);
    d["CUDA_R_16F"] = static_cast<int>(blas::R16F);
    d["CUDA_R_16BF"] = static_cast<int>(blas::R16BF);
    d["CUBLAS_COMPUTE_32F"] = blas::kCompute32F;
    d["CUBLAS_GEMM_DEFAULT"] = blas::kGemmDefault;
    d["CUBLAS_DEFAULT_MATH"] = blas::kDefaultMath;
    d["CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION"] = blas::kNoReducedPrecisionReduction;
    return d;
  }, "The cuBLAS enum values this build declares (checked against cublas_api.h by the tests).");
  m.def("synchronize", [](int dev) {
    DeviceGuard guard(dev);
    cudaError_t e;
    {
      py::gil_scoped_release nogil;
      e = cudaDeviceSynchronize();
    }
    check(e, "cudaDeviceSynchronize");
  });
  m.def("memcpy_to_host", [](uintptr_t src, std::size_t nbytes, uintptr_t stream) {
    std::string out(nbytes, '\0');
    if (nbytes) {
      cudaError_t e;
      {
        py::gil_scoped_release nogil;
        e = cudaMemcpyAsync(out.data(), reinterpret_cast<const void*>(src), nbytes,
                            cudaMemcpyDeviceToHost, as_stream(stream));
        if (e == cudaSuccess) e = cudaStreamSynchronize(as_stream(stream));
      }
      check(e, "cudaMemcpy (device to host)");
    }
    return py::bytes(out);
  });
  m.def("memcpy_from_host", [](uintptr_t dst, py::buffer src, uintptr_t stream) {
    py::buffer_info info = src.request();
    const std::size_t n = static_cast<std::size_t>(info.size * info.itemsize);
    if (n) {
      cudaError_t e;
      {
        py::gil_scoped_release nogil;
        e = cudaMemcpyAsync(reinterpret_cast<void*>(dst), info.ptr, n, cudaMemcpyHostToDevice,
                            as_stream(stream));
        if (e == cudaSuccess) e = cudaStreamSynchronize(as_stream(stream));
      }
      check(e, "cudaMemcpy (host to device)");
    }
  });

  py::class_<DeviceBuffer, std::shared_ptr<DeviceBuffer>>(m, "DeviceBuffer", py::module_local())
      .def(py::init<std::size_t, int, uintptr_t>(), py::arg("nbytes"), py::arg("device"),
           py::arg("stream") = 0)
      .def_property_readonly("ptr", [](const DeviceBuffer& b) { return reinterpret_cast<uintptr_t>(b.ptr); })
      .def_readonly("nbytes", &DeviceBuffer::nbytes)
      .def_readonly("device", &DeviceBuffer::device);

  m.def("stream_synchronize", [](uintptr_t stream) {
    cudaError_t e;
    {
      py::gil_scoped_release nogil;
      e = cudaStreamSynchronize(as_stream(stream));
    }
    check(e, "cudaStreamSynchronize");
  });

  // DLPack: import any producer's CUDA tensor; export DeviceBuffer memory.
  py::class_<dlpack::View, std::shared_ptr<dlpack::View>>(m, "DLView", py::module_local())
      .def_property_readonly("ptr", [](const dlpack::View& v) { return reinterpret_cast<uintptr_t>(v.data); })
      .def_property_readonly("shape", [](const dlpack::View& v) { return py::tuple(py::cast(v.shape)); })
      .def_property_readonly("strides", [](const dlpack::View& v) { return py::tuple(py::cast(v.strides)); })
      .def_readonly("device_type", &dlpack::View::device_type)
      .def_readonly("device_id", &dlpack::View::device_id)
      .def_property_readonly("dtype", [](const dlpack::View& v) -> std::string {
        if (v.code == dlpack::kDLFloat && v.bits == 32) return "float32";
        if (v.code == dlpack::kDLFloat && v.bits == 16) return "float16";
        if (v.code == dlpack::kDLFloat && v.bits == 64) return "float64";
        if (v.code == dlpack::kDLBfloat && v.bits == 16) return "bfloat16";
        if (v.code == dlpack::kDLInt && v.bits == 32) return "int32";
        if (v.code == dlpack::kDLInt && v.bits == 64) return "int64";
        if (v.code == dlpack::kDLUInt && v.bits == 8) return "uint8";
        if (v.code == dlpack::kDLBool && v.bits == 8) return "bool";
        return "dlpack(code=" + std::to_string(v.code) + ", bits=" + std::to_string(v.bits) + ")";
      });
  m.def("from_dlpack_capsule", &dlpack::from_capsule, py::arg("capsule"),
        "Consume a DLPack capsule; the view keeps the producer's tensor alive.");
  m.def("to_dlpack", [](std::shared_ptr<DeviceBuffer> buf, std::vector<int64_t> shape,
                        const std::string& dtype) {
    uint8_t code = dlpack::kDLFloat, bits = 32;
    if (dtype == "float16") bits = 16;
    else if (dtype == "bfloat16") { code = dlpack::kDLBfloat; bits = 16; }
    else if (dtype != "float32") throw py::type_error("to_dlpack: unsupported dtype " + dtype);
    return dlpack::to_capsule(buf, buf->ptr, std::move(shape), code, bits, dlpack::kDLCUDA, buf->device);
  }, py::arg("buffer"), py::arg("shape"), py::arg("dtype"));

  py::class_<Cache, std::shared_ptr<Cache>>(m, "Cache", py::module_local())
      .def_readonly("nbytes", &Cache::nbytes)
      .def_property_readonly("cell", [](const Cache& c) { return cell_name(c.p.cell); })
      .def_property_readonly("dtype", [](const Cache& c) { return dtype_name(c.p.dtype); })
      .def_property_readonly("T", [](const Cache& c) { return c.p.T; })
      .def_property_readonly("B", [](const Cache& c) { return c.p.B; })
      .def_property_readonly("I", [](const Cache& c) { return c.p.I; })
      .def_property_readonly("H", [](const Cache& c) { return c.p.H; })
      .def_property_readonly("P", [](const Cache& c) { return c.p.P; })
      .def_property_readonly("proj", [](const Cache& c) { return c.p.proj; })
      .def_readonly("checkpoint", &Cache::ck)
      .def_property_readonly("device", [](const Cache& c) { return c.p.device; })
      .def_property_readonly("batch_first", [](const Cache& c) { return c.p.batch_first; })
      .def_property_readonly("reverse", [](const Cache& c) { return c.p.reverse; })
      .def_property_readonly("algo", [](const Cache& c) { return algo_name(c.algo); });

  m.def("choose_algo", [](const std::string& cell, const std::string& dtype, int64_t T, int64_t B,
                          int64_t I, int64_t H, int device) {
    Problem p;
    p.cell = parse_cell(cell); p.dtype = parse_dtype(dtype);
    p.T = T; p.B = B; p.I = I; p.H = H; p.P = H; p.device = device;
    return std::string(algo_name(choose_algo(p)));
  });

  m.def("benchmark_table", [] {
    static const char* passes[] = {"forward", "forward+cache", "backward"};
    py::list out;
    for (const auto& [k, t] : benchmark_table()) {
      py::dict d;
      d["pass"] = passes[k.pass];
      d["device"] = k.device;
      d["cell"] = cell_name(k.cell);
      d["dtype"] = dtype_name(k.dtype);
      d["T"] = k.T; d["B"] = k.B; d["I"] = k.I; d["H"] = k.H; d["P"] = k.P;
      d["checkpoint"] = k.checkpoint;
      d["lengths"] = k.lengths; d["mask"] = k.mask;
      d["reverse"] = k.reverse; d["batch_first"] = k.batch_first;
      d["units"] = k.units;
      d["algo"] = t.pick == Variant::Standard ? "standard" : "persistent";
      d["cluster"] = t.pick == Variant::Cluster;
      d["ms_standard"] = t.ms[static_cast<int>(Variant::Standard)];
      d["ms_persistent"] = t.ms[static_cast<int>(Variant::Grid)];
      d["ms_cluster"] = t.ms[static_cast<int>(Variant::Cluster)];
      out.append(d);
    }
    return out;
  }, "Benchmark mode's decisions so far (FUSEDRNN_CUDA_ALGO=benchmark): one dict per key "
     "with the algorithm picked (cluster: the persistent kernels in cluster mode) and the "
     "times (ms, the faster of two runs; -1 for a variant that could not run) that decided.");
  m.def("benchmark_clear", [] { benchmark_clear(); },
        "Forget benchmark mode's decisions: the next call with each key times again.");

  m.def("persistent_fits", [](const std::string& cell, const std::string& dtype, int64_t T,
                              int64_t B, int64_t I, int64_t H, int device) {
    Problem p;
    p.cell = parse_cell(cell); p.dtype = parse_dtype(dtype);
    p.T = T; p.B = B; p.I = I; p.H = H; p.P = H; p.device = device;
    return persistent_fits(p);
  }, "Whether the persistent kernels' W_hh slices fit this device's blocks (shared memory, "
     "block count, cooperative launch); residency is checked again at launch.");

  m.def("persistent_layout", [](const std::string& cell, const std::string& dtype, int64_t B,
                                int64_t H, bool backward, int device, int64_t P) {
    Problem p;
    p.cell = parse_cell(cell); p.dtype = parse_dtype(dtype);
    if (P && p.cell != Cell::Lstm) throw py::value_error("P (projection) is for cell 'lstm' only");
    p.T = 1; p.B = B; p.I = 1; p.H = H; p.P = P ? P : H; p.proj = P != 0; p.device = device;
    const PersistentLayout c = persistent_layout(p, backward);
    py::dict d;
    d["U"] = c.U; d["blocks"] = c.blocks; d["ld"] = c.ld; d["bc"] = c.bc; d["ks"] = c.ks;
    d["cluster"] = c.cluster; d["V"] = c.V; d["ldm"] = c.ldm; d["smem"] = c.smem; d["ok"] = c.ok;
    return d;
  }, "The persistent forward (or backward) kernel's layout on this device: units per block "
     "(U), blocks, padded row length (ld), vectors staged at once (bc), k splits (ks), shared "
     "memory bytes, and whether it fits; with a projection of size P, the state's values "
     "per block (V) and the padded length of the W_hr rows (forward) or columns (backward) "
     "it keeps (ldm).",
     py::arg("cell"), py::arg("dtype"), py::arg("B"), py::arg("H"), py::arg("backward"),
     py::arg("device"), py::arg("P") = 0);

  m.def(
      "forward",
      [](const std::string& cell, const std::string& dtype, int64_t T, int64_t B, int64_t I,
         int64_t H, bool reverse, bool batch_first, int device, uintptr_t stream, uintptr_t x,
         uintptr_t w_ih, uintptr_t w_hh, uintptr_t b_ih, uintptr_t b_hh, uintptr_t h0,
         uintptr_t c0, py::object lengths, py::object mask, uintptr_t y, uintptr_t h_n,
         uintptr_t c_n, bool training, const std::string& algo, uintptr_t w_hr,
         int64_t P, int64_t checkpoint) -> py::object {
        Problem p;
        p.cell = parse_cell(cell);
        p.dtype = parse_dtype(dtype);
        if (T < 0 || B < 0 || I < 1 || H < 1)
          throw py::value_error("sizes must satisfy T, B >= 0 and I, H >= 1");
        if (w_hr && p.cell != Cell::Lstm)
          throw py::value_error("w_hr (projection) is only used by cell 'lstm'");
        if (w_hr && P < 1) throw py::value_error("with w_hr the projection size P must be >= 1");
        p.T = T; p.B = B; p.I = I; p.H = H;
        p.proj = w_hr != 0;
        p.P = p.proj ? P : H;
        p.reverse = reverse; p.batch_first = batch_first;
        p.device = device; p.stream = as_stream(stream);
        const bool lstm = p.cell == Cell::Lstm;
        const bool rows = T * B > 0;
        ForwardIn in;
        in.x = device_ptr("x", x, device, !rows);
        in.w_ih = device_ptr("w_ih", w_ih, device, false);
        in.w_hh = device_ptr("w_hh", w_hh, device, false);
        in.b_ih = device_ptr("b_ih", b_ih, device, true);
        in.b_hh = device_ptr("b_hh", b_hh, device, true);
        in.h0 = device_ptr("h0", h0, device, true);
        in.c0 = device_ptr("c0", c0, device, true);
        in.w_hr = device_ptr("w_hr", w_hr, device, true);
        if (checkpoint < 0) throw py::value_error("checkpoint must be >= 0 (0: every step kept)");
        in.checkpoint = training ? checkpoint : 0;
        if (c0 && !lstm) throw py::value_error("c0 is only used by cell 'lstm'");
        if (!lengths.is_none()) {
          auto a = py::array_t<int32_t, py::array::c_style | py::array::forcecast>::ensure(lengths);
          if (!a || a.ndim() != 1 || a.shape(0) != B)
            throw py::value_error("lengths must be a host array of shape [B] = (" +
                                  std::to_string(B) + ",)");
          in.lengths.assign(a.data(), a.data() + B);
          for (int32_t v : in.lengths)
            if (v < 0 || v > T)
              throw py::value_error("lengths must lie in [0, T] = [0, " + std::to_string(T) +
                                    "], got " + std::to_string(v));
        }
        if (!mask.is_none()) {
          if (!in.lengths.empty()) throw py::value_error("pass either lengths or mask, not both");
          auto a = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>::ensure(mask);
          if (!a || a.ndim() != 2 || a.shape(0) != T || a.shape(1) != B)
            throw py::value_error("mask must be a host array of shape [T, B] = (" +
                                  std::to_string(T) + ", " + std::to_string(B) + ")");
          in.mask.assign(a.data(), a.data() + T * B);
        }
        void* yp = device_out("y", y, device, !rows);
        void* hnp = device_out("h_n", h_n, device, B == 0);
        void* cnp = lstm ? device_out("c_n", c_n, device, B == 0) : nullptr;
        const Algo a = parse_algo(algo);
        std::shared_ptr<Cache> cache;
        {
          py::gil_scoped_release nogil;
          if (training) cache = std::make_shared<Cache>(p, in);
          forward(p, in, yp, hnp, cnp, cache.get(), a);
        }
        if (!cache) return py::none();
        return py::cast(cache);
      },
      py::arg("cell"), py::arg("dtype"), py::arg("T"), py::arg("B"), py::arg("I"), py::arg("H"),
      py::arg("reverse"), py::arg("batch_first"), py::arg("device"), py::arg("stream"),
      py::arg("x"), py::arg("w_ih"), py::arg("w_hh"), py::arg("b_ih"), py::arg("b_hh"),
      py::arg("h0"), py::arg("c0"), py::arg("lengths"), py::arg("mask"), py::arg("y"),
      py::arg("h_n"), py::arg("c_n"), py::arg("training"), py::arg("algo") = "auto",
      py::arg("w_hr") = 0, py::arg("P") = 0, py::arg("checkpoint") = 0);

  m.def(
      "backward",
      [](std::shared_ptr<Cache> cache, uintptr_t stream, uintptr_t dy, uintptr_t dh_n,
         uintptr_t dc_n, uintptr_t dx, uintptr_t dh0, uintptr_t dc0, uintptr_t dw_ih,
         uintptr_t dw_hh, uintptr_t db_ih, uintptr_t db_hh, uintptr_t dw_hr) {
        if (!cache) throw py::type_error("backward needs the cache returned by forward");
        const Problem& p = cache->p;
        const int dev = p.device;
        const bool lstm = p.cell == Cell::Lstm;
        Grads g;
        const void* dyp = device_ptr("dy", dy, dev, true);
        const void* dhp = device_ptr("dh_n", dh_n, dev, true);
        const void* dcp = device_ptr("dc_n", dc_n, dev, true);
        if (dc_n && !lstm) throw py::value_error("dc_n is only used by cell 'lstm'");
        // dx, dh0, dc0: 0 when not wanted (not computed)
        g.x = device_out("dx", dx, dev, true);
        g.h0 = device_out("dh0", dh0, dev, true);
        g.c0 = lstm ? device_out("dc0", dc0, dev, true) : nullptr;
        g.w_ih = device_out("dw_ih", dw_ih, dev, false);
        g.w_hh = device_out("dw_hh", dw_hh, dev, false);
        g.b_ih = device_out("db_ih", db_ih, dev, false);
        g.b_hh = device_out("db_hh", db_hh, dev, false);
        g.w_hr = device_out("dw_hr", dw_hr, dev, !p.proj);
        py::gil_scoped_release nogil;
        backward(*cache, as_stream(stream), dyp, dhp, dcp, g);
      },
      py::arg("cache"), py::arg("stream"), py::arg("dy"), py::arg("dh_n"), py::arg("dc_n"),
      py::arg("dx"), py::arg("dh0"), py::arg("dc0"), py::arg("dw_ih"), py::arg("dw_hh"),
      py::arg("db_ih"), py::arg("db_hh"), py::arg("dw_hr") = 0);
}
