// Python bindings of imf_kernels._C: validate tensors (device, dtype, shape, contiguity) with messages for
// people, pick the 16-byte vector path where sizes and pointers allow, and launch on the current PyTorch
// stream of the tensors' device. Outputs are allocated by the caller (imf_kernels/cuda/), so tests can poison
// them; nothing here synchronises with the host.
#ifndef IMF_EMULATE
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif
#include <torch/extension.h>

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "launchers.h"

namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;

// The messages of failed checks, built without std::ostream. TORCH_CHECK_VALUE formats its arguments with
// c10::str, an ostringstream inlined here; on the GPU image (Ubuntu's GCC 13.3 building against torch 2.11) that
// crashed inside the extension (SIGSEGV in std::ostream::_M_insert<long>, inserting an integer: the eighth H200
// lease's bench/results/nvidia-h200-2026-11-27h-extension-errors.log) before any ValueError was thrown, so every
// failed check killed the process. Strings, std::to_string and libc10's own Device::str take no stream here.
void append(std::string& out, const char* text) { out += text; }
void append(std::string& out, const std::string& text) { out += text; }
template <typename T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool> &&
                                           !std::is_same_v<T, char>, int> = 0>
void append(std::string& out, T value) {
  out += std::to_string(value);
}
void append(std::string& out, at::IntArrayRef sizes) {  // as c10 prints them: [2, 8, 32, 32]
  out += '[';
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i > 0) out += ", ";
    out += std::to_string(sizes[i]);
  }
  out += ']';
}
void append(std::string& out, at::ScalarType type) { out += c10::toString(type); }  // Float, Half, BFloat16
void append(std::string& out, const c10::Device& device) { out += device.str(); }  // cpu, cuda:0

template <typename... Args>
std::string message(const Args&... args) {
  std::string out;
  (append(out, args), ...);
  return out;
}

// TORCH_CHECK_VALUE's ValueError (a Python ValueError) and source location, with message()'s text.
#define IMF_CHECK(cond, ...)                                                                                    \
  do {                                                                                                          \
    if (C10_UNLIKELY(!(cond))) {                                                                                \
      throw ::c10::ValueError({__func__, __FILE__, static_cast<uint32_t>(__LINE__)}, message(__VA_ARGS__)); \
    }                                                                                                           \
  } while (false)

constexpr int64_t kMaxGridX = std::numeric_limits<int32_t>::max();
constexpr int64_t kMaxGridY = 65535;

#ifdef IMF_EMULATE
// tests/cuda_emulator.py: the same checks and launchers on CPU tensors, the kernels run by csrc/emulation/.
constexpr const char* kDevice = "CPU (the CUDA emulator)";
bool on_kernel_device(const Tensor& tensor) { return tensor.is_cpu(); }
int64_t smem_optin_bytes() { return 227 * 1024; }  // an H100's

struct OnDevice {  // no device to select, no stream
  explicit OnDevice(const Tensor&) {}
  cudaStream_t stream() const { return nullptr; }
};
#else
constexpr const char* kDevice = "CUDA";
bool on_kernel_device(const Tensor& tensor) { return tensor.is_cuda(); }
int64_t smem_optin_bytes() {
  return static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
}

// The tensor's device made current for the launch, and that device's current PyTorch stream.
struct OnDevice {
  c10::cuda::CUDAGuard guard;
  explicit OnDevice(const Tensor& tensor) : guard(tensor.device()) {}
  cudaStream_t stream() const { return at::cuda::getCurrentCUDAStream().stream(); }
};
#endif

imf::DType element_dtype(const char* op, const Tensor& tensor, const char* name) {
  const auto type = tensor.scalar_type();
  IMF_CHECK(type == at::kFloat || type == at::kHalf || type == at::kBFloat16, op, ": ", name,
            " must be float32, float16 or bfloat16, got ", type);
  return type == at::kFloat ? imf::DType::Float32 : type == at::kHalf ? imf::DType::Float16 : imf::DType::BFloat16;
}

