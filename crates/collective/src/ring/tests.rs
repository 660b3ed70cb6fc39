//! The ring's tests: handshakes and their pools under strangers' floods,
//! sealed links against a man in the middle, link probes, and the sums of
//! the collectives in f32 and bf16, on rings of loopback ranks.

use super::accept::{
    accept_left, Challenging, HandshakeSlot, Pool, Room, MAX_HANDSHAKES, MAX_NEIGHBOUR_HANDSHAKES,
};
use super::element::{Bf16, Element};
use super::handshake::{
    challenge_left, prove_to_right, Handshake, ACCEPTED, ACCEPTOR_ROLE, CONNECTOR_ROLE,
    HANDSHAKE_TIMEOUT, HELLO_LEN, MAGIC, NONCE_LEN, REFUSED, RING_KEY_ITERATIONS, TAG_LEN,
};
use super::sealing::{message_key, LinkCipher, LINK_TAG_LEN, MESSAGES_PER_KEY};
use super::*;
use crate::{Buffer, Collective, CollectiveError};
use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, TcpListener, TcpStream};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The tests' job key, derived once (each derivation is 300,000 HMACs).
fn key() -> RingKey {
    static KEY: std::sync::OnceLock<RingKey> = std::sync::OnceLock::new();
    KEY.get_or_init(|| RingKey::derive(b"the job token of these tests")).clone()
}

#[test]
fn the_ring_key_is_the_job_tokens_pbkdf2_stretch() {
    // Made independently, with Python's hashlib (OpenSSL):
    // hashlib.pbkdf2_hmac('sha256', b'the job token of these tests',
    //                     b'rsb ring key v2', 300000).hex()
    let expected: Vec<u8> = (0..32)
        .map(|i| {
            let hex = "d6e38e1cf7f352f0c5c901cecf8fa5bb30c4a2ac657b45e16eead1657c6cd514";
            u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap()
        })
        .collect();
    assert_eq!(RING_KEY_ITERATIONS, 300_000);
    let (hello, nonce) = (b"a hello".as_slice(), b"a nonce".as_slice());
    assert_eq!(
        key().proof(ACCEPTOR_ROLE, hello, nonce),
        super::handshake::tag(&expected, &[ACCEPTOR_ROLE, hello, nonce]),
        "the ring key is not PBKDF2-HMAC-SHA256 of the token"
    );
}

#[test]
fn a_handshake_thread_that_panics_gives_its_slot_back() {
    let in_flight = Arc::new(AtomicUsize::new(0));
    let kept = HandshakeSlot::take(&in_flight);
    let slot = HandshakeSlot::take(&in_flight);
    let claim = Arc::clone(&slot.claim);
    assert_eq!(in_flight.load(Ordering::SeqCst), 2);
    let crashed = std::thread::spawn(move || {
        let _slot = slot;
        panic!("a bug in the challenge");
    })
    .join();
    assert!(crashed.is_err(), "the thread should have panicked");
    assert_eq!(in_flight.load(Ordering::SeqCst), 1, "the panicked thread kept its slot");
    // Its connection no longer counts as being challenged.
    assert!(!claim.challenging() && !claim.evicted());
    assert!(kept.claim.challenging());
    drop(kept);
    assert_eq!(in_flight.load(Ordering::SeqCst), 0);
}

/// A pool of 2 slots: a third connection evicts the oldest one being
/// challenged (its socket shut down: its peer reads the end), never one
/// whose proof held, and its threads, evicted ones not yet ended
/// included, stay below twice its limit.
#[test]
fn a_full_pool_evicts_its_oldest_unproven_connection_and_bounds_its_threads() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut pool = Pool::new(2);
    // A connection being challenged: its peer's end, its address and
    // its thread's slot and stream (the pool holds a second handle).
    let connect = |pool: &mut Pool| {
        let peer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (stream, peer_addr) = listener.accept().unwrap();
        let slot = HandshakeSlot::take(&pool.threads);
        let (handle, claim) = (stream.try_clone().unwrap(), Arc::clone(&slot.claim));
        pool.challenging.push_back(Challenging { peer_addr, handle, claim });
        (peer, peer_addr, (slot, stream))
    };
    let (oldest, oldest_addr, first) = connect(&mut pool);
    let (_second, second_addr, second) = connect(&mut pool);
    let mut slots = vec![first, second];
    assert!(matches!(pool.make_room(), Room::Evicted(a) if a == oldest_addr));
    // Shut down while its thread still holds the stream.
    oldest.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let read = (&oldest).read(&mut [0u8; 1]);
    assert!(matches!(read, Ok(0)), "the evicted one was not shut down: {read:?}");
    assert!(matches!(slots[0].1.read(&mut [0u8; 1]), Ok(0)));
    assert!(slots[0].0.claim.evicted() && !slots[0].0.claim.settle(), "an evicted one settled");
    let (_third, _, third) = connect(&mut pool);
    slots.push(third);
    // The second proves itself: never evicted, and its place is free.
    assert!(slots[1].0.claim.settle());
    assert!(matches!(pool.make_room(), Room::Free));
    assert!(!slots[1].0.claim.evicted());
    assert_eq!(pool.challenging.len(), 1);
    let (_fourth, fourth_addr, fourth) = connect(&mut pool);
    slots.push(fourth);
    // Four threads (the evicted one and the settled one still ending):
    // twice the limit, so a fifth connection is closed at once.
    assert_eq!(pool.threads.load(Ordering::SeqCst), 4);
    assert!(matches!(pool.make_room(), Room::Full));
    // The evicted thread ends: the oldest being challenged (the third)
    // is evicted for the next one.
    drop(slots.remove(0));
    let third_addr = pool.challenging[0].peer_addr;
    assert_ne!(third_addr, second_addr);
    assert_ne!(third_addr, fourth_addr);
    assert!(matches!(pool.make_room(), Room::Evicted(a) if a == third_addr));
}

