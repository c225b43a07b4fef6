// The batch-1 decode layers as one persistent CUDA kernel with asynchronous weight streaming: the design
// docs/PERF.md (fifth session) measured against the engine's PDL-chained Triton GEMVs, and rejected.
//
// 28 layers x the four projections of the Qwen3-0.6B shape (qkv after RMSNorm, o + residual, gate/up after
// RMSNorm, down after SiLU-and-mul + residual) in one launch of one block per SM. In each block a producer
// warp streams the block's weight chunks (16 KB) into a ring of shared-memory stages with bulk async copies
// (cp.async.bulk completing on mbarriers), running ahead across projections and layers; eight consumer warps
// take the dot products from shared memory. Activations travel between blocks as 32-bit words (bf16 value and
// a 16-bit tag naming launch, layer and projection). A block owns the same residual rows in o and down and
// keeps them in shared memory. Attention is a stand-in: o reads the q part of the qkv output.
//
// Variants (compile-time): STAGES ring depth; SYNC 1 one thread per block polls a per-projection arrival
// counter (release/acquire) before the loads, 0 every thread spins on its tagged words, 2 warp 0 alone spins
// on the whole vector; MODE 0 the real thing, 1 consumers only free the stages (the weight stream alone),
// 2 chunk math without prologues, epilogues or waits, 3 prologues read no global data (diagnostics).
typedef unsigned short bf16_t;
typedef unsigned int u32;
typedef unsigned long long u64;

#ifndef STAGES
#define STAGES 4
#endif
#ifndef SYNC
#define SYNC 1
#endif
#ifndef MODE
#define MODE 0
#endif
#define NW 8
#define NT (NW * 32)
#define STAGE_BYTES 16384
#define HID 1024
#define QO 2048
#define INTER 3072
#define MAXCH 8
#define EPS 1e-6f

