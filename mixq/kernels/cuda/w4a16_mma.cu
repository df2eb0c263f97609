// W4A16 mixed-input GEMM on tensor cores (mma.sync m16n8k16), Ampere..Hopper.
//
//   out[M, N] = x[M, K] @ W^T,  W[n, k] = (q[n, k] - z[g, n]) * s[g, n],  g = k / group
//
// A pure CUDA translation unit with extern "C" launchers (no torch headers): mixq compiles
// it once per GPU architecture with nvcc and loads it with ctypes (mixq/kernels/cuda_jit.py).
//
// Weight layout (made once after loading by mixq.kernels.w4a16_mma.pack_w4a16, still 4-bit):
//   qw      int32 [K/16][N/64][32 lanes][4 words]. The 16 bytes of lane L (g = L/4, t = L%4)
//           in block (kb, nb) are exactly the B fragments that lane needs for the eight
//           m16n8k16 MMAs of a 16 x 64 weight slice: word w covers n8 tiles jt = 2w, 2w+1;
//           nibble p of a word holds k = 16 kb + 2t + p/4 + 8 (p%2), n = 64 nb + 8 (2w + (p%4)/2) + g.
//           Two nibbles 16 bits apart form one bf16x2/half2 register after one lop3:
//           (word >> 4i) & 0x000f000f | MAGIC  ->  (MAGIC + q_lo, MAGIC + q_hi).
//   scales  T [G][N/64][8 (g)][8 (jt)]: the 8 scales a lane needs for one group, 16 bytes.
//   zeros   uint8 [G][N/64][8][8] (same order) or none (symmetric: 8).
// The activation tile goes through shared memory (cp.async, XOR-swizzled 16-byte chunks)
// and ldmatrix; the weight goes global -> shared (cp.async, multi-stage) -> registers with
// one 16-byte load per lane per k16 slice, is converted there (lop3, sub, mul: 3.75
// instructions per 2 values) and fed to the MMA as the B operand.
//
// Schedule: stream-K. The (tile, k-block) iterations of the whole problem are split evenly
// over a persistent grid; a CTA whose range covers a tile's whole K writes the output
// directly, else it writes an fp32 partial to the workspace (slot tile + cta, unique) and
// the tile's last CTA to arrive (an arrival counter per tile) sums the partials in CTA
// order (deterministic) and re-arms the counter to zero (CUDA-graph safe). The loop keeps
// (tile, k-block) cursors instead of dividing per stage, reads a stage's fragments before
// its math, and builds the doubled scales once per group, not per slice.
//
// Few rows on small weights: w4a16_gemv_kernel (below) streams the same layout straight
// into registers, with no shared-memory stage and no barrier in its loop.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

// A build may split this file into MIXQ_PARTS translation units compiled in parallel
// (cuda_jit.build(..., parts=P) passes -DMIXQ_PARTS=P -DMIXQ_PART=i and links the objects):
// part i instantiates the kernels of the (dtype, zero point) combos c = 2 * is_bf16 + has_zp
// with c % P == i, and part 0 also holds the dequantize kernel and the extern "C" entry points.
#ifndef MIXQ_PARTS
#define MIXQ_PARTS 1
#define MIXQ_PART 0
#endif

namespace mixq_w4a16 {

struct Params {
  const void* x;         // [M, K] T, row-major, rows contiguous
  const int4* qw;        // packed weight (see above)
  const void* scales;    // packed scales
  const uint8_t* zeros;  // packed zeros or nullptr
  const void* bias;      // [N] T or nullptr
  void* out;             // [M, N] T
  float* ws;             // [tiles + grid][ws_rows][BN] fp32 partials
  int* counters;         // [tiles] int32, zero on entry, left at zero
  int M, N, K, group;
  int mchunks, ntiles, kiters, tiles, grid, ws_rows;
  long long total_iters;
  int evict_first;
};

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(smem)), "l"(gmem));
}

