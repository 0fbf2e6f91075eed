// GPT-OSS mixture-of-experts block over the virtual fused NF4 experts.
//
// One forward is a fixed sequence of launches whose grids depend only on the token count T (so a
// CUDA graph captured for one T replays correctly for any routing).
//
// Decode (T <= 16) and streaming (17 <= T <= 128, the default STREAM_MAX_TOKENS):
//   moe_route_*     (router-weights mode, or logits with T > 64) logits -> top-k in the workspace
//   moe_group_*     (streaming only) experts and their pair lists, as for prefill
//   moe_str_up_*    per (16-row groups, touched-expert slot): the expert's gate_up rows streamed
//                   once per 8 or 16 of its (token, k) pairs (the mma columns), bias +
//                   SwiGLU-OAI -> h[pair]; in decode each block routes the tokens itself
//   moe_str_down_*  the same over the down rows -> fp32 out[pair]
//   moe_str_fused_* (decode from 2 tokens, ops::moe::fused_pays) both phases in one launch of
//                   persistent blocks taking items from a ticket counter (ws_sync, zeroed by a
//                   memset before the launch); a down item waits for its expert's gate_up items
//   moe_combine_*   as below (fixed order)
// The older two-launch decode kernels (moe_dec_*, moe_dec2_*: combine fused into down) stay for
// comparison (GPTOSS_3090_MOE_DECODE=1|2).
// Router logits on their own (moe_router_*, the vLLM router layer at small T):
//   logits [T, E] = x W_r^T + b_r, one block per (expert, 4 tokens), fp32 sums;
//   moe_router_topk_* (sm_90, E <= 32) the same logits and their top-k in one launch of
//   thread-block clusters (the routing vLLM's top-k launch would compute).
// Prefill (T > 128):
//   moe_route_*     (when routing is needed and T is large) router logits -> top-k
//   moe_group_*     (one block) [top-k of given logits for small T] + count per expert, padded
//                   exclusive scan, scatter of the (token, k) pair ids into expert-contiguous
//                   order, list of (expert, row) tiles
//   moe_gemm_up_*   gate_up + bias + SwiGLU-OAI -> h[pair, I]
//   moe_gemm_down_* down + bias -> out[pair, H]
//   moe_combine_*   y[t] = sum_k w[t,k] * out[t*topk + k] in k order (no atomics: deterministic)
//
// Weights never leave their NF4 form in global memory. The streaming and decode kernels turn
// packed codes into mma.sync A fragments in registers (a code-pair table; the streaming and
// lean kernels scale each 64-k block's fp32 mma result by its absmax, the first ones multiply
// the pairs; see DEC_GAMMA_BF16 for the rounding). The prefill kernels
// cp.async the packed bytes into shared memory and dequantize a 128x64 tile exactly there
// (w = half(NF4[code] * absmax), one fp32 product and one round-to-nearest cast, as bitsandbytes
// does) for ldmatrix. All products accumulate in fp32.
//
// Layout of one expert e of a fused NF4 tensor [E, N, K] (bitsandbytes, row-major per expert):
//   packed   u8  [E, N*K/2]   element i of the expert at byte i/2, high nibble = even i
//   absmax   u8  [E, N*K/64]  (nested) or f32 [E, N*K/64] (plain), block b = i / 64
//   nested   f32 [E, nnb]     absmax_f32 = nested_map[code] * nested[e, b / 256] + offset[e]
//   offset   f32 [E]
//   bias     f32 [E, N]       (converted from the checkpoint's bf16 once, exactly)
// gate_up has N = 2I, K = H and INTERLEAVED rows (2j = gate j, 2j+1 = up j); down has N = H, K = I.
#include "common.cuh"

// Which entries this program defines. The runtime compiles moe.cu as two NVRTC programs per
// weight order (src/cuda/mod.rs SOURCES): `moe` / `moe_chunks` with the bf16 entries and
// `moe_f16` / `moe_chunks_f16` with the fp16 ones, and a launch of an `_f16` entry goes to the
// second (GpuDevice::function). Why: GPT-OSS serves in bf16, and the fp16 half of the entries
// is half of this file's compile (NVRTC runs one program on one core: 72 s for the whole
// `moe_chunks` for sm_86 on a 2-core VM, session 32). Compiled on its own (tests, variants),
// the file defines every entry.
#ifndef MOE_MAIN_ENTRIES
#define MOE_MAIN_ENTRIES 1
#endif
#ifndef MOE_F16_ENTRIES
#define MOE_F16_ENTRIES 1
#endif

// ---------------------------------------------------------------------------------------------
// Parameters (mirrored by `crate::ops::moe::MoeParams`; keep the field order identical).
// ---------------------------------------------------------------------------------------------

// How the routing is obtained.
#define MOE_ROUTE_WEIGHTS 0  // logits = x W_r^T + b_r computed here, then top-k + softmax
#define MOE_ROUTE_LOGITS 1   // logits [T, E] given, top-k + softmax here
#define MOE_ROUTE_GIVEN 2    // topk ids/weights given (vLLM's apply()); ws_ids/ws_wts point at them

#define MOE_MAX_EXPERTS 256
#define MOE_MAX_TOPK 8
#define MOE_GROUP_THREADS 1024

struct MoeParams {
    // Activations. x [T, H] act dtype, row stride x_stride elements; y [T, H] contiguous.
    u64 x;
    u64 y;
    // Routing inputs. router_w [E, H] act dtype contiguous; router_b [E] f32 (0 = no bias);
    // logits [T, E] contiguous, f32 when logits_f32 else act dtype.
    u64 router_w;
    u64 router_b;
    u64 logits;
    // gate_up experts [E, 2I, H] (see the layout above); bias f32 [E, 2I].
    u64 gu_packed;
    u64 gu_absmax;
    u64 gu_nested;
    u64 gu_offset;
    u64 gu_bias;
    // down experts [E, H, I]; bias f32 [E, H].
    u64 dn_packed;
    u64 dn_absmax;
    u64 dn_nested;
    u64 dn_offset;
    u64 dn_bias;
    // Double-quantization code map, f32 [256] (the same constant for every tensor).
    u64 nested_map;
    // Workspace (see `moe_workspace_layout` in Rust). ids i32 [T*topk] / wts f32 [T*topk] are
    // the routing (caller tensors in MOE_ROUTE_GIVEN mode); counts/offsets i32 [E] per expert
    // (offsets = padded segment starts in `sorted`); meta i32 [2] = {num_active, num_tiles};
    // active i32 [E]; tiles i32 [max_tiles, 2] = (expert, first row in sorted); sorted i32
    // [sorted_cap] = pair ids (t*topk + k) or -1 for padding; h act [T*topk, I]; out [T*topk, H]
    // f32 (out_f32) or act dtype (room for f32 either way).
    u64 ws_ids;
    u64 ws_wts;
    u64 ws_counts;
    u64 ws_offsets;
    u64 ws_meta;
    u64 ws_active;
    u64 ws_tiles;
    u64 ws_sorted;
    u64 ws_h;
    u64 ws_out;
    i32 T;         // tokens
    i32 H;         // hidden size (K of gate_up, N of down)
    i32 I;         // expert intermediate size (gate_up has 2I rows, K of down)
    i32 E;         // experts (<= 256)
    i32 topk;      // experts per token (<= 8)
    i32 x_stride;  // row stride of x in elements (multiple of 8)
    i32 route_mode;
    i32 logits_f32;
    i32 fuse_route;  // moe_group routes the tokens itself (small T)
    i32 gu_nested_flag;  // 1: gu_absmax is u8 + nested stats; 0: gu_absmax is f32
    i32 dn_nested_flag;
    i32 gu_nnb;     // nested blocks per gate_up expert (row stride of gu_nested)
    i32 dn_nnb;
    i32 bm;         // segment padding / tile rows of the prefill GEMMs
    i32 max_tiles;  // capacity of ws_tiles
    i32 sorted_cap; // capacity of ws_sorted
    i32 str_ks;      // moe_str_*: warps that split K per 16-row group (1, 2, 4 or 8)
    i32 str_grouped; // moe_str_*: 1 = experts and pairs from moe_group, 0 = routed per block
    i32 out_f32;     // ws_out holds f32 (moe_str_down) instead of act dtype (moe_gemm_down)
    i32 str_xcols;   // moe_str_*: activation columns a block stages in shared memory (0: none)
    // moe_str_fused_*: u32 [1 + E] zeroed before the launch = {tickets taken, then per expert
    // slot the gate_up items done}; the down phase's K split, staged columns and items per slot
    // (str_ks / str_xcols / str_gx_up are the gate_up phase's); expert slots.
    u64 ws_sync;
    i32 str_ks_dn;
    i32 str_xcols_dn;
    i32 str_gx_up;
    i32 str_gx_dn;
    i32 str_slots;
    i32 router_b_act;  // moe_router_*: router_b holds act dtype values (1) or f32 (0)
    // moe_str_* grouped: 1 = block row y is tile y of ws_tiles (moe_group's passes of bm pairs,
    // bm = 8 * NT), so an expert with more pairs than a pass holds runs its passes in separate
    // blocks; 0 = block row y is active expert y, whose passes run in turn in one block.
    i32 str_pass_items;
    // moe_str_* split launches (ops::moe::fold_combine): 1 = the down launch sums each token's
    // k outputs itself (the last block of each row range, moe_str_fold_combine) and no
    // moe_combine launch follows. fold_ctr: u32 [str_gx_dn] arrival counters, one per row
    // range of the down grid, zeroed by the gate_up launch's block (0, 0).
    i32 str_fold;
    u64 fold_ctr;
};

// ---------------------------------------------------------------------------------------------
// Small helpers.
// ---------------------------------------------------------------------------------------------

// SwiGLU-OAI of one (gate, up) pair, fp32: gate <= 7, up in [-7, 7], (up + 1) * gate * sigmoid(1.702 gate).
__device__ __forceinline__ float swiglu_oai(float gate, float up) {
    gate = fminf(gate, 7.0f);
    up = fminf(fmaxf(up, -7.0f), 7.0f);
    const float glu = gate / (1.0f + expf(-1.702f * gate));
    return (up + 1.0f) * glu;
}

// Statistics of one NF4 tensor of one expert, with the per-expert bases already applied.
struct Nf4Stats {
    const u8* absmax;      // u8 codes (nested) or f32 bytes (plain)
    const float* nested;   // nested absmax of this expert
    float offset;          // nested offset of this expert
    int is_nested;
};

__device__ __forceinline__ Nf4Stats nf4_stats(u64 absmax, u64 nested, u64 offset, int is_nested,
                                              int nnb, long long e, long long blocks_per_expert) {
    Nf4Stats s;
    s.is_nested = is_nested;
    if (is_nested) {
        s.absmax = (const u8*)absmax + e * blocks_per_expert;
        s.nested = (const float*)nested + e * (long long)nnb;
        s.offset = ((const float*)offset)[e];
    } else {
        s.absmax = (const u8*)absmax + e * blocks_per_expert * 4;
        s.nested = nullptr;
        s.offset = 0.0f;
    }
    return s;
}

// The raw statistic of block b: the u8 code (nested) or the f32 bits (plain), plus the nested
// scale it needs. Split from `nf4_absmax_finish` so callers can issue the loads early.
struct Nf4RawAbsmax {
    u32 raw;
    float scale;
};
__device__ __forceinline__ Nf4RawAbsmax nf4_absmax_load(const Nf4Stats& s, long long b) {
    Nf4RawAbsmax r;
    if (s.is_nested) {
        r.raw = s.absmax[b];
        r.scale = s.nested[b / NF4_NESTED_BLOCK];
    } else {
        r.raw = ((const u32*)s.absmax)[b];
        r.scale = 0.0f;
    }
    return r;
}
// absmax_f32 of a raw statistic (nf4_nested_absmax for nested ones).
__device__ __forceinline__ float nf4_absmax_finish(const Nf4Stats& s, Nf4RawAbsmax r,
                                                   const float* nmap) {
    if (s.is_nested) return nf4_nested_absmax(nmap[r.raw], r.scale, s.offset);
    return __uint_as_float(r.raw);
}

// Decodes the two NF4 codes of one packed byte (bits [sh, sh+8) of `w`) into one register of two
// halves: low half = even element (high nibble), high half = odd element (low nibble).
template <int DTYPE>
__device__ __forceinline__ u32 nf4_pair(u32 w, int sh, float am, const float* lut) {
    const u8* t = (const u8*)lut;
    const float v0 = __fmul_rn(*(const float*)(t + nf4_code_offset(w, sh + 4)), am);
    const float v1 = __fmul_rn(*(const float*)(t + nf4_code_offset(w, sh)), am);
    return pack_half2<DTYPE>(v0, v1);
}

// Loads the code tables into shared memory (NF4 LUT: 16 distinct words in 16 distinct banks, so
// any warp-wide lookup is conflict-free).
__device__ __forceinline__ void load_tables(float* s_lut, float* s_nmap, u64 nested_map) {
    for (int i = threadIdx.x; i < 16; i += blockDim.x) s_lut[i] = kNf4Code[i];
    if (nested_map)
        for (int i = threadIdx.x; i < 256; i += blockDim.x)
            s_nmap[i] = ((const float*)nested_map)[i];
}

// ---------------------------------------------------------------------------------------------
// Routing: one warp per token.
// ---------------------------------------------------------------------------------------------

// Softmax over k selected logits (sel_v in selection order, sel_v[0] the largest) and the store
// of the token's routing: one thread. warp_topk_softmax and moe_router_topk end here, so their
// weights are the same bits (block_route_logits does the same arithmetic in place).
__device__ __forceinline__ void topk_softmax_store(const float* sel_v, const int* sel_e, int k,
                                                   int* ids, float* wts) {
    const float m = sel_v[0];
    float w[MOE_MAX_TOPK];
    float sum = 0.0f;
    for (int i = 0; i < k; ++i) {
        // All selected logits -inf: fall back to equal weights instead of NaN.
        w[i] = (m == -__int_as_float(0x7f800000)) ? 1.0f : expf(sel_v[i] - m);
        sum += w[i];
    }
    for (int i = 0; i < k; ++i) {
        ids[i] = sel_e[i];
        wts[i] = w[i] / sum;
    }
}

// Top-k over the logits one warp holds (lane l has experts l, l+32, ...), ties to the lower expert
// index, NaN treated as -inf; softmax over the k selected logits only. Lane 0 writes the token's
// topk ids/weights to ids[0..topk) / wts[0..topk) (global or shared memory).
__device__ __forceinline__ void warp_topk_softmax(const MoeParams& p, float (&v)[8], int* ids,
                                                  float* wts) {
    const int lane = threadIdx.x & 31;
    u32 taken = 0;  // bit j: expert lane + 32 j already selected
    float sel_v[MOE_MAX_TOPK];
    int sel_e[MOE_MAX_TOPK];
#pragma unroll
    for (int j = 0; j < 8; ++j)
        if (v[j] != v[j]) v[j] = -__int_as_float(0x7f800000);
    for (int i = 0; i < p.topk; ++i) {
        float bv = -__int_as_float(0x7f800000);
        int be = 0x7fffffff;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int e = lane + 32 * j;
            if (e < p.E && !((taken >> j) & 1u) && (v[j] > bv || (v[j] == bv && e < be))) {
                bv = v[j];
                be = e;
            }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            const int oe = __shfl_xor_sync(0xffffffffu, be, o);
            if (ov > bv || (ov == bv && oe < be)) {
                bv = ov;
                be = oe;
            }
        }
        if ((be & 31) == lane && be < p.E) taken |= 1u << (be >> 5);
        sel_v[i < MOE_MAX_TOPK ? i : 0] = bv;
        sel_e[i < MOE_MAX_TOPK ? i : 0] = be;
    }
    if (lane == 0) topk_softmax_store(sel_v, sel_e, p.topk, ids, wts);
}

// Routing of tokens [0, T) from given logits by the whole block: the thread of (token t, expert
// e) ranks its logit among the token's E (NaN as -inf, ties to the lower expert index), so the
// k best land at ranks 0 .. k-1 in one parallel step. The warp top-k needs k dependent rounds of
// 5 shuffle levels per token; in the streaming kernels, where every block routes for itself,
// ncu counted it at a fifth of all issue slots at 16 tokens. The selection, its order and the
// softmax arithmetic equal warp_topk_softmax's (bit-identical weights). Writes ids/wts
// [T * topk] (global or shared memory). Every thread of the block must call it; it ends with a
// barrier, after which the block sees the results.
template <int DTYPE>
__device__ void block_route_logits(const MoeParams& p, int* ids, float* wts) {
    auto logit = [&](int t, int e) -> float {
        const long long idx = (long long)t * p.E + e;
        // Predicated: an f32 load hoisted above the test would read past bf16/fp16 logits.
        const float f = ld_nc_f32_if((const float*)p.logits + idx, p.logits_f32);
        const float v = p.logits_f32 ? f : half_to_f32<DTYPE>(ld_nc_u16((const u16*)p.logits + idx));
        return v != v ? -__int_as_float(0x7f800000) : v;
    };
    for (int i = threadIdx.x; i < p.T * p.E; i += blockDim.x) {
        const int t = i / p.E, e = i - t * p.E;
        const float v = logit(t, e);
        int rank = 0;
        for (int j = 0; j < p.E; ++j) {
            const float o = logit(t, j);
            rank += (o > v || (o == v && j < e)) ? 1 : 0;
        }
        if (rank < p.topk) {
            ids[t * p.topk + rank] = e;
            wts[t * p.topk + rank] = v;  // the logit until the softmax below
        }
    }
    __syncthreads();
    for (int t = threadIdx.x; t < p.T; t += blockDim.x) {
        float* w = wts + t * p.topk;
        const float m = w[0];
        float sum = 0.0f;
        for (int i = 0; i < p.topk; ++i) {
            // All selected logits -inf: equal weights instead of NaN (as warp_topk_softmax).
            w[i] = (m == -__int_as_float(0x7f800000)) ? 1.0f : expf(w[i] - m);
            sum += w[i];
        }
        for (int i = 0; i < p.topk; ++i) w[i] = w[i] / sum;
    }
    __syncthreads();
}

