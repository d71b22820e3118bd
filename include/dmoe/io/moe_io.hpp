// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../core/namespace.hpp"
/// \file
/// Saving and loading a whole MoE layer (configuration, router options, experts, router and the
/// top-any active mask) as one safetensors file. Saved in the layer's own precision (F32 for
/// float, F64 for double) the round trip is bit-exact. Layout (docs/io.md):
///  metadata  dmoe.format = "moe_layer", dmoe.format_version = "1", dmoe.policy, dmoe.activation,
///            dmoe.scalar, dmoe.d_model, dmoe.num_experts, dmoe.expert_width, dmoe.hidden_bias,
///            dmoe.expert_bias, dmoe.output_bias, dmoe.router_hidden and the policy's options
///            (dmoe.top_k.k, dmoe.top_k.renormalize | dmoe.dynamic_k.tau, dmoe.dynamic_k.k_max |
///            dmoe.top_any.training); optional dmoe.weight_storage (f32 | bf16 | f16: the CPU
///            layer's set_weight_storage, restored by load; absent means f32);
///  tensors   experts.w1 (E, f n, d), experts.b1 (E, f n), experts.w2 (E, d, n),
///            experts.expert_bias (E, d), experts.output_bias (d) — per expert in nn.Linear
///            (out, in) layout, biases only when the configuration has them;
///            top_k: router.weight (E, d), router.bias (E); dynamic_k: router.w_in (h, d),
///            router.w_out (E, h); top_any: router.weight (E, d), router.threshold (E),
///            router.active (E, U8).

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

#include "../experts/weight_storage.hpp"
#include "../layer/moe_layer.hpp"
#include "safetensors.hpp"

DMOE_NAMESPACE_BEGIN

namespace detail::io {

inline constexpr const char* moe_format_version = "1";

template <class Policy>
constexpr const char* policy_name() noexcept {
  if constexpr (std::is_same_v<Policy, top_k>) return "top_k";
  else if constexpr (std::is_same_v<Policy, dynamic_k>) return "dynamic_k";
  else return "top_any";
}

inline std::string meta_bool(bool b) { return b ? "true" : "false"; }
inline std::string meta_double(double v) {
  char buf[40];
  std::snprintf(buf, sizeof(buf), "%.17g", v);  // 17 significant digits: the double comes back exactly
  return buf;
}

/// Metadata reader for one file: every getter names the file and the key on error.
struct meta_reader {
  const safetensors_file& f;
  std::string get(const char* key) const {
    auto it = f.metadata().find(key);
    if (it == f.metadata().end())
      detail::raisef(errc::invalid_argument, "load_moe_layer '%s': metadata key '%s' is missing", f.label().c_str(), key);
    return it->second;
  }
  std::int64_t get_int(const char* key) const {
    const std::string s = get(key);
    char* end = nullptr;
    errno = 0;
    const long long v = std::strtoll(s.c_str(), &end, 10);
    if (s.empty() || errno != 0 || end != s.c_str() + s.size())
      detail::raisef(errc::invalid_argument, "load_moe_layer '%s': metadata '%s' = '%s', expected an integer",
                     f.label().c_str(), key, s.c_str());
    return static_cast<std::int64_t>(v);
  }
  double get_double(const char* key) const {
    const std::string s = get(key);
    char* end = nullptr;
    errno = 0;
    const double v = std::strtod(s.c_str(), &end);
    if (s.empty() || errno != 0 || end != s.c_str() + s.size())
      detail::raisef(errc::invalid_argument, "load_moe_layer '%s': metadata '%s' = '%s', expected a number",
                     f.label().c_str(), key, s.c_str());
    return v;
  }
  /// A dimension: an integer in [1, 2^40) (so that doubling it cannot overflow).
  index_t get_extent(const char* key) const {
    const std::int64_t v = get_int(key);
    if (v < 1 || v >= (std::int64_t(1) << 40))
      detail::raisef(errc::invalid_argument, "load_moe_layer '%s': metadata '%s' = %lld, expected a positive size",
                     f.label().c_str(), key, static_cast<long long>(v));
    return static_cast<index_t>(v);
  }
  bool get_bool(const char* key) const {
    const std::string s = get(key);
    if (s != "true" && s != "false")
      detail::raisef(errc::invalid_argument, "load_moe_layer '%s': metadata '%s' = '%s', expected true or false",
                     f.label().c_str(), key, s.c_str());
    return s == "true";
  }
  void expect(const char* key, const std::string& want) const {
    const std::string s = get(key);
    if (s != want)
      detail::raisef(errc::invalid_argument, "load_moe_layer '%s': metadata '%s' is '%s' but the layer type has '%s'",
                     f.label().c_str(), key, s.c_str(), want.c_str());
  }
};

/// Values of `m` (a (rows, cols) column-major map/matrix whose column c is the c-th output) in
/// (cols, rows) row-major order, i.e. nn.Linear (out, in).
template <class M>
void append_transposed(std::vector<double>& v, const M& m) {
  for (index_t c = 0; c < m.cols(); ++c)
    for (index_t r = 0; r < m.rows(); ++r) v.push_back(double(m(r, c)));
}
template <class M>
void append_vector(std::vector<double>& v, const M& m) {
  for (index_t i = 0; i < m.size(); ++i) v.push_back(double(m(i)));
}
/// Reads tensor `name` with shape `shape` into a column-major (rows, cols) target stored as
/// (cols, rows) row-major: the inverse of append_transposed (offset: where this block starts).
template <class T, class M>
void fill_transposed(M&& m, const std::vector<T>& v, std::size_t offset) {
  for (index_t c = 0; c < m.cols(); ++c)
    for (index_t r = 0; r < m.rows(); ++r) m(r, c) = v[offset++];
}
template <class T, class M>
void fill_vector(M&& m, const std::vector<T>& v, std::size_t offset) {
  for (index_t i = 0; i < m.size(); ++i) m(i) = v[offset++];
}
inline std::vector<std::int64_t> shape_of(std::initializer_list<index_t> s) {
  std::vector<std::int64_t> r;
  for (auto x : s) r.push_back(static_cast<std::int64_t>(x));
  return r;
}

}  // namespace detail::io

