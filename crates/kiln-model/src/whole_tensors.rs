//! The whole model one tensor at a time (`Model::visit_whole`), assembled from the pipeline
//! stages' tensors and the tensor groups' blocks: what a checkpoint writes, with no rank
//! holding more of the whole model than the one tensor in hand. Under ZeRO-3 the weights are
//! gathered as they are visited (`Model::visit_weights`), a layer at a time.

use crate::error::Result;
use crate::model::{gather_layer, gather_outer, Model};
use crate::weights::TensorSpec;
use kiln_core::Backend;
use std::collections::HashMap;

/// A run of the whole model's tensors in `Weights::iter` order: the embedding, a layer, or the
/// tensors after the layers.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Segment {
    Embed,
    Layer(usize),
    Tail,
}

impl<B: Backend> Model<B> {
    /// Hands `visit` every tensor of the whole model in `whole_layout` order, with its values:
    /// under pipeline and tensor parallel assembled from the stages' tensors and the groups'
    /// blocks of this rank's tensors `local(i)` (`layout` order), a collective over them a
    /// tensor at a time; `local` itself otherwise. Tensors that `wanted` refuses (alike on
    /// every rank of the groups) are neither read nor joined. `visit` runs on a rank that
    /// passes `keep` (the others take part); after its first error it is not called again, the
    /// collectives go on, and the error is returned.
    pub fn visit_whole(
        &self,
        b: &B,
        local: &dyn Fn(usize) -> Vec<f32>,
        wanted: &dyn Fn(&TensorSpec) -> bool,
        keep: bool,
        visit: &mut dyn FnMut(&TensorSpec, &[f32]) -> Result<()>,
    ) -> Result<()> {
        let tp = self.tensor_parallel();
        let tp_first = tp.is_none_or(|tp| tp.group.rank() == 0);
        let local_specs = self.layout.iter();
        let stage_specs = tp.map(|tp| tp.whole_layout.iter());
        // This stage's whole tensor `i`: under tensor parallel from the group's blocks, on the
        // group's first rank (the one in the pipeline of the rank that writes).
        let stage_tensor = |i: usize| -> Option<Vec<f32>> {
            let values = local(i);
            match (tp, &stage_specs) {
                (Some(tp), Some(whole)) => tp.join_tensor(b, (whole[i], local_specs[i]), values, tp_first),
                _ => Some(values),
            }
        };
        let mut outcome = Ok(());
        let mut hand = |spec: &TensorSpec, values: Option<Vec<f32>>| {
            if let (Some(values), true) = (values, outcome.is_ok()) {
                outcome = visit(spec, &values);
            }
        };
        let whole = self.whole_layout().iter();
        match self.pipeline() {
            None => {
                for (i, spec) in whole.into_iter().enumerate().filter(|(_, spec)| wanted(spec)) {
                    hand(spec, stage_tensor(i).filter(|_| keep));
                }
            }
            Some(pp) => {
                let me = pp.stage();
                for (place, spec) in pp.places().into_iter().zip(whole).filter(|(_, spec)| wanted(spec)) {
                    let mine = place.local.filter(|_| place.owner == me).and_then(stage_tensor);
                    // Ranks past a group's first take part in its join only.
                    if tp_first {
                        let values = mine.as_deref().unwrap_or(&[]);
                        hand(spec, pp.join_tensor(b, spec, place.owner, values, keep));
                    }
                }
            }
        }
        outcome
    }

    /// `visit_whole` of the weights: a segment at a time (the embedding, each layer, the
    /// tensors after the layers), each read from the weights this rank holds. Under ZeRO-3 the
    /// tensors outside the layers are gathered before the embedding and each of the stage's
    /// layers before its own segment (collectives over the ranks of the shards: every one of
    /// them calls this, those that write no tensors with a `wanted` that refuses all), so a
    /// rank holds one gathered layer, never the whole model.
    pub fn visit_weights(
        &mut self,
        b: &B,
        wanted: &dyn Fn(&TensorSpec) -> bool,
        keep: bool,
        visit: &mut dyn FnMut(&TensorSpec, &[f32]) -> Result<()>,
    ) -> Result<()> {
        let whole = self.whole_layout();
        let mut segment_of: HashMap<String, Segment> = HashMap::from([(whole.embed.name.clone(), Segment::Embed)]);
        for (l, layer) in whole.layers.iter().enumerate() {
            segment_of.extend(layer.refs().into_iter().map(|spec| (spec.name.clone(), Segment::Layer(l))));
        }
        let whole_layers = whole.layers.len();
        let segment = |spec: &TensorSpec| segment_of.get(&spec.name).copied().unwrap_or(Segment::Tail);
        // The local index of each whole layer this stage holds.
        let held = self.config.stage.as_ref().map(|s| s.layers.clone());
        let local_of = |l: usize| held.as_ref().map_or(Some(l), |held| held.iter().position(|&g| g == l));
        // This rank's tensors in `layout` order: the embedding, each layer's, the rest.
        let layer_counts: Vec<usize> = self.layout.layers.iter().map(|l| l.refs().len()).collect();
        let layers_end = 1 + layer_counts.iter().sum::<usize>();
        // After `visit`'s first error it is not called again; the collectives go on.
        let mut failed = None;
        let mut visit_until_failed = |spec: &TensorSpec, values: &[f32]| {
            if failed.is_none() {
                failed = visit(spec, values).err();
            }
            Ok(())
        };
        let segments = [Segment::Embed].into_iter().chain((0..whole_layers).map(Segment::Layer));
        for seg in segments.chain([Segment::Tail]) {
            let local_layer = match seg {
                Segment::Layer(l) => local_of(l),
                _ => None,
            };
            match (seg, local_layer) {
                (Segment::Embed, _) => gather_outer(&mut self.shards, b, (&self.flat, &self.params)),
                (_, Some(l)) => {
                    let next = (l + 1 < self.config.num_layers).then_some(l + 1);
                    gather_layer(&mut self.shards, b, (&self.flat, &self.params), l, next)
                }
                _ => {}
            }
            let (outer, layer) = (self.outer_weights(b), local_layer.map(|l| self.layer_weights(b, l)));
            let (outer, layer) = (outer.iter(), layer.as_ref().map(|l| l.refs()));
            let first = local_layer.map_or(0, |l| 1 + layer_counts[..l].iter().sum::<usize>());
            let local = |i: usize| match (&layer, i) {
                (_, 0) => b.read(outer[0]),
                (Some(layer), i) if i < layers_end => b.read(layer[i - first]),
                (_, i) => b.read(outer[i - layers_end + 1]),
            };
            let wanted_here = |spec: &TensorSpec| segment(spec) == seg && wanted(spec);
            self.visit_whole(b, &local, &wanted_here, keep, &mut visit_until_failed)?;
        }
        failed.map_or(Ok(()), Err)
    }
}
