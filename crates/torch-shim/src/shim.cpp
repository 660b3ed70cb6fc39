// What tch lacks from libtorch's C++ API (see src/lib.rs).
//
// Post-accumulate-grad hooks for parameters held by tch (the `at::Tensor*`
// behind tch's C_tensor): libtorch calls a tensor's hook right after the
// backward pass has accumulated its gradient into `.grad`; the hook calls back
// into Rust with a context pointer and the parameter's index.
//
// Peak memory of a GPU from the caching allocator (device-generic API, no CUDA
// headers needed).
//
// Exceptions never cross into Rust: errors come back as a message.
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <ATen/core/Tensor.h>
#include <c10/core/CachingDeviceAllocator.h>

#include <cstring>
#include <memory>

namespace {

using Callback = void (*)(void* context, size_t index);

struct GradReadyHook : public torch::autograd::PostAccumulateGradHook {
  GradReadyHook(Callback callback, void* context, size_t index)
      : callback_(callback), context_(context), index_(index) {}
  void operator()(const torch::autograd::Variable& /*tensor*/) override {
    callback_(context_, index_);
  }
  Callback callback_;
  void* context_;
  size_t index_;
};

void copy_message(const char* what, char* error, size_t error_len) {
  if (error != nullptr && error_len > 0) {
    std::strncpy(error, what, error_len - 1);
    error[error_len - 1] = '\0';
  }
}

}  // namespace

extern "C" int rsb_set_grad_ready_hook(void* tensor, Callback callback, void* context, size_t index,
                                       char* error, size_t error_len) {
  try {
    auto* t = static_cast<at::Tensor*>(tensor);
    if (!t->defined() || !t->requires_grad() || !t->is_leaf()) {
      copy_message("the tensor is not a leaf that requires grad", error, error_len);
      return 1;
    }
    torch::autograd::impl::set_post_acc_grad_hooks(
        *t, std::make_unique<GradReadyHook>(callback, context, index));
    return 0;
  } catch (const std::exception& e) {
    copy_message(e.what(), error, error_len);
    return 1;
  }
}

// Removes the tensor's post-accumulate-grad hook only if it is still the one
// installed with `context`: a tensor holds a single such hook, so a later
// install (another GradReadyHooks on the same parameters, or a hook set by
// other code) replaced ours, and clearing blindly would remove theirs.
// Returns 1 when it removed the hook, 0 otherwise.
extern "C" int rsb_clear_grad_ready_hook(void* tensor, void* context) {
  try {
    auto* t = static_cast<at::Tensor*>(tensor);
    if (!t->defined()) {
      return 0;
    }
    auto& current = torch::autograd::impl::post_acc_grad_hooks(*t);
    auto* ours = dynamic_cast<GradReadyHook*>(current.get());
    if (ours == nullptr || ours->context_ != context) {
      return 0;
    }
    torch::autograd::impl::set_post_acc_grad_hooks(*t, nullptr);
    return 1;
  } catch (...) {
    return 0;
  }
}

extern "C" int rsb_cuda_peak_memory(int device, int reset, uint64_t* allocated, uint64_t* reserved,
                                    char* error, size_t error_len) {
  try {
    auto* allocator = c10::getDeviceAllocator(c10::DeviceType::CUDA);
    if (allocator == nullptr || !allocator->initialized()) {
      copy_message("the CUDA allocator is not initialised (no GPU used yet, or no CUDA)", error,
                   error_len);
      return 1;
    }
    auto index = static_cast<c10::DeviceIndex>(device);
    auto stats = allocator->getDeviceStats(index);
    auto aggregate = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    *allocated = static_cast<uint64_t>(stats.allocated_bytes[aggregate].peak);
    *reserved = static_cast<uint64_t>(stats.reserved_bytes[aggregate].peak);
    if (reset != 0) {
      allocator->resetPeakStats(index);
    }
    return 0;
  } catch (const std::exception& e) {
    copy_message(e.what(), error, error_len);
    return 1;
  }
}
