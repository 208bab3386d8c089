//! Memory limits the image ops check before they allocate: a cap on the pixels of any
//! one image (decoded, resized or cropped) and a budget for the pixels of every image
//! alive in the process at once. A request that would cross either gets an error
//! naming the limit; nothing is allocated for it, and every other request is served.
//!
//! The limits are process-wide because images are: a server sets them once at start
//! (`sluice serve --max-image-pixels`, `--image-memory-mb`).

use crate::op::OpError;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// 64 Mi pixels (8192 x 8192, 192 MiB of RGB).
pub const DEFAULT_MAX_IMAGE_PIXELS: u64 = 64 << 20;
/// 1 GiB of pixels alive at once.
pub const DEFAULT_IMAGE_MEMORY_BYTES: usize = 1 << 30;

static MAX_IMAGE_PIXELS: AtomicU64 = AtomicU64::new(DEFAULT_MAX_IMAGE_PIXELS);
/// The budget every image is charged to.
pub static IMAGES: Budget = Budget::new(DEFAULT_IMAGE_MEMORY_BYTES);

/// Sets the largest image (in pixels) any op may produce.
pub fn set_max_image_pixels(pixels: u64) {
    MAX_IMAGE_PIXELS.store(pixels.max(1), Ordering::Relaxed);
}

pub fn max_image_pixels() -> u64 {
    MAX_IMAGE_PIXELS.load(Ordering::Relaxed)
}

/// The bytes of an RGB `w` x `h` image, if it is within the per-image cap.
pub fn image_bytes(w: u64, h: u64) -> Result<usize, OpError> {
    let max = max_image_pixels();
    match w.checked_mul(h) {
        _ if w == 0 || h == 0 => Err(OpError::Invalid(format!("an image of {w}x{h} pixels is empty"))),
        Some(px) if px <= max => Ok(px as usize * 3),
        _ => Err(OpError::TooLarge(format!(
            "an image of {w}x{h} pixels is over the limit of {max} pixels per image (sluice serve --max-image-pixels)"
        ))),
    }
}

/// Bytes that may be held at once, and those held now.
pub struct Budget {
    limit: AtomicUsize,
    used: AtomicUsize,
}

impl Budget {
    pub const fn new(limit: usize) -> Budget {
        Budget { limit: AtomicUsize::new(limit), used: AtomicUsize::new(0) }
    }

    pub fn set_limit(&self, bytes: usize) {
        self.limit.store(bytes, Ordering::Relaxed);
    }

    /// Bytes held now, and the limit.
    pub fn usage(&self) -> (usize, usize) {
        (self.used.load(Ordering::Relaxed), self.limit.load(Ordering::Relaxed))
    }

    /// Takes `bytes`, or refuses when what is already held leaves too little: the
    /// request can be retried once others finish. One image alone may always take the
    /// whole budget (the per-image cap bounds it).
    pub fn take(&'static self, bytes: usize) -> Result<Charge, OpError> {
        let limit = self.limit.load(Ordering::Relaxed);
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            if used > 0 && used.saturating_add(bytes) > limit {
                return Err(OpError::Busy(format!(
                    "image memory is full: {} MiB of images are being processed and this one needs {} MiB; \
                     the budget is {} MiB (sluice serve --image-memory-mb); retry later",
                    used >> 20,
                    bytes.div_ceil(1 << 20),
                    limit >> 20
                )));
            }
            match self.used.compare_exchange_weak(used, used + bytes, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Ok(Charge { budget: self, bytes }),
                Err(now) => used = now,
            }
        }
    }

    /// Counts `bytes` that are already allocated (an image made from a tensor the
    /// request carried) without refusing them.
    pub fn force(&'static self, bytes: usize) -> Charge {
        self.used.fetch_add(bytes, Ordering::AcqRel);
        Charge { budget: self, bytes }
    }
}

/// A share of a budget, given back when dropped.
#[derive(Debug)]
pub struct Charge {
    budget: &'static Budget,
    bytes: usize,
}

impl std::fmt::Debug for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (used, limit) = self.usage();
        write!(f, "Budget({used}/{limit})")
    }
}

impl Charge {
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Clone for Charge {
    fn clone(&self) -> Charge {
        self.budget.force(self.bytes)
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// A zeroed `len`-byte buffer, or an error instead of the process aborting when the
/// allocator has no room.
pub fn try_zeroed(len: usize) -> Result<Vec<u8>, OpError> {
    let mut v = Vec::new();
    v.try_reserve_exact(len)
        .map_err(|_| OpError::Busy(format!("cannot allocate {} MiB for an image; retry later", len >> 20)))?;
    v.resize(len, 0);
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_checked_without_overflow() {
        assert_eq!(image_bytes(224, 224).unwrap(), 224 * 224 * 3);
        let e = image_bytes(16_768_000, 256).unwrap_err();
        assert!(matches!(&e, OpError::TooLarge(m) if m.contains("--max-image-pixels")), "{e}");
        assert!(matches!(image_bytes(u64::MAX, u64::MAX), Err(OpError::TooLarge(_))));
        assert!(matches!(image_bytes(0, 5), Err(OpError::Invalid(_))));
    }

    #[test]
    fn the_budget_refuses_what_does_not_fit_and_frees_on_drop() {
        static B: Budget = Budget::new(100);
        let big = B.take(150).unwrap();
        assert!(B.take(1).is_err(), "one image alone may take it all, then nothing more");
        drop(big);
        let a = B.take(60).unwrap();
        let e = B.take(60).unwrap_err();
        assert!(matches!(&e, OpError::Busy(m) if m.contains("--image-memory-mb")), "{e}");
        let copy = a.clone();
        assert_eq!(B.usage(), (120, 100), "a clone of an image is counted too");
        drop((a, copy));
        let b = B.take(60).unwrap();
        assert_eq!(B.usage(), (60, 100));
        drop(b);
        assert_eq!(B.usage(), (0, 100));
    }
}
