//! Reads a model's inputs and outputs straight from the ONNX protobuf, so `sluice check`
//! and the metadata endpoints need no ONNX Runtime. Only the fields read are declared;
//! prost skips the rest (weights included) without allocating them.

use prost::Message;
use sluice_ops::DataType;

#[derive(Clone, PartialEq, Message)]
struct ModelProto {
    #[prost(message, optional, tag = "7")]
    graph: Option<GraphProto>,
    #[prost(message, repeated, tag = "14")]
    metadata_props: Vec<StringStringEntry>,
}

#[derive(Clone, PartialEq, Message)]
struct StringStringEntry {
    #[prost(string, tag = "1")]
    key: String,
    #[prost(string, tag = "2")]
    value: String,
}

#[derive(Clone, PartialEq, Message)]
struct GraphProto {
    #[prost(message, repeated, tag = "5")]
    initializer: Vec<NamedTensor>,
    #[prost(message, repeated, tag = "11")]
    input: Vec<ValueInfo>,
    #[prost(message, repeated, tag = "12")]
    output: Vec<ValueInfo>,
}

#[derive(Clone, PartialEq, Message)]
struct NamedTensor {
    #[prost(string, tag = "8")]
    name: String,
}

#[derive(Clone, PartialEq, Message)]
struct ValueInfo {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(message, optional, tag = "2")]
    r#type: Option<TypeProto>,
}

#[derive(Clone, PartialEq, Message)]
struct TypeProto {
    #[prost(message, optional, tag = "1")]
    tensor_type: Option<TensorType>,
}

#[derive(Clone, PartialEq, Message)]
struct TensorType {
    #[prost(int32, tag = "1")]
    elem_type: i32,
    #[prost(message, optional, tag = "2")]
    shape: Option<ShapeProto>,
}

#[derive(Clone, PartialEq, Message)]
struct ShapeProto {
    #[prost(message, repeated, tag = "1")]
    dim: Vec<Dim>,
}

#[derive(Clone, PartialEq, Message)]
struct Dim {
    #[prost(int64, optional, tag = "1")]
    dim_value: Option<i64>,
    #[prost(string, optional, tag = "2")]
    dim_param: Option<String>,
}

/// One input or output of a model: dims are full (batch included), -1 when variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DataType,
    pub dims: Vec<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OnnxSignature {
    pub inputs: Vec<TensorInfo>,
    pub outputs: Vec<TensorInfo>,
    pub metadata: Vec<(String, String)>,
}

/// ONNX TensorProto.DataType codes.
fn dtype_from_onnx(code: i32) -> Option<DataType> {
    Some(match code {
        1 => DataType::F32,
        2 => DataType::U8,
        3 => DataType::I8,
        4 => DataType::U16,
        5 => DataType::I16,
        6 => DataType::I32,
        7 => DataType::I64,
        8 => DataType::Bytes,
        9 => DataType::Bool,
        10 => DataType::F16,
        11 => DataType::F64,
        12 => DataType::U32,
        13 => DataType::U64,
        16 => DataType::BF16,
        _ => return None,
    })
}

/// Parses the signature of an ONNX model from its bytes.
pub fn read_signature(bytes: &[u8]) -> Result<OnnxSignature, String> {
    let model = ModelProto::decode(bytes).map_err(|e| format!("not a valid ONNX file: {e}"))?;
    let graph = model.graph.ok_or_else(|| "not a valid ONNX file: it has no graph".to_string())?;
    // Older exporters list initializers among the graph inputs; they are weights, not inputs.
    let weights: std::collections::HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let convert = |v: &ValueInfo| -> Result<TensorInfo, String> {
        let tt = v
            .r#type
            .as_ref()
            .and_then(|t| t.tensor_type.as_ref())
            .ok_or_else(|| format!("'{}' is not a tensor", v.name))?;
        let dtype = dtype_from_onnx(tt.elem_type)
            .ok_or_else(|| format!("'{}' has unsupported ONNX element type {}", v.name, tt.elem_type))?;
        let dims = tt
            .shape
            .as_ref()
            .map(|s| s.dim.iter().map(|d| d.dim_value.filter(|&v| v > 0).unwrap_or(-1)).collect())
            .unwrap_or_default();
        Ok(TensorInfo { name: v.name.clone(), dtype, dims })
    };
    let inputs = graph
        .input
        .iter()
        .filter(|v| !weights.contains(v.name.as_str()))
        .map(convert)
        .collect::<Result<Vec<_>, _>>()?;
    let outputs = graph.output.iter().map(convert).collect::<Result<Vec<_>, _>>()?;
    if inputs.is_empty() || outputs.is_empty() {
        return Err("not a valid ONNX file: the graph declares no inputs or no outputs".into());
    }
    Ok(OnnxSignature {
        inputs,
        outputs,
        metadata: model.metadata_props.into_iter().map(|e| (e.key, e.value)).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_rejected() {
        let err = read_signature(b"definitely not protobuf \xff\xff\xff").unwrap_err();
        assert!(err.starts_with("not a valid ONNX file"), "{err}");
    }

    #[test]
    fn signature_is_read() {
        let dim = |v: Option<i64>, p: Option<&str>| Dim { dim_value: v, dim_param: p.map(str::to_string) };
        let vi = |name: &str, elem: i32, dims: Vec<Dim>| ValueInfo {
            name: name.into(),
            r#type: Some(TypeProto {
                tensor_type: Some(TensorType { elem_type: elem, shape: Some(ShapeProto { dim: dims }) }),
            }),
        };
        let model = ModelProto {
            graph: Some(GraphProto {
                initializer: vec![NamedTensor { name: "w".into() }],
                input: vec![
                    vi("x", 1, vec![dim(None, Some("N")), dim(Some(3), None)]),
                    vi("w", 1, vec![dim(Some(3), None)]),
                ],
                output: vec![vi("y", 7, vec![dim(None, Some("N"))])],
            }),
            metadata_props: vec![StringStringEntry { key: "k".into(), value: "v".into() }],
        };
        let sig = read_signature(&model.encode_to_vec()).unwrap();
        assert_eq!(sig.inputs, vec![TensorInfo { name: "x".into(), dtype: DataType::F32, dims: vec![-1, 3] }]);
        assert_eq!(sig.outputs[0].dtype, DataType::I64);
        assert_eq!(sig.metadata, vec![("k".to_string(), "v".to_string())]);
    }
}
