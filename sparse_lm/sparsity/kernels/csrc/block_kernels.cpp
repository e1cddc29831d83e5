// Block-sparse products for B's blocks on CPU: one BLAS call per stored block, no gather of
// blocks, no dense tile (see kernels.py for the paths and compiled.py for the build).
//
// Activations are row-major [T, n]; block-column c of them is a [T, b] strip with rows n numbers
// apart. Each pass of at most 256 tokens is first copied into *strips* layout, [n/b, t, b]: every
// strip one contiguous piece, moved as rows of b numbers (a cheap copy, unlike a transpose). The
// products then read contiguous memory: reading the strided strips directly (BLAS re-packs each
// and its rows, 4-16 KiB apart, miss the cache and the TLB) was 1.4x slower for the products and
// 1.3x for the value gradient, a transpose to [n, t] instead of strips 1.2x slower. A block-row's
// output is summed over its blocks in a [t, b] buffer and written into the result once.
//
// In BLAS's column-major terms a row-major [t, b] strip is a b × t matrix with leading dimension
// b, so out_m (+)= strip_c · op(V) is outᵀ_m (+)= op(V)ᵀ · stripᵀ_c: a (b, t, b) gemm per block.
// BLAS is taken from torch's own library (MKL on x86 wheels); the symbols are weak, so a torch
// build without them still loads this library, and `available()` tells Python to keep its own
// gathered path.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*) __attribute__((weak));
}

namespace {

void gemm(const char* ta, const char* tb, int m, int n, int k, float beta_value, const float* a, int lda,
          const float* b, int ldb, float* c, int ldc) {
  const float one = 1.f;
  sgemm_(ta, tb, &m, &n, &k, &one, a, &lda, b, &ldb, &beta_value, c, &ldc);
}

void gemm(const char* ta, const char* tb, int m, int n, int k, double beta_value, const double* a, int lda,
          const double* b, int ldb, double* c, int ldc) {
  const double one = 1.0;
  dgemm_(ta, tb, &m, &n, &k, &one, a, &lda, b, &ldb, &beta_value, c, &ldc);
}

void check_activations(const at::Tensor& a, const char* what) {
  TORCH_CHECK(a.device().is_cpu() && a.dim() == 2 && a.stride(1) == 1 && a.stride(0) == a.size(1),
              what, ": activations must be a contiguous 2-d CPU tensor");
}

void check_positions(const at::Tensor& positions, const char* what) {
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.dim() == 1, what, ": positions must be 1-d int64");
}

// Tokens per pass: bounds the strips workspaces at 256 rows of activations, and at the layer's
// own weight for layers narrower than that (never a dense-weight-sized transient).
int64_t span_for(int64_t tokens, int64_t n_in, int64_t n_out) {
  return std::max<int64_t>(1, std::min({int64_t(256), tokens, n_in, n_out}));
}

// Rows t0 .. t0+t of a [T, n] into strips [n/b, t, b].
template <typename scalar_t>
void to_strips(const scalar_t* a, int64_t n, int64_t b, int64_t t0, int64_t t, scalar_t* strips) {
  const int64_t columns = n / b;
  at::parallel_for(0, t, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const scalar_t* row = a + (t0 + i) * n;
      for (int64_t c = 0; c < columns; ++c) std::copy(row + c * b, row + (c + 1) * b, strips + (c * t + i) * b);
    }
  });
}

template <typename scalar_t>
void product_impl(const at::Tensor& a, const at::Tensor& values, const int64_t* slots, const int64_t* minors,
                  const int64_t* starts, int64_t n_major, bool transpose_blocks, at::Tensor& out) {
  const int64_t tokens = a.size(0), n_a = a.size(1), n_out = out.size(1), b = values.size(1);
  const scalar_t* ap = a.const_data_ptr<scalar_t>();
  const scalar_t* vp = values.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const char* ta = transpose_blocks ? "T" : "N";
  const int64_t span = span_for(tokens, n_a, n_out);
  auto workspace = at::empty({n_a * span}, a.options());
  scalar_t* strips = workspace.mutable_data_ptr<scalar_t>();
  for (int64_t t0 = 0; t0 < tokens; t0 += span) {
    const int64_t t = std::min(span, tokens - t0);
    to_strips(ap, n_a, b, t0, t, strips);
    at::parallel_for(0, n_major, 1, [&](int64_t m0, int64_t m1) {
      std::vector<scalar_t> sum(t * b);
      for (int64_t m = m0; m < m1; ++m) {
        scalar_t* column = op + t0 * n_out + m * b;
        if (starts[m] == starts[m + 1]) {
          for (int64_t i = 0; i < t; ++i) std::fill(column + i * n_out, column + i * n_out + b, scalar_t(0));
          continue;
        }
        for (int64_t k = starts[m]; k < starts[m + 1]; ++k) {
          gemm(ta, "N", b, t, b, k == starts[m] ? scalar_t(0) : scalar_t(1), vp + slots[k] * b * b, b,
               strips + minors[k] * t * b, b, sum.data(), b);
        }
        for (int64_t i = 0; i < t; ++i) std::copy(sum.data() + i * b, sum.data() + (i + 1) * b, column + i * n_out);
      }
    });
  }
}

