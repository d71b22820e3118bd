// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// The top_any layers of the Python module: moe_layer<float, cpu, top_any, Act> for the six activations
// (one translation unit per policy keeps the build parallel; see any_layer.hpp).
#include "layer_impl.hpp"

namespace dmoe::python {

std::unique_ptr<any_layer> make_top_any_layer(const std::string& activation, const moe_config& cfg,
                                            const layer_options& opt) {
  return make_layer<dmoe::top_any>(activation, cfg, opt);
}

std::unique_ptr<any_layer> load_top_any_layer(const safetensors_file& f) { return load_layer<dmoe::top_any>(f); }

std::unique_ptr<any_layer> top_any_from_dense(const any_dense& dense, const neuron_split& split,
                                              const layer_options& opt) {
  return layer_from_dense<dmoe::top_any>(dense, split, opt, 1);
}

}  // namespace dmoe::python
