//! The order in which a pipeline stage runs the forwards and backwards of a micro-batch's
//! chunks and hands their activations and gradients to its neighbours.
//!
//! 1F1B (PipeDream-Flush, Megatron-LM's non-interleaved schedule), for stage s of P over m
//! chunks: a warm-up of w = min(P − s − 1, m) forwards, then one forward and one backward in
//! turn, then the backwards left. Stage s holds at most w + 1 chunks' activations (the first
//! stage P, not m), and the bubble is the one of GPipe, (P − 1) / (m + P − 1) of the step.
//!
//!   stage 0  F0 F1 F2 F3 B0 F4 B1 F5 B2 .. B5
//!   stage 3           F0 B0 F1 B1 F2 B2 .. B5
//!
//! Where a stage sends one chunk's output and receives another's gradient from the same
//! neighbour at that point, the two are one exchange (`SendForwardRecvBackward` meets the
//! neighbour's `SendBackwardRecvForward`), so every hand-over of a stage meets the same
//! hand-over of its neighbour, in the same order, and blocking exchanges cannot deadlock.
//!
//! `forwards_then_backwards` (GPipe) runs every forward first: for losses whose gradient needs
//! every chunk's forward (DPO's weights from whole-sequence log-probs).

/// How a training pass runs on a stage (`ChunkOrder::ops`). Under ZeRO-3 and expert parallel
/// the gathers and expert exchanges of every forward and backward are collectives of a stage's
/// data-parallel peers, so an idle pass (`Model::idle_pass`) follows the order of the passes
/// its peers run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkOrder {
    /// 1F1B (`one_forward_one_backward`; with interleaved stages, Megatron's interleaved 1F1B):
    /// losses weighted by the batch.
    OneForwardOneBackward,
    /// GPipe (`forwards_then_backwards`): losses whose token weights are chosen from every
    /// token's nll after the forwards (`Model::forward_backward_with`).
    ForwardsFirst,
    /// The whole batch as one chunk through the stages in turn (`Model::forward_hidden` and
    /// `backward_hidden`: reward models).
    Unchunked,
}

impl ChunkOrder {
    /// This order's schedule for stage `stage` of `stages` over `chunks` chunks.
    pub fn ops(self, stage: usize, stages: usize, chunks: usize) -> Vec<Op> {
        match self {
            Self::OneForwardOneBackward => one_forward_one_backward(stage, stages, chunks),
            Self::ForwardsFirst => forwards_then_backwards(stage, stages, chunks).concat(),
            Self::Unchunked => forwards_then_backwards(stage, stages, 1).concat(),
        }
    }
}

/// One step of a stage's schedule; the numbers are chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Receive a chunk's input (the previous stage's output).
    RecvForward(usize),
    Forward(usize),
    /// Send a chunk's output to the next stage.
    SendForward(usize),
    /// Send the first chunk's output to the next stage and receive the second's gradient from it.
    SendForwardRecvBackward(usize, usize),
    Backward(usize),
    /// Send dL/d(a chunk's input) to the previous stage.
    SendBackward(usize),
    /// Send the first chunk's input gradient to the previous stage and receive the second's
    /// input from it.
    SendBackwardRecvForward(usize, usize),
    /// Receive dL/d(a chunk's output) from the next stage.
    RecvBackward(usize),
}

/// 1F1B for stage `stage` of `stages` over `chunks` chunks.
pub fn one_forward_one_backward(stage: usize, stages: usize, chunks: usize) -> Vec<Op> {
    let (first, last) = (stage == 0, stage + 1 == stages);
    let warmup = (stages - stage - 1).min(chunks);
    let steady = chunks - warmup;
    let mut ops = Vec::new();
    for j in 0..warmup {
        if !first {
            ops.push(Op::RecvForward(j));
        }
        ops.push(Op::Forward(j));
        if !last {
            ops.push(Op::SendForward(j));
        }
    }
    if steady > 0 && !first {
        ops.push(Op::RecvForward(warmup));
    }
    for i in 0..steady {
        let j = warmup + i;
        ops.push(Op::Forward(j));
        if !last {
            ops.push(Op::SendForwardRecvBackward(j, i));
        }
        ops.push(Op::Backward(i));
        if !first {
            ops.push(if i + 1 == steady { Op::SendBackward(i) } else { Op::SendBackwardRecvForward(i, j + 1) });
        }
    }
    for i in steady..chunks {
        if !last {
            ops.push(Op::RecvBackward(i));
        }
        ops.push(Op::Backward(i));
        if !first {
            ops.push(Op::SendBackward(i));
        }
    }
    ops
}

/// GPipe for stage `stage` of `stages` over `chunks` chunks: every forward, then every
/// backward (the two returned apart, for what runs between them).
pub fn forwards_then_backwards(stage: usize, stages: usize, chunks: usize) -> [Vec<Op>; 2] {
    let (first, last) = (stage == 0, stage + 1 == stages);
    let (mut forwards, mut backwards) = (Vec::new(), Vec::new());
    for c in 0..chunks {
        if !first {
            forwards.push(Op::RecvForward(c));
        }
        forwards.push(Op::Forward(c));
        if !last {
            forwards.push(Op::SendForward(c));
            backwards.push(Op::RecvBackward(c));
        }
        backwards.push(Op::Backward(c));
        if !first {
            backwards.push(Op::SendBackward(c));
        }
    }
    [forwards, backwards]
}

