//! The head of a sequence-classification model (`score`, `[labels, hidden]`, a reward model's
//! with one label): a sequence's scores are the head applied to the final hidden state (after
//! the last norm) of its last token. A causal LM becomes a reward model with a new head and
//! its `config.json` rewritten as transformers' `...ForSequenceClassification`.
//!
//!   h_i = xf[t_i];  s_i = h_i·Wₛᵀ
//!   ∂L/∂Wₛ += Σ_i (∂L/∂s_i)ᵀ·h_i;  ∂L/∂xf[t_i] = ∂L/∂s_i·Wₛ   (0 at other tokens)

use crate::activations::Activations;
use crate::batch::Batch;
use crate::error::{Error, Result};
use crate::grad_sink::GradSink;
use crate::model::Model;
use crate::model_share::ModelShare;
use kiln_core::{Backend, Matmul};
use serde_json::json;
use std::path::Path;

impl<B: Backend> Model<B> {
    /// A causal LM directory loaded as a reward model: its transformer, and a new `score`
    /// head (`[1, hidden]`, N(0, 0.02²) drawn with `seed`) in place of the LM head (which is
    /// not read), as transformers' `AutoModelForSequenceClassification.from_pretrained(dir,
    /// num_labels=1)` builds one. A directory that already is one (a reward checkpoint) loads
    /// as it is. Of this rank's `share` of the model (`load_share`).
    pub fn load_as_reward_model(b: &B, dir: &Path, seed: u64, share: ModelShare<B>) -> Result<Self> {
        Self::load_share(b, dir, share, Some(seed))
    }

    /// Rows of `[labels, hidden]` in the score head (panics without one).
    fn labels(&self) -> usize {
        self.config.num_labels.expect("a sequence-classification model (a score head)")
    }

    /// The final hidden states of the batch's tokens `positions`, `[positions.len(), hidden]`.
    fn hidden_at(&self, b: &B, acts: &Activations<B>, positions: &B::Index, k: usize) -> B::Buf {
        let d = self.config.hidden_size;
        let mut h = b.zeros(k * d);
        b.embedding_forward(&mut h, &acts.xf, positions, d);
        h
    }

    /// The scores (`[positions.len(), labels]`) of the batch's tokens `positions` (indices into
    /// its `rows × seq` tokens), after `forward_hidden`.
    pub fn score_forward(&self, b: &B, acts: &Activations<B>, positions: &[i32]) -> Vec<f32> {
        let (k, d, labels) = (positions.len(), self.config.hidden_size, self.labels());
        if !self.holds_head() {
            return self.last_stage_values(b, &[], k * labels, "pipeline: scores");
        }
        let h = self.hidden_at(b, acts, &b.upload_index(positions), k);
        let head = self.outer_weights(b).score.expect("a score head");
        let mut scores = b.zeros(k * labels);
        b.matmul(&mut scores, &h, head, Matmul::linear(k, d, labels));
        let scores = b.read(&scores);
        self.last_stage_values(b, &scores, k * labels, "pipeline: scores")
    }

    /// Backward from `dscores` = ∂L/∂scores of the tokens `positions` through the head and the
    /// transformer (after `forward_hidden` over `batch`); parameter gradients go into `grads`.
    pub fn score_backward(
        &mut self,
        b: &B,
        acts: &mut Activations<B>,
        batch: &Batch,
        positions: &[i32],
        dscores: &[f32],
        grads: &mut dyn GradSink<B>,
    ) {
        if !self.holds_head() {
            return self.backward_hidden(b, acts, batch, grads);
        }
        let (k, d, labels) = (positions.len(), self.config.hidden_size, self.labels());
        let index = b.upload_index(positions);
        let h = self.hidden_at(b, acts, &index, k);
        let ds = b.upload(dscores);
        let dscore = grads.outer(b).score.expect("a score head's gradient");
        b.matmul(dscore, &ds, &h, Matmul::linear_dw(k, d, labels));
        let mut dh = b.zeros(k * d);
        b.matmul(
            &mut dh,
            &ds,
            self.outer_weights(b).score.expect("a score head"),
            Matmul::linear_dx(k, d, labels, false),
        );
        let s = acts.grad.as_mut().expect("activations were laid out for inference, not training");
        b.fill(&mut s.dxn, 0.0);
        b.embedding_backward(&mut s.dxn, &dh, &index, d);
        self.backward_hidden(b, acts, batch, grads);
    }
}

/// `config.json` (in `dir`) of the reward model made from a causal LM:
/// `...ForSequenceClassification`, one label, and a pad token (transformers pools the last
/// non-pad token).
pub fn reward_config_json(dir: &Path, pad: Option<u32>) -> Result<Vec<u8>> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::new(&path, format!("cannot read: {e}")))?;
    let mut c: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::new(&path, format!("invalid JSON: {e}")))?;
    let family = match c["architectures"].get(0).and_then(|a| a.as_str()) {
        Some(a) => a.split("For").next().unwrap_or(a).to_string(),
        None => match c["model_type"].as_str().unwrap_or("") {
            "deepseek_v3" => "DeepseekV3".into(),
            "qwen2" => "Qwen2".into(),
            "qwen3" => "Qwen3".into(),
            "mistral" => "Mistral".into(),
            _ => "Llama".into(),
        },
    };
    c["architectures"] = json!([format!("{family}ForSequenceClassification")]);
    c["num_labels"] = 1.into();
    c["id2label"] = json!({"0": "LABEL_0"});
    c["label2id"] = json!({"LABEL_0": 0});
    if let (true, Some(pad)) = (c["pad_token_id"].is_null(), pad) {
        c["pad_token_id"] = pad.into();
    }
    let text = serde_json::to_string_pretty(&c).map_err(|e| Error::new(&path, format!("cannot encode: {e}")))?;
    Ok((text + "\n").into_bytes())
}
