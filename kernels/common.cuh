// Common header for every gptoss-3090 kernel (compiled by NVRTC at run time, sm_80 and newer).
//
// NVRTC has no headers built in, and we do not depend on the CUDA toolkit's headers at all, so
// this file provides the fixed-width types, bf16/fp16 conversions (through PTX `cvt`) and the
// small PTX helpers (mma.sync, ldmatrix, cp.async) that the kernel families share. Every kernel
// file starts with `#include "common.cuh"`. Keep helpers small, named and commented with *why*.
#pragma once

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef signed char i8;
typedef int i32;
typedef long long i64;

// 16-byte vector for wide global loads (one LDG.128 per thread).
struct __align__(16) u32x4 {
    u32 x, y, z, w;
};

// Element dtype selector shared with Rust (`crate::ops::Dtype`): 0 = bf16, 1 = fp16.
#define DTYPE_BF16 0
#define DTYPE_F16 1

// ---------------------------------------------------------------------------------------------
// Scalar conversions. bf16/fp16 values travel as raw u16 bit patterns.
// ---------------------------------------------------------------------------------------------

// bf16 -> f32 is exact: bf16 is the top half of an f32.
__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }

// f32 -> bf16 with round-to-nearest-even, as torch's `.to(torch.bfloat16)` does (NaN stays NaN).
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u16 r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}

// fp16 -> f32 (exact).
__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// f32 -> fp16, round-to-nearest-even.
__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}

// Dtype-generic load/store of one 16-bit element; `dtype` is a compile-time constant at call sites.
template <int DTYPE>
__device__ __forceinline__ float half_to_f32(u16 h) {
    return DTYPE == DTYPE_BF16 ? bf16_to_f32(h) : f16_to_f32(h);
}
template <int DTYPE>
__device__ __forceinline__ u16 f32_to_half(float f) {
    return DTYPE == DTYPE_BF16 ? f32_to_bf16(f) : f32_to_f16(f);
}

// Two f32 -> one packed pair (low 16 bits = `lo`), the register layout mma.sync expects.
template <int DTYPE>
__device__ __forceinline__ u32 pack_half2(float lo, float hi) {
    u32 r;
    if (DTYPE == DTYPE_BF16) {
        // cvt.rn.bf16x2.f32 d, a, b puts a in the upper half and b in the lower half.
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    } else {
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    }
    return r;
}

// ---------------------------------------------------------------------------------------------
// NF4 decoding.
// ---------------------------------------------------------------------------------------------

// The NF4 code table (bitsandbytes); index = 4-bit code. Code 7 is exact zero.
#define NF4_CODE_VALUES                                                                       \
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,                 \
        -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,            \
        0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f,                     \
        0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, \
        1.0f
__device__ __constant__ float kNf4Code[16] = {NF4_CODE_VALUES};
// The same table in global memory, for lookups whose index differs across a warp: the constant
// cache serves one address per cycle (16 distinct codes: 16 serialised reads), a global load
// one 64-byte sector for all.
__device__ const float kNf4CodeGlobal[16] = {NF4_CODE_VALUES};

// Elements per NF4 block and blocks per nested (double-quantization) block.
#define NF4_BLOCK 64
#define NF4_NESTED_BLOCK 256

// absmax of a nested (double-quantized) block: nested_map[code] * scale + offset as two fp32
// ops, product first, never fused into one FMA, the way bitsandbytes computes it
// (dequantize_blockwise, then `+ offset`), so absmax and with it every weight is bit-exact.
__device__ __forceinline__ float nf4_nested_absmax(float map_value, float scale, float offset) {
    return __fadd_rn(__fmul_rn(map_value, scale), offset);
}

// ---------------------------------------------------------------------------------------------
// Memory helpers.
// ---------------------------------------------------------------------------------------------

// 16-byte global load that bypasses L1 allocation: weights are streamed once, so caching them in
// L1 would only evict activations that are reused.
__device__ __forceinline__ u32x4 ld_global_stream_16(const void* ptr) {
    u32x4 v;
    asm volatile("ld.global.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(ptr));
    return v;
}

// 16-byte load through the read-only (non-coherent) path: for activations that many warps
// re-read (they stay in L1), never written while the kernel runs. Not volatile, so the
// compiler may schedule it early.
__device__ __forceinline__ u32x4 ld_global_nc_16(const void* ptr) {
    u32x4 v;
    asm("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(ptr));
    return v;
}

// 8-byte vector (one LDG.64 per thread).
struct __align__(8) u32x2 {
    u32 x, y;
};

// Predicated loads: zero when `pred` is false. The predicate sits inside the asm, so the
// compiler may schedule (even hoist) these non-volatile loads freely without ever touching an
// address the predicate rules out (a plain `pred ? load(p) : 0` around non-volatile asm may be
// turned into an unconditional load).
//
// 8 bytes of weights that are read once (L1::no_allocate keeps L1 for activations/statistics).
__device__ __forceinline__ u32x2 ld_stream_8_if(const void* ptr, bool pred) {
    u32x2 v = {0u, 0u};
    asm("{\n .reg .pred p;\n setp.ne.b32 p, %3, 0;\n"
        " @p ld.global.L1::no_allocate.v2.u32 {%0,%1}, [%2];\n}"
        : "+r"(v.x), "+r"(v.y)
        : "l"(ptr), "r"((int)pred));
    return v;
}
// 4 bytes of weights that are read once (the dequantize kernel's coalesced word loads).
__device__ __forceinline__ u32 ld_stream_4_if(const void* ptr, bool pred) {
    u32 v = 0u;
    asm("{\n .reg .pred p;\n setp.ne.b32 p, %2, 0;\n"
        " @p ld.global.L1::no_allocate.u32 %0, [%1];\n}"
        : "+r"(v)
        : "l"(ptr), "r"((int)pred));
    return v;
}
// 16 bytes through the read-only path (activations re-read by many warps).
__device__ __forceinline__ u32x4 ld_nc_16_if(const void* ptr, bool pred) {
    u32x4 v = {0u, 0u, 0u, 0u};
    asm("{\n .reg .pred p;\n setp.ne.b32 p, %5, 0;\n"
        " @p ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];\n}"
        : "+r"(v.x), "+r"(v.y), "+r"(v.z), "+r"(v.w)
        : "l"(ptr), "r"((int)pred));
    return v;
}
// The same as a prefetch: volatile, so the compiler keeps it where it is written instead of
// sinking it next to its first use.
__device__ __forceinline__ u32x4 ld_nc_16_if_volatile(const void* ptr, bool pred) {
    u32x4 v = {0u, 0u, 0u, 0u};
    asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %5, 0;\n"
                 " @p ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];\n}"
                 : "+r"(v.x), "+r"(v.y), "+r"(v.z), "+r"(v.w)
                 : "l"(ptr), "r"((int)pred));
    return v;
}
// The same through L2 only (ld.global.cg): for activations another block of the same launch
// wrote (the fused MoE's down phase reads the gate_up phase's h), where the read-only path's
// no-writes-during-the-kernel contract does not hold.
__device__ __forceinline__ u32x4 ld_cg_16_if_volatile(const void* ptr, bool pred) {
    u32x4 v = {0u, 0u, 0u, 0u};
    asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %5, 0;\n"
                 " @p ld.global.cg.v4.u32 {%0,%1,%2,%3}, [%4];\n}"
                 : "+r"(v.x), "+r"(v.y), "+r"(v.z), "+r"(v.w)
                 : "l"(ptr), "r"((int)pred));
    return v;
}

