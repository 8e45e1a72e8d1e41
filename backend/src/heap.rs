//! glibc's malloc under model reloads.
//!
//! glibc serves a large allocation with its own `mmap` and unmaps it when it is freed,
//! but raises that size threshold to the size of each such block freed (up to 32 MiB).
//! After the first unload, the blocks the next load allocates (ONNX Runtime's weights
//! and buffers, tokenizer tables) come from the heap instead, and what an unload frees
//! there stays mapped wherever a live allocation sits above it: a server that reloads
//! models grows its RSS by steps although nothing leaks (BENCHMARKS.md, "Soak": +11 % in
//! 12 minutes with the dynamic threshold, +2 % with a fixed one). The backend therefore
//! fixes the threshold once, at start, unless the operator chose one.

use crate::error::BackendError;

/// The threshold the backend fixes: glibc's own starting value is 128 KiB.
pub const DEFAULT_MMAP_THRESHOLD: usize = 256 * 1024;
/// glibc refuses larger values (half its 64 MiB heap size on 64-bit).
const MAX_MMAP_THRESHOLD: usize = 32 * 1024 * 1024;

/// What the backend does about the threshold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MmapThreshold {
    /// Fix it at this many bytes.
    Fixed(usize),
    /// Leave glibc's (possibly the operator's) setting alone, for this reason.
    Untouched(&'static str),
}

/// Decides from `--backend-config=rust,malloc-mmap-threshold=<bytes>` (0: leave glibc's
/// dynamic threshold) and whether the environment already sets one
/// (`MALLOC_MMAP_THRESHOLD_` or `GLIBC_TUNABLES=glibc.malloc.mmap_threshold=...`).
pub fn choose(
    configured: Option<&str>,
    set_by_environment: bool,
) -> Result<MmapThreshold, BackendError> {
    let Some(text) = configured else {
        return Ok(if set_by_environment {
            MmapThreshold::Untouched("set by the environment")
        } else {
            MmapThreshold::Fixed(DEFAULT_MMAP_THRESHOLD)
        });
    };
    let bytes: usize = text.trim().parse().map_err(|_| {
        BackendError::Config(format!(
            "backend config 'malloc-mmap-threshold' must be a number of bytes, got '{text}'"
        ))
    })?;
    match bytes {
        0 => Ok(MmapThreshold::Untouched("malloc-mmap-threshold=0")),
        1..=MAX_MMAP_THRESHOLD => Ok(MmapThreshold::Fixed(bytes)),
        _ => Err(BackendError::Config(format!(
            "backend config 'malloc-mmap-threshold' must be at most {MAX_MMAP_THRESHOLD} \
             bytes (32 MiB), got {bytes}"
        ))),
    }
}

/// Whether the process environment sets glibc's mmap threshold.
pub fn set_by_environment() -> bool {
    std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_some()
        || std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc.mmap_threshold"))
}

/// Fixes glibc's mmap threshold at `bytes`; false where the allocator is not glibc's
/// or glibc refused (a `LD_PRELOAD`ed allocator ignores it harmlessly).
pub fn fix_mmap_threshold(bytes: usize) -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let Ok(value) = libc::c_int::try_from(bytes) else {
            return false;
        };
        // SAFETY: mallopt takes no pointers; glibc applies it under the main arena's lock.
        unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, value) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = bytes;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_fixed_unless_the_environment_chose() {
        assert_eq!(
            choose(None, false).ok(),
            Some(MmapThreshold::Fixed(DEFAULT_MMAP_THRESHOLD))
        );
        assert!(matches!(
            choose(None, true),
            Ok(MmapThreshold::Untouched(_))
        ));
        // An explicit backend config wins over the environment.
        assert_eq!(
            choose(Some("1048576"), true).ok(),
            Some(MmapThreshold::Fixed(1 << 20))
        );
        assert!(matches!(
            choose(Some("0"), false),
            Ok(MmapThreshold::Untouched(_))
        ));
    }

    #[test]
    fn bad_values_are_named() {
        for (text, expected) in [
            ("lots", "a number of bytes"),
            ("-1", "a number of bytes"),
            ("40000000", "at most"),
        ] {
            let error = choose(Some(text), false).expect_err(text).to_string();
            assert!(error.contains(expected), "{text}: {error}");
        }
    }

    #[test]
    fn glibc_takes_the_threshold() {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        assert!(fix_mmap_threshold(DEFAULT_MMAP_THRESHOLD));
    }
}
