//! Locking helpers shared by every thread kind.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks a mutex, recovering the data if a panicking thread poisoned it (the process is about
/// to report that failure anyway).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What a thread runs first, before its work (installing its seccomp filter, say); an error
/// stops the thread before it does anything.
pub type ThreadInit = std::sync::Arc<dyn Fn() -> Result<(), Box<dyn std::error::Error + Send + Sync>> + Send + Sync>;
