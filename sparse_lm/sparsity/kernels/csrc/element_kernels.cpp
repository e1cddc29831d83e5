// Element-sparse products for B's elements on CPU (b = 1), where a BLAS call per element would be
// absurd and the dense-tile path pays a whole dense product (see kernels.py for the paths).
//
// Each stored element moves one row of the transposed activations: y_m (+)= w · a_c over a tile
// of tokens. Tokens are taken a tile of 8 SIMD vectors at a time (64 fp32 / 32 fp64), transposed
// into [n, tile] so that a_c is 8 aligned vectors, and a major's (output column's) sum stays in
// 8 registers over all its elements: one load and one multiply-add per vector, no gather. Sums of
// 16 neighbouring columns are written together, a whole cache line per token row, rather than one
// number per row 4-16 KiB apart.
//
// The value gradient at B is one dot product per element, g_rᵀ · x_c, over 64-token tiles of gᵀ
// and xᵀ, a tile at a time so that the x tile its elements read at random stays in L2. Elements
// are visited grouped by row, so g_r's tile stays in registers, two elements per load of it.
//
// Vectors are GCC/Clang vector extensions; the kernels are compiled twice, for AVX2+FMA and for
// the baseline, and the AVX2 one runs where the CPU has it (a function-level target, so the
// library itself needs no -march and runs on any x86-64; elsewhere only the baseline exists).
// The baseline (SSE2) alone ran the products 4x slower; plain loops left to the auto-vectoriser,
// 7x slower.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/core/Allocator.h>
#include <torch/library.h>

#include <sys/mman.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <numeric>
#include <vector>

