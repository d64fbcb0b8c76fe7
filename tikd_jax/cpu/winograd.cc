// A 3×3, stride-1, pad-1 convolution forward for XLA:CPU by Winograd's minimal filtering F(2×2,
// 3×3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016): one XLA FFI
// custom call (tikd_jax/cpu/kernels.py builds, loads and registers it).
//
//   x [B, H, W, C] (H, W even), u = G·g·Gᵀ [16, C, O] (the kernel, transformed once by the caller)
//   -> y [B, H, W, O],  y = Aᵀ·[Σ_c (Bᵀ·d·B) ⊙ u]·A per 2×2 output tile, d its 4×4 input tile.
//
// Why: each 2×2 output tile costs 16·C·O multiply-adds instead of the direct convolution's 36·C·O
// (2.25× fewer). Composed of XLA ops the transforms are strided memory passes over 4× the
// activations and cost more than the saving (benchmarks/README.md); here a block of tiles is
// transformed into a scratch buffer that stays in L2, multiplied, and transformed back, with
// register-tiled products (16-float vectors) and blocks spread over XLA's intra-op threads.
// Bᵀ and Aᵀ hold only ±1 and G only ±1/2, so the transforms add a few roundings to a sum of 9·C
// products, not more (tests/test_cpu_winograd.py bounds the difference to the plain convolution).
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// 16 floats: one AVX-512 register; GCC lowers it to two AVX2 or four SSE registers elsewhere.
typedef float Vec __attribute__((vector_size(64), aligned(4)));
constexpr int64_t kWidth = 16;
constexpr int kTileRows = 6;  // MR: tiles per register tile of the product
// Floats of transformed input per block (16 · tiles · C): 256 KiB, with the kernel's column
// slice well inside a 1–2 MiB L2.
constexpr int64_t kBlockFloats = 16 * 4096;

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(Vec));
  return v;
}

inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof(Vec)); }

struct Shape {
  int64_t batch, height, width, channels, outputs;
  int64_t tile_rows() const { return height / 2; }
  int64_t tile_cols() const { return width / 2; }
  int64_t tiles() const { return batch * tile_rows() * tile_cols(); }
  // tiles per block: a multiple of kTileRows, about kBlockFloats / (16 · C)
  int64_t block() const {
    const int64_t t = std::max<int64_t>(1, kBlockFloats / (16 * channels) / kTileRows);
    return t * kTileRows;
  }
};

struct Tile {
  int64_t image, row, col;  // top-left output pixel (row, col)
};

inline Tile TileAt(const Shape& s, int64_t p) {
  const int64_t per_image = s.tile_rows() * s.tile_cols();
  const int64_t r = p % per_image;
  return Tile{p / per_image, 2 * (r / s.tile_cols()), 2 * (r % s.tile_cols())};
}

// v[k][i][c] = (Bᵀ·d·B)[k] for tiles p0 … p0 + n − 1, k = 4·row + column of the 4×4 transform,
// with Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0], [0, −1, 1, 0], [0, 1, 0, −1]]; zero padding outside.
void TransformInput(const float* x, const Shape& s, int64_t p0, int64_t n, int64_t stride,
                    float* v) {
  const int64_t c_all = s.channels;
  for (int64_t i = 0; i < n; ++i) {
    const Tile t = TileAt(s, p0 + i);
    const float* rows[4];
    bool col_in[4];
    for (int a = 0; a < 4; ++a) {
      const int64_t y = t.row - 1 + a;
      rows[a] = (y >= 0 && y < s.height) ? x + (t.image * s.height + y) * s.width * c_all : nullptr;
      const int64_t xc = t.col - 1 + a;
      col_in[a] = xc >= 0 && xc < s.width;
    }
    for (int64_t c = 0; c < c_all; c += kWidth) {
      Vec d[4][4];
      for (int a = 0; a < 4; ++a)
        for (int b = 0; b < 4; ++b)
          d[a][b] = (rows[a] && col_in[b]) ? Load(rows[a] + (t.col - 1 + b) * c_all + c) : Vec{};
      Vec e[4][4];  // Bᵀ·d
      for (int b = 0; b < 4; ++b) {
        e[0][b] = d[0][b] - d[2][b];
        e[1][b] = d[1][b] + d[2][b];
        e[2][b] = d[2][b] - d[1][b];
        e[3][b] = d[1][b] - d[3][b];
      }
      for (int a = 0; a < 4; ++a) {  // (Bᵀ·d)·B
        float* out = v + (4 * a * stride + i) * c_all + c;
        Store(out, e[a][0] - e[a][2]);
        Store(out + stride * c_all, e[a][1] + e[a][2]);
        Store(out + 2 * stride * c_all, e[a][2] - e[a][1]);
        Store(out + 3 * stride * c_all, e[a][1] - e[a][3]);
      }
    }
  }
}

