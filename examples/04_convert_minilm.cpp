// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// Example 04: dense -> dynamic-k MoE conversion of real FFNs (all-MiniLM-L6-v2, from the fixture
// tests/data/minilm_l6_ffn.safetensors), end to end:
//  1. load each stored layer's FFN and its real calibration / held-out FFN inputs, and check the
//     dense forward against the stored PyTorch output;
//  2. split the 1536 neurons into 24 experts of 64 by balanced k-means and build the MoE layer;
//     check that with every expert on it equals the dense FFN;
//  3. fit the D2DMoE regression router (predicts each expert's output norm) and, as the baseline,
//     the MoEfication router (predicts each expert's summed positive activation), experts frozen;
//  4. sweep tau (dynamic-k, D2DMoE router) and k (top-k, MoEfication router) on the held-out
//     tokens: mean k, FLOPs (router included) and output error against the dense layer; write CSV;
//  5. time the MoE layer against the dense layer on the held-out tokens.
// It exits non-zero if a check fails (dense output vs PyTorch, all experts vs dense, a router
// that did not learn).
//
// Usage: 04_convert_minilm [--quick] [--fixture FILE] [--csv DIR] [--markdown FILE] [--threads N]
//   --quick    one layer, fewer tokens, short fits, few sweep points (a few seconds; CTest runs this)
//   --fixture  the safetensors file (default: the source tree's tests/data/minilm_l6_ffn.safetensors)
//   --csv      directory for minilm_layer<i>_sweep.csv, created if missing (default: the working directory)
//   --markdown the held-out tables of docs/conversion.md, written to FILE (tests/docs checks that
//              the doc holds exactly what this writes)
//   --threads  executor threads for forwards and timings (default 2)
//
// Why 24 experts of 64: D2DMoE converts BERT-base's 3072 hidden units into 24 experts; MiniLM has
// 1536, and 24 x 64 keeps the same expert count, so a token's k can step in 1/24 of the FFN, while
// 64 rows per expert product still keep the CPU kernel efficient. The router (384 -> 128 -> 24)
// costs 4.4% of the dense FFN.

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <stdexcept>
#include <system_error>
#include <string>
#include <vector>

#include <dmoe/convert/convert_ffn.hpp>
#include <dmoe/convert/router_fit.hpp>
#include <dmoe/convert/split.hpp>
#include <dmoe/convert/sweep.hpp>
#include <dmoe/dmoe.hpp>
#include <dmoe/io/ffn_io.hpp>
#include <dmoe/io/safetensors.hpp>

#if defined(_WIN32)
#include <io.h>
#define isatty _isatty
#define fileno _fileno
#else
#include <unistd.h>
#endif

#ifndef DMOE_SOURCE_DIR
#define DMOE_SOURCE_DIR "."
#endif

using namespace dmoe;
using rowsf = row_matrix<float>;
using moe_t = moe_layer<float, cpu, dynamic_k, gelu_erf>;