__device__ __forceinline__ float bf2f(u32 b) { return __uint_as_float(b << 16); }
__device__ __forceinline__ u32 f2bf(float f) {
  u32 u = __float_as_uint(f);
  u += 0x7fffu + ((u >> 16) & 1u);
  return u >> 16;
}
__device__ __forceinline__ float rbf(float f) { return bf2f(f2bf(f)); }
__device__ __forceinline__ u32 saddr(const void* p) { return (u32)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(u32 bar, u32 bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u32 bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
__device__ __forceinline__ u32 mbar_try(u32 bar, u32 parity) {
  u32 ok;
  asm volatile(
      "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(ok) : "r"(bar), "r"(parity) : "memory");
  return ok;
}
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
  for (u32 i = 0; !mbar_try(bar, parity); ++i)
    if (i > (1u << 26)) __trap();  // a protocol bug fails the launch instead of hanging the GPU
}
__device__ __forceinline__ void bulk_copy(u32 dst, const void* src, u32 bytes, u32 bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               ::"r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}
__device__ __forceinline__ u32 ld_relaxed(const u32* p) {
  u32 v;
  asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void consumer_sync() { asm volatile("bar.sync 1, 256;" ::: "memory"); }
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ uint4 ld_relaxed4(const u32* p) {
  uint4 v;
  asm volatile("ld.relaxed.gpu.global.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ bool fresh(const uint4& w, u32 tag) {
  return (w.x >> 16) == tag && (w.y >> 16) == tag && (w.z >> 16) == tag && (w.w >> 16) == tag;
}

// N words per thread of a tagged vector. SYNC 2: warp 0 alone polls the whole vector (16 bytes a load),
// stages it in xs and releases the other warps with a block barrier. Otherwise every thread loads its words
// and spins on the stale ones.
template <int N>
__device__ __forceinline__ void ld_tagged(const u32* p, u32 tag, float* v, int check, float* xs) {
  if constexpr (SYNC == 2) {
    if (threadIdx.x < 32) {
      const int lane = threadIdx.x;
      constexpr int NV = N * NT / 128;  // 16-byte vectors per lane
#pragma unroll
      for (int k0 = 0; k0 < NV; k0 += 8) {
        uint4 w[8];
#pragma unroll
        for (int k = 0; k < 8 && k0 + k < NV; ++k) w[k] = ld_relaxed4(p + (lane + (k0 + k) * 32) * 4);
#pragma unroll
        for (int k = 0; k < 8 && k0 + k < NV; ++k) {
          const int q = lane + (k0 + k) * 32;
          for (u32 t = 0; check && !fresh(w[k], tag); ++t) {
            if (t > (1u << 26)) __trap();
            w[k] = ld_relaxed4(p + q * 4);
          }
          float4 f = make_float4(bf2f(w[k].x & 0xffffu), bf2f(w[k].y & 0xffffu), bf2f(w[k].z & 0xffffu),
                                 bf2f(w[k].w & 0xffffu));
          *(float4*)(xs + q * 4) = f;
        }
      }
    }
    consumer_sync();
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = xs[threadIdx.x + i * NT];
  } else {
    u32 w[N];
#pragma unroll
    for (int i = 0; i < N; ++i) w[i] = ld_relaxed(p + threadIdx.x + i * NT);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      for (u32 k = 0; check && (w[i] >> 16) != tag; ++k) {
        if (k > (1u << 26)) __trap();
        w[i] = ld_relaxed(p + threadIdx.x + i * NT);
      }
      v[i] = bf2f(w[i] & 0xffffu);
    }
  }
}

// Per projection (qkv, o, gate/up, down): chunks, and bytes a chunk (gate/up: 4 gate rows + their 4 up rows).
__device__ __constant__ int P_NCH[4] = {512, 256, 768, 512};
__device__ __constant__ int P_BYTES[4] = {16384, 16384, 16384, 12288};

// The j-th chunk of projection p that block b handles; down chunks follow the o chunks' rows so that one
// block owns the same residual rows in both.
__device__ __forceinline__ int chunk_of(int p, int b, int j, int G) {
  if (p == 3) return 2 * (b + (j >> 1) * G) + (j & 1);
  return b + j * G;
}
__device__ __forceinline__ int chunks(int p, int b, int G) {
  const int n = P_NCH[p == 3 ? 1 : p];
  return (b < n ? (n - b + G - 1) / G : 0) * (p == 3 ? 2 : 1);
}

struct Smem {
  float x[INTER];
  float part[MAXCH * NW];
  float red[NW];
  float res[MAXCH];  // this block's residual rows (o chunks x 4 rows)
  u64 full[STAGES];
  u64 empty[STAGES];
};

struct Args {
  const u64* ptrs;  // per layer: wqkv, wo, wgate_up, wdown, ln1, ln2
  const bf16_t* x_in;  // layer 0's input
  bf16_t* x_out;       // the last layer's output
  u32* hid;  // tagged residual stream after each layer
  u32* hmid;  // tagged, after attention's residual add
  u32* qkv;
  u32* act;
  u32* epoch;  // [0] launch number, [1] blocks finished
  u32* counters;  // [layers][4] arrivals, one 128-byte line each, counting up across launches
  int layers;
  int check;  // 0: do not wait for tags (diagnostic; results wrong)
};

template <int P, int K, int R>
__device__ __forceinline__ void gemv_phase(const Args& a, Smem& sm, char* ring, int l, u32 tag, u32& n) {
  constexpr int WPR = NW / R;  // warps per row
  constexpr int SEG = K / WPR;  // elements of a row per warp
  constexpr int NV = SEG / 256;  // 16-byte vectors per lane
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int row = warp / WPR, seg = warp % WPR;
  const int b = blockIdx.x, G = gridDim.x, nch = chunks(P, b, G);
  float xr[NV * 8];
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const float4* xs = (const float4*)(sm.x + seg * SEG + i * 256 + lane * 8);
    const float4 u = xs[0], v = xs[1];
    xr[i * 8 + 0] = u.x, xr[i * 8 + 1] = u.y, xr[i * 8 + 2] = u.z, xr[i * 8 + 3] = u.w;
    xr[i * 8 + 4] = v.x, xr[i * 8 + 5] = v.y, xr[i * 8 + 6] = v.z, xr[i * 8 + 7] = v.w;
  }
  for (int j = 0; j < nch; ++j, ++n) {
    const int s = n % STAGES;
    mbar_wait(saddr(&sm.full[s]), (n / STAGES) & 1);
    if (MODE == 1) {
      __syncwarp();
      if (lane == 0) mbar_arrive(saddr(&sm.empty[s]));
      continue;
    }
    const uint4* w = (const uint4*)(ring + s * STAGE_BYTES + (row * K + seg * SEG) * 2);
    float acc = 0.f;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const uint4 q = w[i * 32 + lane];
      const float* x = xr + i * 8;
      acc += bf2f(q.x & 0xffffu) * x[0] + bf2f(q.x >> 16) * x[1] + bf2f(q.y & 0xffffu) * x[2] +
             bf2f(q.y >> 16) * x[3] + bf2f(q.z & 0xffffu) * x[4] + bf2f(q.z >> 16) * x[5] +
             bf2f(q.w & 0xffffu) * x[6] + bf2f(q.w >> 16) * x[7];
    }
    acc = warp_sum(acc);
    if (lane == 0) {
      sm.part[j * NW + warp] = acc;
      mbar_arrive(saddr(&sm.empty[s]));
    }
  }
  if (MODE == 1 || MODE == 2) return;
  consumer_sync();
  constexpr int OUT = (P == 2) ? R / 2 : R;  // gate/up chunks: rows 0..3 gate, 4..7 up
  for (int t = tid; t < nch * OUT; t += NT) {
    const int jj = t / OUT, r = t % OUT, c = chunk_of(P, b, jj, G);
    float v = 0.f;
#pragma unroll
    for (int q = 0; q < WPR; ++q) v += sm.part[jj * NW + r * WPR + q];
    if (P == 0) {
      a.qkv[c * R + r] = tag << 16 | f2bf(v);
    } else if (P == 1) {  // residual rows 4c..4c+3 sit in res[4 jj + r]
      const int o = c * R + r;
      const float resid = l == 0 ? bf2f(a.x_in[o]) : sm.res[t];
      const float h = rbf(resid + rbf(v));
      sm.res[t] = h;
      a.hmid[o] = tag << 16 | f2bf(h);
    } else if (P == 2) {
      float u = 0.f;
#pragma unroll
      for (int q = 0; q < WPR; ++q) u += sm.part[jj * NW + (r + OUT) * WPR + q];
      const float g = rbf(v), up = rbf(u);
      a.act[c * OUT + r] = tag << 16 | f2bf(rbf(g / (1.f + __expf(-g))) * up);
    } else {  // down chunk 2c' + k covers rows 4c' + 2k .. +1: residual index 2 jj + r
      const int o = c * R + r;
      const float h = rbf(sm.res[t] + rbf(v));
      sm.res[t] = h;
      a.hid[o] = tag << 16 | f2bf(h);
      if (l == a.layers - 1) a.x_out[o] = (bf16_t)f2bf(h);
    }
  }
  if (SYNC == 1) {  // all of the block's outputs are stored: count it in, with release order
    consumer_sync();
    if (tid == 0)
      asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(a.counters + (l * 4 + P) * 32) : "memory");
  }
}
__device__ __forceinline__ void wait_for(const Args& a, int l, int p, u32 ep) {
  if (SYNC != 1 || !a.check) return;
  if (threadIdx.x == 0) {
    const u32* c = a.counters + (l * 4 + p) * 32;
    const u32 target = ep * gridDim.x;
    for (u32 i = 0;; ++i) {
      u32 v;
      asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(c) : "memory");
      if ((int)(v - target) >= 0) break;
      if (i > (1u << 28)) __trap();
    }
  }
  consumer_sync();
}

