// Attention kernels for GPT-OSS: learned per-head sinks, optional sliding window, GQA, head_dim 64,
// over vLLM 0.26's paged KV cache (or plain [T, H, 64] tensors for the notebook API).
//
// Semantics (shared/reference/gpt-oss-math.md):
//   l_j = scale * q . k_j                      for every visible key j
//   p_j = exp(l_j) / (exp(s_h) + sum_k exp(l_k))  (the sink s_h is NOT scaled, NOT masked, has no value)
//   o   = sum_j p_j v_j
//   query at absolute position i sees key j iff j <= i and (window == 0 or j > i - window).
// Query positions come from vLLM's metadata: request r with q_len new tokens and seq_len total
// tokens has its query i at position seq_len - q_len + i (chunked prefill / prefix caching).
//
// Stages (one `extern "C"` entry per dtype each, all taking one by-value params struct):
//   attn_kv_write_{bf16,f16}          scatter new K/V rows into the paged cache (slot < 0 = skip).
//   attn_rope_write_{bf16,f16}        RoPE on the queries (into the output buffer, which the
//                                     attention then reads them from) and on the new keys, written
//                                     into the cache with the new values: the KV write of batches
//                                     the decode kernel does not serve alone, when vLLM hands the
//                                     rotary embedding to the attention (AttnParams::rope_cos_sin).
//   attn_fwd_m{64,128}_{bf16,f16}     FlashAttention-2 style varlen kernel (prefill / mixed): one CTA
//                                     = one KV head x a tile of (tokens x the G query heads sharing it),
//                                     tiled online softmax with mma.sync, cp.async double buffering.
//   attn_decode_s{2,3,4}_{bf16,f16}   split-KV decode for requests with q_len * G <= 16: one CTA =
//                                     (request, KV head, split); its 4 warps stream disjoint 16-key
//                                     tiles independently (no block barriers in the main loop) and
//                                     merge at the end. With one split it writes the output itself;
//                                     with several, each CTA writes its partial (max, sum, acc) and
//                                     the last CTA of a (request, KV head) to arrive (an atomic
//                                     counter, reset by that CTA) merges them with the sink, so no
//                                     second kernel launch is needed. With k_new/v_new it also
//                                     does attn_kv_write's job for its requests (see load_tile).
//
// Numerics: scores are kept in the log2 domain (scale * log2(e) folded into one multiply), the
// running max of every row is seeded with the sink's logit (denominator-only, like vLLM's Triton
// kernel), accumulation is fp32, P is rounded to the input dtype for the P.V tensor-core product.
#include "common.cuh"

#define ATTN_HEAD_DIM 64
// Rows of one mma tile: the decode kernel packs q_len * G query rows of one KV head into it.
#define ATTN_DECODE_ROWS 16
// Keys per warp tile in the decode kernel (one mma k-step for P.V).
#define ATTN_DECODE_KEYS 16
#define ATTN_DECODE_WARPS 4
// Keys per KV tile in the varlen kernel.
#define ATTN_FWD_KEYS 64

#define ATTN_LOG2E 1.4426950408889634f
#define ATTN_NEG_INF (-__int_as_float(0x7f800000))

// Sink modes (AttnParams::sink_mode).
#define ATTN_SINK_NONE 0
#define ATTN_SINK_F32 1
#define ATTN_SINK_BF16 2
#define ATTN_SINK_F16 3

// -------------------------------------------------------------------------------------------------
// Parameter structs (mirrored `#[repr(C)]` in src/ops/attention.rs; keep field order and types in
// sync). All strides are in ELEMENTS (u16), never bytes.
// -------------------------------------------------------------------------------------------------

// New K/V rows and where they land in the paged cache: the part of a KV write that the separate
// write (AttnKvWriteParams) and the RoPE launch (AttnRopeWriteParams) share.
struct AttnKvRows {
    const u16* key;            // [num_tokens, num_kv_heads, 64], last dim contiguous
    const u16* value;          // [num_tokens, num_kv_heads, 64], last dim contiguous
    u16* k_cache;              // K half of the cache: kv_cache.data_ptr()
    u16* v_cache;              // V half of the cache: kv_cache.data_ptr() + 64 elements
    const void* slot_mapping;  // [>= num_tokens] int32 or int64; slot = block * block_size + offset
    i64 key_stride_tok;        // key.stride(0)
    i64 key_stride_head;       // key.stride(1)
    i64 value_stride_tok;      // value.stride(0)
    i64 value_stride_head;     // value.stride(1)
    i64 cache_stride_block;    // kv_cache.stride(0)  (logical (blocks, kv_heads, block_size, 128))
    i64 cache_stride_tok;      // kv_cache.stride(2)
    i64 cache_stride_head;     // kv_cache.stride(1)
    i32 num_kv_heads;
    i32 block_size;
    i32 slot_is_i64;           // 1: slot_mapping is int64, 0: int32
};

struct AttnKvWriteParams {
    AttnKvRows kv;
    i32 num_tokens;            // rows of key/value to write (slot_mapping.shape[0])
};
static_assert(sizeof(AttnKvRows) == 112, "AttnKvRows layout must match src/ops/attention.rs");
static_assert(sizeof(AttnKvWriteParams) == 120, "AttnKvWriteParams layout must match Rust");