// Device-scope counter handshake between blocks of one launch (the fused MoE): the producer's
// writes are ordered before its count by a fence, and the consumer's reads after its acquire.
__device__ __forceinline__ u32 ld_acquire_gpu(const u32* ptr) {
    u32 v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(ptr) : "memory");
    return v;
}

// One statistic byte / word (read-only path).
__device__ __forceinline__ u32 ld_nc_u8_if(const u8* ptr, bool pred) {
    u32 v = 0u;
    asm("{\n .reg .pred p;\n setp.ne.b32 p, %2, 0;\n @p ld.global.nc.u8 %0, [%1];\n}"
        : "+r"(v)
        : "l"(ptr), "r"((int)pred));
    return v;
}
__device__ __forceinline__ u32 ld_nc_b32_if(const void* ptr, bool pred) {
    u32 v = 0u;
    asm("{\n .reg .pred p;\n setp.ne.b32 p, %2, 0;\n @p ld.global.nc.b32 %0, [%1];\n}"
        : "+r"(v)
        : "l"(ptr), "r"((int)pred));
    return v;
}

// One fp32 word, zero when `pred` is false: for a load that a plain `ptr ? ld_nc_f32(ptr) : v`
// would guard, since the compiler may hoist that non-volatile load above its condition (it did
// in the dequantize kernel's tail: a read of a null offset pointer).
__device__ __forceinline__ float ld_nc_f32_if(const float* ptr, bool pred) {
    return __uint_as_float(ld_nc_b32_if(ptr, pred));
}

// Scalar read-only loads (statistics tables: small, hot, shared by many threads).
__device__ __forceinline__ float ld_nc_f32(const float* ptr) {
    float v;
    asm("ld.global.nc.f32 %0, [%1];" : "=f"(v) : "l"(ptr));
    return v;
}
__device__ __forceinline__ u32 ld_nc_u8(const u8* ptr) {
    u32 v;
    asm("ld.global.nc.u8 %0, [%1];" : "=r"(v) : "l"(ptr));
    return v;
}
__device__ __forceinline__ u16 ld_nc_u16(const u16* ptr) {
    u16 v;
    asm("ld.global.nc.u16 %0, [%1];" : "=h"(v) : "l"(ptr));
    return v;
}

// 16-byte store (one STG.128); the destination must be 16-byte aligned.
__device__ __forceinline__ void st_global_16(void* ptr, u32x4 v) {
    asm volatile("st.global.v4.u32 [%0], {%1,%2,%3,%4};" ::"l"(ptr), "r"(v.x), "r"(v.y),
                 "r"(v.z), "r"(v.w)
                 : "memory");
}

// Converts a generic pointer to a shared-memory address, which cp.async and ldmatrix take.
__device__ __forceinline__ u32 smem_addr(const void* ptr) {
    return (u32)__cvta_generic_to_shared(ptr);
}

// A value the compiler must keep in a register instead of recomputing it where it is used.
// ptxas rematerialises lane-derived addresses (a few LOP3/IMAD from the lane index) at every use
// inside the streaming loop, even with registers to spare; the empty asm hides how the value was
// made, so it is computed once.
__device__ __forceinline__ u32 opaque(u32 v) {
    asm volatile("" : "+r"(v));
    return v;
}

// One f32 of shared memory by its shared address (tables written before a barrier and only
// read afterwards, so the load may move freely). On sm_90 a generic pointer to shared memory
// costs an S2R of the CTA id and a LEA per conversion; the address is computed once instead.
__device__ __forceinline__ float ld_shared_f32(u32 addr) {
    float v;
    asm("ld.shared.f32 %0, [%1];" : "=f"(v) : "r"(addr));
    return v;
}

// 16 bytes of shared memory, volatile like ld_nc_16_if_volatile but without a predicate
// (activations a block staged).
__device__ __forceinline__ u32x4 ld_shared_16_volatile(const void* ptr) {
    u32x4 v;
    asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "r"(smem_addr(ptr)));
    return v;
}

// 8 bytes of shared memory by shared address, volatile: a ring stage read after the
// cp.async wait and __syncwarp that publish it must stay behind them.
__device__ __forceinline__ u32x2 ld_shared_8_volatile(u32 addr) {
    u32x2 v;
    asm volatile("ld.shared.v2.u32 {%0,%1}, [%2];" : "=r"(v.x), "=r"(v.y) : "r"(addr));
    return v;
}

// Programmatic dependent launch (sm_90; no-ops before). The host launches some kernels with
// the PDL attribute (ops::PDL_ENV): such a kernel may start while the previous kernel in the
// stream is still running, so it must pdl_wait() (every thread, before the first read of
// anything earlier work wrote and before its first global write) and may do only
// launch-independent work before: code tables, constant weights, shared memory. Without the
// attribute the wait returns at once.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Lets the next kernel in the stream, if launched with the PDL attribute, start its prologue
// now instead of when this grid has finished (it still waits for this grid's results in
// pdl_wait). It fires once every block of this grid has called it or exited, so every block of
// this grid is resident by then and the next kernel's blocks cannot starve it.
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Thread-block clusters (sm_90+; callers compile these only under __CUDA_ARCH__ >= 900).
// The blocks of a cluster run at once on one GPC and can read each other's shared memory, so
// the K splits of one output tile can be summed on chip instead of through global memory and
// a second launch.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
// Every thread of every block of the cluster arrives and waits: the release/acquire pair makes
// each block's shared-memory stores before the barrier visible to the others' loads after it.
// (.aligned: the callers reach it with whole warps.)
__device__ __forceinline__ void cluster_sync_all() {
    asm volatile("barrier.cluster.arrive.release.aligned;\n\t"
                 "barrier.cluster.wait.acquire.aligned;" ::: "memory");
}

