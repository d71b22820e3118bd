// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// The dynamic_k layers of the Python module: moe_layer<float, cpu, dynamic_k, Act> for the six activations
// (one translation unit per policy keeps the build parallel; see any_layer.hpp).
#include "layer_impl.hpp"

namespace dmoe::python {

std::unique_ptr<any_layer> make_dynamic_k_layer(const std::string& activation, const moe_config& cfg,
                                            const layer_options& opt) {
  return make_layer<dmoe::dynamic_k>(activation, cfg, opt);
}

std::unique_ptr<any_layer> load_dynamic_k_layer(const safetensors_file& f) { return load_layer<dmoe::dynamic_k>(f); }

std::unique_ptr<any_layer> dynamic_k_from_dense(const any_dense& dense, const neuron_split& split,
                                                const layer_options& opt, index_t router_hidden) {
  return layer_from_dense<dmoe::dynamic_k>(dense, split, opt, router_hidden);
}

}  // namespace dmoe::python
