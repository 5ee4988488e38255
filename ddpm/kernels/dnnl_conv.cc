// 2-D convolutions (plain, grouped, depthwise, transposed) for MindSpore's CPU backend as
// custom "aot" operators, run by the oneDNN that MindSpore itself ships (libdnnl.so.3).
//
// Why: MindSpore 2.10 describes every conv tensor to oneDNN as plain NCHW with plain weights,
// so oneDNN can only pick its slow im2col + GEMM kernels. Here activations and weights are
// reordered to layouts oneDNN has direct JIT kernels for (blocked or NHWC; see ChooseLayout),
// which is several times faster for the depthwise convs (docs/performance.md has the figures). Tensors in and out stay MindSpore's NCHW and
// (O, I/groups, kH, kW) weights, so the Python side is a drop-in for ops.Conv2D.
//
// Operators (MindSpore aot signature: inputs, then outputs; float32 tensors only):
//   ConvForward(x, w, cfg) -> y
//   ConvBackward(x, w, dy, cfg) -> (dx, dw)
// cfg is an int64 tensor: stride_h, stride_w, pad_top, pad_left, pad_bottom, pad_right, groups,
// transposed (0/1), bf16 (0/1). A transposed conv is the adjoint of the conv from y's shape to x's
// shape. With bf16 the primitives read bfloat16 sources, weights and incoming gradients (the
// reorders into their layouts convert, round to nearest even) and write float32 outputs and
// gradients, accumulating in float32: oneDNN's AVX512_BF16 / AMX kernels.
// Primitives are created once per shape and kept; calls are serialised by one mutex because the
// staging buffers and the thread pool are shared.
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "oneapi/dnnl/dnnl_threadpool.hpp"
#include "runtime.h"

#if DNNL_CPU_RUNTIME != DNNL_RUNTIME_THREADPOOL
#error "build with the threadpool dnnl_config.h that ddpm/kernels/build.py writes (MindSpore's libdnnl runtime)"
#endif

namespace {

using ddpm::Fail;
using ddpm::Guarded;
using ddpm::SharedPool;
using ddpm::ThreadPool;
using dnnl::memory;
using tag = memory::format_tag;
using dims = memory::dims;

constexpr int kConfigLength = 9;
constexpr size_t kAlignment = 64;  // one cache line; oneDNN's JIT kernels want aligned buffers

// Staging buffers shared by all plans (calls are serialised), so memory grows with the largest
// shape seen rather than with the number of shapes.
enum Slot { kSrc, kSrc2, kWeights, kDst, kDst2, kDiffWeights, kScratch, kSlots };

class Arena {
 public:
  ~Arena() {
    for (auto &b : buffers_) std::free(b.data);
  }
  void *Get(Slot slot, size_t bytes) {
    Buffer &b = buffers_[slot];
    if (bytes > b.size) {
      std::free(b.data);
      b.size = (bytes + kAlignment - 1) / kAlignment * kAlignment;
      b.data = std::aligned_alloc(kAlignment, b.size);
      if (b.data == nullptr) throw std::bad_alloc();
    }
    return b.data;
  }

 private:
  struct Buffer {
    void *data = nullptr;
    size_t size = 0;
  };
  Buffer buffers_[kSlots];
};

struct Runtime {
  dnnl::engine engine{dnnl::engine::kind::cpu, 0};
  ThreadPool &pool = SharedPool();
  dnnl::stream stream = dnnl::threadpool_interop::make_stream(engine, &pool);
  Arena arena;
};

Runtime &GetRuntime() {
  static Runtime runtime;
  return runtime;
}

// An operand in a primitive's layout, and the MindSpore tensor it was staged from.
struct Staged {
  void *data = nullptr;
  memory mem;
};

// A conversion between MindSpore's plain layout and the layout a primitive chose; the identity
// when they already agree.
class Layout {
 public:
  Layout() = default;
  Layout(const memory::desc &plain, const memory::desc &inner, bool to_inner)
      : plain_(plain), inner_(inner), identity_(plain == inner) {
    if (identity_) return;
    auto &rt = GetRuntime();
    reorder_ = to_inner ? dnnl::reorder(dnnl::reorder::primitive_desc(rt.engine, plain, rt.engine, inner))
                        : dnnl::reorder(dnnl::reorder::primitive_desc(rt.engine, inner, rt.engine, plain));
  }
  // MindSpore's tensor at `data` in the primitive's layout (reordered into `slot` if needed),
  // or `prior` when that already holds the same tensor in the same layout.
  Staged In(void *data, Slot slot, const Staged &prior = {}) const {
    auto &rt = GetRuntime();
    if (prior.data == data && prior.mem.get(true) != nullptr && prior.mem.get_desc() == inner_) return prior;
    memory user(plain_, rt.engine, data);
    if (identity_) return {data, user};
    memory inner(inner_, rt.engine, rt.arena.Get(slot, inner_.get_size()));
    reorder_.execute(rt.stream, user, inner);
    return {data, inner};
  }
  // Where the primitive writes an output that Out() then copies to MindSpore's tensor at `data`.
  memory Target(void *data, Slot slot) const {
    auto &rt = GetRuntime();
    if (identity_) return memory(plain_, rt.engine, data);
    return memory(inner_, rt.engine, rt.arena.Get(slot, inner_.get_size()));
  }
  void Out(memory target, void *data) const {
    if (identity_) return;
    auto &rt = GetRuntime();
    memory user(plain_, rt.engine, data);
    reorder_.execute(rt.stream, target, user);
  }

