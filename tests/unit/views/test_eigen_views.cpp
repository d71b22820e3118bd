// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// Eigen interop: every kind of Eigen dense object a user holds a batch in (Matrix, const Matrix,
// Map, const Map handle, Map/Ref with OuterStride<>, row blocks, general blocks, the transpose of
// a column-major matrix) passes straight to moe_layer::forward and ::backward, and gives bitwise
// the results of the plain row_matrix call. Strided cases sit inside NaN-filled storage: any
// read outside the viewed rows would turn the results NaN, any write outside them would show in
// the padding, which is checked bitwise.
// The column-major refusal is a compile-fail test (tests/compile_fail/column_major_input.cpp).
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include <dmoe/dmoe.hpp>

namespace {

using dmoe::index_t;
using M = dmoe::row_matrix<float>;
using CM = Eigen::MatrixXf;  // column-major
constexpr float nan_f = std::numeric_limits<float>::quiet_NaN();

template <class P>
typename P::options options_for();
template <>
dmoe::top_k_options options_for<dmoe::top_k>() {
  return {2, true};
}
template <>
dmoe::dynamic_k_options options_for<dmoe::dynamic_k>() {
  return {0.3, 0};
}
template <>
dmoe::top_any_options options_for<dmoe::top_any>() {
  return {true};
}

template <class A, class B>
bool same_bytes(const A& a, const B& b) {
  if (a.rows() != b.rows() || a.cols() != b.cols()) return false;
  for (index_t r = 0; r < a.rows(); ++r)
    for (index_t c = 0; c < a.cols(); ++c) {
      const float x = a(r, c), y = b(r, c);
      if (std::memcmp(&x, &y, sizeof(float)) != 0) return false;
    }
  return true;
}
bool all_nan(const float* p, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i)
    if (!std::isnan(p[i])) return false;
  return true;
}

template <class P>
struct fixture {
  static constexpr index_t tokens = 37, d = 12, E = 5, n = 7, pad_rows = 3, pad_cols = 4;
  using layer_t = dmoe::moe_layer<float, dmoe::cpu, P, dmoe::gelu_tanh>;
  layer_t layer{dmoe::moe_config{d, E, n}, options_for<P>()};
  dmoe::context<dmoe::cpu> ctx{};
  dmoe::workspace_buffer ws;
  M x, dy, y_ref, dx_ref;
  std::vector<std::vector<float>> g_ref;
  dmoe::aux_losses aux;

  fixture() {
    layer.randomize(20260);
    ws.resize(layer.workspace_size(dmoe::workspace_bounds{tokens, 1}));
    x = M::Random(tokens, d);
    dy = M::Random(tokens, d);
    aux.load_balance = 0.3;
    aux.z_loss = 0.1;
    aux.diversity = 0.2;
    aux.efficiency = 0.4;
    y_ref = M(tokens, d);
    dx_ref = M(tokens, d);
    auto g = layer.make_gradients();
    REQUIRE(layer.forward(ctx, x, y_ref, ws).ok());
    REQUIRE(layer.backward(ctx, x, dy, dx_ref, g, ws, &aux).ok());
    g_ref = flat(g);
    // The comparisons below could not fail on a degenerate reference.
    REQUIRE(y_ref.allFinite());
    REQUIRE(dx_ref.allFinite());
    REQUIRE(y_ref.cwiseAbs().maxCoeff() > 0.0f);
    REQUIRE(dx_ref.cwiseAbs().maxCoeff() > 0.0f);
  }
  static std::vector<std::vector<float>> flat(typename layer_t::gradients& g) {
    std::vector<std::vector<float>> out;
    for (const auto& s : g.parameters()) out.emplace_back(s.data, s.data + s.size);
    return out;
  }
  /// forward(x_view, y_view) then backward(x_view, dy_view, dx_view); y and dx read back by the
  /// callables (the output storage differs per kind).
  template <class X, class Y, class DY, class DX, class ReadY, class ReadDX>
  void check(const char* kind, X&& xv, Y&& yv, DY&& dyv, DX&& dxv, ReadY read_y, ReadDX read_dx) {
    CAPTURE(kind);
    auto g = layer.make_gradients();
    const dmoe::status fs = layer.forward(ctx, xv, yv, ws);
    REQUIRE_MESSAGE(fs.ok(), fs.message());
    CHECK(same_bytes(read_y(), y_ref));
    const dmoe::status bs = layer.backward(ctx, xv, dyv, dxv, g, ws, &aux);
    REQUIRE_MESSAGE(bs.ok(), bs.message());
    CHECK(same_bytes(read_dx(), dx_ref));
    const auto gf = flat(g);
    REQUIRE(gf.size() == g_ref.size());
    for (std::size_t i = 0; i < gf.size(); ++i) {
      CAPTURE(i);
      CHECK(gf[i].size() == g_ref[i].size());
      CHECK(std::memcmp(gf[i].data(), g_ref[i].data(), gf[i].size() * sizeof(float)) == 0);
    }
  }
};