struct AttnParams {
    const u16* q;                // [T, Hq, 64], last dim contiguous
    u16* o;                      // [T, Hq, 64], last dim contiguous
    const u16* k;                // paged: kv_cache.data_ptr(); plain: k.data_ptr()
    const u16* v;                // paged: kv_cache.data_ptr() + 64; plain: v.data_ptr()
    const i32* block_table;      // [num_reqs, bt_stride] or null in plain mode
    const i32* query_start_loc;  // [num_reqs + 1]
    const i32* seq_lens;         // [num_reqs]: context + new tokens
    const void* sinks;           // [Hq] fp32, bf16 or fp16 (sink_mode), or null
    float* ws_acc;               // split partials: [rows][64] unnormalised accumulators
    float* ws_ml;                // split partials: [rows][2] (running max in log2 units, sum)
    u32* ws_ctr;                 // [num_reqs * num_kv_heads] arrival counters, zero between launches
    i64 q_stride_tok;            // q.stride(0)
    i64 q_stride_head;           // q.stride(1)
    i64 o_stride_tok;            // o.stride(0)
    i64 o_stride_head;           // o.stride(1)
    i64 kv_stride_block;         // paged: kv_cache.stride(0); plain: unused
    i64 kv_stride_tok;           // paged: kv_cache.stride(2); plain: k.stride(0) (== v.stride(0))
    i64 kv_stride_head;          // paged: kv_cache.stride(1); plain: k.stride(1) (== v.stride(1))
    i64 bt_stride;               // block_table.stride(0)
    i32 num_reqs;
    i32 num_q_heads;
    i32 num_kv_heads;
    i32 group;                   // num_q_heads / num_kv_heads, a power of two <= 16
    i32 block_size;              // tokens per KV-cache block (paged mode)
    i32 window;                  // 0: causal; else query i sees keys (i - window, i]
    i32 sink_mode;               // ATTN_SINK_* (0 none, 1 fp32, 2 bf16, 3 fp16)
    i32 num_splits;              // decode: KV splits per (request, KV head); grid.z
    i32 min_q_len;               // this launch handles requests with min_q_len <= q_len <= max_q_len
    i32 max_q_len;
    i32 min_chunk;               // decode: fewest keys per split (multiple of 16)
    i32 plain_kv;                // 1: K/V rows of request r start at token query_start_loc[r]
    float scale_log2;            // softmax scale * log2(e)
    i32 _pad;
    // Decode with the KV-cache write folded in (paged mode; 0 = the cache already holds the new
    // rows): the new K/V rows [T, Hkv, 64] of the queries' tokens. The decode kernel reads a
    // request's new keys from here instead of the cache and stores them into the cache.
    const u16* k_new;
    const u16* v_new;
    i64 k_new_stride_tok;        // key.stride(0)
    i64 k_new_stride_head;       // key.stride(1)
    i64 v_new_stride_tok;        // value.stride(0)
    i64 v_new_stride_head;       // value.stride(1)
    // RoPE folded in (GPT-OSS's neox style over all 64 dims; null: q and the new keys arrive
    // rotated). [rope_positions][64] fp32: cos of the 32 frequencies, then their sin (vLLM's
    // cos_sin_cache). The decode kernel rotates its q fragments and the new keys it reads from
    // k_new, at the positions vLLM gives its rotary op: query i of request r at
    // seq_len - q_len + i, a new key at its own index. The launcher checks that every position is
    // below rope_positions (max_seq_len <= rope_positions).
    const float* rope_cos_sin;
    i64 rope_positions;
};

// The RoPE launch (attn_rope_write): q -> q_out rotated, the new keys rotated into the cache, the
// new values copied there. Strides in elements.
struct AttnRopeWriteParams {
    const u16* q;                // [T, Hq, 64], last dim contiguous
    u16* q_out;                  // [T, Hq, 64]: the attention's output buffer
    const i32* query_start_loc;  // [num_reqs + 1]
    const i32* seq_lens;         // [num_reqs]
    const float* rope_cos_sin;   // as AttnParams::rope_cos_sin
    i64 q_stride_tok;            // q.stride(0)
    i64 q_stride_head;           // q.stride(1)
    i64 qo_stride_tok;           // q_out.stride(0)
    i64 qo_stride_head;          // q_out.stride(1)
    AttnKvRows kv;               // the new keys (rotated on the way) and values; slot < 0: skipped
    i32 num_tokens;              // T = query_start_loc[num_reqs]
    i32 num_reqs;
    i32 num_q_heads;
};
static_assert(sizeof(AttnRopeWriteParams) == 200, "AttnRopeWriteParams layout must match Rust");

// -------------------------------------------------------------------------------------------------
// Small helpers.
// -------------------------------------------------------------------------------------------------

// 2^x on the SFU. ex2.approx has ~2 ulp error, far below bf16/fp16 output precision, and maps -inf
// to +0, which is exactly what masked scores need.
__device__ __forceinline__ float attn_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// Swizzled element offset of (row, 8-element chunk) in a [rows][64] u16 tile: XORing the 16-byte
// chunk index with the low 3 row bits puts the 8 rows that one ldmatrix phase reads into 8
// different bank groups (an unswizzled 128-byte pitch would be an 8-way bank conflict).
__device__ __forceinline__ int attn_swz(int row, int chunk) {
    return row * ATTN_HEAD_DIM + ((chunk ^ (row & 7)) << 3);
}

// Sink logit of query head `hq`, already multiplied by log2(e); -inf when there is none. The
// sinks keep their own dtype (vLLM stores them as a bf16 parameter even for fp16 models).
__device__ __forceinline__ float attn_sink_log2(const AttnParams& p, int hq) {
    if (p.sink_mode == ATTN_SINK_F32) return ((const float*)p.sinks)[hq] * ATTN_LOG2E;
    if (p.sink_mode == ATTN_SINK_BF16) return bf16_to_f32(((const u16*)p.sinks)[hq]) * ATTN_LOG2E;
    if (p.sink_mode == ATTN_SINK_F16) return f16_to_f32(((const u16*)p.sinks)[hq]) * ATTN_LOG2E;
    return ATTN_NEG_INF;
}

// Element offset of key `key` of request `r`, KV head `kvh` (same for K and V: V's base pointer
// already carries the +64 of the packed [K|V] cache row).
__device__ __forceinline__ i64 attn_kv_offset(const AttnParams& p, int r, int kvh, int key,
                                              int plain_base) {
    if (p.plain_kv) {
        return (i64)(plain_base + key) * p.kv_stride_tok + (i64)kvh * p.kv_stride_head;
    }
    const int blk = key / p.block_size;
    const int page = p.block_table[(i64)r * p.bt_stride + blk];
    return (i64)page * p.kv_stride_block + (i64)(key - blk * p.block_size) * p.kv_stride_tok +
           (i64)kvh * p.kv_stride_head;
}

// Is key `key` visible from query position `qpos`?
__device__ __forceinline__ bool attn_visible(int key, int qpos, int window) {
    return key <= qpos && (window == 0 || key > qpos - window);
}

// Quad (4 lanes sharing one mma row) reductions.
__device__ __forceinline__ float attn_quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float attn_quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Decode split range (in 16-key tiles, relative to `lo`), computed the same way by every split
// so both agree on which splits exist.
struct AttnDecodeRange {
    int lo_exact;  // first key any query of the request may see (keys below are never read)
    int lo;     // first key of tile 0 (lo_exact rounded down to a multiple of 16)
    int begin;  // first tile of this split
    int end;    // one past the last tile of this split
    int used;   // splits that hold keys (0 .. used - 1, at least 1); the others exit at once
};

__device__ __forceinline__ AttnDecodeRange attn_decode_range(const AttnParams& p, int seq_len,
                                                             int q_len, int split) {
    const int first_qpos = seq_len - q_len;
    const int lo_exact = p.window > 0 ? max(0, first_qpos - p.window + 1) : 0;
    const int lo = lo_exact & ~(ATTN_DECODE_KEYS - 1);
    const int n_tiles = seq_len > lo ? (seq_len - lo + ATTN_DECODE_KEYS - 1) / ATTN_DECODE_KEYS : 0;
    int per_split = (n_tiles + p.num_splits - 1) / p.num_splits;
    per_split = max(per_split, p.min_chunk / ATTN_DECODE_KEYS);
    per_split = max(per_split, 1);
    AttnDecodeRange rg;
    rg.lo_exact = lo_exact;
    rg.lo = lo;
    rg.begin = min(split * per_split, n_tiles);
    rg.end = min(rg.begin + per_split, n_tiles);
    rg.used = max(1, min(p.num_splits, (n_tiles + per_split - 1) / per_split));
    return rg;
}