// Gathers (or computes) token t's logits into the warp's registers, then selects into ids/wts.
template <int DTYPE>
__device__ void route_token(const MoeParams& p, int t, int* ids, float* wts) {
    const int lane = threadIdx.x & 31;
    float v[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = 0.0f;
    if (p.route_mode == MOE_ROUTE_LOGITS) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int e = lane + 32 * j;
            if (e < p.E) {
                const long long idx = (long long)t * p.E + e;
                v[j] = p.logits_f32 ? ((const float*)p.logits)[idx]
                                    : half_to_f32<DTYPE>(((const u16*)p.logits)[idx]);
            }
        }
    } else {
        // logits = x W_r^T + b_r, fp32: each lane takes 8 consecutive hidden elements per step.
        const u16* xr = (const u16*)p.x + (long long)t * p.x_stride;
        for (int e = 0; e < p.E; ++e) {
            const u16* wr = (const u16*)p.router_w + (long long)e * p.H;
            float acc = 0.0f;
            for (int h = lane * 8; h < p.H; h += 256) {
                const u32x4 xa = ld_global_nc_16(xr + h);
                const u32x4 wa = ld_global_nc_16(wr + h);
                const u32 xs[4] = {xa.x, xa.y, xa.z, xa.w};
                const u32 ws[4] = {wa.x, wa.y, wa.z, wa.w};
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    acc += half_to_f32<DTYPE>((u16)(xs[q] & 0xffffu)) *
                           half_to_f32<DTYPE>((u16)(ws[q] & 0xffffu));
                    acc += half_to_f32<DTYPE>((u16)(xs[q] >> 16)) *
                           half_to_f32<DTYPE>((u16)(ws[q] >> 16));
                }
            }
            acc = warp_sum(acc);
            if (p.router_b) acc += ((const float*)p.router_b)[e];
#pragma unroll
            for (int j = 0; j < 8; ++j)
                if (lane + 32 * j == e) v[j] = acc;
        }
    }
    warp_topk_softmax(p, v, ids, wts);
}

// Token t's routing into the workspace.
template <int DTYPE>
__device__ __forceinline__ void route_token_ws(const MoeParams& p, int t) {
    route_token<DTYPE>(p, t, (int*)p.ws_ids + (long long)t * p.topk,
                       (float*)p.ws_wts + (long long)t * p.topk);
}

// Large T: grid (ceil(T / 8)), block 256, one warp per token.
template <int DTYPE>
__device__ void moe_route(const MoeParams& p) {
    const int t = blockIdx.x * 8 + (threadIdx.x >> 5);
    if (t >= p.T) return;
    route_token_ws<DTYPE>(p, t);
}

// ---------------------------------------------------------------------------------------------
// Router logits for small T: grid (E, ceil(T / ROUTER_TOKENS)), ROUTER_WARPS warps. A block
// issues all its loads before it uses any (its expert's router row, 5.6 KB, and its tokens'
// activations): one L2/DRAM round trip is then the whole cost, where a loop that loaded the
// activations per 16-byte piece paid one per piece (H100: 4.6 instead of 2.7 us at 4 tokens,
// 10.9 at 16 tokens per block). Few tokens per block keep those loads in registers; more
// tokens take more blocks (the row is re-read from L2). The warps' sums meet in shared memory
// in warp order, so the result does not depend on timing. Writes logits (act dtype, or f32
// with logits_f32) = fp32 sum + bias. H % 8 == 0, H <= 8 * ROUTER_PIECES * 32 * ROUTER_WARPS
// (4096), 16-byte aligned rows (checked by the launcher).
// ---------------------------------------------------------------------------------------------
#define ROUTER_WARPS 4
#define ROUTER_TOKENS 4
#define ROUTER_PIECES 4  // 16-byte pieces of a row per thread: H <= 4096

// acc += dot(8 weights, 8 activations), both as 4 words of two halves.
template <int DTYPE>
__device__ __forceinline__ float dot8_half(const u32x4& a, const u32x4& b, float acc) {
    const u32 aw[4] = {a.x, a.y, a.z, a.w}, bw[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        acc = fmaf(half_to_f32<DTYPE>((u16)(aw[i] & 0xffffu)), half_to_f32<DTYPE>((u16)(bw[i] & 0xffffu)), acc);
        acc = fmaf(half_to_f32<DTYPE>((u16)(aw[i] >> 16)), half_to_f32<DTYPE>((u16)(bw[i] >> 16)), acc);
    }
    return acc;
}

// Expert e's partial sums for tokens t0 .. t0 + nt by the 128 threads sub = 0 .. 127 of one
// group (a whole block in moe_router, a quarter of one in moe_router_topk): part[warp][t], to
// be read after a barrier by router_logit. Both kernels share it, so their logits are the
// same bits.
template <int DTYPE>
__device__ __forceinline__ void router_partials(const MoeParams& p, int e, int t0, int nt, int sub,
                                                float (*part)[ROUTER_TOKENS]) {
    constexpr int THREADS = ROUTER_WARPS * 32;
    const int warp = sub >> 5, lane = sub & 31;
    const int pieces = p.H / 8;
    const u16* w = (const u16*)p.router_w + (long long)e * p.H;
    const u16* x = (const u16*)p.x + (long long)t0 * p.x_stride;
    u32x4 wv[ROUTER_PIECES], xv[ROUTER_PIECES][ROUTER_TOKENS];
#pragma unroll
    for (int u = 0; u < ROUTER_PIECES; ++u) {
        const int i = sub + u * THREADS;
        wv[u] = ld_nc_16_if(w + 8 * i, i < pieces);
#pragma unroll
        for (int t = 0; t < ROUTER_TOKENS; ++t)
            xv[u][t] = ld_nc_16_if(x + (long long)t * p.x_stride + 8 * i, i < pieces && t < nt);
    }
    float acc[ROUTER_TOKENS];
#pragma unroll
    for (int t = 0; t < ROUTER_TOKENS; ++t) {
        acc[t] = 0.0f;
#pragma unroll
        for (int u = 0; u < ROUTER_PIECES; ++u) acc[t] = dot8_half<DTYPE>(wv[u], xv[u][t], acc[t]);
        const float v = warp_sum(acc[t]);
        if (lane == 0) part[warp][t] = v;
    }
}

// Stores the logit of (token t0 + sub, expert e) from router_partials' sums (warps in order,
// then the bias) and returns it as stored: rounded to the act dtype unless logits_f32, so a
// top-k over the returned values equals one over the stored logits (moe_route's).
template <int DTYPE>
__device__ __forceinline__ float router_logit(const MoeParams& p, int e, int t0, int sub,
                                              const float (*part)[ROUTER_TOKENS]) {
    float sum = 0.0f;
#pragma unroll
    for (int wi = 0; wi < ROUTER_WARPS; ++wi) sum += part[wi][sub];
    if (p.router_b)
        sum += p.router_b_act ? half_to_f32<DTYPE>(((const u16*)p.router_b)[e])
                              : ((const float*)p.router_b)[e];
    const long long idx = (long long)(t0 + sub) * p.E + e;
    if (p.logits_f32) {
        ((float*)p.logits)[idx] = sum;
        return sum;
    }
    const u16 h = f32_to_half<DTYPE>(sum);
    ((u16*)p.logits)[idx] = h;
    return half_to_f32<DTYPE>(h);
}

template <int DTYPE>
__device__ void moe_router(const MoeParams& p) {
    __shared__ float part[ROUTER_WARPS][ROUTER_TOKENS];
    const int e = blockIdx.x, t0 = blockIdx.y * ROUTER_TOKENS;
    const int nt = min(ROUTER_TOKENS, p.T - t0);
    router_partials<DTYPE>(p, e, t0, nt, threadIdx.x, part);
    __syncthreads();
    if ((int)threadIdx.x >= nt) return;
    router_logit<DTYPE>(p, e, t0, threadIdx.x, part);
}

// ---------------------------------------------------------------------------------------------
// Router logits and their top-k in one launch (sm_90): grid (ceil(T / ROUTER_TOKENS),
// ROUTER_TOPK_BLOCKS), thread-block clusters of (1, ROUTER_TOPK_BLOCKS, 1), ROUTER_TOPK_GROUPS
// groups of 128 threads per block. Group g of block y computes expert 4 y + g exactly as
// moe_router's block does (the same logits, written to p.logits), then stores its tokens'
// logits into block 0's shared memory (distributed shared memory); after the cluster barrier,
// block 0 routes each token with one warp, by ranks, with warp_topk_softmax's selection and
// softmax (which moe_route runs over the stored logits) into ws_ids / ws_wts [T, topk]. This
// replaces vLLM's top-k launch after the router: the logits never leave the chip for the top-k.
// E <= ROUTER_TOPK_MAX_EXPERTS (the launcher checks; larger routers take moe_router +
// moe_route).
// ---------------------------------------------------------------------------------------------
#define ROUTER_TOPK_BLOCKS 8  // blocks per cluster: the portable maximum
#define ROUTER_TOPK_GROUPS 4  // experts per block
#define ROUTER_TOPK_MAX_EXPERTS (ROUTER_TOPK_BLOCKS * ROUTER_TOPK_GROUPS)

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
// A float into another block's shared memory (a shared::cluster address from cluster_map).
__device__ __forceinline__ void st_cluster_f32(u32 addr, float v) {
    asm volatile("st.shared::cluster.f32 [%0], %1;" ::"r"(addr), "f"(v) : "memory");
}

template <int DTYPE>
__device__ void moe_router_topk(const MoeParams& p) {
    __shared__ float part[ROUTER_TOPK_GROUPS][ROUTER_WARPS][ROUTER_TOKENS];
    // Block 0's copy gathers every expert's logits of the block's tokens.
    __shared__ float gathered[ROUTER_TOKENS][ROUTER_TOPK_MAX_EXPERTS];
    const int g = threadIdx.x >> 7, sub = threadIdx.x & 127;
    const int rank = blockIdx.y;  // the cluster spans grid y
    const int e = rank * ROUTER_TOPK_GROUPS + g;
    const int t0 = blockIdx.x * ROUTER_TOKENS, nt = min(ROUTER_TOKENS, p.T - t0);
    if (e < p.E) router_partials<DTYPE>(p, e, t0, nt, sub, part[g]);  // group-uniform
    __syncthreads();
    if (e < p.E && sub < nt) {
        const float v = router_logit<DTYPE>(p, e, t0, sub, part[g]);
        st_cluster_f32(cluster_map(smem_addr(&gathered[sub][e]), 0), v);
    }
    // Release/acquire: block 0 reads every block's stores after this; the other blocks touch
    // no shared memory of theirs that anyone reads, so they may exit right after it.
    cluster_sync_all();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (rank != 0 || warp >= nt) return;
    // Warp `warp` routes token t0 + warp, lane e ranking expert e's logit among the token's E
    // (NaN as -inf, ties to the lower expert: warp_topk_softmax's order) in one parallel step of
    // E broadcast reads, instead of k dependent rounds of 5 shuffle pairs (H200, session 27:
    // 4.70 instead of 4.94 us at one token, against 5.00 for the logits plus vLLM's top-k).
    const float* row = gathered[warp];
    auto logit = [&](int e) -> float {
        const float f = row[e];
        return f != f ? -__int_as_float(0x7f800000) : f;
    };
    __shared__ float sel_v[ROUTER_TOKENS][MOE_MAX_TOPK];
    __shared__ int sel_e[ROUTER_TOKENS][MOE_MAX_TOPK];
    if (lane < p.E) {
        const float v = logit(lane);
        int r = 0;
        for (int j = 0; j < p.E; ++j) {
            const float o = logit(j);
            r += (o > v || (o == v && j < lane)) ? 1 : 0;
        }
        if (r < p.topk) {
            sel_v[warp][r] = v;
            sel_e[warp][r] = lane;
        }
    }
    __syncwarp();
    const long long t = t0 + warp;
    if (lane == 0)
        topk_softmax_store(sel_v[warp], sel_e[warp], p.topk, (int*)p.ws_ids + t * p.topk,
                           (float*)p.ws_wts + t * p.topk);
}
#endif

