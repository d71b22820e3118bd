// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../core/namespace.hpp"
/// \file
/// Flat views of a layer's parameters (and of its gradients, in the same order), grouped so that
/// an optimizer can train the experts, the router, or both: router-only training (experts
/// frozen, as D2DMoE trains its routers) is `adamw opt(layer.parameters(param_group::router))`.
/// It lives in layer/ (not train/) because the layers return these lists: the layer stands below
/// the optimizers, and includes point one way (docs/design.md).

#include <vector>

#include "../core/config.hpp"
#include "../core/version_tag.hpp"
#include "../experts/expert_weights.hpp"
#include "../routing/routers.hpp"

DMOE_NAMESPACE_BEGIN

/// Which parameters a view covers.
enum class param_group : unsigned { experts = 1, router = 2, all = 3 };

/// One contiguous parameter tensor.
template <class T>
struct param_span {
  const char* name = "";
  T* data = nullptr;
  index_t size = 0;
  version_tag* version = nullptr;  ///< stamp the optimizer touches after writing (packed copies)
};

template <class T>
using param_list = std::vector<param_span<T>>;

namespace detail {
template <class T>
void add_param(param_list<T>& out, const char* name, T* data, index_t size, version_tag* version = nullptr) {
  if (size > 0) out.push_back({name, data, size, version});
}
template <class T>
void add_router_params(param_list<T>& out, top_k_router<T>& r) {
  add_param(out, "router.weight", r.weight().data(), r.weight().size());
  add_param(out, "router.bias", r.bias().data(), r.bias().size());
}
template <class T>
void add_router_params(param_list<T>& out, dynamic_k_router<T>& r) {
  add_param(out, "router.w_in", r.w_in().data(), r.w_in().size());
  add_param(out, "router.w_out", r.w_out().data(), r.w_out().size());
}
template <class T>
void add_router_params(param_list<T>& out, top_any_router<T>& r) {
  add_param(out, "router.weight", r.weight().data(), r.weight().size());
  add_param(out, "router.threshold", r.threshold().data(), r.threshold().size());
}
}  // namespace detail

/// Parameters of experts and router in a fixed order (cold path: allocates the list).
template <class T, class Router>
param_list<T> parameters_of(expert_weights<T>& experts, Router& router, param_group group) {
  param_list<T> out;
  if (static_cast<unsigned>(group) & static_cast<unsigned>(param_group::experts)) {
    version_tag* stamp = &experts.version_stamp();
    auto add = [&](const char* name, std::vector<T>& v) {
      detail::add_param(out, name, v.data(), index_t(v.size()), stamp);
    };
    add("experts.w1", experts.w1_storage());
    add("experts.b1", experts.b1_storage());
    add("experts.w2", experts.w2_storage());
    add("experts.expert_bias", experts.expert_bias_storage());
    add("experts.output_bias", experts.output_bias_storage());
  }
  if (static_cast<unsigned>(group) & static_cast<unsigned>(param_group::router)) detail::add_router_params(out, router);
  return out;
}

DMOE_NAMESPACE_END  // namespace dmoe
