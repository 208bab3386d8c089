//! Exact graph rewrites that ONNX Runtime's optimiser misses, applied to a model's bytes
//! before ONNX Runtime sees them (model.yaml `fold_graph`, on by default).
//!
//! Some exporters write elementwise chains that ONNX Runtime runs as one pass over the
//! tensor each: paddle2onnx, for PaddleOCR's PP-LCNetV3 networks, writes every "learnable
//! affine block" as a scalar Mul and Add after and before convolutions, and hard-swish as
//! Add, Clip, Mul, Div. In PP-OCRv4's detector those passes are ~40% of the CPU time.
//! Three rewrites remove most of them:
//!
//! 1. `Conv -> Mul(c)` or `Add(c)` (c a constant scalar): into the Conv's weights and bias.
//! 2. `x * Clip(x + 3, 0, 6) / 6`: `x * HardSigmoid(x, 1/6, 1/2)`; ONNX Runtime fuses the
//!    HardSigmoid into the convolution before it.
//! 3. `Mul(c)` or `Add(c)` feeding only 1x1 Convs without padding: into those Convs.
//!
//! Each is exact in real arithmetic; in float32 results move by rounding only. Only the
//! nodes rewritten are encoded again: every other node, weight and field (fields this
//! module does not declare included) is copied through byte for byte, except constants
//! no node reads any more, which are dropped.

use prost::bytes::Buf;
use prost::encoding::{decode_varint, encode_varint};
use prost::Message;
use std::collections::{HashMap, HashSet};

/// Changes whenever a rewrite's output changes, so caches of what was built from a
/// folded graph (TensorRT engines) are not reused across versions.
pub const VERSION: u64 = 1;

/// How many of each rewrite were applied.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Folded {
    pub conv_affine: usize,
    pub hard_swish: usize,
    pub affine_conv: usize,
}

impl Folded {
    pub fn total(&self) -> usize {
        self.conv_affine + self.hard_swish + self.affine_conv
    }
}

impl std::fmt::Display for Folded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} scalar Mul/Add into the Conv before them, {} hard-swish chains, {} scalar Mul/Add into the 1x1 Conv after them",
            self.conv_affine, self.hard_swish, self.affine_conv
        )
    }
}

/// Returns the rewritten model and what was folded, or `None` when nothing applies or the
/// model is of a kind left alone: tensors in external files (they are found relative to
/// the model's path, and the rewritten model is loaded from memory), sparse
/// initializers, subgraphs (If, Loop, Scan: their outer-scope reads are not tracked
/// here), IR versions below 4.
pub fn fold(bytes: &[u8]) -> Result<Option<(Vec<u8>, Folded)>, String> {
    let model = fields(bytes)?;
    let head = ModelHead::decode(bytes).map_err(|e| format!("not a valid ONNX file: {e}"))?;
    // Before IR 4 every initializer must also be a graph input (new ones would not be).
    if head.ir_version < 4 {
        return Ok(None);
    }
    let graphs: Vec<usize> = (0..model.len()).filter(|&i| model[i].number == 7).collect();
    let [gi] = graphs[..] else { return Ok(None) };
    let graph_fields = fields(model[gi].body)?;
    let Some(mut graph) = Graph::parse(&graph_fields)? else { return Ok(None) };
    let folded = graph.rewrite();
    if folded.total() == 0 {
        return Ok(None);
    }
    let graph_bytes = graph.encode(&graph_fields);
    let mut out = Vec::with_capacity(bytes.len());
    for (i, f) in model.iter().enumerate() {
        if i == gi {
            put_len(&mut out, 7, &graph_bytes);
        } else {
            out.extend_from_slice(f.raw);
        }
    }
    Ok(Some((out, folded)))
}

// --- the protobuf wire format, just enough to copy fields through ---

/// One field of a message as it is on the wire.
struct Field<'a> {
    number: u32,
    /// The whole field, key included.
    raw: &'a [u8],
    /// The payload of a length-delimited field (empty for the others).
    body: &'a [u8],
}

fn fields(mut buf: &[u8]) -> Result<Vec<Field<'_>>, String> {
    let bad = |what: &str| format!("not a valid ONNX file: {what}");
    let mut out = Vec::new();
    while !buf.is_empty() {
        let start = buf;
        let key = decode_varint(&mut buf).map_err(|e| bad(&e.to_string()))?;
        let mut body: &[u8] = &[];
        match key & 7 {
            0 => {
                decode_varint(&mut buf).map_err(|e| bad(&e.to_string()))?;
            }
            1 | 5 => {
                let n = if key & 7 == 1 { 8 } else { 4 };
                if buf.len() < n {
                    return Err(bad("truncated field"));
                }
                buf.advance(n);
            }
            2 => {
                let n = decode_varint(&mut buf).map_err(|e| bad(&e.to_string()))? as usize;
                if buf.len() < n {
                    return Err(bad("truncated field"));
                }
                body = &buf[..n];
                buf.advance(n);
            }
            w => return Err(bad(&format!("unsupported wire type {w}"))),
        }
        out.push(Field { number: (key >> 3) as u32, raw: &start[..start.len() - buf.len()], body });
    }
    Ok(out)
}

fn put_len(out: &mut Vec<u8>, number: u32, body: &[u8]) {
    encode_varint(u64::from(number << 3 | 2), out);
    encode_varint(body.len() as u64, out);
    out.extend_from_slice(body);
}

// --- views of the messages: prost skips the fields not declared when reading, and
// leaves default values out when writing the nodes and weights made here ---

#[derive(Clone, PartialEq, Message)]
struct ModelHead {
    #[prost(int64, tag = "1")]
    ir_version: i64,
}

#[derive(Clone, PartialEq, Message)]
struct NodeView {
    #[prost(string, repeated, tag = "1")]
    input: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    output: Vec<String>,
    #[prost(string, tag = "3")]
    name: String,
    #[prost(string, tag = "4")]
    op_type: String,
    #[prost(message, repeated, tag = "5")]
    attribute: Vec<AttrView>,
    #[prost(string, tag = "7")]
    domain: String,
}

