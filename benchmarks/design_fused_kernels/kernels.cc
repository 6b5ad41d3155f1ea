// Design study (not part of the library): fused CPU kernels for UMTAM's update, as XLA FFI
// custom calls. Built and measured by run.py in this folder; see benchmarks/PERFORMANCE.md,
// "Fused CPU kernels through the XLA FFI". AVX-512 only; float32, row-major.
//
//   ExpandPrecondition  out[i, j] = (a[i, :] · vt[:, j]) / sqrt(row[i] col[j] + eps)
//                       (SPEC step 8 with the expansion U Σ Vᵀ in the same pass)
//   BuildSketch         out = c0 · prev + (c1 · g) · c2 (in place of prev) and y = out @ v
//                       (the momentum build with the sketch M̃ V in the same pass)
//   TransposedProduct   out = qᵀ a (the projection Qᵀ M̃)
//   SquareSums          row and (per chunk of rows) column sums of g² (step 5) from one read
//   SquareSumsSketch    the same and y = g @ v (the sketch of G without error feedback)
//   ExpandPreconditionSaliency
//                       ExpandPrecondition and step 9, s ← α s + (1 − α)(w − w0)² √R √Cᵀ,
//                       in the same pass (s updated in place)
//
// Every kernel splits its rows (columns for TransposedProduct) into chunks that tasks on
// XLA's intra-op thread pool claim from an atomic counter, and returns an ffi::Future that
// the last task completes: the calling thread never waits, so a busy pool cannot deadlock.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using F32 = ffi::Buffer<ffi::F32>;
using F32Out = ffi::ResultBuffer<ffi::F32>;
#define UMTAM_AVX512 __attribute__((target("avx512f,avx512dq,fma")))

// Runs body(c) for every chunk c in [0, chunks) on (at most) `tasks` pool tasks.
template <typename Body>
ffi::Future RunAsync(ffi::ThreadPool& pool, int64_t chunks, Body body) {
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), chunks));
  ffi::CountDownPromise promise(tasks);
  ffi::Future future(promise);
  auto next = std::make_shared<std::atomic<int64_t>>(0);
  for (int64_t t = 0; t < tasks; ++t) {
    pool.Schedule([=]() mutable {
      for (int64_t c; (c = next->fetch_add(1, std::memory_order_relaxed)) < chunks;) body(c);
      promise.CountDown(1);
    });
  }
  return future;
}

// The instruction sets the kernels are compiled for (checked before every call).
bool Supported() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("fma");
}

ffi::Future Failed(const char* message) {
  ffi::Promise promise;
  ffi::Future future(promise);
  promise.SetError(ffi::Error::InvalidArgument(message));
  return future;
}

inline __mmask16 Mask(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1u);
}

// 1/sqrt(x) to ~2 ulp: the 14-bit estimate and one Newton step; where the estimate is
// exactly 0 or inf (x = inf or 0) it is kept (the Newton step would give NaN there).
UMTAM_AVX512 inline __m512 Rsqrt(__m512 x) {
  const __m512 y = _mm512_maskz_rsqrt14_ps(0xFFFF, x);
  const __m512 hx = _mm512_mul_ps(_mm512_set1_ps(0.5f), x);
  const __m512 t = _mm512_fnmadd_ps(_mm512_mul_ps(hx, y), y, _mm512_set1_ps(1.5f));
  const __mmask16 special = _mm512_fpclass_ps_mask(y, 0x02 | 0x04 | 0x08 | 0x10);
  return _mm512_mask_mov_ps(_mm512_mul_ps(y, t), special, y);
}

// ---------------------------------------------------------------- ExpandPrecondition

constexpr int64_t kRowsPerChunk = 48;

// Step 9 in the same pass (ExpandPreconditionSaliency): s ← α s + (1 − α) (w − w0)² sr sc
// with sr = sqrt(R), sc = sqrt(C). Pointers are at the tile's first row.
struct Saliency {
  const float *w, *w0, *sr, *sc;
  float* s;
  float alpha;
};

