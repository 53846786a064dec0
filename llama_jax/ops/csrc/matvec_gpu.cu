// One-row matmuls of decoding (x [1, K] bf16 @ a weight [K, N]) for Hopper GPUs, called through the
// XLA FFI (llama_jax/ops/cuda_matvec.py):
//
//   out[N] = x @ layer `layer` of W    W: bf16 [L, K, N], or quantize.py's int8 / int4 codes [L, Kstored, N]
//
// A decode step's layer runs as five launches of it and attention_gpu.cu's attention kernel, all from one
// FFI call (LayerImpl below); for quantized weights each launch after the first is a programmatic dependent
// of the one before: it starts while that one finishes, and waits for its outputs only where it reads
// them. The input can pass through the layer's RMSNorm (rmsnorm(x) @ W, for q/k/v and gate/up) or the
// SwiGLU (silu(gate) * up @ W, for down) on its way in, and the residual can be added on the way out
// (x + h, for o and down), each rounded to bf16 where the model rounds, so the small XLA kernels between
// the matmuls go away.
//
// At batch 1 every weight byte is read once per token, so the kernel's job is to keep HBM busy:
// each thread loads 16 bytes of a row (8 bf16 or 16 int8/int4 columns), a chunk of rows at a time with
// all of the chunk's loads issued before the first use (chunks of 8 rows double-buffered), and sums in
// float32 registers. Quantized codes are decoded in registers by byte permutes, cheaper than
// conversions: an int8 code c (stored + 128) placed in the mantissa of 2^23 is the float 2^23 + c + 128,
// exactly, and one subtraction leaves c; an int4 code u placed in the mantissa of 0.5 is f = 0.5 + u/256,
// used as it is. Per chunk of a scale group (scale s, zero point z; symmetric int4: u - 8, times s):
//     x . w = 256 s A + (z - 128 s) X,  A = sum_k x_k f_k, X = sum_k x_k      (int4 with zero points)
//     x . w = s (256 A - 136 X)                                            (symmetric int4)
//     x . w = s * sum_k x_k c_k                         (int8; per channel, s applies at the end)
//
// Grid: x = column blocks (256 bytes of a row each: 16 threads x 16 bytes) of up to three weights side
// by side (q/k/v, gate/up: one launch); y = `split` parts of K. A block's 16 row lanes take chunks of
// rows in turn and their sums meet in shared memory. The parts of K form one thread-block cluster:
// each block sends the others their shares of its column sums (distributed shared memory) and adds
// up its own share in a fixed order: no second kernel, no atomics, the same result every run.

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "attention_gpu.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
namespace cg = cooperative_groups;

namespace {

constexpr int kThreads = 256;
constexpr int kRowThreads = 16;                 // threads across a row: 16 x 16 bytes
constexpr int kLanes = kThreads / kRowThreads;  // rows in flight at once per block
constexpr int kMaxWeights = 3;
constexpr int kMaxSplit = 8;  // the portable cluster size

enum ScaleType : int { kScaleF32 = 0, kScaleF16 = 1, kScaleBF16 = 2 };

struct Weight {
  const uint8_t* codes;  // [L, rows, n]: bf16, int8 or packed int4
  const uint16_t* residual;  // [n] bf16 added to the rounded product, or null
  const void* scales;    // [L, groups, n] (per channel: groups = 1), or null for bf16
  const void* zeros;     // like scales, or null
  void* out;             // [n] float32 or bf16
  int n;                 // columns
  int first_block;       // this weight's first column block along the grid's x
};

enum XMode : int { kXPlain = 0, kXNorm = 1, kXSwiGLU = 2 };

struct Params {
  const uint16_t* x;  // [K] bf16 bits
  const uint16_t* up;  // kXSwiGLU: [K] bf16, the input being silu(x) * up
  const void* norm;    // kXNorm: the RMSNorm weight [L, K] bf16, the input being rmsnorm(x)
  int x_mode;          // XMode
  float eps;
  int k;               // K
  const int32_t* layer;
  Weight w[kMaxWeights];
  int n_weights;
  int rows;        // stored rows a layer: K (bf16, int8) or K / 2 (int4)
  int group_rows;  // stored rows a scale group, 0 for none (bf16) or one per channel (int8, group = K)
  int group;       // codes a scale group
  int scale_type;  // ScaleType
  bool dependent;  // launched as a programmatic dependent of the kernel before it (the decoder layer)
};

// What one thread loads from a row: 16 bytes, 4 words (8 bf16, or 16 int8 or int4 columns). Loads of 8
// bytes made the int4 kernels slower on an H100.
constexpr int kWords = 4;
struct Vec {
  uint32_t w[kWords];
};

template <int kBits>
struct Scheme {
  static constexpr int kCols = kBits == 16 ? 2 * kWords : 4 * kWords;
  static constexpr int kColBytes = kBits == 16 ? 2 : 1;
};

__device__ __forceinline__ float Bf16ToFloat(uint32_t bits16) { return __uint_as_float(bits16 << 16); }

// Byte b of w, an int4 code u (0-15), as the float f = 0.5 + u / 256, exactly, in one byte permute: the
// byte goes into bits 16-23 of 0.5 (0x3F000000). Products x f keep their rounding small (f is about
// 0.5), and the 0.5 X that the sums carry comes off once per chunk, not once per code.
__device__ __forceinline__ float NibbleFloat(uint32_t w, int b) {
  return __uint_as_float(__byte_perm(w, 0x3F000000u, 0x7054u | (b << 8)));
}

// Byte b of w, an int8 code c + 128 (0-255), as the float c, exactly: the byte goes into the mantissa
// of 2^23, and 2^23 + 128 comes off. (An int8 byte in the mantissa of 0.5, as for int4, would sit 16
// bits down and lose 1e-4 of the sum to the cancellation; the subtraction costs no measurable time.)
__device__ __forceinline__ float ByteFloat(uint32_t w, int b) {
  return __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7650u | b)) - 8388736.f;
}

