// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
/// \file
/// Type erasure of dmoe's layer templates for the Python module. The layers are templates over
/// policy and activation (3 x 6 float32 instantiations); Python sees one class. any_layer is the
/// virtual interface the nanobind module talks to; layer_impl.hpp implements it by forwarding
/// every call to dmoe::moe_layer<float, dmoe::cpu, Policy, Act>, one policy per translation unit
/// (layer_<policy>.cpp) so the instantiations compile in parallel. Nothing here computes: each
/// method is one call into the library.
///
/// This header does not include nanobind, so the policy TUs compile without it.

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <dmoe/dmoe.hpp>
#include <dmoe/convert/budget.hpp>
#include <dmoe/io/ffn_io.hpp>
#include <dmoe/io/moe_io.hpp>
#include <dmoe/io/safetensors.hpp>

namespace dmoe::python {

/// Every policy's options; a layer reads those of its own policy.
struct layer_options {
  index_t k = 2;             // top_k
  bool renormalize = true;   // top_k
  double tau = 0.5;          // dynamic_k
  index_t k_max = 0;         // dynamic_k
  bool training = false;     // top_any
};

/// One parameter (or gradient) tensor: a name, its storage and its logical row-major shape.
struct tensor_desc {
  std::string name;
  float* data = nullptr;
  std::vector<std::size_t> shape;
};

/// Gradients shaped like a layer's parameters (moe_layer::gradients behind a virtual).
class any_gradients {
 public:
  virtual ~any_gradients() = default;
  virtual std::vector<tensor_desc> tensors(param_group group) = 0;
};

class any_dense;

class any_layer {
 public:
  virtual ~any_layer() = default;
  virtual const char* policy() const noexcept = 0;
  virtual const char* activation() const noexcept = 0;
  virtual const moe_config& config() const noexcept = 0;
  virtual layer_options options() const = 0;
  /// Validates and applies the layer's own policy's options (throws dmoe::error).
  virtual void set_options(const layer_options& o) = 0;
  virtual index_t max_k() const noexcept = 0;
  virtual double flops_per_slot() const noexcept = 0;
  virtual double router_flops_per_token() const noexcept = 0;
  virtual std::size_t workspace_size(index_t tokens, index_t threads) const noexcept = 0;
  virtual void randomize(std::uint64_t seed) = 0;

  virtual status forward(const context<cpu>& ctx, matrix_view<const float> x, matrix_view<float> y, workspace ws,
                         routing_stats* stats) const noexcept = 0;
  virtual status infer(const context<cpu>& ctx, matrix_view<const float> x, matrix_view<float> y, workspace ws,
                       routing_stats* stats) const noexcept = 0;
  virtual std::unique_ptr<any_gradients> make_gradients() const = 0;
  virtual status backward(const context<cpu>& ctx, matrix_view<const float> x, matrix_view<const float> dy,
                          matrix_view<float> dx, any_gradients& grads, workspace ws,
                          const aux_losses* aux) const noexcept = 0;
  virtual aux_losses aux_values(workspace ws, index_t tokens) const noexcept = 0;
  virtual matrix_view<const float> scores(workspace ws, index_t tokens) const noexcept = 0;
  virtual routing_plan<float> plan(workspace ws, index_t tokens) const noexcept = 0;

  virtual std::vector<tensor_desc> parameters(param_group group) = 0;
  /// The weights were written through views taken earlier: repack the kernels' panels.
  virtual void mark_modified() noexcept = 0;
  virtual expert_weights<float>& experts() noexcept = 0;
  /// The format the kernels read W1 and W2 in (moe_layer::set_weight_storage).
  virtual weight_storage storage() const noexcept = 0;
  virtual void set_storage(weight_storage s) = 0;
  /// What infer may compute with (moe_layer::set_infer_precision), and whether it runs on tiles now.
  virtual dmoe::infer_precision infer_precision() const noexcept = 0;
  virtual void set_infer_precision(dmoe::infer_precision p) = 0;
  virtual bool infer_uses_bf16_tiles() const noexcept = 0;

  /// The routers, for the policy-specific calls (null for another policy).
  virtual top_any_router<float>* top_any() noexcept { return nullptr; }
  virtual dynamic_k_router<float>* dynamic_k() noexcept { return nullptr; }