__device__ __forceinline__ void cp_async16_hint(void* smem, const void* gmem, uint64_t policy) {
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem),
               "l"(policy));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// (a & b) | c in one instruction
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm volatile("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

template <typename T>
struct Traits;

template <>
struct Traits<__nv_bfloat16> {
  // bf16 128.0: 7 mantissa bits of unit step, so 128 + q is exact for q < 128
  static constexpr uint32_t MAGIC = 0x43004300u;
  __device__ static __forceinline__ uint32_t sub_mul(uint32_t v, uint32_t zb, uint32_t s) {
    __nv_bfloat162 r = __hmul2(__hsub2(*reinterpret_cast<__nv_bfloat162*>(&v), *reinterpret_cast<__nv_bfloat162*>(&zb)),
                               *reinterpret_cast<__nv_bfloat162*>(&s));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ static __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ static __forceinline__ uint16_t from_float(float f) {
    __nv_bfloat16 h = __float2bfloat16_rn(f);
    return *reinterpret_cast<uint16_t*>(&h);
  }
  __device__ static __forceinline__ float to_float(uint16_t u) {
    return __uint_as_float(static_cast<uint32_t>(u) << 16);
  }
};

template <>
struct Traits<__half> {
  // fp16 1024.0: 10 mantissa bits of unit step
  static constexpr uint32_t MAGIC = 0x64006400u;
  __device__ static __forceinline__ uint32_t sub_mul(uint32_t v, uint32_t zb, uint32_t s) {
    __half2 r = __hmul2(__hsub2(*reinterpret_cast<__half2*>(&v), *reinterpret_cast<__half2*>(&zb)),
                        *reinterpret_cast<__half2*>(&s));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ static __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ static __forceinline__ uint16_t from_float(float f) {
    __half h = __float2half_rn(f);
    return *reinterpret_cast<uint16_t*>(&h);
  }
  __device__ static __forceinline__ float to_float(uint16_t u) {
    return __half2float(*reinterpret_cast<__half*>(&u));
  }
};

// A lane's 8 column scales come as one 16-byte load (sw) and its 8 zero points as one
// 8-byte load (zv; symmetric: 8 each): column jt's scale, and MAGIC + its zero, twice.
__device__ __forceinline__ uint32_t scale2(const uint32_t (&sw)[4], int jt) {
  return __byte_perm(sw[jt >> 1], 0, (jt & 1) ? 0x3232 : 0x1010);
}

template <typename T>
__device__ __forceinline__ uint32_t zero2(uint2 zv, int jt) {
  return __byte_perm(jt < 4 ? zv.x : zv.y, 0, 0x4440 + (jt & 3)) * 0x00010001u | Traits<T>::MAGIC;
}

// The two weights 16 bits apart at nibble offset `shift` of a packed word, dequantized:
// one lop3 to (MAGIC + q_lo, MAGIC + q_hi), then (. - (MAGIC + zero)) * scale (zb, s2 above).
template <typename T>
__device__ __forceinline__ uint32_t dequant2(uint32_t word, int shift, uint32_t zb, uint32_t s2) {
  return Traits<T>::sub_mul(and_or(word >> shift, 0x000f000fu, Traits<T>::MAGIC), zb, s2);
}

// n8 tile jt's B fragment from a lane's 16-byte word of a 16 x 64 slice (word jt / 2, nibble
// offset 8 (jt % 2)): (k 2t, 2t+1) and (k 2t+8, 2t+9) of column g, dequantized with that
// column's doubled zero and scale. The tiled kernel, the GEMV and the dequantize kernel all
// read the layout through it.
template <typename T>
__device__ __forceinline__ uint2 frag(const int4& bq, int jt, uint32_t zb, uint32_t s2) {
  const int w = jt >> 1, shift = 8 * (jt & 1);
  const uint32_t word = static_cast<uint32_t>(w == 0 ? bq.x : w == 1 ? bq.y : w == 2 ? bq.z : bq.w);
  return make_uint2(dequant2<T>(word, shift, zb, s2), dequant2<T>(word, shift + 4, zb, s2));
}

// CTA that owns global iteration i when `total` iterations are split over `grid` CTAs,
// CTA c taking [c*total/grid, (c+1)*total/grid) (grid <= total: no empty range).
__device__ __forceinline__ int owner(long long i, long long total, int grid) {
  return static_cast<int>(((i + 1) * grid + total - 1) / total) - 1;
}

template <typename T, int MB, int WN, int WK, int KS, int STAGES, bool HAS_ZP>
struct Cfg {
  static constexpr int BN = 64 * WN;         // output columns per tile
  static constexpr int BK = 16 * WK * KS;    // K per pipeline stage
  static constexpr int MR = 16 * MB;         // rows per tile
  static constexpr int THREADS = 32 * WN * WK;
  static constexpr int SR = BK / 16;         // most scale rows a stage can need (group 16)
  static constexpr int RED_LD = BN + 8;      // padded row of the fp32 reduction tile
  static constexpr int A_BYTES = MR * BK * 2;
  static constexpr int B_BYTES = BK * BN / 2;
  static constexpr int S_BYTES = SR * BN * 2;
  static constexpr int Z_BYTES = HAS_ZP ? SR * BN : 0;
  static constexpr int STAGE_BYTES = A_BYTES + B_BYTES + S_BYTES + Z_BYTES;
  // the K-warps' accumulators are summed in shared memory; one K-warp needs no such tile
  static constexpr int RED_BYTES = WK > 1 ? MR * RED_LD * 4 : 0;
  static constexpr int SMEM = STAGES * STAGE_BYTES + RED_BYTES + 16;
  static_assert(BK >= 64, "the A swizzle needs 8 chunks of 16 bytes per row");
  static_assert(A_BYTES % 16 == 0 && B_BYTES % 16 == 0 && S_BYTES % 16 == 0 && Z_BYTES % 16 == 0, "alignment");
  static_assert(THREADS % (WN * 32) == 0, "the weight copy maps each thread to one column block");
};

template <typename T, int MB, int WN, int WK, int KS, int STAGES, bool HAS_ZP>
__global__ void __launch_bounds__(32 * WN * WK) w4a16_mma_kernel(const Params p) {
  using C = Cfg<T, MB, WN, WK, KS, STAGES, HAS_ZP>;
  using Tr = Traits<T>;
  extern __shared__ __align__(16) uint8_t smem[];
  uint8_t* s_stage = smem;
  float* s_red = reinterpret_cast<float*>(smem + STAGES * C::STAGE_BYTES);
  int* s_flag = reinterpret_cast<int*>(smem + STAGES * C::STAGE_BYTES + C::RED_BYTES);

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wn = warp % WN;
  const int wk = warp / WN;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int nblocks = p.N / 64;
  const bool small_group = p.group < C::BK;             // several groups per stage (16/32/64: powers of 2)
  const int group_rows = small_group ? C::BK / p.group : 1;  // scale rows per stage
  const int gshift = small_group ? __ffs(p.group) - 5 : 0;   // k16 slice -> scale row: kk >> gshift

  const long long i0 = static_cast<long long>(blockIdx.x) * p.total_iters / p.grid;
  const long long i1 = static_cast<long long>(blockIdx.x + 1) * p.total_iters / p.grid;
  const int n_it = static_cast<int>(i1 - i0);

  uint64_t policy = 0;
  if (p.evict_first) asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));

  const T* x = static_cast<const T*>(p.x);
  const T* scales = static_cast<const T*>(p.scales);

  // A (tile, k-block) cursor, advanced one stage at a time: no divisions in the loop.
  struct Cursor {
    int tile, kb, row0, rows, nb0;
  };
  auto set_tile = [&](Cursor& c) {
    const int mc = c.tile % p.mchunks;
    c.row0 = mc * C::MR;
    c.rows = min(C::MR, p.M - c.row0);
    c.nb0 = (c.tile / p.mchunks) * WN;
  };
  auto advance = [&](Cursor& c) {
    if (++c.kb == p.kiters) {
      c.kb = 0;
      ++c.tile;
      if (c.tile < p.tiles) set_tile(c);
    }
  };
  Cursor lc;  // next stage to load
  lc.tile = static_cast<int>(i0 / p.kiters);
  lc.kb = static_cast<int>(i0 % p.kiters);
  set_tile(lc);
  Cursor cc = lc;  // next stage to compute

  // this thread's share of a stage's weight copy: column block tid % (WN*32) / 32 of rows
  // tid / (WN*32) + j * WK (every thread copies KS 16-byte chunks)
  const long long b_row_stride = static_cast<long long>(nblocks) * 32;  // int4s per k16 row
  const int b_thread = (tid / (WN * 32)) * static_cast<int>(b_row_stride) + (tid % (WN * 32));

  auto load_stage = [&](const Cursor& c, int slot) {
    const int k0 = c.kb * C::BK;
    uint8_t* st = s_stage + slot * C::STAGE_BYTES;
    // activations: only the rows that exist (the MMA rows of missing ones are never stored)
    T* sa = reinterpret_cast<T*>(st);
    constexpr int CPR = C::BK / 8;  // 16-byte chunks per row
    const T* xs = x + static_cast<long long>(c.row0) * p.K + k0;
    for (int q = tid; q < c.rows * CPR; q += C::THREADS) {
      const int r = q / CPR, ch = q % CPR;
      cp_async16(sa + r * C::BK + ((ch ^ (r & 7)) * 8), xs + static_cast<long long>(r) * p.K + ch * 8);
    }
    // weights: BK/16 rows of WN contiguous 512-byte blocks
    int4* sb = reinterpret_cast<int4*>(st + C::A_BYTES) + tid;
    const int4* src = p.qw + (static_cast<long long>(c.kb) * (C::BK / 16)) * b_row_stride + c.nb0 * 32 + b_thread;
    constexpr int PER = (C::BK / 16) * WN * 32 / C::THREADS;
#pragma unroll
    for (int j = 0; j < PER; ++j) {
      if (p.evict_first)
        cp_async16_hint(sb + j * C::THREADS, src + j * WK * b_row_stride, policy);
      else
        cp_async16(sb + j * C::THREADS, src + j * WK * b_row_stride);
    }
    // scales (and zeros) of the groups this stage touches
    const int gi0 = k0 / p.group;
    T* ss = reinterpret_cast<T*>(st + C::A_BYTES + C::B_BYTES);
    constexpr int SCH = C::BN / 8;
    for (int q = tid; q < group_rows * SCH; q += C::THREADS) {
      const int r = q / SCH, ch = q % SCH;
      cp_async16(ss + r * C::BN + ch * 8, scales + (static_cast<long long>(gi0 + r) * nblocks + c.nb0) * 64 + ch * 8);
    }
    if constexpr (HAS_ZP) {
      uint8_t* sz = st + C::A_BYTES + C::B_BYTES + C::S_BYTES;
      constexpr int ZCH = C::BN / 16;
      for (int q = tid; q < group_rows * ZCH; q += C::THREADS) {
        const int r = q / ZCH, ch = q % ZCH;
        cp_async16(sz + r * C::BN + ch * 16, p.zeros + (static_cast<long long>(gi0 + r) * nblocks + c.nb0) * 64 + ch * 16);
      }
    }
  };

  float acc[MB][8][4];
  auto zero_acc = [&] {
#pragma unroll
    for (int mb = 0; mb < MB; ++mb)
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mb][j][e] = 0.f;
  };
  zero_acc();

  auto compute_stage = [&](int slot) {
    const uint8_t* st = s_stage + slot * C::STAGE_BYTES;
    const uint32_t sa = smem_u32(st);
    const int4* sb = reinterpret_cast<const int4*>(st + C::A_BYTES);
    const uint8_t* ss = st + C::A_BYTES + C::B_BYTES;
    // every shared-memory read of the stage first (their latencies overlap), then the math
    uint32_t a[KS][MB][4];
    int4 bq[KS];
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      const int kk = wk * KS + ks;  // k16 slice of this stage
#pragma unroll
      for (int mb = 0; mb < MB; ++mb) {
        const int r = mb * 16 + (lane & 15);
        const int ch = kk * 2 + (lane >> 4);
        ldmatrix_x4(a[ks][mb], sa + r * (C::BK * 2) + ((ch ^ (r & 7)) * 16));
      }
      bq[ks] = sb[(kk * WN + wn) * 32 + lane];
    }
    {
      uint32_t s2[8], zb[8];
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        if (ks == 0 || small_group) {  // this slice's group: its 8 column scales (and zeros), each doubled
          const int srow = small_group ? (wk * KS + ks) >> gshift : 0;
          const uint4 sv = *reinterpret_cast<const uint4*>(ss + (srow * C::BN + wn * 64 + g * 8) * 2);
          const uint32_t sw[4] = {sv.x, sv.y, sv.z, sv.w};
          uint2 zv = make_uint2(0x08080808u, 0x08080808u);
          if constexpr (HAS_ZP) zv = *reinterpret_cast<const uint2*>(ss + C::S_BYTES + srow * C::BN + wn * 64 + g * 8);
#pragma unroll
          for (int jt = 0; jt < 8; ++jt) {
            s2[jt] = scale2(sw, jt);
            zb[jt] = zero2<T>(zv, jt);
          }
        }
#pragma unroll
        for (int jt = 0; jt < 8; ++jt) {
          const uint2 b = frag<T>(bq[ks], jt, zb[jt], s2[jt]);
#pragma unroll
          for (int mb = 0; mb < MB; ++mb) Tr::mma(acc[mb][jt], a[ks][mb], b.x, b.y);
        }
      }
    }
  };

  const T* bias = static_cast<const T*>(p.bias);
  uint16_t* out = static_cast<uint16_t*>(p.out);
  const long long slot_stride = static_cast<long long>(p.ws_rows) * C::BN;

  // after this CTA wrote its partial of `tile`: whether it is the last of the tile's
  // `others` + 1 CTAs to arrive (then every partial is visible to it)
  auto last_arrival = [&](int tile, int others) {
    __threadfence();
    __syncthreads();
    if (tid == 0) *s_flag = atomicAdd(p.counters + tile, 1) == others;
    __syncthreads();
    const bool last = *s_flag;
    if (last) __threadfence();
    return last;
  };

  // the end of a tile segment [seg_kb, kb]: write the output (whole K) or an fp32 partial,
  // and the tile's last CTA to arrive sums the partials in CTA order
  auto finish = [&](const Cursor& c, int seg_kb) {
    const int n0 = c.nb0 * 64;
    const bool whole = seg_kb == 0 && c.kb == p.kiters - 1;
    const long long tile_first = static_cast<long long>(c.tile) * p.kiters;
    if constexpr (WK == 1) {
      // one K-warp: each lane writes (and sums) its own accumulator fragments, no shared memory
      float* mine = p.ws + (c.tile + static_cast<long long>(blockIdx.x)) * slot_stride;
      auto store2 = [&](int row, int col, float v0, float v1) {
        if (bias != nullptr) {
          v0 += Tr::to_float(reinterpret_cast<const uint16_t*>(bias)[n0 + col]);
          v1 += Tr::to_float(reinterpret_cast<const uint16_t*>(bias)[n0 + col + 1]);
        }
        const uint32_t o = static_cast<uint32_t>(Tr::from_float(v0)) | (static_cast<uint32_t>(Tr::from_float(v1)) << 16);
        *reinterpret_cast<uint32_t*>(out + static_cast<long long>(c.row0 + row) * p.N + n0 + col) = o;
      };
      // f(row, column in the tile, the lane's two accumulators there) for each of the lane's
      // fragment pairs in rows < c.rows
      auto each_pair = [&](auto&& f) {
#pragma unroll
        for (int mb = 0; mb < MB; ++mb)
#pragma unroll
          for (int jt = 0; jt < 8; ++jt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const int row = mb * 16 + g + 8 * h;
              if (row < c.rows) f(row, wn * 64 + jt * 8 + 2 * t, acc[mb][jt][2 * h], acc[mb][jt][2 * h + 1]);
            }
      };
      if (whole) {
        each_pair([&](int row, int col, float v0, float v1) { store2(row, col, v0, v1); });
      } else {
        each_pair([&](int row, int col, float v0, float v1) {
          __stcg(reinterpret_cast<float2*>(mine + row * C::BN + col), make_float2(v0, v1));
        });
        const int c_first = owner(tile_first, p.total_iters, p.grid);
        const int c_last = owner(tile_first + p.kiters - 1, p.total_iters, p.grid);
        if (last_arrival(c.tile, c_last - c_first)) {
          each_pair([&](int row, int col, float, float) {
            float2 v = make_float2(0.f, 0.f);
            for (int q = c_first; q <= c_last; ++q) {  // CTA order: deterministic
              const float2 u = __ldcg(reinterpret_cast<const float2*>(
                  p.ws + (c.tile + static_cast<long long>(q)) * slot_stride + row * C::BN + col));
              v.x += u.x;
              v.y += u.y;
            }
            store2(row, col, v.x, v.y);
          });
          if (tid == 0) p.counters[c.tile] = 0;  // re-armed for the next launch
        }
        __syncthreads();  // s_flag is reused by the next segment
      }
    } else {
      // sum the K-warps' accumulators in shared memory
#pragma unroll
      for (int r = 0; r < WK; ++r) {
        if (wk == r) {
#pragma unroll
          for (int mb = 0; mb < MB; ++mb) {
#pragma unroll
            for (int jt = 0; jt < 8; ++jt) {
              const int col = wn * 64 + jt * 8 + 2 * t;
#pragma unroll
              for (int h = 0; h < 2; ++h) {
                const int row = mb * 16 + g + 8 * h;
                if (row < c.rows) {
                  float2* dst = reinterpret_cast<float2*>(s_red + row * C::RED_LD + col);
                  float2 v = make_float2(acc[mb][jt][2 * h], acc[mb][jt][2 * h + 1]);
                  if (r > 0) {
                    const float2 o = *dst;
                    v.x += o.x;
                    v.y += o.y;
                  }
                  *dst = v;
                }
              }
            }
          }
        }
        __syncthreads();
      }
      constexpr int UPR = C::BN / 8;  // 8-column units per row
      auto store_out = [&](int row, int c8, float (&v)[8]) {
        if (bias != nullptr) {
          const uint4 b = *reinterpret_cast<const uint4*>(bias + n0 + c8);
          const uint32_t bw[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
          for (int e = 0; e < 8; ++e) v[e] += Tr::to_float(static_cast<uint16_t>(bw[e / 2] >> (16 * (e & 1))));
        }
        uint32_t o[4];
#pragma unroll
        for (int e = 0; e < 4; ++e)
          o[e] = static_cast<uint32_t>(Tr::from_float(v[2 * e])) |
                 (static_cast<uint32_t>(Tr::from_float(v[2 * e + 1])) << 16);
        *reinterpret_cast<uint4*>(out + static_cast<long long>(c.row0 + row) * p.N + n0 + c8) =
            make_uint4(o[0], o[1], o[2], o[3]);
      };
      if (whole) {
        for (int u = tid; u < c.rows * UPR; u += C::THREADS) {
          const int row = u / UPR, c8 = (u % UPR) * 8;
          const float4 v0 = *reinterpret_cast<const float4*>(s_red + row * C::RED_LD + c8);
          const float4 v1 = *reinterpret_cast<const float4*>(s_red + row * C::RED_LD + c8 + 4);
          float v[8] = {v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w};
          store_out(row, c8, v);
        }
      } else {
        float* mine = p.ws + (c.tile + static_cast<long long>(blockIdx.x)) * slot_stride;
        for (int u = tid; u < c.rows * UPR; u += C::THREADS) {
          const int row = u / UPR, c8 = (u % UPR) * 8;
          const float4* src = reinterpret_cast<const float4*>(s_red + row * C::RED_LD + c8);
          float4* dst = reinterpret_cast<float4*>(mine + row * C::BN + c8);
          __stcg(dst, src[0]);
          __stcg(dst + 1, src[1]);
        }
        const int c_first = owner(tile_first, p.total_iters, p.grid);
        const int c_last = owner(tile_first + p.kiters - 1, p.total_iters, p.grid);
        if (last_arrival(c.tile, c_last - c_first)) {
          for (int u = tid; u < c.rows * UPR; u += C::THREADS) {
            const int row = u / UPR, c8 = (u % UPR) * 8;
            float v[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
            for (int q = c_first; q <= c_last; ++q) {  // CTA order: deterministic
              const float4* src = reinterpret_cast<const float4*>(p.ws + (c.tile + static_cast<long long>(q)) * slot_stride +
                                                                  row * C::BN + c8);
              const float4 a0 = __ldcg(src), a1 = __ldcg(src + 1);
              v[0] += a0.x; v[1] += a0.y; v[2] += a0.z; v[3] += a0.w;
              v[4] += a1.x; v[5] += a1.y; v[6] += a1.z; v[7] += a1.w;
            }
            store_out(row, c8, v);
          }
          if (tid == 0) p.counters[c.tile] = 0;  // re-armed for the next launch
        }
      }
      __syncthreads();  // s_red and s_flag are reused by the next segment
    }
    zero_acc();
  };

  // prologue: STAGES-1 stages in flight
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < n_it) {
      load_stage(lc, s);
      advance(lc);
    }
    cp_async_commit();
  }
  int seg_kb = cc.kb;  // first k-block of the current tile segment
  int slot = 0, lslot = STAGES - 1;
  for (int it = 0; it < n_it; ++it) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // stage `it` landed for every thread; slot (it-1) % STAGES is free
    if (it + STAGES - 1 < n_it) {
      load_stage(lc, lslot);
      advance(lc);
    }
    cp_async_commit();
    lslot = lslot == STAGES - 1 ? 0 : lslot + 1;
    compute_stage(slot);
    slot = slot == STAGES - 1 ? 0 : slot + 1;
    if (cc.kb == p.kiters - 1 || it == n_it - 1) {
      finish(cc, seg_kb);
      seg_kb = 0;
    }
    advance(cc);
  }
  cp_async_wait<0>();
}