// The shared::cluster address of `local` (a shared address of this block) in block `rank` of
// the cluster: the same offset in that block's shared memory.
__device__ __forceinline__ u32 cluster_map(u32 local, u32 rank) {
    u32 remote;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"(rank));
    return remote;
}

// 16 bytes of another block's shared memory (a shared::cluster address from cluster_map).
__device__ __forceinline__ float4 ld_cluster_f32x4(u32 addr) {
    float4 v;
    asm volatile("ld.shared::cluster.v4.f32 {%0,%1,%2,%3}, [%4];"
                 : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                 : "r"(addr)
                 : "memory");
    return v;
}
#endif

// cp.async 16 bytes global -> shared without staging through registers (sm_80+), so the copy of
// the next tile overlaps the math on the current one.
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_addr(smem_dst)),
                 "l"(gmem_src));
}

// Same, but copies only `src_bytes` (0..16) and zero-fills the rest: used for ragged tile edges
// so out-of-range rows read as zero instead of faulting.
// `_s`: with a 32-bit shared address, so a loop that keeps its shared destinations as running
// offsets skips the generic-to-shared conversion on every copy.
__device__ __forceinline__ void cp_async_16_zfill_s(u32 smem_dst, const void* gmem_src,
                                                    u32 src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_dst), "l"(gmem_src),
                 "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_16_zfill(void* smem_dst, const void* gmem_src,
                                                  u32 src_bytes) {
    cp_async_16_zfill_s(smem_addr(smem_dst), gmem_src, src_bytes);
}

// Closes the current group of cp.async copies, so a later wait can target it.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }

// Waits until at most N groups are still in flight (N = pipeline depth - 1).
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N));
}

// ---------------------------------------------------------------------------------------------
// Tensor cores.
// ---------------------------------------------------------------------------------------------

// ldmatrix x4: four 8x8 b16 tiles from shared memory into the mma.sync fragment layout in one
// instruction, instead of 8 scalar shared loads per thread.
// The NF4 code in bits [bit, bit+4) of `word` as a byte offset into a 16-float table: one shift
// and one mask (`bit` is a constant after unrolling), no index scaling left for the load.
__device__ __forceinline__ u32 nf4_code_offset(u32 word, int bit) {
    return (bit >= 2 ? word >> (bit - 2) : word << (2 - bit)) & 0x3Cu;
}

// `_s`: with a 32-bit shared address (precomputed per lane, see nf4_linear_mma).
__device__ __forceinline__ void ldmatrix_x4_s(u32 (&r)[4], u32 smem_row_addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_row_addr));
}
__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], const void* smem_row_ptr) {
    ldmatrix_x4_s(r, smem_addr(smem_row_ptr));
}

// Transposing variant: loads row-major [k][n] tiles as the column-major B operand.
__device__ __forceinline__ void ldmatrix_x4_trans(u32 (&r)[4], const void* smem_row_ptr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(smem_row_ptr)));
}

// D = A(16x16) * B(16x8) + C with fp32 accumulation: the sm_80 tensor-core instruction that also
// runs on sm_86/89/90, so one kernel serves every target.
template <int DTYPE>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2]) {
    if (DTYPE == DTYPE_BF16) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
}

// D = A * B (C = 0): starts a fresh accumulator without spending instructions on zeroing it
// (the zero C operand becomes the hardware zero register).
template <int DTYPE>
__device__ __forceinline__ void mma_m16n8k16_zc(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2]) {
    const float z = 0.0f;
    if (DTYPE == DTYPE_BF16) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%10,%10,%10,%10};"
            : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(z));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%10,%10,%10,%10};"
            : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(z));
    }
}

// mma_m16n8k16 without `volatile`: the product is a pure function of its operands, so the
// compiler may interleave it with independent loads and lookups (the volatile forms above keep
// program order among all volatile asm, which serialises a streaming loop).
template <int DTYPE>
__device__ __forceinline__ void mma_acc(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2]) {
    if (DTYPE == DTYPE_BF16) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    } else {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
}

// D = A * B (C = 0), not volatile (see mma_acc).
template <int DTYPE>
__device__ __forceinline__ void mma_zero(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2]) {
    const float z = 0.0f;
    if (DTYPE == DTYPE_BF16) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%10,%10,%10,%10};"
            : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(z));
    } else {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%10,%10,%10,%10};"
            : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(z));
    }
}

// ---------------------------------------------------------------------------------------------
// Warp reductions.
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
// The decode kernels multiply NF4 codes rounded to the activation type. bf16 keeps 8 bits, and
// its rounding errors of the 16 codes do not average out: their mean (over how often each code
// occurs) makes an error that grows with K when the activations share a sign (SwiGLU output:
// 0.8% at K = 2880, 2% for all-positive inputs). Storing gamma * code instead, with gamma chosen
// so that the rounding errors have (near) zero mean for the code frequencies of gaussian weights
// and for uniform codes, and folding 1/gamma into the fp32 absmax, removes that bias (0.24% for
// all-positive inputs, below bf16-rounded weights). fp16 codes (11 bits) need no such factor.
#define DEC_GAMMA_BF16 1.6407625f

template <int DTYPE>
__device__ __forceinline__ float dec_gamma() {
    return DTYPE == DTYPE_BF16 ? DEC_GAMMA_BF16 : 1.0f;
}

// ---------------------------------------------------------------------------------------------
// Streaming NF4 decode core, shared by the MoE experts (moe_str_*) and the linear layers
// (nf4_linear_str_*): a warp multiplies one 16-row group of NF4 weights (mma A, decoded in
// registers) by up to 8 * NT activation columns (mma B), streaming the group's 128-k chunks
// through its own shared-memory ring.
//
// Measured on the H100 (bench/results/h100_2026-11-26_session3): with register loads of the
// weights and activations loaded right before their mma, the earlier decode kernels stalled on
// L1TEX at 230 instructions per KB. Here the weights arrive STR_DEPTH - 1 chunks ahead by
// 16-byte cp.async (no registers held in flight), a code-pair lookup is one PRMT and one LDS,
// and the activations are prefetched half a chunk ahead.
//
// Fragment roles (as in the MoE dec2 kernels): lane (g, c) owns k [64h + 16c, +16) of block h
// of a chunk for rows g and g + 8, so each mma k16 step stays inside one 64-element absmax
// block, and the block's absmax scales the fp32 mma result (4 FFMA per block).
// ---------------------------------------------------------------------------------------------

