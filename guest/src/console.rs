//! Console output through the per-vCPU page: a whole `print!` costs one exit. Each vCPU has its
//! own buffer, used with preemption off, so there is no lock.

use core::fmt::{self, Write};

use protocol::{CONSOLE_BUF, port};

use crate::arch;

struct Console {
    len: usize,
}

impl Console {
    fn flush(&mut self) {
        if self.len > 0 {
            arch::out32(port::CONSOLE_WRITE, self.len as u32);
            self.len = 0;
        }
    }
}

impl Console {
    fn put(&mut self, bytes: &[u8]) {
        let page = arch::cpu_page();
        for &b in bytes {
            if self.len == CONSOLE_BUF {
                self.flush();
            }
            // SAFETY: `page` is this vCPU's mapped CpuPage and len < CONSOLE_BUF; only this vCPU
            // writes its console buffer.
            unsafe { (*page).console[self.len] = b };
            self.len += 1;
        }
    }
}

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.put(s.as_bytes());
        Ok(())
    }
}

/// Prints formatted text (one exit per call, more if longer than the buffer).
pub fn print(args: fmt::Arguments<'_>) {
    let _g = crate::sched::NoPreempt::new();
    let mut c = Console { len: 0 };
    let _ = c.write_fmt(args);
    c.flush();
}

/// Prints raw bytes (invalid UTF-8 included).
pub fn write_bytes(bytes: &[u8]) {
    let _g = crate::sched::NoPreempt::new();
    let mut c = Console { len: 0 };
    c.put(bytes);
    c.flush();
}

/// Prints through the byte port, one exit per byte: slow, but needs nothing but the port, so it
/// works in exception handlers whatever state the buffer is in.
pub struct RawConsole;

impl Write for RawConsole {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            arch::out8(port::CONSOLE_PUTC, b);
        }
        Ok(())
    }
}

#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::console::print(format_args!($($arg)*)) };
}

#[macro_export]
macro_rules! println {
    () => { $crate::console::print(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::console::print(format_args!("{}\n", format_args!($($arg)*))) };
}
