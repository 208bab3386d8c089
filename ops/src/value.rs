//! What flows along a pipeline's edges, and the static types a pipeline is checked with.

use crate::memory::Charge;
use crate::tensor::{DataType, Tensor};
use bytes::Bytes;
use std::fmt;
use std::sync::Arc;

/// A decoded image: 8-bit RGB, rows top to bottom, pixels interleaved (HWC). Its bytes
/// are counted in the image memory budget ([`crate::memory`]) for as long as it lives.
#[derive(Clone)]
pub struct Image {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
    /// The picture's full size when this image shows it smaller (a reduced decode).
    source: Option<(u32, u32)>,
    charge: Charge,
}

impl PartialEq for Image {
    fn eq(&self, other: &Image) -> bool {
        (self.width, self.height, self.source_size()) == (other.width, other.height, other.source_size())
            && self.data == other.data
    }
}
impl Eq for Image {}

impl fmt::Debug for Image {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.source {
            Some((w, h)) => write!(f, "Image({}x{} of {w}x{h})", self.width, self.height),
            None => write!(f, "Image({}x{})", self.width, self.height),
        }
    }
}

/// Large pixel buffers kept for reuse. A fresh multi-megabyte allocation is fresh pages
/// from the kernel, and faulting them in costs more than decoding into them (15+ ms for
/// a 4000x3000 image); buffers of dropped images are kept here and handed to the next
/// decode of a similar size. Bounded in count and bytes: idle memory, not in the budget.
static SPARE_BUFFERS: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());
/// Smaller buffers come from the allocator's own free lists cheaply.
const REUSE_MIN_BYTES: usize = 1 << 20;
const SPARE_MAX: usize = 8;
/// At most this many bytes of spare buffers (a 4032x3024 photo is 37 MB).
pub const SPARE_MAX_BYTES: usize = 128 << 20;

/// A zeroed buffer of `len` bytes, reusing a spare one when there is one big enough.
fn pixel_buffer(len: usize) -> Result<Vec<u8>, crate::OpError> {
    if len >= REUSE_MIN_BYTES {
        let mut spare = SPARE_BUFFERS.lock().unwrap_or_else(|e| e.into_inner());
        // The smallest spare that fits, so big buffers stay for big images.
        let best = spare.iter().enumerate().filter(|(_, b)| b.capacity() >= len).min_by_key(|(_, b)| b.capacity());
        if let Some((i, _)) = best {
            let mut buf = spare.swap_remove(i);
            drop(spare);
            buf.clear();
            buf.resize(len, 0);
            return Ok(buf);
        }
    }
    crate::memory::try_zeroed(len)
}

/// Bytes held by spare buffers now.
pub fn spare_bytes() -> usize {
    SPARE_BUFFERS.lock().unwrap_or_else(|e| e.into_inner()).iter().map(Vec::capacity).sum()
}

impl Drop for Image {
    fn drop(&mut self) {
        let cap = self.data.capacity();
        if cap >= REUSE_MIN_BYTES {
            let mut spare = SPARE_BUFFERS.lock().unwrap_or_else(|e| e.into_inner());
            let held: usize = spare.iter().map(Vec::capacity).sum();
            if spare.len() < SPARE_MAX && held + cap <= SPARE_MAX_BYTES {
                spare.push(std::mem::take(&mut self.data));
            }
        }
    }
}

impl Image {
    /// A black `width` x `height` image, after checking the per-image cap and taking its
    /// bytes from the image budget: over either, an error and nothing allocated.
    pub fn alloc(width: u32, height: u32) -> Result<Image, crate::OpError> {
        let bytes = crate::memory::image_bytes(width as u64, height as u64)?;
        let charge = crate::memory::IMAGES.take(bytes)?;
        Ok(Image { width, height, data: pixel_buffer(bytes)?, source: None, charge })
    }

    /// An image of pixels already in memory (counted, never refused).
    pub fn new(width: u32, height: u32, data: Vec<u8>) -> Image {
        assert_eq!(data.len(), width as usize * height as usize * 3, "RGB buffer size");
        let charge = crate::memory::IMAGES.force(data.len());
        Image { width, height, data, source: None, charge }
    }

    pub fn filled(width: u32, height: u32, rgb: [u8; 3]) -> Image {
        let data = rgb.iter().copied().cycle().take(width as usize * height as usize * 3).collect();
        Image::new(width, height, data)
    }

    /// The size of the picture this image shows, at full resolution: its own size, or the
    /// encoded image's when it was decoded at a reduced scale (`decode_image`'s
    /// `max_side`). Coordinates on an image (detections, crop boxes) are in this frame,
    /// so a reduced decode changes a pipeline's cost, not its answers' units.
    pub fn source_size(&self) -> (u32, u32) {
        self.source.unwrap_or((self.width, self.height))
    }

    /// This image, marked as showing a `width` x `height` picture (at its own size, or
    /// smaller). A size of 0 is ignored: the image is then its own picture.
    pub fn with_source_size(mut self, width: u32, height: u32) -> Image {
        let own = (self.width, self.height);
        self.source = (width > 0 && height > 0 && (width, height) != own).then_some((width, height));
        self
    }

    /// Image pixels per source pixel, across and down (1.0 unless reduced).
    pub fn source_scale(&self) -> (f32, f32) {
        let (sw, sh) = self.source_size();
        (self.width as f32 / sw as f32, self.height as f32 / sh as f32)
    }