// Streamed once per token: no point keeping them in L1, and evict them from L2 first.
__device__ __forceinline__ Vec LoadStream(const uint8_t* p) {
  const uint4 u = __ldcs(reinterpret_cast<const uint4*>(p));
  return Vec{{u.x, u.y, u.z, u.w}};
}

// N scales (or zero points, N a multiple of 8) from element `idx` on: N-element aligned.
template <int N>
__device__ __forceinline__ void LoadScales(const void* base, int type, size_t idx, float* out) {
  if (type == kScaleF32) {
    const float4* p = reinterpret_cast<const float4*>(static_cast<const float*>(base) + idx);
#pragma unroll
    for (int i = 0; i < N / 4; ++i) {
      float4 v = __ldg(p + i);
      out[4 * i] = v.x, out[4 * i + 1] = v.y, out[4 * i + 2] = v.z, out[4 * i + 3] = v.w;
    }
    return;
  }
  const uint4* p = reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(base) + idx);
#pragma unroll
  for (int i = 0; i < N / 8; ++i) {
    uint4 v = __ldg(p + i);
    uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      uint32_t lo = words[j] & 0xFFFFu, hi = words[j] >> 16;
      if (type == kScaleF16) {
        out[8 * i + 2 * j] = __half2float(__ushort_as_half(static_cast<unsigned short>(lo)));
        out[8 * i + 2 * j + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(hi)));
      } else {
        out[8 * i + 2 * j] = Bf16ToFloat(lo);
        out[8 * i + 2 * j + 1] = Bf16ToFloat(hi);
      }
    }
  }
}

__device__ __forceinline__ float LoadScalar(const void* base, int type, size_t idx) {
  if (type == kScaleF32) return __ldg(static_cast<const float*>(base) + idx);
  uint16_t bits = __ldg(static_cast<const unsigned short*>(base) + idx);
  return type == kScaleF16 ? __half2float(__ushort_as_half(bits)) : Bf16ToFloat(bits);
}

__device__ __forceinline__ void Store(float* out, int i, float v) { out[i] = v; }
__device__ __forceinline__ void Store(__nv_bfloat16* out, int i, float v) { out[i] = __float2bfloat16(v); }

