//! Benchmark (numbers, not pass/fail): what the ring's link encryption
//! (every segment sealed with AES-256-GCM by the sending thread and opened
//! by the receiving one) costs in all-reduce throughput. One ring of N
//! ranks (threads of one process) on loopback TCP all-reduces an f32
//! buffer, rounds alternating between sealed links (the product's) and
//! plaintext ones (`TcpRing::plaintext_links_for_benchmark_only`, which
//! exists for this comparison only), so both see the same machine at the
//! same time.
//!
//!     cargo run --release -p rsb-collective --features bench --example ring_encryption_bench -- [--ranks N] [--rounds R] [--mib SIZE]...
//!
//! It first prints how fast one thread seals and opens 1 MiB messages (what
//! bounds a link across hosts). Defaults: 2 ranks, 5 rounds of each, 25 and
//! 100 MiB. For each size it
//! prints every round's time and algorithm bandwidth (buffer bytes / time,
//! MB/s), the median of each mode, and the ratio sealed / plaintext.

// A benchmark, not library code: a failed setup step may just panic.
#![allow(clippy::unwrap_used)]

mod support;

use rsb_collective::ring::{cipher_rates_for_benchmark_only, RingConfig, TcpRing};
use rsb_collective::{Buffer, Collective};
use std::time::Instant;
use support::form_rings;

/// One all-reduce of `floats` on every rank, its links sealed or not:
/// the slowest rank's seconds. Checks the sums.
fn all_reduce_seconds(rings: &mut [TcpRing], buffers: &mut [Vec<f32>], plaintext: bool) -> f64 {
    let n = rings.len();
    let barrier = std::sync::Barrier::new(n);
    let times: Vec<f64> = std::thread::scope(|s| {
        let handles: Vec<_> = rings
            .iter_mut()
            .zip(buffers.iter_mut())
            .map(|(ring, data)| {
                let barrier = &barrier;
                s.spawn(move || {
                    ring.plaintext_links_for_benchmark_only(plaintext);
                    data.fill(1.0);
                    barrier.wait();
                    let t = Instant::now();
                    ring.all_reduce_sum(Buffer::Host(data)).unwrap();
                    let seconds = t.elapsed().as_secs_f64();
                    assert!(data.iter().all(|&v| v == n as f32), "wrong sums");
                    seconds
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    times.into_iter().fold(0.0, f64::max)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mut ranks, mut rounds, mut sizes) = (2usize, 5usize, Vec::new());
    let mut i = 0;
    while i < args.len() {
        let value = || args.get(i + 1).expect("a value after the flag");
        match args[i].as_str() {
            "--ranks" => ranks = value().parse().expect("--ranks N"),
            "--rounds" => rounds = value().parse().expect("--rounds R"),
            "--mib" => sizes.push(value().parse::<usize>().expect("--mib SIZE")),
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    if sizes.is_empty() {
        sizes = vec![25, 100];
    }
    let (seal, open) = cipher_rates_for_benchmark_only(1 << 20, 512);
    println!(
        "one thread, 1 MiB messages: seals {:.2} GB/s (copy included), opens {:.2} GB/s",
        seal / 1e9,
        open / 1e9
    );
    println!("{{\"cipher_seal_gbs\":{:.3},\"cipher_open_gbs\":{:.3}}}", seal / 1e9, open / 1e9);
    let mut rings = form_rings(ranks, &RingConfig::default());
    println!("{ranks}-rank ring on loopback TCP, {rounds} rounds of each mode, alternating");
    for mib in sizes {
        let floats = mib * (1 << 20) / 4;
        let bytes = (floats * 4) as f64;
        let mut buffers = vec![vec![0f32; floats]; ranks];
        // One round of each first, to fault the buffers in and warm up.
        all_reduce_seconds(&mut rings, &mut buffers, false);
        all_reduce_seconds(&mut rings, &mut buffers, true);
        let (mut sealed, mut plaintext) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            // Alternate which mode goes first in a round.
            for plaintext_links in [round % 2 == 1, round % 2 == 0] {
                let seconds = all_reduce_seconds(&mut rings, &mut buffers, plaintext_links);
                let mode = if plaintext_links { "plaintext" } else { "sealed   " };
                println!(
                    "{mib:>4} MiB round {round} {mode}: {:8.1} ms  {:8.1} MB/s",
                    seconds * 1e3,
                    bytes / seconds / 1e6
                );
                if plaintext_links { &mut plaintext } else { &mut sealed }.push(seconds);
            }
        }
        let (sealed, plaintext) = (median(&mut sealed), median(&mut plaintext));
        let (sealed_mbs, plaintext_mbs) = (bytes / sealed / 1e6, bytes / plaintext / 1e6);
        println!(
            "{mib:>4} MiB median: sealed {sealed_mbs:.1} MB/s, plaintext {plaintext_mbs:.1} MB/s, \
             ratio sealed/plaintext {:.3}",
            sealed_mbs / plaintext_mbs
        );
        println!(
            "{{\"ranks\":{ranks},\"mib\":{mib},\"rounds\":{rounds},\"sealed_mbs\":{sealed_mbs:.1},\
             \"plaintext_mbs\":{plaintext_mbs:.1},\"ratio\":{:.4}}}",
            sealed_mbs / plaintext_mbs
        );
    }
}
