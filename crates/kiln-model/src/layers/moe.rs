//! DeepSeekMoE feed-forward layer: a router picks `top_k` of `experts` SwiGLU experts per
//! token (see `kiln_core::Routing`), the chosen experts' outputs are summed with the routing
//! weights, and shared experts (one dense SwiGLU MLP of width `shared · expert_ff`) see every
//! token.
//!
//!   r = top-k-route(x·W_rᵀ);  y = Σ_j r_j · E_{i_j}(x) + S(x)
//!   E_e(x) = (silu(min(x·G_eᵀ, L)) ⊙ clamp(x·U_eᵀ, ±L))·D_eᵀ
//!
//! Scores are σ (V3) or √softplus (V4), and V4's hash layers take their experts from a frozen
//! token table instead of the top-k; L is V4's `swiglu_limit` (infinite for V3).
//!
//! Dispatch sorts the (token, choice) pairs by expert, so each expert runs one matrix product
//! over its contiguous rows (`grouped_matmul`): no per-token loops, no dense all-experts
//! compute. Backward runs the same steps in reverse; the correction bias gets no gradient.
//! Under expert parallel (`layers::expert_parallel`) the sorted rows travel to the ranks that
//! hold their experts and back, between dispatch and combine. Under tensor parallel each
//! expert's width is cut (`tensor_parallel`): the output is a partial sum, and so is a routing
//! weight's gradient ⟨dy, E(x)⟩, all-reduced over the group before the router's backward.

use super::expert_parallel::{Exchange, ExpertParallel};
use super::moe_aux_loss::{seq_aux_loss, SeqAux};
use crate::tensor_parallel::TensorParallel;
pub use crate::weights::MoeWeights;
use kiln_core::{Backend, GroupedMatmul, Matmul, Precision, Routing};

/// Sizes of a MoE layer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MoeShape {
    pub hidden: usize,
    /// Width of one routed expert.
    pub expert_ff: usize,
    pub experts: usize,
    /// Width of the shared MLP (`n_shared_experts · expert_ff`); 0 for none.
    pub shared_ff: usize,
    pub routing: Routing,
    /// Inputs of the experts' matrix products (the router's are always f32).
    pub precision: Precision,
    /// Clamp of every expert's gate and up projections (`MoeConfig::swiglu_limit`).
    pub limit: f32,
}

impl MoeShape {
    /// The shape of `cfg`'s MoE layers.
    pub fn new(cfg: &crate::config::Config) -> Option<Self> {
        let m = cfg.moe.as_ref()?;
        let routing = Routing {
            scoring: m.scoring,
            fixed: false,
            tokens: 0,
            experts: m.experts,
            top_k: m.top_k,
            groups: m.groups,
            top_groups: m.top_groups,
            normalize: m.normalize,
            scale: m.routed_scaling_factor,
        };
        let (hidden, expert_ff, experts, shared_ff) =
            (cfg.hidden_size, m.expert_ff, m.experts, m.shared_experts * m.expert_ff);
        let limit = m.swiglu_limit;
        Some(Self { hidden, expert_ff, experts, shared_ff, routing, precision: Precision::F32, limit })
    }
}

/// What forward keeps for backward, laid out once for `tokens` tokens.
pub struct MoeActs<B: Backend> {
    tokens: usize,
    logits: B::Buf,
    scores: B::Buf,
    route_w: B::Buf,
    route_idx: B::Index,
    /// Dispatched row → token, and the routing weight of each row, in expert order; the row of
    /// each (token, choice) slot.
    order: B::Index,
    row_w: B::Buf,
    slot_rows: B::Index,
    /// Rows per expert (the layer's load), the one thing the host reads back.
    pub rows: Vec<usize>,
    xs: B::Buf,
    g: B::Buf,
    u: B::Buf,
    h: B::Buf,
    y: B::Buf,
    y_scaled: B::Buf,
    shared: Option<(B::Buf, B::Buf, B::Buf)>,
    /// Under expert parallel: the exchange, and the expert side's inputs and activations
    /// (`xs`, `g`, `u`, `h` above are then the dispatched rows only).
    remote: Option<Remote<B>>,
}

/// What this rank's experts computed for the rows other ranks sent them.
struct Remote<B: Backend> {
    exchange: Exchange<B>,
    xs: B::Buf,
    g: B::Buf,
    u: B::Buf,
    h: B::Buf,
}

/// An expert-parallel layer: the group, and the layer's index for naming its exchanges.
pub type ExpertGroup<'a, B> = Option<(&'a ExpertParallel<B>, usize)>;

