// The U-Net's attention path as MindSpore custom "aot" operators: the channel LayerNorm, and the
// cores of linear and of full softmax attention, each forward and backward in one call. The
// cores read the 1x1 conv's (B, 3 * heads * d, H, W) output in place (q, k, v and each head are
// contiguous d x n blocks of it, n = H * W) and write (B, heads * d, H, W): MindSpore's split,
// transposes, softmaxes and batched matmuls, and their gradients, become one pass per (sample,
// head) with oneDNN's sgemm for the small products.
//
// Operators (inputs, then outputs; float32 but for the int64 heads):
//   ChannelNormForward(x, g, eps) -> y            y = (x - mean_c) / sqrt(var_c + eps) * g
//   ChannelNormBackward(x, g, dy, eps) -> (dx, dg)
//   LinearAttentionForward(qkv, scale, heads) -> out
//   LinearAttentionBackward(qkv, dout, scale, heads) -> dqkv
//   AttentionForward(qkv, scale, heads) -> out
//   AttentionBackward(qkv, dout, scale, heads) -> dqkv
// The backward passes recompute the softmaxes from qkv (cheaper than keeping them).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "oneapi/dnnl/dnnl.h"
#include "runtime.h"
#include "vector_math.h"

namespace {

using ddpm::AllFloat32;
using ddpm::BlockedSum;
using ddpm::Elements;
using ddpm::Fail;
using ddpm::FastExp;
using ddpm::Guarded;
using ddpm::ParallelRange;

// C = alpha op(A) op(B), row-major, op = transpose where the flag is 'T'; single-threaded
// (called inside our pool's tasks).
void Gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, float alpha, const float *a, const float *b, float *c) {
  const int64_t lda = ta == 'N' ? k : m, ldb = tb == 'N' ? n : k;
  if (dnnl_sgemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, 0.0f, c, n) != dnnl_success) {
    throw std::runtime_error("dnnl_sgemm failed");
  }
}

// ---- ChannelLayerNorm: statistics over the C rows of each sample's (C, n) block, per column.

// mean and 1/sqrt(var + eps) of each column of a (rows, n) block, two passes (no cancellation).
DDPM_VECTOR_CLONES
void ColumnMoments(const float *x, int64_t rows, int64_t n, float eps, float *mean, float *rstd) {
  const float inv = 1.0f / static_cast<float>(rows);
  std::fill(mean, mean + n, 0.0f);
  std::fill(rstd, rstd + n, 0.0f);
  for (int64_t c = 0; c < rows; ++c) {
    for (int64_t j = 0; j < n; ++j) mean[j] += x[c * n + j];
  }
  for (int64_t j = 0; j < n; ++j) mean[j] *= inv;
  for (int64_t c = 0; c < rows; ++c) {
    for (int64_t j = 0; j < n; ++j) {
      const float d = x[c * n + j] - mean[j];
      rstd[j] += d * d;
    }
  }
  for (int64_t j = 0; j < n; ++j) rstd[j] = 1.0f / std::sqrt(rstd[j] * inv + eps);
}

DDPM_VECTOR_CLONES
void ChannelNormForwardSample(const float *x, const float *g, int64_t rows, int64_t n, float eps, float *y,
                              float *mean, float *rstd) {
  ColumnMoments(x, rows, n, eps, mean, rstd);
  for (int64_t c = 0; c < rows; ++c) {
    for (int64_t j = 0; j < n; ++j) y[c * n + j] = (x[c * n + j] - mean[j]) * rstd[j] * g[c];
  }
}

