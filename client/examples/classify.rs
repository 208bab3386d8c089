//! Classify image files with a running sluice server's `classify` pipeline.
//!
//!     cargo run -p sluice-client --example classify -- http://127.0.0.1:8001 cat.jpg dog.png

use sluice_client::{encoded_images, Client, InferOptions};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args.next().ok_or("usage: classify URL IMAGE...")?;
    let files: Vec<String> = args.collect();
    let images = files.iter().map(std::fs::read).collect::<Result<Vec<_>, _>>()?;
    let client = Client::connect(url).await?;
    // One request carries every image; outputs come back per image, in order.
    let out = client.infer("classify", &[("image", &encoded_images(&images))], InferOptions::default()).await?;
    let get = |name: &str| out.iter().find(|(n, _)| n == name).map(|(_, t)| t).ok_or(format!("no output {name}"));
    let classes = get("classes")?.to_i64().ok_or("classes are not INT64")?;
    let scores = get("scores")?.to_f32().ok_or("scores are not FP32")?;
    for (i, file) in files.iter().enumerate() {
        let top: Vec<String> = (0..5).map(|k| format!("{}:{:.3}", classes[i * 5 + k], scores[i * 5 + k])).collect();
        println!("{file}: {}", top.join(" "));
    }
    Ok(())
}