// Dequantize the packed weight to W^T [K, ldo] (columns [64 nb0, 64 (nb0 + nbs)) of it):
// for large M, where cuBLAS on the dequantized tile beats a mixed-input mma.sync kernel.
template <typename T, bool HAS_ZP>
__global__ void __launch_bounds__(256) w4a16_dequant_kernel(const int4* qw, const T* scales, const uint8_t* zeros,
                                                             T* out, int N, int K, int group, int nb0, int nbs,
                                                             int ldo) {
  __shared__ __align__(16) uint16_t tile[8][16][64 + 8];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int nb = nb0 + blockIdx.x * 8 + warp;  // one 16 x 64 block per warp
  const int kb = blockIdx.y;
  const int nblocks = N / 64;
  const bool ok = nb < nb0 + nbs;
  if (ok) {
    const int4 bq = qw[(static_cast<long long>(kb) * nblocks + nb) * 32 + lane];
    const int gi = kb * 16 / group;
    const uint4 sv = *reinterpret_cast<const uint4*>(scales + (static_cast<long long>(gi) * nblocks + nb) * 64 + g * 8);
    uint2 zv = make_uint2(0x08080808u, 0x08080808u);
    if (HAS_ZP) zv = *reinterpret_cast<const uint2*>(zeros + (static_cast<long long>(gi) * nblocks + nb) * 64 + g * 8);
    const uint32_t sw[4] = {sv.x, sv.y, sv.z, sv.w};
#pragma unroll
    for (int jt = 0; jt < 8; ++jt) {
      const uint2 b = frag<T>(bq, jt, zero2<T>(zv, jt), scale2(sw, jt));
#pragma unroll
      for (int h = 0; h < 2; ++h) {  // h: k + 8
        const uint32_t v = h ? b.y : b.x;
        const int n = jt * 8 + g;
        tile[warp][2 * t + 8 * h][n] = static_cast<uint16_t>(v & 0xffffu);
        tile[warp][2 * t + 8 * h + 1][n] = static_cast<uint16_t>(v >> 16);
      }
    }
  }
  __syncwarp();
  if (ok) {
#pragma unroll
    for (int u = lane; u < 16 * 8; u += 32) {  // 16 rows of 8 16-byte chunks
      const int r = u >> 3, ch = u & 7;
      const uint4 v = *reinterpret_cast<const uint4*>(&tile[warp][r][ch * 8]);
      *reinterpret_cast<uint4*>(out + static_cast<long long>(kb * 16 + r) * ldo + (nb - nb0) * 64 + ch * 8) = v;
    }
  }
}

