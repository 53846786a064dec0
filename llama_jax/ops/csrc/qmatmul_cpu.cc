// Quantized matmul for XLA's CPU backend, called through the XLA FFI (llama_jax/cpu_qmatmul.py).
//
//   out[M, N] float32 = x[M, K] float32 @ dequantize(layer `layer` of codes [L, Kstored, N])
//
// Layout and schemes are quantize.py's: int8 codes (Kstored = K) or int4 codes packed two per byte
// along K (Kstored = K/2; byte j of a group holds code j in its low nibble and code j + group/2 in its
// high nibble); scales and zero points [L, K/group, N] as stored (float16, bfloat16 or float32).
//
// XLA would decode every weight to float32 in memory and then run a float matvec. Here the codes are
// decoded in registers and never written out, vectorised over N (contiguous in memory). Per int4 group
// with scale s and zero point z (z = -8 s for symmetric int4):
//     x . w = sum_k x_k (u_k s + z) = s * sum_k x_k (u_k - 8) + (z + 8 s) * sum_k x_k
// so the inner loop is one multiply-add per code on u - 8 (small exact integers; on AVX-512 a table
// lookup gives them), and the per-group sums of x are computed once per call. Centred on 8, the two
// terms do not cancel (with u instead, they nearly do for zero-point groups, where z is about -8 s).
// Against float64, the result is 3x closer than XLA's own dot of the dequantized weight. int8 codes
// are decoded to the weight itself, c * s (exact), and multiplied in.
//
// Threads: the N columns are cut into chunks that the calling thread and tasks on XLA's intra-op
// thread pool (the FFI ThreadPool context, as many threads as XLA gives its own CPU ops) claim from
// an atomic counter. The caller waits only for tasks that have claimed work, never for one that has
// not started, so a busy or absent pool cannot deadlock it (absent: Schedule runs the task inline).

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;  // floats per vector (one AVX-512 register; two AVX2 ones)
typedef float VF __attribute__((vector_size(kLanes * 4)));
typedef int32_t VI __attribute__((vector_size(kLanes * 4)));

VF LoadF(const float* p) { VF v; std::memcpy(&v, p, sizeof v); return v; }

// 16 bytes widened to 16 int32 lanes, zero- or sign-extended. Spelled out per ISA: GCC compiles
// __builtin_convertvector from 16 bytes one byte at a time.
template <bool Signed>
inline VI Widen(const uint8_t* p) {
#if defined(__AVX512F__)
  __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return (VI)(Signed ? _mm512_cvtepi8_epi32(b) : _mm512_cvtepu8_epi32(b));
#elif defined(__AVX2__)
  __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), c = _mm_srli_si128(b, 8);
  __m256i halves[2] = {Signed ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b),
                       Signed ? _mm256_cvtepi8_epi32(c) : _mm256_cvtepu8_epi32(c)};
  VI v;
  std::memcpy(&v, halves, sizeof v);
  return v;
#else
  VI v;
  for (int i = 0; i < kLanes; ++i) v[i] = Signed ? int32_t(int8_t(p[i])) : int32_t(p[i]);
  return v;
#endif
}

// IEEE half -> float, exact for every input (subnormals included).
inline float HalfToFloat(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16, em = h & 0x7fff;
  uint32_t bits;
  if (em >= 0x7c00) {
    bits = sign | 0x7f800000 | ((em & 0x3ff) << 13);  // inf / nan
  } else if (em >= 0x0400) {
    bits = sign | ((em + ((127 - 15) << 10)) << 13);  // normal: rebias the exponent
  } else {
    float f = float(em) * 0x1p-24f;  // subnormal (or zero): mantissa * 2^-24, exact in float32
    std::memcpy(&bits, &f, 4);
    bits |= sign;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// n scales (or zero points) of the stored dtype, from element `at`, as float32.
void ToFloat(const ffi::AnyBuffer& b, int64_t at, int n, float* dst) {
  switch (b.element_type()) {
    case ffi::DataType::F32:
      std::memcpy(dst, static_cast<const float*>(b.untyped_data()) + at, n * 4);
      break;
    case ffi::DataType::F16: {
      const uint16_t* p = static_cast<const uint16_t*>(b.untyped_data()) + at;
      int i = 0;
#ifdef __F16C__  // x86-64-v3 and up: eight at a time in hardware (scalar code would cost more than the codes)
      for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i))));
#endif
      for (; i < n; ++i) dst[i] = HalfToFloat(p[i]);
      break;
    }
    default: {  // BF16 (checked by the handler): the top half of a float32
      const uint16_t* p = static_cast<const uint16_t*>(b.untyped_data()) + at;
      for (int i = 0; i < n; ++i) {
        uint32_t bits = uint32_t(p[i]) << 16;
        std::memcpy(dst + i, &bits, 4);
      }
    }
  }
}

