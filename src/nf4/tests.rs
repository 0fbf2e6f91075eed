//! Unit tests for exact NF4.
use super::*;