// `tensor` must sit on `like`'s CUDA device, be contiguous and have the given dtype and shape.
void check_tensor(const char* op, const Tensor& tensor, const char* name, const Tensor& like, at::ScalarType dtype,
                  const std::vector<int64_t>& shape) {
  IMF_CHECK(on_kernel_device(tensor), op, ": ", name, " must be a ", kDevice, " tensor, got device ",
            tensor.device());
  IMF_CHECK(tensor.device() == like.device(), op, ": ", name, " is on ", tensor.device(),
            " but the first input is on ", like.device());
  IMF_CHECK(tensor.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ",
            tensor.scalar_type());
  IMF_CHECK(tensor.sizes() == at::IntArrayRef(shape), op, ": ", name, " must have shape ",
            at::IntArrayRef(shape), ", got ", tensor.sizes());
  IMF_CHECK(tensor.is_contiguous(), op, ": ", name, " must be contiguous");
}

void check_optional(const char* op, const OptionalTensor& tensor, const char* name, const Tensor& like,
                    at::ScalarType dtype, const std::vector<int64_t>& shape) {
  if (tensor.has_value()) check_tensor(op, *tensor, name, like, dtype, shape);
}

template <typename T = void>
const T* data_or_null(const OptionalTensor& tensor) {
  return tensor.has_value() ? static_cast<const T*>(tensor->data_ptr()) : nullptr;
}

template <typename T = void>
T* mutable_data_or_null(const OptionalTensor& tensor) {
  return tensor.has_value() ? static_cast<T*>(tensor->data_ptr()) : nullptr;
}

// The 16-byte vector path needs every listed pointer 16-byte aligned (absent tensors do not count).
bool aligned16(std::initializer_list<const void*> pointers) {
  for (const void* pointer : pointers) {
    if (reinterpret_cast<uintptr_t>(pointer) % 16 != 0) return false;
  }
  return true;
}

int64_t vector_width(const Tensor& tensor) { return 16 / static_cast<int64_t>(tensor.element_size()); }

// `kernel`: the GroupNorm kernel kind asked for (imf::group_norm_launch): 0 the launch rule's, 1 looped, 2 resident
// with a block per group, 3 resident with a warp per group (where the group fits them).
int group_norm_kernel(const char* op, int64_t kernel, int64_t hw, int64_t channels_per_group, const Tensor& x,
                      bool vectorized) {
  IMF_CHECK(kernel >= 0 && kernel <= 3, op,
            ": kernel must be 0 (the launch rule), 1 (looped), 2 (resident) or 3 (warp), got ", kernel);
  const imf::GroupNormLaunch rule =
      imf::group_norm_launch(hw, channels_per_group, x.element_size(), vectorized, static_cast<int>(kernel));
  IMF_CHECK(rule.items >= 0, op, ": the ", kernel == 2 ? "resident" : "warp",
            " kernels need the vector path (H*W a multiple of ", vector_width(x),
            ", 16-byte aligned tensors), a power-of-two number of 16-byte chunks per channel and at most ",
            kernel == 2 ? 2048 : 128, " per group; got H*W=", hw, ", C/G=", channels_per_group);
  return static_cast<int>(kernel);
}