// Workspace row of (request, split, KV head, mma row).
__device__ __forceinline__ i64 attn_ws_row(const AttnParams& p, int r, int split, int kvh, int row) {
    return (((i64)r * p.num_splits + split) * p.num_kv_heads + kvh) * ATTN_DECODE_ROWS + row;
}

// -------------------------------------------------------------------------------------------------
// Tensor-core tile products shared by the varlen and decode kernels.
// -------------------------------------------------------------------------------------------------

// S[j] += Q(16 x 64) . K[j*8 .. j*8+7]^T for NJ 8-key groups. `sk` is a swizzled [keys][64] tile;
// qf holds the 4 k-steps of Q's A fragments. K is stored [key][dim], i.e. the "col" B operand, so a
// plain ldmatrix delivers it: one x4 covers 8 keys x 32 dims (two k-steps).
template <int DTYPE, int NJ>
__device__ __forceinline__ void attn_qk(float (&s)[NJ][4], const u32 (&qf)[4][4], const u16* sk,
                                        int lane) {
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j][e] = 0.f;
        const int key = j * 8 + (lane & 7);
#pragma unroll
        for (int ks2 = 0; ks2 < 2; ++ks2) {
            u32 b[4];
            ldmatrix_x4(b, sk + attn_swz(key, ks2 * 4 + (lane >> 3)));
            const u32 b01[2] = {b[0], b[1]};
            const u32 b23[2] = {b[2], b[3]};
            mma_m16n8k16<DTYPE>(s[j], qf[2 * ks2], b01);
            mma_m16n8k16<DTYPE>(s[j], qf[2 * ks2 + 1], b23);
        }
    }
}

// O += P(16 x 16*NK) . V(16*NK keys x 64). The C fragments of two adjacent 8-key score groups are
// exactly the A fragment of one k16 step (FlashAttention-2's register reuse), so P never touches
// shared memory. V is stored [key][dim] (row-major K x N), hence the transposing ldmatrix.
template <int DTYPE, int NK>
__device__ __forceinline__ void attn_pv(float (&o)[8][4], const float (&s)[2 * NK][4], const u16* sv,
                                        int lane) {
#pragma unroll
    for (int kk = 0; kk < NK; ++kk) {
        u32 a[4];
        a[0] = pack_half2<DTYPE>(s[2 * kk][0], s[2 * kk][1]);
        a[1] = pack_half2<DTYPE>(s[2 * kk][2], s[2 * kk][3]);
        a[2] = pack_half2<DTYPE>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        a[3] = pack_half2<DTYPE>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
        const int key = kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
#pragma unroll
        for (int dn2 = 0; dn2 < 4; ++dn2) {
            u32 b[4];
            ldmatrix_x4_trans(b, sv + attn_swz(key, 2 * dn2 + (lane >> 4)));
            const u32 b01[2] = {b[0], b[1]};
            const u32 b23[2] = {b[2], b[3]};
            mma_m16n8k16<DTYPE>(o[2 * dn2], a, b01);
            mma_m16n8k16<DTYPE>(o[2 * dn2 + 1], a, b23);
        }
    }
}

// One online-softmax step for the two rows a thread owns (mma rows g and g+8). `s` holds raw
// scores on entry and unnormalised probabilities on exit; masking is done by the caller (-inf).
template <int NJ>
__device__ __forceinline__ void attn_softmax_step(float (&s)[NJ][4], float (&o)[8][4], float (&m)[2],
                                                  float (&l)[2]) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        float mx = ATTN_NEG_INF;
#pragma unroll
        for (int j = 0; j < NJ; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * i], s[j][2 * i + 1]));
        mx = attn_quad_max(mx);
        const float m_new = fmaxf(m[i], mx);
        // A row with nothing visible yet (and no sink) keeps max -inf; use 0 as the reference
        // so that exp2(-inf - ref) = 0 instead of NaN.
        const float ref = m_new == ATTN_NEG_INF ? 0.f : m_new;
        const float alpha = attn_exp2(m[i] - ref);
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
            s[j][2 * i] = attn_exp2(s[j][2 * i] - ref);
            s[j][2 * i + 1] = attn_exp2(s[j][2 * i + 1] - ref);
            sum += s[j][2 * i] + s[j][2 * i + 1];
        }
        l[i] = l[i] * alpha + sum;
#pragma unroll
        for (int dn = 0; dn < 8; ++dn) {
            o[dn][2 * i] *= alpha;
            o[dn][2 * i + 1] *= alpha;
        }
        m[i] = m_new;
    }
}

// -------------------------------------------------------------------------------------------------
// KV-cache write.
// -------------------------------------------------------------------------------------------------

// RoPE of two packed dim pairs: lo2 holds dims (d, d + 1), hi2 dims (d + 32, d + 33), `cs` the
// position's cos/sin row. x_lo' = x_lo cos - x_hi sin, x_hi' = x_hi cos + x_lo sin in fp32, rounded
// once to the input dtype (what vLLM's compiled rotary op stores).
template <int DTYPE>
__device__ __forceinline__ void attn_rope_u32(const float* cs, int d, u32& lo2, u32& hi2) {
    const float a0 = half_to_f32<DTYPE>((u16)(lo2 & 0xffffu));
    const float a1 = half_to_f32<DTYPE>((u16)(lo2 >> 16));
    const float b0 = half_to_f32<DTYPE>((u16)(hi2 & 0xffffu));
    const float b1 = half_to_f32<DTYPE>((u16)(hi2 >> 16));
    const float2 c = *(const float2*)(cs + d);  // d is even: 8-byte aligned
    const float2 s = *(const float2*)(cs + 32 + d);
    lo2 = pack_half2<DTYPE>(a0 * c.x - b0 * s.x, a1 * c.y - b1 * s.y);
    hi2 = pack_half2<DTYPE>(b0 * c.x + a0 * s.x, b1 * c.y + a1 * s.y);
}

// RoPE of 16-byte chunk `ch` (dims 8 ch .. 8 ch + 7) of a row, given its partner chunk ch ^ 4
// (the dims 32 apart): returns the rotated chunk `ch`.
template <int DTYPE>
__device__ __forceinline__ u32x4 attn_rope_chunk(const float* cs, int ch, u32x4 mine,
                                                 u32x4 partner) {
    const bool low = ch < 4;
    u32x4 lo = low ? mine : partner;
    u32x4 hi = low ? partner : mine;
    const int d = (ch & 3) * 8;
    attn_rope_u32<DTYPE>(cs, d, lo.x, hi.x);
    attn_rope_u32<DTYPE>(cs, d + 2, lo.y, hi.y);
    attn_rope_u32<DTYPE>(cs, d + 4, lo.z, hi.z);
    attn_rope_u32<DTYPE>(cs, d + 6, lo.w, hi.w);
    return low ? lo : hi;
}

