// A decode step's attention for one layer on Hopper GPUs, launched by matvec_gpu.cu's decoder layer
// (llama_jax/ops/cuda_matvec.py); the contract of attention.decode_attention's Pallas kernel, in one launch:
//
//   q, k (the new token's) rotated (Hugging Face's half split) and rounded to bf16; the new k and v
//   written into the cache at slot `start` in place; out = softmax(q . K / sqrt(D)) V over the layer's
//   slots [0, start] that the mask allows, with the new token's k and v at slot `start`.
//
// At batch 1 a Llama-2-7B layer's attention reads 32 heads x 256 slots x 512 bytes: too little to keep HBM
// busy for long, so what counts is the launch's latency. The parts of a head's cache are the blocks of one
// thread-block cluster, and they combine through distributed shared memory in the same launch (the Pallas
// kernel leaves that to a second, XLA, kernel). Each block issues all of its key and value loads (64 slots,
// 16 bytes a thread each) before the first use; launched as a programmatic dependent of the q/k/v matmul,
// it issues them while that launch finishes, and waits for q, k and v only to rotate them.
//
// Grid: x = `split` parts of the slots [0, start] (one cluster), y = query heads, z = batch rows.
// A block's threads: kD / 8 across a slot (8 dims, 16 bytes each), 128 / (kD / 8) slots at once. Each
// thread keeps its own running max, total and sums over the slots it reads (an online softmax without a
// block barrier per step); the block's slot groups, then the cluster's blocks, combine at the end in a
// fixed order.

#include "attention_gpu.h"

#include <cooperative_groups.h>
#include <cuda_bf16.h>

namespace cg = cooperative_groups;

namespace {

constexpr int kThreads = 128;
constexpr int kStepSlots = 64;  // slots a block loads before their first use
constexpr int kMaxSplit = 8;    // the portable cluster size
constexpr int kBlocks = 256;    // a launch's blocks that the split aims at (about two an H100 SM)
constexpr float kNeg = -1e30f;  // a finite "minus infinity", as in the Pallas kernel

__device__ __forceinline__ float RoundBf16(float x) { return __bfloat162float(__float2bfloat16(x)); }
__device__ __forceinline__ uint32_t PackBf16(float lo, float hi) {
  return __bfloat16_as_ushort(__float2bfloat16(lo)) |
         (static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16(hi))) << 16);
}

struct Vec8 {
  float x[8];
};

__device__ __forceinline__ Vec8 Unpack(uint4 u) {
  Vec8 r;
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) r.x[2 * i] = __uint_as_float(w[i] << 16), r.x[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
  return r;
}

// The 8 dims [d0, d0 + 8) of row `row` (D bf16 values) rotated with the row's cos / sin tables and
// rounded to bf16: x1 cos - x2 sin in the first half, x2 cos + x1 sin in the second.
template <int kD>
__device__ __forceinline__ Vec8 Rotate(const uint16_t* row, const float* cos, const float* sin, int d0) {
  constexpr int kHalf = kD / 2;
  const bool first = d0 < kHalf;
  const int i0 = first ? d0 : d0 - kHalf;
  const Vec8 x = Unpack(__ldcg(reinterpret_cast<const uint4*>(row + d0)));
  const Vec8 y = Unpack(__ldcg(reinterpret_cast<const uint4*>(row + (first ? d0 + kHalf : i0))));
  Vec8 r;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float c = __ldg(cos + i0 + i), s = __ldg(sin + i0 + i);
    r.x[i] = RoundBf16(first ? x.x[i] * c - y.x[i] * s : x.x[i] * c + y.x[i] * s);
  }
  return r;
}

