//! An adaptive in-flight window for pipelined remote requests.
//!
//! The window (requests in flight) grows towards bandwidth × RTT and is never derived from a
//! thread count. It is delay-based AIMD, like TCP Vegas:
//! - every completed request measures its latency; the smallest latency seen recently is the
//!   base round-trip time (`min_rtt`, refreshed every few seconds so a changed path is noticed);
//! - while latencies stay close to `min_rtt` the pipe is not full: the window grows by one per
//!   completion (it doubles every round trip, like slow start) and, once latencies begin to rise,
//!   by one per window (additive increase);
//! - when latencies rise well above `min_rtt` requests are queueing at the bottleneck: the window
//!   shrinks by a fifth, at most once per round trip (multiplicative decrease);
//! - an error halves it.
//!
//! The resulting window is about `bandwidth × (min_rtt + small queueing allowance)`, which is
//! the bandwidth-delay product: enough to fill the path, and no more.

use std::time::{Duration, Instant};

/// Limits of a [`Window`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowLimits {
    /// Requests in flight at start.
    pub initial: usize,
    /// Never fewer than this.
    pub min: usize,
    /// Never more than this (bounds the memory in flight: `max × request size`).
    pub max: usize,
}

impl Default for WindowLimits {
    fn default() -> Self {
        WindowLimits {
            initial: 8,
            min: 1,
            max: 256,
        }
    }
}

/// The window controller. Not thread-safe by itself; the owner serialises calls.
#[derive(Debug)]
pub struct Window {
    limits: WindowLimits,
    w: f64,
    min_rtt: Option<Duration>,
    /// The minimum of the current measuring period (becomes `min_rtt` at the period's end).
    period_min: Option<Duration>,
    period_start: Instant,
    last_decrease: Instant,
    /// Completions since the window last changed direction (for the slow-start test).
    slow_start: bool,
}

/// How often `min_rtt` is re-measured.
const MIN_RTT_PERIOD: Duration = Duration::from_secs(5);

impl Window {
    /// A controller starting at `limits.initial`.
    pub fn new(limits: WindowLimits) -> Self {
        let limits = WindowLimits {
            min: limits.min.max(1),
            max: limits.max.max(limits.min.max(1)),
            initial: limits.initial.clamp(limits.min.max(1), limits.max.max(1)),
        };
        let now = Instant::now();
        Window {
            limits,
            w: limits.initial as f64,
            min_rtt: None,
            period_min: None,
            period_start: now,
            last_decrease: now,
            slow_start: true,
        }
    }

    /// Requests that may be in flight now.
    pub fn get(&self) -> usize {
        (self.w as usize).clamp(self.limits.min, self.limits.max)
    }

    /// The base round-trip time measured so far.
    pub fn min_rtt(&self) -> Option<Duration> {
        self.min_rtt
    }

    /// A request completed successfully after `latency`.
    pub fn on_success(&mut self, latency: Duration) {
        let now = Instant::now();
        self.period_min = Some(self.period_min.map_or(latency, |m| m.min(latency)));
        let base = match self.min_rtt {
            Some(m) if m <= latency => m,
            _ => {
                self.min_rtt = Some(latency);
                latency
            }
        };
        if now.duration_since(self.period_start) >= MIN_RTT_PERIOD {
            self.min_rtt = self.period_min.take();
            self.period_start = now;
        }
        let grow_below = base.mul_f64(1.5) + Duration::from_micros(1000);
        let shrink_above = base * 2 + Duration::from_millis(5);
        if latency <= grow_below {
            if self.slow_start {
                self.w += 1.0;
            } else {
                self.w += 1.0 / self.w.max(1.0);
            }
        } else if latency > shrink_above {
            if now.duration_since(self.last_decrease) > latency {
                self.w *= 0.8;
                self.last_decrease = now;
                self.slow_start = false;
            }
        } else {
            self.slow_start = false;
            self.w += 1.0 / self.w.max(1.0);
        }
        self.clamp();
    }

    /// A request failed.
    pub fn on_error(&mut self) {
        self.w /= 2.0;
        self.slow_start = false;
        self.clamp();
    }

    fn clamp(&mut self) {
        self.w = self.w.clamp(self.limits.min as f64, self.limits.max as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_while_latency_is_flat_and_shrinks_when_it_rises() {
        let mut w = Window::new(WindowLimits {
            initial: 4,
            min: 1,
            max: 1000,
        });
        for _ in 0..100 {
            w.on_success(Duration::from_millis(30));
        }
        assert!(w.get() >= 100, "{}", w.get());
        let before = w.get();
        std::thread::sleep(Duration::from_millis(2));
        w.on_success(Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(2));
        w.on_success(Duration::from_millis(1));
        // min_rtt is now 1 ms; 30 ms means heavy queueing.
        std::thread::sleep(Duration::from_millis(35));
        w.on_success(Duration::from_millis(30));
        assert!(w.get() < before, "{} !< {before}", w.get());
        let b = w.get();
        w.on_error();
        assert!(w.get() <= b / 2 + 1);
    }

    #[test]
    fn stays_within_limits() {
        let mut w = Window::new(WindowLimits {
            initial: 100,
            min: 2,
            max: 10,
        });
        assert_eq!(w.get(), 10);
        for _ in 0..20 {
            w.on_error();
        }
        assert_eq!(w.get(), 2);
    }
}