/// Forms a ring of `n` ranks on loopback, one thread each, and runs `f` on every rank.
pub(crate) fn with_ring<T: Send>(n: usize, f: impl Fn(&mut TcpRing) -> T + Sync) -> Vec<T> {
    let listeners: Vec<RingListener> =
        (0..n).map(|_| RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap()).collect();
    let addresses: Vec<String> =
        listeners.iter().map(|l| l.local_addr().unwrap().to_string()).collect();
    std::thread::scope(|scope| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, l)| {
                let addresses = addresses.clone();
                let f = &f;
                scope.spawn(move || {
                    let config = RingConfig { timeout: Duration::from_secs(20), segment_floats: 7 };
                    let mut ring = l.connect(rank, &addresses, &key(), config).unwrap();
                    f(&mut ring)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn a_broadcast_from_a_rank_outside_the_world_is_an_error_that_names_it() {
    for n in [1, 2] {
        let outcomes = with_ring(n, |ring| {
            let mut data = [5.0f32, 6.0];
            let outcome = ring.broadcast(Buffer::Host(&mut data), n);
            (ring.rank(), outcome.map_err(|e| e.to_string()), data)
        });
        for (rank, outcome, data) in outcomes {
            let error = outcome.expect_err("root outside the world");
            assert!(error.contains(&format!("broadcast from rank {n}")), "{error}");
            assert_eq!(data, [5.0, 6.0], "rank {rank}'s buffer was changed");
        }
    }
    let error = crate::Single.broadcast(Buffer::Host(&mut [1.0]), 1).unwrap_err();
    assert!(error.to_string().contains("broadcast from rank 1"), "{error}");
}

#[test]
fn a_ring_of_segments_of_0_floats_is_refused_not_a_panic() {
    let listener = RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addresses = vec![listener.local_addr().unwrap().to_string(); 2];
    let config = RingConfig { timeout: Duration::from_secs(1), segment_floats: 0 };
    let Err(error) = listener.connect(0, &addresses, &key(), config) else {
        panic!("a ring of 0-float segments was formed");
    };
    assert!(error.to_string().contains("segment_floats is 0"), "{error}");
}

fn bits(v: f32) -> u16 {
    Bf16::from_f32(v).0
}

#[test]
fn bf16_rounds_to_nearest_even_as_libtorch() {
    assert_eq!(bits(1.0), 0x3f80);
    // Ties go to the even neighbour: 1 + 2^-8 to 1, 1 + 3 * 2^-8 to 1 + 2^-6.
    assert_eq!(bits(1.0 + 2f32.powi(-8)), 0x3f80);
    assert_eq!(bits(1.0 + 3.0 * 2f32.powi(-8)), 0x3f82);
    // Above a tie rounds up, below rounds down.
    assert_eq!(bits(f32::from_bits(0x3f80_8001)), 0x3f81);
    assert_eq!(bits(f32::from_bits(0x3f80_7fff)), 0x3f80);
    assert_eq!(bits(-2.5), 0xc020);
    assert_eq!(bits(f32::INFINITY), 0x7f80);
    assert_eq!(bits(f32::MAX), 0x7f80, "rounds past bf16's largest value to inf");
    assert_eq!(bits(f32::NAN), 0x7fc0);
    assert_eq!(Bf16(0x3f80).add(Bf16(bits(2f32.powi(-8)))), Bf16(0x3f80));
}

#[test]
fn bf16_all_reduce_sums_with_half_the_bytes_on_the_wire() {
    for n in [2, 3, 4] {
        for len in [1, 3, 17, 1000] {
            // Small integers: exact in bf16, and so are their sums.
            let value = |r: usize, i: usize| ((r * 31 + i) % 17) as f32;
            let results = with_ring(n, |ring| {
                let r = ring.rank();
                let mut wide: Vec<f32> = (0..len).map(|i| value(r, i)).collect();
                ring.all_reduce_sum(Buffer::Host(&mut wide)).unwrap();
                let f32_bytes = ring.bytes_sent();
                let mut half: Vec<u16> = (0..len).map(|i| bits(value(r, i))).collect();
                ring.all_reduce_sum(Buffer::HostBf16(&mut half)).unwrap();
                let bf16_bytes = ring.bytes_sent() - f32_bytes;
                (wide, half, f32_bytes, bf16_bytes)
            });
            for (rank, (wide, half, f32_bytes, bf16_bytes)) in results.iter().enumerate() {
                let want: Vec<u16> = wide.iter().map(|v| bits(*v)).collect();
                assert_eq!(half, &want, "world {n}, len {len}, rank {rank}");
                assert_eq!(*f32_bytes, 2 * bf16_bytes, "world {n}, len {len}, rank {rank}");
            }
            // 2 (N-1)/N of the buffer per rank, in total over the ranks.
            let total: u64 = results.iter().map(|r| r.3).sum();
            assert_eq!(total, 2 * (n as u64 - 1) * len as u64 * 2, "world {n}, len {len}");
        }
    }
    // Rounding at each partial sum: 1 + 2^-8 is a tie that goes to 1.
    let results = with_ring(2, |ring| {
        let mut data =
            [bits(if ring.rank() == 0 { 1.0 } else { 2f32.powi(-8) }), bits(1.5), bits(-0.25)];
        ring.all_reduce_sum(Buffer::HostBf16(&mut data)).unwrap();
        data
    });
    for data in results {
        assert_eq!(data, [bits(1.0), bits(3.0), bits(-0.5)]);
    }
    // A broadcast of bf16 values is exact.
    let results = with_ring(3, |ring| {
        let mut data = vec![bits(ring.rank() as f32 + 0.1); 10];
        ring.broadcast(Buffer::HostBf16(&mut data), 1).unwrap();
        data
    });
    assert!(results.iter().all(|d| d == &vec![bits(1.1); 10]));
}

#[test]
fn ranks_that_disagree_on_the_element_type_fail_instead_of_corrupting() {
    let results = with_ring(2, |ring| {
        if ring.rank() == 0 {
            ring.all_reduce_sum(Buffer::Host(&mut [1.0f32; 6])).map_err(|e| e.to_string())
        } else {
            ring.all_reduce_sum(Buffer::HostBf16(&mut [0u16; 6])).map_err(|e| e.to_string())
        }
    });
    for r in results {
        let e = r.unwrap_err();
        assert!(e.contains("bf16") && e.contains("f32"), "{e}");
    }
}

#[test]
fn all_reduce_sums_exactly_for_many_sizes_and_worlds() {
    for n in [1, 2, 3, 4, 5] {
        for len in [0, 1, 3, 4, 17, 1000] {
            let results = with_ring(n, |ring| {
                let r = ring.rank() as f32;
                let mut data: Vec<f32> = (0..len).map(|i| r * 1000.0 + i as f32).collect();
                ring.all_reduce_sum(Buffer::Host(&mut data)).unwrap();
                data
            });
            let want: Vec<f32> =
                (0..len).map(|i| (0..n).map(|r| r as f32 * 1000.0 + i as f32).sum()).collect();
            for (rank, got) in results.iter().enumerate() {
                assert_eq!(got, &want, "world {n}, len {len}, rank {rank}");
            }
        }
    }
}

#[test]
fn broadcast_and_barrier() {
    let results = with_ring(3, |ring| {
        let mut data = vec![ring.rank() as f32 + 1.0; 10];
        ring.broadcast(Buffer::Host(&mut data), 2).unwrap();
        ring.barrier().unwrap();
        data
    });
    assert!(results.iter().all(|d| d.iter().all(|&v| v == 3.0)));
}

#[test]
fn mismatched_sizes_are_an_error_not_corruption() {
    let results = with_ring(2, |ring| {
        let mut data = vec![1.0f32; 10 + ring.rank()];
        ring.all_reduce_sum(Buffer::Host(&mut data)).map(|_| ()).map_err(|e| e.to_string())
    });
    assert!(results.iter().all(|r| r.as_ref().is_err_and(|e| e.contains("floats"))), "{results:?}");
}

/// An element whose sum panics: a bug in the receiving direction.
#[derive(Clone, Copy)]
#[repr(transparent)]
struct PanicsWhenAdded(f32);

// SAFETY: a `repr(transparent)` wrapper of `f32`: any bit pattern is valid,
// no padding.
unsafe impl bytemuck::Zeroable for PanicsWhenAdded {}
// SAFETY: as above.
unsafe impl bytemuck::Pod for PanicsWhenAdded {}

impl Element for PanicsWhenAdded {
    fn add(self, _: PanicsWhenAdded) -> PanicsWhenAdded {
        panic!("a bug in the sum");
    }
}

#[test]
fn a_panic_in_one_direction_of_an_all_reduce_surfaces_instead_of_hanging() {
    // Rank 1's receiving direction panics at its first sum, while its
    // sending direction waits for what it receives: the panic must end
    // both, and reach the caller.
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let outcomes = with_ring(2, |ring| {
            let rank = ring.rank();
            let mut data = vec![1.0f32; 64];
            if rank == 0 {
                return ring.pipelined_all_reduce(&mut data).map_err(|e| e.to_string());
            }
            let mut panicky: Vec<PanicsWhenAdded> =
                data.iter().map(|&v| PanicsWhenAdded(v)).collect();
            let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                ring.pipelined_all_reduce(&mut panicky)
            }));
            match caught {
                Err(panic) => Err(format!("panicked: {:?}", panic.downcast_ref::<&str>())),
                Ok(outcome) => outcome.map_err(|e| e.to_string()),
            }
        });
        let _ = done.send(outcomes);
    });
    let outcomes = finished.recv_timeout(Duration::from_secs(60)).expect("the all-reduce hung");
    assert_eq!(outcomes[1], Err("panicked: Some(\"a bug in the sum\")".to_string()));
    assert!(outcomes[0].is_err(), "rank 0 summed with a rank that panicked: {outcomes:?}");
}

