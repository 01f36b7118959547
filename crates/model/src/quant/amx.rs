//! Intel AMX (Advanced Matrix Extensions) for the packed kernels: the
//! operating system's permission, the tile shapes, and the one tile
//! product they use.
//!
//! An AMX tile multiply takes 16 rows of 64 bytes from each side and adds
//! 16 × 16 integer sums into a third tile: 16,384 multiply-adds in one
//! instruction (the kernel uses half-depth tiles, one 32-value block). On
//! the development Xeon one core did about 2 × 10^12 of them a second, and
//! the kernel spends most of its time on the vector work around the
//! products (unpacking, scales). The packed layout's 64-byte chunks (four
//! values of each of 16 weight rows) are already the right-hand tile's row
//! format, so a block of 16 rows × 32 values is 8 tile rows, and up to 16
//! tokens' activation blocks are the left-hand tile, read in place with
//! their stride.
//!
//! The instructions go through inline assembly: Rust's AMX intrinsics are
//! not stable.

use std::arch::asm;
use std::arch::x86_64::__cpuid_count;
use std::cell::Cell;

/// `arch_prctl` request for permission to use an extended state component.
const ARCH_REQ_XCOMP_PERM: libc::c_ulong = 0x1023;
/// The AMX tile data state component.
const XFEATURE_XTILEDATA: libc::c_ulong = 18;

/// Whether this CPU has AMX-INT8 and the kernel lets this process use it.
/// Linux hands out the 8 KiB of tile state per process on request; the
/// first call asks for it.
pub fn usable() -> bool {
    static USABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *USABLE.get_or_init(|| {
        // CPUID.(EAX=7, ECX=0):EDX bit 24 is AMX-TILE, bit 25 AMX-INT8.
        let edx = __cpuid_count(7, 0).edx;
        if edx & (1 << 24) == 0 || edx & (1 << 25) == 0 || !cfg!(target_os = "linux") {
            return false;
        }
        // SAFETY: arch_prctl with an integer argument touches no memory.
        #[cfg(target_os = "linux")]
        let r = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        #[cfg(not(target_os = "linux"))]
        let r = -1;
        if r != 0 {
            tracing::info!(
                "the CPU has AMX but the kernel refused it ({}): using AVX-512",
                std::io::Error::last_os_error()
            );
        }
        r == 0
    })
}

/// Tiles of sums: a tile product takes several times longer to finish
/// than to start, so the kernel keeps a few blocks' products in flight and
/// reads each back a block or two after starting it.
pub const SUM_TILES: usize = 4;

/// The tile configuration (`ldtilecfg`'s 64-byte operand, palette 1) for
/// products of `tokens` tokens (1 to 16): `tmm0..=tmm3` a block's sums
/// each (`tokens` rows of 16 i32), `tmm4` and `tmm5` activations (`tokens`
/// rows of 32 bytes), `tmm6` and `tmm7` weights (8 rows of 64 bytes).
#[repr(C, align(64))]
struct Config([u8; 64]);

impl Config {
    fn new(tokens: u8) -> Self {
        let mut c = Config([0; 64]);
        c.0[0] = 1;
        let sums = (tokens, 64u16);
        let (x, w) = ((tokens, 32), (8, 64));
        let shapes: [(u8, u16); 8] = [sums, sums, sums, sums, x, x, w, w];
        const { assert!(SUM_TILES == 4) };
        for (tile, (rows, bytes)) in shapes.into_iter().enumerate() {
            c.0[16 + 2 * tile..18 + 2 * tile].copy_from_slice(&bytes.to_le_bytes());
            c.0[48 + tile] = rows;
        }
        c
    }
}

thread_local! {
    /// The token count this thread's tiles are configured for (0: none).
    static CONFIGURED: Cell<usize> = const { Cell::new(0) };
}

/// Sets this thread's tiles to the shapes above for `tokens` tokens (only
/// when they change: the configuration stays until another is loaded).
///
/// # Safety
/// [`usable`] must have returned true; `tokens` is 1 to 16.
#[inline]
pub unsafe fn configure(tokens: usize) {
    debug_assert!((1..=16).contains(&tokens));
    if CONFIGURED.get() != tokens {
        let config = Config::new(tokens as u8);
        asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly));
        CONFIGURED.set(tokens);
    }
}

/// Starts a block's integer dot products of the configured tokens with 16 weight rows
/// in sum tile `tile`: `Σ_k x[t][k] × w[k / 4][4r + k % 4]` for k < 32, the
/// activations `x` signed bytes (32 per token, `x_stride` bytes apart), the
/// weights `w` unsigned bytes (8 rows of 64). [`store`] reads them out.
///
/// # Safety
/// [`configure`] must have run on this thread; `x` must be readable for the
/// configured tokens' rows of 32 bytes at its stride and `w` for 512 bytes.
#[inline]
pub unsafe fn multiply(tile: usize, x: *const i8, x_stride: usize, w: *const u8) {
    match tile % SUM_TILES {
        0 => multiply_in::<0>(x, x_stride, w),
        1 => multiply_in::<1>(x, x_stride, w),
        2 => multiply_in::<2>(x, x_stride, w),
        _ => multiply_in::<3>(x, x_stride, w),
    }
}

#[inline]
unsafe fn multiply_in<const K: usize>(x: *const i8, x_stride: usize, w: *const u8) {
    // Consecutive blocks load their operands into different tiles.
    asm!(
        "tilezero tmm{c}",
        "tileloadd tmm{a}, [{x} + {xs} * 1]",
        "tileloadd tmm{b}, [{w} + {ws} * 1]",
        "tdpbsud tmm{c}, tmm{a}, tmm{b}",
        c = const K,
        a = const 4 + K % 2,
        b = const 6 + K % 2,
        x = in(reg) x,
        xs = in(reg) x_stride,
        w = in(reg) w,
        ws = in(reg) 64usize,
        options(nostack, readonly),
    );
}

/// Sum tile `tile`, as `sums[16 * token + row]`.
///
/// # Safety
/// [`multiply`] into `tile` must have run on this thread; `sums` must be
/// writable for 16 values per configured token.
#[inline]
pub unsafe fn store(tile: usize, sums: *mut i32) {
    match tile % SUM_TILES {
        0 => store_from::<0>(sums),
        1 => store_from::<1>(sums),
        2 => store_from::<2>(sums),
        _ => store_from::<3>(sums),
    }
}

#[inline]
unsafe fn store_from<const K: usize>(sums: *mut i32) {
    asm!(
        "tilestored [{out} + {os} * 1], tmm{c}",
        c = const K,
        out = in(reg) sums,
        os = in(reg) 64usize,
        options(nostack),
    );
}
