// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// dynamic_k backward: the router gradient is exactly zero (its router learns
// from its own regression loss), the experts' gradients and dx match central
// finite differences of the true loss <dy, y> (weights 1, selection held by
// skipping flips; finite differences of the router parameters are then 0 as
// well). Every activation, each bias combination twice, random tau and k_max;
// odd cases pass aux weights, which dynamic_k must ignore.
#include "backward_common.hpp"

using namespace dmoe_fd;

namespace {

template <class A>
void dynamic_k_fd() {
  for (int i = 0; i < 16; ++i)
    try_seeds(seed_of(std::string("fd/dynamic_k/") + A::name, i), [&](std::uint64_t s) {
      case_cfg c = random_cfg(s, i % 8);
      c.use_aux = (i & 1) != 0;
      if (c.use_aux)
        c.aux.load_balance = c.aux.z_loss = c.aux.diversity = c.aux.simplicity = c.aux.balance = c.aux.efficiency = 0.9;
      return check_fd_library<dmoe::dynamic_k, A>(c);
    });
}

}  // namespace

TEST_SUITE("backward") {
  DMOE_BWD_FOR_EACH_ACTIVATION(
      "backward dynamic_k matches finite differences "
      "with a zero router gradient",
      dynamic_k_fd)
}