#[test]
fn a_peer_that_leaves_mid_collective_is_an_error_not_a_hang() {
    let start = Instant::now();
    let results = with_ring(3, |ring| {
        let mut data = vec![1.0f32; 1 << 20];
        if ring.rank() == 1 {
            // Agrees to the collective, then leaves: its links close when
            // the ring drops, while the others are streaming.
            ring.check_header(data.len(), 0).map_err(|e| e.to_string())?;
            return Ok(());
        }
        ring.all_reduce_sum(Buffer::Host(&mut data)).map_err(|e| e.to_string())
    });
    assert!(start.elapsed() < Duration::from_secs(15), "took {:?}", start.elapsed());
    for rank in [0, 2] {
        let err = results[rank].as_ref().expect_err("rank 1 left, the all-reduce cannot succeed");
        assert!(err.contains("rank"), "{err}");
    }
}

#[test]
fn a_link_probe_measures_each_incoming_link_and_leaves_the_ring_in_step() {
    let results = with_ring(3, |ring| {
        let rate = ring.probe_incoming_link(1 << 20).unwrap();
        let mut data = vec![ring.rank() as f32; 100];
        ring.all_reduce_sum(Buffer::Host(&mut data)).unwrap();
        (rate, data)
    });
    for (rank, (rate, data)) in results.iter().enumerate() {
        let rate = rate.expect("a ring of three has links");
        assert_eq!(rate.from_rank, (rank + 2) % 3);
        assert!(rate.bytes_per_sec.is_finite() && rate.bytes_per_sec > 0.0, "{rate:?}");
        assert_eq!(data, &vec![3.0; 100], "the all-reduce after the probe");
    }
    let alone = with_ring(1, |ring| ring.probe_incoming_link(1 << 20).unwrap());
    assert_eq!(alone, [None]);
}

#[test]
fn ranks_that_disagree_on_a_link_probe_fail_instead_of_hanging() {
    let start = Instant::now();
    let results = with_ring(2, |ring| {
        let bytes = if ring.rank() == 0 { 1 << 20 } else { 2 << 20 };
        ring.probe_incoming_link(bytes).map_err(|e| e.to_string())
    });
    assert!(start.elapsed() < Duration::from_secs(15), "took {:?}", start.elapsed());
    for result in results {
        let err = result.expect_err("the probes differ");
        assert!(err.contains("link-probe bytes"), "{err}");
    }
}

#[test]
fn a_dead_peer_is_a_timely_error() {
    let a = RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let b = RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addresses = vec![a.local_addr().unwrap().to_string(), b.local_addr().unwrap().to_string()];
    drop(b); // rank 1 never shows up
    let start = Instant::now();
    let config = RingConfig { timeout: Duration::from_millis(500), segment_floats: 16 };
    let err = a.connect(0, &addresses, &key(), config).unwrap_err().to_string();
    assert!(start.elapsed() < Duration::from_secs(10), "took {:?}", start.elapsed());
    assert!(err.contains("rank 1") || err.contains("never connected"), "{err}");
}

/// Links `a` (rank 0) and `b` (rank 1) into a ring of two, at once.
fn link_pair(
    a: RingListener,
    b: RingListener,
    addresses: &[String],
    config: &RingConfig,
) -> [Result<TcpRing, CollectiveError>; 2] {
    std::thread::scope(|scope| {
        let ha = scope.spawn(move || a.connect(0, addresses, &key(), config.clone()));
        let hb = scope.spawn(move || b.connect(1, addresses, &key(), config.clone()));
        [ha.join().unwrap(), hb.join().unwrap()]
    })
}

/// An impostor that knows the protocol but not the key.
fn impostor_hello(rank: u32, world: u32) -> Vec<u8> {
    let mut hello = Vec::new();
    for v in [MAGIC, rank, world] {
        hello.extend_from_slice(&v.to_le_bytes());
    }
    hello.extend_from_slice(&[7u8; NONCE_LEN]);
    hello
}

#[test]
fn an_impostor_left_neighbour_is_refused_and_the_real_one_still_links() {
    let a = RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let b = RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addresses = vec![a.local_addr().unwrap().to_string(), b.local_addr().unwrap().to_string()];
    let target = addresses[1].clone();
    // Connects to rank 1 before rank 0 does, claims to be rank 0, and
    // answers the challenge with a proof made from a guessed key.
    let (queued_tx, queued) = std::sync::mpsc::channel();
    let impostor = std::thread::spawn(move || {
        let stream = TcpStream::connect(&target).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let hello = impostor_hello(0, 2);
        (&stream).write_all(&hello).unwrap();
        queued_tx.send(()).unwrap();
        let mut answer = [0u8; NONCE_LEN + TAG_LEN];
        (&stream).read_exact(&mut answer).unwrap();
        let guess = RingKey::derive(b"a guessed token");
        let proof = guess.proof(CONNECTOR_ROLE, &hello, &answer[..NONCE_LEN]);
        (&stream).write_all(&proof).unwrap();
        // Refused: the verdict says so (or the connection closes).
        let mut verdict = [9u8; 1];
        let read = (&stream).read(&mut verdict);
        assert!(
            matches!(read, Ok(0) | Err(_)) || verdict[0] == REFUSED,
            "the impostor was accepted: {read:?} {verdict:?}"
        );
    });
    queued.recv().unwrap();
    let config = RingConfig { timeout: Duration::from_secs(20), segment_floats: 16 };
    let rings = link_pair(a, b, &addresses, &config);
    impostor.join().unwrap();
    let mut rings: Vec<TcpRing> = rings.into_iter().map(|r| r.unwrap()).collect();
    std::thread::scope(|scope| {
        for ring in rings.iter_mut() {
            scope.spawn(move || {
                let mut data = vec![1.0f32; 5];
                ring.all_reduce_sum(Buffer::Host(&mut data)).unwrap();
                assert_eq!(data, vec![2.0; 5]);
            });
        }
    });
}

/// The left link fails (a peer holding the key presents the wrong rank)
/// while the right neighbour is not there: the ring gives up at once and
/// says what the left link did, where it waited for the right neighbour
/// until its deadline and then named it.
#[test]
fn a_failed_left_link_is_reported_at_once_while_the_right_neighbour_is_away() {
    let me = RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let away = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let addresses =
        vec!["127.0.0.1:9".to_string(), me.local_addr().unwrap().to_string(), away.to_string()];
    let target = addresses[1].clone();
    let wrong_rank = std::thread::spawn(move || {
        let stream = TcpStream::connect(&target).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        // Rank 2 of 3 on rank 1's left link, where rank 0 belongs.
        let _ = prove_to_right(&stream, 2, 3, &key(), deadline);
        std::thread::sleep(Duration::from_millis(500));
    });
    let config = RingConfig { timeout: Duration::from_secs(20), segment_floats: 16 };
    let started = Instant::now();
    let err = me.connect(1, &addresses, &key(), config).unwrap_err().to_string();
    let took = started.elapsed();
    wrong_rank.join().unwrap();
    assert!(err.contains("expected rank 0 of 3 on the left link, got rank 2 of 3"), "{err}");
    assert!(took < Duration::from_secs(5), "took {took:?}: {err}");
}