#define STR_WARPS 8
#define STR_DEPTH 4  // stages per warp ring (STR_DEPTH - 1 chunks in flight)
// Streams of at most this many 8-column tiles run a whole chunk's two 64-k blocks as two
// interleaved mma chains (str_chunk) instead of one block after the other (str_half); same
// bits either way. The MoE (moe.cu) keeps the default: H200, session 32, the MoE layer at
// GPT-OSS-20B shapes, two rounds in one call: 3-4% faster at 2-8 and 32 tokens, 1% at 16 and
// 48, level at 64; under the forced sm86 configuration (a 3090's kernels) 1.6% faster at 1
// token, 4.3-4.7% at 4-16, 2.2% at 64. The NF4 linear (nf4.cu) sets 0: level at M = 1 and 4,
// and its q/k/v at M = 16 ran 4.4% slower (o 2% faster).
#ifndef STR_INTERLEAVE_MAX_NT
#define STR_INTERLEAVE_MAX_NT 2
#endif
// Blocks per SM the streaming kernels are compiled for. The 70 KB of shared memory allow 3
// blocks on sm_90 (2 on an A100's 164 KB), but 2 (128 registers, no spills in the stream, more
// L1 left for the activations) measured faster on the H100 at 1 and 4 tokens (59.6 vs 65.4 and
// 159.5 vs 161.0 us per layer); the 100 KB SMs of sm_86/sm_89 hold 1, which may then use every
// register.
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ == 860 || __CUDA_ARCH__ == 870 || __CUDA_ARCH__ == 890)
#define STR_SMALL_SMEM 1
#endif
#ifndef STR_MIN_BLOCKS_N1
#ifdef STR_SMALL_SMEM
#define STR_MIN_BLOCKS_N1 1
#else
#define STR_MIN_BLOCKS_N1 2
#endif
#endif
#ifndef STR_MIN_BLOCKS_N2
#ifdef STR_SMALL_SMEM
#define STR_MIN_BLOCKS_N2 1
#else
#define STR_MIN_BLOCKS_N2 2
#endif
#endif

// Dynamic shared memory: 256 table entries of 256 bytes. Bytes [0, 128) of entry b hold the
// code pair of byte b once per lane (lane l reads 4 l, so a warp's 32 lookups hit 32 banks);
// bytes [128, 256) are a 128-byte hole, and the 256 holes hold the warps' rings (8 warps x
// STR_DEPTH stages x 8 holes). The 256-byte stride makes a lookup address one PRMT (byte b of a
// weight word into bits 8..15, the lane's 4 l into bits 0..7) instead of a shift and a LOP3.
#define STR_TABLE_BYTES (256 * 256)
#define STR_STAGE_STRIDE 2048  // 8 holes (two 64-byte rows each) per 1 KB stage

// Byte offset of (fragment row fr, 32-byte half h) inside a stage: rows fr, fr ^ 1 share a hole,
// and the halves swap on every other hole, so the 8-byte reads of a half-warp (rows g .. g + 3,
// 4 lanes each) hit 32 distinct banks.
__device__ __forceinline__ int str_row_off(int fr, int h) {
    return (fr >> 1) * 256 + 128 + (fr & 1) * 64 + ((h ^ ((fr >> 1) & 1)) << 5);
}

// Fills the code-pair table: thread b writes entry b's 32 replicas with 8 16-byte stores,
// rotated by b so that the 8 threads of a store phase hit 8 bank groups.
template <int DTYPE>
__device__ __forceinline__ void str_table(u8* table, float* nmap, u64 nested_map) {
    const int b = threadIdx.x;  // STR_WARPS * 32 == 256 entries
    const float gamma = dec_gamma<DTYPE>();
    const u32 pair = pack_half2<DTYPE>(gamma * ld_nc_f32(kNf4CodeGlobal + (b >> 4)),
                                       gamma * ld_nc_f32(kNf4CodeGlobal + (b & 15)));
    u32x4* row = (u32x4*)(table + b * 256);
#pragma unroll
    for (int j = 0; j < 8; ++j) row[(j + b) & 7] = u32x4{pair, pair, pair, pair};
    if (nested_map) nmap[b] = ld_nc_f32((const float*)nested_map + b);
}

// The code pair of byte `sel` (0..3) of w: PRMT puts the byte in bits 8..15 of the table offset
// and the lane's byte offset (lane4 < 128) in bits 0..7.
template <int SEL>
__device__ __forceinline__ u32 str_pair(const u8* table, u32 w, u32 lane4) {
    return *(const u32*)(table + __byte_perm(w, lane4, 0x5504 | (SEL << 4)));
}

// Weight byte order the streaming kernels of a translation unit read. Rows (the default):
// bitsandbytes' row-major order, chunk j of a row at byte 64 j. STR_CHUNK_MAJOR (defined before
// including this header; the `moe_chunks` family, what the vLLM plugin serves): each 16-row
// group's chunk j is 1 KB contiguous, [fragment row][64 B], and a final half chunk (K / 64 odd)
// 512 bytes, [fragment row][32 B] (gptoss_3090.moe.chunk_major_packed). bench/dram_pattern.py
// read the row order at 0.55-0.57x of copy bandwidth on the H100 and the chunk-major order at
// 0.75-0.80x, with no compute. The NF4 linear's other paths read rows only, so nf4.cu is
// compiled with STR_CHUNK_MAJOR only for benchmarks (bench_nf4_linear.py --weights-order).
#ifdef STR_CHUNK_MAJOR
#define STR_CHUNK_STEP 1024
#else
#define STR_CHUNK_STEP 64
#endif

// Per-lane addressing of one warp's stream, fixed for the whole stream. A lane copies two 16-byte
// pieces per chunk: fragment rows lane / 4 and lane / 4 + 8, bytes 16 (lane % 4) .. of the
// row's 64 (so both pieces lie in the same 64-k block of the chunk), and it lands them 1 KB
// apart in a stage. One base pointer and fixed distances keep the per-chunk issue to a few
// adds: the compiler, at the 128-register cap, used to recompute both pieces' addresses from
// the lane index every chunk (80 of ~220 instructions per chunk, sm_90 SASS).
struct StrLane {
    const u8* src;      // the lane's first piece of chunk 0
#ifndef STR_CHUNK_MAJOR
    long long piece2;   // rows: bytes from the first piece to the second (rows fr + 8 vs fr)
#endif
    int dst;            // the first piece's offset in a stage; the second lies 1 KB on
    bool hi;            // the pieces lie in the chunk's second 64-k block (lane & 2)
    const u8* amb;      // this lane's statistic of chunk 0: u8 code (nested) or f32
    const float* nested;
    int blk0;           // block index of that statistic (nested: selects the nested absmax)
};