void group_norm_act_fwd(const Tensor& x, const OptionalTensor& dx, const OptionalTensor& weight,
                        const OptionalTensor& bias, const OptionalTensor& scale, const OptionalTensor& shift,
                        const OptionalTensor& dscale, const OptionalTensor& dshift, int64_t num_groups, double eps,
                        bool silu, const Tensor& y, const OptionalTensor& dy, const Tensor& mean, const Tensor& rstd,
                        int64_t kernel) {
  const char* op = dx.has_value() ? "group_norm_act_jvp" : "group_norm_act";
  IMF_CHECK(x.dim() == 4, op, ": x must be 4-D (B, C, H, W), got shape ", x.sizes());
  const int64_t batch = x.size(0), channels = x.size(1), hw = x.size(2) * x.size(3);
  IMF_CHECK(num_groups > 0 && channels % num_groups == 0, op, ": num_groups=", num_groups,
            " must divide C=", channels);
  IMF_CHECK(batch > 0 && hw > 0, op, ": x must be non-empty, got shape ", x.sizes());
  IMF_CHECK(batch * num_groups <= kMaxGridX, op, ": B * num_groups=", batch * num_groups, " exceeds ",
            kMaxGridX);
  IMF_CHECK(dx.has_value() == dy.has_value(), op, ": dx and dy come together");
  IMF_CHECK(dx.has_value() || (!dscale.has_value() && !dshift.has_value()), op,
            ": dscale/dshift need dx");
  const auto dtype = x.scalar_type();
  const std::vector<int64_t> x_shape(x.sizes().begin(), x.sizes().end());
  check_tensor(op, x, "x", x, dtype, x_shape);
  check_optional(op, dx, "dx", x, dtype, x_shape);
  check_optional(op, weight, "weight", x, dtype, {channels});
  check_optional(op, bias, "bias", x, dtype, {channels});
  check_optional(op, scale, "scale", x, dtype, {batch, channels});
  check_optional(op, shift, "shift", x, dtype, {batch, channels});
  check_optional(op, dscale, "dscale", x, dtype, {batch, channels});
  check_optional(op, dshift, "dshift", x, dtype, {batch, channels});
  check_tensor(op, y, "y", x, dtype, x_shape);
  check_optional(op, dy, "dy", x, dtype, x_shape);
  check_tensor(op, mean, "mean", x, at::kFloat, {batch, num_groups});
  check_tensor(op, rstd, "rstd", x, at::kFloat, {batch, num_groups});

  imf::GroupNormFwdParams params{};
  params.dtype = element_dtype(op, x, "x");
  params.batch = batch;
  params.channels = channels;
  params.groups = num_groups;
  params.hw = hw;
  params.eps = static_cast<float>(eps);
  params.silu = silu;
  params.x = x.data_ptr();
  params.dx = data_or_null(dx);
  params.weight = data_or_null(weight);
  params.bias = data_or_null(bias);
  params.scale = data_or_null(scale);
  params.shift = data_or_null(shift);
  params.dscale = data_or_null(dscale);
  params.dshift = data_or_null(dshift);
  params.y = y.data_ptr();
  params.dy = mutable_data_or_null(dy);
  params.mean = mean.data_ptr<float>();
  params.rstd = rstd.data_ptr<float>();
  params.vectorized = hw % vector_width(x) == 0 && aligned16({params.x, params.dx, params.y, params.dy});
  params.kernel = group_norm_kernel(op, kernel, hw, channels / num_groups, x, params.vectorized);

  const OnDevice device(x);
  imf::group_norm_act_fwd(params, device.stream());
}