struct Problem {
  const float* x;        // [M, K]
  const uint8_t* codes;  // this layer's [Kstored, N] (int8 codes read through a cast)
  const ffi::AnyBuffer* scales;
  const ffi::AnyBuffer* zeros;  // nullptr: none
  int64_t qoff;                 // element offset of this layer in scales / zeros
  const float* xsum;            // [M, K / group]: per-group sums of x (int4 only)
  float* out;                   // [M, N]
  int64_t m, k, n, group, bits;
  int64_t unit;                 // rows of K per step: the group, or a part of a long int8 group
};

// u - 8 for the 4-bit code u in the low bits of each lane (higher bits ignored), as float.
inline VF Centered(VI v) {
#if defined(__AVX512F__)  // one table lookup instead of a mask, a conversion and a subtraction
  const __m512 table = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  return (VF)_mm512_permutexvar_ps((__m512i)v, table);
#else
  return __builtin_convertvector(v & 15, VF) - 8.0f;
#endif
}

// Adds step `u` of K (p.unit rows of x and codes) to rows [r0, r0 + R) x columns [c0, c0 + NV * kLanes)
// of the output. The step's sums stay in registers: R * NV vectors per nibble half.
template <int Bits, int R, int NV>
void Step(const Problem& p, int64_t r0, int64_t c0, int64_t u) {
  constexpr int W = NV * kLanes;
  const int64_t n = p.n, h = Bits == 4 ? p.unit / 2 : p.unit;  // stored rows per step
  VF lo[R][NV] = {}, hi[R][NV] = {};  // int4: low / high nibbles summed apart (independent chains)
  float sf[W], zf[W];
  const int64_t at = p.qoff + (u * p.unit / p.group) * n + c0;  // the step's scale row
  ToFloat(*p.scales, at, W, sf);
  const uint8_t* c = p.codes + u * h * n + c0;
  const float* xu = p.x + r0 * p.k + u * p.unit;
  if (Bits == 4) {  // sum x (u - 8) here; the scale and zero point come after the loop
    for (int64_t j = 0; j < h; ++j, c += n) {
      // The same columns of the next step: Columns() comes back to them after this step's other tiles.
      __builtin_prefetch(c + h * n);
      for (int v = 0; v < NV; ++v) {
        VI b = Widen<false>(c + v * kLanes);
        VF wl = Centered(b), wh = Centered(b >> 4);
        for (int r = 0; r < R; ++r) {
          lo[r][v] += xu[r * p.k + j] * wl;
          hi[r][v] += xu[r * p.k + j + h] * wh;
        }
      }
    }
  } else {  // int8: the weight itself, exact (an 8-bit code times a 16-bit scale)
    VF s[NV];
    for (int v = 0; v < NV; ++v) s[v] = LoadF(sf + v * kLanes);
    for (int64_t j = 0; j < h; ++j, c += n) {
      __builtin_prefetch(c + h * n);
      for (int v = 0; v < NV; ++v) {
        VF w = __builtin_convertvector(Widen<true>(c + v * kLanes), VF) * s[v];
        for (int r = 0; r < R; ++r) lo[r][v] += xu[r * p.k + j] * w;
      }
    }
  }
  if (Bits == 4 && p.zeros) ToFloat(*p.zeros, at, W, zf);
  for (int v = 0; v < NV; ++v) {
    VF s = LoadF(sf + v * kLanes);
    // int4: x . w = s * sum x (u - 8) + (z + 8 s) * sum x; symmetric: z + 8 s = 0
    VF z8 = Bits == 4 && p.zeros ? LoadF(zf + v * kLanes) + 8.0f * s : VF{};
    for (int r = 0; r < R; ++r) {
      float* o = p.out + (r0 + r) * n + c0 + v * kLanes;
      VF acc = LoadF(o);
      if (Bits == 4)
        acc += s * (lo[r][v] + hi[r][v]) + z8 * p.xsum[(r0 + r) * (p.k / p.unit) + u];
      else
        acc += lo[r][v];
      std::memcpy(o, &acc, sizeof acc);
    }
  }
}

