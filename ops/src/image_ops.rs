//! Image ops: decode, resize, normalize, crop, rotate. Pure Rust (zune-jpeg, png,
//! fast_image_resize); resizing uses bilinear interpolation without antialiasing, which
//! matches OpenCV's INTER_LINEAR, the pre-processing most vision models are trained with.

use crate::op::{input, param, port, BuildContext, NoParams, Op, OpError, OpResult, OpSpec, Port};
use crate::tensor::{DataType, Tensor};
use crate::value::{Image, Value, ValueType};
use fast_image_resize::images::{TypedCroppedImage, TypedCroppedImageMut, TypedImage, TypedImageRef};
use fast_image_resize::pixels::U8x3;
use fast_image_resize::{FilterType, ResizeAlg, ResizeOptions, Resizer};
use serde::Deserialize;
use std::cell::RefCell;
use std::sync::Arc;

/// The image ops, for [`OpRegistry::builtin`](crate::op::OpRegistry::builtin).
pub(crate) const OPS: &[OpSpec] = &[
    OpSpec {
        name: "decode_image",
        summary: "encoded JPEG/PNG bytes -> RGB image (EXIF orientation applied)",
        params: &[
            param(
                "max_pixels",
                "server's --max-image-pixels",
                "refuse images with more pixels (decompression bombs); at most the server's cap",
            ),
            ENGINE,
            param(
                "max_side",
                "none",
                "engine opencv: decode JPEGs at 1/2, 1/4 or 1/8 size, the smallest whose longer side is still >= this",
            ),
        ],
        example: "{}",
        build: build_decode,
    },
    OpSpec {
        name: "resize",
        summary: "image -> image: stretch, letterbox, shorter_side_crop, fit_multiple",
        params: &[
            param("mode", "required", "stretch, letterbox, shorter_side_crop or fit_multiple"),
            param("width", "0", "target width (stretch, letterbox, shorter_side_crop)"),
            param("height", "0", "target height (stretch, letterbox, shorter_side_crop)"),
            param("shorter", "none", "shorter_side_crop: the shorter side before the centre crop"),
            param("pad", "0", "letterbox: grey level of the padding"),
            param("multiple", "32", "fit_multiple: each side rounded to a multiple of this"),
            param("max_side", "none", "fit_multiple: scale down to at most this"),
            param("min_side", "none", "fit_multiple: scale up to at least this"),
            ENGINE,
            INTERPOLATION,
        ],
        example: r#"{"mode": "stretch", "width": 224, "height": 224}"#,
        build: build_resize,
    },
    OpSpec {
        name: "normalize",
        summary: "image -> FP32 tensor (NCHW/NHWC, mean/std, RGB/BGR)",
        params: &[
            param("scale", "1/255", "pixels are multiplied by this first"),
            param("mean", "[0,0,0]", "subtracted per channel"),
            param("std", "[1,1,1]", "divided by per channel"),
            param("layout", "nchw", "nchw or nhwc"),
            param("channel_order", "rgb", "rgb or bgr"),
        ],
        example: "{}",
        build: build_normalize,
    },
    OpSpec {
        name: "to_tensor",
        summary: "image -> UINT8 tensor [H,W,3]",
        params: &[],
        example: "{}",
        build: build_to_tensor,
    },
    OpSpec {
        name: "rotate180",
        summary: "image -> image turned upside down",
        params: &[],
        example: "{}",
        build: build_rotate180,
    },
    OpSpec {
        name: "crop_boxes",
        summary: "image + boxes [n,4] -> list of n crops",
        params: &[param("resize", "none", "[w, h]: resize every crop to this size"), ENGINE, INTERPOLATION],
        example: "{}",
        build: build_crop_boxes,
    },
    OpSpec {
        name: "crop_quads",
        summary: "image + quads [n,4,2] -> list of n perspective-warped crops",
        params: &[
            param("rotate_tall_ratio", "0", "turn crops at least this many times taller than wide by 90 degrees"),
            ENGINE,
            INTERPOLATION,
        ],
        example: "{}",
        build: build_crop_quads,
    },
    OpSpec {
        name: "from_tensor",
        summary: "UINT8 tensor [H,W,3] -> image",
        params: &[],
        example: "{}",
        build: build_from_tensor,
    },
];

fn image_in(inputs: &[Value], i: usize) -> Result<&Arc<Image>, OpError> {
    input(inputs, i, "an image", Value::as_image)
}

// ---- engines ----

/// Which library runs an image op's kernels (`engine:` on decode_image, resize,
/// crop_boxes and crop_quads).
#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug, Default)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// Pure Rust (zune-jpeg, png, fast_image_resize): always built in.
    #[default]
    Rust,
    /// OpenCV's (the sluice-opencv crate, installed by a program built with it): cv2's
    /// exact kernels, and reduced JPEG decodes.
    Opencv,
}

/// The resampling kernel of `engine: opencv` (cv2's INTER_* flags).
#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug, Default)]
#[serde(rename_all = "lowercase")]
pub enum Interpolation {
    /// Bilinear without antialiasing (INTER_LINEAR, cv2.resize's default).
    #[default]
    Linear,
    /// Pixel-area averaging (INTER_AREA): what cv2 users shrink images with.
    Area,
    /// Bicubic (INTER_CUBIC): PaddleOCR's text-line warp.
    Cubic,
    /// Nearest neighbour (INTER_NEAREST).
    Nearest,
}

/// A region of an image: left, top, width, height.
pub type Region = (u32, u32, u32, u32);

/// The kernels of `engine: opencv`. They live in the `sluice-opencv` crate, which links
/// OpenCV's C++ libraries; a program built with it (the `sluice` command's `opencv` cargo
/// feature) installs them once at start-up ([`install_opencv`]). This crate, and the
/// server on it, then compile the same with or without OpenCV.
pub trait OpencvKernels: Send + Sync {
    /// Decodes an image (a JPEG at a DCT-reduced scale when `max_side` allows), checking
    /// its size against `max_pixels` and the image budget before any pixel memory is taken.
    fn decode(&self, data: &[u8], max_pixels: u64, max_side: Option<u32>) -> Result<Image, OpError>;
    /// Resizes the region `from` of `src` into the region `to` of `dst`.
    fn resize(
        &self,
        src: &Image,
        from: Region,
        dst: &mut Image,
        to: Region,
        interpolation: Interpolation,
    ) -> Result<(), OpError>;
    /// Warps the quad `q` (top-left, top-right, bottom-right, bottom-left; checked not
    /// degenerate) onto an upright image of `size`.
    fn warp_quad(
        &self,
        img: &Image,
        q: [(f32, f32); 4],
        size: (u32, u32),
        interpolation: Interpolation,
    ) -> Result<Image, OpError>;
}

static OPENCV: std::sync::OnceLock<&'static dyn OpencvKernels> = std::sync::OnceLock::new();

/// Makes `engine: opencv` available to every pipeline loaded afterwards. The first
/// kernels installed stay: later calls change nothing.
pub fn install_opencv(kernels: &'static dyn OpencvKernels) {
    let _ = OPENCV.set(kernels);
}

/// The kernels of `engine: opencv`, where this program installed them.
pub fn opencv() -> Option<&'static dyn OpencvKernels> {
    OPENCV.get().copied()
}

