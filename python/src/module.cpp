// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// dmoe._core: the nanobind module. Python-facing classes over any_layer / any_dense: argument
// checking (dtype, shape, device, strides, each error naming the argument), zero-copy views in
// and out (DLPack and the buffer protocol through nb::ndarray), the GIL released around every
// call into the kernels, and the per-forward state (Workspace) that backward reads. The
// computation itself is the library's (any_layer.hpp says how the templates are reached).
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/function.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstring>
#include <mutex>
#include <optional>
#include <thread>

#include "any_layer.hpp"

namespace nb = nanobind;
using namespace nb::literals;

namespace dmoe::python {
namespace {

// ---------------------------------------------------------------------------------------------
// Errors. dmoe::error and failed statuses with errc::invalid_argument become ValueError; every
// other failure becomes dmoe.DmoeError (a RuntimeError).
nb::object dmoe_error_type;

[[noreturn]] void raise_failure(errc code, const char* msg) {
  if (code == errc::invalid_argument) throw nb::value_error(msg);
  PyErr_SetString(dmoe_error_type.ptr(), msg);
  throw nb::python_error();
}
void check(const status& s) {
  if (!s.ok()) raise_failure(s.code(), s.message());
}
template <class... A>
[[noreturn]] void value_error(const char* fmt, A... a) {
  char buf[512];
  std::snprintf(buf, sizeof buf, fmt, a...);
  throw nb::value_error(buf);
}
template <class... A>
[[noreturn]] void type_error(const char* fmt, A... a) {
  char buf[512];
  std::snprintf(buf, sizeof buf, fmt, a...);
  throw nb::type_error(buf);
}

/// The infer_precision named `s` ('exact', 'bf16'), or ValueError naming the argument.
dmoe::infer_precision parse_precision(const std::string& s) {
  dmoe::infer_precision out = dmoe::infer_precision::exact;
  if (!dmoe::parse_infer_precision(s.c_str(), out))
    value_error("infer_precision must be 'exact' or 'bf16', got '%s'", s.c_str());
  return out;
}

/// The weight_storage named `s` ('f32', 'bf16', 'f16'), or ValueError naming the argument.
weight_storage parse_storage(const std::string& s) {
  weight_storage out = weight_storage::f32;
  if (!parse_weight_storage(s.c_str(), out))
    value_error("weight_storage must be 'f32', 'bf16' or 'f16', got '%s'", s.c_str());
  return out;
}

// ---------------------------------------------------------------------------------------------
// Arrays in. Any object nanobind can view without a copy (DLPack: PyTorch, JAX, CuPy...; the
// buffer protocol: NumPy) is accepted if it is a float32 matrix on the CPU whose rows are
// contiguous (unit column stride; a row stride >= the row length, e.g. a slice of a wider
// matrix, is fine). Everything else is refused with the argument's name, never copied.
using any_array = nb::ndarray<nb::ro>;

const char* device_name(int type) {
  switch (type) {
    case nb::device::cpu::value: return "cpu";
    case nb::device::cuda::value: return "cuda";
    case nb::device::cuda_host::value: return "cuda_host";
    case nb::device::cuda_managed::value: return "cuda_managed";
    case nb::device::rocm::value: return "rocm";
    case nb::device::metal::value: return "metal";
    default: return "another device";
  }
}

std::string dtype_name(nb::dlpack::dtype t) {
  const char* kind = t.code == uint8_t(nb::dlpack::dtype_code::Float)    ? "float"
                     : t.code == uint8_t(nb::dlpack::dtype_code::Int)    ? "int"
                     : t.code == uint8_t(nb::dlpack::dtype_code::UInt)   ? "uint"
                     : t.code == uint8_t(nb::dlpack::dtype_code::Bfloat) ? "bfloat"
                     : t.code == uint8_t(nb::dlpack::dtype_code::Bool)   ? "bool"
                     : t.code == uint8_t(nb::dlpack::dtype_code::Complex) ? "complex"
                                                                          : "unknown";
  return std::string(kind) + std::to_string(int(t.bits));
}

std::string type_name_of(nb::handle h) { return nb::cast<std::string>(nb::type_name(h.type())); }

/// A checked view of a float matrix argument.
struct fmat {
  float* data = nullptr;
  index_t rows = 0, cols = 0, stride = 0;
  matrix_view<const float> cview() const { return {data, rows, cols, stride}; }
  matrix_view<float> view() const { return {data, rows, cols, stride}; }
};

/// Views `obj` as a (rows x cols) float32 matrix. want_rows / want_cols < 0: any.
fmat as_matrix(nb::handle obj, const char* fn, const char* arg, bool writable, index_t want_rows, index_t want_cols) {
  // A tensor that requires grad would be read (or written) behind autograd's back.
  if (nb::hasattr(obj, "requires_grad") &&
      nb::cast<bool>(obj.attr("requires_grad")))
    type_error("%s: %s is a tensor that requires grad; use dmoe.torch.MoE for autograd, or pass %s.detach()", fn,
               arg, arg);
  any_array a;
  if (!nb::try_cast<any_array>(obj, a, /*convert=*/false)) {
    type_error("%s: %s must be a float32 array (NumPy, or a tensor supporting DLPack such as torch.Tensor), got %s",
               fn, arg, type_name_of(obj).c_str());
  }
  if (a.device_type() != nb::device::cpu::value)
    value_error("%s: %s is on device '%s'; dmoe's Python layers run on the CPU (the CUDA backend is not bound yet): "
                "move it with %s.cpu()",
                fn, arg, device_name(a.device_type()), arg);
  if (a.dtype() != nb::dtype<float>())
    type_error("%s: %s has dtype %s, expected float32 (convert with .astype(numpy.float32) or .float())", fn, arg,
               dtype_name(a.dtype()).c_str());
  if (a.ndim() != 2)
    value_error("%s: %s has %d dimensions, expected 2 (tokens x features)%s", fn, arg, int(a.ndim()),
                want_cols > 0 ? ("; reshape it to (-1, " + std::to_string(want_cols) + ")").c_str() : "");
  const index_t r = index_t(a.shape(0)), c = index_t(a.shape(1));
  if ((want_rows >= 0 && r != want_rows) || (want_cols >= 0 && c != want_cols)) {
    char want[64];
    std::snprintf(want, sizeof want, "(%s x %td)", want_rows >= 0 ? std::to_string(want_rows).c_str() : "tokens",
                  want_cols);
    value_error("%s: %s has shape (%td, %td), expected %s", fn, arg, r, c, want);
  }
  const int64_t s0 = a.stride(0), s1 = a.stride(1);
  if ((c > 1 && s1 != 1) || (r > 1 && s0 < c))
    value_error("%s: %s has strides (%lld, %lld) in elements; dmoe needs contiguous rows (column stride 1, row "
                "stride >= %td): pass numpy.ascontiguousarray(%s) or %s.contiguous()",
                fn, arg, (long long)s0, (long long)s1, c, arg, arg);
  if (writable) {
    nb::ndarray<> w;
    if (!nb::try_cast<nb::ndarray<>>(obj, w, false)) value_error("%s: %s is read-only, it must be writable", fn, arg);
  }
  fmat m;
  m.data = static_cast<float*>(const_cast<void*>(a.data()));
  m.rows = r;
  m.cols = c;
  m.stride = r > 1 ? index_t(s0) : c;
  return m;
}

/// A new C-contiguous float32 NumPy array that owns its memory.
template <class T = float>
nb::ndarray<nb::numpy, T> new_array(std::vector<std::size_t> shape) {
  std::size_t n = 1;
  for (auto s : shape) n *= s;
  T* p = new T[n > 0 ? n : 1];
  nb::capsule owner(p, [](void* q) noexcept { delete[] static_cast<T*>(q); });
  return nb::ndarray<nb::numpy, T>(p, shape.size(), shape.data(), owner);
}

/// A NumPy view of memory owned by `owner` (no copy).
template <class T>
nb::ndarray<nb::numpy, T> view_array(T* data, const std::vector<std::size_t>& shape, nb::handle owner) {
  return nb::ndarray<nb::numpy, T>(data, shape.size(), shape.data(), owner);
}

template <class T>
nb::ndarray<nb::numpy, T> copy_array(const T* src, std::vector<std::size_t> shape) {
  auto a = new_array<T>(shape);
  std::size_t n = 1;
  for (auto s : shape) n *= s;
  if (n) std::memcpy(a.data(), src, n * sizeof(T));
  return a;
}

/// Python names of the parameters: experts.w1 -> w1, router.weight -> router_weight.
std::string py_param_name(const std::string& cpp) {
  if (cpp.rfind("experts.", 0) == 0) return cpp.substr(8);
  std::string s = cpp;
  for (auto& ch : s)
    if (ch == '.') ch = '_';
  return s;
}

param_group parse_group(const std::string& g) {
  if (g == "all") return param_group::all;
  if (g == "experts") return param_group::experts;
  if (g == "router") return param_group::router;
  value_error("group must be 'all', 'experts' or 'router', got '%s'", g.c_str());
}

st_dtype parse_st_dtype(const std::string& s) {
  st_dtype t;
  if (s == "F32" || s == "F64" || s == "F16" || s == "BF16")
    if (parse_dtype(s, t)) return t;
  value_error("dtype must be 'F32', 'F16', 'BF16' or 'F64', got '%s'", s.c_str());
}

// ---------------------------------------------------------------------------------------------
// Thread pools. A layer runs on a pool it shares (ThreadPool), a pool of its own (threads=n), or
// the module's default pool (hardware threads), created on first use.
std::shared_ptr<thread_pool> default_pool() {
  static std::shared_ptr<thread_pool> pool = [] {
    unsigned n = std::thread::hardware_concurrency();
    return std::make_shared<thread_pool>(n ? int(n) : 1);
  }();
  return pool;
}

std::shared_ptr<thread_pool> choose_pool(std::optional<int> threads, std::shared_ptr<thread_pool> pool) {
  if (threads && pool) value_error("give threads or pool, not both");
  if (pool) return pool;
  if (threads) {
    if (*threads < 1) value_error("threads must be >= 1, got %d", *threads);
    return *threads == 1 ? nullptr : std::make_shared<thread_pool>(*threads);
  }
  return default_pool();
}

// ---------------------------------------------------------------------------------------------
struct py_layer;

/// The state one forward leaves for backward: the layer's workspace (routing plan, activations)
/// and its routing statistics. A layer has one of its own; give each forward whose backward
/// comes later (autograd) its own Workspace.
struct py_workspace {
  workspace_buffer buf;
  routing_stats stats;
  index_t tokens = -1;               // tokens of the last successful forward, -1 if none
  const void* layer = nullptr;       // which layer wrote it
  std::uint64_t generation = 0;      // the layer's generation at that forward
  std::mutex mu;                     // one call at a time on this state
};

struct py_layer {
  std::unique_ptr<any_layer> impl;
  std::shared_ptr<thread_pool> pool;
  std::shared_ptr<py_workspace> own_ws = std::make_shared<py_workspace>();
  // Bumped whenever something a stored forward depends on changes (options, routing mask, weights
  // replaced by the adapter): backward refuses a workspace of an older generation.
  std::uint64_t generation = 1;

