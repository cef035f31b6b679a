//! Interleaved stages (Megatron-LM's virtual pipeline): each of the P stages holds V runs of
//! layers (parts), virtual stage k = v·P + s being stage s's part v, so a chunk passes the
//! stages V times and the pipeline fills and drains V times faster: the bubble falls from
//! (P − 1)/m to (P − 1)/(V·m) of a step of m chunks, for V times as many hand-overs.
//!
//! Each stage runs its tasks in Megatron's order: chunks in groups of P, each group through
//! part 0, then part 1, .. (forwards), and the same groups through the parts last to first
//! (backwards); a warm-up of 2(P − s − 1) + (V − 1)·P forwards, then one forward and one
//! backward in turn, then the backwards left. With `ForwardsFirst` every forward comes first.
//!
//!   stage 0 (P = 2, V = 2, m = 4):  F0⁰ F1⁰ F0¹ F1¹ F2⁰ B0¹ F3⁰ B1¹ F2¹ B0⁰ ..
//!
//! The stages run in lockstep ticks (`ticks`): in a tick each stage runs its next tasks, at
//! most one forward and one backward, whose inputs (the previous virtual stage's output, or
//! the next one's gradient) arrived in an earlier tick, and then every stage hands what its
//! tasks produced to its neighbours in one collective over the pipeline (an all-to-all). A
//! tick of one forward and one backward on every stage in the steady state keeps the stages
//! busy alike: with a backward twice a forward, the ticks take exactly the time of
//! free-running 1F1B (a tick of one task each would idle a forward's stage beside a
//! backward's). A schedule is simulated the same on every rank, so each knows what every
//! tick sends and receives; a stage that would wait for ever makes the warm-up longer
//! (`one_forward_one_backward`).

use crate::pipeline_schedule::ChunkOrder;

/// A forward or a backward of one chunk through one part of a stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Task {
    pub backward: bool,
    pub part: usize,
    pub chunk: usize,
}

/// What a task hands to a neighbour: a part's output to the virtual stage after it, or the
/// gradient of a part's input to the one before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Message {
    pub from: usize,
    pub to: usize,
    /// A gradient (backward) or an activation (forward).
    pub gradient: bool,
    /// The part of `to` that takes it, and the chunk.
    pub part: usize,
    pub chunk: usize,
}

/// One tick: the tasks each stage runs (at most a forward and a backward, in order), then
/// the messages their tasks send, in stage and task order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tick {
    pub tasks: Vec<Vec<Task>>,
    pub messages: Vec<Message>,
}

/// The shape of an interleaved pipeline pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub stages: usize,
    pub parts: usize,
    pub chunks: usize,
}

impl Shape {
    fn is_first_virtual(&self, stage: usize, part: usize) -> bool {
        stage == 0 && part == 0
    }

    fn is_last_virtual(&self, stage: usize, part: usize) -> bool {
        stage + 1 == self.stages && part + 1 == self.parts
    }

    /// The message `task` on `stage` sends, if any.
    pub fn message(&self, stage: usize, task: Task) -> Option<Message> {
        let Task { backward, part, chunk } = task;
        let p = self.stages;
        if backward {
            (!self.is_first_virtual(stage, part)).then(|| Message {
                from: stage,
                to: (stage + p - 1) % p,
                gradient: true,
                part: if stage == 0 { part - 1 } else { part },
                chunk,
            })
        } else {
            (!self.is_last_virtual(stage, part)).then(|| Message {
                from: stage,
                to: (stage + 1) % p,
                gradient: false,
                part: if stage + 1 == p { part + 1 } else { part },
                chunk,
            })
        }
    }

    /// Stage `stage`'s tasks in their order (`order`: interleaved 1F1B, with `more_warmup`
    /// forwards more than Megatron's warm-up, or every forward first; `forward_only` leaves
    /// out the backwards).
    pub fn tasks(&self, stage: usize, order: ChunkOrder, forward_only: bool, more_warmup: usize) -> Vec<Task> {
        let (p, v, m) = (self.stages, self.parts, self.chunks);
        let pass = |backward: bool| {
            let mut tasks = Vec::with_capacity(m * v);
            for group in (0..m).step_by(p) {
                let chunks = group..(group + p).min(m);
                for j in 0..v {
                    let part = if backward { v - 1 - j } else { j };
                    tasks.extend(chunks.clone().map(|chunk| Task { backward, part, chunk }));
                }
            }
            tasks
        };
        let forwards = pass(false);
        if forward_only {
            return forwards;
        }
        let backwards = pass(true);
        let warmup = match order {
            ChunkOrder::OneForwardOneBackward => (2 * (p - stage - 1) + (v - 1) * p + more_warmup).min(m * v),
            ChunkOrder::ForwardsFirst | ChunkOrder::Unchunked => m * v,
        };
        let mut tasks = forwards[..warmup].to_vec();
        for (f, b) in forwards[warmup..].iter().zip(&backwards) {
            tasks.extend([*f, *b]);
        }
        tasks.extend(&backwards[m * v - warmup..]);
        tasks
    }