// x_hat = (x - mean) rstd, h = dy g per column:  dx = rstd (h - mean_c h - x_hat mean_c(h x_hat)),
// dg[c] += sum_j dy x_hat (in double, per sample, added up over samples by the caller).
DDPM_VECTOR_CLONES
void ChannelNormBackwardSample(const float *x, const float *g, const float *dy, int64_t rows, int64_t n, float eps,
                               float *dx, double *dg, float *mean, float *rstd, float *mean_h, float *mean_hx) {
  ColumnMoments(x, rows, n, eps, mean, rstd);
  std::fill(mean_h, mean_h + n, 0.0f);
  std::fill(mean_hx, mean_hx + n, 0.0f);
  for (int64_t c = 0; c < rows; ++c) {
    const float *xr = x + c * n, *dyr = dy + c * n;
    float lanes[ddpm::kLanes] = {};
    int64_t j = 0;
    for (; j + ddpm::kLanes <= n; j += ddpm::kLanes) {
      for (int l = 0; l < ddpm::kLanes; ++l) {
        const float x_hat = (xr[j + l] - mean[j + l]) * rstd[j + l], h = dyr[j + l] * g[c];
        mean_h[j + l] += h;
        mean_hx[j + l] += h * x_hat;
        lanes[l] += dyr[j + l] * x_hat;
      }
    }
    double sum = 0.0;
    for (; j < n; ++j) {
      const float x_hat = (xr[j] - mean[j]) * rstd[j], h = dyr[j] * g[c];
      mean_h[j] += h;
      mean_hx[j] += h * x_hat;
      sum += dyr[j] * x_hat;
    }
    for (int l = 0; l < ddpm::kLanes; ++l) sum += lanes[l];
    dg[c] += sum;
  }
  const float inv = 1.0f / static_cast<float>(rows);
  for (int64_t c = 0; c < rows; ++c) {
    for (int64_t j = 0; j < n; ++j) {
      const float x_hat = (x[c * n + j] - mean[j]) * rstd[j];
      dx[c * n + j] = rstd[j] * (dy[c * n + j] * g[c] - mean_h[j] * inv - x_hat * mean_hx[j] * inv);
    }
  }
}

struct NormShape {
  int64_t batch, channels, spatial;
};

void ChannelNormForward(const NormShape &s, const float *x, const float *g, float eps, float *y) {
  const int64_t size = s.channels * s.spatial;
  ParallelRange(s.batch, [&](int64_t b0, int64_t b1) {
    std::vector<float> stats(2 * s.spatial);
    for (int64_t b = b0; b < b1; ++b) {
      ChannelNormForwardSample(x + b * size, g, s.channels, s.spatial, eps, y + b * size, stats.data(),
                               stats.data() + s.spatial);
    }
  });
}

void ChannelNormBackward(const NormShape &s, const float *x, const float *g, const float *dy, float eps, float *dx,
                         float *dg) {
  const int64_t size = s.channels * s.spatial;
  std::vector<double> dg_parts(s.batch * s.channels, 0.0);  // per sample, summed in a fixed order below
  ParallelRange(s.batch, [&](int64_t b0, int64_t b1) {
    std::vector<float> stats(4 * s.spatial);
    float *st = stats.data();
    for (int64_t b = b0; b < b1; ++b) {
      ChannelNormBackwardSample(x + b * size, g, dy + b * size, s.channels, s.spatial, eps, dx + b * size,
                                dg_parts.data() + b * s.channels, st, st + s.spatial, st + 2 * s.spatial,
                                st + 3 * s.spatial);
    }
  });
  for (int64_t c = 0; c < s.channels; ++c) {
    double sum = 0.0;
    for (int64_t b = 0; b < s.batch; ++b) sum += dg_parts[b * s.channels + c];
    dg[c] = static_cast<float>(sum);
  }
}

// ---- Softmaxes over the rows or the columns of a (rows, n) block, and their gradients.

// y = softmax of each column of x (over the rows), times `scale`.
DDPM_VECTOR_CLONES
void SoftmaxColumns(const float *x, int64_t rows, int64_t n, float scale, float *y, float *work) {
  float *top = work, *sum = work + n;
  std::copy(x, x + n, top);
  for (int64_t r = 1; r < rows; ++r) {
    for (int64_t j = 0; j < n; ++j) top[j] = std::max(top[j], x[r * n + j]);
  }
  std::fill(sum, sum + n, 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < n; ++j) {
      const float e = FastExp(x[r * n + j] - top[j]);
      y[r * n + j] = e;
      sum[j] += e;
    }
  }
  for (int64_t j = 0; j < n; ++j) sum[j] = scale / sum[j];
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < n; ++j) y[r * n + j] *= sum[j];
  }
}

