// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// top_k backward against central finite differences of the layer's true loss
// L = <dy, y> + aux_loss_values(ws, T).weighted_sum(aux), every parameter and
// dx, for each activation: renormalisation on and off x aux weights {none
// (nullptr), load_balance, z_loss, both (plus top_any weights, which top_k must
// ignore)}, twice with different random shapes; each eight cases take the eight
// hidden/expert/output bias combinations; four cases use k = E. Criterion and
// borderline handling: backward_common.hpp.
#include "backward_common.hpp"

using namespace dmoe_fd;

namespace {

template <class A>
void top_k_fd() {
  for (int i = 0; i < 16; ++i)  // aux mode i % 4, renormalisation (i / 4) % 2, biases i % 8
    try_seeds(seed_of(std::string("fd/top_k/") + A::name, i), [&](std::uint64_t s) {
      const int aux_mode = i % 4;
      case_cfg c = random_cfg(s, i % 8);
      c.renorm = (i / 4) % 2 != 0;
      if (i % 8 == 3 || i % 8 == 6) c.k = c.E;
      c.use_aux = aux_mode != 0;
      if (aux_mode == 1) c.aux.load_balance = 0.8;
      if (aux_mode == 2) c.aux.z_loss = 0.6;
      if (aux_mode == 3) {
        c.aux.load_balance = 0.7;
        c.aux.z_loss = 1.3;
        c.aux.diversity = c.aux.simplicity = c.aux.balance = c.aux.efficiency = 0.5;
      }
      return check_fd_library<dmoe::top_k, A>(c);
    });
}

}  // namespace

TEST_SUITE("backward") {
  DMOE_BWD_FOR_EACH_ACTIVATION("backward top_k matches finite differences of the loss", top_k_fd)
}
