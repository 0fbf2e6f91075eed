//! The CUDA runtime: driver and NVRTC loading, per-device state, compile cache, launches.
pub mod py;