  /// D2DMoE router targets of this layer's experts: expert_output_norms (output_norm) or
  /// expert_summed_activations (summed_activation), (tokens x num_experts).
  virtual row_matrix<float> router_targets(matrix_view<const float> x, router_target target) const = 0;
  /// fit_router on this (dynamic_k) layer; throws for other policies.
  virtual router_fit_report fit_router(matrix_view<const float> x, router_target target,
                                       const router_fit_options& opt, matrix_view<const float> heldout_x,
                                       const router_fit_callback& progress) = 0;
  virtual std::vector<sweep_point> sweep_dynamic_k(const context<cpu>& ctx, matrix_view<const float> x,
                                                   matrix_view<const float> y_ref, const std::vector<double>& taus,
                                                   const std::string& name) = 0;
  virtual std::vector<sweep_point> sweep_top_k(const context<cpu>& ctx, matrix_view<const float> x,
                                               matrix_view<const float> y_ref, const std::vector<index_t>& ks,
                                               const std::string& name) = 0;
  virtual tau_search_result tau_for_flops(const context<cpu>& ctx, matrix_view<const float> x,
                                          matrix_view<const float> y_ref, double target,
                                          const tau_search_options& opt) = 0;
  /// save_moe_layer to a safetensors file.
  virtual void save(const std::string& path, st_dtype dtype) const = 0;
};

/// Dense FFN (dmoe::dense_ffn<float, Act>) behind a virtual.
class any_dense {
 public:
  virtual ~any_dense() = default;
  virtual const char* activation() const noexcept = 0;
  virtual index_t d_model() const noexcept = 0;
  virtual index_t hidden() const noexcept = 0;
  virtual double flops_per_token() const noexcept = 0;
  virtual std::size_t workspace_size(index_t tokens, index_t threads) const noexcept = 0;
  virtual status forward(const context<cpu>& ctx, matrix_view<const float> x, matrix_view<float> y,
                         workspace ws) const noexcept = 0;
  virtual void randomize(std::uint64_t seed) = 0;
  /// w1 (f*F, d) [nn.Linear layout; gated: gate rows first], b1 (f*F), w2 (d, F), b2 (d).
  virtual std::vector<tensor_desc> parameters() = 0;
  virtual void mark_modified() noexcept = 0;
  virtual neuron_split split(index_t num_experts, const split_options& opt) const = 0;
  virtual void save(const std::string& path, const ffn_names& names, st_dtype dtype) const = 0;
};

// Factories, one per translation unit (layer_<policy>.cpp, dense.cpp). `activation` is one of
// relu, gelu_erf, gelu_tanh, silu, swiglu, geglu; anything else throws dmoe::error.
std::unique_ptr<any_layer> make_top_k_layer(const std::string& activation, const moe_config& cfg,
                                            const layer_options& opt);
std::unique_ptr<any_layer> make_dynamic_k_layer(const std::string& activation, const moe_config& cfg,
                                                const layer_options& opt);
std::unique_ptr<any_layer> make_top_any_layer(const std::string& activation, const moe_config& cfg,
                                              const layer_options& opt);
/// load_moe_layer for a file whose metadata records this policy.
std::unique_ptr<any_layer> load_top_k_layer(const safetensors_file& f);
std::unique_ptr<any_layer> load_dynamic_k_layer(const safetensors_file& f);
std::unique_ptr<any_layer> load_top_any_layer(const safetensors_file& f);
/// to_moe of a dense FFN, for each policy.
std::unique_ptr<any_layer> top_k_from_dense(const any_dense& dense, const neuron_split& split,
                                            const layer_options& opt);
std::unique_ptr<any_layer> dynamic_k_from_dense(const any_dense& dense, const neuron_split& split,
                                                const layer_options& opt, index_t router_hidden);
std::unique_ptr<any_layer> top_any_from_dense(const any_dense& dense, const neuron_split& split,
                                              const layer_options& opt);

std::unique_ptr<any_dense> make_dense(const std::string& activation, index_t d_model, index_t hidden);
std::unique_ptr<any_dense> load_dense(const std::string& activation, const safetensors_file& f,
                                      const ffn_names& names);

/// The activation names, in the order the module lists them.
inline const char* const activation_names[] = {"relu", "gelu_erf", "gelu_tanh", "silu", "swiglu", "geglu"};

}  // namespace dmoe::python
