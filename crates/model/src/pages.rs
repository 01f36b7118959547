//! Buffers a step streams through whole (packed weights, the KV cache), on
//! transparent huge pages where Linux offers them.
//!
//! A decode step reads every weight, and a long context's whole cache: with
//! 4 KiB pages that is a TLB miss every 4 KiB, each a page walk (two levels
//! of tables in a VM), and the hardware prefetchers stop at every page's
//! end. Most distributions leave transparent huge pages to `madvise`, so
//! the buffers ask for them before anything touches them; where they are
//! off, nothing changes.

/// An empty vector with room for `n` values, its pages to be 2 MiB ones.
pub(crate) fn with_huge_pages<T>(n: usize) -> Vec<T> {
    let v = Vec::with_capacity(n);
    advise(v.as_ptr() as usize, n * std::mem::size_of::<T>());
    v
}

/// `n` copies of `value`, on huge pages, written through at once.
pub(crate) fn filled<T: Clone>(n: usize, value: T) -> Vec<T> {
    let mut v = with_huge_pages(n);
    v.resize(n, value);
    v
}

/// Asks for huge pages over the whole 2 MiB pages inside `bytes` at `at`.
fn advise(at: usize, bytes: usize) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = at.next_multiple_of(HUGE);
        let end = (at + bytes) / HUGE * HUGE;
        if end > start {
            // SAFETY: the range lies inside one allocation of ours, and the
            // advice changes no contents. A kernel without transparent huge
            // pages refuses it, which changes nothing either.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (at, bytes);
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// The `VmFlags` of the mapping that holds `at`, from /proc/self/smaps.
    fn flags_at(at: usize) -> Option<String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut inside = false;
        for line in smaps.lines() {
            let range = line
                .split_whitespace()
                .next()
                .and_then(|r| r.split_once('-'));
            if let Some((lo, hi)) = range {
                if let (Ok(lo), Ok(hi)) =
                    (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
                {
                    inside = (lo..hi).contains(&at);
                    continue;
                }
            }
            if inside {
                if let Some(flags) = line.strip_prefix("VmFlags:") {
                    return Some(flags.trim().to_string());
                }
            }
        }
        None
    }

    #[test]
    fn big_buffers_ask_for_huge_pages() {
        if !std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists() {
            return; // a kernel without them refuses the advice
        }
        let v = filled(8 << 20, 1u8);
        assert!(v.iter().all(|&b| b == 1));
        // The mapping's advised part is split off as its own, flagged `hg`.
        let inside = (v.as_ptr() as usize).next_multiple_of(2 << 20);
        let flags = flags_at(inside).expect("the buffer's mapping in smaps");
        assert!(flags.split_whitespace().any(|f| f == "hg"), "flags {flags}");
        // A small one is left alone (no whole huge page inside it).
        let small = filled(4096, 0u8);
        let flags = flags_at(small.as_ptr() as usize).unwrap_or_default();
        assert!(
            !flags.split_whitespace().any(|f| f == "hg"),
            "flags {flags}"
        );
    }
}
