// Native 2x2 max-pooling with stride 2 (the classifier's nn.MaxPool2d(2, 2)), float32, NCHW.
// MindSpore 2.10's CPU MaxPoolGrad takes 25 ms a call at the classifier's shapes (batch 128):
// 40% of its training step. An odd last row or column is dropped, as MindSpore's "valid" pad does.
//
// Operators (MindSpore aot signature: inputs, then outputs):
//   MaxPool2x2Forward(x) -> y                 x (B, C, H, W), y (B, C, H / 2, W / 2)
//   MaxPool2x2Backward(x, dy) -> dx           dy like y, dx like x
// The backward recomputes each window's maximum from x and sends dy to its first position in
// row-major order (MindSpore's and PyTorch's rule for ties; after a ReLU all-zero windows are common).
#include <cstdint>
#include <cstring>

#include "runtime.h"

namespace {

using ddpm::AllFloat32;
using ddpm::Fail;
using ddpm::Guarded;
using ddpm::ParallelRange;

struct Planes {
  int64_t count, h, w;  // B * C planes of h x w; the output's are (h / 2) x (w / 2)
};

bool ValidShape(int ndim, const int64_t *shape) { return ndim == 4 && shape[2] >= 2 && shape[3] >= 2; }

Planes PlanesOf(const int64_t *shape) { return {shape[0] * shape[1], shape[2], shape[3]}; }

// Index in the plane of the first maximum of the window whose top-left corner is (2i, 2j).
inline int64_t ArgMax(const float *plane, int64_t w, int64_t i, int64_t j) {
  const int64_t top = 2 * i * w + 2 * j, candidates[4] = {top, top + 1, top + w, top + w + 1};
  int64_t best = candidates[0];
  for (int k = 1; k < 4; ++k) {
    if (plane[candidates[k]] > plane[best]) best = candidates[k];  // strict: the first maximum wins ties
  }
  return best;
}

void Forward(const Planes &p, const float *x, float *y) {
  const int64_t oh = p.h / 2, ow = p.w / 2;
  ParallelRange(p.count, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float *plane = x + n * p.h * p.w;
      float *out = y + n * oh * ow;
      for (int64_t i = 0; i < oh; ++i) {
        for (int64_t j = 0; j < ow; ++j) out[i * ow + j] = plane[ArgMax(plane, p.w, i, j)];
      }
    }
  });
}

// Writes every dx value once, row pair by row pair: dy where the window's first maximum is, else 0.
void Backward(const Planes &p, const float *x, const float *dy, float *dx) {
  const int64_t oh = p.h / 2, ow = p.w / 2;
  ParallelRange(p.count, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float *plane = x + n * p.h * p.w, *grad = dy + n * oh * ow;
      float *out = dx + n * p.h * p.w;
      for (int64_t i = 0; i < oh; ++i) {
        float *top = out + 2 * i * p.w, *bottom = top + p.w;
        for (int64_t j = 0; j < ow; ++j) {
          const int64_t best = ArgMax(plane, p.w, i, j) - 2 * i * p.w - 2 * j;  // 0, 1, w or w + 1
          const float g = grad[i * ow + j];
          top[2 * j] = best == 0 ? g : 0.0f;
          top[2 * j + 1] = best == 1 ? g : 0.0f;
          bottom[2 * j] = best == p.w ? g : 0.0f;
          bottom[2 * j + 1] = best == p.w + 1 ? g : 0.0f;
        }
        if (p.w % 2) top[p.w - 1] = bottom[p.w - 1] = 0.0f;  // the dropped column
      }
      if (p.h % 2) std::memset(out + (p.h - 1) * p.w, 0, sizeof(float) * p.w);  // the dropped row
    }
  });
}

}  // namespace

// params: x, y
extern "C" int MaxPool2x2Forward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                 void * /*stream*/, void * /*extra*/) {
  if (nparam != 2 || !AllFloat32(nparam, dtypes) || !ValidShape(ndims[0], shapes[0])) {
    return Fail("MaxPool2x2Forward", "expects float32 x (B, C, H, W) with H, W >= 2");
  }
  return Guarded("MaxPool2x2Forward", [&] {
    Forward(PlanesOf(shapes[0]), static_cast<const float *>(params[0]), static_cast<float *>(params[1]));
  });
}

// params: x, dy, dx
extern "C" int MaxPool2x2Backward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                  void * /*stream*/, void * /*extra*/) {
  if (nparam != 3 || !AllFloat32(nparam, dtypes) || !ValidShape(ndims[0], shapes[0])) {
    return Fail("MaxPool2x2Backward", "expects float32 x (B, C, H, W) with H, W >= 2 and dy (B, C, H / 2, W / 2)");
  }
  return Guarded("MaxPool2x2Backward", [&] {
    Backward(PlanesOf(shapes[0]), static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
             static_cast<float *>(params[2]));
  });
}