// kStaged: the input goes through the norm or the SwiGLU into shared memory first (else it is read as it is).
// kGrouped: scales by group along K (int4; int8 in groups), else one per column (int8) or none (bf16).
template <int kBits, int kChunk, bool kStaged, bool kGrouped, typename Out>
__global__ void __launch_bounds__(kThreads, 2) MatvecKernel(const Params p) {
  constexpr int V = Scheme<kBits>::kCols;
  using Chunk = Vec[kChunk];
  constexpr int kBlockCols = kRowThreads * V;
  __shared__ float lanes[kLanes][kBlockCols];
  __shared__ float block_sum[kBlockCols];
  __shared__ float received[kBlockCols];  // the cluster's sums of this block's share of the columns, by part
  __shared__ float warp_sums[kThreads / 32];
  extern __shared__ uint16_t xs[];  // this block's range of the input, after the norm or the SwiGLU (bf16)

  // Which weight this column block belongs to (a select, so that the parameters stay in constant memory).
  Weight w = p.w[0];
#pragma unroll
  for (int i = 1; i < kMaxWeights; ++i)
    if (i < p.n_weights && static_cast<int>(blockIdx.x) >= p.w[i].first_block) w = p.w[i];

  // The blocks of a cluster write into each other's shared memory at the end, which needs every block
  // started: each says so now and checks for the others before its first write.
  if (gridDim.y > 1) asm volatile("barrier.cluster.arrive.relaxed.aligned;");

  const int tid = threadIdx.x, lane = tid / kRowThreads, t = tid % kRowThreads;
  const int block_col = (blockIdx.x - w.first_block) * kBlockCols;
  const int col = block_col + t * V;
  const bool active = col < w.n;
  const int layer = *p.layer;
  const size_t row_bytes = static_cast<size_t>(w.n) * Scheme<kBits>::kColBytes;
  const uint8_t* codes = w.codes + static_cast<size_t>(layer) * p.rows * row_bytes + col * Scheme<kBits>::kColBytes;
  const int n_groups = kGrouped ? p.rows / p.group_rows : 1;

  float acc[V];
#pragma unroll
  for (int i = 0; i < V; ++i) acc[i] = 0.f;

  // This block's part of K: chunks [c_begin, c_end), inputs [k_lo, k_hi) (int4: whole scale groups).
  const int chunks = p.rows / kChunk, split = gridDim.y;
  const int c_begin = blockIdx.y * chunks / split, c_end = (blockIdx.y + 1) * chunks / split;
  int k_lo = c_begin * kChunk, k_hi = c_end * kChunk;
  if (kBits == 4) {
    k_lo = k_lo / p.group_rows * p.group;
    k_hi = (k_hi + p.group_rows - 1) / p.group_rows * p.group;
  }

  auto input = [&](int k) { return Bf16ToFloat(kStaged ? xs[k - k_lo] : __ldcg(p.x + k)); };
  auto load = [&](int c, Vec* v) {
#pragma unroll
    for (int r = 0; r < kChunk; ++r) v[r] = LoadStream(codes + static_cast<size_t>(c * kChunk + r) * row_bytes);
  };
  // Adds one row of int8 codes (ws), times its input xk, into sums (acc per channel, the group's partial
  // sums in groups).
  auto add_int8_row = [&](float (&sums)[V], float xk, const uint32_t* ws) {
#pragma unroll
    for (int i = 0; i < kWords; ++i) {
      const uint32_t u = ws[i] ^ 0x80808080u;  // the signed code + 128, as an unsigned byte
#pragma unroll
      for (int b = 0; b < 4; ++b) sums[4 * i + b] = fmaf(xk, ByteFloat(u, b), sums[4 * i + b]);
    }
  };
  // Adds chunk c (its codes in v) into acc.
  auto consume = [&](int c, const Vec* v) {
    const int r0 = c * kChunk;
    if constexpr (kBits == 16) {
#pragma unroll
      for (int r = 0; r < kChunk; ++r) {
        const float xk = input(r0 + r);
        const uint32_t* ws = v[r].w;
#pragma unroll
        for (int i = 0; i < kWords; ++i) {
          acc[2 * i] = fmaf(xk, __uint_as_float(ws[i] << 16), acc[2 * i]);
          acc[2 * i + 1] = fmaf(xk, __uint_as_float(ws[i] & 0xFFFF0000u), acc[2 * i + 1]);
        }
      }
      return;
    } else if constexpr (kBits == 8 && !kGrouped) {  // per-channel int8: the scale multiplies the final sum
#pragma unroll
      for (int r = 0; r < kChunk; ++r) add_int8_row(acc, input(r0 + r), v[r].w);
      return;
    } else {
      // int8 in groups: A = sum_k x_k c_k. int4: A = sum_k x_k f_k and X = sum_k x_k, f_k = NibbleFloat.
      float a[V], x_sum = 0.f;
#pragma unroll
      for (int i = 0; i < V; ++i) a[i] = 0.f;
      const int g = r0 / p.group_rows;
#pragma unroll
      for (int r = 0; r < kChunk; ++r) {
        const uint32_t* ws = v[r].w;
        if constexpr (kBits == 8) {
          add_int8_row(a, input(r0 + r), ws);
        } else {
          // Byte j of a group holds code j (low nibble) and code j + group / 2 (high nibble).
          const int k = g * p.group + (r0 + r - g * p.group_rows);
          const float x_lo = input(k), x_hi = input(k + p.group / 2);
          x_sum += x_lo + x_hi;
#pragma unroll
          for (int i = 0; i < kWords; ++i) {
            const uint32_t lo = ws[i] & 0x0F0F0F0Fu, hi = (ws[i] >> 4) & 0x0F0F0F0Fu;
#pragma unroll
            for (int b = 0; b < 4; ++b)
              a[4 * i + b] = fmaf(x_hi, NibbleFloat(hi, b), fmaf(x_lo, NibbleFloat(lo, b), a[4 * i + b]));
          }
        }
      }
      float s[V];
      const size_t at = (static_cast<size_t>(layer) * n_groups + g) * w.n + col;
      LoadScales<V>(w.scales, p.scale_type, at, s);
      if (kBits == 8) {  // s * sum x c
#pragma unroll
        for (int i = 0; i < V; ++i) acc[i] = fmaf(s[i], a[i], acc[i]);
      } else if (w.zeros != nullptr) {  // s * sum x u + z X, sum x u = 256 A - 128 X
        float z[V];
        LoadScales<V>(w.zeros, p.scale_type, at, z);
#pragma unroll
        for (int i = 0; i < V; ++i) acc[i] = fmaf(256.f * s[i], a[i], fmaf(z[i] - 128.f * s[i], x_sum, acc[i]));
      } else {  // symmetric: s * sum x (u - 8) = s (256 A - 136 X)
#pragma unroll
        for (int i = 0; i < V; ++i) acc[i] = fmaf(s[i], fmaf(256.f, a[i], -136.f * x_sum), acc[i]);
      }
    }
  };

  // The input, into shared memory as the model rounds it (bf16), while the first chunk's loads are in
  // flight: rmsnorm(x) = x * rsqrt(mean(x^2) + eps) * weight (the block sums x^2 over all of K), or
  // silu(x) * up, or x as it is.
  auto stage_input = [&]() {
    if constexpr (kStaged) {
      // 8 inputs a thread at a time, one 16-byte load each (K and this block's range are multiples of 8).
      // Every load is issued in one pass: x over all of K for the norm's sum of squares (the norm weight
      // and this block's range of x wait in shared memory meanwhile), or x and up for the SwiGLU.
      const uint4* x8 = reinterpret_cast<const uint4*>(p.x);
      uint4* xs8 = reinterpret_cast<uint4*>(xs);
      const int lo8 = k_lo / 8, n8 = (k_hi - k_lo) / 8;
      if (p.x_mode == kXNorm) {
        uint4* gs8 = xs8 + n8;  // the norm weight's range, after x's
        const uint4* g8 = reinterpret_cast<const uint4*>(p.norm) + static_cast<size_t>(layer) * (p.k / 8);
        float ss = 0.f;
#pragma unroll 4
        for (int i = tid; i < p.k / 8; i += kThreads) {
          const uint4 v = __ldcg(x8 + i);
          if (i >= lo8 && i < lo8 + n8) xs8[i - lo8] = v, gs8[i - lo8] = __ldg(g8 + i);
          for (uint32_t w : {v.x, v.y, v.z, v.w}) {
            const float lo = Bf16ToFloat(w & 0xFFFFu), hi = Bf16ToFloat(w >> 16);
            ss = fmaf(lo, lo, fmaf(hi, hi, ss));
          }
        }
#pragma unroll
        for (int off = 16; off > 0; off /= 2) ss += __shfl_xor_sync(0xFFFFFFFFu, ss, off);
        if (tid % 32 == 0) warp_sums[tid / 32] = ss;
        __syncthreads();
        ss = 0.f;
#pragma unroll
        for (int i = 0; i < kThreads / 32; ++i) ss += warp_sums[i];
        const float inv_rms = rsqrtf(ss / p.k + p.eps);
        // x * rsqrt(mean(x^2) + eps) * weight, rounded to bf16 (RMSNorm.__call__)
        for (int i = tid; i < n8 * 8; i += kThreads)
          xs[i] = __bfloat16_as_ushort(__float2bfloat16(Bf16ToFloat(xs[i]) * inv_rms * Bf16ToFloat(xs[n8 * 8 + i])));
      } else {  // silu(gate) * up, rounded to bf16 (MLP.__call__)
        const uint4* up8 = reinterpret_cast<const uint4*>(p.up);
#pragma unroll 4
        for (int i = tid; i < n8; i += kThreads) {
          const uint4 g = __ldcg(x8 + lo8 + i), u = __ldcg(up8 + lo8 + i);
          const uint32_t gs[4] = {g.x, g.y, g.z, g.w}, us[4] = {u.x, u.y, u.z, u.w};
          uint32_t out[4];
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const float g0 = Bf16ToFloat(gs[j] & 0xFFFFu), g1 = Bf16ToFloat(gs[j] >> 16);
            const float h0 = g0 / (1.f + __expf(-g0)) * Bf16ToFloat(us[j] & 0xFFFFu);
            const float h1 = g1 / (1.f + __expf(-g1)) * Bf16ToFloat(us[j] >> 16);
            out[j] = __bfloat16_as_ushort(__float2bfloat16(h0)) |
                     (static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16(h1))) << 16);
          }
          xs8[i] = make_uint4(out[0], out[1], out[2], out[3]);
        }
      }
      __syncthreads();
    }
  };

  // x, up and the residual are the outputs of the launch before when this one is its programmatic dependent:
  // complete from here on (a no-op otherwise). Only weights are read before it, and nothing is written. They
  // are read with coherent loads (__ldcg), never __ldg: ptxas takes a non-coherent load for a constant of
  // the whole kernel and may hoist it above the wait (it did in the attention kernel).
  // (int4's first chunk loaded before it, as bf16's and int8's are, made the step 8-16% slower: the input's
  // loads then queue behind the chunk's.)
  auto wait_for_inputs = [&]() { asm volatile("griddepcontrol.wait;" ::: "memory"); };

  // Each lane takes every kLanes-th chunk of this block's part of K. Chunks of 8 rows are double-buffered:
  // the next chunk's loads are in flight while the lane sums the current one.
  if constexpr (kChunk == 8) {
    // Two chunks in flight before the input is staged; then each is summed while the other loads.
    Chunk buf_a, buf_b;
    int c = c_begin + lane;
    if (active && c < c_end) load(c, buf_a);
    if (active && c + kLanes < c_end) load(c + kLanes, buf_b);
    wait_for_inputs();
    stage_input();
    for (; active && c < c_end; c += 2 * kLanes) {
      consume(c, buf_a);
      if (c + 2 * kLanes < c_end) load(c + 2 * kLanes, buf_a);
      if (c + kLanes >= c_end) break;
      consume(c + kLanes, buf_b);
      if (c + 3 * kLanes < c_end) load(c + 3 * kLanes, buf_b);
    }
  } else {  // two chunks of 16 rows would not fit in registers: one at a time (and one held across
            // stage_input would spill for int4)
    wait_for_inputs();
    stage_input();
    for (int c = c_begin + lane; active && c < c_end; c += kLanes) {
      Chunk buf;
      load(c, buf);
      consume(c, buf);
    }
  }

  // In a decoder layer the next launch may start now, on the SMs that this one leaves free, and issue what
  // does not depend on us. (Letting it start at our own start instead, int4's step took 2.33 ms, not 2.30.)
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");

  // The block's lanes meet in shared memory; then the blocks of the cluster (the parts of K) meet: each
  // block sends its sums of every other block's share of the columns into that block's shared memory
  // (distributed shared memory), and after one cluster barrier adds up its own share in part order.
