//! Muon (momentum orthogonalised by Newton–Schulz) for the hidden weight matrices, step for
//! step as torch.optim.Muon computes it:
//!
//!   B ← lerp(B, G, 1 − μ);   U ← lerp(G, B, μ) with Nesterov, else B
//!   X ← bf16(U) / max(‖bf16(U)‖_F, ε), taken transposed when U is tall (so X Xᵀ is small)
//!   k times:  A ← X Xᵀ;   X ← a·X + (b·A + c·A·A)·X   ((a, b, c) per iteration: `NsSchedule`)
//!   θ ← θ·(1 − lr·λ) − lr·s·X,   s = √max(1, rows/cols) ("original"),
//!                                 or 0.2·√max(rows, cols) ("match_rms_adamw": updates of
//!                                 AdamW's RMS, so AdamW's learning rate carries over)
//!
//! The iteration runs in bf16 as PyTorch's does (its `addmm` form): X, A and b·A + c·A² are
//! bf16, each rounded once from f32 sums. A tall X is never transposed in memory: its products
//! take the transposed operand (`Xᵀ X`, `X Aᵀ`), which multiply the same pairs of values.
//!
//! Which tensors: the matrices inside the layers (attention and MLP projections, each routed
//! expert's matrices on their own); embeddings, the output head, norms, biases and routers
//! stay on AdamW, as Muon's authors and DeepSeek-V4 do.

use kiln_core::{Backend, Matmul, Precision};
use kiln_model::{FlatLayout, TensorSpec, Weights};
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// How the learning rate scales with a matrix's shape.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdjustLr {
    /// √max(1, rows/cols), Keller Jordan's (PyTorch's default).
    Original,
    /// 0.2·√max(rows, cols), Moonshot's: update RMS matching AdamW's.
    #[default]
    MatchRmsAdamw,
}

/// Muon's settings (`[train.muon]`); `lr` and weight decay are the run's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MuonSettings {
    #[serde(default = "default_momentum")]
    pub momentum: f64,
    #[serde(default = "yes")]
    pub nesterov: bool,
    /// Newton–Schulz iterations.
    #[serde(default = "default_ns_steps")]
    pub ns_steps: usize,
    /// The quintic's (a, b, c).
    #[serde(default = "default_coefficients")]
    pub ns_coefficients: [f32; 3],
    #[serde(default)]
    pub adjust_lr: AdjustLr,
    /// Which iterations run: `ns_steps` of `ns_coefficients`, or DeepSeek-V4's.
    #[serde(default)]
    pub ns_schedule: NsSchedule,
}

/// The Newton–Schulz iterations' coefficients, step by step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NsSchedule {
    /// `ns_steps` iterations of `ns_coefficients` (PyTorch's, Keller Jordan's).
    #[default]
    Torch,
    /// DeepSeek-V4's (its report): 8 iterations of (3.4445, −4.7750, 2.0315) to converge fast,
    /// then 2 of (2, −1.5, 0.5) to settle the singular values at 1.
    DeepseekV4,
}

impl MuonSettings {
    /// The (a, b, c) of each iteration, in order.
    pub fn iterations(&self) -> Vec<[f32; 3]> {
        match self.ns_schedule {
            NsSchedule::Torch => vec![self.ns_coefficients; self.ns_steps],
            NsSchedule::DeepseekV4 => {
                let (fast, settle) = ([3.4445, -4.775, 2.0315], [2.0, -1.5, 0.5]);
                [vec![fast; 8], vec![settle; 2]].concat()
            }
        }
    }
}

impl Default for MuonSettings {
    fn default() -> Self {
        Self {
            momentum: default_momentum(),
            nesterov: true,
            ns_steps: default_ns_steps(),
            ns_coefficients: default_coefficients(),
            adjust_lr: AdjustLr::default(),
            ns_schedule: NsSchedule::default(),
        }
    }
}

fn default_momentum() -> f64 {
    0.95
}
fn yes() -> bool {
    true
}
fn default_ns_steps() -> usize {
    5
}
fn default_coefficients() -> [f32; 3] {
    [3.4445, -4.775, 2.0315]
}