// kR rows × 64 columns of the output. kFull: all 64 columns valid (plain loads and stores);
// otherwise `width` < 64 columns, through masks.
template <int kR, bool kFull, bool kSaliency>
UMTAM_AVX512 inline void ExpandTile(const float* a, const float* vt, const float* row,
                                    const float* col, __m512 eps, float* out, int64_t r,
                                    int64_t n, int64_t j, int64_t width, const Saliency& sal) {
  constexpr int kV = 4;
  __mmask16 mask[kV];
  for (int c = 0; c < kV; ++c) mask[c] = kFull ? __mmask16(0xFFFF) : Mask(width - 16 * c);
  auto load = [&](const float* p, int c) UMTAM_AVX512 {
    return kFull ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(mask[c], p);
  };
  __m512 acc[kR][kV];
  for (int i = 0; i < kR; ++i)
    for (int c = 0; c < kV; ++c) acc[i][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < r; ++k) {
    __m512 b[kV];
    for (int c = 0; c < kV; ++c) b[c] = load(vt + k * n + j + 16 * c, c);
    for (int i = 0; i < kR; ++i) {
      const __m512 s = _mm512_set1_ps(a[i * r + k]);
      for (int c = 0; c < kV; ++c) acc[i][c] = _mm512_fmadd_ps(s, b[c], acc[i][c]);
    }
  }
  for (int i = 0; i < kR; ++i) {
    const __m512 ri = _mm512_set1_ps(row[i]);
    for (int c = 0; c < kV; ++c) {
      const __m512 x = _mm512_fmadd_ps(ri, load(col + j + 16 * c, c), eps);
      const __m512 d = _mm512_mul_ps(acc[i][c], Rsqrt(x));
      if (kFull) _mm512_storeu_ps(out + i * n + j + 16 * c, d);
      else _mm512_mask_storeu_ps(out + i * n + j + 16 * c, mask[c], d);
      if constexpr (kSaliency) {
        const int64_t at = i * n + j + 16 * c;
        const __m512 dev = _mm512_sub_ps(load(sal.w + at, c), load(sal.w0 + at, c));
        const __m512 scale = _mm512_mul_ps(_mm512_set1_ps(sal.sr[i]), load(sal.sc + j + 16 * c, c));
        const __m512 fresh = _mm512_mul_ps(_mm512_mul_ps(dev, dev), scale);
        const __m512 alpha = _mm512_set1_ps(sal.alpha);
        const __m512 old = load(sal.s + at, c);
        const __m512 next = _mm512_fmadd_ps(alpha, _mm512_sub_ps(old, fresh), fresh);
        if (kFull) _mm512_storeu_ps(sal.s + at, next);
        else _mm512_mask_storeu_ps(sal.s + at, mask[c], next);
      }
    }
  }
}

template <int kR, bool kSaliency>
UMTAM_AVX512 void ExpandRows(const float* a, const float* vt, const float* row,
                             const float* col, float eps, float* out, int64_t r, int64_t n,
                             const Saliency& sal) {
  const __m512 e = _mm512_set1_ps(eps);
  int64_t j = 0;
  for (; j + 64 <= n; j += 64)
    ExpandTile<kR, true, kSaliency>(a, vt, row, col, e, out, r, n, j, 64, sal);
  if (j < n) ExpandTile<kR, false, kSaliency>(a, vt, row, col, e, out, r, n, j, n - j, sal);
}

template <bool kSaliency>
void ExpandChunk(const float* a, const float* vt, const float* row, const float* col, float eps,
                 float* out, int64_t r, int64_t n, int64_t begin, int64_t end, Saliency sal) {
  auto at = [&](int64_t i) {
    Saliency here = sal;
    if (kSaliency) here = {sal.w + i * n, sal.w0 + i * n, sal.sr + i, sal.sc, sal.s + i * n, sal.alpha};
    return here;
  };
  int64_t i = begin;
  for (; i + 6 <= end; i += 6)
    ExpandRows<6, kSaliency>(a + i * r, vt, row + i, col, eps, out + i * n, r, n, at(i));
  for (; i < end; ++i)
    ExpandRows<1, kSaliency>(a + i * r, vt, row + i, col, eps, out + i * n, r, n, at(i));
}


