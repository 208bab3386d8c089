//! Commands that talk to a running server (sluice or any v2 server) over gRPC: `models`,
//! `reload`, `infer`, `ocr`.

use anyhow::{bail, Context};
use std::path::PathBuf;
use std::time::Duration;

/// Where a client command finds the server, and how it authenticates it.
#[derive(clap::Args)]
pub struct ConnArgs {
    /// The server's gRPC address (https://... for TLS).
    #[arg(long, env = "SLUICE_URL", default_value = "http://127.0.0.1:8001")]
    url: String,
    /// CA certificates (PEM) to trust for the server's certificate (default: the system's).
    #[arg(long, env = "SLUICE_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// The name the server's certificate must carry (default: the URL's host).
    #[arg(long, env = "SLUICE_TLS_DOMAIN")]
    tls_domain: Option<String>,
    /// Client certificate (PEM) for servers that require one; needs --tls-key.
    #[arg(long, env = "SLUICE_CLIENT_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "SLUICE_CLIENT_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct ReloadArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Unload the named models or pipelines instead of loading them.
    #[arg(long)]
    unload: bool,
    /// Models or pipelines to load again (even if unchanged); none: reload the whole
    /// repository, loading only what changed.
    names: Vec<String>,
}

#[derive(clap::Args)]
pub struct ModelsArgs {
    #[command(flatten)]
    conn: ConnArgs,
}

#[derive(clap::Args)]
pub struct InferArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// The model or pipeline.
    model: String,
    /// Image files, sent as one BYTES input [n, 1] (a pipeline's encoded images).
    #[arg(long = "image")]
    images: Vec<PathBuf>,
    /// The input the images go to (default: the model's only BYTES input).
    #[arg(long)]
    image_input: Option<String>,
    /// A tensor input: NAME=FILE, the file holding v2 JSON: {"datatype", "shape", "data"}.
    #[arg(long = "input", value_parser = parse_named_file)]
    inputs: Vec<(String, PathBuf)>,
    /// Deadline in milliseconds.
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// A request parameter, NAME=VALUE (true/false, an integer, a number or else a
    /// string; in double quotes always a string, e.g. 'code="7"'): a pipeline reads
    /// those it declares under `parameters:`.
    #[arg(long = "param", value_parser = parse_param)]
    params: Vec<(String, sluice_client::Parameter)>,
}

pub fn parse_param(s: &str) -> Result<(String, sluice_client::Parameter), String> {
    let (name, value) = s.split_once('=').ok_or_else(|| format!("'{s}': expected NAME=VALUE"))?;
    Ok((name.to_string(), sluice_client::Parameter::parse(value)))
}

pub fn parse_named_file(s: &str) -> Result<(String, PathBuf), String> {
    let (name, file) = s.split_once('=').ok_or_else(|| format!("'{s}': expected NAME=FILE"))?;
    Ok((name.to_string(), PathBuf::from(file)))
}

#[derive(clap::Args)]
pub struct OcrArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// The pipeline to call (it takes `image` and gives `boxes`, `texts`, `scores`).
    #[arg(long, default_value = "ocr")]
    pipeline: String,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Image files (JPEG or PNG).
    #[arg(required = true)]
    images: Vec<PathBuf>,
}

/// One recognised line.
struct Line {
    text: String,
    score: f32,
    corners: Vec<(f32, f32)>,
}

