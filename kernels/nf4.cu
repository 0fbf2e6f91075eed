// NF4 (bitsandbytes) kernels: dequantize, linear y = x W^T + b, and GPU quantize.
//
// Layout of an NF4 tensor (bitsandbytes, blocksize 64): the [rows, K] weight is flattened
// row-major; two 4-bit codes per byte, the first element in the HIGH nibble; one absmax per 64
// consecutive elements, either f32 or (nested / double-quantised) a uint8 code decoded as
//     absmax = nested_map[code] * nested_absmax[block / 256] + nested_offset
// in fp32, product first, then sum, never fused. A weight element is
//     W = cast(NF4[code] * absmax)    (fp32 product, one round-to-nearest-even cast).
// Every kernel here reproduces those roundings exactly where the result is stored (dequantize,
// and the weight tiles of the tensor-core linear); the decode linear scales in fp32 after the
// tensor-core product (see nf4_linear_decode).
//
// Entries (one per dtype, ONE by-value params struct each, mirrored in src/ops/nf4.rs):
//   nf4_dequant_{bf16,f16}                          Nf4DequantParams
//   nf4_dequant_segs_{bf16,f16}                     Nf4DequantSegsParams (1..3 tensors, one launch)
//   nf4_linear_str_{n1,n2,n4}[_plain]_{bf16,f16}    Nf4LinearParams   (M <= 8, 16, 32)
//   nf4_linear_wide[_plain]_{bf16,f16}              Nf4LinearParams   (M <= 64)
//   nf4_linear_decode_m8_{bf16,f16}                 Nf4LinearParams   (M <= 8)
//   nf4_linear_decode_m16_{bf16,f16}                Nf4LinearParams   (M <= 16)
//   nf4_linear_mma_{l4,l3,m4,m3,s4}_{bf16,f16}      Nf4LinearParams   (tile configs, see below)
//   nf4_linear_splitk_reduce_{bf16,f16}             Nf4LinearParams   (split-K finish)
//   nf4_quantize_blocks_{bf16,f16,f32}              Nf4QuantizeParams
//   nf4_quantize_mean                               Nf4QuantizeParams
//   nf4_quantize_nested                             Nf4QuantizeParams
// The linear's streams keep one 64-k block after the other (common.cuh, STR_INTERLEAVE_MAX_NT).
#define STR_INTERLEAVE_MAX_NT 0
#include "common.cuh"

// ---------------------------------------------------------------------------------------------
// Parameter structs. Pointers are u64 device addresses; strides are in ELEMENTS. Every field is
// naturally aligned and the sizes are asserted here and in Rust (src/ops/nf4.rs).
// ---------------------------------------------------------------------------------------------

// One NF4 tensor, or one segment of a multi-segment weight (vLLM's fused q/k/v: three
// separately quantised tensors whose output rows are concatenated).
struct Nf4Tensor {
    u64 packed;               // u8 [numel / 2], high nibble first
    u64 absmax;               // nested ? u8 [nb] : f32 [nb], nb = numel / 64 (per expert x E)
    u64 nested_absmax;        // f32 [E * nnb] (nested only), nnb = ceil(nb_per_expert / 256)
    u64 nested_map;           // f32 [256] signed dynamic map (nested only)
    u64 nested_offset;        // f32 [E] on the device, or 0 to use nested_offset_value
    float nested_offset_value;
    i32 nested;               // 1 = uint8 absmax codes + nested statistics, 0 = f32 absmax
    i32 rows;                 // linear only: rows of this segment ([rows, K])
    i32 pad_;
};
static_assert(sizeof(Nf4Tensor) == 56, "Nf4Tensor layout must match src/ops/nf4.rs");

struct Nf4DequantParams {
    Nf4Tensor w;
    u64 out;                  // bf16/f16 [n_experts * numel], 16-byte aligned
    i64 numel;                // elements per expert (a multiple of 64 when n_experts > 1)
    i32 n_experts;            // >= 1; expert e owns elements [e*numel, (e+1)*numel)
    i32 nnb;                  // nested blocks per expert: ceil(numel / 64 / 256) (nested only)
};
static_assert(sizeof(Nf4DequantParams) == 80, "Nf4DequantParams layout must match Rust");

#define NF4_MAX_SEGMENTS 3

// Up to NF4_MAX_SEGMENTS tensors dequantized by one launch (the dequantize + cuBLAS linear path
// of vLLM's fused q/k/v, whose k and v segments alone are launches too small to fill the GPU):
// block b of the 1-D grid serves segment s for first_block[s] <= b < first_block[s + 1].
struct Nf4DequantSegsParams {
    Nf4DequantParams seg[NF4_MAX_SEGMENTS];
    i32 first_block[NF4_MAX_SEGMENTS + 1];  // first_block[0] = 0, first_block[n_segments] = grid
    i32 n_segments;
    i32 pad_;
};
static_assert(sizeof(Nf4DequantSegsParams) == 3 * 80 + 24, "Nf4DequantSegsParams layout must match Rust");

struct Nf4LinearParams {
    Nf4Tensor seg[NF4_MAX_SEGMENTS];  // output columns [sum(rows of seg < s), +rows of seg s)
    u64 x;                    // [M, K] activations, row stride ldx; 16-byte aligned rows
    u64 y;                    // [M, N] output, row stride ldy
    u64 bias;                 // [N] (same dtype as x) or 0
    i64 ldx;                  // elements, multiple of 8
    i64 ldy;                  // elements
    i32 M;
    i32 N;                    // sum of seg[s].rows over the used segments
    i32 K;                    // multiple of 64 (a block never straddles rows)
    i32 n_segments;           // 1..3
    u64 ws;                   // split-K (mma path, splits > 1): f32 [splits][M][N] partials
    i32 splits;               // k-ranges per output tile (gridDim.z); 1 = no split
    i32 str_ks;               // streaming path: warps that split K per 16-row group (1, 2, 4, 8)
    i32 wide_cluster;         // wide path, sm_90: 1 = the launch is clusters of (1, splits, 1)
                              // and they sum their K splits on chip (no ws, no reduce launch)
    i32 reserved;             // 0 (keeps the struct a multiple of 8 bytes)
};
static_assert(sizeof(Nf4LinearParams) == 248, "Nf4LinearParams layout must match Rust");

struct Nf4QuantizeParams {
    u64 input;                // [n] bf16 / f16 / f32 (contiguous)
    u64 packed;               // out: u8 [ceil(n / 2)]
    u64 absmax;               // out (plain) or workspace (nested): f32 [nb]
    u64 codes;                // out (nested): u8 [nb]
    u64 nested_absmax;        // out (nested): f32 [ceil(nb / 256)]
    u64 nested_map;           // in (nested): f32 [256] signed dynamic map
    u64 offset;               // out (nested): f32 [1] = mean(absmax)
    i64 n;                    // elements
    i64 nb;                   // blocks: ceil(n / 64)
};
static_assert(sizeof(Nf4QuantizeParams) == 72, "Nf4QuantizeParams layout must match Rust");

// ---------------------------------------------------------------------------------------------
// Statistics.
// ---------------------------------------------------------------------------------------------

// One segment of a linear weight, with the fields a thread needs, selected without dynamic
// indexing into the params struct (that would copy it to local memory).
struct SegView {
    const u8* packed;
    const u8* absmax;
    const float* nested_absmax;
    const float* nested_map;
    float offset;
    int nested;
};

// Segment of output row `row` (the streaming paths' segments are multiples of 16 rows, so a
// row group never straddles two) and the row inside it.
__device__ __forceinline__ int seg_index(const Nf4LinearParams& p, int row, int& local) {
    int s = 0;
    local = row;
    if (p.n_segments > 1 && local >= p.seg[0].rows) {
        local -= p.seg[0].rows;
        s = 1;
        if (p.n_segments > 2 && local >= p.seg[1].rows) {
            local -= p.seg[1].rows;
            s = 2;
        }
    }
    return s;
}

// The fields of segment s (from seg_index).
__device__ __forceinline__ SegView seg_view_at(const Nf4LinearParams& p, int s) {
    SegView v;
#define GPTOSS_SEL(field) (s == 0 ? p.seg[0].field : (s == 1 ? p.seg[1].field : p.seg[2].field))
    v.packed = (const u8*)GPTOSS_SEL(packed);
    v.absmax = (const u8*)GPTOSS_SEL(absmax);
    v.nested_absmax = (const float*)GPTOSS_SEL(nested_absmax);
    v.nested_map = (const float*)GPTOSS_SEL(nested_map);
    v.nested = GPTOSS_SEL(nested);
    const u64 off_ptr = GPTOSS_SEL(nested_offset);
    const float off_val = GPTOSS_SEL(nested_offset_value);
#undef GPTOSS_SEL
    const bool off_on_device = v.nested && off_ptr;
    const float off_loaded = ld_nc_f32_if((const float*)off_ptr, off_on_device);
    v.offset = off_on_device ? off_loaded : off_val;
    return v;
}

// The segment holding output row `row`, and the row inside it.
__device__ __forceinline__ SegView seg_view(const Nf4LinearParams& p, int row, int& local) {
    return seg_view_at(p, seg_index(p, row, local));
}

// The two loads an absmax needs, issued early; finished by seg_absmax_finish once they landed.
struct AbsmaxRaw {
    u32 code;     // nested: u8 code; plain: f32 bits of the absmax
    float scale;  // nested: nested_absmax of the 256-block
};

__device__ __forceinline__ AbsmaxRaw seg_absmax_load(const SegView& v, i64 b) {
    AbsmaxRaw r;
    if (v.nested) {
        r.code = ld_nc_u8(v.absmax + b);
        r.scale = ld_nc_f32(v.nested_absmax + b / NF4_NESTED_BLOCK);
    } else {
        r.code = __float_as_uint(ld_nc_f32((const float*)v.absmax + b));
        r.scale = 0.0f;
    }
    return r;
}

__device__ __forceinline__ float seg_absmax_finish(const SegView& v, AbsmaxRaw r) {
    if (!v.nested) return __uint_as_float(r.code);
    return nf4_nested_absmax(ld_nc_f32(v.nested_map + r.code), r.scale, v.offset);
}

__device__ __forceinline__ float seg_absmax(const SegView& v, i64 b) {
    return seg_absmax_finish(v, seg_absmax_load(v, b));
}

// ---------------------------------------------------------------------------------------------
// Dequantize: lane l of a warp turns packed word `base + u * 32 + l` (8 codes, always inside one
// 64-block) into one 16-byte store, so each load instruction of the warp covers 128 contiguous
// bytes and each store 512. (One lane writing 64 contiguous bytes in four stores left every store
// instruction touching 32 half-written sectors.) Bandwidth-bound; the NF4 table sits in shared
// memory (16 words in 16 banks: any pattern of codes is conflict-free).
// ---------------------------------------------------------------------------------------------