// Offset of the second piece of a lane's pair from the first, in a stage (fragment row + 8).
#define STR_PIECE2_DST 1024

// Where the next chunk to issue comes from: advanced by one chunk per issue, so an issue is
// two cp.async, two statistic loads and a few adds.
struct StrCursor {
    const u8* src;  // the lane's first piece of chunk j
    const u8* amb;  // its statistic of chunk j
    int j;          // the chunk
};

__device__ __forceinline__ StrCursor str_cursor(const StrLane& l, int j, bool nested) {
    return StrCursor{l.src + (long long)STR_CHUNK_STEP * j, l.amb + (nested ? 2 : 8) * j, j};
}

// Issues chunk c.j into the stage at shared address `stage` (the lane's first piece's address
// in it: the ring's stage + StrLane::dst) and advances the cursor: two 16-byte cp.async per
// lane, plus this lane's statistic into registers. A final half chunk (K / 64 odd) reads nothing
// past the row end: its second block's pieces are zero-filled. `full_chunks` = K / 128: chunk j
// is whole iff j < full_chunks. `half_back`: chunk-major only (str_half_back).
template <bool NESTED>
__device__ __forceinline__ void str_issue(const StrLane& l, StrCursor& c, int full_chunks,
                                          u32 stage, u32 half_back, u32& am_raw,
                                          u32 piece2 = STR_PIECE2_DST) {
    const bool second = c.j < full_chunks;  // warp-uniform
#ifdef STR_CHUNK_MAJOR
    // Expected taken: only a stream's last chunk can be a half chunk. Computing both paths
    // costs 6-8 instructions per chunk (sm_90 SASS, session 19); the hint changes the code
    // ptxas emits but did not turn that predication into a branch there.
    if (__builtin_expect(second, 1)) {
        cp_async_16_zfill_s(stage, c.src, 16u);
        cp_async_16_zfill_s(stage + piece2, c.src + 512, 16u);
    } else {
        // A final half chunk packs 32 bytes per fragment row: the lane's rows start 32 fr
        // bytes before a full chunk's, and its two rows lie 256 bytes apart instead of 512.
        const u8* s0 = c.src - half_back;
        const u32 bytes = l.hi ? 0u : 16u;
        cp_async_16_zfill_s(stage, s0, bytes);
        cp_async_16_zfill_s(stage + piece2, s0 + 256, bytes);
    }
#else
    (void)half_back;
    const u32 bytes = (second || !l.hi) ? 16u : 0u;
    cp_async_16_zfill_s(stage, c.src, bytes);
    cp_async_16_zfill_s(stage + piece2, c.src + l.piece2, bytes);
#endif
    const bool oka = second || !(threadIdx.x & 1);
    // Nested: the block's u8 code; its nested absmax comes from StrStats (str_nested_scale).
    am_raw = NESTED ? ld_nc_u8_if(c.amb, oka) : ld_nc_b32_if(c.amb, oka);
    c.src += STR_CHUNK_STEP;
    c.amb += NESTED ? 2 : 8;
    c.j += 1;
}

// Chunk-major: how far a lane's first piece of a final half chunk lies before a full chunk's
// (32 bytes per fragment row before its row lane / 4).
__device__ __forceinline__ u32 str_half_back() { return opaque(8 * (threadIdx.x & 28)); }

// Where a lane's activations of the current chunk come from, per column tile: shared memory
// (XS: columns the block staged, str_stage_x) or global memory, at the lane's 16 k of block 0
// of the chunk; block 1 lies 128 bytes on, the next chunk 256.
// Where a stream's activations come from (str_stream's XS): global memory through the
// read-only path, the block's staged copy in shared memory, or global memory through L2 only.
#define STR_X_GLOBAL_NC 0
#define STR_X_SHARED 1
#define STR_X_GLOBAL_CG 2
// Or'ed into a global mode: tile 0's columns come from shared memory (the block staged them),
// the other tiles' from global memory.
#define STR_X_FIRST_SHARED 4

template <int NT>
struct StrX {
    const u8* p[NT];
};

template <int NT>
__device__ __forceinline__ StrX<NT> str_x_at(const u16* const (&src)[NT], int j) {
    StrX<NT> x;
    const int k0 = 128 * j + 16 * (threadIdx.x & 3);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) x.p[nt] = (const u8*)(src[nt] + k0);
    return x;
}

// The activations of block h of the chunk `x` points at, for this lane's columns: 16 k each, the
// B fragments of the block's 4 mma steps. Volatile, so the prefetch stays where it is written
// (half a chunk ahead of its use) instead of sinking next to the mma.
// - Global (STR_X_GLOBAL_NC, or STR_X_GLOBAL_CG through L2 only, for activations written
//   earlier in the same launch): a lane past the last column (bit nt of `cols` clear) loads
//   nothing and gets zeros, so no L1 wavefronts go to it (unpredicated repeats measured 3%
//   slower on the linear, M=4).
// - Shared (STR_X_SHARED): the load is not predicated; the caller points such a lane at the last column, and
//   its mma column repeats a result that the epilogue never stores. Zero-filling cost 4 moves per
//   load (ncu: a seventh of the loop at two tiles); without them the MoE ran 2-4% faster at 1-8
//   tokens (H100, same call).
template <int NT, int XS>
__device__ __forceinline__ void str_load_x(const StrX<NT>& x, u32 cols, int h,
                                           u32 (&xw)[NT][8]) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        const bool live = (cols >> nt) & 1u;
        const u8* at = x.p[nt] + 128 * h;
        u32x4 v0, v1;
        if (XS == STR_X_SHARED || ((XS & STR_X_FIRST_SHARED) && nt == 0)) {
            v0 = ld_shared_16_volatile(at);
            v1 = ld_shared_16_volatile(at + 16);
        } else if ((XS & 3) == STR_X_GLOBAL_CG) {
            v0 = ld_cg_16_if_volatile(at, live);
            v1 = ld_cg_16_if_volatile(at + 16, live);
        } else {
            v0 = ld_nc_16_if_volatile(at, live);
            v1 = ld_nc_16_if_volatile(at + 16, live);
        }
        xw[nt][0] = v0.x; xw[nt][1] = v0.y; xw[nt][2] = v0.z; xw[nt][3] = v0.w;
        xw[nt][4] = v1.x; xw[nt][5] = v1.y; xw[nt][6] = v1.z; xw[nt][7] = v1.w;
    }
}