template <class P>
void all_kinds() {
  fixture<P> f;
  using F = fixture<P>;
  const index_t T = F::tokens, d = F::d;

  {  // const Matrix inputs, Matrix outputs
    const M& cx = f.x;
    const M& cdy = f.dy;
    M y(T, d), dx(T, d);
    f.check("const Matrix", cx, y, cdy, dx, [&] { return y; }, [&] { return dx; });
  }
  {  // Map<const M> inputs over plain buffers, writable Map<M> outputs (temporaries in the call)
    std::vector<float> xb(f.x.data(), f.x.data() + f.x.size()), dyb(f.dy.data(), f.dy.data() + f.dy.size());
    std::vector<float> yb(std::size_t(T * d)), dxb(std::size_t(T * d));
    using CMap = Eigen::Map<const M>;
    using WMap = Eigen::Map<M>;
    f.check("Map", CMap(xb.data(), T, d), WMap(yb.data(), T, d), CMap(dyb.data(), T, d), WMap(dxb.data(), T, d),
            [&] { return M(CMap(yb.data(), T, d)); }, [&] { return M(CMap(dxb.data(), T, d)); });
  }
  {  // A const handle to writable storage is a writable output (as in Eigen's own functions).
    M y(T, d), dx(T, d);
    const Eigen::Map<M> ym(y.data(), T, d), dxm(dx.data(), T, d);
    const Eigen::Map<M> xm(f.x.data(), T, d);  // a writable map as an input converts to const
    f.check("const Map handle", xm, ym, f.dy, dxm, [&] { return y; }, [&] { return dx; });
  }

  // Strided storage: rows of d + pad_cols values, pad_rows rows above, NaN everywhere else.
  const index_t R = T + 2 * F::pad_rows, C = d + F::pad_cols, r0 = F::pad_rows, c0 = 1;
  auto padded = [&](const M& src) {
    M big = M::Constant(R, C, nan_f);
    big.block(r0, c0, T, d) = src;
    return big;
  };
  // Every element of `big` outside the block is still NaN (nothing written outside the view).
  auto padding_untouched = [&](const M& big) {
    M probe = big;
    probe.block(r0, c0, T, d).setConstant(nan_f);
    return all_nan(probe.data(), std::size_t(probe.size()));
  };
  {  // Map with OuterStride<> over strided rows
    M bx = padded(f.x), bdy = padded(f.dy), by = M::Constant(R, C, nan_f), bdx = M::Constant(R, C, nan_f);
    using S = Eigen::OuterStride<>;
    using CMap = Eigen::Map<const M, 0, S>;
    using WMap = Eigen::Map<M, 0, S>;
    auto at = [&](M& b) { return &b(r0, c0); };
    f.check("Map<OuterStride<>>", CMap(at(bx), T, d, S(C)), WMap(at(by), T, d, S(C)), CMap(at(bdy), T, d, S(C)),
            WMap(at(bdx), T, d, S(C)), [&] { return M(by.block(r0, c0, T, d)); },
            [&] { return M(bdx.block(r0, c0, T, d)); });
    CHECK(padding_untouched(by));
    CHECK(padding_untouched(bdx));
  }
  {  // Ref<..., OuterStride<>> bound to blocks (no copy: the stride is kept)
    M bx = padded(f.x), bdy = padded(f.dy), by = M::Constant(R, C, nan_f), bdx = M::Constant(R, C, nan_f);
    using S = Eigen::OuterStride<>;
    Eigen::Ref<const M, 0, S> rx(bx.block(r0, c0, T, d)), rdy(bdy.block(r0, c0, T, d));
    Eigen::Ref<M, 0, S> ry(by.block(r0, c0, T, d)), rdx(bdx.block(r0, c0, T, d));
    REQUIRE(rx.data() == &bx(r0, c0));  // a view, not a temporary copy
    REQUIRE(ry.outerStride() == C);
    f.check("Ref<OuterStride<>>", rx, ry, rdy, rdx, [&] { return M(by.block(r0, c0, T, d)); },
            [&] { return M(bdx.block(r0, c0, T, d)); });
    CHECK(padding_untouched(by));
    CHECK(padding_untouched(bdx));
  }
  {  // general blocks of a row-major matrix, passed as temporaries; inputs from a const matrix
    const M bx = padded(f.x), bdy = padded(f.dy);
    M by = M::Constant(R, C, nan_f), bdx = M::Constant(R, C, nan_f);
    f.check("block", bx.block(r0, c0, T, d), by.block(r0, c0, T, d), bdy.block(r0, c0, T, d),
            bdx.block(r0, c0, T, d), [&] { return M(by.block(r0, c0, T, d)); },
            [&] { return M(bdx.block(r0, c0, T, d)); });
    CHECK(padding_untouched(by));
    CHECK(padding_untouched(bdx));
  }
  {  // row blocks: middleRows and topRows of taller matrices (dense rows)
    M bx = M::Constant(R, d, nan_f), bdy = M::Constant(R, d, nan_f), by = M::Constant(R, d, nan_f),
      bdx = M::Constant(R, d, nan_f);
    bx.middleRows(r0, T) = f.x;
    bdy.middleRows(r0, T) = f.dy;
    f.check("middleRows", bx.middleRows(r0, T), by.middleRows(r0, T), bdy.middleRows(r0, T),
            bdx.middleRows(r0, T), [&] { return M(by.middleRows(r0, T)); },
            [&] { return M(bdx.middleRows(r0, T)); });
    CHECK(all_nan(by.data(), std::size_t(r0 * d)));
    CHECK(all_nan(by.data() + (r0 + T) * d, std::size_t((R - r0 - T) * d)));
    CHECK(all_nan(bdx.data() + (r0 + T) * d, std::size_t((R - r0 - T) * d)));
    M tx = M::Constant(R, d, nan_f), tdy = M::Constant(R, d, nan_f), ty = M::Constant(R, d, nan_f),
      tdx = M::Constant(R, d, nan_f);
    tx.topRows(T) = f.x;
    tdy.topRows(T) = f.dy;
    f.check("topRows", tx.topRows(T), ty.topRows(T), tdy.topRows(T), tdx.topRows(T),
            [&] { return M(ty.topRows(T)); }, [&] { return M(tdx.topRows(T)); });
    CHECK(all_nan(ty.data() + T * d, std::size_t((R - T) * d)));
    CHECK(all_nan(tdx.data() + T * d, std::size_t((R - T) * d)));
  }
  {  // a column-major d x tokens batch, passed as its transpose (row-major, no copy)
    CM cx = f.x.transpose(), cdy = f.dy.transpose(), cy = CM::Constant(d, T, nan_f), cdx = CM::Constant(d, T, nan_f);
    f.check("transpose of column-major", cx.transpose(), cy.transpose(), cdy.transpose(), cdx.transpose(),
            [&] { return M(cy.transpose()); }, [&] { return M(cdx.transpose()); });
  }
}