#[derive(Clone, PartialEq, Message)]
struct AttrView {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(float, tag = "2")]
    f: f32,
    #[prost(bytes = "vec", tag = "4")]
    s: Vec<u8>,
    #[prost(bytes = "vec", optional, tag = "6")]
    g: Option<Vec<u8>>,
    #[prost(int64, repeated, tag = "8")]
    ints: Vec<i64>,
    #[prost(bytes = "vec", repeated, tag = "11")]
    graphs: Vec<Vec<u8>>,
    /// 1: FLOAT (written for the attributes made here).
    #[prost(int32, tag = "20")]
    r#type: i32,
}

#[derive(Clone, PartialEq, Message)]
struct TensorView {
    #[prost(int64, repeated, tag = "1")]
    dims: Vec<i64>,
    #[prost(int32, tag = "2")]
    data_type: i32,
    #[prost(float, repeated, tag = "4")]
    float_data: Vec<f32>,
    #[prost(string, tag = "8")]
    name: String,
    #[prost(bytes = "vec", tag = "9")]
    raw_data: Vec<u8>,
    /// 1: EXTERNAL.
    #[prost(int32, tag = "14")]
    data_location: i32,
}

/// An initializer's name and where its data is, without copying the data.
#[derive(Clone, PartialEq, Message)]
struct TensorHead {
    #[prost(int64, repeated, tag = "1")]
    dims: Vec<i64>,
    #[prost(string, tag = "8")]
    name: String,
    #[prost(int32, tag = "14")]
    data_location: i32,
}

#[derive(Clone, PartialEq, Message)]
struct ValueName {
    #[prost(string, tag = "1")]
    name: String,
}

const FLOAT: i32 = 1;
const EXTERNAL: i32 = 1;

// --- the graph ---

struct Node<'a> {
    /// The node's bytes in the file; `None` for a node made here.
    raw: Option<&'a [u8]>,
    view: NodeView,
    /// Inputs or outputs changed: those fields are written again, the rest copied.
    edited: bool,
    dead: bool,
}

impl Node<'_> {
    /// A live node of this op in the default domain, with the inputs and the one output
    /// the op has (so the rewrites may index them).
    fn is(&self, op: &str) -> bool {
        let inputs = match op {
            "Conv" => 2..=3,
            "Clip" => 1..=3,
            _ => 2..=2,
        };
        !self.dead
            && self.view.op_type == op
            && (self.view.domain.is_empty() || self.view.domain == "ai.onnx")
            && self.view.output.len() == 1
            && inputs.contains(&self.view.input.len())
    }

    /// Constant has no inputs, so it is not one of [`Node::is`]'s ops.
    fn is_constant(&self) -> bool {
        self.view.op_type == "Constant" && self.view.domain.is_empty() && self.view.output.len() == 1
    }

    fn attr(&self, name: &str) -> Option<&AttrView> {
        self.view.attribute.iter().find(|a| a.name == name)
    }
}

enum Const<'a> {
    /// A TensorProto in the file (an initializer, or a Constant node's `value`).
    Proto(&'a [u8]),
    /// A Constant node's `value_float`.
    Scalar(f32),
    /// Weights made here.
    Made(Vec<i64>, Vec<f32>),
}

struct Graph<'a> {
    nodes: Vec<Node<'a>>,
    consts: HashMap<String, Const<'a>>,
    /// Every value name in the graph, so the new ones are unique.
    names: HashSet<String>,
    outputs: HashSet<String>,
    inputs: HashSet<String>,
    made: Vec<String>,
}