// The cos/sin row of query token t: its request by binary search over query_start_loc (the last
// request starting at or before t; empty requests before it start at t too), then
// seq_len - q_len + (t - start).
__device__ __forceinline__ const float* attn_rope_row(const AttnRopeWriteParams& p, int t) {
    int lo = 0, hi = p.num_reqs - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (p.query_start_loc[mid] <= t) lo = mid; else hi = mid - 1;
    }
    const int q0 = p.query_start_loc[lo];
    const int pos = p.seq_lens[lo] - (p.query_start_loc[lo + 1] - q0) + (t - q0);
    return p.rope_cos_sin + (i64)pos * ATTN_HEAD_DIM;
}

// The cache slot of new row `token` (< 0: a padding token, not written).
__device__ __forceinline__ i64 attn_kv_slot(const AttnKvRows& kv, i64 token) {
    return kv.slot_is_i64 ? ((const i64*)kv.slot_mapping)[token]
                          : (i64)((const i32*)kv.slot_mapping)[token];
}

// Where KV head `head` of new row `token` comes from (K, or V when `is_v`).
__device__ __forceinline__ const u16* attn_kv_src(const AttnKvRows& kv, i64 token, int head,
                                                  bool is_v) {
    return is_v ? kv.value + token * kv.value_stride_tok + head * kv.value_stride_head
                : kv.key + token * kv.key_stride_tok + head * kv.key_stride_head;
}

// Where it goes: the row of cache slot `slot` (>= 0), KV head `head`, K or V half.
__device__ __forceinline__ u16* attn_kv_dst(const AttnKvRows& kv, i64 slot, int head, bool is_v) {
    const i64 blk = slot / kv.block_size;
    const i64 off = slot - blk * kv.block_size;
    return (is_v ? kv.v_cache : kv.k_cache) + blk * kv.cache_stride_block +
           off * kv.cache_stride_tok + head * kv.cache_stride_head;
}

// One half-warp per row of (token, q head | K head | V head): lane l of the half moves dims
// (2l, 2l + 1) and (2l + 32, 2l + 33), rotating q and K rows. A token finds its request by binary
// search over query_start_loc (uniform across the half-warp); tokens past the last request's
// (CUDA-graph padding) are left alone.
template <int DTYPE>
__device__ __forceinline__ void attn_rope_write_impl(const AttnRopeWriteParams& p) {
    const AttnKvRows& kv = p.kv;
    const int per_token = p.num_q_heads + 2 * kv.num_kv_heads;
    const i64 row = (i64)blockIdx.x * (blockDim.x >> 4) + (threadIdx.x >> 4);
    const int l = threadIdx.x & 15;
    const i64 total = (i64)p.num_tokens * per_token;
    if (row >= total) return;
    const int t = (int)(row / per_token);
    const int j = (int)(row - (i64)t * per_token);
    const int d = 2 * l;
    if (t >= p.query_start_loc[p.num_reqs]) return;  // padding rows past the requests' tokens
    if (j >= p.num_q_heads) {  // K or V row: into the cache at the token's slot
        const i64 slot = attn_kv_slot(kv, t);
        if (slot < 0) return;  // padding token
        const bool is_v = j >= p.num_q_heads + kv.num_kv_heads;
        const int h = is_v ? j - p.num_q_heads - kv.num_kv_heads : j - p.num_q_heads;
        const u16* src = attn_kv_src(kv, t, h, is_v);
        u32 lo = *(const u32*)(src + d), hi = *(const u32*)(src + d + 32);
        if (!is_v) attn_rope_u32<DTYPE>(attn_rope_row(p, t), d, lo, hi);
        u16* dst = attn_kv_dst(kv, slot, h, is_v);
        *(u32*)(dst + d) = lo;
        *(u32*)(dst + d + 32) = hi;
        return;
    }
    const u16* src = p.q + (i64)t * p.q_stride_tok + (i64)j * p.q_stride_head;
    u32 lo = *(const u32*)(src + d), hi = *(const u32*)(src + d + 32);
    attn_rope_u32<DTYPE>(attn_rope_row(p, t), d, lo, hi);
    u16* dst = p.q_out + (i64)t * p.qo_stride_tok + (i64)j * p.qo_stride_head;
    *(u32*)(dst + d) = lo;
    *(u32*)(dst + d + 32) = hi;
}

extern "C" __global__ __launch_bounds__(256) void attn_rope_write_bf16(
    const AttnRopeWriteParams p) {
    attn_rope_write_impl<DTYPE_BF16>(p);
}
extern "C" __global__ __launch_bounds__(256) void attn_rope_write_f16(
    const AttnRopeWriteParams p) {
    attn_rope_write_impl<DTYPE_F16>(p);
}

// One thread moves one 16-byte chunk: (token, head, K chunk 0..7 | V chunk 8..15).
template <int DTYPE>
__device__ __forceinline__ void attn_kv_write_impl(const AttnKvWriteParams& p) {
    const AttnKvRows& kv = p.kv;
    const i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const i64 per_token = (i64)kv.num_kv_heads * 16;
    const i64 token = idx / per_token;
    if (token >= p.num_tokens) return;
    const int rem = (int)(idx - token * per_token);
    const int head = rem >> 4;
    const int part = rem & 15;
    const i64 slot = attn_kv_slot(kv, token);
    if (slot < 0) return;  // padding token
    const bool is_v = part >= 8;
    const int chunk = part & 7;
    const u16* src = attn_kv_src(kv, token, head, is_v);
    u16* dst = attn_kv_dst(kv, slot, head, is_v);
    *(u32x4*)(dst + chunk * 8) = *(const u32x4*)(src + chunk * 8);
}

extern "C" __global__ __launch_bounds__(256) void attn_kv_write_bf16(const AttnKvWriteParams p) {
    attn_kv_write_impl<DTYPE_BF16>(p);
}
extern "C" __global__ __launch_bounds__(256) void attn_kv_write_f16(const AttnKvWriteParams p) {
    attn_kv_write_impl<DTYPE_F16>(p);
}

// -------------------------------------------------------------------------------------------------
// Varlen (prefill / mixed) kernel.
// grid = (floor(T / TQ) + num_reqs, num_kv_heads), block = 32 * WARPS, TQ = 16 * WARPS / group.
// CTA x belongs to the request r with tile_start(r) <= x < tile_start(r+1), where
// tile_start(r) = query_start_loc[r] / TQ + r (Triton's trick: a data-independent grid that covers
// every request's ceil(q_len / TQ) tiles). Rows of the CTA tile are token-major: row = t * G + g.
// -------------------------------------------------------------------------------------------------

