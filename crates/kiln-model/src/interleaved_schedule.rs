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
//! The stages run in lockstep ticks (`ticks`): in a tick each stage runs its next task if its
//! input (the previous virtual stage's output, or the next one's gradient) arrived in an
//! earlier tick, and then every stage hands what its task produced to its neighbour in one
//! collective over the pipeline (an all-to-all in which each stage sends at most one
//! message). A schedule is simulated the same on every rank, so each knows what every tick
//! sends and receives; a stall (no stage able to move) is a bug the tests would see.

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

/// One tick: the task each stage runs (if any), then the messages their tasks send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tick {
    pub tasks: Vec<Option<Task>>,
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
    fn message(&self, stage: usize, task: Task) -> Option<Message> {
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
            ChunkOrder::Interleaved => (2 * (p - stage - 1) + (v - 1) * p + more_warmup).min(m * v),
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
                    (0..self.stages).map(|s| self.tasks(s, ChunkOrder::Interleaved, false, more)).collect();
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
            let mut tick = Tick { tasks: vec![None; p], messages: Vec::new() };
            for s in 0..p {
                let Some(&task) = tasks[s].get(at[s]) else { continue };
                let i = index(task.part, task.chunk);
                let ready = if task.backward { done[s][i] && gradient[s][i] } else { input[s][i] };
                if ready {
                    done[s][i] |= !task.backward;
                    tick.tasks[s] = Some(task);
                    tick.messages.extend(self.message(s, task));
                    at[s] += 1;
                }
            }
            if tick.tasks.iter().all(Option::is_none) {
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

/// Which activation slot of its part each (part, chunk) of stage `stage` takes: a slot from
/// the tick its input arrives (or, on the first virtual stage, its forward runs) until the end
/// of the tick its backward (with `forward_only` its forward) runs. Returns the slot of each
/// `part · chunks + chunk` and the slots each part needs.
pub fn slots(shape: &Shape, ticks: &[Tick], stage: usize, forward_only: bool) -> (Vec<usize>, Vec<usize>) {
    let m = shape.chunks;
    let mut slot = vec![usize::MAX; shape.parts * m];
    let mut free: Vec<Vec<usize>> = vec![Vec::new(); shape.parts];
    let mut count = vec![0; shape.parts];
    for tick in ticks {
        let mut arrivals: Vec<(usize, usize)> = (tick.messages.iter())
            .filter(|msg| msg.to == stage && !msg.gradient)
            .map(|msg| (msg.part, msg.chunk))
            .collect();
        if let Some(task) = tick.tasks[stage].filter(|t| !t.backward && shape.is_first_virtual(stage, t.part)) {
            arrivals.push((task.part, task.chunk));
        }
        for (part, chunk) in arrivals {
            slot[part * m + chunk] = free[part].pop().unwrap_or_else(|| {
                count[part] += 1;
                count[part] - 1
            });
        }
        if let Some(task) = tick.tasks[stage].filter(|t| t.backward || forward_only) {
            free[task.part].push(slot[task.part * m + task.chunk]);
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
                    let ran: Vec<Task> = ticks.iter().filter_map(|t| t.tasks[s]).collect();
                    let mut once = ran.clone();
                    once.sort_by_key(|t| (t.backward, t.part, t.chunk));
                    once.dedup();
                    assert_eq!(once.len(), ran.len(), "P={p} V={v} m={m}: stage {s} runs a task twice");
                    assert_eq!(ran.len(), if forward_only { v * m } else { 2 * v * m });
                }
                // A task's input comes from the tick before at the latest; each stage sends at
                // most one message a tick.
                for (t, tick) in ticks.iter().enumerate() {
                    for (s, task) in tick.tasks.iter().enumerate() {
                        let Some(task) = task else { continue };
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
                    for s in 0..p {
                        assert!(tick.messages.iter().filter(|msg| msg.from == s).count() <= 1);
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
        let stage0 = sh.tasks(0, ChunkOrder::Interleaved, false, 0);
        // Warm-up 2·(2 − 0 − 1) + (2 − 1)·2 = 4 forwards, then one forward and one backward.
        assert_eq!(stage0[..8], [f(0, 0), f(0, 1), f(1, 0), f(1, 1), f(0, 2), b(1, 0), f(0, 3), b(1, 1)]);
        let stage1 = sh.tasks(1, ChunkOrder::Interleaved, false, 0);
        assert_eq!(stage1[..4], [f(0, 0), f(0, 1), f(1, 0), b(1, 0)]);
    }

    #[test]
    fn interleaving_shortens_the_pass_and_slots_follow_the_chunks_in_flight() {
        // In ticks of one task, with backwards as long as forwards: 1F1B over P = 4, m = 8
        // takes 2m + 2(P − 1) ticks; two parts of half the layers, 4m + 2(P − 1) ticks of half
        // the work.
        let ticks_of = |v: usize| shape(4, v, 8).one_forward_one_backward();
        assert_eq!(ticks_of(1).len(), 2 * 8 + 2 * 3);
        let (one, two) = (ticks_of(1).len() as f64, ticks_of(2).len() as f64 / 2.0);
        assert!(two < one, "interleaved {two} against {one} layer-ticks");
        let sh = shape(4, 2, 8);
        let ticks = sh.one_forward_one_backward();
        for s in 0..4 {
            let (slot, count) = slots(&sh, &ticks, s, false);
            assert!(slot.iter().all(|&x| x != usize::MAX));
            // At most the first stage's warm-up forwards, the one in the steady state, and an
            // input that arrived early: 2(P − 1) + (V − 1)P + 2 slots of half a stage.
            let live: usize = count.iter().sum();
            assert!(live <= 2 * 3 + 4 + 2, "stage {s}: {count:?}");
        }
    }
}
