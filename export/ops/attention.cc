// phi-onnx's attention kernels for onnxruntime on the CPU: phi_onnx.CausalAttention and phi_onnx.BidirectionalAttention.
//
// CausalAttention is the prompt pass of com.microsoft.GroupQueryAttention, computed causally. onnxruntime's CPU
// GroupQueryAttention computes every S x T score of a prompt, masks the upper triangle and keeps the whole score tensor
// in memory (heads x S x T floats, 240 MB per layer at 1,940 tokens on 16 heads) before the second product. This
// kernel takes the same inputs, attributes and outputs, skips every key block above the diagonal and works on blocks
// of query rows whose scores stay in the core's cache: half the arithmetic, a few MB of traffic.
// BidirectionalAttention is the same kernel without the mask, for the vision tower, where the exported graph runs
// MatMul, Softmax, MatMul with the whole score tensor in memory.
//
// Both can compute the two products in bfloat16 with float sums (attribute bf16 = 1, on CPUs with AVX512-BF16; fp32
// elsewhere), the way PyTorch's bf16 autocast does.
//
// Built from this one file by phi_onnx_export.ops (g++, no onnxruntime headers: the few entries of onnxruntime's C API
// it calls are declared below by their place in the API table, which onnxruntime only ever appends to). The vector
// code is written once with GCC vector extensions and read twice, for AVX-512 and for AVX2 + FMA (PHI_LANES = 16 or
// 8); the library picks one at run time from the CPU's features. The work runs on the session's intra-op thread pool
// (OrtApi::KernelContext_ParallelFor, onnxruntime >= 1.18).
//
// CausalAttention (GroupQueryAttention with packed QKV, as onnxruntime-genai's model builder emits it):
//   inputs  0 query [B, S, (H + 2 Hkv) D] float (q, k, v packed; inputs 1 and 2 empty)
//           3 past_key, 4 past_value [B, Hkv, P, D] float (P: the cache buffer; shared with the outputs or not)
//           5 seqlens_k [B] int32 (total length - 1), 6 total_sequence_length [1] int32
//           7 cos_cache, 8 sin_cache [max positions, R / 2] float (rotary on the first R dims)
//   outputs 0 output [B, S, H D], 1 present_key, 2 present_value [B, Hkv, max(P, total), D]
//   attributes num_heads, kv_num_heads, scale (0: 1 / sqrt(D)), do_rotary, rotary_interleaved,
//              local_window_size (-1 only), softcap (0 only), bf16
// BidirectionalAttention:
//   inputs  q, k, v [B, S, H D] float; output [B, S, H D]; attributes num_heads, scale (0: 1 / sqrt(D)), bf16

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>

#include <immintrin.h>
#include <string>
#include <thread>
#include <vector>

#include <sched.h>

#ifndef PHI_LANES

struct Problem {
  int causal;  // 1: GroupQueryAttention's prompt pass; 0: every query sees every key of its sequence (vision)
  int batch, seq, total, heads, kv_heads, dim, rot_half, interleaved, past_buffer, present_len, threads, bf16;
  float scale;
  // runs fn(data, i) for i in [0, total) on the session's threads; returns false if it could not
  bool (*parallel_for)(void* context, void (*fn)(void*, size_t), size_t total, void* data);
  void* context;
  const float* q;  // row s of batch b, head h: q + (b * seq + s) * q_stride + h * dim (k, v alike, by kv head)
  const float* k;
  const float* v;
  size_t q_stride, k_stride, v_stride;
  const float* past_key;  // causal only, from here on
  const float* past_value;
  const int32_t* seqlens_k;
  const float* cos;
  const float* sin;
  float* out;
  float* present_key;
  float* present_value;
};


// ------------------------------------------------------------------------------------------------------------------
// The onnxruntime C ABI, as much of it as this library calls.
// ------------------------------------------------------------------------------------------------------------------

extern "C" {
struct OrtStatus;
struct OrtValue;
struct OrtKernelInfo;
struct OrtKernelContext;
struct OrtSessionOptions;
struct OrtCustomOpDomain;
struct OrtTensorTypeAndShapeInfo;
struct OrtApi;
struct OrtApiBase {
  const OrtApi* (*GetApi)(uint32_t version);
  const char* (*GetVersionString)();
};

struct OrtCustomOp {  // layout of API version 16; onnxruntime reads the fields its `version` promises
  uint32_t version;
  void* (*CreateKernel)(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo*);
  const char* (*GetName)(const OrtCustomOp*);
  const char* (*GetExecutionProviderType)(const OrtCustomOp*);
  int (*GetInputType)(const OrtCustomOp*, size_t);
  size_t (*GetInputTypeCount)(const OrtCustomOp*);
  int (*GetOutputType)(const OrtCustomOp*, size_t);
  size_t (*GetOutputTypeCount)(const OrtCustomOp*);
  void (*KernelCompute)(void*, OrtKernelContext*);
  void (*KernelDestroy)(void*);
  int (*GetInputCharacteristic)(const OrtCustomOp*, size_t);
  int (*GetOutputCharacteristic)(const OrtCustomOp*, size_t);
  int (*GetInputMemoryType)(const OrtCustomOp*, size_t);
  int (*GetVariadicInputMinArity)(const OrtCustomOp*);
  int (*GetVariadicInputHomogeneity)(const OrtCustomOp*);
  int (*GetVariadicOutputMinArity)(const OrtCustomOp*);
  int (*GetVariadicOutputHomogeneity)(const OrtCustomOp*);
  OrtStatus* (*CreateKernelV2)(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo*, void**);
  OrtStatus* (*KernelComputeV2)(void*, OrtKernelContext*);
};
}