/// PyTorch's ε of the normalisation (1e-7), as a bf16 tensor's clamp sees it.
const EPS: f32 = 1e-7;

/// One matrix Muon updates: its values in the flat buffers, row-major `[rows, cols]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Matrix {
    pub range: Range<usize>,
    pub rows: usize,
    pub cols: usize,
}

/// The matrices of `layout` that Muon updates: every tensor of two or more dimensions inside
/// the layers except the routers (kept in f32), a stacked `[experts, rows, cols]` tensor as
/// one matrix per expert.
pub fn matrices(layout: &Weights<TensorSpec>, flat: &FlatLayout) -> Vec<Matrix> {
    let mut out = Vec::new();
    for (spec, range) in layout.iter().into_iter().zip(flat.ranges.iter()) {
        let hidden = spec.name.strip_prefix("model.").unwrap_or(&spec.name).starts_with("layers.")
            && spec.shape.len() >= 2
            && !spec.keep_f32
            && !spec.adamw_only;
        if !hidden {
            continue;
        }
        let (rows, cols) = (spec.shape[spec.shape.len() - 2], spec.shape[spec.shape.len() - 1]);
        for start in range.clone().step_by(rows * cols) {
            out.push(Matrix { range: start..start + rows * cols, rows, cols });
        }
    }
    out.sort_by_key(|m| m.range.start);
    out
}

/// The learning-rate scale of a `rows × cols` matrix.
fn lr_scale(adjust: AdjustLr, rows: usize, cols: usize) -> f64 {
    let (rows, cols) = (rows as f64, cols as f64);
    match adjust {
        AdjustLr::Original => (rows / cols).max(1.0).sqrt(),
        AdjustLr::MatchRmsAdamw => 0.2 * rows.max(cols).sqrt(),
    }
}

/// Room for the update of the largest of some matrices and for its iteration, made once and
/// reused by every step.
pub struct Scratch<B: Backend> {
    /// The momentum-updated matrix, then its orthogonalised form.
    update: B::Buf,
    work: Work<B>,
}

/// The iteration's matrices: A, b·A, b·A + c·A² (s × s, s the smaller side) and the product
/// with X.
struct Work<B: Backend> {
    gram: B::Buf,
    scaled: B::Buf,
    gram2: B::Buf,
    y: B::Buf,
}

impl<B: Backend> Scratch<B> {
    pub fn new(b: &B, matrices: &[Matrix]) -> Self {
        let values = matrices.iter().map(|m| m.rows * m.cols).max().unwrap_or(0);
        let square = matrices.iter().map(|m| m.rows.min(m.cols).pow(2)).max().unwrap_or(0);
        let work = Work { gram: b.zeros(square), scaled: b.zeros(square), gram2: b.zeros(square), y: b.zeros(values) };
        Self { update: b.zeros(values), work }
    }

    /// The first `len` values of the update (filled by the caller for [`orthogonalise`]).
    pub fn update<'a>(&'a mut self, b: &B, len: usize) -> &'a mut B::Slice {
        first(b, &mut self.update, len)
    }
}

/// The first `len` values of `buf`.
fn first<'a, B: Backend>(b: &B, buf: &'a mut B::Buf, len: usize) -> &'a mut B::Slice {
    b.slice_mut(buf, 0..len)
}

/// The `rows × cols` matrix at the start of `scratch`'s update orthogonalised in place.
pub fn orthogonalise<B: Backend>(
    b: &B,
    settings: &MuonSettings,
    scratch: &mut Scratch<B>,
    (rows, cols): (usize, usize),
) {
    let x = first(b, &mut scratch.update, rows * cols);
    newton_schulz(b, x, (rows, cols), settings, &mut scratch.work);
}