  context<cpu> ctx() const { return context<cpu>{pool.get()}; }
  index_t threads() const { return pool ? pool->concurrency() : 1; }
  const moe_config& cfg() const { return impl->config(); }
  py_workspace& ws_or_own(py_workspace* ws) { return ws ? *ws : *own_ws; }

  /// The workspace's forward, checked to be this layer's on `tokens` tokens (tokens < 0: any).
  void expect_forward(const py_workspace& ws, const char* fn, index_t tokens) const {
    if (ws.layer != this || ws.tokens < 0)
      value_error("%s: the workspace holds no forward of this layer (call forward first, with the same workspace)",
                  fn);
    if (ws.generation != generation)
      value_error("%s: the layer's options or routing state changed since the forward that filled the workspace; "
                  "run forward again",
                  fn);
    if (tokens >= 0 && ws.tokens != tokens)
      value_error("%s: the workspace's forward had %td tokens, got %td", fn, ws.tokens, tokens);
  }
};

nb::dict tensors_dict(const std::vector<tensor_desc>& ts, nb::handle owner) {
  nb::dict d;
  for (const auto& t : ts) d[py_param_name(t.name).c_str()] = view_array<float>(t.data, t.shape, owner);
  return d;
}

struct py_gradients {
  std::unique_ptr<any_gradients> g;
  const void* layer = nullptr;
};

aux_losses parse_aux_weights(nb::handle h) {
  aux_losses w;
  if (h.is_none()) return w;
  if (!nb::isinstance<nb::dict>(h)) type_error("backward: aux_weights must be a dict of name -> float or None");
  for (auto [k, v] : nb::borrow<nb::dict>(h)) {
    const std::string key = nb::cast<std::string>(k);
    const double val = nb::cast<double>(v);
    if (key == "load_balance") w.load_balance = val;
    else if (key == "z_loss") w.z_loss = val;
    else if (key == "diversity") w.diversity = val;
    else if (key == "simplicity") w.simplicity = val;
    else if (key == "balance") w.balance = val;
    else if (key == "efficiency") w.efficiency = val;
    else
      value_error("backward: aux_weights has unknown key '%s' (expected load_balance, z_loss, diversity, simplicity, "
                  "balance, efficiency)",
                  key.c_str());
  }
  return w;
}

nb::dict aux_dict(const aux_losses& a) {
  nb::dict d;
  d["load_balance"] = a.load_balance;
  d["z_loss"] = a.z_loss;
  d["diversity"] = a.diversity;
  d["simplicity"] = a.simplicity;
  d["balance"] = a.balance;
  d["efficiency"] = a.efficiency;
  return d;
}

nb::dict point_dict(const sweep_point& p) {
  nb::dict d;  // per-token measures first: the Frobenius error is dominated by large-norm tokens
  d["tau"] = p.tau;
  d["k"] = p.k;
  d["flops_fraction"] = p.flops_fraction;
  d["token_rel_error"] = p.token_rel_error;
  d["mean_cosine"] = p.mean_cosine;
  d["rel_error"] = p.rel_error;
  d["mean_k"] = p.mean_k;
  d["expert_fraction"] = p.expert_fraction;
  d["router_fraction"] = p.router_fraction;
  d["tokens"] = p.tokens;
  d["k_histogram"] = p.k_histogram;
  d["router"] = p.router;
  d["policy"] = p.policy;
  return d;
}

router_target parse_target(const std::string& s) {
  if (s == "output_norm") return router_target::output_norm;
  if (s == "summed_activation") return router_target::summed_activation;
  value_error("target must be 'output_norm' (D2DMoE) or 'summed_activation' (MoEfication), got '%s'", s.c_str());
}

std::unique_ptr<any_layer> make_any_layer(const std::string& policy, const std::string& act, const moe_config& cfg,
                                          const layer_options& o) {
  if (policy == "top_k") return make_top_k_layer(act, cfg, o);
  if (policy == "dynamic_k") return make_dynamic_k_layer(act, cfg, o);
  if (policy == "top_any") return make_top_any_layer(act, cfg, o);
  value_error("policy must be 'top_k', 'dynamic_k' or 'top_any', got '%s'", policy.c_str());
}

/// Options given as keywords: each belongs to one policy; giving another policy's is an error.
layer_options merge_options(const std::string& policy, layer_options o, std::optional<index_t> k,
                            std::optional<bool> renormalize, std::optional<double> tau, std::optional<index_t> k_max,
                            std::optional<bool> training) {
  auto refuse = [&](const char* name, const char* owner) {
    value_error("%s is an option of %s layers; this layer's policy is '%s'", name, owner, policy.c_str());
  };
  if (policy != "top_k") {
    if (k) refuse("k", "top_k");
    if (renormalize) refuse("renormalize", "top_k");
  }
  if (policy != "dynamic_k") {
    if (tau) refuse("tau", "dynamic_k");
    if (k_max) refuse("k_max", "dynamic_k");
  }
  if (policy != "top_any" && training) refuse("training", "top_any");
  if (k) o.k = *k;
  if (renormalize) o.renormalize = *renormalize;
  if (tau) o.tau = *tau;
  if (k_max) o.k_max = *k_max;
  if (training) o.training = *training;
  return o;
}

// ---------------------------------------------------------------------------------------------
// Layer methods (free functions so that the binding below reads as a table).

nb::object layer_run(py_layer& self, nb::handle x, nb::handle out, py_workspace* wsp, bool infer) {
  const index_t d = self.cfg().d_model;
  const char* who = infer ? "infer" : "forward";
  const fmat X = as_matrix(x, who, "x", false, -1, d);
  nb::object result;
  fmat Y;
  if (out.is_none()) {
    auto y = new_array<float>({std::size_t(X.rows), std::size_t(d)});
    Y = fmat{y.data(), X.rows, d, d};
    result = nb::cast(y);
  } else {
    Y = as_matrix(out, who, "out", true, X.rows, d);
    result = nb::borrow(out);
  }
  py_workspace& ws = self.ws_or_own(wsp);
  status s;
  {
    nb::gil_scoped_release nogil;
    std::lock_guard<std::mutex> lock(ws.mu);
    ws.tokens = -1;
    ws.buf.resize(self.impl->workspace_size(X.rows, self.threads()));  // grows only (cold)
    if (ws.stats.num_experts() != self.cfg().num_experts) ws.stats = routing_stats(self.cfg().num_experts);
    s = infer ? self.impl->infer(self.ctx(), X.cview(), Y.view(), ws.buf, &ws.stats)
              : self.impl->forward(self.ctx(), X.cview(), Y.view(), ws.buf, &ws.stats);
    if (s.ok()) {
      ws.tokens = X.rows;
      ws.layer = &self;
      ws.generation = self.generation;
    }
  }
  check(s);
  return result;
}
nb::object layer_forward(py_layer& self, nb::handle x, nb::handle out, py_workspace* wsp) {
  return layer_run(self, x, out, wsp, false);
}
nb::object layer_infer(py_layer& self, nb::handle x, nb::handle out, py_workspace* wsp) {
  return layer_run(self, x, out, wsp, true);
}

nb::tuple layer_backward(py_layer& self, nb::handle x, nb::handle dy, nb::handle dx, py_gradients* grads,
                         py_workspace* wsp, nb::handle aux_weights) {
  const index_t d = self.cfg().d_model;
  const fmat X = as_matrix(x, "backward", "x", false, -1, d);
  const fmat DY = as_matrix(dy, "backward", "dy", false, X.rows, d);
  py_workspace& ws = self.ws_or_own(wsp);
  self.expect_forward(ws, "backward", X.rows);
  nb::object dx_obj;
  fmat DX;
  if (dx.is_none()) {
    auto a = new_array<float>({std::size_t(X.rows), std::size_t(d)});
    DX = fmat{a.data(), X.rows, d, d};
    dx_obj = nb::cast(a);
  } else {
    DX = as_matrix(dx, "backward", "dx", true, X.rows, d);
    dx_obj = nb::borrow(dx);
  }
  nb::object g_obj;
  if (grads) {
    if (grads->layer != &self) value_error("backward: grads were made by another layer (use layer.make_gradients())");
    g_obj = nb::find(grads);
  } else {
    g_obj = nb::cast(py_gradients{self.impl->make_gradients(), &self});
    grads = nb::inst_ptr<py_gradients>(g_obj);
  }
  const bool has_aux = !aux_weights.is_none();
  const aux_losses w = parse_aux_weights(aux_weights);
  status s;
  {
    nb::gil_scoped_release nogil;
    std::lock_guard<std::mutex> lock(ws.mu);
    s = self.impl->backward(self.ctx(), X.cview(), DY.cview(), DX.view(), *grads->g, ws.buf, has_aux ? &w : nullptr);
  }
  check(s);
  return nb::make_tuple(dx_obj, g_obj);
}

template <class F>
void set_layer_option(py_layer& self, const char* name, const std::string& owner, F&& apply) {
  if (owner != self.impl->policy())
    value_error("%s is an option of %s layers; this layer's policy is '%s'", name, owner.c_str(), self.impl->policy());
  layer_options o = self.impl->options();
  apply(o);
  self.impl->set_options(o);  // validates (dmoe::error names the value) before anything changes
  ++self.generation;
}

// ---------------------------------------------------------------------------------------------
struct py_dense {
  std::unique_ptr<any_dense> impl;
  std::shared_ptr<thread_pool> pool;
  workspace_buffer buf;
  std::mutex mu;
  context<cpu> ctx() const { return context<cpu>{pool.get()}; }
  index_t threads() const { return pool ? pool->concurrency() : 1; }
};

ffn_names names_from(nb::handle names, int layer, const std::string& prefix) {
  if (nb::isinstance<nb::str>(names)) {
    const std::string s = nb::cast<std::string>(names);
    if (s == "bert") return bert_ffn_names(layer, prefix);
    if (s == "gpt2") return gpt2_ffn_names(layer, prefix);
    if (s == "llama") return llama_ffn_names(layer, prefix);
    value_error("names must be 'bert', 'gpt2', 'llama' or a dict of tensor names, got '%s'", s.c_str());
  }
  if (!nb::isinstance<nb::dict>(names))
    type_error("names must be 'bert', 'gpt2', 'llama' or a dict with keys w1, b1, w2, b2, w_gate, layout");
  ffn_names n;
  for (auto [k, v] : nb::borrow<nb::dict>(names)) {
    const std::string key = nb::cast<std::string>(k), val = nb::cast<std::string>(v);
    if (key == "w1") n.w1 = val;
    else if (key == "b1") n.b1 = val;
    else if (key == "w2") n.w2 = val;
    else if (key == "b2") n.b2 = val;
    else if (key == "w_gate") n.w_gate = val;
    else if (key == "layout") {
      if (val == "out_in") n.layout = weight_layout::out_in;
      else if (val == "in_out") n.layout = weight_layout::in_out;
      else value_error("names['layout'] must be 'out_in' (nn.Linear) or 'in_out' (GPT-2 Conv1D), got '%s'", val.c_str());
    } else
      value_error("names has unknown key '%s' (expected w1, b1, w2, b2, w_gate, layout)", key.c_str());
  }
  if (n.w1.empty() || n.w2.empty()) value_error("names must name at least w1 and w2");
  return n;
}

split_method parse_split_method(const std::string& s) {
  if (s == "balanced_kmeans") return split_method::balanced_kmeans;
  if (s == "contiguous") return split_method::contiguous;
  if (s == "random") return split_method::random;
  value_error("method must be 'balanced_kmeans', 'contiguous' or 'random', got '%s'", s.c_str());
}

py_layer wrap_layer(std::unique_ptr<any_layer> impl, std::shared_ptr<thread_pool> pool) {
  py_layer l;
  l.impl = std::move(impl);
  l.pool = std::move(pool);
  return l;
}

// ---------------------------------------------------------------------------------------------
struct py_adapter {
  expert_count_adapter<float> a;
  py_layer* layer;
};

nb::dict report_dict(const adapt_report& r) {
  nb::dict d;
  d["updated"] = r.updated;
  d["removed"] = r.removed;
  d["added"] = r.added;
  d["kept_by_guard"] = r.kept_by_guard;
  d["active_after"] = r.active_after;
  return d;
}

}  // namespace
}  // namespace dmoe::python

