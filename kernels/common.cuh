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
__device__ __constant__ float kNf4Code[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

// Elements per NF4 block and blocks per nested (double-quantization) block.
#define NF4_BLOCK 64
#define NF4_NESTED_BLOCK 256

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

// cp.async 16 bytes global -> shared without staging through registers (sm_80+), so the copy of
// the next tile overlaps the math on the current one.
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_addr(smem_dst)),
                 "l"(gmem_src));
}

// Same, but copies only `src_bytes` (0..16) and zero-fills the rest: used for ragged tile edges
// so out-of-range rows read as zero instead of faulting.
__device__ __forceinline__ void cp_async_16_zfill(void* smem_dst, const void* gmem_src,
                                                  u32 src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(smem_dst)),
                 "l"(gmem_src), "r"(src_bytes));
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
__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], const void* smem_row_ptr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(smem_row_ptr)));
}

// ldmatrix x2 (two 8x8 tiles), for B fragments of an m16n8k16 product.
__device__ __forceinline__ void ldmatrix_x2(u32 (&r)[2], const void* smem_row_ptr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(smem_addr(smem_row_ptr)));
}

// Transposing variant: loads row-major [k][n] tiles as the column-major B operand.
__device__ __forceinline__ void ldmatrix_x2_trans(u32 (&r)[2], const void* smem_row_ptr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(smem_addr(smem_row_ptr)));
}
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