// Packed words per lane per pass: four independent loads in flight before the first use.
#define DQ_WORDS_PER_LANE 4

// fp32 absmax of the 64-block holding element `g` (of all experts' elements).
__device__ __forceinline__ float dequant_block_absmax(const Nf4DequantParams& p, const float* map,
                                                      i64 g) {
    if (!p.w.nested) return ld_nc_f32((const float*)p.w.absmax + g / NF4_BLOCK);
    const int e = p.n_experts == 1 ? 0 : (int)(g / p.numel);
    const i64 b_local = (g - (i64)e * p.numel) / NF4_BLOCK;
    const u32 code = ld_nc_u8((const u8*)p.w.absmax + g / NF4_BLOCK);
    const float sc = ld_nc_f32((const float*)p.w.nested_absmax + (i64)e * p.nnb + b_local / NF4_NESTED_BLOCK);
    const bool off_on_device = p.w.nested_offset != 0;
    const float off_loaded = ld_nc_f32_if((const float*)p.w.nested_offset + e, off_on_device);
    const float off = off_on_device ? off_loaded : p.w.nested_offset_value;
    return nf4_nested_absmax(map[code], sc, off);
}

// Block `block` of `n_blocks` (grid-stride over the tensor) dequantizes its share of p.
template <int DTYPE>
__device__ __forceinline__ void nf4_dequant(const Nf4DequantParams& p, int block, int n_blocks) {
    __shared__ float lut[16];
    __shared__ float map[256];
    if (threadIdx.x < 16) lut[threadIdx.x] = kNf4Code[threadIdx.x];
    if (p.w.nested) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) map[i] = ld_nc_f32((const float*)p.w.nested_map + i);
    }
    __syncthreads();
    const i64 total = p.numel * (i64)p.n_experts;
    const i64 full_words = total / 8;  // words whose 8 codes all lie inside the tensor
    const u32* words = (const u32*)p.w.packed;
    u16* out = (u16*)p.out;
    const int lane = threadIdx.x & 31;
    const i64 warp = ((i64)block * blockDim.x + threadIdx.x) >> 5;
    const i64 n_warps = ((i64)n_blocks * blockDim.x) >> 5;
    const i64 per_warp = 32 * DQ_WORDS_PER_LANE;
    for (i64 base = warp * per_warp; base < full_words; base += n_warps * per_warp) {
        u32 raw[DQ_WORDS_PER_LANE];
#pragma unroll
        for (int u = 0; u < DQ_WORDS_PER_LANE; ++u) {
            const i64 w = base + u * 32 + lane;
            raw[u] = ld_stream_4_if(words + w, w < full_words);
        }
#pragma unroll
        for (int u = 0; u < DQ_WORDS_PER_LANE; ++u) {
            const i64 w = base + u * 32 + lane;
            if (w >= full_words) break;
            const float am = dequant_block_absmax(p, map, w * 8);
            u32 o[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const u32 byte = (raw[u] >> (8 * j)) & 0xFFu;
                // First element (high nibble) goes to the low half: it has the lower address.
                o[j] = pack_half2<DTYPE>(__fmul_rn(lut[byte >> 4], am), __fmul_rn(lut[byte & 15u], am));
            }
            st_global_16(out + w * 8, u32x4{o[0], o[1], o[2], o[3]});
        }
    }
    // The last (at most 7) elements of a tensor whose size is not a multiple of 8.
    if (block == 0 && threadIdx.x == 0) {
        const u8* packed = (const u8*)p.w.packed;
        for (i64 g = full_words * 8; g < total; ++g) {
            const u32 byte = packed[g / 2];
            const u32 code = (g & 1) ? (byte & 15u) : (byte >> 4);
            out[g] = f32_to_half<DTYPE>(__fmul_rn(lut[code], dequant_block_absmax(p, map, g)));
        }
    }
}

extern "C" __global__ void nf4_dequant_bf16(const Nf4DequantParams p) {
    nf4_dequant<DTYPE_BF16>(p, blockIdx.x, gridDim.x);
}
extern "C" __global__ void nf4_dequant_f16(const Nf4DequantParams p) {
    nf4_dequant<DTYPE_F16>(p, blockIdx.x, gridDim.x);
}

template <int DTYPE>
__device__ __forceinline__ void nf4_dequant_segs(const Nf4DequantSegsParams& p) {
    int s = 0;
    while (s + 1 < p.n_segments && (int)blockIdx.x >= p.first_block[s + 1]) ++s;  // block-uniform
    nf4_dequant<DTYPE>(p.seg[s], blockIdx.x - p.first_block[s], p.first_block[s + 1] - p.first_block[s]);
}
// Six blocks per SM, as nf4_dequant gets at its 40 registers: without the bound the segment
// lookup raised the count to 54 (four blocks), and the one-segment o projection dequantized
// 1.2 us slower than through nf4_dequant (H100, M = 64-256).
#define DQ_SEGS_MIN_BLOCKS 6
extern "C" __global__ __launch_bounds__(256, DQ_SEGS_MIN_BLOCKS) void nf4_dequant_segs_bf16(
    const Nf4DequantSegsParams p) {
    nf4_dequant_segs<DTYPE_BF16>(p);
}
extern "C" __global__ __launch_bounds__(256, DQ_SEGS_MIN_BLOCKS) void nf4_dequant_segs_f16(
    const Nf4DequantSegsParams p) {
    nf4_dequant_segs<DTYPE_F16>(p);
}

// ---------------------------------------------------------------------------------------------
// Linear, streaming path (M <= 32 in 1, 2 or 4 tiles of 8 tokens; every segment a multiple of 16
// rows, one absmax format): the streaming core of common.cuh with the weight rows as mma A and
// the tokens as mma columns.
// grid ceil(N / (16 * 8 / KS)), 8 warps = (8 / KS) row groups x KS parts of K; the parts meet in
// shared memory (fixed order), then part 0 adds the bias and writes y.
// ---------------------------------------------------------------------------------------------

// Blocks per SM of the linear's streaming kernels. Two token tiles (9..16 tokens) at 2 blocks
// per SM spilled a few registers on sm_90 before the streaming core kept its addresses in
// running pointers (session 10: 119 registers, no spills), and even then measured faster than
// 1 block per SM without spills (H100, M=16: 12.8 vs 14.2 us on 5760x2880,
// bench/results/vllm_e2e_h100_2026-11-26_sitting4). tests/test_kernels_compile.py bounds the
// spills.
// One token tile (M <= 8) fits 80 registers without spills since the streaming core keeps
// its addresses in running pointers (session 10), so three blocks per SM where shared memory
// allows, sm_90 (228 KB per SM; an A100's 164 KB hold two 70 KB blocks, so there the bound would
// only cost registers): a 5760-row projection at M = 1 then runs its 360 groups with a K split
// of 8 in one wave (396 resident blocks on an H100) instead of 180 blocks of K split 4, 48 of
// the H100's 132 SMs holding two of them. H100, session 11: 1.09x at M = 1-4 on 5760 and 5120
// rows (the fused q/k/v), 0.97-0.99x on 2880 and 4096 rows.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define STR_LINEAR_MIN_BLOCKS_N1 3
#else
#define STR_LINEAR_MIN_BLOCKS_N1 STR_MIN_BLOCKS_N1
#endif
#ifndef STR_LINEAR_MIN_BLOCKS_N2
#define STR_LINEAR_MIN_BLOCKS_N2 STR_MIN_BLOCKS_N2
#endif
// Four token tiles (17..32 tokens) hold 16 more activation and 8 more accumulator registers per
// tile than one: one block per SM, 166-177 registers, no spills (sm_86 and sm_90). Eight tiles
// (up to 64 tokens) spilled 40-76 bytes at 255 registers and measured slower than the
// tensor-core kernel at 48-64 tokens (H100, session 14), so M > 32 stays on that path.
#define STR_LINEAR_MIN_BLOCKS_N4 1

// The lane's streaming addresses of a linear's 16-row group starting at row `local` of segment
// view v (nf4_linear_str, nf4_linear_wide): fragment rows fr and fr + 8, bytes 16 (lane % 4) ..
// of each row's 64 bytes of a chunk.
template <bool NESTED>
__device__ __forceinline__ StrLane linear_str_lane(const SegView& v, int local, int nkb, int krow) {
    const int lane = threadIdx.x & 31, fr = lane >> 2;
    StrLane l;
#ifdef STR_CHUNK_MAJOR
    // Benchmark build (bench_nf4_linear.py --weights-order chunks): the segment's 16-row
    // groups chunk-major from its first row (segments start at multiples of 16 rows).
    l.src = v.packed + (long long)local * krow + 16 * lane;
#else
    l.src = v.packed + (long long)(local + fr) * krow + 16 * (lane & 3);
    l.piece2 = 8LL * krow;
#endif
    l.dst = str_row_off(fr, (lane >> 1) & 1) + 16 * (lane & 1);
    l.hi = (lane & 2) != 0;
    l.blk0 = (local + (lane >> 1)) * nkb + (lane & 1);
    l.amb = v.absmax + (long long)l.blk0 * (NESTED ? 1 : 4);
    l.nested = v.nested_absmax;
    return l;
}

// The code-pair table and the segments' nested code maps (every thread of the block; the caller
// publishes them with a barrier).
template <int DTYPE, bool NESTED>
__device__ __forceinline__ void linear_str_tables(const Nf4LinearParams& p, u8* table,
                                                  float* maps) {
    const int tid = threadIdx.x;
    str_table<DTYPE>(table, maps, NESTED ? p.seg[0].nested_map : 0);
    if (NESTED && p.n_segments > 1)
        maps[256 + tid] = ld_nc_f32((const float*)p.seg[1].nested_map + tid);
    if (NESTED && p.n_segments > 2)
        maps[512 + tid] = ld_nc_f32((const float*)p.seg[2].nested_map + tid);
}

// y = acc + bias for the warp's 16-row group at r0 (acc[nt][q]: row g, token 8 nt + 2c + q;
// acc[nt][2 + q]: row g + 8), tokens past M skipped.
template <int DTYPE, int NT>
__device__ __forceinline__ void linear_str_store(const Nf4LinearParams& p, int r0,
                                                 const float (&acc)[NT][4]) {
    const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const u16* bias = (const u16*)p.bias;
    const float b0 = bias ? half_to_f32<DTYPE>(bias[r0 + g]) : 0.0f;
    const float b1 = bias ? half_to_f32<DTYPE>(bias[r0 + g + 8]) : 0.0f;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int q = 0; q < 2; ++q) {
            const int m = nt * 8 + 2 * c + q;
            if (m >= p.M) continue;
            u16* y = (u16*)p.y + (long long)m * p.ldy;
            y[r0 + g] = f32_to_half<DTYPE>(acc[nt][q] + b0);
            y[r0 + g + 8] = f32_to_half<DTYPE>(acc[nt][2 + q] + b1);
        }
}