void group_norm_act_bwd(const Tensor& grad_y, const Tensor& x, const OptionalTensor& weight,
                        const OptionalTensor& bias, const OptionalTensor& scale, const OptionalTensor& shift,
                        const Tensor& mean, const Tensor& rstd, int64_t num_groups, bool silu, const Tensor& grad_x,
                        const OptionalTensor& grad_weight, const OptionalTensor& grad_bias,
                        const OptionalTensor& grad_scale, const OptionalTensor& grad_shift,
                        const OptionalTensor& weight_bias_partials, const OptionalTensor& grad_residual,
                        int64_t kernel) {
  const char* op = "group_norm_act backward";
  IMF_CHECK(x.dim() == 4, op, ": x must be 4-D (B, C, H, W), got shape ", x.sizes());
  const int64_t batch = x.size(0), channels = x.size(1), hw = x.size(2) * x.size(3);
  IMF_CHECK(num_groups > 0 && channels % num_groups == 0, op, ": num_groups=", num_groups,
            " must divide C=", channels);
  IMF_CHECK(batch > 0 && hw > 0, op, ": x must be non-empty, got shape ", x.sizes());
  IMF_CHECK(batch * num_groups <= kMaxGridX, op, ": B * num_groups=", batch * num_groups, " exceeds ",
            kMaxGridX);
  const int64_t smem = imf::group_norm_bwd_smem_bytes(channels / num_groups);
  IMF_CHECK(smem <= 48 * 1024, op, ": C / num_groups=", channels / num_groups,
            " channels per group need ", smem, " bytes of shared memory, more than 48 KiB");
  const auto dtype = x.scalar_type();
  const std::vector<int64_t> x_shape(x.sizes().begin(), x.sizes().end());
  check_tensor(op, x, "x", x, dtype, x_shape);
  check_tensor(op, grad_y, "grad_y", x, dtype, x_shape);
  check_optional(op, weight, "weight", x, dtype, {channels});
  check_optional(op, bias, "bias", x, dtype, {channels});
  check_optional(op, scale, "scale", x, dtype, {batch, channels});
  check_optional(op, shift, "shift", x, dtype, {batch, channels});
  check_tensor(op, mean, "mean", x, at::kFloat, {batch, num_groups});
  check_tensor(op, rstd, "rstd", x, at::kFloat, {batch, num_groups});
  check_tensor(op, grad_x, "grad_x", x, dtype, x_shape);
  check_optional(op, grad_residual, "grad_residual", x, dtype, x_shape);
  // a parameter's gradient comes with the parameter; weight and bias sum (2, B, C) float32 partials over the batch
  IMF_CHECK(grad_weight.has_value() == weight.has_value() && grad_bias.has_value() == bias.has_value() &&
                grad_scale.has_value() == scale.has_value() && grad_shift.has_value() == shift.has_value(),
            op, ": grad_weight, grad_bias, grad_scale, grad_shift must be given for the parameters given");
  IMF_CHECK(weight_bias_partials.has_value() == (weight.has_value() || bias.has_value()), op,
            ": weight_bias_partials must be given exactly when weight or bias is");
  check_optional(op, grad_weight, "grad_weight", x, dtype, {channels});
  check_optional(op, grad_bias, "grad_bias", x, dtype, {channels});
  check_optional(op, grad_scale, "grad_scale", x, dtype, {batch, channels});
  check_optional(op, grad_shift, "grad_shift", x, dtype, {batch, channels});
  check_optional(op, weight_bias_partials, "weight_bias_partials", x, at::kFloat, {2, batch, channels});

  imf::GroupNormBwdParams params{};
  params.dtype = element_dtype(op, x, "x");
  params.batch = batch;
  params.channels = channels;
  params.groups = num_groups;
  params.hw = hw;
  params.silu = silu;
  params.grad_y = grad_y.data_ptr();
  params.x = x.data_ptr();
  params.weight = data_or_null(weight);
  params.bias = data_or_null(bias);
  params.scale = data_or_null(scale);
  params.shift = data_or_null(shift);
  params.mean = mean.data_ptr<float>();
  params.rstd = rstd.data_ptr<float>();
  params.grad_x = grad_x.data_ptr();
  params.grad_residual = data_or_null(grad_residual);
  params.grad_weight = mutable_data_or_null(grad_weight);
  params.grad_bias = mutable_data_or_null(grad_bias);
  params.grad_scale = mutable_data_or_null(grad_scale);
  params.grad_shift = mutable_data_or_null(grad_shift);
  if (weight_bias_partials.has_value()) {
    float* partials = weight_bias_partials->data_ptr<float>();
    params.grad_weight_partial = weight.has_value() ? partials : nullptr;
    params.grad_bias_partial = bias.has_value() ? partials + batch * channels : nullptr;
  }
  params.vectorized = hw % vector_width(x) == 0 &&
                      aligned16({params.grad_y, params.x, params.grad_x}) &&
                      (params.grad_residual == nullptr || aligned16({params.grad_residual}));
  params.kernel = group_norm_kernel(op, kernel, hw, channels / num_groups, x, params.vectorized);

  const OnDevice device(x);
  imf::group_norm_act_bwd(params, device.stream());
}