// RMSNorm of a hidden vector into sm.x (fp32), as the reference rounds it.
__device__ __forceinline__ void norm_into_x(float* v, const bf16_t* w, Smem& sm) {
  const int tid = threadIdx.x;
  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < HID / NT; ++i) ss += v[i] * v[i];
  ss = warp_sum(ss);
  if ((tid & 31) == 0) sm.red[tid >> 5] = ss;
  consumer_sync();
  float tot = 0.f;
#pragma unroll
  for (int i = 0; i < NW; ++i) tot += sm.red[i];
  const float inv = rsqrtf(tot / HID + EPS);
#pragma unroll
  for (int i = 0; i < HID / NT; ++i) sm.x[tid + i * NT] = rbf(v[i] * inv) * bf2f(w[tid + i * NT]);
}

extern "C" __global__ void __launch_bounds__(NT + 32, 1)
mk_layers(const u64* ptrs, const bf16_t* x_in, bf16_t* x_out, u32* hid, u32* hmid, u32* qkv, u32* act,
          u32* epoch, u32* counters, int layers, int check) {
  const Args a{ptrs, x_in, x_out, hid, hmid, qkv, act, epoch, counters, layers, check};
  extern __shared__ __align__(1024) char dyn[];
  char* ring = dyn;
  Smem& sm = *reinterpret_cast<Smem*>(dyn + STAGES * STAGE_BYTES);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int b = blockIdx.x, G = gridDim.x;
  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(saddr(&sm.full[s]), 1);
      mbar_init(saddr(&sm.empty[s]), NW);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (warp == NW) {  // producer
    if (lane != 0) return;
    u32 n = 0;
    for (int l = 0; l < layers; ++l)
      for (int p = 0; p < 4; ++p) {
        const char* w = (const char*)ptrs[l * 6 + p];
        const int bytes = P_BYTES[p], nch = chunks(p, b, G);
        for (int j = 0; j < nch; ++j, ++n) {
          const int c = chunk_of(p, b, j, G), s = n % STAGES;
          mbar_wait(saddr(&sm.empty[s]), ((n / STAGES) & 1) ^ 1);
          const u32 bar = saddr(&sm.full[s]), dst = saddr(ring + s * STAGE_BYTES);
          mbar_expect_tx(bar, bytes);
          if (p == 2) {  // 4 gate rows, then the same 4 features' up rows
            bulk_copy(dst, w + (size_t)c * 4 * HID * 2, bytes / 2, bar);
            bulk_copy(dst + bytes / 2, w + ((size_t)INTER + c * 4) * HID * 2, bytes / 2, bar);
          } else {
            bulk_copy(dst, w + (size_t)c * bytes, bytes, bar);
          }
        }
      }
    return;
  }

  const u32 ep = ld_relaxed(epoch);
  u32 n = 0;
  for (int l = 0; l < layers; ++l) {
    const u64* lp = a.ptrs + l * 6;
    const u32 t0 = ((ep * layers + l) * 4) & 0xffffu;  // tags of this layer's four outputs: t0 .. t0 + 3
    const u32 tprev = ((ep * layers + l) * 4 - 1) & 0xffffu;  // the previous layer's down output
    constexpr bool PRO = MODE == 0 || MODE == 3;  // MODE 1 and 2 leave the prologues out
    float v[INTER / NT];
#pragma unroll
    for (int i = 0; i < INTER / NT; ++i) v[i] = 0.01f * i;  // what MODE 3 computes on
    if (PRO) {
      if (l == 0) {
#pragma unroll
        for (int i = 0; i < HID / NT; ++i) v[i] = bf2f(x_in[tid + i * NT]);
      } else {
        wait_for(a, l - 1, 3, ep);
        if (MODE != 3) ld_tagged<HID / NT>(hid, tprev, v, check, sm.x);
      }
      norm_into_x(v, (const bf16_t*)lp[4], sm);
      consumer_sync();
    }
    gemv_phase<0, HID, 8>(a, sm, ring, l, t0, n);

    if (PRO) {
      wait_for(a, l, 0, ep);
      if (MODE != 3) ld_tagged<QO / NT>(qkv, t0, v, check, sm.x);
#pragma unroll
      for (int i = 0; i < QO / NT; ++i) sm.x[tid + i * NT] = v[i];
      consumer_sync();
    }
    gemv_phase<1, QO, 4>(a, sm, ring, l, (t0 + 1) & 0xffffu, n);

    if (PRO) {
      wait_for(a, l, 1, ep);
      if (MODE != 3) ld_tagged<HID / NT>(hmid, (t0 + 1) & 0xffffu, v, check, sm.x);
      norm_into_x(v, (const bf16_t*)lp[5], sm);
      consumer_sync();
    }
    gemv_phase<2, HID, 8>(a, sm, ring, l, (t0 + 2) & 0xffffu, n);

    if (PRO) {
      wait_for(a, l, 2, ep);
      if (MODE != 3) ld_tagged<INTER / NT>(act, (t0 + 2) & 0xffffu, v, check, sm.x);
#pragma unroll
      for (int i = 0; i < INTER / NT; ++i) sm.x[tid + i * NT] = v[i];
      consumer_sync();
    }
    gemv_phase<3, INTER, 2>(a, sm, ring, l, (t0 + 3) & 0xffffu, n);
  }
  // The last block out advances the launch number: every block has read it by then.
  consumer_sync();
  if (tid == 0 && atomicAdd(epoch + 1, 1u) == (u32)G - 1) {
    epoch[1] = 0;
    epoch[0] = ep + 1;
  }
}
