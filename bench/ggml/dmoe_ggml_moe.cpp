// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
//
// The ggml peer of dmoe's forward benchmarks: one MoE layer as llama.cpp builds it for its CPU backend
// (llm_graph_context::build_moe_ffn: router product, softmax, top-k by argsort, ggml_mul_mat_id for the
// expert products, ggml_add_id for the per-expert biases, the weighted slot outputs summed by views),
// timed on ggml's CPU compute with a persistent threadpool, as llama.cpp runs it.
//
//   dmoe_ggml_moe --tokens 512 --threads 1 [--d 768 --experts 24 --width 128 --act relu --k 6]
//                 [--type f32|f16|bf16] [--min-time 0.3] [--repetitions 3] [--check] [--seed 0]
//
// Prints one JSON object per run: the arguments, best_ms (the best of --repetitions means, each over at
// least --min-time seconds, after a warm-up) and, with --check, the largest error of ggml's output
// against a plain-loop double reference of the same graph (same rounding of weights and activations to
// the storage type, as ggml's mul_mat rounds its second operand to the weight type's dot type), scaled
// by the largest |y|. --check fails (exit status 1) above 1e-4: the reference is exact, so only float
// summation order remains. Not part of dmoe's build: scripts/bench_ggml_peer.sh builds it against
// ggml's sources and compares it with a bench_forward or bench_shape_m JSON.

#include "ggml-cpu.h"
#include "ggml.h"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct options {
  int d = 768, experts = 24, width = 128, k = 6, tokens = 512, threads = 1, repetitions = 3;
  std::string act = "relu", type = "f32";
  double min_time = 0.3;
  bool check = false;
  unsigned seed = 0;
};

[[noreturn]] void usage_error(const std::string& what) {
  std::fprintf(stderr,
               "dmoe_ggml_moe: %s\n"
               "usage: dmoe_ggml_moe [--tokens N] [--threads N] [--d N] [--experts N] [--width N] "
               "[--act relu|swiglu] [--k N] [--type f32|f16|bf16] [--min-time S] [--repetitions N] "
               "[--check] [--seed N]\n",
               what.c_str());
  std::exit(2);
}

long parse_int(const char* flag, const char* text, long lo, long hi) {
  char* end = nullptr;
  errno = 0;
  const long v = std::strtol(text, &end, 10);
  if (errno != 0 || end == text || *end != '\0' || v < lo || v > hi)
    usage_error(std::string(flag) + " expects an integer in [" + std::to_string(lo) + ", " +
                std::to_string(hi) + "], got '" + text + "'");
  return v;
}

options parse(int argc, char** argv) {
  options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--check") {
      o.check = true;
      continue;
    }
    if (i + 1 >= argc) usage_error("unknown or incomplete argument '" + a + "'");
    const char* v = argv[++i];
    if (a == "--tokens") o.tokens = int(parse_int("--tokens", v, 1, 1 << 20));
    else if (a == "--threads") o.threads = int(parse_int("--threads", v, 1, 512));
    else if (a == "--d") o.d = int(parse_int("--d", v, 1, 1 << 16));
    else if (a == "--experts") o.experts = int(parse_int("--experts", v, 1, 4096));
    else if (a == "--width") o.width = int(parse_int("--width", v, 1, 1 << 16));
    else if (a == "--k") o.k = int(parse_int("--k", v, 1, 4096));
    else if (a == "--repetitions") o.repetitions = int(parse_int("--repetitions", v, 1, 1000));
    else if (a == "--seed") o.seed = unsigned(parse_int("--seed", v, 0, 1L << 31));
    else if (a == "--act") o.act = v;
    else if (a == "--type") o.type = v;
    else if (a == "--min-time") {
      char* end = nullptr;
      o.min_time = std::strtod(v, &end);
      if (end == v || *end != '\0' || !(o.min_time >= 0 && o.min_time <= 600))
        usage_error(std::string("--min-time expects seconds in [0, 600], got '") + v + "'");
    } else usage_error("unknown argument '" + a + "'");
  }
  if (o.act != "relu" && o.act != "swiglu") usage_error("--act expects relu or swiglu, got '" + o.act + "'");
  if (o.type != "f32" && o.type != "f16" && o.type != "bf16")
    usage_error("--type expects f32, f16 or bf16, got '" + o.type + "'");
  if (o.k > o.experts)
    usage_error("--k " + std::to_string(o.k) + " exceeds --experts " + std::to_string(o.experts));
  return o;
}

