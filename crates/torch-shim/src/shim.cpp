// What tch lacks from libtorch's C++ API (see src/lib.rs).
//
// Post-accumulate-grad hooks for parameters held by tch (the `at::Tensor*`
// behind tch's C_tensor): libtorch calls a tensor's hook right after the
// backward pass has accumulated its gradient into `.grad`; the hook calls back
// into Rust with a context pointer and the parameter's index.
//
// torch's fused check-and-unscale of a list of gradients
// (`_amp_foreach_non_finite_check_and_unscale_`, what `GradScaler.unscale_`
// calls), which tch does not generate.
//
// Setting parameters' gradients to none (`zero_grad(set_to_none=True)`).
//
// The L2 norm of each tensor of a list (`_foreach_norm`), and the in-place
// sum of two lists (`_foreach_add_`).
//
// Peak memory of a GPU from the caching allocator (device-generic API, no CUDA
// headers needed).
//
// libtorch's CUDA sync debug mode (`torch.cuda.set_sync_debug_mode`), found at
// run time, so that neither CUDA headers nor libc10_cuda are needed to build.
//
// A count of the ATen operators a span of work calls, through a thread-local
// RecordFunction callback: the mechanism torch.profiler lists its CPU ops by.
//
// libtorch's warnings (TORCH_WARN) handed to a Rust function instead of
// printed to stderr by libtorch's default handler.
//
// Exceptions never cross into Rust: errors come back as a message.
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_amp_foreach_non_finite_check_and_unscale.h>
#include <ATen/ops/_foreach_add.h>
#include <ATen/ops/_foreach_norm.h>
#include <ATen/ops/stack.h>
#include <ATen/record_function.h>
#include <c10/core/CachingDeviceAllocator.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cstring>
#include <dlfcn.h>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <variant>
#include <vector>

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

// Runs `body` (which answers 0, or 1 with its message written) so that no
// exception crosses into Rust: any it throws answers 1 and its message.
template <typename Body>
int guarded(char* error, size_t error_len, Body&& body) {
  try {
    return body();
  } catch (const std::exception& e) {
    copy_message(e.what(), error, error_len);
    return 1;
  } catch (...) {
    copy_message("a C++ exception that is not a std::exception", error, error_len);
    return 1;
  }
}

// The `count` tch tensors (`at::Tensor*`) at `tensors`, as a list of
// (shallow) tensors: in-place ops on them change the tch tensors.
std::vector<at::Tensor> tensor_list(void* const* tensors, size_t count) {
  std::vector<at::Tensor> list;
  list.reserve(count);
  for (size_t i = 0; i < count; ++i) {
    list.push_back(*static_cast<const at::Tensor*>(tensors[i]));
  }
  return list;
}

}  // namespace