#[test]
fn strangers_that_connect_and_stall_do_not_hold_up_the_left_neighbour() {
    let a = RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let b = RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addresses = vec![a.local_addr().unwrap().to_string(), b.local_addr().unwrap().to_string()];
    // Connected to rank 1 before rank 0 is: one sends nothing, one sends
    // its hello a byte at a time, slower than any handshake may take.
    let silent = TcpStream::connect(&addresses[1]).unwrap();
    let trickling = TcpStream::connect(&addresses[1]).unwrap();
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let trickler = {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            for byte in impostor_hello(0, 2) {
                if stop.load(Ordering::Relaxed) || (&trickling).write_all(&[byte]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    };
    let start = Instant::now();
    let config = RingConfig { timeout: Duration::from_secs(30), segment_floats: 16 };
    let rings = link_pair(a, b, &addresses, &config);
    let linked_after = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    trickler.join().unwrap();
    drop(silent);
    for ring in rings {
        ring.unwrap();
    }
    assert!(linked_after < HANDSHAKE_TIMEOUT / 2, "linked after {linked_after:?}");
}

/// Silent strangers, one more than the strangers' handshake slots, hold
/// them all before a left neighbour that connects from an address it did
/// not advertise (127.0.0.1, having advertised 127.0.0.3), so it is
/// challenged as a stranger: it takes the oldest stranger's slot and
/// links at once, where it was closed at once and tried again until the
/// strangers' handshakes timed out (10 s).
#[test]
fn more_stalling_strangers_than_handshake_slots_do_not_keep_out_a_neighbour_on_another_address() {
    let a = RingListener::bind("0.0.0.0:0".parse().unwrap()).unwrap();
    let b = RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = a.local_addr().unwrap().port();
    let addresses = vec![format!("127.0.0.3:{port}"), b.local_addr().unwrap().to_string()];
    let silent: Vec<TcpStream> =
        (0..=MAX_HANDSHAKES).map(|_| TcpStream::connect(&addresses[1]).unwrap()).collect();
    let config = RingConfig { timeout: Duration::from_secs(20), segment_floats: 16 };
    let started = Instant::now();
    let rings = link_pair(a, b, &addresses, &config);
    let linked_after = started.elapsed();
    drop(silent);
    for ring in rings {
        ring.unwrap();
    }
    assert!(linked_after < HANDSHAKE_TIMEOUT / 2, "linked after {linked_after:?}");
}

/// An attacker on the left neighbour's own address (127.0.0.1, rank 0's
/// in these tests) holding every neighbour handshake slot of `target`:
/// [`MAX_NEIGHBOUR_HANDSHAKES`] connections opened before this returns,
/// then one more every 100 ms (more than the 6.4 a second that kept
/// every slot taken when each stalled one held its slot for the 10 s
/// handshake timeout), each sending `hello` (if any) and then nothing. Set the flag to stop it; joining it closes its connections
/// and says how many it opened.
fn stalling_neighbour(
    target: &str,
    hello: Option<Vec<u8>>,
) -> (Arc<AtomicBool>, std::thread::JoinHandle<usize>) {
    let open = {
        let target = target.to_string();
        move || {
            let stream = TcpStream::connect(&target).ok()?;
            if let Some(hello) = &hello {
                (&stream).write_all(hello).ok()?;
            }
            Some(stream)
        }
    };
    let mut held: Vec<TcpStream> = (0..MAX_NEIGHBOUR_HANDSHAKES).map(|_| open().unwrap()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = Arc::clone(&stop);
    let attacker = std::thread::spawn(move || {
        while !stopped.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
            held.extend(open());
        }
        held.len()
    });
    (stop, attacker)
}

/// Links a ring of two while [`stalling_neighbour`] holds rank 1's
/// neighbour handshake slots: rank 1 waits for its left neighbour while
/// the attacker opens more for half a second, then rank 0 comes. How
/// long that took from rank 0's start.
fn link_past_a_stalling_neighbour(hello: Option<Vec<u8>>) -> Duration {
    let a = RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let b = RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addresses = vec![a.local_addr().unwrap().to_string(), b.local_addr().unwrap().to_string()];
    let (stop, attacker) = stalling_neighbour(&addresses[1], hello);
    let config = RingConfig { timeout: Duration::from_secs(20), segment_floats: 16 };
    let (rings, linked_after) = std::thread::scope(|scope| {
        let (addresses, config) = (&addresses, &config);
        let hb = scope.spawn(move || b.connect(1, addresses, &key(), config.clone()));
        std::thread::sleep(Duration::from_millis(500));
        let started = Instant::now();
        let ha = scope.spawn(move || a.connect(0, addresses, &key(), config.clone()));
        let rings = [ha.join().unwrap(), hb.join().unwrap()];
        (rings, started.elapsed())
    });
    stop.store(true, Ordering::Relaxed);
    let opened = attacker.join().unwrap();
    for ring in rings {
        ring.unwrap();
    }
    eprintln!("linked after {linked_after:?}, {opened} stalled connections opened");
    linked_after
}

/// Silent connections from the neighbour's own address, every neighbour
/// slot's worth and more as they free up: the neighbour takes the
/// oldest one's slot and links at once, where it was closed at once and
/// tried again until they timed out (10 s), or, with more of them, until
/// the ring's deadline.
#[test]
fn silent_connections_from_the_neighbours_address_do_not_keep_it_out() {
    let linked_after = link_past_a_stalling_neighbour(None);
    assert!(linked_after < HANDSHAKE_TIMEOUT / 2, "linked after {linked_after:?}");
}

/// The same with a well-formed hello claiming to be rank 0, the left
/// neighbour, and no answer to the challenge.
#[test]
fn connections_that_claim_to_be_the_neighbour_and_stall_at_the_challenge_do_not_keep_it_out() {
    let linked_after = link_past_a_stalling_neighbour(Some(impostor_hello(0, 2)));
    assert!(linked_after < HANDSHAKE_TIMEOUT / 2, "linked after {linked_after:?}");
}

/// Connections still being challenged when the left link is chosen
/// are closed then: a stranger's silent connection sees its end at
/// once, where its handshake thread held it to its own timeout (10 s).
#[test]
fn connections_still_challenged_are_closed_once_the_left_link_is_chosen() {
    let a = RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let b = RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addresses = vec![a.local_addr().unwrap().to_string(), b.local_addr().unwrap().to_string()];
    let strangers: Vec<TcpStream> =
        (0..8).map(|_| TcpStream::connect(&addresses[1]).unwrap()).collect();
    let config = RingConfig { timeout: Duration::from_secs(20), segment_floats: 16 };
    for ring in link_pair(a, b, &addresses, &config) {
        ring.unwrap();
    }
    let linked = Instant::now();
    for mut stranger in strangers {
        stranger.set_read_timeout(Some(HANDSHAKE_TIMEOUT / 2)).unwrap();
        let mut byte = [0u8; 1];
        match stranger.read(&mut byte) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("a stranger's connection stayed open: {other:?}"),
        }
    }
    let closed_after = linked.elapsed();
    assert!(closed_after < HANDSHAKE_TIMEOUT / 4, "closed {closed_after:?} after linking");
}

/// Strangers' silent connections from another address than the left
/// neighbour's, three times as many as their slots, opened before the
/// neighbour's: the neighbour links at once, where it waited behind
/// them in the listener's backlog, a handshake timeout (10 s) for each
/// round of slots.
#[test]
fn strangers_from_other_addresses_do_not_queue_the_left_neighbour() {
    let a = RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    // Rank 1 listens on every address: the strangers reach it on
    // 127.0.0.2, rank 0 on 127.0.0.1. (Linux gives connections to
    // 127.0.0.2 the source address 127.0.0.1 all the same, so the
    // strangers are challenged with the neighbour's own pool here; the
    // strangers' pool is filled by `more_stalling_strangers_…`.)
    let b = RingListener::bind("0.0.0.0:0".parse().unwrap()).unwrap();
    let port = b.local_addr().unwrap().port();
    let addresses = vec![a.local_addr().unwrap().to_string(), format!("127.0.0.1:{port}")];
    let strangers: Vec<TcpStream> =
        (0..3 * MAX_HANDSHAKES).map(|_| TcpStream::connect(("127.0.0.2", port)).unwrap()).collect();
    let config = RingConfig { timeout: Duration::from_secs(60), segment_floats: 16 };
    let started = Instant::now();
    let rings = link_pair(a, b, &addresses, &config);
    let linked_after = started.elapsed();
    drop(strangers);
    for ring in rings {
        ring.unwrap();
    }
    assert!(linked_after < HANDSHAKE_TIMEOUT / 2, "linked after {linked_after:?}");
}

/// A listener of this job's key, on a thread: it answers the first
/// hello after `answer_after`, checks the proof, and gives `verdict`
/// (none: it closes the connection) `verdict_after` later.
fn slow_listener(
    answer_after: Duration,
    verdict: Option<u8>,
    verdict_after: Duration,
) -> (String, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let handle = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut hello = [0u8; HELLO_LEN];
        (&stream).read_exact(&mut hello).unwrap();
        std::thread::sleep(answer_after);
        let nonce = [5u8; NONCE_LEN];
        let mut answer = nonce.to_vec();
        answer.extend_from_slice(&key().proof(ACCEPTOR_ROLE, &hello, &nonce));
        (&stream).write_all(&answer).unwrap();
        let mut proof = [0u8; TAG_LEN];
        (&stream).read_exact(&mut proof).unwrap();
        assert!(key().verify(CONNECTOR_ROLE, &hello, &nonce, &proof));
        std::thread::sleep(verdict_after);
        if let Some(verdict) = verdict {
            (&stream).write_all(&[verdict]).unwrap();
        }
    });
    (address, handle)
}