ggml_type storage_type(const std::string& t) {
  return t == "f16" ? GGML_TYPE_F16 : t == "bf16" ? GGML_TYPE_BF16 : GGML_TYPE_F32;
}

// Rounds a float row to the storage type and back: what ggml's kernels see of a weight or of an
// activation converted to the weight's dot type.
void round_to(ggml_type t, std::vector<float>& v) {
  if (t == GGML_TYPE_BF16) {
    std::vector<ggml_bf16_t> tmp(v.size());
    ggml_fp32_to_bf16_row(v.data(), tmp.data(), int64_t(v.size()));
    ggml_bf16_to_fp32_row(tmp.data(), v.data(), int64_t(v.size()));
  } else if (t == GGML_TYPE_F16) {
    std::vector<ggml_fp16_t> tmp(v.size());
    ggml_fp32_to_fp16_row(v.data(), tmp.data(), int64_t(v.size()));
    ggml_fp16_to_fp32_row(tmp.data(), v.data(), int64_t(v.size()));
  }
}

// Writes float values into a ggml tensor of type t (contiguous).
void store(ggml_tensor* dst, const std::vector<float>& v) {
  if (size_t(ggml_nelements(dst)) != v.size()) throw std::logic_error("store: element count mismatch");
  if (dst->type == GGML_TYPE_F32) std::memcpy(dst->data, v.data(), v.size() * sizeof(float));
  else if (dst->type == GGML_TYPE_BF16)
    ggml_fp32_to_bf16_row(v.data(), static_cast<ggml_bf16_t*>(dst->data), int64_t(v.size()));
  else ggml_fp32_to_fp16_row(v.data(), static_cast<ggml_fp16_t*>(dst->data), int64_t(v.size()));
}

std::vector<float> uniform(std::mt19937& g, size_t n, double fan_in) {
  const float a = float(1.0 / std::sqrt(fan_in));
  std::uniform_real_distribution<float> u(-a, a);
  std::vector<float> v(n);
  for (auto& x : v) x = u(g);
  return v;
}

struct layer {
  // Float copies of what the tensors hold (already rounded to the storage type), for the reference.
  std::vector<float> router, gate, b_gate, up, b_up, down, b_down, x;
};

// The plain-loop reference of the graph below, in double, with ggml's selection of experts (checked
// against the reference's own ranking, where the k-th and (k+1)-th probabilities are not tied).
// `selected` holds token t's experts at selected[t * selected_stride + s] (argsort_top_k is a view of
// the full argsort, so the stride is the expert count, not k).
double check_against_reference(const options& o, ggml_type t, const layer& w, const float* y,
                               const int32_t* selected, size_t selected_stride) {
  const int d = o.d, n = o.width, E = o.experts, k = o.k;
  const bool gated = o.act == "swiglu";
  std::vector<float> xr(w.x);
  round_to(t, xr);  // the expert products see x in the dot type
  double max_err = 0, max_y = 0;
  for (int tok = 0; tok < o.tokens; ++tok) {
    const float* xt = &w.x[size_t(tok) * d];
    std::vector<double> p(E);
    double top = -std::numeric_limits<double>::infinity();
    for (int e = 0; e < E; ++e) {
      double s = 0;
      for (int j = 0; j < d; ++j) s += double(w.router[size_t(e) * d + j]) * xt[j];
      p[e] = s;
      top = std::max(top, s);
    }
    double z = 0;
    for (auto& v : p) z += (v = std::exp(v - top));
    for (auto& v : p) v /= z;
    std::vector<double> sorted(p);
    std::sort(sorted.begin(), sorted.end(), std::greater<double>());
    const double kth = sorted[size_t(k) - 1], next = k < E ? sorted[size_t(k)] : -1.0;
    for (int s = 0; s < k; ++s) {
      const int e = selected[size_t(tok) * selected_stride + size_t(s)];
      if (e < 0 || e >= E) throw std::runtime_error("ggml selected expert " + std::to_string(e));
      if (p[size_t(e)] < kth && kth - next > 1e-6)
        throw std::runtime_error("token " + std::to_string(tok) + ": ggml selected expert " + std::to_string(e) +
                                 ", which is not among the top " + std::to_string(k));
    }
    const float* xq = &xr[size_t(tok) * d];
    std::vector<double> out(w.b_down.begin(), w.b_down.end());
    for (int s = 0; s < k; ++s) {
      const int e = selected[size_t(tok) * selected_stride + size_t(s)];
      std::vector<float> h(static_cast<size_t>(n));
      for (int i = 0; i < n; ++i) {
        double u = w.b_up[size_t(e) * n + i];
        const float* row = &w.up[(size_t(e) * n + i) * d];
        for (int j = 0; j < d; ++j) u += double(row[j]) * xq[j];
        if (gated) {
          double g = w.b_gate[size_t(e) * n + i];
          const float* grow = &w.gate[(size_t(e) * n + i) * d];
          for (int j = 0; j < d; ++j) g += double(grow[j]) * xq[j];
          h[size_t(i)] = float(g / (1.0 + std::exp(-g)) * u);
        } else {
          h[size_t(i)] = float(std::max(u, 0.0));
        }
      }
      round_to(t, h);
      for (int j = 0; j < d; ++j) {
        double acc = 0;
        const float* row = &w.down[(size_t(e) * d + j) * n];
        for (int i = 0; i < n; ++i) acc += double(row[i]) * h[size_t(i)];
        out[size_t(j)] += p[size_t(e)] * acc;
      }
    }
    for (int j = 0; j < d; ++j) {
      max_err = std::max(max_err, std::abs(out[size_t(j)] - double(y[size_t(tok) * d + j])));
      max_y = std::max(max_y, std::abs(out[size_t(j)]));
    }
  }
  return max_y > 0 ? max_err / max_y : max_err;
}

