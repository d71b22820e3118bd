// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
/// \file
/// any_layer / any_dense implemented by forwarding to dmoe's templates. Included by the policy
/// translation units (layer_<policy>.cpp) and dense.cpp only.

#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "any_layer.hpp"

namespace dmoe::python {

/// Calls f(Act{}) for the activation named `name`.
template <class F>
decltype(auto) with_activation(const std::string& name, F&& f) {
  if (name == "relu") return f(relu{});
  if (name == "gelu_erf") return f(gelu_erf{});
  if (name == "gelu_tanh") return f(gelu_tanh{});
  if (name == "silu") return f(silu{});
  if (name == "swiglu") return f(swiglu{});
  if (name == "geglu") return f(geglu{});
  detail::raisef(errc::invalid_argument,
                 "activation must be one of 'relu', 'gelu_erf', 'gelu_tanh', 'silu', 'swiglu', 'geglu', got '%s'",
                 name.c_str());
}

template <class Policy>
typename Policy::options to_policy_options(const layer_options& o) {
  if constexpr (std::is_same_v<Policy, dmoe::top_k>)
    return top_k_options{o.k, o.renormalize};
  else if constexpr (std::is_same_v<Policy, dmoe::dynamic_k>)
    return dynamic_k_options{o.tau, o.k_max};
  else
    return top_any_options{o.training};
}

inline std::size_t usize(index_t v) { return static_cast<std::size_t>(v); }

/// Logical row-major shapes of the flat parameter storage. Every stored block is column-major,
/// so its row-major view is the transpose: W1_e (d x fn) -> (fn, d), the nn.Linear layout.
inline std::vector<std::size_t> param_shape(const std::string& name, const moe_config& c, index_t fn,
                                            index_t router_hidden) {
  const std::size_t E = usize(c.num_experts), d = usize(c.d_model), n = usize(c.expert_width), f = usize(fn),
                    h = usize(router_hidden);
  if (name == "experts.w1") return {E, f, d};
  if (name == "experts.b1") return {E, f};
  if (name == "experts.w2") return {E, d, n};
  if (name == "experts.expert_bias") return {E, d};
  if (name == "experts.output_bias") return {d};
  if (name == "router.weight") return {E, d};
  if (name == "router.bias" || name == "router.threshold") return {E};
  if (name == "router.w_in") return {h, d};
  if (name == "router.w_out") return {E, h};
  throw std::logic_error("dmoe python: unknown parameter name " + name);
}

template <class Policy, class Act>
class layer_impl final : public any_layer {
 public:
  using layer_type = moe_layer<float, cpu, Policy, Act>;

  layer_impl(const moe_config& cfg, const layer_options& o) : layer_(cfg, to_policy_options<Policy>(o)) {}
  explicit layer_impl(layer_type&& l) : layer_(std::move(l)) {}

  const char* policy() const noexcept override { return detail::io::policy_name<Policy>(); }
  const char* activation() const noexcept override { return Act::name; }
  const moe_config& config() const noexcept override { return layer_.config(); }
  layer_options options() const override {
    layer_options o;
    const auto& p = layer_.router().options();
    if constexpr (std::is_same_v<Policy, dmoe::top_k>) {
      o.k = p.k;
      o.renormalize = p.renormalize;
    } else if constexpr (std::is_same_v<Policy, dmoe::dynamic_k>) {
      o.tau = p.tau;
      o.k_max = p.k_max;
    } else {
      o.training = p.training;
    }
    return o;
  }
  void set_options(const layer_options& o) override { layer_.router().set_options(to_policy_options<Policy>(o)); }
  index_t max_k() const noexcept override { return layer_.router().max_k(); }
  double flops_per_slot() const noexcept override { return layer_.flops_per_slot(); }
  double router_flops_per_token() const noexcept override { return layer_.router().flops_per_token(); }
  std::size_t workspace_size(index_t tokens, index_t threads) const noexcept override {
    return layer_.workspace_size(workspace_bounds{tokens, threads});
  }
  void randomize(std::uint64_t seed) override { layer_.randomize(seed); }

  status forward(const context<cpu>& ctx, matrix_view<const float> x, matrix_view<float> y, workspace ws,
                 routing_stats* stats) const noexcept override {
    return layer_.forward(ctx, x, y, ws, stats);
  }
  status infer(const context<cpu>& ctx, matrix_view<const float> x, matrix_view<float> y, workspace ws,
               routing_stats* stats) const noexcept override {
    return layer_.infer(ctx, x, y, ws, stats);
  }

