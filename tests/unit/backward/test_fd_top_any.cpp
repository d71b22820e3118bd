// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// top_any backward (straight-through estimator) against central finite
// differences of the independent surrogate of tests/support/fd_reference.hpp
// (gate embeddings W, thresholds g, dx through the experts and the gate, every
// expert parameter), and the layer's output and aux_loss_values against the
// surrogate at theta0. For each activation, 24 random shapes: the aux weights
// {none (nullptr), diversity, simplicity, balance, efficiency (each alone,
// weight 1), all four (plus top_k weights, which top_any must ignore)} three
// times in training and once in inference; the bias combinations cycle. Inference
// cases must have at least one token that fired nothing and falls back to the
// best active expert (weight 1, no gate gradient: the fallback slot did not
// fire).
#include "backward_common.hpp"

using namespace dmoe_fd;

namespace {

template <class A>
void top_any_fd() {
  for (int i = 0; i < 24; ++i)  // aux mode i % 6, inference for 6 <= i < 12, biases i % 8
    try_seeds(seed_of(std::string("fd/top_any/") + A::name, i), [&](std::uint64_t s) {
      const int aux_mode = i % 6;
      case_cfg c = random_cfg(s, i % 8, 2);
      c.training = i / 6 != 1;
      c.use_aux = aux_mode != 0;
      if (aux_mode == 1) c.aux.diversity = 1;
      if (aux_mode == 2) c.aux.simplicity = 1;
      if (aux_mode == 3) c.aux.balance = 1;
      if (aux_mode == 4) c.aux.efficiency = 1;
      if (aux_mode == 5) {
        c.aux.diversity = 0.7;
        c.aux.simplicity = 1.3;
        c.aux.balance = 0.9;
        c.aux.efficiency = 1.1;
        c.aux.load_balance = c.aux.z_loss = 0.5;
      }
      return check_fd_top_any<A>(c, no_hook{}, [&](const top_any_state& st) {
        int fallback = 0;
        for (int f : st.fallback) fallback += f >= 0;
        return st.fired_tokens >= 1 && (c.training || fallback >= 1);
      });
    });
}

}  // namespace

TEST_SUITE("backward") {
  DMOE_BWD_FOR_EACH_ACTIVATION(
      "backward top_any matches finite differences of "
      "the straight-through surrogate",
      top_any_fd)
}
