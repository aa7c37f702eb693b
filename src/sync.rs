//! Locking shared maps.

/// Locks `mutex`, even if a thread panicked while holding it: nixery's locks guard maps, caches
/// and a queue whose every update is a single call, so a panic cannot leave one half-changed.
pub fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
