//! GPU utilisation and memory per device, from NVML (`libnvidia-ml.so`, loaded at run
//! time, so the binary builds and runs without it). On hosts without an NVIDIA driver
//! there is nothing to report and no GPU metrics appear.

use nvml_wrapper::Nvml;
use serde::Serialize;

/// One device at one moment.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct GpuSample {
    pub index: u32,
    pub name: String,
    /// Fraction of the last sample period in which a kernel ran (NVML's "GPU utilisation").
    pub utilization: f64,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
}

pub struct Gpus {
    nvml: Option<Nvml>,
}

impl Gpus {
    /// Opens NVML if the host has it; logs why not otherwise.
    pub fn open() -> Gpus {
        match Nvml::init() {
            Ok(nvml) => {
                let count = nvml.device_count().unwrap_or(0);
                tracing::info!(devices = count, "NVML: reporting GPU utilisation and memory");
                Gpus { nvml: Some(nvml) }
            }
            Err(e) => {
                tracing::debug!("no NVML ({e}): no GPU metrics");
                Gpus { nvml: None }
            }
        }
    }

    pub fn available(&self) -> bool {
        self.nvml.is_some()
    }

    /// The current state of every device; a device that fails to answer is left out.
    pub fn sample(&self) -> Vec<GpuSample> {
        let Some(nvml) = &self.nvml else { return Vec::new() };
        let count = nvml.device_count().unwrap_or(0);
        (0..count)
            .filter_map(|index| {
                let dev = nvml.device_by_index(index).ok()?;
                let util = dev.utilization_rates().ok()?;
                let mem = dev.memory_info().ok()?;
                Some(GpuSample {
                    index,
                    name: dev.name().unwrap_or_default(),
                    utilization: f64::from(util.gpu) / 100.0,
                    memory_used_bytes: mem.used,
                    memory_total_bytes: mem.total,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_driver_there_is_nothing_to_report() {
        let gpus = Gpus::open();
        let samples = gpus.sample();
        if !gpus.available() {
            assert!(samples.is_empty());
        }
        for s in samples {
            assert!((0.0..=1.0).contains(&s.utilization) && s.memory_used_bytes <= s.memory_total_bytes, "{s:?}");
        }
    }
}