impl<'a> Graph<'a> {
    /// `None` for graphs left alone (see [`fold`]).
    fn parse(graph: &[Field<'a>]) -> Result<Option<Graph<'a>>, String> {
        let bad = |e: prost::DecodeError| format!("not a valid ONNX file: {e}");
        let mut g = Graph {
            nodes: Vec::new(),
            consts: HashMap::new(),
            names: HashSet::new(),
            outputs: HashSet::new(),
            inputs: HashSet::new(),
            made: Vec::new(),
        };
        for f in graph {
            match f.number {
                1 => {
                    let view = NodeView::decode(f.body).map_err(bad)?;
                    if view.attribute.iter().any(|a| a.g.is_some() || !a.graphs.is_empty()) || external_attr(f.body)? {
                        return Ok(None);
                    }
                    g.names.extend(view.output.iter().cloned());
                    g.names.insert(view.name.clone());
                    g.nodes.push(Node { raw: Some(f.body), view, edited: false, dead: false });
                }
                5 => {
                    let head = TensorHead::decode(f.body).map_err(bad)?;
                    if head.data_location == EXTERNAL {
                        return Ok(None);
                    }
                    g.names.insert(head.name.clone());
                    g.consts.insert(head.name, Const::Proto(f.body));
                }
                11 => {
                    g.inputs.insert(ValueName::decode(f.body).map_err(bad)?.name);
                }
                12 => {
                    g.outputs.insert(ValueName::decode(f.body).map_err(bad)?.name);
                }
                15 => return Ok(None),
                _ => {}
            }
        }
        for n in &g.nodes {
            if n.is_constant() {
                let c = match (n.raw.and_then(constant_tensor), n.attr("value_float")) {
                    (Some(t), _) => Const::Proto(t),
                    (None, Some(a)) => Const::Scalar(a.f),
                    _ => continue,
                };
                g.consts.insert(n.view.output[0].clone(), c);
            }
        }
        // An initializer that is also a graph input is only a default: callers may feed it.
        for i in &g.inputs {
            g.consts.remove(i);
        }
        g.names.extend(g.inputs.iter().cloned());
        Ok(Some(g))
    }

    fn rewrite(&mut self) -> Folded {
        let mut folded = Folded::default();
        while self.conv_affine() {
            folded.conv_affine += 1;
        }
        while self.hard_swish() {
            folded.hard_swish += 1;
        }
        while self.affine_conv() {
            folded.affine_conv += 1;
        }
        folded
    }

    /// Which live nodes read each value.
    fn users(&self) -> HashMap<&str, Vec<usize>> {
        let mut users: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, n) in self.nodes.iter().enumerate().filter(|(_, n)| !n.dead) {
            for input in n.view.input.iter().filter(|s| !s.is_empty()) {
                users.entry(input.as_str()).or_default().push(i);
            }
        }
        users
    }

    /// The only reader of `value`, if it has exactly one and is not a graph output.
    fn only_user(&self, users: &HashMap<&str, Vec<usize>>, value: &str) -> Option<usize> {
        match users.get(value).map(Vec::as_slice) {
            Some(&[u]) if !self.outputs.contains(value) => Some(u),
            _ => None,
        }
    }

    fn floats(&self, name: &str) -> Option<(Vec<i64>, Vec<f32>)> {
        let (dims, values) = match self.consts.get(name)? {
            Const::Scalar(v) => (Vec::new(), vec![*v]),
            Const::Made(d, v) => (d.clone(), v.clone()),
            Const::Proto(bytes) => {
                let t = TensorView::decode(*bytes).ok()?;
                if t.data_type != FLOAT || t.data_location == EXTERNAL {
                    return None;
                }
                let values = if t.raw_data.is_empty() {
                    t.float_data
                } else if t.raw_data.len() % 4 != 0 {
                    return None;
                } else {
                    t.raw_data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
                };
                (t.dims, values)
            }
        };
        (elements(&dims)? == values.len()).then_some((dims, values))
    }

    /// A constant's dims, without reading its data.
    fn dims(&self, name: &str) -> Option<Vec<i64>> {
        match self.consts.get(name)? {
            Const::Scalar(_) => Some(Vec::new()),
            Const::Made(d, _) => Some(d.clone()),
            Const::Proto(bytes) => TensorHead::decode(*bytes).ok().map(|t| t.dims),
        }
    }

    /// Whether `value` is the output of a convolution or batch norm (rank >= 2, so a
    /// rank-1 constant cannot raise it).
    fn made_by_conv(&self, value: &str) -> bool {
        self.nodes.iter().any(|n| {
            (n.is("Conv") || n.view.op_type == "BatchNormalization")
                && !n.dead
                && n.view.output.first().is_some_and(|o| o == value)
        })
    }

    /// The value of a one-element float constant of rank at most `max_rank` (a larger
    /// rank would broadcast the other operand up, so removing it would change shapes).
    fn scalar(&self, name: &str, max_rank: usize) -> Option<f32> {
        let dims = self.dims(name)?;
        if dims.len() > max_rank || elements(&dims)? != 1 {
            return None;
        }
        self.floats(name).map(|(_, v)| v[0])
    }

    /// For a binary Mul or Add with one constant scalar operand: (the other operand, the scalar).
    fn scalar_operand(&self, n: &Node, max_rank: usize) -> Option<(String, f32)> {
        let [a, b] = &n.view.input[..] else { return None };
        match (self.scalar(a, max_rank), self.scalar(b, max_rank)) {
            (None, Some(s)) if !self.consts.contains_key(a) => Some((a.clone(), s)),
            (Some(s), None) if !self.consts.contains_key(b) => Some((b.clone(), s)),
            _ => None,
        }
    }

    /// A Conv's constant weights and bias (zeros when it has none).
    fn conv_weights(&self, conv: &Node) -> Option<(Vec<i64>, Vec<f32>, Vec<f32>)> {
        let (dims, w) = self.floats(&conv.view.input[1])?;
        let out_channels = usize::try_from(*dims.first()?).ok()?;
        // Checked against the weights actually there before anything is sized from dims.
        if dims.len() < 3 || w.is_empty() || out_channels == 0 || w.len() % out_channels != 0 {
            return None;
        }
        let bias = match conv.view.input.get(2).filter(|b| !b.is_empty()) {
            Some(b) => self.floats(b)?.1,
            None => vec![0.0; out_channels],
        };
        (bias.len() == out_channels).then_some((dims, w, bias))
    }

    fn unique(&mut self, base: &str) -> String {
        let mut i = self.made.len();
        loop {
            let name = format!("{base}/sluice_fold_{i}");
            if self.names.insert(name.clone()) {
                return name;
            }
            i += 1;
        }
    }

    /// A node made here, named uniquely (ONNX Runtime rejects two nodes of one name).
    fn made_node(&mut self, op: &str, input: Vec<String>, output: String, attribute: Vec<AttrView>) -> Node<'static> {
        let name = self.unique(op);
        Node {
            raw: None,
            view: NodeView { input, output: vec![output], name, op_type: op.into(), attribute, domain: String::new() },
            edited: true,
            dead: false,
        }
    }

    /// Gives `conv` new weights and bias, reading `x`.
    fn set_conv(&mut self, ci: usize, x: String, dims: Vec<i64>, w: Vec<f32>, bias: Vec<f32>) {
        let base = self.nodes[ci].view.output[0].clone();
        let (wn, bn) = (self.unique(&format!("{base}.w")), self.unique(&format!("{base}.b")));
        let bias_dims = vec![dims[0]];
        self.consts.insert(wn.clone(), Const::Made(dims, w));
        self.consts.insert(bn.clone(), Const::Made(bias_dims, bias));
        self.made.extend([wn.clone(), bn.clone()]);
        let conv = &mut self.nodes[ci];
        conv.view.input = vec![x, wn, bn];
        conv.edited = true;
    }

