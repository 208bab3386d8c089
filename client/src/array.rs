//! Tensors to and from [`ndarray`] arrays (cargo feature `ndarray`, on by default).
//!
//! ```
//! use ndarray::array;
//! use sluice_client::array::{ArrayExt, TensorExt};
//!
//! let x = array![[1.0f32, 2.0], [3.0, 4.0]];
//! let t = x.to_tensor(); // FP32 [2, 2], row-major little-endian bytes
//! assert_eq!(t.shape, vec![2, 2]);
//! let back = t.to_array::<f32>().unwrap();
//! assert_eq!(back, x.into_dyn());
//! // Asking for the wrong element type is an error, not a reinterpretation.
//! assert!(t.to_array::<i64>().is_err());
//! ```

use crate::ClientError;
/// The ndarray version these conversions use.
pub use ndarray;
use ndarray::{ArrayBase, ArrayD, Data, Dimension, IxDyn};
use sluice_ops::{DataType, Tensor};

mod sealed {
    pub trait Sealed {}
}

/// Element types that map one to one onto a v2 datatype (the numeric ones and bool;
/// sealed: BYTES and FP16 tensors have no fixed-width Rust element here).
pub trait Element: sealed::Sealed + Copy + 'static {
    const DTYPE: DataType;
    /// Appends the element, little-endian.
    fn put(self, out: &mut Vec<u8>);
    /// Reads one element from exactly `DTYPE.size()` little-endian bytes.
    fn get(bytes: &[u8]) -> Self;
}

macro_rules! numeric_element {
    ($($t:ty => $d:ident),* $(,)?) => {$(
        impl sealed::Sealed for $t {}
        impl Element for $t {
            const DTYPE: DataType = DataType::$d;
            fn put(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
            fn get(bytes: &[u8]) -> Self {
                <$t>::from_le_bytes(bytes.try_into().expect("element width"))
            }
        }
    )*};
}

numeric_element!(
    u8 => U8, u16 => U16, u32 => U32, u64 => U64,
    i8 => I8, i16 => I16, i32 => I32, i64 => I64,
    f32 => F32, f64 => F64,
);

impl sealed::Sealed for bool {}
impl Element for bool {
    const DTYPE: DataType = DataType::Bool;
    fn put(self, out: &mut Vec<u8>) {
        out.push(self as u8);
    }
    fn get(bytes: &[u8]) -> Self {
        bytes[0] != 0
    }
}

/// Builds a tensor from any array (views, slices, transposed or strided ones included:
/// elements are written in logical row-major order).
pub fn tensor_from_array<T: Element, S: Data<Elem = T>, D: Dimension>(a: &ArrayBase<S, D>) -> Tensor {
    let width = T::DTYPE.size().expect("numeric dtype");
    let mut out = Vec::with_capacity(a.len() * width);
    a.iter().for_each(|v| v.put(&mut out));
    Tensor { dtype: T::DTYPE, shape: a.shape().to_vec(), data: out.into() }
}

/// Reads a tensor as an array of `T`; the tensor's datatype must be `T`'s.
pub fn array_from_tensor<T: Element>(t: &Tensor) -> Result<ArrayD<T>, ClientError> {
    if t.dtype != T::DTYPE {
        return Err(ClientError::Response(format!("tensor is {}, asked for {} elements", t.dtype, T::DTYPE)));
    }
    t.validate().map_err(|e| ClientError::Response(e.to_string()))?;
    let width = T::DTYPE.size().expect("numeric dtype");
    let values: Vec<T> = t.data.chunks_exact(width).map(T::get).collect();
    ArrayD::from_shape_vec(IxDyn(&t.shape), values).map_err(|e| ClientError::Response(e.to_string()))
}

/// `array.to_tensor()` for any ndarray array or view.
pub trait ArrayExt {
    fn to_tensor(&self) -> Tensor;
}

impl<T: Element, S: Data<Elem = T>, D: Dimension> ArrayExt for ArrayBase<S, D> {
    fn to_tensor(&self) -> Tensor {
        tensor_from_array(self)
    }
}

/// `tensor.to_array::<f32>()`.
pub trait TensorExt {
    fn to_array<T: Element>(&self) -> Result<ArrayD<T>, ClientError>;
}

impl TensorExt for Tensor {
    fn to_array<T: Element>(&self) -> Result<ArrayD<T>, ClientError> {
        array_from_tensor(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{array, s, Array3, Axis};

    #[test]
    fn round_trips_every_numeric_type() {
        fn check<T: Element + PartialEq + std::fmt::Debug>(v: [T; 6]) {
            let a = ndarray::Array2::from_shape_vec((2, 3), v.to_vec()).unwrap();
            let t = a.to_tensor();
            assert_eq!((t.dtype, t.shape.clone()), (T::DTYPE, vec![2, 3]));
            t.validate().unwrap();
            assert_eq!(t.to_array::<T>().unwrap(), a.into_dyn());
        }
        check([1u8, 2, 3, 4, 5, 255]);
        check([1u16, 2, 3, 4, 5, u16::MAX]);
        check([1u32, 2, 3, 4, 5, u32::MAX]);
        check([1u64, 2, 3, 4, 5, u64::MAX]);
        check([-1i8, 2, 3, 4, 5, i8::MIN]);
        check([-1i16, 2, 3, 4, 5, i16::MIN]);
        check([-1i32, 2, 3, 4, 5, i32::MIN]);
        check([-1i64, 2, 3, 4, 5, i64::MIN]);
        check([0.5f32, -2.0, 3.25, f32::MAX, 0.0, -0.0]);
        check([0.5f64, -2.0, 3.25, f64::MAX, 0.0, 1e-300]);
        check([true, false, true, true, false, false]);
    }

    #[test]
    fn matches_the_wire_layout_of_the_plain_constructors() {
        let a = array![[1.0f32, 2.0], [3.0, 4.0]];
        assert_eq!(a.to_tensor(), Tensor::from_f32(vec![2, 2], &[1.0, 2.0, 3.0, 4.0]));
    }

    #[test]
    fn non_contiguous_views_are_written_in_logical_order() {
        let a = Array3::from_shape_fn((2, 3, 4), |(i, j, k)| (i * 100 + j * 10 + k) as i32);
        let t = a.t().to_tensor(); // shape [4, 3, 2], strides reversed
        assert_eq!(t.shape, vec![4, 3, 2]);
        assert_eq!(t.to_array::<i32>().unwrap(), a.t().to_owned().into_dyn());
        let col = a.slice(s![.., 1, ..]).to_tensor();
        assert_eq!(
            col.to_array::<i32>().unwrap().index_axis(Axis(0), 1).iter().copied().collect::<Vec<_>>(),
            vec![110, 111, 112, 113]
        );
    }

    #[test]
    fn wrong_type_or_bytes_is_an_error() {
        let t = Tensor::from_i64(vec![2], &[1, 2]);
        let e = t.to_array::<f32>().unwrap_err().to_string();
        assert!(e.contains("INT64") && e.contains("FP32"), "{e}");
        let bad = Tensor { dtype: DataType::F32, shape: vec![3], data: vec![0u8; 8].into() };
        assert!(bad.to_array::<f32>().is_err());
    }
}