    /// The ticks of interleaved 1F1B. Megatron's warm-up assumes whole groups of P chunks;
    /// where the last group is shorter and the stages would wait on each other, every stage
    /// warms up with one forward more, until none waits (at worst every forward first).
    pub fn one_forward_one_backward(&self) -> Vec<Tick> {
        (0..=self.chunks * self.parts)
            .find_map(|more| {
                let tasks: Vec<Vec<Task>> =
                    (0..self.stages).map(|s| self.tasks(s, ChunkOrder::OneForwardOneBackward, false, more)).collect();
                self.ticks(&tasks, false)
            })
            .expect("every forward first never waits")
    }

    /// The ticks of every forward (Megatron's order of them) and then of every backward.
    pub fn forwards_then_backwards(&self) -> [Vec<Tick>; 2] {
        let of = |s: usize| self.tasks(s, ChunkOrder::ForwardsFirst, false, 0);
        let all: Vec<Vec<Task>> = (0..self.stages).map(of).collect();
        let half = self.chunks * self.parts;
        let forwards: Vec<Vec<Task>> = all.iter().map(|t| t[..half].to_vec()).collect();
        let backwards: Vec<Vec<Task>> = all.iter().map(|t| t[half..].to_vec()).collect();
        let never = "forwards in Megatron's order never wait for ever";
        [self.ticks(&forwards, false).expect(never), self.ticks(&backwards, true).expect(never)]
    }

    /// The ticks of a pass whose stages run `tasks` (stage s's in `tasks[s]`), every forward
    /// done before them with `forwarded` (the backward half of `ForwardsFirst`); `None` where
    /// the stages would wait on each other for ever.
    pub fn ticks(&self, tasks: &[Vec<Task>], forwarded: bool) -> Option<Vec<Tick>> {
        let (p, v, m) = (self.stages, self.parts, self.chunks);
        // What each stage has: inputs (and gradients) arrived, forwards done; by (part, chunk).
        let index = |part: usize, chunk: usize| part * m + chunk;
        let mut input: Vec<Vec<bool>> =
            (0..p).map(|s| (0..v * m).map(|i| self.is_first_virtual(s, i / m)).collect()).collect();
        let mut gradient: Vec<Vec<bool>> =
            (0..p).map(|s| (0..v * m).map(|i| self.is_last_virtual(s, i / m)).collect()).collect();
        let mut done = vec![vec![forwarded; v * m]; p];
        let mut at = vec![0; p];
        let mut ticks = Vec::new();
        while at.iter().zip(tasks).any(|(&a, t)| a < t.len()) {
            let mut tick = Tick { tasks: vec![Vec::new(); p], messages: Vec::new() };
            for s in 0..p {
                while let Some(&task) = tasks[s].get(at[s]) {
                    let i = index(task.part, task.chunk);
                    let ready = if task.backward { done[s][i] && gradient[s][i] } else { input[s][i] };
                    if !ready || tick.tasks[s].iter().any(|t| t.backward == task.backward) {
                        break;
                    }
                    done[s][i] |= !task.backward;
                    tick.tasks[s].push(task);
                    tick.messages.extend(self.message(s, task));
                    at[s] += 1;
                }
            }
            if tick.tasks.iter().all(Vec::is_empty) {
                return None;
            }
            for msg in &tick.messages {
                let arrived = if msg.gradient { &mut gradient } else { &mut input };
                arrived[msg.to][index(msg.part, msg.chunk)] = true;
            }
            ticks.push(tick);
        }
        Some(ticks)
    }
}

