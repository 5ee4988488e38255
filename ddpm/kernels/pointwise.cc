// GroupNorm with one group and the tanh-approximated GELU, forward and backward, as MindSpore
// custom "aot" operators: one pass (or two) over memory where MindSpore's formulations run a
// dozen element-wise kernels, each reading and writing the whole activation.
//
// Operators (MindSpore aot signature: inputs, then outputs; float32 only):
//   GroupNormForward(x, gamma, beta, eps) -> y
//   GroupNormBackward(x, gamma, dy, eps) -> (dx, dgamma, dbeta)
//   GeluForward(x) -> y
//   GeluBackward(x, dy) -> dx
// x is (B, C, ...): each sample is normalised over all its C x ... values (GroupNorm(1, C)),
// then scaled and shifted per channel. Statistics are accumulated in double and recomputed in
// the backward pass from x (cheaper than keeping them: one more read of x).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

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

constexpr int64_t kMinParallel = 1 << 14;  // elements below which a second thread costs more than it saves

constexpr float kGeluScale = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluCubic = 0.044715f;            // Hendrycks & Gimpel (2016)

// GELU(x) = 0.5 x (1 + tanh u) = x s with s = sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3).
// In the sigmoid form both tails keep their precision: 1 + tanh u in float is 0 once u < -9,
// and the gradient's 1 - tanh^2 u = 4 s (1 - s) = 4 e s^2 with e = exp(-2u) is never a difference.
DDPM_VECTOR_CLONES
void GeluForwardRange(const float *x, float *y, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const float v = x[i];
    const float e = FastExp(-2.0f * kGeluScale * (v + kGeluCubic * v * v * v));
    y[i] = v / (1.0f + e);
  }
}

DDPM_VECTOR_CLONES
void GeluBackwardRange(const float *x, const float *dy, float *dx, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const float v = x[i];
    const float e = FastExp(-2.0f * kGeluScale * (v + kGeluCubic * v * v * v));
    const float s = 1.0f / (1.0f + e);
    const float du = kGeluScale * (1.0f + 3.0f * kGeluCubic * v * v);
    dx[i] = dy[i] * (s + 2.0f * v * ((e * s) * s) * du);
  }
}

void Parallel(int64_t n, const std::function<void(int64_t, int64_t)> &fn) {
  if (n < kMinParallel) {
    fn(0, n);
  } else {
    ParallelRange(n, fn);
  }
}

DDPM_VECTOR_CLONES
double Sum(const float *x, int64_t n) {
  return BlockedSum(n, [&](int64_t i) { return x[i]; });
}

DDPM_VECTOR_CLONES
double SumSquaredDeviation(const float *x, int64_t n, float mean) {
  return BlockedSum(n, [&](int64_t i) {
    const float d = x[i] - mean;
    return d * d;
  });
}

// sum dy * (x - mean): sum dy * x - mean * sum dy would cancel when |mean| >> std
DDPM_VECTOR_CLONES
double CenteredDot(const float *dy, const float *x, int64_t n, float mean) {
  return BlockedSum(n, [&](int64_t i) { return dy[i] * (x[i] - mean); });
}

struct Moments {
  double mean, rstd;
};

// Mean and 1/sqrt(var + eps) of one sample's n values (two passes: no cancellation).
Moments SampleMoments(const float *x, int64_t n, float eps) {
  const double mean = Sum(x, n) / static_cast<double>(n);
  const double var = SumSquaredDeviation(x, n, static_cast<float>(mean)) / static_cast<double>(n);
  return {mean, 1.0 / std::sqrt(var + eps)};
}

DDPM_VECTOR_CLONES
void AffineRow(const float *x, float *y, int64_t n, float scale, float shift) {
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * scale + shift;
}

DDPM_VECTOR_CLONES
void AxpbyRow(const float *dy, const float *x, float *dx, int64_t n, float a, float b, float c) {
  for (int64_t i = 0; i < n; ++i) dx[i] = a * dy[i] + b * x[i] + c;
}

struct NormShape {
  int64_t batch, channels, spatial;
};

NormShape ShapeOf(int ndim, const int64_t *shape) {
  NormShape s{shape[0], shape[1], 1};
  for (int d = 2; d < ndim; ++d) s.spatial *= shape[d];
  return s;
}

void GroupNormForward(const NormShape &s, const float *x, const float *gamma, const float *beta, float eps, float *y) {
  const int64_t n = s.channels * s.spatial;
  ParallelRange(s.batch, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float *xb = x + b * n;
      float *yb = y + b * n;
      const Moments m = SampleMoments(xb, n, eps);
      for (int64_t c = 0; c < s.channels; ++c) {
        const double scale = m.rstd * gamma[c];
        AffineRow(xb + c * s.spatial, yb + c * s.spatial, s.spatial, static_cast<float>(scale),
                  static_cast<float>(beta[c] - m.mean * scale));
      }
    }
  });
}