template <int DTYPE, int NT, bool NESTED>
__device__ __forceinline__ void nf4_linear_str(const Nf4LinearParams& p) {
    __shared__ float maps[NF4_MAX_SEGMENTS * 256];  // nested code maps of the segments
    extern __shared__ __align__(16) u8 str_smem[];  // STR_TABLE_BYTES: table + rings
    const int tid = threadIdx.x;
    // The K split is 1, 2, 4 or 8 (src/ops): shifts and masks instead of divisions.
    const int ks = p.str_ks, lks = __ffs(ks) - 1, groups = STR_WARPS >> lks;
    const int warp = tid >> 5, lane = tid & 31, g = lane >> 2;
    const int rg = warp >> lks, kp = warp & (ks - 1);
    const int r0 = (blockIdx.x * groups + rg) * 16;  // first output row of the warp's group
    const bool active = r0 < p.N;                    // warp-uniform
    const int nkb = p.K / 64, nchunks = (nkb + 1) / 2, krow = p.K / 2;
    const int per = nchunks >> lks, extra = nchunks & (ks - 1);
    const int jb = kp * per + min(kp, extra), n = per + (kp < extra ? 1 : 0);
    int local;
    const int s = seg_index(p, active ? r0 : 0, local);
    const SegView v = seg_view_at(p, s);
    const StrLane l = linear_str_lane<NESTED>(v, local, nkb, krow);
    u8* ring = str_smem + warp * (STR_DEPTH * STR_STAGE_STRIDE);
    pdl_trigger();  // the next kernel may build its tables while this one streams
    linear_str_tables<DTYPE, NESTED>(p, str_smem, maps);
    __syncthreads();

    const u16* src[NT];
    u32 cols = 0;  // bit nt: this lane's column (token) of tile nt exists
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        const int m = nt * 8 + g;
        cols |= (m < p.M ? 1u : 0u) << nt;
        src[nt] = (const u16*)p.x + (long long)min(m, p.M - 1) * p.ldx;
    }
    float acc[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
    StrStats st;
    if (active && n > 0) str_prime<NESTED>(l, jb, n, nkb, ring, st);
    pdl_wait();  // x comes from the previous kernel; the weights above do not
    if (active && n > 0)
        str_stream<DTYPE, NT, NESTED, STR_X_GLOBAL_NC>(l, jb, n, nkb, v.offset, str_smem, ring, st,
                                                       src, cols, maps + 256 * s, acc);
    str_reduce<NT>(str_smem, ks, acc);
    if (kp != 0 || !active) return;
    linear_str_store<DTYPE, NT>(p, r0, acc);
}

extern "C" __global__ void __launch_bounds__(STR_WARPS * 32, STR_LINEAR_MIN_BLOCKS_N1) nf4_linear_str_n1_bf16(const Nf4LinearParams p) {
    nf4_linear_str<DTYPE_BF16, 1, true>(p);
}
extern "C" __global__ void __launch_bounds__(STR_WARPS * 32, STR_LINEAR_MIN_BLOCKS_N1) nf4_linear_str_n1_f16(const Nf4LinearParams p) {
    nf4_linear_str<DTYPE_F16, 1, true>(p);
}
extern "C" __global__ void __launch_bounds__(STR_WARPS * 32, STR_LINEAR_MIN_BLOCKS_N1) nf4_linear_str_n1_plain_bf16(const Nf4LinearParams p) {
    nf4_linear_str<DTYPE_BF16, 1, false>(p);
}
extern "C" __global__ void __launch_bounds__(STR_WARPS * 32, STR_LINEAR_MIN_BLOCKS_N1) nf4_linear_str_n1_plain_f16(const Nf4LinearParams p) {
    nf4_linear_str<DTYPE_F16, 1, false>(p);
}
extern "C" __global__ void __launch_bounds__(STR_WARPS * 32, STR_LINEAR_MIN_BLOCKS_N2) nf4_linear_str_n2_bf16(const Nf4LinearParams p) {
    nf4_linear_str<DTYPE_BF16, 2, true>(p);
}
extern "C" __global__ void __launch_bounds__(STR_WARPS * 32, STR_LINEAR_MIN_BLOCKS_N2) nf4_linear_str_n2_f16(const Nf4LinearParams p) {
    nf4_linear_str<DTYPE_F16, 2, true>(p);
}
extern "C" __global__ void __launch_bounds__(STR_WARPS * 32, STR_LINEAR_MIN_BLOCKS_N2) nf4_linear_str_n2_plain_bf16(const Nf4LinearParams p) {
    nf4_linear_str<DTYPE_BF16, 2, false>(p);
}
extern "C" __global__ void __launch_bounds__(STR_WARPS * 32, STR_LINEAR_MIN_BLOCKS_N2) nf4_linear_str_n2_plain_f16(const Nf4LinearParams p) {
    nf4_linear_str<DTYPE_F16, 2, false>(p);
}
extern "C" __global__ void __launch_bounds__(STR_WARPS * 32, STR_LINEAR_MIN_BLOCKS_N4) nf4_linear_str_n4_bf16(const Nf4LinearParams p) {
    nf4_linear_str<DTYPE_BF16, 4, true>(p);
}
extern "C" __global__ void __launch_bounds__(STR_WARPS * 32, STR_LINEAR_MIN_BLOCKS_N4) nf4_linear_str_n4_f16(const Nf4LinearParams p) {
    nf4_linear_str<DTYPE_F16, 4, true>(p);
}
extern "C" __global__ void __launch_bounds__(STR_WARPS * 32, STR_LINEAR_MIN_BLOCKS_N4) nf4_linear_str_n4_plain_bf16(const Nf4LinearParams p) {
    nf4_linear_str<DTYPE_BF16, 4, false>(p);
}
extern "C" __global__ void __launch_bounds__(STR_WARPS * 32, STR_LINEAR_MIN_BLOCKS_N4) nf4_linear_str_n4_plain_f16(const Nf4LinearParams p) {
    nf4_linear_str<DTYPE_F16, 4, false>(p);
}

// ---------------------------------------------------------------------------------------------
// Linear, wide streaming path (STREAM_MAX_M < M <= 64: vLLM's batch-64 decode and its CUDA-graph
// sizes 40-64). The weights stream as in nf4_linear_str (per-warp cp.async rings in the table's
// holes, code-pair table, mma A decoded in registers), with eight 8-token column tiles. Every
// warp of a block needs the same activations for the same k, so the block stages each 128-k
// chunk of x once in shared memory (all 64 token rows, zero past M) instead of each warp reading
// its own from L1/L2: the four-tile kernel moved 8 KB of activations from L2 per KB of weights at
// M = 32, which is what held it at 3.7x the read floor.
//
// grid (ceil(N / 128), splits): 8 warps = 8 row groups of 16, all on the block's chunk range
// (an even share of K for split blockIdx.y), one block barrier per chunk. The staged chunk
// i + 1 travels through registers (loaded before chunk i's barrier, stored after its products)
// so that the weights' cp.async groups stay the only ones a thread waits on. splits > 1 write
// fp32 partials to p.ws [splits][M][N]; nf4_linear_splitk_reduce adds them in order with the
// bias (deterministic).
// ---------------------------------------------------------------------------------------------
#define WIDE_NT 8
// One staged chunk: 64 token rows x 128 k of bf16/f16, 256 bytes per row; the 16-byte piece q
// of row r lies at piece q ^ (r & 7), so the two 16-byte reads per tile of a quarter warp (rows
// g, g + 1 of 8, pieces 2c and 2c + 1) hit 8 distinct bank groups.
#define WIDE_X_BYTES (64 * 256)
#define WIDE_SMEM_BYTES (STR_TABLE_BYTES + 2 * WIDE_X_BYTES)
// Blocks per SM: two of these ~99 KB blocks fit an H100 SM (128 registers each), one fits the
// 100 KB SMs of sm_86/sm_89 and the 164 KB of an A100.
#ifndef WIDE_MIN_BLOCKS  // -D override for experiments (bench/gpu_kernels.sh nf4grid variants)
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define WIDE_MIN_BLOCKS 2
#else
#define WIDE_MIN_BLOCKS 1
#endif
#endif

