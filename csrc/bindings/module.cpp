// fusedrnn._core: the pybind11 boundary.
//
// The public Python functions (python/fusedrnn/__init__.py) check and
// normalise arguments with messages shared with the reference; this module
// checks again, briefly, everything that memory safety depends on, so that
// calling _core directly with bad arrays raises instead of crashing.
// dtype is dispatched once here; compute runs without the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cblas.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "bindings/cell_names.h"
#include "fusedrnn/rnn.h"

namespace py = pybind11;
using namespace fusedrnn;

namespace {

std::string shape_str(const std::vector<int64_t>& s) {
  std::string r = "(";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + (s.size() == 1 ? ",)" : ")");
}

std::vector<int64_t> shape_of(const py::array& a) {
  return std::vector<int64_t>(a.shape(), a.shape() + a.ndim());
}

// A C-contiguous array of scalar_t with the expected shape (copied only when
// the input is not already contiguous).
template <typename scalar_t>
py::array_t<scalar_t, py::array::c_style> take(const char* name, py::handle obj,
                                               const std::vector<int64_t>& shape) {
  py::array a = py::array::ensure(obj);
  if (!a) throw py::type_error(std::string(name) + " must be an array");
  if (!a.dtype().is(py::dtype::of<scalar_t>()))
    throw py::type_error(std::string(name) + " must have dtype " +
                         std::string(py::str(py::dtype::of<scalar_t>())) + ", got " +
                         std::string(py::str(a.dtype())));
  if (shape_of(a) != shape)
    throw py::value_error(std::string(name) + " must have shape " + shape_str(shape) + ", got " +
                          shape_str(shape_of(a)));
  return py::array_t<scalar_t, py::array::c_style>::ensure(a);
}

// An optional argument: None stands for zeros (data() == nullptr).
template <typename scalar_t>
struct Optional {
  py::array_t<scalar_t, py::array::c_style> array;
  const scalar_t* ptr = nullptr;
  Optional(const char* name, py::handle obj, const std::vector<int64_t>& shape) {
    if (obj.is_none()) return;
    array = take<scalar_t>(name, obj, shape);
    ptr = array.data();
  }
  const scalar_t* data() const { return ptr; }
};

// A new C-contiguous result array. Large ones live in fusedrnn's kept blocks
// (output_alloc) rather than in fresh pages from the system, whose first
// touch faults page by page: a training loop at T = 1 spent more time in
// those faults than in the math. The array's base is a capsule that returns
// the block.
template <typename scalar_t>
py::array_t<scalar_t> new_array(const std::vector<int64_t>& shape, bool zero) {
  std::size_t n = 1;
  for (int64_t d : shape) n = checked_mul(n, std::size_t(d));
  const std::size_t bytes = checked_mul(n, sizeof(scalar_t));
  py::array_t<scalar_t> a;
  if (bytes < output_block_min()) {
    a = py::array_t<scalar_t>(shape);
  } else {
    struct Block {
      void* p;
      std::size_t bytes;
      ~Block() { output_free(p, bytes); }
    };
    std::unique_ptr<Block> b(new Block{output_alloc(bytes), bytes});
    py::capsule owner(b.get(), [](void* q) { delete static_cast<Block*>(q); });
    scalar_t* data = static_cast<scalar_t*>(b.release()->p);
    a = py::array_t<scalar_t>(shape, data, owner);
  }
  if (zero && a.size()) std::memset(a.mutable_data(), 0, size_t(a.nbytes()));
  return a;
}

// A result that not every call has: new_array when `want`, else None; *data
// is its buffer, nullptr when there is none (the kernels' "not wanted").
template <typename scalar_t>
py::object optional_array(bool want, const std::vector<int64_t>& shape, bool zero,
                          scalar_t** data) {
  if (!want) {
    *data = nullptr;
    return py::none();
  }
  auto a = new_array<scalar_t>(shape, zero);
  *data = a.mutable_data();
  return std::move(a);
}

constexpr int64_t kMaxDim = int64_t(1) << 30;

template <typename scalar_t>
py::tuple forward_impl(Cell cell, py::array x_in, py::handle w_ih_in, py::handle w_hh_in,
                       py::handle b_ih_in, py::handle b_hh_in, py::handle h0_in,
                       py::handle c0_in, py::handle lengths_in, py::handle mask_in, bool reverse,
                       bool batch_first, bool training, py::handle w_hr_in, int64_t checkpoint,
                       bool share_weights) {
  if (x_in.ndim() != 3)
    throw py::value_error("x must have 3 dimensions, got shape " + shape_str(shape_of(x_in)));
  const int64_t G = gates_of(cell);
  const int64_t T = batch_first ? x_in.shape(1) : x_in.shape(0);
  const int64_t B = batch_first ? x_in.shape(0) : x_in.shape(1);
  const int64_t I = x_in.shape(2);
  py::array w_hh_any = py::array::ensure(w_hh_in);
  if (!w_hh_any || w_hh_any.ndim() != 2)
    throw py::value_error("w_hh must be a 2-dimensional array [G*H, H]");
  const bool lstm = cell == Cell::Lstm, proj = !w_hr_in.is_none();
  if (proj && !lstm) throw py::value_error("w_hr (projection) is only used by cell 'lstm'");
  // Hidden size H; state size P (the projection's, else H).
  int64_t H = w_hh_any.shape(1), P = H;
  py::array w_hr_any;
  if (proj) {
    w_hr_any = py::array::ensure(w_hr_in);
    if (!w_hr_any || w_hr_any.ndim() != 2)
      throw py::value_error("w_hr must be a 2-dimensional array [P, H]");
    P = w_hr_any.shape(0);
    H = w_hr_any.shape(1);
  }
  if (I < 1 || H < 1 || P < 1 || I > kMaxDim || H > kMaxDim || P > kMaxDim)
    throw py::value_error("input, hidden and projection sizes must lie in [1, 2**30]");

  auto x = take<scalar_t>("x", x_in, shape_of(x_in));
  auto w_ih = take<scalar_t>("w_ih", w_ih_in, {G * H, I});
  auto w_hh = take<scalar_t>("w_hh", w_hh_in, {G * H, P});
  Optional<scalar_t> w_hr("w_hr", w_hr_in, {P, H});
  Optional<scalar_t> b_ih("b_ih", b_ih_in, {G * H}), b_hh("b_hh", b_hh_in, {G * H});
  Optional<scalar_t> h0("h0", h0_in, {B, P});
  if (!lstm && !c0_in.is_none()) throw py::value_error("c0 is only used by cell 'lstm'");
  Optional<scalar_t> c0("c0", c0_in, {B, H});

  if (!lengths_in.is_none() && !mask_in.is_none())
    throw py::value_error("pass either lengths or mask, not both");
  py::array_t<int64_t, py::array::c_style> lengths;
  if (!lengths_in.is_none()) {
    lengths = take<int64_t>("lengths", lengths_in, {B});
    for (int64_t b = 0; b < B; ++b)
      if (lengths.data()[b] < 0 || lengths.data()[b] > T)
        throw py::value_error("lengths must lie in [0, T] = [0, " + std::to_string(T) +
                              "], got " + std::to_string(lengths.data()[b]));
  }
  py::array_t<bool, py::array::c_style> mask;
  if (!mask_in.is_none()) mask = take<bool>("mask", mask_in, {T, B});

  const std::vector<int64_t> yshape = batch_first ? std::vector<int64_t>{B, T, P}
                                                  : std::vector<int64_t>{T, B, P};
  auto y = new_array<scalar_t>(yshape, !lengths_in.is_none());
  auto h_n = new_array<scalar_t>({B, P}, false);

  ForwardParams<scalar_t> p{};
  py::object c_n = optional_array<scalar_t>(lstm, {B, H}, false, &p.c_n);
  p.cell = cell;
  p.T = T;
  p.B = B;
  p.I = I;
  p.H = H;
  p.reverse = reverse;
  p.batch_first = batch_first;
  p.training = training;
  if (checkpoint < 0) throw py::value_error("checkpoint must be 0 (off) or a positive int");
  p.checkpoint = checkpoint;
  p.x = x.data();
  p.w_ih = w_ih.data();
  p.w_hh = w_hh.data();
  p.w_hr = w_hr.data();
  p.P = P;
  p.b_ih = b_ih.data();
  p.b_hh = b_hh.data();
  p.h0 = h0.data();
  p.c0 = c0.data();
  p.lengths = lengths_in.is_none() ? nullptr : lengths.data();
  p.mask = mask_in.is_none() ? nullptr : mask.data();
  p.y = y.mutable_data();
  p.h_n = h_n.mutable_data();
  p.share_weights = share_weights;

  std::shared_ptr<CacheBase> cache;
  {
    py::gil_scoped_release release;
    cache = fusedrnn::forward<scalar_t>(p);
  }
  py::object cache_obj = cache ? py::cast(cache) : py::none();
  // a cache that refers to the weights keeps the arrays it read alive
  if (cache && share_weights)
    cache_obj.attr("_weights") =
        py::make_tuple(w_ih, w_hh, proj ? py::object(w_hr.array) : py::object(py::none()));
  return py::make_tuple(y, h_n, c_n, cache_obj);
}

py::tuple forward_py(const std::string& cell_s, py::handle x_in, py::handle w_ih,
                     py::handle w_hh, py::handle b_ih, py::handle b_hh, py::handle h0,
                     py::handle c0, py::handle lengths, py::handle mask, bool reverse,
                     bool batch_first, bool training, py::handle w_hr, int64_t checkpoint,
                     bool share_weights) {
  const Cell cell = parse_cell(cell_s);
  py::array x = py::array::ensure(x_in);
  if (!x) throw py::type_error("x must be an array");
  if (x.dtype().is(py::dtype::of<float>()))
    return forward_impl<float>(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, mask, reverse,
                               batch_first, training, w_hr, checkpoint, share_weights);
  if (x.dtype().is(py::dtype::of<double>()))
    return forward_impl<double>(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, mask, reverse,
                                batch_first, training, w_hr, checkpoint, share_weights);
  throw py::type_error("x must have dtype float32 or float64, got " +
                       std::string(py::str(x.dtype())));
}

template <typename scalar_t>
py::tuple backward_impl(const Cache<scalar_t>& cache, py::handle dy_in, py::handle dh_n_in,
                        py::handle dc_n_in, bool need_x, bool need_h0, bool need_c0) {
  const int64_t T = cache.T, B = cache.B, I = cache.I, H = cache.H, GH = cache.G * H;
  const int64_t P = cache.P;
  const bool lstm = cache.cell == Cell::Lstm, bf = cache.batch_first;
  const bool proj = cache.proj;
  Optional<scalar_t> dy("dy", dy_in, bf ? std::vector<int64_t>{B, T, P}
                                         : std::vector<int64_t>{T, B, P});
  Optional<scalar_t> dh_n("dh_n", dh_n_in, {B, P});
  if (!lstm && !dc_n_in.is_none()) throw py::value_error("dc_n is only used by cell 'lstm'");
  Optional<scalar_t> dc_n("dc_n", dc_n_in, {B, H});

  BackwardParams<scalar_t> p{};
  // Gradients not wanted (need_*) are not computed and come back as None.
  py::object dx = optional_array<scalar_t>(
      need_x, bf ? std::vector<int64_t>{B, T, I} : std::vector<int64_t>{T, B, I},
      cache.has_lengths, &p.dx);
  py::object dh0 = optional_array<scalar_t>(need_h0, {B, P}, false, &p.dh0);
  py::object dc0 = optional_array<scalar_t>(lstm && need_c0, {B, H}, false, &p.dc0);
  auto dw_ih = new_array<scalar_t>({GH, I}, false);
  auto dw_hh = new_array<scalar_t>({GH, P}, false);
  py::object dw_hr = optional_array<scalar_t>(proj, {P, H}, false, &p.dw_hr);
  auto db_ih = new_array<scalar_t>({GH}, false);
  auto db_hh = new_array<scalar_t>({GH}, false);

  p.dy = dy.data();
  p.dh_n = dh_n.data();
  p.dc_n = dc_n.data();
  p.dw_ih = dw_ih.mutable_data();
  p.dw_hh = dw_hh.mutable_data();
  p.db_ih = db_ih.mutable_data();
  p.db_hh = db_hh.mutable_data();
  {
    py::gil_scoped_release release;
    fusedrnn::backward<scalar_t>(cache, p);
  }
  return py::make_tuple(dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr);
}

py::tuple backward_py(const std::shared_ptr<CacheBase>& cache, py::handle dy, py::handle dh_n,
                      py::handle dc_n, bool need_x, bool need_h0, bool need_c0) {
  if (!cache) throw py::type_error("backward needs the cache returned by forward(training=True)");
  if (cache->is_double())
    return backward_impl<double>(static_cast<const Cache<double>&>(*cache), dy, dh_n, dc_n,
                                 need_x, need_h0, need_c0);
  return backward_impl<float>(static_cast<const Cache<float>&>(*cache), dy, dh_n, dc_n, need_x,
                              need_h0, need_c0);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "fusedrnn compiled CPU kernels (private; use the fusedrnn package)";

  // dynamic_attr: a cache made with share_weights holds the weight arrays it reads
  py::class_<CacheBase, std::shared_ptr<CacheBase>>(m, "Cache",
                                                    "What forward keeps for backward (opaque).",
                                                    py::dynamic_attr())
      .def_property_readonly("cell", [](const CacheBase& c) { return cell_name(c.cell); })
      .def_property_readonly("T", [](const CacheBase& c) { return c.T; })
      .def_property_readonly("B", [](const CacheBase& c) { return c.B; })
      .def_property_readonly("I", [](const CacheBase& c) { return c.I; })
      .def_property_readonly("H", [](const CacheBase& c) { return c.H; })
      .def_property_readonly("P", [](const CacheBase& c) { return c.P; },
                             "State size: the projection size with w_hr, else H.")
      .def_property_readonly("dtype",
                             [](const CacheBase& c) { return c.is_double() ? "float64" : "float32"; })
      .def_property_readonly("batch_first", [](const CacheBase& c) { return c.batch_first; })
      .def_property_readonly("reverse", [](const CacheBase& c) { return c.reverse; })
      .def_property_readonly("checkpoint", [](const CacheBase& c) { return c.checkpoint; },
                             "k > 0: states kept every k steps, the rest recomputed by "
                             "backward; 0: every step kept.")
      .def_property_readonly("nbytes", &CacheBase::nbytes,
                             "Bytes of memory the cache holds.")
      .def("__repr__", [](const CacheBase& c) {
        return std::string("<fusedrnn.Cache cell=") + cell_name(c.cell) +
               " T=" + std::to_string(c.T) + " B=" + std::to_string(c.B) +
               " H=" + std::to_string(c.H) + " dtype=" + (c.is_double() ? "float64" : "float32") +
               " nbytes=" + std::to_string(c.nbytes()) + ">";
      });

  m.def("forward", &forward_py, py::arg("cell"), py::arg("x"), py::arg("w_ih"), py::arg("w_hh"),
        py::arg("b_ih"), py::arg("b_hh"), py::arg("h0"), py::arg("c0"), py::arg("lengths"),
        py::arg("mask"), py::arg("reverse"), py::arg("batch_first"), py::arg("training"),
        py::arg("w_hr") = py::none(), py::arg("checkpoint") = 0,
        py::arg("share_weights") = false);
  m.def("backward", &backward_py, py::arg("cache"), py::arg("dy"), py::arg("dh_n"),
        py::arg("dc_n"), py::arg("need_x") = true, py::arg("need_h0") = true,
        py::arg("need_c0") = true);
  m.def("set_num_threads", &fusedrnn::set_num_threads, py::arg("n"));
  m.def("get_num_threads", &fusedrnn::get_num_threads);
  m.def("blas_config", []() { return std::string(scipy_openblas_get_config()); });
  m.def("workspace_cached_bytes", &fusedrnn::workspace_cached_bytes,
        "Bytes of freed temporaries and arrays kept for reuse (at most workspace_keep_limit()).");
  m.def("workspace_keep_limit", &fusedrnn::workspace_keep_limit,
        "The most bytes kept for reuse: 256 MiB, or the most fusedrnn has had alive at once "
        "(working memory and returned arrays) up to a quarter of the machine's memory.");
  m.def("workspace_release", &fusedrnn::workspace_release,
        "Return the kept temporaries to the system.");
  m.def("workspace_in_use_bytes", &fusedrnn::workspace_in_use_bytes,
        "Bytes of fusedrnn's working memory alive now (training caches included).");
  m.def("workspace_peak_bytes", &fusedrnn::workspace_peak_bytes,
        "The most bytes of working memory alive at once since workspace_reset_peak().");
  m.def("workspace_reset_peak", &fusedrnn::workspace_reset_peak,
        "Start a new peak measurement from the bytes alive now.");
  m.def("l2_cache_bytes", &fusedrnn::l2_cache_bytes,
        "One core's L2 cache in bytes as fusedrnn reads it (0: unknown); from 1 MiB, an "
        "inference call whose weights fit the threads' L2s but not one core's runs on several.");
  m.def("_set_tiled_input", &fusedrnn::set_tiled_input, py::arg("mode"), py::arg("steps") = 0,
        "For tests: the inference forward's tiled input projection forced on (1, in chunks of "
        "`steps` steps, 0: as computed; any instruction set), off (0) or automatic (-1).");
  m.def("_tiled_input_calls", &fusedrnn::tiled_input_calls,
        "For tests: how many forwards made their input projection tiled.");
  m.def("isa", []() { return std::string(fusedrnn::isa_name()); },
        "Instruction set of the kernels in use: avx512, avx2 or generic.");
  m.def("threads_backend", []() { return std::string(fusedrnn::threads_backend()); },
        "Whose threads ran the last call that used several: openmp (the process's OpenMP "
        "runtime, e.g. torch's), fusedrnn (its own pool), or '' before any.");
  m.def("probe_fma_gflops", &fusedrnn::probe_fma_gflops, py::arg("threads"),
        py::arg("seconds") = 0.02, py::call_guard<py::gil_scoped_release>(),
        "float32 multiply-add peak (GFLOP/s) of the kernels' instruction set on `threads` "
        "threads: the benchmark's compute ceiling.");
  m.def("probe_stream_gbps", &fusedrnn::probe_stream_gbps, py::arg("nbytes"),
        py::arg("threads"), py::arg("seconds") = 0.02, py::call_guard<py::gil_scoped_release>(),
        "GB/s at which `threads` threads read a weight of `nbytes` bytes over and over (one "
        "multiply-add per value, no synchronisation): the benchmark's batch-1 ceiling.");
}