using namespace dmoe;
using namespace dmoe::python;

NB_MODULE(_core, m) {
  m.doc() = "dmoe's C++ kernels: MoE layers (top_k, dynamic_k, top_any) x six activations, float32, CPU.";
  m.attr("__version__") = std::to_string(DMOE_VERSION_MAJOR) + "." + std::to_string(DMOE_VERSION_MINOR) + "." +
                          std::to_string(DMOE_VERSION_PATCH);
  m.attr("activations") = nb::make_tuple("relu", "gelu_erf", "gelu_tanh", "silu", "swiglu", "geglu");
  m.attr("policies") = nb::make_tuple("top_k", "dynamic_k", "top_any");

  dmoe_error_type = nb::steal(PyErr_NewExceptionWithDoc(
      "dmoe.DmoeError", "A dmoe call failed for a reason other than a bad argument (e.g. a NaN router score).",
      PyExc_RuntimeError, nullptr));
  m.attr("DmoeError") = dmoe_error_type;
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const dmoe::error& e) {
      if (e.code() == errc::invalid_argument)
        PyErr_SetString(PyExc_ValueError, e.what());
      else
        PyErr_SetString(dmoe_error_type.ptr(), e.what());
    }
  });

  nb::class_<thread_pool>(m, "ThreadPool", "A pool of worker threads that layers can share (the caller is worker 0).")
      .def(nb::new_([](int threads) {
             if (threads < 1) value_error("ThreadPool: threads must be >= 1, got %d", threads);
             return std::make_shared<thread_pool>(threads);
           }),
           "threads"_a, "A pool of `threads` threads in all (the calling thread included).")
      .def_prop_ro("threads", [](const thread_pool& p) { return p.concurrency(); });

  nb::class_<py_workspace>(m, "Workspace",
                           "State of one forward (routing plan, activations, statistics) that backward reads.\n"
                           "A layer has one of its own; autograd gives each pending forward its own.")
      .def(nb::new_([] { return std::make_shared<py_workspace>(); }))
      .def_prop_ro("tokens", [](const py_workspace& w) { return w.tokens; }, "Tokens of the last forward, -1 if none.")
      .def_prop_ro("nbytes", [](const py_workspace& w) { return w.buf.size(); }, "Bytes held.");

  nb::class_<py_gradients>(m, "Gradients", "Gradients shaped like a layer's parameters (see MoELayer.parameters).")
      .def("tensors",
           [](nb::handle self, const std::string& group) {
             auto& g = nb::cast<py_gradients&>(self);
             return tensors_dict(g.g->tensors(parse_group(group)), self);
           },
           "group"_a = "all", "Zero-copy NumPy views of the gradients, by parameter name.");

  nb::class_<routing_stats>(m, "RoutingStats", "Routing statistics of one forward.")
      .def_ro("tokens", &routing_stats::tokens)
      .def_ro("slots", &routing_stats::slots, "(token, expert) pairs run")
      .def_ro("router_flops", &routing_stats::router_flops)
      .def_ro("expert_flops", &routing_stats::expert_flops)
      .def_ro("dense_flops", &routing_stats::dense_flops, "FLOPs of the dense FFN of width E*n on the same tokens")
      .def_prop_ro("mean_k", &routing_stats::mean_k, "mean experts per token")
      .def_prop_ro("active_fraction", &routing_stats::active_fraction, "expert FLOPs / dense FLOPs")
      .def_prop_ro("executed_fraction", &routing_stats::executed_fraction, "(router + expert FLOPs) / dense FLOPs")
      .def_prop_ro("k_histogram",
                   [](const routing_stats& s) { return nb::cast(copy_array<index_t>(s.k_histogram.data(), {s.k_histogram.size()})); },
                   "tokens that ran 0, 1, ..., E experts")
      .def_prop_ro("tokens_per_expert", [](const routing_stats& s) {
        return nb::cast(copy_array<index_t>(s.tokens_per_expert.data(), {s.tokens_per_expert.size()}));
      });

  nb::class_<py_layer>(m, "MoELayer", "A Mixture-of-Experts layer over dmoe's CPU kernels (float32).")
      .def(
          "__init__",
          [](py_layer* self, index_t d_model, index_t num_experts, index_t expert_width, const std::string& policy,
             const std::string& activation, std::optional<index_t> k, std::optional<bool> renormalize,
             std::optional<double> tau, std::optional<index_t> k_max, std::optional<bool> training, bool hidden_bias,
             bool expert_bias, bool output_bias, index_t router_hidden, std::optional<std::uint64_t> seed,
             std::optional<int> threads, std::shared_ptr<thread_pool> pool, const std::string& storage,
             const std::string& precision) {
            moe_config cfg;
            cfg.d_model = d_model;
            cfg.num_experts = num_experts;
            cfg.expert_width = expert_width;
            cfg.hidden_bias = hidden_bias;
            cfg.expert_bias = expert_bias;
            cfg.output_bias = output_bias;
            cfg.router_hidden = router_hidden;
            if (policy != "top_k" && policy != "dynamic_k" && policy != "top_any")
              value_error("policy must be 'top_k', 'dynamic_k' or 'top_any', got '%s'", policy.c_str());
            if (policy == "top_k" && !k && num_experts >= 1 && num_experts < 2) k = 1;  // the default k=2 needs 2
            const layer_options o = merge_options(policy, layer_options{}, k, renormalize, tau, k_max, training);
            auto pl = choose_pool(threads, std::move(pool));
            const weight_storage ws = parse_storage(storage);
            const dmoe::infer_precision ip = parse_precision(precision);
            auto impl = make_any_layer(policy, activation, cfg, o);
            impl->set_storage(ws);
            impl->set_infer_precision(ip);
            if (seed) impl->randomize(*seed);
            new (self) py_layer(wrap_layer(std::move(impl), std::move(pl)));
          },
          "d_model"_a, "num_experts"_a, "expert_width"_a, nb::kw_only(), "policy"_a = "top_k",
          "activation"_a = "gelu_erf", "k"_a = nb::none(), "renormalize"_a = nb::none(), "tau"_a = nb::none(),
          "k_max"_a = nb::none(), "training"_a = nb::none(), "hidden_bias"_a = true, "expert_bias"_a = false,
          "output_bias"_a = true, "router_hidden"_a = 128, "seed"_a.none() = 0, "threads"_a = nb::none(),
          "pool"_a = nb::none(), "weight_storage"_a = "f32", "infer_precision"_a = "exact",
          "Builds a layer. policy: 'top_k' (options k, renormalize), 'dynamic_k' (tau, k_max, router_hidden) or\n"
          "'top_any' (training). activation: relu, gelu_erf, gelu_tanh, silu, swiglu, geglu. Weights are\n"
          "randomized from `seed` (None: all zero). threads: a pool of its own; pool: a shared ThreadPool;\n"
          "neither: the module's default pool (one thread per core). weight_storage, infer_precision: see the\n"
          "properties.")
      .def_prop_ro("policy", [](const py_layer& l) { return std::string(l.impl->policy()); })
      .def_prop_ro("activation", [](const py_layer& l) { return std::string(l.impl->activation()); })
      .def_prop_ro("d_model", [](const py_layer& l) { return l.cfg().d_model; })
      .def_prop_ro("num_experts", [](const py_layer& l) { return l.cfg().num_experts; })
      .def_prop_ro("expert_width", [](const py_layer& l) { return l.cfg().expert_width; })
      .def_prop_ro("router_hidden",
                   [](py_layer& l) -> index_t { return l.impl->dynamic_k() ? l.impl->dynamic_k()->hidden() : 0; })
      .def_prop_ro("hidden_bias", [](const py_layer& l) { return l.cfg().hidden_bias; })
      .def_prop_ro("expert_bias", [](const py_layer& l) { return l.cfg().expert_bias; })
      .def_prop_ro("output_bias", [](const py_layer& l) { return l.cfg().output_bias; })
      .def_prop_rw(
          "weight_storage", [](const py_layer& l) { return std::string(to_string(l.impl->storage())); },
          [](py_layer& l, const std::string& s) { l.impl->set_storage(parse_storage(s)); },
          "The format the expert products read W1 and W2 in: 'f32' (default), 'bf16' or 'f16'. With a 16-bit\n"
          "format the kernels read copies rounded to nearest even (half the bytes per token) and accumulate in\n"
          "float32: results are exactly those of a float32 layer holding the rounded W1, W2. The parameters\n"
          "stay float32 (the master copy optimizers update); gradients are float32.")
      .def_prop_rw(
          "infer_precision", [](const py_layer& l) { return std::string(dmoe::to_string(l.impl->infer_precision())); },
          [](py_layer& l, const std::string& s) { l.impl->set_infer_precision(parse_precision(s)); },
          "What infer() may compute with: 'exact' (default: forward's bits) or 'bf16'. With 'bf16', on a CPU with\n"
          "bf16 matrix tiles (Intel AMX: dmoe.cpu_has_bf16_tiles()), infer rounds the expert inputs, hidden\n"
          "activations and W1, W2 to bfloat16 and multiplies on the tiles in float32: about bf16's precision\n"
          "from forward's result, several times faster at large batches, still deterministic and independent\n"
          "of the batch. Elsewhere infer stays exact. forward and backward are unaffected.")
      .def_prop_ro("infer_on_bf16_tiles", [](const py_layer& l) { return l.impl->infer_uses_bf16_tiles(); },
                   "Whether infer() runs on bf16 tiles now (infer_precision 'bf16' on a CPU that has them).")
      .def_prop_ro("threads", &py_layer::threads, "Threads the layer's calls run on.")
      .def_prop_ro("max_k", [](const py_layer& l) { return l.impl->max_k(); }, "Most experts one token can get.")
      .def_prop_ro("flops_per_slot", [](const py_layer& l) { return l.impl->flops_per_slot(); })
      .def_prop_ro("router_flops_per_token", [](const py_layer& l) { return l.impl->router_flops_per_token(); })
      .def_prop_rw(
          "k", [](const py_layer& l) -> std::optional<index_t> {
            if (std::string(l.impl->policy()) != "top_k") return std::nullopt;
            return l.impl->options().k;
          },
          [](py_layer& l, index_t v) { set_layer_option(l, "k", "top_k", [&](layer_options& o) { o.k = v; }); },
          "top_k: experts per token (None for other policies).")
      .def_prop_rw(
          "renormalize", [](const py_layer& l) -> std::optional<bool> {
            if (std::string(l.impl->policy()) != "top_k") return std::nullopt;
            return l.impl->options().renormalize;
          },
          [](py_layer& l, bool v) {
            set_layer_option(l, "renormalize", "top_k", [&](layer_options& o) { o.renormalize = v; });
          })
      .def_prop_rw(
          "tau", [](const py_layer& l) -> std::optional<double> {
            if (std::string(l.impl->policy()) != "dynamic_k") return std::nullopt;
            return l.impl->options().tau;
          },
          [](py_layer& l, double v) { set_layer_option(l, "tau", "dynamic_k", [&](layer_options& o) { o.tau = v; }); },
          "dynamic_k: expert e runs iff r_e >= tau * max r (None for other policies).")
      .def_prop_rw(
          "k_max", [](const py_layer& l) -> std::optional<index_t> {
            if (std::string(l.impl->policy()) != "dynamic_k") return std::nullopt;
            return l.impl->options().k_max;
          },
          [](py_layer& l, index_t v) {
            set_layer_option(l, "k_max", "dynamic_k", [&](layer_options& o) { o.k_max = v; });
          })
      .def_prop_rw(
          "training", [](const py_layer& l) -> std::optional<bool> {
            if (std::string(l.impl->policy()) != "top_any") return std::nullopt;
            return l.impl->options().training;
          },
          [](py_layer& l, bool v) {
            set_layer_option(l, "training", "top_any", [&](layer_options& o) { o.training = v; });
          },
          "top_any: a token that fires nothing gets no expert (True) or its best active one (False).")
      .def_prop_rw(
          "active",
          [](py_layer& l) -> nb::object {
            auto* r = l.impl->top_any();
            if (!r) return nb::none();
            return nb::cast(copy_array<std::uint8_t>(r->active().data(), {r->active().size()}));
          },
          [](py_layer& l, const std::vector<int>& mask) {
            auto* r = l.impl->top_any();
            if (!r) value_error("active: only top_any layers have an active mask; this layer is '%s'", l.impl->policy());
            if (mask.size() != r->active().size())
              value_error("active: mask has %zu entries, the layer has %zu experts", mask.size(), r->active().size());
            std::size_t on = 0;
            for (int v : mask) on += v ? 1 : 0;
            if (on == 0) value_error("active: at least one expert must stay active");
            for (std::size_t i = 0; i < mask.size(); ++i) r->active()[i] = mask[i] ? 1 : 0;
            ++l.generation;
          },
          "top_any: the active mask (uint8, copy; assign a new mask to change it). None for other policies.")
      .def_prop_ro("num_active", [](py_layer& l) -> std::optional<index_t> {
        auto* r = l.impl->top_any();
        if (!r) return std::nullopt;
        return r->num_active();
      })
      .def(
          "randomize",
          [](py_layer& l, std::uint64_t seed, std::optional<index_t> initial_active) {
            if (initial_active) {
              auto* r = l.impl->top_any();
              if (!r) value_error("randomize: initial_active is for top_any layers; this layer is '%s'", l.impl->policy());
              if (*initial_active < 1 || *initial_active > l.cfg().num_experts)
                value_error("randomize: initial_active must be in [1, num_experts = %td], got %td", l.cfg().num_experts,
                            *initial_active);
              l.impl->randomize(seed);
              r->randomize(seed ^ 0x5eedULL, *initial_active);
            } else {
              l.impl->randomize(seed);
            }
            ++l.generation;
          },
          "seed"_a, "initial_active"_a = nb::none(),
          "Seeded random weights (PyTorch-style uniform init; top_any: orthonormal gate embeddings).\n"
          "top_any: `initial_active` lowest slots active, the rest free for the adaptive count.")
      .def("workspace_size", [](const py_layer& l, index_t tokens) { return l.impl->workspace_size(tokens, l.threads()); },
           "tokens"_a, "Bytes a forward on `tokens` tokens keeps.")
      .def("forward", &layer_forward, "x"_a, "out"_a = nb::none(), nb::kw_only(), "workspace"_a.none() = nb::none(),
           "y = MoE(x) for x (tokens, d_model) float32 on the CPU (NumPy or any DLPack tensor, no copy).\n"
           "out: where to write y (same shape, writable); None allocates a NumPy array. Returns y.\n"
           "workspace: where the forward's state is kept for backward (default: the layer's own).\n"
           "The GIL is released while it runs.")
      .def("infer", &layer_infer, "x"_a, "out"_a = nb::none(), nb::kw_only(), "workspace"_a.none() = nb::none(),
           "y = MoE(x) for inference: forward's bits; on one thread each expert's output is added into y\n"
           "as it is computed, not kept. Routing statistics, plan and scores are kept;\n"
           "backward refuses the workspace (call forward for training). Arguments as for forward.")
      .def("__call__", &layer_forward, "x"_a, "out"_a = nb::none(), nb::kw_only(), "workspace"_a.none() = nb::none())
      .def("make_gradients",
           [](py_layer& l) { return py_gradients{l.impl->make_gradients(), &l}; },
           "Zero gradients shaped like the parameters (reuse them across backward calls).")
      .def("backward", &layer_backward, "x"_a, "dy"_a, "dx"_a = nb::none(), nb::kw_only(), "grads"_a.none() = nb::none(),
           "workspace"_a.none() = nb::none(), "aux_weights"_a = nb::none(),
           "Backward of the forward kept in `workspace`, for L = <dy, y> + sum_i aux_weights[i] * aux_i.\n"
           "x must be the forward's input. Overwrites dx (None: allocated) and grads (None: made).\n"
           "Returns (dx, grads). The GIL is released while it runs.")
      .def(
          "aux_losses",
          [](py_layer& l, py_workspace* wsp) {
            auto& ws = l.ws_or_own(wsp);
            l.expect_forward(ws, "aux_losses", -1);
            return aux_dict(l.impl->aux_values(ws.buf, ws.tokens));
          },
          nb::kw_only(), "workspace"_a.none() = nb::none(),
          "Auxiliary loss values of the last forward: load_balance, z_loss (top_k); diversity,\n"
          "simplicity, balance, efficiency (top_any); zero for terms of other policies.")
      .def(
          "routing_stats",
          [](py_layer& l, py_workspace* wsp) {
            auto& ws = l.ws_or_own(wsp);
            l.expect_forward(ws, "routing_stats", -1);
            return ws.stats;
          },
          nb::kw_only(), "workspace"_a.none() = nb::none(), "Routing statistics of the last forward (a copy).")
      .def(
          "scores",
          [](py_layer& l, py_workspace* wsp) {
            auto& ws = l.ws_or_own(wsp);
            l.expect_forward(ws, "scores", -1);
            const auto s = l.impl->scores(ws.buf, ws.tokens);
            auto a = new_array<float>({std::size_t(s.rows), std::size_t(s.cols)});
            for (index_t t = 0; t < s.rows; ++t) std::memcpy(a.data() + t * s.cols, s.row(t), sizeof(float) * s.cols);
            return a;
          },
          nb::kw_only(), "workspace"_a.none() = nb::none(),
          "Router scores of the last forward (tokens, num_experts), a copy: softmax probabilities (top_k),\n"
          "predicted output norms (dynamic_k) or cosines (top_any).")
      .def(
          "plan",
          [](py_layer& l, py_workspace* wsp) {
            auto& ws = l.ws_or_own(wsp);
            l.expect_forward(ws, "plan", -1);
            const auto p = l.impl->plan(ws.buf, ws.tokens);
            const std::size_t nnz = std::size_t(p.nnz());
            nb::dict d;
            d["token_offsets"] = copy_array<index_t>(p.token_offsets, {std::size_t(p.tokens + 1)});
            d["expert"] = copy_array<std::int32_t>(p.expert, {nnz});
            d["weight"] = copy_array<float>(p.weight, {nnz});
            return d;
          },
          nb::kw_only(), "workspace"_a.none() = nb::none(),
          "Routing plan of the last forward (copies): token t's slots are token_offsets[t]:token_offsets[t+1]\n"
          "of expert (ascending ids) and weight.")
      .def("mark_modified", [](py_layer& l) { l.impl->mark_modified(); },
          "Declares that parameters were written through arrays taken earlier (parameters() views): the\n"
          "CPU kernels keep a packed copy of w1/w2 and repack it on the next forward. dmoe.torch.MoE calls\n"
          "this when torch's parameter version counters moved (optimizer steps, in-place edits).")
      .def(
          "parameters",
          [](nb::handle self, const std::string& group) {
            auto& l = nb::cast<py_layer&>(self);
            return tensors_dict(l.impl->parameters(parse_group(group)), self);
          },
          "group"_a = "all",
          "Zero-copy NumPy views of the parameters, by name: w1 (E, f*n, d), b1 (E, f*n), w2 (E, d, n),\n"
          "expert_bias (E, d), output_bias (d,), router_* (see docs/python.md). Writing them changes the layer.")
      // --- D2DMoE router training and conversion (dynamic_k) ---
      .def(
          "router_targets",
          [](py_layer& l, nb::handle x, const std::string& target) {
            const fmat X = as_matrix(x, "router_targets", "x", false, -1, l.cfg().d_model);
            const router_target t = parse_target(target);
            row_matrix<float> y;
            {
              nb::gil_scoped_release nogil;
              y = l.impl->router_targets(X.cview(), t);
            }
            return copy_array<float>(y.data(), {std::size_t(y.rows()), std::size_t(y.cols())});
          },
          "x"_a, "target"_a = "output_norm",
          "Per (token, expert) targets from the experts: the L2 norm of each expert's output without b2\n"
          "(output_norm, D2DMoE) or the sum of its positive activations (summed_activation, MoEfication).")
      .def(
          "router_regression_loss",
          [](py_layer& l, nb::handle x, nb::handle targets) {
            auto* r = l.impl->dynamic_k();
            if (!r) value_error("router_regression_loss: needs a dynamic_k layer; this layer is '%s'", l.impl->policy());
            const fmat X = as_matrix(x, "router_regression_loss", "x", false, -1, l.cfg().d_model);
            const fmat Y = as_matrix(targets, "router_regression_loss", "targets", false, X.rows, l.cfg().num_experts);
            dynamic_k_router<float> g(r->d_model(), r->num_experts(), r->options(), r->hidden());
            float loss;
            {
              nb::gil_scoped_release nogil;
              loss = router_regression_loss(*r, X.cview(), Y.cview(), &g);
            }
            nb::dict grads;  // row-major views of the column-major blocks, as parameters() names them
            grads["router_w_in"] = copy_array<float>(g.w_in().data(), {std::size_t(g.hidden()), std::size_t(g.d_model())});
            grads["router_w_out"] =
                copy_array<float>(g.w_out().data(), {std::size_t(g.num_experts()), std::size_t(g.hidden())});
            return nb::make_tuple(double(loss), grads);
          },
          "x"_a, "targets"_a,
          "D2DMoE's router loss: mean squared error of r = |ReLU(x W_in) W_out| against targets\n"
          "(tokens, E); returns (loss, {router_w_in: grad, router_w_out: grad}). x is a constant.")
      .def(
          "fit_router",
          [](py_layer& l, nb::handle x, const std::string& target, int epochs, index_t batch_size, double lr,
             double weight_decay, std::uint64_t seed, nb::handle heldout_x, std::optional<nb::callable> progress) {
            const fmat X = as_matrix(x, "fit_router", "x", false, -1, l.cfg().d_model);
            fmat H;
            if (!heldout_x.is_none()) H = as_matrix(heldout_x, "fit_router", "heldout_x", false, -1, l.cfg().d_model);
            router_fit_options o;
            o.epochs = epochs;
            o.batch_size = batch_size;
            o.optimizer.lr = lr;
            o.optimizer.weight_decay = weight_decay;
            o.seed = seed;
            router_fit_callback cb;
            if (progress) {
              nb::callable fn = *progress;
              cb = [fn](const router_fit_progress& p) {
                nb::gil_scoped_acquire gil;
                nb::dict d;
                d["epoch"] = p.epoch;
                d["epochs"] = p.epochs;
                d["loss"] = p.loss;
                d["tokens_seen"] = p.tokens_seen;
                d["steps"] = p.steps;
                d["seconds"] = p.seconds;
                fn(d);
              };
            }
            const router_target t = parse_target(target);
            router_fit_report rep;
            {
              nb::gil_scoped_release nogil;
              rep = l.impl->fit_router(X.cview(), t, o, H.cview(), cb);
            }
            ++l.generation;
            nb::dict d;
            d["initial_loss"] = rep.initial_loss;
            d["final_loss"] = rep.final_loss;
            d["heldout_initial_loss"] = rep.heldout_initial_loss;
            d["heldout_loss"] = rep.heldout_loss;
            d["target_mean_square"] = rep.target_mean_square;
            d["steps"] = rep.steps;
            d["tokens_seen"] = rep.tokens_seen;
            d["seconds"] = rep.seconds;
            return d;
          },
          "x"_a, nb::kw_only(), "target"_a = "output_norm", "epochs"_a = 40, "batch_size"_a = 64, "lr"_a = 1e-3,
          "weight_decay"_a = 0.01, "seed"_a = 0, "heldout_x"_a = nb::none(), "progress"_a = nb::none(),
          "Fits the dynamic_k router to its experts' targets on calibration tokens x (experts frozen),\n"
          "with AdamW. progress(dict) is called after every epoch (epoch, epochs, loss, tokens_seen,\n"
          "steps, seconds): tqdm-friendly. Returns the fit report as a dict.")
      .def(
          "sweep",
          [](py_layer& l, nb::handle x, nb::handle y_ref, std::vector<double> taus, const std::string& name) {
            const fmat X = as_matrix(x, "sweep", "x", false, -1, l.cfg().d_model);
            const fmat Y = as_matrix(y_ref, "sweep", "y_ref", false, X.rows, l.cfg().d_model);
            std::vector<sweep_point> pts;
            {
              nb::gil_scoped_release nogil;
              pts = l.impl->sweep_dynamic_k(l.ctx(), X.cview(), Y.cview(), taus, name);
            }
            nb::list out;
            for (const auto& p : pts) out.append(point_dict(p));
            return out;
          },
          "x"_a, "y_ref"_a, "taus"_a, "name"_a = "d2dmoe",
          "Measures the dynamic_k layer at each tau on tokens x against y_ref (usually the dense FFN's\n"
          "output). One dict per tau: tau, k, flops_fraction, token_rel_error, mean_cosine (per-token\n"
          "measures first), rel_error (Frobenius over all tokens), mean_k, k_histogram, ...")
      .def(
          "sweep_top_k",
          [](py_layer& l, nb::handle x, nb::handle y_ref, std::vector<index_t> ks, const std::string& name) {
            const fmat X = as_matrix(x, "sweep_top_k", "x", false, -1, l.cfg().d_model);
            const fmat Y = as_matrix(y_ref, "sweep_top_k", "y_ref", false, X.rows, l.cfg().d_model);
            std::vector<sweep_point> pts;
            {
              nb::gil_scoped_release nogil;
              pts = l.impl->sweep_top_k(l.ctx(), X.cview(), Y.cview(), ks, name);
            }
            nb::list out;
            for (const auto& p : pts) out.append(point_dict(p));
            return out;
          },
          "x"_a, "y_ref"_a, "ks"_a, "name"_a = "moefication",
          "The same router used as top-k (the k largest scores, weight 1): the MoEfication baseline.")
      .def(
          "tau_for_flops",
          [](py_layer& l, nb::handle x, double target, nb::handle y_ref, double tolerance, int max_evaluations) {
            const fmat X = as_matrix(x, "tau_for_flops", "x", false, -1, l.cfg().d_model);
            fmat Y;
            if (!y_ref.is_none()) Y = as_matrix(y_ref, "tau_for_flops", "y_ref", false, X.rows, l.cfg().d_model);
            tau_search_options o;
            o.tolerance = tolerance;
            o.max_evaluations = max_evaluations;
            tau_search_result r;
            {
              nb::gil_scoped_release nogil;
              r = l.impl->tau_for_flops(l.ctx(), X.cview(), Y.cview(), target, o);
            }
            nb::dict d;
            d["tau"] = r.tau;
            d["point"] = point_dict(r.point);
            d["evaluations"] = r.evaluations;
            d["lower_tau"] = r.lower_tau;
            return d;
          },
          "x"_a, "target_fraction"_a, nb::kw_only(), "y_ref"_a = nb::none(), "tolerance"_a = 1e-3,
          "max_evaluations"_a = 40,
          "The smallest tau whose executed FLOPs fraction on tokens x is <= target_fraction (bisection;\n"
          "the layer's tau is left as it was: set layer.tau = result['tau']). Errors in result['point']\n"
          "are against y_ref, or the layer's all-experts output when y_ref is None.")
      .def(
          "save",
          [](const py_layer& l, const std::string& path, const std::string& dtype) {
            l.impl->save(path, parse_st_dtype(dtype));
          },
          "path"_a, "dtype"_a = "F32", "Writes the layer (configuration, options, weights) to a safetensors file.");

  m.def(
      "load_moe_layer",
      [](const std::string& path, std::optional<int> threads, std::shared_ptr<thread_pool> pool) {
        const auto f = safetensors_file::from_path(path);
        const std::string policy = f.metadata_value("dmoe.policy");
        auto pl = choose_pool(threads, std::move(pool));
        std::unique_ptr<any_layer> impl;
        if (policy == "top_k") impl = load_top_k_layer(f);
        else if (policy == "dynamic_k") impl = load_dynamic_k_layer(f);
        else if (policy == "top_any") impl = load_top_any_layer(f);
        else
          value_error("load_moe_layer: '%s' records policy '%s', expected a file written by MoELayer.save", path.c_str(),
                      policy.c_str());
        return wrap_layer(std::move(impl), std::move(pl));
      },
      "path"_a, nb::kw_only(), "threads"_a = nb::none(), "pool"_a = nb::none(),
      "Reads a layer written by MoELayer.save (policy and activation come from the file).");

  nb::class_<neuron_split>(m, "Split", "A split of a dense FFN's neurons into experts (see DenseFFN.split).")
      .def_ro("num_experts", &neuron_split::num_experts)
      .def_ro("width", &neuron_split::width)
      .def_prop_ro("neurons",
                   [](const neuron_split& s) {
                     return nb::cast(
                         copy_array<index_t>(s.neurons.data(), {std::size_t(s.num_experts), std::size_t(s.width)}));
                   },
                   "(num_experts, width): expert e's neurons, ascending")
      .def_ro("inertia", &neuron_split::inertia)
      .def_ro("iterations", &neuron_split::iterations)
      .def_ro("converged", &neuron_split::converged)
      .def_ro("restart_inertia", &neuron_split::restart_inertia);

  nb::class_<py_dense>(m, "DenseFFN", "A dense FFN y = act(x W1^T + b1) W2^T + b2 (float32), the source of a conversion.")
      .def(
          "__init__",
          [](py_dense* self, index_t d_model, index_t hidden, const std::string& activation,
             std::optional<std::uint64_t> seed, std::optional<int> threads, std::shared_ptr<thread_pool> pool) {
            auto pl = choose_pool(threads, std::move(pool));
            auto impl = make_dense(activation, d_model, hidden);
            if (seed) impl->randomize(*seed);
            new (self) py_dense();
            self->impl = std::move(impl);
            self->pool = std::move(pl);
          },
          "d_model"_a, "hidden"_a, nb::kw_only(), "activation"_a = "gelu_erf", "seed"_a.none() = 0,
          "threads"_a = nb::none(), "pool"_a = nb::none())
      .def_static(
          "load",
          [](const std::string& path, nb::handle names, int layer, const std::string& prefix, const std::string& activation,
             std::optional<int> threads, std::shared_ptr<thread_pool> pool) {
            const auto f = safetensors_file::from_path(path);
            auto pl = choose_pool(threads, std::move(pool));
            auto impl = load_dense(activation, f, names_from(names, layer, prefix));
            auto d = std::make_unique<py_dense>();
            d->impl = std::move(impl);
            d->pool = std::move(pl);
            return d.release();
          },
          "path"_a, "names"_a = "bert", "layer"_a = 0, "prefix"_a = "", "activation"_a = "gelu_erf", nb::kw_only(),
          "threads"_a = nb::none(), "pool"_a = nb::none(), nb::rv_policy::take_ownership,
          "Loads a dense FFN from a safetensors file by tensor names: 'bert', 'gpt2', 'llama' (with layer\n"
          "and prefix) or a dict {w1, b1, w2, b2, w_gate, layout: 'out_in'|'in_out'}.")
      .def_prop_ro("activation", [](const py_dense& d) { return std::string(d.impl->activation()); })
      .def_prop_ro("d_model", [](const py_dense& d) { return d.impl->d_model(); })
      .def_prop_ro("hidden", [](const py_dense& d) { return d.impl->hidden(); })
      .def_prop_ro("flops_per_token", [](const py_dense& d) { return d.impl->flops_per_token(); })
      .def("randomize", [](py_dense& d, std::uint64_t seed) { d.impl->randomize(seed); }, "seed"_a)
      .def("mark_modified", [](py_dense& d) { d.impl->mark_modified(); },
          "Declares that parameters were written through arrays taken earlier (parameters() views): the\n"
          "CPU kernels keep a packed copy of w1/w2 and repack it on the next forward. dmoe.torch.MoE calls\n"
          "this when torch's parameter version counters moved (optimizer steps, in-place edits).")
      .def(
          "parameters",
          [](nb::handle self) {
            auto& d = nb::cast<py_dense&>(self);
            return tensors_dict(d.impl->parameters(), self);
          },
          "Zero-copy NumPy views: w1 (f*F, d) (nn.Linear layout; gated: gate rows then up rows), b1 (f*F),\n"
          "w2 (d, F), b2 (d).")
      .def(
          "forward",
          [](py_dense& d, nb::handle x, nb::handle out) {
            const index_t dm = d.impl->d_model();
            const fmat X = as_matrix(x, "DenseFFN.forward", "x", false, -1, dm);
            nb::object result;
            fmat Y;
            if (out.is_none()) {
              auto y = new_array<float>({std::size_t(X.rows), std::size_t(dm)});
              Y = fmat{y.data(), X.rows, dm, dm};
              result = nb::cast(y);
            } else {
              Y = as_matrix(out, "DenseFFN.forward", "out", true, X.rows, dm);
              result = nb::borrow(out);
            }
            status s;
            {
              nb::gil_scoped_release nogil;
              std::lock_guard<std::mutex> lock(d.mu);
              d.buf.resize(d.impl->workspace_size(X.rows, d.threads()));
              s = d.impl->forward(d.ctx(), X.cview(), Y.view(), d.buf);
            }
            check(s);
            return result;
          },
          "x"_a, "out"_a = nb::none())
      .def("__call__",
           [](nb::handle self, nb::handle x, nb::handle out) { return self.attr("forward")(x, out); }, "x"_a,
           "out"_a = nb::none())
      .def(
          "split",
          [](const py_dense& d, index_t num_experts, const std::string& method, std::uint64_t seed, int restarts,
             int max_iterations, const std::string& gated) {
            split_options o;
            o.method = parse_split_method(method);
            o.seed = seed;
            o.restarts = restarts;
            o.max_iterations = max_iterations;
            if (gated == "gate") o.gated = gated_features::gate;
            else if (gated == "gate_and_up") o.gated = gated_features::gate_and_up;
            else value_error("split: gated must be 'gate' or 'gate_and_up', got '%s'", gated.c_str());
            nb::gil_scoped_release nogil;
            return d.impl->split(num_experts, o);
          },
          "num_experts"_a, nb::kw_only(), "method"_a = "balanced_kmeans", "seed"_a = 0, "restarts"_a = 3,
          "max_iterations"_a = 25, "gated"_a = "gate",
          "Splits the hidden units into num_experts experts of equal width (balanced k-means of the input\n"
          "weight directions by default; 'contiguous' and 'random' are baselines).")
      .def(
          "to_moe",
          [](const py_dense& d, const neuron_split& split, const std::string& policy, std::optional<index_t> k,
             std::optional<bool> renormalize, std::optional<double> tau, std::optional<index_t> k_max,
             std::optional<bool> training, index_t router_hidden) {
            if (policy == "top_k" && !k && split.num_experts < 2) k = 1;
            const layer_options o = merge_options(policy, layer_options{}, k, renormalize, tau, k_max, training);
            std::unique_ptr<any_layer> impl;
            if (policy == "top_k") impl = top_k_from_dense(*d.impl, split, o);
            else if (policy == "dynamic_k") impl = dynamic_k_from_dense(*d.impl, split, o, router_hidden);
            else if (policy == "top_any") impl = top_any_from_dense(*d.impl, split, o);
            else value_error("to_moe: policy must be 'top_k', 'dynamic_k' or 'top_any', got '%s'", policy.c_str());
            return wrap_layer(std::move(impl), d.pool);
          },
          "split"_a, nb::kw_only(), "policy"_a = "dynamic_k", "k"_a = nb::none(), "renormalize"_a = nb::none(),
          "tau"_a = nb::none(), "k_max"_a = nb::none(), "training"_a = nb::none(), "router_hidden"_a = 128,
          "The MoE layer of this FFN split by `split` (router zero: fit it with fit_router). With every\n"
          "expert on (dynamic_k, tau = 0) it computes this FFN.")
      .def(
          "save",
          [](const py_dense& d, const std::string& path, nb::handle names, int layer, const std::string& prefix,
             const std::string& dtype) { d.impl->save(path, names_from(names, layer, prefix), parse_st_dtype(dtype)); },
          "path"_a, "names"_a = "bert", "layer"_a = 0, "prefix"_a = "", "dtype"_a = "F32",
          "Writes the FFN to a safetensors file under the given tensor names.");

  nb::class_<py_adapter>(m, "ExpertCountAdapter",
                         "DynMoE's adaptive expert count for a top_any layer: record batches, then call\n"
                         "on_optimizer_step() after each optimizer step.")
      .def(
          "__init__",
          [](py_adapter* self, py_layer& layer, long interval) {
            if (!layer.impl->top_any())
              value_error("ExpertCountAdapter: needs a top_any layer; this layer is '%s'", layer.impl->policy());
            new (self) py_adapter{expert_count_adapter<float>(layer.cfg().d_model, layer.cfg().num_experts, interval),
                                  &layer};
          },
          "layer"_a, "interval"_a = 1, nb::keep_alive<1, 2>())
      .def(
          "record",
          [](py_adapter& a, nb::handle x, py_workspace* wsp) {
            py_layer& l = *a.layer;
            const fmat X = as_matrix(x, "ExpertCountAdapter.record", "x", false, -1, l.cfg().d_model);
            auto& ws = l.ws_or_own(wsp);
            l.expect_forward(ws, "ExpertCountAdapter.record", X.rows);
            check(a.a.record(*l.impl->top_any(), X.cview(), l.impl->scores(ws.buf, ws.tokens)));
          },
          "x"_a, nb::kw_only(), "workspace"_a.none() = nb::none(),
          "Adds the batch x of the layer's last forward (in `workspace`) to the record window.")
      .def(
          "on_optimizer_step",
          [](py_adapter& a) {
            auto r = a.a.on_optimizer_step(*a.layer->impl->top_any());
            if (r.updated) ++a.layer->generation;
            return report_dict(r);
          },
          "Counts one optimizer step; every `interval` steps applies the update. Returns what changed.")
      .def(
          "update",
          [](py_adapter& a) {
            auto r = a.a.update(*a.layer->impl->top_any());
            ++a.layer->generation;
            return report_dict(r);
          },
          "Applies the update now (after summing the window over data-parallel replicas).")
      .def("reset_window", [](py_adapter& a) { a.a.reset_window(); })
      .def_prop_ro("optimizer_steps", [](py_adapter& a) { return a.a.optimizer_steps(); })
      .def_prop_ro(
          "window_counts",
          [](nb::handle self) {
            auto& a = nb::cast<py_adapter&>(self);
            return nb::cast(view_array<double>(a.a.window_counts().data(), {a.a.window_counts().size()}, self));
          },
          "R_E: tokens that fired each slot in the window (float64, zero-copy: all-reduce it in place).")
      .def_prop_ro(
          "window_unrouted",
          [](nb::handle self) {
            auto& a = nb::cast<py_adapter&>(self);
            return nb::cast(view_array<double>(a.a.window_unrouted().data(), {a.a.window_unrouted().size()}, self));
          },
          "R_S: sum of the inputs that fired nothing (float64, zero-copy: all-reduce it in place).");

  m.def("cpu_has_bf16_tiles", [] { return dmoe::cpu_has_bf16_tiles(); },
        "Whether this CPU runs MoELayer.infer_precision = 'bf16' on bf16 matrix tiles (Intel AMX-BF16, granted\n"
        "by the OS); elsewhere that setting leaves infer exact.");
  m.def(
      "activation_sparsity",
      [](nb::handle a, const std::string& kind) {
        const fmat A = as_matrix(a, "activation_sparsity", "a", false, -1, -1);
        sparsity_penalty k;
        if (kind == "hoyer_squared") k = sparsity_penalty::hoyer_squared;
        else if (kind == "l1") k = sparsity_penalty::l1;
        else value_error("activation_sparsity: kind must be 'hoyer_squared' or 'l1', got '%s'", kind.c_str());
        auto g = new_array<float>({std::size_t(A.rows), std::size_t(A.cols)});
        float v;
        {
          nb::gil_scoped_release nogil;
          v = activation_sparsity(k, A.cview(), matrix_view<float>(g.data(), A.rows, A.cols));
        }
        return nb::make_tuple(double(v), g);
      },
      "a"_a, "kind"_a = "hoyer_squared",
      "D2DMoE's activation-sparsity penalty on FFN activations a (tokens, F), averaged over tokens:\n"
      "'hoyer_squared' (||a||_1^2 / ||a||_2^2) or 'l1'. Returns (value, gradient).");
}