/// Which activation slot each (part, chunk) of stage `stage` takes, in the pool of its part
/// (`pool_of`: parts laid out alike share one): a slot from its forward until the end of the
/// tick its backward (with `forward_only` its forward) runs. An input that arrives before its
/// forward waits in a buffer of its own (`part_slots::Inbox`), not in a slot. Returns the slot
/// of each `part · chunks + chunk` and the slots each pool needs.
pub fn slots(
    shape: &Shape,
    ticks: &[Tick],
    (stage, pool_of): (usize, &[usize]),
    forward_only: bool,
) -> (Vec<usize>, Vec<usize>) {
    let m = shape.chunks;
    let pools = pool_of.iter().max().map_or(0, |p| p + 1);
    let mut slot = vec![usize::MAX; shape.parts * m];
    let mut free: Vec<Vec<usize>> = vec![Vec::new(); pools];
    let mut count = vec![0; pools];
    for tick in ticks {
        for t in tick.tasks[stage].iter().filter(|t| !t.backward) {
            let pool = pool_of[t.part];
            slot[t.part * m + t.chunk] = free[pool].pop().unwrap_or_else(|| {
                count[pool] += 1;
                count[pool] - 1
            });
        }
        for t in tick.tasks[stage].iter().filter(|t| t.backward || forward_only) {
            free[pool_of[t.part]].push(slot[t.part * m + t.chunk]);
        }
    }
    (slot, count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(stages: usize, parts: usize, chunks: usize) -> Shape {
        Shape { stages, parts, chunks }
    }

    #[test]
    fn every_task_runs_once_after_its_input_and_no_schedule_stalls() {
        for (p, v, m) in (1..5).flat_map(|p| (1..4).flat_map(move |v| (1..9).map(move |m| (p, v, m)))) {
            let sh = shape(p, v, m);
            let [forwards, backwards] = sh.forwards_then_backwards();
            for (ticks, forward_only) in [
                (sh.one_forward_one_backward(), false),
                ([forwards.clone(), backwards].concat(), false),
                (forwards, true),
            ] {
                for s in 0..p {
                    let ran: Vec<Task> = ticks.iter().flat_map(|t| t.tasks[s].clone()).collect();
                    let mut once = ran.clone();
                    once.sort_by_key(|t| (t.backward, t.part, t.chunk));
                    once.dedup();
                    assert_eq!(once.len(), ran.len(), "P={p} V={v} m={m}: stage {s} runs a task twice");
                    assert_eq!(ran.len(), if forward_only { v * m } else { 2 * v * m });
                }
                // A task's input comes from the tick before at the latest; a stage runs at most
                // a forward and a backward a tick.
                for (t, tick) in ticks.iter().enumerate() {
                    for (s, tasks) in tick.tasks.iter().enumerate() {
                        assert!(tasks.len() <= 2 && (tasks.len() < 2 || tasks[0].backward != tasks[1].backward));
                        for task in tasks {
                            let first = sh.is_first_virtual(s, task.part) && !task.backward;
                            let last = sh.is_last_virtual(s, task.part) && task.backward;
                            if !first && !last {
                                let wanted = |msg: &Message| {
                                    msg.to == s
                                        && msg.gradient == task.backward
                                        && (msg.part, msg.chunk) == (task.part, task.chunk)
                                };
                                assert!(ticks[..t].iter().any(|k| k.messages.iter().any(wanted)), "P={p} V={v} m={m}");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn megatron_order_on_two_stages_of_two_parts() {
        let sh = shape(2, 2, 4);
        let f = |part, chunk| Task { backward: false, part, chunk };
        let b = |part, chunk| Task { backward: true, part, chunk };
        let stage0 = sh.tasks(0, ChunkOrder::OneForwardOneBackward, false, 0);
        // Warm-up 2·(2 − 0 − 1) + (2 − 1)·2 = 4 forwards, then one forward and one backward.
        assert_eq!(stage0[..8], [f(0, 0), f(0, 1), f(1, 0), f(1, 1), f(0, 2), b(1, 0), f(0, 3), b(1, 1)]);
        let stage1 = sh.tasks(1, ChunkOrder::OneForwardOneBackward, false, 0);
        assert_eq!(stage1[..4], [f(0, 0), f(0, 1), f(1, 0), b(1, 0)]);
    }

    /// A pass's time in ticks whose length is their slowest stage's tasks, a forward of a
    /// whole stage taking 1 and a backward 2 (a part's 1/V of them).
    fn pass_time(sh: &Shape, ticks: &[Tick]) -> f64 {
        let cost = |t: &Task| if t.backward { 2.0 } else { 1.0 } / sh.parts as f64;
        ticks.iter().map(|tick| tick.tasks.iter().map(|ts| ts.iter().map(cost).sum::<f64>()).fold(0.0, f64::max)).sum()
    }

    #[test]
    fn interleaving_shrinks_the_bubble_v_fold_and_slots_follow_the_chunks_in_flight() {
        // Every stage computes 3m; 1F1B's bubble adds 3(P − 1), V parts 3(P − 1)/V: the
        // lockstep ticks lose nothing to free-running stages (m a multiple of P).
        for (p, m) in [(2, 4), (2, 8), (4, 8), (4, 16)] {
            for v in [1, 2, 4] {
                let sh = shape(p, v, m);
                let time = pass_time(&sh, &sh.one_forward_one_backward());
                let expected = 3.0 * m as f64 + 3.0 * (p - 1) as f64 / v as f64;
                assert!((time - expected).abs() < 1e-9, "P={p} V={v} m={m}: {time} against {expected}");
            }
        }
        let sh = shape(4, 2, 8);
        let ticks = sh.one_forward_one_backward();
        for s in 0..4 {
            // Parts laid out alike share a pool: at most Megatron's warm-up forwards,
            // 2(P − s − 1) + (V − 1)P, and the steady state's one (a tick's forward takes its
            // slot before the backward beside it gives one back), slots of half a stage.
            let (slot, count) = slots(&sh, &ticks, (s, &[0, 0]), false);
            assert!(slot.iter().all(|&x| x != usize::MAX));
            assert_eq!(count, [2 * (4 - s - 1) + 4 + 1], "stage {s}");
            // Pools of their own hold a part's forwards until its backwards begin.
            let (_, apart) = slots(&sh, &ticks, (s, &[0, 1]), false);
            assert!(apart.iter().sum::<usize>() > count[0], "stage {s}: {apart:?}");
        }
    }
}