// ---------------------------------------------------------------------------------------------
// Grouping: one block of 1024 threads (the pair count is at most a few ten thousand, so a single
// block with shared-memory atomics beats a multi-kernel scan and needs no grid synchronisation).
// ---------------------------------------------------------------------------------------------
template <int DTYPE>
__device__ void moe_group(const MoeParams& p) {
    __shared__ int s_count[MOE_MAX_EXPERTS];
    __shared__ int s_off[MOE_MAX_EXPERTS];
    __shared__ int s_cursor[MOE_MAX_EXPERTS];
    __shared__ int s_tile0[MOE_MAX_EXPERTS + 1];
    const int tid = threadIdx.x;
    const int warp = tid >> 5, lane = tid & 31;
    if (p.fuse_route && p.route_mode == MOE_ROUTE_LOGITS) {
        block_route_logits<DTYPE>(p, (int*)p.ws_ids, (float*)p.ws_wts);
    } else if (p.fuse_route && p.route_mode != MOE_ROUTE_GIVEN) {
        for (int t = warp; t < p.T; t += MOE_GROUP_THREADS / 32) route_token_ws<DTYPE>(p, t);
    }
    for (int e = tid; e < MOE_MAX_EXPERTS; e += MOE_GROUP_THREADS) {
        s_count[e] = 0;
        s_cursor[e] = 0;
    }
    __syncthreads();  // also publishes the fused routing's global writes to the whole block
    const int* ids = (const int*)p.ws_ids;
    const int TK = p.T * p.topk;
    for (int i = tid; i < TK; i += MOE_GROUP_THREADS) {
        const int e = ids[i];
        if (e >= 0 && e < p.E) atomicAdd(&s_count[e], 1);
    }
    __syncthreads();
    if (tid == 0) {
        int off = 0, tiles = 0, active = 0;
        for (int e = 0; e < p.E; ++e) {
            const int c = s_count[e];
            const int nt = (c + p.bm - 1) / p.bm;
            s_off[e] = off;
            s_tile0[e] = tiles;
            off += nt * p.bm;
            tiles += nt;
            if (c > 0) ((int*)p.ws_active)[active++] = e;
        }
        s_tile0[p.E] = tiles;
        ((int*)p.ws_meta)[0] = active;
        ((int*)p.ws_meta)[1] = tiles;
    }
    __syncthreads();
    // One warp per expert: counts, offsets, tiles and the -1 padding of its segment.
    for (int e = warp; e < p.E; e += MOE_GROUP_THREADS / 32) {
        const int c = s_count[e];
        const int off = s_off[e];
        if (lane == 0) {
            ((int*)p.ws_counts)[e] = c;
            ((int*)p.ws_offsets)[e] = off;
        }
        for (int i = s_tile0[e] + lane; i < s_tile0[e + 1]; i += 32) {
            ((int*)p.ws_tiles)[2 * i] = e;
            ((int*)p.ws_tiles)[2 * i + 1] = off + (i - s_tile0[e]) * p.bm;
        }
        const int padded = (c + p.bm - 1) / p.bm * p.bm;
        for (int i = c + lane; i < padded; i += 32) ((int*)p.ws_sorted)[off + i] = -1;
    }
    // Scatter. The order inside a segment depends on atomic timing, but every pair's result is
    // computed from its own row only, so outputs are bit-identical from run to run.
    for (int i = tid; i < TK; i += MOE_GROUP_THREADS) {
        const int e = ids[i];
        if (e >= 0 && e < p.E) {
            const int pos = s_off[e] + atomicAdd(&s_cursor[e], 1);
            ((int*)p.ws_sorted)[pos] = i;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Decode regime (T <= 16): two launches, no grouping kernel, no combine kernel.
//
//   moe_dec_up:   grid (I/64, expert slots). Each block routes the T tokens itself into shared
//                 memory (from logits, or reads the given/precomputed top-k), finds the slot-th
//                 touched expert and its tokens; each warp streams 16 rows (8 gate/up pairs) of
//                 that expert's NF4 gate_up once over the full K and writes h[pair] with bias +
//                 SwiGLU-OAI. Block (0, 0) also stores the routing for moe_dec_down.
//   moe_dec_down: grid (H/16 row groups). Each block loops over every touched expert (ascending)
//                 and accumulates y[t] = sum_e w[t,e] (W_e h[pair(t,e)] + b_e) in registers with
//                 tokens as mma columns, then writes y: the combine is fused and its order fixed.
//
// Both use mma.sync with A = 16 NF4 weight rows decoded in registers and B = activations with
// tokens as columns (fragment layout: see dec_mma_chunk). Each warp keeps the
// loads of its next DEC_DEPTH chunks in flight (dec_stream). moe_dec_down has only H/16 row
// groups, so it also splits K over its warps and reduces their sums in a fixed order.
// ---------------------------------------------------------------------------------------------
#define DEC_WARPS 8
#define DEC_MAX_PAIRS 128 // T * topk of the decode regime (T <= 16, topk <= 8)

struct DecShared {
    // NF4 code pairs: lut2[b * 32 + lane] = (NF4[b >> 4], NF4[b & 15]) as two halves, one copy
    // per lane so that 32 lanes looking up 32 random bytes hit 32 different banks.
    u32 lut2[256 * 32];
    float nmap[256];
    u32 mask[MOE_MAX_EXPERTS / 32];  // touched experts
    int ids[DEC_MAX_PAIRS];
    float wts[DEC_MAX_PAIRS];
    int experts[MOE_MAX_EXPERTS];  // touched experts, ascending
    int mult[MOE_MAX_EXPERTS];     // most times one token chose experts[i] (1 unless ids repeat)
    int n_experts;
    int pairs[DEC_MAX_PAIRS];      // up: pairs of the block's expert; down: (expert, repeat) list
    int n_pairs;
    float red[DEC_WARPS * 2 * 4 * 32];  // split-K partial sums
};

// A thread's routing entry (ids/wts element threadIdx.x), loaded at kernel entry so that its
// L2 round trip overlaps the table build instead of following it (the loads sit behind shared
// stores the compiler may not move them over). `valid`: dec_route reads these instead of the
// workspace (routing read from ws_ids/ws_wts, and T * topk <= blockDim.x).
struct RoutePrefetch {
    int id = -1;
    float wt = 0.0f;
    bool valid = false;
};

__device__ __forceinline__ RoutePrefetch dec_route_prefetch(const MoeParams& p, bool from_ws,
                                                            bool routes) {
    RoutePrefetch r;
    const int TK = p.T * p.topk;
    r.valid = routes && (p.route_mode != MOE_ROUTE_LOGITS || from_ws) && TK <= (int)blockDim.x;
    const bool mine = r.valid && (int)threadIdx.x < TK;
    r.id = (int)ld_nc_b32_if((const u32*)p.ws_ids + threadIdx.x, mine);
    r.wt = ld_nc_f32_if((const float*)p.ws_wts + threadIdx.x, mine);
    return r;
}

// Where dec_route keeps an expert's repetition count: DecShared has room for it; the streaming
// kernels' StrShared does not (they never ask, need_mult = false), and the kilobyte it saves
// lets a block of the two-tile kernels stage 8 activation columns instead of 7 on the H100.
struct StrShared;
template <class Sh>
__device__ __forceinline__ void dec_store_mult(Sh& sh, int xi, int most) { sh.mult[xi] = most; }
__device__ __forceinline__ void dec_store_mult(StrShared&, int, int) {}

// Routing of the T (<= 16) decode tokens into shared memory, plus the ascending list of touched
// experts. From logits when route_mode is LOGITS and not `from_ws` (then `store` writes it to
// the workspace for the later kernels), else from ws_ids/ws_wts (given by the caller, written
// by moe_route, or stored by an earlier kernel of the same forward: `from_ws`), or from `pre`
// when the caller loaded them at entry (dec_route_prefetch with the same `from_ws`).
template <int DTYPE, class Sh>
__device__ void dec_route(const MoeParams& p, Sh& sh, bool store, bool need_mult,
                          bool from_ws = false, RoutePrefetch pre = RoutePrefetch{}) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int TK = p.T * p.topk;
    if (threadIdx.x < MOE_MAX_EXPERTS / 32) sh.mask[threadIdx.x] = 0u;
    if (p.route_mode == MOE_ROUTE_LOGITS && !from_ws) {
        block_route_logits<DTYPE>(p, sh.ids, sh.wts);
    } else if (pre.valid) {
        if ((int)threadIdx.x < TK) {
            sh.ids[threadIdx.x] = pre.id;
            sh.wts[threadIdx.x] = pre.wt;
        }
    } else {
        for (int i = threadIdx.x; i < TK; i += blockDim.x) {
            sh.ids[i] = ((const int*)p.ws_ids)[i];
            sh.wts[i] = ((const float*)p.ws_wts)[i];
        }
    }
    __syncthreads();
    if (store && p.route_mode == MOE_ROUTE_LOGITS) {
        for (int i = threadIdx.x; i < TK; i += blockDim.x) {
            ((int*)p.ws_ids)[i] = sh.ids[i];
            ((float*)p.ws_wts)[i] = sh.wts[i];
        }
    }
    for (int i = threadIdx.x; i < TK; i += blockDim.x) {
        const int e = sh.ids[i];
        if (e >= 0 && e < p.E) atomicOr(&sh.mask[e >> 5], 1u << (e & 31));
    }
    __syncthreads();
    if (warp == 0) {
        // Ascending distinct experts: lane l owns bit l of each mask word; popc ranks them.
        int base = 0;
        for (int e0 = 0; e0 < p.E; e0 += 32) {
            const u32 m = sh.mask[e0 >> 5];
            if ((m >> lane) & 1u) sh.experts[base + __popc(m & ((1u << lane) - 1u))] = e0 + lane;
            base += __popc(m);
        }
        if (lane == 0) sh.n_experts = base;
        // Repeated ids within a token (never produced by a router, possible in given routing)
        // make moe_dec_down run one pass per repetition.
        for (int xi = lane; need_mult && xi < base; xi += 32) {
            const int e = sh.experts[xi];
            int most = 1;
            for (int t = 0; t < p.T; ++t) {
                int n = 0;
                for (int k = 0; k < p.topk; ++k) n += sh.ids[t * p.topk + k] == e;
                most = n > most ? n : most;
            }
            dec_store_mult(sh, xi, most);
        }
    }
    __syncthreads();
}

// The (token, k) pairs routed to expert e, ascending, into sh.pairs (ballot compaction by warp
// 0, 32 pairs per step); returns their count. Every thread of the block must call it.
template <class Sh>
__device__ __forceinline__ int dec_expert_pairs(const MoeParams& p, Sh& sh, int e) {
    if (threadIdx.x < 32) {
        const int lane = threadIdx.x;
        int n = 0;
        for (int i0 = 0; i0 < p.T * p.topk; i0 += 32) {
            const bool hit = i0 + lane < p.T * p.topk && sh.ids[i0 + lane] == e;
            const u32 m = __ballot_sync(0xffffffffu, hit);
            if (hit) sh.pairs[n + __popc(m & ((1u << lane) - 1u))] = i0 + lane;
            n += __popc(m);
        }
        if (lane == 0) sh.n_pairs = n;
    }
    __syncthreads();
    return sh.n_pairs;
}

// Prologue of the gate_up decode kernels (after the tables): routing (block (0, 0) stores it
// for the down kernel), the expert of slot blockIdx.y (-1 if fewer experts were touched) and,
// in `cnt`, the number of its routed pairs (listed in sh.pairs).
template <int DTYPE>
__device__ __forceinline__ int dec_up_expert(const MoeParams& p, DecShared& sh, int& cnt) {
    dec_route<DTYPE>(p, sh, blockIdx.x == 0 && blockIdx.y == 0, false);
    cnt = 0;
    if ((int)blockIdx.y >= sh.n_experts) return -1;
    const int e = sh.experts[blockIdx.y];
    cnt = dec_expert_pairs(p, sh, e);
    return e;
}

// Prologue of the down decode kernels (after the tables): the routing (recomputed from the
// logits, or read from the workspace where the gate_up kernel stored it) and the list of
// (expert index, repetition) items, in order, in sh.pairs / sh.n_pairs.
template <int DTYPE>
__device__ __forceinline__ void dec_down_items(const MoeParams& p, DecShared& sh) {
    dec_route<DTYPE>(p, sh, false, true);
    if (threadIdx.x == 0) {
        int n = 0;
        for (int xi = 0; xi < sh.n_experts; ++xi)
            for (int r = 0; r < sh.mult[xi] && n < DEC_MAX_PAIRS; ++r) sh.pairs[n++] = xi * 16 + r;
        sh.n_pairs = n;
    }
    __syncthreads();
}

// Sums acc over the block's warps in warp order (deterministic); the result lands in warp 0.
__device__ __forceinline__ void dec_reduce(DecShared& sh, float (&acc)[2][4]) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int q = 0; q < 4; ++q) sh.red[((warp * 2 + nt) * 4 + q) * 32 + lane] = acc[nt][q];
    __syncthreads();
    if (warp == 0) {
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                float v = 0.0f;
                for (int w = 0; w < DEC_WARPS; ++w) v += sh.red[((w * 2 + nt) * 4 + q) * 32 + lane];
                acc[nt][q] = v;
            }
    }
    __syncthreads();
}

// Fills the per-lane NF4 pair table (all warps; each warp writes whole 128-byte rows).
template <int DTYPE>
__device__ __forceinline__ void dec_tables(DecShared& sh, u64 nested_map) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const float gamma = dec_gamma<DTYPE>();
    for (int b = warp; b < 256; b += DEC_WARPS)
        sh.lut2[b * 32 + lane] =
            pack_half2<DTYPE>(gamma * kNf4Code[b >> 4], gamma * kNf4Code[b & 15]);
    if (nested_map)
        for (int i = threadIdx.x; i < 256; i += blockDim.x) sh.nmap[i] = ((const float*)nested_map)[i];
}

// Software-pipelined streaming of the 128-wide k chunks of one 16-row group: the loads of the
// next DEC_DEPTH chunks are in flight while the current one is decoded and multiplied.
//
// Fragment layout. mma.sync m16n8k16, A = 16 weight rows x 16 k, B = 16 k x 8 tokens. A dot
// product does not care in which order k is summed, so within a 128-k chunk thread (g, c) owns
// the 32 consecutive k [32c, 32c + 32) of rows g and g+8 (one 16-byte load per row, inside one
// 64-element absmax block), and k-step s (0..7) maps its fragment slots {2c, 2c+1, 2c+8, 2c+9}
// to k 32c + 4s + {0, 1, 2, 3}. B uses the same map: thread (g, c) reads the 32 activations of
// token column g at [32c, 32c + 32) (four 16-byte loads). A weight pair costs one lookup in a
// per-lane table of gamma-scaled code pairs and one packed multiply by (absmax / gamma) in the
// activation type: the code, the scale and the product are each rounded once (bf16: within
// ~2 ulp of the exact dequantized weight, with no bias, see DEC_GAMMA_BF16).
#define DEC_DEPTH 4

struct DecChunk {
    const u8* w0;        // weight row of fragment row g (expert-offset)
    const u8* w1;        // weight row of fragment row g+8
    long long ab0, ab1;  // first absmax block of rows g, g+8 (expert-relative)
    int k0;              // first k of this thread's 32
    bool ok0, ok1;       // rows exist
    bool kv;             // k0 < K (false only in a row's last, half-filled chunk)
};
struct DecLoaded {
    u32x4 w0, w1;
    Nf4RawAbsmax a0, a1;
};

__device__ __forceinline__ DecLoaded dec_load(const DecChunk& d, const Nf4Stats& st) {
    DecLoaded l;
    const u32x4 z = {0u, 0u, 0u, 0u};
    Nf4RawAbsmax zr;
    zr.raw = 0u;
    zr.scale = 0.0f;
    l.w0 = (d.kv && d.ok0) ? ld_global_stream_16(d.w0 + d.k0 / 2) : z;
    l.w1 = (d.kv && d.ok1) ? ld_global_stream_16(d.w1 + d.k0 / 2) : z;
    l.a0 = (d.kv && d.ok0) ? nf4_absmax_load(st, d.ab0 + d.k0 / 64) : zr;
    l.a1 = (d.kv && d.ok1) ? nf4_absmax_load(st, d.ab1 + d.k0 / 64) : zr;
    return l;
}

// Packed product of two pairs of halves, round to nearest. bf16x2 has no plain multiply before
// sm_90, so it is an fma with -0 (which keeps the sign of an exact zero product).
template <int DTYPE>
__device__ __forceinline__ u32 hmul2(u32 a, u32 b) {
    u32 d;
    if (DTYPE == DTYPE_BF16) {
        asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(0x80008000u));
    } else {
        asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    }
    return d;
}

// Two weights from the packed byte at bits [sh, sh+8) of w.
template <int DTYPE>
__device__ __forceinline__ u32 dec_pair(u32 w, int sh, u32 scale2, const u32* lut_lane) {
    return hmul2<DTYPE>(lut_lane[((w >> sh) & 0xffu) * 32], scale2);
}

// acc[nt] += W(chunk) x B(chunk, tile nt). src[nt]: activations of this thread's token column
// of tile nt (nullptr = zero column).
template <int DTYPE>
__device__ __forceinline__ void dec_mma_chunk(const DecChunk& d, const DecLoaded& l,
                                              const Nf4Stats& st, const u16* src0,
                                              const u16* src1, bool two, const DecShared& sh,
                                              float (&acc)[2][4]) {
    const float inv_gamma = 1.0f / dec_gamma<DTYPE>();  // compile-time constant
    const float am0 = (d.ok0 && d.kv) ? nf4_absmax_finish(st, l.a0, sh.nmap) * inv_gamma : 0.0f;
    const float am1 = (d.ok1 && d.kv) ? nf4_absmax_finish(st, l.a1, sh.nmap) * inv_gamma : 0.0f;
    const u32 s0 = pack_half2<DTYPE>(am0, am0), s1 = pack_half2<DTYPE>(am1, am1);
    const u32* lut = sh.lut2 + (threadIdx.x & 31);
    const u32 r0w[4] = {l.w0.x, l.w0.y, l.w0.z, l.w0.w};
    const u32 r1w[4] = {l.w1.x, l.w1.y, l.w1.z, l.w1.w};
    const bool x0 = src0 && d.kv, x1 = src1 && d.kv && two;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        // 8 activations (16 bytes) per token column = k-steps 2q and 2q+1.
        // Predicated inside the asm: src1 may be null (one column), and a plain `x1 ? load : z`
        // lets the compiler hoist the non-volatile load above its test.
        const u32x4 v0 = ld_nc_16_if(src0 + d.k0 + 8 * q, x0);
        const u32x4 v1 = ld_nc_16_if(src1 + d.k0 + 8 * q, x1);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int shf = h * 16;
            u32 a[4];
            a[0] = dec_pair<DTYPE>(r0w[q], shf, s0, lut);
            a[1] = dec_pair<DTYPE>(r1w[q], shf, s1, lut);
            a[2] = dec_pair<DTYPE>(r0w[q], shf + 8, s0, lut);
            a[3] = dec_pair<DTYPE>(r1w[q], shf + 8, s1, lut);
            const u32 b0[2] = {h ? v0.z : v0.x, h ? v0.w : v0.y};
            mma_m16n8k16<DTYPE>(acc[0], a, b0);
            if (two) {
                const u32 b1[2] = {h ? v1.z : v1.x, h ? v1.w : v1.y};
                mma_m16n8k16<DTYPE>(acc[1], a, b1);
            }
        }
    }
}

// Runs the pipeline over chunks 0 .. n-1 of the warp's stream (n warp-uniform).
template <class Desc, class Stats, class Compute>
__device__ __forceinline__ void dec_stream(int n, Desc desc, Stats stats, Compute compute) {
    DecLoaded ring[DEC_DEPTH];
#pragma unroll
    for (int u = 0; u < DEC_DEPTH; ++u)
        if (u < n) ring[u] = dec_load(desc(u), stats(u));
    for (int i0 = 0; i0 < n; i0 += DEC_DEPTH) {
#pragma unroll
        for (int u = 0; u < DEC_DEPTH; ++u) {
            const int i = i0 + u;
            if (i < n) {
                const DecLoaded cur = ring[u];
                if (i + DEC_DEPTH < n) ring[u] = dec_load(desc(i + DEC_DEPTH), stats(i + DEC_DEPTH));
                compute(i, cur);
            }
        }
    }
}

// moe_dec_up: grid (ceil(I / 64), expert slots), DEC_WARPS warps; warp w streams the full K of
// its own 16 rows = gate/up pairs 8 (8 bx + w) ... + 7 of the block's expert, so no reduction.
template <int DTYPE>
__device__ void moe_dec_up(const MoeParams& p) {
    __shared__ DecShared sh;
    dec_tables<DTYPE>(sh, p.nested_map);
    int cnt;
    const int e = dec_up_expert<DTYPE>(p, sh, cnt);
    if (e < 0) return;  // block-uniform: no expert in this slot

    const int N = 2 * p.I, K = p.H;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, c = lane & 3;
    const int pair0 = 8 * (blockIdx.x * DEC_WARPS + warp);  // first gate/up pair of the warp
    if (pair0 >= p.I) return;
    // Fragment row g = gate row 2(pair0 + g), row g+8 = the matching up row: the SwiGLU pair
    // lands in one thread.
    const int row0 = 2 * (pair0 + g), row1 = row0 + 1;
    DecChunk d;
    const long long ee = e;
    const u8* packed = (const u8*)p.gu_packed + ee * ((long long)N * K / 2);
    const Nf4Stats st = nf4_stats(p.gu_absmax, p.gu_nested, p.gu_offset, p.gu_nested_flag,
                                  p.gu_nnb, ee, (long long)N * K / 64);
    d.w0 = packed + (long long)row0 * (K / 2);
    d.w1 = packed + (long long)row1 * (K / 2);
    d.ab0 = (long long)row0 * (K / 64);
    d.ab1 = (long long)row1 * (K / 64);
    d.ok0 = row0 < N;
    d.ok1 = row1 < N;
    const float* bias = (const float*)p.gu_bias + ee * N;
    const int nchunks = (K + 127) / 128;

    for (int p0 = 0; p0 < cnt; p0 += 16) {
        const bool two = cnt - p0 > 8;
        const u16* src[2];
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
            const int m = p0 + nt * 8 + g;
            src[nt] = m < cnt ? (const u16*)p.x + (long long)(sh.pairs[m] / p.topk) * p.x_stride
                              : nullptr;
        }
        float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
        auto desc = [&](int i) {
            DecChunk di = d;
            di.k0 = i * 128 + 32 * c;
            di.kv = di.k0 < K;
            return di;
        };
        auto stats = [&](int) { return st; };
        auto compute = [&](int i, const DecLoaded& l) {
            dec_mma_chunk<DTYPE>(desc(i), l, st, src[0], src[1], two, sh, acc);
        };
        dec_stream(nchunks, desc, stats, compute);
        if (d.ok0) {
            // acc[nt] = {(gate, column 2c), (gate, 2c+1), (up, 2c), (up, 2c+1)}.
            const float bg = bias[row0], bu = d.ok1 ? bias[row1] : 0.0f;
#pragma unroll
            for (int nt = 0; nt < 2; ++nt)
#pragma unroll
                for (int q = 0; q < 2; ++q) {
                    const int m = p0 + nt * 8 + 2 * c + q;
                    if (m >= cnt) continue;
                    const float h = swiglu_oai(acc[nt][q] + bg, acc[nt][2 + q] + bu);
                    ((u16*)p.ws_h)[(long long)sh.pairs[m] * p.I + (row0 >> 1)] = f32_to_half<DTYPE>(h);
                }
        }
    }
}