// x_hat = (x - mean) * rstd, g = dy * gamma[c] (n values per sample):
//   dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)),  dgamma[c] = sum dy * x_hat,  dbeta[c] = sum dy,
// with the sums per channel row first, so that dx = a_c * dy + b * x + c0 in one more pass.
void GroupNormBackward(const NormShape &s, const float *x, const float *gamma, const float *dy, float eps, float *dx,
                       float *dgamma, float *dbeta) {
  const int64_t n = s.channels * s.spatial, channels = s.channels;
  // per sample and channel: sum dy * x_hat and sum dy, summed over samples in a fixed order below
  std::vector<double> dgamma_parts(s.batch * channels), dbeta_parts(s.batch * channels);
  ParallelRange(s.batch, [&](int64_t b0, int64_t b1) {
    std::vector<double> sum_dy(channels), sum_dyx(channels);
    for (int64_t b = b0; b < b1; ++b) {
      const float *xb = x + b * n, *dyb = dy + b * n;
      const Moments m = SampleMoments(xb, n, eps);
      double mean_g = 0.0, mean_g_xhat = 0.0;
      for (int64_t c = 0; c < channels; ++c) {
        const float *xr = xb + c * s.spatial, *dyr = dyb + c * s.spatial;
        const double a = Sum(dyr, s.spatial);
        const double dy_xhat = m.rstd * CenteredDot(dyr, xr, s.spatial, static_cast<float>(m.mean));
        dgamma_parts[b * channels + c] = dy_xhat;
        dbeta_parts[b * channels + c] = a;
        mean_g += gamma[c] * a;
        mean_g_xhat += gamma[c] * dy_xhat;
      }
      mean_g /= static_cast<double>(n);
      mean_g_xhat /= static_cast<double>(n);
      const double slope = -m.rstd * m.rstd * mean_g_xhat;
      const double offset = m.rstd * (m.rstd * m.mean * mean_g_xhat - mean_g);
      for (int64_t c = 0; c < channels; ++c) {
        AxpbyRow(dyb + c * s.spatial, xb + c * s.spatial, dx + b * n + c * s.spatial, s.spatial,
                 static_cast<float>(m.rstd * gamma[c]), static_cast<float>(slope), static_cast<float>(offset));
      }
    }
  });
  for (int64_t c = 0; c < channels; ++c) {
    double g = 0.0, bsum = 0.0;
    for (int64_t b = 0; b < s.batch; ++b) {
      g += dgamma_parts[b * channels + c];
      bsum += dbeta_parts[b * channels + c];
    }
    dgamma[c] = static_cast<float>(g);
    dbeta[c] = static_cast<float>(bsum);
  }
}

bool NormArgsValid(int *ndims, int64_t **shapes) {
  return ndims[0] >= 2 && ndims[1] == 1 && shapes[1][0] == shapes[0][1] && Elements(ndims[3], shapes[3]) == 1;
}

}  // namespace

// params: x, gamma, beta, eps, y
extern "C" int GroupNormForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                void * /*stream*/, void * /*extra*/) {
  if (nparam != 5 || !AllFloat32(nparam, dtypes) || !NormArgsValid(ndims, shapes)) {
    return Fail("GroupNormForward", "expects float32 x (B, C, ...), gamma (C,), beta (C,), eps (1,)");
  }
  return Guarded("GroupNormForward", [&] {
    GroupNormForward(ShapeOf(ndims[0], shapes[0]), static_cast<const float *>(params[0]),
                     static_cast<const float *>(params[1]), static_cast<const float *>(params[2]),
                     *static_cast<const float *>(params[3]), static_cast<float *>(params[4]));
  });
}

// params: x, gamma, dy, eps, dx, dgamma, dbeta
extern "C" int GroupNormBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                 void * /*stream*/, void * /*extra*/) {
  if (nparam != 7 || !AllFloat32(nparam, dtypes) || !NormArgsValid(ndims, shapes)) {
    return Fail("GroupNormBackward", "expects float32 x (B, C, ...), gamma (C,), dy like x, eps (1,)");
  }
  return Guarded("GroupNormBackward", [&] {
    GroupNormBackward(ShapeOf(ndims[0], shapes[0]), static_cast<const float *>(params[0]),
                      static_cast<const float *>(params[1]), static_cast<const float *>(params[2]),
                      *static_cast<const float *>(params[3]), static_cast<float *>(params[4]),
                      static_cast<float *>(params[5]), static_cast<float *>(params[6]));
  });
}

// params: x, y
extern "C" int GeluForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                           void * /*stream*/, void * /*extra*/) {
  if (nparam != 2 || !AllFloat32(nparam, dtypes)) return Fail("GeluForward", "expects float32 x");
  return Guarded("GeluForward", [&] {
    const float *x = static_cast<const float *>(params[0]);
    float *y = static_cast<float *>(params[1]);
    Parallel(Elements(ndims[0], shapes[0]), [&](int64_t b, int64_t e) { GeluForwardRange(x, y, b, e); });
  });
}

// params: x, dy, dx
extern "C" int GeluBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                            void * /*stream*/, void * /*extra*/) {
  if (nparam != 3 || !AllFloat32(nparam, dtypes)) return Fail("GeluBackward", "expects float32 x and dy");
  return Guarded("GeluBackward", [&] {
    const float *x = static_cast<const float *>(params[0]), *dy = static_cast<const float *>(params[1]);
    float *dx = static_cast<float *>(params[2]);
    Parallel(Elements(ndims[0], shapes[0]), [&](int64_t b, int64_t e) { GeluBackwardRange(x, dy, dx, b, e); });
  });
}