namespace {

constexpr int VECTORS = 8;   // vectors per token tile: a major's sums fit in registers
constexpr int GROUP = 16;    // majors whose sums are written out together
constexpr int64_t PASS = 512;  // tokens per value-gradient pass

template <typename T>
struct Simd {
  typedef T vec __attribute__((vector_size(32), aligned(alignof(T))));
  static constexpr int lanes = 32 / sizeof(T);
  static constexpr int tile = VECTORS * lanes;
};

template <typename T>
__attribute__((always_inline)) inline void rows_body(const T* w, const int32_t* minors, const int64_t* starts,
                                                     int64_t m0, int64_t m1, const T* tiles, int64_t n_out,
                                                     int64_t t, T* out) {
  using V = typename Simd<T>::vec;
  constexpr int tile = Simd<T>::tile, lanes = Simd<T>::lanes;
  alignas(64) T sums[GROUP][tile];
  for (int64_t g0 = m0; g0 < m1; g0 += GROUP) {
    const int64_t gn = std::min<int64_t>(GROUP, m1 - g0);
    for (int64_t g = 0; g < gn; ++g) {
      V acc[VECTORS] = {};
      for (int64_t k = starts[g0 + g]; k < starts[g0 + g + 1]; ++k) {
        const V* row = reinterpret_cast<const V*>(tiles + int64_t(minors[k]) * tile);
        const T wk = w[k];
#pragma GCC unroll 8
        for (int v = 0; v < VECTORS; ++v) acc[v] += wk * row[v];
      }
      for (int v = 0; v < VECTORS; ++v) *reinterpret_cast<V*>(sums[g] + v * lanes) = acc[v];
    }
    for (int64_t i = 0; i < t; ++i)
      for (int64_t g = 0; g < gn; ++g) out[i * n_out + g0 + g] = sums[g][i];
  }
}

// Sums of two elements' lanes, p and q, by shuffles (a lane-by-lane scalar sum is ~15
// instructions an element, as many as its 8 multiply-adds on a 64-token tile).
#if defined(__clang__)
#define SPARSE_LM_SHUFFLE(a, b, mask_type, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SPARSE_LM_SHUFFLE(a, b, mask_type, ...) __builtin_shuffle(a, b, mask_type{__VA_ARGS__})
#endif

template <typename T, typename V>
__attribute__((always_inline)) inline void sum_pair(V p, V q, T& p_sum, T& q_sum) {
  if constexpr (Simd<T>::lanes == 8) {
    typedef int32_t M __attribute__((vector_size(32)));
    const V u = SPARSE_LM_SHUFFLE(p, q, M, 0, 1, 2, 3, 8, 9, 10, 11) + SPARSE_LM_SHUFFLE(p, q, M, 4, 5, 6, 7, 12, 13, 14, 15);
    const V w = u + SPARSE_LM_SHUFFLE(u, u, M, 2, 3, 0, 1, 6, 7, 4, 5);
    const V z = w + SPARSE_LM_SHUFFLE(w, w, M, 1, 0, 3, 2, 5, 4, 7, 6);
    p_sum = z[0];
    q_sum = z[4];
  } else {
    typedef int64_t M __attribute__((vector_size(32)));
    const V u = SPARSE_LM_SHUFFLE(p, q, M, 0, 1, 4, 5) + SPARSE_LM_SHUFFLE(p, q, M, 2, 3, 6, 7);
    const V z = u + SPARSE_LM_SHUFFLE(u, u, M, 1, 0, 3, 2);
    p_sum = z[0];
    q_sum = z[2];
  }
}

// Value gradients of rows r0 .. r1's elements (in group order), added into `sums`, over a pass of
// `chunks` token tiles: tiles [chunks, n, tile] of g (n = n_out) and of x (n = n_in). Chunk by
// chunk, so that the x tile the elements read at random (n_in · 256 bytes) stays in L2 rather
// than whole 512-token rows of x read at random from L3.
template <typename T>
__attribute__((always_inline)) inline void dots_body(const T* g_tiles, const T* x_tiles, const int32_t* minors,
                                                     const int64_t* starts, int64_t r0, int64_t r1, int64_t chunks,
                                                     int64_t n_out, int64_t n_in, T* sums) {
  using V = typename Simd<T>::vec;
  constexpr int tile = Simd<T>::tile;
  for (int64_t c = 0; c < chunks; ++c) {
    const T* x_chunk = x_tiles + c * n_in * tile;
    for (int64_t r = r0; r < r1; ++r) {
      V a[VECTORS];
      for (int v = 0; v < VECTORS; ++v) a[v] = reinterpret_cast<const V*>(g_tiles + (c * n_out + r) * tile)[v];
      int64_t k = starts[r];
      for (; k + 2 <= starts[r + 1]; k += 2) {  // two elements at once, four independent sums
        const V* b0 = reinterpret_cast<const V*>(x_chunk + int64_t(minors[k]) * tile);
        const V* b1 = reinterpret_cast<const V*>(x_chunk + int64_t(minors[k + 1]) * tile);
        V s0 = a[0] * b0[0], t0 = a[1] * b0[1], s1 = a[0] * b1[0], t1 = a[1] * b1[1];
#pragma GCC unroll 4
        for (int v = 2; v < VECTORS; v += 2) {
          s0 += a[v] * b0[v];
          t0 += a[v + 1] * b0[v + 1];
          s1 += a[v] * b1[v];
          t1 += a[v + 1] * b1[v + 1];
        }
        T sum0, sum1;
        sum_pair<T>(s0 + t0, s1 + t1, sum0, sum1);
        sums[k] += sum0;
        sums[k + 1] += sum1;
      }
      if (k < starts[r + 1]) {
        const V* b = reinterpret_cast<const V*>(x_chunk + int64_t(minors[k]) * tile);
        V s = a[0] * b[0];
        for (int v = 1; v < VECTORS; ++v) s += a[v] * b[v];
        T sum, unused;
        sum_pair<T>(s, s, sum, unused);
        sums[k] += sum;
      }
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
#define SPARSE_LM_X86 1
template <typename T>
__attribute__((target("avx2,fma"))) void rows_avx2(const T* w, const int32_t* minors, const int64_t* starts,
                                                  int64_t m0, int64_t m1, const T* tiles, int64_t n_out, int64_t t,
                                                  T* out) {
  rows_body<T>(w, minors, starts, m0, m1, tiles, n_out, t, out);
}

template <typename T>
__attribute__((target("avx2,fma"))) void dots_avx2(const T* g_tiles, const T* x_tiles, const int32_t* minors,
                                                  const int64_t* starts, int64_t r0, int64_t r1, int64_t chunks,
                                                  int64_t n_out, int64_t n_in, T* sums) {
  dots_body<T>(g_tiles, x_tiles, minors, starts, r0, r1, chunks, n_out, n_in, sums);
}

bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}
#endif

// Output columns m0 .. m1 of a token tile: column m sums w[k] · tiles[minors[k]] over its elements.
template <typename T>
void rows_of(const T* w, const int32_t* minors, const int64_t* starts, int64_t m0, int64_t m1, const T* tiles,
             int64_t n_out, int64_t t, T* out) {
#ifdef SPARSE_LM_X86
  if (has_avx2()) return rows_avx2<T>(w, minors, starts, m0, m1, tiles, n_out, t, out);
#endif
  rows_body<T>(w, minors, starts, m0, m1, tiles, n_out, t, out);
}

template <typename T>
void dots(const T* g_tiles, const T* x_tiles, const int32_t* minors, const int64_t* starts, int64_t r0, int64_t r1,
          int64_t chunks, int64_t n_out, int64_t n_in, T* sums) {
#ifdef SPARSE_LM_X86
  if (has_avx2()) return dots_avx2<T>(g_tiles, x_tiles, minors, starts, r0, r1, chunks, n_out, n_in, sums);
#endif
  dots_body<T>(g_tiles, x_tiles, minors, starts, r0, r1, chunks, n_out, n_in, sums);
}

void check_activations(const at::Tensor& a, int64_t width, const char* what) {
  TORCH_CHECK(a.device().is_cpu() && a.dim() == 2 && a.is_contiguous() && a.size(1) == width, what,
              ": activations must be a contiguous 2-d CPU tensor of width ", width);
}

void check_index(const at::Tensor& index, const char* what) {
  TORCH_CHECK(index.device().is_cpu() && (index.scalar_type() == at::kLong || index.scalar_type() == at::kInt) &&
                  index.dim() == 1 && index.is_contiguous(),
              what, ": index must be contiguous 1-d int32 or int64");
}

// Large workspaces on transparent huge pages where the kernel offers them (madvise mode): each
// call's grouping needs ~16 bytes per element of fresh memory, and faulting it in 4 KiB pages
// (zeroed, and costly under virtualisation) was ~4 ms of a 28 ms grouping of 838k elements here.
// Every buffer is reported to torch's profiler as the allocator's own are, so memory
// measurements (tools/bench_memory.py) see it inside the op that made it.
template <typename T>
struct HugePageAllocator {
  using value_type = T;
  static constexpr size_t huge = size_t(2) << 20;
  HugePageAllocator() = default;
  template <typename U>
  HugePageAllocator(const HugePageAllocator<U>&) {}
  T* allocate(size_t n) {
    const size_t bytes = n * sizeof(T);
    void* p = bytes < huge ? ::operator new(bytes) : std::aligned_alloc(huge, (bytes + huge - 1) / huge * huge);
    if (p == nullptr) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
    if (bytes >= huge) madvise(p, bytes, MADV_HUGEPAGE);
#endif
    c10::reportMemoryUsageToProfiler(p, static_cast<int64_t>(bytes), 0, 0, c10::Device(c10::DeviceType::CPU));
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t n) {
    const size_t bytes = n * sizeof(T);
    c10::reportMemoryUsageToProfiler(p, -static_cast<int64_t>(bytes), 0, 0, c10::Device(c10::DeviceType::CPU));
    if (bytes < huge) ::operator delete(p); else std::free(p);
  }
  template <typename U>
  bool operator==(const HugePageAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const HugePageAllocator<U>&) const { return false; }
};

template <typename T>
using Buffer = std::vector<T, HugePageAllocator<T>>;

// B's slots grouped by major, each major's in increasing minor order: an LSD radix sort, 8 bits
// a pass, of words (major, minor, slot) packed in 64 bits (rows · cols · slots < 2^64; Python's
// `kernels.element_keys_fit` sends larger layers to the tiles). An argsort and the gathers around
// it cost as much as the product itself at 10% density; a counting sort straight into one bucket
// per major (thousands of write streams, most missing the TLB) grouped 838k elements in 38 ms,
// this sort in 28. Memory: 16 bytes an element while sorting, 12 after (the words and each
// element's minor) — at most the layer's fp32 weight at 25% of it. Slots taken: index < rows ·
// cols and, where `mask` is given, mask true. major/minor = row/col of the position (by_row) or
// col/row.
struct Grouped {
  std::vector<int64_t> starts;  // [n_major + 1]: a major's elements are starts[m] .. starts[m+1]
  Buffer<uint64_t> words;       // (major, minor, slot) of each grouped element, in group order
  Buffer<int32_t> minors;       // each element's minor, unpacked for the kernels
  int slot_bits;
  int64_t slot(int64_t k) const { return static_cast<int64_t>(words[k] & ((uint64_t(1) << slot_bits) - 1)); }
};

int bits_for(int64_t n) {
  int bits = 0;
  while ((int64_t(1) << bits) < n) ++bits;
  return bits;
}

template <typename index_t>
Grouped group_by_major(const index_t* index, const bool* mask, int64_t n, int64_t rows, int64_t cols, bool by_row) {
  const int64_t n_major = by_row ? rows : cols, n_minor = by_row ? cols : rows, grid = rows * cols;
  const int minor_bits = bits_for(n_minor), slot_bits = bits_for(n + 1);
  const int key_bits = minor_bits + bits_for(n_major), low_bits = minor_bits + slot_bits;
  TORCH_CHECK(key_bits + slot_bits <= 64, "element kernels: rows · cols · slots must stay below 2^64");
  Buffer<uint64_t> words, spare;
  words.reserve(n);
  for (int64_t s = 0; s < n; ++s) {
    TORCH_CHECK(index[s] >= 0 && index[s] <= grid, "element kernels: position out of range");
    if (index[s] == grid || (mask != nullptr && !mask[s])) continue;
    const int64_t row = index[s] / cols;
    const uint64_t col = index[s] - row * cols, major = by_row ? row : col, minor = by_row ? col : row;
    words.push_back(major << low_bits | minor << slot_bits | uint64_t(s));
  }
  spare.resize(words.size());
  for (int shift = slot_bits; shift < slot_bits + key_bits; shift += 8) {
    int64_t offsets[257] = {0};
    for (const uint64_t w : words) ++offsets[((w >> shift) & 255) + 1];
    for (int d = 0; d < 256; ++d) offsets[d + 1] += offsets[d];
    for (const uint64_t w : words) spare[offsets[(w >> shift) & 255]++] = w;
    words.swap(spare);
  }
  Buffer<uint64_t>().swap(spare);
  Grouped grouped{std::vector<int64_t>(n_major + 1, 0), std::move(words), Buffer<int32_t>(), slot_bits};
  grouped.minors.resize(grouped.words.size());
  const uint64_t minor_mask = (uint64_t(1) << minor_bits) - 1;
  for (size_t k = 0; k < grouped.words.size(); ++k) {
    ++grouped.starts[(grouped.words[k] >> low_bits) + 1];
    grouped.minors[k] = static_cast<int32_t>(grouped.words[k] >> slot_bits & minor_mask);
  }
  std::partial_sum(grouped.starts.begin(), grouped.starts.end(), grouped.starts.begin());
  return grouped;
}

// The grouping of B's slots (all of them, or those with mask[s]) on the stored index as it is
// (int32 in `storage`: an int64 copy per call would be the products' largest allocation).
Grouped group(const at::Tensor& index, const bool* mask, int64_t rows, int64_t cols, bool by_row) {
  return AT_DISPATCH_INDEX_TYPES(index.scalar_type(), "element kernels", [&] {
    return group_by_major(index.const_data_ptr<index_t>(), mask, index.size(0), rows, cols, by_row);
  });
}

// Tokens t0 .. of activations a [T, n] into `chunks` tiles [chunks, n, tile] (tiles[c, i] = tokens
// t0 + c·tile .. of feature i); tokens past the end are zeros, which add nothing to a dot product
// (and which the products never write out).
void to_tiles(const at::Tensor& a, int64_t t0, int64_t chunks, at::Tensor& tiles) {
  const int64_t tile = tiles.size(2);
  for (int64_t c = 0; c < chunks; ++c) {  // 2-d transposing copies: one 3-d copy made a product 1.3x slower
    const int64_t start = t0 + c * tile, t = std::min(tile, a.size(0) - start);
    auto chunk = tiles.select(0, c);
    chunk.narrow(1, 0, t).copy_(a.narrow(0, start, t).t());
    if (t < tile) chunk.narrow(1, t, tile - t).zero_();
  }
}

// a · W_Aᵀ ([T, rows]; transpose, the forward) or a · W_A ([T, cols]; the input gradient) for the
// element weight W_A of shape [rows, cols] holding values[s] at position index[s] for the slots
// with mask[s] (unused slots: index = rows · cols).
at::Tensor element_product(const at::Tensor& a, const at::Tensor& values, const at::Tensor& index,
                           const at::Tensor& mask, int64_t rows, int64_t cols, bool transpose) {
  const int64_t n_a = transpose ? cols : rows, n_out = transpose ? rows : cols;
  check_activations(a, n_a, "element_product");
  check_index(index, "element_product");
  TORCH_CHECK(values.dim() == 1 && values.is_contiguous() && values.scalar_type() == a.scalar_type() &&
                  mask.scalar_type() == at::kBool && mask.is_contiguous() && values.size(0) == index.size(0) &&
                  mask.size(0) == index.size(0),
              "element_product: values (of the activations' dtype) and mask must be contiguous, one per slot");
  const Grouped grouped = group(index, mask.const_data_ptr<bool>(), rows, cols, transpose);
  const int64_t tokens = a.size(0);
  auto out = at::empty({tokens, n_out}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "element_product", [&] {
    constexpr int64_t tile = Simd<scalar_t>::tile;
    Buffer<scalar_t> weights(grouped.words.size());
    const scalar_t* vp = values.const_data_ptr<scalar_t>();
    for (size_t k = 0; k < weights.size(); ++k) weights[k] = vp[grouped.slot(k)];
    auto tiles = at::empty({1, n_a, tile}, a.options());
    const scalar_t* tp = tiles.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    for (int64_t t0 = 0; t0 < tokens; t0 += tile) {
      const int64_t t = std::min(tile, tokens - t0);
      to_tiles(a, t0, 1, tiles);
      at::parallel_for(0, n_out, 4 * GROUP, [&](int64_t m0, int64_t m1) {
        rows_of<scalar_t>(weights.data(), grouped.minors.data(), grouped.starts.data(), m0, m1, tp, n_out, t,
                          op + t0 * n_out);
      });
    }
  });
  return out;
}

// [S]: for each slot s, g[:, row]ᵀ · x[:, col] summed over the tokens at its position (row, col)
// of the [rows, cols] grid; zero for unused slots (the value gradient at all of B).
at::Tensor element_sddmm(const at::Tensor& g, const at::Tensor& x, const at::Tensor& index, int64_t rows, int64_t cols) {
  check_activations(g, rows, "element_sddmm");
  check_activations(x, cols, "element_sddmm");
  check_index(index, "element_sddmm");
  TORCH_CHECK(g.size(0) == x.size(0) && g.scalar_type() == x.scalar_type(),
              "element_sddmm: g and x must hold as many tokens, of one dtype");
  const Grouped grouped = group(index, nullptr, rows, cols, true);
  const int64_t tokens = x.size(0);
  auto out = at::zeros({index.size(0)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "element_sddmm", [&] {
    constexpr int64_t tile = Simd<scalar_t>::tile;
    // Passes of whole tiles, bounded by the layer's own size too: never a weight's worth of tiles.
    const int64_t limit = std::min({PASS, rows * cols / std::max<int64_t>(1, rows + cols), tokens + tile - 1});
    const int64_t chunks = std::max<int64_t>(1, limit / tile);
    auto g_tiles = at::empty({chunks, rows, tile}, g.options()), x_tiles = at::empty({chunks, cols, tile}, x.options());
    // Summed in group order and placed into B's slot order once: adding into slot order pass after
    // pass would miss the cache on nearly every element (slots lie anywhere).
    Buffer<scalar_t> sums(grouped.words.size(), scalar_t(0));
    for (int64_t t0 = 0; t0 < tokens; t0 += chunks * tile) {
      const int64_t used = std::min((tokens - t0 + tile - 1) / tile, chunks);
      to_tiles(g, t0, used, g_tiles);
      to_tiles(x, t0, used, x_tiles);
      at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
        dots<scalar_t>(g_tiles.const_data_ptr<scalar_t>(), x_tiles.const_data_ptr<scalar_t>(), grouped.minors.data(),
                       grouped.starts.data(), r0, r1, used, rows, cols, sums.data());
      });
    }
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    for (size_t k = 0; k < sums.size(); ++k) op[grouped.slot(k)] = sums[k];
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparse_lm_cpu, m) {
  m.def("element_product(Tensor a, Tensor values, Tensor index, Tensor mask, int rows, int cols, bool transpose) -> Tensor",
        element_product);
  m.def("element_sddmm(Tensor g, Tensor x, Tensor index, int rows, int cols) -> Tensor", element_sddmm);
}