// dx = y (dy - sum_rows(dy y)) per column, for y = softmax of x's columns (unscaled).
DDPM_VECTOR_CLONES
void SoftmaxColumnsBackward(const float *y, const float *dy, int64_t rows, int64_t n, float *dx, float *work) {
  std::fill(work, work + n, 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < n; ++j) work[j] += dy[r * n + j] * y[r * n + j];
  }
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < n; ++j) dx[r * n + j] = y[r * n + j] * (dy[r * n + j] - work[j]);
  }
}

// y = softmax of each row of x (over its n values).
DDPM_VECTOR_CLONES
void SoftmaxRows(const float *x, int64_t rows, int64_t n, float *y) {
  for (int64_t r = 0; r < rows; ++r) {
    const float *xr = x + r * n;
    float *yr = y + r * n;
    const float top = *std::max_element(xr, xr + n);
    for (int64_t j = 0; j < n; ++j) yr[j] = FastExp(xr[j] - top);
    const float inv = static_cast<float>(1.0 / BlockedSum(n, [&](int64_t j) { return yr[j]; }));
    for (int64_t j = 0; j < n; ++j) yr[j] *= inv;
  }
}

// dx = y (dy - sum_j(dy y)) per row.
DDPM_VECTOR_CLONES
void SoftmaxRowsBackward(const float *y, const float *dy, int64_t rows, int64_t n, float *dx) {
  for (int64_t r = 0; r < rows; ++r) {
    const float *yr = y + r * n, *dyr = dy + r * n;
    const float dot = static_cast<float>(BlockedSum(n, [&](int64_t j) { return dyr[j] * yr[j]; }));
    for (int64_t j = 0; j < n; ++j) dx[r * n + j] = yr[j] * (dyr[j] - dot);
  }
}

// ---- The attention cores, per (sample, head) of the (B, 3 * heads * d, n) qkv.

struct HeadShape {
  int64_t batch, heads, d, n;
  int64_t Tasks() const { return batch * heads; }
  // q, k, v of task t (d x n each); in the gradient dqkv too, at the same offsets
  int64_t Q(int64_t t) const { return ((t / heads) * 3 * heads + t % heads) * d * n; }
  int64_t K(int64_t t) const { return Q(t) + heads * d * n; }
  int64_t V(int64_t t) const { return Q(t) + 2 * heads * d * n; }
  int64_t Out(int64_t t) const { return t * d * n; }  // (B, heads, d, n)
};

// Linear attention (Shen et al., 2018) of one head, all (d, n) row-major:
//   qs = softmax_d(q), ks = softmax_n(k), context = ks v^T / n (d x d), out = scale context^T qs.
struct LinearHead {
  const HeadShape &s;
  std::vector<float> buffer;
  float *qs, *ks, *context, *work, *dcontext, *dqs, *dks;

  explicit LinearHead(const HeadShape &shape) : s(shape), buffer(4 * s.d * s.n + 2 * s.d * s.d + 2 * s.n) {
    float *p = buffer.data();
    for (float **slot : {&qs, &ks, &dqs, &dks}) *slot = p, p += s.d * s.n;
    for (float **slot : {&context, &dcontext}) *slot = p, p += s.d * s.d;
    work = p;
  }

  void Forward(const float *q, const float *k, const float *v, float scale, float *out) {
    SoftmaxColumns(q, s.d, s.n, 1.0f, qs, work);
    SoftmaxRows(k, s.d, s.n, ks);
    Gemm('N', 'T', s.d, s.d, s.n, 1.0f / s.n, ks, v, context);  // (d, n) (n, d) -> (d, d)
    Gemm('T', 'N', s.d, s.n, s.d, scale, context, qs, out);      // (d, d)^T (d, n) -> (d, n)
  }

