// The binary's allocator (a library leaves that to its user: the fuzz
// targets keep their own). The mount daemon keeps the content of every
// small file it stages (a view's inline contents): with glibc's malloc each
// grew a thread's arena by a page or two, an `mprotect` per file that waits
// on every other thread's page faults. mimalloc takes memory from the
// system in large regions. It does not ask for transparent huge pages
// (`no_thp`; the process's own setting is left alone, so hooks' commands
// inherit nothing): a fresh 2 MiB page zeroed for a buffer of a few
// hundred KiB cost more than it saved.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    std::process::exit(tarn::cli::main());
}