ffi::Future ExpandPreconditionImpl(ffi::ThreadPool pool, F32 a, F32 vt, F32 row, F32 col,
                                   F32 eps, F32Out out) {
  if (!Supported()) return Failed("needs AVX-512 F and DQ and FMA");
  const auto ad = a.dimensions(), vd = vt.dimensions();
  if (ad.size() != 2 || vd.size() != 2 || ad[1] != vd[0] || static_cast<int64_t>(row.element_count()) != ad[0] ||
      static_cast<int64_t>(col.element_count()) != vd[1] || eps.element_count() != 1)
    return Failed("ExpandPrecondition: expects a (m, r), vt (r, n), row (m), col (n), eps ()");
  const int64_t m = ad[0], r = ad[1], n = vd[1];
  const float *ap = a.typed_data(), *vp = vt.typed_data(), *rp = row.typed_data(),
              *cp = col.typed_data();
  const float e = eps.typed_data()[0];
  float* op = out->typed_data();
  return RunAsync(pool, (m + kRowsPerChunk - 1) / kRowsPerChunk, [=](int64_t c) {
    const int64_t begin = c * kRowsPerChunk, end = std::min(m, begin + kRowsPerChunk);
    ExpandChunk<false>(ap, vp, rp, cp, e, op, r, n, begin, end, Saliency{});
  });
}

ffi::Future ExpandPreconditionSaliencyImpl(ffi::ThreadPool pool, F32 a, F32 vt, F32 row,
                                           F32 col, F32 eps, F32 s, F32 w, F32 w0, F32 sr,
                                           F32 sc, F32 alpha, F32Out out, F32Out s_out) {
  if (!Supported()) return Failed("needs AVX-512 F and DQ and FMA");
  const auto ad = a.dimensions(), vd = vt.dimensions();
  if (ad.size() != 2 || vd.size() != 2 || ad[1] != vd[0])
    return Failed("ExpandPreconditionSaliency: expects a (m, r), vt (r, n)");
  const int64_t m = ad[0], r = ad[1], n = vd[1];
  if (static_cast<int64_t>(s.element_count()) != m * n ||
      static_cast<int64_t>(w.element_count()) != m * n ||
      static_cast<int64_t>(w0.element_count()) != m * n)
    return Failed("ExpandPreconditionSaliency: expects s, w, w0 (m, n)");
  const float *ap = a.typed_data(), *vp = vt.typed_data(), *rp = row.typed_data(),
              *cp = col.typed_data();
  const float e = eps.typed_data()[0];
  float* op = out->typed_data();
  const Saliency sal{w.typed_data(), w0.typed_data(), sr.typed_data(), sc.typed_data(),
                     s_out->typed_data(), alpha.typed_data()[0]};
  return RunAsync(pool, (m + kRowsPerChunk - 1) / kRowsPerChunk, [=](int64_t c) {
    const int64_t begin = c * kRowsPerChunk, end = std::min(m, begin + kRowsPerChunk);
    ExpandChunk<true>(ap, vp, rp, cp, e, op, r, n, begin, end, sal);
  });
}

// ---------------------------------------------------------------------- BuildSketch

// acc[i] += out[i, j] · v[j, :] for the kR rows (out points at column j of row 0).
template <int kR, int kV>
UMTAM_AVX512 inline void SketchColumn(const float* v, const float* out, int64_t n,
                                      __m512 (&acc)[kR][kV]) {
  __m512 vv[kV];
  for (int c = 0; c < kV; ++c) vv[c] = _mm512_loadu_ps(v + 16 * c);
  for (int i = 0; i < kR; ++i) {
    const __m512 s = _mm512_set1_ps(out[i * n]);
    for (int c = 0; c < kV; ++c) acc[i][c] = _mm512_fmadd_ps(s, vv[c], acc[i][c]);
  }
}