    /// Rewrite 1: `Conv -> Mul(c) | Add(c)`.
    fn conv_affine(&mut self) -> bool {
        let users = self.users();
        for ci in (0..self.nodes.len()).filter(|&i| self.nodes[i].is("Conv")) {
            let conv = &self.nodes[ci];
            let y = &conv.view.output[0];
            let Some(ui) = self.only_user(&users, y) else { continue };
            let user = &self.nodes[ui];
            if !(user.is("Mul") || user.is("Add")) {
                continue;
            }
            // The scalar first (cheap), the weights only for a fold.
            let Some(rank) = self.dims(&conv.view.input[1]).map(|d| d.len()) else { continue };
            let Some((other, s)) = self.scalar_operand(user, rank) else { continue };
            if &other != y {
                continue;
            }
            let Some((dims, mut w, mut bias)) = self.conv_weights(conv) else { continue };
            if user.is("Mul") {
                w.iter_mut().for_each(|v| *v *= s);
                bias.iter_mut().for_each(|v| *v *= s);
            } else {
                bias.iter_mut().for_each(|v| *v += s);
            }
            let x = conv.view.input[0].clone();
            let out = user.view.output[0].clone();
            self.nodes[ui].dead = true;
            self.set_conv(ci, x, dims, w, bias);
            self.nodes[ci].view.output = vec![out];
            return true;
        }
        false
    }