// acc[nt] += W(chunk, block h) x X(chunk, block h, tile nt): str_half with the activations read
// from the staged chunk (`xs`: this lane's row g of tile 0; `xo0`, `xo1`: its two pieces of
// block h) one tile at a time, so the eight tiles need no more registers than two.
template <int DTYPE>
__device__ __forceinline__ void wide_half(const u8* table, const u8* rd, float sc0, float sc1,
                                          const u8* xs, int xo0, int xo1,
                                          float (&acc)[WIDE_NT][4]) {
    const u32 lane4 = 4 * (threadIdx.x & 31);
    const u32x2 wa = *(const u32x2*)rd;
    const u32x2 wb = *(const u32x2*)(rd + STR_PIECE2_DST);
    u32 a[4][4];
#pragma unroll
    for (int st = 0; st < 4; ++st) str_decode_step(table, wa, wb, st, lane4, a[st]);
#pragma unroll
    for (int nt = 0; nt < WIDE_NT; ++nt) {
        // Tile nt: token rows 8 nt .. 8 nt + 7, 2 KB on from tile 0.
        const u32x4 v0 = *(const u32x4*)(xs + nt * 2048 + xo0);
        const u32x4 v1 = *(const u32x4*)(xs + nt * 2048 + xo1);
        const u32 xw[8] = {v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w};
        float d[4];
#pragma unroll
        for (int st = 0; st < 4; ++st) {
            const u32 bb[2] = {xw[2 * st], xw[2 * st + 1]};
            if (st == 0) mma_zero<DTYPE>(d, a[st], bb); else mma_acc<DTYPE>(d, a[st], bb);
        }
        // d: (row g, col 2c), (row g, 2c + 1), (row g + 8, 2c), (row g + 8, 2c + 1).
        acc[nt][0] = fmaf(sc0, d[0], acc[nt][0]);
        acc[nt][1] = fmaf(sc0, d[1], acc[nt][1]);
        acc[nt][2] = fmaf(sc1, d[2], acc[nt][2]);
        acc[nt][3] = fmaf(sc1, d[3], acc[nt][3]);
    }
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
// K split summed inside a thread-block cluster (sm_90). The host launches clusters of
// (1, splits, 1), so the splits of one 128-row tile are one cluster and block rank z is split
// blockIdx.y. Each block parks its fp32 partial in its own shared memory (the table's space,
// free once the loop is done) as [token][WIDE_PART_STRIDE]; after a cluster barrier, block z
// sums a 1/splits share of the tile's outputs over the cluster's blocks in rank order, adds the
// bias and stores y. Those are the adds of nf4_linear_splitk_reduce in the same order from the
// same 0.0f, so the output is bit-identical to the split launch + reduce launch, without the
// [splits][M][N] round trip through L2 and without the second launch (H200, M = 64: 3.1 us of
// reduce per q/k/v call, session 23). A second barrier keeps each block's shared memory alive
// until the others have read it.
// 128 rows + 4: the stores of a warp (rows g, tokens 2c + q) hit 32 distinct banks, and a row of
// 4 outputs stays 16-byte aligned.
#define WIDE_PART_STRIDE 132
// The largest portable cluster (the host never splits a clustered launch more ways).
#define WIDE_CLUSTER_MAX_SPLITS 8
template <int DTYPE>
__device__ __forceinline__ void wide_cluster_reduce(const Nf4LinearParams& p, u8* smem,
                                                    int tile_r0, bool active,
                                                    const float (&acc)[WIDE_NT][4]) {
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, c = lane & 3;
    float* part = (float*)smem;
    __syncthreads();  // every warp is done reading the table, its ring and the staged chunks
    if (active) {
#pragma unroll
        for (int nt = 0; nt < WIDE_NT; ++nt)
#pragma unroll
            for (int q = 0; q < 2; ++q) {
                const int m = nt * 8 + 2 * c + q;  // acc[nt][q]: row g, token 2c + q of tile nt
                if (m >= p.M) continue;
                float* at = part + m * WIDE_PART_STRIDE + 16 * warp + g;
                at[0] = acc[nt][q];
                at[8] = acc[nt][2 + q];
            }
    }
    cluster_sync_all();
    // This block's share of the tile's M x rows outputs, four rows (one float4) at a time;
    // N is a multiple of 16 (stream_eligible), so a float4 is all in range or all out.
    const int splits = gridDim.y, z = blockIdx.y;
    const int vecs = min(STR_WARPS * 16, p.N - tile_r0) / 4, total = p.M * vecs;
    const int lo = z * total / splits, hi = (z + 1) * total / splits;
    const u32 base = smem_addr(part);
    const u16* bias = (const u16*)p.bias;
    for (int i = lo + tid; i < hi; i += blockDim.x) {
        const int m = i / vecs, r = 4 * (i - m * vecs);
        const u32 at = base + 4u * (u32)(m * WIDE_PART_STRIDE + r);
        float4 pz[WIDE_CLUSTER_MAX_SPLITS];  // every load issued before the first add
#pragma unroll
        for (int zz = 0; zz < WIDE_CLUSTER_MAX_SPLITS; ++zz)
            if (zz < splits) pz[zz] = ld_cluster_f32x4(cluster_map(at, (u32)zz));
        float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
        for (int zz = 0; zz < WIDE_CLUSTER_MAX_SPLITS; ++zz) {
            if (zz < splits) {
                v[0] += pz[zz].x;
                v[1] += pz[zz].y;
                v[2] += pz[zz].z;
                v[3] += pz[zz].w;
            }
        }
        const int n = tile_r0 + r;
        u16* y = (u16*)p.y + (i64)m * p.ldy + n;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const float b = bias ? half_to_f32<DTYPE>(ld_nc_u16(bias + n + q)) : 0.0f;
            y[q] = f32_to_half<DTYPE>(bias ? v[q] + b : v[q]);
        }
    }
    cluster_sync_all();
}
#endif