template <typename scalar_t>
void sddmm_impl(const at::Tensor& g, const at::Tensor& x, const int64_t* rows, const int64_t* cols, at::Tensor& out) {
  const int64_t tokens = x.size(0), n_in = x.size(1), n_out = g.size(1), b = out.size(1), n = out.size(0);
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const int64_t span = span_for(tokens, n_in, n_out);
  auto x_workspace = at::empty({n_in * span}, x.options()), g_workspace = at::empty({n_out * span}, g.options());
  scalar_t* x_strips = x_workspace.mutable_data_ptr<scalar_t>();
  scalar_t* g_strips = g_workspace.mutable_data_ptr<scalar_t>();
  for (int64_t t0 = 0; t0 < tokens; t0 += span) {
    const int64_t t = std::min(span, tokens - t0);
    to_strips(x.const_data_ptr<scalar_t>(), n_in, b, t0, t, x_strips);
    to_strips(g.const_data_ptr<scalar_t>(), n_out, b, t0, t, g_strips);
    at::parallel_for(0, n, 1, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) {
        // out[s]ᵀ (b_in × b_out, column-major) = x stripᵀ · g strip, summed over the pass's t tokens.
        gemm("N", "T", b, b, t, t0 == 0 ? scalar_t(0) : scalar_t(1), x_strips + cols[s] * t * b, b,
             g_strips + rows[s] * t * b, b, op + s * b * b, b);
      }
    });
  }
}

bool available() { return sgemm_ != nullptr && dgemm_ != nullptr; }

// out [T, n_out]: block-column m of it is Σ_k a[:, minors[k]-block] · op(values[slots[k]]) over
// k in starts[m] .. starts[m+1] (zeros where that range is empty); op transposes each block when
// `transpose_blocks` (the forward, x·W_Aᵀ) and not otherwise (the input gradient, g·W_A).
at::Tensor block_product(const at::Tensor& a, const at::Tensor& values, const at::Tensor& slots,
                         const at::Tensor& minors, const at::Tensor& starts, int64_t n_out, bool transpose_blocks) {
  check_activations(a, "block_product");
  TORCH_CHECK(values.is_contiguous() && values.dim() == 3 && values.scalar_type() == a.scalar_type(),
              "block_product: values must be contiguous [slots, b, b] of the activations' dtype");
  for (const auto* positions : {&slots, &minors, &starts}) check_positions(*positions, "block_product");
  TORCH_CHECK(available(), "block_product: this torch build exports no BLAS gemm");
  const int64_t b = values.size(1), n_major = starts.size(0) - 1;
  TORCH_CHECK(n_major * b == n_out && a.size(1) % b == 0, "block_product: shapes do not split into blocks of ", b);
  auto out = at::empty({a.size(0), n_out}, a.options());
  auto s = slots.contiguous(), mi = minors.contiguous(), st = starts.contiguous();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "block_product", [&] {
    product_impl<scalar_t>(a, values, s.const_data_ptr<int64_t>(), mi.const_data_ptr<int64_t>(),
                           st.const_data_ptr<int64_t>(), n_major, transpose_blocks, out);
  });
  return out;
}

// [K, b, b]: g[:, rows[k]-block]ᵀ · x[:, cols[k]-block] for each k (the value gradient at B).
at::Tensor block_sddmm(const at::Tensor& g, const at::Tensor& x, const at::Tensor& rows, const at::Tensor& cols,
                       int64_t block) {
  check_activations(x, "block_sddmm");
  check_activations(g, "block_sddmm");
  check_positions(rows, "block_sddmm");
  check_positions(cols, "block_sddmm");
  TORCH_CHECK(available(), "block_sddmm: this torch build exports no BLAS gemm");
  TORCH_CHECK(g.size(0) == x.size(0) && g.scalar_type() == x.scalar_type(),
              "block_sddmm: g and x must hold as many tokens, of one dtype");
  TORCH_CHECK(x.size(1) % block == 0 && g.size(1) % block == 0, "block_sddmm: shapes do not split into blocks of ", block);
  auto out = at::empty({rows.size(0), block, block}, x.options());
  if (x.size(0) == 0) return out.zero_();
  auto r = rows.contiguous(), c = cols.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "block_sddmm", [&] {
    sddmm_impl<scalar_t>(g, x, r.const_data_ptr<int64_t>(), c.const_data_ptr<int64_t>(), out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparse_lm_cpu, m) {
  m.def("available() -> bool", available);
  m.def("block_product(Tensor a, Tensor values, Tensor slots, Tensor minors, Tensor starts, int n_out, bool transpose_blocks) -> Tensor",
        block_product);
  m.def("block_sddmm(Tensor g, Tensor x, Tensor rows, Tensor cols, int block) -> Tensor", block_sddmm);
}
