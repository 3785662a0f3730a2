// The gated update (tsft/gate/function.py) as an autograd function written in C++.
//
// Same arithmetic, operation for operation, as GatedUpdate in function.py, which stays the reference
// (tests compare the two bit for bit) and the fallback. What this saves is the Python around each
// operation: a Python autograd function pays for its context object, the Python calls of forward and
// backward and ~20 tensor calls through the Python bindings per gated layer, ~2-3 % of a training step
// of the width-256 benchmark Llama (scripts/bench_gate_overhead.py, docs/gate.md).
//
// Backward cannot call back into Python cheaply, so it leaves each pass's record (mu, S, real-token mask)
// in the gate's RecordQueue; tsft.gate.accounting drains the queues when it reduces them.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/utils/pybind.h>

#include <mutex>
#include <optional>
#include <tuple>
#include <vector>

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Record = std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>>;  // mu, S, real

// One gate's queued backward records. Backward may run on autograd's device threads, hence the lock.
struct RecordQueue : torch::CustomClassHolder {
  std::mutex lock;
  std::vector<Record> records;

  void push(Record record) {
    std::lock_guard<std::mutex> guard(lock);
    records.push_back(std::move(record));
  }
  std::vector<Record> drain() {
    std::lock_guard<std::mutex> guard(lock);
    std::vector<Record> out;
    out.swap(records);
    return out;
  }
  size_t size() {
    std::lock_guard<std::mutex> guard(lock);
    return records.size();
  }
};

static at::Tensor to_dtype(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);  // a no-op .to still costs a dispatch
}

// update of function.py: delta = u (c B)^T (+ k (base - bias)) in base's dtype, in fresh memory (evaluation).
static at::Tensor update(const at::Tensor& base, const at::Tensor& u, const at::Tensor& scaled_B,
                         const std::optional<at::Tensor>& k, const std::optional<at::Tensor>& bias) {
  at::Tensor delta = to_dtype(at::linear(u, scaled_B), base.scalar_type());
  if (k) {
    at::Tensor frozen = bias ? base - *bias : base;
    delta.addcmul_(frozen, to_dtype(*k, base.scalar_type()));
  }
  return delta;
}

// update_and_mask of function.py: delta = u (c B)^T (+ k (base - bias)), and S = 1(||delta|| / max(||base||, eps)
// >= tau) as a (..., 1) column of 0 / 1 in base's dtype.
static std::tuple<at::Tensor, at::Tensor> update_and_mask(const at::Tensor& base, const at::Tensor& u,
                                                          const at::Tensor& scaled_B,
                                                          const std::optional<at::Tensor>& k,
                                                          const std::optional<at::Tensor>& bias, const at::Tensor& tau,
                                                          double ratio_eps) {
  // update()'s body, written out: this is the training step's path, timed by bench-gate as it stands
  at::Tensor delta = to_dtype(at::linear(u, scaled_B), base.scalar_type());
  if (k) {
    at::Tensor frozen = bias ? base - *bias : base;
    delta.addcmul_(frozen, to_dtype(*k, base.scalar_type()));
  }
  auto norm_dtype = c10::promoteTypes(base.scalar_type(), at::kFloat);
  at::Tensor ratio = at::linalg_vector_norm(delta, 2, at::IntArrayRef{-1}, true, norm_dtype);
  at::Tensor base_norm = at::linalg_vector_norm(base, 2, at::IntArrayRef{-1}, true, norm_dtype);
  return {delta, to_dtype(ratio.div_(base_norm.clamp_min_(ratio_eps)).ge_(tau), base.scalar_type())};
}

static at::Tensor scaled(const at::Tensor& B, double scale, const std::optional<at::Tensor>& scale_t) {
  return scale_t ? B * *scale_t : (scale == 1.0 ? B : B * scale);
}

