// The attention core softmax(q·kᵀ·scale)·v, forward and backward, for XLA:CPU: two XLA FFI custom
// calls (tikd_jax/cpu/kernels.py builds, loads and registers them).
//
//   forward:  q, k, v [B, N, H, d]                      -> out [B, N, H, d], probs [B, H, N, N]
//   backward: q, k, v, probs, d_out[, d_probs]           -> dq, dk, dv [B, N, H, d]
//             (without d_probs where nothing downstream reads probs)
//
// Why: XLA:CPU runs a batched dot as one Eigen product per batch element on one thread, and
// reduces a minor axis of 66 through a reduce-window, well behind PyTorch eager on the same cores
// (benchmarks/attention_core.py measures both). Here each (image, head) is done whole
// while its 66 × 66 scores sit in L1/L2: register-tiled products, the softmax and its gradient on
// the same rows, (image, head) pairs spread over XLA's intra-op thread pool. q, k, v and out keep
// the token-major layout of the qkv projection, so no transposed copy is made either way.
// Every product sums its terms in order, one multiply-add each, as a plain dot does.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// 16 floats: one AVX-512 register; GCC lowers it to two AVX2 or four SSE registers elsewhere.
typedef float Vec __attribute__((vector_size(64), aligned(4)));
constexpr int64_t kWidth = 16;

// The first `len` lanes from p, the rest `fill`.
inline Vec Load(const float* p, int64_t len, float fill) {
  if (len >= kWidth) {
    Vec v;
    std::memcpy(&v, p, sizeof(Vec));
    return v;
  }
  float lanes[kWidth];
  std::fill(lanes, lanes + kWidth, fill);
  std::memcpy(lanes, p, len * sizeof(float));
  Vec v;
  std::memcpy(&v, lanes, sizeof(Vec));
  return v;
}

// The first `len` lanes of v to p (a whole vector as one store: a fixed-size copy).
inline void Store(float* p, Vec v, int64_t len) {
  if (len >= kWidth) {
    std::memcpy(p, &v, sizeof(Vec));
  } else {
    std::memcpy(p, &v, len * sizeof(float));
  }
}

inline Vec Splat(float x) { return Vec{} + x; }

// A matrix view: element (i, j) at data[i * rows + j * cols].
struct View {
  const float* data;
  int64_t rows, cols;
  float at(int64_t i, int64_t j) const { return data[i * rows + j * cols]; }
};

struct Tiles {
  View a;               // [m, k]
  const float* packed;  // b [k, n] as k rows of np floats, zero padded
  int64_t np;
  float* c;  // [m, n], row stride ldc
  int64_t ldc, m, n, k;
};

// Rows [i, i + MR) × columns [j, j + NB·16) of c = a · b.
template <int MR, int NB>
inline void Tile(const Tiles& t, int64_t i, int64_t j) {
  Vec acc[MR][NB];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NB; ++v) acc[r][v] = Vec{};
  for (int64_t p = 0; p < t.k; ++p) {
    Vec row[NB];
    for (int v = 0; v < NB; ++v)
      std::memcpy(&row[v], t.packed + p * t.np + j + v * kWidth, sizeof(Vec));
    for (int r = 0; r < MR; ++r) {
      const float s = t.a.at(i + r, p);
      for (int v = 0; v < NB; ++v) acc[r][v] += s * row[v];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NB; ++v) {
      const int64_t col = j + v * kWidth;
      if (col < t.n) Store(t.c + (i + r) * t.ldc + col, acc[r][v], t.n - col);
    }
}

// Every row of c in columns [j, j + NB·16), MR rows at a time (MR·NB ≤ 16 accumulators).
template <int NB, int MR>
void Columns(const Tiles& t, int64_t j) {
  int64_t i = 0;
  for (; i + MR <= t.m; i += MR) Tile<MR, NB>(t, i, j);
  for (; i < t.m; ++i) Tile<1, NB>(t, i, j);
}

// c[m, n] (row stride ldc) = a[m, k] · b[k, n]; `packed` holds at least k · round_up(n, 16).
void Product(View a, View b, float* c, int64_t ldc, int64_t m, int64_t k, int64_t n,
             float* packed) {
  const int64_t np = (n + kWidth - 1) / kWidth * kWidth;
  for (int64_t p = 0; p < k; ++p) {
    float* row = packed + p * np;
    for (int64_t j = 0; j < n; ++j) row[j] = b.at(p, j);
    std::fill(row + n, row + np, 0.f);
  }
  const Tiles t{a, packed, np, c, ldc, m, n, k};
  int64_t j = 0;
  for (; j + 4 * kWidth <= np; j += 4 * kWidth) Columns<4, 4>(t, j);
  switch ((np - j) / kWidth) {
    case 3:
      Columns<3, 5>(t, j);
      break;
    case 2:
      Columns<2, 8>(t, j);
      break;
    case 1:
      Columns<1, 12>(t, j);
      break;
    default:
      break;
  }
}

