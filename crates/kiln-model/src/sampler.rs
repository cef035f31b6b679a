//! Choosing the next token from a row of logits: greedy at temperature 0, else a draw from
//! softmax(logits / T) restricted, in this order, to the `top_k` likeliest tokens, the
//! smallest set whose probability reaches `top_p`, and the tokens at least `min_p` times as
//! likely as the likeliest. The log-prob reported is the model's own, log softmax(logits), of
//! the chosen token: what a training step computes for it.

use kiln_core::fast_exp::fast_exp;
use kiln_core::rng::Rng;

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0: greedy.
    pub temperature: f32,
    /// 0: off.
    pub top_k: usize,
    /// 1: off.
    pub top_p: f32,
    /// 0: off.
    pub min_p: f32,
    pub max_new_tokens: usize,
    /// Tokens that end a sequence (not included in its output).
    pub stop_ids: Vec<i32>,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.0, max_new_tokens: 256, stop_ids: Vec::new(), seed: 0 }
    }
}

/// `log softmax(logits)[token]` and the entropy of softmax(logits), in one pass:
///   with z_i = x_i − max x, Z = Σ e^{z_i}:  log p_token = z_token − log Z,
///   H = −Σ p_i log p_i = log Z − Σ e^{z_i} z_i / Z.
pub fn logprob_entropy(logits: &[f32], token: usize) -> (f32, f32) {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    // The exponentials vectorise in f32 (relative error below 2e-7); the sums are f64. A
    // masked (−∞) logit has probability 0 and adds nothing to either sum.
    let exps: Vec<f32> = logits.iter().map(|&x| if x > f32::NEG_INFINITY { fast_exp(x - max) } else { 0.0 }).collect();
    let (mut z_sum, mut weighted) = (0f64, 0f64);
    for (&x, &e) in logits.iter().zip(&exps).filter(|(_, &e)| e > 0.0) {
        z_sum += e as f64;
        weighted += e as f64 * (x - max) as f64;
    }
    let log_z = z_sum.ln();
    (((logits[token] - max) as f64 - log_z) as f32, (log_z - weighted / z_sum) as f32)
}

/// The next token under `p`, drawn with `rng`. Without filters it draws straight from the
/// softmax; filters sort only the candidates they keep.
pub fn sample(logits: &[f32], p: &SamplingParams, rng: &mut Rng) -> usize {
    let argmax =
        || logits.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b });
    if p.temperature <= 0.0 {
        return argmax().0;
    }
    let max = argmax().1;
    // e^((x − max)/T), exactly 0 for a masked (−∞) logit.
    let weight = |x: f32| if x > f32::NEG_INFINITY { fast_exp((x - max) / p.temperature) } else { 0.0 };
    if p.top_k == 0 && p.top_p >= 1.0 && p.min_p <= 0.0 {
        let weights: Vec<f32> = logits.iter().map(|&x| weight(x)).collect();
        let total: f64 = weights.iter().map(|&w| w as f64).sum();
        let mut u = rng.uniform() * total;
        for (i, &w) in weights.iter().enumerate() {
            u -= w as f64;
            if u <= 0.0 {
                return i;
            }
        }
        return logits.len() - 1;
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    let by_logit = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]);
    if p.top_k > 0 && p.top_k < order.len() {
        order.select_nth_unstable_by(p.top_k - 1, by_logit);
        order.truncate(p.top_k);
    }
    order.sort_unstable_by(by_logit);
    let mut probs: Vec<f64> = order.iter().map(|&i| weight(logits[i]) as f64).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|x| *x /= total);
    let mut keep = probs.len();
    if p.top_p < 1.0 {
        let mut cum = 0.0;
        keep = probs
            .iter()
            .position(|&x| {
                cum += x;
                cum >= p.top_p as f64
            })
            .map_or(keep, |i| i + 1);
    }
    if p.min_p > 0.0 {
        let floor = p.min_p as f64 * probs[0];
        keep = keep.min(probs.iter().take_while(|&&x| x >= floor).count().max(1));
    }
    let total: f64 = probs[..keep].iter().sum();
    let mut u = rng.uniform() * total;
    for (i, &x) in probs[..keep].iter().enumerate() {
        u -= x;
        if u <= 0.0 {
            return order[i];
        }
    }
    order[keep - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_and_draws_follow_the_distribution() {
        let logits = [2.0f32, 1.0, 0.0, -1.0, -5.0];
        let greedy = SamplingParams { temperature: 0.0, ..Default::default() };
        assert_eq!(sample(&logits, &greedy, &mut Rng::new(1)), 0);
        let draw = |p: &SamplingParams| {
            let mut rng = Rng::new(7);
            let mut counts = [0usize; 5];
            (0..20_000).for_each(|_| counts[sample(&logits, p, &mut rng)] += 1);
            counts
        };
        let counts = draw(&SamplingParams::default());
        let p0 = (2.0f64).exp() / logits.iter().map(|&x| (x as f64).exp()).sum::<f64>();
        assert!((counts[0] as f64 / 20_000.0 - p0).abs() < 0.02, "{counts:?} vs p0 {p0}");
        assert_eq!(draw(&SamplingParams { top_k: 2, ..Default::default() })[2..], [0, 0, 0]);
        // softmax ≈ [.64, .24, .09, .03, .0004]: top_p 0.8 keeps two tokens, min_p 0.2 keeps two.
        assert_eq!(draw(&SamplingParams { top_p: 0.8, ..Default::default() })[2..], [0, 0, 0]);
        assert_eq!(draw(&SamplingParams { min_p: 0.2, ..Default::default() })[2..], [0, 0, 0]);
        let (lp, entropy) = logprob_entropy(&logits, 0);
        assert!((lp as f64 - p0.ln()).abs() < 1e-6);
        let z: f64 = logits.iter().map(|&x| (x as f64).exp()).sum();
        let h: f64 = logits.iter().map(|&x| (x as f64).exp() / z).map(|p| -p * p.ln()).sum();
        assert!((entropy as f64 - h).abs() < 1e-6, "entropy {entropy} vs {h}");
        // A masked (−∞) logit changes neither, and is never drawn.
        let masked = [2.0f32, 1.0, 0.0, -1.0, -5.0, f32::NEG_INFINITY];
        let (lp, entropy) = logprob_entropy(&masked, 0);
        assert!((lp as f64 - p0.ln()).abs() < 1e-6 && (entropy as f64 - h).abs() < 1e-6, "{lp}, {entropy}");
        let mut rng = Rng::new(3);
        assert!((0..20_000).all(|_| sample(&masked, &SamplingParams::default(), &mut rng) != 5));
    }
}
