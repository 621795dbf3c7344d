//! Signals to the VMM process: SIGUSR1 dumps the stats while the VM runs; SIGTERM and SIGINT stop
//! it cleanly. And the signal that kicks a vCPU thread out of `KVM_RUN`.

use std::os::raw::{c_int, c_void};

use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
use signal_hook::iterator::{Handle, Signals};
use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

use crate::sync::ThreadInit;

/// What a process signal asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// SIGUSR1: print the stats.
    DumpStats,
    /// SIGTERM or SIGINT (named): stop the VM cleanly.
    Stop(&'static str),
}

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

/// Starts a thread that runs `init`, then calls `on_signal` for each SIGUSR1, SIGTERM and
/// SIGINT. If the handlers cannot be installed, the VM runs without them (and says so once).
pub fn forward(init: ThreadInit, on_signal: impl Fn(Request) + Send + 'static) -> SignalForwarder {
    let mut signals = match Signals::new([SIGUSR1, SIGTERM, SIGINT]) {
        Ok(s) => s,
        Err(e) => {
            log::warn!("signal handling is unavailable: {e}");
            return SignalForwarder(None);
        }
    };
    let handle = signals.handle();
    let spawned = std::thread::Builder::new().name("signals".into()).spawn(move || {
        if let Err(e) = init() {
            log::warn!("signal handling is unavailable: {e}");
            return;
        }
        for s in signals.forever() {
            on_signal(match s {
                SIGUSR1 => Request::DumpStats,
                SIGTERM => Request::Stop("SIGTERM"),
                _ => Request::Stop("SIGINT"),
            });
        }
    });
    if let Err(e) = spawned {
        log::warn!("signal handling is unavailable: {e}");
    }
    SignalForwarder(Some(handle))
}

/// The signal that kicks a vCPU thread out of `KVM_RUN` (its handler does nothing; the
/// interrupted ioctl returns `EINTR`).
pub fn vcpu_kick() -> c_int {
    SIGRTMIN()
}

extern "C" fn ignore(_: c_int, _: *mut libc::siginfo_t, _: *mut c_void) {}

/// Kicks vCPU thread `thread` out of `KVM_RUN` (or makes its next one return at once).
pub fn kick_vcpu(thread: libc::pthread_t) {
    // SAFETY: callers pass the pthread handles of this VM's vCPU threads, which run until the
    // VM ends; the signal's handler does nothing (the interrupted KVM_RUN returns EINTR).
    unsafe { libc::pthread_kill(thread, vcpu_kick()) };
}

/// Installs the (empty) handler of [`vcpu_kick`], so that the signal interrupts without killing.
pub fn install_vcpu_kick() -> std::io::Result<()> {
    register_signal_handler(vcpu_kick(), ignore).map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}