template <typename T, int MB, int WN, int WK, int KS, int STAGES, bool HAS_ZP>
int launch_cfg(const Params& p, cudaStream_t stream, int query_occupancy) {
  using C = Cfg<T, MB, WN, WK, KS, STAGES, HAS_ZP>;
  auto kern = w4a16_mma_kernel<T, MB, WN, WK, KS, STAGES, HAS_ZP>;
  static unsigned attr_set = 0;  // a bit per device, per instantiation (a race sets it twice)
  int dev = 0;
  cudaGetDevice(&dev);
  if (!(attr_set & (1u << (dev & 31)))) {
    cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM);
    if (e != cudaSuccess) return -static_cast<int>(e);
    attr_set |= 1u << (dev & 31);
  }
  if (query_occupancy) {
    int blocks = 0;
    cudaError_t e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kern, C::THREADS, C::SMEM);
    return e == cudaSuccess ? blocks : -static_cast<int>(e);
  }
  kern<<<p.grid, C::THREADS, C::SMEM, stream>>>(p);
  cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? 0 : -static_cast<int>(e);
}

// launch shapes (WN, WK, KS, STAGES); the ids are mirrored in mixq/kernels/w4a16_mma.py
template <typename T, int MB, bool ZP>
int by_shape(int shape, const Params& p, cudaStream_t s, int q) {
  switch (shape) {
    case 0: return launch_cfg<T, MB, 2, 4, 1, 4, ZP>(p, s, q);  // 256 thr, 128 cols, K 64
    case 1: return launch_cfg<T, MB, 4, 2, 2, 4, ZP>(p, s, q);  // 256 thr, 256 cols, K 64
    case 2: return launch_cfg<T, MB, 1, 4, 1, 4, ZP>(p, s, q);  // 128 thr, 64 cols, K 64
    case 3: return launch_cfg<T, MB, 2, 2, 2, 4, ZP>(p, s, q);  // 128 thr, 128 cols, K 64
    case 4: return launch_cfg<T, MB, 4, 1, 4, 4, ZP>(p, s, q);  // 128 thr, 256 cols, K 64
    case 5: return launch_cfg<T, MB, 2, 4, 2, 3, ZP>(p, s, q);  // 256 thr, 128 cols, K 128
    default: return -1000;
  }
}

