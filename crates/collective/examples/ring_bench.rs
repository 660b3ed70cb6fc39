//! Benchmark (numbers, not pass/fail): ring all-reduce of ResNet-50's
//! gradient (25.6 M float32) over loopback TCP with N ranks (threads of one
//! process, one ring link each), against the loopback bound measured in the
//! same run: the same N links carrying the same bytes with plain send/receive
//! and no reduction, measured two ways:
//!
//! * `hot`: each link's receiver reads into one reused 1 MiB buffer (the raw
//!   link rate; the bytes never reach memory outside the cache);
//! * `memory`: each link's receiver reads into a buffer as large as what it
//!   receives, as any transfer of a gradient must deposit it (the sender
//!   sends from such a buffer in both).
//!
//!     cargo run --release -p rsb-collective --example ring_bench -- [RANKS...] [--floats N] [--rounds R] [--segment FLOATS]
//!
//! For each N it prints algorithm bandwidth (S / t), bus bandwidth
//! (S / t * 2(N-1)/N, nccl-tests' definition) and the ratio of bus bandwidth
//! to the per-link loopback bound.

// A benchmark, not library code: a failed setup step may just panic.
#![allow(clippy::unwrap_used)]

mod support;

use rsb_collective::ring::RingConfig;
use rsb_collective::{Buffer, Collective};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;
use support::form_rings;

/// Seconds for `n` links in a ring to each carry `bytes` (send right, receive
/// left, concurrently): the bound the all-reduce's links work against. With
/// `into_memory`, received bytes land in a buffer of their full size.
fn loopback_ring_seconds(n: usize, bytes: usize, into_memory: bool) -> f64 {
    let listeners: Vec<TcpListener> =
        (0..n).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let addrs: Vec<_> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let start = std::sync::Barrier::new(n);
    let t0 = std::sync::Mutex::new(None::<Instant>);
    std::thread::scope(|s| {
        for (r, listener) in listeners.into_iter().enumerate() {
            let right = addrs[(r + 1) % n];
            let start = &start;
            let t0 = &t0;
            s.spawn(move || {
                let out = TcpStream::connect(right).unwrap();
                let (inp, _) = listener.accept().unwrap();
                out.set_nodelay(true).unwrap();
                // Every rank sends from its own buffer, and receives into its
                // own (written once, so no page faults while timed).
                let payload = vec![7u8; bytes];
                let mut received = vec![1u8; if into_memory { bytes } else { 1 << 20 }];
                start.wait();
                t0.lock().unwrap().get_or_insert_with(Instant::now);
                std::thread::scope(|s2| {
                    s2.spawn(|| (&out).write_all(&payload).unwrap());
                    if into_memory {
                        (&inp).read_exact(&mut received).unwrap();
                    } else {
                        let mut left = bytes;
                        while left > 0 {
                            let k = (&inp).read(&mut received[..left.min(1 << 20)]).unwrap();
                            left -= k;
                        }
                    }
                });
            });
        }
    });
    let started = t0.lock().unwrap().expect("the links started");
    started.elapsed().as_secs_f64()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut floats = 25_557_032usize;
    let mut rounds = 3usize;
    let mut segment_floats = RingConfig::default().segment_floats;
    let mut worlds = Vec::new();
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--floats" => {
                floats = args[i + 1].parse().expect("--floats N");
                i += 1;
            }
            "--segment" => {
                segment_floats = args[i + 1].parse().expect("--segment FLOATS");
                i += 1;
            }
            "--rounds" => {
                rounds = args[i + 1].parse().expect("--rounds R");
                i += 1;
            }
            n => worlds.push(n.parse::<usize>().expect("world sizes are integers")),
        }
        i += 1;
    }
    if worlds.is_empty() {
        worlds = vec![2, 4];
    }
    let bytes = floats * 4;
    println!(
        "all-reduce of {floats} float32 ({:.1} MB), {rounds} rounds, loopback TCP",
        bytes as f64 / 1e6
    );
    for n in worlds {
        let mut rings = form_rings(n, &RingConfig { segment_floats, ..RingConfig::default() });
        let mut best = f64::MAX;
        let mut best_hot = f64::MAX;
        let mut best_memory = f64::MAX;
        for _ in 0..rounds {
            let barrier = std::sync::Barrier::new(n);
            let times: Vec<f64> = std::thread::scope(|s| {
                let handles: Vec<_> = rings
                    .iter_mut()
                    .map(|ring| {
                        let barrier = &barrier;
                        s.spawn(move || {
                            let mut data = vec![1.0f32; floats];
                            barrier.wait();
                            let t = Instant::now();
                            ring.all_reduce_sum(Buffer::Host(&mut data)).unwrap();
                            assert!(data.iter().all(|&v| v == n as f32));
                            t.elapsed().as_secs_f64()
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            best = best.min(times.iter().cloned().fold(0.0, f64::max));
            // Each link carries 2(N-1)/N * S bytes during an all-reduce.
            let link_bytes = bytes * 2 * (n - 1) / n;
            best_hot = best_hot.min(loopback_ring_seconds(n, link_bytes, false));
            best_memory = best_memory.min(loopback_ring_seconds(n, link_bytes, true));
        }
        let algbw = bytes as f64 / best / 1e9;
        let busbw = algbw * 2.0 * (n as f64 - 1.0) / n as f64;
        let link_gbs = |t: f64| (bytes * 2 * (n - 1) / n) as f64 / t / 1e9;
        let (hot, memory) = (link_gbs(best_hot), link_gbs(best_memory));
        println!(
            "ranks {n}: {:.1} ms  algbw {algbw:.2} GB/s  busbw {busbw:.2} GB/s  loopback bound per link: hot {hot:.2} GB/s (ratio {:.2}), into memory {memory:.2} GB/s (ratio {:.2})",
            best * 1e3,
            busbw / hot,
            busbw / memory
        );
        println!(
            "{{\"ranks\":{n},\"floats\":{floats},\"seconds\":{best:.6},\"algbw_gbs\":{algbw:.4},\"busbw_gbs\":{busbw:.4},\"bound_hot_gbs\":{hot:.4},\"ratio_hot\":{:.4},\"bound_memory_gbs\":{memory:.4},\"ratio_memory\":{:.4}}}",
            busbw / hot,
            busbw / memory
        );
    }
}
