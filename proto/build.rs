//! Compiles the .proto files with protox (pure Rust), so building sluice needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["grpc_service.proto", "model_config.proto"];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Tensor payloads are the bulk of every message: keep them as `Bytes` so that
        // decoding a request slices the receive buffer instead of copying each tensor.
        .bytes(".inference.ModelInferRequest.raw_input_contents")
        .bytes(".inference.ModelInferResponse.raw_output_contents")
        .compile_fds(fds)?;
    Ok(())
}
