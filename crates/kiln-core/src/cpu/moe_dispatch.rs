//! Dispatch of a routing: a stable counting sort of the (token, choice) slots by expert.
//!
//!   rows[e]          = #slots routed to e
//!   first[e]         = Σ_{e' < e} rows[e']
//!   row(slot)        = first[expert(slot)] + #earlier slots routed to the same expert
//!   order[row(s)]    = s / top_k (the token),  row_weights[row(s)] = weights[s]
//!   slot_rows[s]     = row(s)

pub fn dispatch(
    order: &mut [i32],
    row_weights: &mut [f32],
    slot_rows: &mut [i32],
    indices: &[i32],
    weights: &[f32],
    experts: usize,
    top_k: usize,
) -> Vec<usize> {
    let slots = indices.len();
    assert!(
        weights.len() == slots && order.len() == slots && row_weights.len() == slots && slot_rows.len() == slots,
        "moe_dispatch: {slots} slots, buffers of {}, {}, {}, {}",
        weights.len(),
        order.len(),
        row_weights.len(),
        slot_rows.len()
    );
    let mut rows = vec![0usize; experts];
    for &e in indices {
        assert!(e >= 0 && (e as usize) < experts, "moe_dispatch: expert {e} outside 0..{experts}");
        rows[e as usize] += 1;
    }
    let mut next: Vec<usize> = rows.iter().scan(0, |at, &r| Some(std::mem::replace(at, *at + r))).collect();
    for (slot, &e) in indices.iter().enumerate() {
        let row = next[e as usize];
        next[e as usize] += 1;
        order[row] = (slot / top_k) as i32;
        row_weights[row] = weights[slot];
        slot_rows[slot] = row as i32;
    }
    rows
}