/// `x` (a `rows × cols` matrix) orthogonalised in place by the Newton–Schulz iterations of
/// `settings` in bf16, in `work`.
fn newton_schulz<B: Backend>(
    b: &B,
    x: &mut B::Slice,
    (rows, cols): (usize, usize),
    settings: &MuonSettings,
    work: &mut Work<B>,
) {
    b.round_to_bf16(x);
    let norm = kiln_core::bf16::widen(kiln_core::bf16::round(b.sum_squares(x).sqrt() as f32));
    b.scale(x, 1.0 / norm.max(kiln_core::bf16::widen(kiln_core::bf16::round(EPS))));
    b.round_to_bf16(x);
    let tall = rows > cols;
    let s = rows.min(cols);
    let product = |m, n, k, trans_a, trans_b| Matmul {
        m,
        n,
        k,
        trans_a,
        trans_b,
        batch: 1,
        accumulate: false,
        // The values are bf16 already, so bf16 products lose nothing and run on bf16 hardware
        // (tensor cores, AMX); their sums are f32.
        precision: Precision::Bf16,
        b_is_weight: false,
    };
    let gram = first(b, &mut work.gram, s * s);
    let scaled = first(b, &mut work.scaled, s * s);
    let gram2 = first(b, &mut work.gram2, s * s);
    let y = first(b, &mut work.y, rows * cols);
    let bf16 = |t: &mut B::Slice| b.round_to_bf16(t);
    for [qa, qb, qc] in settings.iterations() {
        // A = X Xᵀ of the wide orientation: Xᵀ X for a tall X.
        let (k, (ta, tb)) = if tall { (rows, (true, false)) } else { (cols, (false, true)) };
        b.matmul(gram, x, x, product(s, s, k, ta, tb));
        bf16(gram);
        // b·A + c·A·A, rounded once (PyTorch's addmm).
        b.matmul(gram2, gram, gram, product(s, s, s, false, false));
        b.scale(gram2, qc);
        b.copy(scaled, gram);
        b.scale(scaled, qb);
        b.add_assign(gram2, scaled);
        bf16(gram2);
        // a·X + (b·A + c·A²)·X, or a·X + X·(b·A + c·A²)ᵀ for a tall X, rounded once.
        match tall {
            true => b.matmul(y, x, gram2, product(rows, cols, cols, false, true)),
            false => b.matmul(y, gram2, x, product(rows, cols, rows, false, false)),
        }
        b.scale(x, qa);
        b.add_assign(x, y);
        bf16(x);
    }
}

/// One Muon step of matrix `m`: `param`, `grad` and the momentum `buf` hold its values.
pub fn step<B: Backend>(
    b: &B,
    (settings, scratch): (&MuonSettings, &mut Scratch<B>),
    lr_decay: (f32, f32),
    m: &Matrix,
    (param, grad): (&mut B::Slice, &B::Slice),
    buf: &mut B::Slice,
) {
    let update = first(b, &mut scratch.update, m.rows * m.cols);
    b.muon_momentum(update, buf, grad, settings.momentum, settings.nesterov);
    newton_schulz(b, update, (m.rows, m.cols), settings, &mut scratch.work);
    apply(b, settings, lr_decay, m, param, update);
}

