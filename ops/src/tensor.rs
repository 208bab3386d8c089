//! Tensors as they travel through sluice: a dtype, a shape and a shared little-endian
//! byte buffer. Cloning a tensor or slicing it along the batch dimension never copies.

use bytes::{Bytes, BytesMut};
use std::fmt;

/// Element types, named as in the KServe v2 protocol ("FP32", "BYTES", ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    Bool,
    U8,
    U16,
    U32,
    U64,
    I8,
    I16,
    I32,
    I64,
    F16,
    BF16,
    F32,
    F64,
    /// Variable-length byte strings; on the wire each element is a 4-byte
    /// little-endian length followed by its bytes.
    Bytes,
}

/// A vector of plain values seen as its bytes: lets a `Bytes` own an op's output
/// buffer as it is (`Tensor::from_f32_vec`).
struct PodBytes<T>(Vec<T>);

impl<T: bytemuck::Pod> AsRef<[u8]> for PodBytes<T> {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }
}

impl DataType {
    pub const ALL: [DataType; 14] = [
        DataType::Bool,
        DataType::U8,
        DataType::U16,
        DataType::U32,
        DataType::U64,
        DataType::I8,
        DataType::I16,
        DataType::I32,
        DataType::I64,
        DataType::F16,
        DataType::BF16,
        DataType::F32,
        DataType::F64,
        DataType::Bytes,
    ];

    /// The protocol name, e.g. "FP32".
    pub fn as_str(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::U8 => "UINT8",
            DataType::U16 => "UINT16",
            DataType::U32 => "UINT32",
            DataType::U64 => "UINT64",
            DataType::I8 => "INT8",
            DataType::I16 => "INT16",
            DataType::I32 => "INT32",
            DataType::I64 => "INT64",
            DataType::F16 => "FP16",
            DataType::BF16 => "BF16",
            DataType::F32 => "FP32",
            DataType::F64 => "FP64",
            DataType::Bytes => "BYTES",
        }
    }

    /// Parses a protocol name ("FP32"); `None` for anything else.
    pub fn parse(s: &str) -> Option<DataType> {
        DataType::ALL.into_iter().find(|d| d.as_str() == s)
    }

    /// Bytes per element; `None` for BYTES, whose elements vary in length.
    pub fn size(self) -> Option<usize> {
        Some(match self {
            DataType::Bool | DataType::U8 | DataType::I8 => 1,
            DataType::U16 | DataType::I16 | DataType::F16 | DataType::BF16 => 2,
            DataType::U32 | DataType::I32 | DataType::F32 => 4,
            DataType::U64 | DataType::I64 | DataType::F64 => 8,
            DataType::Bytes => return None,
        })
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TensorError {
    #[error("{dtype} tensor of shape {shape:?} needs {expected} bytes, got {actual}")]
    ByteLength { dtype: DataType, shape: Vec<usize>, expected: usize, actual: usize },
    #[error("BYTES tensor of shape {shape:?} holds {found} elements, expected {expected}")]
    BytesElementCount { shape: Vec<usize>, expected: usize, found: usize },
    #[error("BYTES tensor is malformed: element {index} claims {len} bytes but only {left} remain")]
    BytesTruncated { index: usize, len: usize, left: usize },
    #[error("cannot batch tensors of different {what}: {a} vs {b}")]
    Mismatch { what: &'static str, a: String, b: String },
    #[error("shape {shape:?} has more elements than can be addressed")]
    TooLarge { shape: Vec<usize> },
    #[error("tensor has no batch dimension (rank 0)")]
    NoBatchDim,
    #[error("batch split sizes add up to {total}, tensor has {rows} rows")]
    SplitSizes { total: usize, rows: usize },
}

/// A dense tensor. `data` holds the elements row-major and little-endian (for BYTES,
/// the length-prefixed serialisation).
#[derive(Clone, PartialEq)]
pub struct Tensor {
    pub dtype: DataType,
    pub shape: Vec<usize>,
    pub data: Bytes,
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tensor({} {:?}, {} bytes)", self.dtype, self.shape, self.data.len())
    }
}

/// Whether a concrete shape fits declared dims (-1: any size).
pub fn fits(shape: &[usize], dims: &[i64]) -> bool {
    shape.len() == dims.len() && shape.iter().zip(dims).all(|(&s, &d)| d < 0 || s as i64 == d)
}

/// Dims as `[a,b,c]`: the one way messages print them.
pub struct Dims<'a>(pub &'a [i64]);