template <int kD>
__global__ void __launch_bounds__(kThreads) DecodeAttentionKernel(const DecodeAttentionArgs p) {
  constexpr int kLanes = kD / 8;               // threads across a slot
  constexpr int kGroups = kThreads / kLanes;   // slots in flight at once
  constexpr int kPasses = kStepSlots / kGroups;
  __shared__ float group_m[kGroups], group_l[kGroups];
  __shared__ float group_acc[kGroups][kD];
  __shared__ float received[kMaxSplit][kD + 2];  // each part's sums, max and total (cluster rank 0's)

  const int split = gridDim.x, part = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  // Blocks write into rank 0's shared memory at the end, which needs it started: say so now.
  if (split > 1) asm volatile("barrier.cluster.arrive.relaxed.aligned;");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");  // the next launch may take free SMs now
  const int tid = threadIdx.x, lane = tid % kLanes, grp = tid / kLanes, d0 = lane * 8;
  const int g = h / (p.heads / p.kv_heads);
  const int start = *p.start, layer = *p.layer;

  // This block's share of the slots [0, start], in whole rows of kGroups slots.
  const int n = start + 1;
  const int per = ((n + split - 1) / split + kGroups - 1) / kGroups * kGroups;
  const int s_lo = min(part * per, n), s_hi = min(s_lo + per, n);
  const size_t slot_stride = static_cast<size_t>(p.kv_heads) * kD;
  const size_t head = (static_cast<size_t>(layer) * p.batch + b) * p.max_len * slot_stride + g * kD + d0;
  const uint8_t* mask = p.mask + static_cast<size_t>(b) * p.max_len;

  Vec8 q, k_new, v_new;
  bool rotated = false;
  float m = kNeg, total = 0.f, acc[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) acc[i] = 0.f;

  for (int s0 = s_lo; s0 < s_hi; s0 += kStepSlots) {
    uint4 ks[kPasses], vs[kPasses];
    bool ok[kPasses];
#pragma unroll
    for (int j = 0; j < kPasses; ++j) {
      const int s = s0 + j * kGroups + grp;
      ok[j] = s < s_hi;
      ks[j] = vs[j] = make_uint4(0, 0, 0, 0);  // zeros past s_hi, whose weight is 0 (garbage could be NaN)
      if (ok[j]) {
        ks[j] = __ldcs(reinterpret_cast<const uint4*>(p.cache_k + head + s * slot_stride));
        vs[j] = __ldcs(reinterpret_cast<const uint4*>(p.cache_v + head + s * slot_stride));
        ok[j] = mask[s] != 0;
      }
    }
    if (!rotated) {  // while the first loads are in flight
      // q, k and v are the launch before's outputs: from here on they are complete (a no-op when this
      // launch is not a programmatic dependent). Nothing before this line reads them or writes anything,
      // and they are read with coherent loads: ptxas hoisted an __ldg of them above the wait.
      asm volatile("griddepcontrol.wait;" ::: "memory");
      const float* cos = p.cos + static_cast<size_t>(b) * (kD / 2);
      const float* sin = p.sin + static_cast<size_t>(b) * (kD / 2);
      q = Rotate<kD>(p.q + (static_cast<size_t>(b) * p.heads + h) * kD, cos, sin, d0);
#pragma unroll
      for (int i = 0; i < 8; ++i) q.x[i] *= 1.0f / sqrtf(static_cast<float>(kD));
      k_new = Rotate<kD>(p.k + (static_cast<size_t>(b) * p.kv_heads + g) * kD, cos, sin, d0);
      v_new = Unpack(__ldcg(reinterpret_cast<const uint4*>(p.v + (static_cast<size_t>(b) * p.kv_heads + g) * kD + d0)));
      rotated = true;
    }
    float scores[kPasses], m_new = m;
#pragma unroll
    for (int j = 0; j < kPasses; ++j) {
      const bool here = s0 + j * kGroups + grp == start;
      const Vec8 kj = here ? k_new : Unpack(ks[j]);
      float dot = 0.f;
#pragma unroll
      for (int i = 0; i < 8; ++i) dot = fmaf(q.x[i], kj.x[i], dot);
#pragma unroll
      for (int off = kLanes / 2; off > 0; off /= 2) dot += __shfl_xor_sync(0xFFFFFFFFu, dot, off);
      scores[j] = ok[j] ? dot : kNeg;
      m_new = fmaxf(m_new, scores[j]);
    }
    const float alpha = __expf(m - m_new);
    total *= alpha;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] *= alpha;
#pragma unroll
    for (int j = 0; j < kPasses; ++j) {
      const float pj = ok[j] ? __expf(scores[j] - m_new) : 0.f;  // masked slots stay 0 while m_new is kNeg
      const bool here = s0 + j * kGroups + grp == start;
      const Vec8 vj = here ? v_new : Unpack(vs[j]);
      total += pj;
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] = fmaf(pj, vj.x[i], acc[i]);
    }
    m = m_new;
  }

  if (!rotated) asm volatile("griddepcontrol.wait;" ::: "memory");  // a block without slots still writes
  // The new token's k and v into the cache, once per kv head: by its first query head's block that
  // holds slot `start` (every block reading that slot uses the registers above, not the cache).
  if (h % (p.heads / p.kv_heads) == 0 && start >= s_lo && start < s_hi && grp == 0) {
    const size_t at = head + start * slot_stride;
    *reinterpret_cast<uint4*>(p.cache_k_out + at) =
        make_uint4(PackBf16(k_new.x[0], k_new.x[1]), PackBf16(k_new.x[2], k_new.x[3]),
                   PackBf16(k_new.x[4], k_new.x[5]), PackBf16(k_new.x[6], k_new.x[7]));
    *reinterpret_cast<uint4*>(p.cache_v_out + at) =
        make_uint4(PackBf16(v_new.x[0], v_new.x[1]), PackBf16(v_new.x[2], v_new.x[3]),
                   PackBf16(v_new.x[4], v_new.x[5]), PackBf16(v_new.x[6], v_new.x[7]));
  }

  // The block's slot groups combine (rescaled to their common max), then the cluster's parts do.
  if (lane == 0) group_m[grp] = m, group_l[grp] = total;