template <int DTYPE, bool NESTED>
__device__ __forceinline__ void nf4_linear_wide(const Nf4LinearParams& p) {
    __shared__ float maps[NF4_MAX_SEGMENTS * 256];  // nested code maps of the segments
    extern __shared__ __align__(16) u8 str_smem[];  // table + rings, then 2 staged x chunks
    const int tid = threadIdx.x;
    const int warp = tid >> 5, lane = tid & 31, g = lane >> 2, c = lane & 3;
    const int r0 = (blockIdx.x * STR_WARPS + warp) * 16;  // first output row of the warp's group
    const bool active = r0 < p.N;                         // warp-uniform
    const int nkb = p.K / 64, nchunks = (nkb + 1) / 2, krow = p.K / 2, full_chunks = nkb >> 1;
    // The block's chunks [jb, jb + n): an even share for split blockIdx.y (block-uniform).
    const int jb = (int)((long long)blockIdx.y * nchunks / gridDim.y);
    const int n = (int)((long long)(blockIdx.y + 1) * nchunks / gridDim.y) - jb;
    int local;
    const int s = seg_index(p, active ? r0 : 0, local);
    const SegView v = seg_view_at(p, s);
    const StrLane l = linear_str_lane<NESTED>(v, local, nkb, krow);
    u8* ring = str_smem + warp * (STR_DEPTH * STR_STAGE_STRIDE);
    u8* xst = str_smem + STR_TABLE_BYTES;

    // Staging: thread tid copies pieces tid + 256 i (i < 4) of a chunk: token row tid / 16 +
    // 16 i, 16-byte piece tid % 16 (k 8 (tid % 16) ..); rows past M and k past K read zeros.
    const int xr = tid >> 4, xc = tid & 15;
    const u16* xsrc = (const u16*)p.x + (long long)xr * p.ldx + 8 * xc;
    const int xdst = xr * 256 + ((xc ^ (xr & 7)) << 4);  // + 16 i rows keep the swizzle
    u32x4 xreg[4];
    auto x_load = [&](int j) {
        const bool kok = 128 * j + 8 * xc < p.K;
#pragma unroll
        for (int i = 0; i < 4; ++i)
            xreg[i] = ld_nc_16_if(xsrc + (long long)16 * i * p.ldx + 128 * j,
                                  kok && xr + 16 * i < p.M);
    };
    auto x_store = [&](int stage) {
#pragma unroll
        for (int i = 0; i < 4; ++i)
            *(u32x4*)(xst + stage * WIDE_X_BYTES + xdst + i * 16 * 256) = xreg[i];
    };

    StrStats st;
    pdl_trigger();  // the next kernel (the split-K reduce) may launch while this one runs
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    // Launched with PDL (ops::PDL_ENV): the weights and the table do not depend on the previous
    // kernel, x does, so x comes after the wait.
    if (active && n > 0) str_prime<NESTED>(l, jb, n, nkb, ring, st);  // weights in flight first
    linear_str_tables<DTYPE, NESTED>(p, str_smem, maps);
    pdl_wait();
    if (n > 0) x_load(jb);
#else
    if (n > 0) x_load(jb);
    if (active && n > 0) str_prime<NESTED>(l, jb, n, nkb, ring, st);  // weights in flight first
    linear_str_tables<DTYPE, NESTED>(p, str_smem, maps);
#endif
    if (n > 0) x_store(0);
    // (the first chunk's barrier below publishes the table, the maps and stage 0)

    float acc[WIDE_NT][4];
#pragma unroll
    for (int nt = 0; nt < WIDE_NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
    const float inv_gamma = 1.0f / dec_gamma<DTYPE>();
    const u32 dst = smem_addr(ring) + l.dst, half_back = str_half_back();
    const u32 nmap_s = smem_addr(maps + 256 * s);
    const int sl00 = 2 * g, sl01 = 16 + 2 * g, sl10 = 2 * g + 1, sl11 = 17 + 2 * g;
    const u8* rd0 = ring + str_row_off(g, 0) + 8 * (lane & 3);
    const u8* rd1 = ring + str_row_off(g, 1) + 8 * (lane & 3);
    // This lane's activations in a stage: row g of tile 0; block h's pieces 8h + 2c, 8h + 2c + 1.
    const u8* xs_lane = xst + g * 256;
    const int xo00 = ((2 * c) ^ g) << 4, xo01 = ((2 * c + 1) ^ g) << 4;
    const int xo10 = ((8 + 2 * c) ^ g) << 4, xo11 = ((9 + 2 * c) ^ g) << 4;
    float am_off = v.offset;
    for (int i0 = 0; i0 < n; i0 += STR_DEPTH) {
#pragma unroll
        for (int u = 0; u < STR_DEPTH; ++u) {
            const int i = i0 + u;
            if (i >= n) break;  // block-uniform
            const int nu = (u + STR_DEPTH - 1) % STR_DEPTH;  // the stage chunk i - 1 used
            if (active) {
                __syncwarp();  // every lane is done reading stage nu
                if (i + STR_DEPTH - 1 < n)
                    str_issue<NESTED>(l, st.cur, full_chunks, dst + nu * STR_STAGE_STRIDE,
                                      half_back, st.raw[nu]);
                cp_async_commit();
            }
            if (i + 1 < n) x_load(jb + i + 1);
            if (active) cp_async_wait<STR_DEPTH - 1>();  // this lane's copies of chunk i landed
            __syncthreads();  // ... every lane's; and stage i & 1 of x (stored last iteration)
            if (active) {
                const float am = (NESTED ? nf4_nested_absmax(ld_shared_f32(nmap_s + 4 * st.raw[u]),
                                                             str_nested_scale(st, jb + i),
                                                             am_off)
                                         : __uint_as_float(st.raw[u])) * inv_gamma;
                const float s00 = __shfl_sync(0xffffffffu, am, sl00);
                const float s01 = __shfl_sync(0xffffffffu, am, sl01);
                const float s10 = __shfl_sync(0xffffffffu, am, sl10);
                const float s11 = __shfl_sync(0xffffffffu, am, sl11);
                const u8* xs = xs_lane + (i & 1) * WIDE_X_BYTES;
                wide_half<DTYPE>(str_smem, rd0 + u * STR_STAGE_STRIDE, s00, s01, xs, xo00, xo01,
                                 acc);
                if (jb + i < full_chunks)  // block-uniform: a final half chunk has block 0 only
                    wide_half<DTYPE>(str_smem, rd1 + u * STR_STAGE_STRIDE, s10, s11, xs, xo10,
                                     xo11, acc);
            }
            // Stage (i + 1) & 1 was last read in iteration i - 1, which every warp finished
            // before this iteration's barrier.
            if (i + 1 < n) x_store((i + 1) & 1);
        }
    }
    if (active) cp_async_wait<0>();
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (p.wide_cluster) {  // grid-uniform; every thread of the block takes part
        wide_cluster_reduce<DTYPE>(p, str_smem, blockIdx.x * STR_WARPS * 16, active, acc);
        return;
    }
#endif
    if (!active) return;
    if (gridDim.y > 1) {
        // K split: fp32 partials without bias; nf4_linear_splitk_reduce sums them in order.
        float* ws = (float*)p.ws + (long long)blockIdx.y * p.M * p.N;
#pragma unroll
        for (int nt = 0; nt < WIDE_NT; ++nt)
#pragma unroll
            for (int q = 0; q < 2; ++q) {
                const int m = nt * 8 + 2 * c + q;  // acc[nt][q]: row g, column 2c + q
                if (m >= p.M) continue;
                float* w = ws + (long long)m * p.N + r0 + g;
                w[0] = acc[nt][q];
                w[8] = acc[nt][2 + q];
            }
        return;
    }
    linear_str_store<DTYPE, WIDE_NT>(p, r0, acc);
}

extern "C" __global__ void __launch_bounds__(STR_WARPS * 32, WIDE_MIN_BLOCKS) nf4_linear_wide_bf16(const Nf4LinearParams p) {
    nf4_linear_wide<DTYPE_BF16, true>(p);
}
extern "C" __global__ void __launch_bounds__(STR_WARPS * 32, WIDE_MIN_BLOCKS) nf4_linear_wide_f16(const Nf4LinearParams p) {
    nf4_linear_wide<DTYPE_F16, true>(p);
}
extern "C" __global__ void __launch_bounds__(STR_WARPS * 32, WIDE_MIN_BLOCKS) nf4_linear_wide_plain_bf16(const Nf4LinearParams p) {
    nf4_linear_wide<DTYPE_BF16, false>(p);
}
extern "C" __global__ void __launch_bounds__(STR_WARPS * 32, WIDE_MIN_BLOCKS) nf4_linear_wide_plain_f16(const Nf4LinearParams p) {
    nf4_linear_wide<DTYPE_F16, false>(p);
}

// ---------------------------------------------------------------------------------------------
// Linear, decode path (M <= 16): stream the 4-bit weights once, tensor cores do the products.
//
// A block owns NT tiles of 8 weight rows (the n8 of mma.m16n8k16) and its 8 warps split K.
// Per "pair" of 64-blocks (128 k) a lane (g = lane/4, t = lane%4) loads 16 bytes of row g with
// one LDG.128: lanes t=0,1 get block 2j, t=2,3 block 2j+1. One shuffle with lane^2 swaps halves
// so that every lane holds 8 bytes of EACH block (byte offset o(t) = 16(t&1) + 8(t>>1)); then
// each mma.k16 step only mixes k of one block, and the block's absmax can scale its fp32 result.
//
// The k order inside an mma is free as long as A and B agree: lane t's B slots (k = 2t, 2t+1,
// 2t+8, 2t+9) hold its own 4 consecutive weights 4s..4s+3 of step s, so its A slots read the
// same 4 consecutive activations: one 8-byte piece per row, taken from two 16-byte loads.
//
// B values are the UNSCALED NF4 codes as bf16/f16 pairs from a 256-entry byte -> pair table
// (one shared load per 2 weights), replicated 32 times so that lane l always reads bank l:
// conflict-free whatever the codes. The fp32 result of a block is scaled by the absmax of its
// row (computed by one lane per row and block, fetched with two shuffles) and accumulated in
// fp32. Rounding therefore differs from dequantize-then-matmul only by the bf16/f16 rounding of
// the 16 NF4 constants (relative 2^-9 / 2^-12), well inside the tests' 1e-2.
// ---------------------------------------------------------------------------------------------

#define DECODE_WARPS 8
#define DECODE_LUT_WORDS (256 * 32)

// The weight state one lane needs for one tile: its row's segment and the raw loads of one
// round (U pairs x 16 bytes + the absmax raw loads).
template <int U>
struct DecodeLoads {
    u32x4 raw[U];
    AbsmaxRaw amr[U];
};

// Persistent blocks: a block fills its tables once, then walks tiles blockIdx.x,
// blockIdx.x + gridDim.x, ...; while it computes one tile, the weight loads of its next tile
// are already in flight, so DRAM never waits for the per-tile reduction. Inside a tile the 8
// warps split K (warp w takes pairs w, w + 8, ...; U pairs per round) and the activation
// fragments are double-buffered one pair ahead; the nested maps live in shared memory.
template <int DTYPE, bool M16, int U>
__device__ __forceinline__ void nf4_linear_decode(const Nf4LinearParams& p) {
    extern __shared__ __align__(16) u32 dsmem[];
    u32* lut = dsmem;                                             // [256 bytes][32 lanes]
    float* red = (float*)(dsmem + DECODE_LUT_WORDS);              // [2][warps][4][32]
    float* maps = red + 2 * DECODE_WARPS * 4 * 32;                // [3][256] nested maps
    const int tid = threadIdx.x;
    {
        // 8 x STS.128 per thread at consecutive 16-byte slots (conflict-free); slot q holds
        // 4 copies of entry q / 8.
#pragma unroll
        for (int c = 0; c < 8; ++c) {
            const int q = tid + 256 * c;
            const int e = q >> 3;
            const u32 pair = pack_half2<DTYPE>(kNf4Code[e >> 4], kNf4Code[e & 15]);
            ((u32x4*)lut)[q] = u32x4{pair, pair, pair, pair};
        }
        if (p.seg[0].nested) maps[tid] = ld_nc_f32((const float*)p.seg[0].nested_map + tid);
        if (p.n_segments > 1 && p.seg[1].nested)
            maps[256 + tid] = ld_nc_f32((const float*)p.seg[1].nested_map + tid);
        if (p.n_segments > 2 && p.seg[2].nested)
            maps[512 + tid] = ld_nc_f32((const float*)p.seg[2].nested_map + tid);
    }
    __syncthreads();

    const int warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int nkb = p.K >> 6;
    const int npairs = (nkb + 1) >> 1;
    const i64 row_bytes = p.K >> 1;
    const int ntiles = (p.N + 7) >> 3;
    // Activation rows of this lane's A fragments: g and (M16) g + 8.
    const u16* xg = (const u16*)p.x + (i64)g * p.ldx + (t & 1) * 32 + (t >> 1) * 16;
    const u16* xg8 = xg + 8 * p.ldx;
    const bool xok = g < p.M;
    const bool xok8 = M16 && (g + 8 < p.M);
    const u32* lut_lane = lut + lane;

    // x fragments of one pair: [block h][8 words] for rows g and g + 8.
    auto load_x = [&](int pr, u32 (&xa)[2][8], u32 (&xb)[2][8]) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int kb = 2 * pr + h;
            const bool okb = kb < nkb;
            u32x4 v0 = {0, 0, 0, 0}, v1 = {0, 0, 0, 0};
            if (xok && okb) {
                v0 = ld_global_nc_16(xg + kb * 64);
                v1 = ld_global_nc_16(xg + kb * 64 + 8);
            }
            xa[h][0] = v0.x; xa[h][1] = v0.y; xa[h][2] = v0.z; xa[h][3] = v0.w;
            xa[h][4] = v1.x; xa[h][5] = v1.y; xa[h][6] = v1.z; xa[h][7] = v1.w;
            if (M16) {
                u32x4 w0 = {0, 0, 0, 0}, w1 = {0, 0, 0, 0};
                if (xok8 && okb) {
                    w0 = ld_global_nc_16(xg8 + kb * 64);
                    w1 = ld_global_nc_16(xg8 + kb * 64 + 8);
                }
                xb[h][0] = w0.x; xb[h][1] = w0.y; xb[h][2] = w0.z; xb[h][3] = w0.w;
                xb[h][4] = w1.x; xb[h][5] = w1.y; xb[h][6] = w1.z; xb[h][7] = w1.w;
            } else {
#pragma unroll
                for (int i = 0; i < 8; ++i) xb[h][i] = 0;
            }
        }
    };
    // Issues the weight and absmax loads of round `pb` (pairs pb + u * 8) of tile `tile`.
    auto issue = [&](int tile, int pb, DecodeLoads<U>& L) {
        const int row = tile * 8 + g;
        const bool rok = row < p.N;
        int local;
        const SegView sv = seg_view(p, rok ? row : 0, local);
        const u8* wrow = sv.packed + (i64)local * row_bytes + t * 16;
        const i64 blk0 = (i64)local * nkb;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int pr = pb + u * DECODE_WARPS;
            const bool okw = rok && pr < npairs && (2 * pr + (t >> 1)) < nkb;
            L.raw[u] = okw ? ld_global_stream_16(wrow + (i64)pr * 64) : u32x4{0, 0, 0, 0};
            const int kba = 2 * pr + (t & 1);
            if (rok && pr < npairs && kba < nkb) {
                L.amr[u] = seg_absmax_load(sv, blk0 + kba);
            } else {
                L.amr[u].code = 0;
                L.amr[u].scale = 0.0f;
            }
        }
    };

    int tile = blockIdx.x;
    DecodeLoads<U> cur;
    if (tile < ntiles) issue(tile, warp, cur);
    int buf = 0;
    for (; tile < ntiles; tile += gridDim.x) {
        const int row = tile * 8 + g;
        const bool rok = row < p.N;
        int local, seg = 0;
        const SegView sv = seg_view(p, rok ? row : 0, local);
        if (p.n_segments > 1 && (rok ? row : 0) >= p.seg[0].rows) seg = 1;
        if (p.n_segments > 2 && (rok ? row : 0) >= p.seg[0].rows + p.seg[1].rows) seg = 2;
        const float* smap = maps + seg * 256;

        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        DecodeLoads<U> nxt;
        for (int pb = warp; pb < npairs; pb += DECODE_WARPS * U) {
            const bool last_round = pb + DECODE_WARPS * U >= npairs;
            // Next round of this tile, or the first round of the block's next tile.
            if (!last_round) {
                issue(tile, pb + DECODE_WARPS * U, nxt);
            } else if (tile + (int)gridDim.x < ntiles) {
                issue(tile + gridDim.x, warp, nxt);
            }
            u32 xa[2][8], xb[2][8];
            load_x(pb, xa, xb);
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int pr = pb + u * DECODE_WARPS;
                if (pr >= npairs) break;  // warp-uniform
                u32 na[2][8], nb[2][8];
                const bool more = (u + 1 < U) && (pr + DECODE_WARPS < npairs);
                if (more) load_x(pr + DECODE_WARPS, na, nb);
                u32 blk[2][2];
                {
                    const u32x4 r = cur.raw[u];
                    const bool lo = t < 2;
                    const u32 s0 = lo ? r.z : r.x, s1 = lo ? r.w : r.y;
                    const u32 q0 = __shfl_xor_sync(0xffffffffu, s0, 2);
                    const u32 q1 = __shfl_xor_sync(0xffffffffu, s1, 2);
                    blk[0][0] = lo ? r.x : q0;
                    blk[0][1] = lo ? r.y : q1;
                    blk[1][0] = lo ? q0 : r.z;
                    blk[1][1] = lo ? q1 : r.w;
                }
                float am = 0.0f;
                if (rok && (2 * pr + (t & 1)) < nkb) {
                    am = sv.nested
                             ? nf4_nested_absmax(smap[cur.amr[u].code], cur.amr[u].scale, sv.offset)
                             : __uint_as_float(cur.amr[u].code);
                }
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int kb = 2 * pr + h;
                    if (kb >= nkb) break;  // warp-uniform (odd number of blocks)
                    float d[4];
#pragma unroll
                    for (int s = 0; s < 4; ++s) {
                        const u32 word = blk[h][s >> 1];
                        const int sh = (s & 1) * 16;
                        u32 b[2];
                        b[0] = lut_lane[((word >> sh) & 0xFFu) * 32];
                        b[1] = lut_lane[((word >> (sh + 8)) & 0xFFu) * 32];
                        const u32 a[4] = {xa[h][2 * s], xb[h][2 * s], xa[h][2 * s + 1],
                                          xb[h][2 * s + 1]};
                        if (s == 0) {
                            mma_m16n8k16_zc<DTYPE>(d, a, b);
                        } else {
                            mma_m16n8k16<DTYPE>(d, a, b);
                        }
                    }
                    // d[0], d[2] belong to row n = 2t of the tile, d[1], d[3] to 2t + 1; the
                    // absmax of (row, block h) lives in lane row * 4 + h.
                    const float sc0 = __shfl_sync(0xffffffffu, am, (2 * t) * 4 + h);
                    const float sc1 = __shfl_sync(0xffffffffu, am, (2 * t + 1) * 4 + h);
                    acc[0] = fmaf(sc0, d[0], acc[0]);
                    acc[1] = fmaf(sc1, d[1], acc[1]);
                    if (M16) {
                        acc[2] = fmaf(sc0, d[2], acc[2]);
                        acc[3] = fmaf(sc1, d[3], acc[3]);
                    }
                }
                if (more) {
#pragma unroll
                    for (int h = 0; h < 2; ++h)
#pragma unroll
                        for (int i = 0; i < 8; ++i) {
                            xa[h][i] = na[h][i];
                            xb[h][i] = nb[h][i];
                        }
                }
            }
            cur = nxt;
        }

        // Sum the 8 warps' partial products (fixed order), add the bias, store. The buffer
        // alternates so the next tile's partials never overwrite ones still being summed.
        float* rb = red + buf * (DECODE_WARPS * 4 * 32);