// The rep-th (token t, expert e) pair and its weight, or -1 / 0 when t did not choose e rep+1 times.
__device__ __forceinline__ int dec_pair_of(const MoeParams& p, const DecShared& sh, int t, int e,
                                           int rep, float* w) {
    if (t < p.T)
        for (int k = 0, seen = 0; k < p.topk; ++k)
            if (sh.ids[t * p.topk + k] == e && seen++ == rep) {
                *w = sh.wts[t * p.topk + k];
                return t * p.topk + k;
            }
    *w = 0.0f;
    return -1;
}

// moe_dec_down: grid (ceil(H / 16)), DEC_WARPS warps splitting K; every warp streams its k
// chunks of the block's 16 rows for every touched expert (one pipeline over expert x chunk) and
// accumulates w[t,e] (W_e h + b_e) per token column; the warps' sums are reduced in warp order.
template <int DTYPE>
__device__ void moe_dec_down(const MoeParams& p) {
    __shared__ DecShared sh;
    dec_tables<DTYPE>(sh, p.nested_map);
    dec_down_items<DTYPE>(p, sh);

    const int N = p.H, K = p.I;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, c = lane & 3;
    const int row0 = 16 * blockIdx.x + g, row1 = row0 + 8;
    const bool two = p.T > 8;
    const int nchunks = (K + 127) / 128;
    const int cpw = (nchunks + DEC_WARPS - 1) / DEC_WARPS;  // chunk slots per warp and expert
    const long long estride = (long long)N * K / 2, bstride = (long long)N * K / 64;

    auto expert_of = [&](int i) { return sh.experts[sh.pairs[i / cpw] >> 4]; };
    auto desc = [&](int i) {
        const long long ee = expert_of(i);
        const u8* packed = (const u8*)p.dn_packed + ee * estride;
        DecChunk di;
        di.w0 = packed + (long long)row0 * (K / 2);
        di.w1 = packed + (long long)row1 * (K / 2);
        di.ab0 = (long long)row0 * (K / 64);
        di.ab1 = (long long)row1 * (K / 64);
        di.ok0 = row0 < N;
        di.ok1 = row1 < N;
        // Chunk slots past the row end (nchunks % DEC_WARPS != 0) load nothing and are skipped.
        di.k0 = (warp + DEC_WARPS * (i % cpw)) * 128 + 32 * c;
        di.kv = di.k0 < K;
        return di;
    };
    auto stats = [&](int i) {
        return nf4_stats(p.dn_absmax, p.dn_nested, p.dn_offset, p.dn_nested_flag, p.dn_nnb,
                         expert_of(i), bstride);
    };

    float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
    float part[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
    const u16* src[2] = {nullptr, nullptr};
    auto compute = [&](int i, const DecLoaded& l) {
        const int item = sh.pairs[i / cpw];
        const int e = sh.experts[item >> 4], rep = item & 15;
        if (i % cpw == 0) {
            // New expert: B column g of tile nt = h of the rep-th pair (token 8 nt + g, e).
#pragma unroll
            for (int nt = 0; nt < 2; ++nt) {
                float w;
                const int pr = dec_pair_of(p, sh, nt * 8 + g, e, rep, &w);
                src[nt] = pr >= 0 ? (const u16*)p.ws_h + (long long)pr * p.I : nullptr;
            }
        }
        const DecChunk di = desc(i);
        if (warp + DEC_WARPS * (i % cpw) < nchunks)  // warp-uniform: chunk exists
            dec_mma_chunk<DTYPE>(di, l, stats(i), src[0], src[1], two, sh, part);
        if (i % cpw == cpw - 1) {
            // Expert done: weight w[t, e] per output column (0 if t did not choose e); warp 0
            // adds the bias there, so each (token, expert) adds w (W_e h + b_e) exactly once.
            const float* bias = (const float*)p.dn_bias + (long long)e * N;
            const float b0 = (warp == 0 && row0 < N) ? bias[row0] : 0.0f;
            const float b1 = (warp == 0 && row1 < N) ? bias[row1] : 0.0f;
#pragma unroll
            for (int nt = 0; nt < 2; ++nt)
#pragma unroll
                for (int q = 0; q < 2; ++q) {
                    float w;
                    dec_pair_of(p, sh, nt * 8 + 2 * c + q, e, rep, &w);
                    acc[nt][q] += w * (part[nt][q] + b0);
                    acc[nt][2 + q] += w * (part[nt][2 + q] + b1);
                    part[nt][q] = 0.0f;
                    part[nt][2 + q] = 0.0f;
                }
        }
    };
    dec_stream(sh.n_pairs * cpw, desc, stats, compute);
    dec_reduce(sh, acc);
    if (warp == 0) {
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
            for (int q = 0; q < 2; ++q) {
                const int t = nt * 8 + 2 * c + q;
                if (t >= p.T) continue;
                u16* y = (u16*)p.y + (long long)t * p.H;
                if (row0 < N) y[row0] = f32_to_half<DTYPE>(acc[nt][q]);
                if (row1 < N) y[row1] = f32_to_half<DTYPE>(acc[nt][2 + q]);
            }
    }
}

// ---------------------------------------------------------------------------------------------
// Decode regime, lean variant (moe_dec2_up / moe_dec2_down): the same grids, routing, fragment
// roles and results as moe_dec_up / moe_dec_down, with an inner loop built for instruction
// count. ncu on the H100 showed the first variant issue-bound (about 14 instructions per weight
// pair, DRAM at 22%). Here:
//  - lane c owns k [64h + 16c, 64h + 16c + 16) of block h of a 128-k chunk, so each mma k16
//    step stays inside one 64-element absmax block and the absmax scales the fp32 result of
//    that block (4 FFMA per block) instead of every weight pair;
//  - lane c finishes the statistic of (row g + 8 (c >> 1), block c & 1) and two shuffles hand
//    each lane the two it needs;
//  - a pair lookup is one shift, one LOP3 (mask and lane offset together) and one LDS;
//  - the ring of in-flight loads has compile-time slots, refilled right after use (no register
//    copies), and one- and two-token-tile variants are separate instantiations.
// The numerics equal the first variant's except that the absmax multiplies in fp32.
// ---------------------------------------------------------------------------------------------
#define DEC2_DEPTH 4

// One chunk's raw loads for one lane.
struct Dec2Slot {
    u32 w0[4];    // row g: bytes [8c, 8c + 8) of block 0, then of block 1
    u32 w1[4];    // row g + 8: the same bytes
    u32 am_raw;   // the lane's statistic: u8 code (nested) or f32 bits
    float am_scale;  // its nested absmax (nested only)
    float am_off;    // its nested offset (nested only)
};

// Where one lane's 16-row group of one expert's weight lives.
struct Dec2Rows {
    const u8* w0;     // row g, byte 8c
    const u8* w1;     // row g + 8, byte 8c
    const u8* amb;    // statistics of the expert: u8 codes (nested) or f32 (plain)
    const float* nested;  // nested absmax of the expert (nested only)
    float offset;     // nested offset of the expert
    long long ab;     // block index of this lane's statistic: row (g or g + 8) * nkb + (c & 1)
    bool ok0, ok1, oka;  // row g, row g + 8, this lane's statistic row exist
};

template <bool ROWS8 = false>
__device__ __forceinline__ void dec2_load(const Dec2Rows& r, int chunk, int nkb, bool nested,
                                          Dec2Slot& s) {
    const int b0 = 2 * chunk;
    const bool second = b0 + 1 < nkb;  // warp-uniform: the chunk's second block exists
    const long long off = 64LL * chunk;
    const u32x2 a = ld_stream_8_if(r.w0 + off, r.ok0);
    const u32x2 b = ld_stream_8_if(r.w0 + off + 32, r.ok0 && second);
    // ROWS8: no row g + 8 (known at compile time, so its registers are not even allocated).
    const u32x2 z = {0u, 0u};
    const u32x2 c = ROWS8 ? z : ld_stream_8_if(r.w1 + off, r.ok1);
    const u32x2 d = ROWS8 ? z : ld_stream_8_if(r.w1 + off + 32, r.ok1 && second);
    s.w0[0] = a.x; s.w0[1] = a.y; s.w0[2] = b.x; s.w0[3] = b.y;
    s.w1[0] = c.x; s.w1[1] = c.y; s.w1[2] = d.x; s.w1[3] = d.y;
    const long long blk = r.ab + b0;
    const bool oka = r.oka && (b0 + (int)(threadIdx.x & 1)) < nkb;
    s.am_off = r.offset;
    if (nested) {
        s.am_raw = ld_nc_u8_if(r.amb + blk, oka);
        s.am_scale = __uint_as_float(ld_nc_b32_if(r.nested + (blk >> 8), oka));  // 256 per nested block
    } else {
        s.am_raw = ld_nc_b32_if((const float*)r.amb + blk, oka);
        s.am_scale = 0.0f;
    }
}

// The code pair of byte (w >> sh) & 0xff from the lane's replica of the pair table; `lut_lane`
// is the byte address of lut2[lane], entry e sits 128 * e bytes further.
__device__ __forceinline__ u32 dec2_pair(u32 w, int sh, const char* lut_lane) {
    return *(const u32*)(lut_lane + (((w >> sh) & 0xffu) << 7));
}

// acc[nt] += W(chunk) x B(chunk, tile nt), absmax applied per block in fp32.
template <int DTYPE, bool TWO, bool ROWS8 = false>
__device__ __forceinline__ void dec2_compute(const Dec2Slot& s, int chunk, int nkb, bool nested,
                                             const u16* src0, const u16* src1,
                                             const float* nmap, const char* lut_lane,
                                             float (&acc)[2][4]) {
    const int lane = threadIdx.x & 31, c = lane & 3;
    const float inv_gamma = 1.0f / dec_gamma<DTYPE>();  // compile-time constant
    const float am = (nested ? nf4_nested_absmax(nmap[s.am_raw], s.am_scale, s.am_off)
                             : __uint_as_float(s.am_raw)) * inv_gamma;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        if (h == 1 && 2 * chunk + 1 >= nkb) break;  // warp-uniform: odd block count
        // Statistics of (row g, block h) and (row g + 8, block h) live in lanes 4g + h, 4g + 2 + h.
        const float sc0 = __shfl_sync(0xffffffffu, am, (lane & ~3) | h);
        const float sc1 = __shfl_sync(0xffffffffu, am, (lane & ~3) | 2 | h);
        const int k0 = 128 * chunk + 64 * h + 16 * c;
        const u32x4 xa0 = ld_nc_16_if(src0 + k0, src0 != nullptr);
        const u32x4 xa1 = ld_nc_16_if(src0 + k0 + 8, src0 != nullptr);
        u32x4 xb0 = {0u, 0u, 0u, 0u}, xb1 = {0u, 0u, 0u, 0u};
        if (TWO) {
            xb0 = ld_nc_16_if(src1 + k0, src1 != nullptr);
            xb1 = ld_nc_16_if(src1 + k0 + 8, src1 != nullptr);
        }
        const u32 xa[8] = {xa0.x, xa0.y, xa0.z, xa0.w, xa1.x, xa1.y, xa1.z, xa1.w};
        const u32 xb[8] = {xb0.x, xb0.y, xb0.z, xb0.w, xb1.x, xb1.y, xb1.z, xb1.w};
        float d0[4], d1[4];
#pragma unroll
        for (int st = 0; st < 4; ++st) {
            // k = k0 + 4 st + {0, 1 | 2, 3}: bytes 2 st, 2 st + 1 of the block's 8 bytes.
            const u32 r0 = s.w0[2 * h + (st >> 1)], r1 = s.w1[2 * h + (st >> 1)];
            const int sh = (st & 1) * 16;
            // ROWS8: fragment rows g + 8 are zero (an 8-row group), no lookups spent on them.
            const u32 a[4] = {dec2_pair(r0, sh, lut_lane), ROWS8 ? 0u : dec2_pair(r1, sh, lut_lane),
                              dec2_pair(r0, sh + 8, lut_lane),
                              ROWS8 ? 0u : dec2_pair(r1, sh + 8, lut_lane)};
            const u32 b0[2] = {xa[2 * st], xa[2 * st + 1]};
            if (st == 0) mma_zero<DTYPE>(d0, a, b0); else mma_acc<DTYPE>(d0, a, b0);
            if (TWO) {
                const u32 b1[2] = {xb[2 * st], xb[2 * st + 1]};
                if (st == 0) mma_zero<DTYPE>(d1, a, b1); else mma_acc<DTYPE>(d1, a, b1);
            }
        }
        // d: (row g, col 2c), (row g, 2c + 1), (row g + 8, 2c), (row g + 8, 2c + 1).
        acc[0][0] = fmaf(sc0, d0[0], acc[0][0]);
        acc[0][1] = fmaf(sc0, d0[1], acc[0][1]);
        acc[0][2] = fmaf(sc1, d0[2], acc[0][2]);
        acc[0][3] = fmaf(sc1, d0[3], acc[0][3]);
        if (TWO) {
            acc[1][0] = fmaf(sc0, d1[0], acc[1][0]);
            acc[1][1] = fmaf(sc0, d1[1], acc[1][1]);
            acc[1][2] = fmaf(sc1, d1[2], acc[1][2]);
            acc[1][3] = fmaf(sc1, d1[3], acc[1][3]);
        }
    }
}

// Fills the per-lane pair table: thread b computes entry b once and writes its 32 replicas with
// 8 16-byte stores, rotated by b so that the 8 threads of a store phase hit 8 bank groups.
template <int DTYPE, class Sh>
__device__ __forceinline__ void dec2_tables(Sh& sh, u64 nested_map) {
    const int b = threadIdx.x;  // DEC_WARPS * 32 == 256 entries
    const float gamma = dec_gamma<DTYPE>();
    const u32 pair = pack_half2<DTYPE>(gamma * kNf4Code[b >> 4], gamma * kNf4Code[b & 15]);
    u32x4* row = (u32x4*)(sh.lut2 + b * 32);
#pragma unroll
    for (int j = 0; j < 8; ++j) row[(j + b) & 7] = u32x4{pair, pair, pair, pair};
    if (nested_map) sh.nmap[b] = ld_nc_f32((const float*)nested_map + b);
}

// Streams chunks 0 .. n-1 of one row group: DEC2_DEPTH - 1 chunks in flight while one computes.
template <int DTYPE, bool TWO, int DEPTH>
__device__ __forceinline__ void dec2_stream_rows(const Dec2Rows& r, int first, int n, int nkb,
                                                 bool nested, const u16* src0, const u16* src1,
                                                 const DecShared& sh, float (&acc)[2][4]) {
    const char* lut_lane = (const char*)sh.lut2 + 4 * (threadIdx.x & 31);
    Dec2Slot ring[DEPTH];
#pragma unroll
    for (int u = 0; u < DEPTH; ++u)
        if (u < n) dec2_load(r, first + u, nkb, nested, ring[u]);
    for (int i0 = 0; i0 < n; i0 += DEPTH) {
#pragma unroll
        for (int u = 0; u < DEPTH; ++u) {
            const int i = i0 + u;
            if (i < n) {  // warp-uniform
                dec2_compute<DTYPE, TWO>(ring[u], first + i, nkb, nested, src0, src1, sh.nmap,
                                         lut_lane, acc);
                if (i + DEPTH < n) dec2_load(r, first + i + DEPTH, nkb, nested, ring[u]);
            }
        }
    }
}

// Statistics pointers of expert e of one projection (see nf4_stats).
__device__ __forceinline__ void dec2_expert_stats(u64 absmax, u64 nested, u64 offset,
                                                  int is_nested, int nnb, long long e,
                                                  long long blocks_per_expert, Dec2Rows& r) {
    if (is_nested) {
        r.amb = (const u8*)absmax + e * blocks_per_expert;
        r.nested = (const float*)nested + e * (long long)nnb;
        r.offset = __uint_as_float(ld_nc_b32_if((const float*)offset + e, is_nested != 0));
    } else {
        r.amb = (const u8*)absmax + e * blocks_per_expert * 4;
        r.nested = nullptr;
        r.offset = 0.0f;
    }
}