namespace {

enum : int { kFloat = 1, kInt32 = 6 };      // ONNXTensorElementDataType
enum : int { kRequired = 0, kOptional = 1 };  // OrtCustomOpInputOutputCharacteristic
constexpr int kFail = 1, kInvalidArgument = 2;  // OrtErrorCode

// Places in the OrtApi table (stable since API version 1).
enum Slot : int {
  kCreateStatus = 0,
  kCreateCustomOpDomain = 26,
  kCustomOpDomainAdd = 27,
  kAddCustomOpDomain = 28,
  kGetTensorMutableData = 51,
  kGetTensorElementType = 60,
  kGetDimensionsCount = 61,
  kGetDimensions = 62,
  kGetTensorTypeAndShape = 65,
  kKernelInfoGetAttributeFloat = 85,
  kKernelInfoGetAttributeInt64 = 86,
  kKernelContextGetInputCount = 88,
  kKernelContextGetInput = 90,
  kKernelContextGetOutput = 91,
  kReleaseStatus = 93,
  kReleaseTensorTypeAndShapeInfo = 99,
  kKernelContextParallelFor = 274,  // API version 18
};

const void* const* g_api = nullptr;

template <typename F>
F api(Slot slot) {
  return reinterpret_cast<F>(const_cast<void*>(g_api[slot]));
}

OrtStatus* status(int code, const std::string& message) {
  return api<OrtStatus* (*)(int, const char*)>(kCreateStatus)(code, message.c_str());
}

struct Tensor {
  int type = 0;
  std::vector<int64_t> shape;
  void* data = nullptr;
};

OrtStatus* describe(const OrtValue* value, Tensor& out) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  if (OrtStatus* s = api<OrtStatus* (*)(const OrtValue*, OrtTensorTypeAndShapeInfo**)>(kGetTensorTypeAndShape)(value, &info))
    return s;
  size_t rank = 0;
  OrtStatus* s = api<OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, int*)>(kGetTensorElementType)(info, &out.type);
  if (!s) s = api<OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, size_t*)>(kGetDimensionsCount)(info, &rank);
  if (!s) {
    out.shape.assign(rank, 0);
    s = api<OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, int64_t*, size_t)>(kGetDimensions)(info, out.shape.data(), rank);
  }
  api<void (*)(OrtTensorTypeAndShapeInfo*)>(kReleaseTensorTypeAndShapeInfo)(info);
  if (s) return s;
  return api<OrtStatus* (*)(OrtValue*, void**)>(kGetTensorMutableData)(const_cast<OrtValue*>(value), &out.data);
}

bool parallel_for(void* context, void (*fn)(void*, size_t), size_t total, void* data) {
  using F = OrtStatus* (*)(const OrtKernelContext*, void (*)(void*, size_t), size_t, size_t, void*);
  OrtStatus* s = api<F>(kKernelContextParallelFor)(static_cast<const OrtKernelContext*>(context), fn, total, total, data);
  if (s) api<void (*)(OrtStatus*)>(kReleaseStatus)(s);
  return s == nullptr;
}

}  // namespace

// ------------------------------------------------------------------------------------------------------------------
// The kernels' entry points, one per instruction set (defined below, compiled with PHI_LANES = 16 and 8).
// ------------------------------------------------------------------------------------------------------------------


namespace lanes16 { const char* run(const Problem&); }
namespace lanes8 { const char* run(const Problem&); }

