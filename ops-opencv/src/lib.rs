//! The image ops' OpenCV engine (`engine: opencv` on an op): cv2's own kernels for users
//! porting Python pre-processing that must match it exactly (INTER_AREA, INTER_CUBIC,
//! warpPerspective), and libjpeg-turbo's DCT-scaled decode (IMREAD_REDUCED_*), which
//! decodes a large JPEG at 1/2, 1/4 or 1/8 of its size for a fraction of the work when the
//! pipeline shrinks it far below that anyway. A program turns it on with [`install`]
//! (the `sluice` command does, built with its `opencv` cargo feature).
//!
//! OpenCV reads and writes our buffers in place (Mat headers over them); sizes are
//! checked against the caps and charged to the image budget before OpenCV allocates.
//! OpenCV's own thread pool is off: ops run on sluice's pools, sized by the operator.
#![forbid(unsafe_code)]

use opencv::core::{Mat, Point2f, Rect, Scalar, Size, Vec3b, BORDER_REPLICATE, CV_8UC3};
use opencv::prelude::*;
use opencv::{imgcodecs, imgproc};
use sluice_ops::image_ops::{jpeg_header, orient, Interpolation, OpencvKernels, Region};
use sluice_ops::{Image, OpError};
use std::sync::Once;

/// Makes `engine: opencv` available to the pipelines this process loads from now on
/// (idempotent).
pub fn install() {
    sluice_ops::image_ops::install_opencv(&Kernels);
}

struct Kernels;

impl OpencvKernels for Kernels {
    fn decode(&self, data: &[u8], max_pixels: u64, max_side: Option<u32>) -> Result<Image, OpError> {
        decode(data, max_pixels, max_side)
    }
    fn resize(
        &self,
        src: &Image,
        from: Region,
        dst: &mut Image,
        to: Region,
        interpolation: Interpolation,
    ) -> Result<(), OpError> {
        resize(src, from, dst, to, interpolation)
    }
    fn warp_quad(
        &self,
        img: &Image,
        q: [(f32, f32); 4],
        size: (u32, u32),
        interpolation: Interpolation,
    ) -> Result<Image, OpError> {
        warp_quad(img, q, size, interpolation)
    }
}

/// cv2's INTER_* flag of a kernel.
fn inter(interpolation: Interpolation) -> i32 {
    use opencv::imgproc::{INTER_AREA, INTER_CUBIC, INTER_LINEAR, INTER_NEAREST};
    match interpolation {
        Interpolation::Linear => INTER_LINEAR,
        Interpolation::Area => INTER_AREA,
        Interpolation::Cubic => INTER_CUBIC,
        Interpolation::Nearest => INTER_NEAREST,
    }
}

static SERIAL: Once = Once::new();

/// Turns OpenCV's parallel_for_ off, once: every call then runs on the calling op thread.
fn init() {
    SERIAL.call_once(|| {
        // 0: no threading (OpenCV runs each function on its caller). A failure costs
        // only oversubscription, never a wrong answer; this crate has no logger.
        if let Err(e) = opencv::core::set_num_threads(0) {
            eprintln!("sluice-opencv: could not turn OpenCV's thread pool off ({e})");
        }
    });
}

fn cv(what: &'static str) -> impl Fn(opencv::Error) -> OpError {
    move |e| OpError::Internal(format!("OpenCV {what}: {e}"))
}

fn to_i32(v: u32, what: &str) -> Result<i32, OpError> {
    i32::try_from(v).map_err(|_| OpError::TooLarge(format!("{what} {v} is beyond OpenCV's int sizes")))
}

fn rect(r: Region) -> Result<Rect, OpError> {
    Ok(Rect::new(to_i32(r.0, "x")?, to_i32(r.1, "y")?, to_i32(r.2, "width")?, to_i32(r.3, "height")?))
}

/// A Mat header over an image's pixels (no copy).
fn mat_of(img: &Image) -> Result<opencv::boxed_ref::BoxedRef<'_, Mat>, OpError> {
    let (w, h) = (to_i32(img.width, "width")?, to_i32(img.height, "height")?);
    Mat::new_rows_cols_with_bytes::<Vec3b>(h, w, &img.data).map_err(cv("image header"))
}