/// Adds a layer's tensors and metadata to `w`, weights converted to `dtype` (the default keeps
/// the layer's precision and makes the round trip exact; F16/BF16 round).
namespace detail::io {
/// Layers whose kernels can read 16-bit expert matrices (the CPU layer: set_weight_storage).
template <class Layer, class = void>
struct has_weight_storage : std::false_type {};
template <class Layer>
struct has_weight_storage<Layer, std::void_t<decltype(std::declval<const Layer&>().weight_storage())>>
    : std::true_type {};
}  // namespace detail::io

template <class Layer>
void save_moe_layer(safetensors_writer& w, const Layer& layer, st_dtype dtype = native_dtype<typename Layer::scalar_type>) {
  using T = typename Layer::scalar_type;
  using Policy = typename Layer::policy_type;
  using Act = typename Layer::activation_type;
  const moe_config& c = layer.config();
  const auto& ex = layer.experts();
  const index_t d = c.d_model, E = layer.num_experts(), n = layer.expert_width(), fn = width_factor<Act> * n;
  w.set_metadata("dmoe.format", "moe_layer");
  w.set_metadata("dmoe.format_version", detail::io::moe_format_version);
  w.set_metadata("dmoe.policy", detail::io::policy_name<Policy>());
  w.set_metadata("dmoe.activation", Act::name);
  w.set_metadata("dmoe.scalar", std::is_same_v<T, double> ? "double" : "float");
  w.set_metadata("dmoe.d_model", std::to_string(d));
  w.set_metadata("dmoe.num_experts", std::to_string(E));
  w.set_metadata("dmoe.expert_width", std::to_string(n));
  w.set_metadata("dmoe.hidden_bias", detail::io::meta_bool(c.hidden_bias));
  w.set_metadata("dmoe.expert_bias", detail::io::meta_bool(c.expert_bias));
  w.set_metadata("dmoe.output_bias", detail::io::meta_bool(c.output_bias));
  w.set_metadata("dmoe.router_hidden", std::to_string(c.router_hidden));
  if constexpr (detail::io::has_weight_storage<Layer>::value)  // optional: absent means f32
    w.set_metadata("dmoe.weight_storage", to_string(layer.weight_storage()));

  std::vector<double> v;
  for (index_t e = 0; e < E; ++e) detail::io::append_transposed(v, ex.w1(e));
  w.add("experts.w1", dtype, detail::io::shape_of({E, fn, d}), v);
  v.clear();
  for (index_t e = 0; e < E; ++e) detail::io::append_transposed(v, ex.w2(e));
  w.add("experts.w2", dtype, detail::io::shape_of({E, d, n}), v);
  if (c.hidden_bias) {
    v.clear();
    for (index_t e = 0; e < E; ++e) detail::io::append_vector(v, ex.b1(e));
    w.add("experts.b1", dtype, detail::io::shape_of({E, fn}), v);
  }
  if (c.expert_bias) {
    v.clear();
    for (index_t e = 0; e < E; ++e) detail::io::append_vector(v, ex.expert_bias(e));
    w.add("experts.expert_bias", dtype, detail::io::shape_of({E, d}), v);
  }
  if (c.output_bias) {
    v.clear();
    detail::io::append_vector(v, ex.output_bias());
    w.add("experts.output_bias", dtype, detail::io::shape_of({d}), v);
  }

  const auto& r = layer.router();
  v.clear();
  if constexpr (std::is_same_v<Policy, top_k>) {
    w.set_metadata("dmoe.top_k.k", std::to_string(r.options().k));
    w.set_metadata("dmoe.top_k.renormalize", detail::io::meta_bool(r.options().renormalize));
    detail::io::append_transposed(v, r.weight());
    w.add("router.weight", dtype, detail::io::shape_of({E, d}), v);
    v.clear();
    detail::io::append_vector(v, r.bias());
    w.add("router.bias", dtype, detail::io::shape_of({E}), v);
  } else if constexpr (std::is_same_v<Policy, dynamic_k>) {
    w.set_metadata("dmoe.dynamic_k.tau", detail::io::meta_double(r.options().tau));
    w.set_metadata("dmoe.dynamic_k.k_max", std::to_string(r.options().k_max));
    detail::io::append_transposed(v, r.w_in());
    w.add("router.w_in", dtype, detail::io::shape_of({r.hidden(), d}), v);
    v.clear();
    detail::io::append_transposed(v, r.w_out());
    w.add("router.w_out", dtype, detail::io::shape_of({E, r.hidden()}), v);
  } else {
    w.set_metadata("dmoe.top_any.training", detail::io::meta_bool(r.options().training));
    detail::io::append_transposed(v, r.weight());
    w.add("router.weight", dtype, detail::io::shape_of({E, d}), v);
    v.clear();
    detail::io::append_vector(v, r.threshold());
    w.add("router.threshold", dtype, detail::io::shape_of({E}), v);
    w.add("router.active", st_dtype::U8, detail::io::shape_of({E}), r.active());
  }
}