// moe_dec2_up: grid (ceil(I / 32), expert slots). The 8 warps are 4 row groups x 2 halves of
// K (twice the blocks of moe_dec_up, so a single decode token fills the GPU): warp 2 q + s
// streams half s of gate/up pairs 8 (4 bx + q) .. + 7 of the block's expert; the two halves
// meet in shared memory (fixed order) before bias and SwiGLU.
#define DEC2_UP_GROUPS 4
// Blocks per SM the lean decode kernels are compiled for: 3 means at most 80 registers (a few
// spills), so a single-token decode's 360 blocks per kernel fit one wave on an H100. Measured
// (H100, 1 token, 24 layers): 3/3 gives 60 us per layer, 3/2 73 us, 2/2 with depth 5 82 us.
#ifndef DEC2_UP_MIN_BLOCKS
#define DEC2_UP_MIN_BLOCKS 3
#endif
#ifndef DEC2_DOWN_MIN_BLOCKS
#define DEC2_DOWN_MIN_BLOCKS 3
#endif
// Ring depth of the gate_up stream (DEPTH - 1 chunks in flight per warp).
#ifndef DEC2_UP_DEPTH
#define DEC2_UP_DEPTH 3
#endif

template <int DTYPE>
__device__ void moe_dec2_up(const MoeParams& p) {
    __shared__ DecShared sh;
    dec2_tables<DTYPE>(sh, p.nested_map);
    int cnt;
    const int e = dec_up_expert<DTYPE>(p, sh, cnt);
    if (e < 0) return;  // block-uniform: no expert in this slot

    const int N = 2 * p.I, K = p.H;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int group = warp >> 1, half = warp & 1;
    const int g = lane >> 2, c = lane & 3;
    const int pair0 = 8 * (blockIdx.x * DEC2_UP_GROUPS + group);
    const bool active = pair0 < p.I;  // warp-uniform; inactive warps still meet the barriers
    const int row0 = 2 * (pair0 + g), row1 = row0 + 1;  // gate row, its up row
    const int nkb = K / 64, nchunks = (nkb + 1) / 2;
    const int split = (nchunks + 1) / 2;
    const int first = half ? split : 0, n = half ? nchunks - split : split;
    const long long ee = e;
    const u8* packed = (const u8*)p.gu_packed + ee * ((long long)N * K / 2);
    Dec2Rows r;
    r.w0 = packed + (long long)row0 * (K / 2) + 8 * c;
    r.w1 = packed + (long long)row1 * (K / 2) + 8 * c;
    dec2_expert_stats(p.gu_absmax, p.gu_nested, p.gu_offset, p.gu_nested_flag, p.gu_nnb, ee,
                      (long long)N * K / 64, r);
    const int arow = (c >> 1) ? row1 : row0;
    r.ab = (long long)arow * nkb + (c & 1);
    r.ok0 = active && row0 < N;
    r.ok1 = active && row1 < N;
    r.oka = active && arow < N;
    const bool nested = p.gu_nested_flag != 0;
    const float* bias = (const float*)p.gu_bias + ee * N;
    float* red = sh.red + group * (4 * 32);  // the second half's sums of this row group

    // One token tile (8 routed pairs) per pass: an expert with more than 8 of the decode tokens
    // (rare) streams its rows once per 8, which keeps the kernel at 80 registers.
    for (int p0 = 0; p0 < cnt; p0 += 8) {
        const int m = p0 + g;
        const u16* src =
            m < cnt ? (const u16*)p.x + (long long)(sh.pairs[m] / p.topk) * p.x_stride : nullptr;
        float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
        if (active) dec2_stream_rows<DTYPE, false, DEC2_UP_DEPTH>(r, first, n, nkb, nested, src, nullptr, sh, acc);
        if (half) {
#pragma unroll
            for (int q = 0; q < 4; ++q) red[q * 32 + lane] = acc[0][q];
        }
        __syncthreads();
        if (!half && active && r.ok0) {
            const float bg = bias[row0], bu = r.ok1 ? bias[row1] : 0.0f;
#pragma unroll
            for (int q = 0; q < 2; ++q) {
                const int mm = p0 + 2 * c + q;
                if (mm >= cnt) continue;
                const float gate = acc[0][q] + red[q * 32 + lane];
                const float up = acc[0][2 + q] + red[(2 + q) * 32 + lane];
                const float hv = swiglu_oai(gate + bg, up + bu);
                ((u16*)p.ws_h)[(long long)sh.pairs[mm] * p.I + (row0 >> 1)] = f32_to_half<DTYPE>(hv);
            }
        }
        __syncthreads();  // red is reused by the next pass
    }
}

// moe_dec2_down: as moe_dec_down, with 8 output rows per block (grid ceil(H / 8)); the warps
// split K; one pipeline over (expert, repetition) x chunk; combine fused; warp sums reduced in
// warp order.
template <int DTYPE, bool TWO>
__device__ __forceinline__ void moe_dec2_down_body(const MoeParams& p, DecShared& sh) {
    const int N = p.H, K = p.I;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, c = lane & 3;
    // 8 output rows per block (fragment rows g + 8 stay zero): twice the blocks of
    // moe_dec_down, so one decode token keeps every SM streaming.
    const int row0 = 8 * blockIdx.x + g, row1 = N;  // row1: never valid
    const int nkb = K / 64, nchunks = (nkb + 1) / 2;
    const int cpw = (nchunks + DEC_WARPS - 1) / DEC_WARPS;  // chunk slots per warp and expert
    const long long estride = (long long)N * K / 2, bstride = (long long)N * K / 64;
    const bool nested = p.dn_nested_flag != 0;
    const int arow = (c >> 1) ? row1 : row0;
    const long long off0 = (long long)row0 * (K / 2) + 8 * c;
    const long long off1 = (long long)row1 * (K / 2) + 8 * c;
    const char* lut_lane = (const char*)sh.lut2 + 4 * lane;

    // Item i = (pair list entry i / cpw, chunk warp + DEC_WARPS (i % cpw)).
    auto rows_of = [&](int i, int& kc) {
        const int item = sh.pairs[i / cpw];
        const long long ee = sh.experts[item >> 4];
        kc = warp + DEC_WARPS * (i % cpw);
        Dec2Rows r;
        const u8* packed = (const u8*)p.dn_packed + ee * estride;
        r.w0 = packed + off0;
        r.w1 = packed + off1;
        dec2_expert_stats(p.dn_absmax, p.dn_nested, p.dn_offset, p.dn_nested_flag, p.dn_nnb, ee,
                          bstride, r);
        r.ab = (long long)arow * nkb + (c & 1);
        r.ok0 = row0 < N && kc < nchunks;
        r.ok1 = row1 < N && kc < nchunks;
        r.oka = arow < N && kc < nchunks;
        return r;
    };
    const int n = sh.n_pairs * cpw;
    float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
    float part[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
    const u16* src[2] = {nullptr, nullptr};
    Dec2Slot ring[DEC2_DEPTH];
#pragma unroll
    for (int u = 0; u < DEC2_DEPTH; ++u) {
        if (u < n) {
            int kc;
            const Dec2Rows r = rows_of(u, kc);
            dec2_load<true>(r, kc < nchunks ? kc : 0, nkb, nested, ring[u]);
        }
    }
    for (int i0 = 0; i0 < n; i0 += DEC2_DEPTH) {
#pragma unroll
        for (int u = 0; u < DEC2_DEPTH; ++u) {
            const int i = i0 + u;
            if (i >= n) break;  // warp-uniform
            const int item = sh.pairs[i / cpw];
            const int e = sh.experts[item >> 4], rep = item & 15;
            const int j = i % cpw;
            if (j == 0) {
#pragma unroll
                for (int nt = 0; nt < 2; ++nt) {
                    float w;
                    const int pr = dec_pair_of(p, sh, nt * 8 + g, e, rep, &w);
                    src[nt] = pr >= 0 ? (const u16*)p.ws_h + (long long)pr * p.I : nullptr;
                }
            }
            const int kc = warp + DEC_WARPS * j;
            if (kc < nchunks)  // warp-uniform: this warp has a chunk in this slot
                dec2_compute<DTYPE, TWO, true>(ring[u], kc, nkb, nested, src[0], src[1], sh.nmap,
                                               lut_lane, part);
            if (i + DEC2_DEPTH < n) {
                int kn;
                const Dec2Rows r = rows_of(i + DEC2_DEPTH, kn);
                dec2_load<true>(r, kn < nchunks ? kn : 0, nkb, nested, ring[u]);
            }
            if (j == cpw - 1) {
                const float* bias = (const float*)p.dn_bias + (long long)e * N;
                const float b0 = (warp == 0 && row0 < N) ? bias[row0] : 0.0f;
                const float b1 = (warp == 0 && row1 < N) ? bias[row1] : 0.0f;
#pragma unroll
                for (int nt = 0; nt < 2; ++nt)
#pragma unroll
                    for (int q = 0; q < 2; ++q) {
                        float w;
                        dec_pair_of(p, sh, nt * 8 + 2 * c + q, e, rep, &w);
                        acc[nt][q] += w * (part[nt][q] + b0);
                        acc[nt][2 + q] += w * (part[nt][2 + q] + b1);
                        part[nt][q] = 0.0f;
                        part[nt][2 + q] = 0.0f;
                    }
            }
        }
    }
    dec_reduce(sh, acc);
    if (warp == 0) {
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
            for (int q = 0; q < 2; ++q) {
                const int t = nt * 8 + 2 * c + q;
                if (t >= p.T) continue;
                u16* y = (u16*)p.y + (long long)t * p.H;
                if (row0 < N) y[row0] = f32_to_half<DTYPE>(acc[nt][q]);
            }
    }
}

template <int DTYPE>
__device__ void moe_dec2_down(const MoeParams& p) {
    __shared__ DecShared sh;
    dec2_tables<DTYPE>(sh, p.nested_map);
    dec_down_items<DTYPE>(p, sh);
    if (p.T > 8) {
        moe_dec2_down_body<DTYPE, true>(p, sh);
    } else {
        moe_dec2_down_body<DTYPE, false>(p, sh);
    }
}

// ---------------------------------------------------------------------------------------------
// Streaming regime (moe_str_up / moe_str_down), the default up to STREAM_MAX_TOKENS tokens.
//
// The streaming core (per-warp cp.async rings, PRMT lookups, prefetched activations, the K-split
// reduction) lives in common.cuh and is shared with the NF4 linear; this part adds the experts.
//
// One kernel shape serves gate_up and down and every token count up to STREAM_MAX_TOKENS:
//   grid (ceil(N / (16 * 8 / KS)), expert slots), 8 warps = (8 / KS) row groups x KS parts of K;
//   the block's expert and its routed (token, k) pairs come from per-block routing (decode,
//   str_grouped = 0, as moe_dec2) or from moe_group (str_grouped = 1); the pairs are the mma
//   columns, 8 * NT per pass (an expert with more pairs streams its rows once per pass);
//   the KS partial sums meet in shared memory in a fixed order; gate_up writes h[pair] (bias +
//   SwiGLU-OAI), down writes fp32 out[pair] (bias), and moe_combine sums each token's k outputs
//   (one rounding per token, as a fused combine).
// ---------------------------------------------------------------------------------------------
struct StrShared {
    float nmap[256];
    u32 mask[MOE_MAX_EXPERTS / 32];
    int ids[DEC_MAX_PAIRS];
    float wts[DEC_MAX_PAIRS];
    int experts[MOE_MAX_EXPERTS];
    int n_experts;
    int pairs[DEC_MAX_PAIRS];
    int n_pairs;
};

// Memory row of fragment row fr in a 16-row group starting at r0. gate_up: fragment row g is the
// gate row of pair r0 / 2 + g and row g + 8 its up row, so a SwiGLU pair lands in one thread.
template <bool UP>
__device__ __forceinline__ int str_mem_row(int r0, int fr) {
    return UP ? r0 + 2 * (fr & 7) + (fr >> 3) : r0 + fr;
}

// Where a pass's activation columns come from: all staged in shared memory, the first tile's
// staged and the rest global, or all global.
enum StrPassX { STR_PASS_STAGED, STR_PASS_FIRST_STAGED, STR_PASS_GLOBAL };

// str_stream with the activations where `px` says; global reads use XG (STR_X_GLOBAL_NC, or
// STR_X_GLOBAL_CG when they were written earlier in the same launch).
template <int DTYPE, int NT, bool NESTED, int XG, int EXTRA>
__device__ __forceinline__ void moe_str_stream(StrPassX px, const StrLane& l, int jb, int n,
                                               int nkb, float am_off, u8* table, u8* ring,
                                               StrStatsT<EXTRA>& st, const u16* const (&src)[NT],
                                               u32 cols, const float* nmap, float (&acc)[NT][4],
                                               u8* extra) {
    if (px == STR_PASS_STAGED)
        str_stream<DTYPE, NT, NESTED, STR_X_SHARED, EXTRA>(l, jb, n, nkb, am_off, table, ring, st,
                                                           src, cols, nmap, acc, extra);
    else if (NT > 1 && px == STR_PASS_FIRST_STAGED)
        str_stream<DTYPE, NT, NESTED, XG | STR_X_FIRST_SHARED, EXTRA>(
            l, jb, n, nkb, am_off, table, ring, st, src, cols, nmap, acc, extra);
    else
        str_stream<DTYPE, NT, NESTED, XG, EXTRA>(l, jb, n, nkb, am_off, table, ring, st, src,
                                                 cols, nmap, acc, extra);
}

// Compact weight-ring stages (StrStage, common.cuh) of the deep-ring streaming kernels
// (`moe_str_*_n1_deep_*`, ops::moe::deep_ring: one decode token), on sm_90 only: its 228 KB per
// SM hold two blocks with them beside the 64 KB tables. An A100's 164 KB and the 100 KB of
// sm_86/sm_89 do not (there the deep entries equal the plain ones). Their 24 KB of static shared
// memory leave room for three staged activation columns per block, so the kernels that stage
// more (2-40 tokens) keep four stages: H200, session 25, one tile with seven stages against
// four, same call: 1 token 35.8 vs 37.0-37.2 us per layer, 2-4 tokens level, 8-16 tokens 3-4%
// slower, 32 tokens 10% slower.
#ifndef MOE_STR_EXTRA_STAGES
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define MOE_STR_EXTRA_STAGES 3
#else
#define MOE_STR_EXTRA_STAGES 0
#endif
#endif

// The block's compact stages (static shared memory: the host's occupancy queries see it), or
// nullptr without any.
template <int EXTRA>
struct StrExtraRing {
    __device__ __forceinline__ static u8* get() {
        __shared__ __align__(128) u8 ring[STR_WARPS * EXTRA * STR_COMPACT_STAGE];
        return ring;
    }
};
template <>
struct StrExtraRing<0> {
    __device__ __forceinline__ static u8* get() { return nullptr; }
};

// Expert slot y's expert (-1: no expert in that slot), its routed pair count and, grouped, its
// pair list in ws_sorted (else the pairs land in sh.pairs). Block-uniform y: every thread calls.
// With str_pass_items (PASS_ITEMS: the split launches; the host never sets it for the fused
// kernel, which compiles without the branch), slot y is one pass of an expert: tile y of
// moe_group's list, at most bm (one pass's) pairs from the tile's first row.
template <bool PASS_ITEMS>
__device__ __forceinline__ int str_slot_expert(const MoeParams& p, StrShared& sh, int y,
                                               int& cnt, const int*& gpairs) {
    cnt = 0;
    gpairs = nullptr;
    if (PASS_ITEMS && p.str_grouped && p.str_pass_items) {
        if (y >= ((const int*)p.ws_meta)[1]) return -1;
        const int e = ((const int*)p.ws_tiles)[2 * y];
        const int row = ((const int*)p.ws_tiles)[2 * y + 1];
        cnt = min(p.bm, ((const int*)p.ws_counts)[e] - (row - ((const int*)p.ws_offsets)[e]));
        gpairs = (const int*)p.ws_sorted + row;
        return e;
    }
    if (p.str_grouped) {
        if (y >= ((const int*)p.ws_meta)[0]) return -1;
        const int e = ((const int*)p.ws_active)[y];
        cnt = ((const int*)p.ws_counts)[e];
        gpairs = (const int*)p.ws_sorted + ((const int*)p.ws_offsets)[e];
        return e;
    }
    if (y >= sh.n_experts) return -1;
    const int e = sh.experts[y];
    cnt = dec_expert_pairs(p, sh, e);
    return e;
}

// Waits (the whole block) until *ctr reaches `target`: thread 0 spins on an acquire load, and
// the fence and barrier after it order every thread's later reads behind the producers' writes.
__device__ __forceinline__ void block_wait_count(const u32* ctr, u32 target) {
    if (threadIdx.x == 0) {
        while (ld_acquire_gpu(ctr) < target) __nanosleep(64);
        __threadfence();
    }
    __syncthreads();
}

// One work item of a streaming launch: block bx of gx of expert e (cnt routed pairs, listed in
// gpairs or sh.pairs), K split ks, up to xcols staged activation columns. `wait_ctr`: the fused
// kernel's down phase, which primes its weights and then waits until *wait_ctr reaches
// wait_target (the expert's h is complete) before it touches the activations. Block-uniform
// arguments: every thread calls.
template <int DTYPE, bool UP, int NT, bool NESTED, int XG, int EXTRA = 0>
__device__ __forceinline__ void moe_str_item(const MoeParams& p, StrShared& sh, u8* str_smem,
                                             int e, int cnt, const int* gpairs, int bx, int gx,
                                             int ks, int xcols, const u32* wait_ctr,
                                             u32 wait_target) {
    const int N = UP ? 2 * p.I : p.H, K = UP ? p.H : p.I;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, c = lane & 3;
    // The K split is 1, 2, 4 or 8 (src/ops): shifts and masks instead of divisions.
    const int lks = __ffs(ks) - 1;
    const int rg = warp >> lks, kp = warp & (ks - 1);
    // The block's 16-row groups of the expert: an even share of them, [g_lo, g_hi), at most
    // STR_WARPS / ks. The launch gives every expert slot at least the blocks that bound needs,
    // and more when a few experts would otherwise leave SMs unevenly loaded
    // (ops::moe::stream_columns); the rows and their arithmetic are the same either way.
    const int gpe = N / 16;
    const int g_lo = (int)((long long)bx * gpe / gx);
    const int g_hi = (int)((long long)(bx + 1) * gpe / gx);
    const bool active = g_lo + rg < g_hi;  // warp-uniform
    const int r0 = (g_lo + rg) * 16;      // first memory row of the warp's group
    const int nkb = K / 64, nchunks = (nkb + 1) / 2, krow = K / 2;
    const int per = nchunks >> lks, extra = nchunks & (ks - 1);
    const int jb = kp * per + min(kp, extra), n = per + (kp < extra ? 1 : 0);
    const long long ee = e;
    float am_off = 0.0f;
    StrLane l;
    {
        const u8* packed = (const u8*)(UP ? p.gu_packed : p.dn_packed) + ee * ((long long)N * krow);
        // The lane's pieces: fragment rows fr and fr + 8, bytes 16 (lane % 4) .. of each row's
        // 64 bytes of a chunk.
        const int fr = lane >> 2;
#ifdef STR_CHUNK_MAJOR
        // The group's bytes start where its first row's would; inside, fragment row order.
        l.src = packed + (long long)(active ? r0 : 0) * krow + 16 * lane;
#else
        const int mr0 = active ? str_mem_row<UP>(r0, fr) : 0;
        const int mr1 = active ? str_mem_row<UP>(r0, fr + 8) : 0;
        l.src = packed + (long long)mr0 * krow + 16 * (lane & 3);
        l.piece2 = (long long)(mr1 - mr0) * krow;
#endif
        l.dst = str_row_off(fr, (lane >> 1) & 1) + 16 * (lane & 1);
        l.hi = (lane & 2) != 0;
        Dec2Rows r;
        dec2_expert_stats(UP ? p.gu_absmax : p.dn_absmax, UP ? p.gu_nested : p.dn_nested,
                          UP ? p.gu_offset : p.dn_offset, NESTED ? 1 : 0,
                          UP ? p.gu_nnb : p.dn_nnb, ee, (long long)N * nkb, r);
        const int mr = active ? str_mem_row<UP>(r0, lane >> 1) : 0;
        l.blk0 = mr * nkb + (lane & 1);
        l.amb = r.amb + (long long)l.blk0 * (NESTED ? 1 : 4);
        l.nested = r.nested;
        am_off = r.offset;
    }
    u8* ring = str_smem + warp * (STR_DEPTH * STR_STAGE_STRIDE);
    u8* compact = EXTRA ? StrExtraRing<EXTRA>::get() + warp * (EXTRA * STR_COMPACT_STAGE) : nullptr;
    // This lane's two bias values (gate and up of pair r0 / 2 + g, or rows r0 + g and r0 + g + 8),
    // loaded now so that their latency hides under the stream instead of following it. The
    // predicate sits in the load: an inactive warp's rows may lie past the last expert's bias,
    // and an `if (active)` around a non-volatile load does not stop the compiler hoisting it.
    const float* bias = (const float*)(UP ? p.gu_bias : p.dn_bias) + ee * N;
    const float bias0 = ld_nc_f32_if(bias + (UP ? r0 + 2 * g : r0 + g), active);
    const float bias1 = ld_nc_f32_if(bias + (UP ? r0 + 2 * g + 1 : r0 + g + 8), active);

    // The activations of the pair (token, k) m of this expert: the token's x (gate_up) or the
    // pair's h (down).
    auto pair_x = [&](int m) -> const u16* {
        const int pr = gpairs ? gpairs[m] : sh.pairs[m];
        return UP ? (const u16*)p.x + (long long)(pr / p.topk) * p.x_stride
                  : (const u16*)p.ws_h + (long long)pr * p.I;
    };
    u16* xs = (u16*)(str_smem + STR_TABLE_BYTES);  // `xcols` staged columns
    for (int p0 = 0; p0 < cnt; p0 += 8 * NT) {
        // Every warp of the block reads the same columns: a pass that fits stages them in shared
        // memory once, so no activation load of the stream waits on L2 (block-uniform choice).
        const int live = min(cnt - p0, 8 * NT);
        // A two-tile pass with more columns than fit stages its first tile's 8, the second
        // tile reads global memory (block-uniform). H100, session 18, with 8 staged columns
        // instead of 7: 1.03-1.04x at 48-64 tokens, bit-identical.
        StrPassX px = STR_PASS_GLOBAL;
        if (live <= xcols) px = STR_PASS_STAGED;
        else if (NT > 1 && xcols >= 8) px = STR_PASS_FIRST_STAGED;
        const int nstaged = px == STR_PASS_STAGED ? live : px == STR_PASS_FIRST_STAGED ? 8 : 0;
        const bool streams = active && n > 0;  // warp-uniform
        StrStatsT<EXTRA> st;
        if (streams) str_prime<NESTED, EXTRA>(l, jb, n, nkb, ring, st, compact);  // weights first
        if (wait_ctr != nullptr && p0 == 0) block_wait_count(wait_ctr, wait_target);
        if (nstaged > 0) str_stage_x(xs, nstaged, K, [&](int i) { return pair_x(p0 + i); });
        const u16* src[NT];
        u32 cols = 0;  // bit nt: this lane's column of tile nt is a routed pair
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            const int i = nt * 8 + g;
            cols |= (i < live ? 1u : 0u) << nt;
            // Lanes past the last column point at it (staged loads are not predicated).
            src[nt] = i < nstaged || px == STR_PASS_STAGED
                          ? xs + min(i, live - 1) * str_x_stride(K)
                          : pair_x(p0 + min(i, live - 1));
        }
        float acc[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
        if (streams) {
            if (NT == 2 && live <= 8) {
                // A pass of at most 8 columns needs one tile: the one-tile stream's chunk costs
                // fewer instructions (block-uniform branch; H100, session 18: 1.01-1.02x at
                // 64-128 tokens, bit-identical).
                const u16* src1[1] = {src[0]};
                float acc1[1][4] = {{0.0f, 0.0f, 0.0f, 0.0f}};
                moe_str_stream<DTYPE, 1, NESTED, XG, EXTRA>(px, l, jb, n, nkb, am_off, str_smem,
                                                            ring, st, src1, cols & 1u, sh.nmap,
                                                            acc1, compact);
#pragma unroll
                for (int q = 0; q < 4; ++q) acc[0][q] = acc1[0][q];
            } else {
                moe_str_stream<DTYPE, NT, NESTED, XG, EXTRA>(px, l, jb, n, nkb, am_off, str_smem,
                                                             ring, st, src, cols, sh.nmap, acc,
                                                             compact);
            }
        }
        str_reduce<NT>(str_smem, ks, acc);
        // The next pass restages (str_reduce already synced for ks > 1).
        if (nstaged > 0 && ks == 1) __syncthreads();
        if (kp == 0 && active) {
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int q = 0; q < 2; ++q) {
                    const int m = p0 + nt * 8 + 2 * c + q;
                    if (m >= cnt) continue;
                    const long long pr = gpairs ? gpairs[m] : sh.pairs[m];
                    if (UP) {
                        const int jp = r0 / 2 + g;  // gate/up pair: rows 2 jp, 2 jp + 1
                        const float hv = swiglu_oai(acc[nt][q] + bias0, acc[nt][2 + q] + bias1);
                        ((u16*)p.ws_h)[pr * p.I + jp] = f32_to_half<DTYPE>(hv);
                    } else {
                        // fp32, so moe_combine rounds each token's sum once (as a fused combine)
                        float* o = (float*)p.ws_out + pr * p.H;
                        o[r0 + g] = acc[nt][q] + bias0;
                        o[r0 + g + 8] = acc[nt][2 + q] + bias1;
                    }
                }
        }
    }
}