/// A writable Mat header over an image's pixels (no copy).
fn mat_of_mut(img: &mut Image) -> Result<opencv::boxed_ref::BoxedRefMut<'_, Mat>, OpError> {
    let (w, h) = (to_i32(img.width, "width")?, to_i32(img.height, "height")?);
    Mat::new_rows_cols_with_bytes_mut::<Vec3b>(h, w, &mut img.data).map_err(cv("image header"))
}

/// The DCT scale a JPEG of `w` x `h` is decoded at for a pipeline that needs at most
/// `max_side` pixels on its longer side: the smallest of 1/8, 1/4, 1/2 whose longer
/// side is still at least `max_side` (libjpeg rounds sizes up), else full size.
pub fn reduction(w: u32, h: u32, max_side: u32) -> u32 {
    let long = w.max(h);
    [8, 4, 2].into_iter().find(|&f| long.div_ceil(f) >= max_side).unwrap_or(1)
}

/// Decodes a JPEG with OpenCV (libjpeg-turbo), at 1/2, 1/4 or 1/8 scale when
/// `max_side` allows (see [`reduction`]); the image remembers the full size
/// ([`Image::source_size`]). The EXIF orientation is applied as by the pure-Rust decode.
/// Other formats go to the pure-Rust decoders: PNG is lossless, so every decoder gives
/// the same pixels, and OpenCV's reduced PNG decode is a full decode plus a resize.
pub fn decode(data: &[u8], max_pixels: u64, max_side: Option<u32>) -> Result<Image, OpError> {
    if !data.starts_with(&[0xFF, 0xD8]) {
        return sluice_ops::image_ops::decode_image(data, max_pixels);
    }
    init();
    // The header first, without decoding: the size is checked against the caps before
    // OpenCV allocates anything.
    let (w, h, orientation) = jpeg_header(data, max_pixels)?;
    let factor = max_side.map_or(1, |m| reduction(w, h, m));
    let (rw, rh) = (w.div_ceil(factor), h.div_ceil(factor));
    let flags = imgcodecs::IMREAD_IGNORE_ORIENTATION
        | match factor {
            1 => imgcodecs::IMREAD_COLOR,
            2 => imgcodecs::IMREAD_REDUCED_COLOR_2,
            4 => imgcodecs::IMREAD_REDUCED_COLOR_4,
            _ => imgcodecs::IMREAD_REDUCED_COLOR_8,
        };
    // OpenCV decodes (BGR) into a buffer of its own: charged like ours while it lives.
    // A progressive JPEG also keeps every DCT coefficient of the full-size image (2
    // bytes a sample) whatever the output scale: charged at full size then.
    let (cw, ch) = if progressive(data) { (w, h) } else { (rw, rh) };
    let _scratch =
        sluice_ops::memory::IMAGES.take(sluice_ops::memory::image_bytes(cw as u64, ch as u64)?.saturating_mul(2))?;
    let len = i32::try_from(data.len()).map_err(|_| OpError::TooLarge(format!("{} bytes of JPEG", data.len())))?;
    let encoded = Mat::new_rows_cols_with_data(1, len, data).map_err(cv("input header"))?;
    let bgr = imgcodecs::imdecode(&encoded, flags).map_err(|e| OpError::Invalid(format!("cannot decode JPEG: {e}")))?;
    if bgr.empty() {
        return Err(OpError::Invalid("cannot decode JPEG: OpenCV's decoder refused it".into()));
    }
    // The file's own fault (headers that two decoders read differently): the client's.
    if (bgr.cols(), bgr.rows(), bgr.typ()) != (rw as i32, rh as i32, CV_8UC3) {
        return Err(OpError::Invalid(format!(
            "cannot decode JPEG: OpenCV decoded {}x{} (type {}) where its header says {rw}x{rh} 8-bit colour",
            bgr.cols(),
            bgr.rows(),
            bgr.typ()
        )));
    }
    let mut img = Image::alloc(rw, rh)?;
    {
        let mut rgb = mat_of_mut(&mut img)?;
        let at = rgb.data();
        imgproc::cvt_color_def(&bgr, &mut rgb, imgproc::COLOR_BGR2RGB).map_err(cv("BGR to RGB"))?;
        if rgb.data() != at {
            return Err(OpError::Internal("OpenCV wrote the decoded pixels elsewhere".into()));
        }
    }
    drop(bgr);
    let transposed = matches!(orientation, 5..=8);
    let img = orient(img, orientation)?;
    Ok(if transposed { img.with_source_size(h, w) } else { img.with_source_size(w, h) })
}