pub fn ocr(args: OcrArgs) -> anyhow::Result<()> {
    use sluice_client::{encoded_images, InferOptions};
    let results = client_runtime()?.block_on(async {
        let client = connect(&args.conn).await?;
        let calls = args.images.iter().map(|path| {
            let client = client.clone();
            let pipeline = args.pipeline.clone();
            async move {
                let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
                let out = client
                    .infer(&pipeline, &[("image", &encoded_images(&[data]))], InferOptions::default())
                    .await
                    .with_context(|| format!("{}", path.display()))?;
                let get = |name: &str| {
                    out.iter().find(|(n, _)| n == name).map(|(_, t)| t).ok_or_else(|| {
                        anyhow::anyhow!("pipeline '{pipeline}' gave no output '{name}' (it needs boxes, texts, scores)")
                    })
                };
                let texts = get("texts")?.bytes_elements().map_err(|e| anyhow::anyhow!("texts: {e}"))?;
                let scores = get("scores")?.to_f32().context("scores are not FP32")?;
                let boxes = get("boxes")?.to_f32().context("boxes are not FP32")?;
                let lines: Vec<Line> = texts
                    .iter()
                    .enumerate()
                    .map(|(i, t)| Line {
                        text: String::from_utf8_lossy(t).into_owned(),
                        score: scores.get(i).copied().unwrap_or(0.0),
                        corners: boxes.get(i * 8..i * 8 + 8).unwrap_or(&[]).chunks(2).map(|c| (c[0], c[1])).collect(),
                    })
                    .collect();
                anyhow::Ok(lines)
            }
        });
        anyhow::Ok(futures::future::join_all(calls).await)
    })?;
    let mut failed = 0;
    let mut json = Vec::new();
    for (path, result) in args.images.iter().zip(results) {
        match result {
            Ok(lines) if args.json => json.push(serde_json::json!({
                "image": path.display().to_string(),
                "lines": lines.iter().map(|l| serde_json::json!({
                    "text": l.text,
                    "score": l.score,
                    "box": l.corners.iter().map(|&(x, y)| [x, y]).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            })),
            Ok(lines) => {
                println!("{}", path.display());
                for l in &lines {
                    let corners: Vec<String> = l.corners.iter().map(|(x, y)| format!("({x:.0},{y:.0})")).collect();
                    println!("  {:.3}  {}  {}", l.score, corners.join(" "), l.text);
                }
            }
            Err(e) => {
                failed += 1;
                eprintln!("error: {e:#}");
            }
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&json)?);
    }
    if failed > 0 {
        bail!("{failed} of {} images failed", args.images.len());
    }
    Ok(())
}

fn client_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")
}

pub async fn connect(conn: &ConnArgs) -> anyhow::Result<sluice_client::Client> {
    use sluice_client::{ConnectOptions, TlsOptions};
    let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let tls = if conn.tls_ca.is_some() || conn.tls_domain.is_some() || conn.tls_cert.is_some() {
        let identity = match (&conn.tls_cert, &conn.tls_key) {
            (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
            _ => None,
        };
        Some(TlsOptions {
            ca_pem: conn.tls_ca.as_ref().map(read).transpose()?,
            domain: conn.tls_domain.clone(),
            identity,
        })
    } else {
        None
    };
    let opts = ConnectOptions { tls, connect_timeout: Some(Duration::from_secs(10)), ..Default::default() };
    let url = &conn.url;
    sluice_client::Client::connect_with(url.clone(), opts).await.with_context(|| format!("connecting to {url}"))
}

pub fn models(args: ModelsArgs) -> anyhow::Result<()> {
    let index =
        client_runtime()?.block_on(async { anyhow::Ok(connect(&args.conn).await?.repository_index().await?) })?;
    let width = index.iter().map(|m| m.name.len()).max().unwrap_or(4).max(4);
    println!("{:width$}  {:7}  {:11}  REASON", "NAME", "VERSION", "STATE");
    for m in &index {
        // A reason can span lines (every compile error of a pipeline): indent the rest.
        let reason = m.reason.replace('\n', &format!("\n{:1$}", "", width + 24));
        println!("{:width$}  {:7}  {:11}  {reason}", m.name, m.version, m.state);
    }
    Ok(())
}

pub fn reload(args: ReloadArgs) -> anyhow::Result<()> {
    client_runtime()?.block_on(async {
        let client = connect(&args.conn).await?;
        if args.names.is_empty() {
            if args.unload {
                bail!("name the models or pipelines to unload");
            }
            client.repository_load("").await.context("reloading the repository")?;
            println!("reloaded the repository");
        }
        for name in &args.names {
            if args.unload {
                client.repository_unload(name).await.with_context(|| format!("unloading '{name}'"))?;
                println!("unloaded {name}");
            } else {
                client.repository_load(name).await.with_context(|| format!("loading '{name}'"))?;
                println!("loaded {name}");
            }
        }
        // What serves now, with the reason of anything that failed.
        let index = client.repository_index().await?;
        for m in index.iter().filter(|m| !m.reason.is_empty()) {
            println!("{} {} {}: {}", m.name, m.version, m.state, m.reason);
        }
        anyhow::Ok(())
    })
}

pub fn infer(args: InferArgs) -> anyhow::Result<()> {
    use sluice_client::{encoded_images, InferOptions, Tensor};
    let mut tensors = read_tensor_files(&args.inputs)?;
    let rt = client_runtime()?;
    let outputs = rt.block_on(async {
        let client = connect(&args.conn).await?;
        if !args.images.is_empty() {
            let name = match &args.image_input {
                Some(n) => n.clone(),
                None => {
                    let md = client.model_metadata(&args.model).await?;
                    let bytes: Vec<_> = md.inputs.iter().filter(|i| i.datatype == "BYTES").collect();
                    match bytes.as_slice() {
                        [one] => one.name.clone(),
                        _ => bail!("'{}' has {} BYTES inputs; name one with --image-input", args.model, bytes.len()),
                    }
                }
            };
            tensors.push((name, encoded_images(&read_files(&args.images)?)));
        }
        let inputs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let opts = InferOptions {
            timeout: args.timeout_ms.map(Duration::from_millis),
            parameters: args.params.clone(),
            ..Default::default()
        };
        anyhow::Ok(client.infer(&args.model, &inputs, opts).await?)
    })?;
    let json = serde_json::json!({
        "model": args.model,
        "outputs": outputs.iter().map(|(name, t)| serde_json::json!({
            "name": name,
            "datatype": t.dtype.as_str(),
            "shape": t.shape,
            "data": t.to_json(),
        })).collect::<Vec<_>>(),
    });
    println!("{}", serde_json::to_string_pretty(&json)?);
    Ok(())
}

/// Tensors from v2 JSON files ({"datatype", "shape", "data"}), by input name.
pub fn read_tensor_files(files: &[(String, PathBuf)]) -> anyhow::Result<Vec<(String, sluice_client::Tensor)>> {
    use sluice_client::{DataType, Tensor};
    files
        .iter()
        .map(|(name, file)| {
            let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).with_context(|| format!("{}: not JSON", file.display()))?;
            let dtype_name = v["datatype"].as_str().with_context(|| format!("{}: no \"datatype\"", file.display()))?;
            let dtype = DataType::parse(dtype_name)
                .with_context(|| format!("{}: unknown datatype {dtype_name}", file.display()))?;
            let shape: Vec<usize> = serde_json::from_value(v["shape"].clone())
                .with_context(|| format!("{}: bad \"shape\"", file.display()))?;
            let data = sluice_ops::tensor::json_to_bytes(dtype, &v["data"])
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let t = Tensor::new(dtype, shape, data).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            Ok((name.clone(), t))
        })
        .collect()
}

/// The files' contents, in order; the first that cannot be read fails with its path.
pub fn read_files(paths: &[PathBuf]) -> anyhow::Result<Vec<Vec<u8>>> {
    paths.iter().map(|p| std::fs::read(p).with_context(|| format!("reading {}", p.display()))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_client::Parameter;

    #[test]
    fn params_read_as_values_and_quotes_make_strings() {
        let p = |s: &str| parse_param(s).unwrap().1;
        assert_eq!(p("x=2"), Parameter::Int(2));
        assert_eq!(p("x=0.5"), Parameter::Float(0.5));
        assert_eq!(p("x=true"), Parameter::Bool(true));
        assert_eq!(p("x=fr"), Parameter::String("fr".into()));
        assert_eq!(p("x=\"2\""), Parameter::String("2".into()));
        assert_eq!(p("x=\"true\""), Parameter::String("true".into()));
        assert_eq!(p("x=a=b"), Parameter::String("a=b".into()));
        assert!(parse_param("x").is_err());
    }
}
