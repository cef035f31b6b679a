//! The whole model one tensor at a time (`Model::visit_whole`), assembled from the pipeline
//! stages' tensors and the tensor groups' blocks: what a checkpoint writes, with no rank
//! holding more of the whole model than the one tensor in hand.

use crate::error::Result;
use crate::model::Model;
use crate::weights::TensorSpec;
use kiln_core::Backend;

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
}