// kR rows: out = c0 prev + (c1 g) c2, 16 columns at a time, then y += out[:, j:j+16] @ v[j:j+16].
// (The factor on g comes in two parts: one would underflow for gradients with ‖G‖ ≳ 1e38.)
template <int kR, int kV>
UMTAM_AVX512 void BuildSketchRows(const float* prev, const float* g, const float* v, float c0,
                                  float c1, float c2, float* out, float* y, int64_t n) {
  constexpr int64_t r = 16 * kV;
  __m512 acc[kR][kV];
  for (int i = 0; i < kR; ++i)
    for (int c = 0; c < kV; ++c) acc[i][c] = _mm512_setzero_ps();
  const __m512 a = _mm512_set1_ps(c0), b = _mm512_set1_ps(c1), b2 = _mm512_set1_ps(c2);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 mask = Mask(n - j);
    for (int i = 0; i < kR; ++i) {
      const __m512 p = _mm512_maskz_loadu_ps(mask, prev + i * n + j);
      const __m512 q = _mm512_maskz_loadu_ps(mask, g + i * n + j);
      _mm512_mask_storeu_ps(out + i * n + j, mask, _mm512_fmadd_ps(a, p, _mm512_mul_ps(_mm512_mul_ps(b, q), b2)));
    }
    if (n - j >= 16) {
#pragma GCC unroll 16
      for (int64_t jj = 0; jj < 16; ++jj) SketchColumn<kR, kV>(v + (j + jj) * r, out + j + jj, n, acc);
    } else {
      for (int64_t jj = 0; jj < n - j; ++jj) SketchColumn<kR, kV>(v + (j + jj) * r, out + j + jj, n, acc);
    }
  }
  for (int i = 0; i < kR; ++i)
    for (int c = 0; c < kV; ++c) _mm512_storeu_ps(y + i * r + 16 * c, acc[i][c]);
}

template <int kV>
UMTAM_AVX512 void BuildSketchChunk(const float* prev, const float* g, const float* v, float c0,
                                   float c1, float c2, float* out, float* y, int64_t n, int64_t begin,
                                   int64_t end) {
  constexpr int64_t r = 16 * kV;
  int64_t i = begin;
  for (; i + 6 <= end; i += 6)
    BuildSketchRows<6, kV>(prev + i * n, g + i * n, v, c0, c1, c2, out + i * n, y + i * r, n);
  for (; i < end; ++i)
    BuildSketchRows<1, kV>(prev + i * n, g + i * n, v, c0, c1, c2, out + i * n, y + i * r, n);
}

ffi::Future BuildSketchImpl(ffi::ThreadPool pool, F32 prev, F32 g, F32 v, F32 coef, F32Out out,
                            F32Out y) {
  if (!Supported()) return Failed("needs AVX-512 F and DQ and FMA");
  const auto pd = prev.dimensions(), vd = v.dimensions();
  if (pd.size() != 2 || vd.size() != 2 || vd[0] != pd[1] || static_cast<int64_t>(g.element_count()) != pd[0] * pd[1] ||
      coef.element_count() != 3 || (vd[1] != 16 && vd[1] != 32))
    return Failed("BuildSketch: expects prev, g (m, n), v (n, 16 or 32), coef (3)");
  const int64_t m = pd[0], n = pd[1], r = vd[1];
  const float *pp = prev.typed_data(), *gp = g.typed_data(), *vp = v.typed_data();
  const float c0 = coef.typed_data()[0], c1 = coef.typed_data()[1], c2 = coef.typed_data()[2];
  float *op = out->typed_data(), *yp = y->typed_data();
  return RunAsync(pool, (m + kRowsPerChunk - 1) / kRowsPerChunk, [=](int64_t c) {
    const int64_t begin = c * kRowsPerChunk, end = std::min(m, begin + kRowsPerChunk);
    if (r == 32) BuildSketchChunk<2>(pp, gp, vp, c0, c1, c2, op, yp, n, begin, end);
    else BuildSketchChunk<1>(pp, gp, vp, c0, c1, c2, op, yp, n, begin, end);
  });
}

// ---------------------------------------------------------------- TransposedProduct