template <int DTYPE, int WARPS>
__device__ __forceinline__ void attn_fwd_impl(const AttnParams& p) {
    constexpr int BM = 16 * WARPS;
    constexpr int BN = ATTN_FWD_KEYS;
    constexpr int NT = 32 * WARPS;
    __shared__ __align__(128) u16 s_q[BM * ATTN_HEAD_DIM];
    __shared__ __align__(128) u16 s_k[2][BN * ATTN_HEAD_DIM];
    __shared__ __align__(128) u16 s_v[2][BN * ATTN_HEAD_DIM];

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int G = p.group;
    const int g_shift = __ffs(G) - 1;
    const int TQ = BM >> g_shift;
    const int kvh = blockIdx.y;
    const int tile = blockIdx.x;

    // Which request does this tile belong to? (largest r with tile_start(r) <= tile)
    int lo = 0, hi = p.num_reqs - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (p.query_start_loc[mid] / TQ + mid <= tile) lo = mid; else hi = mid - 1;
    }
    const int r = lo;
    const int q_start = p.query_start_loc[r];
    const int q_len = p.query_start_loc[r + 1] - q_start;
    if (q_len < p.min_q_len || q_len > p.max_q_len) return;
    const int t0 = (tile - (q_start / TQ + r)) * TQ;
    if (t0 >= q_len || t0 < 0) return;
    const int seq_len = p.seq_lens[r];
    const int ctx = seq_len - q_len;
    const int t_last = min(t0 + TQ, q_len) - 1;
    const int qpos_first = ctx + t0;
    const int qpos_last = ctx + t_last;
    const int kv_hi = qpos_last + 1;
    // Keys below kv_lo_exact are outside every row's window: they are never read (zero-filled),
    // since vLLM may already have freed and reused their blocks on sliding layers.
    const int kv_lo_exact = p.window > 0 ? max(0, qpos_first - p.window + 1) : 0;
    const int kv_lo = kv_lo_exact & ~(BN - 1);
    const int n_tiles = kv_hi > kv_lo ? (kv_hi - kv_lo + BN - 1) / BN : 0;

    // Q tile -> shared (rows past the request's end read as zero).
#pragma unroll
    for (int i = 0; i < BM * 8 / NT; ++i) {
        const int c = tid + i * NT;
        const int row = c >> 3, ch = c & 7;
        const int t = t0 + (row >> g_shift);
        const int hq = kvh * G + (row & (G - 1));
        const bool ok = t < q_len;
        const u16* src = ok ? p.q + (i64)(q_start + t) * p.q_stride_tok + (i64)hq * p.q_stride_head + ch * 8
                            : p.q;
        cp_async_16_zfill(s_q + attn_swz(row, ch), src, ok ? 16u : 0u);
    }

    // One KV tile -> shared stage: each thread computes a row's offset once for its K and V chunk.
    auto load_kv = [&](int stage, int key0) {
#pragma unroll
        for (int i = 0; i < BN * 8 / NT; ++i) {
            const int c = tid + i * NT;
            const int row = c >> 3, ch = c & 7;
            const int key = key0 + row;
            const bool ok = key < kv_hi && key >= kv_lo_exact;
            const i64 off = ok ? attn_kv_offset(p, r, kvh, key, q_start) + ch * 8 : 0;
            cp_async_16_zfill(s_k[stage] + attn_swz(row, ch), p.k + off, ok ? 16u : 0u);
            cp_async_16_zfill(s_v[stage] + attn_swz(row, ch), p.v + off, ok ? 16u : 0u);
        }
    };

    if (n_tiles > 0) load_kv(0, kv_lo);
    cp_async_commit();

    // Per-thread state for mma rows g and g+8 of this warp.
    const int g = lane >> 2, tq = lane & 3;
    float m[2], l[2];
    int qpos[2];
    float sink2[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int row = warp * 16 + g + 8 * i;
        qpos[i] = ctx + t0 + (row >> g_shift);
        sink2[i] = attn_sink_log2(p, kvh * G + (row & (G - 1)));
        m[i] = sink2[i];  // the sink seeds the running max (denominator-only)
        l[i] = 0.f;
    }
    float o[8][4];
#pragma unroll
    for (int dn = 0; dn < 8; ++dn)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[dn][e] = 0.f;
    u32 qf[4][4];

    for (int it = 0; it < n_tiles; ++it) {
        const int key0 = kv_lo + it * BN;
        if (it + 1 < n_tiles) load_kv((it + 1) & 1, key0 + BN);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        if (it == 0) {
#pragma unroll
            for (int ks = 0; ks < 4; ++ks)
                ldmatrix_x4(qf[ks], s_q + attn_swz(warp * 16 + (lane & 15), ks * 2 + (lane >> 4)));
        }
        const int st = it & 1;
        float s[8][4];
        attn_qk<DTYPE, 8>(s, qf, s_k[st], lane);

        // Scale to the log2 domain, mask only where the tile crosses the causal diagonal or the
        // window's lower edge.
        const bool need_mask = key0 + BN - 1 > qpos_first || (p.window > 0 && key0 <= qpos_last - p.window);
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float x = s[j][e] * p.scale_log2;
                if (need_mask) {
                    const int key = key0 + j * 8 + 2 * tq + (e & 1);
                    if (!attn_visible(key, qpos[e >> 1], p.window)) x = ATTN_NEG_INF;
                }
                s[j][e] = x;
            }
        attn_softmax_step<8>(s, o, m, l);
        attn_pv<DTYPE, 4>(o, s, s_v[st], lane);
        __syncthreads();  // everyone is done with stage `st` before it is refilled
    }
    cp_async_wait<0>();

    // Finalise: the sink joins the denominator only.
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const float lsum = attn_quad_sum(l[i]);
        const float ref = m[i] == ATTN_NEG_INF ? 0.f : m[i];
        const float denom = lsum + attn_exp2(sink2[i] - ref);
        const float inv = denom > 0.f ? 1.f / denom : 0.f;
        const int row = warp * 16 + g + 8 * i;
        const int t = t0 + (row >> g_shift);
        if (t <= t_last) {
            const int hq = kvh * G + (row & (G - 1));
            u16* dst = p.o + (i64)(q_start + t) * p.o_stride_tok + (i64)hq * p.o_stride_head + 2 * tq;
#pragma unroll
            for (int dn = 0; dn < 8; ++dn)
                *(u32*)(dst + dn * 8) = pack_half2<DTYPE>(o[dn][2 * i] * inv, o[dn][2 * i + 1] * inv);
        }
    }
}

extern "C" __global__ __launch_bounds__(128) void attn_fwd_m64_bf16(const AttnParams p) {
    attn_fwd_impl<DTYPE_BF16, 4>(p);
}
extern "C" __global__ __launch_bounds__(128) void attn_fwd_m64_f16(const AttnParams p) {
    attn_fwd_impl<DTYPE_F16, 4>(p);
}
extern "C" __global__ __launch_bounds__(256) void attn_fwd_m128_bf16(const AttnParams p) {
    attn_fwd_impl<DTYPE_BF16, 8>(p);
}
extern "C" __global__ __launch_bounds__(256) void attn_fwd_m128_f16(const AttnParams p) {
    attn_fwd_impl<DTYPE_F16, 8>(p);
}

