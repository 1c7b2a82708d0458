//! Training throughput of the decoder on CPU, for the PyTorch comparison.
//!
//! `cargo bench -p lvpipe-trainer --bench step` (the same as the release
//! binary's `lvpipe bench-step`). Prints one JSON line: best-of and median
//! step time and tokens/s over 10 steps after 2 warm-up steps. The binary
//! sets `CANDLE_BARRIER_POOL_SPIN_LIMIT=0` (src/main.rs says why); set it
//! here too to compare the two.

// A benchmark reports its measurements on stdout.
#![allow(clippy::print_stdout, clippy::print_stderr)]

fn main() {
    println!(
        "{}",
        lvpipe_trainer::bench::train_step_bench(10).expect("benchmark step")
    );
}
