//! Request parameters as pipeline values (`parameters:` in a pipeline file, read from a
//! v2 request's `parameters`), and the literal values a file may give as defaults.

use super::cond::{Kind, Scalar};
use serde::Deserialize;
use sluice_ops::{DataType, Tensor, Value, ValueType};

/// How a parameter is typed in a pipeline file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParamType {
    Float,
    Int,
    Bool,
    String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamYaml {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: ParamType,
    /// The value when a request does not give one.
    pub default: serde_json::Value,
    /// Numbers: the smallest and largest value a request may give.
    #[serde(default)]
    pub min: Option<f64>,
    #[serde(default)]
    pub max: Option<f64>,
    /// The only values a request may give.
    #[serde(default)]
    pub values: Option<Vec<serde_json::Value>>,
}

/// A declared parameter, checked.
#[derive(Debug, Clone)]
pub struct ParamDecl {
    pub name: String,
    pub ty: ParamType,
    pub default: Scalar,
    min: Option<f64>,
    max: Option<f64>,
    values: Option<Vec<Scalar>>,
}

/// The most parameters a pipeline may declare.
pub const MAX_PARAMS: usize = 64;
/// The longest string a request may give a parameter, in bytes.
pub const MAX_STRING: usize = 4096;

impl ParamDecl {
    pub fn from_yaml(y: &ParamYaml) -> Result<ParamDecl, String> {
        if y.name.is_empty() || !y.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("parameter '{}': a name is letters, digits and '_'", y.name));
        }
        if [y.min, y.max].iter().flatten().any(|b| !b.is_finite()) {
            return Err(format!("parameter '{}': min and max are finite numbers", y.name));
        }
        if matches!((y.min, y.max), (Some(lo), Some(hi)) if hi < lo) {
            return Err(format!("parameter '{}': max is below min", y.name));
        }
        if (y.min.is_some() || y.max.is_some()) && !matches!(y.ty, ParamType::Float | ParamType::Int) {
            return Err(format!("parameter '{}': min and max are for numbers", y.name));
        }
        let mut d = ParamDecl {
            name: y.name.clone(),
            ty: y.ty,
            default: Scalar::Bool(false),
            min: y.min,
            max: y.max,
            values: None,
        };
        if let Some(vs) = &y.values {
            let vs = vs.iter().map(|v| d.coerce(&json_scalar(v)?)).collect::<Result<Vec<_>, _>>();
            d.values = Some(vs.map_err(|e| format!("parameter '{}': values: {e}", y.name))?);
        }
        let default = json_scalar(&y.default).and_then(|v| d.accept(v));
        d.default = default.map_err(|e| format!("parameter '{}': default: {e}", y.name))?;
        Ok(d)
    }

    pub fn kind(&self) -> Kind {
        match self.ty {
            ParamType::Float | ParamType::Int => Kind::Num,
            ParamType::Bool => Kind::Bool,
            ParamType::String => Kind::Str,
        }
    }

    /// The value a request's parameter takes, or why it cannot.
    pub fn accept(&self, v: Scalar) -> Result<Scalar, String> {
        let v = self.coerce(&v)?;
        if let Scalar::Num(n) = v {
            if self.min.is_some_and(|m| n < m) || self.max.is_some_and(|m| n > m) {
                let bound = |b: Option<f64>| b.map_or("-".to_string(), |b| b.to_string());
                return Err(format!("{n} is outside [{}, {}]", bound(self.min), bound(self.max)));
            }
        }
        if let Some(vs) = &self.values {
            if !vs.contains(&v) {
                let shown: Vec<String> = vs.iter().map(Scalar::to_string).collect();
                return Err(format!("{v} is not one of {}", shown.join(", ")));
            }
        }
        Ok(v)
    }

    fn coerce(&self, v: &Scalar) -> Result<Scalar, String> {
        match (self.ty, v) {
            (ParamType::Float, Scalar::Num(n)) if n.is_finite() => Ok(Scalar::Num(*n)),
            (ParamType::Int, Scalar::Num(n)) if n.fract() == 0.0 && n.abs() < 9.0e15 => Ok(Scalar::Num(*n)),
            (ParamType::Bool, Scalar::Bool(b)) => Ok(Scalar::Bool(*b)),
            (ParamType::String, Scalar::Str(s)) if s.len() <= MAX_STRING => Ok(Scalar::Str(s.clone())),
            (ParamType::String, Scalar::Str(_)) => Err(format!("a string longer than {MAX_STRING} bytes")),
            (ty, v) => Err(format!("expected {}, got {v}", type_name(ty))),
        }
    }

    /// The parameter as a node input: a tensor of no dimensions.
    pub fn value_type(&self) -> ValueType {
        ValueType::tensor(self.dtype(), vec![])
    }

    fn dtype(&self) -> DataType {
        match self.ty {
            ParamType::Float => DataType::F32,
            ParamType::Int => DataType::I64,
            ParamType::Bool => DataType::Bool,
            ParamType::String => DataType::Bytes,
        }
    }

    pub fn to_value(&self, v: &Scalar) -> Value {
        Value::Tensor(match v {
            Scalar::Num(n) if self.ty == ParamType::Int => Tensor::from_i64(vec![], &[*n as i64]),
            Scalar::Num(n) => Tensor::from_f32(vec![], &[*n as f32]),
            Scalar::Bool(b) => Tensor::new(DataType::Bool, vec![], vec![u8::from(*b)].into()).expect("one byte"),
            Scalar::Str(s) => Tensor::from_bytes_elements(vec![], &[s.as_bytes()]),
        })
    }

    /// The value as it stands in an op's params.
    pub fn to_json(&self, v: &Scalar) -> serde_json::Value {
        match v {
            Scalar::Num(n) if self.ty == ParamType::Int => serde_json::json!(*n as i64),
            Scalar::Num(n) => serde_json::json!(n),
            Scalar::Bool(b) => serde_json::json!(b),
            Scalar::Str(s) => serde_json::json!(s),
        }
    }
}

