//! SIGUSR1 dumps the stats while the VM runs.

use signal_hook::consts::SIGUSR1;
use signal_hook::iterator::{Handle, Signals};

/// Stops forwarding when dropped.
#[derive(Debug)]
pub struct SignalForwarder(Option<Handle>);

impl Drop for SignalForwarder {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.close();
        }
    }
}

/// Starts a thread that calls `on_signal` for each SIGUSR1. If the handler cannot be
/// installed, the VM runs without it (and says so once).
pub fn forward_sigusr1(on_signal: impl Fn() + Send + 'static) -> SignalForwarder {
    let mut signals = match Signals::new([SIGUSR1]) {
        Ok(s) => s,
        Err(e) => {
            log::warn!("SIGUSR1 stats dumps are unavailable: {e}");
            return SignalForwarder(None);
        }
    };
    let handle = signals.handle();
    let spawned = std::thread::Builder::new().name("signals".into()).spawn(move || {
        for _ in signals.forever() {
            on_signal();
        }
    });
    if let Err(e) = spawned {
        log::warn!("SIGUSR1 stats dumps are unavailable: {e}");
    }
    SignalForwarder(Some(handle))
}