/// Whether a JPEG is progressive (or otherwise multi-scan: SOF2, SOF6, SOF10, SOF14),
/// from its markers before the first scan. Bounded by the data: each step moves past
/// one marker segment.
fn progressive(data: &[u8]) -> bool {
    let mut i = 2;
    while i + 4 <= data.len() {
        if data[i] != 0xFF {
            return false;
        }
        let marker = data[i + 1];
        match marker {
            0xC2 | 0xC6 | 0xCA | 0xCE => return true,
            0xC0 | 0xC1 | 0xC3 | 0xC5 | 0xC7 | 0xC9 | 0xCB | 0xCD | 0xCF | 0xDA => return false,
            // Fill bytes before a marker.
            0xFF => i += 1,
            _ => i += 2 + u16::from_be_bytes([data[i + 2], data[i + 3]]) as usize,
        }
    }
    false
}

/// Resizes the rectangle `from` (left, top, width, height) of `src` into the rectangle
/// `to` of `dst` with `cv::resize`.
pub fn resize(
    src: &Image,
    from: Region,
    dst: &mut Image,
    to: Region,
    interpolation: Interpolation,
) -> Result<(), OpError> {
    init();
    let whole = mat_of(src)?;
    let s = Mat::roi(&whole, rect(from)?).map_err(cv("source region"))?;
    let mut canvas = mat_of_mut(dst)?;
    let mut d = Mat::roi_mut(&mut canvas, rect(to)?).map_err(cv("destination region"))?;
    let at = d.data();
    let size = Size::new(to_i32(to.2, "width")?, to_i32(to.3, "height")?);
    imgproc::resize(&s, &mut d, size, 0.0, 0.0, inter(interpolation)).map_err(cv("resize"))?;
    if d.data() != at {
        return Err(OpError::Internal("OpenCV wrote the resized pixels elsewhere".into()));
    }
    Ok(())
}

/// Warps the quad (top-left, top-right, bottom-right, bottom-left) onto an upright
/// `w` x `h` image with `cv::getPerspectiveTransform` and `cv::warpPerspective`, edge
/// pixels replicated outside the image, as PaddleOCR crops text lines.
pub fn warp_quad(
    img: &Image,
    q: [(f32, f32); 4],
    (w, h): (u32, u32),
    interpolation: Interpolation,
) -> Result<Image, OpError> {
    init();
    let from = q.map(|(x, y)| Point2f::new(x, y));
    let to = [(0.0, 0.0), (w as f32, 0.0), (w as f32, h as f32), (0.0, h as f32)].map(|(x, y)| Point2f::new(x, y));
    let m = imgproc::get_perspective_transform_slice_def(from, to)
        .map_err(|e| OpError::Invalid(format!("quad {q:?} is degenerate: {e}")))?;
    let src = mat_of(img)?;
    let mut out = Image::alloc(w, h)?;
    {
        let mut d = mat_of_mut(&mut out)?;
        let at = d.data();
        let size = Size::new(to_i32(w, "width")?, to_i32(h, "height")?);
        imgproc::warp_perspective(&src, &mut d, &m, size, inter(interpolation), BORDER_REPLICATE, Scalar::default())
            .map_err(cv("warpPerspective"))?;
        if d.data() != at {
            return Err(OpError::Internal("OpenCV wrote the warped pixels elsewhere".into()));
        }
    }
    Ok(out)
}