#[test]
fn a_late_verdict_is_waited_for_and_only_a_refusal_refuses() {
    let prove = |address: &str| {
        let stream = TcpStream::connect(address).unwrap();
        prove_to_right(&stream, 0, 2, &key(), Instant::now() + Duration::from_secs(60))
    };
    // The answer before the hello's handshake time runs out, the verdict
    // after it (a listener that challenged this connection once
    // strangers' stalled handshakes gave their slots back): linked.
    let answer_after = HANDSHAKE_TIMEOUT - Duration::from_secs(3);
    let (address, listener) = slow_listener(answer_after, Some(ACCEPTED), Duration::from_secs(4));
    prove(&address).unwrap();
    listener.join().unwrap();
    // No verdict (the connection closed): broken off, to be tried again.
    let (address, listener) = slow_listener(Duration::ZERO, None, Duration::ZERO);
    let outcome = prove(&address);
    assert!(matches!(outcome, Err(Handshake::Io(_))), "{outcome:?}");
    listener.join().unwrap();
    // A verdict that refuses: refused.
    let (address, listener) = slow_listener(Duration::ZERO, Some(REFUSED), Duration::ZERO);
    let outcome = prove(&address);
    assert!(matches!(outcome, Err(Handshake::Refused(_))), "{outcome:?}");
    listener.join().unwrap();
}

#[test]
fn a_listener_without_the_key_is_refused_by_the_connecting_rank() {
    // "Rank 1" is an impostor listener: it answers the hello with a proof
    // made from another key.
    let fake = TcpListener::bind("127.0.0.1:0").unwrap();
    let fake_address = fake.local_addr().unwrap().to_string();
    let impostor = std::thread::spawn(move || {
        let (stream, _) = fake.accept().unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut hello = [0u8; HELLO_LEN];
        (&stream).read_exact(&mut hello).unwrap();
        let other = RingKey::derive(b"another job's token");
        let mut answer = vec![9u8; NONCE_LEN];
        answer.extend_from_slice(&other.proof(ACCEPTOR_ROLE, &hello, &[9u8; NONCE_LEN]));
        (&stream).write_all(&answer).unwrap();
        // Nothing must follow: the real rank does not send its proof.
        let mut rest = [0u8; TAG_LEN];
        assert!((&stream).read_exact(&mut rest).is_err(), "rank 0 proved itself to an impostor");
    });
    let a = RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addresses = vec![a.local_addr().unwrap().to_string(), fake_address];
    let config = RingConfig { timeout: Duration::from_secs(2), segment_floats: 16 };
    let err = a.connect(0, &addresses, &key(), config).unwrap_err().to_string();
    assert!(err.contains("failed the ring challenge"), "{err}");
    impostor.join().unwrap();
}

#[test]
fn ranks_with_different_keys_do_not_link() {
    let a = RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let b = RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addresses = vec![a.local_addr().unwrap().to_string(), b.local_addr().unwrap().to_string()];
    let config = RingConfig { timeout: Duration::from_secs(2), segment_floats: 16 };
    let results = std::thread::scope(|scope| {
        let addrs = &addresses;
        let config = &config;
        let ha = scope.spawn(move || a.connect(0, addrs, &key(), config.clone()).map(|_| ()));
        let other = RingKey::derive(b"another job's token");
        let hb = scope.spawn(move || b.connect(1, addrs, &other, config.clone()).map(|_| ()));
        [ha.join().unwrap(), hb.join().unwrap()]
    });
    for r in &results {
        assert!(r.is_err(), "a ring formed across two keys: {results:?}");
    }
    assert!(!format!("{:?}", key()).contains("the job token"));
}

#[test]
fn a_rank_of_another_generation_or_run_is_a_stranger_to_a_ring() {
    let proof_of = |key: &RingKey| key.proof(ACCEPTOR_ROLE, b"hello", b"nonce");
    // The same job token: each ring's key differs by job and generation.
    let job = key();
    let ring = job.for_ring("job-1", 3);
    assert_eq!(proof_of(&ring), proof_of(&job.for_ring("job-1", 3)), "one ring, one key");
    for (other_job, other_generation) in [("job-1", 2), ("job-1", 4), ("job-2", 3), ("job-13", 3)] {
        assert_ne!(proof_of(&ring), proof_of(&job.for_ring(other_job, other_generation)));
    }
    // The id's length is part of the key: no id and generation run
    // together into another pair's bytes.
    assert_ne!(proof_of(&job.for_ring("a", 0x62)), proof_of(&job.for_ring("ab", 0)));
    // A rank of generation 2 still dialling (as rank 0 of a 2-rank ring) a
    // listener of generation 3 is refused, and that listener links with its
    // own neighbour all the same.
    let a = RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let b = RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let c = RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addresses = vec![a.local_addr().unwrap().to_string(), b.local_addr().unwrap().to_string()];
    let dialled = vec![c.local_addr().unwrap().to_string(), addresses[1].clone()];
    let config = RingConfig { timeout: Duration::from_secs(3), segment_floats: 16 };
    let old = job.for_ring("job-1", 2);
    let (stale, sums) = std::thread::scope(|scope| {
        let config = &config;
        let stale = scope.spawn(|| c.connect(0, &dialled, &old, config.clone()).map(|_| ()));
        let ranks =
            [(a, 1.0f32), (b, 2.0)].into_iter().enumerate().map(|(rank, (listener, value))| {
                let (addresses, ring) = (&addresses, &ring);
                scope.spawn(move || {
                    let mut linked =
                        listener.connect(rank, addresses, ring, config.clone()).unwrap();
                    let mut data = vec![value; 8];
                    linked.all_reduce_sum(Buffer::Host(&mut data)).unwrap();
                    data
                })
            });
        let sums: Vec<Vec<f32>> =
            ranks.collect::<Vec<_>>().into_iter().map(|h| h.join().unwrap()).collect();
        (stale.join().unwrap(), sums)
    });
    let stale_error = stale.unwrap_err().to_string();
    assert!(stale_error.contains("failed the ring challenge"), "{stale_error}");
    assert_eq!(sums, [vec![3.0f32; 8], vec![3.0f32; 8]]);
}

