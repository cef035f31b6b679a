//! Collectives started now and finished later (`Comm::start_all_gather_v`, `Comm::finish`),
//! so that a rank computes while the values travel: ZeRO-3 gathers the next layer's weights
//! behind the current layer's compute this way. A started collective owns the buffer it
//! writes until it is finished, so nothing reads it early or frees it while MPI writes it.

use std::ops::DerefMut;

/// A buffer a started collective owns: a backend's buffer, boxed.
pub type Owned<T> = Box<dyn DerefMut<Target = T> + Send + Sync>;

/// What completes a started collective (MPI's request, with what it reads until then).
pub trait Completion: Send {
    /// Progresses the collective; whether it has completed.
    fn test(&mut self) -> bool;
}

/// A collective under way and the buffer it writes.
pub struct InFlight<T: ?Sized> {
    /// The collective, in errors ("all_reduce").
    op: &'static str,
    /// None once complete.
    completion: Option<Box<dyn Completion>>,
    out: Option<Owned<T>>,
}

impl<T: ?Sized> InFlight<T> {
    /// A collective that completed as it started.
    pub fn done(out: Owned<T>) -> Self {
        Self { op: "collective", completion: None, out: Some(out) }
    }

    /// A collective `op` that `completion` completes, writing into `out`.
    pub fn pending(op: &'static str, completion: Box<dyn Completion>, out: Owned<T>) -> Self {
        Self { op, completion: Some(completion), out: Some(out) }
    }

    /// Which collective it is.
    pub fn op(&self) -> &'static str {
        self.op
    }

    /// Progresses it; whether it has completed.
    pub fn test(&mut self) -> bool {
        if self.completion.as_mut().is_some_and(|c| c.test()) {
            self.completion = None;
        }
        self.completion.is_none()
    }

    /// The buffer back, holding the result. Only once `test` says it completed.
    pub fn into_out(mut self) -> Owned<T> {
        assert!(self.completion.is_none(), "a collective's buffer taken back before it completed");
        self.out.take().expect("the buffer of a collective")
    }
}

impl<T: ?Sized> Drop for InFlight<T> {
    /// One dropped before it completed (a rank unwinding) leaks its buffer, which the
    /// collective may still write: waiting could hang on ranks that never arrive.
    fn drop(&mut self) {
        if self.completion.is_some() {
            std::mem::forget(self.out.take());
        }
    }
}
