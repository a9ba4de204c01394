// BigvisResize: bilinear (triangle-kernel) image resize for one [H, W, C] image, antialiased when
// shrinking. It computes what `tf.image.resize(image, size, "bilinear", antialias=True)` computes
// (and `antialias=False` what plain bilinear with half-pixel centres computes), single-threaded:
// tf.data already runs one image per thread, and TensorFlow's ScaleAndTranslate kernel spends most
// of its time in a horizontal pass that reloads and stores its output for every tap and channel.
//
// Built at first use by data_pipelines/native_ops.py against the installed TensorFlow.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace bigvis {
namespace {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;

// The taps of a 1-D resampling: output i reads inputs first[i] .. first[i] + count[i] - 1 with
// weights weight[i * width .. i * width + count[i] - 1], which sum to one.
struct Taps {
  std::vector<int32_t> first, count;
  std::vector<float> weight;
  int width = 0;
};

// Triangle kernel scaled by the shrink factor when antialiasing (a low-pass filter before
// sampling); unscaled when enlarging, which is plain linear interpolation. Sample positions use
// half-pixel centres and the kernel is cut at the image border and renormalised.
Taps ComputeTaps(int64_t in_size, int64_t out_size, bool antialias) {
  Taps taps;
  const float scale = static_cast<float>(out_size) / static_cast<float>(in_size);
  // Antialiased, TensorFlow's ScaleAndTranslate inverts the scale; plain bilinear divides the sizes.
  // Either rounding is kept, so sample positions (and values) agree to float precision.
  const float inv_scale = antialias ? 1.0f / scale : static_cast<float>(in_size) / static_cast<float>(out_size);
  const float support = antialias ? std::max(inv_scale, 1.0f) : 1.0f;  // kernel radius in inputs
  taps.width = static_cast<int>(std::min<int64_t>(2 * static_cast<int64_t>(std::ceil(support)) + 1, in_size));
  taps.first.resize(out_size);
  taps.count.resize(out_size);
  taps.weight.assign(out_size * taps.width, 0.0f);
  std::vector<float> w(taps.width);
  for (int64_t i = 0; i < out_size; ++i) {
    const float centre = (static_cast<float>(i) + 0.5f) * inv_scale;
    int64_t lo = static_cast<int64_t>(std::ceil(centre - support - 0.5f));
    int64_t hi = static_cast<int64_t>(std::floor(centre + support - 0.5f));
    lo = std::clamp<int64_t>(lo, 0, in_size - 1);
    hi = std::clamp<int64_t>(hi, 0, in_size - 1);
    const int n = static_cast<int>(std::min<int64_t>(hi - lo + 1, taps.width));
    float total = 0.0f;
    for (int k = 0; k < n; ++k) {
      const float distance = std::abs((static_cast<float>(lo + k) + 0.5f - centre) / support);
      w[k] = std::max(0.0f, 1.0f - distance);
      total += w[k];
    }
    taps.first[i] = static_cast<int32_t>(lo);
    taps.count[i] = n;
    if (total > 0.0f) {
      for (int k = 0; k < n; ++k) taps.weight[i * taps.width + k] = w[k] / total;
    }
  }
  return taps;
}

// Resamples along rows: out[y] = sum_k w_k * in[first[y] + k], each row `row_len` values long.
// The inner loop runs over whole contiguous rows, which the compiler vectorises.
template <typename T>
void VerticalPass(const T* in, int64_t row_len, const Taps& taps, float* out) {
  const int64_t out_rows = static_cast<int64_t>(taps.first.size());
  for (int64_t y = 0; y < out_rows; ++y) {
    float* __restrict__ dst = out + y * row_len;
    const float* w = taps.weight.data() + y * taps.width;
    const T* __restrict__ src = in + static_cast<int64_t>(taps.first[y]) * row_len;
    const float w0 = w[0];
    for (int64_t j = 0; j < row_len; ++j) dst[j] = w0 * static_cast<float>(src[j]);
    for (int k = 1; k < taps.count[y]; ++k) {
      const float wk = w[k];
      const T* __restrict__ s = src + k * row_len;
      for (int64_t j = 0; j < row_len; ++j) dst[j] += wk * static_cast<float>(s[j]);
    }
  }
}

// Resamples along columns of `rows` rows of `in_width` pixels of C channels. Each output pixel's
// channels accumulate in registers and are stored once.
template <typename T, int C>
void HorizontalPassFixed(const T* in, int64_t rows, int64_t in_width, const Taps& taps, float* out) {
  const int64_t out_width = static_cast<int64_t>(taps.first.size());
  for (int64_t y = 0; y < rows; ++y) {
    const T* __restrict__ src_row = in + y * in_width * C;
    float* __restrict__ dst = out + y * out_width * C;
    for (int64_t x = 0; x < out_width; ++x) {
      const float* w = taps.weight.data() + x * taps.width;
      const T* s = src_row + static_cast<int64_t>(taps.first[x]) * C;
      float acc[C];
      for (int c = 0; c < C; ++c) acc[c] = 0.0f;
      for (int k = 0; k < taps.count[x]; ++k, s += C) {
        for (int c = 0; c < C; ++c) acc[c] += w[k] * static_cast<float>(s[c]);
      }
      for (int c = 0; c < C; ++c) dst[x * C + c] = acc[c];
    }
  }
}

template <typename T>
void HorizontalPassAny(const T* in, int64_t rows, int64_t in_width, int64_t channels, const Taps& taps,
                       float* out) {
  const int64_t out_width = static_cast<int64_t>(taps.first.size());
  for (int64_t y = 0; y < rows; ++y) {
    const T* src_row = in + y * in_width * channels;
    float* dst = out + y * out_width * channels;
    for (int64_t x = 0; x < out_width; ++x, dst += channels) {
      const float* w = taps.weight.data() + x * taps.width;
      std::fill(dst, dst + channels, 0.0f);
      const T* s = src_row + static_cast<int64_t>(taps.first[x]) * channels;
      for (int k = 0; k < taps.count[x]; ++k, s += channels) {
        for (int64_t c = 0; c < channels; ++c) dst[c] += w[k] * static_cast<float>(s[c]);
      }
    }
  }
}

template <typename T>
void HorizontalPass(const T* in, int64_t rows, int64_t in_width, int64_t channels, const Taps& taps, float* out) {
  switch (channels) {
    case 1: return HorizontalPassFixed<T, 1>(in, rows, in_width, taps, out);
    case 3: return HorizontalPassFixed<T, 3>(in, rows, in_width, taps, out);
    case 4: return HorizontalPassFixed<T, 4>(in, rows, in_width, taps, out);
    default: return HorizontalPassAny<T>(in, rows, in_width, channels, taps, out);
  }
}

template <typename T>
class ResizeOp : public OpKernel {
 public:
  explicit ResizeOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("antialias", &antialias_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& image = ctx->input(0);
    const Tensor& size = ctx->input(1);
    OP_REQUIRES(ctx, image.dims() == 3,
                absl::InvalidArgumentError("BigvisResize: image must be [height, width, channels]."));
    OP_REQUIRES(ctx, size.dims() == 1 && size.NumElements() == 2,
                absl::InvalidArgumentError("BigvisResize: size must be [height, width]."));
    const int64_t in_h = image.dim_size(0), in_w = image.dim_size(1), channels = image.dim_size(2);
    const int64_t out_h = size.vec<int32_t>()(0), out_w = size.vec<int32_t>()(1);
    OP_REQUIRES(ctx, out_h > 0 && out_w > 0,
                absl::InvalidArgumentError("BigvisResize: output size must be positive."));
    OP_REQUIRES(ctx, in_h > 0 && in_w > 0 && channels > 0,
                absl::InvalidArgumentError("BigvisResize: input image is empty."));
    Tensor* output = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({out_h, out_w, channels}), &output));
    const Taps rows = ComputeTaps(in_h, out_h, antialias_);
    const Taps cols = ComputeTaps(in_w, out_w, antialias_);
    const T* in = image.flat<T>().data();
    float* out = output->flat<float>().data();
    // The horizontal pass costs most per value, so it runs on whichever of the input and the output
    // has fewer rows: vertical first when shrinking the height, horizontal first when enlarging it.
    Tensor scratch;
    if (out_h <= in_h) {
      OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_FLOAT, TensorShape({out_h, in_w, channels}), &scratch));
      float* mid = scratch.flat<float>().data();
      VerticalPass<T>(in, in_w * channels, rows, mid);
      HorizontalPass<float>(mid, out_h, in_w, channels, cols, out);
    } else {
      OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_FLOAT, TensorShape({in_h, out_w, channels}), &scratch));
      float* mid = scratch.flat<float>().data();
      HorizontalPass<T>(in, in_h, in_w, channels, cols, mid);
      VerticalPass<float>(mid, out_w * channels, rows, out);
    }
  }

 private:
  bool antialias_;
};

REGISTER_OP("BigvisResize")
    .Input("image: T")
    .Input("size: int32")
    .Output("resized: float")
    .Attr("T: {uint8, float}")
    .Attr("antialias: bool = true")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      tensorflow::shape_inference::ShapeHandle image, hw, out;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 3, &image));
      TF_RETURN_IF_ERROR(c->MakeShapeFromShapeTensor(1, &hw));
      TF_RETURN_IF_ERROR(c->WithRank(hw, 2, &hw));
      TF_RETURN_IF_ERROR(c->Concatenate(hw, c->Vector(c->Dim(image, 2)), &out));
      c->set_output(0, out);
      return absl::OkStatus();
    })
    .Doc("Bilinear resize of one [H, W, C] image to float32, antialiased when shrinking.");

REGISTER_KERNEL_BUILDER(Name("BigvisResize").Device(tensorflow::DEVICE_CPU).TypeConstraint<uint8_t>("T"),
                        ResizeOp<uint8_t>);
REGISTER_KERNEL_BUILDER(Name("BigvisResize").Device(tensorflow::DEVICE_CPU).TypeConstraint<float>("T"),
                        ResizeOp<float>);

}  // namespace
}  // namespace bigvis