int run(const options& o) {
  const ggml_type t = storage_type(o.type);
  const int64_t d = o.d, n = o.width, E = o.experts, k = o.k, T = o.tokens;
  const bool gated = o.act == "swiglu";

  // Parameters as dmoe's benchmark layer has them: per-expert hidden biases (ggml_add_id, as
  // build_moe_ffn adds them) and one output bias shared by the experts, added once per token.
  std::mt19937 g(o.seed);
  layer w;
  w.router = uniform(g, size_t(E * d), double(d));
  w.up = uniform(g, size_t(E * n * d), double(d));
  w.b_up = uniform(g, size_t(E * n), double(d));
  if (gated) {
    w.gate = uniform(g, size_t(E * n * d), double(d));
    w.b_gate = uniform(g, size_t(E * n), double(d));
  }
  w.down = uniform(g, size_t(E * d * n), double(n));
  w.b_down = uniform(g, size_t(d), double(n));
  w.x = uniform(g, size_t(T * d), 1.0);
  round_to(t, w.up);
  round_to(t, w.gate);
  round_to(t, w.down);

  // One context holds the weights, the inputs and every intermediate of the graph (no_alloc = false:
  // ggml places each result as the graph is built). Sized from the graph's tensors with headroom.
  const size_t elem = ggml_type_size(t);
  const size_t weights = size_t(E) * (gated ? 3 : 2) * size_t(n) * size_t(d) * elem +
                         sizeof(float) * size_t(E) * (size_t(d) + 2 * size_t(n) + size_t(d));
  const size_t acts = sizeof(float) * size_t(T) * (size_t(d) * (size_t(k) + 3) + size_t(E) * 4 +
                                                   size_t(k) * (6 * size_t(n) + 2 * size_t(d) + 4));
  ggml_init_params ip{weights + acts + ggml_tensor_overhead() * 256 + ggml_graph_overhead() + (16u << 20), nullptr,
                      false};
  ggml_context* ctx = ggml_init(ip);
  if (!ctx) throw std::runtime_error("ggml_init failed for " + std::to_string(ip.mem_size) + " bytes");

  ggml_tensor* router = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, d, E);
  ggml_tensor* up = ggml_new_tensor_3d(ctx, t, d, n, E);
  ggml_tensor* b_up = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n, E);
  ggml_tensor* gate = gated ? ggml_new_tensor_3d(ctx, t, d, n, E) : nullptr;
  ggml_tensor* b_gate = gated ? ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n, E) : nullptr;
  ggml_tensor* down = ggml_new_tensor_3d(ctx, t, n, d, E);
  ggml_tensor* b_down = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, d);
  ggml_tensor* x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, d, T);
  store(router, w.router);
  store(up, w.up);
  store(b_up, w.b_up);
  if (gated) {
    store(gate, w.gate);
    store(b_gate, w.b_gate);
  }
  store(down, w.down);
  store(b_down, w.b_down);
  store(x, w.x);

  // build_moe_ffn for a softmax-gated, top-k, biased expert FFN (no weight renormalisation).
  ggml_tensor* logits = ggml_mul_mat(ctx, router, x);                      // [E, T]
  ggml_tensor* probs = ggml_soft_max(ctx, logits);                         // [E, T]
  ggml_tensor* selected = ggml_argsort_top_k(ctx, probs, int(k));          // [k, T]
  ggml_tensor* weights_kt = ggml_get_rows(ctx, ggml_reshape_3d(ctx, probs, 1, E, T), selected);  // [1, k, T]
  ggml_tensor* cur = ggml_reshape_3d(ctx, x, d, 1, T);
  ggml_tensor* h = ggml_add_id(ctx, ggml_mul_mat_id(ctx, up, cur, selected), b_up, selected);  // [n, k, T]
  if (gated) {
    ggml_tensor* gv = ggml_add_id(ctx, ggml_mul_mat_id(ctx, gate, cur, selected), b_gate, selected);
    h = ggml_swiglu_split(ctx, gv, h);
  } else {
    h = ggml_relu(ctx, h);
  }
  ggml_tensor* experts = ggml_mul_mat_id(ctx, down, h, selected);  // [d, k, T]
  experts = ggml_mul(ctx, experts, weights_kt);
  ggml_tensor* y = ggml_view_2d(ctx, experts, d, T, experts->nb[2], 0);
  for (int64_t s = 1; s < k; ++s) y = ggml_add(ctx, y, ggml_view_2d(ctx, experts, d, T, experts->nb[2], size_t(s) * experts->nb[1]));
  y = ggml_add(ctx, y, b_down);  // broadcast over the tokens; also makes the k = 1 view contiguous

  ggml_cgraph* gf = ggml_new_graph(ctx);
  ggml_build_forward_expand(gf, selected);
  ggml_build_forward_expand(gf, y);

  ggml_threadpool_params tpp = ggml_threadpool_params_default(o.threads);
  ggml_threadpool* pool = ggml_threadpool_new(&tpp);
  if (!pool) throw std::runtime_error("ggml_threadpool_new failed");
  ggml_cplan plan = ggml_graph_plan(gf, o.threads, pool);
  std::vector<uint8_t> work(plan.work_size + 64);
  plan.work_data = work.data();

  auto compute = [&] {
    if (ggml_graph_compute(gf, &plan) != GGML_STATUS_SUCCESS) throw std::runtime_error("ggml_graph_compute failed");
  };
  using clock = std::chrono::steady_clock;
  compute();  // warm-up
  double best = std::numeric_limits<double>::infinity();
  for (int r = 0; r < o.repetitions; ++r) {
    long iters = 0;
    const auto t0 = clock::now();
    double elapsed = 0;
    do {
      compute();
      ++iters;
      elapsed = std::chrono::duration<double>(clock::now() - t0).count();
    } while (elapsed < o.min_time);
    best = std::min(best, elapsed / double(iters));
  }

  double err = -1;
  if (o.check)
    err = check_against_reference(o, t, w, static_cast<const float*>(y->data),
                                  static_cast<const int32_t*>(selected->data), selected->nb[1] / sizeof(int32_t));

  std::printf("{\"tokens\": %d, \"threads\": %d, \"d\": %d, \"experts\": %d, \"width\": %d, \"act\": \"%s\", "
              "\"k\": %d, \"type\": \"%s\", \"best_ms\": %.6g",
              o.tokens, o.threads, o.d, o.experts, o.width, o.act.c_str(), o.k, o.type.c_str(), best * 1e3);
  if (o.check) std::printf(", \"check_rel_err\": %.3g", err);
  std::printf("}\n");
  ggml_threadpool_free(pool);
  ggml_free(ctx);
  if (o.check && !(err <= 1e-4)) {
    std::fprintf(stderr, "dmoe_ggml_moe: --check failed: error %.3g of max |y| exceeds 1e-4\n", err);
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const options o = parse(argc, argv);
  try {
    return run(o);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dmoe_ggml_moe: %s\n", e.what());
    return 1;
  }
}
