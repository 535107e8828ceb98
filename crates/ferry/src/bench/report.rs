//! How figures are printed: rates, percentiles and sizes, in the shapes README quotes.

use super::*;

/// A throughput measurement, ready to print.
pub(super) struct Figure {
    pub(super) done: u64,
    pub(super) target: u64,
    pub(super) elapsed: Duration,
    pub(super) timed_out: bool,
    /// The option whose time limit applied, named in the report when it cut the work short.
    pub(super) limit: &'static str,
}

pub(super) fn print_rate(label: &str, message_size: usize, figure: &Figure) {
    let seconds = figure.elapsed.as_secs_f64().max(1e-9);
    let rate = figure.done as f64 / seconds;
    let megabytes = rate * message_size as f64 / 1e6;
    let done = if figure.done < figure.target {
        format!("{} of {}", thousands(figure.done), thousands(figure.target))
    } else {
        thousands(figure.done)
    };
    let stopped = if figure.timed_out {
        format!(", stopped by {}", figure.limit)
    } else {
        String::new()
    };
    println!(
        "{label:<32}: {:>9} msgs/s {megabytes:>7.1} MB/s  ({done} msgs in {seconds:.2} s{stopped})",
        thousands(rate.round() as u64)
    );
}

/// The value below which a fraction `p` of the sorted samples lie (nearest rank).
pub(super) fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len().max(1));
    sorted.get(rank - 1).copied()
}

pub(super) fn millis(nanos: u64) -> String {
    format!("{:.2} ms", nanos as f64 / 1e6)
}

/// Bytes as MiB, the unit the kernel's memory figures and most disk tools use.
pub(super) fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

pub(super) fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut text = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            text.push(',');
        }
        text.push(digit);
    }
    text
}

/// "1KiB" or "128B", for the report.
pub(super) fn size_label(size: usize) -> String {
    if size.is_multiple_of(KIB) {
        format!("{}KiB", size / KIB)
    } else {
        format!("{size}B")
    }
}

/// "1k" or "128b", for channel names.
pub(super) fn size_word(size: usize) -> String {
    if size.is_multiple_of(KIB) {
        format!("{}k", size / KIB)
    } else {
        format!("{size}b")
    }
}