fn type_name(t: ParamType) -> &'static str {
    match t {
        ParamType::Float => "a number",
        ParamType::Int => "an integer",
        ParamType::Bool => "true or false",
        ParamType::String => "a string",
    }
}

fn json_scalar(v: &serde_json::Value) -> Result<Scalar, String> {
    match v {
        serde_json::Value::Bool(b) => Ok(Scalar::Bool(*b)),
        serde_json::Value::Number(n) => n.as_f64().map(Scalar::Num).ok_or_else(|| format!("bad number {n}")),
        serde_json::Value::String(s) => Ok(Scalar::Str(s.clone())),
        other => Err(format!("expected a number, a string or a boolean, got {other}")),
    }
}

/// Where op params name parameters: a string `$name` (`$$` writes a literal `$`).
/// Calls `f` on each name.
pub fn visit_refs(v: &serde_json::Value, f: &mut impl FnMut(&str)) {
    // Iterative: params nest as deep as the file does.
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        match v {
            serde_json::Value::String(s) if s.starts_with('$') && !s.starts_with("$$") => f(&s[1..]),
            serde_json::Value::Array(a) => stack.extend(a),
            serde_json::Value::Object(o) => stack.extend(o.values()),
            _ => {}
        }
    }
}

/// `v` with each `$name` replaced by `lookup(name)` and each `$$` by `$`.
pub fn substitute(v: &serde_json::Value, lookup: &dyn Fn(&str) -> serde_json::Value) -> serde_json::Value {
    let mut out = v.clone();
    let mut stack = vec![&mut out];
    while let Some(v) = stack.pop() {
        match v {
            serde_json::Value::String(s) if s.starts_with("$$") => *s = s[1..].to_string(),
            serde_json::Value::String(s) if s.starts_with('$') => *v = lookup(&s[1..]),
            serde_json::Value::Array(a) => stack.extend(a.iter_mut()),
            serde_json::Value::Object(o) => stack.extend(o.values_mut()),
            _ => {}
        }
    }
    out
}