// A block of the rows of one batch is that many tokens: forward on x.topRows(8) / middleRows
// gives bitwise what the plain call on a copy of those rows gives.
template <class P>
void row_subsets() {
  fixture<P> f;
  using F = fixture<P>;
  for (index_t start : {index_t(0), index_t(5), F::tokens - 8}) {
    CAPTURE(start);
    const M sub = f.x.middleRows(start, 8);
    M y_ref(8, F::d), y_big = M::Constant(F::tokens, F::d, nan_f);
    REQUIRE(f.layer.forward(f.ctx, sub, y_ref, f.ws).ok());
    REQUIRE(f.layer.forward(f.ctx, f.x.middleRows(start, 8), y_big.middleRows(start, 8), f.ws).ok());
    CHECK(same_bytes(M(y_big.middleRows(start, 8)), y_ref));
    if (start == 0) {
      M y_top(8, F::d);
      REQUIRE(f.layer.forward(f.ctx, f.x.topRows(8), y_top, f.ws).ok());
      CHECK(same_bytes(y_top, y_ref));
    }
  }
}

}  // namespace

TEST_SUITE("views") {
  // The view records what the Eigen object holds: pointer, shape and row stride.
  TEST_CASE("views: matrix_view from Eigen objects keeps pointer, shape and stride") {
    M a = M::Random(9, 5);
    const dmoe::matrix_view<const float> v0 = a.block(2, 1, 4, 3);
    CHECK(v0.data == &a(2, 1));
    CHECK(v0.rows == 4);
    CHECK(v0.cols == 3);
    CHECK(v0.row_stride == 5);
    CHECK(v0(3, 2) == a(5, 3));
    CM c = CM::Random(5, 9);
    const dmoe::matrix_view<float> v1 = c.transpose();
    CHECK(v1.data == c.data());
    CHECK(v1.rows == 9);
    CHECK(v1.cols == 5);
    CHECK(v1.row_stride == 5);
    CHECK(v1(7, 3) == c(3, 7));
    v1(7, 3) = 42.0f;
    CHECK(c(3, 7) == 42.0f);
    const dmoe::matrix_view<float> v2 = a.row(4);
    CHECK(v2.data == &a(4, 0));
    CHECK(v2.rows == 1);
    CHECK(v2.cols == 5);
    Eigen::Array<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> arr = a.array();
    const dmoe::matrix_view<const float> v3 = arr;
    CHECK(v3.data == arr.data());
    CHECK(v3.row_stride == 5);
    Eigen::Matrix<float, 3, 4, Eigen::RowMajor> fixed = Eigen::Matrix<float, 3, 4, Eigen::RowMajor>::Zero();
    const dmoe::matrix_view<float> v4 = fixed;
    CHECK(v4.data == fixed.data());
    CHECK(v4.rows == 3);
    CHECK(v4.cols == 4);
    CHECK(v4.row_stride == 4);
  }

  TEST_CASE("views: every Eigen kind through forward and backward is bitwise the plain call (top_k)") {
    all_kinds<dmoe::top_k>();
  }
  TEST_CASE("views: every Eigen kind through forward and backward is bitwise the plain call (dynamic_k)") {
    all_kinds<dmoe::dynamic_k>();
  }
  TEST_CASE("views: every Eigen kind through forward and backward is bitwise the plain call (top_any)") {
    all_kinds<dmoe::top_any>();
  }
  TEST_CASE("views: row blocks are that many tokens") {
    row_subsets<dmoe::top_k>();
    row_subsets<dmoe::dynamic_k>();
    row_subsets<dmoe::top_any>();
  }
}
