//! ndarray in and out, over TLS when the address is https://: sends a batch of random
//! images to an FP32 image model (e.g. `resnet50`, input [n, 3, 224, 224]) and prints
//! each row's top class.
//!
//!     cargo run -p sluice-client --example arrays -- http://127.0.0.1:8001 resnet50
//!     SLUICE_TLS_CA=ca.pem cargo run -p sluice-client --example arrays -- https://localhost:8001 resnet50

use ndarray::{Array4, Axis};
use sluice_client::array::{ArrayExt, TensorExt};
use sluice_client::{Client, ConnectOptions, InferOptions, TlsOptions};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: arrays URL MODEL";
    let (url, model) = (args.next().ok_or(usage)?, args.next().ok_or(usage)?);
    let tls = match std::env::var_os("SLUICE_TLS_CA") {
        Some(ca) => Some(TlsOptions { ca_pem: Some(std::fs::read(ca)?), ..Default::default() }),
        None => None,
    };
    let client = Client::connect_with(url, ConnectOptions { tls, ..Default::default() }).await?;
    let input = client.model_metadata(&model).await?.inputs.first().ok_or("model has no inputs")?.name.clone();

    // Four images: a deterministic pseudo-random pattern, scaled to [0, 1).
    let images = Array4::from_shape_fn((4, 3, 224, 224), |(n, c, y, x)| {
        ((n * 7919 + c * 104729 + y * 224 + x) as u32).wrapping_mul(2654435761) as f32 / u32::MAX as f32
    });
    let out = client.infer(&model, &[(&input, &images.to_tensor())], InferOptions::default()).await?;
    let (name, logits) = &out[0];
    let logits = logits.to_array::<f32>()?;
    for (i, row) in logits.axis_iter(Axis(0)).enumerate() {
        let (best, score) = row.iter().enumerate().fold((0, f32::MIN), |b, (k, &v)| if v > b.1 { (k, v) } else { b });
        println!("image {i}: {name} top class {best} ({score:.3})");
    }
    Ok(())
}