// Shape checks shared by the attention forward and backward: q (B, H, Lq, D), k and v (B, H, Lk, D).
void check_attention_shapes(const char* op, const Tensor& q, const Tensor& k, const Tensor& v) {
  IMF_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op,
            ": q, k, v must be 4-D (B, H, L, D), got shapes ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  const int64_t head_dim = q.size(3), lk = k.size(2);
  IMF_CHECK(head_dim == 32 || head_dim == 64 || head_dim == 128, op,
            ": head dim D=", head_dim, " not supported by cuda (32, 64 or 128)");
  IMF_CHECK(lk >= 1 && lk <= imf::kAttentionMaxKeys, op, ": Lk=", lk, " not supported by cuda (1 to ",
            imf::kAttentionMaxKeys, " context tokens, held in shared memory)");
  IMF_CHECK(q.size(0) * q.size(1) >= 1 && q.size(2) >= 1, op, ": q must be non-empty, got shape ",
            q.sizes());
  IMF_CHECK(q.size(0) * q.size(1) <= kMaxGridX, op, ": B * H=", q.size(0) * q.size(1), " exceeds ",
            kMaxGridX);
  const auto dtype = q.scalar_type();
  check_tensor(op, q, "q", q, dtype, {q.size(0), q.size(1), q.size(2), head_dim});
  check_tensor(op, k, "k", q, dtype, {q.size(0), q.size(1), lk, head_dim});
  check_tensor(op, v, "v", q, dtype, {q.size(0), q.size(1), lk, head_dim});
}

void check_smem(const char* op, int64_t bytes) {
  const int64_t limit = smem_optin_bytes();
  IMF_CHECK(bytes <= limit, op, ": needs ", bytes, " bytes of shared memory per block, the device allows ",
            limit);
}

void attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const OptionalTensor& dq,
                   const OptionalTensor& dk, const OptionalTensor& dv, double scale, const Tensor& o,
                   const OptionalTensor& d_o, const Tensor& lse) {
  const char* op = dq.has_value() ? "attention_jvp" : "attention";
  check_attention_shapes(op, q, k, v);
  IMF_CHECK(dq.has_value() == d_o.has_value(), op, ": dq and do come together");
  IMF_CHECK(dq.has_value() || (!dk.has_value() && !dv.has_value()), op, ": dk/dv need dq");
  const auto dtype = q.scalar_type();
  const std::vector<int64_t> q_shape(q.sizes().begin(), q.sizes().end());
  const std::vector<int64_t> kv_shape(k.sizes().begin(), k.sizes().end());
  check_optional(op, dq, "dq", q, dtype, q_shape);
  check_optional(op, dk, "dk", q, dtype, kv_shape);
  check_optional(op, dv, "dv", q, dtype, kv_shape);
  check_tensor(op, o, "o", q, dtype, q_shape);
  check_optional(op, d_o, "do", q, dtype, q_shape);
  check_tensor(op, lse, "lse", q, at::kFloat, {q.size(0), q.size(1), q.size(2)});
  const int64_t lq = q.size(2);
  IMF_CHECK((lq + 63) / 64 <= kMaxGridY, op, ": Lq=", lq, " exceeds ", kMaxGridY * 64);

  imf::AttentionFwdParams params{};
  params.dtype = element_dtype(op, q, "q");
  params.batch_heads = q.size(0) * q.size(1);
  params.lq = lq;
  params.lk = static_cast<int>(k.size(2));
  params.head_dim = static_cast<int>(q.size(3));
  params.scale = static_cast<float>(scale);
  params.q = q.data_ptr();
  params.k = k.data_ptr();
  params.v = v.data_ptr();
  params.dq = data_or_null(dq);
  params.dk = data_or_null(dk);
  params.dv = data_or_null(dv);
  params.o = o.data_ptr();
  params.d_o = mutable_data_or_null(d_o);
  params.lse = lse.data_ptr<float>();
  // Rows are D * element_size >= 64 bytes, so aligned bases keep every row aligned.
  params.vectorized = aligned16({params.q, params.k, params.v, params.dq, params.dk, params.dv});

  const OnDevice device(q);
  check_smem(op, imf::attention_fwd_smem_bytes(params.lk, params.head_dim, dq.has_value(), dk.has_value(),
                                               dv.has_value()));
  imf::attention_fwd(params, device.stream());
}

