//! The arguments every training recipe takes: a run file, overrides, resume and quiet.

use anyhow::Result;
use kiln_train::session::Resume;
use kiln_train::RunConfig;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct RunArgs {
    /// Run configuration (TOML).
    config: PathBuf,
    /// Override a key: --set train.lr=1e-5 (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    overrides: Vec<String>,
    /// How the run spreads over its ranks, as `kiln plan` writes it: --layout dp=2,tp=2,pp=2,zero=1
    /// (sets `train.layout`; keys left out keep the run file's values).
    #[arg(long, value_name = "dp=..,tp=..,pp=..,ep=..,zero=..,recompute=..")]
    layout: Option<String>,
    /// Continue from the newest checkpoint of the run, or from the checkpoint given.
    #[arg(long, num_args = 0..=1, value_name = "CHECKPOINT")]
    resume: Option<Option<PathBuf>>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

impl RunArgs {
    /// The run configuration (relative paths from the run file's folder) and where to resume.
    pub fn load(&self) -> Result<(RunConfig, Option<Resume>)> {
        let mut overrides = self.overrides.clone();
        if let Some(layout) = &self.layout {
            overrides.push(format!("train.layout={layout:?}"));
        }
        let config = RunConfig::load_resolved(&self.config, &overrides).map_err(anyhow::Error::msg)?;
        Ok((config, self.resume.clone().map(|r| r.map_or(Resume::Latest, Resume::From))))
    }
}
