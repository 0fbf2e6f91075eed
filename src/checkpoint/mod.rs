//! Reading Unsloth GPT-OSS bnb-4bit checkpoints and building the virtual fused expert layout.
pub mod py;
