// 2-D float32 convolutions (NHWC input and output, HWIO kernel: flax's layouts) on oneDNN,
// exposed to XLA:CPU as three FFI handlers: forward, input gradient, weight gradient.
//
// Built by ljax/models/onednn.py on first use; see that module for why (XLA:CPU's own
// convolution kernels are 1.3-2.6x slower than oneDNN's on ResNet-32's shapes).
//
// Every handler takes the same attributes: strides, padding_lo, padding_hi, dilation (2 values
// each; dilation 1 means none). Primitive descriptors are cached per shape, so a step pays
// oneDNN's set-up once per layer shape and direction.
#include <cstdint>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;
using dims = dnnl::memory::dims;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

struct Geometry {
  dims src, wei, dst, strides, dilates, pad_l, pad_r;
  std::string Key(char direction) const {
    std::string key(1, direction);
    for (const dims* d : {&src, &wei, &dst, &strides, &dilates, &pad_l, &pad_r}) {
      for (auto v : *d) key += "," + std::to_string(v);
      key += ";";
    }
    return key;
  }
};

// oneDNN's logical dims are (N, C, H, W) and (O, I, KH, KW) whatever the memory format.
ffi::Error MakeGeometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w,
                        ffi::Span<const int64_t> y, ffi::Span<const int64_t> strides,
                        ffi::Span<const int64_t> lo, ffi::Span<const int64_t> hi,
                        ffi::Span<const int64_t> dilation, Geometry* g) {
  if (x.size() != 4 || w.size() != 4 || y.size() != 4 || strides.size() != 2 ||
      lo.size() != 2 || hi.size() != 2 || dilation.size() != 2) {
    return ffi::Error::InvalidArgument("ljax onednn conv: expected 2-D NHWC / HWIO operands");
  }
  g->src = {x[0], x[3], x[1], x[2]};
  g->wei = {w[3], w[2], w[0], w[1]};
  g->dst = {y[0], y[3], y[1], y[2]};
  g->strides = {strides[0], strides[1]};
  g->dilates = {dilation[0] - 1, dilation[1] - 1};
  g->pad_l = {lo[0], lo[1]};
  g->pad_r = {hi[0], hi[1]};
  return ffi::Error::Success();
}

struct Prims {
  dnnl::convolution_forward::primitive_desc fwd_pd;
  dnnl::primitive prim;
  // The layouts the primitive chose for the kernel (or its gradient) and the two activations
  // (for 'f': src, dst; 'd': diff_dst, diff_src; 'w': src, diff_dst).
  dnnl::memory::desc wei_md, a_md, out_md, scratch_md;
};

// Activations stay in XLA's NHWC: letting oneDNN pick (blocked layouts, with reorders) was no
// faster on ResNet-32's shapes and much slower on the input gradient at 8 channels, in a one-off
// comparison during development (not a shipped benchmark).
constexpr tag kAct = tag::nhwc;

std::mutex cache_mutex;
std::map<std::string, std::shared_ptr<Prims>> cache;

// Every primitive gets its scratchpad from the caller: with oneDNN's default (library-owned)
// scratchpad, primitives executed at the same time (XLA runs independent ops concurrently, and
// pmap runs one program per device) share one buffer and corrupt each other's results.
dnnl::primitive_attr Attr() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

// Copies src into dst's layout (a reorder primitive with its own scratchpad).
void Reorder(dnnl::stream& stream, dnnl::memory& src, dnnl::memory& dst) {
  auto pd = dnnl::reorder::primitive_desc(src, dst, Attr());
  dnnl::memory scratch(pd.scratchpad_desc(), Engine());
  dnnl::reorder(pd).execute(
      stream, {{DNNL_ARG_FROM, src}, {DNNL_ARG_TO, dst}, {DNNL_ARG_SCRATCHPAD, scratch}});
}

dnnl::convolution_forward::primitive_desc ForwardPd(const Geometry& g) {
  auto src = dnnl::memory::desc(g.src, dt::f32, kAct);
  auto wei = dnnl::memory::desc(g.wei, dt::f32, tag::any);
  auto dst = dnnl::memory::desc(g.dst, dt::f32, kAct);
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, src, wei,
      dst, g.strides, g.dilates, g.pad_l, g.pad_r, Attr());
}

