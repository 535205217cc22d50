//! The process's allocator: mimalloc, set to hand freed memory back to the kernel at once.
//!
//! With glibc's malloc, 10,000 Services x 10 endpoints through the API held 87 MiB
//! resident for 44 MiB of live objects: its heap returns pages from the top only (or
//! through `malloc_trim`, whole free pages), and the first sync's transient objects (the
//! decoded lists, the netlink batch) are freed between long-lived ones. mimalloc keeps
//! each size class in pages of their own and returns a page's memory once it empties,
//! and its per-thread heaps need no arena limit for the manifests source's parsing
//! threads.

use libmimalloc_sys::{mi_option_set, mi_option_t};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

// Option numbers of mimalloc.h, 2.3 (`tests` checks the line).
/// Reserve address space for arenas without committing it (default: commit on
/// systems that overcommit).
const ARENA_EAGER_COMMIT: mi_option_t = 4;
/// Milliseconds before freed pages go back to the kernel (default 10).
const PURGE_DELAY: mi_option_t = 15;
/// The same delay's multiplier for arenas (default 10).
const ARENA_PURGE_MULT: mi_option_t = 24;

/// Sets the options before the Rust runtime's first allocation (which reserves the
/// first arena): from `main` the arena options came too late (10,000 Services through
/// the API: 78 MiB resident instead of 66).
#[used]
#[unsafe(link_section = ".init_array")]
static CONFIGURE: extern "C" fn() = configure;

extern "C" fn configure() {
    // SAFETY: these options are plain integers the allocator reads when it next needs
    // them; constructors run before any thread is started.
    unsafe {
        mi_option_set(ARENA_EAGER_COMMIT, 0);
        mi_option_set(PURGE_DELAY, 0);
        mi_option_set(ARENA_PURGE_MULT, 1);
    }
}

/// Returns what the allocator holds free to the kernel, after a full sync.
pub fn return_free_memory() {
    // SAFETY: mi_collect only walks the allocator's own structures; `true` also
    // releases the memory it keeps free for reuse.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libmimalloc_sys::mi_option_get;

    /// The constructor ran (in this test binary too), and the option numbers are those of
    /// the mimalloc line they were read from (2.3: `mi_option_purge_delay` is 15).
    #[test]
    fn the_constructor_set_the_options() {
        // SAFETY: reads of plain integers.
        let get = |option| unsafe { mi_option_get(option) };
        let set = (
            get(ARENA_EAGER_COMMIT),
            get(PURGE_DELAY),
            get(ARENA_PURGE_MULT),
        );
        assert_eq!(set, (0, 0, 1));
        // SAFETY: returns a constant.
        assert_eq!(unsafe { libmimalloc_sys::mi_version() } / 100, 203);
    }
}