/// Writes a layer to `path` (see save_moe_layer(writer, ...)).
template <class Layer>
void save_moe_layer(const std::string& path, const Layer& layer,
                    st_dtype dtype = native_dtype<typename Layer::scalar_type>) {
  safetensors_writer w;
  save_moe_layer(w, layer, dtype);
  w.write(path);
}

/// Builds a layer of type Layer from a file written by save_moe_layer. The policy and activation
/// recorded in the file must be Layer's (the scalar type may differ: values convert); every
/// tensor's shape is checked against the recorded configuration.
template <class Layer>
Layer load_moe_layer(const safetensors_file& f) {
  using T = typename Layer::scalar_type;
  using Policy = typename Layer::policy_type;
  using Act = typename Layer::activation_type;
  const detail::io::meta_reader m{f};
  m.expect("dmoe.format", "moe_layer");
  m.expect("dmoe.format_version", detail::io::moe_format_version);
  m.expect("dmoe.policy", detail::io::policy_name<Policy>());
  m.expect("dmoe.activation", Act::name);
  moe_config c;
  c.d_model = m.get_extent("dmoe.d_model");
  c.num_experts = m.get_extent("dmoe.num_experts");
  c.expert_width = m.get_extent("dmoe.expert_width");
  c.hidden_bias = m.get_bool("dmoe.hidden_bias");
  c.expert_bias = m.get_bool("dmoe.expert_bias");
  c.output_bias = m.get_bool("dmoe.output_bias");
  c.router_hidden = std::is_same_v<Policy, dynamic_k> ? m.get_extent("dmoe.router_hidden")
                                                      : static_cast<index_t>(m.get_int("dmoe.router_hidden"));
  typename Layer::options_type opt{};
  if constexpr (std::is_same_v<Policy, top_k>) {
    opt.k = static_cast<index_t>(m.get_int("dmoe.top_k.k"));
    opt.renormalize = m.get_bool("dmoe.top_k.renormalize");
  } else if constexpr (std::is_same_v<Policy, dynamic_k>) {
    opt.tau = m.get_double("dmoe.dynamic_k.tau");
    opt.k_max = static_cast<index_t>(m.get_int("dmoe.dynamic_k.k_max"));
  } else {
    opt.training = m.get_bool("dmoe.top_any.training");
  }
  // Every tensor is checked against the recorded sizes before the layer is built, so that the
  // layer's allocation is bounded by what the file really holds (metadata alone could ask for
  // any size).
  {
    const index_t d = c.d_model, E = c.num_experts, n = c.expert_width, fn = width_factor<Act> * n;
    const index_t h = c.router_hidden;
    struct expected {
      const char* name;
      bool present;
      std::vector<std::int64_t> shape;
    };
    std::vector<expected> tensors = {{"experts.w1", true, detail::io::shape_of({E, fn, d})},
                                     {"experts.w2", true, detail::io::shape_of({E, d, n})},
                                     {"experts.b1", c.hidden_bias, detail::io::shape_of({E, fn})},
                                     {"experts.expert_bias", c.expert_bias, detail::io::shape_of({E, d})},
                                     {"experts.output_bias", c.output_bias, detail::io::shape_of({d})}};
    if constexpr (std::is_same_v<Policy, top_k>) {
      tensors.push_back({"router.weight", true, detail::io::shape_of({E, d})});
      tensors.push_back({"router.bias", true, detail::io::shape_of({E})});
    } else if constexpr (std::is_same_v<Policy, dynamic_k>) {
      tensors.push_back({"router.w_in", true, detail::io::shape_of({h, d})});
      tensors.push_back({"router.w_out", true, detail::io::shape_of({E, h})});
    } else {
      tensors.push_back({"router.weight", true, detail::io::shape_of({E, d})});
      tensors.push_back({"router.threshold", true, detail::io::shape_of({E})});
      tensors.push_back({"router.active", true, detail::io::shape_of({E})});
    }
    for (const auto& t : tensors) {
      if (t.present) f.expect_shape(t.name, t.shape);
      else if (f.has(t.name))
        detail::raisef(errc::invalid_argument,
                       "load_moe_layer '%s': tensor '%s' is present but the recorded configuration has no such bias",
                       f.label().c_str(), t.name);
    }
    (void)h;
  }
  // A configuration no layer accepts (or that this layer's static extents reject) is reported by
  // the constructor; say which file it came from.
  auto build = [&]() -> Layer {
#if DMOE_HAS_EXCEPTIONS
    try {
      return Layer(c, opt);
    } catch (const error& e) {
      detail::raise(e.code(), "load_moe_layer '" + f.label() + "': " + e.what());
    }
#else
    return Layer(c, opt);
#endif
  };
  Layer layer = build();
  const index_t d = c.d_model, E = c.num_experts, n = c.expert_width, fn = width_factor<Act> * n;
  auto& ex = layer.experts();
  auto read = [&](const char* name, std::initializer_list<index_t> shape) {
    f.expect_shape(name, detail::io::shape_of(shape));
    return f.read<T>(name);
  };
  auto absent = [](const char*, bool configured) { return !configured; };  // checked above
  {
    const auto v = read("experts.w1", {E, fn, d});
    for (index_t e = 0; e < E; ++e) detail::io::fill_transposed(ex.w1(e), v, static_cast<std::size_t>(e * fn * d));
  }
  {
    const auto v = read("experts.w2", {E, d, n});
    for (index_t e = 0; e < E; ++e) detail::io::fill_transposed(ex.w2(e), v, static_cast<std::size_t>(e * d * n));
  }
  if (!absent("experts.b1", c.hidden_bias)) {
    const auto v = read("experts.b1", {E, fn});
    for (index_t e = 0; e < E; ++e) detail::io::fill_vector(ex.b1(e), v, static_cast<std::size_t>(e * fn));
  }
  if (!absent("experts.expert_bias", c.expert_bias)) {
    const auto v = read("experts.expert_bias", {E, d});
    for (index_t e = 0; e < E; ++e) detail::io::fill_vector(ex.expert_bias(e), v, static_cast<std::size_t>(e * d));
  }
  if (!absent("experts.output_bias", c.output_bias)) detail::io::fill_vector(ex.output_bias(), read("experts.output_bias", {d}), 0);

  auto& r = layer.router();
  if constexpr (std::is_same_v<Policy, top_k>) {
    detail::io::fill_transposed(r.weight(), read("router.weight", {E, d}), 0);
    detail::io::fill_vector(r.bias(), read("router.bias", {E}), 0);
  } else if constexpr (std::is_same_v<Policy, dynamic_k>) {
    detail::io::fill_transposed(r.w_in(), read("router.w_in", {r.hidden(), d}), 0);
    detail::io::fill_transposed(r.w_out(), read("router.w_out", {E, r.hidden()}), 0);
  } else {
    detail::io::fill_transposed(r.weight(), read("router.weight", {E, d}), 0);
    detail::io::fill_vector(r.threshold(), read("router.threshold", {E}), 0);
    // A NaN threshold would silently disable its expert, an infinite one fire it never or always:
    // refuse the file rather than load a layer that routes wrongly without a word.
    if (const status ts = r.check_thresholds(); !ts.ok())
      detail::raisef(errc::invalid_argument, "load_moe_layer '%s': tensor 'router.threshold': %s", f.label().c_str(),
                     ts.message());
    const auto& ti = f.expect_shape("router.active", detail::io::shape_of({E}));
    if (ti.dtype != st_dtype::U8)
      detail::raisef(errc::invalid_argument, "load_moe_layer '%s': tensor 'router.active' has dtype %s, expected U8",
                     f.label().c_str(), to_string(ti.dtype));
    const auto v = f.read<double>("router.active");
    for (std::size_t e = 0; e < v.size(); ++e) {
      if (v[e] != 0.0 && v[e] != 1.0)
        detail::raisef(errc::invalid_argument, "load_moe_layer '%s': router.active[%zu] = %g, expected 0 or 1",
                       f.label().c_str(), e, v[e]);
      r.active()[e] = static_cast<std::uint8_t>(v[e]);
    }
  }
  if constexpr (detail::io::has_weight_storage<Layer>::value) {
    const auto it = f.metadata().find("dmoe.weight_storage");
    if (it != f.metadata().end()) {
      weight_storage s = weight_storage::f32;
      if (!parse_weight_storage(it->second.c_str(), s))
        detail::raisef(errc::invalid_argument,
                       "load_moe_layer '%s': metadata 'dmoe.weight_storage' = '%s', expected f32, bf16 or f16",
                       f.label().c_str(), it->second.c_str());
      if (s != weight_storage::f32 && !std::is_same_v<T, float>)
        s = weight_storage::f32;  // a double layer reads the values in double: nothing is lost
      layer.set_weight_storage(s);
    }
  }
  return layer;
}

/// Reads `path` and builds a layer (see load_moe_layer(const safetensors_file&)).
template <class Layer>
Layer load_moe_layer(const std::string& path) {
  return load_moe_layer<Layer>(safetensors_file::from_path(path));
}

DMOE_NAMESPACE_END  // namespace dmoe
