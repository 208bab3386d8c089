//! Metadata, a tensor inference with a deadline, and statistics, against any v2 server.
//!
//!     cargo run -p sluice-client --example tensors -- http://127.0.0.1:8001 resnet50

use sluice_client::{Client, ClientError, InferOptions, Tensor};
use std::time::Duration;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (url, model) = (args.next().ok_or("usage: tensors URL MODEL")?, args.next().ok_or("usage: tensors URL MODEL")?);
    let client = Client::connect(url).await?;
    let md = client.model_metadata(&model).await?;
    // Zero-filled inputs shaped as the metadata says, with 1 for every variable dimension.
    let inputs: Vec<(String, Tensor)> = md
        .inputs
        .iter()
        .map(|i| {
            let shape: Vec<usize> = i.shape.iter().map(|&d| if d < 0 { 1 } else { d as usize }).collect();
            let n: usize = shape.iter().product();
            (i.name.clone(), Tensor::from_f32(shape, &vec![0.0; n]))
        })
        .collect();
    let named: Vec<(&str, &Tensor)> = inputs.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let opts = InferOptions { timeout: Some(Duration::from_secs(5)), ..Default::default() };
    match client.infer(&model, &named, opts).await {
        Ok(out) => out.iter().for_each(|(name, t)| println!("{name}: {} {:?}", t.dtype, t.shape)),
        // Errors carry the server's gRPC status: INVALID_ARGUMENT names the bad input.
        Err(ClientError::Status(s)) => println!("the server said {:?}: {}", s.code(), s.message()),
        Err(e) => return Err(e.into()),
    }
    let stats = client.model_statistics(&model).await?;
    println!("{model}: {} inferences, {} executions", stats[0].inference_count, stats[0].execution_count);
    Ok(())
}