    /// Rewrite 2: `Div(Mul(x, Clip(Add(x, 3), 0, 6)), 6)` -> `Mul(x, HardSigmoid(x))`.
    fn hard_swish(&mut self) -> bool {
        let users = self.users();
        for ai in (0..self.nodes.len()).filter(|&i| self.nodes[i].is("Add")) {
            // x's rank is not known here and a constant of higher rank would broadcast x
            // up: rank 0 always, rank 1 when x comes out of a Conv (rank >= 3).
            let Some((x, _)) = self.scalar_operand(&self.nodes[ai], usize::MAX) else { continue };
            let rank = usize::from(self.made_by_conv(&x));
            let Some((_, 3.0)) = self.scalar_operand(&self.nodes[ai], rank) else { continue };
            let Some(ci) = self.only_user(&users, &self.nodes[ai].view.output[0]) else { continue };
            let clip = &self.nodes[ci];
            if !clip.is("Clip") || clip.view.input[0] != self.nodes[ai].view.output[0] {
                continue;
            }
            // Bounds are inputs since opset 11, attributes before.
            let bound = |i: usize, attr: &str| match clip.view.input.get(i).filter(|s| !s.is_empty()) {
                Some(name) => self.scalar(name, rank),
                None => clip.attr(attr).map(|a| a.f),
            };
            if bound(1, "min") != Some(0.0) || bound(2, "max") != Some(6.0) {
                continue;
            }
            let Some(mi) = self.only_user(&users, &clip.view.output[0]) else { continue };
            let mul = &self.nodes[mi];
            let mut operands = mul.view.input.clone();
            operands.sort();
            let mut expected = vec![x.clone(), clip.view.output[0].clone()];
            expected.sort();
            if !mul.is("Mul") || operands != expected {
                continue;
            }
            let Some(di) = self.only_user(&users, &mul.view.output[0]) else { continue };
            let div = &self.nodes[di];
            if !div.is("Div") || div.view.input[0] != mul.view.output[0] {
                continue;
            }
            if self.scalar(&div.view.input[1], rank) != Some(6.0) {
                continue;
            }
            let out = div.view.output[0].clone();
            let hs = self.unique(&format!("{out}.hardsigmoid"));
            // The Add and Clip slots take the two new nodes: they come before every reader
            // of the Div's output, so the order stays topological.
            self.nodes[ai] = self.made_node(
                "HardSigmoid",
                vec![x.clone()],
                hs.clone(),
                vec![
                    AttrView { name: "alpha".into(), f: 1.0 / 6.0, r#type: FLOAT, ..Default::default() },
                    AttrView { name: "beta".into(), f: 0.5, r#type: FLOAT, ..Default::default() },
                ],
            );
            self.nodes[ci] = self.made_node("Mul", vec![x, hs], out, Vec::new());
            self.nodes[mi].dead = true;
            self.nodes[di].dead = true;
            return true;
        }
        false
    }

    /// Rewrite 3: `Mul(x, c) | Add(x, c)` read only by 1x1 Convs without padding.
    fn affine_conv(&mut self) -> bool {
        let users = self.users();
        for ni in (0..self.nodes.len()).filter(|&i| self.nodes[i].is("Mul") || self.nodes[i].is("Add")) {
            let n = &self.nodes[ni];
            let y = &n.view.output[0];
            let Some(readers) = users.get(y.as_str()).filter(|_| !self.outputs.contains(y)) else { continue };
            // Shapes first (cheap), the weights only for a fold.
            let plain_1x1 = |ci: usize| {
                let c = &self.nodes[ci];
                let plain = c.is("Conv")
                    && c.view.input[0] == *y
                    && !c.view.input[1..].contains(y)
                    && c.attr("pads").is_none_or(|a| a.ints.iter().all(|&p| p == 0))
                    && c.attr("auto_pad").is_none_or(|a| a.s == b"NOTSET" || a.s == b"VALID");
                if !plain {
                    return None;
                }
                let dims = self.dims(&c.view.input[1])?;
                (dims.len() >= 3 && dims[2..].iter().all(|&k| k == 1)).then_some(dims.len())
            };
            let Some(ranks) = readers.iter().map(|&ci| plain_1x1(ci)).collect::<Option<Vec<usize>>>() else { continue };
            // Below the Convs' input rank: a constant of that rank could broadcast x up to it.
            let rank = ranks.iter().min().copied().unwrap_or(0);
            let Some((x, s)) = self.scalar_operand(n, rank.saturating_sub(1)) else { continue };
            let convs: Option<Vec<_>> =
                readers.iter().map(|&ci| self.conv_weights(&self.nodes[ci]).map(|(d, w, b)| (ci, d, w, b))).collect();
            let Some(convs) = convs else { continue };
            let mul = n.is("Mul");
            for (ci, dims, mut w, mut bias) in convs {
                if mul {
                    w.iter_mut().for_each(|v| *v *= s);
                } else {
                    // Each output channel adds s times the sum of its weights.
                    let per_out = w.len() / bias.len();
                    for (b, row) in bias.iter_mut().zip(w.chunks_exact(per_out)) {
                        *b += s * row.iter().sum::<f32>();
                    }
                }
                self.set_conv(ci, x.clone(), dims, w, bias);
            }
            self.nodes[ni].dead = true;
            return true;
        }
        false
    }

    /// The graph's fields with the rewritten nodes, unused constants dropped and the new
    /// weights appended.
    fn encode(&self, graph: &[Field]) -> Vec<u8> {
        let used: HashSet<&str> =
            self.nodes.iter().filter(|n| !n.dead).flat_map(|n| n.view.input.iter().map(String::as_str)).collect();
        // Graph inputs stay: an initializer listed there is the input's default value.
        let keep = |name: &str| used.contains(name) || self.outputs.contains(name) || self.inputs.contains(name);
        let mut out = Vec::new();
        let mut nodes = self.nodes.iter();
        for f in graph {
            match f.number {
                1 => {
                    let n = nodes.next().expect("one node per node field");
                    if n.dead || (n.is_constant() && !keep(&n.view.output[0])) {
                        continue;
                    }
                    match n.raw {
                        None => put_len(&mut out, 1, &n.view.encode_to_vec()),
                        Some(raw) if n.edited => put_len(&mut out, 1, &edited_node(raw, &n.view)),
                        Some(_) => out.extend_from_slice(f.raw),
                    }
                }
                // Initializers decoded in `parse`.
                5 => {
                    if TensorHead::decode(f.body).is_ok_and(|h| keep(&h.name)) {
                        out.extend_from_slice(f.raw);
                    }
                }
                _ => out.extend_from_slice(f.raw),
            }
        }
        for name in self.made.iter().filter(|n| keep(n)) {
            let Some(Const::Made(dims, values)) = self.consts.get(name) else { continue };
            let t = TensorView {
                dims: dims.clone(),
                data_type: FLOAT,
                name: name.clone(),
                raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                ..Default::default()
            };
            put_len(&mut out, 5, &t.encode_to_vec());
        }
        out
    }
}

/// Elements of a tensor of these dims; `None` for negative dims or an overflow.
fn elements(dims: &[i64]) -> Option<usize> {
    dims.iter().try_fold(1usize, |n, &d| n.checked_mul(usize::try_from(d).ok()?))
}

/// Whether a node's attributes hold a tensor stored in an external file.
fn external_attr(node: &[u8]) -> Result<bool, String> {
    for attr in fields(node)?.into_iter().filter(|f| f.number == 5) {
        for t in fields(attr.body)?.into_iter().filter(|f| f.number == 5 || f.number == 10) {
            if TensorHead::decode(t.body).is_ok_and(|h| h.data_location == EXTERNAL) {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// A node's bytes with its inputs and outputs replaced and every other field kept.
fn edited_node(raw: &[u8], view: &NodeView) -> Vec<u8> {
    let mut out =
        NodeView { input: view.input.clone(), output: view.output.clone(), ..Default::default() }.encode_to_vec();
    for f in fields(raw).expect("parsed before") {
        if f.number != 1 && f.number != 2 {
            out.extend_from_slice(f.raw);
        }
    }
    out
}

/// A Constant node's `value` tensor, as bytes in the file.
fn constant_tensor(node: &[u8]) -> Option<&[u8]> {
    let attrs = fields(node).ok()?.into_iter().filter(|f| f.number == 5);
    attrs.map(|a| fields(a.body).ok()).find_map(|attr| {
        let attr = attr?;
        attr.iter().any(|f| f.number == 1 && f.body == b"value").then_some(())?;
        attr.iter().find(|f| f.number == 5).map(|f| f.body)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[derive(Clone, PartialEq, Message)]
    struct ModelT {
        #[prost(int64, tag = "1")]
        ir_version: i64,
        #[prost(message, optional, tag = "7")]
        graph: Option<GraphT>,
        #[prost(message, repeated, tag = "8")]
        opset_import: Vec<OpsetT>,
        #[prost(message, repeated, tag = "14")]
        metadata_props: Vec<EntryT>,
    }
    #[derive(Clone, PartialEq, Message)]
    struct OpsetT {
        #[prost(string, tag = "1")]
        domain: String,
        #[prost(int64, tag = "2")]
        version: i64,
    }
    #[derive(Clone, PartialEq, Message)]
    struct EntryT {
        #[prost(string, tag = "1")]
        key: String,
        #[prost(string, tag = "2")]
        value: String,
    }
    #[derive(Clone, PartialEq, Message)]
    struct GraphT {
        #[prost(message, repeated, tag = "1")]
        node: Vec<NodeT>,
        #[prost(message, repeated, tag = "5")]
        initializer: Vec<TensorT>,
        #[prost(message, repeated, tag = "11")]
        input: Vec<ValueName>,
        #[prost(message, repeated, tag = "12")]
        output: Vec<ValueName>,
    }
    #[derive(Clone, PartialEq, Message)]
    struct NodeT {
        #[prost(string, repeated, tag = "1")]
        input: Vec<String>,
        #[prost(string, repeated, tag = "2")]
        output: Vec<String>,
        #[prost(string, tag = "3")]
        name: String,
        #[prost(string, tag = "4")]
        op_type: String,
        #[prost(message, repeated, tag = "5")]
        attribute: Vec<AttrT>,
        /// A field the rewrite does not know: must survive an edit.
        #[prost(string, tag = "6")]
        doc_string: String,
    }
    #[derive(Clone, PartialEq, Message)]
    struct AttrT {
        #[prost(string, tag = "1")]
        name: String,
        #[prost(float, tag = "2")]
        f: f32,
        #[prost(int64, tag = "3")]
        i: i64,
        #[prost(message, optional, tag = "5")]
        t: Option<TensorT>,
        /// A subgraph (its contents do not matter here).
        #[prost(bytes = "vec", optional, tag = "6")]
        g: Option<Vec<u8>>,
        #[prost(int64, repeated, tag = "8")]
        ints: Vec<i64>,
        #[prost(int32, tag = "20")]
        r#type: i32,
    }
    #[derive(Clone, PartialEq, Message)]
    struct TensorT {
        #[prost(int64, repeated, tag = "1")]
        dims: Vec<i64>,
        #[prost(int32, tag = "2")]
        data_type: i32,
        #[prost(string, tag = "8")]
        name: String,
        #[prost(bytes = "vec", tag = "9")]
        raw_data: Vec<u8>,
        #[prost(int32, tag = "14")]
        data_location: i32,
    }

    fn node(op: &str, input: &[&str], output: &str) -> NodeT {
        NodeT {
            input: input.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            // Named like their output, as some exporters do.
            name: output.into(),
            op_type: op.into(),
            doc_string: format!("doc of {output}"),
            ..Default::default()
        }
    }

    fn tensor(name: &str, dims: &[i64], v: &[f32]) -> TensorT {
        TensorT {
            dims: dims.to_vec(),
            data_type: FLOAT,
            name: name.into(),
            raw_data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            data_location: 0,
        }
    }

    fn attr(name: &str) -> AttrT {
        AttrT { name: name.into(), ..Default::default() }
    }

    fn name(n: &str) -> ValueName {
        ValueName { name: n.into() }
    }

    /// x -> Conv A -> *0.5 -> +0.25 -> hard-swish -> *1.5 -> -0.2 -> 1x1 Conv B -> y, on 2 channels.
    fn chain(b_pads: &[i64]) -> ModelT {
        let mut conv_b = node("Conv", &["hs_lab", "wb", "bb"], "y");
        if !b_pads.is_empty() {
            conv_b.attribute.push(AttrT {
                name: "pads".into(),
                ints: b_pads.to_vec(),
                r#type: 7,
                ..Default::default()
            });
        }
        let graph = GraphT {
            node: vec![
                node("Conv", &["x", "wa", "ba"], "a"),
                node("Mul", &["a", "half"], "a_mul"),
                node("Add", &["quarter", "a_mul"], "a_lab"),
                node("Add", &["a_lab", "three"], "p3"),
                node("Clip", &["p3", "zero", "six"], "c"),
                node("Mul", &["c", "a_lab"], "m"),
                node("Div", &["m", "six"], "hs"),
                node("Mul", &["hs", "one_half"], "hs_mul"),
                node("Add", &["hs_mul", "minus"], "hs_lab"),
                conv_b,
            ],
            initializer: vec![
                tensor("wa", &[2, 2, 1, 1], &[1.0, -2.0, 0.5, 3.0]),
                tensor("ba", &[2], &[0.1, -0.3]),
                tensor("wb", &[2, 2, 1, 1], &[0.7, 0.2, -1.1, 0.4]),
                tensor("bb", &[2], &[0.05, 0.0]),
                tensor("half", &[], &[0.5]),
                tensor("quarter", &[1], &[0.25]),
                tensor("three", &[], &[3.0]),
                tensor("zero", &[], &[0.0]),
                tensor("six", &[], &[6.0]),
                tensor("one_half", &[], &[1.5]),
                tensor("minus", &[], &[-0.2]),
            ],
            input: vec![name("x")],
            output: vec![name("y")],
        };
        ModelT {
            ir_version: 8,
            graph: Some(graph),
            opset_import: vec![OpsetT { domain: String::new(), version: 13 }],
            metadata_props: vec![EntryT { key: "character".into(), value: "abc".into() }],
        }
    }

    /// Runs a graph of 1x1 Convs and elementwise ops on one pixel's channels.
    fn eval(model: &ModelT, x: &[f32]) -> Vec<f32> {
        let g = model.graph.as_ref().unwrap();
        let mut v: HashMap<String, Vec<f32>> = g
            .initializer
            .iter()
            .map(|t| {
                (t.name.clone(), t.raw_data.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())
            })
            .collect();
        v.insert("x".into(), x.to_vec());
        let zip = |a: &[f32], b: &[f32], f: fn(f32, f32) -> f32| -> Vec<f32> {
            let n = a.len().max(b.len());
            (0..n).map(|i| f(a[i % a.len()], b[i % b.len()])).collect()
        };
        for n in &g.node {
            let i = |k: usize| v[&n.input[k]].clone();
            let get = |name: &str| n.attribute.iter().find(|a| a.name == name);
            let attr = |name: &str| get(name).unwrap().f;
            let out = match n.op_type.as_str() {
                "Constant" => vec![get("value_float").unwrap().f],
                "Conv" => {
                    // 1x1: per pixel, each output channel reads its group's input channels.
                    let (x, w) = (i(0), i(1));
                    let groups = get("group").map_or(1, |a| a.i as usize);
                    let per_group = x.len() / groups;
                    let out = w.len() / per_group;
                    let b = if n.input.len() > 2 { i(2) } else { vec![0.0; out] };
                    (0..out)
                        .map(|m| {
                            let first = m / (out / groups) * per_group;
                            b[m] + (0..per_group).map(|c| w[m * per_group + c] * x[first + c]).sum::<f32>()
                        })
                        .collect()
                }
                "Mul" => zip(&i(0), &i(1), |a, b| a * b),
                "Add" => zip(&i(0), &i(1), |a, b| a + b),
                "Div" => zip(&i(0), &i(1), |a, b| a / b),
                "Clip" if n.input.len() == 1 => i(0).iter().map(|a| a.clamp(attr("min"), attr("max"))).collect(),
                "Clip" => i(0).iter().map(|a| a.clamp(i(1)[0], i(2)[0])).collect(),
                "HardSigmoid" => i(0).iter().map(|a| (attr("alpha") * a + attr("beta")).clamp(0.0, 1.0)).collect(),
                op => panic!("{op}"),
            };
            v.insert(n.output[0].clone(), out);
        }
        v.remove(&g.output[0].name).unwrap()
    }

    fn run(model: &ModelT) -> (ModelT, Folded) {
        let (bytes, what) = fold(&model.encode_to_vec()).unwrap().expect("something folds");
        (ModelT::decode(bytes.as_slice()).unwrap(), what)
    }

    fn ops(model: &ModelT) -> Vec<&str> {
        model.graph.as_ref().unwrap().node.iter().map(|n| n.op_type.as_str()).collect()
    }

    #[test]
    fn affine_blocks_and_hard_swish_fold_to_the_same_function() {
        let model = chain(&[]);
        let (folded, what) = run(&model);
        assert_eq!(what, Folded { conv_affine: 2, hard_swish: 1, affine_conv: 2 });
        assert_eq!(ops(&folded), ["Conv", "HardSigmoid", "Mul", "Conv"]);
        for x in [[0.3, -1.2], [4.0, 2.5], [-3.0, 0.0], [0.9, 0.8]] {
            let (a, b) = (eval(&model, &x), eval(&folded, &x));
            for (a, b) in a.iter().zip(&b) {
                assert!((a - b).abs() < 1e-5, "{x:?}: {a} vs {b}");
            }
        }
        // Untouched fields come through: the model's metadata, an edited node's doc string.
        assert_eq!(folded.metadata_props, model.metadata_props);
        assert_eq!(folded.graph.as_ref().unwrap().node[3].doc_string, "doc of y");
        // The weights the rewrites replaced are gone; the ones still used are not.
        let inits: Vec<String> = folded.graph.unwrap().initializer.into_iter().map(|t| t.name).collect();
        assert!(!inits.iter().any(|n| n == "wa" || n == "half" || n == "six"), "{inits:?}");
        assert_eq!(inits.len(), 4, "{inits:?}");
    }

    #[test]
    fn a_padded_conv_keeps_the_affine_before_it() {
        // Padding is zeros, not the shifted value: an Add cannot move into the weights.
        let (folded, what) = run(&chain(&[1, 1, 1, 1]));
        assert_eq!(what, Folded { conv_affine: 2, hard_swish: 1, affine_conv: 0 });
        assert_eq!(ops(&folded), ["Conv", "HardSigmoid", "Mul", "Mul", "Add", "Conv"]);
    }

    #[test]
    fn values_read_elsewhere_are_not_folded_away() {
        // The conv's output also a graph output, the hard-swish's inner value read twice.
        let mut model = chain(&[1, 1, 1, 1]);
        let g = model.graph.as_mut().unwrap();
        g.output.push(name("a"));
        g.node.push(node("Mul", &["c", "c"], "c2"));
        g.output.push(name("c2"));
        assert!(fold(&model.encode_to_vec()).unwrap().is_none());
        // A scalar that is also a graph input may be fed by the caller: not a constant.
        let mut model = chain(&[1, 1, 1, 1]);
        model.graph.as_mut().unwrap().input.push(name("half"));
        let (folded, what) = run(&model);
        assert_eq!(what, Folded { conv_affine: 0, hard_swish: 1, affine_conv: 0 });
        let g = folded.graph.unwrap();
        assert!(g.initializer.iter().any(|t| t.name == "half"));
        // Unused, an input's initializer stays too; an unused plain one goes.
        let mut model = chain(&[]);
        let g = model.graph.as_mut().unwrap();
        g.initializer.push(tensor("spare", &[], &[1.0]));
        g.initializer.push(tensor("default", &[], &[1.0]));
        g.input.push(name("default"));
        let names: Vec<String> = run(&model).0.graph.unwrap().initializer.into_iter().map(|t| t.name).collect();
        assert!(names.contains(&"default".to_string()) && !names.contains(&"spare".to_string()), "{names:?}");
    }

    #[test]
    fn models_left_alone() {
        let mut old = chain(&[]);
        old.ir_version = 3;
        assert!(fold(&old.encode_to_vec()).unwrap().is_none());
        assert!(fold(b"\xff\xff\xff garbage").is_err());
        let mut plain = chain(&[]);
        plain.graph.as_mut().unwrap().node.truncate(1);
        plain.graph.as_mut().unwrap().output = vec![name("a")];
        assert!(fold(&plain.encode_to_vec()).unwrap().is_none());
    }

    fn same_function(a: &ModelT, b: &ModelT, channels: usize) {
        for k in 0..6 {
            let x: Vec<f32> = (0..channels).map(|c| (k as f32 - 2.5) * 1.7 + c as f32 * 0.6).collect();
            for (p, q) in eval(a, &x).iter().zip(&eval(b, &x)) {
                assert!((p - q).abs() < 1e-5, "{x:?}: {p} vs {q}");
            }
        }
    }

    #[test]
    fn older_and_other_forms_fold_too() {
        // Clip's bounds as attributes (opset < 11), the Mul's scalar from a Constant
        // node's value_float, and a grouped 1x1 Conv without bias after the affine block.
        let mut model = chain(&[]);
        let g = model.graph.as_mut().unwrap();
        g.node[4] = NodeT {
            attribute: vec![AttrT { f: 0.0, ..attr("min") }, AttrT { f: 6.0, ..attr("max") }],
            ..node("Clip", &["p3"], "c")
        };
        g.node.insert(
            0,
            NodeT {
                attribute: vec![AttrT { f: 0.5, r#type: 1, ..attr("value_float") }],
                ..node("Constant", &[], "half")
            },
        );
        g.initializer.retain(|t| t.name != "half" && t.name != "bb");
        let conv_b = g.node.last_mut().unwrap();
        conv_b.input.truncate(2);
        conv_b.attribute.push(AttrT { i: 2, r#type: 2, ..attr("group") });
        g.initializer.iter_mut().find(|t| t.name == "wb").unwrap().dims = vec![2, 1, 1, 1];
        g.initializer.iter_mut().find(|t| t.name == "wb").unwrap().raw_data.truncate(8);
        let (folded, what) = run(&model);
        assert_eq!(what, Folded { conv_affine: 2, hard_swish: 1, affine_conv: 2 });
        assert_eq!(ops(&folded), ["Conv", "HardSigmoid", "Mul", "Conv"]);
        same_function(&model, &folded, 2);
    }

    #[test]
    fn malformed_but_decodable_graphs_do_not_panic() {
        // Nodes without outputs or with missing inputs, weights of no elements or of the
        // wrong count, absurd dims: nothing folds there, and nothing panics.
        let mut model = chain(&[]);
        let g = model.graph.as_mut().unwrap();
        g.node.push(NodeT { output: vec![], ..node("Mul", &["x", "half"], "unused") });
        g.node.push(node("Conv", &["x"], "lonely"));
        g.node.push(node("Add", &["x"], "half_add"));
        g.node.push(node("Conv", &["x", "empty"], "e"));
        g.node.push(node("Mul", &["e", "half"], "e2"));
        g.node.push(node("Conv", &["x", "short"], "sh"));
        g.node.push(node("Mul", &["sh", "half"], "sh2"));
        g.node.push(node("Conv", &["x", "huge"], "hu"));
        g.node.push(node("Mul", &["hu", "half"], "hu2"));
        g.initializer.push(tensor("empty", &[0, 2, 1, 1], &[]));
        g.initializer.push(tensor("short", &[2, 2, 1, 1], &[1.0, 2.0, 3.0]));
        g.initializer.push(tensor("huge", &[1 << 40, 1 << 40, 1 << 40, 1], &[1.0]));
        g.output.extend(["e2", "sh2", "hu2", "lonely", "half_add"].map(name));
        let (_, what) = run(&model);
        assert_eq!(what, Folded { conv_affine: 2, hard_swish: 1, affine_conv: 2 });
    }

    #[test]
    fn external_data_and_subgraphs_are_left_alone() {
        let mut model = chain(&[]);
        model.graph.as_mut().unwrap().initializer[0].data_location = EXTERNAL;
        assert!(fold(&model.encode_to_vec()).unwrap().is_none());
        // In a Constant node (exporters keep weights there too).
        let mut model = chain(&[]);
        let mut t = tensor("k", &[], &[1.0]);
        t.data_location = EXTERNAL;
        let constant =
            NodeT { attribute: vec![AttrT { t: Some(t), r#type: 4, ..attr("value") }], ..node("Constant", &[], "k") };
        model.graph.as_mut().unwrap().node.insert(0, constant);
        assert!(fold(&model.encode_to_vec()).unwrap().is_none());
        let mut model = chain(&[]);
        let branch = NodeT {
            attribute: vec![AttrT { g: Some(vec![]), r#type: 5, ..attr("then_branch") }],
            ..node("If", &["x"], "z")
        };
        model.graph.as_mut().unwrap().node.push(branch);
        assert!(fold(&model.encode_to_vec()).unwrap().is_none());
    }

    #[test]
    fn constants_that_could_broadcast_are_not_folded() {
        // A [1,1,1,1] scalar before a 1x1 Conv could be what makes the Conv's input 4-D.
        let mut model = chain(&[]);
        let g = model.graph.as_mut().unwrap();
        g.initializer.retain(|t| t.name != "minus" && t.name != "one_half");
        g.initializer.push(tensor("minus", &[1, 1, 1, 1], &[-0.2]));
        g.initializer.push(tensor("one_half", &[1, 1, 1, 1], &[1.5]));
        let (_, what) = run(&model);
        assert_eq!(what, Folded { conv_affine: 2, hard_swish: 1, affine_conv: 0 });
        // A [1]-shaped 3 on a value not known to have rank >= 1: no hard-swish rewrite.
        let mut model = chain(&[]);
        let g = model.graph.as_mut().unwrap();
        g.initializer.retain(|t| t.name != "three");
        g.initializer.push(tensor("three", &[1], &[3.0]));
        g.node.insert(0, node("Relu", &["x"], "r"));
        for n in g.node.iter_mut().filter(|n| n.output[0] != "r") {
            n.input.iter_mut().filter(|i| *i == "a_lab").for_each(|i| *i = "r".into());
        }
        let (folded, what) = run(&model);
        assert_eq!(what.hard_swish, 0, "{what:?}");
        assert!(ops(&folded).contains(&"Clip"));
        // The same [1]-shaped 3 after a Conv is fine.
        let mut model = chain(&[]);
        let g = model.graph.as_mut().unwrap();
        g.initializer.retain(|t| t.name != "three");
        g.initializer.push(tensor("three", &[1], &[3.0]));
        assert_eq!(run(&model).1.hard_swish, 1);
    }

    #[test]
    fn made_nodes_have_names_of_their_own() {
        // Node names need not match outputs: here the last Conv is named like the value a
        // made Mul will write.
        let mut model = chain(&[]);
        model.graph.as_mut().unwrap().node.last_mut().unwrap().name = "hs".into();
        let (folded, _) = run(&model);
        let names: Vec<&str> = folded.graph.as_ref().unwrap().node.iter().map(|n| n.name.as_str()).collect();
        let unique: HashSet<&str> = names.iter().copied().collect();
        assert!(names.iter().all(|n| !n.is_empty()), "{names:?}");
        assert_eq!(unique.len(), names.len(), "{names:?}");
    }
}
