// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../core/namespace.hpp"
/// \file
/// DynMoE's adaptive expert count (docs/algorithms.md section 4), for a top-any layer.
/// Record window: R_E[e] += number of tokens that fired slot e; R_S += sum of the raw inputs of
/// tokens that fired nothing. Update, in this order: (1) every active expert with R_E = 0 is
/// masked off (its weights are kept, the slot can come back); (2) if R_S != 0 and a free slot
/// exists, the lowest free slot j is activated with w_j = R_S / |R_S|, g_j = 0 (at most one new
/// expert per update). Then the window restarts.
/// Updates are counted in optimizer steps (on_optimizer_step), never in forward calls, so that
/// recomputation cannot trigger them. Data-parallel training sums window_counts() and
/// window_unrouted() over replicas before the update.
/// One guard beyond the paper: if an update would leave no active expert (every slot idle and no
/// unrouted input to seed a new one, e.g. all-zero inputs), the lowest removed slot stays active,
/// since a top-any layer cannot route with an empty mask.

#include <cmath>
#include <cstdint>
#include <vector>

#include "../core/status.hpp"
#include "../core/views.hpp"
#include "../routing/routers.hpp"

DMOE_NAMESPACE_BEGIN

/// What one update changed.
struct adapt_report {
  bool updated = false;              ///< an update ran at this step
  std::vector<index_t> removed;      ///< slots masked off
  index_t added = -1;                ///< slot activated, or -1
  index_t kept_by_guard = -1;        ///< slot kept active by the empty-mask guard, or -1
  index_t active_after = 0;          ///< active experts after the update
};

template <class T>
class expert_count_adapter {
 public:
  /// \param interval optimizer steps between updates (>= 1)
  expert_count_adapter(index_t d_model, index_t num_experts, long interval = 1)
      : counts_(static_cast<std::size_t>(num_experts), 0.0), unrouted_(static_cast<std::size_t>(d_model), 0.0),
        interval_(interval) {
    if (d_model <= 0 || num_experts <= 0)
      detail::raisef(errc::invalid_argument, "expert_count_adapter: d_model and num_experts must be positive, got %td, %td",
                     d_model, num_experts);
    if (interval < 1)
      detail::raisef(errc::invalid_argument, "expert_count_adapter: interval must be >= 1 optimizer step, got %ld", interval);
  }

  /// Adds one batch to the window. `cos` are the batch's router scores (layer.scores(ws, tokens)),
  /// `x` its inputs. A token fires slot e iff active_e and cos_te > g_e.
  status record(const top_any_router<T>& router, matrix_view<const T> x, matrix_view<const T> cos) noexcept {
    const index_t E = router.num_experts(), d = router.d_model();
    if (index_t(counts_.size()) != E || index_t(unrouted_.size()) != d)
      return status::failure(errc::invalid_argument,
                             "expert_count_adapter::record: adapter made for d_model %zu, %zu experts; router has %td, %td",
                             unrouted_.size(), counts_.size(), d, E);
    if (x.cols != d || cos.cols != E || cos.rows != x.rows)
      return status::failure(errc::invalid_argument,
                             "expert_count_adapter::record: x is (%td x %td) and cos (%td x %td), expected (T x %td) "
                             "and (T x %td)",
                             x.rows, x.cols, cos.rows, cos.cols, d, E);
    for (index_t t = 0; t < x.rows; ++t) {
      index_t fired = 0;
      for (index_t e = 0; e < E; ++e)
        if (router.active()[std::size_t(e)] && cos(t, e) > router.threshold()[e]) {
          counts_[std::size_t(e)] += 1.0;
          ++fired;
        }
      if (fired == 0)
        for (index_t j = 0; j < d; ++j) unrouted_[std::size_t(j)] += double(x(t, j));
    }
    return {};
  }

  /// Call once per optimizer step; runs update() every `interval` steps.
  adapt_report on_optimizer_step(top_any_router<T>& router) {
    if (++steps_ % interval_ != 0) return {};
    return update(router);
  }

  /// Applies the update rules now and restarts the window.
  adapt_report update(top_any_router<T>& router) {
    adapt_report rep;
    rep.updated = true;
    const index_t E = router.num_experts(), d = router.d_model();
    auto& active = router.active();
    for (index_t e = 0; e < E; ++e)
      if (active[std::size_t(e)] && counts_[std::size_t(e)] == 0.0) {
        active[std::size_t(e)] = 0;
        rep.removed.push_back(e);
      }
    double norm2 = 0;
    for (double v : unrouted_) norm2 += v * v;
    if (norm2 > 0.0)
      for (index_t j = 0; j < E; ++j)
        if (!active[std::size_t(j)]) {
          const double inv = 1.0 / std::sqrt(norm2);
          for (index_t i = 0; i < d; ++i) router.weight()(i, j) = static_cast<T>(unrouted_[std::size_t(i)] * inv);
          router.threshold()[j] = T(0);
          active[std::size_t(j)] = 1;
          rep.added = j;
          break;
        }
    if (router.num_active() == 0 && !rep.removed.empty()) {
      rep.kept_by_guard = rep.removed.front();
      active[std::size_t(rep.kept_by_guard)] = 1;
      rep.removed.erase(rep.removed.begin());
    }
    rep.active_after = router.num_active();
    reset_window();
    return rep;
  }

  void reset_window() noexcept {
    std::fill(counts_.begin(), counts_.end(), 0.0);
    std::fill(unrouted_.begin(), unrouted_.end(), 0.0);
  }
  /// R_E (per slot) and R_S (d_model): sum these over data-parallel replicas before update().
  std::vector<double>& window_counts() noexcept { return counts_; }
  std::vector<double>& window_unrouted() noexcept { return unrouted_; }
  long optimizer_steps() const noexcept { return steps_; }

 private:
  std::vector<double> counts_, unrouted_;
  long interval_;
  long steps_ = 0;
};

DMOE_NAMESPACE_END  // namespace dmoe