// m[r][j] = Σ_c v[r][c] · u[c][o + 16j] for MR tiles r and NB vectors j; m is [MR][NB] vectors.
template <int MR, int NB>
inline void Product(const float* v, int64_t c_all, const float* u, int64_t o_all, Vec* m) {
  Vec acc[MR][NB];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NB; ++j) acc[r][j] = Vec{};
  for (int64_t c = 0; c < c_all; ++c) {
    Vec row[NB];
    for (int j = 0; j < NB; ++j) row[j] = Load(u + c * o_all + j * kWidth);
    for (int r = 0; r < MR; ++r) {
      const float a = v[r * c_all + c];
      for (int j = 0; j < NB; ++j) acc[r][j] += a * row[j];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NB; ++j) m[r * NB + j] = acc[r][j];
}

// y = Aᵀ·m·A for MR tiles × NB output vectors from m[k][r][j], Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]].
template <int MR, int NB>
inline void TransformOutput(const Vec* m, const Shape& s, int64_t p0, int64_t o, float* y) {
  for (int r = 0; r < MR; ++r) {
    const Tile t = TileAt(s, p0 + r);
    float* out = y + ((t.image * s.height + t.row) * s.width + t.col) * s.outputs + o;
    for (int j = 0; j < NB; ++j) {
      auto at = [&](int k) { return m[(k * MR + r) * NB + j]; };
      Vec e[2][4];  // Aᵀ·m
      for (int b = 0; b < 4; ++b) {
        e[0][b] = at(b) + at(4 + b) + at(8 + b);
        e[1][b] = at(4 + b) - at(8 + b) - at(12 + b);
      }
      for (int a = 0; a < 2; ++a) {  // (Aᵀ·m)·A
        float* row = out + a * s.width * s.outputs + j * kWidth;
        Store(row, e[a][0] + e[a][1] + e[a][2]);
        Store(row + s.outputs, e[a][1] - e[a][2] - e[a][3]);
      }
    }
  }
}

// MR tiles from v (the block's transformed input, tile i0 on) × output vectors [o, o + 16·NB).
template <int MR, int NB>
inline void TileColumns(const float* v, int64_t stride, int64_t i0, const float* u, const Shape& s,
                        int64_t p0, int64_t o, float* y) {
  Vec m[16 * MR * NB];
  const int64_t c_all = s.channels, o_all = s.outputs;
  for (int k = 0; k < 16; ++k)
    Product<MR, NB>(v + (k * stride + i0) * c_all, c_all, u + k * c_all * o_all + o, o_all,
                    m + k * MR * NB);
  TransformOutput<MR, NB>(m, s, p0 + i0, o, y);
}

template <int MR>
void Tiles(const float* v, int64_t stride, int64_t i0, const float* u, const Shape& s, int64_t p0,
           float* y) {
  int64_t o = 0;
  for (; o + 2 * kWidth <= s.outputs; o += 2 * kWidth)
    TileColumns<MR, 2>(v, stride, i0, u, s, p0, o, y);
  if (o < s.outputs) TileColumns<MR, 1>(v, stride, i0, u, s, p0, o, y);
}

// The tiles p0 … p0 + n − 1 of y; v: scratch of 16 · stride · C floats.
void Block(const float* x, const float* u, const Shape& s, int64_t p0, int64_t n, int64_t stride,
           float* v, float* y) {
  TransformInput(x, s, p0, n, stride, v);
  int64_t i = 0;
  for (; i + kTileRows <= n; i += kTileRows) Tiles<kTileRows>(v, stride, i, u, s, p0, y);
  for (; i < n; ++i) Tiles<1>(v, stride, i, u, s, p0, y);
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> u,
                   ffi::ResultBuffer<ffi::F32> y) {
  const auto dx = x.dimensions();
  const auto du = u.dimensions();
  if (dx.size() != 4 || du.size() != 3 || du[0] != 16 || du[1] != dx[3]) {
    return ffi::Error::InvalidArgument("winograd conv: x must be [B, H, W, C] and u [16, C, O]");
  }
  const Shape s{dx[0], dx[1], dx[2], dx[3], du[2]};
  if (s.height % 2 || s.width % 2 || s.channels % kWidth || s.outputs % kWidth) {
    return ffi::Error::InvalidArgument(
        "winograd conv: H and W must be even and C and O multiples of 16");
  }
  const int64_t stride = s.block(), blocks = (s.tiles() + stride - 1) / stride;
  const float *xp = x.typed_data(), *up = u.typed_data();
  float* yp = y->typed_data();
  tikd::ParallelFor(pool, blocks, 16 * stride * s.channels, [&](int64_t q, float* v) {
    const int64_t p0 = q * stride;
    Block(xp, up, s, p0, std::min(stride, s.tiles() - p0), stride, v, yp);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TikdWinogradConvForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // x
                                  .Arg<ffi::Buffer<ffi::F32>>()    // u
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y