// A token's routing as the combine uses it: every valid k's weight (0 and `ok` false for an
// invalid id or k past topk), loaded before any output so that all k rows' loads are in flight
// together instead of one ids -> out round trip per k.
struct CombineRoute {
    float w[MOE_MAX_TOPK];
    bool ok[MOE_MAX_TOPK];
};

__device__ __forceinline__ CombineRoute combine_route(const MoeParams& p, int t) {
    const int* ids = (const int*)p.ws_ids + (long long)t * p.topk;
    const float* wts = (const float*)p.ws_wts + (long long)t * p.topk;
    CombineRoute r;
#pragma unroll
    for (int k = 0; k < MOE_MAX_TOPK; ++k) {
        // Predicated inside the loads: k past topk must not read past the token's row.
        const bool in_row = k < p.topk;
        const int e = (int)ld_nc_b32_if(ids + k, in_row);
        r.ok[k] = in_row && e >= 0 && e < p.E;
        r.w[k] = ld_nc_f32_if(wts + k, r.ok[k]);
    }
    return r;
}

// y[t, h .. h + 8) = sum_k w[t,k] out[t*topk+k, h .. h + 8) in k order over fp32 outputs (the
// streaming kernels'), rounded once. CG: the outputs were written earlier in the same launch
// (moe_str_fold_combine), so they are read through L2, not the read-only path. One routine for
// moe_combine and the folded combine, so both give the same bits.
template <int DTYPE, bool CG>
__device__ __forceinline__ void combine_piece_f32(const MoeParams& p, const CombineRoute& r, int t,
                                                  int h) {
    const long long row0 = (long long)t * p.topk * p.H + h;
    float acc[8];
#pragma unroll
    for (int q = 0; q < 8; ++q) acc[q] = 0.0f;
    u32x4 v[MOE_MAX_TOPK][2];
#pragma unroll
    for (int k = 0; k < MOE_MAX_TOPK; ++k) {
        const float* row = (const float*)p.ws_out + row0 + (long long)k * p.H;
        v[k][0] = CG ? ld_cg_16_if_volatile(row, r.ok[k]) : ld_nc_16_if(row, r.ok[k]);
        v[k][1] = CG ? ld_cg_16_if_volatile(row + 4, r.ok[k]) : ld_nc_16_if(row + 4, r.ok[k]);
    }
    // In k order, skipping invalid ids: the same sums as one k at a time.
#pragma unroll
    for (int k = 0; k < MOE_MAX_TOPK; ++k) {
        if (!r.ok[k]) continue;
        const u32 vs[8] = {v[k][0].x, v[k][0].y, v[k][0].z, v[k][0].w,
                           v[k][1].x, v[k][1].y, v[k][1].z, v[k][1].w};
#pragma unroll
        for (int q = 0; q < 8; ++q) acc[q] = fmaf(r.w[k], __uint_as_float(vs[q]), acc[q]);
    }
    u32x4 o;
    o.x = pack_half2<DTYPE>(acc[0], acc[1]);
    o.y = pack_half2<DTYPE>(acc[2], acc[3]);
    o.z = pack_half2<DTYPE>(acc[4], acc[5]);
    o.w = pack_half2<DTYPE>(acc[6], acc[7]);
    *(u32x4*)((u16*)p.y + (long long)t * p.H + h) = o;
}

// The combine folded into a split down launch (p.str_fold; ops::moe::fold_combine). Every
// block of grid column bx (all expert slots, used or not) covers the same output rows, the
// column's row range, so the last block of a column to arrive at fold_ctr[bx] holds every
// expert output of those rows and sums them per token, in k order, with moe_combine's
// arithmetic (combine_piece_f32): the same bits without the combine launch. Pays where a
// column's rows x tokens are few (one decode token: 48 rows); the host decides.
template <int DTYPE>
__device__ __forceinline__ void moe_str_fold_combine(const MoeParams& p) {
    __shared__ bool last;
    // The block's ws_out stores, then one fence and the arrival by thread 0: the barrier orders
    // the other threads' stores before its fence (as cooperative groups' grid sync does), so
    // only one thread waits for the fence.
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        last = atomicAdd((u32*)p.fold_ctr + blockIdx.x, 1u) == gridDim.y - 1;
        if (last) __threadfence();  // the other blocks' stores, published by their arrivals
    }
    __syncthreads();
    if (!last) return;  // block-uniform
    const long long gpe = p.H / 16;
    const int r_lo = 16 * (int)(blockIdx.x * gpe / gridDim.x);
    const int r_hi = 16 * (int)((blockIdx.x + 1) * gpe / gridDim.x);
    const int pieces = (r_hi - r_lo) / 8;  // 8 outputs per thread and step
    for (int i = threadIdx.x; i < p.T * pieces; i += blockDim.x) {
        const int t = i / pieces;
        combine_piece_f32<DTYPE, true>(p, combine_route(p, t), t, r_lo + 8 * (i - t * pieces));
    }
}

// One launch per phase (moe_str_up_* then moe_str_down_*): block (blockIdx.x, blockIdx.y) is
// item blockIdx.x of gridDim.x of expert slot blockIdx.y. With p.str_fold, the down launch
// also combines (moe_str_fold_combine). EXTRA: compact ring stages (the deep entries).
template <int DTYPE, bool UP, int NT, bool NESTED, int EXTRA = 0>
__device__ void moe_str(const MoeParams& p) {
    __shared__ StrShared sh;
    // STR_TABLE_BYTES of table + rings, then p.str_xcols columns of staged activations.
    extern __shared__ __align__(16) u8 str_smem[];
    pdl_trigger();  // the next phase (down, or the combine) may build its table meanwhile
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    // Launched with PDL (ops::PDL_ENV): the table is launch-independent; the routing (stored by
    // the gate_up launch, or by the kernels before it) is not.
    str_table<DTYPE>(str_smem, sh.nmap, p.nested_map);
    pdl_wait();
    const RoutePrefetch pre = dec_route_prefetch(p, !UP, !p.str_grouped);
#else
    const RoutePrefetch pre = dec_route_prefetch(p, !UP, !p.str_grouped);
    str_table<DTYPE>(str_smem, sh.nmap, p.nested_map);
#endif
    if (p.str_grouped)
        __syncthreads();  // table
    else
        // The gate_up launch's block (0, 0) stores the routing for moe_str_down (which reads it
        // instead of routing again) and moe_combine.
        dec_route<DTYPE>(p, sh, UP && blockIdx.x == 0 && blockIdx.y == 0, false, !UP, pre);
    if (UP && p.str_fold && blockIdx.x == 0 && blockIdx.y == 0) {
        // The down launch's arrival counters, after pdl_wait: the previous down launch that
        // used them is complete. The down launch counts only after its own pdl_wait, when this
        // launch is complete.
        for (int i = threadIdx.x; i < p.str_gx_dn; i += blockDim.x) ((u32*)p.fold_ctr)[i] = 0u;
    }
    int cnt;
    const int* gpairs;
    const int e = str_slot_expert<true>(p, sh, blockIdx.y, cnt, gpairs);
    if (e >= 0)  // block-uniform
        moe_str_item<DTYPE, UP, NT, NESTED, STR_X_GLOBAL_NC, EXTRA>(
            p, sh, str_smem, e, cnt, gpairs, blockIdx.x, gridDim.x, p.str_ks, p.str_xcols,
            nullptr, 0u);
    if (!UP && p.str_fold) moe_str_fold_combine<DTYPE>(p);
}