impl<B: Backend> MoeActs<B> {
    /// The experts each token was routed to by the last forward, `top_k` per token in
    /// descending order of biased score.
    pub fn routes(&self, b: &B) -> Vec<i32> {
        b.read_index(&self.route_idx)
    }

    /// The layer's load over its first `tokens` tokens: every token's (`rows`), or, for a
    /// pipeline chunk padded with rows of no one's, those before the padding.
    pub fn load_of(&self, b: &B, tokens: usize) -> Vec<usize> {
        if tokens >= self.tokens {
            return self.rows.clone();
        }
        let routes = self.routes(b);
        let k = routes.len() / self.tokens.max(1);
        let mut load = vec![0; self.rows.len()];
        routes[..tokens * k].iter().for_each(|&e| load[e as usize] += 1);
        load
    }

    /// The experts of each token, `top_k` per token, for a layer routed by a frozen table.
    pub fn set_routes(&mut self, b: &B, experts: &[i32]) {
        b.write_index(&mut self.route_idx, experts);
    }

    pub fn new(b: &B, s: &MoeShape, tokens: usize) -> Self {
        let (k, d, ff) = (s.routing.top_k, s.hidden, s.expert_ff);
        let rows = tokens * k;
        Self {
            tokens,
            logits: b.zeros(tokens * s.experts),
            scores: b.zeros(tokens * s.experts),
            route_w: b.zeros(rows),
            route_idx: b.upload_index(&vec![0; rows]),
            order: b.upload_index(&vec![0; rows]),
            row_w: b.zeros(rows),
            slot_rows: b.upload_index(&vec![0; rows]),
            rows: vec![0; s.experts],
            xs: b.zeros(rows * d),
            g: b.zeros(rows * ff),
            u: b.zeros(rows * ff),
            h: b.zeros(rows * ff),
            y: b.zeros(rows * d),
            y_scaled: b.zeros(rows * d),
            shared: (s.shared_ff > 0).then(|| {
                let n = tokens * s.shared_ff;
                (b.zeros(n), b.zeros(n), b.zeros(n))
            }),
            remote: None,
        }
    }
}

fn routing(s: &MoeShape, tokens: usize) -> Routing {
    Routing { tokens, ..s.routing }
}

/// `[rows, d_out] (+)= X·W_eᵀ` per expert, `W` stored `[experts, d_out, d_in]`.
fn experts_linear<B: Backend>(
    b: &B,
    precision: Precision,
    y: &mut B::Slice,
    x: &B::Slice,
    w: &B::Slice,
    rows: &[usize],
    (d_in, d_out): (usize, usize),
) {
    b.grouped_matmul(y, x, w, rows, GroupedMatmul { n: d_out, k: d_in, trans_b: true, accumulate: false, precision });
}

/// Backward of `experts_linear`: `dW_e += dYᵀ·X`, and `dX (+)= dY·W_e`.
#[allow(clippy::too_many_arguments)]
fn experts_linear_backward<B: Backend>(
    b: &B,
    precision: Precision,
    dx: &mut B::Slice,
    accumulate: bool,
    dw: &mut B::Slice,
    dy: &B::Slice,
    x: &B::Slice,
    w: &B::Slice,
    rows: &[usize],
    (d_in, d_out): (usize, usize),
) {
    b.grouped_matmul_weight_grad(
        dw,
        dy,
        x,
        rows,
        GroupedMatmul { n: d_out, k: d_in, trans_b: true, accumulate: true, precision },
    );
    b.grouped_matmul(dx, dy, w, rows, GroupedMatmul { n: d_in, k: d_out, trans_b: false, accumulate, precision });
}

/// The routed experts over their rows `xs` (`rows[e]` per expert, in order):
/// `y = (silu(xs·G_eᵀ) ⊙ xs·U_eᵀ)·D_eᵀ`, keeping `g`, `u`, `h` for backward.
#[allow(clippy::too_many_arguments)]
fn experts_forward<B: Backend>(
    b: &B,
    s: &MoeShape,
    w: &MoeWeights<&B::Slice>,
    rows: &[usize],
    xs: &B::Slice,
    (g, u, h): (&mut B::Slice, &mut B::Slice, &mut B::Slice),
    y: &mut B::Slice,
) {
    let (d, ff) = (s.hidden, s.expert_ff);
    experts_linear(b, s.precision, g, xs, w.gate, rows, (d, ff));
    experts_linear(b, s.precision, u, xs, w.up, rows, (d, ff));
    b.swiglu_forward(h, g, u, s.limit);
    experts_linear(b, s.precision, y, h, w.down, rows, (ff, d));
}