/// The next message `cipher` seals, b"segment": its ciphertext and tag.
fn sealed_segment(cipher: &mut LinkCipher) -> (Vec<u8>, [u8; LINK_TAG_LEN]) {
    let (ciphertext, tag) = cipher.seal(b"segment").unwrap();
    (ciphertext.to_vec(), tag)
}

/// A sealed message is bound to its place on its link: the receiving
/// end opens the messages in the order they were sealed, and refuses
/// one altered, out of order, or sealed for another link; the same
/// bytes never look alike on the wire.
#[test]
fn a_sealed_message_is_bound_to_its_place_and_its_link() {
    let hello = impostor_hello(0, 2);
    let cipher = || key().link_cipher(&hello, &[3u8; NONCE_LEN]);
    let (mut seal, mut open) = (cipher(), cipher());
    let (first, second) = (sealed_segment(&mut seal), sealed_segment(&mut seal));
    assert_ne!(first.0, b"segment", "the message travelled in the clear");
    assert_ne!(first, second, "the same bytes at another place were sealed alike");
    for (mut ciphertext, tag) in [first, second.clone()] {
        open.open(&mut ciphertext, &tag).unwrap();
        assert_eq!(ciphertext, b"segment");
    }
    // Replayed: its place has passed.
    let (mut replayed, tag) = second;
    assert_eq!(open.open(&mut replayed, &tag).unwrap_err().message, 2);
    // Altered: one bit of the ciphertext, or of the tag.
    let (mut seal, mut open) = (cipher(), cipher());
    let (mut ciphertext, tag) = sealed_segment(&mut seal);
    ciphertext[6] ^= 1;
    assert!(open.open(&mut ciphertext, &tag).is_err());
    let (mut seal, mut open) = (cipher(), cipher());
    let (mut ciphertext, mut tag) = sealed_segment(&mut seal);
    tag[15] ^= 0x80;
    assert!(open.open(&mut ciphertext, &tag).is_err());
    // Another connection's link (another nonce), or another job's key.
    let (ciphertext, tag) = sealed_segment(&mut cipher());
    let mut other_link = key().link_cipher(&hello, &[4u8; NONCE_LEN]);
    assert!(other_link.open(&mut ciphertext.clone(), &tag).is_err());
    let mut other_job =
        RingKey::derive(b"another job's token").link_cipher(&hello, &[3u8; NONCE_LEN]);
    assert!(other_job.open(&mut ciphertext.clone(), &tag).is_err());
}

/// A link moves on to a fresh key every [`MESSAGES_PER_KEY`] messages:
/// both ends open across the change, and an end that kept the key of
/// the run before cannot open what follows it.
#[test]
fn a_link_moves_on_to_a_fresh_key_every_run_of_messages() {
    let hello = impostor_hello(0, 2);
    // A link's end as it stands before message `next`.
    let at = |next: u64, run: u64| {
        let mut cipher = key().link_cipher(&hello, &[3u8; NONCE_LEN]);
        cipher.next = next;
        cipher.key = message_key(&cipher.link_key, run);
        cipher
    };
    let last_of_the_first_run = MESSAGES_PER_KEY - 1;
    let (mut seal, mut open) = (at(last_of_the_first_run, 0), at(last_of_the_first_run, 0));
    for _ in 0..3 {
        let (mut ciphertext, tag) = sealed_segment(&mut seal);
        open.open(&mut ciphertext, &tag).unwrap();
        assert_eq!(ciphertext, b"segment");
    }
    // Both moved on at message MESSAGES_PER_KEY: the first run's key
    // does not open the next message, the second run's does.
    let next = MESSAGES_PER_KEY + 2;
    assert_eq!(seal.next, next);
    let (ciphertext, tag) = sealed_segment(&mut seal);
    assert!(at(next, 0).open(&mut ciphertext.clone(), &tag).is_err());
    at(next, 1).open(&mut ciphertext.clone(), &tag).unwrap();
}

/// Peers of the earlier wire versions (tagged but readable data; untagged
/// data) are refused at the handshake, with a word that says why, never
/// linked and mis-framed.
#[test]
fn peers_of_earlier_versions_are_refused_at_the_handshake() {
    // A listener, and a peer of an old version that sends it its hello
    // and returns what it was answered (nothing: no challenge, no
    // verdict) once the connection closes.
    let old_peer = |magic: u32| {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let peer = std::thread::spawn(move || {
            let stream = TcpStream::connect(address).unwrap();
            let mut hello = impostor_hello(0, 2);
            hello[..4].copy_from_slice(&magic.to_le_bytes());
            (&stream).write_all(&hello).unwrap();
            stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut rest = Vec::new();
            let _ = (&stream).read_to_end(&mut rest);
            rest
        });
        (listener, peer)
    };
    for (magic, version) in [(0x5253_4234, "RSB4"), (0x5253_4233, "RSB3"), (0x5253_4232, "RSB2")] {
        let (listener, peer) = old_peer(magic);
        let (stream, _) = listener.accept().unwrap();
        let outcome =
            challenge_left(&stream, &key(), Instant::now() + Duration::from_secs(10), || true);
        drop(stream);
        match outcome {
            Err(Handshake::Refused(why)) => {
                assert!(why.contains("older version") && why.contains(version), "{why}")
            }
            other => panic!("a peer of {version} was not refused: {other:?}"),
        }
        assert!(peer.join().unwrap().is_empty(), "the old peer was answered");
    }
    // Waiting for the left neighbour, a rank goes on past the refusal
    // (a hello proves nothing), and its deadline's error says it.
    let (listener, peer) = old_peer(0x5253_4233);
    let loopback = [IpAddr::from([127, 0, 0, 1])];
    let deadline = Instant::now() + Duration::from_secs(2);
    let waited = accept_left(
        &listener,
        1,
        (0, "127.0.0.1:9", &loopback),
        2,
        &key(),
        deadline,
        &AtomicBool::new(false),
    );
    match waited {
        Err(CollectiveError::Link { source, address, peer, .. }) => assert!(
            source.to_string().contains("the last connection refused was")
                && source.to_string().contains("older version")
                && (peer, address.as_str()) == (0, "127.0.0.1:9"),
            "{source}, rank {peer} at {address}"
        ),
        other => panic!("{other:?}"),
    }
    assert!(peer.join().unwrap().is_empty(), "the old peer was answered");
}

/// What a man in the middle does to the bytes rank 0 sends rank 1 after
/// the handshake, at offsets counted from the handshake's end.
#[derive(Debug, Clone)]
enum Tamper {
    /// Flips the lowest bit of the byte at this offset.
    Flip(usize),
    /// Drops these bytes.
    Drop(Range<usize>),
    /// Sends these bytes twice.
    Repeat(Range<usize>),
    /// Sends the second range (which follows the first) before the first.
    Swap(Range<usize>, Range<usize>),
    /// Sends the bytes of `from` again in place of those of `over`, a
    /// later range as long.
    Replay {
        /// The bytes replayed.
        from: Range<usize>,
        /// The bytes they replace.
        over: Range<usize>,
    },
    /// Passes every byte on untouched, and records it.
    Record(Arc<Mutex<Vec<u8>>>),
}