template <int NT>
__device__ __forceinline__ void str_x_next(StrX<NT>& x) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) x.p[nt] += 256;
}

// The mma A fragment of k16 step st (0..3, unrolled by the caller) of a 64-k block from this
// lane's 8 bytes of fragment rows g (wa) and g + 8 (wb): k = k0 + 4 st + {0, 1 | 2, 3} are
// bytes 2 st, 2 st + 1 of each row's 8.
__device__ __forceinline__ void str_decode_step(const u8* table, const u32x2& wa, const u32x2& wb,
                                                int st, u32 lane4, u32 (&a)[4]) {
    const u32 r0 = (st >> 1) ? wa.y : wa.x, r1 = (st >> 1) ? wb.y : wb.x;
    if (st & 1) {
        a[0] = str_pair<2>(table, r0, lane4);
        a[1] = str_pair<2>(table, r1, lane4);
        a[2] = str_pair<3>(table, r0, lane4);
        a[3] = str_pair<3>(table, r1, lane4);
    } else {
        a[0] = str_pair<0>(table, r0, lane4);
        a[1] = str_pair<0>(table, r1, lane4);
        a[2] = str_pair<1>(table, r0, lane4);
        a[3] = str_pair<1>(table, r1, lane4);
    }
}

// acc[nt] += W(chunk, block h) x X(chunk, block h, tile nt) from a filled stage (`rd`: this
// lane's 8 bytes of row g of block h in it; row g + 8 lies `piece2` bytes on: 1 KB in a hole
// stage, 512 in a compact one), with the block's absmax (sc0: row g, sc1: row g + 8) applied
// to the fp32 products.
template <int DTYPE, int NT>
__device__ __forceinline__ void str_half(const u8* table, u32 rd, float sc0, float sc1,
                                         const u32 (&xw)[NT][8], float (&acc)[NT][4],
                                         u32 piece2 = STR_PIECE2_DST) {
    const u32 lane4 = 4 * (threadIdx.x & 31);
    const u32x2 wa = ld_shared_8_volatile(rd);
    const u32x2 wb = ld_shared_8_volatile(rd + piece2);
    float d[NT][4];
#pragma unroll
    for (int st = 0; st < 4; ++st) {
        u32 a[4];
        str_decode_step(table, wa, wb, st, lane4, a);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            const u32 bb[2] = {xw[nt][2 * st], xw[nt][2 * st + 1]};
            if (st == 0) mma_zero<DTYPE>(d[nt], a, bb); else mma_acc<DTYPE>(d[nt], a, bb);
        }
    }
    // d: (row g, col 2c), (row g, 2c + 1), (row g + 8, 2c), (row g + 8, 2c + 1).
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        acc[nt][0] = fmaf(sc0, d[nt][0], acc[nt][0]);
        acc[nt][1] = fmaf(sc0, d[nt][1], acc[nt][1]);
        acc[nt][2] = fmaf(sc1, d[nt][2], acc[nt][2]);
        acc[nt][3] = fmaf(sc1, d[nt][3], acc[nt][3]);
    }
}

// str_half for both 64-k blocks of a whole chunk, their steps interleaved: acc += block 0
// (rd0, scales s00 / s01, activations x0), then += block 1 (rd1, s10 / s11, x1), the same
// operations and the same order of the fp32 updates as two str_half calls, so the same bits.
// Why: called one after the other, each block's four mma form one dependent chain behind its
// table lookups, and ptxas reuses the first block's registers for the second, so a warp's chunk
// was two such chains in a row (sm_90 SASS). Here the two chains are independent and ptxas
// interleaves them.
template <int DTYPE, int NT>
__device__ __forceinline__ void str_chunk(const u8* table, u32 rd0, u32 rd1, float s00, float s01,
                                          float s10, float s11, const u32 (&x0)[NT][8],
                                          const u32 (&x1)[NT][8], float (&acc)[NT][4],
                                          u32 piece2 = STR_PIECE2_DST) {
    const u32 lane4 = 4 * (threadIdx.x & 31);
    const u32x2 wa0 = ld_shared_8_volatile(rd0);
    const u32x2 wb0 = ld_shared_8_volatile(rd0 + piece2);
    const u32x2 wa1 = ld_shared_8_volatile(rd1);
    const u32x2 wb1 = ld_shared_8_volatile(rd1 + piece2);
    float d0[NT][4], d1[NT][4];
#pragma unroll
    for (int st = 0; st < 4; ++st) {
        u32 a0[4], a1[4];
        str_decode_step(table, wa0, wb0, st, lane4, a0);
        str_decode_step(table, wa1, wb1, st, lane4, a1);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            const u32 b0[2] = {x0[nt][2 * st], x0[nt][2 * st + 1]};
            const u32 b1[2] = {x1[nt][2 * st], x1[nt][2 * st + 1]};
            if (st == 0) {
                mma_zero<DTYPE>(d0[nt], a0, b0);
                mma_zero<DTYPE>(d1[nt], a1, b1);
            } else {
                mma_acc<DTYPE>(d0[nt], a0, b0);
                mma_acc<DTYPE>(d1[nt], a1, b1);
            }
        }
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        acc[nt][0] = fmaf(s00, d0[nt][0], acc[nt][0]);
        acc[nt][1] = fmaf(s00, d0[nt][1], acc[nt][1]);
        acc[nt][2] = fmaf(s01, d0[nt][2], acc[nt][2]);
        acc[nt][3] = fmaf(s01, d0[nt][3], acc[nt][3]);
        acc[nt][0] = fmaf(s10, d1[nt][0], acc[nt][0]);
        acc[nt][1] = fmaf(s10, d1[nt][1], acc[nt][1]);
        acc[nt][2] = fmaf(s11, d1[nt][2], acc[nt][2]);
        acc[nt][3] = fmaf(s11, d1[nt][3], acc[nt][3]);
    }
}

// The state of a warp's stream between str_prime and str_stream: the issue cursor and the
// statistics of the chunks in its ring (raw codes or f32 bits, and the nested absmax values).
//
// A lane's statistics of a stream are blocks blk0 + 2 j, j in [jb, jb + n): fewer than 256
// blocks, as n <= 64 chunks (src/ops STREAM_MAX_CHUNKS, enforced where the host picks the K
// split), so they span at most two nested blocks. Their two nested absmax values (nsa, nsb:
// before and from chunk njx on) load once per stream; the per-chunk global load and its 64-bit
// address (~8 instructions per chunk, sm_90 SASS) become a select.
//
// EXTRA: compact ring stages beyond the STR_DEPTH hole stages (StrStage).
template <int EXTRA = 0>
struct StrStatsT {
    StrCursor cur;
    u32 raw[STR_DEPTH + EXTRA];
    float nsa, nsb;
    int njx;
};
typedef StrStatsT<0> StrStats;

