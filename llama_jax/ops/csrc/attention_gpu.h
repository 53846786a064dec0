// The decode-attention kernel of attention_gpu.cu, as matvec_gpu.cu's layer launches it.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

struct DecodeAttentionArgs {
  const uint16_t* q;        // [B, H, D] bf16, before rotary
  const uint16_t* k;        // [B, G, D] bf16, before rotary
  const uint16_t* v;        // [B, G, D] bf16
  const float* cos;         // [B, D / 2]
  const float* sin;         // [B, D / 2]
  const uint8_t* mask;      // [B, S] bool: the slots each row may attend to
  const uint16_t* cache_k;  // [L, B, S, G, D] bf16, read and written in place
  const uint16_t* cache_v;
  uint16_t* cache_k_out;    // the same memory as cache_k
  uint16_t* cache_v_out;
  uint16_t* out;            // [B, H, D] bf16
  const int32_t* layer;     // [1]: the layer of the cache
  const int32_t* start;     // [1]: the new token's slot
  int batch, heads, kv_heads, max_len, head_dim;  // head_dim 64 or 128
};

// One launch on `stream`. `dependent`: launched as a programmatic dependent of the kernel before it, whose
// outputs (q, k, v) it reads only after its first cache loads are in flight.
cudaError_t LaunchDecodeAttention(cudaStream_t stream, const DecodeAttentionArgs& args, bool dependent);