std::shared_ptr<Prims> Get(const Geometry& g, char direction) {
  std::string key = g.Key(direction);
  {
    std::lock_guard<std::mutex> lock(cache_mutex);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  auto p = std::make_shared<Prims>();
  p->fwd_pd = ForwardPd(g);
  auto src = dnnl::memory::desc(g.src, dt::f32, kAct);
  auto wei = dnnl::memory::desc(g.wei, dt::f32, tag::any);
  auto dst = dnnl::memory::desc(g.dst, dt::f32, kAct);
  if (direction == 'f') {
    p->prim = dnnl::convolution_forward(p->fwd_pd);
    p->scratch_md = p->fwd_pd.scratchpad_desc();
    p->wei_md = p->fwd_pd.weights_desc();
    p->a_md = p->fwd_pd.src_desc();
    p->out_md = p->fwd_pd.dst_desc();
  } else if (direction == 'd') {
    auto pd = dnnl::convolution_backward_data::primitive_desc(
        Engine(), dnnl::algorithm::convolution_direct, src, wei, dst, g.strides, g.dilates,
        g.pad_l, g.pad_r, p->fwd_pd, Attr());
    p->prim = dnnl::convolution_backward_data(pd);
    p->scratch_md = pd.scratchpad_desc();
    p->wei_md = pd.weights_desc();
    p->a_md = pd.diff_dst_desc();
    p->out_md = pd.diff_src_desc();
  } else {
    auto pd = dnnl::convolution_backward_weights::primitive_desc(
        Engine(), dnnl::algorithm::convolution_direct, src, wei, dst, g.strides, g.dilates,
        g.pad_l, g.pad_r, p->fwd_pd, Attr());
    p->prim = dnnl::convolution_backward_weights(pd);
    p->scratch_md = pd.scratchpad_desc();
    p->wei_md = pd.diff_weights_desc();
    p->a_md = pd.src_desc();
    p->out_md = pd.diff_dst_desc();
  }
  std::lock_guard<std::mutex> lock(cache_mutex);
  cache.emplace(key, p);
  return p;
}

template <typename D>
std::vector<int64_t> Dims(const D& d) {
  return std::vector<int64_t>(d.begin(), d.end());
}

// Runs one direction. a, b: the two operands; out: the result. For 'f' (a, b, out) =
// (x, w, y); for 'd' (dy, w, dx); for 'w' (x, dy, dw).
ffi::Error RunUnguarded(char direction, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                        ffi::ResultBuffer<ffi::F32> out, ffi::Span<const int64_t> strides,
                        ffi::Span<const int64_t> lo, ffi::Span<const int64_t> hi,
                        ffi::Span<const int64_t> dilation) {
  auto da = Dims(a.dimensions()), db = Dims(b.dimensions()), dout = Dims(out->dimensions());
  const std::vector<int64_t>* x = &da;
  const std::vector<int64_t>* w = &db;
  const std::vector<int64_t>* y = &dout;
  if (direction == 'd') {
    x = &dout;
    y = &da;
  } else if (direction == 'w') {
    w = &dout;
    y = &db;
  }
  Geometry g;
  auto err = MakeGeometry(ffi::Span<const int64_t>(x->data(), x->size()),
                          ffi::Span<const int64_t>(w->data(), w->size()),
                          ffi::Span<const int64_t>(y->data(), y->size()), strides, lo, hi,
                          dilation, &g);
  if (!err.success()) return err;
  auto p = Get(g, direction);
  dnnl::stream stream(Engine());
  dnnl::memory scratch(p->scratch_md, Engine());  // this call's own
  // An activation in the primitive's layout: the user's NHWC buffer itself, or a copy.
  auto act_in = [&](const dims& d, const dnnl::memory::desc& want, float* ptr) {
    dnnl::memory user(dnnl::memory::desc(d, dt::f32, tag::nhwc), Engine(), ptr);
    if (want == user.get_desc()) return user;
    dnnl::memory m(want, Engine());
    Reorder(stream, user, m);
    return m;
  };
  auto user_wei_md = dnnl::memory::desc(g.wei, dt::f32, tag::hwio);
  if (direction == 'f' || direction == 'd') {
    float* w_ptr = b.typed_data();
    dnnl::memory user_wei(user_wei_md, Engine(), w_ptr);
    dnnl::memory wei = user_wei;
    if (p->wei_md != user_wei_md) {
      wei = dnnl::memory(p->wei_md, Engine());
      Reorder(stream, user_wei, wei);
    }
    const dims& out_dims = direction == 'f' ? g.dst : g.src;
    dnnl::memory user_out(dnnl::memory::desc(out_dims, dt::f32, tag::nhwc), Engine(),
                          out->typed_data());
    dnnl::memory res = user_out;
    if (p->out_md != user_out.get_desc()) res = dnnl::memory(p->out_md, Engine());
    if (direction == 'f') {
      p->prim.execute(stream, {{DNNL_ARG_SRC, act_in(g.src, p->a_md, a.typed_data())},
                               {DNNL_ARG_WEIGHTS, wei},
                               {DNNL_ARG_DST, res},
                               {DNNL_ARG_SCRATCHPAD, scratch}});
    } else {
      p->prim.execute(stream, {{DNNL_ARG_DIFF_DST, act_in(g.dst, p->a_md, a.typed_data())},
                               {DNNL_ARG_WEIGHTS, wei},
                               {DNNL_ARG_DIFF_SRC, res},
                               {DNNL_ARG_SCRATCHPAD, scratch}});
    }
    if (res != user_out) Reorder(stream, res, user_out);
  } else {
    dnnl::memory user_dw(user_wei_md, Engine(), out->typed_data());
    dnnl::memory dw = user_dw;
    if (p->wei_md != user_wei_md) dw = dnnl::memory(p->wei_md, Engine());
    p->prim.execute(stream, {{DNNL_ARG_SRC, act_in(g.src, p->a_md, a.typed_data())},
                             {DNNL_ARG_DIFF_DST, act_in(g.dst, p->out_md, b.typed_data())},
                             {DNNL_ARG_DIFF_WEIGHTS, dw},
                             {DNNL_ARG_SCRATCHPAD, scratch}});
    if (p->wei_md != user_wei_md) Reorder(stream, dw, user_dw);
  }
  stream.wait();
  return ffi::Error::Success();
}

// The FFI boundary: an exception escaping a handler would unwind into XLA's C code and abort
// the process, so every one becomes an FFI error (a Python exception in the caller). oneDNN's C++
// API throws dnnl::error; the standard library throws std::bad_alloc (shapes, the primitive
// cache), std::system_error (the cache's mutex) and the like; `...` catches anything else.
ffi::Error Run(char direction, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
               ffi::ResultBuffer<ffi::F32> out, ffi::Span<const int64_t> strides,
               ffi::Span<const int64_t> lo, ffi::Span<const int64_t> hi,
               ffi::Span<const int64_t> dilation) {
  try {
    return RunUnguarded(direction, a, b, out, strides, lo, hi, dilation);
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("ljax onednn conv: oneDNN: ") + e.what());
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("ljax onednn conv: ") + e.what());
  } catch (...) {
    return ffi::Error::Internal("ljax onednn conv: unknown C++ exception");
  }
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y, ffi::Span<const int64_t> strides,
                   ffi::Span<const int64_t> lo, ffi::Span<const int64_t> hi,
                   ffi::Span<const int64_t> dilation) {
  return Run('f', x, w, y, strides, lo, hi, dilation);
}