// The nested absmax of this lane's statistic of chunk j (nested streams).
template <int EXTRA>
__device__ __forceinline__ float str_nested_scale(const StrStatsT<EXTRA>& st, int j) {
    return j < st.njx ? st.nsa : st.nsb;
}

// A warp's weight ring: STR_DEPTH stages in the table's holes (the ring str_reduce also
// uses), then EXTRA compact 1 KB stages (`extra` in str_prime / str_stream: static shared
// memory of the kernels that have them; unused when EXTRA is 0). More stages keep more weight
// bytes in flight per warp: at one decode token each SM streams with 10-11 warps, each with
// only its next STR_DEPTH - 1 chunks requested. A compact stage holds the hole layout's rows
// 128 bytes apart instead of 256 (str_row_off without the table's half of each 256 bytes);
// addresses are equal modulo 128, so the same lanes meet the same banks. Stage u's kind is
// compile-time (the callers unroll u).
#define STR_COMPACT_STAGE 1024
#define STR_COMPACT_PIECE2 512

// Offset of a hole-layout address (inside a stage, fragment row fr) in the compact layout.
__device__ __forceinline__ int str_compact_shift(int fr) { return 128 + ((fr >> 1) << 7); }

template <int EXTRA>
struct StrStage {
    // Shared address of stage u for a lane whose hole-stage-0 address is `hole` and compact-
    // stage-0 address `compact`, and the distance to its second piece (row + 8).
    __device__ __forceinline__ static u32 at(int u, u32 hole, u32 compact) {
        return u < STR_DEPTH ? hole + u * STR_STAGE_STRIDE
                             : compact + (u - STR_DEPTH) * STR_COMPACT_STAGE;
    }
    __device__ __forceinline__ static u32 piece2(int u) {
        return u < STR_DEPTH ? STR_PIECE2_DST : STR_COMPACT_PIECE2;
    }
};

// Issues the first STR_DEPTH + EXTRA - 1 chunks of a stream (chunks jb ..) into the warp's
// ring, one cp.async group each (empty groups keep the count uniform). Separate from str_stream
// so that a block can stage its activations after it: the two DRAM latencies then overlap
// instead of adding up before the first mma (ncu, 1 token: the prologue was a third of the
// stall samples).
template <bool NESTED, int EXTRA = 0>
__device__ __forceinline__ void str_prime(const StrLane& l, int jb, int n, int nkb, u8* ring,
                                          StrStatsT<EXTRA>& st, u8* extra = nullptr) {
    __syncwarp();  // every lane is done reading the ring (a previous pass)
    st.cur = str_cursor(l, jb, NESTED);
    if (NESTED) {
        // The lane's blocks blk0 + 2 j; the first chunk whose block lies in the next nested
        // block is njx (a stream never reaches a third one: 2 n < NF4_NESTED_BLOCK).
        const int b0 = l.blk0 + 2 * jb;
        const int nb0 = b0 / NF4_NESTED_BLOCK;
        st.njx = jb + ((nb0 + 1) * NF4_NESTED_BLOCK - b0 + 1) / 2;
        // The lane's last chunk with a real block: an odd lane has none in a final half chunk
        // (its block index there is the next row's first, past the tensor for the last row).
        const int jl = jb + n - 1 - ((threadIdx.x & 1) && jb + n - 1 >= (nkb >> 1) ? 1 : 0);
        st.nsa = ld_nc_f32_if(l.nested + nb0, jl >= jb);
        st.nsb = ld_nc_f32_if(l.nested + nb0 + 1, st.njx <= jl);
    }
    const u32 dst = smem_addr(ring) + l.dst, half_back = str_half_back();
    const u32 dst_c =
        EXTRA ? smem_addr(extra) + l.dst - str_compact_shift((threadIdx.x & 31) >> 2) : 0u;
#pragma unroll
    for (int u = 0; u < STR_DEPTH + EXTRA - 1; ++u) {
        if (u < n)
            str_issue<NESTED>(l, st.cur, nkb >> 1, StrStage<EXTRA>::at(u, dst, dst_c),
                              half_back, st.raw[u], StrStage<EXTRA>::piece2(u));
        cp_async_commit();
    }
}

