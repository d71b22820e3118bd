// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
/// \file
/// Example 01: the three routing policies side by side.
///
/// Builds one MoE layer per policy (top-k, dynamic-k, top-any) with random weights, runs a forward
/// pass on random tokens and prints, per policy, how many experts each token ran (a histogram of
/// k), the mean k, the FLOPs executed (router included) as a percentage of a dense FFN of the same
/// shape, and the wall time against that dense FFN.
///
///   01_policies           shape S: d_model 768, 24 experts x 128 (dense hidden 3072), 512 tokens
///   01_policies --quick   d_model 64, 8 experts x 16, 32 tokens (runs in well under a second)
///
/// Returns 0 on success, 1 if any dmoe call reports an error, 2 on a bad command line.

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>
#include <thread>

#include <dmoe/detail/random.hpp>
#include <dmoe/dmoe.hpp>

namespace {

using dmoe::index_t;
using matrix = dmoe::row_matrix<float>;

struct shape {
  index_t d_model, num_experts, expert_width, tokens;
  index_t router_hidden;  ///< dynamic-k router width (128 is the library default, sized for d_model 768)
};
constexpr shape shape_s{768, 24, 128, 512, 128};
constexpr shape shape_quick{64, 8, 16, 32, 16};
constexpr int timing_runs = 5;
constexpr int bar_width = 40;

/// Best wall time of `runs` calls of f, in milliseconds. f returns a dmoe::status; the first
/// failure is kept in *st and stops the timing.
template <class F>
double best_ms(int runs, dmoe::status* st, F&& f) {
  double best = 1e300;
  for (int i = 0; i < runs; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    dmoe::status s = f();
    const auto t1 = std::chrono::steady_clock::now();
    if (!s.ok()) {
      *st = s;
      return 0.0;
    }
    best = std::min(best, std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  return best;
}

/// Milliseconds with 3-4 significant digits.
std::string ms(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), v >= 100 ? "%.0f ms" : v >= 10 ? "%.1f ms" : v >= 1 ? "%.2f ms" : "%.3f ms", v);
  return buf;
}

bool report_error(const char* what, const dmoe::status& s) {
  if (s.ok()) return false;
  std::fprintf(stderr, "error in %s: %s: %s\n", what, dmoe::to_string(s.code()), s.message());
  return true;
}

/// Prints the k histogram over the range of k that occurs, as a text bar chart.
void print_histogram(const dmoe::routing_stats& stats) {
  const auto& h = stats.k_histogram;
  index_t lo = -1, hi = -1, peak = 0;
  for (index_t k = 0; k < index_t(h.size()); ++k)
    if (h[std::size_t(k)] > 0) {
      if (lo < 0) lo = k;
      hi = k;
      peak = std::max(peak, h[std::size_t(k)]);
    }
  if (lo < 0) return;
  std::printf("     k | tokens\n");
  for (index_t k = lo; k <= hi; ++k) {
    const index_t n = h[std::size_t(k)];
    // Any nonzero count gets at least one mark.
    const index_t len = n == 0 ? 0 : std::max<index_t>(1, (n * bar_width + peak / 2) / peak);
    std::printf("    %2td | %5td %s\n", k, n, std::string(std::size_t(len), '#').c_str());
  }
}

void print_summary(const dmoe::routing_stats& stats, index_t num_experts, double t_moe, double t_dense) {
  const double experts = 100.0 * stats.active_fraction();
  const double total = 100.0 * stats.executed_fraction();
  std::printf("  mean k %.2f of %td | FLOPs %.1f%% of dense (experts %.1f%% + router %.1f%%)\n", stats.mean_k(),
              num_experts, total, experts, total - experts);
  const double ratio = t_dense / t_moe;
  std::printf("  time %s vs dense %s: %.2fx %s\n\n", ms(t_moe).c_str(), ms(t_dense).c_str(),
              ratio >= 1 ? ratio : 1.0 / ratio, ratio >= 1 ? "faster" : "SLOWER");
}

/// Builds a layer of the policy, runs it on x, prints its section. Returns false on an error.
template <class Policy, class Setup>
bool run_policy(const std::string& title, const char* rule, const shape& s, const dmoe::context<dmoe::cpu>& ctx, const matrix& x,
                double t_dense, Setup&& setup) {
  dmoe::moe_config cfg;
  cfg.d_model = s.d_model;
  cfg.num_experts = s.num_experts;
  cfg.expert_width = s.expert_width;
  cfg.router_hidden = s.router_hidden;
  dmoe::moe_layer<float, dmoe::cpu, Policy, dmoe::relu> layer(cfg, typename Policy::options{});
  layer.randomize(7);
  setup(layer);  // router options; before workspace_size (it depends on the maximum k)

  dmoe::workspace_buffer ws(layer.workspace_size(ctx, x.rows()));
  matrix y(x.rows(), s.d_model);
  dmoe::routing_stats stats(layer.num_experts());
  if (report_error(title.c_str(), layer.forward(ctx, x, y, ws, &stats))) return false;
  if (!y.allFinite()) {
    std::fprintf(stderr, "error in %s: the output is not finite\n", title.c_str());
    return false;
  }
  dmoe::status st;
  const double t = best_ms(timing_runs, &st, [&] { return layer.forward(ctx, x, y, ws); });
  if (report_error(title.c_str(), st)) return false;

  std::printf("%s\n  %s\n", title.c_str(), rule);
  print_histogram(stats);
  print_summary(stats, layer.num_experts(), t, t_dense);
  return true;
}

int run(const shape& s) {
  const unsigned hc = std::thread::hardware_concurrency();
  const int threads = hc >= 2 ? 2 : 1;
  dmoe::thread_pool pool(threads);
  const dmoe::context<dmoe::cpu> ctx{&pool};

  // Random tokens, standard normal, seeded.
  matrix x(s.tokens, s.d_model);
  dmoe::detail::rng g(42);
  for (index_t t = 0; t < x.rows(); ++t)
    for (index_t j = 0; j < x.cols(); ++j) x(t, j) = static_cast<float>(g.normal());

  const auto v = dmoe::version();
  const index_t hidden = s.num_experts * s.expert_width;
  std::printf("dmoe %d.%d.%d, example 01: the three routing policies on one MoE layer (CPU, fp32, random weights)\n",
              v.major, v.minor, v.patch);
  std::printf("shape: d_model %td, %td experts x %td (dense hidden %td), relu | %td random tokens | %d thread%s\n",
              s.d_model, s.num_experts, s.expert_width, hidden, s.tokens, threads, threads > 1 ? "s" : "");
  std::printf("Per policy: histogram of k (experts run per token), mean k, FLOPs executed (router included)\n"
              "as %% of a dense FFN of the same shape, and wall time (best of %d) against that dense FFN.\n",
              timing_runs);
  if (s.tokens < shape_s.tokens)
    std::printf("(--quick: a toy shape for CI; its times measure call overheads, not the MoE speed-up)\n");
  std::printf("\n");

  // The dense baseline.
  dmoe::dense_ffn<float, dmoe::relu> dense(s.d_model, hidden);
  dense.randomize(7);
  dmoe::workspace_buffer dws(dense.workspace_size(ctx, s.tokens));
  matrix yd(s.tokens, s.d_model);
  dmoe::status st;
  const double t_dense = best_ms(timing_runs, &st, [&] { return dense.forward(ctx, x, yd, dws); });
  if (report_error("dense_ffn", st)) return 1;
  std::printf("dense_ffn %td -> %td -> %td (the baseline): %s per forward\n\n", s.d_model, hidden, s.d_model,
              ms(t_dense).c_str());

  bool ok = true;
  // top-k: softmax gate, exactly k experts per token.
  ok = ok && run_policy<dmoe::top_k>("top_k (k = 2)", "softmax gate; every token runs exactly its k best experts", s,
                                     ctx, x, t_dense, [](auto& l) { l.router().set_options({2, true}); });
  // dynamic-k: expert e runs iff its predicted output norm r_e >= tau * max r.
  ok = ok && run_policy<dmoe::dynamic_k>(
                 "dynamic_k (tau = 0.6)",
                 "D2DMoE: expert e runs iff its predicted output norm r_e >= tau * max_j r_j", s, ctx, x, t_dense,
                 [](auto& l) { l.router().set_options({0.6, 0}); });
  // top-any: expert e fires iff cos(x, w_e) > g_e. Random directions in d dimensions have cosines
  // of about +-1/sqrt(d), so g = 1/sqrt(d) fires about one expert in six.
  const double g_any = 1.0 / std::sqrt(double(s.d_model));
  char title[96];
  std::snprintf(title, sizeof(title), "top_any (g = %.3f = 1/sqrt(d_model) for every expert)", g_any);
  ok = ok && run_policy<dmoe::top_any>(
                 title, "DynMoE: expert e runs iff cos(x, w_e) > g_e; a token that fires none runs its best expert",
                 s, ctx, x, t_dense, [g_any](auto& l) {
    l.router().set_training(false);
    l.router().threshold().setConstant(static_cast<float>(g_any));
  });
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  shape s = shape_s;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0) {
      s = shape_quick;
    } else if (std::strcmp(argv[i], "--help") == 0 || std::strcmp(argv[i], "-h") == 0) {
      std::printf("usage: %s [--quick]\n  --quick  small shape (d_model 64, 8 experts x 16, 32 tokens)\n", argv[0]);
      return 0;
    } else {
      std::fprintf(stderr, "%s: unknown argument '%s' (try --help)\n", argv[0], argv[i]);
      return 2;
    }
  }
  try {
    return run(s);
  } catch (const dmoe::error& e) {
    std::fprintf(stderr, "dmoe error (%s): %s\n", dmoe::to_string(e.code()), e.what());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
  }
  return 1;
}