/// The installed kernels, or an internal error: pipelines that use `engine: opencv` are
/// refused at load where none are, so this fails only on a program's own mistake.
fn opencv_kernels() -> Result<&'static dyn OpencvKernels, OpError> {
    opencv().ok_or_else(|| OpError::Internal("engine: opencv in a build without OpenCV's kernels".into()))
}

/// The kernels of an op: its engine and, with OpenCV, the interpolation.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Kernel {
    pub engine: Engine,
    pub interpolation: Interpolation,
}

impl Kernel {
    /// The kernel of `engine` and `interpolation` params, refused at pipeline load (the
    /// error names the param) where this build cannot run it.
    fn new(engine: Engine, interpolation: Interpolation) -> Result<Kernel, String> {
        Kernel { engine, interpolation }.check().map(|()| Kernel { engine, interpolation })
    }

    fn check(&self) -> Result<(), String> {
        match self.engine {
            Engine::Opencv if opencv().is_none() => {
                Err("bad params: engine: opencv needs a sluice built with the `opencv` \
                 cargo feature (cargo build --release --features opencv; a program on the sluice-server \
                 library calls sluice_opencv::install() at start-up); this one has only engine: rust"
                    .into())
            }
            Engine::Rust if self.interpolation != Interpolation::Linear => Err(format!(
                "bad params: interpolation: {:?} needs engine: opencv (the rust engine resizes bilinearly)",
                self.interpolation
            )
            .to_lowercase()),
            _ => Ok(()),
        }
    }

    /// Resizes the whole of `src` into a fresh `w` x `h` image.
    pub fn resize_to(&self, src: &Image, w: u32, h: u32) -> Result<Image, OpError> {
        match self.engine {
            Engine::Rust => resize_to(src, w, h),
            Engine::Opencv => {
                let mut out = Image::alloc(w, h)?;
                self.resize_into(src, (0, 0, src.width, src.height), &mut out, (0, 0, w, h))?;
                Ok(out)
            }
        }
    }

    /// Resizes the region (left, top, w, h) of `src` into a fresh `ow` x `oh` image.
    pub fn crop_resize(&self, src: &Image, region: (u32, u32, u32, u32), ow: u32, oh: u32) -> Result<Image, OpError> {
        match self.engine {
            Engine::Rust => crop_resize(src, region, ow, oh),
            Engine::Opencv => {
                let mut out = Image::alloc(ow, oh)?;
                self.resize_into(src, region, &mut out, (0, 0, ow, oh))?;
                Ok(out)
            }
        }
    }

    /// Resizes the region `from` of `src` into the region `to` of `dst`.
    fn resize_into(
        &self,
        src: &Image,
        from: (u32, u32, u32, u32),
        dst: &mut Image,
        to: (u32, u32, u32, u32),
    ) -> Result<(), OpError> {
        match self.engine {
            Engine::Rust => {
                let s = TypedImageRef::<U8x3>::from_buffer(src.width, src.height, &src.data).map_err(internal)?;
                let s = TypedCroppedImage::new(s, from.0, from.1, from.2, from.3).map_err(internal)?;
                let canvas = TypedImage::<U8x3>::from_buffer(dst.width, dst.height, &mut dst.data).map_err(internal)?;
                let mut d = TypedCroppedImageMut::new(canvas, to.0, to.1, to.2, to.3).map_err(internal)?;
                RESIZER.with_borrow_mut(|r| r.resize_typed(&s, &mut d, &bilinear())).map_err(internal)
            }
            Engine::Opencv => opencv_kernels()?.resize(src, from, dst, to, self.interpolation),
        }
    }

    /// Warps a quad onto an upright image (see [`warp_quad`]).
    fn warp_quad(&self, img: &Image, q: [(f32, f32); 4]) -> Result<Image, OpError> {
        match self.engine {
            Engine::Rust => warp_quad(img, q),
            Engine::Opencv => {
                // cv::getPerspectiveTransform gives a matrix of zeros for a quad with no
                // area rather than an error: refuse it as the pure-Rust warp does.
                let size = quad_size(q)?;
                let dst = [(0.0, 0.0), (size.0 as f32, 0.0), (size.0 as f32, size.1 as f32), (0.0, size.1 as f32)];
                if homography(dst, q).is_none() {
                    return Err(OpError::Invalid(format!("quad {q:?} is degenerate")));
                }
                opencv_kernels()?.warp_quad(img, q, size, self.interpolation)
            }
        }
    }
}

const ENGINE: crate::op::Param =
    param("engine", "rust", "rust, or opencv: OpenCV's kernels (a build with the `opencv` cargo feature)");
const INTERPOLATION: crate::op::Param =
    param("interpolation", "linear", "engine opencv: linear, area (cv2.INTER_AREA, for shrinking), cubic or nearest");

// ---- decode ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DecodeParams {
    /// Refuse images with more pixels than this (decompression bombs); the server's
    /// per-image cap applies as well.
    #[serde(default)]
    max_pixels: Option<u64>,
    #[serde(default)]
    engine: Engine,
    /// The pipeline needs at most this many pixels on the longer side: JPEGs decode at
    /// a DCT scale (engine opencv).
    #[serde(default)]
    max_side: Option<u32>,
}

struct Decode {
    max_pixels: Option<u64>,
    engine: Engine,
    max_side: Option<u32>,
}

pub(crate) fn build_decode(ctx: &BuildContext) -> Result<Box<dyn Op>, String> {
    let p: DecodeParams = ctx.params()?;
    Kernel::new(p.engine, Interpolation::Linear)?;
    match p.max_side {
        Some(0) => return Err("bad params: max_side must be > 0".into()),
        Some(_) if p.engine != Engine::Opencv => {
            return Err("bad params: max_side (a reduced JPEG decode) needs engine: opencv".into())
        }
        _ => {}
    }
    Ok(Box::new(Decode { max_pixels: p.max_pixels, engine: p.engine, max_side: p.max_side }))
}

impl Op for Decode {
    fn inputs(&self) -> Vec<Port> {
        vec![port("bytes", ValueType::Bytes)]
    }
    fn outputs(&self) -> Vec<Port> {
        vec![port("image", ValueType::image())]
    }
    fn run(&self, inputs: &[Value]) -> OpResult {
        let data = input(inputs, 0, "encoded bytes", |v| match v {
            Value::Bytes(b) => Some(b),
            _ => None,
        })?;
        let max = self.max_pixels.unwrap_or(u64::MAX).min(crate::memory::max_image_pixels());
        let img = match self.engine {
            Engine::Rust => decode_image(data, max)?,
            Engine::Opencv => opencv_kernels()?.decode(data, max, self.max_side)?,
        };
        Ok(vec![Value::Image(Arc::new(img))])
    }
}

