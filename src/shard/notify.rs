//! A single-waiter wake-up flag for tasks on one shard.
//!
//! Shard-local (`!Send`). Notifications coalesce: any number of `notify`
//! calls before the waiter runs wake it once, which is what batches a
//! connection's writes per loop turn.

use std::cell::Cell;
use std::future::poll_fn;
use std::task::{Poll, Waker};

/// Wakes one waiting task; see the module docs.
#[derive(Default)]
pub struct Notify {
    set: Cell<bool>,
    waker: Cell<Option<Waker>>,
}

impl Notify {
    /// Set the flag and wake the waiter, if any.
    pub fn notify(&self) {
        self.set.set(true);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// True when notified and not yet waited for.
    pub fn is_set(&self) -> bool {
        self.set.get()
    }

    /// Wait until notified, then clear the flag.
    pub async fn wait(&self) {
        poll_fn(|cx| {
            if self.set.replace(false) {
                return Poll::Ready(());
            }
            // Keep the waker already stored when it wakes the same task
            // (the common case: one waiter polled again and again).
            match self.waker.take() {
                Some(w) if w.will_wake(cx.waker()) => self.waker.set(Some(w)),
                _ => self.waker.set(Some(cx.waker().clone())),
            }
            Poll::Pending
        })
        .await
    }
}

impl std::fmt::Debug for Notify {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notify")
            .field("set", &self.set.get())
            .finish()
    }
}