#pragma unroll
  for (int i = 0; i < V; ++i) lanes[lane][t * V + i] = acc[i];
  __syncthreads();
  const int split_parts = gridDim.y, share = kBlockCols / split_parts;
  const bool per_channel = kBits == 8 && !kGrouped;
  auto finish = [&](int i, float total) {
    const int n = block_col + i;
    if (n >= w.n) return;
    if (per_channel) total *= LoadScalar(w.scales, p.scale_type, static_cast<size_t>(layer) * w.n + n);
    if (w.residual != nullptr)  // the model's x + h: h rounded to bf16, then the sum
      total = Bf16ToFloat(__bfloat16_as_ushort(__float2bfloat16(total))) + Bf16ToFloat(__ldcg(w.residual + n));
    Store(static_cast<Out*>(w.out), n, total);
  };
  for (int i = tid; i < kBlockCols; i += kThreads) {
    float s = 0.f;
#pragma unroll
    for (int l = 0; l < kLanes; ++l) s += lanes[l][i];
    block_sum[i] = s;
  }
  __syncthreads();
  if (split_parts == 1) {
    for (int i = tid; i < kBlockCols; i += kThreads) finish(i, block_sum[i]);
    return;
  }
  cg::cluster_group cluster = cg::this_cluster();
  asm volatile("barrier.cluster.wait.aligned;" ::: "memory");  // every block of the cluster has started
  for (int i = tid; i < kBlockCols; i += kThreads)
    cluster.map_shared_rank(received, i / share)[blockIdx.y * share + i % share] = block_sum[i];
  cluster.sync();  // release the writes above, acquire the others'
  for (int i = tid; i < share; i += kThreads) {
    float total = 0.f;
    for (int part = 0; part < split_parts; ++part) total += received[part * share + i];
    finish(blockIdx.y * share + i, total);
  }
}