  struct grads final : any_gradients {
    explicit grads(typename layer_type::gradients&& g, const moe_config& c, index_t fn, index_t h)
        : g_(std::move(g)), cfg_(c), fn_(fn), h_(h) {}
    std::vector<tensor_desc> tensors(param_group group) override { return describe(g_.parameters(group), cfg_, fn_, h_); }
    typename layer_type::gradients g_;
    moe_config cfg_;
    index_t fn_, h_;
  };
  std::unique_ptr<any_gradients> make_gradients() const override {
    return std::make_unique<grads>(layer_.make_gradients(), layer_.config(), fn_width(), router_hidden());
  }
  status backward(const context<cpu>& ctx, matrix_view<const float> x, matrix_view<const float> dy,
                  matrix_view<float> dx, any_gradients& g, workspace ws, const aux_losses* aux) const noexcept override {
    auto* mine = dynamic_cast<grads*>(&g);
    if (!mine)
      return status::failure(errc::invalid_argument,
                             "backward: grads were made by a layer of another policy or activation");
    return layer_.backward(ctx, x, dy, dx, mine->g_, ws, aux);
  }
  aux_losses aux_values(workspace ws, index_t tokens) const noexcept override {
    return layer_.aux_loss_values(ws, tokens);
  }
  matrix_view<const float> scores(workspace ws, index_t tokens) const noexcept override {
    return layer_.scores(ws, tokens);
  }
  routing_plan<float> plan(workspace ws, index_t tokens) const noexcept override { return layer_.plan(ws, tokens); }

  std::vector<tensor_desc> parameters(param_group group) override {
    return describe(layer_.parameters(group), layer_.config(), fn_width(), router_hidden());
  }
  expert_weights<float>& experts() noexcept override { return layer_.experts(); }
  void mark_modified() noexcept override { layer_.experts().mark_modified(); }
  weight_storage storage() const noexcept override { return layer_.weight_storage(); }
  void set_storage(weight_storage s) override { layer_.set_weight_storage(s); }
  dmoe::infer_precision infer_precision() const noexcept override { return layer_.infer_precision(); }
  void set_infer_precision(dmoe::infer_precision p) override { layer_.set_infer_precision(p); }
  bool infer_uses_bf16_tiles() const noexcept override { return layer_.infer_uses_bf16_tiles(); }

  top_any_router<float>* top_any() noexcept override {
    if constexpr (std::is_same_v<Policy, dmoe::top_any>)
      return &layer_.router();
    else
      return nullptr;
  }
  dynamic_k_router<float>* dynamic_k() noexcept override {
    if constexpr (std::is_same_v<Policy, dmoe::dynamic_k>)
      return &layer_.router();
    else
      return nullptr;
  }

  row_matrix<float> router_targets(matrix_view<const float> x, router_target target) const override {
    return dmoe::router_targets<Act>(layer_.experts(), x, target);
  }
  router_fit_report fit_router(matrix_view<const float> x, router_target target, const router_fit_options& opt,
                               matrix_view<const float> heldout_x, const router_fit_callback& progress) override {
    if constexpr (std::is_same_v<Policy, dmoe::dynamic_k>)
      return dmoe::fit_router(layer_, x, target, opt, heldout_x, progress);
    else
      return not_dynamic_k<router_fit_report>("fit_router");
  }
  std::vector<sweep_point> sweep_dynamic_k(const context<cpu>& ctx, matrix_view<const float> x,
                                           matrix_view<const float> y_ref, const std::vector<double>& taus,
                                           const std::string& name) override {
    if constexpr (std::is_same_v<Policy, dmoe::dynamic_k>)
      return dmoe::sweep_dynamic_k(ctx, layer_, x, y_ref, taus, name);
    else
      return not_dynamic_k<std::vector<sweep_point>>("sweep");
  }
  std::vector<sweep_point> sweep_top_k(const context<cpu>& ctx, matrix_view<const float> x,
                                       matrix_view<const float> y_ref, const std::vector<index_t>& ks,
                                       const std::string& name) override {
    if constexpr (std::is_same_v<Policy, dmoe::dynamic_k>)
      return dmoe::sweep_top_k(ctx, layer_, x, y_ref, ks, name);
    else
      return not_dynamic_k<std::vector<sweep_point>>("sweep_top_k");
  }
  tau_search_result tau_for_flops(const context<cpu>& ctx, matrix_view<const float> x, matrix_view<const float> y_ref,
                                  double target, const tau_search_options& opt) override {
    if constexpr (std::is_same_v<Policy, dmoe::dynamic_k>)
      return dmoe::tau_for_flops(ctx, layer_, x, y_ref, target, opt);
    else
      return not_dynamic_k<tau_search_result>("tau_for_flops");
  }
  void save(const std::string& path, st_dtype dtype) const override { save_moe_layer(path, layer_, dtype); }

