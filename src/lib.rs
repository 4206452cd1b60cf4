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

// The mount daemon keeps the content of every small file it stages (a
// view's inline contents). With glibc's malloc each grew a thread's arena
// by a page or two: an `mprotect` per file, which waits on every other
// thread's page faults. mimalloc takes memory from the system in large
// regions. Its transparent huge pages are off (`no_thp`): a fresh 2 MiB
// page zeroed for a buffer of a few hundred KiB cost more than it saved.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;