#pragma unroll
        for (int i = 0; i < 4; ++i) rb[(warp * 4 + i) * 32 + lane] = acc[i];
        __syncthreads();
        if (warp == 0) {
            float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            for (int w = 0; w < DECODE_WARPS; ++w) {
#pragma unroll
                for (int i = 0; i < 4; ++i) v[i] += rb[(w * 4 + i) * 32 + lane];
            }
            const int n = tile * 8 + 2 * t;
            const u16* bias = (const u16*)p.bias;
            u16* y = (u16*)p.y;
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int nn = n + (i & 1);
                const int m = g + ((i >> 1) ? 8 : 0);
                if (nn < p.N && m < p.M) {
                    float r = v[i];
                    if (bias) r += half_to_f32<DTYPE>(ld_nc_u16(bias + nn));
                    y[(i64)m * p.ldy + nn] = f32_to_half<DTYPE>(r);
                }
            }
        }
        buf ^= 1;
    }
}

// Shared memory: LUT 32 KB + 2 reduction buffers 8 KB + 3 nested maps 3 KB = 44,032 bytes.
#define DECODE_SMEM_BYTES (DECODE_LUT_WORDS * 4 + 2 * DECODE_WARPS * 4 * 32 * 4 + 3 * 256 * 4)

extern "C" __global__ void __launch_bounds__(256, 2) nf4_linear_decode_m8_bf16(const Nf4LinearParams p) {
    nf4_linear_decode<DTYPE_BF16, false, 2>(p);
}
extern "C" __global__ void __launch_bounds__(256, 2) nf4_linear_decode_m8_f16(const Nf4LinearParams p) {
    nf4_linear_decode<DTYPE_F16, false, 2>(p);
}
extern "C" __global__ void __launch_bounds__(256, 2) nf4_linear_decode_m16_bf16(const Nf4LinearParams p) {
    nf4_linear_decode<DTYPE_BF16, true, 2>(p);
}
extern "C" __global__ void __launch_bounds__(256, 2) nf4_linear_decode_m16_f16(const Nf4LinearParams p) {
    nf4_linear_decode<DTYPE_F16, true, 2>(p);
}

// ---------------------------------------------------------------------------------------------
// Linear, tensor-core path (large M). Block tile BM x BN, k-tile 64 (= one NF4 block per weight
// row, so one absmax per row and tile). Per k-tile:
//   - cp.async brings the activation tile [BM][64] and the packed weight tile [BN][32 bytes]
//     into a STAGES-deep ring;
//   - every thread decodes exactly the 16-byte weight chunk it copied (row tid/2, half tid%2)
//     into a double-buffered bf16/f16 tile [BN][64], bit-identical to nf4_dequant, one k-tile
//     AHEAD of the mma so decode and tensor-core work of different warps overlap;
//   - ldmatrix + mma.sync m16n8k16 with fp32 accumulation over warp tiles of WTM x WTN.
// Rows are 128 bytes = 8 chunks of 16 bytes, stored at chunk ^ (row & 7) (XOR swizzle) so that
// ldmatrix (8 rows, same chunk) and the 16-byte stores hit 8 different bank groups.
// The absmax of a tile is loaded MMA_AM_AHEAD + 1 tiles ahead and finished one tile ahead
// (registers only).
// ---------------------------------------------------------------------------------------------
#ifndef MMA_AM_AHEAD
#define MMA_AM_AHEAD 4
#endif

template <int BM, int BN, int STAGES>
struct MmaSmem {
    static constexpr int X_STAGE = BM * 64;   // u16 per stage
    static constexpr int W_DEC = BN * 64;     // u16 per decoded buffer
    static constexpr int W_STAGE = BN * 32;   // bytes per stage
    // + 16 floats NF4 table + 3 x 256 floats nested maps
    static constexpr int BYTES =
        STAGES * X_STAGE * 2 + 2 * W_DEC * 2 + STAGES * W_STAGE + 16 * 4 + 3 * 256 * 4;
};

__device__ __forceinline__ int swz(int row, int chunk) { return row * 64 + ((chunk ^ (row & 7)) << 3); }

template <int DTYPE, int BM, int BN, int WM, int WN, int STAGES>
__device__ __forceinline__ void nf4_linear_mma(const Nf4LinearParams& p) {
    constexpr int NTHR = WM * WN * 32;
    static_assert(BN * 2 == NTHR, "one 16-byte weight chunk per thread");
    static_assert(STAGES >= 3, "the decode runs one tile ahead");
    constexpr int WTM = BM / WM, WTN = BN / WN;
    constexpr int MI = WTM / 16, NI = WTN / 8;
    static_assert(MI >= 1 && NI >= 2 && NI % 2 == 0, "warp tile");
    constexpr int XCH = BM * 8 / NTHR;  // 16-byte activation chunks per thread per tile
    static_assert(XCH * NTHR == BM * 8, "activation chunks");
    using S = MmaSmem<BM, BN, STAGES>;

    extern __shared__ __align__(128) u8 msmem[];
    // The code table is static shared memory: a lookup is then one LDS with an immediate base
    // (the dynamic layout keeps its 16 unused words, mirrored by the Rust launcher).
    __shared__ float lut[16];
    u16* Xs = (u16*)msmem;
    u16* Wd = Xs + STAGES * S::X_STAGE;
    u8* Wp = (u8*)(Wd + 2 * S::W_DEC);
    float* maps = (float*)(Wp + STAGES * S::W_STAGE) + 16;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    if (tid < 16) lut[tid] = kNf4Code[tid];
    for (int i = tid; i < 256; i += NTHR) {
        if (p.seg[0].nested) maps[i] = ld_nc_f32((const float*)p.seg[0].nested_map + i);
        if (p.n_segments > 1 && p.seg[1].nested)
            maps[256 + i] = ld_nc_f32((const float*)p.seg[1].nested_map + i);
        if (p.n_segments > 2 && p.seg[2].nested)
            maps[512 + i] = ld_nc_f32((const float*)p.seg[2].nested_map + i);
    }
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    // Split-K: this block covers k-tiles [kt0, kt0 + nkt) of the K / 64.
    const int nkt_all = p.K >> 6;
    const int kt0 = (int)((i64)blockIdx.z * nkt_all / p.splits);
    const int nkt = (int)((i64)(blockIdx.z + 1) * nkt_all / p.splits) - kt0;
    const u16* X = (const u16*)p.x;

    // The weight chunk this thread copies and decodes.
    const int wr = tid >> 1, wh = tid & 1;
    const bool wok = n0 + wr < p.N;
    int wlocal;
    const SegView sv = seg_view(p, wok ? n0 + wr : 0, wlocal);
    int wseg = 0;
    if (p.n_segments > 1 && (wok ? n0 + wr : 0) >= p.seg[0].rows) wseg = 1;
    if (p.n_segments > 2 && (wok ? n0 + wr : 0) >= p.seg[0].rows + p.seg[1].rows) wseg = 2;
    const float* smap = maps + wseg * 256;
    const u8* wsrc = sv.packed + (i64)wlocal * (p.K >> 1) + (i64)kt0 * 32 + wh * 16;
    const i64 ablk0 = (i64)wlocal * nkt_all + kt0;

    // Copy addresses, fixed per thread (the loop only adds k-tile and stage offsets): chunk i of
    // a tile is row xr0 + i * XROWS, column chunk xch; XROWS is a multiple of 8, so the swizzle
    // of every chunk is the first one's plus i rows.
    constexpr int XROWS = NTHR / 8;
    const int xr0 = tid >> 3, xch = tid & 7;
    const u16* xsrc[XCH];
    u32 xvalid = 0;
#pragma unroll
    for (int i = 0; i < XCH; ++i) {
        const int gm = m0 + xr0 + i * XROWS;
        xvalid |= (gm < p.M ? 1u : 0u) << i;
        xsrc[i] = X + (i64)(gm < p.M ? gm : 0) * p.ldx + (i64)kt0 * 64 + xch * 8;
    }
    const u32 xs_dst0 = smem_addr(Xs) + 2 * swz(xr0, xch);
    const u32 wp_dst0 = smem_addr(Wp) + wr * 32 + wh * 16;
    const u8* wcopy = wok ? wsrc : wsrc - wh * 16;
    const u32 wbytes = wok ? 16u : 0u;
    auto load_tile = [&](int kt, int stage) {
        const u32 xs = xs_dst0 + stage * (S::X_STAGE * 2);
#pragma unroll
        for (int i = 0; i < XCH; ++i)
            cp_async_16_zfill_s(xs + i * (XROWS * 128), xsrc[i] + kt * 64,
                                (xvalid >> i) & 1u ? 16u : 0u);
        cp_async_16_zfill_s(wp_dst0 + stage * S::W_STAGE, wok ? wcopy + kt * 32 : wcopy, wbytes);
    };
    auto absmax_load = [&](int kt) {
        AbsmaxRaw r;
        if (wok && kt < nkt) {
            r = seg_absmax_load(sv, ablk0 + kt);
        } else {
            r.code = 0;
            r.scale = 0.0f;
        }
        return r;
    };
    auto absmax_finish = [&](AbsmaxRaw r) {
        if (!wok) return 0.0f;
        return sv.nested ? nf4_nested_absmax(smap[r.code], r.scale, sv.offset) : __uint_as_float(r.code);
    };
    // The decoded row's four 16-byte pieces (swizzled), as offsets in a decoded buffer.
    int wd_off[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) wd_off[q] = swz(wr, wh * 4 + q);
    auto code_at = [&](u32 word, int bit) -> float {
        return *(const float*)((const u8*)lut + nf4_code_offset(word, bit));
    };
    auto decode = [&](int stage, int buf, float am) {
        const u32x4 raw = *(const u32x4*)(Wp + stage * S::W_STAGE + wr * 32 + wh * 16);
        const u32 words[4] = {raw.x, raw.y, raw.z, raw.w};
        u16* dst = Wd + buf * S::W_DEC;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            u32 o[4];
#pragma unroll
            for (int j = 0; j < 4; ++j)
                // Byte j: element 2j in the high nibble, 2j+1 in the low one.
                o[j] = pack_half2<DTYPE>(__fmul_rn(code_at(words[q], 8 * j + 4), am),
                                         __fmul_rn(code_at(words[q], 8 * j), am));
            *(u32x4*)(dst + wd_off[q]) = u32x4{o[0], o[1], o[2], o[3]};
        }
    };

    float acc[MI][NI][4];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) acc[mi][ni][0] = acc[mi][ni][1] = acc[mi][ni][2] = acc[mi][ni][3] = 0.0f;

    // Prologue: tiles 0 .. STAGES-2 in flight; decode tile 0.