// Streams chunks jb .. jb + n - 1 of one 16-row group through the warp's ring, primed by
// str_prime. The weights arrive D - 1 chunks ahead (D = STR_DEPTH + EXTRA stages) through
// cp.async; the activations (L1 or L2 hits, but on the critical path of every mma) half a
// chunk ahead through registers: block 1 of a chunk loads while block 0 computes, and block 0
// of the next chunk while block 1 computes. Every per-chunk address is a running pointer or a
// fixed offset from one.
template <int DTYPE, int NT, bool NESTED, int XS, int EXTRA = 0>
__device__ __forceinline__ void str_stream(const StrLane& l, int jb, int n, int nkb, float am_off,
                                           u8* table, u8* ring, StrStatsT<EXTRA>& st,
                                           const u16* const (&src)[NT], u32 cols,
                                           const float* nmap, float (&acc)[NT][4],
                                           u8* extra = nullptr) {
    constexpr int D = STR_DEPTH + EXTRA;  // ring stages
    const int lane = threadIdx.x & 31, g = lane >> 2;
    const float inv_gamma = 1.0f / dec_gamma<DTYPE>();  // compile-time constant
    const int full_chunks = nkb >> 1;
    u32 (&raw)[D] = st.raw;
    // Lane constants, computed once (opaque): the lane's piece destination in stage 0, the
    // final half chunk's offset, the nested code map's address, the lanes holding the
    // statistics of rows g and g + 8 for blocks 0 and 1 of a chunk.
    const u32 dst = opaque(smem_addr(ring) + l.dst), half_back = str_half_back();
    const u32 nmap_s = opaque(smem_addr(nmap));
    const int sl00 = (int)opaque(2 * g), sl01 = (int)opaque(16 + 2 * g);
    const int sl10 = (int)opaque(2 * g + 1), sl11 = (int)opaque(17 + 2 * g);
    // This lane's 8 bytes of row g, block 0 and block 1, in stage 0 (str_row_off's layout).
    // Shared addresses, opaque: the linear's kernels (80 registers at 3 blocks per SM)
    // rebuilt both from the lane index in every chunk (11 instructions, sm_90 SASS).
    const u32 rd0 = opaque(smem_addr(ring) + str_row_off(g, 0) + 8 * (lane & 3));
    const u32 rd1 = opaque(smem_addr(ring) + str_row_off(g, 1) + 8 * (lane & 3));
    // The same in the compact stages (EXTRA only).
    const u32 dst_c = EXTRA ? opaque(smem_addr(extra) + l.dst - str_compact_shift(g)) : 0u;
    const u32 rc0 = EXTRA ? opaque(rd0 - smem_addr(ring) + smem_addr(extra) - str_compact_shift(g))
                          : 0u;
    const u32 rc1 = EXTRA ? opaque(rd1 - smem_addr(ring) + smem_addr(extra) - str_compact_shift(g))
                          : 0u;
    // A whole chunk as two interleaved mma chains (str_chunk, STR_INTERLEAVE_MAX_NT), except in
    // the deep-ring one-token kernels (EXTRA > 0, sm_90): 0.7-2% slower there (H200, sessions
    // 31 and 32, two rounds each).
    constexpr bool interleave = NT <= STR_INTERLEAVE_MAX_NT && EXTRA == 0;
    StrX<NT> x = str_x_at<NT>(src, jb);
    u32 x0[NT][8], x1[NT][8];  // activations of block 0 / block 1 of a chunk
    str_load_x<NT, XS>(x, cols, 0, x0);
    for (int i0 = 0; i0 < n; i0 += D) {
#pragma unroll
        for (int u = 0; u < D; ++u) {
            const int i = i0 + u;
            if (i >= n) break;  // warp-uniform
            const int nu = (u + D - 1) % D;  // the stage chunk i - 1 used
            __syncwarp();  // every lane is done reading stage nu
            if (i + D - 1 < n)
                str_issue<NESTED>(l, st.cur, full_chunks, StrStage<EXTRA>::at(nu, dst, dst_c),
                                  half_back, raw[nu], StrStage<EXTRA>::piece2(nu));
            cp_async_commit();
            const bool second = jb + i < full_chunks;  // warp-uniform: odd block count
            if (second) str_load_x<NT, XS>(x, cols, 1, x1);
            cp_async_wait<D - 1>();  // this lane's copies of chunk i have landed
            __syncwarp();            // ... and every other lane's
            // This lane's statistic: fragment row lane >> 1, block 2j + (lane & 1).
            const float am =
                (NESTED ? nf4_nested_absmax(ld_shared_f32(nmap_s + 4 * raw[u]),
                                           str_nested_scale(st, jb + i), am_off)
                        : __uint_as_float(raw[u])) * inv_gamma;
            const float s00 = __shfl_sync(0xffffffffu, am, sl00);
            const float s01 = __shfl_sync(0xffffffffu, am, sl01);
            const float s10 = __shfl_sync(0xffffffffu, am, sl10);
            const float s11 = __shfl_sync(0xffffffffu, am, sl11);
            if (interleave && second)
                str_chunk<DTYPE, NT>(table, StrStage<EXTRA>::at(u, rd0, rc0),
                                     StrStage<EXTRA>::at(u, rd1, rc1), s00, s01, s10, s11, x0, x1,
                                     acc, StrStage<EXTRA>::piece2(u));
            else
                str_half<DTYPE, NT>(table, StrStage<EXTRA>::at(u, rd0, rc0), s00, s01, x0, acc,
                                    StrStage<EXTRA>::piece2(u));
            str_x_next<NT>(x);
            if (i + 1 < n) str_load_x<NT, XS>(x, cols, 0, x0);
            if (!interleave && second)
                str_half<DTYPE, NT>(table, StrStage<EXTRA>::at(u, rd1, rc1), s10, s11, x1, acc,
                                    StrStage<EXTRA>::piece2(u));
        }
    }
    cp_async_wait<0>();
}

// Row stride, in elements, of a column of activations staged in shared memory: K plus 8, so
// the 16-byte reads of lanes (g, c) (column g, k offset 16 c) fall in distinct bank groups.
__host__ __device__ __forceinline__ int str_x_stride(int K) { return K + 8; }

// Copies `n` columns of K activations (column i starts at col_src(i)) into `xs` (stride
// str_x_stride(K)) with 16-byte cp.async by the whole block, and waits for them (and for any
// earlier cp.async group of the thread, such as a primed ring): every thread must call it, with
// the same n <= 32. K is a multiple of 8.
//
// Lane i of each warp finds column i's source once, and the warp's lanes pass it round; the
// block then copies the columns one after another. The flat loop this replaces divided its
// index by the piece count and called col_src (a pair index load from global memory and a
// division by top-k, in the MoE) for every 16-byte piece: 75 instructions and a dependent
// global load per piece, 13.5% of the instructions of the 64-token gate_up kernel (ncu source
// counters, H200, session 22).
template <class ColSrc>
__device__ __forceinline__ void str_stage_x(u16* xs, int n, int K, ColSrc col_src) {
    const int lane = threadIdx.x & 31;
    const int pieces = K / 8;
    const unsigned long long mine = lane < n ? (unsigned long long)col_src(lane) : 0ull;
    for (int col = 0; col < n; ++col) {  // block-uniform: every lane takes part in the shuffle
        const u16* src = (const u16*)__shfl_sync(0xffffffffu, mine, col);
        u16* dst = xs + col * str_x_stride(K);
        for (int piece = threadIdx.x; piece < pieces; piece += blockDim.x)
            cp_async_16(dst + 8 * piece, src + 8 * piece);
    }
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
}

// Sums the KS parts of K of each 16-row group (warps rg * ks .. rg * ks + ks - 1) in fixed
// order, deterministic; the total lands in the part-0 warp. The partial sums travel through the
// first holes of each warp's ring (free once its stream ended). Every thread of the block must
// call it.
template <int NT>
__device__ __forceinline__ void str_reduce(u8* smem, int ks, float (&acc)[NT][4]) {
    if (ks == 1) return;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, kp = warp & (ks - 1);
    auto red_at = [&](int w, int nt, int q) -> float* {
        return (float*)(smem + w * (STR_DEPTH * STR_STAGE_STRIDE) + (nt * 4 + q) * 256 + 128);
    };
    if (kp != 0) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int q = 0; q < 4; ++q) red_at(warp, nt, q)[lane] = acc[nt][q];
    }
    __syncthreads();
    if (kp == 0) {
        for (int o = 1; o < ks; ++o) {
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int q = 0; q < 4; ++q) acc[nt][q] += red_at(warp + o, nt, q)[lane];
        }
    }
    __syncthreads();  // the holes may be refilled afterwards
}