template <typename T, bool ZP>
int by_mb(int mb, int shape, const Params& p, cudaStream_t s, int q) {
  switch (mb) {
    case 1: return by_shape<T, 1, ZP>(shape, p, s, q);
    case 2: return by_shape<T, 2, ZP>(shape, p, s, q);
    case 3: return by_shape<T, 3, ZP>(shape, p, s, q);
    case 4: return by_shape<T, 4, ZP>(shape, p, s, q);
    default: return -1001;
  }
}


// Few rows (M <= 16): split-K GEMV on tensor cores with the weight streamed straight into
// registers. At M <= 16 each lane's 16 bytes of a 16 x 64 weight slice are read by that
// lane only, so they skip shared memory: every warp keeps D slices of loads in flight
// (ld.global, L1 no-allocate, L2 evict-first) and converts + multiplies one slice while
// the next D arrive, with no barrier in the loop. The CTA's activations [M, its K range]
// are staged once in shared memory (cp.async, swizzled) for ldmatrix. CTA (nb, kc) = one
// 64-column block and 1/kcs of K, its WK warps each a contiguous run of the slices; the
// warps' sums meet in shared memory, and with kcs > 1 the CTA writes an fp32 partial and
// the block's last CTA to arrive sums the kcs partials in order (deterministic).
struct GemvParams {
  const void* x;
  const int4* qw;
  const void* scales;
  const uint8_t* zeros;
  const void* bias;
  void* out;
  float* ws;      // [row_blocks][nblocks][kcs][M][64] fp32 partials (kcs > 1)
  int* counters;  // [row_blocks][nblocks], zero on entry, left at zero
  int M, N, K, group, kcs, spc;  // spc: k16 slices per CTA
  // Grouped over experts (MoE; rows == nullptr: one dense GEMM, row_blocks 1). Row block
  // b (grid y) holds up to M = 16 rows of one expert: rows[16 b + r] = the pair index of
  // row r or -1 (padding), block_fid[b] its fused expert id (>= nfid: past the used
  // blocks), slots[fid] that expert's index in the stacked weights or -1 (not this launch's
  // format). Row r reads activation row pair / row_div (top-k for gate/up: the token) and
  // writes output row pair.
  const int* rows;
  const int* block_fid;
  const int* slots;
  int nfid, row_div, row_blocks;
  long long w_estride, s_estride, z_estride;  // one expert's qw (int4s), scales (elements), zeros (bytes)
};