 private:
  memory::desc plain_, inner_;
  bool identity_ = true;
  dnnl::reorder reorder_;
};

// The underlying conv maps `src` to `dst`; a transposed conv runs it backwards.
struct Geometry {
  dims src, weights, dst, strides, pad_begin, pad_end;
  int64_t groups;
  bool transposed;
  bool bf16;

  std::vector<int64_t> Key() const {
    std::vector<int64_t> key{groups, transposed, bf16};
    for (const dims *d : {&src, &weights, &dst, &strides, &pad_begin, &pad_end}) {
      key.push_back(static_cast<int64_t>(d->size()));
      key.insert(key.end(), d->begin(), d->end());
    }
    return key;
  }
};

dims Shape(int ndim, const int64_t *shape) { return dims(shape, shape + ndim); }

Geometry MakeGeometry(const dims &x, const dims &w, const dims &y, const int64_t *cfg) {
  Geometry g;
  g.strides = {cfg[0], cfg[1]};
  g.pad_begin = {cfg[2], cfg[3]};
  g.pad_end = {cfg[4], cfg[5]};
  g.groups = cfg[6];
  g.transposed = cfg[7] != 0;
  g.bf16 = cfg[8] != 0;
  g.src = g.transposed ? y : x;
  g.dst = g.transposed ? x : y;
  // MindSpore's (O, I/groups, kH, kW) is oneDNN's goihw with O split into (groups, O/groups).
  g.weights = g.groups == 1 ? w : dims{g.groups, w[0] / g.groups, w[1], w[2], w[3]};
  return g;
}

memory::desc Plain(const dims &d) {
  tag t = d.size() == 5 ? tag::goihw : tag::nchw;  // nchw and oihw are the same 4-d plain layout
  return memory::desc(d, memory::data_type::f32, t);
}

memory::desc Any(const dims &d, tag t, memory::data_type type = memory::data_type::f32) {
  return memory::desc(d, type, t);
}

dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);  // from the arena, not per call
  return attr;
}

// Primitive creation sizes its work for the current max concurrency; make it our pool's and
// restore the caller's (MindSpore's own oneDNN calls on this thread read it too).
class ConcurrencyScope {
 public:
  explicit ConcurrencyScope(int threads) {
    dnnl_threadpool_interop_get_max_concurrency(&saved_);
    dnnl_threadpool_interop_set_max_concurrency(threads);
  }
  ~ConcurrencyScope() { dnnl_threadpool_interop_set_max_concurrency(saved_); }

 private:
  int saved_ = 1;
};

// Activations in the layout oneDNN prefers ("any": blocked by 8 channels with AVX2), whose
// reorders from NCHW are also the cheapest; but where its best kernel for that layout is an
// im2col + GEMM one (depthwise weight gradients) the NHWC layout, which has a direct kernel.
// Weights are always "any". Primitive creation throws if neither layout has an implementation.
template <typename MakeDesc>
auto ChooseLayout(MakeDesc make) -> decltype(make(tag::any)) {
  auto preferred = make(tag::any);
  if (std::strstr(preferred.impl_info_str(), "gemm") == nullptr) return preferred;
  return make(tag::nhwc);
}

// The three primitives of one conv shape, each created on first need, with their layouts.
class ConvPlan {
 public:
  explicit ConvPlan(const Geometry &g) : g_(g) {
    auto &rt = GetRuntime();
    ConcurrencyScope scope(rt.pool.get_num_threads());
    hint_ = ChooseLayout([&](tag activations) {
      return dnnl::convolution_forward::primitive_desc(
          rt.engine, dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
          Any(g.src, activations, in_), Any(g.weights, tag::any, in_), Any(g.dst, activations), g.strides,
          g.pad_begin, g.pad_end, UserScratchpad());
    });
  }