namespace {

struct args {
  bool quick = false;
  std::string fixture = std::string(DMOE_SOURCE_DIR) + "/tests/data/minilm_l6_ffn.safetensors";
  std::string csv_dir = ".";
  std::string markdown;  // --markdown FILE: the held-out tables of docs/conversion.md
  int threads = 2;
};

bool parse(int argc, char** argv, args& a) {
  for (int i = 1; i < argc; ++i) {
    const std::string s = argv[i];
    const bool has_value = i + 1 < argc;
    if (s == "--quick")
      a.quick = true;
    else if (s == "--fixture" && has_value)
      a.fixture = argv[++i];
    else if (s == "--csv" && has_value)
      a.csv_dir = argv[++i];
    else if (s == "--markdown" && has_value)
      a.markdown = argv[++i];
    else if (s == "--threads" && has_value)
      a.threads = std::atoi(argv[++i]);
    else {
      std::fprintf(stderr, "usage: %s [--quick] [--fixture FILE] [--csv DIR] [--markdown FILE] [--threads N]\n", argv[0]);
      return false;
    }
  }
  if (a.threads < 1) a.threads = 1;
  return true;
}

/// Layers stored in the fixture: the "layers" metadata entry ("1,4"), else every i with a
/// calibration.layer.{i}.ffn_input tensor.
std::vector<int> fixture_layers(const safetensors_file& f) {
  std::vector<int> out;
  const std::string meta = f.metadata_value("layers");
  for (std::size_t p = 0; p < meta.size();) {
    const std::size_t q = meta.find(',', p);
    out.push_back(std::atoi(meta.substr(p, q == std::string::npos ? std::string::npos : q - p).c_str()));
    p = q == std::string::npos ? meta.size() : q + 1;
  }
  if (out.empty())
    for (int i = 0; i < 64; ++i)
      if (f.has("calibration.layer." + std::to_string(i) + ".ffn_input")) out.push_back(i);
  return out;
}

std::string sci(double v) {
  char b[32];
  std::snprintf(b, sizeof(b), "%.3e", v);
  return b;
}

double rel_error(const rowsf& y, const rowsf& ref) { return double((y - ref).norm() / ref.norm()); }

template <class F>
double median_seconds(int reps, F&& f) {
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    const auto s = std::chrono::steady_clock::now();
    f();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - s).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

void print_table(const char* title, const std::vector<sweep_point>& pts, bool top_k) {
  // Per-token measures first (each token's relative error, then its cosine to the dense output,
  // averaged over tokens): every token counts the same. The Frobenius error over all tokens comes
  // last: a few tokens with huge outputs ([CLS] carries most of the output energy in the early
  // layers) dominate it, so it says how those tokens fare, not the typical one.
  std::printf("  %s\n  %6s %7s %8s %10s %8s %12s\n", title, top_k ? "k" : "tau", "mean k", "FLOPs %", "token err",
              "cosine", "all-tok err");
  for (const auto& p : pts) {
    if (top_k)
      std::printf("  %6td", p.k);
    else
      std::printf("  %6.2f", p.tau);
    std::printf(" %7.2f %7.1f%% %10.4f %8.4f %12.4f\n", p.mean_k, 100.0 * p.flops_fraction, p.token_rel_error,
                p.mean_cosine, p.rel_error);
  }
}

/// The rows of docs/conversion.md's held-out tables: a subset of the sweep points, per-token
/// measures first, the error over all tokens last.
void markdown_tables(std::string& md, int layer, const std::vector<sweep_point>& dyn,
                     const std::vector<sweep_point>& topk) {
  char b[256];
  std::snprintf(b, sizeof(b), "Layer %d:\n\n", layer);
  md += b;
  const char* head = " | mean k | FLOPs | token error | cosine | error, all tokens |\n|---|---|---|---|---|---|\n";
  md += std::string("| dynamic-k, D2DMoE router") + head;
  for (const auto& p : dyn) {
    bool shown = false;
    for (double t : {0.1, 0.2, 0.3, 0.5, 0.7, 1.0}) shown = shown || std::abs(p.tau - t) < 1e-9;
    if (!shown) continue;
    std::snprintf(b, sizeof(b), "| tau %.2f | %.2f | %.1f%% | %.3f | %.3f | %.3f |\n", p.tau, p.mean_k,
                  100.0 * p.flops_fraction, p.token_rel_error, p.mean_cosine, p.rel_error);
    md += b;
  }
  md += std::string("\n| top-k, MoEfication router") + head;
  for (index_t k : {20, 16, 10, 5, 1})
    for (const auto& p : topk)
      if (p.k == k) {
        std::snprintf(b, sizeof(b), "| k %td | %td | %.1f%% | %.3f | %.3f | %.3f |\n", p.k, p.k,
                      100.0 * p.flops_fraction, p.token_rel_error, p.mean_cosine, p.rel_error);
        md += b;
      }
  md += "\n";
}

router_fit_callback progress_line(const char* what, bool quiet) {
  return [what, quiet](const router_fit_progress& p) {
    if (quiet && p.epoch != p.epochs) return;  // not a terminal: only the final line
    std::printf("\r  fitting %-12s epoch %3d/%-3d  tokens %7td  loss %.5f  %5.1f s", what, p.epoch, p.epochs,
                p.tokens_seen, p.loss, p.seconds);
    if (p.epoch == p.epochs) std::printf("\n");
    std::fflush(stdout);
  };
}

}  // namespace

