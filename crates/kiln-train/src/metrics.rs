//! `metrics.jsonl`, one JSON object per line (and, when asked, a TensorBoard event file), and
//! the loss plot drawn from it.

use crate::tensorboard::EventWriter;
use anyhow::{Context, Result};
use plotters::prelude::*;
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};

pub struct Metrics {
    path: PathBuf,
    /// None on the ranks of a data-parallel run that do not write (all but rank 0).
    file: Option<std::fs::File>,
    tensorboard: Option<EventWriter>,
}

impl Metrics {
    /// Opens `dir/metrics.jsonl`: fresh, or, when resuming after `resume_step`, keeping only
    /// the lines of steps up to it, so the file reads as one uninterrupted run; with
    /// `tensorboard`, also a new event file that takes up after `resume_step`.
    pub fn open(dir: &Path, resume_step: Option<u64>, tensorboard: bool) -> Result<Self> {
        let path = dir.join("metrics.jsonl");
        let kept: String = match resume_step {
            Some(step) if path.exists() => std::fs::read_to_string(&path)?
                .lines()
                .filter(|l| {
                    serde_json::from_str::<Value>(l).ok().and_then(|v| v["step"].as_u64()).is_some_and(|s| s <= step)
                })
                .map(|l| format!("{l}\n"))
                .collect(),
            _ => String::new(),
        };
        std::fs::write(&path, kept).with_context(|| format!("{}: cannot write", path.display()))?;
        let file = std::fs::OpenOptions::new().append(true).open(&path)?;
        let tensorboard = match tensorboard {
            true => Some(EventWriter::create(dir, resume_step.map(|s| s + 1))?),
            false => None,
        };
        Ok(Self { path, file: Some(file), tensorboard })
    }

    /// Metrics that go nowhere.
    pub fn disabled() -> Self {
        Self { path: PathBuf::new(), file: None, tensorboard: None }
    }

    pub fn write(&mut self, record: &Value) -> Result<()> {
        if let Some(f) = &mut self.file {
            writeln!(f, "{record}").with_context(|| format!("{}: cannot write", self.path.display()))?;
        }
        match &mut self.tensorboard {
            Some(t) => t.write_record(record),
            None => Ok(()),
        }
    }
}

/// `(step, value)` pairs of `key` in a metrics file.
pub fn series(path: &Path, key: &str) -> Result<Vec<(f64, f64)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| Some((v["step"].as_f64()?, v[key].as_f64()?)))
        .collect())
}

/// What a run's plot shows: one metric of the training steps and of the evaluations,
/// against the step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlotSpec {
    pub file: &'static str,
    pub y_desc: &'static str,
    pub train: &'static str,
    pub eval: &'static str,
    pub train_label: &'static str,
    pub eval_label: &'static str,
}

impl PlotSpec {
    pub const LOSS: Self = Self {
        file: "loss.png",
        y_desc: "loss",
        train: "loss",
        eval: "eval_loss",
        train_label: "train",
        eval_label: "eval",
    };
    /// RL: the mean reward of each step's samples, and the greedy reward on the eval prompts.
    pub const REWARD: Self = Self {
        file: "reward.png",
        y_desc: "reward",
        train: "reward",
        eval: "eval_reward",
        train_label: "train (sampled)",
        eval_label: "eval (greedy)",
    };
}

/// Draws `spec`'s train and eval series against the step into a PNG.
pub fn plot(metrics: &Path, out: &Path, title: &str, spec: PlotSpec) -> Result<()> {
    let train = series(metrics, spec.train)?;
    let eval = series(metrics, spec.eval)?;
    if train.is_empty() {
        return Ok(());
    }
    static FONT_REGISTERED: std::sync::Once = std::sync::Once::new();
    FONT_REGISTERED.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
    });
    let all = train.iter().chain(&eval);
    let (x_max, y_min, y_max) =
        all.fold((1.0f64, f64::INFINITY, f64::NEG_INFINITY), |(x, lo, hi), &(s, v)| (x.max(s), lo.min(v), hi.max(v)));
    let pad = ((y_max - y_min) * 0.05).max(1e-3);
    let root = BitMapBackend::new(out, (900, 540)).into_drawing_area();
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 24))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..x_max, (y_min - pad)..(y_max + pad))?;
        chart.configure_mesh().x_desc("step").y_desc(spec.y_desc).draw()?;
        chart
            .draw_series(LineSeries::new(train.iter().copied(), &BLUE))?
            .label(spec.train_label)
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
        if !eval.is_empty() {
            chart
                .draw_series(LineSeries::new(eval.iter().copied(), RED.stroke_width(2)))?
                .label(spec.eval_label)
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
            chart.draw_series(eval.iter().map(|&p| Circle::new(p, 3, RED.filled())))?;
        }
        chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow::anyhow!("{}: cannot draw the plot: {e}", out.display()))
}