ffi::Error BackwardData(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                        ffi::ResultBuffer<ffi::F32> dx, ffi::Span<const int64_t> strides,
                        ffi::Span<const int64_t> lo, ffi::Span<const int64_t> hi,
                        ffi::Span<const int64_t> dilation) {
  return Run('d', dy, w, dx, strides, lo, hi, dilation);
}

ffi::Error BackwardWeights(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                           ffi::ResultBuffer<ffi::F32> dw, ffi::Span<const int64_t> strides,
                           ffi::Span<const int64_t> lo, ffi::Span<const int64_t> hi,
                           ffi::Span<const int64_t> dilation) {
  return Run('w', x, dy, dw, strides, lo, hi, dilation);
}

}  // namespace

#define LJAX_BIND                                   \
  ffi::Ffi::Bind()                                  \
      .Arg<ffi::Buffer<ffi::F32>>()                 \
      .Arg<ffi::Buffer<ffi::F32>>()                 \
      .Ret<ffi::Buffer<ffi::F32>>()                 \
      .Attr<ffi::Span<const int64_t>>("strides")    \
      .Attr<ffi::Span<const int64_t>>("padding_lo") \
      .Attr<ffi::Span<const int64_t>>("padding_hi") \
      .Attr<ffi::Span<const int64_t>>("dilation")

XLA_FFI_DEFINE_HANDLER_SYMBOL(LjaxOnednnConvForward, Forward, LJAX_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(LjaxOnednnConvBackwardData, BackwardData, LJAX_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(LjaxOnednnConvBackwardWeights, BackwardWeights, LJAX_BIND);