namespace {

struct Kernel {
  int64_t heads = 0, kv_heads = 0, do_rotary = 0, interleaved = 0, window = -1, bf16 = 0;
  float scale = 0.f, softcap = 0.f;
};

int available_threads() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

OrtStatus* dispatch(Problem& p, bool bf16, const char* op) {
  const bool wide = __builtin_cpu_supports("avx512f");
  p.bf16 = bf16 && wide && __builtin_cpu_supports("avx512bf16");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (!wide && !avx2) return status(kFail, std::string(op) + ": this CPU has neither AVX-512 nor AVX2 with FMA");
  if (p.dim % (wide ? 16 : 8) != 0 || p.dim > 1024)
    return status(kInvalidArgument, std::string(op) + ": the head size is not a multiple of the vector width (or over 1024)");
  const char* error = nullptr;
  try {  // nothing may unwind into onnxruntime: an allocation that fails is an error status, not an abort
    error = wide ? lanes16::run(p) : lanes8::run(p);
  } catch (const std::bad_alloc&) {
    error = "out of memory for the packed operands";
  } catch (const std::exception& e) {
    return status(kFail, std::string(op) + ": " + e.what());
  }
  return error ? status(kFail, std::string(op) + ": " + error) : nullptr;
}

OrtStatus* compute(void* kernel_ptr, OrtKernelContext* context) {
  const Kernel& k = *static_cast<Kernel*>(kernel_ptr);
  size_t count = 0;
  if (OrtStatus* s = api<OrtStatus* (*)(const OrtKernelContext*, size_t*)>(kKernelContextGetInputCount)(context, &count))
    return s;
  Tensor in[9];
  for (size_t i = 0; i < 9 && i < count; ++i) {
    const OrtValue* value = nullptr;
    if (OrtStatus* s = api<OrtStatus* (*)(const OrtKernelContext*, size_t, const OrtValue**)>(kKernelContextGetInput)(context, i, &value))
      return s;
    if (value == nullptr) continue;
    if (OrtStatus* s = describe(value, in[i])) return s;
  }
  if (in[1].data || in[2].data) return status(kInvalidArgument, "CausalAttention: only packed QKV (inputs 1 and 2 empty) is supported");
  for (int i : {0, 3, 4, 5, 6, 7, 8})
    if (!in[i].data) return status(kInvalidArgument, "CausalAttention: input " + std::to_string(i) + " is missing");
  const Tensor &q = in[0], &pk = in[3], &pv = in[4], &sk = in[5], &cos = in[7], &sin = in[8];
  if (q.type != kFloat || pk.type != kFloat || pv.type != kFloat || cos.type != kFloat || sin.type != kFloat ||
      sk.type != kInt32 || in[6].type != kInt32)
    return status(kInvalidArgument, "CausalAttention: float tensors and int32 lengths only");
  if (q.shape.size() != 3 || pk.shape.size() != 4 || pk.shape != pv.shape || cos.shape.size() != 2 || cos.shape != sin.shape)
    return status(kInvalidArgument, "CausalAttention: unexpected input ranks");
  const int64_t B = q.shape[0], S = q.shape[1], H = k.heads, Hk = k.kv_heads;
  if (H <= 0 || Hk <= 0 || H % Hk != 0 || q.shape[2] % (H + 2 * Hk) != 0)
    return status(kInvalidArgument, "CausalAttention: the query width does not split into num_heads and kv_num_heads");
  const int64_t D = q.shape[2] / (H + 2 * Hk);
  if (pk.shape[0] != B || pk.shape[1] != Hk || pk.shape[3] != D || sk.shape.size() != 1 || sk.shape[0] != B)
    return status(kInvalidArgument, "CausalAttention: past_key/past_value/seqlens_k do not match the query");
  const int64_t rot_half = k.do_rotary ? cos.shape[1] : 0;
  if (2 * rot_half > D) return status(kInvalidArgument, "CausalAttention: the rotary cache is wider than a head");
  const int32_t* seqlens = static_cast<const int32_t*>(sk.data);
  const int64_t total = static_cast<const int32_t*>(in[6].data)[0];
  // As GroupQueryAttention: a first prompt (total == S) may be right-padded per batch row (seqlens_k + 1 <= S keys
  // count); a prompt after cached tokens has one batch row, and seqlens_k + 1 - S cached tokens before it.
  const bool first = total == S;
  if (!first && B != 1) return status(kInvalidArgument, "CausalAttention: a prompt after cached tokens needs batch size 1");
  for (int64_t b = 0; b < B; ++b) {
    const int64_t t = int64_t(seqlens[b]) + 1;
    if (t < 1 || (first && t > S) || (!first && t != total))
      return status(kInvalidArgument, "CausalAttention: seqlens_k does not match the prompt and total_sequence_length");
  }
  if (k.do_rotary && total > cos.shape[0]) return status(kInvalidArgument, "CausalAttention: positions past the rotary cache");
  const int64_t present_len = std::max(pk.shape[2], total);
  OrtValue* outs[3] = {};
  const int64_t out_shape[3] = {B, S, H * D};
  const int64_t kv_shape[4] = {B, Hk, present_len, D};
  for (int i = 0; i < 3; ++i) {
    if (OrtStatus* s = api<OrtStatus* (*)(OrtKernelContext*, size_t, const int64_t*, size_t, OrtValue**)>(kKernelContextGetOutput)(
            context, i, i == 0 ? out_shape : kv_shape, i == 0 ? 3 : 4, &outs[i]))
      return s;
  }
  Tensor o[3];
  for (int i = 0; i < 3; ++i)
    if (OrtStatus* s = describe(outs[i], o[i])) return s;
  Problem p{};
  p.batch = int(B), p.seq = int(S), p.total = int(total), p.heads = int(H), p.kv_heads = int(Hk), p.dim = int(D), p.rot_half = int(rot_half);
  p.interleaved = int(k.interleaved), p.past_buffer = int(pk.shape[2]), p.present_len = int(present_len);
  p.threads = available_threads();
  p.parallel_for = parallel_for;
  p.context = context;
  p.scale = k.scale != 0.f ? k.scale : 1.f / std::sqrt(float(D));
  p.causal = 1;
  p.q = static_cast<const float*>(q.data);
  p.k = p.q + H * D;
  p.v = p.q + (H + Hk) * D;
  p.q_stride = p.k_stride = p.v_stride = size_t(q.shape[2]);
  p.past_key = static_cast<const float*>(pk.data);
  p.past_value = static_cast<const float*>(pv.data);
  p.seqlens_k = seqlens;
  p.cos = static_cast<const float*>(cos.data);
  p.sin = static_cast<const float*>(sin.data);
  p.out = static_cast<float*>(o[0].data);
  p.present_key = static_cast<float*>(o[1].data);
  p.present_value = static_cast<float*>(o[2].data);
  return dispatch(p, k.bf16, "CausalAttention");
}

// Bidirectional attention over q, k, v [B, S, H D] (heads side by side): out [B, S, H D]. The vision tower's.
OrtStatus* compute_bidirectional(void* kernel_ptr, OrtKernelContext* context) {
  const Kernel& k = *static_cast<Kernel*>(kernel_ptr);
  Tensor in[3];
  for (size_t i = 0; i < 3; ++i) {
    const OrtValue* value = nullptr;
    if (OrtStatus* s = api<OrtStatus* (*)(const OrtKernelContext*, size_t, const OrtValue**)>(kKernelContextGetInput)(context, i, &value))
      return s;
    if (value == nullptr) return status(kInvalidArgument, "BidirectionalAttention: q, k and v are required");
    if (OrtStatus* s = describe(value, in[i])) return s;
  }
  const Tensor &q = in[0], &kk = in[1], &v = in[2];
  if (q.type != kFloat || kk.type != kFloat || v.type != kFloat || q.shape.size() != 3 || kk.shape != q.shape ||
      v.shape != q.shape)
    return status(kInvalidArgument, "BidirectionalAttention: q, k and v must be float [batch, sequence, heads x head size] of one shape");
  const int64_t B = q.shape[0], S = q.shape[1], H = k.heads;
  if (H <= 0 || q.shape[2] % H != 0) return status(kInvalidArgument, "BidirectionalAttention: the width does not split into num_heads");
  const int64_t D = q.shape[2] / H;
  OrtValue* out = nullptr;
  if (OrtStatus* s = api<OrtStatus* (*)(OrtKernelContext*, size_t, const int64_t*, size_t, OrtValue**)>(kKernelContextGetOutput)(
          context, 0, q.shape.data(), 3, &out))
    return s;
  Tensor o;
  if (OrtStatus* s = describe(out, o)) return s;
  Problem p{};
  p.causal = 0;
  p.batch = int(B), p.seq = int(S), p.total = int(S), p.heads = int(H), p.kv_heads = int(H), p.dim = int(D);
  p.threads = available_threads();
  p.parallel_for = parallel_for;
  p.context = context;
  p.scale = k.scale != 0.f ? k.scale : 1.f / std::sqrt(float(D));
  p.q = static_cast<const float*>(q.data);
  p.k = static_cast<const float*>(kk.data);
  p.v = static_cast<const float*>(v.data);
  p.q_stride = p.k_stride = p.v_stride = size_t(q.shape[2]);
  p.out = static_cast<float*>(o.data);
  if (B == 0 || S == 0) return nullptr;
  return dispatch(p, k.bf16, "BidirectionalAttention");
}

OrtStatus* create(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo* info, void** out) {
  Kernel* k = new Kernel();
  auto get_int = [&](const char* name, int64_t& value) {
    OrtStatus* s = api<OrtStatus* (*)(const OrtKernelInfo*, const char*, int64_t*)>(kKernelInfoGetAttributeInt64)(info, name, &value);
    if (s) api<void (*)(OrtStatus*)>(kReleaseStatus)(s);  // absent: keep the default
  };
  auto get_float = [&](const char* name, float& value) {
    OrtStatus* s = api<OrtStatus* (*)(const OrtKernelInfo*, const char*, float*)>(kKernelInfoGetAttributeFloat)(info, name, &value);
    if (s) api<void (*)(OrtStatus*)>(kReleaseStatus)(s);
  };
  get_int("num_heads", k->heads);
  k->kv_heads = k->heads;
  get_int("kv_num_heads", k->kv_heads);
  get_int("do_rotary", k->do_rotary);
  get_int("rotary_interleaved", k->interleaved);
  get_int("local_window_size", k->window);
  get_int("bf16", k->bf16);
  get_float("scale", k->scale);
  get_float("softcap", k->softcap);
  if (k->window != -1 || k->softcap != 0.f) {
    delete k;
    return status(kInvalidArgument, "CausalAttention: local_window_size and softcap are not supported");
  }
  *out = k;
  return nullptr;
}

OrtCustomOp make_op(bool causal) {
  OrtCustomOp op{};
  op.version = 16;
  op.GetExecutionProviderType = [](const OrtCustomOp*) { return "CPUExecutionProvider"; };
  op.GetOutputType = [](const OrtCustomOp*, size_t) -> int { return kFloat; };
  op.KernelDestroy = [](void* k) { delete static_cast<Kernel*>(k); };
  op.GetOutputCharacteristic = [](const OrtCustomOp*, size_t) -> int { return kRequired; };
  op.GetInputMemoryType = [](const OrtCustomOp*, size_t) -> int { return 0; };
  op.GetVariadicInputMinArity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicInputHomogeneity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicOutputMinArity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicOutputHomogeneity = [](const OrtCustomOp*) { return 1; };
  op.CreateKernelV2 = create;
  if (causal) {
    op.GetName = [](const OrtCustomOp*) { return "CausalAttention"; };
    op.GetInputTypeCount = [](const OrtCustomOp*) -> size_t { return 9; };
    op.GetInputType = [](const OrtCustomOp*, size_t i) -> int { return (i == 5 || i == 6) ? kInt32 : kFloat; };
    op.GetInputCharacteristic = [](const OrtCustomOp*, size_t i) -> int { return (i == 1 || i == 2) ? kOptional : kRequired; };
    op.GetOutputTypeCount = [](const OrtCustomOp*) -> size_t { return 3; };
    op.KernelComputeV2 = compute;
  } else {
    op.GetName = [](const OrtCustomOp*) { return "BidirectionalAttention"; };
    op.GetInputTypeCount = [](const OrtCustomOp*) -> size_t { return 3; };
    op.GetInputType = [](const OrtCustomOp*, size_t) -> int { return kFloat; };
    op.GetInputCharacteristic = [](const OrtCustomOp*, size_t) -> int { return kRequired; };
    op.GetOutputTypeCount = [](const OrtCustomOp*) -> size_t { return 1; };
    op.KernelComputeV2 = compute_bidirectional;
  }
  return op;
}

OrtCustomOp g_ops[2] = {make_op(true), make_op(false)};

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* base) {
  const OrtApi* table = base->GetApi(18);
  if (!table) return nullptr;  // onnxruntime older than 1.18: no table to report the error with, and no op
  g_api = reinterpret_cast<const void* const*>(table);
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* s = api<OrtStatus* (*)(const char*, OrtCustomOpDomain**)>(kCreateCustomOpDomain)("phi_onnx", &domain)) return s;
  for (const OrtCustomOp& op : g_ops)
    if (OrtStatus* s = api<OrtStatus* (*)(OrtCustomOpDomain*, const OrtCustomOp*)>(kCustomOpDomainAdd)(domain, &op)) return s;
  return api<OrtStatus* (*)(OrtSessionOptions*, OrtCustomOpDomain*)>(kAddCustomOpDomain)(options, domain);
}