__device__ __forceinline__ int4 ldg_stream(const int4* p, uint64_t policy) {
  int4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.s32 {%0,%1,%2,%3}, [%4], %5;\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p), "l"(policy));
  return v;
}

template <typename T, int WK, int D, bool HAS_ZP>
__global__ void __launch_bounds__(32 * WK) w4a16_gemv_kernel(const GemvParams p) {
  using Tr = Traits<T>;
  extern __shared__ __align__(16) uint8_t smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int nblocks = p.N / 64;
  const int nb = blockIdx.x % nblocks;
  const int kc = blockIdx.x / nblocks;
  const int rb = blockIdx.y;
  const bool moe = p.rows != nullptr;
  const int M = p.M;
  const int spc = p.spc, spw = spc / WK;
  const int row_bytes = spc * 32;  // one activation row of the CTA's K range
  uint8_t* sx = smem;
  float* red = reinterpret_cast<float*>(smem + M * row_bytes);
  int* s_flag = reinterpret_cast<int*>(red + WK * M * 64);
  int* s_ids = s_flag + 1;  // MoE: the block's pair indices (-1: padding)
  long long slot = 0;
  if (moe) {
    const int f = p.block_fid[rb];
    if (f >= p.nfid) return;  // past the used blocks (the grid is a static bound)
    slot = p.slots[f];
    if (slot < 0) return;  // an expert of another launch
    if (tid < M) s_ids[tid] = p.rows[rb * M + tid];
    __syncthreads();
  }

  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));

  // activations of the CTA's K range -> shared memory (16-byte chunk c of row r at c ^ (r & 7))
  const T* x = static_cast<const T*>(p.x);
  const int k0 = kc * spc * 16;
  const int cpr = spc * 2;  // chunks per row
  for (int c = tid; c < M * cpr; c += 32 * WK) {
    const int r = c / cpr, ch = c % cpr;
    const int src = moe ? s_ids[r] : r;
    if (src < 0) continue;  // a padding row: its sums are never stored
    cp_async16(sx + r * row_bytes + ((ch ^ (r & 7)) * 16),
               x + static_cast<long long>(moe ? src / p.row_div : src) * p.K + k0 + ch * 8);
  }
  cp_async_commit();

  // this warp's slices [s0, s0 + spw) of K/16; lane's 16 bytes of each
  const int s0 = kc * spc + warp * spw;
  const long long bstride = static_cast<long long>(nblocks) * 32;
  const int4* bp = p.qw + slot * p.w_estride + static_cast<long long>(s0) * bstride + nb * 32 + lane;
  const T* scales = static_cast<const T*>(p.scales) + slot * p.s_estride;
  const uint8_t* zeros = p.zeros + slot * p.z_estride;
  const bool pow2 = (p.group & (p.group - 1)) == 0;
  const int glog = __ffs(p.group) - 1;
  auto srow_of = [&](int s) { return pow2 ? (s * 16) >> glog : (s * 16) / p.group; };
  auto load_s = [&](int s) {
    return __ldg(reinterpret_cast<const uint4*>(scales + (static_cast<long long>(srow_of(s)) * nblocks + nb) * 64 + g * 8));
  };
  auto load_z = [&](int s) {
    return __ldg(reinterpret_cast<const uint2*>(zeros + (static_cast<long long>(srow_of(s)) * nblocks + nb) * 64 + g * 8));
  };
  int4 bbuf[D];
  uint4 sbuf[D];
  uint2 zbuf[D];
#pragma unroll
  for (int d = 0; d < D; ++d) {
    if (d < spw) {
      bbuf[d] = ldg_stream(bp + d * bstride, policy);
      sbuf[d] = load_s(s0 + d);
      if constexpr (HAS_ZP) zbuf[d] = load_z(s0 + d);
    }
  }
  cp_async_wait<0>();
  __syncthreads();

  float acc[8][4];
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;
  const uint32_t sx_u32 = smem_u32(sx);
  const int ar = min(lane & 15, M - 1);  // rows past M read row M-1 (their sums are never stored)
  const uint32_t a_row = sx_u32 + ar * row_bytes;
  const int a_sw = ar & 7;

  for (int i = 0; i < spw; i += D) {
#pragma unroll
    for (int d = 0; d < D; ++d) {
      if (i + d < spw) {
        const int4 bq = bbuf[d];
        const uint4 sv = sbuf[d];
        uint2 zv = make_uint2(0x08080808u, 0x08080808u);
        if constexpr (HAS_ZP) zv = zbuf[d];
        const int nxt = i + d + D;
        if (nxt < spw) {
          bbuf[d] = ldg_stream(bp + nxt * bstride, policy);
          sbuf[d] = load_s(s0 + nxt);
          if constexpr (HAS_ZP) zbuf[d] = load_z(s0 + nxt);
        }
        uint32_t a[4];
        const int ls = warp * spw + i + d;  // slice within the CTA's range
        ldmatrix_x4(a, a_row + (((ls * 2 + (lane >> 4)) ^ a_sw) * 16));
        const uint32_t sw[4] = {sv.x, sv.y, sv.z, sv.w};
#pragma unroll
        for (int jt = 0; jt < 8; ++jt) {
          const uint2 b = frag<T>(bq, jt, zero2<T>(zv, jt), scale2(sw, jt));
          Tr::mma(acc[jt], a, b.x, b.y);
        }
      }
    }
  }

  // the warps' sums (rows < M) -> shared memory, then one thread per (row, 2 columns)