template <int kBits, int kChunk, typename Out>
cudaError_t Launch(cudaStream_t stream, const Params& p, int blocks, int split, size_t smem) {
  const bool staged = p.x_mode != kXPlain;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(blocks, split, 1);
  config.blockDim = dim3(kThreads, 1, 1);
  config.dynamicSmemBytes = staged ? smem : 0;
  config.stream = stream;
  cudaLaunchAttribute attribute[2];
  int n = 0;
  if (split > 1) {
    attribute[n].id = cudaLaunchAttributeClusterDimension;
    attribute[n].val.clusterDim.x = 1;
    attribute[n].val.clusterDim.y = split;
    attribute[n].val.clusterDim.z = 1;
    ++n;
  }
  if (p.dependent) {
    attribute[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute[n].val.programmaticStreamSerializationAllowed = 1;
    ++n;
  }
  config.attrs = attribute;
  config.numAttrs = n;
  // Scales by group: always for int4, never for bf16, as the weight says for int8.
  if constexpr (kBits == 8) {
    if (p.group_rows == 0)
      return staged ? cudaLaunchKernelEx(&config, MatvecKernel<8, kChunk, true, false, Out>, p)
                    : cudaLaunchKernelEx(&config, MatvecKernel<8, kChunk, false, false, Out>, p);
  }
  constexpr bool kGrouped = kBits != 16;
  return staged ? cudaLaunchKernelEx(&config, MatvecKernel<kBits, kChunk, true, kGrouped, Out>, p)
                : cudaLaunchKernelEx(&config, MatvecKernel<kBits, kChunk, false, kGrouped, Out>, p);
}

template <int kBits, typename Out>
cudaError_t LaunchChunk(cudaStream_t stream, const Params& p, int blocks, int split, int chunk, size_t smem) {
  return chunk == 8 ? Launch<kBits, 8, Out>(stream, p, blocks, split, smem)
                    : Launch<kBits, 16, Out>(stream, p, blocks, split, smem);
}

ffi::Error Fail(const std::string& message) { return ffi::Error::InvalidArgument("llama_jax matvec_gpu: " + message); }

// One launch: x @ layer `layer` of n_weights weights (w3: codes, scales and zero points of each) into outs, with
// the norm, the SwiGLU's up or the residual where those are given (not null, not empty).
ffi::Error LaunchMatvec(cudaStream_t stream, const ffi::AnyBuffer& x, const int32_t* layer_index, const ffi::AnyBuffer* up,
                        const ffi::AnyBuffer* norm, const ffi::AnyBuffer* residual, const ffi::AnyBuffer* w3,
                        const ffi::AnyBuffer* outs, int n_weights, int64_t bits, int64_t split,
                        int64_t chunk, float eps, bool dependent) {
  if (n_weights < 1 || n_weights > kMaxWeights) return Fail("expected 1 to 3 weights");
  if (bits != 16 && bits != 8 && bits != 4) return Fail("bits must be 16, 8 or 4");
  if (split < 1 || split > kMaxSplit || (split & (split - 1))) return Fail("split must be 1, 2, 4 or 8");
  if (chunk != 8 && chunk != 16) return Fail("chunk must be 8 or 16");
  if (x.element_type() != ffi::DataType::BF16) return Fail("x must be bfloat16");
  const int cols = bits == 16 ? 8 : 16, block_cols = kRowThreads * cols;
  Params p = {};
  p.x = static_cast<const uint16_t*>(x.untyped_data());
  p.k = static_cast<int>(x.element_count());
  p.layer = layer_index;
  p.eps = eps;
  p.dependent = dependent;
  if (up && up->element_count()) {
    if (up->element_type() != ffi::DataType::BF16 || up->element_count() != x.element_count())
      return Fail("up must be bfloat16 like x");
    p.x_mode = kXSwiGLU, p.up = static_cast<const uint16_t*>(up->untyped_data());
  } else if (norm && norm->element_count()) {
    if (norm->element_count() % x.element_count()) return Fail("the norm weight must be [layers, K]");
    if (norm->element_type() != ffi::DataType::BF16) return Fail("the norm weight must be bfloat16 like x");
    p.x_mode = kXNorm, p.norm = norm->untyped_data();
  }
  p.n_weights = n_weights;
  p.scale_type = kScaleF32;
  ffi::DataType out_type = ffi::DataType::F32;
  int blocks = 0;
  for (int i = 0; i < n_weights; ++i) {
    const ffi::AnyBuffer *codes = &w3[3 * i], *scales = &w3[3 * i + 1], *zeros = &w3[3 * i + 2];
    const ffi::AnyBuffer* out = &outs[i];
    auto dims = codes->dimensions();
    if (dims.size() != 3) return Fail("codes must be [layers, rows, columns]");
    const int rows = static_cast<int>(dims[1]), n = static_cast<int>(dims[2]);
    if (i == 0) p.rows = rows;
    if (rows != p.rows) return Fail("the weights of one launch must share K");
    if (n % cols) return Fail("columns must be a multiple of " + std::to_string(cols));
    if (out->element_count() != static_cast<size_t>(n)) return Fail("each output must be [1, N]");
    if (i == 0) out_type = out->element_type();
    if (out->element_type() != out_type ||
        (out_type != ffi::DataType::F32 && out_type != ffi::DataType::BF16))
      return Fail("outputs must all be float32 or all bfloat16");
    Weight& w = p.w[i];
    w.codes = static_cast<const uint8_t*>(codes->untyped_data());
    w.scales = scales->element_count() ? scales->untyped_data() : nullptr;
    w.zeros = zeros->element_count() ? zeros->untyped_data() : nullptr;
    w.out = out->untyped_data();
    w.n = n;
    w.first_block = blocks;
    blocks += (n + block_cols - 1) / block_cols;
    if (bits != 16) {
      if (w.scales == nullptr) return Fail("quantized weights need scales");
      switch (scales->element_type()) {
        case ffi::DataType::F32: p.scale_type = kScaleF32; break;
        case ffi::DataType::F16: p.scale_type = kScaleF16; break;
        case ffi::DataType::BF16: p.scale_type = kScaleBF16; break;
        default: return Fail("scales must be float32, float16 or bfloat16");
      }
      // The scales' groups along K give the group: one (K) per channel.
      const int groups = static_cast<int>(scales->dimensions()[1]);
      const int k = bits == 4 ? 2 * rows : rows;
      if (groups < 1 || k % groups) return Fail("the scales' groups do not divide K");
      if (i > 0 && k / groups != p.group) return Fail("the weights of one launch must share their scheme");
      p.group = k / groups;
      p.group_rows = (bits == 8 && groups == 1) ? 0 : (bits == 4 ? p.group / 2 : p.group);
      if (p.group_rows % chunk) return Fail("a scale group must hold whole chunks of rows");
    }
  }
  if (p.rows % chunk) return Fail("K must be a multiple of the chunk");
  if ((bits == 4 ? 2 * p.rows : p.rows) != p.k) return Fail("x must be [1, K]");
  if (residual && residual->element_count()) {
    if (n_weights != 1 || residual->element_type() != ffi::DataType::BF16 || out_type != ffi::DataType::BF16 ||
        residual->element_count() != static_cast<size_t>(p.w[0].n))
      return Fail("a residual is [1, N] bfloat16, for one weight with a bfloat16 output");
    p.w[0].residual = static_cast<const uint16_t*>(residual->untyped_data());
  }
  // Shared memory for a block's inputs (bf16): its rows of K, widened to whole scale groups for int4.
  const int chunks = p.rows / static_cast<int>(chunk), max_rows = (chunks + split - 1) / split * static_cast<int>(chunk);
  // The norm's weight sits beside x.
  const size_t smem = (p.x_mode == kXNorm ? 4 : 2) *
                      static_cast<size_t>(bits == 4 ? (max_rows / p.group_rows + 2) * p.group : max_rows);
  if (p.x_mode != kXPlain && smem > 28 * 1024) return Fail("K is too long for one part: raise split");
  if (p.k % 8) return Fail("K must be a multiple of 8");
  for (int i = n_weights; i < kMaxWeights; ++i) p.w[i] = p.w[0], p.w[i].first_block = 1 << 30;
  cudaError_t err;
  const bool f32 = out_type == ffi::DataType::F32;
  const int s = static_cast<int>(split), c = static_cast<int>(chunk);
  if (bits == 16)
    err = f32 ? LaunchChunk<16, float>(stream, p, blocks, s, c, smem) : LaunchChunk<16, __nv_bfloat16>(stream, p, blocks, s, c, smem);
  else if (bits == 8)
    err = f32 ? LaunchChunk<8, float>(stream, p, blocks, s, c, smem) : LaunchChunk<8, __nv_bfloat16>(stream, p, blocks, s, c, smem);
  else
    err = f32 ? LaunchChunk<4, float>(stream, p, blocks, s, c, smem) : LaunchChunk<4, __nv_bfloat16>(stream, p, blocks, s, c, smem);
  if (err != cudaSuccess) return ffi::Error::Internal(std::string("llama_jax matvec_gpu: ") + cudaGetErrorString(err));
  return ffi::Error::Success();
}


// The remaining operands (weight i's codes, scales and zero points at 3 i, 3 i + 1, 3 i + 2) into w3, and the
// results into outs.
template <int kMax>
ffi::Error Collect(ffi::RemainingArgs& args, size_t n_args, ffi::AnyBuffer (&w3)[kMax], ffi::RemainingRets& rets,
                   size_t n_rets, ffi::AnyBuffer (&outs)[kMax]) {
  for (size_t i = 0; i < n_args; ++i) {
    auto b = args.get<ffi::AnyBuffer>(i);
    if (!b) return Fail("could not read operand " + std::to_string(i) + " of the weights");
    w3[i] = *b;
  }
  for (size_t i = 0; i < n_rets; ++i) {
    auto b = rets.get<ffi::AnyBuffer>(i);
    if (!b) return Fail("could not read result " + std::to_string(i));
    outs[i] = **b;
  }
  return ffi::Error::Success();
}

ffi::Error MatvecImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Buffer<ffi::S32> layer, ffi::AnyBuffer up,
                      ffi::AnyBuffer norm, ffi::AnyBuffer residual, ffi::RemainingArgs args, ffi::RemainingRets rets,
                      int64_t bits, int64_t split, int64_t chunk, float eps) {
  const int n_weights = static_cast<int>(rets.size());
  if (n_weights < 1 || n_weights > kMaxWeights || args.size() != 3 * rets.size())
    return Fail("expected 1 to 3 weights, each as codes, scales and zero points");
  ffi::AnyBuffer w3[3 * kMaxWeights] = {x, x, x, x, x, x, x, x, x}, outs[3 * kMaxWeights] = {x, x, x, x, x, x, x, x, x};
  if (auto e = Collect(args, args.size(), w3, rets, rets.size(), outs); e.failure()) return e;
  return LaunchMatvec(stream, x, layer.typed_data(), &up, &norm, &residual, w3, outs, n_weights, bits, split, chunk,
                      eps, false);
}