// The vector kernels: this file again, once per instruction set. The standard headers were read above with the
// baseline target, so every std:: function stays baseline code; only the kernels' own functions use the wider ISA.
#define PHI_LANES 16
#pragma GCC push_options
#pragma GCC target("avx512f,fma")
#include "attention.cc"  // this file, read as the kernels
#pragma GCC pop_options
#undef PHI_LANES
#define PHI_LANES 8
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#include "attention.cc"  // this file, read as the kernels
#pragma GCC pop_options
#undef PHI_LANES

#else  // PHI_LANES: the vector kernels, read twice by the #includes at the end of the first part

#if PHI_LANES == 16
#define PHI_NS lanes16
#else
#define PHI_NS lanes8
#endif

namespace PHI_NS {

constexpr int L = PHI_LANES;
typedef float vf __attribute__((vector_size(L * 4)));
typedef int32_t vi __attribute__((vector_size(L * 4)));
constexpr int MR = L == 16 ? 8 : 4;  // query rows per score tile (2 vectors of keys each): 16 or 8 accumulators
constexpr int PR = 4;                // query rows per output tile (up to 4 vectors of the head each)
constexpr int KT = 2 * L;            // keys per score tile

static inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
static inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
static inline vf splat(float x) { return vf{} + x; }

// e^x for x <= 0 (softmax after subtracting the row's maximum): 2^n e^f, |f| <= ln2 / 2, degree-6 Taylor (rel. err.
// < 2e-7); below -87 the result flushes to 0.
static inline vf vexp(vf x) {
  x = x < splat(-87.f) ? splat(-87.f) : x;
  const vf magic = splat(12582912.f);  // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer
  vf n = (x * 1.44269504088896341f + magic) - magic;
  vf f = x - n * 0.693145751953125f - n * 1.428606765330187045e-06f;
  vf p = splat(1.f / 720);
  p = p * f + 1.f / 120;
  p = p * f + 1.f / 24;
  p = p * f + 1.f / 6;
  p = p * f + 0.5f;
  p = p * f + 1.f;
  p = p * f + 1.f;
  vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// body(task, worker) for every task in [0, tasks), on the session's threads, tasks taken in order by whichever worker
// is free (the causal blocks differ in size). `worker` < p.threads indexes per-worker scratch.
template <typename F>
struct Job {
  F* body;
  int tasks;
  std::atomic<int> next{0};
  static void run(void* data, size_t worker) {
    Job* job = static_cast<Job*>(data);
    for (int t; (t = job->next.fetch_add(1, std::memory_order_relaxed)) < job->tasks;) (*job->body)(t, int(worker));
  }
};

template <typename F>
static bool parallel(const Problem& p, int tasks, F&& body) {
  Job<std::remove_reference_t<F>> job;
  job.body = &body;
  job.tasks = tasks;
  const int workers = std::max(1, std::min(p.threads, tasks));
  if (workers == 1) {
    job.run(&job, 0);
    return true;
  }
  return p.parallel_for(p.context, &decltype(job)::run, size_t(workers), &job);
}

static inline uint16_t to_bf16(float x) {  // round to nearest even (the inputs here are finite)
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline void rotate(float* x, const float* cos, const float* sin, int half, bool interleaved) {
  if (interleaved) {
    for (int i = 0; i < half; ++i) {
      const float a = x[2 * i], b = x[2 * i + 1];
      x[2 * i] = a * cos[i] - b * sin[i];
      x[2 * i + 1] = b * cos[i] + a * sin[i];
    }
  } else {
    for (int i = 0; i < half; ++i) {
      const float a = x[i], b = x[i + half];
      x[i] = a * cos[i] - b * sin[i];
      x[i + half] = b * cos[i] + a * sin[i];
    }
  }
}

// ---- fp32 products ------------------------------------------------------------------------------------------------

// s[r][j] = q[r] . k[j] for r < MR, j in [0, jend) (a multiple of KT). The keys come in tiles of KT, each tile
// transposed and contiguous: kt[(j / KT) * dim * KT + d * KT + j % KT], so the loop streams through memory.
static void score_tile(const float* q, int dim, const float* kt, int jend, float* s, int lds) {
  for (int j = 0; j < jend; j += KT) {
    const float* tile = kt + size_t(j) * dim;
    vf acc[MR][2] = {};
    for (int d = 0; d < dim; ++d) {
      const vf k0 = load(tile + d * KT), k1 = load(tile + d * KT + L);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const vf qr = splat(q[r * dim + d]);
        acc[r][0] += qr * k0;
        acc[r][1] += qr * k1;
      }
    }
    for (int r = 0; r < MR; ++r) {
      store(s + size_t(r) * lds + j, acc[r][0]);
      store(s + size_t(r) * lds + j + L, acc[r][1]);
    }
  }
}

// o[r][c .. c + NV L) = sum over j < jend of p[r][j] v[j][c ..], for r < PR (value rows ldv apart).
template <int NV>
static void value_tile(const float* p, int ldp, int jend, const float* v, int ldv, int c, float* o, int ldo) {
  vf acc[PR][NV] = {};
  for (int j = 0; j < jend; ++j) {
    vf vv[NV];
#pragma GCC unroll 4
    for (int i = 0; i < NV; ++i) vv[i] = load(v + size_t(j) * ldv + c + i * L);
#pragma GCC unroll 4
    for (int r = 0; r < PR; ++r) {
      const vf pr = splat(p[size_t(r) * ldp + j]);
#pragma GCC unroll 4
      for (int i = 0; i < NV; ++i) acc[r][i] += pr * vv[i];
    }
  }
  for (int r = 0; r < PR; ++r)
    for (int i = 0; i < NV; ++i) store(o + size_t(r) * ldo + c + i * L, acc[r][i]);
}

static void value_rows(const float* p, int ldp, int jend, const float* v, int ldv, int dim, float* o, int ldo) {
  for (int c = 0; c < dim;) {
    const int nv = std::min(4, (dim - c) / L);
    switch (nv) {
      case 4: value_tile<4>(p, ldp, jend, v, ldv, c, o, ldo); break;
      case 3: value_tile<3>(p, ldp, jend, v, ldv, c, o, ldo); break;
      case 2: value_tile<2>(p, ldp, jend, v, ldv, c, o, ldo); break;
      default: value_tile<1>(p, ldp, jend, v, ldv, c, o, ldo); break;
    }
    c += nv * L;
  }
}

// Softmax of s[0 .. n) in place, zeros in [n, end); returns 1 / the sum.
static float softmax_row(float* s, int n, int end) {
  vf m = splat(-INFINITY);
  int j = 0;
  for (; j + L <= n; j += L) {
    const vf x = load(s + j);
    m = x > m ? x : m;
  }
  float mx = -INFINITY;
  for (int i = 0; i < L; ++i) mx = std::max(mx, m[i]);
  for (; j < n; ++j) mx = std::max(mx, s[j]);
  vf sum = {};
  const vf mv = splat(mx);
  j = 0;
  for (; j + L <= n; j += L) {
    const vf e = vexp(load(s + j) - mv);
    store(s + j, e);
    sum += e;
  }
  float total = 0.f;
  for (int i = 0; i < L; ++i) total += sum[i];
  if (j < n) {  // the tail through a padded vector
    float tail[L];
    for (int i = 0; i < L; ++i) tail[i] = j + i < n ? s[j + i] : mx - 200.f;
    const vf e = vexp(load(tail) - mv);
    for (int i = 0; j + i < n; ++i) {
      s[j + i] = e[i];
      total += e[i];
    }
  }
  for (j = n; j < end; ++j) s[j] = 0.f;
  return 1.f / total;
}

#if PHI_LANES == 16
// ---- bfloat16 products (AVX512-BF16): vdpbf16ps multiplies pairs of bf16 and adds both products to a float -------

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,fma")

static inline void to_bf16_row(const float* x, int n, uint16_t* out) {  // n: a multiple of 16
  for (int i = 0; i < n; i += 16) {
    const __m256bh h = _mm512_cvtneps_pbh(_mm512_loadu_ps(x + i));
    std::memcpy(out + i, &h, 32);
  }
}

// s[r][j] for r < MR, j in [0, jend) (a multiple of 32). q: bf16 rows; kt: for each tile of 32 keys, for each pair of
// head dims d2, the 32 keys' (k[2 d2], k[2 d2 + 1]) pairs: kt[(j / 32) * dim * 32 + d2 * 64 + (j % 32) * 2 + {0, 1}].
static void score_tile_bf16(const uint16_t* q, int dim, const uint16_t* kt, int jend, float* s, int lds) {
  for (int j = 0; j < jend; j += 32) {
    const uint16_t* tile = kt + size_t(j) * dim;
    __m512 acc[MR][2];
    for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int d2 = 0; d2 < dim / 2; ++d2) {
      const __m512bh k0 = (__m512bh)_mm512_loadu_si512(tile + d2 * 64);
      const __m512bh k1 = (__m512bh)_mm512_loadu_si512(tile + d2 * 64 + 32);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        int32_t pair;
        std::memcpy(&pair, q + r * dim + 2 * d2, 4);
        const __m512bh qr = (__m512bh)_mm512_set1_epi32(pair);
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], qr, k0);
        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], qr, k1);
      }
    }
    for (int r = 0; r < MR; ++r) {
      _mm512_storeu_ps(s + size_t(r) * lds + j, acc[r][0]);
      _mm512_storeu_ps(s + size_t(r) * lds + j + 16, acc[r][1]);
    }
  }
}

