//! `memsync`: network-native Linux memory regions. A thin binary over the library crates.

#[macro_use]
mod out;
mod cmd;
mod context;
mod device;
mod dsm;
mod map;
mod migrate;
mod mount;
mod mount_migrate;
mod proxy;
mod serve;
mod sync;
mod tour;
mod vmm;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

const STORE_HELP: &str = "\
STORE URLS:
  mem:SIZE                          sparse memory, e.g. mem:1G (chunk=64K by default)
  file:PATH[?size=SIZE&readonly]    a regular file or block device (size= creates/extends)
  dir:PATH?size=SIZE[&chunk=64K]    a directory with one file per chunk
  nbd://HOST[:PORT]/EXPORT          an NBD export (also nbd+unix:///EXPORT?socket=PATH, nbds://)
  redis://HOST[:PORT]?size=SIZE     one Redis key per chunk (rediss://, redis+cluster://H:P,H:P)
  s3://BUCKET/PREFIX?size=SIZE&endpoint=http://HOST:PORT
                                    one S3 object per chunk (?object=KEY: one object, read-only)
  Sizes take K, M, G, T suffixes (binary). Run `memsync stores` for every scheme and parameter.

EXAMPLES:
  memsync demo                               a guided tour on the embedded mem: store
  memsync copy file:/tmp/disk.img 'dir:/tmp/chunks?size=1G'
  memsync serve mem:1G --listen nbd://127.0.0.1:10809
  memsync map nbd://127.0.0.1:10809/ --chunk 2M
  memsync map nbd://127.0.0.1:10809/ --cache /var/tmp/cache   the same through a local cache
  memsync mount nbd://127.0.0.1:10809/ --cache /var/tmp/cache --fuse /mnt/memsync
  memsync bench store --quick --json";

/// memsync makes Linux memory regions network-native: stores (memory, files, directories, and
/// later NBD, Redis, S3) are moved chunk by chunk to and from memory.
#[derive(Debug, Parser)]
#[command(name = "memsync", version, about, long_about = None, after_help = STORE_HELP)]
struct Cli {
    /// More log output on stderr (-v info, -vv debug, -vvv trace). RUST_LOG overrides it.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,

    /// Write Prometheus metrics of the opened stores to this file when the command ends.
    #[arg(long, global = true, value_name = "FILE")]
    metrics: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// A guided tour on the embedded mem: store: NBD, lazy mapping, migration, delta sync, DSM.
    Demo(tour::DemoArgs),
    /// Show a store's size, capabilities and allocation map, or (for /dev/nbdN) what backs a
    /// kernel NBD device.
    Info(cmd::InfoArgs),
    /// Copy one store to another (same size), skipping holes; shows progress.
    Copy(cmd::CopyArgs),
    /// Print the BLAKE3 checksum of a store's contents.
    Checksum(cmd::ChecksumArgs),
    /// Run a benchmark suite; every figure is printed beside its peer or physical limit.
    Bench(cmd::BenchArgs),
    /// Export stores over NBD (TCP or unix socket) until SIGINT/SIGTERM.
    Serve(serve::ServeArgs),
    /// Managed mount: a local cache of a remote store (background pull and push, persisted
    /// chunk map) as a FUSE file and/or an NBD export, until SIGINT/SIGTERM. With --device, a
    /// direct mount: the store (or its cache) as a kernel block device /dev/nbdN.
    Mount(Box<mount::MountArgs>),
    /// A TCP delay proxy (added RTT, bandwidth cap) for RTT emulation, until SIGINT/SIGTERM.
    Proxy(proxy::ProxyArgs),
    /// Map a store lazily (userfaultfd), touch and checksum every byte, print fault statistics.
    ///
    /// With --cache DIR the region is the frontend of a managed mount: it maps a local cache of
    /// STORE in DIR instead of STORE itself (background pull, persisted chunk map), and prints
    /// the cache's statistics after closing it. Run it again with the same DIR and nothing that
    /// is already local is fetched from STORE.
    Map(map::MapArgs),
    /// Delta sync: make DST equal to SRC sending only what differs (BLAKE3 chunk digests on each
    /// side, 4 KiB page deltas, a digest index next to local files); or serve a store as a sync
    /// peer (--listen); or keep pushing changes (--every).
    Sync(sync::SyncArgs),
    /// Live migration of a store (e.g. the file another program maps): pre-copy, post-copy or
    /// hybrid to a destination (`--listen` on the other side), with a final report.
    Migrate(migrate::MigrateArgs),
    /// Firecracker's UFFD page-fault handler: serve a restored microVM's guest memory from a
    /// store (listen on --socket, one VMM; exits when it does).
    UffdHandler(vmm::UffdHandlerArgs),
    /// Cloud Hypervisor on-demand restore: send a snapshot's configuration and state and serve
    /// its memory from a store, page by page, as the VM faults.
    ChRestore(vmm::ChRestoreArgs),
    /// One node of a distributed shared memory region (Ivy: coherent pages across hosts),
    /// until SIGINT/SIGTERM.
    Dsm(dsm::DsmArgs),
    /// List the store URL schemes this build supports.
    Stores,
    /// Read a store from start to end with the NBD bench's client pattern (32 reads of 2 MiB
    /// in flight), discarding the bytes: the `nbd` bench times it as a whole command beside
    /// nbdcopy's `null:` sink.
    #[command(hide = true)]
    BenchNbdRead(cmd::ReadArgs),
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let ctx = context::Context::new(cli.metrics.clone());
    let result = match cli.command {
        Command::Demo(a) => tour::run(&ctx, a),
        Command::Info(a) => cmd::info(&ctx, a),
        Command::Copy(a) => cmd::copy(&ctx, a),
        Command::Checksum(a) => cmd::checksum(&ctx, a),
        Command::Bench(a) => cmd::bench(&ctx, a),
        Command::Serve(a) => serve::serve(&ctx, a),
        Command::Mount(a) if a.device.device.is_some() => device::mount(&ctx, *a),
        Command::Mount(a) => mount::mount(&ctx, *a),
        Command::Sync(a) => sync::sync(&ctx, a),
        Command::Proxy(a) => proxy::proxy(&ctx, a),
        Command::Map(a) => map::map(&ctx, a),
        Command::Migrate(a) => migrate::migrate(&ctx, a),
        Command::UffdHandler(a) => vmm::uffd_handler(&ctx, a),
        Command::ChRestore(a) => vmm::ch_restore(&ctx, a),
        Command::Dsm(a) => dsm::dsm(&ctx, a),
        Command::Stores => cmd::stores(&ctx),
        Command::BenchNbdRead(a) => cmd::bench_nbd_read(&ctx, a),
    };
    let result = result.and_then(|()| ctx.write_metrics());
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes.
            let msg: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            let mut line = String::new();
            for m in msg {
                if !line.contains(&m) {
                    if !line.is_empty() {
                        line.push_str(": ");
                    }
                    line.push_str(&m);
                }
            }
            eprintln!("memsync: error: {line}");
            ctx.shutdown(std::time::Duration::from_secs(1));
            ExitCode::FAILURE
        }
    }
}
