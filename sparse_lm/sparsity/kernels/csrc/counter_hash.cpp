// The integer half of `init.counter_normal_at` on CPU: the two uniforms of each element, from the
// same lowbias32 hash on the same 32-bit words, so the results are bit for bit those of the torch
// expression (Box-Muller stays in torch, whose log and cos a C library need not match to the ulp).
// In torch the hash is ~20 passes over int64 tensors, most of a reselection's time in element
// mode (the whole layer is regenerated up to four times per sharded top-k); here it is one pass.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

namespace {

inline uint32_t mix(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

// (u1, u2) float32 for int64 positions p: h1 = mix(low(p) ^ mix(key ^ high(p))), h2 = mix(h1 ^ c);
// u1 = (h1 >> 8 + 0.5) / 2^24, u2 = (h2 >> 8) / 2^24. position(i) gives element i's position.
template <typename Position>
std::tuple<at::Tensor, at::Tensor> uniforms(int64_t n, int64_t key, Position position) {
  const auto options = at::TensorOptions().dtype(at::kFloat);
  auto u1 = at::empty({n}, options), u2 = at::empty({n}, options);
  float* u1p = u1.mutable_data_ptr<float>();
  float* u2p = u2.mutable_data_ptr<float>();
  const uint32_t k = static_cast<uint32_t>(key);
  const float scale = 1.0f / 16777216.0f;
  at::parallel_for(0, n, 1 << 14, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const uint64_t q = static_cast<uint64_t>(position(i));
      const uint32_t h1 = mix(static_cast<uint32_t>(q) ^ mix(k ^ static_cast<uint32_t>(q >> 32)));
      const uint32_t h2 = mix(h1 ^ 0x85EBCA6Bu);
      u1p[i] = (static_cast<float>(h1 >> 8) + 0.5f) * scale;
      u2p[i] = static_cast<float>(h2 >> 8) * scale;
    }
  });
  return {u1, u2};
}

// The uniforms at int64 positions, shaped like them.
std::tuple<at::Tensor, at::Tensor> counter_uniforms(const at::Tensor& positions, int64_t key) {
  TORCH_CHECK(positions.device().is_cpu() && positions.scalar_type() == at::kLong,
              "counter_uniforms: positions must be an int64 CPU tensor");
  auto p = positions.contiguous();
  const int64_t* pp = p.const_data_ptr<int64_t>();
  auto [u1, u2] = uniforms(p.numel(), key, [pp](int64_t i) { return pp[i]; });
  return {u1.view(p.sizes()), u2.view(p.sizes())};
}

// The uniforms at positions start .. start + count - 1, with no int64 position tensor to build and
// read (8 bytes an element) for the contiguous rows a shard usually regenerates.
std::tuple<at::Tensor, at::Tensor> counter_uniforms_range(int64_t start, int64_t count, int64_t key) {
  TORCH_CHECK(count >= 0, "counter_uniforms_range: count must be >= 0");
  return uniforms(count, key, [start](int64_t i) { return start + i; });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparse_lm_cpu, m) {
  m.def("counter_uniforms(Tensor positions, int key) -> (Tensor, Tensor)", counter_uniforms);
  m.def("counter_uniforms_range(int start, int count, int key) -> (Tensor, Tensor)", counter_uniforms_range);
}