// o[r][c .. c + 16 NV) = sum over j < jend (even) of p[r][j] v[j][c ..], r < PR. p: bf16 rows; vp: the values in
// pairs of keys, vp[(j / 2) * dim * 2 + c * 2 + j % 2].
template <int NV>
static void value_tile_bf16(const uint16_t* p, int ldp, int jend, const uint16_t* vp, int dim, int c, float* o,
                            int ldo) {
  __m512 acc[PR][NV];
  for (int r = 0; r < PR; ++r)
    for (int i = 0; i < NV; ++i) acc[r][i] = _mm512_setzero_ps();
  for (int j2 = 0; j2 < jend / 2; ++j2) {
    __m512bh vv[NV];
#pragma GCC unroll 4
    for (int i = 0; i < NV; ++i) vv[i] = (__m512bh)_mm512_loadu_si512(vp + (size_t(j2) * dim + c + 16 * i) * 2);
#pragma GCC unroll 4
    for (int r = 0; r < PR; ++r) {
      int32_t pair;
      std::memcpy(&pair, p + size_t(r) * ldp + 2 * j2, 4);
      const __m512bh pr = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
      for (int i = 0; i < NV; ++i) acc[r][i] = _mm512_dpbf16_ps(acc[r][i], pr, vv[i]);
    }
  }
  for (int r = 0; r < PR; ++r)
    for (int i = 0; i < NV; ++i) _mm512_storeu_ps(o + size_t(r) * ldo + c + 16 * i, acc[r][i]);
}