impl fmt::Display for Dims<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, ",")?;
            }
            write!(f, "{d}")?;
        }
        write!(f, "]")
    }
}

/// Number of elements of a shape (1 for a scalar).
pub fn element_count(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl Tensor {
    /// Builds a tensor, checking that `data` is exactly what dtype and shape call for.
    pub fn new(dtype: DataType, shape: Vec<usize>, data: Bytes) -> Result<Tensor, TensorError> {
        let t = Tensor { dtype, shape, data };
        t.validate()?;
        Ok(t)
    }

    /// Checks the byte length (fixed-size types) or the element framing (BYTES).
    pub fn validate(&self) -> Result<(), TensorError> {
        // Shapes come from clients: a product that overflows is an error, not a wrap-around.
        let n = self
            .shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| TensorError::TooLarge { shape: self.shape.clone() })?;
        match self.dtype.size() {
            Some(sz) => {
                let expected = n.checked_mul(sz).ok_or_else(|| TensorError::TooLarge { shape: self.shape.clone() })?;
                if expected != self.data.len() {
                    return Err(TensorError::ByteLength {
                        dtype: self.dtype,
                        shape: self.shape.clone(),
                        expected,
                        actual: self.data.len(),
                    });
                }
            }
            None => {
                let found = bytes_offsets(&self.data)?.len();
                if found != n {
                    return Err(TensorError::BytesElementCount { shape: self.shape.clone(), expected: n, found });
                }
            }
        }
        Ok(())
    }

    pub fn element_count(&self) -> usize {
        element_count(&self.shape)
    }

    pub fn from_f32(shape: Vec<usize>, values: &[f32]) -> Tensor {
        Tensor::from_le(DataType::F32, shape, values, |v| v.to_le_bytes())
    }

    pub fn from_i64(shape: Vec<usize>, values: &[i64]) -> Tensor {
        Tensor::from_le(DataType::I64, shape, values, |v| v.to_le_bytes())
    }

    /// An F32 tensor that takes `values` as its buffer, without copying them (on
    /// little-endian hosts, where the values already are the tensor's bytes).
    pub fn from_f32_vec(shape: Vec<usize>, values: Vec<f32>) -> Tensor {
        assert_eq!(element_count(&shape), values.len(), "shape does not match values");
        if cfg!(target_endian = "big") {
            return Tensor::from_f32(shape, &values);
        }
        Tensor { dtype: DataType::F32, shape, data: Bytes::from_owner(PodBytes(values)) }
    }

    fn from_le<T: bytemuck::Pod, const N: usize>(
        dtype: DataType,
        shape: Vec<usize>,
        values: &[T],
        f: impl Fn(T) -> [u8; N],
    ) -> Tensor {
        assert_eq!(element_count(&shape), values.len(), "shape does not match values");
        if cfg!(target_endian = "little") {
            // One copy of the whole buffer instead of one small append per element.
            return Tensor { dtype, shape, data: Bytes::copy_from_slice(bytemuck::cast_slice(values)) };
        }
        let mut buf = BytesMut::with_capacity(values.len() * N);
        for v in values {
            buf.extend_from_slice(&f(*v));
        }
        Tensor { dtype, shape, data: buf.freeze() }
    }

    /// A BYTES tensor from its elements.
    pub fn from_bytes_elements<B: AsRef<[u8]>>(shape: Vec<usize>, elems: &[B]) -> Tensor {
        assert_eq!(element_count(&shape), elems.len(), "shape does not match values");
        Tensor { dtype: DataType::Bytes, shape, data: encode_bytes_elements(elems) }
    }

    /// The elements as f32 (FP32 tensors only).
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        (self.dtype == DataType::F32)
            .then(|| self.data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("chunk of 4"))).collect())
    }

    /// The elements as i64 (INT64 tensors only).
    pub fn to_i64(&self) -> Option<Vec<i64>> {
        (self.dtype == DataType::I64)
            .then(|| self.data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("chunk of 8"))).collect())
    }

    /// The elements of a BYTES tensor, each a zero-copy slice of the buffer.
    pub fn bytes_elements(&self) -> Result<Vec<Bytes>, TensorError> {
        Ok(bytes_offsets(&self.data)?.into_iter().map(|(start, end)| self.data.slice(start..end)).collect())
    }

    /// Concatenates tensors along dimension 0: they must agree in dtype and in every
    /// other dimension. This is the one copy dynamic batching makes.
    pub fn concat_batch(parts: &[&Tensor]) -> Result<Tensor, TensorError> {
        let first = parts.first().ok_or(TensorError::NoBatchDim)?;
        if first.shape.is_empty() {
            return Err(TensorError::NoBatchDim);
        }
        if parts.len() == 1 {
            return Ok((*first).clone());
        }
        let mut rows = 0;
        for p in parts {
            if p.dtype != first.dtype {
                return Err(TensorError::Mismatch {
                    what: "dtypes",
                    a: first.dtype.to_string(),
                    b: p.dtype.to_string(),
                });
            }
            if p.shape.len() != first.shape.len() || p.shape[1..] != first.shape[1..] {
                return Err(TensorError::Mismatch {
                    what: "shapes",
                    a: format!("{:?}", first.shape),
                    b: format!("{:?}", p.shape),
                });
            }
            rows += p.shape[0];
        }
        let mut buf = BytesMut::with_capacity(parts.iter().map(|p| p.data.len()).sum());
        for p in parts {
            buf.extend_from_slice(&p.data);
        }
        let mut shape = first.shape.clone();
        shape[0] = rows;
        Ok(Tensor { dtype: first.dtype, shape, data: buf.freeze() })
    }

    /// Splits along dimension 0 into pieces of `rows[i]` rows each, slicing the buffer.
    pub fn split_batch(&self, rows: &[usize]) -> Result<Vec<Tensor>, TensorError> {
        let total_rows = *self.shape.first().ok_or(TensorError::NoBatchDim)?;
        let total: usize = rows.iter().sum();
        if total != total_rows {
            return Err(TensorError::SplitSizes { total, rows: total_rows });
        }
        let per_row = element_count(&self.shape[1..]);
        // Byte offset of each row boundary.
        let boundaries: Vec<usize> = match self.dtype.size() {
            Some(sz) => (0..=total_rows).map(|r| r * per_row * sz).collect(),
            None => {
                let offs = bytes_offsets(&self.data)?;
                (0..=total_rows)
                    .map(|r| {
                        let e = r * per_row;
                        // Start of element e includes its 4-byte length prefix.
                        offs.get(e).map_or(self.data.len(), |(s, _)| s - 4)
                    })
                    .collect()
            }
        };
        let mut out = Vec::with_capacity(rows.len());
        let mut r0 = 0;
        for &n in rows {
            let mut shape = self.shape.clone();
            shape[0] = n;
            out.push(Tensor { dtype: self.dtype, shape, data: self.data.slice(boundaries[r0]..boundaries[r0 + n]) });
            r0 += n;
        }
        Ok(out)
    }
}