/// Backward of `experts_forward` from `dy`: the experts' weight gradients into `gw`, dL/dxs
/// into `dxs`; `scratch` holds dh, dg, du.
#[allow(clippy::too_many_arguments)]
fn experts_backward<B: Backend>(
    b: &B,
    s: &MoeShape,
    (w, gw): (&MoeWeights<&B::Slice>, &mut MoeWeights<&mut B::Slice>),
    rows: &[usize],
    (xs, g, u, h): (&B::Slice, &B::Slice, &B::Slice, &B::Slice),
    dy: &B::Slice,
    (dh, dg, du): (&mut B::Slice, &mut B::Slice, &mut B::Slice),
    dxs: &mut B::Slice,
) {
    let (d, ff) = (s.hidden, s.expert_ff);
    experts_linear_backward(b, s.precision, dh, false, gw.down, dy, h, w.down, rows, (ff, d));
    b.swiglu_backward(dg, du, dh, g, u, s.limit);
    experts_linear_backward(b, s.precision, dxs, false, gw.gate, dg, xs, w.gate, rows, (d, ff));
    experts_linear_backward(b, s.precision, dxs, true, gw.up, du, xs, w.up, rows, (d, ff));
}

/// Expert parallel, forward: sends the dispatched rows `xs` (`rows[e]` for each of the layer's
/// experts) to the ranks holding their experts, runs this rank's experts on what it receives,
/// and brings the outputs back into `y`.
fn remote_forward<B: Backend>(
    b: &B,
    s: &MoeShape,
    w: &MoeWeights<&B::Slice>,
    (ep, layer): (&ExpertParallel<B>, usize),
    rows: &[usize],
    xs: &B::Slice,
    y: &mut B::Slice,
) -> Remote<B> {
    let (d, ff) = (s.hidden, s.expert_ff);
    let exchange = Exchange::new(b, ep, layer, rows);
    let r = exchange.rows();
    let xs = exchange.to_experts(b, xs, d, "dispatch");
    let (mut g, mut u, mut h, mut y_local) = (b.zeros(r * ff), b.zeros(r * ff), b.zeros(r * ff), b.zeros(r * d));
    experts_forward(b, s, w, &exchange.local_rows, &xs, (&mut g, &mut u, &mut h), &mut y_local);
    exchange.to_sources(b, &y_local, y, d, "combine");
    Remote { exchange, xs, g, u, h }
}

/// Expert parallel, backward: sends the output gradients `dy` of the dispatched rows to the
/// experts' ranks, runs this rank's experts' backward (weight gradients into `g`), and brings
/// the input gradients back into `dxs`.
fn remote_backward<B: Backend>(
    b: &B,
    s: &MoeShape,
    (w, g): (&MoeWeights<&B::Slice>, &mut MoeWeights<&mut B::Slice>),
    r: &Remote<B>,
    dy: &B::Slice,
    dxs: &mut B::Slice,
) {
    let (d, ff) = (s.hidden, s.expert_ff);
    let ex = &r.exchange;
    let dy = ex.to_experts(b, dy, d, "output gradients");
    let rows = ex.rows();
    let (mut dh, mut dg, mut du) = (b.zeros(rows * ff), b.zeros(rows * ff), b.zeros(rows * ff));
    let mut dxs_local = b.zeros(rows * d);
    let acts = (&*r.xs, &*r.g, &*r.u, &*r.h);
    experts_backward(b, s, (w, g), &ex.local_rows, acts, &dy, (&mut dh, &mut dg, &mut du), &mut dxs_local);
    ex.to_sources(b, &dxs_local, dxs, d, "input gradients");
}

/// A rank with no tokens of its own serving its experts to the rest of its group.
pub struct Served<B: Backend>(Remote<B>);

/// `forward` of a rank with no tokens: its experts run on the rows the group sends them.
pub fn serve_forward<B: Backend>(
    b: &B,
    s: &MoeShape,
    w: &MoeWeights<&B::Slice>,
    ep: (&ExpertParallel<B>, usize),
) -> Served<B> {
    Served(remote_forward(b, s, w, ep, &vec![0; s.experts], &b.zeros(0), &mut b.zeros(0)))
}