  void Backward(const float *q, const float *k, const float *v, const float *dout, float scale, float *dq, float *dk,
                float *dv) {
    const float inv_n = 1.0f / s.n;
    SoftmaxColumns(q, s.d, s.n, 1.0f, qs, work);
    SoftmaxRows(k, s.d, s.n, ks);
    Gemm('N', 'T', s.d, s.d, s.n, inv_n, ks, v, context);
    Gemm('N', 'N', s.d, s.n, s.d, scale, context, dout, dqs);    // d qs = scale context dout
    Gemm('N', 'T', s.d, s.d, s.n, scale, qs, dout, dcontext);    // d context = scale qs dout^T
    Gemm('N', 'N', s.d, s.n, s.d, inv_n, dcontext, v, dks);      // d ks = d context v / n
    Gemm('T', 'N', s.d, s.n, s.d, inv_n, dcontext, ks, dv);      // dv = d context^T ks / n
    SoftmaxRowsBackward(ks, dks, s.d, s.n, dk);
    SoftmaxColumnsBackward(qs, dqs, s.d, s.n, dq, work);
  }
};

// Full attention of one head: p = softmax_rows(scale q^T k) (n x n), out = v p^T (d x n).
struct FullHead {
  const HeadShape &s;
  std::vector<float> buffer;
  float *p, *dp, *ds;

  explicit FullHead(const HeadShape &shape) : s(shape), buffer(3 * s.n * s.n) {
    p = buffer.data(), dp = p + s.n * s.n, ds = dp + s.n * s.n;
  }

  void Forward(const float *q, const float *k, const float *v, float scale, float *out) {
    Gemm('T', 'N', s.n, s.n, s.d, scale, q, k, dp);  // (d, n)^T (d, n) -> (n, n) scores
    SoftmaxRows(dp, s.n, s.n, p);
    Gemm('N', 'T', s.d, s.n, s.n, 1.0f, v, p, out);  // (d, n) (n, n)^T -> (d, n)
  }

  void Backward(const float *q, const float *k, const float *v, const float *dout, float scale, float *dq, float *dk,
                float *dv) {
    Forward(q, k, v, scale, dv);                          // dv as scratch for out; p is what we need
    Gemm('T', 'N', s.n, s.n, s.d, 1.0f, dout, v, dp);     // dp = dout^T v
    Gemm('N', 'N', s.d, s.n, s.n, 1.0f, dout, p, dv);     // dv = dout p
    SoftmaxRowsBackward(p, dp, s.n, s.n, ds);             // d scores
    Gemm('N', 'T', s.d, s.n, s.n, scale, k, ds, dq);      // dq = scale k ds^T
    Gemm('N', 'N', s.d, s.n, s.n, scale, q, ds, dk);      // dk = scale q ds
  }
};

template <typename Head>
void AttentionForward(const HeadShape &s, const float *qkv, float scale, float *out) {
  ParallelRange(s.Tasks(), [&](int64_t t0, int64_t t1) {
    Head head(s);
    for (int64_t t = t0; t < t1; ++t) head.Forward(qkv + s.Q(t), qkv + s.K(t), qkv + s.V(t), scale, out + s.Out(t));
  });
}

template <typename Head>
void AttentionBackward(const HeadShape &s, const float *qkv, const float *dout, float scale, float *dqkv) {
  ParallelRange(s.Tasks(), [&](int64_t t0, int64_t t1) {
    Head head(s);
    for (int64_t t = t0; t < t1; ++t) {
      head.Backward(qkv + s.Q(t), qkv + s.K(t), qkv + s.V(t), dout + s.Out(t), scale, dqkv + s.Q(t),
                    dqkv + s.K(t), dqkv + s.V(t));
    }
  });
}

bool NormArgsValid(int *ndims, int64_t **shapes) {
  return ndims[0] == 4 && Elements(ndims[1], shapes[1]) == shapes[0][1];
}

NormShape NormShapeOf(const int64_t *x) { return {x[0], x[1], x[2] * x[3]}; }

// qkv (B, 3 * heads * d, H, W), scale (1,) float32, heads (1,) int64
bool HeadArgsValid(int nparam, const char **dtypes, int *ndims, int64_t **shapes, int scale_index) {
  for (int i = 0; i < nparam; ++i) {
    if (std::strcmp(dtypes[i], i == scale_index + 1 ? "int64" : "float32") != 0) return false;
  }
  return ndims[0] == 4 && Elements(ndims[scale_index], shapes[scale_index]) == 1 &&
         Elements(ndims[scale_index + 1], shapes[scale_index + 1]) == 1;
}