/// Decodes a JPEG or PNG into RGB, applying the EXIF orientation of JPEGs. The size in
/// the header is checked against `max_pixels` and the image budget before any pixel
/// memory is taken.
pub fn decode_image(data: &[u8], max_pixels: u64) -> Result<Image, OpError> {
    let bad = |what: &str, e: &dyn std::fmt::Display| OpError::Invalid(format!("cannot decode {what}: {e}"));
    if data.starts_with(&[0xFF, 0xD8]) {
        let (mut dec, w, h) = jpeg_decoder(data, max_pixels)?;
        let mut img = Image::alloc(w, h)?;
        if dec.output_buffer_size() != Some(img.data.len()) {
            return Err(bad("JPEG", &"unexpected output size"));
        }
        dec.decode_into(&mut img.data).map_err(|e| bad("JPEG", &e))?;
        let orientation = dec.exif().and_then(|e| exif_orientation(e)).unwrap_or(1);
        orient(img, orientation)
    } else if data.starts_with(b"\x89PNG") {
        // The crate's own cap (64 MiB of output) would refuse large RGB images that are
        // within ours: bound it by ours instead (4 bytes a pixel for RGBA before it is
        // turned into RGB).
        let limits = png::Limits { bytes: usize::try_from(max_pixels.saturating_mul(4)).unwrap_or(usize::MAX) };
        let mut dec = png::Decoder::new_with_limits(std::io::Cursor::new(data), limits);
        dec.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
        let mut reader = dec.read_info().map_err(|e| bad("PNG", &e))?;
        let (w, h) = (reader.info().width, reader.info().height);
        check_pixels(w as usize, h as usize, max_pixels)?;
        let mut img = Image::alloc(w, h)?;
        let (color, _) = reader.output_color_type();
        if color == png::ColorType::Rgb {
            let frame = reader.next_frame(&mut img.data).map_err(|e| bad("PNG", &e))?;
            if frame.buffer_size() != img.data.len() {
                return Err(bad("PNG", &"unexpected frame size"));
            }
            return Ok(img);
        }
        // Other layouts decode into a scratch buffer, charged to the budget as well.
        let len = reader.output_buffer_size().ok_or_else(|| bad("PNG", &"size overflow"))?;
        let _scratch_charge = crate::memory::IMAGES.take(len)?;
        let mut buf = crate::memory::try_zeroed(len)?;
        let frame = reader.next_frame(&mut buf).map_err(|e| bad("PNG", &e))?;
        let buf = &buf[..frame.buffer_size()];
        let per_px = match frame.color_type {
            png::ColorType::Rgba => 4,
            png::ColorType::Grayscale => 1,
            png::ColorType::GrayscaleAlpha => 2,
            png::ColorType::Rgb => 3,
            png::ColorType::Indexed => return Err(bad("PNG", &"palette was not expanded")),
        };
        if buf.len() != img.data.len() / 3 * per_px {
            return Err(bad("PNG", &"unexpected frame size"));
        }
        for (out, px) in img.data.chunks_exact_mut(3).zip(buf.chunks_exact(per_px)) {
            match per_px {
                1 | 2 => out.fill(px[0]),
                _ => out.copy_from_slice(&px[..3]),
            }
        }
        Ok(img)
    } else {
        Err(OpError::Invalid(format!(
            "cannot decode image: not a JPEG or PNG ({} bytes, starting {:02x?})",
            data.len(),
            &data[..data.len().min(4)]
        )))
    }
}

type Jpeg<'a> = zune_jpeg::JpegDecoder<zune_core::bytestream::ZCursor<&'a [u8]>>;

/// A JPEG decoder with the headers read (nothing decoded yet), and the image's size,
/// checked against `max_pixels`.
fn jpeg_decoder(data: &[u8], max_pixels: u64) -> Result<(Jpeg<'_>, u32, u32), OpError> {
    use zune_core::bytestream::ZCursor;
    use zune_core::colorspace::ColorSpace;
    use zune_core::options::DecoderOptions;
    let bad = |e: &dyn std::fmt::Display| OpError::Invalid(format!("cannot decode JPEG: {e}"));
    let side = (max_pixels as usize).min(u16::MAX as usize);
    let opts =
        DecoderOptions::default().jpeg_set_out_colorspace(ColorSpace::RGB).set_max_width(side).set_max_height(side);
    let mut dec = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(data), opts);
    dec.decode_headers().map_err(|e| bad(&e))?;
    let (w, h) = dec.dimensions().ok_or_else(|| bad(&"no dimensions"))?;
    check_pixels(w, h, max_pixels)?;
    Ok((dec, w as u32, h as u32))
}

/// A JPEG's size (checked against `max_pixels`) and EXIF orientation, from its headers.
pub fn jpeg_header(data: &[u8], max_pixels: u64) -> Result<(u32, u32, u16), OpError> {
    let (dec, w, h) = jpeg_decoder(data, max_pixels)?;
    Ok((w, h, dec.exif().and_then(|e| exif_orientation(e)).unwrap_or(1)))
}

fn check_pixels(w: usize, h: usize, max: u64) -> Result<(), OpError> {
    if w == 0 || h == 0 {
        return Err(OpError::Invalid(format!("image is {w}x{h}: empty")));
    }
    if (w as u64).saturating_mul(h as u64) > max {
        return Err(OpError::TooLarge(format!(
            "image is {w}x{h}: over the limit of {max} pixels (the decode node's max_pixels, or sluice serve \
             --max-image-pixels)"
        )));
    }
    Ok(())
}

/// The orientation tag (0x0112) of an EXIF block (a TIFF structure, after "Exif\0\0"
/// when present).
fn exif_orientation(exif: &[u8]) -> Option<u16> {
    let tiff = exif.strip_prefix(b"Exif\0\0").unwrap_or(exif);
    let le = match tiff.get(..2)? {
        b"II" => true,
        b"MM" => false,
        _ => return None,
    };
    let u16_at = |o: usize| {
        tiff.get(o..o + 2).map(|b| if le { u16::from_le_bytes([b[0], b[1]]) } else { u16::from_be_bytes([b[0], b[1]]) })
    };
    let u32_at = |o: usize| {
        tiff.get(o..o + 4).map(|b| {
            let a = [b[0], b[1], b[2], b[3]];
            if le {
                u32::from_le_bytes(a)
            } else {
                u32::from_be_bytes(a)
            }
        })
    };
    let ifd = u32_at(4)? as usize;
    let count = u16_at(ifd)? as usize;
    (0..count).map(|i| ifd + 2 + i * 12).find(|&e| u16_at(e) == Some(0x0112)).and_then(|e| u16_at(e + 8))
}

/// Applies an EXIF orientation (1..=8) so the image is upright.
pub fn orient(img: Image, orientation: u16) -> Result<Image, OpError> {
    let (w, h) = (img.width as usize, img.height as usize);
    // For each output pixel (x, y) of an output of size (ow, oh): its source pixel.
    let transposed = matches!(orientation, 5..=8);
    let (ow, oh) = if transposed { (h, w) } else { (w, h) };
    let src = |x: usize, y: usize| -> (usize, usize) {
        match orientation {
            2 => (w - 1 - x, y),
            3 => (w - 1 - x, h - 1 - y),
            4 => (x, h - 1 - y),
            5 => (y, x),
            6 => (y, h - 1 - x),
            7 => (w - 1 - y, h - 1 - x),
            8 => (w - 1 - y, x),
            _ => (x, y),
        }
    };
    if !(2..=8).contains(&orientation) {
        return Ok(img);
    }
    let mut out = Image::alloc(ow as u32, oh as u32)?;
    for y in 0..oh {
        for x in 0..ow {
            let (sx, sy) = src(x, y);
            let s = (sy * w + sx) * 3;
            let d = (y * ow + x) * 3;
            out.data[d..d + 3].copy_from_slice(&img.data[s..s + 3]);
        }
    }
    Ok(out)
}