// Columns that do not fill a vector (N not a multiple of 16): plain scalar code.
void Scalar(const Problem& p, int64_t c0, int64_t c1) {
  const int64_t g = p.group, groups = p.k / g, n = p.n, h = p.bits == 4 ? g / 2 : g;
  for (int64_t r = 0; r < p.m; ++r)
    for (int64_t col = c0; col < c1; ++col) {
      float acc = 0;
      for (int64_t gi = 0; gi < groups; ++gi) {
        float s, z = 0;
        ToFloat(*p.scales, p.qoff + gi * n + col, 1, &s);
        if (p.zeros) ToFloat(*p.zeros, p.qoff + gi * n + col, 1, &z);
        else if (p.bits == 4) z = -8.0f * s;
        const float* xg = p.x + r * p.k + gi * g;
        for (int64_t j = 0; j < h; ++j) {
          uint8_t b = p.codes[(gi * h + j) * n + col];
          if (p.bits == 4)
            acc += xg[j] * (float(b & 15) * s + z) + xg[j + h] * (float(b >> 4) * s + z);
          else
            acc += xg[j] * (float(int8_t(b)) * s);
        }
      }
      p.out[r * n + col] = acc;
    }
}

// Columns [c0, c1), c1 - c0 a multiple of kLanes, summed into the output one step of K at a time across
// all of them: the codes are then read as p.unit / 2 or p.unit sequential streams (rows) that the
// hardware prefetcher follows. Walking down all of K one tile at a time instead jumps N bytes at every
// row, which ran at a third of the in-cache speed once the weights no longer fit in L2 (as a model's
// do); this order plus the prefetch in Step() brings that to about the in-cache speed. Rows four at a
// time (each code converted once for all four) in 32-column tiles, two or one in 64-column tiles;
// 16-column tiles for the rest.
template <int Bits>
void Columns(const Problem& p, int64_t c0, int64_t c1) {
  for (int64_t r = 0; r < p.m; ++r) std::fill(p.out + r * p.n + c0, p.out + r * p.n + c1, 0.0f);
  const int64_t steps = p.k / p.unit;
  for (int64_t r = 0; r < p.m;) {
    const int64_t rows = p.m - r >= 4 ? 4 : p.m - r >= 2 ? 2 : 1;
    for (int64_t u = 0; u < steps; ++u) {
      int64_t c = c0;
      if (rows == 4) {
        for (; c + 2 * kLanes <= c1; c += 2 * kLanes) Step<Bits, 4, 2>(p, r, c, u);
        for (; c < c1; c += kLanes) Step<Bits, 4, 1>(p, r, c, u);
      } else if (rows == 2) {
        for (; c + 4 * kLanes <= c1; c += 4 * kLanes) Step<Bits, 2, 4>(p, r, c, u);
        for (; c < c1; c += kLanes) Step<Bits, 2, 1>(p, r, c, u);
      } else {
        for (; c + 4 * kLanes <= c1; c += 4 * kLanes) Step<Bits, 1, 4>(p, r, c, u);
        for (; c < c1; c += kLanes) Step<Bits, 1, 1>(p, r, c, u);
      }
    }
    r += rows;
  }
}

void Chunk(const Problem& p, int64_t c0, int64_t c1) {
  int64_t vec_end = std::min(c1, p.n / kLanes * kLanes);
  if (c0 < vec_end) (p.bits == 4 ? Columns<4> : Columns<8>)(p, c0, vec_end);
  if (vec_end < c1) Scalar(p, std::max(c0, vec_end), c1);
}

// Chunks [i * chunk, min(n, (i + 1) * chunk)) of `work` claimed from an atomic counter by the caller and
// the pool's tasks (see the top comment).
struct Shared {
  std::function<void(int64_t, int64_t)> work;
  int64_t n, chunk, chunks;
  std::atomic<int64_t> next{0};
  std::mutex mu;
  std::condition_variable cv;
  int active = 0;  // tasks that have started and not yet finished (guarded by mu)

  void Work() {
    for (int64_t i; (i = next.fetch_add(1)) < chunks;) work(i * chunk, std::min(n, (i + 1) * chunk));
  }
};

