//! `kiln export CKPT --out DIR`: a checkpoint to a Hugging Face model directory.

use anyhow::{bail, Context, Result};
use kiln_core::Cpu;
use kiln_model::{Model, StorageDtype};
use kiln_train::checkpoint::{self, dtype_name, parse_dtype};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct Args {
    /// Checkpoint directory (runs/NAME/checkpoints/step-XXXXXXXX).
    checkpoint: PathBuf,
    /// Output directory; must not exist yet.
    #[arg(long)]
    out: PathBuf,
    /// Weight dtype: f32, bf16 or f16 (default: the dtype of the model the run started from).
    #[arg(long)]
    dtype: Option<String>,
}

/// transformers' name for a dtype in config.json.
fn torch_name(d: StorageDtype) -> &'static str {
    match d {
        StorageDtype::F32 => "float32",
        StorageDtype::BF16 => "bfloat16",
        StorageDtype::F16 => "float16",
    }
}

pub fn export(checkpoint: &Path, out: &Path, dtype: Option<&str>) -> Result<StorageDtype> {
    if out.exists() {
        bail!("{}: already exists; choose a new --out directory", out.display());
    }
    let state = checkpoint::read_state(checkpoint)?;
    let dtype = parse_dtype(dtype.unwrap_or(&state.source_dtype))?;
    let mut model = Model::load(&Cpu, checkpoint)?;
    model.dtype = dtype;

    let tmp = out.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    model.save_weights(&Cpu, &tmp)?;
    let config_path = checkpoint.join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config_path)?)
        .with_context(|| format!("{}: invalid JSON", config_path.display()))?;
    config["dtype"] = torch_name(dtype).into();
    // Weights are written dequantized: an fp8 source's quantization no longer applies.
    if let Some(c) = config.as_object_mut() {
        c.remove("quantization_config");
    }
    std::fs::write(tmp.join("config.json"), serde_json::to_string_pretty(&config)? + "\n")?;
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
        "generation_config.json",
    ] {
        let src = checkpoint.join(f);
        if src.exists() {
            std::fs::copy(&src, tmp.join(f))?;
        }
    }
    if !tmp.join("generation_config.json").exists() {
        std::fs::write(tmp.join("generation_config.json"), "{}\n")?;
    }
    std::fs::rename(&tmp, out).with_context(|| format!("{}: cannot rename into place", out.display()))?;
    Ok(dtype)
}

pub fn run(args: &Args) -> Result<()> {
    let dtype = export(&args.checkpoint, &args.out, args.dtype.as_deref())?;
    println!("exported {} to {} ({})", args.checkpoint.display(), args.out.display(), dtype_name(dtype));
    Ok(())
}
