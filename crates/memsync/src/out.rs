//! Standard output that tolerates a reader going away (`memsync info URL | head -1`).
//!
//! Rust ignores `SIGPIPE`, so a write to a closed pipe fails with `EPIPE`, and `println!` turns
//! that into a panic. The commands print through [`outln!`] instead: after the first
//! `EPIPE` further output is dropped and the command finishes its work (a mount still flushes)
//! as the shell expects of a filter's upstream. Restoring the default `SIGPIPE` action instead
//! would kill `serve`, `mount` and `proxy` when a peer closes a socket.

use std::fmt;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};

static CLOSED: AtomicBool = AtomicBool::new(false);

/// Writes `args` (and a newline if `newline`) to stdout; see the module doc.
pub fn write(args: fmt::Arguments<'_>, newline: bool) {
    if CLOSED.load(Ordering::Relaxed) {
        return;
    }
    let mut o = io::stdout().lock();
    let r = o
        .write_fmt(args)
        .and_then(|()| if newline { o.write_all(b"\n") } else { Ok(()) })
        .and_then(|()| if newline { o.flush() } else { Ok(()) });
    if let Err(e) = r {
        CLOSED.store(true, Ordering::Relaxed);
        if e.kind() != io::ErrorKind::BrokenPipe {
            tracing::warn!("writing to stdout: {e}");
        }
    }
}

/// `println!` that survives a closed stdout.
macro_rules! outln {
    () => {
        $crate::out::write(format_args!(""), true)
    };
    ($($t:tt)*) => {
        $crate::out::write(format_args!($($t)*), true)
    };
}