void attention_bwd(const Tensor& grad_o, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& lse,
                   double scale, const Tensor& grad_q, const Tensor& grad_k_partial, const Tensor& grad_v_partial,
                   const Tensor& grad_k, const Tensor& grad_v) {
  const char* op = "attention backward";
  check_attention_shapes(op, q, k, v);
  const auto dtype = q.scalar_type();
  const std::vector<int64_t> q_shape(q.sizes().begin(), q.sizes().end());
  check_tensor(op, grad_o, "grad_o", q, dtype, q_shape);
  check_tensor(op, lse, "lse", q, at::kFloat, {q.size(0), q.size(1), q.size(2)});
  check_tensor(op, grad_q, "grad_q", q, dtype, q_shape);
  IMF_CHECK(grad_k_partial.dim() == 4, op, ": grad_k_partial must be (B * H, splits, Lk, D), got shape ",
            grad_k_partial.sizes());
  const int64_t batch_heads = q.size(0) * q.size(1), splits = grad_k_partial.size(1);
  IMF_CHECK(splits >= 1 && splits <= kMaxGridY, op, ": splits=", splits, " must lie in [1, ", kMaxGridY,
            "]");
  const std::vector<int64_t> partial_shape{batch_heads, splits, k.size(2), k.size(3)};
  check_tensor(op, grad_k_partial, "grad_k_partial", q, at::kFloat, partial_shape);
  check_tensor(op, grad_v_partial, "grad_v_partial", q, at::kFloat, partial_shape);
  const std::vector<int64_t> k_shape(k.sizes().begin(), k.sizes().end());
  check_tensor(op, grad_k, "grad_k", q, dtype, k_shape);
  check_tensor(op, grad_v, "grad_v", q, dtype, k_shape);

  imf::AttentionBwdParams params{};
  params.dtype = element_dtype(op, q, "q");
  params.batch_heads = batch_heads;
  params.lq = q.size(2);
  params.lk = static_cast<int>(k.size(2));
  params.head_dim = static_cast<int>(q.size(3));
  params.num_splits = static_cast<int>(splits);
  params.scale = static_cast<float>(scale);
  params.grad_o = grad_o.data_ptr();
  params.q = q.data_ptr();
  params.k = k.data_ptr();
  params.v = v.data_ptr();
  params.lse = lse.data_ptr<float>();
  params.grad_q = grad_q.data_ptr();
  params.grad_k_partial = grad_k_partial.data_ptr<float>();
  params.grad_v_partial = grad_v_partial.data_ptr<float>();
  params.grad_k = grad_k.data_ptr();
  params.grad_v = grad_v.data_ptr();
  params.vectorized = aligned16({params.grad_o, params.q, params.k, params.v});

  const OnDevice device(q);
  check_smem(op, imf::attention_bwd_smem_bytes(params.lk, params.head_dim));
  imf::attention_bwd(params, device.stream());
}

// Shape checks shared by the loss forward and backward: u, du, v, v_target (B, ...), t and r (B,) float32.
void check_loss_inputs(const char* op, const Tensor& u, const Tensor& du, const OptionalTensor& v,
                       const Tensor& v_target, const Tensor& t, const Tensor& r) {
  IMF_CHECK(u.dim() >= 1 && u.numel() > 0, op, ": u must be non-empty (B, ...), got shape ", u.sizes());
  IMF_CHECK(u.size(0) <= kMaxGridX, op, ": B=", u.size(0), " exceeds ", kMaxGridX);
  const auto dtype = u.scalar_type();
  const std::vector<int64_t> shape(u.sizes().begin(), u.sizes().end());
  check_tensor(op, u, "u", u, dtype, shape);
  check_tensor(op, du, "du", u, dtype, shape);
  check_optional(op, v, "v", u, dtype, shape);
  check_tensor(op, v_target, "v_target", u, dtype, shape);
  check_tensor(op, t, "t", u, at::kFloat, {u.size(0)});
  check_tensor(op, r, "r", u, at::kFloat, {u.size(0)});
}

