//! Launchers: argument validation, launch configuration and kernel launch for each op family.
pub mod moe;
pub mod py;
