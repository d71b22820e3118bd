// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
#pragma once
#include "../core/namespace.hpp"
/// \file
/// Dense FFN weights in safetensors files, by tensor name. Checkpoints store the two (three, if
/// gated) projections in one of two layouts:
///  - PyTorch nn.Linear: weight (out, in) — BERT `encoder.layer.{i}.intermediate.dense.weight`
///    is (F, d), `encoder.layer.{i}.output.dense.weight` is (d, F); LLaMA gate/up/down_proj too;
///  - GPT-2 Conv1D: weight (in, out) — `h.{i}.mlp.c_fc.weight` is (d, F), `c_proj` (F, d).
/// An ffn_names says which tensors hold W1, b1, W2, b2 (and the gate for gated FFNs) and which
/// layout they use; bert_ffn_names, gpt2_ffn_names and llama_ffn_names build the usual ones.

#include <cstdint>
#include <string>
#include <vector>

#include "../core/layout.hpp"
#include "../cpu/dense_ffn.hpp"
#include "safetensors.hpp"

DMOE_NAMESPACE_BEGIN

/// Tensor names of one dense FFN. Empty bias names mean "no bias in the file" (loaded as 0,
/// not saved). For gated activations w_gate is the gate projection and w1 the up projection.
struct ffn_names {
  std::string w1, b1, w2, b2;
  weight_layout layout = weight_layout::out_in;
  std::string w_gate;
};

/// BERT (and RoBERTa, MiniLM, ...): `{prefix}encoder.layer.{i}.intermediate.dense.{weight,bias}`
/// and `{prefix}encoder.layer.{i}.output.dense.{weight,bias}`, nn.Linear layout. HF checkpoints
/// of a model with a head put "bert." in front: pass it as prefix.
inline ffn_names bert_ffn_names(int layer, const std::string& prefix = "") {
  const std::string p = prefix + "encoder.layer." + std::to_string(layer) + ".";
  return {p + "intermediate.dense.weight", p + "intermediate.dense.bias", p + "output.dense.weight",
          p + "output.dense.bias", weight_layout::out_in, ""};
}
/// GPT-2: `{prefix}h.{i}.mlp.c_fc.{weight,bias}` and `{prefix}h.{i}.mlp.c_proj.{weight,bias}`,
/// Conv1D layout (prefix "transformer." for GPT2LMHeadModel checkpoints).
inline ffn_names gpt2_ffn_names(int layer, const std::string& prefix = "") {
  const std::string p = prefix + "h." + std::to_string(layer) + ".mlp.";
  return {p + "c_fc.weight", p + "c_fc.bias", p + "c_proj.weight", p + "c_proj.bias", weight_layout::in_out, ""};
}
/// LLaMA/Mistral gated FFN: `{prefix}layers.{i}.mlp.{gate,up,down}_proj.weight`, no biases
/// (prefix "model." for *ForCausalLM checkpoints). For a swiglu dense_ffn.
inline ffn_names llama_ffn_names(int layer, const std::string& prefix = "") {
  const std::string p = prefix + "layers." + std::to_string(layer) + ".mlp.";
  return {p + "up_proj.weight", "", p + "down_proj.weight", "", weight_layout::out_in, p + "gate_proj.weight"};
}

namespace detail::io {
/// Reads a projection in->out stored in `layout` into `dst`, a column-major (in, out) matrix
/// block: dst(i, o) = weight of input i for output o. Checks the shape.
template <class T, class Dst>
void read_projection(const safetensors_file& f, const std::string& name, weight_layout layout, std::int64_t in,
                     std::int64_t out, Dst&& dst) {
  const bool oi = layout == weight_layout::out_in;
  f.expect_shape(name, oi ? std::vector<std::int64_t>{out, in} : std::vector<std::int64_t>{in, out});
  const auto v = f.read<T>(name);
  for (std::int64_t o = 0; o < out; ++o)
    for (std::int64_t i = 0; i < in; ++i)
      dst(static_cast<index_t>(i), static_cast<index_t>(o)) = v[static_cast<std::size_t>(oi ? o * in + i : i * out + o)];
}
template <class Src>
std::vector<double> projection_values(const Src& src, weight_layout layout) {
  // src is an (in, out) matrix expression
  const index_t in = src.rows(), out = src.cols();
  std::vector<double> v(static_cast<std::size_t>(in * out));
  for (index_t o = 0; o < out; ++o)
    for (index_t i = 0; i < in; ++i)
      v[static_cast<std::size_t>(layout == weight_layout::out_in ? o * in + i : i * out + o)] = double(src(i, o));
  return v;
}
inline std::vector<std::int64_t> projection_shape(index_t in, index_t out, weight_layout layout) {
  return layout == weight_layout::out_in ? std::vector<std::int64_t>{out, in} : std::vector<std::int64_t>{in, out};
}
}  // namespace detail::io