// kK rows of out (= columns of q) × 48 columns, accumulated over all m rows.
template <int kK>
UMTAM_AVX512 void TnTile(const float* q, const float* a, float* out, int64_t m, int64_t k,
                         int64_t n, int64_t k0, int64_t j) {
  const __mmask16 m0 = Mask(n - j), m1 = Mask(n - j - 16), m2 = Mask(n - j - 32);
  __m512 acc[kK][3];
  for (int t = 0; t < kK; ++t)
    for (int c = 0; c < 3; ++c) acc[t][c] = _mm512_setzero_ps();
  for (int64_t i = 0; i < m; ++i) {
    const float* ai = a + i * n + j;
    const __m512 b0 = _mm512_maskz_loadu_ps(m0, ai), b1 = _mm512_maskz_loadu_ps(m1, ai + 16),
                 b2 = _mm512_maskz_loadu_ps(m2, ai + 32);
    for (int t = 0; t < kK; ++t) {
      const __m512 s = _mm512_set1_ps(q[i * k + k0 + t]);
      acc[t][0] = _mm512_fmadd_ps(s, b0, acc[t][0]);
      acc[t][1] = _mm512_fmadd_ps(s, b1, acc[t][1]);
      acc[t][2] = _mm512_fmadd_ps(s, b2, acc[t][2]);
    }
  }
  for (int t = 0; t < kK; ++t) {
    float* o = out + (k0 + t) * n + j;
    _mm512_mask_storeu_ps(o, m0, acc[t][0]);
    _mm512_mask_storeu_ps(o + 16, m1, acc[t][1]);
    _mm512_mask_storeu_ps(o + 32, m2, acc[t][2]);
  }
}

UMTAM_AVX512 void TnPanel(const float* q, const float* a, float* out, int64_t m, int64_t k,
                          int64_t n, int64_t j) {
  int64_t k0 = 0;
  for (; k0 + 8 <= k; k0 += 8) TnTile<8>(q, a, out, m, k, n, k0, j);
  for (; k0 < k; ++k0) TnTile<1>(q, a, out, m, k, n, k0, j);
}

ffi::Future TransposedProductImpl(ffi::ThreadPool pool, F32 q, F32 a, F32Out out) {
  if (!Supported()) return Failed("needs AVX-512 F and DQ and FMA");
  const auto qd = q.dimensions(), ad = a.dimensions();
  if (qd.size() != 2 || ad.size() != 2 || qd[0] != ad[0])
    return Failed("TransposedProduct: expects q (m, k) and a (m, n)");
  const int64_t m = qd[0], k = qd[1], n = ad[1];
  const float *qp = q.typed_data(), *ap = a.typed_data();
  float* op = out->typed_data();
  return RunAsync(pool, (n + 47) / 48,
                  [=](int64_t c) { TnPanel(qp, ap, op, m, k, n, 48 * c); });
}


// ----------------------------------------------------------------------- SquareSums

// kR rows of g (at row i of the chunk): rows[i] = Σ_j g², cols[j] += Σ_i g² (this chunk's
// partial column sums), and with kV > 0 also y = g @ v (v: n × 16·kV), from one read of g.
template <int kR, int kV>
UMTAM_AVX512 void SquareSumsRows(const float* g, const float* v, float* rows, float* cols,
                                 float* y, int64_t n) {
  constexpr int64_t r = 16 * kV;
  __m512 row[kR];
  __m512 acc[kR][kV > 0 ? kV : 1];
  for (int i = 0; i < kR; ++i) {
    row[i] = _mm512_setzero_ps();
    for (int c = 0; c < kV; ++c) acc[i][c] = _mm512_setzero_ps();
  }
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 mask = Mask(n - j);
    __m512 col = _mm512_maskz_loadu_ps(mask, cols + j);
    for (int i = 0; i < kR; ++i) {
      const __m512 x = _mm512_maskz_loadu_ps(mask, g + i * n + j);
      const __m512 sq = _mm512_mul_ps(x, x);
      row[i] = _mm512_add_ps(row[i], sq);
      col = _mm512_add_ps(col, sq);
    }
    _mm512_mask_storeu_ps(cols + j, mask, col);
    if constexpr (kV > 0) {
      if (n - j >= 16) {
#pragma GCC unroll 16
        for (int64_t jj = 0; jj < 16; ++jj) SketchColumn<kR, kV>(v + (j + jj) * r, g + j + jj, n, acc);
      } else {
        for (int64_t jj = 0; jj < n - j; ++jj) SketchColumn<kR, kV>(v + (j + jj) * r, g + j + jj, n, acc);
      }
    }
  }
  for (int i = 0; i < kR; ++i) {
    alignas(64) float lanes[16];
    _mm512_store_ps(lanes, row[i]);
    float total = 0.f;
    for (float lane : lanes) total += lane;
    rows[i] = total;
    for (int c = 0; c < kV; ++c) _mm512_storeu_ps(y + i * r + 16 * c, acc[i][c]);
  }
}