 private:
  template <class R>
  R not_dynamic_k(const char* who) const {
    detail::raisef(errc::invalid_argument, "%s: needs a dynamic_k layer (the D2DMoE router), this layer is %s", who,
                   detail::io::policy_name<Policy>());
  }
  index_t fn_width() const noexcept { return width_factor<Act> * layer_.expert_width(); }
  index_t router_hidden() const noexcept {
    if constexpr (std::is_same_v<Policy, dmoe::dynamic_k>)
      return layer_.router().hidden();
    else
      return 0;
  }
  static std::vector<tensor_desc> describe(const param_list<float>& params, const moe_config& c, index_t fn,
                                           index_t h) {
    std::vector<tensor_desc> out;
    out.reserve(params.size());
    for (const auto& p : params) out.push_back({p.name, p.data, param_shape(p.name, c, fn, h)});
    return out;
  }

  layer_type layer_;
};

template <class Act>
class dense_impl final : public any_dense {
 public:
  using ffn_type = dense_ffn<float, Act>;
  dense_impl(index_t d, index_t hidden) : ffn_(d, hidden) {}
  explicit dense_impl(ffn_type&& f) : ffn_(std::move(f)) {}

  const char* activation() const noexcept override { return Act::name; }
  index_t d_model() const noexcept override { return ffn_.d_model(); }
  index_t hidden() const noexcept override { return ffn_.hidden(); }
  double flops_per_token() const noexcept override { return ffn_.flops_per_token(); }
  std::size_t workspace_size(index_t tokens, index_t threads) const noexcept override {
    return ffn_.workspace_size(workspace_bounds{tokens, threads});
  }
  status forward(const context<cpu>& ctx, matrix_view<const float> x, matrix_view<float> y,
                 workspace ws) const noexcept override {
    return ffn_.forward(ctx, x, y, ws);
  }
  void randomize(std::uint64_t seed) override { ffn_.randomize(seed); }
  void mark_modified() noexcept override { ffn_.mark_modified(); }
  std::vector<tensor_desc> parameters() override {
    const std::size_t d = usize(ffn_.d_model()), F = usize(ffn_.hidden()), fF = usize(width_factor<Act>) * F;
    return {{"w1", ffn_.w1().data(), {fF, d}},
            {"b1", ffn_.b1().data(), {fF}},
            {"w2", ffn_.w2().data(), {d, F}},
            {"b2", ffn_.b2().data(), {d}}};
  }
  neuron_split split(index_t num_experts, const split_options& opt) const override {
    return split_neurons(ffn_, num_experts, opt);
  }
  void save(const std::string& path, const ffn_names& names, st_dtype dtype) const override {
    safetensors_writer w;
    save_dense_ffn(w, ffn_, names, dtype);
    w.write(path);
  }
  const ffn_type& ffn() const noexcept { return ffn_; }

 private:
  ffn_type ffn_;
};

/// to_moe for one policy: finds the dense FFN's activation, converts.
template <class Policy>
std::unique_ptr<any_layer> layer_from_dense(const any_dense& dense, const neuron_split& split,
                                            const layer_options& opt, index_t router_hidden) {
  return with_activation(dense.activation(), [&](auto act) -> std::unique_ptr<any_layer> {
    using Act = decltype(act);
    const auto& impl = dynamic_cast<const dense_impl<Act>&>(dense);
    return std::make_unique<layer_impl<Policy, Act>>(
        to_moe<Policy>(impl.ffn(), split, to_policy_options<Policy>(opt), router_hidden));
  });
}

/// load_moe_layer for one policy, activation from the file's metadata.
template <class Policy>
std::unique_ptr<any_layer> load_layer(const safetensors_file& f) {
  const std::string act = f.metadata_value("dmoe.activation");
  return with_activation(act, [&](auto a) -> std::unique_ptr<any_layer> {
    using Act = decltype(a);
    return std::make_unique<layer_impl<Policy, Act>>(load_moe_layer<moe_layer<float, cpu, Policy, Act>>(f));
  });
}

template <class Policy>
std::unique_ptr<any_layer> make_layer(const std::string& activation, const moe_config& cfg, const layer_options& o) {
  return with_activation(activation, [&](auto a) -> std::unique_ptr<any_layer> {
    return std::make_unique<layer_impl<Policy, decltype(a)>>(cfg, o);
  });
}

}  // namespace dmoe::python