// Normalises one row's 8 accumulators with the sink folded into the denominator and stores them.
template <int DTYPE>
__device__ __forceinline__ void attn_store_final(u16* dst, const float (&acc)[8], float mx,
                                                 float lsum, float sink2) {
    const float mm = fmaxf(mx, sink2);
    const float ref = mm == ATTN_NEG_INF ? 0.f : mm;
    const float f = attn_exp2(mx - ref);
    const float denom = lsum * f + attn_exp2(sink2 - ref);
    const float scale = denom > 0.f ? f / denom : 0.f;
    u32x4 out;
    out.x = pack_half2<DTYPE>(acc[0] * scale, acc[1] * scale);
    out.y = pack_half2<DTYPE>(acc[2] * scale, acc[3] * scale);
    out.z = pack_half2<DTYPE>(acc[4] * scale, acc[5] * scale);
    out.w = pack_half2<DTYPE>(acc[6] * scale, acc[7] * scale);
    *(u32x4*)dst = out;
}

// Loads that bypass L1: partials written by other CTAs of the same launch must come from L2.
__device__ __forceinline__ float attn_ld_cg(const float* ptr) {
    float v;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(ptr));
    return v;
}
__device__ __forceinline__ float4 attn_ld_cg4(const float* ptr) {
    float4 v;
    asm volatile("ld.global.cg.v4.f32 {%0,%1,%2,%3}, [%4];"
                 : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                 : "l"(ptr));
    return v;
}

// Merges the partials of every split of (request r, KV head kvh) for one row / 8 dims:
// out = sum_s acc_s 2^(m_s - M) / (2^(sink - M) + sum_s l_s 2^(m_s - M)), M = max(sink, max m_s).
// Only the `used` splits that hold keys wrote partials (a graph captured for max_model_len plans
// many splits that short contexts leave empty); an empty one among them (sum 0: every key
// masked) is skipped, its accumulators never read.
template <int DTYPE>
__device__ __forceinline__ void attn_combine_row(const AttnParams& p, int r, int kvh, int row,
                                                 int d0, float sink2, int used, u16* dst) {
    // One pass, online: the loads of different splits are independent, so unrolling lets them
    // all be in flight together (one L2 round trip instead of one per split).
    float mx = sink2;
    float denom = sink2 == ATTN_NEG_INF ? 0.f : 1.f;  // 2^(sink - mx) with mx = sink
    float acc[8];
#pragma unroll
    for (int d = 0; d < 8; ++d) acc[d] = 0.f;
#pragma unroll 4
    for (int s = 0; s < used; ++s) {
        const i64 wr = attn_ws_row(p, r, s, kvh, row);
        const float ms = attn_ld_cg(p.ws_ml + wr * 2);
        const float ls = attn_ld_cg(p.ws_ml + wr * 2 + 1);
        const float4 a = attn_ld_cg4(p.ws_acc + wr * ATTN_HEAD_DIM + d0);
        const float4 b = attn_ld_cg4(p.ws_acc + wr * ATTN_HEAD_DIM + d0 + 4);
        if (!(ls > 0.f)) continue;  // empty split
        const float m_new = fmaxf(mx, ms);
        const float old = mx == ATTN_NEG_INF ? 0.f : attn_exp2(mx - m_new);
        const float f = attn_exp2(ms - m_new);
        denom = denom * old + ls * f;
        acc[0] = acc[0] * old + a.x * f; acc[1] = acc[1] * old + a.y * f;
        acc[2] = acc[2] * old + a.z * f; acc[3] = acc[3] * old + a.w * f;
        acc[4] = acc[4] * old + b.x * f; acc[5] = acc[5] * old + b.y * f;
        acc[6] = acc[6] * old + b.z * f; acc[7] = acc[7] * old + b.w * f;
        mx = m_new;
    }
    const float inv = denom > 0.f ? 1.f / denom : 0.f;
    u32x4 out;
    out.x = pack_half2<DTYPE>(acc[0] * inv, acc[1] * inv);
    out.y = pack_half2<DTYPE>(acc[2] * inv, acc[3] * inv);
    out.z = pack_half2<DTYPE>(acc[4] * inv, acc[5] * inv);
    out.w = pack_half2<DTYPE>(acc[6] * inv, acc[7] * inv);
    *(u32x4*)dst = out;
}

// -------------------------------------------------------------------------------------------------
// Split-KV decode kernel.
// grid = (num_reqs, num_kv_heads, num_splits), block = 128 (4 warps). Handles requests with
// q_len * G <= 16; mma rows are token-major (row = t * G + g), rows past q_len * G are zero.
// -------------------------------------------------------------------------------------------------

