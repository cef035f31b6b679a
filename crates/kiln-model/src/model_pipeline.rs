//! The model's side of pipeline parallel (`pipeline`): keeping one stage of a whole model, and
//! handing the last stage's results to every stage.

use crate::flat::FlatLayout;
use crate::model::{expert_count, layout_of, upload_flat, Model};
use crate::pipeline::{self, Pipeline};
use kiln_core::Backend;
use kiln_dist::Comm;
use std::sync::Arc;

impl<B: Backend> Model<B> {
    /// The stages this rank's model is one of, under pipeline parallel.
    pub fn pipeline(&self) -> Option<&Pipeline<B>> {
        self.pipeline.as_ref()
    }

    /// Pipeline parallel: keeps only this rank's stage (`group.rank()` of `group.size()`) of
    /// the whole model it holds: its layers, and the embedding and head where the stage uses
    /// them. Collective over `group`. Refuses a model or a stage count the engine cannot cut
    /// (the reason, for the caller to name the run's setting). Cut the stages before the
    /// tensors (`split_tensors`).
    pub fn split_stages(&mut self, b: &B, group: Arc<dyn Comm<B::Slice>>) -> Result<(), String> {
        assert!(
            self.pipeline.is_none() && self.tensor_parallel().is_none() && !self.params_sharded(),
            "a whole model to cut into stages"
        );
        let stage_config = pipeline::stage_config(&self.config, group.rank(), group.size())?;
        let pp = Pipeline::new(group, &self.config).map_err(|e| format!("{e:#}"))?;
        let layout = layout_of(&stage_config, self.expert_parallel.as_ref());
        let flat = FlatLayout::new(&layout);
        let params = upload_flat(b, &flat, &pp.select(&self.tensors(b), &layout));
        self.expert_load = layout.layers.iter().map(|l| vec![0; expert_count(l)]).collect();
        (self.config, self.layout, self.flat, self.params) = (stage_config, layout, Arc::new(flat), params);
        self.pipeline = Some(pp);
        Ok(())
    }

    /// Whether this rank computes the head and the loss: not an earlier pipeline stage.
    pub(crate) fn holds_head(&self) -> bool {
        self.pipeline.as_ref().is_none_or(Pipeline::is_last)
    }

    /// `values` (`len` of them) of the last pipeline stage on every stage; `values` itself
    /// without pipeline parallel.
    pub(crate) fn from_last_stage(&self, b: &B, values: &[f32], len: usize, what: &str) -> Vec<f32> {
        match &self.pipeline {
            Some(pp) => pp.from_last(b, values, len, what),
            None => values.to_vec(),
        }
    }

    /// `value` of the last pipeline stage on every stage.
    pub(crate) fn scalar_from_last_stage(&self, value: f64, what: &str) -> f64 {
        match &self.pipeline {
            Some(pp) => pp.scalar_from_last(value, what),
            None => value,
        }
    }
}
