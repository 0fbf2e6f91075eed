// Common header for every gptoss-3090 kernel (compiled by NVRTC at run time).
//
// NVRTC has no headers built in and we do not depend on the CUDA toolkit's headers, so this file
// provides the fixed-width integer types, bf16/fp16 conversions and the PTX helpers that the
// kernels share. Every kernel file starts with `#include "common.cuh"`.
#pragma once

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef signed char i8;
typedef int i32;
typedef long long i64;