template <int DTYPE, int NST>
__device__ __forceinline__ void attn_decode_impl(const AttnParams& p) {
    constexpr int W = ATTN_DECODE_WARPS;
    constexpr int TILE = ATTN_DECODE_KEYS * ATTN_HEAD_DIM;  // u16 per K (or V) tile
    // [warp][stage][K|V][16 x 64] in dynamic shared memory (NST * 16 KB, set by the launcher);
    // reused as the fp32 merge area at the end.
    extern __shared__ __align__(128) u16 s_kv[];
    static_assert(W * NST * 2 * TILE * 2 >= W * ATTN_DECODE_ROWS * (ATTN_HEAD_DIM + 2) * 4 + 16,
                  "merge area must fit in the pipeline buffers");

    // vLLM's o projection follows (our NF4 linear, launched with PDL on sm_90): it may build its
    // table and put its weights in flight while this grid runs.
    pdl_trigger();
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int r = blockIdx.x;
    const int kvh = blockIdx.y;
    const int split = blockIdx.z;
    const int G = p.group;
    const int g_shift = __ffs(G) - 1;

    const int q_start = p.query_start_loc[r];
    const int q_len = p.query_start_loc[r + 1] - q_start;
    if (q_len < p.min_q_len || q_len > p.max_q_len || q_len <= 0) return;
    const int rows = q_len * G;  // <= 16, checked by the launcher through max_q_len
    const int seq_len = p.seq_lens[r];
    const int ctx = seq_len - q_len;
    const AttnDecodeRange rg = attn_decode_range(p, seq_len, q_len, split);
    // A graph captured for max_model_len plans splits for the longest context; at a shorter one
    // the splits past the last that holds keys have nothing to add. They leave before any load,
    // and the arrival count and the merge cover the `used` splits only (every split of a
    // (request, KV head) computes the same `used`); with one used split it writes the output
    // itself, as an unsplit launch does.
    if (split >= rg.used) return;

    // Q A-fragments straight from global memory (2 KB, read once): a0 = (g, 2t..), a1 = (g+8, 2t..),
    // a2 = (g, 2t+8..), a3 = (g+8, 2t+8..) for each 16-wide k-step.
    const int g = lane >> 2, tq = lane & 3;
    u32 qf[4][4];
    int qpos[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int row = g + 8 * i;
        qpos[i] = ctx + (row >> g_shift);
        const bool ok = row < rows;
        const u16* src = p.q + (i64)(q_start + (row >> g_shift)) * p.q_stride_tok +
                         (i64)(kvh * G + (row & (G - 1))) * p.q_stride_head + 2 * tq;
#pragma unroll
        for (int ks = 0; ks < 4; ++ks) {
            qf[ks][i] = ok ? *(const u32*)(src + ks * 16) : 0u;
            qf[ks][i + 2] = ok ? *(const u32*)(src + ks * 16 + 8) : 0u;
        }
    }

    u16* my_kv = s_kv + warp * NST * 2 * TILE;

    // This warp's tiles: begin + warp, begin + warp + W, ... (warp-local index t).
    const int first = rg.begin + warp;
    const int n_mine = first < rg.end ? (rg.end - first + W - 1) / W : 0;
    auto tile_key0 = [&](int t) { return rg.lo + (first + t * W) * ATTN_DECODE_KEYS; };

    // A 16-key tile starts at a multiple of 16 and the block size is a multiple of 16, so the
    // whole tile lies in one cache block. The block ids of the warp's tiles are fetched 32 at a
    // time ahead of use (lane j holds tile 32b + j, batches b and b + 1 in flight), so issuing a
    // tile's copies never waits on a block-table load.
    auto page_batch = [&](int b) -> int {
        const int t = b * 32 + lane;
        if (p.plain_kv || t >= n_mine) return 0;
        return p.block_table[(i64)r * p.bt_stride + tile_key0(t) / p.block_size];
    };
    // Cache row of this warp's tile that holds new keys (q_len <= 16 keys span at most two
    // tiles, and a warp's tiles lie 64 keys apart, so a warp has at most one).
    i64 new_key_base = 0;
    int pages_even = page_batch(0);  // batches 0, 2, 4, ...
    int pages_odd = page_batch(1);   // batches 1, 3, 5, ...
    auto load_tile = [&](int stage, int t) {
        u16* sk = my_kv + stage * 2 * TILE;
        u16* sv = sk + TILE;
        const int key0 = tile_key0(t);
        const int b = t >> 5;
        if ((t & 31) == 0 && b >= 1) {  // entering batch b: refill the slot of b - 1 with b + 1
            if (b & 1) pages_even = page_batch(b + 1); else pages_odd = page_batch(b + 1);
        }
        i64 base;
        if (p.plain_kv) {
            base = (i64)(q_start + key0) * p.kv_stride_tok + (i64)kvh * p.kv_stride_head;
        } else {
            const int page = __shfl_sync(0xffffffffu, (b & 1) ? pages_odd : pages_even, t & 31);
            base = (i64)page * p.kv_stride_block + (i64)(key0 % p.block_size) * p.kv_stride_tok +
                   (i64)kvh * p.kv_stride_head;
            if (key0 + ATTN_DECODE_KEYS > ctx) new_key_base = base;  // this warp's tile of new keys
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int c = lane + 32 * i;
            const int row = c >> 3, ch = c & 7;
            const int key = key0 + row;
            const bool ok = key < seq_len && key >= rg.lo_exact;
            const i64 off = ok ? base + (i64)row * p.kv_stride_tok + ch * 8 : 0;
            const u16* ksrc = p.k + off;
            const u16* vsrc = p.v + off;
            if (p.k_new != nullptr && ok && key >= ctx) {
                // A new token of this request (folded KV write): each key lies in exactly one
                // tile of one split, so this lane is its chunk's only reader and writer in the
                // launch. The tile takes it from the new rows, and the cache gets it for later
                // steps (no CTA of this launch reads it back from there).
                const i64 tok = q_start + (key - ctx);
                ksrc = p.k_new + tok * p.k_new_stride_tok + (i64)kvh * p.k_new_stride_head + ch * 8;
                vsrc = p.v_new + tok * p.v_new_stride_tok + (i64)kvh * p.v_new_stride_head + ch * 8;
                *(u32x4*)(const_cast<u16*>(p.v) + off) = *(const u32x4*)vsrc;
                // With RoPE the key lands unrotated; rope_new_keys rotates it in the stage and
                // stores it into the cache once the tile has arrived (no wait here).
                if (p.rope_cos_sin == nullptr)
                    *(u32x4*)(const_cast<u16*>(p.k) + off) = *(const u32x4*)ksrc;
            }
            cp_async_16_zfill(sk + attn_swz(row, ch), ksrc, ok ? 16u : 0u);
            cp_async_16_zfill(sv + attn_swz(row, ch), vsrc, ok ? 16u : 0u);
        }
    };

    // RoPE of the new keys in a landed stage (tile key0), then their cache rows: each lane
    // reads its chunks and their partners 32 dims away before any lane writes.
    auto rope_new_keys = [&](u16* sk, int key0) {
        // Chunk i of this lane: row (lane + 32 i) / 8 of the tile, 16-byte chunk lane % 8.
        const int ch = lane & 7;
        auto is_new = [&](int i) { return key0 + ((lane + 32 * i) >> 3) >= ctx &&
                                          key0 + ((lane + 32 * i) >> 3) < seq_len; };
        u32x4 rot[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int row = (lane + 32 * i) >> 3;
            if (is_new(i))
                rot[i] = attn_rope_chunk<DTYPE>(p.rope_cos_sin + (i64)(key0 + row) * ATTN_HEAD_DIM,
                                                ch, *(const u32x4*)(sk + attn_swz(row, ch)),
                                                *(const u32x4*)(sk + attn_swz(row, ch ^ 4)));
        }
        __syncwarp();
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int row = (lane + 32 * i) >> 3;
            if (!is_new(i)) continue;
            *(u32x4*)(sk + attn_swz(row, ch)) = rot[i];
            *(u32x4*)(const_cast<u16*>(p.k) + new_key_base + (i64)row * p.kv_stride_tok + ch * 8) =
                rot[i];
        }
    };

    float m[2] = {ATTN_NEG_INF, ATTN_NEG_INF};
    float l[2] = {0.f, 0.f};
    float o[8][4];
#pragma unroll
    for (int dn = 0; dn < 8; ++dn)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[dn][e] = 0.f;