// Runs `work` over [0, n) in chunks of `chunk`, on the caller and up to `tasks` pool tasks; returns when
// every chunk is done. A task that starts later finds no chunk left and never calls `work`, so `work` may
// refer to the caller's locals.
void Parallel(ffi::ThreadPool& pool, int64_t n, int64_t chunk, int64_t tasks,
              std::function<void(int64_t, int64_t)> work) {
  auto sh = std::make_shared<Shared>();
  sh->work = std::move(work);
  sh->n = n;
  sh->chunk = chunk;
  sh->chunks = (n + chunk - 1) / chunk;
  for (int64_t t = 0; t < std::min(tasks, sh->chunks - 1); ++t) {
    pool.Schedule([sh] {  // holds `sh`: a task that starts after the call returned finds no work left
      {
        std::lock_guard<std::mutex> lock(sh->mu);
        ++sh->active;
      }
      sh->Work();
      std::lock_guard<std::mutex> lock(sh->mu);
      if (--sh->active == 0) sh->cv.notify_all();
    });
  }
  sh->Work();
  // Every chunk is claimed; wait for the tasks still working on theirs (they registered before claiming).
  std::unique_lock<std::mutex> lock(sh->mu);
  sh->cv.wait(lock, [&] { return sh->active == 0; });
}

ffi::Error QMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer codes,
                       ffi::AnyBuffer scales, ffi::AnyBuffer zeros, ffi::Buffer<ffi::S32> layer,
                       ffi::ResultBuffer<ffi::F32> out, int64_t bits, int64_t group) {
  auto xd = x.dimensions(), cd = codes.dimensions(), sd = scales.dimensions();
  if (xd.size() != 2 || cd.size() != 3 || sd.size() != 3 || layer.element_count() != 1)
    return ffi::Error::InvalidArgument("qmatmul_cpu: x [M, K], codes [L, Kstored, N], scales [L, G, N], layer [1]");
  const int64_t m = xd[0], k = xd[1], l = cd[0], n = cd[2];
  const bool has_zero = zeros.element_count() > 0;
  auto st = scales.element_type();
  if ((bits != 4 && bits != 8) || group <= 0 || k % group || (bits == 4 && group % 2) ||
      cd[1] != k * bits / 8 || sd[0] != l || sd[1] != k / group || sd[2] != n ||
      codes.element_type() != (bits == 4 ? ffi::DataType::U8 : ffi::DataType::S8) ||
      (st != ffi::DataType::F32 && st != ffi::DataType::F16 && st != ffi::DataType::BF16) ||
      (has_zero && (bits != 4 || zeros.element_type() != st || zeros.element_count() != scales.element_count())))
    return ffi::Error::InvalidArgument("qmatmul_cpu: shapes or dtypes do not match the quantized layout");
  const int64_t li = layer.typed_data()[0];
  if (li < 0 || li >= l) return ffi::Error::InvalidArgument("qmatmul_cpu: layer index out of range");
  if (m == 0 || n == 0) return ffi::Error::Success();

  const int64_t groups = k / group;
  std::vector<float> xsum(bits == 4 ? m * groups : 0);
  for (int64_t r = 0; r < m && bits == 4; ++r)
    for (int64_t gi = 0; gi < groups; ++gi) {
      float acc = 0;
      for (int64_t j = 0; j < group; ++j) acc += x.typed_data()[r * k + gi * group + j];
      xsum[r * groups + gi] = acc;
    }

  Problem p{x.typed_data(), static_cast<const uint8_t*>(codes.untyped_data()) + li * cd[1] * n,
            &scales, has_zero ? &zeros : nullptr, li * groups * n, xsum.data(), out->typed_data(),
            m, k, n, group, bits, group};
  // A long int8 group (per channel: all of K) is walked in parts, each scaled on its own.
  for (int64_t u : {64, 32, 16})
    if (group > 128 && group % u == 0) {
      p.unit = u;
      break;
    }
  // About four chunks a thread (whole 64-column tiles when N allows), so uneven progress evens out.
  // Small products (SmolLM2's k and v, [576, 192]) stay on the calling thread: measured, handing half
  // of one to another thread costs more than it saves.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t tasks = m * k * n < (1 << 18) ? 0 : threads - 1;
  int64_t chunk = (n + 4 * (tasks + 1) - 1) / (4 * (tasks + 1));
  chunk = (chunk + 4 * kLanes - 1) / (4 * kLanes) * (4 * kLanes);
  if (tasks && chunk * (tasks + 1) > n) chunk = std::max<int64_t>(kLanes, (n / (tasks + 1)) / kLanes * kLanes);
  Parallel(pool, n, chunk, tasks, [&p](int64_t c0, int64_t c1) { Chunk(p, c0, c1); });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// The row layout: out[M, V] = x[M, D] @ W^T for W [V, D] grouped along D (the embedding, as the tied
// lm_head). Each output is the dot product of x with one contiguous row of codes, so the rows are
// walked in order (one sequential stream per row of a tile, which the prefetcher follows) and the
// vectors run along D. Per group, as above: s * x . c for int8 codes c, and for int4
// s * x . (u - 8) + (z + 8 s) * sum(x over the group), the second term summed over groups after the loop.

struct RowProblem {
  const float* x;        // [M, D]
  const uint8_t* codes;  // [V, Dstored]
  const ffi::AnyBuffer* scales;  // [V, D / group]
  const ffi::AnyBuffer* zeros;   // nullptr: none
  const float* xsum;     // [M, D / group] (int4 with zero points only)
  float* out;            // [M, V]
  int64_t m, d, v, group, bits;
};

inline float HSum(VF a) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps((__m512)a);
#else
  float s = 0;
  for (int i = 0; i < kLanes; ++i) s += a[i];
  return s;
#endif
}