/// Loads a dense FFN. d_model and the hidden width come from W2's shape; every other tensor must
/// agree (the error names the tensor, the shape found and the shape expected).
template <class T, class Activation>
dense_ffn<T, Activation> load_dense_ffn(const safetensors_file& f, const ffn_names& names) {
  if (Activation::gated && names.w_gate.empty())
    detail::raisef(errc::invalid_argument, "load_dense_ffn: activation %s is gated: ffn_names.w_gate must name the gate projection",
                   Activation::name);
  if (!Activation::gated && !names.w_gate.empty())
    detail::raisef(errc::invalid_argument, "load_dense_ffn: ffn_names.w_gate is '%s' but activation %s is not gated",
                   names.w_gate.c_str(), Activation::name);
  const auto& t2 = f.info(names.w2);
  if (t2.shape.size() != 2 || t2.shape[0] <= 0 || t2.shape[1] <= 0)
    detail::raisef(errc::invalid_argument, "safetensors '%s': tensor '%s' (W2) has shape %s, expected a non-empty matrix",
                   f.label().c_str(), names.w2.c_str(), detail::io::shape_string(t2.shape).c_str());
  const bool oi = names.layout == weight_layout::out_in;
  const std::int64_t d = oi ? t2.shape[0] : t2.shape[1], F = oi ? t2.shape[1] : t2.shape[0];
  dense_ffn<T, Activation> ffn(static_cast<index_t>(d), static_cast<index_t>(F));
  const index_t Fi = static_cast<index_t>(F);
  if constexpr (Activation::gated) {
    detail::io::read_projection<T>(f, names.w_gate, names.layout, d, F, ffn.w1().leftCols(Fi));
    detail::io::read_projection<T>(f, names.w1, names.layout, d, F, ffn.w1().rightCols(Fi));
  } else {
    detail::io::read_projection<T>(f, names.w1, names.layout, d, F, ffn.w1());
  }
  detail::io::read_projection<T>(f, names.w2, names.layout, F, d, ffn.w2());
  if (!names.b1.empty()) {
    f.expect_shape(names.b1, {static_cast<std::int64_t>(width_factor<Activation>) * F});
    const auto v = f.read<T>(names.b1);
    for (std::size_t i = 0; i < v.size(); ++i) ffn.b1()(static_cast<index_t>(i)) = v[i];
  }
  if (!names.b2.empty()) {
    f.expect_shape(names.b2, {d});
    const auto v = f.read<T>(names.b2);
    for (std::size_t i = 0; i < v.size(); ++i) ffn.b2()(static_cast<index_t>(i)) = v[i];
  }
  return ffn;
}

/// Adds a dense FFN's tensors to `w` under `names` (in their layout), converted to `dtype`.
/// Biases with an empty name are not written. For gated activations b1 is [gate | up].
template <class T, class Activation>
void save_dense_ffn(safetensors_writer& w, const dense_ffn<T, Activation>& ffn, const ffn_names& names,
                    st_dtype dtype = native_dtype<T>) {
  const index_t d = ffn.d_model(), F = ffn.hidden();
  if constexpr (Activation::gated) {
    if (names.w_gate.empty())
      detail::raisef(errc::invalid_argument, "save_dense_ffn: activation %s is gated: ffn_names.w_gate must be set",
                     Activation::name);
    w.add(names.w_gate, dtype, detail::io::projection_shape(d, F, names.layout),
          detail::io::projection_values(ffn.w1().leftCols(F), names.layout));
    w.add(names.w1, dtype, detail::io::projection_shape(d, F, names.layout),
          detail::io::projection_values(ffn.w1().rightCols(F), names.layout));
  } else {
    w.add(names.w1, dtype, detail::io::projection_shape(d, F, names.layout),
          detail::io::projection_values(ffn.w1(), names.layout));
  }
  w.add(names.w2, dtype, detail::io::projection_shape(F, d, names.layout), detail::io::projection_values(ffn.w2(), names.layout));
  if (!names.b1.empty()) w.add(names.b1, dtype, {static_cast<std::int64_t>(ffn.b1().size())}, ffn.b1().data());
  if (!names.b2.empty()) w.add(names.b2, dtype, {static_cast<std::int64_t>(ffn.b2().size())}, ffn.b2().data());
}

DMOE_NAMESPACE_END  // namespace dmoe
