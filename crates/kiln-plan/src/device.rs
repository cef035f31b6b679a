//! Accelerators and clusters. The catalogue holds vendor figures (dense bf16 without
//! sparsity, HBM, per-device link bandwidths in one direction); any field can be overridden
//! in a cluster file. A cluster is `COUNTxNAME` (`1000x910c`, `256xh800`) or a TOML file:
//!
//! ```toml
//! count = 1000
//! [device]
//! base = "910c"          # a catalogue entry; the fields below replace its values
//! hbm_gb = 128.0
//! scale_out_gb_s = 50.0
//! ```

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Device {
    pub name: String,
    /// Dense bf16 matrix throughput, TFLOP/s.
    pub bf16_tflops: f64,
    pub hbm_gb: f64,
    /// HBM bandwidth, TB/s.
    pub hbm_tb_s: f64,
    /// Bandwidth to the other devices of its node (NVLink, Infinity Fabric, HCCS), GB/s one way.
    pub intra_node_gb_s: f64,
    /// Bandwidth to other nodes (InfiniBand/RoCE NICs per device), GB/s one way.
    pub scale_out_gb_s: f64,
    pub per_node: usize,
}

fn device(name: &str, tflops: f64, hbm: f64, hbm_bw: f64, intra: f64, out: f64, per_node: usize) -> Device {
    Device {
        name: name.into(),
        bf16_tflops: tflops,
        hbm_gb: hbm,
        hbm_tb_s: hbm_bw,
        intra_node_gb_s: intra,
        scale_out_gb_s: out,
        per_node,
    }
}

/// The built-in devices.
pub fn catalogue() -> Vec<Device> {
    vec![
        // NVIDIA H100 SXM5 datasheet: 989 TFLOP/s dense bf16, 80 GB HBM3 at 3.35 TB/s, NVLink 4
        // 900 GB/s both ways; one 400 Gb/s NIC per GPU (DGX H100).
        device("h100", 989.0, 80.0, 3.35, 450.0, 50.0, 8),
        // H800: the H100 with NVLink cut to 400 GB/s both ways (DeepSeek-V3 report, sec. 3.1:
        // 8 GPUs per node on NVLink/NVSwitch, 400 Gb/s InfiniBand per GPU).
        device("h800", 989.0, 80.0, 3.35, 200.0, 50.0, 8),
        // H200 SXM datasheet: H100 compute, 141 GB HBM3e at 4.8 TB/s.
        device("h200", 989.0, 141.0, 4.8, 450.0, 50.0, 8),
        // A100 SXM4 80GB datasheet: 312 TFLOP/s bf16, 2.04 TB/s, NVLink 3 600 GB/s both ways;
        // 200 Gb/s HDR per GPU (DGX A100).
        device("a100", 312.0, 80.0, 2.04, 300.0, 25.0, 8),
        // AMD Instinct MI300X datasheet: 1307 TFLOP/s dense bf16, 192 GB HBM3 at 5.3 TB/s,
        // 7 Infinity Fabric links of 64 GB/s one way; 400 Gb/s NIC per GPU.
        device("mi300x", 1307.0, 192.0, 5.3, 448.0, 50.0, 8),
        // Huawei Ascend 910B (Atlas 800T A2): ~376 TFLOP/s fp16/bf16, 64 GB HBM2e at 1.6 TB/s,
        // HCCS 7 x 28 GB/s one way inside an 8-NPU server, 200 Gb/s RoCE per NPU. Published
        // figures vary by SKU (910B1-B4); override them in a cluster file.
        device("910b", 376.0, 64.0, 1.6, 196.0, 25.0, 8),
        // Huawei Ascend 910C (two 910B dies): ~780 TFLOP/s bf16, 128 GB HBM at 3.2 TB/s
        // (CloudMatrix384 paper, arXiv 2506.12708); 8 NPUs per server on HCCS, 400 Gb/s RoCE.
        device("910c", 780.0, 128.0, 3.2, 196.0, 50.0, 8),
        // The same NPU in a CloudMatrix384 supernode: 384 NPUs on the unified bus at ~392 GB/s
        // one way each (same paper), so expert and tensor parallel stay on the bus.
        device("910c-cm384", 780.0, 128.0, 3.2, 392.0, 50.0, 384),
    ]
}

/// Devices of one kind, and how many.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Cluster {
    pub count: usize,
    pub device: Device,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterFile {
    count: usize,
    device: DeviceOverride,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceOverride {
    base: Option<String>,
    name: Option<String>,
    bf16_tflops: Option<f64>,
    hbm_gb: Option<f64>,
    hbm_tb_s: Option<f64>,
    intra_node_gb_s: Option<f64>,
    scale_out_gb_s: Option<f64>,
    per_node: Option<usize>,
}

/// A catalogue entry by name (case-insensitive).
pub fn find(name: &str) -> Result<Device> {
    let known = catalogue();
    known.iter().find(|d| d.name.eq_ignore_ascii_case(name)).cloned().with_context(|| {
        let names: Vec<_> = known.iter().map(|d| d.name.as_str()).collect();
        format!("unknown device `{name}`; known: {}", names.join(", "))
    })
}

impl Cluster {
    /// `COUNTxNAME` or a cluster TOML file.
    pub fn parse(spec: &str) -> Result<Self> {
        if Path::new(spec).is_file() {
            return Self::load(Path::new(spec));
        }
        let Some((count, name)) = spec.split_once(['x', 'X']) else {
            bail!("cluster `{spec}`: expected COUNTxDEVICE (e.g. 1000x910c) or a TOML file");
        };
        let count: usize =
            count.trim().parse().with_context(|| format!("cluster `{spec}`: `{count}` is not a count"))?;
        if count == 0 {
            bail!("cluster `{spec}`: no devices");
        }
        Ok(Self { count, device: find(name.trim())? })
    }

    fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        let file: ClusterFile = toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let o = file.device;
        let mut d = match &o.base {
            Some(base) => find(base).with_context(|| format!("{}: field `device.base`", path.display()))?,
            None => Device {
                name: String::new(),
                bf16_tflops: 0.0,
                hbm_gb: 0.0,
                hbm_tb_s: 0.0,
                intra_node_gb_s: 0.0,
                scale_out_gb_s: 0.0,
                per_node: 1,
            },
        };
        let set = |field: &mut f64, value: Option<f64>| {
            if let Some(v) = value {
                *field = v;
            }
        };
        set(&mut d.bf16_tflops, o.bf16_tflops);
        set(&mut d.hbm_gb, o.hbm_gb);
        set(&mut d.hbm_tb_s, o.hbm_tb_s);
        set(&mut d.intra_node_gb_s, o.intra_node_gb_s);
        set(&mut d.scale_out_gb_s, o.scale_out_gb_s);
        d.per_node = o.per_node.unwrap_or(d.per_node);
        d.name = o.name.or(o.base).unwrap_or_else(|| "custom".into());
        for (field, value) in [
            ("bf16_tflops", d.bf16_tflops),
            ("hbm_gb", d.hbm_gb),
            ("hbm_tb_s", d.hbm_tb_s),
            ("intra_node_gb_s", d.intra_node_gb_s),
            ("scale_out_gb_s", d.scale_out_gb_s),
        ] {
            if value <= 0.0 {
                bail!("{}: field `device.{field}` must be positive (or set `device.base`)", path.display());
            }
        }
        if file.count == 0 || d.per_node == 0 {
            bail!("{}: `count` and `device.per_node` must be positive", path.display());
        }
        Ok(Self { count: file.count, device: d })
    }
}