#pragma unroll
  for (int jt = 0; jt < 8; ++jt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = g + 8 * h;
      if (row < M)
        *reinterpret_cast<float2*>(red + (warp * M + row) * 64 + jt * 8 + 2 * t) =
            make_float2(acc[jt][2 * h], acc[jt][2 * h + 1]);
    }
  __syncthreads();
  const T* bias = static_cast<const T*>(p.bias);
  uint16_t* out = static_cast<uint16_t*>(p.out);
  auto store2 = [&](int row, int col, float v0, float v1) {
    const int orow = moe ? s_ids[row] : row;
    if (orow < 0) return;  // padding
    if (bias != nullptr) {
      v0 += Tr::to_float(reinterpret_cast<const uint16_t*>(bias)[nb * 64 + col]);
      v1 += Tr::to_float(reinterpret_cast<const uint16_t*>(bias)[nb * 64 + col + 1]);
    }
    *reinterpret_cast<uint32_t*>(out + static_cast<long long>(orow) * p.N + nb * 64 + col) =
        static_cast<uint32_t>(Tr::from_float(v0)) | (static_cast<uint32_t>(Tr::from_float(v1)) << 16);
  };
  auto warp_sum = [&](int row, int col) {  // the WK warps' sums of (row, col..col+1), in warp order
    float2 v = make_float2(0.f, 0.f);
#pragma unroll
    for (int w = 0; w < WK; ++w) {
      const float2 r = *reinterpret_cast<const float2*>(red + (w * M + row) * 64 + col);
      v.x += r.x;
      v.y += r.y;
    }
    return v;
  };
  const int units = M * 32;  // (row, column pair)
  if (p.kcs == 1) {
    for (int u = tid; u < units; u += 32 * WK) {
      const int row = u >> 5, col = (u & 31) * 2;
      const float2 v = warp_sum(row, col);
      store2(row, col, v.x, v.y);
    }
    return;
  }
  const long long tile = static_cast<long long>(rb) * nblocks + nb;  // (row block, column block)
  float* part = p.ws + (tile * p.kcs + kc) * M * 64;
  for (int u = tid; u < units; u += 32 * WK) {
    const int row = u >> 5, col = (u & 31) * 2;
    __stcg(reinterpret_cast<float2*>(part + row * 64 + col), warp_sum(row, col));
  }
  __threadfence();
  __syncthreads();
  if (tid == 0) *s_flag = atomicAdd(p.counters + tile, 1) == p.kcs - 1;
  __syncthreads();
  if (!*s_flag) return;
  __threadfence();
  const float* all = p.ws + tile * p.kcs * M * 64;
  for (int u = tid; u < units; u += 32 * WK) {
    const int row = u >> 5, col = (u & 31) * 2;
    float2 v = make_float2(0.f, 0.f);
    for (int q = 0; q < p.kcs; ++q) {  // in K order: deterministic
      const float2 r = __ldcg(reinterpret_cast<const float2*>(all + (static_cast<long long>(q) * M + row) * 64 + col));
      v.x += r.x;
      v.y += r.y;
    }
    store2(row, col, v.x, v.y);
  }
  if (tid == 0) p.counters[tile] = 0;  // re-armed for the next launch
}

template <typename T, int WK, int D, bool HAS_ZP>
int launch_gemv(const GemvParams& p, cudaStream_t stream, int query_occupancy) {
  auto kern = w4a16_gemv_kernel<T, WK, D, HAS_ZP>;
  const int smem = p.M * p.spc * 32 + WK * p.M * 64 * 4 + 4 + 16 * 4 + 12;  // + flag, 16 ids, pad
  static unsigned attr_set = 0;
  int dev = 0;
  cudaGetDevice(&dev);
  if (!(attr_set & (1u << (dev & 31)))) {
    int optin = 0;  // the device's most shared memory per block (227 KB on Hopper, 163 KB on A100)
    cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, optin);
    if (e != cudaSuccess) return -static_cast<int>(e);
    attr_set |= 1u << (dev & 31);
  }
  if (query_occupancy) {
    int blocks = 0;
    cudaError_t e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kern, 32 * WK, smem);
    return e == cudaSuccess ? blocks : -static_cast<int>(e);
  }
  kern<<<dim3((p.N / 64) * p.kcs, p.row_blocks), 32 * WK, smem, stream>>>(p);
  cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? 0 : -static_cast<int>(e);
}

// GEMV variants: id -> (warps, load depth); mirrored in mixq/kernels/w4a16_mma.py
template <typename T, bool ZP>
int gemv_by_variant(int variant, const GemvParams& p, cudaStream_t s, int q) {
  switch (variant) {
    case 0: return launch_gemv<T, 4, 8, ZP>(p, s, q);
    case 1: return launch_gemv<T, 4, 4, ZP>(p, s, q);
    case 2: return launch_gemv<T, 8, 4, ZP>(p, s, q);
    default: return -1000;
  }
}

// One (dtype, zero point) combo's launchers, compiled in the part that owns the combo.
int gemm_c0(int mb, int shape, const Params& p, cudaStream_t s, int q);
int gemm_c1(int mb, int shape, const Params& p, cudaStream_t s, int q);
int gemm_c2(int mb, int shape, const Params& p, cudaStream_t s, int q);
int gemm_c3(int mb, int shape, const Params& p, cudaStream_t s, int q);
int gemv_c0(int variant, const GemvParams& p, cudaStream_t s, int q);
int gemv_c1(int variant, const GemvParams& p, cudaStream_t s, int q);
int gemv_c2(int variant, const GemvParams& p, cudaStream_t s, int q);
int gemv_c3(int variant, const GemvParams& p, cudaStream_t s, int q);

#define MIXQ_COMBO(C, T, ZP)                                                                            \
  int gemm_c##C(int mb, int shape, const Params& p, cudaStream_t s, int q) {                            \
    return by_mb<T, ZP>(mb, shape, p, s, q);                                                            \
  }                                                                                                     \
  int gemv_c##C(int variant, const GemvParams& p, cudaStream_t s, int q) {                              \
    return gemv_by_variant<T, ZP>(variant, p, s, q);                                                    \
  }
#if 0 % MIXQ_PARTS == MIXQ_PART
MIXQ_COMBO(0, __half, false)
#endif
#if 1 % MIXQ_PARTS == MIXQ_PART
MIXQ_COMBO(1, __half, true)
#endif
#if 2 % MIXQ_PARTS == MIXQ_PART
MIXQ_COMBO(2, __nv_bfloat16, false)
#endif
#if 3 % MIXQ_PARTS == MIXQ_PART
MIXQ_COMBO(3, __nv_bfloat16, true)
#endif