struct GatedUpdate : public torch::autograd::Function<GatedUpdate> {
  // scale: the branch constant c as a number; scale_t: c as a tensor (AdaLoRA's scaling / ranknum), then
  // scale is 1. k and bias: DoRA's rescale of the frozen output. real: the real-token mask, or none.
  static at::Tensor forward(AutogradContext* ctx, at::Tensor base, at::Tensor u, at::Tensor B, double scale,
                            std::optional<at::Tensor> scale_t, std::optional<at::Tensor> k,
                            std::optional<at::Tensor> bias, at::Tensor tau, std::optional<at::Tensor> real,
                            double ratio_eps, c10::intrusive_ptr<RecordQueue> queue) {
    at::Tensor scaled_B = scaled(B, scale, scale_t);
    auto [delta, on] = update_and_mask(base, u, scaled_B, k, bias, tau, ratio_eps);
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["queue"] = c10::IValue::make_capsule(queue);
    ctx->save_for_backward({u, scaled_B, on, real.value_or(at::Tensor()), k.value_or(at::Tensor()),
                            bias.value_or(at::Tensor()), k ? base : at::Tensor(), scale_t.value_or(at::Tensor())});
    return at::addcmul_out(delta, base, on, delta);  // gated_sum: base + S * delta in delta's memory
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    at::Tensor u = saved[0], B = saved[1], on = saved[2], real = saved[3], k = saved[4], bias = saved[5],
               base = saved[6], scale_t = saved[7];
    const at::Tensor& grad_out = grads[0];
    int64_t width = grad_out.size(-1), rank = u.size(-1);
    auto lr_dtype = u.scalar_type();  // the rank-r products run in u's dtype (bf16 under autocast)
    auto acc = c10::promoteTypes(grad_out.scalar_type(), at::kFloat);  // mu and g in >= float32
    at::Tensor on_u = to_dtype(on, lr_dtype);
    B = to_dtype(B, lr_dtype);
    at::Tensor g_lr = to_dtype(grad_out, lr_dtype);

    // grad_B = c (S g)^T u with B saved scaled: a constant c is the GEMM's alpha, a tensor c goes on the mask
    double alpha = ctx->saved_data["scale"].toDouble();
    at::Tensor on_c = on_u;
    if (scale_t.defined()) {
      alpha = 1.0;
      on_c = to_dtype(on_u * scale_t, lr_dtype);
    }
    at::Tensor u_on = (u * on_c).reshape({-1, rank});
    at::Tensor g2 = g_lr.reshape({-1, width});
    at::Tensor gB, grad_B;
    if (rank < 16) {  // thin products are faster in transposed form on CPU GEMM (function.py)
      at::Tensor Bt = B.t();
      gB = at::mm(Bt, g2.t()).t().reshape(u.sizes());
      grad_B = at::addmm(Bt, u_on.t(), g2, 0, alpha).t();
    } else {
      gB = at::matmul(g_lr, B);
      grad_B = at::addmm(B, g2.t(), u_on, 0, alpha);
    }
    // mu (Eq. 9) through the low-rank factor: <g_i, delta_i> = <g_i B, u_i>
    at::Tensor mu = gB.scalar_type() == acc ? at::linalg_vecdot(gB, u) : (gB.to(acc) * u.to(acc)).sum(-1);
    at::Tensor grad_u = gB * on_u;  // gated-off tokens get no gradient

    at::Tensor grad_base = grad_out, grad_k;
    if (k.defined()) {
      at::Tensor frozen = bias.defined() ? base - bias : base;
      at::Tensor g_frozen = (grad_out * frozen).to(acc);
      mu = mu + at::matmul(g_frozen, k.to(acc));
      // autograd numbers only the tensors given: base, u, B, then scale_t if given, then k
      if (ctx->needs_input_grad(scale_t.defined() ? 4 : 3)) {
        grad_k = at::matmul(on.reshape({-1}).to(acc), g_frozen.reshape({-1, width})).to(k.scalar_type());
      }
      // d out / d base = 1 + S k: the DoRA delta rescales the frozen output
      grad_base = at::addcmul(grad_out, grad_out * k.to(grad_out.scalar_type()), on.to(grad_out.scalar_type()));
    }
    auto queue = c10::static_intrusive_pointer_cast<RecordQueue>(ctx->saved_data["queue"].toCapsule());
    queue->push({mu, on, real.defined() ? std::optional<at::Tensor>(real) : std::nullopt});
    // one entry per forward argument: base, u, B, scale, scale_t, k, bias, tau, real, ratio_eps, queue
    return {grad_base, grad_u, grad_B, {}, {}, grad_k, {}, {}, {}, {}, {}};
  }
};

static at::Tensor gated_update(at::Tensor base, at::Tensor u, at::Tensor B, double scale,
                               std::optional<at::Tensor> scale_t, std::optional<at::Tensor> k,
                               std::optional<at::Tensor> bias, at::Tensor tau, std::optional<at::Tensor> real,
                               double ratio_eps, c10::intrusive_ptr<RecordQueue> queue) {
  return GatedUpdate::apply(base, u, B, scale, scale_t, k, bias, tau, real, ratio_eps, queue);
}

// Evaluation and generation (no autograd): the output and S, which the gate counts in Python.
// update_mask_and_norms of function.py: also each token's (r_i, ||delta_i||), which evaluation records.
static std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_forward(at::Tensor base, at::Tensor u, at::Tensor B,
                                                                    double scale, std::optional<at::Tensor> scale_t,
                                                                    std::optional<at::Tensor> k,
                                                                    std::optional<at::Tensor> bias, at::Tensor tau,
                                                                    double ratio_eps) {
  at::Tensor delta = update(base, u, scaled(B, scale, scale_t), k, bias);
  auto norm_dtype = c10::promoteTypes(base.scalar_type(), at::kFloat);
  at::Tensor delta_norm = at::linalg_vector_norm(delta, 2, at::IntArrayRef{-1}, true, norm_dtype);
  at::Tensor base_norm = at::linalg_vector_norm(base, 2, at::IntArrayRef{-1}, true, norm_dtype);
  at::Tensor ratio = delta_norm / base_norm.clamp_min_(ratio_eps);
  at::Tensor on = to_dtype(ratio.ge(tau), base.scalar_type());
  return {at::addcmul_out(delta, base, on, delta), on, at::cat({ratio, delta_norm}, -1)};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<RecordQueue, c10::intrusive_ptr<RecordQueue>>(m, "RecordQueue")
      .def(py::init([]() { return c10::make_intrusive<RecordQueue>(); }))
      .def("drain", &RecordQueue::drain, "the queued (mu, S, real) records, oldest first; empties the queue")
      .def("__len__", &RecordQueue::size);
  m.def("gated_update", &gated_update,
        "GatedUpdate.apply(base, u, B, scale, k, bias, tau, real, gate) of function.py, with c split into a "
        "number and a tensor and the gate into its ratio_eps and record queue");
  m.def("gated_forward", &gated_forward,
        "(base + S * delta, S, (r, ||delta||) per token) without autograd: the gate's evaluation pass");
}