  // dst = conv(src, weights); returns the staged src for BackwardWeights.
  Staged Forward(void *src, void *weights, void *dst) {
    if (!fwd_) MakeForward();
    Staged s = fwd_src_.In(src, kSrc), w = fwd_weights_.In(weights, kWeights);
    memory d = fwd_dst_.Target(dst, kDst);
    Execute(fwd_, fwd_pd_.scratchpad_desc(),
            {{DNNL_ARG_SRC, s.mem}, {DNNL_ARG_WEIGHTS, w.mem}, {DNNL_ARG_DST, d}});
    fwd_dst_.Out(d, dst);
    return s;
  }

  // diff_src = conv^T(diff_dst, weights); returns the staged diff_dst for BackwardWeights.
  Staged BackwardData(void *diff_dst, void *weights, void *diff_src) {
    if (!bwd_data_) MakeBackwardData();
    Staged dd = data_diff_dst_.In(diff_dst, kDst), w = data_weights_.In(weights, kWeights);
    memory ds = data_diff_src_.Target(diff_src, kSrc);
    Execute(bwd_data_, data_pd_.scratchpad_desc(),
            {{DNNL_ARG_DIFF_DST, dd.mem}, {DNNL_ARG_WEIGHTS, w.mem}, {DNNL_ARG_DIFF_SRC, ds}});
    data_diff_src_.Out(ds, diff_src);
    return dd;
  }

  // diff_weights of <conv(src, weights), diff_dst>; `prior` (an operand the previous call staged)
  // saves reordering the same tensor twice.
  void BackwardWeights(void *src, void *diff_dst, void *diff_weights, const Staged &prior) {
    if (!bwd_weights_) MakeBackwardWeights();
    Staged s = weights_src_.In(src, kSrc2, prior), dd = weights_diff_dst_.In(diff_dst, kDst2, prior);
    memory dw = weights_diff_weights_.Target(diff_weights, kDiffWeights);
    Execute(bwd_weights_, weights_pd_.scratchpad_desc(),
            {{DNNL_ARG_SRC, s.mem}, {DNNL_ARG_DIFF_DST, dd.mem}, {DNNL_ARG_DIFF_WEIGHTS, dw}});
    weights_diff_weights_.Out(dw, diff_weights);
  }

 private:
  void Execute(dnnl::primitive &p, const memory::desc &scratch_md, std::unordered_map<int, memory> args) {
    auto &rt = GetRuntime();
    args.insert({DNNL_ARG_SCRATCHPAD, memory(scratch_md, rt.engine, rt.arena.Get(kScratch, scratch_md.get_size()))});
    p.execute(rt.stream, args);
    rt.stream.wait();
  }

  void MakeForward() {
    ConcurrencyScope scope(GetRuntime().pool.get_num_threads());
    fwd_pd_ = hint_;
    fwd_src_ = Layout(Plain(g_.src), fwd_pd_.src_desc(), true);
    fwd_weights_ = Layout(Plain(g_.weights), fwd_pd_.weights_desc(), true);
    fwd_dst_ = Layout(Plain(g_.dst), fwd_pd_.dst_desc(), false);
    fwd_ = dnnl::convolution_forward(fwd_pd_);
  }

  void MakeBackwardData() {
    auto &rt = GetRuntime();
    ConcurrencyScope scope(rt.pool.get_num_threads());
    data_pd_ = ChooseLayout([&](tag activations) {
      return dnnl::convolution_backward_data::primitive_desc(
          rt.engine, dnnl::algorithm::convolution_direct, Any(g_.src, activations), Any(g_.weights, tag::any, in_),
          Any(g_.dst, activations, in_), g_.strides, g_.pad_begin, g_.pad_end, hint_, UserScratchpad());
    });
    data_diff_dst_ = Layout(Plain(g_.dst), data_pd_.diff_dst_desc(), true);
    data_weights_ = Layout(Plain(g_.weights), data_pd_.weights_desc(), true);
    data_diff_src_ = Layout(Plain(g_.src), data_pd_.diff_src_desc(), false);
    bwd_data_ = dnnl::convolution_backward_data(data_pd_);
  }

  void MakeBackwardWeights() {
    auto &rt = GetRuntime();
    ConcurrencyScope scope(rt.pool.get_num_threads());
    weights_pd_ = ChooseLayout([&](tag activations) {
      return dnnl::convolution_backward_weights::primitive_desc(
          rt.engine, dnnl::algorithm::convolution_direct, Any(g_.src, activations, in_), Any(g_.weights, tag::any),
          Any(g_.dst, activations, in_), g_.strides, g_.pad_begin, g_.pad_end, hint_, UserScratchpad());
    });
    weights_src_ = Layout(Plain(g_.src), weights_pd_.src_desc(), true);
    weights_diff_dst_ = Layout(Plain(g_.dst), weights_pd_.diff_dst_desc(), true);
    weights_diff_weights_ = Layout(Plain(g_.weights), weights_pd_.diff_weights_desc(), false);
    bwd_weights_ = dnnl::convolution_backward_weights(weights_pd_);
  }