/// A [`Tamper`] at work on a byte stream.
struct Editor {
    /// What it does.
    tamper: Tamper,
    /// The offset of the next byte (0 at the handshake's end).
    offset: usize,
    /// Bytes kept back to repeat, swap or replay.
    held: Vec<u8>,
}

impl Editor {
    /// Takes the stream's next byte and appends what to pass on to `out`.
    fn edit(&mut self, byte: u8, out: &mut Vec<u8>) {
        let at = self.offset;
        self.offset += 1;
        match &self.tamper {
            Tamper::Flip(flipped) => out.push(if at == *flipped { byte ^ 1 } else { byte }),
            Tamper::Drop(dropped) => {
                if !dropped.contains(&at) {
                    out.push(byte);
                }
            }
            Tamper::Repeat(repeated) => {
                out.push(byte);
                if repeated.contains(&at) {
                    self.held.push(byte);
                    if at + 1 == repeated.end {
                        out.extend_from_slice(&self.held);
                    }
                }
            }
            Tamper::Swap(first, second) => {
                if first.contains(&at) {
                    self.held.push(byte);
                } else {
                    out.push(byte);
                    if at + 1 == second.end {
                        out.extend_from_slice(&self.held);
                    }
                }
            }
            Tamper::Replay { from, over } => {
                if from.contains(&at) {
                    self.held.push(byte);
                }
                out.push(if over.contains(&at) { self.held[at - over.start] } else { byte });
            }
            Tamper::Record(recorded) => {
                recorded.lock().unwrap().push(byte);
                out.push(byte);
            }
        }
    }
}

/// A man in the middle of the link from rank 0 to rank 1 (listening at
/// `rank_1`): it passes the handshake on untouched both ways, then does
/// `tamper` to what rank 0 sends. Its address, for rank 0 to dial.
fn man_in_the_middle(rank_1: String, tamper: Tamper) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let (from_0, _) = listener.accept().unwrap();
        let to_1 = TcpStream::connect(&rank_1).unwrap();
        // Rank 1's side of the handshake (and nothing after it), untouched.
        let (mut back_from, mut back_to) = (to_1.try_clone().unwrap(), from_0.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut back_from, &mut back_to);
            let _ = back_to.shutdown(Shutdown::Write);
        });
        // Rank 0's hello, then its proof once rank 1 answered: untouched.
        for len in [HELLO_LEN, TAG_LEN] {
            let mut handshake = vec![0u8; len];
            if (&from_0).read_exact(&mut handshake).is_err()
                || (&to_1).write_all(&handshake).is_err()
            {
                return;
            }
        }
        let mut editor = Editor { tamper, offset: 0, held: Vec::new() };
        let mut incoming = [0u8; 4096];
        loop {
            let n = match (&from_0).read(&mut incoming) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut out = Vec::new();
            for &byte in &incoming[..n] {
                editor.edit(byte, &mut out);
            }
            if (&to_1).write_all(&out).is_err() {
                break;
            }
        }
        let _ = to_1.shutdown(Shutdown::Write);
    });
    address
}

/// Forms a ring of two whose link from rank 0 to rank 1 runs through a
/// [`man_in_the_middle`] that does `tamper`, and runs `f` on both
/// ranks. Returns rank 0's address (the one rank 1 knows its left
/// neighbour by) and what `f` returned on each rank.
fn with_tampered_pair<T: Send>(
    tamper: Tamper,
    f: impl Fn(&mut TcpRing) -> T + Sync,
) -> (String, [T; 2]) {
    let a = RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let b = RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addresses = vec![a.local_addr().unwrap().to_string(), b.local_addr().unwrap().to_string()];
    let through_the_middle =
        vec![addresses[0].clone(), man_in_the_middle(addresses[1].clone(), tamper)];
    let config = RingConfig { timeout: Duration::from_secs(20), segment_floats: 7 };
    let results = std::thread::scope(|scope| {
        let (f, config) = (&f, &config);
        let (addresses, through_the_middle) = (&addresses, &through_the_middle);
        let h0 = scope.spawn(move || {
            f(&mut a.connect(0, through_the_middle, &key(), config.clone()).unwrap())
        });
        let h1 =
            scope.spawn(move || f(&mut b.connect(1, addresses, &key(), config.clone()).unwrap()));
        [h0.join().unwrap(), h1.join().unwrap()]
    });
    (addresses[0].clone(), results)
}

/// The layout of what rank 0 sends rank 1 in an all-reduce of
/// [`TAMPERED_LEN`] floats in segments of 7 in a ring of two: the
/// header (24 bytes and a tag), then 5 segments of its own chunk (28
/// bytes and a tag each), then 5 of the chunk rank 1 summed.
const TAMPERED_LEN: usize = 70;
/// A header on the wire: 6 words and a tag.
const HEADER_BYTES: usize = 24 + LINK_TAG_LEN;
/// A segment of 7 floats on the wire, and its tag.
const SEGMENT_BYTES: usize = 28 + LINK_TAG_LEN;
/// All that rank 0 sends rank 1 in one such all-reduce.
const COLLECTIVE_BYTES: usize = HEADER_BYTES + 10 * SEGMENT_BYTES;

/// Segment `i` of rank 0's stream in its `op`th all-reduce.
fn segment(op: usize, i: usize) -> Range<usize> {
    let start = op * COLLECTIVE_BYTES + HEADER_BYTES + i * SEGMENT_BYTES;
    start..start + SEGMENT_BYTES
}

/// This rank's values in its `op`th all-reduce (exact in f32, and so
/// are their sums); different for every op.
fn tampered_values(rank: usize, op: usize) -> Vec<f32> {
    (0..TAMPERED_LEN).map(|i| (rank * 1000 + op * 100 + i) as f32).collect()
}

/// The right sums of the `op`th all-reduce of [`tampered_values`].
fn tampered_sums(op: usize) -> Vec<f32> {
    let (a, b) = (tampered_values(0, op), tampered_values(1, op));
    a.iter().zip(&b).map(|(a, b)| a + b).collect()
}

/// One rank's part in [`reduce_through`]: each all-reduce's outcome
/// (the sums, or the error), and the outcome of one more collective.
type Reduced = (Vec<Result<Vec<f32>, CollectiveError>>, Result<(), CollectiveError>);

/// Runs `ops` all-reduces of [`tampered_values`] through a
/// [`man_in_the_middle`] that does `tamper`, then one more collective.
fn reduce_through(tamper: Tamper, ops: usize) -> (String, [Reduced; 2]) {
    with_tampered_pair(tamper, |ring| {
        let outcomes = (0..ops)
            .map(|op| {
                let mut data = tampered_values(ring.rank(), op);
                ring.all_reduce_sum(Buffer::Host(&mut data)).map(|()| data)
            })
            .collect();
        let later = ring.all_reduce_sum(Buffer::Host(&mut [1.0f32; 3]));
        (outcomes, later)
    })
}

/// Checks that a tampered collective failed on both ranks, on rank 1
/// with an integrity error naming rank 0 (at `rank_0`) and message
/// `message` of the link, and that the ring was closed on both.
fn assert_detected(what: &str, rank_0: &str, message: u64, results: &[Reduced; 2]) {
    for (rank, (outcomes, later)) in results.iter().enumerate() {
        let last = outcomes.last().unwrap();
        assert!(last.is_err(), "{what}: rank {rank} returned sums: {last:?}");
        let later = later.as_ref().expect_err("a closed ring took a later collective");
        assert!(later.to_string().contains("closed"), "{what}: rank {rank}: {later}");
    }
    let error = results[1].0.last().unwrap().as_ref().unwrap_err();
    match error {
        CollectiveError::Tampered { rank: 1, peer: 0, address, message: m }
            if address == rank_0 && *m == message => {}
        other => panic!("{what}: rank 1 failed otherwise: {other:?}"),
    }
    let said = error.to_string();
    assert!(
        said.contains(&format!(
            "rank 1: the data from rank 0 ({rank_0}) failed its integrity check"
        )),
        "{what}: {said}"
    );
    // The ring was closed on this error: a later collective says it.
    let later = results[1].1.as_ref().unwrap_err().to_string();
    assert!(later.contains("failed its integrity check"), "{what}: {later}");
}