/// `backward` of a rank with no tokens: its experts' weight gradients from the group's rows.
pub fn serve_backward<B: Backend>(
    b: &B,
    s: &MoeShape,
    (w, g): (&MoeWeights<&B::Slice>, &mut MoeWeights<&mut B::Slice>),
    served: &Served<B>,
) {
    remote_backward(b, s, (w, g), &served.0, &b.zeros(0), &mut b.zeros(0));
}

/// Frees buffers laid out for experts computed here, under expert parallel (once).
fn release<B: Backend, const N: usize>(b: &B, bufs: [&mut B::Buf; N]) {
    for buf in bufs {
        if b.len(buf) > 0 {
            *buf = b.zeros(0);
        }
    }
}

/// `out = MoE(x)` for `[tokens, hidden]` x; keeps what backward needs in `a`. With `out`
/// `None` only what backward needs is computed.
pub fn forward<B: Backend>(
    b: &B,
    s: &MoeShape,
    w: &MoeWeights<&B::Slice>,
    x: &B::Slice,
    out: Option<&mut B::Slice>,
    a: &mut MoeActs<B>,
    ep: ExpertGroup<B>,
) {
    let (n, d, k, e) = (a.tokens, s.hidden, s.routing.top_k, s.experts);
    b.matmul(&mut a.logits, x, w.router, Matmul::linear(n, d, e));
    // A layer without correction bias routes by a frozen table: `route_idx` holds its choices
    // (`MoeActs::set_routes`), and the logits stand in for the bias, which is not read.
    let spec = Routing { fixed: w.bias.is_none(), ..routing(s, n) };
    b.moe_route_forward(&mut a.route_w, &mut a.route_idx, &mut a.scores, &a.logits, w.bias.unwrap_or(x), spec);

    a.rows = b.moe_dispatch(&mut a.order, &mut a.row_w, &mut a.slot_rows, &a.route_idx, &a.route_w, e, k);

    b.embedding_forward(&mut a.xs, x, &a.order, d);
    match ep {
        None => experts_forward(b, s, w, &a.rows, &a.xs, (&mut a.g, &mut a.u, &mut a.h), &mut a.y),
        Some((ep, layer)) => {
            // The experts' activations live in `Remote`, sized by the rows received.
            release(b, [&mut a.g, &mut a.u, &mut a.h]);
            a.remote = Some(remote_forward(b, s, w, (ep, layer), &a.rows, &a.xs, &mut a.y));
        }
    }
    if let (Some(sg), Some(su), Some((g, u, h))) = (&w.shared_gate, &w.shared_up, &mut a.shared) {
        b.matmul(g, x, sg, Matmul::linear(n, d, s.shared_ff).in_precision(s.precision).of_weight());
        b.matmul(u, x, su, Matmul::linear(n, d, s.shared_ff).in_precision(s.precision).of_weight());
        b.swiglu_forward(h, g, u, s.limit);
    }
    let Some(out) = out else { return };
    match (&w.shared_down, &a.shared) {
        (Some(sd), Some((_, _, h))) => {
            b.matmul(out, h, sd, Matmul::linear(n, s.shared_ff, d).in_precision(s.precision).of_weight())
        }
        _ => b.fill(out, 0.0),
    }
    b.copy(&mut a.y_scaled, &a.y);
    b.scale_rows(&mut a.y_scaled, &a.row_w);
    b.embedding_backward(out, &a.y_scaled, &a.order, d);
}

/// Gradient scratch for `backward`, laid out once.
pub struct MoeGrads<B: Backend> {
    dy: B::Buf,
    dh: B::Buf,
    dg: B::Buf,
    du: B::Buf,
    dxs: B::Buf,
    drow_w: B::Buf,
    dlogits: B::Buf,
    droute_w: B::Buf,
    /// The balance loss's gradient of the router logits.
    daux: B::Buf,
    shared: Option<(B::Buf, B::Buf, B::Buf)>,
}

impl<B: Backend> MoeGrads<B> {
    pub fn new(b: &B, s: &MoeShape, tokens: usize) -> Self {
        let rows = tokens * s.routing.top_k;
        Self {
            dy: b.zeros(rows * s.hidden),
            dh: b.zeros(rows * s.expert_ff),
            dg: b.zeros(rows * s.expert_ff),
            du: b.zeros(rows * s.expert_ff),
            dxs: b.zeros(rows * s.hidden),
            drow_w: b.zeros(rows),
            dlogits: b.zeros(tokens * s.experts),
            droute_w: b.zeros(rows),
            daux: b.zeros(tokens * s.experts),
            shared: (s.shared_ff > 0).then(|| {
                let n = tokens * s.shared_ff;
                (b.zeros(n), b.zeros(n), b.zeros(n))
            }),
        }
    }
}