/// `θ ← θ·(1 − lr·λ) − lr·s·X` for the values of matrix `m` in `param` (all of them, or a
/// piece) and the same values of its orthogonalised update `x` (scaled in place).
pub fn apply<B: Backend>(
    b: &B,
    settings: &MuonSettings,
    (lr, weight_decay): (f32, f32),
    m: &Matrix,
    param: &mut B::Slice,
    x: &mut B::Slice,
) {
    b.scale(param, (1.0 - lr as f64 * weight_decay as f64) as f32);
    b.scale(x, -(lr as f64 * lr_scale(settings.adjust_lr, m.rows, m.cols)) as f32);
    b.add_assign(param, x);
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::Cpu;
    use safetensors::SafeTensors;

    fn fixture() -> Vec<u8> {
        let root = std::env::var_os("KILN_FIXTURES")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures"));
        std::fs::read(root.join("muon/golden.safetensors")).expect("tests/fixtures/muon (tools/golden/muon.py)")
    }

    fn values(st: &SafeTensors, name: &str) -> Vec<f64> {
        let t = st.tensor(name).unwrap_or_else(|_| panic!("fixture tensor {name}"));
        match t.dtype() {
            safetensors::Dtype::F32 => {
                t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect()
            }
            _ => t.data().chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect(),
        }
    }

    /// Four steps of each setting (DeepSeek-V4's schedule among them) on a wide, a tall and a
    /// square matrix against torch.optim.Muon, each step from torch's parameters before it
    /// (the momentum does not depend on the parameters, so every step is checked on its own):
    /// within 1e-5, except where a bf16 rounding of the iteration turned the other way (the
    /// sums of a product run in another order in PyTorch's gemm), which moves one value of the
    /// update by one bf16 step (at most lr·s·2⁻⁷ for values below 2), on no more than 2% of
    /// the values.
    #[test]
    fn steps_agree_with_torch_muon() {
        let bytes = fixture();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let b = Cpu;
        let (mut values_checked, mut flips) = (0, 0);
        for case in ["default", "match_rms_adamw", "plain_momentum", "deepseek_v4"] {
            let s = values(&st, &format!("{case}.settings"));
            let settings = MuonSettings {
                momentum: s[2],
                nesterov: s[3] == 1.0,
                ns_steps: s[4] as usize,
                adjust_lr: if s[5] == 0.0 { AdjustLr::Original } else { AdjustLr::MatchRmsAdamw },
                ns_schedule: if s[6] == 0.0 { NsSchedule::Torch } else { NsSchedule::DeepseekV4 },
                ..MuonSettings::default()
            };
            let (lr, weight_decay) = (s[0] as f32, s[1] as f32);
            for (shape, rows, cols) in [("wide", 6, 10), ("tall", 12, 5), ("square", 8, 8)] {
                let n = rows * cols;
                let m = Matrix { range: 0..n, rows, cols };
                let flip = lr as f64 * lr_scale(settings.adjust_lr, rows, cols) / 128.0;
                let param0 = values(&st, &format!("{shape}.param0"));
                let grads = values(&st, &format!("{shape}.grads"));
                let after = values(&st, &format!("{case}.{shape}.params"));
                let (mut buf, mut scratch) = (vec![0.0; n], Scratch::new(&b, std::slice::from_ref(&m)));
                for t in 0..4 {
                    let before = if t == 0 { &param0[..] } else { &after[(t - 1) * n..][..n] };
                    let mut param: Vec<f32> = before.iter().map(|&v| v as f32).collect();
                    let grad: Vec<f32> = grads[t * n..][..n].iter().map(|&v| v as f32).collect();
                    step(&b, (&settings, &mut scratch), (lr, weight_decay), &m, (&mut param, &grad), &mut buf);
                    for (i, (&got, &want)) in param.iter().zip(&after[t * n..][..n]).enumerate() {
                        let err = (got as f64 - want).abs();
                        let what = format!("{case} {shape} step {}: param[{i}] = {got}, torch {want}", t + 1);
                        assert!(err <= 1e-5 || err <= 1.01 * flip, "{what}");
                        flips += usize::from(err > 1e-5);
                    }
                    values_checked += n;
                }
            }
        }
        assert!(flips * 50 <= values_checked, "{flips} of {values_checked} values off by a bf16 rounding");
    }

    /// The orthogonalised matrix has singular values near one: XᵀX ≈ I for a tall X, within
    /// the loose band Muon's quintic aims for (0.5 to 1.5).
    #[test]
    fn newton_schulz_orthogonalises() {
        let (rows, cols) = (24, 8);
        let mut rng = kiln_core::rng::Rng::new(3);
        let mut scratch = Scratch::new(&Cpu, &[Matrix { range: 0..rows * cols, rows, cols }]);
        scratch.update(&Cpu, rows * cols).copy_from_slice(&rng.normal_vec(rows * cols, 1.0));
        orthogonalise(&Cpu, &MuonSettings::default(), &mut scratch, (rows, cols));
        let x = scratch.update(&Cpu, rows * cols).to_vec();
        for i in 0..cols {
            let norm: f64 = (0..rows).map(|r| (x[r * cols + i] as f64).powi(2)).sum::<f64>().sqrt();
            assert!((0.5..1.5).contains(&norm), "column {i}: norm {norm}");
            for j in 0..i {
                let dot: f64 = (0..rows).map(|r| x[r * cols + i] as f64 * x[r * cols + j] as f64).sum();
                assert!(dot.abs() < 0.3, "columns {i} and {j}: dot {dot}");
            }
        }
    }
}