static void value_rows_bf16(const uint16_t* p, int ldp, int jend, const uint16_t* vp, int dim, float* o, int ldo) {
  for (int c = 0; c < dim;) {
    const int nv = std::min(4, (dim - c) / 16);
    switch (nv) {
      case 4: value_tile_bf16<4>(p, ldp, jend, vp, dim, c, o, ldo); break;
      case 3: value_tile_bf16<3>(p, ldp, jend, vp, dim, c, o, ldo); break;
      case 2: value_tile_bf16<2>(p, ldp, jend, vp, dim, c, o, ldo); break;
      default: value_tile_bf16<1>(p, ldp, jend, vp, dim, c, o, ldo); break;
    }
    c += nv * 16;
  }
}

#pragma GCC pop_options
#endif

// ---- the op -------------------------------------------------------------------------------------------------------

template <bool BF16>
static const char* run_batch(const Problem& p, int b) {
  using Elem = std::conditional_t<BF16, uint16_t, float>;
  const int S = p.seq, H = p.heads, Hk = p.kv_heads, D = p.dim, group = H / Hk, half = p.rot_half;
  const int rows = (S + MR - 1) / MR * MR;
  // causal: the keys this row attends to (its cached tokens, then its prompt; padding past them on a first prompt is
  // ignored); bidirectional: the S keys of its own sequence
  const int total = p.causal ? p.seqlens_k[b] + 1 : S, past = !p.causal || p.total == S ? 0 : total - S;
  const int tpad = (total + KT - 1) / KT * KT;
  const float* q_rows = p.q + size_t(b) * S * p.q_stride;
  // scaled (and rotated) queries [H][rows][D] (rows past S are zeros); keys in transposed tiles [Hk][tpad D]; for bf16
  // the values in pairs of keys [Hk][tpad D]
  std::unique_ptr<Elem[]> q(new Elem[size_t(H) * rows * D]), kt(new Elem[size_t(Hk) * tpad * D]);
  std::unique_ptr<uint16_t[]> vp(BF16 ? new uint16_t[size_t(Hk) * tpad * D] : nullptr);
  // where key/value row j of kv head g is: the present cache (causal) or the inputs (bidirectional)
  auto key_row = [&](int g, int j) -> const float* {
    if (p.causal) return p.present_key + ((size_t(b) * Hk + g) * p.present_len + j) * D;
    return p.k + (size_t(b) * S + j) * p.k_stride + size_t(g) * D;
  };
  auto value_base = [&](int g) -> const float* {
    if (p.causal) return p.present_value + (size_t(b) * Hk + g) * p.present_len * D;
    return p.v + size_t(b) * S * p.v_stride + size_t(g) * D;
  };
  const size_t value_stride = p.causal ? size_t(D) : p.v_stride;
  // 1. the present cache (causal: past rows unless the buffer is shared, then the new rows, rotated) and the packed
  //    operands
  const bool ok = parallel(p, Hk + H, [&](int t, int) {
    if (t < Hk) {
      const int g = t;
      if (p.causal) {
        const size_t src = (size_t(b) * Hk + g) * p.past_buffer * D, dst = (size_t(b) * Hk + g) * p.present_len * D;
        float* pk = p.present_key + dst;
        float* pv = p.present_value + dst;
        if (past > 0 && pk != p.past_key + src) std::memcpy(pk, p.past_key + src, sizeof(float) * past * D);
        if (past > 0 && pv != p.past_value + src) std::memcpy(pv, p.past_value + src, sizeof(float) * past * D);
        for (int s = 0; s < S; ++s) {
          const float* row = p.k + (size_t(b) * S + s) * p.k_stride + size_t(g) * D;
          float* kd = pk + size_t(past + s) * D;
          std::memcpy(kd, row, sizeof(float) * D);
          std::memcpy(pv + size_t(past + s) * D, p.v + (size_t(b) * S + s) * p.v_stride + size_t(g) * D,
                      sizeof(float) * D);
          if (half) rotate(kd, p.cos + size_t(past + s) * half, p.sin + size_t(past + s) * half, half, p.interleaved);
        }
      }
      Elem* tiles = kt.get() + size_t(g) * tpad * D;
      for (int j0 = 0; j0 < tpad; j0 += KT) {
        Elem* tile = tiles + size_t(j0) * D;
        for (int i = 0; i < KT; ++i) {
          const int j = j0 + i;
          const float* key = j < total ? key_row(g, j) : nullptr;
          if constexpr (BF16) {
            for (int d = 0; d < D; ++d) tile[(d / 2) * 2 * KT + i * 2 + d % 2] = key ? to_bf16(key[d]) : 0;
          } else {
            for (int d = 0; d < D; ++d) tile[d * KT + i] = key ? key[d] : 0.f;
          }
        }
      }
      if constexpr (BF16) {
        uint16_t* pairs = vp.get() + size_t(g) * tpad * D;
        const float* values = value_base(g);
        for (int j = 0; j < tpad; ++j) {
          const float* value = values + size_t(j) * value_stride;
          for (int d = 0; d < D; ++d) pairs[(size_t(j / 2) * D + d) * 2 + j % 2] = j < total ? to_bf16(value[d]) : 0;
        }
      }
    } else {
      const int h = t - Hk;
      float row[1024];
      Elem* qh = q.get() + size_t(h) * rows * D;
      for (int s = 0; s < rows; ++s) {
        if (s < S) {
          std::memcpy(row, q_rows + size_t(s) * p.q_stride + size_t(h) * D, sizeof(float) * D);
          if (half) rotate(row, p.cos + size_t(past + s) * half, p.sin + size_t(past + s) * half, half, p.interleaved);
          if (p.scale != 1.f)
            for (int d = 0; d < D; ++d) row[d] *= p.scale;
        } else {
          std::memset(row, 0, sizeof(float) * D);
        }
        if constexpr (BF16) to_bf16_row(row, D, qh + size_t(s) * D);
        else std::memcpy(qh + size_t(s) * D, row, sizeof(float) * D);
      }
    }
  });
  if (!ok) return "the thread pool refused the work";
  // 2. attention, one block of MR query rows of one head per task, the longest blocks first
  const int blocks = rows / MR;
  // per worker, allocated here (no allocation may throw on a pool thread): the scores [MR][tpad], the outputs
  // [MR][D] and for bf16 the probabilities [MR][tpad] in bf16
  const size_t need = size_t(MR) * tpad + size_t(MR) * D + (BF16 ? size_t(MR) * tpad / 2 : 0);
  const int workers = std::max(1, std::min(p.threads, H * blocks));
  std::unique_ptr<float[]> scratch(new float[need * workers]);
  const bool done = parallel(p, H * blocks, [&](int t, int worker) {
    float* sc = scratch.get() + need * size_t(worker);
    float* acc = sc + size_t(MR) * tpad;
    const int h = t % H, blk = blocks - 1 - t / H, s0 = blk * MR, g = h / group;
    const int keys = p.causal ? std::min(total, past + s0 + MR) : total;  // keys any row of this block sees
    const int kend = (keys + KT - 1) / KT * KT;                          // the score tiles cover [0, kend)
    auto row_keys = [&](int r) { return p.causal ? std::min(total, past + s0 + r + 1) : total; };
    const Elem* qb = q.get() + (size_t(h) * rows + s0) * D;
    const Elem* kb = kt.get() + size_t(g) * tpad * D;
    float inv[MR];
    if constexpr (BF16) {
#if PHI_LANES == 16
      uint16_t* pb = reinterpret_cast<uint16_t*>(acc + size_t(MR) * D);
      score_tile_bf16(qb, D, kb, kend, sc, tpad);
      const int keys2 = (keys + 1) / 2 * 2;
      for (int r = 0; r < MR; ++r) {
        inv[r] = softmax_row(sc + size_t(r) * tpad, row_keys(r), kend);
        to_bf16_row(sc + size_t(r) * tpad, kend, pb + size_t(r) * tpad);
      }
      const uint16_t* vb = vp.get() + size_t(g) * tpad * D;
      for (int r0 = 0; r0 < MR; r0 += PR)
        value_rows_bf16(pb + size_t(r0) * tpad, tpad, keys2, vb, D, acc + size_t(r0) * D, D);
#endif
    } else {
      score_tile(qb, D, kb, kend, sc, tpad);
      for (int r = 0; r < MR; ++r) inv[r] = softmax_row(sc + size_t(r) * tpad, row_keys(r), kend);
      const float* v = value_base(g);
      for (int r0 = 0; r0 < MR; r0 += PR)
        value_rows(sc + size_t(r0) * tpad, tpad, keys, v, int(value_stride), D, acc + size_t(r0) * D, D);
    }
    for (int r = 0; r < MR && s0 + r < S; ++r) {
      float* o = p.out + (size_t(b) * S + s0 + r) * H * D + size_t(h) * D;
      for (int d = 0; d < D; ++d) o[d] = acc[size_t(r) * D + d] * inv[r];
    }
  });
  return done ? nullptr : "the thread pool refused the work";
}

const char* run(const Problem& p) {
  if (p.dim > 1024) return "head size over 1024";
  for (int b = 0; b < p.batch; ++b) {
#if PHI_LANES == 16
    const char* error = p.bf16 ? run_batch<true>(p, b) : run_batch<false>(p, b);
#else
    const char* error = run_batch<false>(p, b);
#endif
    if (error) return error;
  }
  return nullptr;
}

}  // namespace PHI_NS

#undef PHI_NS

#endif  // PHI_LANES