#if MIXQ_PART == 0
int dispatch(int is_bf16, int mb, int shape, const Params& p, cudaStream_t s, int q) {
  switch (2 * (is_bf16 != 0) + (p.zeros != nullptr)) {
    case 0: return gemm_c0(mb, shape, p, s, q);
    case 1: return gemm_c1(mb, shape, p, s, q);
    case 2: return gemm_c2(mb, shape, p, s, q);
    default: return gemm_c3(mb, shape, p, s, q);
  }
}

int gemv_dispatch(int is_bf16, int variant, const GemvParams& p, cudaStream_t s, int q) {
  switch (2 * (is_bf16 != 0) + (p.zeros != nullptr)) {
    case 0: return gemv_c0(variant, p, s, q);
    case 1: return gemv_c1(variant, p, s, q);
    case 2: return gemv_c2(variant, p, s, q);
    default: return gemv_c3(variant, p, s, q);
  }
}
#endif

}  // namespace mixq_w4a16

#if MIXQ_PART == 0
using namespace mixq_w4a16;

extern "C" {

// Blocks per SM of a launch shape (for sizing the persistent grid); < 0: a CUDA error.
int mixq_w4a16_occupancy(int is_bf16, int mb, int shape, int has_zp) {
  Params p{};
  p.zeros = has_zp ? reinterpret_cast<const uint8_t*>(1) : nullptr;
  return dispatch(is_bf16, mb, shape, p, nullptr, 1);
}

// The GEMM. Returns 0, or a negative CUDA error / -1000 (bad shape id) / -1001 (bad mb).
int mixq_w4a16_gemm(int is_bf16, int mb, int shape, const void* x, const void* qw, const void* scales,
                    const void* zeros, const void* bias, void* out, void* ws, void* counters, int M, int N, int K,
                    int group, int mchunks, int ntiles, int kiters, int grid, int ws_rows, int evict_first,
                    void* stream) {
  Params p;
  p.x = x;
  p.qw = static_cast<const int4*>(qw);
  p.scales = scales;
  p.zeros = static_cast<const uint8_t*>(zeros);
  p.bias = bias;
  p.out = out;
  p.ws = static_cast<float*>(ws);
  p.counters = static_cast<int*>(counters);
  p.M = M;
  p.N = N;
  p.K = K;
  p.group = group;
  p.mchunks = mchunks;
  p.ntiles = ntiles;
  p.kiters = kiters;
  p.tiles = mchunks * ntiles;
  p.grid = grid;
  p.ws_rows = ws_rows;
  p.total_iters = static_cast<long long>(p.tiles) * kiters;
  p.evict_first = evict_first;
  return dispatch(is_bf16, mb, shape, p, static_cast<cudaStream_t>(stream), 0);
}

int mixq_w4a16_dequant(int is_bf16, const void* qw, const void* scales, const void* zeros, void* out, int N, int K,
                       int group, int nb0, int nbs, int ldo, void* stream) {
  dim3 grid((nbs + 7) / 8, K / 16);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int4* q = static_cast<const int4*>(qw);
  const uint8_t* z = static_cast<const uint8_t*>(zeros);
  if (is_bf16) {
    if (z)
      w4a16_dequant_kernel<__nv_bfloat16, true><<<grid, 256, 0, s>>>(q, static_cast<const __nv_bfloat16*>(scales), z,
                                                                    static_cast<__nv_bfloat16*>(out), N, K, group, nb0,
                                                                    nbs, ldo);
    else
      w4a16_dequant_kernel<__nv_bfloat16, false><<<grid, 256, 0, s>>>(q, static_cast<const __nv_bfloat16*>(scales), z,
                                                                     static_cast<__nv_bfloat16*>(out), N, K, group,
                                                                     nb0, nbs, ldo);
  } else {
    if (z)
      w4a16_dequant_kernel<__half, true><<<grid, 256, 0, s>>>(q, static_cast<const __half*>(scales), z,
                                                             static_cast<__half*>(out), N, K, group, nb0, nbs, ldo);
    else
      w4a16_dequant_kernel<__half, false><<<grid, 256, 0, s>>>(q, static_cast<const __half*>(scales), z,
                                                              static_cast<__half*>(out), N, K, group, nb0, nbs, ldo);
  }
  cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? 0 : -static_cast<int>(e);
}

// The few-row GEMV (M <= 16). query_occupancy: blocks per SM of the variant at (M, spc).
int mixq_w4a16_gemv(int is_bf16, int variant, const void* x, const void* qw, const void* scales, const void* zeros,
                    const void* bias, void* out, void* ws, void* counters, int M, int N, int K, int group, int kcs,
                    int spc, int query_occupancy, void* stream) {
  // (the fields in GemvParams order; dense: no row list, one row block, no expert strides)
  const GemvParams p{x, static_cast<const int4*>(qw), scales, static_cast<const uint8_t*>(zeros), bias, out,
                     static_cast<float*>(ws), static_cast<int*>(counters), M, N, K, group, kcs, spc,
                     nullptr, nullptr, nullptr, 0, 1, 1, 0, 0, 0};
  return gemv_dispatch(is_bf16, variant, p, static_cast<cudaStream_t>(stream), query_occupancy);
}

// The GEMV grouped over experts (MoE, 16-row blocks of one expert each; see GemvParams):
// out[pair] = a[pair / row_div] @ W_e^T for every pair of the sorted list.
int mixq_w4a16_moe_gemv(int is_bf16, int variant, const void* a, const void* qw, const void* scales,
                        const void* zeros, void* out, void* ws, void* counters, const int* rows,
                        const int* block_fid, const int* slots, int nfid, int row_div, int row_blocks, int N,
                        int K, int group, int kcs, int spc, long long w_estride, long long s_estride,
                        long long z_estride, void* stream) {
  const GemvParams p{a, static_cast<const int4*>(qw), scales, static_cast<const uint8_t*>(zeros), nullptr, out,
                     static_cast<float*>(ws), static_cast<int*>(counters), 16, N, K, group, kcs, spc,
                     rows, block_fid, slots, nfid, row_div, row_blocks, w_estride, s_estride, z_estride};
  return gemv_dispatch(is_bf16, variant, p, static_cast<cudaStream_t>(stream), 0);
}

}  // extern "C"
#endif  // MIXQ_PART == 0