  Geometry g_;
  // What the primitives read (sources, weights, incoming gradients): bf16 or f32; they write f32.
  memory::data_type in_ = g_.bf16 ? memory::data_type::bf16 : memory::data_type::f32;
  dnnl::convolution_forward::primitive_desc hint_, fwd_pd_;
  dnnl::convolution_backward_data::primitive_desc data_pd_;
  dnnl::convolution_backward_weights::primitive_desc weights_pd_;
  dnnl::primitive fwd_, bwd_data_, bwd_weights_;
  Layout fwd_src_, fwd_weights_, fwd_dst_;
  Layout data_diff_dst_, data_weights_, data_diff_src_;
  Layout weights_src_, weights_diff_dst_, weights_diff_weights_;
};

ConvPlan &GetPlan(const Geometry &g) {
  static std::map<std::vector<int64_t>, std::unique_ptr<ConvPlan>> plans;
  auto &plan = plans[g.Key()];
  if (!plan) plan = std::make_unique<ConvPlan>(g);
  return *plan;
}

bool AllFloat32(int nparam, const char **dtypes, int config_index) {
  for (int i = 0; i < nparam; ++i) {
    if (i != config_index && std::strcmp(dtypes[i], "float32") != 0) return false;
  }
  return std::strcmp(dtypes[config_index], "int64") == 0;
}

// "ConvForward 3x3", "ConvBackward 7x7 depthwise", ... for the DDPM_KERNEL_PROFILE summary.
std::string ProfileLabel(const char *op, int w_ndim, const int64_t *w_shape, const int64_t *cfg) {
  if (!ddpm::KernelProfile::Get().enabled() || w_ndim != 4) return {};
  std::string label = std::string(op) + " " + std::to_string(w_shape[2]) + "x" + std::to_string(w_shape[3]);
  if (cfg[6] > 1) label += " depthwise";
  if (cfg[7] != 0) label += " transposed";
  if (cfg[0] > 1) label += " stride " + std::to_string(cfg[0]);
  if (cfg[8] != 0) label += " bf16";
  return label;
}

}  // namespace

// params: x, w, cfg, y
extern "C" int ConvForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                           void * /*stream*/, void * /*extra*/) {
  if (nparam != 4 || !AllFloat32(nparam, dtypes, 2) || shapes[2][0] != kConfigLength) {
    return Fail("ConvForward", "expects float32 x, w, y and an int64 config of length 9");
  }
  return Guarded("ConvForward", [&] {
    const int64_t *cfg = static_cast<const int64_t *>(params[2]);
    Geometry g = MakeGeometry(Shape(ndims[0], shapes[0]), Shape(ndims[1], shapes[1]),
                              Shape(ndims[3], shapes[3]), cfg);
    ConvPlan &plan = GetPlan(g);
    if (g.transposed) {
      plan.BackwardData(params[0], params[1], params[3]);
    } else {
      plan.Forward(params[0], params[1], params[3]);
    }
  }, ProfileLabel("ConvForward", ndims[1], shapes[1], static_cast<const int64_t *>(params[2])));
}

// params: x, w, dy, cfg, dx, dw
extern "C" int ConvBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                            void * /*stream*/, void * /*extra*/) {
  if (nparam != 6 || !AllFloat32(nparam, dtypes, 3) || shapes[3][0] != kConfigLength) {
    return Fail("ConvBackward", "expects float32 x, w, dy, dx, dw and an int64 config of length 9");
  }
  return Guarded("ConvBackward", [&] {
    const int64_t *cfg = static_cast<const int64_t *>(params[3]);
    Geometry g = MakeGeometry(Shape(ndims[0], shapes[0]), Shape(ndims[1], shapes[1]),
                              Shape(ndims[2], shapes[2]), cfg);
    ConvPlan &plan = GetPlan(g);
    void *x = params[0], *w = params[1], *dy = params[2], *dx = params[4], *dw = params[5];
    if (g.transposed) {  // y = conv^T(x): dx = conv(dy), dw pairs dy (the conv's src) with x (its dst)
      Staged staged_dy = plan.Forward(dy, w, dx);
      plan.BackwardWeights(dy, x, dw, staged_dy);
    } else {
      Staged staged_dy = plan.BackwardData(dy, w, dx);
      plan.BackwardWeights(x, dy, dw, staged_dy);
    }
  }, ProfileLabel("ConvBackward", ndims[1], shapes[1], static_cast<const int64_t *>(params[3])));
}
