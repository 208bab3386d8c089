//! Helpers shared by the reference tests of sluice-ops and of sluice-opencv (which
//! includes this file): the fixtures of scripts/gen_op_fixtures.py, and ops run by name.
#![allow(dead_code)]

use sluice_ops::image_ops::decode_image;
use sluice_ops::op::{BuildContext, OpRegistry};
use sluice_ops::{Image, Value};
use std::path::Path;
use std::sync::Arc;

pub fn fixture(name: &str) -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/tests/fixtures").join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

pub fn decode(name: &str) -> Image {
    decode_image(&fixture(name), 1 << 24).unwrap()
}

/// Largest and mean absolute difference between two 8-bit buffers.
pub fn diff(a: &[u8], b: &[u8]) -> (u8, f64) {
    assert_eq!(a.len(), b.len(), "sizes differ");
    let d: Vec<u8> = a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).collect();
    (*d.iter().max().unwrap(), d.iter().map(|&x| x as f64).sum::<f64>() / d.len() as f64)
}

/// quad.json: the crop's expected size, and the quad's corners as x, y pairs.
pub fn quad_fixture() -> (serde_json::Value, Vec<f32>) {
    let spec: serde_json::Value = serde_json::from_slice(&fixture("quad.json")).unwrap();
    let q = spec["quad"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| [p[0].as_f64().unwrap() as f32, p[1].as_f64().unwrap() as f32])
        .collect();
    (spec, q)
}

pub fn run_op(name: &str, params: serde_json::Value, inputs: &[Value]) -> Vec<Value> {
    OpRegistry::builtin().build(name, &BuildContext::new(params, Path::new("."))).unwrap().run(inputs).unwrap()
}

pub fn image_out(v: &[Value]) -> Arc<Image> {
    v[0].as_image().unwrap().clone()
}