inline float Max(Vec v) {
  float m = v[0];
  for (int i = 1; i < kWidth; ++i) m = std::max(m, v[i]);
  return m;
}

inline float Sum(Vec v) {
  float s = 0.f;
  for (int i = 0; i < kWidth; ++i) s += v[i];
  return s;
}

// e^x lane-wise for x ≤ 0 (the softmax's x − max): 2^n · e^r with n = round(x / ln 2), r reduced
// in two steps and Cephes' expf polynomial (≈1 ulp); x below the smallest normal's log gives 0.
// Written out because GCC vectorises std::exp only under -ffast-math.
inline Vec Exp(Vec x) {
  typedef int32_t Ints __attribute__((vector_size(64)));
  const Vec t = x * 1.44269504088896341f + 0.5f;
  Ints n = __builtin_convertvector(t, Ints);  // truncates toward zero: floor for t < 0 below
  n -= (__builtin_convertvector(n, Vec) > t) ? Ints{} + 1 : Ints{};
  const Vec nf = __builtin_convertvector(n, Vec);
  const Vec r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  Vec y = Splat(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.f;
  const Ints bits = (n + 127) << 23;
  Vec scale;
  std::memcpy(&scale, &bits, sizeof(Vec));
  return x < -87.33654475f ? Vec{} : y * scale;
}

// row = softmax(row · scale), as jax.nn.softmax: exp(x − max) / Σ exp(x − max).
void SoftmaxRow(float* row, int64_t n, float scale) {
  Vec top = Splat(-INFINITY);
  for (int64_t j = 0; j < n; j += kWidth) {
    const Vec x = Load(row + j, n - j, -INFINITY / scale) * scale;
    Store(row + j, x, n - j);
    top = x > top ? x : top;
  }
  const float m = Max(top);
  Vec sum{};
  for (int64_t j = 0; j < n; j += kWidth) {
    const Vec e = Exp(Load(row + j, n - j, -INFINITY) - m);
    Store(row + j, e, n - j);
    sum += e;
  }
  const float total = Sum(sum);
  for (int64_t j = 0; j < n; ++j) row[j] /= total;
}

// row = probs ⊙ (g − Σ_j probs·g) · scale with g = row + d_probs (d_probs may be nullptr: 0):
// the softmax's gradient.
void SoftmaxGradRow(float* row, const float* probs, const float* d_probs, int64_t n, float scale) {
  Vec dot{};
  for (int64_t j = 0; j < n; j += kWidth) {
    Vec g = Load(row + j, n - j, 0.f);
    if (d_probs) {
      g += Load(d_probs + j, n - j, 0.f);
      Store(row + j, g, n - j);
    }
    dot += Load(probs + j, n - j, 0.f) * g;
  }
  const float total = Sum(dot);
  for (int64_t j = 0; j < n; ++j) row[j] = probs[j] * (row[j] - total) * scale;
}

struct Shape {
  int64_t batch, tokens, heads, dim;
  int64_t row() const { return heads * dim; }  // token stride of q, k, v, out
  // offset of (image b, head h, token 0) in a [B, N, H, d] array
  int64_t at(int64_t b, int64_t h) const { return b * tokens * heads * dim + h * dim; }
};

Shape ShapeOf(const ffi::Buffer<ffi::F32>& q) {
  const auto d = q.dimensions();
  return Shape{d[0], d[1], d[2], d[3]};
}

ffi::Error NotRank4() {
  return ffi::Error::InvalidArgument("attention: q, k, v must be [B, N, H, d]");
}

int64_t RoundUp(int64_t n) { return (n + kWidth - 1) / kWidth * kWidth; }

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::ResultBuffer<ffi::F32> out,
                   ffi::ResultBuffer<ffi::F32> probs, float scale) {
  if (q.dimensions().size() != 4) return NotRank4();
  const Shape s = ShapeOf(q);
  const int64_t n = s.tokens, d = s.dim, ld = s.row();
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  float *op = out->typed_data(), *pp = probs->typed_data();
  const int64_t packed = std::max(d, n) * RoundUp(std::max(d, n));
  tikd::ParallelFor(pool, s.batch * s.heads, packed, [&](int64_t e, float* scratch) {
    const int64_t b = e / s.heads, h = e % s.heads, at = s.at(b, h);
    float* p = pp + e * n * n;
    Product({qp + at, ld, 1}, {kp + at, 1, ld}, p, n, n, d, n, scratch);  // q · kᵀ
    for (int64_t i = 0; i < n; ++i) SoftmaxRow(p + i * n, n, scale);
    Product({p, n, 1}, {vp + at, ld, 1}, op + at, ld, n, n, d, scratch);  // probs · v
  });
  return ffi::Error::Success();
}