int main(int argc, char** argv) {
  args a;
  if (!parse(argc, argv, a)) return 2;
  try {
    const auto t_start = std::chrono::steady_clock::now();
    const auto file = safetensors_file::from_path(a.fixture);
    std::vector<int> layers = fixture_layers(file);
    if (layers.empty()) {
      std::fprintf(stderr, "error: %s holds no calibration.layer.{i}.ffn_input tensor\n", a.fixture.c_str());
      return 1;
    }
    if (a.quick) layers.resize(1);
    constexpr index_t num_experts = 24, router_hidden = 128;
    thread_pool pool(a.threads);
    context<cpu> ctx{&pool};
    const bool quiet = !isatty(fileno(stdout));
    int failures = 0;
    auto fail = [&](const std::string& what) {
      std::printf("  FAILED: %s\n", what.c_str());
      ++failures;
    };
    std::printf("dmoe example 04: all-MiniLM-L6-v2 FFNs -> dynamic-k MoE (%td experts), fixture %s%s\n", num_experts,
                a.fixture.c_str(), a.quick ? " (--quick)" : "");

    std::string md;
    for (int layer_id : layers) {
      const std::string L = std::to_string(layer_id);
      const auto dense = load_dense_ffn<float, gelu_erf>(file, bert_ffn_names(layer_id));
      rowsf xc = file.read_matrix<float>("calibration.layer." + L + ".ffn_input");
      rowsf xh = file.read_matrix<float>("heldout.layer." + L + ".ffn_input");
      if (a.quick) {  // CTest also runs this under AddressSanitizer at -Og: keep it small
        xc.conservativeResize((std::min)(xc.rows(), index_t{512}), xc.cols());
        xh.conservativeResize((std::min)(xh.rows(), index_t{256}), xh.cols());
      }
      std::printf("\nlayer %d: d_model %td, hidden %td, %td calibration and %td held-out tokens\n", layer_id,
                  dense.d_model(), dense.hidden(), xc.rows(), xh.rows());

      // 1. The dense FFN against PyTorch's output on the first calibration rows (weights are stored
      // in fp16, the reference was computed from the fp32 weights: ~1e-3 expected).
      const std::string ref_name = "calibration.layer." + L + ".ffn_output";
      if (file.has(ref_name)) {
        const rowsf ref = file.read_matrix<float>(ref_name);
        const rowsf y = dense_output(ctx, dense, matrix_view<const float>(xc.data(), ref.rows(), xc.cols()));
        const double e = rel_error(y, ref);
        std::printf("  dense forward vs PyTorch on %td rows: relative error %.2e\n", ref.rows(), e);
        if (!(e < 1e-2)) fail("dense forward differs from the stored PyTorch output by " + sci(e));
      }

      // 2. Split and convert; all experts on must equal the dense FFN.
      split_options so;
      so.seed = 1;
      so.restarts = a.quick ? 1 : 3;
      const auto t_split = std::chrono::steady_clock::now();
      const neuron_split split = split_neurons(dense, num_experts, so);
      moe_t d2d = to_moe<dynamic_k>(dense, split, dynamic_k_options{0.0, 0}, router_hidden);
      std::printf("  balanced k-means split into %td x %td: inertia %.1f, %.2f s\n", split.num_experts, split.width,
                  split.inertia,
                  std::chrono::duration<double>(std::chrono::steady_clock::now() - t_split).count());
      moe_t moef = d2d;  // same experts; its router is fitted to MoEfication's targets
      const rowsf yh = dense_output(ctx, dense, matrix_view<const float>(xh));
      {
        const auto all = measure_point(ctx, d2d, matrix_view<const float>(xh), matrix_view<const float>(yh), "all");
        std::printf("  all %td experts on: relative error vs dense %.2e\n", num_experts, all.rel_error);
        if (!(all.rel_error < 1e-5))
          fail("all-experts output differs from the dense FFN by " + sci(all.rel_error));
      }

      // 3. Routers, experts frozen.
      router_fit_options fo;
      fo.epochs = a.quick ? 10 : 60;
      if (a.quick) fo.optimizer.lr = 3e-3;  // fewer tokens and epochs: larger steps
      fo.seed = 7;
      const auto r1 = fit_router(d2d, matrix_view<const float>(xc), router_target::output_norm, fo,
                                 matrix_view<const float>(xh), progress_line("D2DMoE", quiet));
      const auto r2 = fit_router(moef, matrix_view<const float>(xc), router_target::summed_activation, fo,
                                 matrix_view<const float>(xh), progress_line("MoEfication", quiet));
      for (const auto* r : {&r1, &r2}) {
        std::printf("  %-12s MSE train %.4g -> %.4g, held-out %.4g -> %.4g (predicting 0: %.4g), %ld steps, %.1f s\n",
                    r == &r1 ? "D2DMoE" : "MoEfication", r->initial_loss, r->final_loss, r->heldout_initial_loss,
                    r->heldout_loss, r->target_mean_square, r->steps, r->seconds);
        if (!(r->final_loss < 0.5 * r->target_mean_square)) fail("a router did not learn its targets");
      }

      // 4. Sweeps on the held-out tokens.
      const std::vector<double> taus =
          a.quick ? std::vector<double>{0.0, 0.2, 0.5, 0.8}
                  : std::vector<double>{0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0};
      std::vector<index_t> ks;  // every k: the baseline curve is interpolated between its points
      if (a.quick)
        ks = {1, 4, 12, 24};
      else
        for (index_t k = 1; k <= num_experts; ++k) ks.push_back(k);
      const auto dyn = sweep_dynamic_k(ctx, d2d, matrix_view<const float>(xh), matrix_view<const float>(yh), taus,
                                       "d2dmoe");
      const auto topk = sweep_top_k(ctx, moef, matrix_view<const float>(xh), matrix_view<const float>(yh), ks,
                                    "moefication");
      print_table("dynamic-k, D2DMoE regression router:", dyn, false);
      print_table("top-k, MoEfication router (baseline):", topk, true);
      markdown_tables(md, layer_id, dyn, topk);
      // The comparison of tests/unit/convert_fit/test_minilm_acceptance.cpp: each dynamic-k point
      // (tau > 0) against the baseline interpolated at its FLOPs fraction (top-1 if cheaper).
      for (auto metric : {&sweep_point::token_rel_error, &sweep_point::rel_error}) {
        int wins = 0, compared = 0;
        for (const auto& p : dyn) {
          if (p.tau == 0.0) continue;
          double base = interpolate_error(topk, p.flops_fraction, metric);
          if (p.flops_fraction < topk.front().flops_fraction) base = topk.front().*metric;
          if (std::isnan(base)) continue;
          ++compared;
          wins += p.*metric < base;
        }
        std::printf("  %s: dynamic-k lower than top-k at %d of %d budgets\n",
                    metric == &sweep_point::rel_error ? "error over all tokens" : "per-token error", wins, compared);
      }
      {
        // Why the error over all tokens can disagree with the per-token error: a few tokens with
        // large outputs dominate it. Their share of the squared error at tau = 0.3:
        d2d.router().set_tau(0.3);
        rowsf y3(xh.rows(), xh.cols());
        workspace_buffer ws3(d2d.workspace_size(ctx, xh.rows()));
        throw_if_error(d2d.forward(ctx, xh, y3, ws3));
        std::vector<double> err2, norms;
        double total = 0;
        for (index_t t = 0; t < xh.rows(); ++t) {
          err2.push_back(double((y3.row(t) - yh.row(t)).squaredNorm()));
          norms.push_back(double(yh.row(t).norm()));
          total += err2.back();
        }
        std::sort(err2.rbegin(), err2.rend());
        std::sort(norms.begin(), norms.end());
        const std::size_t worst = (std::max)(std::size_t{1}, err2.size() / 64);
        double top = 0;
        for (std::size_t i = 0; i < worst; ++i) top += err2[i];
        std::printf("  dense output norms: median %.1f, max %.1f; at tau 0.30 the %zu tokens with the largest error"
                    " carry %.0f%% of the squared error\n",
                    norms[norms.size() / 2], norms.back(), worst, 100.0 * top / total);
      }
      std::vector<sweep_point> all = dyn;
      all.insert(all.end(), topk.begin(), topk.end());
      {
        // --csv names a folder that may not exist yet: make it (and its parents), as users expect.
        std::error_code ec;
        std::filesystem::create_directories(a.csv_dir, ec);
        if (ec) throw std::runtime_error("--csv " + a.csv_dir + ": cannot create the folder: " + ec.message());
      }
      const std::string csv = a.csv_dir + "/minilm_layer" + L + "_sweep.csv";
      write_sweep_csv(csv, all);
      std::printf("  wrote %s\n", csv.c_str());

      // 5. Time: the MoE layer against the dense layer, same tokens, same executor.
      workspace_buffer wsd(dense.workspace_size(ctx, xh.rows()));
      rowsf y(xh.rows(), xh.cols());
      const int reps = a.quick ? 3 : 7;
      const double t_dense = median_seconds(reps, [&] { throw_if_error(dense.forward(ctx, xh, y, wsd)); });
      for (double tau : a.quick ? std::vector<double>{0.5} : std::vector<double>{0.2, 0.5, 0.8}) {
        d2d.router().set_tau(tau);
        workspace_buffer ws(d2d.workspace_size(ctx, xh.rows()));
        routing_stats st(d2d.num_experts());
        throw_if_error(d2d.forward(ctx, xh, y, ws, &st));
        const double t_moe = median_seconds(reps, [&] { throw_if_error(d2d.forward(ctx, xh, y, ws)); });
        std::printf("  time, %td tokens, %d thread%s: dense %.2f ms, MoE tau %.2f (mean k %.2f, FLOPs %.1f%%) %.2f ms"
                    " -> %.2fx\n",
                    xh.rows(), a.threads, a.threads == 1 ? "" : "s", 1e3 * t_dense, tau, st.mean_k(),
                    100.0 * st.executed_fraction(), 1e3 * t_moe, t_dense / t_moe);
      }
    }
    if (!a.markdown.empty()) {
      std::FILE* f = std::fopen(a.markdown.c_str(), "wb");
      if (!f || std::fwrite(md.data(), 1, md.size(), f) != md.size() || std::fclose(f) != 0)
        throw std::runtime_error("--markdown " + a.markdown + ": cannot write: " + std::strerror(errno));
      std::printf("wrote %s\n", a.markdown.c_str());
    }
    std::printf("\ntotal %.1f s; %s\n",
                std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count(),
                failures ? "SOME CHECKS FAILED" : "all checks passed");
    return failures ? 1 : 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