/// Serialises byte strings as 4-byte little-endian lengths each followed by the bytes.
pub fn encode_bytes_elements<B: AsRef<[u8]>>(elems: &[B]) -> Bytes {
    let mut buf = BytesMut::with_capacity(elems.iter().map(|e| 4 + e.as_ref().len()).sum());
    for e in elems {
        let e = e.as_ref();
        buf.extend_from_slice(&(e.len() as u32).to_le_bytes());
        buf.extend_from_slice(e);
    }
    buf.freeze()
}

/// (start, end) of each element's payload in a length-prefixed BYTES buffer.
pub fn bytes_offsets(data: &[u8]) -> Result<Vec<(usize, usize)>, TensorError> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < data.len() {
        let left = data.len() - pos;
        if left < 4 {
            return Err(TensorError::BytesTruncated { index: out.len(), len: 4, left });
        }
        let len = u32::from_le_bytes(data[pos..pos + 4].try_into().expect("4 bytes")) as usize;
        if len > left - 4 {
            return Err(TensorError::BytesTruncated { index: out.len(), len, left: left - 4 });
        }
        out.push((pos + 4, pos + 4 + len));
        pos += 4 + len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_and_copied_f32_tensors_hold_the_same_little_endian_bytes() {
        let values = vec![1.0f32, -2.5, 3.25, f32::MIN_POSITIVE, 0.0, 1e30];
        let expected: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let owned = Tensor::from_f32_vec(vec![2, 3], values.clone());
        let copied = Tensor::from_f32(vec![2, 3], &values);
        assert_eq!(&owned.data[..], &expected[..]);
        assert_eq!(owned, copied);
        assert_eq!(owned.to_f32(), Some(values));
        let ints = Tensor::from_i64(vec![2], &[-1, 1 << 40]);
        assert_eq!(&ints.data[..], &[(-1i64).to_le_bytes(), (1i64 << 40).to_le_bytes()].concat()[..]);
    }

    #[test]
    fn dtype_names_round_trip() {
        for d in DataType::ALL {
            assert_eq!(DataType::parse(d.as_str()), Some(d));
        }
        assert_eq!(DataType::parse("FLOAT"), None);
    }

    #[test]
    fn byte_length_is_checked() {
        let err = Tensor::new(DataType::F32, vec![2, 3], Bytes::from(vec![0u8; 20])).unwrap_err();
        assert_eq!(err.to_string(), "FP32 tensor of shape [2, 3] needs 24 bytes, got 20");
    }

    #[test]
    fn overflowing_shapes_are_rejected() {
        let err = Tensor::new(DataType::F32, vec![1 << 40, 1 << 40], Bytes::new()).unwrap_err();
        assert!(matches!(err, TensorError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn concat_then_split_is_identity() {
        let a = Tensor::from_f32(vec![1, 2], &[1.0, 2.0]);
        let b = Tensor::from_f32(vec![2, 2], &[3.0, 4.0, 5.0, 6.0]);
        let c = Tensor::concat_batch(&[&a, &b]).unwrap();
        assert_eq!(c.shape, vec![3, 2]);
        assert_eq!(c.to_f32().unwrap(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let parts = c.split_batch(&[1, 2]).unwrap();
        assert_eq!(parts, vec![a, b]);
    }

    #[test]
    fn concat_rejects_mismatched_rows() {
        let a = Tensor::from_f32(vec![1, 2], &[1.0, 2.0]);
        let b = Tensor::from_f32(vec![1, 3], &[1.0, 2.0, 3.0]);
        assert!(matches!(Tensor::concat_batch(&[&a, &b]), Err(TensorError::Mismatch { what: "shapes", .. })));
    }

    #[test]
    fn bytes_tensors_split_by_element() {
        let t = Tensor::from_bytes_elements(vec![3, 1], &["a", "", "xyz"]);
        t.validate().unwrap();
        let parts = t.split_batch(&[2, 1]).unwrap();
        assert_eq!(parts[0].bytes_elements().unwrap(), vec![Bytes::from("a"), Bytes::new()]);
        assert_eq!(parts[1].bytes_elements().unwrap(), vec![Bytes::from("xyz")]);
    }

    #[test]
    fn truncated_bytes_are_rejected() {
        let err = bytes_offsets(&[5, 0, 0, 0, b'a']).unwrap_err();
        assert_eq!(err, TensorError::BytesTruncated { index: 0, len: 5, left: 1 });
    }
}

// ---- the v2 protocol's JSON form of tensor data ----

use bytes::BufMut;
use serde_json::{json, Value};

/// Flattens a (possibly nested) JSON array into tensor bytes.
pub fn json_to_bytes(dtype: DataType, data: &Value) -> Result<Bytes, String> {
    fn flatten<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
        match v {
            Value::Array(a) => a.iter().for_each(|x| flatten(x, out)),
            other => out.push(other),
        }
    }
    let mut elems = Vec::new();
    flatten(data, &mut elems);
    if dtype == DataType::Bytes {
        let strs = elems
            .iter()
            .map(|v| v.as_str().map(str::as_bytes).ok_or("BYTES data must be strings"))
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(encode_bytes_elements(&strs));
    }
    let mut b = BytesMut::with_capacity(elems.len() * dtype.size().unwrap_or(1));
    for (i, v) in elems.iter().enumerate() {
        let bad = || format!("element {i} ({v}) is not a valid {dtype}");
        macro_rules! int {
            ($t:ty, $get:ident) => {
                b.put_slice(&<$t>::try_from(v.$get().ok_or_else(bad)?).map_err(|_| bad())?.to_le_bytes())
            };
        }
        match dtype {
            DataType::Bool => b.put_u8(v.as_bool().ok_or_else(bad)? as u8),
            DataType::I8 => int!(i8, as_i64),
            DataType::I16 => int!(i16, as_i64),
            DataType::I32 => int!(i32, as_i64),
            DataType::I64 => b.put_slice(&v.as_i64().ok_or_else(bad)?.to_le_bytes()),
            DataType::U8 => int!(u8, as_u64),
            DataType::U16 => int!(u16, as_u64),
            DataType::U32 => int!(u32, as_u64),
            DataType::U64 => b.put_slice(&v.as_u64().ok_or_else(bad)?.to_le_bytes()),
            DataType::F16 => b.put_slice(&half::f16::from_f64(v.as_f64().ok_or_else(bad)?).to_le_bytes()),
            DataType::BF16 => b.put_slice(&half::bf16::from_f64(v.as_f64().ok_or_else(bad)?).to_le_bytes()),
            DataType::F32 => b.put_slice(&(v.as_f64().ok_or_else(bad)? as f32).to_le_bytes()),
            DataType::F64 => b.put_slice(&v.as_f64().ok_or_else(bad)?.to_le_bytes()),
            DataType::Bytes => unreachable!("handled above"),
        }
    }
    Ok(b.freeze())
}

/// Tensor bytes as a flat JSON array (BYTES elements as UTF-8 strings, lossily).
fn tensor_to_json(t: &Tensor) -> Value {
    macro_rules! nums {
        ($t:ty, $n:expr) => {
            t.data.chunks_exact($n).map(|c| json!(<$t>::from_le_bytes(c.try_into().expect("exact chunk")))).collect()
        };
    }
    let v: Vec<Value> = match t.dtype {
        DataType::Bool => t.data.iter().map(|&b| json!(b != 0)).collect(),
        DataType::U8 => nums!(u8, 1),
        DataType::U16 => nums!(u16, 2),
        DataType::U32 => nums!(u32, 4),
        DataType::U64 => nums!(u64, 8),
        DataType::I8 => nums!(i8, 1),
        DataType::I16 => nums!(i16, 2),
        DataType::I32 => nums!(i32, 4),
        DataType::I64 => nums!(i64, 8),
        DataType::F32 => nums!(f32, 4),
        DataType::F64 => nums!(f64, 8),
        DataType::F16 => {
            t.data.chunks_exact(2).map(|c| json!(half::f16::from_le_bytes([c[0], c[1]]).to_f32())).collect()
        }
        DataType::BF16 => {
            t.data.chunks_exact(2).map(|c| json!(half::bf16::from_le_bytes([c[0], c[1]]).to_f32())).collect()
        }
        DataType::Bytes => {
            t.bytes_elements().unwrap_or_default().iter().map(|e| json!(String::from_utf8_lossy(e))).collect()
        }
    };
    Value::Array(v)
}

impl Tensor {
    /// The data as a flat JSON array, as the v2 protocol's JSON tensors carry it.
    pub fn to_json(&self) -> Value {
        tensor_to_json(self)
    }
}

#[cfg(test)]
mod json_tests {
    use super::*;

    #[test]
    fn json_data_round_trips_and_names_bad_elements() {
        let t = Tensor::from_f32(vec![2, 2], &[1.0, 2.5, -3.0, 4.0]);
        let v = t.to_json();
        assert_eq!(v, json!([1.0, 2.5, -3.0, 4.0]));
        assert_eq!(json_to_bytes(DataType::F32, &json!([[1.0, 2.5], [-3.0, 4.0]])).unwrap(), t.data);
        let b = Tensor::new(DataType::Bytes, vec![2], json_to_bytes(DataType::Bytes, &json!(["a", "bc"])).unwrap())
            .unwrap();
        assert_eq!(b.to_json(), json!(["a", "bc"]));
        let e = json_to_bytes(DataType::U8, &json!([1, 300])).unwrap_err();
        assert!(e.contains("element 1 (300) is not a valid UINT8"), "{e}");
    }
}