// Rows [r0, r0 + R) of x times weight rows [w0, w0 + T): R * T vector sums in registers, each code
// decoded once for all R rows of x. Per group, x times the codes (int8 c, int4 u - 8: small exact
// integers) is summed first and scaled once at the group's end, which saves a multiply per vector
// of codes over decoding each weight (the loop is bound by vector arithmetic, not memory, on 2 cores).
// sf / z8: the T rows' scales and (z + 8 s), [T, D / group].
template <int Bits, int R, int T>
void RowTile(const RowProblem& p, int64_t r0, int64_t w0, const float* sf, const float* z8) {
  const int64_t d = p.d, groups = d / p.group, stored = d * Bits / 8;
  VF acc[R][T] = {};
  const uint8_t* c = p.codes + w0 * stored;
  for (int64_t gi = 0; gi < groups; ++gi) {
    VF t[R][T] = {};
    if (Bits == 8) {
      for (int64_t j = gi * p.group; j < (gi + 1) * p.group; j += kLanes) {
        VF w[T];
        for (int i = 0; i < T; ++i) w[i] = __builtin_convertvector(Widen<true>(c + i * stored + j), VF);
        for (int r = 0; r < R; ++r) {
          VF xv = LoadF(p.x + (r0 + r) * d + j);
          for (int i = 0; i < T; ++i) t[r][i] += xv * w[i];
        }
      }
    } else {  // byte b of the group: code b (low nibble) and code b + group / 2 (high nibble)
      const int64_t half = p.group / 2;
      for (int64_t b = 0; b < half; b += kLanes) {
        VF lo[T], hi[T];
        for (int i = 0; i < T; ++i) {
          VI u = Widen<false>(c + i * stored + gi * half + b);
          lo[i] = Centered(u);
          hi[i] = Centered(u >> 4);
        }
        for (int r = 0; r < R; ++r) {
          const float* xr = p.x + (r0 + r) * d + gi * p.group + b;
          VF xl = LoadF(xr), xh = LoadF(xr + half);
          for (int i = 0; i < T; ++i) t[r][i] += xl * lo[i] + xh * hi[i];
        }
      }
    }
    for (int i = 0; i < T; ++i) {
      const float s = sf[i * groups + gi];
      for (int r = 0; r < R; ++r) acc[r][i] += t[r][i] * s;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < T; ++i) {
      float o = HSum(acc[r][i]);
      if (z8)  // the zero points' part: sum over groups of (z + 8 s) * sum(x over the group)
        for (int64_t gi = 0; gi < groups; ++gi) o += z8[i * groups + gi] * p.xsum[(r0 + r) * groups + gi];
      p.out[(r0 + r) * p.v + w0 + i] = o;
    }
}

// Weight rows [w0, w1): four at a time (the rest one at a time), each tile of four against every row of x
// (two or one at a time: R * T sums and R * T group sums fit the 32 vector registers) while its codes
// are in L1.
template <int Bits>
void Rows(const RowProblem& p, int64_t w0, int64_t w1) {
  const int64_t groups = p.d / p.group;
  std::vector<float> sf(4 * groups), z8(p.zeros ? 4 * groups : 0);
  for (int64_t w = w0; w < w1;) {
    const int t = w1 - w >= 4 ? 4 : 1;
    ToFloat(*p.scales, w * groups, t * groups, sf.data());
    if (p.zeros) {
      ToFloat(*p.zeros, w * groups, t * groups, z8.data());
      for (int64_t i = 0; i < t * groups; ++i) z8[i] += 8.0f * sf[i];
    }
    const float* zp = p.zeros ? z8.data() : nullptr;
    for (int64_t r = 0; r < p.m;) {
      const int64_t rows = p.m - r >= 2 ? 2 : 1;
      if (t == 4)
        (rows == 2 ? RowTile<Bits, 2, 4> : RowTile<Bits, 1, 4>)(p, r, w, sf.data(), zp);
      else
        (rows == 2 ? RowTile<Bits, 2, 1> : RowTile<Bits, 1, 1>)(p, r, w, sf.data(), zp);
      r += rows;
    }
    w += t;
  }
}

ffi::Error QMatmulRowsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer codes,
                           ffi::AnyBuffer scales, ffi::AnyBuffer zeros, ffi::ResultBuffer<ffi::F32> out,
                           int64_t bits, int64_t group) {
  auto xd = x.dimensions(), cd = codes.dimensions(), sd = scales.dimensions();
  if (xd.size() != 2 || cd.size() != 2 || sd.size() != 2)
    return ffi::Error::InvalidArgument("qmatmul_rows_cpu: x [M, D], codes [V, Dstored], scales [V, G]");
  const int64_t m = xd[0], d = xd[1], v = cd[0];
  const bool has_zero = zeros.element_count() > 0;
  auto st = scales.element_type();
  // Vectors run within a group: int8 groups of whole vectors, int4 groups of two (a byte's two nibbles).
  if ((bits != 4 && bits != 8) || group <= 0 || d % group || group % (bits == 4 ? 2 * kLanes : kLanes) ||
      cd[1] != d * bits / 8 || sd[0] != v || sd[1] != d / group ||
      codes.element_type() != (bits == 4 ? ffi::DataType::U8 : ffi::DataType::S8) ||
      (st != ffi::DataType::F32 && st != ffi::DataType::F16 && st != ffi::DataType::BF16) ||
      (has_zero && (bits != 4 || zeros.element_type() != st || zeros.element_count() != scales.element_count())))
    return ffi::Error::InvalidArgument("qmatmul_rows_cpu: shapes or dtypes do not match the row layout");
  if (m == 0 || v == 0) return ffi::Error::Success();

  const int64_t groups = d / group;
  std::vector<float> xsum(has_zero ? m * groups : 0);
  for (int64_t r = 0; r < m && has_zero; ++r)
    for (int64_t gi = 0; gi < groups; ++gi) {
      float acc = 0;
      for (int64_t j = 0; j < group; ++j) acc += x.typed_data()[r * d + gi * group + j];
      xsum[r * groups + gi] = acc;
    }
  RowProblem p{x.typed_data(), static_cast<const uint8_t*>(codes.untyped_data()), &scales,
               has_zero ? &zeros : nullptr, xsum.data(), out->typed_data(), m, d, v, group, bits};
  // About four chunks a thread, whole tiles of four rows; small products stay on the calling thread.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t tasks = m * d * v < (1 << 18) ? 0 : threads - 1;
  int64_t chunk = (v + 4 * (tasks + 1) - 1) / (4 * (tasks + 1));
  chunk = (chunk + 3) / 4 * 4;
  Parallel(pool, v, chunk, tasks, [&p, bits](int64_t w0, int64_t w1) {
    (bits == 4 ? Rows<4> : Rows<8>)(p, w0, w1);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlamaJaxQMatmulCpu, QMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [M, K]
                                  .Arg<ffi::AnyBuffer>()         // codes [L, Kstored, N]
                                  .Arg<ffi::AnyBuffer>()         // scales [L, K/group, N]
                                  .Arg<ffi::AnyBuffer>()         // zero points like scales, or empty
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer [1]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out [M, N]
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("group"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlamaJaxQMatmulRowsCpu, QMatmulRowsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [M, D]
                                  .Arg<ffi::AnyBuffer>()         // codes [V, Dstored]
                                  .Arg<ffi::AnyBuffer>()         // scales [V, D/group]
                                  .Arg<ffi::AnyBuffer>()         // zero points like scales, or empty
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out [M, V]
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("group"));