/// A value a file gives where a value may be absent: `empty` (no rows of the type's
/// shape) or a number, string, boolean or nested list of them, typed as `ty` says.
pub fn literal(v: &serde_json::Value, ty: &ValueType) -> Result<Value, String> {
    let ValueType::Tensor { dtype: Some(dtype), dims } = ty else {
        return Err(format!("a default is a tensor, but this value is {ty}"));
    };
    if v.as_str() == Some("empty") {
        let dims = dims.as_ref().ok_or("`empty` needs the value's dims, which are not known here")?;
        let Some((&first, rest)) = dims.split_first() else {
            return Err("`empty` needs a first dimension, but the value has no dimensions: give a value".into());
        };
        if first >= 0 {
            return Err(format!("`empty` is no rows, but the value always has {first}: give a value"));
        }
        if rest.iter().any(|&d| d < 0) {
            return Err(format!(
                "`empty` needs every dimension after the first, but they are {}",
                sluice_ops::tensor::Dims(dims)
            ));
        }
        let mut shape = vec![0usize];
        shape.extend(rest.iter().map(|&d| d as usize));
        return Tensor::new(*dtype, shape, Vec::new().into()).map(Value::Tensor).map_err(|e| e.to_string());
    }
    // Flatten nested lists: shape from the nesting, every list at one level the same length.
    let mut shape = Vec::new();
    let mut level = vec![v];
    while let Some(serde_json::Value::Array(first)) = level.first() {
        let n = first.len();
        if shape.len() >= 8 {
            return Err("a default nests at most 8 lists deep".into());
        }
        if level.iter().any(|l| l.as_array().map(Vec::len) != Some(n)) {
            return Err("the lists of a default are ragged: every list at one level must have the same length".into());
        }
        shape.push(n);
        level = level.iter().flat_map(|l| l.as_array().expect("checked above")).collect();
    }
    let scalars = level.iter().map(|v| json_scalar(v)).collect::<Result<Vec<_>, _>>()?;
    let tensor = match dtype {
        DataType::F32 => {
            Tensor::from_f32(shape.clone(), &nums(&scalars)?.iter().map(|&n| n as f32).collect::<Vec<_>>())
        }
        DataType::I64 => {
            let n = nums(&scalars)?;
            if let Some(bad) = n.iter().find(|v| v.fract() != 0.0 || v.abs() >= 9.0e18) {
                return Err(format!("{bad} is not an INT64"));
            }
            Tensor::from_i64(shape.clone(), &n.iter().map(|&n| n as i64).collect::<Vec<_>>())
        }
        DataType::Bytes => {
            let strs = scalars
                .iter()
                .map(|s| match s {
                    Scalar::Str(s) => Ok(s.as_bytes()),
                    other => Err(format!("expected strings, got {other}")),
                })
                .collect::<Result<Vec<_>, String>>()?;
            Tensor::from_bytes_elements(shape.clone(), &strs)
        }
        other => return Err(format!("defaults of {other} are not supported (FP32, INT64 and BYTES are)")),
    };
    let given = ValueType::tensor(*dtype, shape.iter().map(|&d| d as i64).collect());
    if !ty.accepts(&given) {
        return Err(format!("the default is {given}, but the value is {ty}"));
    }
    Ok(Value::Tensor(tensor))
}

fn nums(s: &[Scalar]) -> Result<Vec<f64>, String> {
    s.iter()
        .map(|s| match s {
            Scalar::Num(n) => Ok(*n),
            other => Err(format!("expected numbers, got {other}")),
        })
        .collect()
}

/// Element `k` of a tensor as a scalar (`None`: out of range or a dtype conditions do
/// not read).
pub fn scalar_at(t: &Tensor, k: usize) -> Option<Scalar> {
    let le = |n: usize| t.data.get(k * n..k * n + n);
    Some(match t.dtype {
        DataType::Bool => Scalar::Bool(*le(1)?.first()? != 0),
        DataType::U8 => Scalar::Num(f64::from(le(1)?[0])),
        DataType::I8 => Scalar::Num(f64::from(le(1)?[0] as i8)),
        DataType::U16 => Scalar::Num(f64::from(u16::from_le_bytes(le(2)?.try_into().ok()?))),
        DataType::I16 => Scalar::Num(f64::from(i16::from_le_bytes(le(2)?.try_into().ok()?))),
        DataType::U32 => Scalar::Num(f64::from(u32::from_le_bytes(le(4)?.try_into().ok()?))),
        DataType::I32 => Scalar::Num(f64::from(i32::from_le_bytes(le(4)?.try_into().ok()?))),
        DataType::U64 => Scalar::Num(u64::from_le_bytes(le(8)?.try_into().ok()?) as f64),
        DataType::I64 => Scalar::Num(i64::from_le_bytes(le(8)?.try_into().ok()?) as f64),
        DataType::F32 => Scalar::Num(f64::from(f32::from_le_bytes(le(4)?.try_into().ok()?))),
        DataType::F64 => Scalar::Num(f64::from_le_bytes(le(8)?.try_into().ok()?)),
        DataType::Bytes => Scalar::Str(String::from_utf8_lossy(&t.bytes_elements().ok()?.get(k)?.clone()).into_owned()),
        DataType::F16 | DataType::BF16 => return None,
    })
}