extern "C" int rsb_set_grad_ready_hook(void* tensor, Callback callback, void* context, size_t index,
                                       char* error, size_t error_len) {
  return guarded(error, error_len, [&] {
    auto* t = static_cast<at::Tensor*>(tensor);
    if (!t->defined() || !t->requires_grad() || !t->is_leaf()) {
      copy_message("the tensor is not a leaf that requires grad", error, error_len);
      return 1;
    }
    torch::autograd::impl::set_post_acc_grad_hooks(
        *t, std::make_unique<GradReadyHook>(callback, context, index));
    return 0;
  });
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

// The L2 norm of each of `count` tch tensors (`at::Tensor*`), written into
// `out` (a tch tensor of `count` elements, of their kind, on their device)
// by `at::_foreach_norm`, as timm's multi-tensor LAMB takes them: on a GPU a
// fixed number of kernels for the whole list, each norm over its own tensor
// alone, in a fixed order.
extern "C" int rsb_foreach_norms(void* const* tensors, size_t count, void* out, char* error,
                                 size_t error_len) {
  return guarded(error, error_len, [&] {
    at::stack_out(*static_cast<at::Tensor*>(out), at::_foreach_norm(tensor_list(tensors, count)),
                  0);
    return 0;
  });
}

// Adds each of `count` tch tensors `sources` into the tensor of `targets` at
// its place, in place (`at::_foreach_add_`): on a GPU, when each pair has
// one shape, strides, kind and device, a fixed number of kernels for the
// whole list.
extern "C" int rsb_foreach_add(void* const* targets, void* const* sources, size_t count,
                               char* error, size_t error_len) {
  return guarded(error, error_len, [&] {
    std::vector<at::Tensor> list = tensor_list(targets, count);
    at::_foreach_add_(list, tensor_list(sources, count));
    return 0;
  });
}

// Drops the gradient of each of `count` tch tensors (`at::Tensor*`), as
// `optimizer.zero_grad(set_to_none=True)` does: the next backward pass hands
// its fresh gradient over instead of adding it into zeros.
extern "C" int rsb_set_grads_to_none(void* const* tensors, size_t count, char* error,
                                     size_t error_len) {
  return guarded(error, error_len, [&] {
    for (size_t i = 0; i < count; ++i) {
      auto* t = static_cast<at::Tensor*>(tensors[i]);
      if (t->defined()) {
        t->mutable_grad().reset();
      }
    }
    return 0;
  });
}

// `tensors` are `count` tch tensors (`at::Tensor*`), unscaled in place;
// `found_inf` (a one-element f32 tensor) is set to 1 when any of them held a
// NaN or an infinity before unscaling.
extern "C" int rsb_amp_foreach_unscale(void* const* tensors, size_t count, void* found_inf,
                                       const void* inv_scale, char* error, size_t error_len) {
  return guarded(error, error_len, [&] {
    std::vector<at::Tensor> list = tensor_list(tensors, count);
    at::_amp_foreach_non_finite_check_and_unscale_(list, *static_cast<at::Tensor*>(found_inf),
                                                   *static_cast<const at::Tensor*>(inv_scale));
    return 0;
  });
}

extern "C" int rsb_cuda_peak_memory(int device, int reset, uint64_t* allocated, uint64_t* reserved,
                                    char* error, size_t error_len) {
  return guarded(error, error_len, [&] {
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
  });
}

// c10/cuda/CUDAFunctions.h keeps the sync debug mode in a `WarningState`
// whose only member is the mode (`enum class SyncDebugMode : int`), the
// static of the inline `c10::cuda::warning_state()`: libc10_cuda.so exports
// that static (a GNU unique symbol), and every library of the process uses
// that one object. Its mode is read by libtorch before every synchronising
// CUDA call (an item, a blocking copy, a stream synchronisation), which then
// warns (1) or throws (2) through `c10::cuda::warn_or_error_on_sync`.
static int* sync_debug_mode() {
  static int* mode =
      static_cast<int*>(dlsym(RTLD_DEFAULT, "_ZZN3c104cuda13warning_stateEvE14warning_state_"));
  return mode;
}

// Sets the mode (0 off, 1 warn, 2 error; -1 only reads it) and returns the
// previous one, or -1 when this libtorch has no CUDA (no libc10_cuda loaded).
extern "C" int rsb_cuda_sync_debug_mode(int mode) {
  int* state = sync_debug_mode();
  if (state == nullptr) {
    return -1;
  }
  int previous = *state;
  if (mode >= 0 && mode <= 2) {
    *state = mode;
  }
  return previous;
}

// Calls `c10::cuda::warn_or_error_on_sync()`, what libtorch calls before a
// synchronising CUDA operation while the mode is on: returns 1 with its
// message when it threw (mode 2), 0 otherwise, -1 without libc10_cuda. A
// check of the mode's effect that needs no GPU.
extern "C" int rsb_cuda_sync_debug_probe(char* error, size_t error_len) {
  using Probe = void (*)();
  auto probe = reinterpret_cast<Probe>(dlsym(RTLD_DEFAULT, "_ZN3c104cuda21warn_or_error_on_syncEv"));
  if (probe == nullptr) {
    return -1;
  }
  return guarded(error, error_len, [&] {
    probe();
    return 0;
  });
}

// Operator counting. One count at a time in the process (the Rust side holds
// a lock for it); its callback is thread-local, so it sees the thread that
// started it and the threads libtorch hands that thread's state to (the
// autograd engine's device threads), as torch.profiler does. An operator is
// counted when it is called outside any other `aten::` operator: the copy
// inside `aten::to` or the kernels a backward node calls inside another
// operator are that operator's business.
namespace {
namespace op_counting {

std::mutex counts_mutex;
std::map<std::string, uint64_t> counts;  // guarded by counts_mutex
at::CallbackHandle handle = 0;           // 0: not counting
thread_local int aten_depth = 0;         // `aten::` operators running on this thread

struct InAtenOperator : at::ObserverContext {};

std::unique_ptr<at::ObserverContext> on_start(const at::RecordFunction& fn) {
  const char* name = fn.name();
  if (name == nullptr || std::strncmp(name, "aten::", 6) != 0) {
    return nullptr;
  }
  if (aten_depth++ == 0) {
    std::lock_guard<std::mutex> lock(counts_mutex);
    ++counts[name];
  }
  return std::make_unique<InAtenOperator>();
}

void on_end(const at::RecordFunction& /*fn*/, at::ObserverContext* context) {
  if (context != nullptr) {
    --aten_depth;
  }
}

}  // namespace op_counting
}  // namespace

// Starts counting on the calling thread; 1 with a message when a count is
// already running or libtorch refused the callback.
extern "C" int rsb_op_count_start(char* error, size_t error_len) {
  return guarded(error, error_len, [&] {
    if (op_counting::handle != 0) {
      copy_message("an operator count is already running", error, error_len);
      return 1;
    }
    {
      std::lock_guard<std::mutex> lock(op_counting::counts_mutex);
      op_counting::counts.clear();
    }
    op_counting::handle = at::addThreadLocalCallback(
        at::RecordFunctionCallback(op_counting::on_start, op_counting::on_end)
            .needsInputs(false)
            .scopes({at::RecordScope::FUNCTION}));
    return 0;
  });
}

using CountVisitor = void (*)(void* context, const char* name, uint64_t count);

// Stops the count, which must be stopped on the thread that started it (the
// callback is that thread's), and hands each operator's name and count to
// `visit`, in name order. 1 with a message when no count is running.
extern "C" int rsb_op_count_stop(CountVisitor visit, void* context, char* error,
                                 size_t error_len) {
  return guarded(error, error_len, [&] {
    if (op_counting::handle == 0) {
      copy_message("no operator count is running", error, error_len);
      return 1;
    }
    at::removeCallback(op_counting::handle);
    op_counting::handle = 0;
    std::map<std::string, uint64_t> counted;
    {
      std::lock_guard<std::mutex> lock(op_counting::counts_mutex);
      counted.swap(op_counting::counts);
    }
    for (const auto& [name, count] : counted) {
      visit(context, name.c_str(), count);
    }
    return 0;
  });
}

// Warnings. libtorch keeps its warning handler per thread: whatever the
// header's comment says, `c10::WarningUtils::set_warning_handler` sets the
// calling thread's (c10's Exception.cpp keeps it in a thread_local of its
// `ThreadWarningHandler`; warnings::tests checks it), so each thread that
// should hand its warnings over installs this one.
using WarningSink = void (*)(const char* message, const char* file, uint32_t line,
                             int deprecation);

namespace {

struct WarningToSink : public c10::WarningHandler {
  std::atomic<WarningSink> sink{nullptr};
  void process(const c10::Warning& warning) override {
    WarningSink to = sink.load(std::memory_order_acquire);
    if (to == nullptr) {
      c10::WarningHandler::process(warning);
      return;
    }
    const auto& where = warning.source_location();
    int deprecation = std::holds_alternative<c10::DeprecationWarning>(warning.type()) ? 1 : 0;
    to(warning.msg().c_str(), where.file == nullptr ? "" : where.file, where.line, deprecation);
  }
};

// One handler for every routed thread (a thread spawned per training step
// routes its warnings too, so one per thread would add up). It is never
// freed: libtorch may still warn while a thread's other thread-locals, or
// the process's statics, are torn down.
WarningToSink* routed_warnings() {
  static WarningToSink* const handler = new WarningToSink();
  return handler;
}

}  // namespace

// Hands the libtorch warnings of the calling thread, and of every thread
// routed before, to `sink` from now on (the message and file live for the
// call only).
extern "C" void rsb_route_thread_warnings(WarningSink sink) {
  WarningToSink* handler = routed_warnings();
  handler->sink.store(sink, std::memory_order_release);
  c10::WarningUtils::set_warning_handler(handler);
}

// Issues one libtorch warning with `message` on the calling thread, as
// libtorch's own code does (TORCH_WARN): for tests of the routing.
extern "C" void rsb_warn(const char* message) {
  try {
    TORCH_WARN(message);
  } catch (...) {
    // A handler that throws (none of ours does) stays on the C++ side.
  }
}
