//! What tasks that share state need: a lock that a panic does not poison, and a panic's message.

/// Locks `mutex`, even if a thread panicked while holding it: nixery's locks guard maps, caches
/// and a queue whose every update is a single call, so a panic cannot leave one half-changed.
pub fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The message a panic carried (`panic!("…")`), or a placeholder.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}
