//! `pipelines/<name>.yaml`: the file format, as serde types. Unknown keys are errors.

use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineYaml {
    /// For readers of the file: accepted, not used.
    #[serde(default)]
    #[expect(dead_code, reason = "documentation inside the pipeline file")]
    pub description: String,
    /// Items (images) one request may carry along a leading batch dimension; 0: requests
    /// carry exactly one item and inputs have no batch dimension.
    #[serde(default = "default_max_batch")]
    pub max_batch_size: usize,
    /// How requests run: `split` (each op on its node's pool, each model on its batcher,
    /// independent steps concurrently) or `fused` (every step of an item in turn on one
    /// thread of `pool`, which waits while the model runs; the layout most servers use,
    /// kept for comparison).
    #[serde(default)]
    pub layout: Layout,
    /// The pool a `fused` pipeline's items run on.
    #[serde(default)]
    pub pool: Option<String>,
    /// Values a request may set in its v2 `parameters`, typed, with defaults: op params
    /// name them as `$name`, conditions and node inputs read them.
    #[serde(default)]
    pub parameters: Vec<super::params::ParamYaml>,
    pub inputs: Vec<InputYaml>,
    pub outputs: Vec<OutputYaml>,
    pub nodes: Vec<NodeYaml>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    #[default]
    Split,
    Fused,
}

fn default_max_batch() -> usize {
    8
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputYaml {
    pub name: String,
    /// A v2 datatype: BYTES, FP32, UINT8, ...
    pub dtype: String,
    /// Dims of one item (without the batch dimension); -1 is variable. A BYTES input of
    /// dims [1] carries one encoded blob (an image file) per item.
    pub dims: Vec<i64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputYaml {
    pub name: String,
    /// `node.output`
    pub from: String,
    /// When `from` may be absent (a skipped node's): `empty` (no rows) or a value.
    #[serde(default)]
    pub default: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeYaml {
    pub name: String,
    /// A CPU op from the ops registry ...
    #[serde(default)]
    pub op: Option<String>,
    /// ... or a model of the repository.
    #[serde(default)]
    pub model: Option<String>,
    /// The node's input name -> `node.output` or a pipeline input's name.
    #[serde(default)]
    pub inputs: BTreeMap<String, String>,
    /// Model nodes: the model version to use (default: the latest served version, which
    /// moves when a newer version is loaded).
    #[serde(default)]
    pub version: Option<u64>,
    /// The op's parameters.
    #[serde(default)]
    pub params: Option<serde_yaml_ng::Value>,
    /// The CPU pool an op runs on (server `--pool`); default: `default`.
    #[serde(default)]
    pub pool: Option<String>,
    /// Most items of this node in flight at once, across all requests (0: no limit).
    #[serde(default)]
    pub concurrency: usize,
    /// Model nodes: how long this node's items may wait for their batch, overriding the
    /// model's `dynamic_batching.max_queue_delay_us` (the batch is cut when any of its
    /// items has waited its limit).
    #[serde(default)]
    pub max_queue_delay_us: Option<u64>,
    /// Model nodes: run this node's items in batches of at most this many rows (at most
    /// the model's max_batch_size), for example to bound latency.
    #[serde(default)]
    pub max_batch_size: Option<usize>,
    /// Runs the node only when this condition holds; otherwise its outputs are absent.
    #[serde(default)]
    pub when: Option<String>,
    /// Per input: the value it takes when its source is absent.
    #[serde(default)]
    pub defaults: BTreeMap<String, serde_json::Value>,
    /// `skip`: the node is skipped (its outputs absent) when an input it reads is absent.
    #[serde(default)]
    pub on_absent: Option<OnAbsent>,
    /// Sends each item to one of several models by a value.
    #[serde(default)]
    pub route: Option<RouteYaml>,
    /// Sends each request to one of several models (or versions) by weight.
    #[serde(default)]
    pub split: Option<Vec<SplitArmYaml>>,
    /// With `split`: a request id always takes the same branch.
    #[serde(default)]
    pub sticky: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnAbsent {
    Skip,
}

/// A model an item can be sent to: its name, or `{model, version}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ArmYaml {
    Name(String),
    Pinned(PinnedArm),
}

/// `{model, version}`; a misspelt key is an error, not the latest version.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PinnedArm {
    model: String,
    #[serde(default)]
    version: Option<u64>,
}

impl ArmYaml {
    pub fn model(&self) -> (&str, Option<u64>) {
        match self {
            ArmYaml::Name(m) => (m, None),
            ArmYaml::Pinned(p) => (&p.model, p.version),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteYaml {
    /// `node.output` (one value per element of the list the node is mapped over, or one
    /// value) or `$parameter`.
    pub by: String,
    /// Value -> model.
    pub cases: serde_yaml_ng::Mapping,
    /// Where values no case names go; without it they fail the request.
    #[serde(default)]
    pub default: Option<ArmYaml>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitArmYaml {
    pub model: String,
    #[serde(default)]
    pub version: Option<u64>,
    pub weight: u32,
}

/// Finds lines in the pipeline's text, for error messages. serde does not keep
/// positions of values, so a node is located by its `name:` line.
pub struct Locator<'a> {
    lines: Vec<&'a str>,
}

impl<'a> Locator<'a> {
    pub fn new(text: &'a str) -> Locator<'a> {
        Locator { lines: text.lines().collect() }
    }

    fn section_start(&self, section: &str) -> usize {
        let key = format!("{section}:");
        self.lines.iter().position(|l| l.trim_end().starts_with(&key)).unwrap_or(0)
    }

    /// 1-based line of the entry `name: <name>` in the top-level list `section`.
    pub fn entry(&self, section: &str, name: &str) -> Option<usize> {
        let start = self.section_start(section);
        self.lines.iter().enumerate().skip(start).find_map(|(i, l)| {
            let t = l.trim_start().trim_start_matches('-').trim_start().trim_start_matches('{').trim_start();
            let v = t.strip_prefix("name:")?;
            let v = v.split([',', '}', '#']).next()?.trim().trim_matches(['"', '\'']);
            (v == name).then_some(i + 1)
        })
    }

    /// The first line at or after `from` (1-based) containing `needle`.
    pub fn find_after(&self, from: usize, needle: &str) -> Option<usize> {
        self.lines.iter().enumerate().skip(from.saturating_sub(1)).find(|(_, l)| l.contains(needle)).map(|(i, _)| i + 1)
    }

    pub fn top_key(&self, key: &str) -> Option<usize> {
        let k = format!("{key}:");
        self.lines.iter().position(|l| l.starts_with(&k)).map(|i| i + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_found_in_their_section() {
        let text = "inputs:\n  - {name: image, dtype: BYTES, dims: [1]}\nnodes:\n  - name: image2\n  - name: 'image'\n    op: x\n";
        let l = Locator::new(text);
        assert_eq!(l.entry("inputs", "image"), Some(2));
        assert_eq!(l.entry("nodes", "image"), Some(5));
        assert_eq!(l.entry("nodes", "nope"), None);
        assert_eq!(l.find_after(5, "op:"), Some(6));
    }
}