/// A bit flipped on the wire between two ranks, in a collective's header,
/// a segment's values or a segment's tag: the all-reduce fails on the
/// receiving rank with an integrity error that names the sending rank
/// and its address (and on the other, whose link was closed), never
/// with wrong sums, and the ring is closed. (Where the values' tags went
/// unchecked, the flipped value came out in both ranks' sums.)
#[test]
fn a_bit_flipped_on_the_wire_fails_the_all_reduce_with_an_integrity_error_naming_the_peer() {
    for (what, at, message) in [
        ("the header", 5, 0),
        // The top byte of the third float of the first segment.
        ("a segment's values", segment(0, 0).start + 2 * 4 + 3, 1),
        ("a segment's tag", segment(0, 1).start + 28 + 3, 2),
    ] {
        let (rank_0, results) = reduce_through(Tamper::Flip(at), 1);
        assert_detected(what, &rank_0, message, &results);
    }
    // Untouched, the same man in the middle changes nothing.
    let (_, results) = reduce_through(Tamper::Flip(usize::MAX), 2);
    for (outcomes, later) in results {
        for (op, outcome) in outcomes.into_iter().enumerate() {
            assert_eq!(outcome.unwrap(), tampered_sums(op));
        }
        later.unwrap();
    }
}

/// Whole segments dropped, repeated, swapped, or replayed from an earlier
/// collective on the wire, each with its valid tag: the message count
/// catches every one. (Unchecked, a repeated, swapped or replayed
/// segment came out as wrong sums, and a dropped one as a timeout.)
#[test]
fn segments_dropped_repeated_reordered_or_replayed_on_the_wire_are_detected() {
    for (what, tamper, ops, message) in [
        ("dropped", Tamper::Drop(segment(0, 1)), 1, 2),
        ("repeated", Tamper::Repeat(segment(0, 1)), 1, 3),
        ("swapped", Tamper::Swap(segment(0, 1), segment(0, 2)), 1, 2),
        // Op 0 is 11 messages (0 to 10); op 1's header is 11, its
        // segment 1 is 13.
        ("replayed", Tamper::Replay { from: segment(0, 1), over: segment(1, 1) }, 2, 13),
    ] {
        let (rank_0, results) = reduce_through(tamper, ops);
        assert_detected(what, &rank_0, message, &results);
        if ops == 2 {
            // Before the replay: right sums on both ranks.
            for (outcomes, _) in &results {
                assert_eq!(outcomes[0].as_ref().unwrap(), &tampered_sums(0), "{what}");
            }
        }
    }
}

/// A bit flipped in a link probe's zeros: the probe fails on the rank
/// that receives them, with the integrity error.
#[test]
fn a_bit_flipped_in_a_link_probe_is_detected() {
    // The probe's header and its barrier (a header, and one segment of
    // 1 float from rank 0), then blocks of 8 KiB (64 KiB in all).
    let probe_start = 2 * HEADER_BYTES + 4 + LINK_TAG_LEN;
    let at = probe_start + 3 * (8192 + LINK_TAG_LEN) + 100;
    let (rank_0, results) = with_tampered_pair(Tamper::Flip(at), |ring| {
        let probe = ring.probe_incoming_link(1 << 16).map(|_| ());
        (probe, ring.barrier())
    });
    // Rank 0's own probe may have finished (its incoming link was not
    // touched); the barrier after it fails on the links rank 1 closed.
    let [(_, later_0), (probe_1, later_1)] = results;
    assert!(later_0.is_err() && later_1.is_err(), "{later_0:?} {later_1:?}");
    match probe_1 {
        // Header 0, the barrier's 1 and 2, blocks from 3: block 3 is 6.
        Err(CollectiveError::Tampered { rank: 1, peer: 0, address, message: 6 })
            if address == rank_0 => {}
        other => panic!("rank 1's probe: {other:?}"),
    }
}

/// The benchmark's switch: plaintext links still sum (every rank
/// switched), and sealed ones again after switching back; two ranks that
/// disagree both fail the header check, before any data moves, and stay
/// in step.
#[test]
fn plaintext_links_for_the_benchmark_still_sum_and_switch_back() {
    let results = with_ring(3, |ring| {
        let mut sums = Vec::new();
        for plaintext in [true, false] {
            ring.plaintext_links_for_benchmark_only(plaintext);
            let mut data = vec![ring.rank() as f32; 100];
            ring.all_reduce_sum(Buffer::Host(&mut data)).unwrap();
            sums.push(data);
        }
        sums
    });
    for sums in results {
        assert_eq!(sums, vec![vec![3.0; 100]; 2]);
    }
    let results = with_ring(2, |ring| {
        ring.plaintext_links_for_benchmark_only(ring.rank() == 1);
        let mut data = vec![1.0f32; 100];
        let disagreed = ring.all_reduce_sum(Buffer::Host(&mut data)).map_err(|e| e.to_string());
        ring.plaintext_links_for_benchmark_only(false);
        ring.all_reduce_sum(Buffer::Host(&mut data)).unwrap();
        (disagreed, data)
    });
    for (disagreed, data) in results {
        let error = disagreed.expect_err("ranks that disagree on sealing summed");
        assert!(error.contains("the benchmark's switch"), "{error}");
        assert_eq!(data, vec![2.0; 100]);
    }
}

/// Nothing a rank sends after the handshake is readable on the wire: a
/// man in the middle that records rank 0's stream over two all-reduces
/// finds none of its values' bytes, not even a run of 8 of them (two
/// floats), where the benchmark's plaintext links show every segment.
#[test]
fn the_values_a_rank_sends_are_not_readable_on_the_wire() {
    let sent_in_the_clear = |plaintext: bool| {
        let recorded = Arc::new(Mutex::new(Vec::new()));
        let (_, results) = with_tampered_pair(Tamper::Record(recorded.clone()), |ring| {
            ring.plaintext_links_for_benchmark_only(plaintext);
            (0..2)
                .map(|op| {
                    let mut data = tampered_values(ring.rank(), op);
                    ring.all_reduce_sum(Buffer::Host(&mut data)).unwrap();
                    data
                })
                .collect::<Vec<_>>()
        });
        for sums in results {
            assert_eq!(sums, vec![tampered_sums(0), tampered_sums(1)]);
        }
        let wire = recorded.lock().unwrap().clone();
        assert!(wire.len() >= 2 * 10 * 28, "recorded {} bytes", wire.len());
        // Rank 0's values, and the sums it forwards, in runs of 8 bytes.
        let mut runs = Vec::new();
        for op in 0..2 {
            for values in [tampered_values(0, op), tampered_sums(op)] {
                let bytes: &[u8] = bytemuck::cast_slice(&values);
                runs.extend(bytes.chunks_exact(8).map(<[u8]>::to_vec));
            }
        }
        let found = runs.iter().filter(|run| wire.windows(8).any(|w| w == &run[..])).count();
        (found, runs.len())
    };
    let (found, runs) = sent_in_the_clear(false);
    assert_eq!(found, 0, "{found} of {runs} runs of values were readable on the wire");
    // The same check finds them on links that do not seal.
    let (found, runs) = sent_in_the_clear(true);
    assert!(found >= runs / 3, "only {found} of {runs} runs found in plaintext");
}