/// The most chunks whose activations a stage holds at once under `ops`.
pub fn chunks_in_flight(ops: &[Op]) -> usize {
    let (mut live, mut most) = (0usize, 0usize);
    for op in ops {
        match op {
            Op::Forward(_) => {
                live += 1;
                most = most.max(live);
            }
            Op::Backward(_) => live -= 1,
            _ => {}
        }
    }
    most
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hand-overs of stage `s` with `s + 1`, as (chunk sent forward, chunk whose gradient
    /// comes back) pairs, seen from the lower stage; `upper` reads them from the upper one.
    fn with_next(ops: &[Op]) -> Vec<(Option<usize>, Option<usize>)> {
        ops.iter()
            .filter_map(|op| match *op {
                Op::SendForward(j) => Some((Some(j), None)),
                Op::SendForwardRecvBackward(j, i) => Some((Some(j), Some(i))),
                Op::RecvBackward(i) => Some((None, Some(i))),
                _ => None,
            })
            .collect()
    }

    fn with_prev(ops: &[Op]) -> Vec<(Option<usize>, Option<usize>)> {
        ops.iter()
            .filter_map(|op| match *op {
                Op::RecvForward(j) => Some((Some(j), None)),
                Op::SendBackwardRecvForward(i, j) => Some((Some(j), Some(i))),
                Op::SendBackward(i) => Some((None, Some(i))),
                _ => None,
            })
            .collect()
    }

    /// Each chunk runs forward then backward once, a forward after its input arrives and a
    /// backward after its output gradient does.
    fn assert_runs_every_chunk(ops: &[Op], stage: usize, stages: usize, chunks: usize) {
        let (mut input, mut grad, mut forward, mut backward) =
            (vec![stage == 0; chunks], vec![stage + 1 == stages; chunks], vec![false; chunks], vec![false; chunks]);
        for op in ops {
            match *op {
                Op::RecvForward(j) | Op::SendBackwardRecvForward(_, j) => input[j] = true,
                Op::RecvBackward(i) | Op::SendForwardRecvBackward(_, i) => grad[i] = true,
                Op::Forward(j) => {
                    assert!(input[j] && !forward[j], "stage {stage}: forward {j} without its input");
                    forward[j] = true;
                }
                Op::Backward(i) => {
                    assert!(forward[i] && grad[i] && !backward[i], "stage {stage}: backward {i} out of order");
                    backward[i] = true;
                }
                _ => {}
            }
        }
        assert!(forward.iter().chain(&backward).all(|&d| d), "stage {stage}: a chunk left undone");
    }

    /// Runs the stages' schedules with blocking hand-overs (one completes when both sides
    /// reach it) and says whether every stage reaches its end.
    fn completes_blocking(schedule: &[Vec<Op>]) -> bool {
        let mut at = vec![0; schedule.len()];
        loop {
            let mut moved = false;
            for s in 0..schedule.len() {
                let Some(&op) = schedule[s].get(at[s]) else { continue };
                let partner = match op {
                    Op::Forward(_) | Op::Backward(_) => {
                        at[s] += 1;
                        moved = true;
                        continue;
                    }
                    Op::SendForward(_) | Op::SendForwardRecvBackward(..) | Op::RecvBackward(_) => s + 1,
                    _ => s - 1,
                };
                let meets = schedule[partner].get(at[partner]).is_some_and(|&other| {
                    let (lower, upper) = if partner > s { (op, other) } else { (other, op) };
                    with_next(&[lower]) == with_prev(&[upper]) && !with_next(&[lower]).is_empty()
                });
                if meets {
                    (at[s], at[partner]) = (at[s] + 1, at[partner] + 1);
                    moved = true;
                }
            }
            if at.iter().zip(schedule).all(|(&a, ops)| a == ops.len()) {
                return true;
            }
            if !moved {
                return false;
            }
        }
    }

    #[test]
    fn neighbours_meet_in_every_hand_over_and_every_chunk_runs() {
        for stages in 1..6 {
            for chunks in 1..9 {
                let of = |order: ChunkOrder| (0..stages).map(|s| order.ops(s, stages, chunks)).collect::<Vec<_>>();
                let (ops, gpipe) = (of(ChunkOrder::OneForwardOneBackward), of(ChunkOrder::ForwardsFirst));
                for schedule in [&ops, &gpipe] {
                    for s in 0..stages {
                        assert_runs_every_chunk(&schedule[s], s, stages, chunks);
                        if s + 1 < stages {
                            assert_eq!(
                                with_next(&schedule[s]),
                                with_prev(&schedule[s + 1]),
                                "P={stages} m={chunks} s={s}"
                            );
                        }
                    }
                    assert!(completes_blocking(schedule), "P={stages} m={chunks}: a blocking hand-over waits forever");
                }
                for (s, stage) in ops.iter().enumerate() {
                    assert_eq!(chunks_in_flight(stage), (stages - s).min(chunks), "P={stages} m={chunks} s={s}");
                }
            }
        }
    }
}