#pragma unroll
    for (int i = 0; i < NST - 1; ++i) {
        if (i < n_mine) load_tile(i, i);
        cp_async_commit();
    }
    if (p.rope_cos_sin != nullptr) {
        // RoPE in the fragments (dims d and d + 32 sit in k-steps ks and ks + 2 of the same
        // lane), after the first tiles are in flight so the table loads overlap them. A new key
        // of this request sits at a query's position: these loads also bring its table rows in.
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            if (g + 8 * i >= rows) continue;
            const float* cs = p.rope_cos_sin + (i64)qpos[i] * ATTN_HEAD_DIM;
#pragma unroll
            for (int ks = 0; ks < 2; ++ks) {
                attn_rope_u32<DTYPE>(cs, ks * 16 + 2 * tq, qf[ks][i], qf[ks + 2][i]);
                attn_rope_u32<DTYPE>(cs, ks * 16 + 8 + 2 * tq, qf[ks][i + 2], qf[ks + 2][i + 2]);
            }
        }
    }
    for (int i = 0; i < n_mine; ++i) {
        const int pre = i + NST - 1;
        if (pre < n_mine) load_tile(pre % NST, pre);
        cp_async_commit();
        cp_async_wait<NST - 1>();
        __syncwarp();
        u16* sk = my_kv + (i % NST) * 2 * TILE;
        const int key0 = tile_key0(i);
        if (p.rope_cos_sin != nullptr && p.k_new != nullptr && key0 + ATTN_DECODE_KEYS > ctx) {
            rope_new_keys(sk, key0);
            __syncwarp();
        }
        float s[2][4];
        attn_qk<DTYPE, 2>(s, qf, sk, lane);
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = key0 + j * 8 + 2 * tq + (e & 1);
                const float x = s[j][e] * p.scale_log2;
                s[j][e] = attn_visible(key, qpos[e >> 1], p.window) ? x : ATTN_NEG_INF;
            }
        attn_softmax_step<2>(s, o, m, l);
        attn_pv<DTYPE, 1>(o, s, sk + TILE, lane);
        __syncwarp();  // all lanes are done with this stage before it is refilled
    }
    cp_async_wait<0>();
    __syncthreads();  // pipeline buffers are free: reuse them as the merge area

    // Merge the 4 warps' states: publish (max, sum) and the unnormalised acc in fp32.
    float* s_acc = (float*)s_kv;                                   // [W][16][64]
    float* s_m = s_acc + W * ATTN_DECODE_ROWS * ATTN_HEAD_DIM;    // [W][16]
    float* s_l = s_m + W * ATTN_DECODE_ROWS;                        // [W][16]
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const float lsum = attn_quad_sum(l[i]);
        const int row = g + 8 * i;
        if (tq == 0) {
            s_m[warp * ATTN_DECODE_ROWS + row] = m[i];
            s_l[warp * ATTN_DECODE_ROWS + row] = lsum;
        }
#pragma unroll
        for (int dn = 0; dn < 8; ++dn) {
            float* dst = s_acc + (warp * ATTN_DECODE_ROWS + row) * ATTN_HEAD_DIM + dn * 8 + 2 * tq;
            dst[0] = o[dn][2 * i];
            dst[1] = o[dn][2 * i + 1];
        }
    }
    __syncthreads();

    // 128 threads = 16 rows x 8 groups of 8 dims.
    const int row = tid >> 3;
    const int d0 = (tid & 7) * 8;
    const bool row_ok = row < rows;
    float mx = ATTN_NEG_INF;
#pragma unroll
    for (int w = 0; w < W; ++w) mx = fmaxf(mx, s_m[w * ATTN_DECODE_ROWS + row]);
    const float ref = mx == ATTN_NEG_INF ? 0.f : mx;
    float lsum = 0.f;
    float acc[8];
#pragma unroll
    for (int d = 0; d < 8; ++d) acc[d] = 0.f;
#pragma unroll
    for (int w = 0; w < W; ++w) {
        const float f = attn_exp2(s_m[w * ATTN_DECODE_ROWS + row] - ref);  // 0 for a warp that saw nothing
        lsum += s_l[w * ATTN_DECODE_ROWS + row] * f;
        const float* src = s_acc + (w * ATTN_DECODE_ROWS + row) * ATTN_HEAD_DIM + d0;
#pragma unroll
        for (int d = 0; d < 8; ++d) acc[d] += src[d] * f;
    }
    const int t = row >> g_shift;
    const int hq = kvh * G + (row & (G - 1));
    u16* out_ptr = p.o + (i64)(q_start + t) * p.o_stride_tok + (i64)hq * p.o_stride_head + d0;
    if (rg.used == 1) {
        if (row_ok) attn_store_final<DTYPE>(out_ptr, acc, mx, lsum, attn_sink_log2(p, hq));
        return;
    }

    // Several splits: publish this CTA's partial, then the last CTA to arrive merges them all.
    if (row_ok) {
        const i64 wr = attn_ws_row(p, r, split, kvh, row);
        float* wacc = p.ws_acc + wr * ATTN_HEAD_DIM + d0;
        *(float4*)wacc = make_float4(acc[0], acc[1], acc[2], acc[3]);
        *(float4*)(wacc + 4) = make_float4(acc[4], acc[5], acc[6], acc[7]);
        if ((tid & 7) == 0) {
            p.ws_ml[wr * 2] = mx;
            p.ws_ml[wr * 2 + 1] = lsum;
        }
    }
    __threadfence();  // partials visible device-wide before the arrival is counted
    __syncthreads();
    int* s_last = (int*)(s_l + W * ATTN_DECODE_ROWS);
    if (tid == 0) {
        u32* ctr = p.ws_ctr + (i64)r * p.num_kv_heads + kvh;
        const u32 prev = atomicAdd(ctr, 1u);
        const int last = prev == (u32)(rg.used - 1);
        if (last) *ctr = 0u;  // every split has arrived: reset for the next launch / graph replay
        *s_last = last;
    }
    __syncthreads();
    if (!*s_last || !row_ok) return;
    __threadfence();
    attn_combine_row<DTYPE>(p, r, kvh, row, d0, attn_sink_log2(p, hq), rg.used, out_ptr);
}

extern "C" __global__ __launch_bounds__(128) void attn_decode_s2_bf16(const AttnParams p) {
    attn_decode_impl<DTYPE_BF16, 2>(p);
}
extern "C" __global__ __launch_bounds__(128) void attn_decode_s2_f16(const AttnParams p) {
    attn_decode_impl<DTYPE_F16, 2>(p);
}
extern "C" __global__ __launch_bounds__(128) void attn_decode_s3_bf16(const AttnParams p) {
    attn_decode_impl<DTYPE_BF16, 3>(p);
}
extern "C" __global__ __launch_bounds__(128) void attn_decode_s3_f16(const AttnParams p) {
    attn_decode_impl<DTYPE_F16, 3>(p);
}
extern "C" __global__ __launch_bounds__(128) void attn_decode_s4_bf16(const AttnParams p) {
    attn_decode_impl<DTYPE_BF16, 4>(p);
}
extern "C" __global__ __launch_bounds__(128) void attn_decode_s4_f16(const AttnParams p) {
    attn_decode_impl<DTYPE_F16, 4>(p);
}