// d_probs: the cotangent of the probs output, or nullptr where nothing downstream reads probs.
ffi::Error BackwardImpl(ffi::ThreadPool& pool, const ffi::Buffer<ffi::F32>& q, const float* kp,
                        const float* vp, const float* pp, const float* gp, const float* gpp,
                        float* dqp, float* dkp, float* dvp, float scale) {
  if (q.dimensions().size() != 4) return NotRank4();
  const Shape s = ShapeOf(q);
  const int64_t n = s.tokens, d = s.dim, ld = s.row();
  const float* qp = q.typed_data();
  const int64_t packed = std::max(d, n) * RoundUp(std::max(d, n));
  tikd::ParallelFor(pool, s.batch * s.heads, packed + n * n, [&](int64_t e, float* scratch) {
    const int64_t b = e / s.heads, h = e % s.heads, at = s.at(b, h);
    const float* p = pp + e * n * n;
    float* ds = scratch + packed;
    Product({gp + at, ld, 1}, {vp + at, 1, ld}, ds, n, n, d, n, scratch);  // d_out · vᵀ
    // d_scores = the softmax gradient of d_probs, row by row
    for (int64_t i = 0; i < n; ++i) {
      SoftmaxGradRow(ds + i * n, p + i * n, gpp ? gpp + e * n * n + i * n : nullptr, n, scale);
    }
    Product({ds, n, 1}, {kp + at, ld, 1}, dqp + at, ld, n, n, d, scratch);  // d_scores · k
    Product({ds, 1, n}, {qp + at, ld, 1}, dkp + at, ld, n, n, d, scratch);  // d_scoresᵀ · q
    Product({p, 1, n}, {gp + at, ld, 1}, dvp + at, ld, n, n, d, scratch);   // probsᵀ · d_out
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> probs,
                    ffi::Buffer<ffi::F32> d_out, ffi::Buffer<ffi::F32> d_probs,
                    ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                    ffi::ResultBuffer<ffi::F32> dv, float scale) {
  return BackwardImpl(pool, q, k.typed_data(), v.typed_data(), probs.typed_data(),
                      d_out.typed_data(), d_probs.typed_data(), dq->typed_data(), dk->typed_data(),
                      dv->typed_data(), scale);
}

ffi::Error BackwardOutOnly(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                           ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> probs,
                           ffi::Buffer<ffi::F32> d_out, ffi::ResultBuffer<ffi::F32> dq,
                           ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv,
                           float scale) {
  return BackwardImpl(pool, q, k.typed_data(), v.typed_data(), probs.typed_data(),
                      d_out.typed_data(), nullptr, dq->typed_data(), dk->typed_data(),
                      dv->typed_data(), scale);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TikdAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // probs
                                  .Attr<float>("scale"));

namespace {

// q, k, v, probs, d_out: the operands both backward calls share.
auto BindBackwardOperands() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()   // q
      .Arg<ffi::Buffer<ffi::F32>>()   // k
      .Arg<ffi::Buffer<ffi::F32>>()   // v
      .Arg<ffi::Buffer<ffi::F32>>()   // probs
      .Arg<ffi::Buffer<ffi::F32>>();  // d_out
}

// dq, dk, dv and the scale.
template <typename Binding>
auto BindBackwardResults(Binding binding) {
  return std::move(binding)                   // the builder's methods take it as an rvalue
      .template Ret<ffi::Buffer<ffi::F32>>()  // dq
      .template Ret<ffi::Buffer<ffi::F32>>()  // dk
      .template Ret<ffi::Buffer<ffi::F32>>()  // dv
      .template Attr<float>("scale");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    TikdAttentionBackward, Backward,
    BindBackwardResults(BindBackwardOperands().Arg<ffi::Buffer<ffi::F32>>()));  // + d_probs

XLA_FFI_DEFINE_HANDLER_SYMBOL(TikdAttentionBackwardOutOnly, BackwardOutOnly,
                              BindBackwardResults(BindBackwardOperands()));