#pragma unroll
    for (int st = 0; st < STAGES - 1; ++st) {
        if (st < nkt) load_tile(st, st);
        cp_async_commit();
    }
    float am_next;
    // Raw statistics of tiles kt+2 .. kt+1+MMA_AM_AHEAD at the top of iteration kt: a load has
    // MMA_AM_AHEAD iterations to arrive. With one iteration (as before) every k-tile waited for
    // a DRAM round trip: 1.1 us per k-tile at M = 64 without K split (sweep_nf4_mma.py).
    AbsmaxRaw am_ring[MMA_AM_AHEAD];
    __syncthreads();  // publishes `lut` and `maps`
    {
        const float am0 = absmax_finish(absmax_load(0));
        am_next = absmax_finish(absmax_load(1));
#pragma unroll
        for (int i = 0; i < MMA_AM_AHEAD; ++i) am_ring[i] = absmax_load(2 + i);
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        if (nkt > 0) decode(0, 0, am0);
    }

    const int warp_m = warp / WN, warp_n = warp % WN;
    // ldmatrix row addresses of k-step 0 in stage 0 / buffer 0 (bytes, shared space). The rows
    // a lane addresses all have row & 7 == lane & 7, so k-step kk's swizzled chunk is the lane's
    // chunk XOR 2 kk: one XOR with a constant per k-step.
    u32 a_addr[MI], b_addr[NI / 2];
    const u32 a_chunk = (u32)((lane >> 4) ^ (lane & 7));
    const u32 b_chunk = (u32)(((lane >> 3) & 1) ^ (lane & 7));
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
        a_addr[mi] = smem_addr(Xs) + 128 * (warp_m * WTM + mi * 16 + (lane & 15));
#pragma unroll
    for (int nj = 0; nj < NI / 2; ++nj)
        b_addr[nj] = smem_addr(Wd) + 128 * (warp_n * WTN + nj * 16 + (lane & 7) + ((lane >> 4) << 3));
    for (int kt = 0; kt < nkt; ++kt) {
        cp_async_wait<STAGES - 3>();  // tile kt+1 has landed (own copies)
        __syncthreads();              // ... for everyone; Wd[kt&1] decoded; tile kt-1 consumed
        if (kt + STAGES - 1 < nkt) load_tile(kt + STAGES - 1, (kt + STAGES - 1) % STAGES);
        cp_async_commit();
        if (kt + 1 < nkt) decode((kt + 1) % STAGES, (kt + 1) & 1, am_next);

        const u32 xs_off = (kt % STAGES) * (S::X_STAGE * 2);
        const u32 wd_buf = (kt & 1) * (S::W_DEC * 2);
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            u32 a[MI][4];
            u32 b[NI][2];
            const u32 a_k = ((a_chunk ^ (2 * kk)) << 4) + xs_off;
            const u32 b_k = ((b_chunk ^ (2 * kk)) << 4) + wd_buf;
#pragma unroll
            for (int mi = 0; mi < MI; ++mi) ldmatrix_x4_s(a[mi], a_addr[mi] + a_k);
#pragma unroll
            for (int nj = 0; nj < NI / 2; ++nj) {
                u32 r[4];
                ldmatrix_x4_s(r, b_addr[nj] + b_k);
                b[2 * nj][0] = r[0];
                b[2 * nj][1] = r[1];
                b[2 * nj + 1][0] = r[2];
                b[2 * nj + 1][1] = r[3];
            }
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                for (int ni = 0; ni < NI; ++ni) mma_m16n8k16<DTYPE>(acc[mi][ni], a[mi], b[ni]);
        }
        am_next = absmax_finish(am_ring[0]);
#pragma unroll
        for (int i = 0; i + 1 < MMA_AM_AHEAD; ++i) am_ring[i] = am_ring[i + 1];
        am_ring[MMA_AM_AHEAD - 1] = absmax_load(kt + 2 + MMA_AM_AHEAD);
    }
    cp_async_wait<0>();

    if (p.splits > 1) {
        // Split-K: fp32 partials without bias; nf4_linear_splitk_reduce sums them in order.
        float* ws = (float*)p.ws + (i64)blockIdx.z * p.M * p.N;
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) {
            const int col = n0 + warp_n * WTN + ni * 8 + (lane & 3) * 2;
#pragma unroll
            for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
                for (int hh = 0; hh < 2; ++hh) {
                    const int row = m0 + warp_m * WTM + mi * 16 + (lane >> 2) + hh * 8;
                    if (row >= p.M) continue;
                    float* dst = ws + (i64)row * p.N + col;
                    if (col < p.N) dst[0] = acc[mi][ni][hh * 2];
                    if (col + 1 < p.N) dst[1] = acc[mi][ni][hh * 2 + 1];
                }
            }
        }
        return;
    }
    // Epilogue: bias in fp32, one rounding, 4-byte stores where the pair is in range.
    const u16* bias = (const u16*)p.bias;
    u16* y = (u16*)p.y;
    const bool pair_ok = ((p.ldy & 1) == 0) && ((p.y & 3) == 0);
#pragma unroll
    for (int ni = 0; ni < NI; ++ni) {
        const int col = n0 + warp_n * WTN + ni * 8 + (lane & 3) * 2;
        float b0 = 0.0f, b1 = 0.0f;
        if (bias) {
            if (col < p.N) b0 = half_to_f32<DTYPE>(ld_nc_u16(bias + col));
            if (col + 1 < p.N) b1 = half_to_f32<DTYPE>(ld_nc_u16(bias + col + 1));
        }
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const int row = m0 + warp_m * WTM + mi * 16 + (lane >> 2) + hh * 8;
                if (row >= p.M) continue;
                const float v0 = acc[mi][ni][hh * 2] + b0, v1 = acc[mi][ni][hh * 2 + 1] + b1;
                u16* dst = y + (i64)row * p.ldy + col;
                if (pair_ok && col + 1 < p.N) {
                    *(u32*)dst = pack_half2<DTYPE>(v0, v1);
                } else {
                    if (col < p.N) dst[0] = f32_to_half<DTYPE>(v0);
                    if (col + 1 < p.N) dst[1] = f32_to_half<DTYPE>(v1);
                }
            }
        }
    }
}

// Tile configurations (the launcher picks one per Tuning and shape; shared memory in bytes):
//   l4: 128x128, 8 warps (2x4, warp tile 64x32), 4 stages: 117,824   (sm80 / sm90)
//   l3: 128x128, 8 warps, 3 stages:                         97,344   (sm86: <= 99 KB)
//   m4: 64x128,  8 warps (2x4, warp tile 32x32), 4 stages:  85,056   (sm80 / sm90, medium M)
//   m3: 64x128,  8 warps, 3 stages:                         72,768   (sm86, medium M)
//   s4: 64x64,   4 warps (2x2, warp tile 32x32), 4 stages:  60,480   (small grids, any)
// Small grids split K over gridDim.z (fp32 partials in p.ws, then nf4_linear_splitk_reduce).
#define GPTOSS_NF4_MMA(NAME, BM, BN, WM, WN, ST)                                                  \
    extern "C" __global__ void __launch_bounds__(WM * WN * 32)                                    \
        nf4_linear_mma_##NAME##_bf16(const Nf4LinearParams p) {                                   \
        nf4_linear_mma<DTYPE_BF16, BM, BN, WM, WN, ST>(p);                                        \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(WM * WN * 32)                                    \
        nf4_linear_mma_##NAME##_f16(const Nf4LinearParams p) {                                    \
        nf4_linear_mma<DTYPE_F16, BM, BN, WM, WN, ST>(p);                                         \
    }
GPTOSS_NF4_MMA(l4, 128, 128, 2, 4, 4)
GPTOSS_NF4_MMA(l3, 128, 128, 2, 4, 3)
GPTOSS_NF4_MMA(m4, 64, 128, 2, 4, 4)
GPTOSS_NF4_MMA(m3, 64, 128, 2, 4, 3)
GPTOSS_NF4_MMA(s4, 64, 64, 2, 2, 4)
#undef GPTOSS_NF4_MMA