#pragma unroll
  for (int i = 0; i < 8; ++i) group_acc[grp][d0 + i] = acc[i];
  __syncthreads();
  float block_m = kNeg, block_l = 0.f, block_acc = 0.f;
  if (tid < kD) {
#pragma unroll
    for (int i = 0; i < kGroups; ++i) block_m = fmaxf(block_m, group_m[i]);
#pragma unroll
    for (int i = 0; i < kGroups; ++i) {
      const float w = __expf(group_m[i] - block_m);
      block_l = fmaf(w, group_l[i], block_l);
      block_acc = fmaf(w, group_acc[i][tid], block_acc);
    }
  }
  uint16_t* out = p.out + (static_cast<size_t>(b) * p.heads + h) * kD;
  if (split == 1) {
    if (tid < kD) out[tid] = __bfloat16_as_ushort(__float2bfloat16(block_acc / block_l));
    return;
  }
  cg::cluster_group cluster = cg::this_cluster();
  asm volatile("barrier.cluster.wait.aligned;" ::: "memory");  // rank 0 has started
  float* to = cluster.map_shared_rank(&received[0][0], 0) + part * (kD + 2);
  if (tid < kD) to[tid] = block_acc;
  if (tid == 0) to[kD] = block_m, to[kD + 1] = block_l;
  cluster.sync();  // release the writes above, acquire the others'
  if (part != 0 || tid >= kD) return;
  float all_m = kNeg, all_l = 0.f, all_acc = 0.f;
  for (int i = 0; i < split; ++i) all_m = fmaxf(all_m, received[i][kD]);
  for (int i = 0; i < split; ++i) {
    const float w = __expf(received[i][kD] - all_m);
    all_l = fmaf(w, received[i][kD + 1], all_l);
    all_acc = fmaf(w, received[i][tid], all_acc);
  }
  out[tid] = __bfloat16_as_ushort(__float2bfloat16(all_acc / all_l));
}

// Parts of each head's slots (the blocks of one thread-block cluster): doubled until the launch has about
// two blocks an H100 SM, while each part keeps a step of slots.
int DecodeAttentionSplit(int batch, int heads, int max_len) {
  int parts = 1;
  while (parts < kMaxSplit && batch * heads * parts < kBlocks && parts * kStepSlots < max_len) parts *= 2;
  return parts;
}

}  // namespace

cudaError_t LaunchDecodeAttention(cudaStream_t stream, const DecodeAttentionArgs& p, bool dependent) {
  const int split = DecodeAttentionSplit(p.batch, p.heads, p.max_len);
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(split), static_cast<unsigned>(p.heads), static_cast<unsigned>(p.batch));
  config.blockDim = dim3(kThreads, 1, 1);
  config.stream = stream;
  cudaLaunchAttribute attribute[2];
  int n = 0;
  if (split > 1) {
    attribute[n].id = cudaLaunchAttributeClusterDimension;
    attribute[n].val.clusterDim.x = static_cast<unsigned>(split);
    attribute[n].val.clusterDim.y = 1;
    attribute[n].val.clusterDim.z = 1;
    ++n;
  }
  if (dependent) {
    attribute[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute[n].val.programmaticStreamSerializationAllowed = 1;
    ++n;
  }
  config.attrs = attribute;
  config.numAttrs = n;
  return p.head_dim == 128 ? cudaLaunchKernelEx(&config, DecodeAttentionKernel<128>, p)
                           : cudaLaunchKernelEx(&config, DecodeAttentionKernel<64>, p);
}
