//! Rotary embedding frequencies and their scaling variants, as transformers computes them
//! (`modeling_rope_utils.py`), in f32 like the reference so tables agree to the last bits.
//!
//! For rotary dim `d` and base θ, the default inverse frequencies are
//!   inv_i = 1 / θ^(2i/d),  i < d/2
//! and token at position p rotates pair i by angle p·inv_i; cos and sin are multiplied by an
//! attention factor (1 except for yarn).

use serde_json::{Map, Value};

#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    Default,
    /// Position interpolation: every frequency divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3.1: low frequencies divided by `factor`, high kept, a smooth ramp between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// YaRN: per-frequency blend of interpolation and extrapolation, plus an attention factor.
    Yarn {
        factor: f64,
        original_max_position_embeddings: f64,
        beta_fast: f64,
        beta_slow: f64,
        attention_factor: f64,
        truncate: bool,
    },
}

pub(crate) fn number(params: &Map<String, Value>, key: &str) -> Result<Option<f64>, String> {
    match params.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => {
            v.as_f64().map(Some).ok_or_else(|| format!("field `rope_parameters.{key}`: expected a number, got {v}"))
        }
    }
}

fn required(params: &Map<String, Value>, key: &str, rope_type: &str) -> Result<f64, String> {
    number(params, key)?.ok_or_else(|| format!("field `rope_parameters.{key}` is required by rope_type `{rope_type}`"))
}

/// YaRN's attention scale for a context extension `scale`.
pub(crate) fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

impl RopeScaling {
    /// Reads the `rope_parameters` (or legacy `rope_scaling`) dictionary.
    pub fn parse(params: &Map<String, Value>, max_position_embeddings: usize) -> Result<Self, String> {
        let rope_type =
            params.get("rope_type").or_else(|| params.get("type")).and_then(Value::as_str).unwrap_or("default");
        let original =
            || number(params, "original_max_position_embeddings").map(|o| o.unwrap_or(max_position_embeddings as f64));
        Ok(match rope_type {
            "default" => Self::Default,
            "linear" => Self::Linear { factor: required(params, "factor", rope_type)? },
            "llama3" => Self::Llama3 {
                factor: required(params, "factor", rope_type)?,
                low_freq_factor: required(params, "low_freq_factor", rope_type)?,
                high_freq_factor: required(params, "high_freq_factor", rope_type)?,
                original_max_position_embeddings: original()?,
            },
            "yarn" => {
                let original_max_position_embeddings = original()?;
                let factor =
                    number(params, "factor")?.unwrap_or(max_position_embeddings as f64 / original_max_position_embeddings);
                let attention_factor = match number(params, "attention_factor")? {
                    Some(a) => a,
                    None => match (number(params, "mscale")?, number(params, "mscale_all_dim")?) {
                        (Some(m), Some(all)) if m != 0.0 && all != 0.0 => yarn_mscale(factor, m) / yarn_mscale(factor, all),
                        _ => yarn_mscale(factor, 1.0),
                    },
                };
                Self::Yarn {
                    factor,
                    original_max_position_embeddings,
                    beta_fast: number(params, "beta_fast")?.filter(|&b| b != 0.0).unwrap_or(32.0),
                    beta_slow: number(params, "beta_slow")?.filter(|&b| b != 0.0).unwrap_or(1.0),
                    attention_factor,
                    truncate: params.get("truncate").and_then(Value::as_bool).unwrap_or(true),
                }
            }
            other => {
                return Err(format!(
                    "field `rope_parameters.rope_type`: `{other}` is not supported (supported: default, linear, llama3, yarn)"
                ))
            }
        })
    }

    /// Factor applied to cos and sin.
    pub fn attention_factor(&self) -> f32 {
        match self {
            Self::Yarn { attention_factor, .. } => *attention_factor as f32,
            _ => 1.0,
        }
    }

    /// The `rot_dim / 2` inverse frequencies, in f32 as transformers computes them.
    pub fn inv_freq(&self, theta: f64, rot_dim: usize) -> Vec<f32> {
        let base = theta as f32;
        // base ** (arange(0, d, 2) / d) in f32.
        let pos_freq: Vec<f32> =
            (0..rot_dim / 2).map(|i| ((base as f64).powf(((2 * i) as f32 / rot_dim as f32) as f64)) as f32).collect();
        let default: Vec<f32> = pos_freq.iter().map(|p| 1.0 / p).collect();
        match *self {
            Self::Default => default,
            Self::Linear { factor } => default.iter().map(|f| f / factor as f32).collect(),
            Self::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings: old } => {
                let (factor, low, high, old) =
                    (factor as f32, low_freq_factor as f32, high_freq_factor as f32, old as f32);
                let (low_wavelen, high_wavelen) = (old / low, old / high);
                default
                    .iter()
                    .map(|&inv| {
                        let wavelen = 2.0 * std::f32::consts::PI / inv;
                        let scaled = if wavelen > low_wavelen { inv / factor } else { inv };
                        if wavelen < high_wavelen || wavelen > low_wavelen {
                            scaled
                        } else {
                            let smooth = (old / wavelen - low) / (high - low);
                            (1.0 - smooth) * scaled / factor + smooth * scaled
                        }
                    })
                    .collect()
            }
            Self::Yarn {
                factor, original_max_position_embeddings: original, beta_fast, beta_slow, truncate, ..
            } => {
                let d = rot_dim as f64;
                let correction_dim = |rotations: f64| {
                    d * (original / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln())
                };
                let (mut low, mut high) = (correction_dim(beta_fast), correction_dim(beta_slow));
                if truncate {
                    (low, high) = (low.floor(), high.ceil());
                }
                let (low, mut high) = (low.max(0.0), high.min(d - 1.0));
                if low == high {
                    high += 0.001;
                }
                pos_freq
                    .iter()
                    .enumerate()
                    .map(|(i, &p)| {
                        let ramp = ((i as f32 - low as f32) / (high as f32 - low as f32)).clamp(0.0, 1.0);
                        let extrapolation = 1.0 - ramp;
                        let interpolation = 1.0 / (factor as f32 * p);
                        interpolation * (1.0 - extrapolation) + (1.0 / p) * extrapolation
                    })
                    .collect()
            }
        }
    }

    /// `[positions, rot_dim]`: per position `rot_dim/2` cosines then `rot_dim/2` sines, times
    /// the attention factor, as the backend's rope kernels expect.
    pub fn table(&self, theta: f64, rot_dim: usize, positions: usize) -> Vec<f32> {
        let inv = self.inv_freq(theta, rot_dim);
        let scale = self.attention_factor();
        let mut table = Vec::with_capacity(positions * rot_dim);
        for p in 0..positions {
            let angles: Vec<f64> = inv.iter().map(|&f| (p as f32 * f) as f64).collect();
            table.extend(angles.iter().map(|a| a.cos() as f32 * scale));
            table.extend(angles.iter().map(|a| a.sin() as f32 * scale));
        }
        table
    }
}