// v absent selects the MeanFlow loss (no v-head); then loss_v and w_v are absent too.
void loss_fwd(const Tensor& u, const Tensor& du, const OptionalTensor& v, const Tensor& v_target, const Tensor& t,
              const Tensor& r, double c, double power, const Tensor& loss_u, const OptionalTensor& loss_v,
              const Tensor& w_u, const OptionalTensor& w_v, const Tensor& totals) {
  const char* op = v.has_value() ? "imf_loss" : "meanflow_loss";
  check_loss_inputs(op, u, du, v, v_target, t, r);
  IMF_CHECK(v.has_value() == loss_v.has_value() && v.has_value() == w_v.has_value(), op,
            ": v, loss_v and w_v come together");
  const int64_t batch = u.size(0);
  check_tensor(op, loss_u, "loss_u", u, at::kFloat, {batch});
  check_tensor(op, w_u, "w_u", u, at::kFloat, {batch});
  check_optional(op, loss_v, "loss_v", u, at::kFloat, {batch});
  check_optional(op, w_v, "w_v", u, at::kFloat, {batch});
  check_tensor(op, totals, "totals", u, at::kFloat, {v.has_value() ? 3 : 2});

  imf::LossFwdParams params{};
  params.dtype = element_dtype(op, u, "u");
  params.batch = batch;
  params.numel = u.numel() / batch;
  params.c = static_cast<float>(c);
  params.power = static_cast<float>(power);
  params.meanflow = !v.has_value();
  params.u = u.data_ptr();
  params.du = du.data_ptr();
  params.v = data_or_null(v);
  params.v_target = v_target.data_ptr();
  params.t = t.data_ptr<float>();
  params.r = r.data_ptr<float>();
  params.loss_u = loss_u.data_ptr<float>();
  params.loss_v = mutable_data_or_null<float>(loss_v);
  params.w_u = w_u.data_ptr<float>();
  params.w_v = mutable_data_or_null<float>(w_v);
  params.totals = totals.data_ptr<float>();
  params.vectorized =
      params.numel % vector_width(u) == 0 && aligned16({params.u, params.du, params.v, params.v_target});

  const OnDevice device(u);
  imf::loss_fwd(params, device.stream());
}

void loss_bwd(const Tensor& grad_total, const Tensor& u, const Tensor& du, const OptionalTensor& v,
              const Tensor& v_target, const Tensor& t, const Tensor& r, const Tensor& w_u, const OptionalTensor& w_v,
              const Tensor& grad_u, const OptionalTensor& grad_v) {
  const char* op = v.has_value() ? "imf_loss backward" : "meanflow_loss backward";
  check_loss_inputs(op, u, du, v, v_target, t, r);
  IMF_CHECK(v.has_value() == w_v.has_value() && v.has_value() == grad_v.has_value(), op,
            ": v, w_v and grad_v come together");
  const int64_t batch = u.size(0);
  const std::vector<int64_t> shape(u.sizes().begin(), u.sizes().end());
  check_tensor(op, grad_total, "grad_total", u, at::kFloat, {});
  check_tensor(op, w_u, "w_u", u, at::kFloat, {batch});
  check_optional(op, w_v, "w_v", u, at::kFloat, {batch});
  check_tensor(op, grad_u, "grad_u", u, u.scalar_type(), shape);
  check_optional(op, grad_v, "grad_v", u, u.scalar_type(), shape);

  imf::LossBwdParams params{};
  params.dtype = element_dtype(op, u, "u");
  params.batch = batch;
  params.numel = u.numel() / batch;
  params.meanflow = !v.has_value();
  params.grad_total = grad_total.data_ptr<float>();
  params.u = u.data_ptr();
  params.du = du.data_ptr();
  params.v = data_or_null(v);
  params.v_target = v_target.data_ptr();
  params.t = t.data_ptr<float>();
  params.r = r.data_ptr<float>();
  params.w_u = w_u.data_ptr<float>();
  params.w_v = data_or_null<float>(w_v);
  params.grad_u = grad_u.data_ptr();
  params.grad_v = mutable_data_or_null(grad_v);
  params.vectorized = params.numel % vector_width(u) == 0 &&
                      aligned16({params.u, params.du, params.v, params.v_target, params.grad_u, params.grad_v});

  const OnDevice device(u);
  imf::loss_bwd(params, device.stream());
}

}  // namespace