template <int kV>
UMTAM_AVX512 void SquareSumsChunk(const float* g, const float* v, float* rows, float* cols,
                                  float* y, int64_t n, int64_t begin, int64_t end) {
  constexpr int64_t r = 16 * kV;
  for (int64_t j = 0; j < n; j += 16) _mm512_mask_storeu_ps(cols + j, Mask(n - j), _mm512_setzero_ps());
  int64_t i = begin;
  for (; i + 6 <= end; i += 6)
    SquareSumsRows<6, kV>(g + i * n, v, rows + i, cols, kV ? y + i * r : nullptr, n);
  for (; i < end; ++i)
    SquareSumsRows<1, kV>(g + i * n, v, rows + i, cols, kV ? y + i * r : nullptr, n);
}

ffi::Future SquareSumsImpl(ffi::ThreadPool pool, F32 g, F32Out rows, F32Out cols) {
  if (!Supported()) return Failed("needs AVX-512 F and DQ and FMA");
  const auto gd = g.dimensions();
  if (gd.size() != 2) return Failed("SquareSums: expects g (m, n)");
  const int64_t m = gd[0], n = gd[1];
  const float* gp = g.typed_data();
  float *rp = rows->typed_data(), *cp = cols->typed_data();
  return RunAsync(pool, (m + kRowsPerChunk - 1) / kRowsPerChunk, [=](int64_t c) {
    const int64_t begin = c * kRowsPerChunk, end = std::min(m, begin + kRowsPerChunk);
    SquareSumsChunk<0>(gp, nullptr, rp, cp + c * n, nullptr, n, begin, end);
  });
}

ffi::Future SquareSumsSketchImpl(ffi::ThreadPool pool, F32 g, F32 v, F32Out rows, F32Out cols,
                                 F32Out y) {
  if (!Supported()) return Failed("needs AVX-512 F and DQ and FMA");
  const auto gd = g.dimensions(), vd = v.dimensions();
  if (gd.size() != 2 || vd.size() != 2 || vd[0] != gd[1] || (vd[1] != 16 && vd[1] != 32))
    return Failed("SquareSumsSketch: expects g (m, n), v (n, 16 or 32)");
  const int64_t m = gd[0], n = gd[1], r = vd[1];
  const float *gp = g.typed_data(), *vp = v.typed_data();
  float *rp = rows->typed_data(), *cp = cols->typed_data(), *yp = y->typed_data();
  return RunAsync(pool, (m + kRowsPerChunk - 1) / kRowsPerChunk, [=](int64_t c) {
    const int64_t begin = c * kRowsPerChunk, end = std::min(m, begin + kRowsPerChunk);
    if (r == 32) SquareSumsChunk<2>(gp, vp, rp, cp + c * n, yp, n, begin, end);
    else SquareSumsChunk<1>(gp, vp, rp, cp + c * n, yp, n, begin, end);
  });
}

}  // namespace

// Bindings deduced from each implementation's parameters (thread pool, buffers, results);
// the thread pool needs this declaration to be deduced.
template <>
struct xla::ffi::CtxBinding<xla::ffi::ThreadPool> {
  using Ctx = xla::ffi::ThreadPool;
};

// ExpandPreconditionSaliency's s argument is aliased with its second result.
XLA_FFI_DEFINE_HANDLER_SYMBOL(ExpandPrecondition, ExpandPreconditionImpl);
XLA_FFI_DEFINE_HANDLER_SYMBOL(BuildSketch, BuildSketchImpl);
XLA_FFI_DEFINE_HANDLER_SYMBOL(TransposedProduct, TransposedProductImpl);
XLA_FFI_DEFINE_HANDLER_SYMBOL(SquareSums, SquareSumsImpl);
XLA_FFI_DEFINE_HANDLER_SYMBOL(SquareSumsSketch, SquareSumsSketchImpl);
XLA_FFI_DEFINE_HANDLER_SYMBOL(ExpandPreconditionSaliency, ExpandPreconditionSaliencyImpl);