// ---- resize ----

#[derive(Deserialize, Clone, Copy, PartialEq, Debug)]
#[serde(rename_all = "snake_case")]
pub enum ResizeMode {
    /// Exactly width x height, ignoring the aspect ratio.
    Stretch,
    /// Fit inside width x height keeping the aspect ratio, centred, padded with `pad`.
    Letterbox,
    /// Scale the shorter side to `shorter`, then cut the centre width x height.
    ShorterSideCrop,
    /// Scale up so the shorter side is at least `min_side` and down so the longer side is
    /// at most `max_side` (either may be left out; no scaling up without `min_side`), then
    /// round each side to a multiple of `multiple` (halves to even, as Python's round does,
    /// so PaddleOCR's detector sees the sizes it was tuned with).
    FitMultiple,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResizeParams {
    mode: ResizeMode,
    #[serde(default)]
    width: u32,
    #[serde(default)]
    height: u32,
    #[serde(default)]
    shorter: Option<u32>,
    #[serde(default)]
    pad: u8,
    #[serde(default = "default_multiple")]
    multiple: u32,
    #[serde(default)]
    max_side: Option<u32>,
    #[serde(default)]
    min_side: Option<u32>,
    #[serde(default)]
    engine: Engine,
    #[serde(default)]
    interpolation: Interpolation,
}

fn default_multiple() -> u32 {
    32
}

struct Resize {
    p: ResizeParams,
    kernel: Kernel,
}

pub(crate) fn build_resize(ctx: &BuildContext) -> Result<Box<dyn Op>, String> {
    let p: ResizeParams = ctx.params()?;
    match p.mode {
        ResizeMode::FitMultiple
            if p.multiple == 0
                || (p.max_side.is_none() && p.min_side.is_none())
                || p.max_side.is_some_and(|m| m < p.multiple) =>
        {
            return Err("bad params: fit_multiple needs multiple > 0 and max_side >= multiple and/or min_side".into());
        }
        ResizeMode::FitMultiple => {}
        _ if p.width == 0 || p.height == 0 => return Err("bad params: width and height must be > 0".into()),
        ResizeMode::ShorterSideCrop if p.shorter.is_some_and(|s| s < p.width.min(p.height)) => {
            return Err("bad params: shorter must be at least the crop's smaller side".into())
        }
        _ => {}
    }
    let kernel = Kernel::new(p.engine, p.interpolation)?;
    Ok(Box::new(Resize { p, kernel }))
}

thread_local! {
    // A resizer keeps scratch buffers: one per thread saves reallocating them per image.
    static RESIZER: RefCell<Resizer> = RefCell::new(Resizer::new());
}

fn bilinear() -> ResizeOptions {
    ResizeOptions::new().resize_alg(ResizeAlg::Interpolation(FilterType::Bilinear))
}

/// Resizes the whole of `src` into a fresh `w` x `h` image.
pub fn resize_to(src: &Image, w: u32, h: u32) -> Result<Image, OpError> {
    if (src.width, src.height) == (w, h) {
        // A resize makes a new frame: like every other size, it is its own picture.
        return Ok(src.clone().with_source_size(w, h));
    }
    let s = TypedImageRef::<U8x3>::from_buffer(src.width, src.height, &src.data).map_err(internal)?;
    let mut out = Image::alloc(w, h)?;
    let mut d = TypedImage::<U8x3>::from_buffer(w, h, &mut out.data).map_err(internal)?;
    RESIZER.with_borrow_mut(|r| r.resize_typed(&s, &mut d, &bilinear())).map_err(internal)?;
    Ok(out)
}

/// Resizes the region (left, top, w, h) of `src` into a fresh `ow` x `oh` image.
pub fn crop_resize(src: &Image, region: (u32, u32, u32, u32), ow: u32, oh: u32) -> Result<Image, OpError> {
    let s = TypedImageRef::<U8x3>::from_buffer(src.width, src.height, &src.data).map_err(internal)?;
    let c = TypedCroppedImage::new(s, region.0, region.1, region.2, region.3).map_err(internal)?;
    let mut out = Image::alloc(ow, oh)?;
    let mut d = TypedImage::<U8x3>::from_buffer(ow, oh, &mut out.data).map_err(internal)?;
    RESIZER.with_borrow_mut(|r| r.resize_typed(&c, &mut d, &bilinear())).map_err(internal)?;
    Ok(out)
}

fn internal(e: impl std::fmt::Display) -> OpError {
    OpError::Internal(format!("resize: {e}"))
}

/// Where a letterboxed image lands inside its `dst_w` x `dst_h` canvas: the scale and the
/// placed rectangle (left, top, width, height). Detection post-processing inverts it.
pub fn letterbox_geometry(src_w: u32, src_h: u32, dst_w: u32, dst_h: u32) -> (f32, u32, u32, u32, u32) {
    let scale = (dst_w as f32 / src_w as f32).min(dst_h as f32 / src_h as f32);
    let w = ((src_w as f32 * scale).round() as u32).clamp(1, dst_w);
    let h = ((src_h as f32 * scale).round() as u32).clamp(1, dst_h);
    (scale, (dst_w - w) / 2, (dst_h - h) / 2, w, h)
}

impl Resize {
    fn apply(&self, src: &Image) -> Result<Image, OpError> {
        let p = &self.p;
        match p.mode {
            ResizeMode::Stretch => self.kernel.resize_to(src, p.width, p.height),
            ResizeMode::Letterbox => {
                let (_, left, top, w, h) = letterbox_geometry(src.width, src.height, p.width, p.height);
                let mut out = Image::alloc(p.width, p.height)?;
                out.data.fill(p.pad);
                self.kernel.resize_into(src, (0, 0, src.width, src.height), &mut out, (left, top, w, h))?;
                Ok(out)
            }
            ResizeMode::ShorterSideCrop => {
                let shorter = p.shorter.unwrap_or(p.width.max(p.height)) as f32;
                let scale = shorter / src.width.min(src.height) as f32;
                // In f64: a 1-pixel-high image scaled to 256 must not round or saturate
                // into a size the per-image cap then misjudges.
                let side = |v: u32, min: u32| ((v as f64 * scale as f64).round().min(u32::MAX as f64) as u32).max(min);
                let (rw, rh) = (side(src.width, p.width), side(src.height, p.height));
                crate::memory::image_bytes(rw as u64, rh as u64).map_err(|e| match e {
                    OpError::TooLarge(m) => OpError::TooLarge(format!(
                        "shorter_side_crop would first resize {}x{} to {rw}x{rh}: {m}",
                        src.width, src.height
                    )),
                    e => e,
                })?;
                let resized = self.kernel.resize_to(src, rw, rh)?;
                crop_copy(&resized, (rw - p.width) / 2, (rh - p.height) / 2, p.width, p.height)
            }
            ResizeMode::FitMultiple => {
                let (w, h) = fit_multiple(src.width, src.height, p.min_side, p.max_side, p.multiple);
                self.kernel.resize_to(src, w, h)
            }
        }
    }
}

impl Op for Resize {
    fn inputs(&self) -> Vec<Port> {
        vec![port("image", ValueType::image())]
    }
    fn outputs(&self) -> Vec<Port> {
        let size = (self.p.mode != ResizeMode::FitMultiple).then_some((self.p.width, self.p.height));
        vec![port("image", ValueType::Image { size })]
    }
    fn run(&self, inputs: &[Value]) -> OpResult {
        Ok(vec![Value::Image(Arc::new(self.apply(image_in(inputs, 0)?)?))])
    }
}

/// The size `fit_multiple` resizes a `w` x `h` image to.
pub fn fit_multiple(w: u32, h: u32, min_side: Option<u32>, max_side: Option<u32>, multiple: u32) -> (u32, u32) {
    let mut scale = 1.0f64;
    if let Some(min) = min_side {
        if w.min(h) < min {
            scale = min as f64 / w.min(h) as f64;
        }
    }
    if let Some(max) = max_side {
        if w.max(h) as f64 * scale > max as f64 {
            scale = max as f64 / w.max(h) as f64;
        }
    }
    let m = multiple as f64;
    let side = |v: u32| (((v as f64 * scale).floor() / m).round_ties_even() * m).max(m) as u32;
    (side(w), side(h))
}

/// Copies the rectangle (left, top, w, h) out of `src`.
pub fn crop_copy(src: &Image, left: u32, top: u32, w: u32, h: u32) -> Result<Image, OpError> {
    let row = src.width as usize * 3;
    let mut out = Image::alloc(w, h)?;
    for (y, dst) in (top..top + h).zip(out.data.chunks_exact_mut(w as usize * 3)) {
        let start = y as usize * row + left as usize * 3;
        dst.copy_from_slice(&src.data[start..start + w as usize * 3]);
    }
    Ok(out)
}

// ---- normalize / to_tensor ----

#[derive(Deserialize, Clone, Copy, PartialEq)]
#[serde(rename_all = "lowercase")]
enum Layout {
    Nchw,
    Nhwc,
}

#[derive(Deserialize, Clone, Copy, PartialEq)]
#[serde(rename_all = "lowercase")]
enum ChannelOrder {
    Rgb,
    Bgr,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NormalizeParams {
    #[serde(default = "default_scale")]
    scale: f32,
    #[serde(default)]
    mean: [f32; 3],
    #[serde(default = "ones")]
    std: [f32; 3],
    #[serde(default = "nchw")]
    layout: Layout,
    #[serde(default = "rgb")]
    channel_order: ChannelOrder,
}

fn default_scale() -> f32 {
    1.0 / 255.0
}
fn ones() -> [f32; 3] {
    [1.0; 3]
}
fn nchw() -> Layout {
    Layout::Nchw
}
fn rgb() -> ChannelOrder {
    ChannelOrder::Rgb
}

/// `(pixel * scale - mean) / std` per channel, as FP32 in CHW (or HWC) order.
struct Normalize {
    p: NormalizeParams,
}

pub(crate) fn build_normalize(ctx: &BuildContext) -> Result<Box<dyn Op>, String> {
    let p: NormalizeParams = ctx.params()?;
    if p.std.contains(&0.0) {
        return Err("bad params: std must not contain 0".into());
    }
    Ok(Box::new(Normalize { p }))
}

impl Normalize {
    fn dims(&self, size: Option<(u32, u32)>) -> Vec<i64> {
        let (w, h) = size.map_or((-1, -1), |(w, h)| (w as i64, h as i64));
        match self.p.layout {
            Layout::Nchw => vec![3, h, w],
            Layout::Nhwc => vec![h, w, 3],
        }
    }
}

impl Op for Normalize {
    fn inputs(&self) -> Vec<Port> {
        vec![port("image", ValueType::image())]
    }
    fn outputs(&self) -> Vec<Port> {
        vec![port("tensor", ValueType::tensor(DataType::F32, self.dims(None)))]
    }
    fn infer(&mut self, inputs: &[ValueType]) -> Result<Vec<ValueType>, String> {
        let size = match &inputs[0] {
            ValueType::Image { size } => *size,
            _ => None,
        };
        Ok(vec![ValueType::tensor(DataType::F32, self.dims(size))])
    }
    fn run(&self, inputs: &[Value]) -> OpResult {
        let img = image_in(inputs, 0)?;
        let p = &self.p;
        let (w, h) = (img.width as usize, img.height as usize);
        let plane = w * h;
        // Folded into one multiply-add per value: (x * scale - mean) / std.
        let src_ch: [usize; 3] = if p.channel_order == ChannelOrder::Rgb { [0, 1, 2] } else { [2, 1, 0] };
        let mul: [f32; 3] = std::array::from_fn(|c| p.scale / p.std[c]);
        let add: [f32; 3] = std::array::from_fn(|c| -p.mean[c] / p.std[c]);
        // Filled by appending (no zeroing pass) and handed to the tensor without a copy.
        let mut out: Vec<f32> = Vec::new();
        out.try_reserve_exact(plane * 3).map_err(|_| {
            OpError::Busy(format!("cannot allocate {} MiB for a tensor; retry later", (plane * 12) >> 20))
        })?;
        match p.layout {
            Layout::Nchw => {
                for c in 0..3 {
                    let s = src_ch[c];
                    out.extend(img.data.chunks_exact(3).map(|px| px[s] as f32 * mul[c] + add[c]));
                }
            }
            Layout::Nhwc => {
                for px in img.data.chunks_exact(3) {
                    out.extend(std::array::from_fn::<f32, 3, _>(|c| px[src_ch[c]] as f32 * mul[c] + add[c]));
                }
            }
        }
        let shape = self.dims(Some((img.width, img.height))).iter().map(|&d| d as usize).collect();
        Ok(vec![Value::Tensor(Tensor::from_f32_vec(shape, out))])
    }
}

struct ToTensor;

pub(crate) fn build_to_tensor(ctx: &BuildContext) -> Result<Box<dyn Op>, String> {
    ctx.params::<NoParams>()?;
    Ok(Box::new(ToTensor))
}

impl Op for ToTensor {
    fn inputs(&self) -> Vec<Port> {
        vec![port("image", ValueType::image())]
    }
    fn outputs(&self) -> Vec<Port> {
        vec![port("tensor", ValueType::tensor(DataType::U8, vec![-1, -1, 3]))]
    }
    fn infer(&mut self, inputs: &[ValueType]) -> Result<Vec<ValueType>, String> {
        let (w, h) = match &inputs[0] {
            ValueType::Image { size: Some((w, h)) } => (*w as i64, *h as i64),
            _ => (-1, -1),
        };
        Ok(vec![ValueType::tensor(DataType::U8, vec![h, w, 3])])
    }
    fn run(&self, inputs: &[Value]) -> OpResult {
        let img = image_in(inputs, 0)?;
        let shape = vec![img.height as usize, img.width as usize, 3];
        Ok(vec![Value::Tensor(Tensor { dtype: DataType::U8, shape, data: img.data.clone().into() })])
    }
}

// ---- rotate / crop ----

struct Rotate180;

pub(crate) fn build_rotate180(ctx: &BuildContext) -> Result<Box<dyn Op>, String> {
    ctx.params::<NoParams>()?;
    Ok(Box::new(Rotate180))
}

impl Op for Rotate180 {
    fn inputs(&self) -> Vec<Port> {
        vec![port("image", ValueType::image())]
    }
    fn outputs(&self) -> Vec<Port> {
        vec![port("image", ValueType::image())]
    }
    fn infer(&mut self, inputs: &[ValueType]) -> Result<Vec<ValueType>, String> {
        Ok(vec![inputs[0].clone()])
    }
    fn run(&self, inputs: &[Value]) -> OpResult {
        Ok(vec![Value::Image(Arc::new(rotate_180(image_in(inputs, 0)?)?))])
    }
}

/// The image turned upside down: its pixels in reverse order (the same picture size).
pub fn rotate_180(img: &Image) -> Result<Image, OpError> {
    let mut out = Image::alloc(img.width, img.height)?;
    for (d, s) in out.data.chunks_exact_mut(3).zip(img.data.chunks_exact(3).rev()) {
        d.copy_from_slice(s);
    }
    let (sw, sh) = img.source_size();
    Ok(out.with_source_size(sw, sh))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CropParams {
    /// Resize every crop to this size (width, height); none: keep each crop's own size.
    #[serde(default)]
    resize: Option<[u32; 2]>,
    #[serde(default)]
    engine: Engine,
    #[serde(default)]
    interpolation: Interpolation,
}

/// One crop per box (x1, y1, x2, y2 in the picture's pixels), clamped to the image: a
/// fan-out.
struct CropBoxes {
    resize: Option<[u32; 2]>,
    kernel: Kernel,
}

pub(crate) fn build_crop_boxes(ctx: &BuildContext) -> Result<Box<dyn Op>, String> {
    let p: CropParams = ctx.params()?;
    if p.resize.is_some_and(|[w, h]| w == 0 || h == 0) {
        return Err("bad params: resize sizes must be > 0".into());
    }
    Ok(Box::new(CropBoxes { resize: p.resize, kernel: Kernel::new(p.engine, p.interpolation)? }))
}

impl Op for CropBoxes {
    fn inputs(&self) -> Vec<Port> {
        vec![port("image", ValueType::image()), port("boxes", ValueType::tensor(DataType::F32, vec![-1, 4]))]
    }
    fn outputs(&self) -> Vec<Port> {
        let size = self.resize.map(|[w, h]| (w, h));
        vec![port("crops", ValueType::List(Box::new(ValueType::Image { size })))]
    }
    fn run(&self, inputs: &[Value]) -> OpResult {
        let img = image_in(inputs, 0)?;
        let boxes = input(inputs, 1, "a tensor", Value::as_tensor)?;
        let coords = boxes.to_f32().filter(|_| boxes.shape.len() == 2 && boxes.shape[1] == 4).ok_or_else(|| {
            OpError::Invalid(format!("boxes must be FP32 [n,4], got {} {:?}", boxes.dtype, boxes.shape))
        })?;
        // Boxes are in the picture's frame: a reduced decode is cropped where they fall.
        let (sx, sy) = img.source_scale();
        let crops = coords
            .chunks_exact(4)
            .map(|b| {
                let (left, top, w, h) = clamp_box(&[b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy], img.width, img.height);
                let crop = match self.resize {
                    Some([rw, rh]) => self.kernel.crop_resize(img, (left, top, w, h), rw, rh)?,
                    None => crop_copy(img, left, top, w, h)?,
                };
                Ok(Value::Image(Arc::new(crop)))
            })
            .collect::<Result<Vec<_>, OpError>>()?;
        Ok(vec![Value::List(Arc::new(crops))])
    }
}

/// A box (x1, y1, x2, y2) as whole pixels inside the image, at least 1x1.
fn clamp_box(b: &[f32], width: u32, height: u32) -> (u32, u32, u32, u32) {
    let clamp = |v: f32, max: u32| (v.max(0.0) as u32).min(max - 1);
    let (x1, y1) = (clamp(b[0].floor(), width), clamp(b[1].floor(), height));
    let (x2, y2) = (clamp(b[2].ceil(), width + 1), clamp(b[3].ceil(), height + 1));
    (x1, y1, x2.saturating_sub(x1).max(1), y2.saturating_sub(y1).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: u32, h: u32) -> Image {
        let data = (0..h).flat_map(|y| (0..w).flat_map(move |x| [(x * 10) as u8, (y * 10) as u8, 7])).collect();
        Image::new(w, h, data)
    }

    #[test]
    fn exif_orientations_turn_the_image_upright() {
        // 2x1 image: red, green. Orientation 6 means "rotate 90 clockwise to view".
        let img = Image::new(2, 1, vec![255, 0, 0, 0, 255, 0]);
        let r = orient(img.clone(), 6).unwrap();
        assert_eq!((r.width, r.height), (1, 2));
        assert_eq!(r.pixel(0, 0), [255, 0, 0]);
        let r = orient(img.clone(), 3).unwrap();
        assert_eq!(r.pixel(0, 0), [0, 255, 0]);
        let r = orient(img.clone(), 8).unwrap();
        assert_eq!(r.pixel(0, 0), [0, 255, 0]);
        assert_eq!(orient(img.clone(), 1).unwrap(), img);
    }

    #[test]
    fn exif_orientation_tag_is_read_in_both_byte_orders() {
        let mut le = b"Exif\0\0II*\0\x08\0\0\0\x01\0".to_vec();
        le.extend_from_slice(&[0x12, 0x01, 3, 0, 1, 0, 0, 0, 6, 0, 0, 0]);
        assert_eq!(exif_orientation(&le), Some(6));
        let mut be = b"MM\0*\0\0\0\x08\0\x01".to_vec();
        be.extend_from_slice(&[0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, 8, 0, 0]);
        assert_eq!(exif_orientation(&be), Some(8));
        assert_eq!(exif_orientation(b"junk"), None);
    }

    #[test]
    fn corrupt_and_unknown_data_are_invalid_input() {
        let e = decode_image(b"GIF89a....", 1 << 20).unwrap_err();
        assert!(matches!(&e, OpError::Invalid(m) if m.contains("not a JPEG or PNG")), "{e}");
        let e = decode_image(&[0xFF, 0xD8, 0xFF, 0xE0, 0, 0], 1 << 20).unwrap_err();
        assert!(matches!(&e, OpError::Invalid(m) if m.contains("cannot decode JPEG")), "{e}");
    }

    #[test]
    fn letterbox_keeps_the_aspect_ratio_and_pads() {
        let op = Resize {
            p: ResizeParams {
                mode: ResizeMode::Letterbox,
                width: 8,
                height: 8,
                shorter: None,
                pad: 114,
                multiple: 32,
                max_side: None,
                min_side: None,
                engine: Engine::Rust,
                interpolation: Interpolation::Linear,
            },
            kernel: Kernel::default(),
        };
        let out = op.apply(&Image::filled(16, 8, [200, 100, 50])).unwrap();
        assert_eq!((out.width, out.height), (8, 8));
        assert_eq!(letterbox_geometry(16, 8, 8, 8), (0.5, 0, 2, 8, 4));
        assert_eq!(out.pixel(0, 0), [114; 3], "padding above");
        assert_eq!(out.pixel(3, 3), [200, 100, 50], "the image, centred");
        assert_eq!(out.pixel(7, 7), [114; 3], "padding below");
    }

    #[test]
    fn shorter_side_crop_takes_the_centre() {
        let op = Resize {
            p: ResizeParams {
                mode: ResizeMode::ShorterSideCrop,
                width: 4,
                height: 4,
                shorter: Some(4),
                pad: 0,
                multiple: 32,
                max_side: None,
                min_side: None,
                engine: Engine::Rust,
                interpolation: Interpolation::Linear,
            },
            kernel: Kernel::default(),
        };
        let src = gradient(8, 4);
        let out = op.apply(&src).unwrap();
        assert_eq!((out.width, out.height), (4, 4));
        assert_eq!(out.pixel(0, 0), src.pixel(2, 0), "columns 2..6 of the unscaled source");
    }

    #[test]
    fn fit_multiple_rounds_each_side() {
        let p = ResizeParams {
            mode: ResizeMode::FitMultiple,
            width: 0,
            height: 0,
            shorter: None,
            pad: 0,
            multiple: 32,
            max_side: Some(960),
            min_side: None,
            engine: Engine::Rust,
            interpolation: Interpolation::Linear,
        };
        assert_eq!(fit_multiple(640, 480, Some(736), None, 32), (992, 736), "PaddleOCR's limit_type min, 736");
        assert_eq!(fit_multiple(48, 100, Some(736), Some(2000), 32), (736, 1536));
        let out = Resize { p, kernel: Kernel::default() }.apply(&gradient(100, 50)).unwrap();
        assert_eq!((out.width, out.height), (96, 64));
    }

    #[test]
    fn normalize_orders_channels_and_applies_mean_and_std() {
        let img = Arc::new(Image::new(2, 1, vec![255, 0, 51, 0, 255, 102]));
        let mut op = Normalize {
            p: NormalizeParams {
                scale: 1.0 / 255.0,
                mean: [0.5, 0.0, 0.0],
                std: [0.5, 1.0, 1.0],
                layout: Layout::Nchw,
                channel_order: ChannelOrder::Bgr,
            },
        };
        let out = op.run(&[Value::Image(img.clone())]).unwrap();
        let t = out[0].as_tensor().unwrap();
        assert_eq!(t.shape, vec![3, 1, 2]);
        let v = t.to_f32().unwrap();
        // Channel 0 is blue: (0.2 - 0.5) / 0.5 = -0.6 and (0.4 - 0.5) / 0.5 = -0.2.
        let want = [-0.6, -0.2, 0.0, 1.0, 1.0, 0.0];
        assert!(v.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6), "{v:?}");
        op.p.layout = Layout::Nhwc;
        op.p.channel_order = ChannelOrder::Rgb;
        let t = op.run(&[Value::Image(img)]).unwrap()[0].as_tensor().unwrap().clone();
        assert_eq!(t.shape, vec![1, 2, 3]);
        assert!((t.to_f32().unwrap()[0] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn crops_are_clamped_to_the_image() {
        let img = Arc::new(gradient(10, 10));
        let op = CropBoxes { resize: None, kernel: Kernel::default() };
        let boxes = Tensor::from_f32(vec![3, 4], &[2.0, 3.0, 5.0, 7.0, -5.0, -5.0, 100.0, 100.0, 4.0, 4.0, 4.0, 4.0]);
        let out = op.run(&[Value::Image(img.clone()), Value::Tensor(boxes)]).unwrap();
        let crops = out[0].as_list().unwrap();
        let sizes: Vec<(u32, u32)> = crops.iter().map(|c| c.as_image().map(|i| (i.width, i.height)).unwrap()).collect();
        assert_eq!(sizes, vec![(3, 4), (10, 10), (1, 1)]);
        assert_eq!(crops[0].as_image().unwrap().pixel(0, 0), img.pixel(2, 3));
        let empty = Tensor::from_f32(vec![0, 4], &[]);
        let out = op.run(&[Value::Image(img), Value::Tensor(empty)]).unwrap();
        assert!(out[0].as_list().unwrap().is_empty());
    }

    #[test]
    fn rotate180_reverses_pixels() {
        let img = Arc::new(Image::new(2, 1, vec![1, 2, 3, 4, 5, 6]));
        let out = Rotate180.run(&[Value::Image(img)]).unwrap();
        assert_eq!(out[0].as_image().unwrap().data, vec![4, 5, 6, 1, 2, 3]);
    }
}

// ---- perspective crops of quadrilaterals (rotated text boxes) ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QuadParams {
    /// Turn crops at least this many times taller than wide by 90 degrees (vertical text);
    /// 0: never.
    #[serde(default)]
    rotate_tall_ratio: f32,
    #[serde(default)]
    engine: Engine,
    #[serde(default)]
    interpolation: Interpolation,
}

/// One upright crop per quadrilateral (x,y of its 4 corners, clockwise from the top left,
/// as [n,4,2] or [n,8]): the quad is warped onto a rectangle as wide as its longer
/// top/bottom edge and as tall as its longer left/right edge, with bilinear sampling and
/// edge pixels replicated outside the image (OpenCV's warpPerspective with
/// BORDER_REPLICATE, which text recognisers are trained on). A fan-out.
struct CropQuads {
    rotate_tall_ratio: f32,
    kernel: Kernel,
}

pub(crate) fn build_crop_quads(ctx: &BuildContext) -> Result<Box<dyn Op>, String> {
    let p: QuadParams = ctx.params()?;
    if p.interpolation == Interpolation::Area {
        return Err("bad params: interpolation: area is for shrinking; a warp takes linear, cubic or nearest".into());
    }
    Ok(Box::new(CropQuads { rotate_tall_ratio: p.rotate_tall_ratio, kernel: Kernel::new(p.engine, p.interpolation)? }))
}

impl Op for CropQuads {
    fn inputs(&self) -> Vec<Port> {
        vec![port("image", ValueType::image()), port("quads", ValueType::tensor_of(DataType::F32))]
    }
    fn outputs(&self) -> Vec<Port> {
        vec![port("crops", ValueType::List(Box::new(ValueType::image())))]
    }
    fn run(&self, inputs: &[Value]) -> OpResult {
        let img = image_in(inputs, 0)?;
        let quads = input(inputs, 1, "a tensor", Value::as_tensor)?;
        let ok_shape = matches!(quads.shape.as_slice(), [_, 4, 2] | [_, 8]);
        let v = quads.to_f32().filter(|_| ok_shape).ok_or_else(|| {
            OpError::Invalid(format!("quads must be FP32 [n,4,2] or [n,8], got {} {:?}", quads.dtype, quads.shape))
        })?;
        // Quads are in the picture's frame: a reduced decode is cut where they fall.
        let (sx, sy) = img.source_scale();
        let crops = v
            .chunks_exact(8)
            .map(|q| {
                let pts: [(f32, f32); 4] = std::array::from_fn(|i| (q[2 * i] * sx, q[2 * i + 1] * sy));
                let crop = self.kernel.warp_quad(img, pts)?;
                let tall =
                    self.rotate_tall_ratio > 0.0 && crop.height as f32 >= crop.width as f32 * self.rotate_tall_ratio;
                Ok(Value::Image(Arc::new(if tall { rotate90_ccw(&crop)? } else { crop })))
            })
            .collect::<Result<Vec<_>, OpError>>()?;
        Ok(vec![Value::List(Arc::new(crops))])
    }
}

fn dist(a: (f32, f32), b: (f32, f32)) -> f32 {
    ((a.0 - b.0).powi(2) + (a.1 - b.1).powi(2)).sqrt()
}

/// The upright size of a quad's crop: its longer top/bottom edge by its longer
/// left/right edge.
fn quad_size(q: [(f32, f32); 4]) -> Result<(u32, u32), OpError> {
    if !q.iter().all(|p| p.0.is_finite() && p.1.is_finite()) {
        return Err(OpError::Invalid(format!("quad {q:?} is not a usable box")));
    }
    let w = dist(q[0], q[1]).max(dist(q[3], q[2])).round().max(1.0);
    let h = dist(q[0], q[3]).max(dist(q[1], q[2])).round().max(1.0);
    // Pixels are checked by the allocation; the sides must fit its u32s first.
    if w > u32::MAX as f32 || h > u32::MAX as f32 {
        return Err(OpError::TooLarge(format!("quad {q:?} spans {w}x{h} pixels")));
    }
    Ok((w as u32, h as u32))
}

/// Warps the quad (top-left, top-right, bottom-right, bottom-left) onto an upright image.
pub fn warp_quad(img: &Image, q: [(f32, f32); 4]) -> Result<Image, OpError> {
    let (w, h) = quad_size(q)?;
    let dst = [(0.0, 0.0), (w as f32, 0.0), (w as f32, h as f32), (0.0, h as f32)];
    let m = homography(dst, q).ok_or_else(|| OpError::Invalid(format!("quad {q:?} is degenerate")))?;
    let (iw, ih) = (img.width as i64, img.height as i64);
    let px = |x: i64, y: i64| {
        let i = (y.clamp(0, ih - 1) * iw + x.clamp(0, iw - 1)) as usize * 3;
        [img.data[i] as f32, img.data[i + 1] as f32, img.data[i + 2] as f32]
    };
    let mut img_out = Image::alloc(w, h)?;
    let mut out = img_out.data.iter_mut();
    for y in 0..h {
        for x in 0..w {
            let (xf, yf) = (x as f64, y as f64);
            let d = m[6] * xf + m[7] * yf + 1.0;
            let u = ((m[0] * xf + m[1] * yf + m[2]) / d) as f32;
            let v = ((m[3] * xf + m[4] * yf + m[5]) / d) as f32;
            let (x0, y0) = (u.floor(), v.floor());
            let (fx, fy) = (u - x0, v - y0);
            let (x0, y0) = (x0 as i64, y0 as i64);
            let (a, b, c, e) = (px(x0, y0), px(x0 + 1, y0), px(x0, y0 + 1), px(x0 + 1, y0 + 1));
            for ch in 0..3 {
                let top = a[ch] + (b[ch] - a[ch]) * fx;
                let bottom = c[ch] + (e[ch] - c[ch]) * fx;
                if let Some(o) = out.next() {
                    *o = (top + (bottom - top) * fy).round().clamp(0.0, 255.0) as u8;
                }
            }
        }
    }
    Ok(img_out)
}

/// The 3x3 perspective transform (row-major, last element 1) taking each `from` point to
/// its `to` point, by solving the 8x8 linear system with partial pivoting.
fn homography(from: [(f32, f32); 4], to: [(f32, f32); 4]) -> Option<[f64; 8]> {
    let mut a = [[0f64; 9]; 8];
    for i in 0..4 {
        let (x, y) = (from[i].0 as f64, from[i].1 as f64);
        let (u, v) = (to[i].0 as f64, to[i].1 as f64);
        a[2 * i] = [x, y, 1.0, 0.0, 0.0, 0.0, -x * u, -y * u, u];
        a[2 * i + 1] = [0.0, 0.0, 0.0, x, y, 1.0, -x * v, -y * v, v];
    }
    for col in 0..8 {
        let pivot = (col..8).max_by(|&r, &s| a[r][col].abs().total_cmp(&a[s][col].abs()))?;
        if a[pivot][col].abs() < 1e-9 {
            return None;
        }
        a.swap(col, pivot);
        for r in 0..8 {
            if r != col {
                let f = a[r][col] / a[col][col];
                let pivot_row = a[col];
                for (x, p) in a[r][col..].iter_mut().zip(&pivot_row[col..]) {
                    *x -= f * p;
                }
            }
        }
    }
    Some(std::array::from_fn(|i| a[i][8] / a[i][i]))
}

/// Turns the image 90 degrees counter-clockwise.
fn rotate90_ccw(img: &Image) -> Result<Image, OpError> {
    let (w, h) = (img.width as usize, img.height as usize);
    let mut out = Image::alloc(h as u32, w as u32)?;
    let mut dst = out.data.chunks_exact_mut(3);
    for y in 0..w {
        for x in 0..h {
            // Output (x, y) of a w-high, h-wide image comes from input (w - 1 - y, x).
            let i = (x * w + (w - 1 - y)) * 3;
            if let Some(d) = dst.next() {
                d.copy_from_slice(&img.data[i..i + 3]);
            }
        }
    }
    Ok(out)
}

struct FromTensor;

pub(crate) fn build_from_tensor(ctx: &BuildContext) -> Result<Box<dyn Op>, String> {
    ctx.params::<NoParams>()?;
    Ok(Box::new(FromTensor))
}

/// A UINT8 [H,W,3] tensor as an image (the inverse of to_tensor).
impl Op for FromTensor {
    fn inputs(&self) -> Vec<Port> {
        vec![port("tensor", ValueType::tensor(DataType::U8, vec![-1, -1, 3]))]
    }
    fn outputs(&self) -> Vec<Port> {
        vec![port("image", ValueType::image())]
    }
    fn run(&self, inputs: &[Value]) -> OpResult {
        let t = input(inputs, 0, "a tensor", Value::as_tensor)?;
        match (t.dtype, t.shape.as_slice()) {
            (DataType::U8, &[h, w, 3]) if h > 0 && w > 0 && h <= u32::MAX as usize && w <= u32::MAX as usize => {
                let mut img = Image::alloc(w as u32, h as u32)?;
                img.data.copy_from_slice(&t.data);
                Ok(vec![Value::Image(Arc::new(img))])
            }
            _ => Err(OpError::Invalid(format!("expected UINT8 [H,W,3], got {} {:?}", t.dtype, t.shape))),
        }
    }
}

#[cfg(test)]
mod quad_tests {
    use super::*;

    #[test]
    fn an_axis_aligned_quad_is_a_plain_crop() {
        let data = (0..8u32 * 6).flat_map(|i| [(i * 5) as u8, (i * 3) as u8, 9]).collect();
        let img = Image::new(8, 6, data);
        let crop = warp_quad(&img, [(2.0, 1.0), (6.0, 1.0), (6.0, 4.0), (2.0, 4.0)]).unwrap();
        assert_eq!((crop.width, crop.height), (4, 3));
        assert_eq!(crop, crop_copy(&img, 2, 1, 4, 3).unwrap());
    }

    #[test]
    fn tall_crops_are_turned_and_degenerate_quads_refused() {
        let img = Image::new(2, 1, vec![1, 1, 1, 2, 2, 2]);
        let r = rotate90_ccw(&img).unwrap();
        assert_eq!((r.width, r.height), (1, 2));
        assert_eq!(r.data, vec![2, 2, 2, 1, 1, 1], "the right pixel ends on top");
        assert!(warp_quad(&img, [(0.0, 0.0); 4]).is_err());
    }
}