bool Dims(const ffi::AnyBuffer& a, std::initializer_list<int64_t> want) {
  auto d = a.dimensions();
  if (d.size() != want.size()) return false;
  int i = 0;
  for (int64_t w : want)
    if (d[i++] != w) return false;
  return true;
}

// A decoder layer for one token (Block._decode_fused): q/k/v of rmsnorm(x), the attention (rotary, the cache
// written at `start` in place), x + o, gate/up of rmsnorm(x + o), and down of silu(gate) * up plus the
// residual: six launches, for quantized weights the last five programmatic dependents of the one before.
// Weights (args): codes, scales and zero points of q, k, v, o, gate, up and down. Results: the layer's output, the two caches
// (aliased with the operands), then the intermediates q, k, v, the attention's output, x + o, gate and up.
ffi::Error LayerImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> start,
                     ffi::AnyBuffer cos, ffi::AnyBuffer sin, ffi::AnyBuffer mask, ffi::AnyBuffer cache_k,
                     ffi::AnyBuffer cache_v, ffi::AnyBuffer attn_norm, ffi::AnyBuffer mlp_norm, ffi::RemainingArgs args,
                     ffi::RemainingRets rets, int64_t bits, int64_t split_qkv, int64_t split_o,
                     int64_t split_gate_up, int64_t split_down, int64_t chunk, float eps) {
  constexpr int kWeights = 7, kRets = 10;
  if (args.size() != 3 * kWeights || rets.size() != kRets)
    return Fail("a layer takes q, k, v, o, gate, up and down (codes, scales, zero points each) and gives 10 results");
  // (AnyBuffer has no empty state: x fills the arrays until Collect overwrites them)
  ffi::AnyBuffer w3[3 * kWeights] = {x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}, outs[3 * kWeights] = {
      x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x};
  if (auto e = Collect(args, args.size(), w3, rets, rets.size(), outs); e.failure()) return e;
  const ffi::AnyBuffer *q = &outs[3], *k = &outs[4], *v = &outs[5], *attended = &outs[6], *h = &outs[7],
                       *gate = &outs[8], *up = &outs[9];
  auto cd = cache_k.dimensions();
  if (cd.size() != 5 || cd[1] != 1 || !Dims(cache_v, {cd[0], cd[1], cd[2], cd[3], cd[4]}))
    return Fail("the caches must be [layers, 1, max_len, kv_heads, head_dim], alike");
  const int64_t max_len = cd[2], kv_heads = cd[3], head_dim = cd[4];
  if (head_dim != 64 && head_dim != 128) return Fail("head_dim must be 64 or 128");
  if (cache_k.element_type() != ffi::DataType::BF16 || cache_v.element_type() != ffi::DataType::BF16)
    return Fail("the caches must be bfloat16");
  const int64_t heads = static_cast<int64_t>(q->element_count()) / head_dim;
  if (heads * head_dim != static_cast<int64_t>(q->element_count()) || heads % kv_heads ||
      static_cast<int64_t>(k->element_count()) != kv_heads * head_dim ||
      static_cast<int64_t>(v->element_count()) != kv_heads * head_dim ||
      attended->element_count() != q->element_count())
    return Fail("q must be [1, heads * head_dim] and k, v [1, kv_heads * head_dim], heads a multiple of kv_heads");
  if (cos.element_type() != ffi::DataType::F32 || sin.element_type() != ffi::DataType::F32 ||
      !Dims(cos, {1, head_dim / 2}) || !Dims(sin, {1, head_dim / 2}))
    return Fail("cos and sin must be float32 [1, head_dim / 2]");
  if (mask.element_type() != ffi::DataType::PRED || !Dims(mask, {1, max_len})) return Fail("the mask must be bool [1, max_len]");
  if (outs[1].untyped_data() != cache_k.untyped_data() || outs[2].untyped_data() != cache_v.untyped_data())
    return Fail("the caches must be aliased in and out");
  const int32_t* index = layer.typed_data();
  auto launch = [&](const ffi::AnyBuffer& in, const ffi::AnyBuffer* with_up, const ffi::AnyBuffer* norm,
                    const ffi::AnyBuffer* residual, int first, int n, const ffi::AnyBuffer* into, int64_t split, bool dep) {
    return LaunchMatvec(stream, in, index, with_up, norm, residual, w3 + 3 * first, into, n, bits, split, chunk,
                        eps, dep);
  };
  // bf16 weights read at 2.6-3.0 TB/s already, and overlapping their launches slowed the 7B step (5.30
  // against 5.08 ms); quantized ones read at 1.0-1.9 TB/s, and overlapping sped it up (int4: 2.30 against 2.39).
  const bool dependent = bits != 16;
  if (auto e = launch(x, nullptr, &attn_norm, nullptr, 0, 3, q, split_qkv, false); e.failure()) return e;
  DecodeAttentionArgs a = {};
  a.q = static_cast<const uint16_t*>(q->untyped_data());
  a.k = static_cast<const uint16_t*>(k->untyped_data());
  a.v = static_cast<const uint16_t*>(v->untyped_data());
  a.cos = static_cast<const float*>(cos.untyped_data());
  a.sin = static_cast<const float*>(sin.untyped_data());
  a.mask = static_cast<const uint8_t*>(mask.untyped_data());
  a.cache_k = static_cast<const uint16_t*>(cache_k.untyped_data());
  a.cache_v = static_cast<const uint16_t*>(cache_v.untyped_data());
  a.cache_k_out = static_cast<uint16_t*>(outs[1].untyped_data());
  a.cache_v_out = static_cast<uint16_t*>(outs[2].untyped_data());
  a.out = static_cast<uint16_t*>(attended->untyped_data());
  a.layer = index;
  a.start = start.typed_data();
  a.batch = 1, a.heads = static_cast<int>(heads), a.kv_heads = static_cast<int>(kv_heads);
  a.max_len = static_cast<int>(max_len), a.head_dim = static_cast<int>(head_dim);
  if (cudaError_t err = LaunchDecodeAttention(stream, a, dependent); err != cudaSuccess)
    return ffi::Error::Internal(std::string("llama_jax decode attention: ") + cudaGetErrorString(err));
  if (auto e = launch(*attended, nullptr, nullptr, &x, 3, 1, h, split_o, dependent); e.failure()) return e;
  if (auto e = launch(*h, nullptr, &mlp_norm, nullptr, 4, 2, gate, split_gate_up, dependent); e.failure()) return e;
  return launch(*gate, up, nullptr, h, 6, 1, &outs[0], split_down, dependent);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlamaJaxMatvecGpu, MatvecImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()         // x [1, K] bf16
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer [1]
                                  .Arg<ffi::AnyBuffer>()         // up [1, K] bf16 (SwiGLU input), or empty
                                  .Arg<ffi::AnyBuffer>()         // RMSNorm weight [L, K] bf16, or empty
                                  .Arg<ffi::AnyBuffer>()         // residual [1, N] bf16, or empty
                                  .RemainingArgs()               // per weight: codes, scales, zero points
                                  .RemainingRets()               // per weight: out [1, N]
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("split")
                                  .Attr<int64_t>("chunk")
                                  .Attr<float>("eps"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlamaJaxDecodeLayerGpu, LayerImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()         // x [1, D] bf16
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer [1]: of the weights and the caches
                                  .Arg<ffi::Buffer<ffi::S32>>()  // start [1]: the new token's slot
                                  .Arg<ffi::AnyBuffer>()         // cos [1, head_dim / 2] float32
                                  .Arg<ffi::AnyBuffer>()         // sin
                                  .Arg<ffi::AnyBuffer>()         // mask [1, max_len] bool
                                  .Arg<ffi::AnyBuffer>()         // cache_k [L, 1, max_len, kv_heads, head_dim] bf16
                                  .Arg<ffi::AnyBuffer>()         // cache_v
                                  .Arg<ffi::AnyBuffer>()         // attention RMSNorm weight [L, D] bf16
                                  .Arg<ffi::AnyBuffer>()         // MLP RMSNorm weight [L, D] bf16
                                  .RemainingArgs()               // q, k, v, o, gate, up, down: codes, scales, zeros
                                  .RemainingRets()               // out, cache_k, cache_v, q, k, v, attention, h, gate, up
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("split_qkv")
                                  .Attr<int64_t>("split_o")
                                  .Attr<int64_t>("split_gate_up")
                                  .Attr<int64_t>("split_down")
                                  .Attr<int64_t>("chunk")
                                  .Attr<float>("eps"),
                              {ffi::Traits::kCmdBufferCompatible});