    /// The bytes this image holds in the budget.
    pub fn charged(&self) -> usize {
        self.charge.bytes()
    }

    pub fn pixel(&self, x: u32, y: u32) -> [u8; 3] {
        let i = (y as usize * self.width as usize + x as usize) * 3;
        [self.data[i], self.data[i + 1], self.data[i + 2]]
    }
}

/// A value on an edge. Cloning is cheap: buffers are shared, never copied.
#[derive(Clone, Debug)]
pub enum Value {
    Tensor(Tensor),
    /// Encoded bytes, such as a JPEG file.
    Bytes(Bytes),
    Image(Arc<Image>),
    /// The result of a fan-out (one crop per box); the nodes after it run per element.
    List(Arc<Vec<Value>>),
}

impl Value {
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Tensor(_) => "tensor",
            Value::Bytes(_) => "bytes",
            Value::Image(_) => "image",
            Value::List(_) => "list",
        }
    }

    pub fn as_tensor(&self) -> Option<&Tensor> {
        match self {
            Value::Tensor(t) => Some(t),
            _ => None,
        }
    }

    pub fn as_image(&self) -> Option<&Arc<Image>> {
        match self {
            Value::Image(i) => Some(i),
            _ => None,
        }
    }

    pub fn as_list(&self) -> Option<&Arc<Vec<Value>>> {
        match self {
            Value::List(l) => Some(l),
            _ => None,
        }
    }
}

/// The static type of a value, as far as it is known when a pipeline is compiled.
/// `None` parts are unknown (or, in an op's declared input, "any").
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ValueType {
    Any,
    /// `dims` of -1 are variable.
    Tensor {
        dtype: Option<DataType>,
        dims: Option<Vec<i64>>,
    },
    Bytes,
    Image {
        size: Option<(u32, u32)>,
    },
    List(Box<ValueType>),
}

impl ValueType {
    pub fn tensor(dtype: DataType, dims: Vec<i64>) -> ValueType {
        ValueType::Tensor { dtype: Some(dtype), dims: Some(dims) }
    }
    pub fn any_tensor() -> ValueType {
        ValueType::Tensor { dtype: None, dims: None }
    }
    pub fn tensor_of(dtype: DataType) -> ValueType {
        ValueType::Tensor { dtype: Some(dtype), dims: None }
    }
    pub fn image() -> ValueType {
        ValueType::Image { size: None }
    }

    /// Whether a value of type `given` may feed a port declared as `self`. Unknown parts
    /// on either side pass (they are checked again at run time).
    pub fn accepts(&self, given: &ValueType) -> bool {
        match (self, given) {
            (ValueType::Any, _) | (_, ValueType::Any) => true,
            (ValueType::Bytes, ValueType::Bytes) => true,
            (ValueType::Image { size: a }, ValueType::Image { size: b }) => match (a, b) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            },
            (ValueType::List(a), ValueType::List(b)) => a.accepts(b),
            (ValueType::Tensor { dtype: da, dims: sa }, ValueType::Tensor { dtype: db, dims: sb }) => {
                let dtype_ok = match (da, db) {
                    (Some(a), Some(b)) => a == b,
                    _ => true,
                };
                let dims_ok = match (sa, sb) {
                    (Some(a), Some(b)) => {
                        a.len() == b.len() && a.iter().zip(b).all(|(&x, &y)| x < 0 || y < 0 || x == y)
                    }
                    _ => true,
                };
                dtype_ok && dims_ok
            }
            _ => false,
        }
    }
}

impl fmt::Display for ValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ValueType::Any => write!(f, "any"),
            ValueType::Bytes => write!(f, "bytes"),
            ValueType::Image { size: None } => write!(f, "image"),
            ValueType::Image { size: Some((w, h)) } => write!(f, "image {w}x{h}"),
            ValueType::List(t) => write!(f, "list of {t}"),
            ValueType::Tensor { dtype, dims } => {
                write!(f, "tensor {}", dtype.map_or("(any dtype)".to_string(), |d| d.to_string()))?;
                if let Some(d) = dims {
                    write!(f, " {}", crate::tensor::Dims(d))?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_pixel_buffers_are_reused() {
        let img = Image::alloc(5_000_001, 1).unwrap();
        let ptr = img.data.as_ptr();
        drop(img);
        let again = Image::alloc(5_000_000, 1).unwrap();
        assert_eq!(again.data.as_ptr(), ptr, "the dropped image's buffer came back");
        assert!(again.data.iter().all(|&b| b == 0) && again.data.len() == 15_000_000);
        assert!(spare_bytes() <= SPARE_MAX_BYTES);
    }

    #[test]
    fn unknown_parts_pass_and_known_parts_must_agree() {
        let want = ValueType::tensor(DataType::F32, vec![3, 224, 224]);
        assert!(want.accepts(&ValueType::tensor(DataType::F32, vec![3, -1, 224])));
        assert!(want.accepts(&ValueType::any_tensor()));
        assert!(!want.accepts(&ValueType::tensor(DataType::F32, vec![224, 224, 3])));
        assert!(!want.accepts(&ValueType::tensor(DataType::U8, vec![3, 224, 224])));
        assert!(!want.accepts(&ValueType::tensor(DataType::F32, vec![1, 3, 224, 224])), "rank differs");
        assert!(!want.accepts(&ValueType::image()));
        assert!(ValueType::image().accepts(&ValueType::Image { size: Some((4, 4)) }));
        assert_eq!(want.to_string(), "tensor FP32 [3,224,224]");
    }
}