// Both phases in one launch (moe_str_fused_*; where: ops::moe::fused_pays). A block builds the
// table and routes once, then takes work items from a ticket counter: first the
// gate_up items (str_gx_up per expert slot, slot-major), then the down items. A down item primes
// its weight ring before it waits for its expert's gate_up items, so that DRAM latency and the
// item's setup overlap the gate_up tail instead of following a launch boundary. Tickets are
// taken in the order blocks run, so a waiting block only ever waits on items that running
// blocks hold: no deadlock whatever the grid size or residency. The caller zeroes ws_sync.
template <int DTYPE, int NT, bool NESTED>
__device__ void moe_str_fused(const MoeParams& p) {
    __shared__ StrShared sh;
    __shared__ int ticket;
    extern __shared__ __align__(16) u8 str_smem[];
    const RoutePrefetch pre = dec_route_prefetch(p, false, !p.str_grouped);
    str_table<DTYPE>(str_smem, sh.nmap, p.nested_map);
    if (p.str_grouped)
        __syncthreads();  // table
    else
        // Every block routes (the same result); block 0 stores it for moe_combine.
        dec_route<DTYPE>(p, sh, blockIdx.x == 0, false, false, pre);
    u32* sync = (u32*)p.ws_sync;  // [0] tickets taken, [1 + y] gate_up items of slot y done
    const int up_items = p.str_gx_up * p.str_slots;
    const int items = up_items + p.str_gx_dn * p.str_slots;
    for (;;) {
        if (threadIdx.x == 0) ticket = (int)atomicAdd(sync, 1u);
        __syncthreads();
        const int item = ticket;
        __syncthreads();  // read before thread 0 takes the next ticket
        if (item >= items) break;
        const bool up = item < up_items;
        const int local = up ? item : item - up_items;
        const int gx = up ? p.str_gx_up : p.str_gx_dn;
        const int y = local / gx, bx = local - y * gx;
        int cnt;
        const int* gpairs;
        const int e = str_slot_expert<false>(p, sh, y, cnt, gpairs);
        if (e < 0) continue;  // empty slot: nothing to compute, and no down item waits on it
        if (up) {
            moe_str_item<DTYPE, true, NT, NESTED, STR_X_GLOBAL_NC>(
                p, sh, str_smem, e, cnt, gpairs, bx, gx, p.str_ks, p.str_xcols, nullptr, 0u);
            __syncthreads();  // every h store of the item is issued
            if (threadIdx.x == 0) {
                __threadfence();  // ... and visible device-wide before it is counted
                atomicAdd(sync + 1 + y, 1u);
            }
        } else {
            moe_str_item<DTYPE, false, NT, NESTED, STR_X_GLOBAL_CG>(
                p, sh, str_smem, e, cnt, gpairs, bx, gx, p.str_ks_dn, p.str_xcols_dn, sync + 1 + y,
                (u32)p.str_gx_up);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Prefill regime: tiled tensor-core GEMM per (expert, BM routed rows) x (BN weight rows).
//
// Per 64-wide k tile: cp.async brings the gathered activation rows (A, BM x 64) and the packed
// NF4 bytes (BN x 32 B) into a STAGES-deep ring; the block then decodes the packed tile into a
// bf16/f16 [BN][64] tile in shared memory (exact dequantization) and runs ldmatrix + mma.sync.
// 8 warps as 2 (m) x 4 (n); warp tile (BM/2) x 32. Row strides are padded by 16 bytes so the
// 8 row addresses of an ldmatrix hit 8 different bank groups.
// ---------------------------------------------------------------------------------------------
#define GEMM_BN 128
#define GEMM_BK 64
#define GEMM_LD (GEMM_BK + 8)  // padded row stride of A and decoded-B tiles, in elements
#define GEMM_THREADS 256
// m64s2 blocks per SM the registers must allow (a cap of 85 per thread): its 44 KB of shared
// memory fit 3 blocks on sm_80/sm_90, and the GEMM lost 12% when the count fell to 2.
#ifndef GEMM_M64_MIN_BLOCKS
#define GEMM_M64_MIN_BLOCKS 3
#endif

// DB: two decoded-B buffers. The block then decodes tile kt+1 while it multiplies tile kt, with
// one barrier per k tile (needs STAGES >= 3); without DB (for 2 blocks per SM in 100 KB on
// sm_86/89) decode and multiply alternate with two barriers per tile.
template <int BM, int STAGES, bool DB>
struct GemmSmem {
    static constexpr int A_BYTES = STAGES * BM * GEMM_LD * 2;
    static constexpr int P_BYTES = STAGES * GEMM_BN * (GEMM_BK / 2);
    static constexpr int B_BYTES = (DB ? 2 : 1) * GEMM_BN * GEMM_LD * 2;
    static constexpr int TOTAL = A_BYTES + P_BYTES + B_BYTES + BM * 4;
};

template <int DTYPE, bool UP, int BM, int STAGES, bool DB>
__device__ void moe_gemm(const MoeParams& p) {
    extern __shared__ __align__(16) u8 smem[];
    __shared__ float s_lut[16];
    __shared__ float s_nmap[256];
    static_assert(!DB || STAGES >= 3, "double-buffered B needs 3 or more stages");
    typedef GemmSmem<BM, STAGES, DB> L;
    u16* sA = (u16*)smem;
    u8* sP = smem + L::A_BYTES;
    u16* sB = (u16*)(smem + L::A_BYTES + L::P_BYTES);
    int* s_rows = (int*)(smem + L::A_BYTES + L::P_BYTES + L::B_BYTES);

    const int tile = blockIdx.y;
    if (tile >= ((const int*)p.ws_meta)[1]) return;
    const int e = ((const int*)p.ws_tiles)[2 * tile];
    const int row_start = ((const int*)p.ws_tiles)[2 * tile + 1];
    const int N = UP ? 2 * p.I : p.H;
    const int K = UP ? p.H : p.I;
    const int n_base = blockIdx.x * GEMM_BN;
    if (n_base >= N) return;
    const int KT = K / GEMM_BK;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;

    load_tables(s_lut, s_nmap, p.nested_map);
    for (int m = tid; m < BM; m += GEMM_THREADS) s_rows[m] = ((const int*)p.ws_sorted)[row_start + m];
    __syncthreads();

    const long long ee = e;
    const u8* packed = (const u8*)(UP ? p.gu_packed : p.dn_packed) + ee * ((long long)N * K / 2);
    const Nf4Stats st = UP ? nf4_stats(p.gu_absmax, p.gu_nested, p.gu_offset, p.gu_nested_flag,
                                       p.gu_nnb, ee, (long long)N * K / 64)
                           : nf4_stats(p.dn_absmax, p.dn_nested, p.dn_offset, p.dn_nested_flag,
                                       p.dn_nnb, ee, (long long)N * K / 64);
    const u16* src = (const u16*)(UP ? p.x : p.ws_h);
    const long long src_stride = UP ? p.x_stride : p.I;

    // cp.async of k tile kt into ring stage `stage`: A rows (8 x 16 B each) and packed B rows
    // (2 x 16 B). The sources are fixed per thread, so the row gather (a division by top-k) and
    // the addresses are computed once here; the loop only adds k and stage offsets.
    constexpr int ACH = BM * 8 / GEMM_THREADS;  // A pieces per thread
    static_assert(ACH * GEMM_THREADS == BM * 8 && GEMM_BN * 2 == GEMM_THREADS, "copy split");
    const u16* a_src[ACH];
    u32 a_ok = 0;
#pragma unroll
    for (int j = 0; j < ACH; ++j) {
        const int i = tid + j * GEMM_THREADS, m = i >> 3, q = i & 7;
        const int pr = s_rows[m];
        a_src[j] = src;
        if (pr >= 0) {
            const long long r = UP ? (long long)(pr / p.topk) : (long long)pr;
            a_src[j] = src + r * src_stride + q * 8;
            a_ok |= 1u << j;
        }
    }
    // Piece j's shared offset is piece 0's plus j * (GEMM_THREADS / 8) rows.
    const u32 a_dst0 = smem_addr(sA) + 2 * ((tid >> 3) * GEMM_LD + (tid & 7) * 8);
    const int bn = tid >> 1, bq = tid & 1;
    const bool b_ok = n_base + bn < N;
#ifdef STR_CHUNK_MAJOR
    // Benchmark build: the 16-row group's chunk kt / 2 (1 KB, fragment rows of 64 B; the final
    // half chunk 32 B per row) holds this row's bytes of k tile kt at 64 fr + 32 (kt & 1).
    const int b_row = b_ok ? n_base + bn : 0, b_mr = b_row & 15;
    const int b_fr = UP ? (b_mr >> 1) + 8 * (b_mr & 1) : b_mr;  // inverse of str_mem_row
    const u8* b_src = packed + (long long)(b_row - b_mr) * (K / 2) + 64 * b_fr + bq * 16;
    const int b_full = K / 128;  // full chunks; k tile 2 b_full is the half chunk, if any
    auto b_tile = [&](int kt) {
        return b_src + (kt >> 1) * 1024 + (kt & 1) * 32 - ((kt >> 1) == b_full ? 32 * b_fr : 0);
    };
#else
    const u8* b_src = b_ok ? packed + (long long)(n_base + bn) * (K / 2) + bq * 16 : packed;
    auto b_tile = [&](int kt) { return b_src + kt * (GEMM_BK / 2); };
#endif
    const u32 b_dst0 = smem_addr(sP) + bn * (GEMM_BK / 2) + bq * 16;
    auto load_tile = [&](int kt, int stage) {
        const u32 a_dst = a_dst0 + stage * (BM * GEMM_LD * 2);
#pragma unroll
        for (int j = 0; j < ACH; ++j)
            cp_async_16_zfill_s(a_dst + j * ((GEMM_THREADS / 8) * GEMM_LD * 2),
                                (a_ok >> j) & 1u ? a_src[j] + kt * GEMM_BK : a_src[j],
                                (a_ok >> j) & 1u ? 16u : 0u);
        cp_async_16_zfill_s(b_dst0 + stage * (GEMM_BN * (GEMM_BK / 2)),
                            b_ok ? b_tile(kt) : b_src, b_ok ? 16u : 0u);
    };

    // The decoding thread's row/half and its absmax prefetch (register double buffer).
    const int dn = tid >> 1, dh = tid & 1;
    const bool drow_ok = n_base + dn < N;
    const long long dab = (long long)(n_base + dn) * (K / 64);
    Nf4RawAbsmax zr;
    zr.raw = 0u;
    zr.scale = 0.0f;
    Nf4RawAbsmax ra_next = drow_ok ? nf4_absmax_load(st, dab) : zr;

    constexpr int WM = BM / 2, MT = WM / 16;
    const int wm = warp >> 2, wn = warp & 3;
    float acc[MT][4][4];
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.0f;

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < KT) load_tile(s, s);
        cp_async_commit();
    }

    // Decode: thread (row dn, half dh) turns the 16 packed bytes of k tile kt into 32 halves of
    // decoded-B buffer `buf`. Consumes the prefetched absmax and prefetches the next tile's.
    auto decode_tile = [&](int kt, int buf) {
        const Nf4RawAbsmax ra = ra_next;
        if (kt + 1 < KT && drow_ok) ra_next = nf4_absmax_load(st, dab + kt + 1);
        const float am = drow_ok ? nf4_absmax_finish(st, ra, s_nmap) : 0.0f;
        const u32x4 pv =
            *(const u32x4*)(sP + (kt % STAGES) * GEMM_BN * (GEMM_BK / 2) + dn * 32 + dh * 16);
        const u32 pw[4] = {pv.x, pv.y, pv.z, pv.w};
        u16* brow = sB + buf * GEMM_BN * GEMM_LD + dn * GEMM_LD + dh * 32;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            u32x4 o;
            // Byte b of the little-endian word = elements 2b (high nibble), 2b+1 (low nibble).
            o.x = nf4_pair<DTYPE>(pw[q], 0, am, s_lut);
            o.y = nf4_pair<DTYPE>(pw[q], 8, am, s_lut);
            o.z = nf4_pair<DTYPE>(pw[q], 16, am, s_lut);
            o.w = nf4_pair<DTYPE>(pw[q], 24, am, s_lut);
            *(u32x4*)(brow + q * 8) = o;
        }
    };
    auto mma_tile = [&](int kt, int buf) {
        const u16* a_tile = sA + (kt % STAGES) * BM * GEMM_LD;
        const u16* b_tile = sB + buf * GEMM_BN * GEMM_LD;
#pragma unroll
        for (int ks = 0; ks < GEMM_BK; ks += 16) {
            u32 af[MT][4];
#pragma unroll
            for (int i = 0; i < MT; ++i) {
                const int r = wm * WM + i * 16 + (lane & 15);
                ldmatrix_x4(af[i], a_tile + r * GEMM_LD + ks + (lane >> 4) * 8);
            }
            u32 bf[4][2];
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                u32 r4[4];
                const int n = wn * 32 + j * 16 + (lane & 7) + ((lane >> 4) << 3);
                ldmatrix_x4(r4, b_tile + n * GEMM_LD + ks + ((lane >> 3) & 1) * 8);
                bf[2 * j][0] = r4[0];
                bf[2 * j][1] = r4[1];
                bf[2 * j + 1][0] = r4[2];
                bf[2 * j + 1][1] = r4[3];
            }
#pragma unroll
            for (int i = 0; i < MT; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) mma_m16n8k16<DTYPE>(acc[i][j], af[i], bf[j]);
        }
    };

    if (DB) {
        // Commit group j = k tile j. Before the loop: tile 0 decoded into buffer 0.
        cp_async_wait<(DB ? STAGES - 2 : 0)>();
        __syncthreads();
        decode_tile(0, 0);
        for (int kt = 0; kt < KT; ++kt) {
            // Groups 0 .. kt+STAGES-2 issued; tile kt+1 must have landed.
            cp_async_wait<(DB ? STAGES - 3 : 0)>();
            // Tile kt+1 visible, decoded tile kt visible, every warp done with tile kt-1.
            __syncthreads();
            if (kt + STAGES - 1 < KT) load_tile(kt + STAGES - 1, (kt + STAGES - 1) % STAGES);
            cp_async_commit();
            if (kt + 1 < KT) decode_tile(kt + 1, (kt + 1) & 1);
            mma_tile(kt, kt & 1);
        }
    } else {
        for (int kt = 0; kt < KT; ++kt) {
            cp_async_wait<STAGES - 2>();
            __syncthreads();  // tile kt visible; every warp is done with the previous sB and stage
            if (kt + STAGES - 1 < KT) load_tile(kt + STAGES - 1, (kt + STAGES - 1) % STAGES);
            cp_async_commit();
            decode_tile(kt, 0);
            __syncthreads();
            mma_tile(kt, 0);
        }
    }
    cp_async_wait<0>();

    // Epilogue: acc[i][j] = {(m g, n 2c), (m g, n 2c+1), (m g+8, n 2c), (m g+8, n 2c+1)}.
    const int g = lane >> 2, c = lane & 3;
    const float* bias = (const float*)(UP ? p.gu_bias : p.dn_bias) + ee * N;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int n = n_base + wn * 32 + j * 8 + 2 * c;
        if (n >= N) continue;
        const float b0 = bias[n], b1 = bias[n + 1];
