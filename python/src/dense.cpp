// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// Dense FFNs of the Python module: dense_ffn<float, Act> for the six activations, and their
// safetensors loading.
#include "layer_impl.hpp"

namespace dmoe::python {

std::unique_ptr<any_dense> make_dense(const std::string& activation, index_t d_model, index_t hidden) {
  return with_activation(activation, [&](auto a) -> std::unique_ptr<any_dense> {
    return std::make_unique<dense_impl<decltype(a)>>(d_model, hidden);
  });
}

std::unique_ptr<any_dense> load_dense(const std::string& activation, const safetensors_file& f,
                                      const ffn_names& names) {
  return with_activation(activation, [&](auto a) -> std::unique_ptr<any_dense> {
    using Act = decltype(a);
    return std::make_unique<dense_impl<Act>>(load_dense_ffn<float, Act>(f, names));
  });
}

}  // namespace dmoe::python