static_assert(MmaSmem<128, 128, 4>::BYTES == 117824, "l4 smem (Rust mirrors it)");
static_assert(MmaSmem<128, 128, 3>::BYTES == 97344, "l3 smem");
static_assert(MmaSmem<64, 128, 4>::BYTES == 85056, "m4 smem");
static_assert(MmaSmem<64, 128, 3>::BYTES == 72768, "m3 smem");
static_assert(MmaSmem<64, 64, 4>::BYTES == 60480, "s4 smem");

// Split-K finish: y[m][n] = cast(sum_z ws[z][m][n] + bias[n]), z in order (deterministic).
// One thread per output element; grid-stride.
template <int DTYPE>
__device__ __forceinline__ void nf4_linear_splitk_reduce(const Nf4LinearParams& p) {
    pdl_wait();  // the partials come from the split launch just before
    const i64 total = (i64)p.M * p.N;
    const i64 plane = total;
    const float* ws = (const float*)p.ws;
    const u16* bias = (const u16*)p.bias;
    u16* y = (u16*)p.y;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (i64)gridDim.x * blockDim.x) {
        float v = 0.0f;
        for (int z = 0; z < p.splits; ++z) v += ws[z * plane + i];
        const int m = (int)(i / p.N), n = (int)(i - (i64)m * p.N);
        if (bias) v += half_to_f32<DTYPE>(ld_nc_u16(bias + n));
        y[(i64)m * p.ldy + n] = f32_to_half<DTYPE>(v);
    }
}
extern "C" __global__ void nf4_linear_splitk_reduce_bf16(const Nf4LinearParams p) {
    nf4_linear_splitk_reduce<DTYPE_BF16>(p);
}
extern "C" __global__ void nf4_linear_splitk_reduce_f16(const Nf4LinearParams p) {
    nf4_linear_splitk_reduce<DTYPE_F16>(p);
}

// The same sum, four outputs of one row per thread (N a multiple of 4, splits <= 8; the host
// checks both): one 16-byte load per partial, all of them issued before the first add, instead
// of one dependent 4-byte load chain per output. The adds run in the same order from the same
// 0.0f, so the result is bit-identical to nf4_linear_splitk_reduce. The split launch's kernel
// ended before this one started, so the partials may come through the read-only path.
#define SPLITK_REDUCE_MAX_SPLITS 8
template <int DTYPE>
__device__ __forceinline__ void nf4_linear_splitk_reduce_v4(const Nf4LinearParams& p) {
    pdl_wait();  // the partials come from the split launch just before
    const i64 vecs = (i64)p.M * p.N / 4;  // also the distance between partials, in float4
    const float4* ws = (const float4*)p.ws;
    const u16* bias = (const u16*)p.bias;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < vecs;
         i += (i64)gridDim.x * blockDim.x) {
        float4 part[SPLITK_REDUCE_MAX_SPLITS];
#pragma unroll
        for (int z = 0; z < SPLITK_REDUCE_MAX_SPLITS; ++z)
            if (z < p.splits) part[z] = __ldg(ws + z * vecs + i);
        float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
        for (int z = 0; z < SPLITK_REDUCE_MAX_SPLITS; ++z) {
            if (z < p.splits) {
                v[0] += part[z].x;
                v[1] += part[z].y;
                v[2] += part[z].z;
                v[3] += part[z].w;
            }
        }
        const i64 e = 4 * i;
        const int m = (int)(e / p.N), n = (int)(e - (i64)m * p.N);
        u16* y = (u16*)p.y + (i64)m * p.ldy + n;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const float b = bias ? half_to_f32<DTYPE>(ld_nc_u16(bias + n + q)) : 0.0f;
            y[q] = f32_to_half<DTYPE>(bias ? v[q] + b : v[q]);
        }
    }
}
extern "C" __global__ void nf4_linear_splitk_reduce_v4_bf16(const Nf4LinearParams p) {
    nf4_linear_splitk_reduce_v4<DTYPE_BF16>(p);
}
extern "C" __global__ void nf4_linear_splitk_reduce_v4_f16(const Nf4LinearParams p) {
    nf4_linear_splitk_reduce_v4<DTYPE_F16>(p);
}

// ---------------------------------------------------------------------------------------------
// Quantize with bitsandbytes' CUDA semantics.
//   1. nf4_quantize_blocks_*: one warp per 64-block. absmax = max |v| (fp32; elements past n
//      count as 0), inv = 1 / absmax (IEEE division), code(v) = the number of fp32 midpoints of
//      adjacent NF4 values that v * inv exceeds: bitsandbytes' decision tree compares with
//      exactly these midpoints, `>` sends ties to the lower code, and NaN (an all-zero block:
//      0 * inf) gets code 0 as on CUDA. Writes packed codes and f32 absmax.
//   2. nf4_quantize_mean (nested): offset = mean(absmax), summed in float64 in a fixed order
//      (thread t of 1024 adds absmax[t + 1024 j] for j ascending, then a pairwise tree over
//      threads: t += t + s for s = 512, 256, ..., 1), divided in float64, rounded once to f32.
//      bitsandbytes uses torch's fp32 `mean()`, whose order is unspecified: last-bit
//      differences in the offset are possible.
//   3. nf4_quantize_nested: one 256-thread block per 256 absmax values: v = absmax - offset
//      (fp32), s = max |v|, code = bitsandbytes' 8-bit search of v * (1 / s) in the signed
//      dynamic map (a 7-step binary search, then the nearer neighbour by fp32 midpoint).
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ u32 nf4_quantize_code(float x) {
    u32 c = 0;
#pragma unroll
    for (int i = 0; i < 15; ++i) {
        const float mid = __fmul_rn(__fadd_rn(kNf4Code[i], kNf4Code[i + 1]), 0.5f);
        c += (x > mid) ? 1u : 0u;
    }
    return c;
}

template <int KIND>  // 0 = bf16, 1 = f16, 2 = f32
__device__ __forceinline__ float load_elem(const void* base, i64 i) {
    if (KIND == 0) return bf16_to_f32(((const u16*)base)[i]);
    if (KIND == 1) return f16_to_f32(((const u16*)base)[i]);
    return ((const float*)base)[i];
}

template <int KIND>
__device__ __forceinline__ void nf4_quantize_blocks(const Nf4QuantizeParams& p) {
    const int lane = threadIdx.x & 31;
    const i64 b = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (b >= p.nb) return;  // whole warp leaves together
    const i64 i0 = b * NF4_BLOCK + 2 * lane;
    const float v0 = i0 < p.n ? load_elem<KIND>((const void*)p.input, i0) : 0.0f;
    const float v1 = i0 + 1 < p.n ? load_elem<KIND>((const void*)p.input, i0 + 1) : 0.0f;
    const float amax = warp_max(fmaxf(fabsf(v0), fabsf(v1)));
    const float inv = __fdiv_rn(1.0f, amax);
    const u32 c0 = nf4_quantize_code(__fmul_rn(v0, inv));
    const u32 c1 = nf4_quantize_code(__fmul_rn(v1, inv));
    if (i0 < p.n) ((u8*)p.packed)[i0 / 2] = (u8)((c0 << 4) | c1);
    if (lane == 0) ((float*)p.absmax)[b] = amax;
}

extern "C" __global__ void nf4_quantize_blocks_bf16(const Nf4QuantizeParams p) { nf4_quantize_blocks<0>(p); }
extern "C" __global__ void nf4_quantize_blocks_f16(const Nf4QuantizeParams p) { nf4_quantize_blocks<1>(p); }
extern "C" __global__ void nf4_quantize_blocks_f32(const Nf4QuantizeParams p) { nf4_quantize_blocks<2>(p); }

// Launch with ONE block of 1024 threads.
extern "C" __global__ void __launch_bounds__(1024) nf4_quantize_mean(const Nf4QuantizeParams p) {
    __shared__ double part[1024];
    const int t = threadIdx.x;
    double s = 0.0;
    for (i64 i = t; i < p.nb; i += 1024) s += (double)((const float*)p.absmax)[i];
    part[t] = s;
    __syncthreads();
    for (int w = 512; w > 0; w >>= 1) {
        if (t < w) part[t] = part[t] + part[t + w];
        __syncthreads();
    }
    if (t == 0) ((float*)p.offset)[0] = (float)(part[0] / (double)p.nb);
}

// bitsandbytes' 8-bit encoder (dQuantize, not stochastic) over a sorted 256-entry map.
__device__ __forceinline__ u32 quantize_map8(const float* code, float x) {
    int pivot = 127, upper_pivot = 255, lower_pivot = 0;
    float lower = -1.0f, upper = 1.0f;
    float val = code[pivot];
    for (int step = 64; step > 0; step >>= 1) {
        if (x > val) {
            lower_pivot = pivot;
            lower = val;
            pivot += step;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= step;
        }
        val = code[pivot];
    }
    if (upper_pivot == 255) upper = code[255];
    if (lower_pivot == 0) lower = code[0];
    if (x > val) {
        const float mid = __fmul_rn(__fadd_rn(upper, val), 0.5f);
        return x > mid ? (u32)upper_pivot : (u32)pivot;
    }
    const float mid = __fmul_rn(__fadd_rn(lower, val), 0.5f);
    return x < mid ? (u32)lower_pivot : (u32)pivot;
}

// Launch with 256 threads per block, one block per 256 absmax values.
extern "C" __global__ void __launch_bounds__(256) nf4_quantize_nested(const Nf4QuantizeParams p) {
    __shared__ float map[256];
    __shared__ float wmax[8];
    const int t = threadIdx.x;
    map[t] = ((const float*)p.nested_map)[t];
    const float offset = ((const float*)p.offset)[0];
    const i64 i = (i64)blockIdx.x * 256 + t;
    const float v = i < p.nb ? __fsub_rn(((const float*)p.absmax)[i], offset) : 0.0f;
    const float m = warp_max(fabsf(v));
    if ((t & 31) == 0) wmax[t >> 5] = m;
    __syncthreads();
    float smax = wmax[0];
#pragma unroll
    for (int w = 1; w < 8; ++w) smax = fmaxf(smax, wmax[w]);
    if (t == 0) ((float*)p.nested_absmax)[blockIdx.x] = smax;
    if (i < p.nb) {
        const float inv = __fdiv_rn(1.0f, smax);
        ((u8*)p.codes)[i] = (u8)quantize_map8(map, __fmul_rn(v, inv));
    }
}