#pragma unroll
        for (int i = 0; i < MT; ++i) {
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const int m = wm * WM + i * 16 + g + hh * 8;
                const int pr = s_rows[m];
                if (pr < 0) continue;
                const float v0 = acc[i][j][2 * hh] + b0, v1 = acc[i][j][2 * hh + 1] + b1;
                if (UP) {
                    // Columns n (even, gate) and n+1 (up) of the interleaved layout -> h[n/2].
                    ((u16*)p.ws_h)[(long long)pr * p.I + (n >> 1)] =
                        f32_to_half<DTYPE>(swiglu_oai(v0, v1));
                } else {
                    *(u32*)((u16*)p.ws_out + (long long)pr * p.H + n) = pack_half2<DTYPE>(v0, v1);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Combine: grid (T, ceil(H / (8 * 128))), block 128; y[t] = sum_k w[t,k] out[t*topk+k] in k
// order, fp32. The y dimension gives each thread one 8-element piece of a token (H = 2880: 3
// blocks per token), so a decode step's combine is one round of loads instead of a loop of
// three in a single block per token.
// ---------------------------------------------------------------------------------------------
template <int DTYPE>
__device__ void moe_combine(const MoeParams& p) {
    pdl_wait();  // everything below comes from the expert launches just before
    const int t = blockIdx.x;
    const CombineRoute r = combine_route(p, t);
    const int step = gridDim.y * blockDim.x * 8;
    for (int h = (blockIdx.y * blockDim.x + threadIdx.x) * 8; h < p.H; h += step) {
        if (p.out_f32) {
            combine_piece_f32<DTYPE, false>(p, r, t, h);
            continue;
        }
        const long long row0 = (long long)t * p.topk * p.H + h;
        float acc[8];
#pragma unroll
        for (int q = 0; q < 8; ++q) acc[q] = 0.0f;
        u32x4 v[MOE_MAX_TOPK];
#pragma unroll
        for (int k = 0; k < MOE_MAX_TOPK; ++k)
            v[k] = ld_nc_16_if((const u16*)p.ws_out + row0 + (long long)k * p.H, r.ok[k]);
#pragma unroll
        for (int k = 0; k < MOE_MAX_TOPK; ++k) {
            if (!r.ok[k]) continue;
            const u32 vs[4] = {v[k].x, v[k].y, v[k].z, v[k].w};
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                acc[2 * q] += r.w[k] * half_to_f32<DTYPE>((u16)(vs[q] & 0xffffu));
                acc[2 * q + 1] += r.w[k] * half_to_f32<DTYPE>((u16)(vs[q] >> 16));
            }
        }
        u32x4 o;
        o.x = pack_half2<DTYPE>(acc[0], acc[1]);
        o.y = pack_half2<DTYPE>(acc[2], acc[3]);
        o.z = pack_half2<DTYPE>(acc[4], acc[5]);
        o.w = pack_half2<DTYPE>(acc[6], acc[7]);
        *(u32x4*)((u16*)p.y + (long long)t * p.H + h) = o;
    }
}

// ---------------------------------------------------------------------------------------------
// Entries: one per stage and dtype, written out (no macros) so that the runtime's entry scan
// (`crate::cuda::entry_names`, used by warmup before graph capture) sees every one. Each sits in
// `#if MOE_MAIN_ENTRIES` (bf16) or `#if MOE_F16_ENTRIES` (fp16): see the top of the file.
// Prefill variants: `_m64s2` (BM 64, 2 stages: sm_86/89, 2 blocks per SM in 100 KB), `_m64s3`,
// `_m128s4` (double-buffered decoded B, one barrier per k tile; slower than m64s2 on the H100 in
// bench/results, kept for tuning).
// ---------------------------------------------------------------------------------------------
#if MOE_MAIN_ENTRIES
extern "C" __global__ __launch_bounds__(1024) void moe_route_bf16(const MoeParams p) {
    moe_route<DTYPE_BF16>(p);
}
#endif
#if MOE_F16_ENTRIES
extern "C" __global__ __launch_bounds__(1024) void moe_route_f16(const MoeParams p) {
    moe_route<DTYPE_F16>(p);
}
#endif
#if MOE_MAIN_ENTRIES
extern "C" __global__ __launch_bounds__(ROUTER_WARPS * 32) void moe_router_bf16(const MoeParams p) {
    moe_router<DTYPE_BF16>(p);
}
#endif
#if MOE_F16_ENTRIES
extern "C" __global__ __launch_bounds__(ROUTER_WARPS * 32) void moe_router_f16(const MoeParams p) {
    moe_router<DTYPE_F16>(p);
}
#endif
// sm_90 only (thread-block clusters); the launcher never runs them on older GPUs, where they
// compile empty.
#if MOE_MAIN_ENTRIES
extern "C" __global__ __launch_bounds__(ROUTER_TOPK_GROUPS * ROUTER_WARPS * 32) void moe_router_topk_bf16(const MoeParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    moe_router_topk<DTYPE_BF16>(p);
#endif
}
#endif
#if MOE_F16_ENTRIES
extern "C" __global__ __launch_bounds__(ROUTER_TOPK_GROUPS * ROUTER_WARPS * 32) void moe_router_topk_f16(const MoeParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    moe_router_topk<DTYPE_F16>(p);
#endif
}
#endif
#if MOE_MAIN_ENTRIES
extern "C" __global__ __launch_bounds__(1024) void moe_group_bf16(const MoeParams p) {
    moe_group<DTYPE_BF16>(p);
}
#endif
#if MOE_F16_ENTRIES
extern "C" __global__ __launch_bounds__(1024) void moe_group_f16(const MoeParams p) {
    moe_group<DTYPE_F16>(p);
}
#endif
#if MOE_MAIN_ENTRIES
extern "C" __global__ __launch_bounds__(128) void moe_combine_bf16(const MoeParams p) {
    moe_combine<DTYPE_BF16>(p);
}
#endif
#if MOE_F16_ENTRIES
extern "C" __global__ __launch_bounds__(128) void moe_combine_f16(const MoeParams p) {
    moe_combine<DTYPE_F16>(p);
}
#endif
#if MOE_MAIN_ENTRIES
extern "C" __global__ __launch_bounds__(DEC_WARPS * 32, 2) void moe_dec_up_bf16(const MoeParams p) {
    moe_dec_up<DTYPE_BF16>(p);
}
#endif
#if MOE_F16_ENTRIES
extern "C" __global__ __launch_bounds__(DEC_WARPS * 32, 2) void moe_dec_up_f16(const MoeParams p) {
    moe_dec_up<DTYPE_F16>(p);
}
#endif
#if MOE_MAIN_ENTRIES
extern "C" __global__ __launch_bounds__(DEC_WARPS * 32, 2) void moe_dec_down_bf16(const MoeParams p) {
    moe_dec_down<DTYPE_BF16>(p);
}
#endif
#if MOE_F16_ENTRIES
extern "C" __global__ __launch_bounds__(DEC_WARPS * 32, 2) void moe_dec_down_f16(const MoeParams p) {
    moe_dec_down<DTYPE_F16>(p);
}
#endif
#if MOE_MAIN_ENTRIES
extern "C" __global__ __launch_bounds__(DEC_WARPS * 32, DEC2_UP_MIN_BLOCKS) void moe_dec2_up_bf16(const MoeParams p) {
    moe_dec2_up<DTYPE_BF16>(p);
}
#endif
#if MOE_F16_ENTRIES
extern "C" __global__ __launch_bounds__(DEC_WARPS * 32, DEC2_UP_MIN_BLOCKS) void moe_dec2_up_f16(const MoeParams p) {
    moe_dec2_up<DTYPE_F16>(p);
}
#endif
#if MOE_MAIN_ENTRIES
extern "C" __global__ __launch_bounds__(DEC_WARPS * 32, DEC2_DOWN_MIN_BLOCKS) void moe_dec2_down_bf16(const MoeParams p) {
    moe_dec2_down<DTYPE_BF16>(p);
}
#endif
#if MOE_F16_ENTRIES
extern "C" __global__ __launch_bounds__(DEC_WARPS * 32, DEC2_DOWN_MIN_BLOCKS) void moe_dec2_down_f16(const MoeParams p) {
    moe_dec2_down<DTYPE_F16>(p);
}
#endif
#if MOE_MAIN_ENTRIES
extern "C" __global__ __launch_bounds__(GEMM_THREADS, GEMM_M64_MIN_BLOCKS) void moe_gemm_up_m64s2_bf16(const MoeParams p) {
    moe_gemm<DTYPE_BF16, true, 64, 2, false>(p);
}
#endif
#if MOE_F16_ENTRIES
extern "C" __global__ __launch_bounds__(GEMM_THREADS, GEMM_M64_MIN_BLOCKS) void moe_gemm_up_m64s2_f16(const MoeParams p) {
    moe_gemm<DTYPE_F16, true, 64, 2, false>(p);
}
#endif
#if MOE_MAIN_ENTRIES
extern "C" __global__ __launch_bounds__(GEMM_THREADS, GEMM_M64_MIN_BLOCKS) void moe_gemm_down_m64s2_bf16(const MoeParams p) {
    moe_gemm<DTYPE_BF16, false, 64, 2, false>(p);
}
#endif
#if MOE_F16_ENTRIES
extern "C" __global__ __launch_bounds__(GEMM_THREADS, GEMM_M64_MIN_BLOCKS) void moe_gemm_down_m64s2_f16(const MoeParams p) {
    moe_gemm<DTYPE_F16, false, 64, 2, false>(p);
}
#endif
#if MOE_MAIN_ENTRIES
extern "C" __global__ __launch_bounds__(GEMM_THREADS) void moe_gemm_up_m128s4_bf16(const MoeParams p) {
    moe_gemm<DTYPE_BF16, true, 128, 4, true>(p);
}
#endif
#if MOE_F16_ENTRIES
extern "C" __global__ __launch_bounds__(GEMM_THREADS) void moe_gemm_up_m128s4_f16(const MoeParams p) {
    moe_gemm<DTYPE_F16, true, 128, 4, true>(p);
}
#endif
#if MOE_MAIN_ENTRIES
extern "C" __global__ __launch_bounds__(GEMM_THREADS) void moe_gemm_down_m128s4_bf16(const MoeParams p) {
    moe_gemm<DTYPE_BF16, false, 128, 4, true>(p);
}
#endif
#if MOE_F16_ENTRIES
extern "C" __global__ __launch_bounds__(GEMM_THREADS) void moe_gemm_down_m128s4_f16(const MoeParams p) {
    moe_gemm<DTYPE_F16, false, 128, 4, true>(p);
}
#endif
// m128s2: 128-token tiles, 2 stages, one decoded-B buffer (63 KB): half the weight decoding
// and B traffic per FLOP of m64s2, two blocks per SM within the registers.
#if MOE_MAIN_ENTRIES
extern "C" __global__ __launch_bounds__(GEMM_THREADS, 2) void moe_gemm_up_m128s2_bf16(const MoeParams p) {
    moe_gemm<DTYPE_BF16, true, 128, 2, false>(p);
}
#endif
#if MOE_F16_ENTRIES
extern "C" __global__ __launch_bounds__(GEMM_THREADS, 2) void moe_gemm_up_m128s2_f16(const MoeParams p) {
    moe_gemm<DTYPE_F16, true, 128, 2, false>(p);
}
#endif
#if MOE_MAIN_ENTRIES
extern "C" __global__ __launch_bounds__(GEMM_THREADS, 2) void moe_gemm_down_m128s2_bf16(const MoeParams p) {
    moe_gemm<DTYPE_BF16, false, 128, 2, false>(p);
}
#endif
#if MOE_F16_ENTRIES
extern "C" __global__ __launch_bounds__(GEMM_THREADS, 2) void moe_gemm_down_m128s2_f16(const MoeParams p) {
    moe_gemm<DTYPE_F16, false, 128, 2, false>(p);
}
#endif

#if MOE_MAIN_ENTRIES
extern "C" __global__ __launch_bounds__(STR_WARPS * 32, STR_MIN_BLOCKS_N1) void moe_str_up_n1_bf16(const MoeParams p) {
    moe_str<DTYPE_BF16, true, 1, true>(p);
}
#endif
#if MOE_F16_ENTRIES
extern "C" __global__ __launch_bounds__(STR_WARPS * 32, STR_MIN_BLOCKS_N1) void moe_str_up_n1_f16(const MoeParams p) {
    moe_str<DTYPE_F16, true, 1, true>(p);
}
#endif
#if MOE_MAIN_ENTRIES
extern "C" __global__ __launch_bounds__(STR_WARPS * 32, STR_MIN_BLOCKS_N1) void moe_str_up_n1_plain_bf16(const MoeParams p) {
    moe_str<DTYPE_BF16, true, 1, false>(p);
}
#endif
#if MOE_F16_ENTRIES
extern "C" __global__ __launch_bounds__(STR_WARPS * 32, STR_MIN_BLOCKS_N1) void moe_str_up_n1_plain_f16(const MoeParams p) {
    moe_str<DTYPE_F16, true, 1, false>(p);
}
#endif
#if MOE_MAIN_ENTRIES
extern "C" __global__ __launch_bounds__(STR_WARPS * 32, STR_MIN_BLOCKS_N1) void moe_str_up_n1_deep_bf16(const MoeParams p) {
    moe_str<DTYPE_BF16, true, 1, true, MOE_STR_EXTRA_STAGES>(p);
}
#endif
#if MOE_F16_ENTRIES
extern "C" __global__ __launch_bounds__(STR_WARPS * 32, STR_MIN_BLOCKS_N1) void moe_str_up_n1_deep_f16(const MoeParams p) {
    moe_str<DTYPE_F16, true, 1, true, MOE_STR_EXTRA_STAGES>(p);
}
#endif
#if MOE_MAIN_ENTRIES
extern "C" __global__ __launch_bounds__(STR_WARPS * 32, STR_MIN_BLOCKS_N1) void moe_str_up_n1_deep_plain_bf16(const MoeParams p) {
    moe_str<DTYPE_BF16, true, 1, false, MOE_STR_EXTRA_STAGES>(p);
}
#endif
#if MOE_F16_ENTRIES
extern "C" __global__ __launch_bounds__(STR_WARPS * 32, STR_MIN_BLOCKS_N1) void moe_str_up_n1_deep_plain_f16(const MoeParams p) {
    moe_str<DTYPE_F16, true, 1, false, MOE_STR_EXTRA_STAGES>(p);
}
#endif
#if MOE_MAIN_ENTRIES
extern "C" __global__ __launch_bounds__(STR_WARPS * 32, STR_MIN_BLOCKS_N1) void moe_str_down_n1_deep_bf16(const MoeParams p) {
    moe_str<DTYPE_BF16, false, 1, true, MOE_STR_EXTRA_STAGES>(p);
}
#endif
#if MOE_F16_ENTRIES
extern "C" __global__ __launch_bounds__(STR_WARPS * 32, STR_MIN_BLOCKS_N1) void moe_str_down_n1_deep_f16(const MoeParams p) {
    moe_str<DTYPE_F16, false, 1, true, MOE_STR_EXTRA_STAGES>(p);
}
#endif
#if MOE_MAIN_ENTRIES
extern "C" __global__ __launch_bounds__(STR_WARPS * 32, STR_MIN_BLOCKS_N1) void moe_str_down_n1_deep_plain_bf16(const MoeParams p) {
    moe_str<DTYPE_BF16, false, 1, false, MOE_STR_EXTRA_STAGES>(p);
}
#endif
#if MOE_F16_ENTRIES
extern "C" __global__ __launch_bounds__(STR_WARPS * 32, STR_MIN_BLOCKS_N1) void moe_str_down_n1_deep_plain_f16(const MoeParams p) {
    moe_str<DTYPE_F16, false, 1, false, MOE_STR_EXTRA_STAGES>(p);
}
#endif
#if MOE_MAIN_ENTRIES
extern "C" __global__ __launch_bounds__(STR_WARPS * 32, STR_MIN_BLOCKS_N2) void moe_str_up_n2_bf16(const MoeParams p) {
    moe_str<DTYPE_BF16, true, 2, true>(p);
}
#endif
#if MOE_F16_ENTRIES
extern "C" __global__ __launch_bounds__(STR_WARPS * 32, STR_MIN_BLOCKS_N2) void moe_str_up_n2_f16(const MoeParams p) {
    moe_str<DTYPE_F16, true, 2, true>(p);
}
#endif
#if MOE_MAIN_ENTRIES
extern "C" __global__ __launch_bounds__(STR_WARPS * 32, STR_MIN_BLOCKS_N2) void moe_str_up_n2_plain_bf16(const MoeParams p) {
    moe_str<DTYPE_BF16, true, 2, false>(p);
}
#endif
#if MOE_F16_ENTRIES
extern "C" __global__ __launch_bounds__(STR_WARPS * 32, STR_MIN_BLOCKS_N2) void moe_str_up_n2_plain_f16(const MoeParams p) {
    moe_str<DTYPE_F16, true, 2, false>(p);
}
#endif
#if MOE_MAIN_ENTRIES
extern "C" __global__ __launch_bounds__(STR_WARPS * 32, STR_MIN_BLOCKS_N1) void moe_str_fused_n1_bf16(const MoeParams p) {
    moe_str_fused<DTYPE_BF16, 1, true>(p);
}
#endif
#if MOE_F16_ENTRIES
extern "C" __global__ __launch_bounds__(STR_WARPS * 32, STR_MIN_BLOCKS_N1) void moe_str_fused_n1_f16(const MoeParams p) {
    moe_str_fused<DTYPE_F16, 1, true>(p);
}
#endif
#if MOE_MAIN_ENTRIES
extern "C" __global__ __launch_bounds__(STR_WARPS * 32, STR_MIN_BLOCKS_N1) void moe_str_fused_n1_plain_bf16(const MoeParams p) {
    moe_str_fused<DTYPE_BF16, 1, false>(p);
}
#endif
#if MOE_F16_ENTRIES
extern "C" __global__ __launch_bounds__(STR_WARPS * 32, STR_MIN_BLOCKS_N1) void moe_str_fused_n1_plain_f16(const MoeParams p) {
    moe_str_fused<DTYPE_F16, 1, false>(p);
}
#endif
#if MOE_MAIN_ENTRIES
extern "C" __global__ __launch_bounds__(STR_WARPS * 32, STR_MIN_BLOCKS_N2) void moe_str_fused_n2_bf16(const MoeParams p) {
    moe_str_fused<DTYPE_BF16, 2, true>(p);
}
#endif
#if MOE_F16_ENTRIES
extern "C" __global__ __launch_bounds__(STR_WARPS * 32, STR_MIN_BLOCKS_N2) void moe_str_fused_n2_f16(const MoeParams p) {
    moe_str_fused<DTYPE_F16, 2, true>(p);
}
#endif
#if MOE_MAIN_ENTRIES
extern "C" __global__ __launch_bounds__(STR_WARPS * 32, STR_MIN_BLOCKS_N2) void moe_str_fused_n2_plain_bf16(const MoeParams p) {
    moe_str_fused<DTYPE_BF16, 2, false>(p);
}
#endif
#if MOE_F16_ENTRIES
extern "C" __global__ __launch_bounds__(STR_WARPS * 32, STR_MIN_BLOCKS_N2) void moe_str_fused_n2_plain_f16(const MoeParams p) {
    moe_str_fused<DTYPE_F16, 2, false>(p);
}
#endif
#if MOE_MAIN_ENTRIES
extern "C" __global__ __launch_bounds__(STR_WARPS * 32, STR_MIN_BLOCKS_N1) void moe_str_down_n1_bf16(const MoeParams p) {
    moe_str<DTYPE_BF16, false, 1, true>(p);
}
#endif
#if MOE_F16_ENTRIES
extern "C" __global__ __launch_bounds__(STR_WARPS * 32, STR_MIN_BLOCKS_N1) void moe_str_down_n1_f16(const MoeParams p) {
    moe_str<DTYPE_F16, false, 1, true>(p);
}
#endif
#if MOE_MAIN_ENTRIES
extern "C" __global__ __launch_bounds__(STR_WARPS * 32, STR_MIN_BLOCKS_N1) void moe_str_down_n1_plain_bf16(const MoeParams p) {
    moe_str<DTYPE_BF16, false, 1, false>(p);
}
#endif
#if MOE_F16_ENTRIES
extern "C" __global__ __launch_bounds__(STR_WARPS * 32, STR_MIN_BLOCKS_N1) void moe_str_down_n1_plain_f16(const MoeParams p) {
    moe_str<DTYPE_F16, false, 1, false>(p);
}
#endif
#if MOE_MAIN_ENTRIES
extern "C" __global__ __launch_bounds__(STR_WARPS * 32, STR_MIN_BLOCKS_N2) void moe_str_down_n2_bf16(const MoeParams p) {
    moe_str<DTYPE_BF16, false, 2, true>(p);
}
#endif
#if MOE_F16_ENTRIES
extern "C" __global__ __launch_bounds__(STR_WARPS * 32, STR_MIN_BLOCKS_N2) void moe_str_down_n2_f16(const MoeParams p) {
    moe_str<DTYPE_F16, false, 2, true>(p);
}
#endif
#if MOE_MAIN_ENTRIES
extern "C" __global__ __launch_bounds__(STR_WARPS * 32, STR_MIN_BLOCKS_N2) void moe_str_down_n2_plain_bf16(const MoeParams p) {
    moe_str<DTYPE_BF16, false, 2, false>(p);
}
#endif
#if MOE_F16_ENTRIES
extern "C" __global__ __launch_bounds__(STR_WARPS * 32, STR_MIN_BLOCKS_N2) void moe_str_down_n2_plain_f16(const MoeParams p) {
    moe_str<DTYPE_F16, false, 2, false>(p);
}
#endif