/// The kind conditions see in a tensor of `dtype`.
pub fn kind_of_dtype(dtype: DataType) -> Option<Kind> {
    match dtype {
        DataType::Bool => Some(Kind::Bool),
        DataType::Bytes => Some(Kind::Str),
        DataType::F16 | DataType::BF16 => None,
        _ => Some(Kind::Num),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn decl(y: serde_json::Value) -> Result<ParamDecl, String> {
        ParamDecl::from_yaml(&serde_json::from_value(y).unwrap())
    }

    #[test]
    fn parameters_are_typed_and_bounded() {
        let p = decl(json!({"name": "t", "type": "float", "default": 0.25, "min": 0, "max": 1})).unwrap();
        assert_eq!(p.default, Scalar::Num(0.25));
        assert_eq!(p.accept(Scalar::Num(1.0)), Ok(Scalar::Num(1.0)));
        assert!(p.accept(Scalar::Num(1.5)).unwrap_err().contains("outside [0, 1]"));
        assert!(p.accept(Scalar::Str("x".into())).unwrap_err().contains("expected a number"));
        let e = decl(json!({"name": "t", "type": "float", "default": 2, "max": 1})).unwrap_err();
        assert!(e.contains("parameter 't': default: 2 is outside"), "{e}");
        let l = decl(json!({"name": "lang", "type": "string", "default": "en", "values": ["en", "ch"]})).unwrap();
        assert!(l.accept(Scalar::Str("fr".into())).unwrap_err().contains("not one of 'en', 'ch'"));
        let i = decl(json!({"name": "k", "type": "int", "default": 3})).unwrap();
        assert!(i.accept(Scalar::Num(2.5)).is_err());
        assert_eq!(i.to_json(&Scalar::Num(4.0)), json!(4));
        assert!(decl(json!({"name": "a-b", "type": "int", "default": 1})).is_err());
    }

    #[test]
    fn params_substitute_names_and_keep_escaped_dollars() {
        let v = json!({"min_score": "$t", "nested": [{"x": "$k"}], "label": "$$5"});
        let mut seen = Vec::new();
        visit_refs(&v, &mut |n| seen.push(n.to_string()));
        seen.sort();
        assert_eq!(seen, ["k", "t"]);
        let out = substitute(&v, &|n| if n == "t" { json!(0.5) } else { json!(7) });
        assert_eq!(out, json!({"min_score": 0.5, "nested": [{"x": 7}], "label": "$5"}));
    }

    #[test]
    fn literals_take_the_type_they_stand_for() {
        assert!(literal(&json!("empty"), &ValueType::tensor(DataType::F32, vec![5]))
            .unwrap_err()
            .contains("always has 5"));
        assert!(literal(&json!([1.5]), &ValueType::tensor(DataType::I64, vec![1]))
            .unwrap_err()
            .contains("not an INT64"));
        let ty = ValueType::tensor(DataType::F32, vec![-1, 5]);
        let Value::Tensor(t) = literal(&json!("empty"), &ty).unwrap() else { panic!() };
        assert_eq!(t.shape, vec![0, 5]);
        let Value::Tensor(t) = literal(&json!([[1, 2, 3, 4, 5]]), &ty).unwrap() else { panic!() };
        assert_eq!(t.to_f32().unwrap(), vec![1.0, 2.0, 3.0, 4.0, 5.0]);
        assert!(literal(&json!([1, 2]), &ty).unwrap_err().contains("the default is tensor FP32 [2]"));
        assert!(literal(&json!([[1], [1, 2]]), &ty).unwrap_err().contains("ragged"));
        let scalar = ValueType::tensor(DataType::I64, vec![]);
        assert!(literal(&json!("empty"), &scalar).unwrap_err().contains("no dimensions"));
        let Value::Tensor(t) = literal(&json!(3), &scalar).unwrap() else { panic!() };
        assert_eq!(t.to_i64().unwrap(), vec![3]);
        assert!(literal(&json!(1), &ValueType::image()).unwrap_err().contains("a default is a tensor"));
    }

    #[test]
    fn tensor_elements_read_as_scalars() {
        let t = Tensor::from_i64(vec![3], &[4, 5, 6]);
        assert_eq!(scalar_at(&t, 2), Some(Scalar::Num(6.0)));
        assert_eq!(scalar_at(&t, 3), None);
        let s = Tensor::from_bytes_elements(vec![2], &["a", "bc"]);
        assert_eq!(scalar_at(&s, 1), Some(Scalar::Str("bc".into())));
    }
}
