//! What the benchmark examples share.

use sluice_ops::Tensor;

/// One request's worth of non-zero inputs (zeros can take faster paths than real data).
pub fn inputs_for(infos: &[sluice_server::offline::TensorInfo], batched: bool, n: usize) -> Vec<Tensor> {
    infos
        .iter()
        .map(|t| {
            let shape: Vec<usize> = t
                .dims
                .iter()
                .enumerate()
                .map(|(i, &d)| if i == 0 && batched { n } else { d.max(1) as usize })
                .collect();
            let count: usize = shape.iter().product();
            let v: Vec<f32> = (0..count).map(|i| ((i * 7919) % 255) as f32 / 255.0).collect();
            Tensor::from_f32(shape, &v)
        })
        .collect()
}