HeadShape HeadShapeOf(const int64_t *qkv, int64_t heads) {
  if (heads < 1 || qkv[1] % (3 * heads) != 0) throw std::invalid_argument("channels are not 3 * heads * d");
  return {qkv[0], heads, qkv[1] / (3 * heads), qkv[2] * qkv[3]};
}

template <typename Head>
int ForwardEntry(const char *op, int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam != 4 || !HeadArgsValid(nparam, dtypes, ndims, shapes, 1)) {
    return Fail(op, "expects float32 qkv (B, 3 * heads * d, H, W), scale (1,), int64 heads (1,)");
  }
  return Guarded(op, [&] {
    AttentionForward<Head>(HeadShapeOf(shapes[0], *static_cast<const int64_t *>(params[2])),
                           static_cast<const float *>(params[0]), *static_cast<const float *>(params[1]),
                           static_cast<float *>(params[3]));
  });
}

template <typename Head>
int BackwardEntry(const char *op, int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam != 5 || !HeadArgsValid(nparam, dtypes, ndims, shapes, 2)) {
    return Fail(op, "expects float32 qkv (B, 3 * heads * d, H, W), dout, scale (1,), int64 heads (1,)");
  }
  return Guarded(op, [&] {
    AttentionBackward<Head>(HeadShapeOf(shapes[0], *static_cast<const int64_t *>(params[3])),
                            static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
                            *static_cast<const float *>(params[2]), static_cast<float *>(params[4]));
  });
}

}  // namespace

// params: x, g, eps, y
extern "C" int ChannelNormForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                  void * /*stream*/, void * /*extra*/) {
  if (nparam != 4 || !AllFloat32(nparam, dtypes) || !NormArgsValid(ndims, shapes)) {
    return Fail("ChannelNormForward", "expects float32 x (B, C, H, W), g (1, C, 1, 1), eps (1,)");
  }
  return Guarded("ChannelNormForward", [&] {
    ChannelNormForward(NormShapeOf(shapes[0]), static_cast<const float *>(params[0]),
                       static_cast<const float *>(params[1]), *static_cast<const float *>(params[2]),
                       static_cast<float *>(params[3]));
  });
}

// params: x, g, dy, eps, dx, dg
extern "C" int ChannelNormBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                   void * /*stream*/, void * /*extra*/) {
  if (nparam != 6 || !AllFloat32(nparam, dtypes) || !NormArgsValid(ndims, shapes)) {
    return Fail("ChannelNormBackward", "expects float32 x (B, C, H, W), g (1, C, 1, 1), dy like x, eps (1,)");
  }
  return Guarded("ChannelNormBackward", [&] {
    ChannelNormBackward(NormShapeOf(shapes[0]), static_cast<const float *>(params[0]),
                        static_cast<const float *>(params[1]), static_cast<const float *>(params[2]),
                        *static_cast<const float *>(params[3]), static_cast<float *>(params[4]),
                        static_cast<float *>(params[5]));
  });
}

// params: qkv, scale, heads, out
extern "C" int LinearAttentionForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                      void * /*stream*/, void * /*extra*/) {
  return ForwardEntry<LinearHead>("LinearAttentionForward", nparam, params, ndims, shapes, dtypes);
}

// params: qkv, dout, scale, heads, dqkv
extern "C" int LinearAttentionBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                       void * /*stream*/, void * /*extra*/) {
  return BackwardEntry<LinearHead>("LinearAttentionBackward", nparam, params, ndims, shapes, dtypes);
}

// params: qkv, scale, heads, out
extern "C" int AttentionForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                void * /*stream*/, void * /*extra*/) {
  return ForwardEntry<FullHead>("AttentionForward", nparam, params, ndims, shapes, dtypes);
}

// params: qkv, dout, scale, heads, dqkv
extern "C" int AttentionBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                 void * /*stream*/, void * /*extra*/) {
  return BackwardEntry<FullHead>("AttentionBackward", nparam, params, ndims, shapes, dtypes);
}
