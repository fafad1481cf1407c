//! `remus-relay`: a WAN between two remus nodes on one machine.
//!
//! Listens on `--listen`, forwards to `--to`, and impairs both directions
//! alike (one-way `--delay`, so the round trip adds twice it). While it
//! runs, lines on standard input switch it: `partition`, `heal`, `stats`.
//! It prints its counters every `--report` and when standard input ends.

use std::io::BufRead;
use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use remus_relay::{parse_rate, Direction, Impairment, Relay, RelayConfig};

#[derive(Parser)]
#[command(name = "remus-relay", about = "Relay UDP with WAN impairment: delay, jitter, loss, duplication, rate, partitions")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Address to forward to.
    #[arg(long)]
    to: SocketAddr,
    /// One-way delay, each direction (e.g. 50ms).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0ms")]
    delay: Duration,
    /// Delay varies uniformly within ±jitter (reorders datagrams).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0ms")]
    jitter: Duration,
    /// Fraction of datagrams lost, each direction (e.g. 0.01).
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Mean loss burst length in datagrams (1: independent).
    #[arg(long, default_value_t = 1.0)]
    burst: f64,
    /// Fraction of datagrams duplicated.
    #[arg(long, default_value_t = 0.0)]
    duplicate: f64,
    /// Bottleneck rate, each direction (e.g. 100mbit).
    #[arg(long, value_parser = parse_rate)]
    rate: Option<u64>,
    /// Bottleneck queue in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    queue: usize,
    /// Seed of the random draws.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print counters this often (0: only on request).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    report: Duration,
}

fn print_counters(r: &Relay) {
    eprintln!("relay up:   {}", r.counters(Direction::Up));
    eprintln!("relay down: {}", r.counters(Direction::Down));
    if let Some(d) = r.kernel_drops() {
        eprintln!("relay kernel drops: {d}");
    }
}

fn main() {
    let a = Args::parse();
    let imp = Impairment {
        delay: a.delay,
        jitter: a.jitter,
        loss: a.loss,
        loss_burst: a.burst,
        duplicate: a.duplicate,
        rate: a.rate,
        queue: a.queue,
    };
    let relay = match Relay::start(&RelayConfig { listen: a.listen, upstream: a.to, up: imp, down: imp, seed: a.seed }) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("remus-relay: {e}");
            std::process::exit(2);
        }
    };
    println!("{}", relay.local_addr());
    let relay = std::sync::Arc::new(relay);
    if !a.report.is_zero() {
        let r = std::sync::Arc::clone(&relay);
        std::thread::spawn(move || loop {
            std::thread::sleep(a.report);
            print_counters(&r);
        });
    }
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        match line.trim() {
            "partition" => relay.set_partitioned(true),
            "heal" => relay.set_partitioned(false),
            "stats" => print_counters(&relay),
            "" => {}
            other => eprintln!("remus-relay: unknown command {other:?} (partition, heal, stats)"),
        }
    }
    print_counters(&relay);
    // Standard input closed: keep relaying until killed.
    loop {
        std::thread::park();
    }
}
