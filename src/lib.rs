//! tarn: a versioned data lake you can mount.
//!
//! Layers (see docs/ARCHITECTURE.md): `store` → `chunk`, `tree` → `repo` →
//! `hooks`, `mount` → `cli`.

pub mod chunk;
pub mod cli;
pub mod hash;
pub mod hooks;
pub mod mount;
pub mod repo;
pub mod store;
pub mod thread_class;
pub mod tree;
pub mod units;