/// Backward of `forward`: adds dL/dx into `dx` and parameter gradients into `g` (not the
/// bias). With `aux` (given only when its α is not 0), the sequence-wise balance loss joins
/// the router's gradient; returns its value (0 without). Under tensor parallel (`tp`) `dx` gets
/// this rank's partial sum.
#[allow(clippy::too_many_arguments)]
pub fn backward<B: Backend>(
    b: &B,
    s: &MoeShape,
    w: &MoeWeights<&B::Slice>,
    x: &B::Slice,
    dout: &B::Slice,
    dx: &mut B::Slice,
    g: &mut MoeWeights<&mut B::Slice>,
    a: &MoeActs<B>,
    t: &mut MoeGrads<B>,
    aux: Option<&SeqAux>,
    tp: Option<&TensorParallel<B>>,
) -> f64 {
    let (n, d, k, e) = (a.tokens, s.hidden, s.routing.top_k, s.experts);
    // Shared MLP.
    if let (Some(sg), Some(su), Some(sd), Some(dsg), Some(dsu), Some(dsd), Some((ag, au, ah)), Some((dh, dg, du))) = (
        &w.shared_gate,
        &w.shared_up,
        &w.shared_down,
        &mut g.shared_gate,
        &mut g.shared_up,
        &mut g.shared_down,
        &a.shared,
        &mut t.shared,
    ) {
        let sff = s.shared_ff;
        b.matmul(dsd, dout, ah, Matmul::linear_dw(n, sff, d).in_precision(s.precision));
        b.matmul(dh, dout, sd, Matmul::linear_dx(n, sff, d, false).in_precision(s.precision));
        b.swiglu_backward(dg, du, dh, ag, au, s.limit);
        b.matmul(dsg, dg, x, Matmul::linear_dw(n, d, sff).in_precision(s.precision));
        b.matmul(dsu, du, x, Matmul::linear_dw(n, d, sff).in_precision(s.precision));
        b.matmul(dx, dg, sg, Matmul::linear_dx(n, d, sff, true).in_precision(s.precision));
        b.matmul(dx, du, su, Matmul::linear_dx(n, d, sff, true).in_precision(s.precision));
    }
    // Combine: out[token] += w_row · y_row.
    b.embedding_forward(&mut t.dy, dout, &a.order, d);
    b.row_dot(&mut t.drow_w, &t.dy, &a.y);
    b.scale_rows(&mut t.dy, &a.row_w);
    // Experts, here or on the ranks that hold them.
    match &a.remote {
        None => {
            let acts = (&*a.xs, &*a.g, &*a.u, &*a.h);
            let scratch = (&mut *t.dh, &mut *t.dg, &mut *t.du);
            experts_backward(b, s, (w, g), &a.rows, acts, &t.dy, scratch, &mut t.dxs);
        }
        Some(r) => {
            release(b, [&mut t.dh, &mut t.dg, &mut t.du]);
            remote_backward(b, s, (w, g), r, &t.dy, &mut t.dxs);
        }
    }
    // Dispatch: xs_row = x[token].
    b.embedding_backward(dx, &t.dxs, &a.order, d);
    // Router: routing weights back to (token, choice) order, then through the router.
    b.embedding_forward(&mut t.droute_w, &t.drow_w, &a.slot_rows, 1);
    if let Some(tp) = tp {
        tp.sum(&mut t.droute_w, "MoE routing weight gradient");
    }
    b.moe_route_backward(
        &mut t.dlogits,
        &t.droute_w,
        &a.scores,
        &a.route_idx,
        Routing { fixed: w.bias.is_none(), ..routing(s, n) },
    );
    let mut aux_loss = 0.0;
    if let Some(aux) = aux {
        let mut daux = vec![0f32; n * e];
        aux_loss = seq_aux_loss(&b.read(&a.scores), &b.read_index(&a.route_idx), k, aux, &mut daux);
        b.write(&mut t.daux, &daux);
        b.add_assign(&mut t.dlogits, &t.daux);
    }
    b.matmul(g.router, &t.dlogits, x, Matmul::linear_dw(n, d, e));
    // The router is whole on every rank of a tensor group: rank 0 adds its dL/dx.
    if tp.is_none_or(|tp| tp.adds_whole_terms()) {
        b.matmul(dx, &t.dlogits, w.router, Matmul::linear_dx(n, d, e, true));
    }
    aux_loss
}