#ifdef IMF_EMULATE
void register_emulator_selftests(pybind11::module_& m);  // csrc/emulation/selftest.cpp
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "imf-kernels CUDA kernels (csrc/): GroupNorm + modulation + SiLU, short-context attention, losses";
  using pybind11::arg;
  m.def("group_norm_act_fwd", &group_norm_act_fwd, "GroupNorm + modulation + activation (and its tangent)",
        arg("x"), arg("dx"), arg("weight"), arg("bias"), arg("scale"), arg("shift"), arg("dscale"), arg("dshift"),
        arg("num_groups"), arg("eps"), arg("silu"), arg("y"), arg("dy"), arg("mean"), arg("rstd"), arg("kernel") = 0);
  m.def("group_norm_act_bwd", &group_norm_act_bwd, "grad_x and the parameter gradients (two launches)",
        arg("grad_y"), arg("x"), arg("weight"), arg("bias"), arg("scale"), arg("shift"), arg("mean"), arg("rstd"),
        arg("num_groups"), arg("silu"), arg("grad_x"), arg("grad_weight"), arg("grad_bias"), arg("grad_scale"),
        arg("grad_shift"), arg("weight_bias_partials"), arg("grad_residual") = pybind11::none(), arg("kernel") = 0);
  m.def("attention_fwd", &attention_fwd, "short-context attention (and its tangent) with log-sum-exp", arg("q"),
        arg("k"), arg("v"), arg("dq"), arg("dk"), arg("dv"), arg("scale"), arg("o"), arg("d_o"), arg("lse"));
  m.def("attention_bwd", &attention_bwd, "grad_q, and grad_k, grad_v summed from per-split partials (two launches)",
        arg("grad_o"), arg("q"), arg("k"), arg("v"), arg("lse"), arg("scale"), arg("grad_q"), arg("grad_k_partial"),
        arg("grad_v_partial"), arg("grad_k"), arg("grad_v"));
  m.def("loss_fwd", &loss_fwd, "per-sample iMF (v given) or MeanFlow (v None) losses, weights and batch totals",
        arg("u"), arg("du"), arg("v"), arg("v_target"), arg("t"), arg("r"), arg("c"), arg("power"), arg("loss_u"),
        arg("loss_v"), arg("w_u"), arg("w_v"), arg("totals"));
  m.def("loss_bwd", &loss_bwd, "grad_u (and grad_v) of the weighted mean loss", arg("grad_total"), arg("u"),
        arg("du"), arg("v"), arg("v_target"), arg("t"), arg("r"), arg("w_u"), arg("w_v"), arg("grad_u"),
        arg("grad_v"));
  m.def("attention_fwd_smem_bytes", &imf::attention_fwd_smem_bytes, "dynamic shared memory of the forward",
        arg("lk"), arg("head_dim"), arg("tangent"), arg("has_dk"), arg("has_dv"));
  m.def("attention_bwd_smem_bytes", &imf::attention_bwd_smem_bytes, "dynamic shared memory of the backward",
        arg("lk"), arg("head_dim"));
  m.def(
      "group_norm_launch",
      [](int64_t hw, int64_t channels_per_group, int64_t element_size, bool vectorized, int kernel) {
        const imf::GroupNormLaunch launch =
            imf::group_norm_launch(hw, channels_per_group, element_size, vectorized, kernel);
        return std::make_tuple(launch.items, launch.threads, launch.groups_per_block);
      },
      "(items per thread, threads, groups per block) of a GroupNorm launch: items 0 = the looped kernels, -1 = the "
      "kind asked for cannot take the group",
      arg("hw"), arg("channels_per_group"), arg("element_size"), arg("vectorized"), arg("kernel") = 0);
  m.def("group_norm_bwd_smem_bytes", &imf::group_norm_bwd_smem_bytes,
        "dynamic shared memory of the GroupNorm backward", arg("channels_per_group"));
#ifdef IMF_EMULATE
  register_emulator_selftests(m);
#endif
}
