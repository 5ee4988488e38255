// Adam and the weights' EMA over all of a network's parameters, one operator each, updating the
// tensors in place: MindSpore's nn.Adam launches one Adam kernel per parameter tensor (166 in the
// U-Net) and the flat EMA reads the weights through two copies each (docs/performance.md,
// "Kernels per training step").
//
// Operators (MindSpore aot signature: inputs, then outputs; float32 only). The tensors they write
// are declared written to MindSpore (ddpm/kernels/optim.py), which orders them after every reader:
//   AdamStep(beta1_power, beta2_power, lr, beta1, beta2, eps, g[n], w[n], m[n], v[n]) -> done (1,)
//       beta1_power, beta2_power: beta1^t and beta2^t of this step (t counts from 1); writes w, m, v
//   EmaUpdate(decay, ema (N,), w[n]) -> done (1,)
//       ema: the averages of all n weights one after another (N their sizes' sum); writes ema
// Each element is computed by the float32 operations, in the order, of MindSpore's own kernels: nn.Adam's
// (nnacl's AdamFp32, vector path) and the EMA's expression ema * decay + w * (1 - decay).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "runtime.h"
#include "vector_math.h"

namespace {

using ddpm::AllFloat32;
using ddpm::Elements;
using ddpm::Fail;
using ddpm::Guarded;
using ddpm::ParallelRange;

constexpr int kAdamScalars = 6;
constexpr int kAdamGroups = 4;  // g, w, m, v

// Each product rounded on its own, as MindSpore's kernels round it: no fused multiply-adds here.
#define DDPM_NO_FMA __attribute__((optimize("fp-contract=off")))

struct AdamConstants {
  float lr_t, one_minus_beta1, one_minus_beta2, eps;
};

DDPM_VECTOR_CLONES DDPM_NO_FMA
void AdamRange(const AdamConstants &c, const float *g, float *w, float *m, float *v, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const float m_i = m[i] + (g[i] - m[i]) * c.one_minus_beta1;
    const float v_i = v[i] + (g[i] * g[i] - v[i]) * c.one_minus_beta2;
    m[i] = m_i;
    v[i] = v_i;
    w[i] = w[i] - (c.lr_t * m_i) / (std::sqrt(v_i) + c.eps);
  }
}

DDPM_VECTOR_CLONES DDPM_NO_FMA
void EmaRange(float decay, float one_minus_decay, const float *w, float *ema, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) ema[i] = ema[i] * decay + w[i] * one_minus_decay;
}

// Calls fn(k, offset, begin, end) for the parts [begin, end) of tensors k = 0..n-1 (sizes[k] elements
// each, starting at `offset` in their concatenation) that fall in each thread's share of the
// concatenation: every thread gets an equal number of elements.
template <typename Fn>
void OverAllTensors(const std::vector<int64_t> &sizes, Fn fn) {
  std::vector<int64_t> offsets(sizes.size() + 1, 0);
  for (size_t k = 0; k < sizes.size(); ++k) offsets[k + 1] = offsets[k] + sizes[k];
  ParallelRange(offsets.back(), [&](int64_t begin, int64_t end) {
    for (size_t k = 0; k < sizes.size(); ++k) {
      const int64_t a = std::max(begin, offsets[k]), b = std::min(end, offsets[k + 1]);
      if (a < b) fn(k, offsets[k], a - offsets[k], b - offsets[k]);
    }
  });
}

float Scalar(void **params, int i) { return *static_cast<const float *>(params[i]); }

}  // namespace

extern "C" int AdamStep(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                        void * /*stream*/, void * /*extra*/) {
  const int n = (nparam - kAdamScalars - 1) / kAdamGroups;
  if (n < 1 || nparam != kAdamScalars + kAdamGroups * n + 1 || !AllFloat32(nparam, dtypes)) {
    return Fail("AdamStep", "expects float32 scalars (6), then n gradients, weights, first and second moments");
  }
  std::vector<int64_t> sizes(n);
  for (int k = 0; k < n; ++k) {
    sizes[k] = Elements(ndims[kAdamScalars + k], shapes[kAdamScalars + k]);
    for (int group = 1; group < kAdamGroups; ++group) {
      const int j = kAdamScalars + group * n + k;
      if (Elements(ndims[j], shapes[j]) != sizes[k]) return Fail("AdamStep", "a gradient, weight and moments differ in size");
    }
  }
  return Guarded("AdamStep", [&] {
    const float beta1_power = Scalar(params, 0), beta2_power = Scalar(params, 1), lr = Scalar(params, 2);
    const float beta1 = Scalar(params, 3), beta2 = Scalar(params, 4), eps = Scalar(params, 5);
    const AdamConstants c{lr * std::sqrt(1.0f - beta2_power) / (1.0f - beta1_power), 1.0f - beta1, 1.0f - beta2, eps};
    auto tensor = [&](int group, int k) { return static_cast<float *>(params[kAdamScalars + group * n + k]); };
    OverAllTensors(sizes, [&](size_t k, int64_t /*offset*/, int64_t begin, int64_t end) {
      AdamRange(c, tensor(0, k), tensor(1, k), tensor(2, k), tensor(3, k), begin, end);
    });
    *static_cast<float *>(params[nparam - 1]) = 1.0f;
  });
}

extern "C" int EmaUpdate(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                         void * /*stream*/, void * /*extra*/) {
  const int n = nparam - 3;
  if (n < 1 || !AllFloat32(nparam, dtypes)) return Fail("EmaUpdate", "expects float32 decay, the averages, n weights");
  std::vector<int64_t> sizes(n);
  int64_t total = 0;
  for (int k = 0; k < n; ++k) total += sizes[k] = Elements(ndims[2 + k], shapes[2 + k]);
  if (Elements(ndims[1], shapes[1]) != total) return Fail("EmaUpdate", "the averages' size is not the weights' sum");
  return Guarded("EmaUpdate", [&] {
    const float decay = Scalar(params, 0), one_minus_decay = 1.0f - decay;
    float *ema = static_cast<float *>(params[1]);
    OverAllTensors(sizes, [&](size_t k, int64_t offset, int64_t begin, int64_t end) {
      EmaRange(decay, one_minus_decay, static_cast<const float *>(params[2 + k]), ema + offset, begin, end);
    });
    *static_cast<float *>(params[nparam - 1]) = 1.0f;
  });
}
